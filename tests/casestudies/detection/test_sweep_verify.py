"""The learning-rate sweep's bookkeeping and the ``--verify`` check of a grid against a published aggregate."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from casestudies.detection import sweep, verify
from casestudies.detection.grid.config import RESULT, GridConfig, GridError, seed_config
from casestudies.detection.grid.runner import is_finished
from casestudies.detection.grid.spec import RunSpec

VARIANTS = ("intact", "no_bn", "sigmoid")
LRS = (0.001, 0.003, 0.01, 0.02)
#: Known mAP50-95 per variant and lr0 (and final loss, the tie-break when mAP is equal).
KNOWN = {
    "intact": ([0.05, 0.12, 0.19, 0.17], [7.0, 6.2, 5.8, 5.9]),
    "no_bn": ([0.0, 0.0, 0.0, 0.0], [9.4, 9.1, 8.3, 8.6]),  # all 0.000: the lower final loss wins
    "sigmoid": ([0.01, 0.02, 0.03, 0.06], [8.0, 7.6, 7.2, 6.9]),
}


def grid_rows() -> dict[float, pd.DataFrame]:
    """One summary per lr0, as each stage-1 grid writes it."""
    return {
        lr: pd.DataFrame(
            {
                "variant": list(VARIANTS),
                "status": ["done"] * 3,
                "map50_95": [KNOWN[v][0][i] for v in VARIANTS],
                "final_train_loss": [KNOWN[v][1][i] for v in VARIANTS],
            }
        )
        for i, lr in enumerate(LRS)
    }


def test_sweep_writes_one_row_per_variant_and_learning_rate_and_picks_the_best_by_map() -> None:
    rows = sweep.sweep_rows(grid_rows())
    assert len(rows) == len(VARIANTS) * len(LRS)
    assert not rows.duplicated(["variant", "lr0"]).any()
    assert set(zip(rows["variant"], rows["lr0"], strict=True)) == {(v, lr) for v in VARIANTS for lr in LRS}
    assert rows.loc[(rows["variant"] == "sigmoid") & (rows["lr0"] == 0.02), "map50_95"].item() == 0.06
    assert sweep.best_lrs(rows) == {"intact": 0.01, "no_bn": 0.01, "sigmoid": 0.02}


def test_a_failed_run_is_never_the_best_and_a_duplicate_variant_is_an_error() -> None:
    grids = grid_rows()
    grids[0.02].loc[grids[0.02]["variant"] == "sigmoid", "status"] = "failed"
    assert sweep.best_lrs(sweep.sweep_rows(grids))["sigmoid"] == 0.01
    grids[0.01] = pd.concat([grids[0.01], grids[0.01].iloc[:1]])
    with pytest.raises(ValueError, match="variant twice"):
        sweep.sweep_rows(grids)


def test_every_learning_rate_shares_one_warmup_rule(tmp_path: Path) -> None:
    config = GridConfig(preset="smoke", training={"warmup_epochs": 5.0, "momentum": 0.9})
    grids = [sweep.lr_config(config, lr, sweep.lr_dir(tmp_path, lr)) for lr in LRS]
    assert [g.training["lr0"] for g in grids] == list(LRS)
    assert {(g.training["warmup_epochs"], g.training["warmup_bias_lr"], g.training["momentum"]) for g in grids} == {
        (3.0, 0.1, 0.9)
    }
    assert Path(grids[1].out).name == "lr-0.003"
    with pytest.raises(GridError, match="lr0=0"):
        sweep.lr_config(config, 0.0, tmp_path)


def test_the_bias_warmup_option_reaches_both_stages_and_a_negative_value_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--warmup-bias-lr`` changes only the bias warm-up, in stage 1 and stage 2 alike (nothing trains here)."""
    seen: list[dict[str, float]] = []
    monkeypatch.setattr(sweep, "run_sweep", lambda config, lrs, seeds, stage, warmup: seen.append(warmup) or 0)
    assert sweep.main(["--preset", "smoke", "--lrs", "0.01", "--warmup-bias-lr", "0", "--out", str(tmp_path)]) == 0
    assert seen == [{"warmup_epochs": 3.0, "warmup_bias_lr": 0.0}]
    config = GridConfig(preset="smoke", training={"momentum": 0.9})
    stage_one = sweep.lr_config(config, 0.01, tmp_path, seen[0])
    stage_two = sweep.best_config(config, "no_bn", 0.01, [0, 1], tmp_path, seen[0])
    for grid in (stage_one, stage_two):
        training = grid.training
        assert (training["warmup_bias_lr"], training["warmup_epochs"], training["lr0"]) == (0.0, 3.0, 0.01)
    assert sweep.best_config(config, "no_bn", 0.01, [0], tmp_path).training["warmup_bias_lr"] == 0.1  # the default

    assert sweep.main(["--preset", "smoke", "--warmup-bias-lr", "-0.1", "--out", str(tmp_path)]) == 2
    assert "--warmup-bias-lr -0.1 is not valid" in capsys.readouterr().err
    assert len(seen) == 1  # refused before anything ran


def test_map_vs_lr_figure(tmp_path: Path) -> None:
    rows = sweep.sweep_rows(grid_rows())
    path = sweep.plot_map_vs_lr(rows, sweep.best_lrs(rows), tmp_path / "map_vs_lr.png")
    assert path.stat().st_size > 10_000


def test_stage_two_reuses_stage_one_run_of_the_same_seed_instead_of_training_it_again(tmp_path: Path) -> None:
    config = GridConfig(preset="smoke", seed=0)
    stage_one = sweep.lr_dir(tmp_path, 0.01) / "runs" / "no_bn"
    (stage_one / "gradlight").mkdir(parents=True)
    (stage_one / RESULT).write_text('{"map50_95": 0.0}')
    (stage_one / "gradlight" / "history.parquet").write_bytes(b"recorded")
    grid = sweep.best_config(config, "no_bn", 0.01, [0, 1, 2], tmp_path)
    stage_two = Path(RunSpec.of("no_bn", seed_config(grid, 0), "data.yaml").run_dir)  # where run_grid trains seed 0

    assert not is_finished(stage_two)
    assert sweep.reuse_stage_one(config, "no_bn", 0.01, [0, 1, 2], tmp_path) == stage_two
    assert is_finished(stage_two)  # so the grid's --resume keeps it and trains seeds 1 and 2 only
    assert (stage_two / "gradlight" / "history.parquet").read_bytes() == b"recorded"
    assert sweep.reuse_stage_one(config, "no_bn", 0.01, [0, 1, 2], tmp_path) is None  # never overwritten
    assert sweep.reuse_stage_one(config, "no_bn", 0.01, [1, 2], tmp_path) is None  # seed 0 not asked for
    assert sweep.reuse_stage_one(config, "intact", 0.01, [0, 1, 2], tmp_path) is None  # no finished stage-1 run
    assert not (tmp_path / "best-intact").exists()


def test_variants_pick_the_rows_of_a_sweep_whose_folders_hold_more(tmp_path: Path) -> None:
    """``--variants`` restricts stage 2 to those variants even where stage 1 trained more (its summaries)."""
    for lr, rows in grid_rows().items():
        sweep.lr_dir(tmp_path, lr).mkdir(parents=True)
        rows.to_csv(sweep.lr_dir(tmp_path, lr) / "summary.csv", index=False)
    config = GridConfig(preset="smoke", variants=["intact", "sigmoid"], out=str(tmp_path))
    assert sweep.run_sweep(config, LRS, seeds=[], stage="best") == 0  # trains nothing: no seeds
    assert set(pd.read_csv(tmp_path / "sweep.csv")["variant"]) == {"intact", "sigmoid"}
    assert pd.read_csv(tmp_path / "best.csv").set_index("variant")["best_lr0"].to_dict() == {
        "intact": 0.01,
        "sigmoid": 0.02,
    }


# ---------------------------------------------------------------------------------------------- verify
def published() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": ["intact", "ultralytics"],
            "map50_95_min": [0.143168, 0.217],
            "map50_95_max": [0.200856, 0.234],
            "grad_decades_min": [-0.55, -0.51],
            "grad_decades_max": [-0.43, -0.48],
        }
    )


def test_verify_compares_every_cell_at_the_printed_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = pd.DataFrame(
        {
            "variant": ["intact", "ultralytics"],
            "status": ["done", "done"],
            "map50_95": [0.2014, 0.196],  # 0.201 printed: inside [0.143, 0.201]; 0.196 below [0.217, 0.234]
            "grad_ratio_early_late": [0.3689, 0.33],
        }
    )
    cells = verify.compare(published(), runs)
    assert [(c.variant, c.metric, c.inside) for c in cells] == [
        ("intact", "map50_95", True),
        ("intact", "grad_decades", True),
        ("ultralytics", "map50_95", False),
        ("ultralytics", "grad_decades", True),
    ]
    published().to_csv(tmp_path / "aggregate.csv", index=False)
    runs.to_csv(tmp_path / "summary.csv", index=False)
    assert verify.main([str(tmp_path / "aggregate.csv"), str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "ultralytics" in printed and "0.196  [0.217, 0.234]  OUTSIDE" in printed and "3/4 cells inside" in printed
    assert verify.main([str(tmp_path / "missing.csv"), str(tmp_path)]) == 2
    (tmp_path / "unfinished").mkdir()
    assert verify.main([str(tmp_path / "aggregate.csv"), str(tmp_path / "unfinished")]) == 2  # no summary yet
    assert "has no per_seed.csv or summary.csv" in capsys.readouterr().err
