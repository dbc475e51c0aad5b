"""Backtest benchmark: every method, in one run, on MovieLens-100k and a synthetic stream.

Prints, per dataset, SML's NDCG@20 over the best baseline's and SML's training time at
the last period over Full-retrain's, and whether SML's time per period stays flat as
history grows. Saves everything under benchmarks/results/ with the hardware it ran on.

    python -m benchmarks.backtest                 # both datasets, auto device
    python -m benchmarks.backtest --device cuda   # on a GPU machine
    python -m benchmarks.backtest --only synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from smlrec import backtest as bt
from smlrec.data import default_data_root
from smlrec.data.movielens import fetch_movielens_100k
from smlrec.data.store import has_dataset, read_dataset_info, read_periods
from smlrec.data.synthetic import write_synthetic
from smlrec.device import configure_threads, pick_device

RESULTS = Path(__file__).resolve().parent / "results"
# The synthetic drifting stream: returning users whose tastes move every period.
SYNTHETIC = {"n_users": 3000, "n_items": 1000, "n_periods": 24,
             "interactions_per_period": 20000, "returning_share": 0.7, "drift": 0.3, "seed": 0}


def hardware(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_growth(results, method: str) -> dict:
    """How a method's training time grows with history: seconds per period at the first and
    last evaluated periods, and the slope in seconds per 10k more history rows."""
    part = results[results["method"] == method]
    if part.empty:
        return {}
    cid = part.groupby("config")["train_seconds"].mean().index[0]
    part = part[part["config"] == cid].sort_values("t")
    secs = part["train_seconds"].to_numpy(float)
    k = max(1, len(secs) // 4)
    return {"first_quarter_mean_s": float(secs[:k].mean()),
            "last_quarter_mean_s": float(secs[-k:].mean()),
            "growth": float(secs[-k:].mean() / secs[:k].mean())}


def prepare(name: str) -> str:
    root = default_data_root(f"bench-{name}")
    if name == "ml-100k" and not has_dataset(root):
        fetch_movielens_100k(root)
    elif name == "synthetic" and (not has_dataset(root)
                                  or read_dataset_info(root).get("generator") != SYNTHETIC):
        write_synthetic(root, **SYNTHETIC)
    return root


def run(name: str, device: torch.device, progress: bool) -> dict:
    root = prepare(name)
    cfg = bt.BacktestConfig(device=str(device), progress=progress)
    start = time.perf_counter()
    results = bt.run_backtest(read_periods(root), cfg)
    chosen = bt.select_configs(results)
    summary = bt.summarize(results, chosen, name)
    summary["ratios"] = bt.ratios(summary)
    summary["time_growth"] = {m: time_growth(results[results["config"] == chosen[m]], m)
                              for m in chosen if m != "pop"}
    summary["wall_seconds"] = time.perf_counter() - start
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    bt.write_outputs(results, summary, RESULTS / f"backtest-{name}{suffix}")
    print(bt.format_summary(summary))
    growth = summary["time_growth"]
    if "sml" in growth and "full" in growth:
        print(f"time growth first->last quarter: sml {growth['sml']['growth']:.2f}x, "
              f"full {growth['full']['growth']:.2f}x")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--only", choices=["ml-100k", "synthetic"], help="run one dataset")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    configure_threads()
    device = pick_device(args.device)
    names = [args.only] if args.only else ["ml-100k", "synthetic"]
    out = {"hardware": hardware(device), "synthetic_params": SYNTHETIC, "datasets": {}}
    for name in names:
        print(f"\n=== {name} ===")
        out["datasets"][name] = run(name, device, not args.no_progress)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    path = RESULTS / f"backtest{suffix}.json"
    path.write_text(json.dumps(out, indent=2, default=_jsonable) + "\n")
    print("\nratios (SML NDCG@20 / best baseline; SML time / Full-retrain time, last period):")
    for name, s in out["datasets"].items():
        r = s["ratios"]
        print(f"  {name:<10} quality {r.get('ndcg_ratio_vs_best_baseline', float('nan')):.3f} "
              f"(best baseline: {r.get('best_baseline')}), "
              f"time {r.get('time_ratio_vs_full', float('nan')):.3f}")
    md = RESULTS / f"backtest{suffix}.md"
    md.write_text(markdown(out))
    print(f"wrote {path} and {md}")


def markdown(out: dict) -> str:
    """Both datasets side by side, with the hardware, as a Markdown page."""
    hw = out["hardware"]
    lines = ["# Backtest: SML against the ways recommenders are retrained today", "",
             f"Measured on {hw['cpu']} ({hw['cpu_count']} cores, {hw['torch_threads']} torch "
             f"thread(s)), device `{hw['device']}`, torch {hw['torch']}. Test periods only; "
             "each method at the hyper-parameters its validation periods chose. NDCG@20 and "
             "Recall@20: full ranking over known items, returning users; AUC: the positive "
             "against 999 sampled negatives. Reproduce: `make bench`.", ""]
    names = list(out["datasets"])
    lines.append("| method | " + " | ".join(
        f"{n} NDCG@20 | {n} Recall@20 | {n} AUC | {n} train s (last period)" for n in names)
        + " |")
    lines.append("|---" * (1 + 4 * len(names)) + "|")
    methods = list(out["datasets"][names[0]]["methods"])
    for m in methods:
        cells = []
        for n in names:
            v = out["datasets"][n]["methods"].get(m)
            cells += (["-"] * 4 if v is None else
                      [f"{v['ndcg@20']:.4f}", f"{v['recall@20']:.4f}", f"{v['auc']:.4f}",
                       f"{v['train_seconds_last_period']:.2f}"])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        d = out["datasets"][n]
        r, g = d["ratios"], d.get("time_growth", {})
        lines.append(f"- **{n}**: SML NDCG@20 / best baseline ({r.get('best_baseline')}) = "
                     f"{r.get('ndcg_ratio_vs_best_baseline', float('nan')):.3f}; SML time / "
                     f"Full-retrain time at the last period = "
                     f"{r.get('time_ratio_vs_full', float('nan')):.3f}; training time growth "
                     "from the first to the last quarter of the evaluated periods: " + ", ".join(
                         f"{m} {v['growth']:.2f}x" for m, v in g.items() if v))
        lines.append("  Chosen configs: " + "; ".join(
            f"{m} {json.dumps(v['params'])}" for m, v in d["methods"].items()))
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


if __name__ == "__main__":
    main()
