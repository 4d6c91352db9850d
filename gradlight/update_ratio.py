"""The update ratio without a parameter copy: the step an optimizer took, read back from its state.

The copy-based update ratio (:func:`gradlight.stats.snapshot` before the step, :func:`~gradlight.stats.update_squares`
after it) holds a second copy of every monitored parameter between the two calls: one more model's worth of
memory on every logged step, and two full passes over it. For the optimizers people use, the step is a known
function of what the optimizer holds *after* it (its state, its hyper-parameters, the new parameters and the
gradients), so its norm can be computed without ever holding the old parameters:

- ``torch.optim.SGD`` (any momentum, dampening, Nesterov, weight decay, ``maximize``; for-loop, foreach and
  fused): with momentum and without Nesterov the step is ``-lr * momentum_buffer``; otherwise
  ``(1 - lr*wd) * step = -lr * (g' + wd * p_new [+ momentum * buf])`` with ``g' = -g`` under ``maximize``
  (the weight decay term uses the *old* parameter ``p_old = p_new - step``, solved for exactly).
- ``torch.optim.Adam`` / ``AdamW`` (for-loop, foreach and fused; AMSGrad, ``maximize``, L2 or decoupled
  weight decay): with ``s`` the step count after the step, ``c1 = 1 - beta1**s``, ``c2 = sqrt(1 - beta2**s)``
  and ``v`` the second moment (``max_exp_avg_sq`` with AMSGrad), the Adam part of the step is
  ``u = -(lr / c1) * c2 * m / (sqrt(v) + eps * c2)``. Coupled (L2) weight decay is already inside ``m`` and
  ``v``. Decoupled weight decay multiplies the old parameter by ``1 - lr*wd`` first, so
  ``p_old = (p_new - u) / (1 - lr*wd)`` and the step is ``(u - lr*wd * p_new) / (1 - lr*wd)``.

Which quantity is measured: the copy measures the *applied* change ``p_new - p_old`` in the parameter's dtype,
rounding included; the reconstruction measures the step the optimizer *computed*, before it was rounded into
the parameter. In float32 and float64 the two agree to far better than 1e-3 (the tests check every variant
against a real copy). In bfloat16/float16 they do not: an update smaller than half a unit in the last place of
a weight is swallowed entirely by rounding (bfloat16 keeps 8 significant bits: an Adam step moves each weight
by about ``lr``, so at ``lr=1e-4`` weights of magnitude 2**-5 ~ 0.03 and above do not move at all), and the
copy reports that stall while the reconstruction would not. ``method="auto"`` therefore takes the copy for
parameter groups holding low-precision parameters (it is half the size there); ``method="optimizer"``
reconstructs them anyway.

Steps that were not applied give a zero update, as with the copy: Adam's step counter must have advanced
(a ``GradScaler`` that skips an overflowing step either does not call ``step()`` or, for fused kernels,
rewinds the counter), and SGD's parameter version counter must have changed (fused SGD does not bump it, and
a fused SGD that unscales internally leaves no trace of a skipped step, so it takes the copy).

Cost, fused path (``kernel="auto"``, the default, where ``torch.compile`` works: Inductor's C++ on CPU when a
C++ compiler is on the PATH, Triton on CUDA): every tensor of at least :data:`FUSED_MIN_NUMEL` elements
(contiguous, float32/float64) goes through one compiled kernel that reads its state once and returns one
float64 sum of squares, so no temporary at all; smaller tensors take the eager kernels below, where one
multi-tensor call serves many of them. The kernels are compiled on the first :meth:`UpdateNorms.after_step`
that needs them (so on a logged step, never on another one): three of them (Adam; SGD with weight decay or
Nesterov; both), each with dynamic shapes on flat 1-D views and its scalars in a small vector, so that one
compilation serves every tensor size and offset (a test counts the graphs). Fixed-size chunks were the other
way to avoid recompiling: a compiled call costs tens of microseconds of guards and Python, which at 64K
elements per chunk would be paid about 1900 times per logged step on a 124M-parameter model instead of once
per tensor. Where compiling is unavailable (no compiler, ``TORCH_COMPILE_DISABLE``, a device other than CPU
or CUDA, an active ``TorchDispatchMode``) or fails (then not retried in the process, and warned about once),
the eager kernels run; :attr:`UpdateNorms.kernel_info` says which and why (the recorder writes it to
``run.json`` as ``update_ratio_kernel``).

Cost, eager path: fused ``torch._foreach_*`` kernels over pieces of the state, never a tensor the size of all
parameters. Tensors larger than ``chunk_numel`` elements are split into flat slices (views, no copy), and the
kernels run on batches of at most ``chunk_numel`` elements, so the peak extra memory is at most two temporaries
of ``chunk_numel`` elements (AdamW with weight decay; one for Adam, Nesterov SGD and SGD with weight decay;
none for momentum SGD or plain SGD, whose step is one tensor's norm taken whole) plus one 0-d norm per piece.
By default ``chunk_numel`` is 1/64 of the
monitored elements (at most ~3% of the parameter bytes at the peak), capped at 65536 elements on CPU (256 KiB
in float32: the temporaries stay in cache, so the reconstruction reads each state tensor once from memory;
large pieces run tensor by tensor into two reused buffers, batches of small tensors as multi-tensor kernels)
and at least 65536 on accelerators (at most ~130 batches of about six multi-tensor kernels each, whatever the
number of tensors). On CPU the eager reconstruction takes more time than the copy: both are memory-bound
passes, but it takes a square root and a division per element in separate kernels (``benchmarks/scale.py``
prints the fused, eager and copy paths side by side). The memory is not.

Falls back to the copy: any other optimizer (also subclasses of the listed ones, whose ``step`` may differ),
a tensor ``lr``/``betas``/``weight_decay``, ``differentiable=True``, ``capturable=True`` on CPU, complex or
sparse tensors, ``lr * weight_decay >= 1``, gradients that still carry an AMP scale for SGD, parameters the
optimizer does not hold. :attr:`UpdateNorms.methods` says which method each param group used and why (for
the run info).

How the tracker uses it (nothing here imports the tracker): :class:`gradlight.tracker.GradientFlowTracker` calls
:meth:`UpdateNorms.before_step` at the end of ``capture`` and :meth:`UpdateNorms.after_step` in ``finalize``;
the result is one float64 entry per captured tensor, on their device, before the cross-rank reduction, so
sharded runs stay exact. The recorder writes ``UpdateNorms.methods`` into ``run.json`` under
``update_ratio_methods``.

Sharded parameters are measured on their local shards, with the optimizer state's local shards: FSDP2's
DTensors, FSDP1's original parameters (``use_orig_params=True``) and, without them, the flat parameters the
tracker then reads per unit. A tensor the optimizer does not hold takes the copy.
``tests/gradlight/test_sharding.py`` runs each against one process and checks the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradlight import compiled as compiled_kernels
from gradlight.adaptive import decouples_weight_decay
from gradlight.compiled import (
    FUSED_DEVICES,
    FUSED_DTYPES,
    CompiledKernels,
    check_kernel,
    compile_unavailable,
)
from gradlight.stats import Snapshot, local_tensor, snapshot, squares, update_squares, wide_dtype

__all__ = ["METHODS", "GroupMethod", "UpdateNorms"]

#: Accepted values of ``UpdateNorms(method=...)``.
METHODS = ("auto", "optimizer", "copy")
#: Key of :attr:`UpdateNorms.methods` for parameters that belong to no param group of the optimizer.
OUTSIDE = "outside"

_CPU_CHUNK_MAX = 1 << 16
_CHUNK_MIN = 1 << 12
_CHUNK_FRACTION = 64
_FULL_PRECISION = (torch.float32, torch.float64)
#: On CPU, batches with a piece above this many elements run tensor by tensor into reused buffers (a fresh
#: temporary that large costs page faults); batches of small tensors run as multi-tensor kernels (one Python
#: call per operator for the whole batch).
_SCRATCH_MIN_NUMEL = 1 << 15
#: On the fused path, tensors of at least this many elements (contiguous, float32/float64, on CPU or CUDA) run
#: through one compiled kernel each; smaller ones keep the multi-tensor kernels, where one call serves many
#: tensors (a compiled call costs tens of microseconds of guards and Python, a small tensor's work far less).
FUSED_MIN_NUMEL = 1 << 14


def _fusable(lists: Sequence[Sequence[Tensor]]) -> list[int]:
    """Positions whose tensors the fused kernels take (see :data:`FUSED_MIN_NUMEL`)."""
    first = lists[0]
    return [
        i
        for i, t in enumerate(first)
        if t.numel() >= FUSED_MIN_NUMEL
        and t.dtype in FUSED_DTYPES
        and t.device.type in FUSED_DEVICES
        and all(lst[i].dtype == t.dtype and lst[i].is_contiguous() for lst in lists)
    ]


def _pick(values: Any, positions: list[int]) -> Any:
    """``values`` (a list or a device vector) at ``positions``."""
    if isinstance(values, list):
        return [values[i] for i in positions]
    return values[torch.tensor(positions, dtype=torch.long).to(values.device, non_blocking=True)]


def _coefficients(columns: Sequence[Any], positions: list[int], device: torch.device) -> list[Tensor]:
    """Per position, the float64 vector of scalars a compiled kernel takes (see :func:`_adam_sum`).

    ``columns`` are per-tensor scalars: host lists of floats, or lists of 0-d device tensors (no host sync).
    Each vector is its own tensor: a view at an offset would make the compiler specialise on the offset.
    """
    if all(not isinstance(c[0], Tensor) for c in columns):
        rows = [[float(c[i]) for c in columns] for i in positions]
        if device.type == "cpu":
            return [torch.tensor(row, dtype=torch.float64) for row in rows]
        table = torch.tensor(rows, dtype=torch.float64).to(device, non_blocking=True)  # one host-to-device copy
        return [row.clone() for row in table.unbind()]
    return [torch.stack([torch.as_tensor(c[i], device=device) for c in columns]).to(torch.float64) for i in positions]


def _merge(count: int, fast: list[int], fast_values: Tensor, rest_values: Tensor | None) -> Tensor:
    """One vector of ``count`` values from the fused positions' and the others' (in position order)."""
    if rest_values is None:
        return fast_values
    out = torch.empty(count, dtype=fast_values.dtype, device=fast_values.device)
    taken = set(fast)
    rest = [i for i in range(count) if i not in taken]
    out[torch.tensor(fast, dtype=torch.long).to(out.device, non_blocking=True)] = fast_values
    out[torch.tensor(rest, dtype=torch.long).to(out.device, non_blocking=True)] = rest_values.to(out.dtype)
    return out


@dataclass(frozen=True)
class GroupMethod:
    """How the update norms of one param group were obtained.

    Attributes:
        method: ``"optimizer"`` (reconstructed from the optimizer's state) or ``"copy"`` (parameter copy).
        reason: Why, in words (e.g. ``"AdamW (foreach)"`` or ``"torch.optim.RMSprop is not reconstructed"``).
    """

    method: str
    reason: str

    def describe(self) -> str:
        """``"method: reason"``, as written to the run info.

        Example:
            >>> GroupMethod("copy", "forced").describe()
            'copy: forced'
        """
        return f"{self.method}: {self.reason}"


@dataclass
class _Bucket:
    """Tensors of one param group whose update is reconstructed from the optimizer."""

    kind: str  # "sgd" or "adam"
    positions: list[int]
    params: list[Tensor]  # as the optimizer holds them (keys of its state)
    hyper: dict[str, Any]
    versions: list[int] | None = None  # SGD: parameter versions before the step (None for fused)
    had_grad: list[bool] | None = None  # SGD: which tensors had a gradient before the step
    steps_before: list[float] | Tensor | None = None  # Adam: step counters before the step


@dataclass
class _Pending:
    count: int
    device: torch.device
    optimizer: Any
    buckets: list[_Bucket] = field(default_factory=list)
    copy_positions: list[int] = field(default_factory=list)
    copy_params: list[Tensor] = field(default_factory=list)
    before: Snapshot | None = None


class UpdateNorms:
    """Squared L2 norm of the update one optimizer step applies to each tensor, without copying parameters.

    Call :meth:`before_step` right before ``optimizer.step()`` and :meth:`after_step` right after it (before
    ``zero_grad``: SGD without momentum and Nesterov SGD read the gradients).

    Args:
        method: ``"auto"`` (reconstruct from the optimizer where that is exact, copy elsewhere),
            ``"optimizer"`` (reconstruct, also for low-precision parameters; raises where it cannot) or
            ``"copy"`` (always copy the parameters, as :func:`gradlight.stats.snapshot` does).
        chunk_numel: Largest number of elements the reconstruction's eager kernels process at once (it bounds
            the temporary memory); ``None`` for the default described in :mod:`gradlight.update_ratio`.
        kernel: ``"auto"`` (a ``torch.compile``'d kernel per large tensor where compiling works, today's eager
            kernels elsewhere and when compiling fails), ``"fused"`` (the same, but a ``ValueError`` now if
            ``torch.compile`` is disabled or unsupported here) or ``"eager"`` (never compile).
            :attr:`kernel_info` says which ran and why.

    Raises:
        ValueError: If ``method`` is not one of :data:`METHODS`, ``kernel`` not one of :data:`KERNELS`,
            ``chunk_numel`` is not a positive integer, or ``kernel="fused"`` and ``torch.compile`` cannot run.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        >>> net(torch.ones(4, 3)).sum().backward()
        >>> updates = UpdateNorms()
        >>> before = [p.detach().clone() for p in net.parameters()]  # only to check the result here
        >>> updates.before_step(list(net.parameters()), optimizer)
        >>> optimizer.step()
        >>> exact = torch.stack([(p - b).double().square().sum() for p, b in zip(net.parameters(), before)])
        >>> bool(torch.allclose(updates.after_step(), exact, rtol=1e-4))
        True
        >>> updates.methods["0"].describe()
        'optimizer: AdamW (for-loop)'
    """

    def __init__(self, method: str = "auto", chunk_numel: int | None = None, kernel: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported: use one of {', '.join(map(repr, METHODS))}")
        if chunk_numel is not None and (not isinstance(chunk_numel, int) or chunk_numel < 1):
            raise ValueError(f"chunk_numel={chunk_numel!r} must be a positive integer (or None for the default)")
        check_kernel(kernel)
        self.method = method
        self.chunk_numel = chunk_numel
        self.kernel = kernel
        #: Which kernels the last :meth:`after_step` used: ``"fused: ..."`` or ``"eager: <why>"``
        #: (``None`` before the first); the recorder writes it to ``run.json`` as ``update_ratio_kernel``.
        self.kernel_info: str | None = None
        self._compiled: CompiledKernels | None = None
        self.methods: dict[str, GroupMethod] = {}
        self._pending: _Pending | None = None
        self._index_cache: dict[tuple[Any, ...], Tensor] = {}
        self._totals: dict[tuple[Any, ...], int] = {}

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling the fused kernels in this instance's first calls (0 if none compiled here)."""
        return self._compiled.seconds if self._compiled is not None else 0.0

    @property
    def pending(self) -> bool:
        """Whether :meth:`before_step` was called and :meth:`after_step` not yet."""
        return self._pending is not None

    def discard(self) -> None:
        """Forget a :meth:`before_step` (frees the copy, if any)."""
        self._pending = None

    @torch.no_grad()
    def before_step(self, params: Sequence[Tensor], optimizer: object, grad_scale: float = 1.0) -> None:
        """Prepare to measure the update of ``params`` by the next ``optimizer.step()``. No host sync.

        Args:
            params: The tensors whose update is wanted, as the optimizer holds them (DTensors are measured on
                their local shard); the result of :meth:`after_step` follows this order.
            optimizer: The optimizer about to step (a Lightning ``LightningOptimizer`` is unwrapped); anything
                without ``param_groups`` and ``state`` gets the copy.
            grad_scale: The AMP loss scale the gradients still carry (fused optimizers under a
                ``GradScaler``), ``1.0`` when they are unscaled.

        Raises:
            ValueError: With ``method="optimizer"``, if a tensor's update cannot be reconstructed (the message
                says why).
        """
        inner = getattr(optimizer, "_optimizer", optimizer)
        device = local_tensor(params[0]).device if params else torch.device("cpu")
        pending = _Pending(count=len(params), device=device, optimizer=inner)
        groups = getattr(inner, "param_groups", None)
        state = getattr(inner, "state", None)
        group_of: dict[int, int] = {}
        if isinstance(groups, list) and state is not None:
            for number, group in enumerate(groups):
                for param in group.get("params", ()):
                    group_of.setdefault(id(param), number)
        members: dict[int | None, list[int]] = {}
        for position, param in enumerate(params):
            members.setdefault(group_of.get(id(param)), []).append(position)
        methods: dict[str, GroupMethod] = {}
        for index, positions in members.items():
            tensors = [params[i] for i in positions]
            if index is None:
                choice = GroupMethod("copy", "not held by the optimizer")
            else:
                choice = self._choose(inner, groups[index], tensors, grad_scale)  # type: ignore[index]
            if choice.method == "copy" and self.method == "optimizer":
                raise ValueError(
                    f"method='optimizer' cannot reconstruct the update of param group {index}: {choice.reason}; "
                    "use method='auto' to copy such parameters instead"
                )
            methods[OUTSIDE if index is None else str(index)] = choice
            if choice.method == "copy":
                pending.copy_positions.extend(positions)
                pending.copy_params.extend(local_tensor(t) for t in tensors)
            else:
                pending.buckets.append(self._bucket(inner, groups[index], positions, tensors))  # type: ignore[index]
        if pending.copy_params:
            pending.before = snapshot(pending.copy_params)
        self.methods = methods
        self._pending = pending

    @torch.no_grad()
    def after_step(self) -> Tensor:
        """Squared L2 norm of each tensor's update, in float64 (float32 on MPS), on the tensors' device.

        Returns:
            One value per tensor given to :meth:`before_step`, in that order; ``0`` for a tensor the step did
            not change (no gradient, a skipped step).

        Raises:
            RuntimeError: If :meth:`before_step` was not called, or a gradient the reconstruction needs is gone.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("after_step() called without before_step(): call it right before optimizer.step()")
        self._pending = None
        wide = wide_dtype(pending.device)
        parts: list[tuple[list[int], Tensor]] = []
        if pending.before is not None:
            parts.append((pending.copy_positions, update_squares(pending.copy_params, pending.before).to(wide)))
        chunk = self._chunk(pending)
        compiled = self._fused_kernels(pending.device) if pending.buckets else None
        for bucket in pending.buckets:
            squares_of = _sgd_squares if bucket.kind == "sgd" else _adam_squares
            values = squares_of(bucket, pending.optimizer, chunk, pending.device, self._owners, compiled)
            parts.append((bucket.positions, values.to(wide)))
        if compiled is not None and pending.device.type in compiled_kernels.FAILURES:
            self.kernel_info = f"eager: {compiled_kernels.FAILURES[pending.device.type]}"
        if len(parts) == 1 and parts[0][0] == list(range(pending.count)):
            return parts[0][1]
        out = torch.zeros(pending.count, dtype=wide, device=pending.device)
        for positions, values in parts:
            out[self._index(tuple(positions), pending.device)] = values
        return out

    def _fused_kernels(self, device: torch.device) -> CompiledKernels | None:
        """The compiled kernels to use on ``device`` (``None``: eager), with :attr:`kernel_info` set."""
        if self.kernel == "eager":
            self.kernel_info = "eager: forced (kernel='eager')"
            return None
        reason = compile_unavailable(device)
        if reason is not None:
            self.kernel_info = f"eager: {reason}"
            return None
        if self._compiled is None:
            self._compiled = CompiledKernels()
        backend = "Triton" if device.type == "cuda" else "Inductor C++"
        self.kernel_info = f"fused: torch.compile ({backend}) on {device.type}"
        return self._compiled

    # ------------------------------------------------------------------------------------------- choice
    def _choose(
        self, optimizer: object, group: dict[str, Any], tensors: list[Tensor], grad_scale: float
    ) -> GroupMethod:
        if self.method == "copy":
            return GroupMethod("copy", "forced (method='copy')")
        kind = type(optimizer)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if kind is torch.optim.SGD:
            label = "SGD"
        elif kind in (torch.optim.Adam, torch.optim.AdamW):
            label = kind.__name__
        else:
            return GroupMethod("copy", f"{name} is not reconstructed")
        locals_ = [local_tensor(t) for t in tensors]
        for key in ("lr", "weight_decay", "betas", "momentum"):
            value = group.get(key)
            if isinstance(value, Tensor) or (isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value)):
                return GroupMethod("copy", f"a tensor {key}")
        if group.get("differentiable"):
            return GroupMethod("copy", "differentiable=True")
        if any(t.is_complex() for t in locals_):
            return GroupMethod("copy", "complex parameters")
        if any(t.grad is not None and t.grad.is_sparse for t in tensors):
            return GroupMethod("copy", "sparse gradients")
        lr, decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        if lr * decay >= 1.0:
            return GroupMethod("copy", f"lr * weight_decay = {lr * decay:g} >= 1")
        low = sorted({str(t.dtype) for t in locals_ if t.dtype not in _FULL_PRECISION})
        if low and self.method == "auto":
            return GroupMethod("copy", f"{', '.join(low)} parameters: rounding can swallow an update")
        impl = "fused" if group.get("fused") else "foreach" if _uses_foreach(group, locals_) else "for-loop"
        if label == "SGD":
            if grad_scale != 1.0:
                return GroupMethod(
                    "copy", "SGD with gradients still carrying an AMP scale (a skipped step is invisible)"
                )
            return GroupMethod("optimizer", f"SGD ({impl})")
        if group.get("capturable") and any(t.device.type == "cpu" for t in locals_):
            return GroupMethod("copy", "capturable=True on CPU")
        return GroupMethod("optimizer", f"{label} ({impl})")

    def _bucket(self, optimizer: Any, group: dict[str, Any], positions: list[int], tensors: list[Tensor]) -> _Bucket:
        if type(optimizer) is torch.optim.SGD:
            hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
            versions = None if group.get("fused") else [t._version for t in tensors]
            had_grad = [t.grad is not None for t in tensors]
            return _Bucket("sgd", positions, tensors, hyper, versions=versions, had_grad=had_grad)
        beta1, beta2 = group["betas"]
        decoupled = decouples_weight_decay(optimizer, group)
        hyper = {
            "lr": float(group["lr"]),
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "decoupled": decoupled,
            "amsgrad": bool(group["amsgrad"]),
        }
        steps = [optimizer.state.get(t, {}).get("step") for t in tensors]  # .get: no entry added to the state
        return _Bucket("adam", positions, tensors, hyper, steps_before=_read_steps(steps, tensors))

    # ------------------------------------------------------------------------------------------ helpers
    def _chunk(self, pending: _Pending) -> int:
        if self.chunk_numel is not None:
            return self.chunk_numel
        key = (id(pending.optimizer), pending.count, tuple(len(b.params) for b in pending.buckets))
        total = self._totals.get(key)  # the same every logged step: summed once (256 tensors: ~0.5 ms each time)
        if total is None:
            if len(self._totals) > 16:
                self._totals.clear()
            total = self._totals[key] = sum(local_tensor(t).numel() for b in pending.buckets for t in b.params)
        share = math.ceil(total / _CHUNK_FRACTION)
        if pending.device.type == "cpu":
            return max(_CHUNK_MIN, min(_CPU_CHUNK_MAX, share))
        return max(_CPU_CHUNK_MAX, share)

    def _index(self, positions: tuple[Any, ...], device: torch.device) -> Tensor:
        key = (device, positions)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            values = [p for p in positions if isinstance(p, int)]
            cached = self._index_cache[key] = torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
        return cached

    def _owners(self, owners: list[int], device: torch.device) -> Tensor:
        return self._index(("owners", *owners), device)


def _uses_foreach(group: dict[str, Any], tensors: list[Tensor]) -> bool:
    """Whether torch picks its foreach implementation for the group (its default on accelerators)."""
    foreach = group.get("foreach")
    if foreach is not None:
        return bool(foreach)
    return any(t.device.type != "cpu" for t in tensors)


def _read_steps(steps: Sequence[Tensor | None], tensors: Sequence[Tensor]) -> list[float] | Tensor:
    """Adam's step counters: host floats when they live on the CPU, else one device vector (no sync)."""
    present = [s for s in steps if s is not None]
    if not present or all(s.device.type == "cpu" for s in present):
        return _host_values(steps)
    device = present[0].device
    zero = torch.zeros((), dtype=present[0].dtype, device=device)
    return torch.stack([s if s is not None else zero for s in steps]).to(torch.float64)


def _host_values(steps: Sequence[Tensor | None]) -> list[float]:
    """Values of CPU step counters (``0`` where there is none), read at once."""
    present = [s for s in steps if s is not None]
    values = iter(torch.stack(present).tolist() if present else [])
    return [next(values) if s is not None else 0.0 for s in steps]


Kernel = Callable[[list[list[Tensor]], list[int]], list[Tensor]]


def _piece_norms(
    lists: Sequence[Sequence[Tensor]], chunk: int, kernel: Kernel, device: torch.device, owners_index: Any
) -> Tensor:
    """Squared L2 norms per tensor of ``kernel``'s outputs, computed over pieces of at most ``chunk`` elements.

    ``lists`` holds aligned tensor lists (e.g. parameters, first and second moments). Tensors above ``chunk``
    elements are cut into aligned flat slices (views); batches of pieces of at most ``chunk`` elements go to
    ``kernel(piece_lists, owners)``, which returns one float32 norm per piece.
    """
    count = len(lists[0])
    if not count:
        return torch.zeros(0, dtype=wide_dtype(device), device=device)
    norms: list[Tensor] = []
    owners: list[int] = []
    batch: list[list[Tensor]] = [[] for _ in lists]
    batch_owners: list[int] = []
    filled = 0

    def flush() -> None:
        nonlocal filled
        if batch_owners:
            norms.extend(kernel([list(b) for b in batch], list(batch_owners)))
            owners.extend(batch_owners)
        for b in batch:
            b.clear()
        batch_owners.clear()
        filled = 0

    for i in range(count):
        tensors = [lst[i] for lst in lists]
        numel = tensors[0].numel()
        if numel > chunk and all(t.is_contiguous() for t in tensors):
            flats = [t.view(-1) for t in tensors]
            pieces = [[f[start : start + chunk] for f in flats] for start in range(0, numel, chunk)]
        else:
            pieces = [tensors]
        for piece in pieces:
            size = piece[0].numel()
            if filled and filled + size > chunk:
                flush()
            for b, t in zip(batch, piece):
                b.append(t)
            batch_owners.append(i)
            filled += size
    flush()
    piece_sq = squares(torch.stack(norms).float())
    if owners == list(range(count)):
        return piece_sq
    out = torch.zeros(count, dtype=piece_sq.dtype, device=piece_sq.device)
    return out.index_add_(0, owners_index(owners, piece_sq.device), piece_sq)


def _per_tensor(device: torch.device) -> bool:
    """Whether large pieces run tensor by tensor into reused buffers (CPU) instead of as multi-tensor kernels.

    On CPU the ``_foreach`` kernels loop over the tensors anyway, and every fresh temporary above the
    allocator's mmap threshold costs page faults; on accelerators the caching allocator makes them free.
    """
    return device.type == "cpu"


class _Scratch:
    """Reused flat buffers of ``chunk`` elements (CPU: a fresh large allocation costs page faults every time)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.buffers: dict[tuple[int, torch.dtype], Tensor] = {}

    def take(self, slot: int, like: Tensor) -> Tensor:
        """Buffer ``slot`` shaped like ``like`` (at most ``chunk`` elements, else a new tensor)."""
        if like.numel() > self.chunk:  # a non-contiguous tensor that could not be sliced
            return torch.empty_like(like)
        key = (slot, like.dtype)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = torch.empty(self.chunk, dtype=like.dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)


def _norm(tensor: Tensor) -> Tensor:
    """Float32-accumulated L2 norm of one tensor."""
    low = tensor.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(tensor, dtype=torch.float32 if low else None)


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Float32-accumulated L2 norm of each tensor, one fused kernel."""
    low = tensors[0].dtype in (torch.float16, torch.bfloat16)
    return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32 if low else None))


def _sgd_squares(
    bucket: _Bucket,
    optimizer: Any,
    chunk: int,
    device: torch.device,
    owners_index: Any,
    compiled: CompiledKernels | None = None,
) -> Tensor:
    """Squared norms of SGD's steps (see the module docstring for the algebra)."""
    hyper = bucket.hyper
    lr, momentum, decay = float(hyper["lr"]), float(hyper["momentum"]), float(hyper["weight_decay"])
    nesterov, sign = bool(hyper["nesterov"]), -1.0 if hyper["maximize"] else 1.0
    # A tensor the step did not touch (no gradient; a skipped step, seen by its version counter): 0
    stepped = [i for i, had in enumerate(bucket.had_grad or ()) if had]
    if bucket.versions is not None:
        stepped = [i for i in stepped if bucket.params[i]._version != bucket.versions[i]]
    params = [bucket.params[i] for i in stepped]
    result = torch.zeros(len(bucket.params), dtype=wide_dtype(device), device=device)
    if not params:
        return result
    if momentum != 0.0 and not nesterov:  # the step is -lr * buf: its norm, no temporary, so no pieces either
        bufs = [local_tensor(optimizer.state[p]["momentum_buffer"]) for p in params]
        values = _whole_norms(bufs, device) * lr**2
    else:
        grads = []
        for p in params:
            if p.grad is None:
                raise RuntimeError("a gradient was freed between optimizer.step() and after_step(): call it first")
            grads.append(local_tensor(p.grad))
        lists = [grads, [local_tensor(p) for p in params]]
        if nesterov:
            lists.append([local_tensor(optimizer.state[p]["momentum_buffer"]) for p in params])
        coefficients = (sign * decay, sign * momentum)
        values = _sgd_linear(lists, coefficients, chunk, device, owners_index, compiled)
        values = values * (lr / (1.0 - lr * decay)) ** 2
    if len(params) == len(bucket.params):
        return values
    result[torch.tensor(list(stepped), dtype=torch.long).to(device, non_blocking=True)] = values.to(result.dtype)
    return result


def _sgd_linear(
    lists: list[list[Tensor]],
    coefficients: tuple[float, float],
    chunk: int,
    device: torch.device,
    owners_index: Any,
    compiled: CompiledKernels | None,
) -> Tensor:
    """``||g + a*p [+ b*buf]||**2`` per tensor (``lists``: gradients, parameters[, momentum buffers]).

    Tensors the fused kernels take (:func:`_fusable`) run one compiled kernel each, the others (and all of them
    when compiling fails) the eager kernels of :func:`_sgd_eager`.
    """
    decay, momentum = coefficients
    if decay == 0.0 and len(lists) == 2:  # plain SGD: the gradient's norm, one pass without temporaries
        return _whole_norms(lists[0], device)
    fast = _fusable(lists) if compiled is not None else []
    if fast and compiled is not None:
        if len(lists) == 3 and decay != 0.0:
            name, operands, scalars = "linear3", lists, [[decay] * len(lists[0]), [momentum] * len(lists[0])]
        elif len(lists) == 3:
            name, operands, scalars = "linear", [lists[0], lists[2]], [[momentum] * len(lists[0])]
        else:
            name, operands, scalars = "linear", lists, [[decay] * len(lists[0])]
        coefs = _coefficients(scalars, fast, device)
        calls = [(*(lst[i].view(-1) for lst in operands), c) for i, c in zip(fast, coefs)]
        sums = compiled.run(name, calls, device)
        if sums is not None:
            rest = sorted(set(range(len(lists[0]))) - set(fast))
            others = [[lst[i] for i in rest] for lst in lists]
            rest_values = _sgd_eager(others, coefficients, chunk, device, owners_index) if rest else None
            return _merge(len(lists[0]), fast, torch.stack(sums), rest_values)
    return _sgd_eager(lists, coefficients, chunk, device, owners_index)


def _whole_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Squared norms of whole tensors (a norm needs no temporary: one multi-tensor kernel, no pieces)."""
    if not tensors:
        return torch.zeros(0, dtype=wide_dtype(device), device=device)
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        return squares(torch.stack([_norm(t).to(device) for t in tensors]).float())
    return squares(torch.stack(_norms(tensors)).float().to(device))


def _sgd_eager(
    lists: list[list[Tensor]], coefficients: tuple[float, float], chunk: int, device: torch.device, owners_index: Any
) -> Tensor:
    """``||g + a*p [+ b*buf]||**2`` per tensor with eager kernels over pieces of at most ``chunk`` elements."""
    decay, momentum = coefficients
    nesterov = len(lists) == 3
    scratch = _Scratch(chunk)

    def kernel(pieces: list[list[Tensor]], _: list[int]) -> list[Tensor]:
        if decay == 0.0 and not nesterov:
            return _norms(pieces[0])
        if _per_tensor(device) and any(t.numel() > _SCRATCH_MIN_NUMEL for t in pieces[0]):  # see _adam_eager
            norms = []
            for i, grad in enumerate(pieces[0]):
                z = scratch.take(0, grad).copy_(grad)
                if decay != 0.0:  # sign * (g' + wd * p) = g + sign * wd * p
                    z.add_(pieces[1][i], alpha=decay)
                if nesterov:
                    z.add_(pieces[2][i], alpha=momentum)
                norms.append(_norm(z))
            return norms
        if decay != 0.0:
            zs = list(torch._foreach_add(pieces[0], pieces[1], alpha=decay))
            if nesterov:
                torch._foreach_add_(zs, pieces[2], alpha=momentum)
        else:
            zs = list(torch._foreach_add(pieces[0], pieces[2], alpha=momentum))
        return _norms(zs)

    return _piece_norms(lists, chunk, kernel, device, owners_index)


def _adam_squares(
    bucket: _Bucket,
    optimizer: Any,
    chunk: int,
    device: torch.device,
    owners_index: Any,
    compiled: CompiledKernels | None = None,
) -> Tensor:
    """Squared norms of Adam's / AdamW's steps (see the module docstring for the algebra)."""
    hyper = bucket.hyper
    lr, beta1, beta2, eps = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"]
    decay = hyper["weight_decay"] if hyper["decoupled"] else 0.0
    states = [optimizer.state.get(p, {}) for p in bucket.params]
    held = [i for i, s in enumerate(states) if "exp_avg" in s]  # the others were never stepped: 0
    result = torch.zeros(len(bucket.params), dtype=wide_dtype(device), device=device)
    if not held:
        return result
    second = "max_exp_avg_sq" if hyper["amsgrad"] else "exp_avg_sq"
    moments = [local_tensor(states[i]["exp_avg"]) for i in held]
    variances = [local_tensor(states[i][second]) for i in held]
    params = [local_tensor(bucket.params[i]) for i in held]
    before = bucket.steps_before
    if isinstance(before, list):  # host counters: host scalars, the multi-tensor kernels' fast path
        after = _host_values([states[i]["step"] for i in held])
        advanced = [a > before[i] for a, i in zip(after, held)]
        c2 = [math.sqrt(1.0 - beta2**s) for s in after]
        step_size = [lr / (1.0 - beta1**s) for s in after]
        # ||step|| = step_size * c2 * ||m / (sqrt(v) + eps*c2) + alpha * p_new|| / (1 - lr*wd), with
        # alpha = lr*wd / (step_size * c2) = wd * (1 - beta1**s) / c2 (lr cancels: no division by a zero lr)
        add: list[Any] = [eps * c for c in c2]
        alpha: list[Any] = [decay * (1.0 - beta1**s) / c for s, c in zip(after, c2)]
        scale: Any = [s * c / (1.0 - lr * decay) if ok else 0.0 for s, c, ok in zip(step_size, c2, advanced)]
    else:  # counters on the device (fused or capturable on an accelerator): device scalars, no host sync
        steps = torch.stack([local_tensor(states[i]["step"]) for i in held]).to(torch.float64)
        assert before is not None  # set by before_step for every Adam bucket
        moved = steps > before[torch.tensor(held, dtype=torch.long).to(steps.device, non_blocking=True)]
        c2_t = (1.0 - beta2**steps).sqrt()
        size_t = lr / (1.0 - beta1**steps)
        add = list((eps * c2_t).unbind())
        alpha = list((decay * (1.0 - beta1**steps) / c2_t).unbind())
        scale = size_t * c2_t / (1.0 - lr * decay) * moved
    lists = [moments, variances, params]
    values = _adam_fused(lists, (add, alpha, scale), decay, chunk, device, owners_index, compiled)
    if values is None:
        values = _adam_eager(lists, (add, alpha, scale), decay, chunk, device, owners_index)
    if len(held) == len(bucket.params):
        return values
    result[torch.tensor(held, dtype=torch.long).to(device, non_blocking=True)] = values
    return result


def _adam_fused(
    lists: list[list[Tensor]],
    factors: tuple[list[Any], list[Any], Any],
    decay: float,
    chunk: int,
    device: torch.device,
    owners_index: Any,
    compiled: CompiledKernels | None,
) -> Tensor | None:
    """Adam's squared step norms, one compiled kernel per tensor :func:`_fusable` takes (eager for the rest).

    ``factors`` are :func:`_adam_eager`'s. ``None`` when no tensor qualifies or compiling fails.
    """
    fast = _fusable(lists) if compiled is not None else []
    if not fast or compiled is None:
        return None
    add, alpha, scale = factors
    calls = [(*(lst[i].view(-1) for lst in lists), c) for i, c in zip(fast, _coefficients([add, alpha], fast, device))]
    sums = compiled.run("adam", calls, device)
    if sums is None:
        return None
    if isinstance(scale, list):  # host factors: one multi-tensor kernel on the 0-d sums, no host-to-device copy
        fast_values = torch.stack(list(torch._foreach_mul(sums, [scale[i] ** 2 for i in fast])))
    else:
        fast_values = torch.stack(sums) * _pick(scale, fast).square()
    rest = sorted(set(range(len(lists[0]))) - set(fast))
    rest_values = None
    if rest:
        rest_factors = (_pick(add, rest), _pick(alpha, rest), _pick(scale, rest))
        rest_values = _adam_eager(
            [[lst[i] for i in rest] for lst in lists], rest_factors, decay, chunk, device, owners_index
        )
    return _merge(len(lists[0]), fast, fast_values, rest_values)


def _adam_eager(
    lists: list[list[Tensor]],
    factors: tuple[list[Any], list[Any], Any],
    decay: float,
    chunk: int,
    device: torch.device,
    owners_index: Any,
) -> Tensor:
    """Adam's squared step norms with eager kernels over pieces of at most ``chunk`` elements.

    ``lists`` are the first moments, second moments and parameters; ``factors`` the per-tensor ``add``
    (``eps * c2``), ``alpha`` (the weight decay term's factor) and ``scale`` (the step's factor: a host list,
    or a device vector) of :func:`_adam_squares`.
    """
    add, alpha, scale = factors
    on_cpu = _per_tensor(device)
    scratch = _Scratch(chunk)

    def kernel(pieces: list[list[Tensor]], owners: list[int]) -> list[Tensor]:
        m, v, p = pieces
        if on_cpu and any(t.numel() > _SCRATCH_MIN_NUMEL for t in v):  # tensor by tensor into reused buffers
            norms = []
            for j, moment, variance, param in zip(owners, m, v, p):
                denom = torch.sqrt(variance, out=scratch.take(0, variance)).add_(add[j])
                if decay == 0.0:
                    out = torch.div(moment, denom, out=denom)
                else:
                    out = torch.mul(param, alpha[j], out=scratch.take(1, param)).addcdiv_(moment, denom)
                norms.append(_norm(out))
            return norms
        denoms = list(torch._foreach_sqrt(v))
        torch._foreach_add_(denoms, [add[j] for j in owners])
        if decay == 0.0:  # m / denom, in place: one temporary
            torch._foreach_reciprocal_(denoms)
            torch._foreach_mul_(denoms, m)
            outs = denoms
        else:  # alpha * p + m / denom: two temporaries
            outs = list(torch._foreach_mul(p, [alpha[j] for j in owners]))
            torch._foreach_addcdiv_(outs, m, denoms)
        fused = _norms(outs)
        if isinstance(scale, list) and not on_cpu:  # host factors: one fused kernel on the 0-d norms, no H2D copy
            return list(torch._foreach_mul(fused, [scale[j] for j in owners]))
        return fused

    values = _piece_norms(lists, chunk, kernel, device, owners_index)
    if not isinstance(scale, list):
        return values * scale.square().to(values.dtype)
    if on_cpu:
        return values * torch.tensor(scale, dtype=values.dtype).square()
    return values
