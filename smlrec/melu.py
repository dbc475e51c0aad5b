"""MeLU: meta-learned user preference for cold-start recommendation (Lee et al., KDD 2019).

MeLU treats every user as a task. A user's few known interactions (the *support*) adapt a
shared model to that user with a handful of gradient steps (the *local update*); the shared
starting point is meta-learned so that these few steps generalise to the user's other items
(the *query*), as in MAML.

The model, over the side features of :mod:`smlrec.side`:

- **Embeddings** (shared, never adapted locally): one table per user categorical field and
  per item categorical field (``emb_dim`` each); the item multi-hot (e.g. genres) as a linear
  bag, the mean of its tokens' embeddings (zeros when it has none); optionally
  (``item_ids``) an item-id table, one row per item vocab row, new rows starting at zero.
  An item is the concatenation of its field embeddings (and id embedding); a user the
  concatenation of their field embeddings, or one learned constant vector when the user
  table has no fields. Options (default off): ``item_prior`` feeds an item's
  ``log1p(item_prior[item])`` (a per-item dynamic count the caller passes, e.g. the
  popularity floor's recent counts) either as one more item column (``input``) or as a
  logit offset times a decision-layer weight starting at 1 (``offset``); ``support_bag``
  appends the mean of the support items' representations to the user (a hybrid of MeLU
  and an item-bag model, not plain MeLU).
- **Decision layers** (adapted locally): an MLP over concat(user, item),
  Linear(hidden) ReLU Linear(hidden) ReLU Linear(1), giving a logit. The first layer is
  kept as ``fc1_user·user + fc1_item·item + b`` (the same map as one Linear over the
  concatenation, initialised as one), so a user's part is computed once for all the items.

**Implicit feedback.** The paper regresses explicit ratings with a squared loss; here the
data are positives only, so by default every loss, local and meta, is a balanced binary
cross-entropy: the mean of ``-log σ(s)`` over the positives plus the mean of ``-log σ(-s)``
over ``n_negatives`` negatives per positive, drawn uniformly from the known item rows
``[0, n_items)`` (resampled, a few rounds, where they hit the user's own positives). With
``loss`` (meta) or ``local_loss`` (local) ``"softmax"``, each positive is instead scored by
the cross-entropy of it against all the user's N negatives, each negative's logit raised by
logQ = log(n_items / N) (uniform negatives: a consistent estimate of the full softmax).

**Local update** (inner loop): only the decision layers, ``local_steps`` plain SGD steps at
``local_lr`` on the support loss, written with :mod:`torch.func` (``functional_call`` +
``grad``) and ``vmap``-ed over the users of a batch (supports padded to one length with
weights that are zero on the padding, so a user with an empty support is not adapted).

**Meta-update** (outer loop): the query loss under each user's adapted decision layers,
averaged over ``meta_batch`` tasks, minimised by Adam at ``meta_lr`` over all parameters
(embeddings and the initial decision layers). The meta-gradient flows through the inner
steps (second order), or treats the inner gradients as constants (``first_order``).

Randomness is drawn from generators seeded from ``seed``, never from the global streams:
initialisation from a ``torch.Generator``; training negatives, query subsampling and task
order from a numpy ``Generator``. The negatives of a local update at scoring time come from
a generator seeded by ``(seed, user)``, so a user's adapted model does not depend on the
batch it is scored in or on what was scored before (``score`` and ``adapt`` agree).

**Scoring** (:meth:`MeLU.score`): the local update vmapped over a batch of users, then every
item scored under each user's adapted layers with plain batched matmuls of the same MLP, in
chunks of items small enough to stay in cache (measured about 2x faster on the CPU than
vmapping the module over all items at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from smlrec.config import _Config
from smlrec.models import reset_parameters
from smlrec.side import SideFeatures

# Standard deviation of the initial rows of the categorical embedding tables (and of the
# multi-hot token embeddings and the constant user vector). Item-id rows start at zero.
EMB_STD = 0.1
# Rounds of resampling for a negative that hit one of the user's positives.
RESAMPLE_ROUNDS = 3
# Scoring: at most this many (user, item, hidden) activations at once (chunks of items):
# on the CPU a few MB (measured 2x faster than one big block); on a GPU, large blocks.
SCORE_CHUNK = 1 << 21
SCORE_CHUNK_CUDA = 1 << 27
# Entropy tag of the per-user generators used when adapting for scoring.
_ADAPT_STREAM = 0x5C0E


class MeLUConfig(_Config):
    """MeLU's knobs. Sizes from the paper (32-d embeddings, 64-unit decision layers, 5 local
    steps, meta-batches of 32); the learning rates suit the implicit BCE loss."""

    emb_dim: int = Field(32, ge=1, description="Dimension of every embedding table.")
    hidden: int = Field(64, ge=1, description="Units of the two hidden decision layers.")
    local_lr: float = Field(0.1, gt=0, description="SGD step size of the local update.")
    local_steps: int = Field(5, ge=0, description="SGD steps of the local update (0: none).")
    meta_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the meta-update.")
    meta_batch: int = Field(32, ge=1, description="Tasks (users) per meta-update.")
    n_negatives: int = Field(4, ge=1, description="Sampled negatives per positive, in the "
                             "local (support) and meta (query) losses.")
    epochs: int = Field(1, ge=1, description="Passes over the tasks per meta_train call.")
    item_ids: bool = Field(True, description="Add an item-id embedding to the item "
                           "features (new rows start at zero: a new item is its features).")
    first_order: bool = Field(False, description="First-order MAML: the meta-gradient "
                              "treats the local gradients as constants (cheaper).")
    max_support: int = Field(20, ge=1, description="A longer support keeps its last "
                             "max_support items (the most recent).")
    max_query: int = Field(50, ge=1, description="A longer query is subsampled (seeded) to "
                           "max_query items.")
    loss: Literal["bce", "softmax"] = Field("bce", description="The meta (query) loss: "
                                            "balanced BCE, or a sampled softmax of each "
                                            "positive against the user's negatives (logQ).")
    local_loss: Literal["bce", "softmax"] = Field("bce", description="The local (support) "
                                                  "loss, the same choices.")
    item_prior: Literal["none", "input", "offset"] = Field(
        "none", description="An item's log1p(item_prior[item]) (e.g. its recent count; the "
        "caller passes item_prior to meta_train, score and adapt): none; input, one more "
        "column of the item representation; offset, added to the logit times a weight of "
        "the decision layers (starting at 1, adapted locally like them).")
    support_bag: bool = Field(False, description="Append the mean of the support items' "
                              "representations to the user representation (a hybrid of "
                              "MeLU and an item-bag model).")


class _Embeddings(nn.Module):
    """The shared tables: user fields (or a constant), item fields, the multi-hot bag, ids."""

    def __init__(self, user_cards: Sequence[int], item_cards: Sequence[int], n_tokens: int,
                 n_items: int, dim: int, item_ids: bool):
        super().__init__()
        self.dim = dim
        self.user = nn.ModuleList(nn.Embedding(c, dim) for c in user_cards)
        self.user_const = nn.Parameter(torch.zeros(1, dim)) if not user_cards else None
        self.item = nn.ModuleList(nn.Embedding(c, dim) for c in item_cards)
        self.bag = nn.Parameter(torch.zeros(n_tokens, dim)) if n_tokens else None
        self.item_id = nn.Parameter(torch.zeros(n_items, dim)) if item_ids else None

    @property
    def user_dim(self) -> int:
        return self.dim * max(1, len(self.user))

    @property
    def item_dim(self) -> int:
        return self.dim * (len(self.item) + (self.bag is not None) + (self.item_id is not None))

    def init(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for t in [*self.user, *self.item]:
                t.weight.normal_(0.0, EMB_STD, generator=generator)
            for p in (self.user_const, self.bag):
                if p is not None:
                    p.normal_(0.0, EMB_STD, generator=generator)
            if self.item_id is not None:
                self.item_id.zero_()

    def users(self, codes: Tensor) -> Tensor:
        """(..., F_u) codes -> (..., user_dim)."""
        if self.user_const is not None:
            return self.user_const.expand(*codes.shape[:-1], self.dim)
        return torch.cat([t(codes[..., j]) for j, t in enumerate(self.user)], -1)

    def items(self, codes: Tensor, multi: Tensor, ids: Tensor) -> Tensor:
        """(..., F_i) codes, (..., T) multi-hot, (...) id rows (-1: none) -> (..., item_dim)."""
        parts = [t(codes[..., j]) for j, t in enumerate(self.item)]
        if self.bag is not None:
            parts.append(multi @ self.bag / multi.sum(-1, keepdim=True).clamp_min(1.0))
        if self.item_id is not None:
            known = (ids >= 0) & (ids < self.item_id.shape[0])
            rows = self.item_id[torch.where(known, ids, 0)]
            parts.append(rows * known.unsqueeze(-1).to(rows.dtype))
        return torch.cat(parts, -1)


class _Decision(nn.Module):
    """The locally adapted MLP: concat(user, item) -> Linear ReLU Linear ReLU Linear -> logit.

    The first Linear is kept as its user columns (``fc1_user``, with the bias) and its item
    columns (``fc1_item``): the same map as one Linear over the concatenation, but a user's
    part is computed once for all the items scored, and no gradient goes through a slice."""

    def __init__(self, user_dim: int, item_dim: int, hidden: int, offset: bool = False):
        super().__init__()
        self.fc1_user = nn.Linear(user_dim, hidden)
        self.fc1_item = nn.Linear(item_dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        # offset: the items' last column is a prior, added to the logit times this weight
        self.prior_weight = nn.Parameter(torch.ones(1)) if offset else None

    def init(self, generator: torch.Generator) -> None:
        """PyTorch's default initialisation (from ``generator``), the first layer as one
        Linear over the concatenation (fan-in user_dim + item_dim), then split."""
        user_dim = self.fc1_user.in_features
        fc1 = nn.Linear(user_dim + self.fc1_item.in_features, self.fc1_user.out_features)
        reset_parameters(fc1, generator)
        reset_parameters(self.fc2, generator)
        reset_parameters(self.out, generator)
        with torch.no_grad():
            self.fc1_user.weight.copy_(fc1.weight[:, :user_dim])
            self.fc1_user.bias.copy_(fc1.bias)
            self.fc1_item.weight.copy_(fc1.weight[:, user_dim:])
            if self.prior_weight is not None:
                self.prior_weight.fill_(1.0)

    def forward(self, user: Tensor, items: Tensor) -> Tensor:
        """``user`` (..., user_dim), ``items`` (..., n, item_dim) -> logits (..., n)."""
        prior = None
        if self.prior_weight is not None:
            items, prior = items[..., :-1], items[..., -1]
        h = torch.relu(self.fc1_item(items) + self.fc1_user(user).unsqueeze(-2))
        h = torch.relu(self.fc2(h))
        logits = self.out(h).squeeze(-1)
        return logits if prior is None else logits + self.prior_weight * prior

    @staticmethod
    def batched(params: dict[str, Tensor], user: Tensor, items: Tensor) -> Tensor:
        """The same MLP with per-user parameters (each with a leading B): ``user`` (B,
        user_dim), ``items`` (n, item_dim) shared -> logits (B, n). Plain batched matmuls,
        in place where possible (scoring, no gradient)."""
        prior = None
        if "prior_weight" in params:
            items, prior = items[:, :-1], items[:, -1]
        hu = torch.baddbmm(params["fc1_user.bias"].unsqueeze(-1), params["fc1_user.weight"],
                           user.unsqueeze(-1)).transpose(1, 2)           # (B, 1, h)
        h = torch.matmul(items, params["fc1_item.weight"].transpose(1, 2))  # (B, n, h)
        h = h.add_(hu).relu_()
        h = torch.baddbmm(params["fc2.bias"].unsqueeze(1), h,
                          params["fc2.weight"].transpose(1, 2)).relu_()
        logits = torch.baddbmm(params["out.bias"].unsqueeze(1), h,
                               params["out.weight"].transpose(1, 2)).squeeze(-1)
        return logits if prior is None else logits.add_(params["prior_weight"] * prior)


class _Net(nn.Module):
    def __init__(self, emb: _Embeddings, hidden: int, prior: str = "none", bag: bool = False):
        super().__init__()
        self.emb = emb
        self.decision = _Decision(emb.user_dim + (emb.item_dim if bag else 0),
                                  emb.item_dim + (prior == "input"), hidden, prior == "offset")


def _prior_values(prior: Tensor | None, items: Tensor) -> Tensor:
    """``log1p(prior[items])`` (float, the shape of ``items``); 0 for rows outside the prior
    (or no prior at all)."""
    if prior is None or prior.numel() == 0:
        return torch.zeros(items.shape, device=items.device)
    prior = prior.to(items.device, torch.float32).reshape(-1)
    known = (items >= 0) & (items < prior.shape[0])
    v = prior[torch.where(known, items, 0)].clamp_min(0.0)
    return torch.log1p(v) * known.to(v.dtype)


def _masked_mean(reps: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim -2 of ``reps`` (..., L, d) where ``mask`` (..., L); zeros when none."""
    m = mask.unsqueeze(-1).to(reps.dtype)
    return (reps * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def _user_negatives(rng: np.random.Generator, n_items: int, positives: np.ndarray,
                    count: int) -> np.ndarray:
    """``count`` item rows drawn uniformly from [0, n_items), resampled (a few rounds) where
    they hit ``positives`` (unless the positives cover the items)."""
    neg = rng.integers(0, n_items, count)
    if count and len(np.unique(positives)) < n_items:
        for _ in range(RESAMPLE_ROUNDS):
            bad = np.isin(neg, positives)
            if not bad.any():
                break
            neg[bad] = rng.integers(0, n_items, int(bad.sum()))
    return neg


def _pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths -> (B, L) int64 (padding 0) and (B, L) bool mask; L >= 1."""
    width = max([1, *(len(r) for r in rows)])
    out = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
        mask[b, :len(r)] = True
    return out, mask


class MeLU:
    """MeLU over side features (see the module doc). ``features`` rows are vocab rows."""

    def __init__(self, features: SideFeatures, cfg: MeLUConfig = MeLUConfig(), seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.seed = int(seed)
        self.device = torch.device(device)
        self.features = features.to(self.device)
        emb = _Embeddings(features.user_cards, features.item_cards,
                          int(features.item_multi.shape[1]), features.n_items, cfg.emb_dim,
                          cfg.item_ids)
        if emb.item_dim == 0:
            raise ValueError("MeLU needs item features or item_ids=True: items would have no "
                             "representation")
        gen = torch.Generator().manual_seed(self.seed)
        emb.init(gen)
        self.net = _Net(emb, cfg.hidden, cfg.item_prior, cfg.support_bag)
        self.net.decision.init(gen)
        self.net.to(self.device)
        self._rng = np.random.default_rng([self.seed, 1])
        self._opt = torch.optim.Adam(self.net.parameters(), lr=cfg.meta_lr)
        self.meta_steps = 0

    # ----------------------------------------------------------------- features and tables

    @property
    def n_items(self) -> int:
        """Rows of the item-id table (the features' rows when there is no id table)."""
        ids = self.net.emb.item_id
        return int(ids.shape[0]) if ids is not None else self.features.n_items

    def set_features(self, features: SideFeatures) -> None:
        """Use new side features (same encoding, possibly more rows); grows the id table to
        ``features.n_items`` rows (new rows at zero)."""
        f = self.features
        if (tuple(features.user_cards) != tuple(f.user_cards)
                or tuple(features.item_cards) != tuple(f.item_cards)
                or features.item_multi.shape[1] != f.item_multi.shape[1]):
            raise ValueError("set_features: the side features are encoded differently from "
                             "the ones this model was built on")
        self.features = features.to(self.device)
        self._grow_ids(features.n_items)

    def _grow_ids(self, n: int) -> None:
        """At least ``n`` item-id rows, new ones at zero (Adam's moments padded with zeros)."""
        old = self.net.emb.item_id
        if old is None or n <= old.shape[0]:
            return
        extra = n - old.shape[0]
        new = nn.Parameter(torch.cat([old.detach(), old.new_zeros(extra, old.shape[1])]))
        self.net.emb.item_id = new
        for group in self._opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self._opt.state.pop(old, None)
        if state is not None:
            self._opt.state[new] = {
                k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])])
                if torch.is_tensor(v) and v.shape == old.shape else v
                for k, v in state.items()}

    def _user_reps(self, users: Tensor, bag: Tensor | None = None) -> Tensor:
        """User representations (..., user_dim), with ``bag`` (the mean support item,
        zeros when None) appended under ``support_bag``."""
        codes = self.features.user
        known = (users >= 0) & (users < codes.shape[0])
        c = codes[torch.where(known, users, 0)] * known.unsqueeze(-1).to(codes.dtype)
        u = self.net.emb.users(c)
        if not self.cfg.support_bag:
            return u
        if bag is None:
            bag = u.new_zeros(*u.shape[:-1], self.net.emb.item_dim)
        return torch.cat([u, bag], -1)

    def _item_base(self, items: Tensor) -> Tensor:
        """Item representations from the embeddings alone (..., emb.item_dim)."""
        f = self.features
        known = (items >= 0) & (items < f.item.shape[0])
        safe = torch.where(known, items, 0)
        codes = f.item[safe] * known.unsqueeze(-1).to(f.item.dtype)
        multi = f.item_multi[safe] * known.unsqueeze(-1).to(f.item_multi.dtype)
        return self.net.emb.items(codes, multi, items)

    def _with_prior(self, reps: Tensor, prior_values: Tensor | None) -> Tensor:
        if self.cfg.item_prior == "none":
            return reps
        if prior_values is None:
            prior_values = reps.new_zeros(reps.shape[:-1])
        return torch.cat([reps, prior_values.unsqueeze(-1).to(reps.dtype)], -1)

    def _item_reps(self, items: Tensor, prior_values: Tensor | None = None) -> Tensor:
        """Item representations (..., decision item_dim): the embeddings, then (under
        ``item_prior``) ``prior_values`` (log1p counts, the shape of ``items``)."""
        return self._with_prior(self._item_base(items), prior_values)

    def _check_prior(self, item_prior: object) -> None:
        if self.cfg.item_prior != "none" and item_prior is None:
            raise ValueError("MeLUConfig.item_prior is on: pass item_prior (the items' "
                             "recent counts)")

    def _tensor(self, a: np.ndarray, dtype: torch.dtype = torch.int64) -> Tensor:
        return torch.as_tensor(a, dtype=dtype).to(self.device)

    # ------------------------------------------------------------------ losses (torch.func)

    def _batch(self, positives: list[np.ndarray], negatives: list[np.ndarray]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Per user: item rows (B, L), label signs (+1 / -1) and loss weights (B, L), the
        weights making each user's loss mean(positives) + mean(negatives), zero on padding."""
        pos, pmask = _pad(positives)
        neg, nmask = _pad(negatives)
        npos = np.maximum(pmask.sum(1, keepdims=True), 1)
        nneg = np.maximum(nmask.sum(1, keepdims=True), 1)
        items = np.concatenate([pos, neg], 1)
        sign = np.concatenate([np.ones_like(pos), -np.ones_like(neg)], 1)
        weight = np.concatenate([pmask / npos, nmask / nneg], 1)
        return (self._tensor(items), self._tensor(sign, torch.float32),
                self._tensor(weight, torch.float32))

    def _loss(self, params: dict[str, Tensor], user: Tensor, items: Tensor, sign: Tensor,
              weight: Tensor, kind: str = "bce", log_n: float = 0.0) -> Tensor:
        """One user's loss: ``user`` (user_dim), ``items`` (L, item_dim). ``bce``: the
        weighted BCE. ``softmax``: per positive, cross-entropy of it against all the user's
        negatives, each negative's logit raised by logQ = log(n_items / N) (N uniform
        negatives: a consistent estimate of the full softmax), averaged over positives."""
        logits = functional_call(self.net.decision, params, (user, items))
        if kind == "bce":
            return (F.softplus(-sign * logits) * weight).sum()
        pos = (sign > 0) & (weight > 0)
        neg = (sign < 0) & (weight > 0)
        # a negative's weight is 1/N: log(n_items / N) = log_n + log(weight)
        corrected = logits + log_n + torch.log(weight.clamp_min(1e-30))
        lse = torch.logsumexp(torch.where(neg, corrected, torch.full_like(logits, -1e9)), -1)
        return (F.softplus(lse - logits) * torch.where(pos, weight, 0.0)).sum()

    def _adapt_one(self, params: dict[str, Tensor], user: Tensor, items: Tensor, sign: Tensor,
                   weight: Tensor, first_order: bool = False, log_n: float = 0.0
                   ) -> dict[str, Tensor]:
        """The local update: ``local_steps`` SGD steps on the decision layers only."""
        lr = self.cfg.local_lr
        loss = partial(self._loss, kind=self.cfg.local_loss, log_n=log_n)
        for _ in range(self.cfg.local_steps):
            g = grad(loss)(params, user, items, sign, weight)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: p - lr * g[k] for k, p in params.items()}
        return params

    def _init_params(self, detach: bool) -> dict[str, Tensor]:
        return {k: (p.detach() if detach else p)
                for k, p in self.net.decision.named_parameters()}

    # ---------------------------------------------------------------------- meta-training

    def _outer_loss(self, tasks: list, n_items: int, priors: list | None = None) -> Tensor:
        """Mean query loss of a meta-batch of tasks after each one's local update (``priors``:
        one item-count tensor per task, under ``item_prior``)."""
        k, rng = self.cfg.n_negatives, self._rng
        supports, queries, s_neg, q_neg = [], [], [], []
        for t in tasks:
            s = np.asarray(t.support, np.int64)[-self.cfg.max_support:]
            q = np.asarray(t.query, np.int64)
            if len(q) > self.cfg.max_query:
                q = q[np.sort(rng.choice(len(q), self.cfg.max_query, replace=False))]
            supports.append(s)
            queries.append(q)
            s_neg.append(_user_negatives(rng, n_items, s, k * len(s)))
            q_neg.append(_user_negatives(rng, n_items, np.concatenate([s, q]), k * len(q)))
        s_items, s_sign, s_w = self._batch(supports, s_neg)
        q_items, q_sign, q_w = self._batch(queries, q_neg)
        s_base = self._item_base(s_items)
        bag = _masked_mean(s_base, (s_sign > 0) & (s_w > 0)) if self.cfg.support_bag else None
        users = self._user_reps(self._tensor(np.array([t.user for t in tasks], np.int64)), bag)
        s_pv = q_pv = None
        if self.cfg.item_prior != "none":
            s_pv = torch.stack([_prior_values(p, r) for p, r in zip(priors, s_items,
                                                                    strict=True)])
            q_pv = torch.stack([_prior_values(p, r) for p, r in zip(priors, q_items,
                                                                    strict=True)])
        s_reps, q_reps = self._with_prior(s_base, s_pv), self._item_reps(q_items, q_pv)
        params = self._init_params(detach=False)
        first_order, log_n = self.cfg.first_order, float(np.log(max(1, n_items)))

        def task_loss(u, si, ss, sw, qi, qs, qw):
            adapted = self._adapt_one(params, u, si, ss, sw, first_order, log_n)
            return self._loss(adapted, u, qi, qs, qw, self.cfg.loss, log_n)

        losses = vmap(task_loss)(users, s_reps, s_sign, s_w, q_reps, q_sign, q_w)
        return losses.mean()

    def meta_train(self, tasks: list, n_items: int, epochs: int | None = None,
                   item_prior: Tensor | Sequence[Tensor] | None = None) -> dict:
        """Meta-train on ``tasks`` (:class:`smlrec.coldtrack.UserTask`; those with an empty
        support or query are skipped) with negatives from item rows [0, n_items). Under
        ``item_prior``, ``item_prior`` is the items' counts (row-indexed; rows beyond it
        count 0) for every task, or one such tensor per task (each task seeing the counts
        from before its period). Returns ``{"loss": mean outer loss, "tasks": tasks used}``."""
        self._check_prior(item_prior)
        if item_prior is None or torch.is_tensor(item_prior):
            priors = [item_prior] * len(tasks)
        else:
            priors = list(item_prior)
            if len(priors) != len(tasks):
                raise ValueError(f"meta_train: {len(tasks)} tasks but {len(priors)} priors")
        keep = [j for j, t in enumerate(tasks) if len(t.support) and len(t.query)]
        tasks, priors = [tasks[j] for j in keep], [priors[j] for j in keep]
        self._grow_ids(n_items)
        self.net.train()
        total, count = 0.0, 0
        for _ in range(self.cfg.epochs if epochs is None else epochs):
            order = self._rng.permutation(len(tasks))
            for start in range(0, len(tasks), self.cfg.meta_batch):
                idx = order[start:start + self.cfg.meta_batch]
                loss = self._outer_loss([tasks[i] for i in idx], n_items,
                                        [priors[i] for i in idx])
                self._opt.zero_grad(set_to_none=True)
                loss.backward()
                self._opt.step()
                self.meta_steps += 1
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        self.net.eval()
        return {"loss": total / count if count else float("nan"), "tasks": len(tasks)}

    # -------------------------------------------------------------------------- scoring

    def _local_batch(self, users: Sequence[int], supports: list[np.ndarray], n_items: int,
                     item_prior: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Local-update inputs for scoring: user reps, support items' reps, signs, weights.
        Negatives come from a generator seeded by (seed, user)."""
        k = self.cfg.n_negatives
        sup, neg = [], []
        for u, s in zip(users, supports, strict=True):
            s = np.asarray(s, np.int64).reshape(-1)[-self.cfg.max_support:]
            rng = np.random.default_rng([self.seed, _ADAPT_STREAM, int(u)])
            sup.append(s)
            neg.append(_user_negatives(rng, n_items, s, k * len(s)) if len(s) else s)
        items, sign, weight = self._batch(sup, neg)
        base = self._item_base(items)
        bag = _masked_mean(base, (sign > 0) & (weight > 0)) if self.cfg.support_bag else None
        u = self._user_reps(self._tensor(np.asarray(users, np.int64).reshape(-1)), bag)
        pv = _prior_values(item_prior, items) if self.cfg.item_prior != "none" else None
        return u, self._with_prior(base, pv), sign, weight

    def _adapted(self, users: Sequence[int], supports: list[np.ndarray], n_items: int,
                 item_prior: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """User reps (B, user_dim) and adapted decision params (each with a leading B); the
        local update is vmapped over the users (skipped when no support has an item)."""
        u, items, sign, weight = self._local_batch(users, supports, n_items, item_prior)
        params = self._init_params(detach=True)
        if not any(len(s) for s in supports):
            return u, {k: p.expand(len(users), *p.shape) for k, p in params.items()}
        adapt = partial(self._adapt_one, log_n=float(np.log(max(1, n_items))))
        adapted = vmap(adapt, in_dims=(None, 0, 0, 0, 0))(params, u, items, sign, weight)
        return u, adapted

    def _score_all(self, u: Tensor, params: dict[str, Tensor], n_items: int,
                   item_prior: Tensor | None = None) -> Tensor:
        """Logits (B, n_items) of users ``u`` (B, user_dim) under per-user ``params``, in
        chunks of items that keep the activations small (cache-sized on the CPU)."""
        out = torch.empty(u.shape[0], n_items, device=self.device)
        budget = SCORE_CHUNK if self.device.type == "cpu" else SCORE_CHUNK_CUDA
        chunk = max(1, budget // max(1, u.shape[0] * self.cfg.hidden))
        rows = torch.arange(n_items, device=self.device)
        reps = self._item_reps(rows, _prior_values(item_prior, rows)
                               if self.cfg.item_prior != "none" else None)
        for start in range(0, n_items, chunk):
            out[:, start:start + chunk] = _Decision.batched(params, u,
                                                            reps[start:start + chunk])
        return out

    @torch.no_grad()
    def score(self, users: Sequence[int] | np.ndarray, supports: list[np.ndarray], n_items: int,
              batch: int = 256, item_prior: Tensor | None = None) -> Tensor:
        """Logits (len(users), n_items) over item rows [0, n_items), each user's decision
        layers adapted on their support first (an empty support: no adaptation). Users are
        adapted and scored ``batch`` at a time (vmapped). ``item_prior``: the items' counts
        now (needed under ``item_prior``, ignored otherwise)."""
        self._check_prior(item_prior)
        users = np.asarray(users, np.int64).reshape(-1)
        if len(users) != len(supports):
            raise ValueError(f"score: {len(users)} users but {len(supports)} supports")
        out = torch.empty(len(users), n_items, device=self.device)
        for start in range(0, len(users), batch):
            sl = slice(start, start + batch)
            u, adapted = self._adapted(users[sl], supports[sl], n_items, item_prior)
            out[sl] = self._score_all(u, adapted, n_items, item_prior)
        return out

    @torch.no_grad()
    def adapt(self, user: int, support: np.ndarray, n_items: int,
              item_prior: Tensor | None = None) -> dict[str, Tensor]:
        """The decision-layer parameters adapted to one user's support (a copy of the initial
        ones for an empty support); score with :meth:`score_adapted`. The same local update
        as :meth:`score`'s (same negatives), without the batching."""
        self._check_prior(item_prior)
        support = np.asarray(support, np.int64).reshape(-1)
        params = self._init_params(detach=True)
        if not len(support):
            return {k: p.clone() for k, p in params.items()}
        u, items, sign, weight = self._local_batch([int(user)], [support], n_items, item_prior)
        return self._adapt_one(params, u[0], items[0], sign[0], weight[0],
                               log_n=float(np.log(max(1, n_items))))

    @torch.no_grad()
    def score_adapted(self, user: int, params: dict[str, Tensor], n_items: int,
                      support: np.ndarray | None = None, item_prior: Tensor | None = None
                      ) -> Tensor:
        """Logits (n_items,) of one user under decision-layer ``params`` (from :meth:`adapt`);
        ``support`` (the one adapted on) is needed under ``support_bag``."""
        self._check_prior(item_prior)
        bag = None
        if self.cfg.support_bag and support is not None and len(support):
            s = np.asarray(support, np.int64).reshape(-1)[-self.cfg.max_support:]
            bag = self._item_base(self._tensor(s)).mean(0, keepdim=True)
        u = self._user_reps(self._tensor(np.array([int(user)], np.int64)), bag)
        return self._score_all(u, {k: v.unsqueeze(0) for k, v in params.items()}, n_items,
                               item_prior)[0]

    # ------------------------------------------------------------------------- state

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """All parameters (CPU tensors) and JSON-able metadata. Adam's moments are not kept:
        a restored model's next ``meta_train`` starts Adam afresh."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        rng = self._rng.bit_generator.state
        meta = {"model": "melu", "config": self.cfg.model_dump(), "seed": self.seed,
                "n_items": self.n_items, "meta_steps": self.meta_steps,
                "user_cards": list(self.features.user_cards),
                "item_cards": list(self.features.item_cards),
                "n_tokens": int(self.features.item_multi.shape[1]),
                "rng": {"bit_generator": rng["bit_generator"],
                        "state": {k: str(v) for k, v in rng["state"].items()},
                        "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict, features: SideFeatures,
                   device: str | torch.device = "cpu") -> MeLU:
        """Rebuild a model saved by :meth:`state` over ``features`` (grown as needed)."""
        cfg = MeLUConfig(**meta["config"])
        if (list(features.user_cards) != list(meta["user_cards"])
                or list(features.item_cards) != list(meta["item_cards"])
                or int(features.item_multi.shape[1]) != int(meta["n_tokens"])):
            raise ValueError("from_state: the side features are encoded differently from the "
                             "ones the model was saved with")
        n = max(int(meta["n_items"]), features.n_items)
        model = cls(features.grow(features.n_users, n), cfg, int(meta["seed"]), device)
        model.features = features.to(model.device)
        saved = {k: v.to(model.device) for k, v in tensors.items()}
        if "emb.item_id" in saved and saved["emb.item_id"].shape[0] < n:
            t = saved["emb.item_id"]
            saved["emb.item_id"] = torch.cat([t, t.new_zeros(n - t.shape[0], t.shape[1])])
        model.net.load_state_dict(saved)
        model.meta_steps = int(meta.get("meta_steps", 0))
        rng = meta.get("rng")
        if rng:
            model._rng.bit_generator.state = {
                "bit_generator": rng["bit_generator"],
                "state": {k: int(v) for k, v in rng["state"].items()},
                "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]}
        return model
