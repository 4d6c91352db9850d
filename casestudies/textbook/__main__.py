"""The textbook claims about vanishing (and exploding) gradients, measured. Runs on CPU in a few minutes.

Launch (from the repository root, with the package installed)::

    # the full study (~3-4 min on 2 CPU cores): tables, figures, gradlight report, summary
    OMP_NUM_THREADS=1 python -m casestudies.textbook --out runs/textbook
    # the seconds-long version the tests use (same effects, smaller nets, no training in decay/recurrent)
    OMP_NUM_THREADS=1 python -m casestudies.textbook --out /tmp/textbook-quick --quick
    # one or two experiments only
    OMP_NUM_THREADS=1 python -m casestudies.textbook --out runs/textbook --only classic exploding
    # override any StudyConfig field
    OMP_NUM_THREADS=1 python -m casestudies.textbook --out runs/tb-deep --set decay_depth=20 rnn_steps=100

Writes to ``--out``: ``summary.csv`` / ``summary.md`` (one row per claim: claim, claimed value, measured
value, verdict), one table and one figure per experiment (``classic*``, ``decay*``, ``recurrent*``,
``exploding*``), the monitored runs' histories under ``runs/``, ``report/report.html`` (``gradlight.report``),
and ``config.json`` / ``timings.json``.

Experiments (one file each): :mod:`~casestudies.textbook.classic` (the 10-layer sigmoid MLP demo and its
fix), :mod:`~casestudies.textbook.decay` (decay per layer across activations, norms, shortcuts, inits),
:mod:`~casestudies.textbook.recurrent` (RNN vs LSTM/GRU through time), :mod:`~casestudies.textbook.exploding`
(too-large init / learning rate, and clipping). Models are in :mod:`~casestudies.textbook.models`, settings
in :class:`~casestudies.textbook.config.StudyConfig`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from casestudies.textbook import classic, decay, exploding, recurrent
from casestudies.textbook.common import Claim, build_report, claims_frame, save_json, write_table
from casestudies.textbook.config import StudyConfig

EXPERIMENTS = ("classic", "decay", "recurrent", "exploding")


def quiet() -> None:
    """Silence Lightning's banners and the warnings tiny CPU runs trigger (one-batch val, few workers)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``field=value`` strings to typed :class:`StudyConfig` overrides (values parsed as Python literals)."""
    known = {f.name for f in fields(StudyConfig)}
    overrides: dict[str, object] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in known:
            raise SystemExit(f"--set: unknown StudyConfig field {name!r}; known: {sorted(known)}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text
    return overrides


def run_study(
    config: StudyConfig, out: Path, only: tuple[str, ...] = EXPERIMENTS, report: bool = True
) -> dict[str, object]:
    """Run the selected experiments into ``out``; return claims, run folders, report path and timings.

    Args:
        config: The settings.
        out: Output folder (created).
        only: Experiments to run, in order.
        report: Build the gradlight report over the monitored runs (when ``gradlight.report`` exists).
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    save_json(out / "config.json", asdict(config))
    claims: list[Claim] = []
    monitored: list[Path] = []
    timings: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    for name in only:
        began, cpu_began = time.perf_counter(), time.process_time()
        print(f"[textbook] {name} ...", file=sys.stderr, flush=True)
        if name == "classic":
            found, runs = classic.run(config, out)
            monitored += runs
        elif name == "decay":
            found = decay.run(config, out)
        elif name == "recurrent":
            found = recurrent.run(config, out)
        elif name == "exploding":
            found, runs = exploding.run(config, out)
            monitored += runs
        else:
            raise ValueError(f"unknown experiment {name!r}; choose from {EXPERIMENTS}")
        claims += found
        timings[name] = time.perf_counter() - began
        timings[f"{name}_cpu"] = time.process_time() - cpu_began
        print(f"[textbook] {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)
    table = claims_frame(claims)
    write_table(table, out / "summary")
    report_path = None
    if monitored and report:
        began = time.perf_counter()
        report_path = build_report([f"{path.parent.name}/{path.name}={path}" for path in monitored], out / "report")
        timings["report"] = time.perf_counter() - began
    timings["total"] = time.perf_counter() - start
    timings["total_cpu"] = time.process_time() - cpu_start  # shared machines: CPU time is the stabler number
    save_json(out / "timings.json", timings)
    return {"claims": table, "runs": monitored, "report": report_path, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m casestudies.textbook", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="seconds-long version (used by the tests)")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="StudyConfig overrides")
    parser.add_argument("--no-report", action="store_true", help="skip the gradlight report")
    args = parser.parse_args(argv)
    quiet()
    overrides = parse_overrides(args.set)
    config = StudyConfig.quick(**overrides) if args.quick else StudyConfig(**overrides)  # type: ignore[arg-type]
    result = run_study(config, args.out, tuple(args.only), report=not args.no_report)
    print((args.out / "summary.md").read_text())
    timings = result["timings"]
    assert isinstance(timings, dict)
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
