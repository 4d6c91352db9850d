"""The Trainer-free tracker: records, aligned columns, missing gradients, overflow (``gradlight.tracker``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from gradlight.tracker import GradientFlowTracker, early_late_ratio


def test_early_late_ratio_geometric_edges() -> None:
    norms = np.array([1e-6, 1e-4, 1e-2, 1.0])
    assert early_late_ratio(norms, 1) == pytest.approx(1e-6)
    assert early_late_ratio(norms, 2) == pytest.approx(math.sqrt(1e-6 * 1e-4) / math.sqrt(1e-2))
    assert early_late_ratio(np.array([0.0, 1.0])) == 0.0


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

    def probe(sums: torch.Tensor, maxima: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple:
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
