#!/usr/bin/env bash
# Re-make the logged-step cost tables on an idle machine, in one command (expected 4-6 min on an idle 2-core
# CPU, at most ~10; 648 s measured under load 9-10 with 124M skipped):
#
#   PYTHON=.venv/bin/python bash benchmarks/perf_tables.sh [OUT_DIR]    # default OUT_DIR: /tmp/gradlight_perf
#
# 1. benchmarks/scale.py: GPT-2 1M..124M, the tracker's logged step beside AdamW's step() and the read floor
#    (README "Cost at scale" table and docs/performance.md "Cost at scale"). A size whose estimated time is
#    above --budget (240 s) is skipped and says so: on a busy machine that drops 51M/124M.
# 2. benchmarks/small_overhead.py: every-step logging with the diagnosis on against a bare twin, resnet18 and
#    resnet18 with zero_init_residual at 32 px (default, two-pass gradient statistics and eager kernels side by
#    side), then yolo11n at 320 px (docs/performance.md "The fixed cost of a logged step on small models").
#
# Each table is printed and saved under OUT_DIR with the commit, the date and the load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=. YOLO_OFFLINE=1
python=${PYTHON:-python}
out=${1:-/tmp/gradlight_perf}
mkdir -p "$out"
start=$SECONDS
{ echo "commit $(git rev-parse --short HEAD)"; date; echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"; } | tee "$out/meta.txt"
"$python" benchmarks/scale.py --rounds 5 --budget 240 2>&1 | grep -v "No CUDA runtime" | tee "$out/scale.md"
"$python" benchmarks/small_overhead.py --models resnet18 resnet18_zero_init --steps 20 --warmup 3 \
    --variants default two_pass eager 2>&1 | grep -v "No CUDA runtime\|writing the run" | tee "$out/small_resnet18.md"
"$python" benchmarks/small_overhead.py --models yolo11n --steps 8 --warmup 2 2>&1 \
    | grep -v "No CUDA runtime\|writing the run" | tee "$out/small_yolo11n.md"
{ echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"; echo "wall: $((SECONDS - start)) s"; } | tee -a "$out/meta.txt"
