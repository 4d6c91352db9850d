"""``benchmarks/gpu_check.py`` in its CPU mode: it passes on the real code and fails when a check is broken."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import gradlight.compiled as compiled_kernels
import gradlight.stats
import gradlight.tracker
import gradlight.update_ratio

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


def _failed(results: list[Any]) -> list[str]:
    return [r.name for r in results if r.passed is False]


def test_the_cpu_mode_runs_every_check_and_passes(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    passed = ("stats/fp32", "stats/bf16-mixed", "stats/16-mixed", "sync/default", "sync/copy", "launches/default")
    fused = ("fused/adamw-foreach", "fused/adamw-fused", "fused/sgd-nesterov")
    for name in (*passed, "launches/copy", "memory/default", *fused):
        assert f"PASS  {name}" in out
    assert "memory/copy" in out and "overhead/yolo11n-128px/default" in out and "overhead/gpt2-1m/copy" in out


def test_a_wrong_statistic_fails_the_statistics_check(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    original = gradlight.stats.reduce_to_layers

    def off_by_a_thousandth(sums: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer_sums, layer_max = original(sums, *args)
        return layer_sums * 1.002, layer_max  # 1e-3 too large a norm

    monkeypatch.setattr(gradlight.stats, "reduce_to_layers", off_by_a_thousandth)
    results = gpu_check.run(CPU, checks=["stats"])
    assert _failed(results) == ["stats/fp32", "stats/bf16-mixed", "stats/16-mixed"]
    assert gpu_check.main(["--device", "cpu", "--checks", "stats"]) == 1


def test_a_host_read_in_the_hooks_fails_the_sync_check(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    original = gradlight.tracker.gradient_statistics

    def reads_a_value(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sq, top = original(*args, **kwargs)
        if float(top.max()) > 1e30:  # a host read (a device sync on a GPU)
            raise AssertionError("unexpected")
        return sq, top

    monkeypatch.setattr(gradlight.tracker, "gradient_statistics", reads_a_value)
    assert _failed(gpu_check.run(CPU, checks=["sync"])) == ["sync/default", "sync/copy"]


def test_a_parameter_sized_temporary_fails_the_memory_check(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gradlight.update_ratio, "_CHUNK_FRACTION", 1)  # one chunk: all parameters at once
    monkeypatch.setattr(gradlight.update_ratio, "_CPU_CHUNK_MAX", 1 << 40)
    monkeypatch.setattr(gradlight.update_ratio, "_per_tensor", lambda device: False)
    assert _failed(gpu_check.run(CPU, checks=["memory"])) == ["memory/default"]


def test_unknown_checks_are_refused(gpu_check: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"checks=\['speed'\] are not known"):
        gpu_check.run(CPU, checks=["speed"])


def test_a_wrong_reconstructed_update_fails_the_statistics_check(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = gradlight.update_ratio._adam_squares

    def two_percent_off(*args: Any) -> torch.Tensor:
        return original(*args) * 1.02**2  # the update norm 2% too large, the copy untouched

    monkeypatch.setattr(gradlight.update_ratio, "_adam_squares", two_percent_off)
    results = {r.name: r for r in gpu_check.run(CPU, checks=["stats"])}
    assert _failed(list(results.values())) == ["stats/fp32", "stats/bf16-mixed", "stats/16-mixed"]
    errors = dict(re.findall(r"(\w+) ([0-9.]+e[-+]\d+)", results["stats/fp32"].detail))
    assert float(errors["update_ratio"]) == pytest.approx(0.02, rel=1e-3)  # the default is what failed
    assert float(errors["update_ratio_copy"]) < 1e-3 and float(errors["grad_l2"]) < 1e-4


def test_a_wrong_fused_kernel_fails_the_fused_check(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def adam_off(m: torch.Tensor, v: torch.Tensor, p: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        r = (m / (v.sqrt() + coef[0]) + coef[1] * p).double()
        return (r * r).sum() * 1.0001  # 1e-4 too large: above the 1e-5 the fused and eager kernels must agree to

    monkeypatch.setitem(compiled_kernels.FUNCTIONS, "adam", adam_off)
    assert _failed(gpu_check.run(CPU, checks=["fused"])) == ["fused/adamw-foreach", "fused/adamw-fused"]


def test_a_failed_compilation_fails_the_fused_check(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(compiled_kernels, "FAILURES", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        results = gpu_check.run(CPU, checks=["fused"])
    assert _failed(results) == ["fused/adamw-foreach", "fused/adamw-fused", "fused/sgd-nesterov"]
    assert "torch.compile failed (RuntimeError: injected)" in results[0].detail
