"""Each ablation does what it says, composes, keeps names comparable, and survives fuse/EMA/checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from casestudies.detection import offline

offline.configure_offline()

from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA  # noqa: E402

from casestudies.detection.ablations import (  # noqa: E402
    Ablation,
    NoNorm,
    activation_census,
    backbone_length,
    count_batchnorms,
    count_residual_adds,
    disable_residuals,
    modules_in_scope,
    remove_batchnorm,
    replace_activations,
)
from casestudies.detection.module import build_detector  # noqa: E402
from casestudies.detection.variants import VARIANTS, get_variant  # noqa: E402

MODELS = ["yolo11n.yaml", "yolo26n.yaml"]


def build(yaml: str = "yolo11n.yaml") -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(yaml, nc=3, verbose=False)


def owning_modules(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[0] for name, _ in model.named_parameters()}


@pytest.mark.parametrize("yaml", MODELS)
def test_no_residual_switches_every_add_flag_in_scope_only(yaml: str) -> None:
    model = build(yaml)
    backbone_before, all_before = count_residual_adds(model, "backbone"), count_residual_adds(model, "all")
    assert backbone_before > 0

    switched = disable_residuals(model, "backbone")

    assert switched == backbone_before
    assert count_residual_adds(model, "backbone") == 0
    assert count_residual_adds(model, "all") == all_before - backbone_before  # head untouched
    kinds = {type(m).__name__ for _, m in modules_in_scope(build(yaml), "backbone") if getattr(m, "add", False)}
    assert "Bottleneck" in kinds and "PSABlock" in kinds

    Ablation(residual=False, scope="all").apply(model)
    assert count_residual_adds(model, "all") == 0


@pytest.mark.parametrize("yaml", MODELS)
def test_no_bn_removes_batchnorm_adds_bias_and_keeps_module_names(yaml: str) -> None:
    intact, ablated = build(yaml), build(yaml)
    bn_before = count_batchnorms(intact, "backbone")
    head_bn = count_batchnorms(intact, "all") - bn_before

    removed = remove_batchnorm(ablated, "backbone")

    assert removed == bn_before > 0
    assert count_batchnorms(ablated, "backbone") == 0
    assert count_batchnorms(ablated, "all") == head_bn
    no_norms = [m for _, m in modules_in_scope(ablated, "backbone") if isinstance(m, NoNorm)]
    assert len(no_norms) == bn_before
    convs = [m for _, m in modules_in_scope(ablated, "backbone") if isinstance(getattr(m, "bn", None), NoNorm)]
    assert all(c.conv.bias is not None and torch.count_nonzero(c.conv.bias) == 0 for c in convs)
    # Parameter-owning modules: identical except the BN ones, which vanish.
    bn_modules = {n for n, m in intact.named_modules() if isinstance(m, nn.BatchNorm2d) and n < "model.999"}
    backbone_bn = {n for n in bn_modules if int(n.split(".")[1]) < backbone_length(intact)}
    assert owning_modules(ablated) == owning_modules(intact) - backbone_bn
    # Same starting conv weights (same seed): histories line up and differ only by the ablation.
    intact_params = dict(intact.named_parameters())
    for name, param in ablated.named_parameters():
        if name.endswith("conv.weight"):
            assert torch.equal(param, intact_params[name])


@pytest.mark.parametrize("name", ["sigmoid", "relu", "tanh", "silu"])
def test_activation_gets_a_fresh_unshared_module_per_conv(name: str) -> None:
    model = build()
    before = activation_census(model, "backbone")
    assert before == {"SiLU": (before["SiLU"][0], 1)}  # Ultralytics shares one Conv.default_act
    uses = before["SiLU"][0]

    replaced = replace_activations(model, name, "backbone")

    after = activation_census(model, "backbone")
    expected_type = {"sigmoid": "Sigmoid", "relu": "ReLU", "tanh": "Tanh", "silu": "SiLU"}[name]
    assert replaced == uses
    assert after == {expected_type: (uses, uses)}  # one distinct instance per use
    assert all(not getattr(m, "inplace", False) for _, m in modules_in_scope(model, "backbone"))
    everywhere = activation_census(model, "all")
    # The head (scope "backbone" leaves it alone) still shares Ultralytics' one default activation.
    assert everywhere["SiLU"][1] == (uses if name == "silu" else 0) + 1


def test_scope_all_reaches_the_head_but_not_the_prediction_convs() -> None:
    model = build()
    prediction_convs = {n: p.clone() for n, p in model.named_parameters() if n.endswith((".2.weight", ".2.bias"))}
    Ablation(residual=False, batchnorm=False, activation="sigmoid", scope="all").apply(model)
    assert count_batchnorms(model, "all") == 0 and count_residual_adds(model, "all") == 0
    census = activation_census(model, "all")
    assert list(census) == ["Sigmoid"] and census["Sigmoid"][0] == census["Sigmoid"][1]
    params = dict(model.named_parameters())
    assert prediction_convs and all(torch.equal(params[n], p) for n, p in prediction_convs.items())


def test_grid_variants_compose_the_documented_ablations() -> None:
    assert set(VARIANTS) == {"intact", "no_residual", "no_bn", "no_residual_no_bn", "sigmoid", "stripped_sigmoid"}
    stripped = build_detector("yolo11n.yaml", 3, get_variant("stripped_sigmoid").ablation)
    assert count_residual_adds(stripped, "backbone") == 0
    assert count_batchnorms(stripped, "backbone") == 0
    assert list(activation_census(stripped, "backbone")) == ["Sigmoid"]
    assert get_variant("intact").ablation.is_identity
    # one recipe for every variant: the architecture is the only difference (issue 25)
    assert all(get_variant(name).recipe() == get_variant("intact").recipe() for name in VARIANTS)


def test_no_bn_model_fuses_copies_to_ema_and_round_trips_a_checkpoint() -> None:
    model = build_detector("yolo11n.yaml", 3, Ablation(batchnorm=False)).eval()  # head keeps its BN
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)[0]
    ema = ModelEMA(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert not any("bn.running" in k and k.startswith("model.0.") for k in model.state_dict())

    restored = build_detector("yolo11n.yaml", 3, Ablation(batchnorm=False))
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    fused = copy.deepcopy(model).fuse(verbose=False)
    with torch.no_grad():
        assert torch.allclose(ema.ema(images)[0], reference, atol=1e-5)
        assert torch.allclose(restored.eval()(images)[0], reference, atol=1e-5)
        assert torch.allclose(fused(images)[0], reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scope": "neck"}, "scope='neck'"),
        ({"activation": "softmax"}, "activation='softmax'"),
        ({"weight_init": "xavier"}, "weight_init='xavier'"),
    ],
)
def test_invalid_ablation_arguments_raise_value_error_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ablation(**kwargs)


def test_unknown_variant_and_recipe_keys_raise_value_error() -> None:
    with pytest.raises(ValueError, match="variant='deep'"):
        get_variant("deep")
    with pytest.raises(ValueError, match="lr_0"):
        get_variant("intact").recipe({"lr_0": 0.1})


def test_kaiming_weight_init_rescales_bn_free_convs_only() -> None:
    model = build()
    remove_batchnorm(model, "backbone", weight_init="kaiming")
    first = model.model[0].conv.weight
    fan_in = first[0].numel()
    assert first.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.2)
    untouched = build().model[-1].cv2[0][0].conv.weight  # head conv keeps PyTorch's default init
    assert torch.equal(model.model[-1].cv2[0][0].conv.weight, untouched)
