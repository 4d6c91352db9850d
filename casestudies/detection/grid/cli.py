"""The command line of ``scripts/ablate_detector.sh`` / ``python -m casestudies.detection.grid``.

Example:
    >>> config = config_from_args(build_parser().parse_args(["--preset", "smoke", "--seeds", "0,1"]))
    >>> config.seeds, config.out
    ([0, 1], 'runs/ablate_detector/smoke')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from casestudies.detection.grid.config import (
    BASELINE,
    NO_AUGMENT,
    PRECISIONS,
    STANDARD_VARIANTS,
    GridConfig,
    GridError,
    available_presets,
    load_preset,
)
from casestudies.detection.grid.validation import validate
from casestudies.detection.variants import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/ablate_detector.sh`` / ``python -m casestudies.detection.grid``."""
    parser = argparse.ArgumentParser(
        prog="ablate_detector.sh",
        description="Train YOLO ablation variants (Lightning + gradlight) and the Ultralytics baseline, then "
        "write OUT/summary.csv, OUT/summary.json, OUT/report.html and plots comparing gradient flow and mAP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument("--preset", default="default", help="settings to start from (default: %(default)s)")
    parser.add_argument("--data", help="'synthetic', a data YAML path, or a bare name Ultralytics ships")
    parser.add_argument("--model", help="model YAML for every run, e.g. yolo11n.yaml or yolo26n.yaml")
    parser.add_argument(
        "--variants", help=f"comma-separated runs: {', '.join(STANDARD_VARIANTS)}, {BASELINE} (the baseline)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs of every run")
    parser.add_argument("--imgsz", type=int, help="image size")
    parser.add_argument("--batch", type=int, help="batch size per optimizer step (Ultralytics nbs = batch)")
    parser.add_argument(
        "--devices",
        type=int,
        help="GPUs per run, more than 1 trains with DDP; without GPUs, CPU processes (DDP over gloo, the same "
        "gradients as one process; the Ultralytics baseline then trains in one process). --batch is the global "
        "batch: it must be a multiple of --devices",
    )
    parser.add_argument("--workers", type=int, help="dataloader workers on GPU (CPU runs use 0)")
    parser.add_argument("--log-every-n-steps", type=int, help="gradient-flow logging interval")
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="switch Ultralytics' augmentation off in both trainers (mosaic, flips, HSV, scale, translate), as "
        "the coco8-overfit preset does",
    )
    parser.add_argument(
        "--precision",
        help=f"Lightning precision of the variants: {' or '.join(PRECISIONS)} (default: 32-true; 64-true is "
        "float64, for numerical checks such as --devices N against one process); the baseline trains in float32",
    )
    parser.add_argument(
        "--backward-signal",
        action=argparse.BooleanOptionalAction,
        help="tap the backward signal (gradient w.r.t. each YOLO block's output, block gains) of every run on "
        "logged steps (default: on; --no-backward-signal turns it off)",
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 0,1,2: the grid once per seed (initial weights and data order), "
        "into OUT/seed-<s>/, then OUT/aggregate.csv with mean, std, min and max per variant",
    )
    parser.add_argument(
        "--vary-data",
        action="store_true",
        help="with --seeds: a new synthetic data set per seed (default: one fixed data set for every seed)",
    )
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: rebuild the summaries, plots, report and aggregate from the runs in OUT "
        "(unfinished runs are reported missing); takes the settings of the grid in OUT",
    )
    parser.add_argument("--out", help="output folder (default: runs/ablate_detector/<preset>)")
    parser.add_argument("--resume", action="store_true", help="skip finished runs in OUT, continue unfinished ones")
    parser.add_argument(
        "--verify",
        metavar="AGGREGATE_CSV",
        help="after training (or with --summarize-only, reading OUT), print every run's cells against a published "
        "aggregate (docs/case_study/*_aggregate.csv) and exit 1 when one lies outside its seed range [min, max] "
        "at the printed digits",
    )
    return parser


def _epilog() -> str:
    lines = ["presets (configs/detection/presets/*.yaml):"]
    for name in available_presets():
        description = (load_preset(name).get("description") or "").strip()
        lines.append(f"  {name:<15}{description}")
    lines += [
        "",
        "variants:",
        *(f"  {name:<18} {variant.note}" for name, variant in VARIANTS.items()),
        f"  {BASELINE:<18} The unmodified model trained by Ultralytics' own DetectionTrainer.",
        "",
        "outputs: OUT/runs/<variant>/ (history in gradlight/, result.json, loss.csv, checkpoints),",
        "  OUT/summary.csv, OUT/summary.json, OUT/report.html, OUT/*.png",
        "--resume: finished runs (result.json present) are kept; an unfinished Lightning run continues from",
        "  its checkpoints/last.ckpt, an unfinished baseline from its weights/last.pt (Ultralytics' resume).",
        "",
        "examples:",
        "  scripts/ablate_detector.sh",
        "  scripts/ablate_detector.sh --preset smoke --out /tmp/smoke",
        "  scripts/ablate_detector.sh --seeds 0,1,2 --out runs/seeds   # then OUT/aggregate.csv",
        "  scripts/ablate_detector.sh --variants intact,no_bn,ultralytics --epochs 4",
        "  scripts/ablate_detector.sh --preset coco8-overfit --data /tmp/coco8/coco8.yaml",
        "  scripts/ablate_detector.sh --preset coco --devices 8",
        "  scripts/ablate_detector.sh --preset smoke --devices 2 --out /tmp/smoke2   # 2 CPU processes, no GPU",
    ]
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> GridConfig:
    """Preset values, then command-line overrides; validated (raises :class:`GridError`)."""
    values = load_preset(args.preset)
    values["preset"] = args.preset
    for name in ("data", "model", "epochs", "imgsz", "batch", "devices", "workers", "log_every_n_steps", "precision"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.no_augment:
        values["augment"] = {**values.get("augment", {}), **NO_AUGMENT}
    if args.backward_signal is not None:
        values["backward_signal"] = args.backward_signal
    if args.variants is not None:
        values["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.seeds is not None:
        values["seeds"] = _parse_seeds(args.seeds)
    if args.vary_data:
        values["vary_data"] = True
    values["out"] = args.out or str(Path("runs/ablate_detector") / args.preset)
    values["resume"] = bool(args.resume or args.summarize_only)  # same settings as the runs in OUT
    config = GridConfig(**values)
    validate(config)
    return config


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GridError(f"--seeds {text!r} is not valid; give comma-separated integers such as 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/ablate_detector.sh``; returns the exit code."""
    from casestudies.detection.grid.runner import run_grid, summarize_grid
    from casestudies.detection.offline import configure_offline

    args = build_parser().parse_args(argv)
    configure_offline()  # before anything imports ultralytics (data checks, training)
    try:
        config = config_from_args(args)
    except GridError as error:
        print(f"ablate_detector: error: {error}", file=sys.stderr)
        return 2
    if args.verify is not None and not Path(args.verify).is_file():
        print(f"ablate_detector: error: --verify {args.verify!r} is not a file", file=sys.stderr)
        return 2
    code = summarize_grid(config) if args.summarize_only else run_grid(config)
    if args.verify is None or code != 0:
        return code
    from casestudies.detection.verify import verify

    return verify(Path(args.verify), Path(config.out))
