"""The cold-start track: how new users fare, and which model should answer each user.

The main backtest (:mod:`smlrec.backtest`) scores returning users only. This track replays
the same periods, in the same phases (pretrain, meta-train, validation, test), and at each
period t scores the models built after period t-1 on two groups of users:

- **cold users**: users first seen in period t with at least ``max(n_support) +
  min_query`` distinct items the models know. Their interactions in time order give a
  support set (their first n items, n in ``n_support``: what a new user has done when they
  ask for recommendations) and a query set (the rest, to predict), ranked over every item
  known after t-1, the support excluded.
- **returning users**: users seen before t with new known items in t (the main
  backtest's users): query = those items, support = their ``recent`` most recent distinct
  items before t, every item of their history excluded from the ranking.

Models (each built by its module; all but the floor scored also with the blend
``+ λ·log1p(floor popularity)`` for every λ of ``blends``, λ chosen on validation):

- ``pop``: the validated popularity floor (the configuration's ``floor``);
- ``mf``: the champion MF retraining strategy (the configuration's non-SML challenger).
  For a cold user it is today's serving path, ``mean_emb``: the mean of the support items'
  embeddings as the user vector;
- ``melu``: :class:`smlrec.melu.MeLU`, meta-trained on each period's users as tasks,
  adapted on the support set;
- ``two_tower``: :class:`smlrec.two_tower.TwoTower`, the support (or recent items) as the
  user's bag;
- ``selector``: :class:`smlrec.selector.MetaSelector` (one per configuration of
  ``selector``, chosen on validation) over the raw mf, two-tower, MeLU and popularity
  scores, trained after each period on that period's users (returning and cold at the
  primary support size), as the base models then serving would have scored them;
- ``oracle``: per user, the best of those four base models on the query (an upper bound
  for any selector, as the MetaSelector paper reports).

Every figure is a mean over seeds with its spread; each model's configuration and blend
are chosen on validation periods of the track they are reported on, never on test.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from smlrec import metrics
from smlrec.backtest import mean_sd, per_seed
from smlrec.config import LossConfig, MethodSpec, MFConfig, _Config

PRIMARY = "ndcg@20"
BASES = ("mf", "two_tower", "melu", "pop")
"""The base models the selector weighs, in the order of its score tensor."""


@dataclass
class UserTask:
    """One user as a meta-learning task.

    ``user``: the user's row in the user vocabulary (features are read from this row).
    ``support``: item rows the model may learn from (in time order; for a new user their
    first n interactions, for a returning user their most recent ones).
    ``query``: item rows to predict (distinct, none of them in ``support``).
    """

    user: int
    support: np.ndarray
    query: np.ndarray


class ColdTrackConfig(_Config):
    """What the cold-start track runs."""

    n_support: tuple[int, ...] = Field((1, 3, 5), description="Support sizes scored for "
                                       "cold users (the same users at every size).")
    primary_support: int = Field(3, ge=1, description="The support size models are chosen "
                                 "at and the selector is trained with.")
    min_query: int = Field(1, ge=1, description="Query items a cold user needs beyond the "
                           "largest support.")
    recent: int = Field(20, ge=1, description="Returning users: support = this many most "
                        "recent distinct items of their history.")
    blends: tuple[float, ...] = Field((0.0, 0.5, 1.0, 2.0, 4.0, 8.0), description="Blend "
                                      "weights λ scored for every model but the floor.")
    champion: MethodSpec = Field(
        default_factory=lambda: MethodSpec(method="window", params={
            "window": 3, "epochs": 10, "lr": 8e-3, "n_negatives": 4}),
        description="The MF strategy behind `mf` and the mean-embedding path.")
    floor: MethodSpec = Field(default_factory=lambda: MethodSpec(method="pop",
                                                                 params={"window": 4}))
    melu: list[dict] = Field(default_factory=lambda: [{}], description="MeLU configurations "
                             "(MeLUConfig fields), chosen on validation.")
    two_tower: list[dict] = Field(default_factory=lambda: [{}], description="Two-tower "
                                  "configurations (TwoTowerConfig fields), chosen on "
                                  "validation.")
    selector: list[dict] = Field(
        default_factory=lambda: [{}, {"local_steps": 1}], description="MetaSelector "
        "configurations (SelectorConfig fields), chosen on validation: by default the "
        "plain selector and the meta-learned one (one local step on the support).")
    melu_pretrain_epochs: int = Field(20, ge=1, description="MeLU's passes over the "
                                      "pretraining periods' tasks before the replay starts.")
    melu_epochs: int = Field(3, ge=1, description="MeLU's passes over the tasks of the "
                             "newest periods after each period.")
    melu_replay: int = Field(3, ge=1, description="Periods of tasks MeLU meta-trains on "
                             "after each period (the newest and the ones before it).")
    until: str = Field("test", pattern="^(val|test)$", description="val: stop after the "
                       "validation periods (for searches, which must never see test).")
    pretrain_epochs: int = 20
    pretrain_lr: float = 3e-3
    loss: LossConfig = Field(default_factory=LossConfig)
    mf_lr: float = 1e-2
    seeds: tuple[int, ...] = (0, 1, 2)
    n_boot: int = 2000
    device: str = "cpu"
    progress: bool = True


# ----------------------------------------------------------------------------- tasks


def _distinct(items: np.ndarray) -> np.ndarray:
    """Distinct values in order of first appearance."""
    _, first = np.unique(items, return_index=True)
    return items[np.sort(first)]


def _by_user(users: np.ndarray, items: np.ndarray) -> dict[int, np.ndarray]:
    """Each user's items in row order (time order within a period)."""
    if len(users) == 0:
        return {}
    order = np.argsort(users, kind="stable")
    u, it = users[order], items[order]
    cuts = np.flatnonzero(np.diff(u)) + 1
    return {int(g[0]): i for g, i in zip(np.split(u, cuts), np.split(it, cuts), strict=True)}


def cold_tasks(users: np.ndarray, items: np.ndarray, n_users_before: int, n_items_before: int,
               n_support: int, need: int) -> list[UserTask]:
    """Tasks of the users first seen in a period (rows >= ``n_users_before``) with at least
    ``need`` distinct known items (rows < ``n_items_before``): support = the first
    ``n_support`` of those items, query = the rest. Users in row order."""
    out = []
    for u, its in sorted(_by_user(users, items).items()):
        if u < n_users_before:
            continue
        known = _distinct(its[its < n_items_before])
        if len(known) >= need:
            out.append(UserTask(u, known[:n_support], known[n_support:]))
    return out


def returning_tasks(users: np.ndarray, items: np.ndarray, history: dict[int, np.ndarray],
                    n_users_before: int, n_items_before: int, recent: int) -> list[UserTask]:
    """Tasks of the users seen before the period with new known items in it: support = their
    ``recent`` most recent distinct history items, query = the period's known items not in
    their history."""
    out = []
    for u, its in sorted(_by_user(users, items).items()):
        if u >= n_users_before or u not in history:
            continue
        task = _returning(u, its[its < n_items_before], history[u], recent)
        if task is not None:
            out.append(task)
    return out


def _returning(user: int, items: np.ndarray, past: np.ndarray, recent: int
               ) -> UserTask | None:
    """A returning user's task: query = ``items`` not in ``past`` (distinct), support =
    the ``recent`` most recent distinct items of ``past``; None with nothing new."""
    query = _distinct(items)
    query = query[~np.isin(query, past)]
    if not len(query):
        return None
    return UserTask(user, _distinct(past[::-1])[:recent][::-1], query)


def training_tasks(users: np.ndarray, items: np.ndarray, history: dict[int, np.ndarray],
                   rng: np.random.Generator, max_support: int, recent: int) -> list[UserTask]:
    """Meta-training tasks from one period: every user of the period. A user new in the
    period gets a support of their first s items (s drawn from 1..``max_support``), the
    rest as query; a returning user gets their recent history as support and the period's
    new items as query."""
    out = []
    for u, its in sorted(_by_user(users, items).items()):
        past = history.get(u)
        if past is None or len(past) == 0:
            distinct = _distinct(its)
            if len(distinct) < 2:
                continue
            s = int(rng.integers(1, min(max_support, len(distinct) - 1) + 1))
            out.append(UserTask(u, distinct[:s], distinct[s:]))
        elif (task := _returning(u, its, past, recent)) is not None:
            out.append(task)
    return out


def add_history(history: dict[int, np.ndarray], users: np.ndarray, items: np.ndarray) -> None:
    """Append a period's items to each user's history (in place)."""
    for u, its in _by_user(users, items).items():
        past = history.get(u)
        history[u] = its if past is None else np.concatenate([past, its])


# ----------------------------------------------------------------------------- scoring


def task_metrics(scores: torch.Tensor, tasks: list[UserTask],
                 exclude: list[np.ndarray]) -> dict[str, Any]:
    """NDCG/Recall@{5,10,20} of a (n_tasks, n_items) score matrix, each task's query as its
    positives and ``exclude[j]`` masked (``metrics.full_ranking`` over tasks as users)."""
    n_items = scores.shape[1]
    tu = np.concatenate([np.full(len(t.query), j) for j, t in enumerate(tasks)])
    ti = np.concatenate([t.query for t in tasks])
    eu = np.concatenate([np.full(len(e), j) for j, e in enumerate(exclude)])
    ei = np.concatenate(exclude)
    return metrics.full_ranking(lambda rows: scores[rows], tu, ti, n_items, eu, ei,
                                per_user=True)


def _mask(tasks: list[UserTask], exclude: list[np.ndarray], n_items: int) -> torch.Tensor:
    m = torch.zeros(len(tasks), n_items, dtype=torch.bool)
    for j, e in enumerate(exclude):
        m[j, torch.as_tensor(e, dtype=torch.long)] = True
    return m


@dataclass
class _Models:
    """One seed's models (``melu`` and ``towers``: one per grid point)."""

    champion: Any
    floor: Any
    melus: list
    towers: list
    selectors: list


def _prior(models: _Models, n_items: int) -> torch.Tensor:
    return models.floor.item_prior()[:n_items].float().cpu()


def _base_scores(models: _Models, tasks: list[UserTask], cold: bool, n_items: int
                 ) -> dict[str, list[torch.Tensor]]:
    """Raw scores (n_tasks, n_items) of each base model, one per grid point."""
    w = models.champion.weights(0.0)
    V = w.item[:n_items].float().cpu()
    users = np.array([t.user for t in tasks], dtype=np.int64)
    supports = [t.support for t in tasks]
    if cold:
        q = torch.stack([V[torch.as_tensor(s, dtype=torch.long)].mean(0) for s in supports])
    else:
        q = w.user[torch.as_tensor(users)].float().cpu()
    return {
        "mf": [q @ V.T],
        "two_tower": [tower.user_vectors(users, supports).float().cpu()
                      @ tower.item_table(n_items).float().cpu().T for tower in models.towers],
        "melu": [m.score(users, supports, n_items).float().cpu() for m in models.melus],
        "pop": [torch.log1p(_prior(models, n_items)).expand(len(tasks), n_items)],
    }


def _score_track(models: _Models, tasks: list[UserTask], exclude: list[np.ndarray], cold: bool,
                 n_items: int, blends: tuple[float, ...], key: dict, rows: list[dict],
                 per_user: dict, want_per_user: bool) -> dict[str, torch.Tensor] | None:
    """Score every model variant on one group of tasks; append rows; return the raw base
    scores of grid point 0 (what the selector is trained on)."""
    if not tasks:
        return None

    def record(model: str, variant: dict, scores: torch.Tensor) -> None:
        m = task_metrics(scores, tasks, exclude)
        pu = m.pop("per_user")
        vkey = json.dumps(variant, sort_keys=True)
        rows.append({**key, "model": model, "variant": vkey, **m})
        if want_per_user:
            per_user[(key["seed"], key["track"], model, vkey, key["t"])] = {
                "ndcg@20": pu["ndcg@20"].astype(np.float32),
                "recall@20": pu["recall@20"].astype(np.float32)}

    grids = _base_scores(models, tasks, cold, n_items)
    log_prior = grids["pop"][0]
    for name in ("mf", "two_tower", "melu"):
        for g, scores in enumerate(grids[name]):
            for lam in blends:
                record(name, {"config": g, "blend": lam}, scores + lam * log_prior)
    record("pop", {}, log_prior)
    return {name: grid[0] for name, grid in grids.items()}


def _selector_and_oracle(models: _Models, base: dict[str, torch.Tensor], tasks: list[UserTask],
                         exclude: list[np.ndarray], n_items: int, key: dict, rows: list[dict],
                         per_user: dict, want_per_user: bool) -> None:
    from smlrec.selector import oracle_choice

    users = np.array([t.user for t in tasks], dtype=np.int64)
    stacked = torch.stack([base[b] for b in BASES], 1)
    mask = _mask(tasks, exclude, n_items)
    for j, selector in enumerate(models.selectors):
        ranked = selector.rank_scores(users, stacked, [t.support for t in tasks], mask)
        ranked = torch.where(torch.isfinite(ranked), ranked, torch.full_like(ranked, -1e30))
        m = task_metrics(ranked, tasks, exclude)
        pu = m.pop("per_user")
        w = selector.weights(users, stacked, [t.support for t in tasks]).mean(0).tolist()
        variant = json.dumps({"config": j})
        rows.append({**key, "model": "selector", "variant": variant, **m,
                     **{f"weight_{b}": float(x) for b, x in zip(BASES, w, strict=True)}})
        if want_per_user:
            per_user[(key["seed"], key["track"], "selector", variant, key["t"])] = {
                k: pu[k].astype(np.float32) for k in ("ndcg@20", "recall@20")}
    each = [task_metrics(base[b], tasks, exclude)["per_user"] for b in BASES]
    per_model = np.stack([e["ndcg@20"] for e in each], 1)
    pick = oracle_choice(per_model)
    oracle = {k: np.stack([e[k] for e in each], 1)[np.arange(len(tasks)), pick]
              for k in ("ndcg@20", "recall@20")}
    rows.append({**key, "model": "oracle", "variant": "{}",
                 "ndcg@20": float(oracle["ndcg@20"].mean()),
                 "recall@20": float(oracle["recall@20"].mean()),
                 "n_users": len(tasks), "n_interactions": int(sum(len(t.query) for t in tasks)),
                 **{f"share_{b}": float(np.mean(pick == j)) for j, b in enumerate(BASES)}})
    if want_per_user:
        per_user[(key["seed"], key["track"], "oracle", "{}", key["t"])] = {
            k: v.astype(np.float32) for k, v in oracle.items()}


# ----------------------------------------------------------------------------- the run


@dataclass
class ColdRun:
    """What a cold-track run produced: one row per (seed, track, model, variant, period),
    and the test users' per-user NDCG/Recall@20 keyed by (seed, track, model, variant, t)."""

    results: pd.DataFrame
    per_user: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    n_boot: int = 2000


def _build(cfg: ColdTrackConfig, features: Any, seed: int) -> tuple[list, list, Any]:
    from smlrec.melu import MeLU, MeLUConfig
    from smlrec.selector import MetaSelector, SelectorConfig
    from smlrec.two_tower import TwoTower, TwoTowerConfig

    melus = [MeLU(features, MeLUConfig(**g), seed=seed, device=cfg.device) for g in cfg.melu]
    towers = [TwoTower(features, TwoTowerConfig(**g), seed=seed, device=cfg.device)
              for g in cfg.two_tower]
    selectors = [MetaSelector(list(BASES), features, SelectorConfig(**g), seed=seed,
                              device=cfg.device) for g in cfg.selector]
    return melus, towers, selectors


def run_seed(data: Any, features: Any, split: Any, cfg: ColdTrackConfig, seed: int,
             log: Callable[[str], None] = print, tick: Callable[[str], None] | None = None
             ) -> tuple[list[dict], dict]:
    """One seed's replay of the cold track (see the module doc)."""
    from smlrec.strategies import Defaults, build_strategy, pretrain

    p, n = split.pretrain, len(data.periods)
    defaults = Defaults(loss=cfg.loss, mf=MFConfig(lr=cfg.mf_lr), seed=seed, device=cfg.device)
    start = time.perf_counter()
    w0 = pretrain(data.periods[:p], data.n_users_after[p - 1], data.n_items_after[p - 1],
                  MFConfig(lr=cfg.pretrain_lr, epochs=cfg.pretrain_epochs), cfg.loss, seed,
                  cfg.device)
    champion = build_strategy(cfg.champion.method, cfg.champion.params, defaults)
    floor = build_strategy(cfg.floor.method, cfg.floor.params, defaults)
    champion.start(w0)
    floor.start(w0)
    melus, towers, selectors = _build(cfg, features, seed)
    models = _Models(champion, floor, melus, towers, selectors)
    rng = np.random.default_rng([seed, 7])
    history: dict[int, np.ndarray] = {}
    by_period: list[list[UserTask]] = []
    for k in range(p):
        d = data.periods[k]
        by_period.append(training_tasks(d.users, d.items, history, rng, max(cfg.n_support),
                                        cfg.recent))
        add_history(history, d.users, d.items)
        for tower in towers:
            tower.fit(data.periods[:k + 1], data.n_users_after[k], data.n_items_after[k])
    pre_tasks = [x for group in by_period for x in group]
    for m in melus:
        m.meta_train(pre_tasks, data.n_items_after[p - 1], epochs=cfg.melu_pretrain_epochs)
    log(f"seed {seed}: pretrained MF, two-tower and MeLU ({len(pre_tasks)} tasks) in "
        f"{time.perf_counter() - start:.1f} s")
    # history holds periods < p; the loop adds period t after scoring it
    need = max(cfg.n_support) + cfg.min_query
    rows: list[dict] = []
    per_user: dict = {}
    recent_tasks = by_period[-cfg.melu_replay:]
    last = n if cfg.until == "test" else split.pretrain + split.meta + split.val
    for t in range(p, last):
        d = data.periods[t]
        phase = split.phase(t)
        if t > p:
            nu, ni = data.n_users_after[t - 1], data.n_items_after[t - 1]
            want = phase == "test"
            sel_tasks, sel_base, sel_excl = [], [], []
            for n_s in cfg.n_support:
                tasks = cold_tasks(d.users, d.items, nu, ni, n_s, need)
                excl = [t_.support for t_ in tasks]
                key = {"seed": seed, "track": f"cold@{n_s}", "t": t, "period": d.period,
                       "phase": phase}
                base = _score_track(models, tasks, excl, True, ni, cfg.blends, key,
                                    rows, per_user, want)
                if base is not None:
                    _selector_and_oracle(models, base, tasks, excl, ni, key, rows, per_user,
                                         want)
                    if n_s == cfg.primary_support:
                        sel_tasks += tasks
                        sel_base.append(base)
                        sel_excl += excl
            tasks = returning_tasks(d.users, d.items, history, nu, ni, cfg.recent)
            excl = [history[t_.user][history[t_.user] < ni] for t_ in tasks]
            key = {"seed": seed, "track": "returning", "t": t, "period": d.period,
                   "phase": phase}
            base = _score_track(models, tasks, excl, False, ni, cfg.blends, key, rows,
                                per_user, want)
            if base is not None:
                _selector_and_oracle(models, base, tasks, excl, ni, key, rows, per_user, want)
                sel_tasks += tasks
                sel_base.append(base)
                sel_excl += excl
            if sel_tasks:  # the selector learns from this period's outcomes
                stacked = torch.cat([torch.stack([b[m] for m in BASES], 1) for b in sel_base])
                for selector in selectors:
                    selector.fit(np.array([t_.user for t_ in sel_tasks], dtype=np.int64),
                                 stacked, [t_.support for t_ in sel_tasks],
                                 [t_.query for t_ in sel_tasks],
                                 _mask(sel_tasks, sel_excl, stacked.shape[2]))
        # the period closes: every model learns from it
        tasks = training_tasks(d.users, d.items, history, rng, max(cfg.n_support), cfg.recent)
        add_history(history, d.users, d.items)
        hist = data.periods[: t + 1]
        nu, ni = data.n_users_after[t], data.n_items_after[t]
        champion.update(hist, nu, ni)
        floor.update(hist, nu, ni)
        recent_tasks = [*recent_tasks, tasks][-cfg.melu_replay:]
        for m in melus:
            m.meta_train([x for group in recent_tasks for x in group], ni,
                         epochs=cfg.melu_epochs)
        for tower in towers:
            tower.fit(hist, nu, ni)
        if tick is not None:
            tick(f"seed {seed} {d.period}")
    return rows, per_user


def run_cold_track(frame: pd.DataFrame, users: pd.DataFrame | None, items: pd.DataFrame | None,
                   cfg: ColdTrackConfig, split: Any = None, log: Callable[[str], None] = print,
                   jobs: int = 1) -> ColdRun:
    """Replay ``frame``'s periods through the cold track for every seed of ``cfg``."""
    from tqdm.auto import tqdm

    from smlrec.backtest import Split, index_periods
    from smlrec.side import encode

    data = index_periods(frame)
    split = split or Split.default(len(data.periods))
    features = encode(users, items, data.users, data.items)
    log(f"cold-start track: {len(data.periods)} periods, seeds "
        f"{', '.join(map(str, cfg.seeds))}; user fields "
        f"{[f.column for f in features.user_codes.fields]}, item fields "
        f"{[f.column for f in features.item_codes.fields]}")
    total = len(cfg.seeds) * (len(data.periods) - split.pretrain)
    rows, per_user = [], {}
    with tqdm(total=total, desc="cold track", disable=not cfg.progress, unit="period") as bar:
        def tick(text: str) -> None:
            bar.update()
            bar.set_postfix_str(text)

        if jobs > 1 and len(cfg.seeds) > 1:
            results = _in_workers(data, features, split, cfg, log, tick, jobs)
        else:
            results = [run_seed(data, features, split, cfg, s, log, tick) for s in cfg.seeds]
    for r, pu in results:
        rows += r
        per_user.update(pu)
    return ColdRun(pd.DataFrame(rows), per_user, tuple(cfg.seeds), cfg.n_boot)


def _seed_worker(data: Any, features: Any, split: Any, cfg: ColdTrackConfig, seed: int,
                 queue: Any) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)
    return run_seed(data, features, split, cfg, seed, lambda s: queue.put(("log", s)),
                    lambda s: queue.put(("tick", s)))


def _in_workers(data: Any, features: Any, split: Any, cfg: ColdTrackConfig,
                log: Callable[[str], None], tick: Callable[[str], None], jobs: int) -> list:
    from smlrec.workers import run_in_workers

    return run_in_workers(_seed_worker, [(data, features, split, cfg, s) for s in cfg.seeds],
                          jobs, lambda kind, value: (tick if kind == "tick" else log)(value))


# ----------------------------------------------------------------------------- summary


def choose(results: pd.DataFrame, track: str) -> dict[str, str]:
    """Each model's variant with the best validation NDCG@20 (mean over seeds) on ``track``."""
    part = results[(results["track"] == track) & (results["phase"] == "val")]
    out = {}
    for model, g in part.groupby("model"):
        scores = {v: np.nanmean(per_seed(gv, PRIMARY)) for v, gv in g.groupby("variant")}
        out[str(model)] = max(scores, key=lambda v: (scores[v], v))
    return out


def _entry(results: pd.DataFrame, track: str, model: str, variant: str) -> dict:
    part = results[(results["track"] == track) & (results["model"] == model)
                   & (results["variant"] == variant)]
    test, val = part[part["phase"] == "test"], part[part["phase"] == "val"]
    ndcg, sd = mean_sd(per_seed(test, PRIMARY))
    rec, rsd = mean_sd(per_seed(test, "recall@20"))
    vn, vsd = mean_sd(per_seed(val, PRIMARY))
    first = test[test["seed"] == test["seed"].min()] if len(test) else test
    out = {"ndcg@20": ndcg, "ndcg@20_sd": sd, "recall@20": rec, "recall@20_sd": rsd,
           "val_ndcg@20": vn, "val_ndcg@20_sd": vsd, "variant": json.loads(variant),
           "n_test_users": int(first["n_users"].sum()) if len(first) else 0}
    for col in [c for c in part.columns if c.startswith(("weight_", "share_"))]:
        out[col] = float(test[col].mean()) if len(test) else math.nan
    return out


def _ratio(run: ColdRun, track: str, a: tuple[str, str], b: tuple[str, str]) -> dict:
    """Paired bootstrap of a / b on the test users of ``track`` (each user's figure
    averaged over seeds; periods weighted by test interactions)."""
    res = run.results
    xs, ys, ws = [], [], []
    ts = sorted({k[4] for k in run.per_user if k[1] == track})
    for t in ts:
        xa = [run.per_user.get((s, track, a[0], a[1], t)) for s in run.seeds]
        xb = [run.per_user.get((s, track, b[0], b[1], t)) for s in run.seeds]
        if any(x is None for x in xa + xb):
            continue
        xs.append(np.mean([x[PRIMARY] for x in xa], 0))
        ys.append(np.mean([x[PRIMARY] for x in xb], 0))
        row = res[(res["track"] == track) & (res["t"] == t) & (res["model"] == "pop")]
        ws.append(float(row["n_interactions"].iloc[0]))
    r = metrics.paired_bootstrap(xs, ys, ws, n_boot=run.n_boot, seed=0)
    return {"ratio": r["ratio"], "ci95": [r["low"], r["high"]],
            "p_not_better": r["p_not_better"], "of": f"{a[0]} / {b[0]}"}


def summarize_cold(run: ColdRun, primary_support: int = 3) -> dict:
    """The ``cold`` section of summary.json: per track, each model at its validation-chosen
    variant (chosen on the primary support size for every cold track), and the ratios the
    issue is judged by, with paired bootstrap intervals."""
    res = run.results
    if res.empty:
        return {"tracks": {}, "ratios": {}}
    cold_key = f"cold@{primary_support}"
    picks = {cold_key: choose(res, cold_key), "returning": choose(res, "returning")}
    out: dict[str, Any] = {"primary_metric": PRIMARY, "seeds": list(run.seeds),
                           "primary_support": primary_support, "tracks": {}, "ratios": {}}
    for track in sorted(res["track"].unique()):
        pick = picks["returning"] if track == "returning" else picks[cold_key]
        out["tracks"][track] = {m: _entry(res, track, m, v) for m, v in pick.items()}
    for track, pick in picks.items():
        single = {m: v for m, v in pick.items() if m in ("mf", "two_tower", "melu", "pop")}
        entries = out["tracks"][track]
        best = max(single, key=lambda m: entries[m]["val_ndcg@20"])
        r = out["ratios"].setdefault(track, {"best_single_by_validation": best})
        for m in ("mf", "two_tower", "melu", "selector", "oracle"):
            if m in pick:
                r[f"{m}_vs_floor"] = _ratio(run, track, (m, pick[m]), ("pop", pick["pop"]))
        if "selector" in pick:
            r["selector_vs_best_single"] = _ratio(run, track, ("selector", pick["selector"]),
                                                  (best, pick[best]))
            r["oracle_vs_best_single"] = _ratio(run, track, ("oracle", "{}"),
                                                (best, pick[best]))
        r["two_tower_vs_mf"] = _ratio(run, track, ("two_tower", pick["two_tower"]),
                                      ("mf", pick["mf"]))
        r["melu_vs_mf"] = _ratio(run, track, ("melu", pick["melu"]), ("mf", pick["mf"]))
    return out


def format_cold(summary: dict) -> str:
    """The cold section as Markdown tables."""
    lines = ["## Cold-start track (test periods; mean ± sd over seeds; choices on "
             "validation)", ""]
    for track, models in summary.get("tracks", {}).items():
        lines += [f"### {track}", "", "| model | variant | NDCG@20 | Recall@20 | val NDCG@20 | "
                  "test users |", "|---|---|---|---|---|---|"]
        for m, e in sorted(models.items(), key=lambda kv: -kv[1]["ndcg@20"]):
            lines.append(f"| {m} | {json.dumps(e['variant'])} | {e['ndcg@20']:.4f} ± "
                         f"{e['ndcg@20_sd']:.4f} | {e['recall@20']:.4f} | "
                         f"{e['val_ndcg@20']:.4f} | {e['n_test_users']} |")
        lines.append("")
    for track, r in summary.get("ratios", {}).items():
        lines += [f"### ratios on {track} (best single base by validation: "
                  f"{r['best_single_by_validation']})", "", "| ratio | value | 95% CI |",
                  "|---|---|---|"]
        for name, v in r.items():
            if isinstance(v, dict):
                lines.append(f"| {name} | {v['ratio']:.3f} | [{v['ci95'][0]:.3f}, "
                             f"{v['ci95'][1]:.3f}] |")
        lines.append("")
    return "\n".join(lines)
