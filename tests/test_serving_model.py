"""The serving core without HTTP: top-k, exclusions, similarity, canary hash, micro-batching,
hot-swap bookkeeping."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from serving.batching import MicroBatcher, TTLCache
from serving.model import ModelInfo, ServedModel, canary_bucket
from serving.sources import LiveModels, ModelRef
from smlrec.io import save_bundle
from smlrec.vocab import Vocab


def _model(n_users: int = 20, n_items: int = 50, dim: int = 8, seed: int = 0,
           version: str = "v1") -> ServedModel:
    g = torch.Generator().manual_seed(seed)
    user, item = torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g)
    return ServedModel(user, item,
                       Vocab([f"u{i}" for i in range(n_users)]),
                       Vocab([f"i{i}" for i in range(n_items)]),
                       ModelInfo("production", version, "2024-01-01"), ["i3", "i1", "gone"])


def test_topk_is_the_full_ranking_with_exclusions() -> None:
    m = _model()
    q = torch.stack([m.user_vector(0), m.user_vector(1)])
    got = m.topk(q, [5, 3], exclude=[[], [int(i) for i in torch.topk(m.item @ q[1], 2).indices]])
    assert got[0].rows == torch.topk(m.item @ q[0], 5).indices.tolist()
    assert got[1].rows == torch.topk(m.item @ q[1], 5).indices.tolist()[2:5]
    assert got[0].scores == sorted(got[0].scores, reverse=True)


def test_exact_topk_in_chunks_equals_one_product(monkeypatch) -> None:
    m = _model()
    q = torch.randn(7, m.dim, generator=torch.Generator().manual_seed(1))
    ex = [[0, 1], [], [2], [], [], [3, 4, 5], []]
    whole = m.topk(q, [4] * 7, ex)
    monkeypatch.setattr("serving.model.SCORE_CELLS", 2 * m.n_items)  # two queries a chunk
    assert [t.rows for t in m.topk(q, [4] * 7, ex)] == [t.rows for t in whole]


def test_topk_returns_fewer_when_the_catalogue_is_exhausted() -> None:
    m = _model(n_items=6)
    got = m.topk(m.user_vector(0).unsqueeze(0), [10], exclude=[[0, 1, 2]])
    assert sorted(got[0].rows) == [3, 4, 5]


def test_similar_excludes_the_item_itself_and_uses_cosine() -> None:
    m = _model()
    top = m.similar(4, 3)
    cos = torch.nn.functional.cosine_similarity(m.item, m.item[4].unsqueeze(0), dim=1)
    cos[4] = -2
    assert top.rows == torch.topk(cos, 3).indices.tolist() and 4 not in top.rows


def test_lookups_popular_and_mean_embedding() -> None:
    m = _model()
    assert m.user_row("u3") == 3 and m.user_row("nobody") is None
    assert m.item_rows(["i2", "x", "i2"]) == ([2, 2], ["x"])
    assert m.popular == ["i3", "i1", "gone"]  # new items are still items
    torch.testing.assert_close(m.mean_item_vector([1, 3]), (m.item[1] + m.item[3]) / 2)


def test_canary_bucket_is_stable_and_uniform() -> None:
    assert canary_bucket("user-42") == canary_bucket("user-42")
    values = [canary_bucket(f"u{i}") for i in range(20000)]
    assert all(0 <= v < 1 for v in values)
    share = sum(v < 0.25 for v in values) / len(values)
    assert abs(share - 0.25) < 0.015


def test_bundle_round_trip_and_corruption_is_refused(tmp_path) -> None:
    m = _model()
    url = str(tmp_path / "bundle")
    save_bundle(url, {"user": m.user, "item": m.item}, {"period": "2024-01-01"},
                {"vocab_users.json": Vocab([f"u{i}" for i in range(20)]).to_json().encode(),
                 "vocab_items.json": Vocab([f"i{i}" for i in range(50)]).to_json().encode(),
                 "popular.json": b'["i9"]'})
    loaded = ServedModel.from_bundle(url, ModelInfo("production", "v", ""))
    assert loaded.info.period == "2024-01-01" and loaded.popular == ["i9"]
    torch.testing.assert_close(loaded.item, m.item)
    weights = tmp_path / "bundle/weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum|sha256"):
        ServedModel.from_bundle(url, ModelInfo("production", "v", ""))


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "event-loop"])
def test_micro_batcher_batches_concurrent_jobs_and_isolates_errors(threaded: bool) -> None:
    calls: list[int] = []

    def fn(jobs):
        calls.append(len(jobs))
        time.sleep(0.02)
        return [ValueError("bad job") if j < 0 else j * 2 for j in jobs]

    batcher = MicroBatcher(fn, max_batch_size=8, threaded=threaded)

    async def main():
        return await asyncio.gather(*(batcher.submit(j) for j in [*range(20), -1]),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert results[:20] == [j * 2 for j in range(20)]
    assert isinstance(results[20], ValueError)
    assert max(calls) > 1 and all(c <= 8 for c in calls) and sum(calls) == 21
    assert batcher.stats.jobs == 21 and batcher.stats.largest == max(calls)
    batcher.close()


def test_ttl_cache_expires_bounds_its_size_and_ttl_zero_keeps_nothing(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("serving.batching.time.monotonic", lambda: now[0])
    cache: TTLCache[str, int] = TTLCache(ttl=5.0, maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)  # over maxsize: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    now[0] += 5.0
    assert cache.get("a") is None and len(cache) == 1  # expired, dropped when asked
    assert (cache.hits, cache.misses) == (3, 2)
    off: TTLCache[str, int] = TTLCache(ttl=0.0, maxsize=10)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def test_live_models_swap_keeps_serving_when_a_version_fails_to_load() -> None:
    versions = {"production": "v1"}
    broken = {"v2"}

    class Source:
        name = "test"

        def latest(self):
            def load(device, v=versions["production"]):
                if v in broken:
                    raise OSError(f"{v}: checksum mismatch")
                return _model(version=v)
            return {"production": ModelRef(versions["production"], "p", load)}

    live = LiveModels(Source(), torch.device("cpu"), reload_seconds=0)
    assert live.refresh() == {"production": "v1"} and live.refresh() == {}
    versions["production"] = "v2"
    assert live.refresh() == {}
    assert live.production.info.version == "v1" and "checksum mismatch" in live.last_error
    versions["production"] = "v3"
    assert live.refresh() == {"production": "v3"} and live.last_error == ""
    held = live.production
    readers_ok = threading.Event()

    def reader():  # a request holding the old model still ranks with it after the swap
        held.topk(held.user_vector(0).unsqueeze(0), [3])
        readers_ok.set()

    versions["production"] = "v4"
    live.refresh()
    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert readers_ok.is_set() and live.production.info.version == "v4"
    assert held.info.version == "v3"
