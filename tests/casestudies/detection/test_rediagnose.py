"""Replaying a finished run's recorded history through today's diagnosis (``casestudies.detection.rediagnose``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from casestudies.detection import rediagnose
from gradlight.history import HistoryWriter
from gradlight.tracker import early_late_ratio

FIXTURE = Path(__file__).parent / "data" / "no_bn_norms.json"


def write_run(run_dir: Path, variant: str) -> None:
    """A finished run folder holding the real per-block norms of ``variant`` from the fixture."""
    norms = json.loads(FIXTURE.read_text())
    entry, layers = norms["runs"][variant], norms["layers"]
    folder = run_dir / "gradlight"
    writer = HistoryWriter(folder)
    for step, values in zip(entry["steps"], np.asarray(entry["grad_l2"], dtype=np.float64), strict=True):
        writer.append_step(step, layers, np.arange(len(layers)), {"grad_l2": values})
        writer.append_global(step, {"early_late_ratio": early_late_ratio(values)})
    writer.close()
    sizes = [{"name": n, "depth": d, "num_params": s} for d, (n, s) in enumerate(zip(layers, entry["num_params"]))]
    (folder / "run.json").write_text(json.dumps({"layers": sizes}))
    (folder / "findings.jsonl").write_text("")  # trained by a diagnosis that found nothing
    (run_dir / "spec.json").write_text(json.dumps({"training": {"lr0": 0.01}}))
    (run_dir / "result.json").write_text("{}")


def test_the_replay_finds_the_starving_block_that_the_live_diagnosis_missed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for variant in ("no_bn", "intact"):
        write_run(tmp_path / "grid" / "runs" / variant, variant)
    (tmp_path / "grid" / "runs" / "unfinished" / "gradlight").mkdir(parents=True)  # no result.json: left out
    assert rediagnose.main([str(tmp_path / "grid"), "--csv", str(tmp_path / "t.csv")]) == 0
    table = pd.read_csv(tmp_path / "t.csv").set_index("run")
    assert set(table.index) == {"grid/runs/no_bn", "grid/runs/intact"}
    no_bn, intact = table.loc["grid/runs/no_bn"], table.loc["grid/runs/intact"]
    # the live file is empty; the fall is measured from step 0's level, reported once the window is full enough
    assert (no_bn["live"], no_bn["replayed"]) == ("-", "block 0 (from 0, at 24)")
    assert no_bn["fall_decades"] > 2.5 and intact["fall_decades"] < 1.5  # decades the early/late ratio fell
    assert (intact["live"], intact["replayed"]) == ("-", "-")
    assert "block 0 (from 0, at 24)" in capsys.readouterr().out


def test_a_folder_without_finished_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert rediagnose.main([str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err
