"""Config-built architectures from libraries this project did not write; nothing downloads.

Every builder returns a freshly initialised ``nn.Module`` (the runner seeds ``torch`` first). Sizes are cut
down so a step takes tens of milliseconds on one CPU core, but the building blocks are each library's own:
residual blocks, LayerScale, zero-initialised BatchNorm, attention, tied embeddings, detection heads.
Heavy imports (``timm``, ``transformers``, ``ultralytics``) happen inside the builders.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import Tensor, nn

__all__ = [
    "GAN",
    "VOCAB",
    "RecurrentClassifier",
    "hf_bert",
    "hf_gpt2",
    "hf_llama",
    "hf_mistral",
    "hf_t5",
    "lightning_transformer",
    "mlp_gan",
    "recurrent",
    "timm_model",
    "tv_convnext",
    "tv_densenet",
    "tv_model",
    "tv_regnet",
    "tv_swin",
    "tv_vgg11",
    "tv_vit",
    "yolo11n",
]

#: Vocabulary of every token model (the token tasks draw from it).
VOCAB = 128
#: Classes of the image tasks.
CLASSES = 10


# ------------------------------------------------------------------------------------------------ torchvision
def tv_model(name: str, **kwargs: object) -> nn.Module:
    """A torchvision classification model by name with 10 classes, e.g. ``tv_model("resnet18")``.

    Example:
        >>> tv_model("resnet18", zero_init_residual=True).layer1[0].bn2.weight.abs().sum().item()
        0.0
    """
    import torchvision

    return torchvision.models.get_model(name, num_classes=CLASSES, **kwargs)


def tv_vgg11(batch_norm: bool = True, activation: type[nn.Module] = nn.ReLU, init_scale: float = 1.0) -> nn.Module:
    """torchvision VGG-11, its classifier sized for 32 px inputs (512 -> 256 -> 10 after a global pool).

    Args:
        batch_norm: ``vgg11_bn`` when True, plain ``vgg11`` otherwise.
        activation: Replaces every ``nn.ReLU`` (e.g. ``nn.Sigmoid``, ``nn.Tanh``).
        init_scale: Multiplies every conv/linear weight after torchvision's own initialisation.

    Example:
        >>> type(tv_vgg11(activation=nn.Tanh).features[2]).__name__
        'Tanh'
    """
    import torchvision

    model = torchvision.models.vgg11_bn(num_classes=CLASSES) if batch_norm else torchvision.models.vgg11()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(512, 256), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(256, CLASSES))
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU) and activation is not nn.ReLU:
                setattr(parent, name, activation())
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data.mul_(init_scale)
    return model


def tv_densenet() -> nn.Module:
    """A small torchvision DenseNet (growth 12, three dense blocks of two layers).

    Example:
        >>> sum(p.numel() for p in tv_densenet().parameters()) < 100_000
        True
    """
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=12, block_config=(2, 2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES)


def tv_regnet() -> nn.Module:
    """A small torchvision RegNet (depth 6, width 16, SE blocks off).

    Example:
        >>> type(tv_regnet()).__name__
        'RegNet'
    """
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=6, w_0=16, w_a=8.0, w_m=2.0, group_width=8), num_classes=CLASSES)


def tv_convnext() -> nn.Module:
    """A small torchvision ConvNeXt (32/64 channels, 2+2 blocks; LayerScale initialised at 1e-6).

    Example:
        >>> round(tv_convnext().features[1][0].layer_scale.max().item(), 9)
        1e-06
    """
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], num_classes=CLASSES)


def tv_swin() -> nn.Module:
    """A small torchvision Swin Transformer (patch 2, width 32, 2+2 blocks, window 4).

    Example:
        >>> type(tv_swin()).__name__
        'SwinTransformer'
    """
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=CLASSES
    )


def tv_vit(dropout: float = 0.0) -> nn.Module:
    """A small torchvision VisionTransformer (32 px, patch 4, 4 layers, width 64).

    Example:
        >>> tv_vit().class_token.shape[-1]
        64
    """
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32,
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        dropout=dropout,
        num_classes=CLASSES,
    )


# ------------------------------------------------------------------------------------------------ timm
def timm_model(name: str, **kwargs: object) -> nn.Module:
    """A timm model by name with 10 classes, built from code (``pretrained=False``).

    ``name="mlp_mixer"`` builds ``timm.models.mlp_mixer.MlpMixer(**kwargs)`` directly (the registered mixer
    variants fix the patch size).

    Example:
        >>> timm_model("vit_tiny_patch16_224", img_size=32, patch_size=4).patch_embed.num_patches
        64
    """
    import timm

    if name == "mlp_mixer":
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=CLASSES, **kwargs)  # type: ignore[arg-type]
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ transformers
def hf_gpt2(dropout: float = 0.0, layers: int = 4) -> nn.Module:
    """``GPT2LMHeadModel`` from a config: vocabulary 128, width 64, 4 heads (embedding tied to the head).

    Example:
        >>> hf_gpt2(layers=2).config.n_layer
        2
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def hf_llama() -> nn.Module:
    """``LlamaForCausalLM`` from a config: width 64, 2 layers, 4 heads, 2 key-value heads (GQA), RMSNorm.

    Example:
        >>> hf_llama().config.num_key_value_heads
        2
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def hf_mistral() -> nn.Module:
    """``MistralForCausalLM`` from a config: width 64, 2 layers, sliding window 16.

    Example:
        >>> hf_mistral().config.sliding_window
        16
    """
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=16,
    )
    return MistralForCausalLM(config)


def hf_bert() -> nn.Module:
    """``BertForMaskedLM`` from a config: width 64, 2 layers, 4 heads, dropout 0.1, decoder tied to the embedding.

    Example:
        >>> hf_bert().config.num_hidden_layers
        2
    """
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def hf_t5() -> nn.Module:
    """``T5ForConditionalGeneration`` from a config: width 64, 2+2 layers, 4 heads, dropout 0.1.

    Example:
        >>> hf_t5().config.num_decoder_layers
        2
    """
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(  # type: ignore[call-arg]
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def hf_bart(layerdrop: float = 0.3) -> nn.Module:
    """``BartForConditionalGeneration`` from a config: width 64, 3+3 layers, LayerDrop on both stacks.

    LayerDrop skips whole encoder and decoder layers at random in training (each layer's parameters get no
    gradient on the steps it is dropped).

    Example:
        >>> hf_bart().config.encoder_layerdrop
        0.3
    """
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layerdrop=layerdrop,
        decoder_layerdrop=layerdrop,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------------ Lightning
def lightning_transformer() -> nn.Module:
    """Lightning's demo ``Transformer`` (``nn.Transformer`` encoder-decoder), vocabulary 128, width 64.

    Example:
        >>> lightning_transformer().decoder.out_features
        128
    """
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=64, nhead=2, nhid=128, nlayers=2, dropout=0.1)


# ------------------------------------------------------------------------------------------------ recurrent
class RecurrentClassifier(nn.Module):
    """Embedding -> ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` -> linear head on the last time step.

    Args:
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (ungated, ReLU).
        hidden: Hidden size.
        layers: Stacked recurrent layers.
        recurrent_gain: Multiplies the recurrent weights (``weight_hh_*``) after PyTorch's initialisation.
        classes: Output classes.

    Example:
        >>> import torch
        >>> RecurrentClassifier("gru")(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, cell: str, hidden: int = 64, layers: int = 2, recurrent_gain: float = 1.0, classes: int = 3
    ) -> None:
        super().__init__()
        cells: dict[str, Callable[..., nn.Module]] = {
            "lstm": nn.LSTM,
            "gru": nn.GRU,
            "rnn": lambda *args, **kwargs: nn.RNN(*args, nonlinearity="relu", **kwargs),
        }
        if cell not in cells:
            raise ValueError(f"`cell` must be one of {sorted(cells)}, got {cell!r}.")
        self.embedding = nn.Embedding(VOCAB, 32)
        self.rnn = cells[cell](32, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        for name, weight in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                weight.data.mul_(recurrent_gain)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits from the last time step's output."""
        output, _ = self.rnn(self.embedding(tokens))
        return self.head(output[:, -1])


def recurrent(cell: str, **kwargs: float | int) -> nn.Module:
    """A :class:`RecurrentClassifier` (builder form for the catalog).

    Example:
        >>> type(recurrent("lstm").rnn).__name__
        'LSTM'
    """
    return RecurrentClassifier(cell, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ GANs
class GAN(nn.Module):
    """A generator and a discriminator side by side, trained by :class:`zoo.tasks.Adversarial`.

    Args:
        generator: Maps ``(n, latent)`` noise to samples.
        discriminator: Maps samples to ``(n, 1)`` logits (real vs. generated).
        latent: The noise size.

    Example:
        >>> gan = mlp_gan()
        >>> import torch
        >>> tuple(gan(torch.zeros(3, gan.latent)).shape), tuple(gan.discriminator(torch.zeros(3, 2)).shape)
        ((3, 2), (3, 1))
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent: int) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.latent = latent

    def forward(self, noise: Tensor) -> Tensor:
        """Generated samples."""
        return self.generator(noise)  # type: ignore[no-any-return]


def mlp_gan(latent: int = 8, hidden: int = 128, features: int = 2) -> GAN:
    """The MLP GAN of the 2-D mixture-of-Gaussians experiments (e.g. Metz et al., *Unrolled GANs*, 2017).

    Generator: ``latent -> hidden -> hidden -> features`` with ReLU; discriminator: ``features -> hidden ->
    hidden -> 1`` with LeakyReLU(0.2) (as in DCGAN's discriminator); PyTorch's default initialisation.
    """
    generator = nn.Sequential(
        nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, features)
    )
    discriminator = nn.Sequential(
        nn.Linear(features, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, 1),
    )
    return GAN(generator, discriminator, latent)


# ------------------------------------------------------------------------------------------------ Ultralytics
def yolo11n(classes: int = 3) -> nn.Module:
    """Ultralytics ``DetectionModel("yolo11n.yaml")`` with ``model.args`` set so that ``model.loss`` works.

    Ultralytics is kept offline (``YOLO_OFFLINE=1``, no auto-install) before it is imported.

    Example:
        >>> yolo11n().yaml["nc"]
        3
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    model = DetectionModel("yolo11n.yaml", nc=classes, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)  # type: ignore[assignment]
    return model
