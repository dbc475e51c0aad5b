"""Retraining periods: fixed N-day blocks of UTC time.

Periods are anchored at :data:`ORIGIN` (Monday 1970-01-05 00:00 UTC), so ``"7D"`` gives
Monday-to-Sunday weeks (the same blocks as pandas ``W-SUN`` periods) and ``"1D"`` gives UTC
calendar days. A period is named by the date of its first day, ``YYYY-MM-DD``.
"""

from __future__ import annotations

import re
from typing import overload

import numpy as np
import pandas as pd

from smlrec.schema import PERIOD, TS

ORIGIN = pd.Timestamp("1970-01-05", tz="UTC")
PERIOD_ID_FORMAT = "%Y-%m-%d"
_SPEC = re.compile(r"([1-9][0-9]*)[dD]")
_PERIOD_ID = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_period(spec: str) -> pd.Timedelta:
    """Return the length of a period spec such as ``"1D"`` or ``"7D"`` (N whole days, N >= 1)."""
    match = _SPEC.fullmatch(str(spec).strip())
    if match is None:
        raise ValueError(
            f"invalid period {spec!r}: expected a positive whole number of days such as "
            "'1D' (daily) or '7D' (weekly, Monday to Sunday)"
        )
    return pd.Timedelta(days=int(match.group(1)))


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
    step = parse_period(spec).value
    utc = _to_utc(ts)
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
        return start.dt.strftime(PERIOD_ID_FORMAT)
    return pd.Timestamp(start).strftime(PERIOD_ID_FORMAT)


def assign_periods(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    """Return a copy of ``df`` with the ``period`` column computed from its ``timestamp``."""
    out = df.copy()
    out[PERIOD] = period_id(period_start(out[TS], spec)).astype(object)
    return out


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
    return start, start + parse_period(spec)
