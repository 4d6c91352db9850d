"""Backward-signal taps against independent references computed with ``torch.autograd.grad``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradlight.signal import BackwardSignalTaps, SignalStats, all_gather_reduction
from tests.gradlight._ddp_diag_workers import init_env, spawn

WIDTH = 16


def block_mlp(depth: int = 8, bn: bool = False, act: type[nn.Module] = nn.Sigmoid, seed: int = 0) -> nn.Sequential:
    """``depth - 1`` blocks ``Linear -> [BatchNorm] -> act`` and a final ``Linear``; children are the blocks."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    size = 8
    for _ in range(depth - 1):
        parts: list[nn.Module] = [nn.Linear(size, WIDTH)]
        if bn:
            parts.append(nn.BatchNorm1d(WIDTH))
        parts.append(act())
        blocks.append(nn.Sequential(*parts))
        size = WIDTH
    blocks.append(nn.Sequential(nn.Linear(size, 1)))
    return nn.Sequential(*blocks)


def batch(rows: int = 64, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=generator)
    return x, x.sum(1, keepdim=True)


def reference_signals(net: nn.Sequential, x: Tensor, y: Tensor) -> list[Tensor]:
    """dL/d(output of each child of ``net``), by running the children by hand and ``torch.autograd.grad``."""
    outputs = []
    h = x
    for child in net:
        h = child(h)
        outputs.append(h)
    loss = F.mse_loss(h, y)
    return list(torch.autograd.grad(loss, outputs))


def tapped_step(net: nn.Module, x: Tensor, y: Tensor, **kwargs: object) -> SignalStats:
    taps = BackwardSignalTaps(net, **kwargs)  # type: ignore[arg-type]
    taps.start()
    F.mse_loss(net(x), y).backward()
    taps.stop()
    stats = taps.finalize(step=0)
    assert stats is not None
    return stats


# -------------------------------------------------------------------------------- against references
def test_sigmoid_mlp_signals_and_gains_equal_autograd_reference() -> None:
    net = block_mlp()
    x, y = batch()
    grads = reference_signals(net, x, y)
    net.zero_grad()
    stats = tapped_step(net, x, y, group_by=1)  # layers "0" .. "7": the blocks
    assert stats.blocks == [str(i) for i in range(8)]
    norms = np.array([g.norm().item() for g in grads])
    np.testing.assert_allclose(stats.metrics["signal_l2"], norms, rtol=1e-5)
    np.testing.assert_allclose(stats.metrics["signal_max_abs"], [g.abs().max().item() for g in grads], rtol=1e-5)
    assert stats.metrics["signal_nonfinite"].tolist() == [0.0] * 8
    assert stats.metrics["signal_elements"].tolist() == [64.0 * WIDTH] * 7 + [64.0]
    # Each block's input is the previous block's output: gain = log10(|g_{b-1}| / |g_b|); the first block's
    # input (the data) requires no gradient, so it has no input signal.
    assert math.isnan(stats.gain_decades[0]) and math.isnan(stats.metrics["signal_in_l2"][0])
    np.testing.assert_allclose(stats.gain_decades[1:], np.log10(norms[:-1] / norms[1:]), atol=1e-5)
    np.testing.assert_allclose(stats.metrics["signal_in_l2"][1:], norms[:-1], rtol=1e-5)
    assert stats.calls.tolist() == [1] * 8 and stats.shared == []
    # "The signal loses d decades between block 1 and block 5": the sum of their gains, read off directly.
    assert stats.path_decades("1", "5") == pytest.approx(math.log10(norms[0] / norms[5]), abs=1e-5)
    assert stats.path_decades("1", "5") == pytest.approx(stats.gain_decades[1:6].sum(), abs=1e-5)
    worst = stats.attenuating(below=-0.5)
    assert [block for block, _ in worst] == sorted(
        [str(b) for b in range(1, 8) if stats.gain_decades[b] < -0.5], key=lambda b: stats.value("signal_gain", b)
    )
    assert len(worst) >= 6  # every sigmoid block
    with pytest.raises(ValueError, match="`first` '5' runs after `last` '1'"):
        stats.path_decades("5", "1")
    with pytest.raises(ValueError, match="'x' is not a tapped block"):
        stats.path_decades("x", "1")


def test_sigmoid_gains_sit_at_the_analytic_bound() -> None:
    net = block_mlp()
    x, y = batch()
    stats = tapped_step(net, x, y, blocks=["*.*"])  # every Linear and every Sigmoid separately
    names = stats.blocks
    assert names[:3] == ["0.0", "0.1", "1.0"]
    gains = dict(zip(names, stats.gain_decades))
    sigmoid = np.array([gains[f"{i}.1"] for i in range(1, 7)])
    # dL/dz = sigmoid'(z) * dL/ds with sigmoid' <= 1/4: at most -0.60 decades, and near it at initialisation.
    assert (sigmoid <= math.log10(0.25)).all() and (sigmoid > math.log10(0.2)).all()
    for i in range(1, 8):  # a Linear passes at most its largest singular value
        spectral = torch.linalg.matrix_norm(net[i][0].weight.detach(), ord=2).item()
        assert gains[f"{i}.0"] <= math.log10(spectral) + 1e-6
    # The whole block (Linear + Sigmoid) is the sum of its two gains: gains add up along a chain.
    whole = tapped_step(block_mlp(), x, y, group_by=1).gain_decades
    np.testing.assert_allclose(whole[1:7], [gains[f"{i}.0"] + gains[f"{i}.1"] for i in range(1, 7)], atol=1e-5)
    assert (whole[1:7] < math.log10(0.25 * 1.0)).all()  # default init: |W| < 1 here, so below the sigmoid bound


def test_batchnorm_moves_the_gains_towards_zero_decades() -> None:
    x, y = batch()
    plain = tapped_step(block_mlp(bn=False), x, y, group_by=1).gain_decades[1:7]
    normed = tapped_step(block_mlp(bn=True), x, y, group_by=1).gain_decades[1:7]
    assert plain.mean() < -0.7  # sigmoid (<= 1/4) after a default-initialised Linear
    assert np.abs(normed).mean() < 0.5 * np.abs(plain).mean()
    assert (normed > plain).all()


class TwiceShared(nn.Module):
    """``shared`` is called twice per forward, with a tanh between the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, WIDTH)
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))


def test_a_block_called_twice_is_summed_and_marked_over_accumulated_micro_batches() -> None:
    torch.manual_seed(0)
    net = TwiceShared()
    micro = [batch(32, seed) for seed in (1, 2)]
    # Reference: the same computation written out, gradients of both calls' outputs of both micro-batches.
    squares = {"inp": 0.0, "shared": 0.0, "out": 0.0}
    in_squares = {"shared": 0.0, "out": 0.0}
    largest = 0.0
    for x, y in micro:
        a = net.inp(x)
        t1 = torch.tanh(a)
        h1 = net.shared(t1)
        t2 = torch.tanh(h1)
        h2 = net.shared(t2)
        o = net.out(h2)
        loss = F.mse_loss(o, y) / 2  # the mean over 2 micro-batches
        ga, gt1, g1, gt2, g2, go = torch.autograd.grad(loss, [a, t1, h1, t2, h2, o])
        squares["inp"] += ga.square().sum().item()
        in_squares["shared"] += gt1.square().sum().item() + gt2.square().sum().item()
        in_squares["out"] += g2.square().sum().item()
        squares["shared"] += g1.square().sum().item() + g2.square().sum().item()
        squares["out"] += go.square().sum().item()
        largest = max(largest, g1.abs().max().item(), g2.abs().max().item())
    taps = BackwardSignalTaps(net)  # group_by=None: one block per parameter-owning module
    taps.start()
    for x, y in micro:
        taps.start()  # idempotent, as the monitor calls it on every micro-batch
        (F.mse_loss(net(x), y) / 2).backward()
    taps.stop()
    stats = taps.finalize(step=3)
    assert stats is not None and stats.step == 3
    assert stats.blocks == ["inp", "shared", "out"]
    assert stats.calls.tolist() == [1, 2, 1] and stats.shared == ["shared"]
    for name, total in squares.items():
        assert stats.value("signal_l2", name) == pytest.approx(math.sqrt(total), rel=1e-5)
    assert stats.value("signal_max_abs", "shared") == pytest.approx(largest, rel=1e-5)
    assert stats.value("signal_elements", "shared") == 2 * 2 * 32 * WIDTH
    for name, total in in_squares.items():  # `out` reads the second call's output: one hook, no double count
        assert stats.value("signal_in_l2", name) == pytest.approx(math.sqrt(total), rel=1e-5)
    expected_gain = 0.5 * math.log10(in_squares["shared"] / squares["shared"])
    assert stats.value("signal_gain", "shared") == pytest.approx(expected_gain, abs=1e-5)


def test_no_hook_is_left_between_logged_steps() -> None:
    net = block_mlp(4)
    x, y = batch()

    def hook_counts() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules())

    before = hook_counts()
    taps = BackwardSignalTaps(net, blocks=["*", "*.*"])
    taps.start()
    assert taps.active and hook_counts() == before + 2 * len(taps.block_names)
    out = net(x)
    taps.stop()  # stopped before the backward: tensor hooks are removed too
    assert not taps.active and hook_counts() == before
    F.mse_loss(out, y).backward()
    assert not taps.pending
    F.mse_loss(net(x), y).backward()  # an unlogged step
    assert not taps.pending
    stats = taps.finalize(step=0)
    assert stats is not None and stats.metrics["signal_l2"].tolist() == [0.0] * len(stats.blocks)  # nothing read
    # A logged step after unlogged ones reads fresh values only.
    taps.start()
    F.mse_loss(net(x), y).backward()
    taps.stop()
    again = taps.finalize(step=1)
    assert again is not None and np.isfinite(again.metrics["signal_l2"]).all()


def test_amp_scale_and_data_parallel_size_divide_the_norms_not_the_gains() -> None:
    net = block_mlp(4)
    x, y = batch()
    plain = tapped_step(net, x, y, group_by=1)
    taps = BackwardSignalTaps(net, group_by=1)
    taps.start()
    (F.mse_loss(net(x), y) * 1024.0).backward()
    taps.stop()
    scaled = taps.finalize(step=0, grad_scale=1024.0)
    assert scaled is not None
    np.testing.assert_allclose(scaled.metrics["signal_l2"], plain.metrics["signal_l2"], rtol=1e-6)
    np.testing.assert_allclose(scaled.gain_decades[1:], plain.gain_decades[1:], atol=1e-6)


def test_invalid_arguments_name_the_argument_and_what_is_valid() -> None:
    net = block_mlp(3)
    with pytest.raises(ValueError, match=r"`blocks` entry 'nothing\.\*' matches no module"):
        BackwardSignalTaps(net, blocks=["nothing.*"])
    with pytest.raises(ValueError, match="`blocks` must be None"):
        BackwardSignalTaps(net, blocks=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`group_by` must be"):
        BackwardSignalTaps(net, group_by=0)
    taps = BackwardSignalTaps(net, group_by=1)
    with pytest.raises(ValueError, match=r"`grad_scale` must be a positive finite number, got 0\.0"):
        taps.finalize(0, grad_scale=0.0)
    with pytest.raises(ValueError, match="`data_parallel_size` must be a positive int, got 0"):
        taps.finalize(0, data_parallel_size=0)


def test_nonfinite_gradient_elements_are_counted() -> None:
    net = block_mlp(3)
    x, y = batch(16)
    y[3, 0] = float("nan")  # one sample's target: its gradient is NaN from the output back to the input
    stats = tapped_step(net, x, y, group_by=1)
    assert stats.metrics["signal_nonfinite"].tolist() == [WIDTH, WIDTH, 1.0]  # that sample's row, per block
    assert np.isnan(stats.metrics["signal_max_abs"]).all() and np.isnan(stats.metrics["signal_l2"]).all()


# ------------------------------------------------------------------------------------------------- DDP
def data_parallel_signal_worker(rank: int, world: int, port: int, folder: str, strategy: str) -> None:
    """Each rank backpropagates the mean loss of its half of the global batch through DDP or FSDP2."""
    init_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = block_mlp(6)
        model: nn.Module = net
        if strategy == "ddp":
            model = nn.parallel.DistributedDataParallel(net)
        else:  # FSDP2: every block and the root sharded; activations are not
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for child in net:
                fully_shard(child, mesh=mesh)
            fully_shard(net, mesh=mesh)
        x, y = batch(64)
        taps = BackwardSignalTaps(net, group_by=1)  # the wrapped module's names
        taps.start()
        F.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        taps.stop()
        stats = taps.finalize(0, all_gather_reduction(), data_parallel_size=world)
        assert stats is not None
        payload: dict[str, object] = {key: np.nan_to_num(v, nan=-1.0).tolist() for key, v in stats.metrics.items()}
        payload["blocks"] = stats.blocks
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(payload))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_signals_equal_the_single_process_global_batch(tmp_path: Path, strategy: str) -> None:
    spawn(data_parallel_signal_worker, 2, str(tmp_path), strategy)
    single = tapped_step(block_mlp(6), *batch(64), group_by=1)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # bit-identical on every rank
    result = ranks[0]
    assert result["blocks"] == single.blocks
    for metric in ("signal_l2", "signal_max_abs", "signal_in_l2"):
        expected = np.nan_to_num(single.metrics[metric], nan=-1.0)
        np.testing.assert_allclose(result[metric], expected, rtol=1e-5, err_msg=metric)
    np.testing.assert_allclose(result["signal_gain"], np.nan_to_num(single.gain_decades, nan=-1.0), atol=1e-5)
    assert result["signal_elements"] == single.metrics["signal_elements"].tolist()


def test_parameter_free_blocks_take_the_depth_of_the_block_before_them() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, WIDTH), nn.Sigmoid(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))
    x, y = batch()
    taps = BackwardSignalTaps(net, blocks=["*"])
    assert BackwardSignalTaps(net).block_names == ["0", "2", "4"]  # default: the parameter-owning layers
    taps.start()
    F.mse_loss(net(x), y).backward()
    taps.stop()
    stats = taps.finalize(0, depth_of={"0": 0, "2": 1, "4": 2})
    assert stats is not None and stats.blocks == ["0", "1", "2", "3", "4"]
    assert stats.depths.tolist() == [0, 0, 1, 1, 2]


class Checkpointed(nn.Module):
    """``inner`` under activation checkpointing: recomputed during backward."""

    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        out = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)
        assert isinstance(out, Tensor)
        return out


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_changes_neither_signals_nor_calls(reentrant: bool) -> None:
    x, y = batch()
    reference = reference_signals(block_mlp(), x, y)
    net = block_mlp()
    for i in (2, 3):
        net[i] = Checkpointed(net[i], reentrant)
    stats = tapped_step(net, x, y, blocks=["*", "*.inner.*"])
    for i, grad in enumerate(reference):
        assert stats.value("signal_l2", str(i)) == pytest.approx(grad.norm().item(), rel=1e-5)
    # Inside the checkpointed blocks: the Linear's output feeds the Sigmoid, whose output is the block's.
    assert stats.value("signal_l2", "3.inner.1") == pytest.approx(reference[3].norm().item(), rel=1e-5)
    assert stats.calls.tolist() == [1] * len(stats.blocks)  # recomputation is not a second call


class SignalCallback(L.Callback):
    """The monitor's pattern: taps on every micro-batch of a logged step, finalized before its optimizer step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.taps: BackwardSignalTaps | None = None
        self.stats: list[SignalStats] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self.taps is None:
            self.taps = BackwardSignalTaps(pl_module, group_by=2)  # "net.0" .. "net.7"
        if trainer.global_step % self.every == 0:
            self.taps.start()

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: object) -> None:
        assert self.taps is not None
        if self.taps.active:
            self.taps.stop()
            stats = self.taps.finalize(trainer.global_step)
            assert stats is not None
            self.stats.append(stats)


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = block_mlp(8)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_under_lightning_accumulated_micro_batches_add_up_and_unlogged_steps_are_untouched() -> None:
    x, y = batch(64)
    model = Net()
    start = copy.deepcopy(model.net)
    callback = SignalCallback(every=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, accumulate_grad_batches=2, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert [stats.step for stats in callback.stats] == [0, 2]  # step 1 was not logged
    # Step 0 is two micro-batches of 16 rows, each backpropagating loss / 2 (Lightning's accumulation).
    squares = np.zeros(8)
    for rows in (slice(0, 16), slice(16, 32)):
        grads = reference_signals(start, x[rows], y[rows])
        squares += np.array([(g / 2).square().sum().item() for g in grads])
    first = callback.stats[0]
    assert first.blocks == [f"net.{i}" for i in range(8)]
    np.testing.assert_allclose(first.metrics["signal_l2"], np.sqrt(squares), rtol=1e-5)
    assert first.metrics["signal_elements"].tolist() == [32.0 * WIDTH] * 7 + [32.0]
    assert callback.taps is not None and not callback.taps.active


def test_an_in_place_activation_after_a_block_does_not_change_its_signal() -> None:
    import torchvision  # installed with the detection extra (Ultralytics needs it)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    # torchvision's ResNet applies ReLU(inplace=True) to bn1's output; the reference keeps that output intact.
    z = model.bn1(model.conv1(x))
    features = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(torch.relu(z))))))
    (reference,) = torch.autograd.grad(model.fc(torch.flatten(model.avgpool(features), 1)).square().mean(), [z])
    taps = BackwardSignalTaps(model)  # one block per parameter-owning module: 41 of them
    taps.start()
    model(x).square().mean().backward()
    taps.stop()
    stats = taps.finalize(0)
    assert stats is not None and len(stats.blocks) == 41
    assert stats.value("signal_l2", "bn1") == pytest.approx(reference.norm().item(), rel=1e-5)
    assert np.isfinite(stats.metrics["signal_l2"]).all()


# ------------------------------------------------------------------------------------ from the monitor
def test_the_monitor_records_the_backward_signal_on_logged_steps_only(tmp_path: Path) -> None:
    import lightning as L

    from gradlight import GradientFlowMonitor, load_history
    from tests.gradlight._ddp_diag_workers import QUIET, Regressor, mlp

    torch.manual_seed(0)
    model = Regressor(mlp(6))
    monitor = GradientFlowMonitor(2, tmp_path, track_backward_signal=True, diagnose=False)
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=5, callbacks=[monitor]).fit(model)
    history = load_history(tmp_path)
    signal = history[history.metric == "signal_l2"]
    assert sorted(signal.step.unique()) == [0, 2, 4]  # logged steps only
    layers = set(history[history.metric == "grad_l2"].layer)
    assert set(signal.layer) == layers  # the blocks are the layers of the grouping: rows line up
    gains = history[(history.metric == "signal_gain") & (history.step == 0)].dropna()
    assert (gains.value < 0).all()  # a sigmoid stack attenuates the signal block by block
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_a_vanishing_finding_names_the_blocks_where_the_signal_is_lost(tmp_path: Path) -> None:
    from torch import nn

    from gradlight import GradientFlowMonitor, load_findings
    from tests.gradlight._ddp_diag_workers import QUIET, Regressor

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8 if i == 0 else 16, 16), nn.Sigmoid()) for i in range(10)]
    model = Regressor(nn.Sequential(*blocks, nn.Linear(16, 1)))
    monitor = GradientFlowMonitor(1, tmp_path, group_by=2, track_backward_signal=True)
    L.Trainer(**QUIET, accelerator="cpu", devices=1, max_steps=4, callbacks=[monitor]).fit(model)
    findings = load_findings(tmp_path)
    (row,) = findings[(findings.kind == "vanishing") & (findings.severity == "warning")].itertuples()
    path = row.evidence["signal_path"]
    assert path["first"] == "net.0" and path["path_decades"] < -3
    assert len(path["attenuating"]) >= 5 and all(gain < -0.5 for gain in path["attenuating"].values())
    assert all(block.startswith("net.") for block in path["attenuating"])
    assert "the backward signal loses" in row.message and "(sigmoid, no normalisation, no shortcut)" in row.message


# ---------------------------------------------------------------------------------------- under fp16 AMP
def _recorded_signal(scaler: torch.amp.GradScaler | None, save_dir: Path, steps: int = 3) -> np.ndarray:
    """``signal_l2`` per block and step of a plain loop, its loss scaled by ``scaler`` (unscaled before capture)."""
    from gradlight import GradientFlowRecorder, load_history

    net = block_mlp(4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    recorder = GradientFlowRecorder(
        net, save_dir, log_every_n_steps=1, grad_scaler=scaler, track_backward_signal=True, diagnose=False
    )
    x, y = batch(32)
    for step in range(steps):
        recorder.start_step(step)
        loss = F.mse_loss(net(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)  # the gradients are unscaled; the tapped signal is not
        recorder.capture(step, optimizer)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        recorder.end_step(loss)
        optimizer.zero_grad()
    recorder.close()
    history = load_history(save_dir)
    signal = history[history.metric == "signal_l2"].pivot(index="step", columns="layer", values="value")
    return signal.to_numpy()


def test_the_loss_scale_the_backward_ran_with_is_divided_out_of_the_signal(tmp_path: Path) -> None:
    # A power-of-two loss scale without autocast changes no rounding: the signal must equal the unscaled run's.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # grows after every step
    scaled = _recorded_signal(scaler, tmp_path / "scaled")
    plain = _recorded_signal(None, tmp_path / "plain")
    assert scaler.get_scale() == 2.0**13  # each step's backward ran with another scale
    np.testing.assert_allclose(scaled, plain, rtol=1e-6)


def test_an_invalid_backward_scale_is_refused_with_its_name(tmp_path: Path) -> None:
    from gradlight import GradientFlowRecorder

    net = block_mlp(2)
    recorder = GradientFlowRecorder(net, tmp_path, track_backward_signal=True)
    with pytest.raises(ValueError, match=r"`backward_scale` must be a positive finite number or None, got -1\.0"):
        recorder.capture(0, net.parameters(), backward_scale=-1.0)


@pytest.mark.parametrize("fused", [False, True])
def test_under_fp16_amp_the_monitor_records_the_unscaled_signal(tmp_path: Path, fused: bool) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    from gradlight import GradientFlowMonitor, load_history

    class AdamNet(Net):  # fused=True: the gradients still carry the scale in the hook (Lightning skips unscale_)
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused)

    def signal(save_dir: Path, plugins: list[MixedPrecision] | None) -> pd.Series:
        x, y = batch(64)
        monitor = GradientFlowMonitor(1, save_dir, track_backward_signal=True, diagnose=False)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, callbacks=[monitor], plugins=plugins, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        torch.manual_seed(0)
        trainer.fit(AdamNet(), DataLoader(TensorDataset(x, y), batch_size=16))
        history = load_history(save_dir)
        return history[(history.metric == "signal_l2") & (history.step == 0)].set_index("layer").value

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp = signal(tmp_path / "amp", [MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    full = signal(tmp_path / "fp32", None)
    np.testing.assert_allclose(amp.to_numpy(), full.loc[amp.index].to_numpy(), rtol=2e-2)  # fp16 autocast rounding
