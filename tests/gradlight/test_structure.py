"""Structure: options declared once, validation derived from declarations, imports that point one way."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradlight import DiagnosisConfig, GradientFlowMonitor, GradientFlowRecorder, RecorderOptions
from gradlight.validation import Bounds


# ------------------------------------------------------------------------------------------- options
def test_every_diagnosis_threshold_declares_its_valid_values() -> None:
    undeclared = [f.name for f in dataclasses.fields(DiagnosisConfig) if "bounds" not in f.metadata]
    assert undeclared == []


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(DiagnosisConfig)])
def test_every_diagnosis_threshold_rejects_a_string_naming_itself(field: str) -> None:
    with pytest.raises(ValueError, match=f"DiagnosisConfig `{field}` must be .*, got 'x'"):
        DiagnosisConfig(**{field: "x"})


@pytest.mark.parametrize(
    ("bounds", "good", "bad"),
    [
        (Bounds(1, integer=True), [1, 7], [0, 1.0, True, None]),
        (Bounds(0, 1, low_open=True), [1e-9, 1.0, 1], [0.0, 1.5, float("nan"), None]),
        (Bounds(0, 1, high_open=True), [0.0, 0.999], [1.0, -0.1]),
        (Bounds(0, low_open=True, optional=True), [None, 3.0], [0.0, -1.0, False]),
    ],
)
def test_bounds_accept_exactly_their_range(bounds: Bounds, good: list[Any], bad: list[Any]) -> None:
    assert all(bounds.accepts(value) for value in good)
    assert not any(bounds.accepts(value) for value in bad)


def test_the_recorder_takes_one_options_object_and_flat_values_on_top() -> None:
    options = RecorderOptions(log_every_n_steps=7, exclude=("0.bias",))
    recorder = GradientFlowRecorder(nn.Sequential(nn.Linear(2, 2)), None, options, diagnose=False)
    assert recorder.options == dataclasses.replace(options, diagnose=False)
    assert recorder.diagnosis is None and recorder.tracker.layer_map.param_names == ["0.weight"]


def test_an_unknown_option_is_a_clear_error_naming_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown recording option 'log_every_n_step'.*log_every_n_steps"):
        GradientFlowRecorder(nn.Linear(2, 1), None, log_every_n_step=5)


def test_the_monitor_builds_its_options_from_its_arguments() -> None:
    monitor = GradientFlowMonitor(3, group_by=2, exclude=["head.*"], on_anomaly="stop", log_per_layer=True)
    assert monitor.options == RecorderOptions(log_every_n_steps=3, group_by=2, exclude=("head.*",), on_anomaly="stop")


def test_the_huggingface_callback_passes_options_through() -> None:
    from gradlight.integrations.huggingface import GradientFlowCallback

    options = RecorderOptions(log_every_n_steps=4, group_by=3)
    callback = GradientFlowCallback(options=options, track_backward_signal=True)
    assert callback.options == dataclasses.replace(options, track_backward_signal=True)
    assert callback.log_every_n_steps == 4
    assert GradientFlowCallback(group_by=3).log_every_n_steps is None  # the Trainer's logging_steps


def test_the_ultralytics_recording_round_trips_through_json(tmp_path: Path) -> None:
    from gradlight.integrations.ultralytics import UltralyticsRecording

    recording = UltralyticsRecording(
        str(tmp_path),
        "model",
        group_by=2,
        exclude=["model.model.23.*"],
        diagnosis=DiagnosisConfig(vanishing_ratio=1e-4),
        on_anomaly={"non_finite": "raise"},
    )
    assert UltralyticsRecording.from_json(recording.to_json()) == recording
    assert recording.options.log_every_n_steps == 10  # the Ultralytics default
    with pytest.raises(ValueError, match="`group_by` must be an int or None"):
        UltralyticsRecording(group_by=lambda name: name)


# ------------------------------------------------------------------------------------------- imports
def _loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with ``prefixes`` that ``statement`` leaves in ``sys.modules`` of a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [name for name in out.split() if name.startswith(prefixes)]


@pytest.mark.parametrize(
    "statement",
    [
        "import gradlight",
        "from gradlight import GradientFlowRecorder",
        "import gradlight.integrations.huggingface",
        "from gradlight.recorder import GradientFlowRecorder, Collectives; GradientFlowRecorder, Collectives",
    ],
)
def test_the_recorder_and_the_huggingface_callback_do_not_import_lightning(statement: str) -> None:
    assert _loaded_after(statement, ("lightning", "pytorch_lightning")) == []


def test_the_lightning_front_ends_still_load_from_the_package() -> None:
    assert _loaded_after("from gradlight import GradientFlowMonitor, GradientFlowMixin", ("lightning.pytorch",))


def test_reading_a_run_folder_imports_no_analysis_and_no_torch() -> None:
    statement = "import gradlight.report, gradlight.cli\nfrom gradlight import load_findings, load_history"
    assert _loaded_after(statement, ("gradlight.diagnosis", "torch", "lightning")) == []


def test_every_public_name_has_one_home_and_resolves() -> None:
    import gradlight

    assert set(gradlight.__all__) == {*gradlight._HOMES, "__version__"}
    for name, home in gradlight._HOMES.items():
        value = getattr(gradlight, name)
        assert value is getattr(importlib.import_module(home), name)
        assert name == "GLOBAL_LAYER" or value.__module__ == home  # defined there, not re-exported
    with pytest.raises(AttributeError, match="no attribute 'GradientFlowMonitr'"):
        _ = gradlight.GradientFlowMonitr


# ------------------------------------------------------------------------------------------- storage
WRITE_AND_READ_A_RUN_FOLDER = """
import sys
import numpy as np
from gradlight.history import HistoryWriter, load_history
from gradlight.records import GLOBAL_LAYER, Finding
from gradlight.report.summary import load_run
from gradlight.runfolder import FindingsWriter, LayerInfo, RunInfo, load_findings, read_run_info

folder = sys.argv[1]
writer = HistoryWriter(folder)
for step in (0, 10):
    writer.append_step(step, ["stem", "head"], np.array([0, 1]), {"grad_l2": np.array([1e-6, 1.0])})
    writer.append_global(step, {"global_grad_l2": 1.0, "loss": 2.0 - step / 10})
writer.close()
FindingsWriter(folder).append([Finding("vanishing", "stem", 0, 10, "stem 1e-6", "depth", "residuals")])
RunInfo("x", "pytorch", 10, layers=[LayerInfo("stem", 0, 4), LayerInfo("head", 1, 2)]).write(folder)

history = load_history(folder)
assert sorted(history.step.unique()) == [0, 10], history
assert set(history.layer) == {"stem", "head", GLOBAL_LAYER}
assert load_findings(folder).layer.tolist() == ["stem"]
assert [layer.name for layer in read_run_info(folder).layers] == ["stem", "head"]
run = load_run(folder)
assert [f["kind"] for f in run.findings] == ["vanishing"] and run.info["log_every_n_steps"] == 10
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "lightning") or
               name.startswith("gradlight.diagnosis"))
print(heavy)
"""


def test_a_run_folder_is_written_and_read_without_a_model_torch_or_the_diagnosis(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", WRITE_AND_READ_A_RUN_FOLDER, str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_package_ships_a_py_typed_marker() -> None:
    import importlib.resources

    assert (importlib.resources.files("gradlight") / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()  # tomllib: Python 3.11+
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^"gradlight" = \[[^\]]*"py\.typed"', section, re.MULTILINE), section


# -------------------------------------------------------------------------------------- drift fixes
def test_a_grad_scale_of_zero_is_a_clear_error_not_a_division_by_zero() -> None:
    net = nn.Linear(2, 1)
    recorder = GradientFlowRecorder(net, None, log_every_n_steps=1)
    net(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="`grad_scale` must be a positive finite number or None, got 0"):
        recorder.capture(0, torch.optim.SGD(net.parameters(), lr=0.1), grad_scale=0)


def test_an_older_state_without_counts_takes_both_counts_from_the_diagnosis_state() -> None:
    donor = GradientFlowRecorder(nn.Linear(2, 1), None)
    assert donor.diagnosis is not None
    donor.diagnosis.findings_count, donor.diagnosis.notes_count = 3, 2
    state = donor.state_dict()
    assert (state["warnings"], state["notes"]) == (3, 2)
    older = {key: value for key, value in state.items() if key not in ("warnings", "notes")}
    resumed = GradientFlowRecorder(nn.Linear(2, 1), None)
    resumed.load_state_dict(older)
    assert (resumed.warnings_count, resumed.notes_count) == (3, 2)


def test_ultralytics_run_info_keeps_the_world_size_it_names() -> None:
    from gradlight import RunInfo

    template = RunInfo("", "ultralytics", 10, world_size=4)
    recorder = GradientFlowRecorder(nn.Linear(2, 1), None, run_info=template)
    assert recorder.run_info.world_size == 4 and recorder.collectives.world_size == 1
