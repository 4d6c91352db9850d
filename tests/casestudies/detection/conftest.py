"""Fixtures of the detection case-study tests: private copies of COCO8 and a tiny synthetic set.

COCO8 comes from, in order: ``$GRADLIGHT_COCO8`` (a folder holding ``coco8.yaml``, or that file), the shared
copy beside the checkout (``<repo>/../shared/datasets/coco8``), or Ultralytics' own COCO8 download, cached in
``~/.cache/gradlight/coco8`` (the one network access the suite allows). Only when that download fails for lack
of network are the COCO8 tests skipped, with a message saying so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradlight_netguard as netguard
import pytest
import yaml

from casestudies.detection import offline

offline.configure_offline()

ROOT = Path(__file__).resolve().parents[3]
COCO8_ENV = "GRADLIGHT_COCO8"
SHARED_COCO8 = ROOT.parent / "shared" / "datasets" / "coco8"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradlight"


def _from_env(value: str) -> Path:
    path = Path(value).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "coco8.yaml").is_file():
        raise FileNotFoundError(
            f"{COCO8_ENV}={value!r} holds no coco8.yaml; point it at a COCO8 folder (coco8.yaml, images/, labels/) "
            "or unset it to use the shared copy or Ultralytics' download"
        )
    return folder


def _download_coco8(cache: Path) -> Path:
    """Ultralytics' COCO8 (``download:`` URL of its packaged ``coco8.yaml``) with a YAML rooted at its folder."""
    from ultralytics.utils import ROOT as ULTRALYTICS_ROOT
    from ultralytics.utils.downloads import safe_download

    folder = cache / "coco8"
    if (folder / "coco8.yaml").is_file():
        return folder
    packaged = yaml.safe_load((ULTRALYTICS_ROOT / "cfg" / "datasets" / "coco8.yaml").read_text())
    shutil.rmtree(folder, ignore_errors=True)  # an earlier, interrupted download (the YAML is written last)
    try:
        with netguard.allow():
            folder = Path(
                safe_download(packaged["download"], dir=cache, unzip=True, delete=True, retry=1, progress=False)
            )
    except OSError as error:  # ConnectionError and requests' errors: no network here
        pytest.skip(
            f"COCO8 is not available: no {COCO8_ENV}, no shared copy at {SHARED_COCO8}, and Ultralytics' download "
            f"({packaged['download']}) failed: {error}"
        )
    local = {k: v for k, v in packaged.items() if k not in ("path", "download")}  # root = the YAML's folder
    (folder / "coco8.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
    return folder


def coco8_source() -> Path:
    """The COCO8 folder the tests copy from (see the module docstring for the order)."""
    if os.environ.get(COCO8_ENV):
        return _from_env(os.environ[COCO8_ENV])
    if (SHARED_COCO8 / "coco8.yaml").is_file():
        return SHARED_COCO8
    return _download_coco8(_cache_dir())


@pytest.fixture(scope="session")
def coco8_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO8 copied to a temporary folder (Ultralytics writes label caches beside the labels)."""
    target = tmp_path_factory.mktemp("coco8") / "coco8"
    shutil.copytree(coco8_source(), target, ignore=shutil.ignore_patterns("*.cache"))
    return target / "coco8.yaml"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder for generated synthetic shapes (generated on first use by the tests that need them)."""
    return tmp_path_factory.mktemp("shapes")
