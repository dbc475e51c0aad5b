"""Make SML earn its place: an Optuna search over SML's transfer and training (or, with
``--method``, a baseline's training), on validation periods only, each trial a mean over
three seeds.

The search space: the transfer's form (the paper's CNN, residual around Ŵ_t, gated between
W_{t-1} and Ŵ_t), the width of its hidden layer, outer steps, epochs and learning rate for
Ŵ_t, Θ's learning rate, passes over the meta-training periods, negatives per positive and
the loss. Every trial is scored at every blend weight λ (the served variants of one trained
model) and keeps its best λ, all on validation. Test periods are never run during the
search (``until="val"``). Afterwards the named variants (the paper's configuration, the best
trial, the best trial of each transfer form) are run once more through the test periods, and
both figures are saved side by side:

    python -m benchmarks.sml_study                   # SML on MovieLens-100k, 40 trials
    python -m benchmarks.sml_study --method window --trials 30
    python -m benchmarks.sml_study --trials 10 --only synthetic
    python -m benchmarks.sml_study --method sml-replay --trials 30   # the second SML search

Saves ``benchmarks/results/study-<method>-<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.backtest import RESULTS, hardware, prepare, produced_by
from smlrec import backtest as bt
from smlrec.data.store import read_periods
from smlrec.device import configure_threads, pick_device


def suggest_sml(trial) -> dict:
    """One point of SML's search space (flat parameters)."""
    return {"transfer": trial.suggest_categorical("transfer", ["official", "residual", "gated"]),
            "hidden": trial.suggest_categorical("hidden", [32, 128, 512]),
            "outer_steps": trial.suggest_int("outer_steps", 1, 3),
            "what_epochs": trial.suggest_categorical("what_epochs", [1, 2, 5]),
            "what_lr": trial.suggest_float("what_lr", 1e-3, 2e-2, log=True),
            "theta_lr": trial.suggest_float("theta_lr", 1e-4, 3e-3, log=True),
            "meta_passes": trial.suggest_int("meta_passes", 1, 2),
            "n_negatives": trial.suggest_categorical("n_negatives", [1, 4, 16]),
            "loss": trial.suggest_categorical("loss", ["bce", "softmax"]),
            "blend_window": trial.suggest_categorical("blend_window", [1, 2, 4, 8])}


OBJECTIVES = {"bce4": {"loss": "bce", "n_negatives": 4},
              "softmax1": {"loss": "softmax", "n_negatives": 1}}


def suggest_sml_replay(trial, dataset: str = "ml-100k") -> dict:
    """The second SML search: Ŵ_t trained like the best baselines (more epochs, BCE with 4
    negatives, optionally replaying the last periods: ``what_window``), and Θ's form,
    capacity, learning rate and weight decay (which keeps a residual transfer's correction
    small). The synthetic stream's search keeps ``what_window`` at 1 (its best baseline
    trains on the new period only, and replay triples the cost)."""
    windows = [1] if dataset == "synthetic" else [1, 2, 3]
    return {"transfer": trial.suggest_categorical("transfer", ["residual", "gated"]),
            "hidden": trial.suggest_categorical("hidden", [8, 32, 128]),
            "outer_steps": trial.suggest_int("outer_steps", 1, 2),
            "what_window": trial.suggest_categorical("what_window", windows),
            "what_epochs": trial.suggest_categorical("what_epochs", [5, 10, 20]),
            "what_lr": trial.suggest_float("what_lr", 2e-3, 1.2e-2, log=True),
            "theta_lr": trial.suggest_float("theta_lr", 1e-5, 3e-3, log=True),
            "theta_weight_decay": trial.suggest_float("theta_weight_decay", 1e-5, 1e-1,
                                                      log=True),
            "meta_passes": trial.suggest_int("meta_passes", 1, 2),
            **OBJECTIVES[trial.suggest_categorical("objective", list(OBJECTIVES))]}


def suggest_mf(trial) -> dict:
    """One point of the MF retraining baselines' search space (window, finetune, full)."""
    return {"epochs": trial.suggest_categorical("epochs", [5, 10, 20, 40]),
            "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "n_negatives": trial.suggest_categorical("n_negatives", [1, 4, 16]),
            "loss": trial.suggest_categorical("loss", ["bce", "bpr", "softmax"]),
            "negatives": trial.suggest_categorical("negatives", ["uniform", "hard"]),
            "blend_window": trial.suggest_categorical("blend_window", [1, 2, 4, 8])}


def suggest_window(trial) -> dict:
    return {"window": trial.suggest_categorical("window", [2, 3, 4, 6]), **suggest_mf(trial)}


SPACES = {"sml": suggest_sml, "sml-replay": suggest_sml_replay, "window": suggest_window,
          "finetune": suggest_mf, "full": suggest_mf}
# The baselines' settings as SML's step 1, with Θ barely learning (the transfer then is the
# baseline itself): where the second search starts from, per dataset.
_AS_WINDOW = {"transfer": "residual", "hidden": 128, "outer_steps": 1, "what_window": 3,
              "what_epochs": 10, "what_lr": 8e-3, "theta_lr": 1e-5, "theta_weight_decay": 1e-4,
              "meta_passes": 1, "objective": "bce4"}
_AS_FINETUNE = {**_AS_WINDOW, "what_window": 1, "what_epochs": 20, "what_lr": 3e-3}
KNOWN_BY_DATASET = {
    ("sml-replay", "ml-100k"): [_AS_WINDOW, _AS_FINETUNE,
                                {**_AS_WINDOW, "theta_lr": 6e-4},
                                {**_AS_FINETUNE, "theta_lr": 6e-4}],
    ("sml-replay", "synthetic"): [_AS_FINETUNE, {**_AS_FINETUNE, "theta_lr": 1e-4},
                                  {**_AS_FINETUNE, "theta_weight_decay": 1e-2,
                                   "theta_lr": 6e-4}],
}
KNOWN = {  # enqueued first: the paper's configuration, the study's earlier findings
    "sml": [{"transfer": "official", "hidden": 512, "outer_steps": 3, "what_epochs": 1,
             "what_lr": 1e-2, "theta_lr": 1e-3, "meta_passes": 1, "n_negatives": 1,
             "loss": "bce", "blend_window": 4},
            {"transfer": "residual", "hidden": 128, "outer_steps": 2, "what_epochs": 2,
             "what_lr": 0.0172, "theta_lr": 0.000613, "meta_passes": 2, "n_negatives": 1,
             "loss": "softmax", "blend_window": 4}],
    "window": [{"window": 3, "epochs": 20, "lr": 3e-3, "n_negatives": 4, "loss": "bce",
                "negatives": "uniform", "blend_window": 4}],
    "finetune": [{"epochs": 20, "lr": 3e-3, "n_negatives": 4, "loss": "bce",
                  "negatives": "uniform", "blend_window": 4}],
    "full": [{"epochs": 5, "lr": 3e-3, "n_negatives": 4, "loss": "bce",
              "negatives": "uniform", "blend_window": 4}],
}


def score(frame, method: str, params_list: list[dict], cfg: bt.BacktestConfig, cache: dict
          ) -> list[dict]:
    """Backtest ``method`` at each parameter set; per set, the blend weight with the best
    validation mean and its validation (and, when run, test) figures over seeds."""
    grid = {method: params_list}
    run = bt.run_backtest(frame, cfg.model_copy(update={"grids": grid, "methods": [method]}),
                          log=lambda _: None, cache=cache)
    table = sorted(bt.config_table(run.results)[method], key=lambda r: r["config"])
    out = []
    views_per = len(cfg.blends) or 1
    for i, params in enumerate(params_list):
        rows = table[i * views_per:(i + 1) * views_per]
        best = max(rows, key=lambda r: np.nan_to_num(r["val"], nan=-1))
        plain = next((r for r in rows if r["params"].get("blend", 0.0) == 0.0), rows[0])
        out.append({"params": params, "blend": best["params"].get("blend", 0.0),
                    "val": best["val"], "val_sd": best["val_sd"], "test": best["test"],
                    "test_sd": best["test_sd"], "val_no_blend": plain["val"],
                    "test_no_blend": plain["test"]})
    return out


def _flat(point: dict) -> dict:
    """A search point as the method's flat parameters (``objective`` expanded)."""
    point = dict(point)
    if "objective" not in point:
        return point
    objective = point.pop("objective")
    return {**point, **OBJECTIVES[objective]}


_TRIAL_LINE = re.compile(r"^trial\s+(\d+)\s+val ([-\d.na]+) ±([-\d.na]+) \(λ=([-\d.]+), "
                         r"no blend ([-\d.na]+)\)\s+(\d+) s\s+(\{.*\})$")


def read_trials(path: str) -> list[dict]:
    """The trials a search printed (its log), to run the final step again without searching
    again (e.g. after the final step failed)."""
    out = []
    for line in Path(path).read_text().splitlines():
        m = _TRIAL_LINE.match(line.strip())
        if m:
            out.append({"trial": int(m[1]), "val": float(m[2]), "val_sd": float(m[3]),
                        "blend": float(m[4]), "val_no_blend": float(m[5]),
                        "seconds": float(m[6]), "params": json.loads(m[7]),
                        "test": float("nan"), "test_sd": float("nan"),
                        "test_no_blend": float("nan")})
    if not out:
        raise SystemExit(f"{path}: no trial lines found")
    return out


def study(name: str, space: str, trials: int, timeout: float, seeds: tuple[int, ...],
          device: str, trials_from: str | None = None) -> dict:
    """Search ``space`` (a key of SPACES; its method is the part before any ``-``), or read
    the trials of an earlier search's log (``trials_from``), then run the named variants
    through the test periods."""
    import inspect

    import optuna

    method = space.split("-")[0]
    suggest = SPACES[space]
    takes_dataset = "dataset" in inspect.signature(suggest).parameters
    known_points = KNOWN_BY_DATASET.get((space, name)) or KNOWN[space]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frame = read_periods(prepare(name))
    cfg = bt.BacktestConfig(methods=[method], seeds=seeds, until="val", device=device,
                            progress=False)
    cache: dict = {}
    records = []
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=8)
    st = optuna.create_study(direction="maximize", sampler=sampler)
    for known in known_points:
        st.enqueue_trial(known)

    def objective(trial) -> float:
        start = time.perf_counter()
        params = suggest(trial, name) if takes_dataset else suggest(trial)
        res = score(frame, method, [params], cfg, cache)[0]
        res["trial"] = trial.number
        res["seconds"] = time.perf_counter() - start
        records.append(res)
        print(f"trial {trial.number:>3}  val {res['val']:.4f} ±{res['val_sd']:.4f} "
              f"(λ={res['blend']}, no blend {res['val_no_blend']:.4f})  "
              f"{res['seconds']:5.0f} s  {json.dumps(params)}", flush=True)
        return res["val"]

    if trials_from:
        records = read_trials(trials_from)
    else:
        st.optimize(objective, n_trials=trials, timeout=timeout)

    # The named variants, now through the test periods (reported, never chosen on).
    ranked = sorted(records, key=lambda r: -np.nan_to_num(r["val"], nan=-1))
    variants = {"best trial": ranked[0]["params"]}
    if space == "sml-replay":
        variants = {"the best baseline's training as step 1, Θ barely learning":
                    _flat(known_points[0]), **variants}
        for form in ("residual", "gated"):
            best = next((r for r in ranked if r["params"]["transfer"] == form), None)
            if best is not None:
                variants[f"best {form} trial"] = best["params"]
    elif method == "sml":
        variants = {"paper (official CNN, 1 negative)": KNOWN["sml"][0], **variants}
        for form in ("official", "residual", "gated"):
            best = next((r for r in ranked if r["params"]["transfer"] == form), None)
            if best is not None:
                variants[f"best {form} trial"] = best["params"]
    else:
        variants = {"first trial (the quality study's)": _flat(known_points[0]), **variants,
                    "second best trial": ranked[1]["params"] if len(ranked) > 1 else None}
    unique: dict[str, list[str]] = {}
    for label, params in variants.items():
        if params is not None:
            unique.setdefault(json.dumps(params, sort_keys=True), []).append(label)
    full = cfg.model_copy(update={"until": "test"})
    finals = score(frame, method, [json.loads(k) for k in unique], full, cache)
    final = [{"variants": labels, **res} for labels, res in zip(unique.values(), finals,
                                                                 strict=True)]
    for f in final:
        print(f"{' / '.join(f['variants']):<45} val {f['val']:.4f}  test {f['test']:.4f} "
              f"±{f['test_sd']:.4f} (λ={f['blend']}); no blend: val {f['val_no_blend']:.4f} "
              f"test {f['test_no_blend']:.4f}")
    return {"dataset": name, "method": space, "seeds": list(seeds), "trials": records,
            "final": final}


def markdown(out: dict) -> str:
    hw = out["hardware"]
    lines = [f"# {out['method']} study on {out['dataset']}: validation only, "
             f"{len(out['seeds'])} seeds a trial", "",
             f"Measured on {hw['cpu']} ({hw['cpu_count']} cores), device `{hw['device']}`. "
             f"Optuna TPE over {out['method']}'s training; every trial is the mean NDCG@20 "
             "over seeds on the validation periods, at its best blend weight λ (chosen on "
             "validation too). Test periods were run only for the variants in the first "
             "table, after the search. Reproduce: `python -m benchmarks.sml_study --method "
             f"{out['method']} --only {out['dataset']}`." + (
                 f" {out['note']}" if out.get("note") else ""), "",
             "| variant | params | λ | val NDCG@20 | test NDCG@20 | val, no blend | "
             "test, no blend |", "|---|---|---|---|---|---|---|"]
    for f in out["final"]:
        lines.append(f"| {' / '.join(f['variants'])} | `{json.dumps(f['params'])}` | "
                     f"{f['blend']} | {f['val']:.4f} ± {f['val_sd']:.4f} | "
                     f"{f['test']:.4f} ± {f['test_sd']:.4f} | {f['val_no_blend']:.4f} | "
                     f"{f['test_no_blend']:.4f} |")
    lines += ["", "All trials, best validation first:", "",
              "| trial | params | λ | val NDCG@20 | val, no blend | seconds |",
              "|---|---|---|---|---|---|"]
    for r in sorted(out["trials"], key=lambda r: -np.nan_to_num(r["val"], nan=-1)):
        lines.append(f"| {r['trial']} | `{json.dumps(r['params'])}` | {r['blend']} | "
                     f"{r['val']:.4f} ± {r['val_sd']:.4f} | {r['val_no_blend']:.4f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["ml-100k", "synthetic"], default="ml-100k")
    ap.add_argument("--method", choices=list(SPACES), default="sml",
                    help="the search space: sml (the first SML search), sml-replay (the "
                    "second: baseline-like step 1, replay, Θ's capacity and decay), or a "
                    "baseline's (window, finetune, full)")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the search")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trials-from", metavar="LOG", help="skip the search: read the trials "
                    "an earlier run printed (its log) and run only the final, test step")
    args = ap.parse_args()
    configure_threads()
    device = pick_device(args.device)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    out = {"hardware": hardware(device), "produced_by": produced_by(),
           **study(args.only, args.method, args.trials, args.timeout, seeds, str(device),
                    args.trials_from)}
    if args.trials_from:
        out["note"] = ("The trials were read back from the search's printed log "
                       "(`--trials-from`; figures to 4 decimals) and only the final step ran "
                       "again.")
    path = RESULTS / f"study-{args.method}-{args.only}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    md = Path(str(path).removesuffix(".json") + ".md")
    md.write_text(markdown(out))
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
