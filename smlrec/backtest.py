"""The backtest protocol: replay periods in order and test each model on the next period.

Periods are split, in time order, into pretraining (W_0 trained normally), meta-training
(every strategy updates; SML learns Θ with Algorithm 1), validation (hyper-parameters are
chosen here, and only here) and test (reported). Every strategy is evaluated on period t
with the model it produced after period t-1 ("test on the next period"), on the users and
items that model already knows, excluding the items each user interacted with before.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm.auto import tqdm

from smlrec import metrics
from smlrec.config import LossConfig, MFConfig, SMLConfig, _Config
from smlrec.schema import ITEM, PERIOD, USER
from smlrec.strategies import (
    METHODS,
    SML,
    FineTune,
    FullRetrain,
    PeriodData,
    Popularity,
    SlidingWindow,
    Strategy,
    concat,
    pretrain,
)
from smlrec.vocab import Vocab

PHASES = ("pretrain", "meta", "val", "test")
PRIMARY = "ndcg@20"


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


# Candidate hyper-parameters per method. Chosen by validation NDCG@20 only.
DEFAULT_GRIDS: dict[str, list[dict]] = {
    "sml": [{"outer_steps": 1}, {"outer_steps": 3},
            {"outer_steps": 3, "schedule": "official"},
            {"outer_steps": 3, "theta_init": "identity"}],
    "full": [{"epochs": 1}, {"epochs": 5}, {"epochs": 20}],
    "finetune": [{"epochs": 1}, {"epochs": 5}, {"epochs": 20}],
    "window": [{"window": 3, "epochs": 5}, {"window": 3, "epochs": 20}],
    "pop": [{}],
}


class BacktestConfig(_Config):
    """Everything a backtest run depends on."""

    methods: list[str] = Field(default_factory=lambda: ["sml", "full", "finetune", "window",
                                                        "pop"])
    split: Split | None = Field(None, description="Phase sizes; default scales 10/12/3/7 of 32.")
    grids: dict[str, list[dict]] = Field(default_factory=lambda: DEFAULT_GRIDS)
    pretrain_epochs: int = Field(20, ge=1, description="Epochs of MF training for W_0.")
    mf_lr: float = Field(1e-2, gt=0, description="Adam learning rate of MF training.")
    loss: LossConfig = Field(default_factory=LossConfig)
    sml: SMLConfig = Field(default_factory=SMLConfig)
    ks: tuple[int, ...] = (5, 10, 20)
    n_negatives: int = Field(999, ge=1, description="Negatives per positive, sampled protocol.")
    sampled_max_positives: int = Field(
        5000, ge=1, description="Sampled protocol: at most this many test positives per period "
        "(a seeded uniform subsample; the full-ranking metrics always use every positive).")
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def build_strategy(method: str, params: dict, cfg: BacktestConfig) -> Strategy:
    """Instantiate ``method`` with one point of its grid."""
    common = {"loss": cfg.loss, "seed": cfg.seed, "device": cfg.device}
    params = dict(params)
    if method == "sml":
        return SML(sml=cfg.sml.model_copy(update=params), **common)
    if method == "pop":
        return Popularity(**common)
    if method in ("full", "finetune", "window"):
        mf = MFConfig(lr=cfg.mf_lr, epochs=params.pop("epochs", 1))
        cls = {"full": FullRetrain, "finetune": FineTune, "window": SlidingWindow}[method]
        return cls(mf=mf, **common, **params)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass
class IndexedPeriods:
    """Periods as table rows, with the vocabulary sizes known after each period."""

    periods: list[PeriodData]
    n_users_after: list[int]
    n_items_after: list[int]
    users: Vocab = field(repr=False)
    items: Vocab = field(repr=False)


def index_periods(frame: pd.DataFrame) -> IndexedPeriods:
    """Grow the vocabularies period by period, as production would, and index every row."""
    users, items = Vocab(), Vocab()
    out, nu, ni = [], [], []
    for pid, part in frame.groupby(PERIOD, sort=True):
        users.add(part[USER])
        items.add(part[ITEM])
        out.append(PeriodData(str(pid), users.lookup(part[USER]), items.lookup(part[ITEM])))
        nu.append(len(users))
        ni.append(len(items))
    return IndexedPeriods(out, nu, ni, users, items)


def evaluate(strategy: Strategy, test: PeriodData, history: list[PeriodData], n_users: int,
             n_items: int, cfg: BacktestConfig, seed: int, sampled: bool = True
             ) -> dict[str, float]:
    """Metrics of ``strategy``'s current model on period ``test`` (known users and items).

    Full ranking always; the sampled protocol (and AUC) only when ``sampled``.
    """
    keep = (test.users < n_users) & (test.items < n_items)
    tu, ti = test.users[keep], test.items[keep]
    hu, hi = concat(history)
    w, prior = strategy.weights(), strategy.item_prior()
    if w is not None:
        scorer = metrics.mf_scorer(w.user[:n_users], w.item[:n_items])
        pair = metrics.mf_pair_scorer(w.user[:n_users], w.item[:n_items])
    elif prior is not None:
        scorer = metrics.popularity_scorer(prior[:n_items])
        pair = metrics.popularity_pair_scorer(prior[:n_items])
    else:
        raise RuntimeError(f"strategy {strategy.name} has no model yet")
    out = metrics.full_ranking(scorer, tu, ti, n_items, hu, hi, ks=cfg.ks)
    if sampled:
        if len(tu) > cfg.sampled_max_positives:
            pick = np.random.default_rng(seed).choice(len(tu), cfg.sampled_max_positives,
                                                      replace=False)
            tu, ti = tu[pick], ti[pick]
        res = metrics.sampled_ranking(pair, tu, ti, n_items, hu, hi,
                                      n_negatives=cfg.n_negatives, ks=(20,), seed=seed)
        out.update({f"sampled_{k}": v for k, v in res.items() if not k.startswith("n_")})
        out["auc"] = out.pop("sampled_auc")
    return out


def run_backtest(frame: pd.DataFrame, cfg: BacktestConfig,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run every method (each point of its grid) through all periods. One row per
    (method, config, evaluated period): phase, metrics, and the seconds the update after
    that period took (``train_seconds``)."""
    data = index_periods(frame)
    n = len(data.periods)
    split = cfg.split or Split.default(n)
    if split.pretrain + split.meta + split.val + split.test != n:
        raise ValueError(f"split {split.model_dump()} does not add up to the {n} periods")
    device = torch.device(cfg.device)
    p = split.pretrain
    log(f"{n} periods: pretrain {split.pretrain}, meta-train {split.meta}, "
        f"validation {split.val}, test {split.test}; device {device}")
    t0 = time.perf_counter()
    w0 = pretrain(data.periods[:p], data.n_users_after[p - 1], data.n_items_after[p - 1],
                  MFConfig(lr=cfg.mf_lr, epochs=cfg.pretrain_epochs), cfg.loss, cfg.seed,
                  device, progress=cfg.progress)
    log(f"pretrained W_0 on {sum(map(len, data.periods[:p]))} positives "
        f"in {time.perf_counter() - t0:.1f} s")

    runs = []
    for method in cfg.methods:
        for cid, params in enumerate(cfg.grids.get(method, [{}])):
            s = build_strategy(method, params, cfg)
            s.start(w0)
            runs.append((method, cid, params, s))

    rows = []
    bar = tqdm(range(p, n), desc="periods", disable=not cfg.progress, unit="period")
    for t in bar:
        history = data.periods[: t + 1]
        nu_prev, ni_prev = data.n_users_after[t - 1], data.n_items_after[t - 1]
        for method, cid, params, s in runs:
            row = {"method": method, "config": cid, "params": json.dumps(params),
                   "period": data.periods[t].period, "t": t, "phase": split.phase(t)}
            if t > p:  # models after period t-1 exist from here on
                row.update(evaluate(s, data.periods[t], history[:-1], nu_prev, ni_prev, cfg,
                                    seed=cfg.seed * 7919 + t,
                                    sampled=row["phase"] in ("val", "test")))
            start = time.perf_counter()
            row.update(s.update(history, data.n_users_after[t], data.n_items_after[t]))
            row["train_seconds"] = time.perf_counter() - start
            rows.append(row)
        bar.set_postfix_str(data.periods[t].period)
    return pd.DataFrame(rows)


def select_configs(results: pd.DataFrame, metric: str = PRIMARY) -> dict[str, int]:
    """For each method, the config with the best weighted ``metric`` on validation periods."""
    chosen = {}
    val = results[results["phase"] == "val"]
    for method, part in val.groupby("method", sort=False):
        scores = {cid: _weighted(g, metric) for cid, g in part.groupby("config")}
        chosen[method] = max(scores, key=lambda c: (np.nan_to_num(scores[c], nan=-1), -c))
    return chosen


def _weighted(part: pd.DataFrame, metric: str) -> float:
    w = part["n_interactions"].fillna(0).to_numpy(float)
    v = part[metric].to_numpy(float)
    ok = (w > 0) & np.isfinite(v)
    return float((w[ok] * v[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


def summarize(results: pd.DataFrame, chosen: dict[str, int], dataset: str) -> dict:
    """The summary.json document: test-period figures of each method's chosen config."""
    out = {"dataset": dataset, "primary_metric": PRIMARY, "methods": {}}
    for method, cid in chosen.items():
        part = results[(results["method"] == method) & (results["config"] == cid)]
        test = part[part["phase"] == "test"]
        val = part[part["phase"] == "val"]
        out["methods"][method] = {
            "ndcg@20": _weighted(test, "ndcg@20"),
            "recall@20": _weighted(test, "recall@20"),
            "auc": _weighted(test, "auc"),
            "sampled_ndcg@20": _weighted(test, "sampled_ndcg@20"),
            "sampled_recall@20": _weighted(test, "sampled_recall@20"),
            "val_ndcg@20": _weighted(val, "ndcg@20"),
            "train_seconds_last_period": float(part["train_seconds"].iloc[-1]),
            "train_seconds_mean_test": float(test["train_seconds"].mean()),
            "params": json.loads(part["params"].iloc[0]),
            "n_test_interactions": int(test["n_interactions"].sum()),
        }
    return out


def ratios(summary: dict) -> dict:
    """SML against the best baseline (quality) and against Full-retrain (time)."""
    m = summary["methods"]
    out = {}
    if "sml" in m:
        baselines = {k: v[PRIMARY] for k, v in m.items()
                     if k != "sml" and not math.isnan(v[PRIMARY])}
        if baselines:
            best = max(baselines, key=baselines.get)
            out["best_baseline"] = best
            out["ndcg_ratio_vs_best_baseline"] = m["sml"][PRIMARY] / baselines[best]
        if "full" in m:
            out["time_ratio_vs_full"] = (m["sml"]["train_seconds_last_period"]
                                         / m["full"]["train_seconds_last_period"])
    return out


def write_outputs(results: pd.DataFrame, summary: dict, out: Path) -> dict[str, Path]:
    """per_period.csv, summary.json and chart.png in ``out``."""
    from smlrec.report import plot_backtest

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "per_period.csv", "summary": out / "summary.json",
             "chart": out / "chart.png"}
    results.to_csv(paths["csv"], index=False)
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    plot_backtest(results, summary, paths["chart"])
    return paths


def format_summary(summary: dict) -> str:
    """A plain-text table of the test-period figures."""
    head = (f"{'method':<10}{'params':<34}{'NDCG@20':>9}{'Recall@20':>11}{'AUC':>8}"
            f"{'val NDCG':>10}{'train s (last)':>16}")
    lines = [f"{summary['dataset']}: test periods, each method at its validation-chosen config",
             head, "-" * len(head)]
    for m, v in summary["methods"].items():
        lines.append(f"{m:<10}{json.dumps(v['params'])[:33]:<34}{v['ndcg@20']:>9.4f}"
                     f"{v['recall@20']:>11.4f}{v['auc']:>8.4f}{v['val_ndcg@20']:>10.4f}"
                     f"{v['train_seconds_last_period']:>16.3f}")
    r = summary.get("ratios") or ratios(summary)
    if "ndcg_ratio_vs_best_baseline" in r:
        lines.append(f"SML NDCG@20 / best baseline ({r['best_baseline']}): "
                     f"{r['ndcg_ratio_vs_best_baseline']:.3f}")
    if "time_ratio_vs_full" in r:
        lines.append(f"SML / Full-retrain training time at the last period: "
                     f"{r['time_ratio_vs_full']:.3f}")
    return "\n".join(lines)
