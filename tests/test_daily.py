"""The daily run's core: bootstrap, gate and promotion, the chain, idempotency, integrity."""

from __future__ import annotations

import shutil

import pytest

from smlrec.config import SMLConfig
from smlrec.daily import DailyConfig, bootstrap, chain_base, gate, is_done, run_period
from smlrec.data.store import list_periods
from smlrec.data.synthetic import write_synthetic
from smlrec.errors import IntegrityError, SmlrecError
from smlrec.registry import StateStore

CFG = DailyConfig(sml=SMLConfig(outer_steps=3, theta_init="identity"), pretrain_periods=3,
                  pretrain_epochs=10)


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


def test_bootstrap_leaves_a_candidate_and_no_production(booted):
    store, periods = booted
    assert store.get_pointer("candidate") == periods[5]
    assert store.get_pointer("production") is None
    assert store.periods() == [periods[5]]


def test_a_good_first_candidate_is_promoted_and_the_chain_moves_on(booted, stream, tmp_path):
    store, periods = booted
    out = run_period(stream, store, periods[6], CFG, str(tmp_path / "work"))
    assert out["gate"]["decision"] == "promote", out["gate"]["reasons"]
    assert store.get_pointer("production") == periods[5]
    assert store.get_pointer("candidate") == periods[6]
    assert is_done(store, periods[6]) and not is_done(store, periods[7])
    decisions = store.decisions()
    assert [d["period"] for d in decisions] == [periods[6]]
    assert set(decisions[0]["scores"]) == {"candidate", "popularity"}


def test_a_worse_candidate_is_rejected_and_the_incumbent_kept(booted, stream, tmp_path):
    store, periods = booted
    run_period(stream, store, periods[6], CFG, str(tmp_path / "w1"))  # promotes periods[5]
    # Make the new candidate useless: zero its weights (checksums rewritten consistently).
    tensors, meta, users, items = store.load_period(periods[6])
    for k in ("w.user", "w.item"):
        tensors[k] = tensors[k] * 0
    store.save_period(periods[6], tensors, meta, users, items)
    result = gate(stream, store, periods[7], CFG)
    assert not result.accept and result.decision == "reject"
    assert store.get_pointer("production") == periods[5]  # incumbent kept
    assert chain_base(store) == periods[5]  # the next model builds on the incumbent


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
