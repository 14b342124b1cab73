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
from concurrent.futures import Future
from multiprocessing import managers as _mpm
from typing import Any, Dict, Optional

from .errors import pack_exception
from .futures import CallFuture
from .wire import PLAIN as _PLAIN, is_plain as _is_plain
from .perprocess import PerProcess

log = logging.getLogger("bigmp.mux")

__all__ = ["MuxChannel", "serve"]

_MAX_WORKERS = 256
_BATCH = 1024      # plain calls (or replies) pickled together in one frame, at most
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


def _pack_plain(conn, msgs: list) -> tuple:
    """Frames for plain messages, up to _BATCH pickled together a frame: (parts, bytes,
    per message its share of its frame's bytes, or the exception that kept it from being
    sent). A batch that cannot go as one (longer than max_frame) goes message by message,
    so only a message too large on its own fails."""
    parts: list = []
    total = 0
    shares: list = []
    for i in range(0, len(msgs), _BATCH):
        chunk = msgs[i:i + _BATCH]
        try:
            frame, sent = conn.encode_plain(chunk)
        except Exception:
            for msg in chunk:
                try:
                    frame, sent = conn.encode_plain(msg)
                except Exception as exc:
                    shares.append(exc)
                    continue
                parts += frame
                total += sent
                shares.append(sent)
            continue
        parts += frame
        total += sent
        shares += _shares(sent, len(chunk))
    return parts, total, shares


def _shares(total: int, n: int) -> list:
    """``total`` bytes of one batch frame split over its ``n`` calls, the same way on both
    ends (so the driver's and the machine's statistics agree)."""
    if n <= 0:
        return []          # an empty batch (only a broken peer sends one)
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]


class _Workers:
    """Threads that run requests; one more is started whenever none is idle."""

    def __init__(self, server, conn):
        self.server, self.conn = server, conn
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self.send_lock = threading.Lock()    # encoding and the reply queue
        self.flush_lock = threading.Lock()   # one writer at a time on the socket
        self.out: list = []                  # encoded reply frames
        self.out_size = 0
        self.batch: list = []                # plain replies, pickled together at flush
        self.idle = 0
        self.count = 0
        self.lock = threading.Lock()
        self.closed = False

    def submit(self, jobs: list) -> None:
        spawn = 0
        with self.lock:
            for _ in jobs:
                if self.idle == 0 and self.count < _MAX_WORKERS:
                    self.count += 1
                    spawn += 1
                else:
                    self.idle -= 1
        put = self.jobs.put
        for job in jobs:
            put(job)
        for _ in range(spawn):
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
                batch = self.batch
                self.out, self.out_size, self.batch = [], 0, []
            if batch:
                more, n = self._encode_batch(batch)
                parts, size = parts + more, size + n
            if not parts:
                return True
            try:
                self.conn.send_encoded(parts, size)
                return True
            except (EOFError, OSError):
                return False

    def _encode_batch(self, batch: list) -> tuple:
        """Frames for the plain replies queued, and their statistics (see _pack_plain)."""
        conn, server, stats = self.conn, self.server, self.server.stats
        parts, total, shares = _pack_plain(conn, [b[0] for b in batch])
        now = _now()
        for (reply, request, msg, dt, req), share in zip(batch, shares):
            if not isinstance(share, int):   # too large for max_frame: say so instead
                msg = ("#ERROR", pack_exception(share, server.name))
                with self.send_lock:         # the connection's pickler: workers share it
                    more, share = conn.encode((reply[0],) + msg)
                parts += more
                total += share
            if stats is not None:
                stats.served(server, _Sizes(req, share), request, msg, (now - dt, 0, 0))
        return parts, total

    def _run(self, server, conn, job) -> None:
        request, request_bytes = job
        if type(request) is not tuple or len(request) != 5:
            # No call id to answer: say so here, drop it, keep serving the others.
            log.warning("%s: dropped a malformed async request: %.200r", server.name, request)
            return
        call_id = request[0]
        t0 = _now()
        msg, gen, _ = server._dispatch(conn, request[1:], False)
        if type(msg[1]) is types.GeneratorType:
            msg[1].close()
            msg = ("#ERROR", pack_exception(TypeError(
                f"{request[1]}.{request[2]} returned a generator: streamed results need "
                "call(), not call_async()"), server.name))
        reply = (call_id,) + tuple(msg)
        if type(msg[1]) in _PLAIN or _is_plain(msg[1]):
            # Pickled with the other plain replies of this flush, in one frame.
            with self.send_lock:
                self.batch.append((reply, request[1:], msg, _now() - t0, request_bytes))
            sent = None
        else:
            try:
                with self.send_lock:
                    parts, sent = conn.encode(reply)
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
        if stats is not None and sent is not None:
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
    """Serve a mux connection until it closes (runs in the connection's thread). A frame
    holds one request, or a list of plain ones (see MuxChannel.flush)."""
    workers = _Workers(server, conn)
    stopping = server.stop_event.is_set
    try:
        while not stopping():
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if type(request) is list:
                workers.submit(list(zip(request, _shares(conn.last_recv, len(request)))))
            else:
                workers.submit([(request, conn.last_recv)])
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
                    conn = ch.conn
                    conn.read_some()
                    while conn.frame_ready():
                        reply = conn.recv()
                        if type(reply) is list:
                            ch.deliver_batch(reply, conn.last_recv)
                        else:
                            ch.deliver(reply, conn.last_recv)
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
        self.sleeping = False
        threading.Thread(target=self._run, daemon=True, name="bigmp-mux-writer").start()

    def schedule(self, channel: "MuxChannel") -> None:
        self.ready.append(channel)
        # Only a sleeping writer needs a wake-up: a busy one finds the channel in `ready`
        # (it sets `sleeping` and then looks at `ready` under the lock).
        if self.sleeping:
            with self.cond:
                self.cond.notify()

    def _run(self) -> None:
        ready = self.ready
        while True:
            with self.cond:
                while not ready:
                    self.sleeping = True
                    self.cond.wait()
                self.sleeping = False
            while ready:
                ready.popleft().flush()


_reader: "PerProcess[_Reader]" = PerProcess(_Reader)
_writer: "PerProcess[_Writer]" = PerProcess(_Writer)
_the_reader, _the_writer = _reader.get, _writer.get


class MuxChannel:
    """One mux connection to a machine: send requests, complete Futures as replies come."""

    def __init__(self, machine, conn):
        self.machine = machine
        self.conn = conn
        self.pending: Dict[int, CallFuture] = {}   # call id -> its Future
        self.ids = itertools.count()
        self.send_lock = threading.Lock()
        self.dead: Optional[BaseException] = None
        self.out: list = []          # encoded frames waiting for the writer thread
        self.out_size = 0
        self.batch: list = []        # plain requests, pickled together by the writer
        self.scheduled = False
        _the_reader().add(self)

    def flush(self) -> None:
        """Write what is queued (in the writer thread): encoded frames as they are, plain
        requests pickled together, up to _BATCH a frame (one dumps, one loads)."""
        with self.send_lock:
            parts, size, batch = self.out, self.out_size, self.batch
            self.out, self.out_size, self.batch, self.scheduled = [], 0, [], False
        try:
            if batch:
                more, n, shares = _pack_plain(self.conn, batch)
                parts, size = parts + more, size + n
                pending = self.pending
                for req, share in zip(batch, shares):
                    fut = pending.get(req[0])
                    if fut is None:
                        continue
                    if isinstance(share, int):
                        fut._request_bytes = share
                    else:                     # longer than max_frame on its own
                        pending.pop(req[0], None)
                        fut.set_exception(share)
            if parts:
                self.conn.send_encoded(parts, size)
        except BaseException as exc:
            self.fail_later(exc)

    def submit(self, method: str, service: str, name: str, args: tuple, kwargs: dict,
               plain: bool = False) -> "Future[Any]":
        """Send one call (``method`` is ``service.name``); ``plain``: its arguments are
        only plain values (wire.is_plain), so the writer pickles it with the others queued."""
        fut = CallFuture(method, _now())
        call_id = next(self.ids)
        self.pending[call_id] = fut
        try:
            with self.send_lock:
                if self.dead is not None:
                    raise self.dead
                if plain:
                    self.batch.append((call_id, service, name, args, kwargs))
                else:
                    parts, fut._request_bytes = self.conn.encode(
                        (call_id, service, name, args, kwargs))
                    self.out.extend(parts)
                    self.out_size += fut._request_bytes
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

    def deliver(self, reply, size: int) -> None:
        """Complete the Future of one reply (in the reader thread)."""
        self.deliver_batch((reply,), size)

    def deliver_batch(self, replies, size: int) -> None:
        """Complete the Futures of one frame's replies (in the reader thread); their
        statistics are summed per method first, then recorded once per method."""
        pending, stats = self.pending, self.machine._b.stats
        now = _now()
        sums: Dict[str, list] = {}
        for (call_id, kind, result), share in zip(replies, _shares(size, len(replies))):
            fut = pending.pop(call_id, None)
            if fut is None:
                continue
            if stats is not None:
                dt = now - fut._t0
                acc = sums.get(fut._method)
                if acc is None:
                    acc = sums[fut._method] = [0, 0, 0.0, 0.0, 0, 0]
                acc[0] += 1
                acc[2] += dt
                if dt > acc[3]:
                    acc[3] = dt
                acc[4] += fut._request_bytes
                acc[5] += share
            if kind == "#RETURN":
                fut.set_result(result)
            else:
                if stats is not None:
                    acc[1] += 1
                fut.set_exception(_mpm.convert_to_error(kind, result))
        if sums:
            stats.record_sums(self.machine.name, sums)

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
                _, fut = self.pending.popitem()
            except KeyError:
                break
            if not fut.done():
                fut.set_exception(err)
        try:
            self.conn.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake the reader (it fails what is pending); used when the machine stops."""
        self.conn.shutdown()
