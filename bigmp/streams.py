"""Streaming over one connection: generators back to the caller, iterators and files to the callee.

Frames after a request or a ``#STREAM`` reply are ``('#ITEM', x)`` ... then ``('#END', None)``,
or ``('#ERROR', exc)`` (a reply) / ``('#ABORT', exc)`` (an argument whose iterator raised). TCP's own flow control is the backpressure: a producer blocks in
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


_STREAMABLE = (stream, io.IOBase, types.GeneratorType)


def split_stream_args(args: tuple, kwargs: dict) -> Tuple[tuple, dict, List[Iterator[Any]]]:
    """Replace streamable arguments by placeholders; return the sources in argument order."""
    for a in args:
        if isinstance(a, _STREAMABLE):
            break
    else:
        for v in kwargs.values():
            if isinstance(v, _STREAMABLE):
                break
        else:
            return args, kwargs, []   # the common case: nothing to stream, nothing copied
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
    """Send every source's items, each stream ended by ``#END`` (``#ABORT`` if it raised)."""
    from .errors import pack_exception
    for src in sources:
        while True:
            try:
                item = next(src)
            except StopIteration:
                frame = ("#END", None)
            except Exception as exc:   # the caller's own iterator failed
                frame = ("#ABORT", pack_exception(exc, "the caller"))
            else:
                frame = ("#ITEM", item)
            try:
                conn.send(frame)
            except (EOFError, OSError):
                return   # the call is over (timed out, machine lost): nothing more to say
            if frame[0] != "#ITEM":
                break


class _Demux:
    """The streamed arguments of one call, read from one connection in the order sent.

    The caller sends each stream whole, one after another. A method may read them in any
    order: reading stream k first buffers what is left of the streams before it.
    """

    def __init__(self, conn, count: int):
        self.conn = conn
        self.current = 0
        self.buffers: List[list] = [[] for _ in range(count)]
        self.done = [False] * count
        self.errors: List[Optional[BaseException]] = [None] * count   # from #ABORT

    def _frame(self):
        kind, value = self.conn.recv()
        if kind not in ("#ITEM", "#END", "#ABORT"):
            raise ValueError(f"protocol error: expected a stream item, got {kind!r}")
        if kind != "#ITEM":
            self.done[self.current] = True
            self.current += 1
        return kind, value

    def next(self, k: int) -> Any:
        while True:
            if self.buffers[k]:
                return self.buffers[k].pop(0)
            if self.done[k]:
                error, self.errors[k] = self.errors[k], None
                if error is not None:
                    raise error   # the caller's iterator failed after what was buffered
                raise StopIteration
            i = self.current
            kind, value = self._frame()
            if i != k:
                # An earlier stream is still on the wire: keep its items (and its end) for
                # later.
                if kind == "#ITEM":
                    self.buffers[i].append(value)
                elif kind == "#ABORT":
                    self.errors[i] = value
                continue
            if kind == "#ITEM":
                return value
            if kind == "#ABORT":
                raise value   # the caller's iterator failed: the method sees its error
            raise StopIteration

    def drain(self) -> None:
        """Read and drop every frame still on the wire (before the reply can be sent)."""
        for buf in self.buffers:
            buf.clear()
        while self.current < len(self.done):
            self._frame()


class _Receiver:
    """Server side of one streamed argument: yields its items until its ``#END``."""

    def __init__(self, demux: _Demux, index: int):
        self.demux = demux
        self.index = index

    def __iter__(self):
        return self

    def __next__(self):
        return self.demux.next(self.index)


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



def count_stream_args(args: tuple, kwds: dict) -> int:
    n = 0
    for v in args:
        if type(v) is StreamArg:
            n += 1
    for v in kwds.values():
        if type(v) is StreamArg:
            n += 1
    return n


def bind_stream_args(conn, args: tuple, kwds: dict) -> Tuple[tuple, dict, Optional[_Demux]]:
    """Server side: replace placeholders by receivers, in the order the sources were sent."""
    count = count_stream_args(args, kwds)
    if not count:
        return args, kwds, None
    demux = _Demux(conn, count)
    index = iter(range(count))

    def bind(value):
        if not isinstance(value, StreamArg):
            return value
        rx = _Receiver(demux, next(index))
        if value.is_file:
            return io.BufferedReader(RemoteReader(rx))
        return rx

    # Positional first, then keyword, matching split_stream_args' order.
    new_args = tuple(bind(a) for a in args)
    new_kwds = {k: bind(v) for k, v in kwds.items()}
    return new_args, new_kwds, demux
