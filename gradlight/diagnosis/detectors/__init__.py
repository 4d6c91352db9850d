"""One detector per finding kind. Adding a kind is one file here and one line in :data:`DETECTORS`."""

from gradlight.diagnosis.detectors.activations import DeadUnitsDetector, SaturatedDetector
from gradlight.diagnosis.detectors.base import Detector, ForwardSeen, Reference, RunState, StepContext
from gradlight.diagnosis.detectors.dormant import DormantDetector
from gradlight.diagnosis.detectors.exploding import ExplodingDetector
from gradlight.diagnosis.detectors.loss_oscillating import LossOscillatingDetector
from gradlight.diagnosis.detectors.loss_plateau import LossPlateauDetector
from gradlight.diagnosis.detectors.loss_rising import LossRisingDetector
from gradlight.diagnosis.detectors.no_gradient import NoGradientDetector
from gradlight.diagnosis.detectors.non_finite import NonFiniteDetector
from gradlight.diagnosis.detectors.stalled import StalledDetector
from gradlight.diagnosis.detectors.vanishing import VanishingDetector

__all__ = ["DETECTORS", "Detector", "ForwardSeen", "Reference", "RunState", "StepContext"]

#: Every detector, in the order the engine runs them (and :data:`gradlight.diagnosis.KINDS` lists them). On
#: steps whose gradients hold NaN/Inf only the non-finite, no-gradient, activation and loss detectors run (the
#: loss detectors skip a non-finite loss). The loss detectors come after ``exploding``, whose blow-up they defer to.
DETECTORS: tuple[type[Detector], ...] = (
    VanishingDetector,
    ExplodingDetector,
    NonFiniteDetector,
    DormantDetector,
    StalledDetector,
    NoGradientDetector,
    SaturatedDetector,
    DeadUnitsDetector,
    LossRisingDetector,
    LossOscillatingDetector,
    LossPlateauDetector,
)
