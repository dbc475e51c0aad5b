"""Per-period feature aggregates, computed from canonical interaction frames (pure pandas).

Every function here turns one period's interactions (see :mod:`smlrec.schema`) into one
feature table: entity key column(s), an ``event_timestamp`` and the feature columns. The
tables are what the Feast adapter (``adapters/feast_store.py``) writes to the offline
store; nothing here knows about Feast.

Timestamps: a period's aggregates are stamped :func:`feature_timestamp` of the period's
(exclusive) end, i.e. one microsecond before it. The features are "known at the end of the
period": a point-in-time join gives them to entity rows stamped at or after that instant and
never to rows inside the period itself. (Microseconds, not nanoseconds: Feast's online
stores and protobuf timestamps keep microseconds.) Side information (user demographics,
item metadata) is stamped :data:`SIDE_INFO_TIMESTAMP`, early enough to be valid for every
period.

Ids stay strings throughout.
"""

from __future__ import annotations

import pandas as pd

from smlrec.schema import ITEM, TS, USER

EVENT_TS = "event_timestamp"
"""Name of the timestamp column of every feature table."""

SEGMENT = "segment_id"
"""Join key of the population-level views (one row per segment; ``"all"`` = everyone)."""

ALL_SEGMENT = "all"
"""The segment holding every user: the key of the global top-items row."""

SIDE_INFO_TIMESTAMP = pd.Timestamp("1970-01-01", tz="UTC")
"""Timestamp of static side information: earlier than any interaction."""

RECENT_K = 20
"""Default number of recent items kept per user."""

TOP_K = 100
"""Default number of items kept in the global top-items list."""

SEPARATOR = ","
"""Separator of the id lists stored as strings (``recent_items``, ``top_items``)."""


def _utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    """Return ``ts`` as a tz-aware UTC timestamp (naive values are taken to be UTC)."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def feature_timestamp(period_end: pd.Timestamp | str) -> pd.Timestamp:
    """Return the event timestamp of a period's aggregates: one microsecond before its end."""
    return _utc(period_end) - pd.Timedelta(1, "us")


def utc_series(ts: pd.Series) -> pd.Series:
    """Return a timestamp column as ``datetime64[ns, UTC]`` (naive values are taken as UTC)."""
    ts = pd.to_datetime(ts)
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize("UTC")
    return ts.dt.tz_convert("UTC").dt.as_unit("ns")


def _period_rows(df: pd.DataFrame, period_end: pd.Timestamp | str) -> pd.DataFrame:
    """Return ``df[[user_id, item_id, timestamp]]`` with string ids and UTC timestamps.

    Raises ``ValueError`` if a row is at or after ``period_end``: such a row would leak into
    features stamped as known at the end of the period.
    """
    missing = [c for c in (USER, ITEM, TS) if c not in df.columns]
    if missing:
        raise ValueError(f"interactions frame lacks column(s) {', '.join(missing)}")
    out = pd.DataFrame(
        {USER: df[USER].astype(str), ITEM: df[ITEM].astype(str), TS: utc_series(df[TS])}
    ).reset_index(drop=True)
    end = _utc(period_end)
    late = out[TS] >= end
    if late.any():
        raise ValueError(
            f"{int(late.sum())} interaction(s) at or after the period end {end.isoformat()} "
            f"(latest {out[TS].max().isoformat()})"
        )
    return out


def user_activity(df: pd.DataFrame, period_end: pd.Timestamp | str) -> pd.DataFrame:
    """Return one row per user active in the period, with their activity counts.

    Columns: ``user_id``, ``event_timestamp`` (:func:`feature_timestamp` of ``period_end``),
    ``n_interactions`` (rows in the period), ``n_items`` (distinct items) and ``last_seen``
    (the user's latest interaction time). Sorted by ``user_id``.
    """
    rows = _period_rows(df, period_end)
    grouped = rows.groupby(USER, sort=True)
    out = pd.DataFrame(
        {
            "n_interactions": grouped.size().astype("int64"),
            "n_items": grouped[ITEM].nunique().astype("int64"),
            "last_seen": grouped[TS].max(),
        }
    ).reset_index()
    out.insert(1, EVENT_TS, feature_timestamp(period_end))
    out[EVENT_TS] = out[EVENT_TS].astype("datetime64[ns, UTC]")
    out[USER] = out[USER].astype(object)
    return out


def recent_items(
    df: pd.DataFrame,
    period_end: pd.Timestamp | str,
    history: pd.DataFrame | None = None,
    k: int = RECENT_K,
) -> pd.DataFrame:
    """Return each period user's last ``k`` distinct items, newest first, as one string.

    Columns: ``user_id``, ``event_timestamp``, ``recent_items`` (item ids joined with
    :data:`SEPARATOR`). Only users active in ``df`` get a row (the others' lists did not
    change); their lists look back into ``history`` (earlier interactions, a canonical
    frame) as well. An item seen several times counts once, at its latest time.
    Interactions with equal timestamps are ordered as they appear in ``history`` then
    ``df``, a later row counting as newer. Sorted by ``user_id``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rows = _period_rows(df, period_end)
    users = rows[USER].unique()
    if history is not None and len(history):
        past = _period_rows(history, period_end)
        past = past[past[USER].isin(users)]
        rows = pd.concat([past, rows], ignore_index=True)
    rows = rows.sort_values(TS, kind="stable", ignore_index=True).iloc[::-1]
    rows = rows.drop_duplicates([USER, ITEM], keep="first")
    top = rows.groupby(USER, sort=True).head(k)
    lists = top.groupby(USER, sort=True)[ITEM].agg(SEPARATOR.join)
    out = pd.DataFrame({USER: lists.index.astype(object), "recent_items": lists.to_numpy()})
    out.insert(1, EVENT_TS, feature_timestamp(period_end))
    out[EVENT_TS] = out[EVENT_TS].astype("datetime64[ns, UTC]")
    return out


def item_popularity(df: pd.DataFrame, period_end: pd.Timestamp | str) -> pd.DataFrame:
    """Return one row per item interacted with in the period, with its popularity.

    Columns: ``item_id``, ``event_timestamp``, ``n_interactions`` (rows in the period),
    ``share`` (``n_interactions`` over the period's rows) and ``rank`` (1 = most popular;
    ties broken by item id as a string, so ranks are unique). Sorted by ``rank``.
    """
    rows = _period_rows(df, period_end)
    counts = rows.groupby(ITEM, sort=True).size().astype("int64")
    out = pd.DataFrame({ITEM: counts.index.astype(object), "n_interactions": counts.to_numpy()})
    out = out.sort_values(["n_interactions", ITEM], ascending=[False, True], ignore_index=True)
    out["share"] = out["n_interactions"] / max(len(rows), 1)
    out["rank"] = pd.Series(range(1, len(out) + 1), dtype="int64")
    out.insert(1, EVENT_TS, feature_timestamp(period_end))
    out[EVENT_TS] = out[EVENT_TS].astype("datetime64[ns, UTC]")
    return out


def top_items(df: pd.DataFrame, period_end: pd.Timestamp | str, k: int = TOP_K) -> pd.DataFrame:
    """Return the period's ``k`` most popular items as one row keyed by segment ``"all"``.

    Columns: ``segment_id``, ``event_timestamp``, ``top_items`` (item ids by
    :func:`item_popularity` rank, joined with :data:`SEPARATOR`) and ``n_items`` (how many
    ids the list holds). Serving reads this single row for users it does not know.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranked = item_popularity(df, period_end).head(k)
    out = pd.DataFrame(
        {
            SEGMENT: [ALL_SEGMENT],
            EVENT_TS: [feature_timestamp(period_end)],
            "top_items": [SEPARATOR.join(ranked[ITEM])],
            "n_items": [len(ranked)],
        }
    )
    out[SEGMENT] = out[SEGMENT].astype(object)
    out[EVENT_TS] = out[EVENT_TS].astype("datetime64[ns, UTC]")
    out["n_items"] = out["n_items"].astype("int64")
    return out


def split_ids(value: object) -> list[str]:
    """Split a stored id list (``recent_items``, ``top_items``); missing values give ``[]``."""
    if not isinstance(value, str) or not value:
        return []
    return value.split(SEPARATOR)


def _side_frame(key: str, table: pd.DataFrame, ts: pd.Timestamp | str) -> pd.DataFrame:
    """Return ``table`` with ``key`` as strings (unique) and an ``event_timestamp`` after it."""
    if key not in table.columns:
        raise ValueError(f"side table lacks its key column {key!r}")
    if table[key].duplicated().any():
        raise ValueError(f"side table has duplicate {key} values")
    out = pd.DataFrame({key: table[key].astype(str).astype(object).to_numpy()})
    out[EVENT_TS] = pd.Series(_utc(ts), index=out.index).astype("datetime64[ns, UTC]")
    return out


def _ints(values: pd.Series) -> pd.arrays.IntegerArray:
    """Return ``values`` as a nullable int64 array (unparseable values become ``<NA>``)."""
    return pd.array(pd.to_numeric(values, errors="coerce").astype("Int64"), dtype="Int64")


def _strings(values: pd.Series) -> object:
    """Return ``values`` as an object array of ``str``, missing values as ``None``."""
    return values.astype(str).where(values.notna(), None).astype(object).to_numpy()


def user_side(
    users_table: pd.DataFrame, ts: pd.Timestamp | str = SIDE_INFO_TIMESTAMP
) -> pd.DataFrame:
    """Return the users side table as a feature table: user demographics, valid from ``ts``.

    Columns: ``user_id``, ``event_timestamp``, ``age`` (int64, missing as ``<NA>``),
    ``gender`` and ``occupation`` (strings). Takes the MovieLens ``users`` side table
    (:func:`smlrec.data.store.read_side_table` with ``"users"``).
    """
    out = _side_frame(USER, users_table, ts)
    out["age"] = _ints(users_table["age"])
    for column in ("gender", "occupation"):
        out[column] = _strings(users_table[column])
    return out


def item_side(
    items_table: pd.DataFrame, ts: pd.Timestamp | str = SIDE_INFO_TIMESTAMP
) -> pd.DataFrame:
    """Return the items side table as a feature table: item metadata, valid from ``ts``.

    Columns: ``item_id``, ``event_timestamp``, ``year`` (release year, int64, missing as
    ``<NA>``) and ``genres`` (``|``-joined genre names). Takes the MovieLens ``items`` side
    table (:func:`smlrec.data.store.read_side_table` with ``"items"``).
    """
    out = _side_frame(ITEM, items_table, ts)
    out["year"] = _ints(items_table["year"])
    out["genres"] = _strings(items_table["genres"])
    return out
