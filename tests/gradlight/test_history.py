from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gradlight.history import (
    GLOBAL_LAYER,
    HistoryWriter,
    TruncatedHistoryWarning,
    find_history_dir,
    load_history,
    read_history,
)

ROOT = Path(__file__).resolve().parents[2]


def write_steps(save_dir: Path, steps: range, start_step: int = 0, offset: float = 0.0) -> HistoryWriter:
    writer = HistoryWriter(save_dir, start_step=start_step)
    for step in steps:
        writer.append_step(step, ["a", "b"], np.array([0, 1]), {"grad_l2": np.array([1.0, 2.0]) + step + offset})
        writer.append_global(step, {"global_grad_l2": float(step)})
        writer.flush()
    return writer


def test_round_trip_long_format(tmp_path: Path) -> None:
    write_steps(tmp_path, range(3)).close()
    history = load_history(tmp_path)
    assert list(history.columns) == ["step", "layer", "depth", "metric", "value"]
    assert len(history) == 9
    grads = history[history.metric == "grad_l2"]
    assert grads.value.tolist() == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0]
    assert set(history[history.layer == GLOBAL_LAYER].depth) == {-1}
    assert load_history(tmp_path, metrics=["global_grad_l2"]).value.tolist() == [0.0, 1.0, 2.0]


def test_torn_tail_keeps_every_complete_batch(tmp_path: Path) -> None:
    writer = write_steps(tmp_path, range(4))
    writer._sink.close()  # the process dies: no end-of-stream marker
    size = writer.path.stat().st_size
    with open(writer.path, "r+b") as handle:
        handle.truncate(size - 17)
    with pytest.warns(TruncatedHistoryWarning, match="kept the 9 rows"):
        history = load_history(tmp_path)
    assert sorted(history.step.unique()) == [0, 1, 2]
    assert read_history(tmp_path).truncated


def test_a_segment_torn_before_its_schema_is_skipped(tmp_path: Path) -> None:
    write_steps(tmp_path, range(2)).close()
    broken = tmp_path / "history" / "segment-00001.arrow"
    broken.write_bytes(b"\xff\xff")
    with pytest.warns(TruncatedHistoryWarning):
        history = load_history(tmp_path)
    assert sorted(history.step.unique()) == [0, 1]


def test_later_segment_supersedes_recomputed_steps(tmp_path: Path) -> None:
    write_steps(tmp_path, range(6)).close()
    write_steps(tmp_path, range(3, 8), start_step=3, offset=100.0).close()
    history = load_history(tmp_path)
    assert not history.duplicated(["step", "layer", "metric"]).any()
    grads = history[(history.metric == "grad_l2") & (history.layer == "a")]
    assert grads.value.tolist() == [1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0, 108.0]


def test_memory_is_bounded_by_automatic_flushes(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path, max_buffered_rows=10)
    for step in range(20):
        writer.append_step(step, ["a", "b"], np.array([0, 1]), {"grad_l2": np.ones(2), "param_l2": np.ones(2)})
        assert writer.buffered_rows < 10
    writer.close()
    assert len(load_history(tmp_path)) == 80


def test_missing_and_empty_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_history(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no gradlight history"):
        find_history_dir(tmp_path)
    with pytest.raises(ValueError, match="max_buffered_rows"):
        HistoryWriter(tmp_path, max_buffered_rows=0)


KILLED_RUN = textwrap.dedent(
    """
    import sys, torch, lightning as L
    from gradlight import GradientFlowMonitor
    from tests.gradlight.models import Net
    monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=sys.argv[1], flush_every_n_records=1)
    trainer = L.Trainer(max_epochs=10_000, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Net("mlp", samples=4096, batch_size=4))
    """
)


def test_a_killed_training_run_leaves_a_readable_history(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=env, cwd=ROOT)
    segment = tmp_path / "history" / "segment-00000.arrow"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and (not segment.exists() or segment.stat().st_size < 60_000):
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert segment.exists(), "the training run wrote no history in time"
    history = read_history(tmp_path).frame
    assert history.step.nunique() >= 10
    rows_per_step = history.groupby("step").size()
    assert (rows_per_step == rows_per_step.iloc[0]).all(), "a step was written only in part"
