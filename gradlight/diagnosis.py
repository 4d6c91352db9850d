"""Diagnosis: say what is wrong with the gradient flow, where, since when, why, and what usually fixes it.

:class:`GradientDiagnosis` is Trainer-free. Feed it each logged step's :class:`~gradlight.tracker.StepRecord`
(plus the step's :class:`~gradlight.activations.ActivationStats` and loss when known) through
:meth:`GradientDiagnosis.update`; it returns the *new* :class:`Finding` objects. Each finding is reported
once per kind and layer. Kinds (see :data:`KINDS`, thresholds in :class:`DiagnosisConfig`):

* ``vanishing``: a layer's gradient L2 stays orders of magnitude below the reference layers' (the last
  layers in forward order), or the early-to-late ratio falls by several decades within a window.
* ``exploding``: the global or a layer's gradient norm grows by a large factor over its median in a window,
  passes an absolute threshold (global or per layer, both off by default), or stays far above the
  gradient-clipping value.
* ``non_finite``: a gradient holds NaN/Inf; the finding names the layer closest to the loss (highest depth).
* ``dormant``: a layer's parameters barely move (``update_ratio``) for a window while the loss still
  changes.
* ``saturated`` / ``dead_units``: from activation taps, a large fraction of saturating-activation outputs in
  the flat region, or of ReLU-family units never active on a whole batch.

Causes and remedies come from :data:`RULES`, a small rule table evaluated against a :class:`ModelProfile`
(computed once from the model: activation types, normalisation layers, residual structure, recurrent
modules, initial weight scale versus He/Xavier) and the finding's evidence.

Findings are appended to ``findings.jsonl`` (:class:`FindingsWriter`) and read back with
:func:`load_findings`.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor, nn

from gradlight.activations import DEAD_KINDS, SATURATING_KINDS, ActivationStats, activation_kind
from gradlight.stats import local_tensor
from gradlight.tracker import StepRecord

__all__ = [
    "ACTIONS",
    "FINDINGS_FILE",
    "KINDS",
    "RULES",
    "DiagnosisConfig",
    "Finding",
    "FindingsWriter",
    "GradientAnomalyError",
    "GradientDiagnosis",
    "ModelProfile",
    "Rule",
    "load_findings",
    "resolve_actions",
]

#: Finding kinds.
KINDS = ("vanishing", "exploding", "non_finite", "dormant", "saturated", "dead_units")
#: What the monitor does about a finding.
ACTIONS = ("warn", "raise", "stop", "ignore")
#: File name of the findings log inside the monitor's ``save_dir``.
FINDINGS_FILE = "findings.jsonl"
#: ``layer`` of findings about the whole model (same as the history's global layer name).
GLOBAL = "__global__"


class GradientAnomalyError(RuntimeError):
    """Raised by the monitor for findings whose action is ``"raise"``.

    Attributes:
        findings: The findings that triggered it.

    Example:
        >>> monitor = GradientFlowMonitor(on_anomaly={"non_finite": "raise"})  # doctest: +SKIP
        >>> try:  # doctest: +SKIP
        ...     trainer.fit(model)
        ... except GradientAnomalyError as error:
        ...     print(error.findings[0].layer, error.findings[0].step)
    """

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("\n".join(f.message for f in self.findings) or "gradient anomaly")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class DiagnosisConfig:
    """Thresholds of the diagnosis. Windows and patiences count *logged* steps, not optimizer steps.

    Attributes:
        reference_layers: The gradient of the last this-many layers (forward order) is the reference a
            layer's gradient is compared to. More layers average out a noisy head; a reference that reaches
            into the body hides vanishing in the body's last layers.
        vanishing_ratio: A layer vanishes when its gradient L2 is below this fraction of the reference
            (``1e-3``: three decades). Lower flags only severe cases; higher (``1e-2``) also flags the
            ordinary spread between the head and the stem of healthy deep nets.
        vanishing_patience: Logged steps the ratio must stay below ``vanishing_ratio`` before it is
            reported. Higher ignores transients (a spike in the head's gradient) but reports later.
        trend_window: Logged steps over which the early-to-late ratio trend is measured.
        trend_decades: Report vanishing when ``early_late_ratio`` falls by at least this many decades within
            ``trend_window`` logged steps (early layers losing their gradient while training).
        exploding_factor: Report exploding when the global or a layer's gradient L2 is this many times its
            median over the previous ``exploding_window`` logged steps. Lower reports earlier, but per-batch
            norms are heavy-tailed (a well-fitted batch has a near-zero gradient, the next normal one is
            100x larger): on healthy runs the largest ratio to the median of the previous 10 steps measured
            47 (docs/diagnosis.md), so factors much below 100 report spikes, not blow-ups.
        exploding_window: Logged steps the growth factor looks back over; their median is the baseline, so
            near-zero batches in up to 4 of 10 steps leave it unchanged. The median of a steadily growing
            window is its middle value: growth of ``r`` per logged step reads as about ``r ** (window / 2)``.
            Longer windows tolerate more dips and catch slower growth, but compare with older norms, which
            may sit at another scale (norms usually fall early in training). Sudden blow-ups are reported at
            once either way.
        exploding_norm: Also report when the global gradient L2 exceeds this absolute value. ``None`` (off)
            by default: healthy norms depend on the loss' scale (sum- versus mean-reduced losses) and the
            model's size, so a useful value comes from a healthy run of the same model.
        exploding_layer_norm: Also report when any single layer's gradient L2 exceeds this absolute value
            (the layer with the largest norm is named). ``None`` (off) by default, for the same reason as
            ``exploding_norm``; per layer it catches one layer blowing up while the global norm, dominated by
            larger layers, still looks normal, but it needs a value that fits every layer of the model.
        exploding_min_share: A growing layer is reported only if its gradient L2 is at least this fraction of
            the largest layer's: a tiny gradient recovering from ~0 (e.g. behind a zero-initialised head)
            grows by large factors without being a blow-up.
        clip_factor: With gradient clipping on, report exploding when the pre-clip norm (``"norm"``
            clipping) or largest gradient element (``"value"`` clipping) is at least this many times the
            clip value for ``clip_patience`` logged steps: clipping is then hiding a blow-up, not trimming
            spikes.
        clip_patience: See ``clip_factor``.
        dormant_update_ratio: A layer is dormant while ``update_ratio`` (update L2 / parameter L2) stays
            below this. Healthy SGD layers move ~1e-3 per step; ``1e-6`` flags layers that effectively do
            not train (learning rate 0, frozen by accident) without flagging slowly converging ones.
        dormant_relative: ...and below this fraction of the median ``update_ratio`` of all layers at that step:
            a dormant *section* sits still while the rest of the model moves. Without it a converged run,
            where every layer's update is tiny and the loss is near zero (so its relative change is large),
            is reported as dormant. ``1`` checks the absolute threshold only.
        dormant_window: Logged steps a layer must stay below ``dormant_update_ratio``.
        dormant_loss_change: ...while the loss' range over those steps is at least this fraction of its
            mean magnitude (the rest of the model still trains). ``0`` reports dormancy even when the whole
            run has converged.
        saturated_fraction: Report an activation site when at least this fraction of its outputs are in the
            flat region (see ``saturation_derivative``). Sites that feed no layer (an output sigmoid) are not
            reported: confident predictions saturate them by design.
        dead_fraction: Report a ReLU-family site when at least this fraction of its units were zero for the
            whole batch. A few dead units are normal; half of a layer is capacity thrown away.
        activation_patience: Logged steps a site must stay above the saturated/dead fraction.
        scaled_non_finite_patience: Under a dynamic loss scaler (fp16 AMP) an overflow is routine (the
            scaler skips the step and lowers its scale): non-finite gradients are reported only when they
            persist for this many consecutive logged steps. Without a scaler they are reported at once.
        saturation_derivative: Used by the activation taps: an output counts as saturated where the
            activation's derivative is below this fraction of its peak (0.05: sigmoid ``|x| > 4.4``).
        deep_stack_layers: A model with at least this many parameter layers and no residual structure is a
            "deep plain stack" for the cause rules.
        init_scale_tolerance: A weight's initial standard deviation counts as tiny (huge) when it is more
            than this factor below (above) both the He and the Xavier expectation for its fan-in/fan-out.
        max_layers_in_evidence: Cap on per-layer entries stored in a finding's evidence.

    Example:
        >>> DiagnosisConfig(vanishing_ratio=1e-4, vanishing_patience=5).vanishing_patience
        5
    """

    reference_layers: int = 2
    vanishing_ratio: float = 1e-3
    vanishing_patience: int = 3
    trend_window: int = 10
    trend_decades: float = 2.0
    exploding_factor: float = 100.0
    exploding_window: int = 10
    exploding_norm: float | None = None
    exploding_layer_norm: float | None = None
    exploding_min_share: float = 0.01
    clip_factor: float = 10.0
    clip_patience: int = 3
    dormant_update_ratio: float = 1e-6
    dormant_relative: float = 0.01
    dormant_window: int = 5
    dormant_loss_change: float = 0.01
    saturated_fraction: float = 0.5
    dead_fraction: float = 0.5
    activation_patience: int = 2
    scaled_non_finite_patience: int = 3
    saturation_derivative: float = 0.05
    deep_stack_layers: int = 8
    init_scale_tolerance: float = 4.0
    max_layers_in_evidence: int = 16

    def __post_init__(self) -> None:
        for name in (
            "reference_layers",
            "vanishing_patience",
            "trend_window",
            "exploding_window",
            "clip_patience",
            "dormant_window",
            "activation_patience",
            "scaled_non_finite_patience",
            "deep_stack_layers",
            "max_layers_in_evidence",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiagnosisConfig `{name}` must be a positive int, got {value!r}.")
        for name, low, high in (
            ("vanishing_ratio", 0.0, 1.0),
            ("saturated_fraction", 0.0, 1.0),
            ("dead_fraction", 0.0, 1.0),
            ("exploding_min_share", 0.0, 1.0),
            ("saturation_derivative", 0.0, 1.0),
            ("dormant_relative", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"DiagnosisConfig `{name}` must be in ({low}, {high}], got {value!r}.")
        for name in ("trend_decades", "dormant_update_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"DiagnosisConfig `{name}` must be > 0, got {value!r}.")
        for name in ("exploding_factor", "clip_factor", "init_scale_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 1:
                raise ValueError(f"DiagnosisConfig `{name}` must be > 1, got {value!r}.")
        if not isinstance(self.dormant_loss_change, (int, float)) or self.dormant_loss_change < 0:
            raise ValueError(f"DiagnosisConfig `dormant_loss_change` must be >= 0, got {self.dormant_loss_change!r}.")
        for name in ("exploding_norm", "exploding_layer_norm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"DiagnosisConfig `{name}` must be > 0 or None, got {value!r}.")


def resolve_actions(on_anomaly: str | Mapping[str, str]) -> dict[str, str]:
    """Expand ``on_anomaly`` into one action per kind, validating it.

    Args:
        on_anomaly: One of :data:`ACTIONS` for every kind, or a mapping ``kind -> action`` with an optional
            ``"default"`` entry (``"warn"`` if missing).

    Raises:
        ValueError: On an unknown action or kind.

    Example:
        >>> resolve_actions({"non_finite": "raise", "default": "warn"})["non_finite"]
        'raise'
    """
    if isinstance(on_anomaly, str):
        if on_anomaly not in ACTIONS:
            raise ValueError(f"`on_anomaly` must be one of {ACTIONS} or a mapping, got {on_anomaly!r}.")
        return dict.fromkeys(KINDS, on_anomaly)
    if not isinstance(on_anomaly, Mapping):
        raise ValueError(f"`on_anomaly` must be one of {ACTIONS} or a mapping kind -> action, got {on_anomaly!r}.")
    for key, value in on_anomaly.items():
        if key not in (*KINDS, "default"):
            raise ValueError(f"`on_anomaly` key {key!r} is not a finding kind; valid keys: {(*KINDS, 'default')}.")
        if value not in ACTIONS:
            raise ValueError(f"`on_anomaly[{key!r}]` must be one of {ACTIONS}, got {value!r}.")
    default = on_anomaly.get("default", "warn")
    return {kind: on_anomaly.get(kind, default) for kind in KINDS}


# ----------------------------------------------------------------------------------------------- profile
_NORM_PATTERN = re.compile(r"norm", re.IGNORECASE)
_RESIDUAL_PATTERN = re.compile(
    r"(res(net|idual|block)?\b|^res|residual|bottleneck|basicblock|shortcut|skip|transformer|^c2f|^c3|psa)",
    re.IGNORECASE,
)
_RESIDUAL_FLAGS = ("add", "shortcut", "residual", "use_residual", "downsample")


@dataclass
class ModelProfile:
    """What the cause rules know about a model, computed once by :meth:`from_model`.

    Attributes:
        activations: Activation kind -> number of modules.
        saturating: Saturating activation kinds present (sigmoid, tanh, ...).
        normalization: Class names of normalisation layers present.
        residual: Whether residual structure was detected (by module class names such as ``Bottleneck``,
            ``BasicBlock``, ``*Residual*``, ``Transformer*``, ``C2f``/``C3*``, or truthy ``add``/``shortcut``
            attributes); a heuristic, overridable by editing the profile.
        residual_evidence: The modules that made ``residual`` true (at most a few).
        recurrent: Class names of recurrent modules present.
        plain_recurrent: Whether an ungated RNN (``nn.RNN``/``nn.RNNCell``) is present.
        num_layers: Number of modules that own parameters.
        init_small: Modules whose weight std is far below He and Xavier (see ``init_scale_tolerance``).
        init_large: Modules whose weight std is far above He and Xavier.

    Example:
        >>> profile = ModelProfile.from_model(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1)))
        >>> profile.saturating, profile.normalization, profile.residual
        (['sigmoid'], [], False)
    """

    activations: dict[str, int] = field(default_factory=dict)
    saturating: list[str] = field(default_factory=list)
    normalization: list[str] = field(default_factory=list)
    residual: bool = False
    residual_evidence: list[str] = field(default_factory=list)
    recurrent: list[str] = field(default_factory=list)
    plain_recurrent: bool = False
    num_layers: int = 0
    init_small: list[str] = field(default_factory=list)
    init_large: list[str] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: nn.Module, init_scale_tolerance: float = 4.0) -> ModelProfile:
        """Profile ``model`` (its current weights are taken as the initial scale)."""
        profile = cls()
        norms: set[str] = set()
        recurrent: set[str] = set()
        for name, module in model.named_modules():
            kind = activation_kind(module)
            if kind is not None:
                profile.activations[kind] = profile.activations.get(kind, 0) + 1
            cls_name = type(module).__name__
            if _NORM_PATTERN.search(cls_name):  # BatchNorm*, LayerNorm, GroupNorm, RMSNorm, InstanceNorm*
                norms.add(cls_name)
            if isinstance(module, nn.RNNBase | nn.RNNCellBase):
                recurrent.add(cls_name)
                if isinstance(module, nn.RNN | nn.RNNCell):
                    profile.plain_recurrent = True
            if name and _looks_residual(module) and len(profile.residual_evidence) < 3:
                profile.residual_evidence.append(f"{name} ({cls_name})")
            if any(p.requires_grad for p in module.parameters(recurse=False)):  # trainable layers only
                profile.num_layers += 1
                scale = _init_scale(module)
                if scale is not None:
                    to_larger, to_smaller = scale  # std / max(He, Xavier), std / min(He, Xavier)
                    if to_smaller * init_scale_tolerance < 1.0:  # below both by more than the tolerance
                        profile.init_small.append(name)
                    elif to_larger > init_scale_tolerance:  # above both by more than the tolerance
                        profile.init_large.append(name)
        profile.saturating = sorted(k for k in profile.activations if k in SATURATING_KINDS)
        profile.normalization = sorted(norms)
        profile.recurrent = sorted(recurrent)
        profile.residual = bool(profile.residual_evidence)
        return profile


def _looks_residual(module: nn.Module) -> bool:
    if _RESIDUAL_PATTERN.search(type(module).__name__):
        return True
    return any(getattr(module, flag, None) is True for flag in _RESIDUAL_FLAGS)


def _init_scale(module: nn.Module) -> tuple[float, float] | None:
    """``(std / max(He, Xavier), std / min(He, Xavier))`` of a Linear/Conv weight, else ``None``."""
    if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
        return None
    weight = module.weight
    if weight.dim() < 2 or local_tensor(weight).numel() < 16 or weight.is_meta or not _holds_its_data(weight):
        return None
    receptive = math.prod(weight.shape[2:])
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    std = float(local_tensor(weight.detach()).float().std())  # a DTensor's local shard: no collective
    he = math.sqrt(2.0 / fan_in)
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    return std / max(he, xavier), std / min(he, xavier)


def _holds_its_data(tensor: Tensor) -> bool:
    """Whether ``tensor``'s storage really holds its elements.

    FSDP1 with ``use_orig_params=False`` leaves views into a freed flat parameter outside forward: reading
    them crashes the process instead of raising.
    """
    local = local_tensor(tensor.detach())
    if local.numel() == 0:
        return True
    last = local.storage_offset() + sum((size - 1) * stride for size, stride in zip(local.shape, local.stride()))
    return local.untyped_storage().nbytes() >= (last + 1) * local.element_size()


# ------------------------------------------------------------------------------------------------- rules
@dataclass
class _Context:
    kind: str
    profile: ModelProfile
    evidence: dict[str, Any]
    config: DiagnosisConfig


@dataclass(frozen=True)
class Rule:
    """One row of the cause/remedy table.

    Attributes:
        id: Short identifier, stored in a finding's ``evidence["rules"]``.
        kinds: Finding kinds the rule can explain.
        applies: Predicate on the finding's context (kind, model profile, evidence, config).
        cause: Cause text; ``{...}`` fields are filled from ``describe(context)``.
        remedy: What usually fixes it.
        describe: Values for the ``cause`` template.
    """

    id: str
    kinds: tuple[str, ...]
    applies: Callable[[_Context], bool]
    cause: str
    remedy: str
    describe: Callable[[_Context], dict[str, Any]] = lambda context: {}


def _short(names: Iterable[str], limit: int = 3) -> str:
    items = list(names)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


#: The cause/remedy table, in priority order (documented in docs/diagnosis.md).
RULES: tuple[Rule, ...] = (
    Rule(
        "loss_non_finite",
        ("non_finite",),
        lambda c: c.evidence.get("loss_finite") is False,
        "the loss itself is NaN/Inf (log of 0, division by 0, overflow in the loss)",
        "guard the loss (clamp log/softmax inputs, add an epsilon to divisions); use bf16 or a loss scaler",
    ),
    Rule(
        "after_exploding",
        ("non_finite",),
        lambda c: bool(c.evidence.get("after_exploding")),
        "it follows exploding gradients: the weights overflowed",
        "gradient clipping (Trainer(gradient_clip_val=1.0)) or a lower learning rate / warm-up",
    ),
    Rule(
        "backward_op",
        ("non_finite",),
        lambda c: c.evidence.get("loss_finite") is not False and not c.evidence.get("after_exploding"),
        "a NaN/Inf appeared inside the backward pass at {layer} (closest to the loss): an op with an "
        "infinite derivative (sqrt/log/pow/division at 0), fp16 overflow, or a gradient hook",
        "check that layer's forward for sqrt/log/div at 0 (add an epsilon); run one step under "
        "torch.autograd.set_detect_anomaly(True) to name the op",
        lambda c: {"layer": c.evidence.get("layer", "?")},
    ),
    Rule(
        "saturating_activation",
        ("vanishing", "saturated"),
        lambda c: bool(c.evidence.get("saturating_downstream") or c.profile.saturating),
        "saturating activations ({acts}) between the layer and the loss: their derivative is at most "
        "0.25 (sigmoid) or 1 (tanh) and near 0 when saturated, so each one shrinks the gradient",
        "use a non-saturating activation in hidden layers (ReLU, SiLU/GELU)",
        lambda c: {"acts": _short(c.evidence.get("saturating_downstream") or c.profile.saturating)},
    ),
    Rule(
        "no_normalization",
        ("vanishing", "exploding", "saturated", "dead_units"),
        lambda c: not c.profile.normalization,
        "no normalisation layers: activation and gradient scales drift from layer to layer",
        "add BatchNorm (CNNs) or LayerNorm (transformers, MLPs, RNNs) before the activations",
    ),
    Rule(
        "deep_plain_stack",
        ("vanishing", "exploding"),
        lambda c: not c.profile.residual and c.profile.num_layers >= c.config.deep_stack_layers,
        "a deep plain stack ({layers} parameter layers, no residual connections): the gradient is a "
        "product of one Jacobian per layer",
        "add residual (skip) connections",
        lambda c: {"layers": c.profile.num_layers},
    ),
    Rule(
        "recurrent_chain",
        ("vanishing", "exploding"),
        lambda c: c.profile.plain_recurrent,
        "an ungated recurrent chain ({modules}): the same weights multiply the gradient once per time step",
        "use gated cells (LSTM/GRU), truncate backpropagation through time, clip gradients",
        lambda c: {"modules": _short(c.profile.recurrent)},
    ),
    Rule(
        "init_small",
        ("vanishing", "dead_units"),
        lambda c: bool(c.profile.init_small),
        "initial weights far below the He/Xavier scale ({modules})",
        "He (Kaiming) init for ReLU-family layers, Xavier (Glorot) for tanh/sigmoid layers",
        lambda c: {"modules": _short(c.profile.init_small)},
    ),
    Rule(
        "init_large",
        ("exploding", "saturated", "non_finite"),
        lambda c: bool(c.profile.init_large),
        "initial weights far above the He/Xavier scale ({modules})",
        "He (Kaiming) init for ReLU-family layers, Xavier (Glorot) for tanh/sigmoid layers",
        lambda c: {"modules": _short(c.profile.init_large)},
    ),
    Rule(
        "clipping_hides_growth",
        ("exploding",),
        lambda c: "clip_ratio" in c.evidence,
        "gradient clipping is hiding a blow-up: the pre-clip value is {ratio:.0f}x the clip value",
        "lower the learning rate (clipping only bounds the step, not the cause)",
        lambda c: {"ratio": float(c.evidence.get("clip_ratio", 0.0))},
    ),
    Rule(
        "learning_rate",
        ("exploding", "non_finite", "dead_units"),
        lambda c: True,
        "a learning rate too high for the loss' curvature: updates overshoot and weights and gradients grow",
        "gradient clipping (Trainer(gradient_clip_val=...)) or a lower learning rate / warm-up",
    ),
    Rule(
        "optimizer_does_not_move",
        ("dormant",),
        lambda c: not c.evidence.get("starved"),
        "the layer receives gradient but its parameters do not move: learning rate 0 for its parameter "
        "group, a scheduler at 0, or weights reset after each step",
        "check the optimizer's param groups and LR schedule; if the layer is meant to be frozen, set "
        "requires_grad=False (or exclude it from the monitor)",
    ),
    Rule(
        "starved",
        ("dormant",),
        lambda c: bool(c.evidence.get("starved")),
        "it barely receives gradient (its gradient is below the vanishing threshold)",
        "fix the vanishing gradient (see the vanishing finding's remedy)",
    ),
    Rule(
        "dead_relu",
        ("dead_units",),
        lambda c: True,
        "pre-activations stuck below zero (a large negative bias, a learning-rate spike, or poor init): "
        "dead ReLU units pass no gradient and never recover",
        "LeakyReLU/GELU/SiLU, a lower learning rate, zero-initialised biases, BatchNorm before the ReLU",
    ),
    Rule(
        "large_preactivations",
        ("saturated",),
        lambda c: True,
        "pre-activations far from zero push the activation into its flat region",
        "normalise before the activation (BatchNorm/LayerNorm) and use Xavier init; or a non-saturating activation",
    ),
)

_FALLBACK_REMEDY = {
    "vanishing": "residual connections, normalisation, non-saturating activations, He/Xavier init",
    "exploding": "gradient clipping or a lower learning rate",
    "non_finite": "lower the learning rate, clip gradients, guard log/div in the loss",
    "dormant": "check the optimizer's param groups and learning rates",
    "saturated": "normalisation before the activation, or a non-saturating activation",
    "dead_units": "LeakyReLU/GELU, lower learning rate, zero-initialised biases",
}


def _explain(context: _Context, limit: int = 3) -> tuple[str, str, list[str]]:
    causes: list[str] = []
    remedies: list[str] = []
    ids: list[str] = []
    for rule in RULES:
        if context.kind not in rule.kinds or not rule.applies(context):
            continue
        causes.append(rule.cause.format(**rule.describe(context)))
        if rule.remedy not in remedies:
            remedies.append(rule.remedy)
        ids.append(rule.id)
        if len(ids) >= limit:
            break
    if not causes:
        return "no structural cause found in the model profile", _FALLBACK_REMEDY[context.kind], ids
    return "; ".join(causes), "; ".join(remedies), ids


# ---------------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One diagnosed problem.

    Attributes:
        kind: One of :data:`KINDS`.
        layer: The layer (or activation site) it is about; ``"__global__"`` for the whole model.
        step: The first logged step at which the condition held.
        reported_step: The logged step at which it was reported (after the patience window).
        message: One human-readable sentence with the measured evidence.
        cause: The likely cause(s), from :data:`RULES`.
        remedy: What usually fixes it.
        evidence: The measured values (ratios, decades, norms, fractions, steps, ``rules``).
        layers: Every layer/site affected (``layer`` is the first of them).

    Example:
        >>> finding = Finding("dormant", "fc1", 5, 9, "fc1 does not move", "lr 0", "check param groups")
        >>> finding.to_dict()["layer"], finding.step
        ('fc1', 5)
    """

    kind: str
    layer: str
    step: int
    reported_step: int
    message: str
    cause: str
    remedy: str
    evidence: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``findings.jsonl`` line)."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


@dataclass
class _Growth:
    """One step's gradient norms against the exploding window (see ``GradientDiagnosis._measure_growth``)."""

    norm: float  # global gradient L2
    growth: float  # norm / baseline (1.0 without history)
    baseline: float  # median of the previous window's positive global norms
    window_min: float
    previous: int  # logged steps in that window
    layers: dict[str, float]  # layer -> its L2 over the median of its previous window
    current: dict[str, float]  # layer -> its L2 at this step

    def ranked(self) -> list[tuple[str, float]]:
        """Layers by growth, largest first."""
        return sorted(self.layers.items(), key=lambda item: -item[1])


class _LayerWindows:
    """The last ``size`` finite gradient norms of every layer, one ring buffer per column of one array.

    Equivalent to a ``deque(maxlen=size)`` per layer, with the per-layer medians taken in one numpy call
    instead of a Python loop over the layers.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.columns: dict[str, int] = {}
        self.values = np.full((size, 0), np.nan)
        self.count = np.zeros(0, dtype=np.int64)  # values ever appended per column (ring position = count % size)
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None

    def columns_of(self, layers: list[str]) -> np.ndarray:
        """Column of each layer (new layers get empty columns); cached for a repeated layer list."""
        key = tuple(layers)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        new = [name for name in dict.fromkeys(key) if name not in self.columns]
        if new:
            for name in new:
                self.columns[name] = len(self.columns)
            self.values = np.hstack([self.values, np.full((self.size, len(new)), np.nan)])
            self.count = np.concatenate([self.count, np.zeros(len(new), dtype=np.int64)])
        self._last = (key, np.fromiter((self.columns[name] for name in key), dtype=np.int64, count=len(key)))
        return self._last[1]

    def positive_medians(self, columns: np.ndarray) -> np.ndarray:
        """Median of each column's positive values (NaN where it has none), as ``statistics.median``.

        A sort puts the NaN-masked values last; the median is read at the middle of each column's valid
        prefix (``np.nanmedian`` goes through masked arrays for short axes and is ~10x slower).
        """
        window = self.values[:, columns]
        ordered = np.sort(np.where(window > 0, window, np.nan), axis=0)  # NaN sorts last
        valid = (window > 0).sum(axis=0)
        low = np.take_along_axis(ordered, np.maximum(valid - 1, 0)[None] // 2, axis=0)[0]
        high = np.take_along_axis(ordered, (valid // 2)[None], axis=0)[0]
        return np.where(valid > 0, (low + high) / 2, np.nan)

    def push(self, columns: np.ndarray, values: np.ndarray) -> None:
        """Append each finite value to its column's ring."""
        finite = np.isfinite(values)
        columns, values = columns[finite], values[finite]
        self.values[self.count[columns] % self.size, columns] = values
        self.count[columns] += 1

    def to_lists(self) -> dict[str, list[float]]:
        """``layer -> its values, oldest first`` (the state format)."""
        out = {}
        for name, column in self.columns.items():
            total = int(self.count[column])
            held = min(total, self.size)
            out[name] = [float(self.values[(total - held + k) % self.size, column]) for k in range(held)]
        return out

    @classmethod
    def from_lists(cls, size: int, lists: Mapping[str, Iterable[float]]) -> _LayerWindows:
        """Inverse of :meth:`to_lists` (older values beyond ``size`` are dropped, as a deque would)."""
        windows = cls(size)
        names = list(lists)
        columns = windows.columns_of(names)
        for name, column in zip(names, columns):
            for value in list(lists[name])[-size:]:
                windows.push(np.array([column]), np.array([float(value)]))
        return windows


# -------------------------------------------------------------------------------------------- the engine
class GradientDiagnosis:
    """Turns a stream of step records into findings. Trainer-free; deterministic given its inputs.

    Given identical inputs every rank reaches the same findings. Under DDP every rank holds the same records
    (gradients are all-reduced) and activation statistics are reduced across ranks; the loss is each rank's
    own, and only the findings that read it can differ between ranks: ``dormant`` (its loss-change gate) and
    the cause of a ``non_finite`` finding (``loss_finite``).

    Args:
        config: Thresholds; defaults to :class:`DiagnosisConfig()`.
        profile: The model profile for the cause rules (:meth:`ModelProfile.from_model`); an empty profile
            if ``None``.
        gradient_clip_val: The clip value when gradient clipping is on (``trainer.gradient_clip_val``).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.

    Example:
        >>> import torch
        >>> from gradlight.tracker import GradientFlowTracker
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(12):
        ...     layers += [nn.Linear(16, 16), nn.Sigmoid()]
        >>> net = nn.Sequential(*layers, nn.Linear(16, 1))
        >>> tracker = GradientFlowTracker(net)
        >>> diagnosis = GradientDiagnosis(profile=ModelProfile.from_model(net))
        >>> findings = []
        >>> for step in range(3):
        ...     net.zero_grad()
        ...     net(torch.randn(32, 16)).pow(2).mean().backward()
        ...     tracker.capture(step, net.parameters())
        ...     findings += diagnosis.update(tracker.finalize())
        >>> findings[0].kind, findings[0].layer, findings[0].step
        ('vanishing', '0', 0)
    """

    def __init__(
        self,
        config: DiagnosisConfig | None = None,
        profile: ModelProfile | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = "norm",
    ) -> None:
        self.config = config if config is not None else DiagnosisConfig()
        self.profile = profile if profile is not None else ModelProfile()
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.gradient_clip_algorithm = gradient_clip_algorithm or "norm"
        self.reported: set[tuple[str, str]] = set()
        self.findings_count = 0
        self.findings: list[Finding] = []  # reported by this instance (a resumed run starts empty)
        self._streaks: dict[str, dict[str, list[int]]] = {}  # rule -> layer -> [count, first step]
        self._trend: deque[tuple[int, float]] = deque(maxlen=self.config.trend_window)
        self._global_norms: deque[tuple[int, float]] = deque(maxlen=self.config.exploding_window)
        self._layer_norms = _LayerWindows(self.config.exploding_window)
        self._losses: deque[tuple[int, float]] = deque(maxlen=self.config.dormant_window)
        self._nonfinite_run = 0
        self._nonfinite_first = -1
        self._exploded = False

    # ------------------------------------------------------------------------------------ public API
    def update(
        self,
        record: StepRecord,
        activations: ActivationStats | None = None,
        loss: float | None = None,
        loss_scaled: bool = False,
    ) -> list[Finding]:
        """Digest one logged step and return the findings reported at it (each kind and layer once).

        Args:
            record: The step's gradient statistics.
            activations: The step's activation statistics, if taps are on.
            loss: The step's training loss, if known (used by the dormant rule and non-finite causes).
            loss_scaled: A dynamic loss scaler (fp16 AMP) handles overflow: it skips the step and lowers its
                scale, so non-finite gradients are reported only when they persist for
                ``scaled_non_finite_patience`` logged steps.
        """
        found: list[Finding] = []
        if loss is not None and math.isfinite(loss):
            self._losses.append((record.step, float(loss)))
        if not self._check_non_finite(record, loss, loss_scaled, found):
            reference = self._reference(record)
            self._check_vanishing(record, activations, reference, found)
            self._check_trend(record, found)
            self._check_exploding(record, found)
            self._check_dormant(record, reference, loss, found)
        if activations is not None:
            self._check_activations(activations, found)
        new = [finding for finding in found if (finding.kind, finding.layer) not in self.reported]
        for finding in new:
            self.reported.add((finding.kind, finding.layer))
            for layer in finding.layers:
                self.reported.add((finding.kind, layer))
        self.findings_count += len(new)
        self.findings.extend(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        """What was reported and the running windows, so a resumed run does not re-report."""
        return {
            "version": 1,
            "reported": sorted([kind, layer] for kind, layer in self.reported),
            "findings_count": self.findings_count,
            "streaks": {rule: dict(layers) for rule, layers in self._streaks.items()},
            "trend": list(self._trend),
            "global_norms": list(self._global_norms),
            "layer_norms": self._layer_norms.to_lists(),
            "losses": list(self._losses),
            "nonfinite_run": [self._nonfinite_run, self._nonfinite_first],
            "exploded": self._exploded,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.reported = {(str(kind), str(layer)) for kind, layer in state.get("reported", [])}
        self.findings_count = int(state.get("findings_count", 0))
        self._streaks = {
            rule: {layer: [int(v[0]), int(v[1])] for layer, v in layers.items()}
            for rule, layers in state.get("streaks", {}).items()
        }
        self._trend = deque(((int(s), float(v)) for s, v in state.get("trend", [])), self._trend.maxlen)
        self._global_norms = deque(
            ((int(s), float(v)) for s, v in state.get("global_norms", [])), self._global_norms.maxlen
        )
        self._layer_norms = _LayerWindows.from_lists(self.config.exploding_window, state.get("layer_norms", {}))
        self._losses = deque(((int(s), float(v)) for s, v in state.get("losses", [])), self._losses.maxlen)
        self._nonfinite_run, self._nonfinite_first = (int(v) for v in state.get("nonfinite_run", (0, -1)))
        self._exploded = bool(state.get("exploded", False))

    # -------------------------------------------------------------------------------------- helpers
    def _streak(self, rule: str, layer: str, holds: bool, step: int) -> tuple[int, int]:
        """Advance (or reset) a per-layer streak; returns ``(count, first step)``."""
        return self._streaks_for(rule, [layer], np.array([holds]), step)[0]

    def _streaks_for(self, rule: str, layers: list[str], holds: np.ndarray, step: int) -> list[tuple[int, int]]:
        """Advance (or reset) the streak of every layer of a step at once; ``holds`` is a boolean array.

        Returns ``(count, first step)`` per layer.
        """
        table = self._streaks.setdefault(rule, {})
        out: list[tuple[int, int]] = []
        for layer, held in zip(layers, holds.tolist()):
            if not held:
                table.pop(layer, None)
                out.append((0, step))
                continue
            entry = table.get(layer)
            if entry is None:
                entry = table[layer] = [0, step]
            entry[0] += 1
            out.append((entry[0], entry[1]))
        return out

    def _finding(self, kind: str, layer: str, step: int, record_step: int, message: str,
                 evidence: dict[str, Any], layers: list[str]) -> Finding:  # fmt: skip
        context = _Context(kind, self.profile, {**evidence, "layer": layer}, self.config)
        cause, remedy, ids = _explain(context)
        evidence = {**evidence, "rules": ids}
        return Finding(kind, layer, step, record_step, message, cause, remedy, evidence, layers)

    def _reference(self, record: StepRecord) -> tuple[float, list[str]]:
        grad = record.metrics["grad_l2"]
        count = min(self.config.reference_layers, max(1, len(record.layers) - 1))
        values = grad[-count:]
        values = values[np.isfinite(values) & (values > 0)]
        if values.size == 0:
            return float("nan"), []
        return float(np.exp(np.log(values).mean())), record.layers[-count:]

    # ------------------------------------------------------------------------------------------ kinds
    def _check_non_finite(
        self, record: StepRecord, loss: float | None, loss_scaled: bool, found: list[Finding]
    ) -> bool:
        grad = record.metrics["grad_l2"]
        counts = record.metrics.get("grad_nonfinite", np.zeros_like(grad))
        # Counts are exact NaN/Inf elements; an infinite norm of finite elements is an overflow of the norm
        # (exploding), not a non-finite gradient.
        bad = np.flatnonzero(counts > 0)
        if bad.size == 0:
            self._nonfinite_run = 0
            return False
        self._nonfinite_run += 1
        if self._nonfinite_run == 1:
            self._nonfinite_first = record.step
        needed = self.config.scaled_non_finite_patience if loss_scaled else 1
        if self._nonfinite_run != needed:
            return True  # not yet persistent (loss scaler), or the same episode continues: onset only
        position = int(bad[np.argmax(record.depths[bad])])
        layer = record.layers[position]
        evidence: dict[str, Any] = {
            "nonfinite_elements": float(counts[position]),
            "layers_nonfinite": [record.layers[i] for i in bad[: self.config.max_layers_in_evidence]],
            "num_layers_nonfinite": int(bad.size),
            "global_grad_nonfinite": float(record.global_metrics.get("global_grad_nonfinite", np.nan)),
            "depth": int(record.depths[position]),
            "after_exploding": self._exploded,
            "consecutive_logged_steps": self._nonfinite_run,
            "loss_scaled": loss_scaled,
        }
        if loss is not None:
            evidence["loss"] = float(loss)
            evidence["loss_finite"] = math.isfinite(loss)
        message = (
            f"non-finite gradient at step {record.step}: {layer} (depth {int(record.depths[position])}) is the "
            f"first layer in backward order whose gradient holds NaN/Inf "
            f"({int(counts[position])} elements); {int(bad.size)} layer(s) affected"
            + (
                f"; non-finite on every logged step since step {self._nonfinite_first}"
                if self._nonfinite_run > 1
                else ""
            )
        )
        first = self._nonfinite_first
        found.append(self._finding("non_finite", layer, first, record.step, message, evidence, [layer]))
        return True

    def _check_vanishing(
        self,
        record: StepRecord,
        activations: ActivationStats | None,
        reference: tuple[float, list[str]],
        found: list[Finding],
    ) -> None:
        config = self.config
        ref_value, ref_layers = reference
        grad = record.metrics["grad_l2"]
        candidates = len(record.layers) - len(ref_layers)
        if not math.isfinite(ref_value) or candidates < 1:
            return
        ratios = grad / ref_value
        # exactly zero is no gradient at all this step (a branch without targets, an unused path), not a
        # gradient that decayed on its way from the loss
        holds = (ratios > 0.0) & (ratios < config.vanishing_ratio)
        holds[candidates:] = False
        streaks = self._streaks_for("vanishing", record.layers, holds, record.step)
        sustained = [i for i, (count, _) in enumerate(streaks) if count >= config.vanishing_patience]
        if not sustained:
            return
        first = sustained[0]
        layer = record.layers[first]
        ratio = float(ratios[first])
        decades = -math.log10(ratio) if ratio > 0 else float("inf")
        since = self._streaks["vanishing"][layer][1]
        onset = record.layers[sustained[-1]]
        limit = config.max_layers_in_evidence
        evidence: dict[str, Any] = {
            "ratio": ratio,
            "decades": decades,
            "grad_l2": float(grad[first]),
            "reference": ref_value,
            "reference_layers": ref_layers,
            "threshold": config.vanishing_ratio,
            "patience": config.vanishing_patience,
            "onset_layer": onset,
            "num_layers": len(sustained),
            "ratios": {record.layers[i]: float(ratios[i]) for i in sustained[:limit]},
            "early_late_ratio": float(record.global_metrics.get("early_late_ratio", np.nan)),
        }
        detail = ""
        if activations is not None:
            depth = int(record.depths[first])
            downstream = sorted(
                {
                    kind
                    for kind, d in zip(activations.kinds, activations.depths)
                    if kind in SATURATING_KINDS and int(d) > depth
                }
            )
            evidence["saturating_downstream"] = downstream
            feeding = [i for i in activations.feeding(layer) if activations.kinds[i] in SATURATING_KINDS]
            if feeding:
                site = feeding[0]
                saturation = float(activations.metrics["act_saturation"][site])
                evidence["feeding_site"] = activations.sites[site]
                evidence["feeding_saturation"] = saturation
                detail = (
                    f"; {saturation:.0%} of the {activations.kinds[site]} outputs feeding it "
                    f"({activations.sites[site]}) are saturated"
                )
            between = [
                i
                for i, (kind, d) in enumerate(zip(activations.kinds, activations.depths))
                if kind in SATURATING_KINDS and int(d) > depth
            ]
            values = activations.metrics["act_saturation"][between]
            if between and np.isfinite(values).any():
                worst = between[int(np.nanargmax(values))]
                evidence["downstream_saturation_mean"] = float(np.nanmean(values))
                evidence["downstream_saturation_max"] = float(activations.metrics["act_saturation"][worst])
                evidence["downstream_saturation_site"] = activations.sites[worst]
                detail += (
                    f"; its gradient passes {len(between)} saturating activation site(s) "
                    f"({', '.join(sorted({activations.kinds[i] for i in between}))}) on the way from the loss, "
                    f"{float(np.nanmean(values)):.0%} saturated on average "
                    f"(max {evidence['downstream_saturation_max']:.0%} at {activations.sites[worst]})"
                )
        message = (
            f"vanishing gradient: layer {layer} gets {_fmt(ratio)} of the reference gradient "
            f"({', '.join(ref_layers)}), {decades:.1f} decades below, sustained since step {since}; "
            f"{len(sustained)} layer(s) below {_fmt(config.vanishing_ratio)} from {layer} to {onset}{detail}"
        )
        layers = [record.layers[i] for i in sustained]
        found.append(self._finding("vanishing", layer, since, record.step, message, evidence, layers))

    def _check_trend(self, record: StepRecord, found: list[Finding]) -> None:
        ratio = float(record.global_metrics.get("early_late_ratio", np.nan))
        if not (math.isfinite(ratio) and ratio > 0) or not record.layers:
            return
        self._trend.append((record.step, math.log10(ratio)))
        if len(self._trend) < self.config.trend_window:
            return
        (first_step, first), (_, last) = self._trend[0], self._trend[-1]
        drop = first - last
        if drop < self.config.trend_decades:
            return
        layer = record.layers[0]
        evidence = {
            "trend_decades": drop,
            "early_late_ratio": ratio,
            "early_late_ratio_before": 10.0**first,
            "window_steps": [first_step, record.step],
            "ratio": ratio,
            "decades": -math.log10(ratio),
        }
        message = (
            f"vanishing gradient trend: the early-to-late gradient ratio fell {drop:.1f} decades "
            f"(from {_fmt(10.0**first)} to {_fmt(ratio)}) between steps {first_step} and {record.step}; "
            f"the first layer {layer} is losing its gradient"
        )
        found.append(self._finding("vanishing", layer, first_step, record.step, message, evidence, [layer]))

    def _check_exploding(self, record: StepRecord, found: list[Finding]) -> None:
        config = self.config
        growth = self._measure_growth(record)
        finite = [value for value in growth.current.values() if math.isfinite(value)]
        floor = config.exploding_min_share * max(finite, default=0.0)
        # a layer counts once it matters at the model's scale (not a tiny gradient recovering from ~0)
        growing = {
            name: factor
            for name, factor in growth.layers.items()
            if factor >= config.exploding_factor and growth.current[name] >= floor
        }
        limit = config.exploding_layer_norm
        over = {name: value for name, value in growth.current.items() if limit is not None and value > limit}
        over_norm = config.exploding_norm is not None and growth.norm > config.exploding_norm
        exceeded = over_norm or growth.growth >= config.exploding_factor
        clip_ratio = self._clip_ratio(record)
        clip_count = 0
        if clip_ratio is not None:
            clip_count, _ = self._streak("clip", GLOBAL, clip_ratio >= config.clip_factor, record.step)
        clipped = clip_count >= config.clip_patience
        if not (exceeded or growing or over or clipped):
            return
        self._exploded = True
        relevant = [name for name, _ in growth.ranked() if growth.current[name] >= floor]
        layer = GLOBAL  # the clipping rule, or no per-layer history yet
        if growing:
            layer = max(growing, key=lambda name: growing[name])
        elif over:
            layer = max(over, key=lambda name: over[name])  # the largest layer above the absolute threshold
        elif exceeded and relevant:
            layer = relevant[0]  # the layer that grew most among those that matter
        since = record.step
        if clipped and not (exceeded or growing or over):
            since = self._streaks["clip"][GLOBAL][1]
        evidence, message = self._exploding_evidence(record.step, growth, layer, over, over_norm, clip_ratio)
        layers = list(dict.fromkeys([layer, *growing, *over]))
        found.append(self._finding("exploding", layer, since, record.step, message, evidence, layers))

    def _measure_growth(self, record: StepRecord) -> _Growth:
        """The global and per-layer norms over their window medians; then add this step to the windows."""
        norm = float(record.global_metrics.get("global_grad_l2", np.nan))
        history = [value for _, value in self._global_norms if value > 0]
        baseline = statistics.median(history) if history else float("nan")  # small lists: no numpy overhead
        if math.isfinite(norm):
            self._global_norms.append((record.step, norm))
        values = np.asarray(record.metrics["grad_l2"], dtype=np.float64)
        current = dict(zip(record.layers, values.tolist()))
        columns = self._layer_norms.columns_of(record.layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            factors = values / self._layer_norms.positive_medians(columns)
        compared = ~np.isnan(factors)  # the layer had a previous positive norm and this one is not NaN
        layers = dict(zip((name for name, kept in zip(record.layers, compared) if kept), factors[compared].tolist()))
        self._layer_norms.push(columns, values)
        growth = norm / baseline if history and not math.isnan(norm) else 1.0
        window_min = min(history) if history else float("nan")
        return _Growth(norm, growth, baseline, window_min, len(history), layers, current)

    def _exploding_evidence(
        self,
        step: int,
        growth: _Growth,
        layer: str,
        over: dict[str, float],
        over_norm: bool,
        clip_ratio: float | None,
    ) -> tuple[dict[str, Any], str]:
        """The evidence and message of an exploding finding."""
        config = self.config
        evidence: dict[str, Any] = {
            "global_grad_l2": growth.norm,
            "growth": growth.growth,
            "window": config.exploding_window,
            "factor": config.exploding_factor,
            "window_median": growth.baseline,
            "window_min": growth.window_min,
            "layer_growth": dict(growth.ranked()[: config.max_layers_in_evidence]),
        }
        parts = [f"global gradient L2 {_fmt(growth.norm)}"]
        if growth.previous:
            parts.append(f"{growth.growth:.0f}x its median over the previous {growth.previous} logged steps")
        if config.exploding_norm is not None:
            evidence["exploding_norm"] = config.exploding_norm
            if over_norm:
                parts.append(f"above exploding_norm {_fmt(config.exploding_norm)}")
        if layer in growth.layers:
            parts.append(f"{layer} grew {growth.layers[layer]:.0f}x")
        if config.exploding_layer_norm is not None:
            largest = sorted(over.items(), key=lambda item: -item[1])
            evidence["exploding_layer_norm"] = config.exploding_layer_norm
            evidence["layers_over_norm"] = dict(largest[: config.max_layers_in_evidence])
            if largest:
                parts.append(
                    f"{len(largest)} layer(s) above exploding_layer_norm {_fmt(config.exploding_layer_norm)} "
                    f"(largest: {largest[0][0]} at {_fmt(largest[0][1])})"
                )
        if clip_ratio is not None:
            evidence["clip_ratio"] = clip_ratio
            evidence["clip_value"] = self.gradient_clip_val
            evidence["clip_algorithm"] = self.gradient_clip_algorithm
            what = "largest gradient element" if self.gradient_clip_algorithm == "value" else "global norm"
            parts.append(f"pre-clip {what} {clip_ratio:.1f}x the clip value {self.gradient_clip_val}")
        return evidence, f"exploding gradient at step {step}: " + ", ".join(parts)

    def _clip_ratio(self, record: StepRecord) -> float | None:
        if not self.gradient_clip_val:
            return None
        key = "global_grad_max_abs" if self.gradient_clip_algorithm == "value" else "global_grad_l2"
        value = float(record.global_metrics.get(key, np.nan))
        return value / self.gradient_clip_val if math.isfinite(value) else None

    def _check_dormant(
        self,
        record: StepRecord,
        reference: tuple[float, list[str]],
        loss: float | None,
        found: list[Finding],
    ) -> None:
        config = self.config
        update = record.metrics.get("update_ratio")
        if update is None:
            return
        grad = record.metrics["grad_l2"]
        ref_value = reference[0]
        new: list[tuple[int, int]] = []
        finite = np.asarray(update, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        typical = float(np.median(finite)) if finite.size else float("nan")
        values = np.asarray(update, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            holds = (
                np.isfinite(values)
                & (values < config.dormant_update_ratio)
                & (values <= config.dormant_relative * typical)
            )
        streaks = self._streaks_for("dormant", record.layers, holds, record.step)
        for i, (name, (count, since)) in enumerate(zip(record.layers, streaks)):
            if count >= config.dormant_window and ("dormant", name) not in self.reported:
                new.append((i, since))
        if not new:
            return
        if not np.any(np.asarray(update, dtype=np.float64) >= config.dormant_update_ratio):
            return  # nothing moves (LR schedule at 0, converged): not a dormant *section*
        since = min(s for _, s in new)
        losses = [value for step, value in self._losses if step >= since]
        change = float("nan")
        if len(losses) >= 2:
            change = (max(losses) - min(losses)) / max(abs(float(np.mean(losses))), 1e-12)
            if change < config.dormant_loss_change:
                return  # the whole run is flat: converged, not a dormant section
        first, since = new[0]
        layer = record.layers[first]
        grad_ratio = float(grad[first]) / ref_value if math.isfinite(ref_value) else float("nan")
        evidence = {
            "update_ratio": float(update[first]),
            "threshold": config.dormant_update_ratio,
            "window": config.dormant_window,
            "grad_l2": float(grad[first]),
            "grad_ratio": grad_ratio,
            "starved": bool(grad_ratio < config.vanishing_ratio),
            "loss_change": change,
            "loss_known": len(losses) >= 2,
        }
        loss_text = f"while the loss changed {change:.0%}" if math.isfinite(change) else "(loss unknown)"
        message = (
            f"dormant layer: {layer}'s parameters moved {_fmt(float(update[first]))} of their norm per step "
            f"(below {_fmt(config.dormant_update_ratio)}) for {config.dormant_window} logged steps since step "
            f"{since} {loss_text}; its gradient is {_fmt(grad_ratio)} of the reference"
        )
        layers = [record.layers[i] for i, _ in new]
        found.append(self._finding("dormant", layer, since, record.step, message, evidence, layers))

    def _check_activations(self, stats: ActivationStats, found: list[Finding]) -> None:
        config = self.config
        for kind, metric, threshold, kinds in (
            ("saturated", "act_saturation", config.saturated_fraction, SATURATING_KINDS),
            ("dead_units", "act_dead", config.dead_fraction, DEAD_KINDS),
        ):
            values = stats.metrics[metric]
            new: list[tuple[int, int]] = []
            for i, site in enumerate(stats.sites):
                value = float(values[i])
                holds = stats.kinds[i] in kinds and math.isfinite(value) and value >= threshold
                if kind == "saturated" and stats.feeds[i] is None:
                    holds = False  # an output sigmoid/tanh saturates when the model is confident: not a fault
                count, since = self._streak(kind, site, holds, stats.step)
                if count >= config.activation_patience and (kind, site) not in self.reported:
                    new.append((i, since))
            if not new:
                continue
            worst, since = max(new, key=lambda item: float(values[item[0]]))
            site = stats.sites[worst]
            fraction = float(values[worst])
            evidence = {
                "fraction": fraction,
                "threshold": threshold,
                "activation": stats.kinds[worst],
                "feeds": stats.feeds[worst],
                "fractions": {stats.sites[i]: float(values[i]) for i, _ in new[: config.max_layers_in_evidence]},
                "act_mean": float(stats.metrics["act_mean"][worst]),
                "act_std": float(stats.metrics["act_std"][worst]),
            }
            what = "outputs in the flat region" if kind == "saturated" else "units dead on the whole batch"
            message = (
                f"{'saturated activations' if kind == 'saturated' else 'dead units'}: {fraction:.0%} of the "
                f"{stats.kinds[worst]} {what} at {site} (feeding {stats.feeds[worst]}), since step {since}; "
                f"{len(new)} site(s) above {threshold:.0%}"
            )
            layers = [site] + [stats.sites[i] for i, _ in new if i != worst]
            found.append(self._finding(kind, site, since, stats.step, message, evidence, layers))


# ---------------------------------------------------------------------------------------------- storage
class FindingsWriter:
    """Appends findings to ``findings.jsonl`` (one JSON object a line), flushed and fsynced per batch.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> FindingsWriter(d).append([Finding("dormant", "fc1", 5, 9, "msg", "cause", "remedy")])
        >>> load_findings(d)[["kind", "layer", "step"]].values.tolist()
        [['dormant', 'fc1', 5]]
    """

    def __init__(self, save_dir: str | Path) -> None:
        self.path = Path(save_dir) / FINDINGS_FILE

    def append(self, findings: Iterable[Finding]) -> None:
        """Write ``findings`` and make them durable."""
        lines = [json.dumps(finding.to_dict(), default=str) for finding in findings]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as sink:
            sink.write("\n".join(lines) + "\n")
            sink.flush()
            os.fsync(sink.fileno())


_FINDING_COLUMNS = [f.name for f in fields(Finding)]


def load_findings(path: str | Path) -> pd.DataFrame:
    """Load the findings of a monitored run.

    Args:
        path: The monitor's ``save_dir`` or the ``findings.jsonl`` file itself.

    Returns:
        One row per finding with the columns ``kind, layer, step, reported_step, message, cause, remedy,
        evidence, layers`` (``evidence`` is a dict), sorted by ``reported_step``. A run resumed from an older
        checkpoint may have written a finding twice; the last copy is kept. An empty frame if there is no
        findings file (no finding yet). A torn last line (writer killed mid-write) is skipped with a warning.

    Example:
        >>> findings = load_findings("runs/exp1/gradlight")  # doctest: +SKIP
        >>> findings[findings.kind == "vanishing"][["layer", "step", "message"]]  # doctest: +SKIP
    """
    file = Path(path)
    if file.is_dir():
        file = file / FINDINGS_FILE
    rows: list[dict[str, Any]] = []
    if file.exists():
        lines = file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                where = "last line" if number == len(lines) else f"line {number}"
                warnings.warn(f"{file}: skipped a torn {where}", stacklevel=2)
    frame = pd.DataFrame(rows, columns=_FINDING_COLUMNS)
    if frame.empty:
        return frame
    frame["step"] = frame["step"].astype("int64")
    frame["reported_step"] = frame["reported_step"].astype("int64")
    frame = frame.drop_duplicates(subset=["kind", "layer", "step"], keep="last")
    return frame.sort_values("reported_step", kind="stable", ignore_index=True)
