"""The cold-start model (MeLU) in the daily run and the API: trained at the bootstrap,
meta-updated by every run, gated on the period's new users, packaged beside the served
model, and answering a user the model does not know with path ``melu`` from a real
``bentoml serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smlrec import coldstart
from smlrec.config import ColdConfig, DailyConfig, MethodSpec, SMLConfig
from smlrec.daily import bootstrap, run_period
from smlrec.data.store import list_periods, read_period
from smlrec.data.synthetic import write_synthetic
from smlrec.io import load_bundle
from smlrec.registry import StateStore
from smlrec.schema import ITEM, TS, USER

ROOT = Path(__file__).resolve().parents[1]
COLD = ColdConfig(melu={"hidden": 16, "emb_dim": 8, "local_steps": 2}, pretrain_epochs=2,
                  epochs=1, replay=2, path="auto")
CFG = DailyConfig(
    sml=SMLConfig(outer_steps=1, theta_init="identity", hidden=16), pretrain_periods=3,
    pretrain_epochs=5,
    challengers=[MethodSpec(method="sml"),
                 MethodSpec(method="window", params={"window": 2, "epochs": 2, "blend": 1.0})],
    floor=MethodSpec(method="pop", params={"window": 2}), cold=COLD)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A stream with side tables and many new users each period."""
    root = str(tmp_path_factory.mktemp("cold-data"))
    write_synthetic(root, n_users=500, n_items=80, n_periods=7, interactions_per_period=1200,
                    returning_share=0.5, drift=0.1, seed=5)
    return root


@pytest.fixture(scope="module")
def ran(stream, tmp_path_factory):
    """Bootstrap to period 4, then the daily run of period 5 (MeLU path forced, so the
    package below serves it whatever the small gate found)."""
    tmp = tmp_path_factory.mktemp("cold-state")
    store = StateStore(str(tmp / "state"))
    periods = list_periods(stream)
    cfg = CFG.model_copy(update={"cold": COLD.model_copy(update={"path": "melu"})})
    bootstrap(stream, store, cfg, periods[4])
    before = store.load_period(periods[4])
    out = run_period(stream, store, periods[5], cfg, str(tmp / "work"))
    return store, periods, before, out, tmp


def test_bootstrap_and_daily_run_carry_and_meta_update_melu(ran):
    store, periods, (t0, m0, _, _), out, _ = ran
    assert any(k.startswith(coldstart.PREFIX) for k in t0)
    assert m0[coldstart.META_KEY]["codes"]["user"]["fields"]  # the encoding is kept
    t1, m1, _, items = store.load_period(periods[5])
    assert m1[coldstart.META_KEY]["meta_steps"] > m0[coldstart.META_KEY]["meta_steps"]
    # the id table grew with the new period's items and the shared layers moved
    assert t1["melu.emb.item_id"].shape[0] == len(items) >= t0["melu.emb.item_id"].shape[0]
    changed = [k for k in t0 if k.startswith("melu.decision") and not torch.equal(t0[k], t1[k])]
    assert changed
    assert out["challengers"]["challengers"]["melu"]["melu_tasks"] > 0


def test_the_gate_scores_melu_against_the_mean_embedding_and_the_floor(ran, stream):
    store, periods, *_ = ran
    cold = store.decisions()[-1]["cold"]
    assert cold["n_users"] > 0 and cold["support"] == COLD.support
    for name in ("melu", "mean_emb", "popularity"):
        assert 0 <= cold[name]["ndcg@20"] <= 1
    assert cold["path"] == "melu" and "set to melu" in cold["reason"]
    # the cold users are exactly the period's users the candidate did not know
    _, _, users, _ = store.load_period(periods[4])
    frame = read_period(stream, periods[5])
    new = set(frame[USER]) - set(users.ids)
    assert 0 < cold["n_users"] <= len(new)
    from smlrec.report import state_report_html

    page = state_report_html(store.decisions())
    assert "Cold start at the gate" in page and f"<td>{cold['n_users']}</td>" in page


def test_auto_path_follows_the_scores(ran, stream):
    store, periods, _, _, tmp = ran
    copy = StateStore(str(tmp / "auto"))
    shutil.copytree(store.uri, copy.uri, dirs_exist_ok=True)
    cand = copy.get_pointer("candidate")
    tensors, meta, users, items = copy.load_period(cand)
    served = tensors["serve.window.item"]
    test = read_period(stream, periods[6])
    prior = torch.ones(len(items))
    out = coldstart.gate_cold(tensors, meta, stream, served, True, prior, test, users, items,
                              COLD)
    beats = (out["melu"]["ndcg@20"] > out["mean_emb"]["ndcg@20"]
             and out["melu"]["ndcg@20"] > out["popularity"]["ndcg@20"])
    assert out["path"] == ("melu" if beats else "recent_items")


def test_api_answers_an_unknown_user_with_melu(ran, stream):
    """A real `bentoml serve` on the package: a user the model does not know, with recent
    items, gets MeLU's adaptation (path melu), the same ranking as MeLU computed here."""
    pytest.importorskip("bentoml")
    httpx = pytest.importorskip("httpx")
    from benchmarks.serving import Server

    store, periods, _, _, tmp = ran
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEAST_", "SMLREC_"))}
    env.update(BENTOML_HOME=str(tmp / "bento"), BENTOML_DO_NOT_TRACK="true",
               SMLREC_THREADS="1", SMLREC_DEVICE="cpu", SMLREC_CANARY_SHARE="0",
               SMLREC_RELOAD_SECONDS="0", SMLREC_MODEL_SOURCE="bentoml", PYTHONPATH=str(ROOT))
    code = ("import sys; from components.packaging import package; "
            "print(package(sys.argv[1], 'production', sys.argv[2], sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, store.uri, periods[5], stream], env=env,
                   cwd=ROOT, check=True, capture_output=True, text=True)
    import bentoml

    os.environ["BENTOML_HOME"], old = str(tmp / "bento"), os.environ.get("BENTOML_HOME")
    try:
        model = bentoml.models.get("smlrec-mf:latest")
        bundle = model.path_of("bundle")
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME")
        else:
            os.environ["BENTOML_HOME"] = old
    tensors, meta, files = load_bundle(bundle)
    assert meta["cold_path"] == "melu"
    expected_model = coldstart.ServedMeLU(tensors, meta, files)
    items = list(read_period(stream, periods[6]).sort_values(TS)[ITEM])[:3]
    item_ids = json.loads(files["vocab_items.json"])["ids"]
    known_users = set(json.loads(files["vocab_users.json"])["ids"])
    rows = [item_ids.index(i) for i in items if i in item_ids]
    assert rows
    # a new user with a profile in the side table, and one without
    with_profile = next(u for u in expected_model.profiles if u not in known_users)
    srv = Server(tmp / "bento", workers=1, log_path=tmp / "serve.log", env=env)
    srv.start(timeout=90)
    try:
        for user in (with_profile, "nobody-knows-me"):
            r = httpx.post(f"{srv.url}/recommend", timeout=30,
                           json={"user_id": user, "k": 5, "exclude_seen": False,
                                 "recent_items": [item_ids[r] for r in rows]})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["path"] == "melu" and got["fallback"] is True
            scores = expected_model.scores(user, rows)
            top = torch.topk(scores, 5).indices.tolist()
            assert got["items"] == [item_ids[i] for i in top]
            np.testing.assert_allclose(got["scores"], scores[top].numpy(), rtol=1e-4,
                                       atol=1e-5)
        # concurrent cold requests: MeLU's adaptation is not re-entrant (torch.func), the
        # service must still answer every one (this failed with 500s before the lock)
        from concurrent.futures import ThreadPoolExecutor

        def ask(i: int) -> int:
            return httpx.post(f"{srv.url}/recommend", timeout=30, json={
                "user_id": f"burst{i}", "k": 5,
                "recent_items": [item_ids[r] for r in rows]}).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(ask, range(32))) == {200}
        known = next(iter(known_users))
        r = httpx.post(f"{srv.url}/recommend", timeout=30, json={"user_id": known, "k": 5})
        assert r.json()["path"] == "user"
        meta_r = httpx.post(f"{srv.url}/metadata", timeout=30, json={}).json()
        assert meta_r["production"]["cold_path"] == "melu"
    finally:
        srv.stop()
