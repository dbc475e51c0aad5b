"""Shared fixtures: temporary data only."""

from __future__ import annotations

import os
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


# ----------------------------------------------------------------------------- a clean tree
# A test run must leave the working tree as it found it (figures files are written by
# benchmarks and make targets, never by `make test`): the session fails if
# `git status --porcelain` differs at the end from what it was at the start.

_ROOT = Path(__file__).resolve().parent.parent


def _git_status() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                             cwd=_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STATUS] = _git_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_STATUS, None)
    after = _git_status()
    if before is None or after is None or before == after:
        return
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    asked = os.environ.get("SMLREC_RELIABILITY_JSON")  # `make reliability` writes this one
    if asked:
        changed = [line for line in changed if Path(asked).name not in line]
    if not changed:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("the test session changed the working tree (git status "
                            "--porcelain):", red=True)
        for line in changed[:20]:
            reporter.write_line(f"  {line}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_STATUS = pytest.StashKey[str | None]()
