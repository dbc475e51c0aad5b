"""Shared fixtures: temporary data only."""

from __future__ import annotations

from pathlib import Path

import pytest

from smlrec.data import default_cache_dir
from smlrec.data.movielens import fetch_movielens_100k
from smlrec.device import configure_threads

configure_threads()


@pytest.fixture(scope="session")
def ml100k_cache() -> Path:
    """The download cache for the recbole wheel ($SMLREC_CACHE or ~/.cache/smlrec), reused."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def ml100k_root(tmp_path_factory: pytest.TempPathFactory, ml100k_cache: Path) -> Path:
    """MovieLens-100k fetched once per test session into a temporary store (weekly periods)."""
    root = tmp_path_factory.mktemp("ml-100k")
    fetch_movielens_100k(root, cache_dir=ml100k_cache)
    return root


def tree_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path (byte-for-byte comparisons)."""
    import hashlib

    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out




class Reliability:
    """Counters the reliability tests report. A plain test run keeps them to itself (it
    leaves the tree as it found it); ``make reliability`` sets ``SMLREC_RELIABILITY_JSON``
    and they are merged into that file (benchmarks/results/reliability.json) at the end of
    the session (keys not touched by this session keep their last values)."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] = int(self.values.get(key, 0)) + n  # type: ignore[call-overload]

    def set(self, key: str, value: object) -> None:
        self.values[key] = value

    def write(self, path: Path | None = None) -> None:
        import json
        import os
        import time

        target = path or os.environ.get("SMLREC_RELIABILITY_JSON")
        if not self.values or not target:
            return
        path = Path(target)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {**old, **self.values,
               "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "written_by": "the test suite (make reliability); make soak overwrites load_*"}
        path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def reliability():
    """The session's reliability counters (see :class:`Reliability`)."""
    rec = Reliability()
    yield rec
    rec.write()
