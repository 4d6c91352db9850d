from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradlight.layers import ForwardOrderRecorder, LayerMap, clean_parameter_name, layer_name_for
from gradlight.stats import (
    STACK_MAX_NUMEL,
    Batching,
    foreach_norms,
    gradient_statistics,
    nonfinite_counts,
    parameter_statistics,
    reduce_to_layers,
    snapshot,
    update_squares,
)
from gradlight.tracker import GradientFlowTracker, early_late_ratio


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


def _mixed_tensors(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """BatchNorm-like small tensors of repeated shapes between big, odd and empty ones."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16,), (8, 3, 3, 3), (16,), (STACK_MAX_NUMEL + 1,), (32,), (8, 3, 3, 3), (16,), (0,), (5,), (32,)]
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def test_batching_stacks_small_tensors_of_one_shape_and_restores_input_order() -> None:
    tensors = _mixed_tensors()
    batching = Batching.plan(tensors)
    assert batching.stacks == ((0, 2, 6), (1, 5), (4, 9))
    assert batching.singles == (3, 7, 8)  # too big, empty, a shape of its own
    stack_results = [torch.tensor([0.0, 2.0, 6.0]), torch.tensor([1.0, 5.0]), torch.tensor([4.0, 9.0])]
    assert batching.gather(torch.tensor([3.0, 7.0, 8.0]), stack_results).tolist() == list(range(10))
    mixed = [torch.ones(4), torch.ones(4, dtype=torch.float64)]
    assert Batching.plan(mixed).stacks == ()  # one kernel needs one dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_statistics_equal_per_tensor_references(dtype: torch.dtype) -> None:
    grads = _mixed_tensors(dtype)
    params = [g.flip(0) * 3 for g in grads]
    grads[2][3] = float("nan")  # inside a stack: propagates to that tensor only
    reference_sq = [float(g.double().square().sum()) for g in grads]
    reference_max = [float(g.double().abs().max()) if g.numel() else 0.0 for g in grads]
    rel = 1e-6 if dtype == torch.float32 else 1e-5  # half types accumulate in float32
    for batching in (Batching.plan(grads), Batching((), tuple(range(len(grads))), None)):
        grad_sq, grad_max = gradient_statistics(grads, batching=batching)
        assert grad_sq.tolist() == pytest.approx(reference_sq, rel=rel, nan_ok=True)
        assert grad_max.tolist() == pytest.approx(reference_max, rel=1e-6, nan_ok=True)
        param_sq, before = parameter_statistics(params, copy=True, batching=batching)
        assert param_sq.tolist() == pytest.approx([float(p.double().square().sum()) for p in params], rel=rel)
        moved = [p + 0.5 for p in params]
        expected = [float((m.double() - p.double()).square().sum()) for m, p in zip(moved, params)]
        assert before is not None
        assert update_squares(moved, before).tolist() == pytest.approx(
            expected, rel=1e-2 if dtype != torch.float32 else 1e-6
        )


def test_per_tensor_cpu_path_is_bitwise_the_fused_one() -> None:
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=generator) for n in (5000, 70_001, 9000, 0)]
    params = [torch.randn(n, generator=generator) for n in (5000, 70_001, 9000, 0)]
    per_tensor = Batching.plan(grads)
    fused = Batching(per_tensor.stacks, per_tensor.singles, per_tensor.restore, per_tensor=False)
    assert per_tensor.per_tensor and per_tensor.stacks == ()
    for left, right in zip(gradient_statistics(grads, batching=per_tensor), gradient_statistics(grads, batching=fused)):
        assert torch.equal(left, right)
    (sq_a, before_a), (sq_b, before_b) = (parameter_statistics(params, batching=b) for b in (per_tensor, fused))
    assert torch.equal(sq_a, sq_b) and before_a is not None and before_b is not None
    moved = [q * 1.5 for q in params]
    assert torch.equal(update_squares(moved, before_a), update_squares(moved, before_b))


def test_early_late_ratio_geometric_edges() -> None:
    norms = np.array([1e-6, 1e-4, 1e-2, 1.0])
    assert early_late_ratio(norms, 1) == pytest.approx(1e-6)
    assert early_late_ratio(norms, 2) == pytest.approx(math.sqrt(1e-6 * 1e-4) / math.sqrt(1e-2))
    assert early_late_ratio(np.array([0.0, 1.0])) == 0.0


def test_layer_names_grouping_and_wrapper_prefixes() -> None:
    assert clean_parameter_name("_orig_mod.model._checkpoint_wrapped_module.0.weight") == "model.0.weight"
    assert layer_name_for("model.3.cv1.conv.weight", 1) == "model"
    assert layer_name_for("weight", None) == "(root)"
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].weight = net[0].weight  # tied: counted once
    layer_map = LayerMap.build(net.named_parameters())
    assert layer_map.param_names == ["0.weight", "0.bias", "1.bias"]
    assert layer_map.layer_sizes() == [6, 2]


def test_forward_order_recorder_removes_its_hooks() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    recorder = ForwardOrderRecorder(net)
    net(torch.zeros(1, 2))
    recorder.remove()
    assert recorder.order == ["0", "2"] and not recorder.active
    assert all(not module._forward_pre_hooks for module in net.modules())


def test_tracker_without_a_trainer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    tracker = GradientFlowTracker(net)
    tracker.start_discovery()
    net(torch.randn(5, 4)).pow(2).mean().backward()
    tracker.stop_discovery()
    tracker.capture(step=0, params=net.parameters())
    with pytest.raises(RuntimeError, match="capture"):
        GradientFlowTracker(net).finalize()
    record = tracker.finalize()
    expected = float(torch.cat([net[2].weight.grad.flatten(), net[2].bias.grad.flatten()]).norm())
    assert record.value("grad_l2", "2") == pytest.approx(expected, rel=1e-6)
    assert record.to_frame().shape == (10, 5)
    assert not tracker.pending


def test_a_cross_rank_reduction_gets_a_column_for_every_trainable_parameter() -> None:
    """FSDP1 gives a rank no gradient for an empty slice: columns must still line up across ranks."""
    seen: list[int] = []

    def probe(sums: torch.Tensor, maxima: torch.Tensor, params: list[torch.Tensor]) -> tuple:
        seen.append(len(params))
        return sums, maxima

    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1))
    net[2].weight.requires_grad_(False)  # frozen: no column anywhere
    local = GradientFlowTracker(net)
    aligned = GradientFlowTracker(net, reduction=probe)
    net(torch.randn(4, 2)).sum().backward()
    net[0].bias.grad = None  # "this rank holds no elements" of one parameter of layer 0
    net[1].weight.grad = None  # and of the whole of layer 1's weight...
    net[1].bias.grad = None  # ...and bias: no gradient for layer 1 on any rank
    records = []
    for tracker in (local, aligned):
        tracker.capture(0, net.parameters())
        records.append(tracker.finalize())
    assert seen == [5]  # 6 parameters, one frozen
    want, got = records
    assert got.layers == want.layers == ["0", "2"]  # a layer nobody has a gradient for is left out
    for metric in ("grad_l2", "grad_max_abs", "param_l2", "update_ratio"):
        np.testing.assert_allclose(got.metrics[metric], want.metrics[metric], rtol=1e-7, err_msg=metric)
    assert got.global_metrics["global_grad_l2"] == pytest.approx(want.global_metrics["global_grad_l2"])


def test_no_gradient_at_all_gives_a_nan_global_norm_not_zero() -> None:
    net = nn.Linear(2, 1)
    tracker = GradientFlowTracker(net)
    tracker.capture(0, net.parameters())  # e.g. DeepSpeed ZeRO >= 2 keeps no param.grad
    record = tracker.finalize()
    assert record.layers == [] and math.isnan(record.global_metrics["global_grad_l2"])


def test_huge_finite_gradients_are_not_counted_as_non_finite() -> None:
    net = nn.Linear(3, 1)
    tracker = GradientFlowTracker(net)
    net.weight.grad = torch.full_like(net.weight, 3e25)  # finite in float32; its square is not
    net.bias.grad = torch.ones_like(net.bias)
    tracker.capture(0, net.parameters())
    record = tracker.finalize()
    assert record.metrics["grad_nonfinite"].tolist() == [0.0]
    assert record.global_metrics["global_grad_l2"] == pytest.approx(math.sqrt(3 * 9e50 + 1), rel=1e-6)
