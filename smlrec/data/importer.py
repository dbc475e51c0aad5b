"""Read interaction logs (CSV, TSV, RecBole ``.inter``, Parquet) into the canonical frame.

Every problem with the input is reported as one :class:`~smlrec.errors.DataError` that names
the file and the problem, never as a parser traceback.
"""

from __future__ import annotations

import re
import warnings
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from smlrec.data.periods import assign_periods, parse_period
from smlrec.data.store import (
    file_sha256,
    has_dataset,
    read_dataset_info,
    summarize,
    write_dataset_info,
    write_interactions,
)
from smlrec.errors import DataError
from smlrec.schema import ITEM, RATING, TS, USER

TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".inter": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_NS_PER_UNIT = {"s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0}
TIME_UNITS = tuple(_NS_PER_UNIT)
# RecBole atomic files type their headers: ``user_id:token``, ``rating:float``...
_TYPED_HEADER = re.compile(r"(.+):(token|token_seq|float|float_seq)")
_FLAG = {USER: "--user-col", ITEM: "--item-col", TS: "--time-col", RATING: "--rating-col"}


def _suffix(path: str) -> str:
    """Return the format suffix of ``path``, looking through a compression suffix."""
    suffixes = [s.lower() for s in PurePosixPath(str(path).split("?")[0]).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _strip_typed_headers(df: pd.DataFrame) -> pd.DataFrame:
    """Rename RecBole typed headers (``user_id:token``) to their plain names."""
    names = {c: m.group(1) for c in df.columns if (m := _TYPED_HEADER.fullmatch(str(c)))}
    return df.rename(columns=names) if names else df


def _read_text(path: str, sep: str) -> pd.DataFrame:
    """Read a delimited text file with every column as text (``normalize`` types them)."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f, warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # rows longer than header
            df = pd.read_csv(f, sep=sep, dtype=str, encoding="utf-8", index_col=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(path, "empty file (no rows)") from exc
    except UnicodeDecodeError as exc:
        raise DataError(
            path, f"non-UTF-8 bytes at byte {exc.start}: not a UTF-8 text table"
        ) from exc
    except pd.errors.ParserWarning as exc:
        raise DataError(
            path, "file is not valid CSV: rows have more fields than the header"
        ) from exc
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(path, f"file is not valid CSV: {_first_line(exc)}") from exc
    return _strip_typed_headers(df)


def _read_parquet(path: str) -> pd.DataFrame:
    """Read a Parquet file."""
    try:
        with fsspec.open(path, "rb") as f:
            return pd.read_parquet(f)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataError(path, f"file is not valid Parquet: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_table(path: str, *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/``.inter`` or Parquet file from a local path or any fsspec URL.

    The format comes from the suffix (``.csv``, ``.tsv``, ``.inter``, ``.parquet``, ``.pq``;
    text files may be compressed, e.g. ``.csv.gz``). ``sep`` overrides the text separator
    (and lets any other suffix be read as text). Text columns are all read as strings;
    :func:`normalize` converts them.
    """
    path = str(path)
    suffix = _suffix(path)
    try:
        if suffix in PARQUET_SUFFIXES:
            return _read_parquet(path)
        if suffix in TEXT_SEPARATORS or sep is not None:
            return _read_text(path, sep or TEXT_SEPARATORS[suffix])
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    known = ", ".join([*TEXT_SEPARATORS, *PARQUET_SUFFIXES])
    raise DataError(path, f"unknown file type {suffix or '(no suffix)'!r} (expected {known})")


def _missing_columns(df: pd.DataFrame, wanted: dict[str, str]) -> str | None:
    """Describe the columns of ``wanted`` ({canonical: source name}) absent from ``df``."""
    missing = {canon: col for canon, col in wanted.items() if col not in df.columns}
    if not missing:
        return None
    names = ", ".join(repr(c) for c in missing.values())
    found = ", ".join(str(c) for c in df.columns)
    flags = ", ".join(_FLAG[c] for c in missing)
    return f"missing column(s) {names} (found: {found}); set {flags}"


def _first_bad(values: pd.Series, bad: np.ndarray) -> str:
    """Describe the first bad value: ``'abc' at row 3`` (rows counted from 1)."""
    pos = int(np.flatnonzero(bad)[0])
    value = values.iloc[pos]
    shown = "an empty cell" if pd.isna(value) else repr(getattr(value, "item", lambda: value)())
    return f"{shown} at row {pos + 1}"


def _ids_to_str(values: pd.Series, what: str, source: str) -> pd.Series:
    """Return ids as stripped strings; whole numbers lose any ``.0``; nulls are an error."""
    if pd.api.types.is_integer_dtype(values):
        text = values.astype(str)
    elif pd.api.types.infer_dtype(values, skipna=True) == "string":
        text = values.astype(object)
    else:
        text = values.map(_id_text, na_action="ignore")
    text = text.astype(object).where(values.notna()).str.strip()
    bad = (text.isna() | (text == "")).to_numpy()
    if bad.any():
        where = f" (first at row {int(np.flatnonzero(bad)[0]) + 1})"
        raise DataError(source, f"{int(bad.sum())} {what} ids are null or empty{where}")
    return text


def _id_text(value: Any) -> str:
    """Return one id as text: whole-number floats lose their ``.0``."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _parse_timestamps(values: pd.Series, time_unit: str, source: str) -> pd.Series:
    """Return ``datetime64[ns, UTC]`` timestamps; any unparseable value is an error."""
    if pd.api.types.is_bool_dtype(values):
        raise DataError(source, "timestamps are true/false values, not times")
    numeric = values if pd.api.types.is_numeric_dtype(values) else None
    if numeric is None and not pd.api.types.is_datetime64_any_dtype(values):
        as_number = pd.to_numeric(values, errors="coerce")
        if as_number.notna().sum() * 2 >= values.notna().sum() > 0:  # mostly numbers
            numeric = as_number
    if numeric is not None:
        parsed = _epoch_to_utc(numeric.astype(float), time_unit)
    else:
        parsed = _parse_time_text(values)
    bad = (parsed.isna() | values.isna()).to_numpy()
    if bad.any():
        out_of_range = numeric is not None and bool((numeric.notna().to_numpy() & bad).any())
        hint = f" (numbers are unix epoch {time_unit}: is --time-unit right?)" * out_of_range
        first = _first_bad(values, bad)
        raise DataError(
            source,
            f"{int(bad.sum())} timestamps could not be parsed (first bad value: {first}){hint}",
        )
    return parsed.dt.as_unit("ns")


def _epoch_to_utc(numbers: pd.Series, time_unit: str) -> pd.Series:
    """Convert unix epochs in ``time_unit`` to UTC; values out of range become NaT."""
    limit = np.iinfo(np.int64).max / _NS_PER_UNIT[time_unit]
    in_range = numbers.where(numbers.abs() < limit)
    return pd.to_datetime(in_range, unit=time_unit, utc=True, errors="coerce")


def _parse_time_text(values: pd.Series) -> pd.Series:
    """Parse date-time text to UTC: naive values are UTC, offsets are converted to UTC.

    The fast path infers one format from the data; values it misses are retried one by one.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    text = values.astype(str).str.strip().where(values.notna())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        parsed = pd.to_datetime(text, utc=True, errors="coerce")
        retry = parsed.isna() & text.notna()
        if retry.any():
            parsed[retry] = pd.to_datetime(text[retry], utc=True, errors="coerce", format="mixed")
    return parsed


def _parse_ratings(values: pd.Series, source: str) -> pd.Series:
    """Return ratings as float32; text that is not a number is an error (nulls stay NaN)."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        first = _first_bad(values, bad)
        raise DataError(source, f"{int(bad.sum())} ratings are not numbers (first: {first})")
    return numbers.astype(np.float32)


def normalize(
    df: pd.DataFrame,
    source: str,
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str = TS,
    rating_col: str | None = RATING,
    time_unit: str = "s",
    min_rating: float | None = 4.0,
    period: str = "1D",
) -> pd.DataFrame:
    """Turn a raw table into the canonical interactions frame (every row a positive).

    - ids become stripped strings (whole numbers without ``.0``); null or empty ids are errors;
    - numeric timestamps are unix epochs in ``time_unit``; text is parsed to UTC (naive = UTC);
    - if the rating column exists, rows with ``rating < min_rating`` are dropped (all kept if
      ``min_rating`` is None). ``rating_col=None`` ignores ratings; the default ``"rating"`` is
      optional, any other name must exist;
    - exact duplicate rows are dropped; rows are sorted by time (then user, item);
    - the ``period`` column is added for the period spec ``period``.

    ``source`` names the input in error messages (:class:`DataError`).
    """
    parse_period(period)
    if time_unit not in TIME_UNITS:
        raise ValueError(f"invalid time unit {time_unit!r}: expected one of {TIME_UNITS}")
    if df.empty:
        raise DataError(source, "empty file (no rows)")
    wanted = {USER: user_col, ITEM: item_col, TS: time_col}
    if rating_col is not None and (rating_col != RATING or RATING in df.columns):
        wanted[RATING] = rating_col
    problem = _missing_columns(df, wanted)
    if problem:
        raise DataError(source, problem)
    raw = df[list(wanted.values())].set_axis(list(wanted), axis=1).reset_index(drop=True)
    out = pd.DataFrame(
        {
            USER: _ids_to_str(raw[USER], "user", source),
            ITEM: _ids_to_str(raw[ITEM], "item", source),
            TS: _parse_timestamps(raw[TS], time_unit, source),
        }
    )
    if RATING in raw.columns:
        out[RATING] = _parse_ratings(raw[RATING], source)
        if min_rating is not None:
            out = _keep_positives(out, min_rating, source)
    out = out.drop_duplicates().sort_values([TS, USER, ITEM], kind="stable", ignore_index=True)
    return assign_periods(out, period)


def _keep_positives(df: pd.DataFrame, min_rating: float, source: str) -> pd.DataFrame:
    """Keep the rows with ``rating >= min_rating`` (error if none are left)."""
    kept = df[df[RATING] >= min_rating]
    if kept.empty:
        seen = df[RATING].dropna()
        span = f" (ratings range {seen.min():g} to {seen.max():g})" if len(seen) else ""
        raise DataError(source, f"no positives left after rating >= {min_rating:g}{span}")
    return kept


def import_file(
    path: str,
    out_root: str,
    *,
    period: str = "1D",
    name: str | None = None,
    sep: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Import one interaction file into the store at ``out_root``; return the dataset summary.

    ``kwargs`` go to :func:`normalize` (column names, ``min_rating``, ``time_unit``...). The
    periods in the file replace the same periods already stored; other stored periods stay,
    so daily files can be imported one after another into the same root (with the same period
    spec). ``name`` (default: the stored name, else the file's stem) goes in ``dataset.json``.
    The summary adds ``rows_read`` and ``rows_imported`` to :func:`summarize`'s keys.
    """
    path, out_root = str(path), str(out_root)
    previous = read_dataset_info(out_root) if has_dataset(out_root) else None
    if previous is not None and previous["period"] != period:
        raise DataError(
            out_root,
            f"this dataset uses {previous['period']} periods, not {period}: "
            f"import with --period-spec {previous['period']} or into another --out",
        )
    raw = read_table(path, sep=sep)
    df = normalize(raw, path, period=period, **kwargs)
    write_interactions(df, out_root)
    sources = [s for s in (previous or {}).get("sources", []) if s.get("path") != path]
    info = write_dataset_info(
        out_root,
        name or (previous or {}).get("name") or _stem(path),
        period,
        sources=[*sources, {"path": path, "sha256": file_sha256(path)}],
    )
    return {**summarize(out_root, info), "rows_read": len(raw), "rows_imported": len(df)}


def _stem(path: str) -> str:
    """Return a file's name without any suffix: ``logs/day1.csv.gz`` -> ``day1``."""
    return PurePosixPath(path.split("?")[0]).name.split(".")[0]
