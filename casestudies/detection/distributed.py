"""What makes N data-parallel processes train a detector like one process on the global batch.

DDP averages parameter gradients over ranks; that equals the gradient of one process on the global batch
only when the loss of the global batch is the sum of the ranks' parts. Two things in a YOLO step break that:

* **The loss's normaliser.** Ultralytics' detection loss divides by the sum of the assigned target scores of
  *its* batch (clamped at 1) and multiplies by the batch size. Per rank, that is each rank's own sum: the
  ranks' losses do not add up to the global batch's (at initialisation, where every sum is below 1 and
  clamped, a 2-process gradient is half the 1-process one). :class:`GlobalBatchLoss` rescales each rank's
  loss to its share of the global batch's loss: the same normaliser (the target-score sum over all ranks,
  clamped once) and the global batch size, with one ``all_reduce`` of two numbers per loss term and step.
* **BatchNorm.** Per-rank statistics are those of the rank's images. ``torch.nn.SyncBatchNorm`` computes
  global ones on GPUs but refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU or XPU or
  privateuseone", torch 2.14); :class:`GlobalBatchNorm2d` does it on any device: the per-channel sum and
  sum of squares (in float64) summed over ranks in one differentiable ``all_reduce`` per layer and pass
  (the backward pass sums the statistics' gradients over ranks the same way). :class:`CpuSyncBatchNorm` is
  the Lightning ``LayerSync`` plugin that swaps it in for every ``BatchNorm2d`` for a fit and back after.

With both, and the same images in each global batch (:class:`casestudies.detection.data.GlobalBatchSampler`),
a DDP step computes the one-process gradient up to float rounding.

Example:
    >>> model = CpuSyncBatchNorm().apply(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    >>> type(model[1]).__name__
    'GlobalBatchNorm2d'
    >>> type(CpuSyncBatchNorm().revert(model)[1]).__name__
    'BatchNorm2d'
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn

__all__ = ["CpuSyncBatchNorm", "GlobalBatchLoss", "GlobalBatchNorm2d", "global_batch_loss", "world_size"]


def world_size() -> int:
    """Processes of the default process group (1 without one).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that autograd differentiates: the gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` summed over every rank, differentiably (itself in one process)."""
    return _SumOverRanks.apply(tensor) if world_size() > 1 else tensor


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch, on any device.

    In training mode under a process group of several ranks, the per-channel sum and sum of squares (float64)
    are summed over ranks in one differentiable ``all_reduce``; mean and biased variance normalise, and the
    running statistics take the unbiased variance of the global batch, as ``BatchNorm2d`` does for one
    process. Otherwise (evaluation, one process) it is ``BatchNorm2d``. Parameters and buffers keep their names,
    so checkpoints and Ultralytics' conv-BN fusion treat it as a ``BatchNorm2d``.

    Example:
        >>> norm = GlobalBatchNorm2d(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(norm(x), nn.BatchNorm2d(4)(x), atol=1e-6)
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with the global batch's statistics (training, several ranks) or as ``BatchNorm2d``."""
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        wide = x.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        local = torch.cat([wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3)), count])
        total = sum_over_ranks(local)
        channels = x.shape[1]
        elements = total[-1].detach()
        mean = total[:channels] / elements
        variance = (total[channels : 2 * channels] / elements - mean * mean).clamp(min=0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), variance.detach(), float(elements))
        scale = torch.rsqrt(variance + self.eps)
        shape = (1, channels, 1, 1)
        y = (wide - mean.view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, variance: Tensor, elements: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        unbiased = variance * elements / max(elements - 1.0, 1.0)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked or 1)
        self.running_mean.mul_(1.0 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1.0 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def _swap_batchnorms(model: nn.Module, to: type[nn.BatchNorm2d]) -> nn.Module:
    """Replace every ``BatchNorm2d`` child (exact type or the other class) by ``to``, sharing its tensors."""
    for name, child in list(model.named_children()):
        if type(child) in (nn.BatchNorm2d, GlobalBatchNorm2d) and type(child) is not to:
            swapped = to(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            swapped.weight, swapped.bias = child.weight, child.bias
            swapped.running_mean, swapped.running_var = child.running_mean, child.running_var
            swapped.num_batches_tracked = child.num_batches_tracked
            swapped.train(child.training)
            setattr(model, name, swapped)
        else:
            _swap_batchnorms(child, to)
    return model


class CpuSyncBatchNorm(LayerSync):
    """Lightning plugin: global-batch BatchNorm statistics across processes, on CPU too.

    ``Trainer(plugins=[CpuSyncBatchNorm()])`` in place of ``sync_batchnorm=True`` (whose
    ``torch.nn.SyncBatchNorm`` needs GPUs): every ``BatchNorm2d`` becomes a :class:`GlobalBatchNorm2d` for
    the fit (before DDP wraps the model) and a ``BatchNorm2d`` again at its end; the parameters and buffers
    are the same tensors throughout.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap every ``BatchNorm2d`` for a :class:`GlobalBatchNorm2d`."""
        return _swap_batchnorms(model, GlobalBatchNorm2d)

    def revert(self, model: nn.Module) -> nn.Module:
        """Swap every :class:`GlobalBatchNorm2d` back for a ``BatchNorm2d``."""
        return _swap_batchnorms(model, nn.BatchNorm2d)


def _delegate(wrapper: object, field: str, name: str) -> Any:
    """``getattr(wrapper.<field>, name)``; never recursing while ``field`` is unset (copying, unpickling)."""
    if name.startswith("__") or name == field or field not in vars(wrapper):
        raise AttributeError(name)
    return getattr(vars(wrapper)[field], name)


class _TargetScoreSum:
    """Wraps a loss's ``TaskAlignedAssigner`` and keeps the sum of the target scores it last assigned."""

    def __init__(self, assigner: Any) -> None:
        self.assigner = assigner
        self.last: Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        assigned = self.assigner(*args, **kwargs)
        self.last = assigned[2].sum()  # (labels, boxes, scores, fg_mask, gt_idx): the loss's normaliser
        return assigned

    def __getattr__(self, name: str) -> Any:
        return _delegate(self, "assigner", name)


class GlobalBatchLoss:
    """An Ultralytics ``v8DetectionLoss`` whose value on a rank is that rank's share of the global batch's loss.

    The loss is ``batch_size * gains * S / max(target_scores_sum, 1)`` with ``S`` a sum over images; each
    rank's value becomes ``global_batch * gains * S_rank / max(global target_scores_sum, 1)`` (one
    ``all_reduce`` of the rank's target-score sum and image count), so the ranks' values add up to the loss
    of the global batch and their gradients, averaged by DDP with the usual ``world_size`` factor, to its
    gradient. The detached loss items are rescaled likewise (the rank's share of each component). Everything
    else is the wrapped loss's (attributes are delegated).

    Args:
        loss: The ``v8DetectionLoss`` (YOLO11) or one of an ``E2ELoss``'s two terms (YOLO26).
    """

    def __init__(self, loss: Any) -> None:
        self.inner = loss
        self.scores = _TargetScoreSum(loss.assigner)
        loss.assigner = self.scores

    def __getattr__(self, name: str) -> Any:
        return _delegate(self, "inner", name)

    def __call__(self, preds: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``loss(preds, batch)`` on the training outputs, as ``v8DetectionLoss.__call__``."""
        return self.loss(self.inner.parse_output(preds), batch)

    def loss(self, preds: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The rank's share of the global batch's loss, and its detached items."""
        value, items = self.inner.loss(preds, batch)
        if world_size() == 1 or self.scores.last is None:
            return value, items
        images = preds["boxes"].shape[0]
        local_scores = self.scores.last.detach().float()
        totals = torch.stack([local_scores, local_scores.new_tensor(float(images))])
        dist.all_reduce(totals)
        normaliser = local_scores.clamp(min=1.0) / totals[0].clamp(min=1.0)
        share = value * (normaliser * totals[1] / images)
        return share, _scaled(items, normaliser)


def _scaled(items: Any, factor: Tensor) -> Any:
    if isinstance(items, dict):
        return {key: item * factor for key, item in items.items()}
    return items * factor


def global_batch_loss(criterion: Any) -> Any:
    """``criterion`` with every detection-loss term normalised over the global batch (see :class:`GlobalBatchLoss`).

    A ``v8DetectionLoss`` is wrapped; an ``E2ELoss`` (YOLO26) keeps its schedule and has its ``one2many`` and
    ``one2one`` terms wrapped. Anything else is returned unchanged (its per-rank normalisation then stays).

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> from ultralytics.cfg import get_cfg
        >>> from ultralytics.utils import DEFAULT_CFG
        >>> model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
        >>> model.args = get_cfg(DEFAULT_CFG)
        >>> type(global_batch_loss(model.init_criterion())).__name__
        'GlobalBatchLoss'
    """
    if isinstance(criterion, GlobalBatchLoss):
        return criterion
    if hasattr(criterion, "one2many") and hasattr(criterion, "one2one"):
        for name in ("one2many", "one2one"):
            term = getattr(criterion, name)
            if not isinstance(term, GlobalBatchLoss):
                setattr(criterion, name, GlobalBatchLoss(term))
        return criterion
    if hasattr(criterion, "assigner") and hasattr(criterion, "parse_output"):
        return GlobalBatchLoss(criterion)
    return criterion
