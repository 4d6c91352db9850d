"""The run folder: layout, typed run info, the one findings reader, and the format version checked on read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gradlight import (
    Finding,
    RunFolder,
    RunInfo,
    UnsupportedFormatError,
    load_findings,
    load_history,
    read_run_info,
)
from gradlight.cli import EXIT_BAD_INPUT, main
from gradlight.history import HistoryWriter
from gradlight.runfolder import FindingsWriter, LayerInfo, read_findings


def write_segment(path: Path, metadata: dict[bytes, bytes]) -> None:
    """One history segment written with pyarrow directly (not gradlight's writer), with the given metadata."""
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("layer", pa.string()),
            ("depth", pa.int32()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    ).with_metadata(metadata)
    batch = pa.record_batch(
        [pa.array([0]), pa.array(["fc"]), pa.array([0], pa.int32()), pa.array(["grad_l2"]), pa.array([1.5])],
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)


def test_a_history_in_a_newer_format_is_a_clear_error_naming_the_version(tmp_path: Path) -> None:
    segment = tmp_path / "history" / "segment-00000.arrow"
    write_segment(segment, {b"gradlight.format": b"1", b"gradlight.start_step": b"0"})
    assert load_history(tmp_path).value.tolist() == [1.5]  # the same file in the current format reads
    write_segment(segment, {b"gradlight.format": b"7", b"gradlight.start_step": b"0"})
    newer = r"format version 7, .* reads versions 1 to 1: it was written by a newer gradlight; upgrade"
    with pytest.raises(UnsupportedFormatError, match=newer) as error:
        load_history(tmp_path)
    assert error.value.found == 7 and error.value.path == segment


def test_gradlight_report_on_a_newer_history_exits_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_segment(tmp_path / "run" / "history" / "segment-00000.arrow", {b"gradlight.format": b"2"})
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-progress"]) == EXIT_BAD_INPUT
    assert "format version 2" in capsys.readouterr().err


def test_the_writer_stamps_the_current_format(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path, start_step=3)
    writer.append_step(3, ["fc"], np.array([0]), {"grad_l2": np.array([2.0])})
    writer.close()
    (segment,) = (tmp_path / "history").glob("segment-*.arrow")
    metadata = pa.ipc.open_stream(pa.OSFile(str(segment))).schema.metadata
    assert metadata[b"gradlight.format"] == b"1" and metadata[b"gradlight.start_step"] == b"3"


def test_run_info_round_trips_and_rejects_a_newer_format(tmp_path: Path) -> None:
    info = RunInfo(
        gradlight_version="0.1.0",
        trainer="ultralytics",
        log_every_n_steps=5,
        gradient_clip_val=10.0,
        gradient_clip_algorithm="norm",
        layers=[LayerInfo("model.0", 0, 464), LayerInfo("model.1", 1, 4672)],
        extra={"nbs": 64, "clip_value": 10.0},
    )
    info.write(tmp_path)
    payload = json.loads((tmp_path / "run.json").read_text())
    assert payload["nbs"] == 64 and payload["layers"][1] == {"name": "model.1", "depth": 1, "num_params": 4672}
    assert read_run_info(tmp_path) == info
    (tmp_path / "run.json").write_text(json.dumps({**payload, "format_version": 3}))
    with pytest.raises(UnsupportedFormatError, match="format version 3"):
        read_run_info(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({**payload, "format_version": "beta"}))
    with pytest.raises(UnsupportedFormatError, match=r"format version beta, .*: not a valid version"):
        read_run_info(tmp_path)
    assert read_run_info(tmp_path / "missing") is None


def test_run_info_written_before_the_format_key_reads_as_version_1() -> None:
    old = {"gradlight_version": "0.1.0", "log_every_n_steps": 50, "world_size": 2, "layers": [], "strategy": "DDP"}
    info = RunInfo.from_dict(old)
    assert (info.format_version, info.trainer, info.world_size, info.extra) == (1, "lightning", 2, {})


def test_the_findings_reader_returns_what_it_skipped(tmp_path: Path) -> None:
    writer = FindingsWriter(tmp_path)
    writer.append([Finding("vanishing", "a", 0, 2, "m", "c", "r", {"ratio": 1e-7}, ["a"])])
    writer.append([Finding("dormant", "b", 1, 5, "first copy", "c", "r")])
    with open(tmp_path / "findings.jsonl", "a") as sink:
        sink.write('["not", "an", "object"]\n')
        sink.write('{"kind": "exploding", "layer": "c", "message": "no step"}\n')
        sink.write('{"kind": "dormant", "layer": "b", "step": 1, "message": "resumed copy"}\n')  # no reported_step
        sink.write('{"kind": "exploding", "lay')
    result = read_findings(tmp_path)
    assert [(line.number, line.reason) for line in result.skipped] == [
        (3, "not a JSON object"),
        (4, "no integer step"),
        (6, "torn last line"),
    ]
    frame = result.frame
    assert frame[["kind", "layer", "step", "reported_step"]].values.tolist() == [
        ["dormant", "b", 1, 1],  # the resumed copy replaced the first one; reported_step defaults to step
        ["vanishing", "a", 0, 2],
    ]
    assert frame.message.tolist() == ["resumed copy", "m"]
    assert frame.severity.tolist() == ["warning", "warning"]  # files written before severity existed
    with pytest.warns(UserWarning, match="skipped line 6 \\(torn last line\\)"):
        assert len(load_findings(tmp_path / "findings.jsonl")) == 2


def test_clear_removes_exactly_the_run_files(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    write_segment(folder.history_dir / "segment-00000.arrow", {b"gradlight.format": b"1"})
    folder.findings_file.write_text("{}\n")
    folder.run_info_file.write_text("{}")
    (tmp_path / "checkpoint.ckpt").write_text("keep me")
    assert folder.has_history()
    folder.clear()
    assert not folder.has_history() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.ckpt"]
    with pytest.raises(ValueError, match="is a file"):
        RunFolder(tmp_path / "checkpoint.ckpt").check_usable()
