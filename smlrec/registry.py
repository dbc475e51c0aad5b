"""The state store: everything that outlives one daily run, addressed by one URI.

Layout (``state_uri`` is a local folder or any fsspec URL)::

    <state_uri>/
      periods/<period_id>/        a bundle: weights.safetensors, metadata.json,
                                  vocab_users.json, vocab_items.json, manifest.json
      pointers/production.json    which period serves; written atomically
      pointers/candidate.json     the newest W_t, not yet tested on the next period
      decisions.jsonl             every gate decision, in order (append-only)
      packages.jsonl              every model packaged for serving (stage, period, tag)
      LOCK                        held by the run in progress

A bundle is complete only once its manifest (written last, with the sha256 of every
file) exists; every load verifies the checksums. Pointers and the decision log are
replaced through a temporary file and a rename, so a crash leaves the old state or the
new one. Period ids are checked, so a parameter can never address a path outside the
store.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from smlrec.errors import IntegrityError, SmlrecError
from smlrec.io import (
    TMP_PREFIX,
    load_bundle,
    read_bytes,
    read_json,
    save_bundle,
    url_fs,
    verify_bundle,
    write_bytes_atomic,
    write_json_atomic,
)
from smlrec.vocab import Vocab

PERIOD_ID = re.compile(r"^\d{4}-\d{2}-\d{2}$")
POINTERS = ("production", "candidate")
CONFIG_FILE = "config.yaml"
STRATEGY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def served_keys(metadata: dict[str, Any], strategy: str | None) -> tuple[str, str]:
    """The tensors of a bundle that a strategy serves: ``serve.<strategy>.user`` / ``.item``
    in a period bundle of the daily run (it holds every challenger), ``w.user`` / ``w.item``
    in a bundle with a single model."""
    if metadata.get("challengers"):
        names = list(metadata["challengers"])
        name = strategy or names[0]
        if name not in names or not STRATEGY.match(name):
            raise SmlrecError(f"the bundle holds no strategy {name!r} (it holds "
                              f"{', '.join(names)})")
        return f"serve.{name}.user", f"serve.{name}.item"
    return "w.user", "w.item"


class StateLockedError(SmlrecError):
    """Another run holds the state store's lock."""


def check_period_id(period_id: str) -> str:
    """Period ids are dates, YYYY-MM-DD; anything else (``../x``, ``a/b``) is refused."""
    if not isinstance(period_id, str) or not PERIOD_ID.match(period_id):
        raise SmlrecError(f"invalid period id {period_id!r}: expected YYYY-MM-DD")
    return period_id


class StateStore:
    """Reads and writes the state of the daily pipeline under ``uri``."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = url_fs(self.uri)  # no listings cache: others write it

    # ---------------------------------------------------------------- bundles

    def period_uri(self, period_id: str) -> str:
        return f"{self.uri}/periods/{check_period_id(period_id)}"

    def save_period(self, period_id: str, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, Any], users: Vocab, items: Vocab) -> dict[str, str]:
        """Write the bundle of ``period_id`` (replacing an incomplete or older one)."""
        url = self.period_uri(period_id)
        manifest = f"{self.root}/periods/{period_id}/manifest.json"
        if self.fs.exists(manifest):
            self.fs.rm(manifest)  # the bundle is incomplete until its new manifest lands
        return save_bundle(url, tensors, {**metadata, "period": period_id},
                           {"vocab_users.json": users.to_json().encode(),
                            "vocab_items.json": items.to_json().encode()})

    def load_period(self, period_id: str, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Vocab, Vocab]:
        """Load a bundle after verifying every checksum (IntegrityError otherwise)."""
        tensors, meta, files = load_bundle(self.period_uri(period_id), device)
        return (tensors, meta, Vocab.from_json(files["vocab_users.json"].decode()),
                Vocab.from_json(files["vocab_items.json"].decode()))

    def has_period(self, period_id: str) -> bool:
        """Whether a complete bundle (one with a manifest) exists for ``period_id``."""
        return bool(self.fs.exists(f"{self.root}/periods/{check_period_id(period_id)}"
                                   "/manifest.json"))

    def periods(self) -> list[str]:
        """Period ids with a complete bundle, oldest first."""
        base = f"{self.root}/periods"
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if PERIOD_ID.match(n) and self.has_period(n))

    # ---------------------------------------------------------------- pointers

    def set_pointer(self, name: str, period_id: str | None, **info: Any) -> None:
        """Point ``production`` or ``candidate`` at a complete bundle (None clears it)."""
        if name not in POINTERS:
            raise ValueError(f"unknown pointer {name!r}")
        if period_id is not None and not self.has_period(period_id):
            raise IntegrityError(f"cannot point {name} at {period_id}: no complete bundle")
        write_json_atomic(f"{self.uri}/pointers/{name}.json",
                          {"period": period_id, "updated_at": _now(), **info})

    def get_pointer(self, name: str) -> str | None:
        """The period a pointer names, or None when it was never set."""
        return self.pointer_info(name).get("period")

    def pointer_info(self, name: str) -> dict[str, Any]:
        """The whole pointer record ({} when it was never set): ``period``, when it was
        updated and, for production, the ``strategy`` (challenger) that serves."""
        try:
            return dict(read_json(f"{self.uri}/pointers/{name}.json"))
        except FileNotFoundError:
            return {}

    # ---------------------------------------------------------------- run configuration

    def save_config(self, text: str) -> None:
        """Keep the run configuration (YAML) the store was bootstrapped with."""
        write_bytes_atomic(f"{self.uri}/{CONFIG_FILE}", text.encode())

    def config_text(self) -> str | None:
        """The run configuration's YAML, or None for a store made without one."""
        try:
            return read_bytes(f"{self.uri}/{CONFIG_FILE}").decode()
        except FileNotFoundError:
            return None

    # ---------------------------------------------------------------- decisions

    def append_decision(self, record: dict[str, Any]) -> None:
        """Append one record to decisions.jsonl (rewritten atomically; runs are serialised
        by the lock, so no append is lost)."""
        self._append("decisions.jsonl", record)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        """Append ``record``, stamped with ``recorded_at``, to the JSON-lines log ``name``."""
        url = f"{self.uri}/{name}"
        try:
            old = read_bytes(url)
        except FileNotFoundError:
            old = b""
        line = json.dumps({"recorded_at": _now(), **record}, sort_keys=True, default=str)
        write_bytes_atomic(url, old + line.encode() + b"\n")

    def decisions(self) -> list[dict[str, Any]]:
        return self._records("decisions.jsonl")

    def _records(self, name: str) -> list[dict[str, Any]]:
        try:
            text = read_bytes(f"{self.uri}/{name}").decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def record_package(self, record: dict[str, Any]) -> None:
        """Note a model packaged for serving (stage, period, strategy, its BentoML tag) in
        packages.jsonl, once per tag (rewritten atomically, like the decision log)."""
        if not any(p.get("tag") == record.get("tag") for p in self.packages()):
            self._append("packages.jsonl", record)

    def packages(self) -> list[dict[str, Any]]:
        """Every model packaged for serving, in order."""
        return self._records("packages.jsonl")

    def promotion_scores(self, period_id: str) -> dict[str, Any]:
        """The gate scores of the last decision that promoted ``period_id`` ({} if none)."""
        return dict(self.promotion(period_id).get("scores") or {})

    def last_decision(self) -> dict[str, Any]:
        """The newest gate decision, in brief: the period gated, the candidate, the decision,
        the best challenger, the reasons and when it was recorded ({} before the first)."""
        log = self.decisions()
        if not log:
            return {}
        return {k: log[-1].get(k) for k in ("period", "candidate", "decision", "best",
                                             "reasons", "recorded_at")}

    def promotion(self, period_id: str) -> dict[str, Any]:
        """The last decision that promoted ``period_id`` ({} if none)."""
        promoted = [d for d in self.decisions()
                    if d.get("candidate") == period_id and d.get("decision") == "promote"]
        return dict(promoted[-1]) if promoted else {}

    # ---------------------------------------------------------------- checks

    def check(self) -> list[str]:
        """Everything inconsistent in the store, as messages (empty: consistent).

        Every complete bundle must verify against its manifest, every pointer must be
        readable and name a complete bundle, and every line of the decision log must parse.
        Incomplete bundles (no manifest) and temporary files are what an interrupted write
        leaves; they are invisible to readers and are not problems.
        """
        problems = []
        for period in self.periods():
            try:
                verify_bundle(self.period_uri(period))
            except IntegrityError as exc:
                problems.append(str(exc))
        for name in POINTERS:
            try:
                pointer = read_json(f"{self.uri}/pointers/{name}.json")
            except FileNotFoundError:
                continue
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"pointers/{name}.json: unreadable ({exc})")
                continue
            period = pointer.get("period") if isinstance(pointer, dict) else None
            if period is not None and not self.has_period(period):
                problems.append(f"pointers/{name}.json names {period}, which has no complete "
                                "bundle")
        try:
            text = read_bytes(f"{self.uri}/decisions.jsonl").decode()
        except FileNotFoundError:
            text = ""
        for n, line in enumerate(text.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                problems.append(f"decisions.jsonl line {n}: not JSON")
        return problems

    def temporaries(self) -> list[str]:
        """Temporary files left by interrupted writes (safe to delete when no run is on)."""
        return sorted(p for p in self.fs.find(self.root)
                      if p.rpartition("/")[2].startswith(TMP_PREFIX))

    # ---------------------------------------------------------------- lock

    @contextmanager
    def lock(self, owner: str = "") -> Iterator[None]:
        """Hold the store's lock for one run; a second run is refused with a clear error.

        On a local store the lock file is created exclusively (O_EXCL). A lock left by a
        process that no longer runs on this host is taken over; any other lock is
        reported with who holds it and since when.
        """
        path = f"{self.root}/LOCK"
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                "owner": owner}
        self.fs.makedirs(self.root, exist_ok=True)
        if not self._try_create(path, info):
            held = self._read_lock(path)
            if held and held.get("host") == info["host"] and not _alive(held.get("pid")):
                self.fs.rm(path)
                if not self._try_create(path, info):
                    raise StateLockedError(f"{self.uri} is locked by another run")
            else:
                raise StateLockedError(
                    f"{self.uri} is locked by another run ({held}); wait for it to finish, "
                    f"or delete {path} if that run is known to be dead")
        try:
            yield
        finally:
            if self.fs.exists(path):
                self.fs.rm(path)

    def _try_create(self, path: str, info: dict) -> bool:
        data = json.dumps(info).encode()
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if "file" in protocols:
            # Write the content under a temporary name, then hard-link it to LOCK: the link
            # fails if LOCK exists, and a LOCK that exists always has its content (a crash
            # between creating and writing cannot leave an empty, unowned lock).
            tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if self.fs.exists(path):  # object stores: best effort (no atomic create)
            return False
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        return True

    def _read_lock(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as fh:
                return json.loads(fh.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
