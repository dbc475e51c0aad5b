"""Ranking metrics for implicit-feedback recommenders.

Everything works on integer indices (users ``0..n_users-1``, items ``0..n_items-1``) and on
torch tensors on whatever device the scores come back on (CPU or CUDA). Users are processed in
batches so that the full ``n_users x n_items`` score matrix never exists at once.

Two protocols:

- :func:`full_ranking`: every user's held-out positives are ranked against all candidate items
  the user has not interacted with in training (Recall, NDCG, Precision, Hit @K).
- :func:`sampled_ranking`: the SML paper's protocol; each held-out positive is ranked against
  ``n_negatives`` sampled items the user never interacted with (Recall = hit rate, NDCG, AUC).

Both return plain python numbers in a dict: ``"recall@20"``, ``"ndcg@20"``, ... as floats, and
the counts ``"n_users"`` and ``"n_interactions"`` as ints. :func:`weighted_mean` averages such
dicts over periods, weighted by the number of test interactions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""``scorer(user_idx)``: ``user_idx`` is a CPU LongTensor ``[B]``; returns float scores
``[B, n_items]`` (higher = better) on any device."""

PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``scorer_pairs(users, items)``: CPU LongTensors ``users [B]`` and ``items [B, M]``; returns
float scores ``[B, M]``, the score of ``items[b, j]`` for ``users[b]``, on any device."""

IndexArray = np.ndarray | torch.Tensor | Sequence[int]


# --------------------------------------------------------------------------- scorers


def mf_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor) -> Scorer:
    """Matrix-factorisation scorer: ``score(u, i) = <user_emb[u], item_emb[i]>``."""
    _check_embeddings(user_emb, item_emb)

    def score(user_idx: torch.Tensor) -> torch.Tensor:
        return user_emb[user_idx.to(user_emb.device)] @ item_emb.T

    return score


def popularity_scorer(item_scores: torch.Tensor) -> Scorer:
    """Scorer giving every user the same vector: ``score(u, i) = item_scores[i]``."""
    if item_scores.dim() != 1:
        raise ValueError(f"item_scores must be 1-D, got shape {tuple(item_scores.shape)}")

    def score(user_idx: torch.Tensor) -> torch.Tensor:
        return item_scores.unsqueeze(0).expand(len(user_idx), -1)

    return score


def mf_pair_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor) -> PairScorer:
    """Pair version of :func:`mf_scorer`.

    ``score[b, j] = <user_emb[users[b]], item_emb[items[b, j]]>``. When the catalogue has at
    most ``64 * M`` items (``M = items.shape[1]``) it computes the users' full score rows and
    picks the requested ones (one matmul, no ``[B, M, dim]`` gather), otherwise it gathers the
    item embeddings.
    """
    _check_embeddings(user_emb, item_emb)

    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = user_emb[users.to(user_emb.device)]
        items = items.to(item_emb.device)
        if item_emb.shape[0] <= 64 * items.shape[1]:
            return torch.gather(u @ item_emb.T, 1, items)
        return torch.bmm(item_emb[items], u.unsqueeze(2)).squeeze(2)

    return score


def popularity_pair_scorer(item_scores: torch.Tensor) -> PairScorer:
    """Pair version of :func:`popularity_scorer`: ``score[b, j] = item_scores[items[b, j]]``."""
    if item_scores.dim() != 1:
        raise ValueError(f"item_scores must be 1-D, got shape {tuple(item_scores.shape)}")

    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return item_scores[items.to(item_scores.device)]

    return score


def _check_embeddings(user_emb: torch.Tensor, item_emb: torch.Tensor) -> None:
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            "user_emb and item_emb must be 2-D with the same width, got shapes "
            f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
        )
    if user_emb.device != item_emb.device:
        raise ValueError(f"user_emb is on {user_emb.device} but item_emb on {item_emb.device}")


# --------------------------------------------------------------------------- full ranking


@torch.no_grad()
def full_ranking(
    scorer: Scorer,
    test_users: IndexArray,
    test_items: IndexArray,
    n_items: int,
    exclude_users: IndexArray | None = None,
    exclude_items: IndexArray | None = None,
    ks: Sequence[int] = (5, 10, 20),
    batch_size: int = 1024,
    candidate_mask: torch.Tensor | None = None,
    per_user: bool = False,
) -> dict[str, Any]:
    """Rank all candidate items for every test user; Recall/NDCG/Precision/Hit at each K.

    Inputs:

    - test pairs ``(test_users[j], test_items[j])``: the held-out positives; duplicates count
      once. ``R_u`` is the set of user ``u``'s test items.
    - exclude pairs ``(exclude_users[j], exclude_items[j])``: items each user already
      interacted with (training history). They get score ``-inf`` for that user before ranking.
      **Test pairs that are also exclude pairs are dropped** (they cannot be hits).
    - ``candidate_mask`` (bool ``[n_items]``, any device): only these items are ranked, the
      others get ``-inf``; **test pairs whose item is not a candidate are dropped**.

    With ``top_K(u)`` the K best-scored items of ``u`` (``torch.topk``, ties broken
    arbitrarily) and ``r = 0, 1, ...`` the 0-based rank of each hit ``i in top_K(u) ∩ R_u``:

    - ``recall@K    = |top_K(u) ∩ R_u| / |R_u|``
    - ``precision@K = |top_K(u) ∩ R_u| / K``
    - ``hit@K       = 1 if top_K(u) ∩ R_u else 0``
    - ``ndcg@K      = DCG@K / IDCG@K``, ``DCG@K = Σ_hits 1 / log2(r + 2)``,
      ``IDCG@K = Σ_{r < min(|R_u|, K)} 1 / log2(r + 2)`` (binary gains)

    Each is averaged over the users with ``|R_u| > 0`` after dropping. Also returned:
    ``n_users`` (those users) and ``n_interactions`` (``Σ_u |R_u|``). With no test pairs left,
    the metrics are NaN and both counts 0.

    ``scorer`` is called on CPU LongTensors of at most ``batch_size`` user indices; the
    masking, ``topk`` and sums run on the device of the scores it returns.

    With ``per_user``, the result also has ``"per_user"``: numpy arrays ``user`` (the test
    users, sorted), ``n_relevant`` (``|R_u|``) and one array per metric (``"ndcg@20"``...),
    aligned, for paired comparisons such as :func:`paired_bootstrap`.
    """
    ks = _check_ks(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tu, ti = _pairs(test_users, test_items, n_items, "test")
    eu, ei = _pairs(exclude_users, exclude_items, n_items, "exclude")
    cand = _candidate_array(candidate_mask, n_items)

    keys, seen = _test_and_seen_keys(tu, ti, eu, ei, n_items, cand)
    users, t_row, n_rel = _runs(keys // n_items)
    ti = keys % n_items
    # Exclusions of test users only, as (row in `users`, item), sorted by row.
    e_row, in_test = _find(users, seen // n_items)
    e_row, ei = e_row[in_test], seen[in_test] % n_items

    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "precision", "hit")]
    if len(users) == 0:
        out = {**dict.fromkeys(names, math.nan), "n_users": 0, "n_interactions": 0}
        if per_user:
            out["per_user"] = {"user": users, "n_relevant": n_rel,
                               **{n: np.zeros(0) for n in names}}
        return out

    top = min(max(ks), n_items)
    disc = 1.0 / torch.log2(torch.arange(top, dtype=torch.float64) + 2)
    idcg = disc.cumsum(0)
    not_cand = None if cand.all() else torch.from_numpy(~cand)
    sums, n_nan, rows_out = [], [], []
    for start in range(0, len(users), batch_size):
        stop = min(start + batch_size, len(users))
        b = stop - start
        scores = scorer(torch.from_numpy(users[start:stop]))
        if scores.shape != (b, n_items):
            raise ValueError(
                f"scorer returned shape {tuple(scores.shape)}, expected {(b, n_items)}"
            )
        dev = scores.device
        dtype = scores.dtype if scores.is_floating_point() else torch.float32
        # Copy: the scorer may hand out a view of its own state (popularity_scorer does).
        scores = scores.to(dtype=dtype, copy=True)
        n_nan.append(torch.isnan(scores).sum())
        if not_cand is not None:
            scores.masked_fill_(not_cand.to(dev), -math.inf)
        lo, hi = np.searchsorted(e_row, [start, stop])
        rows = torch.from_numpy(e_row[lo:hi] - start).to(dev)
        scores[rows, torch.from_numpy(ei[lo:hi]).to(dev)] = -math.inf

        top_idx = torch.topk(scores, top, dim=1).indices
        lo, hi = np.searchsorted(t_row, [start, stop])
        batch_keys = torch.from_numpy((t_row[lo:hi] - start) * n_items + ti[lo:hi]).to(dev)
        top_keys = torch.arange(b, device=dev).unsqueeze(1) * n_items + top_idx
        hits = torch.isin(top_keys, batch_keys).to(torch.float64)
        n_hit = hits.cumsum(1)
        dcg = (hits * disc.to(dev)).cumsum(1)
        rel = torch.from_numpy(n_rel[start:stop]).to(dev)
        per_k = []
        for k in ks:
            c = min(k, top) - 1
            ideal = idcg.to(dev)[torch.clamp(rel, max=min(k, top)) - 1]
            per_k += [n_hit[:, c] / rel, dcg[:, c] / ideal, n_hit[:, c] / k, n_hit[:, c] > 0]
        sums.append(torch.stack([x.to(torch.float64).sum() for x in per_k]))
        if per_user:
            rows_out.append(torch.stack([x.to(torch.float64) for x in per_k], 1).cpu())

    _raise_on_nan(n_nan, "scorer")
    means = (torch.stack(sums).sum(0) / len(users)).tolist()
    out = {
        **dict(zip(names, means, strict=True)),
        "n_users": len(users),
        "n_interactions": len(keys),
    }
    if per_user:
        table = torch.cat(rows_out).numpy()
        out["per_user"] = {"user": users, "n_relevant": n_rel,
                           **{n: table[:, j] for j, n in enumerate(names)}}
    return out


# --------------------------------------------------------------------------- bootstrap


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray],
                     weights: Sequence[float] | None = None, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """A paired, stratified bootstrap interval for ``mean(a) / mean(b)``.

    ``a[s]`` and ``b[s]`` are per-unit values (e.g. each test user's NDCG@20 under a model
    and under the popularity floor) of stratum ``s`` (a test period), aligned unit by
    unit. The statistic is the weighted mean over strata of the per-stratum means,
    ``Σ_s w_s mean(x_s) / Σ_s w_s`` (weights ``w_s``: e.g. the period's test interactions,
    as the backtest averages; default equal), for ``a`` over the same for ``b``. Each
    replicate resamples the units of every stratum with replacement, the same units for
    ``a`` and ``b`` (paired). Returns ``ratio`` (on the data), ``low`` and ``high`` (the
    percentile interval at ``level``), ``diff`` (weighted mean of a - b) and
    ``p_not_better`` (the share of replicates with ratio <= 1).
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} strata in a, {len(b)} in b")
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    strata = [(np.asarray(x, float), np.asarray(y, float), ws)
              for x, y, ws in zip(a, b, w, strict=True) if len(x)]
    for x, y, _ in strata:
        if x.shape != y.shape:
            raise ValueError(f"paired values differ in length: {len(x)} vs {len(y)}")
    if not strata:
        return {"ratio": math.nan, "low": math.nan, "high": math.nan, "diff": math.nan,
                "p_not_better": math.nan, "n_units": 0}
    total = sum(ws for _, _, ws in strata)
    rng = np.random.default_rng(seed)
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for x, y, ws in strata:
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        num += ws * x[idx].mean(1)
        den += ws * y[idx].mean(1)
    ma = sum(ws * x.mean() for x, _, ws in strata) / total
    mb = sum(ws * y.mean() for _, y, ws in strata) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num / den
    alpha = (1 - level) / 2
    low, high = np.nanquantile(ratios, [alpha, 1 - alpha]) if np.isfinite(ratios).any() else (
        math.nan, math.nan)
    return {"ratio": float(ma / mb) if mb else math.nan, "low": float(low),
            "high": float(high), "diff": float(ma - mb),
            "p_not_better": float(np.mean(~(ratios > 1))),
            "n_units": int(sum(len(x) for x, _, _ in strata))}


# --------------------------------------------------------------------------- sampled ranking


@torch.no_grad()
def sampled_ranking(
    scorer_pairs: PairScorer,
    test_users: IndexArray,
    test_items: IndexArray,
    n_items: int,
    exclude_users: IndexArray | None,
    exclude_items: IndexArray | None,
    n_negatives: int = 999,
    ks: Sequence[int] = (20,),
    seed: int = 0,
    candidate_items: IndexArray | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Rank every test positive against ``n_negatives`` sampled negatives (the SML protocol).

    Test pairs are deduplicated; as in :func:`full_ranking`, test pairs that are also exclude
    pairs, and test pairs whose item is not in ``candidate_items`` (default: all items), are
    dropped. For a positive ``(u, i)`` the eligible negatives are the candidate items that ``u``
    never interacted with: not in ``u``'s exclude pairs and not among ``u``'s test items.
    ``N = min(n_negatives, #eligible)`` of them are drawn uniformly without replacement,
    independently per positive, with ``numpy.random.default_rng(seed)``; positives processed in
    batches of ``batch_size`` (the sample depends on ``seed``, ``batch_size`` and the data). A
    positive with no eligible negative at all is dropped.

    Ties count half (the expected rank under random tie-breaking):

    - ``rank = #{neg: s_neg > s_pos} + 0.5 * #{neg: s_neg == s_pos}`` (may be fractional)
    - ``recall@K = 1 if rank < K else 0`` (hit rate)
    - ``ndcg@K   = 1 / log2(rank + 2) if rank < K else 0``
    - ``auc      = (#{neg: s_neg < s_pos} + 0.5 * #{neg: s_neg == s_pos}) / N = 1 - rank / N``

    Each is averaged over the positives. Also returned: ``n_users`` (users with at least one
    positive) and ``n_interactions`` (positives evaluated).

    ``scorer_pairs`` gets CPU LongTensors ``users [B]`` and ``items [B, 1 + n_negatives]``
    (column 0 is the positive; padding columns, when ``N < n_negatives``, repeat the positive
    and are ignored); the comparisons run on the device of the scores it returns.
    """
    ks = _check_ks(ks)
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tu, ti = _pairs(test_users, test_items, n_items, "test")
    eu, ei = _pairs(exclude_users, exclude_items, n_items, "exclude")
    if candidate_items is None:
        candidates = np.arange(n_items, dtype=np.int64)
    else:
        candidates = _sorted_unique(_index_array(candidate_items, "candidate_items", n_items))
    is_cand = np.zeros(n_items, dtype=bool)
    is_cand[candidates] = True
    cand_pos = np.full(n_items, -1, dtype=np.int64)
    cand_pos[candidates] = np.arange(len(candidates))

    keys, seen = _test_and_seen_keys(tu, ti, eu, ei, n_items, is_cand)
    users, u_row, _ = _runs(keys // n_items)

    # Forbidden negatives of each test user (seen or test items), as positions in `candidates`,
    # sorted by (user row, position); user row r has n_cand - n_forbidden[r] eligible items.
    seen = seen[_find(users, seen // n_items)[1] & is_cand[seen % n_items]]
    forbidden = _sorted_unique(np.concatenate([seen, keys]))
    f_row = np.searchsorted(users, forbidden // n_items)
    f_pos = cand_pos[forbidden % n_items]
    n_forbidden = np.bincount(f_row, minlength=len(users))
    n_cand = len(candidates)
    n_eligible = n_cand - n_forbidden[u_row]
    # The j-th eligible position is j + #{t: f_t - t <= j} over the user's forbidden positions
    # f_0 < f_1 < ...; `gap_keys` holds f_t - t offset by user row, so it is globally sorted.
    first = np.concatenate([[0], np.cumsum(n_forbidden)[:-1]])
    stride = n_cand + 1
    gap_keys = f_row * stride + f_pos - (np.arange(len(f_row)) - first[f_row])

    keep = n_eligible > 0
    pos_items, u_row, n_eligible = keys[keep] % n_items, u_row[keep], n_eligible[keep]
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + ["auc"]
    if len(pos_items) == 0:
        return {**dict.fromkeys(names, math.nan), "n_users": 0, "n_interactions": 0}

    rng = np.random.default_rng(seed)
    sums, n_nan = [], []
    for start in range(0, len(pos_items), batch_size):
        stop = min(start + batch_size, len(pos_items))
        rows = u_row[start:stop]
        j, valid = _sample_distinct(rng, n_eligible[start:stop], n_negatives)
        # Search only the batch's users' slice of `gap_keys` (rows are sorted): cache-friendly.
        lo, hi = first[rows[0]], first[rows[-1]] + n_forbidden[rows[-1]]
        local = gap_keys[lo:hi]
        pos = j + np.searchsorted(local, rows[:, None] * stride + j, side="right")
        pos -= (first[rows] - lo)[:, None]
        neg = np.where(valid, candidates[pos], pos_items[start:stop, None])
        items = np.concatenate([pos_items[start:stop, None], neg], axis=1)
        scores = scorer_pairs(torch.from_numpy(users[rows]), torch.from_numpy(items))
        if scores.shape != items.shape:
            raise ValueError(
                f"scorer_pairs returned shape {tuple(scores.shape)}, expected {items.shape}"
            )
        n_nan.append(torch.isnan(scores).sum())
        valid_t = torch.from_numpy(valid).to(scores.device)
        s_pos, s_neg = scores[:, :1], scores[:, 1:]
        higher = ((s_neg > s_pos) & valid_t).sum(1).to(torch.float64)
        ties = ((s_neg == s_pos) & valid_t).sum(1).to(torch.float64)
        rank = higher + 0.5 * ties
        per_k = []
        for k in ks:
            hit = rank < k
            per_k += [hit, torch.where(hit, 1.0 / torch.log2(rank + 2), 0.0)]
        auc = 1.0 - rank / valid_t.sum(1)
        sums.append(torch.stack([x.to(torch.float64).sum() for x in [*per_k, auc]]))

    _raise_on_nan(n_nan, "scorer_pairs")
    means = (torch.stack(sums).sum(0) / len(pos_items)).tolist()
    n_users = len(_runs(u_row)[0])
    return {
        **dict(zip(names, means, strict=True)),
        "n_users": n_users,
        "n_interactions": len(pos_items),
    }


def _sample_distinct(
    rng: np.random.Generator, m: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``r``, ``min(n, m[r])`` distinct integers drawn uniformly from ``[0, m[r])``.

    Returns ``(values [R, n] int64, valid [R, n] bool)``; the valid entries of each row come
    first. Rows with ``m >= 2n`` draw with replacement and redraw duplicates (each round keeps
    at most half of them); the others take the first ``n`` of a random permutation.
    """
    values = np.zeros((len(m), n), dtype=np.int64)
    valid = np.arange(n) < np.minimum(m, n)[:, None]
    sparse = m >= 2 * n
    if sparse.any():
        ms = m[sparse][:, None]
        # floor(U[0, 1) * m) < m in float64; int32 sorts several times faster than int64.
        draw = np.sort((rng.random((len(ms), n)) * ms).astype(np.int32), axis=1)
        redo = np.arange(len(ms))
        while len(redo):
            sub = draw[redo]
            dup = np.zeros(sub.shape, dtype=bool)
            dup[:, 1:] = sub[:, 1:] == sub[:, :-1]
            has_dup = dup.any(axis=1)
            redo, sub, dup = redo[has_dup], sub[has_dup], dup[has_dup]
            sub[dup] = rng.random(dup.sum()) * np.broadcast_to(ms[redo], sub.shape)[dup]
            draw[redo] = np.sort(sub, axis=1)
        values[sparse] = draw
    dense = ~sparse
    if dense.any():
        md = m[dense]
        width = int(md.max())
        noise = rng.random((len(md), width))
        noise[np.arange(width) >= md[:, None]] = np.inf
        values[dense, : min(n, width)] = np.argsort(noise, axis=1)[:, :n]
        values[~valid] = 0
    return values, valid


# --------------------------------------------------------------------------- aggregation


def weighted_mean(
    per_period: Sequence[dict[str, float]], weight_key: str = "n_interactions"
) -> dict[str, float]:
    """Average metrics over periods, weighting period ``p`` by ``w_p = per_period[p][weight_key]``.

    ``mean[m] = Σ_p w_p * per_period[p][m] / Σ_p w_p`` over the periods with ``w_p > 0``
    (periods with weight 0, whose metrics are typically NaN, are skipped). Count keys
    (``weight_key`` and every other key starting with ``n_``) are summed over all periods
    instead. All dicts must have the same keys. With a total weight of 0, the metrics are NaN.
    """
    if not per_period:
        raise ValueError("weighted_mean needs at least one period")
    keys = list(per_period[0])
    if weight_key not in keys:
        raise ValueError(f"weight key {weight_key!r} not in {keys}")
    for p, d in enumerate(per_period):
        if set(d) != set(keys):
            raise ValueError(f"period {p} has keys {sorted(d)}, period 0 has {sorted(keys)}")
        if d[weight_key] < 0:
            raise ValueError(f"period {p} has negative weight {weight_key}={d[weight_key]}")
    weighted = [d for d in per_period if d[weight_key] > 0]
    total = sum(d[weight_key] for d in weighted)
    out: dict[str, float] = {}
    for key in keys:
        if key == weight_key or key.startswith("n_"):
            out[key] = sum(d[key] for d in per_period)
        elif total > 0:
            out[key] = sum(d[weight_key] * d[key] for d in weighted) / total
        else:
            out[key] = math.nan
    return out


# --------------------------------------------------------------------------- index helpers
# Sort-based on purpose: np.unique / np.isin hash int64 keys and are ~20x slower on millions.


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    return _runs(np.sort(x))[0]


def _find(sorted_values: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, found)``: ``sorted_values[idx] == x`` where ``found``."""
    idx = np.searchsorted(sorted_values, x)
    if not len(sorted_values):
        return idx, np.zeros(len(x), dtype=bool)
    return idx, sorted_values[np.minimum(idx, len(sorted_values) - 1)] == x


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, run_index, run_lengths)`` of a sorted array, like ``np.unique`` with
    ``return_inverse`` and ``return_counts``."""
    starts = np.ones(len(sorted_values), dtype=bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    run_index = np.cumsum(starts) - 1
    return sorted_values[starts], run_index, np.diff(np.r_[np.flatnonzero(starts), len(starts)])


def _test_and_seen_keys(
    tu: np.ndarray, ti: np.ndarray, eu: np.ndarray, ei: np.ndarray, n_items: int, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys ``user * n_items + item`` of the test pairs kept (candidate item, not
    seen) and of the seen (exclude) pairs."""
    seen = _sorted_unique(eu * n_items + ei)
    keys = _sorted_unique(tu * n_items + ti)
    return keys[cand[keys % n_items] & ~_find(seen, keys)[1]], seen


# --------------------------------------------------------------------------- input checks


def _raise_on_nan(counts: list[torch.Tensor], who: str) -> None:
    n = int(torch.stack(counts).sum())
    if n:
        raise ValueError(f"{who} returned {n} NaN scores")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be a non-empty set of positive cutoffs, got {ks}")
    return ks


def _index_array(x: IndexArray, name: str, upper: int) -> np.ndarray:
    """``x`` as a 1-D int64 numpy array, every value in ``[0, upper)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise ValueError(f"{name} has values outside [0, {upper}): {arr.min()}..{arr.max()}")
    return arr


def _pairs(
    users: IndexArray | None, items: IndexArray | None, n_items: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (user, item) index arrays; ``None, None`` means no pairs."""
    if users is None and items is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if users is None or items is None:
        raise ValueError(f"{name}_users and {name}_items must be given together")
    u = _index_array(users, f"{name}_users", np.iinfo(np.int64).max // max(n_items, 1))
    i = _index_array(items, f"{name}_items", n_items)
    if len(u) != len(i):
        raise ValueError(f"{name}_users has {len(u)} entries but {name}_items has {len(i)}")
    return u, i


def _candidate_array(candidate_mask: torch.Tensor | None, n_items: int) -> np.ndarray:
    """``candidate_mask`` as a numpy bool array of length ``n_items`` (all True if None)."""
    if candidate_mask is None:
        return np.ones(n_items, dtype=bool)
    if candidate_mask.dtype != torch.bool or candidate_mask.shape != (n_items,):
        raise ValueError(
            f"candidate_mask must be a bool tensor of shape ({n_items},), got "
            f"{candidate_mask.dtype} {tuple(candidate_mask.shape)}"
        )
    return candidate_mask.detach().cpu().numpy()
