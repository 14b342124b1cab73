"""Many calls in flight on one connection: what ``call_async`` rides on.

A plain connection carries one call at a time, so N concurrent calls need N connections
and N threads on each side. A *mux* connection tags each request with an id and carries
any number at once: the caller's thread only pickles and writes its request and gets a
Future back; one reader thread on the driver completes the Futures as replies arrive, in
any order. On the machine one thread reads requests (many per ``read``, thanks to the
read-ahead buffer) and hands them to a pool of worker threads that grows while all of its
workers are busy, so calls still run concurrently and a slow call never holds up the rest.

Streaming does not fit this shape: a streamed argument makes ``call_async`` use a plain
connection, and a method that returns a generator is an error here (use ``call``).
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import types
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import FINISHED as _FINISHED, RUNNING as _RUNNING
from multiprocessing import managers as _mpm
from typing import Any, Dict, Optional

from .errors import pack_exception
from .wire import PLAIN as _PLAIN
from .perprocess import PerProcess

log = logging.getLogger("bigmp.mux")

__all__ = ["MuxChannel", "serve"]

_MAX_WORKERS = 256
try:
    from .stats import _now      # the clock the statistics use
except ImportError:              # pragma: no cover
    from time import perf_counter as _now


# -- the machine's side ---------------------------------------------------------------------

class _Sizes:
    """Byte counts of one call, in the shape stats.served reads from a connection."""

    __slots__ = ("nrecv", "nsent", "last_recv")

    def __init__(self, received: int, sent: int):
        self.nrecv, self.nsent, self.last_recv = received, sent, received


class _Workers:
    """Threads that run requests; one more is started whenever none is idle."""

    def __init__(self, server, conn):
        self.server, self.conn = server, conn
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self.send_lock = threading.Lock()    # encoding and the reply queue
        self.flush_lock = threading.Lock()   # one writer at a time on the socket
        self.out: list = []
        self.out_size = 0
        self.idle = 0
        self.count = 0
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, request) -> None:
        with self.lock:
            spawn = self.idle == 0 and self.count < _MAX_WORKERS
            if spawn:
                self.count += 1
            else:
                self.idle -= 1
        self.jobs.put(request)
        if spawn:
            threading.Thread(target=self._work, daemon=True,
                             name=f"bigmp-mux-{self.count}").start()

    def _work(self) -> None:
        server, conn = self.server, self.conn
        server._local.after = []
        server._local.state = None
        jobs = self.jobs
        while True:
            request = jobs.get()
            if request is None:
                return
            self._run(server, conn, request)
            if jobs.empty():
                # Replies wait while more requests are queued, then go in one writev.
                self._flush()
            with self.lock:
                self.idle += 1

    def _flush(self) -> bool:
        with self.flush_lock:
            with self.send_lock:
                parts, size = self.out, self.out_size
                self.out, self.out_size = [], 0
            if not parts:
                return True
            try:
                self.conn.send_encoded(parts, size)
                return True
            except (EOFError, OSError):
                return False

    def _run(self, server, conn, job) -> None:
        request, request_bytes = job
        call_id = request[0]
        t0 = _now()
        msg, gen, _ = server._dispatch(conn, request[1:], False)
        if type(msg[1]) is types.GeneratorType:
            msg[1].close()
            msg = ("#ERROR", pack_exception(TypeError(
                f"{request[1]}.{request[2]} returned a generator: streamed results need "
                "call(), not call_async()"), server.name))
        reply = (call_id,) + tuple(msg)
        encode = conn.encode_plain if type(msg[1]) in _PLAIN else conn.encode
        try:
            with self.send_lock:
                parts, sent = encode(reply)
                self.out.extend(parts)
                self.out_size += sent
        except Exception as exc:   # the result could not be pickled
            msg = ("#ERROR", pack_exception(exc, server.name))
            try:
                with self.send_lock:
                    parts, sent = conn.encode((call_id,) + msg)
                    self.out.extend(parts)
                    self.out_size += sent
            except Exception:
                return
        stats = server.stats
        if stats is not None:
            stats.served(server, _Sizes(request_bytes, sent), request[1:], msg, (t0, 0, 0))
        after = server._local.after
        if after:
            self._flush()   # what runs after the reply (a shutdown) needs it sent first
            fns = after[:]
            after.clear()
            for fn in fns:
                fn()

    def close(self) -> None:
        for _ in range(self.count):
            self.jobs.put(None)


def serve(server, conn) -> None:
    """Serve a mux connection until it closes (runs in the connection's thread)."""
    workers = _Workers(server, conn)
    stopping = server.stop_event.is_set
    try:
        while not stopping():
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            workers.submit((request, conn.last_recv))
    finally:
        workers.close()


# -- the driver's side ------------------------------------------------------------------------

class _Reader:
    """One thread reads the replies of every mux channel of the process (a selector):
    fewer threads to wake, less contention for the GIL than a reader per machine."""

    def __init__(self):
        import selectors
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.adds: list = []
        threading.Thread(target=self._run, daemon=True, name="bigmp-mux-reader").start()

    def add(self, channel: "MuxChannel") -> None:
        with self.lock:
            self.adds.append(channel)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        import selectors
        while True:
            with self.lock:
                adds, self.adds = self.adds, []
            for ch in adds:
                self.sel.register(ch.conn.fileno(), selectors.EVENT_READ, ch)
            for key, _ in self.sel.select():
                ch = key.data
                if ch is None:
                    os.read(self.wake_r, 4096)
                    continue
                try:
                    ch.conn.read_some()
                    while ch.conn.frame_ready():
                        ch.deliver(ch.conn.recv())
                except BaseException as exc:
                    try:
                        self.sel.unregister(key.fd)
                    except (KeyError, ValueError):
                        pass
                    ch.fail_later(exc)


class _Writer:
    """One thread writes the queued requests of every mux channel of the process."""

    def __init__(self):
        import collections
        self.cond = threading.Condition()
        self.ready: "collections.deque" = collections.deque()
        threading.Thread(target=self._run, daemon=True, name="bigmp-mux-writer").start()

    def schedule(self, channel: "MuxChannel") -> None:
        with self.cond:
            self.ready.append(channel)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.ready:
                    self.cond.wait()
                channel = self.ready.popleft()
            channel.flush()


_reader: "PerProcess[_Reader]" = PerProcess(_Reader)
_writer: "PerProcess[_Writer]" = PerProcess(_Writer)
_the_reader, _the_writer = _reader.get, _writer.get


class CallFuture(Future):
    """The Future of one mux call. It is born RUNNING: its request is on its way, so,
    like an executor's running task, it can no longer be cancelled. Only the reader
    thread completes it, once; set_result skips the notify and callback loops when
    nobody waits (most calls: ~0.7 us of the ~10 us a call costs the driver)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._state = _RUNNING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []

    def set_result(self, result: Any) -> None:
        cond = self._condition
        with cond:
            if self._state != _RUNNING:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = _FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
            if cond._waiters:
                cond.notify_all()
        if self._done_callbacks:
            self._invoke_callbacks()


class MuxChannel:
    """One mux connection to a machine: send requests, complete Futures as replies come."""

    def __init__(self, machine, conn):
        self.machine = machine
        self.conn = conn
        self.pending: Dict[int, list] = {}   # id -> [future, method, t0, request bytes]
        self.ids = itertools.count()
        self.send_lock = threading.Lock()
        self.dead: Optional[BaseException] = None
        self.out: list = []          # encoded frames waiting for the writer thread
        self.out_size = 0
        self.scheduled = False
        _the_reader().add(self)

    def flush(self) -> None:
        """Write what is queued (in the writer thread)."""
        with self.send_lock:
            parts, size = self.out, self.out_size
            self.out, self.out_size, self.scheduled = [], 0, False
        if not parts:
            return
        try:
            self.conn.send_encoded(parts, size)
        except BaseException as exc:
            self.fail_later(exc)

    def submit(self, method: str, service: str, name: str, args: tuple, kwargs: dict,
               plain: bool = False) -> "Future[Any]":
        """Send one call (``method`` is ``service.name``); ``plain``: its arguments are
        only wire.PLAIN scalars."""
        fut = CallFuture()
        call_id = next(self.ids)
        entry = [fut, method, _now(), 0]
        self.pending[call_id] = entry
        conn = self.conn
        try:
            with self.send_lock:
                if self.dead is not None:
                    raise self.dead
                parts, entry[3] = (conn.encode_plain if plain else conn.encode)(
                    (call_id, service, name, args, kwargs))
                self.out.extend(parts)
                self.out_size += entry[3]
                schedule = not self.scheduled
                self.scheduled = True
            if schedule:
                # The writes happen in the writer thread, many frames per writev: the
                # caller pays for pickling, not for a system call and a GIL hand-off.
                _the_writer().schedule(self)
        except BaseException as exc:
            self.pending.pop(call_id, None)
            if isinstance(exc, (EOFError, OSError)) and not isinstance(exc, TimeoutError):
                exc = self.machine._lost(exc, method)
            fut.set_exception(exc)
        return fut

    def deliver(self, reply) -> None:
        """Complete the Future of one reply (in the reader thread)."""
        call_id, kind, result = reply
        entry = self.pending.pop(call_id, None)
        if entry is None:
            return
        stats = self.machine._b.stats
        if stats is not None:
            stats.record(self.machine.name, entry[1], _now() - entry[2],
                         kind != "#RETURN", entry[3], self.conn.last_recv)
        if kind == "#RETURN":
            entry[0].set_result(result)
        else:
            entry[0].set_exception(_mpm.convert_to_error(kind, result))

    def fail_later(self, exc: BaseException) -> None:
        """Fail this channel in a thread of its own: deciding whether the machine is lost
        may take a probe, and the reader and writer threads serve every machine."""
        threading.Thread(target=self._fail, args=(exc,), daemon=True,
                         name=f"bigmp-mux-fail-{self.machine.name}").start()

    def _fail(self, exc: BaseException) -> None:
        with self.send_lock:
            if self.dead is None:
                self.dead = exc if not isinstance(exc, (EOFError, OSError)) else \
                    ConnectionError(f"the call channel to {self.machine.name} closed: {exc!r}")
        err = self.machine._lost(exc, "an async call") if isinstance(exc, (EOFError, OSError)) \
            else exc
        while self.pending:
            try:
                _, entry = self.pending.popitem()
            except KeyError:
                break
            if not entry[0].done():
                entry[0].set_exception(err)
        try:
            self.conn.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake the reader (it fails what is pending); used when the machine stops."""
        self.conn.shutdown()
