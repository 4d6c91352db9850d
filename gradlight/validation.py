"""Checks of user input: each raises ``ValueError`` naming the argument, the value and what is valid.

Every public constructor of gradlight validates its arguments with these, so a wrong value fails when it
is passed (``GradientFlowMonitor(log_every_n_steps=0)``), not steps into a run. :class:`Bounds` declares
the valid range of a numeric dataclass field once, on the field (``field(metadata=...)``), and
:func:`check_fields` checks every declared field of an instance (``DiagnosisConfig`` uses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "Bounds",
    "bounded",
    "check_bool",
    "check_clip",
    "check_fields",
    "check_path",
    "check_patterns",
    "check_positive_int",
    "check_positive_number",
    "check_step",
]


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an int >= 1 (or ``None`` when ``allow_none``); a bool is not an int here.

    Example:
        >>> check_positive_int("log_every_n_steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: `log_every_n_steps` must be a positive int, got 0.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        valid = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is ``True`` or ``False``.

    Example:
        >>> check_bool("diagnose", "yes")
        Traceback (most recent call last):
        ...
        ValueError: `diagnose` must be True or False, got 'yes'.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_path(name: str, value: object) -> None:
    """Raise unless ``value`` is a path (``str`` or ``Path``) or ``None``.

    Example:
        >>> check_path("save_dir", 3)
        Traceback (most recent call last):
        ...
        ValueError: `save_dir` must be a path (str or Path) or None, got 3.
    """
    if value is not None and not isinstance(value, (str, Path)):
        raise ValueError(f"`{name}` must be a path (str or Path) or None, got {value!r}.")


def check_patterns(name: str, value: object) -> tuple[str, ...]:
    """The ``fnmatch`` patterns in ``value`` (a list or tuple of strings) as a tuple; raise for anything else.

    Example:
        >>> check_patterns("exclude", ["head.*"])
        ('head.*',)
        >>> check_patterns("exclude", "head.*")
        Traceback (most recent call last):
        ...
        ValueError: `exclude` must be a sequence of patterns, not a single string: got 'head.*'.
    """
    if isinstance(value, str):
        raise ValueError(f"`{name}` must be a sequence of patterns, not a single string: got {value!r}.")
    if not isinstance(value, (list, tuple)) or not all(isinstance(pattern, str) for pattern in value):
        raise ValueError(f"`{name}` must be a list or tuple of fnmatch pattern strings, got {value!r}.")
    return tuple(value)


def check_step(step: object) -> None:
    """Raise a clear error unless ``step`` is a non-negative int (an optimizer step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be a non-negative int, got {step!r}.")


def check_clip(gradient_clip_val: object, gradient_clip_algorithm: object) -> None:
    """Raise a clear error unless the clip settings are a number (or ``None``) and ``"norm"``/``"value"``/``None``."""
    if gradient_clip_val is not None and not (
        isinstance(gradient_clip_val, (int, float)) and not isinstance(gradient_clip_val, bool)
    ):
        raise ValueError(f"`gradient_clip_val` must be a number or None, got {gradient_clip_val!r}.")
    if gradient_clip_algorithm not in (None, "norm", "value"):
        raise ValueError(f"`gradient_clip_algorithm` must be 'norm', 'value' or None, got {gradient_clip_algorithm!r}.")


def check_positive_number(name: str, value: object, allow_none: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or ``None`` when ``allow_none``).

    Example:
        >>> check_positive_number("grad_scale", 0.0, allow_none=True)
        Traceback (most recent call last):
        ...
        ValueError: `grad_scale` must be a positive finite number or None, got 0.0.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        valid = "a positive finite number or None" if allow_none else "a positive finite number"
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")


@dataclass(frozen=True)
class Bounds:
    """The valid values of a numeric field: ``low < value <= high`` style bounds, optionally ``None`` too.

    Attributes:
        low: The lower bound (``None``: none).
        high: The upper bound (``None``: none).
        low_open: ``value`` must be greater than ``low`` (else at least ``low``).
        high_open: ``value`` must be less than ``high`` (else at most ``high``).
        integer: Only ints are valid (a bool is not).
        optional: ``None`` is valid too.
        boolean: Only ``True`` and ``False`` are valid (the numeric bounds are not used).

    Example:
        >>> Bounds(0, 1, low_open=True).describe()
        'in (0, 1]'
        >>> Bounds(1, integer=True).describe()
        'an int >= 1'
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    boolean: bool = False

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is valid."""
        if self.boolean:
            return isinstance(value, bool)
        if value is None:
            return self.optional
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return bool(low_ok and high_ok)

    def describe(self) -> str:
        """What is valid, in words (``"in (0, 1]"``, ``"> 0 or None"``, ``"an int >= 1"``)."""
        if self.boolean:
            return "True or False"
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high}"
        else:
            text = "a number"
        if self.integer:
            text = f"an int {text}"
        return f"{text} or None" if self.optional else text


def bounded(default: Any, bounds: Bounds) -> Any:
    """A dataclass field with ``default`` whose valid values are ``bounds`` (read by :func:`check_fields`).

    Example:
        >>> @dataclass
        ... class Config:
        ...     patience: int = bounded(3, Bounds(1, integer=True))
        ...
        ...     def __post_init__(self) -> None:
        ...         check_fields(self)
        >>> Config(patience=0)
        Traceback (most recent call last):
        ...
        ValueError: Config `patience` must be an int >= 1, got 0.
    """
    return field(default=default, metadata={"bounds": bounds})


def check_fields(instance: Any) -> None:
    """Check every field of the dataclass ``instance`` declared with :func:`bounded` against its bounds."""
    for spec in fields(instance):
        bounds = spec.metadata.get("bounds")
        value = getattr(instance, spec.name)
        if isinstance(bounds, Bounds) and not bounds.accepts(value):
            owner = type(instance).__name__
            raise ValueError(f"{owner} `{spec.name}` must be {bounds.describe()}, got {value!r}.")
