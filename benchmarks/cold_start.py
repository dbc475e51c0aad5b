"""Cold-start benchmark: new users (support of 1, 3, 5 items), returning users, and the
per-user model choice, on MovieLens-100k and the synthetic stream (with side features).

Three seeds by default; every figure is a mean over them with its spread, every choice
(each model's configuration and blend) made on validation periods. The MF champion and
the popularity floor are the ones `make bench`'s backtest chose (configs/<dataset>.yaml).
Writes benchmarks/results/cold-<dataset>/ (per_period.csv, cold.json), adds the section
under ``cold`` to benchmarks/results/backtest-<dataset>/summary.json, and writes
benchmarks/results/cold.md and cold.json with both datasets side by side.

    python -m benchmarks.cold_start                  # both datasets
    python -m benchmarks.cold_start --only ml-100k   # keeps the other dataset's figures
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from benchmarks.backtest import (
    CONFIGS,
    RESULTS,
    SYNTHETIC,
    hardware,
    prepare,
    produced_by,
    provenance_line,
    update_run_config,
)
from smlrec import coldtrack as ct
from smlrec.backtest import _jsonable, auto_jobs
from smlrec.config import DailyConfig
from smlrec.data.store import read_periods
from smlrec.data.synthetic import write_synthetic
from smlrec.device import configure_threads, pick_device
from smlrec.side import load_side_tables

# Configurations tried (chosen on validation periods; see the module doc of smlrec.melu,
# smlrec.two_tower and smlrec.selector for what each field does). MeLU: the defaults and
# the sampled-softmax losses in both loops (the one change that helped on ml-100k's
# validation weeks in a search over rates, local steps, negatives, first-order MAML,
# popularity as an input and a support bag); the two-tower model: one pass set per period
# or more epochs over the last three periods; the selector: plain and meta-learned.
MELU_GRID: list[dict] = [{}, {"loss": "softmax", "local_loss": "softmax"}]
TWO_TOWER_GRID: list[dict] = [{}, {"epochs": 10, "replay": 3}]
SELECTOR_GRID: list[dict] = [{}, {"local_steps": 1}]
BLENDS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def track_config(name: str, device: str, seeds: tuple[int, ...], progress: bool
                 ) -> ct.ColdTrackConfig:
    """The track's settings: champion and floor from configs/<name>.yaml."""
    conf = DailyConfig.load(str(CONFIGS / f"{name}.yaml"))
    champion = next(c for c in conf.challengers if c.method != "sml")
    return ct.ColdTrackConfig(champion=champion, floor=conf.floor, melu=MELU_GRID,
                              two_tower=TWO_TOWER_GRID, selector=SELECTOR_GRID,
                              blends=BLENDS, seeds=seeds, device=device,
                              progress=progress, pretrain_epochs=conf.pretrain_epochs,
                              pretrain_lr=3e-3)


def run(name: str, device: str, seeds: tuple[int, ...], progress: bool, jobs: int,
        write_config: bool = True) -> dict:
    root = prepare(name)
    users, items = load_side_tables(root)
    if name == "synthetic" and users is None:  # stored before the stream had side tables
        write_synthetic(root, **SYNTHETIC)
        users, items = load_side_tables(root)
    if users is None and items is None:
        raise SystemExit(f"{root} has no side tables: the cold track needs user/item features")
    cfg = track_config(name, device, seeds, progress)
    start = time.perf_counter()
    run_ = ct.run_cold_track(read_periods(root), users, items, cfg,
                             jobs=jobs or auto_jobs(len(seeds), device))
    summary = ct.summarize_cold(run_, cfg.primary_support)
    summary["config"] = cfg.model_dump(mode="json")
    summary["wall_seconds"] = time.perf_counter() - start
    summary["produced_by"] = produced_by()
    out = RESULTS / f"cold-{name}"
    out.mkdir(parents=True, exist_ok=True)
    run_.results.to_csv(out / "per_period.csv", index=False)
    (out / "cold.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    main_summary = RESULTS / f"backtest-{name}" / "summary.json"
    if main_summary.exists():
        doc = json.loads(main_summary.read_text())
        doc["cold"] = summary
        main_summary.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    print(ct.format_cold(summary))
    if write_config:
        path = write_cold_config(name, cfg, summary)
        print(f"wrote the cold section of {path}")
    return summary


def write_cold_config(name: str, cfg: ct.ColdTrackConfig, summary: dict) -> Path:
    """Add the cold-start model chosen on validation (MeLU's configuration and blend on the
    primary support size) to configs/<name>.yaml, the daily run's configuration."""
    from smlrec.config import ColdConfig

    pick = summary["tracks"][f"cold@{cfg.primary_support}"]["melu"]["variant"]
    cold = ColdConfig(melu=cfg.melu[int(pick["config"])], blend=float(pick["blend"]),
                      support=cfg.primary_support, pretrain_epochs=cfg.melu_pretrain_epochs,
                      epochs=cfg.melu_epochs, replay=cfg.melu_replay,
                      max_support=max(cfg.n_support), recent=cfg.recent)
    return update_run_config(name, "cold", cold, {
        "chosen_on": "validation periods, cold users with a support of "
                     f"{cfg.primary_support}, mean NDCG@20 over seeds",
        "figures": {m: {"val_ndcg@20": e["val_ndcg@20"], "test_ndcg@20": e["ndcg@20"]}
                    for m, e in summary["tracks"][f"cold@{cfg.primary_support}"].items()}})


def markdown(out: dict) -> str:
    hw = out["hardware"]
    lines = ["# Cold start and per-user model choice", "",
             f"Measured on {hw['cpu']} ({hw['cpu_count']} cores), device `{hw['device']}`, "
             f"torch {hw['torch']}. Test periods only; each model at the configuration and "
             "blend its validation periods chose (mean NDCG@20 over seeds). Cold users: "
             "first seen in the period, support = their first n known items, query = the "
             "rest, ranked over every known item; returning users: the backtest's users, "
             "support = their 20 most recent items. Ratios: paired bootstrap 95% intervals "
             "over test users. Reproduce: `python -m benchmarks.cold_start` (part of "
             "`make bench`).", ""]
    for name, s in out["datasets"].items():
        lines += [f"# {name}", "", provenance_line(s.get("produced_by")), "",
                  f"Wall time {s.get('wall_seconds', float('nan')):.0f} s.", "",
                  ct.format_cold(s), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--only", choices=["ml-100k", "synthetic"], help="run one dataset")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seeds", default="0,1,2", help="every figure is a mean over these")
    ap.add_argument("--no-config", action="store_true",
                    help="do not add the chosen cold-start model to configs/<dataset>.yaml")
    ap.add_argument("--jobs", type=int, default=0, help="seeds side by side in this many "
                    "processes (0: one per seed up to the cores)")
    args = ap.parse_args()
    configure_threads()
    device = pick_device(args.device)
    seeds = tuple(int(x) for x in args.seeds.split(","))
    names = [args.only] if args.only else ["ml-100k", "synthetic"]
    out = {"hardware": hardware(device), "datasets": {}}
    for name in names:
        print(f"\n=== {name} ===")
        out["datasets"][name] = run(name, str(device), seeds, not args.no_progress, args.jobs,
                                    not args.no_config and device.type == "cpu")
    path = RESULTS / "cold.json"
    if args.only and path.exists():
        kept = json.loads(path.read_text()).get("datasets", {})
        out["datasets"] = {k: v for k, v in {**kept, **out["datasets"]}.items()}
    path.write_text(json.dumps(out, indent=2, default=_jsonable) + "\n")
    (RESULTS / "cold.md").write_text(markdown(out))
    print(f"wrote {path} and {RESULTS / 'cold.md'}")


if __name__ == "__main__":
    pd.set_option("display.width", 120)
    main()
