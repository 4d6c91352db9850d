"""The `gradlight` command line.

A bad input goes through the installed console script as a subprocess, proving `pip install -e .`
installed it and that the exit code (2) and the one-line message reach the shell. Starting the script
imports torch and Lightning (through `gradlight/__init__`), which costs seconds, so it starts while a real
Lightning run trains. Every other case, the end-to-end report of that run included, calls
`gradlight.cli.main`, the function the script runs, in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from html import escape
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from gradlight import GradientFlowMonitor
from gradlight.cli import build_parser, main
from gradlight.history import HistoryWriter
from gradlight.report.loggers import log_figures
from gradlight.runfolder import load_findings
from tests.gradlight.models import Net
from tests.gradlight.test_report import IMG, tear, vanishing_finding, write_run

SCRIPT = Path(sys.executable).with_name("gradlight")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class CliRun:
    root: Path
    results: dict[str, Result]
    e2e_figures_logged: int
    e2e_log_dir: Path


def _inputs(root: Path) -> None:
    write_run(root / "ok", findings=[vanishing_finding()])
    write_run(root / "ok2", "healthy")
    tear(write_run(root / "torn", steps=5, keep_open=True))
    (root / "empty" / "history").mkdir(parents=True)
    HistoryWriter(root / "unreadable").close()
    (root / "unreadable" / "history" / "segment-00000.arrow").write_bytes(b"\xff\xff")
    (root / "plain").mkdir()
    write_run(root / "two" / "version_0" / "gradlight")
    write_run(root / "two" / "version_1" / "gradlight")


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(process: subprocess.Popen[str]) -> Result:
    stdout, stderr = process.communicate(timeout=300)
    return Result(process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    assert SCRIPT.exists(), f"the console script is not installed next to {sys.executable}"
    root = tmp_path_factory.mktemp("cli")
    processes = {"missing": _spawn(["report", str(root / "does-not-exist"), "--out", str(root / "out")])}
    try:
        # While that starts up: a real Lightning run of a sigmoid MLP (it vanishes) logging to TensorBoard.
        logger = TensorBoardLogger(root / "tb", name="lightning_logs")
        monitor = GradientFlowMonitor(log_every_n_steps=2, track_activations=True)  # taps the MLP's sigmoids
        trainer = L.Trainer(
            max_steps=12,
            log_every_n_steps=2,
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=[monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the monitor warns about the (intended) vanishing gradient
            trainer.fit(Net("mlp", lr=0.5))
        assert monitor.save_dir is not None
        logged = log_figures(trainer.loggers, monitor.save_dir, trainer.global_step, findings=monitor.recorder.findings)
        logger.experiment.flush()
        _inputs(root)
        results = {name: _collect(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return CliRun(root, results, logged, Path(logger.log_dir))


def test_a_bad_input_through_the_script_exits_2_with_one_line(cli: CliRun) -> None:
    result = cli.results["missing"]
    assert result.returncode == 2, result.stderr
    expected = f"gradlight: error: {str(cli.root / 'does-not-exist')!r} does not exist"
    assert result.stderr.strip().splitlines() == [expected]


def test_end_to_end_on_a_real_lightning_run(cli: CliRun, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli.root / "out_e2e"
    result = run_main(["report", str(cli.e2e_log_dir), "--out", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning, no progress bar (stderr is not a terminal)
    assert result.stdout.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    # heat map, profile, ratio, norm, update ratio, activations (the MLP's sigmoids are tapped)
    names = ["heatmap", "profile", "ratio", "global_norm", "update_ratio", "activations"]
    assert sorted(path.name for path in out.glob("*.png")) == sorted(f"version_0_{name}.png" for name in names)
    assert len(IMG.findall(page)) == 6
    assert "Run: version_0" in page and "Net" in page  # label from the log_dir, model from run.json
    findings = load_findings(cli.e2e_log_dir / "gradlight")  # the count the API gives (duplicates dropped)
    assert len(findings) > 0 and f"Findings ({len(findings)})" in page
    for message in findings["message"]:
        assert escape(message) in page
    assert (out / "version_0_heatmap.png").stat().st_size > 10_000
    # log_figures sent the heat map and the profile to TensorBoard
    assert cli.e2e_figures_logged == 2
    assert any(cli.e2e_log_dir.glob("events.out.tfevents.*"))


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: --help, usage errors
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    top = run_main(["--help"], capsys)
    assert top.returncode == 0 and "report" in top.stdout and "--version" in top.stdout
    report = run_main(["report", "--help"], capsys)
    assert report.returncode == 0
    for option in ("RUN", "LABEL=PATH", "--out", "--title", "--dpi", "--progress", "--no-progress", "exit status"):
        assert option in report.stdout, option
    assert run_main([], capsys).returncode == 2
    missing_out = run_main(["report", "somewhere"], capsys)
    assert missing_out.returncode == 2 and "--out" in missing_out.stderr
    assert build_parser().parse_args(["report", "a", "b=c", "-o", "x"]).runs == ["a", "b=c"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("{root}/plain", r"no gradlight history in .*plain"),
        ("{root}/empty", r"the history in .*empty/history' is empty"),
        ("{root}/unreadable", r"is truncated and nothing is readable \(segment-00000\.arrow: 0 rows"),
        ("a=b={root}/ok", r"expected PATH or LABEL=PATH with a single '='"),
        ("={root}/ok", r"empty label"),
        ("x={root}/ok x={root}/ok2", r"duplicate run label\(s\): 'x'"),
        ("{root}/two", r"holds 2 gradlight histories.*version_0/gradlight.*version_1/gradlight"),
        ("{root}/ok --dpi 5", r"--dpi must be at least 20"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    cli: CliRun, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    args = [arg.format(root=cli.root) for arg in case.split()]
    result = run_main(["report", *args, "--out", str(cli.root / "out")], capsys)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradlight: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (cli.root / "out").exists()  # nothing written


def test_truncated_history_is_reported_with_a_warning(cli: CliRun, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli.root / "out_torn"
    result = run_main(["report", str(cli.root / "torn"), "--out", str(out), "--no-progress"], capsys)
    assert result.returncode == 0, result.stderr
    assert "gradlight report: warning:" in result.stderr and "truncated" in result.stderr
    assert "steps 0-30" in result.stderr
    page = (out / "report.html").read_text()
    assert "truncated" in page and len(IMG.findall(page)) == 6
    assert result.stdout.strip() == str(out / "report.html")
