"""Load a trained ``DetectorModule`` checkpoint and score it (the one module that needs both).

``module.py`` trains and validates with ``evaluate.py``; loading a checkpoint back needs ``module.py``, and the
command line that scores it needs ``evaluate.py`` too: both live here, so neither of those imports the other
back. Ultralytics is imported when a function runs, after :func:`~casestudies.detection.offline.configure_offline`
in the command line.

Launch::

    python -m casestudies.detection.checkpoint runs/detection/shapes/intact/.../last.ckpt --data synthetic --imgsz 128
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ultralytics.nn.tasks import DetectionModel


def load_trained_detector(checkpoint: str, use_ema: bool = True) -> DetectionModel:
    """Return the detector of a ``DetectorModule`` checkpoint, with its EMA weights when it has them.

    Args:
        checkpoint: Path of a Lightning checkpoint written by ``python -m casestudies.detection fit``.
        use_ema: Load the EMA weights (what the in-loop validation scores) instead of the raw ones.

    Example:
        >>> ckpt = "runs/detection/shapes/intact/lightning_logs/version_0/checkpoints/last.ckpt"
        >>> model = load_trained_detector(ckpt)  # doctest: +SKIP
    """
    from casestudies.detection.module import DetectorModule

    module = DetectorModule.load_from_checkpoint(checkpoint, map_location="cpu")
    model = module.model
    if use_ema and module._pending_ema_state is not None:
        model = copy.deepcopy(module.model)
        model.load_state_dict(module._pending_ema_state["state_dict"])
    return model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Score a checkpoint: ``python -m casestudies.detection.checkpoint CKPT --data synthetic --imgsz 128``."""
    from casestudies.detection.offline import configure_offline

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", help="Lightning checkpoint of a DetectorModule")
    parser.add_argument("--data", default="synthetic", help="'synthetic', a data YAML path, ...")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--split", default="val")
    parser.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    parser.add_argument("--cross-check", action="store_true", help="also score with torchmetrics and Ultralytics")
    args = parser.parse_args(argv)
    configure_offline()  # before the first import of ultralytics
    from casestudies.detection.evaluate import cross_check_detector, evaluate_detector

    model = load_trained_detector(args.checkpoint, use_ema=not args.raw)
    if args.cross_check:
        result: dict[str, Any] = cross_check_detector(model, args.data, args.imgsz, args.batch, args.split)
    else:
        result = evaluate_detector(model, args.data, args.imgsz, args.batch, args.split)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
