"""Running state the detectors keep between logged steps: per-layer windows and streaks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["LayerWindows", "Streaks"]


class Streaks:
    """Consecutive-step counters per key (a layer or site), each with the step it started at.

    Example:
        >>> streaks = Streaks()
        >>> streaks.advance(["a", "b"], np.array([True, False]), step=3)
        [(1, 3), (0, 3)]
        >>> streaks.advance(["a", "b"], np.array([True, True]), step=4)
        [(2, 3), (1, 4)]
    """

    def __init__(self) -> None:
        self.table: dict[str, list[int]] = {}  # key -> [count, first step]

    def advance(self, keys: Iterable[str], holds: np.ndarray, step: int) -> list[tuple[int, int]]:
        """Extend the streak of every key whose condition holds at ``step``, reset the others.

        Returns:
            ``(count, first step)`` per key, in order.
        """
        out: list[tuple[int, int]] = []
        for key, held in zip(keys, holds.tolist()):
            if not held:
                self.table.pop(key, None)
                out.append((0, step))
                continue
            entry = self.table.get(key)
            if entry is None:
                entry = self.table[key] = [0, step]
            entry[0] += 1
            out.append((entry[0], entry[1]))
        return out

    def one(self, key: str, holds: bool, step: int) -> tuple[int, int]:
        """:meth:`advance` for a single key."""
        return self.advance([key], np.array([holds]), step)[0]

    def since(self, key: str) -> int | None:
        """The first step of ``key``'s running streak, or ``None``."""
        entry = self.table.get(key)
        return None if entry is None else entry[1]

    def state_dict(self) -> dict[str, Any]:
        """``key -> [count, first step]``."""
        return {key: list(value) for key, value in self.table.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.table = {str(key): [int(value[0]), int(value[1])] for key, value in state.items()}


class LayerWindows:
    """The last ``size`` finite gradient norms of every layer, one ring buffer per column of one array.

    Equivalent to a ``deque(maxlen=size)`` per layer, with the per-layer medians taken in one numpy call
    instead of a Python loop over the layers.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.columns: dict[str, int] = {}
        self.values = np.full((size, 0), np.nan)
        self.count = np.zeros(0, dtype=np.int64)  # values ever appended per column (ring position = count % size)
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None

    def columns_of(self, layers: list[str]) -> np.ndarray:
        """Column of each layer (new layers get empty columns); cached for a repeated layer list."""
        key = tuple(layers)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        new = [name for name in dict.fromkeys(key) if name not in self.columns]
        if new:
            for name in new:
                self.columns[name] = len(self.columns)
            self.values = np.hstack([self.values, np.full((self.size, len(new)), np.nan)])
            self.count = np.concatenate([self.count, np.zeros(len(new), dtype=np.int64)])
        self._last = (key, np.fromiter((self.columns[name] for name in key), dtype=np.int64, count=len(key)))
        return self._last[1]

    def positive_medians(self, columns: np.ndarray) -> np.ndarray:
        """Median of each column's positive values (NaN where it has none), as ``statistics.median``.

        A sort puts the NaN-masked values last; the median is read at the middle of each column's valid
        prefix (``np.nanmedian`` goes through masked arrays for short axes and is ~10x slower).
        """
        window = self.values[:, columns]
        ordered = np.sort(np.where(window > 0, window, np.nan), axis=0)  # NaN sorts last
        valid = (window > 0).sum(axis=0)
        low = np.take_along_axis(ordered, np.maximum(valid - 1, 0)[None] // 2, axis=0)[0]
        high = np.take_along_axis(ordered, (valid // 2)[None], axis=0)[0]
        return np.where(valid > 0, (low + high) / 2, np.nan)

    def push(self, columns: np.ndarray, values: np.ndarray) -> None:
        """Append each finite value to its column's ring."""
        finite = np.isfinite(values)
        columns, values = columns[finite], values[finite]
        self.values[self.count[columns] % self.size, columns] = values
        self.count[columns] += 1

    def to_lists(self) -> dict[str, list[float]]:
        """``layer -> its values, oldest first`` (the state format)."""
        out = {}
        for name, column in self.columns.items():
            total = int(self.count[column])
            held = min(total, self.size)
            out[name] = [float(self.values[(total - held + k) % self.size, column]) for k in range(held)]
        return out

    @classmethod
    def from_lists(cls, size: int, lists: Mapping[str, Iterable[float]]) -> LayerWindows:
        """Inverse of :meth:`to_lists` (older values beyond ``size`` are dropped, as a deque would)."""
        windows = cls(size)
        names = list(lists)
        columns = windows.columns_of(names)
        for name, column in zip(names, columns):
            for value in list(lists[name])[-size:]:
                windows.push(np.array([column]), np.array([float(value)]))
        return windows
