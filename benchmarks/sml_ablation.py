"""What SML's learned transfer adds: SML with the best baseline's training as step 1, and Θ
frozen (the transfer is then the baseline itself), learning at three rates, or correcting
only the rows step 1 trained. Each variant is a mean over three seeds, on validation and
test periods, beside the baselines it is built on. Nothing here chooses a configuration
(the backtest's grid does, on validation); this is the record of why SML does or does not
earn its place.

    python -m benchmarks.sml_ablation --only ml-100k
    python -m benchmarks.sml_ablation --only synthetic

Saves ``benchmarks/results/study-sml-ablation-<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.backtest import RESULTS, hardware, prepare, produced_by
from benchmarks.sml_study import score
from smlrec import backtest as bt
from smlrec.data.store import read_periods
from smlrec.device import configure_threads, pick_device

_RESIDUAL = {"transfer": "residual", "hidden": 128, "outer_steps": 1, "n_negatives": 4}
# Step 1 trained like each dataset's best baseline (validation, backtest.md).
STEP1 = {"ml-100k": {**_RESIDUAL, "what_window": 3, "what_epochs": 10, "what_lr": 8e-3},
         "synthetic": {**_RESIDUAL, "what_epochs": 20, "what_lr": 3e-3}}
BASELINES = {"window": {"window": 3, "epochs": 10, "lr": 8e-3, "n_negatives": 4},
             "finetune": {"epochs": 20, "lr": 3e-3, "n_negatives": 4}}


def variants(dataset: str) -> dict[str, dict]:
    base = STEP1[dataset]
    out = {"Θ frozen (lr 1e-8): the baseline through an identity transfer":
           {**base, "theta_lr": 1e-8},
           "Θ learns, lr 1e-5": {**base, "theta_lr": 1e-5},
           "Θ learns, lr 1e-4": {**base, "theta_lr": 1e-4},
           "Θ learns, lr 6e-4": {**base, "theta_lr": 6e-4},
           "Θ learns, lr 6e-4, trained rows only": {**base, "theta_lr": 6e-4,
                                                    "transfer_rows": "trained"}}
    if dataset == "ml-100k":  # SML proper: the new period only, as fine-tuning trains
        out["new period only (20 epochs), Θ lr 6e-4"] = {**STEP1["synthetic"],
                                                         "theta_lr": 6e-4}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(STEP1), default="ml-100k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    configure_threads()
    device = pick_device(args.device)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    frame = read_periods(prepare(args.only))
    cfg = bt.BacktestConfig(seeds=seeds, device=str(device), progress=False)
    cache: dict = {}
    rows = []
    start = time.perf_counter()
    for method, params in BASELINES.items():
        res = score(frame, method, [params], cfg, cache)[0]
        rows.append({"label": f"{method} (baseline)", "method": method, **res})
        print(f"{rows[-1]['label']:<62} val {res['val']:.4f} test {res['test']:.4f}",
              flush=True)
    named = variants(args.only)
    for label, res in zip(named, score(frame, "sml", list(named.values()), cfg, cache),
                          strict=True):
        rows.append({"label": f"sml: {label}", "method": "sml", **res})
        print(f"{rows[-1]['label']:<62} val {res['val']:.4f} test {res['test']:.4f}",
              flush=True)
    out = {"hardware": hardware(device), "produced_by": produced_by(), "dataset": args.only,
           "seeds": list(seeds),
           "seconds": time.perf_counter() - start, "rows": rows}
    path = RESULTS / f"study-sml-ablation-{args.only}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    hw = out["hardware"]
    lines = [f"# What SML's transfer adds on {args.only}", "",
             f"Measured on {hw['cpu']} ({hw['cpu_count']} cores), device `{hw['device']}`, "
             f"{len(seeds)} seeds. SML's step 1 trained like the best baseline; each row at "
             "its best blend weight λ on validation. Test figures are reported, never chosen "
             f"on. Reproduce: `python -m benchmarks.sml_ablation --only {args.only}`.", "",
             "| variant | params | λ | val NDCG@20 | test NDCG@20 | val, no blend | "
             "test, no blend |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | `{json.dumps(r['params'])}` | {r['blend']} | "
                     f"{r['val']:.4f} ± {r['val_sd']:.4f} | {r['test']:.4f} ± "
                     f"{r['test_sd']:.4f} | {r['val_no_blend']:.4f} | "
                     f"{r['test_no_blend']:.4f} |")
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
