"""Diagnosis: say what is wrong with the gradient flow, where, since when, why, and what usually fixes it.

:class:`GradientDiagnosis` is Trainer-free. Feed it each logged step's :class:`~gradlight.tracker.StepRecord`
(plus the step's :class:`~gradlight.activations.ActivationStats` and loss when known) through
:meth:`GradientDiagnosis.update`; it returns the *new* :class:`Finding` objects, each reported once per kind,
layer and severity. Every finding is a ``warning`` (something is wrong: the recorder's ``on_anomaly`` acts on
it) or a ``note`` (worth knowing, expected in this situation). Kinds (:data:`KINDS`, one detector each in
:mod:`gradlight.diagnosis.detectors`, thresholds in :class:`DiagnosisConfig`):

* ``vanishing``: a layer's gradient stays orders of magnitude below the reference (the last matrix layers),
  or the early-to-late ratio falls into that range. Small by design is a note: a branch behind a near-zero
  residual gain (LayerScale, zero-initialised BatchNorm, ReZero), attention query/key projections at init.
* ``exploding``: gradient norms that rise far above their recent median and stay up, or pass an absolute
  threshold; clipping that acts on every step is a note.
* ``non_finite``: a gradient holds NaN/Inf; the finding names the layer closest to the loss.
* ``dormant``: a section's parameters do not move while the rest trains and the loss changes.
* ``stalled``: the weights as a whole (all layers' updates over all their norms) do not move measurably
  while the learning rate is not 0; one finding about the whole model, not per layer.
* ``no_gradient``: trainable parameters in the optimizer that get no gradient (never called, cut off).
* ``saturated`` / ``dead_units``: from activation taps.
* ``loss_rising`` / ``loss_oscillating`` / ``loss_plateau``: the training loss judged on its own (a climb above
  the untrained model's level, wide jumps without progress, no progress while the weights move).

Causes and remedies come from :data:`RULES`, a rule table evaluated against a :class:`ModelProfile` and the
finding's evidence. The package's parts: :mod:`~gradlight.diagnosis.config` (thresholds),
:mod:`~gradlight.diagnosis.profile` (the model), :mod:`~gradlight.diagnosis.rules` (the table),
:mod:`~gradlight.diagnosis.detectors` (one per kind), :mod:`~gradlight.diagnosis.engine` (runs them). The
findings file (``findings.jsonl``) belongs to the run folder: :mod:`gradlight.runfolder`.
"""

from gradlight.diagnosis.actions import ACTIONS, KINDS, resolve_actions
from gradlight.diagnosis.config import DiagnosisConfig
from gradlight.diagnosis.engine import GradientDiagnosis
from gradlight.diagnosis.finding import GradientAnomalyError
from gradlight.diagnosis.profile import ModelProfile, ResidualGain
from gradlight.diagnosis.rules import RULES, Rule, RuleContext, explain
from gradlight.diagnosis.windows import LayerWindows
from gradlight.records import SEVERITIES, Finding  # re-exported: `gradlight.diagnosis.Finding`

__all__ = [
    "ACTIONS",
    "KINDS",
    "RULES",
    "SEVERITIES",
    "DiagnosisConfig",
    "Finding",
    "GradientAnomalyError",
    "GradientDiagnosis",
    "LayerWindows",
    "ModelProfile",
    "ResidualGain",
    "Rule",
    "RuleContext",
    "explain",
    "resolve_actions",
]
