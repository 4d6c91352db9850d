"""The monitor's cost by model size: GPT-2 configs from ~1M to ~124M parameters, CPU, one thread.

    python benchmarks/scale.py                      # all sizes (about 2 min on a busy 2-core CPU)
    python benchmarks/scale.py --max-params 20e6    # the small ones only
    python benchmarks/scale.py --fused-reference    # also time a torch.compile'd (fused) reconstruction

Every model is a Hugging Face ``GPT2LMHeadModel`` built from a config (no download), trained with
``torch.optim.AdamW`` (its CPU default, the for-loop implementation) on random tokens, batch 4 x 64. Per
size it prints, as medians over ``--rounds``:

- ``step``: a whole training step without a monitor (forward, backward, ``AdamW.step()``, ``zero_grad``);
- ``adamw``: one ``AdamW.step()`` alone;
- the in-hook time of one logged step of :class:`gradlight.tracker.GradientFlowTracker` (``capture`` before
  the optimizer step plus ``finalize`` after it: the work the monitor's hooks do on a logged step, without
  the history writer and the diagnosis), three ways: ``default`` (``update_method="auto"``: the update ratio
  reconstructed from AdamW's state, no parameter copy), ``copy`` (``update_method="copy"``: a copy of the
  parameters before the step) and ``no_ratio`` (``track_update_ratio=False``);
- ``floor``: reading every tensor a default logged step must read once (a norm of each gradient, parameter,
  first and second moment, and the parameter again: five passes over the parameter count), the least any
  implementation made of unfused torch kernels can take;
- with ``--fused-reference``: the same AdamW update norms computed by one ``torch.compile``'d kernel per
  tensor (one pass over both moments and the parameter; needs a C++ compiler, compiles on first use), checked
  against the tracker's to 1e-3: what a fused reconstruction would cost. It is not part of gradlight;
- the peak memory a logged step adds (tensors created inside capture and finalize and alive at once,
  counted with a ``TorchDispatchMode``), for ``default`` and ``copy``, as a share of the parameter bytes.

The three hook variants run back to back on the same gradients in every round, in rotated order, so that
drift hits them equally. Targets, printed met/missed per size: the default logged step costs at most half
of one ``AdamW.step()``, and adds at most 5% of the parameter bytes. Sizes whose estimated time exceeds
``--budget`` seconds are skipped, with the estimate printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor, nn

from gradlight.memory import LiveBytes
from gradlight.tracker import GradientFlowTracker

#: name -> GPT2Config keyword arguments (n_positions 1024 as in GPT-2; the batch uses 64 of them).
SIZES: dict[str, dict[str, int]] = {
    "gpt2-1m": {"vocab_size": 8192, "n_embd": 96, "n_layer": 2, "n_head": 2},
    "gpt2-7m": {"vocab_size": 50257, "n_embd": 128, "n_layer": 4, "n_head": 4},
    "gpt2-18m": {"vocab_size": 50257, "n_embd": 256, "n_layer": 6, "n_head": 4},
    "gpt2-51m": {"vocab_size": 50257, "n_embd": 512, "n_layer": 8, "n_head": 8},
    "gpt2-124m": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
}
VARIANTS = ("default", "copy", "no_ratio")
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
    return GradientFlowTracker(model, update_method="auto" if variant == "default" else "copy")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_floor(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """One norm over each tensor a default logged step must read: gradients and parameters (before the step),
    first and second moments and parameters (after it). No per-element arithmetic beyond the read."""
    for param in params:
        state = optimizer.state[param]
        for tensor in (param.grad, param, state["exp_avg"], state["exp_avg_sq"], param):
            torch.linalg.vector_norm(tensor)


def _fused_adamw_sq(m: Tensor, v: Tensor, p: Tensor, add: Tensor, alpha: Tensor) -> Tensor:
    """``sum((m / (sqrt(v) + add) + alpha * p) ** 2)`` accumulated in float64 (one fused kernel once compiled)."""
    r = (m / (v.sqrt() + add) + alpha * p).double()
    return (r * r).sum()


class FusedReference:
    """AdamW's update norms per tensor from its state, one compiled kernel per tensor (the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.kernel = torch.compile(_fused_adamw_sq, dynamic=True)

    def __call__(self, params: list[nn.Parameter]) -> Tensor:
        (group,) = self.optimizer.param_groups
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        out = []
        for param in params:
            state = self.optimizer.state[param]
            step = float(state["step"])
            c1, c2 = 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
            add, alpha = torch.tensor(eps * c2), torch.tensor(decay * c1 / c2)
            flat = (state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), param.detach().view(-1))
            out.append(self.kernel(*flat, add, alpha) * (lr / c1 * c2 / (1.0 - lr * decay)) ** 2)
        return torch.stack(out)


def measure(name: str, rounds: int, fused_reference: bool = False) -> dict[str, float]:
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
    for variant in VARIANTS:  # warm-up of each recording path
        trackers[variant].capture(0, params, owner=optimizer)
        optimizer.step()
        trackers[variant].finalize()
    for round_ in range(rounds):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        for variant in order:
            before = timed(lambda v=variant, r=round_: trackers[v].capture(r, params, owner=optimizer))
            adamw.append(timed(optimizer.step))
            after = timed(trackers[variant].finalize)
            in_hooks[variant].append(before + after)
        floor.append(timed(lambda: read_floor(params, optimizer)))
    fused = fused_times(trackers["default"], params, optimizer, rounds) if fused_reference else {}
    memory = {}
    for variant in ("default", "copy"):
        with LiveBytes() as capture:
            trackers[variant].capture(rounds, params, owner=optimizer)
        optimizer.step()
        with LiveBytes() as finalize:
            trackers[variant].finalize()
        memory[variant] = (capture.current + max(capture.peak - capture.current, finalize.peak)) / param_bytes
    result = {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "step": statistics.median(steps),
        "adamw": statistics.median(adamw),
        "floor": statistics.median(floor),
        **{variant: statistics.median(values) for variant, values in in_hooks.items()},
        "mem_default": memory["default"],
        "mem_copy": memory["copy"],
        **fused,
    }
    return result


def fused_times(
    tracker: GradientFlowTracker, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, rounds: int
) -> dict[str, float]:
    """Median time of :class:`FusedReference` after a step, and its largest deviation from the tracker's norms."""
    reference = FusedReference(optimizer)
    assert tracker.updates is not None
    tracker.updates.before_step(params, optimizer)
    optimizer.step()
    want = tracker.updates.after_step()
    got = reference(params)  # compiles
    deviation = float(((got - want).abs() / want.clamp_min(1e-300)).max())
    if deviation > 1e-3:
        raise SystemExit(f"the fused reference deviates from the tracker's update norms by {deviation:.2e}")
    times = [timed(functools.partial(reference, params)) for _ in range(rounds)]
    return {"fused": statistics.median(times), "fused_deviation": deviation}


def estimate_seconds(name: str, rounds: int, measured: dict[str, dict[str, float]]) -> float | None:
    """Time for a size from the largest measured one, scaled by parameter count (compute grows ~linearly)."""
    if not measured:
        return None
    last = max(measured.values(), key=lambda r: r["params"])
    config = SIZES[name]
    e, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    params = vocab * e + 1024 * e + layers * 12 * e * e
    per_round = last["step"] + 3 * last["adamw"] + last["floor"] + sum(last[v] for v in VARIANTS)
    return per_round * (rounds + 4) * params / last["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (medians are printed)")
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip configs above this size")
    parser.add_argument("--budget", type=float, default=600.0, help="skip a size estimated above this (s)")
    parser.add_argument(
        "--fused-reference", action="store_true", help="also time a torch.compile'd reconstruction (not gradlight's)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} must be at least 1")
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
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
        results[name] = measure(name, args.rounds, args.fused_reference)
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(
        "| model | parameters | tensors | whole step (ms) | AdamW step() (ms) | logged step: default (ms) "
        "| copy (ms) | no update ratio (ms) | read floor (ms) | memory added: default | copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {int(r['tensors'])} | {r['step'] * 1e3:.0f} "
            f"| {r['adamw'] * 1e3:.1f} | {r['default'] * 1e3:.1f} | {r['copy'] * 1e3:.1f} "
            f"| {r['no_ratio'] * 1e3:.1f} | {r['floor'] * 1e3:.1f} | {r['mem_default']:.1%} | {r['mem_copy']:.1%} |"
        )
    print()
    print(
        "| model | logged step / AdamW step() (target <= 0.5) | met | read floor / AdamW step() "
        "| memory added (target <= 5%) | met |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio, copy, no_ratio, floor = (r[key] / r["adamw"] for key in ("default", "copy", "no_ratio", "floor"))
        print(
            f"| {name} | {ratio:.2f} (copy: {copy:.2f}, no ratio: {no_ratio:.2f}) | {'yes' if ratio <= 0.5 else 'no'} "
            f"| {floor:.2f} | {r['mem_default']:.1%} (copy: {r['mem_copy']:.1%}) "
            f"| {'yes' if r['mem_default'] <= 0.05 else 'no'} |"
        )
    fused = {name: r for name, r in results.items() if "fused" in r}
    if fused:
        print()
        print(
            "| model | fused reconstruction (ms) | largest deviation | no ratio + fused (ms) "
            "| no ratio + fused / AdamW step() |"
        )
        print("|---|---|---|---|---|")
        for name, r in fused.items():
            total = r["no_ratio"] + r["fused"]
            print(
                f"| {name} | {r['fused'] * 1e3:.1f} | {r['fused_deviation']:.1e} | {total * 1e3:.1f} "
                f"| {total / r['adamw']:.2f} |"
            )


if __name__ == "__main__":
    main()
