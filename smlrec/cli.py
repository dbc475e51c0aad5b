"""The ``smlrec`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from smlrec.data.cli import app as data_app
from smlrec.data.cli import reports_errors

app = typer.Typer(
    name="smlrec",
    help="Retrain a recommender every period with Sequential Meta-Learning (SML), "
    "and compare it with the ways recommenders are retrained today.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")

# The pipeline commands live with the pipelines (they need KFP); the core library itself
# never imports KFP, Feast or BentoML.
try:
    from pipelines.cli import app as _pipeline_app
except ModuleNotFoundError:  # an install without the stack extras (kfp)
    _pipeline_app = None
if _pipeline_app is not None:
    app.add_typer(_pipeline_app, name="pipeline")


@app.callback()
def _setup() -> None:
    from smlrec.device import configure_threads

    configure_threads()


@app.command()
@reports_errors
def backtest(
    dataset: Annotated[str, typer.Option(help="Dataset name; its data lives in --data-root.")]
    = "ml-100k",
    data_root: Annotated[str | None, typer.Option(
        help="Where the dataset is stored (default: data/<dataset>, or $SMLREC_DATA/<dataset>). "
        "Fill it with `smlrec data fetch`, `data import` or `data synth`.")] = None,
    period: Annotated[str | None, typer.Option(
        help="Check that the stored period length is this (e.g. 7D); the data store fixes it.")]
    = None,
    methods: Annotated[str, typer.Option(
        help="Comma-separated: sml, full (retrain on all history), finetune (new period "
        "only), window (last n periods), pop (last period's most popular items).")]
    = "sml,full,finetune,window,pop",
    out: Annotated[Path, typer.Option(help="Folder for per_period.csv, summary.json, chart.png.")]
    = Path("runs/backtest"),
    split: Annotated[str | None, typer.Option(
        help="Periods for pretrain,meta,val,test, e.g. 10,12,3,7 (default: 10/12/3/7 of 32, "
        "scaled to the data).")] = None,
    grid: Annotated[Path | None, typer.Option(
        help="JSON file {method: [params, ...]} replacing the built-in hyper-parameter grids; "
        "the config with the best validation NDCG@20 is reported.")] = None,
    pretrain_epochs: Annotated[int, typer.Option(help="Epochs of MF training for W_0.")] = 20,
    loss: Annotated[str, typer.Option(help="bce (one sampled negative) or bpr.")] = "bce",
    negatives: Annotated[str, typer.Option(help="uniform or popularity negative sampling.")]
    = "uniform",
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")]
    = "auto",
    seed: Annotated[int, typer.Option(help="Random seed; runs are deterministic on CPU.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Replay the periods in order: pretrain W_0, meta-train, choose hyper-parameters on the
    validation periods, and report every method on the test periods (each model tested on
    the period after the one it was trained on)."""
    from smlrec import backtest as bt
    from smlrec.config import LossConfig
    from smlrec.data import default_data_root
    from smlrec.data.store import read_dataset_info, read_periods
    from smlrec.device import pick_device
    from smlrec.errors import DataError

    root = data_root or default_data_root(dataset)
    info = read_dataset_info(root)
    if period and info.get("period") != period:
        raise DataError(root, f"stored with period {info.get('period')!r}, not {period!r}; "
                        f"re-create it with --period {period}")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(bt.DEFAULT_GRIDS))
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(bt.DEFAULT_GRIDS)}", param_hint="--methods")
    cfg_kw = {}
    if split:
        parts = [int(x) for x in split.split(",")]
        if len(parts) != 4:
            raise typer.BadParameter("give four numbers: pretrain,meta,val,test",
                                     param_hint="--split")
        cfg_kw["split"] = bt.Split(**dict(zip(("pretrain", "meta", "val", "test"), parts,
                                              strict=True)))
    if grid:
        cfg_kw["grids"] = json.loads(grid.read_text())
    cfg = bt.BacktestConfig(methods=names, pretrain_epochs=pretrain_epochs, seed=seed,
                            loss=LossConfig(loss=loss, negatives=negatives),
                            device=str(pick_device(device)), progress=progress, **cfg_kw)
    frame = read_periods(root)
    results = bt.run_backtest(frame, cfg, log=typer.echo)
    chosen = bt.select_configs(results)
    summary = bt.summarize(results, chosen, dataset)
    summary["ratios"] = bt.ratios(summary)
    paths = bt.write_outputs(results, summary, out)
    typer.echo(bt.format_summary(summary))
    typer.echo(f"wrote {paths['csv']}, {paths['summary']}, {paths['chart']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
