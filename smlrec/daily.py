"""The daily run, as plain functions over the data store and the state store.

One period t (data D_t) goes through: gate (test yesterday's candidate W_{t-1} on D_t and
promote it or keep the incumbent), then SML's steps on D_t: begin + meta-update (step 2),
learn Ŵ_t (step 1), transfer W_t = f_Θ(W_prev, Ŵ_t), which becomes the new candidate.
The chain continues from the last accepted model: from the candidate when the gate
promoted it, from the incumbent when it did not, so one bad period cannot poison the next.

The KFP components call these functions one step per task, handing the SML state from
task to task as a bundle (see ``save_sml``); ``run_period`` runs them in one process.
Nothing here imports KFP, Feast or BentoML.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from smlrec import metrics
from smlrec.config import LossConfig, MFConfig, SMLConfig, _Config
from smlrec.data.store import list_periods, read_period, read_periods
from smlrec.errors import SmlrecError
from smlrec.gate import GateDecision, decide
from smlrec.io import load_bundle, save_bundle
from smlrec.models import MFWeights
from smlrec.registry import StateStore, check_period_id
from smlrec.schema import ITEM, USER
from smlrec.strategies import SML, PeriodData, pretrain
from smlrec.vocab import Vocab

KS = (5, 10, 20)


class DailyConfig(_Config):
    """Everything a daily run depends on besides its data and state locations."""

    sml: SMLConfig = Field(default_factory=SMLConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    tolerance: float = Field(0.05, ge=0, lt=1, description="Gate: the candidate may be this "
                             "much (relative) below the incumbent's NDCG@20 and still promote.")
    pretrain_periods: int = Field(10, ge=1, description="Bootstrap: periods W_0 trains on.")
    pretrain_epochs: int = Field(20, ge=1, description="Bootstrap: MF epochs for W_0.")
    seed: int = 0
    device: str = "cpu"


# --------------------------------------------------------------------------- SML bundles


def save_sml(url: str, sml: SML, users: Vocab, items: Vocab, **meta: Any) -> dict[str, str]:
    """Write the SML state (and the mid-period state, if any) with its vocabularies."""
    tensors, state_meta = sml.state()
    if getattr(sml, "_w_hat", None) is not None:
        tensors["w_hat.user"], tensors["w_hat.item"] = sml._w_hat.user, sml._w_hat.item
    known = getattr(sml, "_known", None)
    return save_bundle(url, tensors, {**state_meta, **meta, "known": known},
                       {"vocab_users.json": users.to_json().encode(),
                        "vocab_items.json": items.to_json().encode()})


def load_sml(url: str, cfg: DailyConfig) -> tuple[SML, Vocab, Vocab, dict]:
    """Load an SML bundle (checksums verified) into a ready strategy."""
    tensors, meta, files = load_bundle(url, cfg.device)
    sml = SML(sml=SMLConfig(**meta["config"]), loss=cfg.loss, seed=cfg.seed, device=cfg.device)
    sml.load_state({k: v for k, v in tensors.items() if not k.startswith("w_hat.")}, meta)
    sml._w_hat = (MFWeights(tensors["w_hat.user"], tensors["w_hat.item"])
                  if "w_hat.user" in tensors else None)
    sml._known = meta.get("known")
    return (sml, Vocab.from_json(files["vocab_users.json"].decode()),
            Vocab.from_json(files["vocab_items.json"].decode()), meta)


def index_period(frame: pd.DataFrame, users: Vocab, items: Vocab, period_id: str) -> PeriodData:
    """Rows of the model tables for a period's interactions (the vocabularies grow)."""
    users.add(frame[USER])
    items.add(frame[ITEM])
    return PeriodData(period_id, users.lookup(frame[USER]), items.lookup(frame[ITEM]))


def _begin(sml: SML, d: PeriodData, users: Vocab, items: Vocab) -> None:
    """begin_period, remembering the sizes known at t-1 so later tasks can resume."""
    known = getattr(sml, "_known", None)
    if known is None:
        known = [sml.w_hat_prev.n_users, sml.w_hat_prev.n_items]
        sml.begin_period(d, len(users), len(items))
        sml._known = known
    else:  # resuming in a later task: tables are already grown, keep step 2's row filter
        sml._d = d
        sml._old_rows = (d.users < known[0]) & (d.items < known[1])
        sml._theta_losses, sml._what_losses = [], []


# --------------------------------------------------------------------------- evaluation


def _pairs(frame: pd.DataFrame, users: Vocab, items: Vocab) -> tuple[np.ndarray, np.ndarray]:
    u, i = users.lookup(frame[USER]), items.lookup(frame[ITEM])
    keep = (u >= 0) & (i >= 0)
    return u[keep], i[keep]


def evaluate_on_period(w: MFWeights | None, prior: torch.Tensor | None, users: Vocab,
                       items: Vocab, test: pd.DataFrame, history: pd.DataFrame,
                       only_users: set[str] | None = None) -> dict[str, float]:
    """Full-ranking metrics on ``test`` of an MF model or an item prior, over the ids the
    model knows (optionally only ``only_users``), excluding each user's past items."""
    if only_users is not None:
        test = test[test[USER].isin(only_users)]
    tu, ti = _pairs(test, users, items)
    hu, hi = _pairs(history, users, items)
    n_items = len(items)
    if w is not None:
        scorer = metrics.mf_scorer(w.user[: len(users)], w.item[:n_items])
    else:
        scorer = metrics.popularity_scorer(prior[:n_items])
    return metrics.full_ranking(scorer, tu, ti, n_items, hu, hi, ks=KS)


def period_counts(frame: pd.DataFrame, items: Vocab) -> torch.Tensor:
    """Interactions per known item in ``frame`` (the popularity baseline's scores)."""
    idx = items.lookup(frame[ITEM])
    return torch.from_numpy(np.bincount(idx[idx >= 0], minlength=len(items)).astype(np.float32))


# --------------------------------------------------------------------------- steps


def previous_period(data_root: str, period_id: str) -> str | None:
    """The stored period just before ``period_id``, if any."""
    earlier = [p for p in list_periods(data_root) if p < period_id]
    return earlier[-1] if earlier else None


def gate(data_root: str, store: StateStore, period_id: str, cfg: DailyConfig) -> GateDecision:
    """Test the candidate W_{t-1} (and the incumbent, and popularity) on D_t; promote or keep.

    All three are scored on the same test rows: D_t's interactions of users known to every
    evaluated model. The decision is appended to the decision log.
    """
    check_period_id(period_id)
    cand_id, prod_id = store.get_pointer("candidate"), store.get_pointer("production")
    if cand_id is None:
        raise SmlrecError(f"{store.uri}: no candidate model; run the bootstrap first")
    test = read_period(data_root, period_id)
    history = read_periods(data_root, [p for p in list_periods(data_root) if p < period_id])
    models = {"candidate": store.load_period(cand_id, cfg.device)}
    if prod_id is not None and prod_id != cand_id:
        models["incumbent"] = store.load_period(prod_id, cfg.device)
    common = set(test[USER])
    for _, _, users, _ in models.values():
        common &= set(users.ids)
    scores = {}
    for name, (tensors, _, users, items) in models.items():
        w = MFWeights(tensors["w.user"], tensors["w.item"])
        scores[name] = evaluate_on_period(w, None, users, items, test, history, common)
    c_users, c_items = models["candidate"][2], models["candidate"][3]
    prev = previous_period(data_root, period_id)
    prior = period_counts(read_period(data_root, prev) if prev else test.iloc[:0], c_items)
    scores["popularity"] = evaluate_on_period(None, prior, c_users, c_items, test, history,
                                              common)
    incumbent = scores.get("incumbent")
    if prod_id == cand_id:  # re-running a period whose candidate was already promoted
        incumbent = scores["candidate"]
    result = decide(scores["candidate"], incumbent, scores["popularity"], cfg.tolerance)
    result.extra = {"period": period_id, "candidate_period": cand_id,
                    "incumbent_period": prod_id}
    # Write-ahead: the decision is logged before it takes effect, so a crash in between
    # leaves a logged decision that the re-run applies, never a promotion without a record.
    # A re-run of the same gate (same period, same candidate) does not log it twice.
    logged = any(d.get("period") == period_id and d.get("candidate") == cand_id
                 for d in store.decisions())
    if not logged:
        store.append_decision({"period": period_id, "decision": result.decision,
                               "candidate": cand_id, "incumbent": prod_id,
                               "reasons": result.reasons, "scores": scores,
                               "tolerance": cfg.tolerance})
    if result.accept and prod_id != cand_id:
        store.set_pointer("production", cand_id, decided_in=period_id)
    return result


def chain_base(store: StateStore) -> str:
    """The bundle the new period builds on: the production model if there is one (after
    the gate, that is the candidate when it was promoted), otherwise the candidate."""
    base = store.get_pointer("production") or store.get_pointer("candidate")
    if base is None:
        raise SmlrecError(f"{store.uri}: nothing to continue from; run the bootstrap first")
    return base


def meta_update_step(frame: pd.DataFrame, store: StateStore, period_id: str, cfg: DailyConfig,
                     out_url: str) -> dict:
    """Load the chain's base, index D_t (``frame``), grow the tables, run step 2; save the
    state to ``out_url``."""
    base = chain_base(store)
    sml, users, items, _ = load_sml(store.period_uri(base), cfg)
    sml.cfg = sml.cfg.model_copy(update={"schedule": "per_period",
                                         "outer_steps": cfg.sml.outer_steps})
    d = index_period(frame, users, items, period_id)
    start = time.perf_counter()
    _begin(sml, d, users, items)
    sml.meta_update()
    save_sml(out_url, sml, users, items, base_period=base, period_id=period_id)
    return {"base_period": base, "theta_loss": _mean(sml._theta_losses),
            "n_interactions": len(d), "n_users": len(users), "n_items": len(items),
            "seconds": time.perf_counter() - start}


def _resume(frame: pd.DataFrame, in_url: str, cfg: DailyConfig
            ) -> tuple[SML, Vocab, Vocab, dict]:
    """Load the state an earlier task saved mid-period and resume period t on ``frame``."""
    sml, users, items, meta = load_sml(in_url, cfg)
    d = PeriodData(meta["period_id"], users.lookup(frame[USER]), items.lookup(frame[ITEM]))
    _begin(sml, d, users, items)
    return sml, users, items, meta


def learn_step(frame: pd.DataFrame, in_url: str, cfg: DailyConfig, out_url: str) -> dict:
    """Step 1 (and the remaining outer steps): learn Ŵ_t on D_t; save to ``out_url``."""
    start = time.perf_counter()
    sml, users, items, meta = _resume(frame, in_url, cfg)
    period_id = meta["period_id"]
    sml.learn()
    save_sml(out_url, sml, users, items, base_period=meta["base_period"], period_id=period_id)
    return {"what_loss": _mean(sml._what_losses), "seconds": time.perf_counter() - start}


def transfer_step(frame: pd.DataFrame, in_url: str, store: StateStore, cfg: DailyConfig
                  ) -> dict:
    """W_t = f_Θ(W_prev, Ŵ_t); the bundle goes into the state store as the new candidate."""
    start = time.perf_counter()
    sml, users, items, meta = _resume(frame, in_url, cfg)
    period_id = meta["period_id"]
    sml.transfer()
    sml._known = None
    save_sml(store.period_uri(period_id), sml, users, items, base_period=meta["base_period"],
             period_id=period_id, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    store.set_pointer("candidate", period_id, base_period=meta["base_period"])
    return {"seconds": time.perf_counter() - start, "n_users": len(users),
            "n_items": len(items)}


def is_done(store: StateStore, period_id: str) -> bool:
    """Whether period ``period_id`` already produced its candidate (re-runs skip it)."""
    cand = store.get_pointer("candidate")
    return store.has_period(period_id) and cand is not None and cand >= period_id


def run_period(data_root: str, store: StateStore, period_id: str, cfg: DailyConfig,
               work_dir: str) -> dict:
    """The whole daily run for one period in this process (gate, then the SML steps)."""
    times, out = {}, {}
    start = time.perf_counter()
    out["gate"] = gate(data_root, store, period_id, cfg).to_dict()
    times["gate"] = time.perf_counter() - start
    frame = read_period(data_root, period_id)
    out["meta_update"] = meta_update_step(frame, store, period_id, cfg, f"{work_dir}/meta")
    out["learn"] = learn_step(frame, f"{work_dir}/meta", cfg, f"{work_dir}/learn")
    out["transfer"] = transfer_step(frame, f"{work_dir}/learn", store, cfg)
    for k in ("meta_update", "learn", "transfer"):
        times[k] = out[k]["seconds"]
    out["seconds"] = times
    return out


def bootstrap(data_root: str, store: StateStore, cfg: DailyConfig, until: str) -> dict:
    """Before the first daily run: pretrain W_0 on the first periods, then meta-train Θ with
    Algorithm 1 over the periods up to ``until`` (inclusive). Saves the result as the
    first candidate (no production model yet: the first gate must see it beat popularity)."""
    check_period_id(until)
    periods = [p for p in list_periods(data_root) if p <= until]
    if len(periods) <= cfg.pretrain_periods:
        raise SmlrecError(f"bootstrap needs more than {cfg.pretrain_periods} periods up to "
                          f"{until}; {data_root} has {len(periods)}")
    users, items = Vocab(), Vocab()
    data, sizes = [], []
    for pid in periods:  # vocabularies grow period by period, as they would have in production
        data.append(index_period(read_period(data_root, pid), users, items, pid))
        sizes.append((len(users), len(items)))
    p = cfg.pretrain_periods
    start = time.perf_counter()
    w0 = pretrain(data[:p], *sizes[p - 1], MFConfig(epochs=cfg.pretrain_epochs), cfg.loss,
                  cfg.seed, cfg.device)
    sml = SML(sml=cfg.sml.model_copy(update={"schedule": "per_period"}), loss=cfg.loss,
              seed=cfg.seed, device=cfg.device)
    sml.start(w0)
    for t in range(p, len(data)):
        sml.update(data[: t + 1], *sizes[t])
    save_sml(store.period_uri(periods[-1]), sml, users, items, base_period=None,
             period_id=periods[-1], bootstrap={"pretrain": periods[:p], "meta": periods[p:]})
    store.set_pointer("candidate", periods[-1], bootstrap=True)
    return {"pretrain_periods": periods[:p], "meta_periods": periods[p:],
            "candidate": periods[-1], "seconds": time.perf_counter() - start}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
