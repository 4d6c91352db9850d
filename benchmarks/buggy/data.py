"""Data sets of the ported programs, generated offline (nothing downloads).

* TheDeepChecker's base programs load MNIST (``baseCNN``), CIFAR-10 (``deepCNN``) and UCI auto-mpg
  (``regrNN``). Stand-ins here keep what their faults act on: images are 0-255 pixel values with a
  learnable class signal (class templates plus noise), normalised by the programs' min-max loader;
  the regression set has 9 features on mixed scales and a target in the auto-mpg range (9-47).
* AUTOTRAINER's Circle and Blob sets are regenerated the way ``AutoTrainer/data/simplednn.py`` builds them
  (scikit-learn's ``make_circles(1000, noise=0.1, random_state=1)`` and ``make_blobs(1000, centers=3,
  n_features=2, cluster_std=2, random_state=2)``, first 700 rows for training): the same recipe written with
  torch, since scikit-learn is not installed here and the repository's pickles are not copied. The points
  are the same distribution, not the same draws.
* The DeepLocalize Stack Overflow programs generate their data themselves (XOR tables, bit strings,
  ``np.random``, ``make_multilabel_classification``); the same generators are written with torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bits_permutation",
    "blobs",
    "circles",
    "images",
    "min_max",
    "multilabel",
    "regression",
    "uniform_pairs",
    "xor_table",
]


def images(n: int, size: int, channels: int, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` images of 0-255 pixel values (N, C, H, W) and their integer labels.

    Each class has a smooth random template; an image is its template plus per-pixel noise, clipped to
    [0, 255] (an MNIST/CIFAR stand-in with a signal a small CNN learns within tens of steps).

    Example:
        >>> x, y = images(8, 28, 1, 10, torch.Generator().manual_seed(0))
        >>> tuple(x.shape), float(x.min()) >= 0.0, float(x.max()) <= 255.0
        ((8, 1, 28, 28), True, True)
    """
    coarse = torch.rand(classes, channels, size // 4, size // 4, generator=generator)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randn(n, channels, size, size, generator=generator) * 0.25
    pixels = (templates[labels] + noise).clamp(0.0, 1.0) * 255.0
    return pixels.round(), labels


def min_max(x: Tensor, per_column: bool = False) -> Tensor:
    """TheDeepChecker's loader normalisation: ``(x - min) / (max - min)`` over the whole array or per column."""
    if per_column:
        low, high = x.min(dim=0).values, x.max(dim=0).values
    else:
        low, high = x.min(), x.max()
    span = torch.where(high - low == 0, torch.ones_like(high - low), high - low)
    return (x - low) / span


def regression(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """An auto-mpg stand-in: 9 raw features on mixed scales (N, 9) and a target in miles per gallon (N, 1)."""
    latent = torch.randn(n, 3, generator=generator)
    scales = torch.tensor([1.7, 190.0, 100.0, 2900.0, 15.0, 3.6, 0.4, 0.4, 0.4])
    mixing = torch.randn(3, 9, generator=generator)
    features = (latent @ mixing) * scales * 0.2 + scales
    mpg = 23.0 - 6.0 * latent[:, 0] + 2.0 * torch.tanh(latent[:, 1]) + 0.5 * torch.randn(n, generator=generator)
    return features, mpg.clamp(9.0, 47.0).unsqueeze(1)


def circles(n: int, noise: float, factor: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_circles`` recipe: an outer unit circle (label 0) and an inner one (label 1)."""
    n_out = n // 2
    n_in = n - n_out
    outer = torch.linspace(0, 2 * math.pi, n_out + 1)[:-1]
    inner = torch.linspace(0, 2 * math.pi, n_in + 1)[:-1]
    x = torch.cat([torch.stack([outer.cos(), outer.sin()], 1), factor * torch.stack([inner.cos(), inner.sin()], 1)])
    y = torch.cat([torch.zeros(n_out), torch.ones(n_in)])
    order = torch.randperm(n, generator=generator)
    x = x[order] + noise * torch.randn(n, 2, generator=generator)
    return x, y[order]


def blobs(n: int, centers: int, std: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_blobs`` recipe: centres uniform in (-10, 10)^2, Gaussian clusters, one-hot labels."""
    middle = torch.rand(centers, 2, generator=generator) * 20.0 - 10.0
    labels = torch.arange(n) % centers
    labels = labels[torch.randperm(n, generator=generator)]
    x = middle[labels] + std * torch.randn(n, 2, generator=generator)
    return x, torch.nn.functional.one_hot(labels, centers).float()


def xor_table(repeat: int = 1) -> tuple[Tensor, Tensor]:
    """The four XOR rows (Stack Overflow 31556268), ``repeat`` times."""
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).repeat(repeat, 1)
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]]).repeat(repeat, 1)
    return x, y


def bits_permutation(dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Every ``dim``-bit string and a shuffled copy of the same set as target (Stack Overflow 39217567)."""
    codes = torch.arange(2**dim)
    x = ((codes.unsqueeze(1) >> torch.arange(dim - 1, -1, -1)) & 1).float()
    return x, x[torch.randperm(2**dim, generator=generator)]


def uniform_pairs(n: int, features: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform inputs and a 0/1 target: the random data of Stack Overflow 45337371."""
    x = torch.rand(n, features, generator=generator)
    return x, (torch.rand(n, 1, generator=generator) > 0.5).float()


def multilabel(n: int, features: int, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``make_multilabel_classification`` recipe: word counts drawn from the labels' topics."""
    topics = torch.rand(classes, features, generator=generator)
    topics = topics / topics.sum(1, keepdim=True)
    labels = (torch.rand(n, classes, generator=generator) < 0.4).float()
    labels[labels.sum(1) == 0, 0] = 1.0
    mix = labels @ topics
    mix = mix / mix.sum(1, keepdim=True)
    counts = torch.distributions.Multinomial(50, probs=mix).sample()
    return counts, labels
