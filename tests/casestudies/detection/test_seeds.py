"""The grid once per seed: aggregate statistics, missing seeds, resume per seed-variant pair, end to end."""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from casestudies.detection import grid, seeds
from tests.casestudies.detection.test_grid import run_script

SMOKE_VARIANTS = ["intact", "stripped_sigmoid", "ultralytics"]


def per_seed_rows() -> pd.DataFrame:
    """Three seeds of two variants, with hand-picked values (seed 2 of ``no_bn`` failed)."""
    return pd.DataFrame(
        {
            "seed": [0, 1, 2, 0, 1, 2],
            "variant": ["intact"] * 3 + ["no_bn"] * 3,
            "trainer": ["lightning"] * 6,
            "status": ["done", "done", "done", "done", "done", "missing"],
            "map50_95": [0.20, 0.23, 0.26, 0.0, 0.01, 0.9],
            "map50": [0.33, 0.36, 0.30, 0.0, 0.02, 0.9],
            "grad_ratio_early_late": [0.1, 1.0, 10.0, 1e-4, 1e-3, 1.0],
            "first_layer_grad_l2": [30.0, 35.0, 40.0, 0.02, 0.03, 50.0],
            "final_train_loss": [5.8, 5.7, 5.9, 9.3, 9.2, 1.0],
        }
    )


def test_aggregate_is_mean_std_min_max_of_the_per_seed_rows():
    rows = per_seed_rows()
    table = seeds.aggregate(rows, seeds=[0, 1, 2]).set_index("variant")
    intact = rows[rows["variant"] == "intact"]
    for name, column in [("map50_95", "map50_95"), ("map50", "map50"), ("final_train_loss", "final_train_loss")]:
        values = intact[column].tolist()
        assert table.loc["intact", f"{name}_mean"] == pytest.approx(statistics.mean(values))
        assert table.loc["intact", f"{name}_std"] == pytest.approx(statistics.stdev(values))
        assert table.loc["intact", f"{name}_min"] == min(values)
        assert table.loc["intact", f"{name}_max"] == max(values)
    # the ratio is aggregated in decades: 0.1, 1, 10 -> -1, 0, 1
    assert table.loc["intact", "grad_decades_mean"] == pytest.approx(0.0)
    assert table.loc["intact", "grad_decades_std"] == pytest.approx(1.0)
    assert (table.loc["intact", "grad_decades_min"], table.loc["intact", "grad_decades_max"]) == (-1.0, 1.0)
    assert table.loc["intact", "n_seeds"] == 3 and table.loc["intact", "missing_seeds"] == ""


def test_a_failed_seed_is_reported_missing_and_not_averaged():
    table = seeds.aggregate(per_seed_rows(), seeds=[0, 1, 2]).set_index("variant")
    assert table.loc["no_bn", "n_seeds"] == 2
    assert table.loc["no_bn", "seeds"] == "0,1" and table.loc["no_bn", "missing_seeds"] == "2"
    assert table.loc["no_bn", "map50_95_mean"] == pytest.approx(0.005)  # the failed row's 0.9 is not in it
    assert table.loc["no_bn", "map50_95_max"] == pytest.approx(0.01)
    assert table.loc["no_bn", "grad_decades_mean"] == pytest.approx(-3.5)
    assert "2" in seeds.format_aggregate(table.reset_index()).splitlines()[2].split()[-1]


def test_one_seed_has_no_standard_deviation():
    rows = per_seed_rows()
    table = seeds.aggregate(rows[rows["seed"] == 0], seeds=[0]).set_index("variant")
    assert table.loc["intact", "map50_95_mean"] == pytest.approx(0.20)
    assert math.isnan(table.loc["intact", "map50_95_std"])


def test_seed_folders_without_a_summary_count_as_missing(tmp_path):
    rows = per_seed_rows()
    for seed in (0, 1):
        folder = seeds.seed_dir(tmp_path, seed)
        folder.mkdir()
        rows[rows["seed"] == seed].drop(columns="seed").to_csv(folder / "summary.csv", index=False)
    loaded = seeds.load_seed_rows(tmp_path, [0, 1, 2], ["intact", "no_bn", "sigmoid"])
    assert len(loaded) == 9  # every (seed, variant) pair, present or not
    table = seeds.aggregate(loaded, seeds=[0, 1, 2]).set_index("variant")
    assert table.loc["intact", "missing_seeds"] == "2"  # seed 2 never wrote a summary
    assert table.loc["sigmoid", "n_seeds"] == 0 and table.loc["sigmoid", "missing_seeds"] == "0,1,2"
    assert math.isnan(table.loc["sigmoid", "map50_95_mean"])
    assert table.loc["intact", "map50_95_mean"] == pytest.approx((0.20 + 0.23) / 2)


def test_seed_ranges_overlap():
    table = seeds.aggregate(per_seed_rows(), seeds=[0, 1, 2])
    assert not seeds.ranges_overlap(table, "map50_95", "intact", "no_bn")
    assert seeds.ranges_overlap(table, "map50_95", "intact", "intact")


def test_aggregate_names_the_columns_it_needs():
    with pytest.raises(ValueError, match="it needs at least"):
        seeds.aggregate(pd.DataFrame({"variant": ["a"]}), seeds=[0])


@pytest.mark.parametrize(
    ("value", "message"),
    [("0,x", "--seeds '0,x' is not valid"), ("1,1", "lists a seed twice"), ("-1", "non-negative")],
)
def test_bad_seeds_exit_before_training(tmp_path, capsys, value, message):
    out = tmp_path / "out"
    assert grid.main(["--preset", "smoke", "--seeds", value, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_vary_data_needs_seeds_and_synthetic_data(tmp_path, capsys):
    assert grid.main(["--preset", "smoke", "--vary-data", "--out", str(tmp_path / "out")]) == 2
    assert "--vary-data needs --seeds" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("seeds") / "smoke"
    return run_script("--preset", "smoke", "--seeds", "0,1", "--out", str(out), timeout=900), out


@pytest.mark.slow
def test_smoke_preset_with_two_seeds_runs_end_to_end(two_seeds):
    process, out = two_seeds
    assert process.returncode == 0, process.stdout + process.stderr
    per_seed = {s: pd.read_csv(out / f"seed-{s}" / "summary.csv").set_index("variant") for s in (0, 1)}
    for frame in per_seed.values():
        assert frame.index.tolist() == SMOKE_VARIANTS and (frame["status"] == "done").all()
    table = pd.read_csv(out / "aggregate.csv").set_index("variant")
    assert table.index.tolist() == SMOKE_VARIANTS
    assert (table["n_seeds"] == 2).all() and table["missing_seeds"].isna().all()
    for variant in SMOKE_VARIANTS:
        values = [per_seed[s].loc[variant, "final_train_loss"] for s in (0, 1)]
        assert table.loc[variant, "final_train_loss_mean"] == pytest.approx(statistics.mean(values))
        assert table.loc[variant, "final_train_loss_std"] == pytest.approx(statistics.stdev(values))
        ratios = [math.log10(per_seed[s].loc[variant, "grad_ratio_early_late"]) for s in (0, 1)]
        assert table.loc[variant, "grad_decades_mean"] == pytest.approx(statistics.mean(ratios))
        # another seed is another run: other initial weights and data order, so other losses
        assert values[0] != values[1], variant
    assert len(pd.read_csv(out / "per_seed.csv")) == 2 * len(SMOKE_VARIANTS)
    # one data set for every seed (generated once, in OUT/data), unless --vary-data
    assert (out / "data" / "shapes").is_dir() and not list(out.glob("seed-*/data"))
    specs = [pd.read_json(out / f"seed-{s}" / "runs" / "intact" / "spec.json", typ="series") for s in (0, 1)]
    assert specs[0]["data"] == specs[1]["data"] and (specs[0]["seed"], specs[1]["seed"]) == (0, 1)
    for name in ("map_vs_grad_ratio.png", "grad_profiles.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "aggregate over seeds 0,1" in process.stdout


@pytest.mark.slow
def test_resume_with_seeds_skips_finished_seed_variant_pairs(two_seeds, tmp_path):
    process, source = two_seeds
    assert process.returncode == 0, process.stdout + process.stderr
    out = tmp_path / "grid"
    shutil.copytree(source, out)
    shutil.rmtree(out / "seed-1" / "runs" / "intact")  # this pair never ran
    kept = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/runs/*/**/*") if p.is_file()}
    args = ("--preset", "smoke", "--seeds", "0,1", "--out", str(out))
    refused = run_script(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("finished earlier, kept") == 2 * len(SMOKE_VARIANTS) - 1
    assert "[seed 1 1/3] intact: training" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing of a finished pair was touched
    assert grid.is_finished(out / "seed-1" / "runs" / "intact")
    assert (pd.read_csv(out / "aggregate.csv")["n_seeds"] == 2).all()


@pytest.mark.slow
def test_summarize_only_reports_an_unfinished_seed_variant_pair_as_missing(two_seeds, tmp_path):
    process, source = two_seeds
    assert process.returncode == 0, process.stdout + process.stderr
    out = tmp_path / "grid"
    shutil.copytree(source, out)
    (out / "seed-1" / "runs" / "stripped_sigmoid" / "result.json").unlink()  # as if killed before the end
    logs = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/runs/*/train.log")}
    done = run_script("--preset", "smoke", "--seeds", "0,1", "--out", str(out), "--summarize-only")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "training" not in done.stdout and {p: p.stat().st_mtime_ns for p in logs} == logs  # nothing trained
    seed_one = pd.read_csv(out / "seed-1" / "summary.csv").set_index("variant")
    assert seed_one.loc["stripped_sigmoid", "status"] == "missing"
    table = pd.read_csv(out / "aggregate.csv", keep_default_na=False).set_index("variant")
    assert table.loc["stripped_sigmoid", "n_seeds"] == 1 and table.loc["stripped_sigmoid", "missing_seeds"] == "1"
    seed_zero = pd.read_csv(out / "seed-0" / "summary.csv").set_index("variant")
    assert table.loc["stripped_sigmoid", "map50_95_mean"] == pytest.approx(
        seed_zero.loc["stripped_sigmoid", "map50_95"]
    )
    assert (table.loc[["intact", "ultralytics"], "n_seeds"] == 2).all()
