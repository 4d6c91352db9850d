"""The taps of one logged step: activation statistics, where a NaN/Inf is born in forward, the backward signal.

:class:`StepTaps` builds the taps at first use (after lazy modules, ``configure_model`` and wrapping),
starts them for a logged step, stops them when its passes are over and turns what they gathered into the
step's :class:`TappedStep`: :class:`~gradlight.activations.ActivationStats`, the modules whose forward outputs
were non-finite, and :class:`~gradlight.signal.SignalStats`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from gradlight.activations import ActivationStats, ActivationTaps, ForwardOriginTaps
from gradlight.collectives import Collectives
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.detectors import ForwardSeen
from gradlight.forward_watch import ForwardWatch
from gradlight.layers import GroupBy, LayerMap
from gradlight.options import RecorderOptions
from gradlight.runfolder import ActivationSiteInfo
from gradlight.signal import BackwardSignalTaps, SignalStats, all_gather_reduction
from gradlight.tracker import StepRecord

__all__ = ["StepTaps", "TappedStep"]


class TappedStep(NamedTuple):
    """What the taps gathered on one logged step (``None`` for a tap that did not run on it)."""

    activations: ActivationStats | None = None
    signal: SignalStats | None = None
    nonfinite_modules: list[str] | None = None  # forward-origin taps: modules whose outputs held NaN/Inf


class StepTaps:
    """Activation and backward-signal taps of one model, started on logged steps only.

    Args:
        model: The monitored model.
        activations: Tap activation statistics (``track_activations``).
        backward_signal: Tap the backward signal (``track_backward_signal``).
        saturation_derivative: The activation taps' saturation threshold (see :class:`ActivationTaps`).
        dead_min_samples: The activation taps' inputs per unit before a unit can be judged dead.
        group_by: How the backward signal groups modules into blocks.
        forward_origin: Tap where a NaN/Inf is born in forward (:class:`ForwardOriginTaps`).
        max_origin_modules: The most non-finite modules :meth:`finalize` lists.

    Example:
        >>> import torch
        >>> from gradlight.tracker import GradientFlowTracker
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> taps = StepTaps(model, activations=True, backward_signal=False)
        >>> taps.start(0)
        >>> _ = model(torch.randn(8, 4))
        >>> taps.stop()
        >>> tapped = taps.finalize(0, GradientFlowTracker(model).layer_map)
        >>> tapped.activations.sites, tapped.signal
        (['1'], None)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activations: bool,
        backward_signal: bool,
        saturation_derivative: float = 0.05,
        dead_min_samples: int = 16,
        group_by: GroupBy = None,
        forward_origin: bool = False,
        max_origin_modules: int = 16,
    ) -> None:
        self.model = model
        self.track_activations = activations
        self.track_backward_signal = backward_signal
        self.saturation_derivative = saturation_derivative
        self.dead_min_samples = dead_min_samples
        self.group_by = group_by
        self.track_forward_origin = forward_origin
        self.max_origin_modules = max_origin_modules
        #: The activation taps (built at the first logged step that taps them).
        self.activations: ActivationTaps | None = None
        #: The backward-signal taps (built at the first logged step that taps them).
        self.signal: BackwardSignalTaps | None = None
        #: The forward-origin taps (built at the first logged step that taps them).
        self.origin: ForwardOriginTaps | None = None
        #: The loss scale the tapped step's backward ran with (fp16 AMP): the signal carries it.
        self.backward_scale = 1.0
        #: The activation sites of the first step with activation statistics (for ``run.json``).
        self.activation_sites: list[ActivationSiteInfo] = []
        self._activation_step: int | None = None
        self._signal_step: int | None = None
        self._origin_step: int | None = None
        self._forward_watch: ForwardWatch | None = None  # the modules of layers without gradient (no_gradient)
        self._watch_step: int | None = None
        self._missing_modules: dict[str | None, set[str]] = {}  # stream -> modules of its layers without gradient
        self._module_layers: tuple[LayerMap, dict[str, tuple[str, int]]] | None = None

    @classmethod
    def from_options(cls, model: nn.Module, options: RecorderOptions, config: DiagnosisConfig) -> StepTaps:
        """The taps a recorder's ``options`` and diagnosis ``config`` ask for (forward origin with the diagnosis)."""
        return cls(
            model,
            activations=options.track_activations,
            backward_signal=options.track_backward_signal,
            saturation_derivative=config.saturation_derivative,
            dead_min_samples=config.dead_min_samples,
            group_by=options.group_by,
            forward_origin=options.diagnose and config.forward_origin,
            max_origin_modules=config.max_layers_in_evidence,
        )

    def start(self, step: int) -> None:
        """Start the taps for logged step ``step`` (idempotent over the micro-batches of one step)."""
        if self.track_activations:
            if self.activations is None:  # built at first use: after lazy modules, configure_model and wrapping
                self.activations = ActivationTaps(
                    self.model, saturation_derivative=self.saturation_derivative, dead_min_samples=self.dead_min_samples
                )
            self.activations.start()
            self._activation_step = step
        if self.track_backward_signal:
            if self.signal is None:  # built at first use, like the activation taps
                self.signal = BackwardSignalTaps(self.model, group_by=self.group_by)
            self.signal.start()
            self._signal_step = step
        if self.track_forward_origin:
            if self.origin is None:  # built at first use, like the activation taps
                self.origin = ForwardOriginTaps(self.model)
            self.origin.start()  # where a NaN/Inf is born in forward, on logged steps only
            self._origin_step = step

    def begin(self, step: int) -> None:
        """Where a micro-batch of ``step`` begins (every step): the forward watch forgets earlier steps."""
        if self._forward_watch is not None and self._watch_step != step:
            self._forward_watch.reset()  # the first micro-batch of the step: what ran before is not this step
            self._watch_step = step

    def forward_seen(self) -> ForwardSeen | None:
        """What the forward watch saw since the last call (then forgotten: the next step starts afresh)."""
        watch = self._forward_watch
        if watch is None:
            return None
        seen = ForwardSeen(frozenset(watch.ran), frozenset(watch.watched))
        watch.reset()
        return seen

    def watch_missing(self, record: StepRecord, stream: str | None) -> None:
        """Watch the forward pass of the modules of layers without a gradient at their optimizer's last record."""
        self._missing_modules[stream] = {name.rpartition(".")[0] for names in record.missing.values() for name in names}
        modules = set().union(*self._missing_modules.values())
        watch = self._forward_watch
        if watch is not None and (not modules or modules - watch.watched):
            watch.remove()
            watch = self._forward_watch = None
        if modules and watch is None:
            self._forward_watch = ForwardWatch(self.model, modules)

    def pause(self) -> None:
        """Stop the activation and forward-origin taps until the next :meth:`start` (e.g. for a validation pass)."""
        if self.activations is not None:
            self.activations.stop()
        if self.origin is not None:
            self.origin.stop()

    def stop(self) -> None:
        """Stop every tap: the step's forward and backward passes are over (no hook stays between steps)."""
        if self.activations is not None:
            self.activations.stop()
        if self.signal is not None:
            self.signal.stop()
        if self.origin is not None:
            self.origin.stop()

    def finalize(self, step: int, layer_map: LayerMap, collectives: Collectives | None = None) -> TappedStep:
        """What the taps gathered for ``step`` (``None`` for a tap that did not run on it).

        Every rank calls it: one all-reduce for the activations and one gather for the signal under several
        ranks, and one host copy each.
        """
        coll = collectives if collectives is not None else Collectives()
        return TappedStep(
            self._finalize_activations(step, layer_map, coll),
            self._finalize_signal(step, layer_map, coll),
            self._finalize_origin(step),
        )

    def discard(self) -> None:
        """Remove every hook and drop what was gathered."""
        if self.activations is not None:
            self.activations.discard()
        if self.signal is not None:
            self.signal.discard()
        if self.origin is not None:
            self.origin.stop()
            self.origin.finalize()
        if self._forward_watch is not None:
            self._forward_watch.remove()
            self._forward_watch = None

    def _finalize_activations(self, step: int, layer_map: LayerMap, collectives: Collectives) -> ActivationStats | None:
        taps = self.activations
        if taps is None or self._activation_step != step:
            return None
        taps.stop()
        self._activation_step = None
        if not taps.sites:
            return None
        stats = taps.finalize(
            step, collectives.all_reduce_sum, self._layers_of_modules(layer_map), default_depth=len(layer_map.layers)
        )
        if stats is not None and not self.activation_sites:
            self.activation_sites = [
                ActivationSiteInfo(site, kind, fed, int(depth))
                for site, kind, fed, depth in zip(stats.sites, stats.kinds, stats.feeds, stats.depths)
            ]
        return stats

    def _finalize_signal(self, step: int, layer_map: LayerMap, collectives: Collectives) -> SignalStats | None:
        taps = self.signal
        if taps is None or self._signal_step != step:
            return None
        taps.stop()
        self._signal_step = None
        world = collectives.world_size
        return taps.finalize(
            step,
            all_gather_reduction() if world > 1 else None,
            grad_scale=self.backward_scale,
            data_parallel_size=world,
            depth_of={name: depth for depth, name in enumerate(layer_map.layers)},
        )

    def _finalize_origin(self, step: int) -> list[str] | None:
        """The modules whose forward outputs held NaN/Inf on ``step`` (``None`` if not tapped)."""
        taps = self.origin
        if taps is None or self._origin_step != step:
            return None
        taps.stop()
        self._origin_step = None
        return taps.finalize(self.max_origin_modules)

    def _layers_of_modules(self, layer_map: LayerMap) -> dict[str, tuple[str, int]]:
        """``module name -> (layer, depth)`` for the modules whose parameters are monitored (per layer map)."""
        if self._module_layers is None or self._module_layers[0] is not layer_map:
            mapping: dict[str, tuple[str, int]] = {}
            for name, index in zip(layer_map.param_names, layer_map.param_layer):
                mapping.setdefault(name.rpartition(".")[0], (layer_map.layers[index], index))
            self._module_layers = (layer_map, mapping)
        return self._module_layers[1]
