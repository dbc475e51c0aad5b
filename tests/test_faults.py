"""Fault injection: the daily run is killed (SIGKILL) at every step boundary and in the
middle of every kind of write, or its writes fail as on a full or read-only disk; after
each, the stores are consistent and the next run completes.

Each case starts ``tests/fault_driver.py`` (the pipeline's steps, in order, in one process)
with one failpoint (:mod:`smlrec.faults`). The cases of one period run one after another on
the same stores, each re-running the period from the start, so every crash is recovered
from by the next run, as it would be in production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_digest

from smlrec.config import SMLConfig
from smlrec.daily import DailyConfig, bootstrap
from smlrec.data.store import list_periods
from smlrec.data.synthetic import write_synthetic
from smlrec.io import verify_bundle
from smlrec.registry import StateStore

pytest.importorskip("bentoml")
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests/fault_driver.py"

# (failpoint, what it simulates), in the order the run reaches them.
PERIOD_FAULTS = [
    ("write.before_rename@*/interactions/*", "importing the period into the data store"),
    ("step.after@validate", "step boundary: validate -> features"),
    ("write.before_rename@*/user_activity/*", "writing Feast's offline Parquet"),
    ("feast.materialize@item_popularity", "mid Feast materialization (some views loaded)"),
    ("step.after@features", "step boundary: features -> gate"),
    ("write.partial@*/decisions.jsonl", "appending the gate decision"),
    ("write.partial@*/pointers/production.json", "writing the production pointer"),
    ("package.inside@production", "mid BentoML packaging of production"),
    ("step.after@package", "step boundary: package -> meta-update"),
    ("step.after@meta_update", "step boundary: meta-update -> learn"),
    ("step.after@learn", "step boundary: learn -> transfer"),
    ("write.partial@*/state/periods/*/weights.safetensors", "writing the new model's weights"),
    ("write.before_rename@*/state/periods/*/manifest.json", "committing the new bundle"),
    ("write.before_rename@*/pointers/candidate.json", "moving the candidate pointer"),
    ("package.inside@candidate", "mid BentoML packaging of the candidate"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("faults")
    data = str(base / "data")
    write_synthetic(data, n_users=200, n_items=80, n_periods=8, interactions_per_period=900,
                    returning_share=0.8, drift=0.1, seed=5, popularity_skew=0.0)
    periods = list_periods(data)
    cfg = DailyConfig(sml=SMLConfig(outer_steps=1, theta_init="identity"),
                      pretrain_periods=3, pretrain_epochs=10, seed=0)
    bootstrap(data, StateStore(str(base / "state")), cfg, periods[4])
    return {"data": data, "state": str(base / "state"), "features": str(base / "features"),
            "bento": str(base / "bento"), "work": str(base / "work"),
            "periods": json.dumps(periods)}


def drive(world: dict[str, str], period: str, failpoints: str = "",
          input_file: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SMLREC_FAILPOINTS": failpoints, "BENTOML_DO_NOT_TRACK": "true",
           "SMLREC_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("FEAST_")}
    cmd = [sys.executable, str(DRIVER), period, "--data", world["data"], "--state",
           world["state"], "--features", world["features"], "--bento", world["bento"],
           "--work", world["work"]]
    if input_file:
        cmd += ["--input-file", input_file]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_consistent(world: dict[str, str]) -> None:
    """State store: bundles verify, pointers name complete bundles, the log parses, no lock
    held by a dead run blocks the next one. BentoML: every stored model verifies. Feast: the
    online store answers."""
    store = StateStore(world["state"])
    assert store.check() == []
    for name in ("production", "candidate"):
        period = store.get_pointer(name)
        if period is not None:
            store.load_period(period)
    models = Path(world["bento"]) / "models"
    for bundle in models.glob("*/*/bundle"):
        verify_bundle(str(bundle))
    if Path(world["features"], "registry.db").exists():
        code = ("import sys; from components.feast_store import FeatureStoreAdapter as A; "
                "print(A(sys.argv[1], sys.argv[2], env={}).popular_items(3))")
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "feature_repo"),
                              world["features"]], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]


def _bento_periods(world: dict[str, str], name: str) -> list[str]:
    import yaml

    out = []
    for info in (Path(world["bento"]) / "models" / name).glob("*/model.yaml"):
        out.append(yaml.safe_load(info.read_text())["labels"]["period"])
    return sorted(out)


def test_kills_at_every_step_boundary_and_mid_write_are_survived(world, reliability) -> None:
    periods = json.loads(world["periods"])
    period = periods[5]
    raw = Path(world["work"]).parent / "period.parquet"  # the period arrives as a raw file
    from smlrec.data.store import read_period

    read_period(world["data"], period).drop(columns=["period"], errors="ignore").to_parquet(raw)
    survived = []
    for point, what in PERIOD_FAULTS:
        r = drive(world, period, point, input_file=str(raw))
        reliability.add("faults_injected")
        assert r.returncode == -signal.SIGKILL, (point, what, r.returncode, r.stderr[-3000:])
        assert_consistent(world)
        survived.append(point)
        reliability.add("faults_survived")
    store = StateStore(world["state"])
    assert store.get_pointer("candidate") == period  # the last crashes came after transfer
    r = drive(world, period)  # the same period again: already done, skipped
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["skipped"]
    decisions = [d for d in store.decisions() if d["period"] == period]
    assert len(decisions) == 1, decisions  # re-runs of one gate never log it twice
    assert decisions[0]["decision"] == "promote" and store.get_pointer("production") == periods[4]
    assert _bento_periods(world, "smlrec-mf") == [periods[4]]
    r = drive(world, periods[6])  # the next period completes
    assert r.returncode == 0, r.stderr[-3000:]
    assert store.get_pointer("candidate") == periods[6]
    assert_consistent(world)
    assert periods[6] in _bento_periods(world, "smlrec-mf-candidate")
    assert len(survived) == len(PERIOD_FAULTS)


@pytest.mark.parametrize(("failpoint", "message"), [
    ("write.open@*/decisions.jsonl=enospc", "No space left on device"),
    ("write.open@*/state/*=erofs", "Read-only file system"),
])
def test_full_or_read_only_state_store_fails_clearly_and_changes_nothing(
        world, tmp_path, failpoint, message, reliability) -> None:
    import shutil

    mine = {**world, "state": str(tmp_path / "state"), "features": str(tmp_path / "f"),
            "bento": str(tmp_path / "b"), "work": str(tmp_path / "w")}
    shutil.copytree(world["state"], mine["state"])
    before = tree_digest(mine["state"])
    periods = json.loads(world["periods"])
    r = drive(mine, periods[7], failpoint)
    reliability.add("faults_injected")
    assert r.returncode == 1
    assert "StorageError" in r.stderr and message in r.stderr, r.stderr[-2000:]
    assert "could not be written" in r.stderr and "unchanged" in r.stderr
    assert tree_digest(mine["state"]) == before
    assert StateStore(mine["state"]).check() == []
    reliability.add("faults_survived")
