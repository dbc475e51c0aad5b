"""Running the pipelines with KFP's local runner (the embedded mode), one run at a time."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from kfp import local

from pipelines.daily import bootstrap_pipeline, local_daily_pipeline
from smlrec.daily import is_done
from smlrec.data.periods import check_closed
from smlrec.data.store import has_dataset, read_dataset_info
from smlrec.errors import SmlrecError
from smlrec.registry import StateStore, check_period_id


def init_local(work_dir: str) -> None:
    """Local runner in this Python environment (no per-task venv, no installs)."""
    root = Path(work_dir).resolve()
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(root / "outputs"), workspace_root=str(root / "workspace"))


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def run_bootstrap(data_uri: str, state_uri: str, until: str, work_dir: str,
                  config_uri: str = "") -> str:
    """Run the bootstrap pipeline locally, holding the state store's lock. ``config_uri``
    is the run configuration (YAML); empty: the built-in defaults."""
    store = StateStore(_abs(state_uri))
    if config_uri:
        from smlrec.config import DailyConfig

        try:
            DailyConfig.load(_abs(config_uri))  # a bad file stops here, before any task runs
        except (OSError, ValueError) as exc:
            raise SmlrecError(f"{config_uri}: not a usable run configuration: {exc}") from exc
    with store.lock("bootstrap"):
        init_local(work_dir)
        try:
            bootstrap_pipeline(until=until, data_uri=_abs(data_uri),
                               state_uri=_abs(state_uri),
                               config_uri=_abs(config_uri) if config_uri else "")
        except RuntimeError as exc:
            raise SmlrecError(f"bootstrap stopped: {_plain(str(exc))}") from exc
    return store.get_pointer("candidate")


FEATURE_REPO = str(Path(__file__).resolve().parent.parent / "feature_repo")


def run_daily(period: str, data_uri: str, state_uri: str, work_dir: str,
              feature_repo: str = FEATURE_REPO, feature_data: str | None = None,
              **params) -> dict:
    """Run the daily pipeline locally for one period, holding the lock. Returns a summary
    (decision, scores, seconds), or ``{"skipped": True}`` when the period is already done."""
    check_period_id(period)  # before anything: a period id is a path component
    store = StateStore(_abs(state_uri))
    if is_done(store, period):
        return {"period": period, "skipped": True}
    if params.get("period_spec") or has_dataset(_abs(data_uri)):
        spec = params.get("period_spec") or read_dataset_info(_abs(data_uri))["period"]
        try:  # the pipeline's first step checks it too; here it is said before any work
            check_closed(period, spec)
        except ValueError as exc:
            raise SmlrecError(str(exc)) from None
    feature_data = feature_data or f"{_abs(state_uri).rstrip('/')}/features"
    start, wall_start = time.perf_counter(), time.time()
    with store.lock(f"daily {period}"):
        init_local(work_dir)
        try:
            local_daily_pipeline(period=period, data_uri=_abs(data_uri),
                                 state_uri=_abs(state_uri), feature_repo=_abs(feature_repo),
                                 feature_data=_abs(feature_data), **params)
        except RuntimeError as exc:  # KFP names the failed task; the log above has its error
            problems = validation_failures(Path(work_dir) / "outputs", wall_start)
            detail = f"; data validation failed: {'; '.join(problems)}" if problems else ""
            raise SmlrecError(f"daily run for {period} stopped: {_plain(str(exc))}{detail}"
                              ) from exc
    decisions = [d for d in store.decisions() if d.get("period") == period]
    last = decisions[-1] if decisions else {}
    prod = store.pointer_info("production")
    return {"period": period, "skipped": False, "decision": last.get("decision"),
            "strategy": last.get("strategy"), "challengers": last.get("challengers", []),
            "scores": last.get("scores", {}), "vs_floor": last.get("vs_floor", {}),
            "seconds": time.perf_counter() - start,
            "steps": step_seconds(Path(work_dir) / "outputs", wall_start),
            "production": prod.get("period"), "production_strategy": prod.get("strategy"),
            "candidate": store.get_pointer("candidate")}


# The runner names tasks after their components; the package component runs twice.
STEP_NAMES = {"package-op": "package-production", "package-op-2": "package-candidate"}


def step_seconds(outputs: Path, since: float) -> dict[str, float]:
    """Wall seconds of each task of the latest local run under ``outputs`` (tasks run one
    after another; each ends when it writes its executor_output.json). Includes each
    task's process start, which is what a step costs on the local runner."""
    runs = sorted(outputs.glob("smlrec-daily-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    ends = sorted((f.stat().st_mtime, STEP_NAMES.get(f.parent.name,
                                                     f.parent.name.removesuffix("-op")))
                  for f in runs[-1].rglob("executor_output.json"))
    out, prev = {}, since
    for end, name in ends:
        out[name] = round(end - prev, 2)
        prev = end
    return out


def validation_failures(outputs: Path, since: float) -> list[str]:
    """The failures listed by the validate step's report in the latest local run (written
    after ``since``), so that a stopped run names the problem, not only the task."""
    runs = sorted(outputs.glob("smlrec-daily-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return []
    for report in runs[-1].rglob("report"):
        if not report.parent.name.startswith("validate-op") or report.stat().st_mtime < since:
            continue
        text = report.read_text(errors="replace")
        section = text.partition("## Failures")[2].partition("## ")[0]
        return [m.group(1) for m in re.finditer(r"(?m)^\d+\. (.+)$", section)]
    return []


def _plain(text: str) -> str:
    """Drop the terminal colour codes KFP puts in its messages."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def default_work_dir() -> str:
    return os.environ.get("SMLREC_KFP_DIR") or tempfile.mkdtemp(prefix="smlrec-kfp-")


SUMMARY_HEAD = (f"{'period':<11} {'decision':<8} {'serving':<22} {'challengers (NDCG@20)':<32} "
                f"{'incumbent':>9} {'floor':>7} {'users':>5} {'seconds':>7}")


def summary_line(r: dict) -> str:
    """One aligned row per period (see ``SUMMARY_HEAD``)."""
    if r.get("skipped"):
        return f"{r['period']:<11} already done, skipped"
    s = r.get("scores", {})

    def ndcg(name: str) -> str:
        v = s.get(name, {}).get("ndcg@20")
        return "-" if v is None else f"{v:.4f}"

    mark = {r.get("strategy"): "*"}
    chal = " ".join(f"{n} {ndcg(n)}{mark.get(n, '')}" for n in r.get("challengers", []))
    prod = r.get("production")
    serving = f"{prod} {r.get('production_strategy') or ''}".strip() if prod else "popularity"
    users = s.get("popularity", {}).get("n_users", "-")
    return (f"{r['period']:<11} {r['decision'] or '-':<8} {serving:<22} {chal:<32} "
            f"{ndcg('incumbent'):>9} {ndcg('popularity'):>7} {users:>5} "
            f"{r['seconds']:7.1f}")


class Console:
    """The user's console while pipelines run: by default everything the runner, Great
    Expectations, Feast, the tasks and warnings write to the process's stdout and stderr
    (file descriptors 1 and 2, so task subprocesses too) goes to ``log_path``, and only
    what is written to ``out`` (the period table, the progress bar) reaches the terminal.
    With ``verbose`` nothing is redirected."""

    def __init__(self, log_path: Path, verbose: bool = False):
        self.log_path, self.verbose = Path(log_path), verbose
        self.out = None
        self._saved: list[int] = []

    def __enter__(self) -> Console:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        if not self.verbose:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._saved = [os.dup(1), os.dup(2)]
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            # Python-level writers too, where sys.stdout is not file descriptor 1.
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
            sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        return self

    def __exit__(self, *exc) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        if self._saved:
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = self._streams
        for fd, saved in zip((1, 2), self._saved, strict=False):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = []
        self.out.flush()
        self.out.close()

    def echo(self, line: str = "") -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.out)


def write_report(store: StateStore, out: Path, runs_dir: Path | None = None) -> Path:
    """The state store's HTML report (``smlrec.report.state_report_html``) at ``out``,
    linking the reports each run kept under ``runs_dir/reports/``."""
    from smlrec.io import write_bytes_atomic
    from smlrec.report import RunFiles, state_report_html

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = RunFiles(Path(runs_dir).resolve(), out.parent.resolve()) if runs_dir else None
    page = state_report_html(store.decisions(), store.pointer_info("production"),
                             packages=store.packages(), config_text=store.config_text(),
                             runs=runs, state_uri=store.uri)
    write_bytes_atomic(str(out), page.encode())  # a good report is never half overwritten
    return out


def keep_reports(work_dir: Path, dest: Path, summary: dict | None = None) -> list[Path]:
    """Copy the latest local run's reports (validation, features, gate) to ``dest``
    (``<task>.md`` with an HTML rendering beside it, ``<task>.html``), and the run's
    summary (``run.json``: decision, scores, step seconds), so they outlive the runner's
    working folder."""
    import json

    from smlrec.report import markdown_page

    runs = sorted((work_dir / "outputs").glob("smlrec-daily-*"), key=lambda p: p.stat().st_mtime)
    kept = []
    if not runs:
        return kept
    dest.mkdir(parents=True, exist_ok=True)
    for report in runs[-1].rglob("report"):
        if report.is_file():
            task = report.parent.name.removesuffix("-op")
            suffix = ".html" if report.read_bytes()[:15].lower().startswith(b"<!doctype") else ".md"
            target = dest / f"{task}{suffix}"
            target.write_bytes(report.read_bytes())
            kept.append(target)
            if suffix == ".md":
                page = dest / f"{task}.html"
                page.write_text(markdown_page(report.read_text(errors="replace"),
                                              f"{task}: {dest.name}"))
                kept.append(page)
    if summary is not None:
        run = dest / "run.json"
        run.write_text(json.dumps({k: v for k, v in summary.items() if k != "reports"},
                                  indent=1, sort_keys=True, default=str) + "\n")
        kept.append(run)
    return kept


def run_periods(periods: list[str], data_uri: str, state_uri: str, runs_dir: Path,
                console: Console, **params) -> list[dict]:
    """The daily pipeline for each period in order, with a progress bar and ETA, one table
    row per period, each run's reports kept under ``runs_dir/reports/<period>/`` and its
    working folder removed once it succeeded (a failed run's is kept, and named)."""
    import shutil

    from tqdm import tqdm

    out = []
    console.echo(SUMMARY_HEAD + "   (* promoted)")
    bar = tqdm(total=len(periods), file=console.out, unit="period", desc="daily runs",
               dynamic_ncols=True, leave=False)
    for p in periods:
        bar.set_postfix_str(p)
        work = runs_dir / "kfp" / p
        shutil.rmtree(work, ignore_errors=True)
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        old_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(work / "tmp")  # the runner's per-task temporary folders
        tempfile.tempdir = None
        try:
            r = run_daily(p, data_uri, state_uri, str(work), **params)
        except SmlrecError as exc:
            bar.close()
            raise SmlrecError(f"{exc} (the run's files are in {work})") from exc
        finally:
            if old_tmp is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old_tmp
            tempfile.tempdir = None
        if not r.get("skipped"):
            r["reports"] = [str(x) for x in keep_reports(work, runs_dir / "reports" / p, r)]
        shutil.rmtree(work, ignore_errors=True)
        out.append(r)
        console.echo(summary_line(r))
        bar.update()
    bar.close()
    return out
