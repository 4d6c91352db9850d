"""The Trainer-free core: read one optimizer step's gradients, finish after the step, emit a record.

:class:`GradientFlowTracker` knows nothing about Lightning. The Lightning monitor drives it from its hooks;
the Ultralytics baseline drives it from its trainer's ``optimizer_step``. A logged step is two calls:

1. :meth:`GradientFlowTracker.capture` right before the optimizer step: fused per-tensor gradient and
   parameter norms on the device, plus a copy of the parameters if the update ratio is tracked;
2. :meth:`GradientFlowTracker.finalize` right after it: the update norms, the cross-rank reduction (if any),
   the per-layer reduction, and one device-to-host copy for everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradlight.compiled import GradientKernel, check_kernel
from gradlight.layers import ForwardOrderRecorder, GroupBy, LayerMap
from gradlight.stats import (
    CrossRankReduction,
    LocalReduction,
    Statistic,
    StatisticSet,
    StatisticTable,
    gradient_statistics,
    local_tensor,
    nonfinite_counts,
    parameter_statistics,
    plain_gradients,
    squares,
    wide_dtype,
)
from gradlight.update_ratio import UpdateNorms

__all__ = [
    "GRAD_COUNT",
    "LAYER_METRICS",
    "NONFINITE_STATISTICS",
    "STEP_STATISTICS",
    "GradientFlowTracker",
    "StepRecord",
    "early_late_ratio",
]

#: Per-layer metrics of every record, in this order.
LAYER_METRICS = ("grad_l2", "grad_max_abs", "grad_nonfinite", "param_l2", "update_ratio")

#: Per-parameter statistics of a logged step, reduced across ranks and into layers by name.
STEP_STATISTICS = StatisticSet(
    Statistic("grad_sq", "sum"),
    Statistic("param_sq", "sum"),
    Statistic("update_sq", "sum"),
    Statistic("grad_max", "max"),
)
#: Recounted when a step's fused gradient norms were not finite (rare).
NONFINITE_STATISTICS = StatisticSet(Statistic("grad_nonfinite", "sum"), Statistic("grad_sq", "sum"))
#: ``1`` where a rank read a gradient: added to either set when columns are aligned across ranks, so that a
#: parameter no rank has a gradient for is left out, as in one process.
GRAD_COUNT = Statistic("grad_count", "sum")


@dataclass
class StepRecord:
    """Statistics of one optimizer step.

    Attributes:
        step: The optimizer step (``trainer.global_step`` when the gradients were read).
        layers: Names of the layers that had gradients, in forward order.
        depths: Depth of each of those layers.
        metrics: ``metric -> values`` with one value per layer (see :data:`LAYER_METRICS`).
        global_metrics: Run-wide values: ``global_grad_l2``, ``global_grad_max_abs``,
            ``global_grad_nonfinite``, ``early_late_ratio``, ``grad_l2_min``, ``grad_l2_max``.
        missing: Layers that are trainable and handed to the optimizer but whose parameters all had no
            gradient (``.grad is None``) at this step: ``layer -> its parameter names``. Such layers are not
            in :attr:`layers`. Not written to the history; the diagnosis reads it (``no_gradient``).
        learning_rates: The learning rate of each layer in :attr:`layers` (the largest of its parameters'
            param groups), when the capture's ``owner`` was an optimizer; else ``None``.
        max_learning_rate: The largest learning rate over every captured parameter group, or ``None``.
    """

    step: int
    layers: list[str]
    depths: np.ndarray
    metrics: dict[str, np.ndarray]
    global_metrics: dict[str, float] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    learning_rates: np.ndarray | None = None
    max_learning_rate: float | None = None

    def value(self, metric: str, layer: str) -> float:
        """One layer's value of one metric."""
        return float(self.metrics[metric][self.layers.index(layer)])

    def to_frame(self) -> pd.DataFrame:
        """The record in :func:`gradlight.load_history`'s long format (per-layer rows only)."""
        count = len(self.layers)
        return pd.DataFrame(
            {
                "step": self.step,
                "layer": np.tile(self.layers, len(self.metrics)),
                "depth": np.tile(self.depths, len(self.metrics)),
                "metric": np.repeat(list(self.metrics), count),
                "value": np.concatenate([self.metrics[m] for m in self.metrics]) if count else [],
            }
        )


def early_late_ratio(grad_l2: np.ndarray, edge_layers: int = 1) -> float:
    """Geometric mean of the first ``edge_layers`` layers' norms over that of the last ones.

    Example:
        >>> round(early_late_ratio(np.array([1e-6, 1e-3, 1.0])), 12)
        1e-06
    """
    if grad_l2.size == 0:
        return float("nan")
    count = max(1, min(edge_layers, grad_l2.size // 2 or 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(grad_l2.astype(np.float64))
        return float(np.exp(logs[:count].mean() - logs[-count:].mean()))


@dataclass
class _Pending:
    step: int
    owner: object
    indices: list[int]
    grads: list[Tensor]
    params: list[Tensor]
    originals: list[Tensor]
    grad_sq: Tensor
    grad_max: Tensor
    param_sq: Tensor
    measures_update: bool  # the update ratio is tracked: ``updates.before_step`` was called
    grad_scale: float
    grad_count: Tensor | None  # 1 where this rank read a gradient (aligned columns only), else None
    missing: list[int]  # trainable parameters without a gradient (not aligned columns), by position
    learning_rates: dict[int, float] | None  # position -> its param group's learning rate


class GradientFlowTracker:
    """Per-layer gradient statistics of one model, exact and cheap.

    Args:
        model: The model whose parameters are monitored (names are taken from ``named_parameters()``).
        group_by: ``None`` (one layer per module that owns parameters), an int (keep that many leading name
            components) or a callable ``param_name -> layer_name``.
        exclude: ``fnmatch`` patterns of parameter names not to monitor.
        track_update_ratio: Record ``update_ratio``. Costs nothing on steps that are not logged; on logged
            steps, passes over the optimizer's state (see ``update_method``), or one copy of the monitored
            parameters where the update cannot be reconstructed from it.
        edge_layers: How many first and last layers the early-to-late ratio compares.
        reduction: How statistics combine across ranks; :class:`~gradlight.stats.LocalReduction` when every
            rank holds whole tensors (single process, DDP).
        update_method: How ``update_ratio`` gets the step's update (:class:`gradlight.update_ratio.UpdateNorms`):
            ``"auto"`` reconstructs it from the optimizer's state where that is exact (SGD, Adam, AdamW in
            float32/float64: no copy of the parameters) and copies the parameters elsewhere; ``"optimizer"``
            or ``"copy"`` force one. Which method each param group used: ``tracker.updates.methods``.
        update_kernel: Which kernels reconstruct the update (:class:`gradlight.update_ratio.UpdateNorms`'s
            ``kernel``): ``"auto"`` (a ``torch.compile``'d kernel per large tensor where compiling works, compiled
            on the first logged step; eager kernels elsewhere, with the reason in ``tracker.updates.kernel_info``),
            ``"fused"`` or ``"eager"``. The same setting compiles the one-pass statistics of large gradients
            (:class:`gradlight.compiled.GradientKernel`; with ``"eager"`` they take two passes).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> tracker = GradientFlowTracker(net)
        >>> net(torch.randn(2, 4)).sum().backward()
        >>> tracker.capture(step=0, params=net.parameters())
        >>> record = tracker.finalize()
        >>> record.layers, record.metrics["grad_l2"].shape
        (['0', '2'], (2,))
    """

    def __init__(
        self,
        model: nn.Module,
        group_by: GroupBy = None,
        exclude: Sequence[str] = (),
        track_update_ratio: bool = True,
        edge_layers: int = 1,
        reduction: CrossRankReduction | None = None,
        update_method: str = "auto",
        update_kernel: str = "auto",
    ) -> None:
        check_kernel(update_kernel)
        self.updates = UpdateNorms(update_method, kernel=update_kernel) if track_update_ratio else None
        #: The one-pass kernel for the large gradients' statistics (compiled as ``update_kernel`` says).
        self.gradient_kernel = GradientKernel(update_kernel)
        self.model = model
        self.group_by = group_by
        self.exclude = tuple(exclude)
        self.edge_layers = edge_layers
        self.reduction: CrossRankReduction = reduction if reduction is not None else LocalReduction()
        self.forward_order: list[str] | None = None
        self.latest: StepRecord | None = None
        self._layer_map: LayerMap | None = None
        self._recorder: ForwardOrderRecorder | None = None
        self._pending: _Pending | None = None
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._trainable: set[int] = set()  # parameters kept in the layer map even while frozen (see capture)

    # ----------------------------------------------------------------------------------- layer discovery
    def start_discovery(self) -> None:
        """Install forward pre-hooks that record the order in which parameter-owning modules run."""
        if self._recorder is None and self.forward_order is None:
            self._recorder = ForwardOrderRecorder(self.model)

    def stop_discovery(self) -> None:
        """Remove the discovery hooks and fix the layers' depths."""
        if self._recorder is not None:
            self._recorder.remove()
            self.forward_order = list(self._recorder.order)
            self._recorder = None
            self._layer_map = None
            self._index_cache.clear()

    @property
    def discovering(self) -> bool:
        """Whether the forward-order hooks are installed."""
        return self._recorder is not None

    def set_forward_order(self, order: Sequence[str]) -> None:
        """Use a known forward order (e.g. restored from a checkpoint) instead of discovering it."""
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self.forward_order = list(order)
        self._layer_map = None
        self._index_cache.clear()

    @property
    def layer_map(self) -> LayerMap:
        """Parameter -> layer mapping, built on first use (after discovery when there is one)."""
        if self._layer_map is None:
            self._layer_map = LayerMap.build(
                self.model.named_parameters(),
                self.group_by,
                self.exclude,
                self.forward_order or (),
                trainable=self._trainable,
            )
        return self._layer_map

    # ----------------------------------------------------------------------------------- one logged step
    @property
    def pending(self) -> bool:
        """Whether a captured step awaits :meth:`finalize`."""
        return self._pending is not None

    @property
    def pending_step(self) -> int | None:
        """The step that awaits :meth:`finalize`, if any."""
        return None if self._pending is None else self._pending.step

    def pending_owner(self) -> object:
        """The ``owner`` passed to :meth:`capture` for the pending step (e.g. the optimizer)."""
        return None if self._pending is None else self._pending.owner

    def capture(self, step: int, params: Iterable[Tensor], grad_scale: float = 1.0, owner: object = None) -> None:
        """Read the gradients of ``params`` before the optimizer step. No host synchronisation.

        Args:
            step: The optimizer step these gradients belong to.
            params: Parameters about to be stepped (e.g. every parameter of an optimizer). Parameters that
                are excluded, frozen, or have no gradient are skipped.
            grad_scale: Divide gradients by this (an AMP loss scale the gradients still carry).
            owner: Identifies who captured (e.g. the optimizer); see :meth:`pending_owner`.

        A parameter that was frozen when the layer map was built and requires gradients now (another
        optimizer's parameters under Lightning's ``toggle_optimizer``, a backbone unfrozen later) joins the
        map; every parameter in it stays, frozen or not, and is read whenever it is captured and trainable.
        """
        params = list(params)
        layer_map = self._admit_thawed(params)
        indices: list[int] = []
        grads: list[Tensor] = []
        tensors: list[Tensor] = []
        originals: list[Tensor] = []
        seen: set[int] = set()
        # Across ranks, columns must line up: a sharded reduction gets a column for every trainable
        # parameter, even one whose gradient is None on this rank (FSDP1 gives empty slices no gradient).
        aligned = not isinstance(self.reduction, LocalReduction)
        has_grad: list[bool] = []
        missing: list[int] = []
        lookup = layer_map.params_by_id.get
        with torch.no_grad():  # no autograd views (DTensor.to_local), no .detach() per tensor needed
            for param in params:
                position = lookup(id(param))
                if position is None or position in seen or not param.requires_grad:
                    continue
                grad = param.grad
                if grad is None and not aligned:
                    seen.add(position)
                    missing.append(position)
                    continue
                seen.add(position)
                indices.append(position)
                local = local_tensor(param)
                grads.append(local_tensor(grad) if grad is not None else local.new_zeros(0))
                has_grad.append(grad is not None)
                tensors.append(local)
                originals.append(param)
            flags = has_grad if aligned else None
            pending = self._measure(step, owner, indices, grads, tensors, originals, flags, grad_scale)
        pending.missing = missing
        pending.learning_rates = _learning_rates(owner, layer_map.params_by_id)
        self._pending = pending

    def _admit_thawed(self, params: list[Tensor]) -> LayerMap:
        """The layer map, rebuilt first if a parameter frozen at its build requires gradients now."""
        layer_map = self.layer_map
        frozen = layer_map.frozen
        if frozen:
            thawed = {id(p) for p in params if id(p) in frozen and p.requires_grad}
            if thawed:
                self._trainable |= set(layer_map.params_by_id) | thawed
                self._layer_map = None
                self._index_cache.clear()
                layer_map = self.layer_map
        return layer_map

    def _measure(
        self,
        step: int,
        owner: object,
        indices: list[int],
        grads: list[Tensor],
        tensors: list[Tensor],
        originals: list[Tensor],
        has_grad: list[bool] | None,
        grad_scale: float,
    ) -> _Pending:
        """The fused, device-side part of :meth:`capture` (no host synchronisation).

        ``has_grad`` is given for aligned columns only (a cross-rank reduction), else ``None``.
        """
        device = tensors[0].device if tensors else torch.device("cpu")
        grads = plain_gradients(grads)  # sparse: coalesced values; complex: magnitudes
        grad_sq, grad_max = gradient_statistics(grads, device, fused=self.gradient_kernel)
        grad_count = torch.tensor(has_grad).to(device, grad_sq.dtype) if has_grad is not None else None
        if grad_scale != 1.0:
            grad_sq = grad_sq / (grad_scale * grad_scale)
            grad_max = grad_max / grad_scale
        param_sq, _ = parameter_statistics(tensors, device, copy=False)
        if self.updates is not None:
            self.updates.before_step(originals, owner, grad_scale)
        return _Pending(
            step=step,
            owner=owner,
            indices=indices,
            grads=grads,
            params=tensors,
            originals=originals,
            grad_sq=grad_sq,
            grad_max=grad_max,
            param_sq=param_sq,
            measures_update=self.updates is not None,
            grad_scale=grad_scale,
            grad_count=grad_count,
            missing=[],
            learning_rates=None,
        )

    def pending_gradients(self) -> dict[str, Tensor]:
        """``layer -> its captured local gradient elements`` (flattened, unscaled) of the pending step.

        Example:
            >>> net = nn.Linear(2, 1)
            >>> tracker = GradientFlowTracker(net)
            >>> net(torch.ones(1, 2)).sum().backward()
            >>> tracker.capture(step=0, params=net.parameters())
            >>> {layer: grad.numel() for layer, grad in tracker.pending_gradients().items()}
            {'(root)': 3}
        """
        pending = self._pending
        if pending is None:
            return {}
        layer_map = self.layer_map
        parts: dict[str, list[Tensor]] = {}
        for position, grad in zip(pending.indices, pending.grads):
            if grad.numel():
                parts.setdefault(layer_map.layers[layer_map.param_layer[position]], []).append(grad.flatten())
        return {layer: torch.cat(grads) / pending.grad_scale for layer, grads in parts.items()}

    def discard(self) -> None:
        """Drop a captured step without recording it."""
        self._pending = None
        if self.updates is not None:
            self.updates.discard()

    def finalize(self) -> StepRecord:
        """Finish the captured step after the optimizer step and return its record (one host copy).

        Raises:
            RuntimeError: If no step was captured.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("finalize() called without a captured step: call capture() first")
        self._pending = None
        device = pending.grad_sq.device
        if pending.measures_update and self.updates is not None:
            update_sq = self.updates.after_step().to(device, pending.param_sq.dtype)
        else:
            update_sq = torch.full_like(pending.param_sq, float("nan"))
        values = {
            "grad_sq": pending.grad_sq,
            "param_sq": pending.param_sq,
            "update_sq": update_sq,
            "grad_max": pending.grad_max,
        }
        table = self._reduce(STEP_STATISTICS, values, pending)
        param_layer = self.layer_map.param_layer
        candidates = sorted({param_layer[i] for i in pending.indices})
        layer_index = self._layer_index(pending.indices, candidates, device)
        layers = table.to_layers(layer_index, len(candidates)).to_host()
        # Layers whose parameters had a gradient on some rank (all of them unless columns are aligned).
        keep = layers["grad_count"] > 0 if "grad_count" in layers else np.ones(len(candidates), dtype=bool)
        present = [layer for layer, kept in zip(candidates, keep) if kept]
        layers["grad_nonfinite"] = np.zeros(len(candidates))
        if not np.isfinite(layers["grad_sq"]).all():  # rare: one more collective, on this step only
            layers.update(self._recount_nonfinite(pending, layer_index, len(candidates)))
        record = self._record(pending.step, present, {name: values[keep] for name, values in layers.items()})
        if pending.grad_scale != 1.0:
            record.global_metrics["grad_scale"] = pending.grad_scale
        self._attach_optimizer_view(record, pending, [layer for layer, kept in zip(candidates, keep) if not kept])
        return record

    def _reduce(self, statistics: StatisticSet, values: dict[str, Tensor], pending: _Pending) -> StatisticTable:
        """Stack ``values`` as ``statistics`` and reduce them across ranks (one collective at most).

        With aligned columns, ``grad_count`` joins the table and every other sum is zeroed where no rank read a
        gradient (that column's parameter is skipped, as in one process).
        """
        if pending.grad_count is None:
            return statistics.stack(values).across_ranks(self.reduction, pending.originals)
        table = statistics.extend(GRAD_COUNT).stack({**values, "grad_count": pending.grad_count})
        table = table.across_ranks(self.reduction, pending.originals)
        read = table["grad_count"] > 0
        return table.replace({name: table[name] * read for name in statistics.sums})

    def _attach_optimizer_view(self, record: StepRecord, pending: _Pending, absent: list[int]) -> None:
        """Layers without any gradient (``missing``) and per-layer learning rates, from the host-side lists."""
        layer_map = self.layer_map
        names = layer_map.layers
        missing: dict[str, list[str]] = {}
        for position in sorted(pending.missing, key=lambda p: layer_map.param_layer[p]):  # in forward order
            missing.setdefault(names[layer_map.param_layer[position]], []).append(layer_map.param_names[position])
        for layer in absent:  # aligned columns: no rank had a gradient for any of the layer's parameters
            members = [n for n, i in zip(layer_map.param_names, layer_map.param_layer) if i == layer]
            missing.setdefault(names[layer], members)
        present = set(record.layers)
        record.missing = {layer: params for layer, params in missing.items() if layer not in present}
        rates = pending.learning_rates
        if rates is None:
            return
        per_layer: dict[str, float] = {}
        for position, rate in rates.items():
            name = names[layer_map.param_layer[position]]
            per_layer[name] = max(per_layer.get(name, rate), rate)
        record.learning_rates = np.array([per_layer.get(layer, np.nan) for layer in record.layers])
        record.max_learning_rate = max(rates.values(), default=None)

    def _recount_nonfinite(self, pending: _Pending, layer_index: Tensor, num_layers: int) -> dict[str, np.ndarray]:
        """Exact per-layer ``grad_nonfinite`` counts and ``grad_sq`` for a step whose fused norms were not finite.

        A float32 norm also overflows when every element is finite but their squares' sum is above ~3e38
        (elements of ~1e19 and more): those tensors' norms are recomputed in float64, so a huge but finite
        gradient is reported as huge, not as non-finite. Counts and squares share one reduction.
        """
        device = pending.grad_sq.device
        counts = nonfinite_counts(pending.grads, device)
        grad_sq = pending.grad_sq.clone()
        overflowed = ((~torch.isfinite(grad_sq)) & (counts == 0)).nonzero().flatten().tolist()  # host sync
        for i in overflowed:
            grad = pending.grads[i]
            wide = torch.linalg.vector_norm(grad, dtype=wide_dtype(device))
            grad_sq[i] = squares(wide.to(device)) / (pending.grad_scale * pending.grad_scale)
        values = {"grad_nonfinite": counts.to(grad_sq.dtype), "grad_sq": grad_sq}
        table = self._reduce(NONFINITE_STATISTICS, values, pending)
        return table.to_layers(layer_index, num_layers).to_host()

    def _layer_index(self, indices: list[int], present: list[int], device: torch.device) -> Tensor:
        key = tuple(indices)
        cached = self._index_cache.get(key)
        if cached is None or cached.device != device:
            compact = {layer: i for i, layer in enumerate(present)}
            layer_of = self.layer_map.param_layer
            cached = torch.tensor([compact[layer_of[i]] for i in indices], dtype=torch.long).to(device)
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def _record(self, step: int, present: list[int], layers: dict[str, np.ndarray]) -> StepRecord:
        """The record of the ``present`` layers from their reduced statistics (see :data:`STEP_STATISTICS`)."""
        grad_sq, grad_max, nonfinite = layers["grad_sq"], layers["grad_max"], layers["grad_nonfinite"]
        grad_l2 = np.sqrt(grad_sq)
        param_l2 = np.sqrt(layers["param_sq"])
        with np.errstate(divide="ignore", invalid="ignore"):
            update_ratio = np.where(param_l2 > 0, np.sqrt(layers["update_sq"]) / param_l2, np.nan)
        names = self.layer_map.layers
        finite = grad_l2[np.isfinite(grad_l2)]
        global_metrics = {
            # No gradient read at all (e.g. DeepSpeed ZeRO >= 2 keeps none in `param.grad`): NaN, not 0.
            "global_grad_l2": float(np.sqrt(grad_sq.sum())) if grad_sq.size else float("nan"),
            "global_grad_max_abs": float(grad_max.max()) if grad_max.size else float("nan"),
            "global_grad_nonfinite": float(nonfinite.sum()),
            "early_late_ratio": early_late_ratio(grad_l2, self.edge_layers),
            "grad_l2_min": float(finite.min()) if finite.size else float("nan"),
            "grad_l2_max": float(finite.max()) if finite.size else float("nan"),
        }
        record = StepRecord(
            step=step,
            layers=[names[i] for i in present],
            depths=np.asarray(present, dtype=np.int32),
            metrics={
                "grad_l2": grad_l2,
                "grad_max_abs": grad_max,
                "grad_nonfinite": nonfinite.astype(np.float64),
                "param_l2": param_l2,
                "update_ratio": update_ratio,
            },
            global_metrics=global_metrics,
        )
        self.latest = record
        return record


def _learning_rates(owner: object, params_by_id: dict[int, int]) -> dict[int, float] | None:
    """``parameter position -> learning rate of its param group`` when ``owner`` is an optimizer, else ``None``.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD([{"params": [net.weight], "lr": 0.1}, {"params": [net.bias], "lr": 0.0}])
        >>> _learning_rates(optimizer, {id(net.weight): 0, id(net.bias): 1})
        {0: 0.1, 1: 0.0}
    """
    groups = getattr(owner, "param_groups", None)
    if not isinstance(groups, list):
        return None
    rates: dict[int, float] = {}
    for group in groups:
        rate = group.get("lr") if isinstance(group, dict) else None
        if rate is None:
            continue
        value = float(rate)  # a tensor learning rate (capturable optimizers) is read once per logged step
        for param in group.get("params", ()):
            position = params_by_id.get(id(param))
            if position is not None:
                rates[position] = value
    return rates
