"""``smlrec pipeline ...``: compile, run locally, backfill, submit and schedule on Kubeflow."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from smlrec.data.cli import reports_errors

app = typer.Typer(name="pipeline", no_args_is_help=True, rich_markup_mode="markdown",
                  help="The Kubeflow pipelines: compile the YAML for the UI, run locally "
                  "(embedded mode), backfill a range of periods, submit or schedule on a "
                  "cluster.")

HERE = Path(__file__).resolve().parent
DAILY_YAML = HERE / "daily.yaml"
BOOTSTRAP_YAML = HERE / "bootstrap.yaml"

DataOpt = Annotated[str, typer.Option(help="Period-partitioned interaction store.")]
StateOpt = Annotated[str, typer.Option(help="State store (models, pointers, decisions).")]
BentoOpt = Annotated[str, typer.Option(
    help="BentoML model store the package steps write to and `make serve` reads; empty: "
    "$BENTOML_HOME, else BentoML's ~/bentoml.")]


@app.command()
@reports_errors
def compile(out: Annotated[Path, typer.Option(help="Daily pipeline YAML.")] = DAILY_YAML,
            bootstrap_out: Annotated[Path, typer.Option(help="Bootstrap pipeline YAML.")]
            = BOOTSTRAP_YAML) -> None:
    """Write the pipelines' IR YAML, the files to upload in the Kubeflow UI."""
    from pipelines.daily import bootstrap_pipeline, compile_pipeline, daily_pipeline

    compile_pipeline(daily_pipeline, out)
    compile_pipeline(bootstrap_pipeline, bootstrap_out)
    typer.echo(f"wrote {out} and {bootstrap_out}")


ConfigOpt = Annotated[str, typer.Option(
    "--config", help="Run configuration (YAML) the backtest wrote: challengers, popularity "
    "floor, pretraining, seed (e.g. configs/ml-100k.yaml); empty: built-in defaults.")]
PeriodOpt = Annotated[str, typer.Option(
    help="Period length (1D, 7D...); default: the one the data store was made with.")]
ToleranceOpt = Annotated[float, typer.Option(
    help="Gate: how far (relative) below the incumbent's NDCG@20 a challenger may be and "
    "still be promoted; negative: the run configuration's.")]


@app.command()
@reports_errors
def bootstrap(until: Annotated[str, typer.Option(help="Last meta-training period, "
                                                  "YYYY-MM-DD.")],
              data_uri: DataOpt = "data/ml-100k", state_uri: StateOpt = "runs/state",
              config: ConfigOpt = "") -> None:
    """Run once before the daily runs: pretrain W_0, meta-train Θ and train the other
    challengers up to --until; the store keeps the run configuration."""
    from pipelines.local import default_work_dir, run_bootstrap

    cand = run_bootstrap(data_uri, state_uri, until, default_work_dir(), config_uri=config)
    typer.echo(f"bootstrap done: candidate models of period {cand} in {state_uri}")


@app.command()
@reports_errors
def run(period: Annotated[str, typer.Option(help="Period to process, YYYY-MM-DD (its first "
                                             "day).")],
        data_uri: DataOpt = "data/ml-100k", state_uri: StateOpt = "runs/state",
        input_file: Annotated[str, typer.Option(
            help="Raw file of the period to validate and import, or the API's feedback log "
            "folder of the period (<data>/feedback/period=<id>); default: the stored one.")]
        = "",
        period_spec: PeriodOpt = "", tolerance: ToleranceOpt = -1.0,
        bentoml_home: BentoOpt = "runs/bentoml",
        runs_dir: Annotated[Path, typer.Option(
            help="Folder for the log, the kept reports and the runner's working folder.")]
        = Path("runs"),
        verbose: Annotated[bool, typer.Option(
            "--verbose", help="Stream the runner's output instead of logging it.")] = False
        ) -> None:
    """Run the daily pipeline for one period with KFP's local runner. A period already done
    is skipped: re-gating it would test its own candidate on its own training data."""
    from pipelines.local import run_periods
    from smlrec.registry import check_period_id

    check_period_id(period)  # before anything: a period id is a path component
    spec = _period_spec(period_spec, data_uri)
    with _console(runs_dir, verbose) as console:
        run_periods([period], data_uri, state_uri, runs_dir, console, input_file=input_file,
                    period_spec=spec, tolerance=tolerance,
                    bentoml_home=_abs_or_empty(bentoml_home))


RunsOpt = Annotated[Path, typer.Option(
    help="Folder for this command's log (logs/), each period's kept reports (reports/<period>/) "
    "and the runner's working folders while a run is on (kfp/).")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", help="Stream the runner's, Great Expectations' and Feast's output here "
    "instead of into the log file.")]


def _console(runs_dir: Path, verbose: bool):
    from pipelines.local import Console

    log = runs_dir / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}.log"
    console = Console(log, verbose)
    if not verbose:
        typer.echo(f"log: {log} (--verbose streams it here)")
    return console


@app.command()
@reports_errors
def backfill(start: Annotated[str, typer.Option("--from", help="First period, YYYY-MM-DD.")],
             end: Annotated[str, typer.Option("--to", help="Last period, inclusive.")],
             data_uri: DataOpt = "data/ml-100k", state_uri: StateOpt = "runs/state",
             period_spec: PeriodOpt = "", tolerance: ToleranceOpt = -1.0,
             bentoml_home: BentoOpt = "runs/bentoml", runs_dir: RunsOpt = Path("runs"),
             verbose: VerboseOpt = False) -> None:
    """Run the daily pipeline for every stored period in a range, in order, skipping the
    periods already done (the embedded schedule; safe to re-run)."""
    from pipelines.local import run_periods
    from smlrec.data.store import list_periods

    periods = [p for p in list_periods(data_uri) if start <= p <= end]
    if not periods:
        raise typer.BadParameter(f"no stored periods between {start} and {end} in {data_uri}")
    spec = _period_spec(period_spec, data_uri)
    with _console(runs_dir, verbose) as console:
        run_periods(periods, data_uri, state_uri, runs_dir, console, period_spec=spec,
                    tolerance=tolerance, bentoml_home=_abs_or_empty(bentoml_home))


def _period_spec(given: str, data_uri: str) -> str:
    """The period length to use: the one given, else the data store's."""
    if given:
        return given
    from smlrec.data.store import read_dataset_info

    spec = read_dataset_info(data_uri).get("period")
    if not spec:
        raise typer.BadParameter(f"{data_uri} does not record its period length; pass one",
                                 param_hint="--period-spec")
    return spec


def _abs_or_empty(path: str) -> str:
    """An absolute local path (KFP's local tasks run elsewhere), or '' for BentoML's default."""
    path = path or os.environ.get("BENTOML_HOME", "")
    return str(Path(path).resolve()) if path and "://" not in path else path


def _client(host: str):
    import kfp

    return kfp.Client(host=host)


@app.command()
@reports_errors
def submit(host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint.")],
           period: Annotated[str, typer.Option(help="Period, YYYY-MM-DD.")],
           data_uri: DataOpt = "s3://smlrec/data", state_uri: StateOpt = "s3://smlrec/state",
           experiment: str = "smlrec") -> None:
    """Submit one daily run to a Kubeflow cluster (uploads the compiled YAML)."""
    client = _client(host)
    run = client.create_run_from_pipeline_package(
        str(DAILY_YAML), arguments={"period": period, "data_uri": data_uri,
                                    "state_uri": state_uri},
        experiment_name=experiment, run_name=f"smlrec-daily-{period}", enable_caching=False)
    typer.echo(f"submitted run {run.run_id}")


@app.command()
@reports_errors
def schedule(host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint.")],
             cron: Annotated[str, typer.Option(
                 help="Six-field cron, seconds first, e.g. '0 0 2 * * *' (02:00 daily).")]
             = "0 0 2 * * *",
             data_uri: DataOpt = "s3://smlrec/data", state_uri: StateOpt = "s3://smlrec/state",
             experiment: str = "smlrec") -> None:
    """Create the recurring daily run: each run processes the period that closed before its
    scheduled time; at most one run at a time."""
    if len(cron.split()) != 6:
        raise typer.BadParameter("KFP cron has six fields, seconds first", param_hint="--cron")
    client = _client(host)
    exp = client.create_experiment(experiment)
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name="smlrec-daily", cron_expression=cron,
        max_concurrency=1, no_catchup=True, pipeline_package_path=str(DAILY_YAML),
        params={"period": "scheduled", "data_uri": data_uri, "state_uri": state_uri},
        enable_caching=False)
    typer.echo(f"scheduled recurring run {job.recurring_run_id} ({cron})")


@app.command()
@reports_errors
def report(state_uri: StateOpt = "runs/state",
           out: Annotated[Path, typer.Option(help="HTML file to write.")]
           = Path("runs/report.html"), runs_dir: RunsOpt = Path("runs")) -> None:
    """Write one self-contained HTML page for a state store: what is serving, the gate's
    figures over time for every model it scored (NDCG and Recall at 5/10/20, intervals
    against the floor, users scored), each period's decision with links to its kept
    validation, features and gate reports and its step times, the models packaged, and
    the run configuration."""
    from pipelines.local import write_report
    from smlrec.registry import StateStore

    store = StateStore(state_uri)
    decisions = store.decisions()
    if not decisions:
        raise typer.BadParameter(f"{state_uri} has no gate decisions to report (is it the "
                                 "state store `make run` or `pipeline demo` wrote?); "
                                 f"{out} was left as it was", param_hint="--state-uri")
    write_report(store, out, runs_dir)
    typer.echo(f"wrote {out}")


@app.command()
@reports_errors
def demo(data_uri: DataOpt = "data/ml-100k", state_uri: StateOpt = "runs/state",
         config: ConfigOpt = "configs/ml-100k.yaml",
         meta_periods: Annotated[int, typer.Option(help="Bootstrap: meta-training periods "
                                                   "(after the configuration's pretraining "
                                                   "periods).")] = 12,
         period_spec: PeriodOpt = "",
         out: Annotated[Path, typer.Option(help="HTML report.")] = Path("runs/report.html"),
         bentoml_home: BentoOpt = "runs/bentoml", runs_dir: RunsOpt = Path("runs"),
         verbose: VerboseOpt = False) -> None:
    """The embedded production loop on stored data: bootstrap on the first periods (once),
    then the daily pipeline for every later period in order (skipping finished ones),
    a table row per period and an HTML report of the history."""
    from pipelines.local import run_bootstrap, run_periods, write_report
    from smlrec.config import DailyConfig
    from smlrec.data.store import list_periods
    from smlrec.registry import StateStore

    if config and not Path(config).is_file():
        raise typer.BadParameter(f"{config} does not exist (write one with `smlrec backtest "
                                 "--write-config`, or pass --config '' for the defaults)",
                                 param_hint="--config")
    cfg = DailyConfig.load(config) if config else DailyConfig()
    periods = list_periods(data_uri)
    until = cfg.pretrain_periods + meta_periods
    if len(periods) <= until:
        raise typer.BadParameter(f"{data_uri} has {len(periods)} periods; the demo needs more "
                                 f"than {until}")
    spec = _period_spec(period_spec, data_uri)
    store = StateStore(state_uri)
    start = time.perf_counter()
    with _console(runs_dir, verbose) as console:
        if store.get_pointer("candidate") is None:
            console.echo(f"bootstrap: pretrain on {periods[0]}..{periods[cfg.pretrain_periods - 1]}"
                         f", meta-train until {periods[until - 1]}; challengers "
                         f"{', '.join(cfg.names)}; floor pop {cfg.floor.params}"
                         + (f" (from {config})" if config else ""))
            work = runs_dir / "kfp" / "bootstrap"
            run_bootstrap(data_uri, state_uri, periods[until - 1], str(work), config_uri=config)
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        results = run_periods(periods[until:], data_uri, state_uri, runs_dir, console,
                              period_spec=spec, bentoml_home=_abs_or_empty(bentoml_home))
    write_report(store, out, runs_dir)
    prod = store.pointer_info("production")
    ran = [r for r in results if not r.get("skipped")]
    promoted = sum(r.get("decision") == "promote" for r in ran)
    typer.echo(f"{len(ran)} daily runs in {time.perf_counter() - start:.0f} s "
               f"({len(results) - len(ran)} already done); {promoted} of {len(ran)} gates "
               "promoted. Serving: "
               + (f"the {prod.get('strategy')} model of period {prod['period']}" if prod else
                  "popular items (nothing promoted yet)")
               + f". Report: {out}; kept reports: {runs_dir / 'reports'}; `make serve` serves "
               f"what was packaged into {bentoml_home}.")
