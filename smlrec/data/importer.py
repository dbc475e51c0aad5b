"""Read interaction logs (CSV, TSV, RecBole ``.inter``, Parquet, JSON lines) into the
canonical frame.

Every problem with the input is reported as one :class:`~smlrec.errors.DataError` that names
the file, the problem and the option that fixes it, never as a parser traceback. An import
that looks wrong (times before 1990 or in the future, a whole log in one period, most rows
dropped) stops and says why, unless the caller passes ``force``; every import writes a
report (rows read, rows dropped by reason, columns ignored, rows per period) beside the data.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from smlrec.data.periods import assign_periods, empty_periods, parse_period
from smlrec.data.store import (
    file_sha256,
    has_dataset,
    read_dataset_info,
    summarize,
    write_dataset_info,
    write_interactions,
)
from smlrec.errors import DataError
from smlrec.feedback import is_log_folder, read_log
from smlrec.schema import ITEM, PERIOD, RATING, TS, USER

TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".inter": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
FORMATS = ("csv", "tsv", "parquet", "jsonl")
_NS_PER_UNIT = {"s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0, "D": 86400e9}
REPORT_FILE = "import_report.json"
EARLIEST_PLAUSIBLE = pd.Timestamp("1990-01-01", tz="UTC")
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


def _read_text_arrow(path: str, sep: str, header: bool,
                     arrow_strings: bool = False) -> pd.DataFrame | None:
    """The fast path: pyarrow's multi-threaded CSV reader, every column as text (Arrow-backed
    strings with ``arrow_strings``: a tenth of the memory of Python strings). None when it
    cannot read the file (the pandas path then reads it, or says what is wrong)."""
    import csv
    import io

    from pyarrow import csv as pacsv

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            first = f.readline().decode("utf-8")
            if not first.strip():
                return None
            names = next(csv.reader(io.StringIO(first), delimiter=sep))
            if not header:
                names = [str(i) for i in range(len(names))]
            if len(set(names)) != len(names):
                return None
            f.seek(0)
            table = pacsv.read_csv(
                f, read_options=pacsv.ReadOptions(column_names=names,
                                                  skip_rows=1 if header else 0),
                parse_options=pacsv.ParseOptions(delimiter=sep),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                    null_values=[""]))
    except (pa.ArrowException, UnicodeDecodeError, ValueError, OSError, StopIteration):
        return None
    if table.num_rows == 0:
        return None
    return table.to_pandas(types_mapper=pd.ArrowDtype if arrow_strings else None)


def _read_text(path: str, sep: str, header: bool = True,
               arrow_strings: bool = False) -> pd.DataFrame:
    """Read a delimited text file with every column as text (``normalize`` types them).
    A separator of several characters (MovieLens-1M's ``::``) is taken literally. Without a
    header, columns are named by position: ``0``, ``1``, ..."""
    if len(sep) == 1:
        fast = _read_text_arrow(path, sep, header, arrow_strings)
        if fast is not None:
            return _strip_typed_headers(fast)
    options: dict[str, Any] = {"sep": sep}
    if len(sep) > 1:
        options = {"sep": re.escape(sep), "engine": "python"}
    if not header:
        options["header"] = None
    try:
        with fsspec.open(path, "rb", compression="infer") as f, warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # rows longer than header
            df = pd.read_csv(f, dtype=str, encoding="utf-8", index_col=False, **options)
            if not header:
                df.columns = [str(c) for c in df.columns]
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


def _read_jsonl(path: str) -> pd.DataFrame:
    """Read a JSON-lines file (one object per line), every value kept as read."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            return pd.read_json(f, lines=True, dtype=False, convert_dates=False)
    except ValueError as exc:
        raise DataError(path, f"file is not JSON lines (one object per line): "
                        f"{_first_line(exc)}") from exc


def read_table(path: str, *, sep: str | None = None, fmt: str | None = None,
               header: bool = True, arrow_strings: bool = False) -> pd.DataFrame:
    """Read an interaction file from a local path or any fsspec URL.

    The format is ``fmt`` (csv, tsv, parquet, jsonl), else the suffix's (``.csv``,
    ``.tsv``, ``.inter``, ``.parquet``, ``.pq``, ``.jsonl``, ``.ndjson``; text files may be
    compressed, e.g. ``.csv.gz``). ``sep`` sets the text separator (several characters, such
    as ``::``, are taken literally) and lets any other suffix (``.dat``, ``.txt``) be read as
    text; ``header=False`` names the columns by position (``0``, ``1``...). Text columns are
    all read as strings (Arrow-backed with ``arrow_strings``, where the fast reader reads
    the file); :func:`normalize` converts them. A folder of the API's feedback log
    (:mod:`smlrec.feedback`: one period's ``period=<id>`` folder, or its root) is read whole.
    """
    path = str(path)
    if fmt is None and is_log_folder(path):
        return read_log(path)
    suffix = _suffix(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(path, f"unknown --format {fmt!r}: choose from {', '.join(FORMATS)}")
    kind = fmt or ("parquet" if suffix in PARQUET_SUFFIXES else "jsonl"
                   if suffix in JSONL_SUFFIXES else "text" if suffix in TEXT_SEPARATORS
                   or sep is not None else None)
    try:
        if kind == "parquet":
            return _read_parquet(path)
        if kind == "jsonl":
            return _read_jsonl(path)
        if kind is not None:
            default = {"csv": ",", "tsv": "\t"}.get(kind) or TEXT_SEPARATORS.get(suffix, ",")
            return _read_text(path, sep or default, header, arrow_strings)
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    known = ", ".join([*TEXT_SEPARATORS, *PARQUET_SUFFIXES, *JSONL_SUFFIXES])
    hint = ("; MovieLens .dat files: --sep '::' --no-header" if suffix == ".dat" else
            "; a file of one JSON object per line: --format jsonl" if suffix == ".json" else "")
    raise DataError(path, f"unknown file type {suffix or '(no suffix)'!r} (expected {known}; "
                    f"or say how to read it: --format {'|'.join(FORMATS)}, or --sep){hint}")


def _missing_columns(df: pd.DataFrame, wanted: dict[str, str]) -> str | None:
    """Describe the columns of ``wanted`` ({canonical: source name}) absent from ``df``."""
    missing = {canon: col for canon, col in wanted.items() if col not in df.columns}
    if not missing:
        return None
    names = ", ".join(repr(c) for c in missing.values())
    found = ", ".join(str(c) for c in df.columns)
    flags = ", ".join(_FLAG[c.split(":")[0]] for c in missing)
    hint = ("; only one column was read: set --sep (e.g. --sep '::', --sep ';' or "
            "--format tsv)" if len(df.columns) == 1 else "")
    return f"missing column(s) {names} (found: {found}); set {flags}{hint}"


def _first_bad(values: pd.Series, bad: np.ndarray) -> str:
    """Describe the first bad value: ``'abc' at row 3`` (rows counted from 1)."""
    pos = int(np.flatnonzero(bad)[0])
    value = values.iloc[pos]
    shown = "an empty cell" if pd.isna(value) else repr(getattr(value, "item", lambda: value)())
    return f"{shown} at row {pos + 1}"


def _ids_to_str(values: pd.Series, what: str, source: str) -> pd.Series:
    """Return ids as stripped strings; whole numbers lose any ``.0``; nulls are an error."""
    if isinstance(values.dtype, pd.ArrowDtype) and pa.types.is_string(
            values.dtype.pyarrow_dtype):  # the import's fast path: no Python strings
        text = values.str.strip()
    else:
        if pd.api.types.is_integer_dtype(values):
            text = values.astype(str)
        elif pd.api.types.infer_dtype(values, skipna=True) == "string":
            text = values.astype(object)
        else:
            text = values.map(_id_text, na_action="ignore")
        text = text.astype(object).where(values.notna()).str.strip()
    bad = (text.isna() | (text == "")).to_numpy(dtype=bool, na_value=True)
    if bad.any():
        where = f" (first at row {int(np.flatnonzero(bad)[0]) + 1})"
        raise DataError(source, f"{int(bad.sum())} {what} ids are null or empty{where}")
    return text


def _id_text(value: Any) -> str:
    """Return one id as text: whole-number floats lose their ``.0``."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _to_number(values: pd.Series) -> pd.Series:
    """Numbers as float64 with NaN for anything else (Arrow-backed input included, where
    an unparseable value would otherwise be a NaN that is not "missing")."""
    numbers = pd.to_numeric(values, errors="coerce")
    if isinstance(numbers.dtype, pd.ArrowDtype):
        numbers = numbers.astype("float64")
    return numbers


_PARTS = ("year", "month", "day", "hour", "minute", "second")


def _assemble_time(raw: pd.DataFrame, cols: list[str], source: str) -> pd.Series:
    """UTC timestamps from separate columns, in the order year, month, day[, hour, minute,
    second] (missing trailing parts are 0, a missing day is the 1st)."""
    if len(cols) > len(_PARTS):
        raise DataError(source, f"--time-col takes at most {len(_PARTS)} columns "
                        f"({', '.join(_PARTS)}), not {len(cols)}")
    parts = {}
    for part, col in zip(_PARTS, cols, strict=False):
        numbers = _to_number(raw[col])
        bad = numbers.isna().to_numpy()
        if bad.any():
            raise DataError(source, f"{int(bad.sum())} values of the {part} column {col!r} are "
                            f"not numbers (first: {_first_bad(raw[col], bad)})")
        parts[part] = numbers.astype("int64")
    parts.setdefault("month", pd.Series(1, index=raw.index))
    parts.setdefault("day", pd.Series(1, index=raw.index))
    try:
        parsed = pd.to_datetime(pd.DataFrame(parts), utc=True, errors="coerce")
    except ValueError as exc:
        raise DataError(source, f"the --time-col columns {', '.join(cols)} do not make dates "
                        f"(read as {', '.join(list(parts)[:len(cols)])}): {_first_line(exc)}"
                        ) from exc
    bad = parsed.isna().to_numpy()
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        shown = "-".join(str(raw[c].iloc[pos]) for c in cols)
        raise DataError(source, f"{int(bad.sum())} rows have no valid date in --time-col "
                        f"{','.join(cols)} (read as {', '.join(list(parts)[:len(cols)])}; "
                        f"first: {shown} at row {pos + 1})")
    return parsed.dt.as_unit("ns")


def _parse_timestamps(values: pd.Series, time_unit: str, source: str,
                      time_format: str | None = None) -> pd.Series:
    """Return ``datetime64[ns, UTC]`` timestamps; any unparseable value is an error."""
    if pd.api.types.is_bool_dtype(values):
        raise DataError(source, "timestamps are true/false values, not times")
    if time_format:
        text = values.astype(str).str.strip().where(values.notna())
        parsed = pd.to_datetime(text, format=time_format, utc=True, errors="coerce")
        bad = parsed.isna().to_numpy()
        if bad.any():
            raise DataError(source, f"{int(bad.sum())} timestamps do not match --time-format "
                            f"{time_format!r} (first: {_first_bad(values, bad)})")
        return parsed.dt.as_unit("ns")
    numeric = values if pd.api.types.is_numeric_dtype(values) else None
    if numeric is None and not pd.api.types.is_datetime64_any_dtype(values):
        as_number = _to_number(values)
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
    numbers = _to_number(values)
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
    time_col: str | list[str] = TS,
    rating_col: str | None = RATING,
    time_unit: str = "s",
    min_rating: float | None = 4.0,
    period: str = "1D",
    time_format: str | None = None,
    report: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Turn a raw table into the canonical interactions frame (every row a positive).

    - ids become stripped strings (whole numbers without ``.0``); null or empty ids are errors;
    - numeric timestamps are unix epochs in ``time_unit`` (s, ms, us, ns or D: days); text is
      parsed to UTC (naive = UTC), with ``time_format`` (strftime codes) when given;
      ``time_col`` may name several columns (a list, or comma-separated): year, month, day
      and optionally hour, minute, second, in that order;
    - if the rating column exists, rows with ``rating < min_rating`` are dropped (all kept if
      ``min_rating`` is None); rows without a rating are implicit positives and stay.
      ``rating_col=None`` ignores ratings; the default ``"rating"`` is optional, any other
      name must exist;
    - exact duplicate rows are dropped; rows are sorted by time (then user, item);
    - the ``period`` column is added for the period spec ``period``.

    ``source`` names the input in error messages (:class:`DataError`). ``report``, when
    given, receives what happened: rows read, rows dropped by reason, columns ignored.
    """
    parse_period(period)
    if time_unit not in TIME_UNITS:
        raise ValueError(f"invalid time unit {time_unit!r}: expected one of {TIME_UNITS}")
    if df.empty:
        raise DataError(source, "empty file (no rows)")
    df = df.reset_index(drop=True)
    time_cols = ([c.strip() for c in time_col.split(",") if c.strip()]
                 if isinstance(time_col, str) else list(time_col))
    wanted = {USER: user_col, ITEM: item_col}
    wanted.update({f"{TS}:{i}": c for i, c in enumerate(time_cols)} if len(time_cols) > 1
                  else {TS: time_cols[0]})
    if rating_col is not None and (rating_col != RATING or RATING in df.columns):
        wanted[RATING] = rating_col
    problem = _missing_columns(df, wanted)
    if problem:
        raise DataError(source, problem)
    if len(time_cols) > 1:
        times = _assemble_time(df, time_cols, source)
    else:
        times = _parse_timestamps(df[time_cols[0]], time_unit, source, time_format)
    out = pd.DataFrame(
        {
            USER: _ids_to_str(df[user_col], "user", source),
            ITEM: _ids_to_str(df[item_col], "item", source),
            TS: times,
        }
    )
    dropped: dict[str, int] = {}
    if RATING in wanted:
        out[RATING] = _parse_ratings(df[wanted[RATING]], source)
        if min_rating is not None:
            before = len(out)
            out = _keep_positives(out, min_rating, source)
            dropped[f"rating below {min_rating:g}"] = before - len(out)
    before = len(out)
    out = out.drop_duplicates().sort_values([TS, USER, ITEM], kind="stable", ignore_index=True)
    dropped["exact duplicates"] = before - len(out)
    if report is not None:
        used = set(wanted.values())
        report.update({"rows_read": len(df), "rows_kept": len(out),
                       "dropped": {k: int(v) for k, v in dropped.items() if v},
                       "columns_used": {USER: user_col, ITEM: item_col,
                                        TS: ",".join(time_cols),
                                        **({RATING: wanted[RATING]} if RATING in wanted
                                           else {})},
                       "columns_ignored": [str(c) for c in df.columns if c not in used]})
    return assign_periods(out, period)


def _keep_positives(df: pd.DataFrame, min_rating: float, source: str) -> pd.DataFrame:
    """Keep the rows with ``rating >= min_rating`` and the unrated ones (a missing rating is
    an implicit positive: a click or a play; error if none are left)."""
    kept = df[(df[RATING] >= min_rating) | df[RATING].isna()]
    if kept.empty:
        seen = df[RATING].dropna()
        span = f" (ratings range {seen.min():g} to {seen.max():g})" if len(seen) else ""
        raise DataError(source, f"no positives left after rating >= {min_rating:g}{span}")
    return kept


def plausibility(df: pd.DataFrame, report: dict[str, Any], *, first_import: bool,
                 time_unit: str = "s", now: pd.Timestamp | None = None) -> list[str]:
    """What makes an import look wrong, each with the option that fixes it ([]: nothing)."""
    problems = []
    now = now or pd.Timestamp.now(tz="UTC")
    first, last = df[TS].min(), df[TS].max()
    cols = report.get("columns_used", {}).get(TS, TS)
    if first < EARLIEST_PLAUSIBLE:
        problems.append(
            f"the earliest time is {first:%Y-%m-%d %H:%M:%S} UTC, before 1990: numbers in "
            f"--time-col {cols} are read as unix epoch {time_unit}; if they are years (or "
            "dates in parts), pass --time-col year,month,day; else set --time-unit")
    if last > now + pd.Timedelta(days=1):
        problems.append(f"the latest time is {last:%Y-%m-%d} UTC, in the future: is "
                        f"--time-unit {time_unit} right (ms and us epochs are 1000x longer)?")
    periods = df[PERIOD].nunique()
    if first_import and periods == 1 and len(df) >= 1000:
        problems.append(f"all {len(df):,} rows fall in one period ({df[PERIOD].iloc[0]}): "
                        "check --time-col and --time-unit, or a longer log needs a shorter "
                        "--period-spec")
    read, kept = report.get("rows_read", len(df)), report.get("rows_kept", len(df))
    if read and kept < read / 2:
        reasons = ", ".join(f"{n:,} {why}" for why, n in report.get("dropped", {}).items())
        problems.append(f"only {kept:,} of {read:,} rows were kept ({reasons}): check "
                        "--min-rating and --rating-col")
    return problems


def import_file(
    path: str,
    out_root: str,
    *,
    period: str = "1D",
    name: str | None = None,
    sep: str | None = None,
    fmt: str | None = None,
    header: bool = True,
    force: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Import one interaction file into the store at ``out_root``; return the dataset summary.

    ``kwargs`` go to :func:`normalize` (column names, ``min_rating``, ``time_unit``,
    ``time_format``...); ``sep``, ``fmt`` and ``header`` to :func:`read_table`. The periods
    in the file replace the same periods already stored; other stored periods stay, so
    daily files can be imported one after another into the same root (with the same period
    spec). ``name`` (default: the stored name, else the file's stem) goes in
    ``dataset.json``. An import that looks wrong (:func:`plausibility`) stops with a
    :class:`DataError` naming the fix, unless ``force``. The summary adds ``rows_read``,
    ``rows_imported`` and ``report`` (also written to ``<out_root>/import_report.json``).
    """
    path, out_root = str(path), str(out_root)
    previous = read_dataset_info(out_root) if has_dataset(out_root) else None
    if previous is not None and previous["period"] != period:
        raise DataError(
            out_root,
            f"this dataset uses {previous['period']} periods, not {period}: "
            f"import with --period-spec {previous['period']} or into another --out",
        )
    raw = read_table(path, sep=sep, fmt=fmt, header=header, arrow_strings=True)
    report: dict[str, Any] = {"source": path}
    df = normalize(raw, path, period=period, report=report, **kwargs)
    problems = plausibility(df, report, first_import=previous is None,
                            time_unit=kwargs.get("time_unit", "s"))
    if problems and not force:
        raise DataError(path, "this import looks wrong, nothing was written: "
                        + "; ".join(problems) + " (pass --force to import it anyway)")
    counts = df[PERIOD].value_counts().sort_index()
    report.update({"empty_periods": empty_periods(counts.index, period),
                   "users": int(df[USER].nunique()),
                   "items": int(df[ITEM].nunique()),
                   "periods": int(len(counts)), "period_spec": period,
                   "first": str(df[TS].min()), "last": str(df[TS].max()),
                   "rows_per_period": {str(k): int(v) for k, v in counts.items()},
                   "warnings": problems, "forced": bool(problems and force)})
    write_interactions(df, out_root)
    with fsspec.open(f"{out_root.rstrip('/')}/{REPORT_FILE}", "w") as fh:
        json.dump(report, fh, indent=1)
    sources = [s for s in (previous or {}).get("sources", []) if s.get("path") != path]
    info = write_dataset_info(
        out_root,
        name or (previous or {}).get("name") or _stem(path),
        period,
        sources=[*sources, {"path": path, "sha256": file_sha256(path)}],
    )
    return {**summarize(out_root, info), "rows_read": len(raw), "rows_imported": len(df),
            "report": report}


def _stem(path: str) -> str:
    """Return a file's name without any suffix: ``logs/day1.csv.gz`` -> ``day1``."""
    return PurePosixPath(path.split("?")[0]).name.split(".")[0]
