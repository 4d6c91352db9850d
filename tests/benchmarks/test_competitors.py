"""The competitor harness: a library that alarms on everything, one that crashes and one whose process dies are
each reported as a row (with the right counts), and the table goes on to the next library."""

from __future__ import annotations

import math

import pytest

from benchmarks import competitors

RUNS = ("buggy:DeepLocalize/45337371/correct", "buggy:DeepLocalize/45337371")
FAKES = "tests.benchmarks._fake_libraries"


@pytest.mark.slow
def test_an_always_alarming_library_is_a_row_with_its_false_alarm() -> None:
    row = competitors.run_isolated("always", f"{FAKES}:AlwaysAlarms", RUNS, timeout=300)
    assert row.status == "ok"
    assert (row.healthy, row.healthy_quiet) == (1, 0)  # the alarm on the healthy run counts against it
    assert (row.broken, row.found, row.crashes) == (1, 1, 0)
    assert math.isfinite(row.overhead)
    assert "always@dense0" in competitors.render([row])


@pytest.mark.slow
def test_a_crashing_library_and_a_dying_process_are_rows_not_aborts() -> None:
    crashed = competitors.run_isolated("crashes", f"{FAKES}:Crashes", RUNS, timeout=300)
    died = competitors.run_isolated("dies", f"{FAKES}:KillsItsProcess", RUNS, timeout=300)
    assert crashed.status == "ok" and crashed.crashes == 2
    assert all("fake library failed in its hook" in (r.error or "") for r in crashed.runs)
    assert crashed.healthy_quiet == 0 and crashed.found == 0  # a crashed run is neither quiet nor found
    assert died.status.startswith("process failed (exit 3)")
    table = competitors.render([crashed, died])
    assert "| crashes |" in table and "| dies |" in table


def test_a_library_that_does_not_import_crashes_every_run() -> None:
    rows = competitors.run_library("no_such_module_anywhere:Adapter", RUNS[:1])
    assert len(rows) == 1 and rows[0].error is not None and "ModuleNotFoundError" in rows[0].error


def test_summarise_counts_and_overhead() -> None:
    rows = [
        competitors.RunRow("a", True, bare_ms=10.0, library_ms=15.0),
        competitors.RunRow("b", False, alarms=["k@l"], found=True, placed=True, bare_ms=10.0, library_ms=30.0),
        competitors.RunRow("c", False, error="E"),
    ]
    row = competitors.summarise("x", "1", rows)
    assert (row.healthy_quiet, row.found, row.placed, row.broken, row.crashes) == (1, 1, 1, 2, 1)
    assert row.overhead == pytest.approx(1.25)  # median of 1.5x and 3.0x, the crashed run left out
