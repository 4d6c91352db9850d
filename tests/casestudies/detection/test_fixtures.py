"""Where the COCO8 fixture finds its data: env override, the shared copy, or Ultralytics' download."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradlight_netguard as netguard
import pytest
import ultralytics.utils.downloads as downloads
from ultralytics.data.utils import check_det_dataset

from tests.casestudies.detection import conftest


@pytest.fixture
def no_local_coco8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env override, no shared copy; the download cache is empty (returned)."""
    monkeypatch.delenv(conftest.COCO8_ENV, raising=False)
    monkeypatch.setattr(conftest, "SHARED_COCO8", tmp_path / "no-shared" / "coco8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gradlight"


def test_shared_copy_beside_the_checkout_is_used_without_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(conftest.COCO8_ENV, raising=False)
    shared = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "coco8"  # <repo>/../shared/...
    if not (shared / "coco8.yaml").is_file():
        pytest.skip(f"no shared COCO8 copy at {shared} on this machine")
    assert conftest.coco8_source() == shared


def test_env_override_wins_and_must_hold_coco8_yaml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, coco8_yaml: Path
) -> None:
    monkeypatch.setenv(conftest.COCO8_ENV, str(coco8_yaml))  # the YAML itself, or its folder
    assert conftest.coco8_source() == coco8_yaml.parent
    monkeypatch.setenv(conftest.COCO8_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{conftest.COCO8_ENV}=.*holds no coco8.yaml"):
        conftest.coco8_source()


def test_without_local_copy_ultralytics_download_is_used(
    monkeypatch: pytest.MonkeyPatch, no_local_coco8: Path, coco8_yaml: Path
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_download(url: str, dir: Path, **kwargs: Any) -> Path:  # unzips coco8.zip's one top folder
        calls.append({"url": url, "allowed": netguard._allowed > 0, **kwargs})
        shutil.copytree(coco8_yaml.parent / "images", Path(dir) / "coco8" / "images")
        shutil.copytree(coco8_yaml.parent / "labels", Path(dir) / "coco8" / "labels")
        return Path(dir) / "coco8"

    monkeypatch.setattr(downloads, "safe_download", fake_download)
    source = conftest.coco8_source()
    assert source == no_local_coco8 / "coco8"
    assert calls == [
        {"url": calls[0]["url"], "allowed": True, "unzip": True, "delete": True, "retry": 1, "progress": False}
    ]
    assert calls[0]["url"].endswith("/coco8.zip")
    checked = check_det_dataset(str(source / "coco8.yaml"), autodownload=False)  # rooted at its own folder
    assert checked["nc"] == 80 and Path(checked["train"]) == source / "images" / "train"
    assert conftest.coco8_source() == source and len(calls) == 1  # cached: downloaded once


def test_without_network_the_coco8_tests_skip_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, no_local_coco8: Path
) -> None:
    def offline_download(url: str, **kwargs: Any) -> Path:
        raise ConnectionError(f"Download failure for {url}. Environment is not online.")

    monkeypatch.setattr(downloads, "safe_download", offline_download)
    with pytest.raises(pytest.skip.Exception, match="COCO8 is not available: no GRADLIGHT_COCO8") as skipped:
        conftest.coco8_source()
    assert "not online" in str(skipped.value) and str(conftest.SHARED_COCO8) in str(skipped.value)
