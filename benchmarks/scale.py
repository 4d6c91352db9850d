"""The monitor's cost by model size: GPT-2 configs from ~1M to ~124M parameters, CPU, one thread.

    python benchmarks/scale.py                      # all sizes (about 3 min on a busy 2-core CPU)
    python benchmarks/scale.py --max-params 20e6    # the small ones only
    python benchmarks/scale.py --clock cpu          # timed with the thread's CPU time (a machine other jobs share)

Every model is a Hugging Face ``GPT2LMHeadModel`` built from a config (no download), trained with
``torch.optim.AdamW`` (its CPU default, the for-loop implementation) on random tokens, batch 4 x 64. Per
size it prints, as medians over ``--rounds``:

- ``step``: a whole training step without a monitor (forward, backward, ``AdamW.step()``, ``zero_grad``);
- ``adamw``: one ``AdamW.step()`` alone;
- the in-hook time of one logged step of :class:`gradlight.tracker.GradientFlowTracker` (``capture`` before
  the optimizer step plus ``finalize`` after it: the work the monitor's hooks do on a logged step, without
  the history writer and the diagnosis), four ways: ``default`` (``update_method="auto"``,
  ``update_kernel="auto"``: the update ratio reconstructed from AdamW's state by one ``torch.compile``'d
  kernel per large tensor, no parameter copy; the large gradients' statistics in one compiled pass),
  ``two_pass`` (the default with the gradient statistics in two eager passes, a norm and a min/max: the
  default before the one-pass kernel), ``eager`` (``update_kernel="eager"``: no compiled kernel at all),
  ``copy`` (``update_method="copy"``: a copy of the parameters before the step) and ``no_ratio``
  (``track_update_ratio=False``);
- ``compile``: the one-time cost of the default's first logged step (compiling its kernels: the first size
  in a process pays it, later sizes reuse the compiled code; 0 after an earlier run filled Inductor's cache
  on disk only in part), and the kernel the default used (``tracker.updates.kernel_info``);
- ``floor``: reading every tensor a default logged step must read once (a norm of each gradient, parameter,
  first and second moment, and the parameter again: five passes over the parameter count), the least any
  implementation made of unfused torch kernels can take;
- the peak memory a logged step adds (bytes the CPU allocator hands out inside capture and finalize and
  still holds, from the profiler's memory events, which also see compiled code's buffers), for ``default``,
  ``eager`` and ``copy``, as a share of the parameter bytes.

The hook variants run back to back on the same gradients in every round, in rotated order, so that drift
hits them equally. Targets, printed met/missed per size: the default logged step costs at most half of one
``AdamW.step()`` (from 7M parameters up) and at most 1.5x the read floor (every size), and adds at most 5% of
the parameter bytes. Sizes whose estimated time exceeds ``--budget`` seconds are skipped, with the estimate
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor, nn

from gradlight.compiled import GradientKernel
from gradlight.tracker import GradientFlowTracker

#: name -> GPT2Config keyword arguments (n_positions 1024 as in GPT-2; the batch uses 64 of them).
SIZES: dict[str, dict[str, int]] = {
    "gpt2-1m": {"vocab_size": 8192, "n_embd": 96, "n_layer": 2, "n_head": 2},
    "gpt2-7m": {"vocab_size": 50257, "n_embd": 128, "n_layer": 4, "n_head": 4},
    "gpt2-18m": {"vocab_size": 50257, "n_embd": 256, "n_layer": 6, "n_head": 4},
    "gpt2-51m": {"vocab_size": 50257, "n_embd": 512, "n_layer": 8, "n_head": 8},
    "gpt2-124m": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
}
#: The clocks ``--clock`` names: wall time, or the CPU time of the timing thread. On a machine other jobs share,
#: the thread's CPU time leaves out the time another process held its core (one thread: ``OMP_NUM_THREADS=1``
#: keeps every kernel, compiled ones included, on it).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
clock: Callable[[], float] = time.perf_counter
VARIANTS = ("default", "two_pass", "eager", "copy", "no_ratio")
BATCH, TOKENS = 4, 64


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=1024, **SIZES[name])
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tokens = torch.randint(0, config.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    return model, optimizer, tokens


def backward(model: nn.Module, tokens: Tensor) -> None:
    model(input_ids=tokens, labels=tokens).loss.backward()


def tracker_for(model: nn.Module, variant: str) -> GradientFlowTracker:
    """The tracker of one way of recording a logged step (:data:`VARIANTS`)."""
    if variant == "no_ratio":
        return GradientFlowTracker(model, track_update_ratio=False)
    if variant == "copy":
        return GradientFlowTracker(model, update_method="copy")
    tracker = GradientFlowTracker(model, update_kernel="eager" if variant == "eager" else "auto")
    if variant == "two_pass":
        tracker.gradient_kernel = GradientKernel("eager")
    return tracker


def timed(fn: Callable[[], Any]) -> float:
    start = clock()
    fn()
    return clock() - start


def read_floor(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """One norm over each tensor a default logged step must read: gradients and parameters (before the step),
    first and second moments and parameters (after it). No per-element arithmetic beyond the read."""
    for param in params:
        state = optimizer.state[param]
        for tensor in (param.grad, param, state["exp_avg"], state["exp_avg_sq"], param):
            torch.linalg.vector_norm(tensor)


class AllocatedBytes:
    """Bytes the CPU allocator hands out inside the block and still holds at its end, and the peak, from the
    profiler's memory events (ordered by start: an operator's allocations count from its start)."""

    def __enter__(self) -> AllocatedBytes:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(None, None, None)
        events = sorted(self._profile.events(), key=lambda e: e.time_range.start)
        self.current = self.peak = 0
        for event in events:
            self.current += event.self_cpu_memory_usage
            self.peak = max(self.peak, self.current)


def measure(name: str, rounds: int) -> dict[str, Any]:
    model, optimizer, tokens = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trackers = {variant: tracker_for(model, variant) for variant in VARIANTS}

    def whole_step() -> None:
        backward(model, tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    whole_step()  # warm-up: optimizer state allocated, layers discovered below on the same gradients
    steps = [timed(whole_step) for _ in range(rounds)]
    backward(model, tokens)
    adamw: list[float] = []
    floor: list[float] = []
    in_hooks: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    first: dict[str, float] = {}
    for variant in VARIANTS:  # warm-up of each recording path; the default's first one compiles
        start = time.perf_counter()
        trackers[variant].capture(0, params, owner=optimizer)
        optimizer.step()
        trackers[variant].finalize()
        first[variant] = time.perf_counter() - start
    for round_ in range(rounds):
        shift = round_ % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            before = timed(lambda v=variant, r=round_: trackers[v].capture(r, params, owner=optimizer))
            adamw.append(timed(optimizer.step))
            after = timed(trackers[variant].finalize)
            in_hooks[variant].append(before + after)
        floor.append(timed(lambda: read_floor(params, optimizer)))
    memory = {}
    for variant in ("default", "eager", "copy"):
        with AllocatedBytes() as capture:
            trackers[variant].capture(rounds, params, owner=optimizer)
        optimizer.step()
        with AllocatedBytes() as finalize:
            trackers[variant].finalize()
        memory[f"mem_{variant}"] = (capture.current + max(capture.peak - capture.current, finalize.peak)) / param_bytes
    updates = trackers["default"].updates
    assert updates is not None
    return {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "step": statistics.median(steps),
        "adamw": statistics.median(adamw),
        "floor": statistics.median(floor),
        **{variant: statistics.median(values) for variant, values in in_hooks.items()},
        **memory,
        "compile": updates.compile_seconds + trackers["default"].gradient_kernel.compile_seconds,
        "first_logged": first["default"],
        "kernel": updates.kernel_info or "",
    }


def estimate_seconds(name: str, rounds: int, measured: dict[str, dict[str, float]]) -> float | None:
    """Time for a size from the largest measured one, scaled by parameter count (compute grows ~linearly)."""
    if not measured:
        return None
    last = max(measured.values(), key=lambda r: r["params"])
    config = SIZES[name]
    e, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    params = vocab * e + 1024 * e + layers * 12 * e * e
    per_round = last["step"] + len(VARIANTS) * last["adamw"] + last["floor"] + sum(last[v] for v in VARIANTS)
    return per_round * (rounds + 4) * params / last["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (medians are printed)")
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip configs above this size")
    parser.add_argument("--budget", type=float, default=600.0, help="skip a size estimated above this (s)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or the thread's CPU time")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} must be at least 1")
    torch.set_num_threads(1)
    global clock
    clock = CLOCKS[args.clock]
    print(f"clock: {args.clock}", flush=True)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in SIZES:
        config = SIZES[name]
        approx = config["vocab_size"] * config["n_embd"] + 12 * config["n_layer"] * config["n_embd"] ** 2
        if approx > args.max_params:
            print(f"{name}: skipped, ~{approx / 1e6:.0f}M parameters is above --max-params", flush=True)
            continue
        estimate = estimate_seconds(name, args.rounds, results)
        if estimate is not None and estimate > args.budget:
            print(f"{name}: skipped, estimated {estimate:.0f} s is above --budget {args.budget:.0f} s", flush=True)
            continue
        start = time.perf_counter()
        results[name] = measure(name, args.rounds)
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_tables(results)


def print_tables(results: dict[str, dict[str, Any]]) -> None:
    """The times, the one-time compile cost, and the targets met or missed."""
    print()
    print(
        "| model | parameters | tensors | whole step (ms) | AdamW step() (ms) | logged step: default (ms) "
        "| two-pass gradient statistics (ms) | eager (ms) | copy (ms) | no update ratio (ms) | read floor (ms) "
        "| memory added: default | eager | copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {int(r['tensors'])} | {r['step'] * 1e3:.0f} "
            f"| {r['adamw'] * 1e3:.1f} | {r['default'] * 1e3:.1f} | {r['two_pass'] * 1e3:.1f} | {r['eager'] * 1e3:.1f} "
            f"| {r['copy'] * 1e3:.1f} "
            f"| {r['no_ratio'] * 1e3:.1f} | {r['floor'] * 1e3:.1f} | {r['mem_default']:.1%} | {r['mem_eager']:.1%} "
            f"| {r['mem_copy']:.1%} |"
        )
    print()
    print("| model | first logged step (s) | of which compiling (s) | kernel |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['first_logged']:.2f} | {r['compile']:.2f} | {r['kernel']} |")
    print()
    print(
        "| model | logged step / AdamW step() (target <= 0.5 from 7M) | met | logged step / read floor "
        "(target <= 1.5) | met | memory added (target <= 5%) | met |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio, eager, copy = (r[key] / r["adamw"] for key in ("default", "eager", "copy"))
        floor = r["default"] / r["floor"]
        applies = r["params"] >= 7e6
        met = ("yes" if ratio <= 0.5 else "no") if applies else "(below 7M)"
        print(
            f"| {name} | {ratio:.2f} (eager: {eager:.2f}, copy: {copy:.2f}) | {met} "
            f"| {floor:.2f} (two-pass: {r['two_pass'] / r['floor']:.2f}, eager: {r['eager'] / r['floor']:.2f}) "
            f"| {'yes' if floor <= 1.5 else 'no'} "
            f"| {r['mem_default']:.1%} | {'yes' if r['mem_default'] <= 0.05 else 'no'} |"
        )


if __name__ == "__main__":
    main()
