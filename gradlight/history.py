"""The durable on-disk record of a monitored run, and :func:`load_history` to read it back.

The run folder's layout (``history/``, ``findings.jsonl``, ``run.json``) is owned by
:mod:`gradlight.runfolder`; this module writes and reads the ``history/`` segments.

Each segment is an Arrow IPC *stream* of record batches in long format with the columns
``step, layer, depth, metric, value``. The writer appends one record batch per flush and fsyncs it, so a
process killed mid-write leaves at most one torn batch at the end of the newest segment; the reader keeps
every complete batch before it and reports the tear. A segment remembers the step it started from
(``start_step``): rows of earlier segments at or after that step were computed by a run that was later
resumed from an older checkpoint, so they are superseded. That is how a resumed run continues one history
with no duplicate and no missing step.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gradlight.locate import find_run_folder
from gradlight.records import GLOBAL_LAYER
from gradlight.runfolder import (
    FORMAT_VERSION,
    HISTORY_SUBDIR,
    RunFolder,
    UnsupportedFormatError,
    check_format_version,
    list_segments,
    segment_path,
)

__all__ = [
    "COLUMNS",
    "CorruptHistoryWarning",
    "HistoryReadResult",
    "HistoryWriter",
    "TruncatedHistoryWarning",
    "find_history_dir",
    "load_history",
    "read_history",
]

#: Column order of :func:`load_history`'s frame.
COLUMNS = ("step", "layer", "depth", "metric", "value")
_START_STEP_KEY = b"gradlight.start_step"
_FORMAT_KEY = b"gradlight.format"
_CHECKSUM_KEY = b"gradlight.crc32"
_CONTINUATION = b"\xff\xff\xff\xff"  # the marker before every Arrow IPC message
#: What Arrow says when a stream ends before a message it has begun: a writer killed mid-write (a torn tail).
_TORN = re.compile(
    r"expected to (be able to )?read|only read|bytes available|unexpected end of stream|was null or length 0", re.I
)

SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("depth", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)


class TruncatedHistoryWarning(UserWarning):
    """A history segment ended in a torn record batch (its writer was killed); the rows before it are kept."""


class CorruptHistoryWarning(UserWarning):
    """A history segment holds damaged bytes that are not a torn tail; the records before the damage are kept."""


class HistoryWriter:
    """Appends rows to a new history segment in batches, durable against a crash.

    Rows are buffered in memory (bounded by ``max_buffered_rows``) and written as one Arrow record batch per
    :meth:`flush`, followed by an ``fsync``. Only the process that owns the run's history (rank zero)
    should create a writer.

    Args:
        save_dir: The monitor's ``save_dir``; segments go to ``save_dir/history``.
        start_step: The first optimizer step this writer may record. Rows of earlier segments at or after it
            are superseded when the history is read (a resumed run recomputes them).
        max_buffered_rows: Flush automatically once this many rows are buffered, which bounds memory.

    Example:
        >>> import tempfile, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> w = HistoryWriter(d)
        >>> w.append_step(0, ["fc1", "fc2"], np.array([0, 1]), {"grad_l2": np.array([0.5, 1.0])})
        >>> w.close()
        >>> load_history(d)["value"].tolist()
        [0.5, 1.0]
    """

    def __init__(self, save_dir: str | Path, start_step: int = 0, max_buffered_rows: int = 200_000) -> None:
        if max_buffered_rows < 1:
            raise ValueError(f"`max_buffered_rows` must be a positive integer, got {max_buffered_rows!r}.")
        self.history_dir = RunFolder(save_dir).history_dir
        self.history_dir.mkdir(parents=True, exist_ok=True)
        existing = list_segments(self.history_dir)
        self.segment_index = existing[-1][0] + 1 if existing else 0
        self.path = segment_path(self.history_dir, self.segment_index)
        self.start_step = int(start_step)
        self.max_buffered_rows = max_buffered_rows
        # Buffered chunks hold ``layer`` and ``metric`` as codes into ``_names``: turning a few hundred distinct
        # names into Arrow strings once per flush (then ``take``) is far cheaper than converting every row's.
        self._chunks: list[dict[str, np.ndarray]] = []
        self._names: list[str] = []
        self._codes: dict[str, int] = {}
        self._last_layers: tuple[tuple[str, ...], np.ndarray] | None = None
        pa.array([""]).take(pa.array([0]))  # loads Arrow's compute kernels now, not in the first flush (~10 ms)
        self._buffered_rows = 0
        self._sink: Any = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows_written = 0

    @property
    def buffered_rows(self) -> int:
        """Rows appended but not yet on disk."""
        return self._buffered_rows

    def append_step(
        self,
        step: int,
        layers: Sequence[str],
        depths: np.ndarray,
        metrics: dict[str, np.ndarray],
    ) -> None:
        """Buffer one step's per-layer metrics: ``metrics[name][i]`` belongs to ``layers[i]``."""
        num_layers = len(layers)
        if num_layers == 0 or not metrics:
            return
        names = list(metrics)
        values = np.concatenate([np.asarray(metrics[name], dtype=np.float64).reshape(-1) for name in names])
        if values.size != num_layers * len(names):
            raise ValueError(
                f"every metric must have one value per layer ({num_layers}); got sizes "
                f"{ {name: np.asarray(metrics[name]).size for name in names} }"
            )
        self._append_chunk(
            {
                "step": np.full(values.size, step, dtype=np.int64),
                "layer": np.tile(self._layer_codes(layers), len(names)),
                "depth": np.tile(np.asarray(depths, dtype=np.int32), len(names)),
                "metric": np.repeat(self._encode(names), num_layers),
                "value": values,
            }
        )

    def append_global(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one step's run-wide metrics under the layer name :data:`GLOBAL_LAYER` (depth ``-1``)."""
        if not metrics:
            return
        count = len(metrics)
        self._append_chunk(
            {
                "step": np.full(count, step, dtype=np.int64),
                "layer": np.full(count, self._encode([GLOBAL_LAYER])[0], dtype=np.int32),
                "depth": np.full(count, -1, dtype=np.int32),
                "metric": self._encode(list(metrics)),
                "value": np.asarray([float(v) for v in metrics.values()], dtype=np.float64),
            }
        )

    def _encode(self, names: Sequence[str]) -> np.ndarray:
        """Codes of ``names`` in the writer's name table (new names are added)."""
        codes = self._codes
        for name in names:
            if name not in codes:
                codes[name] = len(self._names)
                self._names.append(str(name))
        return np.fromiter((codes[name] for name in names), dtype=np.int32, count=len(names))

    def _layer_codes(self, layers: Sequence[str]) -> np.ndarray:
        """:meth:`_encode` for a step's layer list, which is usually the previous step's."""
        key = tuple(layers)
        if self._last_layers is None or self._last_layers[0] != key:
            self._last_layers = (key, self._encode(key))
        return self._last_layers[1]

    def _append_chunk(self, chunk: dict[str, np.ndarray]) -> None:
        self._chunks.append(chunk)
        self._buffered_rows += len(chunk["value"])
        if self._buffered_rows >= self.max_buffered_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one record batch and fsync the segment."""
        if not self._chunks:
            return
        names = pa.array(self._names, type=pa.string())
        arrays = []
        for name in COLUMNS:
            values = np.concatenate([chunk[name] for chunk in self._chunks])
            coded = name in ("layer", "metric")
            arrays.append(names.take(pa.array(values)) if coded else pa.array(values, type=SCHEMA.field(name).type))
        batch = pa.record_batch(arrays, schema=self._schema())
        writer = self._open()
        writer.write_batch(batch, custom_metadata={_CHECKSUM_KEY: str(_checksum(batch)).encode()})
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self.rows_written += batch.num_rows
        self._chunks.clear()
        self._buffered_rows = 0

    def close(self) -> None:
        """Flush and close the segment (writes the stream's end marker)."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self._sink.close()
            self._writer = None
            self._sink = None

    def _schema(self) -> pa.Schema:
        return SCHEMA.with_metadata(
            {_START_STEP_KEY: str(self.start_step).encode(), _FORMAT_KEY: str(FORMAT_VERSION).encode()}
        )

    def _open(self) -> pa.ipc.RecordBatchStreamWriter:
        if self._writer is None:
            self._sink = open(self.path, "wb")  # noqa: SIM115 - kept open across flushes, closed in close()
            self._writer = pa.ipc.new_stream(self._sink, self._schema())
        return self._writer


@dataclass
class SegmentInfo:
    """What was readable in one segment file."""

    path: Path
    start_step: int
    rows: int
    truncated: bool
    error: str = ""
    corrupt: bool = False


@dataclass
class HistoryReadResult:
    """A history as read from disk, with what could not be read."""

    frame: pd.DataFrame
    segments: list[SegmentInfo] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        """Whether any segment ended in a torn batch."""
        return any(segment.truncated for segment in self.segments)

    @property
    def corrupt(self) -> bool:
        """Whether any segment holds damage that is not a torn tail (see :attr:`SegmentInfo.corrupt`)."""
        return any(segment.corrupt for segment in self.segments)


def find_history_dir(path: str | Path) -> Path:
    """Resolve a monitor ``save_dir`` (or its ``history`` folder) to the folder holding the segments.

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no history segments.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no gradlight history at {str(root)!r}: the path does not exist")
    for candidate in (root / HISTORY_SUBDIR, root):
        if list_segments(candidate):
            return candidate
    raise FileNotFoundError(
        f"no gradlight history in {str(root)!r}: expected segment-*.arrow files in {str(root / HISTORY_SUBDIR)!r}"
        " (pass the monitor's save_dir)"
    )


#: Called by :func:`read_history` with the number of bytes read since its previous call.
ProgressCallback = Callable[[int], None]


def _read_segment(path: Path, progress: ProgressCallback | None = None) -> tuple[list[pa.RecordBatch], SegmentInfo]:
    """Read the complete batches of one segment, reporting the bytes consumed after each batch and at the end."""
    try:
        source = pa.OSFile(str(path), "rb")
    except OSError as err:
        return [], SegmentInfo(path, 0, 0, truncated=True, error=str(err))
    with source:
        size, reported = source.size(), 0

        def advance(position: int) -> None:
            nonlocal reported
            if progress is not None and position > reported:
                progress(position - reported)
                reported = position

        batches, info = _read_batches(path, source, advance)
        advance(size)  # the torn tail, the end marker: the calls for a segment sum to its size
    return batches, info


def _read_batches(
    path: Path, source: pa.NativeFile, advance: Callable[[int], None]
) -> tuple[list[pa.RecordBatch], SegmentInfo]:
    batches: list[pa.RecordBatch] = []
    head = source.read(4)
    source.seek(0)
    if len(head) == 4 and head != _CONTINUATION:  # every stream starts with it, even one torn after 4 bytes
        return [], _damaged(path, 0, [], f"not an Arrow stream (starts with {head.hex()})", torn=False)
    try:
        reader = pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as err:  # torn before the schema was complete, or damaged
        return [], _damaged(path, 0, [], str(err))
    metadata = reader.schema.metadata or {}
    try:
        start_step = int(metadata.get(_START_STEP_KEY, b"0"))
        check_format_version(path, metadata.get(_FORMAT_KEY, b"1"))  # raises for a newer format: never misread
    except UnsupportedFormatError as err:
        if isinstance(err.found, int) and err.found > FORMAT_VERSION:
            raise
        return [], _damaged(path, 0, [], f"damaged schema metadata: {err}", torn=False)
    except ValueError as err:
        return [], _damaged(path, 0, [], f"damaged schema metadata: {err}", torn=False)
    if [(f.name, f.type) for f in reader.schema] != [(f.name, f.type) for f in SCHEMA]:
        return [], _damaged(path, 0, [], f"unexpected columns {reader.schema.names}", torn=False)
    while True:
        try:
            batch, custom = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowException, OSError) as err:
            return batches, _damaged(path, start_step, batches, str(err))
        problem = _batch_problem(batch, custom)
        if problem:
            return batches, _damaged(path, start_step, batches, problem, torn=False)
        batches.append(batch)
        advance(source.tell())
    rows = sum(batch.num_rows for batch in batches)
    left = source.size() - source.tell()
    if left > 0:  # the stream "ended" early: zeroed bytes read as its end marker
        error = f"{left} bytes after the end of the stream"
        return batches, SegmentInfo(path, start_step, rows, truncated=False, error=error, corrupt=True)
    return batches, SegmentInfo(path, start_step, rows, truncated=False)


def _damaged(
    path: Path, start_step: int, batches: list[pa.RecordBatch], error: str, torn: bool | None = None
) -> SegmentInfo:
    """What a segment held when reading stopped at ``error``: a torn tail if Arrow ran out of bytes, else corrupt."""
    torn = bool(_TORN.search(error)) if torn is None else torn
    rows = sum(batch.num_rows for batch in batches)
    return SegmentInfo(path, start_step, rows, truncated=torn, error=error, corrupt=not torn)


def _batch_problem(batch: pa.RecordBatch, custom: pa.KeyValueMetadata | None) -> str:
    """Why a record batch that Arrow decoded is damaged (``""`` if it is sound).

    The full validation bounds every offset before any value is read; the checksum (written with every batch)
    catches damage that decodes cleanly, such as zeroed values; batches without one (older files) are held to
    what every row has: a layer and a metric name.
    """
    try:
        batch.validate(full=True)
    except pa.ArrowException as err:
        return f"invalid record batch: {err}"
    expected = (custom or {}).get(_CHECKSUM_KEY)
    if expected is not None:
        found = _checksum(batch)
        return "" if str(found).encode() == expected else f"checksum mismatch ({found} != {expected.decode()})"
    for name in ("layer", "metric"):
        if batch.column(name).null_count or pc.any(pc.equal(batch.column(name), "")).as_py():
            return f"empty {name} names"
    return ""


def _checksum(batch: pa.RecordBatch) -> int:
    """CRC-32 of a batch's logical contents (the same for the batch written and the batch read back)."""
    crc = 0
    for column in batch.columns:
        for part in _logical_buffers(column):
            crc = zlib.crc32(part, crc)
    return crc


def _logical_buffers(array: pa.Array) -> list[memoryview]:
    """The bytes that hold ``array``'s values: fixed-width values, or a string array's offsets and characters."""
    buffers = array.buffers()
    if pa.types.is_string(array.type):
        offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
        data = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")
        return [memoryview(offsets - offsets[0]).cast("B"), data[int(offsets[0]) : int(offsets[-1])]]
    width = array.type.bit_width // 8
    return [memoryview(buffers[1])[array.offset * width : (array.offset + len(array)) * width]]


def read_history(path: str | Path, progress: ProgressCallback | None = None) -> HistoryReadResult:
    """Read every segment of a history, superseding rows a resumed run recomputed.

    Torn tails are skipped; :attr:`HistoryReadResult.segments` says what each segment held.

    Args:
        path: The monitor's ``save_dir`` (or its ``history`` sub-folder).
        progress: Called with the number of bytes read since its previous call, after every record batch
            and at the end of every segment; the calls sum to the total size of the segment files (e.g.
            pass a progress bar's ``update``).

    Raises:
        FileNotFoundError: If ``path`` holds no history.
        gradlight.runfolder.UnsupportedFormatError: If a segment was written in a newer format.

    Example:
        >>> read = []
        >>> result = read_history("runs/exp1/gradlight", progress=read.append)  # doctest: +SKIP
        >>> sum(read)  # bytes of the segment files  # doctest: +SKIP
        48213
    """
    history_dir = find_history_dir(path)
    frames: list[pd.DataFrame] = []
    infos: list[SegmentInfo] = []
    for _, segment in list_segments(history_dir):
        batches, info = _read_segment(segment, progress)
        infos.append(info)
        if not batches and info.truncated:
            continue
        # A new segment starts at `start_step`: what earlier segments hold from there on was recomputed.
        frames = [frame[frame["step"] < info.start_step] for frame in frames]
        if batches:
            frames.append(pa.Table.from_batches(batches).to_pandas())
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = pd.DataFrame({name: pd.Series(dtype=SCHEMA.field(name).type.to_pandas_dtype()) for name in COLUMNS})
    frame = frame.sort_values(["step", "depth", "metric"], kind="stable", ignore_index=True)
    return HistoryReadResult(frame=frame[list(COLUMNS)], segments=infos)


def load_history(path: str | Path, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Load a monitored run's history as a long-format DataFrame.

    One row per ``(step, layer, metric)`` with the columns ``step, layer, depth, metric, value``. Per-layer
    metrics include ``grad_l2``, ``grad_max_abs``, ``grad_nonfinite``, ``param_l2`` and ``update_ratio``;
    run-wide metrics (``global_grad_l2``, ``early_late_ratio``, ...) use the layer name :data:`GLOBAL_LAYER`
    and depth ``-1``. A torn tail left by a killed writer is skipped with a :class:`TruncatedHistoryWarning`.

    Args:
        path: The run folder (the monitor's or recorder's ``save_dir``), its ``history`` sub-folder, or a
            folder holding exactly one run folder up to three levels down (``runs/exp``, a Lightning
            ``default_root_dir`` or ``lightning_logs/version_0``; see :func:`gradlight.locate.find_run_folder`).
        metrics: Keep only these metrics.

    Returns:
        The history, sorted by step, then depth.

    Raises:
        FileNotFoundError: If ``path`` holds no history.
        gradlight.locate.AmbiguousRunFolderError: If ``path`` holds several run folders (listed).
        gradlight.runfolder.UnsupportedFormatError: If a segment was written in a newer format (the
            error names its version).

    Example:
        >>> history = load_history("runs/exp1/gradlight")  # doctest: +SKIP
        >>> history[history.metric == "grad_l2"].pivot(index="layer", columns="step", values="value")  # doctest: +SKIP
    """
    result = read_history(find_run_folder(path))
    for segment in result.segments:
        if segment.corrupt:
            warnings.warn(
                f"{segment.path} is corrupt ({segment.error}): damage that is not a torn tail (a disk or copy "
                f"error, or bytes overwritten); kept the {segment.rows} readable rows before it",
                CorruptHistoryWarning,
                stacklevel=2,
            )
        elif segment.truncated:
            warnings.warn(
                f"{segment.path} ends in a torn record batch (its writer stopped mid-write); kept the "
                f"{segment.rows} rows before it",
                TruncatedHistoryWarning,
                stacklevel=2,
            )
    frame = result.frame
    if metrics is not None:
        frame = frame[frame["metric"].isin(list(metrics))].reset_index(drop=True)
    return frame
