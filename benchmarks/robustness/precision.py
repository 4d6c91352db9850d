"""The precisions of the robustness matrix: how a plain loop runs its forward and backward, and Lightning's flag."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Precision:
    """One precision setting.

    Attributes:
        name: The name in case ids and tables.
        autocast: The forward pass's context in a plain loop.
        scaler: A fresh ``GradScaler`` for fp16, else ``None``.
        lightning: ``Trainer`` keyword arguments for the same setting.
    """

    name: str
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    scaler: Callable[[], torch.amp.GradScaler | None]
    lightning: Callable[[], dict[str, Any]]


def _no_scaler() -> torch.amp.GradScaler | None:
    return None


def _fp16_scaler() -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler("cpu", init_scale=2.0**12)


def _fp16_lightning() -> dict[str, Any]:
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning turns "16-mixed" into bf16 on CPU: a real fp16 scaler needs the plugin (see NOTES.md).
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=_fp16_scaler())]}


#: Every precision, by name. Adding one is one entry.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", contextlib.nullcontext, _no_scaler, lambda: {"precision": "32-true"}),
        Precision(
            "bf16",
            lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            _no_scaler,
            lambda: {"precision": "bf16-mixed"},
        ),
        Precision("fp16", lambda: torch.autocast("cpu", dtype=torch.float16), _fp16_scaler, _fp16_lightning),
    )
}
