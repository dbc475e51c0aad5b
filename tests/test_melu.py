"""MeLU (smlrec.melu): the local update, the meta-gradient, known-answer cold start, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smlrec.coldtrack import UserTask
from smlrec.melu import MeLU, MeLUConfig
from smlrec.side import SideFeatures

GROUPS, PER_GROUP, N_ITEMS = 4, 5, 40
SMALL = dict(emb_dim=8, hidden=32, meta_lr=1e-2)
EMPTY = np.zeros(0, np.int64)


def world(n_users: int, informative: bool = True) -> tuple[SideFeatures, np.ndarray]:
    """4 groups of users (user i in group i % 4); group g likes only items 5g..5g+4, the
    other 20 of the 40 items are liked by nobody. One item field: the item's group (5 for
    the unliked ones). One user field: the group (or, uninformative, the same code for all)."""
    group = np.arange(n_users) % GROUPS
    ucodes = group + 1 if informative else np.ones(n_users, np.int64)
    igroup = np.full(N_ITEMS, GROUPS)
    igroup[:GROUPS * PER_GROUP] = np.repeat(np.arange(GROUPS), PER_GROUP)
    f = SideFeatures(torch.as_tensor(ucodes[:, None], dtype=torch.int64), (GROUPS + 2,),
                     torch.as_tensor(igroup[:, None] + 1, dtype=torch.int64), (GROUPS + 2,),
                     torch.zeros(N_ITEMS, 0))
    return f, group


def tasks_for(users, group: np.ndarray, seed: int) -> list[UserTask]:
    """Each user's support: 1-3 of their group's items; query: the group's other items."""
    rng = np.random.default_rng(seed)
    out = []
    for u in users:
        liked = rng.permutation(np.arange(group[u] * PER_GROUP, (group[u] + 1) * PER_GROUP))
        n = int(rng.integers(1, 4))
        out.append(UserTask(int(u), liked[:n], liked[n:]))
    return out


def recall_at_5(scores: torch.Tensor, tasks: list[UserTask]) -> float:
    """Mean share of each user's query items in their top 5 (support items excluded)."""
    out = []
    for s, t in zip(scores, tasks, strict=True):
        s = s.clone()
        s[torch.as_tensor(t.support)] = -float("inf")
        top = torch.topk(s, 5).indices.numpy()
        out.append(np.isin(t.query, top).mean())
    return float(np.mean(out))


def rich_features(n_users: int = 12, n_items: int = 30) -> SideFeatures:
    """Two user fields, two item fields and a 6-token multi-hot, random codes."""
    g = torch.Generator().manual_seed(7)
    return SideFeatures(torch.randint(0, 4, (n_users, 2), generator=g), (4, 3 + 1),
                        torch.randint(0, 5, (n_items, 2), generator=g), (5, 5),
                        (torch.rand(n_items, 6, generator=g) < 0.3).float())


def random_tasks(n_users: int, n_items: int, seed: int = 0) -> list[UserTask]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n_users):
        items = rng.permutation(n_items)[:8]
        out.append(UserTask(u, items[:3], items[3:]))
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[MeLU, SideFeatures]:
    f = rich_features()
    m = MeLU(f, MeLUConfig(**SMALL), seed=3)
    m.meta_train(random_tasks(12, 30), 30, epochs=2)
    return m, f


def test_local_update_adapts_only_the_decision_layers(trained):
    m, _ = trained
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    init = dict(m.net.decision.named_parameters())
    adapted = m.adapt(2, np.array([1, 4, 9]), 30)
    assert set(adapted) == set(init) == {"fc1_user.weight", "fc1_user.bias",
                                         "fc1_item.weight", "fc2.weight", "fc2.bias",
                                         "out.weight", "out.bias"}
    assert any(not torch.equal(adapted[k], init[k].detach()) for k in init)
    for k, v in adapted.items():
        assert v.shape == init[k].shape and not v.requires_grad
    after = m.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # embeddings included
    # the adapted layers score the support items higher than the initial ones do
    items = torch.tensor([1, 4, 9])
    gain = m.score_adapted(2, adapted, 30)[items] - m.score_adapted(2, init, 30)[items]
    assert gain.mean() > 0


def _one_step_grads(first_order: bool) -> dict[str, torch.Tensor]:
    f = rich_features()
    m = MeLU(f, MeLUConfig(**SMALL, first_order=first_order, meta_batch=32), seed=1)
    init = {k: v.detach().clone() for k, v in m.net.named_parameters()}
    m.meta_train(random_tasks(12, 30), 30, epochs=1)  # 12 tasks: one meta-update
    assert m.meta_steps == 1
    for k, p in m.net.named_parameters():
        assert not torch.equal(p.detach(), init[k]), k  # Adam moved every parameter
    return {k: p.grad.clone() for k, p in m.net.named_parameters()}


def test_meta_gradient_reaches_embeddings_and_initial_layers():
    second = _one_step_grads(first_order=False)
    assert {k.split(".")[0] for k in second} == {"emb", "decision"}
    for k, g in second.items():
        assert g.abs().sum() > 0, k
    assert second["emb.item_id"][:30].abs().sum(1).gt(0).sum() > 15  # the tasks' items
    first = _one_step_grads(first_order=True)
    for k, g in first.items():
        assert g.abs().sum() > 0, k
    # the same negatives and init (same seed): only the second-order terms differ
    for k in ("decision.fc1_user.weight", "decision.fc1_item.weight", "decision.fc2.weight",
              "decision.out.weight"):
        diff = (second[k] - first[k]).abs().max()
        assert diff > 1e-2 * second[k].abs().max(), k  # measured 10-45%


def test_cold_start_user_feature_decides():
    f, group = world(200, informative=True)
    train, new = tasks_for(range(160), group, 0), tasks_for(range(160, 200), group, 1)
    users = [t.user for t in new]
    supports = [t.support for t in new]
    m = MeLU(f, MeLUConfig(**SMALL), seed=0)
    untrained = recall_at_5(m.score(users, supports, N_ITEMS), new)
    out = m.meta_train(train, N_ITEMS, epochs=10)
    assert out["tasks"] == 160 and np.isfinite(out["loss"])
    melu = recall_at_5(m.score(users, supports, N_ITEMS), new)
    cold = recall_at_5(m.score(users, [EMPTY] * len(new), N_ITEMS), new)  # no support
    pop = torch.zeros(N_ITEMS)
    for t in train:
        pop[np.concatenate([t.support, t.query])] += 1
    popularity = recall_at_5(pop.expand(len(new), -1), new)
    assert melu > 0.9 and popularity < 0.5  # popularity is flat: one group's items win
    assert melu - untrained > 0.4  # meta-training, not the local update alone, does it
    # MAML trains the start for after the local update, yet the user field alone already
    # points to the group well above chance (0.25)
    assert cold > 0.5


def test_cold_start_support_decides():
    """The user field says nothing: only the local update on the support can find the
    group; without it the model knows only that the 20 unliked items are never liked."""
    f, group = world(200, informative=False)
    train, new = tasks_for(range(160), group, 0), tasks_for(range(160, 200), group, 1)
    m = MeLU(f, MeLUConfig(**SMALL), seed=0)
    m.meta_train(train, N_ITEMS, epochs=8)
    users = [t.user for t in new]
    adapted = recall_at_5(m.score(users, [t.support for t in new], N_ITEMS), new)
    plain = recall_at_5(m.score(users, [EMPTY] * len(new), N_ITEMS), new)
    assert adapted > 0.9 and plain < 0.5
    three = [t for t in tasks_for(range(160, 200), group, 2) if len(t.support) == 3]
    assert len(three) >= 5
    assert recall_at_5(m.score([t.user for t in three], [t.support for t in three],
                               N_ITEMS), three) > 0.9


def test_determinism_and_state_round_trip():
    f = rich_features()
    tasks = random_tasks(12, 30)
    users, supports = [0, 3, 5, 11], [np.array([2, 7]), EMPTY, np.array([1]), np.arange(25)]
    a, b = MeLU(f, MeLUConfig(**SMALL, meta_batch=5), seed=4), \
        MeLU(f, MeLUConfig(**SMALL, meta_batch=5), seed=4)
    assert a.meta_train(tasks, 30) == b.meta_train(tasks, 30)
    sa = a.score(users, supports, 30)
    assert torch.equal(sa, b.score(users, supports, 30))
    assert torch.equal(sa, a.score(users, supports, 30))  # scoring draws no shared state
    other = MeLU(f, MeLUConfig(**SMALL, meta_batch=5), seed=5)
    other.meta_train(tasks, 30)
    assert not torch.equal(sa, other.score(users, supports, 30))

    tensors, meta = a.state()
    meta = json.loads(json.dumps(meta))
    c = MeLU.from_state(tensors, meta, f)
    assert torch.equal(sa, c.score(users, supports, 30))
    # training goes on identically too (same random stream; Adam restarts in both)
    a2 = MeLU.from_state(*a.state(), f)
    assert c.meta_train(tasks, 30) == a2.meta_train(tasks, 30)
    assert torch.equal(c.score(users, supports, 30), a2.score(users, supports, 30))


def test_empty_support_is_the_unadapted_model(trained):
    m, _ = trained
    users = [0, 5, 7]
    with torch.no_grad():
        u = m._user_reps(torch.tensor(users))
        plain = m.net.decision(u, m._item_reps(torch.arange(30)).expand(3, -1, -1))
    supports = [EMPTY, np.array([3, 4, 5]), EMPTY]
    s = m.score(users, supports, 30)
    assert torch.allclose(s[[0, 2]], plain[[0, 2]], atol=1e-6)
    assert not torch.allclose(s[1], plain[1], atol=1e-3)
    # batch scoring agrees with serving's adapt + score_adapted, whatever the batch
    served = m.score_adapted(5, m.adapt(5, supports[1], 30), 30)
    assert torch.allclose(s[1], served, atol=1e-5)
    assert torch.allclose(m.score(users, supports, 30, batch=1), s, atol=1e-5)


def test_new_items_grow_the_id_table():
    f = rich_features(n_items=30)
    m = MeLU(f, MeLUConfig(**SMALL), seed=0)
    m.meta_train(random_tasks(12, 30), 30)
    old = m.net.emb.item_id.detach().clone()
    bigger = SideFeatures(f.user, f.user_cards, torch.cat([f.item, f.item[:5]]), f.item_cards,
                          torch.cat([f.item_multi, f.item_multi[:5]]))
    m.set_features(bigger)
    ids = m.net.emb.item_id.detach()
    assert ids.shape[0] == 35 and torch.equal(ids[:30], old) and not ids[30:].any()
    assert m.score([1], [np.array([31])], 35).shape == (1, 35)
    out = m.meta_train(random_tasks(12, 35, seed=1), 35)  # Adam's state follows the growth
    assert np.isfinite(out["loss"]) and m.net.emb.item_id.grad.shape[0] == 35
    m.meta_train(random_tasks(12, 40, seed=2), 40)  # meta_train grows by itself as well
    assert m.n_items == 40
    assert m.score([13], [EMPTY], 40).shape == (1, 40)  # a user beyond the table: unknown
    with pytest.raises(ValueError):
        m.set_features(SideFeatures(f.user, f.user_cards, f.item, (9, 9), f.item_multi))


def test_no_user_fields_no_ids_and_skipped_tasks():
    f = rich_features()
    bare = SideFeatures(torch.zeros(12, 0, dtype=torch.int64), (), f.item, f.item_cards,
                        f.item_multi)
    m = MeLU(bare, MeLUConfig(**SMALL, item_ids=False), seed=0)
    tasks = random_tasks(12, 30) + [UserTask(0, EMPTY, np.array([1])),
                                    UserTask(1, np.array([1]), EMPTY)]
    out = m.meta_train(tasks, 30)
    assert out["tasks"] == 12 and np.isfinite(out["loss"])
    assert m.score([0, 1], [np.array([1]), EMPTY], 30).shape == (2, 30)
    assert m.meta_train([], 30)["tasks"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    f = rich_features()
    m = MeLU(f, MeLUConfig(**SMALL), seed=0, device="cuda")
    m.meta_train(random_tasks(12, 30), 30)
    s = m.score([0, 1], [np.array([1, 2]), EMPTY], 30)
    assert s.device.type == "cuda"
    c = MeLU.from_state(*m.state(), f)  # back on the CPU
    assert torch.allclose(c.score([0, 1], [np.array([1, 2]), EMPTY], 30), s.cpu(), atol=1e-4)


def test_softmax_loss_is_the_logq_corrected_cross_entropy():
    m = MeLU(rich_features(), MeLUConfig(**SMALL), seed=0)
    params = m._init_params(detach=True)
    items, sign, weight = m._batch([np.array([1, 2])], [np.array([5, 6, 7, 0])])
    user = m._user_reps(torch.tensor([0]))[0]
    reps = m._item_reps(items)[0]
    got = m._loss(params, user, reps, sign[0], weight[0], "softmax", float(np.log(30)))
    with torch.no_grad():
        s = m.net.decision(user, reps)
    neg = s[2:] + np.log(30 / 4)
    want = torch.stack([torch.logsumexp(torch.cat([s[j:j + 1], neg]), 0) - s[j]
                        for j in (0, 1)]).mean()
    assert torch.allclose(got, want, atol=1e-5)
    bce = m._loss(params, user, reps, sign[0], weight[0])
    assert not torch.allclose(got, bce)


@pytest.mark.parametrize("over", [dict(loss="softmax"),
                                  dict(loss="softmax", local_loss="softmax"),
                                  dict(support_bag=True),
                                  dict(item_prior="input"), dict(item_prior="offset")])
def test_options_train_and_batch_scoring_agrees_with_serving(over):
    f = rich_features()
    prior = torch.arange(30, dtype=torch.float32)
    kw = {"item_prior": prior} if over.get("item_prior") else {}
    m = MeLU(f, MeLUConfig(**SMALL, **over), seed=2)
    out = m.meta_train(random_tasks(12, 30), 30, epochs=2, **kw)
    assert np.isfinite(out["loss"]) and out["tasks"] == 12
    users, supports = [0, 5, 7], [EMPTY, np.array([3, 4, 5]), np.array([9])]
    s = m.score(users, supports, 30, **kw)
    assert torch.isfinite(s).all()
    served = m.score_adapted(5, m.adapt(5, supports[1], 30, **kw), 30, supports[1], **kw)
    assert torch.allclose(s[1], served, atol=1e-5)
    assert torch.allclose(m.score(users, supports, 30, batch=1, **kw), s, atol=1e-5)
    if over.get("support_bag"):  # the support also moves the unadapted user
        init = m._init_params(detach=True)
        assert not torch.allclose(m.score_adapted(5, init, 30, supports[1]),
                                  m.score_adapted(5, init, 30), atol=1e-4)


def test_item_prior_is_required_and_per_task():
    f = rich_features()
    tasks = random_tasks(12, 30)
    m = MeLU(f, MeLUConfig(**SMALL, item_prior="offset"), seed=0)
    with pytest.raises(ValueError):
        m.meta_train(tasks, 30)
    with pytest.raises(ValueError):
        m.score([0], [np.array([1])], 30)
    with pytest.raises(ValueError):
        m.meta_train(tasks, 30, item_prior=[torch.ones(30)] * 3)
    # per-task priors (shorter ones: rows beyond count 0) equal one shared prior
    shared = torch.cat([torch.arange(20, dtype=torch.float32), torch.zeros(10)])
    a = MeLU(f, MeLUConfig(**SMALL, item_prior="input"), seed=0)
    b = MeLU(f, MeLUConfig(**SMALL, item_prior="input"), seed=0)
    assert a.meta_train(tasks, 30, item_prior=shared) == \
        b.meta_train(tasks, 30, item_prior=[shared[:20]] * len(tasks))
    users, supports = [0, 1], [np.array([1, 2]), EMPTY]
    sa = a.score(users, supports, 30, item_prior=shared)
    assert torch.equal(sa, b.score(users, supports, 30, item_prior=shared))
    assert not torch.allclose(sa, a.score(users, supports, 30, item_prior=shared.flip(0)))
    # offset: the initial logit is the MLP's plus log1p(prior), the weight adapted locally
    m = MeLU(f, MeLUConfig(**SMALL, item_prior="offset"), seed=0)
    zero = m.score([0], [EMPTY], 30, item_prior=torch.zeros(30))
    some = m.score([0], [EMPTY], 30, item_prior=shared)
    assert torch.allclose(some - zero, torch.log1p(shared)[None], atol=1e-5)
    assert "prior_weight" in m.adapt(0, np.array([1, 2]), 30, item_prior=shared)
