"""The gradient statistics of a logged step, one pass against two, right after backward (CPU, one thread).

    python benchmarks/gradient_stats.py                          # resnet18 32 px, GPT-2 1M and 18M (~1 min)
    python benchmarks/gradient_stats.py --models resnet18 --rounds 40

Per round: a fresh backward, then :func:`gradlight.stats.gradient_statistics` on its gradients twice, once
with the one-pass compiled kernel (:class:`gradlight.compiled.GradientKernel`, the default) and once with
the two eager passes (a norm and a min/max), in alternating order. Each path's time in first position is
what a logged step pays (its gradients as backward left them in cache); printed as min / median per path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import Tensor, nn

from gradlight.compiled import GradientKernel
from gradlight.stats import FUSED_STATS_MIN_NUMEL, gradient_statistics

MODELS = ("resnet18", "gpt2-1m", "gpt2-18m")
GPT2 = {
    "gpt2-1m": {"vocab_size": 8192, "n_embd": 96, "n_layer": 2, "n_head": 2},
    "gpt2-18m": {"vocab_size": 50257, "n_embd": 256, "n_layer": 6, "n_head": 4},
}


def build(name: str) -> tuple[nn.Module, Callable[[], Tensor]]:
    """The model and a closure computing its loss on a fixed random batch."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        images = torch.randn(16, 3, 32, 32)
        return model, lambda: model(images).logsumexp(1).mean()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=1024, **GPT2[name])
    gpt = GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (4, 64))
    return gpt, lambda: gpt(input_ids=tokens, labels=tokens).loss


def measure(name: str, rounds: int) -> dict[str, list[float]]:
    model, loss = build(name)
    kernel = GradientKernel()
    loss().backward()
    gradient_statistics([p.grad for p in model.parameters() if p.grad is not None], fused=kernel)  # compiles
    first: dict[str, list[float]] = {"one pass": [], "two passes": []}
    for round_ in range(rounds):
        model.zero_grad(set_to_none=True)
        loss().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        order = ("one pass", "two passes") if round_ % 2 else ("two passes", "one pass")
        for position, path in enumerate(order):
            start = time.perf_counter()
            gradient_statistics(grads, fused=kernel if path == "one pass" else None)
            if position == 0:
                first[path].append(time.perf_counter() - start)
    large = sum(p.numel() >= FUSED_STATS_MIN_NUMEL for p in model.parameters())
    print(f"{name}: {large} of {sum(1 for _ in model.parameters())} tensors take the one-pass kernel", flush=True)
    return first


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=24, help="backward passes per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results = {name: measure(name, args.rounds) for name in args.models}
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print("| model | one pass (ms, min / median) | two passes (ms, min / median) | one / two (medians) |")
    print("|---|---|---|---|")
    for name, times in results.items():
        one, two = times["one pass"], times["two passes"]
        print(
            f"| {name} | {min(one) * 1e3:.2f} / {statistics.median(one) * 1e3:.2f} "
            f"| {min(two) * 1e3:.2f} / {statistics.median(two) * 1e3:.2f} "
            f"| {statistics.median(one) / statistics.median(two):.2f} |"
        )


if __name__ == "__main__":
    main()
