"""The ``smlrec data`` commands: fetch, import, synth, info."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from smlrec.data import default_data_root
from smlrec.data.importer import TIME_UNITS, import_file
from smlrec.data.movielens import fetch_movielens_100k
from smlrec.data.periods import parse_period
from smlrec.data.store import period_row_counts, read_dataset_info
from smlrec.data.synthetic import write_synthetic
from smlrec.errors import SmlrecError

app = typer.Typer(
    rich_markup_mode="markdown",  # docstrings wrap: one paragraph per blank line
    name="data",
    help="Get interaction data into the period-partitioned store: fetch MovieLens-100k, "
    "import your own logs, generate a synthetic stream, inspect a dataset.",
    no_args_is_help=True,
)

F = TypeVar("F", bound=Callable[..., Any])
DATASETS = ("ml-100k",)


def reports_errors(command: F) -> F:
    """Print ``error: <message>`` to stderr and exit with code 2 on a :class:`SmlrecError`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SmlrecError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc

    return wrapper  # type: ignore[return-value]


def _check_period(spec: str) -> str:
    """Typer callback: ``ND`` (N-day blocks) or W, M, Q (calendar weeks, months, quarters)."""
    try:
        parse_period(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return spec


def _check_time_unit(unit: str) -> str:
    """Typer callback: numeric timestamps are epochs in s, ms, us or ns."""
    if unit not in TIME_UNITS:
        raise typer.BadParameter(f"unknown time unit {unit!r}; choose from {', '.join(TIME_UNITS)}")
    return unit


def _check_dataset(name: str) -> str:
    """Typer callback: only the datasets :func:`fetch` knows."""
    if name not in DATASETS:
        raise typer.BadParameter(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return name


def _print_summary(summary: dict[str, Any]) -> None:
    """Print a dataset summary as a few aligned lines."""
    typer.echo(
        f"{summary['name']}: {summary['n_rows']:,} interactions, {summary['n_users']:,} users, "
        f"{summary['n_items']:,} items, {summary['n_periods']} periods of {summary['period']} "
        f"({summary['first_period']} .. {summary['last_period']})"
    )
    typer.echo(f"Written to {summary['root']}")


PeriodOpt = Annotated[
    str,
    typer.Option(
        "--period-spec", callback=_check_period,
        help="Period length: ND days (1D, 7D: Monday-Sunday weeks), or a calendar period: W "
        "(ISO weeks), M (months), Q (quarters).",
    ),
]
OutOpt = Annotated[
    str | None,
    typer.Option("--out", help="Dataset root (folder or fsspec URL). (default: data/<name>)"),
]


@app.command()
@reports_errors
def fetch(
    dataset: Annotated[
        str, typer.Option("--dataset", callback=_check_dataset, help="Dataset to fetch.")
    ] = "ml-100k",
    out: OutOpt = None,
    period: PeriodOpt = "7D",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Download cache. (default: $SMLREC_CACHE or ~/.cache/smlrec)"
        ),
    ] = None,
) -> None:
    """Download a public dataset and store its positives by period.

    ml-100k: MovieLens-100k from the recbole==1.2.1 wheel on PyPI,
    downloaded once with pip, cached, and checked against recorded sha256 sums.
    Stores the positives (rating >= 4) and the users and items side tables.
    Replaces whatever is stored at --out.
    """
    root = out or default_data_root(dataset)
    _print_summary(fetch_movielens_100k(root, cache_dir=cache_dir, period=period))


@app.command("import")
@reports_errors
def import_(
    file: Annotated[str, typer.Argument(
        help="CSV, TSV, .inter, Parquet or JSON-lines file (path or URL; text may be "
        "compressed: .gz, .bz2, .xz, .zst).")],
    out: OutOpt = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="csv, tsv, parquet or jsonl. (default: from the suffix; .dat, .txt "
        "and others need --format or --sep)")] = None,
    sep: Annotated[str | None, typer.Option(
        help="Text separator, taken literally, e.g. '::' (MovieLens-1M ratings.dat) or "
        "'|'. (default: the format's)")] = None,
    no_header: Annotated[bool, typer.Option(
        "--no-header", help="The file has no header row: columns are named by position, "
        "0, 1, 2... (e.g. --user-col 0 --item-col 1 --time-col 3).")] = False,
    user_col: Annotated[str, typer.Option(help="Column holding user ids.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="Column holding item ids.")] = "item_id",
    time_col: Annotated[str, typer.Option(
        help="Column holding timestamps, or several columns, comma-separated, holding year, "
        "month, day[, hour, minute, second] (e.g. year,month,day).")] = "timestamp",
    time_format: Annotated[str | None, typer.Option(
        help="strftime format of text timestamps, e.g. '%d/%m/%Y' (default: inferred; "
        "ISO 8601 always works).")] = None,
    rating_col: Annotated[
        str | None,
        typer.Option(
            help="Rating column; rows below --min-rating are dropped. (default: "
            "'rating' if present)"
        ),
    ] = None,
    min_rating: Annotated[float, typer.Option(help="Smallest rating that is a positive.")] = 4.0,
    time_unit: Annotated[
        str,
        typer.Option(
            callback=_check_time_unit,
            help="Unit of numeric (unix epoch) timestamps: s, ms, us, ns or D (days).",
        ),
    ] = "s",
    period: PeriodOpt = "1D",
    name: Annotated[
        str | None, typer.Option(help="Dataset name in dataset.json. (default: file stem)")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Import even when the import looks wrong (times before 1990 or in "
        "the future, a whole log in one period, most rows dropped).")] = False,
) -> None:
    """Import an interaction log (CSV, TSV, .inter, Parquet or JSON lines) into the store.

    Every kept row is a positive; ids become strings. Numeric timestamps are unix epochs in
    --time-unit; text ones are parsed (no offset means UTC).

    The file's periods replace the same periods at --out, other periods stay: daily logs
    can be imported one after another.

    A report (rows read, rows dropped by reason, columns ignored, rows per period) is
    printed and saved as import_report.json beside the data. An import that looks wrong
    stops, writes nothing and says which option fixes it (--force imports it anyway).
    """
    stem = Path(file.split("?")[0]).name.split(".")[0]
    summary = import_file(
        file,
        out or default_data_root(name or stem),
        name=name,
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        rating_col=rating_col or "rating",
        min_rating=min_rating,
        time_unit=time_unit,
        time_format=time_format,
        period=period,
        fmt=fmt,
        sep="\t" if sep in ("\\t", "tab") else sep,  # a tab as typed in a shell
        header=not no_header,
        force=force,
    )
    report = summary["report"]
    dropped = ", ".join(f"{n:,} {why}" for why, n in report["dropped"].items()) or "none"
    typer.echo(f"Read {summary['rows_read']:,} rows, kept {summary['rows_imported']:,} "
               f"(dropped: {dropped}).")
    if report["columns_ignored"]:
        typer.echo(f"Columns ignored: {', '.join(report['columns_ignored'])}.")
    if report["empty_periods"]:
        shown = ", ".join(report["empty_periods"][:5])
        more = len(report["empty_periods"]) - 5
        typer.echo(f"Empty periods (no rows, kept as gaps): {shown}"
                   + (f" and {more} more" if more > 0 else "") + ".")
    for warning in report["warnings"]:
        typer.echo(f"Warning (imported with --force): {warning}")
    _print_summary(summary)
    typer.echo(f"Import report: {summary['root'].rstrip('/')}/import_report.json")


@app.command()
@reports_errors
def synth(
    out: OutOpt = None,
    users: Annotated[int, typer.Option(min=1, help="Users in the whole stream.")] = 2000,
    items: Annotated[int, typer.Option(min=1, help="Items in the catalogue.")] = 1000,
    periods: Annotated[int, typer.Option(min=1, help="Number of periods.")] = 20,
    per_period: Annotated[int, typer.Option(min=1, help="Interactions per period.")] = 20000,
    returning_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of active users seen before.")
    ] = 0.6,
    drift: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Taste drift per period (0 = none).")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    period: PeriodOpt = "1D",
) -> None:
    """Generate a synthetic stream with drifting tastes and store it.

    Users and items have latent taste vectors that drift every period.
    Each period mixes returning and new users,
    who pick items by taste and popularity.
    Replaces whatever is stored at --out.
    """
    summary = write_synthetic(
        out or default_data_root("synthetic"),
        n_users=users,
        n_items=items,
        n_periods=periods,
        interactions_per_period=per_period,
        returning_share=returning_share,
        drift=drift,
        seed=seed,
        period=period,
    )
    _print_summary(summary)


@app.command()
@reports_errors
def info(
    root: Annotated[
        str | None, typer.Argument(help="Dataset root. (default: data/ml-100k)")
    ] = None,
) -> None:
    """Show a dataset's dataset.json and the rows stored in each period."""
    root = root or default_data_root("ml-100k")
    meta = read_dataset_info(root)
    shown = {k: v for k, v in meta.items() if k not in ("periods", "rows_per_period")}
    typer.echo(json.dumps(shown, indent=2))
    typer.echo("period        rows")
    for pid, rows in period_row_counts(root).items():
        typer.echo(f"{pid}  {rows:>8,}")
