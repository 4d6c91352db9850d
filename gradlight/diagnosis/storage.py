"""The findings log: ``findings.jsonl`` in the run folder, one JSON object a line."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from gradlight.diagnosis.finding import Finding

__all__ = ["FINDINGS_FILE", "FindingsWriter", "load_findings"]

#: File name of the findings log inside the monitor's ``save_dir``.
FINDINGS_FILE = "findings.jsonl"


class FindingsWriter:
    """Appends findings to ``findings.jsonl`` (one JSON object a line), flushed and fsynced per batch.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> FindingsWriter(d).append([Finding("dormant", "fc1", 5, 9, "msg", "cause", "remedy")])
        >>> load_findings(d)[["kind", "layer", "step"]].values.tolist()
        [['dormant', 'fc1', 5]]
    """

    def __init__(self, save_dir: str | Path) -> None:
        self.path = Path(save_dir) / FINDINGS_FILE

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


_FINDING_COLUMNS = [f.name for f in fields(Finding)]


def load_findings(path: str | Path) -> pd.DataFrame:
    """Load the findings of a monitored run.

    Args:
        path: The monitor's ``save_dir`` or the ``findings.jsonl`` file itself.

    Returns:
        One row per finding with the columns ``kind, layer, step, reported_step, message, cause, remedy,
        evidence, layers, severity`` (``evidence`` is a dict; ``severity`` is ``"warning"`` or ``"note"``,
        ``"warning"`` for files written before severities existed), sorted by ``reported_step``. A run
        resumed from an older checkpoint may have written a finding twice; the last copy is kept. An empty
        frame if there is no findings file (no finding yet). A torn last line (writer killed mid-write) is
        skipped with a warning.

    Example:
        >>> findings = load_findings("runs/exp1/gradlight")  # doctest: +SKIP
        >>> findings[findings.kind == "vanishing"][["layer", "step", "message"]]  # doctest: +SKIP
    """
    file = Path(path)
    if file.is_dir():
        file = file / FINDINGS_FILE
    rows: list[dict[str, Any]] = []
    if file.exists():
        lines = file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                where = "last line" if number == len(lines) else f"line {number}"
                warnings.warn(f"{file}: skipped a torn {where}", stacklevel=2)
    frame = pd.DataFrame(rows, columns=_FINDING_COLUMNS)
    frame["severity"] = frame["severity"].fillna("warning")  # files written before severities existed
    if frame.empty:
        return frame
    frame["step"] = frame["step"].astype("int64")
    frame["reported_step"] = frame["reported_step"].astype("int64")
    frame = frame.drop_duplicates(subset=["kind", "layer", "step", "severity"], keep="last")
    return frame.sort_values("reported_step", kind="stable", ignore_index=True)
