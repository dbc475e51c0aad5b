"""MetaSelector (smlrec.selector): per-user weights over fixed base models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smlrec.selector import MetaSelector, SelectorConfig, _set_nll, oracle_choice
from smlrec.side import SideFeatures

N_ITEMS = 200


def _features(codes: np.ndarray, n_items: int = N_ITEMS, noise_seed: int = 0) -> SideFeatures:
    """Two user fields: the given codes (cardinality 3) and a noise field (cardinality 5)."""
    rng = np.random.default_rng(noise_seed)
    user = np.stack([codes, rng.integers(0, 5, len(codes))], 1)
    return SideFeatures(torch.as_tensor(user, dtype=torch.int64), (3, 5),
                        torch.zeros(n_items, 0, dtype=torch.int64), (), torch.zeros(n_items, 0))


def _two_groups(n_users: int, informative: bool = True, seed: int = 0, boost: float = 2.5,
                n_sup: int = 4, n_query: int = 8):
    """Group 0 is explained by model A (its liked items get +boost under A, nothing under
    B), group 1 by model B. Support = the first liked items, query = the rest; the support
    is excluded from ranking. The user feature is the group (or the same code for all)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_users)
    codes = group + 1 if informative else np.ones(n_users, dtype=np.int64)
    scores = torch.as_tensor(rng.normal(size=(n_users, 2, N_ITEMS)), dtype=torch.float32)
    supports, queries = [], []
    exclude = torch.zeros(n_users, N_ITEMS, dtype=torch.bool)
    for u in range(n_users):
        liked = rng.choice(N_ITEMS, n_sup + n_query, replace=False)
        scores[u, group[u], liked] += boost
        supports.append(liked[:n_sup])
        queries.append(liked[n_sup:])
        exclude[u, liked[:n_sup]] = True
    scores[:, 1] = scores[:, 1] * 5 + 3  # model B lives on another scale
    return _features(codes), np.arange(n_users), scores, supports, queries, exclude, group


def _ndcg(rank_scores: torch.Tensor, queries: list[np.ndarray], k: int = 10) -> np.ndarray:
    top = rank_scores.topk(k, -1).indices.cpu().numpy()
    disc = 1 / np.log2(np.arange(2, k + 2))
    return np.array([(np.isin(top[u], q) * disc).sum() / disc[:min(len(q), k)].sum()
                     for u, q in enumerate(queries)])


def _split(data, n_train: int):
    feats, users, scores, sup, qry, exc, group = data
    tr, te = slice(0, n_train), slice(n_train, len(users))
    return feats, (users[tr], scores[tr], sup[tr], qry[tr], exc[tr]), \
        (users[te], scores[te], sup[te], qry[te], exc[te], group[te])


def _random_inputs(n_users: int = 40, n_models: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    scores = torch.as_tensor(rng.normal(size=(n_users, n_models, 50)) * 3, dtype=torch.float32)
    scores[0, 1] = -torch.inf                     # a model that scores nothing for user 0
    scores[1, 0, :10] = -torch.inf                # ... or only some items
    supports = [rng.choice(50, rng.integers(0, 6), replace=False) for _ in range(n_users)]
    supports[2] = np.array([], dtype=np.int64)
    queries = [rng.choice(50, 3, replace=False) for _ in range(n_users)]
    exclude = torch.as_tensor(rng.random((n_users, 50)) < 0.1)
    users = rng.integers(0, 60, n_users)          # rows >= 30 are unknown users (codes 0)
    feats = _features(rng.integers(0, 3, 30), 50)
    return feats, users, scores, supports, queries, exclude


@pytest.mark.parametrize("local_steps", [0, 1, 2])
def test_weights_are_a_distribution_and_combine_is_the_mixture(local_steps: int) -> None:
    feats, users, scores, supports, queries, exclude = _random_inputs()
    cfg = SelectorConfig(local_steps=local_steps, local_lr=0.5, combine="mixture")
    sel = MetaSelector(["a", "b", "c"], feats, cfg, seed=3)
    for _ in range(2):  # before and after training
        w = sel.weights(users, scores, supports)
        assert w.shape == (len(users), 3)
        assert torch.all((w >= 0) & (w <= 1))
        torch.testing.assert_close(w.sum(1), torch.ones(len(users)))
        out = sel.fit(users, scores, supports, queries, exclude, epochs=2)
        assert np.isfinite(out["loss"]) and out["users"] == len(users)

    # combine = log sum_m w_m softmax(z_m / tau_m) renormalised over the kept items
    ranked = sel.rank_scores(users, scores, supports, exclude)
    assert ranked.shape == (len(users), 50)
    assert torch.all(torch.isneginf(ranked[exclude]))
    mass = ranked.masked_fill(exclude, -torch.inf).exp().sum(1)
    w = sel.weights(users, scores, supports)
    torch.testing.assert_close(mass[1:], torch.ones(len(users) - 1))
    torch.testing.assert_close(mass[0], 1 - w[0, 1])  # model b scores nothing for user 0
    assert torch.all(torch.isfinite(ranked[~exclude]))
    # with all the weight on one model: that model's tempered softmax of its z-scores
    onehot = torch.zeros(len(users), 3)
    onehot[:, 2] = 1
    s = scores[:, 2]
    z = (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True)
    tau = sel.temperatures()["c"]
    expect = torch.log_softmax((z / tau).masked_fill(exclude, -torch.inf), 1)
    got = sel.combine(scores, onehot, exclude)
    torch.testing.assert_close(got[~exclude], expect[~exclude], rtol=1e-4, atol=1e-4)
    # items no model scores are -inf too; a model scoring nothing gets no mass
    both = scores.clone()
    both[:, :, 7] = -torch.inf
    assert torch.all(torch.isneginf(sel.combine(both, onehot)[:, 7]))


@pytest.mark.parametrize("combine", ["mixture", "logits"])
def test_follows_the_better_model(combine: str) -> None:
    feats, train, (users, scores, sup, qry, exc, group) = _split(_two_groups(1000), 600)
    sel = MetaSelector(["A", "B"], feats, SelectorConfig(combine=combine), seed=0)
    sel.fit(*train)
    w = sel.weights(users, scores, sup)
    assert w[group == 0, 0].mean() > 0.8
    assert w[group == 1, 1].mean() > 0.8

    single = np.stack([_ndcg(scores[:, m].masked_fill(exc, -torch.inf), qry) for m in (0, 1)], 1)
    oracle = single[np.arange(len(single)), oracle_choice(single)].mean()
    ranked = sel.rank_scores(users, scores, sup, exc)
    ndcg = _ndcg(ranked, qry).mean()
    hit = np.mean([np.isin(ranked[u].topk(10).indices.numpy(), q).any()
                   for u, q in enumerate(qry)])
    single_hit = [np.mean([np.isin(scores[u, m].masked_fill(exc[u], -torch.inf).topk(10)
                                   .indices.numpy(), q).any() for u, q in enumerate(qry)])
                  for m in (0, 1)]
    assert ndcg > single.mean(0).max() + 0.2
    assert hit > max(single_hit) + 0.2
    assert ndcg > 0.95 * oracle


@pytest.mark.parametrize(("local_steps", "combine", "loss"),
                         [(0, "logits", "set"), (1, "logits", "set"), (0, "mixture", "mean"),
                          (1, "mixture", "mean"), (1, "logits", "mean")])
def test_uses_the_support_signal(local_steps: int, combine: str, loss: str) -> None:
    # every user has the same feature codes: only the support statistics tell the groups apart
    data = _two_groups(1000, informative=False, seed=5)
    feats, train, (users, scores, sup, qry, exc, group) = _split(data, 600)
    cfg = SelectorConfig(local_steps=local_steps, combine=combine, loss=loss)
    sel = MetaSelector(["A", "B"], feats, cfg, seed=1)
    sel.fit(*train)
    w = sel.weights(users, scores, sup)
    assert w[group == 0, 0].mean() > 0.7
    assert w[group == 1, 1].mean() > 0.7
    single = np.stack([_ndcg(scores[:, m].masked_fill(exc, -torch.inf), qry) for m in (0, 1)], 1)
    assert _ndcg(sel.rank_scores(users, scores, sup, exc), qry).mean() > single.mean(0).max()


@pytest.mark.parametrize("local_steps", [0, 1])
def test_logits_combine_is_a_weighted_sum_of_tempered_z_scores(local_steps: int) -> None:
    feats, users, scores, supports, queries, exclude = _random_inputs()
    cfg = SelectorConfig(local_steps=local_steps, combine="logits", replay=0)
    sel = MetaSelector(["a", "b", "c"], feats, cfg, seed=3)
    out = sel.fit(users, scores, supports, queries, exclude, epochs=3)
    assert np.isfinite(out["loss"]) and out["trained_on"] == len(users)
    w = sel.weights(users, scores, supports)
    torch.testing.assert_close(w.sum(1), torch.ones(len(users)))
    ranked = sel.rank_scores(users, scores, supports, exclude)
    assert torch.all(torch.isneginf(ranked[exclude]))
    assert torch.all(torch.isfinite(ranked[~exclude]))
    # a distribution over the kept items, also for user 0 (model b scores nothing)
    torch.testing.assert_close(ranked.masked_fill(exclude, -torch.inf).exp().sum(1),
                               torch.ones(len(users)))
    # log_softmax(sum_m w_m z_m / tau_m), a model adding nothing where it does not score
    valid = torch.isfinite(scores)
    s = torch.where(valid, scores, 0.0)
    n = valid.sum(-1, keepdim=True)
    mean = s.sum(-1, keepdim=True) / n.clamp_min(1)
    std = (torch.where(valid, s - mean, 0.0).square().sum(-1, keepdim=True)
           / n.clamp_min(1)).sqrt()
    z = torch.where(valid, (s - mean) / std.clamp_min(1e-6), 0.0)
    tau = torch.tensor([sel.temperatures()[m] for m in "abc"])
    logit = (w[:, :, None] * z / tau[:, None]).sum(1).masked_fill(exclude, -torch.inf)
    expect = torch.log_softmax(logit, 1)
    torch.testing.assert_close(ranked[~exclude], expect[~exclude], rtol=1e-4, atol=1e-4)
    # one-hot weights: that model's tempered softmax, as under the mixture
    onehot = torch.zeros(len(users), 3)
    onehot[:, 2] = 1
    mix = MetaSelector(["a", "b", "c"], feats, cfg.model_copy(update={"combine": "mixture"}))
    mix.net.load_state_dict(sel.net.state_dict())
    torch.testing.assert_close(sel.combine(scores, onehot, exclude)[~exclude],
                               mix.combine(scores, onehot, exclude)[~exclude])
    both = scores.clone()
    both[:, :, 7] = -torch.inf
    assert torch.all(torch.isneginf(sel.combine(both, w)[:, 7]))


def test_set_loss_known_answer() -> None:
    ll = torch.log(torch.tensor([[0.1, 0.2, 0.5], [0.4, 0.3, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(_set_nll(ll, mask, "set"),
                               torch.tensor([-np.log(0.3), 0.0], dtype=torch.float32))
    torch.testing.assert_close(_set_nll(ll, mask, "mean"),
                               torch.tensor([-(np.log(0.1) + np.log(0.2)) / 2, 0.0],
                                            dtype=torch.float32))


def test_replay_keeps_the_last_calls_and_round_trips() -> None:
    feats, users, scores, supports, queries, exclude = _random_inputs(n_users=40)
    cfg = SelectorConfig(replay=2, epochs=2, meta_batch=16)
    sel = MetaSelector(["a", "b", "c"], feats, cfg, seed=0)
    # calls over a growing item vocabulary: the earlier ones are padded with unscored items
    grown = torch.cat([scores, torch.randn(40, 3, 10)], -1)
    grown_exc = torch.cat([exclude, torch.zeros(40, 10, dtype=torch.bool)], -1)
    sizes = []
    for k in range(4):
        sc, ex = (scores, exclude) if k % 2 == 0 else (grown, grown_exc)
        out = sel.fit(users[:10 + k], sc[:10 + k], supports[:10 + k], queries[:10 + k],
                      ex[:10 + k])
        assert np.isfinite(out["loss"]) and out["users"] == 10 + k
        sizes.append(out["trained_on"])
    assert sizes == [10, 10 + 11, 10 + 11 + 12, 11 + 12 + 13]
    tensors, meta = sel.state()
    restored = MetaSelector.from_state(tensors, meta, feats)
    a = sel.fit(users, grown, supports, queries, grown_exc)
    b = restored.fit(users, grown, supports, queries, grown_exc)
    assert a == b and a["trained_on"] == 12 + 13 + 40
    assert torch.equal(sel.weights(users, scores, supports),
                       restored.weights(users, scores, supports))
    none = MetaSelector(["a", "b", "c"], feats, cfg.model_copy(update={"replay": 0}))
    none.fit(users[:10], scores[:10], supports[:10], queries[:10], exclude[:10])
    assert none.fit(users, scores, supports, queries)["trained_on"] == len(users)


def test_oracle_choice_known_answer() -> None:
    metric = np.array([[0.1, 0.5, 0.2],
                       [0.7, 0.7, 0.1],     # tie -> lowest index
                       [0.0, 0.0, 0.0],
                       [np.nan, 0.1, 0.3],  # NaN counts as worst
                       [0.2, np.nan, 0.1]])
    assert oracle_choice(metric).tolist() == [1, 0, 0, 2, 0]
    assert oracle_choice(metric).dtype == np.int64
    with pytest.raises(ValueError):
        oracle_choice(np.zeros(3))


def test_deterministic_and_state_round_trip() -> None:
    feats, users, scores, supports, queries, exclude = _random_inputs(n_users=80)
    cfg = SelectorConfig(meta_batch=16, epochs=2, meta_lr=1e-2)

    def trained(seed: int) -> MetaSelector:
        sel = MetaSelector(["a", "b", "c"], feats, cfg, seed=seed)
        sel.fit(users, scores, supports, queries, exclude)
        return sel

    a, b = trained(0), trained(0)
    ta, ma = a.state()
    tb, mb = b.state()
    assert ma == mb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    wa = a.weights(users, scores, supports)
    assert torch.equal(wa, b.weights(users, scores, supports))
    assert not torch.equal(wa, trained(1).weights(users, scores, supports))

    restored = MetaSelector.from_state(ta, ma, feats)
    assert restored.cfg == cfg and restored.model_names == ["a", "b", "c"]
    assert torch.equal(restored.weights(users, scores, supports), wa)
    assert torch.equal(restored.rank_scores(users, scores, supports, exclude),
                       a.rank_scores(users, scores, supports, exclude))
    # training goes on identically (parameters, Adam state and the draw counter restored)
    ra = a.fit(users, scores, supports, queries, exclude)
    rr = restored.fit(users, scores, supports, queries, exclude)
    assert ra == rr
    assert torch.equal(restored.weights(users, scores, supports),
                       a.weights(users, scores, supports))

    other = _features(np.zeros(30, dtype=np.int64), 50)
    other.user_cards = (4, 5)
    with pytest.raises(ValueError):
        MetaSelector.from_state(ta, ma, other)


def test_rejects_bad_shapes() -> None:
    feats, users, scores, supports, queries, exclude = _random_inputs()
    sel = MetaSelector(["a", "b", "c"], feats)
    with pytest.raises(ValueError):
        sel.weights(users, scores[:, :2], supports)
    with pytest.raises(ValueError):
        sel.fit(users, scores, supports[:-1], queries)
    with pytest.raises(ValueError):
        sel.fit(users, scores, supports, queries, exclude[:, :10])
    bad = list(supports)
    bad[0] = np.array([50])
    with pytest.raises(ValueError):
        sel.weights(users, scores, bad)
