"""Writing one recorded run's folder: history, findings and ``run.json``, on rank zero only.

:class:`RunFolderWriter` is the storage side of a recorder (below the analysis: it writes what it is given
and reads no gradient). Every rank calls :meth:`RunFolderWriter.open` (one broadcast decides whether the
folder holds another run's history); only rank zero opens the files and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gradlight.activations import ActivationStats
from gradlight.collectives import Collectives
from gradlight.history import HistoryWriter
from gradlight.locate import announce_run_folder
from gradlight.records import Finding
from gradlight.runfolder import FindingsWriter, LayerInfo, RunFolder, RunInfo
from gradlight.signal import SignalStats
from gradlight.tracker import StepRecord

__all__ = ["HistoryExistsError", "RunFolderWriter"]

#: The key of ``run.json``'s ``extra`` that says how update ratios are computed (fused kernel, or eager and why).
KERNEL_KEY = "update_ratio_kernel"


class HistoryExistsError(FileExistsError):
    """The run folder already holds a history from another run (and ``overwrite`` is off)."""


class RunFolderWriter:
    """Writes one run folder: the history of each record, the findings and ``run.json`` (rank zero).

    Args:
        folder: The run folder; ``None`` records in memory only (every call is a no-op).
        collectives: Cross-process operations: rank zero writes, :meth:`open` agrees over a broadcast.
        flush_every_n_records: Records buffered before they are written to disk.
        diagnose: Open the findings file too.
        overwrite: Replace another run's history instead of raising :class:`HistoryExistsError`.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from gradlight import StepRecord, load_history
        >>> save_dir = tempfile.mkdtemp()
        >>> writer = RunFolderWriter(RunFolder(save_dir), Collectives(), flush_every_n_records=10, diagnose=False)
        >>> writer.open(resumed=False, last_recorded_step=-1)
        >>> record = StepRecord(0, ["fc"], np.array([0]), {"grad_l2": np.array([0.5])}, {"global_grad_l2": 0.5})
        >>> writer.write(record)
        >>> writer.close()
        >>> history = load_history(save_dir)
        >>> history[history.metric == "grad_l2"].value.tolist()
        [0.5]
    """

    def __init__(
        self,
        folder: RunFolder | None,
        collectives: Collectives,
        flush_every_n_records: int,
        diagnose: bool,
        overwrite: bool = False,
    ) -> None:
        self.folder = folder
        self.collectives = collectives
        self.flush_every_n_records = flush_every_n_records
        self.diagnose = diagnose
        self.overwrite = overwrite
        #: Records this writer (or the run it resumes) appended to the history.
        self.records_written = 0
        #: Records appended since the last :meth:`flush`.
        self.records_since_flush = 0
        self._history: HistoryWriter | None = None
        self._findings: FindingsWriter | None = None

    @property
    def is_open(self) -> bool:
        """Whether the history is open for writing (rank zero, after :meth:`open`, before :meth:`close`)."""
        return self._history is not None

    def open(self, resumed: bool, last_recorded_step: int) -> None:
        """Check the folder and open its writers on rank zero; every rank calls it (one broadcast).

        Args:
            resumed: The run continues a history (from a checkpoint or a step): an existing one is kept.
            last_recorded_step: The last step recorded before; the history's rows after it are superseded.

        Raises:
            HistoryExistsError: If the folder holds another run's history and ``overwrite`` is off.
        """
        folder, coll = self.folder, self.collectives
        if folder is None:
            return
        found = folder.has_history() if coll.is_global_zero else False
        if coll.broadcast is not None:
            found = bool(coll.broadcast(found))
        if found and not (resumed or self.records_written):
            self._replace_history(folder)
        if coll.is_global_zero:
            # A resumed run recomputes every step after the checkpoint's last record: those rows supersede.
            self._history = HistoryWriter(folder.root, start_step=last_recorded_step + 1)
            if self.diagnose:
                self._findings = FindingsWriter(folder.root)
                self._findings.touch()
            announce_run_folder(folder.root)

    def _replace_history(self, folder: RunFolder) -> None:
        coll = self.collectives
        if not self.overwrite:
            raise HistoryExistsError(
                f"{str(folder.root)!r} already holds a gradlight history from another run. Pass a new "
                "`save_dir`, resume that run (load the recorder's state_dict, or "
                "`trainer.fit(..., ckpt_path=...)`), or set `overwrite=True` to replace it."
            )
        if coll.is_global_zero:
            folder.clear()
        if coll.broadcast is not None:
            coll.broadcast(True)  # the other ranks wait until rank zero has cleared the folder

    def write(
        self,
        record: StepRecord,
        acts: ActivationStats | None = None,
        signal: SignalStats | None = None,
        *,
        run_info: RunInfo | None = None,
        update_methods: dict[str, str] | None = None,
        kernel: str | None = None,
        layers: Callable[[], list[LayerInfo]] | None = None,
        layer_count: int | None = None,
    ) -> None:
        """Append one record (and its activation and backward-signal rows) to the history.

        ``run.json`` (``run_info``) is rewritten first when it is new or out of date: at the first record,
        or when the update methods, the update-ratio ``kernel`` or the ``layer_count`` changed (another
        optimizer's network joined the layer map); ``layers`` then gives its layers.
        """
        history = self._history
        if history is None:
            return
        stale = layer_count is not None and layer_count != len(run_info.layers if run_info is not None else [])
        if run_info is not None and (stale or self._run_info_stale(run_info, update_methods or {}, kernel)):
            if kernel is not None:
                run_info.extra[KERNEL_KEY] = kernel  # fused, or eager and why (run.json)
            run_info.update_ratio_methods = update_methods or {}
            if layers is not None:
                run_info.layers = layers()
            self.write_run_info(run_info)
        history.append_step(record.step, record.layers, record.depths, record.metrics)
        history.append_global(record.step, record.global_metrics)
        if acts is not None:
            history.append_step(acts.step, acts.sites, acts.depths, acts.metrics)
        if signal is not None:
            history.append_step(signal.step, signal.blocks, signal.depths, signal.metrics)
        self.records_written += 1
        self.records_since_flush += 1
        if self.records_since_flush >= self.flush_every_n_records:
            self.flush()

    def _run_info_stale(self, run_info: RunInfo, update_methods: dict[str, str], kernel: str | None) -> bool:
        return (
            (kernel is not None and kernel != run_info.extra.get(KERNEL_KEY))
            or self.records_written == 0
            or update_methods != run_info.update_ratio_methods
        )

    def write_findings(self, findings: Iterable[Finding]) -> None:
        """Append findings to the findings file (rank zero, with the diagnosis on)."""
        findings = list(findings)
        if findings and self._findings is not None:
            self._findings.append(findings)

    def write_run_info(self, run_info: RunInfo) -> None:
        """Write ``run.json`` (rank zero, once open)."""
        if self._history is not None and self.folder is not None:
            run_info.write(self.folder.root)

    def flush(self) -> None:
        """Write buffered records to disk now (a no-op where nothing is open)."""
        if self._history is not None:
            self._history.flush()
        self.records_since_flush = 0

    def close(self) -> None:
        """Close the history and the findings file; :meth:`open` opens them again. Idempotent."""
        if self._history is not None:
            self._history.close()
            self._history = None
        self._findings = None
