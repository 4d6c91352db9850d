"""Suite-wide test settings: no network (in this process and in every process a test starts), one thread,
offline Ultralytics."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "False")

#: The guard and the ``sitecustomize.py`` that installs it in child processes (put on their PYTHONPATH).
NETGUARD_DIR = Path(__file__).resolve().parent / "_netguard"
if str(NETGUARD_DIR) not in sys.path:
    sys.path.insert(0, str(NETGUARD_DIR))

import gradlight_netguard as netguard  # noqa: E402

NetworkAccessError = netguard.NetworkAccessError


_LOG_OWNER_ENV = "GRADLIGHT_NETGUARD_WORKER"  # the xdist worker (or "" for none) that created the log


def _install_network_guard() -> str | None:
    """Guard this process now, and every Python process started from here on (env is inherited).

    Returns:
        The attempts log when this session created it (removed at the end), None when inherited.
    """
    created = None
    # One log per pytest-xdist worker: the workers inherit the controller's environment, and a shared log would
    # blame one worker's test for another's attempts (the guard's own tests make some on purpose).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not os.environ.get(netguard.LOG_ENV) or os.environ.get(_LOG_OWNER_ENV, "") != worker:
        handle, created = tempfile.mkstemp(prefix=f"gradlight-netguard-{worker}", suffix=".jsonl")
        os.close(handle)
        os.environ[netguard.LOG_ENV] = created
        os.environ[_LOG_OWNER_ENV] = worker
    paths = [str(NETGUARD_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    netguard.install()
    return created


_CREATED_LOG = _install_network_guard()


def _describe(attempts: list[dict]) -> str:
    lines = [f"  pid {a['pid']} ({a['argv']}): {a['kind']} {a['target']}" for a in attempts[:10]]
    more = f"\n  ... and {len(attempts) - 10} more" if len(attempts) > 10 else ""
    return "\n".join(lines) + more


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    """Fail the test if it, its fixtures, or any process they started tried to reach a non-loopback address.

    Each attempt already raised ``NetworkAccessError`` where it happened; the log catches the ones that an
    ``except Exception`` swallowed, or that happened in a child process whose failure went unnoticed.
    """
    yield
    attempts = netguard.take_unreported()
    if attempts:
        pytest.fail(f"network access attempted (blocked) during this test:\n{_describe(attempts)}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Attempts after the last test's teardown (session fixtures' teardown) fail the run too."""
    attempts = netguard.take_unreported()
    if attempts:
        print(f"\nnetwork access attempted (blocked) outside any test:\n{_describe(attempts)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _CREATED_LOG:
        Path(_CREATED_LOG).unlink(missing_ok=True)
