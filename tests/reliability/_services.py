"""Services for the reliability suite (importable by name)."""
from __future__ import annotations

import os
import threading


class Gate:
    """Calls that block until released, and a count of how many have entered."""

    def init(self, b):   # on the machine: locks cannot travel
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

    def rss(self):
        return trimmed_rss()


def trimmed_rss():
    """This process's RSS after a full collection and ``malloc_trim``: live memory, without
    the free heap pages glibc keeps (the noise that hides a leak's trend, or fakes one)."""
    import ctypes
    import gc

    import psutil
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss
