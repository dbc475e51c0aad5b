"""Soak test: the prediction API under the highest load the machine sustains, with a hot swap
in the middle.

A real ``bentoml serve`` on 127.0.0.1 serves a random MF model (``--items`` items, d=64); a
load generator in a second process keeps ``--concurrency`` requests in flight (a closed loop:
as fast as the server answers) for ``--duration`` seconds. Half-way through, a new production
model is packaged into the BentoML store, as the pipeline's package step does, and the
service swaps to it while serving. Reported: requests, errors (goal 0), requests/s, p50/p99
latency, and when the swap was seen. Figures go to ``<out>/soak.json`` and the ``load_*``
keys of ``benchmarks/results/reliability.json``.

Reproduce: ``make soak`` (60 s, 100k items), or ``python -m benchmarks.soak --duration 10``.
The test suite runs a short version (``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.backtest import produced_by
from benchmarks.serving import PERIOD, Server, build_state, make_model, package_model, run_load
from smlrec.registry import StateStore

RESULTS = Path(__file__).resolve().parent / "results"
SWAP_PERIOD = "2026-01-02"  # the day after benchmarks.serving.PERIOD


def _swap(state_uri: str, bentoml_home: Path, n_users: int, n_items: int, dim: int) -> str:
    """Save a second model as a new period, promote it, package it: the hot swap's trigger."""
    store = StateStore(state_uri)
    tensors, meta, users, items = store.load_period(PERIOD)
    g = torch.Generator().manual_seed(99)
    store.save_period(SWAP_PERIOD, {"w.user": torch.randn(n_users, dim, generator=g),
                                    "w.item": torch.randn(n_items, dim, generator=g)},
                      meta, users, items)
    store.set_pointer("production", SWAP_PERIOD)
    return package_model(state_uri, bentoml_home)


def soak(items: int = 100_000, users: int = 10_000, dim: int = 64, duration: float = 60.0,
         concurrency: int = 32, warmup: float = 2.0, seed: int = 0,
         work: Path | None = None) -> dict[str, Any]:
    """Run the soak test; return its figures (see the module docstring)."""
    tmp = Path(work or tempfile.mkdtemp(prefix="smlrec-soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    user, item, user_vocab, item_vocab = make_model(users, items, dim, seed)
    state = build_state(tmp / "state", user, item, user_vocab, item_vocab)
    home = tmp / "bento"
    first = package_model(state, home)
    server = Server(home, workers=1, log_path=tmp / "serve.log")
    server.env["SMLREC_RELOAD_SECONDS"] = "1"
    server.start()
    try:
        with ProcessPoolExecutor(max_workers=1) as loadgen:
            future = loadgen.submit(run_load, server.url, user_vocab.ids[:1000], concurrency,
                                    duration, warmup, 10, server.proc.pid, True, seed,
                                    "aiohttp")
            time.sleep(warmup + duration / 2)
            t_swap = time.perf_counter()
            second = _swap(state, home, users, items, dim)
            seen_after = None
            while time.perf_counter() - t_swap < duration:
                version = server.post("/metadata", {})["production"]["version"]
                if version == second:
                    seen_after = time.perf_counter() - t_swap
                    break
                time.sleep(0.2)
            load = future.result()
        meta = server.post("/metadata", {})
    finally:
        stopped = server.stop()
    return {"items": items, "users": users, "dim": dim, "duration_s": duration,
            "concurrency": concurrency, "first_model": first, "swapped_to": second,
            "swap_seen_after_s": seen_after, "serving_after": meta["production"]["version"],
            "swaps": meta["swaps"], "load": load, "server_stop": stopped,
            "load_requests": load["requests"],
            "load_errors": load["errors"] + load["errors_in_warmup_or_tail"],
            "load_p50_ms": load["latency_ms"]["p50"], "load_p99_ms": load["latency_ms"]["p99"],
            "load_requests_per_s": load["requests_per_s"], "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "produced_by": produced_by()}


def record(result: dict[str, Any], out: Path, reliability: Path) -> None:
    """Write ``soak.json`` and merge the load_* figures into reliability.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    old = json.loads(reliability.read_text()) if reliability.is_file() else {}
    keys = ("load_requests", "load_errors", "load_p50_ms", "load_p99_ms",
            "load_requests_per_s", "duration_s")
    old.update({("load_duration_s" if k == "duration_s" else k): result[k] for k in keys})
    old["load_swap_seen_after_s"] = result["swap_seen_after_s"]
    old["load_source"] = (f"benchmarks/soak.py: {result['duration_s']:.0f} s, {result['items']:,} "
                          f"items, concurrency {result['concurrency']}, {result['date']}")
    reliability.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of soak.json")
    ap.add_argument("--reliability", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args(argv)
    result = soak(items=args.items, duration=args.duration, concurrency=args.concurrency)
    record(result, args.out, args.reliability)
    print(f"soak: {result['load_requests']:,} requests in {args.duration:.0f} s at concurrency "
          f"{args.concurrency} ({result['load_requests_per_s']:.0f}/s), "
          f"{result['load_errors']} errors, p50 {result['load_p50_ms']:.1f} ms, "
          f"p99 {result['load_p99_ms']:.1f} ms; hot swap to {result['swapped_to']} seen after "
          f"{result['swap_seen_after_s']} s; wrote {args.out / 'soak.json'}")
    return result


if __name__ == "__main__":
    main()
