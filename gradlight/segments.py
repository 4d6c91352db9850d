"""Many small tensors as one: concatenated, one kernel per operation, summed back per tensor.

On CPU every kernel call pays a fixed dispatch cost of a few microseconds, and a ``torch._foreach_*`` kernel
pays it once per tensor (it loops over them). A LayerNorm weight or a bias holds a few hundred elements, so
for a batch of them the reconstruction's five elementwise operations cost their dispatch, not their work:
GPT-2 1M's 20 small tensors took 0.5 ms. Concatenated, the batch is one tensor per operand and each operation
one kernel; :func:`segment_squares` then sums each tensor's squares back (in float64, one ``index_add_``).
The copies are bounded: only batches of at most :data:`SEGMENT_MAX_NUMEL` elements in all are concatenated, and
the work needs at most three float32 copies' worth at once (the float64 squares count twice).

Example:
    >>> tensors = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0], [2.0], [2.0]])]
    >>> segments = segments_of((2, 3), torch.device("cpu"))
    >>> segment_squares(flat(tensors), segments, 2).tolist()
    [25.0, 9.0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SEGMENT_MAX_NUMEL", "flat", "per_element", "segment_squares", "segmented", "segments_of"]

#: On CPU, a batch of at least two tensors with at most this many elements in all is concatenated (64 KiB per
#: float32 copy: they stay in cache).
SEGMENT_MAX_NUMEL = 1 << 14


def segmented(tensors: Sequence[Tensor], device: torch.device, limit: int = SEGMENT_MAX_NUMEL) -> bool:
    """Whether ``tensors`` (a batch of one operand) are worth concatenating: several, small, on CPU.

    Args:
        tensors: The batch.
        device: Where it lives.
        limit: At most this many elements in all (and at most :data:`SEGMENT_MAX_NUMEL`): a caller with a bound on
            its temporaries passes its own.

    Example:
        >>> segmented([torch.ones(3), torch.ones(5)], torch.device("cpu"))
        True
    """
    if device.type != "cpu" or len(tensors) < 2 or len({t.dtype for t in tensors}) > 1:
        return False
    return sum(t.numel() for t in tensors) <= min(limit, SEGMENT_MAX_NUMEL)


@functools.lru_cache(maxsize=64)
def segments_of(numels: tuple[int, ...], device: torch.device) -> Tensor:
    """For each element of the concatenation of tensors of ``numels`` elements, the position of its tensor.

    Built once per list of sizes (the same batches come back every logged step).

    Example:
        >>> segments_of((2, 1), torch.device("cpu")).tolist()
        [0, 0, 1]
    """
    sizes = torch.tensor(numels, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(numels)), sizes).to(device)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The elements of ``tensors``, one after the other, in a new 1-D tensor (a copy the caller may overwrite)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def per_element(values: Sequence[float], segments: Tensor, dtype: torch.dtype) -> Tensor | float:
    """One value per tensor, spread over its elements; the value itself when every tensor has the same one.

    Example:
        >>> per_element([2.0, 2.0], torch.tensor([0, 0, 1]), torch.float32)
        2.0
        >>> per_element([1.0, 2.0], torch.tensor([0, 0, 1]), torch.float32).tolist()
        [1.0, 1.0, 2.0]
    """
    first = values[0]
    if all(value == first for value in values):
        return float(first)
    return torch.tensor(values, dtype=dtype, device=segments.device)[segments]


def segment_squares(values: Tensor, segments: Tensor, count: int) -> Tensor:
    """The sum of the squares of each tensor's elements in ``values`` (a :func:`flat` concatenation), in float64.

    ``values`` may be overwritten. NaN and infinities propagate to their own tensor's sum only.
    """
    wide = values.to(torch.float64)
    return torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(0, segments, wide.square_())
