"""Offline setup for Ultralytics: call :func:`configure_offline` before anything imports ``ultralytics``.

Ultralytics touches the network in several places (import-time connectivity checks, ``check_font`` fetching
``Arial.ttf``, requirement auto-install, settings sync, AMP checks that download weights). This module closes
each of them so that building models, reading local data and evaluating never open a connection:

* ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=0`` are set before ``ultralytics`` is imported;
* ``YOLO_CONFIG_DIR`` defaults to a private folder holding an ``Arial.ttf`` copied from matplotlib's
  ``DejaVuSans.ttf``, which is where ``check_font`` looks first;
* settings sync is switched off; training overrides use ``plots=False`` and ``amp=False``
  (see :data:`OFFLINE_OVERRIDES`).

Example:
    >>> from casestudies.detection import offline
    >>> offline.configure_offline()["sync"]
    False
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
#: Ultralytics cfg overrides that avoid downloads and plotting (``check_amp`` fetches weights on GPU).
OFFLINE_OVERRIDES: dict[str, Any] = {"plots": False, "amp": False, "verbose": False}


def _default_config_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"gradlight-ultralytics-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _set_environment() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_default_config_dir()))


def _install_font(config_dir: Path) -> Path:
    """Copy matplotlib's DejaVuSans.ttf to ``config_dir/Arial.ttf`` so ``check_font`` never downloads."""
    import matplotlib

    target = config_dir / "Arial.ttf"
    if not target.exists():
        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        config_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def configure_offline() -> dict[str, Any]:
    """Make Ultralytics work without network access; safe to call many times.

    Returns:
        The Ultralytics settings after the update (``sync`` is False).

    Example:
        >>> configure_offline()["sync"]
        False
    """
    _set_environment()
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    _install_font(Path(USER_CONFIG_DIR))
    if SETTINGS.get("sync", True):
        SETTINGS.update({"sync": False})
    return dict(SETTINGS)


def is_offline() -> bool:
    """Tell whether the offline setup is in force (environment, font and settings).

    Example:
        >>> _ = configure_offline()
        >>> is_offline()
        True
    """
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    env_ok = all(os.environ.get(key) == value for key, value in OFFLINE_ENV.items())
    return env_ok and (Path(USER_CONFIG_DIR) / "Arial.ttf").exists() and not SETTINGS.get("sync", True)
