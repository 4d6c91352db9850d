"""Experiment 4: exploding gradients from a too-large init or learning rate, and gradient clipping.

The classic task's 10-layer ReLU + He MLP (the net that trains fine in experiment 1) is broken two ways:

* **too-large init**: every weight times ``explode_init_scale`` (3 by default), so each layer multiplies the
  forward signal and the backward gradient by ~3: the early layers' gradients are ~3^10 times the last ones';
* **too-large learning rate**: plain SGD at ``explode_lr`` (1.0, 100x the working rate).

Each runs with and without ``Trainer(gradient_clip_val=clip_val)`` under :class:`gradlight.GradientFlowMonitor`.
The monitor reads gradients *before* clipping, so a clipped run still shows how large the raw gradient is;
what clipping bounds is the gradient the optimizer applies, recorded after every step by
:class:`AppliedNorm` (``applied_grad_l2``: the global L2 norm of the gradients ``optimizer.step`` consumed,
i.e. after clipping), and through it the update (``update_ratio``) and whether the weights, and therefore
later gradients, blow up. gradlight's ``exploding`` / ``non_finite`` findings are counted too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from casestudies.textbook.common import (
    DOES_NOT_HOLD,
    HOLDS,
    HOLDS_ONLY_WHEN,
    Claim,
    fit,
    fmt,
    global_series,
    layer_table,
    load_findings_of,
    seed_everything,
    subplots,
    write_table,
)
from casestudies.textbook.config import StudyConfig
from casestudies.textbook.models import MLP, Classifier, NetSpec, loader, sum_sign_data

#: Relative slack on "applied norm <= clip_val": float32 rounding of the rescaled gradients.
CLIP_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExplodeRun:
    """One exploding-experiment run."""

    name: str
    init_scale: float
    lr: float
    clip: float | None


class AppliedNorm(L.Callback):
    """Global L2 norm of the gradients each ``optimizer.step`` applied (after Lightning's clipping).

    A step post-hook on the optimizer reads ``p.grad`` once the step is done: Lightning clips between
    ``backward`` and the update, and zeroes the gradients only before the next ``training_step``, so what is
    read is exactly what the update used. One value per optimizer step, in :attr:`norms`.
    """

    def __init__(self) -> None:
        self.norms: list[float] = []
        self._handles: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handles = [optimizer.register_step_post_hook(self._record) for optimizer in trainer.optimizers]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        squares = sum(float(torch.sum(g.double() ** 2)) for g in grads)
        self.norms.append(math.sqrt(squares) if math.isfinite(squares) else float("nan"))


def runs_for(config: StudyConfig) -> list[ExplodeRun]:
    """Baseline, too-large init and too-large learning rate, each without and with clipping."""
    runs = [ExplodeRun("baseline", 1.0, config.sgd_lr, None)]
    for name, scale, lr in (
        ("large_init", config.explode_init_scale, config.sgd_lr),
        ("large_lr", 1.0, config.explode_lr),
    ):
        runs.append(ExplodeRun(name, scale, lr, None))
        runs.append(ExplodeRun(f"{name}_clipped", scale, lr, config.clip_val))
    return runs


def run_one(spec: ExplodeRun, config: StudyConfig, out: Path) -> tuple[dict, pd.DataFrame, pd.Series]:
    """Train one run; return its summary row, its history and the applied (post-clip) norm per step."""
    seed_everything(config.seed)
    x, y = sum_sign_data(config.classic_samples, config.classic_features, seed=config.seed)
    x_val, y_val = sum_sign_data(config.classic_samples, config.classic_features, seed=config.seed + 1)
    net = MLP(
        config.classic_features,
        config.classic_width,
        config.classic_depth,
        NetSpec("relu", init="he", init_scale=spec.init_scale),
    )
    module = Classifier(net, "sgd", spec.lr)
    save_dir = out / "runs" / "exploding" / spec.name
    applied = AppliedNorm()
    history = fit(
        module,
        loader(x, y, config.classic_batch_size, shuffle=True, seed=config.seed),
        loader(x_val, y_val, len(x_val), shuffle=False),
        save_dir,
        config.explode_epochs,
        config.log_every_n_steps,
        gradient_clip_val=spec.clip,
        callbacks=[applied],
    )
    applied_norm = pd.Series(applied.norms, name="applied_grad_l2", dtype=float)
    norm = global_series(history, "global_grad_l2")
    nonfinite = global_series(history, "global_grad_nonfinite")
    ratio = global_series(history, "early_late_ratio")
    updates = layer_table(history, "update_ratio")
    finite = norm[np.isfinite(norm)]
    bad_steps = int(((nonfinite > 0) | ~np.isfinite(norm)).sum())
    first_bad = norm.index[((nonfinite > 0) | ~np.isfinite(norm)).to_numpy()]
    findings = load_findings_of(save_dir)
    epochs = pd.DataFrame(module.epochs)
    row = {
        "run": spec.name,
        "init_scale": spec.init_scale,
        "lr": spec.lr,
        "clip": spec.clip if spec.clip is not None else np.nan,
        "steps": len(norm),
        "grad_l2_step0": float(norm.iloc[0]),
        "grad_l2_max_finite": float(finite.max()) if len(finite) else np.nan,
        "grad_l2_last": float(norm.iloc[-1]),
        "growth_max_over_step0": float(finite.max() / norm.iloc[0]) if len(finite) else np.nan,
        "early_late_ratio_step0": float(ratio.iloc[0]),
        "nonfinite_steps": bad_steps,
        "first_nonfinite_step": int(first_bad[0]) if len(first_bad) else np.nan,
        "update_ratio_max": float(np.nanmax(updates.to_numpy())) if updates.size else np.nan,
        **applied_summary(applied_norm, spec.clip),
        "weights_finite_end": bool(all(torch.isfinite(p).all() for p in net.parameters())),
        "val_acc_final": float(epochs.val_acc.iloc[-1]) if len(epochs) else np.nan,
        "findings_exploding": _count(findings, "exploding"),
        "findings_non_finite": _count(findings, "non_finite"),
    }
    return row, history, applied_norm


def applied_summary(applied: pd.Series, clip: float | None) -> dict[str, float]:
    """Largest applied norm, how many applied norms were non-finite, and how many exceeded ``clip``."""
    finite = applied[np.isfinite(applied)]
    over = (finite > clip * (1 + CLIP_TOLERANCE)).sum() if clip is not None else np.nan
    return {
        "applied_grad_l2_max": float(finite.max()) if len(finite) else np.nan,
        "applied_nonfinite_steps": int((~np.isfinite(applied)).sum()),
        "applied_over_clip_steps": float(over),
    }


def _count(findings: pd.DataFrame, kind: str) -> float:
    return float((findings["kind"] == kind).sum()) if len(findings) else 0.0


def run(config: StudyConfig, out: Path) -> tuple[list[Claim], list[Path]]:
    """Run all exploding runs, write ``exploding_*`` tables and figure; return claims and run folders."""
    rows, histories, applied = [], {}, {}
    specs = runs_for(config)
    for spec in specs:
        row, history, applied[spec.name] = run_one(spec, config, out)
        rows.append(row)
        histories[spec.name] = history
    table = pd.DataFrame(rows)
    write_table(table, out / "exploding_summary")
    steps = pd.concat(applied, names=["run", "step"]).reset_index()
    steps.to_csv(out / "exploding_applied_grad_l2.csv", index=False)
    plot(histories, applied, config, out / "exploding.png")
    return claims(table, config), [out / "runs" / "exploding" / s.name for s in specs]


def _blown(row: pd.Series) -> bool:
    """Exploded: non-finite gradients, or a raw gradient norm 1000x its first value."""
    return bool(row.nonfinite_steps > 0 or row.growth_max_over_step0 >= 1e3 or not math.isfinite(row.grad_l2_last))


def claims(table: pd.DataFrame, config: StudyConfig) -> list[Claim]:
    """Exploding/clipping claims with verdicts computed from ``table``."""
    by = table.set_index("run")
    found: list[Claim] = []
    depth = config.classic_depth
    if "large_init" in by.index and "baseline" in by.index:
        row, base = by.loc["large_init"], by.loc["baseline"]
        claimed = config.explode_init_scale**depth
        growth = float(row.grad_l2_step0 / base.grad_l2_step0)
        holds = abs(math.log10(growth / claimed)) <= 1.0
        flat = abs(math.log10(row.early_late_ratio_step0 / base.early_late_ratio_step0)) <= 1.0
        verdict = f"{HOLDS} (for the whole net, not early vs late: every layer's weight gradient grows alike)"
        found.append(
            Claim(
                "exploding",
                f"Weights {config.explode_init_scale:g}x too large blow the gradient up exponentially with depth",
                f"~{config.explode_init_scale:g}^{depth} = {fmt(claimed)} x the He-init gradient norm",
                f"global grad L2 at step 0: {fmt(row.grad_l2_step0)} vs {fmt(base.grad_l2_step0)} "
                f"(x{fmt(growth)}); first/last layer {fmt(row.early_late_ratio_step0)} vs "
                f"{fmt(base.early_late_ratio_step0)}",
                HOLDS if holds else DOES_NOT_HOLD,
                verdict if holds and flat else "",
            )
        )
    for name, what in (("large_init", "too-large init"), ("large_lr", f"learning rate {config.explode_lr:g}")):
        if name not in by.index:
            continue
        row = by.loc[name]
        findings = (
            f"; diagnosis findings: {int(row.findings_exploding)} exploding, {int(row.findings_non_finite)} non_finite"
            if math.isfinite(row.findings_exploding)
            else "; diagnosis not available (findings not measured)"
        )
        found.append(
            Claim(
                "exploding",
                f"With a {what}, SGD training blows up (gradients explode, then turn NaN/Inf)",
                "gradient norm grows by orders of magnitude / non-finite",
                f"raw global grad L2 {fmt(row.grad_l2_step0)} at step 0, max finite {fmt(row.grad_l2_max_finite)}, "
                f"{int(row.nonfinite_steps)}/{int(row.steps)} steps non-finite, final accuracy {row.val_acc_final:.1%}"
                + findings,
                HOLDS if _blown(row) else DOES_NOT_HOLD,
            )
        )
        clipped = f"{name}_clipped"
        if clipped in by.index:
            crow = by.loc[clipped]
            found.append(
                Claim(
                    "exploding",
                    f"Gradient clipping (norm {config.clip_val:g}) stops the blow-up ({what})",
                    "finite, bounded gradients; training proceeds",
                    f"{int(crow.nonfinite_steps)}/{int(crow.steps)} steps non-finite, applied (clipped) grad L2 "
                    f"max {fmt(crow.applied_grad_l2_max)}, raw grad L2 max {fmt(crow.grad_l2_max_finite)} "
                    f"(unclipped {fmt(row.grad_l2_max_finite)}), max update/param {fmt(crow.update_ratio_max)} "
                    f"(unclipped {fmt(row.update_ratio_max)}), final accuracy {crow.val_acc_final:.1%}",
                    *_clip_verdict(crow),
                )
            )
    return found


def _clip_verdict(row: pd.Series) -> tuple[str, str]:
    """Clipping holds if every step stays finite, every applied norm is <= clip and the net learns (>= 90%)."""
    bounded = bool(
        row.nonfinite_steps == 0
        and row.applied_nonfinite_steps == 0
        and row.applied_over_clip_steps == 0
        and row.weights_finite_end
        and math.isfinite(row.grad_l2_last)
    )
    if not bounded:
        return DOES_NOT_HOLD, ""
    if row.val_acc_final >= 0.9:
        return HOLDS, ""
    return HOLDS_ONLY_WHEN, (
        f"{HOLDS_ONLY_WHEN} 'stops the blow-up' means finite, bounded steps: no NaN/Inf and every applied norm "
        f"<= {row['clip']:g}, but the net does not learn ({row.val_acc_final:.1%} < 90%)"
    )


def plot(histories: dict[str, pd.DataFrame], applied: dict[str, pd.Series], config: StudyConfig, path: Path) -> None:
    """Raw global gradient norm per step (log), non-finite steps marked with x at the top; clipped runs'
    applied (post-clip) norm dashed."""
    fig, axes = subplots(1, 2, figsize=(13, 4.8), sharey=True)
    styles = {"baseline": ("black", "-")}
    for ax, group in zip(axes, ("large_init", "large_lr")):
        for name in ("baseline", group, f"{group}_clipped"):
            if name not in histories:
                continue
            norm = global_series(histories[name], "global_grad_l2")
            color, style = styles.get(name, ("tab:red" if not name.endswith("clipped") else "tab:blue", "-"))
            finite = norm.where(np.isfinite(norm))
            ax.semilogy(norm.index, finite, style, color=color, lw=1.3, marker="o", ms=2, label=name)
            if name.endswith("clipped") and name in applied:
                after = applied[name]
                ax.semilogy(after.index, after.values, "--", color=color, lw=1.3, label=f"{name}: applied (clipped)")
            bad = norm.index[~np.isfinite(norm.to_numpy())]
            if len(bad):
                top = np.nanmax(norm.where(np.isfinite(norm)).to_numpy()) if np.isfinite(norm).any() else 1.0
                ax.plot(bad, np.full(len(bad), top * 3), "x", color=color, ms=3, label=f"{name}: non-finite")
        ax.axhline(config.clip_val, color="tab:blue", ls=":", lw=1, label=f"clip_val={config.clip_val:g}")
        title = {"large_init": f"init x{config.explode_init_scale:g}", "large_lr": f"SGD lr={config.explode_lr:g}"}
        ax.set(title=f"{title[group]} (ReLU + He MLP, depth {config.classic_depth})", xlabel="optimizer step")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("global grad L2 (raw; dashed: applied, after clipping)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
