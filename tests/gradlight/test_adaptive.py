"""Which layers an optimizer steps per element (:mod:`gradlight.adaptive`), read from real torch optimizers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gradlight.adaptive import adaptive_decay
from gradlight.layers import LayerMap


def net_and_layers() -> tuple[nn.Module, LayerMap]:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    return net, LayerMap.build(net.named_parameters())


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05), 5e-5),  # decoupled: lr * weight_decay
        (lambda p: torch.optim.Adam(p, lr=1e-3), 0.0),
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), 1e-4),
        (lambda p: torch.optim.NAdam(p, lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True), 2e-4),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2), 0.0),
        (lambda p: torch.optim.Adagrad(p, lr=1e-2), 0.0),
    ],
    ids=["adamw", "adam", "adam_decoupled", "nadam_decoupled", "rmsprop", "adagrad"],
)
def test_adaptive_optimizers_map_every_layer_to_its_decoupled_decay(build, expected: float) -> None:  # type: ignore[no-untyped-def]
    net, layers = net_and_layers()
    decay = adaptive_decay(build(net.parameters()), layers)
    assert sorted(decay) == ["0", "1", "2"]
    assert all(value == pytest.approx(expected) for value in decay.values())


@pytest.mark.parametrize(
    "build",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),  # the step follows the gradient's size
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),  # coupled: the normalised step may be the decay
        lambda p: torch.optim.RMSprop(p, lr=1e-2, weight_decay=1e-4),
    ],
    ids=["sgd", "adam_coupled_decay", "rmsprop_coupled_decay"],
)
def test_sgd_and_coupled_weight_decay_leave_the_map_empty(build) -> None:  # type: ignore[no-untyped-def]
    net, layers = net_and_layers()
    assert adaptive_decay(build(net.parameters()), layers) == {}
    assert adaptive_decay(None, layers) == {}


def test_a_layer_takes_the_largest_decay_of_its_groups_and_leaves_with_one_coupled_group() -> None:
    net, layers = net_and_layers()
    weights = [net[0].weight, net[2].weight]
    others = [net[0].bias, net[1].weight, net[1].bias, net[2].bias]

    def groups() -> list[dict[str, Any]]:  # fresh dicts: an optimizer writes its defaults into the ones it gets
        return [{"params": weights, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]

    decay = adaptive_decay(torch.optim.AdamW(groups(), lr=1e-3), layers)
    assert decay == pytest.approx({"0": 1e-4, "1": 0.0, "2": 1e-4})
    # the same groups under Adam: the weights' group has coupled decay, so layers 0 and 2 are out
    assert adaptive_decay(torch.optim.Adam(groups(), lr=1e-3), layers) == {"1": 0.0}
    # parameters the map does not monitor are ignored, and another optimizer's layers are not in the map
    assert adaptive_decay(torch.optim.Adam([net[1].weight, torch.nn.Parameter(torch.ones(3))]), layers) == {"1": 0.0}
