"""Seeds side by side: one spawned worker process per seed, their progress relayed home."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def run_in_workers(worker: Callable[..., Any], calls: Sequence[tuple], jobs: int,
                   on_message: Callable[[str, Any], None]) -> list[Any]:
    """``worker(*call, queue)`` for every call, in at most ``jobs`` spawned processes (safe
    with CUDA); returns the results in the order of ``calls``. A worker reports progress by
    putting ``(kind, value)`` on ``queue``; each message is handed to ``on_message`` in this
    process as it arrives."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()

        def relay() -> None:
            while (msg := queue.get()) is not None:
                on_message(*msg)

        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        try:
            with ProcessPoolExecutor(max(1, min(jobs, len(calls))), mp_context=ctx) as pool:
                futures = [pool.submit(worker, *call, queue) for call in calls]
                return [f.result() for f in futures]
        finally:
            queue.put(None)
            thread.join()
