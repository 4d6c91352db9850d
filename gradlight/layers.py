"""Which parameter belongs to which layer, and in which order the layers run.

A *layer* is, by default, each module that directly owns parameters, named by its qualified name from
``named_modules()`` (``model.0.conv``). ``group_by`` coarsens that: an int keeps that many leading name
components (``model.3``), a callable maps a parameter name to any layer name. A layer's *depth* is its
position in forward-execution order, discovered once by forward pre-hooks on the first training batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ROOT_LAYER",
    "ForwardOrderRecorder",
    "GroupBy",
    "LayerMap",
    "clean_parameter_name",
    "layer_name_for",
    "owns_parameters",
    "setup_problems",
    "validate_group_by",
]

#: How parameters are grouped into layers: ``None`` (owning module), an int, or ``param_name -> layer_name``.
GroupBy = int | Callable[[str], str] | None

# Name components that wrappers insert and that users never see in the unwrapped model.
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "_forward_module")
#: Layer name of parameters owned by the model itself (no module prefix).
ROOT_LAYER = "(root)"


def clean_parameter_name(name: str) -> str:
    """Drop wrapper components (FSDP, activation checkpointing, ``torch.compile``) from a qualified name.

    Example:
        >>> clean_parameter_name("_fsdp_wrapped_module.layer.0._fsdp_wrapped_module.weight")
        'layer.0.weight'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def _module_of(param_name: str) -> str:
    module, _, _ = param_name.rpartition(".")
    return module or ROOT_LAYER


def layer_name_for(param_name: str, group_by: GroupBy) -> str:
    """Map a (clean) parameter name to its layer name.

    Example:
        >>> layer_name_for("model.3.cv1.conv.weight", None)
        'model.3.cv1.conv'
        >>> layer_name_for("model.3.cv1.conv.weight", 2)
        'model.3'
    """
    if group_by is None:
        return _module_of(param_name)
    if callable(group_by):
        return str(group_by(param_name))
    module = _module_of(param_name)
    if module == ROOT_LAYER:
        return module
    return ".".join(module.split(".")[:group_by])


def owns_parameters(module: nn.Module) -> bool:
    """Whether ``module`` directly owns parameters (not through its children): a layer by default.

    Example:
        >>> owns_parameters(nn.Linear(2, 2)), owns_parameters(nn.Sequential(nn.Linear(2, 2)))
        (True, False)
    """
    return any(True for _ in module.parameters(recurse=False))


def validate_group_by(group_by: object) -> None:
    """Raise ``ValueError`` unless ``group_by`` is ``None``, a positive int, or a callable."""
    if group_by is None or callable(group_by):
        return
    if isinstance(group_by, bool) or not isinstance(group_by, int) or group_by < 1:
        raise ValueError(
            f"`group_by` must be None (one layer per module that owns parameters), a positive int "
            f"(number of leading name components) or a callable param_name -> layer_name; got {group_by!r}."
        )


def setup_problems(named_parameters: Iterable[tuple[str, nn.Parameter]], exclude: Sequence[str] = ()) -> list[str]:
    """What would make a monitor record nothing, or not what was asked, said in words (empty when all is well).

    A model without parameters, with every parameter frozen, or whose every trainable parameter is excluded
    has no gradient to record; an ``exclude`` pattern that matches no parameter name is most likely a typo.

    Args:
        named_parameters: The model's ``named_parameters()``.
        exclude: The ``fnmatch`` patterns of parameter names not to monitor.

    Example:
        >>> print(*setup_problems(nn.Linear(2, 1).named_parameters(), exclude=["*"]))
        `exclude` ('*',) leaves no parameter to monitor: the history will be empty
        >>> print(*setup_problems(nn.Linear(2, 1).named_parameters(), exclude=["head.*"]))  # doctest: +ELLIPSIS
        `exclude` pattern 'head.*' matches no parameter name (names look like 'weight'): it excludes nothing
    """
    params = [(clean_parameter_name(name), param.requires_grad) for name, param in named_parameters]
    names = [name for name, _ in params]
    problems = [
        f"`exclude` pattern {pattern!r} matches no parameter name (names look like {names[0]!r}): it excludes nothing"
        for pattern in exclude
        if names and not any(fnmatch.fnmatchcase(name, pattern) for name in names)
    ]
    trainable = [name for name, requires_grad in params if requires_grad]
    if not params:
        problems.append("the model has no parameters: there is no gradient to record and the history will be empty")
    elif not trainable:
        problems.append(
            f"every parameter of the model is frozen (requires_grad=False, {len(params)} tensors): unless some are "
            "unfrozen later, there is no gradient to record and the history will be empty"
        )
    elif all(any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude) for name in trainable):
        problems.append(f"`exclude` {tuple(exclude)!r} leaves no parameter to monitor: the history will be empty")
    return problems


class ForwardOrderRecorder:
    """Records the order in which parameter-owning modules first run, through forward pre-hooks removed after use.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> recorder = ForwardOrderRecorder(net)
        >>> _ = net(torch.zeros(1, 2))
        >>> recorder.remove()
        >>> recorder.order
        ['0', '2']
    """

    def __init__(self, model: nn.Module) -> None:
        self.order: list[str] = []
        self._seen: set[str] = set()
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if not owns_parameters(module):
                continue
            self._handles.append(module.register_forward_pre_hook(self._make_hook(clean_parameter_name(name))))

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            if name not in self._seen:
                self._seen.add(name)
                self.order.append(name or ROOT_LAYER)

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; :attr:`order` keeps what was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class LayerMap:
    """The mapping parameter -> layer for one model, and the layers' forward order.

    Attributes:
        param_names: Clean qualified name of every monitored parameter.
        param_layer: For each parameter, the index of its layer in :attr:`layers`.
        layers: Layer names, sorted by depth.
        params_by_id: ``id(parameter) -> index`` into :attr:`param_names`.
        frozen: ``id`` of every parameter left out only because it did not require gradients when the map
            was built (a parameter that trains later, e.g. toggled by ``toggle_optimizer``, joins the map).
    """

    param_names: list[str]
    param_layer: list[int]
    layers: list[str]
    params_by_id: dict[int, int] = field(default_factory=dict)
    num_elements: list[int] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)

    @classmethod
    def build(
        cls,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        group_by: GroupBy = None,
        exclude: Sequence[str] = (),
        forward_order: Sequence[str] = (),
        trainable: Collection[int] = (),
    ) -> LayerMap:
        """Group trainable parameters into layers ordered by ``forward_order`` (module names).

        Parameters that do not require gradients (unless their ``id`` is in ``trainable``), or whose clean name
        matches a pattern in ``exclude`` (``fnmatch`` syntax), are not monitored. Layers whose modules never
        ran come last, in parameter order.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
            >>> LayerMap.build(net.named_parameters(), forward_order=["2", "0"]).layers
            ['2', '0']
        """
        rank_of_module = {name: rank for rank, name in enumerate(forward_order)}
        unseen = len(rank_of_module)
        names: list[str] = []
        layer_of_param: list[str] = []
        params_by_id: dict[int, int] = {}
        num_elements: list[int] = []
        first_seen: dict[str, tuple[int, int]] = {}
        frozen: set[int] = set()
        for raw_name, param in named_parameters:
            name = clean_parameter_name(raw_name)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
                continue
            if not (param.requires_grad or id(param) in trainable):
                frozen.add(id(param))
                continue
            if id(param) in params_by_id:  # shared (tied) parameter: counted once
                continue
            layer = layer_name_for(name, group_by)
            # A layer runs as early as its earliest member module; ties keep parameter order.
            key = (rank_of_module.get(_module_of(name), unseen), len(names))
            first_seen[layer] = min(first_seen.get(layer, key), key)
            params_by_id[id(param)] = len(names)
            names.append(name)
            layer_of_param.append(layer)
            num_elements.append(param.numel())
        layers = sorted(first_seen, key=lambda layer: first_seen[layer])
        index = {layer: i for i, layer in enumerate(layers)}
        return cls(
            param_names=names,
            param_layer=[index[layer] for layer in layer_of_param],
            layers=layers,
            params_by_id=params_by_id,
            num_elements=num_elements,
            frozen=frozen - set(params_by_id),
        )

    def layer_sizes(self) -> list[int]:
        """Number of monitored parameter elements per layer."""
        sizes = [0] * len(self.layers)
        for layer, count in zip(self.param_layer, self.num_elements):
            sizes[layer] += count
        return sizes
