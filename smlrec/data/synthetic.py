"""A synthetic interaction stream with drifting tastes, for tests and benchmarks.

Users and items have unit latent vectors in ``dim`` dimensions. Every period both drift:
``v <- normalize(sqrt(1 - drift^2) v + drift n)`` with ``n`` a random unit vector, so a model
fit on period ``t`` is useful on ``t + 1`` and less so on later periods. Each period a fixed
number of users is active: a share ``returning_share`` of them drawn from users seen before,
the rest new. Each active user makes at least one interaction (more for more active users),
each choosing item ``i`` with probability ``softmax(<u, v_i> / temperature + log pop_i)``
where ``pop`` is Zipf-like with exponent ``popularity_skew``. Sampling is vectorised (inverse
CDF over users' probability rows), so 10^6 interactions a period take about a second.
A user may interact with the same item more than once.

Side tables (:func:`generate_side_tables`, stored by :func:`write_synthetic` as the ``users``
and ``items`` side tables) carry real but partial information about tastes, as demographics
and genres do. They are built from the users' and items' *initial* latent vectors (so drift
weakens them over time) with a random generator of their own, leaving the stream untouched:

- ``items``: ``item_id``; ``genres``, 1-3 of ``n_genres`` fixed random unit "genre
  directions" (``g00``, ``g01``, ...), ``|``-joined: the one with the highest cosine with the
  item's vector, plus the 2nd and 3rd when their cosine exceeds ``genre_threshold /
  sqrt(dim)`` (``1 / sqrt(dim)`` is the spread of the cosine of two random directions);
  ``year``, an integer release year, more recent for more popular items, plus noise.
- ``users``: ``user_id``; ``segment``, one of ``n_segments`` values ``s0``, ``s1``, ...: the
  fixed random direction with the highest cosine with the user's vector (coarse but
  informative); ``age``, an integer 18-70 weakly correlated with the vector's first
  coordinate; ``region``, one of 5 values ``r0``...``r4`` drawn at random (uninformative).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pandas as pd

from smlrec.data.periods import next_period_start, period_id, period_start
from smlrec.data.store import (
    SIDE_DIR,
    summarize,
    write_dataset_info,
    write_interactions,
    write_side_table,
)
from smlrec.io import url_fs
from smlrec.schema import ITEM, PERIOD, TS, USER

NAME = "synthetic"
_CELLS_PER_BATCH = 2_000_000  # users x items probabilities held at once while sampling
SIDE_TABLES = ("users", "items")
N_REGIONS = 5


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale each row of ``x`` to unit length."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _drift(rng: np.random.Generator, vectors: np.ndarray, drift: float) -> np.ndarray:
    """Move each unit vector a step of size ``drift`` in a random direction."""
    noise = _unit(rng.standard_normal(vectors.shape))
    return _unit(np.sqrt(1.0 - drift**2) * vectors + drift * noise)


def _active_per_period(n_users: int, n_periods: int, returning_share: float) -> int:
    """Active users per period such that the new users over all periods add up to ``n_users``."""
    return max(1, int(np.ceil(n_users / (1 + (n_periods - 1) * (1.0 - returning_share)))))


def _pick_active(
    rng: np.random.Generator, n_seen: int, n_left: int, n_active: int, returning_share: float
) -> tuple[np.ndarray, int]:
    """Return the active users (returning ones from ``[0, n_seen)``, then new ones) and #new."""
    n_returning = min(int(round(n_active * returning_share)), n_seen)
    n_new = min(n_active - n_returning, n_left)
    n_returning = min(n_active - n_new, n_seen)  # top up when new users run out
    returning = np.sort(rng.choice(n_seen, size=n_returning, replace=False))
    return np.concatenate([returning, np.arange(n_seen, n_seen + n_new)]), n_new


def _sample_items(
    rng: np.random.Generator,
    users: np.ndarray,
    items: np.ndarray,
    log_pop: np.ndarray,
    counts: np.ndarray,
    temperature: float,
) -> np.ndarray:
    """Draw ``counts[k]`` items for user vector ``users[k]`` from its softmax distribution.

    Works on batches of users: each user's CDF row is shifted by its row number, so one
    ``searchsorted`` over the batch finds every draw (row ``r`` covers ``(r, r + 1]``).
    """
    n_items = len(items)
    items_t = (items.T / temperature).astype(np.float32)
    log_pop = log_pop.astype(np.float32)
    batch = max(1, _CELLS_PER_BATCH // n_items)
    drawn = []
    for lo in range(0, len(users), batch):
        weights = users[lo : lo + batch].astype(np.float32) @ items_t
        weights += log_pop
        weights -= weights.max(axis=1, keepdims=True)
        np.exp(weights, out=weights)
        cdf = np.cumsum(weights, axis=1).astype(np.float64)
        cdf /= cdf[:, -1:]
        rows = np.arange(len(cdf))
        cdf += rows[:, None]
        owner = np.repeat(rows, counts[lo : lo + batch])
        queries = np.sort(rng.random(len(owner)) + owner)  # sorted: cache-friendly search
        idx = np.searchsorted(cdf.ravel(), queries, side="right")
        drawn.append(np.minimum(idx, cdf.size - 1) - owner * n_items)
    return np.concatenate(drawn)


def _check_args(
    n_users: int, n_items: int, n_periods: int, per_period: int, share: float, drift: float
) -> None:
    """Raise ``ValueError`` for arguments out of range."""
    if min(n_users, n_items, n_periods, per_period) < 1:
        raise ValueError("n_users, n_items, n_periods and interactions_per_period must be >= 1")
    if not 0.0 <= share <= 1.0 or not 0.0 <= drift <= 1.0:
        raise ValueError("returning_share and drift must be between 0 and 1")


def _initial_draws(
    n_users: int, n_items: int, dim: int, seed: int
) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    """The stream's first draws: its generator, the initial user and item vectors, and each
    item's popularity rank (0 = most popular for a positive ``popularity_skew``). The stream
    goes on drawing from the generator."""
    rng = np.random.default_rng(seed)
    user_vecs = _unit(rng.standard_normal((n_users, dim)))
    item_vecs = _unit(rng.standard_normal((n_items, dim)))
    pop_rank = rng.permutation(n_items)
    return rng, user_vecs, item_vecs, pop_rank


def generate_stream(
    n_users: int = 2000,
    n_items: int = 1000,
    n_periods: int = 20,
    interactions_per_period: int = 20000,
    returning_share: float = 0.6,
    drift: float = 0.3,
    dim: int = 16,
    period: str = "1D",
    start: str = "2024-01-01",
    seed: int = 0,
    popularity_skew: float = 1.0,
    temperature: float = 0.1,
) -> pd.DataFrame:
    """Generate a canonical interactions frame (no ratings), the same for the same arguments.

    ``start`` is a date inside the first period; timestamps are whole microseconds drawn
    uniformly inside each period (fine enough that even 10^6 rows a day do not repeat a
    (user, item, timestamp) row, which validation would refuse as a duplicate). User ids
    are ``u<n>``, item ids ``i<n>``.
    """
    _check_args(n_users, n_items, n_periods, interactions_per_period, returning_share, drift)
    if temperature <= 0 or dim < 1:
        raise ValueError("temperature must be > 0 and dim >= 1")
    rng, user_vecs, item_vecs, pop_rank = _initial_draws(n_users, n_items, dim, seed)
    log_pop = -popularity_skew * np.log1p(pop_rank)
    activity = rng.lognormal(0.0, 1.0, n_users)
    n_active = min(_active_per_period(n_users, n_periods, returning_share), interactions_per_period)
    begin = period_start(pd.Timestamp(start, tz="UTC"), period)  # checks the spec too
    frames, n_seen = [], 0
    for t in range(n_periods):
        if t > 0:
            user_vecs = _drift(rng, user_vecs, drift)
            item_vecs = _drift(rng, item_vecs, drift)
        active, n_new = _pick_active(rng, n_seen, n_users - n_seen, n_active, returning_share)
        n_seen += n_new
        weights = activity[active] / activity[active].sum()
        counts = 1 + rng.multinomial(interactions_per_period - len(active), weights)
        items = _sample_items(rng, user_vecs[active], item_vecs, log_pop, counts, temperature)
        if t > 0:
            begin = next_period_start(begin, period)
        length = next_period_start(begin, period) - begin
        micros = rng.integers(0, int(length.total_seconds() * 1e6), size=len(items))
        frames.append(_period_frame(np.repeat(active, counts), items, micros, begin))
    df = pd.concat(frames, ignore_index=True)
    df[USER] = _names("u", n_users)[df[USER].to_numpy()]
    df[ITEM] = _names("i", n_items)[df[ITEM].to_numpy()]
    return df


def _period_frame(
    users: np.ndarray, items: np.ndarray, micros: np.ndarray, begin: pd.Timestamp
) -> pd.DataFrame:
    """Build one period's rows (ids still as indices), sorted by time, then user, then item."""
    order = np.lexsort((items, users, micros))
    return pd.DataFrame(
        {
            USER: users[order],
            ITEM: items[order],
            TS: begin + pd.to_timedelta(micros[order], unit="us"),
            PERIOD: period_id(begin),
        }
    )


def _names(prefix: str, n: int) -> np.ndarray:
    """Return the ids ``<prefix>0 ... <prefix>{n-1}`` as an object array."""
    return np.array([f"{prefix}{k}" for k in range(n)], dtype=object)


def _nearest_directions(vecs: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Cosines of unit ``vecs`` with unit ``directions``, each row's columns sorted by
    decreasing cosine: returns (indices, cosines)."""
    cos = vecs @ directions.T
    order = np.argsort(-cos, axis=1, kind="stable")
    return order, np.take_along_axis(cos, order, axis=1)


def _genres(item_vecs: np.ndarray, rng: np.random.Generator, n_genres: int,
            threshold: float) -> np.ndarray:
    """Each item's 1-3 genres (``|``-joined names), see the module doc."""
    directions = _unit(rng.standard_normal((n_genres, item_vecs.shape[1])))
    order, cos = _nearest_directions(item_vecs, directions)
    names = np.array([f"g{g:02d}" for g in range(n_genres)], dtype=object)
    keep = cos[:, :3] > threshold
    keep[:, 0] = True
    return np.array(
        ["|".join(sorted(names[order[k, :3][keep[k]]])) for k in range(len(item_vecs))],
        dtype=object,
    )


def _years(pop_rank: np.ndarray, popularity_skew: float, rng: np.random.Generator,
           year_corr: float) -> np.ndarray:
    """Release years: popular items more recent (correlation about ``year_corr``), 1980-2024."""
    n = len(pop_rank)
    # about N(0, 1): +1.7 for the most popular item, -1.7 for the least (0 without popularity)
    recency = np.sign(popularity_skew) * (0.5 - pop_rank / max(n - 1, 1)) * np.sqrt(12.0)
    score = year_corr * recency + np.sqrt(1.0 - year_corr**2) * rng.standard_normal(n)
    return np.clip(np.round(2012 + 6 * score), 1980, 2024).astype(np.int64)


def generate_side_tables(
    n_users: int = 2000,
    n_items: int = 1000,
    dim: int = 16,
    seed: int = 0,
    popularity_skew: float = 1.0,
    n_genres: int = 12,
    n_segments: int = 8,
    genre_threshold: float = 1.2,
    age_corr: float = 0.3,
    year_corr: float = 0.6,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the ``users`` and ``items`` side tables of :func:`generate_stream`'s stream for
    the same arguments (see the module doc), one row per user id and per item id.

    They are built from the stream's initial latent vectors and popularity ranks (drawn
    exactly as :func:`generate_stream` draws them) with a generator of their own, so the
    stream is the same with or without them. ``genre_threshold`` is in units of
    ``1 / sqrt(dim)``; ``age_corr`` and ``year_corr`` are about the correlations of age with
    the users' first latent coordinate and of year with popularity.
    """
    if min(n_users, n_items, dim, n_genres, n_segments) < 1:
        raise ValueError("n_users, n_items, dim, n_genres and n_segments must be >= 1")
    if not 0.0 <= age_corr <= 1.0 or not 0.0 <= year_corr <= 1.0:
        raise ValueError("age_corr and year_corr must be between 0 and 1")
    _, user_vecs, item_vecs, pop_rank = _initial_draws(n_users, n_items, dim, seed)
    rng = np.random.default_rng([seed, 1])  # the side tables' own draws
    genres = _genres(item_vecs, rng, n_genres, genre_threshold / np.sqrt(dim))
    years = _years(pop_rank, popularity_skew, rng, year_corr)
    segment_dirs = _unit(rng.standard_normal((n_segments, dim)))
    segment = np.argmax(user_vecs @ segment_dirs.T, axis=1)
    first = user_vecs[:, 0] * np.sqrt(dim)  # about N(0, 1)
    age_score = age_corr * first + np.sqrt(1.0 - age_corr**2) * rng.standard_normal(n_users)
    age = np.clip(np.round(40 + 10 * age_score), 18, 70).astype(np.int64)
    region = rng.integers(0, N_REGIONS, n_users)
    users = pd.DataFrame(
        {
            USER: _names("u", n_users),
            "segment": np.array([f"s{k}" for k in range(n_segments)], dtype=object)[segment],
            "age": age,
            "region": np.array([f"r{k}" for k in range(N_REGIONS)], dtype=object)[region],
        }
    )
    items = pd.DataFrame({ITEM: _names("i", n_items), "genres": genres, "year": years})
    return users, items


def _remove_side_tables(root: str) -> None:
    """Delete the ``users`` and ``items`` side tables stored at ``root``, if any."""
    fs, path = url_fs(root)
    for name in SIDE_TABLES:
        file = f"{path.rstrip('/')}/{SIDE_DIR}/{name}.parquet"
        if fs.exists(file):
            fs.rm(file)


def write_synthetic(root: str, side: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Generate a stream with :func:`generate_stream` (``kwargs``) and store it at ``root``.

    Replaces what is stored there; ``dataset.json`` is named ``"synthetic"`` and records the
    generator's arguments. With ``side`` (the default) the ``users`` and ``items`` side tables
    of :func:`generate_side_tables` are stored too (``kwargs`` may hold its own arguments,
    e.g. ``n_genres``) and their columns recorded as ``side_tables``; without, any stored
    ``users`` and ``items`` side tables are deleted (they would describe another stream).
    Returns the dataset summary.
    """
    root = str(root)
    side_only = set(inspect.signature(generate_side_tables).parameters) - set(
        inspect.signature(generate_stream).parameters
    )
    side_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in side_only}
    if side_kwargs and not side:
        raise TypeError(f"side table arguments without side tables: {sorted(side_kwargs)}")
    params = inspect.signature(generate_stream).bind(**kwargs)
    params.apply_defaults()
    df = generate_stream(**params.arguments)
    write_interactions(df, root, replace_all=True)
    extra: dict[str, Any] = {"generator": params.arguments}
    if side:
        shared = {k: params.arguments[k] for k in ("n_users", "n_items", "dim", "seed",
                                                   "popularity_skew")}
        tables = dict(zip(SIDE_TABLES, generate_side_tables(**shared, **side_kwargs),
                          strict=True))
        for name, table in tables.items():
            write_side_table(table, root, name)
        extra["side_tables"] = {name: list(table.columns) for name, table in tables.items()}
    else:
        _remove_side_tables(root)
    info = write_dataset_info(root, NAME, params.arguments["period"], extra=extra)
    return summarize(root, info)
