"""Streaming over one connection: generators back to the caller, iterators and files to the callee.

Frames after a request or a ``#STREAM`` reply are ``('#ITEM', x)`` ... then ``('#END', None)``
or ``('#ERROR', exc)``. TCP's own flow control is the backpressure: a producer blocks in
``send`` once the consumer stops reading.
"""
from __future__ import annotations

import io
import types
from typing import Any, Iterable, Iterator, List, Optional, Tuple

__all__ = ["stream", "StreamArg", "split_stream_args", "RemoteReader", "CHUNK"]

CHUNK = 1 << 20


class stream:
    """Mark ``iterable`` to be streamed item by item to the machine instead of pickled whole."""

    __slots__ = ("iterable",)

    def __init__(self, iterable: Iterable[Any]):
        self.iterable = iterable


class StreamArg:
    """Placeholder sent in place of a streamed argument; ``is_file`` picks the receiving shape."""

    __slots__ = ("is_file",)

    def __init__(self, is_file: bool):
        self.is_file = is_file

    def __reduce__(self):
        return (StreamArg, (self.is_file,))


def _source(value: Any) -> Optional[Tuple[Iterator[Any], bool]]:
    if isinstance(value, stream):
        return iter(value.iterable), False
    if isinstance(value, io.IOBase) and hasattr(value, "read"):
        return iter(lambda: value.read(CHUNK), value.read(0)), True
    if isinstance(value, types.GeneratorType):
        return value, False
    return None


def split_stream_args(args: tuple, kwargs: dict) -> Tuple[tuple, dict, List[Iterator[Any]]]:
    """Replace streamable arguments by placeholders; return the sources in argument order."""
    sources: List[Iterator[Any]] = []

    def swap(value):
        found = _source(value)
        if found is None:
            return value
        sources.append(found[0])
        return StreamArg(found[1])

    new_args = tuple(swap(a) for a in args)
    new_kwargs = {k: swap(v) for k, v in kwargs.items()}
    return new_args, new_kwargs, sources


def send_sources(conn, sources: List[Iterator[Any]]) -> None:
    """Send every source's items, each stream ended by ``#END``."""
    for src in sources:
        for item in src:
            conn.send(("#ITEM", item))
        conn.send(("#END", None))


class _Receiver:
    """Server side of one streamed argument: yields items until ``#END``."""

    def __init__(self, conn):
        self.conn = conn
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        kind, value = self.conn.recv()
        if kind == "#END":
            self.done = True
            raise StopIteration
        if kind != "#ITEM":
            self.done = True
            raise ValueError(f"protocol error: expected a stream item, got {kind!r}")
        return value

    def drain(self) -> None:
        for _ in self:
            pass


class RemoteReader(io.RawIOBase):
    """A read-only file on the machine whose bytes come from the caller's file."""

    def __init__(self, receiver: _Receiver):
        self._rx = receiver
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                chunk = next(self._rx)
            except StopIteration:
                return 0
            self._buf = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        self._rx.drain()


def bind_stream_args(conn, args: tuple, kwds: dict) -> Tuple[tuple, dict, list]:
    """Server side: replace placeholders by receivers, in the order the sources were sent."""
    receivers: list = []

    def bind(value):
        if not isinstance(value, StreamArg):
            return value
        rx = _Receiver(conn)
        receivers.append(rx)
        if value.is_file:
            return io.BufferedReader(RemoteReader(rx))
        return rx

    # Positional first, then keyword, matching split_stream_args' order.
    new_args = tuple(bind(a) for a in args)
    new_kwds = {k: bind(v) for k, v in kwds.items()}
    return new_args, new_kwds, receivers
