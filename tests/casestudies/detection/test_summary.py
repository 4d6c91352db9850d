"""The grid's report page: its own summary as the first section of gradlight's report, or alone with the reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from casestudies.detection.summary import summarize_run, write_report
from gradlight.diagnosis.finding import Finding
from gradlight.runfolder import FindingsWriter
from tests.gradlight.test_report import IMG, write_run


def grid_frame() -> pd.DataFrame:
    return pd.DataFrame({"variant": ["intact", "no_bn"], "map50_95": [0.41, 0.0], "run_dir": ["a", "b"]})


def test_the_grid_summary_is_the_first_section_of_the_gradlight_report(tmp_path: Path) -> None:
    runs = {name: tmp_path / "runs" / name for name in ("intact", "no_bn")}
    for run in runs.values():
        write_run(run / "gradlight", steps=3, activations=False)
    figure = tmp_path / "map_vs_grad_ratio.png"
    Figure(figsize=(2, 2)).savefig(figure, format="png")
    page = write_report(grid_frame(), runs, [figure, tmp_path / "missing.png"], tmp_path, "Grid").read_text()
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    grid, gradlight = page.index("Ablation grid: summary"), page.index("<h2>Summary</h2>")
    assert grid < page.index("0.41") < gradlight  # the grid's table, then gradlight's
    assert "run_dir" not in page[grid:gradlight]  # an internal column is not shown
    assert page.index("map_vs_grad_ratio") < gradlight  # its figure is in its section; a missing one is skipped
    assert page.count("Run: intact") == 1 and page.count("Run: no_bn") == 1
    assert len(IMG.findall(page)) > 1 and (tmp_path / "report" / "report.html").is_file()


def test_without_histories_the_page_holds_the_grid_summary_and_the_reason(tmp_path: Path) -> None:
    page = write_report(grid_frame(), {"intact": tmp_path / "nothing"}, [], tmp_path, "Grid").read_text()
    assert "Ablation grid: summary" in page and "0.41" in page
    assert "gradlight report could not be built" in page and "ReportInputError" in page
    assert page.rstrip().endswith("</html>")


def test_the_summary_row_counts_findings_and_warnings_apart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    FindingsWriter(run_dir / "gradlight").append(
        [
            Finding("vanishing", "model.0", 4, 8, "block 0 starves", "no BN", "add BN"),
            Finding("dormant", "model.23", 2, 6, "head bias quiet", "by design", "none", severity="note"),
        ]
    )
    row = summarize_run(run_dir, {"variant": "no_bn"})
    assert (row["findings"], row["warnings"]) == (2, 1)
    assert summarize_run(tmp_path / "empty", {"variant": "intact"})["warnings"] == 0  # no findings file
