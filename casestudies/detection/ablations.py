"""Explicit, composable ablations of Ultralytics YOLO detectors: residual adds, BatchNorm, activation.

Each transform edits a built :class:`ultralytics.nn.tasks.DetectionModel` in place, before training, and only
inside a *scope*:

* ``"backbone"`` (default): the layers of the YAML's ``backbone:`` section (``model.0`` .. ``model.{n-1}``);
* ``"all"``: every layer, detection head included. The head's final prediction convolutions are plain
  ``nn.Conv2d`` with a bias and no norm or activation, so no transform ever touches them.

What the transforms do and do not do:

* :func:`disable_residuals` sets ``add = False`` on every block that has an ``add`` flag (``Bottleneck``,
  ``PSABlock``, ``SPPF`` with shortcut, ...). The ``torch.cat`` of ``C2f``/``C3k2``/``C2PSA`` stays: its split
  branch still gives every block a short gradient path, so "no residual" is much milder here than in a ResNet.
* :func:`remove_batchnorm` replaces each ``Conv.bn`` by :class:`NoNorm` (an ``nn.Identity`` that folds exactly
  when Ultralytics fuses) and gives the conv a zero-initialised bias: at initialisation the network computes
  what the intact network computes in eval mode with fresh BN statistics.
* :func:`replace_activations` gives every activation its own module (``inplace=False``); Ultralytics shares
  one ``Conv.default_act`` object across all convs, which makes per-layer activation hooks ambiguous.

Parameter-owning module names stay identical across ablations (BN ones vanish, convs gain ``bias``), so
gradient histories of two variants line up layer by layer.

Example:
    >>> from ultralytics.nn.tasks import DetectionModel
    >>> model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    >>> model = Ablation(residual=False, batchnorm=False, activation="sigmoid").apply(model)
    >>> count_residual_adds(model, "backbone"), count_batchnorms(model, "backbone")
    (0, 0)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gradlight.activations import ACTIVATIONS, activation_kind, create_activation

Scope = Literal["backbone", "all"]
SCOPES: tuple[str, ...] = ("backbone", "all")


class NoNorm(nn.Identity):
    """Identity in place of ``BatchNorm2d`` that still folds when Ultralytics fuses conv and BN.

    It exposes ``running_mean = 0``, ``running_var = 1``, ``eps = 0`` and no affine parameters, so
    ``fuse_conv_and_bn`` leaves the conv unchanged. The buffers are non-persistent: they show up neither in
    the state dict nor among the parameters.

    Args:
        num_features: Channels of the BatchNorm it replaces.

    Example:
        >>> norm = NoNorm(8)
        >>> x = torch.randn(1, 8, 2, 2)
        >>> bool((norm(x) == x).all()), norm.running_var.shape
        (True, torch.Size([8]))
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = 0.0
        self.weight = None
        self.bias = None
        self.register_buffer("running_mean", torch.zeros(num_features), persistent=False)
        self.register_buffer("running_var", torch.ones(num_features), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not valid; use one of {SCOPES}.")


def backbone_length(model: nn.Module) -> int:
    """Return how many top-level layers form the backbone, read from the model's YAML.

    Args:
        model: An Ultralytics ``DetectionModel`` (it has ``.yaml`` and ``.model``).

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> backbone_length(DetectionModel("yolo11n.yaml", nc=3, verbose=False))
        11
    """
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict) or "backbone" not in yaml:
        raise ValueError(f"model of type {type(model).__name__} has no YAML backbone section; expected a YOLO model.")
    return len(yaml["backbone"])


def modules_in_scope(model: nn.Module, scope: str = "backbone") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module inside ``scope``, names as in ``model.named_modules()``.

    Args:
        model: An Ultralytics ``DetectionModel``.
        scope: ``"backbone"`` or ``"all"``.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
        >>> next(modules_in_scope(model))[0]
        'model.0'
    """
    _check_scope(scope)
    layers = model.model
    last = backbone_length(model) if scope == "backbone" else len(layers)
    for index in range(last):
        yield from layers[index].named_modules(prefix=f"model.{index}")


def disable_residuals(model: nn.Module, scope: str = "backbone") -> int:
    """Switch off every additive shortcut (any block with a boolean ``add`` flag) in ``scope``.

    Args:
        model: An Ultralytics ``DetectionModel``, edited in place.
        scope: ``"backbone"`` or ``"all"``.

    Returns:
        How many shortcuts were on and are now off.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> disable_residuals(DetectionModel("yolo11n.yaml", nc=3, verbose=False))
        7
    """
    switched = 0
    for _, module in modules_in_scope(model, scope):
        if isinstance(getattr(module, "add", None), bool) and module.add:
            module.add = False
            switched += 1
    return switched


def _conv_bn_pairs(model: nn.Module, scope: str) -> Iterator[tuple[nn.Module, nn.Conv2d, nn.BatchNorm2d]]:
    for _, module in modules_in_scope(model, scope):
        conv, norm = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            yield module, conv, norm


def remove_batchnorm(model: nn.Module, scope: str = "backbone", weight_init: str = "keep") -> int:
    """Replace each ``Conv.bn`` in ``scope`` by :class:`NoNorm` and give its conv a zero bias.

    Args:
        model: An Ultralytics ``DetectionModel``, edited in place.
        scope: ``"backbone"`` or ``"all"``.
        weight_init: ``"keep"`` leaves conv weights as built (PyTorch's default init, like the intact model;
            this is what exposes the vanishing gradients of a BN-free deep net) or ``"kaiming"`` re-draws them
            with ``kaiming_normal_`` (fan-in, ReLU gain) so activations keep their scale with depth.

    Returns:
        How many BatchNorm layers were removed.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> remove_batchnorm(DetectionModel("yolo11n.yaml", nc=3, verbose=False), scope="all")
        81
    """
    if weight_init not in ("keep", "kaiming"):
        raise ValueError(f"weight_init={weight_init!r} is not valid; use 'keep' or 'kaiming'.")
    pairs = list(_conv_bn_pairs(model, scope))
    for module, conv, norm in pairs:
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        if weight_init == "kaiming":
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        module.bn = NoNorm(norm.num_features).to(conv.weight.device)
    return len(pairs)


def replace_activations(model: nn.Module, activation: str, scope: str = "backbone") -> int:
    """Give every activation in ``scope`` a fresh, unshared ``activation`` module (``inplace=False``).

    Identity "activations" (convs built with ``act=False``) stay identities.

    Args:
        model: An Ultralytics ``DetectionModel``, edited in place.
        activation: A name from :data:`gradlight.activations.ACTIVATIONS` (``"sigmoid"``, ``"silu"``, ...).
        scope: ``"backbone"`` or ``"all"``.

    Returns:
        How many activation modules were replaced.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> replace_activations(DetectionModel("yolo11n.yaml", nc=3, verbose=False), "relu")
        36
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not valid; use one of {sorted(ACTIVATIONS)}.")
    replaced = 0
    for _, parent in list(modules_in_scope(model, scope)):
        for child_name, child in list(parent.named_children()):
            if activation_kind(child) is not None:
                setattr(parent, child_name, create_activation(activation))  # fresh, inplace=False
                replaced += 1
    return replaced


def count_residual_adds(model: nn.Module, scope: str = "all") -> int:
    """Count blocks in ``scope`` whose additive shortcut is on (``add`` is True).

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> count_residual_adds(DetectionModel("yolo11n.yaml", nc=3, verbose=False), "backbone")
        7
    """
    return sum(1 for _, m in modules_in_scope(model, scope) if getattr(m, "add", None) is True)


def count_batchnorms(model: nn.Module, scope: str = "all") -> int:
    """Count ``BatchNorm2d`` modules in ``scope``.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> count_batchnorms(DetectionModel("yolo11n.yaml", nc=3, verbose=False))
        81
    """
    return sum(1 for _, m in modules_in_scope(model, scope) if isinstance(m, nn.BatchNorm2d))


def activation_census(model: nn.Module, scope: str = "all") -> dict[str, tuple[int, int]]:
    """Map activation type name to ``(uses, distinct instances)`` in ``scope``.

    A use is one parent holding the activation as a child; Ultralytics' shared ``Conv.default_act`` shows up
    as many uses of one instance.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> activation_census(DetectionModel("yolo11n.yaml", nc=3, verbose=False), "backbone")
        {'SiLU': (36, 1)}
    """
    uses: dict[str, list[int]] = {}
    for _, parent in modules_in_scope(model, scope):
        for child in parent.children():
            if activation_kind(child) is not None:
                uses.setdefault(type(child).__name__, []).append(id(child))
    return {name: (len(ids), len(set(ids))) for name, ids in sorted(uses.items())}


@dataclass(frozen=True)
class Ablation:
    """A composable set of architecture ablations, applied in a fixed order: residual, BN, activation.

    Args:
        residual: Keep additive shortcuts (False switches every ``add`` flag off).
        batchnorm: Keep BatchNorm (False replaces it by :class:`NoNorm` plus a conv bias).
        activation: None keeps the model's activations; a name from :data:`gradlight.activations.ACTIVATIONS`
            installs a fresh module of that type in every conv.
        scope: ``"backbone"`` (default) or ``"all"``.
        weight_init: How :func:`remove_batchnorm` initialises conv weights (``"keep"`` or ``"kaiming"``).

    Example:
        >>> Ablation(residual=False, batchnorm=False, activation="sigmoid").describe()
        'no_residual+no_bn+sigmoid@backbone'
    """

    residual: bool = True
    batchnorm: bool = True
    activation: str | None = None
    scope: str = "backbone"
    weight_init: str = "keep"

    def __post_init__(self) -> None:
        _check_scope(self.scope)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not valid; use None or one of {sorted(ACTIVATIONS)}.")
        if self.weight_init not in ("keep", "kaiming"):
            raise ValueError(f"weight_init={self.weight_init!r} is not valid; use 'keep' or 'kaiming'.")

    @property
    def is_identity(self) -> bool:
        """True when applying this ablation changes nothing."""
        return self.residual and self.batchnorm and self.activation is None

    def describe(self) -> str:
        """Return a short readable name such as ``no_residual+no_bn+sigmoid@backbone``."""
        parts = [] if self.residual else ["no_residual"]
        parts += [] if self.batchnorm else ["no_bn"]
        parts += [self.activation] if self.activation else []
        return ("+".join(parts) or "intact") + f"@{self.scope}"

    def apply(self, model: nn.Module) -> nn.Module:
        """Edit ``model`` in place and return it."""
        if not self.residual:
            disable_residuals(model, self.scope)
        if not self.batchnorm:
            remove_batchnorm(model, self.scope, self.weight_init)
        if self.activation is not None:
            replace_activations(model, self.activation, self.scope)
        return model
