"""Training loops: negative sampling, the loss L0, plain MF epochs and SML's two steps.

All loops are seeded and deterministic on CPU. Embedding tables are trained with lazy
Adam (``torch.optim.SparseAdam``): only the rows present in a batch are touched, so the
cost of a period scales with the period's data, not with the size of the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from smlrec.config import LossConfig, MFConfig, SMLConfig
from smlrec.models import MFWeights, Transfer


class NegativeSampler:
    """Draws negative items for positives, never one of the user's positives in the data.

    Candidates are ``pool`` (item rows); with ``weights`` they are drawn in proportion
    to them (popularity sampling), otherwise uniformly. A drawn item that is one of the
    user's positives is redrawn a few times; what is still a positive after that (users
    who interacted with much of the pool) is drawn from the user's own complement. A user
    who interacted with every item of the pool keeps a positive as "negative".
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, pool: np.ndarray,
                 weights: np.ndarray | None = None, rounds: int = 5):
        self.n_key = int(max(pool.max(initial=0), items.max(initial=0))) + 1
        self.keys = np.unique(users.astype(np.int64) * self.n_key + items)
        self.pool = pool.astype(np.int64)
        self.p = None if weights is None else weights / weights.sum()
        self.rounds = rounds

    def probability(self, n_items: int) -> np.ndarray:
        """The probability of drawing each item row in one draw (before redraws)."""
        q = np.zeros(n_items)
        q[self.pool] = 1.0 / len(self.pool) if self.p is None else self.p
        return q

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.pool, size=n, p=self.p)

    def _is_positive(self, users: np.ndarray, neg: np.ndarray) -> np.ndarray:
        q = users * self.n_key + neg
        pos = np.searchsorted(self.keys, q)
        pos[pos == len(self.keys)] = 0
        return self.keys[pos] == q if len(self.keys) else np.zeros(len(q), bool)

    def sample(self, users: np.ndarray, rng: np.random.Generator, k: int = 1) -> np.ndarray:
        """``k`` negatives per user of ``users``: shape (len(users),) for k = 1, else
        (len(users), k)."""
        flat = np.repeat(users.astype(np.int64), k) if k > 1 else users.astype(np.int64)
        neg = self._draw(len(flat), rng)
        for _ in range(self.rounds):
            bad = np.flatnonzero(self._is_positive(flat, neg))
            if len(bad) == 0:
                break
            neg[bad] = self._draw(len(bad), rng)
        else:
            for j in np.flatnonzero(self._is_positive(flat, neg)):
                seen = self.keys[np.searchsorted(self.keys, flat[j] * self.n_key):
                                 np.searchsorted(self.keys, (flat[j] + 1) * self.n_key)]
                allowed = np.setdiff1d(self.pool, seen % self.n_key, assume_unique=False)
                if len(allowed):
                    neg[j] = rng.choice(allowed)
        return neg.reshape(len(users), k) if k > 1 else neg


def make_sampler(users: np.ndarray, items: np.ndarray, n_items: int,
                 cfg: LossConfig) -> NegativeSampler:
    """The sampler that ``cfg`` asks for, over the data (users, items). Hard negatives start
    from uniform candidates (the model picks among them, see :func:`pick_hard`)."""
    pool = np.arange(n_items) if cfg.negatives_from == "known" else np.unique(items)
    weights = None
    if cfg.negatives == "popularity":
        counts = np.bincount(items, minlength=n_items).astype(np.float64)
        weights = counts[pool] + 1.0
    return NegativeSampler(users, items, pool, weights)


def draws_per_positive(cfg: LossConfig) -> int:
    """How many candidates the sampler draws per positive."""
    return cfg.n_negatives * (cfg.hard_pool if cfg.negatives == "hard" else 1)


@dataclass
class LogQ:
    """log Q(item) for the softmax's logQ correction: ``batch`` is the log of each item's
    expected count among a batch's positives (in-batch negatives), ``sampled`` the log of
    its expected count among a positive's sampled negatives."""

    batch: Tensor
    sampled: Tensor


def make_logq(items: np.ndarray, n_items: int, sampler: NegativeSampler, batch_size: int,
              cfg: LossConfig, device: torch.device) -> LogQ | None:
    """The logQ tables for ``cfg`` (None unless the loss is softmax with logQ on)."""
    if cfg.loss != "softmax" or not cfg.logq:
        return None
    freq = np.bincount(items, minlength=n_items) / max(1, len(items))
    q = sampler.probability(n_items)
    tiny = 1e-12
    return LogQ(torch.from_numpy(np.log(np.maximum(freq * batch_size, tiny))).float().to(device),
                torch.from_numpy(np.log(np.maximum(q * cfg.n_negatives, tiny))).float()
                .to(device))


def pick_hard(u: Tensor, n_rows: Tensor, neg: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Dynamic negative sampling: of each positive's candidates ``neg`` (B, k·pool) with
    rows ``n_rows`` (B, k·pool, d), keep the ``k`` the current model scores highest (the
    choice carries no gradient). Returns their rows (B, k, d) and items (B, k)."""
    with torch.no_grad():
        scores = torch.einsum("bd,bmd->bm", u, n_rows)
        top = scores.topk(k, dim=1).indices
    return (torch.gather(n_rows, 1, top[..., None].expand(-1, -1, n_rows.shape[-1])),
            torch.gather(neg, 1, top))


def rec_loss(u: Tensor, p: Tensor, n: Tensor, cfg: LossConfig, pos_items: Tensor | None = None,
             neg_items: Tensor | None = None, logq: LogQ | None = None) -> Tensor:
    """L0 over a batch: user rows ``u`` (B, d), positive item rows ``p`` (B, d), negative
    item rows ``n`` (B, k, d) (or (B, d) for one negative each).

    - bce: -(mean log σ(pos) + mean log σ(-neg)), the official SML code's loss;
    - bpr: -mean log σ(pos - neg) over every (positive, negative) pair;
    - softmax: cross-entropy of each positive against the batch's other positives and its
      own sampled negatives, logits divided by the temperature, with log Q(item)
      subtracted when ``logq`` is given. A batch column holding the row's own item (the
      same item as another row's positive) is masked, so it is never a negative.
    """
    if n.dim() == 2:
        n = n.unsqueeze(1)
    pos = (u * p).sum(-1)
    neg = torch.einsum("bd,bkd->bk", u, n)
    if cfg.loss == "bce":
        return -(F.logsigmoid(pos).mean() + F.logsigmoid(-neg).mean())
    if cfg.loss == "bpr":
        return -F.logsigmoid(pos[:, None] - neg).mean()
    if cfg.loss == "softmax":
        t = cfg.temperature
        in_batch = (u @ p.T) / t
        sampled = neg / t
        if logq is not None:
            in_batch = in_batch - logq.batch[pos_items][None, :]
            sampled = sampled - logq.sampled[neg_items.reshape(sampled.shape)]
        if pos_items is not None:
            same = pos_items[None, :] == pos_items[:, None]
            same.fill_diagonal_(False)
            in_batch = in_batch.masked_fill(same, float("-inf"))
        logits = torch.cat([in_batch, sampled], dim=1)
        return F.cross_entropy(logits, torch.arange(len(u), device=u.device))
    raise ValueError(f"unknown loss {cfg.loss!r} (expected 'bce', 'bpr' or 'softmax')")


@dataclass
class Batch:
    users: Tensor
    pos: Tensor
    neg: Tensor  # (B,) with one draw per positive, else (B, draws)


def batches(users: np.ndarray, items: np.ndarray, sampler: NegativeSampler, batch_size: int,
            epochs: int, seed: int, device: torch.device, desc: str = "",
            progress: bool = False, draws: int = 1) -> Iterator[Batch]:
    """Shuffled mini-batches with fresh negatives each epoch (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(users)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="batch")
    for _ in range(epochs):
        order = rng.permutation(n)
        u, i = users[order], items[order]
        neg = sampler.sample(u, rng, draws)
        tu, ti, tn = (torch.from_numpy(x).to(device) for x in (u, i, neg))
        for s in range(0, n, batch_size):
            yield Batch(tu[s:s + batch_size], ti[s:s + batch_size], tn[s:s + batch_size])
            bar.update()
    bar.close()


def _rows(table: Tensor, idx: Tensor) -> Tensor:
    """Gather rows with a sparse gradient (for SparseAdam)."""
    return F.embedding(idx, table, sparse=True)


def _run(params_step: Callable[[Batch], Tensor], optimizers: list[torch.optim.Optimizer],
         it: Iterator[Batch]) -> list[float]:
    losses = []
    for batch in it:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = params_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    return losses


def _negatives(u: Tensor, n_rows: Tensor, b: Batch, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """The negatives' rows (B, k, d) and items (B, k) of a batch, hard ones picked."""
    neg = b.neg if b.neg.dim() == 2 else b.neg[:, None]
    n_rows = n_rows.reshape(*neg.shape, -1)
    if cfg.negatives == "hard":
        return pick_hard(u, n_rows, neg, cfg.n_negatives)
    return n_rows, neg


def train_mf(weights: MFWeights, users: np.ndarray, items: np.ndarray, cfg: MFConfig,
             loss_cfg: LossConfig, seed: int, device: torch.device,
             progress: bool = False, desc: str = "mf") -> tuple[MFWeights, list[float]]:
    """Train an MF model (a copy of ``weights``) on positives (users, items)."""
    user = weights.user.detach().clone().to(device).requires_grad_(True)
    item = weights.item.detach().clone().to(device).requires_grad_(True)
    opt = torch.optim.SparseAdam([user, item], lr=cfg.lr)
    sampler = make_sampler(users, items, weights.n_items, loss_cfg)
    logq = make_logq(items, weights.n_items, sampler, cfg.batch_size, loss_cfg, device)

    def step(b: Batch) -> Tensor:
        u, p = _rows(user, b.users), _rows(item, b.pos)
        n_all = _rows(item, b.neg.reshape(-1))
        n, neg = _negatives(u, n_all, b, loss_cfg)
        reg = cfg.l2 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(b.users)
        return rec_loss(u, p, n, loss_cfg, b.pos, neg, logq) + reg

    losses = _run(step, [opt], batches(users, items, sampler, cfg.batch_size, cfg.epochs, seed,
                                       device, desc, progress, draws_per_positive(loss_cfg)))
    return MFWeights(user.detach(), item.detach()), losses


def _transfer_rows(theta: Transfer, old: MFWeights, new: MFWeights, b: Batch,
                   gather: Callable[[Tensor, Tensor], Tensor], cfg: LossConfig
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Transferred rows f_Θ(old, new) of a batch's users, positives and negatives.

    The transfer is the expensive part (a 5·d x hidden layer per row), so it runs once per
    distinct user and item of the batch and the results are gathered back. Returns the
    user rows (B, d), positive rows (B, d), negative rows (B, k, d), the negatives' items
    (B, k), and Σ ||new row||² over the batch's rows (duplicates counted), for the L2 term.
    """
    flat_neg = b.neg.reshape(-1)
    users, uinv = torch.unique(b.users, return_inverse=True)
    items, iinv = torch.unique(torch.cat([b.pos, flat_neg]), return_inverse=True)
    hu, hi = gather(new.user, users), gather(new.item, items)
    if gather is _rows:  # step 1: every row of the batch is being trained
        u = theta.user(old.user[users], hu)[uinv]
        rows = theta.item(old.item[items], hi)[iinv]
    else:  # step 2: the rows as the transfer served them
        u = theta.rows(theta.user, old.user[users], hu)[uinv]
        rows = theta.rows(theta.item, old.item[items], hi)[iinv]
    p = rows[: len(b.pos)]
    n, neg = _negatives(u, rows[len(b.pos):], b, cfg)
    sq = hu.pow(2).sum(-1)[uinv].sum() + hi.pow(2).sum(-1)[iinv].sum()
    return u, p, n, neg, sq


def _index(table: Tensor, idx: Tensor) -> Tensor:
    return table[idx]


def sml_learn_what(theta: Transfer, w_prev: MFWeights, w_hat: MFWeights, users: np.ndarray,
                   items: np.ndarray, cfg: SMLConfig, loss_cfg: LossConfig, seed: int,
                   device: torch.device, progress: bool = False) -> tuple[MFWeights, list[float]]:
    """SML step 1: learn Ŵ_t on D_t with Θ fixed.

    L_r(Ŵ_t) = L0(f_Θ(W_{t-1}, Ŵ_t) | D_t) + λ1 ||Ŵ_t rows in batch||². The gradient
    reaches Ŵ_t through the transfer; Θ's parameters are frozen.
    """
    user = w_hat.user.detach().clone().to(device).requires_grad_(True)
    item = w_hat.item.detach().clone().to(device).requires_grad_(True)
    prev = w_prev.to(device)
    opt = torch.optim.SparseAdam([user, item], lr=cfg.what_lr)
    sampler = make_sampler(users, items, w_prev.n_items, loss_cfg)
    logq = make_logq(items, w_prev.n_items, sampler, cfg.what_batch_size, loss_cfg, device)
    theta.requires_grad_(False)

    def step(b: Batch) -> Tensor:
        u, p, n, neg, sq = _transfer_rows(theta, prev, MFWeights(user, item), b, _rows, loss_cfg)
        return rec_loss(u, p, n, loss_cfg, b.pos, neg, logq) + cfg.what_l2 * sq / len(b.users)

    try:
        losses = _run(step, [opt], batches(users, items, sampler, cfg.what_batch_size,
                                           cfg.what_epochs, seed, device, "sml step 1", progress,
                                           draws_per_positive(loss_cfg)))
    finally:
        theta.requires_grad_(True)
    return MFWeights(user.detach(), item.detach()), losses


def sml_learn_theta(theta: Transfer, opt: torch.optim.Optimizer, w_old: MFWeights,
                    w_hat: MFWeights, users: np.ndarray, items: np.ndarray, cfg: SMLConfig,
                    loss_cfg: LossConfig, seed: int, device: torch.device,
                    progress: bool = False) -> list[float]:
    """SML step 2: update Θ on new data with W_old and Ŵ fixed.

    L_s(Θ) = L0(f_Θ(W_old, Ŵ) | D) + λ2 ||Θ||² (λ2 is the optimiser's weight decay).
    In the daily loop, D is D_t, W_old = W_{t-2} and Ŵ = Ŵ_{t-1}: the transfer learns
    from how well its previous output would have served the period that followed.
    """
    old, hat = w_old.to(device), w_hat.to(device)
    sampler = make_sampler(users, items, w_hat.n_items, loss_cfg)
    logq = make_logq(items, w_hat.n_items, sampler, cfg.theta_batch_size, loss_cfg, device)

    def step(b: Batch) -> Tensor:
        u, p, n, neg, _ = _transfer_rows(theta, old, hat, b, _index, loss_cfg)
        return rec_loss(u, p, n, loss_cfg, b.pos, neg, logq)

    return _run(step, [opt], batches(users, items, sampler, cfg.theta_batch_size,
                                     cfg.theta_epochs, seed, device, "sml step 2", progress,
                                     draws_per_positive(loss_cfg)))


def theta_optimizer(theta: Transfer, cfg: SMLConfig) -> torch.optim.Optimizer:
    """Adam over Θ with λ2 as weight decay (carried across periods with Θ)."""
    return torch.optim.Adam(theta.parameters(), lr=cfg.theta_lr,
                            weight_decay=cfg.theta_weight_decay)


def fit_identity(theta: Transfer, w0: MFWeights, seed: int, steps: int = 300,
                 batch_size: int = 1024, lr: float = 1e-3, noise: float = 0.5) -> float:
    """Fit Θ so that f_Θ(a, b) ≈ b, with a a row of W_0 and b a perturbed copy of it.

    A starting point for meta-training: the transfer first behaves like fine-tuning
    (keep what the new period taught), and meta-learning moves it from there. Returns
    the final mean squared error.
    """
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for net, table in ((theta.user, w0.user), (theta.item, w0.item)):
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        scale = table.std().item()
        for _ in range(steps):
            idx = torch.randint(len(table), (batch_size,), generator=gen)
            a = table[idx]
            b = a + noise * scale * torch.randn(a.shape, generator=gen).to(a.device)
            loss = F.mse_loss(net(a, b), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return float(loss.detach())
