"""Rebuild ``no_bn_norms.json``: per-block ``grad_l2`` of a real BatchNorm-free and an intact yolo11n run.

    scripts/ablate_detector.sh --preset smoke --variants no_bn,intact --epochs 30 --out /tmp/cs/nobn30
    cd tests/casestudies/detection/data
    python make_no_bn_norms.py /tmp/cs/nobn30 "<command> at <commit>" > no_bn_norms.json

Keeps the first two blocks and the last two (the reference of the diagnosis and the ends of the early/late
ratio) at every second step (the default preset's logging interval), 4 significant digits. A third argument
keeps every n-th recorded step instead; ``no_bn_warmup_norms.json`` is the default preset's history, already
logged every second step::

    python make_no_bn_norms.py /work/runs/sweep_default/lr-0.01 "<command> at <commit>" 1 > no_bn_warmup_norms.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gradlight

BLOCKS = ("model.model.0", "model.model.1", "model.model.22", "model.model.23")


def extract(grid: Path, stride: int = 2) -> dict[str, object]:
    """The fixture's content from the grid folder ``grid`` (runs/no_bn and runs/intact)."""
    runs: dict[str, object] = {}
    for variant in ("no_bn", "intact"):
        folder = grid / "runs" / variant / "gradlight"
        frame = gradlight.load_history(folder)
        table = frame[frame.metric == "grad_l2"].pivot(index="step", columns="layer", values="value")
        table = table[list(BLOCKS)].iloc[::stride]
        layers = json.loads((folder / "run.json").read_text())["layers"]
        runs[variant] = {
            "num_params": [next(int(e["num_params"]) for e in layers if e["name"] == name) for name in BLOCKS],
            "steps": [int(s) for s in table.index],
            "grad_l2": [[float(f"{v:.4g}") for v in row] for row in table.to_numpy()],
        }
    return {"source": sys.argv[2] if len(sys.argv) > 2 else "", "layers": list(BLOCKS), "runs": runs}


if __name__ == "__main__":
    print(json.dumps(extract(Path(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 2), separators=(",", ":")))
