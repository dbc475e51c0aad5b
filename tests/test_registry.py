"""The state store: bundles with checksums, atomic pointers, the decision log, the lock."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from smlrec.errors import IntegrityError, SmlrecError
from smlrec.registry import StateLockedError, StateStore, check_period_id
from smlrec.vocab import Vocab


@pytest.fixture
def store(tmp_path):
    return StateStore(str(tmp_path / "state"))


def save(store, pid, value=1.0):
    store.save_period(pid, {"w.user": torch.full((2, 3), value)}, {"k": value},
                      Vocab(["u1", "u2"]), Vocab(["i1"]))


def test_bundle_round_trip_and_listing(store):
    save(store, "2024-01-01")
    save(store, "2024-01-02", 2.0)
    tensors, meta, users, items = store.load_period("2024-01-02")
    assert torch.equal(tensors["w.user"], torch.full((2, 3), 2.0))
    assert meta == {"k": 2.0, "period": "2024-01-02"}
    assert users.ids == ["u1", "u2"] and items.ids == ["i1"]
    assert store.periods() == ["2024-01-01", "2024-01-02"]


def test_bundle_without_manifest_is_incomplete_and_invisible(store, tmp_path):
    save(store, "2024-01-01")
    (tmp_path / "state/periods/2024-01-01/manifest.json").unlink()
    assert store.periods() == [] and not store.has_period("2024-01-01")
    with pytest.raises(IntegrityError, match="incomplete"):
        store.load_period("2024-01-01")
    with pytest.raises(IntegrityError, match="no complete bundle"):
        store.set_pointer("production", "2024-01-01")


def test_corrupt_weights_are_refused(store, tmp_path):
    save(store, "2024-01-01")
    blob = tmp_path / "state/periods/2024-01-01/weights.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.load_period("2024-01-01")


def test_pointers_and_decisions(store):
    assert store.get_pointer("production") is None
    save(store, "2024-01-01")
    store.set_pointer("production", "2024-01-01", reason="first")
    assert store.get_pointer("production") == "2024-01-01"
    store.append_decision({"period": "2024-01-02", "decision": "reject"})
    store.append_decision({"period": "2024-01-03", "decision": "promote"})
    assert [d["decision"] for d in store.decisions()] == ["reject", "promote"]


@pytest.mark.parametrize("bad", ["../../etc", "2024-01-01/../x", "", "2024-1-1", None])
def test_period_ids_cannot_escape_the_store(store, bad):
    with pytest.raises(SmlrecError, match="invalid period id"):
        check_period_id(bad)
    with pytest.raises(SmlrecError):
        store.period_uri(bad)


def test_second_run_is_refused_while_the_lock_is_held(store):
    first = store.lock("run 1")
    first.__enter__()
    with pytest.raises(StateLockedError, match="locked by another run"), store.lock("run 2"):
        pass
    first.__exit__(None, None, None)
    with store.lock("run 3"):  # released after the first run
        pass


def test_lock_of_a_dead_process_is_taken_over(store, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state/LOCK").write_text(json.dumps({"pid": int(dead),
                                                     "host": socket.gethostname()}))
    with store.lock("after a crash"):
        pass


def test_promotion_scores_are_those_of_the_last_promotion(store):
    assert store.promotion_scores("2024-01-01") == {}
    store.append_decision({"candidate": "2024-01-01", "decision": "reject", "scores": {"a": 1}})
    assert store.promotion_scores("2024-01-01") == {}
    store.append_decision({"candidate": "2024-01-01", "decision": "promote", "scores": {"a": 2}})
    store.append_decision({"candidate": "2024-01-01", "decision": "promote", "scores": {"a": 3}})
    assert store.promotion_scores("2024-01-01") == {"a": 3}
