"""The models of the robustness matrix: one entry per parameter / gradient kind or conditional computation.

Each :class:`Kind` builds a small regression model ``x (B, 8) -> y (B, 1)`` that holds one kind of parameter,
gradient or computation a user can train, and says which warning findings a correct diagnosis must report
for it (``expect``; empty for a healthy setup). Adding a kind is one entry in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.optim import SGD, Adam, Optimizer

FEATURES = 8


def adam(params: Iterable[nn.Parameter]) -> Optimizer:
    return Adam(params, lr=1e-3)


def sgd(params: Iterable[nn.Parameter]) -> Optimizer:
    return SGD(params, lr=1e-2, momentum=0.9)


@dataclass(frozen=True)
class Kind:
    """One model of the matrix.

    Attributes:
        name: The kind's name in case ids and tables.
        build: A fresh model (deterministic under the caller's seed).
        optimizer: The optimizer a user would pair with it.
        expect: Warning findings the diagnosis must report (a real fault in the setup); empty when healthy.
        warmup: Run one forward pass before building the optimizer (lazy modules materialise there).
        what: One line for the table.
    """

    name: str
    build: Callable[[], nn.Module]
    optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] = adam
    expect: frozenset[str] = field(default_factory=frozenset)
    warmup: bool = False
    what: str = ""


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


class SparseEmbeddingNet(nn.Module):
    """A bag of embeddings with ``sparse=True`` (recommenders): inputs are bucketed into repeated indices."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(32, 16, sparse=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        index = (x[:, :4].detach().abs() * 5).long().clamp(max=31)  # (B, 4): indices repeat within the batch
        return self.head(self.embedding(index).mean(1))


class ComplexNet(nn.Module):
    """A complex linear layer (signal processing, state-space models), read out through magnitudes."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Linear(FEATURES, 16, dtype=torch.cfloat)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.spectral(torch.complex(x.float(), x.flip(-1).float()))
        return self.head(z.abs().to(x.dtype))


class Symmetric(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).transpose(0, 1)


def _parametrized() -> nn.Module:
    net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    parametrize.register_parametrization(net[2], "weight", Symmetric())
    return net


def _weight_norm() -> nn.Module:
    return nn.Sequential(weight_norm(nn.Linear(FEATURES, 16)), nn.Tanh(), weight_norm(nn.Linear(16, 1)))


def _spectral_norm() -> nn.Module:
    return nn.Sequential(spectral_norm(nn.Linear(FEATURES, 16)), nn.Tanh(), spectral_norm(nn.Linear(16, 1)))


class TiedNet(nn.Module):
    """Two layers sharing one weight (tied embeddings): the parameter is listed once, under its first owner."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, 16)
        self.encoder = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 16)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.encoder(torch.tanh(self.stem(x))))
        return self.head(torch.tanh(self.decoder(h)))


class ReusedNet(nn.Module):
    """One block applied three times per forward (weight sharing across depth, like a universal transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        for _ in range(3):
            h = h + torch.tanh(self.block(h))
        return self.head(h)


def _frozen() -> nn.Module:
    net = _mlp()
    net[0].requires_grad_(False)  # a frozen backbone: not monitored, not a fault
    return net


class DetachedBranch(nn.Module):
    """A trainable branch whose output is cut by ``.detach()``: its parameters never get a gradient (a bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(FEATURES, 16)
        self.trunk = nn.Linear(FEATURES, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.trunk(x)) + torch.tanh(self.branch(x)).detach())


def _compiled() -> nn.Module:
    return torch.compile(_mlp(), backend="eager")  # type: ignore[return-value]


def _compiled_inductor() -> nn.Module:
    return torch.compile(_mlp())  # type: ignore[return-value]


class LayerDropNet(nn.Module):
    """Residual blocks each skipped at random in training (LayerDrop, whole-layer stochastic depth)."""

    def __init__(self, blocks: int = 4, drop: float = 0.3) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(blocks))
        self.head = nn.Linear(16, 1)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            if self.training and torch.rand(()) < self.drop:
                continue
            h = h + torch.tanh(block(h))
        return self.head(h)


class RoutedExperts(nn.Module):
    """Separate expert modules, one routed per batch by a gate (the others get no gradient on that step)."""

    def __init__(self, experts: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, 16)
        self.gate = nn.Linear(16, experts)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(experts))
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        weights = torch.softmax(self.gate(h).mean(0), dim=0)
        chosen = int(torch.randint(len(self.experts), ())) if self.training else int(weights.argmax())
        return self.head(h + weights[chosen] * torch.tanh(self.experts[chosen](h)))


def _lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(1))


#: Every kind, by name. Adding one is one entry.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("dense", _mlp, what="plain MLP"),
        Kind("sparse", SparseEmbeddingNet, sgd, what="nn.Embedding(sparse=True), repeated indices (uncoalesced)"),
        Kind("complex", ComplexNet, what="nn.Linear(dtype=cfloat)"),
        Kind("lazy", _lazy, warmup=True, what="nn.LazyLinear"),
        Kind("parametrize", _parametrized, what="torch.nn.utils.parametrize (symmetric weight)"),
        Kind("weight_norm", _weight_norm, what="parametrizations.weight_norm"),
        Kind("spectral_norm", _spectral_norm, what="parametrizations.spectral_norm"),
        Kind("tied", TiedNet, what="encoder/decoder sharing one weight"),
        Kind("reused", ReusedNet, what="one block called 3 times per forward"),
        Kind("frozen", _frozen, what="first layer requires_grad=False"),
        Kind("detached", DetachedBranch, expect=frozenset({"no_gradient"}), what="trainable branch cut by .detach()"),
        Kind("compiled", _compiled, what="torch.compile(backend='eager')"),
        Kind("compiled_inductor", _compiled_inductor, what="torch.compile (inductor)"),
        Kind("layer_drop", LayerDropNet, what="residual blocks skipped at random (p=0.3)"),
        Kind("experts", RoutedExperts, what="3 experts, one routed per step"),
    )
}
