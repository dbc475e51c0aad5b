"""The retraining cost curve benchmark's pieces, on a tiny stream (no results written)."""

from __future__ import annotations

import json
import time

from benchmarks import cost_curve as cc


def test_phase_clock_counts_nested_calls_once():
    class Job:
        def outer(self):
            time.sleep(0.02)
            self.inner()

        def inner(self):
            time.sleep(0.03)

    job, clock = Job(), cc.PhaseClock()
    clock.wrap(job, "outer")
    clock.wrap(job, "inner")
    job.outer()
    got = clock.take()
    assert 0.02 <= got["outer"] < 0.03 + 0.02 and 0.03 <= got["inner"] < 0.06
    assert clock.take() == {}


def test_a_tiny_cost_curve_runs_and_writes_its_outputs(tmp_path):
    settings = cc.chosen_settings()
    assert set(settings["params"]) == set(cc.METHODS)
    params = cc.stream_params(periods=3, pretrain_periods=1, interactions_per_period=150,
                              active_users=40)
    data = cc.make_stream(params)
    assert len(data.periods) == 5
    rows = cc.run_seed(data, settings, seed=0, periods=3, pretrain_periods=1, log=lambda _: None)
    assert len(rows) == 3 * len(cc.METHODS)
    for r in rows:
        assert r["train_seconds"] > 0 and abs(sum(r["phases"].values()) - r["train_seconds"]) < 1e-9
        assert 0 <= r["ndcg@20"] <= 1
    sml = [r for r in rows if r["method"] == "sml"]
    assert set(cc.SML_PHASES) <= set(sml[0]["phases"])
    full = [r for r in rows if r["method"] == "full"]
    assert [r["n_train"] for r in full] == [r["history_rows"] for r in full]
    summary = cc.summarize(rows)
    assert set(summary["verdicts"]) == {"sml_flat", "sml_vs_full_at_last"}
    assert len(summary["curve"]["sml"]["seconds_mean"]) == 3
    out = {"hardware": {"cpu": "test", "cpu_count": 1, "torch_threads": 1, "torch": "x",
                        "device": "cpu"},
           "produced_by": {"command": "pytest", "commit": "x", "date": "today"},
           "load_average_start": [0.0, 0.0, 0.0], "load_average_end": [0.0, 0.0, 0.0],
           "jobs": 1, "wall_seconds": 1.0, "stream": params, "pretrain_periods": 1,
           "settings": settings, "summary": summary, "rows": rows}
    paths = cc.write_outputs(out, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["summary"]["periods"] == 3
    assert cc.summarize(saved["rows"])["verdicts"] == summary["verdicts"]
    assert "## Verdicts" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 0
