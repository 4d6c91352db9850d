"""The run folder: one module owns where a monitored run's files are and how they are read back.

Layout of a run folder (the monitor's or recorder's ``save_dir``)::

    save_dir/
        history/segment-00000.arrow   # Arrow IPC streams, one per writer session (see gradlight.history)
        history/segment-00001.arrow   # a resumed run opens a new segment
        findings.jsonl                # one JSON object per diagnosis finding, appended and fsynced
        run.json                      # what was monitored (RunInfo): layers, settings, trainer
        recorder_state.pt             # integrations whose trainer keeps no callback state (Ultralytics)

Every file that carries a format version (the history segments' schema metadata, ``run.json``) is checked
on read: a file written by a newer gradlight raises :class:`UnsupportedFormatError` naming both versions
instead of being misread.

Example:
    >>> import tempfile
    >>> folder = RunFolder(tempfile.mkdtemp())
    >>> folder.history_dir.name, folder.findings_file.name, folder.run_info_file.name
    ('history', 'findings.jsonl', 'run.json')
    >>> folder.has_history()
    False
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlight.records import GLOBAL_LAYER, Finding

__all__ = [
    "FINDINGS_FILE",
    "FORMAT_VERSION",
    "HISTORY_SUBDIR",
    "RUN_INFO_FILE",
    "STATE_FILE",
    "ActivationSiteInfo",
    "FindingsRead",
    "FindingsWriter",
    "LayerInfo",
    "RunFolder",
    "RunInfo",
    "SkippedLine",
    "UnsupportedFormatError",
    "check_format_version",
    "list_segments",
    "load_findings",
    "read_findings",
    "read_run_info",
    "segment_path",
    "write_json_atomic",
]

#: Sub-folder of the history segments.
HISTORY_SUBDIR = "history"
#: The diagnosis findings, one JSON object a line.
FINDINGS_FILE = "findings.jsonl"
#: The run's settings and layers (:class:`RunInfo`).
RUN_INFO_FILE = "run.json"
#: A recorder's ``state_dict`` kept beside the history by integrations whose trainer cannot checkpoint it.
STATE_FILE = "recorder_state.pt"
#: The newest run-folder format this gradlight writes and reads (history segments and ``run.json``).
FORMAT_VERSION = 1

_SEGMENT_PATTERN = re.compile(r"^segment-(\d{5,})\.arrow$")


class UnsupportedFormatError(ValueError):
    """A run-folder file was written in a newer format than this gradlight reads.

    Attributes:
        path: The file.
        found: The format version it declares.
        supported: The newest version this gradlight reads (:data:`FORMAT_VERSION`).
    """

    def __init__(self, path: str | Path, found: object, supported: int = FORMAT_VERSION) -> None:
        self.path = Path(path)
        self.found = found
        self.supported = supported
        newer = isinstance(found, int) and found > supported
        why = "it was written by a newer gradlight; upgrade gradlight to read it" if newer else "not a valid version"
        super().__init__(
            f"{str(self.path)!r} is in gradlight run-folder format version {found}, but this gradlight reads "
            f"versions 1 to {supported}: {why}"
        )


def check_format_version(path: str | Path, found: object) -> int:
    """Return the integer format version ``found`` in ``path``, or raise if this gradlight cannot read it.

    Args:
        path: The file the version was read from (named in the error).
        found: The declared version (int, or its text/bytes as stored in metadata).

    Raises:
        UnsupportedFormatError: If ``found`` is newer than :data:`FORMAT_VERSION` or not a version number.

    Example:
        >>> check_format_version("run.json", b"1")
        1
        >>> try:
        ...     check_format_version("run.json", 7)
        ... except UnsupportedFormatError as error:
        ...     print(error.found, error.supported)
        7 1
    """
    text = found.decode() if isinstance(found, bytes) else found
    try:
        version = int(text)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UnsupportedFormatError(path, found) from None
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedFormatError(path, version)
    return version


# --------------------------------------------------------------------------------------------------- layout
def segment_path(history_dir: Path, index: int) -> Path:
    """Return the path of history segment ``index`` inside ``history_dir``."""
    return history_dir / f"segment-{index:05d}.arrow"


def list_segments(history_dir: Path) -> list[tuple[int, Path]]:
    """Return ``(index, path)`` of every history segment in ``history_dir``, oldest first."""
    if not history_dir.is_dir():
        return []
    found = []
    for child in history_dir.iterdir():
        match = _SEGMENT_PATTERN.match(child.name)
        if match:
            found.append((int(match.group(1)), child))
    return sorted(found)


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder, and the few operations on it as a whole.

    Args:
        root: The folder (a monitor's or recorder's ``save_dir``).

    Example:
        >>> RunFolder("runs/exp1/gradlight").findings_file.as_posix()
        'runs/exp1/gradlight/findings.jsonl'
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def history_dir(self) -> Path:
        """The folder of the history segments."""
        return self.root / HISTORY_SUBDIR

    @property
    def findings_file(self) -> Path:
        """``findings.jsonl``."""
        return self.root / FINDINGS_FILE

    @property
    def run_info_file(self) -> Path:
        """``run.json``."""
        return self.root / RUN_INFO_FILE

    @property
    def state_file(self) -> Path:
        """``recorder_state.pt`` (see :data:`STATE_FILE`)."""
        return self.root / STATE_FILE

    def has_history(self) -> bool:
        """Whether the folder holds at least one history segment."""
        return bool(list_segments(self.history_dir))

    def clear(self) -> None:
        """Delete the history, findings, run info and recorder state (what ``overwrite=True`` replaces)."""
        shutil.rmtree(self.history_dir, ignore_errors=True)
        for file in (self.findings_file, self.run_info_file, self.state_file):
            file.unlink(missing_ok=True)

    def check_usable(self, owner: str = "save_dir") -> None:
        """Raise if the path exists but is not a folder.

        Raises:
            ValueError: Naming ``owner`` and the path.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"`{owner}` {str(self.root)!r} is a file; pass a folder path.")


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(payload), indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ run info
@dataclass(frozen=True)
class LayerInfo:
    """One monitored layer: its name, depth (forward order) and number of parameter elements."""

    name: str
    depth: int
    num_params: int


@dataclass(frozen=True)
class ActivationSiteInfo:
    """One tapped activation site: its name, activation kind, the layer it feeds (if known) and its depth."""

    name: str
    kind: str
    feeds: str | None
    depth: int


_RUN_INFO_KEYS = (
    "update_ratio_methods",
    "format_version",
    "gradlight_version",
    "trainer",
    "log_every_n_steps",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "world_size",
    "strategy",
    "precision",
    "model",
    "layers",
    "global_layer",
    "activation_sites",
)


@dataclass
class RunInfo:
    """What a run folder's ``run.json`` says about the run: settings, trainer and the monitored layers.

    Attributes:
        gradlight_version: The gradlight that wrote the run.
        trainer: Who drove the recording: ``"lightning"``, ``"fabric"``, ``"pytorch"``, ``"ultralytics"``,
            ``"huggingface"``.
        log_every_n_steps: The recording interval in optimizer steps.
        gradient_clip_val: The clip threshold the trainer applies after gradlight reads the gradients
            (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"`` (``None`` without clipping).
        accumulate_grad_batches: Micro-batches per optimizer step.
        world_size: Number of processes.
        strategy: The distributed strategy's name (``"SingleDeviceStrategy"``, ``"DDPStrategy"``, ...).
        precision: The precision setting (``"32-true"``, ``"bf16-mixed"``, ...).
        model: The model's class name.
        layers: The monitored layers in forward order.
        activation_sites: Tapped activation sites (empty without ``track_activations``).
        global_layer: The ``layer`` name of run-wide rows in the history.
        update_ratio_methods: How ``update_ratio`` got each param group's update, by group index
            (``"optimizer: AdamW (foreach)"``: reconstructed from the optimizer, no parameter copy;
            ``"copy: ..."``: from a parameter copy, with the reason). Empty without ``update_ratio``.
        extra: Anything a trainer integration adds (e.g. Ultralytics' ``nbs``); written at the top level of
            ``run.json`` beside the fields above.
        format_version: The run-folder format (:data:`FORMAT_VERSION`).

    Example:
        >>> info = RunInfo(gradlight_version="0.1.0", trainer="pytorch", log_every_n_steps=10, extra={"nbs": 64})
        >>> RunInfo.from_dict(info.to_dict()) == info
        True
    """

    gradlight_version: str
    trainer: str
    log_every_n_steps: int
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    accumulate_grad_batches: int = 1
    world_size: int = 1
    strategy: str = ""
    precision: str = ""
    model: str = ""
    layers: list[LayerInfo] = field(default_factory=list)
    activation_sites: list[ActivationSiteInfo] = field(default_factory=list)
    global_layer: str = GLOBAL_LAYER
    update_ratio_methods: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The ``run.json`` object (``extra`` merged at the top level; no ``activation_sites`` key if none)."""
        payload: dict[str, Any] = {
            "format_version": self.format_version,
            "gradlight_version": self.gradlight_version,
            "trainer": self.trainer,
            "log_every_n_steps": self.log_every_n_steps,
            "gradient_clip_val": self.gradient_clip_val,
            "gradient_clip_algorithm": self.gradient_clip_algorithm,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "precision": self.precision,
            "model": self.model,
            "layers": [{"name": x.name, "depth": x.depth, "num_params": x.num_params} for x in self.layers],
            "global_layer": self.global_layer,
        }
        if self.update_ratio_methods:
            payload["update_ratio_methods"] = dict(self.update_ratio_methods)
        if self.activation_sites:
            payload["activation_sites"] = [
                {"name": s.name, "kind": s.kind, "feeds": s.feeds, "depth": s.depth} for s in self.activation_sites
            ]
        for key, value in self.extra.items():
            payload.setdefault(key, value)
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], path: str | Path = RUN_INFO_FILE) -> RunInfo:
        """Parse a ``run.json`` object (a missing ``format_version`` is version 1, the first format).

        Raises:
            UnsupportedFormatError: If it declares a newer format.
        """
        version = check_format_version(path, payload.get("format_version", 1))
        clip = payload.get("gradient_clip_val")
        return cls(
            gradlight_version=str(payload.get("gradlight_version", "")),
            trainer=str(payload.get("trainer", "lightning")),  # runs written before the key were Lightning's
            log_every_n_steps=int(payload.get("log_every_n_steps", 0)),
            gradient_clip_val=float(clip) if clip is not None else None,
            gradient_clip_algorithm=payload.get("gradient_clip_algorithm"),
            accumulate_grad_batches=int(payload.get("accumulate_grad_batches") or 1),
            world_size=int(payload.get("world_size") or 1),
            strategy=str(payload.get("strategy", "")),
            precision=str(payload.get("precision", "")),
            model=str(payload.get("model", "")),
            layers=[
                LayerInfo(str(x["name"]), int(x["depth"]), int(x["num_params"])) for x in payload.get("layers", [])
            ],
            activation_sites=[
                ActivationSiteInfo(str(s["name"]), str(s["kind"]), s.get("feeds"), int(s["depth"]))
                for s in payload.get("activation_sites", [])
            ],
            global_layer=str(payload.get("global_layer", GLOBAL_LAYER)),
            update_ratio_methods={str(k): str(v) for k, v in payload.get("update_ratio_methods", {}).items()},
            extra={key: value for key, value in payload.items() if key not in _RUN_INFO_KEYS},
            format_version=version,
        )

    def write(self, folder: str | os.PathLike[str]) -> None:
        """Write ``run.json`` into ``folder`` atomically (the folder is created if missing)."""
        run_folder = RunFolder(folder)
        run_folder.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_folder.run_info_file, self.to_dict())


def read_run_info(path: str | os.PathLike[str]) -> RunInfo | None:
    """Read a run folder's ``run.json`` (``path`` is the folder or the file); ``None`` if there is none.

    Raises:
        UnsupportedFormatError: If it was written in a newer format.
        ValueError: If it is not a JSON object.

    Example:
        >>> read_run_info("/nonexistent") is None
        True
    """
    file = Path(path)
    if file.is_dir() or not file.suffix:
        file = RunFolder(file).run_info_file
    if not file.is_file():
        return None
    payload = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(payload, dict):
        raise ValueError(f"{str(file)!r} does not hold a JSON object (got {type(payload).__name__})")
    return RunInfo.from_dict(payload, file)


# ------------------------------------------------------------------------------------------------ findings
class FindingsWriter:
    """Appends findings to ``findings.jsonl`` (one JSON object a line), flushed and fsynced per batch.

    Args:
        save_dir: The run folder.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> FindingsWriter(d).append([Finding("dormant", "fc1", 5, 9, "msg", "cause", "remedy")])
        >>> load_findings(d)[["kind", "layer", "step"]].values.tolist()
        [['dormant', 'fc1', 5]]
    """

    def __init__(self, save_dir: str | os.PathLike[str]) -> None:
        self.path = RunFolder(save_dir).findings_file

    def touch(self) -> None:
        """Create the file if it is missing: an empty findings file says the diagnosis ran and found nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)

    def append(self, findings: Iterable[Finding]) -> None:
        """Write ``findings`` and make them durable."""
        lines = [json.dumps(finding.to_dict(), default=str) for finding in findings]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as sink:
            sink.write("\n".join(lines) + "\n")
            sink.flush()
            os.fsync(sink.fileno())


@dataclass(frozen=True)
class SkippedLine:
    """A ``findings.jsonl`` line the reader could not use: its 1-based number, why, and its text."""

    number: int
    reason: str
    text: str


@dataclass
class FindingsRead:
    """What :func:`read_findings` read: the findings frame and the lines it skipped."""

    frame: pd.DataFrame
    skipped: list[SkippedLine] = field(default_factory=list)
    path: Path | None = None

    def records(self) -> list[dict[str, Any]]:
        """The findings as JSON-like dicts (what the report reads), in the frame's order.

        Each has every field of :class:`gradlight.Finding`: text fields ``""`` when absent, ``step`` an int
        (``-1`` when absent), ``reported_step`` the step when absent, ``evidence`` a dict (a non-dict value
        is kept as ``{"value": ...}``), ``layers`` a list of strings; keys the file added are kept.

        Example:
            >>> read_findings("/nonexistent").records()
            []
        """
        rows = self.frame.to_dict("records") if not self.frame.empty else []
        return [_normalized({str(key): _missing_to_none(value) for key, value in row.items()}) for row in rows]


def _finding_columns() -> list[str]:
    return [f.name for f in fields(Finding)]


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _missing_to_none(value: Any) -> Any:
    """A cell of the findings frame as JSON would have it: NaN (a key the line lacked) becomes ``None``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _normalized(item: dict[str, Any]) -> dict[str, Any]:
    finding = dict(item)
    for key in ("kind", "layer", "message", "cause", "remedy"):
        value = finding.get(key)
        finding[key] = "" if value is None else str(value)
    step = _as_int(finding.get("step"))
    finding["step"] = -1 if step is None else step
    reported = _as_int(finding.get("reported_step"))
    finding["reported_step"] = finding["step"] if reported is None else reported
    finding["severity"] = str(finding.get("severity") or "warning")
    evidence = finding.get("evidence")
    if not isinstance(evidence, dict):
        finding["evidence"] = {} if evidence is None else {"value": evidence}
    layers = finding.get("layers")
    finding["layers"] = [str(name) for name in layers] if isinstance(layers, (list, tuple)) else []
    return finding


def read_findings(path: str | os.PathLike[str]) -> FindingsRead:
    """Read a run's findings, returning what could not be read instead of failing or guessing.

    A line is skipped (and listed in :attr:`FindingsRead.skipped`) when it is not JSON (a writer killed
    mid-line leaves a torn last line), not a JSON object, or lacks an integer ``step``. A finding a resumed
    run wrote twice (same ``kind``, ``layer`` and ``step``) is kept once, the last copy. A missing
    ``reported_step`` is the ``step``; a missing ``severity`` (files written before it existed) is
    ``"warning"``.

    Args:
        path: The run folder or the ``findings.jsonl`` file itself.

    Returns:
        The findings sorted by ``reported_step`` (columns: the fields of :class:`gradlight.Finding`) and the
        skipped lines. An empty frame if there is no findings file (no finding yet).

    Example:
        >>> result = read_findings("/nonexistent")
        >>> result.frame.empty, result.skipped
        (True, [])
    """
    file = Path(path)
    if file.is_dir() or not file.suffix:
        file = RunFolder(file).findings_file
    columns = _finding_columns()
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedLine] = []
    if file.is_file():
        with open(file, encoding="utf-8", errors="replace") as source:
            lines = source.read().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                where = "torn last line" if number == len(lines) else "not JSON"
                skipped.append(SkippedLine(number, where, line))
                continue
            if not isinstance(item, dict):
                skipped.append(SkippedLine(number, "not a JSON object", line))
                continue
            step = _as_int(item.get("step"))
            if step is None:
                skipped.append(SkippedLine(number, "no integer step", line))
                continue
            reported = _as_int(item.get("reported_step"))
            rows.append({**item, "step": step, "reported_step": step if reported is None else reported})
    extra = [key for row in rows for key in row if key not in columns]
    frame = pd.DataFrame(rows, columns=columns + list(dict.fromkeys(extra)))
    if not frame.empty:
        if "severity" in frame.columns:
            severity = frame["severity"].astype(object)
            frame["severity"] = severity.where(severity.notna(), "warning")
        else:
            frame["severity"] = "warning"
        frame["step"] = frame["step"].astype("int64")
        frame["reported_step"] = frame["reported_step"].astype("int64")
        frame = frame.drop_duplicates(subset=["kind", "layer", "step", "severity"], keep="last")
        frame = frame.sort_values("reported_step", kind="stable", ignore_index=True)
    elif "severity" not in frame.columns:
        frame["severity"] = pd.Series(dtype=object)
    return FindingsRead(frame=frame, skipped=skipped, path=file)


def load_findings(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Load the findings of a monitored run as a DataFrame.

    Args:
        path: The run folder (the monitor's ``save_dir``), the ``findings.jsonl`` file itself, or a folder
            holding exactly one run folder (as for :func:`gradlight.load_history`).

    Returns:
        One row per finding with the columns of :class:`gradlight.Finding` (``kind, layer, step,
        reported_step, message, cause, remedy, evidence, layers``, and ``severity``), ``evidence`` a dict,
        sorted by ``reported_step``. A run resumed from an older checkpoint may have written a finding
        twice; the last copy is kept. An empty frame when the diagnosis ran and found nothing. Unreadable
        lines (a torn last line left by a killed writer) are skipped with a warning; :func:`read_findings`
        returns them.

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no ``findings.jsonl`` (not a run folder, or a
            run recorded with ``diagnose=False``): an empty frame would read as a healthy run.

    Example:
        >>> findings = load_findings("runs/exp1/gradlight")  # doctest: +SKIP
        >>> findings[findings.kind == "vanishing"][["layer", "step", "message"]]  # doctest: +SKIP
        >>> load_findings("runs/typo")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no gradlight findings at 'runs/typo': the path does not exist
    """
    from gradlight.locate import find_run_folder, is_run_folder  # locate reads this module's file names

    if Path(path).is_dir() and not is_run_folder(path):
        path = find_run_folder(path)  # a folder holding one run (raises listing several, or none)
    _check_findings_exist(Path(path))
    result = read_findings(path)
    for line in result.skipped:
        warnings.warn(f"{result.path}: skipped line {line.number} ({line.reason})", stacklevel=2)
    return result.frame


def _check_findings_exist(path: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a findings file or a folder holding one."""
    if not path.exists():
        raise FileNotFoundError(f"no gradlight findings at {str(path)!r}: the path does not exist")
    if path.is_dir() and not RunFolder(path).findings_file.is_file():
        folder = RunFolder(path)
        why = (
            "the run was recorded with diagnose=False or has not reached its first step"
            if folder.has_history() or folder.run_info_file.is_file()
            else "it is not a gradlight run folder (pass the monitor's or recorder's save_dir)"
        )
        raise FileNotFoundError(f"no {FINDINGS_FILE} in {str(path)!r}: {why}")
