"""Serving benchmark: the in-process top-k ceiling against the HTTP service, in one run.

For each catalogue size (default 1,700 / 100,000 / 1,000,000 items; d = 64; 10,000 users)
a model of synthetic float32 embeddings is built: by default *clustered* (users and items
scattered around 1,024 shared centres, each N(0, 1/d), with N(0, 1/d) noise: grouped as
trained embeddings are), or ``--embeddings random`` (plain N(0, 1/d)). The cost of exact
top-k is the same for any values; an approximate index's is not: isotropic random vectors are
its worst case (at 1,000,000 items an IVF index reached recall@10 0.91 only when probing a
quarter of its lists, slower than exact search), where the packaging gate refuses the index.

1. In-process ceiling: ``ServedModel.topk`` (the code the service runs) on batches of 1, 8
   and 32 user vectors, k = 10, each for a fixed time (``--inproc-duration``, 3 s), on the
   device and with the torch threads the service picks (``smlrec.device.pick_device``,
   ``configure_threads``: ``SMLREC_DEVICE``, ``SMLREC_THREADS``, default 1 thread).
2. HTTP: the model is saved in a temporary state store (``StateStore.save_period``, the
   production pointer), packaged into a temporary ``BENTOML_HOME``
   (``components.packaging.package``) and served by a real ``bentoml serve
   serving.service:Recommender`` on 127.0.0.1 (canary off, no polling, no Feast,
   ``SMLREC_WORKERS`` from ``--workers``). A load generator in a separate process (asyncio
   on uvloop, aiohttp; ``--client httpx`` for httpx.AsyncClient, which at concurrency 32
   saturates before the service does: encode/httpx#3215) runs N closed loops of
   ``POST /recommend {"user_id": <known user>, "k": 10, "exclude_seen": false}`` over
   keep-alive connections, for N = 1, 8, 32: ``--warmup`` s, then
   ``--duration`` s measured. Reported: requests/s, latency p50/p99, errors (any non-200
   or transport error), the service's mean micro-batch (deltas of ``/metadata`` batching
   counters; one worker only) and the CPU used by the server's processes and by the load
   generator over the measured window (100 % = one core).
   Then bodies of many known users (``--batch-users``, 100 and 1,000 per body, at
   ``--batch-concurrency`` 4): users ranked per second.
3. The cold path (``--no-cold`` skips it, ``--cold-only`` runs only it): users the model
   does not know, each with 3 recent items, answered by MeLU adapted per request (path
   ``melu``), at concurrency 1 and 8, on MovieLens-100k's items and side features.
4. Approximate top-k (``--methods exact,ann``, both by default): where a size reaches the
   index threshold (``SMLREC_ANN_MIN_ITEMS``, 50,000), packaging builds and gates a FAISS
   index (``smlrec.ann``) and ships it in the model. Its report (kind, parameters,
   recall@10/@100 on sampled users, latency, build time), the in-process ceiling with the
   index (the packaged model loaded back) and HTTP rows from a server answering through it
   are written in each size's ``ann`` section; the exact HTTP rows come from a server with
   ``SMLREC_ANN=off``. Rows carry ``method: exact|ann``. An index the gate refuses is
   recorded as refused, and the size is packaged again without one for the exact rows.
5. Targets: HTTP requests/s at concurrency 32 at least 0.5x the in-process queries/s at
   batch 32, and p99 under 50 ms at 100,000 items (exact search); with the index, at
   100,000 items HTTP at concurrency 32 at least 0.5x the index's in-process ceiling at
   batch 32 with p99 at most 50 ms, and at 1,000,000 items at least 500 requests/s with
   recall@10 at least 0.95. The verdicts are written as measured.

The load generator runs on the same machine: what it uses (the "client CPU" column) is
taken from the server on a small machine. Results: ``serving.md`` and ``serving.json`` under
``--out`` (default ``benchmarks/results``), with the machine, its load average at the start,
and the date. Reproduce:

    python -m benchmarks.serving                                  # full run, ~4 min
    python -m benchmarks.serving --sizes 1700 --duration 2 --out /tmp/x    # smoke run
    python -m benchmarks.serving --workers 2                      # SMLREC_WORKERS=2
    python -m benchmarks.serving --sizes 100000 --methods ann --duration 2 --no-cold \
        --out /tmp/x                                              # the index only, smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.backtest import RESULTS, hardware, produced_by
from serving.model import ModelInfo, ServedModel
from smlrec import ann
from smlrec.device import configure_threads, pick_device
from smlrec.registry import StateStore
from smlrec.vocab import Vocab

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parent.parent
PERIOD = "2026-01-01"
RATIO_TARGET = 0.5  # HTTP req/s over in-process q/s, at the same concurrency / batch size
P99_TARGET_MS = 50.0
P99_TARGET_ITEMS = 100_000
ANN_RATE_TARGET = 500.0  # HTTP req/s with the index at ANN_RATE_ITEMS items
ANN_RATE_ITEMS = 1_000_000
ANN_RECALL_TARGET = 0.95  # recall@10 of the index (its packaging report)
METHODS = ("exact", "ann")
CLUSTERS = 1024
READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 30.0
PACKAGE = ("import sys\n"
           "from components.packaging import package\n"
           "print(package(sys.argv[1], 'production'))\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _pcts(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values_ms, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


# ---------------------------------------------------------------------- the model


def make_model(n_users: int, n_items: int, dim: int, seed: int, embeddings: str = "random"
               ) -> tuple[torch.Tensor, torch.Tensor, Vocab, Vocab]:
    """Float32 embeddings and ids ``u0..``, ``i0..``: ``random`` N(0, 1/d), or ``clustered``
    (each row a random one of ``CLUSTERS`` N(0, 1/d) centres plus N(0, 1/d) noise)."""
    gen = torch.Generator().manual_seed(seed)
    scale = dim ** -0.5
    user = torch.randn(n_users, dim, generator=gen) * scale
    item = torch.randn(n_items, dim, generator=gen) * scale
    if embeddings == "clustered":
        centres = torch.randn(CLUSTERS, dim, generator=gen) * scale
        user += centres[torch.randint(0, CLUSTERS, (n_users,), generator=gen)]
        item += centres[torch.randint(0, CLUSTERS, (n_items,), generator=gen)]
    elif embeddings != "random":
        raise ValueError(f"embeddings must be random or clustered, not {embeddings!r}")
    return (user, item, Vocab(f"u{i}" for i in range(n_users)),
            Vocab(f"i{i}" for i in range(n_items)))


def bench_inprocess(model: ServedModel, batches: list[int], k: int, seconds: float,
                    seed: int, method: str = "exact") -> list[dict[str, Any]]:
    """``model.topk`` on (B, d) batches of user vectors for ``seconds`` per batch size."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        rows = torch.randint(0, model.n_users, (64, b), generator=gen)
        pool = [model.user[r.to(model.device)] for r in rows]  # on the device, as served
        ks = [k] * b
        warm_until = time.perf_counter() + min(0.5, seconds / 4)
        i = 0
        while i < 3 or time.perf_counter() < warm_until:
            model.topk(pool[i % len(pool)], ks)
            i += 1
        lat: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        now = start
        while now < deadline:
            t0 = now
            model.topk(pool[len(lat) % len(pool)], ks)  # ends with .cpu(): synchronised
            now = time.perf_counter()
            lat.append((now - t0) * 1000)
        elapsed = now - start
        out.append({"method": method, "batch": b, "calls": len(lat), "queries": len(lat) * b,
                    "seconds": elapsed, "queries_per_s": len(lat) * b / elapsed,
                    "batch_latency_ms": _pcts(lat)})
    return out


# ---------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_state(root: Path, user: torch.Tensor, item: torch.Tensor, users: Vocab,
                items: Vocab) -> str:
    """A state store whose production pointer names one period holding the model."""
    store = StateStore(str(root))
    store.save_period(PERIOD, {"w.user": user, "w.item": item},
                      {"note": "random embeddings (serving benchmark)"}, users, items)
    store.set_pointer("production", PERIOD)
    return store.uri


def package_model(state_uri: str, bentoml_home: Path,
                  extra_env: dict[str, str] | None = None) -> str:
    """``components.packaging.package`` in a child process, so that BentoML reads this
    ``BENTOML_HOME`` (it is fixed at import), with ``extra_env`` added to this process's
    environment. Returns the model tag."""
    env = {**os.environ, **(extra_env or {}), "BENTOML_HOME": str(bentoml_home),
           "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-c", PACKAGE, state_uri], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"packaging failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


class Server:
    """``bentoml serve serving.service:Recommender`` on 127.0.0.1, in its own session."""

    def __init__(self, bentoml_home: Path, workers: int, log_path: Path,
                 env: dict[str, str] | None = None, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if env is None:  # the benchmark's: production only, no Feast, no polling
            env = {**os.environ, "SMLREC_MODEL_SOURCE": "bentoml", "SMLREC_CANARY_SHARE": "0",
                   "SMLREC_RELOAD_SECONDS": "0"}
            env.pop("SMLREC_FEATURE_REPO", None)  # no Feast: the model's own path only
        self.env = {**env, **(extra_env or {}), "BENTOML_HOME": str(bentoml_home),
                    "BENTOML_DO_NOT_TRACK": "true", "SMLREC_WORKERS": str(workers)}
        if not (self.env.get("SMLREC_FEEDBACK_LOG") or self.env.get("SMLREC_DATA_URI")):
            # /feedback's log beside the BentoML home, never in the working directory
            self.env["SMLREC_FEEDBACK_LOG"] = str(Path(bentoml_home).parent / "feedback")
        exe = Path(sys.executable).with_name("bentoml")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bentoml"]
        self.cmd = [*cmd, "serve", "serving.service:Recommender", "--host", "127.0.0.1",
                    "--port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.startup_s = 0.0

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        import httpx

        self._log = self.log_path.open("wb")
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.perf_counter() - start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited ({self.proc.returncode}):\n"
                                       f"{self.log_tail()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        self.startup_s = time.perf_counter() - start
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"/readyz not 200 after {timeout:.0f} s:\n{self.log_tail()}")

    def post(self, route: str, body: dict[str, Any]) -> Any:
        import httpx

        r = httpx.post(self.url + route, json=body, timeout=30.0)
        r.raise_for_status()
        return r.json()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> dict[str, Any]:
        """SIGTERM to the server (a graceful shutdown), SIGKILL to what is left after
        ``STOP_TIMEOUT_S``; only the processes this server started, by pid."""
        import psutil

        out: dict[str, Any] = {"clean": True, "stop_s": 0.0, "returncode": None}
        if self.proc is None:
            return out
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out["returncode"] = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out["clean"] = False
            self.proc.kill()
            out["returncode"] = self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=max(1.0, STOP_TIMEOUT_S / 3))
        for p in alive:
            out["clean"] = False
            with contextlib.suppress(psutil.Error):
                p.kill()
        out["stop_s"] = time.perf_counter() - start
        if self._log is not None:
            self._log.close()
        self.proc = None
        return out


# ---------------------------------------------------------------------- the load generator


def run_load(url: str, user_ids: list[str], concurrency: int, duration: float,
             warmup: float, k: int, server_pid: int, single_worker: bool, seed: int,
             client: str, recent_pool: list[str] | None = None, feedback: int = 0,
             rate: float = 0.0, users_per_request: int = 0) -> dict[str, Any]:
    """Closed-loop load (runs in the load-generator process); returns the measured figures.
    ``feedback`` > 0: ``POST /feedback`` with that many events per request (items from
    ``recent_pool``) instead of /recommend. ``rate`` > 0: requests paced to that many per
    second in all (each loop waits for its next slot; open loop while the service keeps
    up) instead of as fast as answers come. ``users_per_request`` > 0: /recommend bodies
    carrying that many users (``users``) instead of one."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(_load(url, user_ids, concurrency, duration, warmup, k, server_pid,
                               single_worker, seed, client, recent_pool, feedback, rate,
                               users_per_request))
    out["client"] = f"{client} on {'uvloop' if factory else 'asyncio'}"
    return out


Post = Callable[[str, dict[str, Any]], Awaitable[tuple[str, bytes]]]


@contextlib.asynccontextmanager
async def _http(kind: str, url: str, connections: int) -> AsyncIterator[Post]:
    """``post(route, body) -> (outcome, body bytes)`` over a keep-alive connection pool;
    the outcome is the status code, or the exception's name for a transport error."""
    if kind == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=connections,
                              max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as hc:
            async def post_httpx(route: str, body: dict[str, Any]) -> tuple[str, bytes]:
                try:
                    r = await hc.post(route, json=body)
                except httpx.HTTPError as exc:
                    return type(exc).__name__, b""
                return str(r.status_code), r.content

            yield post_httpx
        return
    import aiohttp

    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=30.0)) as session:
        async def post_aiohttp(route: str, body: dict[str, Any]) -> tuple[str, bytes]:
            try:
                async with session.post(route, json=body) as r:
                    return str(r.status), await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__, b""

        yield post_aiohttp


def _cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def _load(url: str, user_ids: list[str], concurrency: int, duration: float,
                warmup: float, k: int, server_pid: int, single_worker: bool,
                seed: int, client: str, recent_pool: list[str] | None = None,
                feedback: int = 0, rate: float = 0.0, users_per_request: int = 0
                ) -> dict[str, Any]:
    import psutil

    done: list[tuple[float, float, str]] = []  # (start, end, "200" or what went wrong)
    stop = asyncio.Event()

    async def loop(post: Post, i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        gap, slot = concurrency / rate if rate else 0.0, time.perf_counter() + i / (rate or 1)
        while not stop.is_set():
            if gap:
                slot += gap
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))
            route, body = "/recommend", {"user_id": rng.choice(user_ids), "k": k,
                                         "exclude_seen": False}
            if feedback and recent_pool:
                now = time.time()
                route, body = "/feedback", {"events": [
                    {"user_id": rng.choice(user_ids), "item_id": rng.choice(recent_pool),
                     "timestamp": now} for _ in range(feedback)]}
            elif users_per_request:  # one body, many users
                body = {"users": [{"user_id": u} for u in rng.sample(user_ids,
                                                                      users_per_request)],
                        "k": k, "exclude_seen": False}
            elif recent_pool:  # a user the model does not know, with a few recent items
                body["user_id"] = f"new-{i}-{len(done)}"
                body["recent_items"] = rng.sample(recent_pool, 3)
            t0 = time.perf_counter()
            outcome, _ = await post(route, body)
            done.append((t0, time.perf_counter(), outcome))

    async def batching(post: Post) -> dict[str, Any]:
        outcome, content = await post("/metadata", {})
        if outcome != "200":
            raise RuntimeError(f"/metadata answered {outcome}")
        return dict(json.loads(content).get("batching") or {})

    server = psutil.Process(server_pid)
    procs = [server, *server.children(recursive=True)]
    async with _http(client, url, concurrency + 1) as post:  # one spare for /metadata
        tasks = [asyncio.create_task(loop(post, i)) for i in range(concurrency)]
        await asyncio.sleep(warmup)
        b0 = await batching(post)
        cpu_client0, cpu_server0 = time.process_time(), _cpu_seconds(procs)
        t_start = time.perf_counter()
        await asyncio.sleep(duration)
        t_end = time.perf_counter()
        cpu_client1, cpu_server1 = time.process_time(), _cpu_seconds(procs)
        b1 = await batching(post)
        stop.set()
        await asyncio.gather(*tasks)
    window = [(t0, t1, o) for t0, t1, o in done if t_start <= t1 < t_end]
    ok = [(t1 - t0) * 1000 for t0, t1, o in window if o == "200"]
    errors = Counter(o for _, _, o in window if o != "200")
    seconds = t_end - t_start
    d_req = int(b1.get("requests", 0)) - int(b0.get("requests", 0))
    d_batches = int(b1.get("batches", 0)) - int(b0.get("batches", 0))
    mean_batch = d_req / d_batches if single_worker and d_batches > 0 else None
    return {"concurrency": concurrency, "seconds": seconds, "requests": len(window),
            "ok": len(ok), "requests_per_s": len(ok) / seconds,
            **({"events_per_request": feedback, "events_per_s": feedback * len(ok) / seconds}
               if feedback else {}),
            **({"users_per_request": users_per_request,
                "users_per_s": users_per_request * len(ok) / seconds}
               if users_per_request else {}),
            "latency_ms": _pcts(ok), "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(5)),
            "errors_in_warmup_or_tail": sum(1 for _, _, o in done if o != "200")
            - sum(errors.values()),
            "batching": {"requests": d_req if single_worker else None,
                         "batches": d_batches if single_worker else None,
                         "mean_batch": mean_batch,
                         "largest_batch_so_far": b1.get("largest_batch")},
            "server_cpu_pct": 100 * (cpu_server1 - cpu_server0) / seconds,
            "client_cpu_pct": 100 * (cpu_client1 - cpu_client0) / seconds}


def _noop() -> int:
    return os.getpid()


# ---------------------------------------------------------------------- one catalogue size


def run_size(n_items: int, args: argparse.Namespace, device: torch.device,
             loadgen: ProcessPoolExecutor) -> dict[str, Any]:
    label = f"[{n_items:,} items]"
    t0 = time.perf_counter()
    user, item, users, items = make_model(args.users, n_items, args.dim, args.seed,
                                          args.embeddings)
    info = ModelInfo(stage="production", version="benchmark", period=PERIOD)
    model = ServedModel(user, item, users, items, info, device=device)
    print(f"{label} {args.embeddings} model built in {time.perf_counter() - t0:.1f} s; "
          f"in-process top-k on {device}, {torch.get_num_threads()} thread(s)", flush=True)
    inproc = bench_inprocess(model, args.batches, args.k, args.inproc_duration, args.seed)
    _print_inprocess(label, "exact", inproc)
    probe = [f"u{i}" for i in range(3)]
    expected = {u: [model.item_ids[r] for r in top.rows] for u, top in zip(
        probe, model.topk(model.user[: len(probe)], [args.k] * len(probe)), strict=True)}
    del model
    gc.collect()

    out: dict[str, Any] = {"n_items": n_items, "n_users": args.users, "dim": args.dim,
                           "inprocess": inproc, "http": []}
    with tempfile.TemporaryDirectory(prefix="smlrec-serving-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        state_uri = build_state(work / "state", user, item, users, items)
        del user, item, users, items
        gc.collect()
        refused = None
        try:  # packaging builds and gates the index where the size reaches the threshold
            tag = package_model(state_uri, work / "bentoml",
                                None if "ann" in args.methods else {"SMLREC_ANN": "off"})
        except RuntimeError as exc:
            if "AnnGateError" not in str(exc):
                raise
            refused = next((line for line in reversed(str(exc).splitlines())
                            if "AnnGateError" in line), str(exc))
            print(f"{label} packaging refused the index: {refused}", flush=True)
            tag = package_model(state_uri, work / "bentoml", {"SMLREC_ANN": "off"})
        out["package_s"] = time.perf_counter() - t0
        name, _, version = tag.partition(":")
        bundle = work / "bentoml" / "models" / name / version / "bundle"
        has_index = (bundle / ann.INDEX_FILE).exists()
        section: dict[str, Any] | None = None
        ann_expected: dict[str, list[str]] = {}
        if "ann" in args.methods:
            report = (json.loads((bundle / ann.REPORT_FILE).read_text())
                      if (bundle / ann.REPORT_FILE).exists() else None)
            section = out["ann"] = {"report": report, "refused": refused, "inprocess": [],
                                    "http": [], "comparison": []}
            if report:
                print(f"{label} index: {ann.AnnReport.from_dict(report).summary()}",
                      flush=True)
            if has_index:
                served = ServedModel.from_bundle(str(bundle), info, device)
                section["inprocess"] = bench_inprocess(served, args.batches, args.k,
                                                       args.inproc_duration, args.seed, "ann")
                _print_inprocess(label, "index", section["inprocess"])
                ann_expected = {u: [served.item_ids[r] for r in top.rows] for u, top in zip(
                    probe, served.topk(served.user[: len(probe)], [args.k] * len(probe)),
                    strict=True)}
                section["probe_overlap_with_exact"] = float(np.mean(
                    [len(set(ann_expected[u]) & set(expected[u])) / args.k for u in probe]))
                del served
                gc.collect()
        if "exact" in args.methods:
            out["server"], out["stop"] = serve_rows(work, args, label, loadgen, tag,
                                                    "exact", expected, out["http"],
                                                    out.setdefault("batched", []))
        if section is not None and has_index:
            section["server"], section["stop"] = serve_rows(work, args, label, loadgen, tag,
                                                            "ann", ann_expected,
                                                            section["http"],
                                                            section.setdefault("batched", []))
            section["comparison"] = compare(section)
    out["comparison"] = compare(out)
    return out


def _print_inprocess(label: str, method: str, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        lat = r["batch_latency_ms"]
        print(f"{label} in-process {method} batch {r['batch']:>3}: {r['queries_per_s']:>10,.0f}"
              f" q/s, batch latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms",
              flush=True)


def serve_rows(work: Path, args: argparse.Namespace, label: str,
               loadgen: ProcessPoolExecutor, tag: str, method: str,
               expected: dict[str, list[str]], rows: list[dict[str, Any]],
               batched: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A server answering by ``method`` (``exact``: ``SMLREC_ANN=off``; ``ann``: through the
    packaged index); its one-user HTTP rows are appended to ``rows``, its many-user rows
    (``--batch-users``) to ``batched``. Returns (server, stop)."""
    label = f"{label} [{method}]"
    server = Server(work / "bentoml", args.workers, work / f"server-{method}.log",
                    extra_env={"SMLREC_ANN": "off" if method == "exact" else "on"})
    info: dict[str, Any] = {}
    try:
        server.start()
        meta = server.post("/metadata", {})
        production = meta.get("production") or {}
        answers = {u: server.post("/recommend", {"user_id": u, "k": args.k,
                                                  "exclude_seen": False})["items"]
                   for u in expected}
        top_k = production.get("top_k") or {}
        info = {"model_tag": tag, "version": production.get("version"),
                "device": meta.get("device"), "n_items": production.get("n_items"),
                "top_k": top_k.get("method"), "startup_s": server.startup_s,
                "answers_match_inprocess": answers == expected,
                "env": {k: v for k, v in server.env.items()
                        if k.startswith(("SMLREC_", "BENTOML_CONFIG"))}}
        print(f"{label} packaged {tag}; server ready in {server.startup_s:.1f} s on "
              f"{meta.get('device')}, top-k {top_k.get('method')}; answers match in-process: "
              f"{answers == expected}", flush=True)
        assert server.proc is not None
        user_ids = [f"u{i}" for i in range(args.users)]
        for c in args.concurrency:
            r = loadgen.submit(run_load, server.url, user_ids, c, args.duration,
                               args.warmup, args.k, server.proc.pid, args.workers == 1,
                               args.seed, args.client).result()
            rows.append({"method": method, **r})
            lat = r["latency_ms"]
            print(f"{label} HTTP concurrency {c:>3}: {r['requests_per_s']:>8,.0f} req/s, "
                  f"p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms, "
                  f"errors {r['errors']}, mean batch {_fmt(r['batching']['mean_batch'], '.2f')}"
                  f", server CPU {r['server_cpu_pct']:.0f} %, "
                  f"client CPU {r['client_cpu_pct']:.0f} %", flush=True)
        for n in [b for b in args.batch_users if b > 0]:  # many users per body
            r = loadgen.submit(run_load, server.url, user_ids, args.batch_concurrency,
                               args.duration, args.warmup, args.k, server.proc.pid,
                               args.workers == 1, args.seed, args.client,
                               users_per_request=n).result()
            batched.append({"method": method, **r})
            lat = r["latency_ms"]
            print(f"{label} HTTP {n} users per body, concurrency {args.batch_concurrency}: "
                  f"{r['users_per_s']:>9,.0f} users/s ({r['requests_per_s']:,.1f} req/s), "
                  f"p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms, "
                  f"errors {r['errors']}", flush=True)
    except Exception:
        print(f"{label} server log tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        stop = server.stop()
        print(f"{label} server stopped in {stop['stop_s']:.1f} s "
              f"(clean: {stop['clean']}, exit {stop['returncode']})", flush=True)
    return info, stop


PACKAGE_COLD = ("import sys\n"
                "from components.packaging import package\n"
                "print(package(sys.argv[1], 'production', sys.argv[2], sys.argv[3]))\n")


def run_cold(args: argparse.Namespace, loadgen: ProcessPoolExecutor) -> dict[str, Any]:
    """The cold path: ``POST /recommend`` for users the model does not know, each with 3
    recent items, answered by MeLU's adaptation (path ``melu``). MovieLens-100k's items
    and side features (the benchmark data store), a MeLU of the default configuration with
    its initial weights and random MF tables (the values do not change the cost), packaged
    by the pipeline's package step with the cold path set as a gate would set it."""
    from benchmarks.backtest import prepare
    from smlrec import coldstart
    from smlrec.config import ColdConfig, DailyConfig
    from smlrec.data.store import list_periods, read_periods
    from smlrec.melu import MeLU, MeLUConfig

    label = "[cold path]"
    data = prepare("ml-100k")
    periods = list_periods(data)
    frame = read_periods(data, periods[:-1])
    users = Vocab(frame["user_id"].astype(str))
    items = Vocab(frame["item_id"].astype(str))
    user, item, _, _ = make_model(len(users), len(items), args.dim, args.seed)
    f = coldstart.features(data, users, items)
    melu = MeLU(f, MeLUConfig(), seed=args.seed)
    melu_t, melu_meta = coldstart.save_tensors(melu)
    out: dict[str, Any] = {"n_items": len(items), "recent_items": 3, "http": []}
    with tempfile.TemporaryDirectory(prefix="smlrec-serving-cold-") as tmp:
        work = Path(tmp)
        store = StateStore(str(work / "state"))
        store.save_config(DailyConfig(cold=ColdConfig()).to_yaml())
        store.save_period(periods[-2], {"w.user": user, "w.item": item, **melu_t},
                          {coldstart.META_KEY: melu_meta}, users, items)
        store.set_pointer("production", periods[-2])
        store.append_decision({"period": periods[-1], "candidate": periods[-2],
                               "cold": {"path": "melu", "reason": "serving benchmark"}})
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true"}
        proc = subprocess.run([sys.executable, "-c", PACKAGE_COLD, store.uri, periods[-1],
                               data], cwd=REPO, env=env, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"packaging failed:\n{proc.stderr[-4000:]}")
        server = Server(work / "bentoml", args.workers, work / "server.log")
        try:
            server.start()
            probe = server.post("/recommend", {"user_id": "probe", "k": args.k,
                                               "recent_items": items.ids[:3]})
            out["path"] = probe.get("path")
            print(f"{label} {len(items):,} items; a new user's answer came by path "
                  f"{out['path']!r}", flush=True)
            assert server.proc is not None
            for c in args.concurrency:
                if c > 8:
                    continue
                r = loadgen.submit(run_load, server.url, ["unused"], c, args.duration,
                                   args.warmup, args.k, server.proc.pid, args.workers == 1,
                                   args.seed, args.client, items.ids).result()
                out["http"].append(r)
                lat = r["latency_ms"]
                print(f"{label} HTTP concurrency {c:>3}: {r['requests_per_s']:>8,.0f} req/s, "
                      f"p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms, "
                      f"errors {r['errors']}, server CPU {r['server_cpu_pct']:.0f} %",
                      flush=True)
        except Exception:
            print(f"{label} server log tail:\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            out["stop"] = server.stop()
    return out


def compare(size: dict[str, Any]) -> list[dict[str, Any]]:
    """HTTP at concurrency c next to the in-process ceiling at batch c."""
    ceiling = {r["batch"]: r["queries_per_s"] for r in size["inprocess"]}
    rows = []
    for r in size["http"]:
        c = r["concurrency"]
        q = ceiling.get(c)
        rows.append({"concurrency": c, "inprocess_queries_per_s": q,
                     "http_requests_per_s": r["requests_per_s"],
                     "ratio": r["requests_per_s"] / q if q else None,
                     "http_p99_ms": r["latency_ms"]["p99"],
                     "mean_batch": r["batching"]["mean_batch"]})
    return rows


# ---------------------------------------------------------------------- verdicts and output


def verdicts(sizes: dict[str, dict[str, Any]], concurrency: list[int]) -> dict[str, Any]:
    c_target = 32 if 32 in concurrency else max(concurrency)
    per_size = []
    for s in sizes.values():
        row = next((r for r in s["comparison"] if r["concurrency"] == c_target), None)
        ratio = row["ratio"] if row else None
        per_size.append({"n_items": s["n_items"], "ratio": ratio,
                         "met": None if ratio is None else ratio >= RATIO_TARGET})
    measured = [p for p in per_size if p["met"] is not None]
    parts = [f"{p['n_items']:,} items {p['ratio']:.2f}x ({'met' if p['met'] else 'NOT met'})"
             for p in measured]
    if not measured:
        status = "not measured"
    elif all(p["met"] for p in measured):
        status = "MET at every size"
    elif any(p["met"] for p in measured):
        status = "met at some sizes only"
    else:
        status = "NOT MET at any size"
    throughput = {"target": f"HTTP req/s at concurrency {c_target} >= {RATIO_TARGET} x "
                            f"in-process q/s at batch {c_target}",
                  "concurrency": c_target, "per_size": per_size, "status": status,
                  "line": f"Throughput, HTTP at concurrency {c_target} >= {RATIO_TARGET}x the "
                          f"in-process ceiling at batch {c_target}: **{status}**"
                          + (f" ({'; '.join(parts)})." if parts else ".")}
    size = sizes.get(str(P99_TARGET_ITEMS))
    per_c = [] if size is None else [
        {"concurrency": r["concurrency"], "p99_ms": r["latency_ms"]["p99"],
         "met": r["latency_ms"]["p99"] is not None and r["latency_ms"]["p99"] < P99_TARGET_MS
         and r["errors"] == 0} for r in size["http"]]
    if not per_c:
        status = f"not measured (no exact {P99_TARGET_ITEMS:,}-item HTTP run)"
    elif all(p["met"] for p in per_c):
        status = "MET at every concurrency"
    elif any(p["met"] for p in per_c):
        met_at = ", ".join(str(p["concurrency"]) for p in per_c if p["met"])
        status = f"met at concurrency {met_at} only"
    else:
        status = "NOT MET at any concurrency"
    parts = [f"concurrency {p['concurrency']}: {_fmt(p['p99_ms'])} ms"
             + ("" if p["met"] else " (not met)") for p in per_c]
    latency = {"target": f"p99 < {P99_TARGET_MS:.0f} ms at {P99_TARGET_ITEMS:,} items "
                         "(with no errors)",
               "per_concurrency": per_c, "status": status,
               "line": f"Latency, p99 < {P99_TARGET_MS:.0f} ms at {P99_TARGET_ITEMS:,} items: "
                       f"**{status}**" + (f" ({'; '.join(parts)})." if parts else ".")}
    return {"throughput": throughput, "p99": latency, **ann_verdicts(sizes, c_target)}


def ann_verdicts(sizes: dict[str, dict[str, Any]], c_target: int) -> dict[str, Any]:
    """With the index: at ``P99_TARGET_ITEMS`` items, HTTP at concurrency ``c_target`` over
    the index's in-process ceiling at that batch >= ``RATIO_TARGET`` with p99 <=
    ``P99_TARGET_MS``; at ``ANN_RATE_ITEMS`` items, >= ``ANN_RATE_TARGET`` req/s (the best
    concurrency without errors) with recall@10 >= ``ANN_RECALL_TARGET``."""
    def section(n: int) -> dict[str, Any] | None:
        size = sizes.get(str(n))
        return None if size is None else size.get("ann")

    def absent(sec: dict[str, Any] | None, n: int) -> str | None:
        if sec is None:
            return f"not measured (no {n:,}-item run with the index)"
        if sec.get("refused"):
            return f"NOT MET: packaging refused the index ({sec['refused']})"
        if not sec.get("http"):
            return "not measured (no index built, or no HTTP rows)"
        return None

    sec = section(P99_TARGET_ITEMS)
    status = absent(sec, P99_TARGET_ITEMS)
    detail: dict[str, Any] = {}
    if status is None and sec is not None:
        row = next((r for r in sec["comparison"] if r["concurrency"] == c_target), None)
        if row is None or row["ratio"] is None:
            status = f"not measured (no concurrency {c_target} row with a batch {c_target} " \
                     "ceiling)"
        else:
            http = next(r for r in sec["http"] if r["concurrency"] == c_target)
            met = (row["ratio"] >= RATIO_TARGET and row["http_p99_ms"] is not None
                   and row["http_p99_ms"] <= P99_TARGET_MS and http["errors"] == 0)
            detail = {"ratio": row["ratio"], "p99_ms": row["http_p99_ms"], "met": met}
            status = (f"{'MET' if met else 'NOT MET'} ({row['ratio']:.2f}x, p99 "
                      f"{_fmt(row['http_p99_ms'])} ms, {http['errors']} errors)")
    ratio = {"target": f"with the index at {P99_TARGET_ITEMS:,} items: HTTP at concurrency "
                       f"{c_target} >= {RATIO_TARGET}x the index's in-process ceiling at batch "
                       f"{c_target}, and p99 <= {P99_TARGET_MS:.0f} ms", **detail,
             "status": status,
             "line": f"Index at {P99_TARGET_ITEMS:,} items, HTTP at concurrency {c_target} >= "
                     f"{RATIO_TARGET}x in-process and p99 <= {P99_TARGET_MS:.0f} ms: "
                     f"**{status}**."}
    sec = section(ANN_RATE_ITEMS)
    status = absent(sec, ANN_RATE_ITEMS)
    detail = {}
    if status is None and sec is not None:
        ok = [r for r in sec["http"] if r["errors"] == 0] or sec["http"]
        best = max(ok, key=lambda r: r["requests_per_s"])
        recall = (sec.get("report") or {}).get("recall_at_k")
        met = (best["requests_per_s"] >= ANN_RATE_TARGET and recall is not None
               and recall >= ANN_RECALL_TARGET and best["errors"] == 0)
        detail = {"requests_per_s": best["requests_per_s"], "concurrency": best["concurrency"],
                  "recall_at_10": recall, "met": met}
        status = (f"{'MET' if met else 'NOT MET'} ({best['requests_per_s']:,.0f} req/s at "
                  f"concurrency {best['concurrency']}, recall@10 {_fmt(recall, '.3f')})")
    rate = {"target": f"with the index at {ANN_RATE_ITEMS:,} items: >= {ANN_RATE_TARGET:.0f} "
                      f"HTTP req/s with recall@10 >= {ANN_RECALL_TARGET}", **detail,
            "status": status,
            "line": f"Index at {ANN_RATE_ITEMS:,} items, >= {ANN_RATE_TARGET:.0f} req/s at "
                    f"recall@10 >= {ANN_RECALL_TARGET}: **{status}**."}
    return {"ann_ratio_p99": ratio, "ann_rate": rate}


def http_table(sizes: dict[str, dict[str, Any]], key: str, server: str) -> list[str]:
    """The HTTP rows of each size's ``key`` list (``http``, or the ``ann`` section's)."""
    lines = ["| items | concurrency | req/s | p50 (ms) | p99 (ms) | errors | mean micro-batch "
             "| server CPU | client CPU | server start (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes.values():
        sec = s if key == "http" else (s.get("ann") or {})
        for r in sec.get("http", []):
            lat = r["latency_ms"]
            lines.append(f"| {s['n_items']:,} | {r['concurrency']} | "
                         f"{r['requests_per_s']:,.0f} | {_fmt(lat['p50'])} | "
                         f"{_fmt(lat['p99'])} | {r['errors']} | "
                         f"{_fmt(r['batching']['mean_batch'], '.2f')} | "
                         f"{r['server_cpu_pct']:.0f} % | {r['client_cpu_pct']:.0f} % | "
                         f"{(sec.get(server) or {}).get('startup_s', 0.0):.1f} |")
    return lines


def batched_markdown(sizes: dict[str, dict[str, Any]]) -> list[str]:
    """The many-user bodies: users ranked per second."""
    rows = [(s, r) for s in sizes.values()
            for r in [*s.get("batched", []), *(s.get("ann") or {}).get("batched", [])]]
    if not rows:
        return []
    lines = ["## Many users per body (`POST /recommend {users: [...]}`)", "",
             "Each body carries n known users, ranked with one top-k per served model; closed "
             "loop at the stated concurrency.", "",
             "| items | top-k | users per body | concurrency | users/s | bodies/s | p50 (ms) "
             "| p99 (ms) | errors | server CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {s['n_items']:,} | {r['method']} | {r['users_per_request']:,} | "
                     f"{r['concurrency']} | {r['users_per_s']:,.0f} | "
                     f"{r['requests_per_s']:,.1f} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | "
                     f"{r['errors']} | {r['server_cpu_pct']:.0f} % |")
    return [*lines, ""]


def ann_markdown(sizes: dict[str, dict[str, Any]]) -> list[str]:
    """The approximate top-k sections: index reports, in-process rows, HTTP rows."""
    secs = [(s, s["ann"]) for s in sizes.values() if s.get("ann")]
    if not secs:
        return []
    lines = ["## Approximate top-k (a FAISS index built and gated at packaging)", "",
             "The index report from packaging: the setting chosen on sampled user rows (recall "
             "against exact search; latency per query at batch 1, one thread), or why search "
             "stays exact.", "",
             "| items | method | kind | parameters | recall@10 | recall@100 | users | index "
             "p50 / p99 (ms) | exact p50 / p99 (ms) | build (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, sec in secs:
        r = sec.get("report") or {}
        note = sec.get("refused") or ("" if r.get("method") == "ann" else r.get("reason", ""))
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "—"
        lines.append(f"| {s['n_items']:,} | {r.get('method', '—')} | {r.get('kind') or '—'} | "
                     f"{params} | {_fmt(r.get('recall_at_k'), '.3f')} | "
                     f"{_fmt(r.get('recall_at_k_large'), '.3f')} | {r.get('users', 0)} | "
                     f"{_fmt(r.get('index_p50_ms'), '.3f')} / "
                     f"{_fmt(r.get('index_p99_ms'), '.3f')} | "
                     f"{_fmt(r.get('exact_p50_ms'), '.3f')} / "
                     f"{_fmt(r.get('exact_p99_ms'), '.3f')} | {r.get('build_s', 0.0):.1f} "
                     f"({r.get('measure_s', 0.0):.1f} measuring) | "
                     f"{note} |")
    lines += ["", "In-process with the index (the packaged model loaded back, "
              "`ServedModel.topk`):", "",
              "| items | batch | queries/s | batch latency mean (ms) | p50 (ms) | p99 (ms) |",
              "|---|---|---|---|---|---|"]
    for s, sec in secs:
        for r in sec.get("inprocess", []):
            lat = r["batch_latency_ms"]
            lines.append(f"| {s['n_items']:,} | {r['batch']} | {r['queries_per_s']:,.0f} | "
                         f"{lat['mean']:.3f} | {lat['p50']:.3f} | {lat['p99']:.3f} |")
    lines += ["", "HTTP answered through the index:", "", *http_table(sizes, "ann", "server"),
              "", "With the index, HTTP against its in-process ceiling:", "",
              *comparison_table(sizes, "ann"), ""]
    return lines


def comparison_table(sizes: dict[str, dict[str, Any]], key: str = "") -> list[str]:
    lines = ["| items | concurrency = batch | in-process q/s | HTTP req/s | HTTP / in-process "
             "| HTTP p99 (ms) | mean micro-batch |", "|---|---|---|---|---|---|---|"]
    for s in sizes.values():
        for r in ((s.get(key) or {}) if key else s).get("comparison", []):
            lines.append(f"| {s['n_items']:,} | {r['concurrency']} | "
                         f"{_fmt(r['inprocess_queries_per_s'], ',.0f')} | "
                         f"{r['http_requests_per_s']:,.0f} | {_fmt(r['ratio'], '.3f')} | "
                         f"{_fmt(r['http_p99_ms'])} | {_fmt(r['mean_batch'], '.2f')} |")
    return lines


def markdown(out: dict[str, Any]) -> str:
    hw, st = out["hardware"], out["settings"]
    sizes = out["sizes"]
    lines = [
        "# Serving: the in-process top-k ceiling against the HTTP service", "",
        f"Run {out['date']} on {hw['cpu']}, {hw['cpu_count']} cores (load average "
        f"{hw['loadavg_at_start']} at the start), torch {hw['torch']}, device "
        f"`{hw['device']}`, {hw['torch_threads']} torch thread(s) in-process and per worker, "
        f"{st['workers']} service worker(s). Models: {st['embeddings']} embeddings, "
        f"d = {st['dim']}, {st['users']:,} users (the values do not change the cost of an "
        f"exact top-k). k = {st['k']}. The load generator shares the machine with the server. "
        f"Reproduce: `{st['command']}`.", "",
        "## In-process top-k (`ServedModel.topk`, the machine's ceiling)", "",
        f"{st['inproc_duration']:g} s per cell; latency is per batch call.", "",
        "| items | batch | queries/s | batch latency mean (ms) | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|---|"]
    for s in sizes.values():
        for r in s["inprocess"]:
            lat = r["batch_latency_ms"]
            lines.append(f"| {s['n_items']:,} | {r['batch']} | {r['queries_per_s']:,.0f} | "
                         f"{lat['mean']:.3f} | {lat['p50']:.3f} | {lat['p99']:.3f} |")
    lines += [
        "", "## HTTP (`POST /recommend` on `bentoml serve`)", "",
        f"Closed loop ({st['client']} client, one process, keep-alive connections), "
        f"{st['warmup']:g} s warm-up then {st['duration']:g} s measured per row; "
        "errors are non-200 answers and transport errors; the mean micro-batch is the "
        "service's own count (`/metadata`), over the measured window"
        + (" (not reported with several workers: /metadata describes one worker)"
           if st["workers"] > 1 else "")
        + "; CPU is over the measured window, 100 % = one core.", "",
        "| items | concurrency | req/s | p50 (ms) | p99 (ms) | errors | mean micro-batch "
        "| server CPU | client CPU | server start (s) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    lines += http_table(sizes, "http", "server")
    lines += ["", "## HTTP against the in-process ceiling", "", *comparison_table(sizes), ""]
    lines += ann_markdown(sizes)
    lines += batched_markdown(sizes)
    lines += ["## Verdicts", "", f"- {out['verdicts']['throughput']['line']}",
              f"- {out['verdicts']['p99']['line']}",
              *(f"- {out['verdicts'][key]['line']}" for key in ("ann_ratio_p99", "ann_rate")
                if key in out["verdicts"]), ""]
    cold = out.get("cold")
    if cold:
        lines += ["## The cold path (users the model does not know, answered by MeLU)", "",
                  f"`POST /recommend` with a new user id and {cold['recent_items']} recent "
                  f"items each, {cold['n_items']:,} items (MovieLens-100k), MeLU adapted "
                  f"per request; answers came by path `{cold.get('path')}`.", "",
                  "| concurrency | req/s | p50 (ms) | p99 (ms) | errors | server CPU |",
                  "|---|---|---|---|---|---|"]
        for r in cold["http"]:
            lat = r["latency_ms"]
            lines.append(f"| {r['concurrency']} | {r['requests_per_s']:,.0f} | "
                         f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {r['errors']} | "
                         f"{r['server_cpu_pct']:.0f} % |")
        lines.append("")
    mismatched = [s["n_items"] for s in sizes.values()
                  if not (s.get("server") or {}).get("answers_match_inprocess", True)]
    lines.append("Checks: the service's answers for three users matched the in-process top-k "
                 + ("at every size." if not mismatched else
                    f"except at {', '.join(f'{n:,}' for n in mismatched)} items."))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_ints, default=[1_700, 100_000, 1_000_000],
                    help="catalogue sizes, comma-separated (default 1700,100000,1000000)")
    ap.add_argument("--concurrency", type=_ints, default=[1, 8, 32],
                    help="HTTP closed-loop concurrencies (default 1,8,32)")
    ap.add_argument("--batch-users", type=_ints, default=[100, 1000],
                    help="users per /recommend body for the many-user rows (default 100,1000;"
                    " 0: none)")
    ap.add_argument("--batch-concurrency", type=int, default=4,
                    help="closed-loop concurrency of the many-user rows (default 4)")
    ap.add_argument("--batches", type=_ints, default=[1, 8, 32],
                    help="in-process batch sizes (default 1,8,32)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="measured seconds per HTTP run (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="HTTP warm-up seconds before each measured run (default 2)")
    ap.add_argument("--inproc-duration", type=float, default=None,
                    help="seconds per in-process cell (default: 3, or --duration if shorter)")
    ap.add_argument("--workers", type=int, default=1, help="SMLREC_WORKERS (default 1)")
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                    help="load generator's HTTP client (default aiohttp; httpx.AsyncClient "
                    "saturates first at high concurrency, encode/httpx#3215)")
    ap.add_argument("--cold-only", action="store_true",
                    help="run only the cold path and add it to the existing serving.json "
                    "and serving.md in --out (the other rows are kept)")
    ap.add_argument("--no-cold", action="store_true",
                    help="skip the cold path (new users answered by MeLU, concurrency 1 and "
                    "8, on MovieLens-100k's items)")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                    default=list(METHODS),
                    help="top-k methods to measure, comma-separated (default exact,ann; ann: "
                    "the index packaging builds from SMLREC_ANN_MIN_ITEMS items on)")
    ap.add_argument("--embeddings", choices=["clustered", "random"], default="clustered",
                    help="synthetic embeddings (default clustered: around shared centres, as "
                    "trained ones group; random: isotropic N(0, 1/d), an index's worst case)")
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for serving.md and serving.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.inproc_duration is None:
        args.inproc_duration = min(3.0, args.duration)
    if not args.sizes or not args.concurrency or not args.batches:
        ap.error("--sizes, --concurrency and --batches need at least one value")
    if not args.methods or set(args.methods) - set(METHODS):
        ap.error(f"--methods takes {','.join(METHODS)}, not {','.join(args.methods)}")
    if min(args.sizes) < args.k or args.workers < 1 or args.duration <= 0:
        ap.error("sizes must be >= k, --workers >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device()
    configure_threads()
    hw = hardware(device)
    hw["loadavg_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    command = "python -m benchmarks.serving " + " ".join(sys.argv[1:] if argv is None
                                                          else argv)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hardware": hw,
        "produced_by": produced_by(),
        "settings": {"sizes": args.sizes, "concurrency": args.concurrency,
                     "batches": args.batches, "duration": args.duration,
                     "warmup": args.warmup, "inproc_duration": args.inproc_duration,
                     "workers": args.workers, "client": args.client, "users": args.users,
                     "dim": args.dim, "k": args.k, "seed": args.seed,
                     "embeddings": ("random float32 N(0, 1/d)" if args.embeddings == "random"
                                    else f"clustered float32 ({CLUSTERS:,} N(0, 1/d) centres "
                                    "+ N(0, 1/d) noise)"),
                     "methods": args.methods,
                     "ann_settings": {k: v for k, v in ann.AnnSettings.from_env().__dict__
                                      .items() if k in ("min_items", "recall", "budget_ms",
                                                        "users", "kinds")},
                     "command": command.strip()},
        "targets": {"ratio_at_concurrency_32": RATIO_TARGET,
                    "p99_ms_at_100k_items": P99_TARGET_MS,
                    "ann_requests_per_s_at_1m_items": ANN_RATE_TARGET,
                    "ann_recall_at_10": ANN_RECALL_TARGET},
        "sizes": {}}
    print(f"{hw['cpu']}, {hw['cpu_count']} cores (load average {hw['loadavg_at_start']}), "
          f"torch {hw['torch']}, device {device}, {torch.get_num_threads()} torch thread(s), "
          f"{args.workers} worker(s)", flush=True)
    ctx = multiprocessing.get_context("spawn")
    kept = args.out / "serving.json"
    if args.cold_only:
        if not kept.exists():
            raise SystemExit(f"--cold-only adds to {kept}, which does not exist: run the "
                             "whole benchmark first")
        out = json.loads(kept.read_text())
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as loadgen:
            loadgen.submit(_noop).result()
            out["cold"] = run_cold(args, loadgen)
        out["cold"]["produced_by"] = produced_by()
        kept.write_text(json.dumps(out, indent=2) + "\n")
        (args.out / "serving.md").write_text(markdown(out))
        print(f"added the cold path to {kept} and serving.md")
        return
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as loadgen:
        loadgen.submit(_noop).result()  # start (and import) it before any server runs
        for n in args.sizes:
            out["sizes"][str(n)] = run_size(n, args, device, loadgen)
        if not args.no_cold:
            out["cold"] = run_cold(args, loadgen)
    out["verdicts"] = verdicts(out["sizes"], args.concurrency)
    print()
    print("\n".join(comparison_table(out["sizes"])))
    print()
    print(out["verdicts"]["throughput"]["line"].replace("**", ""))
    print(out["verdicts"]["p99"]["line"].replace("**", ""))
    if "ann" in args.methods:
        print("\n".join(comparison_table(out["sizes"], "ann")))
        print(out["verdicts"]["ann_ratio_p99"]["line"].replace("**", ""))
        print(out["verdicts"]["ann_rate"]["line"].replace("**", ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(out))
    print(f"wrote {args.out / 'serving.json'} and serving.md")


if __name__ == "__main__":
    main()
