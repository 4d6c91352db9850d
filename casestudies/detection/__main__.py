"""Train ablated YOLO detectors in Lightning with the gradlight monitor (LightningCLI entry point).

Launch commands (configs compose left to right: defaults, then a data preset, then a variant)::

    # offline default: synthetic shapes, 128 px, yolo11n, 2 CPU cores (~2 min per variant)
    python -m casestudies.detection fit --config configs/detection/defaults.yaml \\
        --config configs/detection/synthetic.yaml --model.variant intact
    python -m casestudies.detection fit --config configs/detection/defaults.yaml \\
        --config configs/detection/synthetic.yaml --model.variant stripped_sigmoid

    # COCO8 real images, overfit protocol (evaluates on the 4 training images)
    python -m casestudies.detection fit --config configs/detection/defaults.yaml \\
        --config configs/detection/coco8_overfit.yaml --model.variant no_bn \\
        --data.data /path/to/coco8/coco8.yaml

    # full COCO on 8 GPUs (DDP is Lightning's job; nothing else changes)
    python -m casestudies.detection fit --config configs/detection/defaults.yaml \\
        --config configs/detection/coco.yaml --model.variant intact \\
        --trainer.devices 8 --trainer.strategy ddp

    # any switch on the command line: explicit ablations on top of a variant, another model
    python -m casestudies.detection fit --config configs/detection/defaults.yaml \\
        --config configs/detection/synthetic.yaml --model.model yolo26n.yaml \\
        --model.activation relu --model.scope all --model.training '{lr0: 0.005}'

Runs land in ``runs/detection/<data>/<variant>/`` (Lightning logs, checkpoints, and the gradient history in
``lightning_logs/version_N/gradlight``; read it with ``gradlight.load_history``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI


def run_name(data: str, overfit: bool, variant: str, explicit: dict[str, Any]) -> str:
    """Folder name of a run: ``<data>/<variant>`` plus any explicit ablation switches.

    Example:
        >>> run_name("configs/coco8.yaml", True, "intact", {"activation": "relu"})
        'coco8_overfit/intact+activation=relu'
    """
    data_name = Path(str(data)).stem + ("_overfit" if overfit else "")
    suffix = "".join(f"+{key}={value}" for key, value in explicit.items() if value is not None)
    return f"{data_name}/{variant}{suffix}"


class DetectionCLI(LightningCLI):
    """LightningCLI that links data classes into the model and names the run folder after data and variant."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link ``data.num_classes`` and ``data.names`` into the model."""
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.names", "model.names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Default ``trainer.default_root_dir`` to ``runs/detection/<data>/<variant>``."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None or config.trainer.get("default_root_dir"):
            return
        model, data = config.model, config.data
        explicit = {key: model.get(key) for key in ("residual", "batchnorm", "activation", "scope", "weight_init")}
        config.trainer.default_root_dir = str(
            Path("runs/detection") / run_name(data.data, data.overfit, model.variant, explicit)
        )


def main(args: list[str] | None = None) -> DetectionCLI:
    """Run the CLI (``python -m casestudies.detection fit --config ...``), with Ultralytics kept offline."""
    from casestudies.detection.offline import configure_offline

    configure_offline()  # before the first import of ultralytics (module, data)
    from casestudies.detection.data import YoloDataModule
    from casestudies.detection.module import DetectorModule

    return DetectionCLI(DetectorModule, YoloDataModule, args=args, seed_everything_default=0)


if __name__ == "__main__":
    main()
