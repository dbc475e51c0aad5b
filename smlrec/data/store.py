"""The interaction store: Parquet files partitioned by period, on any fsspec filesystem.

Layout under a dataset root (a local path or an fsspec URL such as ``memory://x`` or
``s3://bucket/x``)::

    <root>/dataset.json                                   name, period spec, counts, sources
    <root>/interactions/period=YYYY-MM-DD/part-0.parquet   one file per period
    <root>/side/<name>.parquet                            side tables ("users", "items")

Every file is written under a temporary name in its final folder and then moved into place,
so a crash never leaves half a file where a reader looks. The ``period`` column is not stored
inside the files: it is the partition folder's name and is added back on reading.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from smlrec.data.periods import parse_period
from smlrec.errors import DataError
from smlrec.io import atomic_write, url_fs
from smlrec.schema import ITEM, PERIOD, RATING, REQUIRED, TS, USER

INTERACTIONS_DIR = "interactions"
SIDE_DIR = "side"
INFO_FILE = "dataset.json"
PART_FILE = "part-0.parquet"
_PERIOD_ID = re.compile(r"\d{4}-\d{2}-\d{2}")
_PARTITION = re.compile(rf"period=({_PERIOD_ID.pattern})")
_SIDE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _fs(root: str) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem (no listings cache: ``smlrec.io.url_fs``) and the path inside it
    for a root path or URL."""
    fs, path = url_fs(root)
    return fs, path.rstrip("/")


def _write_parquet(fs: AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write ``table`` to ``path`` atomically."""
    atomic_write(fs, path, lambda f: pq.write_table(table, f))


def _interaction_table(df: pd.DataFrame) -> pa.Table:
    """Convert one period of a canonical frame to an Arrow table with the stored schema."""
    fields = [
        pa.field(USER, pa.string(), nullable=False),
        pa.field(ITEM, pa.string(), nullable=False),
        pa.field(TS, pa.timestamp("ns", tz="UTC"), nullable=False),
    ]
    if RATING in df.columns:
        fields.append(pa.field(RATING, pa.float32()))
    schema = pa.schema(fields)
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def _partition_dir(path: str, pid: str) -> str:
    return f"{path}/{INTERACTIONS_DIR}/period={pid}"


def _check_frame(df: pd.DataFrame, root: str) -> None:
    """Raise ``DataError`` unless ``df`` is a non-empty canonical frame with periods."""
    missing = [c for c in (*REQUIRED, PERIOD) if c not in df.columns]
    if missing:
        raise DataError(root, f"cannot store a frame without column(s) {', '.join(missing)}")
    if df.empty:
        raise DataError(root, "no rows to store")


def write_interactions(
    df: pd.DataFrame, root: str, *, overwrite: bool = True, replace_all: bool = False
) -> list[str]:
    """Store a canonical interactions frame, one Parquet file per period; return the period ids.

    A period already stored is replaced whole (or, with ``overwrite=False``, is an error).
    With ``replace_all=True`` stored periods absent from ``df`` are deleted once the new ones
    are written, so the store holds exactly ``df``.
    """
    root = str(root)
    _check_frame(df, root)
    fs, path = _fs(root)
    pids = sorted(df[PERIOD].unique())
    if not overwrite:
        clash = sorted(set(pids) & set(list_periods(root)))
        if clash:
            raise DataError(root, f"period {clash[0]} is already stored (pass overwrite=True)")
    for pid, part in df.groupby(PERIOD, sort=True):
        folder = _partition_dir(path, str(pid))
        _write_parquet(fs, f"{folder}/{PART_FILE}", _interaction_table(part))
        for stale in fs.ls(folder, detail=False):
            if stale.rstrip("/").rpartition("/")[2] != PART_FILE:
                fs.rm(stale, recursive=True)
    if replace_all:
        delete_periods(root, sorted(set(list_periods(root)) - set(pids)))
    return [str(p) for p in pids]


def delete_periods(root: str, period_ids: Iterable[str]) -> None:
    """Delete the stored partitions of ``period_ids`` (missing ones are ignored)."""
    fs, path = _fs(root)
    for pid in period_ids:
        folder = _partition_dir(path, pid)
        if fs.exists(folder):
            fs.rm(folder, recursive=True)


def list_periods(root: str) -> list[str]:
    """Return the sorted ids of the periods stored under ``root`` (empty if none)."""
    fs, path = _fs(root)
    folder = f"{path}/{INTERACTIONS_DIR}"
    if not fs.isdir(folder):
        return []
    names = (p.rstrip("/").rpartition("/")[2] for p in fs.ls(folder, detail=False))
    matches = (_PARTITION.fullmatch(n) for n in names)
    return sorted(m.group(1) for m in matches if m is not None)


def period_row_counts(root: str) -> dict[str, int]:
    """Return ``{period id: row count}`` from the Parquet footers, without reading the data."""
    fs, path = _fs(root)
    counts = {}
    for pid in list_periods(root):
        with fs.open(f"{_partition_dir(path, pid)}/{PART_FILE}", "rb") as f:
            counts[pid] = pq.ParquetFile(f).metadata.num_rows
    return counts


def read_period(root: str, period_id: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one stored period as a canonical frame (``DataError`` if it has no rows).

    ``columns`` restricts the columns read from the file (``period`` is always added).
    """
    root = str(root)
    if _PERIOD_ID.fullmatch(str(period_id)) is None:
        raise DataError(root, f"invalid period id {period_id!r}: expected YYYY-MM-DD")
    fs, path = _fs(root)
    file = f"{_partition_dir(path, period_id)}/{PART_FILE}"
    if not fs.exists(file):
        raise DataError(root, f"period {period_id} has no rows{_stored_hint(root)}")
    with fs.open(file, "rb") as f:
        table = pq.read_table(f, columns=columns)
    if table.num_rows == 0:
        raise DataError(root, f"period {period_id} has no rows{_stored_hint(root)}")
    df = table.to_pandas()
    df[PERIOD] = period_id
    return df


def _stored_hint(root: str) -> str:
    """Describe which periods are stored, for error messages."""
    pids = list_periods(root)
    if not pids:
        return " (no periods are stored there)"
    return f" (stored: {len(pids)} periods from {pids[0]} to {pids[-1]})"


def canonical_order(frame: pd.DataFrame, ts: str = TS) -> pd.DataFrame:
    """Rows in one fixed order, by (timestamp, user, item): whatever order a reader or a
    feature store hands rows back in, the same data trains the same model (vocabulary rows
    are assigned in this order)."""
    return frame.sort_values([ts, USER, ITEM], kind="stable", ignore_index=True)


def read_periods(
    root: str, period_ids: Iterable[str] | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """Read several periods (all stored ones by default) as one frame sorted by timestamp."""
    root = str(root)
    pids = list_periods(root) if period_ids is None else list(period_ids)
    if not pids:
        raise DataError(root, "no interactions are stored here (run `smlrec data fetch`)")
    if columns is not None and TS not in columns:
        columns = [*columns, TS]
    frames = [read_period(root, pid, columns) for pid in pids]
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(TS, kind="stable", ignore_index=True)


def _check_side_name(name: str) -> None:
    if _SIDE_NAME.fullmatch(name) is None:
        raise ValueError(f"invalid side table name {name!r}: use lowercase letters, digits, _")


def write_side_table(df: pd.DataFrame, root: str, name: str) -> None:
    """Store a side table (e.g. ``"users"`` or ``"items"``) as ``<root>/side/<name>.parquet``."""
    _check_side_name(name)
    fs, path = _fs(root)
    table = pa.Table.from_pandas(df, preserve_index=False)
    _write_parquet(fs, f"{path}/{SIDE_DIR}/{name}.parquet", table)


def read_side_table(root: str, name: str) -> pd.DataFrame:
    """Read a side table stored with :func:`write_side_table` (``DataError`` if absent)."""
    _check_side_name(name)
    fs, path = _fs(root)
    file = f"{path}/{SIDE_DIR}/{name}.parquet"
    if not fs.exists(file):
        raise DataError(root, f"side table {name!r} is not stored here")
    with fs.open(file, "rb") as f:
        return pq.read_table(f).to_pandas()


def file_sha256(url: str) -> str:
    """Return the hex sha256 of a file at a local path or fsspec URL; of a folder (a
    feedback log's), the sha256 of its files' names and contents in name order."""
    digest = hashlib.sha256()
    fs, path = _fs(url)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for name in files:
        if len(files) > 1 or name != path:
            digest.update(name[len(path):].encode() + b"\0")
        with fs.open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_dataset_info(
    root: str,
    name: str,
    period: str,
    *,
    sources: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the dataset's counts from the store and write ``<root>/dataset.json``.

    ``sources`` lists where the data came from (``{"path": ..., "sha256": ...}``); ``extra``
    holds any other JSON-able facts (e.g. generator parameters). Returns the written info.
    """
    parse_period(period)
    frame = read_periods(root, columns=[USER, ITEM])
    counts = period_row_counts(root)
    info: dict[str, Any] = {
        "name": name,
        "period": period,
        "n_rows": len(frame),
        "n_users": int(frame[USER].nunique()),
        "n_items": int(frame[ITEM].nunique()),
        "periods": list(counts),
        "rows_per_period": counts,
        "sources": sources or [],
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    fs, path = _fs(root)
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(fs, f"{path}/{INFO_FILE}", lambda f: f.write(text.encode()))
    return info


def has_dataset(root: str) -> bool:
    """Return whether ``root`` holds a ``dataset.json``."""
    fs, path = _fs(root)
    return bool(fs.exists(f"{path}/{INFO_FILE}"))


def read_dataset_info(root: str) -> dict[str, Any]:
    """Read ``<root>/dataset.json`` (``DataError`` if the root holds no dataset)."""
    fs, path = _fs(root)
    file = f"{path}/{INFO_FILE}"
    if not fs.exists(file):
        raise DataError(root, f"no {INFO_FILE} here: not a dataset root (run `smlrec data fetch`)")
    with fs.open(file, "rb") as f:
        try:
            return json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{root}/{INFO_FILE}", f"not valid JSON: {exc}") from exc


def summarize(root: str, info: dict[str, Any]) -> dict[str, Any]:
    """Return the short summary of a dataset that commands print and tests check."""
    periods = info["periods"]
    return {
        "name": info["name"],
        "root": str(root),
        "period": info["period"],
        "n_rows": info["n_rows"],
        "n_users": info["n_users"],
        "n_items": info["n_items"],
        "n_periods": len(periods),
        "first_period": periods[0] if periods else None,
        "last_period": periods[-1] if periods else None,
    }
