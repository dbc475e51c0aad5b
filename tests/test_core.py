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


def test_losses_known_values():
    z = torch.zeros(4)
    assert rec_loss(z, z, "bce").item() == pytest.approx(2 * np.log(2))
    assert rec_loss(z, z, "bpr").item() == pytest.approx(np.log(2))
    assert rec_loss(torch.full((2,), 20.0), torch.full((2,), -20.0), "bce").item() < 1e-6
    with pytest.raises(ValueError, match="unknown loss"):
        rec_loss(z, z, "hinge")


def test_negative_sampler_avoids_the_users_positives():
    users = np.repeat(np.arange(50), 8)
    items = np.concatenate([np.arange(8) + u % 3 for u in range(50)])
    sampler = NegativeSampler(users, items, np.arange(12))
    neg = sampler.sample(users, np.random.default_rng(0))
    positives = set(zip(users.tolist(), items.tolist(), strict=True))
    assert not any((u, i) in positives for u, i in zip(users.tolist(), neg.tolist(), strict=True))


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
