"""MetaSelector: a per-user, meta-learned choice among fixed base recommenders.

After Luo et al., "MetaSelector: Meta-Learning for Recommendation with User-Level Adaptive
Model Selection" (WWW 2020). The paper meta-trains a model selector together with the base
models, each user being one task. This is the simplified variant the paper also discusses:
the M base models are **fixed** (already trained: e.g. the MF champion, the two-tower
model, MeLU, popularity) and only the selector (and one temperature per base model) learns.

Inputs, for a batch of B users and N candidate items:

- ``scores`` (B, M, N): each base model's score of every candidate for the user, with
  **nothing excluded**: the support items (what we already know of the user) must keep
  their scores, because how well each model explains them is the selector's main signal.
  A score that is ``-inf``, NaN or at most :data:`UNSCORED` means "this model does not
  score this item" (it gets no probability under that model).
- ``exclude`` (B, N) bool, optional: items never to recommend (e.g. already seen); used
  only for the query loss and for ranking, never for the support.
- ``supports`` / ``queries``: per user, arrays of candidate columns (item rows indexing the
  last axis of ``scores``), as in :class:`smlrec.coldtrack.UserTask`.

Each model's scores are standardised per user (z-scores over the items it scores), so that
models on different scales (dot products, counts) are comparable, and scaled by one learned
temperature per model (log-parameterised, initialised at :data:`TAU_INIT` = 0.5: on
Gaussian-like z-scores that is a softmax of 2z, whose mass sits on the top few dozen of
2,000 items, i.e. reasonably peaked), giving ``p_m = softmax(z_m / tau_m)``. The selector
gives per-user weights ``w`` (softmax over the M models, summing to one), and
``combine`` says how they make one ranking (:meth:`MetaSelector.combine`, items ranked by
the log-probability it returns):

- ``logits`` (the default): ``softmax(sum_m w_m z_m / tau_m)``, a per-user soft blend of
  the standardised scores (proportional to the weighted product ``prod_m p_m^w_m``: it can
  express a blend such as "mf + 8 log pop", which a mixture cannot); a model adds nothing
  at the items it does not score;
- ``mixture``: ``p(i) = sum_m w_m p_m(i)``.

With ``exclude``, the result is renormalised over the items that remain (for the mixture,
each ``p_m``).

The selector's input for a user is the embeddings of the user's categorical side features
(:class:`smlrec.side.SideFeatures`, ``emb_dim`` per field) and, for each base model,
statistics of its output: the log-likelihood of the user's support items under ``p_m``
(as a gain over the uniform distribution, divided by log N: the MetaSelector signal), the
entropy of ``p_m`` restricted to its top ``top`` items (divided by log ``top``), and the
largest z-score (as log(1 + z)); plus log(1 + support size). An MLP (one hidden layer)
maps this to M logits.

The per-user loss on a set of items under the combined distribution is, with ``loss``:
``set`` (the default), minus the log of their total probability (it rewards putting the
top of the ranking on some of them, as NDCG@k does; on the cold-start track's validation
periods it fits better blends than the mean); ``mean``, minus their mean log-likelihood.

Meta-training (MAML, users as tasks): for each user of a meta-batch the MLP's parameters
are adapted by ``local_steps`` SGD steps at ``local_lr`` on the support loss (the loss of
the support items, nothing excluded; ``torch.func``: ``functional_call`` + ``grad``,
``vmap`` over the users). The outer loss is the loss of the user's query items (the
excluded items removed from the softmax; mean over users), through the adaptation (second
order), and Adam at ``meta_lr`` updates the MLP, the embeddings and the temperatures. As in
MeLU, the embedding tables are only meta-learned, not adapted per user (the inner loop
adapts the MLP). ``local_steps=0`` (the default: it did better on the cold-start track's
validation periods) is the plain, non-meta selector. Serving (:meth:`MetaSelector.weights`)
runs the same adaptation on the user's support.

Each :meth:`MetaSelector.fit` call trains ``epochs`` passes over its users and, with
``replay`` = k > 0, over the users of the k calls before it again (their inputs are kept
in the selector, and in :meth:`MetaSelector.state`; a call over fewer items is padded with
items no model scores).

Determinism: every random draw (initialisation, meta-batch order) comes from a
``torch.Generator`` seeded from ``seed`` and the number of ``fit`` calls so far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from smlrec.config import _Config
from smlrec.models import reset_parameters
from smlrec.side import SideFeatures

TAU_INIT = 0.5
"""Initial temperature of every base model's softmax over its z-scores (see module doc)."""
LOG_TAU_RANGE = (-4.0, 4.0)
"""log temperatures are clamped to this range when used."""
UNSCORED = -1e8
"""Scores at or below this (and non-finite ones) mean "not scored by this model"."""
LOG_FLOOR = -50.0
"""Per-model log-probabilities are floored here in the losses (keeps them finite)."""
EMB_STD = 0.1
"""Initial embeddings are N(0, EMB_STD^2)."""
CHUNK = 512
"""Users standardised / scored at once (bounds the temporaries of large batches)."""

_NEG = -1e9  # z-score of an item a model does not score (finite: no NaN in gradients)


class SelectorConfig(_Config):
    """MetaSelector hyper-parameters (see :mod:`smlrec.selector`)."""

    emb_dim: int = Field(8, ge=1, description="Embedding size per user categorical field.")
    hidden: int = Field(32, ge=1, description="Hidden units of the selector MLP.")
    local_lr: float = Field(0.1, ge=0, description="Inner-loop SGD step on the support loss.")
    local_steps: int = Field(0, ge=0, description="Inner-loop steps per user; 0 = plain "
                             "(non-meta) selector.")
    meta_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the outer loop.")
    meta_batch: int = Field(64, ge=1, description="Users (tasks) per meta-update.")
    epochs: int = Field(10, ge=1, description="Passes over the users per fit call.")
    top: int = Field(100, ge=1, description="Items kept for the top-k entropy statistic.")
    weight_decay: float = Field(1e-4, ge=0, description="Adam L2 on the MLP and embeddings "
                                "(not on the temperatures).")
    combine: Literal["mixture", "logits"] = Field(
        "logits", description="mixture: log sum_m w_m softmax(z_m / tau_m); logits: "
        "sum_m w_m z_m / tau_m (a per-user soft blend of the standardised scores).")
    loss: Literal["mean", "set"] = Field(
        "set", description="Per-user loss on the query (and, in the inner loop, the support) "
        "items: mean: their mean negative log-likelihood; set: the negative log of their total "
        "probability (rewards putting the top of the ranking on some of them, as NDCG@k does).")
    replay: int = Field(5, ge=0, description="Earlier fit calls whose users each fit call "
                        "trains on again, with its own (0: only the users given).")


class _Net(nn.Module):
    def __init__(self, cards: Sequence[int], emb_dim: int, n_models: int, hidden: int):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(int(c), emb_dim) for c in cards)
        n_in = len(cards) * emb_dim + 3 * n_models + 1
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_models))
        self.log_tau = nn.Parameter(torch.full((n_models,), math.log(TAU_INIT)))

    def tau(self) -> Tensor:
        return self.log_tau.clamp(*LOG_TAU_RANGE).exp()


@dataclass
class _Prepared:
    """The parameter-free part of the base outputs, computed once per call.

    ``z`` (B, M, N): per (user, model) z-scores over the items the model scores, ``_NEG``
    at the items it does not score; ``top`` (B, M, k): the k largest of them; ``n_valid`` (B, M):
    items scored."""

    z: Tensor
    top: Tensor
    n_valid: Tensor

    def __getitem__(self, idx: slice | np.ndarray) -> _Prepared:
        return _Prepared(self.z[idx], self.top[idx], self.n_valid[idx])


def _prepare(scores: Tensor, top: int, device: torch.device) -> _Prepared:
    """Standardise the base scores (in chunks of users, on ``device``)."""
    zs, tops, ns = [], [], []
    k = min(top, scores.shape[-1])
    for s in range(0, scores.shape[0], CHUNK):
        x = scores[s:s + CHUNK].to(device, torch.float32)
        valid = torch.isfinite(x) & (x > UNSCORED)
        n = valid.sum(-1, keepdim=True)
        x = torch.where(valid, x, 0.0)
        mean = x.sum(-1, keepdim=True) / n.clamp_min(1)
        x = torch.where(valid, x - mean, 0.0)
        std = (x.square().sum(-1, keepdim=True) / n.clamp_min(1)).sqrt().clamp_min(1e-6)
        z = torch.where(valid, x / std, _NEG)
        zs.append(z)
        tops.append(z.topk(k, dim=-1).values)
        ns.append(n[..., 0])
    if not zs:
        n_items = scores.shape[-1]
        return _Prepared(torch.zeros(0, scores.shape[1], n_items, device=device),
                         torch.zeros(0, scores.shape[1], k, device=device),
                         torch.zeros(0, scores.shape[1], dtype=torch.int64, device=device))
    return _Prepared(torch.cat(zs), torch.cat(tops), torch.cat(ns))


def _gather_log_probs(x: Tensor, z: Tensor, lse: Tensor, rows: Tensor) -> Tensor:
    """log p_m of the items ``rows`` (b, L) -> (b, M, L): ``x - lse`` floored at
    :data:`LOG_FLOOR`, and the floor for items the model does not score."""
    b, m, _ = x.shape
    at = rows[:, None, :].expand(b, m, rows.shape[1])
    lp = (x.gather(-1, at) - lse[..., None]).clamp_min(LOG_FLOOR)
    return torch.where(z.gather(-1, at) > _NEG / 2, lp, LOG_FLOOR)


def _pad(rows: Sequence[np.ndarray], n_items: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged item-row arrays -> (b, L) indices (0-padded) and a float mask, L >= 1."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
    width = max([1] + [len(a) for a in arrays])
    idx = np.zeros((len(arrays), width), dtype=np.int64)
    mask = np.zeros((len(arrays), width), dtype=np.float32)
    for i, a in enumerate(arrays):
        if len(a) and (a.min() < 0 or a.max() >= n_items):
            raise ValueError(f"item rows must lie in [0, {n_items}), got {a.min()}..{a.max()}")
        idx[i, :len(a)], mask[i, :len(a)] = a, 1.0
    return torch.from_numpy(idx).to(device), torch.from_numpy(mask).to(device)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (..., L) over the last axis where ``mask`` (broadcast) is 1; 0 if none."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def _blend(w: Tensor, x: Tensor, valid: Tensor) -> Tensor:
    """The ``logits`` rule: ``sum_m w_m x_m`` (..., N) for weights ``w`` (..., M) and scaled
    z-scores ``x`` (..., M, N), a model adding nothing at the items it does not score
    (``valid`` (..., M, N) false); ``_NEG`` at the items no model scores."""
    c = (w[..., None] * torch.where(valid, x, 0.0)).sum(-2)
    return torch.where(valid.any(-2), c, _NEG)


def _set_nll(ll: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Per-user loss (...) from the log-likelihoods ``ll`` (..., L) of the items where ``mask``
    is 1: ``mean``: minus their mean; ``set``: minus the log of their total probability.
    0 for a user without items."""
    if kind == "mean":
        return -_masked_mean(ll, mask)
    total = torch.logsumexp(torch.where(mask > 0, ll, _NEG), -1)
    return torch.where(mask.sum(-1) > 0, -total, 0.0)


def _pad_items(x: Tensor, n_items: int, value: float | bool) -> Tensor:
    """Pad the last axis of ``x`` to ``n_items`` with ``value``."""
    if x.shape[-1] == n_items:
        return x
    pad = torch.full((*x.shape[:-1], n_items - x.shape[-1]), value, dtype=x.dtype,
                     device=x.device)
    return torch.cat([x, pad], -1)


def _flat(rows: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Ragged int arrays -> (concatenation, lengths), for the state."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
    cat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(cat), torch.as_tensor([len(a) for a in arrays], dtype=torch.int64)


def _unflat(cat: Tensor, lengths: Tensor) -> list[np.ndarray]:
    return [a.numpy() for a in torch.split(cat.cpu(), lengths.cpu().tolist())]


class MetaSelector:
    """Per-user weights over fixed base models, meta-learned with users as tasks.

    ``model_names``: the M base models, in the order of the scores' second axis.
    ``features``: the user side features (row ``u`` of ``features.user`` for user row
    ``u``; rows beyond the table are unknown users, all codes 0).
    """

    def __init__(self, model_names: list[str], features: SideFeatures,
                 cfg: SelectorConfig = SelectorConfig(), seed: int = 0,
                 device: torch.device | str = "cpu"):
        if len(model_names) < 1:
            raise ValueError("MetaSelector needs at least one base model")
        self.model_names = list(model_names)
        self.cfg = cfg
        self.seed = int(seed)
        self.device = torch.device(device)
        self.cards = tuple(int(c) for c in features.user_cards)
        if features.user.ndim != 2 or features.user.shape[1] != len(self.cards):
            raise ValueError("features.user must be (n_users, len(user_cards))")
        self.user_codes = features.user.to(self.device, torch.int64)
        self._step = 0
        self._replay: list[dict] = []  # the last ``replay`` fit calls' inputs
        gen = torch.Generator().manual_seed(self.seed)
        net = _Net(self.cards, cfg.emb_dim, self.n_models, cfg.hidden)
        reset_parameters(net, gen)
        for emb in net.emb:
            nn.init.normal_(emb.weight, 0.0, EMB_STD, generator=gen)
        self.net = net.to(self.device)
        self.opt = self._optimizer()

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    def _optimizer(self) -> torch.optim.Adam:
        decayed = [p for n, p in self.net.named_parameters() if n != "log_tau"]
        return torch.optim.Adam([{"params": decayed, "weight_decay": self.cfg.weight_decay},
                                 {"params": [self.net.log_tau], "weight_decay": 0.0}],
                                lr=self.cfg.meta_lr)

    # ------------------------------------------------------------------ inputs

    def _check(self, users: np.ndarray, scores: Tensor, *ragged: Sequence) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if scores.ndim != 3 or scores.shape[1] != self.n_models:
            raise ValueError(f"scores must be (B, {self.n_models}, N), got {tuple(scores.shape)}")
        if scores.shape[0] != len(users) or any(len(r) != len(users) for r in ragged):
            raise ValueError("users, scores and the support/query lists must have one entry "
                             "per user")
        if len(users) and users.min() < 0:
            raise ValueError("user rows must be non-negative")
        return users

    def _codes(self, users: np.ndarray) -> Tensor:
        rows = torch.as_tensor(users, device=self.device)
        codes = torch.zeros(len(rows), len(self.cards), dtype=torch.int64, device=self.device)
        known = rows < self.user_codes.shape[0]
        codes[known] = self.user_codes[rows[known]]
        return codes

    def _inputs(self, users: np.ndarray, prep: _Prepared, lp_sup: Tensor, smask: Tensor
                ) -> Tensor:
        """Selector input (b, D): user embeddings and the base-output statistics."""
        codes = self._codes(users)
        parts = [emb(codes[:, f]) for f, emb in enumerate(self.net.emb)]
        with torch.no_grad():
            log_n = prep.n_valid.float().clamp_min(2).log()
            has = (smask.sum(-1) > 0).float()[:, None]
            gain = (_masked_mean(lp_sup.detach(), smask[:, None, :]) + log_n) / log_n
            gain = gain.clamp(-3.0, 1.0) * has
            top_ok = prep.top > _NEG / 2
            t = torch.where(top_ok, prep.top / self.net.tau()[:, None], _NEG)
            logq = torch.log_softmax(t, -1)
            ent = -(logq.exp() * torch.where(top_ok, logq, 0.0)).sum(-1)
            ent = ent / top_ok.sum(-1).float().clamp_min(2).log()
            zmax = torch.where(top_ok[..., 0], prep.top[..., 0], 0.0).clamp_min(0).log1p()
            n_sup = smask.sum(-1, keepdim=True).log1p() / 4
            parts += [gain, ent, zmax, n_sup]
        return torch.cat(parts, -1)

    # ------------------------------------------------------------------ selector

    def _logits(self, inputs: Tensor, x: Tensor, z: Tensor, lp_sup: Tensor, sup: Tensor,
                smask: Tensor) -> Tensor:
        """Selector logits (b, M) after ``local_steps`` SGD steps on each user's support
        loss: the negative log-likelihood of the support items under the combination rule
        (``x`` (b, M, N): scaled z-scores, ``z``: the z-scores; ``lp_sup`` (b, M, L): each
        model's log-probabilities of the support items ``sup`` (b, L))."""
        mlp = self.net.mlp
        if self.cfg.local_steps == 0:
            return mlp(inputs)
        logits_rule, kind = self.cfg.combine == "logits", self.cfg.loss

        def support_loss(params: dict, xi: Tensor, lpi: Tensor, mi: Tensor, xs: Tensor,
                         valid: Tensor, si: Tensor) -> Tensor:
            logw = torch.log_softmax(functional_call(mlp, params, (xi,)), -1)
            if logits_rule:
                c = _blend(logw.exp(), xs, valid)
                ll = (c.gather(-1, si) - torch.logsumexp(c, -1)).clamp_min(LOG_FLOOR)
            else:
                ll = torch.logsumexp(logw[:, None] + lpi, 0)
            return _set_nll(ll, mi, kind)

        step = grad(support_loss)
        params = dict(mlp.named_parameters())
        valid = z > _NEG / 2
        dims = None
        for _ in range(self.cfg.local_steps):
            g = vmap(step, in_dims=(dims, 0, 0, 0, 0, 0, 0))(params, inputs, lp_sup, smask, x,
                                                            valid, sup)
            params = {k: p - self.cfg.local_lr * g[k] for k, p in params.items()}
            dims = 0
        return vmap(lambda p, xi: functional_call(mlp, p, (xi,)))(params, inputs)

    def _forward(self, users: np.ndarray, prep: _Prepared, supports: Sequence[np.ndarray]
                 ) -> tuple[Tensor, Tensor]:
        """Selector logits (b, M) and the scaled z-scores ``z / tau`` (b, M, N)."""
        x = prep.z / self.net.tau()[:, None]
        sup, smask = _pad(supports, x.shape[-1], self.device)
        lp_sup = _gather_log_probs(x, prep.z, torch.logsumexp(x, -1), sup)
        inputs = self._inputs(users, prep, lp_sup, smask)
        return self._logits(inputs, x, prep.z, lp_sup, sup, smask), x

    def fit(self, users: np.ndarray, scores: Tensor, supports: list[np.ndarray],
            queries: list[np.ndarray], exclude: Tensor | None = None,
            epochs: int | None = None) -> dict:
        """Meta-train on B users (incremental: parameters and Adam state carry over).

        ``scores`` (B, M, N) with nothing excluded; ``exclude`` (B, N) bool, optional, hides
        items from the query loss (query items that are excluded are ignored). Users
        without a (non-excluded) query item are skipped. With ``replay`` = k > 0 the users
        of the last k earlier calls are trained on again, with these (calls with fewer
        items are padded with unscored, excluded items). Returns the mean query loss of
        the last epoch, the number of users given and the number trained on.
        """
        users = self._check(users, scores, supports, queries)
        n_items = scores.shape[-1]
        if exclude is not None and tuple(exclude.shape) != (len(users), n_items):
            raise ValueError(f"exclude must be (B, N) = {(len(users), n_items)}")
        exclude = (torch.zeros(len(users), n_items, dtype=torch.bool) if exclude is None
                   else exclude.to("cpu", torch.bool))
        call = {"users": users.copy(), "scores": scores.detach().to("cpu", torch.float32),
                "supports": [np.asarray(r, dtype=np.int64).reshape(-1) for r in supports],
                "queries": [np.asarray(r, dtype=np.int64).reshape(-1) for r in queries],
                "exclude": exclude}
        calls = [*self._replay, call] if self.cfg.replay else [call]
        n_all = max(c["scores"].shape[-1] for c in calls)
        users_all = np.concatenate([c["users"] for c in calls])
        scores_all = torch.cat([_pad_items(c["scores"], n_all, -math.inf) for c in calls])
        exclude_all = torch.cat([_pad_items(c["exclude"], n_all, True)
                                 for c in calls]).to(self.device)
        supports_all = [r for c in calls for r in c["supports"]]
        queries_all = [r for c in calls for r in c["queries"]]
        if self.cfg.replay:
            self._replay = calls[-self.cfg.replay:]
        out = self._train(users_all, scores_all, supports_all, queries_all, exclude_all,
                          self.cfg.epochs if epochs is None else epochs)
        return {**out, "users": len(users), "trained_on": len(users_all)}

    def _train(self, users: np.ndarray, scores: Tensor, supports: list[np.ndarray],
               queries: list[np.ndarray], exclude: Tensor, epochs: int) -> dict:
        prep = _prepare(scores, self.cfg.top, self.device)
        keep = np.array([i for i, q in enumerate(queries) if len(q)], dtype=np.int64)
        self._step += 1
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self._step)
        self.net.train()
        loss_sum, loss_n = 0.0, 0
        for _ in range(epochs):
            loss_sum, loss_n = 0.0, 0
            order = keep[torch.randperm(len(keep), generator=gen).numpy()]
            for start in range(0, len(order), self.cfg.meta_batch):
                idx = order[start:start + self.cfg.meta_batch]
                at = torch.as_tensor(idx, device=self.device)
                loss, n_users = self._query_loss(users[idx], prep[at], [supports[i] for i in idx],
                                                 [queries[i] for i in idx], exclude[at])
                if n_users == 0:
                    continue
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                loss_sum += loss.item() * n_users
                loss_n += n_users
        return {"loss": loss_sum / max(loss_n, 1)}

    def _query_loss(self, users: np.ndarray, prep: _Prepared, supports: list[np.ndarray],
                    queries: list[np.ndarray], exclude: Tensor) -> tuple[Tensor, int]:
        """Mean over users of the loss (``cfg.loss``) of their query items under the
        combination rule, the excluded items removed from the softmax."""
        logits, x = self._forward(users, prep, supports)
        qry, qmask = _pad(queries, x.shape[-1], self.device)
        qmask = qmask * (~exclude.gather(1, qry)).float()
        logw = torch.log_softmax(logits, -1)
        if self.cfg.combine == "logits":
            c = _blend(logw.exp(), x, prep.z > _NEG / 2).masked_fill(exclude, _NEG)
            ll = (c.gather(1, qry) - torch.logsumexp(c, -1, keepdim=True)).clamp_min(LOG_FLOOR)
        else:
            lse = torch.logsumexp(x.masked_fill(exclude[:, None, :], _NEG), -1)
            lp_q = _gather_log_probs(x, prep.z, lse, qry)
            ll = torch.logsumexp(logw[:, :, None] + lp_q, 1)
        has = (qmask.sum(-1) > 0).float()
        n_users = int(has.sum().item())
        return (_set_nll(ll, qmask, self.cfg.loss) * has).sum() / max(n_users, 1), n_users

    def weights(self, users: np.ndarray, scores: Tensor, supports: list[np.ndarray]) -> Tensor:
        """Per-user weights (B, M) over the base models, rows summing to one (after the
        local adaptation on each user's support when ``local_steps > 0``)."""
        users = self._check(users, scores, supports)
        self.net.eval()
        out = [torch.zeros(0, self.n_models, device=self.device)]
        with torch.no_grad():
            for s in range(0, len(users), CHUNK):
                prep = _prepare(scores[s:s + CHUNK], self.cfg.top, self.device)
                logits = self._forward(users[s:s + CHUNK], prep, supports[s:s + CHUNK])[0]
                out.append(torch.softmax(logits.detach(), -1))
        return torch.cat(out)

    def combine(self, scores: Tensor, weights: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Log-probabilities (B, N) of the items under the combination rule (``cfg.combine``),
        normalised over the non-excluded items; ``-inf`` where excluded or where no model
        scores the item. mixture: ``log sum_m w_m p_m(i)``, each ``p_m`` renormalised over
        the non-excluded items; logits: ``log_softmax(sum_m w_m z_m / tau_m)``, a model
        adding nothing at the items it does not score."""
        if scores.ndim != 3 or tuple(weights.shape) != tuple(scores.shape[:2]):
            raise ValueError("scores must be (B, M, N) and weights (B, M)")
        out = [torch.zeros(0, scores.shape[-1], device=self.device)]
        with torch.no_grad():
            tau = self.net.tau()
            for s in range(0, scores.shape[0], CHUNK):
                z = _prepare(scores[s:s + CHUNK], 1, self.device).z
                valid = z > _NEG / 2
                w = weights[s:s + CHUNK].to(self.device, torch.float32)
                drop = None if exclude is None else ~exclude[s:s + CHUNK].to(self.device,
                                                                             torch.bool)
                if self.cfg.combine == "logits":
                    keep = valid.any(1) if drop is None else valid.any(1) & drop
                    c = torch.where(keep, _blend(w, z / tau[:, None], valid), -math.inf)
                    out.append(torch.where(keep, torch.log_softmax(c, -1), -math.inf))
                    continue
                keep = valid if drop is None else valid & drop[:, None]
                x = torch.where(keep, z / tau[:, None], -math.inf)
                lp = torch.where(keep, x - torch.logsumexp(x, -1, keepdim=True), -math.inf)
                out.append(torch.logsumexp(w.log()[:, :, None] + lp, 1))
        return torch.cat(out)

    def rank_scores(self, users: np.ndarray, scores: Tensor, supports: list[np.ndarray],
                    exclude: Tensor | None = None) -> Tensor:
        """Ranking scores (B, N): :meth:`weights` then :meth:`combine`."""
        return self.combine(scores, self.weights(users, scores, supports), exclude)

    def temperatures(self) -> dict[str, float]:
        """The learned temperature of each base model (on its z-scores)."""
        return dict(zip(self.model_names, self.net.tau().tolist(), strict=True))

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Parameters and Adam state as tensors, plus JSON-able metadata."""
        tensors = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            tensors.update({f"opt.{idx}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
        for j, call in enumerate(self._replay):
            tensors[f"replay.{j}.users"] = torch.as_tensor(call["users"], dtype=torch.int64)
            tensors[f"replay.{j}.scores"] = call["scores"].clone()
            tensors[f"replay.{j}.exclude"] = call["exclude"].clone()
            for name in ("supports", "queries"):
                flat, lengths = _flat(call[name])
                tensors[f"replay.{j}.{name}"], tensors[f"replay.{j}.{name}_len"] = flat, lengths
        meta = {"selector": "metaselector", "model_names": self.model_names,
                "config": self.cfg.model_dump(), "seed": self.seed, "step": self._step,
                "user_cards": list(self.cards), "opt_param_groups": opt["param_groups"],
                "replay_calls": len(self._replay)}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict, features: SideFeatures,
                   device: torch.device | str = "cpu") -> MetaSelector:
        """Rebuild what :meth:`state` returned (``features`` must have the same fields)."""
        if tuple(meta["user_cards"]) != tuple(int(c) for c in features.user_cards):
            raise ValueError("features do not match the selector's user fields: "
                             f"{tuple(features.user_cards)} != {tuple(meta['user_cards'])}")
        sel = cls(list(meta["model_names"]), features, SelectorConfig(**meta["config"]),
                  seed=int(meta["seed"]), device=device)
        t = {k: v.to(sel.device) for k, v in tensors.items()}
        sel.net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
        state: dict[int, dict] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v.cpu() if name == "step" else v
        sel.opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        sel._step = int(meta["step"])
        for j in range(int(meta.get("replay_calls", 0))):
            r = {k[len(f"replay.{j}."):]: v.cpu() for k, v in tensors.items()
                 if k.startswith(f"replay.{j}.")}
            sel._replay.append({"users": r["users"].numpy(), "scores": r["scores"],
                                "exclude": r["exclude"].to(torch.bool),
                                "supports": _unflat(r["supports"], r["supports_len"]),
                                "queries": _unflat(r["queries"], r["queries_len"])})
        return sel


def oracle_choice(per_model_metric: np.ndarray) -> np.ndarray:
    """The oracle per-user selector (the paper's upper bound): for a (B, M) matrix of each
    base model's metric per user (higher is better), the (B,) index of the best model.
    Ties go to the lowest index; NaN counts as worse than any number."""
    m = np.asarray(per_model_metric, dtype=float)
    if m.ndim != 2 or m.shape[1] < 1:
        raise ValueError(f"per_model_metric must be (B, M) with M >= 1, got {m.shape}")
    return np.argmax(np.where(np.isnan(m), -np.inf, m), axis=1).astype(np.int64)
