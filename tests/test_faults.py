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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import tree_digest

from smlrec.config import MethodSpec, SMLConfig
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
    ("step.after@learn", "step boundary: learn -> challengers"),
    ("step.after@challengers", "step boundary: challengers -> transfer"),
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
    # 25 epochs: W_0 clearly beats popularity at the first gate (NDCG@20 0.167 against 0.132),
    # so the chain below promotes, and the production failpoints are reached.
    cfg = DailyConfig(sml=SMLConfig(outer_steps=1, theta_init="identity"),
                      pretrain_periods=3, pretrain_epochs=25, seed=0,
                      challengers=[MethodSpec(method="sml"),
                                   MethodSpec(method="window", params={"window": 2,
                                                                       "epochs": 2})])
    bootstrap(data, StateStore(str(base / "state")), cfg, periods[4])
    return {"data": data, "state": str(base / "state"), "features": str(base / "features"),
            "bento": str(base / "bento"), "work": str(base / "work"),
            "periods": json.dumps(periods)}


def _env(world: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "SMLREC_THREADS": "1",
           "BENTOML_HOME": world["bento"]}
    return {k: v for k, v in env.items() if not k.startswith(("FEAST_", "SMLREC_FAILPOINTS"))}


def _argv(world: dict[str, str], period: str, input_file: str = "") -> list[str]:
    argv = [period, "--data", world["data"], "--state", world["state"], "--features",
            world["features"], "--bento", world["bento"], "--work", world["work"]]
    return [*argv, "--input-file", input_file] if input_file else argv


class Zygote:
    """The driver's ``--zygote`` mode: runs forked from one warm process (each run still
    dies alone), so that sixteen crashes do not pay sixteen times for importing Feast."""

    def __init__(self, world: dict[str, str], logs: Path):
        self.world, self.logs, self.n = world, logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--zygote"], cwd=ROOT,
                                     env=_env(world), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, period: str, failpoints: str = "", input_file: str = "",
            world: dict[str, str] | None = None) -> tuple[int, str]:
        """One run (of ``world``, default the zygote's); returns its exit code and log."""
        self.n += 1
        log = self.logs / f"run-{self.n}.log"
        request = {"argv": _argv(world or self.world, period, input_file),
                   "failpoints": failpoints, "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["returncode"]
        return code, log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


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
        from adapters.feast_store import FeatureStoreAdapter

        feast = FeatureStoreAdapter(ROOT / "feature_repo", world["features"], env={})
        assert isinstance(feast.popular_items(3), list)  # the online store answers


def _bento_periods(world: dict[str, str], name: str) -> list[str]:
    import yaml

    out = []
    for info in (Path(world["bento"]) / "models" / name).glob("*/model.yaml"):
        out.append(yaml.safe_load(info.read_text())["labels"]["period"])
    return sorted(out)


@pytest.fixture(scope="module")
def zygote(world: dict[str, str]) -> Iterator[Zygote]:
    z = Zygote(world, Path(world["work"]).parent / "logs")
    try:
        yield z
    finally:
        z.close()


def test_kills_at_every_step_boundary_and_mid_write_are_survived(world, zygote,
                                                                 reliability) -> None:
    periods = json.loads(world["periods"])
    period = periods[5]
    raw = Path(world["work"]).parent / "period.parquet"  # the period arrives as a raw file
    from smlrec.data.store import read_period

    read_period(world["data"], period).drop(columns=["period"], errors="ignore").to_parquet(raw)
    survived = []
    for point, what in PERIOD_FAULTS:
        code, log = zygote.run(period, point, input_file=str(raw))
        reliability.add("faults_injected")
        assert code == -signal.SIGKILL, (point, what, code, log[-3000:])
        assert_consistent(world)
        survived.append(point)
        reliability.add("faults_survived")
    store = StateStore(world["state"])
    assert store.get_pointer("candidate") == period  # the last crashes came after transfer
    code, log = zygote.run(period)  # the same period again: already done, skipped
    assert code == 0 and json.loads(log.splitlines()[-1])["skipped"], log[-2000:]
    decisions = [d for d in store.decisions() if d["period"] == period]
    assert len(decisions) == 1, decisions  # re-runs of one gate never log it twice
    assert decisions[0]["decision"] == "promote"
    assert store.get_pointer("production") == periods[4]
    assert _bento_periods(world, "smlrec-mf") == [periods[4]]
    code, log = zygote.run(periods[6])  # the next period completes
    assert code == 0, log[-3000:]
    assert store.get_pointer("candidate") == periods[6]
    assert_consistent(world)
    assert periods[6] in _bento_periods(world, "smlrec-mf-candidate")
    assert len(survived) == len(PERIOD_FAULTS)


@pytest.mark.parametrize(("failpoint", "message"), [
    ("write.open@*/decisions.jsonl=enospc", "No space left on device"),
    ("write.open@*/state/*=erofs", "Read-only file system"),
])
def test_full_or_read_only_state_store_fails_clearly_and_changes_nothing(
        world, zygote, tmp_path, failpoint, message, reliability) -> None:
    import shutil

    mine = {**world, "state": str(tmp_path / "state"), "features": str(tmp_path / "f"),
            "bento": str(tmp_path / "b"), "work": str(tmp_path / "w")}
    shutil.copytree(world["state"], mine["state"])
    before = tree_digest(mine["state"])
    periods = json.loads(world["periods"])
    code, log = zygote.run(periods[7], failpoint, world=mine)
    reliability.add("faults_injected")
    assert code == 1
    assert "StorageError" in log and message in log, log[-2000:]
    assert "could not be written" in log and "unchanged" in log
    assert tree_digest(mine["state"]) == before
    assert StateStore(mine["state"]).check() == []
    reliability.add("faults_survived")


# --- a catalog of bad period files -----------------------------------------------------------

def _raw(world: dict[str, str], period: str) -> pd.DataFrame:
    """A stored period as the raw frame a producer would send (no period column)."""
    from smlrec.data.store import read_period

    return read_period(world["data"], period).drop(columns=["period"])


def _shift_into(frame: pd.DataFrame, period: str) -> pd.DataFrame:
    """``frame``'s rows moved to ``period``'s day, same time of day."""
    day = pd.Timestamp(period, tz="UTC")
    return frame.assign(timestamp=day + (frame["timestamp"] - frame["timestamp"].dt.floor("D")))


def _set_cell(col: str, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({col: object})
        df.loc[3, col] = value
        return df
    return mutate


def _times_100(df: pd.DataFrame) -> pd.DataFrame:
    parts = [df.assign(timestamp=df["timestamp"] + pd.Timedelta(microseconds=k))
             for k in range(100)]
    return pd.concat(parts, ignore_index=True)


# kind, how to make the file (frame mutation, or bytes), the words the stop message must hold
BAD_PERIODS: list[tuple[str, Any, str]] = [
    ("empty file", b"", "empty file"),
    ("header only, no rows", b"user_id,item_id,timestamp\n", "0 rows"),
    ("missing column", lambda df: df.drop(columns=["item_id"]), "item_id: missing column"),
    ("renamed column", lambda df: df.rename(columns={"user_id": "uid"}),
     "user_id: missing column"),
    ("wrong type: timestamps as words", _set_cell("timestamp", "yesterday"),
     "unparseable timestamp"),
    ("wrong type: ratings as words", lambda df: df.assign(rating=3.0).pipe(
        _set_cell("rating", "five")), "non-numeric rating"),
    ("null ids", _set_cell("user_id", None), "user_id: 1 null value"),
    ("negative ids", _set_cell("item_id", "-7"), "item_id: 1 invalid id"),
    ("float ids", _set_cell("user_id", "2.5"), "user_id: 1 invalid id"),
    ("control characters in ids", _set_cell("item_id", "i\x071"), "item_id: 1 invalid id"),
    ("timestamps outside the period", _set_cell("timestamp", pd.Timestamp("2023-06-01", tz="UTC")),
     "outside period"),
    ("duplicated rows", lambda df: pd.concat([df, df.iloc[:5]], ignore_index=True),
     "10 duplicate rows"),
    ("a period that repeats another", "repeat", "exactly those of stored period"),
    ("ratings out of range", lambda df: df.assign(rating=3.0).pipe(_set_cell("rating", 11.0)),
     "rating outside [0, 5]"),
    ("non-UTF-8 bytes", b"user_id,item_id,timestamp\nu1,\xff\xfe,2024-01-08T01:00:00Z\n",
     "non-UTF-8"),
    ("truncated Parquet", "truncated", "not valid Parquet"),
    ("not a table at all", b"\x00\x01\x02 junk", "not valid Parquet"),
    ("ragged CSV", b"user_id,item_id,timestamp\nu1,i1,2024-01-08T01:00:00Z,extra,more\n",
     "not valid CSV"),
    ("a file 100x the usual size", _times_100, "100x the median"),
    ("timestamps in the future", "future", "in the future"),
]


def _tomorrow() -> str:
    return (pd.Timestamp.now(tz="UTC").normalize() + pd.Timedelta(days=1)).strftime("%Y-%m-%d")


def _bad_file(world: dict[str, str], tmp: Path, period: str, kind: str, make: Any) -> str:
    frame = _raw(world, period)
    suffix = ".parquet" if kind in ("truncated Parquet", "not a table at all") else ".csv"
    path = tmp / f"{kind.replace(' ', '_').replace(':', '')}{suffix}"
    if isinstance(make, bytes):
        path.write_bytes(make)
    elif make == "truncated":
        frame.to_parquet(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif make == "future":  # a period not over yet: its id is tomorrow's date
        _shift_into(frame, _tomorrow()).to_csv(path, index=False)
    elif make == "repeat":
        periods = json.loads(world["periods"])
        previous = _raw(world, periods[periods.index(period) - 1])
        _shift_into(previous, period).to_csv(path, index=False)
    else:
        make(frame).to_csv(path, index=False)
    return str(path)


def _validate_step(world: dict[str, str], period: str, path: str, work: Path) -> None:
    """The pipeline's validate task, in-process: the function KFP runs for it."""
    from kfp import dsl

    from components import ops

    work.mkdir(parents=True, exist_ok=True)
    ops.validate_op.python_func(period=period, data_uri=world["data"], input_file=path,
                                period_spec="1D", min_rows=1, max_rows=5_000_000,
                                report=dsl.Markdown(name="r", uri=str(work / "report.md")))


def test_bad_period_files_stop_before_training_and_change_nothing(world, tmp_path,
                                                                  reliability) -> None:
    periods = json.loads(world["periods"])
    period = periods[7]
    stores = {k: tree_digest(world[k]) for k in ("data", "state", "bento")}
    assert len(BAD_PERIODS) >= 15
    for kind, make, words in BAD_PERIODS:
        path = _bad_file(world, tmp_path, period, kind, make)
        reliability.add("bad_inputs_tried")
        target = _tomorrow() if make == "future" else period
        with pytest.raises(RuntimeError, match="data validation failed") as err:
            _validate_step(world, target, path, tmp_path / "work")
        assert words in str(err.value), (kind, str(err.value))
        for name, digest in stores.items():
            assert tree_digest(world[name]) == digest, (kind, name)
        reliability.add("bad_inputs_stopped")


@pytest.mark.parametrize("kind", ["an unknown extra column", "mixed time zones"])
def test_files_that_are_right_to_accept(world, tmp_path, kind) -> None:
    """An extra column is ignored (noted in the report) and time zones are converted to UTC:
    both are valid periods, imported as the canonical columns."""
    import shutil

    periods = json.loads(world["periods"])
    period = periods[7]
    mine = {**world, "data": str(tmp_path / "data")}
    shutil.copytree(world["data"], mine["data"])
    frame = _raw(world, period)
    if kind == "an unknown extra column":
        frame = frame.assign(device="mobile")
    else:
        ts = frame["timestamp"]
        frame = frame.assign(timestamp=[
            (t.tz_convert("America/New_York") if i % 2 else t.tz_convert("Asia/Tokyo")).isoformat()
            for i, t in enumerate(ts)])
    path = tmp_path / "period.csv"
    frame.to_csv(path, index=False)
    _validate_step(mine, period, str(path), tmp_path / "work")
    notes = (tmp_path / "work/report.md").read_text()
    assert "PASSED" in notes
    if kind == "an unknown extra column":
        assert "device" in notes
    from smlrec.data.store import read_period

    stored = read_period(mine["data"], period)
    assert list(stored.columns[:3]) == ["user_id", "item_id", "timestamp"]
    assert len(stored) == len(frame) and "device" not in stored.columns


def test_bad_data_through_the_real_pipeline_keeps_the_api_on_the_incumbent(
        world, tmp_path, reliability) -> None:
    """Three kinds through KFP's local runner while a real `bentoml serve` answers requests:
    the run stops at validation naming the problem, every request is served by the
    incumbent, and the stores are byte-for-byte unchanged."""
    import threading

    import httpx
    from test_serving import Server

    from pipelines.local import run_daily
    from smlrec.errors import SmlrecError

    periods = json.loads(world["periods"])
    period = periods[7]
    store = StateStore(world["state"])
    if store.get_pointer("production") is None:  # run alone: accept the candidate by hand
        store.set_pointer("production", store.get_pointer("candidate"))
    code = "import sys; from components.packaging import package; package(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, world["state"]], cwd=ROOT, check=True,
                   env={**os.environ, "BENTOML_HOME": world["bento"]})
    srv = Server(tmp_path)
    srv.env.update(BENTOML_HOME=world["bento"], SMLREC_FEATURE_DATA=world["features"],
                   SMLREC_CANARY_SHARE="0")
    srv.start()
    stores = {k: tree_digest(world[k]) for k in ("data", "state")}
    stores["bento"] = tree_digest(Path(world["bento"]) / "models")  # not the server's metrics
    versions: set[str] = set()
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            while not stop.is_set():
                r = http.post("/recommend", json={"user_id": "u1", "k": 5})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    versions.add(r.json()["model"]["version"])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        incumbent = httpx.post(f"{srv.url}/metadata", json={}).json()["production"]
        assert incumbent["period"] == store.get_pointer("production")
        for kind, make, words in [BAD_PERIODS[2], BAD_PERIODS[11], BAD_PERIODS[15]]:
            path = _bad_file(world, tmp_path, period, kind, make)
            reliability.add("bad_inputs_tried")
            with pytest.raises(SmlrecError, match="validate-op") as err:
                run_daily(period, world["data"], world["state"], str(tmp_path / "kfp"),
                          input_file=path, bentoml_home=world["bento"],
                          feature_data=world["features"])
            assert words in str(err.value), (kind, str(err.value))
            assert tree_digest(world["data"]) == stores["data"], kind
            assert tree_digest(world["state"]) == stores["state"], kind
            assert tree_digest(Path(world["bento"]) / "models") == stores["bento"], kind
            reliability.add("bad_inputs_stopped")
    finally:
        stop.set()
        thread.join(30)
        srv.stop()
    assert not errors and versions == {incumbent["version"]}


def test_two_runs_on_one_state_store_one_wins_nothing_lost(world, tmp_path) -> None:
    """Two runs of the same period start together: the lock lets one through, the other stops
    with a clear error at once; one decision is logged and the state is consistent."""
    import shutil

    mine = {**world, "state": str(tmp_path / "state"), "features": str(tmp_path / "f"),
            "bento": str(tmp_path / "b"), "data": str(tmp_path / "data")}
    shutil.copytree(world["state"], mine["state"])
    shutil.copytree(world["data"], mine["data"])
    period = json.loads(world["periods"])[7]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env = {k: v for k, v in env.items() if not k.startswith(("FEAST_", "SMLREC_FAILPOINTS"))}
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(DRIVER), period, "--data", mine["data"], "--state",
               mine["state"], "--features", mine["features"], "--bento", mine["bento"],
               "--work", str(tmp_path / f"w{i}")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [(p.wait(600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], [(c, e[-1500:]) for c, _, e in results]
    loser = next(err for code, _, err in results if code == 1)
    assert "StateLockedError" in loser and "is locked by another run" in loser
    store = StateStore(mine["state"])
    assert [d["period"] for d in store.decisions()].count(period) == 1
    assert store.get_pointer("candidate") == period and store.check() == []
