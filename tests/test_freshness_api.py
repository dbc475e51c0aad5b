"""POST /feedback on a real ``bentoml serve``: durable events, per-event user updates through
Feast's push source, refused bad events, and SIGKILL in the middle of a stream.

The services run on models packaged from a temporary state store, with a real Feast store
(SQLite online store) on disk shared by two service processes, as two workers or two
replicas would share a cluster's online store.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.serving import Server as BentoServer
from smlrec.feedback import count_events, read_log
from smlrec.registry import StateStore
from smlrec.schema import ITEM, PERIOD, TS, USER
from smlrec.vocab import Vocab

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS, DIM = 40, 200, 8
USERS = [f"u{i}" for i in range(N_USERS)]
ITEMS = [f"i{i}" for i in range(N_ITEMS)]
P1, P2 = "2024-01-01", "2024-01-08"
NOW = time.time()


class Service:
    """A ``bentoml serve`` process over the shared state, Feast store and feedback log."""

    def __init__(self, tmp: Path, name: str, log_dir: Path):
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FEAST_", "SMLREC_FAILPOINTS"))}
        self.env.update(BENTOML_HOME=str(tmp / "bento"), BENTOML_DO_NOT_TRACK="true",
                        SMLREC_CANARY_SHARE="0", SMLREC_RELOAD_SECONDS="0",
                        SMLREC_FEATURE_REPO=str(ROOT / "feature_repo"),
                        SMLREC_FEATURE_DATA=str(tmp / "features"), SMLREC_THREADS="1",
                        SMLREC_DEVICE="cpu", SMLREC_FEEDBACK_LOG=str(log_dir),
                        SMLREC_PERIOD_SPEC="1D", PYTHONPATH=str(ROOT))
        self.bento = BentoServer(tmp / "bento", workers=1, log_path=tmp / f"{name}.log",
                                 env=self.env)
        self.url = self.bento.url
        self.log_dir = log_dir

    def post(self, route: str, body: object, raw: bool = False) -> httpx.Response:
        content = body if raw else json.dumps(body)
        return httpx.post(f"{self.url}{route}", content=content, timeout=30,
                          headers={"content-type": "application/json"})

    def kill(self) -> list[int]:
        """SIGKILL to every process of the server (the workers run in sessions of their own,
        so the process group is not enough): no shutdown code runs. Returns the pids."""
        import psutil

        assert self.bento.proc is not None
        procs = psutil.Process(self.bento.proc.pid).children(recursive=True)
        procs.append(psutil.Process(self.bento.proc.pid))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        self.bento.proc.wait()
        assert not any(p.is_running() for p in procs)
        return [p.pid for p in procs]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state store with a production model packaged, and a Feast store with P1."""
    import subprocess
    import sys

    from adapters.feast_store import FeatureStoreAdapter

    tmp = tmp_path_factory.mktemp("fresh")
    g = torch.Generator().manual_seed(5)
    state = StateStore(str(tmp / "state"))
    state.save_period(P1, {"w.user": torch.randn(N_USERS, DIM, generator=g),
                           "w.item": torch.randn(N_ITEMS, DIM, generator=g)}, {},
                      Vocab(USERS), Vocab(ITEMS))
    state.set_pointer("production", P1)
    rows = [(USERS[u], ITEMS[(u * 7 + j) % N_ITEMS],
             pd.Timestamp(P1, tz="UTC") + pd.Timedelta(hours=u, minutes=j))
            for u in range(N_USERS) for j in range(3)]
    df = pd.DataFrame(rows, columns=[USER, ITEM, TS])
    df[PERIOD] = P1
    feast = FeatureStoreAdapter(ROOT / "feature_repo", tmp / "features", env={})
    feast.write_period(P1, df, pd.Timestamp(P2, tz="UTC"))
    feast.apply()
    feast.materialize(pd.Timestamp(P2, tz="UTC"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEAST_")}
    env.update(BENTOML_HOME=str(tmp / "bento"), BENTOML_DO_NOT_TRACK="true",
               PYTHONPATH=str(ROOT))
    code = ("import sys; from components.packaging import package; "
            "print(package(sys.argv[1], 'production'))")
    subprocess.run([sys.executable, "-c", code, state.uri], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    return tmp


@pytest.fixture(scope="module")
def service(shared: Path) -> Iterator[Service]:
    srv = Service(shared, "a", shared / "log")
    srv.bento.start(timeout=90)
    try:
        yield srv
    finally:
        srv.bento.stop()


def _recommend(srv: Service, user: str, **extra: object) -> dict:
    r = srv.post("/recommend", {"user_id": user, "k": 10, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _until(fn, timeout: float = 10.0) -> tuple[object, float]:
    """Call ``fn`` until it returns something truthy or ``timeout`` s pass; (that, seconds
    waited). A generous bound: how fast it happens is measured by benchmarks/feedback.py,
    not asserted here."""
    start = time.perf_counter()
    while True:
        out = fn()
        if out or time.perf_counter() - start > timeout:
            return out, time.perf_counter() - start
        time.sleep(0.02)


def test_an_event_is_logged_and_moves_the_user(service: Service) -> None:
    before = _recommend(service, "u3", exclude_seen=False)
    assert before["path"] == "user"
    item = before["items"][5]
    score = service.post("/score", {"user_id": "u3", "item_ids": [item]}).json()["scores"][0]
    r = service.post("/feedback", {"user_id": "u3", "item_id": item, "timestamp": NOW})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["user_updates"] == 1
    assert r.json()["periods"] == [pd.Timestamp(NOW, unit="s").strftime("%Y-%m-%d")]
    logged = read_log(service.log_dir)
    assert ((logged["user_id"] == "u3") & (logged["item_id"] == item)).sum() == 1
    after, _ = _until(lambda: (lambda a: a if a["path"] == "fresh" else None)(
        _recommend(service, "u3")))
    assert after, "the event never reached /recommend"
    assert item not in after["items"]  # seen now: excluded by default
    moved = service.post("/score", {"user_id": "u3", "item_ids": [item]}).json()
    assert moved["path"] == "fresh" and moved["scores"][0] > score


def test_a_new_user_is_served_from_their_events(service: Service) -> None:
    assert _recommend(service, "newcomer")["path"] == "popular"
    body = {"events": [{"user_id": "newcomer", "item_id": ITEMS[i], "timestamp": NOW + i}
                       for i in (10, 11, 12)]}
    assert service.post("/feedback", body).json()["accepted"] == 3
    after, _ = _until(lambda: (lambda a: a if a["path"] == "fresh" else None)(
        _recommend(service, "newcomer")))
    assert after and not {ITEMS[10], ITEMS[11], ITEMS[12]} & set(after["items"])
    meta = service.post("/metadata", {}).json()["feedback"]
    assert meta["user_updates"]["events_applied"] >= 4 and meta["log"]["events_written"] >= 4


@pytest.mark.parametrize("body, field", [
    ({}, ""),
    ({"user_id": "u1"}, ""),
    ({"user_id": 1, "item_id": "i1"}, "user_id"),
    ({"user_id": "u1\n", "item_id": "i1"}, "user_id"),
    ({"user_id": " u1", "item_id": "i1"}, "user_id"),
    ({"user_id": "u1", "item_id": "x" * 300}, "item_id"),
    ({"user_id": "u1", "item_id": "i1", "timestamp": "yesterday"}, "timestamp"),
    ({"user_id": "u1", "item_id": "i1", "timestamp": -1}, "timestamp"),
    ({"user_id": "u1", "item_id": "i1", "timestamp": NOW + 86_400}, "event.timestamp"),
    ({"user_id": "u1", "item_id": "i1", "rating": 99}, "event.rating"),
    ({"user_id": "u1", "item_id": "i1", "rating": "5"}, "rating"),
    ({"user_id": "u1", "item_id": "i1", "extra": 1}, "extra"),
    ({"events": []}, "events"),
    ({"events": [{"user_id": "u1", "item_id": "i1"}] * 1001}, "events"),
    ({"events": [{"user_id": "u1", "item_id": "i1"}], "user_id": "u1"}, ""),
    ({"events": [{"user_id": "u1", "item_id": "i1"},
                 {"user_id": "u2", "item_id": "i2", "timestamp": NOW + 86_400}]},
     "events[1].timestamp"),
    ("not json", ""),
    ('{"user_id": "u1", "item_id": "i1", "rating": NaN}', ""),
])
def test_malformed_or_hostile_events_get_a_4xx_and_are_not_written(
        service: Service, body: object, field: str) -> None:
    before = count_events(service.log_dir) if service.log_dir.exists() else 0
    r = service.post("/feedback", body, raw=isinstance(body, str))
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    payload = r.json()
    assert payload["error"]
    if field:
        assert payload.get("field", "").startswith(field), payload
    after = count_events(service.log_dir) if service.log_dir.exists() else 0
    assert after == before


def test_a_pushed_embedding_is_read_by_a_second_service_process(shared: Path,
                                                                service: Service) -> None:
    other = Service(shared, "b", shared / "log-b")
    other.bento.start(timeout=90)
    try:
        assert _recommend(other, "u9")["path"] == "user"
        r = service.post("/feedback", {"user_id": "u9", "item_id": ITEMS[42], "timestamp": NOW})
        assert r.status_code == 200
        seen, _ = _until(lambda: (lambda a: a if a["path"] == "fresh" else None)(
            _recommend(other, "u9")))
        assert seen, "the second process never read the pushed state"
        mine, _ = _until(lambda: (lambda a: a if a["path"] == "fresh" else None)(
            _recommend(service, "u9")))
        assert seen["items"] == mine["items"] and ITEMS[42] not in seen["items"]
    finally:
        other.bento.stop()


def test_sigkill_during_a_feedback_stream_loses_no_acknowledged_event(shared: Path) -> None:
    srv = Service(shared, "killed", shared / "log-killed")
    srv.bento.start(timeout=90)
    acked: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def stream(worker: int) -> None:
        n = 0
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            while not stop.is_set():
                events = [{"user_id": f"k{worker}", "item_id": ITEMS[(n + j) % N_ITEMS],
                           "timestamp": NOW - 3600 + n + j / 10} for j in range(5)]
                n += 1
                try:
                    r = client.post("/feedback", json={"events": events})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acked.extend((e["user_id"], e["item_id"], e["timestamp"])
                                     for e in events)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    _until(lambda: len(acked) >= 500, timeout=30)
    assert len(srv.kill()) >= 2  # the server and its worker
    with lock:
        at_kill = len(acked)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 500, f"only {len(acked)} events acknowledged before the kill"
    assert len(acked) - at_kill <= 4 * 5  # nothing answered after the kill (in flight only)
    logged = read_log(srv.log_dir)
    times = pd.to_datetime(logged["timestamp"], utc=True).astype("int64") / 1e9
    have = {(u, i, round(t, 3)) for u, i, t in zip(logged["user_id"], logged["item_id"], times,
                                                    strict=True)}
    lost = [e for e in acked if (e[0], e[1], round(e[2], 3)) not in have]
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:3]}"
