"""Two CPU processes compute what one process computes on the global batch: BatchNorm and the YOLO loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from casestudies.detection import offline

offline.configure_offline()

from casestudies.detection.distributed import (  # noqa: E402
    CpuSyncBatchNorm,
    GlobalBatchLoss,
    GlobalBatchNorm2d,
    global_batch_loss,
)
from casestudies.detection.synthetic import generate_shapes_dataset  # noqa: E402
from tests._distributed import spawn  # noqa: E402
from tests.casestudies.detection import _distributed_worker as worker  # noqa: E402


def one_process_batchnorm() -> dict[str, torch.Tensor]:
    x, weights = worker.batchnorm_inputs()
    norm = nn.BatchNorm2d(6, **worker.BN)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
    x = x.clone().requires_grad_()
    out = norm(x)
    (out * weights).sum().backward()
    norm(x.detach() * 0.5)
    return {
        "out": out.detach(),
        "input_grad": x.grad,
        "weight_grad": norm.weight.grad,
        "bias_grad": norm.bias.grad,
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }


@pytest.mark.slow
def test_global_batchnorm_on_two_cpu_processes_is_the_one_process_batchnorm(tmp_path: Path) -> None:
    reference = one_process_batchnorm()
    spawn(worker.batchnorm_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"bn_global_rank{rank}.pt") for rank in range(2)]
    for key in ("out", "input_grad"):
        joined = torch.cat([rank[key] for rank in ranks])
        torch.testing.assert_close(joined, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("weight_grad", "bias_grad"):  # each rank's share; DDP adds them up (and averages W * loss)
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], reference[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in ("running_mean", "running_var"):  # the global batch's statistics on every rank
        for rank in ranks:
            torch.testing.assert_close(rank[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    plain = [torch.load(tmp_path / f"bn_plain_rank{rank}.pt") for rank in range(2)]  # per-rank statistics
    assert not torch.allclose(torch.cat([rank["out"] for rank in plain]), reference["out"], atol=1e-3)


def test_cpu_sync_batchnorm_swaps_every_batchnorm_and_back_keeping_its_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    model[1].train(False)
    tensors = [model[1].weight, model[1].running_var, model[2][0].bias]
    synced = CpuSyncBatchNorm().apply(model)
    assert [type(m) for m in (synced[1], synced[2][0])] == [GlobalBatchNorm2d, GlobalBatchNorm2d]
    assert synced[1].weight is tensors[0] and synced[1].running_var is tensors[1] and synced[2][0].bias is tensors[2]
    assert not synced[1].training and synced[2][0].training
    names = [name for name, _ in synced.state_dict().items()]
    reverted = CpuSyncBatchNorm().revert(synced)
    assert [type(m) for m in (reverted[1], reverted[2][0])] == [nn.BatchNorm2d, nn.BatchNorm2d]
    assert [name for name, _ in reverted.state_dict().items()] == names and reverted[1].weight is tensors[0]
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(GlobalBatchNorm2d(4)(x), nn.BatchNorm2d(4)(x))  # one process: BatchNorm2d itself


@pytest.fixture(scope="module")
def shapes_yaml(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, imgsz=64))


def relative_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    flat = torch.cat([grads[name].flatten() for name in reference])
    expected = torch.cat([grad.flatten() for grad in reference.values()])
    return float((flat - expected).norm() / expected.norm())


@pytest.mark.slow
def test_global_batch_loss_gives_two_processes_the_one_process_gradient(tmp_path: Path, shapes_yaml: str) -> None:
    torch.set_num_threads(1)
    batch, model = worker.detection_batch(shapes_yaml, 8), worker.detector()
    model.criterion = model.init_criterion()
    reference = worker.gradients(model, model.loss(batch)[0].sum())
    spawn(worker.loss_rank, 2, shapes_yaml, str(tmp_path))
    for name in ("global", "per_rank"):
        ranks = [torch.load(tmp_path / f"loss_{name}_rank{rank}.pt") for rank in range(2)]
        assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])  # DDP: the same on every rank
    two = {name: torch.load(tmp_path / f"loss_{name}_rank0.pt") for name in ("global", "per_rank")}
    assert relative_difference(two["global"], reference) < 1e-5
    # Ultralytics' own DDP loss (each rank normalised by its own target scores) is another gradient
    assert relative_difference(two["per_rank"], reference) > 1e-2


def test_global_batch_loss_wraps_each_term_and_leaves_one_process_alone(shapes_yaml: str) -> None:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    yolo26 = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    yolo26.args = get_cfg(DEFAULT_CFG)
    criterion = global_batch_loss(yolo26.init_criterion())
    assert type(criterion).__name__ == "E2ELoss" and hasattr(criterion, "update")  # its schedule stays
    assert isinstance(criterion.one2many, GlobalBatchLoss) and isinstance(criterion.one2one, GlobalBatchLoss)
    assert criterion.one2one.hyp is yolo26.args
    batch, model = worker.detection_batch(shapes_yaml, 4), worker.detector()
    model.criterion = model.init_criterion()
    plain = model.loss(batch)[0]
    model.criterion = global_batch_loss(model.criterion)
    assert global_batch_loss(model.criterion) is model.criterion
    torch.testing.assert_close(model.loss(batch)[0], plain)  # without a process group: the same loss
