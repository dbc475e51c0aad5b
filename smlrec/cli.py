"""The ``smlrec`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from smlrec.data.cli import app as data_app
from smlrec.data.cli import reports_errors

if TYPE_CHECKING:
    from smlrec.backtest import Split

app = typer.Typer(
    rich_markup_mode="markdown",  # docstrings wrap: one paragraph per blank line
    name="smlrec",
    help="Retrain a recommender every period with Sequential Meta-Learning (SML), "
    "and compare it with the ways recommenders are retrained today.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
# The `pipeline` group is added by pipelines/entry.py, the `smlrec` command's entry point:
# the core library never imports the orchestrator (nor KFP, Feast or BentoML).


@app.callback()
def _setup() -> None:
    from smlrec.device import configure_threads

    configure_threads()


def _split(text: str) -> Split:
    """``--split pretrain,meta,val,test`` as a ``Split``."""
    from smlrec.backtest import Split

    parts = [int(x) for x in text.split(",")]
    if len(parts) != 4:
        raise typer.BadParameter("give four numbers: pretrain,meta,val,test",
                                 param_hint="--split")
    return Split(**dict(zip(("pretrain", "meta", "val", "test"), parts, strict=True)))


@app.command()
@reports_errors
def backtest(
    dataset: Annotated[str, typer.Option(
        help="A dataset stored under data/ (or $SMLREC_DATA/) by this name; --data takes "
        "any stored dataset by path instead.")] = "ml-100k",
    data_root: Annotated[str | None, typer.Option(
        "--data", "--data-root",
        help="The stored dataset to replay (a folder or fsspec URL written by `smlrec data "
        "fetch`, `data import` or `data synth`); its name and period length are read from "
        "it. (default: data/<dataset>)")] = None,
    period: Annotated[str | None, typer.Option(
        "--period-spec",
        help="Check that the stored period length is this (e.g. 7D); the data store fixes it.")]
    = None,
    methods: Annotated[str, typer.Option(
        help="Comma-separated: sml, full (retrain on all history), finetune (new period "
        "only), window (last n periods), pop (popularity over the last n periods, or decayed).")]
    = "sml,full,finetune,window,pop",
    out: Annotated[Path, typer.Option(help="Folder for per_period.csv, summary.json, chart.png.")]
    = Path("runs/backtest"),
    split: Annotated[str | None, typer.Option(
        help="Periods for pretrain,meta,val,test, e.g. 10,12,3,7 (default: 10/12/3/7 of 32, "
        "scaled to the data).")] = None,
    grid: Annotated[Path | None, typer.Option(
        help="JSON file mapping each method to a list of parameter sets, e.g. "
        '{"window": [{"window": 3, "epochs": 20, "lr": 0.003}], "pop": [{"window": 4}]}, '
        "replacing the built-in grids; each method's set with the best validation NDCG@20 "
        "(mean over seeds) is reported.")] = None,
    seeds: Annotated[str, typer.Option(
        help="Comma-separated seeds; every figure is a mean over them, with its spread.")]
    = "0,1,2",
    blends: Annotated[str, typer.Option(
        help="Blend weights λ scored for every MF config (score + λ·log1p(recent "
        "popularity)), chosen on validation; '0' turns the blend off.")]
    = ",".join(str(b) for b in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)),
    pretrain_epochs: Annotated[int, typer.Option(help="Epochs of MF training for W_0.")] = 20,
    pretrain_lr: Annotated[float, typer.Option(help="Adam learning rate for W_0.")] = 3e-3,
    loss: Annotated[str, typer.Option(
        help="Default loss: bce (sampled negatives), bpr or softmax (in-batch + sampled "
        "negatives, logQ-corrected); a grid's `loss` overrides it.")] = "bce",
    negatives: Annotated[str, typer.Option(
        help="Default negatives: uniform, popularity or hard.")] = "uniform",
    write_config: Annotated[Path | None, typer.Option(
        help="Write the daily run's configuration chosen on validation here (e.g. "
        "configs/ml-100k.yaml): SML and the best other method as challengers, the "
        "validated popularity floor.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")]
    = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    jobs: Annotated[int, typer.Option(
        min=0, help="Seeds run side by side in this many processes (0: one per seed, up to "
        "the CPU cores; 1 on a GPU). Figures are the same; training seconds are measured "
        "with the workers sharing the machine.")] = 0,
) -> None:
    """Replay the periods in order: pretrain W_0, meta-train, choose hyper-parameters on the
    validation periods (mean over seeds), and report every method on the test periods (each
    model tested on the period after the one it was trained on), with bootstrap intervals
    against the validated popularity floor."""
    from smlrec import backtest as bt
    from smlrec.config import LossConfig
    from smlrec.data import default_data_root
    from smlrec.data.store import read_dataset_info, read_periods
    from smlrec.device import pick_device
    from smlrec.errors import DataError

    root = data_root or default_data_root(dataset)
    info = read_dataset_info(root)
    if period and info.get("period") != period:
        raise DataError(root, f"stored with {info.get('period')} periods, not {period}: drop "
                        f"--period-spec to use them, or import the log again with `smlrec "
                        f"data import FILE --period-spec {period} --out NEW_FOLDER` and pass "
                        "--data NEW_FOLDER")
    if data_root:
        dataset = str(info.get("name") or dataset)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(bt.DEFAULT_GRIDS))
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(bt.DEFAULT_GRIDS)}", param_hint="--methods")
    cfg_kw = {}
    if split:
        cfg_kw["split"] = _split(split)
    if grid:
        cfg_kw["grids"] = json.loads(grid.read_text())
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        blend_list = tuple(float(x) for x in blends.split(",") if x.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers ({exc})") from exc
    if not seed_list:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    cfg = bt.BacktestConfig(methods=names, pretrain_epochs=pretrain_epochs,
                            pretrain_lr=pretrain_lr, seeds=seed_list, blends=blend_list,
                            loss=LossConfig(loss=loss, negatives=negatives),
                            device=str(pick_device(device)), progress=progress,
                            partial_dir=str(out), **cfg_kw)
    frame = read_periods(root)
    gaps = bt.empty_periods(frame, str(info.get("period") or ""))
    if gaps:
        typer.echo(f"warning: {len(gaps)} empty period(s) between the first and the last "
                   f"({', '.join(gaps[:5])}{' ...' if len(gaps) > 5 else ''}): a model is "
                   "tested on the next period that has interactions", err=True)
    try:
        run = bt.run_backtest(frame, cfg, log=typer.echo,
                              jobs=jobs or bt.auto_jobs(len(seed_list), cfg.device))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--grid") from exc
    except KeyboardInterrupt:
        typer.echo(f"stopped; the periods done so far are in {out}/per_period.seed*.partial"
                   ".jsonl (one JSON row per method, configuration and period)", err=True)
        raise typer.Exit(130) from None
    chosen = bt.select_configs(run.results)
    summary = bt.summarize(run, chosen, dataset)
    summary["ratios"] = bt.ratios(summary)
    paths = bt.write_outputs(run, summary, out)
    typer.echo(bt.format_summary(summary))
    typer.echo(f"wrote {paths['csv']}, {paths['summary']}, {paths['chart']}")
    if write_config:
        conf = bt.run_config(summary, cfg, run.split, period=str(info.get("period", "")))
        write_config.parent.mkdir(parents=True, exist_ok=True)
        write_config.write_text(conf.to_yaml())
        typer.echo(f"wrote {write_config}: challengers "
                   f"{', '.join(c.method for c in conf.challengers)}, floor pop "
                   f"{json.dumps(conf.floor.params)}")


@app.command("cold-track")
@reports_errors
def cold_track(
    dataset: Annotated[str, typer.Option(
        help="A dataset stored under data/ (or $SMLREC_DATA/) by this name; --data takes "
        "any stored dataset by path instead.")] = "ml-100k",
    data_root: Annotated[str | None, typer.Option(
        "--data", help="The stored dataset (with `users` / `items` side tables: `smlrec data "
        "fetch` and `data synth` write them). (default: data/DATASET)")] = None,
    config: Annotated[Path | None, typer.Option(
        help="The daily run's configuration whose non-SML challenger is the MF champion "
        "(the mean-embedding path) and whose floor is the popularity floor (default: "
        "configs/DATASET.yaml when it exists, else the built-in window and popularity "
        "over 4 periods).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for per_period.csv and cold.json.")]
    = Path("runs/cold-track"),
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    split: Annotated[str | None, typer.Option(
        help="Periods for pretrain,meta,val,test (default: 10/12/3/7 of 32, scaled).")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay the periods for users the models do not know yet: each new user's first 1, 3
    or 5 items as the support and the rest to predict, plus the returning users, scoring the
    popularity floor, the MF champion (the mean embedding of the support for a new user),
    MeLU, the two-tower model, MetaSelector and the per-user oracle. Configurations and
    blends are chosen on the validation periods; the test periods are reported with paired
    bootstrap intervals."""
    from smlrec import coldtrack as ct
    from smlrec.backtest import _jsonable, auto_jobs
    from smlrec.config import DailyConfig
    from smlrec.data import default_data_root
    from smlrec.data.store import read_dataset_info, read_periods
    from smlrec.device import pick_device
    from smlrec.errors import DataError
    from smlrec.side import load_side_tables

    root = data_root or default_data_root(dataset)
    info = read_dataset_info(root)
    name = str(info.get("name") or dataset)
    users, items = load_side_tables(root)
    if users is None and items is None:
        raise DataError(root, "has no users or items side table: MeLU and the two-tower "
                        "model need features (store them as <root>/side/users.parquet and "
                        "items.parquet)")
    kw: dict = {}
    path = config or Path("configs") / f"{name}.yaml"
    if path.exists():
        conf = DailyConfig.load(str(path))
        kw = {"champion": next(c for c in conf.challengers if c.method != "sml"),
              "floor": conf.floor}
    seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
    cfg = ct.ColdTrackConfig(seeds=seed_list, device=str(pick_device(device)),
                             progress=progress, **kw)
    sp = _split(split) if split else None
    run = ct.run_cold_track(read_periods(root), users, items, cfg, sp, log=typer.echo,
                            jobs=auto_jobs(len(seed_list), cfg.device))
    summary = ct.summarize_cold(run, cfg.primary_support)
    out.mkdir(parents=True, exist_ok=True)
    run.results.to_csv(out / "per_period.csv", index=False)
    (out / "cold.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    typer.echo(ct.format_cold(summary))
    typer.echo(f"wrote {out / 'per_period.csv'} and {out / 'cold.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
