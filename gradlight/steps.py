"""Which optimizer steps a recorder records, and how a step number that went back is numbered on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["StepCounter"]


class StepCounter:
    """The recorder's step bookkeeping: the interval, the last recorded step, steps that go back.

    Args:
        interval: Record every ``interval`` optimizer steps.
        warn: Called once with a message the first time a step goes back.

    Example:
        >>> steps = StepCounter(2, warn=print)
        >>> [steps.is_logged(steps.continued(step)) for step in range(3)]
        [True, False, True]
        >>> steps.last_recorded_step = 2
        >>> steps.continued(0)  # doctest: +ELLIPSIS
        gradlight: step 0 came after step 2 (last recorded: 2): the step went back, ...
        3
    """

    def __init__(self, interval: int, warn: Callable[[str], None]) -> None:
        self.interval = interval
        self._warn = warn
        #: The last optimizer step recorded (``-1`` before the first); steps up to it are never recorded again.
        self.last_recorded_step = -1
        #: The last step seen by ``start_step`` or ``capture``, offset included.
        self.last_step = -1
        #: Added to the caller's step once it went back (an epoch loop's ``enumerate``).
        self.offset = 0
        self._went_back = False

    def is_logged(self, step: int) -> bool:
        """Whether optimizer step ``step`` is recorded (not yet recorded and on the interval)."""
        return step % self.interval == 0 and step > self.last_recorded_step

    def continued(self, step: int) -> int:
        """The step as recorded: ``step``, or counted on from the last one when ``step`` went back.

        A step below the last one seen (or recorded) is not a step already taken: an epoch loop's
        ``enumerate(loader)`` restarts at 0. Its records are kept, numbered on from the last step, and
        the first time it happens a warning names both steps.
        """
        continued = step + self.offset
        floor = max(self.last_step, self.last_recorded_step)
        if continued < floor:
            self.offset += floor + 1 - continued
            if not self._went_back:
                self._went_back = True
                self._warn(
                    f"gradlight: step {step} came after step {floor} (last recorded: {self.last_recorded_step}): "
                    "the step went back, as `enumerate(loader)` does at each epoch. Its records are kept and "
                    f"numbered on: step {step} is recorded as step {floor + 1}, and later restarts likewise. "
                    "Pass a step that keeps increasing over epochs (a counter of optimizer steps) to silence this."
                )
            continued = floor + 1
        self.last_step = max(self.last_step, continued)
        return continued

    def resume_at(self, step: int) -> None:
        """Continue from optimizer step ``step``: going back to it is a resume, not a restart."""
        self.last_step, self.offset = step - 1, 0
        if step > 0:
            self.last_recorded_step = step - 1

    def state_dict(self) -> dict[str, int]:
        """The counter's part of the recorder's checkpoint state."""
        return {"last_recorded_step": self.last_recorded_step, "last_step": self.last_step, "step_offset": self.offset}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (missing keys: a run that recorded nothing)."""
        self.last_recorded_step = int(state_dict.get("last_recorded_step", -1))
        self.last_step = int(state_dict.get("last_step", -1))
        self.offset = int(state_dict.get("step_offset", 0))
