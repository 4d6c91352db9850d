"""Textbook claims over seeds: one verdict only where every seed agrees, otherwise the count per class."""

from __future__ import annotations

import pandas as pd
import pytest

from casestudies.textbook import seeds


def claim_rows(classes: dict[int, list[str]]) -> pd.DataFrame:
    """Two claims per seed; ``classes[seed]`` holds their verdict classes."""
    rows = []
    for seed, verdicts in classes.items():
        for index, verdict in enumerate(verdicts):
            rows.append(
                {
                    "seed": seed,
                    "experiment": "recurrent" if index else "classic",
                    "claim": f"claim {index}",
                    "verdict_class": verdict,
                    "measured": f"value {seed}.{index}",
                }
            )
    return pd.DataFrame(rows)


def test_a_claim_all_seeds_agree_on_keeps_its_verdict():
    rows = claim_rows({0: ["holds", "holds"], 1: ["holds", "does not hold"], 2: ["holds", "holds"]})
    table = seeds.agree(rows, seeds=[0, 1, 2]).set_index("claim")
    assert table.loc["claim 0", "verdict"] == "holds" and bool(table.loc["claim 0", "agreed"])
    assert table.loc["claim 0", "measured"] == "seed 0: value 0.0 | seed 1: value 1.0 | seed 2: value 2.0"


def test_a_claim_the_seeds_disagree_on_depends_on_the_seed_with_the_count():
    rows = claim_rows({0: ["holds", "holds"], 1: ["holds", "does not hold"], 2: ["holds", "holds"]})
    table = seeds.agree(rows, seeds=[0, 1, 2]).set_index("claim")
    assert not table.loc["claim 1", "agreed"]
    assert table.loc["claim 1", "verdict"] == (
        "depends on the seed: holds 2 of 3 (seeds 0, 2), does not hold 1 of 3 (seed 1)"
    )


def test_a_seed_without_the_claim_is_missing_not_agreeing(tmp_path):
    rows = claim_rows({0: ["holds only when", "holds"], 1: ["holds only when", "holds"]})
    for seed in (0, 1):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        rows[rows["seed"] == seed].drop(columns="seed").to_csv(folder / "summary.csv", index=False)
    loaded = seeds.load_seed_claims(tmp_path, [0, 1, 2])  # seed 2 never finished
    table = seeds.agree(loaded, seeds=[0, 1, 2]).set_index("claim")
    assert table.loc["claim 0", "verdict"] == (
        "depends on the seed: holds only when 2 of 3 (seeds 0, 1), missing 1 of 3 (seed 2)"
    )
    assert table.loc["claim 0", "seeds"] == 2


def test_the_command_line_writes_the_seed_summary(tmp_path, capsys):
    rows = claim_rows({0: ["holds", "holds"], 1: ["holds", "does not hold"]})
    for seed in (0, 1):
        (tmp_path / f"seed-{seed}").mkdir()
        rows[rows["seed"] == seed].drop(columns="seed").to_csv(tmp_path / f"seed-{seed}" / "summary.csv", index=False)
    assert seeds.main([str(tmp_path), "--seeds", "0,1"]) == 0
    assert "1 of 2 claims have one verdict" in capsys.readouterr().out
    written = pd.read_csv(tmp_path / "seeds_summary.csv")
    assert written["agreed"].tolist() == [True, False]


def test_unknown_verdict_classes_are_refused():
    rows = claim_rows({0: ["maybe", "holds"]})
    with pytest.raises(ValueError, match="'maybe'"):
        seeds.agree(rows, seeds=[0])
