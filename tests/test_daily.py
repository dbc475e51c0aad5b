"""The daily run's core: bootstrap, the champion/challenger gate, the chain, idempotency,
integrity, and parity with the backtest."""

from __future__ import annotations

import shutil

import pytest
import torch

from smlrec import backtest as bt
from smlrec.config import DailyConfig, MethodSpec, SMLConfig
from smlrec.daily import bootstrap, chain_base, gate, is_done, load_config, run_period
from smlrec.data.store import list_periods, read_periods
from smlrec.data.synthetic import write_synthetic
from smlrec.errors import IntegrityError, SmlrecError
from smlrec.registry import StateStore

CFG = DailyConfig(
    sml=SMLConfig(outer_steps=3, theta_init="identity"), pretrain_periods=3, pretrain_epochs=10,
    challengers=[MethodSpec(method="sml", params={"blend": 0.5}),
                 MethodSpec(method="window", params={"window": 2, "epochs": 3,
                                                     "n_negatives": 2, "blend": 1.0})],
    floor=MethodSpec(method="pop", params={"window": 2}))


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("daily-data"))
    write_synthetic(root, n_users=300, n_items=100, n_periods=9, interactions_per_period=1500,
                    returning_share=0.8, drift=0.1, seed=3, popularity_skew=0.0)
    return root


@pytest.fixture(scope="module")
def booted_once(stream, tmp_path_factory):
    state = tmp_path_factory.mktemp("booted") / "state"
    bootstrap(stream, StateStore(str(state)), CFG, list_periods(stream)[5])
    return state


@pytest.fixture
def booted(stream, booted_once, tmp_path):
    """A fresh copy of the bootstrapped state store for each test."""
    shutil.copytree(booted_once, tmp_path / "state")
    return StateStore(str(tmp_path / "state")), list_periods(stream)


def test_bootstrap_leaves_every_challenger_in_one_candidate_and_keeps_the_config(booted):
    store, periods = booted
    assert store.get_pointer("candidate") == periods[5]
    assert store.get_pointer("production") is None
    assert store.periods() == [periods[5]]
    tensors, meta, _, _ = store.load_period(periods[5])
    assert set(meta["challengers"]) == {"sml", "window"}
    for name in ("sml", "window"):  # both blend: one extra column
        assert tensors[f"serve.{name}.user"].shape[1] == tensors["w.user"].shape[1] + 1
        assert torch.all(tensors[f"serve.{name}.user"][:, -1] == 1)
    assert load_config(store).challengers == CFG.challengers


def test_a_good_first_candidate_is_promoted_and_the_chain_moves_on(booted, stream, tmp_path):
    store, periods = booted
    out = run_period(stream, store, periods[6], CFG, str(tmp_path / "work"))
    assert out["gate"]["decision"] == "promote", out["gate"]["reasons"]
    prod = store.pointer_info("production")
    assert prod["period"] == periods[5] and prod["strategy"] == out["gate"]["strategy"]
    assert store.get_pointer("candidate") == periods[6]
    assert is_done(store, periods[6]) and not is_done(store, periods[7])
    decisions = store.decisions()
    assert [d["period"] for d in decisions] == [periods[6]]
    d = decisions[0]
    assert set(d["scores"]) == {"sml", "window", "popularity"}
    assert d["strategy"] in ("sml", "window") and d["challengers"] == ["sml", "window"]
    best = max(("sml", "window"), key=lambda n: d["scores"][n]["ndcg@20"])
    assert d["strategy"] == best  # the best eligible challenger
    assert d["n_users"] == d["scores"]["popularity"]["n_users"] > 0
    low, high = d["vs_floor"][best]["ci95"]
    assert low <= d["vs_floor"][best]["ratio"] <= high


def test_a_worse_candidate_is_rejected_and_the_incumbent_kept(booted, stream, tmp_path):
    store, periods = booted
    run_period(stream, store, periods[6], CFG, str(tmp_path / "w1"))  # promotes periods[5]
    prod = store.pointer_info("production")
    # Make every new challenger useless: zero what they serve (checksums rewritten).
    tensors, meta, users, items = store.load_period(periods[6])
    for k in [k for k in tensors if k.startswith("serve.")]:
        tensors[k] = tensors[k] * 0
    store.save_period(periods[6], tensors, meta, users, items)
    result = gate(stream, store, periods[7], CFG)
    assert not result.accept and result.decision == "reject" and result.strategy is None
    # Each challenger was also compared with the incumbent, user by user (paired bootstrap).
    logged = store.decisions()[-1]["vs_incumbent"]
    assert set(logged) == {"sml", "window"}
    assert all(v["ci95"][0] <= v["ratio"] <= v["ci95"][1] for v in logged.values())
    assert store.pointer_info("production")["period"] == prod["period"]  # incumbent kept
    assert store.pointer_info("production")["strategy"] == prod["strategy"]
    # Every challenger continues its own chain, as in the backtest; the gate decides only
    # what is served.
    assert chain_base(store) == periods[6]


def test_a_candidate_whose_index_packaging_would_refuse_is_not_promoted(booted, stream,
                                                                        tmp_path, monkeypatch):
    """An approximate top-k index that misses its gate (here: no latency is within a 0 ms
    budget) turns the promotion into a reject, before anything is recorded as production."""
    store, periods = booted
    monkeypatch.setenv("SMLREC_ANN_MIN_ITEMS", "10")  # index even this small catalogue
    monkeypatch.setenv("SMLREC_ANN_BUDGET_MS", "0")
    monkeypatch.setenv("SMLREC_ANN_KINDS", "ivf_flat")
    out = run_period(stream, store, periods[6], CFG, str(tmp_path / "work"))
    assert out["gate"]["decision"] == "reject"
    assert "approximate top-k index refused" in out["gate"]["reasons"][0]
    assert store.get_pointer("production") is None
    assert store.decisions()[-1]["decision"] == "reject"


def test_a_corrupt_candidate_is_refused_and_nothing_moves(booted, stream, tmp_path):
    store, periods = booted
    blob = tmp_path / "state" / "periods" / periods[5] / "weights.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(IntegrityError, match="checksum"):
        gate(stream, store, periods[6], CFG)
    assert store.get_pointer("production") is None
    assert store.decisions() == []


def test_gate_without_bootstrap_explains_what_to_do(stream, tmp_path):
    with pytest.raises(SmlrecError, match="bootstrap"):
        gate(stream, StateStore(str(tmp_path / "empty")), list_periods(stream)[6], CFG)


def test_a_configuration_the_daily_run_cannot_follow_is_refused_before_training(stream,
                                                                                tmp_path):
    official = CFG.model_copy(update={"challengers": [
        MethodSpec(method="sml", params={"schedule": "official"})]})
    with pytest.raises(SmlrecError, match="per-period schedule"):
        bootstrap(stream, StateStore(str(tmp_path / "s")), official, list_periods(stream)[5])
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="exactly one sml"):
        DailyConfig(challengers=[MethodSpec(method="window")])


def test_the_daily_run_produces_the_backtests_models(booted, stream, tmp_path):
    """Parity: bootstrap + two daily runs make, for each challenger, the same served tables
    (bit for bit) as the backtest's strategy with the same configuration, data and seed."""
    store, periods = booted
    for p in periods[6:8]:
        run_period(stream, store, p, CFG, str(tmp_path / p))
    frame = read_periods(stream, periods[:8])
    cfg = bt.BacktestConfig(
        methods=["sml", "window"], seeds=(CFG.seed,), blends=(), progress=False,
        grids={c.method: [c.params] for c in CFG.challengers},
        split=bt.Split(pretrain=3, meta=3, val=1, test=1), sml=CFG.sml, loss=CFG.loss,
        mf_lr=CFG.mf.lr, pretrain_lr=CFG.pretrain_lr, pretrain_epochs=CFG.pretrain_epochs)
    run = bt.run_backtest(frame, cfg, log=lambda _: None)
    tensors, meta, users, _ = store.load_period(periods[7])
    for name in ("sml", "window"):
        w = run.strategies[(CFG.seed, name, 0)].weights()
        assert torch.equal(w.user, tensors[f"serve.{name}.user"]), name
        assert torch.equal(w.item, tensors[f"serve.{name}.item"]), name


def test_sml_replaying_recent_periods_matches_the_backtest_too(stream, tmp_path):
    """Parity for SML's step 1 on its last periods (what_window = 2, residual transfer): the
    learn task reads the replayed period from the data store, the backtest from its history,
    and both end with the same served tables, bit for bit."""
    cfg = CFG.model_copy(update={"challengers": [MethodSpec(method="sml", params={
        "what_window": 2, "transfer": "residual", "hidden": 16, "outer_steps": 2,
        "blend": 0.5})]})
    periods = list_periods(stream)
    store = StateStore(str(tmp_path / "state"))
    bootstrap(stream, store, cfg, periods[5])
    for p in periods[6:8]:
        run_period(stream, store, p, cfg, str(tmp_path / p))
    run = bt.run_backtest(read_periods(stream, periods[:8]), bt.BacktestConfig(
        methods=["sml"], seeds=(cfg.seed,), blends=(), progress=False,
        grids={"sml": [cfg.challengers[0].params]},
        split=bt.Split(pretrain=3, meta=3, val=1, test=1), sml=cfg.sml, loss=cfg.loss,
        mf_lr=cfg.mf.lr, pretrain_lr=cfg.pretrain_lr, pretrain_epochs=cfg.pretrain_epochs),
        log=lambda _: None)
    tensors, _, _, _ = store.load_period(periods[7])
    w = run.strategies[(cfg.seed, "sml", 0)].weights()
    assert torch.equal(w.user, tensors["serve.sml.user"])
    assert torch.equal(w.item, tensors["serve.sml.item"])
    # Without the data store the learn step cannot replay, and says so.
    with pytest.raises(SmlrecError, match="needs the data store"):
        from smlrec.daily import learn_step, meta_update_step
        frame = read_periods(stream, [periods[8]])
        meta_update_step(frame, store, periods[8], cfg, str(tmp_path / "m"))
        learn_step(frame, str(tmp_path / "m"), cfg, str(tmp_path / "l"))
