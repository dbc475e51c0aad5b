"""Known-answer and property tests of the core: vocabularies, MF, the transfer, SML."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smlrec.config import LossConfig, MFConfig, SMLConfig
from smlrec.errors import IntegrityError
from smlrec.io import load_bundle, save_bundle
from smlrec.models import DIM, MFWeights, Transfer, TransferNet
from smlrec.strategies import (
    SML,
    FineTune,
    FullRetrain,
    PeriodData,
    Popularity,
    SlidingWindow,
    pretrain,
)
from smlrec.train import NegativeSampler, rec_loss, sml_learn_theta, sml_learn_what, train_mf
from smlrec.vocab import Vocab

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- vocabulary


def test_vocab_grows_append_only_and_keeps_rows():
    v = Vocab(["a", "b"])
    assert v.lookup(["b", "a", "zz"]).tolist() == [1, 0, -1]
    assert v.add(["c", "a", "c", "d"]) == 2
    assert v.ids == ["a", "b", "c", "d"]
    assert v.lookup(["a", "b", "c", "d"]).tolist() == [0, 1, 2, 3]
    assert Vocab.from_json(v.to_json()).ids == v.ids
    assert v.add([]) == 0 and len(v) == 4


def test_mf_weights_grow_keeps_old_rows_and_initialises_new_small():
    gen = torch.Generator().manual_seed(0)
    w = MFWeights.random(3, 2, 8, gen)
    g = w.grow(5, 4, gen)
    assert g.user.shape == (5, 8) and g.item.shape == (4, 8)
    assert torch.equal(g.user[:3], w.user) and torch.equal(g.item[:2], w.item)
    assert g.user[3:].abs().max() < 0.1  # N(0, 0.01^2): small, random, non-zero
    assert g.user[3:].abs().sum() > 0
    assert w.grow(2, 1, gen) .user.shape == (3, 8)  # never shrinks


# --------------------------------------------------------------------------- transfer


def test_transfer_shapes_and_zero_norm_guard():
    net = TransferNet(DIM)
    a, b = torch.randn(7, DIM), torch.randn(7, DIM)
    assert net(a, b).shape == (7, DIM)
    out = net(torch.zeros(3, DIM), torch.randn(3, DIM))  # a new id: ||a|| = 0
    assert torch.isfinite(out).all()
    assert net.conv1.kernel_size == (3, 1) and net.conv1.out_channels == 10
    assert net.conv2.kernel_size == (1, 1) and net.conv2.out_channels == 5
    assert net.fc1.in_features == 5 * DIM and net.fc1.out_features == 512
    assert net.fc2.out_features == DIM


def test_transfer_variants_start_as_fine_tuning_or_a_gate():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(TransferNet(8, kind="residual")(a, b), b)  # Ŵ_t + 0 at first
    g = torch.sigmoid(torch.tensor(TransferNet.GATE_BIAS))
    assert torch.allclose(TransferNet(8, kind="gated")(a, b), g * a + (1 - g) * b, atol=1e-6)
    small = TransferNet(8, hidden=32)
    assert small.fc1.out_features == 32
    with pytest.raises(ValueError, match="unknown transfer"):
        TransferNet(8, kind="magic")


@pytest.mark.parametrize("kind", ["official", "residual", "gated"])
def test_fast_transfer_equals_the_layer_by_layer_network(kind):
    """The fused form (matrix products, k folded into the weights) is the same function as
    the convolutions with unfused GELUs: outputs and every gradient agree."""
    gen = torch.Generator().manual_seed(3)
    net = TransferNet(16, hidden=32, kind=kind, generator=gen)
    with torch.no_grad():  # non-zero last layer and gate, so every parameter matters
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    a = torch.randn(9, 16, generator=gen)
    b = torch.randn(9, 16, generator=gen)
    a[0] = 0  # a new id
    grads = []
    for fn in (net, net.reference):
        net.zero_grad()
        bb = b.clone().requires_grad_(True)
        out = fn(a, bb)
        out.pow(2).sum().backward()
        grads.append((out.detach(), bb.grad, [p.grad.clone() for p in net.parameters()]))
    (o1, b1, p1), (o2, b2, p2) = grads
    assert torch.allclose(o1, o2, atol=1e-5, rtol=1e-4)
    assert torch.allclose(b1, b2, atol=1e-5, rtol=1e-4)
    for x, y in zip(p1, p2, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_building_theta_never_draws_from_the_global_random_stream():
    before = torch.random.get_rng_state()
    a = Transfer(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = Transfer(8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_a_co_running_strategy_does_not_shift_another():
    periods = _toy_periods()
    w0 = pretrain(periods[:1], 30, 20, MFConfig(epochs=1), LossConfig(), seed=0, dim=8)
    alone = _run(SML(sml=SMLConfig(outer_steps=1), seed=1), periods, w0).weights()
    s, other = SML(sml=SMLConfig(outer_steps=1), seed=1), FineTune(seed=1)
    s.start(w0)
    other.start(w0)
    for t in range(1, len(periods)):
        other.update(periods[: t + 1], 30, 20)
        torch.randn(100)  # and someone else draws from the global stream
        s.update(periods[: t + 1], 30, 20)
    assert torch.equal(s.weights().user, alone.user)


def test_transfer_stops_gradient_of_b_through_the_product_term():
    net = TransferNet(4)
    a = torch.randn(2, 4, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    net(a, b).sum().backward()
    g_full = b.grad.clone()
    # Gradient w.r.t. b must equal what flows through the b row alone (product detached).
    b2 = b.detach().clone().requires_grad_(True)
    com = (a * b2.detach() / a.norm(dim=-1, keepdim=True)).detach()
    x = torch.stack([a.detach(), b2, com], 1).unsqueeze(1)
    from smlrec.models import gelu_sigmoid

    y = net.fc2(gelu_sigmoid(net.fc1(gelu_sigmoid(net.conv2(gelu_sigmoid(net.conv1(x)))
                                                  .flatten(1)))))
    y.sum().backward()
    assert torch.allclose(g_full, b2.grad, atol=1e-6)


def _toy_periods(seed=0, n_periods=4, n_users=30, n_items=20, per_period=300):
    rng = np.random.default_rng(seed)
    return [PeriodData(str(t), rng.integers(0, n_users, per_period),
                       rng.integers(0, n_items, per_period)) for t in range(n_periods)]


def test_step1_gradient_reaches_w_hat_through_transfer_and_theta_is_frozen():
    periods = _toy_periods()
    theta = Transfer(8)
    before = {k: v.clone() for k, v in theta.state_dict().items()}
    w_prev = MFWeights.random(30, 20, 8, torch.Generator().manual_seed(1))
    w_hat, losses = sml_learn_what(theta, w_prev, w_prev.clone(), periods[0].users,
                                   periods[0].items, SMLConfig(), LossConfig(), 0, CPU)
    assert losses and all(np.isfinite(losses))
    assert not torch.equal(w_hat.user, w_prev.user)  # Ŵ moved: gradient went through f_Θ
    assert all(torch.equal(before[k], v) for k, v in theta.state_dict().items())  # Θ frozen
    assert all(p.requires_grad for p in theta.parameters())  # ...and unfrozen afterwards


def test_step2_updates_theta_but_not_the_weights():
    periods = _toy_periods()
    theta = Transfer(8)
    opt = torch.optim.Adam(theta.parameters(), lr=1e-3)
    w_old = MFWeights.random(30, 20, 8, torch.Generator().manual_seed(1))
    w_hat = MFWeights.random(30, 20, 8, torch.Generator().manual_seed(2))
    copies = (w_old.clone(), w_hat.clone())
    before = {k: v.clone() for k, v in theta.state_dict().items()}
    sml_learn_theta(theta, opt, w_old, w_hat, periods[1].users, periods[1].items, SMLConfig(),
                    LossConfig(), 0, CPU)
    assert any(not torch.equal(before[k], v) for k, v in theta.state_dict().items())
    assert torch.equal(copies[0].user, w_old.user) and torch.equal(copies[1].item, w_hat.item)


# --------------------------------------------------------------------------- losses, sampling


def _rows(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


def test_losses_known_values():
    z = torch.zeros(4, 3)
    assert rec_loss(z, z, z, LossConfig(loss="bce")).item() == pytest.approx(2 * np.log(2))
    assert rec_loss(z, z, z, LossConfig(loss="bpr")).item() == pytest.approx(np.log(2))
    one = _rows(1.0, 1.0)
    assert rec_loss(one, 20 * one, -20 * one, LossConfig()).item() < 1e-6
    # k negatives per positive: (B, k, d); BCE averages over all of them.
    neg = torch.stack([_rows(0.0, 0.0), _rows(-20.0, -20.0)], 1)  # (2, 2, 1)
    assert rec_loss(one, 20 * one, neg, LossConfig()).item() == pytest.approx(np.log(2) / 2,
                                                                              abs=1e-6)
    with pytest.raises(ValueError):
        LossConfig(loss="hinge")


def test_sampled_softmax_known_values_masking_and_logq():
    from smlrec.train import LogQ

    cfg = LossConfig(loss="softmax", n_negatives=2, logq=False)
    z = torch.zeros(4, 3)
    items = torch.tensor([0, 1, 2, 3])
    neg_items = torch.tensor([[4, 5]] * 4)
    # All logits 0: each positive against 3 in-batch and 2 sampled candidates: log(6).
    loss = rec_loss(z, z, torch.zeros(4, 2, 3), cfg, items, neg_items)
    assert loss.item() == pytest.approx(np.log(6))
    # A batch column holding the row's own item is masked: rows 0 and 1 share item 0.
    same = torch.tensor([0, 0, 2, 3])
    loss = rec_loss(z, z, torch.zeros(4, 2, 3), cfg, same, neg_items)
    expected = (2 * np.log(5) + 2 * np.log(6)) / 4
    assert loss.item() == pytest.approx(expected)
    # logQ subtracts log Q(item) from every candidate's logit (the positive's included).
    logq = LogQ(batch=torch.log(torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 1.0])),
                sampled=torch.zeros(6))
    loss = rec_loss(z, z, torch.zeros(4, 2, 3), LossConfig(loss="softmax", n_negatives=2),
                    items, neg_items, logq)
    logits = np.array([-np.log([1, 2, 4, 8])] * 4)
    full = np.concatenate([logits, np.zeros((4, 2))], 1)
    ce = [np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(full)]
    assert loss.item() == pytest.approx(np.mean(ce), rel=1e-5)


def test_hard_negatives_keep_the_highest_scored_candidates():
    from smlrec.train import pick_hard

    u = torch.tensor([[1.0, 0.0]])
    cand_rows = torch.tensor([[[0.1, 0], [0.9, 0], [0.5, 0], [-1.0, 0]]])
    cand = torch.tensor([[10, 11, 12, 13]])
    rows, items = pick_hard(u, cand_rows, cand, 2)
    assert items.tolist() == [[11, 12]] and rows.shape == (1, 2, 2)


def test_negative_sampler_avoids_the_users_positives():
    users = np.repeat(np.arange(50), 8)
    items = np.concatenate([np.arange(8) + u % 3 for u in range(50)])
    sampler = NegativeSampler(users, items, np.arange(12))
    neg = sampler.sample(users, np.random.default_rng(0))
    positives = set(zip(users.tolist(), items.tolist(), strict=True))
    assert not any((u, i) in positives for u, i in zip(users.tolist(), neg.tolist(), strict=True))


@pytest.mark.parametrize("k, weights", [(5, None), (16, "popularity")])
def test_k_negative_sampler_never_returns_a_positive_of_the_user(k, weights):
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 10)
    # Each user saw 10 of 15 items: a third of the pool is negative, so redraws are frequent.
    items = np.concatenate([rng.choice(15, 10, replace=False) for _ in range(40)])
    w = None if weights is None else np.bincount(items, minlength=15) + 1.0
    sampler = NegativeSampler(users, items, np.arange(15), w)
    neg = sampler.sample(users, np.random.default_rng(0), k=k)
    assert neg.shape == (len(users), k)
    positives = set(zip(users.tolist(), items.tolist(), strict=True))
    hits = [(u, i) for u, row in zip(users.tolist(), neg.tolist(), strict=True) for i in row
            if (u, i) in positives]
    assert hits == []
    assert len(np.unique(neg)) > 1


# --------------------------------------------------------------------------- the blend


def test_blend_column_equals_the_blended_score():
    g = torch.Generator().manual_seed(0)
    w = MFWeights.random(5, 7, 4, g)
    prior = torch.tensor([0.0, 1, 2, 3, 10, 0, 5])
    blended = w.with_prior(prior, 2.5)
    assert blended.user.shape == (5, 5) and blended.item.shape == (7, 5)
    expected = w.user @ w.item.T + 2.5 * torch.log1p(prior)[None, :]
    assert torch.allclose(blended.user @ blended.item.T, expected, atol=1e-5)
    assert w.with_prior(prior, 0.0) is w  # no blend, no extra column
    # A strategy's weights() is the blend of its model and its refreshed prior.
    s = FineTune(blend=2.5, blend_window=2)
    s.w, s.prior = w, prior
    assert torch.allclose(s.weights().user @ s.weights().item.T, expected, atol=1e-5)


def test_popularity_over_windows_and_half_lives():
    from smlrec.strategies import popularity_counts

    hist = [PeriodData(str(t), np.zeros(1, int), np.array([t])) for t in range(4)]
    assert popularity_counts(hist, 4, window=1).tolist() == [0, 0, 0, 1]
    assert popularity_counts(hist, 4, window=2).tolist() == [0, 0, 1, 1]
    decayed = popularity_counts(hist, 4, window=None, half_life=1).tolist()
    assert decayed == pytest.approx([0.125, 0.25, 0.5, 1.0])


# --------------------------------------------------------------------------- MF known answer


def checkerboard(n_users=100, n_items=40, seen=0.8, seed=0):
    """Two groups of users and items: even users like even items, odd users odd items.

    Each user has seen 80% of their group's items; the right top-1 among the unseen items
    is, obviously, one of the remaining items of the user's own group.
    """
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        group = [i for i in range(n_items) if i % 2 == u % 2]
        for i in rng.choice(group, int(len(group) * seen), replace=False):
            users.append(u)
            items.append(int(i))
    return np.array(users), np.array(items)


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_mf_finds_an_unseen_item_of_the_users_group(loss):
    users, items = checkerboard()
    w = MFWeights.random(100, 40, 8, torch.Generator().manual_seed(0))
    w, losses = train_mf(w, users, items, MFConfig(epochs=20, batch_size=128, lr=0.05, l2=1e-2),
                         LossConfig(loss=loss), seed=0, device=CPU)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    scores = w.user @ w.item.T
    scores[torch.from_numpy(users), torch.from_numpy(items)] = -np.inf  # exclude seen
    top1 = scores.argmax(1).numpy()
    assert all(top1[u] % 2 == u % 2 for u in range(100))


# --------------------------------------------------------------------------- strategies


def _run(strategy, periods, w0, n_users=30, n_items=20):
    strategy.start(w0)
    for t in range(1, len(periods)):
        strategy.update(periods[: t + 1], n_users, n_items)
    return strategy


@pytest.mark.parametrize("cls, kw", [
    (SML, {"sml": SMLConfig(outer_steps=2)}),
    (SML, {"sml": SMLConfig(outer_steps=2, schedule="official")}),
    (FullRetrain, {}), (FineTune, {}), (SlidingWindow, {})])
def test_strategies_are_deterministic_on_cpu(cls, kw):
    periods = _toy_periods()
    w0 = pretrain(periods[:1], 30, 20, MFConfig(epochs=2), LossConfig(), seed=0, dim=8)
    a = _run(cls(seed=3, **kw), periods, w0).weights()
    b = _run(cls(seed=3, **kw), periods, w0).weights()
    c = _run(cls(seed=4, **kw), periods, w0).weights()
    assert torch.equal(a.user, b.user) and torch.equal(a.item, b.item)
    assert not torch.equal(a.user, c.user)


def test_sml_grows_tables_for_new_ids_and_shifts_its_state():
    periods = _toy_periods(n_users=30, n_items=20)
    w0 = pretrain(periods[:1], 30, 20, MFConfig(epochs=1), LossConfig(), seed=0, dim=8)
    s = SML(sml=SMLConfig(outer_steps=1), seed=0)
    s.start(w0)
    s.update(periods[:2], 30, 20)
    w1 = s.weights()
    new = PeriodData("new", np.array([30, 31, 0]), np.array([20, 1, 21]))
    s.update([*periods[:2], new], 32, 22)
    assert s.weights().user.shape == (32, 8) and s.weights().item.shape == (22, 8)
    assert torch.equal(s.w_prev.user[:30], w1.user)  # W_{t-1} became W_{t-2}
    assert torch.isfinite(s.weights().user).all()


def test_sml_what_window_replays_the_last_periods_in_step_1():
    """what_window = 2: Ŵ_t learns from D_t and D_{t-1}, so a user seen only in D_{t-1}
    gets a new Ŵ row; with what_window = 1 (the paper) that row stays W_{t-1}'s."""
    periods = _toy_periods(n_users=30, n_items=20)
    earlier = PeriodData("a", np.array([29, 29, 29, 1]), np.array([3, 4, 5, 6]))
    latest = PeriodData("b", np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    w0 = pretrain(periods[:1], 30, 20, MFConfig(epochs=1), LossConfig(), seed=0, dim=8)
    rows = {}
    for window in (1, 2):
        s = SML(sml=SMLConfig(outer_steps=1, transfer="residual", hidden=8,
                              what_window=window), seed=0)
        assert s.periods_needed() >= window
        s.start(w0)
        s.update([periods[0], earlier, latest], 30, 20)
        rows[window] = s.w_hat_prev.user[29]
        assert len(s._train) == 4 * window
    assert torch.equal(rows[1], w0.user[29])
    assert not torch.equal(rows[2], w0.user[29])


def test_transfer_of_trained_rows_only_keeps_the_untrained_rows():
    """rows='trained': rows step 1 did not touch (Ŵ_t = W_{t-1}) keep W_{t-1} exactly, the
    others go through f_Θ; the official transfer refuses the option."""
    gen = torch.Generator().manual_seed(0)
    theta = Transfer(8, 16, "residual", gen, rows="trained")
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.1)  # a non-zero correction
    old = MFWeights.random(6, 5, 8, gen)
    new = old.clone()
    new.user[:2] += 0.5
    new.item[4] -= 0.5
    out = theta.apply_all(old, new)
    assert torch.equal(out.user[2:], old.user[2:]) and torch.equal(out.item[:4], old.item[:4])
    full = Transfer(8, 16, "residual", torch.Generator().manual_seed(0))
    full.load_state_dict(theta.state_dict())
    assert torch.allclose(out.user[:2], full.apply_all(old, new).user[:2])
    assert not torch.equal(full.apply_all(old, new).user[2:], old.user[2:])
    with pytest.raises(ValueError, match="residual or gated"):
        Transfer(8, 16, "official", rows="trained")


def test_popularity_ranks_last_period_counts():
    s = Popularity()
    s.start(None)
    s.update([PeriodData("p", np.array([0, 1, 2]), np.array([3, 3, 1]))], 3, 5)
    assert s.item_prior().tolist() == [0, 1, 0, 2, 0]
    assert s.weights() is None


# --------------------------------------------------------------------------- save / load


def test_sml_state_round_trip_through_safetensors_with_checksums(tmp_path):
    periods = _toy_periods()
    w0 = pretrain(periods[:1], 30, 20, MFConfig(epochs=1), LossConfig(), seed=0, dim=8)
    s = _run(SML(sml=SMLConfig(outer_steps=1), seed=0), periods[:3], w0)
    tensors, meta = s.state()
    url = str(tmp_path / "bundle")
    save_bundle(url, tensors, meta, {"users.json": Vocab(["u1"]).to_json().encode()})
    loaded, meta2, files = load_bundle(url)
    r = SML(sml=SMLConfig(outer_steps=1), seed=0)
    r.load_state(loaded, meta2)
    assert Vocab.from_json(files["users.json"].decode()).ids == ["u1"]
    # The restored strategy continues exactly like the original.
    s.update(periods, 30, 20)
    r.update(periods, 30, 20)
    assert torch.equal(s.weights().user, r.weights().user)


def test_corrupt_weights_are_refused(tmp_path):
    url = str(tmp_path / "bundle")
    save_bundle(url, {"x": torch.arange(4.0)}, {"k": 1})
    blob = tmp_path / "bundle" / "weights.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_bundle(url)
    (tmp_path / "bundle" / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="incomplete"):
        load_bundle(url)
