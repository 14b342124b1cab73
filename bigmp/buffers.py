"""Receive buffers for large payloads: filled in place, faulted in at once, and reused.

A large out-of-band buffer arrives straight into the object the caller gets: a ``bytes``
(filled in place on CPython: nobody else holds it until it is returned) or a
``bytearray``. A fresh 100 MiB buffer costs its page faults as the socket read first
touches it (~31 ms here), more than the copy itself, so:

* **populate**: a fresh buffer of 1 MiB or more is faulted in with one
  ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+; ~22 ms for 100 MiB). Huge pages are not
  asked for: on VMs that hand free 2 MiB blocks back to the host, a huge-page buffer
  taken after a few idle seconds costs ~160 ms instead of ~25 ms (measured);
* **reuse**: the process keeps the last two large buffers it received (at most
  ``SPARE_MAX`` bytes in all, for ``SPARE_SECONDS`` after the last use). When the next
  large buffer of the same size and type arrives and nobody else refers to a kept one
  any more (its reference count says so: the program dropped it), that one is filled
  again instead of a new one being faulted in. Repeated transfers of one size (an echo, chunks of an
  array) then cost a copy, like a raw socket reading into a reused buffer. An object
  still referenced anywhere is never touched; a reused ``bytes`` has its cached hash
  reset. Reuse is off on builds without the GIL (their reference counts are not exact).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Optional, Tuple

__all__ = ["fresh_bytes", "fresh_bytearray", "keep", "POPULATE_MIN"]

POPULATE_MIN = 1 << 20       # smaller buffers come from malloc's heap, already mapped
SPARE_MAX = 1 << 30          # bytes kept at most, in all
SPARE_COUNT = 2
SPARE_SECONDS = 2.0
_MADV_POPULATE_WRITE = 23    # Linux 5.14+

try:
    import ctypes
    import platform as _platform
    if _platform.python_implementation() != "CPython":
        raise ImportError
    _PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
    _PyBytes_FromStringAndSize.restype = ctypes.py_object
    _PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    _BYTES_OFFSET = bytes.__basicsize__ - 1   # ob_sval, after the header
    # ob_shash (the cached hash) sits just before ob_sval while bytes have one (<= 3.12:
    # basicsize 33); elsewhere, reuse of bytes is off rather than guessing the layout.
    _HASH_OFFSET: Optional[int] = 24 if bytes.__basicsize__ == 33 else None
except Exception:   # pragma: no cover - other interpreters
    _PyBytes_FromStringAndSize = None
    _HASH_OFFSET = None
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except Exception:   # pragma: no cover - no libc madvise
    _madvise = None

# sys._is_gil_enabled exists from 3.13 (free-threaded builds can turn the GIL off).
_REUSE = _PyBytes_FromStringAndSize is not None and \
    getattr(sys, "_is_gil_enabled", lambda: True)()


def _populate(addr: int, n: int) -> None:
    """Fault in the whole pages of [addr, addr+n) with one madvise."""
    global _madvise
    if _madvise is None:
        return
    start = (addr + 4095) & ~4095
    end = (addr + n) & ~4095
    if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _madvise = None     # older kernel (EINVAL): plain page faults from now on


def _bytes_view(obj: bytes, n: int) -> memoryview:
    addr = id(obj) + _BYTES_OFFSET
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B")


def fresh_bytes(n: int) -> Tuple[Any, memoryview]:
    """(a ``bytes`` of size n to fill, a writable view of it): the kept one if it may be
    reused, else a new one (pages faulted in). Elsewhere than CPython, a bytearray."""
    if _PyBytes_FromStringAndSize is None:
        return fresh_bytearray(n)
    if n >= POPULATE_MIN:
        obj = _spare.take(bytes, n)
        if obj is not None:
            ctypes.c_ssize_t.from_address(id(obj) + _HASH_OFFSET).value = -1
            return obj, _bytes_view(obj, n)
    obj = _PyBytes_FromStringAndSize(None, n)
    if n >= POPULATE_MIN:
        _populate(id(obj) + _BYTES_OFFSET, n)
    return obj, _bytes_view(obj, n)


def fresh_bytearray(n: int) -> Tuple[bytearray, memoryview]:
    """(a bytearray of size n to fill, a view of it): the kept one if it may be reused,
    else a new zeroed one (pages faulted in)."""
    if n >= POPULATE_MIN:
        obj = _spare.take(bytearray, n)
        if obj is not None:
            return obj, memoryview(obj)
    data = bytearray(n)
    view = memoryview(data)
    if n >= POPULATE_MIN and _madvise is not None:
        _populate(ctypes.addressof(ctypes.c_char.from_buffer(view)), n)
    return data, view


def keep(obj: Any) -> None:
    """Offer a buffer just filled for reuse by a later receive (see the module doc)."""
    if _REUSE and POPULATE_MIN <= len(obj) <= SPARE_MAX:
        _spare.put(obj)


class _Spare:
    """The kept buffers of this process: the last ``SPARE_COUNT`` received (two, so that
    ``r = m.call(...)`` in a loop, which still holds the previous result while the next
    arrives, finds the one before it free), at most ``SPARE_MAX`` bytes in all, dropped
    ``SPARE_SECONDS`` after the last use."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kept: list = []
        self.used = 0.0
        self.timer: Optional[threading.Timer] = None
        self.pid = os.getpid()

    def take(self, kind: type, n: int) -> Any:
        if not _REUSE or (kind is bytes and _HASH_OFFSET is None):
            return None
        with self.lock:
            kept = self.kept
            for i in range(len(kept)):     # (enumerate's tuple would hold a reference)
                obj = kept[i]
                # Referenced from the list, here and by getrefcount's argument only:
                # nobody else can see it change.
                if type(obj) is kind and len(obj) == n and sys.getrefcount(obj) == 3:
                    del kept[i]
                    return obj
            return None

    def put(self, obj: Any) -> None:
        with self.lock:
            if self.pid != os.getpid():      # a forked child: the timer stayed behind
                self.pid, self.timer = os.getpid(), None
            kept = self.kept
            kept.append(obj)
            while len(kept) > SPARE_COUNT or sum(map(len, kept)) > SPARE_MAX:
                del kept[0]
            self.used = time.monotonic()
            if self.timer is None:
                self._arm(SPARE_SECONDS)

    def _arm(self, delay: float) -> None:
        self.timer = threading.Timer(delay, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        with self.lock:
            self.timer = None
            if not self.kept:
                return
            idle = time.monotonic() - self.used
            if idle >= SPARE_SECONDS:
                self.kept = []               # freed now unless the program holds them
            else:
                self._arm(SPARE_SECONDS - idle)


_spare = _Spare()
