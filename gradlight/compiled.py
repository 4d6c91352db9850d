"""The ``torch.compile``'d one-pass kernels: the update ratio's reconstruction and the gradient statistics.

Each kernel reads its tensors once and returns float64 sums (and, for gradients, the largest magnitude), with
no temporary: Inductor's C++ on CPU where a C++ compiler is on the PATH, Triton on CUDA. They are compiled on
first use with dynamic shapes on flat 1-D views, so one compilation per kernel and dtype serves every tensor
size. Where compiling is unavailable (:func:`compile_unavailable`) or fails (warned about once, then not
retried in the process: :data:`FAILURES`), callers take their eager kernels. The users:
:class:`gradlight.update_ratio.UpdateNorms` (the update ratio) and :func:`gradlight.stats.gradient_statistics`
through :class:`GradientKernel`.

Example:
    >>> check_kernel("eager")
    >>> GradientKernel("eager")([torch.ones(3)]) is None
    True
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "BATCH",
    "FAILURES",
    "FUNCTIONS",
    "FUSED_DEVICES",
    "FUSED_DTYPES",
    "KERNELS",
    "CompiledKernels",
    "GradientKernel",
    "check_kernel",
    "compile_unavailable",
]

#: Accepted values of ``kernel=`` (``UpdateNorms``, ``GradientKernel``, the recorder's ``update_kernel``).
KERNELS = ("auto", "fused", "eager")
#: Devices with a compiled kernel.
FUSED_DEVICES = ("cpu", "cuda")
#: Dtypes the compiled kernels take (each sums in float64; half precision keeps the eager kernels).
FUSED_DTYPES = (torch.float32, torch.float64)
#: Device type -> why compiling failed there: not retried in this process (a failing compile can take a minute).
FAILURES: dict[str, str] = {}


def _adam_sum(m: Tensor, v: Tensor, p: Tensor, coef: Tensor) -> Tensor:
    """``sum((m / (sqrt(v) + coef[0]) + coef[1] * p) ** 2)``, accumulated in float64: one pass once compiled.

    Scalars come in a 1-D tensor: a 0-d one would be read on the host (a sync on an accelerator), a Python
    float would be compiled in as a constant.
    """
    r = (m / (v.sqrt() + coef[0]) + coef[1] * p).to(torch.float64)
    return (r * r).sum()


def _linear_sum(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    """``sum((a + coef[0] * b) ** 2)``, accumulated in float64."""
    r = (a + coef[0] * b).to(torch.float64)
    return (r * r).sum()


def _linear3_sum(a: Tensor, b: Tensor, c: Tensor, coef: Tensor) -> Tensor:
    """``sum((a + coef[0] * b + coef[1] * c) ** 2)``, accumulated in float64."""
    r = (a + coef[0] * b + coef[1] * c).to(torch.float64)
    return (r * r).sum()


def _gradient_stats(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(g ** 2), max |g|)`` of a flat gradient, the sum accumulated in float64: one pass once compiled.

    NaN propagates to both (as in the eager ``vector_norm`` / ``aminmax``), an infinity makes both infinite.
    """
    wide = g.to(torch.float64)
    return (wide * wide).sum(), g.abs().amax()


#: The kernels by name, as :meth:`CompiledKernels.run` takes them.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "adam": _adam_sum,
    "linear": _linear_sum,
    "linear3": _linear3_sum,
    "gradient": _gradient_stats,
}


def _compiler_disabled() -> str | None:
    """Why ``torch.compile`` cannot run in this process at all, or ``None``."""
    if os.environ.get("TORCH_COMPILE_DISABLE", "0") not in ("", "0"):
        return "torch.compile is disabled (TORCH_COMPILE_DISABLE)"
    try:
        import torch._dynamo as dynamo
    except Exception as error:  # any import failure means: no compiler
        return f"torch._dynamo cannot be imported ({type(error).__name__}: {error})"
    if dynamo.config.disable:
        return "torch.compile is disabled (torch._dynamo.config.disable)"
    if not _dynamo_supported():
        return "torch.compile is not supported on this Python / platform"
    return None


@functools.lru_cache(maxsize=1)
def _dynamo_supported() -> bool:
    """``torch._dynamo.is_dynamo_supported()``, asked once per process (it does not change; ~0.5 ms a call)."""
    import torch._dynamo as dynamo

    return bool(dynamo.is_dynamo_supported())


@functools.lru_cache(maxsize=4)
def _has_cxx(cxx: str) -> bool:
    """Whether a C++ compiler is on the PATH (looked up once per ``$CXX`` value)."""
    return any(shutil.which(name) for name in (cxx, "g++", "clang++") if name)


def compile_unavailable(device: torch.device) -> str | None:
    """Why the fused kernels cannot run for ``device`` now, or ``None`` when they can be tried.

    Besides the device and the compiler, an active ``TorchDispatchMode`` (a profiler, a memory tracker) rules
    them out: compiled code would run under it op by op, with full-size temporaries.

    Example:
        >>> compile_unavailable(torch.device("meta"))
        'no fused kernel for meta tensors'
    """
    if device.type not in FUSED_DEVICES:
        return f"no fused kernel for {device.type} tensors"
    reason = _compiler_disabled()
    if reason is not None:
        return reason
    if device.type == "cpu" and not _has_cxx(os.environ.get("CXX", "")):
        return "no C++ compiler for Inductor's CPU kernels (g++, clang++ or $CXX)"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
    failure = FAILURES.get(device.type)
    if failure is None and _get_current_dispatch_mode() is not None:
        return "a TorchDispatchMode is active (compiled code would run op by op, with full-size temporaries)"
    return failure


#: Argument tuples per compiled call. Each call of a compiled function pays a fixed cost (Dynamo's guards,
#: AOTAutograd's and Inductor's wrappers: ~60 µs on CPU whatever the tensor's size), so :meth:`CompiledKernels.run`
#: hands a kernel this many tensors at once (the last batch padded with two-element dummies): on GPT-2 7M's 18
#: fused tensors that is 3 calls instead of 18. Larger batches compile longer (more loops in one kernel).
BATCH = 8


@functools.lru_cache(maxsize=16)
def _batched(function: Callable[..., Any], name: str) -> Callable[..., list[Any]]:
    """``function`` over :data:`BATCH` argument tuples at once: ``many([a0, a1, ...], [b0, b1, ...])``.

    Each kernel's wrapper gets a code object of its own (named after the kernel): Dynamo keeps its compiled
    variants per code object, up to ``recompile_limit`` (8), and the four kernels in two dtypes would otherwise
    share that budget. Made once per kernel (cached): every :class:`CompiledKernels` then finds the variants
    compiled before it.
    """

    def many(*columns: list[Tensor]) -> list[Any]:
        return [function(*args) for args in zip(*columns)]

    many.__code__ = many.__code__.replace(co_name=f"batched_{name}")
    return many


def _distinct_sizes() -> Any:
    """A context in which Dynamo gives every input size its own symbol (no "duck" sizing).

    With duck sizing, two tensors of one batch that happen to share a size when it is traced share a symbol, and
    a later batch where they differ recompiles. Older torch without the switch keeps duck sizing.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    if not hasattr(fx_config, "use_duck_shape"):  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]


class CompiledKernels:
    """One :class:`UpdateNorms`' ``torch.compile``'d kernels (compiled code is shared by the whole process).

    ``dynamic=True`` and flat 1-D inputs: one compilation per kernel and dtype serves every tensor size (the
    benchmark and a test count them). Each compiled function takes :data:`BATCH` tensors per call. The first call
    of each kernel and dtype compiles; :attr:`seconds` adds up those calls' time.
    """

    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., list[Any]]] = {}
        self.first_calls: set[tuple[str, torch.dtype, str]] = set()
        self.seconds = 0.0
        self._dummies: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}

    def run(self, name: str, calls: list[tuple[Tensor, ...]], device: torch.device) -> list[Any] | None:
        """``name``'s kernel on each argument tuple; ``None`` if compiling fails (recorded for ``device``)."""
        try:
            function = self.functions.get(name)
            if function is None:
                function = self.functions[name] = torch.compile(_batched(FUNCTIONS[name], name), dynamic=True)
            out: list[Any] = [None] * len(calls)
            for positions in _by_dtypes(calls):
                for start in range(0, len(positions), BATCH):
                    chosen = positions[start : start + BATCH]
                    results = self._call(name, function, [calls[i] for i in chosen], device)
                    for position, result in zip(chosen, results):
                        out[position] = result
            return out
        except Exception as error:  # whatever breaks the compiler: eager kernels still work
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            FAILURES[device.type] = f"torch.compile failed ({type(error).__name__}: {message})"
            warnings.warn(
                f"gradlight: the fused kernels (update ratio, gradient statistics) could not be compiled on "
                f"{device.type}; using the eager kernels instead ({FAILURES[device.type]})",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    def _call(
        self, name: str, function: Callable[..., list[Any]], calls: list[tuple[Tensor, ...]], device: torch.device
    ) -> list[Any]:
        """One compiled call on up to :data:`BATCH` argument tuples of one dtype signature (padded with dummies)."""
        padded = calls + [self._dummy(calls[0], slot) for slot in range(len(calls), BATCH)]
        columns = [list(column) for column in zip(*padded)]
        key = (name, calls[0][0].dtype, device.type)
        if key in self.first_calls:
            return function(*columns)[: len(calls)]
        start = time.perf_counter()
        with _distinct_sizes():
            results = function(*columns)[: len(calls)]
        self.seconds += time.perf_counter() - start
        self.first_calls.add(key)
        return results

    def _dummy(self, like: tuple[Tensor, ...], slot: int) -> tuple[Tensor, ...]:
        """Stand-ins for the arguments ``like``, one set per batch slot.

        Two elements each, or the argument's own shape when it has fewer (a one-element scalar vector is
        specialised on). Each is a distinct tensor: Dynamo guards on inputs that are the same object.
        """
        shapes = [tuple(t.shape) if t.numel() <= 2 else (2,) for t in like]
        key = (slot, *((t.dtype, t.device, shape) for t, shape in zip(like, shapes)))
        dummy = self._dummies.get(key)
        if dummy is None:
            dummy = tuple(torch.ones(shape, dtype=t.dtype, device=t.device) for t, shape in zip(like, shapes))
            self._dummies[key] = dummy
        return dummy


def _by_dtypes(calls: Sequence[tuple[Tensor, ...]]) -> list[list[int]]:
    """Positions of ``calls`` grouped by their arguments' dtypes (each group compiles once), in order."""
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for position, args in enumerate(calls):
        groups.setdefault(tuple(t.dtype for t in args), []).append(position)
    return list(groups.values())


class GradientKernel:
    """The one-pass gradient statistics: a float64 sum of squares and the largest magnitude per tensor.

    Compiled like the update-ratio kernels: same availability checks, same fallback, same ``kernel`` setting.
    :func:`gradlight.stats.gradient_statistics` calls it with the large gradients (see
    :data:`gradlight.stats.FUSED_STATS_MIN_NUMEL`); a ``None`` answer means "take the eager kernels" (``"eager"``,
    no compiler, a failed compilation, which is warned about once and not retried in the process).

    Args:
        kernel: ``"auto"``/``"fused"`` compile on first use, ``"eager"`` never (checked by :func:`check_kernel`).

    Example:
        >>> grads = [torch.tensor([3.0, -4.0])]
        >>> GradientKernel("eager")(grads) is None
        True
    """

    def __init__(self, kernel: str = "auto") -> None:
        check_kernel(kernel)
        self.kernel = kernel
        self._compiled: CompiledKernels | None = None

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling in this instance's first calls (0 if nothing compiled here)."""
        return self._compiled.seconds if self._compiled is not None else 0.0

    def __call__(self, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
        """``(float64 sums of squares, float32 largest magnitudes)`` of contiguous ``tensors`` on one device."""
        if self.kernel == "eager" or not tensors:
            return None
        device = tensors[0].device
        if compile_unavailable(device) is not None:
            return None
        if self._compiled is None:
            self._compiled = CompiledKernels()
        out = self._compiled.run("gradient", [(t.view(-1),) for t in tensors], device)
        if out is None:
            return None
        return torch.stack([sq for sq, _ in out]), torch.stack([top for _, top in out]).float()


def check_kernel(kernel: object) -> None:
    """Raise a ``ValueError`` naming ``kernel`` unless it is one of :data:`KERNELS` (and compilable if forced).

    Example:
        >>> check_kernel("eager")
        >>> check_kernel("fast")
        Traceback (most recent call last):
        ...
        ValueError: kernel='fast' is not supported: use one of 'auto', 'fused', 'eager'
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not supported: use one of {', '.join(map(repr, KERNELS))}")
    if kernel == "fused":
        reason = _compiler_disabled()
        if reason is not None:
            raise ValueError(f"kernel='fused' needs torch.compile, but {reason}: use kernel='auto' or 'eager'")
