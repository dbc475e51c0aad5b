"""Per-event freshness in the API: feedback events move their user's embedding between runs.

Items and the transfer keep their daily cadence; a user's vector does not have to wait. After
``POST /feedback`` has made its events durable (:mod:`smlrec.feedback`), it hands the
positive ones to a :class:`FreshUpdater`. One thread per worker takes everything queued since
its last pass, reads those users' states, applies the run configuration's update rule
(:class:`smlrec.online.UserUpdate`: a few gradient steps on the user's row with the item
table fixed, or a decayed mean of the items' embeddings), and writes the new states back.

A user's state (:class:`UserState`) is the vector, the model version it belongs to (a vector
is only valid against the item table it was computed with: after a hot swap the new model's
row, which has learned the same events from the daily data, takes over), the recent items
with the events included, and how many events moved it. States live in the Feast online
store, written through the ``user_fresh_push`` push source, so every worker and a restarted
service read them; without Feast, in this process's memory only (one worker).

Two workers updating one user each start from the state they know (their own last write,
else the online store's) and the last write wins; a user's events normally reach one
worker in order, so this is rare and costs at most an event's update to the vector, never
the event itself (it is in the log, and in the next daily model).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import pandas as pd
import torch

from serving.batching import by_model
from serving.model import ServedModel
from smlrec.features import SEPARATOR
from smlrec.feedback import Event, take_batch
from smlrec.online import UserUpdate, start_vector, update_users

log = logging.getLogger("smlrec.serving.fresh")

PUSH_SOURCE = "user_fresh_push"
FIELDS = ("embedding", "model_version", "recent_items", "events")


@dataclass(frozen=True)
class _Job:
    """One user's update: the events' item rows, the earlier ones (oldest first), the
    vector to move (None: a user the model does not know, without a state) and the daily
    row (None: not in the model)."""

    user: str
    rows: list[int]
    earlier: list[int]
    query: torch.Tensor | None
    daily: torch.Tensor | None


@dataclass(frozen=True)
class UserState:
    """What the API knows of a user beyond the daily model."""

    version: str = ""
    """The model version ``vector`` belongs to ('' when there is none)."""
    vector: torch.Tensor | None = None
    recent: tuple[str, ...] = ()
    """Item ids, newest first, the feedback events included."""
    events: int = 0

    def vector_for(self, model: ServedModel) -> torch.Tensor | None:
        """The updated vector when it belongs to ``model``'s version, else None."""
        if self.vector is None or self.version != model.info.version:
            return None
        return self.vector


class OnlineStore(Protocol):
    """The Feast side the states need (``serving.service.OnlineFeatures``)."""

    can_push: bool
    """Whether the registry has the ``user_fresh`` view (else states stay in memory)."""

    def user_states(self, user_ids: Sequence[str]) -> list[tuple[UserState | None, list[str]]]:
        ...

    def push_states(self, frame: pd.DataFrame) -> None:
        ...


def merge_recent(new: Sequence[str], *older: Sequence[str], limit: int) -> tuple[str, ...]:
    """Recent items, newest first, without repeats, at most ``limit``."""
    out: dict[str, None] = {}
    for seq in (new, *older):
        for v in seq:
            if v not in out:
                out[v] = None
                if len(out) == limit:
                    return tuple(out)
    return tuple(out)


class UserStates:
    """Users' fresh states: the online store when there is one (shared by every worker),
    and this process's own recent writes (a bounded cache, the only copy without Feast)."""

    def __init__(self, online: OnlineStore | None, max_local: int = 200_000):
        self.online = online
        self.max_local = max_local
        self._local: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, user_ids: Sequence[str]) -> list[tuple[UserState | None, list[str]]]:
        """Each user's fresh state (None: no event since the daily run) and daily recent
        items (from Feast's ``recent_items`` view; [] without Feast)."""
        if self.online is None:
            with self._lock:
                return [(self._local.get(u), []) for u in user_ids]
        out = self.online.user_states(user_ids)
        if not self.online.can_push:  # the store has daily recent items only
            with self._lock:
                out = [(self._local.get(u), daily) for u, (_, daily) in zip(user_ids, out,
                                                                            strict=True)]
        return out

    def local(self, user_id: str) -> UserState | None:
        with self._lock:
            return self._local.get(user_id)

    def read_for_update(self, user_ids: Sequence[str]
                        ) -> list[tuple[UserState | None, list[str]]]:
        """:meth:`read`, but a state this process wrote itself is taken from memory (it
        merged the daily recent items when it was made): one online read fewer per event
        for the users a worker keeps seeing. A state another worker wrote since is then
        not seen: the last write wins, as with two updates at the same instant."""
        with self._lock:
            mine = {u: self._local[u] for u in user_ids if u in self._local}
        rest = [u for u in user_ids if u not in mine]
        read = dict(zip(rest, self.read(rest), strict=True)) if rest else {}
        return [(mine[u], []) if u in mine else read[u] for u in user_ids]

    def write(self, states: dict[str, UserState]) -> None:
        """Store new states (pushed to Feast first, so a failed push leaves nothing newer
        in this worker than in the others)."""
        if self.online is not None and self.online.can_push and states:
            now = datetime.now(UTC)
            self.online.push_states(pd.DataFrame({
                "user_id": list(states),
                "embedding": [s.vector.tolist() if s.vector is not None else []
                              for s in states.values()],
                "model_version": [s.version for s in states.values()],
                "recent_items": [SEPARATOR.join(s.recent) for s in states.values()],
                "events": [s.events for s in states.values()],
                "event_timestamp": [now] * len(states)}))
        with self._lock:
            for user, state in states.items():
                self._local[user] = state
                self._local.move_to_end(user)
            while len(self._local) > self.max_local:
                self._local.popitem(last=False)


class FreshUpdater:
    """Applies feedback events to their users' states, in a thread of its own.

    ``model_for(user_id)`` names the model that serves the user (production, or the
    candidate for the canary share): the vector is updated in that model's space.
    """

    def __init__(self, rule: UserUpdate, states: UserStates,
                 model_for: Callable[[str], ServedModel | None], min_rating: float = 4.0,
                 max_queued: int = 100_000, max_items: int = 200):
        self.rule = rule
        self.states = states
        self.model_for = model_for
        self.min_rating = min_rating
        self.applied = 0
        self.batches = 0
        self.last_error = ""
        self.last_batch_ms = 0.0
        self.lag_ms = 0.0
        self.max_queued = max_queued
        # The recent items a state keeps: the rule's history, capped for the online store
        # (each state is one row read and written per event).
        self.history = min(rule.history, max_items)
        self.queued = 0
        self.dropped = 0
        self._count_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[float, list[Event]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fresh-updater", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.rule.method != "none"

    def positives(self, events: Sequence[Event]) -> list[Event]:
        """The events that say the user liked the item (no rating, or one at or above the
        positive threshold): the ones that move the user."""
        return [e for e in events if e.rating is None or e.rating >= self.min_rating]

    def submit(self, events: Sequence[Event]) -> int:
        """Queue the positive events; returns how many. Beyond ``max_queued`` events waiting
        (the update path far behind the event rate) new ones are not queued: they are in
        the log, and only their users' per-event updates are skipped (counted)."""
        good = self.positives(events)
        if not good:
            return 0
        with self._count_lock:
            if self.queued + len(good) > self.max_queued:
                self.dropped += len(good)
                return 0
            self.queued += len(good)
        self._queue.put((time.perf_counter(), good))
        return len(good)

    def _run(self) -> None:
        while True:
            batch, stop = take_batch(self._queue)
            if batch:
                self._apply_logged(batch)
            if stop:
                return

    def _apply_logged(self, batch: list[tuple[float, list[Event]]]) -> None:
        start = time.perf_counter()
        events = [e for _, chunk in batch for e in chunk]
        try:
            self.apply(events)
        except Exception as exc:  # noqa: BLE001 - the events are logged; the next run has them
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("per-event user update failed for %d events: %s", len(events),
                      self.last_error)
            return
        finally:
            with self._count_lock:
                self.queued -= len(events)
        end = time.perf_counter()
        self.applied += len(events)
        self.batches += 1
        self.last_batch_ms = (end - start) * 1e3
        self.lag_ms = (end - batch[0][0]) * 1e3

    def apply(self, events: Sequence[Event]) -> dict[str, UserState]:
        """Apply ``events`` (positives, in arrival order) now; returns the new states. The
        users served by one model move in one batched update (:func:`update_users`)."""
        by_user: dict[str, list[str]] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e.item_id)
        users = list(by_user)
        jobs: list[tuple[ServedModel, _Job]] = []
        new: dict[str, UserState] = {}
        states = self.states.read_for_update(users)
        for user, (state, daily_recent) in zip(users, states, strict=True):
            items = by_user[user]
            old = state or UserState()
            new[user] = UserState("", None, merge_recent(
                items[::-1], old.recent, daily_recent, limit=self.history),
                old.events + len(items))
            model = self.model_for(user)
            if model is not None and self.enabled:
                jobs.append((model, self._job(model, user, old, items, daily_recent)))
        moved = by_model(jobs, lambda model, js: self._move(model, [j for _, j in js]))
        for (model, job), vector in zip(jobs, moved, strict=True):
            if vector is not None:
                new[job.user] = replace(new[job.user], version=model.info.version,
                                        vector=vector)
        self.states.write(new)
        return new

    def _job(self, model: ServedModel, user: str, old: UserState, items: list[str],
             daily_recent: Sequence[str]) -> _Job:
        rows, _ = model.item_rows(items)
        known = [v for v in merge_recent(old.recent, daily_recent, limit=self.history)
                 if v not in items]
        earlier, _ = model.item_rows(known[::-1])  # oldest first
        row = model.user_row(user)
        daily = model.user_vector(row) if row is not None else None
        query = old.vector_for(model)
        return _Job(user, rows, earlier, query if query is not None else daily, daily)

    def _move(self, model: ServedModel, jobs: list[_Job]) -> list[torch.Tensor | None]:
        """The users' vectors after their events, as the replay moves them: from the updated
        vector (else the model's row; a user the model does not know starts from their
        items' mean), pulled toward the model's row (unknown users: their items' mean)."""
        out: list[torch.Tensor | None] = [j.query for j in jobs]
        moving = [i for i, j in enumerate(jobs) if j.rows]
        if not moving:
            return out
        item = model.item
        anchors = [jobs[i].daily if jobs[i].daily is not None else start_vector(
            item, [*jobs[i].earlier, *jobs[i].rows], model.prior_column) for i in moving]
        moved = update_users([jobs[i].query for i in moving], item,
                             [jobs[i].rows for i in moving], self.rule, anchors=anchors,
                             recents=[jobs[i].earlier for i in moving],
                             prior_column=model.prior_column).detach().to("cpu", torch.float32)
        for n, i in enumerate(moving):
            out[i] = moved[n]
        return out

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def describe(self) -> dict[str, Any]:
        online = self.states.online
        return {"rule": self.rule.model_dump(), "items_kept": self.history,
                "store": "feast" if online and online.can_push
                else "process memory (one worker only)", "events_applied": self.applied,
                "batches": self.batches, "last_batch_ms": round(self.last_batch_ms, 2),
                "lag_ms": round(self.lag_ms, 2), "queued": self.queued,
                "skipped_backlog_full": self.dropped,
                "last_error": self.last_error}
