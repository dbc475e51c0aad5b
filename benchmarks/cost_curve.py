"""Retraining cost curve: training seconds per period as history grows, per method.

A synthetic drifting stream (smlrec.data.synthetic) of ``--periods`` daily periods after the
pretraining periods. SML, Full-retrain (all history up to t), Fine-tune (D_t from W_{t-1})
and the sliding window each run at the settings the synthetic backtest chose on its
validation periods (benchmarks/results/backtest.json, the same selection that wrote
configs/synthetic.yaml); every strategy starts from the same pretrained W_0. For every period
t = 1..N the wall seconds of the strategy's ``update`` after D_t closed are timed: the
training, the transfer and the meta-update (SML's step 2 on D_t), the table growth and the
blend's popularity refresh; evaluation is not timed. The methods take turns within each
period (the order rotates), so machine load falls on all of them alike. Torch runs one
thread per process (``$SMLREC_THREADS``); seeds run one after another (``--jobs`` runs
them side by side).
Each model is also scored on the next period (NDCG@20 and Recall@20, full ranking over known
items, returning users, as in the backtest), so the cost can be read beside the quality.

Verdicts: SML's time per period is flat (mean of the last quarter of the periods over the
mean of the first quarter at most 1.2x), and SML's time is at most 0.2x Full-retrain's at
the last period (mean over the last five periods). SML's time is also split by phase
(table growth, step 2, step 1, the transfer of every row, the popularity refresh) to show
which part, if any, grows with history.

    python -m benchmarks.cost_curve                  # 100 periods, seeds 0,1,2
    python -m benchmarks.cost_curve --smoke          # a few small periods, one seed, to a temp dir
    python -m benchmarks.cost_curve --periods 50 --seeds 0 --out /tmp/cost
    python -m benchmarks.cost_curve --resummarize benchmarks/results/cost_curve.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.backtest import CONFIGS, RESULTS, hardware, produced_by, provenance_line
from smlrec import backtest as bt
from smlrec.config import DailyConfig, MFConfig
from smlrec.data.synthetic import generate_stream
from smlrec.device import configure_threads
from smlrec.strategies import SML, Defaults, Strategy, build_strategy, concat, pretrain

METHODS = ("sml", "full", "finetune", "window")
LABELS = {"sml": "SML", "full": "Full-retrain", "finetune": "Fine-tune",
          "window": "Sliding window"}
# The stream: a fixed number of active users a period (70% returning), so each period has
# the same size while the user vocabulary grows by about 60 new users a period.
STREAM = {"n_items": 1000, "interactions_per_period": 2000, "returning_share": 0.7,
          "drift": 0.3, "seed": 0}
ACTIVE_USERS = 200
SMOKE = {"periods": 4, "seeds": (0,), "interactions_per_period": 400, "pretrain_periods": 2}
BACKTEST_JSON = RESULTS / "backtest.json"
FLAT_LIMIT = 1.2  # SML's last-quarter mean over its first-quarter mean
RATIO_LIMIT = 0.2  # SML over Full-retrain at the last period
LAST = 5  # "at the last period": the mean over this many last periods
SML_PHASES = ("begin_period", "meta_update", "learn", "transfer", "refresh_prior")


# ------------------------------------------------------------------------------ settings


def chosen_settings(backtest_json: Path = BACKTEST_JSON,
                    config: Path = CONFIGS / "synthetic.yaml") -> dict[str, Any]:
    """The validation-chosen parameters of each method on the synthetic stream, and the
    defaults they fall back to (configs/synthetic.yaml: the ``sml``, ``loss`` and ``mf``
    sections, the pretraining epochs and learning rate).

    The parameters come from the synthetic backtest's summary (each method's configuration
    with the best validation NDCG@20, mean over seeds); SML's is checked against the SML
    challenger of the run configuration written from the same selection."""
    conf = DailyConfig.load(str(config))
    chosen = json.loads(backtest_json.read_text())["datasets"]["synthetic"]["methods"]
    missing = [m for m in METHODS if m not in chosen]
    if missing:
        raise ValueError(f"{backtest_json} has no chosen configuration for {missing}")
    params = {m: dict(chosen[m]["params"]) for m in METHODS}
    run_sml = next((c.params for c in conf.challengers if c.method == "sml"), None)
    if run_sml is not None and dict(run_sml) != params["sml"]:
        raise ValueError(f"SML's chosen parameters differ between {backtest_json.name} "
                         f"({params['sml']}) and {config.name} ({dict(run_sml)})")
    return {"params": params, "sml": conf.sml.model_dump(), "loss": conf.loss.model_dump(),
            "mf": conf.mf.model_dump(), "pretrain_epochs": conf.pretrain_epochs,
            "pretrain_lr": conf.pretrain_lr,
            "source": f"benchmarks/results/{backtest_json.name} (synthetic: each method's "
            f"validation-chosen configuration), defaults from configs/{config.name}",
            "selection": conf.selection.get("chosen_on", ""),
            "selected_at": conf.selection.get("written_at", "")}


def defaults(settings: dict, seed: int) -> Defaults:
    from smlrec.config import LossConfig, SMLConfig

    return Defaults(loss=LossConfig(**settings["loss"]), mf=MFConfig(**settings["mf"]),
                    sml=SMLConfig(**settings["sml"]), seed=seed)


# ------------------------------------------------------------------------------ the stream


def stream_params(periods: int, pretrain_periods: int,
                  interactions_per_period: int = STREAM["interactions_per_period"],
                  active_users: int = ACTIVE_USERS) -> dict:
    """The generator's arguments for ``pretrain_periods`` + ``periods`` + 1 periods (the last
    one only scores the model of the period before it)."""
    n = pretrain_periods + periods + 1
    share = STREAM["returning_share"]
    n_users = int(round(active_users * (1 + (n - 1) * (1 - share))))
    return {**STREAM, "n_users": n_users, "n_periods": n,
            "interactions_per_period": interactions_per_period}


def make_stream(params: dict) -> bt.IndexedPeriods:
    return bt.index_periods(generate_stream(**params))


# ------------------------------------------------------------------------------ timing


class PhaseClock:
    """Wall seconds spent in some methods of one object, nested calls counted once (a
    method's own time excludes the wrapped methods it calls)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, obj: Any, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.totals[name] += spent - self._inner.pop()
                if self._inner:
                    self._inner[-1] += spent

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def run_seed(data: bt.IndexedPeriods, settings: dict, seed: int, periods: int,
             pretrain_periods: int, score: bool = True,
             log: Callable[[str], None] = print) -> list[dict]:
    """One seed: pretrain W_0, then every method through ``periods`` periods, timed. One
    row per (method, period)."""
    p = pretrain_periods
    if len(data.periods) < p + periods + (1 if score else 0):
        raise ValueError(f"the stream has {len(data.periods)} periods, fewer than needed")
    start = time.perf_counter()
    w0 = pretrain(data.periods[:p], data.n_users_after[p - 1], data.n_items_after[p - 1],
                  MFConfig(lr=settings["pretrain_lr"], epochs=settings["pretrain_epochs"]),
                  defaults(settings, seed).loss, seed)
    log(f"seed {seed}: W_0 on {sum(map(len, data.periods[:p])):,} positives in "
        f"{time.perf_counter() - start:.1f} s")
    strategies: dict[str, Strategy] = {}
    clocks: dict[str, PhaseClock] = {}
    for m in METHODS:
        s = build_strategy(m, settings["params"][m], defaults(settings, seed))
        s.start(w0)
        clocks[m] = PhaseClock()
        for name in (SML_PHASES if isinstance(s, SML) else ("refresh_prior",)):
            clocks[m].wrap(s, name)
        strategies[m] = s
    cfg = bt.BacktestConfig(ks=(20,), progress=False)
    rows: list[dict] = []
    history_rows = sum(map(len, data.periods[:p]))
    for k in range(1, periods + 1):
        t = p + k - 1
        history = data.periods[: t + 1]
        history_rows += len(data.periods[t])
        nu, ni = data.n_users_after[t], data.n_items_after[t]
        hu, hi = concat(history) if score else (None, None)
        order = METHODS[k % len(METHODS):] + METHODS[:k % len(METHODS)]
        for m in order:
            s = strategies[m]
            gc.collect()
            start = time.perf_counter()
            out = s.update(history, nu, ni)
            seconds = time.perf_counter() - start
            phases = clocks[m].take()
            row = {"seed": seed, "method": m, "period": k, "t": t,
                   "period_id": data.periods[t].period, "history_rows": history_rows,
                   "n_users": nu, "n_items": ni, "n_train": out.get("n_train"),
                   "train_seconds": seconds,
                   "phases": {**phases, "other": seconds - sum(phases.values())}}
            if score:
                res = bt.evaluate(s, data.periods[t + 1], hu, hi, nu, ni, cfg,
                                  seed=seed * 7919 + t, sampled=False)
                row.update({"ndcg@20": res["ndcg@20"], "recall@20": res["recall@20"],
                            "n_interactions": res.get("n_interactions"),
                            "test_users": res.get("n_users")})
            rows.append(row)
        if k == 1 or k % 10 == 0 or k == periods:
            secs = {r["method"]: r["train_seconds"] for r in rows[-len(METHODS):]}
            log(f"seed {seed} period {k}/{periods} ({history_rows:,} history rows, {nu:,} "
                "users): " + ", ".join(f"{m} {secs[m]:.2f} s" for m in METHODS))
    return rows


def _seed_worker(data: bt.IndexedPeriods, settings: dict, seed: int, periods: int,
                 pretrain_periods: int, score: bool, queue: Any) -> list[dict]:
    torch.set_num_threads(1)
    return run_seed(data, settings, seed, periods, pretrain_periods, score,
                    lambda line: queue.put(("log", line)))


def run_all(data: bt.IndexedPeriods, settings: dict, seeds: tuple[int, ...], periods: int,
            pretrain_periods: int, score: bool, jobs: int) -> list[dict]:
    if jobs <= 1 or len(seeds) == 1:
        return [r for seed in seeds
                for r in run_seed(data, settings, seed, periods, pretrain_periods, score)]
    from smlrec.workers import run_in_workers

    done = run_in_workers(_seed_worker, [(data, settings, s, periods, pretrain_periods, score)
                                         for s in seeds], jobs,
                          lambda kind, value: print(value, flush=True))
    return [r for rows in done for r in rows]


# ------------------------------------------------------------------------------ summary


def _by(rows: list[dict], method: str, key: str) -> np.ndarray:
    """``key`` of ``method`` as a (seeds, periods) array."""
    seeds = sorted({r["seed"] for r in rows})
    periods = max(r["period"] for r in rows)
    out = np.full((len(seeds), periods), np.nan)
    for r in rows:
        if r["method"] == method and key in r and r[key] is not None:
            out[seeds.index(r["seed"]), r["period"] - 1] = r[key]
    return out


def _phase(rows: list[dict], method: str, phase: str) -> np.ndarray:
    return _by([{**r, "_p": r["phases"].get(phase, 0.0)} for r in rows], method, "_p")


def _sd(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.nanstd(x, axis=axis, ddof=1) if x.shape[axis] > 1 else np.zeros(
        np.delete(x.shape, axis))


def summarize(rows: list[dict]) -> dict:
    """Per-period means and spreads over seeds, a table per decile of periods, the SML phase
    split, the fit of Full-retrain's time to its history, and the verdicts."""
    periods = max(r["period"] for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    q = max(1, periods // 4)
    last = min(LAST, periods)
    hist = _by(rows, "full", "history_rows")[0].astype(np.int64)
    users = _by(rows, "sml", "n_users")[0].astype(np.int64)
    curve: dict[str, dict] = {}
    for m in METHODS:
        secs = _by(rows, m, "train_seconds")
        entry = {"seconds_mean": np.nanmean(secs, 0).tolist(), "seconds_sd": _sd(secs).tolist(),
                 "seconds_min": np.nanmin(secs, 0).tolist(),
                 "seconds_max": np.nanmax(secs, 0).tolist(),
                 "total_seconds_mean": float(np.nansum(secs, 1).mean())}
        for key in ("ndcg@20", "recall@20"):
            vals = _by(rows, m, key)
            if np.isfinite(vals).any():
                entry[f"{key}_mean"] = np.nanmean(vals, 0).tolist()
                w = _by(rows, m, "n_interactions")
                ok = np.isfinite(vals) & np.isfinite(w)
                entry[f"{key}_weighted"] = [float((v[o] * ww[o]).sum() / ww[o].sum())
                                            for v, ww, o in zip(vals, w, ok, strict=True)]
        first, end = secs[:, :q].mean(1), secs[:, -q:].mean(1)
        entry["first_quarter_mean_s"] = float(first.mean())
        entry["last_quarter_mean_s"] = float(end.mean())
        entry["growth"] = float(end.mean() / first.mean())
        entry["growth_per_seed"] = (end / first).tolist()
        entry["growth_median"] = float(np.median(secs[:, -q:]) / np.median(secs[:, :q]))
        entry["last_mean_s"] = float(secs[:, -last:].mean())
        curve[m] = entry
    # Fine-tune does the same work every period (one period, fixed epochs): SML's time over
    # Fine-tune's in the same period cancels the machine's load, which drifts on a shared box.
    rel = _by(rows, "sml", "train_seconds") / _by(rows, "finetune", "train_seconds")
    rel_growth = rel[:, -q:].mean(1) / rel[:, :q].mean(1)
    sml = _by(rows, "sml", "train_seconds")
    full = _by(rows, "full", "train_seconds")
    ratio_seed = sml[:, -last:].mean(1) / full[:, -last:].mean(1)
    deciles = []
    size = max(1, periods // 10)
    for lo in range(0, periods, size):
        hi = min(periods, lo + size)
        row = {"periods": [lo + 1, hi], "history_rows_end": int(hist[hi - 1]),
               "n_users_end": int(users[hi - 1])}
        for m in METHODS:
            per_seed = _by(rows, m, "train_seconds")[:, lo:hi].mean(1)
            row[m] = {"mean": float(per_seed.mean()),
                      "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0}
            nd = _by(rows, m, "ndcg@20")[:, lo:hi]
            if np.isfinite(nd).any():
                row[m]["ndcg@20"] = float(np.nanmean(nd))
        deciles.append(row)
    phases = {}
    for ph in (*SML_PHASES, "other"):
        v = _phase(rows, "sml", ph)
        phases[ph] = {"first_quarter_mean_s": float(v[:, :q].mean()),
                      "last_quarter_mean_s": float(v[:, -q:].mean())}
    # Full-retrain's seconds against its history (least squares over every seed and period).
    slope, icpt = np.polyfit(np.tile(hist, len(seeds)), full.ravel(), 1)
    sml_level = curve["sml"]["last_quarter_mean_s"]
    target_rows = (sml_level / RATIO_LIMIT - icpt) / slope if slope > 0 else float("nan")
    per_period = float(np.mean(np.diff(hist))) if len(hist) > 1 else float("nan")
    verdicts = {
        "sml_flat": {"growth": curve["sml"]["growth"], "limit": FLAT_LIMIT,
                     "growth_per_seed": curve["sml"]["growth_per_seed"],
                     "growth_median": curve["sml"]["growth_median"],
                     "growth_vs_finetune": float(rel_growth.mean()),
                     "growth_vs_finetune_per_seed": rel_growth.tolist(),
                     "pass": bool(curve["sml"]["growth"] <= FLAT_LIMIT),
                     "first_quarter": [1, q], "last_quarter": [periods - q + 1, periods]},
        "sml_vs_full_at_last": {"ratio": float(sml[:, -last:].mean() / full[:, -last:].mean()),
                                "ratio_per_seed": ratio_seed.tolist(), "limit": RATIO_LIMIT,
                                "periods": [periods - last + 1, periods],
                                "pass": bool(sml[:, -last:].mean()
                                             <= RATIO_LIMIT * full[:, -last:].mean())},
    }
    fit = {"seconds_per_10k_rows": float(slope * 1e4), "intercept_s": float(icpt),
           "history_rows_for_ratio_limit": float(target_rows),
           "period_for_ratio_limit": float((target_rows - hist[0]) / per_period + 1)
           if np.isfinite(per_period) and per_period > 0 else float("nan")}
    return {"periods": periods, "seeds": seeds, "quarter": q, "last": last,
            "history_rows": hist.tolist(), "n_users": users.tolist(), "curve": curve,
            "deciles": deciles, "sml_phases": phases, "full_fit": fit, "verdicts": verdicts}


# ------------------------------------------------------------------------------ outputs


def plot(summary: dict, path: Path) -> None:
    """Seconds per period (log scale; the line is the mean over seeds, the band their range)
    and, when scored, NDCG@20 on the next period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = all("ndcg@20_mean" in summary["curve"][m] for m in METHODS)
    fig, axes = plt.subplots(2 if scored else 1, 1, figsize=(10, 7 if scored else 4.5),
                             sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] if scored else [1]})
    x = np.arange(1, summary["periods"] + 1)
    ax = axes[0, 0]
    for m in METHODS:
        c = summary["curve"][m]
        (line,) = ax.plot(x, c["seconds_mean"], label=LABELS[m], lw=1.6)
        ax.fill_between(x, c["seconds_min"], c["seconds_max"], color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_ylabel("training seconds per period")
    ax.set_title(f"Retraining cost as history grows (synthetic stream, mean and range over "
                 f"{len(summary['seeds'])} seed(s))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    if scored:
        ax2 = axes[1, 0]
        for m in METHODS:
            ax2.plot(x, summary["curve"][m]["ndcg@20_mean"], label=LABELS[m], lw=1.2)
        ax2.set_ylabel("NDCG@20, next period")
        ax2.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("period t (after pretraining)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(out: dict) -> str:
    s, hw, v = out["summary"], out["hardware"], out["summary"]["verdicts"]
    flat, ratio, fit = v["sml_flat"], v["sml_vs_full_at_last"], s["full_fit"]
    p = out["stream"]
    lines = [
        "# Retraining cost curve: seconds per period as history grows", "",
        f"Measured on {hw['cpu']} ({hw['cpu_count']} cores, shared), {hw['torch_threads']} "
        f"torch thread per process, torch {hw['torch']}, device `{hw['device']}`; seeds "
        f"{', '.join(map(str, s['seeds']))} in {out['jobs']} process(es) side by side; load "
        f"average at start {out['load_average_start'][0]:.2f} (1 min), "
        f"{out['load_average_start'][1]:.2f} (5 min); at the end "
        f"{out['load_average_end'][0]:.2f}. Whole run {out['wall_seconds'] / 60:.1f} min. "
        + provenance_line(out.get("produced_by")), "",
        f"Reproduce: `{out['produced_by']['command']}`.", "",
        f"Stream (smlrec.data.synthetic): {p['n_periods']} daily periods of "
        f"{p['interactions_per_period']:,} interactions, {p['n_items']:,} items, "
        f"{ACTIVE_USERS} active users a period ({p['returning_share']:.0%} returning; the user "
        f"vocabulary grows to {s['n_users'][-1]:,}), drift {p['drift']}. W_0 pretrained on the "
        f"first {out['pretrain_periods']} periods; then periods t = 1..{s['periods']}, each "
        f"method updated after D_t closed and timed (the wall seconds of `update`: training, "
        "SML's meta-update and transfer, table growth and the popularity refresh; not the "
        "evaluation). Full-retrain trains on all history up to t "
        f"({s['history_rows'][0]:,} rows at t = 1, {s['history_rows'][-1]:,} at t = "
        f"{s['periods']}).", "",
        f"Settings: {out['settings']['source']}; {out['settings']['selection']} "
        f"({out['settings']['selected_at']}):", ""]
    lines += [f"- {LABELS[m]}: `{json.dumps(out['settings']['params'][m], sort_keys=True)}`"
              for m in METHODS]
    lines += ["", "## Verdicts", "",
              f"- SML time per period flat: last quarter (t = {flat['last_quarter'][0]}-"
              f"{flat['last_quarter'][1]}) over first quarter (t = 1-{flat['first_quarter'][1]})"
              f" = **{flat['growth']:.2f}x** (per seed "
              + ", ".join(f"{g:.2f}" for g in flat["growth_per_seed"])
              + f"); limit {flat['limit']}x: **{'pass' if flat['pass'] else 'FAIL'}**. "
              f"Robust to load spikes, the median's growth: {flat['growth_median']:.2f}x; "
              "the load-adjusted growth (SML's seconds over Fine-tune's in the same period, "
              "whose work is the same every period): "
              f"{flat['growth_vs_finetune']:.2f}x (per seed "
              + ", ".join(f"{g:.2f}" for g in flat["growth_vs_finetune_per_seed"]) + ").",
              f"- SML / Full-retrain at the last period (mean of t = {ratio['periods'][0]}-"
              f"{ratio['periods'][1]}) = **{ratio['ratio']:.3f}** (per seed "
              + ", ".join(f"{g:.3f}" for g in ratio["ratio_per_seed"])
              + f"); limit {ratio['limit']}: **{'pass' if ratio['pass'] else 'FAIL'}**.",
              f"- Full-retrain's time grows {fit['seconds_per_10k_rows']:.3f} s per 10k rows of "
              f"history (intercept {fit['intercept_s']:.2f} s); at this rate SML's last-quarter "
              f"time ({s['curve']['sml']['last_quarter_mean_s']:.2f} s) is {RATIO_LIMIT}x "
              f"Full-retrain's at about {fit['history_rows_for_ratio_limit']:,.0f} history rows,"
              f" period t ≈ {fit['period_for_ratio_limit']:.0f} of this stream.", "",
              "## Seconds per period, by tenth of the periods", "",
              "Mean ± sd over seeds of each seed's mean over the periods of the row; NDCG@20 "
              "of the model after each period on the next one (mean over seeds and periods).",
              "",
              "| periods | history rows | users | " + " | ".join(
                  f"{LABELS[m]} s | {LABELS[m]} NDCG@20" for m in METHODS) + " |",
              "|---" * (3 + 2 * len(METHODS)) + "|"]
    for d in s["deciles"]:
        cells = []
        for m in METHODS:
            cells += [f"{d[m]['mean']:.3f} ± {d[m]['sd']:.3f}",
                      f"{d[m]['ndcg@20']:.4f}" if "ndcg@20" in d[m] else "-"]
        lines.append(f"| {d['periods'][0]}-{d['periods'][1]} | {d['history_rows_end']:,} | "
                     f"{d['n_users_end']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Per method: first- and last-quarter means, growth, total training seconds "
              "over all periods (mean over seeds), NDCG@20 over all periods (weighted by test "
              "interactions, mean over seeds).", "",
              "| method | first quarter s | last quarter s | growth | total s | NDCG@20 | "
              "Recall@20 |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        c = s["curve"][m]
        nd = (f"{np.mean(c['ndcg@20_weighted']):.4f}" if "ndcg@20_weighted" in c else "-")
        rc = (f"{np.mean(c['recall@20_weighted']):.4f}" if "recall@20_weighted" in c else "-")
        lines.append(f"| {LABELS[m]} | {c['first_quarter_mean_s']:.3f} | "
                     f"{c['last_quarter_mean_s']:.3f} | {c['growth']:.2f}x | "
                     f"{c['total_seconds_mean']:.1f} | {nd} | {rc} |")
    lines += ["", "SML's seconds per period by phase (mean over seeds; `learn` is step 1 plus "
              "the extra rounds' transfers, `meta_update` step 2 on D_t, `transfer` W_t = "
              "f_Θ(W_{t-1}, Ŵ_t) over every user and item row, `begin_period` the growth of "
              "the three tables, `refresh_prior` the blend's popularity counts, `other` the "
              "rest of `update`):", "",
              "| phase | first quarter s | last quarter s |", "|---|---|---|"]
    for ph, vals in s["sml_phases"].items():
        lines.append(f"| {ph} | {vals['first_quarter_mean_s']:.4f} | "
                     f"{vals['last_quarter_mean_s']:.4f} |")
    if out.get("notes"):
        lines += ["", *out["notes"]]
    lines += ["", "![seconds per period](cost_curve.png)", ""]
    return "\n".join(lines)


def write_outputs(out: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "cost_curve.json", "md": folder / "cost_curve.md",
             "png": folder / "cost_curve.png"}
    paths["json"].write_text(json.dumps(out, indent=1, default=_jsonable) + "\n")
    paths["md"].write_text(markdown(out))
    plot(out["summary"], paths["png"])
    return paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=100,
                    help="periods timed after the pretraining periods")
    ap.add_argument("--seeds", default="0,1,2", help="every figure is a mean over these")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of cost_curve.json/.md/.png (default benchmarks/results; "
                    "with --smoke a temporary folder)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"a quick check: {SMOKE['periods']} periods of "
                    f"{SMOKE['interactions_per_period']} interactions, one seed")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds side by side in this many processes (default 1: one after "
                    "another, the cleanest timings; 0: one per seed, up to the CPU cores)")
    ap.add_argument("--pretrain-periods", type=int, default=None,
                    help="periods W_0 is trained on (default: configs/synthetic.yaml's)")
    ap.add_argument("--interactions", type=int, default=STREAM["interactions_per_period"],
                    help="interactions per period")
    ap.add_argument("--no-score", action="store_true",
                    help="do not score each model on the next period")
    ap.add_argument("--resummarize", type=Path, metavar="JSON",
                    help="no run: recompute the summary, table and chart from the rows of an "
                    "earlier cost_curve.json (written to --out, default beside it)")
    args = ap.parse_args()
    if args.resummarize:
        out = json.loads(args.resummarize.read_text())
        out["summary"] = summarize(out["rows"])
        paths = write_outputs(out, args.out or args.resummarize.parent)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return
    load_start = os.getloadavg()
    threads = configure_threads()
    settings = chosen_settings()
    conf = DailyConfig.load(str(CONFIGS / "synthetic.yaml"))
    periods, interactions = args.periods, args.interactions
    seeds = tuple(int(x) for x in args.seeds.split(","))
    pre = args.pretrain_periods or conf.pretrain_periods
    if args.smoke:
        periods, seeds = SMOKE["periods"], SMOKE["seeds"]
        interactions, pre = SMOKE["interactions_per_period"], SMOKE["pretrain_periods"]
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="smlrec-cost-curve-"))
                           if args.smoke else RESULTS)
    jobs = args.jobs or bt.auto_jobs(len(seeds), "cpu")
    params = stream_params(periods, pre, interactions)
    start = time.perf_counter()
    data = make_stream(params)
    print(f"stream: {len(data.periods)} periods, {sum(map(len, data.periods)):,} rows, "
          f"{data.n_users_after[-1]:,} users, {data.n_items_after[-1]:,} items; load average "
          f"{load_start[0]:.2f}; {threads} torch thread(s), {jobs} process(es)", flush=True)
    rows = run_all(data, settings, seeds, periods, pre, not args.no_score, jobs)
    summary = summarize(rows)
    out = {"hardware": {**hardware(torch.device("cpu")), "torch_threads": threads},
           "produced_by": produced_by(), "load_average_start": list(load_start),
           "load_average_end": list(os.getloadavg()), "jobs": min(jobs, len(seeds)),
           "wall_seconds": time.perf_counter() - start, "stream": params,
           "pretrain_periods": pre, "settings": settings, "summary": summary, "rows": rows}
    paths = write_outputs(out, out_dir)
    v = summary["verdicts"]
    print(f"SML growth (last / first quarter): {v['sml_flat']['growth']:.2f}x "
          f"({'pass' if v['sml_flat']['pass'] else 'FAIL'}, limit {FLAT_LIMIT}x); SML / "
          f"Full-retrain at the last {summary['last']} periods: "
          f"{v['sml_vs_full_at_last']['ratio']:.3f} "
          f"({'pass' if v['sml_vs_full_at_last']['pass'] else 'FAIL'}, limit {RATIO_LIMIT})")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in "
          f"{out['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
