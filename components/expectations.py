"""The versioned data-quality suite for one period of raw interactions (Great Expectations 1.24).

The daily pipeline's first step calls :func:`validate_period_file` on the raw file of period
``D_t``. A failed validation must stop the run before anything else happens, with one human
sentence per failed expectation; so bad data never raises here, it returns a FAILED
:class:`ValidationReport`. Only programming errors raise (an invalid period id, period spec or
time unit).

The suite runs on the RAW frame, before :func:`smlrec.data.importer.normalize`. Checks that need
parsing (ids, timestamps, ratings) run on derived columns computed in a copy of the frame
(prefixed ``__smlrec_``), with the same parsing rules as the importer, so a period that passes
validation also imports. The expectations, in suite order:

1. ``row_count``: the number of rows is within ``[min_rows, max_rows]``;
2. ``column_exists``: the user, item and timestamp columns exist (and the rating column: the
   default ``"rating"`` is optional, as in the importer; any other name must exist);
3. ``not_null``: user ids, item ids and timestamps have no null values;
4. ``valid_ids``: every id is a non-negative integer (whole-number floats such as ``3.0`` in
   a numeric column are accepted, as the importer reads them as ``"3"``) or non-blank text
   without control characters; text that reads as a number must be a non-negative integer
   (``-1``, ``2.5``, ``1e5`` are rejected);
5. ``timestamps_parseable``: numeric epochs in ``time_unit``, or date-time text (any mix of
   time zones; naive is UTC), or a datetime column;
6. ``timestamps_in_period``: every timestamp is in the period's ``[start, end)``;
7. ``timestamps_not_future``: no timestamp is after ``now``;
8. ``ratings_numeric`` and ``ratings_in_range`` (if the rating column is used): numbers within
   ``rating_range`` (inclusive; nulls allowed, as in the importer);
9. ``no_duplicates``: no two rows are identical on the interaction columns (user, item,
   timestamp and rating if used).

With a :class:`History` of the recent stored periods (the pipeline passes one), two checks
compare the period with them:

10. ``volume``: at most ``max_growth`` times the median row count of the recent periods (a
    file 100 times the usual size is an export gone wrong, not a busy day);
11. ``not_a_repeat``: the period's (user, item) pairs are not exactly those of a recent
    period (the same data sent again under a new date).

Unknown extra columns are allowed: they are listed as a note and do not affect success.
Bump :data:`SUITE_VERSION` whenever an expectation changes; reports record it.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from smlrec.data.importer import TIME_UNITS, _epoch_to_utc, _parse_time_text, read_table
from smlrec.data.periods import period_bounds
from smlrec.errors import DataError
from smlrec.schema import ITEM, RATING, TS, USER

SUITE_VERSION = "2"
SUITE_NAME = "smlrec-period-interactions"
EXAMPLES = 3  # example rows named in each failure sentence
MAX_GROWTH = 20.0
"""Default bound of the volume check: rows at most this many times the recent median."""
ID_RULE = "non-negative integers or non-blank text without control characters"

_PREFIX = "__smlrec_"
_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
_NUMBER = r"(?i)^[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?|inf|infinity|nan)$"
_DIGITS = r"^[0-9]+$"
# Errors a reader can raise on bad bytes that read_table does not already turn into DataError.
_READ_ERRORS = (
    DataError,
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    UnicodeError,
    pa.ArrowException,
    EOFError,
    OSError,
    ValueError,
)


@dataclass
class ValidationReport:
    """The outcome of validating one period's raw interactions.

    ``failures`` holds one sentence per failed expectation (column, problem, count and up to
    three example rows, 1-based, header excluded). ``results`` is the Great Expectations
    validation result as JSON (``{}`` when the suite could not run, e.g. an unreadable file),
    with its results in suite order. ``notes`` are remarks that do not affect success (extra
    columns, skipped optional checks); ``source`` names the validated file.
    """

    success: bool
    period: str
    n_rows: int
    failures: list[str]
    results: dict
    suite_version: str
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def status(self) -> str:
        """``"PASSED"`` or ``"FAILED"``."""
        return "PASSED" if self.success else "FAILED"

    def to_dict(self) -> dict:
        """Return the report as a JSON-serializable dict."""
        return asdict(self)

    def expectation_rows(self) -> list[dict[str, str]]:
        """One row per evaluated expectation: name, column, success, observed."""
        return [_summarize_result(r) for r in self.results.get("results", [])]

    def to_markdown(self) -> str:
        """Return a readable Markdown report (status, period, rows, failures, expectations)."""
        lines = [
            f"# Data validation {self.status}: period {self.period}",
            "",
            f"- Source: `{self.source or '(in-memory frame)'}`",
            f"- Period: {self.period}",
            f"- Rows: {self.n_rows:,}",
            f"- Suite: {SUITE_NAME}, version {self.suite_version}",
            "",
        ]
        if self.failures:
            lines += ["## Failures", ""]
            lines += [f"{i}. {_md_text(f)}" for i, f in enumerate(self.failures, 1)]
            lines.append("")
        lines += ["## Expectations", ""]
        rows = self.expectation_rows()
        if rows:
            lines += [
                "| # | Expectation | Column | Success | Observed |",
                "|---|---|---|---|---|",
            ]
            for i, row in enumerate(rows, 1):
                cells = [str(i), row["expectation"], row["column"], row["success"], row["observed"]]
                lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        else:
            lines.append("No expectation was evaluated (the data could not be read).")
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {_md_text(n)}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """Return a self-contained HTML report (inline CSS, no external resources)."""
        esc = html.escape
        color = "#1a7f37" if self.success else "#cf222e"
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>Data validation {self.status}: period {esc(self.period)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f'<h1>Data validation <span style="color:{color}">{self.status}</span>: '
            f"period {esc(self.period)}</h1>",
            "<ul>",
            f"<li>Source: <code>{esc(self.source or '(in-memory frame)')}</code></li>",
            f"<li>Period: {esc(self.period)}</li>",
            f"<li>Rows: {self.n_rows:,}</li>",
            f"<li>Suite: {esc(SUITE_NAME)}, version {esc(self.suite_version)}</li>",
            "</ul>",
        ]
        if self.failures:
            parts.append("<h2>Failures</h2><ol>")
            parts += [f"<li>{esc(f)}</li>" for f in self.failures]
            parts.append("</ol>")
        parts.append("<h2>Expectations</h2>")
        rows = self.expectation_rows()
        if rows:
            parts.append(
                "<table><thead><tr><th>#</th><th>Expectation</th><th>Column</th>"
                "<th>Success</th><th>Observed</th></tr></thead><tbody>"
            )
            for i, row in enumerate(rows, 1):
                css = "ok" if row["success"] == "yes" else "bad"
                parts.append(
                    f'<tr class="{css}"><td>{i}</td><td>{esc(row["expectation"])}</td>'
                    f"<td>{esc(row['column'])}</td><td>{esc(row['success'])}</td>"
                    f"<td>{esc(row['observed'])}</td></tr>"
                )
            parts.append("</tbody></table>")
        else:
            parts.append("<p>No expectation was evaluated (the data could not be read).</p>")
        if self.notes:
            parts.append("<h2>Notes</h2><ul>")
            parts += [f"<li>{esc(n)}</li>" for n in self.notes]
            parts.append("</ul>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#1f2328}"
    "table{border-collapse:collapse}th,td{border:1px solid #d0d7de;padding:4px 8px;"
    "text-align:left;vertical-align:top}th{background:#f6f8fa}"
    "tr.bad td{background:#ffebe9}tr.ok td:nth-child(4){color:#1a7f37}"
    "code{background:#f6f8fa;padding:1px 4px}"
)


def validate_period_file(
    path: str,
    period_id: str,
    period_spec: str = "1D",
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str = TS,
    rating_col: str | None = RATING,
    time_unit: str = "s",
    min_rows: int = 1,
    max_rows: int = 5_000_000,
    rating_range: tuple[float, float] = (0.0, 5.0),
    now: pd.Timestamp | None = None,
    history: History | None = None,
    max_growth: float = MAX_GROWTH,
) -> ValidationReport:
    """Validate the raw interactions file of period ``period_id`` (CSV/TSV/Parquet, any fsspec URL).

    An unreadable file (empty, not UTF-8, truncated Parquet, not a table, missing) gives a
    FAILED report saying why; it never raises for bad data. See :func:`validate_frame` for the
    options and the expectations.
    """
    path = str(path)
    _check_arguments(period_id, period_spec, time_unit, (min_rows, max_rows), rating_range)
    try:
        raw = read_table(path)
    except _READ_ERRORS as exc:
        problem = exc.problem if isinstance(exc, DataError) else _first_line(exc)
        return ValidationReport(
            success=False,
            period=period_id,
            n_rows=0,
            failures=[f"file: could not be read: {problem}"],
            results={},
            suite_version=SUITE_VERSION,
            source=path,
        )
    return validate_frame(
        raw,
        period_id,
        period_spec,
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        rating_col=rating_col,
        time_unit=time_unit,
        min_rows=min_rows,
        max_rows=max_rows,
        rating_range=rating_range,
        now=now,
        source=path,
        history=history,
        max_growth=max_growth,
    )


def validate_frame(
    df: pd.DataFrame,
    period_id: str,
    period_spec: str = "1D",
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str = TS,
    rating_col: str | None = RATING,
    time_unit: str = "s",
    min_rows: int = 1,
    max_rows: int = 5_000_000,
    rating_range: tuple[float, float] = (0.0, 5.0),
    now: pd.Timestamp | None = None,
    source: str = "",
    history: History | None = None,
    max_growth: float = MAX_GROWTH,
) -> ValidationReport:
    """Run the suite on a raw interactions frame of period ``period_id``; never raises for data.

    Row numbers in failures are 1-based positions in ``df`` (for a file: the line after the
    header). ``now`` (default: the current UTC time; naive means UTC) is the bound of the
    "not in the future" check. ``source`` names the data in the report. ``history`` adds
    the comparisons with recent periods (volume within ``max_growth`` times their median,
    not a repeat of one of them).
    """
    lo, hi = (float(v) for v in rating_range)
    start, end = _check_arguments(period_id, period_spec, time_unit, (min_rows, max_rows), (lo, hi))
    now = pd.Timestamp.now(tz="UTC") if now is None else _utc(pd.Timestamp(now))
    raw = df.reset_index(drop=True)
    base = {"period": period_id, "n_rows": len(raw), "suite_version": SUITE_VERSION}
    if not raw.columns.is_unique:
        dupes = sorted({str(c) for c in raw.columns[raw.columns.duplicated()]})
        return ValidationReport(
            success=False,
            failures=[f"table: duplicate column names {', '.join(dupes)}"],
            results={},
            source=source,
            **base,
        )
    ctx = _Context(raw, period_id, start, end, now, time_unit, (lo, hi))
    notes: list[str] = []
    try:
        frame, expectations, notes = _prepare(
            ctx, user_col, item_col, time_col, rating_col, min_rows, max_rows
        )
        results = _run_suite(frame, expectations)
    except Exception as exc:  # never raise for data: the run must still stop with a message
        problem = f"{type(exc).__name__}: {_first_line(exc)}"
        return ValidationReport(
            success=False,
            failures=[f"suite: the expectations could not run: {problem}"],
            results={},
            notes=notes,
            source=source,
            **base,
        )
    failures = [_explain(ctx, r) for r in results.get("results", []) if not r.get("success", False)]
    if history is not None:
        failures += _history_failures(raw, user_col, item_col, history, max_growth)
    return ValidationReport(
        success=bool(results.get("success")) and not failures,
        failures=failures,
        results=results,
        notes=notes,
        source=source,
        **base,
    )


# --- comparison with recent periods --------------------------------------------------------


@dataclass
class History:
    """Recent stored periods a new period is compared with: row counts and fingerprints."""

    row_counts: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)


HISTORY_PERIODS = 7
"""How many recent stored periods :func:`history_from_store` reads."""
MIN_HISTORY = 3
"""The volume check needs at least this many recent periods."""


def fingerprint(users: pd.Series, items: pd.Series) -> str:
    """sha256 of the sorted (user, item) pairs, ids as text: equal for the same interactions
    whatever their order and timestamps."""
    import hashlib

    pairs = np.sort((users.astype(str) + "\t" + items.astype(str)).to_numpy(dtype=str))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def history_from_store(data_uri: str, period_id: str, n: int = HISTORY_PERIODS) -> History:
    """The ``n`` stored periods before ``period_id`` in the data store (none: empty)."""
    from smlrec.data.store import has_dataset, list_periods, read_period

    if not has_dataset(data_uri):
        return History()
    recent = [p for p in list_periods(data_uri) if p < period_id][-n:]
    history = History()
    for pid in recent:
        frame = read_period(data_uri, pid, columns=[USER, ITEM])
        history.row_counts[pid] = len(frame)
        history.fingerprints[pid] = fingerprint(frame[USER], frame[ITEM])
    return history


def _history_failures(raw: pd.DataFrame, user_col: str, item_col: str, history: History,
                      max_growth: float) -> list[str]:
    failures = []
    counts = list(history.row_counts.values())
    if len(counts) >= MIN_HISTORY:
        median = float(np.median(counts))
        if len(raw) > max_growth * max(median, 1.0):
            failures.append(
                f"volume: {len(raw):,} rows is {len(raw) / max(median, 1.0):.0f}x the median "
                f"of the last {len(counts)} periods ({median:,.0f}); at most {max_growth:g}x "
                "is accepted")
    if user_col in raw.columns and item_col in raw.columns and history.fingerprints:
        mine = fingerprint(raw[user_col], raw[item_col])
        same = [pid for pid, fp in history.fingerprints.items() if fp == mine]
        if same:
            failures.append(f"not_a_repeat: the period's (user, item) pairs are exactly those "
                            f"of stored period {same[-1]}: the same data sent again?")
    return failures


# --- building the suite ---------------------------------------------------------------------


@dataclass
class _Context:
    """What the failure sentences need besides the GE result."""

    raw: pd.DataFrame
    period_id: str
    start: pd.Timestamp
    end: pd.Timestamp
    now: pd.Timestamp
    time_unit: str
    rating_range: tuple[float, float]
    parsed_ts: pd.Series | None = None
    epochs: bool = False


def _check_arguments(
    period_id: str,
    period_spec: str,
    time_unit: str,
    rows: tuple[int, int],
    rating_range: tuple[float, float],
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Raise ``ValueError`` for programming errors; return the period's ``[start, end)``."""
    if time_unit not in TIME_UNITS:
        raise ValueError(f"invalid time unit {time_unit!r}: expected one of {TIME_UNITS}")
    if not 0 <= rows[0] <= rows[1]:
        raise ValueError(f"invalid row bounds min_rows={rows[0]}, max_rows={rows[1]}")
    lo, hi = rating_range
    if not lo <= hi:
        raise ValueError(f"invalid rating_range {rating_range}: expected (low, high)")
    return period_bounds(period_id, period_spec)


def _prepare(
    ctx: _Context,
    user_col: str,
    item_col: str,
    time_col: str,
    rating_col: str | None,
    min_rows: int,
    max_rows: int,
) -> tuple[pd.DataFrame, list[Any], list[str]]:
    """Return the frame handed to GE (used columns + derived ones), the expectations, notes."""
    import great_expectations.expectations as gxe

    raw = ctx.raw
    columns = {"user": user_col, "item": item_col, "time": time_col}
    notes: list[str] = []
    if rating_col is not None and (rating_col != RATING or RATING in raw.columns):
        columns["rating"] = rating_col
    elif rating_col is not None:
        notes.append(f"no {RATING!r} column: rating checks skipped (the column is optional)")
    present = {role: col for role, col in columns.items() if col in raw.columns}
    extra = [str(c) for c in raw.columns if c not in columns.values()]
    if extra:
        notes.append(f"extra columns allowed and not validated: {', '.join(extra)}")

    encoded = {role: _Encoded.of(raw[col]) for role, col in present.items()}
    frame = pd.DataFrame(
        {present[role]: enc.for_ge() for role, enc in encoded.items()}, index=raw.index
    )
    expectations: list[Any] = []

    def add(cls: Any, check: str, source_col: str, description: str, **kwargs: Any) -> None:
        meta = {"order": len(expectations), "check": check, "column": source_col}
        meta["description"] = description
        expectations.append(cls(meta=meta, **kwargs))

    add(
        gxe.ExpectTableRowCountToBeBetween,
        "row_count",
        "(table)",
        f"row count between {min_rows:,} and {max_rows:,}",
        min_value=min_rows,
        max_value=max_rows,
    )
    for col in columns.values():
        add(gxe.ExpectColumnToExist, "column_exists", col, "column exists", column=col)
    for role in ("user", "item"):
        if role not in present:
            continue
        col = present[role]
        derived = f"{_PREFIX}{role}_invalid"
        frame[derived] = _holder(raw[col], _invalid_id_rows(encoded[role]))
        add(gxe.ExpectColumnValuesToNotBeNull, "not_null", col, "no null ids", column=col)
        add(gxe.ExpectColumnValuesToBeNull, "valid_ids", col, f"ids are {ID_RULE}", column=derived)
    if "time" in present:
        col = present["time"]
        parsed, ctx.epochs = _parse_times(encoded["time"], ctx.time_unit)
        ctx.parsed_ts = parsed
        unparseable = parsed.isna().to_numpy() & raw[col].notna().to_numpy()
        frame[f"{_PREFIX}ts"] = parsed
        frame[f"{_PREFIX}ts_unparseable"] = _holder(raw[col], unparseable)
        window = f"[{_iso(ctx.start)}, {_iso(ctx.end)})"
        add(gxe.ExpectColumnValuesToNotBeNull, "not_null", col, "no null timestamps", column=col)
        how = f"unix epochs in {ctx.time_unit}" if ctx.epochs else "date-times"
        add(
            gxe.ExpectColumnValuesToBeNull,
            "timestamps_parseable",
            col,
            f"timestamps parse as {how}",
            column=f"{_PREFIX}ts_unparseable",
        )
        add(
            gxe.ExpectColumnValuesToBeBetween,
            "timestamps_in_period",
            col,
            f"timestamps inside period {ctx.period_id} {window}",
            column=f"{_PREFIX}ts",
            min_value=ctx.start,
            max_value=ctx.end,
            strict_max=True,
        )
        add(
            gxe.ExpectColumnValuesToBeBetween,
            "timestamps_not_future",
            col,
            f"timestamps not after now ({_iso(ctx.now)})",
            column=f"{_PREFIX}ts",
            max_value=ctx.now,
        )
    if "rating" in present:
        col = present["rating"]
        numbers, not_numeric = _parse_numbers(encoded["rating"])
        frame[f"{_PREFIX}rating"] = numbers
        frame[f"{_PREFIX}rating_not_numeric"] = _holder(raw[col], not_numeric)
        lo, hi = ctx.rating_range
        add(
            gxe.ExpectColumnValuesToBeNull,
            "ratings_numeric",
            col,
            "ratings are numbers",
            column=f"{_PREFIX}rating_not_numeric",
        )
        add(
            gxe.ExpectColumnValuesToBeBetween,
            "ratings_in_range",
            col,
            f"ratings within [{lo:g}, {hi:g}]",
            column=f"{_PREFIX}rating",
            min_value=lo,
            max_value=hi,
        )
    if len(present) == len(columns):
        keys = list(columns.values())
        add(
            gxe.ExpectCompoundColumnsToBeUnique,
            "no_duplicates",
            ", ".join(keys),
            "no duplicate rows",
            column_list=keys,
        )
    return frame, expectations, notes


def _run_suite(frame: pd.DataFrame, expectations: list[Any]) -> dict:
    """Validate ``frame`` with an ephemeral GE context; return the result JSON in suite order."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas("smlrec")
        .add_dataframe_asset("period_interactions")
        .add_batch_definition_whole_dataframe("whole_period")
    )
    suite = gx.ExpectationSuite(
        name=f"{SUITE_NAME}-v{SUITE_VERSION}",
        expectations=expectations,
        meta={"suite_version": SUITE_VERSION},
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    )
    out = result.to_json_dict()
    out["results"] = sorted(out.get("results", []), key=_order)
    out.setdefault("meta", {})["suite_version"] = SUITE_VERSION
    return json.loads(json.dumps(out, default=str))  # plain JSON types only


def _order(result: dict) -> int:
    """The position of a result's expectation in the suite."""
    return int(result.get("expectation_config", {}).get("meta", {}).get("order", 1 << 30))


# --- derived columns ------------------------------------------------------------------------
#
# Text columns are factorized once: each rule runs on the distinct values only and is mapped
# back to the rows through the codes, and GE gets the column as a Categorical (its null checks,
# duplicate search and batch fingerprint are then cheap). 1e6 rows validate in 1-2 s.


@dataclass
class _Encoded:
    """One raw column; text and object columns also as factorize codes (-1 = null)."""

    values: pd.Series
    codes: np.ndarray | None = None
    uniques: pd.Series | None = None

    @classmethod
    def of(cls, values: pd.Series) -> _Encoded:
        """Encode ``values``; numeric, boolean and datetime columns are kept as they are."""
        dtype = values.dtype
        if (
            pd.api.types.is_numeric_dtype(dtype)
            or pd.api.types.is_bool_dtype(dtype)
            or pd.api.types.is_datetime64_any_dtype(dtype)
        ):
            return cls(values)
        try:
            codes, uniques = pd.factorize(values)
        except TypeError:  # unhashable cells (lists, dicts): judge them by their text
            codes, uniques = pd.factorize(values.astype(str).where(values.notna()))
        return cls(values, codes, pd.Series(np.asarray(uniques, dtype=object)))

    def for_ge(self) -> pd.Series:
        """The column handed to GE: a Categorical for encoded columns, else the values."""
        if self.codes is None or self.uniques is None:
            return self.values
        categories = pd.Index(self.uniques, dtype=object)
        cat = pd.Categorical.from_codes(self.codes, categories=categories)
        return pd.Series(cat, index=self.values.index)

    def rows(self, per_unique: np.ndarray, fill: Any) -> np.ndarray:
        """Map an array computed on the distinct values back to the rows (nulls get ``fill``)."""
        assert self.codes is not None
        return np.append(per_unique, np.asarray([fill], dtype=per_unique.dtype))[self.codes]


def _holder(values: pd.Series, bad: np.ndarray) -> pd.Series:
    """Return a categorical column holding the text of ``values`` where ``bad``, else null.

    GE's ``ExpectColumnValuesToBeNull`` on such a column fails exactly for the bad rows and
    lists the offending values in its result.
    """
    codes = np.full(len(values), -1, dtype=np.int64)
    categories = pd.Index([], dtype=object)
    if bad.any():
        bad_codes, bad_values = pd.factorize(values[bad].astype(str))
        codes[bad] = bad_codes
        categories = pd.Index(np.asarray(bad_values, dtype=object), dtype=object)
    return pd.Series(pd.Categorical.from_codes(codes, categories=categories), index=values.index)


def _invalid_id_rows(enc: _Encoded) -> np.ndarray:
    """Flag the rows holding a non-null id that is not valid (see :data:`ID_RULE`)."""
    if enc.codes is None or enc.uniques is None:
        return _invalid_ids(enc.values)
    return enc.rows(_invalid_ids(enc.uniques), False)


def _invalid_ids(values: pd.Series) -> np.ndarray:
    """Flag the non-null values of ``values`` that are not valid ids."""
    notna = values.notna().to_numpy()
    if pd.api.types.is_bool_dtype(values):
        return notna
    if pd.api.types.is_integer_dtype(values):
        return notna & (values < 0).fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_float_dtype(values):
        v = values.to_numpy(dtype=float, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(v) & (v >= 0) & (v == np.floor(v))
        return notna & ~ok
    objects = values.astype(object)
    if pd.api.types.infer_dtype(objects, skipna=True) not in ("string", "empty"):
        objects = objects.map(_id_text, na_action="ignore")  # mixed objects: as the importer
    return notna & _invalid_id_text(objects)


def _id_text(value: Any) -> str:
    """One id as text: whole-number floats lose their ``.0`` (as in the importer)."""
    if isinstance(value, float | np.floating) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _invalid_id_text(text: pd.Series) -> np.ndarray:
    """Flag text ids that are blank, hold control characters, or are non-integer numbers."""
    try:
        arr = pa.array(text, type=pa.string(), from_pandas=True)
    except (pa.ArrowException, UnicodeError, TypeError):
        return _invalid_id_text_slow(text)
    trimmed = pc.utf8_trim_whitespace(arr)
    bad = pc.or_kleene(
        pc.match_substring_regex(arr, _CONTROL),
        pc.or_kleene(
            pc.equal(trimmed, ""),
            pc.and_kleene(
                pc.match_substring_regex(trimmed, _NUMBER),
                pc.invert(pc.match_substring_regex(trimmed, _DIGITS)),
            ),
        ),
    )
    return np.asarray(pc.fill_null(bad, False).to_numpy(zero_copy_only=False), dtype=bool)


def _invalid_id_text_slow(text: pd.Series) -> np.ndarray:
    """The rule of :func:`_invalid_id_text` in plain Python (for strings Arrow refuses)."""
    control, number, digits = re.compile(_CONTROL), re.compile(_NUMBER), re.compile(_DIGITS)

    def bad(value: Any) -> bool:
        if not isinstance(value, str):
            return False
        s = value.strip()
        return (
            bool(control.search(value))
            or not s
            or (bool(number.search(s)) and not digits.search(s))
        )

    return np.fromiter((bad(v) for v in text), dtype=bool, count=len(text))


def _parse_times(enc: _Encoded, time_unit: str) -> tuple[pd.Series, bool]:
    """Parse timestamps with the importer's rules; unparseable values become NaT.

    Numeric columns are unix epochs in ``time_unit``; text columns too when at least half of
    their non-null rows are numbers; other text is parsed as date-times (naive = UTC, offsets
    converted to UTC). Returns the ``datetime64[ns, UTC]`` rows and whether epochs were read.
    """
    values = enc.values
    if enc.codes is None or enc.uniques is None:
        if pd.api.types.is_bool_dtype(values):
            return _nat(values.index), False
        epochs = pd.api.types.is_numeric_dtype(values)
        parsed = _to_utc(values, time_unit, epochs)
        return parsed.set_axis(values.index), epochs
    uniques = enc.uniques
    try:
        as_number = pd.to_numeric(uniques, errors="coerce")
    except (TypeError, ValueError):
        as_number = pd.Series(np.nan, index=uniques.index)
    counts = np.bincount(enc.codes[enc.codes >= 0], minlength=len(uniques))
    numeric_rows = int(counts[as_number.notna().to_numpy()].sum())
    epochs = numeric_rows * 2 >= int(counts.sum()) > 0  # mostly numbers, as in the importer
    parsed_unique = _to_utc(as_number if epochs else uniques, time_unit, epochs)
    taken = parsed_unique.array.take(enc.codes, allow_fill=True)
    return pd.Series(taken, index=values.index), epochs


def _to_utc(values: pd.Series, time_unit: str, epochs: bool) -> pd.Series:
    """Epochs or date-time values to ``datetime64[ns, UTC]`` (NaT where impossible)."""
    try:
        if epochs:
            parsed = _epoch_to_utc(pd.to_numeric(values, errors="coerce").astype(float), time_unit)
        else:
            parsed = _parse_time_text(values)
        return parsed.dt.as_unit("ns").reset_index(drop=True)
    except (TypeError, ValueError, OverflowError, pd.errors.OutOfBoundsDatetime):
        return _nat(pd.RangeIndex(len(values)))


def _nat(index: pd.Index) -> pd.Series:
    """An all-NaT UTC timestamp column."""
    return pd.Series(pd.NaT, index=index, dtype="datetime64[ns, UTC]")


def _parse_numbers(enc: _Encoded) -> tuple[pd.Series, np.ndarray]:
    """Return the rows as float64 (NaN where not a number) and the non-null non-numbers."""
    source = enc.values if enc.codes is None or enc.uniques is None else enc.uniques
    try:
        numbers = pd.to_numeric(source, errors="coerce").astype(float).to_numpy()
    except (TypeError, ValueError):
        numbers = np.full(len(source), np.nan)
    if enc.codes is not None:
        numbers = enc.rows(numbers, np.nan)
    bad = np.isnan(numbers) & enc.values.notna().to_numpy()
    return pd.Series(numbers, index=enc.values.index), bad


# --- failure sentences and the expectation table ----------------------------------------------


def _explain(ctx: _Context, result: dict) -> str:
    """Return one sentence for a failed expectation: column, problem, count, example rows."""
    config = result.get("expectation_config", {})
    meta = config.get("meta", {})
    check, column = meta.get("check", config.get("type", "?")), meta.get("column", "?")
    info = result.get("exception_info") or {}
    error = _exception_message(info)
    if error:
        return f"{column}: check '{meta.get('description', check)}' could not run: {error}"
    res = result.get("result", {})
    n = int(res.get("unexpected_count") or 0)
    rows = [int(i) for i in res.get("partial_unexpected_index_list") or []][:EXAMPLES]
    raw = ctx.raw
    if check == "row_count":
        kwargs = config.get("kwargs", {})
        observed = res.get("observed_value")
        return (
            f"table: {observed:,} rows, expected between {kwargs.get('min_value'):,} "
            f"and {kwargs.get('max_value'):,}"
        )
    if check == "column_exists":
        found = ", ".join(str(c) for c in raw.columns) or "none"
        return f"{column}: missing column (found: {found})"
    if check == "not_null":
        return f"{column}: {_count(n, 'null value')}{_examples(rows)}"
    if check == "valid_ids":
        shown = _examples(rows, raw[column])
        return f"{column}: {_count(n, 'invalid id')} (ids must be {ID_RULE}){shown}"
    if check == "timestamps_parseable":
        hint = f"; numbers are read as unix epochs in {ctx.time_unit}" * ctx.epochs
        return (
            f"{column}: {_count(n, 'unparseable timestamp')}{hint}"
            f"{_examples(rows, raw[column], ctx.parsed_ts)}"
        )
    if check == "timestamps_in_period":
        return (
            f"{column}: {_count(n, 'timestamp')} outside period {ctx.period_id} "
            f"[{_iso(ctx.start)}, {_iso(ctx.end)}){_examples(rows, raw[column], ctx.parsed_ts)}"
        )
    if check == "timestamps_not_future":
        return (
            f"{column}: {_count(n, 'timestamp')} in the future (after {_iso(ctx.now)})"
            f"{_examples(rows, raw[column], ctx.parsed_ts)}"
        )
    if check == "ratings_numeric":
        return f"{column}: {_count(n, 'non-numeric rating')}{_examples(rows, raw[column])}"
    if check == "ratings_in_range":
        lo, hi = ctx.rating_range
        return (
            f"{column}: {_count(n, 'rating')} outside [{lo:g}, {hi:g}]"
            f"{_examples(rows, raw[column])}"
        )
    if check == "no_duplicates":
        shown = _examples(rows)
        return f"{column}: {_count(n, 'duplicate row')} (identical on these columns){shown}"
    return f"{column}: expectation {config.get('type')} failed"


def _exception_message(info: dict) -> str | None:
    """Return the message of a GE exception record (flat or keyed by metric), if one was raised."""
    records = [info] if "raised_exception" in info else list(info.values())
    for record in records:
        if isinstance(record, dict) and record.get("raised_exception"):
            return _first_line(record.get("exception_message") or "unknown error")
    return None


def _examples(rows: list[int], values: pd.Series | None = None, parsed: Any = None) -> str:
    """Describe example rows (1-based): ``row 3, 7`` or ``row 3 = '-1', row 7 = '2.5'``."""
    if not rows:
        return ""
    if values is None:
        return " (examples: row " + ", ".join(str(i + 1) for i in rows) + ")"
    shown = []
    for i in rows:
        text = f"row {i + 1} = {_value_text(values.iloc[i])}"
        if parsed is not None and pd.notna(parsed.iloc[i]):
            stamp = _iso(parsed.iloc[i])
            if stamp != str(values.iloc[i]):
                text += f" ({stamp})"
        shown.append(text)
    return " (examples: " + ", ".join(shown) + ")"


def _value_text(value: Any) -> str:
    """Show one raw value briefly (strings quoted, control characters escaped)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "null"
    item = getattr(value, "item", None)
    value = item() if callable(item) and not isinstance(value, str | pd.Timestamp) else value
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(n: int, noun: str) -> str:
    """``1 null value``, ``12 null values``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _summarize_result(result: dict) -> dict[str, str]:
    """One row of the expectation table from one GE result."""
    config = result.get("expectation_config", {})
    meta = config.get("meta", {})
    res = result.get("result", {})
    error = _exception_message(result.get("exception_info") or {})
    success = bool(result.get("success"))
    if error:
        observed = f"error: {error}"
    elif "observed_value" in res:
        value = res["observed_value"]
        observed = f"{value:,}" if isinstance(value, int) else str(value)
    elif "unexpected_count" in res:
        n, total = int(res["unexpected_count"]), int(res.get("element_count") or 0)
        observed = f"{n:,} unexpected of {total:,}"
        missing = int(res.get("missing_count") or 0)
        if missing and meta.get("check", "").startswith("timestamps_in"):
            observed += f" ({missing:,} null skipped)"
    elif config.get("type") == "expect_column_to_exist":
        observed = "present" if success else "missing"
    else:
        observed = ""
    name = meta.get("description") or config.get("type", "?")
    return {
        "expectation": str(name),
        "column": str(meta.get("column") or config.get("kwargs", {}).get("column", "")),
        "success": "yes" if success else "NO",
        "observed": observed,
    }


def _md_cell(text: str) -> str:
    """Escape text for one Markdown table cell."""
    return _md_text(text).replace("|", "\\|")


def _md_text(text: str) -> str:
    """Keep text on one Markdown line."""
    return str(text).replace("\r", " ").replace("\n", " ")


def _iso(ts: pd.Timestamp) -> str:
    """A UTC timestamp as ``2024-01-01T00:00:00Z`` (sub-second digits kept when present)."""
    ts = _utc(pd.Timestamp(ts))
    text = ts.tz_localize(None).isoformat()
    return text + "Z"


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    """Return ``ts`` in UTC (naive means UTC)."""
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _first_line(exc: BaseException | str) -> str:
    """The first line of an exception's message (or its type name)."""
    text = str(exc).strip()
    if not text and isinstance(exc, BaseException):
        return type(exc).__name__
    return text.splitlines()[0] if text else "unknown error"
