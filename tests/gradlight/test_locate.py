"""Finding the run folder in the folder a user has: the readers, the report and the command line agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradlight import load_history
from gradlight.cli import main
from gradlight.locate import AmbiguousRunFolderError, find_run_folder
from gradlight.runfolder import load_findings
from tests.gradlight.test_report import vanishing_finding, write_run


def test_a_parent_with_one_run_reads_like_the_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp" / "gradlight"
    write_run(run, findings=[vanishing_finding()])
    direct = load_history(run)
    for parent in (tmp_path / "runs" / "exp", tmp_path / "runs", tmp_path):
        assert find_run_folder(parent) == run
        assert load_history(parent).equals(direct)
        assert load_findings(parent)["layer"].tolist() == ["net.0"]
    assert find_run_folder(run / "history") == run


def test_lightning_default_root_dir_is_found(tmp_path: Path) -> None:
    run = tmp_path / "lightning_logs" / "version_0" / "gradlight"
    write_run(run)
    assert find_run_folder(tmp_path) == run  # <default_root_dir>: three levels down
    assert find_run_folder(tmp_path / "lightning_logs" / "version_0") == run
    assert len(load_history(tmp_path)) == len(load_history(run))


def test_several_runs_raise_listing_every_one(tmp_path: Path) -> None:
    write_run(tmp_path / "lightning_logs" / "version_0" / "gradlight")
    write_run(tmp_path / "lightning_logs" / "version_1" / "gradlight")
    for read in (find_run_folder, load_history, load_findings):
        with pytest.raises(AmbiguousRunFolderError, match="holds 2 gradlight histories") as info:
            read(tmp_path)
        assert "version_0/gradlight" in str(info.value) and "version_1/gradlight" in str(info.value)
    assert find_run_folder(tmp_path / "lightning_logs" / "version_1").name == "gradlight"


def test_no_run_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no gradlight history in"):
        load_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="no gradlight history in"):
        load_findings(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_run_folder(tmp_path / "typo")


def test_run_folders_inside_a_run_folder_are_not_searched(tmp_path: Path) -> None:
    write_run(tmp_path / "outer")
    write_run(tmp_path / "outer" / "copy")
    assert find_run_folder(tmp_path) == tmp_path / "outer"


def test_report_without_run_reads_the_lightning_default_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "lightning_logs" / "version_0" / "gradlight")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--out", "out", "--no-progress"]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    write_run(tmp_path / "lightning_logs" / "version_1" / "gradlight")
    assert main(["report", "--out", "out2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 gradlight histories" in err and "version_0" in err and "version_1" in err
