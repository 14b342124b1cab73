"""Machines' stdout and stderr on the driver's stderr, line by line, prefixed by machine name.

Machines send their fds 1 and 2 (so subprocesses and C code are captured too) down one
pipe or channel per machine. One forwarder thread on the driver reads every machine's
stream with a selector, so 100 machines cost one thread. A stream's EOF means the machine
has flushed everything it will ever print; each stream's ``drained`` event says so.
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import sys
import threading
from typing import Callable, Deque, Optional, TextIO

from .perprocess import PerProcess

log = logging.getLogger("bigmp.output")

__all__ = ["Forwarder", "forwarder"]


class _Stream:
    def __init__(self, fd: int, prefix: str, on_eof: Optional[Callable[[], None]]):
        self.fd = fd
        self.prefix = prefix
        self.partial = b""
        self.tail: Deque[str] = collections.deque(maxlen=30)
        self.drained = threading.Event()
        self.on_eof = on_eof


class Forwarder:
    """Reads registered fds and writes their lines, prefixed, to ``sink`` (default: sys.stderr)."""

    def __init__(self, sink: Optional[Callable[[], TextIO]] = None):
        self._sink = sink or (lambda: sys.stderr)
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list = []
        self._thread: Optional[threading.Thread] = None

    def add(self, fd: int, prefix: str, on_eof: Optional[Callable[[], None]] = None) -> "_Stream":
        """Forward ``fd`` (which the forwarder now owns and closes at EOF)."""
        s = _Stream(fd, prefix, on_eof)
        with self._lock:
            self._pending.append(s)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bigmp-output",
                                                daemon=True)
                self._thread.start()
        self._wake()
        return s

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                pending, self._pending = self._pending, []
            for s in pending:
                self._sel.register(s.fd, selectors.EVENT_READ, s)
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                self._read(key.data)

    def _read(self, s: _Stream) -> None:
        try:
            data = os.read(s.fd, 65536)
        except OSError:
            data = b""
        if data:
            s.partial += data
            if b"\n" in s.partial:
                *lines, s.partial = s.partial.split(b"\n")
                self._emit(s, lines)
            return
        if s.partial:
            self._emit(s, [s.partial])
            s.partial = b""
        self._sel.unregister(s.fd)
        os.close(s.fd)
        s.drained.set()
        if s.on_eof is not None:
            try:
                s.on_eof()
            except Exception:
                log.exception("output EOF callback failed")

    def _emit(self, s: _Stream, lines) -> None:
        texts = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
        s.tail.extend(texts)
        out = "".join(f"{s.prefix}: {t}\n" for t in texts)
        try:
            sink = self._sink()
            sink.write(out)
            sink.flush()
        except Exception:
            pass


_forwarder: "PerProcess[Forwarder]" = PerProcess(Forwarder)


def forwarder() -> Forwarder:
    """The process-wide forwarder (one thread for all sessions)."""
    return _forwarder.get()
