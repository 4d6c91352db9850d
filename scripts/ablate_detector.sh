#!/usr/bin/env bash
# Train the YOLO ablation grid (Lightning + gradlight) and the Ultralytics baseline, then compare them.
#
#   scripts/ablate_detector.sh                                   # offline default preset, < 30 min on 2 CPU cores
#   scripts/ablate_detector.sh --preset smoke --out /tmp/smoke   # < 3 min
#   scripts/ablate_detector.sh --resume --out runs/ablate_detector/default
#   scripts/ablate_detector.sh --seeds 0,1,2 --out runs/seeds                # once per seed + OUT/aggregate.csv
#   scripts/ablate_detector.sh --seeds 0,1,2 --resume --out runs/seeds       # skips finished seed-variant pairs
#   scripts/ablate_detector.sh --preset smoke --devices 2 --out /tmp/smoke2  # no GPU: DDP over 2 CPU processes
#   scripts/ablate_detector.sh --help
#
# A thin wrapper over `python -m casestudies.detection.grid`: every option is passed through unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export YOLO_OFFLINE="${YOLO_OFFLINE:-1}" YOLO_AUTOINSTALL=0
exec "$PYTHON" -m casestudies.detection.grid "$@"
