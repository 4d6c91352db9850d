"""Fixtures of the detection case-study tests: private copies of COCO8 and a tiny synthetic set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from casestudies.detection import offline

offline.configure_offline()

SHARED_COCO8 = Path("/work/shared/datasets/coco8")


@pytest.fixture(scope="session")
def coco8_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO8 copied to a temporary folder (Ultralytics writes label caches beside the labels)."""
    if not SHARED_COCO8.exists():
        raise FileNotFoundError(f"the COCO8 test data is missing at {SHARED_COCO8}")
    target = tmp_path_factory.mktemp("coco8") / "coco8"
    shutil.copytree(SHARED_COCO8, target)
    return target / "coco8.yaml"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder for generated synthetic shapes (generated on first use by the tests that need them)."""
    return tmp_path_factory.mktemp("shapes")
