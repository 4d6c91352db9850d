"""Importing the case studies changes no global state: environment, Ultralytics settings, matplotlib backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Runs in a fresh interpreter: the state before and after importing (and calling) the arguments, as JSON.
PROBE = """
import importlib, json, os, sys
from pathlib import Path
import matplotlib, torch, lightning  # third-party imports' own effects (torch sets two variables) come first

def state():
    return {
        "env": dict(os.environ),
        "backend": matplotlib.rcParams._get_backend_or_none(),
        "config_dir": sorted(p.name for p in Path(os.environ["YOLO_CONFIG_DIR"]).rglob("*")),
    }

before = state()
for name in sys.argv[1:]:  # "module" imports it, "module:function" also calls the function
    module, _, function = name.partition(":")
    imported = importlib.import_module(module)
    if function:
        getattr(imported, function)()
print(json.dumps({"before": before, "after": state()}))
"""


def import_state(tmp_path: Path, *modules: str) -> dict[str, dict]:
    config_dir = tmp_path / "ultralytics-config"
    config_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "MPL"))}
    env.update({"YOLO_CONFIG_DIR": str(config_dir), "OMP_NUM_THREADS": "1"})
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "modules",
    [
        ("casestudies.detection",),
        ("casestudies.detection.grid", "casestudies.detection.summary", "casestudies.detection.seeds"),
        ("casestudies.textbook.classic", "casestudies.textbook.decay", "casestudies.textbook.recurrent"),
        ("casestudies.textbook.exploding",),
    ],
)
def test_import_changes_no_global_state(tmp_path, modules):
    state = import_state(tmp_path, *modules)
    before, after = state["before"], state["after"]
    assert after["env"] == before["env"]  # no YOLO_OFFLINE, YOLO_CONFIG_DIR, ... set behind the caller's back
    assert after["config_dir"] == before["config_dir"] == []  # no Ultralytics settings or font written
    assert after["backend"] == before["backend"] is None  # no matplotlib.use: the backend stays the caller's


def test_configure_offline_is_what_changes_the_state(tmp_path):
    # the probe sees a change when there is one: configure_offline sets the environment and writes settings
    state = import_state(tmp_path, "casestudies.detection.offline:configure_offline")
    assert state["after"]["env"]["YOLO_OFFLINE"] == "1"
    assert "Arial.ttf" in state["after"]["config_dir"]
