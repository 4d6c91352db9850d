"""The fast slice of the robustness matrix (``benchmarks/robustness``; the whole matrix is
``python -m benchmarks.robustness_matrix``, its last result in ``docs/robustness.md``).

Every case trains a small model of one parameter kind in one loop shape at one precision with the recorder (or
the Lightning monitor) and checks the invariants: no exception, every logged step once (after a kill and a
resume too), every layer's ``grad_l2`` equal to an independent reference, and the diagnosis quiet on a
healthy setup (reporting exactly the fault of a faulty one). The slice covers every kind, every loop shape and
every precision at least once; it holds the combinations that pass on this branch (see the docs for the rest).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.robustness.harness import Run
from benchmarks.robustness.kinds import KINDS
from benchmarks.robustness.loops import LOOPS, one_optimizer
from benchmarks.robustness.matrix import INTERVAL, Case, all_cases, check, run_case
from benchmarks.robustness.precision import PRECISIONS

#: Left out of the slice here: the inductor compile takes ~40 s a case on CPU (the benchmark runs it).
SLOW_OR_FAILING = {"compiled_inductor"}

FAST = [
    # every kind, the plainest loop
    *(f"{kind}-one_optimizer-fp32" for kind in KINDS if kind not in SLOW_OR_FAILING),
    # every plain loop shape, the plainest kind
    *(
        f"dense-{loop}-fp32"
        for loop, shape in LOOPS.items()
        if shape.frontend == "recorder" and loop != "one_optimizer"
    ),
    # every precision
    "dense-one_optimizer-bf16",
    "dense-one_optimizer-fp16",
    # crossings where two unusual things meet
    "sparse-kill_resume-fp16",
    "sparse-two_cadences-fp32",
    "complex-epoch_loop-bf16",
    "complex-accumulation-fp32",
    "lazy-kill_resume-fp32",
    "tied-two_alternating-bf16",
    "compiled-kill_resume-fp32",
    "parametrize-accumulation-fp16",
    "spectral_norm-epoch_loop-fp32",
    "frozen-epoch_loop-fp16",
    "detached-kill_resume-fp32",
    "layer_drop-kill_resume-bf16",
    "experts-epoch_loop-fp32",
    "detached-two_alternating-fp32",
    # the Lightning monitor
    "dense-lightning-fp16",
    "sparse-lightning-fp32",
    "complex-lightning_accumulation-bf16",
    "weight_norm-lightning-bf16",
    "reused-lightning_accumulation-fp32",
    "experts-lightning-fp32",
    "detached-lightning_manual_two-fp32",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("case_id", FAST)
def test_case_holds_every_invariant(tmp_path: Path, case_id: str) -> None:
    outcome = run_case(Case.parse(case_id), tmp_path)
    assert outcome.status == "pass", outcome.problems
    assert outcome.logged_steps >= 4


def test_the_fast_slice_covers_every_axis() -> None:
    cases = [Case.parse(case_id) for case_id in FAST]
    assert len(set(FAST)) == len(FAST)
    assert {c.kind for c in cases} == set(KINDS) - SLOW_OR_FAILING
    assert {c.loop for c in cases} == set(LOOPS) - SLOW_OR_FAILING
    assert {c.precision for c in cases} == set(PRECISIONS)
    assert set(cases) <= set(all_cases())
    assert len(all_cases()) == len(KINDS) * len(LOOPS) * len(PRECISIONS)


def test_the_invariants_catch_a_wrong_value_a_missing_step_and_a_missed_fault(tmp_path: Path) -> None:
    run = Run(tmp_path / "dense", INTERVAL)
    one_optimizer(KINDS["dense"], PRECISIONS["fp32"], run, True)
    assert check(run, frozenset()) == []
    step, layers = next(iter(run.references.items()))
    layer = next(iter(layers))
    off = replace(run, references={**run.references, step: {**layers, layer: layers[layer] * 1.01}})
    assert any(f"step {step} {layer}: grad_l2" in problem for problem in check(off, frozenset()))
    longer = replace(run, steps=run.steps + INTERVAL, logged={*run.logged, max(run.logged) + INTERVAL})
    assert any("logged steps: missing" in problem for problem in check(longer, frozenset()))
    assert any("expected ['no_gradient']" in problem for problem in check(run, frozenset({"no_gradient"})))


def test_a_setup_torch_itself_refuses_is_not_applicable(tmp_path: Path) -> None:
    # GradScaler cannot unscale complex gradients on CPU: not gradlight's failure, and reported as such
    outcome = run_case(Case("complex", "one_optimizer", "fp16"), tmp_path)
    assert outcome.status == "n/a"
    assert "fails without gradlight too" in outcome.problems[0]
