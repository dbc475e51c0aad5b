"""Freshness benchmark: per-event user updates and an FTRL reranker between daily runs,
measured by prequential replay on MovieLens-100k's weekly periods.

For every seed, the daily model of each period t is the SML challenger of
configs/ml-100k.yaml (its parameters and blend) as the daily run would serve it: trained
from W_0 through t - 1 (smlrec.online.daily_models, the backtest's protocol); one trained
sequence per seed serves every arm and grid point. Each period's events are then replayed
in time order, each first predicted and then learned (smlrec.online.prequential_replay),
for three arms: daily (no update), daily+user (a per-event user update rule) and
daily+user+ftrl (the same, its top-N reranked by an FTRL model learned on every event since
the first meta-training period). Every knob (the update rule; the reranker's FTRL
parameters, N and blend) is chosen on the validation periods by mean NDCG@20 over seeds;
test periods are reported: mean ± sd over seeds, and paired bootstrap 95% intervals of the
arms' ratios over test users (smlrec.metrics.paired_bootstrap). Writes
benchmarks/results/freshness.json and freshness.md, and the chosen rule into the
``freshness`` section of configs/ml-100k.yaml.

    python -m benchmarks.freshness                 # seeds 0,1,2, one process per core
    python -m benchmarks.freshness --no-config     # leave configs/ml-100k.yaml alone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.backtest import (
    CONFIGS,
    RESULTS,
    hardware,
    prepare,
    produced_by,
    provenance_line,
    update_run_config,
)
from smlrec import metrics
from smlrec import online as ol
from smlrec.backtest import IndexedPeriods, Split, _jsonable, auto_jobs, index_periods, mean_sd
from smlrec.config import DailyConfig, MFConfig
from smlrec.data.store import read_periods
from smlrec.device import configure_threads
from smlrec.side import SideFeatures, encode, load_side_tables
from smlrec.strategies import Defaults

DATASET = "ml-100k"
PRIMARY = "ndcg@20"
# The update rules tried. grad's step sizes come from a first look at seed 0's validation
# weeks (item vectors have norms near 10: steps above 0.1 overshoot); mean's decay spans slow
# to fast forgetting. A first run of this benchmark on a smaller grid (history 20, 100, 300;
# l2 0.1, 0.3; lr x steps 0.1 x 1, 0.03 x 3, 0.1 x 3, 0.03 x 5) chose its corner (300, 0.3,
# 0.03 x 5), and history 20 and 0.03 x 3 never won: the grid now reaches past that corner
# (history 1000 is every item of any ml-100k user). `none` (the daily arm) is always scored
# beside them.
_GRAD_STEPS = [(0.1, 1), (0.1, 3), (0.03, 5), (0.03, 10)]
USER_GRID: list[dict] = (
    [{"method": "mean", "decay": d} for d in (0.5, 0.7, 0.9)]
    + [{"method": "grad", "lr": lr, "steps": steps, "l2": l2, "history": h}
       for lr, steps in _GRAD_STEPS for l2 in (0.1, 0.3, 1.0) for h in (100, 300, 1000)])
# The FTRL reranker's grid, past the corner the first run chose (alpha 0.2, N 100, blend 3
# of alpha 0.05, 0.2; N 50, 100; blend 0.3, 1, 3; l1 0.1, 1). Its own choice (alpha 0.5,
# N 200) is at two edges again, but within 0.001 NDCG@20 of its neighbours: flat there.
FTRL_GRID: list[dict] = [
    {"alpha": alpha, "l1": l1, "candidates": n, "blend": blend}
    for alpha in (0.2, 0.5) for l1 in (0.1, 1.0) for n in (100, 200)
    for blend in (1.0, 3.0, 10.0)]
TIMED_EVENTS = 2000
UNKNOWN_USERS = ("users unknown to W_{t-1} get the model's popularity ranking in the daily "
                 "arm (its blend column alone: blend·log1p of the items' counts over the "
                 "last 4 weeks), all period; in the update arms they start from the mean of "
                 "their items' vectors after their first event. (The API's popular path "
                 "serves the last period's top-100 by count instead.)")


class Setting:
    """What every seed's replays read (sent once to each worker)."""

    def __init__(self, data: IndexedPeriods, times: list[np.ndarray], features: SideFeatures,
                 conf: DailyConfig, split: Split) -> None:
        self.data, self.times, self.features, self.conf, self.split = (data, times, features,
                                                                       conf, split)
        self.spec = conf.challenger("sml")
        self.prior_column = float(self.spec.params.get("blend", 0.0)) > 0
        p, n = split.pretrain, len(data.periods)
        self.val = list(range(p + split.meta, p + split.meta + split.val))
        self.test = list(range(n - split.test, n))
        self.warmup = p + 1  # the first period a trained daily model serves

    def models(self, seed: int) -> dict:
        """One seed's daily models (period -> W_{t-1})."""
        conf = self.conf
        return ol.daily_models(self.data.periods, self.data.sizes, self.spec,
                               Defaults(loss=conf.loss, mf=conf.mf, sml=conf.sml, seed=seed),
                               self.split.pretrain,
                               MFConfig(lr=conf.pretrain_lr, epochs=conf.pretrain_epochs),
                               self.split.meta, len(self.data.periods))

    def replay(self, served: dict, periods: list[int], rule: ol.UserUpdate, seed: int,
               ftrl: ol.FTRLConfig | None = None, timed: int = 0) -> ol.Replay:
        """The prequential replay of ``periods`` with one seed's daily models."""
        return ol.prequential_replay(self.data.periods, served, periods, rule, ftrl=ftrl,
                                     features=self.features, times=self.times,
                                     prior_column=self.prior_column, seed=seed,
                                     timed_events=timed)


def _rules_worker(setting: Setting, seed: int, grid: list[dict], queue: Any
                  ) -> tuple[dict, list[ol.Replay]]:
    """Round 1 of one seed: train the daily models, replay every update rule of ``grid`` on
    the validation and test periods."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    served = setting.models(seed)
    queue.put(("log", f"seed {seed}: daily models trained in {time.perf_counter() - start:.0f} s"))
    periods = setting.val + setting.test
    out = []
    for k, params in enumerate(grid):
        out.append(setting.replay(served, periods, ol.UserUpdate(**params), seed))
        queue.put(("log", f"seed {seed}: update rule {k + 1}/{len(grid)} {params}"))
    return served, out


def _ftrl_worker(setting: Setting, seed: int, served: dict, rule: ol.UserUpdate,
                 grid: list[dict], queue: Any) -> list[ol.Replay]:
    """Round 2 of one seed: the chosen rule with every FTRL configuration of ``grid``,
    replayed from the first period a trained daily model serves (the reranker warms up on
    the meta-training periods) through test."""
    torch.set_num_threads(1)
    periods = list(range(setting.warmup, len(setting.data.periods)))
    out = []
    for k, params in enumerate(grid):
        out.append(setting.replay(served, periods, rule, seed, ol.FTRLConfig(**params),
                                  timed=TIMED_EVENTS))
        queue.put(("log", f"seed {seed}: FTRL {k + 1}/{len(grid)} {params}"))
    return out


def _in_workers(worker: Any, calls: list[tuple], jobs: int, progress: bool) -> list:
    """``worker(*call, queue)`` for every call in spawned processes (their log lines
    printed unless ``progress`` is off)."""
    from smlrec.workers import run_in_workers

    def on_message(kind: str, value: Any) -> None:
        if progress:
            print(value, flush=True)

    return run_in_workers(worker, calls, jobs, on_message)


# ----------------------------------------------------------------------------- figures


def seed_means(replays: list[ol.Replay], periods: list[int], arm: str, group: str = "all",
             metric: str = PRIMARY) -> np.ndarray:
    """Each seed's event mean of ``metric`` for ``arm`` over ``periods``."""
    return np.array([r.means(periods)[arm][group][metric] for r in replays])


def choose(grid_replays: list[list[ol.Replay]], periods: list[int], arm: str
           ) -> tuple[int, list[dict]]:
    """The grid point with the best mean validation NDCG@20 over seeds (the first on ties),
    and every point's validation mean and spread. ``grid_replays[seed][point]``."""
    rows = []
    for k in range(len(grid_replays[0])):
        mean, sd = mean_sd(seed_means([seeds[k] for seeds in grid_replays], periods, arm))
        rows.append({"val": mean, "val_sd": sd})
    best = max(range(len(rows)), key=lambda k: (np.nan_to_num(rows[k]["val"], nan=-1), -k))
    return best, rows


def _user_sums(replays: list[ol.Replay], arm: str, t: int, group: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each user's summed NDCG@20 over their events of period t (mean over seeds), users
    sorted; ``group`` keeps returning or new users only."""
    r0 = replays[0]
    keep = r0.t == t
    if group != "all":
        keep &= r0.new if group == "new" else ~r0.new
    users, inv = np.unique(r0.user[keep], return_inverse=True)
    sums = np.mean([np.bincount(inv, weights=r.ndcg[arm][keep], minlength=len(users))
                    for r in replays], axis=0)
    return users, sums


def ratio_ci(replays: list[ol.Replay], periods: list[int], num: str, den: str, group: str,
             n_boot: int = 2000) -> dict:
    """Event-mean NDCG@20 of arm ``num`` over arm ``den`` on ``periods``, with a paired
    bootstrap 95% interval that resamples users within each period (a user's events move
    together): units are (period, user) with their summed NDCG@20, each period weighted by
    its users, so the statistic is exactly the ratio of event means."""
    a, b, w = [], [], []
    for t in periods:
        users, x = _user_sums(replays, num, t, group)
        _, y = _user_sums(replays, den, t, group)
        if len(users):
            a.append(x)
            b.append(y)
            w.append(len(users))
    r = metrics.paired_bootstrap(a, b, w, n_boot=n_boot, seed=0)
    return {"ratio": r["ratio"], "ci95": [r["low"], r["high"]],
            "p_not_better": r["p_not_better"], "n_users": r["n_units"]}


def arm_table(replays: list[ol.Replay], periods: list[int]) -> dict:
    """Per arm and group: NDCG@20 and Recall@20 (mean ± sd over seeds of the event means)
    and the number of events."""
    out: dict = {}
    for arm in replays[0].ndcg:
        out[arm] = {}
        for group in ("all", "returning", "new"):
            entry = {"n_events": replays[0].means(periods)[arm][group]["n_events"]}
            for metric in ("ndcg@20", "recall@20"):
                mean, sd = mean_sd(seed_means(replays, periods, arm, group, metric))
                entry[metric], entry[f"{metric}_sd"] = mean, sd
            out[arm][group] = entry
    return out


def summarize(setting: Setting, seeds: list[int], rule_runs: list[list[ol.Replay]],
              ftrl_runs: list[list[ol.Replay]], rule_pick: int, ftrl_pick: int,
              rule_rows: list[dict], ftrl_rows: list[dict]) -> dict:
    """The freshness.json document (test figures of the validation choices)."""
    test, val = setting.test, setting.val
    chosen = [runs[ftrl_pick] for runs in ftrl_runs]
    for k, row in enumerate(rule_rows):
        row["params"] = USER_GRID[k]
        row["test"], row["test_sd"] = mean_sd(seed_means([r[k] for r in rule_runs], test,
                                                       "daily+user"))
    for k, row in enumerate(ftrl_rows):
        row["params"] = FTRL_GRID[k]
        row["test"], row["test_sd"] = mean_sd(seed_means([r[k] for r in ftrl_runs], test,
                                                       "daily+user+ftrl"))
    ratios = {}
    for name, num, den in (("daily+user / daily", "daily+user", "daily"),
                           ("daily+user+ftrl / daily+user", "daily+user+ftrl", "daily+user"),
                           ("daily+user+ftrl / daily", "daily+user+ftrl", "daily")):
        ratios[name] = {g: ratio_ci(chosen, test, num, den, g)
                        for g in ("all", "returning", "new")}
    goal = ratios["daily+user / daily"]["all"]
    sparsity = [r.sparsity for r in chosen]
    rates = [r.events_per_second() for r in chosen]
    return {
        "dataset": DATASET, "seeds": seeds, "primary_metric": PRIMARY,
        "split": setting.split.model_dump(),
        "periods": {"val": [setting.data.periods[t].period for t in val],
                    "test": [setting.data.periods[t].period for t in test],
                    "ftrl_warmup_from": setting.data.periods[setting.warmup].period},
        "daily_model": setting.spec.model_dump(),
        "protocol": ("prequential: each event first predicted (every item W_{t-1} knows "
                     "ranked, the user's earlier items excluded, ties by item row) then "
                     "learned; NDCG@20 = 1/log2(rank+2) within the top 20, Recall@20 = hit; "
                     "items unknown to W_{t-1} are misses in every arm; repeats of an item "
                     "the user had are learned, not scored. Means over events. "
                     + UNKNOWN_USERS),
        "chosen": {"user_update": ol.UserUpdate(**USER_GRID[rule_pick]).model_dump(),
                   "ftrl": ol.FTRLConfig(**FTRL_GRID[ftrl_pick]).model_dump(),
                   "chosen_on": "validation periods, mean NDCG@20 over seeds"},
        "val": arm_table(chosen, val),
        "test": arm_table(chosen, test),
        "ratios": ratios,
        "goal": {"target": 1.05, "ratio": goal["ratio"], "ci95": goal["ci95"],
                 "met": bool(goal["ratio"] >= 1.05), "met_by_ci_low": bool(goal["ci95"][0]
                                                                          >= 1.05)},
        "ftrl_sparsity": {"share": float(np.mean([s["share"] for s in sparsity])),
                          "nonzero": float(np.mean([s["nonzero"] for s in sparsity])),
                          "total": float(np.mean([s["total"] for s in sparsity])),
                          "per_seed": sparsity},
        "events_per_second": {k: float(np.mean([r[k] for r in rates])) for k in rates[0]},
        "grid": {"user_update": rule_rows, "ftrl": ftrl_rows},
    }


def table(s: dict) -> str:
    """The test figures as plain text."""
    lines = [f"{s['dataset']}: test periods {s['periods']['test'][0]} to "
             f"{s['periods']['test'][-1]}, prequential replay (mean ± sd over seeds "
             f"{', '.join(map(str, s['seeds']))}; means over events)"]
    head = f"{'arm':<18}{'group':<11}{'events':>7}{'NDCG@20':>18}{'Recall@20':>18}"
    lines += [head, "-" * len(head)]
    for arm, groups in s["test"].items():
        for group, e in groups.items():
            lines.append(f"{arm:<18}{group:<11}{e['n_events']:>7}"
                         f"{e['ndcg@20']:>11.4f} ±{e['ndcg@20_sd']:.4f}"
                         f"{e['recall@20']:>11.4f} ±{e['recall@20_sd']:.4f}")
    lines.append("ratios of NDCG@20 (paired bootstrap 95% CI over test users):")
    for name, groups in s["ratios"].items():
        lines.append(f"  {name:<30}" + "  ".join(
            f"{g} {r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            for g, r in groups.items()))
    g = s["goal"]
    lines.append(f"goal daily+user >= 1.05x daily NDCG@20: {g['ratio']:.3f} "
                 f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]: "
                 + ("met" if g["met"] else "not met")
                 + (" (interval above 1.05 too)" if g["met_by_ci_low"] else ""))
    sp, eps = s["ftrl_sparsity"], s["events_per_second"]
    lines.append(f"FTRL weights non-zero: {sp['share']:.3f} of the {sp['total']:.0f} "
                 "features updated (mean over seeds)")
    lines.append("update path, events/s (one thread): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in eps.items()))
    c = s["chosen"]
    lines.append(f"chosen on validation: user_update {json.dumps(c['user_update'])}; "
                 f"ftrl {json.dumps(c['ftrl'])}")
    lines.append(s["protocol"])
    return "\n".join(lines)


def markdown(s: dict) -> str:
    hw = s["hardware"]
    lines = ["# Freshness between daily runs: per-event user updates and an FTRL reranker",
             "", f"Measured on {hw['cpu']} ({hw['cpu_count']} cores, one torch thread per "
             f"seed), torch {hw['torch']}; wall time {s['wall_seconds']:.0f} s. Daily model: "
             f"the SML challenger of configs/{DATASET}.yaml "
             f"(`{json.dumps(s['daily_model']['params'], sort_keys=True)}`), retrained "
             "every week from W_0 as the daily run would; validation weeks "
             f"{', '.join(s['periods']['val'])}; test weeks {', '.join(s['periods']['test'])}; "
             f"the FTRL reranker learns from {s['periods']['ftrl_warmup_from']} on. "
             "Reproduce: `python -m benchmarks.freshness` (part of `make bench`).", "",
             provenance_line(s.get("produced_by")), "", s["protocol"], "",
             "| arm | users | events | NDCG@20 | Recall@20 |", "|---|---|---|---|---|"]
    for arm, groups in s["test"].items():
        for group, e in groups.items():
            lines.append(f"| {arm} | {group} | {e['n_events']} | {e['ndcg@20']:.4f} ± "
                         f"{e['ndcg@20_sd']:.4f} | {e['recall@20']:.4f} ± "
                         f"{e['recall@20_sd']:.4f} |")
    lines += ["", "Ratios of NDCG@20 on test weeks, with paired bootstrap 95% intervals "
              "(users resampled within each week, seeds averaged per user):", "",
              "| ratio | all | returning users | new users |", "|---|---|---|---|"]
    for name, groups in s["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            for r in groups.values()) + " |")
    g, sp, eps = s["goal"], s["ftrl_sparsity"], s["events_per_second"]
    lines += ["", f"- **Goal** (per-event user updates ≥ 1.05x daily-only NDCG@20): "
              f"{g['ratio']:.3f} [95% CI {g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]: "
              + ("**met**" if g["met"] else "**not met**")
              + ("; the whole interval is above 1.05" if g["met_by_ci_low"] else "")
              + f". Returning users alone: "
              f"{s['ratios']['daily+user / daily']['returning']['ratio']:.3f}.",
              f"- FTRL weights: {sp['share']:.3f} non-zero of the {sp['total']:.0f} "
              "features the stream updated (mean over seeds).",
              "- Update path, events per second on one thread: " + ", ".join(
                  f"{k} {v:,.0f}" for k, v in eps.items()) + ".",
              f"- Chosen on validation: user update `{json.dumps(s['chosen']['user_update'])}`"
              f"; FTRL `{json.dumps(s['chosen']['ftrl'])}`.", "",
              "Every configuration tried (NDCG@20 of its arm, mean ± sd over seeds; the row "
              "with the best validation figure was chosen):", "",
              "| grid | params | val | test |", "|---|---|---|---|"]
    for grid, rows in s["grid"].items():
        for row in rows:
            lines.append(f"| {grid} | `{json.dumps(row['params'], sort_keys=True)}` | "
                         f"{row['val']:.4f} ± {row['val_sd']:.4f} | "
                         f"{row['test']:.4f} ± {row['test_sd']:.4f} |")
    if s.get("api"):
        lines += ["", *api_lines(s["api"])]
    return "\n".join(lines) + "\n"


def api_lines(api: dict) -> list[str]:
    """The API's side (``benchmarks/feedback.py``'s figures, kept under ``api``)."""
    v = api["visibility_under_load"]
    return ["## The API: events in, per-event updates served", "",
            f"From `python -m benchmarks.feedback` ({api['date']}; details in feedback.md): "
            f"`POST /feedback`, each event fsynced to the log before the answer, states "
            f"pushed to Feast's online store. Single-event requests: "
            f"{api['single_events_per_s']:,.0f} events/s, p99 {api['single_p99_ms']:.1f} ms "
            f"(concurrency 32); best with p99 < 50 ms: {api['best_events_per_s']:,.0f} "
            f"events/s ({api['best_events_per_request']} events per request). An event was "
            f"visible in its user's /recommend after p50 {v['p50_ms']:.0f} ms, max "
            f"{v['max_ms']:.0f} ms, under {v['events_per_s']:,.0f} events/s.", "",
            f"**{api['line']}**"]


def keep_api(summary: dict) -> dict:
    """``summary`` with the API figures of the freshness.json it replaces."""
    old = RESULTS / "freshness.json"
    if old.exists() and "api" in (previous := json.loads(old.read_text())):
        summary["api"] = previous["api"]
    return summary


def write_freshness_config(summary: dict) -> Path:
    """Add the rule chosen on validation to configs/ml-100k.yaml's ``freshness`` section
    (and its figures to ``selection``), keeping the rest as it is (as the cold-start
    benchmark writes ``cold``)."""
    from smlrec.config import FreshnessConfig

    c = summary["chosen"]
    fresh = FreshnessConfig(user_update=c["user_update"], ftrl=c["ftrl"],
                            chosen_on=f"{c['chosen_on']} ({', '.join(map(str, summary['seeds']))})"
                            f", prequential replay of {', '.join(summary['periods']['val'])}")
    return update_run_config(DATASET, "freshness", fresh, {
        "chosen_on": fresh.chosen_on,
        "figures": {arm: {"val_ndcg@20": summary["val"][arm]["all"][PRIMARY],
                          "test_ndcg@20": summary["test"][arm]["all"][PRIMARY]}
                    for arm in summary["test"]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="every figure is a mean over these")
    ap.add_argument("--jobs", type=int, default=0, help="seeds side by side in this many "
                    "processes (0: one per seed up to the cores)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-config", action="store_true",
                    help=f"do not write the chosen rule into configs/{DATASET}.yaml")
    args = ap.parse_args()
    configure_threads()
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = args.jobs or auto_jobs(len(seeds), "cpu")
    start = time.perf_counter()
    root = prepare(DATASET)
    frame = read_periods(root)
    data = index_periods(frame)
    users, items = load_side_tables(root)
    setting = Setting(data, ol.period_times(frame), encode(users, items, data.users, data.items),
                      DailyConfig.load(str(CONFIGS / f"{DATASET}.yaml")),
                      Split.default(len(data.periods)))
    progress = not args.no_progress
    round1 = _in_workers(_rules_worker, [(setting, s, USER_GRID) for s in seeds], jobs,
                         progress)
    served = [r[0] for r in round1]
    rule_runs = [r[1] for r in round1]
    rule_pick, rule_rows = choose(rule_runs, setting.val, "daily+user")
    rule = ol.UserUpdate(**USER_GRID[rule_pick])
    print(f"update rule chosen on validation: {rule.model_dump()}", flush=True)
    # each seed's FTRL grid in two halves, so that no core idles while the last seed runs
    half = len(FTRL_GRID) // 2
    chunks = [FTRL_GRID[:half], FTRL_GRID[half:]] if half else [FTRL_GRID]
    done = _in_workers(_ftrl_worker, [(setting, s, w, rule, chunk) for s, w in
                                      zip(seeds, served, strict=True) for chunk in chunks],
                       jobs, progress)
    ftrl_runs = [sum(done[k * len(chunks):(k + 1) * len(chunks)], []) for k in
                 range(len(seeds))]
    ftrl_pick, ftrl_rows = choose(ftrl_runs, setting.val, "daily+user+ftrl")
    summary = summarize(setting, seeds, rule_runs, ftrl_runs, rule_pick, ftrl_pick,
                        rule_rows, ftrl_rows)
    summary["wall_seconds"] = time.perf_counter() - start
    summary["hardware"] = hardware(torch.device("cpu"))
    summary["jobs"] = jobs
    summary["produced_by"] = produced_by()
    print(table(summary))
    keep_api(summary)
    (RESULTS / "freshness.json").write_text(json.dumps(summary, indent=2, default=_jsonable)
                                            + "\n")
    (RESULTS / "freshness.md").write_text(markdown(summary))
    print(f"wrote {RESULTS / 'freshness.json'} and {RESULTS / 'freshness.md'} "
          f"({summary['wall_seconds']:.0f} s)")
    if not args.no_config:
        print(f"wrote the freshness section of {write_freshness_config(summary)}")


if __name__ == "__main__":
    main()
