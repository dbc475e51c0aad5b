"""Freshness between daily runs: per-event user updates, an FTRL reranker, and their
prequential replay.

The daily run retrains the model once a period; in between, the served model learns
nothing. What serving can learn per event, with the item table fixed:

- :func:`update_user` / :func:`update_users`: move a user's vector after each interaction,
  by a :class:`UserUpdate` rule: ``mean`` (a decayed mean of the clicked items' vectors) or
  ``grad`` (a few gradient steps of the softmax loss of the clicked item against every item,
  pulled toward the daily row). Users the model does not know start from
  :func:`start_vector`, the mean of their items' vectors (what the API does today).
- :class:`FTRLReranker`: a logistic model over crossed sparse features (user side fields x
  item genres and item fields, item recency in the stream, the base model's score and rank,
  the user's recent-genre affinity), learned per event with FTRL-Proximal
  (:class:`FTRLProximal`), reranking the base model's top-N.
- :func:`prequential_replay`: for each period t, the daily model W_{t-1} (from
  :func:`daily_models`) and D_t's events in time order, each one first predicted (ranked over
  every item W_{t-1} knows, the user's earlier items excluded) and then learned, for three
  arms: ``daily`` (no update), ``daily+user`` (a :class:`UserUpdate` rule) and
  ``daily+user+ftrl`` (the same, its top-N reranked by FTRL).

User and item vectors are the served tables. With ``prior_column`` their last coordinate
is the popularity blend (users' a constant 1, items' ``blend·log1p(recent popularity)``,
see :meth:`smlrec.models.MFWeights.with_prior`): updates never touch it, they move the
latent part only, so the blend applies in full as for a known user.

Why not River's FTRL: ``river.linear_model.LogisticRegression(optimizer=
river.optim.FTRLProximal(...))`` (river 0.26.1) keeps a stored weight per feature and
recomputes it from (z, n) only at the start of the next update of that feature, and only
when ``|z| > l1``. Its predictions (and the gradient of each update) therefore use the
weight from before the feature's previous update, and a weight whose ``|z|`` falls back
within ``l1`` keeps its last non-zero value instead of becoming 0 (McMahan et al., 2013,
Algorithm 1, sets it to 0): the L1 sparsity FTRL-Proximal exists for is not delivered, and
a share of non-zero weights read from it would be wrong. :class:`FTRLProximal` is the
algorithm as published, in numpy, over a fixed feature space (vectorised scoring of all N
candidates at once).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from smlrec.config import MethodSpec, MFConfig, _Config
from smlrec.models import MFWeights
from smlrec.side import SideFeatures
from smlrec.strategies import Defaults, PeriodData, build_strategy, extra_meta_passes, pretrain

K = 20
"""The cut-off of the replay's NDCG and Recall."""
MISS = np.iinfo(np.int64).max
"""The rank of an event whose item the model does not know: a miss at any cut-off."""
FULL_SOFTMAX_MAX = 50_000
"""``grad`` rule: catalogues up to this many items get the softmax over every item; larger
ones a sampled softmax over :data:`SAMPLED_NEGATIVES` uniform negatives."""
SAMPLED_NEGATIVES = 4096


# ----------------------------------------------------------------------------- user updates


class UserUpdate(_Config):
    """How a user's vector moves after each interaction, the item table fixed. The defaults
    are the rule benchmarks/freshness.py chose on ml-100k's validation weeks."""

    method: Literal["none", "mean", "grad"] = Field(
        "grad", description="none: the daily row as it is (users the model does not know get "
        "the popularity ranking); mean: u' = decay·u + (1 - decay)·v_item; grad: `steps` "
        "gradient steps on u of the softmax loss of the event's item against every item but "
        "the user's recent ones, plus l2·||u - anchor||².")
    steps: int = Field(5, ge=1, description="grad: gradient steps per event.")
    lr: float = Field(0.03, gt=0, description="grad: step size.")
    l2: float = Field(0.3, ge=0, description="grad: weight of the pull toward the anchor "
                      "(the daily row; for a user the model does not know, the mean of "
                      "their recent items).")
    decay: float = Field(0.9, ge=0, lt=1, description="mean: the weight kept by the current "
                         "vector at each event.")
    history: int = Field(1000, ge=1, description="How many recent distinct items a user state "
                         "keeps (left out of grad's softmax, as the ranking leaves them out; "
                         "a new user's start).")


def _latent(x: Tensor, prior_column: bool) -> Tensor:
    return x[..., :-1] if prior_column else x


def popularity_query(item: Tensor, prior_column: bool) -> Tensor:
    """The vector of a user nothing is known about: a zero latent part (and 1 in the prior
    column), so items rank by the blend column alone, the model's popularity ranking.
    Without a prior column every item scores 0."""
    q = item.new_zeros(item.shape[1])
    if prior_column:
        q[-1] = 1.0
    return q


def start_vector(item: Tensor, recent: Sequence[int], prior_column: bool) -> Tensor | None:
    """An unknown user's start: the mean of their items' vectors (each row as often as it
    occurs), with 1 in the prior column; None with no items. What the API serves today to
    users the model does not know."""
    rows = [int(r) for r in recent]
    if not rows:
        return None
    q = item[torch.as_tensor(rows, dtype=torch.long, device=item.device)].mean(0)
    if prior_column:
        q[-1] = 1.0
    return q


def update_user(query: Tensor | None, item: Tensor, rows: Sequence[int], rule: UserUpdate, *,
                anchor: Tensor | None = None, recent: Sequence[int] = (),
                prior_column: bool = False) -> Tensor:
    """The user's vector after the events ``rows`` (item rows, oldest first).

    ``query``: the current vector (the model row, or a previously updated vector); None for
    a user the model does not know, who starts from :func:`start_vector` over ``recent`` and
    ``rows`` (``mean`` returns that start; ``grad`` then takes its steps from it).
    ``anchor``: where ``grad`` pulls back to (default: ``query``, else the start).
    ``recent``: the user's earlier items (rows, oldest first); ``grad`` leaves the newest
    ``rule.history`` of them (with the events before each one) out of its softmax.
    Deterministic; the prior column (last coordinate) is never changed. ``method="none"``
    returns ``query`` (for an unknown user, :func:`popularity_query`).
    """
    return update_users([query], item, [rows], rule, anchors=[anchor], recents=[recent],
                        prior_column=prior_column)[0]


def update_users(queries: Tensor | Sequence[Tensor | None], item: Tensor,
                 rows: Sequence[Sequence[int]], rule: UserUpdate, *,
                 anchors: Tensor | Sequence[Tensor | None] | None = None,
                 recents: Sequence[Sequence[int]] | None = None,
                 prior_column: bool = False) -> Tensor:
    """:func:`update_user` for B users at once: ``queries`` (B, d) or B vectors / None,
    ``rows[b]`` user b's events; returns (B, d). The same result as one call per user (up
    to float rounding): each user's k-th event is processed for every user that has one in
    one batched step."""
    b = len(rows)
    recents = [list(map(int, r)) for r in recents] if recents is not None else [[]] * b
    rows = [[int(r) for r in rs] for rs in rows]
    n_items = item.shape[0]
    for rs in rows:
        if any(r < 0 or r >= n_items for r in rs):
            raise ValueError(f"item rows must lie in [0, {n_items}), got {rs}")
    if len(queries) != b or len(recents) != b:
        raise ValueError(f"{len(queries)} queries and {len(recents)} recent lists for {b} users")
    pop = popularity_query(item, prior_column)
    known = [q is not None for q in queries]
    starts = [q if q is not None else
              (start_vector(item, [*recents[i][-rule.history:], *rows[i]], prior_column)
               if rule.method != "none" else None)
              for i, q in enumerate(queries)]
    out = torch.stack([pop if s is None else s for s in starts]).to(item.dtype).clone()
    if rule.method == "none" or not b:
        return out
    if rule.method == "mean":
        lat = _latent(out, prior_column)
        for k in range(max(map(len, rows))):
            active = [i for i in range(b) if known[i] and len(rows[i]) > k]
            if active:
                v = _latent(item[[rows[i][k] for i in active]], prior_column)
                lat[active] = rule.decay * lat[active] + (1 - rule.decay) * v
        return out
    given = anchors if anchors is not None else [None] * b
    anchor = torch.stack([out[i] if given[i] is None else given[i] for i in range(b)]
                         ).to(item.dtype)
    return _grad_steps(out, anchor, item, rows, recents, rule, prior_column)


def _grad_steps(u: Tensor, anchor: Tensor, item: Tensor, rows: list[list[int]],
                recents: list[list[int]], rule: UserUpdate, prior_column: bool) -> Tensor:
    """``grad``: for each event k (batched over the users that have one), ``rule.steps``
    steps of gradient descent on the latent part of u of

        -log softmax(<u, V>)_event + l2·||u - anchor||²,

    the softmax over every item but the user's ``rule.history`` most recent ones before the
    event (the items the ranking leaves out; the event's own item stays); a sampled softmax
    above :data:`FULL_SOFTMAX_MAX` items. The gradient is closed-form:
    E_p[v] - v_event + 2·l2·(u - anchor).

    Measured on ml-100k's validation weeks (three seeds, benchmarks/freshness.py's daily
    models, lr 0.03, 5 steps, l2 0.1): leaving the user's recent items out of the softmax
    beat keeping them in (NDCG@20 +1-3% with 20 of them left out, +5-7% with 100), and the
    event alone beat adding the recent items as extra positives (+2-5%), which pulls every
    update back toward the old history."""
    lat_items = _latent(item, prior_column)
    lat_u, lat_a = _latent(u, prior_column), _latent(anchor, prior_column)
    sampled = item.shape[0] > FULL_SOFTMAX_MAX
    for k in range(max(map(len, rows))):
        active = [i for i in range(len(rows)) if len(rows[i]) > k]
        if not active:
            continue
        idx = torch.as_tensor(active, dtype=torch.long)
        event = torch.as_tensor([rows[i][k] for i in active], dtype=torch.long)
        past = [[r for r in [*recents[i], *rows[i][:k]][-rule.history:] if r != rows[i][k]]
                for i in active]
        if sampled:
            cand = torch.cat([event[:, None], _negatives(event, item.shape[0])], 1)
            width = max(1, max(map(len, past)))
            pad = torch.full((len(active), width), -1, dtype=torch.long)
            for a, p in enumerate(past):
                pad[a, :len(p)] = torch.as_tensor(p, dtype=torch.long)
            blocked = (cand[:, :, None] == pad[:, None, :]).any(-1)
            # each negative stands for n/S items (logQ of a uniform draw)
            shift = torch.full(cand.shape, math.log(item.shape[0] / (cand.shape[1] - 1)))
            shift[:, 0] = 0
            shift = shift.masked_fill(blocked, -math.inf)
        else:
            shift = torch.zeros(len(active), item.shape[0])
            shift[[a for a, p in enumerate(past) for _ in p], [r for p in past for r in p]] = (
                -math.inf)
        for _ in range(rule.steps):
            q = u[idx]
            if sampled:
                logits = torch.einsum("bd,bsd->bs", q, item[cand]) + shift
                expect = torch.einsum("bs,bsd->bd", torch.softmax(logits, 1), lat_items[cand])
            else:
                expect = torch.softmax(q @ item.T + shift, dim=1) @ lat_items
            grad = expect - lat_items[event] + 2 * rule.l2 * (lat_u[idx] - lat_a[idx])
            lat_u[idx] = lat_u[idx] - rule.lr * grad
    return u


def _negatives(event: Tensor, n_items: int) -> Tensor:
    """:data:`SAMPLED_NEGATIVES` uniform item rows per event, from a generator seeded by the
    event's item row (deterministic for a given input)."""
    return torch.stack([torch.randint(n_items, (SAMPLED_NEGATIVES,),
                                      generator=torch.Generator().manual_seed(int(e)))
                        for e in event])


# ----------------------------------------------------------------------------- FTRL reranker


class FTRLConfig(_Config):
    """The FTRL reranker: FTRL-Proximal's parameters, the candidates it reorders and how its
    logit joins the base score. The defaults are the configuration benchmarks/freshness.py
    chose on ml-100k's validation weeks."""

    alpha: float = Field(0.5, gt=0, description="Per-coordinate learning-rate scale.")
    beta: float = Field(1.0, ge=0, description="Learning-rate smoothing.")
    l1: float = Field(1.0, ge=0, description="L1: weights with |z| <= l1 are exactly 0.")
    l2: float = Field(1.0, ge=0, description="L2 on the weights.")
    candidates: int = Field(200, ge=1, description="N: the base model's top-N are reranked.")
    blend: float = Field(3.0, ge=0, description="Reranked score = base score + blend·logit.")
    negatives: int = Field(4, ge=1, description="Negatives per event, drawn uniformly from "
                           "the candidates the user did not pick.")


class FTRLProximal:
    """Per-coordinate FTRL-Proximal logistic regression over a fixed feature space of
    ``size`` indices (McMahan et al., 2013, Algorithm 1; a round may hold several examples).
    A weight is computed from its (z, n) whenever it is read, and is exactly 0 while
    ``|z| <= l1``."""

    def __init__(self, size: int, alpha: float, beta: float, l1: float, l2: float) -> None:
        self.alpha, self.beta, self.l1, self.l2 = alpha, beta, l1, l2
        self.z = np.zeros(size)
        self.n = np.zeros(size)

    def weights(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The weights at ``idx`` (all of them by default)."""
        z = self.z if idx is None else self.z[idx]
        n = self.n if idx is None else self.n[idx]
        w = -(z - np.sign(z) * self.l1) / ((self.beta + np.sqrt(n)) / self.alpha + self.l2)
        return np.where(np.abs(z) > self.l1, w, 0.0)

    def logits(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        """``Σ_f w[idx[m, f]]·val[m, f]`` for each example m."""
        return (self.weights(idx) * val).sum(-1)

    def learn(self, idx: np.ndarray, val: np.ndarray, y: np.ndarray) -> None:
        """One round on the summed log-loss of the M examples ``(idx[m], val[m])`` with
        labels ``y[m]`` in {0, 1} (an event: its positive and its negatives), the gradient
        taken at the weights before the round. The indices of one example must be
        distinct."""
        flat = idx.ravel()
        margin = (self.weights(flat).reshape(idx.shape) * val).sum(-1)
        p = 1.0 / (1.0 + np.exp(-np.clip(margin, -35, 35)))
        keys, inv = np.unique(flat, return_inverse=True)
        g = np.bincount(inv, weights=((p - y)[:, None] * val).ravel(), minlength=len(keys))
        w, n = self.weights(keys), self.n[keys]
        sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / self.alpha
        self.z[keys] += g - sigma * w
        self.n[keys] = n + g * g


@dataclass
class UserContext:
    """What the reranker knows about the user at an event: ``user`` (their row of the side
    features; outside the table: unknown, every field code 0), ``recent`` (their recent item
    rows, oldest first) and ``now`` (the event's time, seconds)."""

    user: int
    recent: Sequence[int]
    now: float


RECENCY_BUCKETS = 16
"""Item recency: never seen, then ``1 + floor(log2(1 + hours since its last interaction))``
capped at ``RECENCY_BUCKETS - 1``."""
RANK_BUCKETS = 12
"""Base rank r (0-based): ``floor(log2(r + 1))`` capped at ``RANK_BUCKETS - 1``."""


class FTRLReranker:
    """Reranks the base model's top-N with an FTRL-Proximal logistic model, learned per
    event (one FTRL round) on the picked item against negatives drawn from the candidates
    not picked.

    Features of a (user, item) pair, each an index of one fixed space (``features``
    decides the fields; none needed):

    - every user categorical field (MovieLens: age bucket, gender, occupation) crossed with
      every item genre token (value: the item's multi-hot) and with every item
      categorical field (release-year bucket);
    - the item's recency: time since its last interaction seen in the stream, bucketed;
    - the base model's rank (bucketed) and score (its value);
    - the user's recent-genre affinity: per genre token of the item, the share of the
      user's recent items with that token;
    - a bias.

    The reranked score is ``base score + blend·logit``. Every event of the stream is handed
    to :meth:`observe` (item recency); ``seed`` drives the negative sampling.
    """

    def __init__(self, cfg: FTRLConfig, features: SideFeatures, seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng([seed, 17])
        self.multi = features.item_multi.numpy().astype(np.float64)
        self.item_codes = features.item.numpy()
        self.user_codes = features.user.numpy()
        self.last_seen = np.full(features.n_items, -np.inf)
        t = self.multi.shape[1]
        # One column per feature slot of an example. A column's index in the feature space
        # is offset + (user code of its field)·mult (+ an item part filled per example).
        offset, field, mult = [0], [-1], [0]  # the bias
        space = 1
        self.token_cols, self.field_cols = [], []
        for f, card in enumerate(features.user_cards):
            self.token_cols += range(len(offset), len(offset) + t)
            offset += [space + k for k in range(t)]
            field += [f] * t
            mult += [t] * t
            space += card * t
            for item_card in features.item_cards:
                self.field_cols.append(len(offset))
                offset.append(space)
                field.append(f)
                mult.append(item_card)
                space += card * item_card
        self.recency_col, self.rank_col, self.score_col = range(len(offset), len(offset) + 3)
        offset += [space, space + RECENCY_BUCKETS, space + RECENCY_BUCKETS + RANK_BUCKETS]
        space += RECENCY_BUCKETS + RANK_BUCKETS + 1
        self.affinity_cols = list(range(len(offset), len(offset) + t))
        offset += [space + k for k in range(t)]
        field += [-1] * (3 + t)
        mult += [0] * (3 + t)
        space += t
        self.n_user_fields = len(features.user_cards)
        self.col_offset = np.asarray(offset, np.int64)
        self.col_field = np.asarray(field, np.int64)
        self.col_mult = np.asarray(mult, np.int64)
        self.model = FTRLProximal(space, cfg.alpha, cfg.beta, cfg.l1, cfg.l2)

    def features(self, ctx: UserContext, rows: np.ndarray, scores: np.ndarray,
                 ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values (M, F) of the M pairs (ctx's user, ``rows[m]``), the base
        model having scored ``rows[m]`` ``scores[m]`` at 0-based rank ``ranks[m]``."""
        rows = np.asarray(rows, np.int64)
        codes = np.zeros(self.n_user_fields + 1, np.int64)  # the last: columns of no field
        if 0 <= ctx.user < len(self.user_codes):
            codes[:-1] = self.user_codes[ctx.user]
        idx = np.empty((len(rows), len(self.col_offset)), np.int64)
        idx[:] = self.col_offset + codes[self.col_field] * self.col_mult
        val = np.ones(idx.shape)
        multi = self.multi[rows]
        val[:, self.token_cols] = np.tile(multi, self.n_user_fields)
        idx[:, self.field_cols] += np.tile(self.item_codes[rows], self.n_user_fields)
        idx[:, self.recency_col] += self._recency_bucket(rows, ctx.now)
        idx[:, self.rank_col] += np.minimum(np.floor(np.log2(np.asarray(ranks) + 1.0)),
                                            RANK_BUCKETS - 1).astype(np.int64)
        val[:, self.score_col] = scores
        recent = np.asarray(ctx.recent, np.int64)
        recent = recent[(recent >= 0) & (recent < len(self.multi))]
        if len(recent):
            val[:, self.affinity_cols] = multi * self.multi[recent].mean(0)
        else:
            val[:, self.affinity_cols] = 0.0
        return idx, val

    def _recency_bucket(self, rows: np.ndarray, now: float) -> np.ndarray:
        last = self.last_seen[rows]
        hours = np.maximum(now - last, 0.0) / 3600.0
        with np.errstate(invalid="ignore"):
            b = 1 + np.floor(np.log2(1.0 + hours))
        return np.where(np.isfinite(last), np.minimum(b, RECENCY_BUCKETS - 1), 0).astype(
            np.int64)

    def observe(self, rows: Sequence[int] | np.ndarray, times: Sequence[float] | np.ndarray
                ) -> None:
        """Items seen in the stream at ``times`` (seconds): their recency clock."""
        rows = np.asarray(rows, np.int64)
        np.maximum.at(self.last_seen, rows, np.asarray(times, np.float64))

    def rerank(self, ctx: UserContext, candidate_rows: Sequence[int] | np.ndarray,
               base_scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (the base model's top-N, best first) reordered by base score +
        blend·logit (ties keep the base order); returns (rows, reranked scores)."""
        rows = np.asarray(candidate_rows, np.int64)
        base = np.asarray(base_scores, np.float64)
        idx, val = self.features(ctx, rows, base, np.arange(len(rows)))
        final = base + self.cfg.blend * self.model.logits(idx, val)
        order = np.argsort(-final, kind="stable")
        return rows[order], final[order]

    def negatives(self, candidate_rows: Sequence[int] | np.ndarray, positive_row: int
                  ) -> np.ndarray:
        """Up to ``cfg.negatives`` positions in ``candidate_rows`` of candidates other than
        ``positive_row``, drawn uniformly without replacement."""
        pool = np.flatnonzero(np.asarray(candidate_rows) != positive_row)
        n = min(self.cfg.negatives, len(pool))
        return np.sort(self.rng.choice(pool, n, replace=False)) if n else pool[:0]

    def learn(self, ctx: UserContext, positive_row: int, negative_rows: Sequence[int],
              scores: Sequence[float], ranks: Sequence[int]) -> None:
        """One event: ``positive_row`` picked, ``negative_rows`` not. ``scores`` and
        ``ranks``: the base model's score and 0-based rank of the positive, then of each
        negative, as it ranked them for this event."""
        rows = np.asarray([positive_row, *negative_rows], np.int64)
        idx, val = self.features(ctx, rows, np.asarray(scores, np.float64),
                                 np.asarray(ranks, np.int64))
        self.model.learn(idx, val, np.r_[1.0, np.zeros(len(rows) - 1)])

    def sparsity(self) -> dict:
        """Weights of the features the stream has updated: how many are non-zero, of how
        many, and the share."""
        touched = self.model.n > 0
        nonzero = int((self.model.weights()[touched] != 0).sum())
        total = int(touched.sum())
        return {"nonzero": nonzero, "total": total, "share": nonzero / total if total else 0.0}


def no_side_features(n_users: int, n_items: int) -> SideFeatures:
    """Side features with no fields, for data without side tables (the reranker then
    uses recency, the base rank and score, and the bias)."""
    return SideFeatures(torch.zeros(n_users, 0, dtype=torch.long), (),
                        torch.zeros(n_items, 0, dtype=torch.long), (),
                        torch.zeros(n_items, 0))


# ----------------------------------------------------------------------------- daily models


def daily_models(periods: Sequence[PeriodData], sizes: Sequence[tuple[int, int]],
                 spec: MethodSpec, defaults: Defaults, pretrain_periods: int,
                 pretrain_mf: MFConfig, meta_periods: int, last: int
                 ) -> dict[int, MFWeights]:
    """The served model of every period t in ``(pretrain_periods, last)``: W_{t-1}, the
    strategy ``spec`` started from W_0 (trained on the first ``pretrain_periods``) and
    updated period by period through t - 1, as ``strategy.weights()`` serves it (with the
    blend column when its blend is not 0). The backtest's protocol
    (``smlrec.backtest._run_seed``): the same W_0, meta passes and updates."""
    p = pretrain_periods
    w0 = pretrain(list(periods[:p]), *sizes[p - 1], pretrain_mf, defaults.loss, defaults.seed,
                  defaults.device)
    strategy = build_strategy(spec.method, spec.params, defaults)
    strategy.start(w0)
    extra_meta_passes(strategy, w0, list(periods), list(sizes), p, p + meta_periods)
    served = {}
    for t in range(p, last):
        if t > p:
            served[t] = strategy.weights().clone()
        strategy.update(list(periods[: t + 1]), *sizes[t])
    return served


# ----------------------------------------------------------------------------- replay

ARMS = ("daily", "daily+user", "daily+user+ftrl")


@dataclass
class Replay:
    """Per-event outcomes of :func:`prequential_replay`, aligned: one entry per scored event
    (events whose item the user had interacted with before are learned, not scored).

    ``t``: the event's period; ``user``: its user row; ``new``: the user is unknown to
    W_{t-1}; ``ndcg`` / ``recall``: each arm's NDCG@20 and Recall@20 per event;
    ``seconds``: per-event seconds of the update path (``update_user``: one call per event
    with the rule, timed over the first events of the replay; ``ftrl_learn``: negative
    sampling and the FTRL update, over every learned event); ``sparsity``: the reranker's
    at the end."""

    t: np.ndarray
    user: np.ndarray
    new: np.ndarray
    ndcg: dict[str, np.ndarray]
    recall: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    sparsity: dict = field(default_factory=dict)

    def means(self, periods: Sequence[int] | None = None) -> dict[str, dict[str, dict]]:
        """Per arm, per group (all, returning, new users), the mean NDCG@20 and Recall@20
        over events of ``periods`` (all by default), and the number of events."""
        keep = np.ones(len(self.t), bool) if periods is None else np.isin(self.t, periods)
        out: dict[str, dict[str, dict]] = {}
        for arm in self.ndcg:
            out[arm] = {}
            for group, mask in (("all", keep), ("returning", keep & ~self.new),
                                ("new", keep & self.new)):
                n = int(mask.sum())
                out[arm][group] = {
                    "ndcg@20": float(self.ndcg[arm][mask].mean()) if n else math.nan,
                    "recall@20": float(self.recall[arm][mask].mean()) if n else math.nan,
                    "n_events": n}
        return out

    def events_per_second(self) -> dict[str, float]:
        """The update path's throughput: ``update_user`` alone, and with the FTRL learn
        step."""
        out = {}
        if self.seconds.get("update_user"):
            out["update_user"] = 1.0 / self.seconds["update_user"]
            if self.seconds.get("ftrl_learn"):
                out["update_user+ftrl_learn"] = 1.0 / (self.seconds["update_user"]
                                                       + self.seconds["ftrl_learn"])
        return out


def event_clock(periods: Sequence[PeriodData], times: Sequence[np.ndarray] | None
                ) -> list[np.ndarray]:
    """Each period's event times in seconds: ``times`` as given, or, without them, one
    second per event in stream order."""
    if times is not None:
        if len(times) != len(periods) or any(len(x) != len(p) for x, p in
                                             zip(times, periods, strict=True)):
            raise ValueError("times must hold one array per period, aligned with its events")
        return [np.asarray(x, np.float64) for x in times]
    out, start = [], 0
    for p in periods:
        out.append(np.arange(start, start + len(p), dtype=np.float64))
        start += len(p)
    return out


def period_times(frame: pd.DataFrame) -> list[np.ndarray]:
    """Event times (seconds since the epoch) of ``frame``'s periods, aligned with
    :func:`smlrec.backtest.index_periods` (the same canonical order and grouping)."""
    from smlrec.data.store import canonical_order
    from smlrec.schema import PERIOD, TS

    ordered = canonical_order(frame)
    seconds = ordered[TS].astype("int64").to_numpy() / 1e9
    groups = ordered.groupby(PERIOD, sort=True).indices
    return [seconds[groups[pid]] for pid in sorted(groups)]


@dataclass
class _PeriodScores:
    """One arm's pass over one period (events in time order)."""

    rank: np.ndarray        # base rank of the event's item (MISS when unknown)
    scored: np.ndarray      # bool: not a repeat of an item the user had before
    score: np.ndarray       # the event item's score (unmasked; nan when unknown)
    cand: np.ndarray | None = None        # (E, N) top-N rows
    cand_score: np.ndarray | None = None  # (E, N) their scores


class _History:
    """Every user's items so far (rows, time order), grown event by event."""

    def __init__(self) -> None:
        self.items: dict[int, list[int]] = {}

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        for u, i in zip(users.tolist(), items.tolist(), strict=True):
            self.items.setdefault(u, []).append(i)

    def recent(self, user: int, n: int, known: int) -> list[int]:
        """The user's ``n`` most recent distinct items below row ``known``, oldest first."""
        out: list[int] = []
        got: set[int] = set()
        for i in reversed(self.items.get(user, [])):
            if i < known and i not in got:
                got.add(i)
                out.append(i)
                if len(out) == n:
                    break
        return out[::-1]


def _push(recent: list[int], item: int, n: int) -> None:
    """``item`` becomes the newest of ``recent`` (kept distinct, at most ``n``)."""
    if item in recent:
        recent.remove(item)
    recent.append(item)
    del recent[:-n]


def _replay_period(w: MFWeights, users: np.ndarray, items: np.ndarray, history: _History,
                   rule: UserUpdate, prior_column: bool, n_candidates: int) -> _PeriodScores:
    """Predict then learn every event of one period (time order) under ``rule``. Users are
    independent (the item table is fixed), so each user's k-th event is handled for all
    users in one batched step; the result equals the event-by-event replay."""
    n_known_users, n_known_items = w.n_users, w.n_items
    item = w.item
    local, inv = np.unique(users, return_inverse=True)
    width = max(int(items.max()) + 1, n_known_items) if len(items) else n_known_items
    seen = torch.zeros(len(local), width, dtype=torch.bool)
    recent: list[list[int]] = []
    for j, u in enumerate(local.tolist()):
        past = history.items.get(u, [])
        if past:
            seen[j, torch.as_tensor(past)] = True
        recent.append(history.recent(u, rule.history, n_known_items))
    pop = popularity_query(item, prior_column)
    known_user = torch.as_tensor(local < n_known_users)
    query = torch.where(known_user[:, None], w.user[np.minimum(local, n_known_users - 1)], pop)
    daily = query.clone()
    has_state = known_user.clone()
    n = len(users)
    rank = np.full(n, MISS, np.int64)
    scored = np.ones(n, bool)
    score = np.full(n, np.nan)
    top = min(n_candidates, n_known_items)
    cand = np.zeros((n, top), np.int64) if n_candidates else None
    cand_score = np.zeros((n, top), np.float32) if n_candidates else None
    order = np.argsort(inv, kind="stable")
    step = np.empty(n, np.int64)
    counts = np.bincount(inv)
    step[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    columns = torch.arange(n_known_items)
    for k in range(int(step.max()) + 1 if n else 0):
        ev = np.flatnonzero(step == k)
        j = torch.as_tensor(inv[ev])
        it = torch.as_tensor(items[ev])
        repeat = seen[j, it].numpy()
        known = (it < n_known_items).numpy()
        s = query[j] @ item.T
        ks = np.flatnonzero(known)
        true = s[ks, it[ks]]
        score[ev[ks]] = true.numpy()
        s = s.masked_fill(seen[j, :n_known_items], -math.inf)
        sk, itk = s[ks], it[ks]
        better = (sk > true[:, None]) | ((sk == true[:, None]) & (columns < itk[:, None]))
        rank[ev[ks]] = better.sum(1).numpy()
        scored[ev] = ~repeat
        if cand is not None:  # a stable sort: ties by row, as the ranks count them
            vals, rows = torch.sort(s, dim=1, descending=True, stable=True)
            cand[ev], cand_score[ev] = rows[:, :top].numpy(), vals[:, :top].numpy()
        if rule.method != "none" and len(ks):
            jk = j[ks].tolist()
            anchors = [daily[jj] if known_user[jj] else
                       start_vector(item, [*recent[jj], int(i)], prior_column)
                       for jj, i in zip(jk, itk.tolist(), strict=True)]
            query[j[ks]] = update_users(
                [query[jj] if has_state[jj] else None for jj in jk], item,
                [[int(i)] for i in itk.tolist()], rule, anchors=anchors,
                recents=[recent[jj] for jj in jk], prior_column=prior_column)
            has_state[j[ks]] = True
        seen[j, it] = True
        for jj, i in zip(j[ks].tolist(), itk.tolist(), strict=True):
            _push(recent[jj], i, rule.history)
    return _PeriodScores(rank, scored, score, cand, cand_score)


def _metrics(rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hit = rank < K
    return np.where(hit, 1.0 / np.log2(np.minimum(rank, K) + 2.0), 0.0), hit.astype(float)


def prequential_replay(periods: Sequence[PeriodData], served: Mapping[int, MFWeights],
                       replay: Sequence[int], rule: UserUpdate, *,
                       ftrl: FTRLConfig | None = None, features: SideFeatures | None = None,
                       times: Sequence[np.ndarray] | None = None, prior_column: bool = True,
                       seed: int = 0, timed_events: int = 0) -> Replay:
    """Replay the consecutive periods ``replay`` event by event, in time order.

    For each period t, ``served[t]`` is the daily model W_{t-1} (``prior_column``: its last
    column is the popularity blend). Every event (u, i) of ``periods[t]`` is first predicted
    (every item W_{t-1} knows ranked for u's current vector, the items u interacted with
    before excluded; ties by item row) and then learned. Items unknown to W_{t-1} are misses
    in every arm; an event whose item u had before is learned but not scored. Arms:

    - ``daily``: known users their row; users unknown to W_{t-1} the model's popularity
      ranking (:func:`popularity_query`: the blend column alone) all period;
    - ``daily+user``: ``rule`` after each event, from the row (known users) or, after their
      first event, from :func:`start_vector` (unknown users);
    - ``daily+user+ftrl`` (with ``ftrl``): the same, its top ``ftrl.candidates`` reranked by
      an :class:`FTRLReranker` (side ``features``) learned on every event since the first
      replayed period.

    ``times``: each period's event times in seconds (aligned with its events; default one
    second per event); each period is replayed in time order (a stable sort, so the
    canonical order of :func:`smlrec.backtest.index_periods` is kept). ``timed_events``:
    time ``update_user`` called once per event over the first that many events.
    """
    replay = sorted(replay)
    if replay != list(range(replay[0], replay[-1] + 1)):
        raise ValueError(f"the replayed periods must be consecutive, got {replay}")
    clock = event_clock(periods, times)
    history = _History()
    for t in range(replay[0]):
        history.add(periods[t].users, periods[t].items)
    n_items = max(int(p.items.max()) + 1 for p in periods if len(p))
    n_users = max(int(p.users.max()) + 1 for p in periods if len(p))
    reranker = None
    if ftrl is not None:
        side = features if features is not None else no_side_features(n_users, n_items)
        reranker = FTRLReranker(ftrl, side.grow(n_users, n_items), seed)
        for t in range(replay[0]):
            reranker.observe(periods[t].items, clock[t])
    none = UserUpdate(method="none", history=rule.history)
    parts: dict[str, list] = {"t": [], "user": [], "new": []}
    ranks: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS[: 3 if ftrl else 2]}
    learn_seconds, learned = 0.0, 0
    for t in replay:
        w, p = served[t], periods[t]
        order = np.argsort(clock[t], kind="stable")
        users, items, when = p.users[order], p.items[order], clock[t][order]
        base = _replay_period(w, users, items, history, none, prior_column, 0)
        mine = _replay_period(w, users, items, history, rule, prior_column,
                              ftrl.candidates if ftrl else 0)
        keep = base.scored
        ranks["daily"].append(base.rank[keep])
        ranks["daily+user"].append(mine.rank[keep])
        if reranker is not None:
            r, spent, n_learned = _ftrl_pass(reranker, mine, users, items, when, history,
                                             rule.history, w.n_items)
            ranks["daily+user+ftrl"].append(r[keep])
            learn_seconds += spent
            learned += n_learned
        else:
            history.add(users, items)
        parts["t"].append(np.full(int(keep.sum()), t))
        parts["user"].append(users[keep])
        parts["new"].append(users[keep] >= w.n_users)
    ndcg, recall = {}, {}
    for arm, chunks in ranks.items():
        ndcg[arm], recall[arm] = _metrics(np.concatenate(chunks))
    seconds = {}
    if timed_events:
        seconds["update_user"] = _time_updates(periods, served, replay, rule, prior_column,
                                               timed_events)
    if learned:
        seconds["ftrl_learn"] = learn_seconds / learned
    return Replay(np.concatenate(parts["t"]), np.concatenate(parts["user"]),
                  np.concatenate(parts["new"]), ndcg, recall, seconds,
                  reranker.sparsity() if reranker is not None else {})


def _ftrl_pass(reranker: FTRLReranker, base: _PeriodScores, users: np.ndarray,
               items: np.ndarray, when: np.ndarray, history: _History, n_recent: int,
               n_known_items: int) -> tuple[np.ndarray, float, int]:
    """The reranked rank of every event of one period (in time order: the reranker is
    shared by all users), learning after each; adds the events to ``history``. Returns the
    ranks, the seconds spent learning and the events learned."""
    rank = base.rank.copy()
    spent, learned = 0.0, 0
    top = base.cand.shape[1]
    recent: dict[int, list[int]] = {}
    for e, (u, i, now) in enumerate(zip(users.tolist(), items.tolist(), when.tolist(),
                                        strict=True)):
        if u not in recent:
            recent[u] = history.recent(u, n_recent, n_known_items)
        if base.scored[e] and i < n_known_items:
            ctx = UserContext(u, list(recent[u]), now)
            if base.rank[e] < top:
                rows, _ = reranker.rerank(ctx, base.cand[e], base.cand_score[e])
                rank[e] = int(np.flatnonzero(rows == i)[0])
            start = time.perf_counter()
            neg = reranker.negatives(base.cand[e], i)
            reranker.learn(ctx, i, base.cand[e][neg],
                           [base.score[e], *base.cand_score[e][neg].tolist()],
                           [base.rank[e], *neg.tolist()])
            spent += time.perf_counter() - start
            learned += 1
        reranker.observe([i], [now])
        if i < n_known_items:
            _push(recent[u], i, n_recent)
    history.add(users, items)
    return rank, spent, learned


def _time_updates(periods: Sequence[PeriodData], served: Mapping[int, MFWeights],
                  replay: list[int], rule: UserUpdate, prior_column: bool, n_events: int
                  ) -> float:
    """Seconds per event of the serving path's update: :func:`update_user` once per event
    (one user state per user, as serving keeps it), over the first ``n_events`` events of
    the replayed periods that have a known item."""
    history = _History()
    for t in range(replay[0]):
        history.add(periods[t].users, periods[t].items)
    spent, done = 0.0, 0
    for t in replay:
        w = served[t]
        state: dict[int, Tensor] = {}
        recent: dict[int, list[int]] = {}
        for u, i in zip(periods[t].users.tolist(), periods[t].items.tolist(), strict=True):
            if u not in recent:
                recent[u] = history.recent(u, rule.history, w.n_items)
            if i >= w.n_items:
                continue
            known = u < w.n_users
            anchor = w.user[u] if known else start_vector(w.item, [*recent[u], i],
                                                          prior_column)
            query = state.get(u, w.user[u] if known else None)
            start = time.perf_counter()
            state[u] = update_user(query, w.item, [i], rule, anchor=anchor, recent=recent[u],
                                   prior_column=prior_column)
            spent += time.perf_counter() - start
            done += 1
            if done == n_events:
                return spent / done
            _push(recent[u], i, rule.history)
        history.add(periods[t].users, periods[t].items)
    return spent / done if done else math.nan
