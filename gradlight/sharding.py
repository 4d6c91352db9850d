"""How statistics combine across ranks, chosen from the Trainer's strategy.

Single-process and DDP runs hold whole gradients on every rank: nothing to combine
(:class:`~gradlight.stats.LocalReduction`). Sharded runs (FSDP1, FSDP2 / ``fully_shard``, HSDP, tensor
parallelism) hold a part of each tensor per rank: :class:`ShardedReduction` turns the per-rank partial
statistics into exact global ones with **one** ``all_gather_into_tensor`` per logged step.

How it stays exact with one collective. Every monitored statistic is either a sum over elements (sums of
squares, non-finite counts) or a maximum. A rank's local sums are added up over the ranks of the gathering
group, but only from ranks that hold a *distinct* copy of each element: for every tensor a rank decides,
from the tensor's layout alone (no communication), whether it *contributes* its local sums. Maxima need no
such care (a maximum over duplicates is the same maximum). The rules:

* DTensor (FSDP2, TP): shards along ``Shard``/``_StridedShard`` mesh dimensions are disjoint; along
  ``Replicate`` mesh dimensions only the rank at coordinate ``0`` contributes. A DTensor on a sub-mesh (e.g.
  the data-parallel mesh of a 2-D run) is replicated across the other copies of that sub-mesh: only the copy
  that contains global rank ``0`` contributes.
* FSDP1 flat-parameter views (``use_orig_params=True``) and flat parameters: disjoint 1-D slices over the
  wrapping unit's process group; with hybrid sharding only the shard group that contains global rank ``0``
  contributes.
* Plain tensors (modules left unsharded): identical on every rank, so only one rank contributes.

The gathered ``(ranks, rows, P)`` block is then summed (contributing entries only) and max-reduced locally,
in the same order on every rank, so every rank gets bit-identical results. When every DTensor lives on one
mesh spanning the world and only one mesh dimension shards (FSDP2, HSDP), the gather runs over that
dimension's group only; otherwise over the default (world) group. A run with nothing sharded issues no
collective at all.

DeepSpeed ZeRO stage 2 and 3 keep no ``param.grad`` at the optimizer hook, so there is nothing per layer to
read; see ``docs/sharding.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.fabric import strategies as fabric_strategies
from lightning.pytorch import strategies as trainer_strategies
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from gradlight.stats import CrossRankReduction, LocalReduction, is_dtensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "SHARDING_MODES",
    "ShardedReduction",
    "contributes",
    "replication_factor",
    "resolve_reduction",
]

#: Accepted values of ``GradientFlowMonitor(sharding=...)`` (besides a ``CrossRankReduction`` instance).
#: ``"auto"`` detects the layout from the Trainer's strategy; ``"none"`` assumes every rank holds whole
#: tensors (single process, DDP, DeepSpeed ZeRO-1); ``"fsdp1"`` and ``"fsdp2"`` reduce sharded tensors
#: exactly (both use :class:`ShardedReduction`, which also covers HSDP and tensor parallelism);
#: ``"deepspeed"`` explains once what DeepSpeed allows and then behaves like ``"none"``.
SHARDING_MODES = ("auto", "none", "fsdp1", "fsdp2", "deepspeed")

ModelSource = nn.Module | Callable[[], "nn.Module | None"] | None


def replication_factor(mesh_shape: Sequence[int], placements: Sequence[object]) -> int:
    """How many ranks of a mesh hold an identical copy of each element of a tensor with ``placements``.

    ``Replicate`` mesh dimensions multiply the replication; sharding ones (``Shard``, ``_StridedShard``) do
    not. Summing every rank's local statistics and dividing by this factor is exact in real arithmetic;
    :class:`ShardedReduction` instead lets exactly one replica contribute (see :func:`contributes`), which is
    also exact in floating point.

    Args:
        mesh_shape: The device mesh's shape, e.g. ``(2, 4)`` for 2 replicas of 4 shards.
        placements: One placement per mesh dimension (``DTensor.placements``).

    Returns:
        The number of identical copies of each element.

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> replication_factor((2, 4), (Replicate(), Shard(0)))
        2
        >>> replication_factor((4,), (Shard(0),))
        1
    """
    _check_placements(placements)
    return math.prod(size for size, p in zip(mesh_shape, placements) if _is_replicate(p))


def contributes(coordinate: Sequence[int] | None, placements: Sequence[object]) -> bool:
    """Whether the rank at mesh ``coordinate`` adds its local sums for a tensor with ``placements``.

    Exactly one rank per distinct shard contributes: the one at coordinate ``0`` along every ``Replicate``
    mesh dimension. A rank outside the mesh (``coordinate is None``) holds nothing and does not contribute.

    Args:
        coordinate: The rank's coordinate in the mesh (``DeviceMesh.get_coordinate()``).
        placements: One placement per mesh dimension.

    Returns:
        ``True`` if this rank's local sums count.

    Raises:
        ValueError: For a ``Partial`` placement (pending sums cannot give exact norms).

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> [contributes(c, (Replicate(), Shard(0))) for c in ([0, 0], [0, 1], [1, 0], [1, 1])]
        [True, True, False, False]
    """
    _check_placements(placements)
    if coordinate is None:
        return False
    return all(c == 0 for c, p in zip(coordinate, placements) if _is_replicate(p))


def _is_replicate(placement: object) -> bool:
    return bool(getattr(placement, "is_replicate", lambda: False)())


def _check_placements(placements: Sequence[object]) -> None:
    for placement in placements:
        if getattr(placement, "is_partial", lambda: False)():
            raise ValueError(
                f"gradlight: a parameter has a Partial placement ({placement}); its local values are pending "
                "sums, so norms cannot be reduced exactly. Redistribute it to Shard or Replicate."
            )


@dataclass
class _Plan:
    """What one rank does for one list of parameters: whether to gather, over which group, what it adds."""

    gather: bool
    group: dist.ProcessGroup | None
    group_size: int
    contributes: Tensor  # (P,) bool on the statistics' device


class ShardedReduction:
    """Exact global statistics of sharded tensors with one ``all_gather_into_tensor`` per call.

    Works for FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``), HSDP (replicate x shard
    meshes), tensor parallelism, FSDP1 (Lightning's ``FSDPStrategy``) and models where only some modules are
    sharded. Parameters that are DTensors, FSDP1 views or plain tensors may be mixed in one call. Which rank
    contributes what is decided once per parameter list from the layouts and cached; every call then costs
    one collective of ``world x statistics x P`` floats (``group x ...`` when one mesh dimension shards), or none
    when nothing is sharded.

    Args:
        model: The wrapped model (or a callable returning it, evaluated lazily on the first call). Only needed
            under FSDP1, to find each flat parameter's process group for hybrid sharding and to tell
            ``use_orig_params=False`` runs apart; without it FSDP1 views are taken as sharded over the world.

    Example:
        >>> reduction = ShardedReduction()
        >>> sums, maxima = torch.tensor([[9.0, 16.0]]), torch.tensor([[3.0, 4.0]])
        >>> reduction(sums, maxima, [torch.zeros(1), torch.zeros(1)])  # not distributed: unchanged
        (tensor([[ 9., 16.]]), tensor([[3., 4.]]))
    """

    def __init__(self, model: ModelSource = None) -> None:
        self._model_source = model
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._warned_flat = False
        #: Number of collectives this reduction issued (diagnostics and tests).
        self.collectives = 0

    def __call__(self, sums: Tensor, maxima: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Reduce ``(K, P)`` sums and ``(M, P)`` maxima over the ranks holding parts of ``params``.

        These are the two blocks of a :class:`~gradlight.stats.StatisticTable`: sums add up the contributing
        ranks' values, maxima take the maximum over all ranks.

        Args:
            sums: Local statistics that add up over shards.
            maxima: Local statistics reduced by maximum (``-inf`` for "nothing here").
            params: The ``P`` parameters as the model holds them, identical in number and order on every rank.

        Returns:
            The global ``(K, P)`` sums and ``(M, P)`` maxima, identical on every rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or sums.shape[1] == 0:
            return sums, maxima
        plan = self._plan(params, sums.device)
        if not plan.gather:
            return sums, maxima
        rows = sums.shape[0]
        dtype = torch.promote_types(sums.dtype, maxima.dtype)
        local = torch.cat([torch.where(plan.contributes, sums, 0.0).to(dtype), maxima.to(dtype)]).contiguous()
        gathered = local.new_empty((plan.group_size * local.shape[0], local.shape[1]))
        dist.all_gather_into_tensor(gathered, local, group=plan.group)
        self.collectives += 1
        blocks = gathered.view(plan.group_size, local.shape[0], local.shape[1])
        global_sums = blocks[:, :rows].sum(0).to(sums.dtype)
        global_max = blocks[:, rows:].amax(0).to(maxima.dtype) if maxima.shape[0] else maxima
        return global_sums, global_max

    # ----------------------------------------------------------------------------------------- planning
    def _plan(self, params: Sequence[Tensor], device: torch.device) -> _Plan:
        key = (device, *(id(p) for p in params))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(params, device)
            if len(self._plans) > 16:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _make_plan(self, params: Sequence[Tensor], device: torch.device) -> _Plan:
        rank = dist.get_rank()
        world = dist.get_world_size()
        fsdp1_groups = self._fsdp1_groups()
        dtensor_flags = [is_dtensor(p) for p in params]
        is_fsdp1 = [not d and _is_fsdp1_sharded(p, fsdp1_groups) for p, d in zip(params, dtensor_flags)]
        self._warn_flat_parameters(params)
        self._warn_layout_mismatch(params, dtensor_flags)

        def sharded(p: Tensor) -> bool:
            return any(not _is_replicate(pl) for pl in p.placements)  # type: ignore[attr-defined]

        if not any(is_fsdp1) and not any(sharded(p) for p, d in zip(params, dtensor_flags) if d):
            # Nothing is sharded: every rank holds every element, the local statistics are global ones.
            return _Plan(False, None, 1, torch.ones(len(params), dtype=torch.bool, device=device))

        narrow = None if any(is_fsdp1) else _single_shard_dim(params, dtensor_flags, world)
        flags: list[bool] = []
        if narrow is not None:  # gather over one mesh dimension's group
            mesh, dim = narrow
            coordinate = mesh.get_coordinate()
            assert coordinate is not None  # the mesh spans the world
            for p, d in zip(params, dtensor_flags):
                if d:
                    _check_placements(p.placements)  # type: ignore[attr-defined]
                    flags.append(not _is_replicate(p.placements[dim]) or coordinate[dim] == 0)  # type: ignore[attr-defined]
                else:
                    flags.append(coordinate[dim] == 0)
            group: dist.ProcessGroup | None = mesh.get_group(dim)
            size = dist.get_world_size(group)
        else:  # gather over the world
            for p, d, f in zip(params, dtensor_flags, is_fsdp1):
                if d:
                    mesh = p.device_mesh  # type: ignore[attr-defined]
                    holds_rank_zero = 0 in mesh.mesh.flatten().tolist()
                    flags.append(holds_rank_zero and contributes(mesh.get_coordinate(), p.placements))  # type: ignore[attr-defined]
                elif f:
                    shard_group = fsdp1_groups.get(id(p))
                    flags.append(shard_group is None or 0 in dist.get_process_group_ranks(shard_group))
                else:
                    flags.append(rank == 0)
            group, size = None, world
        return _Plan(True, group, size, torch.tensor(flags, dtype=torch.bool, device=device))

    def _model(self) -> nn.Module | None:
        source = self._model_source
        if source is None or isinstance(source, nn.Module):
            return source
        return source()

    def _fsdp1_groups(self) -> dict[int, dist.ProcessGroup | None]:
        """``id(parameter) -> shard process group`` for every FSDP1 flat parameter and its views.

        ``None`` marks units that do not shard (``NO_SHARD``): whole, identical tensors on every rank.
        """
        model = self._model()
        if model is None:
            return {}
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        except ImportError:  # pragma: no cover
            return {}
        groups: dict[int, dist.ProcessGroup | None] = {}
        for module in model.modules():
            if not isinstance(module, FullyShardedDataParallel):
                continue
            handle = getattr(module, "_handle", None)
            flat = getattr(handle, "flat_param", None)
            if flat is None:
                continue
            group = module.process_group
            if group is None:
                continue
            if module.sharding_strategy == ShardingStrategy.NO_SHARD:
                group = None
            groups[id(flat)] = group
            for view in getattr(flat, "_params", None) or ():
                groups[id(view)] = group
        return groups

    def _warn_layout_mismatch(self, params: Sequence[Tensor], dtensor_flags: Sequence[bool]) -> None:
        mismatched = sum(
            True
            for p, d in zip(params, dtensor_flags)
            if d and is_dtensor(p.grad) and tuple(p.grad.placements) != tuple(p.placements)  # type: ignore[attr-defined]
        )
        if mismatched:
            rank_zero_warn(
                f"gradlight: {mismatched} parameter(s) have gradients laid out differently from the parameters "
                "(DTensor placements); statistics follow the parameters' layout, so those gradients' norms may "
                "be inexact. torch optimizers also expect matching layouts."
            )

    def _warn_flat_parameters(self, params: Sequence[Tensor]) -> None:
        if self._warned_flat:
            return
        try:
            from torch.distributed.fsdp import FlatParameter
        except ImportError:  # pragma: no cover
            return
        if any(isinstance(p, FlatParameter) for p in params):
            self._warned_flat = True
            rank_zero_warn(
                "gradlight: FSDP1 with `use_orig_params=False` exposes one flat parameter per wrapped unit, so "
                "statistics are per wrapped unit (layer = the wrapped module), exact across ranks. Use "
                "`FSDPStrategy(use_orig_params=True)` (Lightning's default) for per-layer statistics."
            )


def _is_fsdp1_sharded(param: Tensor, groups: dict[int, dist.ProcessGroup | None]) -> bool:
    if id(param) in groups:
        return groups[id(param)] is not None
    if getattr(param, "_fsdp_flattened", False):
        return True
    try:
        from torch.distributed.fsdp import FlatParameter
    except ImportError:  # pragma: no cover
        return False
    return isinstance(param, FlatParameter)


def _single_shard_dim(
    params: Sequence[Tensor], dtensor_flags: Sequence[bool], world: int
) -> tuple[DeviceMesh, int] | None:
    """``(mesh, dim)`` if every DTensor is on one world-spanning mesh sharded along ``dim`` only."""
    meshes = {id(p.device_mesh): p.device_mesh for p, d in zip(params, dtensor_flags) if d}  # type: ignore[attr-defined]
    if len(meshes) != 1:
        return None
    (mesh,) = meshes.values()
    if mesh.size() != world:
        return None
    dims = {
        i
        for p, d in zip(params, dtensor_flags)
        if d
        for i, placement in enumerate(p.placements)  # type: ignore[attr-defined]
        if not _is_replicate(placement)
    }
    if len(dims) != 1:
        return None
    return mesh, dims.pop()


class _DeepSpeedNotice(LocalReduction):
    """``LocalReduction`` that says once what gradlight can and cannot see under DeepSpeed."""

    def __init__(self, stage: int | None) -> None:
        self.stage = stage
        if stage is None or stage >= 2:
            rank_zero_warn(
                f"gradlight: DeepSpeed ZeRO stage {stage if stage is not None else '?'} keeps no `param.grad` at "
                "`on_before_optimizer_step` (gradients live in the engine's partitioned buffers), so no "
                "per-layer gradient statistics can be recorded. Use ZeRO stage 0/1 (exact, like DDP), or FSDP; "
                "the global norm is available from `trainer.strategy.deepspeed_engine.get_global_grad_norm()`."
            )


def _deepspeed_stage(strategy: object) -> int | None:
    config = getattr(strategy, "config", None)
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else 0
    return None


#: Strategy classes whose runs shard gradients, checked in order: ``(classes, mode)``. Fabric's and the
#: Trainer's classes are distinct; both are recognised. ``DeepSpeedStrategy`` subclasses ``DDPStrategy``.
_STRATEGY_MODES: tuple[tuple[tuple[type, ...], str], ...] = (
    ((trainer_strategies.DeepSpeedStrategy, fabric_strategies.DeepSpeedStrategy), "deepspeed"),
    ((trainer_strategies.ModelParallelStrategy, fabric_strategies.ModelParallelStrategy), "fsdp2"),
    ((trainer_strategies.FSDPStrategy, fabric_strategies.FSDPStrategy), "fsdp1"),
)


def _detect(strategy: object) -> str:
    """The sharding mode of a Lightning strategy (``"none"`` for any other object)."""
    for classes, mode in _STRATEGY_MODES:
        if isinstance(strategy, classes):
            return mode
    return "none"


def resolve_reduction(strategy: object, sharding: str | CrossRankReduction = "auto") -> CrossRankReduction:
    """Pick the cross-rank reduction for ``strategy``; a ``CrossRankReduction`` passed in is used as is.

    ``"auto"`` maps Lightning's ``ModelParallelStrategy`` to ``"fsdp2"``, ``FSDPStrategy`` to ``"fsdp1"``,
    ``DeepSpeedStrategy`` to ``"deepspeed"`` and everything else (single device, DDP) to ``"none"``. Both
    sharded modes return a :class:`ShardedReduction`, which inspects the parameters themselves, so it is
    also exact for layouts the strategy name does not tell (HSDP, TP, partly sharded models).

    Args:
        strategy: The Trainer's strategy (``trainer.strategy``).
        sharding: A mode from :data:`SHARDING_MODES` or a ``CrossRankReduction``.

    Returns:
        The reduction the tracker should use.

    Raises:
        ValueError: If ``sharding`` is an unknown mode.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> type(resolve_reduction(SingleDeviceStrategy("cpu"))).__name__
        'LocalReduction'
        >>> type(resolve_reduction(SingleDeviceStrategy("cpu"), "fsdp2")).__name__
        'ShardedReduction'
    """
    if not isinstance(sharding, str):
        return sharding
    if sharding not in SHARDING_MODES:
        raise ValueError(f"`sharding` must be one of {SHARDING_MODES} or a CrossRankReduction, got {sharding!r}.")
    mode = _detect(strategy) if sharding == "auto" else sharding
    if mode in ("fsdp1", "fsdp2"):
        return ShardedReduction(model=lambda: getattr(strategy, "model", None))
    if mode == "deepspeed":
        return _DeepSpeedNotice(_deepspeed_stage(strategy))
    return LocalReduction()
