"""Retraining periods: N-day blocks or calendar weeks, months and quarters of UTC time.

``"ND"`` periods are N-day blocks anchored at :data:`ORIGIN` (Monday 1970-01-05 00:00 UTC),
so ``"7D"`` gives Monday-to-Sunday weeks and ``"1D"`` UTC calendar days. ``"W"`` is the ISO
week (Monday to Sunday, the same blocks as ``"7D"``), ``"M"`` the calendar month, ``"Q"``
the calendar quarter. A period is named by the date of its first day, ``YYYY-MM-DD``; the
period after one is the next block or calendar period (:func:`next_period_start`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import overload

import numpy as np
import pandas as pd

from smlrec.schema import PERIOD, TS

ORIGIN = pd.Timestamp("1970-01-05", tz="UTC")
PERIOD_ID_FORMAT = "%Y-%m-%d"
_SPEC = re.compile(r"([1-9][0-9]*)[dD]")
_PERIOD_ID = re.compile(r"\d{4}-\d{2}-\d{2}")
CALENDAR = {"W": "W-SUN", "M": "M", "Q": "Q-DEC"}
"""Calendar period specs and their pandas period frequencies."""


def parse_period(spec: str) -> pd.Timedelta | None:
    """Check a period spec and return its fixed length: ``"1D"``, ``"7D"`` (N whole days,
    N >= 1), or None for a calendar period (``"W"``, ``"M"``, ``"Q"``), whose length
    varies."""
    text = str(spec).strip()
    if text.upper() in CALENDAR:
        return None
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid period {spec!r}: expected N days such as '1D' (daily) or '7D' (weekly, "
            "Monday to Sunday), or a calendar period: 'W' (ISO weeks), 'M' (months), 'Q' "
            "(quarters)"
        )
    return pd.Timedelta(days=int(match.group(1)))


def _calendar_freq(spec: str) -> str | None:
    return CALENDAR.get(str(spec).strip().upper())


def _shift(start: pd.Timestamp, spec: str, steps: int) -> pd.Timestamp:
    """The start of the period ``steps`` periods after (or before) the one at ``start``."""
    freq = _calendar_freq(spec)
    if freq is None:
        return start + steps * parse_period(spec)
    naive = pd.Timestamp(start).tz_convert("UTC").tz_localize(None)
    return (naive.to_period(freq) + steps).start_time.tz_localize("UTC")


def next_period_start(start: pd.Timestamp, spec: str) -> pd.Timestamp:
    """The first instant of the period after the one starting at ``start``."""
    return _shift(start, spec, 1)


def previous_period_start(start: pd.Timestamp, spec: str) -> pd.Timestamp:
    """The first instant of the period before the one starting at ``start``."""
    return _shift(start, spec, -1)


def _to_utc(ts: pd.Series) -> pd.Series:
    """Return ``ts`` as ``datetime64[ns, UTC]`` (naive values are taken to be UTC)."""
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = pd.to_datetime(ts)
        ts = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts
    return ts.dt.tz_convert("UTC").dt.as_unit("ns")


@overload
def period_start(ts: pd.Timestamp, spec: str) -> pd.Timestamp: ...
@overload
def period_start(ts: pd.Series, spec: str) -> pd.Series: ...
def period_start(ts: pd.Series | pd.Timestamp, spec: str) -> pd.Series | pd.Timestamp:
    """Return the start of the period holding each timestamp (tz-aware UTC; NaT stays NaT).

    Accepts a Series or a single Timestamp; naive values are taken to be UTC.
    """
    if not isinstance(ts, pd.Series):
        return period_start(pd.Series([ts]), spec).iloc[0]
    utc = _to_utc(ts)
    freq = _calendar_freq(spec)
    if freq is not None:
        starts = utc.dt.tz_localize(None).dt.to_period(freq).dt.start_time
        return starts.dt.tz_localize("UTC").dt.as_unit("ns")
    step = parse_period(spec).value
    valid = utc.notna().to_numpy()
    ns = np.where(valid, utc.dt.tz_localize(None).to_numpy().view(np.int64), ORIGIN.value)
    floored = (ns - ORIGIN.value) // step * step + ORIGIN.value
    starts = pd.Series(pd.to_datetime(floored, unit="ns", utc=True), index=ts.index)
    return starts.where(valid)


@overload
def period_id(start: pd.Timestamp) -> str: ...
@overload
def period_id(start: pd.Series) -> pd.Series: ...
def period_id(start: pd.Series | pd.Timestamp) -> pd.Series | str:
    """Format period start(s) as ``YYYY-MM-DD`` period ids."""
    if isinstance(start, pd.Series):
        # Format each distinct start once (a log has millions of rows, few periods).
        codes, uniques = pd.factorize(start)
        labels = np.append(pd.DatetimeIndex(uniques).strftime(PERIOD_ID_FORMAT).to_numpy(
            dtype=object), np.nan)
        return pd.Series(labels[codes], index=start.index, dtype=object)
    return pd.Timestamp(start).strftime(PERIOD_ID_FORMAT)


def assign_periods(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    """Return a copy of ``df`` with the ``period`` column computed from its ``timestamp``."""
    out = df.copy()
    out[PERIOD] = period_id(period_start(out[TS], spec)).astype(object)
    return out


def check_closed(pid: str, spec: str, now: pd.Timestamp | None = None) -> str:
    """Return ``pid`` if period ``pid`` has ended by ``now`` (default: the clock), else raise
    ``ValueError`` saying when it ends: a daily run processes a closed period (its data
    complete, its features materialized up to its end)."""
    _, end = period_bounds(pid, spec)
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    if end > now:
        raise ValueError(f"period {pid} ({spec}) has not closed yet: it ends "
                         f"{end.isoformat().replace('+00:00', 'Z')}; run it after that "
                         "(events logged meanwhile stay in its feedback folder)")
    return pid


def period_bounds(pid: str, spec: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Return the half-open UTC interval ``[start, end)`` covered by period ``pid``.

    Raises ``ValueError`` if ``pid`` is not a ``YYYY-MM-DD`` date that starts a period of
    ``spec`` (for ``"7D"`` it must be a Monday).
    """
    if not isinstance(pid, str) or _PERIOD_ID.fullmatch(pid) is None:
        raise ValueError(f"invalid period id {pid!r}: expected YYYY-MM-DD")
    start = pd.Timestamp(pid, tz="UTC")
    if period_start(start, spec) != start:
        raise ValueError(f"{pid} is not the first day of a {spec} period")
    return start, next_period_start(start, spec)


def empty_periods(ids: Iterable[str], spec: str) -> list[str]:
    """The periods of ``spec`` between the first and the last of ``ids`` that are not in
    ``ids`` (ids that do not start periods of ``spec`` raise ``ValueError``)."""
    have = sorted(set(ids))
    if not have:
        return []
    return sorted(set(period_range(have[0], have[-1], spec)) - set(have))


def period_range(first: str, last: str, spec: str) -> list[str]:
    """Every period id from ``first`` to ``last`` (both period ids), empty ones included."""
    out, start = [], period_bounds(first, spec)[0]
    end = period_bounds(last, spec)[0]
    while start <= end:
        out.append(period_id(start))
        start = next_period_start(start, spec)
    return out
