"""gradlight: see how gradients flow through your network while it trains."""

__version__ = "0.1.0"

from gradlight.history import GLOBAL_LAYER, load_history
from gradlight.mixin import GradientFlowMixin, GradientFlowSpec
from gradlight.monitor import GradientFlowMonitor
from gradlight.tracker import GradientFlowTracker, StepRecord

__all__ = [
    "GLOBAL_LAYER",
    "GradientFlowMixin",
    "GradientFlowMonitor",
    "GradientFlowSpec",
    "GradientFlowTracker",
    "StepRecord",
    "__version__",
    "load_history",
]
