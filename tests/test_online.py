"""Freshness between daily runs (smlrec.online): per-event user updates, the FTRL reranker
and the prequential replay, on hand-made tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smlrec import online as ol
from smlrec.config import MethodSpec, MFConfig
from smlrec.models import MFWeights
from smlrec.side import SideFeatures
from smlrec.strategies import Defaults, PeriodData

# Three items in 2 latent dimensions plus the prior column (the popularity blend).
ITEMS = torch.tensor([[1.0, 0.0, 0.5],
                      [0.0, 2.0, 0.0],
                      [1.0, 1.0, 2.0]])


def rank_of(query: torch.Tensor, item: torch.Tensor, row: int) -> int:
    s = item @ query
    return int((s > s[row]).sum())


# ----------------------------------------------------------------------------- user updates


def test_mean_is_the_decayed_mean_of_the_items_and_keeps_the_prior_column():
    rule = ol.UserUpdate(method="mean", decay=0.5)
    out = ol.update_user(torch.tensor([2.0, 2.0, 1.0]), ITEMS, [0, 1], rule, prior_column=True)
    # latent: 0.5*[2,2] + 0.5*[1,0] = [1.5,1]; then 0.5*[1.5,1] + 0.5*[0,2] = [0.75,1.5]
    assert out.tolist() == [0.75, 1.5, 1.0]
    # without a prior column every coordinate moves
    out = ol.update_user(torch.tensor([2.0, 2.0, 1.0]), ITEMS, [0], rule)
    assert out.tolist() == [1.5, 1.0, 0.75]


def test_start_vector_is_the_mean_of_the_items_with_one_in_the_prior_column():
    assert ol.start_vector(ITEMS, [0, 2, 2], prior_column=True).tolist() == pytest.approx(
        [1.0, 2 / 3, 1.0])
    assert ol.start_vector(ITEMS, [0, 1], prior_column=False).tolist() == [0.5, 1.0, 0.25]
    assert ol.start_vector(ITEMS, [], prior_column=True) is None
    # an unknown user: mean returns the start over recent + rows, none the popularity query
    mean = ol.update_user(None, ITEMS, [1], ol.UserUpdate(method="mean"), recent=[0],
                          prior_column=True)
    assert mean.tolist() == [0.5, 1.0, 1.0]
    none = ol.update_user(None, ITEMS, [1], ol.UserUpdate(method="none"), prior_column=True)
    assert none.tolist() == [0.0, 0.0, 1.0]


def test_one_grad_step_is_the_softmax_gradient_with_the_recent_items_left_out():
    item = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zero = torch.zeros(2)
    step = ol.UserUpdate(method="grad", steps=1, lr=1.0, l2=0.0)
    # p = (.5, .5): grad = E_p[v] - v_0 = (-.5, .5), u' = (.5, -.5)
    assert ol.update_user(zero, item, [0], step).tolist() == [0.5, -0.5]
    # item 1 is recent: the softmax holds item 0 alone, so there is nothing to learn
    assert ol.update_user(zero, item, [0], step, recent=[1]).tolist() == [0.0, 0.0]
    # the pull toward the anchor adds 2·l2·(u - anchor) = (-2, -2)
    pulled = ol.update_user(zero, item, [0], step.model_copy(update={"l2": 1.0}),
                            anchor=torch.ones(2))
    assert pulled.tolist() == [2.5, 1.5]


def test_grad_raises_the_event_items_rank_and_never_moves_the_prior_column():
    gen = torch.Generator().manual_seed(0)
    item = torch.randn(40, 9, generator=gen)
    query = torch.cat([torch.randn(8, generator=gen), torch.ones(1)])
    s = item @ query
    row = int(torch.argsort(s)[5])  # one of the worst-ranked items
    before = rank_of(query, item, row)
    out = ol.update_user(query, item, [row], ol.UserUpdate(method="grad", lr=0.1, steps=3,
                                                           l2=0.1), prior_column=True)
    assert rank_of(out, item, row) < before
    assert out[-1].item() == 1.0
    again = ol.update_user(query, item, [row], ol.UserUpdate(method="grad", lr=0.1, steps=3,
                                                             l2=0.1), prior_column=True)
    assert torch.equal(out, again)  # deterministic


def test_update_users_equals_one_update_user_per_user():
    gen = torch.Generator().manual_seed(1)
    item = torch.randn(30, 5, generator=gen)
    queries = [torch.randn(5, generator=gen), None, torch.randn(5, generator=gen)]
    rows = [[3, 7, 1], [4], [9, 2]]
    recents = [[5, 6], [8, 10, 11], []]
    anchors = [torch.randn(5, generator=gen), None, None]
    for rule in (ol.UserUpdate(method="grad", lr=0.05, steps=2, l2=0.3, history=2),
                 ol.UserUpdate(method="mean", decay=0.8), ol.UserUpdate(method="none")):
        batch = ol.update_users(queries, item, rows, rule, anchors=anchors, recents=recents,
                                prior_column=True)
        one = torch.stack([ol.update_user(q, item, r, rule, anchor=a, recent=rc,
                                          prior_column=True)
                           for q, r, rc, a in zip(queries, rows, recents, anchors, strict=True)])
        torch.testing.assert_close(batch, one)


def test_large_catalogues_use_a_deterministic_sampled_softmax(monkeypatch):
    monkeypatch.setattr(ol, "FULL_SOFTMAX_MAX", 20)
    monkeypatch.setattr(ol, "SAMPLED_NEGATIVES", 16)
    gen = torch.Generator().manual_seed(2)
    item = torch.randn(60, 6, generator=gen)
    query = torch.randn(6, generator=gen)
    row = int(torch.argsort(item @ query)[3])
    rule = ol.UserUpdate(method="grad", lr=0.1, steps=3, l2=0.1)
    out = ol.update_user(query, item, [row], rule, recent=[1, 2])
    assert torch.equal(out, ol.update_user(query, item, [row], rule, recent=[1, 2]))
    assert rank_of(out, item, row) < rank_of(query, item, row)


def test_item_rows_outside_the_table_are_refused():
    with pytest.raises(ValueError, match="item rows"):
        ol.update_user(torch.zeros(3), ITEMS, [3], ol.UserUpdate())


# ----------------------------------------------------------------------------- FTRL


def test_ftrl_proximal_weights_follow_the_published_algorithm():
    model = ol.FTRLProximal(1, alpha=0.5, beta=1.0, l1=0.3, l2=0.0)
    idx, val = np.array([[0]]), np.array([[1.0]])
    model.learn(idx, val, np.array([1.0]))
    # w=0, p=.5, g=-.5, sigma=(.5-0)/.5=1, z=-.5, n=.25: w = .2 / ((1+.5)/.5) = 1/15
    assert model.weights()[0] == pytest.approx(1 / 15)
    for y in (1, 1, 0, 0, 0):
        model.learn(idx, val, np.array([float(y)]))
    # |z| is back inside l1: the weight is exactly 0 (river 0.26.1 keeps its last value)
    assert abs(model.z[0]) <= 0.3 and model.weights()[0] == 0.0


def planted_side(n_users: int = 20, n_items: int = 10) -> SideFeatures:
    """Users alternate gender codes 1 and 2 (field 0); items 0-4 have genre X, 5-9 genre Y."""
    user = torch.tensor([[1 + u % 2] for u in range(n_users)])
    multi = torch.zeros(n_items, 2)
    multi[:5, 0] = 1
    multi[5:, 1] = 1
    return SideFeatures(user, (4,), torch.zeros(n_items, 0, dtype=torch.long), (), multi)


def test_ftrl_learns_a_planted_cross_and_reranks_it_first():
    rer = ol.FTRLReranker(ol.FTRLConfig(alpha=0.5, l1=0.5, blend=5.0, negatives=4),
                          planted_side(), seed=0)
    rng = np.random.default_rng(0)
    cands = np.arange(10)
    base = np.linspace(1.0, 0.0, 10)  # the base model prefers genre X (items 0-4)
    for step in range(300):
        user = int(rng.integers(20))
        pos = int(rng.integers(5)) if user % 2 == 0 else int(5 + rng.integers(5))
        ctx = ol.UserContext(user, [], float(step))
        neg = rer.negatives(cands, pos)
        assert pos not in cands[neg]
        rer.learn(ctx, pos, cands[neg], [base[pos], *base[neg]], [pos, *neg.tolist()])
        rer.observe([pos], [float(step)])
    # users with code 2 (odd rows) pick genre Y: the reranker puts Y first for them
    rows, scores = rer.rerank(ol.UserContext(1, [], 300.0), cands, base)
    assert set(rows[:5].tolist()) == {5, 6, 7, 8, 9}
    assert np.all(np.diff(scores) <= 0)
    rows, _ = rer.rerank(ol.UserContext(0, [], 300.0), cands, base)
    assert set(rows[:5].tolist()) == {0, 1, 2, 3, 4}
    sp = rer.sparsity()
    assert 0 < sp["share"] <= 1 and sp["nonzero"] <= sp["total"]


def test_item_recency_buckets_read_the_stream_clock():
    rer = ol.FTRLReranker(ol.FTRLConfig(), planted_side(), seed=0)
    rer.observe([0, 1], [0.0, 3600.0 * 7])
    buckets = rer._recency_bucket(np.array([0, 1, 2]), now=3600.0 * 8)
    # 8 h ago -> 1 + floor(log2 9) = 4; 1 h ago -> 1 + 1 = 2; never -> 0
    assert buckets.tolist() == [4, 2, 0]


# ----------------------------------------------------------------------------- replay


def test_replay_daily_arm_on_a_three_item_case():
    # period 0: user 0 took item 1. Period 1 (served by W below): user 0 takes item 2 then
    # item 0; user 1 (unknown to W) takes item 1; user 0 takes item 1 again (not scored).
    periods = [PeriodData("p0", np.array([0]), np.array([1])),
               PeriodData("p1", np.array([0, 1, 0, 0]), np.array([2, 1, 0, 1]))]
    w = MFWeights(torch.tensor([[1.0, 0.0, 1.0]]), ITEMS.clone())
    out = ol.prequential_replay(periods, {1: w}, [1], ol.UserUpdate(method="mean", decay=0.5))
    # user 0, item 2: scores (1.5, -, 3) with item 1 excluded -> rank 0: NDCG 1
    # user 1, item 1: popularity column (.5, 0, 2) -> rank 2: NDCG 1/log2(4) = .5
    # user 0, item 0: items 1, 2 excluded -> rank 0: NDCG 1
    assert out.ndcg["daily"].tolist() == [1.0, 0.5, 1.0]
    assert out.recall["daily"].tolist() == [1.0, 1.0, 1.0]
    assert out.new.tolist() == [False, True, False]
    means = out.means()
    assert means["daily"]["new"]["ndcg@20"] == 0.5 and means["daily"]["all"]["n_events"] == 3
    # user 0's vector after item 2 (mean, decay .5): latent (1, .5); item 0 is still first
    assert out.ndcg["daily+user"].tolist() == [1.0, 0.5, 1.0]


def test_replay_events_are_taken_in_time_order_and_unknown_items_miss():
    periods = [PeriodData("p0", np.array([0]), np.array([1])),
               PeriodData("p1", np.array([0, 0]), np.array([0, 3]))]
    w = MFWeights(torch.tensor([[1.0, 0.0, 1.0]]), ITEMS.clone())
    # item 3 (unknown to W: a miss in a catalogue of 3) happened first, at time 1
    out = ol.prequential_replay(periods, {1: w}, [1], ol.UserUpdate(method="none"),
                                times=[np.array([0.0]), np.array([5.0, 1.0])])
    # in time order: item 3 (miss: 0), then item 0 with item 1 excluded: scores 1.5 vs 3
    assert out.ndcg["daily"].tolist() == [0.0, 1 / math.log2(3)]


def test_replay_on_a_synthetic_stream_returns_sane_figures():
    from smlrec.backtest import index_periods
    from smlrec.data.synthetic import generate_side_tables, generate_stream
    from smlrec.side import encode

    args = {"n_users": 150, "n_items": 60, "dim": 8, "seed": 3}
    frame = generate_stream(n_periods=6, interactions_per_period=600, returning_share=0.6,
                            **args)
    data = index_periods(frame)
    served = ol.daily_models(data.periods, data.sizes,
                             MethodSpec(method="finetune", params={"epochs": 2, "blend": 1.0}),
                             Defaults(seed=0), 2, MFConfig(lr=0.01, epochs=3), 1, 6)
    assert sorted(served) == [3, 4, 5] and served[3].dim == 65  # 64 + the blend column
    users, items = generate_side_tables(**args)
    feats = encode(users, items, data.users, data.items)
    times = ol.period_times(frame)
    assert all(np.all(np.diff(x) >= 0) for x in times)
    rule = ol.UserUpdate(method="grad", lr=0.05, steps=2, l2=0.1)
    out = ol.prequential_replay(data.periods, served, [3, 4, 5], rule, times=times,
                                ftrl=ol.FTRLConfig(candidates=20), features=feats, seed=0,
                                timed_events=50)
    assert set(out.ndcg) == set(ol.ARMS)
    for arm in ol.ARMS:
        assert len(out.ndcg[arm]) == len(out.t) and np.all((out.ndcg[arm] >= 0)
                                                           & (out.ndcg[arm] <= 1))
        assert np.all(out.ndcg[arm] <= out.recall[arm])
    means = out.means([4, 5])
    assert means["daily"]["all"]["n_events"] == int(np.isin(out.t, [4, 5]).sum()) > 0
    assert means["daily+user"]["all"]["ndcg@20"] > 0
    assert set(out.events_per_second()) == {"update_user", "update_user+ftrl_learn"}
    assert 0 < out.sparsity["share"] <= 1
    # the same inputs give the same figures
    again = ol.prequential_replay(data.periods, served, [3, 4, 5], rule, times=times,
                                  ftrl=ol.FTRLConfig(candidates=20), features=feats, seed=0)
    for arm in ol.ARMS:
        assert np.array_equal(out.ndcg[arm], again.ndcg[arm])
