"""The summary scalars, figures and histograms reach the real loggers, read back from what each one wrote.

TensorBoard (event files), MLflow (a local file store), Weights & Biases (offline run files) and CSV, all
attached to one Trainer. Nothing reaches the network: W&B runs offline and MLflow writes a local folder.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from gradlight import GLOBAL_LAYER, GradientFlowMonitor, load_findings, load_history
from tests.gradlight.models import Net

QUIET: dict[str, Any] = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
LOGGED_STEPS = [0, 2, 4, 6]  # interval 2 over 8 optimizer steps
FIGURE_STEPS = [4, 8]  # the end of each of the two epochs (4 steps each)
SUMMARY = ("gradflow/global_grad_l2", "gradflow/early_late_ratio", "gradflow/findings", "gradflow/notes")


def read_wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``run-*.wandb`` file (a LevelDB-style log: 32 KiB blocks of chunks).

    W&B 0.31 ships no Python reader for it, so the format is read here: a 7-byte file header, then chunks of
    ``crc32 (4) | length (2, little endian) | type (1: full, 2: first, 3: middle, 4: last) | data``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row of an offline W&B run: key -> JSON value."""
    (store,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in read_wandb_records(store):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the local file store behind this flag
        return _logged_run(root)


def _logged_run(root: Path) -> dict[str, Any]:
    loggers = {
        "tensorboard": TensorBoardLogger(root / "tb", name="run"),
        "csv": CSVLogger(root / "csv", name="run"),
        "mlflow": MLFlowLogger(experiment_name="gradlight", tracking_uri=f"file:{root / 'mlruns'}"),
        "wandb": WandbLogger(project="gradlight", save_dir=str(root), offline=True),
    }
    monitor = GradientFlowMonitor(2, root / "gradlight", log_histograms=True)
    trainer = L.Trainer(
        **QUIET, accelerator="cpu", devices=1, max_epochs=2, logger=list(loggers.values()), callbacks=[monitor]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net("mlp", samples=32, batch_size=8))
    loggers["wandb"].experiment.finish()
    history = load_history(root / "gradlight")
    expected = history[history.layer == GLOBAL_LAYER].pivot(index="step", columns="metric", values="value")
    findings = load_findings(root / "gradlight")
    return {"root": root, "loggers": loggers, "expected": expected, "findings": findings, "history": history}


def check_summary(steps_values: dict[str, dict[int, float]], run: dict[str, Any], rtol: float) -> None:
    """The summary scalars arrived at every logged step, with the history's values."""
    expected = run["expected"]
    for key in SUMMARY:
        assert sorted(steps_values[key]) == LOGGED_STEPS, key
    for step in LOGGED_STEPS:
        for name in ("global_grad_l2", "early_late_ratio"):
            assert steps_values[f"gradflow/{name}"][step] == pytest.approx(expected.loc[step, name], rel=rtol)
    warnings_found = int((run["findings"].severity == "warning").sum())
    assert warnings_found >= 1  # a 10-layer sigmoid MLP: the count is not vacuously 0
    assert steps_values["gradflow/findings"][LOGGED_STEPS[-1]] == warnings_found
    assert steps_values["gradflow/notes"][LOGGED_STEPS[-1]] == int((run["findings"].severity == "note").sum())


@pytest.mark.slow
def test_tensorboard_event_files_hold_scalars_figures_and_histograms(logged_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        logged_run["loggers"]["tensorboard"].log_dir, size_guidance={"images": 0, "scalars": 0, "histograms": 0}
    )
    events.Reload()
    tags = events.Tags()
    check_summary({key: {e.step: e.value for e in events.Scalars(key)} for key in SUMMARY}, logged_run, rtol=1e-6)
    for figure in ("gradflow/heatmap", "gradflow/profile"):
        images = events.Images(figure)
        assert [image.step for image in images] == FIGURE_STEPS
        assert all(image.width > 100 and image.height > 100 for image in images)
    layers = sorted(logged_run["history"].query("metric == 'grad_l2'").layer.unique())
    histograms = [tag for tag in tags["histograms"] if tag.startswith("gradflow/grad/")]
    assert sorted(histograms) == [f"gradflow/grad/{layer}" for layer in layers]
    assert [event.step for event in events.Histograms(histograms[0])] == LOGGED_STEPS


@pytest.mark.slow
def test_mlflow_file_store_holds_scalars_and_figure_artifacts(logged_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    logger = logged_run["loggers"]["mlflow"]
    client = MlflowClient(tracking_uri=f"file:{logged_run['root'] / 'mlruns'}")
    history = {key: {m.step: m.value for m in client.get_metric_history(logger.run_id, key)} for key in SUMMARY}
    check_summary(history, logged_run, rtol=1e-9)
    for figure in ("gradflow/heatmap", "gradflow/profile"):
        names = sorted(Path(item.path).name for item in client.list_artifacts(logger.run_id, figure))
        assert names == [f"step-{step:07d}.png" for step in FIGURE_STEPS]


@pytest.mark.slow
def test_wandb_offline_run_holds_scalars_and_images(logged_run: dict[str, Any]) -> None:
    (run_dir,) = (logged_run["root"] / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    values: dict[str, dict[int, float]] = {key: {} for key in SUMMARY}
    figures: dict[str, list[int]] = {"gradflow/heatmap": [], "gradflow/profile": []}
    for row in rows:
        step = int(row.get("trainer/global_step", -1))
        for key in SUMMARY:
            if key in row:
                values[key][step] = float(row[key])
        for key in figures:  # an image is logged as nested keys: <key>/_type, <key>/filenames, ...
            if f"{key}/_type" in row:
                assert row[f"{key}/_type"] == "images/separated" and row[f"{key}/format"] == "png"
                (filename,) = row[f"{key}/filenames"]
                assert (run_dir / "files" / filename).stat().st_size > 1000  # the PNG was written
                figures[key].append(step)
    check_summary(values, logged_run, rtol=1e-9)
    assert figures == {key: FIGURE_STEPS for key in figures}
    pngs = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == 2 * len(FIGURE_STEPS)


@pytest.mark.slow
def test_csv_logger_holds_the_summary_and_no_per_layer_columns(logged_run: dict[str, Any]) -> None:
    frame = pd.read_csv(Path(logged_run["loggers"]["csv"].log_dir) / "metrics.csv")
    values = {key: dict(zip(frame.step[frame[key].notna()], frame[key].dropna())) for key in SUMMARY}
    check_summary(values, logged_run, rtol=1e-9)
    assert not any("/grad_l2/" in column for column in frame.columns)
    np.testing.assert_array_equal(sorted(frame.step[frame["gradflow/global_grad_l2"].notna()]), LOGGED_STEPS)
