"""The cause/remedy table: why a finding's condition usually arises and what usually fixes it.

:data:`RULES` is data: each :class:`Rule` names the finding kinds it can explain, a predicate over the model
profile and the finding's evidence, and its cause and remedy text. :func:`explain` returns the first few rules
that apply, in table order (documented in docs/diagnosis.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.finding import short_list
from gradlight.diagnosis.profile import ModelProfile

__all__ = ["RULES", "Rule", "RuleContext", "explain"]


@dataclass
class RuleContext:
    """What a rule's predicate sees: the finding's kind, the model profile, the evidence and the config."""

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
        conclusive: When this rule applies it alone explains the finding, whatever its place in the table:
            it names the whole mechanism (a small gradient by design, clipping on every step), so structural
            guesses would mislead.
    """

    id: str
    kinds: tuple[str, ...]
    applies: Callable[[RuleContext], bool]
    cause: str
    remedy: str
    describe: Callable[[RuleContext], dict[str, Any]] = lambda context: {}
    conclusive: bool = False


#: The cause/remedy table, in priority order (documented in docs/diagnosis.md).
RULES: tuple[Rule, ...] = (
    Rule(
        "forward_origin",
        ("non_finite",),
        lambda c: bool(c.evidence.get("forward_origin") or c.evidence.get("activation_nonfinite")),
        "the forward pass produced it: {module} is the first module (in forward order) whose output held NaN/Inf "
        "(log/sqrt/division at 0 or exp overflow in it or in the code just before it, NaN in the input data, "
        "or its weights already non-finite)",
        "check {module}'s input and weights on that step's batch; guard log/sqrt/div with an epsilon, clamp exp "
        "inputs; check the data for NaN",
        lambda c: {"module": c.evidence.get("forward_origin") or c.evidence.get("activation_nonfinite")},
    ),
    Rule(
        "loss_non_finite",
        ("non_finite",),
        lambda c: c.evidence.get("loss_finite") is False and not c.evidence.get("forward_origin"),
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
        lambda c: (
            c.evidence.get("loss_finite") is not False
            and not c.evidence.get("after_exploding")
            and not c.evidence.get("forward_origin")
        ),
        "a NaN/Inf appeared inside the backward pass at {layer} (closest to the loss): an op with an "
        "infinite derivative (sqrt/log/pow/division at 0), fp16 overflow, or a gradient hook",
        "check that layer's forward for sqrt/log/div at 0 (add an epsilon); run one step under "
        "torch.autograd.set_detect_anomaly(True) to name the op",
        lambda c: {"layer": c.evidence.get("layer", "?")},
    ),
    Rule(
        "residual_gain_near_zero",
        ("vanishing",),
        lambda c: c.evidence.get("explained_by") == "residual_gain",
        "by design: the branch is scaled by a learnable residual gain near zero ({gain} = {value}), which "
        "multiplies every gradient inside it; the gradient reaches the block through the shortcut, and the "
        "branch catches up as the gain grows",
        "nothing to fix at initialisation; if the gain stays near zero, check that it is in the optimizer with "
        "a non-zero learning rate (and no weight decay pinning it at 0)",
        lambda c: {"gain": c.evidence.get("gain", "?"), "value": f"{float(c.evidence.get('gain_rms', 0.0)):.1e}"},
        conclusive=True,
    ),
    Rule(
        "gain_stays_near_zero",
        ("vanishing",),
        lambda c: c.evidence.get("explained_by") == "stuck_gain",
        "the residual gain {gain} that scales the branch is still {value} after {steps} logged steps: it does "
        "not grow, so the branch never trains",
        "give the gain a learning rate (it may be in a param group with lr 0 or excluded from the optimizer); "
        "exclude it from weight decay; or initialise it larger (LayerScale init_values 1e-4..1e-1)",
        lambda c: {
            "gain": c.evidence.get("gain", "?"),
            "value": f"{float(c.evidence.get('gain_rms', 0.0)):.1e}",
            "steps": c.evidence.get("streak", "?"),
        },
        conclusive=True,
    ),
    Rule(
        "attention_at_init",
        ("vanishing",),
        lambda c: c.evidence.get("explained_by") == "attention_logits",
        "by design: query/key projections reach the loss only through the softmax of q.k; with near-zero "
        "logits the attention is near uniform and their gradient is second order (it carries the other "
        "projection's weights as a factor), far below the value/output projections until attention sharpens",
        "nothing to fix; it is a warning only if the value/output projections of the same blocks vanish too",
        conclusive=True,
    ),
    Rule(
        "adaptive_update_moves",
        ("vanishing",),
        lambda c: c.evidence.get("explained_by") == "adaptive_update",
        "not starved: the optimizer scales each element's step by that element's own gradient scale, and the "
        "layer still moves at {fraction} of the reference layers' update ratio; behind normalisation layers "
        "({norms}) a raw gradient is divided by their input's scale and loses its component along their "
        "output, so it shrinks as the layers' outputs grow and as the task gets solved, without the layer "
        "learning less",
        "nothing to fix while the update ratio stays near its peers' ('dormant' and 'vanishing' warn if it "
        "collapses too)",
        lambda c: {
            "fraction": f"{float(c.evidence.get('update_fraction', 0.0)):.1e}",
            "norms": short_list(c.evidence.get("normalization") or c.profile.normalization),
        },
        conclusive=True,
    ),
    Rule(
        "dead_output_units",
        ("dead_units",),
        lambda c: bool(c.evidence.get("output_site")),
        "a ReLU-family activation on the model's output ({site}): an output unit that is never positive outputs 0 "
        "for every input and passes no gradient, so what the loss reads from it (a class's probability, a "
        "target) is never learned; these units were never positive since monitoring began, so no gradient has "
        "ever reached them",
        "no ReLU on the output layer: linear logits into a softmax cross-entropy, a sigmoid for probabilities, "
        "softplus for a positive target",
        lambda c: {"site": c.evidence.get("layer")},
        conclusive=True,
    ),
    Rule(
        "input_layer_saturated",
        ("saturated",),
        lambda c: c.evidence.get("input_layer") is not None,
        "the site follows the model's first layer ({layer}), so its pre-activations are the inputs times that "
        "layer's weights: inputs on a large scale (features not standardised) or large first-layer weights put "
        "it in the flat region, where its units act as thresholds of the input. No other layer's gradient "
        "passes through it, and {layer}'s own gradient carries the inputs' scale ({ratio} of the reference at "
        "this step): training goes on ('vanishing' warns if that gradient collapses)",
        "standardise the inputs (zero mean, unit variance per feature), or Xavier init for the first layer",
        lambda c: {"layer": c.evidence.get("input_layer"), "ratio": _fmt(c.evidence.get("input_layer_ratio"))},
        conclusive=True,
    ),
    Rule(
        "saturating_activation",
        ("vanishing", "saturated"),
        lambda c: bool(c.evidence.get("saturating_downstream") or c.profile.saturating),
        "saturating activations ({acts}) between the layer and the loss: their derivative is at most "
        "0.25 (sigmoid) or 1 (tanh) and near 0 when saturated, so each one shrinks the gradient",
        "use a non-saturating activation in hidden layers (ReLU, SiLU/GELU)",
        lambda c: {"acts": short_list(c.evidence.get("saturating_downstream") or c.profile.saturating)},
    ),
    Rule(
        "one_step_blowup",
        ("exploding",),
        lambda c: bool(c.evidence.get("one_step_blowup")),
        "one optimizer step rewrote the weights (a step as large as the weights themselves) and {landed}: "
        "inputs far from unit scale (e.g. 0-255 pixels), a constant or too-large initialisation, or a learning "
        "rate far too large",
        "normalise the inputs (divide pixels by 255 and standardise); He/Xavier initialisation; a lower learning "
        "rate or warm-up",
        lambda c: {
            "landed": "the gradient and the loss grew by orders of magnitude at the next step"
            if c.evidence.get("one_step_growth")
            else "the network landed where its units are dead or saturated"
        },
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
        lambda c: {"modules": short_list(c.profile.recurrent)},
    ),
    Rule(
        "init_small",
        ("vanishing", "dead_units"),
        lambda c: bool(c.profile.init_small),
        "initial weights far below the He/Xavier scale ({modules})",
        "He (Kaiming) init for ReLU-family layers, Xavier (Glorot) for tanh/sigmoid layers",
        lambda c: {"modules": short_list(c.profile.init_small)},
    ),
    Rule(
        "init_large",
        ("exploding", "saturated", "non_finite"),
        lambda c: bool(c.profile.init_large),
        "initial weights far above the He/Xavier scale ({modules})",
        "He (Kaiming) init for ReLU-family layers, Xavier (Glorot) for tanh/sigmoid layers",
        lambda c: {"modules": short_list(c.profile.init_large)},
    ),
    Rule(
        "gradients_not_zeroed",
        ("exploding",),
        lambda c: bool(c.evidence.get("runaway") and c.evidence.get("grads_carried")),
        "gradients are not being zeroed between steps: each step's gradient is added to the previous ones "
        "(seen on a parameter whose gradient at a step was the previous step's plus the new one), so the "
        "gradient keeps its direction and grows every step",
        "call optimizer.zero_grad() once per optimizer step (before backward, or after optimizer.step()); to "
        "accumulate over micro-batches, zero after each optimizer step only",
        conclusive=True,
    ),
    Rule(
        "slow_divergence",
        ("exploding",),
        lambda c: bool(c.evidence.get("runaway") and not c.evidence.get("grads_carried")),
        "the gradient norm and the loss have risen together for {steps} logged steps: the run diverges slowly "
        "(a learning rate above the stable limit for this model, or gradients that accumulate across steps)",
        "lower the learning rate (or add warm-up / gradient clipping); check that optimizer.zero_grad() runs "
        "once per optimizer step",
        lambda c: {"steps": c.evidence.get("steps", "?")},
        conclusive=True,
    ),
    Rule(
        "clipping_active",
        ("exploding",),
        lambda c: bool(c.evidence.get("clipping_only")),
        "gradient clipping acts on every logged step: the pre-clip value sits {ratio:.0f}x above the clip "
        "value without growing, so every update is rescaled and clipping works as a learning-rate cut",
        "nothing is wrong if intended; otherwise raise gradient_clip_val to about the typical pre-clip norm "
        "(see the history's global_grad_l2) so that clipping only trims spikes",
        lambda c: {"ratio": float(c.evidence.get("clip_ratio", 0.0))},
        conclusive=True,
    ),
    Rule(
        "clipping_hides_growth",
        ("exploding",),
        lambda c: "clip_ratio" in c.evidence and not c.evidence.get("clipping_only"),
        "gradient clipping is hiding a blow-up: the pre-clip value is {ratio:.0f}x the clip value and growing",
        "lower the learning rate (clipping only bounds the step, not the cause)",
        lambda c: {"ratio": float(c.evidence.get("clip_ratio", 0.0))},
    ),
    Rule(
        "learning_rate",
        ("exploding", "non_finite", "dead_units"),
        lambda c: not c.evidence.get("clipping_only"),
        "a learning rate too high for the loss' curvature: updates overshoot and weights and gradients grow",
        "gradient clipping (Trainer(gradient_clip_val=...)) or a lower learning rate / warm-up",
    ),
    Rule(
        "learning_rate_zero",
        ("dormant",),
        lambda c: c.evidence.get("learning_rate") == 0.0,
        "the learning rate of the layer's parameter group is 0",
        "give the group a learning rate (check the optimizer's param groups and the scheduler); if the layer "
        "is meant to be frozen, set requires_grad=False (or exclude it from the monitor)",
        conclusive=True,
    ),
    Rule(
        "optimizer_does_not_move",
        ("dormant",),
        lambda c: not c.evidence.get("starved") and c.evidence.get("learning_rate") != 0.0,
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
        "output_without_targets",
        ("no_gradient",),
        lambda c: bool(c.evidence.get("output_branch")),
        "the layers form a parallel branch of the output head whose own output gets no gradient: the loss has "
        "nothing for that output in these batches (a detection scale without assigned targets)",
        "nothing to fix if the data has no targets for that output (objects of that size); otherwise check the "
        "loss covers every output of the head",
        conclusive=True,
    ),
    Rule(
        "never_called",
        ("no_gradient",),
        lambda c: bool(c.evidence.get("never_called")),
        "{modules} never ran in forward (built, and handed to the optimizer, but not called)",
        "call the module in forward, or remove it (and its parameters) from the model and the optimizer; under "
        "DDP an unused module also needs find_unused_parameters=True",
        lambda c: {"modules": short_list(c.evidence.get("never_called", []))},
    ),
    Rule(
        "graph_cut",
        ("no_gradient",),
        lambda c: bool(c.evidence.get("cut_off")),
        "{modules} ran in forward but their output never reaches the loss through autograd: an input or "
        "output cut by .detach(), a torch.no_grad() block, or an output the loss does not use",
        "remove the .detach() / torch.no_grad() on the path to the loss (or use the output); if the layers are "
        "meant to be frozen, set requires_grad=False",
        lambda c: {"modules": short_list(c.evidence.get("cut_off", []))},
    ),
    Rule(
        "zero_gradient",
        ("no_gradient",),
        lambda c: bool(c.evidence.get("zero")),
        "the gradient of {modules} is exactly zero: every path from the loss is blocked (dead ReLUs, a "
        "multiplication by zero, a fully masked output)",
        "look for dead units (GradientFlowMonitor(track_activations=True)), zero-initialised gains or masks",
        lambda c: {"modules": short_list(c.evidence.get("zero", []))},
    ),
    Rule(
        "learning_rate_too_small",
        ("stalled",),
        lambda c: (c.evidence.get("learning_rate") or 0.0) > 0 and not c.evidence.get("loss_scaled"),
        "the learning rate ({lr}) is too small for these gradients: the weights move {update} of their norm "
        "per step, below float32's resolution",
        "raise the learning rate (a learning-rate finder, e.g. Lightning's Tuner.lr_find, gives a start)",
        lambda c: {
            "lr": f"{float(c.evidence.get('learning_rate') or 0.0):.1e}",
            "update": f"{float(c.evidence.get('update_ratio', 0.0)):.1e}",
        },
    ),
    Rule(
        "loss_scale_skips",
        ("stalled",),
        lambda c: bool(c.evidence.get("loss_scaled")),
        "the AMP loss scaler may be skipping every step (it skips steps whose scaled gradients overflow)",
        "check for inf/NaN in the loss; use bf16-mixed, or lower GradScaler's init_scale",
    ),
    Rule(
        "optimizer_setup",
        ("stalled",),
        lambda c: True,
        "no parameter moves: the optimizer may hold other tensors than the model's (built before a model copy "
        "or a .to() that made new parameters), its step may not run, or the weights are reset after it",
        "build the optimizer from model.parameters() after moving the model; check that optimizer.step() runs",
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

#: The rows of the loss findings (``loss_rising``, ``loss_oscillating``, ``loss_plateau``), part of :data:`RULES`.
_LOSS_RULES: tuple[Rule, ...] = (
    Rule(
        "optimizer_maximizes",
        ("loss_rising",),
        lambda c: bool(c.evidence.get("maximize")),
        "the optimizer is set to maximize (maximize=True in its param groups): every step climbs the loss",
        "drop maximize=True (or negate the objective you want to maximise and minimise that)",
        conclusive=True,
    ),
    Rule(
        "large_updates_climb",
        ("loss_rising",),
        lambda c: _at_least(c.evidence.get("median_update_ratio"), c.config.exploding_update_ratio),
        "the weights move {update} of their norm per step (healthy layers: 1e-3 to 1e-2): a learning rate so "
        "large that every step lands higher on the loss",
        "lower the learning rate (10x), add warm-up; clip gradients if they grow",
        lambda c: {"update": _fmt(c.evidence.get("median_update_ratio"))},
    ),
    Rule(
        "ascent",
        ("loss_rising",),
        lambda c: not _at_least(c.evidence.get("median_update_ratio"), c.config.exploding_update_ratio),
        "the updates climb the loss while the gradients stay ordinary: backward ran on a loss of the opposite "
        "sign to the one reported (a flipped sign, -loss), the update adds lr * grad instead of subtracting it, "
        "or an optimizer is set to maximize",
        "make backward run on the loss you minimise (check its sign), and check the optimizer's direction (a "
        "hand-written update must subtract lr * grad; no maximize=True)",
    ),
    Rule(
        "learning_rate_overshoots",
        ("loss_oscillating",),
        lambda c: True,
        "a learning rate too high for the loss' curvature: each update overshoots the minimum along the "
        "sharpest directions, so the loss jumps between {low} and {high} and makes no progress (batch noise "
        "alone would leave it falling on average)",
        "lower the learning rate (2-10x) or add warm-up; with Adam an epsilon far below 1e-8 acts the same; a "
        "larger batch shrinks the part that is batch noise",
        lambda c: {"low": _fmt(c.evidence.get("loss_low")), "high": _fmt(c.evidence.get("loss_high"))},
    ),
    Rule(
        "updates_too_small",
        ("loss_plateau",),
        lambda c: _below(c.evidence.get("median_update_ratio"), c.config.loss_slow_update_ratio),
        "the weights move only {update} of their norm per step: too little to change the loss in {steps} "
        "steps (a learning rate far too small, or one that a scheduler shrank)",
        "raise the learning rate (a learning-rate finder, e.g. Lightning's Tuner.lr_find, gives a start)",
        lambda c: {"update": _fmt(c.evidence.get("median_update_ratio")), "steps": c.evidence.get("steps_since_start")},
    ),
    Rule(
        "chance_level",
        ("loss_plateau",),
        lambda c: c.evidence.get("chance_classes") is not None,
        "the loss sits at ln({k}), the cross-entropy of a uniform guess over {k} classes: the model predicts the "
        "same distribution for every input",
        "check that the output depends on the input (dead units, an input that reaches the model as constants)",
        lambda c: {"k": c.evidence.get("chance_classes")},
    ),
    Rule(
        "learns_nothing",
        ("loss_plateau",),
        lambda c: not _below(c.evidence.get("median_update_ratio"), c.config.loss_slow_update_ratio),
        "the weights move but the loss does not: the model learns nothing from its inputs: targets independent "
        "of the inputs (shuffled separately, the wrong column), constant or all-zero inputs (a preprocessing or "
        "normalisation bug), or a loss that reads an output which does not depend on the input",
        "look at one batch: targets that match their inputs, inputs that vary and are normalised; then check the "
        "model can overfit that one batch",
    ),
    Rule(
        "trained_before",
        ("loss_plateau",),
        lambda c: c.evidence.get("chance_classes") is None,
        "or the model was already trained when monitoring began (resumed, or fine-tuned on data it already "
        "fits): nothing is left to learn at this learning rate",
        "if so, nothing to fix (loss_window=None, or on_anomaly={'loss_plateau': 'ignore'}, turns the finding off)",
    ),
)
RULES = RULES + _LOSS_RULES

_FALLBACK_REMEDY = {
    "no_gradient": "make sure the parameters take part in the loss, or freeze them (requires_grad=False)",
    "stalled": "check the learning rate, the loss scale and that the optimizer steps the model's parameters",
    "vanishing": "residual connections, normalisation, non-saturating activations, He/Xavier init",
    "exploding": "gradient clipping or a lower learning rate",
    "non_finite": "lower the learning rate, clip gradients, guard log/div in the loss",
    "dormant": "check the optimizer's param groups and learning rates",
    "saturated": "normalisation before the activation, or a non-saturating activation",
    "dead_units": "LeakyReLU/GELU, lower learning rate, zero-initialised biases",
    "loss_rising": "check the sign of the loss and the optimizer's direction; lower the learning rate",
    "loss_oscillating": "lower the learning rate or add warm-up",
    "loss_plateau": "check that the targets match the inputs and that the model can overfit one batch",
}


def _at_least(value: Any, threshold: float | None) -> bool:
    return isinstance(value, (int, float)) and threshold is not None and value >= threshold


def _below(value: Any, threshold: float) -> bool:
    return isinstance(value, (int, float)) and value < threshold


def _fmt(value: Any) -> str:
    return f"{value:.1e}" if isinstance(value, (int, float)) else "?"


def explain(context: RuleContext, limit: int = 3) -> tuple[str, str, list[str]]:
    """The cause, remedy and rule ids for a finding: the first ``limit`` rules that apply, in table order.

    Example:
        >>> context = RuleContext("stalled", ModelProfile(), {"learning_rate": 1e-12}, DiagnosisConfig())
        >>> explain(context)[2]
        ['learning_rate_too_small', 'optimizer_setup']
    """
    causes: list[str] = []
    remedies: list[str] = []
    ids: list[str] = []
    for rule in RULES:  # a conclusive rule names the whole mechanism: it alone explains the finding
        if rule.conclusive and context.kind in rule.kinds and rule.applies(context):
            return rule.cause.format(**rule.describe(context)), rule.remedy, [rule.id]
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
