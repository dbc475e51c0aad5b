"""The backtest protocol: splits, vocabularies, no peeking, selection on validation only."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from smlrec import backtest as bt
from smlrec.cli import app
from smlrec.config import DailyConfig
from smlrec.data.synthetic import generate_stream, write_synthetic
from smlrec.schema import ITEM, PERIOD, TS, USER
from smlrec.strategies import Popularity


def test_default_split_is_the_movielens_split_and_scales():
    s = bt.Split.default(32)
    assert (s.pretrain, s.meta, s.val, s.test) == (10, 12, 3, 7)
    assert [s.phase(t) for t in (0, 9, 10, 21, 22, 24, 25, 31)] == [
        "pretrain", "pretrain", "meta", "meta", "val", "val", "test", "test"]
    for n in (6, 10, 24, 100):
        s = bt.Split.default(n)
        assert s.pretrain + s.meta + s.val + s.test == n and min(s.model_dump().values()) >= 1
    with pytest.raises(ValueError, match="at least 6 periods"):
        bt.Split.default(5)


def _frame(rows):
    df = pd.DataFrame(rows, columns=[USER, ITEM, PERIOD])
    df[TS] = pd.to_datetime(df[PERIOD], utc=True)
    return df


def test_index_periods_grows_vocabularies_in_time_order():
    df = _frame([("a", "x", "2024-01-01"), ("b", "y", "2024-01-01"),
                 ("c", "x", "2024-01-02"), ("a", "z", "2024-01-02")])
    data = bt.index_periods(df)
    assert data.n_users_after == [2, 3] and data.n_items_after == [2, 3]
    # Rows in the canonical order (timestamp, user, item), whatever order they came in.
    assert data.periods[1].users.tolist() == [0, 2]
    assert data.periods[1].items.tolist() == [2, 0]


def test_each_period_is_tested_with_the_model_of_the_period_before(monkeypatch):
    seen_at_eval = []

    class Recorder(Popularity):
        def update(self, history, n_users, n_items):
            self.last = history[-1].period
            return super().update(history, n_users, n_items)

        def item_prior(self):
            seen_at_eval.append(self.last)
            return super().item_prior()

    monkeypatch.setattr(bt, "build_strategy", lambda *a: Recorder())
    days = [f"2024-01-0{t + 1}" for t in range(8)]
    rows = [("seed", f"i{i}", days[0]) for i in range(16)]  # every item known from day 0
    rows += [(f"u{u}", f"i{(3 * u + t) % 16}", day) for t, day in enumerate(days) for u in range(6)]
    cfg = bt.BacktestConfig(methods=["pop"], split=bt.Split(pretrain=2, meta=2, val=2, test=2),
                            progress=False, seeds=(0,), grids={"pop": [{}]})
    res = bt.run_backtest(_frame(rows), cfg, log=lambda _: None).results
    evaluated = res.dropna(subset=["ndcg@20"])
    assert evaluated["period"].tolist() == days[3:]
    assert seen_at_eval == days[2:-1]  # period t was scored by the model after t-1


def test_selection_uses_validation_periods_only():
    rows = []
    for cid, (val, test) in enumerate([(0.3, 0.1), (0.2, 0.9)]):
        rows += [{"seed": 0, "method": "m", "config": cid, "params": "{}", "phase": "val",
                  "ndcg@20": val, "n_interactions": 10, "train_seconds": 1.0},
                 {"seed": 0, "method": "m", "config": cid, "params": "{}", "phase": "test",
                  "ndcg@20": test, "n_interactions": 10, "train_seconds": 1.0}]
    assert bt.select_configs(pd.DataFrame(rows)) == {"m": 0}


def test_selection_is_by_the_mean_over_seeds():
    # Config 0 wins on seed 0 by a hair and loses badly on seed 1: the mean picks config 1.
    vals = {(0, 0): 0.30, (0, 1): 0.10, (1, 0): 0.29, (1, 1): 0.28}
    rows = [{"seed": seed, "method": "m", "config": cid, "params": "{}", "phase": "val",
             "ndcg@20": v, "n_interactions": 10, "train_seconds": 1.0}
            for (cid, seed), v in vals.items()]
    assert bt.select_configs(pd.DataFrame(rows)) == {"m": 1}


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic(str(root), n_users=300, n_items=120, n_periods=8,
                    interactions_per_period=1500, returning_share=0.7, drift=0.2, seed=1)
    return root


def test_backtest_cli_writes_csv_chart_and_summary(small_stream, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"sml": [{"outer_steps": 1}], "full": [{"epochs": 1}],
                                "finetune": [{"epochs": 1}, {"epochs": 2}],
                                "window": [{"window": 2, "epochs": 1}],
                                "pop": [{"window": 1}, {"half_life": 1}]}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["backtest", "--data",
                                      str(small_stream), "--out", str(out), "--grid", str(grid),
                                      "--pretrain-epochs", "2", "--seeds",
                                      "0,1", "--blends", "0,2", "--write-config",
                                      str(tmp_path / "ml.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "synthetic"
    assert set(summary["methods"]) == {"sml", "full", "finetune", "window", "pop"}
    assert summary["seeds"] == [0, 1]
    for m in summary["methods"].values():
        for key in ("ndcg@20", "recall@20", "auc", "train_seconds_last_period", "ndcg@20_sd",
                    "recall@20_sd"):
            assert np.isfinite(m[key])
        assert 0 <= m["ndcg@20"] <= 1 and 0 <= m["auc"] <= 1
        low, high = m["ci95_vs_pop"]
        assert low <= m["ratio_vs_pop"] <= high and m["config"] == m["params"]
    assert summary["methods"]["pop"]["ratio_vs_pop"] == 1.0
    assert {p["phase"] for p in summary["periods"]} == {"val", "test"}
    assert all(p["n_users"] > 0 for p in summary["periods"])
    # Every MF config was also scored with the blend, and lambda was chosen on validation.
    assert {c["params"].get("blend") for c in summary["configs"]["window"]} == {0.0, 2.0}
    conf = DailyConfig.load(str(tmp_path / "ml.yaml"))
    assert [c.method for c in conf.challengers][0] == "sml" and len(conf.challengers) == 2
    assert conf.challengers[1].params == summary["methods"][conf.challengers[1].method]["params"]
    assert conf.floor.params == summary["methods"]["pop"]["params"]
    assert conf.pretrain_epochs == 2 and conf.selection["seeds"] == [0, 1]
    assert summary["methods"]["pop"]["train_seconds_last_period"] < 1
    assert not list(out.glob("*.partial.jsonl"))  # the finished run's rows are all in the CSV
    per = pd.read_csv(out / "per_period.csv")
    assert set(per["phase"]) == {"meta", "val", "test"}
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SML NDCG@20 / best non-SML method" in result.output
    # Not a terminal: progress is one line per period; the chosen configurations in full.
    assert "period 1/" in result.output and "left" in result.output
    assert f"  window: {json.dumps(summary['methods']['window']['params'], sort_keys=True)}" \
        in result.output


def test_a_stopped_backtest_keeps_the_periods_it_finished(tmp_path, monkeypatch):
    frame = generate_stream(n_users=200, n_items=80, n_periods=6,
                            interactions_per_period=800, returning_share=0.7, drift=0.2, seed=3)
    cfg = bt.BacktestConfig(methods=["window", "pop"], grids={"window": [{"window": 2,
                                                                          "epochs": 1}],
                                                              "pop": [{}]},
                            pretrain_epochs=1, progress=False, seeds=(0,), blends=(0.0,),
                            partial_dir=str(tmp_path))
    calls = {"n": 0}
    real = bt.evaluate

    def stop_at_the_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # two models a period, from the second period on: in the fourth
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bt, "evaluate", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        bt.run_backtest(frame, cfg, log=lambda _: None)
    rows = [json.loads(line) for line in bt.partial_path(tmp_path, 0).read_text().splitlines()]
    p = bt.Split.default(6).pretrain  # the first period run; evaluated from the next one on
    assert {r["t"] for r in rows} == {p, p + 1, p + 2} and len(rows) == 6  # whole periods
    assert all(np.isfinite(r["ndcg@20"]) for r in rows if r["t"] > p)


def test_too_few_users_to_decide_anything_is_said():
    periods = [{"period": "a", "phase": "val", "n_users": 4},
               {"period": "b", "phase": "val", "n_users": 40},
               {"period": "c", "phase": "test", "n_users": 300}]
    [warning] = bt.few_users_warnings(periods)
    assert "1 validation period(s)" in warning and "a: 4" in warning and "b: 40" not in warning
    assert bt.few_users_warnings(periods[1:]) == []


def test_backtest_cli_reports_bad_arguments_clearly(small_stream, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["backtest", "--data-root", str(tmp_path / "nothing"),
                            "--no-progress"])
    assert r.exit_code == 2 and "error:" in r.output
    r = runner.invoke(app, ["backtest", "--data-root", str(small_stream), "--methods",
                            "sml,magic", "--no-progress"])
    assert r.exit_code == 2 and "magic" in r.output
    r = runner.invoke(app, ["backtest", "--data-root", str(small_stream), "--period-spec", "7D",
                            "--no-progress"])
    assert r.exit_code == 2 and "7D" in r.output
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps({"window": [{"windw": 3}]}))
    r = runner.invoke(app, ["backtest", "--data-root", str(small_stream), "--grid", str(bad),
                            "--methods", "window", "--no-progress"])
    assert r.exit_code == 2 and "windw" in r.output


def test_synthetic_stream_is_learnable_by_sml_and_baselines(small_stream):
    frame = generate_stream(n_users=300, n_items=120, n_periods=8,
                            interactions_per_period=1500, returning_share=0.7, drift=0.2, seed=1)
    cfg = bt.BacktestConfig(methods=["sml", "pop"], grids={"sml": [{"outer_steps": 1}],
                                                           "pop": [{}]},
                            pretrain_epochs=3, progress=False, seeds=(0,), blends=())
    res = bt.run_backtest(frame, cfg, log=lambda _: None).results
    test = res[res["phase"] == "test"]
    assert test["ndcg@20"].notna().all()
    assert (test["auc"] > 0.5).all()  # better than chance on every test period


def test_seeds_run_in_worker_processes_give_the_same_figures():
    frame = generate_stream(n_users=200, n_items=80, n_periods=6,
                            interactions_per_period=800, returning_share=0.7, drift=0.2, seed=3)
    cfg = bt.BacktestConfig(methods=["sml", "window", "pop"],
                            grids={"sml": [{"outer_steps": 1, "what_epochs": 1}],
                                   "window": [{"window": 2, "epochs": 1}], "pop": [{}]},
                            pretrain_epochs=2, progress=False, seeds=(0, 1), blends=(0.0, 2.0))
    lines: list[str] = []
    one = bt.run_backtest(frame, cfg, log=lambda _: None)
    two = bt.run_backtest(frame, cfg, log=lines.append, jobs=2)
    cols = ["seed", "method", "config", "t", "phase", "ndcg@20", "recall@20", "auc"]
    a, b = one.results[cols], two.results[cols]
    assert len(a) == len(b) and a["ndcg@20"].notna().any()
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert one.per_user.keys() == two.per_user.keys()
    for key, value in one.per_user.items():
        np.testing.assert_array_equal(value["ndcg@20"], two.per_user[key]["ndcg@20"])
    assert sum("pretrained W_0" in line for line in lines) == 2  # workers' logs come back
    assert one.strategies and not two.strategies
