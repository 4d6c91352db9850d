"""Top-level workers for multi-process (gloo, CPU) tests of gradlight under sharding.

Each worker is started by :func:`tests._distributed.spawn`, sets the torch.distributed environment itself
and builds its own Trainer, so pytest is never re-run in a child. Results go to files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests._distributed import CollectiveCounter, init_env, spawn

__all__ = ["MODES", "CollectiveCounter", "make_net", "reduction_worker", "spawn", "train_worker"]

MODES = (
    "single",
    "fsdp1",
    "fsdp1_flat",
    "fsdp1_noshard",
    "hsdp1",
    "fsdp2",
    "fsdp2_partial",
    "fsdp2_nan",
    "hsdp2",
    "tp",
)
SAMPLES, GLOBAL_BATCH, STEPS = 16, 8, 3


# ------------------------------------------------------------------------------------------ the model
def make_net() -> nn.Sequential:
    """Sizes that shard unevenly over 2 ranks, with empty shards (``Linear(3, 1)``: 1 row -> [1, 0])."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.Tanh(),
        nn.LayerNorm(7),
        nn.Linear(7, 3),
        nn.Tanh(),
        nn.Linear(3, 1),
    )


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 5, generator=generator)
    y = torch.randn(SAMPLES, 1, generator=generator)
    return TensorDataset(x, y)


def _module_class() -> type:
    import lightning as L

    class ShardNet(L.LightningModule):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode
            self.net = make_net()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            if self.mode == "tp":  # tensor parallel: Shard(0), Shard(1) and Replicate DTensors, plain LayerNorm
                from torch.distributed.tensor import Replicate
                from torch.distributed.tensor.parallel import (
                    ColwiseParallel,
                    RowwiseParallel,
                    parallelize_module,
                )

                plan = {
                    "0": ColwiseParallel(output_layouts=Replicate()),  # Shard(0), 7 rows: [4, 3]
                    "3": ColwiseParallel(output_layouts=Replicate()),  # Shard(0), 3 rows: [2, 1]
                    "5": RowwiseParallel(input_layouts=Replicate()),  # Shard(1) [2, 1]; bias Replicate
                }
                parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
                return
            if self.mode == "hsdp2":  # FSDP2 on a (replicate, shard) mesh: Replicate x Shard(0)
                from torch.distributed.device_mesh import init_device_mesh

                hybrid = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("r", "s"))
                for index in (0, 3, 5):
                    fully_shard(self.net[index], mesh=hybrid)
                fully_shard(self.net, mesh=hybrid)
                return
            if not self.mode.startswith("fsdp2"):
                return
            mesh = self.device_mesh["data_parallel"]
            if self.mode in ("fsdp2", "fsdp2_nan"):
                for index in (0, 3, 5):
                    fully_shard(self.net[index], mesh=mesh)
                fully_shard(self.net, mesh=mesh)  # the root: ``training_step`` calls ``self.net``
            else:  # only the first Linear is sharded; the rest stays plain (replicated, synced below)
                fully_shard(self.net[0], mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def on_after_backward(self) -> None:
            if self.mode == "fsdp2_nan" and self.trainer.global_step == STEPS - 1:
                local = self.net[0].weight.grad.to_local()  # one NaN per rank in its shard of net.0.weight
                local.view(-1)[0] = float("nan")
            if self.mode != "fsdp2_partial":
                return
            # DDP for the unsharded part: average its gradients (this is not what the test counts).
            for p in self.parameters():
                if p.grad is not None and not hasattr(p, "placements"):
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self) -> DataLoader:
            dataset = make_dataset()
            world = self.trainer.world_size
            # Rank r takes rows r, r+W, ...: together the same global batches as one process. Tensor
            # parallel ranks all see the whole batch.
            if world > 1 and self.mode != "tp":
                sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False)
                return DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)
            return DataLoader(dataset, batch_size=GLOBAL_BATCH, shuffle=False)

    return ShardNet


def _fsdp1_strategy(use_orig_params: bool, hybrid: bool = False, no_shard: bool = False) -> Any:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDP1 on CPU (test only): Lightning's FSDPStrategy passes no ``device_id`` for CPU."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            extra: dict[str, Any] = {}
            if no_shard:  # FSDP1 as DDP: whole flat parameters, all-reduced gradients
                extra = {"sharding_strategy": ShardingStrategy.NO_SHARD}
            if hybrid:  # shard within groups of 2 ranks, replicate across them
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2))
                extra = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD, "device_mesh": mesh}
            return FullyShardedDataParallel(
                model,
                device_id=torch.device("cpu"),
                use_orig_params=use_orig_params,
                auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                **extra,
            )

    return CPUFSDPStrategy()


def train_worker(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    """Train ``STEPS`` steps under ``mode`` with a monitor writing to ``out_dir/history``."""
    init_env(rank, world, port)
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy

    from gradlight import GradientFlowMonitor

    counter = CollectiveCounter()
    step_counts: list[int] = []

    class OpenStepWindow(Callback):  # first callback: the logged step's window opens before the monitor's hook
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            counter.window = 0

    class CloseStepWindow(Callback):  # last callback: closes after the monitor's on_train_batch_end
        def on_train_batch_end(self, *args: Any) -> None:
            step_counts.append(counter.window)

    class CountFinalize(Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            tracker = monitor.recorder.tracker
            assert tracker is not None
            tracker.finalize = counter.measure(tracker.finalize)  # type: ignore[method-assign]

        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            assert monitor.recorder.tracker is not None
            fsdp1 = [m for m in trainer.strategy.model.modules() if hasattr(m, "sharding_strategy")]
            info = {
                "fsdp1_shard_group_size": fsdp1[0].process_group.size() if fsdp1 else None,
                "collectives_per_finalize": counter.per_call,
                "collectives_per_logged_step": step_counts,
                "reduction": type(monitor.recorder.tracker.reduction).__name__,
                "latest_layers": monitor.recorder.latest.layers if monitor.recorder.latest is not None else None,
            }
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(info))

    if mode == "single":
        strategy: Any = "auto"
    elif mode.startswith("fsdp2") or mode == "hsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif mode == "tp":
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world)
    else:
        strategy = _fsdp1_strategy(
            use_orig_params=mode != "fsdp1_flat", hybrid=mode == "hsdp1", no_shard=mode == "fsdp1_noshard"
        )
    # The diagnosis runs in every mode: under flat FSDP1 its init-scale profile must skip the `module.weight`
    # views into freed flat parameters (reading them segfaulted).
    monitor = GradientFlowMonitor(log_every_n_steps=1, save_dir=Path(out_dir) / "history")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[OpenStepWindow(), monitor, CountFinalize(), CloseStepWindow()],
    )
    trainer.fit(_module_class()(mode))


# ---------------------------------------------------------------------------- the reduction on its own
def reduction_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Reduce hand-made DTensors on a 2 x 2 (replicate x shard) mesh and on mixed meshes; write results."""
    init_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from gradlight.sharding import ShardedReduction
    from gradlight.stats import Statistic, StatisticSet, foreach_norms, local_tensor

    counter = CollectiveCounter()
    # Declared in an order that differs from the stacked layout (sums first): rows are read back by name.
    statistics = StatisticSet(Statistic("max", "max"), Statistic("sq", "sum"), Statistic("numel", "sum"))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=generator) for shape in [(5, 3), (1, 4), (3,), (6, 2), (2, 3), (4,)]]
    cases = {
        # HSDP: one mesh, one sharding dimension -> gathered over the shard group only
        "hsdp": [
            distribute_tensor(full[0], mesh, [Replicate(), Shard(0)]),
            distribute_tensor(full[1], mesh, [Replicate(), Shard(0)]),  # shards [1, 0] along "shard"
            distribute_tensor(full[2], mesh, [Replicate(), Replicate()]),
            full[3],  # a plain (unsharded, replicated) tensor
        ],
        # several meshes and sharding dimensions -> gathered over the world
        "mixed": [
            distribute_tensor(full[0], mesh, [Shard(0), Shard(1)]),
            distribute_tensor(full[1], mesh["shard"], [Shard(1)]),  # a sub-mesh, replicated across copies
            distribute_tensor(full[4], mesh, [Shard(1), Replicate()]),
            distribute_tensor(full[5], mesh["replicate"], [Replicate()]),
            full[3],
        ],
    }
    results: dict[str, Any] = {}
    for name, tensors in cases.items():
        reduction = ShardedReduction()
        locals_ = [local_tensor(t) for t in tensors]
        table = statistics.stack(
            {
                "max": torch.stack([t.abs().max() if t.numel() else torch.tensor(0.0) for t in locals_]),
                "sq": foreach_norms(locals_, 2.0).square(),
                "numel": torch.tensor([t.numel() for t in locals_]).float(),
            }
        )
        reduced = table.across_ranks(counter.measure(reduction), tensors)
        plan = next(iter(reduction._plans.values()))
        results[name] = {
            "group_size": plan.group_size,
            "sq": reduced["sq"].tolist(),
            "numel": reduced["numel"].tolist(),
            "max": reduced["max"].tolist(),
            "collectives": counter.per_call,
        }
    results["expected"] = {
        name: {
            "sq": [float(full_of(t).square().sum()) for t in tensors],
            "numel": [float(full_of(t).numel()) for t in tensors],
            "max": [float(full_of(t).abs().max()) for t in tensors],
        }
        for name, tensors in cases.items()
    }
    Path(out_dir, f"reduction{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def full_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
