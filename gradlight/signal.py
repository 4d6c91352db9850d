"""Backward-signal taps: the gradient of the loss with respect to each block's output, and each block's gain.

Parameter gradients show that an early layer starves; they do not show *where along the path* the signal
is lost, and a block without parameters (an activation, a pooling, a concatenation) is invisible to them.
:class:`BackwardSignalTaps` measures the signal itself. It knows nothing about Lightning:

.. code-block:: python

    taps = BackwardSignalTaps(model)            # default blocks: the layer grouping (``group_by``)
    taps.start()                                # logged step, before the first forward: installs hooks
    for micro_batch in step_batches:            # forward + backward; micro-batches accumulate
        loss_fn(model(micro_batch)).backward()
    taps.stop()                                 # after the last backward: every hook removed
    stats = taps.finalize(step)                 # one stacked tensor -> optional reduce -> one host copy
    stats.blocks, stats.metrics["signal_l2"], stats.calls, stats.gain_decades
    stats.path_decades("model.0", "model.4")    # e.g. -3.0: lost between block 0's input and block 4's output
    stats.attenuating(below=-0.5)               # [("model.2", -2.0), ...]: where, strongest first

**Blocks.** By default the taps sit on the modules named by the layer grouping (``group_by``, as in
:func:`gradlight.layers.layer_name_for`): with ``group_by=None`` every module that owns parameters, with
``group_by=2`` e.g. ``model.3``, so the signal heat map lines up row by row with the parameter heat map.
A grouping callable that returns names which are not module names taps nothing for those groups. ``blocks``
chooses other modules: a list of module names or patterns matched component by component (``*`` does not
cross a dot, so ``"model.*"`` taps every child of ``model``, parameter-free ones such as Ultralytics'
``Concat`` and ``Upsample`` included), or a predicate ``(name, module) -> bool``. Blocks are ordered by when
they first start running with gradients enabled (a parent before its children; blocks inside a reentrant
activation checkpoint first run so during backward, and come last).

**What is measured, per block** (over every element of every call in every tapped micro-batch):

* ``signal_l2``: L2 norm of dL/dy, the gradient of the loss with respect to the block's output ``y`` (all
  floating-point tensors of a tuple/list/dict output together), read by tensor hooks that forward hooks
  attach to the outputs. Since it is a *tensor* gradient, it is the total one: when ``y`` also feeds a
  shortcut or a concatenation further on, their gradients are part of it.
* ``signal_max_abs`` and ``signal_nonfinite``: largest absolute element and number of NaN/Inf elements of
  dL/dy; ``signal_elements``: its number of elements (``signal_l2 / sqrt(signal_elements)`` is the RMS).
* ``signal_in_l2``: L2 norm of dL/dx over the block's floating-point inputs that require gradients (tensor
  hooks attached by forward pre-hooks), NaN when no input requires gradients (the model's input, usually).
* ``signal_gain``: ``log10(signal_in_l2 / signal_l2)``, the block's gain in decades (negative: the block
  attenuates the signal on its way back to the input).
* ``signal_calls``: calls per forward pass. A module called several times in one forward (a shared or
  recurrent block) has its calls *summed* (squares added, maxima taken), and ``calls > 1`` marks it. Calls
  are counted between backward passes, so the recomputation of activation checkpointing (reentrant or
  not) is not a second call; the signals under checkpointing equal those without it (a test checks both).

**What a gain means.** In a chain (each block's input is the previous block's output) the input signal of
block ``b`` *is* the output signal of block ``b - 1``, so gains add up along the path: the decades lost
between the output of block ``i`` and the input of block ``j`` are the sum of their gains. Between tapped
blocks, untapped modules (an activation outside the grouped modules) show as a gap between one block's input
signal and the previous block's output signal. Because the input signal is the total gradient of the
input tensor:

* *Residual add inside the block* (a ResNet ``Bottleneck`` tapped whole, an ``x + f(x)`` block): the
  shortcut is part of the block, so its gain is the whole block's, close to 0 decades when the shortcut
  carries the signal.
* *Shortcut around the block* (``y = x + f(x)`` with ``f`` tapped): dL/dx includes the shortcut's gradient,
  so the gain of ``f`` is the gain of the residual unit seen from ``f``'s input; a branch that attenuates
  behind a healthy shortcut reads about 0 decades. Tap the unit (its parent) or the branch's inner modules
  to see the branch's own attenuation.
* *Concatenation*: a ``Concat`` block's output signal splits into its inputs' parts, so its gain without
  other consumers is at most 0 decades (the inputs' squares add up to the output's); an input that is also
  used elsewhere (YOLO's feature-pyramid skips) brings that consumer's gradient too.
* *Fan-out* (one tensor into several blocks): each consuming block's input signal is the same total.

**Across ranks, exactly.** Gradients with respect to activations are per rank: each rank backpropagates
its own micro-batch. Sums of squares and counts are summed over ranks, maxima max-reduced, with one
collective (:func:`all_gather_reduction`). DDP averages parameter gradients over the ``W`` data-parallel
ranks, which makes them the gradient of ``(1/W) sum_r L_r``; the activation gradient consistent with that
loss is each rank's own divided by ``W``, so :meth:`BackwardSignalTaps.finalize` divides the norms and
maxima by ``data_parallel_size``. When every rank's loss is the mean over its equal share of the global
batch, the result equals the single-process signal of the global batch with the mean loss, bit-identical
on every rank. Gains are ratios: the scaling cancels. FSDP1, FSDP2 and HSDP do not shard activations (every
rank holds whole activations of its own micro-batch) and average gradients over all data-parallel ranks, so
the same reduction over the world group is exact (tests check DDP and FSDP2 on 2 processes against a single
process to 1e-5). The division holds whatever the loss (mean or sum): it makes the signal the gradient of
the loss whose gradient the optimizer steps on. A DDP communication hook that sums instead of averaging
needs ``data_parallel_size=1``. Tensor parallelism is *not* covered: ranks of a tensor-parallel group see
the same data and hold replicated or sharded activations, so the reduction would have to run over
the data-parallel group only, on blocks whose outputs are replicated across the tensor-parallel group.

**Other things that hold.** Gradient accumulation: the tensor hooks of every micro-batch add up, so the
norm is that of the accumulated step. fp16 AMP with a loss scaler: backward runs on the scaled loss, so pass
the scale as ``grad_scale``; bf16 needs none. Half-precision gradients are accumulated in float32 and
squared in float64. Hooks never change what autograd computes: they only read gradients.

**Cost.** Nothing at all between logged steps (no hook is registered). On a logged step, per gradient
read, an L2 norm, a largest magnitude and a non-finite count (on CPU, the count only when the norm is not
finite), on the device. A tensor that is one block's output and the next one's input is read once.
:meth:`finalize` makes one host copy. ``benchmarks/signal_overhead.py`` measures it.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradlight.layers import ROOT_LAYER, GroupBy, clean_parameter_name, layer_name_for, validate_group_by

__all__ = [
    "SIGNAL_METRICS",
    "BackwardSignalTaps",
    "BlockSelector",
    "SignalReduction",
    "SignalStats",
    "all_gather_reduction",
]

#: Metrics of every tapped block, in this order (see the module docstring).
SIGNAL_METRICS = (
    "signal_l2",
    "signal_max_abs",
    "signal_nonfinite",
    "signal_elements",
    "signal_in_l2",
    "signal_gain",
    "signal_calls",
)

#: Which modules are blocks: ``None`` (the layer grouping), names / patterns, or ``(name, module) -> bool``.
BlockSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None

#: ``(sums, maxima) -> (sums, maxima)`` over ranks: ``(B, 4)`` sums added up, ``(B, 1)`` maxima max-reduced.
SignalReduction = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# Columns of the per-block sums: dL/dy squares, dL/dy non-finite count, dL/dy elements, dL/dx squares.
_OUT_SQ, _OUT_NONFINITE, _OUT_ELEMENTS, _IN_SQ = range(4)
_NUM_SUMS = 4


@dataclass
class SignalStats:
    """Backward-signal statistics of one logged step.

    Attributes:
        step: The optimizer step.
        blocks: Block names, in forward order.
        depths: Depth of each block (its position in forward order unless ``depth_of`` gave one).
        metrics: ``metric -> values`` with one value per block (see :data:`SIGNAL_METRICS`).

    Example:
        >>> stats = SignalStats(0, ["a", "b"], np.arange(2), {"signal_l2": np.array([1e-3, 1.0]),
        ...                     "signal_gain": np.array([np.nan, -3.0]), "signal_calls": np.array([1, 2])})
        >>> stats.value("signal_l2", "b"), stats.gain_decades.tolist(), stats.shared
        (1.0, [nan, -3.0], ['b'])
    """

    step: int
    blocks: list[str]
    depths: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def calls(self) -> np.ndarray:
        """Calls per forward pass of each block (``> 1``: a shared or recurrent block, its calls summed)."""
        return self.metrics["signal_calls"]

    @property
    def gain_decades(self) -> np.ndarray:
        """``log10(input signal / output signal)`` of each block (NaN without an input signal)."""
        return self.metrics["signal_gain"]

    @property
    def shared(self) -> list[str]:
        """Blocks called more than once per forward pass."""
        return [block for block, calls in zip(self.blocks, self.calls) if calls > 1]

    def value(self, metric: str, block: str) -> float:
        """One block's value of one metric."""
        return float(self.metrics[metric][self.blocks.index(block)])

    def path_decades(self, first: str, last: str) -> float:
        """Decades the signal changes by from ``last``'s output back to ``first``'s input (negative: lost).

        ``log10(input signal of first / output signal of last)``: in a chain, the sum of the gains of the
        blocks from ``first`` to ``last``, plus whatever untapped modules between them do.

        Raises:
            ValueError: If a name is not a block, or ``first`` runs after ``last``.

        Example:
            >>> stats = SignalStats(0, ["a", "b"], np.arange(2), {"signal_l2": np.array([1e-3, 1.0]),
            ...                     "signal_in_l2": np.array([1e-4, 1e-3])})
            >>> round(stats.path_decades("a", "b"), 6)
            -4.0
        """
        for name in (first, last):
            if name not in self.blocks:
                raise ValueError(f"{name!r} is not a tapped block; blocks are {self.blocks[:6]}...")
        i, j = self.blocks.index(first), self.blocks.index(last)
        if i > j:
            raise ValueError(f"`first` {first!r} runs after `last` {last!r}; pass them in forward order.")
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log10(self.metrics["signal_in_l2"][i]) - np.log10(self.metrics["signal_l2"][j]))

    def attenuating(self, below: float = -0.5) -> list[tuple[str, float]]:
        """Blocks whose gain is below ``below`` decades, strongest attenuation first.

        Example:
            >>> stats = SignalStats(0, ["a", "b", "c"], np.arange(3), {"signal_gain": np.array([np.nan, -2.0, -0.1])})
            >>> stats.attenuating()
            [('b', -2.0)]
        """
        gains = self.gain_decades
        found = [(block, float(gain)) for block, gain in zip(self.blocks, gains) if gain < below]
        return sorted(found, key=lambda item: item[1])


class _Slot:
    """One tapped module's per-step state (Python counters; tensors live in the taps' row list)."""

    __slots__ = ("calls", "elements", "has_input", "has_output", "index", "name", "segment_calls")

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index  # position in forward order (fixed when the block first runs)
        self.calls = 0  # most calls in one forward pass, this step
        self.segment_calls = 0  # calls in the current forward pass
        self.elements = 0  # dL/dy elements seen
        self.has_output = False  # an output required gradients
        self.has_input = False  # an input required gradients


class _TensorTap:
    """One tensor whose gradient is read once, for every (block, role) that tapped it."""

    __slots__ = ("inputs", "outputs")

    def __init__(self) -> None:
        self.outputs: list[_Slot] = []
        self.inputs: list[_Slot] = []


class BackwardSignalTaps:
    """Hooks that read dL/d(block output) and dL/d(block input) on logged steps only.

    Args:
        model: The model; block names are taken from its ``named_modules()`` (wrapper components such as
            FSDP's ``_fsdp_wrapped_module`` dropped, as for the layers).
        blocks: Which modules to tap (see :data:`BlockSelector` and the module docstring). ``None``: the
            modules named by the layer grouping ``group_by``.
        group_by: The layer grouping used when ``blocks`` is ``None`` (``None``, a positive int or a callable
            ``param_name -> layer_name``, as for the monitor).

    Raises:
        ValueError: If ``group_by`` is invalid, a name or pattern in ``blocks`` matches no module, or
            ``blocks`` is neither a sequence of strings nor a callable.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> taps = BackwardSignalTaps(net, blocks=["*"])  # every child, the sigmoids included
        >>> taps.start()
        >>> net(torch.randn(16, 4)).square().mean().backward()
        >>> taps.stop()
        >>> stats = taps.finalize(step=0)
        >>> stats.blocks
        ['0', '1', '2', '3', '4']
        >>> bool((stats.gain_decades[1::2] < math.log10(0.25)).all())  # a sigmoid passes at most 1/4 back
        True
    """

    def __init__(self, model: nn.Module, blocks: BlockSelector = None, group_by: GroupBy = None) -> None:
        validate_group_by(group_by)
        self.model = model
        self.group_by = group_by
        self._modules = _select_blocks(model, blocks, group_by)  # [(clean name, module)], distinct modules
        self._slots: dict[int, _Slot] = {}  # id(module) -> slot, once the module has run
        self._order: list[_Slot] = []
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self._tensor_taps: dict[tuple[int, int], tuple[weakref.ref[Tensor], _TensorTap]] = {}
        self._rows: list[Tensor] = []  # one (3,) vector per gradient read: L2, max-abs, non-finite count
        self._row_outputs: list[list[int]] = []  # per row, the slots it is the output signal of
        self._row_inputs: list[list[int]] = []  # per row, the slots it is the input signal of
        self._gradient_seen = False

    # --------------------------------------------------------------------------------------- structure
    @property
    def block_names(self) -> list[str]:
        """Names of the modules that will be tapped, in ``named_modules()`` order."""
        return [name for name, _ in self._modules]

    @property
    def blocks(self) -> list[str]:
        """Names of the blocks seen running so far, in forward order."""
        return [slot.name for slot in self._order]

    @property
    def active(self) -> bool:
        """Whether module hooks are installed."""
        return bool(self._handles)

    @property
    def pending(self) -> bool:
        """Whether gradients were read that :meth:`finalize` has not consumed yet."""
        return bool(self._rows)

    # ------------------------------------------------------------------------------------- hook control
    def start(self) -> None:
        """Install the module hooks (idempotent: the micro-batches of one step share one installation)."""
        if self._handles:
            return
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._make_enter(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._make_exit(name)))

    def stop(self) -> None:
        """Remove every hook, module and tensor ones; call it after the step's last backward pass.

        The statistics collected so far stay until :meth:`finalize`.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()
        self._tensor_taps.clear()

    def discard(self) -> None:
        """Remove the hooks and drop what was collected."""
        self.stop()
        self._reset()

    def _reset(self) -> None:
        self._rows.clear()
        self._row_outputs.clear()
        self._row_inputs.clear()
        self._gradient_seen = False
        for slot in self._order:
            slot.calls = slot.segment_calls = slot.elements = 0
            slot.has_input = slot.has_output = False

    # ------------------------------------------------------------------------------------------- hooks
    def _slot(self, module: nn.Module, name: str) -> _Slot:
        slot = self._slots.get(id(module))
        if slot is None:
            slot = _Slot(name, len(self._order))
            self._slots[id(module)] = slot
            self._order.append(slot)
        return slot

    def _make_enter(self, name: str) -> Callable[..., None]:
        def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not torch.is_grad_enabled():
                return  # no backward will follow (validation, or a reentrant checkpoint's first pass)
            slot = self._slot(module, name)
            if self._gradient_seen:  # a backward ran since the last call: this is a new forward pass
                self._gradient_seen = False
                for other in self._order:
                    other.segment_calls = 0
            slot.segment_calls += 1
            slot.calls = max(slot.calls, slot.segment_calls)
            for tensor in _grad_tensors((args, kwargs)):
                slot.has_input = True
                self._tap(tensor).inputs.append(slot)

        return enter

    def _make_exit(self, name: str) -> Callable[..., None]:
        def exit_(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            slot = self._slot(module, name)
            for tensor in _grad_tensors(output):
                slot.has_output = True
                self._tap(tensor).outputs.append(slot)

        return exit_

    def _tap(self, tensor: Tensor) -> _TensorTap:
        """The tap of ``tensor`` (its current version), registering its gradient hook the first time."""
        key = (id(tensor), tensor._version)
        known = self._tensor_taps.get(key)
        if known is not None and known[0]() is tensor:
            return known[1]
        tap = _TensorTap()
        self._tensor_taps[key] = (weakref.ref(tensor), tap)
        self._tensor_handles.append(tensor.register_hook(self._make_reader(tap)))
        return tap

    def _make_reader(self, tap: _TensorTap) -> Callable[[Tensor], None]:
        def read(grad: Tensor) -> None:
            self._gradient_seen = True
            self._rows.append(_gradient_row(grad))
            self._row_outputs.append([slot.index for slot in tap.outputs])
            self._row_inputs.append([slot.index for slot in tap.inputs])
            for slot in tap.outputs:
                slot.elements += grad.numel()

        return read

    # ------------------------------------------------------------------------------------------ result
    def finalize(
        self,
        step: int,
        reduce: SignalReduction | None = None,
        *,
        grad_scale: float = 1.0,
        data_parallel_size: int = 1,
        depth_of: Mapping[str, int] | None = None,
    ) -> SignalStats | None:
        """Turn the gradients read into per-block statistics (one reduction, one host copy) and reset.

        Args:
            step: The optimizer step the statistics belong to.
            reduce: Combines the ``(blocks, 4)`` sums and ``(blocks, 1)`` maxima over ranks (e.g.
                :func:`all_gather_reduction`); every rank must call :meth:`finalize` with the same blocks
                seen. ``None`` for a single process.
            grad_scale: The loss scale backward ran with (fp16 AMP); norms and maxima are divided by it.
            data_parallel_size: Number of ranks whose gradients the strategy averages (DDP, FSDP: the world
                size); norms and maxima are divided by it (see the module docstring).
            depth_of: ``block name -> depth`` (e.g. the layers' depths, so rows line up with the parameter
                heat map); a block not in it gets the depth of the block before it in forward order (the
                history keeps rows of equal depth in the order written, which is forward order). Default:
                the position in forward order.

        Returns:
            The statistics, or ``None`` if no block has run since the taps were created.

        Raises:
            ValueError: If ``grad_scale`` is not a positive finite number or ``data_parallel_size`` is not a
                positive int.
        """
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"`grad_scale` must be a positive finite number, got {grad_scale!r}.")
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"`data_parallel_size` must be a positive int, got {data_parallel_size!r}.")
        slots = self._order
        if not slots:
            return None
        sums, maxima = self._per_block()
        if reduce is not None:
            sums, maxima = reduce(sums, maxima)
        host = torch.cat([sums, maxima], dim=1).cpu().numpy().astype(np.float64)
        stats = self._derive(step, host, grad_scale * data_parallel_size, depth_of)
        self._reset()
        return stats

    def _per_block(self) -> tuple[Tensor, Tensor]:
        """``(B, 4)`` sums and ``(B, 1)`` maxima on the device, from the rows read."""
        count = len(self._order)
        device = self._rows[0].device if self._rows else _model_device(self.model)
        wide = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.zeros(count, _NUM_SUMS, dtype=wide, device=device)
        maxima = torch.zeros(count, 1, dtype=wide, device=device)
        elements = torch.tensor([float(slot.elements) for slot in self._order], dtype=wide)
        sums[:, _OUT_ELEMENTS] = elements.to(device, non_blocking=True)
        if not self._rows:
            return sums, maxima
        rows = torch.stack(self._rows).to(wide)  # (R, 3): L2, max-abs, non-finite
        out_rows, out_blocks = _pairs(self._row_outputs)
        in_rows, in_blocks = _pairs(self._row_inputs)
        if out_rows:
            r = torch.tensor(out_rows, device=device)
            b = torch.tensor(out_blocks, device=device)
            picked = rows.index_select(0, r)
            sums[:, _OUT_SQ].index_add_(0, b, picked[:, 0].square())
            sums[:, _OUT_NONFINITE].index_add_(0, b, picked[:, 2])
            maxima[:, 0].scatter_reduce_(0, b, picked[:, 1], reduce="amax")  # NaN propagates
        if in_rows:
            r = torch.tensor(in_rows, device=device)
            b = torch.tensor(in_blocks, device=device)
            sums[:, _IN_SQ].index_add_(0, b, rows.index_select(0, r)[:, 0].square())
        return sums, maxima

    def _derive(self, step: int, host: np.ndarray, scale: float, depth_of: Mapping[str, int] | None) -> SignalStats:
        slots = self._order
        out_l2 = np.sqrt(host[:, _OUT_SQ]) / scale
        in_l2 = np.sqrt(host[:, _IN_SQ]) / scale
        max_abs = host[:, _NUM_SUMS] / scale
        has_output = np.array([slot.has_output for slot in slots])
        has_input = np.array([slot.has_input for slot in slots])
        out_l2[~has_output] = np.nan
        max_abs[~has_output] = np.nan
        in_l2[~has_input] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.log10(in_l2) - np.log10(out_l2)
        depths = np.arange(len(slots), dtype=np.int32)
        if depth_of is not None:  # a block that is no layer (a Concat) shares the depth of the block before it
            previous = 0
            for i, slot in enumerate(slots):
                previous = depths[i] = depth_of.get(slot.name, previous)
        return SignalStats(
            step=step,
            blocks=[slot.name for slot in slots],
            depths=depths,
            metrics={
                "signal_l2": out_l2,
                "signal_max_abs": max_abs,
                "signal_nonfinite": host[:, _OUT_NONFINITE].copy(),
                "signal_elements": host[:, _OUT_ELEMENTS].copy(),
                "signal_in_l2": in_l2,
                "signal_gain": gain,
                "signal_calls": np.array([slot.calls for slot in slots], dtype=np.int64),
            },
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)


def all_gather_reduction(group: dist.ProcessGroup | None = None) -> SignalReduction:
    """A :data:`SignalReduction` with one all-gather (``all_gather_single``) over ``group``.

    Every rank gets the same result: the gathered ``(ranks, ...)`` block is summed (sums) and max-reduced
    (maxima) locally, in the same order everywhere. Use the world group (the default) under DDP, FSDP1,
    FSDP2 and HSDP: every rank there backpropagates its own data.

    Args:
        group: The process group; ``None`` for the default (world) group.

    Returns:
        The reduction, to pass to :meth:`BackwardSignalTaps.finalize`.

    Example:
        >>> stats = taps.finalize(step, all_gather_reduction(), data_parallel_size=world)  # doctest: +SKIP
    """

    def reduce(sums: Tensor, maxima: Tensor) -> tuple[Tensor, Tensor]:
        local = torch.cat([sums.reshape(-1), maxima.reshape(-1)])
        world = dist.get_world_size(group)
        gathered = local.new_empty(world * local.numel())
        _all_gather(gathered, local, group=group)
        gathered = gathered.view(world, -1)
        split = sums.numel()
        total = gathered[:, :split].sum(0).view_as(sums)
        largest = gathered[:, split:].amax(0).view_as(maxima)  # NaN propagates
        return total, largest

    return reduce


# ------------------------------------------------------------------------------------------- helpers
# torch >= 2.14 names it all_gather_single and deprecates all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gradient_row(grad: Tensor) -> Tensor:
    """``[L2, max |g|, non-finite count]`` of one gradient, in float32, on its device.

    On accelerators these are three fused reductions and nothing waits for them. On CPU, where reading a
    scalar costs nothing but ``ord=inf`` norms and ``isfinite`` counts are 10-30x slower than an L2 norm
    (``benchmarks/signal_overhead.py``), the largest magnitude comes from ``aminmax`` and non-finite
    elements are counted only when the L2 norm says there are any.
    """
    with torch.no_grad():
        if grad.numel() == 0:
            return torch.zeros(3, dtype=torch.float32, device=grad.device)
        accumulate = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None
        l2 = torch.linalg.vector_norm(grad, dtype=accumulate).float()
        if grad.device.type != "cpu":
            largest = torch.linalg.vector_norm(grad, ord=math.inf).float()
            nonfinite = (grad.numel() - torch.isfinite(grad).sum()).float()
            return torch.stack([l2, largest, nonfinite])
        low, high = torch.aminmax(grad)
        largest = torch.maximum(high.float(), low.float().neg())  # NaN propagates
        if math.isfinite(float(l2)):  # every element finite (a finite square sum has no Inf or NaN term)
            nonfinite = torch.zeros((), dtype=torch.float32)
        else:
            nonfinite = (grad.numel() - torch.isfinite(grad).sum()).float()
        return torch.stack([l2, largest, nonfinite])


def _pairs(per_row: list[list[int]]) -> tuple[list[int], list[int]]:
    """Flatten ``row -> [blocks]`` into parallel ``(rows, blocks)`` lists."""
    rows: list[int] = []
    blocks: list[int] = []
    for row, targets in enumerate(per_row):
        rows.extend([row] * len(targets))
        blocks.extend(targets)
    return rows, blocks


def _grad_tensors(value: Any) -> Iterator[Tensor]:
    """Floating-point tensors that require gradients in a (nested tuple/list/dict) value."""
    if isinstance(value, Tensor):
        if value.requires_grad and value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _grad_tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _grad_tensors(item)


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _select_blocks(model: nn.Module, blocks: BlockSelector, group_by: GroupBy) -> list[tuple[str, nn.Module]]:
    """The modules to tap, as ``(clean name, module)``, each module once, in ``named_modules()`` order."""
    named: dict[str, nn.Module] = {}
    for raw, module in model.named_modules():
        named[clean_parameter_name(raw) or ROOT_LAYER] = module  # a wrapper and its inner module: the inner
    if blocks is None:
        wanted = _layer_names(model.named_parameters(), group_by)
        chosen = [(name, module) for name, module in named.items() if name in wanted]
    elif callable(blocks):
        chosen = [(name, module) for name, module in named.items() if blocks(name, module)]
    elif isinstance(blocks, Sequence) and not isinstance(blocks, str) and all(isinstance(b, str) for b in blocks):
        chosen = []
        for pattern in blocks:
            matched = [(name, module) for name, module in named.items() if _matches(name, pattern)]
            if not matched:
                sample = ", ".join(list(named)[1:6])
                raise ValueError(
                    f"`blocks` entry {pattern!r} matches no module; names look like {sample} (patterns match "
                    f"component by component: '*' does not cross a dot)."
                )
            chosen.extend(matched)
    else:
        raise ValueError(
            f"`blocks` must be None (the layer grouping), a sequence of module names or patterns, or a callable "
            f"(name, module) -> bool; got {blocks!r}."
        )
    seen: set[int] = set()
    unique = []
    for name, module in chosen:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append((name, module))
    return unique


def _layer_names(named_parameters: Iterable[tuple[str, nn.Parameter]], group_by: GroupBy) -> set[str]:
    names = set()
    for raw, param in named_parameters:
        if param.requires_grad:
            names.add(layer_name_for(clean_parameter_name(raw), group_by))
    return names


def _matches(name: str, pattern: str) -> bool:
    """Component-wise ``fnmatch``: ``"model.*"`` matches ``model.3`` but not ``model.3.conv``.

    The root module matches only ``"(root)"`` itself.
    """
    if name == ROOT_LAYER or pattern == ROOT_LAYER:
        return name == pattern
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))
