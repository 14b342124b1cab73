"""Process-wide helpers made on first use, and made again in a forked child.

The output forwarder and the mux reader and writer are one thread each per process; a
child forked from the driver has none of the parent's threads, so it must not reuse them.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")

__all__ = ["PerProcess"]


class PerProcess(Generic[T]):
    """``factory()``'s value, made once per process on the first :meth:`get`."""

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._value: Optional[T] = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._reset)

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def _reset(self) -> None:
        self._value = None
        self._lock = threading.Lock()
