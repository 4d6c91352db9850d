"""One detector per finding kind. Adding a kind is one file here and one line in :data:`DETECTORS`."""

from gradlight.diagnosis.detectors.activations import DeadUnitsDetector, SaturatedDetector
from gradlight.diagnosis.detectors.base import Detector, ForwardSeen, Reference, RunState, StepContext
from gradlight.diagnosis.detectors.dormant import DormantDetector
from gradlight.diagnosis.detectors.exploding import ExplodingDetector
from gradlight.diagnosis.detectors.no_gradient import NoGradientDetector
from gradlight.diagnosis.detectors.non_finite import NonFiniteDetector
from gradlight.diagnosis.detectors.stalled import StalledDetector
from gradlight.diagnosis.detectors.vanishing import VanishingDetector

__all__ = ["DETECTORS", "Detector", "ForwardSeen", "Reference", "RunState", "StepContext"]

#: Every detector, in the order the engine runs them (and :data:`gradlight.diagnosis.KINDS` lists them). On
#: steps whose gradients hold NaN/Inf only the non-finite, no-gradient and activation detectors run.
DETECTORS: tuple[type[Detector], ...] = (
    VanishingDetector,
    ExplodingDetector,
    NonFiniteDetector,
    DormantDetector,
    StalledDetector,
    NoGradientDetector,
    SaturatedDetector,
    DeadUnitsDetector,
)
