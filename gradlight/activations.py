"""Activation taps: what the activations of a logged step looked like (saturated, dead, mean, std).

:class:`ActivationTaps` knows nothing about Lightning. It installs forward hooks on the model's activation
modules for the micro-batches of one logged optimizer step only (:meth:`ActivationTaps.start` ...
:meth:`ActivationTaps.stop`), keeps per-site statistics as sums and counts on the device (like
torchmetrics' states), and turns them into one :class:`ActivationStats` in :meth:`ActivationTaps.finalize`:
one optional cross-rank reduction of everything stacked, and one device-to-host copy.

What a *site* is:

* Each call position of an activation module (an ``nn.Module`` of one of the types in
  :data:`ACTIVATION_KINDS`) is a site, named by its qualified name as seen from the module that called it.
  Functional activations (``F.relu``) are invisible to hooks and not tapped.
* A module instance shared by several owners (Ultralytics' ``Conv.default_act`` is ONE ``nn.SiLU`` object
  registered under every ``Conv``) gives one site per owner: the owners' forward hooks tell which owner is
  running, so ``model.0.act`` and ``model.1.act`` are separate sites although they are one object.
* An activation called several times within one forward of its owner (torchvision's ``Bottleneck`` calls
  ``self.relu`` three times) gives one site per call position: ``layer1.0.relu``, ``layer1.0.relu#1``, ...
* Each site *feeds* the next parameter-owning module that runs after it (discovered on the first tapped
  step); the monitor maps that module to its layer and uses the layer's depth as the site's depth.

Statistics per site (over every element of every tapped micro-batch, summed over ranks):

* ``act_saturation``: fraction of outputs in the flat region of a saturating activation, i.e. where the
  derivative is below ``saturation_derivative`` times the activation's peak derivative (sigmoid, tanh,
  softsign), or exactly on a bound (hardsigmoid, hardtanh, the upper bound of ReLU6). NaN for others.
* ``act_dead``: fraction of units (channels: dim 1 of ``(N, C, ...)`` outputs; the last dim of 3-D outputs
  that follow a ``Linear``-like layer, i.e. ``(batch, sequence, features)``) that were never positive on
  any element of the step's batch, for the ReLU family (ReLU, ReLU6, Hardswish). NaN for others.
* ``act_mean``, ``act_std``: mean and standard deviation of all outputs.

A unit is judged dead only once it was seen on ``dead_min_samples`` inputs per unit (elements of dim 0 and the
positions of a convolution or sequence): a step with fewer (a batch of one sample through an MLP, where half of
any healthy ReLU layer is off for that one sample) is pooled with the next logged steps, and ``act_dead`` is NaN
until the pool is large enough. A site whose outputs hold NaN/Inf on the step (:attr:`ActivationStats.nonfinite`;
read from the mean and variance the taps compute anyway, so NaN/Inf or finite values beyond ~1e19, whose square
overflows float32) has ``act_dead`` NaN: its units are not "never positive", they are non-finite.

:class:`ForwardOriginTaps` is the other kind of forward tap: a hook on every module that notes whether its
output holds NaN/Inf, armed on logged steps only, so that a non-finite finding can name the first module in
forward order whose output was non-finite.

In-place activations (``nn.ReLU(inplace=True)``) are fine: the hooks only read the output.

Activation names: one table (:data:`ACTIVATION_KINDS`, :data:`ACTIVATIONS`) names the activations that the
taps recognise and that :func:`create_activation` builds (``create_activation("silu")``: a fresh module, never
shared), so that models built by name and the statistics recorded about them use the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradlight.layers import clean_parameter_name, owns_parameters
from gradlight.stats import Statistic, StatisticSet, wide_dtype

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_KINDS",
    "ACTIVATION_METRICS",
    "DEAD_KINDS",
    "SATURATING_KINDS",
    "SITE_STATISTICS",
    "ActivationSite",
    "ActivationStats",
    "ActivationTaps",
    "ForwardOriginTaps",
    "activation_class",
    "activation_kind",
    "create_activation",
]

#: Metrics written to the history for every activation site, in this order.
ACTIVATION_METRICS = ("act_saturation", "act_dead", "act_mean", "act_std")

#: Module type -> kind, checked in order (``ReLU6`` subclasses ``Hardtanh``, so it comes first). The kinds are
#: gradlight's activation names: :func:`create_activation` builds a module from one.
ACTIVATION_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Softsign, "softsign"),
    (nn.Hardswish, "hardswish"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.RReLU, "rrelu"),
    (nn.PReLU, "prelu"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.LogSigmoid, "logsigmoid"),
)
#: Activation name -> module class, the one registry of activation names (:func:`create_activation`).
ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType({kind: cls for cls, kind in ACTIVATION_KINDS})
#: Kinds whose flat regions count as saturated.
SATURATING_KINDS = frozenset({"sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign", "relu6"})
#: Kinds whose units can die (output exactly zero for all inputs, zero gradient).
DEAD_KINDS = frozenset({"relu", "relu6", "hardswish"})

#: What each site sums over the elements of a logged step's outputs (all summed over micro-batches and ranks).
SITE_STATISTICS = StatisticSet(
    Statistic("count", "sum"),  # elements
    Statistic("total", "sum"),  # their sum
    Statistic("sum_sq", "sum"),  # the sum of their squares
    Statistic("saturated", "sum"),  # elements in a flat region
    Statistic("nonfinite", "sum"),  # micro-batches whose outputs held NaN/Inf (from the mean and variance)
)

# Modules before which a 3-D output's units are its channels (dim 1) rather than its last dim.
_CHANNEL_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm)


def activation_class(name: str) -> type[nn.Module]:
    """The module class of an activation name (see :data:`ACTIVATIONS`).

    Raises:
        ValueError: If ``name`` is not a known activation.

    Example:
        >>> activation_class("silu")
        <class 'torch.nn.modules.activation.SiLU'>
    """
    cls = ACTIVATIONS.get(name)
    if cls is None:
        raise ValueError(f"unknown activation name {name!r}; valid names: {sorted(ACTIVATIONS)}.")
    return cls


def create_activation(name: str, **kwargs: Any) -> nn.Module:
    """A new activation module by name, never shared with another caller (like timm's ``create_act_layer``).

    Args:
        name: A name from :data:`ACTIVATIONS` (``"sigmoid"``, ``"relu"``, ``"silu"``, ...).
        kwargs: Passed to the module's constructor (e.g. ``negative_slope`` for ``"leaky_relu"``); torch's
            defaults otherwise (``inplace=False``).

    Raises:
        ValueError: If ``name`` is not a known activation.

    Example:
        >>> create_activation("leaky_relu", negative_slope=0.2)
        LeakyReLU(negative_slope=0.2)
        >>> create_activation("relu") is create_activation("relu")
        False
    """
    return activation_class(name)(**kwargs)


def activation_kind(module: nn.Module) -> str | None:
    """The kind of an activation module (``"sigmoid"``, ``"relu"``, ...), or ``None`` if it is not one.

    Example:
        >>> activation_kind(nn.ReLU(inplace=True)), activation_kind(nn.Linear(2, 2))
        ('relu', None)
    """
    for cls, kind in ACTIVATION_KINDS:
        if isinstance(module, cls):
            return kind
    return None


@dataclass
class ActivationSite:
    """One tapped activation call position.

    Attributes:
        name: Site name used as ``layer`` in the history.
        kind: Activation kind (see :func:`activation_kind`).
        module: Qualified name of the activation module through which it was first seen.
        feeds: Qualified name of the parameter-owning module that runs next (the layer this site feeds), or
            ``None`` if nothing with parameters runs after it (or it was first seen after discovery).
        units: Number of units tracked for ``act_dead`` (``None`` until the site first runs).
    """

    name: str
    kind: str
    module: str
    feeds: str | None = None
    units: int | None = None
    unit_dim: int = 1


@dataclass
class ActivationStats:
    """Activation statistics of one logged step.

    Attributes:
        step: The optimizer step.
        sites: Site names.
        kinds: Activation kind of each site.
        feeds: The layer each site feeds (a layer name of the gradient records), or ``None``.
        depths: Depth of each site (the depth of the layer it feeds; one past the last layer if none).
        metrics: ``metric -> values`` with one value per site (see :data:`ACTIVATION_METRICS`).
        nonfinite: Per site, whether its outputs held NaN/Inf on the step (not written to the history).

    Example:
        >>> stats = ActivationStats(0, ["net.1"], ["relu"], ["net.2"], np.array([1]),
        ...                         {"act_dead": np.array([0.25])})
        >>> stats.value("act_dead", "net.1"), stats.feeding("net.2")
        (0.25, [0])
    """

    step: int
    sites: list[str]
    kinds: list[str]
    feeds: list[str | None]
    depths: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def value(self, metric: str, site: str) -> float:
        """One site's value of one metric."""
        return float(self.metrics[metric][self.sites.index(site)])

    def feeding(self, layer: str) -> list[int]:
        """Indices of the sites that feed ``layer``."""
        return [i for i, fed in enumerate(self.feeds) if fed == layer]


class _Slot:
    __slots__ = ("active", "bounds", "samples", "site", "sums")

    def __init__(self, site: ActivationSite, bounds: tuple[float, float] = (-1.0, 1.0)) -> None:
        self.site = site
        self.bounds = bounds
        self.sums: Tensor | None = None  # SITE_STATISTICS' sums, one value each
        self.active: Tensor | None = None  # (units,): elements > 0 per unit, pooled until ``samples`` suffice
        self.samples = 0.0  # inputs per unit pooled in ``active`` (over ranks)


class _Frame:
    __slots__ = ("counters", "owner")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.counters: dict[int, int] = {}


class ActivationTaps:
    """Forward hooks on a model's activations, installed only while a logged step's micro-batches run.

    Args:
        model: The model (names are taken from ``named_modules()``, as the gradient layers are).
        saturation_derivative: An output counts as saturated where the activation's derivative is below
            this fraction of its peak derivative (sigmoid: 0.25, tanh and softsign: 1). ``0.05`` puts a
            sigmoid's flat region at ``|x| > 4.4`` and a tanh's at ``|x| > 2.2``.
        dead_min_samples: Inputs per unit a ReLU-family site must be seen on before its never-positive units
            count as dead (fewer are pooled over the next logged steps; see the module docstring).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> taps = ActivationTaps(net)
        >>> taps.start()
        >>> _ = net(torch.randn(16, 4))
        >>> taps.stop()
        >>> stats = taps.finalize(step=0)
        >>> stats.sites, [s.feeds for s in taps.sites]
        (['1', '3'], ['2', '4'])
    """

    def __init__(self, model: nn.Module, saturation_derivative: float = 0.05, dead_min_samples: int = 16) -> None:
        if not 0.0 < saturation_derivative < 1.0:
            raise ValueError(f"`saturation_derivative` must be in (0, 1), got {saturation_derivative!r}.")
        if isinstance(dead_min_samples, bool) or not isinstance(dead_min_samples, int) or dead_min_samples < 1:
            raise ValueError(f"`dead_min_samples` must be a positive int, got {dead_min_samples!r}.")
        self.model = model
        self.saturation_derivative = float(saturation_derivative)
        self.dead_min_samples = dead_min_samples
        self.calls = 0
        self._handles: list[RemovableHandle] = []
        self._slots: dict[tuple[int | None, int, int], _Slot] = {}
        self._site_order: list[_Slot] = []
        self._stack: list[_Frame] = []
        self._discovering = False
        self._discovered = False
        self._last_param_module: nn.Module | None = None
        self._awaiting_feed: list[_Slot] = []
        self._names: dict[int, list[tuple[str, int | None]]] = {}  # activation id -> [(name, owner id)]
        self._kinds: dict[int, str] = {}
        self._owners: dict[int, nn.Module] = {}
        self._owner_names: dict[int, str] = {}
        self._scan()

    # --------------------------------------------------------------------------------------- structure
    def _scan(self) -> None:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for name, module in self.model.named_modules(remove_duplicate=False):
            kind = activation_kind(module)
            if kind is None or not name:
                continue
            parent_name = name.rpartition(".")[0]
            parent = modules.get(parent_name)
            owner_id = id(parent) if parent is not None else None
            if parent is not None:
                self._owners.setdefault(id(parent), parent)
                self._owner_names.setdefault(id(parent), clean_parameter_name(parent_name))
            self._names.setdefault(id(module), []).append((clean_parameter_name(name), owner_id))
            self._kinds[id(module)] = kind

    @property
    def sites(self) -> list[ActivationSite]:
        """Sites seen so far, in the order they first ran."""
        return [slot.site for slot in self._site_order]

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    # ------------------------------------------------------------------------------------- hook control
    def start(self) -> None:
        """Install the hooks (idempotent: several micro-batches of one step share one installation)."""
        if self._handles:
            return
        self._stack.clear()
        modules = {id(m): m for m in self.model.modules() if id(m) in self._kinds}
        for module_id, module in modules.items():
            self._handles.append(module.register_forward_hook(self._make_tap(module_id)))
        for owner_id, owner in self._owners.items():
            self._handles.append(owner.register_forward_pre_hook(self._make_enter(owner_id)))
            self._handles.append(owner.register_forward_hook(self._make_exit(owner_id)))
        if not self._discovered:
            self._discovering = True
            for name, module in self.model.named_modules():
                if owns_parameters(module):
                    self._handles.append(
                        module.register_forward_pre_hook(self._make_param_hook(clean_parameter_name(name)))
                    )

    def stop(self) -> None:
        """Remove the hooks; the statistics collected so far stay until :meth:`finalize`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        if self._discovering:
            self._discovering = False
            self._discovered = True
            self._awaiting_feed.clear()
            self._last_param_module = None

    def discard(self) -> None:
        """Remove the hooks and drop collected statistics."""
        self.stop()
        for slot in self._site_order:
            slot.sums = None
            slot.active = None
            slot.samples = 0.0

    # ------------------------------------------------------------------------------------------- hooks
    def _make_enter(self, owner_id: int) -> Callable[..., None]:
        def enter(module: nn.Module, args: Any) -> None:
            self._stack.append(_Frame(owner_id))

        return enter

    def _make_exit(self, owner_id: int) -> Callable[..., None]:
        def exit_(module: nn.Module, args: Any, output: Any) -> None:
            for position in range(len(self._stack) - 1, -1, -1):
                if self._stack[position].owner == owner_id:
                    del self._stack[position:]
                    return

        return exit_

    def _make_param_hook(self, name: str) -> Callable[..., None]:
        def on_param_module(module: nn.Module, args: Any) -> None:
            for slot in self._awaiting_feed:
                slot.site.feeds = name
            self._awaiting_feed.clear()
            self._last_param_module = module

        return on_param_module

    def _make_tap(self, module_id: int) -> Callable[..., None]:
        names = self._names[module_id]
        owners = {owner for _, owner in names}

        def tap(module: nn.Module, args: Any, output: Any) -> None:
            self.calls += 1
            owner: int | None = None
            ordinal = 0
            for frame in reversed(self._stack):
                if frame.owner in owners:
                    owner = frame.owner
                    ordinal = frame.counters.get(module_id, 0)
                    frame.counters[module_id] = ordinal + 1
                    break
            key = (owner, module_id, ordinal)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._new_slot(key, module, output)
            if isinstance(output, Tensor) and output.is_floating_point():
                self._accumulate(slot, output)

        return tap

    def _new_slot(self, key: tuple[int | None, int, int], module: nn.Module, output: Any) -> _Slot:
        owner, module_id, ordinal = key
        names = self._names[module_id]
        base = next((name for name, owner_id in names if owner_id == owner), names[0][0])
        name = base if ordinal == 0 else f"{base}#{ordinal}"
        unit_dim = 1
        if isinstance(output, Tensor) and output.dim() == 3:
            unit_dim = 1 if isinstance(self._last_param_module, _CHANNEL_FIRST) else 2
        site = ActivationSite(name=name, kind=self._kinds[module_id], module=base, unit_dim=unit_dim)
        bounds = (float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0)))
        slot = _Slot(site, bounds)
        self._slots[key] = slot
        self._site_order.append(slot)
        if self._discovering:
            self._awaiting_feed.append(slot)
        return slot

    def _accumulate(self, slot: _Slot, output: Tensor) -> None:
        site = slot.site
        with torch.no_grad():
            y = output.detach()
            if y.dtype not in (torch.float32, torch.float64):
                y = y.float()
            acc_dtype = wide_dtype(y.device)
            count = y.numel()
            var, mean = torch.var_mean(y, correction=0)  # one pass, no temporary the size of y
            mean, var = mean.to(acc_dtype), var.to(acc_dtype)
            values = {
                "count": torch.full((), float(count), dtype=acc_dtype, device=y.device),
                "total": mean * count,
                "sum_sq": (var + mean * mean) * count,
                "saturated": self._saturated(site.kind, y, slot).to(acc_dtype),
                "nonfinite": (~torch.isfinite(mean + var)).to(acc_dtype),  # NaN/Inf make both non-finite
            }
            sums = SITE_STATISTICS.stack(values).sums
            slot.sums = sums if slot.sums is None else slot.sums + sums
            if site.kind in DEAD_KINDS:
                active = _active_per_unit(y, site.unit_dim).to(acc_dtype)
                if site.units is None:
                    site.units = int(active.numel())
                if active.numel() == site.units:
                    slot.active = active if slot.active is None else slot.active + active

    def _saturated(self, kind: str, y: Tensor, slot: _Slot) -> Tensor:
        threshold = self.saturation_derivative
        if kind == "sigmoid":  # s(1 - s) < 0.25 t  <=>  |s - 0.5| > 0.5 sqrt(1 - t)
            return torch.count_nonzero((y - 0.5).abs_() > 0.5 * math.sqrt(1.0 - threshold))
        if kind == "tanh":  # 1 - t^2 < t0  <=>  |t| > sqrt(1 - t0)
            return torch.count_nonzero(y.abs() > math.sqrt(1.0 - threshold))
        if kind == "softsign":  # (1 - |y|)^2 < t0  <=>  |y| > 1 - sqrt(t0)
            return torch.count_nonzero(y.abs() > 1.0 - math.sqrt(threshold))
        if kind == "hardsigmoid":
            return torch.count_nonzero((y <= 0.0) | (y >= 1.0))
        if kind in ("hardtanh", "relu6"):
            low, high = slot.bounds
            if kind == "relu6":
                return torch.count_nonzero(y >= high)
            return torch.count_nonzero((y <= low) | (y >= high))
        return y.new_zeros((), dtype=torch.long)

    # ------------------------------------------------------------------------------------------ result
    def finalize(
        self,
        step: int,
        reduce: Callable[[Tensor], Tensor] | None = None,
        layer_of_module: Mapping[str, tuple[str, int]] | None = None,
        default_depth: int = -1,
    ) -> ActivationStats | None:
        """Turn the collected sums into statistics (one reduction, one host copy) and reset them.

        Args:
            step: The optimizer step the statistics belong to.
            reduce: Sums a tensor over ranks (e.g. ``all_reduce(SUM)``); every rank must call
                :meth:`finalize` with the same sites seen. ``None`` for a single process.
            layer_of_module: ``module name -> (layer name, depth)`` of parameter-owning modules, to name the
                layer each site feeds. Without it the layer is the module name and the depth
                ``default_depth``.
            default_depth: Depth of sites whose fed module is unknown.

        Returns:
            The statistics, or ``None`` if no site ever ran.
        """
        slots = self._site_order
        if not slots:
            return None
        device, dtype = self._device_dtype()
        unseen = torch.zeros(len(SITE_STATISTICS.sums), dtype=dtype, device=device)
        sums = torch.stack([unseen if slot.sums is None else slot.sums.to(device, dtype) for slot in slots], dim=1)
        blocks = [sums.flatten()]  # SITE_STATISTICS' rows, one column per site
        for slot in slots:
            if slot.site.kind in DEAD_KINDS and slot.site.units is not None:
                units = slot.site.units
                blocks.append(
                    slot.active if slot.active is not None else torch.zeros(units, dtype=dtype, device=device)
                )
        flat = torch.cat([block.to(device, dtype) for block in blocks])
        if reduce is not None:
            flat = reduce(flat)
        host = flat.detach().cpu().numpy().astype(np.float64)
        stats = self._derive(step, host, layer_of_module or {}, default_depth)
        self._pool(flat, len(SITE_STATISTICS.sums) * len(slots))
        for slot in slots:
            slot.sums = None
        return stats

    def _pool(self, flat: Tensor, offset: int) -> None:
        """Keep the (reduced) per-unit activity of sites not yet seen on ``dead_min_samples`` inputs per unit."""
        for slot in self._site_order:
            units = slot.site.units
            if slot.site.kind not in DEAD_KINDS or units is None:
                slot.active = None
                continue
            pooled = flat[offset : offset + units]
            offset += units
            # summed with the next steps' (and re-summed over ranks): only whether a unit's sum is 0 matters
            slot.active = pooled.clone() if 0 < slot.samples < self.dead_min_samples else None
            if slot.active is None:
                slot.samples = 0.0

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for slot in self._site_order:
            if slot.sums is not None:
                return slot.sums.device, slot.sums.dtype
        param = next(iter(self.model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        return device, wide_dtype(device)

    def _derive(
        self,
        step: int,
        host: np.ndarray,
        layer_of_module: Mapping[str, tuple[str, int]],
        default_depth: int,
    ) -> ActivationStats:
        slots = self._site_order
        count = len(slots)
        rows = len(SITE_STATISTICS.sums)
        named = SITE_STATISTICS.split(host[: rows * count].reshape(rows, count))
        n, total, squares, saturated, nonfinite = (
            named[name] for name in ("count", "total", "sum_sq", "saturated", "nonfinite")
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(n > 0, total / n, np.nan)
            var = np.where(n > 0, squares / n - mean * mean, np.nan)
            std = np.sqrt(np.clip(var, 0.0, None))
            saturation = np.where(n > 0, saturated / n, np.nan)
        dead = np.full(count, np.nan)
        offset = rows * count
        for i, slot in enumerate(slots):
            site = slot.site
            if site.kind not in SATURATING_KINDS:
                saturation[i] = np.nan
            if site.kind in DEAD_KINDS and site.units is not None:
                active = host[offset : offset + site.units]
                offset += site.units
                dead[i] = self._dead_fraction(slot, active, float(n[i]), bool(nonfinite[i] > 0))
        feeds: list[str | None] = []
        depths = np.empty(count, dtype=np.int32)
        for i, slot in enumerate(slots):
            fed = slot.site.feeds
            layer, depth = layer_of_module.get(fed, (fed, default_depth)) if fed else (None, default_depth)
            feeds.append(layer)
            depths[i] = depth
        return ActivationStats(
            step=step,
            sites=[slot.site.name for slot in slots],
            kinds=[slot.site.kind for slot in slots],
            feeds=feeds,
            depths=depths,
            metrics={
                "act_saturation": saturation,
                "act_dead": dead,
                "act_mean": mean,
                "act_std": std,
            },
            nonfinite=nonfinite > 0,
        )

    def _dead_fraction(self, slot: _Slot, active: np.ndarray, count: float, nonfinite: bool) -> float:
        """The fraction of never-positive units once enough inputs per unit are pooled, else NaN.

        Adds this step's inputs per unit to the slot's pool; a site with non-finite outputs is not judged (a
        NaN is not "never positive") and its pool starts over.
        """
        units = slot.site.units or 0
        if count <= 0 or units <= 0:
            return float("nan")
        if nonfinite:
            slot.samples = 0.0
            return float("nan")
        slot.samples += count / units
        if slot.samples < self.dead_min_samples:
            return float("nan")
        slot.samples = 0.0
        return float((active == 0).sum()) / units


def _active_per_unit(y: Tensor, unit_dim: int) -> Tensor:
    """1 for each unit (dim ``unit_dim``; a 0-/1-D output is one unit) with a positive element, else 0.

    Summed over micro-batches and ranks, a unit is dead exactly when its sum is 0.
    """
    if y.dim() < 2:
        return (y.amax() > 0).reshape(1)
    dim = unit_dim if unit_dim < y.dim() else y.dim() - 1
    others = [d for d in range(y.dim()) if d != dim]
    return y.amax(dim=others) > 0


class ForwardOriginTaps:
    """Forward hooks on every module that note whether its output holds NaN/Inf, armed for one step at a time.

    On the step a non-finite value is born, the first module in forward order whose output is non-finite is
    where it appeared: :meth:`finalize` lists the modules whose outputs were non-finite, in the order their
    forward passes returned (a child returns before its parent, so the innermost module comes first).

    What it costs: while armed, one float32 sum and one ``isfinite`` per floating-point output tensor of each
    module call (a tuple's or a dict's tensors each), kept on the device; one host copy in :meth:`finalize`. The
    recorder arms it on logged steps only, so an unlogged step runs no hook at all.

    Limits: a NaN made by functional code between modules (``torch.log`` in a ``forward``) is named at the first
    module whose output carries it, usually the parent whose ``forward`` holds that code; a non-finite input
    (NaN in the data) is named at the first module that returns it; a finite value so large that its float32
    sum overflows (outputs summing past ~3e38) counts as non-finite. On a step that is not armed (not logged)
    nothing is seen: a NaN born there and carried in the weights is found on the next logged step at the first
    module that reads those weights.

    Args:
        model: The model (names from ``named_modules()``, as the gradient layers are).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> taps = ForwardOriginTaps(net)
        >>> taps.start()
        >>> _ = net(torch.full((2, 4), float("nan")))
        >>> taps.stop()
        >>> taps.finalize()
        ['0', '1', '2']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._names = {id(m): clean_parameter_name(n) for n, m in model.named_modules() if n}
        self._handles: list[RemovableHandle] = []
        self._flags: list[tuple[int, Tensor]] = []

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def start(self) -> None:
        """Install the hooks (idempotent over the micro-batches of one step)."""
        if self._handles:
            return
        for module in self.model.modules():
            if id(module) in self._names:
                self._handles.append(module.register_forward_hook(self._tap))

    def stop(self) -> None:
        """Remove the hooks; the flags stay until :meth:`finalize`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _tap(self, module: nn.Module, args: Any, output: Any) -> None:
        tensors = _float_tensors(output)
        if not tensors:
            return
        with torch.no_grad():
            total = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors]).sum()
            self._flags.append((id(module), torch.isfinite(total)))

    def finalize(self, limit: int = 16) -> list[str]:
        """The modules whose outputs held NaN/Inf since :meth:`start`, first returned first (at most ``limit``).

        Resets the flags. ``[]`` when every output was finite or nothing ran.
        """
        flags, self._flags = self._flags, []
        if not flags:
            return []
        finite = torch.stack([flag.to("cpu", non_blocking=False) for _, flag in flags]).numpy()
        names: list[str] = []
        for (module_id, _), ok in zip(flags, finite.tolist()):
            name = self._names[module_id]
            if not ok and name not in names:
                names.append(name)
                if len(names) >= limit:
                    break
        return names


def _float_tensors(output: Any) -> list[Tensor]:
    """The floating-point tensors of a module's output (itself, or one level of a tuple, list or dict)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() and output.numel() else []
    if isinstance(output, Mapping):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return []
    return [t for t in items if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
