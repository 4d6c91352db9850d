"""What gradlight costs under FSDP2, against per-parameter ``full_tensor()``, side by side in one run.

    python benchmarks/fsdp_overhead.py                       # 2 processes, gloo, CPU, 1 thread each
    python benchmarks/fsdp_overhead.py --blocks 4 --rounds 5 # quicker, noisier

Two processes shard a stack of MLP blocks (LayerNorm, Linear, GELU, Linear) with ``fully_shard`` on a 1-D
CPU mesh, run one forward/backward, and then time, interleaved round by round so that drift hits every
method equally, what each method adds to a logged step on the same gradients:

- ``gradlight``: ``GradientFlowTracker.capture`` + ``finalize`` with :class:`gradlight.sharding.ShardedReduction`
  (per-tensor local norms, one all-gather, per-layer reduction, one host copy; includes the parameter copy
  for ``update_ratio``), exactly what ``GradientFlowMonitor`` runs on a logged step;
- ``gradlight_no_update``: the same with ``track_update_ratio=False`` (no parameter copy);
- ``full_tensor_grad``: per parameter ``g = p.grad.full_tensor()``, then ``g.norm()`` and ``g.abs().max()``
  read with ``.item()`` (one collective per parameter; no ``param_l2``);
- ``full_tensor_both``: the same statistics as gradlight's: also ``p.full_tensor().norm()`` (two
  collectives per parameter).

Prints the median time per logged step (rank 0, after a barrier) and each method's ratio to gradlight.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from torch import nn

METHODS = ("gradlight", "gradlight_no_update", "full_tensor_grad", "full_tensor_both")


def make_model(blocks: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        )
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def per_parameter_full_tensor(model: nn.Module, with_params: bool) -> dict[str, list[float]]:
    """The obvious exact way: gather every gradient (and parameter) whole, then reduce on the host."""
    stats: dict[str, list[float]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.full_tensor()  # type: ignore[attr-defined]
        values = [grad.norm().item(), grad.abs().max().item()]
        if with_params:
            values.append(param.detach().full_tensor().norm().item())  # type: ignore[attr-defined]
        stats[name] = values
    return stats


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradlight import GradientFlowTracker
    from gradlight.sharding import ShardedReduction

    mesh = init_device_mesh("cpu", (world,))
    model = make_model(args.blocks, args.width)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()

    reduction = ShardedReduction()
    reduce_times: list[float] = []

    def timed_reduction(*call: Any) -> Any:
        start = time.perf_counter()
        out = reduction(*call)
        reduce_times.append(time.perf_counter() - start)
        return out

    tracker = GradientFlowTracker(model, reduction=timed_reduction)
    light = GradientFlowTracker(model, reduction=ShardedReduction(), track_update_ratio=False)
    params = list(model.parameters())

    def run_gradlight(which: GradientFlowTracker) -> Any:
        which.capture(0, params)
        return which.finalize()

    runs = {
        "gradlight": lambda: run_gradlight(tracker),
        "gradlight_no_update": lambda: run_gradlight(light),
        "full_tensor_grad": lambda: per_parameter_full_tensor(model, with_params=False),
        "full_tensor_both": lambda: per_parameter_full_tensor(model, with_params=True),
    }
    for fn in runs.values():  # warm up (plans, caches, first collectives)
        fn()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name in METHODS:
            dist.barrier()
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    collectives_before = reduction.collectives
    run_gradlight(tracker)
    if rank == 0:
        tensors = sum(1 for p in params if p.grad is not None)
        numel = sum(p.numel() for p in params)
        print(
            f"FSDP2 on {world} CPU processes (gloo, 1 thread each): {args.blocks} blocks, width {args.width}, "
            f"{tensors} parameter tensors, {numel / 1e6:.2f}M parameters, {args.rounds} rounds"
        )
        print(
            f"gradlight collectives per logged step: {reduction.collectives - collectives_before}; "
            f"median time in the reduction (all-gather + local sum/max): "
            f"{statistics.median(reduce_times) * 1e3:.2f} ms"
        )
        base = statistics.median(times["gradlight"])
        print(f"{'method':<18}{'median ms':>11}{'x gradlight':>13}")
        for name in METHODS:
            median = statistics.median(times[name])
            print(f"{name:<18}{median * 1e3:>11.2f}{median / base:>13.1f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="MLP blocks (6 parameter tensors each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    methods = torch.multiprocessing.get_all_start_methods()
    torch.multiprocessing.start_processes(
        worker,
        args=(args.world, port, args),
        nprocs=args.world,
        join=True,
        start_method="fork" if "fork" in methods else "spawn",
    )


if __name__ == "__main__":
    main()
