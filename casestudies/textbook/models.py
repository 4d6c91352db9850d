"""Models and data of the textbook study, every design choice an explicit switch.

* :class:`MLP` and :class:`CNN`: a stack of ``depth`` blocks ``layer -> [BatchNorm] -> activation``, with an
  optional identity shortcut around each block whose input and output shapes match, then a linear head.
  Activation by name (a fresh module per block, ``inplace=False``), ``norm: bool``, ``residual: bool``,
  ``init: "default" | "xavier" | "he"`` and an ``init_scale`` multiplier (for the exploding experiment).
* :class:`RecurrentClassifier`: a vanilla RNN, LSTM or GRU cell unrolled step by step in Python, so the
  gradient with respect to the hidden state of *every* time step can be read (``retain_grad``).
* :class:`Classifier`: the LightningModule (BCE with logits, SGD or Adam) that records accuracy per epoch.
* Data: the classic ``sum(x) > 0`` task (vectors or images) and the "remember the first token" task.

Parameter-owning module names are identical across variants (``blocks.{i}.layer``, ``blocks.{i}.norm``,
``head``), so two variants' gradient histories line up layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradlight.activations import create_activation

Init = Literal["default", "xavier", "he"]
INITS: tuple[str, ...] = ("default", "xavier", "he")
CELLS: tuple[str, ...] = ("rnn", "lstm", "gru")


def initialize_(module: nn.Module, init: str, scale: float = 1.0) -> None:
    """Initialise every ``Linear`` / ``Conv2d`` weight of ``module`` in place.

    Args:
        module: The model.
        init: ``"default"`` keeps PyTorch's init (uniform, variance ``1 / (3 fan_in)``, bias uniform);
            ``"xavier"`` is Glorot-normal (variance ``2 / (fan_in + fan_out)``) and ``"he"`` is He-normal
            (variance ``2 / fan_in``), both with zero bias.
        scale: Multiply every weight by this after initialising (``> 1`` makes a too-large init).

    Raises:
        ValueError: If ``init`` is unknown.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    for sub in module.modules():
        if not isinstance(sub, (nn.Linear, nn.Conv2d)):
            continue
        if init == "xavier":
            nn.init.xavier_normal_(sub.weight)
        elif init == "he":
            nn.init.kaiming_normal_(sub.weight, mode="fan_in", nonlinearity="relu")
        if init != "default" and sub.bias is not None:
            nn.init.zeros_(sub.bias)
        if scale != 1.0:
            with torch.no_grad():
                sub.weight.mul_(scale)


@dataclass(frozen=True)
class NetSpec:
    """What distinguishes one feed-forward variant from another.

    Attributes:
        activation: Name in :data:`gradlight.activations.ACTIVATIONS`.
        norm: BatchNorm between each layer and its activation.
        residual: Identity shortcut ``h + block(h)`` around every block whose shapes match.
        init: ``"default"``, ``"xavier"`` or ``"he"`` (see :func:`initialize_`).
        init_scale: Multiplier on every initial weight.
    """

    activation: str = "sigmoid"
    norm: bool = False
    residual: bool = False
    init: str = "default"
    init_scale: float = 1.0

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``sigmoid+BN (he)``."""
        parts = [self.activation] + (["BN"] if self.norm else []) + (["res"] if self.residual else [])
        scale = f" x{self.init_scale:g}" if self.init_scale != 1.0 else ""
        return f"{'+'.join(parts)} ({self.init}{scale})"


class Block(nn.Module):
    """``layer -> [norm] -> activation``, plus ``x`` if ``residual`` (requires matching shapes)."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None, activation: str, residual: bool) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm if norm is not None else nn.Identity()
        self.act = create_activation(activation)  # a fresh module per block, inplace=False
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm(self.layer(x)))
        return x + out if self.residual else out


class MLP(nn.Module):
    """``depth`` hidden blocks of width ``width`` and a linear head with ``out_features`` outputs.

    The first block maps ``in_features -> width`` and never has a shortcut; so ``depth=10`` is the classic
    "10-layer MLP": 10 activations, 11 weight matrices.
    """

    def __init__(self, in_features: int, width: int, depth: int, spec: NetSpec, out_features: int = 1) -> None:
        super().__init__()
        self.spec = spec
        blocks = []
        for i in range(depth):
            fan_in = in_features if i == 0 else width
            norm = nn.BatchNorm1d(width) if spec.norm else None
            blocks.append(Block(nn.Linear(fan_in, width), norm, spec.activation, spec.residual and i > 0))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, out_features)
        initialize_(self, spec.init, spec.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


class CNN(nn.Module):
    """``depth`` 3x3 convolution blocks (``channels`` wide, same padding), global average pool, linear head."""

    def __init__(self, in_channels: int, channels: int, depth: int, spec: NetSpec, out_features: int = 1) -> None:
        super().__init__()
        self.spec = spec
        blocks = []
        for i in range(depth):
            fan_in = in_channels if i == 0 else channels
            conv = nn.Conv2d(fan_in, channels, 3, padding=1)
            norm = nn.BatchNorm2d(channels) if spec.norm else None
            blocks.append(Block(conv, norm, spec.activation, spec.residual and i > 0))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, out_features)
        initialize_(self, spec.init, spec.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


class RecurrentClassifier(nn.Module):
    """Embedding -> a recurrent cell unrolled over time -> linear head on the last hidden state.

    Unrolled in Python (not ``nn.RNN``) so that :attr:`hidden_states` holds ``h_t`` of every step; call
    :meth:`forward` with ``keep_hidden=True`` and, after ``backward()``, :meth:`hidden_grad_norms` returns
    ``||dL/dh_t||`` per time step.

    Args:
        cell: ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.
        vocab: Number of input tokens.
        hidden: Hidden size.
        classes: Number of output classes.
        forget_bias: For the LSTM, the initial forget-gate bias (PyTorch's default init gives about 0).
            ``None`` keeps the default.
    """

    def __init__(self, cell: str, vocab: int, hidden: int, classes: int, forget_bias: float | None = None) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose one of {CELLS}")
        self.kind = cell
        self.embed = nn.Embedding(vocab, hidden)
        cells = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
        self.cell = cells[cell](hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.hidden_states: list[Tensor] = []
        if cell == "lstm" and forget_bias is not None:
            with torch.no_grad():  # gate order i, f, g, o; the two biases add up
                self.cell.bias_ih[hidden : 2 * hidden].fill_(forget_bias)
                self.cell.bias_hh[hidden : 2 * hidden].zero_()

    def forward(self, tokens: Tensor, keep_hidden: bool = False) -> Tensor:
        batch, steps = tokens.shape
        inputs = self.embed(tokens)
        h = inputs.new_zeros(batch, self.cell.hidden_size)
        c = torch.zeros_like(h)
        self.hidden_states = []
        for t in range(steps):
            if self.kind == "lstm":
                h, c = self.cell(inputs[:, t], (h, c))
            else:
                h = self.cell(inputs[:, t], h)
            if keep_hidden:
                h.retain_grad()
                self.hidden_states.append(h)
        return self.head(h)

    def hidden_grad_norms(self) -> Tensor:
        """``||dL/dh_t||`` (Frobenius over the batch) for every time step of the last forward."""
        return torch.stack([h.grad.norm() if h.grad is not None else h.new_zeros(()) for h in self.hidden_states])


# ------------------------------------------------------------------------------------------------ data
def sum_sign_data(samples: int, features: int, seed: int, image: int = 0) -> tuple[Tensor, Tensor]:
    """The classic task: ``x ~ N(0, 1)^features``, label ``sum(x) > 0`` (float, for BCE).

    With ``image > 0`` the inputs are ``1 x image x image`` maps (``features`` is ignored).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (samples, 1, image, image) if image else (samples, features)
    x = torch.randn(shape, generator=generator)
    y = (x.flatten(1).sum(dim=1) > 0).float().unsqueeze(1)
    return x, y


def first_token_data(samples: int, steps: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """Remember the first token: token 0 or 1 at ``t = 0``, then ``steps - 1`` distractors; label = first.

    Distractors are drawn from tokens ``2 .. vocab - 1``, so the only information about the label is
    ``steps - 1`` time steps away from the prediction.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (samples,), generator=generator)
    tokens = torch.randint(2, vocab, (samples, steps), generator=generator)
    tokens[:, 0] = labels
    return tokens, labels


def loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process DataLoader over tensors (seeded shuffling)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


# ----------------------------------------------------------------------------------- Lightning module
class Classifier(L.LightningModule):
    """Binary classifier (BCE with logits) that keeps accuracy and loss per epoch in :attr:`epochs`.

    Args:
        model: Any module returning one logit per sample.
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"``.
        lr: Learning rate.
    """

    def __init__(self, model: nn.Module, optimizer: str = "sgd", lr: float = 0.01) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr
        self.epochs: list[dict[str, float]] = []
        self._train_correct = 0.0
        self._train_seen = 0
        self._train_loss = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        self._train_correct += float(((logits > 0).float() == y).sum())
        self._train_seen += len(y)
        self._train_loss += float(loss.detach()) * len(y)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_correct, self._train_seen, self._train_loss = 0.0, 0, 0.0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        x, y = batch
        logits = self(x)
        row = {
            "epoch": float(self.current_epoch + 1),
            "train_acc": self._train_correct / max(1, self._train_seen),
            "train_loss": self._train_loss / max(1, self._train_seen),
            "val_acc": float(((logits > 0).float() == y).float().mean()),
            "val_loss": float(nn.functional.binary_cross_entropy_with_logits(logits, y)),
        }
        self.epochs.append(row)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def decades(values: Tensor | Any) -> float:
    """``log10`` of a positive number, ``nan`` otherwise (helper for tables)."""
    value = float(values)
    return math.log10(value) if value > 0 and math.isfinite(value) else float("nan")
