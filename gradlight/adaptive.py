"""Which layers an optimizer steps per element, normalised by the gradient's own scale (Adam and its family).

SGD's step is the gradient times the learning rate: a layer whose gradient is three decades below the head's
moves three decades less. An adaptive optimizer (Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad,
Adadelta) divides each element's step by a running scale of that element's gradient, so a layer's step does
not follow its gradient's size: there the update ratio, not the raw gradient, says whether a layer still
moves (the ``vanishing`` rule reads it, see docs/diagnosis.md). Two things besides the gradient can move a
weight under these optimizers, and the map says how much:

* decoupled weight decay (AdamW; Adam, NAdam and RAdam with ``decoupled_weight_decay=True``) shrinks every
  weight by ``lr * weight_decay`` per step, an update ratio of exactly ``lr * weight_decay`` that has nothing
  to do with learning: the map holds that rate, which a caller subtracts;
* coupled (L2) weight decay adds ``weight_decay * p`` to the gradient *before* it is normalised, so a layer
  whose gradient vanished still takes full-size steps towards zero: such layers are left out of the map (the
  update then proves nothing).
"""

from __future__ import annotations

from typing import Any

from torch import optim
from torch.optim import Optimizer

from gradlight.layers import LayerMap

__all__ = ["ADAPTIVE_OPTIMIZERS", "adaptive_decay", "decouples_weight_decay"]

#: Optimizers whose step is normalised per element by a running scale of that element's gradient.
ADAPTIVE_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    optim.Adam,
    optim.AdamW,
    optim.Adamax,
    optim.NAdam,
    optim.RAdam,
    optim.RMSprop,
    optim.Adagrad,
    optim.Adadelta,
)


def adaptive_decay(optimizer: Optimizer | None, layer_map: LayerMap) -> dict[str, float]:
    """``layer -> decoupled weight decay per step`` for the layers ``optimizer`` steps adaptively.

    A layer is in the map when every parameter of it that the optimizer holds sits in a param group of an
    adaptive optimizer (:data:`ADAPTIVE_OPTIMIZERS`, subclasses included) without coupled weight decay; its
    value is the largest ``lr * weight_decay`` of those groups with decoupled decay (0 without). Layers of
    another optimizer, of SGD, or with coupled weight decay are not in it.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> layers = LayerMap.build(net.named_parameters())
        >>> adaptive_decay(torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01), layers)
        {'0': 1e-05, '1': 1e-05}
        >>> adaptive_decay(torch.optim.SGD(net.parameters(), lr=0.1), layers)
        {}
    """
    if optimizer is None or not isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        return {}
    decay: dict[str, float] = {}
    excluded: set[str] = set()
    for group in optimizer.param_groups:
        rate = _decoupled_rate(optimizer, group)
        for param in group["params"]:
            index = layer_map.params_by_id.get(id(param))
            if index is None:
                continue
            layer = layer_map.layers[layer_map.param_layer[index]]
            if rate is None:
                excluded.add(layer)
            else:
                decay[layer] = max(decay.get(layer, 0.0), rate)
    return {layer: rate for layer, rate in decay.items() if layer not in excluded}


def _decoupled_rate(optimizer: Optimizer, group: dict[str, Any]) -> float | None:
    """The group's decoupled decay per step (``lr * weight_decay``), 0 without decay, ``None`` for coupled decay."""
    weight_decay = float(group.get("weight_decay", 0.0) or 0.0)
    if weight_decay == 0.0:
        return 0.0
    if decouples_weight_decay(optimizer, group):
        return float(group["lr"]) * weight_decay
    return None


def decouples_weight_decay(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay shrinks the weights directly (AdamW) instead of adding to the gradient.

    Example:
        >>> import torch
        >>> params = [torch.nn.Parameter(torch.ones(2))]
        >>> decouples_weight_decay(opt := torch.optim.AdamW(params), opt.param_groups[0])
        True
        >>> decouples_weight_decay(opt := torch.optim.Adam(params, weight_decay=0.1), opt.param_groups[0])
        False
    """
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, optim.AdamW)))
