"""Synthetic tasks with a learnable signal, and the loss each model family computes on them.

Every task makes a list of ready batches from a seeded generator (no files, no downloads) and knows how to
turn a model and a batch into a scalar loss. The signal is simple enough that a healthy model's loss falls
within a few dozen steps on CPU:

* images: each class is a fixed smooth random pattern (a 4x4 grid upsampled to the image size) plus
  per-image noise of the same scale;
* tokens: arithmetic sequences ``x[t+1] = (x[t] + k) mod V`` with a random start and ``k`` in ``{1, 2, 3}``
  per sequence (the next token follows from the last two; ``k`` is the class of a sequence);
* detection: boxes painted in a class-dependent colour on a noisy background;
* adversarial: points of a ring of Gaussians for a GAN, trained under Lightning's manual optimization with
  one optimizer per network (:class:`Adversarial` declares its networks in :attr:`Task.networks` and makes
  its own steps in :meth:`Task.manual_step`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Adversarial",
    "CausalLM",
    "DemoLM",
    "Detection",
    "GaussianRing",
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

    A task with :attr:`networks` is trained under Lightning's manual optimization: the runner gives each
    named sub-module of the model its own optimizer (in that order) and calls :meth:`manual_step` on every
    batch; without them, one optimizer over the whole model under automatic optimization minimises
    :meth:`loss`.
    """

    #: Sub-modules of the model that each get their own optimizer (manual optimization); ``()``: one optimizer.
    networks: ClassVar[tuple[str, ...]] = ()

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """``count`` batches drawn from ``generator``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        raise NotImplementedError

    def manual_step(self, module: Any, batch: Batch, optimizers: Sequence[Any], zero_grad: bool) -> dict[str, Tensor]:
        """One training step under manual optimization (tasks with :attr:`networks` only).

        Args:
            module: The ``LightningModule`` (``manual_backward``, ``toggle_optimizer``); ``module.model`` is the model.
            batch: One of :meth:`batches`.
            optimizers: ``module.optimizers()``, one per entry of :attr:`networks`.
            zero_grad: Whether the step zeroes each optimizer's gradients before its backward pass.

        Returns:
            The step's losses; ``"loss"`` is the one the runner's probe records.
        """
        raise NotImplementedError(f"{type(self).__name__} trains one optimizer: it has no manual step")

    def healthy(self, model: nn.Module, losses: Sequence[float], series: dict[str, list[float]]) -> tuple[bool, str]:
        """Whether a run meant to be healthy trained: :meth:`trained` on its per-step ``losses`` by default.

        ``model`` is the trained bare model; ``series`` holds the other losses a :meth:`manual_step` returned,
        per batch, by name.
        """
        return self.trained(losses)

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


@dataclass(frozen=True)
class Adversarial(Task):
    """A GAN: its generator and discriminator take turns under manual optimization, one optimizer each.

    Each batch is Lightning's GAN tutorial: the generator's step (the non-saturating loss: the discriminator
    should call its samples real), then the discriminator's (real points against the detached samples), each
    ``zero_grad``, ``manual_backward``, ``step``. ``toggle=True`` wraps each network's step in
    ``toggle_optimizer`` / ``untoggle_optimizer`` as the tutorial does; ``toggle=False`` is the ``SimpleGAN`` of
    Lightning's manual-optimization docs, which does not. Both return nothing from ``training_step``, as there.

    ``detach_fake=True`` is a bug: the generator's loss is computed on ``fake.detach()``, so the generator gets
    no gradient on any of its steps. It needs ``toggle=False``: with toggling, the discriminator's parameters
    are frozen during the generator's step, that loss has no graph and backward raises, so nothing is silent.

    Subclasses make the real data (:meth:`real`). The model has ``generator``, ``discriminator`` and ``latent``
    (the noise size), like :class:`zoo.models.GAN`.
    """

    batch: int = 64
    toggle: bool = True
    detach_fake: bool = False
    networks: ClassVar[tuple[str, ...]] = ("generator", "discriminator")

    def __post_init__(self) -> None:
        if self.toggle and self.detach_fake:
            raise ValueError(
                "`detach_fake=True` needs `toggle=False`: with toggling, the generator's loss on a detached sample "
                "has no graph and backward raises."
            )

    def real(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` real samples."""
        raise NotImplementedError

    def batches(self, count: int, generator: torch.Generator) -> list[Batch]:
        """See :meth:`Task.batches`: real samples only; the noise is drawn in each step."""
        return [self.real(self.batch, generator) for _ in range(count)]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """A GAN has no single loss to minimise: see :meth:`manual_step`."""
        raise NotImplementedError(f"{type(self).__name__} trains under manual optimization: see manual_step")

    def manual_step(self, module: Any, batch: Batch, optimizers: Sequence[Any], zero_grad: bool) -> dict[str, Tensor]:
        """See :meth:`Task.manual_step`: returns the generator's loss as ``"loss"`` and ``"d_loss"``."""
        g_opt, d_opt = optimizers
        gan = module.model
        ones, zeros = torch.ones(batch.shape[0], 1), torch.zeros(batch.shape[0], 1)
        z = torch.randn(batch.shape[0], gan.latent)
        with self._toggled(module, g_opt):
            fake = gan.generator(z)
            g_loss = F.binary_cross_entropy_with_logits(
                gan.discriminator(fake.detach() if self.detach_fake else fake), ones
            )
            _update(module, g_opt, g_loss, zero_grad)
        with self._toggled(module, d_opt):
            real_loss = F.binary_cross_entropy_with_logits(gan.discriminator(batch), ones)
            fake_loss = F.binary_cross_entropy_with_logits(gan.discriminator(fake.detach()), zeros)
            d_loss = (real_loss + fake_loss) / 2
            _update(module, d_opt, d_loss, zero_grad)
        return {"loss": g_loss.detach(), "d_loss": d_loss.detach()}

    def _toggled(self, module: Any, optimizer: Any) -> AbstractContextManager[Any]:
        return module.toggled_optimizer(optimizer) if self.toggle else nullcontext()


def _update(module: Any, optimizer: Any, loss: Tensor, zero_grad: bool) -> None:
    """``zero_grad`` (unless it is the forgotten-``zero_grad`` bug), ``manual_backward``, ``step``."""
    if zero_grad:
        optimizer.zero_grad()
    module.manual_backward(loss)
    optimizer.step()


@dataclass(frozen=True)
class GaussianRing(Adversarial):
    """The GAN literature's 2-D benchmark: ``modes`` Gaussians of std ``spread`` evenly spaced on a circle.

    A healthy GAN run (:meth:`healthy`) is one that did not collapse to a trivial state: the discriminator
    has not won (its loss over the last 10% of batches is above 0.1: a discriminator that separates real from
    fake drives it to 0, the equilibrium is ``ln 2``), the generator's samples spread like the data (their
    per-axis std within a factor of 2 of the data's: not a point, not blown apart), they are closer to the
    data than the ring's centre is (median distance to the nearest mode at most half the radius) and they cover at
    least half of the modes (a mode is covered when 1% of 4000 samples lie within 3 std of its centre).

    Example:
        >>> points = GaussianRing(batch=4).batches(1, torch.Generator().manual_seed(0))[0]
        >>> tuple(points.shape), bool(((points.norm(dim=1) - 2.0).abs() < 0.5).all())
        ((4, 2), True)
    """

    modes: int = 8
    radius: float = 2.0
    spread: float = 0.2

    @property
    def centres(self) -> Tensor:
        """The modes' centres, ``(modes, 2)``."""
        angles = torch.arange(self.modes) * (2 * math.pi / self.modes)
        return self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)

    def real(self, count: int, generator: torch.Generator) -> Tensor:
        """See :meth:`Adversarial.real`."""
        modes = torch.randint(0, self.modes, (count,), generator=generator)
        return self.centres[modes] + self.spread * torch.randn(count, 2, generator=generator)

    def fit(self, points: Tensor) -> tuple[float, int, float]:
        """Median distance to the nearest mode, modes covered, per-axis std of ``points`` (see :meth:`healthy`)."""
        nearest, mode = torch.cdist(points, self.centres).min(dim=1)
        close = mode[nearest < 3 * self.spread]
        covered = int((torch.bincount(close, minlength=self.modes) >= 0.01 * len(points)).sum())
        return float(nearest.median()), covered, float(points.std(dim=0).mean())

    def healthy(self, model: nn.Module, losses: Sequence[float], series: dict[str, list[float]]) -> tuple[bool, str]:
        """See :meth:`Task.healthy` and the class docstring."""
        span = max(3, len(losses) // 10)
        d_loss, g_loss = float(np.mean(series["d_loss"][-span:])), float(np.mean(losses[-span:]))
        latent = int(model.latent)  # type: ignore[arg-type]  # zoo.models.GAN.latent, an int
        noise = torch.randn(4000, latent, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            distance, covered, spread = self.fit(model.generator(noise))  # type: ignore[operator]
        target = float(self.real(4000, torch.Generator().manual_seed(0)).std(dim=0).mean())
        ok = d_loss > 0.1 and abs(math.log(spread / target)) < math.log(2) and distance <= self.radius / 2
        ok = ok and covered >= self.modes / 2 and math.isfinite(g_loss)
        return ok, (
            f"d loss {d_loss:.2f}, g loss {g_loss:.2f}; samples: {covered}/{self.modes} modes, median distance "
            f"to one {distance:.2f}, std {spread:.2f} (data {target:.2f})"
        )
