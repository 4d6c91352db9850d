"""The LightningCLI entry point runs the shipped configs, and its checkpoints load back for evaluation."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from casestudies.detection import offline

offline.configure_offline()

from casestudies.detection.__main__ import main  # noqa: E402
from casestudies.detection.checkpoint import load_trained_detector  # noqa: E402
from casestudies.detection.data import YoloDataModule  # noqa: E402
from casestudies.detection.evaluate import evaluate_detector  # noqa: E402
from casestudies.detection.module import DetectorModule  # noqa: E402
from gradlight import load_history  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "detection"
PRESETS = ["defaults", "synthetic", "coco8", "coco8_overfit", "coco", "cpu_ddp"]


def test_every_config_uses_valid_arguments() -> None:
    model_args = set(inspect.signature(DetectorModule).parameters)
    data_args = set(inspect.signature(YoloDataModule).parameters)
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(PRESETS)  # variants are chosen by --model.variant
    for path in CONFIGS.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert set(config.get("model", {})) <= model_args, path
        assert set(config.get("data", {})) <= data_args, path


def test_cli_fits_a_variant_with_the_monitor_and_the_checkpoint_evaluates(tmp_path: Path) -> None:
    root = tmp_path / "run"
    args = [
        "fit",
        *("--config", str(CONFIGS / "defaults.yaml")),
        *("--config", str(CONFIGS / "synthetic.yaml")),
        *("--model.variant", "stripped_sigmoid"),
        *("--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"),
        *("--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"),
        *("--data.synthetic_root", str(tmp_path / "shapes"), "--data.synthetic_train", "8"),
        *("--data.synthetic_val", "4", "--data.imgsz", "64", "--data.batch_size", "4", "--data.workers", "0"),
    ]
    cli = main(args)

    assert cli.model.ablation.describe() == "no_residual+no_bn+sigmoid@backbone"
    assert cli.model.recipe.nbs == 32 and cli.model.recipe.lr0 == 0.01  # one recipe for every variant
    assert cli.trainer.global_step == 2 and "val/map50_95" in cli.trainer.callback_metrics
    (log_dir,) = (root / "lightning_logs").iterdir()
    history = load_history(log_dir / "gradlight")
    assert list(history.step.unique()) == [0]  # defaults.yaml: the monitor logs every 5 steps
    model = load_trained_detector(str(log_dir / "checkpoints" / "last.ckpt"))
    raw = load_trained_detector(str(log_dir / "checkpoints" / "last.ckpt"), use_ema=False)
    ema_state, raw_state = model.state_dict(), raw.state_dict()
    assert ema_state.keys() == raw_state.keys()
    assert any(not torch.equal(ema_state[k], raw_state[k]) for k in ema_state)  # the EMA was saved and loaded
    scores = evaluate_detector(model, cli.datamodule.data, imgsz=64, batch=4)
    assert scores["images"] == 4 and 0.0 <= scores["map50_95"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU DDP config (with GPUs the presets' DDP applies)")
def test_the_cpu_ddp_config_trains_on_two_processes_with_the_cpu_batchnorm_plugin(tmp_path: Path) -> None:
    root = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "casestudies.detection", "fit"),
        *(arg for name in ("defaults", "synthetic", "cpu_ddp") for arg in ("--config", str(CONFIGS / f"{name}.yaml"))),
        *("--model.variant", "intact", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"),
        *("--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root)),
        *("--trainer.enable_progress_bar", "false", "--data.synthetic_root", str(tmp_path / "shapes")),
        *("--data.synthetic_train", "16", "--data.synthetic_val", "4", "--data.imgsz", "64", "--data.workers", "0"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Lightning's DDP launcher runs this command once more
    process = subprocess.run(command, cwd=CONFIGS.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "sync_dist=True" not in process.stderr  # the mAP every rank computed alike is logged as synchronised
    (log_dir,) = (root / "lightning_logs").iterdir()
    info = json.loads((log_dir / "gradlight" / "run.json").read_text())
    assert (info["world_size"], info["strategy"]) == (2, "DDPStrategy")
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())["trainer"]
    assert [plugin["class_path"] for plugin in saved["plugins"]] == [
        "casestudies.detection.distributed.CpuSyncBatchNorm"
    ]
    assert list(load_history(log_dir / "gradlight").step.unique()) == [0]
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
