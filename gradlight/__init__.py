"""gradlight: see how gradients flow through your network while it trains."""

__version__ = "0.1.0"

from gradlight.activations import ActivationStats, ActivationTaps
from gradlight.diagnosis import (
    DiagnosisConfig,
    Finding,
    GradientAnomalyError,
    GradientDiagnosis,
    ModelProfile,
)
from gradlight.history import load_history
from gradlight.mixin import GradientFlowMixin, GradientFlowSpec
from gradlight.monitor import GradientFlowMonitor
from gradlight.preflight import PreflightReport, preflight
from gradlight.recorder import Collectives, GradientFlowRecorder, HistoryExistsError, RecorderOptions
from gradlight.runfolder import GLOBAL_LAYER, RunFolder, RunInfo, UnsupportedFormatError, load_findings, read_run_info
from gradlight.tracker import GradientFlowTracker, StepRecord

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
