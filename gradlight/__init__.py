"""gradlight: see how gradients flow through your network while it trains."""

__version__ = "0.1.0"

from gradlight.activations import ActivationStats, ActivationTaps
from gradlight.diagnosis import (
    DiagnosisConfig,
    Finding,
    GradientAnomalyError,
    GradientDiagnosis,
    ModelProfile,
    load_findings,
)
from gradlight.history import GLOBAL_LAYER, load_history
from gradlight.mixin import GradientFlowMixin, GradientFlowSpec
from gradlight.monitor import GradientFlowMonitor
from gradlight.tracker import GradientFlowTracker, StepRecord

__all__ = [
    "GLOBAL_LAYER",
    "ActivationStats",
    "ActivationTaps",
    "DiagnosisConfig",
    "Finding",
    "GradientAnomalyError",
    "GradientDiagnosis",
    "GradientFlowMixin",
    "GradientFlowMonitor",
    "GradientFlowSpec",
    "GradientFlowTracker",
    "ModelProfile",
    "StepRecord",
    "__version__",
    "load_findings",
    "load_history",
]
