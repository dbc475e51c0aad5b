"""A feature-based two-tower model trained with a sampled softmax (Yi et al., RecSys 2019).

Two networks map a user and an item into the same ``dim``-dimensional space:

- the **user tower** reads the embeddings of the user's categorical fields (concatenated)
  and the user's *bag*: the mean of the item-id embeddings of the user's ``bag_size`` most
  recent items (zeros for a user with none). An MLP (Linear ``hidden``, ReLU, Linear
  ``dim``) turns them into the user vector, L2-normalised when ``normalize`` is on;
- the **item tower** reads the item's categorical field embeddings, the mean of the token
  embeddings of its multi-hot fields (e.g. genres) and its item-id embedding, through an
  MLP of the same shape. The id table is the one the bags read; it grows with the item
  vocabulary and its new rows start at zero, so a brand-new item is scored from its
  features alone until it has been trained on.

Only side features and interaction sequences enter, so a user or item never seen in
training still gets a vector: from its features, and for a user from the bag of items it
has interacted with since.

**Training examples.** :meth:`TwoTower.fit` trains on the positives of the newest
``replay`` periods of the history it is given. The example for a positive (u, i) is the
user u with the bag of u's interactions *before* this one (earlier periods of the history,
then earlier rows of the same period, the last ``bag_size`` of them): the bag never holds
this interaction nor anything after it. An *earlier* interaction with the same item (a
repeat) stays in the bag, as it will at serving time; dropping it would give the target
away by its absence (a bag short of a popular item would mean "the target is that item").

**Loss.** A sampled softmax of each positive against the batch's other positives
(in-batch negatives) and, with ``hard_negatives = k``, the k candidates the current model
scores highest among ``hard_pool`` items drawn uniformly per positive (mined without
gradient, never the positive itself). Logits are ``<user, item> / temperature``. The
softmax's denominator should be the sum over every item; the batch's columns estimate it,
but they are drawn in proportion to each item's frequency, so without correction a popular
item is counted many times over and over-penalised. With ``logq`` the log of its sampling
probability, ``log q_j`` with ``q_j`` = item j's expected count among a batch's positives
(its frequency in the training examples times the batch size, the estimate of Yi et al.),
is subtracted from every in-batch negative column, so each item weighs once in expectation.
The row's own item is the target and stands for itself alone: its logit is not corrected,
and the other columns holding the same item are masked (they are not negatives). Mined
negatives are not corrected (the model picks them; they follow no known distribution).
See :func:`softmax_loss`. Adam trains the networks and field embeddings (weight decay
``l2``); the id table is trained with lazy Adam (only the rows in a batch move) with an L2
penalty ``l2`` on the rows of each batch. Both optimisers are created afresh by each
``fit`` call; the parameters carry over.

**Serving** stays a dot product: :meth:`TwoTower.item_table` is the item tower over every
item row with the ``1 / temperature`` factor folded in, so
``user_vectors(users, bags) @ item_table(n_items).T`` are the model's logits (without the
training-only logQ term). All randomness comes from generators seeded by ``seed`` and the
model's own fit counter, never from the global random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import skip_init

from smlrec.config import _Config
from smlrec.models import reset_parameters
from smlrec.side import SideFeatures
from smlrec.strategies import PeriodData, concat

# Field and token embeddings start as N(0, EMB_STD^2); item-id rows start at zero.
EMB_STD = 0.1
# Rows per chunk when the item tower runs over the whole catalogue.
TABLE_CHUNK = 65536


class TwoTowerConfig(_Config):
    """The feature-based two-tower model (see :mod:`smlrec.two_tower`)."""

    dim: int = Field(64, ge=1, description="Size of the user and item vectors.")
    hidden: int = Field(128, ge=1, description="Hidden width of each tower's MLP.")
    emb_dim: int = Field(32, ge=1, description="Size of each field, token and id embedding.")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate.")
    epochs: int = Field(5, ge=1, description="Passes over the training examples per fit call.")
    batch_size: int = Field(512, ge=2, description="Positives per mini-batch (the in-batch "
                            "negatives are the other positives).")
    bag_size: int = Field(20, ge=1, description="The user tower reads the mean id embedding "
                          "of the user's last bag_size items.")
    temperature: float = Field(0.05, gt=0, description="Logits are <user, item> / this.")
    logq: bool = Field(True, description="Subtract log q(item), its expected count in a "
                       "batch, from the logits of in-batch negatives (sampling-bias "
                       "correction, Yi et al. 2019).")
    hard_negatives: int = Field(0, ge=0, description="Extra negatives per positive: the "
                                "highest-scoring of hard_pool uniform candidates.")
    hard_pool: int = Field(8, ge=1, description="Uniform candidates per positive that the "
                           "hard negatives are mined from.")
    l2: float = Field(1e-6, ge=0, description="Adam weight decay on the networks and field "
                      "embeddings; L2 penalty on the id rows of each batch.")
    normalize: bool = Field(True, description="L2-normalise user and item vectors.")
    replay: int = Field(1, ge=1, description="fit() trains on this many of the newest "
                        "periods (bags are drawn from the whole history).")

    @model_validator(mode="after")
    def _pool(self) -> TwoTowerConfig:
        if self.hard_negatives > self.hard_pool:
            raise ValueError(f"hard_negatives ({self.hard_negatives}) exceeds hard_pool "
                             f"({self.hard_pool})")
        return self


@dataclass
class Examples:
    """Training examples: ``users`` (n,), target ``items`` (n,) and ``bags`` (n, bag_size),
    each row the user's earlier items oldest first, right-aligned, padded with -1."""

    users: np.ndarray
    items: np.ndarray
    bags: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


def build_examples(history: list[PeriodData], replay: int, bag_size: int) -> Examples:
    """One example per positive of the newest ``replay`` periods of ``history``, with the
    bag of the user's interactions before it (see the module doc). Vectorised: a stable sort
    by user keeps each user's interactions in time order, and a positive's bag is the
    ``bag_size`` positions before it within its user's run."""
    users, items = concat(history)
    users, items = users.astype(np.int64), items.astype(np.int64)
    start = len(users) - sum(len(p) for p in history[-replay:]) if history else 0
    order = np.argsort(users, kind="stable")
    su, si = users[order], items[order]
    pos = np.empty(len(users), np.int64)
    pos[order] = np.arange(len(users))           # where each interaction sits in the sort
    first = np.searchsorted(su, su, side="left")  # start of each sorted row's user run
    rows = np.arange(start, len(users))
    k = pos[rows]                                  # sorted position of each training row
    idx = k[:, None] - bag_size + np.arange(bag_size)[None, :]
    valid = idx >= first[k][:, None]
    bags = np.where(valid, si[np.maximum(idx, 0)], -1)
    return Examples(users[rows], items[rows], bags)


def last_items(history: list[PeriodData], users: np.ndarray, bag_size: int) -> list[np.ndarray]:
    """Each user's last ``bag_size`` item rows in ``history``, oldest first."""
    hu, hi = concat(history)
    order = np.argsort(hu, kind="stable")
    su, si = hu[order], hi[order].astype(np.int64)
    users = np.asarray(users, np.int64)
    lo = np.searchsorted(su, users, side="left")
    hi_ = np.searchsorted(su, users, side="right")
    return [si[max(a, b - bag_size):b] for a, b in zip(lo, hi_, strict=True)]


def logq_table(items: np.ndarray, n_items: int, batch_size: int) -> Tensor:
    """log of each item's expected count among a batch's positives: its frequency in the
    training examples ``items`` times the batch size (items never seen: a large negative,
    they are never a column)."""
    freq = np.bincount(items, minlength=n_items)[:n_items] / max(1, len(items))
    return torch.from_numpy(np.log(np.maximum(freq * batch_size, 1e-12))).float()


def softmax_loss(u: Tensor, p: Tensor, pos: Tensor, temperature: float,
                 logq: Tensor | None = None, n: Tensor | None = None,
                 neg: Tensor | None = None) -> Tensor:
    """The sampled softmax of a batch (mean cross-entropy).

    ``u`` (B, d) user vectors, ``p`` (B, d) their positives' item vectors, ``pos`` (B,) the
    positives' item rows, ``n`` (B, k, d) extra negatives per row (optional). Row b's logits
    are ``<u_b, p_c> / temperature - logq[pos_c]`` for every other row's positive c (columns
    holding the item ``pos_b`` itself masked), ``<u_b, p_b> / temperature`` for its target
    (uncorrected) and ``<u_b, n_bj> / temperature`` for its extra negatives (masked where
    their item rows ``neg`` (B, k), when given, are ``pos_b``). ``logq`` is log q per item
    row (see :func:`logq_table`); None: no correction.
    """
    in_batch = (u @ p.T) / temperature
    target = in_batch.diagonal()
    if logq is not None:
        in_batch = in_batch - logq[pos][None, :]
    same = pos[None, :] == pos[:, None]
    in_batch = in_batch.masked_fill(same, -math.inf)
    eye = torch.eye(len(pos), dtype=torch.bool, device=u.device)
    in_batch = torch.where(eye, target[:, None], in_batch)
    logits = [in_batch]
    if n is not None and n.shape[1]:
        extra = torch.einsum("bd,bkd->bk", u, n) / temperature
        if neg is not None:
            extra = extra.masked_fill(neg == pos[:, None], -math.inf)
        logits.append(extra)
    return F.cross_entropy(torch.cat(logits, 1), torch.arange(len(pos), device=u.device))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return skip_init(nn.Linear, n_in, n_out)  # initialised from the generator afterwards


class _Towers(nn.Module):
    """The parameters: field, token and id embeddings and the two MLPs."""

    def __init__(self, user_cards: tuple[int, ...], item_cards: tuple[int, ...],
                 n_tokens: int, n_items: int, cfg: TwoTowerConfig,
                 generator: torch.Generator):
        super().__init__()
        e = cfg.emb_dim

        def table(n: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(n, e, generator=generator) * EMB_STD)

        self.user_fields = nn.ParameterList([table(c) for c in user_cards])
        self.item_fields = nn.ParameterList([table(c) for c in item_cards])
        self.tokens = table(n_tokens) if n_tokens else None
        self.item_id = nn.Parameter(torch.zeros(n_items, e))
        n_user_in = e * (len(user_cards) + 1)
        n_item_in = e * (len(item_cards) + (1 if n_tokens else 0) + 1)
        self.user_mlp = nn.Sequential(_linear(n_user_in, cfg.hidden), nn.ReLU(),
                                      _linear(cfg.hidden, cfg.dim))
        self.item_mlp = nn.Sequential(_linear(n_item_in, cfg.hidden), nn.ReLU(),
                                      _linear(cfg.hidden, cfg.dim))
        reset_parameters(self, generator)

    def grow(self, n_items: int) -> None:
        extra = n_items - self.item_id.shape[0]
        if extra > 0:
            old = self.item_id.detach()
            self.item_id = nn.Parameter(torch.cat([old, old.new_zeros(extra, old.shape[1])]))

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "item_id"]


class TwoTower:
    """The two-tower model: training (``fit``), serving vectors and state (module doc)."""

    def __init__(self, features: SideFeatures, cfg: TwoTowerConfig = TwoTowerConfig(),
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.seed = int(seed)
        self.device = torch.device(device)
        self.features = features.to(self.device)
        self.user_cards = tuple(int(c) for c in features.user_cards)
        self.item_cards = tuple(int(c) for c in features.item_cards)
        self.n_tokens = int(features.item_multi.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        self.net = _Towers(self.user_cards, self.item_cards, self.n_tokens, features.n_items,
                           cfg, gen).to(self.device)
        self._step = 0

    # -- features ---------------------------------------------------------------------
    def set_features(self, features: SideFeatures) -> None:
        """Replace the side features (e.g. grown to new vocab rows). The encoding must be
        the one the model was built for (same fields, codes and tokens)."""
        got = (tuple(features.user_cards), tuple(features.item_cards),
               int(features.item_multi.shape[1]))
        want = (self.user_cards, self.item_cards, self.n_tokens)
        if got != want:
            raise ValueError(f"side features changed shape: (user cards, item cards, tokens) "
                             f"{got} but the model was built for {want}")
        self.features = features.to(self.device)

    @staticmethod
    def _rows(table: Tensor, rows: Tensor) -> Tensor:
        """``table[rows]``, zeros for rows past its end (ids without side features)."""
        if table.shape[0] == 0:
            return table.new_zeros(len(rows), *table.shape[1:])
        ok = rows < table.shape[0]
        out = table[torch.where(ok, rows, 0)]
        return out * ok.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)

    # -- towers ------------------------------------------------------------------------
    def _user_forward(self, users: Tensor, bags: Tensor) -> Tensor:
        """User vectors for user rows (B,) and padded bags (B, bag_size), -1 = none."""
        net = self.net
        parts = []
        if net.user_fields:
            codes = self._rows(self.features.user, users)
            parts += [F.embedding(codes[:, j], t) for j, t in enumerate(net.user_fields)]
        mask = (bags >= 0) & (bags < net.item_id.shape[0])
        weight = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)
        parts.append(F.embedding_bag(torch.where(mask, bags, 0), net.item_id, mode="sum",
                                     per_sample_weights=weight, sparse=True))
        return self._finish(net.user_mlp(torch.cat(parts, 1)))

    def _item_forward(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """Item vectors for item rows (N,), and their id rows (for the L2 penalty)."""
        net = self.net
        parts = []
        if net.item_fields:
            codes = self._rows(self.features.item, items)
            parts += [F.embedding(codes[:, j], t) for j, t in enumerate(net.item_fields)]
        if net.tokens is not None:
            multi = self._rows(self.features.item_multi, items)
            parts.append(multi @ net.tokens / multi.sum(1, keepdim=True).clamp_min(1))
        ok = items < net.item_id.shape[0]
        ids = F.embedding(torch.where(ok, items, 0), net.item_id, sparse=True) \
            * ok[:, None].float()
        parts.append(ids)
        return self._finish(net.item_mlp(torch.cat(parts, 1))), ids

    def _finish(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.cfg.normalize else x

    def _pad_bags(self, bags: list[np.ndarray]) -> Tensor:
        b = self.cfg.bag_size
        out = np.full((len(bags), b), -1, np.int64)
        for r, bag in enumerate(bags):
            bag = np.asarray(bag, np.int64)[-b:]
            if len(bag):
                out[r, b - len(bag):] = bag
        return torch.from_numpy(out).to(self.device)

    # -- serving -----------------------------------------------------------------------
    def bags(self, history: list[PeriodData], users: np.ndarray) -> list[np.ndarray]:
        """Each user's last ``bag_size`` item rows in ``history`` (oldest first; empty for a
        user without any), the bags that :meth:`user_vectors` reads."""
        return last_items(history, users, self.cfg.bag_size)

    @torch.no_grad()
    def user_vectors(self, users: np.ndarray, bags: list[np.ndarray]) -> Tensor:
        """User vectors (B, dim) for user rows ``users`` with their ``bags`` (item rows,
        oldest first; the last ``bag_size`` are read, rows the id table lacks are skipped).
        A user row without side features is read as all-unknown."""
        users = torch.as_tensor(np.asarray(users, np.int64), device=self.device)
        if len(users) != len(bags):
            raise ValueError(f"{len(users)} users but {len(bags)} bags")
        self.net.eval()
        return self._user_forward(users, self._pad_bags(bags))

    @torch.no_grad()
    def item_table(self, n_items: int) -> Tensor:
        """The item tower over item rows 0..n_items-1, times 1 / temperature (n_items, dim):
        ``user_vectors(...) @ item_table(n).T`` are the model's logits. Rows past the id
        table (items the model never saw) are scored from their features with a zero id
        embedding."""
        self.net.eval()
        rows = torch.arange(n_items, device=self.device)
        out = [self._item_forward(rows[s:s + TABLE_CHUNK])[0]
               for s in range(0, n_items, TABLE_CHUNK)]
        table = torch.cat(out) if out else torch.zeros(0, self.cfg.dim, device=self.device)
        return table / self.cfg.temperature

    @torch.no_grad()
    def logits(self, users: np.ndarray, bags: list[np.ndarray], items: np.ndarray) -> Tensor:
        """The model's logits (B, N) of users (with bags) against item rows ``items``, both
        towers run on them directly (what the training softmax sees, before logQ)."""
        u = self.user_vectors(users, bags)
        v, _ = self._item_forward(torch.as_tensor(np.asarray(items, np.int64),
                                                  device=self.device))
        return u @ v.T / self.cfg.temperature

    # -- training ----------------------------------------------------------------------
    def fit(self, history: list[PeriodData], n_users: int, n_items: int,
            epochs: int | None = None) -> dict:
        """Train on the newest ``cfg.replay`` periods of ``history`` (bags from all of it),
        continuing from the current parameters. Returns the mean loss of the last epoch and
        the number of examples."""
        cfg = self.cfg
        self._step += 1
        rng = np.random.default_rng([self.seed, self._step])
        self.net.grow(n_items)
        self.features = self.features.grow(n_users, n_items)
        ex = build_examples(history, cfg.replay, cfg.bag_size)
        n = len(ex)
        top = max(ex.items.max(initial=-1), ex.bags.max(initial=-1))
        if top >= n_items:
            raise ValueError(f"history holds item row {top} but n_items is {n_items}")
        if n == 0:
            return {"loss": float("nan"), "examples": 0}
        batch = min(cfg.batch_size, n)
        logq = logq_table(ex.items, n_items, batch).to(self.device) if cfg.logq else None
        users, items, bags = (torch.from_numpy(x).to(self.device)
                              for x in (ex.users, ex.items, ex.bags))
        dense = torch.optim.Adam(self.net.dense_parameters(), lr=cfg.lr, weight_decay=cfg.l2)
        sparse = torch.optim.SparseAdam([self.net.item_id], lr=cfg.lr)
        self.net.train()
        losses: list[float] = []
        for _ in range(epochs or cfg.epochs):
            order = torch.from_numpy(rng.permutation(n)).to(self.device)
            losses = []
            for s in range(0, n, batch):
                idx = order[s:s + batch]
                dense.zero_grad(set_to_none=True)
                sparse.zero_grad(set_to_none=True)
                loss = self._batch_loss(users[idx], bags[idx], items[idx], n_items, logq, rng)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"two-tower loss became {loss.item()}; lower "
                                             "the learning rate")
                loss.backward()
                dense.step()
                sparse.step()
                losses.append(loss.item())
        self.net.eval()
        return {"loss": float(np.mean(losses)), "examples": int(n)}

    def _batch_loss(self, users: Tensor, bags: Tensor, pos: Tensor, n_items: int,
                    logq: Tensor | None, rng: np.random.Generator) -> Tensor:
        cfg = self.cfg
        u = self._user_forward(users, bags)
        b, k = len(pos), cfg.hard_negatives
        neg = pos.new_zeros(b, 0)
        if k:
            neg = self._mine(u, pos, n_items, rng)
        cand, inv = torch.unique(torch.cat([pos, neg.reshape(-1)]), return_inverse=True)
        vec, ids = self._item_forward(cand)
        rows = vec[inv]
        p, n = rows[:b], rows[b:].reshape(b, k, rows.shape[1])
        reg = cfg.l2 * ids.pow(2).sum() / b
        return softmax_loss(u, p, pos, cfg.temperature, logq, n, neg) + reg

    def _mine(self, u: Tensor, pos: Tensor, n_items: int, rng: np.random.Generator) -> Tensor:
        """Hard negatives (B, k): of ``hard_pool`` uniform candidates per positive (never the
        positive itself), the k the current model scores highest; no gradient."""
        cfg = self.cfg
        cand = torch.from_numpy(rng.integers(0, n_items, (len(pos), cfg.hard_pool)))
        cand = cand.to(self.device)
        with torch.no_grad():
            uniq, inv = torch.unique(cand.reshape(-1), return_inverse=True)
            vec = self._item_forward(uniq)[0][inv].reshape(*cand.shape, -1)
            scores = torch.einsum("bd,bmd->bm", u.detach(), vec)
            scores = scores.masked_fill(cand == pos[:, None], -math.inf)
            top = scores.topk(cfg.hard_negatives, dim=1).indices
        return torch.gather(cand, 1, top)

    # -- state -------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """The parameters as tensors, plus JSON-able metadata (config, seed, fit counter,
        feature shapes) for :meth:`from_state`."""
        tensors = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        meta = {"model": "two_tower", "config": self.cfg.model_dump(mode="json"),
                "seed": self.seed, "step": self._step, "user_cards": list(self.user_cards),
                "item_cards": list(self.item_cards), "n_tokens": self.n_tokens,
                "n_items": int(self.net.item_id.shape[0])}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict, features: SideFeatures,
                   device: torch.device | str = "cpu") -> TwoTower:
        """Rebuild a model from :meth:`state` and the side features (same encoding)."""
        model = cls(features, TwoTowerConfig(**meta["config"]), int(meta["seed"]), device)
        want = (tuple(meta["user_cards"]), tuple(meta["item_cards"]), int(meta["n_tokens"]))
        if want != (model.user_cards, model.item_cards, model.n_tokens):
            raise ValueError(f"side features do not match the saved model: (user cards, item "
                             f"cards, tokens) {want} saved, "
                             f"{(model.user_cards, model.item_cards, model.n_tokens)} given")
        n_id = int(meta["n_items"])
        model.net.item_id = nn.Parameter(torch.zeros(n_id, model.cfg.emb_dim,
                                                     device=model.device))
        model.net.load_state_dict({k[4:]: v.to(model.device) for k, v in tensors.items()
                                   if k.startswith("net.")})
        model._step = int(meta["step"])
        return model
