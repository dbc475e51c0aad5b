"""Approximate top-k (``smlrec.ann``): known answers, the recall/latency gate, exclusions,
serialisation, and the index as packaged and served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from smlrec import ann
from smlrec.vocab import Vocab

IVF = ann.AnnSettings(min_items=0, kinds=("ivf_flat",), users=300, latency_queries=50)


def clustered(n_items: int, n_users: int, dim: int = 16, clusters: int = 128, seed: int = 0,
              noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Items and users scattered around shared centres (as trained embeddings group)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    item = centres[torch.randint(0, clusters, (n_items,), generator=g)]
    user = centres[torch.randint(0, clusters, (n_users,), generator=g)]
    return (item + noise * torch.randn(n_items, dim, generator=g),
            user + noise * torch.randn(n_users, dim, generator=g))


@pytest.fixture(scope="module")
def big() -> tuple[torch.Tensor, torch.Tensor, ann.AnnIndex, ann.AnnReport]:
    item, user = clustered(60_000, 1_000)
    index, report = ann.build(item, user, IVF)
    assert index is not None
    return item, user, index, report


def test_known_answer_on_a_tiny_catalogue() -> None:
    # Item i's first coordinate is i, the rest small: for the query e1 the top k are the
    # last k items, best (the largest) first, whatever the rest.
    n, k = 400, 7
    g = torch.Generator().manual_seed(1)
    item = torch.cat([torch.arange(n, dtype=torch.float32)[:, None],
                      0.01 * torch.randn(n, 3, generator=g)], dim=1)
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for kinds in (("ivf_flat",), ("hnsw_flat",)):
        settings = ann.AnnSettings(min_items=0, kinds=kinds, recall=1.0, users=1)
        index, report = ann.build(item, query, settings)
        assert index is not None and report.passed and report.kind == kinds[0]
        (rows, scores), = index.search(query, [k])
        assert rows == list(range(n - 1, n - 1 - k, -1))
        assert scores == pytest.approx([float(r) for r in rows], abs=1e-3)


def test_small_catalogue_keeps_exact_search() -> None:
    item, user = clustered(500, 50)
    index, report = ann.build(item, user, ann.AnnSettings(min_items=1_000))
    assert index is None and report.passed and report.method == "exact"
    assert "exact search" in report.reason and "1,000" in report.reason


def test_gate_passes_on_a_clustered_catalogue(big) -> None:
    item, user, index, report = big
    assert report.passed and report.method == "ann" and report.kind == "ivf_flat"
    assert report.recall_at_k >= 0.95 and report.recall_at_k_large >= 0.95
    assert report.users == 300 and report.n_items == 60_000
    assert {"nprobe", "nlist"} <= set(report.params)
    assert report.index_p99_ms is not None and report.exact_p99_ms is not None
    assert report.index_p99_ms <= report.budget_ms and report.build_s > 0
    assert ann.gate(report) is report
    json.dumps(report.to_dict())  # the report goes into the model's metadata as JSON


@pytest.mark.parametrize("change, why", [({"recall": 1.01}, "no setting reached recall"),
                                         ({"budget_ms": 0.0}, "budget")])
def test_gate_refuses_an_impossible_recall_or_budget(big, change, why) -> None:
    item, user, _, _ = big
    settings = ann.AnnSettings(**{**IVF.__dict__, "users": 100, **change})
    index, report = ann.build(item, user, settings)
    assert index is None and not report.passed and why in report.reason
    with pytest.raises(ann.AnnGateError, match="refused") as info:
        ann.gate(report)
    assert info.value.report is report


def test_exclusions_are_honoured_and_short_queries_fall_back(big) -> None:
    item, user, index, _ = big
    q = user[:3]
    first = index.search(q, [10, 10, 10])
    exact = torch.topk(q @ item.T, 10).indices.tolist()
    assert sum(len(set(f[0]) & set(e)) for f, e in zip(first, exact, strict=True)) >= 27
    drop = [first[0][0][:5], [], list(range(0, 60_000, 2))]
    got = index.search(q, [10, 10, 10], drop)
    assert not set(got[0][0]) & set(drop[0]) and len(got[0][0]) == 10
    assert got[0][0][:5] == first[0][0][5:]  # the next best, in order
    assert got[1] == first[1]
    # half the catalogue excluded: the probed lists run short, the caller answers exactly
    assert got[2] is None or (len(got[2][0]) == 10 and all(r % 2 for r in got[2][0]))
    assert index.fallbacks == (1 if got[2] is None else 0)


def test_serialise_round_trip_gives_identical_results(big) -> None:
    _, user, index, report = big
    again = ann.AnnIndex.from_bytes(index.to_bytes(), json.loads(json.dumps(
        report.to_dict())))
    assert again.report.params == report.params and again.max_k == report.k_large
    ks = [10, 50, 100]
    assert again.search(user[:3], ks) == index.search(user[:3], ks)


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and hasattr(ann.faiss, "StandardGpuResources")),
                    reason="needs CUDA and a FAISS build with GPU support")
def test_index_on_the_gpu_answers_as_on_the_cpu(big) -> None:
    _, user, index, report = big
    gpu = ann.AnnIndex.from_bytes(index.to_bytes(), report, device="cuda")
    assert gpu.device.startswith("cuda")
    got, want = gpu.search(user[:5], [10] * 5), index.search(user[:5], [10] * 5)
    assert sum(len(set(g[0]) & set(w[0])) for g, w in zip(got, want, strict=True)) >= 48


def test_served_model_answers_by_index_and_exact_when_asked(big, monkeypatch) -> None:
    from serving.model import ModelInfo, ServedModel

    item, user, index, report = big
    users, items = Vocab(f"u{i}" for i in range(len(user))), Vocab(
        f"i{i}" for i in range(len(item)))
    info = ModelInfo("production", "v", "2024-01-01")
    model = ServedModel(user, item, users, items, info, index=index)
    plain = ServedModel(user, item, users, items, info)
    assert model.ann_info["method"] == "ann" and plain.ann_info["method"] == "exact"
    before = index.searches
    got = model.topk(user[:4], [10, 5, 10, 10], [[], [], [1, 2], []])
    assert index.searches == before + 4
    want = plain.topk(user[:4], [10, 5, 10, 10], [[], [], [1, 2], []])
    assert [len(g.rows) for g in got] == [10, 5, 10, 10]
    assert all(isinstance(s, float) for g in got for s in g.scores)
    assert sum(len(set(g.rows) & set(w.rows)) for g, w in zip(got, want, strict=True)) >= 33
    big_k = model.topk(user[:1], [500])[0]  # beyond the measured k: exact
    assert index.searches == before + 4 and big_k == plain.topk(user[:1], [500])[0]
    monkeypatch.setenv("SMLREC_ANN", "off")
    assert ann.enabled() is False


def test_package_refuses_a_failing_index_and_ships_a_passing_one(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Packaging (in a child process, with its own BENTOML_HOME) refuses when the gate
    fails, leaving no model behind; with a reachable gate the bundle carries the index and
    the served model answers through it."""
    pytest.importorskip("bentoml")
    from benchmarks.serving import build_state, package_model
    from serving.model import ModelInfo, ServedModel

    item, user = clustered(5_000, 400, seed=3)
    state = build_state(tmp_path / "state", user, item,
                        Vocab(f"u{i}" for i in range(len(user))),
                        Vocab(f"i{i}" for i in range(len(item))))
    home = tmp_path / "bentoml"
    monkeypatch.setenv("SMLREC_ANN_MIN_ITEMS", "1000")
    monkeypatch.setenv("SMLREC_ANN_KINDS", "ivf_flat")
    monkeypatch.setenv("SMLREC_ANN_USERS", "200")
    monkeypatch.setenv("SMLREC_ANN_RECALL", "1.01")
    with pytest.raises(RuntimeError, match="AnnGateError.*no setting reached recall"):
        package_model(state, home)
    models = home / "models" / "smlrec-mf"
    assert not models.exists() or not [p for p in models.iterdir() if p.is_dir()]

    monkeypatch.setenv("SMLREC_ANN_RECALL", "0.95")
    package_model(state, home)
    bundle, = [p for p in models.iterdir() if p.is_dir()]
    meta = yaml.safe_load((bundle / "model.yaml").read_text())["metadata"]
    assert json.loads(meta["ann"])["kind"] == "ivf_flat"
    assert (bundle / "bundle" / ann.INDEX_FILE).exists()
    report = json.loads((bundle / "bundle" / ann.REPORT_FILE).read_text())
    assert report["passed"] and report["method"] == "ann" and report["n_items"] == 5_000
    model = ServedModel.from_bundle(str(bundle / "bundle"), ModelInfo("production", "v", ""))
    assert model.ann_info["method"] == "ann" and model.describe()["top_k"]["kind"] == "ivf_flat"
    got = model.topk(model.user[:20], [10] * 20)
    assert model.index is not None and model.index.searches == 20
    want = torch.topk(model.user[:20] @ model.item.T, 10).indices.tolist()
    assert sum(len(set(g.rows) & set(w)) for g, w in zip(got, want, strict=True)) >= 190
    monkeypatch.setenv("SMLREC_ANN", "off")
    exact = ServedModel.from_bundle(str(bundle / "bundle"), ModelInfo("production", "v", ""))
    assert exact.ann_info == {"method": "exact", "reason": "SMLREC_ANN=off: exact search forced"}
    assert [t.rows for t in exact.topk(exact.user[:20], [10] * 20)] == want
