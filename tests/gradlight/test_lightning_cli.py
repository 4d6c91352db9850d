"""The LightningCLI example in ``configs/lightning_cli`` runs and configures the monitor as written."""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from gradlight import DiagnosisConfig, GradientFlowMonitor, load_history, read_run_info

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lightning_cli" / "monitor.yaml"


def test_the_lightning_cli_example_runs_with_its_diagnosis_config(tmp_path: Path) -> None:
    written = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]["init_args"]
    args = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = LightningCLI(args=args)

    (monitor,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, GradientFlowMonitor)]
    expected = DiagnosisConfig(**written["diagnosis"]["init_args"])
    assert monitor.options.diagnosis == expected != DiagnosisConfig()
    assert monitor.options.on_anomaly == written["on_anomaly"]
    assert cli.trainer.global_step == 8
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    history = load_history(log_dir / "gradlight")
    assert sorted(history.step.unique()) == [0, 2, 4, 6]
    info = read_run_info(log_dir / "gradlight")
    assert info is not None and info.model == "DemoModel" and [layer.name for layer in info.layers] == ["l1"]
