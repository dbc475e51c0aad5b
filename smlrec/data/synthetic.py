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
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pandas as pd

from smlrec.data.periods import next_period_start, period_id, period_start
from smlrec.data.store import summarize, write_dataset_info, write_interactions
from smlrec.schema import ITEM, PERIOD, TS, USER

NAME = "synthetic"
_CELLS_PER_BATCH = 2_000_000  # users x items probabilities held at once while sampling


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
    rng = np.random.default_rng(seed)
    user_vecs = _unit(rng.standard_normal((n_users, dim)))
    item_vecs = _unit(rng.standard_normal((n_items, dim)))
    log_pop = -popularity_skew * np.log1p(rng.permutation(n_items))
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


def write_synthetic(root: str, **kwargs: Any) -> dict[str, Any]:
    """Generate a stream with :func:`generate_stream` (``kwargs``) and store it at ``root``.

    Replaces what is stored there; ``dataset.json`` is named ``"synthetic"`` and records the
    generator's arguments. Returns the dataset summary.
    """
    root = str(root)
    params = inspect.signature(generate_stream).bind(**kwargs)
    params.apply_defaults()
    df = generate_stream(**params.arguments)
    write_interactions(df, root, replace_all=True)
    info = write_dataset_info(
        root, NAME, params.arguments["period"], extra={"generator": params.arguments}
    )
    return summarize(root, info)
