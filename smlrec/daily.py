"""The daily run, as plain functions over the data store and the state store.

One period t (data D_t) goes through:

1. gate: test yesterday's challengers (the candidate bundle holds one model per strategy
   of the run configuration: SML and, typically, the best other strategy of the backtest),
   the incumbent and the popularity floor on D_t; promote the best eligible challenger or
   keep the incumbent (``smlrec.gate``);
2. SML's steps on D_t: begin + meta-update (step 2), learn Ŵ_t (step 1), and the other
   challengers' retraining (in a task of their own);
3. transfer: W_t = f_Θ(W_{t-1}, Ŵ_t); every challenger's new model, with its served
   tables (the blend column included), goes into one bundle, the new candidate.

Every challenger continues its own chain from the newest candidate bundle, whatever the
gate decided: that is the chain the backtest measured and chose on, so the pipeline ships
what was validated (the parity test checks they are the same models). The gate decides
only what is served.

The KFP components call these functions one step per task, handing the state from task
to task as bundles (see ``save_sml``); ``run_period`` runs them in one process. The run
configuration (``DailyConfig``) is kept in the state store by the bootstrap and read by
every later run. Nothing here imports KFP, Feast or BentoML.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from smlrec import coldstart, metrics
from smlrec.config import DailyConfig, MethodSpec, MFConfig
from smlrec.data.store import canonical_order, list_periods, read_period, read_periods
from smlrec.errors import IntegrityError, SmlrecError
from smlrec.gate import GateDecision, decide
from smlrec.io import load_bundle, save_bundle
from smlrec.models import MFWeights
from smlrec.registry import StateStore, check_period_id, served_keys
from smlrec.schema import ITEM, TS, USER
from smlrec.strategies import (
    SML,
    Defaults,
    PeriodData,
    Strategy,
    build_strategy,
    concat,
    extra_meta_passes,
    popularity_window,
    pretrain,
)
from smlrec.vocab import Vocab

__all__ = ["DailyConfig", "bootstrap", "gate", "run_period", "load_config"]

KS = (5, 10, 20)


# --------------------------------------------------------------------------- configuration


def load_config(store: StateStore, device: str = "cpu") -> DailyConfig:
    """The run configuration the store was bootstrapped with (defaults for older stores)."""
    import yaml

    text = store.config_text()
    doc = (yaml.safe_load(text) or {}) if text else {}
    return DailyConfig(**{**doc, "device": device})


def task_config(state_uri: str) -> DailyConfig:
    """For a pipeline task: one CPU thread (see ``configure_threads``) and the store's run
    configuration on the task's device (CUDA when present)."""
    from smlrec.device import configure_threads, pick_device

    configure_threads()
    return load_config(StateStore(state_uri), device=str(pick_device()))


def defaults(cfg: DailyConfig) -> Defaults:
    return Defaults(loss=cfg.loss, mf=cfg.mf, sml=cfg.sml, seed=cfg.seed, device=cfg.device)


def build(cfg: DailyConfig, spec: MethodSpec) -> Strategy:
    """A strategy of the run configuration (a challenger or the floor)."""
    return build_strategy(spec.method, spec.params, defaults(cfg))


def _sml(cfg: DailyConfig) -> SML:
    s = build(cfg, cfg.challenger("sml"))
    assert isinstance(s, SML)
    if s.cfg.schedule != "per_period":
        raise SmlrecError("the daily pipeline runs SML's per-period schedule; set the sml "
                          "challenger's schedule to per_period in the run configuration")
    return s


# --------------------------------------------------------------------------- bundles


def _vocab_files(users: Vocab, items: Vocab) -> dict[str, bytes]:
    return {"vocab_users.json": users.to_json().encode(),
            "vocab_items.json": items.to_json().encode()}


def _vocabs(files: dict[str, bytes]) -> tuple[Vocab, Vocab]:
    return (Vocab.from_json(files["vocab_users.json"].decode()),
            Vocab.from_json(files["vocab_items.json"].decode()))


def save_sml(url: str, sml: SML, users: Vocab, items: Vocab, **meta: Any) -> dict[str, str]:
    """Write the SML state (and the mid-period state, if any) with its vocabularies."""
    tensors, state_meta = sml.state()
    if getattr(sml, "_w_hat", None) is not None:
        tensors["w_hat.user"], tensors["w_hat.item"] = sml._w_hat.user, sml._w_hat.item
    known = getattr(sml, "_known", None)
    return save_bundle(url, tensors, {**state_meta, **meta, "known": known},
                       _vocab_files(users, items))


def load_sml(url: str, cfg: DailyConfig) -> tuple[SML, Vocab, Vocab, dict]:
    """Load a bundle's SML state (checksums verified) into a ready strategy."""
    tensors, meta, files = load_bundle(url, cfg.device)
    sml = _sml(cfg)
    sml.load_state({k: v for k, v in tensors.items() if not k.startswith("w_hat.")}, meta)
    sml._w_hat = (MFWeights(tensors["w_hat.user"], tensors["w_hat.item"])
                  if "w_hat.user" in tensors else None)
    sml._known = meta.get("known")
    return (sml, *_vocabs(files), meta)


def _others(cfg: DailyConfig) -> list[MethodSpec]:
    return [c for c in cfg.challengers if c.method != "sml"]


def _load_others(tensors: dict[str, torch.Tensor], meta: dict, cfg: DailyConfig
                 ) -> dict[str, Strategy]:
    """The non-SML challengers stored in a bundle under ``<name>.`` prefixes."""
    out = {}
    for spec in _others(cfg):
        name = spec.method
        info = (meta.get("challengers") or {}).get(name)
        if info is None:
            raise SmlrecError(f"the bundle holds no {name} state; the run configuration "
                              "differs from the one the store was bootstrapped with")
        s = build(cfg, spec)
        prefix = f"{name}."
        s.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                     info)
        out[name] = s
    return out


def _other_tensors(strategies: dict[str, Strategy]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {}
    for name, s in strategies.items():
        t, m = s.state()
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    return tensors, meta


def save_candidate(store: StateStore, period_id: str, sml: SML, others: dict[str, Strategy],
                   users: Vocab, items: Vocab, cfg: DailyConfig,
                   cold: tuple[dict[str, torch.Tensor], dict] | None = None, **meta: Any) -> None:
    """The period's bundle: SML's state, every other challenger's state, what each
    challenger serves (``serve.<name>.user`` / ``.item``, the blend column included) and,
    with ``cold``, the cold-start model's tensors and metadata (``smlrec.coldstart``)."""
    tensors, sml_meta = sml.state()
    other_t, other_meta = _other_tensors(others)
    tensors.update(other_t)
    if cold is not None:
        tensors.update(cold[0])
        meta[coldstart.META_KEY] = cold[1]
    challengers = {}
    for name, s in {"sml": sml, **others}.items():
        w = s.weights()
        tensors[f"serve.{name}.user"], tensors[f"serve.{name}.item"] = w.user, w.item
        challengers[name] = {**other_meta.get(name, {}), "strategy": name,
                             "params": cfg.challenger(name).params,
                             "prior_column": bool(s.blend and s.prior is not None)}
    save_bundle(store.period_uri(period_id), tensors,
                {**sml_meta, **meta, "period": period_id, "period_id": period_id,
                 "known": None,
                 "challengers": challengers,
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                _vocab_files(users, items))


def index_period(frame: pd.DataFrame, users: Vocab, items: Vocab, period_id: str) -> PeriodData:
    """Rows of the model tables for a period's interactions, in the canonical order (the
    vocabularies grow)."""
    frame = canonical_order(frame, TS if TS in frame else "event_timestamp")
    users.add(frame[USER])
    items.add(frame[ITEM])
    return PeriodData(period_id, users.lookup(frame[USER]), items.lookup(frame[ITEM]))


def _history(data_root: str, period_id: str, n: int | None, users: Vocab, items: Vocab
             ) -> list[PeriodData]:
    """The ``n`` stored periods before ``period_id`` (all when None), indexed with the
    vocabularies (which already know every id in them)."""
    earlier = [p for p in list_periods(data_root) if p < period_id]
    if n is not None:
        earlier = earlier[max(0, len(earlier) - n):] if n > 0 else []
    out = []
    for pid in earlier:
        frame = canonical_order(read_period(data_root, pid, columns=[USER, ITEM, TS]))
        out.append(PeriodData(pid, users.lookup(frame[USER]), items.lookup(frame[ITEM])))
    return out


def _begin(sml: SML, d: PeriodData, users: Vocab, items: Vocab) -> None:
    """begin_period, remembering the sizes known at t-1 so later tasks can resume."""
    known = getattr(sml, "_known", None)
    if known is None:
        known = [sml.w_hat_prev.n_users, sml.w_hat_prev.n_items]
        sml.begin_period(d, len(users), len(items))
        sml._known = known
    else:  # resuming in a later task: tables are already grown, keep step 2's row filter
        sml._d = sml._train = d
        sml._old_rows = (d.users < known[0]) & (d.items < known[1])
        sml._theta_losses, sml._what_losses = [], []


# --------------------------------------------------------------------------- evaluation


def _pairs(frame: pd.DataFrame, users: Vocab, items: Vocab) -> tuple[np.ndarray, np.ndarray]:
    u, i = users.lookup(frame[USER]), items.lookup(frame[ITEM])
    keep = (u >= 0) & (i >= 0)
    return u[keep], i[keep]


def evaluate_on_period(w: MFWeights | None, prior: torch.Tensor | None, users: Vocab,
                       items: Vocab, test: pd.DataFrame, history: pd.DataFrame,
                       only_users: set[str] | None = None, per_user: bool = False
                       ) -> dict[str, Any]:
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
    return metrics.full_ranking(scorer, tu, ti, n_items, hu, hi, ks=KS, per_user=per_user)


def period_counts(frame: pd.DataFrame, items: Vocab) -> torch.Tensor:
    """Interactions per known item in ``frame`` (popularity's scores)."""
    idx = items.lookup(frame[ITEM])
    return torch.from_numpy(np.bincount(idx[idx >= 0], minlength=len(items)).astype(np.float32))


def floor_prior(data_root: str, period_id: str, cfg: DailyConfig, users: Vocab, items: Vocab
                ) -> torch.Tensor:
    """The floor's item scores for period ``period_id``: the validated popularity variant
    over the stored periods before it (the same counts the backtest's floor uses)."""
    floor = build(cfg, cfg.floor)
    n = popularity_window(floor.window, floor.half_life)
    history = _history(data_root, period_id, n, users, items)
    for d in history:  # ids first seen after the candidate was made are not ranked
        keep = d.items >= 0
        d.users, d.items = d.users[keep], d.items[keep]
    if not history:
        return torch.zeros(len(items))
    floor.refresh_prior(history, len(items))
    return floor.prior


def _aligned(a: dict, b: dict, metric: str = "ndcg@20") -> tuple[np.ndarray, np.ndarray]:
    """Two models' per-user values over the users both scored (a user's row is the same in
    every version of a vocabulary, which only appends)."""
    _, ia, ib = np.intersect1d(a["user"], b["user"], assume_unique=True, return_indices=True)
    return a[metric][ia], b[metric][ib]


def served(tensors: dict[str, torch.Tensor], meta: dict, strategy: str | None) -> MFWeights:
    ukey, ikey = served_keys(meta, strategy)
    return MFWeights(tensors[ukey], tensors[ikey])


# --------------------------------------------------------------------------- steps


def previous_period(data_root: str, period_id: str) -> str | None:
    """The stored period just before ``period_id``, if any."""
    earlier = [p for p in list_periods(data_root) if p < period_id]
    return earlier[-1] if earlier else None


def gate(data_root: str, store: StateStore, period_id: str, cfg: DailyConfig) -> GateDecision:
    """Test every challenger of the candidate (W_{t-1}), the incumbent and the floor on D_t;
    promote the best eligible challenger or keep the incumbent.

    All are scored on the same test rows: D_t's interactions of users known to every
    evaluated model. Each challenger gets a paired bootstrap interval of its NDCG@20 over
    the floor's, over those users. The decision is appended to the decision log first.
    """
    check_period_id(period_id)
    cand_id = store.get_pointer("candidate")
    prod = store.pointer_info("production")
    prod_id, prod_strategy = prod.get("period"), prod.get("strategy")
    if cand_id is None:
        raise SmlrecError(f"{store.uri}: no candidate model; run the bootstrap first")
    test = read_period(data_root, period_id)
    history = read_periods(data_root, [p for p in list_periods(data_root) if p < period_id])
    c_tensors, c_meta, c_users, c_items = store.load_period(cand_id, cfg.device)
    names = list(c_meta.get("challengers") or {"sml": {}})
    models = {n: (served(c_tensors, c_meta, n if c_meta.get("challengers") else None),
                  c_users, c_items) for n in names}
    incumbent_model = None
    if prod_id is not None and prod_id != cand_id:
        p_tensors, p_meta, p_users, p_items = store.load_period(prod_id, cfg.device)
        incumbent_model = (served(p_tensors, p_meta, prod_strategy), p_users, p_items)
    common = set(test[USER]) & set(c_users.ids)
    if incumbent_model is not None:
        common &= set(incumbent_model[1].ids)
    scores, per_user = {}, {}
    for name, (w, users, items) in {**models, **(
            {"incumbent": incumbent_model} if incumbent_model else {})}.items():
        r = evaluate_on_period(w, None, users, items, test, history, common, per_user=True)
        per_user[name] = r.pop("per_user")
        scores[name] = r
    prior = floor_prior(data_root, period_id, cfg, c_users, c_items)
    r = evaluate_on_period(None, prior, c_users, c_items, test, history, common, per_user=True)
    per_user["popularity"], scores["popularity"] = r.pop("per_user"), r
    intervals = {}
    for name in [*names, *(["incumbent"] if incumbent_model else [])]:
        a, b = _aligned(per_user[name], per_user["popularity"])
        r = metrics.paired_bootstrap([a], [b], seed=cfg.seed)
        intervals[name] = {"ratio": r["ratio"], "ci95": [r["low"], r["high"]]}
    incumbent = scores.get("incumbent")
    vs_incumbent = {}
    if incumbent_model is not None and cfg.incumbent_test == "bootstrap":
        for name in names:
            a, b = _aligned(per_user[name], per_user["incumbent"])
            r = metrics.paired_bootstrap([a], [b], seed=cfg.seed)
            vs_incumbent[name] = {"ratio": r["ratio"], "ci95": [r["low"], r["high"]]}
    if prod_id == cand_id:  # re-running a period whose candidate was already promoted
        incumbent = scores.get(prod_strategy or names[0])
    result = decide({n: scores[n] for n in names}, incumbent, scores["popularity"],
                    cfg.tolerance, vs_incumbent={n: v["ci95"] for n, v in vs_incumbent.items()}
                    if prod_id != cand_id else None)
    if result.accept:  # what packaging would refuse is not promoted
        from smlrec import ann  # FAISS: loaded by the gate task only

        w = models[result.strategy][0]
        why = ann.refusal(w.item[: len(c_items)], w.user[: len(c_users)])
        if why is not None:
            result.reasons = [f"reject: {result.strategy} would be promoted, but {why}; the "
                              "incumbent keeps serving", *result.reasons[1:]]
            result.accept, result.strategy = False, None
    cold = None
    if cfg.cold is not None and c_meta.get(coldstart.META_KEY):
        serve = result.strategy or result.best or names[0]
        info = (c_meta.get("challengers") or {}).get(serve, {})
        cold = coldstart.gate_cold(c_tensors, c_meta, data_root, models[serve][0].item,
                                   bool(info.get("prior_column")), prior, test, c_users,
                                   c_items, cfg.cold, cfg.device)
    result.extra = {"period": period_id, "candidate_period": cand_id,
                    "incumbent_period": prod_id, "incumbent_strategy": prod_strategy,
                    "vs_floor": intervals, "vs_incumbent": vs_incumbent,
                    "n_users": scores["popularity"]["n_users"]}
    # Write-ahead: the decision is logged before it takes effect, so a crash in between
    # leaves a logged decision that the re-run applies, never a promotion without a record.
    # A re-run of the same gate (same period, same candidate) does not log it twice.
    logged = any(d.get("period") == period_id and d.get("candidate") == cand_id
                 for d in store.decisions())
    if not logged:
        store.append_decision({
            "period": period_id, "decision": result.decision, "strategy": result.strategy,
            "best": result.best, "candidate": cand_id, "challengers": names,
            "incumbent": prod_id, "incumbent_strategy": prod_strategy,
            "reasons": result.reasons, "scores": scores, "vs_floor": intervals,
            "vs_incumbent": vs_incumbent,
            "n_users": scores["popularity"]["n_users"],
            "n_interactions": scores["popularity"]["n_interactions"],
            "floor": cfg.floor.model_dump(), "tolerance": cfg.tolerance,
            **({"cold": cold} if cold is not None else {})})
    if result.accept and (prod_id, prod_strategy) != (cand_id, result.strategy):
        store.set_pointer("production", cand_id, strategy=result.strategy,
                          decided_in=period_id)
    return result


def serving_choice(store: StateStore, stage: str) -> tuple[str | None, str | None]:
    """(period, strategy) a stage serves. Production: what its pointer names. Candidate:
    the newest candidate bundle, in the production model's strategy (the canary previews
    tomorrow's version of today's champion); with no production yet, the challenger that
    scored best at the latest gate."""
    if stage == "production":
        info = store.pointer_info("production")
        return info.get("period"), info.get("strategy")
    period = store.get_pointer("candidate")
    strategy = store.pointer_info("production").get("strategy")
    if strategy is None:
        decisions = store.decisions()
        strategy = decisions[-1].get("best") if decisions else None
    return period, strategy


def chain_base(store: StateStore) -> str:
    """The bundle the new period builds on: the newest candidate (every challenger continues
    its own chain, as in the backtest; the gate decides only what is served)."""
    base = store.get_pointer("candidate")
    if base is None:
        raise SmlrecError(f"{store.uri}: nothing to continue from; run the bootstrap first")
    return base


def meta_update_step(frame: pd.DataFrame, store: StateStore, period_id: str, cfg: DailyConfig,
                     out_url: str) -> dict:
    """Load the chain's base, index D_t (``frame``), grow the tables, run step 2; save the
    state to ``out_url``."""
    base = chain_base(store)
    sml, users, items, _ = load_sml(store.period_uri(base), cfg)
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
    d = index_period(frame, Vocab(users.ids), Vocab(items.ids), meta["period_id"])
    _begin(sml, d, users, items)
    return sml, users, items, meta


def learn_step(frame: pd.DataFrame, in_url: str, cfg: DailyConfig, out_url: str,
               data_root: str = "") -> dict:
    """Step 1 (and the remaining outer steps): learn Ŵ_t on D_t (and, with ``what_window``
    above 1, on the stored periods before it, read from ``data_root``); save to ``out_url``."""
    start = time.perf_counter()
    sml, users, items, meta = _resume(frame, in_url, cfg)
    period_id = meta["period_id"]
    if sml.cfg.what_window > 1:
        if not data_root:
            raise SmlrecError(f"sml learns Ŵ_t on its last {sml.cfg.what_window} periods "
                              "(what_window); the learn step needs the data store (data_root)")
        replay = _history(data_root, period_id, sml.cfg.what_window - 1, users, items)
        sml._train = PeriodData(period_id, *concat([*replay, sml._d]))
    sml.learn()
    save_sml(out_url, sml, users, items, base_period=meta["base_period"], period_id=period_id)
    return {"what_loss": _mean(sml._what_losses), "seconds": time.perf_counter() - start}


def challengers_step(frame: pd.DataFrame, data_root: str, store: StateStore, period_id: str,
                     cfg: DailyConfig, out_url: str) -> dict:
    """Retrain the other challengers (not SML) on D_t and the stored periods each needs,
    from their states in the chain's base; save them to ``out_url``."""
    start = time.perf_counter()
    base = chain_base(store)
    tensors, meta, users, items = store.load_period(base, cfg.device)
    others = _load_others(tensors, meta, cfg)
    d = index_period(frame, users, items, period_id)
    out = {}
    for name, s in others.items():
        history = [*_history(data_root, period_id, _needed(s), users, items), d]
        r = s.update(history, len(users), len(items))
        out[name] = {k: v for k, v in r.items() if isinstance(v, int | float)}
    other_t, other_meta = _other_tensors(others)
    extra = {}
    if cfg.cold is not None and meta.get(coldstart.META_KEY):
        melu = coldstart.load(tensors, meta, data_root, users, items, cfg.device)
        history = _history(data_root, period_id, None, users, items)
        out["melu"] = coldstart.update_melu(melu, history, d, len(items), cfg.cold, cfg.seed)
        melu_t, melu_meta = coldstart.save_tensors(melu)
        other_t.update(melu_t)
        extra[coldstart.META_KEY] = melu_meta
    save_bundle(out_url, other_t, {"challengers": other_meta, "period_id": period_id,
                                   "base_period": base, **extra}, _vocab_files(users, items))
    return {"seconds": time.perf_counter() - start, "challengers": out}


def _needed(s: Strategy) -> int | None:
    n = s.periods_needed()
    return None if n is None else n - 1  # the new period comes from the frame


def transfer_step(frame: pd.DataFrame, in_url: str, store: StateStore, cfg: DailyConfig,
                  data_root: str = "", others_url: str = "") -> dict:
    """W_t = f_Θ(W_prev, Ŵ_t); with the other challengers (from ``others_url``) it goes into
    the state store as the new candidate bundle."""
    start = time.perf_counter()
    sml, users, items, meta = _resume(frame, in_url, cfg)
    period_id = meta["period_id"]
    sml.transfer()
    sml._known = None
    d = index_period(frame, Vocab(users.ids), Vocab(items.ids), period_id)
    prior_history = ([*_history(data_root, period_id, _needed(sml), users, items), d]
                     if data_root else [d])
    sml.refresh_prior(prior_history, len(items))
    others: dict[str, Strategy] = {}
    cold = None
    if _others(cfg):
        if not others_url:
            raise SmlrecError("the run configuration has challengers besides sml; the "
                              "transfer step needs their models (others_url)")
        o_tensors, o_meta, o_files = load_bundle(others_url, cfg.device)
        o_users, o_items = _vocabs(o_files)
        if o_users.ids != users.ids or o_items.ids != items.ids:
            raise IntegrityError("the challengers were trained with other vocabularies than "
                                 "SML's; refusing to mix them in one bundle")
        others = _load_others(o_tensors, o_meta, cfg)
        if o_meta.get(coldstart.META_KEY):
            cold = ({k: v for k, v in o_tensors.items() if k.startswith(coldstart.PREFIX)},
                    o_meta[coldstart.META_KEY])
    save_candidate(store, period_id, sml, others, users, items, cfg, cold=cold,
                   base_period=meta["base_period"])
    store.set_pointer("candidate", period_id, base_period=meta["base_period"])
    return {"seconds": time.perf_counter() - start, "n_users": len(users),
            "n_items": len(items)}


def is_done(store: StateStore, period_id: str) -> bool:
    """Whether period ``period_id`` already produced its candidate (re-runs skip it)."""
    cand = store.get_pointer("candidate")
    return store.has_period(period_id) and cand is not None and cand >= period_id


def run_period(data_root: str, store: StateStore, period_id: str, cfg: DailyConfig,
               work_dir: str) -> dict:
    """The whole daily run for one period in this process (gate, then the training steps)."""
    times, out = {}, {}
    start = time.perf_counter()
    out["gate"] = gate(data_root, store, period_id, cfg).to_dict()
    times["gate"] = time.perf_counter() - start
    frame = read_period(data_root, period_id)
    out["meta_update"] = meta_update_step(frame, store, period_id, cfg, f"{work_dir}/meta")
    out["learn"] = learn_step(frame, f"{work_dir}/meta", cfg, f"{work_dir}/learn", data_root)
    out["challengers"] = challengers_step(frame, data_root, store, period_id, cfg,
                                          f"{work_dir}/others")
    out["transfer"] = transfer_step(frame, f"{work_dir}/learn", store, cfg, data_root,
                                    f"{work_dir}/others")
    for k in ("meta_update", "learn", "challengers", "transfer"):
        times[k] = out[k]["seconds"]
    out["seconds"] = times
    return out


def bootstrap(data_root: str, store: StateStore, cfg: DailyConfig, until: str) -> dict:
    """Before the first daily run: pretrain W_0 on the first periods, then run every
    challenger over the periods up to ``until`` (inclusive), SML meta-training Θ with
    Algorithm 1, exactly as the backtest does. Saves the result as the first candidate (no
    production model yet: the first gate must see a challenger beat the floor) and keeps
    the run configuration in the store for every later run."""
    check_period_id(until)
    periods = [p for p in list_periods(data_root) if p <= until]
    if len(periods) <= cfg.pretrain_periods:
        raise SmlrecError(f"bootstrap needs more than {cfg.pretrain_periods} periods up to "
                          f"{until}; {data_root} has {len(periods)}")
    sml = _sml(cfg)  # refuses a configuration the daily run cannot follow, before training
    users, items = Vocab(), Vocab()
    data, sizes = [], []
    for pid in periods:  # vocabularies grow period by period, as they would have in production
        data.append(index_period(read_period(data_root, pid), users, items, pid))
        sizes.append((len(users), len(items)))
    p = cfg.pretrain_periods
    start = time.perf_counter()
    w0 = pretrain(data[:p], *sizes[p - 1], MFConfig(lr=cfg.pretrain_lr,
                                                    epochs=cfg.pretrain_epochs),
                  cfg.loss, cfg.seed, cfg.device)
    strategies = {"sml": sml, **{c.method: build(cfg, c) for c in _others(cfg)}}
    for s in strategies.values():
        s.start(w0)
        extra_meta_passes(s, w0, data, sizes, p, len(data))
        for t in range(p, len(data)):
            s.update(data[: t + 1], *sizes[t])
    cold = None
    if cfg.cold is not None:
        melu = coldstart.bootstrap_melu(data_root, data, sizes, users, items, cfg.cold, p,
                                        cfg.seed, cfg.device)
        cold = coldstart.save_tensors(melu)
    store.save_config(cfg.to_yaml())
    others = {k: v for k, v in strategies.items() if k != "sml"}
    save_candidate(store, periods[-1], sml, others, users, items, cfg, cold=cold,
                   base_period=None, bootstrap={"pretrain": periods[:p], "meta": periods[p:]})
    store.set_pointer("candidate", periods[-1], bootstrap=True)
    return {"pretrain_periods": periods[:p], "meta_periods": periods[p:],
            "candidate": periods[-1], "challengers": list(strategies),
            "seconds": time.perf_counter() - start}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
