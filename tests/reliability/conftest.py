"""Reliability suite: each test reports its figures; the terminal summary lists them all.

Run with ``-s`` to see each figure as it is measured; without ``-s`` they are printed in a
"reliability figures" section at the end (and recorded as junit properties).
"""
from __future__ import annotations

import os
import time
from typing import List, Tuple

import psutil
import pytest

_FIGURES: List[Tuple[str, str]] = []


class Figures:
    """Where a test puts what it measured (one line per figure)."""

    def __init__(self, record_property):
        self._record = record_property

    def add(self, name: str, text: str) -> None:
        _FIGURES.append((name, text))
        self._record(name, text)
        print(f"\nFIGURE {name}: {text}", flush=True)


@pytest.fixture
def figures(record_property):
    return Figures(record_property)


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, text in _FIGURES:
        terminalreporter.write_line(f"{name}: {text}")


# -- helpers --------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def usage(pid: int) -> Tuple[int, int]:
    """(open fds, threads) of a process."""
    p = psutil.Process(pid)
    return p.num_fds(), p.num_threads()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def settle(pid: int, limit: Tuple[int, int], timeout: float = 15.0) -> Tuple[int, int]:
    """Poll until the process's (fds, threads) are at most ``limit``; return them.

    Closing a connection ends its server thread asynchronously, so a brief excess is not
    a leak; one that is still there after ``timeout`` seconds is.
    """
    deadline = time.monotonic() + timeout
    while True:
        now = usage(pid)
        if now[0] <= limit[0] and now[1] <= limit[1]:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid}: fds/threads {now} still above {limit} "
                                 f"after {timeout} s (a leak)")
        time.sleep(0.02)


def ssh_available() -> bool:
    return os.path.exists("/usr/sbin/sshd")
