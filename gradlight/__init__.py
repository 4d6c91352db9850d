"""gradlight: see how gradients flow through your network while it trains.

The public names below are loaded on first use (a module ``__getattr__``): ``import gradlight`` imports
neither torch nor Lightning, ``gradlight.GradientFlowRecorder`` brings torch but not ``lightning.pytorch``,
and only the Lightning front ends (:class:`GradientFlowMonitor`, :class:`GradientFlowMixin`) import it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it (its one home).
_HOMES = {
    "ActivationStats": "gradlight.activations",
    "ActivationTaps": "gradlight.activations",
    "Collectives": "gradlight.collectives",
    "DiagnosisConfig": "gradlight.diagnosis.config",
    "Finding": "gradlight.records",
    "GLOBAL_LAYER": "gradlight.records",
    "GradientAnomalyError": "gradlight.diagnosis.finding",
    "GradientDiagnosis": "gradlight.diagnosis.engine",
    "GradientFlowMixin": "gradlight.mixin",
    "GradientFlowMonitor": "gradlight.monitor",
    "GradientFlowRecorder": "gradlight.recorder",
    "GradientFlowSpec": "gradlight.spec",
    "GradientFlowTracker": "gradlight.tracker",
    "HistoryExistsError": "gradlight.runwriter",
    "ModelProfile": "gradlight.diagnosis.profile",
    "PreflightReport": "gradlight.preflight_check",
    "RecorderOptions": "gradlight.options",
    "RunFolder": "gradlight.runfolder",
    "RunInfo": "gradlight.runfolder",
    "StepRecord": "gradlight.tracker",
    "UnsupportedFormatError": "gradlight.runfolder",
    "load_findings": "gradlight.runfolder",
    "load_history": "gradlight.history",
    "preflight": "gradlight.preflight_check",
    "read_run_info": "gradlight.runfolder",
}

__all__ = [
    "GLOBAL_LAYER",
    "ActivationStats",
    "ActivationTaps",
    "Collectives",
    "DiagnosisConfig",
    "Finding",
    "GradientAnomalyError",
    "GradientDiagnosis",
    "GradientFlowMixin",
    "GradientFlowMonitor",
    "GradientFlowRecorder",
    "GradientFlowSpec",
    "GradientFlowTracker",
    "HistoryExistsError",
    "ModelProfile",
    "PreflightReport",
    "RecorderOptions",
    "RunFolder",
    "RunInfo",
    "StepRecord",
    "UnsupportedFormatError",
    "__version__",
    "load_findings",
    "load_history",
    "preflight",
    "read_run_info",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gradlight' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from gradlight.activations import ActivationStats, ActivationTaps
    from gradlight.collectives import Collectives
    from gradlight.diagnosis.config import DiagnosisConfig
    from gradlight.diagnosis.engine import GradientDiagnosis
    from gradlight.diagnosis.finding import GradientAnomalyError
    from gradlight.diagnosis.profile import ModelProfile
    from gradlight.history import load_history
    from gradlight.mixin import GradientFlowMixin
    from gradlight.monitor import GradientFlowMonitor
    from gradlight.options import RecorderOptions
    from gradlight.preflight_check import PreflightReport, preflight
    from gradlight.recorder import GradientFlowRecorder
    from gradlight.records import GLOBAL_LAYER, Finding
    from gradlight.runfolder import RunFolder, RunInfo, UnsupportedFormatError, load_findings, read_run_info
    from gradlight.runwriter import HistoryExistsError
    from gradlight.spec import GradientFlowSpec
    from gradlight.tracker import GradientFlowTracker, StepRecord
