"""Tests for smlrec.metrics: hand-computed cases, protocol invariants, batching and devices."""

import math

import numpy as np
import pytest
import torch

from smlrec.metrics import (
    full_ranking,
    mf_pair_scorer,
    mf_scorer,
    popularity_pair_scorer,
    popularity_scorer,
    sampled_ranking,
    weighted_mean,
)

# Two users x five items. Rankings (best first): user 0: 0, 2, 4, 3, 1; user 1: 1, 3, 2, 0, 4.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.5],
        [0.2, 0.7, 0.4, 0.6, 0.1],
    ]
)
# R_0 = {0, 4} (ranks 0 and 2), R_1 = {2} (rank 2).
TEST_USERS = np.array([0, 0, 1])
TEST_ITEMS = np.array([0, 4, 2])

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)


def matrix_scorer(scores: torch.Tensor):
    return lambda users: scores[users.to(scores.device)]


def matrix_pair_scorer(scores: torch.Tensor):
    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        users, items = users.to(scores.device), items.to(scores.device)
        return scores[users.unsqueeze(1), items]

    return score


def test_hand_computed_full_ranking():
    out = full_ranking(matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, ks=(1, 2, 3))
    # K=1: user 0 hits item 0, user 1 misses.
    assert out["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["precision@1"] == pytest.approx((1 + 0) / 2)
    assert out["hit@1"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg@1"] == pytest.approx((1 + 0) / 2)
    # K=2: still only item 0 of user 0.
    ndcg2_u0 = (1 / math.log2(2)) / (1 / math.log2(2) + 1 / math.log2(3))
    assert out["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["precision@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["hit@2"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg@2"] == pytest.approx((ndcg2_u0 + 0) / 2)
    # K=3: user 0 hits at ranks 0 and 2, user 1 at rank 2.
    ndcg3_u0 = (1 / math.log2(2) + 1 / math.log2(4)) / (1 / math.log2(2) + 1 / math.log2(3))
    ndcg3_u1 = (1 / math.log2(4)) / (1 / math.log2(2))
    assert out["recall@3"] == pytest.approx((1 + 1) / 2)
    assert out["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert out["hit@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((ndcg3_u0 + ndcg3_u1) / 2)
    assert out["n_users"] == 2
    assert out["n_interactions"] == 3
    assert all(type(v) is float for k, v in out.items() if not k.startswith("n_"))


def test_exclusion_moves_items_up():
    # User 0 saw item 2 -> ranking 0, 4, 3, 1; user 1 saw 1 and 3 -> ranking 2, 0, 4.
    out = full_ranking(
        matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, [0, 1, 1], [2, 1, 3], ks=(1, 2)
    )
    assert out["recall@1"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["ndcg@1"] == pytest.approx(1.0)
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx(1.0)
    assert out["precision@2"] == pytest.approx((2 / 2 + 1 / 2) / 2)


def test_test_pairs_in_exclude_set_are_dropped():
    # (0, 0) is both seen and held out: dropped, so R_0 = {4}; item 0 is also masked for user 0,
    # so user 0's ranking is 2, 4, 3, 1 (item 4 at rank 1).
    out = full_ranking(matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, [0], [0], ks=(1, 2, 3))
    assert out["n_interactions"] == 2
    assert out["n_users"] == 2
    assert out["recall@1"] == pytest.approx(0.0)
    assert out["recall@2"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 0) / 2)
    # A user whose only test pair is dropped is no longer a test user.
    out = full_ranking(matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, [1], [2], ks=(1,))
    assert out["n_users"] == 1
    assert out["recall@1"] == pytest.approx(1 / 2)


def test_duplicate_test_pairs_count_once():
    users, items = np.r_[TEST_USERS, 0], np.r_[TEST_ITEMS, 4]
    dup = full_ranking(matrix_scorer(SCORES), users, items, 5, ks=(1, 2, 3))
    assert dup == full_ranking(matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, ks=(1, 2, 3))


def test_candidate_mask():
    # Item 0 is not a candidate: test pair (0, 0) is dropped and item 0 gets -inf.
    # User 0: ranking 2, 4, 3, 1, R_0 = {4} at rank 1. User 1: ranking 1, 3, 2, 4, R_1 = {2}.
    mask = torch.tensor([False, True, True, True, True])
    out = full_ranking(
        matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, ks=(2, 3), candidate_mask=mask
    )
    assert out["n_interactions"] == 2
    assert out["recall@2"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 0) / 2)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)


def test_k_larger_than_catalogue():
    out = full_ranking(matrix_scorer(SCORES), TEST_USERS, TEST_ITEMS, 5, ks=(50,))
    assert out["recall@50"] == pytest.approx(1.0)
    assert out["precision@50"] == pytest.approx((2 / 50 + 1 / 50) / 2)


def random_split(seed: int, n_users: int, n_items: int, n_test: int, n_seen: int):
    rng = np.random.default_rng(seed)
    keys = rng.choice(n_users * n_items, size=n_test + n_seen, replace=False)
    users, items = keys // n_items, keys % n_items
    return users[:n_test], items[:n_test], users[n_test:], items[n_test:]


def relevance(users, items, n_users: int, n_items: int) -> torch.Tensor:
    rel = torch.zeros(n_users, n_items)
    rel[torch.as_tensor(users), torch.as_tensor(items)] = 1.0
    return rel


def test_perfect_and_reversed_scorers():
    n_users, n_items = 30, 200
    tu, ti, eu, ei = random_split(0, n_users, n_items, 60, 300)
    keep = np.bincount(tu, minlength=n_users)[tu] <= 5  # |R_u| <= min(ks) so recall can be 1
    tu, ti = tu[keep], ti[keep]
    rel = relevance(tu, ti, n_users, n_items)
    noise = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0)) * 0.5
    ks = (5, 10, 20)
    perfect = full_ranking(matrix_scorer(rel + noise), tu, ti, n_items, eu, ei, ks=ks)
    reverse = full_ranking(matrix_scorer(-rel - noise), tu, ti, n_items, eu, ei, ks=ks)
    for k in ks:
        assert perfect[f"recall@{k}"] == pytest.approx(1.0)
        assert perfect[f"ndcg@{k}"] == pytest.approx(1.0)
        assert perfect[f"hit@{k}"] == pytest.approx(1.0)
        assert reverse[f"recall@{k}"] == 0.0
        assert reverse[f"ndcg@{k}"] == 0.0
        assert reverse[f"hit@{k}"] == 0.0


def reference_full_ranking(scores, tu, ti, eu, ei, ks):
    """Per-user loop over numpy arrays, straight from the definitions."""
    scores = scores.numpy().astype(np.float64).copy()
    scores[eu, ei] = -np.inf
    seen = set(zip(eu.tolist(), ei.tolist(), strict=True))
    rel: dict[int, set[int]] = {}
    for u, i in zip(tu.tolist(), ti.tolist(), strict=True):
        if (u, i) not in seen:
            rel.setdefault(u, set()).add(i)
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "precision", "hit")}
    for u, items in rel.items():
        order = np.argsort(-scores[u], kind="stable")
        for k in ks:
            hits = [r for r, i in enumerate(order[:k]) if i in items]
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(items), k)))
            out[f"recall@{k}"] += len(hits) / len(items)
            out[f"ndcg@{k}"] += sum(1 / math.log2(r + 2) for r in hits) / idcg
            out[f"precision@{k}"] += len(hits) / k
            out[f"hit@{k}"] += float(bool(hits))
    return {key: v / len(rel) for key, v in out.items()}, len(rel)


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_matches_reference_for_any_batch_size(batch_size):
    n_users, n_items, dim = 50, 120, 8
    tu, ti, eu, ei = random_split(1, n_users, n_items, 150, 800)
    # Some test pairs also seen, to exercise the dropping.
    tu, ti = np.r_[tu, eu[:10]], np.r_[ti, ei[:10]]
    gen = torch.Generator().manual_seed(1)
    user_emb = torch.randn(n_users, dim, generator=gen, dtype=torch.float64)
    item_emb = torch.randn(n_items, dim, generator=gen, dtype=torch.float64)
    ks = (1, 5, 10, 20)
    out = full_ranking(mf_scorer(user_emb, item_emb), tu, ti, n_items, eu, ei, ks, batch_size)
    expected, n_users_expected = reference_full_ranking(user_emb @ item_emb.T, tu, ti, eu, ei, ks)
    assert out["n_users"] == n_users_expected
    assert out["n_interactions"] == 150
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_batch_sizes_agree():
    n_users, n_items = 40, 300
    tu, ti, eu, ei = random_split(2, n_users, n_items, 200, 2000)
    scorer = mf_scorer(torch.randn(n_users, 16), torch.randn(n_items, 16))
    one = full_ranking(scorer, tu, ti, n_items, eu, ei, batch_size=1)
    many = full_ranking(scorer, tu, ti, n_items, eu, ei, batch_size=1024)
    assert one.keys() == many.keys()
    for key in one:
        assert one[key] == pytest.approx(many[key], rel=1e-12, abs=1e-15)


def test_popularity_scorer():
    # Item popularity 5, 1, 4, 2, 3 -> same ranking 0, 2, 4, 3, 1 for everyone.
    pop = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    users, items = np.array([0, 1, 1]), np.array([4, 3, 1])
    out = full_ranking(popularity_scorer(pop), users, items, 5, [1], [0], ks=(2, 3))
    # User 0: R = {4} at rank 2. User 1 saw item 0: ranking 2, 4, 3, 1; R = {3, 1} at ranks 2, 3.
    assert out["recall@2"] == 0.0
    assert out["recall@3"] == pytest.approx((1 + 1 / 2) / 2)
    ndcg3_u1 = (1 / math.log2(4)) / (1 / math.log2(2) + 1 / math.log2(3))
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(4) + ndcg3_u1) / 2)
    assert torch.equal(pop, torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]))  # not modified in place


def test_no_test_pairs_left():
    out = full_ranking(matrix_scorer(SCORES), [0], [0], 5, [0], [0], ks=(1,))
    assert out["n_users"] == 0 and out["n_interactions"] == 0
    assert math.isnan(out["recall@1"])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="test_items"):
        full_ranking(matrix_scorer(SCORES), [0], [5], 5)
    with pytest.raises(ValueError, match="entries"):
        full_ranking(matrix_scorer(SCORES), [0, 1], [0], 5)
    with pytest.raises(ValueError, match="shape"):
        full_ranking(lambda u: SCORES[u, :4], [0], [0], 5)
    with pytest.raises(ValueError, match="NaN"):
        full_ranking(lambda u: torch.full((len(u), 5), math.nan), [0], [0], 5)
    with pytest.raises(ValueError, match="candidate_mask"):
        full_ranking(matrix_scorer(SCORES), [0], [0], 5, candidate_mask=torch.ones(5))
    with pytest.raises(ValueError, match="ks"):
        full_ranking(matrix_scorer(SCORES), [0], [0], 5, ks=(0,))


# --------------------------------------------------------------------------- sampled protocol


def test_sampled_hand_computed():
    # Score = item index. User 0 holds out item 3; negatives are all of 0, 1, 2, 4, 5 (only 5
    # eligible, fewer than n_negatives): 2 score higher -> rank 2.
    pop = torch.arange(6, dtype=torch.float32)
    out = sampled_ranking(popularity_pair_scorer(pop), [0], [3], 6, [], [], ks=(1, 2, 3, 20))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 0.0
    assert out["recall@3"] == 1.0
    assert out["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert out["auc"] == pytest.approx(3 / 5)
    # User 0 also saw items 4 and 5: eligible negatives 0, 1, 2, all lower -> rank 0, auc 1.
    out = sampled_ranking(popularity_pair_scorer(pop), [0], [3], 6, [0, 0], [4, 5], ks=(1,))
    assert out["recall@1"] == 1.0 and out["ndcg@1"] == 1.0 and out["auc"] == 1.0


def test_sampled_ties_count_half():
    # Ten negatives all tied with the positive: rank = 0.5 * 10 = 5.
    out = sampled_ranking(
        lambda u, i: torch.zeros(i.shape), [0], [0], 100, [], [], n_negatives=10, ks=(5, 6)
    )
    assert out["auc"] == pytest.approx(0.5)
    assert out["recall@5"] == 0.0
    assert out["recall@6"] == 1.0
    assert out["ndcg@6"] == pytest.approx(1 / math.log2(7))


def test_sampled_perfect_and_constant_scorers():
    n_users, n_items = 40, 3000
    tu, ti, eu, ei = random_split(3, n_users, n_items, 300, 6000)
    rel = relevance(tu, ti, n_users, n_items)
    perfect = sampled_ranking(matrix_pair_scorer(rel), tu, ti, n_items, eu, ei, ks=(1, 20))
    assert perfect["auc"] == 1.0
    assert perfect["ndcg@1"] == 1.0 and perfect["ndcg@20"] == 1.0
    assert perfect["recall@20"] == 1.0
    assert perfect["n_interactions"] == 300
    constant = sampled_ranking(lambda u, i: torch.ones(i.shape), tu, ti, n_items, eu, ei, ks=(20,))
    assert constant["auc"] == pytest.approx(0.5)
    assert constant["recall@20"] == 0.0  # rank 499.5


@pytest.mark.parametrize(
    ("n_items", "n_negatives"),
    [(3000, 999), (1500, 999), (60, 999)],  # sparse draws, permutation draws, too few items
)
def test_sampled_negatives_are_unseen_distinct_candidates(n_items, n_negatives):
    n_users = 25
    tu, ti, eu, ei = random_split(4, n_users, n_items, 80, n_users * n_items // 4)
    candidates = np.arange(0, n_items, 2)  # even items only
    seen_even = np.flatnonzero(ei % 2 == 0)[0]
    # Dropped: an odd (non-candidate) test item, and a test pair the user had already seen.
    tu, ti = np.r_[tu, 0, eu[seen_even]], np.r_[ti, 1, ei[seen_even]]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        calls.append((users.clone(), items.clone()))
        return torch.rand(items.shape)

    out = sampled_ranking(
        recording, tu, ti, n_items, eu, ei, n_negatives, candidate_items=candidates, batch_size=16
    )
    cand = set(candidates.tolist())
    forbidden: dict[int, set[int]] = {}
    for u, i in zip(np.r_[tu, eu].tolist(), np.r_[ti, ei].tolist(), strict=True):
        forbidden.setdefault(u, set()).add(i)
    positives = {(u, i) for u, i in zip(tu.tolist(), ti.tolist(), strict=True)}
    positives = {(u, i) for u, i in positives if i in cand} - set(
        zip(eu.tolist(), ei.tolist(), strict=True)
    )
    asked = []
    for users, items in calls:
        for u, row in zip(users.tolist(), items.tolist(), strict=True):
            asked.append((u, row[0]))
            eligible = cand - forbidden[u]
            negatives = [i for i in row[1:] if i != row[0]]  # padding repeats the positive
            assert len(negatives) == min(n_negatives, len(eligible))
            assert len(set(negatives)) == len(negatives)
            assert set(negatives) <= eligible
    assert sorted(asked) == sorted(positives)
    assert out["n_interactions"] == len(positives)


def test_sampled_auc_uses_actual_negative_count():
    # 10 items; user 0 saw 5..9 and holds out 4: eligible negatives 0..3, all sampled.
    # Scores: item 0 beats the positive, the other three lose -> auc = 3/4, rank = 1.
    pop = torch.tensor([9.0, 1, 2, 3, 5, 0, 0, 0, 0, 0])
    out = sampled_ranking(
        popularity_pair_scorer(pop), [0], [4], 10, [0] * 5, [5, 6, 7, 8, 9], ks=(1, 2)
    )
    assert out["auc"] == pytest.approx(3 / 4)
    assert out["recall@1"] == 0.0
    assert out["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_sampled_is_uniform_and_seeded():
    # One user, item 0 held out, 99 eligible negatives; 2000 positives-worth of draws of 10.
    n_items, n_draws = 100, 2000
    counts = np.zeros(n_items)

    def counting(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        np.add.at(counts, items[:, 1:].numpy().ravel(), 1)
        return torch.rand(items.shape)

    for seed in range(n_draws // 10):
        sampled_ranking(counting, [0] * 10, list(range(10)), n_items, [], [], 10, seed=seed)
    # Each positive of user 0 samples 10 of the 90 items 10..99.
    assert counts[:10].sum() == 0
    expected = n_draws * 10 / 90
    assert np.all(np.abs(counts[10:] - expected) < 5 * math.sqrt(expected))

    def first_row(seed: int) -> list[int]:
        rows = []
        sampled_ranking(
            lambda u, i: rows.append(i[0].tolist()) or torch.rand(i.shape),
            [0],
            [0],
            1000,
            [],
            [],
            5,
            seed=seed,
        )
        return rows[0]

    assert first_row(0) == first_row(0)
    assert first_row(0) != first_row(1)


def test_sampled_mf_pair_scorer_matches_mf_scorer():
    n_users, n_items, dim = 10, 500, 4
    user_emb, item_emb = torch.randn(n_users, dim), torch.randn(n_items, dim)
    users = torch.arange(n_users)
    items = torch.randint(0, n_items, (n_users, 7))  # gather path (500 > 64 * 7)
    full = mf_scorer(user_emb, item_emb)(users)
    expected = full.gather(1, items)
    torch.testing.assert_close(mf_pair_scorer(user_emb, item_emb)(users, items), expected)
    items = torch.randint(0, n_items, (n_users, 100))  # matmul path
    torch.testing.assert_close(
        mf_pair_scorer(user_emb, item_emb)(users, items), full.gather(1, items)
    )


# --------------------------------------------------------------------------- weighted mean


def test_weighted_mean():
    periods = [
        {"recall@20": 0.5, "auc": 0.9, "n_users": 3, "n_interactions": 10},
        {"recall@20": 0.2, "auc": 0.6, "n_users": 2, "n_interactions": 30},
        {"recall@20": math.nan, "auc": math.nan, "n_users": 0, "n_interactions": 0},
    ]
    out = weighted_mean(periods)
    assert out["recall@20"] == pytest.approx((10 * 0.5 + 30 * 0.2) / 40)
    assert out["auc"] == pytest.approx((10 * 0.9 + 30 * 0.6) / 40)
    assert out["n_interactions"] == 40
    assert out["n_users"] == 5
    by_users = weighted_mean(periods, weight_key="n_users")
    assert by_users["recall@20"] == pytest.approx((3 * 0.5 + 2 * 0.2) / 5)
    assert math.isnan(weighted_mean(periods[2:])["auc"])
    with pytest.raises(ValueError, match="keys"):
        weighted_mean([periods[0], {"auc": 1.0, "n_interactions": 1}])


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_runs_on_device(device):
    n_users, n_items = 30, 400
    tu, ti, eu, ei = random_split(5, n_users, n_items, 100, 1500)
    gen = torch.Generator().manual_seed(5)
    user_emb = torch.randn(n_users, 8, generator=gen, dtype=torch.float64)
    item_emb = torch.randn(n_items, 8, generator=gen, dtype=torch.float64)
    pop = torch.randn(n_items, generator=gen, dtype=torch.float64)
    mask = torch.rand(n_items, generator=gen) < 0.8
    dev = torch.device(device)

    def run(emb_u, emb_i, p, m):
        return (
            full_ranking(mf_scorer(emb_u, emb_i), tu, ti, n_items, eu, ei, candidate_mask=m),
            full_ranking(popularity_scorer(p), tu, ti, n_items, eu, ei, batch_size=7),
            sampled_ranking(mf_pair_scorer(emb_u, emb_i), tu, ti, n_items, eu, ei, 50),
            sampled_ranking(popularity_pair_scorer(p), tu, ti, n_items, eu, ei, 500),
        )

    on_device = run(user_emb.to(dev), item_emb.to(dev), pop.to(dev), mask.to(dev))
    on_cpu = run(user_emb, item_emb, pop, mask)
    for got, expected in zip(on_device, on_cpu, strict=True):
        assert got.keys() == expected.keys()
        for key in got:
            assert got[key] == pytest.approx(expected[key], rel=1e-9), key


# --------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_on_a_hand_computed_case():
    from smlrec.metrics import paired_bootstrap

    # Two users: the model scores (1, 0), the floor (1, 1). A replicate draws two users with
    # replacement: (1,1) w.p. 1/4 -> ratio 1; mixed w.p. 1/2 -> 0.5; (2,2) w.p. 1/4 -> 0.
    r = paired_bootstrap([np.array([1.0, 0.0])], [np.array([1.0, 1.0])], n_boot=4000, seed=1)
    assert r["ratio"] == 0.5 and r["diff"] == -0.5
    assert r["low"] == 0.0 and r["high"] == 1.0
    assert r["p_not_better"] == 1.0 and r["n_units"] == 2
    # Constant ratio: the interval collapses onto it.
    r = paired_bootstrap([np.array([0.2, 0.4, 0.6])], [np.array([0.1, 0.2, 0.3])], n_boot=500)
    assert r["ratio"] == pytest.approx(2.0)
    assert r["low"] == pytest.approx(2.0) and r["high"] == pytest.approx(2.0)
    assert r["p_not_better"] == 0.0


def test_paired_bootstrap_weights_strata_like_the_reported_mean():
    from smlrec.metrics import paired_bootstrap

    a = [np.array([0.3, 0.3]), np.array([0.1])]
    b = [np.array([0.1, 0.1]), np.array([0.1])]
    # Period means 0.3 and 0.1 for a, 0.1 and 0.1 for b; weights 3 and 1.
    r = paired_bootstrap(a, b, weights=[3, 1], n_boot=200)
    assert r["ratio"] == pytest.approx((3 * 0.3 + 0.1) / (3 * 0.1 + 0.1))
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([np.ones(2)], [np.ones(3)])


def test_full_ranking_per_user_values_average_to_the_reported_means():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 3.0, 2.0]])
    out = full_ranking(lambda u: scores[u], [0, 1, 2, 2], [0, 0, 2, 1], 4, ks=(1, 2),
                       per_user=True)
    pu = out["per_user"]
    assert pu["user"].tolist() == [0, 1, 2] and pu["n_relevant"].tolist() == [1, 1, 2]
    assert pu["ndcg@2"].mean() == pytest.approx(out["ndcg@2"])
    assert pu["recall@1"].tolist() == [1.0, 0.0, 0.5]
