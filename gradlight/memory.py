"""How much memory a piece of tensor code allocates: the measure behind the "memory added" numbers.

:class:`LiveBytes` counts the storages that the operators run under it create and that are alive at once
(views and in-place results share a storage and are not new memory), and keeps the peak. It sees what the
dispatcher sees, on any device, without allocator statistics; the copy-free update ratio's test and the
``scale`` and ``gpu_check`` benchmarks use it to measure what a logged step adds.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created under it and alive at once (views and in-place results are not new).

    Attributes:
        current: Bytes of the storages created under it that are still alive.
        peak: The largest ``current`` seen.

    Example:
        >>> import torch
        >>> x = torch.zeros(256)
        >>> with LiveBytes() as live:
        ...     y = x * 2  # a new 1 KiB storage
        ...     _ = y.view(16, 16)  # a view: no new memory
        >>> live.peak
        1024
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive on it]
        self.current = 0
        self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.live.get(pointer)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[pointer]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in self.live:
                self.live[pointer][1] += 1
            elif pointer in inputs or not storage.nbytes():
                continue  # in place, or a view of a tensor made before
            else:
                self.live[pointer] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, pointer)
        return out
