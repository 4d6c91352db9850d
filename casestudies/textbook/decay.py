"""Experiment 2: how fast does the gradient norm decay per layer, and what changes it?

Claim: sigmoid's derivative is at most 0.25, so each sigmoid layer shrinks the gradient by up to 4x: 5 layers
by ~1e-3 (0.25^5), 10 layers by ~1e-6 or more. Here every combination of activation x BatchNorm x residual x
init, for a deep MLP and a deep CNN, is measured at initialisation and after some Adam training, on one fixed
probe batch, with the Trainer-free :class:`gradlight.GradientFlowTracker` (per-layer weight-gradient L2).

The decay rate is the least-squares slope of ``log10(grad_l2)`` against depth over the hidden blocks (block 1
to block ``depth - 1``: same shapes, so only depth differs; the input block and the head are left out),
reported as *decades lost per layer going backwards* (``0.60`` is the claimed ``log10(4)``). The weight
gradient ``dL/dW_l = delta_l h_{l-1}^T`` also carries the forward activations' scale, so the gradient with
respect to each block's output ``delta_l`` (the quantity the 0.25 argument is about) is measured too.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from casestudies.textbook.common import (
    DOES_NOT_HOLD,
    HOLDS,
    HOLDS_ONLY_WHEN,
    TAB10,
    Claim,
    fit_decay,
    fmt,
    seed_everything,
    subplots,
    write_table,
)
from casestudies.textbook.config import StudyConfig
from casestudies.textbook.models import CNN, MLP, NetSpec, sum_sign_data
from gradlight import GradientFlowTracker

#: The claim: at most 0.25 per sigmoid layer.
CLAIMED_FACTOR = 0.25
CLAIMED_DECADES = -math.log10(CLAIMED_FACTOR)  # 0.602 decades per layer
ARCHITECTURES = ("mlp", "cnn")
STRUCTURES = ((False, False), (True, False), (False, True))  # (norm, residual)


def structure_name(norm: bool, residual: bool) -> str:
    """``plain``, ``BN``, ``res`` or ``BN+res``."""
    parts = (["BN"] if norm else []) + (["res"] if residual else [])
    return "+".join(parts) or "plain"


def build(arch: str, spec: NetSpec, config: StudyConfig) -> nn.Module:
    """The deep MLP (classic width, 10 features) or CNN (``cnn_channels`` wide on ``cnn_image`` inputs)."""
    if arch == "mlp":
        return MLP(config.classic_features, config.classic_width, config.decay_depth, spec)
    return CNN(1, config.cnn_channels, config.decay_depth, spec)


def task(arch: str, samples: int, config: StudyConfig, seed: int) -> tuple[Tensor, Tensor]:
    """The ``sum(x) > 0`` task as vectors (MLP) or ``1 x image x image`` maps (CNN)."""
    image = config.cnn_image if arch == "cnn" else 0
    return sum_sign_data(samples, config.classic_features, seed=seed, image=image)


def measure(model: nn.Module, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-block weight-gradient L2 (tracker) and block-output gradient L2 on one batch; head excluded.

    Returns:
        ``(weight_grad_l2, output_grad_l2)``, one value per block, in depth order.
    """
    tracker = GradientFlowTracker(model, exclude=("*.norm.*", "head.*"), track_update_ratio=False)
    outputs: list[Tensor] = []

    def keep(module: nn.Module, args: object, output: Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    handles = [block.register_forward_hook(keep) for block in model.blocks]
    model.zero_grad(set_to_none=True)
    tracker.start_discovery()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    tracker.stop_discovery()
    for handle in handles:
        handle.remove()
    loss.backward()
    tracker.capture(step=0, params=model.parameters())
    record = tracker.finalize()
    hidden = np.array([float(o.grad.norm()) if o.grad is not None else np.nan for o in outputs])
    model.zero_grad(set_to_none=True)
    return record.metrics["grad_l2"], hidden


def train(model: nn.Module, arch: str, steps: int, config: StudyConfig) -> None:
    """``steps`` Adam steps on fresh batches of the task (plain loop: the sweep has ~100 nets)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.adam_lr)
    x, y = task(arch, steps * config.classic_batch_size, config, seed=config.seed + 7)
    for xb, yb in zip(x.split(config.classic_batch_size), y.split(config.classic_batch_size)):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
        optimizer.step()


def row(arch: str, spec: NetSpec, when: str, weight: np.ndarray, hidden: np.ndarray) -> dict:
    """Slopes (decades lost per layer going backwards) and the 5- and 10-layer ratios they imply."""
    depth = np.arange(len(weight))
    slope, r2 = fit_decay(depth[1:], weight[1:])
    hidden_slope, _ = fit_decay(depth[1:], hidden[1:])
    finite = np.isfinite(weight) & (weight > 0)
    return {
        "arch": arch,
        "activation": spec.activation,
        "init": spec.init,
        "structure": structure_name(spec.norm, spec.residual),
        "when": when,
        "decades_per_layer": slope,
        "r2": r2,
        "ratio_5_layers": 10 ** (-5 * slope) if math.isfinite(slope) else np.nan,
        "ratio_10_layers": 10 ** (-10 * slope) if math.isfinite(slope) else np.nan,
        "hidden_decades_per_layer": hidden_slope,
        "first_over_last_block": float(weight[1] / weight[-1]) if finite[1] and finite[-1] else np.nan,
        "weight_grad_l2": " ".join(f"{v:.3g}" for v in weight),
        "output_grad_l2": " ".join(f"{v:.3g}" for v in hidden),
    }


def sweep(config: StudyConfig) -> pd.DataFrame:
    """Every architecture x activation x init x structure, at initialisation and (optionally) trained."""
    rows = []
    for arch in ARCHITECTURES:
        steps = config.decay_train_steps if arch == "mlp" else config.cnn_train_steps
        x, y = task(arch, config.decay_probe, config, seed=config.seed + 3)
        for activation, init, (norm, residual) in itertools.product(
            config.decay_activations, config.decay_inits, STRUCTURES
        ):
            seed_everything(config.seed)
            spec = NetSpec(activation, norm=norm, residual=residual, init=init)
            model = build(arch, spec, config)
            rows.append(row(arch, spec, "init", *measure(model, x, y)))
            if steps > 0:
                train(model, arch, steps, config)
                rows.append(row(arch, spec, f"after {steps} steps", *measure(model, x, y)))
    return pd.DataFrame(rows)


def run(config: StudyConfig, out: Path) -> list[Claim]:
    """Run the sweep, write ``decay_*`` tables and figures, return the claims."""
    table = sweep(config)
    write_table(table.drop(columns=["weight_grad_l2", "output_grad_l2"]), out / "decay_slopes")
    table.to_csv(out / "decay_profiles.csv", index=False)
    plot_profiles(table, config, out / "decay_profiles.png")
    plot_slopes(table, out / "decay_slopes.png")
    return claims(table, config)


def _plain(table: pd.DataFrame, arch: str = "mlp", when: str = "init") -> pd.DataFrame:
    return table[(table.arch == arch) & (table.structure == "plain") & (table.when == when)]


def claims(table: pd.DataFrame, config: StudyConfig) -> list[Claim]:
    """Decay claims with verdicts computed from the sweep."""
    found: list[Claim] = []
    sigmoid = table[(table.activation == "sigmoid") & (table.structure == "plain")]
    if not sigmoid.empty:
        at_init = sigmoid[sigmoid.when == "init"]
        detail = "; ".join(
            f"{r.arch}/{r.init}: {r.decades_per_layer:.2f} (x{fmt(10**-r.decades_per_layer)})"
            for r in at_init.itertuples()
        )
        # "at most 0.25": the measured factor per layer (10^-slope) is <= 0.25, with 10% tolerance
        within = at_init[10**-at_init.decades_per_layer <= CLAIMED_FACTOR * 1.1]
        beyond = at_init.drop(within.index)
        verdict_class, verdict = _partial_verdict(len(within), len(beyond))
        if verdict_class == HOLDS_ONLY_WHEN:
            verdict = (
                f"{HOLDS_ONLY_WHEN} the net is "
                + ", ".join(f"{r.arch}/{r.init}" for r in within.itertuples())
                + "; not for "
                + ", ".join(f"{r.arch}/{r.init} (x{fmt(10**-r.decades_per_layer)})" for r in beyond.itertuples())
                + ", whose larger weights offset part of the 0.25"
            )
        found.append(
            Claim(
                "decay",
                "Each sigmoid layer multiplies the gradient by at most 0.25 (plain nets, at init)",
                f"{CLAIMED_DECADES:.2f} decades lost per layer (x0.25)",
                f"decades/layer {detail}",
                verdict_class,
                verdict,
            )
        )
        for layers, claimed in ((5, CLAIMED_FACTOR**5), (10, CLAIMED_FACTOR**10)):
            column = f"ratio_{layers}_layers"
            ratios = at_init[column]
            worst, best = float(ratios.min()), float(ratios.max())
            trained = sigmoid[(sigmoid.when != "init") & (sigmoid[column] > claimed * 3)]
            verdict_class, verdict = _depth_verdict(at_init, trained, column, claimed * 3)
            found.append(
                Claim(
                    "decay",
                    f"{layers} sigmoid layers shrink the gradient by ~{fmt(claimed, 1)} or more",
                    fmt(claimed),
                    f"{fmt(worst)} .. {fmt(best)} over {len(at_init)} sigmoid nets (MLP/CNN x inits); "
                    f"after training: {_range(sigmoid[sigmoid.when != 'init'][column])}",
                    verdict_class,
                    verdict,
                )
            )
    found += _remedy_claims(table)
    return found


def _partial_verdict(matching: int, failing: int) -> tuple[str, str]:
    """``holds`` if every configuration matches, ``holds only when`` (explained by the caller) if some do."""
    if not failing:
        return HOLDS, ""
    return (HOLDS_ONLY_WHEN, "") if matching else (DOES_NOT_HOLD, "")


def _depth_verdict(at_init: pd.DataFrame, trained: pd.DataFrame, column: str, bound: float) -> tuple[str, str]:
    """Verdict of "N sigmoid layers shrink the gradient by ~0.25^N": every net at init, and after training.

    Args:
        at_init: The plain sigmoid nets at initialisation.
        trained: The trained plain sigmoid nets whose ratio exceeds ``bound`` (decay weaker than claimed).
        column: ``ratio_5_layers`` or ``ratio_10_layers``.
        bound: The largest ratio that still counts as the claimed decay (3x the claimed value).
    """
    ok = at_init[at_init[column] <= bound]
    names = ", ".join(f"{r.arch}/{r.init}" for r in ok.itertuples())
    exceptions = ", ".join(f"{r.arch}/{r.init} ({fmt(getattr(r, column))})" for r in trained.itertuples())
    if ok.empty:
        return DOES_NOT_HOLD, f"{DOES_NOT_HOLD} (less decay than claimed)"
    if len(ok) == len(at_init) and trained.empty:
        return HOLDS, ""
    if len(ok) == len(at_init):
        verdict = f"{HOLDS_ONLY_WHEN} measured at init (all {len(ok)} nets); after training not for {exceptions}"
        return HOLDS_ONLY_WHEN, verdict
    verdict = f"{HOLDS_ONLY_WHEN} the net is {names} (at init)"
    return HOLDS_ONLY_WHEN, verdict + (f"; after training not for {exceptions}" if exceptions else "")


def _range(values: pd.Series) -> str:
    values = values.dropna()
    return f"{fmt(float(values.min()))} .. {fmt(float(values.max()))}" if len(values) else "not measured"


def _remedy_claims(table: pd.DataFrame) -> list[Claim]:
    """ReLU / BN / residual / init claims: |decades per layer| <= 0.1 counts as 'no vanishing'."""
    flat = 0.1
    found = []
    at_init = table[table.when == "init"]
    relu = at_init[(at_init.activation == "relu") & (at_init.structure == "plain")]
    sigmoid = at_init[(at_init.activation == "sigmoid") & (at_init.structure == "plain")]
    if not relu.empty and not sigmoid.empty:
        flat_inits = relu[relu.decades_per_layer.abs() <= flat]
        detail = "; ".join(f"{r.arch}/{r.init}: {r.decades_per_layer:.2f}" for r in relu.itertuples())
        verdict_class, verdict = _partial_verdict(len(flat_inits), len(relu) - len(flat_inits))
        if verdict_class == HOLDS_ONLY_WHEN:
            names = ", ".join(sorted({f"{r.arch}/{r.init}" for r in flat_inits.itertuples()}))
            verdict = f"{HOLDS_ONLY_WHEN} the init is right ({names})"
        found.append(
            Claim(
                "decay",
                "ReLU (derivative 1 for positive inputs) does not vanish",
                f"~0 decades per layer (|slope| <= {flat})",
                f"plain ReLU nets at init, decades/layer {detail}",
                verdict_class,
                verdict,
            )
        )
    for structure, name in (("BN", "BatchNorm stops"), ("res", "Residual connections stop")):
        rows = at_init[(at_init.activation == "sigmoid") & (at_init.structure == structure)]
        if rows.empty:
            continue
        fixed = rows[rows.decades_per_layer.abs() <= 0.2]
        detail = "; ".join(f"{r.arch}/{r.init}: {r.decades_per_layer:.2f}" for r in rows.itertuples())
        verdict_class, verdict = _partial_verdict(len(fixed), len(rows) - len(fixed))
        if verdict_class == HOLDS_ONLY_WHEN:
            verdict = f"{HOLDS_ONLY_WHEN} the net is " + ", ".join(f"{r.arch}/{r.init}" for r in fixed.itertuples())
        found.append(
            Claim(
                "decay",
                f"{name} the sigmoid stack's gradient from vanishing",
                "~0 decades per layer (|slope| <= 0.2)",
                f"sigmoid+{structure} at init, decades/layer {detail}",
                verdict_class,
                verdict,
            )
        )
    he = at_init[(at_init.init == "he") & (at_init.activation == "relu") & (at_init.structure == "plain")]
    xavier = at_init[(at_init.init == "xavier") & (at_init.activation == "tanh") & (at_init.structure == "plain")]
    for rows, name in (
        (he, "He init keeps ReLU nets' gradients constant across depth"),
        (xavier, "Xavier init keeps tanh nets' gradients constant across depth"),
    ):
        if rows.empty:
            continue
        worst = float(rows.decades_per_layer.abs().max())
        detail = "; ".join(f"{r.arch}: {r.decades_per_layer:.3f}" for r in rows.itertuples())
        found.append(
            Claim(
                "decay",
                name,
                f"~0 decades per layer (|slope| <= {flat})",
                f"decades/layer {detail}",
                HOLDS if worst <= flat else DOES_NOT_HOLD,
            )
        )
    return found


def plot_profiles(table: pd.DataFrame, config: StudyConfig, path: Path) -> None:
    """Per-layer weight-gradient norm vs depth of the plain nets at init: rows MLP/CNN, columns inits.

    BatchNorm and residual variants are summarised by their slopes in :func:`plot_slopes`.
    """
    archs = [a for a in ARCHITECTURES if (table.arch == a).any()]
    inits = list(dict.fromkeys(table.init))
    fig, axes = subplots(
        len(archs), len(inits), figsize=(5.2 * len(inits), 4.3 * len(archs)), squeeze=False, sharey="row"
    )
    colors = dict(zip(("sigmoid", "tanh", "relu", "leaky_relu", "silu"), TAB10))
    styles = {"relu": "-", "leaky_relu": "--"}  # the two nearly coincide at init
    for r, arch in enumerate(archs):
        for c, init in enumerate(inits):
            ax = axes[r][c]
            rows = table[(table.arch == arch) & (table.when == "init") & (table.structure == "plain")]
            rows = rows[rows.init == init]
            for item in rows.itertuples():
                values = np.array([float(v) for v in item.weight_grad_l2.split()])
                ax.semilogy(
                    range(len(values)),
                    values,
                    styles.get(item.activation, "-"),
                    color=colors[item.activation],
                    marker="o",
                    ms=3,
                    lw=1.6,
                    label=f"{item.activation}: {item.decades_per_layer:.2f} dec/layer",
                )
            sigmoid = rows[rows.activation == "sigmoid"]
            if len(sigmoid):
                last = float(sigmoid.iloc[0].weight_grad_l2.split()[-1])
                depth = np.arange(config.decay_depth)
                claimed = last * CLAIMED_FACTOR ** (depth[-1] - depth)
                ax.semilogy(depth, claimed, color="black", lw=1, ls=":", label="claimed: x0.25 per layer")
            ax.set_title(f"{arch.upper()}, {init} init, no BN / shortcut (at init)", fontsize=10)
            ax.set_xlabel("block depth (0 = input block; fit over 1..end)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        axes[r][0].set_ylabel("weight grad L2 (probe batch)")
    fig.suptitle(f"Per-layer gradient norm of {config.decay_depth}-block nets at initialisation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_slopes(table: pd.DataFrame, path: Path) -> None:
    """Heat map of decades lost per layer: rows activation/init, columns structure x (init, trained)."""
    archs = [a for a in ARCHITECTURES if (table.arch == a).any()]
    fig, axes = subplots(1, len(archs), figsize=(8 * len(archs), 7), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = table[table.arch == arch]
        grid = rows.pivot_table(
            index=["activation", "init"], columns=["when", "structure"], values="decades_per_layer", sort=False
        )
        values = grid.to_numpy()
        image = ax.imshow(np.clip(values, -1.5, 1.5), cmap="RdBu_r", vmin=-1.5, vmax=1.5, aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(value) > 0.9 else "black",
            )
        ax.set_xticks(range(values.shape[1]), [f"{s}\n{w}" for w, s in grid.columns], fontsize=7)
        ax.set_yticks(range(values.shape[0]), [f"{a} ({i})" for a, i in grid.index], fontsize=8)
        ax.set_title(f"{arch.upper()}: decades of gradient lost per layer (red = vanishing, blue = growing)")
        fig.colorbar(image, ax=ax, shrink=0.7, label=f"claimed for sigmoid: {CLAIMED_DECADES:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
