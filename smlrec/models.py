"""The base recommender (matrix factorisation) and SML's CNN transfer network.

Notation follows the paper: ``W = (U, V)`` are the user and item tables of an MF model,
``score(u, i) = <U_u, V_i>`` (no biases). ``f_Θ`` is the transfer: for one row it takes
the old row ``a`` (from W_{t-1}) and the new row ``b`` (from Ŵ_t) and returns the row
of W_t. Users and items have separate transfer networks of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DIM = 64
# New rows (ids first seen in this period) start as N(0, NEW_ROW_STD^2): small and random,
# so that a new user and a new item still get gradient from each other in a dot product.
NEW_ROW_STD = 0.01
# Guards the division by ||a|| in the transfer when a row of W_{t-1} is all zeros.
NORM_EPS = 1e-8


def init_rows(n: int, dim: int, generator: torch.Generator | None = None,
              std: float = NEW_ROW_STD) -> Tensor:
    """Initial values for ``n`` new rows of an MF table (documented: N(0, std^2))."""
    return torch.randn(n, dim, generator=generator) * std


@dataclass
class MFWeights:
    """The parameters W = (U, V) of an MF model, as plain tensors."""

    user: Tensor
    item: Tensor

    @property
    def dim(self) -> int:
        return self.user.shape[1]

    @property
    def n_users(self) -> int:
        return self.user.shape[0]

    @property
    def n_items(self) -> int:
        return self.item.shape[0]

    def clone(self) -> MFWeights:
        return MFWeights(self.user.detach().clone(), self.item.detach().clone())

    def to(self, device: torch.device | str) -> MFWeights:
        return MFWeights(self.user.to(device), self.item.to(device))

    def grow(self, n_users: int, n_items: int, generator: torch.Generator | None = None,
             std: float = NEW_ROW_STD) -> MFWeights:
        """Return weights with at least n_users / n_items rows; old rows keep their values."""
        return MFWeights(_grow(self.user, n_users, generator, std),
                         _grow(self.item, n_items, generator, std))

    @classmethod
    def random(cls, n_users: int, n_items: int, dim: int = DIM,
               generator: torch.Generator | None = None, std: float = 0.1) -> MFWeights:
        return cls(init_rows(n_users, dim, generator, std), init_rows(n_items, dim, generator, std))

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of aligned (user, item) pairs."""
        return (self.user[users] * self.item[items]).sum(-1)


def _grow(table: Tensor, n: int, generator: torch.Generator | None, std: float) -> Tensor:
    extra = n - table.shape[0]
    if extra <= 0:
        return table
    new = init_rows(extra, table.shape[1], generator, std).to(table.device, table.dtype)
    return torch.cat([table.detach(), new], dim=0)


def gelu_sigmoid(x: Tensor) -> Tensor:
    """The GELU approximation used by SML: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class TransferNet(nn.Module):
    """f_Θ for one kind of row (users or items): the official "conv_com" network.

    Input rows ``a`` (old, from W_{t-1}) and ``b`` (new, from Ŵ_t), both (N, d):

    1. stack a, b and (a ⊙ stopgrad(b)) / ||a||₂ into an (N, 1, 3, d) grid;
    2. Conv2d(1 → 10, kernel 3 × 1), GELU: per-dimension mixing of old, new and product;
    3. Conv2d(10 → 5, kernel 1 × 1), flatten to 5·d, GELU;
    4. Linear(5·d → 512), GELU, Linear(512 → d). No residual connection.
    """

    def __init__(self, dim: int = DIM, hidden: int = 512):
        super().__init__()
        self.dim = dim
        self.conv1 = nn.Conv2d(1, 10, kernel_size=(3, 1))
        self.conv2 = nn.Conv2d(10, 5, kernel_size=(1, 1))
        self.fc1 = nn.Linear(5 * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        norm = a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        com = a * b.detach() / norm
        x = torch.stack([a, b, com], dim=1).unsqueeze(1)  # (N, 1, 3, d)
        x = gelu_sigmoid(self.conv1(x))                   # (N, 10, 1, d)
        x = self.conv2(x).flatten(1)                      # (N, 5·d)
        x = gelu_sigmoid(x)
        return self.fc2(gelu_sigmoid(self.fc1(x)))


class Transfer(nn.Module):
    """Θ: separate transfer networks for user rows and item rows."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.user = TransferNet(dim)
        self.item = TransferNet(dim)

    @torch.no_grad()
    def apply_all(self, old: MFWeights, new: MFWeights, chunk: int = 65536) -> MFWeights:
        """W_t = f_Θ(W_{t-1}, Ŵ_t) for every user and item row (no gradient)."""
        return MFWeights(_chunked(self.user, old.user, new.user, chunk),
                         _chunked(self.item, old.item, new.item, chunk))


def _chunked(net: TransferNet, a: Tensor, b: Tensor, chunk: int) -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"transfer inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.cat([net(a[s:s + chunk], b[s:s + chunk]) for s in range(0, len(a), chunk)]
                     or [a.new_zeros(0, a.shape[1])])
