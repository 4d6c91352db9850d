"""Network guard of the test suite: no connection to, and no name resolution of, a non-loopback address.

``tests/conftest.py`` installs it in the pytest process and, by putting this folder on ``PYTHONPATH`` (its
``sitecustomize.py`` runs at every interpreter start) and setting ``GRADLIGHT_NETGUARD_LOG``, in every Python
process the tests start: the grid's run subprocesses, ``torch.multiprocessing.spawn`` DDP ranks, Ultralytics'
own children. A blocked attempt raises :class:`NetworkAccessError` *and* is appended to the log file, so an
attempt that product code swallows with a broad ``except`` still fails the test (at its teardown).

Stdlib only: it is imported before anything else in child processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Environment variable naming the JSON-lines file where every blocked attempt is recorded.
LOG_ENV = "GRADLIGHT_NETGUARD_LOG"

_REAL: dict[str, Callable[..., Any]] = {}
_allowed = 0
_reported_offset = 0


class NetworkAccessError(RuntimeError):
    """Something opened a connection to, or resolved, a non-loopback address during a test."""


def is_loopback(address: Any) -> bool:
    """Whether a socket address (or ``(host,)``) stays on this machine.

    Example:
        >>> is_loopback(("127.0.0.1", 80)), is_loopback(("::1", 80, 0, 0)), is_loopback(("192.0.2.1", 80))
        (True, True, False)
    """
    if isinstance(address, (str, bytes)):
        return True  # AF_UNIX socket path
    if not (isinstance(address, tuple) and address):
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def record(kind: str, target: Any) -> None:
    """Append one blocked attempt to the log named by ``GRADLIGHT_NETGUARD_LOG`` (if set)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    entry = {"pid": os.getpid(), "kind": kind, "target": repr(target), "argv": " ".join(sys.argv[:4])[:200]}
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")
    except OSError:  # the session that owns the log has ended; the attempt still raises
        pass


def _block(kind: str, target: Any) -> None:
    if _allowed:
        return
    record(kind, target)
    raise NetworkAccessError(f"network access blocked in tests: {kind} {target!r}")


def _guard_method(name: str) -> Callable[..., Any]:
    real = _REAL[name]

    def guarded(self: socket.socket, *args: Any) -> Any:
        address = args[-1] if args else None  # connect(address), sendto(data[, flags], address)
        if not is_loopback(address):
            _block(name, address)
        return real(self, *args)

    return guarded


def _guard_resolver(name: str) -> Callable[..., Any]:
    real = _REAL[name]

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback((host,)):
            _block(name, host)
        return real(host, *args, **kwargs)

    return guarded


def install() -> None:
    """Patch ``socket`` in this process (idempotent)."""
    if _REAL:
        return
    for name in ("connect", "connect_ex", "sendto"):
        _REAL[name] = getattr(socket.socket, name)
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        _REAL[name] = getattr(socket, name)
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, _guard_method(name))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, name, _guard_resolver(name))


def installed() -> bool:
    """Whether this process is guarded."""
    return bool(_REAL)


@contextmanager
def allow() -> Iterator[None]:
    """Let this process reach the network inside the block (only for a fallback test-data download)."""
    global _allowed
    _allowed += 1
    try:
        yield
    finally:
        _allowed -= 1


def take_unreported() -> list[dict[str, Any]]:
    """Attempts logged (by any process) since the last call; the test-teardown check calls it."""
    global _reported_offset
    path = os.environ.get(LOG_ENV)
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        file.seek(_reported_offset)
        text = file.read()
    complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next call
    _reported_offset += len(complete.encode("utf-8"))
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def probe(host: str = "192.0.2.1", port: int = 9) -> None:
    """Try to connect and swallow the error, like a broad ``except`` in product code (for the guard's tests)."""
    with contextlib.suppress(Exception):  # the point: the guard must catch what product code swallows
        socket.create_connection((host, port), timeout=0.2).close()
