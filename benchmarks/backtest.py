"""Backtest benchmark: every method, in one run, on MovieLens-100k and a synthetic stream.

Three seeds by default; every figure is a mean over them with its spread, every choice
made on validation periods. Prints, per dataset, the best method's NDCG@20 over the
validated popularity floor's (with a paired bootstrap interval), SML's over the best
non-SML method's, and SML's training time at the last period over Full-retrain's. Saves
everything under benchmarks/results/ with the hardware it ran on, and writes the daily
run's configuration chosen on validation to configs/<dataset>.yaml (what `make run` reads).

    python -m benchmarks.backtest                 # both datasets, auto device
    python -m benchmarks.backtest --device cuda   # on a GPU machine (no config written)
    python -m benchmarks.backtest --only synthetic --seeds 0,1,2   # keeps ml-100k's figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

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


def produced_by() -> dict:
    """Which run produced a figure: the command, the commit (``+dirty`` with uncommitted
    changes outside benchmarks/results/), the UTC time."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = [line for line in git("status", "--porcelain").splitlines()
             if "benchmarks/results/" not in line and "configs/" not in line]
    module = Path(sys.argv[0]).resolve()
    try:
        module = ".".join(module.relative_to(root).with_suffix("").parts)
    except ValueError:
        module = str(module)
    return {"command": " ".join(["python -m", module, *sys.argv[1:]]),
            "commit": commit + ("+dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def provenance_line(p: dict | None) -> str:
    """``produced_by`` as one Markdown line ('' when the figure predates it)."""
    if not p:
        return ""
    return f"Produced by `{p['command']}` at commit `{p['commit']}`, {p['date']}."


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


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def update_run_config(name: str, section: str, value: Any, selection: dict) -> Path:
    """Set one section of the run configuration configs/<name>.yaml to ``value`` and its
    entry under ``selection`` (what was measured when it was chosen), keeping the rest of
    the file and its comment header; returns the path."""
    from smlrec.config import DailyConfig

    path = CONFIGS / f"{name}.yaml"
    header = "".join(line + "\n" for line in path.read_text().splitlines()
                     if line.startswith("#"))
    conf = DailyConfig.load(str(path))
    conf = conf.model_copy(update={section: value,
                                   "selection": {**conf.selection, section: selection}})
    path.write_text(header + conf.to_yaml())
    return path


def run(name: str, device: torch.device, progress: bool, seeds: tuple[int, ...],
        write_config: bool, jobs: int = 0) -> dict:
    root = prepare(name)
    cfg = bt.BacktestConfig(device=str(device), progress=progress, seeds=seeds)
    start = time.perf_counter()
    backtest = bt.run_backtest(read_periods(root), cfg,
                               jobs=jobs or bt.auto_jobs(len(seeds), cfg.device))
    results = backtest.results
    chosen = bt.select_configs(results)
    summary = bt.summarize(backtest, chosen, name)
    summary["ratios"] = bt.ratios(summary)
    summary["time_growth"] = {m: time_growth(results[results["config"] == chosen[m]], m)
                              for m in chosen if m != "pop"}
    summary["wall_seconds"] = time.perf_counter() - start
    summary["produced_by"] = produced_by()
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    bt.write_outputs(backtest, summary, RESULTS / f"backtest-{name}{suffix}")
    print(bt.format_summary(summary))
    if write_config:
        conf = bt.run_config(summary, cfg, backtest.split,
                             period=str(read_dataset_info(root).get("period", "")))
        CONFIGS.mkdir(exist_ok=True)
        (CONFIGS / f"{name}.yaml").write_text(
            f"# The daily run's configuration for {name}, chosen on validation periods by "
            "`make bench`\n# (python -m benchmarks.backtest); read by `make run` "
            "(smlrec pipeline demo --config).\n" + conf.to_yaml())
        print(f"wrote configs/{name}.yaml")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--only", choices=["ml-100k", "synthetic"], help="run one dataset")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seeds", default="0,1,2", help="every figure is a mean over these")
    ap.add_argument("--no-config", action="store_true",
                    help="do not rewrite configs/<dataset>.yaml from the selection")
    ap.add_argument("--jobs", type=int, default=0,
                    help="seeds run side by side in this many processes (0: one per seed, "
                    "up to the CPU cores; 1 on a GPU); figures are the same")
    args = ap.parse_args()
    seeds = tuple(int(x) for x in args.seeds.split(","))
    configure_threads()
    device = pick_device(args.device)
    names = [args.only] if args.only else ["ml-100k", "synthetic"]
    out = {"hardware": hardware(device), "synthetic_params": SYNTHETIC, "datasets": {}}
    for name in names:
        print(f"\n=== {name} ===")
        out["datasets"][name] = run(name, device, not args.no_progress, seeds,
                                    not args.no_config and device.type == "cpu", args.jobs)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    path = RESULTS / f"backtest{suffix}.json"
    if args.only and path.exists():  # one dataset re-run: keep the other's figures
        kept = json.loads(path.read_text()).get("datasets", {})
        out["datasets"] = {**{k: v for k, v in kept.items() if k not in names},
                           **out["datasets"]}
        out["datasets"] = {k: out["datasets"][k] for k in ("ml-100k", "synthetic")
                           if k in out["datasets"]}
    path.write_text(json.dumps(out, indent=2, default=_jsonable) + "\n")
    print("\nratios (each side chosen on validation; test periods, mean over seeds):")
    for name, s in out["datasets"].items():
        r = s["ratios"]
        ci = r.get("best_vs_floor_ci95", [float("nan")] * 2)
        print(f"  {name:<10} best ({r.get('best_method')}) / floor "
              f"{r.get('best_vs_floor', float('nan')):.3f} [95% CI {ci[0]:.3f}, {ci[1]:.3f}]; "
              f"SML / best non-SML ({r.get('best_baseline')}) "
              f"{r.get('ndcg_ratio_vs_best_baseline', float('nan')):.3f}; "
              f"SML time / full {r.get('time_ratio_vs_full', float('nan')):.3f}")
    md = RESULTS / f"backtest{suffix}.md"
    md.write_text(markdown(out))
    print(f"wrote {path} and {md}")


def markdown(out: dict) -> str:
    """Both datasets side by side, with the hardware, as a Markdown page."""
    hw = out["hardware"]
    names = list(out["datasets"])
    seeds = out["datasets"][names[0]].get("seeds", [0])
    lines = ["# Backtest: SML against the ways recommenders are retrained today", "",
             f"Measured on {hw['cpu']} ({hw['cpu_count']} cores, {hw['torch_threads']} torch "
             f"thread(s)), device `{hw['device']}`, torch {hw['torch']}. Test periods only; "
             "each method at the configuration its validation periods chose (mean NDCG@20 "
             f"over {len(seeds)} seeds: {', '.join(map(str, seeds))}). Figures: mean ± sd "
             "over seeds. NDCG@20 and Recall@20: full ranking over known items, returning "
             "users; vs floor: NDCG@20 over the validated popularity floor's, with a paired "
             "bootstrap 95% interval over test users; AUC: the positive against 999 sampled "
             "negatives. Reproduce: `make bench`.", ""]
    lines.append("| method | " + " | ".join(
        f"{n} NDCG@20 | {n} Recall@20 | {n} vs floor [95% CI] | {n} AUC | {n} train s"
        for n in names) + " |")
    lines.append("|---" * (1 + 5 * len(names)) + "|")
    methods = list(out["datasets"][names[0]]["methods"])
    for m in methods:
        cells = []
        for n in names:
            v = out["datasets"][n]["methods"].get(m)
            if v is None:
                cells += ["-"] * 5
                continue
            ci = v.get("ci95_vs_pop", [float("nan")] * 2)
            cells += [f"{v['ndcg@20']:.4f} ± {v['ndcg@20_sd']:.4f}",
                      f"{v['recall@20']:.4f} ± {v['recall@20_sd']:.4f}",
                      f"{v.get('ratio_vs_pop', float('nan')):.2f} [{ci[0]:.2f}, {ci[1]:.2f}]",
                      f"{v['auc']:.4f}", f"{v['train_seconds_last_period']:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        d = out["datasets"][n]
        r, g = d["ratios"], d.get("time_growth", {})
        ci = r.get("best_vs_floor_ci95", [float("nan")] * 2)
        lines.append(f"- **{n}**: best method by validation ({r.get('best_method')}) / "
                     f"popularity floor (pop {json.dumps(d.get('floor', {}).get('config'))}) = "
                     f"{r.get('best_vs_floor', float('nan')):.3f} [95% CI {ci[0]:.3f}, "
                     f"{ci[1]:.3f}]; SML / best non-SML method by validation "
                     f"({r.get('best_baseline')}) = "
                     f"{r.get('ndcg_ratio_vs_best_baseline', float('nan')):.3f}; SML time / "
                     f"Full-retrain time at the last period = "
                     f"{r.get('time_ratio_vs_full', float('nan')):.3f}; training time growth "
                     "from the first to the last quarter of the evaluated periods: " + ", ".join(
                         f"{m} {v['growth']:.2f}x" for m, v in g.items() if v))
        lines.append("  Chosen configs: " + "; ".join(
            f"{m} {json.dumps(v['params'], sort_keys=True)}" for m, v in d["methods"].items()))
        if d.get("produced_by"):
            lines.append("  " + provenance_line(d["produced_by"]))
        periods = d.get("periods") or []
        if periods:
            lines.append("  Users scored per period: " + ", ".join(
                f"{p['period']} ({p['phase']}) {p['n_users']}" for p in periods))
    lines += ["", "Every configuration tried (validation and test NDCG@20, mean ± sd over "
              "seeds; each method's row with the best validation figure was chosen):", ""]
    for n in names:
        lines += [f"### {n}", "", "| method | params | val | test |", "|---|---|---|---|"]
        for m, rows in out["datasets"][n].get("configs", {}).items():
            for c in rows:
                lines.append(f"| {m} | `{json.dumps(c['params'], sort_keys=True)}` | "
                             f"{c['val']:.4f} ± {c['val_sd']:.4f} | "
                             f"{c['test']:.4f} ± {c['test_sd']:.4f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


if __name__ == "__main__":
    main()
