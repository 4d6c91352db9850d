"""One command that checks the monitor's GPU path: exact, sync-free, few kernels, cheap.

    python benchmarks/gpu_check.py                  # CUDA if available (a few minutes on one GPU), else CPU
    python benchmarks/gpu_check.py --device cpu     # the same checks on CPU at a reduced size (~1 min)

What runs in the monitor's hooks on a logged step is :class:`gradlight.tracker.GradientFlowTracker`'s
``capture`` (before the optimizer step) and ``finalize`` (after it); this script drives them directly, two
ways: ``default`` (as shipped: the update ratio reconstructed from AdamW's state, no parameter copy) and
``copy`` (``update_method="copy"``: the parameters copied before the step). Checks (each prints
``PASS``/``FAIL``; the exit status is 1 if any fails):

- ``stats/<precision>``: per-layer ``grad_l2``, ``grad_max_abs``, ``param_l2`` and ``update_ratio`` (default
  and copy) of a GPT-2 trained one step on the device equal a float64 CPU reference computed from the same
  gradients and parameters, for ``fp32``, ``bf16-mixed`` (autocast) and ``16-mixed`` (fp16 autocast, a
  ``GradScaler`` and a fused AdamW, which leaves the scale in the gradients), to 1e-4 (1e-3 for update ratios).
- ``sync``: no synchronising call inside capture and finalize but the one device-to-host copy:
  ``torch.cuda.set_sync_debug_mode("warn")`` must warn exactly once. On CPU, where there is no device to
  wait for, the same property is that no tensor value is read on the host one at a time
  (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``): it must be called zero times.
- ``launches``: kernels launched by capture + finalize (torch profiler) for two GPT-2 depths with
  different tensor counts: on CUDA the extra tensors may cost at most 0.1 launch each (fused multi-tensor
  kernels per device and dtype group, not one per tensor), checked on ``copy``. On CPU, where the tracker
  deliberately takes every statistic tensor by tensor while it is in cache, the limit is 8 operators per
  extra tensor, for both. On CUDA the default's count is printed (informational until a GPU run has judged
  it): its kernels run over pieces of the optimizer state, so their number follows the parameter count
  divided by the piece size, and fused Adam's device-side step counters take per-tensor scalars.
- ``memory``: peak memory a logged step adds (CUDA: ``torch.cuda.max_memory_allocated``; CPU: tensors
  created inside the hooks and alive at once, counted with a ``TorchDispatchMode``), as a share of the
  parameter bytes: the default must add at most 5%; the copy's share is printed.
- ``fused/<optimizer>``: the update norms of the compiled (fused) reconstruction equal the eager kernels' to
  1e-5, for AdamW (foreach and fused) and Nesterov SGD with weight decay, on a GPT-2 one step into training;
  it fails if the fused kernels did not run (``kernel_info`` says why, e.g. a compile failure), and prints
  the compile time and both reconstructions' time (CUDA: Triton kernels; CPU: Inductor's C++).
- ``overhead`` (printed, no pass/fail): the tracker's in-hook time against the training step, every step
  and amortised over the default interval of 50 steps, on yolo11n at 640 px (batch 16) and GPT-2 124M (batch
  8 x 512) on CUDA, or yolo11n at 128 px (batch 2) and a 1M-parameter GPT-2 (batch 4 x 64) on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradlight.memory import LiveBytes
from gradlight.tracker import GradientFlowTracker
from gradlight.update_ratio import UpdateNorms

#: The two ways a logged step is driven: label -> ``update_method`` of the tracker.
METHODS = {"default": "auto", "copy": "copy"}

PRECISIONS = ("fp32", "bf16-mixed", "16-mixed")
CHECKS = ("stats", "sync", "launches", "memory", "fused", "overhead")
STAT_RTOL, RATIO_RTOL = 1e-4, 1e-3


@dataclass
class Check:
    """One line of the report: a check's name, whether it passed (``None``: informational) and its detail."""

    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "INFO"}[self.passed]
        return f"{status:4}  {self.name:22} {self.detail}"


# ---------------------------------------------------------------------------------------------------- models
def gpt2(device: torch.device, n_layer: int, n_embd: int, vocab: int, positions: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64)
    )
    return GPT2LMHeadModel(config).to(device).train()


def gpt2_batch(model: nn.Module, batch: int, tokens: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size  # type: ignore[union-attr]
    return torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)


def gpt2_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_of(name: str) -> str:
    """The tracker's default layer: the module that owns the parameter (independent re-implementation)."""
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


# ---------------------------------------------------------------------------------------------------- checks
def check_statistics(device: torch.device, precision: str, small: bool) -> Check:
    """Per-layer statistics of the device path against a float64 CPU reference, one training step."""
    model = gpt2(device, n_layer=2, n_embd=64 if small else 256, vocab=512 if small else 8192, positions=64)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    fused = precision == "16-mixed"
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12) if precision == "16-mixed" else None
    trackers = {label: GradientFlowTracker(model, update_method=method) for label, method in METHODS.items()}
    tokens = gpt2_batch(model, 4, 64, device)
    for step in range(2):  # the second step has optimizer state: the steady-state reconstruction
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = gpt2_loss(model, tokens)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        scale = float(scaler.get_scale()) if scaler is not None and fused else 1.0  # fused: grads keep the scale
        grads = {n: p.grad.detach().double().cpu() / scale for n, p in named if p.grad is not None}
        before = {n: p.detach().double().cpu() for n, p in named}
        for tracker in trackers.values():
            tracker.capture(step, params, grad_scale=scale, owner=optimizer)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        records = {label: tracker.finalize() for label, tracker in trackers.items()}
    after = {n: p.detach().double().cpu() for n, p in named}
    reference: dict[str, dict[str, float]] = {}
    sums: dict[str, dict[str, float]] = {}
    for name, _ in named:
        if name not in grads:
            continue
        layer = sums.setdefault(layer_of(name), {"grad": 0.0, "max": 0.0, "param": 0.0, "update": 0.0})
        layer["grad"] += float(grads[name].square().sum())
        layer["max"] = max(layer["max"], float(grads[name].abs().max()))
        layer["param"] += float(before[name].square().sum())
        layer["update"] += float((after[name] - before[name]).square().sum())
    for layer, s in sums.items():
        applied = s["update"] ** 0.5 / s["param"] ** 0.5  # the applied change: the reference of both methods
        reference[layer] = {
            "grad_l2": s["grad"] ** 0.5,
            "grad_max_abs": s["max"],
            "param_l2": s["param"] ** 0.5,
            "update_ratio": applied,
            "update_ratio_copy": applied,
        }
    worst: dict[str, float] = {}
    record, copied = records["default"], records["copy"]
    missing = sorted(set(reference) ^ set(record.layers))
    for i, layer in enumerate(record.layers):
        if layer not in reference:
            continue
        metrics = ("grad_l2", "grad_max_abs", "param_l2", "update_ratio")
        measured = {metric: float(record.metrics[metric][i]) for metric in metrics}
        measured["update_ratio_copy"] = float(copied.metrics["update_ratio"][copied.layers.index(layer)])
        exact = reference[layer]
        for metric, value in measured.items():
            error = abs(value - exact[metric]) / max(abs(exact[metric]), 1e-30)
            worst[metric] = max(worst.get(metric, 0.0), error)
    limits = {metric: RATIO_RTOL if metric.startswith("update") else STAT_RTOL for metric in worst}
    passed = not missing and bool(worst) and all(worst[m] <= limits[m] for m in worst)
    detail = ", ".join(f"{m} {worst[m]:.1e}" for m in worst) + f" (max rel. error, {len(record.layers)} layers)"
    if missing:
        detail += f"; layers differ: {missing[:3]}"
    return Check(f"stats/{precision}", passed, detail)


class HostReads(TorchDispatchMode):
    """Counts operators that read a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _logged_step(
    model: nn.Module, device: torch.device, method: str, around: Callable[[Callable[[], Any]], Any]
) -> None:
    """One logged step of a small GPT-2 with ``around(fn)`` wrapping each hook part (capture, finalize)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tracker = GradientFlowTracker(model, update_method=method)
    tokens = gpt2_batch(model, 2, 32, device)
    after = tracker.finalize
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        gpt2_loss(model, tokens).backward()

        def before(step: int = step) -> None:
            tracker.capture(step, params, owner=optimizer)

        sync(device)
        if step == 0:  # warm-up (layer map, caches)
            before()
            optimizer.step()
            after()
            continue
        around(before)
        optimizer.step()
        sync(device)
        around(after)
    sync(device)


def check_sync(device: torch.device) -> list[Check]:
    results = []
    for label, method in METHODS.items():
        model = gpt2(device, n_layer=2, n_embd=64, vocab=512, positions=64)
        name = f"sync/{label}"
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")

                def around(fn: Callable[[], Any]) -> Any:
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        return fn()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")

                _logged_step(model, device, method, around)
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            results.append(Check(name, len(syncs) == 1, f"{len(syncs)} synchronising call(s), expected 1"))
        else:
            reads = HostReads()

            def around(fn: Callable[[], Any], reads: HostReads = reads) -> Any:
                with reads:
                    return fn()

            _logged_step(model, device, method, around)
            results.append(Check(name, reads.count == 0, f"{reads.count} host reads of tensor values, expected 0"))
    return results


def _launches(model: nn.Module, device: torch.device, method: str) -> int:
    """Kernels (CUDA) or operators (CPU) run by one logged step's capture and finalize."""
    from torch.profiler import ProfilerActivity, profile

    counts: list[int] = []

    def around(fn: Callable[[], Any]) -> Any:
        activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            result = fn()
            sync(device)
        events = prof.events()
        if device.type == "cuda":
            counts.append(sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA))
        else:  # top-level operators only (their inner calls are not extra kernels)
            counts.append(sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None))
        return result

    _logged_step(model, device, method, around)
    return sum(counts)


def check_launches(device: torch.device) -> list[Check]:
    results = []
    for label, method in METHODS.items():
        shallow = gpt2(device, n_layer=2, n_embd=64, vocab=512, positions=64)
        deep = gpt2(device, n_layer=8, n_embd=64, vocab=512, positions=64)
        tensors = [sum(1 for _ in m.parameters()) for m in (shallow, deep)]
        counts = [_launches(m, device, method) for m in (shallow, deep)]
        per_tensor = (counts[1] - counts[0]) / (tensors[1] - tensors[0])
        limit = 0.1 if device.type == "cuda" else 8.0
        unit = "kernels" if device.type == "cuda" else "operators"
        detail = (
            f"{counts[0]} {unit} for {tensors[0]} tensors, {counts[1]} for {tensors[1]}: "
            f"{per_tensor:.2f} per extra tensor (limit {limit:g})"
        )
        # On CUDA the default's count is informational (the module docstring): its kernels run over pieces of
        # the optimizer state, and device-side step counters (fused or capturable Adam) take per-tensor scalars.
        judged = label == "copy" or device.type != "cuda"
        results.append(Check(f"launches/{label}", per_tensor <= limit if judged else None, detail))
    return results


def memory_added(model: nn.Module, device: torch.device, method: str) -> float:
    """Peak memory one logged step's hooks add, as a share of the parameter bytes."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks: list[int] = []
    held = [0]

    def around(fn: Callable[[], Any]) -> Any:
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            result = fn()
            sync(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base + held[0])
            held[0] += torch.cuda.memory_allocated(device) - base  # e.g. the copy kept from capture to finalize
            return result
        with LiveBytes() as live:
            result = fn()
        peaks.append(live.peak + held[0])
        held[0] += live.current
        return result

    _logged_step(model, device, method, around)
    return max(peaks) / param_bytes


def check_memory(device: torch.device, small: bool) -> list[Check]:
    model = gpt2(device, n_layer=2 if small else 12, n_embd=128 if small else 768, vocab=2048, positions=64)
    default = memory_added(model, device, METHODS["default"])
    copy = memory_added(model, device, METHODS["copy"])
    return [
        Check("memory/default", default <= 0.05, f"{default:.1%} of the parameter bytes (limit 5%)"),
        Check("memory/copy", None, f"{copy:.1%} of the parameter bytes (the copy)"),
    ]


FUSED_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4),
}


def check_fused(device: torch.device, small: bool) -> list[Check]:
    """The fused reconstruction against the eager one, per optimizer (see the module docstring)."""
    results = []
    for label, make in FUSED_OPTIMIZERS.items():
        model = gpt2(device, n_layer=2 if small else 12, n_embd=128 if small else 768, vocab=2048, positions=64)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make(params)
        tokens = gpt2_batch(model, 2, 32, device)
        fused, eager = UpdateNorms(kernel="auto"), UpdateNorms(kernel="eager")
        values, times = [], {"fused": 0.0, "eager": 0.0}
        for step in range(3):  # step 0 compiles (timed apart), steps 1-2 are timed
            optimizer.zero_grad(set_to_none=True)
            gpt2_loss(model, tokens).backward()
            fused.before_step(params, optimizer)
            eager.before_step(params, optimizer)
            optimizer.step()
            for name, updates in (("fused", fused), ("eager", eager)):
                sync(device)
                start = time.perf_counter()
                values.append(updates.after_step().double().cpu())
                sync(device)
                times[name] += (time.perf_counter() - start) if step else 0.0
        pairs = list(zip(values[0::2], values[1::2]))
        worst = max(float(((f - e).abs() / e.abs().clamp_min(1e-300)).max()) for f, e in pairs)
        info = fused.kernel_info or ""
        passed = info.startswith("fused") and worst <= 1e-5
        detail = (
            f"max rel. difference {worst:.1e} (limit 1e-5); {info}; compile {fused.compile_seconds:.1f} s; "
            f"fused {times['fused'] * 500:.2f} ms vs eager {times['eager'] * 500:.2f} ms per logged step"
        )
        results.append(Check(f"fused/{label}", passed, detail))
    return results


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _overhead(
    name: str, model: nn.Module, loss: Callable[[], Tensor], device: torch.device, repeats: int
) -> list[Check]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    step()
    plain = _median_time(step, device, repeats)
    results = []
    for label, method in METHODS.items():
        tracker = GradientFlowTracker(model, update_method=method)
        hooks: list[float] = []
        for i in range(repeats + 1):
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            sync(device)
            start = time.perf_counter()
            tracker.capture(i, params, owner=optimizer)
            sync(device)
            middle = time.perf_counter()
            optimizer.step()
            sync(device)
            resume = time.perf_counter()
            tracker.finalize()
            sync(device)
            if i:  # the first is a warm-up
                hooks.append(middle - start + time.perf_counter() - resume)
        hook = statistics.median(hooks)
        results.append(
            Check(
                f"overhead/{name}/{label}",
                None,
                f"step {plain * 1e3:.1f} ms, logged step +{hook * 1e3:.2f} ms: every step {1 + hook / plain:.4f}x, "
                f"every 50 steps {1 + hook / plain / 50:.5f}x",
            )
        )
    return results


def check_overhead(device: torch.device, small: bool, repeats: int) -> list[Check]:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    detector = DetectionModel("yolo11n.yaml", nc=80, verbose=False).to(device).train()
    detector.args = get_cfg(DEFAULT_CFG)
    size, batch = (128, 2) if small else (640, 16)
    generator = torch.Generator().manual_seed(0)
    boxes = 3 * batch
    images = {
        "img": torch.rand(batch, 3, size, size, generator=generator).to(device),
        "cls": torch.randint(0, 80, (boxes, 1), generator=generator).float().to(device),
        "bboxes": torch.cat([0.3 + 0.4 * torch.rand(boxes, 2), 0.1 + 0.2 * torch.rand(boxes, 2)], 1).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(3).float().to(device),
    }
    results = _overhead(f"yolo11n-{size}px", detector, lambda: detector.loss(images)[0].sum(), device, repeats)
    if small:
        lm = gpt2(device, n_layer=2, n_embd=96, vocab=8192, positions=64)
        tokens = gpt2_batch(lm, 4, 64, device)
    else:
        lm = gpt2(device, n_layer=12, n_embd=768, vocab=50257, positions=1024)
        tokens = gpt2_batch(lm, 8, 512, device)
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    results += _overhead(f"gpt2-{params:.0f}m", lm, lambda: gpt2_loss(lm, tokens), device, repeats)
    return results


def run(device: torch.device, checks: Sequence[str] = CHECKS, small: bool | None = None) -> list[Check]:
    """Run ``checks`` on ``device`` (reduced sizes on CPU unless ``small=False``) and return their results.

    Raises:
        ValueError: If a check name is not one of :data:`CHECKS`.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"checks={unknown} are not known: use any of {', '.join(CHECKS)}")
    small = device.type != "cuda" if small is None else small
    results: list[Check] = []
    if "stats" in checks:
        results += [check_statistics(device, precision, small) for precision in PRECISIONS]
    if "sync" in checks:
        results += check_sync(device)
    if "launches" in checks:
        results += check_launches(device)
    if "memory" in checks:
        results += check_memory(device, small)
    if "fused" in checks:
        results += check_fused(device, small)
    if "overhead" in checks:
        results += check_overhead(device, small, repeats=3 if small else 10)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if available)")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS, help="which checks to run")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
        print("no CUDA device: running the checks on CPU at a reduced size", flush=True)
    start = time.perf_counter()
    results = run(device, args.checks)
    for result in results:
        print(result.line(), flush=True)
    failed = [r.name for r in results if r.passed is False]
    print(
        f"{len(results) - len(failed)} of {len(results)} passed or informational in {time.perf_counter() - start:.0f} s"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
