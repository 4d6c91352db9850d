"""The run-folder writer alone: a run folder from hand-built records, with no model, tracker or diagnosis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradlight import Collectives, HistoryExistsError, RunFolder, RunInfo, StepRecord, load_findings, load_history
from gradlight.records import Finding
from gradlight.runfolder import LayerInfo, read_run_info
from gradlight.runwriter import RunFolderWriter


def _record(step: int, norms: list[float]) -> StepRecord:
    return StepRecord(
        step,
        ["embed", "head"],
        np.array([0, 1]),
        {"grad_l2": np.array(norms)},
        {"global_grad_l2": float(np.linalg.norm(norms))},
    )


def _writer(folder: Path, *, flush_every: int = 100, overwrite: bool = False) -> RunFolderWriter:
    return RunFolderWriter(RunFolder(folder), Collectives(), flush_every, diagnose=True, overwrite=overwrite)


def _layers() -> list[LayerInfo]:
    return [LayerInfo("embed", 0, 10), LayerInfo("head", 1, 4)]


def test_a_run_folder_is_written_from_hand_built_records(tmp_path: Path) -> None:
    writer = _writer(tmp_path)
    writer.open(resumed=False, last_recorded_step=-1)
    info = RunInfo(gradlight_version="0", trainer="pytorch", log_every_n_steps=5)
    for step, norms in ((0, [1.0, 2.0]), (5, [0.5, 3.0])):
        writer.write(_record(step, norms), run_info=info, update_methods={"0": "sgd"}, layers=_layers)
    writer.write_findings([Finding("vanishing", "embed", 5, 5, "m", "c", "r")])
    writer.close()

    history = load_history(tmp_path)
    rows = history[(history.layer == "head") & (history.metric == "grad_l2")].sort_values("step")
    assert rows.step.tolist() == [0, 5] and rows.value.tolist() == [2.0, 3.0]
    assert writer.records_written == 2
    written = read_run_info(tmp_path)
    assert written is not None and [layer.name for layer in written.layers] == ["embed", "head"]
    assert written.update_ratio_methods == {"0": "sgd"}
    assert load_findings(tmp_path).layer.tolist() == ["embed"]


def test_run_info_is_rewritten_when_the_update_kernel_changes(tmp_path: Path) -> None:
    writer = _writer(tmp_path)
    writer.open(resumed=False, last_recorded_step=-1)
    info = RunInfo(gradlight_version="0", trainer="pytorch", log_every_n_steps=1)
    writer.write(_record(0, [1.0, 1.0]), run_info=info, layers=_layers)
    writer.write(_record(1, [1.0, 1.0]), run_info=info, kernel="eager: no CUDA", layers=_layers)
    writer.close()
    written = read_run_info(tmp_path)
    assert written is not None and written.extra["update_ratio_kernel"] == "eager: no CUDA"


def test_records_are_flushed_every_n_and_the_count_restarts(tmp_path: Path) -> None:
    writer = _writer(tmp_path, flush_every=2)
    writer.open(resumed=False, last_recorded_step=-1)
    writer.write(_record(0, [1.0, 1.0]))
    assert writer.records_since_flush == 1
    writer.write(_record(1, [1.0, 1.0]))
    assert writer.records_since_flush == 0
    assert sorted(load_history(tmp_path).step.unique().tolist()) == [0, 1]  # on disk before close
    writer.close()


def test_another_runs_history_raises_unless_resumed_or_overwritten(tmp_path: Path) -> None:
    first = _writer(tmp_path)
    first.open(resumed=False, last_recorded_step=-1)
    first.write(_record(0, [1.0, 1.0]))
    first.close()
    with pytest.raises(HistoryExistsError, match="already holds a gradlight history"):
        _writer(tmp_path).open(resumed=False, last_recorded_step=-1)
    resumed = _writer(tmp_path)
    resumed.open(resumed=True, last_recorded_step=0)
    resumed.write(_record(1, [2.0, 2.0]))
    resumed.close()
    assert sorted(load_history(tmp_path).step.unique().tolist()) == [0, 1]
    replaced = _writer(tmp_path, overwrite=True)
    replaced.open(resumed=False, last_recorded_step=-1)
    replaced.write(_record(7, [2.0, 2.0]))
    replaced.close()
    assert load_history(tmp_path).step.unique().tolist() == [7]


def test_without_a_folder_every_call_is_a_no_op() -> None:
    writer = RunFolderWriter(None, Collectives(), 1, diagnose=True)
    writer.open(resumed=False, last_recorded_step=-1)
    writer.write(_record(0, [1.0, 1.0]))
    writer.write_findings([Finding("vanishing", "embed", 0, 0, "m", "c", "r")])
    writer.close()
    assert not writer.is_open and writer.records_written == 0
