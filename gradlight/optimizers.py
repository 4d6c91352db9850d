"""What a recorder knows of each optimizer it captured: its diagnosis stream, its intervals, its carry probe.

With several optimizers (a GAN's generator and discriminator under manual optimization) the step counter
counts every optimizer's steps, so one interval of ``log_every_n_steps`` steps holds steps of each: every
optimizer is recorded at its first step in each interval, and the diagnosis keeps one state per optimizer
(its stream, keyed by the name of its first monitored parameter).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.optim import Optimizer

from gradlight.carry_probe import CarryProbe
from gradlight.layers import LayerMap
from gradlight.steps import StepCounter

__all__ = ["OptimizerStreams"]


class OptimizerStreams:
    """Per-optimizer state of a recorder: stream keys, last logged intervals, gradient-carry probes.

    Example:
        >>> import torch
        >>> steps = StepCounter(10, warn=print)
        >>> first, second = (torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1) for _ in range(2))
        >>> streams = OptimizerStreams()
        >>> [streams.is_logged(steps, step, first) for step in (0, 1)]
        [True, False]
        >>> streams.is_logged(steps, 1, second)  # another optimizer: its first step in the interval
        True
    """

    def __init__(self) -> None:
        self.keys: dict[int, str | None] = {}  # id(optimizer) -> stream key
        self.intervals: dict[int, int] = {}  # id(optimizer) -> last interval index recorded
        self._probes: dict[int, CarryProbe] = {}  # id(optimizer) -> probe started at its last record
        self._found: dict[int, bool | None] = {}  # id(optimizer) -> what its probe found

    def is_logged(self, steps: StepCounter, step: int, owner: Optimizer | None) -> bool:
        """Whether ``owner``'s step ``step`` is recorded.

        On the interval, or its first step in an interval of ``log_every_n_steps`` steps once several
        optimizers were seen.
        """
        if owner is None:
            return steps.is_logged(step)
        key = id(owner)
        self.keys.setdefault(key, None)  # its stream key is read on its first recorded step
        interval = step // steps.interval
        several = len(self.keys) > 1
        logged = steps.is_logged(step) or (
            several and step > steps.last_recorded_step and interval > self.intervals.get(key, -1)
        )
        if logged:
            self.intervals[key] = interval
        return logged

    def stream_of(self, owner: Optimizer | None, layer_map: LayerMap) -> str | None:
        """The diagnosis stream of ``owner``: the name of its first monitored parameter (stable over resumes)."""
        if owner is None:
            return None
        key = self.keys.get(id(owner))
        if key is None:
            positions = (layer_map.params_by_id.get(id(p)) for group in owner.param_groups for p in group["params"])
            first = next((position for position in positions if position is not None), None)
            key = self.keys[id(owner)] = layer_map.param_names[first] if first is not None else None
        return key

    def read_probe(self, owner: Optimizer | None) -> None:
        """At ``owner``'s first step after its last record: what its probe found (kept for its next record)."""
        probe = self._probes.pop(id(owner), None) if owner is not None else None
        if probe is not None:
            self._found[id(owner)] = probe.carried()

    def carried(self, owner: Optimizer | None, params: Iterable[Tensor], probe: bool) -> bool | None:
        """At ``owner``'s record: what its last probe found, and (``probe``) a new probe started."""
        found = self._found.pop(id(owner), None)
        if owner is not None and probe:
            started = CarryProbe.start(params)
            if started is not None:
                self._probes[id(owner)] = started
        return found

    def close(self) -> None:
        """Remove every probe's hook."""
        for probe in self._probes.values():
            probe.stop()
        self._probes.clear()
