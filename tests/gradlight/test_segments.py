"""Small tensors concatenated: per-tensor sums of squares equal the tensors' own, NaN stays in its tensor."""

from __future__ import annotations

import torch

from gradlight import segments


def _sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    where = segments.segments_of(tuple(t.numel() for t in tensors), torch.device("cpu"))
    return segments.segment_squares(segments.flat(tensors), where, len(tensors))


def test_segment_squares_equal_each_tensors_float64_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator) for shape in [(3,), (4, 5), (1,), (2, 3, 4), (7,)]]
    expected = torch.stack([t.double().square().sum() for t in tensors])
    torch.testing.assert_close(_sums(tensors), expected, rtol=1e-15, atol=0.0)


def test_a_nan_or_an_infinity_stays_in_its_own_tensor() -> None:
    tensors = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 2.0]), torch.ones(2)]
    sums = _sums(tensors)
    assert sums[0] == 3.0 and sums[1].isnan() and sums[2] == float("inf") and sums[3] == 2.0


def test_huge_finite_elements_do_not_overflow() -> None:
    sums = _sums([torch.tensor([2.0**100, 2.0**100]), torch.tensor([3.0])])  # squares beyond float32's range
    assert float(sums[0]) == 2.0**201 and float(sums[1]) == 9.0


def test_only_several_small_cpu_tensors_of_one_dtype_are_concatenated() -> None:
    cpu = torch.device("cpu")
    small = [torch.ones(10), torch.ones(20)]
    assert segments.segmented(small, cpu)
    assert not segments.segmented(small[:1], cpu)  # one tensor: nothing to share
    assert not segments.segmented([torch.ones(10), torch.ones(10, dtype=torch.float64)], cpu)
    assert not segments.segmented([torch.ones(segments.SEGMENT_MAX_NUMEL), torch.ones(1)], cpu)
    assert not segments.segmented(small, cpu, limit=29)  # the caller's own bound
    assert not segments.segmented(small, torch.device("meta"))


def test_one_value_per_tensor_spreads_over_its_elements() -> None:
    where = segments.segments_of((2, 1, 3), torch.device("cpu"))
    assert segments.per_element([0.5, 0.5, 0.5], where, torch.float32) == 0.5
    spread = segments.per_element([1.0, 2.0, 3.0], where, torch.float32)
    assert isinstance(spread, torch.Tensor) and spread.tolist() == [1.0, 1.0, 2.0, 3.0, 3.0, 3.0]
