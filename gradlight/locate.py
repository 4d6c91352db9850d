"""Find the run folder a path names: the folder itself, or the one run folder below the folder a user has.

A run folder is where a monitor or recorder writes (``history/``, ``findings.jsonl``, ``run.json``). Users
hold other folders: the Lightning ``default_root_dir`` (its runs are ``lightning_logs/version_N/gradlight``),
a ``log_dir``, an Ultralytics ``runs/detect/train``. :func:`find_run_folder` accepts those when exactly one
run folder lies up to three levels below, and lists the candidates when there are several. The readers
(:func:`gradlight.load_history`, :func:`gradlight.load_findings`) and ``gradlight report`` share it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from gradlight.runfolder import FINDINGS_FILE, HISTORY_SUBDIR, RUN_INFO_FILE

__all__ = ["MAX_SEARCH_DEPTH", "AmbiguousRunFolderError", "announce_run_folder", "find_run_folder", "is_run_folder"]

#: The logger that says where a run is written (``logging.getLogger("gradlight")``).
log = logging.getLogger("gradlight")

#: How many levels below the given folder a run folder is looked for (``<root>/lightning_logs/version_0/gradlight``).
MAX_SEARCH_DEPTH = 3


class AmbiguousRunFolderError(ValueError):
    """A folder holds several run folders; the message lists them (pass one of them)."""


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run folder: a folder with ``history/``, ``findings.jsonl`` or ``run.json``.

    Example:
        >>> is_run_folder("/nonexistent")
        False
    """
    root = Path(path)
    return (root / HISTORY_SUBDIR).is_dir() or (root / FINDINGS_FILE).is_file() or (root / RUN_INFO_FILE).is_file()


def find_run_folder(path: str | os.PathLike[str]) -> Path:
    """The run folder ``path`` names: itself, its parent (for ``.../history``), or the one run folder below it.

    Below means up to :data:`MAX_SEARCH_DEPTH` levels down, which covers a Lightning ``log_dir``
    (``version_0/gradlight``), a ``default_root_dir`` (``lightning_logs/version_0/gradlight``) and an
    Ultralytics project folder (``runs/detect/train/gradlight`` from ``runs``). A run folder's own
    sub-folders are not searched.

    Args:
        path: A run folder, its ``history`` sub-folder, or a folder holding exactly one run folder.

    Returns:
        The run folder.

    Raises:
        FileNotFoundError: If ``path`` does not exist, is a file, or holds no run folder.
        AmbiguousRunFolderError: If it holds several; the message lists every one.

    Example:
        >>> find_run_folder("lightning_logs")  # doctest: +SKIP
        PosixPath('lightning_logs/version_0/gradlight')
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{str(root)!r} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is a file, not a gradlight run folder (a folder holding history/)")
    if is_run_folder(root):
        return root
    if root.name == HISTORY_SUBDIR and is_run_folder(root.parent):
        return root.parent
    found = _run_folders_below(root, MAX_SEARCH_DEPTH)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"no gradlight history in {str(root)!r}: no {HISTORY_SUBDIR}/ folder in it or up to {MAX_SEARCH_DEPTH} "
            "levels down (pass the monitor's or recorder's save_dir)"
        )
    listing = ", ".join(str(candidate) for candidate in found)
    raise AmbiguousRunFolderError(f"{str(root)!r} holds {len(found)} gradlight histories; pass one of them: {listing}")


def _run_folders_below(root: Path, depth: int) -> list[Path]:
    """Run folders strictly below ``root``, at most ``depth`` levels down, sorted; none inside a run folder."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                children = sorted(child for child in folder.iterdir() if child.is_dir())
            except OSError:  # unreadable folder: not a place a run can be read from either
                continue
            for child in children:
                (found if is_run_folder(child) else below).append(child)
        level = below
    return sorted(found)


def announce_run_folder(root: str | os.PathLike[str]) -> str:
    """Log, at INFO on the ``gradlight`` logger, where a run is written (front ends call it once, rank zero).

    Like Lightning's own logger, the ``gradlight`` logger prints to stderr when the application has not
    configured logging (the root logger has no handler); configure ``logging`` to route or silence it.

    Returns:
        The message.

    Example:
        >>> announce_run_folder("runs/exp1/gradlight")  # doctest: +SKIP
        'gradlight: writing the run to /home/me/runs/exp1/gradlight (read it with `gradlight report ...`)'
    """
    path = Path(root).resolve()
    message = f"gradlight: writing the run to {path} (read it with `gradlight report {path} --out report/`)"
    if not log.handlers and not logging.getLogger().hasHandlers():
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info(message)
    return message
