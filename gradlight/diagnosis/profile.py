"""What the cause rules know about a model: computed once, from its modules and their initial weights.

Besides the structure the cause table reads (activations, normalisation, residual blocks, recurrent cells,
initial weight scale), the profile records the mechanisms that make a healthy layer's gradient small *by
design*, so that the detectors can tell them from a vanishing gradient:

* **Residual gains near zero** (:class:`ResidualGain`): a learnable gain that multiplies a residual branch
  (timm/torchvision LayerScale ``gamma``/``layer_scale`` at 1e-6..1e-4, the zero-initialised last BatchNorm of
  a ResNet block, ReZero/SkipInit scalars). Every gradient inside the branch is multiplied by it, so the
  branch starts orders of magnitude below the rest and catches up as the gain grows.
* **Attention-logit projections**: the query/key projections (and relative-position biases) of an attention
  block only reach the loss through the softmax of ``q . k``. At initialisation the logits are near zero, the
  attention is near uniform, and their gradient is second order (``dL/dW_q`` carries a factor ``W_k``): 1-3
  decades below the value/output projections for the first steps.
* **Tied parameters** (GPT-2's ``wte`` is also the LM head): the layer that keeps the parameter gets the
  output layer's gradient too, so it is neither a vanishing candidate nor an early-layer reference.
* **Matrix layers**: layers that own a weight matrix (Linear, Conv, Embedding). The reference gradient is
  taken from the last matrix layers, not from a trailing scalar (a learnable temperature owned by the root
  module) or a norm's bias.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import re
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from gradlight.activations import SATURATING_KINDS, activation_kind
from gradlight.layers import ROOT_LAYER, clean_parameter_name
from gradlight.stats import local_tensor
from gradlight.tracker import GradientFlowTracker

__all__ = ["ModelProfile", "ResidualGain"]

_NORM_PATTERN = re.compile(r"norm", re.IGNORECASE)
_RESIDUAL_PATTERN = re.compile(
    r"(res(net|idual|block)?\b|^res|residual|bottleneck|basicblock|shortcut|skip|transformer|^c2f|^c3|psa)",
    re.IGNORECASE,
)
_RESIDUAL_FLAGS = ("add", "shortcut", "residual", "use_residual")
#: Class names of modules that may hold a shortcut: those named like a residual block, and blocks/layers.
_MAY_ADD_PATTERN = re.compile(rf"{_RESIDUAL_PATTERN.pattern}|block|(en|de)coderlayer", re.IGNORECASE)
_BLOCK_PATTERN = re.compile(r"(block|layer|bottleneck|residual|stage)", re.IGNORECASE)
_ATTENTION_PATTERN = re.compile(r"attention|attn", re.IGNORECASE)
_LOGIT_PROJECTION = re.compile(
    r"^(q|k|query|key|q_proj|k_proj|wq|wk|to_q|to_k|q_lin|k_lin)$|relative_attention_bias|relative_position_bias|rel_pos"
)

#: Maps a parameter to the name of its layer (``None``: not monitored).
LayerOf = Callable[[str, Tensor], str | None]


@dataclass
class ResidualGain:
    """A learnable gain that multiplies a residual branch, near zero at initialisation.

    Attributes:
        parameter: Qualified (clean) name of the gain parameter, e.g. ``blocks.0.ls1.gamma``.
        initial_rms: Root mean square of its values when the model was profiled.
        gated: Layers inside the branch it scales (their gradients carry the gain as a factor).
        tensor: The parameter itself, read again when a gated layer's gradient is judged.
        block: The residual block it lives in.
        block_class: That block's class name: blocks of one class form one stage of the network.
        rank: The block's position in forward order.
        layer: The layer the gain parameter itself belongs to.
    """

    parameter: str
    initial_rms: float
    gated: list[str]
    block: str = ""
    block_class: str = ""
    rank: int = 0
    layer: str = ""
    tensor: Tensor | None = field(default=None, repr=False, compare=False)

    def current_rms(self) -> float:
        """The gain's root mean square now (its local shard under sharding); the initial value if unreadable."""
        if self.tensor is None or not _holds_its_data(self.tensor) or _is_lazy(self.tensor):
            return self.initial_rms
        local = local_tensor(self.tensor.detach())
        if local.numel() == 0:
            return self.initial_rms
        return float(_magnitudes(local).pow(2).mean().sqrt())


@dataclass
class ModelProfile:
    """What the cause rules know about a model, computed once by :meth:`from_model`.

    Attributes:
        activations: Activation kind -> number of modules.
        saturating: Saturating activation kinds present (sigmoid, tanh, ...).
        normalization: Class names of normalisation layers present.
        residual: Whether residual structure was detected: a module whose boolean ``add``/``shortcut``/
            ``residual`` flag is on (the flag decides when there is one: Ultralytics' ``Bottleneck`` with
            ``add=False`` has no shortcut), or a module named like a block (``Bottleneck``, ``BasicBlock``,
            ``*Residual*``, ``*Block``, ``*DecoderLayer``, ...) whose ``forward`` code adds something (``+``,
            ``torch.add``), or a residual gain. A name alone is not enough. A heuristic, overridable by
            editing the profile.
        residual_evidence: The modules that made ``residual`` true (at most a few).
        recurrent: Class names of recurrent modules present.
        plain_recurrent: Whether an ungated RNN (``nn.RNN``/``nn.RNNCell``) is present.
        num_layers: Number of modules that own trainable parameters.
        init_small: Modules whose weight std is far below He and Xavier (see ``init_scale_tolerance``).
        init_large: Modules whose weight std is far above He and Xavier.
        gains: Residual gains near zero at initialisation (see the module docstring).
        attention_logit_layers: Layers that are query/key projections or relative-position biases of an
            attention block.
        tied_layers: Layers holding a parameter that another module uses too (tied embeddings).
        upstream_of_gains: Layers that run before the first branch scaled by a residual gain.
        layer_sizes: Number of trainable elements per layer (per-element comparisons).
        block_contents: ``module name -> what is inside it`` in words ("sigmoid, no normalisation, no
            shortcut"), for the messages that name where the backward signal is lost.
        output_branches: Parallel branches of the model's output head: ``branch module -> its layers`` in
            forward order. The head is the outermost module whose layers all run after every other layer (a
            detection head), and its branches are the members of a ``ModuleList``/``ModuleDict`` in it (one per
            scale and task). Each branch gets the loss' gradient only through its own outputs: a detection
            scale without targets in a batch gets almost none, and all of its layers with it.
        matrix_layers: Layers that own a parameter of two or more dimensions.
        uninitialized: Whether some parameters were still lazy (uninitialised) when profiled; profile again
            after the first forward pass.

    Example:
        >>> profile = ModelProfile.from_model(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1)))
        >>> profile.saturating, profile.normalization, profile.residual
        (['sigmoid'], [], False)
    """

    activations: dict[str, int] = field(default_factory=dict)
    saturating: list[str] = field(default_factory=list)
    normalization: list[str] = field(default_factory=list)
    residual: bool = False
    residual_evidence: list[str] = field(default_factory=list)
    recurrent: list[str] = field(default_factory=list)
    plain_recurrent: bool = False
    num_layers: int = 0
    init_small: list[str] = field(default_factory=list)
    init_large: list[str] = field(default_factory=list)
    gains: list[ResidualGain] = field(default_factory=list)
    attention_logit_layers: set[str] = field(default_factory=set)
    tied_layers: set[str] = field(default_factory=set)
    matrix_layers: set[str] | None = None
    uninitialized: bool = False
    upstream_of_gains: set[str] = field(default_factory=set)
    layer_sizes: dict[str, int] = field(default_factory=dict)
    output_branches: dict[str, list[str]] = field(default_factory=dict)
    block_contents: dict[str, str] = field(default_factory=dict)

    def describe_block(self, block: str) -> str:
        """What is inside a module, in words (its activations, normalisation, shortcut), or ``""``."""
        return self.block_contents.get(block, "")

    def output_branch_of(self, layer: str) -> list[str] | None:
        """The layers (in forward order) of the parallel output branch ``layer`` belongs to, if any."""
        for layers in self.output_branches.values():
            if layer in layers:
                return layers
        return None

    def gain_of(self, layer: str) -> ResidualGain | None:
        """The near-zero residual gain that scales ``layer``'s branch, if any."""
        for gain in self.gains:
            if layer in gain.gated:
                return gain
        return None

    def gain_path(self, layer: str) -> list[list[ResidualGain]]:
        """The gains a layer's gradient may carry as factors, one group per stage of gated blocks it passes.

        A layer inside a gated branch carries its own gain, then, for every later stage of gated blocks of
        another class (CaiT's class-attention blocks, which alone read the patch tokens out to the class token),
        the largest gain of that stage. A layer that runs before the first gated block (a ViT's patch
        embedding: patch tokens reach a class-token head only through the gated attention branches) carries
        the largest gain of every stage. The product of the stages' factors is the attenuation by design.
        """
        own = self.gain_of(layer)
        after = own or next((gain for gain in self.gains if gain.layer == layer), None)  # a gain's own layer
        if after is None and layer not in self.upstream_of_gains:
            return []
        stages: dict[str, list[ResidualGain]] = {}
        for gain in sorted(self.gains, key=lambda g: g.rank):
            if after is not None and (gain.block_class == after.block_class or gain.rank <= after.rank):
                continue
            stages.setdefault(gain.block_class, []).append(gain)
        return ([[own]] if own is not None else []) + list(stages.values())

    @classmethod
    def from_tracker(
        cls, tracker: GradientFlowTracker, init_scale_tolerance: float = 4.0, gain_threshold: float = 1e-2
    ) -> ModelProfile:
        """Profile the tracker's model with its layer grouping and discovered forward order.

        Call it once the tracker has seen a forward pass (lazy modules are initialised by then) and before the
        first optimizer step (the weights are still the initial ones).

        Example:
            >>> import torch
            >>> from gradlight.tracker import GradientFlowTracker
            >>> tracker = GradientFlowTracker(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1)))
            >>> tracker.start_discovery()
            >>> _ = tracker.model(torch.randn(2, 3))
            >>> tracker.stop_discovery()
            >>> ModelProfile.from_tracker(tracker).matrix_layers == {"0", "2"}
            True
        """
        layer_map = tracker.layer_map
        positions = layer_map.params_by_id

        def layer_of(name: str, param: Tensor) -> str | None:
            position = positions.get(id(param))
            return None if position is None else layer_map.layers[layer_map.param_layer[position]]

        return cls.from_model(
            tracker.model,
            init_scale_tolerance,
            layer_of=layer_of,
            forward_order=tracker.forward_order or (),
            gain_threshold=gain_threshold,
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        init_scale_tolerance: float = 4.0,
        *,
        layer_of: LayerOf | None = None,
        forward_order: Sequence[str] = (),
        gain_threshold: float = 1e-2,
    ) -> ModelProfile:
        """Profile ``model``; its current weights are taken as the initial ones.

        Lazy (uninitialised) parameters are skipped and :attr:`uninitialized` is set: profile again once a
        forward pass has materialised them.

        Args:
            model: The model.
            init_scale_tolerance: See :class:`~gradlight.diagnosis.DiagnosisConfig`.
            layer_of: ``(clean parameter name, parameter) -> layer name`` (the tracker's grouping); by
                default the owning module's name, as the monitor names layers without ``group_by``.
            forward_order: Module names in the order their forward passes start (the tracker's discovered
                order); places the gains inside their blocks. Registration order if empty.
            gain_threshold: See :class:`~gradlight.diagnosis.DiagnosisConfig`.

        Example:
            >>> from torchvision.models import resnet18
            >>> profile = ModelProfile.from_model(resnet18(num_classes=10, zero_init_residual=True))
            >>> profile.gains[0].parameter, profile.gains[0].gated
            ('layer1.0.bn2.weight', ['layer1.0.conv1', 'layer1.0.bn1', 'layer1.0.conv2'])
        """
        layer_of = layer_of or _owner_layer
        profile = cls()
        norms: set[str] = set()
        recurrent: set[str] = set()
        modules = {clean_parameter_name(name): module for name, module in model.named_modules()}
        module_layers = _module_layers(model, layer_of)
        profile.matrix_layers = set()
        for name, module in modules.items():
            kind = activation_kind(module)
            if kind is not None:
                profile.activations[kind] = profile.activations.get(kind, 0) + 1
            cls_name = type(module).__name__
            if _NORM_PATTERN.search(cls_name):  # BatchNorm*, LayerNorm, GroupNorm, RMSNorm, InstanceNorm*
                norms.add(cls_name)
            if isinstance(module, nn.RNNBase | nn.RNNCellBase):
                recurrent.add(cls_name)
                if isinstance(module, nn.RNN | nn.RNNCell):
                    profile.plain_recurrent = True
            if name and _looks_residual(module) and len(profile.residual_evidence) < 3:
                profile.residual_evidence.append(f"{name} ({cls_name})")
            own = list(module.named_parameters(recurse=False))
            if any(_is_lazy(p) for _, p in own):
                profile.uninitialized = True
            trainable = [(n, p) for n, p in own if p.requires_grad and not _is_lazy(p)]
            if not trainable:
                continue
            profile.num_layers += 1
            for param_name, param in trainable:
                layer = layer_of(_join(name, param_name), param)
                if layer is None:
                    continue
                if param.dim() >= 2:
                    profile.matrix_layers.add(layer)
                profile.layer_sizes[layer] = profile.layer_sizes.get(layer, 0) + param.numel()
            scale = _init_scale(module)
            if scale is not None:
                to_larger, to_smaller = scale  # std / max(He, Xavier), std / min(He, Xavier)
                if to_smaller * init_scale_tolerance < 1.0:  # below both by more than the tolerance
                    profile.init_small.append(name)
                elif to_larger > init_scale_tolerance:  # above both by more than the tolerance
                    profile.init_large.append(name)
        profile.saturating = sorted(k for k in profile.activations if k in SATURATING_KINDS)
        profile.normalization = sorted(norms)
        profile.recurrent = sorted(recurrent)
        order = list(forward_order) or list(modules)
        profile.gains = _residual_gains(model, modules, module_layers, order, layer_of, gain_threshold)
        profile.upstream_of_gains = _upstream_of(profile.gains, module_layers, order)
        profile.output_branches = _output_branches(modules, module_layers, order)
        profile.block_contents = {name: _contents(module) for name, module in modules.items() if name}
        for gain in profile.gains[: max(0, 3 - len(profile.residual_evidence))]:
            profile.residual_evidence.append(f"{gain.parameter} (residual gain)")
        profile.residual = bool(profile.residual_evidence)
        profile.attention_logit_layers = _attention_logit_layers(modules, module_layers)
        profile.tied_layers = _tied_layers(model, layer_of)
        return profile


# ----------------------------------------------------------------------------------------- structure
def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _owner_layer(name: str, param: Tensor) -> str:
    module = name.rpartition(".")[0]
    return module or ROOT_LAYER


def _is_lazy(tensor: Tensor) -> bool:
    return isinstance(tensor, nn.parameter.UninitializedParameter | nn.parameter.UninitializedBuffer)


def _module_layers(model: nn.Module, layer_of: LayerOf) -> dict[str, set[str]]:
    """``module name -> layers of its direct trainable parameters``."""
    out: dict[str, set[str]] = {}
    for raw, module in model.named_modules():
        name = clean_parameter_name(raw)
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                layer = layer_of(_join(name, param_name), param)
                if layer is not None:
                    out.setdefault(name, set()).add(layer)
    return out


def _looks_residual(module: nn.Module) -> bool:
    """Whether ``module`` adds a shortcut: its boolean flag if it has one, else its name and its code."""
    flags = [value for flag in _RESIDUAL_FLAGS if isinstance(value := getattr(module, flag, None), bool)]
    if flags:
        return any(flags)
    cls: type = type(module)
    return bool(_MAY_ADD_PATTERN.search(cls.__name__)) and _forward_adds(cls)


@functools.cache
def _forward_adds(cls: type) -> bool:
    """Whether the ``forward`` code of ``cls`` adds (``+``, ``+=``, ``torch.add``, ``.add_``), read once per class.

    Without readable source (a compiled or generated class) the residual-looking name is all there is.
    """
    forward = getattr(cls, "forward", None)
    if forward is None or getattr(forward, "__name__", "") == "_forward_unimplemented":
        return False
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndentationError):
        return bool(_RESIDUAL_PATTERN.search(cls.__name__))
    for before, token in zip([None, *tokens], tokens):
        if token.type == tokenize.OP and token.string in ("+", "+="):
            return True
        if token.type == tokenize.NAME and token.string in ("add", "add_") and getattr(before, "string", "") == ".":
            return True
    return False


def _enclosing_block(owner: str, module: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """The residual block a gain parameter of ``owner`` lives in, or ``None`` (then it is no residual gain).

    The search starts at the owner when it has parameterised children (a block that owns its gain, like
    ConvNeXt's ``gamma``), else at its parent (a gain module: timm ``LayerScale``, a BatchNorm), and walks up
    to the model's root, excluded. The first ancestor whose class says it is a block (``*Block``, ``*Layer``,
    ``Bottleneck``, ``*Residual*``, ``*Stage``) wins; failing that, the first one that is one of several
    same-class siblings in a container (a stage's ``Sequential`` of blocks).
    """
    owns_layers = any(True for child in module.children() for _ in child.parameters())
    chain: list[str] = []
    name = owner if owns_layers else owner.rpartition(".")[0]
    while name:
        chain.append(name)
        name = name.rpartition(".")[0] if "." in name else ""
    for candidate in chain:
        if _BLOCK_PATTERN.search(type(modules[candidate]).__name__):
            return candidate
    for candidate in chain:
        parent = modules.get(candidate.rpartition(".")[0])
        block = modules[candidate]
        if parent is not None and sum(1 for child in parent.children() if type(child) is type(block)) >= 2:
            return candidate
    return None


def _gain_shaped(name: str, tensor: Tensor) -> bool:
    """A vector or scalar (at most one dimension above 1) that is not a bias."""
    if name.rpartition(".")[2] == "bias" or _is_lazy(tensor):
        return False
    return sum(1 for size in tensor.shape if size > 1) <= 1


def _residual_gains(
    model: nn.Module,
    modules: dict[str, nn.Module],
    module_layers: dict[str, set[str]],
    order: list[str],
    layer_of: LayerOf,
    threshold: float,
) -> list[ResidualGain]:
    """Near-zero gains inside blocks, each with the layers of the branch it scales."""
    rank = {name: i for i, name in enumerate(order)}
    found: list[tuple[str, str, str, Tensor]] = []  # (block, owner module, parameter name, tensor)
    block_rank = {name: rank.get(name, min((rank[m] for m in rank if m.startswith(name + ".")), default=len(rank)))
                  for name in modules}  # fmt: skip
    for owner, module in modules.items():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or not _gain_shaped(param_name, param) or not _holds_its_data(param):
                continue
            local = local_tensor(param.detach())
            if local.numel() == 0 or float(local.abs().max()) > threshold:
                continue
            block = _enclosing_block(owner, module, modules)
            if block is None:
                continue
            found.append((block, owner, _join(owner, param_name), param))
    gains: list[ResidualGain] = []
    for block, owner, parameter, tensor in found:
        prefix = f"{block}." if block else ""
        inside = [name for name in module_layers if name.startswith(prefix) and name != owner]
        if owner != block:  # a gain module inside the block: the branch is what runs before it, after the last gain
            start = max(
                (rank.get(o, -1) for b, o, _, _ in found if b == block and rank.get(o, -1) < rank.get(owner, -1)),
                default=-1,
            )
            inside = [name for name in inside if start < rank.get(name, len(rank)) < rank.get(owner, -1)]
        gated = sorted({layer for name in inside for layer in module_layers[name]}, key=_first_rank(rank, inside))
        gated = [layer for layer in gated if layer_of(parameter, tensor) != layer]  # not the gain's own layer
        if gated:
            initial = float(_magnitudes(local_tensor(tensor.detach())).pow(2).mean().sqrt())
            kind = type(modules[block]).__name__
            gains.append(
                ResidualGain(
                    parameter,
                    initial,
                    gated,
                    block,
                    kind,
                    block_rank[block],
                    layer_of(parameter, tensor) or "",
                    tensor=tensor,
                )
            )
    return gains


def _contents(module: nn.Module) -> str:
    """A module's activations, normalisation and shortcut, in words."""
    kinds = sorted({kind for child in module.modules() if (kind := activation_kind(child)) is not None})
    normalised = any(_NORM_PATTERN.search(type(child).__name__) for child in module.modules())
    shortcut = any(_looks_residual(child) for child in module.modules())
    parts = [", ".join(kinds) if kinds else "no activation module"]
    parts.append("normalisation" if normalised else "no normalisation")
    if any(True for _ in module.children()):
        parts.append("a shortcut" if shortcut else "no shortcut")
    return ", ".join(parts)


def _output_branches(
    modules: dict[str, nn.Module], module_layers: dict[str, set[str]], order: list[str]
) -> dict[str, list[str]]:
    """``branch -> layers`` for the parallel branches of the output head (see ``ModelProfile.output_branches``)."""
    rank = {name: i for i, name in enumerate(order)}
    owners = sorted(module_layers, key=lambda name: rank.get(name, len(rank)))
    if not owners:
        return {}

    def inside(ancestor: str, name: str) -> bool:
        return name == ancestor or name.startswith(ancestor + ".")

    last = owners[-1]
    head = ""
    candidate = last.rpartition(".")[0]
    while candidate:
        members = [i for i, name in enumerate(owners) if inside(candidate, name)]
        if len(members) == len(owners):
            break  # the whole model: no head
        if members and members == list(range(len(owners) - len(members), len(owners))):
            head = candidate  # its layers are a suffix of the forward order
        candidate = candidate.rpartition(".")[0]
    if not head:
        return {}
    branches: dict[str, list[str]] = {}
    for name, module in modules.items():
        if not inside(head, name) or not isinstance(module, nn.ModuleList | nn.ModuleDict):
            continue
        for child, _ in module.named_children():
            branch = f"{name}.{child}"
            layers = [layer for owner in owners if inside(branch, owner) for layer in sorted(module_layers[owner])]
            if layers:
                branches[branch] = list(dict.fromkeys(layers))
    return branches if len(branches) >= 2 else {}


def _upstream_of(gains: list[ResidualGain], module_layers: dict[str, set[str]], order: list[str]) -> set[str]:
    """Layers of the modules that start before the first module of any gated branch."""
    gated = {layer for gain in gains for layer in gain.gated}
    if not gated:
        return set()
    rank = {name: i for i, name in enumerate(order)}
    first = min((rank.get(m, len(rank)) for m, layers in module_layers.items() if layers & gated), default=0)
    return {
        layer
        for module, layers in module_layers.items()
        if rank.get(module, len(rank)) < first
        for layer in layers
        if layer not in gated
    }


def _first_rank(rank: dict[str, int], modules: list[str]) -> Callable[[str], int]:
    def key(layer: str) -> int:
        candidates = [rank.get(m, len(rank)) for m in modules if m == layer or m.startswith(layer + ".")]
        return min(candidates, default=rank.get(layer, len(rank)))

    return key


def _attention_logit_layers(modules: dict[str, nn.Module], module_layers: dict[str, set[str]]) -> set[str]:
    out: set[str] = set()
    for name, layers in module_layers.items():
        parent, _, leaf = name.rpartition(".")
        parent_module = modules.get(parent)
        if parent_module is None or not _ATTENTION_PATTERN.search(type(parent_module).__name__):
            continue
        if _LOGIT_PROJECTION.search(leaf):
            out |= layers
    for name, module in modules.items():  # relative-position tables owned by the attention module itself
        if _ATTENTION_PATTERN.search(type(module).__name__):
            for param_name, _ in module.named_parameters(recurse=False):
                if _LOGIT_PROJECTION.search(param_name) and name in module_layers:
                    out |= module_layers[name]
    return out


def _tied_layers(model: nn.Module, layer_of: LayerOf) -> set[str]:
    """Layers holding a parameter that is registered under more than one module."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for raw, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(clean_parameter_name(raw))
        params[id(param)] = param
    out: set[str] = set()
    for key, owners in names.items():
        if len(owners) > 1 and params[key].requires_grad:
            layer = layer_of(owners[0], params[key])
            if layer is not None:
                out.add(layer)
    return out


# ------------------------------------------------------------------------------------------- weights
def _init_scale(module: nn.Module) -> tuple[float, float] | None:
    """``(std / max(He, Xavier), std / min(He, Xavier))`` of a Linear/Conv weight, else ``None``."""
    if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
        return None
    weight = module.weight
    if _is_lazy(weight) or weight.dim() < 2 or weight.is_meta or weight.is_complex() or not _holds_its_data(weight):
        return None  # complex weights: He and Xavier are defined for real ones
    if local_tensor(weight).numel() < 16:
        return None
    receptive = math.prod(weight.shape[2:])
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    std = float(local_tensor(weight.detach()).float().std())  # a DTensor's local shard: no collective
    he = math.sqrt(2.0 / fan_in)
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    return std / max(he, xavier), std / min(he, xavier)


def _magnitudes(tensor: Tensor) -> Tensor:
    """``tensor`` as float32 magnitudes: a complex tensor's ``abs()`` (never its real part), a real one as is."""
    return (tensor.abs() if tensor.is_complex() else tensor).float()


def _holds_its_data(tensor: Tensor) -> bool:
    """Whether ``tensor``'s storage really holds its elements.

    FSDP1 with ``use_orig_params=False`` leaves views into a freed flat parameter outside forward: reading
    them crashes the process instead of raising.
    """
    if _is_lazy(tensor) or tensor.is_meta:
        return False
    local = local_tensor(tensor.detach())
    if local.numel() == 0:
        return True
    last = local.storage_offset() + sum((size - 1) * stride for size, stride in zip(local.shape, local.stride()))
    return local.untyped_storage().nbytes() >= (last + 1) * local.element_size()
