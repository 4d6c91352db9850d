"""Parameter -> layer mapping, wrapper-free names and forward-order discovery (``gradlight.layers``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlight.layers import (
    ROOT_LAYER,
    ForwardOrderRecorder,
    LayerMap,
    clean_parameter_name,
    layer_name_for,
    owns_parameters,
    validate_group_by,
)


def test_layer_names_grouping_and_wrapper_prefixes() -> None:
    assert clean_parameter_name("_orig_mod.model._checkpoint_wrapped_module.0.weight") == "model.0.weight"
    assert layer_name_for("model.3.cv1.conv.weight", 1) == "model"
    assert layer_name_for("weight", None) == "(root)"
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].weight = net[0].weight  # tied: counted once
    layer_map = LayerMap.build(net.named_parameters())
    assert layer_map.param_names == ["0.weight", "0.bias", "1.bias"]
    assert layer_map.layer_sizes() == [6, 2]


def test_forward_order_recorder_removes_its_hooks() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    recorder = ForwardOrderRecorder(net)
    net(torch.zeros(1, 2))
    recorder.remove()
    assert recorder.order == ["0", "2"] and not recorder.active
    assert all(not module._forward_pre_hooks for module in net.modules())


def test_layers_follow_forward_order_and_modules_that_never_ran_come_last() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    net.register_parameter("scale", nn.Parameter(torch.ones(1)))  # owned by the root
    layer_map = LayerMap.build(net.named_parameters(), forward_order=["2", "0"])
    assert layer_map.layers == ["2", "0", ROOT_LAYER, "1"]  # the root and "1" never ran: parameter order after
    assert [layer_map.layers[i] for i in layer_map.param_layer] == [ROOT_LAYER, "0", "0", "1", "1", "2", "2"]
    grouped = LayerMap.build(net.named_parameters(), group_by=lambda name: "all", exclude=["1.*"])
    assert grouped.layers == ["all"] and "1.weight" not in grouped.param_names


def test_only_modules_that_own_parameters_are_layers_and_recorded() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    assert [name for name, module in net.named_modules() if owns_parameters(module)] == ["0.0"]
    recorder = ForwardOrderRecorder(net)
    assert len(recorder._handles) == 1  # one hook: the Linear, not its containers or the activation
    net(torch.zeros(1, 2))
    recorder.remove()
    assert recorder.order == ["0.0"]


@pytest.mark.parametrize("group_by", [0, -1, True, 1.5, "model"])
def test_invalid_group_by_is_rejected_with_the_value(group_by: object) -> None:
    with pytest.raises(ValueError, match=repr(group_by).replace(".", r"\.")):
        validate_group_by(group_by)
