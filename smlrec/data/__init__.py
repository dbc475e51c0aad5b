"""The data layer: periods, importing, the Parquet store, MovieLens-100k, synthetic streams.

Modules: :mod:`~smlrec.data.periods`, :mod:`~smlrec.data.importer`,
:mod:`~smlrec.data.store`, :mod:`~smlrec.data.movielens`, :mod:`~smlrec.data.synthetic`,
and :mod:`~smlrec.data.cli` (the ``smlrec data`` commands).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root(name: str) -> str:
    """Return where dataset ``name`` lives by default: ``$SMLREC_DATA/<name>`` or ``data/<name>``.

    ``$SMLREC_DATA`` is a folder (or fsspec URL) holding one sub-folder per dataset.
    """
    base = os.environ.get("SMLREC_DATA") or "data"
    return f"{base.rstrip('/')}/{name}"


def default_cache_dir() -> Path:
    """Return the download cache folder: ``$SMLREC_CACHE`` or ``~/.cache/smlrec``."""
    cache = os.environ.get("SMLREC_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "smlrec"
