"""What a recorder records and how: :class:`RecorderOptions`, declared and documented once.

The recorder takes one :class:`RecorderOptions`; every front end (the Lightning callback, the Hugging Face
callback, the Ultralytics trainer) builds it once from its own arguments and passes it through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from gradlight.compiled import KERNELS as UPDATE_KERNELS
from gradlight.diagnosis.actions import resolve_actions
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.layers import GroupBy, validate_group_by
from gradlight.update_ratio import METHODS as UPDATE_METHODS
from gradlight.validation import check_bool, check_patterns, check_positive_int

__all__ = ["RecorderOptions"]


@dataclass(frozen=True)
class RecorderOptions:
    """What a recorder records and how; validated on construction (shared by the recorder and every front end).

    Attributes:
        log_every_n_steps: Record every this many optimizer steps (steps ``0, n, 2n, ...``).
        group_by: ``None`` (one layer per module that owns parameters), an int (aggregate to that many
            leading name components, e.g. ``2`` -> ``model.3``) or a callable ``param_name -> layer_name``.
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        track_update_ratio: Record ``update_ratio`` (update L2 / parameter L2 per layer; how the update is
            obtained: ``update_method``).
        edge_layers: Number of first and last layers the early-to-late ratio compares.
        flush_every_n_records: Write the history to disk every this many records (also at checkpoints, at the
            end of the run and on exceptions). Bounds memory however long the run.
        overwrite: Replace a history already in the run folder instead of refusing to start.
        diagnose: Diagnose vanishing, exploding, non-finite, dormant, stalled, saturated and dead layers on
            logged steps (see :mod:`gradlight.diagnosis`); findings go to the run folder's
            ``findings.jsonl`` (read them with :func:`gradlight.load_findings`).
        diagnosis: Thresholds of the diagnosis; ``None`` is ``DiagnosisConfig()``.
        on_anomaly: What a new warning finding does: ``"warn"`` (once per kind and layer, rank zero),
            ``"raise"`` (:class:`gradlight.GradientAnomalyError`), ``"stop"`` (the recorder's
            ``should_stop``, which each front end hands to its trainer) or ``"ignore"`` (only recorded); or a
            mapping per kind, e.g. ``{"non_finite": "raise", "default": "warn"}`` (see
            :func:`gradlight.diagnosis.resolve_actions`). Notes are only recorded. The history is flushed
            before raising or stopping; across ranks all take the same decision.
        track_activations: Tap activation modules on logged steps (forward hooks, removed after the step's
            micro-batches) and record ``act_saturation``, ``act_dead``, ``act_mean`` and ``act_std`` per
            site (see :mod:`gradlight.activations`); needed for ``saturated`` and ``dead_units`` findings.
        track_backward_signal: Tap the backward signal (the gradient with respect to each block's output) on
            logged steps, with the blocks of the layer grouping (:mod:`gradlight.signal`): per block its L2
            norm, largest element, NaN/Inf count and gain in decades, as ``signal_*`` rows of the history
            beside the layers' rows, drawn as the signal heat map and gain profile in reports.
        update_method: How ``update_ratio`` gets the update: ``"auto"`` reconstructs the step from the
            optimizer's state (SGD, Adam, AdamW in float32/64: no copy of the parameters; the step the
            optimizer computed) and copies the parameters elsewhere (the change applied, rounding included);
            ``"optimizer"`` or ``"copy"`` force one (:mod:`gradlight.update_ratio`).
        update_kernel: Which kernels reconstruct the update: ``"auto"`` (one ``torch.compile``'d kernel per
            large tensor where compiling works, compiled on the first logged step; eager kernels elsewhere or
            when compiling fails, the reason in ``run.json`` under ``update_ratio_kernel``), ``"fused"`` or
            ``"eager"`` force one.

    Example:
        >>> RecorderOptions(log_every_n_steps=10, exclude=("head.*",)).log_every_n_steps
        10
        >>> RecorderOptions(log_every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `log_every_n_steps` must be a positive int, got 0.
    """

    log_every_n_steps: int = 50
    group_by: GroupBy = None
    exclude: Sequence[str] = ()
    track_update_ratio: bool = True
    edge_layers: int = 1
    flush_every_n_records: int = 20
    overwrite: bool = False
    diagnose: bool = True
    diagnosis: DiagnosisConfig | None = None
    on_anomaly: str | Mapping[str, str] = "warn"
    track_activations: bool = False
    track_backward_signal: bool = False
    update_method: str = "auto"
    update_kernel: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int("log_every_n_steps", self.log_every_n_steps)
        check_positive_int("edge_layers", self.edge_layers)
        check_positive_int("flush_every_n_records", self.flush_every_n_records)
        validate_group_by(self.group_by)
        object.__setattr__(self, "exclude", check_patterns("exclude", self.exclude))
        for name in ("track_update_ratio", "overwrite", "diagnose", "track_activations", "track_backward_signal"):
            check_bool(name, getattr(self, name))
        if self.diagnosis is not None and not isinstance(self.diagnosis, DiagnosisConfig):
            raise ValueError(f"`diagnosis` must be a DiagnosisConfig or None, got {self.diagnosis!r}.")
        resolve_actions(self.on_anomaly)  # raises ValueError naming a bad action or kind
        if self.update_method not in UPDATE_METHODS:
            raise ValueError(f"`update_method` must be one of {UPDATE_METHODS}, got {self.update_method!r}.")
        if self.update_kernel not in UPDATE_KERNELS:
            raise ValueError(f"`update_kernel` must be one of {UPDATE_KERNELS}, got {self.update_kernel!r}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order.

        Example:
            >>> RecorderOptions.names()[:3]
            ('log_every_n_steps', 'group_by', 'exclude')
        """
        return tuple(spec.name for spec in fields(cls))

    @classmethod
    def build(cls, options: RecorderOptions | None = None, **values: Any) -> RecorderOptions:
        """``options`` (default: all defaults) with the options named in ``values`` replaced; validated.

        Raises:
            ValueError: For a name that is not an option (naming the valid ones), or an invalid value.

        Example:
            >>> RecorderOptions.build(RecorderOptions(log_every_n_steps=5), group_by=2).log_every_n_steps
            5
            >>> RecorderOptions.build(log_every_n_step=5)
            Traceback (most recent call last):
            ...
            ValueError: unknown recording option 'log_every_n_step'; the options are: log_every_n_steps, ...
        """
        if options is not None and not isinstance(options, RecorderOptions):
            raise ValueError(f"`options` must be a RecorderOptions or None, got {options!r}.")
        unknown = [name for name in values if name not in cls.names()]
        if unknown:
            raise ValueError(
                f"unknown recording option {', '.join(map(repr, unknown))}; the options are: {', '.join(cls.names())}."
            )
        return replace(options if options is not None else cls(), **values)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> RecorderOptions:
        """The options among ``arguments`` (a front end's keyword arguments, e.g. its ``locals()``), validated.

        Names that are not options are ignored; ``overrides`` take precedence.

        Example:
            >>> RecorderOptions.from_arguments({"exclude": ["head.*"], "save_dir": "runs"}).exclude
            ('head.*',)
        """
        picked = {name: arguments[name] for name in cls.names() if name in arguments}
        return cls(**{**picked, **overrides})
