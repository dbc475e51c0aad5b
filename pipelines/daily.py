"""The daily pipeline (one period) and the bootstrap pipeline (run once, before it).

Compile with ``smlrec pipeline compile``; upload the YAML in the Kubeflow UI, or submit
and schedule it with ``smlrec pipeline submit`` / ``schedule``. Locally the same
functions run through KFP's local runner (``smlrec pipeline run`` / ``backfill``).
"""


import os
import re
from pathlib import Path
from typing import NamedTuple

import yaml
from kfp import compiler, dsl

from components.ops import (
    IMAGE,
    challengers_op,
    features_op,
    gate_op,
    learn_op,
    meta_update_op,
    package_op,
    report_op,
    resolve_period_op,
    transfer_op,
    validate_op,
)

# Training steps ask the cluster for a GPU when compiled with SMLREC_GPU=1 (they use CUDA
# automatically when present, the CPU otherwise).
GPU = os.environ.get("SMLREC_GPU", "0") == "1"

# What each kind of step asks the cluster for (requests: CPU, memory). Sized from the
# daily-run benchmark (benchmarks/results/daily_run.md): a MovieLens week needs well under
# these; a period of 10^6 interactions trains in a few GiB.
RESOURCES = {"light": ("500m", "1Gi"), "data": ("1", "4Gi"), "train": ("2", "8Gi")}
# Steps that only read, or write idempotently (Feast, the state store's atomic files, the
# BentoML store), are retried on failure: a flaky object store or database should not cost
# a day. Validation is not retried: a bad day fails the same way every time.
RETRIES = 2


def _step(task: dsl.PipelineTask, name: str, kind: str = "light",
          retry: bool = True) -> dsl.PipelineTask:
    """Name a task for the Kubeflow UI, size it, make it retry, never cache it (every step
    reads or writes the state store)."""
    task.set_display_name(name)
    task.set_caching_options(False)
    cpu, memory = RESOURCES[kind]
    task.set_cpu_request(cpu).set_memory_request(memory)
    if retry:
        task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2.0)
    if kind == "train" and GPU:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    return task


def build_daily_pipeline(for_cluster: bool = True):
    """The daily pipeline. ``for_cluster`` wires the run's scheduled time (a placeholder the
    Kubeflow backend fills for recurring runs) into period resolution; KFP's local runner
    cannot resolve that placeholder, so local runs pass an explicit period instead."""
    scheduled_time = dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER if for_cluster else ""

    @dsl.pipeline(name="smlrec-daily",
                  description="Validate a period's data, write its features, gate yesterday's "
                  "challengers against the incumbent and the popularity floor, meta-update the "
                  "transfer, train SML and the other challengers on the new period, transfer, "
                  "and package the promoted model.")
    def pipeline(
        period: str,
        data_uri: str = "data/ml-100k",
        state_uri: str = "state",
        input_file: str = "",
        period_spec: str = "1D",
        feature_repo: str = "feature_repo",
        feature_data: str = "features",
        tolerance: float = -1.0,
        min_rows: int = 1,
        max_rows: int = 5_000_000,
        bentoml_home: str = "",
    ):
        """One daily run: the champion/challenger loop around SML.

        What is trained (SML and the other challengers), the popularity floor and the seed
        come from the run configuration the state store was bootstrapped with
        (``configs/<dataset>.yaml``).

        Args:
            period: The period that just closed, YYYY-MM-DD (its first day); "scheduled" takes
                the period that closed before the run's scheduled time (recurring runs).
            data_uri: The period-partitioned interaction store (folder or s3:// / gs:// URI).
            state_uri: The state store (models, pointers, decisions, run configuration).
            input_file: The period's raw file (CSV, Parquet, JSON lines) or the API's feedback
                log of the period (<data>/feedback/period=<id>) to validate and import; empty
                to validate the period already in the data store.
            period_spec: Period length, e.g. 1D (daily) or 7D (weekly).
            feature_repo: The Feast repository folder.
            feature_data: Where Feast's offline Parquet sources, registry and online store live.
            tolerance: Gate: how far (relative) below the incumbent's NDCG@20 a challenger may
                be and still be promoted; negative: the run configuration's.
            min_rows: Validation: fewest rows a period may have.
            max_rows: Validation: most rows a period may have.
            bentoml_home: BentoML store folder for packaging (empty: BentoML's default).
        """
        resolved = _step(resolve_period_op(period=period, scheduled_time=scheduled_time,
                                           period_spec=period_spec), "resolve period")
        period = resolved.outputs["period"]
        validate = _step(validate_op(period=period, data_uri=data_uri, input_file=input_file,
                                     period_spec=period_spec, min_rows=min_rows,
                                     max_rows=max_rows), "validate (Great Expectations)",
                         "data", retry=False)
        features = _step(features_op(period=period, data_uri=data_uri,
                                     feature_repo=feature_repo, feature_data=feature_data,
                                     period_spec=period_spec).after(validate),
                         "features (Feast)", "data")
        frame = features.outputs["training_frame"]
        gate = _step(gate_op(period=period, data_uri=data_uri, state_uri=state_uri,
                             tolerance=tolerance).after(features),
                     "gate: challengers vs incumbent and floor", "data")
        with dsl.If(gate.outputs["Output"] == "promote", name="promoted"):
            _step(package_op(state_uri=state_uri, period=period, bentoml_home=bentoml_home,
                             stage="production", data_uri=data_uri), "package production")
        meta = _step(meta_update_op(period=period, state_uri=state_uri,
                                    training_frame=frame).after(gate),
                     "SML meta-update (Θ)", "train")
        learn = _step(learn_op(state_uri=state_uri, data_uri=data_uri, training_frame=frame,
                               state_in=meta.outputs["state"]), "SML learn (Ŵ_t)", "train")
        others = _step(challengers_op(period=period, data_uri=data_uri, state_uri=state_uri,
                                      training_frame=frame).after(gate),
                       "other challengers", "train")
        transfer = _step(transfer_op(state_uri=state_uri, data_uri=data_uri,
                                     training_frame=frame, state_in=learn.outputs["state"],
                                     others=others.outputs["models"]),
                         "SML transfer (W_t)", "train")
        _step(package_op(state_uri=state_uri, period=period, bentoml_home=bentoml_home,
                         stage="candidate", data_uri=data_uri).after(transfer),
              "package candidate")
        _step(report_op(state_uri=state_uri).after(transfer), "report")

    return pipeline


daily_pipeline = build_daily_pipeline(for_cluster=True)
local_daily_pipeline = build_daily_pipeline(for_cluster=False)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bootstrap_op(data_uri: str, state_uri: str, until: str, config_uri: str
                 ) -> NamedTuple("Outputs", [("candidate", str)]):
    """Pretrain W_0 on the first periods, run every challenger (SML meta-training Θ with
    Algorithm 1) up to ``until``; keep the run configuration in the state store.

    Args:
        data_uri: The period-partitioned interaction store.
        state_uri: The state store to create.
        until: Last period of meta-training, YYYY-MM-DD.
        config_uri: The run configuration (YAML); empty: the built-in defaults.

    Returns:
        candidate: The period of the first candidate.
    """
    from collections import namedtuple

    from smlrec.config import DailyConfig
    from smlrec.daily import bootstrap
    from smlrec.device import configure_threads, pick_device
    from smlrec.registry import StateStore

    configure_threads()
    device = str(pick_device())
    cfg = DailyConfig.load(config_uri, device=device) if config_uri else DailyConfig(
        device=device)
    return namedtuple("Outputs", ["candidate"])(
        bootstrap(data_uri, StateStore(state_uri), cfg, until)["candidate"])


@dsl.pipeline(name="smlrec-bootstrap",
              description="Run once before the daily pipeline: pretrain W_0, meta-train Θ, "
              "train the other challengers, keep the run configuration.")
def bootstrap_pipeline(until: str, data_uri: str = "data/ml-100k", state_uri: str = "state",
                       config_uri: str = ""):
    """Bootstrap the state store.

    Args:
        until: Last period of meta-training, YYYY-MM-DD; its models become the first candidate.
        data_uri: The period-partitioned interaction store.
        state_uri: The state store to create.
        config_uri: The run configuration (YAML: challengers, floor, pretraining, seed), e.g.
            configs/ml-100k.yaml, as the backtest's selection wrote it; empty: the built-in
            defaults (SML alone against last period's popularity).
    """
    _step(bootstrap_op(data_uri=data_uri, state_uri=state_uri, until=until,
                       config_uri=config_uri), "bootstrap: pretrain W_0, meta-train Θ", "train",
          retry=False)  # a failed bootstrap is run again by hand, on a fresh state store


def compile_pipeline(fn, out: str | Path) -> Path:
    """Compile ``fn`` to the YAML uploaded in the Kubeflow UI, tidied for reading there:
    descriptions on one line (docstrings wrap), integer defaults shown as integers (KFP
    writes ``5000000.0`` for an ``int`` input)."""
    out = Path(out)
    compiler.Compiler().compile(fn, str(out))
    text = out.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    header = [re.sub(r"(: int \[Default: )(-?\d+)\.0\]", r"\1\2]", line) for line in header]
    docs = [_tidy(doc) for doc in yaml.safe_load_all(text) if doc is not None]
    body = yaml.safe_dump_all(docs, sort_keys=True, width=100, allow_unicode=True)
    out.write_text("\n".join(header) + "\n" + body)
    return out


def _tidy(node):
    if isinstance(node, dict):
        tidy = {k: _tidy(v) for k, v in node.items()}
        if isinstance(tidy.get("description"), str):
            tidy["description"] = " ".join(tidy["description"].split())
        value = tidy.get("defaultValue")
        if (tidy.get("parameterType") == "NUMBER_INTEGER" and isinstance(value, float)
                and value.is_integer()):
            tidy["defaultValue"] = int(value)
        return tidy
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node
