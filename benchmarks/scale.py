"""The monitor's cost by model size: GPT-2 configs from ~1M to ~124M parameters, CPU, one thread.

    python benchmarks/scale.py                      # all sizes (about 2 min on a busy 2-core CPU)
    python benchmarks/scale.py --max-params 20e6    # the small ones only

Every model is a Hugging Face ``GPT2LMHeadModel`` built from a config (no download), trained with
``torch.optim.AdamW`` (its CPU default, the for-loop implementation) on random tokens, batch 4 x 64. Per
size it prints, as medians over ``--rounds``:

- ``step``: a whole training step without a monitor (forward, backward, ``AdamW.step()``, ``zero_grad``);
- ``adamw``: one ``AdamW.step()`` alone;
- the in-hook time of one logged step of :class:`gradlight.tracker.GradientFlowTracker` (``capture`` before
  the optimizer step plus ``finalize`` after it: the work the monitor's hooks do on a logged step, without
  the history writer and the diagnosis), three ways: ``default`` (``track_update_ratio=True``: a copy of the
  parameters), ``no_ratio`` (``track_update_ratio=False``) and ``copy_free`` (``no_ratio`` plus
  :class:`gradlight.update_ratio.UpdateNorms` around the step: the update ratio without a copy, as the
  tracker will run it once integrated);
- the peak memory a logged step adds (tensors created inside capture and finalize and alive at once,
  counted with a ``TorchDispatchMode``), for ``default`` and ``copy_free``, as a share of the parameter bytes.

The three hook variants run back to back on the same gradients in every round, in rotated order, so that
drift hits them equally. Targets, printed met/missed per size: the copy-free logged step costs at most half
of one ``AdamW.step()``, and adds at most 5% of the parameter bytes. Sizes whose estimated time exceeds
``--budget`` seconds are skipped, with the estimate printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor, nn

from gradlight.memory import LiveBytes
from gradlight.tracker import GradientFlowTracker
from gradlight.update_ratio import UpdateNorms

#: name -> GPT2Config keyword arguments (n_positions 1024 as in GPT-2; the batch uses 64 of them).
SIZES: dict[str, dict[str, int]] = {
    "gpt2-1m": {"vocab_size": 8192, "n_embd": 96, "n_layer": 2, "n_head": 2},
    "gpt2-7m": {"vocab_size": 50257, "n_embd": 128, "n_layer": 4, "n_head": 4},
    "gpt2-18m": {"vocab_size": 50257, "n_embd": 256, "n_layer": 6, "n_head": 4},
    "gpt2-51m": {"vocab_size": 50257, "n_embd": 512, "n_layer": 8, "n_head": 8},
    "gpt2-124m": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
}
VARIANTS = ("default", "no_ratio", "copy_free")
BATCH, TOKENS = 4, 64


@dataclass
class Hooks:
    """One way of recording a logged step: what runs before and after the optimizer step."""

    tracker: GradientFlowTracker
    updates: UpdateNorms | None

    def before(self, step: int, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.tracker.capture(step, params, owner=optimizer)
        if self.updates is not None:
            self.updates.before_step(params, optimizer)

    def after(self) -> None:
        self.tracker.finalize()
        if self.updates is not None:
            self.updates.after_step()


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


def hooks_for(model: nn.Module, variant: str) -> Hooks:
    tracker = GradientFlowTracker(model, track_update_ratio=variant == "default")
    return Hooks(tracker, UpdateNorms() if variant == "copy_free" else None)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, rounds: int) -> dict[str, float]:
    model, optimizer, tokens = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    hooks = {variant: hooks_for(model, variant) for variant in VARIANTS}

    def whole_step() -> None:
        backward(model, tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    whole_step()  # warm-up: optimizer state allocated, layers discovered below on the same gradients
    steps = [timed(whole_step) for _ in range(rounds)]
    backward(model, tokens)
    adamw: list[float] = []
    in_hooks: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for variant in VARIANTS:  # warm-up of each recording path
        hooks[variant].before(0, params, optimizer)
        optimizer.step()
        hooks[variant].after()
    for round_ in range(rounds):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        for variant in order:
            before = timed(lambda v=variant, r=round_: hooks[v].before(r, params, optimizer))
            adamw.append(timed(optimizer.step))
            after = timed(hooks[variant].after)
            in_hooks[variant].append(before + after)
    memory = {}
    for variant in ("default", "copy_free"):
        with LiveBytes() as capture:
            hooks[variant].before(rounds, params, optimizer)
        optimizer.step()
        with LiveBytes() as finalize:
            hooks[variant].after()
        memory[variant] = (capture.current + max(capture.peak - capture.current, finalize.peak)) / param_bytes
    result = {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "step": statistics.median(steps),
        "adamw": statistics.median(adamw),
        **{variant: statistics.median(values) for variant, values in in_hooks.items()},
        "mem_default": memory["default"],
        "mem_copy_free": memory["copy_free"],
    }
    return result


def estimate_seconds(name: str, rounds: int, measured: dict[str, dict[str, float]]) -> float | None:
    """Time for a size from the largest measured one, scaled by parameter count (compute grows ~linearly)."""
    if not measured:
        return None
    last = max(measured.values(), key=lambda r: r["params"])
    config = SIZES[name]
    e, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    params = vocab * e + 1024 * e + layers * 12 * e * e
    per_round = last["step"] + 3 * last["adamw"] + sum(last[v] for v in VARIANTS)
    return per_round * (rounds + 4) * params / last["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (medians are printed)")
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip configs above this size")
    parser.add_argument("--budget", type=float, default=600.0, help="skip a size estimated above this (s)")
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
        results[name] = measure(name, args.rounds)
        print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(
        "| model | parameters | tensors | whole step (ms) | AdamW step() (ms) | logged step: default (ms) "
        "| no update ratio (ms) | copy-free ratio (ms) | memory added: default | copy-free |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {int(r['tensors'])} | {r['step'] * 1e3:.0f} "
            f"| {r['adamw'] * 1e3:.1f} | {r['default'] * 1e3:.1f} | {r['no_ratio'] * 1e3:.1f} "
            f"| {r['copy_free'] * 1e3:.1f} | {r['mem_default']:.1%} | {r['mem_copy_free']:.1%} |"
        )
    print()
    print("| model | copy-free logged step / AdamW step() (target <= 0.5) | met | memory added (target <= 5%) | met |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["copy_free"] / r["adamw"]
        print(
            f"| {name} | {ratio:.2f} (default: {r['default'] / r['adamw']:.2f}) | {'yes' if ratio <= 0.5 else 'no'} "
            f"| {r['mem_copy_free']:.1%} (default: {r['mem_default']:.1%}) "
            f"| {'yes' if r['mem_copy_free'] <= 0.05 else 'no'} |"
        )


if __name__ == "__main__":
    main()
