"""The relay the testing system puts between the driver and each machine.

A private unix socket in the driver whose connections are forwarded byte for byte to the
machine by one selector thread (:class:`_Hub`) per testing system, so that faults can cut,
delay or hold the traffic. It mirrors its machine: once the machine has exited or refuses
connections, the relay's socket is removed too, so the driver sees a lost machine exactly as
it would without the relay.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from ..connection import bind_unix, unix_address

log = logging.getLogger("bigmp.testing")

_CHUNK = 256 * 1024          # bytes read from a socket at once
_HIGH_WATER = 4 * 1024 * 1024  # bytes a relay holds per direction before it stops reading
_FAULT_TIMEOUT = 10.0        # how long a fault call waits for its effect


# -- the relay ------------------------------------------------------------------------------

class _Direction:
    """One direction of a relayed connection: bytes read from ``src``, written to ``dst``."""

    __slots__ = ("pair", "src", "dst", "pending", "out", "size", "src_eof", "out_eof")

    def __init__(self, pair: "_Pair", src: str, dst: str):
        self.pair = pair
        self.src, self.dst = src, dst              # "client" or "upstream"
        self.pending: Deque[list] = collections.deque()   # [release time, bytes or None=EOF]
        self.out: Deque[memoryview] = collections.deque()  # released, not yet written
        self.size = 0                               # bytes in pending + out
        self.src_eof = False                        # the source has closed (EOF read)
        self.out_eof = False                        # that EOF is due for delivery

    def push(self, data: Optional[bytes], now: float) -> None:
        relay = self.pair.relay
        if data is None:
            self.src_eof = True
        else:
            self.size += len(data)
        if relay.delay <= 0 and not relay.partitioned and not self.pending:
            self._deliver(data)
        else:
            self.pending.append([now + relay.delay, data])
            relay.hub.delayed.add(self)

    def _deliver(self, data: Optional[bytes]) -> None:
        if data is None:
            self.out_eof = True
        else:
            self.out.append(memoryview(data))

    def release(self, now: float) -> Optional[float]:
        """Move what is due to ``out``; return when the next pending chunk is due (or None)."""
        if self.pair.relay.partitioned:
            return None
        while self.pending and self.pending[0][0] <= now:
            self._deliver(self.pending.popleft()[1])
        return self.pending[0][0] if self.pending else None

    def flush(self) -> bool:
        """Write what is released; False once the connection is finished (EOF or error)."""
        if self.pair.relay.partitioned:
            return True
        sock = self.pair.sock(self.dst)
        if sock is None:
            return True
        while self.out:
            head = self.out[0]
            try:
                n = sock.send(head)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.size -= n
            if n < len(head):
                self.out[0] = head[n:]
                return True
            self.out.popleft()
        return not self.out_eof


class _Pair:
    """A relayed connection: the driver's socket (client) and the machine's (upstream)."""

    def __init__(self, relay: "_Relay", client: socket.socket, upstream: Optional[socket.socket]):
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.up = _Direction(self, "client", "upstream")
        self.down = _Direction(self, "upstream", "client")
        self.closed = False
        self._masks: Dict[str, int] = {}

    def sock(self, side: str) -> Optional[socket.socket]:
        return self.client if side == "client" else self.upstream

    def on_event(self, side: str, mask: int) -> None:
        if self.closed:
            return
        if mask & selectors.EVENT_READ:
            if side == "client":
                d, src, dst = self.up, self.client, self.upstream
            else:
                d, src, dst = self.down, self.upstream, self.client
            try:
                data: Optional[bytes] = src.recv(_CHUNK) or None   # None: EOF
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # reset by the peer: an end of stream like any other
                data = None
            relay = self.relay
            if data is not None and dst is not None and not d.out and not d.pending \
                    and relay.delay <= 0 and not relay.partitioned:
                # The common case, kept short: nothing queued, so write it through now.
                try:
                    n = dst.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self.close()
                    return
                if n == len(data):
                    return
                data = data[n:]
            d.push(data, time.monotonic())
        self.pump()

    def pump(self) -> None:
        """Write what can be written and register interest in what must wait."""
        if self.closed:
            return
        for d in (self.up, self.down):
            if not d.flush():
                self.close()
                return
        self._interest("client")
        self._interest("upstream")

    def _interest(self, side: str) -> None:
        sock = self.sock(side)
        if sock is None:
            return
        reading = self.up if side == "client" else self.down
        writing = self.down if side == "client" else self.up
        mask = 0
        if not reading.src_eof and reading.size < _HIGH_WATER:
            mask |= selectors.EVENT_READ
        if writing.out and not self.relay.partitioned:
            mask |= selectors.EVENT_WRITE
        old = self._masks.get(side, 0)
        if mask == old:
            return
        sel = self.relay.hub.sel
        if old == 0:
            sel.register(sock, mask, (self, side))
        elif mask == 0:
            sel.unregister(sock)
        else:
            sel.modify(sock, mask, (self, side))
        self._masks[side] = mask

    def connect_upstream(self) -> bool:
        """Connect to the machine; False (and the pair closed) if it refuses."""
        sock = self.relay.connect_upstream()
        if sock is None:
            self.close()
            return False
        self.upstream = sock
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        hub = self.relay.hub
        for side in ("client", "upstream"):
            sock = self.sock(side)
            if sock is None:
                continue
            if self._masks.get(side):
                try:
                    hub.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
            sock.close()
        hub.delayed.discard(self.up)
        hub.delayed.discard(self.down)
        self.relay.pairs.discard(self)


class _Relay:
    """The address the driver dials for one machine; forwards to the machine's own address."""

    def __init__(self, hub: "_Hub", name: str, target: Any):
        self.hub = hub
        self.name = name
        self.target = target
        self.delay = 0.0
        self.partitioned = False
        self.pairs: set = set()
        self.path = unix_address()     # a fresh 0700 directory
        self._dir = os.path.dirname(self.path)
        sock = bind_unix(self.path)    # 0600, like a machine's
        sock.listen(1024)
        sock.setblocking(False)
        self.listener: Optional[socket.socket] = sock
        hub.sel.register(sock, selectors.EVENT_READ, (self, "listener"))

    def on_event(self, side: str, mask: int) -> None:
        while self.listener is not None:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("relay %s: accept failed: %r", self.name, exc)
                return
            client.setblocking(False)
            pair = _Pair(self, client, None)
            self.pairs.add(pair)
            # In a partition a new connection is held, unanswered, until heal().
            if not self.partitioned and not pair.connect_upstream():
                continue   # refused: the pair is closed (and so is the relay, if it is gone)
            pair.pump()

    def connect_upstream(self) -> Optional[socket.socket]:
        target = self.target
        deadline = time.monotonic() + 2.0
        if isinstance(target, str):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            while True:
                try:
                    sock.connect(target)
                    break
                except (BlockingIOError, InterruptedError):
                    # A full accept queue: rare, and brief; wait a little in place.
                    if time.monotonic() > deadline:
                        sock.close()
                        return None
                    time.sleep(0.001)
                except OSError as exc:
                    sock.close()
                    self._refused(exc)
                    return None
        else:
            try:
                sock = socket.create_connection(tuple(target), timeout=2.0)
            except OSError as exc:
                self._refused(exc)
                return None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        return sock

    def _refused(self, exc: OSError) -> None:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            # The machine is gone: so is its relay, and the driver's probe gets the same
            # answer it would get from the machine's own address.
            self.shut()

    def shut(self) -> None:
        """Stop accepting and remove the socket file (existing connections carry on)."""
        sock, self.listener = self.listener, None
        if sock is not None:
            try:
                self.hub.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        for path, rm in ((self.path, os.unlink), (self._dir, os.rmdir)):
            try:
                rm(path)
            except OSError:
                pass

    def reopen(self, target: Any) -> None:
        """Listen again at the same path, now forwarding to ``target`` (a replacement)."""
        self.shut()
        self.target = target
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        os.chmod(self._dir, 0o700)
        sock = bind_unix(self.path)
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.hub.sel.register(sock, selectors.EVENT_READ, (self, "listener"))

    def close(self) -> None:
        self.shut()
        for pair in list(self.pairs):
            pair.close()

    def drop(self) -> int:
        pairs = list(self.pairs)
        for pair in pairs:
            pair.close()
        return len(pairs)

    def set_delay(self, seconds: float) -> None:
        self.delay = max(0.0, float(seconds))
        self._repump()

    def set_partitioned(self, on: bool) -> None:
        self.partitioned = on
        if not on:
            for pair in list(self.pairs):
                if pair.upstream is None and not pair.closed:
                    pair.connect_upstream()
        self._repump()

    def _repump(self) -> None:
        now = time.monotonic()
        for pair in list(self.pairs):
            for d in (pair.up, pair.down):
                d.release(now)
            pair.pump()


class _Hub:
    """One selector thread that runs every relay of a testing system."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.delayed: set = set()   # directions with pending (delayed or held) chunks
        self.relays: List[_Relay] = []
        self._tasks: Deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bigmp-testing-relay", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        """Run ``fn`` in the relay thread (return its result if ``wait``)."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list = []

        def task() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            finally:
                done.set()
        with self._lock:
            if self._closed:
                raise RuntimeError("the testing system has shut down")
            self._tasks.append(task)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass   # already woken (the buffer is full of wake bytes)
        if not wait:
            return None
        if not done.wait(_FAULT_TIMEOUT):
            raise TimeoutError("the testing system's relay thread did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        while True:
            timeout = None
            now = time.monotonic() if self.delayed else 0.0
            for d in list(self.delayed):
                if d.pair.closed:
                    self.delayed.discard(d)
                    continue
                due = d.release(now)
                if d.out or d.out_eof:
                    d.pair.pump()
                if due is None:
                    if not d.pending:
                        self.delayed.discard(d)
                    continue
                wait = max(0.0, due - now)
                timeout = wait if timeout is None else min(timeout, wait)
            woken = False
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    woken = True
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                    continue
                obj, side = key.data
                try:
                    obj.on_event(side, mask)
                except Exception:   # a relay bug must not stop the others
                    log.exception("testing relay %s failed", getattr(obj, "name", obj))
                    if isinstance(obj, _Pair):
                        obj.close()
            while woken:   # every task comes with a wake byte
                with self._lock:
                    task = self._tasks.popleft() if self._tasks else None
                    if task is None and self._closed:
                        self._teardown()
                        return
                if task is None:
                    break
                task()

    def _teardown(self) -> None:
        for relay in self.relays:
            relay.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(_FAULT_TIMEOUT)


# -- the system -----------------------------------------------------------------------------
