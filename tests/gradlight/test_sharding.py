"""gradlight across ranks: DDP with no collective, sharded training exact with one collective (CPU, gloo).

Multi-process runs use top-level workers from ``_dist_workers`` started by ``torch.multiprocessing``
(never ``strategy="ddp"`` inside pytest), each writing its results to files compared here.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.fabric.strategies import FSDPStrategy as FabricFSDPStrategy
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from gradlight import GLOBAL_LAYER, GradientFlowMonitor, load_history, read_run_info
from gradlight.sharding import (
    SHARDING_MODES,
    ShardedReduction,
    contributes,
    replication_factor,
    resolve_reduction,
)
from gradlight.stats import LocalReduction
from tests.gradlight import _dist_workers as workers
from tests.gradlight._ddp_diag_workers import QUIET
from tests.gradlight.models import Net

COMPARED = ("grad_l2", "grad_max_abs", "param_l2", "update_ratio")
RTOL = 1e-5


# ----------------------------------------------------------------------------------- weighting logic
@pytest.mark.parametrize(
    ("shape", "placements", "factor"),
    [
        ((4,), (Shard(0),), 1),
        ((4,), (Replicate(),), 4),
        ((2, 4), (Replicate(), Shard(0)), 2),  # HSDP: reduce over the shard dimension only
        ((2, 4), (Shard(0), Shard(1)), 1),
        ((2, 3), (Replicate(), Replicate()), 6),
        ((2, 2), (_StridedShard(0, split_factor=2), Shard(0)), 1),  # FSDP2 + TP
    ],
)
def test_replication_factor(shape: tuple[int, ...], placements: Sequence[Any], factor: int) -> None:
    assert replication_factor(shape, placements) == factor


def test_exactly_one_replica_of_each_shard_contributes() -> None:
    placements = (Replicate(), Shard(0))
    mesh = [(r, s) for r in range(2) for s in range(4)]
    counted = [s for r, s in mesh if contributes([r, s], placements)]
    assert sorted(counted) == [0, 1, 2, 3]  # every shard once, whatever the replication
    assert contributes([0, 0, 0], (Shard(0), Replicate(), _StridedShard(1, split_factor=2)))
    assert not contributes([0, 1, 0], (Shard(0), Replicate(), Shard(1)))
    assert not contributes(None, (Shard(0),))  # a rank outside the mesh holds nothing


def test_partial_placements_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="Partial"):
        contributes([0], (Partial(),))
    with pytest.raises(ValueError, match="Partial"):
        replication_factor((2,), (Partial(),))


def test_without_a_process_group_the_reduction_changes_nothing() -> None:
    sums, maxima = torch.tensor([[1.0, 4.0], [2.0, 3.0]]), torch.tensor([[1.0, float("-inf")]])
    out_sums, out_max = ShardedReduction()(sums, maxima, [torch.zeros(2), torch.zeros(3)])
    assert torch.equal(out_sums, sums) and torch.equal(out_max, maxima)


# ---------------------------------------------------------------------------------- strategy -> mode
def deepspeed_strategy(stage: int) -> DeepSpeedStrategy:
    """Lightning's own ``DeepSpeedStrategy`` with a ZeRO config, built without ``__init__`` (which needs the
    ``deepspeed`` package, not installed here): detection reads the class and ``config`` only."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


def test_modes_are_detected_from_the_strategy() -> None:
    assert isinstance(resolve_reduction(SingleDeviceStrategy("cpu")), LocalReduction)
    assert isinstance(resolve_reduction(DDPStrategy()), LocalReduction)
    assert isinstance(resolve_reduction(FSDPStrategy()), ShardedReduction)
    assert isinstance(resolve_reduction(ModelParallelStrategy()), ShardedReduction)
    assert isinstance(resolve_reduction(DDPStrategy(), "fsdp2"), ShardedReduction)
    assert isinstance(resolve_reduction(FSDPStrategy(), "none"), LocalReduction)
    custom = LocalReduction()
    assert resolve_reduction(FSDPStrategy(), custom) is custom
    assert set(SHARDING_MODES) >= {"auto", "none", "fsdp1", "fsdp2", "deepspeed"}


def test_detection_goes_by_the_strategy_classes_not_by_names() -> None:
    class CPUFSDPStrategy(FSDPStrategy):  # a subclass (like the test workers' CPU shim) is still FSDP1
        pass

    class FSDPStatsLogger:  # a name that merely contains "FSDP" is not a strategy
        pass

    assert isinstance(resolve_reduction(CPUFSDPStrategy()), ShardedReduction)
    assert isinstance(resolve_reduction(FabricFSDPStrategy()), ShardedReduction)  # Fabric's own class
    assert isinstance(resolve_reduction(FSDPStatsLogger()), LocalReduction)


def test_deepspeed_zero2_says_once_what_is_missing() -> None:
    with pytest.warns(UserWarning, match="ZeRO stage 3"):
        reduction = resolve_reduction(deepspeed_strategy(stage=3))
    assert isinstance(reduction, LocalReduction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stage 0/1 hold whole gradients on every rank: exact like DDP, silent
        assert isinstance(resolve_reduction(deepspeed_strategy(stage=1)), LocalReduction)


def test_unknown_modes_are_rejected_by_monitor_and_resolver() -> None:
    with pytest.raises(ValueError, match="fsdp2"):
        GradientFlowMonitor(sharding="zero3")
    with pytest.raises(ValueError, match="sharding"):
        resolve_reduction(DDPStrategy(), "zero3")


# ------------------------------------------------------------------- DDP: whole gradients, no collective
class DumpLatest(L.Callback):
    """Writes what each rank's monitor computed last, since ddp_spawn does not return callback state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, GradientFlowMonitor))
        record = monitor.recorder.latest
        assert record is not None
        payload = {"step": record.step, "grad_l2": record.metrics["grad_l2"].tolist()}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


class OpenStepWindow(L.Callback):
    """First callback: counts the collectives of each optimizer step from its hook on (backward is over)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from tests._distributed import CollectiveCounter

        self.counter = CollectiveCounter()  # wraps torch.distributed in this (spawned) process

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.counter.window = 0


class CloseStepWindow(L.Callback):
    """Last callback: after the monitor's ``on_train_batch_end``, writes each step's count at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        opener = next(c for c in trainer.callbacks if isinstance(c, OpenStepWindow))
        self.counts.append(opener.counter.window)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.folder / f"collectives{trainer.global_rank}.json").write_text(json.dumps(self.counts))


@pytest.mark.slow
def test_two_process_ddp_history_equals_single_process(tmp_path: Path) -> None:
    per_rank_batch = 8
    single = tmp_path / "single"
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=4, callbacks=[GradientFlowMonitor(1, single)]).fit(
        Net("mlp", batch_size=2 * per_rank_batch)
    )
    ddp = tmp_path / "ddp"
    trainer: Any = L.Trainer(
        **QUIET,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        max_steps=4,
        callbacks=[OpenStepWindow(), GradientFlowMonitor(1, ddp), DumpLatest(tmp_path), CloseStepWindow(tmp_path)],
    )
    trainer.fit(Net("mlp", batch_size=per_rank_batch))

    expected, recorded = load_history(single), load_history(ddp)
    assert len(list((ddp / "history").glob("segment-*.arrow"))) == 1, "only rank zero writes"
    key = ["step", "layer", "metric"]
    merged = expected.merge(recorded, on=key, suffixes=("_single", "_ddp"))
    assert len(merged) == len(expected) == len(recorded)
    for metric in ("grad_l2", "grad_max_abs", "param_l2", "update_ratio", "global_grad_l2"):
        rows = merged[merged.metric == metric]
        np.testing.assert_allclose(rows.value_ddp, rows.value_single, rtol=1e-5, err_msg=metric)

    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1, "every rank computes the same statistics"
    for rank in (0, 1):  # DDP gradients are already averaged: none for them, one for the global-batch loss
        assert json.loads((tmp_path / f"collectives{rank}.json").read_text()) == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------- multi-process
def _per_layer(history_dir: Path) -> pd.DataFrame:
    frame = load_history(history_dir)
    return frame.pivot_table(index=["step", "layer"], columns="metric", values="value")


def _run(mode: str, out: Path, world: int = 2) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    workers.spawn(workers.train_worker, 1 if mode == "single" else world, mode, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(1 if mode == "single" else world)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("single")
    _run("single", out)
    return _per_layer(out / "history")


def _assert_matches(sharded: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert list(sharded.index) == list(reference.index)  # same steps, same (unsharded) layer names
    steps = sorted({step for step, _ in reference.index})
    assert steps == list(range(workers.STEPS))
    for metric in (*COMPARED, "global_grad_l2", "loss"):  # the loss row: the global-batch loss on every strategy
        got, want = sharded[metric].dropna(), reference[metric].dropna()
        assert list(got.index) == list(want.index), metric
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=RTOL, err_msg=metric)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "world"),
    [
        ("fsdp2", 2),  # ModelParallelStrategy + fully_shard: DTensor grads, uneven and empty shards
        ("fsdp2_partial", 2),  # only net.0 sharded: DTensors and plain tensors mixed
        ("hsdp2", 4),  # fully_shard on a (replicate, shard) mesh: gathered over the shard dimension
        ("tp", 2),  # tensor parallel: Shard(0), uneven Shard(1), Replicate bias, plain LayerNorm
        ("fsdp1", 2),  # 1-D slices, some empty (grad None on that rank)
        ("hsdp1", 4),  # FSDP1 HYBRID_SHARD, shard groups of 2
        ("fsdp1_noshard", 2),  # FSDP1 NO_SHARD: whole tensors everywhere, so no collective at all
    ],
)
def test_sharded_run_equals_one_process_with_one_collective(
    mode: str, world: int, reference: pd.DataFrame, tmp_path: Path
) -> None:
    ranks = _run(mode, tmp_path, world)
    _assert_matches(_per_layer(tmp_path / "history"), reference)
    for info in ranks:
        assert info["reduction"] == "ShardedReduction"
        expected = 0 if mode == "fsdp1_noshard" else 1  # one collective per logged step, if sharded
        assert info["collectives_per_finalize"] == [expected] * workers.STEPS
        # ...and the whole logged step (optimizer step, finalize, diagnosis, writing) issues one other: the
        # 2-element all-reduce that makes the `loss` row the global-batch loss
        assert info["collectives_per_logged_step"] == [expected + 1] * workers.STEPS
        assert info["latest_layers"] == ["net.0", "net.2", "net.3", "net.5"]  # same, unsharded names
    if mode == "hsdp1":
        assert ranks[0]["fsdp1_shard_group_size"] == 2
    run_info = read_run_info(tmp_path / "history")  # DTensors, FSDP1's original parameters: held by the optimizer
    assert run_info is not None and run_info.update_ratio_methods == {"0": "optimizer: SGD (for-loop)"}, mode


@pytest.mark.slow
def test_fsdp1_flat_parameters_fall_back_to_exact_per_unit_statistics(reference: pd.DataFrame, tmp_path: Path) -> None:
    ranks = _run("fsdp1_flat", tmp_path)
    sharded = _per_layer(tmp_path / "history")
    layers = sorted({layer for _, layer in sharded.index} - {GLOBAL_LAYER})
    assert layers == ["(root)", "net.0", "net.3", "net.5"]  # the root unit holds the LayerNorm (net.2)
    units = [(step, layer) for step, layer in reference.index if layer in ("net.0", "net.3", "net.5")]
    for metric in COMPARED:  # each Linear is one wrapped unit: its statistics are the layer's
        np.testing.assert_allclose(
            sharded.loc[units, metric].to_numpy(), reference.loc[units, metric].to_numpy(), rtol=RTOL
        )
    assert all(info["collectives_per_finalize"] == [1] * workers.STEPS for info in ranks)
    # the tracker reads the flat parameters the optimizer holds: the update is reconstructed, no copy
    run_info = read_run_info(tmp_path / "history")
    assert run_info is not None and run_info.update_ratio_methods == {"0": "optimizer: SGD (for-loop)"}


@pytest.mark.slow
def test_nonfinite_counts_are_global_under_fsdp2(tmp_path: Path) -> None:
    ranks = _run("fsdp2_nan", tmp_path)
    frame = load_history(tmp_path / "history", metrics=["grad_nonfinite"])
    last = frame[(frame.step == workers.STEPS - 1)].set_index("layer")["value"]
    assert last["net.0"] == 2.0  # one NaN in each rank's shard, counted once each
    assert last.drop(["net.0", GLOBAL_LAYER], errors="ignore").eq(0).all()
    # The rare non-finite path costs one more collective, on that step only.
    assert ranks[0]["collectives_per_finalize"] == [1] * (workers.STEPS - 1) + [2]


@pytest.mark.slow
def test_hybrid_and_mixed_meshes_reduce_exactly_on_four_ranks(tmp_path: Path) -> None:
    workers.spawn(workers.reduction_worker, 4, str(tmp_path))
    results = [json.loads((tmp_path / f"reduction{r}.json").read_text()) for r in range(4)]
    for name in ("hsdp", "mixed"):
        expected = results[0]["expected"][name]
        for result in results:
            got = result[name]
            assert got == results[0][name]  # bit-identical on every rank
            np.testing.assert_allclose(got["sq"], expected["sq"], rtol=RTOL)
            assert got["numel"] == expected["numel"]  # each element counted exactly once
            assert got["max"] == expected["max"]
            assert got["collectives"] == [1]
    assert results[0]["hsdp"]["group_size"] == 2  # HSDP gathers over the shard dimension only
    assert results[0]["mixed"]["group_size"] == 4  # several meshes: the world
