"""The base recommender (matrix factorisation) and SML's CNN transfer network.

Notation follows the paper: ``W = (U, V)`` are the user and item tables of an MF model,
``score(u, i) = <U_u, V_i>`` (no biases). ``f_Θ`` is the transfer: for one row it takes
the old row ``a`` (from W_{t-1}) and the new row ``b`` (from Ŵ_t) and returns the row
of W_t. Users and items have separate transfer networks of the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import skip_init

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

    def with_prior(self, prior: Tensor | None, weight: float) -> MFWeights:
        """The blend as one more column: ``U' = [U, 1]``, ``V' = [V, weight·log1p(prior)]``,
        so that ``<U'_u, V'_i> = <U_u, V_i> + weight·log1p(prior_i)`` and serving stays one
        dot product. ``prior`` is a count per item (e.g. recent popularity); rows beyond its
        length get 0. ``weight == 0`` (or no prior) returns the weights unchanged."""
        if not weight or prior is None:
            return self
        col = torch.zeros(self.n_items, dtype=self.item.dtype, device=self.item.device)
        n = min(len(prior), self.n_items)
        col[:n] = weight * torch.log1p(prior[:n].to(col.device, col.dtype).clamp_min(0))
        ones = torch.ones(self.n_users, 1, dtype=self.user.dtype, device=self.user.device)
        return MFWeights(torch.cat([self.user, ones], 1), torch.cat([self.item, col[:, None]], 1))


def _grow(table: Tensor, n: int, generator: torch.Generator | None, std: float) -> Tensor:
    extra = n - table.shape[0]
    if extra <= 0:
        return table
    new = init_rows(extra, table.shape[1], generator, std).to(table.device, table.dtype)
    return torch.cat([table.detach(), new], dim=0)


GELU_K = 1.702


def gelu_sigmoid(x: Tensor) -> Tensor:
    """The GELU approximation used by SML: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(GELU_K * x)


class TransferNet(nn.Module):
    """f_Θ for one kind of row (users or items): the official "conv_com" network.

    Input rows ``a`` (old, from W_{t-1}) and ``b`` (new, from Ŵ_t), both (N, d):

    1. stack a, b and (a ⊙ stopgrad(b)) / ||a||₂ into an (N, 1, 3, d) grid;
    2. Conv2d(1 → 10, kernel 3 × 1), GELU: per-dimension mixing of old, new and product;
    3. Conv2d(10 → 5, kernel 1 × 1), flatten to 5·d, GELU;
    4. Linear(5·d → hidden), GELU, Linear(hidden → d).

    ``kind`` picks what is returned (see ``SMLConfig.transfer``): ``official`` returns step
    4's output (no residual, as in the paper); ``residual`` returns b + step 4, with the last
    layer starting at zero (the transfer starts as fine-tuning); ``gated`` returns
    g ⊙ a + (1 - g) ⊙ b + step 4, g = sigmoid(Conv2d(10 → 1, 1 × 1) of step 2's features),
    one gate per dimension, starting near 0.27 (mostly the new row).

    Parameters are initialised as PyTorch does by default, but from ``generator`` when one
    is given, so building Θ never draws from the global random stream.
    """

    GATE_BIAS = -1.0  # sigmoid(-1) ≈ 0.27: at first, a gated row is mostly the new row

    def __init__(self, dim: int = DIM, hidden: int = 512, kind: str = "official",
                 generator: torch.Generator | None = None):
        super().__init__()
        if kind not in ("official", "residual", "gated"):
            raise ValueError(f"unknown transfer {kind!r}: official, residual or gated")
        self.dim, self.kind = dim, kind
        # skip_init: the layers' own initialisation would draw from the global stream.
        self.conv1 = skip_init(nn.Conv2d, 1, 10, kernel_size=(3, 1))
        self.conv2 = skip_init(nn.Conv2d, 10, 5, kernel_size=(1, 1))
        self.fc1 = skip_init(nn.Linear, 5 * dim, hidden)
        self.fc2 = skip_init(nn.Linear, hidden, dim)
        self.gate = skip_init(nn.Conv2d, 10, 1, kernel_size=(1, 1)) if kind == "gated" else None
        reset_parameters(self, generator)
        if kind != "official":
            with torch.no_grad():
                self.fc2.weight.zero_()
                self.fc2.bias.zero_()
        if self.gate is not None:
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.fill_(self.GATE_BIAS)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """The network above, computed without convolutions and with each GELU as one fused
        kernel (the same function; twice as fast on a CPU as the layer-by-layer form, which
        :meth:`reference` keeps).

        The 3 x 1 and 1 x 1 convolutions are matrix products over the (N·d, 3) grid of
        (old, new, product) values, and x·σ(k x) = silu(k x) / k: the factor k is folded into
        the weights and biases around each activation (small tensors), never applied to the
        activations (large ones). The first layer of the MLP reads the (N, d, 5) features
        through a column permutation of its weight, so nothing is transposed row by row.
        """
        n, d = a.shape
        k = GELU_K
        norm = a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        com = a * b.detach() / norm
        grid = torch.stack([a, b, com], dim=-1).reshape(n * d, 3)
        # h = k · GELU(conv1): (N·d, 10)
        h = F.silu(torch.addmm(self.conv1.bias * k, grid, self.conv1.weight.view(-1, 3).t() * k))
        # k · GELU(conv2): (N·d, 5), read as (N, d·5)
        x = F.silu(torch.addmm(self.conv2.bias * k, h, self.conv2.weight.view(5, -1).t()))
        w1 = self.fc1.weight.view(-1, 5, d).transpose(1, 2).reshape(-1, 5 * d)
        x = F.silu(torch.addmm(self.fc1.bias * k, x.view(n, 5 * d), w1.t()))  # k · GELU(fc1)
        out = torch.addmm(self.fc2.bias, x, self.fc2.weight.t() / k)
        if self.kind == "residual":
            return b + out
        if self.kind == "gated":
            gate = torch.addmm(self.gate.bias, h, self.gate.weight.view(1, -1).t() / k)
            g = torch.sigmoid(gate.view(n, d))
            return g * a + (1 - g) * b + out
        return out

    def reference(self, a: Tensor, b: Tensor) -> Tensor:
        """The layer-by-layer form of :meth:`forward` (convolutions, unfused GELU), kept as
        the known answer the fast form is tested against."""
        norm = a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        com = a * b.detach() / norm
        x = torch.stack([a, b, com], dim=1).unsqueeze(1)  # (N, 1, 3, d)
        h = gelu_sigmoid(self.conv1(x))                   # (N, 10, 1, d)
        x = self.conv2(h).flatten(1)                      # (N, 5·d)
        x = gelu_sigmoid(x)
        out = self.fc2(gelu_sigmoid(self.fc1(x)))
        if self.kind == "residual":
            return b + out
        if self.kind == "gated":
            g = torch.sigmoid(self.gate(h).flatten(1))    # (N, d)
            return g * a + (1 - g) * b + out
        return out


def reset_parameters(module: nn.Module, generator: torch.Generator | None) -> None:
    """PyTorch's default initialisation of every Linear and Conv layer (Kaiming-uniform
    weights with a = sqrt(5), uniform biases in ±1/sqrt(fan_in)), drawn from ``generator``."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


class Transfer(nn.Module):
    """Θ: separate transfer networks for user rows and item rows.

    ``rows="trained"`` transfers only the rows step 1 trained (where Ŵ_t differs from
    W_{t-1}); every other row keeps W_{t-1}'s value. A row with no new data then stays as it
    is however many periods go by, instead of receiving the transfer's correction once per
    period (which step 2 never trained for: it sees the correction applied once). Only for
    the residual and gated forms, whose output lives in the input's space."""

    def __init__(self, dim: int = DIM, hidden: int = 512, kind: str = "official",
                 generator: torch.Generator | None = None, rows: str = "all"):
        super().__init__()
        if rows not in ("all", "trained"):
            raise ValueError(f"unknown transfer rows {rows!r}: all or trained")
        if rows == "trained" and kind == "official":
            raise ValueError("rows='trained' needs a residual or gated transfer: the official "
                             "transfer's output is not in the space of the rows it keeps")
        self.trained_only = rows == "trained"
        self.user = TransferNet(dim, hidden, kind, generator)
        self.item = TransferNet(dim, hidden, kind, generator)

    def rows(self, net: TransferNet, a: Tensor, b: Tensor) -> Tensor:
        """f_Θ(a, b) for rows of one kind (``net``), keeping ``a`` where ``b`` is ``a``
        when only trained rows are transferred."""
        out = net(a, b)
        if self.trained_only:
            out = torch.where((a != b).any(-1, keepdim=True), out, a)
        return out

    @torch.no_grad()
    def apply_all(self, old: MFWeights, new: MFWeights, chunk: int = 65536) -> MFWeights:
        """W_t = f_Θ(W_{t-1}, Ŵ_t) for every user and item row (no gradient)."""
        return MFWeights(self._chunked(self.user, old.user, new.user, chunk),
                         self._chunked(self.item, old.item, new.item, chunk))

    def _chunked(self, net: TransferNet, a: Tensor, b: Tensor, chunk: int) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(f"transfer inputs differ in shape: {tuple(a.shape)} vs "
                             f"{tuple(b.shape)}")
        return torch.cat([self.rows(net, a[s:s + chunk], b[s:s + chunk])
                          for s in range(0, len(a), chunk)] or [a.new_zeros(0, a.shape[1])])
