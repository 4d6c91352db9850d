"""The suite's network guard: recorded attempts fail the test, also when swallowed or made by a child."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import gradlight_netguard as netguard
import pytest

ROOT = Path(__file__).resolve().parents[1]
SELFTEST_ENV = "GRADLIGHT_NETGUARD_SELFTEST"
TARGET = "192.0.2.1"  # TEST-NET-1: never routed


def test_guard_blocks_and_records_in_this_process() -> None:
    with pytest.raises(netguard.NetworkAccessError, match=re.escape(TARGET)):
        socket.create_connection((TARGET, 9), timeout=0.2)
    netguard.probe(TARGET)  # swallowed by a broad except, as product code might
    with pytest.raises(netguard.NetworkAccessError, match=re.escape("example.org")):
        socket.gethostbyname("example.org")
    attempts = netguard.take_unreported()  # consumed here, so this test's teardown check stays green
    assert [a["kind"] for a in attempts] == ["getaddrinfo", "getaddrinfo", "gethostbyname"]
    assert all(a["pid"] == os.getpid() for a in attempts)
    assert netguard.take_unreported() == []


def test_loopback_stays_allowed() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        socket.create_connection(server.getsockname(), timeout=1).close()
    finally:
        server.close()
    assert netguard.take_unreported() == []


def test_subprocesses_are_guarded_and_recorded() -> None:
    code = "import gradlight_netguard as g, socket; g.probe(); print(g.installed())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "True"  # installed at start by sitecustomize, not by the command
    attempts = netguard.take_unreported()
    assert len(attempts) == 1 and attempts[0]["pid"] != os.getpid(), attempts
    assert TARGET in attempts[0]["target"]


def test_spawned_processes_are_guarded_and_recorded() -> None:
    process = multiprocessing.get_context("spawn").Process(target=netguard.probe, args=(TARGET,))
    process.start()
    process.join(60)
    assert process.exitcode == 0  # the child swallowed the error, as a DDP rank's broad except would
    attempts = netguard.take_unreported()
    assert [a["pid"] for a in attempts] == [process.pid], attempts


if os.environ.get(SELFTEST_ENV) == "1":  # collected only by the inner pytest of the test below

    def test_selftest_swallowed_attempt() -> None:
        netguard.probe(TARGET)


def test_a_swallowed_attempt_fails_the_test_at_teardown(tmp_path: Path) -> None:
    env = {**os.environ, SELFTEST_ENV: "1", netguard.LOG_ENV: str(tmp_path / "inner.jsonl")}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"{__file__}::test_selftest_swallowed_attempt",
    ]
    inner = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert inner.returncode == 1, inner.stdout + inner.stderr
    assert "1 passed, 1 error" in inner.stdout and "network access attempted" in inner.stdout, inner.stdout
    assert TARGET in inner.stdout
