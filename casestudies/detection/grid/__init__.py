"""Train the ablation grid and the Ultralytics baseline, then compare gradient flow and mAP in one report.

Launch commands::

    scripts/ablate_detector.sh                       # offline default: synthetic shapes, 6 variants + baseline
    scripts/ablate_detector.sh --preset smoke        # < 3 min end to end (what the tests run)
    scripts/ablate_detector.sh --resume --out runs/ablate_detector   # continue an interrupted grid
    scripts/ablate_detector.sh --seeds 0,1,2 --out runs/seeds        # once per seed, then mean/std/min/max
    python -m casestudies.detection.grid --preset coco8-overfit --data /tmp/coco8/coco8.yaml
    python -m casestudies.detection.grid --preset coco --devices 8  # GPUs, DDP
    scripts/ablate_detector.sh --preset smoke --devices 2          # no GPU: 2 CPU processes (DDP, gloo)

Every run (one per variant, plus ``ultralytics``) goes to ``OUT/runs/<name>/`` and is trained in its own
subprocess (clean memory, and Lightning's DDP launcher re-runs that subprocess's command per rank). With
``--devices N`` a Lightning variant trains on N processes that together compute the one-process gradient of
the global batch ``--batch`` (:mod:`casestudies.detection.distributed`); without GPUs these are CPU processes
and the Ultralytics baseline, whose DDP needs CUDA, trains in one (its ``result.json`` says so). A run is
finished when its ``result.json`` exists; ``--resume`` skips finished runs, continues an unfinished Lightning
run from ``checkpoints/last.ckpt`` (the gradlight monitor continues its history) and an unfinished baseline
from ``ultralytics/weights/last.pt`` (Ultralytics' own resume; its history continues too). At the end:
``OUT/summary.csv``/``.json``, ``OUT/report.html`` and the plots ``OUT/map_vs_grad_ratio.png``,
``OUT/loss_curves.png``, ``OUT/grad_profiles.png``.

With ``--seeds 0,1,2`` each seed's grid is one such folder, ``OUT/seed-<s>/`` (seeds change the initial
weights and the data order; the synthetic data set is generated once, in ``OUT/data``, unless ``--vary-data``),
and :mod:`casestudies.detection.seeds` aggregates them into ``OUT/aggregate.csv``/``.json``,
``OUT/per_seed.csv`` and error-bar plots. ``--resume`` then skips every finished seed-variant pair.

One file per concern: :mod:`~.config` (the :class:`GridConfig` and its presets), :mod:`~.cli` (the command
line), :mod:`~.validation` (every option checked before training), :mod:`~.prepare` (the data set),
:mod:`~.spec` (:class:`RunSpec`, what a run's subprocess is told), :mod:`~.runner` (the parent: one
subprocess per run, resume, summaries), :mod:`~.progress` (the progress bar) and :mod:`~.child` (the
subprocess: trains one run).
"""

from casestudies.detection.grid.cli import build_parser, config_from_args, main
from casestudies.detection.grid.config import (
    BASELINE,
    RESULT,
    STANDARD_VARIANTS,
    GridConfig,
    GridError,
    available_presets,
    load_preset,
    seed_config,
)
from casestudies.detection.grid.prepare import prepare_data
from casestudies.detection.grid.runner import (
    CHILD_COMMAND,
    finish,
    is_finished,
    launch,
    run_grid,
    run_info,
    stop,
    summarize_grid,
)
from casestudies.detection.grid.spec import RunSpec
from casestudies.detection.grid.validation import validate

__all__ = [
    "BASELINE",
    "CHILD_COMMAND",
    "RESULT",
    "STANDARD_VARIANTS",
    "GridConfig",
    "GridError",
    "RunSpec",
    "available_presets",
    "build_parser",
    "config_from_args",
    "finish",
    "is_finished",
    "launch",
    "load_preset",
    "main",
    "prepare_data",
    "run_grid",
    "run_info",
    "seed_config",
    "stop",
    "summarize_grid",
    "validate",
]
