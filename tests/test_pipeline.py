"""The daily pipeline end to end on KFP's real local runner, plus the compiled YAML."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import tree_digest

from pipelines.daily import bootstrap_pipeline, compile_pipeline, daily_pipeline
from pipelines.local import Console, run_bootstrap, run_daily, run_periods, write_report
from smlrec.daily import load_config, run_period
from smlrec.data.store import delete_periods, list_periods, read_dataset_info, read_period
from smlrec.data.synthetic import write_synthetic
from smlrec.errors import SmlrecError
from smlrec.feedback import Event, FeedbackLog
from smlrec.registry import StateStore

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
challengers:
- {method: sml, params: {outer_steps: 3, blend: 0.5}}
- {method: window, params: {window: 2, epochs: 3, n_negatives: 2, blend: 1.0}}
floor: {method: pop, params: {window: 2}}
sml: {theta_init: identity}
pretrain_periods: 3
pretrain_epochs: 10
"""


@pytest.mark.parametrize("fn, name", [(daily_pipeline, "daily.yaml"),
                                      (bootstrap_pipeline, "bootstrap.yaml")])
def test_committed_yaml_matches_the_code(fn, name, tmp_path):
    out = compile_pipeline(fn, tmp_path / name)
    committed = yaml.safe_load((ROOT / "pipelines" / name).read_text())
    fresh = yaml.safe_load(out.read_text())
    for doc in (committed, fresh):
        doc.get("sdkVersion") and doc.pop("sdkVersion")
    assert fresh == committed, f"pipelines/{name} is stale: run `smlrec pipeline compile`"


def test_compiled_pipeline_reads_well_in_the_kubeflow_ui():
    text = (ROOT / "pipelines" / "daily.yaml").read_text()
    spec = yaml.safe_load(text)
    assert "max_rows: int [Default: 5000000]" in text  # integers shown as integers
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert root["max_rows"]["defaultValue"] == 5_000_000
    tasks = {**spec["root"]["dag"]["tasks"],
             **spec["components"]["comp-condition-1"]["dag"]["tasks"]}
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    assert {"validate (Great Expectations)", "package candidate", "package production",
            "SML transfer (W_t)"} <= names, names
    for key, task in tasks.items():
        if key == "condition-1":
            continue
        assert "retryPolicy" in task or key == "validate-op", key  # a bad day is not retried
    assert tasks["gate-op"]["retryPolicy"]["maxRetryCount"] >= 1
    for key, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["resources"]["resourceCpuRequest"], key
        assert container["resources"]["resourceMemoryRequest"], key
        assert "/" in container["image"].rsplit(":", 1)[0], container["image"]  # a registry
    for name, comp in spec["components"].items():
        if "executorLabel" not in comp:
            continue
        for kind in ("inputDefinitions", "outputDefinitions"):
            for group in comp.get(kind, {}).values():
                for param, definition in group.items():
                    description = definition.get("description", "")
                    assert description, f"{name}: {param} has no description"
                    assert "\n" not in description, f"{name}: {param}"
    outputs = spec["components"]["comp-resolve-period-op"]["outputDefinitions"]["parameters"]
    assert set(outputs) == {"period"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipe-data") / "data")
    write_synthetic(root, n_users=300, n_items=100, n_periods=9, interactions_per_period=1500,
                    returning_share=0.8, drift=0.1, seed=3, popularity_skew=0.0)
    return root


@pytest.fixture(scope="module")
def booted_once(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe-state")
    (base / "config.yaml").write_text(CONFIG)
    run_bootstrap(data, str(base / "state"), list_periods(data)[5], str(base / "kfp"),
                  config_uri=str(base / "config.yaml"))
    return base / "state"


@pytest.fixture
def state(booted_once, tmp_path):
    shutil.copytree(booted_once, tmp_path / "state")
    return str(tmp_path / "state")


def test_bootstrap_made_a_candidate(booted_once, data):
    store = StateStore(str(booted_once))
    assert store.get_pointer("candidate") == list_periods(data)[5]
    assert store.get_pointer("production") is None


def test_good_period_is_promoted_packaged_and_becomes_the_base(state, data, tmp_path, capfd):
    p = list_periods(data)
    # The same period, run by the functions the tasks call, in this process (the backtest's
    # parity with those functions is tested in test_daily.py).
    shutil.copytree(state, tmp_path / "in-process")
    here = StateStore(str(tmp_path / "in-process"))
    run_period(data, here, p[6], load_config(here), str(tmp_path / "work"))
    capfd.readouterr()
    runs = tmp_path / "runs"
    with Console(runs / "logs" / "run.log") as console:  # as `smlrec pipeline demo` runs it
        [r] = run_periods([p[6]], data, state, runs, console,
                          bentoml_home=str(tmp_path / "bento"))
    shown = capfd.readouterr()
    lines = [line for line in shown.out.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 6 and any(line.startswith(p[6]) for line in lines), shown.out
    assert "Registry cache" not in shown.out + shown.err  # runner, GX, Feast: in the log
    assert (runs / "logs" / "run.log").stat().st_size > 0
    assert r["decision"] == "promote", r
    store = StateStore(state)
    assert store.get_pointer("production") == p[5] and store.get_pointer("candidate") == p[6]
    strategy = store.pointer_info("production")["strategy"]
    assert strategy == r["strategy"] in ("sml", "window")
    models = list((tmp_path / "bento" / "models" / "smlrec-mf").glob("*/model.yaml"))
    assert len(models) == 1 and f"period: '{p[5]}'" in models[0].read_text()
    assert f"strategy: {strategy}" in models[0].read_text()
    assert (Path(state) / "features").exists()
    # The report: figures over time, users, links to the kept reports, the packaged models.
    kept = runs / "reports" / p[6]
    assert {"validate.html", "validate.md", "gate.html", "run.json"} <= {
        f.name for f in kept.iterdir()}
    assert "<table>" in (kept / "validate.html").read_text()  # the suite's results, as HTML
    page = write_report(store, runs / "report.html", runs).read_text()
    for text in ("Recall@20", "users scored", f"href='reports/{p[6]}/validate.html'",
                 "Step times", "Models packaged", models[0].parent.name, "Run configuration"):
        assert text in page, text
    assert f"<td>{r['scores']['popularity']['n_users']}</td>" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    # Parity: the pipeline's tasks made the same models as the in-process run.
    kfp_tensors = store.load_period(p[6])[0]
    own_tensors = here.load_period(p[6])[0]
    for key in [k for k in own_tensors if k.startswith("serve.")]:
        assert torch.equal(kfp_tensors[key], own_tensors[key]), key
    # Re-running a finished period changes nothing.
    before = tree_digest(state)
    assert run_daily(p[6], data, state, str(tmp_path / "kfp2"))["skipped"]
    assert tree_digest(state) == before


def test_bad_data_stops_at_validation_and_changes_nothing(state, data, tmp_path):
    p = list_periods(data)
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item_id,timestamp\n1,2,2024-01-07T10:00:00Z\n")  # no user_id
    before, data_before = tree_digest(state), tree_digest(data)
    with pytest.raises(SmlrecError, match="validate-op"):
        run_daily(p[6], data, state, str(tmp_path / "kfp"), input_file=str(bad))
    assert tree_digest(state) == before
    assert tree_digest(data) == data_before


def test_the_next_daily_run_validates_and_trains_on_the_days_feedback(state, data, tmp_path):
    """The API's feedback log of a period is that period's input: validated, imported, and
    trained on (here the period's interactions arrive as events, not as a file)."""
    p = list_periods(data)
    own = tmp_path / "data"
    shutil.copytree(data, own)
    events = read_period(data, p[6])
    delete_periods(str(own), [p[6]])
    log = FeedbackLog(own / "feedback", read_dataset_info(data)["period"])
    log.append([Event(u, i, t.timestamp()) for u, i, t in zip(
        events["user_id"], events["item_id"], events["timestamp"], strict=True)]).result(30)
    log.close()
    r = run_daily(p[6], str(own), state, str(tmp_path / "kfp"),
                  input_file=str(own / "feedback" / f"period={p[6]}"))
    assert r["decision"] in ("promote", "reject"), r
    stored = read_period(str(own), p[6])
    key = ["user_id", "item_id", "timestamp"]
    pd.testing.assert_frame_equal(stored[key].reset_index(drop=True),
                                  events[key].reset_index(drop=True))
    store = StateStore(state)
    assert store.get_pointer("candidate") == p[6]
    _, _, users, items = store.load_period(p[6])
    assert set(events["user_id"]) <= set(users.ids) and set(events["item_id"]) <= set(items.ids)


def test_worse_candidate_is_rejected_and_the_incumbent_kept(state, data, tmp_path):
    p = list_periods(data)
    run_daily(p[6], data, state, str(tmp_path / "kfp1"))  # promotes p[5]
    store = StateStore(state)
    tensors, meta, users, items = store.load_period(p[6])
    zeroed = {k: v * 0 if k.startswith("serve.") else v for k, v in tensors.items()}
    store.save_period(p[6], zeroed, meta, users, items)
    r = run_daily(p[7], data, state, str(tmp_path / "kfp2"))
    assert r["decision"] == "reject"
    assert store.get_pointer("production") == p[5]
    assert store.get_pointer("candidate") == p[7]
    assert [d["decision"] for d in store.decisions()] == ["promote", "reject"]


def test_a_killed_run_leaves_consistent_state_and_the_next_run_completes(state, data, tmp_path):
    p = list_periods(data)
    store = StateStore(state)
    env = {**os.environ, "SMLREC_KFP_DIR": str(tmp_path / "kfp")}
    cmd = [sys.executable, "-m", "pipelines.entry", "pipeline", "run", "--period", p[6],
           "--data-uri", data, "--state-uri", state, "--runs-dir", str(tmp_path / "runs"),
           "--bentoml-home", str(tmp_path / "bento")]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not store.decisions() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: after the gate, during training
    proc.wait()
    for name in ("production", "candidate"):  # pointers name complete, verified bundles
        pid = store.get_pointer(name)
        if pid is not None:
            store.load_period(pid)
    r = run_daily(p[6], data, state, str(tmp_path / "kfp-again"))
    assert r["decision"] == "promote" and store.get_pointer("candidate") == p[6]
    store.load_period(p[6])
