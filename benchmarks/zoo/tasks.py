"""Synthetic tasks with a learnable signal, and the loss each model family computes on them.

Every task makes a list of ready batches from a seeded generator (no files, no downloads) and knows how to
turn a model and a batch into a scalar loss. The signal is simple enough that a healthy model's loss falls
within a few dozen steps on CPU:

* images: each class is a fixed smooth random pattern (a 4x4 grid upsampled to the image size) plus
  per-image noise of the same scale;
* tokens: arithmetic sequences ``x[t+1] = (x[t] + k) mod V`` with a random start and ``k`` in ``{1, 2, 3}``
  per sequence (the next token follows from the last two; ``k`` is the class of a sequence);
* detection: boxes painted in a class-dependent colour on a noisy background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalLM",
    "DemoLM",
    "Detection",
    "ImageClassification",
    "MaskedLM",
    "Seq2Seq",
    "Task",
    "TokenClassification",
]

Batch = Any


class Task:
    """A data set and a loss: the interface the runner uses.

    Subclasses are frozen dataclasses; ``batches`` must be deterministic for a given ``generator`` state.
    """

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """``count`` batches drawn from ``generator``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        raise NotImplementedError

    @property
    def chance(self) -> float:
        """The loss of a uniform prediction (``ln`` of the number of classes); ``inf`` when not defined."""
        return math.inf

    def trained(self, losses: Sequence[float]) -> tuple[bool, str]:
        """Whether a run with these per-step losses trained: the mean of its last 10% of steps (at least 3) is
        below the mean of its first 10% and below :attr:`chance` (a loss that falls from a bad start to
        worse than guessing is not training).

        Example:
            >>> ImageClassification().trained([2.3, 2.2, 2.1, 1.0, 0.9, 0.8])
            (True, 'loss 2.2 -> 0.9 (chance 2.3)')
            >>> ImageClassification().trained([9.0, 8.0, 7.0, 4.0, 4.0, 4.0])[0]
            False
        """
        span = max(3, len(losses) // 10)
        first, last = float(np.mean(losses[:span])), float(np.mean(losses[-span:]))
        return last < first and last < self.chance, f"loss {first:.3g} -> {last:.3g} (chance {self.chance:.3g})"


def _arithmetic_sequences(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token sequences ``start + k * t (mod vocab)``; returns the tokens and ``k - 1`` (the class)."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    tokens = (start + step * torch.arange(length)) % vocab
    return tokens, (step.squeeze(1) - 1)


@dataclass(frozen=True)
class ImageClassification(Task):
    """Class-dependent smooth patterns plus noise; ``loss`` is the cross-entropy of ``model(images)``.

    Example:
        >>> task = ImageClassification(batch=4)
        >>> images, labels = task.batches(1, torch.Generator().manual_seed(0))[0]
        >>> tuple(images.shape), tuple(labels.shape)
        ((4, 3, 32, 32), (4,))
    """

    size: int = 32
    classes: int = 10
    batch: int = 16
    noise: float = 1.0

    @property
    def chance(self) -> float:
        """See :attr:`Task.chance`."""
        return math.log(self.classes)

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        grid = torch.randn(self.classes, 3, 4, 4, generator=generator)
        templates = F.interpolate(grid, size=(self.size, self.size), mode="bilinear", align_corners=False)
        templates = templates / templates.std()
        result = []
        for _ in range(count):
            labels = torch.randint(0, self.classes, (self.batch,), generator=generator)
            noise = torch.randn(self.batch, 3, self.size, self.size, generator=generator)
            result.append((templates[labels] + self.noise * noise, labels))
        return result

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)


@dataclass(frozen=True)
class TokenClassification(Task):
    """Classify an arithmetic token sequence by its step ``k``; ``model(tokens)`` returns logits.

    Example:
        >>> tokens, labels = TokenClassification(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> tuple(tokens.shape), int(labels.max()) < 3
        ((2, 32), True)
    """

    vocab: int = 128
    length: int = 32
    batch: int = 16

    @property
    def chance(self) -> float:
        """See :attr:`Task.chance` (3 classes: the step ``k``)."""
        return math.log(3)

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        return [_arithmetic_sequences(self.batch, self.length, self.vocab, generator) for _ in range(count)]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        tokens, labels = batch
        return F.cross_entropy(model(tokens).float(), labels)


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token prediction on arithmetic sequences for a Hugging Face ``*ForCausalLM`` (``labels=input_ids``).

    Example:
        >>> batch = CausalLM(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> tuple(batch.shape)
        (2, 32)
    """

    vocab: int = 128
    length: int = 32
    batch: int = 8

    @property
    def chance(self) -> float:
        """See :attr:`Task.chance` (a uniform guess over the vocabulary)."""
        return math.log(self.vocab)

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        return [_arithmetic_sequences(self.batch, self.length, self.vocab, generator)[0] for _ in range(count)]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        return model(input_ids=batch, labels=batch).loss.float()


@dataclass(frozen=True)
class MaskedLM(CausalLM):
    """Masked-token prediction on arithmetic sequences for a Hugging Face ``*ForMaskedLM``.

    A fraction ``mask`` of the positions is replaced by the last vocabulary id (the mask token); the labels
    are the original tokens there and ``-100`` (ignored) elsewhere. A masked token follows from its
    neighbours.

    Example:
        >>> tokens, labels = MaskedLM(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> bool(((labels == -100) | (tokens == 127)).all())
        True
    """

    mask: float = 0.15

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        result = []
        for _ in range(count):
            tokens = _arithmetic_sequences(self.batch, self.length, self.vocab, generator)[0]
            masked = torch.rand(tokens.shape, generator=generator) < self.mask
            masked[:, 0] = True  # at least one target per sequence
            labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
            result.append((torch.where(masked, torch.full_like(tokens, self.vocab - 1), tokens), labels))
        return result

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        tokens, labels = batch
        return model(input_ids=tokens, labels=labels).loss.float()


@dataclass(frozen=True)
class Seq2Seq(CausalLM):
    """Map each token to its successor (``(x + 1) mod V``), for an encoder-decoder such as T5.

    Example:
        >>> batch = Seq2Seq(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> bool(((batch + 1) % 128)[0, 0] >= 0)
        True
    """

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        return model(input_ids=batch, labels=(batch + 1) % self.vocab).loss.float()


@dataclass(frozen=True)
class DemoLM(CausalLM):
    """Lightning's demo ``Transformer(inputs, target)`` with its own loss: NLL of the log-softmax output.

    As in ``lightning.pytorch.demos.LightningTransformer``, the target is the input shifted by one token.

    Example:
        >>> inputs, target = DemoLM(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> bool((inputs[:, 1:] == target[:, :-1]).all())
        True
    """

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        result = []
        for _ in range(count):
            tokens = _arithmetic_sequences(self.batch, self.length + 1, self.vocab, generator)[0]
            result.append((tokens[:, :-1], tokens[:, 1:]))
        return result

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        inputs, target = batch
        return F.nll_loss(model(inputs, target).float(), target.reshape(-1))


@dataclass(frozen=True)
class Detection(Task):
    """Ultralytics detection batches: 1-3 boxes per image, painted in their class's colour on noise.

    ``loss`` is the ``DetectionModel``'s own loss (box, class and DFL terms, summed as Ultralytics does).

    Example:
        >>> batch = Detection(batch=2).batches(1, torch.Generator().manual_seed(0))[0]
        >>> sorted(batch), tuple(batch["img"].shape)
        (['batch_idx', 'bboxes', 'cls', 'img'], (2, 3, 64, 64))
    """

    size: int = 64
    classes: int = 3
    batch: int = 8

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`."""
        colours = torch.eye(3)[: self.classes] * 0.8 + 0.1
        result = []
        for _ in range(count):
            images = 0.2 + 0.1 * torch.rand(self.batch, 3, self.size, self.size, generator=generator)
            classes, boxes, owners = [], [], []
            for index in range(self.batch):
                for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                    size = 0.15 + 0.3 * torch.rand(2, generator=generator)
                    centre = size / 2 + (1 - size) * torch.rand(2, generator=generator)
                    cls = int(torch.randint(0, self.classes, (1,), generator=generator))
                    x0, y0 = ((centre - size / 2) * self.size).long().tolist()
                    x1, y1 = ((centre + size / 2) * self.size).long().tolist()
                    images[index, :, y0:y1, x0:x1] = colours[cls % len(colours)].view(3, 1, 1)
                    classes.append(cls)
                    boxes.append(torch.cat([centre, size]))
                    owners.append(index)
            result.append(
                {
                    "img": images,
                    "cls": torch.tensor(classes, dtype=torch.float32).view(-1, 1),
                    "bboxes": torch.stack(boxes),
                    "batch_idx": torch.tensor(owners, dtype=torch.float32),
                }
            )
        return result

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """See :meth:`Task.loss`."""
        loss, _ = model.loss(batch)  # type: ignore[operator]  # DetectionModel.loss, not a tensor attribute
        return loss.sum()

    def trained(self, losses: Sequence[float]) -> tuple[bool, str]:
        """YOLO's loss first *rises* from its value at initialisation (untrained class scores give the
        task-aligned assigner few, weak matches; as scores grow it matches more anchors and the box/DFL terms
        grow), so a detector trains when its last 10% of steps sit below the peak of the 5-step running mean.

        Example:
            >>> Detection().trained([20.0, 60.0, 90.0, 100.0, 95.0, 90.0, 70.0, 50.0, 40.0, 40.0, 40.0])
            (True, 'loss 20 -> peak 89 -> 40')
        """
        span = max(3, len(losses) // 10)
        running = np.convolve(np.asarray(losses, dtype=float), np.ones(5) / 5, mode="valid")
        peak, last = float(running.max()), float(np.mean(losses[-span:]))
        return last < peak, f"loss {losses[0]:.3g} -> peak {peak:.3g} -> {last:.3g}"
