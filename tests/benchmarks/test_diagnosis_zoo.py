"""The diagnosis benchmark: the scoring function on hand-made findings, and the quick zoo subset end to end.

The quick subset trains real architectures (torchvision, transformers, an LSTM) with the monitor and asserts
the benchmark's verdicts: healthy runs get no warning-level finding, broken runs are flagged by class,
layer and time. Runs whose finding kind the diagnosis does not have yet (``no_gradient``, ``stalled``) fail
until it does: that is the benchmark's purpose, so nothing here is marked xfail.
"""

from __future__ import annotations

import doctest
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def zoo() -> Iterator[ModuleType]:
    """``benchmarks/diagnosis_zoo.py`` imported by path (``benchmarks`` is not a package; ``zoo`` sits beside it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location("diagnosis_zoo", BENCHMARKS / "diagnosis_zoo.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def scoring(zoo: ModuleType) -> ModuleType:
    return sys.modules["zoo.scoring"]


def finding(kind: str, layer: str, step: int, reported: int, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "layer": layer, "step": step, "reported_step": reported, **extra}


# ------------------------------------------------------------------------------------------------ scoring
def test_healthy_run_passes_with_a_note_and_lists_it(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("exploding", "__global__", 3, 5, severity="note")])
    verdict = scoring.score(frame, scoring.Expectation())
    assert verdict.passed
    assert verdict.notes == {"exploding": 1} and verdict.warnings == {}
    assert verdict.listed == ("exploding@__global__[note]",)


def test_healthy_run_fails_on_a_warning(scoring: ModuleType) -> None:
    frame = pd.DataFrame(
        [
            finding("exploding", "__global__", 3, 5, severity="note"),
            finding("vanishing", "m.q", 0, 2, severity="warning"),
        ]
    )
    verdict = scoring.score(frame, scoring.Expectation())
    assert not verdict.passed
    assert (verdict.kind, verdict.layer, verdict.reported_step) == ("vanishing", "m.q", 2)
    assert verdict.warnings == {"vanishing": 1} and verdict.notes == {"exploding": 1}


def test_missing_severity_column_or_value_counts_as_warning(scoring: ModuleType) -> None:
    assert not scoring.score(pd.DataFrame([finding("dormant", "m.fc", 0, 4)]), scoring.Expectation()).passed
    frame = pd.DataFrame([finding("dormant", "m.fc", 0, 4, severity=None)])
    assert scoring.with_severity(frame).severity.tolist() == ["warning"]


def test_unknown_severity_is_rejected(scoring: ModuleType) -> None:
    with pytest.raises(ValueError, match="severities"):
        scoring.with_severity(pd.DataFrame([finding("dormant", "m.fc", 0, 4, severity="info")]))


def test_healthy_run_without_findings_passes(scoring: ModuleType) -> None:
    assert scoring.score(pd.DataFrame(), scoring.Expectation()).passed


@pytest.mark.parametrize(
    ("reported", "passed"),
    [(10, True), (15, True), (16, False), (9, False)],
    ids=["at-onset", "five-steps-late", "six-steps-late", "before-onset"],
)
def test_broken_run_needs_the_finding_within_five_logged_steps(
    scoring: ModuleType, reported: int, passed: bool
) -> None:
    frame = pd.DataFrame([finding("non_finite", "m.layer3.0.conv2", reported, reported)])
    expectation = scoring.Expectation("non_finite", ("layer3.0.conv2",), onset=10)
    verdict = scoring.score(frame, expectation, prefix="m.")
    assert verdict.passed is passed
    if not passed:
        assert ("too late" if reported > 10 else "too early") in verdict.reason


def test_log_interval_widens_the_window_in_optimizer_steps(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("non_finite", "m.a", 20, 20)])
    expectation = scoring.Expectation("non_finite", ("a",), onset=10)
    assert not scoring.score(frame, expectation, prefix="m.").passed
    assert scoring.score(frame, expectation, prefix="m.", log_every=2).passed


def test_broken_run_fails_on_the_wrong_layer(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("non_finite", "m.fc", 10, 10, layers=["m.fc", "m.layer4.1.conv2"])])
    verdict = scoring.score(frame, scoring.Expectation("non_finite", ("layer3.*",), onset=10), prefix="m.")
    assert not verdict.passed
    assert verdict.reason == "wrong layer: m.fc"


def test_a_layer_listed_in_layers_counts_as_named(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("no_gradient", "m.conv1", 0, 3, layers=["m.conv1", "m.layer1.0.conv1"])])
    expectation = scoring.Expectation("no_gradient", ("layer1.*",))
    assert scoring.score(frame, expectation, prefix="m.").passed


def test_broken_run_fails_on_a_note_or_another_kind(scoring: ModuleType) -> None:
    expectation = scoring.Expectation("dormant", ("fc",))
    note = pd.DataFrame([finding("dormant", "m.fc", 0, 4, severity="note")])
    assert scoring.score(note, expectation, prefix="m.").reason == "no dormant warning (no warning at all)"
    other = pd.DataFrame([finding("vanishing", "m.fc", 0, 4)])
    verdict = scoring.score(other, expectation, prefix="m.")
    assert not verdict.passed and verdict.kind == "vanishing"


def test_accepted_kinds_and_any_layer(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("non_finite", "__global__", 2, 2)])
    assert not scoring.score(frame, scoring.Expectation("exploding", (scoring.ANY_LAYER,))).passed
    blow_up = scoring.Expectation("exploding", (scoring.ANY_LAYER,), also=("non_finite",))
    assert scoring.score(frame, blow_up).passed


def test_first_layer_pattern(scoring: ModuleType) -> None:
    frame = pd.DataFrame([finding("vanishing", "m.features.0", 0, 2)])
    expectation = scoring.Expectation("vanishing", (scoring.FIRST_LAYER,))
    assert scoring.score(frame, expectation, first_layer="m.features.0").passed
    assert not scoring.score(frame, expectation, first_layer="m.stem").passed
    assert not scoring.score(frame, expectation).passed  # unknown first layer: nothing can match


def test_expectation_and_score_validate_their_arguments(scoring: ModuleType) -> None:
    with pytest.raises(ValueError, match="`layers`"):
        scoring.Expectation("vanishing")
    with pytest.raises(ValueError, match="`onset`"):
        scoring.Expectation("vanishing", ("*",), onset=-1)
    with pytest.raises(ValueError, match="reported_step"):
        scoring.score(pd.DataFrame([{"kind": "dormant", "layer": "m.fc", "step": 0}]), scoring.Expectation())
    with pytest.raises(ValueError, match="`tolerance`"):
        scoring.score(pd.DataFrame(), scoring.Expectation(), tolerance=-1)


# Two optimizers taking turns (a GAN under manual optimization): the generator steps at 0, 2, 4, ...
GAN_STREAMS = ((0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15))
GAN_OWNER = {"m.generator.0": 0, "m.generator.2": 0, "m.discriminator.0": 1}


@pytest.mark.parametrize(
    ("layer", "reported", "passed"),
    [
        ("m.generator.2", 10, True),  # its optimizer's 6th step: 5 of its steps before it
        ("m.generator.2", 12, False),
        ("m.discriminator.0", 11, True),
        ("m.discriminator.0", 13, False),
        ("__global__", 10, True),  # a run-wide finding: the optimizer that stepped at its reported step
        ("__global__", 13, False),
    ],
)
def test_several_optimizers_count_the_steps_of_the_optimizer_that_owns_the_layer(
    scoring: ModuleType, layer: str, reported: int, passed: bool
) -> None:
    frame = pd.DataFrame([finding("no_gradient", layer, 0, reported)])
    expectation = scoring.Expectation("no_gradient", (scoring.ANY_LAYER,))
    streams = scoring.Streams(GAN_STREAMS, GAN_OWNER)
    verdict = scoring.score(frame, expectation, prefix="m.", streams=streams)
    assert verdict.passed is passed, verdict.reason
    # counted in all steps, as with one optimizer, a finding at step 10 would be 10 logged steps late
    assert not scoring.score(frame, expectation, prefix="m.").passed
    if not passed:
        assert "too late" in verdict.reason and "its optimizer's 6 logged steps from 0" in verdict.reason


def test_several_optimizers_window_starts_at_the_owners_first_step_after_the_onset(scoring: ModuleType) -> None:
    streams = scoring.Streams(GAN_STREAMS, GAN_OWNER)
    expectation = scoring.Expectation("non_finite", ("generator.*",), onset=5)
    # the generator's steps from the onset on: 6, 8, 10, 12, 14 (the window holds all five)
    on_time = pd.DataFrame([finding("non_finite", "m.generator.0", 6, 14)])
    assert scoring.score(on_time, expectation, prefix="m.", streams=streams).passed
    early = pd.DataFrame([finding("non_finite", "m.generator.0", 4, 4)])
    verdict = scoring.score(early, expectation, prefix="m.", streams=streams)
    assert not verdict.passed and verdict.reason.startswith("too early: reported at step 4, window 5-14")


def test_one_optimizer_streams_score_as_the_plain_window(scoring: ModuleType) -> None:
    streams = scoring.Streams((tuple(range(30)),), {"m.a": 0})
    expectation = scoring.Expectation("non_finite", ("a",), onset=10)
    for reported in (9, 10, 15, 16):
        frame = pd.DataFrame([finding("non_finite", "m.a", reported, reported)])
        with_streams = scoring.score(frame, expectation, prefix="m.", streams=streams)
        assert with_streams.passed is scoring.score(frame, expectation, prefix="m.").passed is (10 <= reported <= 15)


def test_a_manual_optimization_task_refuses_what_lightning_only_does_automatically(zoo: ModuleType) -> None:
    catalog, tasks, models = (sys.modules[f"zoo.{name}"] for name in ("catalog", "tasks", "models"))
    ring = tasks.GaussianRing()
    assert ring.networks == ("generator", "discriminator") and tasks.ImageClassification().networks == ()
    for regime in (catalog.Regime(accumulate=2), catalog.Regime(gradient_clip_val=1.0), catalog.Regime(warmup_steps=3)):
        with pytest.raises(ValueError, match="manual optimization"):
            catalog.ZooRun("gan", "torch.nn", models.mlp_gan, ring, regime)
    with pytest.raises(ValueError, match="`detach_fake=True` needs `toggle=False`"):
        tasks.GaussianRing(detach_fake=True)


def test_catalog_is_large_and_covers_every_fault_class(zoo: ModuleType) -> None:
    catalog = sys.modules["zoo.catalog"]
    runs = catalog.CATALOG
    assert len({r.name for r in runs}) == len(runs)
    # An architecture is a builder and its positional arguments (``tv_model("resnet18")``), whatever its options.
    architectures = {(getattr(r.model, "func", r.model).__name__, getattr(r.model, "args", ())) for r in runs}
    assert len(architectures) >= 25, sorted(architectures)
    broken = {r.expect.kind for r in runs if not r.expect.healthy}
    expected = {"vanishing", "exploding", "non_finite", "dormant", "stalled", "no_gradient", "saturated"}
    assert broken >= expected | {"dead_units"}
    quick = catalog.select(quick=True)
    assert any(r.expect.healthy for r in quick) and any(not r.expect.healthy for r in quick)
    with pytest.raises(ValueError, match="no run matches"):
        catalog.select("no_such_run*")


@pytest.mark.parametrize("name", ["catalog", "faults", "models", "runner", "scoring", "tasks"])
def test_docstring_examples(zoo: ModuleType, name: str) -> None:
    module = sys.modules.get(f"zoo.{name}") or importlib.import_module(f"zoo.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_cli_docstring_examples(zoo: ModuleType) -> None:
    result = doctest.testmod(zoo)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------------ quick zoo
@pytest.fixture(scope="module")
def quick_outcomes(zoo: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = sys.modules["zoo.catalog"].select(quick=True)
    outcomes = zoo.run_zoo(runs, tmp_path_factory.mktemp("zoo"), progress=False)
    return {outcome.run.name: outcome for outcome in outcomes}


#: The catalog's ``quick=True`` runs (``test_quick_names_match_the_catalog`` keeps this in step with it).
QUICK_RUNS = (
    "broken_gan_generator_detached",  # two optimizers: the generator's loss on fake.detach()
    "broken_gpt2_unused_projection",
    "broken_lstm_lr1e-12",
    "broken_resnet18_detached_layer2",
    "broken_resnet18_nan_at_10",
    "broken_resnet18_no_zero_grad",  # gradients never zeroed: a slow runaway, cause from the carry probe
    "broken_vgg11_huge_lr",  # exploding updates before the gradient blows up
    "broken_vgg11_sigmoid",
    "gan_mlp_ring",  # two optimizers, toggle_optimizer: a GAN that covers all 8 modes
    "hf_bert_tiny_clip",
    "hf_bart_layerdrop",  # whole layers skipped at random: no no_gradient
    "hf_gpt2",
    "lstm_long",  # converged: its early-to-late ratio swings by decades per batch, no trend
    "tv_convnext",
    "tv_resnet18",
    "tv_resnet18_frozen_backbone",  # a fresh head moving 40% per step, its loss falling
)


def test_quick_names_match_the_catalog(zoo: ModuleType) -> None:
    assert sorted(r.name for r in sys.modules["zoo.catalog"].select(quick=True)) == sorted(QUICK_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK_RUNS)
def test_quick_zoo_run_meets_its_target(quick_outcomes: dict[str, Any], name: str) -> None:
    outcome = quick_outcomes[name]
    assert outcome.error is None, outcome.error
    # The run is what it claims to be (checked from the history and a probe, not from the findings).
    assert outcome.check_ok, outcome.check
    verdict = outcome.verdict
    if outcome.run.expect.healthy:
        assert verdict.warnings == {}, verdict.reason
    else:  # a warning of its class, naming the faulty layer, within 5 logged steps of the onset
        assert verdict.passed, f"expected {outcome.run.expect.describe()}: {verdict.reason}; got {verdict.listed}"


@pytest.mark.slow
def test_quick_zoo_gan_pair_is_judged_per_network(quick_outcomes: dict[str, Any]) -> None:
    healthy, broken = quick_outcomes["gan_mlp_ring"], quick_outcomes["broken_gan_generator_detached"]
    assert healthy.check_ok and broken.check_ok, (healthy.check, broken.check)
    assert healthy.verdict.warnings == {}, healthy.verdict.reason
    warned = [f for f in broken.findings if f["severity"] == "warning"]
    assert [f["kind"] for f in warned] == ["no_gradient"], broken.verdict.listed
    # the generator's layers, reported on its own steps (even), the discriminator's never
    assert warned[0]["layer"].startswith("model.generator.") and warned[0]["reported_step"] % 2 == 0
    assert not any(f["layer"].startswith("model.discriminator") for f in broken.findings)
    assert broken.verdict.passed, broken.verdict.reason


@pytest.mark.slow
def test_quick_zoo_table_and_targets(zoo: ModuleType, quick_outcomes: dict[str, Any]) -> None:
    outcomes = list(quick_outcomes.values())
    assert sorted(quick_outcomes) == sorted(QUICK_RUNS)
    text = zoo.render(outcomes, 1.0)
    for outcome in outcomes:
        assert f"| {outcome.run.name} |" in text
    goals = zoo.targets(outcomes)
    healthy = [o for o in outcomes if o.run.expect.healthy]
    # Recounted from the findings as loaded from disk: a healthy run passes iff none of them is a warning.
    quiet = sum(all(f["severity"] == "note" for f in o.findings) for o in healthy)
    assert (goals["healthy"]["passed"], goals["healthy"]["runs"]) == (quiet, len(healthy))
    assert goals["broken"]["runs"] == len(outcomes) - len(healthy)
    assert f"{quiet}/{len(healthy)} ({'met' if quiet == len(healthy) else 'missed'})" in text
