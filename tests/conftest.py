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
