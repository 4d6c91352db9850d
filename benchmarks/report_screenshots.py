"""Draw reports of the readability runs and screenshot them in headless Chromium (1400 px wide).

The runs are those of ``tests/gradlight/test_report_readability.py``: a small CNN (resnet18), a GPT-2 with
more than 100 layers, a run with one logged step, and two MLPs compared. Needs a ``chromium`` binary (Debian:
``apt-get install chromium``)::

    OMP_NUM_THREADS=1 python benchmarks/report_screenshots.py --out runs/screenshots

Writes ``<out>/<name>/report.html`` and ``<out>/<name>.png`` (the whole page) for each.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from gradlight.report import build_report
from tests.gradlight import test_report_readability as runs


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 6000) -> None:
    """Screenshot ``page`` with headless Chromium at ``width`` pixels (``height`` tall, page length)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium binary on PATH (apt-get install chromium)")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/screenshots"))
    args = parser.parse_args()
    data = args.out / "runs"
    reports = {
        "small_cnn": [runs.small_cnn_run(data)],
        "transformer": [runs.transformer_run(data)],
        "one_step": [runs.one_step_run(data)],
        "comparison": [f"{name}={path}" for name, path in runs.comparison_runs(data)],
    }
    for name, specs in reports.items():
        page = build_report(specs, args.out / name, progress=False)
        screenshot(page, args.out / f"{name}.png")
        print(args.out / f"{name}.png")


if __name__ == "__main__":
    main()
