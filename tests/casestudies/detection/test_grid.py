"""The ablation grid end to end: smoke preset, resume after a crash, bad options, baseline layer names."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from casestudies.detection import grid, summary
from gradlight import load_history

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "ablate_detector.sh"
SMOKE_VARIANTS = ["intact", "stripped_sigmoid", "ultralytics"]
#: The grid child with a hard exit injected (see ``_crashing_child``); the run names and the spec follow.
CRASHING_CHILD = (sys.executable, "-m", "tests.casestudies.detection._crashing_child")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("grid") / "smoke"
    return run_script("--preset", "smoke", "--out", str(out), timeout=1200), out  # 3 runs; shared CPUs


@pytest.mark.slow
def test_smoke_preset_writes_every_column_and_a_row_per_variant(smoke):
    process, out = smoke
    assert process.returncode == 0, process.stdout + process.stderr
    frame = pd.read_csv(out / "summary.csv")
    assert set(summary.COLUMNS) <= set(frame.columns)
    assert frame["variant"].tolist() == SMOKE_VARIANTS
    assert frame["trainer"].tolist() == ["lightning", "lightning", "ultralytics"]
    assert (frame["status"] == "done").all()
    numeric = ["params", "epochs", "images_per_s", "final_train_loss", "map50_95", "map50"]
    numeric += ["grad_ratio_early_late", "min_layer_grad_l2"]
    assert frame[numeric].notna().all().all(), frame[numeric]
    assert (frame["epochs"] == 2).all() and (frame["images_per_s"] > 0).all()
    records = json.loads((out / "summary.json").read_text())
    assert [r["variant"] for r in records] == SMOKE_VARIANTS
    for name in ("report.html", "map_vs_grad_ratio.png", "loss_curves.png", "grad_profiles.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "Ablation grid: summary" in (out / "report.html").read_text()
    assert all(name in process.stdout for name in SMOKE_VARIANTS)  # the printed table
    # The textbook net starves its first layer; the intact one does not.
    ratios = frame.set_index("variant")["grad_ratio_early_late"]
    assert ratios["stripped_sigmoid"] < 1e-2 * ratios["intact"]


@pytest.mark.slow
def test_report_holds_the_gradlight_report_of_every_run(smoke):
    process, out = smoke
    assert process.returncode == 0, process.stdout + process.stderr
    gradlight_page = (out / "report" / "report.html").read_text()
    page = (out / "report.html").read_text()
    assert "could not be built" not in page
    for name in SMOKE_VARIANTS:
        assert name in gradlight_page
        heatmap = out / "report" / f"{name}_heatmap.png"
        assert heatmap.stat().st_size > 1000, name
        # The grid page embeds the gradlight report itself: this run's heat map, byte for byte.
        assert base64.b64encode(heatmap.read_bytes()).decode() in page, name
    assert page.index("Ablation grid: summary") < page.index(base64.b64encode(heatmap.read_bytes()).decode())


@pytest.mark.slow
def test_baseline_history_has_the_layers_of_the_lightning_intact_run(smoke):
    process, out = smoke
    assert process.returncode == 0, process.stderr
    intact = load_history(out / "runs" / "intact" / "gradlight")
    baseline = load_history(out / "runs" / "ultralytics" / "gradlight")
    assert set(baseline["layer"]) == set(intact["layer"])
    signal = {metric for metric in intact["metric"] if metric.startswith("signal_")}  # the Lightning taps only
    assert set(baseline["metric"]) >= set(intact["metric"]) - {"activation"} - signal
    layers = [
        json.loads((out / "runs" / n / "gradlight" / "run.json").read_text())["layers"]
        for n in ("intact", "ultralytics")
    ]
    assert [layer["name"] for layer in layers[0]] == [layer["name"] for layer in layers[1]]
    assert layers[0][0]["name"] == "model.model.0"


@pytest.mark.slow
def test_intact_history_has_backward_signal_rows_for_the_yolo_blocks(smoke):
    process, out = smoke
    assert process.returncode == 0, process.stderr
    history = load_history(out / "runs" / "intact" / "gradlight")
    signal = history[history["metric"].str.startswith("signal_")]
    blocks = set(history.loc[history["metric"] == "grad_l2", "layer"])  # the layer grouping: one per YOLO block
    assert len(blocks) == 18 and "model.model.0" in blocks and "model.model.23" in blocks
    steps = sorted(history.loc[history["metric"] == "grad_l2", "step"].unique())
    for metric in ("signal_l2", "signal_in_l2", "signal_gain", "signal_max_abs", "signal_calls"):
        rows = signal[signal["metric"] == metric]
        assert set(rows["layer"]) == blocks, metric  # every block tapped, and nothing else
        assert rows.groupby("step")["layer"].nunique().to_dict() == dict.fromkeys(steps, 18), metric
    l2 = signal[signal["metric"] == "signal_l2"]["value"]
    assert (l2 > 0).all() and l2.notna().all()
    assert (signal[signal["metric"] == "signal_calls"]["value"] == 1).all()  # no YOLO block runs twice
    baseline = load_history(out / "runs" / "ultralytics" / "gradlight", metrics=["signal_l2"])
    assert set(baseline["layer"]) == blocks  # the baseline taps the same blocks, under the same names
    page = (out / "report.html").read_text()
    figures = ["intact_signal_heatmap.png", "intact_gain_profile.png", "compare_gains.png"]  # the last: all runs
    for figure in (out / "report" / name for name in figures):
        assert base64.b64encode(figure.read_bytes()).decode() in page, figure.name


def test_backward_signal_is_on_by_default_and_can_be_switched_off(tmp_path):
    def spec(*args: str) -> grid.RunSpec:
        config = grid.config_from_args(grid.build_parser().parse_args(["--out", str(tmp_path / "g"), *args]))
        return grid.RunSpec.of("intact", config, str(tmp_path / "data.yaml"))

    assert spec().backward_signal is True
    assert spec("--no-backward-signal").backward_signal is False
    assert grid.RunSpec.from_json(spec("--no-backward-signal").to_json()).backward_signal is False
    with pytest.raises(grid.GridError, match="backward_signal 'yes' is not valid"):
        grid.validate(grid.GridConfig(out=str(tmp_path / "g"), backward_signal="yes"))  # type: ignore[arg-type]


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_continues_interrupted_ones(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    args = ("--preset", "smoke", "--variants", "intact,stripped_sigmoid,ultralytics", "--out", str(out))
    monkeypatch.chdir(ROOT)  # the injected child is a module of the tests package
    config = grid.config_from_args(grid.build_parser().parse_args(list(args)))
    handler = signal.getsignal(signal.SIGTERM)
    assert grid.run_grid(config, child_command=(*CRASHING_CHILD, "stripped_sigmoid:1,ultralytics:1")) == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # the grid's own SIGTERM handler is gone again
    runs = {name: out / "runs" / name for name in ("intact", "stripped_sigmoid", "ultralytics")}
    assert grid.is_finished(runs["intact"])
    assert not grid.is_finished(runs["stripped_sigmoid"]) and not grid.is_finished(runs["ultralytics"])
    assert (runs["stripped_sigmoid"] / "checkpoints" / "last.ckpt").exists()
    assert (runs["ultralytics"] / "ultralytics" / "weights" / "last.pt").exists()
    kept = {p: p.stat().st_mtime_ns for p in runs["intact"].rglob("*") if p.is_file()}

    refused = run_script(*args)  # without --resume, finished runs are never overwritten
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert grid.main([*args, "--resume", "--epochs", "3"]) == 2  # nor mixed with other settings

    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "intact: finished earlier, kept" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing of the finished run was touched
    for name in ("stripped_sigmoid", "ultralytics"):
        assert json.loads((runs[name] / "result.json").read_text())["resumed"] is True
        history = load_history(runs[name] / "gradlight")
        steps = history[history["metric"] == "grad_l2"].groupby("step")["layer"].count()
        assert steps.index.tolist() == list(range(8))  # 2 epochs x 4 steps, each exactly once
        assert steps.nunique() == 1  # every step has every layer
        assert len(list((runs[name] / "gradlight" / "history").glob("segment-*.arrow"))) == 2
    frame = pd.read_csv(out / "summary.csv")
    assert frame["variant"].tolist() == ["intact", "stripped_sigmoid", "ultralytics"]
    assert (frame["status"] == "done").all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "intact,no_such_variant"], "unknown variant(s) no_such_variant"),
        (["--data", "/no/such/data.yaml"], "--data '/no/such/data.yaml' does not exist"),
        (["--epochs", "-3"], "--epochs -3 is not valid"),
        (["--preset", "nope"], "--preset 'nope' does not exist"),
        (["--model", "yolo11n.pt"], "give a model YAML"),
        (["--imgsz", "100"], "multiple of 32"),
        (["--batch", "9", "--devices", "2"], "--batch 9 is not divisible by --devices 2"),
        (["--precision", "16-true"], "--precision '16-true' is not valid; use one of 32-true, 64-true"),
    ],
)
def test_bad_options_exit_non_zero_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert grid.main([*args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was prepared or trained


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("val", "images not found, missing path"),  # Ultralytics' own check, reworded
        ("train", "the 'train' images are missing at"),  # Ultralytics checks val only
    ],
)
def test_local_data_yaml_with_missing_images_exits_before_training(tmp_path, capsys, missing, message):
    root = tmp_path / "data"
    for split in ("train", "val"):
        if split != missing:
            (root / "images" / split).mkdir(parents=True)
    data = root / "broken.yaml"
    data.write_text("train: images/train\nval: images/val\nnames: {0: thing}\n")
    out = tmp_path / "out"
    assert grid.main(["--preset", "smoke", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--data {str(data)!r}" in err and message in err, err
    assert str(root / "images" / missing) in err  # names the missing folder
    assert not out.exists()  # nothing was prepared or trained


def test_script_reports_bad_options_and_help(tmp_path):
    bad = run_script("--variants", "intact,bogus", "--out", str(tmp_path / "x"), timeout=120)
    assert bad.returncode == 2
    assert "unknown variant(s) bogus" in bad.stderr
    assert not (tmp_path / "x").exists()
    usage = run_script("--help", timeout=120)
    assert usage.returncode == 0
    for word in ("--preset", "--resume", "--devices", "smoke", "coco8-overfit", "ultralytics"):
        assert word in usage.stdout


def test_presets_are_valid_configs():
    assert {"default", "smoke", "coco8", "coco8-overfit", "coco"} <= set(grid.available_presets())
    for name in grid.available_presets():
        config = grid.GridConfig(**grid.load_preset(name))
        assert set(config.variants) <= {*grid.STANDARD_VARIANTS, grid.BASELINE}
    default = grid.GridConfig(**grid.load_preset("default"))
    assert default.variants == [*grid.STANDARD_VARIANTS, grid.BASELINE] and default.data == "synthetic"


def test_gradient_columns_use_the_last_quarter_of_logged_steps():
    rows = []
    for step, ratio in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-3, 1e-5]):
        rows.append({"step": step, "layer": "__global__", "depth": -1, "metric": "early_late_ratio", "value": ratio})
        for depth, layer in enumerate(["a", "b"]):
            value = ratio if layer == "a" else 1.0
            rows.append({"step": step, "layer": layer, "depth": depth, "metric": "grad_l2", "value": value})
    columns = summary.gradient_columns(pd.DataFrame(rows))
    assert columns["grad_ratio_early_late"] == pytest.approx((1e-3 + 1e-5) / 2)
    assert columns["min_layer"] == "a"
    assert columns["min_layer_grad_l2"] == pytest.approx((1e-3 + 1e-5) / 2)


def test_stop_kills_a_run_that_ignores_sigterm():
    # Lightning catches SIGTERM; a run that does not exit in the grace period is killed, never left behind
    ignoring = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    assert grid.stop(process, grace_seconds=0.5) == -signal.SIGKILL
    assert process.poll() is not None


# ------------------------------------------------------------------------------ issue 25: verify, trainers
SMOKE_AGGREGATE = ROOT / "docs" / "case_study" / "smoke_aggregate.csv"


def test_verify_passes_on_the_smoke_preset_and_fails_on_a_perturbed_aggregate(smoke, tmp_path, capsys):
    """The smoke grid, re-run, lies in the committed single-seed aggregate to the printed digit (a CPU run is
    deterministic); moving one published cell by one printed digit makes --verify fail."""
    from casestudies.detection import verify

    process, out = smoke
    assert process.returncode == 0, process.stderr
    assert verify.verify(SMOKE_AGGREGATE, out) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert "OUTSIDE" not in printed and "intact" in printed and "ultralytics" in printed
    perturbed = pd.read_csv(SMOKE_AGGREGATE)
    row = perturbed["variant"] == "intact"
    perturbed.loc[row, ["final_train_loss_min", "final_train_loss_max"]] += 0.002
    perturbed.to_csv(tmp_path / "perturbed.csv", index=False)
    assert verify.verify(tmp_path / "perturbed.csv", out) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "OUTSIDE" in line]
    assert len(lines) == 1 and lines[0].split()[:3] == ["intact", "-", "final_train_loss"]


def test_lightning_and_ultralytics_make_the_same_first_steps(tmp_path):
    """Same initial weights, augmentation off, one batch = the whole training set (32 images): the same images
    at every step. Step 0's per-layer gradients agree to 1e-5 (measured 5e-7: summation order), step 1's to
    1e-3 (measured 3e-5: that rounding, amplified); the updates never differ more than the gradients."""
    from casestudies.detection import compare_trainers

    out = tmp_path / "cmp"
    args = ("--preset", "smoke", "--variants", "intact,ultralytics", "--no-augment", "--batch", "32")
    process = run_script(*args, "--epochs", "2", "--out", str(out), timeout=1200)  # two runs; shared CPUs
    assert process.returncode == 0, process.stderr
    table = compare_trainers.compare_runs(out)
    assert set(table["step"]) == {0, 1}
    worst = compare_trainers.per_step(table)
    compared = set(table[(table["step"] == 0) & (table["quantity"] == "grad_l2")]["layer"])
    for name in ("intact", "ultralytics"):  # every block with parameters (yolo11n: 24 minus 6 Upsample/Concat)
        history = load_history(out / "runs" / name / "gradlight")
        assert set(history[(history["step"] == 0) & (history["metric"] == "grad_l2")]["layer"]) == compared
    assert len(compared) == 18
    assert worst.loc[0, "loss"] <= 1e-6 and worst.loc[0, "grad_l2"] <= 1e-5 and worst.loc[1, "grad_l2"] <= 1e-3
    assert worst.loc[0, "update_ratio"] <= 2 * max(worst.loc[0, "grad_l2"], 1e-7)
    assert compare_trainers.first_difference(table, rtol=1e-3) is None
