"""The backtest protocol: replay periods in order and test each model on the next period.

Periods are split, in time order, into pretraining (W_0 trained normally), meta-training
(every strategy updates; SML learns Θ with Algorithm 1), validation (hyper-parameters are
chosen here, and only here) and test (reported). Every strategy is evaluated on period t
with the model it produced after period t-1 ("test on the next period"), on the users and
items that model already knows, excluding the items each user interacted with before.

Every figure is a mean over seeds (``BacktestConfig.seeds``, three by default) with its
spread; configurations are chosen by their mean over seeds on the validation periods; each
method's test figure comes with a paired bootstrap interval of its ratio to the validated
popularity floor, over test users. Each MF configuration is also scored with the blend
``+ λ·log1p(recent popularity)`` for every λ of ``BacktestConfig.blends`` (one trained
model, several served variants), and λ is chosen on validation like any other parameter.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm.auto import tqdm

from smlrec import metrics
from smlrec.config import DailyConfig, LossConfig, MethodSpec, MFConfig, SMLConfig, _Config
from smlrec.schema import ITEM, PERIOD, USER
from smlrec.strategies import (
    PARAMS,
    Defaults,
    PeriodData,
    Strategy,
    build_strategy,
    concat,
    extra_meta_passes,
    pretrain,
)
from smlrec.vocab import Vocab

PHASES = ("pretrain", "meta", "val", "test")
PRIMARY = "ndcg@20"
MF_METHODS = ("sml", "full", "finetune", "window")


class Split(_Config):
    """How many periods go to each phase, in time order."""

    pretrain: int = Field(ge=1, description="Periods W_0 is trained on.")
    meta: int = Field(ge=1, description="Periods of meta-training (all strategies update).")
    val: int = Field(ge=1, description="Periods on which hyper-parameters are chosen.")
    test: int = Field(ge=1, description="Periods reported.")

    @classmethod
    def default(cls, n_periods: int) -> Split:
        """The MovieLens-100k split (10/12/3/7 of 32 periods), scaled to ``n_periods``."""
        if n_periods < 6:
            raise ValueError(f"a backtest needs at least 6 periods, the data has {n_periods}")
        pre = max(1, round(n_periods * 10 / 32))
        meta = max(1, round(n_periods * 12 / 32))
        val = max(1, round(n_periods * 3 / 32))
        test = n_periods - pre - meta - val
        if test < 1:
            meta -= 1 - test
            test = 1
        return cls(pretrain=pre, meta=meta, val=val, test=test)

    def phase(self, t: int) -> str:
        bounds = np.cumsum([self.pretrain, self.meta, self.val])
        return PHASES[int(np.searchsorted(bounds, t, side="right"))]


# Candidate hyper-parameters per method, chosen by validation NDCG@20 (mean over seeds)
# only. Where they come from (all searched on validation periods, three seeds a trial;
# benchmarks/results/study-*.md): learning rate 3e-3 and 4 negatives for the MF baselines
# from an earlier study on MovieLens-100k's validation weeks; the window's faster schedule
# from the window study; SML's residual softmax variant from the first SML study; SML with
# the best baselines' training as step 1 (fine-tuning's 20 epochs on the new period; the
# window's 10 epochs replaying three periods, and that search's best trial: a small
# transfer, two outer steps of 5 epochs over three periods) from the second (sml-replay).
# The paper's configuration ({}) stays in the grid.
_MF = {"lr": 3e-3, "n_negatives": 4}
_SML_AS_BASELINE = {"transfer": "residual", "hidden": 128, "outer_steps": 1, "n_negatives": 4}
DEFAULT_GRIDS: dict[str, list[dict]] = {
    "sml": [{},
            {"transfer": "residual", "hidden": 128, "loss": "softmax", "outer_steps": 2,
             "what_epochs": 2, "what_lr": 0.017, "theta_lr": 6e-4, "meta_passes": 2},
            {**_SML_AS_BASELINE, "what_epochs": 20, "what_lr": 3e-3, "theta_lr": 1e-4},
            {**_SML_AS_BASELINE, "what_window": 3, "what_epochs": 10, "what_lr": 8e-3,
             "theta_lr": 1e-5},
            {**_SML_AS_BASELINE, "hidden": 8, "outer_steps": 2, "what_window": 3,
             "what_epochs": 5, "what_lr": 9.7e-3, "theta_lr": 2.4e-5,
             "theta_weight_decay": 3.4e-5}],
    "full": [{"epochs": 1, **_MF}, {"epochs": 5, **_MF}],
    "finetune": [{"epochs": 5, **_MF}, {"epochs": 20, **_MF}],
    "window": [{"window": 3, "epochs": 20, **_MF},
               {"window": 3, "epochs": 10, "lr": 8e-3, "n_negatives": 4}],
    "pop": [{"window": 1}, {"window": 2}, {"window": 4}, {"window": 8}, {"half_life": 1},
            {"half_life": 2}],
}
DEFAULT_BLENDS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


class BacktestConfig(_Config):
    """Everything a backtest run depends on."""

    methods: list[str] = Field(default_factory=lambda: ["sml", "full", "finetune", "window",
                                                        "pop"])
    split: Split | None = Field(None, description="Phase sizes; default scales 10/12/3/7 of 32.")
    grids: dict[str, list[dict]] = Field(default_factory=lambda: DEFAULT_GRIDS)
    blends: tuple[float, ...] = Field(
        DEFAULT_BLENDS, description="Blend weights λ scored for every MF configuration that "
        "does not fix its own `blend` (0: the model alone).")
    pretrain_epochs: int = Field(20, ge=1, description="Epochs of MF training for W_0.")
    pretrain_lr: float = Field(3e-3, gt=0, description="Adam learning rate for W_0 (3e-3 "
                               "was chosen on validation in the quality study).")
    mf_lr: float = Field(1e-2, gt=0, description="Default Adam learning rate of MF "
                         "retraining (a grid's `lr` overrides it).")
    loss: LossConfig = Field(default_factory=LossConfig)
    sml: SMLConfig = Field(default_factory=SMLConfig)
    ks: tuple[int, ...] = (5, 10, 20)
    n_negatives: int = Field(999, ge=1, description="Negatives per positive, sampled protocol.")
    sampled_max_positives: int = Field(
        5000, ge=1, description="Sampled protocol: at most this many test positives per period "
        "(a seeded uniform subsample; the full-ranking metrics always use every positive).")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="Every figure is a "
                                   "mean over these seeds.")
    until: str = Field("test", pattern="^(val|test)$", description="val: stop after the "
                       "validation periods (for searches, which must never see test).")
    n_boot: int = Field(2000, ge=100, description="Bootstrap replicates of each interval.")
    device: str = "cpu"
    progress: bool = True
    partial_dir: str = Field("", description="When set, each seed's rows are appended to "
                             "<partial_dir>/per_period.seed<N>.partial.jsonl as each period "
                             "ends, so a stopped run keeps what it did.")

    def defaults(self, seed: int) -> Defaults:
        """What every strategy's parameters fall back to, for one seed."""
        return Defaults(loss=self.loss, mf=MFConfig(lr=self.mf_lr), sml=self.sml, seed=seed,
                        device=self.device)


@dataclass
class IndexedPeriods:
    """Periods as table rows, with the vocabulary sizes known after each period."""

    periods: list[PeriodData]
    n_users_after: list[int]
    n_items_after: list[int]
    users: Vocab = field(repr=False)
    items: Vocab = field(repr=False)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return list(zip(self.n_users_after, self.n_items_after, strict=True))


def empty_periods(frame: pd.DataFrame, spec: str) -> list[str]:
    """The periods of ``spec`` between the frame's first and last with no interactions."""
    from smlrec.data import periods

    if frame.empty or not spec:
        return []
    try:
        return periods.empty_periods(frame[PERIOD].unique(), spec)
    except ValueError:  # ids that do not start periods of spec: nothing to say
        return []


def index_periods(frame: pd.DataFrame) -> IndexedPeriods:
    """Grow the vocabularies period by period, as production would, and index every row."""
    from smlrec.data.store import canonical_order

    users, items = Vocab(), Vocab()
    out, nu, ni = [], [], []
    for pid, part in canonical_order(frame).groupby(PERIOD, sort=True):
        users.add(part[USER])
        items.add(part[ITEM])
        out.append(PeriodData(str(pid), users.lookup(part[USER]), items.lookup(part[ITEM])))
        nu.append(len(users))
        ni.append(len(items))
    return IndexedPeriods(out, nu, ni, users, items)


def views(method: str, params: dict, blends: tuple[float, ...]) -> list[tuple[dict, float | None]]:
    """The served variants of one trained configuration: (params as reported, blend weight).
    MF configurations without their own ``blend`` are scored at every weight of ``blends``."""
    if method not in MF_METHODS or "blend" in params or not blends:
        return [(dict(params), None)]
    return [({**params, "blend": float(b)}, float(b)) for b in blends]


def evaluate(strategy: Strategy, test: PeriodData, hist_users: np.ndarray,
             hist_items: np.ndarray, n_users: int, n_items: int, cfg: BacktestConfig, seed: int,
             sampled: bool = True, blend: float | None = None, per_user: bool = False
             ) -> dict[str, Any]:
    """Metrics of ``strategy``'s current model (with blend weight ``blend``, default its own)
    on period ``test`` (known users and items), excluding the history's pairs.

    Full ranking always; the sampled protocol (and AUC) only when ``sampled``; per-user
    NDCG/Recall (for the bootstrap) when ``per_user``.
    """
    keep = (test.users < n_users) & (test.items < n_items)
    tu, ti = test.users[keep], test.items[keep]
    w, prior = strategy.weights(blend), strategy.item_prior()
    if w is not None:
        scorer = metrics.mf_scorer(w.user[:n_users], w.item[:n_items])
        pair = metrics.mf_pair_scorer(w.user[:n_users], w.item[:n_items])
    elif prior is not None:
        scorer = metrics.popularity_scorer(prior[:n_items])
        pair = metrics.popularity_pair_scorer(prior[:n_items])
    else:
        raise RuntimeError(f"strategy {strategy.name} has no model yet")
    out = metrics.full_ranking(scorer, tu, ti, n_items, hist_users, hist_items, ks=cfg.ks,
                               per_user=per_user)
    if sampled:
        if len(tu) > cfg.sampled_max_positives:
            pick = np.random.default_rng(seed).choice(len(tu), cfg.sampled_max_positives,
                                                      replace=False)
            tu, ti = tu[pick], ti[pick]
        res = metrics.sampled_ranking(pair, tu, ti, n_items, hist_users, hist_items,
                                      n_negatives=cfg.n_negatives, ks=(20,), seed=seed)
        out.update({f"sampled_{k}": v for k, v in res.items() if not k.startswith("n_")})
        out["auc"] = out.pop("sampled_auc")
    return out


@dataclass
class Backtest:
    """What a backtest run produced.

    ``results``: one row per (seed, method, config, period) with the phase, the metrics and
    the seconds the update after that period took. ``per_user``: for test periods, each
    test user's NDCG@20 and Recall@20, keyed by (seed, method, config, t).
    """

    results: pd.DataFrame
    per_user: dict[tuple[int, str, int, int], dict[str, np.ndarray]]
    split: Split
    seeds: tuple[int, ...]
    n_boot: int = 2000
    strategies: dict[tuple[int, str, int], Strategy] = field(default_factory=dict)
    """The trained strategies after the last period, by (seed, method, grid index)."""


def run_backtest(frame: pd.DataFrame, cfg: BacktestConfig,
                 log: Callable[[str], None] = print, cache: dict | None = None,
                 jobs: int = 1) -> Backtest:
    """Run every method (each point of its grid) through all periods, once per seed.
    ``cache`` (a dict the caller keeps) memoises W_0 across runs on the same data, for
    searches that run many configurations. ``jobs`` > 1 runs the seeds in that many worker
    processes (one torch thread each): the rows are the same, since no seed's run draws
    from another's random stream, but the trained strategies stay in the workers
    (``Backtest.strategies`` is then empty) and ``cache`` is not used."""
    data = index_periods(frame)
    n = len(data.periods)
    split = cfg.split or Split.default(n)
    if split.pretrain + split.meta + split.val + split.test != n:
        raise ValueError(f"split {split.model_dump()} does not add up to the {n} periods")
    for method in cfg.methods:
        if method not in PARAMS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(PARAMS)}")
        for params in cfg.grids.get(method, [{}]):
            build_strategy(method, params, cfg.defaults(0))  # fail before any training
    last = n if cfg.until == "test" else n - split.test
    log(f"{n} periods: pretrain {split.pretrain}, meta-train {split.meta}, "
        f"validation {split.val}, test {split.test}{'' if cfg.until == 'test' else ' (not run)'}"
        f"; seeds {', '.join(map(str, cfg.seeds))}; device {cfg.device}")
    rows: list[dict] = []
    per_user: dict = {}
    strategies: dict = {}
    total = len(cfg.seeds) * (last - split.pretrain)
    if cfg.progress and not sys.stderr.isatty():  # a log file or CI: one line per period
        bar: Any = _LineBar(log, total)
    else:
        bar = tqdm(total=total, desc="periods", disable=not cfg.progress, unit="period")
    if jobs > 1 and len(cfg.seeds) > 1:
        for seed_rows, seed_users in _run_seeds_in_workers(data, split, cfg, last, log, bar,
                                                           jobs):
            rows.extend(seed_rows)
            per_user.update(seed_users)
    else:
        for seed in cfg.seeds:
            runs = _run_seed(data, split, cfg, seed, last, rows, per_user, log, bar, cache)
            for method, s, _, rid in runs:
                strategies[(seed, method, rid)] = s
    bar.close()
    return Backtest(pd.DataFrame(rows), per_user, split, tuple(cfg.seeds), cfg.n_boot,
                    strategies)


def auto_jobs(n_seeds: int, device: str) -> int:
    """Worker processes for a backtest: one per seed up to the CPU cores this process may
    use on CPU; one on a GPU (the seeds then share the device in turn)."""
    import os

    if not device.startswith("cpu"):
        return 1
    return max(1, min(n_seeds, len(os.sched_getaffinity(0))))


class _LineBar:
    """Progress as one log line per period, for output that is not a terminal."""

    def __init__(self, log: Callable[[str], None], total: int) -> None:
        self.log, self.total, self.n, self.start = log, total, 0, time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        spent = time.perf_counter() - self.start
        eta = spent / self.n * (self.total - self.n)
        self.log(f"period {self.n}/{self.total} done ({self.postfix}), {spent:.0f} s, "
                 f"about {eta:.0f} s left")

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


class _QueueBar:
    """A worker's stand-in for the progress bar: it reports to the parent's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put(("tick", n))

    def set_postfix_str(self, text: str) -> None:
        self.queue.put(("postfix", text))


def _seed_worker(data: IndexedPeriods, split: Split, cfg: BacktestConfig, seed: int,
                 last: int, queue: Any) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)
    rows: list[dict] = []
    per_user: dict = {}
    _run_seed(data, split, cfg, seed, last, rows, per_user,
              lambda line: queue.put(("log", line)), _QueueBar(queue))
    return rows, per_user


def _run_seeds_in_workers(data: IndexedPeriods, split: Split, cfg: BacktestConfig, last: int,
                          log: Callable[[str], None], bar: Any, jobs: int
                          ) -> list[tuple[list[dict], dict]]:
    """Each seed's run in its own process, results in seed order; the workers' progress
    and log lines come back through a queue."""
    from smlrec.workers import run_in_workers

    def on_message(kind: str, value: Any) -> None:
        if kind == "tick":
            bar.update(value)
        elif kind == "postfix":
            bar.set_postfix_str(value)
        else:
            log(value)

    return run_in_workers(_seed_worker, [(data, split, cfg, seed, last) for seed in cfg.seeds],
                          jobs, on_message)


def _run_seed(data: IndexedPeriods, split: Split, cfg: BacktestConfig, seed: int, last: int,
              rows: list[dict], per_user: dict, log: Callable[[str], None], bar: Any,
              cache: dict | None = None) -> list:
    device = torch.device(cfg.device)
    p = split.pretrain
    t0 = time.perf_counter()
    key = (seed, p, cfg.pretrain_lr, cfg.pretrain_epochs, cfg.loss, cfg.device)
    if cache is not None and key in cache:
        w0 = cache[key]
    else:
        w0 = pretrain(data.periods[:p], data.n_users_after[p - 1], data.n_items_after[p - 1],
                      MFConfig(lr=cfg.pretrain_lr, epochs=cfg.pretrain_epochs), cfg.loss, seed,
                      device, progress=cfg.progress)
        if cache is not None:
            cache[key] = w0
        log(f"seed {seed}: pretrained W_0 on {sum(map(len, data.periods[:p]))} positives "
            f"in {time.perf_counter() - t0:.1f} s")
    runs = []
    for method in cfg.methods:
        cid = 0
        for rid, params in enumerate(cfg.grids.get(method, [{}])):
            s = build_strategy(method, params, cfg.defaults(seed))
            s.start(w0)
            extra_meta_passes(s, w0, data.periods, data.sizes, p, p + split.meta)
            vs = []
            for vparams, blend in views(method, params, cfg.blends):
                vs.append((cid, vparams, blend))
                cid += 1
            runs.append((method, s, vs, rid))
    if cfg.partial_dir:
        Path(cfg.partial_dir).mkdir(parents=True, exist_ok=True)
        partial_path(cfg.partial_dir, seed).unlink(missing_ok=True)
    for t in range(p, last):
        period_rows = len(rows)  # rows[period_rows:] are this period's
        history = data.periods[: t + 1]
        phase = split.phase(t)
        nu_prev, ni_prev = data.n_users_after[t - 1], data.n_items_after[t - 1]
        hu, hi = concat(history[:-1])
        for method, s, vs, _ in runs:
            new = []
            for cid, vparams, blend in vs:
                row = {"seed": seed, "method": method, "config": cid,
                       "params": json.dumps(vparams, sort_keys=True),
                       "period": data.periods[t].period, "t": t, "phase": phase}
                if t > p:  # models after period t-1 exist from here on
                    m = evaluate(s, data.periods[t], hu, hi, nu_prev, ni_prev, cfg,
                                 seed=seed * 7919 + t, sampled=phase in ("val", "test"),
                                 blend=blend, per_user=phase == "test")
                    pu = m.pop("per_user", None)
                    if pu is not None:
                        per_user[(seed, method, cid, t)] = {
                            "user": pu["user"], "ndcg@20": pu["ndcg@20"].astype(np.float32),
                            "recall@20": pu["recall@20"].astype(np.float32)}
                    row.update(m)
                new.append(row)
            start = time.perf_counter()
            out = s.update(history, data.n_users_after[t], data.n_items_after[t])
            seconds = time.perf_counter() - start
            for row in new:
                row.update(out)
                row["train_seconds"] = seconds
            rows.extend(new)
        if cfg.partial_dir:  # what this period produced, before the next one starts
            with open(partial_path(cfg.partial_dir, seed), "a") as fh:
                fh.writelines(json.dumps(r, default=_jsonable) + "\n"
                              for r in rows[period_rows:])
        bar.update()
        bar.set_postfix_str(f"seed {seed} {data.periods[t].period}")
    return runs


# ----------------------------------------------------------------------------- selection


def _weighted(part: pd.DataFrame, metric: str) -> float:
    """The period mean of ``metric`` weighted by test interactions."""
    w = part["n_interactions"].fillna(0).to_numpy(float)
    v = part[metric].to_numpy(float)
    ok = (w > 0) & np.isfinite(v)
    return float((w[ok] * v[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


def per_seed(part: pd.DataFrame, metric: str) -> np.ndarray:
    """The weighted ``metric`` of each seed in ``part`` (one method, one config, one phase)."""
    if "seed" not in part:
        return np.array([_weighted(part, metric)])
    return np.array([_weighted(g, metric) for _, g in part.groupby("seed", sort=True)])


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    ok = values[np.isfinite(values)]
    if not len(ok):
        return float("nan"), float("nan")
    return float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0


def select_configs(results: pd.DataFrame, metric: str = PRIMARY) -> dict[str, int]:
    """For each method, the config with the best validation ``metric``: the mean over seeds
    of each seed's interaction-weighted mean over the validation periods."""
    chosen = {}
    val = results[results["phase"] == "val"]
    for method, part in val.groupby("method", sort=False):
        scores = {cid: mean_sd(per_seed(g, metric))[0] for cid, g in part.groupby("config")}
        chosen[method] = max(scores, key=lambda c: (np.nan_to_num(scores[c], nan=-1), -c))
    return chosen


def config_table(results: pd.DataFrame, metric: str = PRIMARY) -> dict[str, list[dict]]:
    """Every configuration's validation and test ``metric`` (mean and spread over seeds):
    the record of what each variant scored, beside what was chosen."""
    out: dict[str, list[dict]] = {}
    for (method, cid), part in results.groupby(["method", "config"], sort=False):
        row = {"config": int(cid), "params": json.loads(part["params"].iloc[0])}
        for phase in ("val", "test"):
            mean, sd = mean_sd(per_seed(part[part["phase"] == phase], metric))
            row[phase], row[f"{phase}_sd"] = mean, sd
        out.setdefault(method, []).append(row)
    return out


def _best(m: dict, keys: list[str], by: str = "val_ndcg@20") -> str | None:
    ok = [k for k in keys if k in m and math.isfinite(m[k][by])]
    return max(ok, key=lambda k: m[k][by]) if ok else None


def summarize(run: Backtest | pd.DataFrame, chosen: dict[str, int], dataset: str) -> dict:
    """The summary.json document: each method's chosen config, its test figures (mean and
    spread over seeds), its validation figure, and its bootstrap interval against the
    validated popularity floor (``pop``'s chosen config)."""
    if isinstance(run, pd.DataFrame):
        run = Backtest(run, {}, Split(pretrain=1, meta=1, val=1, test=1), (0,))
    results = run.results
    seeds = sorted(results["seed"].unique().tolist()) if "seed" in results else [0]
    out: dict[str, Any] = {"dataset": dataset, "primary_metric": PRIMARY, "seeds": seeds,
                           "methods": {}}
    ref = results[(results["seed"] == seeds[0]) & (results["method"] == results["method"].iloc[0])
                  ] if "seed" in results else results.iloc[:0]
    ref = ref[ref["config"] == ref["config"].min()]
    out["periods"] = [{"period": r.period, "phase": r.phase, "n_users": int(r.n_users),
                       "n_interactions": int(r.n_interactions)}
                      for r in ref.itertuples() if r.phase in ("val", "test")
                      and isinstance(r.n_users, int | float) and np.isfinite(r.n_users)]
    if "pop" in chosen:
        out["floor"] = {"method": "pop", "config": _params(results, "pop", chosen["pop"])}
    for method, cid in chosen.items():
        part = results[(results["method"] == method) & (results["config"] == cid)]
        test, val = part[part["phase"] == "test"], part[part["phase"] == "val"]
        ndcg, ndcg_sd = mean_sd(per_seed(test, "ndcg@20"))
        recall, recall_sd = mean_sd(per_seed(test, "recall@20"))
        val_ndcg, val_sd = mean_sd(per_seed(val, "ndcg@20"))
        params = _params(results, method, cid)
        entry = {
            "ndcg@20": ndcg, "ndcg@20_sd": ndcg_sd,
            "recall@20": recall, "recall@20_sd": recall_sd,
            "auc": mean_sd(per_seed(test, "auc"))[0] if "auc" in test else float("nan"),
            "sampled_ndcg@20": mean_sd(per_seed(test, "sampled_ndcg@20"))[0]
            if "sampled_ndcg@20" in test else float("nan"),
            "sampled_recall@20": mean_sd(per_seed(test, "sampled_recall@20"))[0]
            if "sampled_recall@20" in test else float("nan"),
            "val_ndcg@20": val_ndcg, "val_ndcg@20_sd": val_sd,
            "train_seconds_last_period": float(part.groupby("seed")["train_seconds"].last()
                                               .mean()) if "seed" in part else
            float(part["train_seconds"].iloc[-1]),
            "train_seconds_mean_test": float(test["train_seconds"].mean()),
            "params": params, "config": params,
            "n_test_interactions": int(test[test["seed"] == seeds[0]]["n_interactions"].sum()
                                       if "seed" in test else test["n_interactions"].sum()),
        }
        if "pop" in chosen and run.per_user:
            entry["ci95_vs_pop"], entry["ratio_vs_pop"], entry["p_not_better_than_pop"] = (
                _vs_floor(run, method, cid, chosen["pop"]))
        out["methods"][method] = entry
    out["configs"] = config_table(results)
    return out


def _params(results: pd.DataFrame, method: str, cid: int) -> dict:
    part = results[(results["method"] == method) & (results["config"] == cid)]
    return json.loads(part["params"].iloc[0])


def _vs_floor(run: Backtest, method: str, cid: int, pop_cid: int
              ) -> tuple[list[float], float, float]:
    """Paired bootstrap of a method's test NDCG@20 over the floor's: per test period, each
    user's NDCG@20 averaged over seeds against the floor's (deterministic) for that user;
    periods weighted by test interactions as in the reported means."""
    res = run.results
    a, b, w = [], [], []
    for t in sorted({k[3] for k in run.per_user}):
        floor = run.per_user.get((run.seeds[0], "pop", pop_cid, t))
        mine = [run.per_user.get((s, method, cid, t)) for s in run.seeds]
        mine = [x for x in mine if x is not None]
        if floor is None or not mine:
            continue
        for x in mine:
            if not np.array_equal(x["user"], floor["user"]):
                raise RuntimeError(f"period {t}: {method} and the floor scored different users")
        a.append(np.mean([x["ndcg@20"] for x in mine], axis=0))
        b.append(floor["ndcg@20"])
        row = res[(res["t"] == t) & (res["method"] == "pop") & (res["config"] == pop_cid)]
        w.append(float(row["n_interactions"].iloc[0]))
    r = metrics.paired_bootstrap(a, b, w, n_boot=run.n_boot, seed=0)
    return [r["low"], r["high"]], r["ratio"], r["p_not_better"]


def ratios(summary: dict) -> dict:
    """The comparisons the product is judged by, each side chosen on validation:

    - the best method (highest validation NDCG@20, popularity included) over the floor,
      on test, with its bootstrap interval;
    - SML over the best non-SML method (chosen on validation);
    - SML's training time at the last period over Full-retrain's.
    """
    m = summary["methods"]
    out: dict[str, Any] = {}
    best = _best(m, list(m))
    if best is not None and "pop" in m:
        out["best_method"] = best
        out["best_vs_floor"] = m[best][PRIMARY] / m["pop"][PRIMARY]
        if "ci95_vs_pop" in m[best]:
            out["best_vs_floor_ci95"] = m[best]["ci95_vs_pop"]
    if "sml" in m:
        base = _best(m, [k for k in m if k != "sml"])
        if base is not None:
            out["best_baseline"] = base
            out["ndcg_ratio_vs_best_baseline"] = m["sml"][PRIMARY] / m[base][PRIMARY]
        if "full" in m:
            out["time_ratio_vs_full"] = (m["sml"]["train_seconds_last_period"]
                                         / m["full"]["train_seconds_last_period"])
    return out


# ----------------------------------------------------------------------------- outputs


def run_config(summary: dict, cfg: BacktestConfig, split: Split, period: str = ""
               ) -> DailyConfig:
    """The daily run's configuration from a backtest's validation choices: the SML
    challenger (its best per-period-schedule config, the schedule the daily pipeline runs),
    the best other MF method beside it, and the validated popularity floor."""
    m = summary["methods"]
    if "sml" not in m or "pop" not in m:
        raise ValueError("writing a run configuration needs the sml and pop methods")
    sml_params = m["sml"]["params"]
    if sml_params.get("schedule") == "official":
        table = [c for c in summary["configs"]["sml"]
                 if c["params"].get("schedule", "per_period") == "per_period"]
        if not table:
            raise ValueError("no per-period SML configuration to hand to the daily pipeline")
        sml_params = max(table, key=lambda c: np.nan_to_num(c["val"], nan=-1))["params"]
    challengers = [MethodSpec(method="sml", params=sml_params)]
    other = _best(m, [k for k in m if k not in ("sml", "pop")])
    if other is not None:
        challengers.append(MethodSpec(method=other, params=m[other]["params"]))
    figures = {k: {"val_ndcg@20": v["val_ndcg@20"], "test_ndcg@20": v["ndcg@20"]}
               for k, v in m.items()}
    return DailyConfig(
        dataset=summary["dataset"], period=period, challengers=challengers,
        floor=MethodSpec(method="pop", params=m["pop"]["params"]), sml=cfg.sml,
        loss=cfg.loss, mf=MFConfig(lr=cfg.mf_lr), pretrain_periods=split.pretrain,
        pretrain_epochs=cfg.pretrain_epochs, pretrain_lr=cfg.pretrain_lr, seed=cfg.seeds[0],
        selection={"chosen_on": "validation periods, mean NDCG@20 over seeds",
                   "seeds": list(cfg.seeds), "split": split.model_dump(),
                   "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "figures": figures})


def partial_path(folder: str | Path, seed: int) -> Path:
    """Where a seed's rows go as the run goes (see ``BacktestConfig.partial_dir``)."""
    return Path(folder) / f"per_period.seed{seed}.partial.jsonl"


def write_outputs(run: Backtest, summary: dict, out: Path) -> dict[str, Path]:
    """per_period.csv, summary.json and chart.png in ``out`` (the partial rows written as
    the run went are removed: per_period.csv holds them all)."""
    from smlrec.report import plot_backtest

    out.mkdir(parents=True, exist_ok=True)
    for seed in run.seeds:
        partial_path(out, seed).unlink(missing_ok=True)
    paths = {"csv": out / "per_period.csv", "summary": out / "summary.json",
             "chart": out / "chart.png"}
    run.results.to_csv(paths["csv"], index=False)
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=False,
                                           default=_jsonable) + "\n")
    plot_backtest(run.results, summary, paths["chart"])
    return paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def format_summary(summary: dict) -> str:
    """A plain-text table of the test-period figures."""
    seeds = summary.get("seeds", [0])
    head = (f"{'method':<10}{'params':<44}{'NDCG@20':>16}{'Recall@20':>16}{'vs floor [95% CI]':>24}"
            f"{'val NDCG':>10}{'train s':>9}")
    lines = [f"{summary['dataset']}: test periods, each method at its validation-chosen config "
             f"(mean ± sd over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
             head, "-" * len(head)]
    for m, v in summary["methods"].items():
        ci = v.get("ci95_vs_pop")
        vs = (f"{v['ratio_vs_pop']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and
              math.isfinite(v.get("ratio_vs_pop", math.nan)) else "-")
        lines.append(f"{m:<10}{json.dumps(v['params'], sort_keys=True)[:43]:<44}"
                     f"{v['ndcg@20']:>9.4f} ±{v['ndcg@20_sd']:.3f}"
                     f"{v['recall@20']:>9.4f} ±{v['recall@20_sd']:.3f}{vs:>24}"
                     f"{v['val_ndcg@20']:>10.4f}{v['train_seconds_last_period']:>9.2f}")
    r = summary.get("ratios") or ratios(summary)
    if "best_vs_floor" in r:
        ci = r.get("best_vs_floor_ci95")
        lines.append(f"best method by validation ({r['best_method']}) / popularity floor: "
                     f"{r['best_vs_floor']:.3f}" + (f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"
                                                    if ci else ""))
    if "ndcg_ratio_vs_best_baseline" in r:
        lines.append(f"SML NDCG@20 / best non-SML method by validation ({r['best_baseline']}): "
                     f"{r['ndcg_ratio_vs_best_baseline']:.3f}")
    if "time_ratio_vs_full" in r:
        lines.append(f"SML / Full-retrain training time at the last period: "
                     f"{r['time_ratio_vs_full']:.3f}")
    lines.append("chosen configurations (on validation periods):")
    lines += [f"  {m}: {json.dumps(v['params'], sort_keys=True)}"
              for m, v in summary["methods"].items()]
    periods = summary.get("periods") or []
    if periods:
        lines.append("users scored per period: " + ", ".join(
            f"{p['period']} ({p['phase']}) {p['n_users']}" for p in periods))
    lines += few_users_warnings(periods)
    return "\n".join(lines)


MIN_USERS = 20
"""Fewer evaluable users than this in a validation or test period make its figure noise."""


def few_users_warnings(periods: list[dict]) -> list[str]:
    """A warning per validation or test period with fewer than :data:`MIN_USERS` users."""
    out = []
    for phase, use in (("val", "choose a configuration"), ("test", "compare methods")):
        few = [p for p in periods if p.get("phase") == phase and p.get("n_users", 0) < MIN_USERS]
        if few:
            out.append(f"warning: {len(few)} {'validation' if phase == 'val' else 'test'} "
                       f"period(s) scored fewer than {MIN_USERS} returning users ("
                       + ", ".join(f"{p['period']}: {p['n_users']}" for p in few)
                       + f"): too few to {use} reliably; longer periods (--period-spec) or a "
                       "larger --split share for this phase give more")
    return out
