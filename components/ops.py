"""The daily pipeline's KFP components: one per step, each a thin wrapper over smlrec.

Every component runs from the project image (``IMAGE``, built from the repo's
Dockerfile) with no pip install at run time. A component body is shipped as source, so it
imports what it needs inside the function. Artifacts: Markdown reports and Metrics for the
Kubeflow UI, Model artifacts for the SML state handed from task to task, a Dataset for the
training frame read from Feast. Each component's ``Args`` and ``Returns`` become the input
and output descriptions the Kubeflow UI shows; outputs are named (``period``, ``rows``,
``model_tag``...).
"""


import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("SMLREC_IMAGE", "localhost:5000/smlrec:0.1.0")
"""The image every step runs from: ``SMLREC_IMAGE`` at compile time, by default the tag
``make image`` builds and pushes to a local registry (``localhost:5000``, as kind and
minikube clusters use)."""


def component(fn):
    """A lightweight component on the project image; no run-time installs."""
    return dsl.component(fn, base_image=IMAGE, install_kfp_package=False)


@component
def validate_op(period: str, data_uri: str, input_file: str, period_spec: str,
                min_rows: int, max_rows: int, report: Output[Markdown]
                ) -> NamedTuple("Outputs", [("rows", int)]):
    """Great Expectations on the period's raw file; on success it is imported into the data
    store. A failure writes the failing expectations to the report and fails the task, so
    nothing after it runs and nothing changes.

    Args:
        period: The period to validate (YYYY-MM-DD, its first day).
        data_uri: The period-partitioned interaction store.
        input_file: The period's raw file (CSV, Parquet, JSON lines) or the API's feedback log
            of the period (``<data>/feedback/period=<id>``); empty: the stored period.
        period_spec: Period length, e.g. 1D or 7D.
        min_rows: Fewest rows the period may have.
        max_rows: Most rows the period may have.

    Returns:
        rows: Rows of the period that passed validation.
        report: Every expectation with its result (Markdown).
    """
    from collections import namedtuple

    from components.expectations import history_from_store, validate_period_file
    from smlrec.data.importer import import_file
    from smlrec.registry import check_period_id

    check_period_id(period)
    path = input_file or f"{data_uri.rstrip('/')}/interactions/period={period}/part-0.parquet"
    result = validate_period_file(path, period, period_spec, min_rows=min_rows,
                                  max_rows=max_rows, history=history_from_store(data_uri, period))
    with open(report.path, "w") as fh:
        fh.write(result.to_markdown())
    if not result.success:
        raise RuntimeError(f"data validation failed for period {period} ({path}): "
                           + "; ".join(result.failures))
    if input_file:
        # One period's file by design, already validated (times inside the period).
        import_file(input_file, data_uri, period=period_spec, force=True)
    return namedtuple("Outputs", ["rows"])(result.n_rows)


@component
def features_op(period: str, data_uri: str, feature_repo: str, feature_data: str,
                period_spec: str, training_frame: Output[Dataset],
                report: Output[Markdown]
                ) -> NamedTuple("Outputs", [("training_rows", int)]):
    """Write D_t's aggregates to Feast, materialize them, and pull the training frame
    (D_t's interactions with point-in-time features) with get_historical_features.

    Args:
        period: The period D_t.
        data_uri: The period-partitioned interaction store.
        feature_repo: The Feast repository folder.
        feature_data: Where Feast's offline sources, registry and online store live.
        period_spec: Period length, e.g. 1D or 7D.

    Returns:
        training_rows: Rows of the training frame.
        training_frame: D_t's interactions with their point-in-time features (Parquet).
        report: The training frame's size and columns (Markdown).
    """
    from collections import namedtuple

    from adapters.feast_store import FeatureStoreAdapter
    from smlrec.data.periods import period_bounds
    from smlrec.data.store import list_periods, read_period, read_periods

    frame = read_period(data_uri, period)
    _, end = period_bounds(period, period_spec)
    earlier = [p for p in list_periods(data_uri) if p < period]
    history = read_periods(data_uri, earlier[-30:]) if earlier else None
    store = FeatureStoreAdapter(feature_repo, feature_data)
    store.apply()
    store.write_period(period, frame, end, history=history)
    store.materialize(end)
    entity = frame[["user_id", "item_id", "timestamp"]].rename(
        columns={"timestamp": "event_timestamp"})
    out = store.training_frame(entity)
    out.to_parquet(training_frame.path, index=False)
    with open(report.path, "w") as fh:
        fh.write(f"# Features for {period}\n\n{len(out)} training rows, columns: "
                 f"{', '.join(out.columns)}\n")
    return namedtuple("Outputs", ["training_rows"])(len(out))


@component
def gate_op(period: str, data_uri: str, state_uri: str, tolerance: float,
            metrics: Output[Metrics], report: Output[Markdown]) -> str:
    # The one unnamed output: KFP 2.17's local runner resolves the dsl.If on this output
    # (the promotion) only when the output is called "Output".
    """The canary gate: yesterday's challengers, the incumbent and the popularity floor on
    D_t. On promote the production pointer moves to the best eligible challenger.

    Args:
        period: The period D_t the challengers are tested on.
        data_uri: The period-partitioned interaction store.
        state_uri: The state store (models, pointers, decisions, run configuration).
        tolerance: How far below the incumbent a challenger may be; negative: the run
            configuration's.

    Returns:
        Output: The decision: promote, reject or bootstrap.
        metrics: NDCG@20 and Recall@20 of every model scored, users scored, promoted (0/1).
        report: The scores with bootstrap intervals and the decision's reasons (Markdown).
    """
    from smlrec.daily import gate, task_config
    from smlrec.registry import StateStore

    cfg = task_config(state_uri)
    if tolerance >= 0:
        cfg = cfg.model_copy(update={"tolerance": tolerance})
    result = gate(data_uri, StateStore(state_uri), period, cfg)
    named = {**result.challengers, "incumbent": result.incumbent,
             "popularity": result.popularity}
    for name, values in named.items():
        for key in ("ndcg@20", "recall@20"):
            if values is not None:
                metrics.log_metric(f"{name}_{key}", float(values[key]))
    metrics.log_metric("promoted", 1.0 if result.accept else 0.0)
    metrics.log_metric("users_scored", float(result.extra.get("n_users", 0)))
    lines = [f"# Gate for {period}: {result.decision}"
             + (f" ({result.strategy})" if result.strategy else ""), "",
             "| model | NDCG@20 | Recall@20 | users | NDCG@20 / floor [95% CI] | "
             "NDCG@20 / incumbent [95% CI] |",
             "|---|---|---|---|---|---|"]
    for name, values in named.items():
        if values is None:
            continue
        vs = result.extra.get("vs_floor", {}).get(name)
        vi = result.extra.get("vs_incumbent", {}).get(name)
        ci, ci_inc = (f"{v['ratio']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" if v else "-"
                      for v in (vs, vi))
        lines.append(f"| {name} | {values['ndcg@20']:.4f} | {values['recall@20']:.4f} | "
                     f"{values['n_users']} | {ci} | {ci_inc} |")
    lines += ["", *(f"- {r}" for r in result.reasons)]
    with open(report.path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return result.decision


@component
def meta_update_op(period: str, state_uri: str, training_frame: Input[Dataset],
                   state: Output[Model], metrics: Output[Metrics]):
    """SML step 2: update Θ on D_t with Ŵ_{t-1} and W_{t-2} fixed.

    Args:
        period: The period D_t.
        state_uri: The state store.
        training_frame: D_t's training frame from the features step.

    Returns:
        state: SML's state after the update (Θ), handed to the learn step.
        metrics: Θ's loss, seconds, interactions.
    """
    import pandas as pd

    from smlrec.daily import meta_update_step, task_config
    from smlrec.registry import StateStore

    cfg = task_config(state_uri)
    frame = pd.read_parquet(training_frame.path)
    out = meta_update_step(frame, StateStore(state_uri), period, cfg, state.path)
    state.metadata.update({"period": period, "base_period": out["base_period"]})
    for key in ("theta_loss", "seconds", "n_interactions"):
        metrics.log_metric(f"meta_update_{key}", float(out[key]))


@component
def learn_op(state_uri: str, data_uri: str, training_frame: Input[Dataset],
             state_in: Input[Model], state: Output[Model], metrics: Output[Metrics]):
    """SML step 1: learn Ŵ_t on D_t (and the periods before it the configuration's
    what_window replays), through the transfer, with Θ fixed.

    Args:
        state_uri: The state store.
        data_uri: The interaction store (for the replayed periods).
        training_frame: D_t's training frame from the features step.
        state_in: SML's state from the meta-update step.

    Returns:
        state: SML's state with Ŵ_t, handed to the transfer step.
        metrics: Ŵ_t's loss and seconds.
    """
    import pandas as pd

    from smlrec.daily import learn_step, task_config

    cfg = task_config(state_uri)
    out = learn_step(pd.read_parquet(training_frame.path), state_in.path, cfg, state.path,
                     data_uri)
    for key in ("what_loss", "seconds"):
        metrics.log_metric(f"learn_{key}", float(out[key]))


@component
def challengers_op(period: str, data_uri: str, state_uri: str,
                   training_frame: Input[Dataset], models: Output[Model],
                   metrics: Output[Metrics]):
    """Retrain the run configuration's other challengers (the best non-SML strategies of
    the backtest) on D_t, beside SML's steps.

    Args:
        period: The period D_t.
        data_uri: The interaction store (for windowed strategies).
        state_uri: The state store.
        training_frame: D_t's training frame from the features step.

    Returns:
        models: The challengers' trained models, handed to the transfer step.
        metrics: Seconds and each challenger's training figures.
    """
    import pandas as pd

    from smlrec.daily import challengers_step, task_config
    from smlrec.registry import StateStore

    cfg = task_config(state_uri)
    out = challengers_step(pd.read_parquet(training_frame.path), data_uri,
                           StateStore(state_uri), period, cfg, models.path)
    metrics.log_metric("challengers_seconds", float(out["seconds"]))
    for name, figures in out["challengers"].items():
        for key, value in figures.items():
            metrics.log_metric(f"{name}_{key}", float(value))


@component
def transfer_op(state_uri: str, data_uri: str, training_frame: Input[Dataset],
                state_in: Input[Model], others: Input[Model], metrics: Output[Metrics]
                ) -> NamedTuple("Outputs", [("candidate", str)]):
    """W_t = f_Θ(W_prev, Ŵ_t): with the other challengers, saved in the state store as the
    new candidate bundle.

    Args:
        state_uri: The state store.
        data_uri: The interaction store.
        training_frame: D_t's training frame from the features step.
        state_in: SML's state from the learn step.
        others: The other challengers' models.

    Returns:
        candidate: The period of the new candidate bundle.
        metrics: Seconds, users and items of the candidate.
    """
    from collections import namedtuple

    import pandas as pd

    from smlrec.daily import task_config, transfer_step
    from smlrec.registry import StateStore

    cfg = task_config(state_uri)
    store = StateStore(state_uri)
    out = transfer_step(pd.read_parquet(training_frame.path), state_in.path, store, cfg,
                        data_uri, others.path)
    for key in ("seconds", "n_users", "n_items"):
        metrics.log_metric(f"transfer_{key}", float(out[key]))
    return namedtuple("Outputs", ["candidate"])(store.get_pointer("candidate"))


@component
def package_op(state_uri: str, period: str, bentoml_home: str, stage: str = "production",
               data_uri: str = "") -> NamedTuple("Outputs", [("model_tag", str)]):
    """Put the stage's model (production or candidate) into the BentoML model store, labelled
    with stage, period and strategy, with the period's popular items from ``data_uri``.

    Args:
        state_uri: The state store.
        period: The period whose run decided (its popular items are packaged).
        bentoml_home: The BentoML store folder (empty: BentoML's default).
        stage: production or candidate.
        data_uri: The interaction store (for the popular items).

    Returns:
        model_tag: The BentoML model tag.
    """
    import os
    from collections import namedtuple

    if bentoml_home:
        os.environ["BENTOML_HOME"] = bentoml_home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from components.packaging import package

    return namedtuple("Outputs", ["model_tag"])(
        package(state_uri, stage, decided_in=period, data_uri=data_uri))


@component
def report_op(state_uri: str, report: Output[HTML]):
    """The per-period history of gate decisions as an HTML page with a chart.

    Args:
        state_uri: The state store.

    Returns:
        report: The page (HTML).
    """
    from smlrec.registry import StateStore
    from smlrec.report import state_report_html

    store = StateStore(state_uri)
    with open(report.path, "w") as fh:
        fh.write(state_report_html(store.decisions(), store.pointer_info("production"),
                                   packages=store.packages(), config_text=store.config_text(),
                                   state_uri=state_uri))


@component
def resolve_period_op(period: str, scheduled_time: str, period_spec: str
                      ) -> NamedTuple("Outputs", [("period", str)]):
    """The period to process: ``period`` if given, else the last period that closed before
    the scheduled time of a recurring run (so a run at 02:00 processes yesterday).

    Args:
        period: YYYY-MM-DD, or "scheduled".
        scheduled_time: The recurring run's scheduled time (filled by Kubeflow).
        period_spec: Period length, e.g. 1D or 7D.

    Returns:
        period: The period id to process.
    """
    from collections import namedtuple

    from smlrec.data.periods import check_closed, period_id, period_start, previous_period_start
    from smlrec.registry import check_period_id

    out = namedtuple("Outputs", ["period"])
    if period and period != "scheduled":
        return out(check_closed(check_period_id(period), period_spec))
    import pandas as pd

    when = pd.Timestamp(scheduled_time)
    when = when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")
    return out(period_id(previous_period_start(period_start(when, period_spec), period_spec)))
