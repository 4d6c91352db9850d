"""The code blocks of README.md and docs/frontends.md run as written, on tiny models.

A block marked ``<!-- snippet: NAME -->`` in the Markdown is extracted and run: Python with the names it
assumes (``model``, ``loader``, ``datamodule``, ...) bound to tiny real objects, ``gradlight report`` and
``python train.py ...`` command lines through ``gradlight.cli.main`` and ``LightningCLI``. A few snippets
name things a CPU test cannot have (four GPUs, ten epochs of COCO8); each such text is replaced by a stated
CPU equivalent, and the test fails if the text is no longer in the snippet. Every marked snippet must have a
test here, and every test's snippet must exist: editing, renaming or dropping one breaks a test.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, DemoModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlight import DiagnosisConfig, GradientFlowMonitor, GradientFlowRecorder, load_findings, load_history
from gradlight.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "frontends.md")
MARKER = re.compile(r"<!-- snippet: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)
TINY_TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def snippets() -> dict[str, tuple[str, str]]:
    """``name -> (language, code)`` of every marked block."""
    found: dict[str, tuple[str, str]] = {}
    for doc in DOCS:
        for name, language, code in MARKER.findall(doc.read_text()):
            assert name not in found, f"snippet {name!r} is marked twice"
            found[name] = (language, code)
    return found


def code_of(name: str, replace: tuple[tuple[str, str], ...] = ()) -> str:
    _, code = snippets()[name]
    for old, new in replace:
        assert old in code, f"snippet {name!r} no longer contains {old!r}: update the test with the snippet"
        code = code.replace(old, new)
    return code


def run_python(name: str, namespace: dict[str, Any], replace: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    assert snippets()[name][0] == "python"
    exec(compile(code_of(name, replace), f"<snippet {name}>", "exec"), namespace)
    return namespace


def commands(name: str) -> list[list[str]]:
    """The snippet's command lines (continuations joined, comments dropped), split like a shell."""
    assert snippets()[name][0] == "bash"
    text = code_of(name).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def announced(caplog: pytest.LogCaptureFixture, run_folder: Path) -> bool:
    return f"gradlight: writing the run to {run_folder.resolve()}" in caplog.text


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="gradlight")


def tiny_regression() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    return {
        "model": model,
        "loader": DataLoader(data, batch_size=8),
        "loss_fn": nn.functional.mse_loss,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "epochs": 2,
    }


# ---------------------------------------------------------------------------------------------- README
@pytest.mark.slow
def test_readme_first_run_finds_the_vanishing_gradient_and_writes_the_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = run_python("readme-first-run", {})
    run = tmp_path / "runs" / "first" / "gradlight"
    assert announced(caplog, run)
    findings = load_findings(run)
    assert "vanishing" in set(findings.kind)  # what the README says the example shows
    for command in commands("readme-first-report"):
        assert command[0] == "gradlight"
        assert main(command[1:]) == 0
    assert (tmp_path / "runs" / "first" / "report" / "report.html").is_file()
    assert "findings" in namespace


def test_readme_lightning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    namespace = {"model": DemoModel(), "datamodule": BoringDataModule(), "TINY": TINY_TRAINER}
    replace = (("L.Trainer(callbacks=[monitor])", "L.Trainer(callbacks=[monitor], max_steps=20, **TINY)"),)
    run_python("readme-lightning", namespace, replace)
    assert announced(caplog, tmp_path / "runs" / "exp1" / "gradlight")
    assert sorted(namespace["history"].step.unique()) == [0, 10]


# ---------------------------------------------------------------------------------- docs/frontends.md
def test_lightning_and_report_without_arguments(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    namespace = run_python("lightning", {"model": DemoModel(), "datamodule": BoringDataModule()})
    trainer = namespace["trainer"]
    assert announced(caplog, Path(trainer.log_dir) / "gradlight")
    assert Path(trainer.log_dir).parent.name == "lightning_logs"  # found below log_dir, one level down
    assert sorted(namespace["history"].step.unique()) == list(range(0, 64, 10))
    (command,) = commands("report-here")
    assert main(command[1:]) == 0 and (tmp_path / "report" / "report.html").is_file()


def _run_cli(command: list[str], tmp_path: Path) -> LightningCLI:
    """``python train.py fit ...`` with ``LightningCLI(MyModel, MyData)`` (the demo classes here)."""
    assert command[:3] == ["python", "train.py", "fit"]
    my_config = tmp_path / "my.yaml"
    my_config.write_text(yaml.safe_dump({"trainer": {"max_steps": 4, "log_every_n_steps": 2, **TINY_TRAINER}}))
    args = [str(my_config) if arg == "my.yaml" else arg for arg in command[2:]]
    args = [str(ROOT / arg) if arg.startswith("configs/") else arg for arg in args]
    return LightningCLI(DemoModel, BoringDataModule, args=[*args, "--trainer.default_root_dir", str(tmp_path)])


def _monitor(cli: LightningCLI) -> GradientFlowMonitor:
    (monitor,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, GradientFlowMonitor)]
    return monitor


def test_lightning_cli_config_file_layers_on_a_cli_with_model_and_data_classes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (command,) = commands("cli-yaml")
    cli = _run_cli(command, tmp_path)
    monitor = _monitor(cli)
    assert monitor.options.diagnosis == DiagnosisConfig(vanishing_ratio=1e-4) != DiagnosisConfig()
    assert monitor.options.on_anomaly == {"non_finite": "raise", "exploding": "stop", "default": "warn"}
    assert cli.trainer.global_step == 4
    assert len(load_history(tmp_path)) > 0 and announced(caplog, Path(cli.trainer.log_dir) / "gradlight")
    # The entry the page shows is the file's.
    shown = yaml.safe_load(re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "frontends.md").read_text(), re.DOTALL)[1])
    written = yaml.safe_load((ROOT / "configs" / "lightning_cli" / "gradlight.yaml").read_text())
    shown_args = shown["trainer"]["callbacks"][0]["init_args"]
    assert {k: v for k, v in written["trainer"]["callbacks"][0]["init_args"].items() if k != "save_dir"} == shown_args


def test_lightning_cli_command_line_with_a_nested_diagnosis_config(tmp_path: Path) -> None:
    (command,) = commands("cli-args")
    cli = _run_cli(command, tmp_path)
    monitor = _monitor(cli)
    assert monitor.log_every_n_steps == 10
    assert monitor.options.diagnosis == DiagnosisConfig(vanishing_ratio=1e-4)
    assert sorted(load_history(tmp_path).step.unique()) == [0]


def test_lightning_cli_demo_config(tmp_path: Path) -> None:
    (command,) = commands("cli-demo")
    assert (
        command[:2] == ["python", "-c"]
        and command[2] == "from lightning.pytorch.cli import LightningCLI; LightningCLI()"
    )
    args = [str(ROOT / arg) if arg.startswith("configs/") else arg for arg in command[3:]]
    cli = LightningCLI(
        args=[*args, "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    )
    assert _monitor(cli).options.diagnosis != DiagnosisConfig() and cli.trainer.global_step == 8


def test_mixin_with_its_monitor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    namespace = run_python("mixin", {})
    history = load_history(tmp_path)  # logger=False: <default_root_dir>/gradlight
    assert set(history[history.layer != "__global__"].layer) == {"body.0", "body.2", "head"}
    assert sorted(history.step.unique()) == [0, 2]
    assert namespace["trainer"].callback_metrics["early_late"] > 0  # the module read its latest record


@pytest.mark.parametrize("name", ["plain", "readme-plain"])
def test_plain_loop(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_python(name, tiny_regression())
    run = tmp_path / "runs" / "exp2" / "gradlight"
    assert announced(caplog, run)
    assert sorted(load_history(run).step.unique()) == [0, 10]  # 2 epochs of 8 batches, one step count
    assert "loss" in set(load_history(run).metric)


def test_readme_preflight(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = tiny_regression()
    namespace["batch"] = next(iter(namespace["loader"]))
    before = [p.detach().clone() for p in namespace["model"].parameters()]
    report = run_python("readme-preflight", namespace)["report"]
    assert report.ok and all(report.checks.values())
    assert all(torch.equal(a, b) for a, b in zip(before, namespace["model"].parameters()))  # restored
    assert "gradlight preflight: ok" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["fabric", "readme-fabric"])
def test_fabric(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    replace = (('accelerator="cuda", devices=4, strategy="ddp"', 'accelerator="cpu", devices=1, strategy="auto"'),)
    run_python(name, {**tiny_regression(), "L": L, "GradientFlowRecorder": GradientFlowRecorder}, replace)
    run = tmp_path / "runs" / "exp3" / "gradlight"
    assert announced(caplog, run)
    assert sorted(load_history(run).step.unique()) == [0]


def _ultralytics(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from casestudies.detection import offline
    from casestudies.detection.synthetic import generate_shapes_dataset

    offline.configure_offline()
    data = generate_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=4, imgsz=64)
    overrides = f'data={str(data)!r}, epochs=1, imgsz=64, batch=4, device="cpu", workers=0, val=False, nbs=4'
    overrides += f", plots=False, amp=False, project={str(tmp_path / 'runs' / 'detect')!r}, name='train'"
    run_python(name, {}, (('data="coco8.yaml", epochs=10', overrides),))
    run = tmp_path / "runs" / "detect" / "train" / "gradlight"
    assert announced(caplog, run)
    assert len(load_history(tmp_path / "runs")) > 0  # found below the project folder


@pytest.mark.slow
def test_ultralytics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _ultralytics("ultralytics", tmp_path, caplog)


@pytest.mark.slow
def test_readme_ultralytics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _ultralytics("readme-ultralytics", tmp_path, caplog)


def _huggingface(tmp_path: Path) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from tests.gradlight.test_huggingface import Tokens

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        max_grad_norm=0.5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return {"model": model, "args": args, "data": Tokens()}


@pytest.mark.slow
def test_huggingface_logs_join_on_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    namespace = run_python("huggingface", _huggingface(tmp_path))
    assert announced(caplog, tmp_path / "hf" / "gradlight")
    norm, logged = namespace["norm"], namespace["logged"]
    assert sorted(logged) == sorted(norm.index) == [1, 2, 3]
    for step, value in logged.items():
        assert abs(norm[step] - value) <= 1e-6 * max(1.0, abs(value)), step


@pytest.mark.slow
def test_readme_huggingface(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    namespace = _huggingface(tmp_path)
    namespace["args"].max_steps = 10  # the snippet records every 10 optimizer steps: the Trainer's step 10
    run_python("readme-huggingface", namespace)
    assert announced(caplog, tmp_path / "hf" / "gradlight")
    assert sorted(load_history(tmp_path / "hf").step.unique()) == [10]


#: Every marked snippet, each run by a test above.
TESTED = {
    "readme-first-run",
    "readme-first-report",
    "readme-lightning",
    "readme-plain",
    "readme-preflight",
    "readme-fabric",
    "readme-ultralytics",
    "readme-huggingface",
    "lightning",
    "report-here",
    "cli-yaml",
    "cli-args",
    "cli-demo",
    "mixin",
    "plain",
    "fabric",
    "ultralytics",
    "huggingface",
}


def test_every_snippet_has_a_test() -> None:
    assert set(snippets()) == TESTED
