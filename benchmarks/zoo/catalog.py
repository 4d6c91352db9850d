"""The zoo's runs, as data: architecture, task, training regime, faults and the expected diagnosis.

Healthy runs cover several regimes (SGD with momentum and AdamW, bf16 autocast, ordinary and tiny gradient
clipping, gradient accumulation, a fine-tuning learning rate, dropout, frozen backbones, activation taps, and
long runs that converge). Broken runs break the same real architectures in one known way each; their
expectation names the finding kind, the layer(s) (fnmatch patterns relative to the bare model) and the
optimizer step at which the fault starts. ``quick=True`` marks the subset that ``--quick`` and the test run.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from zoo import models
from zoo.faults import DetachOutput, Fault, InjectNonFinite, ScaleParameters, SetParameters, UnusedModule
from zoo.scoring import ANY_LAYER, FIRST_LAYER, Expectation
from zoo.tasks import (
    CausalLM,
    DemoLM,
    Detection,
    GaussianRing,
    ImageClassification,
    MaskedLM,
    Seq2Seq,
    Task,
    TokenClassification,
)

__all__ = ["CATALOG", "Optim", "Regime", "ZooRun", "select"]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_PRECISIONS = ("32-true", "bf16-mixed")


@dataclass(frozen=True)
class Optim:
    """Optimizer of a run.

    Attributes:
        name: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
        lr: Learning rate of the default parameter group.
        momentum: SGD momentum.
        weight_decay: Weight decay of every group (``"adamw"``).
        groups: ``(fnmatch pattern on parameter names, lr)`` pairs, each its own parameter group.
        betas: Adam's and AdamW's ``betas``.

    Example:
        >>> Optim("sgd", 0.05, groups=(("layer3.*", 0.0),)).describe()
        'sgd lr 0.05 (layer3.* lr 0)'
        >>> Optim("adam", 2e-4, betas=(0.5, 0.999)).describe()
        'adam lr 0.0002 betas (0.5, 0.999)'
    """

    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    groups: tuple[tuple[str, float], ...] = ()
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"`name` must be one of {_OPTIMIZERS}, got {self.name!r}.")
        if self.lr < 0 or any(lr < 0 for _, lr in self.groups):
            raise ValueError(f"learning rates must be >= 0, got {self.lr!r} and groups {self.groups!r}.")

    def parameter_groups(self, named: list[tuple[str, nn.Parameter]]) -> list[dict[str, object]]:
        """Split ``named`` parameters into the default group and one group per pattern (first match wins)."""
        buckets: list[list[nn.Parameter]] = [[] for _ in range(len(self.groups) + 1)]
        for name, parameter in named:
            index = next((i for i, (p, _) in enumerate(self.groups) if fnmatch.fnmatchcase(name, p)), -1)
            buckets[index].append(parameter)
        groups: list[dict[str, object]] = [{"params": buckets[-1], "lr": self.lr}]
        groups += [{"params": b, "lr": lr} for b, (_, lr) in zip(buckets[:-1], self.groups) if b]
        return [g for g in groups if g["params"]]

    def build(self, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        """The optimizer over ``named`` parameters (names relative to the bare model), in :meth:`parameter_groups`.

        Example:
            >>> type(Optim("adam").build(list(nn.Linear(2, 2).named_parameters()))).__name__
            'Adam'
        """
        groups = self.parameter_groups(named)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        if self.name == "adam":
            return torch.optim.Adam(groups, lr=self.lr, betas=self.betas)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def describe(self) -> str:
        """E.g. ``adamw lr 0.001``."""
        text = f"{self.name} lr {self.lr:g}"
        if self.name != "sgd" and self.betas != (0.9, 0.999):
            text += f" betas {self.betas}"
        if self.groups:
            text += " (" + ", ".join(f"{p} lr {lr:g}" for p, lr in self.groups) + ")"
        return text


@dataclass(frozen=True)
class Regime:
    """How a run trains.

    Attributes:
        optim: The optimizer.
        steps: Optimizer steps (each one logged).
        precision: Lightning ``precision`` (``"32-true"`` or ``"bf16-mixed"``).
        gradient_clip_val: Lightning's norm clipping, ``None`` for none.
        accumulate: ``accumulate_grad_batches``.
        freeze: fnmatch patterns of parameters set to ``requires_grad=False`` (still handed to the optimizer).
        pretrain_steps: Steps of unmonitored AdamW (lr 1e-3) training before the run, standing in for a
            pretrained checkpoint (no downloads).
        reset: Modules re-initialised after pretraining (a fresh head for fine-tuning).
        track_activations: The monitor's activation taps.
        warmup_steps: Linear learning-rate warm-up from ``lr / warmup_steps`` over this many steps.
        decay_to_zero: Cosine learning-rate decay that reaches exactly 0 at the last step (after any warm-up).
        zero_grad: ``False`` is the beginner's bug: gradients are never zeroed between optimizer steps
            (``optimizer_zero_grad`` does nothing), so every step's gradient is added to the previous ones.

    Example:
        >>> Regime(Optim(), steps=300, precision="bf16-mixed", accumulate=2).describe()
        'adamw lr 0.001, bf16, accumulate 2, 300 steps'
    """

    optim: Optim = field(default_factory=Optim)
    steps: int = 40
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    accumulate: int = 1
    freeze: tuple[str, ...] = ()
    pretrain_steps: int = 0
    reset: tuple[str, ...] = ()
    track_activations: bool = False
    warmup_steps: int = 0
    decay_to_zero: bool = False
    zero_grad: bool = True

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"`precision` must be one of {_PRECISIONS}, got {self.precision!r}.")
        if self.steps < 1 or self.accumulate < 1 or self.pretrain_steps < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"`steps` and `accumulate` must be >= 1, `pretrain_steps` and `warmup_steps` >= 0, got "
                f"{self.steps!r}, {self.accumulate!r}, {self.pretrain_steps!r}, {self.warmup_steps!r}."
            )

    def describe(self, networks: tuple[str, ...] = ()) -> str:
        """The regime in a few words; ``networks``: the task's (one optimizer each, manual optimization).

        Example:
            >>> Regime(Optim("adam", 0.002), steps=400).describe(("generator", "discriminator"))
            'adam lr 0.002 for each of generator, discriminator (manual optimization), 400 steps'
        """
        parts = [self.optim.describe()]
        if networks:
            parts[0] += f" for each of {', '.join(networks)} (manual optimization)"
        if self.precision != "32-true":
            parts.append(self.precision.split("-")[0])
        if self.gradient_clip_val is not None:
            parts.append(f"clip {self.gradient_clip_val:g}")
        if self.accumulate > 1:
            parts.append(f"accumulate {self.accumulate}")
        if self.freeze:
            parts.append("frozen " + ",".join(self.freeze))
        if self.pretrain_steps:
            parts.append(f"after {self.pretrain_steps} pretraining steps")
        if self.warmup_steps:
            parts.append(f"warm-up {self.warmup_steps}")
        if self.decay_to_zero:
            parts.append("cosine to 0")
        if self.track_activations:
            parts.append("taps")
        if not self.zero_grad:
            parts.append("no zero_grad")
        parts.append(f"{self.steps} steps")
        return ", ".join(parts)


@dataclass(frozen=True)
class ZooRun:
    """One run of the zoo.

    Attributes:
        name: Unique name (also the run's folder).
        family: Where the architecture comes from (``torchvision``, ``timm``, ``transformers``, ``lightning``,
            ``torch.nn``, ``ultralytics``).
        model: Builds the bare model (seeded by the runner).
        task: Data and loss.
        regime: How it trains.
        expect: The expected diagnosis.
        faults: Applied to the bare model, in order, before training.
        quick: In the ``--quick`` subset.
        about: What the run shows, for the docs.

    Raises:
        ValueError: If the task trains several networks under manual optimization (:attr:`Task.networks`) and
            the regime accumulates, clips or schedules the learning rate (Lightning's automatic optimization).
    """

    name: str
    family: str
    model: Callable[[], nn.Module]
    task: Task
    regime: Regime
    expect: Expectation = field(default_factory=Expectation)
    faults: tuple[Fault, ...] = ()
    quick: bool = False
    about: str = ""

    def __post_init__(self) -> None:
        regime = self.regime
        automatic_only = regime.accumulate > 1 or regime.gradient_clip_val is not None
        if self.task.networks and (automatic_only or regime.warmup_steps or regime.decay_to_zero):
            raise ValueError(
                f"run {self.name!r}: {type(self.task).__name__} trains under manual optimization, where the runner "
                f"does not accumulate, clip or schedule the learning rate; got the regime {regime.describe()!r}."
            )


IMAGES = ImageClassification()
TOKENS = TokenClassification()
LM = CausalLM()
SGD = Optim("sgd", 0.05)
ADAMW = Optim("adamw", 1e-3)
RESNET = partial(models.tv_model, "resnet18")
VGG_PLAIN = partial(models.tv_vgg11, batch_norm=False)
RESNET_CUT = ("conv1", "bn1", "layer1.*", "layer2.*")
GAN_ADAM = Optim("adam", 2e-3, betas=(0.5, 0.999))
RING = GaussianRing()
RING_UNTOGGLED = GaussianRing(toggle=False)
BERT_CUT = ("bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm")


def _tv(name: str, regime: Regime, builder: Callable[[], nn.Module], **kw: object) -> ZooRun:
    return ZooRun(name, "torchvision", builder, IMAGES, regime, **kw)  # type: ignore[arg-type]


def _timm(name: str, regime: Regime, builder: Callable[[], nn.Module], **kw: object) -> ZooRun:
    return ZooRun(name, "timm", builder, IMAGES, regime, **kw)  # type: ignore[arg-type]


def _hf(name: str, task: Task, regime: Regime, builder: Callable[[], nn.Module], **kw: object) -> ZooRun:
    return ZooRun(name, "transformers", builder, task, regime, **kw)  # type: ignore[arg-type]


def _lazy_resnet() -> nn.Module:
    """torchvision resnet18 whose classifier is an ``nn.LazyLinear`` (shape inferred on the first batch)."""
    model = models.tv_model("resnet18")
    model.fc = nn.LazyLinear(models.CLASSES)
    return model


CATALOG: tuple[ZooRun, ...] = (
    # ------------------------------------------------------------------------------ healthy: torchvision
    _tv("tv_resnet18", Regime(SGD, steps=45), RESNET, quick=True),
    _tv(
        "tv_resnet18_zero_init_residual",
        Regime(SGD),
        partial(models.tv_model, "resnet18", zero_init_residual=True),
        about="last BN of each block starts at 0",
    ),
    _tv("tv_resnet18_taps", Regime(SGD, track_activations=True, steps=45), RESNET, about="activation taps on"),
    _tv(
        "tv_resnet18_finetune",
        Regime(Optim("adamw", 1e-5), pretrain_steps=60, reset=("fc",)),
        RESNET,
        about="fine-tuning LR 1e-5 on a pretrained backbone, fresh head",
    ),
    _tv(
        "tv_resnet18_frozen_backbone",
        Regime(SGD, freeze=("conv1.*", "bn1.*", "layer*")),
        RESNET,
        quick=True,
        about="backbone requires_grad=False, all parameters handed to the optimizer",
    ),
    _tv("tv_resnet18_lazy_head", Regime(SGD, steps=30), _lazy_resnet, about="nn.LazyLinear classifier"),
    _tv("tv_mobilenet_v3_small", Regime(ADAMW, accumulate=4, steps=30), partial(models.tv_model, "mobilenet_v3_small")),
    _tv("tv_efficientnet_b0", Regime(ADAMW, steps=160), partial(models.tv_model, "efficientnet_b0")),
    _tv("tv_densenet", Regime(SGD), models.tv_densenet),
    _tv(
        "tv_vgg11_bn_clip",
        Regime(Optim("sgd", 0.02), gradient_clip_val=1.0, track_activations=True, steps=30),
        models.tv_vgg11,
        about="ordinary clipping (1.0), taps on",
    ),
    _tv("tv_shufflenet_v2", Regime(ADAMW), partial(models.tv_model, "shufflenet_v2_x0_5")),
    _tv("tv_regnet", Regime(SGD), models.tv_regnet),
    _tv(
        "tv_regnet_long",
        Regime(SGD, steps=400),
        models.tv_regnet,
        about="converges: 400 logged steps",
    ),
    _tv("tv_convnext", Regime(ADAMW), models.tv_convnext, quick=True, about="LayerScale 1e-6"),
    _tv("tv_swin", Regime(ADAMW), models.tv_swin),
    _tv("tv_vit_dropout", Regime(ADAMW), partial(models.tv_vit, dropout=0.1), about="dropout 0.1"),
    # ------------------------------------------------------------------------------ healthy: timm
    _timm(
        "timm_vit_tiny",
        Regime(ADAMW, steps=30),
        partial(models.timm_model, "vit_tiny_patch16_224", img_size=32, patch_size=4),
    ),
    _timm(
        "timm_deit3_layerscale",
        Regime(ADAMW),
        partial(
            models.timm_model, "deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2
        ),
        about="DeiT-III, LayerScale init 1e-6",
    ),
    _timm(
        "timm_cait_layerscale",
        Regime(ADAMW),
        partial(
            models.timm_model,
            "cait_xxs24_224",
            img_size=32,
            patch_size=4,
            embed_dim=64,
            depth=4,
            num_heads=2,
            init_values=1e-5,
        ),
        about="CaiT, LayerScale init 1e-5, class-attention blocks",
    ),
    _timm(
        "timm_convnext_atto_bf16",
        Regime(ADAMW, precision="bf16-mixed", steps=30),
        partial(models.timm_model, "convnext_atto"),
        about="bf16 autocast, LayerScale 1e-6",
    ),
    _timm(
        "timm_resnet10t_zero_init_last",
        Regime(SGD),
        partial(models.timm_model, "resnet10t", zero_init_last=True),
        about="last BN of each block starts at 0",
    ),
    _timm(
        "timm_regnetx_002_zero_init_last",
        Regime(SGD),
        partial(models.timm_model, "regnetx_002", zero_init_last=True),
    ),
    _timm(
        "timm_mlp_mixer",
        Regime(ADAMW),
        partial(models.timm_model, "mlp_mixer", img_size=32, patch_size=4, num_blocks=4, embed_dim=64),
    ),
    # ------------------------------------------------------------------------------ healthy: transformers
    _hf("hf_gpt2", LM, Regime(ADAMW, steps=30), models.hf_gpt2, quick=True, about="tied embedding/head"),
    _hf(
        "hf_gpt2_long_dropout",
        LM,
        Regime(ADAMW, steps=300),
        partial(models.hf_gpt2, dropout=0.1, layers=2),
        about="converges: 300 logged steps, dropout 0.1",
    ),
    _hf(
        "hf_gpt2_cosine_to_zero",
        LM,
        Regime(ADAMW, steps=60, warmup_steps=5, decay_to_zero=True),
        models.hf_gpt2,
        about="warm-up, then cosine decay to exactly 0: the last steps move nothing, on purpose",
    ),
    _hf("hf_llama_bf16", LM, Regime(ADAMW, precision="bf16-mixed"), models.hf_llama, about="bf16 autocast"),
    _hf("hf_mistral_clip", LM, Regime(ADAMW, gradient_clip_val=1.0), models.hf_mistral, about="ordinary clipping"),
    _hf(
        "hf_bert_tiny_clip",
        MaskedLM(),
        Regime(ADAMW, gradient_clip_val=1e-3, steps=100),
        models.hf_bert,
        quick=True,
        about="clip value 1e-3, below the pre-clip norm on every step",
    ),
    _hf(
        "hf_bert_frozen_encoder",
        MaskedLM(),
        Regime(ADAMW, freeze=("bert.*",), pretrain_steps=200, steps=60),
        models.hf_bert,
        about="pretrained, then embeddings (tied to the decoder) and encoder requires_grad=False",
    ),
    _hf("hf_t5", Seq2Seq(), Regime(ADAMW), models.hf_t5, about="dropout 0.1"),
    _hf(
        "hf_bart_layerdrop",
        Seq2Seq(),
        Regime(ADAMW, steps=40),
        models.hf_bart,
        quick=True,
        about="LayerDrop 0.3: whole encoder/decoder layers skipped at random",
    ),
    # ------------------------------------------------------------------------------ healthy: Lightning, nn, YOLO
    ZooRun(
        "lightning_demo_transformer",
        "lightning",
        models.lightning_transformer,
        DemoLM(),
        Regime(Optim("sgd", 0.1, momentum=0.0)),
        about="lightning.pytorch.demos.Transformer, SGD 0.1 as in its demo",
    ),
    ZooRun(
        "lstm_long",
        "torch.nn",
        partial(models.recurrent, "lstm"),
        TOKENS,
        Regime(Optim("adamw", 3e-3), steps=400),
        quick=True,
        about="converges: 400 logged steps",
    ),
    ZooRun(
        "gru_accumulate",
        "torch.nn",
        partial(models.recurrent, "gru"),
        TOKENS,
        Regime(Optim("sgd", 0.1), accumulate=2),
    ),
    ZooRun(
        "yolo11n",
        "ultralytics",
        models.yolo11n,
        Detection(),
        Regime(ADAMW, steps=60, warmup_steps=10),
        about="DetectionModel('yolo11n.yaml') with its own loss, 64 px, LR warm-up",
    ),
    # ------------------------------------------------------------------------------ healthy: GANs (two optimizers)
    ZooRun(
        "gan_mlp_ring",
        "torch.nn",
        models.mlp_gan,
        RING,
        Regime(GAN_ADAM, steps=1400),
        quick=True,
        about="MLP GAN, ring of 8 Gaussians; generator and discriminator take turns, each toggle_optimizer'd "
        "(Lightning's GAN tutorial): 200 steps each",
    ),
    ZooRun(
        "gan_mlp_ring_untoggled",
        "torch.nn",
        models.mlp_gan,
        RING_UNTOGGLED,
        Regime(GAN_ADAM, steps=1400),
        about="as gan_mlp_ring without toggle_optimizer (the SimpleGAN of Lightning's manual-optimization docs)",
    ),
    # ------------------------------------------------------------------------------ broken: vanishing
    _tv(
        "broken_vgg11_sigmoid",
        Regime(SGD, steps=20),
        partial(models.tv_vgg11, batch_norm=False, activation=nn.Sigmoid),
        expect=Expectation("vanishing", (FIRST_LAYER,)),
        quick=True,
        about="VGG-11 without BN, every ReLU replaced by a sigmoid",
    ),
    _tv(
        "broken_vgg11_tiny_init",
        Regime(SGD, steps=20),
        partial(models.tv_vgg11, batch_norm=False, init_scale=0.1),
        expect=Expectation("vanishing", (FIRST_LAYER,)),
        about="VGG-11 without BN, every weight x0.1 of torchvision's init",
    ),
    # ------------------------------------------------------------------------------ broken: exploding
    _tv(
        "broken_vgg11_huge_init",
        Regime(Optim("sgd", 0.01), steps=20),
        partial(models.tv_vgg11, batch_norm=False, init_scale=3.0),
        expect=Expectation("exploding", (ANY_LAYER,), also=("non_finite",)),
        about="VGG-11 without BN, every weight x3",
    ),
    _tv(
        "broken_vgg11_huge_lr",
        Regime(Optim("sgd", 1.0), steps=20),
        VGG_PLAIN,
        expect=Expectation("exploding", (ANY_LAYER,), also=("non_finite",)),
        quick=True,
        about="VGG-11 without BN, SGD lr 1",
    ),
    ZooRun(
        "broken_rnn_exploding",
        "torch.nn",
        partial(models.recurrent, "rnn", recurrent_gain=4.0),
        TOKENS,
        Regime(Optim("sgd", 0.05), steps=20),
        expect=Expectation("exploding", (ANY_LAYER,), also=("non_finite",)),
        about="ungated ReLU nn.RNN, recurrent weights x4 (spectral radius > 1) over 32 steps",
    ),
    # ------------------------------------------------------------------------------ broken: non-finite
    _tv(
        "broken_resnet18_nan_at_10",
        Regime(SGD, steps=20),
        RESNET,
        expect=Expectation("non_finite", ("layer3.0.conv2",), onset=10),
        faults=(InjectNonFinite("layer3.0.conv2", step=10),),
        quick=True,
    ),
    _hf(
        "broken_gpt2_inf_at_8",
        LM,
        Regime(ADAMW, steps=16),
        models.hf_gpt2,
        expect=Expectation("non_finite", ("transformer.h.1.mlp.c_fc",), onset=8),
        faults=(InjectNonFinite("transformer.h.1.mlp.c_fc", step=8, value=math.inf),),
    ),
    # ------------------------------------------------------------------------------ broken: activations
    _tv(
        "broken_vgg11_bn_dead_relu",
        Regime(SGD, steps=20, track_activations=True),
        models.tv_vgg11,
        expect=Expectation("dead_units", ("features.2",)),
        faults=(SetParameters("features.1.bias", -10.0),),
        about="BN shift -10 before the first ReLU",
    ),
    _tv(
        "broken_vgg11_bn_saturated_tanh",
        Regime(SGD, steps=20, track_activations=True),
        partial(models.tv_vgg11, activation=nn.Tanh),
        expect=Expectation("saturated", ("features.*",)),
        faults=(ScaleParameters("features.*.weight", 8.0, module_class="BatchNorm2d"),),
        about="tanh activations, BN gains x8 before them",
    ),
    # ------------------------------------------------------------------------------ broken: optimizer
    _tv(
        "broken_resnet18_lr0_layer3",
        Regime(Optim("sgd", 0.05, groups=(("layer3.*", 0.0),)), steps=20),
        RESNET,
        expect=Expectation("dormant", ("layer3.*",)),
        about="param group of layer3 at lr 0",
    ),
    _hf(
        "broken_llama_lr0_layer1",
        LM,
        Regime(Optim("adamw", 1e-3, groups=(("model.layers.1.*", 0.0),)), steps=20),
        models.hf_llama,
        expect=Expectation("dormant", ("model.layers.1.*",)),
        about="param group of decoder layer 1 at lr 0",
    ),
    _timm(
        "broken_convnext_atto_lr1e-12",
        Regime(Optim("adamw", 1e-12), steps=20),
        partial(models.timm_model, "convnext_atto"),
        expect=Expectation("stalled", (ANY_LAYER,)),
    ),
    ZooRun(
        "broken_lstm_lr1e-12",
        "torch.nn",
        partial(models.recurrent, "lstm"),
        TOKENS,
        Regime(Optim("sgd", 1e-12), steps=20),
        expect=Expectation("stalled", (ANY_LAYER,)),
        quick=True,
    ),
    _tv(
        "broken_resnet18_no_zero_grad",
        Regime(Optim("sgd", 0.01), steps=20, zero_grad=False),
        RESNET,
        expect=Expectation("exploding", (ANY_LAYER,)),
        quick=True,
        about="optimizer_zero_grad overridden to do nothing: gradients accumulate across steps",
    ),
    # ------------------------------------------------------------------------------ broken: no gradient
    _tv(
        "broken_resnet18_detached_layer2",
        Regime(SGD, steps=20),
        RESNET,
        expect=Expectation("no_gradient", RESNET_CUT),
        faults=(DetachOutput("layer2"),),
        quick=True,
        about="forward hook returns layer2's output .detach()ed",
    ),
    _hf(
        "broken_bert_detached_embeddings",
        MaskedLM(),
        Regime(ADAMW, steps=20),
        models.hf_bert,
        expect=Expectation("no_gradient", BERT_CUT),
        faults=(DetachOutput("bert.embeddings"),),
        about="embeddings' output .detach()ed; the word embedding still learns through the tied decoder",
    ),
    _tv(
        "broken_resnet18_unused_head",
        Regime(SGD, steps=20),
        RESNET,
        expect=Expectation("no_gradient", ("fc_aux",)),
        faults=(UnusedModule("fc_aux", 512),),
    ),
    _hf(
        "broken_gpt2_unused_projection",
        LM,
        Regime(ADAMW, steps=20),
        models.hf_gpt2,
        expect=Expectation("no_gradient", ("transformer.h.0.mlp.aux",)),
        faults=(UnusedModule("transformer.h.0.mlp.aux", 64),),
        quick=True,
    ),
    ZooRun(
        "broken_gan_generator_detached",
        "torch.nn",
        models.mlp_gan,
        GaussianRing(toggle=False, detach_fake=True),
        Regime(GAN_ADAM, steps=40),
        expect=Expectation("no_gradient", ("generator.*",)),
        quick=True,
        about="gan_mlp_ring_untoggled whose generator loss is computed on fake.detach(): the generator gets no "
        "gradient on any of its steps",
    ),
    ZooRun(
        "broken_gan_no_zero_grad",
        "torch.nn",
        models.mlp_gan,
        RING,
        Regime(GAN_ADAM, steps=40, zero_grad=False),
        expect=Expectation("exploding", (ANY_LAYER,)),
        about="gan_mlp_ring that never calls zero_grad (manual optimization leaves it to the user): both networks' "
        "gradients accumulate across their steps",
    ),
    _hf(
        "broken_bart_layerdrop_unused_layer",
        Seq2Seq(),
        Regime(ADAMW, steps=40),
        models.hf_bart,
        expect=Expectation("no_gradient", ("model.encoder.spare",), tolerance=15),
        faults=(UnusedModule("model.encoder.spare", 64),),
        about="LayerDrop 0.3 beside a module built and handed to the optimizer but never called",
    ),
)


def select(pattern: str | None = None, quick: bool = False) -> list[ZooRun]:
    """Runs of :data:`CATALOG` whose name matches the fnmatch ``pattern`` (all if ``None``), quick ones only if asked.

    Raises:
        ValueError: If nothing matches.

    Example:
        >>> [run.name for run in select("hf_gpt2*")][:2]
        ['hf_gpt2', 'hf_gpt2_long_dropout']
    """
    runs = [r for r in CATALOG if (not quick or r.quick) and (pattern is None or fnmatch.fnmatchcase(r.name, pattern))]
    if not runs:
        names = ", ".join(r.name for r in CATALOG if not quick or r.quick)
        raise ValueError(f"no run matches --only {pattern!r} (quick={quick}); runs: {names}")
    return runs
