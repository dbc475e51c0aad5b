"""The two-tower softmax model: known answers on synthetic worlds, the bags, logQ, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smlrec.side import SideFeatures
from smlrec.strategies import PeriodData
from smlrec.two_tower import (
    TwoTower,
    TwoTowerConfig,
    build_examples,
    logq_table,
    softmax_loss,
)

G, PER, NU, FRESH = 4, 10, 200, 40  # groups, items per group, trained users, unseen users
N_OLD = G * PER                     # item rows 0..39 are trained; 40..43: one new item a group
N_ITEMS = N_OLD + G
ITEM_GROUP = np.r_[np.repeat(np.arange(G), PER), np.arange(G)]
USER_GROUP = np.arange(NU + FRESH) % G
FAST = dict(batch_size=128, replay=2)


def group_world(user_features: bool = True, item_features: bool = True, seed: int = 0
                ) -> tuple[SideFeatures, list[PeriodData]]:
    """Users of group g interact only with group-g items (4 distinct ones a period, two
    periods). User rows NU.. never interact (brand-new users, features only); item rows
    40..43 never occur (brand-new items, features only)."""
    rng = np.random.default_rng(seed)
    ucode = USER_GROUP + 1 if user_features else np.ones(NU + FRESH, np.int64)
    if item_features:
        icode = ITEM_GROUP + 1
        multi = np.zeros((N_ITEMS, G), np.float32)
        multi[np.arange(N_ITEMS), ITEM_GROUP] = 1.0  # a "genre" token per group
    else:
        icode = np.ones(N_ITEMS, np.int64)
        multi = np.zeros((N_ITEMS, 0), np.float32)
    feats = SideFeatures(torch.as_tensor(ucode, dtype=torch.long)[:, None], (G + 1,),
                         torch.as_tensor(icode, dtype=torch.long)[:, None], (G + 1,),
                         torch.from_numpy(multi))
    periods = []
    for p in range(2):
        users = np.repeat(np.arange(NU), 4)
        items = np.concatenate([USER_GROUP[u] * PER + rng.choice(PER, 4, replace=False)
                                for u in range(NU)])
        order = rng.permutation(len(users))
        periods.append(PeriodData(f"p{p}", users[order], items[order]))
    return feats, periods


def in_group_at_10(model: TwoTower, users: np.ndarray, bags: list[np.ndarray]) -> float:
    """Mean share of each user's top 10 (among the trained items) in the user's group."""
    scores = model.user_vectors(users, bags) @ model.item_table(N_ITEMS).T
    top = scores[:, :N_OLD].topk(10, dim=1).indices.cpu().numpy()
    return float((ITEM_GROUP[top] == USER_GROUP[users][:, None]).mean())


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTower, list[PeriodData]]:
    feats, periods = group_world()
    model = TwoTower(feats, TwoTowerConfig(epochs=15, **FAST), seed=0)
    out = model.fit(periods, NU + FRESH, N_ITEMS)
    assert out["examples"] == sum(len(p) for p in periods) and math.isfinite(out["loss"])
    return model, periods


def test_features_decide_for_known_bagless_and_new_users(trained):
    model, periods = trained
    users = np.arange(NU)
    assert in_group_at_10(model, users, model.bags(periods, users)) > 0.9
    empty = [np.zeros(0, np.int64)] * NU
    assert in_group_at_10(model, users, empty) > 0.9               # no bag: features alone
    fresh = np.arange(NU, NU + FRESH)                              # never seen in training
    assert in_group_at_10(model, fresh, [np.zeros(0, np.int64)] * FRESH) > 0.9


def test_new_item_is_ranked_with_its_group(trained):
    model, periods = trained
    # The new items' id rows were never trained: they are exactly zero.
    assert model.net.item_id.shape[0] == N_ITEMS
    assert torch.count_nonzero(model.net.item_id[N_OLD:]) == 0
    assert torch.count_nonzero(model.net.item_id[:N_OLD]) > 0
    users = np.arange(NU)
    scores = (model.user_vectors(users, model.bags(periods, users))
              @ model.item_table(N_ITEMS).T).numpy()
    group = USER_GROUP[users]
    new = scores[users, N_OLD + group]                  # the user's group's new item
    own = ITEM_GROUP[None, :N_OLD] == group[:, None]
    old = scores[:, :N_OLD]
    above_others = new > np.where(own, -np.inf, old).max(1)
    inside_own = new > np.where(own, old, np.inf).min(1)  # not below its whole group
    assert np.mean(above_others & inside_own) > 0.9
    # Among the new items (identical but for their features) the user's group's comes first.
    assert np.mean(scores[:, N_OLD:].argmax(1) == group) > 0.9


def test_bag_decides_when_features_say_nothing():
    feats, periods = group_world(user_features=False, item_features=False)
    model = TwoTower(feats, TwoTowerConfig(epochs=10, **FAST), seed=0)
    model.fit(periods, NU + FRESH, N_ITEMS)
    users = np.arange(NU)
    assert in_group_at_10(model, users, model.bags(periods, users)) > 0.8   # chance: 0.25
    # Without a bag every user is the same user: exactly chance on balanced groups.
    assert in_group_at_10(model, users, [np.zeros(0, np.int64)] * NU) == pytest.approx(0.25)


# -- logQ ------------------------------------------------------------------------------

def test_softmax_loss_known_answer():
    gen = torch.Generator().manual_seed(0)
    u, p = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    n = torch.randn(3, 2, 2, generator=gen)
    pos = torch.tensor([0, 1, 0])
    neg = torch.tensor([[2, 3], [3, 1], [1, 2]])  # row 1's second negative is its positive
    logq = torch.log(torch.tensor([4.0, 0.5, 2.0, 1.0]))
    t = 0.5
    s, sn = (u @ p.T / t).numpy(), (torch.einsum("bd,bkd->bk", u, n) / t).numpy()
    lq = logq.numpy()
    m = -np.inf
    # in-batch columns: other rows' positives minus log q of their item; the target raw;
    # a column holding the row's own item masked; extra negatives raw, masked when = pos.
    logits = np.array([
        [s[0, 0], s[0, 1] - lq[1], m, sn[0, 0], sn[0, 1]],
        [s[1, 0] - lq[0], s[1, 1], s[1, 2] - lq[0], sn[1, 0], m],
        [m, s[2, 1] - lq[1], s[2, 2], sn[2, 0], sn[2, 1]],
    ])
    want = np.mean([-(logits[b, b] - np.logaddexp.reduce(logits[b])) for b in range(3)])
    got = softmax_loss(u, p, pos, t, logq, n, neg)
    assert got.item() == pytest.approx(want, rel=1e-5)
    plain = np.where(np.isinf(logits), m, np.c_[s, sn])  # logq=None: nothing subtracted
    want = np.mean([-(plain[b, b] - np.logaddexp.reduce(plain[b])) for b in range(3)])
    assert softmax_loss(u, p, pos, t, None, n, neg).item() == pytest.approx(want, rel=1e-5)
    # Shifting log q by a constant for every item changes the in-batch negatives only.
    assert softmax_loss(u, p, pos, t, logq, None).item() != pytest.approx(
        softmax_loss(u, p, pos, t, logq + 1.0, None).item())
    ref = F.cross_entropy(torch.tensor(logits[:, :3]), torch.arange(3))
    assert softmax_loss(u, p, pos, t, logq).item() == pytest.approx(ref.item(), rel=1e-5)


def test_logq_table_is_expected_count_per_batch():
    got = logq_table(np.array([0, 0, 1, 2]), 4, batch_size=8)
    assert torch.allclose(got[:3], torch.log(torch.tensor([4.0, 2.0, 2.0])))
    assert got[3] < -20  # never a positive: never a column


def test_logq_undoes_the_popularity_penalty():
    """One item takes half the interactions, the other 29 share the rest, and nothing tells
    users apart: the right logits differ by log(p_pop / p_other) = log 29. In-batch
    negatives over-count the popular item; logQ removes that, so its learned advantage is
    about log 29 with the correction and clearly lower without."""
    n_users, n_items, n = 200, 30, 3000
    rng = np.random.default_rng(0)
    users = rng.integers(0, n_users, n)
    items = np.where(rng.random(n) < 0.5, 0, rng.integers(1, n_items, n))
    feats = SideFeatures(torch.ones(n_users, 1, dtype=torch.long), (2,),
                         torch.ones(n_items, 1, dtype=torch.long), (2,), torch.zeros(n_items, 0))
    history = [PeriodData("p", users, items)]
    counts = np.bincount(items, minlength=n_items)
    truth = np.log(counts[0] / counts[1:].mean())
    advantage = {}
    for logq in (True, False):
        model = TwoTower(feats, TwoTowerConfig(epochs=4, batch_size=128, logq=logq), seed=0)
        model.fit(history, n_users, n_items)
        rows = np.arange(n_users)
        s = (model.user_vectors(rows, model.bags(history, rows))
             @ model.item_table(n_items).T).numpy()
        advantage[logq] = float((s[:, 0] - s[:, 1:].mean(1)).mean())
    assert advantage[True] == pytest.approx(truth, abs=0.6)
    assert advantage[False] < advantage[True] - 0.5


# -- bags ------------------------------------------------------------------------------

HISTORY = [PeriodData("p0", np.array([0, 1, 0]), np.array([5, 6, 7])),
           PeriodData("p1", np.array([1, 0, 0, 2, 1]), np.array([8, 5, 9, 3, 6]))]


def test_bags_hold_only_earlier_interactions():
    ex = build_examples(HISTORY, replay=1, bag_size=2)
    np.testing.assert_array_equal(ex.users, [1, 0, 0, 2, 1])
    np.testing.assert_array_equal(ex.items, [8, 5, 9, 3, 6])
    np.testing.assert_array_equal(ex.bags, [
        [-1, 6],   # user 1 before (1, 8): item 6 of p0
        [5, 7],    # user 0 before (0, 5): p0's 5 and 7 (the earlier 5 is a past interaction,
                   # kept as serving will see it; this interaction itself is not in)
        [7, 5],    # user 0 before (0, 9): 5, 7, 5, last two; never 9 nor anything later
        [-1, -1],  # user 2's first interaction: empty bag
        [6, 8],    # user 1 before (1, 6): 6 then 8
    ])
    ex = build_examples(HISTORY, replay=2, bag_size=3)
    np.testing.assert_array_equal(ex.bags, [[-1, -1, -1], [-1, -1, -1], [-1, -1, 5],
                                            [-1, -1, 6], [-1, 5, 7], [5, 7, 5], [-1, -1, -1],
                                            [-1, 6, 8]])
    feats = SideFeatures(torch.zeros(3, 0, dtype=torch.long), (), torch.zeros(10, 0,
                         dtype=torch.long), (), torch.zeros(10, 0))
    model = TwoTower(feats, TwoTowerConfig(bag_size=2), seed=0)
    got = model.bags(HISTORY, np.array([0, 1, 2, 3]))
    assert [b.tolist() for b in got] == [[5, 9], [8, 6], [3], []]


def test_bags_match_a_plain_loop():
    rng = np.random.default_rng(3)
    history = [PeriodData(str(p), rng.integers(0, 15, 60), rng.integers(0, 40, 60))
               for p in range(3)]
    for replay, size in ((1, 4), (2, 20), (5, 1)):
        ex = build_examples(history, replay, size)
        seen: dict[int, list[int]] = {}
        want = []
        for k, p in enumerate(history):
            for u, i in zip(p.users, p.items, strict=True):
                if k >= len(history) - replay:
                    bag = seen.get(int(u), [])[-size:]
                    want.append([-1] * (size - len(bag)) + bag)
                seen.setdefault(int(u), []).append(int(i))
        np.testing.assert_array_equal(ex.bags, np.array(want).reshape(-1, size))


# -- determinism, state, serving -------------------------------------------------------

def _small(seed: int = 0, **kw) -> tuple[TwoTower, list[PeriodData]]:
    feats, periods = group_world()
    cfg = TwoTowerConfig(epochs=2, dim=16, hidden=32, emb_dim=8, **{**FAST, **kw})
    return TwoTower(feats, cfg, seed=seed), periods


def _same(a: TwoTower, b: TwoTower) -> bool:
    ta, tb = a.state()[0], b.state()[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_deterministic_given_the_seed():
    a, periods = _small(hard_negatives=2, hard_pool=6)
    b, _ = _small(hard_negatives=2, hard_pool=6)
    c, _ = _small(seed=1, hard_negatives=2, hard_pool=6)
    torch.manual_seed(123)      # the global stream is never read
    ra = a.fit(periods, NU + FRESH, N_ITEMS)
    torch.manual_seed(456)
    np.random.seed(7)
    rb = b.fit(periods, NU + FRESH, N_ITEMS)
    c.fit(periods, NU + FRESH, N_ITEMS)
    assert ra == rb and _same(a, b) and not _same(a, c)


def test_state_round_trip_and_incremental_fit():
    feats, periods = group_world()
    old = SideFeatures(feats.user, feats.user_cards, feats.item[:N_OLD], feats.item_cards,
                       feats.item_multi[:N_OLD])  # the new items have not arrived yet
    cfg = TwoTowerConfig(epochs=2, dim=16, hidden=32, emb_dim=8, **FAST)
    model = TwoTower(old, cfg, seed=0)
    model.fit(periods[:1], NU + FRESH, N_OLD)
    tensors, meta = model.state()
    meta = json.loads(json.dumps(meta))  # JSON-able
    again = TwoTower.from_state(tensors, meta, old)
    assert _same(model, again)
    users = np.arange(NU + FRESH)
    bags = model.bags(periods[:1], users)
    assert torch.equal(model.user_vectors(users, bags), again.user_vectors(users, bags))
    assert torch.equal(model.item_table(N_OLD), again.item_table(N_OLD))
    # Both continue identically on the next period, the id table growing with zero rows.
    for m in (model, again):
        m.set_features(feats)
        m.fit(periods, NU + FRESH, N_ITEMS)
    assert _same(model, again)
    assert model.net.item_id.shape[0] == N_ITEMS
    assert torch.count_nonzero(model.net.item_id[N_OLD:]) == 0
    with pytest.raises(ValueError):
        TwoTower.from_state(tensors, {**meta, "n_tokens": 3}, old)


def test_serving_dot_product_is_the_models_logit():
    model, periods = _small(normalize=False)
    model.fit(periods, NU + FRESH, N_ITEMS)
    users = np.array([0, 5, NU + 1, NU + FRESH + 7])  # last: no side-feature row at all
    bags = model.bags(periods, users)
    items = np.array([0, 13, N_OLD + 2, N_ITEMS + 3])  # last: beyond every table
    u = model.user_vectors(users, bags)
    table = model.item_table(N_ITEMS + 4)
    assert u.shape == (4, 16) and table.shape == (N_ITEMS + 4, 16)
    assert torch.allclose(u @ table[items].T, model.logits(users, bags, items), atol=1e-5)
    assert bags[3].size == 0 and torch.isfinite(u).all()


def test_features_must_keep_their_encoding():
    model, _ = _small()
    f = model.features
    with pytest.raises(ValueError):
        model.set_features(SideFeatures(f.user, (G + 2,), f.item, f.item_cards, f.item_multi))
    model.set_features(f.grow(NU + FRESH + 10, N_ITEMS + 10))
    assert model.features.n_items == N_ITEMS + 10
    with pytest.raises(ValueError):
        TwoTowerConfig(hard_negatives=9, hard_pool=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    feats, periods = group_world()
    model = TwoTower(feats, TwoTowerConfig(epochs=15, hard_negatives=1, **FAST), seed=0,
                     device="cuda")
    model.fit(periods, NU + FRESH, N_ITEMS)
    users = np.arange(NU)
    assert model.item_table(N_ITEMS).device.type == "cuda"
    assert in_group_at_10(model, users, model.bags(periods, users)) > 0.9
