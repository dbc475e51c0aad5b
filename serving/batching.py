"""Adaptive micro-batching: concurrent requests share one matrix product on the device.

Requests are queued on the event loop; one worker task takes everything queued (up to
``max_batch_size``) and runs it as one batch, on the loop or (``threaded=True``) in a
dedicated thread. Batches adapt to the load with no added wait: an idle service answers a
lone request at once, a busy one collects the requests that arrived while the previous
batch was computing. ``max_wait_ms`` (default 0) may add a short wait to fill batches
further.

BentoML's own ``batchable`` APIs take a single list argument; this keeps the request contract
of every endpoint (``{user_id, k, ...}``) while batching inside the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class BatchStats:
    """Counters for ``/metadata``: how many batches ran, how many jobs, the largest batch."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0

    @property
    def mean(self) -> float:
        return self.jobs / self.batches if self.batches else 0.0


class MicroBatcher(Generic[J, R]):
    """Run ``fn(jobs) -> results`` (same length, same order) over batches of submitted jobs.

    ``fn`` runs one batch at a time, on the event loop or, with ``threaded``, in one
    background thread. An exception raised by ``fn``
    fails every job of its batch; ``fn`` may instead return an ``Exception`` instance in a
    job's place to fail that job alone.
    """

    def __init__(self, fn: Callable[[Sequence[J]], Sequence[R | BaseException]],
                 max_batch_size: int = 64, max_wait_ms: float = 0.0, threaded: bool = True):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.stats = BatchStats()
        self.threaded = threaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smlrec-batch")
        self._queue: asyncio.Queue[tuple[J, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, job: J) -> R:
        """Queue ``job`` and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="smlrec-batcher")
        future: asyncio.Future[R] = loop.create_future()
        assert self._queue is not None
        self._queue.put_nowait((job, future))
        return await future

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            if self.max_wait:
                deadline = loop.time() + self.max_wait
                while len(batch) < self.max_batch_size:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), timeout))
                    except TimeoutError:
                        break
            while len(batch) < self.max_batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(job, fut) for job, fut in batch if not fut.done()]  # skip cancelled
            if not live:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            try:
                jobs = [job for job, _ in live]
                if self.threaded:
                    results = await loop.run_in_executor(self._executor, self.fn, jobs)
                else:
                    results = self.fn(jobs)
                    await asyncio.sleep(0)  # let the requests that arrived meanwhile queue
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results "
                                       f"for {len(live)} jobs")
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def close(self) -> None:
        """Stop the worker and the thread (pending jobs are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
        with contextlib.suppress(Exception):
            self._executor.shutdown(wait=False, cancel_futures=True)


def describe(batcher: MicroBatcher[Any, Any]) -> dict[str, Any]:
    """The batcher's settings and counters, for ``/metadata``."""
    s = batcher.stats
    return {"max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait * 1000,
            "batches": s.batches, "requests": s.jobs, "mean_batch": round(s.mean, 2),
            "largest_batch": s.largest}


def by_model(jobs: Sequence[tuple], run: Callable[[Any, list[tuple]], Sequence[Any]]
             ) -> list[Any]:
    """``run(model, its jobs)`` once per model among the jobs, each a tuple whose first item
    is the model (production and candidate may mix in a batch); the answers in the jobs'
    order."""
    out: list[Any] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job[0]), []).append(i)
    for idx in groups.values():
        answers = run(jobs[idx[0]][0], [jobs[i] for i in idx])
        for i, answer in zip(idx, answers, strict=True):
            out[i] = answer
    return out


K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A thread-safe map whose entries expire ``ttl`` seconds after they were put, holding
    at most ``maxsize`` of them (the least recently used goes first). ``ttl`` 0 keeps
    nothing."""

    def __init__(self, ttl: float, maxsize: int):
        self.ttl, self.maxsize = ttl, maxsize
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None or entry[0] <= time.monotonic():
                if entry is not None:
                    del self._items[key]
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._items[key] = (time.monotonic() + self.ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
