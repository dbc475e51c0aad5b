"""Retraining strategies behind one interface: SML and the ways people retrain today.

Every strategy sees the periods in order. ``start`` receives the pretrained model W_0;
``update`` receives the history up to and including the newest period D_t and produces
the model that will serve period t+1 (read with ``weights()`` or ``item_prior()``).
Tables grow to ``n_users`` / ``n_items`` rows as new ids arrive (see ``smlrec.vocab``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from smlrec.config import LossConfig, MFConfig, SMLConfig
from smlrec.models import MFWeights, Transfer
from smlrec.train import fit_identity, sml_learn_theta, sml_learn_what, theta_optimizer, train_mf


@dataclass
class PeriodData:
    """The positives of one period, as rows of the user and item tables."""

    period: str
    users: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


def concat(periods: list[PeriodData]) -> tuple[np.ndarray, np.ndarray]:
    """All (users, items) of several periods, in order."""
    if not periods:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([p.users for p in periods]),
            np.concatenate([p.items for p in periods]))


def popularity_counts(history: list[PeriodData], n_items: int, window: int | None = 1,
                      half_life: float | None = None) -> Tensor:
    """Interactions per item row over the last ``window`` periods of ``history``, each period
    weighted ``0.5 ** (age / half_life)`` (age 0 = the newest) when ``half_life`` is given.
    With a half-life and no window, periods older than ten half-lives (weight < 0.001) are
    left out."""
    window = popularity_window(window, half_life)
    counts = np.zeros(n_items, dtype=np.float64)
    for age, d in enumerate(reversed(history[-window:])):
        weight = 1.0 if half_life is None else 0.5 ** (age / half_life)
        counts += weight * np.bincount(d.items, minlength=n_items)[:n_items]
    return torch.from_numpy(counts.astype(np.float32))


def popularity_window(window: int | None, half_life: float | None) -> int:
    """The periods a popularity count reads (see :func:`popularity_counts`)."""
    if window is not None:
        return int(window)
    if half_life is None:
        raise ValueError("popularity needs a window or a half-life")
    return int(math.ceil(10 * half_life))


class Strategy(ABC):
    """A way of retraining a recommender each period.

    Any MF strategy can serve the blend ``score = <U_u, V_i> + blend·log1p(pop_i)``, with
    ``pop`` the item counts over the last ``blend_window`` periods (or decayed with
    ``blend_half_life``), refreshed after every period; ``weights()`` returns it as one
    more column (:meth:`MFWeights.with_prior`) and ``weights(b)`` any other weight ``b``.
    All randomness comes from generators seeded by ``seed`` and the strategy's own step
    counter, never from the global stream, so strategies run side by side do not shift
    each other's numbers.
    """

    name: str = ""

    def __init__(self, loss: LossConfig | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False,
                 blend: float = 0.0, blend_window: int | None = 4,
                 blend_half_life: float | None = None):
        self.loss = loss or LossConfig()
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress
        self.blend = float(blend)
        self.blend_window = blend_window
        self.blend_half_life = blend_half_life
        self.w: MFWeights | None = None
        self.prior: Tensor | None = None
        self._step = 0

    def start(self, w0: MFWeights) -> None:
        """Begin from the pretrained model W_0."""
        self.w = w0.to(self.device)

    def update(self, history: list[PeriodData], n_users: int, n_items: int) -> dict:
        """Retrain after period ``history[-1]`` closed (``history`` holds at least the last
        :meth:`periods_needed` periods). Returns training figures (losses)."""
        out = self._update(history, n_users, n_items)
        self.refresh_prior(history, n_items)
        return out

    @abstractmethod
    def _update(self, history: list[PeriodData], n_users: int, n_items: int) -> dict:
        """The retraining itself."""

    def refresh_prior(self, history: list[PeriodData], n_items: int) -> None:
        """Recompute the blend's item counts from the newest periods."""
        self.prior = popularity_counts(history, n_items, self.blend_window,
                                       self.blend_half_life).to(self.device)

    def periods_needed(self) -> int | None:
        """How many of the newest periods ``update`` reads (None: all of them)."""
        return popularity_window(self.blend_window, self.blend_half_life)

    def weights(self, blend: float | None = None) -> MFWeights | None:
        """The MF model that serves the next period, with the blend column when its weight
        (``blend``, default the strategy's own) is not 0. None for non-MF strategies."""
        if self.w is None:
            return None
        return self.w.with_prior(self.prior, self.blend if blend is None else blend)

    def item_prior(self) -> Tensor | None:
        """A user-independent item score vector, for strategies that have one."""
        return None

    def describe(self) -> dict:
        """Hyper-parameters, for reports."""
        return {}

    def _next_seed(self) -> int:
        self._step += 1
        return self.seed * 100_003 + self._step

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._next_seed())

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything carried to the next period, as tensors plus JSON-able metadata."""
        tensors = {"w.user": self.w.user, "w.item": self.w.item}
        if self.prior is not None:
            tensors["prior"] = self.prior
        return tensors, {"strategy": self.name, "step": self._step}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore what ``state`` returned (on this strategy's device)."""
        t = {k: v.to(self.device) for k, v in tensors.items()}
        self.w = MFWeights(t["w.user"], t["w.item"])
        self.prior = t.get("prior")
        self._step = int(meta["step"])


class _MFRetrain(Strategy):
    """Retrain the MF model, warm-started from the current one, on some periods."""

    def __init__(self, mf: MFConfig | None = None, **kw):
        super().__init__(**kw)
        self.mf = mf or MFConfig()

    @abstractmethod
    def training_periods(self, history: list[PeriodData]) -> list[PeriodData]:
        """The periods this strategy trains on after ``history[-1]`` closed."""

    def _update(self, history: list[PeriodData], n_users: int, n_items: int) -> dict:
        users, items = concat(self.training_periods(history))
        w = self.w.grow(n_users, n_items, self._generator())
        self.w, losses = train_mf(w, users, items, self.mf, self.loss, self._next_seed(),
                                  self.device, self.progress, desc=self.name)
        return {"loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
                "n_train": int(len(users))}

    def describe(self) -> dict:
        return {"epochs": self.mf.epochs, "lr": self.mf.lr}


class FullRetrain(_MFRetrain):
    """Train on all periods 0..t, warm-started from the current model."""

    name = "full"

    def training_periods(self, history: list[PeriodData]) -> list[PeriodData]:
        return history

    def periods_needed(self) -> int | None:
        return None


class FineTune(_MFRetrain):
    """Incremental update: train the current model on the new period D_t only."""

    name = "finetune"

    def training_periods(self, history: list[PeriodData]) -> list[PeriodData]:
        return history[-1:]


class SlidingWindow(_MFRetrain):
    """Batch update over the last ``window`` periods, warm-started."""

    name = "window"

    def __init__(self, window: int = 3, **kw):
        super().__init__(**kw)
        self.window = window

    def training_periods(self, history: list[PeriodData]) -> list[PeriodData]:
        return history[-self.window:]

    def periods_needed(self) -> int | None:
        return max(self.window, super().periods_needed())

    def describe(self) -> dict:
        return {**super().describe(), "window": self.window}


class Popularity(Strategy):
    """The most popular items for everyone: the floor to beat. Counts over the last
    ``window`` periods (1: last period's most popular, the classic floor), or decayed with
    a ``half_life`` in periods (see :func:`popularity_counts`)."""

    name = "pop"

    def __init__(self, window: int | None = 1, half_life: float | None = None, **kw):
        super().__init__(**kw)
        self.window = window if window is not None or half_life is not None else 1
        self.half_life = half_life

    def start(self, w0: MFWeights) -> None:
        self.w = None

    def _update(self, history: list[PeriodData], n_users: int, n_items: int) -> dict:
        return {}

    def refresh_prior(self, history: list[PeriodData], n_items: int) -> None:
        self.prior = popularity_counts(history, n_items, self.window,
                                       self.half_life).to(self.device)

    def periods_needed(self) -> int | None:
        return popularity_window(self.window, self.half_life)

    def weights(self, blend: float | None = None) -> MFWeights | None:
        return None

    def item_prior(self) -> Tensor | None:
        return self.prior

    def describe(self) -> dict:
        return {"window": self.window, "half_life": self.half_life}

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return ({} if self.prior is None else {"prior": self.prior},
                {"strategy": self.name, "step": self._step})

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        self.prior = tensors.get("prior")
        self._step = int(meta["step"])


class SML(Strategy):
    """Sequential Meta-Learning: train on the new period only, transfer with f_Θ.

    State carried from period to period: W_{t-1} (``w``), W_{t-2} (``w_prev``), Ŵ_{t-1}
    (``w_hat_prev``), Θ (``theta``) and Θ's Adam state. For period t (D_t):

    repeat ``outer_steps`` times:
      step 2: update Θ on D_t with W_{t-2}, Ŵ_{t-1} fixed (how the last transfer would
              have served D_t), on the rows of D_t that existed at t-1;
      step 1: learn Ŵ_t on D_t through f_Θ(W_{t-1}, Ŵ_t) with Θ fixed; Ŵ_t starts from
              W_{t-1}, and from the current transfer output on later repeats;
    then W_t = f_Θ(W_{t-1}, Ŵ_t) for every row.

    This is Algorithm 1 of the paper written as one step per arriving period, which is
    what both the offline meta-training and the daily online loop run. ``schedule=
    "official"`` follows the official code's order instead: the extra outer steps re-learn
    Ŵ_{t-1} on D_{t-1} between updates of Θ, W_{t-1} is recomputed with the updated Θ,
    and Ŵ_t gets one round of step 1.
    """

    name = "sml"

    def __init__(self, sml: SMLConfig | None = None, **kw):
        super().__init__(**kw)
        self.cfg = sml or SMLConfig()
        self.theta: Transfer | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.w_prev: MFWeights | None = None
        self.w_hat_prev: MFWeights | None = None
        self.periods_seen = 0

    def start(self, w0: MFWeights) -> None:
        super().start(w0)
        self.theta = self._new_theta(w0.dim, torch.Generator().manual_seed(self.seed))
        if self.cfg.theta_init == "identity":
            fit_identity(self.theta, self.w, seed=self.seed)
        self.opt = theta_optimizer(self.theta, self.cfg)
        self.rewind(w0)

    def _new_theta(self, dim: int, generator: torch.Generator | None = None) -> Transfer:
        return Transfer(dim, self.cfg.hidden, self.cfg.transfer, generator,
                        self.cfg.transfer_rows).to(self.device)

    def rewind(self, w0: MFWeights) -> None:
        """Restart the chain from W_0, keeping Θ and its optimiser state (one more pass over
        the meta-training periods starts here)."""
        self.w = w0.to(self.device).clone()
        # Before the first period there is no Ŵ: the transfer first learns from W_0 itself.
        self.w_prev = self.w.clone()
        self.w_hat_prev = self.w.clone()
        self.periods_seen = 0

    def periods_needed(self) -> int | None:
        return max(2 if self.cfg.schedule == "official" else 1, self.cfg.what_window,
                   super().periods_needed())

    def _update(self, history: list[PeriodData], n_users: int, n_items: int) -> dict:
        self.begin_period(history[-1], n_users, n_items, self.replayed(history[:-1]))
        if self.cfg.schedule == "official":
            self._official_rounds(history[-2] if len(history) > 1 else None)
        else:
            self.meta_update()
            self.learn()
        return self.transfer()

    # The daily pipeline runs these steps as separate tasks: begin_period, meta_update,
    # learn, transfer (``update`` is exactly that sequence for the per-period schedule).

    def replayed(self, earlier: list[PeriodData]) -> list[PeriodData]:
        """The periods before D_t that step 1 trains on beside it (``what_window`` - 1 of
        the newest of ``earlier``)."""
        n = self.cfg.what_window - 1
        return earlier[len(earlier) - n:] if n > 0 else []

    def begin_period(self, d: PeriodData, n_users: int, n_items: int,
                     replay: list[PeriodData] | None = None) -> None:
        """Start period t: grow every table to the current vocabulary sizes. Step 1 will
        train on D_t and the ``replay`` periods (see ``SMLConfig.what_window``)."""
        known_users, known_items = self.w_hat_prev.n_users, self.w_hat_prev.n_items
        self._d = d
        self._train = d if not replay else PeriodData(d.period, *concat([*replay, d]))
        # Step 2 learns from rows that existed at t-1 (new ids have no Ŵ_{t-1} to judge).
        self._old_rows = (d.users < known_users) & (d.items < known_items)
        gen = self._generator()
        self.w = self.w.grow(n_users, n_items, gen)
        self.w_prev = self.w_prev.grow(n_users, n_items, gen)
        self.w_hat_prev = self.w_hat_prev.grow(n_users, n_items, gen)
        self._w_hat = None
        self._theta_losses, self._what_losses = [], []

    def meta_update(self) -> None:
        """Step 2 on D_t with W_{t-2}, Ŵ_{t-1} fixed: update Θ (and its Adam state)."""
        d, rows = self._d, self._old_rows
        if rows.any():
            self._theta_losses += sml_learn_theta(
                self.theta, self.opt, self.w_prev, self.w_hat_prev, d.users[rows],
                d.items[rows], self.cfg, self.loss, self._next_seed(), self.device,
                self.progress)

    def learn(self) -> MFWeights:
        """Step 1: learn Ŵ_t on D_t with Θ fixed; the later outer steps alternate another
        step 2 with step 1 restarted from the current transfer output."""
        w_hat = self.w.clone()
        for k in range(self.cfg.outer_steps):
            if k > 0:
                self.meta_update()
                w_hat = self.theta.apply_all(self.w, w_hat)
            w_hat = self._learn_what(self.w, w_hat, self._train)
        self._w_hat = w_hat
        return w_hat

    def transfer(self) -> dict:
        """W_t = f_Θ(W_{t-1}, Ŵ_t) for every row; shift the state to period t."""
        w_new = self.theta.apply_all(self.w, self._w_hat)
        self.w_prev, self.w_hat_prev, self.w = self.w, self._w_hat, w_new
        self._w_hat = None
        self.periods_seen += 1
        return {"theta_loss": _tail_mean(self._theta_losses),
                "what_loss": _tail_mean(self._what_losses), "n_train": int(len(self._d))}

    def _official_rounds(self, prev_d: PeriodData | None) -> None:
        if not self.periods_seen:
            prev_d = None
        for k in range(self.cfg.outer_steps):
            self.meta_update()
            if prev_d is not None and k < self.cfg.outer_steps - 1:
                start = self.theta.apply_all(self.w_prev, self.w_hat_prev)
                self.w_hat_prev = self._learn_what(self.w_prev, start, prev_d)
        if self.periods_seen:
            self.w = self.theta.apply_all(self.w_prev, self.w_hat_prev)
        self._w_hat = self._learn_what(self.w, self.w.clone(), self._train)

    def _learn_what(self, w_old: MFWeights, start: MFWeights, d: PeriodData) -> MFWeights:
        """Step 1 on ``d`` through f_Θ(w_old, ·), from ``start``."""
        w_hat, losses = sml_learn_what(self.theta, w_old, start, d.users, d.items, self.cfg,
                                       self.loss, self._next_seed(), self.device, self.progress)
        self._what_losses += losses
        return w_hat

    def describe(self) -> dict:
        return {"outer_steps": self.cfg.outer_steps, "schedule": self.cfg.schedule,
                "transfer": self.cfg.transfer}

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything carried to the next period, as tensors plus JSON-able metadata."""
        tensors = {} if self.prior is None else {"prior": self.prior}
        for key, w in (("w", self.w), ("w_prev", self.w_prev), ("w_hat_prev", self.w_hat_prev)):
            tensors[f"{key}.user"], tensors[f"{key}.item"] = w.user, w.item
        tensors.update({f"theta.{k}": v for k, v in self.theta.state_dict().items()})
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            tensors.update({f"opt.{idx}.{k}": torch.as_tensor(v) for k, v in st.items()})
        meta = {"strategy": self.name, "config": self.cfg.model_dump(), "step": self._step,
                "periods_seen": self.periods_seen, "opt_param_groups": opt["param_groups"]}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore what ``state`` returned (the inverse, on this strategy's device)."""
        t = {k: v.to(self.device) for k, v in tensors.items()}
        self.w, self.w_prev, self.w_hat_prev = (
            MFWeights(t[f"{k}.user"], t[f"{k}.item"]) for k in ("w", "w_prev", "w_hat_prev"))
        self.prior = t.get("prior")
        self.theta = self._new_theta(self.w.dim)
        self.theta.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("theta.")})
        self.opt = theta_optimizer(self.theta, self.cfg)
        state: dict[int, dict] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v.cpu() if name == "step" else v
        self.opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
        self._step = int(meta["step"])
        self.periods_seen = int(meta["periods_seen"])


def _tail_mean(values: list[float]) -> float:
    return float(np.mean(values[-max(1, len(values) // 10):])) if values else float("nan")


def pretrain(history: list[PeriodData], n_users: int, n_items: int, mf: MFConfig,
             loss: LossConfig, seed: int, device: torch.device | str = "cpu",
             progress: bool = False, dim: int = 64) -> MFWeights:
    """W_0: an MF model trained from scratch on the pretraining periods."""
    gen = torch.Generator().manual_seed(seed)
    w = MFWeights.random(n_users, n_items, dim, gen)
    users, items = concat(history)
    w, _ = train_mf(w, users, items, mf, loss, seed, torch.device(device), progress,
                    desc="pretrain W_0")
    return w


METHODS = {cls.name: cls for cls in (SML, FullRetrain, FineTune, SlidingWindow, Popularity)}

# ----------------------------------------------------------------- building from a config

LOSS_KEYS = frozenset(LossConfig.model_fields)
MF_KEYS = frozenset(MFConfig.model_fields)
SML_KEYS = frozenset(SMLConfig.model_fields)
BLEND_KEYS = frozenset({"blend", "blend_window", "blend_half_life"})
PARAMS = {
    "sml": SML_KEYS | LOSS_KEYS | BLEND_KEYS,
    "full": MF_KEYS | LOSS_KEYS | BLEND_KEYS,
    "finetune": MF_KEYS | LOSS_KEYS | BLEND_KEYS,
    "window": MF_KEYS | LOSS_KEYS | BLEND_KEYS | {"window"},
    "pop": frozenset({"window", "half_life"}),
}
"""The parameters each method takes (flat: one dict per method, as in grids and configs)."""


@dataclass(frozen=True)
class Defaults:
    """What a method's parameters fall back to."""

    loss: LossConfig = LossConfig()
    mf: MFConfig = MFConfig()
    sml: SMLConfig = SMLConfig()
    seed: int = 0
    device: str = "cpu"
    progress: bool = False


def _pick(params: dict, keys: frozenset, base: BaseModel) -> BaseModel:
    """``base`` with the ``params`` that are its fields replaced (validated)."""
    update = {k: params[k] for k in params if k in keys}
    return type(base)(**{**base.model_dump(), **update})


def build_strategy(method: str, params: dict, defaults: Defaults = Defaults()) -> Strategy:
    """A strategy from a method name and its flat parameters (one point of a grid, or one
    challenger of a run configuration). Unknown parameters are an error that names them."""
    if method not in PARAMS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PARAMS)}")
    params = dict(params)
    unknown = sorted(set(params) - PARAMS[method])
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(PARAMS[method]))}")
    common = {"seed": defaults.seed, "device": defaults.device, "progress": defaults.progress}
    if method == "pop":
        return Popularity(window=params.get("window"), half_life=params.get("half_life"),
                          **common)
    common["loss"] = _pick(params, LOSS_KEYS, defaults.loss)
    common.update({k: params[k] for k in BLEND_KEYS if k in params})
    if method == "sml":
        return SML(sml=_pick(params, SML_KEYS, defaults.sml), **common)
    mf = _pick(params, MF_KEYS, defaults.mf)
    if method == "window":
        return SlidingWindow(window=int(params.get("window", 3)), mf=mf, **common)
    return {"full": FullRetrain, "finetune": FineTune}[method](mf=mf, **common)


def extra_meta_passes(strategy: Strategy, w0: MFWeights, periods: list[PeriodData],
                      sizes: list[tuple[int, int]], first: int, stop: int) -> None:
    """For SML with ``meta_passes`` > 1: all passes over the meta-training periods
    ``periods[first:stop]`` but the last, each followed by a rewind of the chain to W_0
    (Θ and its optimiser state kept). The caller then runs the last pass as usual. Other
    strategies are left as they are."""
    if not isinstance(strategy, SML):
        return
    for _ in range(strategy.cfg.meta_passes - 1):
        for t in range(first, stop):
            strategy.update(periods[: t + 1], *sizes[t])
        strategy.rewind(w0)
