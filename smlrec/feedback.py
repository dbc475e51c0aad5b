"""The feedback log: events the API received, made durable before they are acknowledged.

``POST /feedback`` hands its events to a :class:`FeedbackLog`; the answer goes back only once
they are on disk (written and fsynced), so a service killed with SIGKILL loses no event it
acknowledged. The day's log is the next daily run's raw input (``smlrec pipeline run
--input-file <root>/period=<id>``): it goes through the same Great Expectations suite and
importer as any file.

Layout, under the log root (default ``<data store>/feedback``)::

    <root>/period=YYYY-MM-DD/events-<host>-<pid>-<start>.jsonl

one folder per period (the data store's period spec, from the event's timestamp), one file
per writing process (workers never share a file), appended to and never rewritten. Each line
is one JSON object:

==================  ==========================================================================
``user_id``         the user's id (string)
``item_id``         the item's id (string)
``timestamp``       when it happened: ISO 8601 in UTC with microseconds (``...Z``); the
                    request's timestamp, or the time it was received
``rating``          the rating, only when the request gave one (no rating: an implicit
                    positive, such as a click or a play; the importer keeps it as positive)
``received_at``     when the service received it (ISO 8601, UTC)
``event_id``        a unique id (32 hex digits), for deduplication downstream
==================  ==========================================================================

Writes are group-committed: one writer thread takes every event queued since its last
write, appends them with one ``write`` per file and one ``fsync``, then acknowledges them
all, so throughput grows with load while each event waits for at most one fsync in flight.
A crash can leave a torn last line (never acknowledged); :func:`read_log` drops it and
says so. Any other unreadable line is an error: the log is not silently truncated. Delivery
is at least once: a client that retries should send the event's own ``timestamp``, and
:func:`read_log` counts events identical in user, item, timestamp and rating once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from smlrec.data.periods import PERIOD_ID_FORMAT, parse_period, period_start
from smlrec.errors import DataError, StorageError
from smlrec.faults import failpoint

log = logging.getLogger("smlrec.feedback")

LOG_DIR = "feedback"
"""The log's folder under a data store, its default root."""
FILE_GLOB = "events-*.jsonl"


def take_batch(q: queue.SimpleQueue, limit: int | None = None,
               size: Callable[[Any], int] = lambda _: 1) -> tuple[list[Any], bool]:
    """For a thread that group-commits what others queue: wait for one item, then take
    every item already queued, up to ``limit`` in total ``size``. Returns the items and
    whether the close mark (``None``) was taken (then nothing follows it)."""
    first = q.get()
    if first is None:
        return [], True
    batch, n = [first], size(first)
    while limit is None or n < limit:
        try:
            more = q.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return batch, True
        batch.append(more)
        n += size(more)
    return batch, False


@dataclass(frozen=True)
class Event:
    """One feedback event, validated by the caller (the API's schema)."""

    user_id: str
    item_id: str
    timestamp: float
    """Unix time in seconds (UTC)."""
    rating: float | None = None


def iso(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with microseconds, ``2026-12-04T08:00:00.000000Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PeriodNamer:
    """The period id (``YYYY-MM-DD``) of a Unix time, for a period spec. Periods are whole
    UTC days, so each day's period is computed once with :func:`period_start` and cached."""

    def __init__(self, spec: str):
        parse_period(spec)
        self.spec = spec
        self._by_day: dict[int, str] = {}

    def __call__(self, seconds: float) -> str:
        day = int(seconds // 86_400)
        pid = self._by_day.get(day)
        if pid is None:
            start = period_start(pd.Timestamp(day * 86_400, unit="s", tz="UTC"), self.spec)
            pid = self._by_day[day] = start.strftime(PERIOD_ID_FORMAT)
        return pid


class FeedbackLog:
    """Append-only, fsynced JSON-lines log of feedback events, one file per process and period.

    ``append(events)`` returns a future that completes once the events are durable (or fails
    with :class:`StorageError`); it is safe from any thread. Only a local filesystem is
    supported: durability needs ``fsync``, which object stores do not offer (ship the
    folders to one after the period closes).
    """

    def __init__(self, root: str | Path, period_spec: str, *, name: str | None = None,
                 max_batch: int = 10_000):
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            raise StorageError(f"{root}: the feedback log needs a local folder (it fsyncs "
                               "every write); object stores cannot give that guarantee")
        self.root = Path(root.removeprefix("file://"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.period = PeriodNamer(period_spec)
        self.name = name or (f"events-{socket.gethostname()}-{os.getpid()}-"
                             f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.jsonl")
        self.max_batch = max_batch
        self._files: dict[str, int] = {}
        self._queue: queue.SimpleQueue[tuple[list[bytes], list[str], Future] | None] = (
            queue.SimpleQueue())
        self.written = 0
        self.commits = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="feedback-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ writing

    def encode(self, events: Sequence[Event], received: float | None = None
               ) -> tuple[list[bytes], list[str]]:
        """Each event's JSON line and its period id."""
        now = time.time() if received is None else received
        got = iso(now)
        lines, periods = [], []
        for e in events:
            obj: dict[str, Any] = {"user_id": e.user_id, "item_id": e.item_id,
                                   "timestamp": iso(e.timestamp)}
            if e.rating is not None:
                obj["rating"] = e.rating
            obj["received_at"] = got
            obj["event_id"] = uuid.uuid4().hex
            lines.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
                         + b"\n")
            periods.append(self.period(e.timestamp))
        return lines, periods

    def append(self, events: Sequence[Event]) -> Future:
        """Queue ``events`` for the next group commit; the future's result is the number
        written, set once they are fsynced."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(StorageError("the feedback log is closed"))
            return fut
        if not events:
            fut.set_result(0)
            return fut
        lines, periods = self.encode(events)
        self._queue.put((lines, periods, fut))
        return fut

    def path_of(self, period_id: str) -> Path:
        return self.root / f"period={period_id}" / self.name

    def _fd(self, period_id: str) -> int:
        fd = self._files.get(period_id)
        if fd is None:
            path = self.path_of(period_id)
            new_dir = not path.parent.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # Make the new file's (and folder's) name durable too, not just its bytes.
            for folder in (path.parent, path.parent.parent) if new_dir else (path.parent,):
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._files[period_id] = fd
        return fd

    def _commit(self, batch: list[tuple[list[bytes], list[str], Future]]) -> None:
        by_period: dict[str, list[bytes]] = {}
        for lines, periods, _ in batch:
            for line, pid in zip(lines, periods, strict=True):
                by_period.setdefault(pid, []).append(line)
        try:
            for pid, lines in by_period.items():
                fd = self._fd(pid)
                data = b"".join(lines)
                failpoint("feedback.write", str(self.path_of(pid)))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
        except OSError as exc:
            error = StorageError(f"{self.root}: feedback could not be written "
                                 f"({exc.strerror or exc}); the events were not acknowledged")
            for *_, fut in batch:
                fut.set_exception(error)
            return
        n = sum(len(lines) for lines, _, _ in batch)
        self.written += n
        self.commits += 1
        for lines, _, fut in batch:
            fut.set_result(len(lines))

    def _run(self) -> None:
        while True:
            batch, stop = take_batch(self._queue, self.max_batch, lambda item: len(item[0]))
            if batch:
                self._commit(batch)
            if stop:
                return

    def close(self) -> None:
        """Write what is queued, then close the files."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "file": self.name, "period_spec": self.period.spec,
                "events_written": self.written, "commits": self.commits}


# ---------------------------------------------------------------------- reading


def is_log_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder of feedback log files (one period's, or a root)."""
    p = Path(str(path).removeprefix("file://"))
    return p.is_dir() and any(p.rglob(FILE_GLOB))


def _read_file(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        problems.append(f"{path.name}: dropped a torn last line of {len(tail)} bytes (a write "
                        "cut by a crash, never acknowledged)")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(str(path), f"line {n} is not JSON ({exc}); the log is damaged "
                            "(only a torn last line is expected after a crash)") from exc
        if not isinstance(row, dict):
            raise DataError(str(path), f"line {n} is not a JSON object")
        rows.append(row)
    return rows


def log_files(path: str | Path) -> list[Path]:
    """The log files under ``path`` (a period's folder or the root), in a stable order."""
    return sorted(Path(str(path).removeprefix("file://")).rglob(FILE_GLOB))


def read_log(path: str | Path, problems: list[str] | None = None) -> pd.DataFrame:
    """Every event under ``path`` as a raw frame (the columns as logged, values as read),
    in time order; ``problems`` receives notes such as a dropped torn line."""
    notes: list[str] = [] if problems is None else problems
    files = log_files(path)
    if not files:
        raise DataError(str(path), f"no feedback log files ({FILE_GLOB}) in this folder")
    rows = [row for f in files for row in _read_file(f, notes)]
    if not rows:
        raise DataError(str(path), "the feedback log holds no events")
    frame = pd.DataFrame.from_records(rows)
    key = [c for c in ("user_id", "item_id", "timestamp", "rating") if c in frame.columns]
    repeats = frame.duplicated(subset=key)
    if repeats.any():  # a client's retry of an event it sent with its own timestamp
        notes.append(f"{int(repeats.sum())} repeated events (same user, item, timestamp and "
                     "rating: a client's retries) counted once")
        frame = frame[~repeats]
    for note in notes:
        log.warning("feedback log %s: %s", path, note)
    if "timestamp" in frame.columns:
        frame = frame.sort_values("timestamp", kind="stable", ignore_index=True)
    return frame


def periods_in(root: str | Path) -> list[str]:
    """The period ids with a log folder under ``root``, oldest first."""
    base = Path(str(root).removeprefix("file://"))
    return sorted(p.name.removeprefix("period=") for p in base.glob("period=*") if p.is_dir())


def count_events(path: str | Path) -> int:
    """Complete lines under ``path`` (a torn tail not counted)."""
    return sum(f.read_bytes().count(b"\n") for f in log_files(path))
