"""The variant grid: architecture ablation + training recipe overrides, under stable names.

A *variant* is what one run of the case study trains: a YOLO model with an :class:`Ablation` applied and
:class:`TrainingRecipe` overrides. The grid names are used everywhere (configs, tests, plots):

================== ====================================================== ===============================
name               ablation (scope backbone by default)                   recipe overrides
================== ====================================================== ===============================
intact             none                                                   Ultralytics defaults
no_residual        every ``add`` shortcut off                             Ultralytics defaults
no_bn              BatchNorm -> NoNorm + conv bias                        Ultralytics defaults
no_residual_no_bn  both of the above                                      Ultralytics defaults
sigmoid            a fresh ``nn.Sigmoid`` in every conv                   Ultralytics defaults
stripped_sigmoid   sigmoid + no residual + no BN                          Ultralytics defaults
================== ====================================================== ===============================

Every variant trains with the same recipe, so that the architecture is the only difference. The BatchNorm-free
variants used to train at ``lr0`` 0.002 with 5 warm-up epochs; the learning-rate sweep
(:mod:`casestudies.detection.sweep`, docs/case_study.md) found them at mAP50-95 0.002 or less at every ``lr0``
from 0.001 to 0.02, so a recipe of their own only confounded the comparison. ``Variant.overrides`` stays for
presets that want one.

Example:
    >>> get_variant("stripped_sigmoid").ablation.describe()
    'no_residual+no_bn+sigmoid@backbone'
    >>> get_variant("no_bn").recipe().lr0
    0.01
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from casestudies.detection.ablations import Ablation


@dataclass(frozen=True)
class TrainingRecipe:
    """Ultralytics' detection training recipe (defaults of ``ultralytics/cfg/default.yaml``), field by field.

    Attributes:
        lr0: Initial SGD learning rate. 0.01 is Ultralytics' default for training from scratch; higher learns
            faster on BN nets but diverges without normalisation.
        lrf: Final learning rate as a fraction of ``lr0`` (linear or cosine decay over the run).
        momentum: SGD momentum (Nesterov). 0.937 is Ultralytics' value.
        weight_decay: L2 on conv/linear weights only (no decay on BN and biases), scaled by
            ``batch * accumulate / nbs`` exactly as Ultralytics does.
        warmup_epochs: Epochs of linear warm-up (capped at ``max_epochs - 1``). Longer warm-up protects
            unnormalised nets from the first large steps, at the price of slower early progress.
        warmup_momentum: Momentum at the start of warm-up, raised linearly to ``momentum``.
        warmup_bias_lr: Bias learning rate at the start of warm-up, lowered linearly to ``lr0``. 0.1 helps the
            head's biases settle fast when BN normalises everything else; without BN every conv has a bias and
            a 10x larger bias step shakes the whole network.
        cos_lr: Cosine instead of linear decay from ``lr0`` to ``lr0 * lrf``.
        nbs: Nominal batch size: the weight-decay scaling refers to it. Set the Trainer's
            ``accumulate_grad_batches`` to ``nbs / batch_size`` to reproduce Ultralytics' gradient accumulation.
        ema: Keep an exponential moving average of the weights (``ultralytics.utils.torch_utils.ModelEMA``) and
            evaluate it instead of the raw weights.
        ema_decay: EMA decay, reached after about ``ema_tau`` optimizer steps (ramp ``1 - exp(-updates/tau)``).
        ema_tau: EMA ramp length in optimizer steps; short runs keep the EMA close to the raw weights.
        grad_clip_norm: Clip the global gradient norm to this value after the monitor has read the gradients
            (Ultralytics clips at 10). None disables clipping.
        box: Box (CIoU) loss gain.
        cls: Classification (BCE) loss gain.
        dfl: Distribution focal loss gain.

    Example:
        >>> TrainingRecipe().with_overrides({"lr0": 0.002}).lr0
        0.002
    """

    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    nbs: int = 64
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    grad_clip_norm: float | None = 10.0
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5

    def __post_init__(self) -> None:
        for name in ("lr0", "lrf", "nbs", "ema_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; it must be positive.")
        for name in ("weight_decay", "warmup_epochs", "warmup_bias_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; it must be 0 or more.")
        if not 0 <= self.momentum < 1 or not 0 <= self.warmup_momentum < 1:
            raise ValueError(
                f"momentum={self.momentum!r}, warmup_momentum={self.warmup_momentum!r} are not valid; use [0, 1)."
            )

    def with_overrides(self, overrides: dict[str, Any] | None) -> TrainingRecipe:
        """Return a copy with ``overrides`` applied; unknown keys are an error naming them."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"training overrides {unknown} are not valid; valid keys: {sorted(known)}.")
        return dataclasses.replace(self, **overrides)

    def loss_gains(self) -> dict[str, float]:
        """The Ultralytics cfg keys the loss reads."""
        return {"box": self.box, "cls": self.cls, "dfl": self.dfl}


@dataclass(frozen=True)
class Variant:
    """One named cell of the grid.

    Attributes:
        name: Grid name (``intact``, ``no_bn``, ...).
        ablation: What to change in the architecture.
        overrides: Training recipe overrides relative to :class:`TrainingRecipe`.
        note: One line on what to expect.
    """

    name: str
    ablation: Ablation
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def recipe(self, extra: dict[str, Any] | None = None) -> TrainingRecipe:
        """The variant's recipe, with ``extra`` overrides on top."""
        return TrainingRecipe().with_overrides({**self.overrides, **(extra or {})})


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("intact", Ablation(), note="Ultralytics' architecture and recipe."),
        Variant(
            "no_residual",
            Ablation(residual=False),
            note="Shortcuts off; C2f/C3k2 concatenations still give short gradient paths.",
        ),
        Variant(
            "no_bn",
            Ablation(batchnorm=False),
            note="No normalisation: early layers starve at default init.",
        ),
        Variant(
            "no_residual_no_bn",
            Ablation(residual=False, batchnorm=False),
            note="No shortcuts and no normalisation.",
        ),
        Variant("sigmoid", Ablation(activation="sigmoid"), note="Saturating activation, BN and shortcuts kept."),
        Variant(
            "stripped_sigmoid",
            Ablation(residual=False, batchnorm=False, activation="sigmoid"),
            note="The textbook vanishing-gradient net: sigmoid, no BN, no shortcuts.",
        ),
    )
}


def get_variant(name: str) -> Variant:
    """Return the grid variant called ``name``.

    Example:
        >>> get_variant("intact").ablation.is_identity
        True
    """
    if name not in VARIANTS:
        raise ValueError(f"variant={name!r} is not valid; use one of {tuple(VARIANTS)}.")
    return VARIANTS[name]
