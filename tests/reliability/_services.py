"""Services for the reliability suite (importable by name)."""
from __future__ import annotations

import os
import threading


class Gate:
    """Calls that block until released, and a count of how many have entered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entered = 0
        self._open = threading.Event()

    def block(self, value=None):
        with self._lock:
            self._entered += 1
        self._open.wait()
        return value

    def entered(self):
        with self._lock:
            return self._entered

    def release(self):
        self._open.set()

    def reset(self):
        self._open.clear()
        with self._lock:
            self._entered = 0


class Payloads:
    def echo(self, x):
        return x

    def sized(self, n):
        return b"r" * n

    def pid(self):
        return os.getpid()

    def deep(self, depth):
        nested = []
        for _ in range(depth):
            nested = [nested]
        return nested

    def length(self, x):
        return len(x)
