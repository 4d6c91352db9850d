"""Helpers for multi-process (gloo, CPU) tests: free ports, starting workers, their environment, counting
collectives.

A test never re-runs pytest in a child (``strategy="ddp"`` inside pytest does): it starts top-level workers
with :func:`spawn`; each calls :func:`init_env` first and builds its own process group or Trainer, and
writes its results to files that the test reads.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

#: How workers start (``GRADLIGHT_TEST_START_METHOD`` overrides): ``fork`` where available, since a forked
#: worker inherits the parent's imports, while ``spawn`` imports torch and Lightning again in every worker.
START_METHOD = os.environ.get(
    "GRADLIGHT_TEST_START_METHOD",
    "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn",
)


def free_port() -> int:
    """A TCP port that is free on this machine now (for ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(fn: Callable[..., None], world: int, *args: Any, timeout: float = 600.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` new processes and wait for all of them.

    Raises:
        TimeoutError: If they are not done after ``timeout`` seconds (they are terminated first).
        torch.multiprocessing.ProcessRaisedException: If a worker raised.
    """
    context = torch.multiprocessing.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method=START_METHOD
    )
    assert context is not None
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout:.0f} s")


def init_env(rank: int, world: int, port: int) -> None:
    """The torch.distributed environment of ``rank`` in a ``world`` on ``port``, one thread per process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------- counting collectives
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
)
_FUNCTIONAL = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast")


class CollectiveCounter:
    """Counts torch.distributed collectives (c10d and functional) issued while :attr:`active`."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        self.window = 0
        self._lock = threading.Lock()
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        for module, names in ((dist, _COLLECTIVES), (c10d, _COLLECTIVES), (funcol, _FUNCTIONAL)):
            for name in names:
                original = getattr(module, name, None)
                if original is not None:
                    setattr(module, name, self._wrap(original))

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.window += 1  # every collective since the window was last opened
                if self.active:
                    self.count += 1
            return original(*args, **kwargs)

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    def measure(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap ``fn`` so that the collectives it issues are appended to :attr:`per_call`."""
        self.per_call: list[int] = []

        def measured(*args: Any, **kwargs: Any) -> Any:
            self.count, self.active = 0, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = False
                self.per_call.append(self.count)

        return measured
