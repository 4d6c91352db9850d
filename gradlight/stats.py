"""Pure tensor math: fused per-tensor norms, per-layer reduction, reduction across ranks.

Everything here stays on the device and never synchronises with the host; the caller copies one stacked
tensor to the host per logged step. Statistics are kept in their reducible form (sums of squares, maxima,
counts) until the very end, like torchmetrics' states, so that sharded tensors reduce exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Protocol

import torch
from torch import Tensor

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "SUM_STATS",
    "CrossRankReduction",
    "LocalReduction",
    "foreach_norms",
    "local_tensor",
    "max_abs",
    "nonfinite_counts",
    "reduce_to_layers",
    "snapshot",
    "squares",
    "update_squares",
    "wide_dtype",
]

#: Per-tensor statistics reduced by summation (across shards and into layers), in row order.
SUM_STATS = ("grad_sq", "param_sq", "update_sq")
#: Per-tensor statistics reduced by maximum.
MAX_STATS = ("grad_max",)


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (a DTensor's local shard, else the tensor itself)."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def foreach_norms(tensors: Sequence[Tensor], ord: float = 2.0, device: torch.device | None = None) -> Tensor:
    """Norm of each tensor in float32, one fused ``_foreach_norm`` per (device, dtype) group.

    Args:
        tensors: Plain (local) tensors, any mix of devices and dtypes.
        ord: ``2.0`` for the L2 norm, ``float("inf")`` for the largest absolute value.
        device: Where the result lives; defaults to the first tensor's device.

    Returns:
        A float32 vector with one norm per tensor, in input order.

    Example:
        >>> foreach_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0], dtype=torch.bfloat16)], ord=2.0)
        tensor([5., 2.])
    """
    if not tensors:
        return torch.zeros(0, device=device)
    home = device if device is not None else tensors[0].device
    if _single_group(tensors):  # the common case, without a Python loop over the tensors
        return _fused_norms(list(tensors), ord).to(home)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(position)
    out = torch.empty(len(tensors), dtype=torch.float32, device=home)
    for positions in groups.values():
        norms = _fused_norms([tensors[i] for i in positions], ord)
        out[torch.tensor(positions, device=home)] = norms.to(home, torch.float32, non_blocking=True)
    return out


def _single_group(tensors: Sequence[Tensor]) -> bool:
    """Whether all ``tensors`` share one device and one dtype."""
    return len(set(map(_DTYPE, tensors))) == 1 and len(set(map(_DEVICE, tensors))) == 1


_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")


def _fused_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """One ``_foreach_norm`` over same-device, same-dtype tensors, accumulated in at least float32."""
    low_precision = tensors[0].dtype in (torch.float16, torch.bfloat16)
    norms = torch._foreach_norm(tensors, ord, dtype=torch.float32 if low_precision else None)
    return torch.stack(norms).to(torch.float32)


def max_abs(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Largest absolute value of each tensor, in float32 (``0`` for empty tensors).

    On accelerators this is one fused ``_foreach_norm(ord=inf)`` per group; on CPU, where that kernel is
    several times slower than the L2 one, one ``aminmax`` per tensor is faster.

    Example:
        >>> max_abs([torch.tensor([1.0, -3.0]), torch.tensor([2.0])]).tolist()
        [3.0, 2.0]
    """
    if not tensors:
        return torch.zeros(0, device=device)
    home = device if device is not None else tensors[0].device
    if any(device.type != "cpu" for device in set(map(_DEVICE, tensors))):
        if all(t.numel() for t in tensors):
            return foreach_norms(tensors, float("inf"), home)
        # Empty shards (FSDP2 gives some ranks 0 rows, FSDP1 empty slices): _foreach_norm(inf) refuses them.
        filled = [i for i, t in enumerate(tensors) if t.numel()]
        out = torch.zeros(len(tensors), dtype=torch.float32, device=home)
        if filled:
            norms = foreach_norms([tensors[i] for i in filled], float("inf"), home)
            out[torch.tensor(filled, device=home)] = norms
        return out
    zero = torch.zeros((), dtype=torch.float32)
    lows, highs = [], []
    for tensor in tensors:
        low, high = torch.aminmax(tensor) if tensor.numel() else (zero, zero)
        if low.dtype != torch.float32:
            low, high = low.float(), high.float()
        lows.append(low)
        highs.append(high)
    return torch.maximum(torch.stack(highs), torch.stack(lows).neg_()).abs_().to(home)  # abs_: no -0.0


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype statistics are summed in: float64, or float32 on MPS (which has no float64).

    Example:
        >>> wide_dtype(torch.device("cpu"))
        torch.float64
    """
    return torch.float32 if device.type == "mps" else torch.float64


def squares(norms: Tensor) -> Tensor:
    """``norms ** 2`` in float64 (float32 on MPS, which has no float64).

    A float32 norm of 1e20 is fine, its square is not: squares and their sums stay wide so that huge but
    finite gradients are not counted as non-finite.

    Example:
        >>> squares(torch.tensor([2.0**70])).item() == 2.0**140  # float32 tops out near 2**128
        True
    """
    return norms.to(wide_dtype(norms.device)).square()


def snapshot(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copy ``tensors`` (fused), e.g. parameters before an optimizer step.

    Example:
        >>> weight = torch.ones(2)
        >>> before = snapshot([weight])
        >>> weight.add_(1.0)
        tensor([2., 2.])
        >>> before
        [tensor([1., 1.])]
    """
    if not tensors:
        return []
    with torch.no_grad():
        if _foreach_clone is None:  # pragma: no cover - torch without _foreach_clone
            return [tensor.clone() for tensor in tensors]
        return list(_foreach_clone(list(tensors)))  # a plain copy: faster than _foreach_mul(tensors, 1.0)


_foreach_clone = getattr(torch, "_foreach_clone", None)


def update_squares(after: Sequence[Tensor], before: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Squared L2 norm of ``after[i] - before[i]`` for each pair (see :func:`squares`).

    ``before`` (a :func:`snapshot`) is overwritten with the differences, which saves an allocation.
    """
    if not after:
        return torch.zeros(0, device=device)
    with torch.no_grad():
        torch._foreach_sub_(before, list(after))
        return squares(foreach_norms(before, 2.0, device))


def nonfinite_counts(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Number of NaN/Inf elements in each tensor (one small kernel per tensor: use only when needed)."""
    if not tensors:
        return torch.zeros(0, device=device)
    home = device if device is not None else tensors[0].device
    with torch.no_grad():
        counts = torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).to(home)
        return counts.to(wide_dtype(home))  # exact beyond 2**24 elements


def reduce_to_layers(sums: Tensor, maxima: Tensor, layer_index: Tensor, num_layers: int) -> tuple[Tensor, Tensor]:
    """Reduce per-tensor statistics into per-layer ones.

    Args:
        sums: ``(K, P)`` statistics that add up (sums of squares, counts).
        maxima: ``(M, P)`` statistics reduced by maximum.
        layer_index: ``(P,)`` layer of each tensor.
        num_layers: Number of layers ``L``.

    Returns:
        ``(K, L)`` sums and ``(M, L)`` maxima (``-inf`` where a layer has no tensor; NaN propagates).

    Example:
        >>> s, m = reduce_to_layers(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[1.0, 3.0, 2.0]]),
        ...                         torch.tensor([0, 0, 1]), 2)
        >>> s.tolist(), m.tolist()
        ([[3.0, 4.0]], [[3.0, 2.0]])
    """
    layer_sums = sums.new_zeros(sums.shape[0], num_layers).index_add_(1, layer_index, sums)
    index = layer_index.unsqueeze(0).expand_as(maxima)
    layer_max = maxima.new_full((maxima.shape[0], num_layers), float("-inf"))
    layer_max = layer_max.scatter_reduce(1, index, maxima, reduce="amax", include_self=True)
    return layer_sums, layer_max


class CrossRankReduction(Protocol):
    """Turns this rank's per-tensor statistics into exact global ones.

    Implementations must issue the same collectives on every rank, in the same order, whatever the values,
    and at most one collective per call.
    """

    def __call__(self, sums: Tensor, maxima: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Reduce statistics over the ranks that hold parts of each tensor.

        Args:
            sums: ``(K, P)`` local statistics that add up over shards (sums of squares, counts).
            maxima: ``(M, P)`` local statistics reduced by maximum.
            params: The ``P`` parameters the columns belong to, as the model holds them (DTensors under
                FSDP2, flat-parameter views under FSDP1), so the reduction can tell sharded from replicated.

        Returns:
            The global ``(K, P)`` sums and ``(M, P)`` maxima, identical on every rank.
        """
        ...


class LocalReduction:
    """No reduction: every rank already holds whole tensors (single process, DDP)."""

    def __call__(self, sums: Tensor, maxima: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Return the statistics unchanged."""
        return sums, maxima
