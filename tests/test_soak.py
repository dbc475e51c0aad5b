"""The short soak: the API under the highest load this machine sustains for a few seconds,
with a hot swap in the middle (``make soak`` runs the 60-second version)."""

from __future__ import annotations

import pytest

pytest.importorskip("bentoml")
pytest.importorskip("aiohttp")


def test_short_soak_with_a_hot_swap_has_no_errors(tmp_path, reliability) -> None:
    from benchmarks.soak import soak

    r = soak(items=20_000, users=2_000, duration=8.0, concurrency=16, warmup=1.0,
             work=tmp_path)
    assert r["load_requests"] > 100
    assert r["load_errors"] == 0, r["load"]["error_kinds"]
    assert r["swap_seen_after_s"] is not None and r["serving_after"] == r["swapped_to"]
    assert r["swapped_to"] != r["first_model"]
    for key in ("load_requests", "load_errors", "load_p99_ms"):
        reliability.set(key, r[key])
    reliability.set("load_duration_s", r["duration_s"])
    reliability.set("load_source", "tests/test_soak.py (short); make soak for 60 s")
