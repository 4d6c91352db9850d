"""The diagnosis' thresholds: one dataclass, every field with the trade-off it controls."""

from __future__ import annotations

from dataclasses import dataclass

from gradlight.validation import Bounds, bounded, check_fields

__all__ = ["DiagnosisConfig"]

POSITIVE_INT = Bounds(1, integer=True)
COUNT = Bounds(0, integer=True)
POSITIVE = Bounds(0, low_open=True)
POSITIVE_OR_NONE = Bounds(0, low_open=True, optional=True)
NON_NEGATIVE = Bounds(0)
FACTOR = Bounds(1, low_open=True)  # a multiple: > 1
FRACTION = Bounds(0, 1, low_open=True)  # in (0, 1]
LOW_FRACTION = Bounds(0, 1, high_open=True)  # in [0, 1)
BOOLEAN = Bounds(boolean=True)  # True or False


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
        trend_significance: The fall must also be this many standard errors of the two levels it compares,
            estimated from the ratio's step-to-step noise in the window. A ratio taken from one sample per
            step swings by decades (the sample, not the network, sets it); lower reports noise as a trend.
        exploding_factor: Report exploding when the global or a layer's gradient L2 is this many times its
            median over the previous ``exploding_window`` logged steps. Lower reports earlier, but per-batch
            norms are heavy-tailed (a well-fitted batch has a near-zero gradient, the next normal one is
            100x larger): on healthy runs the largest ratio to the median of the previous 10 steps measured
            47 (docs/diagnosis.md), so factors much below 100 report spikes, not blow-ups.
        exploding_min_history: Logged steps the growth rule needs in its window before it compares at all:
            a window holding one or two early steps says nothing about the run's usual scale (norms change by
            orders of magnitude in the first steps of healthy runs, e.g. behind a zero-initialised head).
        exploding_confirm_steps: Logged steps a growth must persist after it is first seen (still at least
            ``exploding_factor`` times the baseline from before it) before it is reported. A blow-up rises and
            stays up; one batch with a large loss late in a converged run, or an ordinary spike, does not.
            ``0`` reports at the first step over the factor.
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
        exploding_update_ratio: Report exploding *updates* when the median layer's ``update_ratio`` (update
            L2 / weight L2) is at least this for ``exploding_update_patience`` logged steps while the loss has
            not fallen since those large steps began: every step then redraws a good part of the weights and
            the loss does not come down, the sign of a learning rate far too large, steps before the
            gradient itself blows up. Healthy layers move ~1e-3 per step; the first Adam steps on weights of
            std 0.02 move ``lr / 0.02`` (0.05 at ``lr=1e-3``), the largest median of any healthy run of the
            diagnosis benchmark but one: a fresh linear head over a frozen backbone, 0.2-0.4 per step with its
            loss rising for ten steps before it converges. Two layers at least must move that much (changes
            compound through depth; one layer is a convex fit that overshoots and comes back). ``None`` turns
            the rule off.
        exploding_update_patience: See ``exploding_update_ratio``.
        exploding_min_share: A growing layer is reported only if its gradient L2 is at least this fraction of
            the largest layer's: a tiny gradient recovering from ~0 (e.g. behind a zero-initialised head)
            grows by large factors without being a blow-up.
        exploding_new_high: A layer's growth counts only when its gradient L2 is also at least this many times
            the largest value in its window: per-batch norms of some layers are heavy-tailed (saturated
            sigmoids give near-zero gradients on most batches and large ones on a few), so a value far above
            the window's median but no higher than the window has already seen is no blow-up.
        exploding_jump_ratio: A step that moves a layer by at least this fraction of its weights' norm, followed
            at the next logged step by a global gradient below ``exploding_collapse`` times the one before it,
            is a blow-up in one step (healthy steps move ~1e-3; the first Adam steps on weights of std 0.02 move
            0.05; a zero-initialised head or a LayerScale gain moves by its own size early on, but its gradient
            does not collapse after it). ``None`` turns the rule off.
        exploding_collapse: See ``exploding_jump_ratio``.
        runaway_window: Logged steps over which a slow divergence is judged: the global gradient L2 rose on at
            least ``runaway_rising`` of the successive steps, ends ``runaway_growth`` times above where it
            started, and the median loss of the last three steps is ``runaway_loss_growth`` times that of the
            first three. Each step is small, so the growth rule's factor over a window median never fires;
            together, a norm and a loss that keep rising are a run that diverges. Healthy runs with warm-up
            (the loss falls), loss spikes and late large-loss batches (they come down) do not rise steadily.
        runaway_rising: See ``runaway_window``.
        runaway_growth: See ``runaway_window``.
        runaway_loss_growth: See ``runaway_window``.
        runaway_carried_steps: When the gradient an optimizer steps with is seen to still hold its previous
            step's gradient (``optimizer.zero_grad()`` is not called between steps: the front end checks it on
            one small parameter), the global gradient L2 rising on this many logged steps in a row is enough:
            the gradients accumulate, keep their direction and grow.
        clip_factor: With gradient clipping on, a pre-clip norm (``"norm"`` clipping) or largest gradient
            element (``"value"`` clipping) at least this many times the clip value for ``clip_patience``
            logged steps is reported as a ``note``: clipping then acts on every step, as a learning-rate cut.
            It is a warning only together with growth (the growth rule): clipping hiding a blow-up.
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
        stalled_update_ratio: The run is ``stalled`` when no layer's ``update_ratio`` reaches this for
            ``stalled_window`` logged steps while the learning rate is not 0. ``1e-7`` is float32's resolution:
            a smaller relative update is (partly) rounded away, so the weights do not move measurably.
        stalled_window: Logged steps every layer must stay below ``stalled_update_ratio``.
        stalled_lr_fraction: A learning rate at or below this fraction of the largest one seen in the run is
            a schedule's annealed end, not a stall (``0`` counts only a learning rate of exactly 0).
        no_gradient_patience: Logged steps in a row a trainable parameter handed to the optimizer must have no
            gradient (``.grad is None``, or exactly zero) before ``no_gradient`` is reported. Parameters that
            miss a gradient on some steps only (a detection head without targets in a batch) stay quiet.
            Each layer counts the logged steps of the optimizer that owns it.
        no_gradient_window: The logged steps of its optimizer over which a layer's gradients are observed (the
            longest run without a gradient ever required). Once some layer gets a gradient on some steps and
            none on others (LayerDrop, whole-layer stochastic depth, early exit, routed experts), a layer is
            reported only after a run without a gradient that this skipping would produce with a chance
            below ``no_gradient_chance`` (at the skip rate measured over those layers), at most this long.
        no_gradient_chance: See ``no_gradient_window``: at a measured skip rate ``q`` a layer needs
            ``log(chance) / log(q)`` logged steps in a row without a gradient (``q = 0.5``: 14 steps).
        gain_threshold: A learnable gain that scales a residual branch (LayerScale, a zero-initialised last
            BatchNorm of a block, ReZero/SkipInit) counts as near zero when its largest initial magnitude is at
            most this. The branch's gradients are then multiplied by the gain by design: a small branch
            gradient is reported as a ``note`` (expected at initialisation), judged against the gain's value.
        gain_patience: Logged steps a gated branch may stay below ``vanishing_ratio`` while its gain has not
            grown (still within twice its initial size) before it is a ``warning``: the gain is not training.
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
        loss_window: Logged steps of training loss the loss findings (``loss_rising``, ``loss_oscillating``,
            ``loss_plateau``) look back over; ``None`` turns them off (a loss that is not minimised: a GAN's,
            a reinforcement-learning objective). Longer windows judge a trend on more batches (less noise) but
            report later.
        loss_initial_steps: The initial level is the median loss of the logged steps within this many
            optimizer steps after monitoring began (the untrained model's loss when it begins at step 0).
        loss_trend_z: A trend counts when the window's Mann-Kendall statistic reaches this many standard
            deviations (3: a chance of about 1 in 700 for a loss that only has batch noise around a level);
            also the bound under which a window has "no trend". Rank-based: a few outlier batches do not make
            a trend.
        loss_rise: ``loss_rising`` needs the loss at least this fraction of ``|initial level|`` above the
            initial level (and above every loss of the initial steps): worse than the untrained model, which a
            warm-up overshoot or a cosine restart (both starting from a trained, lower level) does not reach.
            An optimizer climbing a cross-entropy with Adam at 1e-3 raised it by ~10% in 60 steps.
        loss_stuck_drop: ``loss_plateau`` and ``loss_oscillating`` need the loss less than this fraction of
            ``|initial level|`` below the initial level: no progress at all since the start.
        loss_swing: The 10th-to-90th percentile range of the window over its median at which a loss without
            progress counts as oscillating (at or above) rather than stuck (below).
        loss_min_steps: ``loss_plateau`` and ``loss_oscillating`` are judged only this many optimizer steps
            after monitoring began: healthy runs spend their first steps near the initial level (warm-up, a
            small learning rate), and bring the loss down within about a hundred steps.
        loss_patience: Logged steps a loss condition must hold in a row before it is reported.
        loss_slow_update_ratio: A loss plateau while the median layer moves less than this fraction of its
            norm per step (1e-5: 0.1% in a hundred steps; healthy layers move 1e-3 to 1e-2 per step) is put
            down to a learning rate too small, rather than to a model that learns nothing from its inputs.
        dead_min_samples: Inputs per unit (batch elements, times positions for convolutions and sequences) a
            ReLU unit must be seen on before "never positive" counts as dead; fewer are pooled over the next
            logged steps. A live unit that fires on a fraction ``p`` of its inputs stays off on ``n`` of them
            with probability ``(1 - p) ** n``: on one sample (batch size 1, an MLP) half the units of a healthy
            ReLU layer are off, on 16 a unit firing half the time is off with probability 1.5e-5.
        forward_origin: On logged steps, tap every module's forward output for NaN/Inf (one float32 sum per
            output, no host copy until the step's record), so that a ``non_finite`` finding names the first
            module in forward order whose output was non-finite. Unlogged steps run no hook either way.

    Example:
        >>> DiagnosisConfig(vanishing_ratio=1e-4, vanishing_patience=5).vanishing_patience
        5
    """

    reference_layers: int = bounded(2, POSITIVE_INT)
    vanishing_ratio: float = bounded(1e-3, FRACTION)
    vanishing_patience: int = bounded(3, POSITIVE_INT)
    trend_window: int = bounded(10, POSITIVE_INT)
    trend_decades: float = bounded(2.0, POSITIVE)
    trend_significance: float = bounded(3.0, POSITIVE)
    exploding_factor: float = bounded(100.0, FACTOR)
    exploding_window: int = bounded(10, POSITIVE_INT)
    exploding_min_history: int = bounded(3, POSITIVE_INT)
    exploding_confirm_steps: int = bounded(1, COUNT)
    exploding_norm: float | None = bounded(None, POSITIVE_OR_NONE)
    exploding_layer_norm: float | None = bounded(None, POSITIVE_OR_NONE)
    exploding_update_ratio: float | None = bounded(0.1, POSITIVE_OR_NONE)
    exploding_update_patience: int = bounded(3, POSITIVE_INT)
    exploding_min_share: float = bounded(0.01, FRACTION)
    exploding_new_high: float = bounded(10.0, FACTOR)
    exploding_jump_ratio: float | None = bounded(0.5, POSITIVE_OR_NONE)
    exploding_collapse: float = bounded(1e-3, FRACTION)
    runaway_window: int = bounded(10, POSITIVE_INT)
    runaway_rising: float = bounded(0.8, FRACTION)
    runaway_growth: float = bounded(3.0, FACTOR)
    runaway_loss_growth: float = bounded(2.0, FACTOR)
    runaway_carried_steps: int = bounded(3, POSITIVE_INT)
    clip_factor: float = bounded(10.0, FACTOR)
    clip_patience: int = bounded(3, POSITIVE_INT)
    dormant_update_ratio: float = bounded(1e-6, POSITIVE)
    dormant_relative: float = bounded(0.01, FRACTION)
    dormant_window: int = bounded(5, POSITIVE_INT)
    dormant_loss_change: float = bounded(0.01, NON_NEGATIVE)
    stalled_update_ratio: float = bounded(1e-7, POSITIVE)
    stalled_window: int = bounded(5, POSITIVE_INT)
    stalled_lr_fraction: float = bounded(1e-3, LOW_FRACTION)
    no_gradient_patience: int = bounded(3, POSITIVE_INT)
    no_gradient_window: int = bounded(50, POSITIVE_INT)
    no_gradient_chance: float = bounded(1e-4, FRACTION)
    gain_threshold: float = bounded(1e-2, FRACTION)
    gain_patience: int = bounded(50, POSITIVE_INT)
    saturated_fraction: float = bounded(0.5, FRACTION)
    dead_fraction: float = bounded(0.5, FRACTION)
    activation_patience: int = bounded(2, POSITIVE_INT)
    scaled_non_finite_patience: int = bounded(3, POSITIVE_INT)
    saturation_derivative: float = bounded(0.05, FRACTION)
    deep_stack_layers: int = bounded(8, POSITIVE_INT)
    init_scale_tolerance: float = bounded(4.0, FACTOR)
    max_layers_in_evidence: int = bounded(16, POSITIVE_INT)
    loss_window: int | None = bounded(20, Bounds(4, integer=True, optional=True))
    loss_initial_steps: int = bounded(10, POSITIVE_INT)
    loss_trend_z: float = bounded(3.0, POSITIVE)
    loss_rise: float = bounded(0.05, POSITIVE)
    loss_stuck_drop: float = bounded(0.05, POSITIVE)
    loss_swing: float = bounded(0.5, POSITIVE)
    loss_min_steps: int = bounded(100, COUNT)
    loss_patience: int = bounded(3, POSITIVE_INT)
    loss_slow_update_ratio: float = bounded(1e-5, POSITIVE)
    dead_min_samples: int = bounded(16, POSITIVE_INT)
    forward_origin: bool = bounded(True, BOOLEAN)

    def __post_init__(self) -> None:
        check_fields(self)  # every field declares its valid values (`bounded`)
