"""Per-tensor statistics, their declaration by name, and per-layer reduction (``gradlight.stats``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

import gradlight.compiled as compiled_kernels
import gradlight.stats as stats
from gradlight.compiled import GradientKernel
from gradlight.sharding import ShardedReduction
from gradlight.stats import (
    STACK_MAX_NUMEL,
    CpuKernels,
    FusedKernels,
    Kernels,
    LocalReduction,
    Statistic,
    StatisticSet,
    foreach_norms,
    gradient_statistics,
    kernels_for,
    nonfinite_counts,
    parameter_statistics,
    reduce_to_layers,
    snapshot,
    update_squares,
)
from gradlight.tracker import STEP_STATISTICS, GradientFlowTracker


def test_foreach_norms_mixed_dtypes_keep_input_order() -> None:
    tensors = [
        torch.tensor([3.0, 4.0]),
        torch.tensor([1.0, -7.0], dtype=torch.bfloat16),
        torch.tensor([[2.0]], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float16),
    ]
    assert foreach_norms(tensors).tolist() == pytest.approx([5.0, math.sqrt(50.0), 2.0, 0.5])
    assert foreach_norms(tensors, float("inf")).tolist() == pytest.approx([4.0, 7.0, 2.0, 0.5])
    assert foreach_norms(tensors).dtype == torch.float32


def test_bf16_norm_accumulates_in_float32() -> None:
    big = torch.full((100_000,), 0.01, dtype=torch.bfloat16)
    expected = float(big.float().norm())
    assert float(foreach_norms([big])[0]) == pytest.approx(expected, rel=1e-6)


def test_reduce_to_layers_sums_and_maxima_with_nan() -> None:
    sums = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    maxima = torch.tensor([[1.0, float("nan"), 5.0, 0.5]])
    layer_sums, layer_max = reduce_to_layers(sums, maxima, torch.tensor([1, 1, 0, 0]), 2)
    assert layer_sums.tolist() == [[7.0, 3.0]]
    assert layer_max[0, 0] == 5.0 and math.isnan(layer_max[0, 1])


def test_update_and_nonfinite_helpers() -> None:
    params = [torch.ones(3), torch.zeros(2)]
    before = snapshot(params)
    params[0] += 2.0
    assert update_squares(params, before).tolist() == pytest.approx([12.0, 0.0])
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert nonfinite_counts([bad, torch.ones(2)]).tolist() == [3.0, 0.0]


# ------------------------------------------------------------------------------------ the two paths
def _mixed_tensors(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """BatchNorm-like small tensors of repeated shapes between big, odd and empty ones."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16,), (8, 3, 3, 3), (16,), (STACK_MAX_NUMEL + 1,), (32,), (8, 3, 3, 3), (16,), (0,), (5,), (32,)]
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def test_cpu_kernels_stack_small_tensors_of_one_shape_and_one_dtype() -> None:
    kernels = CpuKernels.plan(_mixed_tensors())
    assert kernels.stacks == ((0, 2, 6), (1, 5), (4, 9))
    assert kernels.singles == (3, 7, 8)  # too big, empty, a shape of its own
    mixed = [torch.ones(4), torch.ones(4, dtype=torch.float64)]
    assert CpuKernels.plan(mixed).stacks == ()  # one kernel needs one dtype
    assert isinstance(kernels_for(mixed), CpuKernels)
    assert isinstance(kernels_for([]), FusedKernels)


def _all_kernels(tensors: list[torch.Tensor]) -> list[Kernels]:
    """The stacked CPU plan, the CPU plan with nothing stacked, and the fused path (run here on CPU)."""
    return [CpuKernels.plan(tensors), CpuKernels((), tuple(range(len(tensors))), None), FusedKernels()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_equals_per_tensor_references_in_input_order(dtype: torch.dtype) -> None:
    grads = _mixed_tensors(dtype)
    params = [g.flip(0) * 3 for g in grads]
    grads[2][3] = float("nan")  # inside a stack: propagates to that tensor only
    reference_sq = [float(g.double().square().sum()) for g in grads]
    reference_max = [float(g.double().abs().max()) if g.numel() else 0.0 for g in grads]
    rel = 1e-6 if dtype == torch.float32 else 1e-5  # half types accumulate in float32
    for kernels in _all_kernels(grads):
        grad_sq, grad_max = gradient_statistics(grads, kernels=kernels)
        assert grad_sq.dtype == torch.float64 and grad_max.dtype == torch.float32
        assert grad_sq.tolist() == pytest.approx(reference_sq, rel=rel, nan_ok=True)
        assert grad_max.tolist() == pytest.approx(reference_max, rel=1e-6, nan_ok=True)
        param_sq, before = parameter_statistics(params, copy=True, kernels=kernels)
        assert param_sq.tolist() == pytest.approx([float(p.double().square().sum()) for p in params], rel=rel)
        moved = [p + 0.5 for p in params]
        expected = [float((m.double() - p.double()).square().sum()) for m, p in zip(moved, params)]
        assert before is not None
        assert update_squares(moved, before).tolist() == pytest.approx(
            expected, rel=1e-2 if dtype != torch.float32 else 1e-6
        )


def test_the_cpu_path_is_bitwise_the_fused_one_on_single_tensors() -> None:
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=generator) for n in (5000, 70_001, 9000, 0)]
    params = [torch.randn(n, generator=generator) for n in (5000, 70_001, 9000, 0)]
    cpu, fused = CpuKernels.plan(grads), FusedKernels()
    assert cpu.stacks == ()
    for left, right in zip(gradient_statistics(grads, kernels=cpu), gradient_statistics(grads, kernels=fused)):
        assert torch.equal(left, right)
    (sq_a, before_a), (sq_b, before_b) = (parameter_statistics(params, kernels=k) for k in (cpu, fused))
    assert torch.equal(sq_a, sq_b) and before_a is not None and before_b is not None
    moved = [q * 1.5 for q in params]
    assert torch.equal(update_squares(moved, before_a), update_squares(moved, before_b))


def test_without_an_update_copy_no_snapshot_is_taken() -> None:
    params = _mixed_tensors()
    for kernels in _all_kernels(params):
        squared, before = parameter_statistics(params, copy=False, kernels=kernels)
        assert before is None
        assert squared.tolist() == pytest.approx([float(p.double().square().sum()) for p in params], rel=1e-6)


# ------------------------------------------------------------------------------- statistics by name
def test_a_statistic_is_declared_once_with_a_valid_reduction() -> None:
    with pytest.raises(ValueError, match="'mean'"):
        Statistic("grad_mean", "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_sq"):
        StatisticSet(Statistic("grad_sq", "sum"), Statistic("grad_sq", "max"))
    with pytest.raises(ValueError, match=r"missing \['grad_max'\], undeclared \['grad_min'\]"):
        StatisticSet(Statistic("grad_sq", "sum"), Statistic("grad_max", "max")).stack(
            {"grad_sq": torch.zeros(2), "grad_min": torch.zeros(2)}
        )


def test_adding_a_statistic_is_one_declaration() -> None:
    """One more ``Statistic`` is stacked, reduced across ranks and into layers, and read back by name."""
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(shape, generator=generator) for shape in [(4, 3), (3,), (5,), (2, 2)]]
    layer_index, num_layers = torch.tensor([0, 0, 1, 1]), 2
    extended = STEP_STATISTICS.extend(Statistic("grad_l1", "sum"), Statistic("grad_min", "max"))  # the addition
    grad_sq, grad_max = gradient_statistics(grads)
    values = {
        "grad_sq": grad_sq,
        "param_sq": grad_sq * 2,
        "update_sq": grad_sq / 2,
        "grad_max": grad_max,
        "grad_l1": torch.stack([g.double().abs().sum() for g in grads]),
        "grad_min": torch.stack([-g.min() for g in grads]),
    }
    results = {}
    for statistics in (STEP_STATISTICS, extended):
        table = statistics.stack({name: values[name] for name in (s.name for s in statistics)})
        for reduction in (LocalReduction(), ShardedReduction()):  # no process group: both leave it as it is
            table = table.across_ranks(reduction, grads)
        results[len(statistics)] = table.to_layers(layer_index, num_layers).to_host()
    base, more = results[len(STEP_STATISTICS)], results[len(extended)]
    for name in ("grad_sq", "param_sq", "update_sq", "grad_max"):
        np.testing.assert_array_equal(more[name], base[name])  # the others are untouched
    layers = [torch.cat([g.flatten() for g, i in zip(grads, layer_index) if i == layer]) for layer in range(2)]
    np.testing.assert_allclose(more["grad_l1"], [float(x.double().abs().sum()) for x in layers], rtol=1e-12)
    np.testing.assert_array_equal(more["grad_min"], [float(-x.min()) for x in layers])
    np.testing.assert_allclose(more["grad_sq"], [float(x.double().square().sum()) for x in layers], rtol=1e-6)


def test_a_table_names_its_rows_whatever_the_declaration_order() -> None:
    statistics = StatisticSet(Statistic("top", "max"), Statistic("sq", "sum"), Statistic("count", "sum"))
    assert statistics.sums == ("sq", "count") and statistics.maxima == ("top",) and "count" in statistics
    table = statistics.stack(
        {"count": torch.tensor([1.0, 0.0]), "top": torch.tensor([3.0, 5.0]), "sq": torch.tensor([9.0, 25.0])}
    )
    assert table["sq"].tolist() == [9.0, 25.0] and table["top"].tolist() == [3.0, 5.0]
    doubled = table.replace({"count": table["count"] * 2})
    assert doubled["count"].tolist() == [2.0, 0.0] and doubled["sq"].tolist() == [9.0, 25.0]
    host = doubled.to_layers(torch.tensor([0, 0]), 1).to_host()
    assert list(host) == ["top", "sq", "count"]
    assert {name: values.tolist() for name, values in host.items()} == {"top": [5.0], "sq": [34.0], "count": [2.0]}


# ------------------------------------------------------------------------ the one-pass gradient kernel
#: Tensors of at least this many elements take the compiled kernel in these tests.
TEST_FUSED_STATS_MIN_NUMEL = 64


def _large_and_small_gradients() -> list[torch.Tensor]:
    """Large float32/float64 gradients (NaN, +-inf, -0.0, huge values among them) between small, empty and
    non-contiguous ones, which the eager kernels keep."""
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=generator) for n in (5000, 70, 16, 300, 0, 999, 128, 4096)]
    grads[3] = grads[3].double()
    grads[5][[0, 500, 998]] = float("nan")  # first, middle, last lanes
    grads[6][77] = -float("inf")
    grads[7] = grads[7] * 1e19  # squares beyond float32's range: the sum is taken in float64
    grads.append(torch.full((100,), -0.0))
    grads.append(torch.randn(40, 30, generator=generator).t())  # not contiguous: eager
    return grads


def _fused_stats(monkeypatch: pytest.MonkeyPatch) -> tuple[GradientKernel, list[int]]:
    """A gradient kernel whose calls are counted (the number of tensors each call gets)."""
    monkeypatch.setattr(stats, "FUSED_STATS_MIN_NUMEL", TEST_FUSED_STATS_MIN_NUMEL)
    monkeypatch.setattr(compiled_kernels, "FAILURES", {})
    kernel, sizes = GradientKernel("auto"), []
    original = kernel.__call__

    class Counted(GradientKernel):
        def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
            sizes.extend(t.numel() for t in tensors)
            return original(tensors)

    return Counted("auto"), sizes


def test_the_one_pass_gradient_kernel_equals_float64_references(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = _large_and_small_gradients()
    kernel, sizes = _fused_stats(monkeypatch)
    grad_sq, grad_max = gradient_statistics(grads, fused=kernel)
    assert sizes == [5000, 70, 300, 999, 128, 4096, 100], "the large contiguous float32/float64 ones, in order"
    assert grad_sq.dtype == torch.float64 and grad_max.dtype == torch.float32
    reference_sq = [float(g.double().square().sum()) for g in grads]
    reference_max = [float(g.double().abs().max()) if g.numel() else 0.0 for g in grads]
    assert grad_sq.tolist() == pytest.approx(reference_sq, rel=1e-6, nan_ok=True)  # eager ones: float32 sums
    large = [0, 1, 3, 5, 6, 7, 8]
    assert grad_sq[large].tolist() == pytest.approx([reference_sq[i] for i in large], rel=1e-12, nan_ok=True)
    assert grad_max.tolist() == pytest.approx(reference_max, rel=1e-7, nan_ok=True)
    assert math.isinf(grad_sq[6]) and grad_max[6] == float("inf") and math.isnan(grad_max[5])
    assert math.isfinite(grad_sq[7]) and grad_sq[7] > 1e38, "huge but finite gradients stay finite"
    assert math.copysign(1.0, float(grad_max[8])) == 1.0, "no -0.0"
    eager_sq, eager_max = gradient_statistics(grads)  # the two-pass kernels: same values to their rounding
    assert math.isinf(eager_sq[7]), "a float32 norm overflows (the tracker recounts such a step in float64)"
    eager_sq[7] = grad_sq[7]
    assert grad_sq.tolist() == pytest.approx(eager_sq.tolist(), rel=1e-6, nan_ok=True)
    assert torch.equal(grad_max.isnan(), eager_max.isnan())
    assert torch.equal(grad_max.nan_to_num(), eager_max.nan_to_num())


def test_the_gradient_kernel_falls_back_to_two_passes_when_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = _large_and_small_gradients()
    kernel, _ = _fused_stats(monkeypatch)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no compiler here (injected)")

    monkeypatch.setattr(torch, "compile", failing)
    with pytest.warns(RuntimeWarning, match="could not be compiled on cpu; using the eager kernels"):
        grad_sq, grad_max = gradient_statistics(grads, fused=kernel)
    eager_sq, eager_max = gradient_statistics(grads)
    assert torch.equal(grad_sq.nan_to_num(), eager_sq.nan_to_num()) and torch.equal(grad_max.isnan(), eager_max.isnan())
    assert compiled_kernels.compile_unavailable(torch.device("cpu")) == (
        "torch.compile failed (RuntimeError: no compiler here (injected))"
    )
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("a failed compilation is not retried"))
    assert GradientKernel("auto")(grads[:1]) is None
    assert GradientKernel("eager")(grads[:1]) is None


def test_a_tracker_reads_large_gradients_in_one_pass_unless_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "FUSED_STATS_MIN_NUMEL", TEST_FUSED_STATS_MIN_NUMEL)
    monkeypatch.setattr(compiled_kernels, "FAILURES", {})
    calls: list[str] = []
    original = compiled_kernels.CompiledKernels.run

    def counted(self: Any, name: str, args: list[tuple[torch.Tensor, ...]], device: torch.device) -> Any:
        calls.extend(name for _ in args)
        return original(self, name, args, device)

    monkeypatch.setattr(compiled_kernels.CompiledKernels, "run", counted)
    records = {}
    for kernel in ("auto", "eager"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        net(torch.randn(8, 16)).square().sum().backward()
        tracker = GradientFlowTracker(net, update_kernel=kernel, track_update_ratio=False)
        tracker.capture(step=0, params=net.parameters())
        records[kernel] = tracker.finalize()
        grads = [torch.cat([p.grad.flatten() for p in layer.parameters()]).double() for layer in (net[0], net[2])]
        np.testing.assert_allclose(records[kernel].metrics["grad_l2"], [float(g.norm()) for g in grads], rtol=1e-6)
        np.testing.assert_allclose(records[kernel].metrics["grad_max_abs"], [float(g.abs().max()) for g in grads])
        # "auto": the two weights (512 and 64 elements), not the biases; "eager" adds no call
        assert calls == ["gradient", "gradient"], (kernel, calls)
