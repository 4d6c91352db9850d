"""Pure tensor math: per-tensor statistics, their declaration by name, per-layer and cross-rank reduction.

Everything here stays on the device and never synchronises with the host; the caller copies one stacked
tensor to the host per logged step. Statistics are kept in their reducible form (sums of squares, maxima,
counts) until the very end, like torchmetrics' states, so that sharded tensors reduce exactly.

Statistics are addressed by name. A :class:`StatisticSet` declares each one once, with how it reduces
(``"sum"`` or ``"max"``, like torchmetrics' ``add_state(name, default, dist_reduce_fx)``); from it a
:class:`StatisticTable` is stacked (one row per statistic, one column per tensor), reduced across ranks
(:class:`CrossRankReduction`) and into layers (:meth:`StatisticTable.to_layers`) as a whole, and read back
by name, on the device or after one host copy (:meth:`StatisticTable.to_host`).

The per-tensor kernels follow the tensors' device (:func:`kernels_for`), one path each, and each statistic is
written once per path: :class:`FusedKernels` on accelerators (one ``_foreach`` kernel per statistic over all
tensors: one launch serves many tensors) and :class:`CpuKernels` on CPU (where every kernel call pays a
dispatch cost: small tensors of one shape are stacked into one matrix, planned once per list of shapes, and
each tensor's statistics are taken back to back while it is in cache).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal, Protocol, TypeGuard, TypeVar

import numpy as np
import torch
from torch import Tensor

from gradlight.compiled import FUSED_DTYPES

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "FUSED_STATS_MIN_NUMEL",
    "STACK_MAX_NUMEL",
    "CpuKernels",
    "CrossRankReduction",
    "FusedKernels",
    "FusedStatistics",
    "Kernels",
    "LocalReduction",
    "Reduce",
    "Snapshot",
    "Statistic",
    "StatisticSet",
    "StatisticTable",
    "foreach_norms",
    "gradient_statistics",
    "is_dtensor",
    "kernels_for",
    "local_tensor",
    "nonfinite_counts",
    "parameter_statistics",
    "plain_gradients",
    "reduce_to_layers",
    "snapshot",
    "squares",
    "update_squares",
    "wide_dtype",
]

# ------------------------------------------------------------------------------------- declarations

#: How a statistic combines over the shards of a tensor, the tensors of a layer and the ranks of a run.
Reduce = Literal["sum", "max"]
_REDUCES: tuple[str, ...] = ("sum", "max")
_Array = TypeVar("_Array", Tensor, np.ndarray)


@dataclass(frozen=True)
class Statistic:
    """One per-tensor statistic: its name and how it reduces.

    Attributes:
        name: How the statistic is addressed (``"grad_sq"``).
        reduce: ``"sum"`` for statistics that add up over elements (sums of squares, counts), ``"max"`` for
            maxima (a maximum over duplicated elements is the same maximum).

    Example:
        >>> Statistic("grad_sq", "sum")
        Statistic(name='grad_sq', reduce='sum')
    """

    name: str
    reduce: Reduce

    def __post_init__(self) -> None:
        if self.reduce not in _REDUCES:
            raise ValueError(f"Statistic {self.name!r}: `reduce` must be one of {_REDUCES}, got {self.reduce!r}.")


class StatisticSet:
    """An ordered declaration of statistics, one :class:`Statistic` each; the rows of a :class:`StatisticTable`.

    Sums come first in the stacked form, then maxima, each in declaration order: the layout follows from
    the declaration, so adding a statistic is one more :class:`Statistic`.

    Args:
        statistics: The statistics, with distinct names.

    Raises:
        ValueError: If two statistics share a name.

    Example:
        >>> stats = StatisticSet(Statistic("sq", "sum"), Statistic("top", "max"), Statistic("count", "sum"))
        >>> stats.sums, stats.maxima
        (('sq', 'count'), ('top',))
        >>> table = stats.stack({"sq": torch.tensor([9.0, 16.0]), "count": torch.tensor([1.0, 1.0]),
        ...                      "top": torch.tensor([3.0, 4.0])})
        >>> table["top"].tolist(), table.to_layers(torch.tensor([0, 0]), 1).to_host()["sq"].tolist()
        ([3.0, 4.0], [25.0])
    """

    def __init__(self, *statistics: Statistic) -> None:
        names = [statistic.name for statistic in statistics]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"StatisticSet: each name may be declared once; repeated: {repeated}.")
        self.statistics = tuple(statistics)
        self.sums = tuple(s.name for s in statistics if s.reduce == "sum")
        self.maxima = tuple(s.name for s in statistics if s.reduce == "max")
        self._rows: dict[str, tuple[Reduce, int]] = {name: ("sum", row) for row, name in enumerate(self.sums)}
        self._rows.update({name: ("max", row) for row, name in enumerate(self.maxima)})

    def __iter__(self) -> Iterator[Statistic]:
        return iter(self.statistics)

    def __len__(self) -> int:
        return len(self.statistics)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def __repr__(self) -> str:
        return f"StatisticSet{self.statistics!r}"

    def extend(self, *statistics: Statistic) -> StatisticSet:
        """This set followed by more statistics.

        Example:
            >>> StatisticSet(Statistic("sq", "sum")).extend(Statistic("count", "sum")).sums
            ('sq', 'count')
        """
        return StatisticSet(*self.statistics, *statistics)

    def stack(self, values: Mapping[str, Tensor]) -> StatisticTable:
        """Stack one tensor per declared statistic (all of one shape, e.g. one value per tensor) into a table.

        Args:
            values: ``name -> values`` for exactly the declared names.

        Raises:
            ValueError: If a declared name is missing or an undeclared one is given.
        """
        if set(values) != set(self._rows):
            missing, unknown = sorted(set(self._rows) - set(values)), sorted(set(values) - set(self._rows))
            raise ValueError(
                f"StatisticSet.stack: `values` must have exactly the declared names {sorted(self._rows)}; "
                f"missing {missing}, undeclared {unknown}."
            )
        sums = _stack_rows([values[name] for name in self.sums], values)
        maxima = _stack_rows([values[name] for name in self.maxima], values)
        return StatisticTable(self, sums, maxima)

    def row(self, name: str) -> tuple[Reduce, int]:
        """Where ``name`` lives in the stacked form: ``("sum", row of the sums)`` or ``("max", row of the maxima)``.

        Raises:
            KeyError: If ``name`` is not declared.

        Example:
            >>> StatisticSet(Statistic("top", "max"), Statistic("sq", "sum")).row("sq")
            ('sum', 0)
        """
        where = self._rows.get(name)
        if where is None:
            raise KeyError(f"{name!r} is not a declared statistic; declared: {[s.name for s in self.statistics]}")
        return where

    def split(self, sums: _Array, maxima: _Array | None = None) -> dict[str, _Array]:
        """Name the rows of stacked ``sums`` and ``maxima`` (tensors or host arrays), in declaration order.

        Args:
            sums: One row per statistic of :attr:`sums`.
            maxima: One row per statistic of :attr:`maxima`; may be left out when there are none.

        Raises:
            ValueError: If ``maxima`` is left out although maxima are declared.

        Example:
            >>> stats = StatisticSet(Statistic("sq", "sum"), Statistic("top", "max"))
            >>> {name: row.tolist() for name, row in stats.split(np.array([[25.0]]), np.array([[4.0]])).items()}
            {'sq': [25.0], 'top': [4.0]}
        """
        if maxima is None and self.maxima:
            raise ValueError(f"StatisticSet.split: `maxima` is needed for the declared maxima {self.maxima}.")
        blocks = {"sum": sums, "max": sums[:0] if maxima is None else maxima}
        return {s.name: blocks[s.reduce][self._rows[s.name][1]] for s in self.statistics}


def _stack_rows(rows: list[Tensor], values: Mapping[str, Tensor]) -> Tensor:
    if len(rows) == 1:
        return rows[0].unsqueeze(0)  # a view: no copy
    if rows:
        return torch.stack(rows)
    reference = next(iter(values.values()), None)
    if reference is None:
        return torch.zeros(0, 0)
    return reference.new_zeros((0, *reference.shape))


@dataclass(frozen=True, eq=False)
class StatisticTable:
    """Statistics stacked for reduction: rows named by a :class:`StatisticSet`, columns per tensor (or layer).

    Attributes:
        statistics: What the rows are.
        sums: ``(K, C)``: one row per statistic reduced by sum, in :attr:`StatisticSet.sums` order.
        maxima: ``(M, C)``: one row per statistic reduced by maximum.
    """

    statistics: StatisticSet
    sums: Tensor
    maxima: Tensor

    def __getitem__(self, name: str) -> Tensor:
        """The row of one statistic (``KeyError`` if it is not declared)."""
        reduce, row = self.statistics.row(name)
        return (self.sums if reduce == "sum" else self.maxima)[row]

    @property
    def columns(self) -> int:
        """Number of columns (tensors or layers)."""
        return int(self.sums.shape[-1] if self.sums.shape[0] else self.maxima.shape[-1])

    def with_values(self, sums: Tensor, maxima: Tensor) -> StatisticTable:
        """The same statistics with new stacked values (e.g. after a reduction)."""
        return StatisticTable(self.statistics, sums, maxima)

    def replace(self, rows: Mapping[str, Tensor]) -> StatisticTable:
        """A copy with the named rows replaced.

        Example:
            >>> table = StatisticSet(Statistic("sq", "sum")).stack({"sq": torch.tensor([4.0])})
            >>> table.replace({"sq": table["sq"] * 2})["sq"].tolist()
            [8.0]
        """
        values = self.statistics.split(self.sums, self.maxima)
        values.update(rows)
        return self.statistics.stack(values)

    def across_ranks(self, reduction: CrossRankReduction, params: Sequence[Tensor]) -> StatisticTable:
        """Each statistic reduced over the ranks holding parts of the columns' ``params`` (one collective at most).

        Example:
            >>> table = StatisticSet(Statistic("sq", "sum")).stack({"sq": torch.tensor([4.0])})
            >>> table.across_ranks(LocalReduction(), [torch.ones(2)])["sq"].tolist()
            [4.0]
        """
        return self.with_values(*reduction(self.sums, self.maxima, params))

    def to_layers(self, layer_index: Tensor, num_layers: int) -> StatisticTable:
        """Each statistic reduced over the columns of each layer (see :func:`reduce_to_layers`)."""
        return self.with_values(*reduce_to_layers(self.sums, self.maxima, layer_index, num_layers))

    def to_host(self) -> dict[str, np.ndarray]:
        """Every statistic as a float64 host array, with one device-to-host copy for the whole table."""
        sums, maxima = self.sums, self.maxima
        host = torch.cat([sums.flatten(), maxima.flatten()]).cpu().numpy().astype(np.float64)
        return self.statistics.split(
            host[: sums.numel()].reshape(sums.shape), host[sums.numel() :].reshape(maxima.shape)
        )


# --------------------------------------------------------------------------------- basic operations
def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallelism): each rank holds a part of it.

    Example:
        >>> is_dtensor(torch.ones(2))
        False
    """
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (a DTensor's local shard, else the tensor itself)."""
    if is_dtensor(tensor):
        return tensor.to_local()
    return tensor


_LAYOUT = attrgetter("layout")


def plain_gradients(grads: Sequence[Tensor]) -> list[Tensor]:
    """Gradients as dense real tensors whose statistics are those of the gradients themselves.

    A sparse gradient (``nn.Embedding(sparse=True)``) becomes the values of its coalesced form: an index
    repeated in a batch is summed first, as the optimizer applies it, so its norm is the norm of the gradient
    (the raw values of an uncoalesced gradient have another). A complex gradient becomes its elements'
    magnitudes: its L2 norm is the L2 norm of the magnitudes and its largest absolute value the largest
    magnitude. Dense real gradients are returned as they are (one cheap check for the whole list).

    Example:
        >>> sparse = torch.sparse_coo_tensor([[1, 1]], [3.0, 1.0], (4,))  # index 1 twice: 3 + 1
        >>> [g.tolist() for g in plain_gradients([sparse, torch.tensor([3 + 4j])])]
        [[4.0], [5.0]]
    """
    if not grads:
        return []
    complex_types = any(dtype.is_complex for dtype in set(map(_DTYPE, grads)))
    if not complex_types and set(map(_LAYOUT, grads)) == {torch.strided}:
        return list(grads)
    return [_plain(grad) for grad in grads]


def _plain(grad: Tensor) -> Tensor:
    if grad.layout is not torch.strided:
        grad = grad.coalesce().values() if grad.is_sparse else grad.to_dense()
    return grad.abs() if grad.is_complex() else grad


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


_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_SHAPE = attrgetter("shape")


def _single_group(tensors: Sequence[Tensor]) -> bool:
    """Whether all ``tensors`` share one device and one dtype."""
    return len(set(map(_DTYPE, tensors))) == 1 and len(set(map(_DEVICE, tensors))) == 1


def _all_on_cpu(tensors: Sequence[Tensor]) -> bool:
    return all(device.type == "cpu" for device in set(map(_DEVICE, tensors)))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for half types (norms accumulate in at least float32), else ``None`` (the input's own)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def _fused_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """One ``_foreach_norm`` over same-device, same-dtype tensors, accumulated in at least float32."""
    norms = torch._foreach_norm(tensors, ord, dtype=_accumulation_dtype(tensors[0].dtype))
    return torch.stack(norms).to(torch.float32)


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


def nonfinite_counts(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """Number of NaN/Inf elements in each tensor (one small kernel per tensor: use only when needed).

    Example:
        >>> nonfinite_counts([torch.tensor([1.0, float("nan"), float("inf")]), torch.ones(2)]).tolist()
        [2.0, 0.0]
    """
    if not tensors:
        return torch.zeros(0, device=device)
    home = device if device is not None else tensors[0].device
    with torch.no_grad():
        counts = torch.stack([(~torch.isfinite(t)).sum() for t in plain_gradients(tensors)]).to(home)
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


# --------------------------------------------------------------------------- per-tensor kernels
class Snapshot:
    """Copies of tensors before they change (e.g. parameters before an optimizer step), see :func:`snapshot`.

    Attributes:
        kernels: The kernels that made the copies (and that :func:`update_squares` uses on them).
        copies: The copies, laid out as ``kernels`` lays tensors out (:class:`CpuKernels` stacks some).
    """

    def __init__(self, kernels: Kernels, copies: list[Tensor]) -> None:
        self.kernels = kernels
        self.copies = copies


class Kernels(Protocol):
    """The per-tensor statistics of one list of tensors, one implementation per kind of device."""

    def gradient_statistics(self, grads: Sequence[Tensor], device: torch.device | None) -> tuple[Tensor, Tensor]:
        """Squared L2 norm (see :func:`squares`) and largest absolute value (float32) of each tensor."""
        ...

    def parameter_statistics(
        self, params: Sequence[Tensor], device: torch.device | None, copy: bool
    ) -> tuple[Tensor, Snapshot | None]:
        """Squared L2 norm of each tensor and, if ``copy``, a :class:`Snapshot` of them."""
        ...

    def snapshot(self, tensors: Sequence[Tensor]) -> Snapshot:
        """Copies of ``tensors``."""
        ...

    def update_squares(self, after: Sequence[Tensor], before: Snapshot, device: torch.device | None) -> Tensor:
        """Squared L2 norm of ``after[i] - before[i]``; overwrites ``before``'s copies with the differences."""
        ...


_foreach_clone = getattr(torch, "_foreach_clone", None)


class FusedKernels:
    """One fused ``_foreach`` kernel per statistic over all tensors (accelerators, mixed devices).

    Example:
        >>> sq, top = FusedKernels().gradient_statistics([torch.tensor([3.0, -4.0]), torch.zeros(0)], None)
        >>> sq.tolist(), top.tolist()
        ([25.0, 0.0], [4.0, 0.0])
    """

    def gradient_statistics(self, grads: Sequence[Tensor], device: torch.device | None) -> tuple[Tensor, Tensor]:
        """Squared L2 norm and largest absolute value of each tensor (``0`` for empty ones)."""
        return squares(foreach_norms(grads, 2.0, device)), self._max_abs(grads, device)

    @staticmethod
    def _max_abs(tensors: Sequence[Tensor], device: torch.device | None) -> Tensor:
        if all(t.numel() for t in tensors):
            return foreach_norms(tensors, float("inf"), device)
        # Empty shards (FSDP2 gives some ranks 0 rows, FSDP1 empty slices): _foreach_norm(inf) refuses them.
        home = device if device is not None else tensors[0].device
        filled = [i for i, t in enumerate(tensors) if t.numel()]
        out = torch.zeros(len(tensors), dtype=torch.float32, device=home)
        if filled:
            out[torch.tensor(filled, device=home)] = foreach_norms([tensors[i] for i in filled], float("inf"), home)
        return out

    def parameter_statistics(
        self, params: Sequence[Tensor], device: torch.device | None, copy: bool
    ) -> tuple[Tensor, Snapshot | None]:
        """Squared L2 norm of each tensor and, if ``copy``, a snapshot of them."""
        return squares(foreach_norms(params, 2.0, device)), self.snapshot(params) if copy else None

    def snapshot(self, tensors: Sequence[Tensor]) -> Snapshot:
        """A plain ``_foreach_clone`` of ``tensors``."""
        if not tensors:
            return Snapshot(self, [])
        if _foreach_clone is None:  # pragma: no cover - torch without _foreach_clone
            return Snapshot(self, [tensor.clone() for tensor in tensors])
        return Snapshot(self, list(_foreach_clone(list(tensors))))

    def update_squares(self, after: Sequence[Tensor], before: Snapshot, device: torch.device | None) -> Tensor:
        """Squared L2 norm of each ``after[i] - before[i]`` (one ``_foreach_sub_``, one ``_foreach_norm``)."""
        if before.copies:
            torch._foreach_sub_(before.copies, list(after))
        return squares(foreach_norms(before.copies, 2.0, device))


#: On CPU, tensors with at most this many elements are stacked with the others of their shape and dtype, and
#: one kernel serves the stack: there every kernel call pays a fixed dispatch cost, which for a
#: BatchNorm-sized tensor is most of its cost.
STACK_MAX_NUMEL = 4096


@dataclass(frozen=True, eq=False)
class CpuKernels:
    """CPU kernels: small same-shape tensors stacked into one matrix, each statistic taken per block.

    A *block* is either one tensor (a *single*) or a stack of small same-shape, same-dtype tensors as the
    rows of one new matrix (see :data:`STACK_MAX_NUMEL`). All statistics of a block are taken back to back,
    so that every pass after the first reads it from cache. A single's results are bitwise those of
    :class:`FusedKernels` (``_foreach_norm`` runs tensor by tensor on CPU); a stack's agree to rounding.

    Attributes:
        stacks: Positions of the tensors of each stack.
        singles: Positions of the other tensors.
        restore: For each input position, its position among the per-block results laid out as ``singles``
            then each stack; ``None`` when nothing is stacked.

    Example:
        >>> grads = [torch.tensor([3.0, 4.0]), torch.zeros(5000), torch.tensor([-6.0, 8.0])]
        >>> kernels = CpuKernels.plan(grads)
        >>> kernels.stacks, kernels.singles
        (((0, 2),), (1,))
        >>> [t.tolist() for t in kernels.gradient_statistics(grads, None)]
        [[25.0, 0.0, 100.0], [4.0, 0.0, 8.0]]
    """

    stacks: tuple[tuple[int, ...], ...] = ()
    singles: tuple[int, ...] = ()
    restore: Tensor | None = None

    @staticmethod
    def plan(tensors: Sequence[Tensor]) -> CpuKernels:
        """Stack the small tensors of ``tensors`` that share a shape (only when all share one dtype)."""
        if tensors and len(set(map(_DTYPE, tensors))) == 1:
            return _plan_by_shape(tuple(map(_SHAPE, tensors)))
        return CpuKernels((), tuple(range(len(tensors))), None)

    def _blocks(self, tensors: Sequence[Tensor]) -> Iterator[tuple[Tensor, int | None]]:
        """``(block, dim)``: each single as itself (``dim=None``), then each stack as a new matrix (``dim=1``)."""
        for position in self.singles:
            yield tensors[position], None
        for positions in self.stacks:
            yield torch.stack([tensors[i] for i in positions]).flatten(1), 1

    def _gather(self, parts: Sequence[Tensor]) -> Tensor:
        """Per-tensor results in input order, from the per-block ones (0-d for singles, 1-d for stacks)."""
        count = len(self.singles)
        singles = torch.stack(list(parts[:count])) if count else torch.zeros(0)
        if self.restore is None:
            return singles
        return torch.cat([singles, *parts[count:]])[self.restore]

    def gradient_statistics(self, grads: Sequence[Tensor], device: torch.device | None) -> tuple[Tensor, Tensor]:
        """Squared L2 norm and largest absolute value of each tensor (``0`` for empty ones)."""
        norms, lows, highs = [], [], []
        for block, dim in self._blocks(grads):
            norms.append(_norm(block, dim))
            low, high = _extremes(block, dim)
            lows.append(low)
            highs.append(high)
        largest = torch.maximum(self._gather(highs), self._gather(lows).neg_()).abs_()  # abs_: no -0.0
        return squares(self._gather(norms).float()), largest.float()

    def parameter_statistics(
        self, params: Sequence[Tensor], device: torch.device | None, copy: bool
    ) -> tuple[Tensor, Snapshot | None]:
        """Squared L2 norm of each tensor and, if ``copy``, a snapshot of them (a stack is its own copy).

        Without a copy, one ``_foreach_norm`` over all of them: it runs tensor by tensor inside one call, which
        costs less than building the stacks (GPT-2 1M's 28 parameters: 0.18 against 0.26 ms).
        """
        if not copy:
            return squares(foreach_norms(params, 2.0, device)), None
        norms, copies = [], []
        for block, dim in self._blocks(params):
            norms.append(_norm(block, dim))
            if copy:
                copies.append(block.clone() if dim is None else block)
        return squares(self._gather(norms).float()), Snapshot(self, copies) if copy else None

    def snapshot(self, tensors: Sequence[Tensor]) -> Snapshot:
        """Copies of ``tensors``: each single cloned, each stack built as a new matrix."""
        return Snapshot(self, [block.clone() if dim is None else block for block, dim in self._blocks(tensors)])

    def update_squares(self, after: Sequence[Tensor], before: Snapshot, device: torch.device | None) -> Tensor:
        """Squared L2 norm of each ``after[i] - before[i]``, block by block."""
        norms = [_norm(copy.sub_(block), dim) for copy, (block, dim) in zip(before.copies, self._blocks(after))]
        return squares(self._gather(norms).float())


@functools.lru_cache(maxsize=16)
def _plan_by_shape(shapes: tuple[torch.Size, ...]) -> CpuKernels:
    groups: dict[torch.Size, list[int]] = {}
    for position, shape in enumerate(shapes):
        if 0 < math.prod(shape) <= STACK_MAX_NUMEL:
            groups.setdefault(shape, []).append(position)
    stacks = tuple(tuple(positions) for positions in groups.values() if len(positions) > 1)
    stacked = {position for stack in stacks for position in stack}
    singles = tuple(position for position in range(len(shapes)) if position not in stacked)
    if not stacks:
        return CpuKernels((), singles, None)
    layout = torch.tensor([*singles, *(position for stack in stacks for position in stack)])
    restore = torch.empty_like(layout)
    restore[layout] = torch.arange(len(layout))
    return CpuKernels(stacks, singles, restore)


def _norm(tensor: Tensor, dim: int | None) -> Tensor:
    """L2 norm (of each row with ``dim=1``) accumulated in at least float32, as ``_foreach_norm`` on CPU."""
    return torch.linalg.vector_norm(tensor, dim=dim, dtype=_accumulation_dtype(tensor.dtype))


def _extremes(tensor: Tensor, dim: int | None) -> tuple[Tensor, Tensor]:
    """``(min, max)`` (of each row with ``dim=1``); zeros for an empty tensor."""
    if dim is None and not tensor.numel():
        zero = torch.zeros((), dtype=tensor.dtype)
        return zero, zero
    low, high = torch.aminmax(tensor, dim=dim)
    return low, high


def kernels_for(tensors: Sequence[Tensor]) -> Kernels:
    """The kernels for ``tensors``: :class:`CpuKernels` when all are on CPU, else :class:`FusedKernels`.

    Example:
        >>> type(kernels_for([torch.ones(2)])).__name__
        'CpuKernels'
    """
    if tensors and _all_on_cpu(tensors):
        return CpuKernels.plan(tensors)
    return FusedKernels()


#: A one-pass kernel for large gradients (:class:`gradlight.compiled.GradientKernel`): given contiguous
#: tensors on one device, their float64 sums of squares and float32 largest magnitudes, or ``None`` to take the
#: eager kernels instead.
FusedStatistics = Callable[[Sequence[Tensor]], "tuple[Tensor, Tensor] | None"]

#: On CPU, gradients of at least this many elements (contiguous, float32/float64) go through the one-pass
#: ``fused`` kernel when :func:`gradient_statistics` is given one. The compiled kernel sums in float64 and is
#: compute-bound on cached data: it wins where a gradient comes from memory (measured right after backward,
#: one thread: resnet18's gradient statistics 13.0 ms against 17.6 ms at the median, most of it from its
#: 2.4M-element convolutions) and loses on a tensor that is still in cache (GPT-2 1M's 786K-element embedding:
#: 1.5 against 1.1 ms), with a compiled call's fixed cost (tens of microseconds of guards) on top.
FUSED_STATS_MIN_NUMEL = 1 << 20


def gradient_statistics(
    grads: Sequence[Tensor],
    device: torch.device | None = None,
    kernels: Kernels | None = None,
    fused: FusedStatistics | None = None,
) -> tuple[Tensor, Tensor]:
    """Squared L2 norm (see :func:`squares`) and largest absolute value (float32, ``0`` if empty) of each tensor.

    Args:
        grads: Plain (local) tensors.
        device: Where the results live; defaults to the first tensor's device.
        kernels: Which kernels to use; :func:`kernels_for` ``grads`` by default.
        fused: A one-pass kernel for the large CPU gradients (see :data:`FUSED_STATS_MIN_NUMEL`); ``None`` (or
            an explicit ``kernels``) keeps every tensor on the eager kernels, two passes each.

    Example:
        >>> sq, top = gradient_statistics([torch.tensor([3.0, -4.0]), torch.tensor([6.0, 8.0])])
        >>> sq.tolist(), top.tolist()
        ([25.0, 100.0], [4.0, 8.0])
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device), torch.zeros(0, device=device)
    with torch.no_grad():
        grads = plain_gradients(grads)
        if fused is not None and kernels is None:
            large = _fusable_gradients(grads)
            done = _with_fused(grads, large, fused, device) if large else None
            if done is not None:
                return done
        return (kernels if kernels is not None else kernels_for(grads)).gradient_statistics(grads, device)


def _fusable_gradients(grads: Sequence[Tensor]) -> list[int]:
    """Positions of the gradients the one-pass kernel takes (large, contiguous, float32/float64, on CPU)."""
    least = FUSED_STATS_MIN_NUMEL
    return [
        i
        for i, g in enumerate(grads)
        if g.numel() >= least and g.dtype in FUSED_DTYPES and g.device.type == "cpu" and g.is_contiguous()
    ]


def _with_fused(
    grads: Sequence[Tensor], large: list[int], fused: FusedStatistics, device: torch.device | None
) -> tuple[Tensor, Tensor] | None:
    """The large gradients through ``fused``, the others through the eager kernels, in input order."""
    done = fused([grads[i] for i in large])
    if done is None:
        return None
    home = device if device is not None else grads[0].device
    big_sq, big_top = done[0].to(home), done[1].to(home)
    if len(large) == len(grads):
        return big_sq, big_top
    taken = set(large)
    rest = [i for i in range(len(grads)) if i not in taken]
    rest_tensors = [grads[i] for i in rest]
    rest_sq, rest_top = kernels_for(rest_tensors).gradient_statistics(rest_tensors, home)
    sq = torch.empty(len(grads), dtype=big_sq.dtype, device=home)
    top = torch.empty(len(grads), dtype=torch.float32, device=home)
    where_large, where_rest = torch.tensor(large, device=home), torch.tensor(rest, device=home)
    sq[where_large], sq[where_rest] = big_sq, rest_sq.to(big_sq.dtype)
    top[where_large], top[where_rest] = big_top, rest_top
    return sq, top


def parameter_statistics(
    params: Sequence[Tensor],
    device: torch.device | None = None,
    copy: bool = True,
    kernels: Kernels | None = None,
) -> tuple[Tensor, Snapshot | None]:
    """Squared L2 norm of each tensor and, if ``copy``, a :func:`snapshot` of them.

    Example:
        >>> sq, before = parameter_statistics([torch.tensor([3.0, 4.0])], copy=False)
        >>> sq.tolist(), before
        ([25.0], None)
    """
    with torch.no_grad():
        return (kernels if kernels is not None else kernels_for(params)).parameter_statistics(params, device, copy)


def snapshot(tensors: Sequence[Tensor], kernels: Kernels | None = None) -> Snapshot:
    """Copy ``tensors`` (fused, or small ones stacked on CPU), e.g. parameters before an optimizer step.

    Example:
        >>> weight = torch.ones(2)
        >>> before = snapshot([weight])
        >>> weight.add_(torch.tensor([3.0, 4.0]))
        tensor([4., 5.])
        >>> update_squares([weight], before).tolist()
        [25.0]
    """
    with torch.no_grad():
        return (kernels if kernels is not None else kernels_for(tensors)).snapshot(tensors)


def update_squares(after: Sequence[Tensor], before: Snapshot, device: torch.device | None = None) -> Tensor:
    """Squared L2 norm of ``after[i] - before[i]`` for each tensor (see :func:`squares`).

    ``before`` (a :func:`snapshot`) is overwritten with the differences, which saves an allocation.
    """
    if not after:
        return torch.zeros(0, dtype=torch.float64, device=device)
    with torch.no_grad():
        return before.kernels.update_squares(after, before, device)


# ------------------------------------------------------------------------------- across ranks
class CrossRankReduction(Protocol):
    """Turns this rank's per-tensor statistics into exact global ones.

    Implementations must issue the same collectives on every rank, in the same order, whatever the values,
    and at most one collective per call. They get a :class:`StatisticTable`'s two blocks, each reduced as its
    statistics declare (see :meth:`StatisticTable.across_ranks`).
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
    """No reduction: every rank already holds whole tensors (single process, DDP).

    Example:
        >>> sums, maxima = torch.tensor([[4.0]]), torch.tensor([[2.0]])
        >>> LocalReduction()(sums, maxima, [torch.ones(2)]) == (sums, maxima)
        True
    """

    def __call__(self, sums: Tensor, maxima: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Return the statistics unchanged."""
        return sums, maxima
