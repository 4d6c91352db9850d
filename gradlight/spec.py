"""A module's own layer grouping and exclusions: :class:`GradientFlowSpec` and :func:`find_spec`.

A LightningModule returns a :class:`GradientFlowSpec` from ``configure_gradient_flow()`` (the
:class:`gradlight.GradientFlowMixin` declares the hook); the monitor reads it with :func:`find_spec`. Both
sides import this module, which imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gradlight.layers import GroupBy, validate_group_by

__all__ = ["GradientFlowSpec", "find_spec"]


@dataclass(frozen=True)
class GradientFlowSpec:
    """A module's own layer grouping and exclusions, returned by ``configure_gradient_flow()``.

    Attributes:
        group_by: Overrides the monitor's ``group_by`` when not ``None`` (int or ``param_name -> layer``).
        exclude: ``fnmatch`` patterns of parameter names not to monitor, added to the monitor's.
    """

    group_by: GroupBy = None
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        validate_group_by(self.group_by)
        if isinstance(self.exclude, str):
            raise ValueError(f"`exclude` must be a sequence of patterns, not a single string: {self.exclude!r}.")


def find_spec(module: object) -> GradientFlowSpec | None:
    """The module's ``configure_gradient_flow()`` result, if it defines one.

    Raises:
        ValueError: If the hook returns something other than a ``GradientFlowSpec`` or ``None``.
    """
    hook = getattr(module, "configure_gradient_flow", None)
    if hook is None:
        return None
    spec = hook()
    if spec is not None and not isinstance(spec, GradientFlowSpec):
        raise ValueError(
            f"`configure_gradient_flow()` must return a GradientFlowSpec or None, got {type(spec).__name__}."
        )
    return spec
