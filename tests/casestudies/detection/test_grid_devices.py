"""``--devices 2`` on a machine without GPUs: the Lightning variants train with DDP over two CPU processes.

With augmentation off and float64 (``--precision 64-true``), the two processes together record the gradient
history of one process on the same global batches: the images of each step are the same
(:class:`~casestudies.detection.data.GlobalBatchSampler`), BatchNorm uses the global batch's statistics and the
loss is the global batch's (:mod:`casestudies.detection.distributed`). float64 because in float32 the rounding
of two differently ordered reductions (already ~1e-5 after yolo11n's 24 blocks at the first step) grows from
step to step; the values are compared on the ``intact`` variant, which keeps every BatchNorm.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pandas as pd
import pytest
import torch

from casestudies.detection import grid
from gradlight import load_history
from tests.casestudies.detection.test_grid import CRASHING_CHILD, ROOT, SMOKE_VARIANTS, run_script

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of --devices (with GPUs it means GPUs)"),
]
EXACT = ("--preset", "smoke", "--no-augment", "--precision", "64-true")
#: Per-layer metrics compared between the runs (update ratios and norms of weights, gradients and the signal).
COMPARED = ("grad_l2", "grad_max_abs", "param_l2", "update_ratio", "signal_l2", "signal_in_l2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The smoke grid on 2 processes, its ``stripped_sigmoid`` run killed in epoch 1 and resumed; ``intact`` on 1."""
    root = tmp_path_factory.mktemp("devices")
    two = [*EXACT, "--devices", "2", "--out", str(root / "two")]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the injected child is a module of the tests package
        config = grid.config_from_args(grid.build_parser().parse_args(two))
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            crashed = grid.run_grid(config, child_command=(*CRASHING_CHILD, "stripped_sigmoid:1"))  # both ranks die
    interrupted = root / "two" / "runs" / "stripped_sigmoid"
    checkpoint = (interrupted / "checkpoints" / "last.ckpt").exists()
    state = {"checkpoint": checkpoint, "finished": grid.is_finished(interrupted)}
    resumed = run_script(*two, "--resume", timeout=900)
    one = run_script(*EXACT, "--variants", "intact", "--out", str(root / "one"), timeout=600)
    return {
        "crashed": crashed,
        "printed": printed.getvalue(),
        "state": state,
        "two": (resumed, root / "two"),
        "one": (one, root / "one"),
    }


def test_two_cpu_processes_write_a_summary_row_per_variant_and_a_report(runs):
    process, out = runs["two"]
    assert process.returncode == 0, process.stdout + process.stderr
    frame = pd.read_csv(out / "summary.csv")
    assert frame["variant"].tolist() == SMOKE_VARIANTS and (frame["status"] == "done").all()
    assert frame["devices"].tolist() == [2, 2, 1]
    for name in ("intact", "stripped_sigmoid"):
        result = json.loads((out / "runs" / name / "result.json").read_text())
        assert result["devices"] == 2 and result["optimizer_steps"] == 8, name
        assert "Starting with 2 processes" in (out / "runs" / name / "train.log").read_text()  # Lightning's DDP
    baseline = json.loads((out / "runs" / "ultralytics" / "result.json").read_text())
    assert baseline["devices"] == 1 and "Ultralytics' DDP needs CUDA" in baseline["devices_note"]
    log = (out / "runs" / "ultralytics" / "train.log").read_text()
    assert "ultralytics: --devices 2 without CUDA: Ultralytics' DDP needs CUDA" in log  # printed by the run ...
    assert "ultralytics: one process, Ultralytics' DDP needs CUDA (--devices 2)" in runs["printed"]  # ... and grid
    page = (out / "report.html").read_text()
    assert "Ablation grid: summary" in page and "could not be built" not in page
    assert (out / "report" / "intact_heatmap.png").stat().st_size > 1000


def test_two_cpu_processes_record_the_one_process_gradient_history(runs):
    (two, two_out), (one, one_out) = runs["two"], runs["one"]
    assert two.returncode == 0 and one.returncode == 0, one.stdout + one.stderr
    histories = [load_history(out / "runs" / "intact" / "gradlight") for out in (one_out, two_out)]
    keys = ["step", "layer", "metric"]
    assert not histories[1].duplicated(keys).any()  # one writer (rank zero), each record once
    for metric in ("grad_l2", "signal_l2"):  # the same layers (blocks) and steps
        grids = [h[h["metric"] == metric].pivot(index="layer", columns="step", values="value") for h in histories]
        assert grids[0].index.tolist() == grids[1].index.tolist() and list(grids[0].columns) == list(range(8))
    compared = [h[h["metric"].isin(COMPARED)].set_index(keys)["value"].sort_index() for h in histories]
    assert compared[0].index.equals(compared[1].index) and len(compared[0]) > 8 * 18 * len(COMPARED) // 2
    pd.testing.assert_series_equal(compared[1], compared[0], rtol=1e-5, atol=0.0)
    losses = [pd.read_csv(out / "runs" / "intact" / "loss.csv") for out in (one_out, two_out)]
    pd.testing.assert_frame_equal(losses[1], losses[0], rtol=1e-5)  # the global batch's loss, per image


def test_an_interrupted_two_process_run_resumes(runs):
    process, out = runs["two"]
    assert runs["crashed"] == 1 and runs["state"] == {"checkpoint": True, "finished": False}
    assert process.returncode == 0, process.stdout + process.stderr
    assert "intact: finished earlier, kept" in process.stdout
    run = out / "runs" / "stripped_sigmoid"
    result = json.loads((run / "result.json").read_text())
    assert result["resumed"] is True and result["devices"] == 2
    history = load_history(run / "gradlight")
    steps = history[history["metric"] == "grad_l2"].groupby("step")["layer"].count()
    assert steps.index.tolist() == list(range(8)) and steps.nunique() == 1  # each step once, every layer
