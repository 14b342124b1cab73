"""The testing system: local machines with fault injection, for users' own unit tests.

Machines are real local processes started exactly as :class:`~bigmp.systems.local.LocalSystem`
starts them (fork server by default, or ``local_mode="spawn"``). What the testing system adds:

* **short keepalive timings** (lease 5 s, interval 0.2 s, timeout 2 s, shutdown 5 s) for
  options left at bigmp's global defaults, so a lost or hung machine is noticed in a test's
  time scale; explicit keywords and ``BIGMP_*`` variables still win;
* **fault injection** on one machine: :meth:`~TestingSystem.kill` (SIGKILL),
  :meth:`~TestingSystem.hang` / :meth:`~TestingSystem.resume` (SIGSTOP / SIGCONT),
  :meth:`~TestingSystem.drop` (break the driver's connections to it),
  :meth:`~TestingSystem.delay` (added latency) and :meth:`~TestingSystem.partition` /
  :meth:`~TestingSystem.heal` (traffic held both ways, as a network that loses every packet);
* bigmachine's testsystem helpers: :meth:`~TestingSystem.machines`, :meth:`~TestingSystem.N`,
  :meth:`~TestingSystem.exited` and :meth:`~TestingSystem.wait_for`.

Network faults need something between driver and machine. :meth:`driver_address` gives the
driver the address of a *relay* instead of the machine's own: a private unix socket in the
driver whose connections are forwarded byte for byte to the machine by one selector thread
(:class:`_Hub`) per testing system. The relay can then cut, delay or hold the traffic. It
mirrors its machine: once the machine has exited or refuses connections, the relay's socket
is removed too, so the driver sees a lost machine exactly as it would without the relay.

Only connections dialed to ``m.addr`` pass the relay (the driver's calls and keepalives, and
``b.dial(m.addr)`` from other machines). Proxies that a manager on the machine hands out
carry the machine's own address and bypass it.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import random
import selectors
import signal
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional

import psutil

from .. import config as _config
from ..connection import unix_address
from .base import Launch
from .local import LocalSystem

log = logging.getLogger("bigmp.testing")

__all__ = ["TestingSystem", "DEFAULTS"]

# Options the testing system shortens when they are left at bigmp's global defaults.
DEFAULTS: Dict[str, float] = {
    "keepalive_lease": 5.0,
    "keepalive_interval": 0.2,
    "keepalive_timeout": 2.0,
    "shutdown_timeout": 5.0,
}

_CHUNK = 256 * 1024          # bytes read from a socket at once
_HIGH_WATER = 4 * 1024 * 1024  # bytes a relay holds per direction before it stops reading
_FAULT_TIMEOUT = 10.0        # how long a fault call waits for its effect (a signal landing)


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
        sock = socket.socket(socket.AF_UNIX)
        old = os.umask(0o177)          # the socket file is 0600, like a machine's
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
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
        sock = socket.socket(socket.AF_UNIX)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
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

class TestingSystem(LocalSystem):
    """Local machines behind fault-injecting relays (``bigmp.start(system="testing")``)."""

    __test__ = False   # not a pytest test class, despite its name
    name = "testing"

    def __init__(self, options: Dict[str, Any]):
        # Short timings where the user left bigmp's defaults. ``options`` is the session's
        # own dict, so b.options shows what is in effect.
        for key, value in DEFAULTS.items():
            opt = _config.OPTIONS[key]
            if os.environ.get(opt.env) is None and options.get(key) == opt.default:
                options[key] = value
        super().__init__(options)
        self.session: Any = None
        self._hub: Optional[_Hub] = _Hub()
        self._hung: set = set()
        self._rng = random.Random(0)

    # -- System hooks ---------------------------------------------------------------------

    def attach(self, session: Any) -> None:
        self.session = session

    def driver_address(self, launch: Launch, addr: Any) -> Any:
        hub = self._hub
        if hub is None or (isinstance(addr, (tuple, list)) and addr and addr[0] == "tls"):
            return addr
        name = f"pid {launch.pid}"

        def make() -> _Relay:
            relay = _Relay(hub, name, addr)
            hub.relays.append(relay)
            return relay
        relay = hub.call(make)
        launch.relay = relay   # type: ignore[attr-defined]
        # The relay goes when its machine goes (not waited for: exits are reported from
        # the fork server's reader thread).
        launch.on_exit(lambda code: self._post(relay.shut))
        return relay.path

    def prepare_shutdown(self) -> None:
        """Undo faults so that the session's shutdown reaches every machine at once."""
        for pid in list(self._hung):
            self._signal(pid, signal.SIGCONT)
        self._hung.clear()
        hub = self._hub
        if hub is not None:
            def restore() -> None:
                for relay in hub.relays:
                    relay.delay = 0.0
                    relay.set_partitioned(False)
            try:
                hub.call(restore)
            except (RuntimeError, TimeoutError):
                pass

    def shutdown(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.close()
        super().shutdown()

    # -- bigmachine's testsystem helpers --------------------------------------------------

    def _session_machines(self) -> list:
        return self.session.machines() if self.session is not None else []

    def machines(self) -> list:
        """The machines of this session that are RUNNING now."""
        from ..machine import State
        return [m for m in self._session_machines() if m.state == State.RUNNING]

    def N(self) -> int:   # noqa: N802 - bigmachine's name
        """How many machines are RUNNING now."""
        return len(self.machines())

    def exited(self) -> int:
        """How many machine processes of this session have exited (for any reason)."""
        return sum(1 for m in self._session_machines()
                   if m.launch is not None and m.launch.exited)

    def wait_for(self, n: int, timeout: Optional[float] = None) -> list:
        """Wait until at least ``n`` machines are RUNNING; return the RUNNING machines.

        Raises TimeoutError after ``timeout`` seconds (default: the ``start_timeout`` option),
        and RuntimeError at once when too few machines are left that could still get there.
        """
        from ..machine import State
        timeout = self.options.get("start_timeout", 60.0) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            running = self.machines()
            if len(running) >= n:
                return running
            alive = [m for m in self._session_machines() if m.state < State.STOPPED]
            if len(alive) < n:
                stopped = [f"{m.name}: {m.err}" for m in self._session_machines()
                           if m.state == State.STOPPED]
                raise RuntimeError(f"{n} machines cannot be RUNNING: only {len(alive)} are "
                                   "starting or running; stopped: " + "; ".join(stopped))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(running)} of {n} machines RUNNING after {timeout:g} s")
            time.sleep(0.01)

    # -- faults ---------------------------------------------------------------------------

    def _launch(self, m: Any) -> Launch:
        """``m``'s launch, once ``m`` is RUNNING (a fault on a STARTING machine waits)."""
        from ..machine import State
        if getattr(m, "_b", None) is not self.session or self.session is None:
            raise ValueError(f"{m!r} is not a started machine of this testing session")
        if m.state < State.RUNNING:
            try:
                m.wait(State.RUNNING, timeout=self.options.get("start_timeout", 60.0))
            except TimeoutError:
                pass
        launch = getattr(m, "launch", None)
        if launch is None or m.state < State.RUNNING:
            raise ValueError(f"{m.name} never started ({m.state.name}: {m.err})")
        return launch

    def _relay(self, m: Any) -> _Relay:
        relay = getattr(self._launch(m), "relay", None)
        if relay is None:
            raise ValueError(f"{m.name} has no relay")
        return relay

    def _post(self, fn: Callable[[], Any]) -> None:
        hub = self._hub
        if hub is not None:
            try:
                hub.call(fn, wait=False)
            except RuntimeError:
                pass

    def _relay_call(self, m: Any, fn: Callable[[_Relay], Any]) -> Any:
        relay = self._relay(m)
        hub = self._hub
        if hub is None:
            raise RuntimeError("the testing system has shut down")
        return hub.call(lambda: fn(relay))

    @staticmethod
    def _signal(pid: Optional[int], sig: int) -> bool:
        if not pid:
            return False
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill(self, m: Any = None, wait: bool = True) -> Any:
        """SIGKILL machine ``m`` (a random RUNNING one if None); return it.

        With ``wait``, return once its exit has been reported (the driver then marks it
        STOPPED with :class:`bigmp.MachineLost` within moments: ``m.wait(State.STOPPED)``).
        """
        if m is None:
            running = self.machines()
            if not running:
                raise ValueError("no RUNNING machine to kill")
            m = self._rng.choice(running)
        launch = self._launch(m)
        gone = threading.Event()
        launch.on_exit(lambda code: gone.set())
        self._signal(launch.pid, signal.SIGKILL)
        self._hung.discard(launch.pid)
        if wait and not gone.wait(_FAULT_TIMEOUT):
            raise TimeoutError(f"{m.name} (pid {launch.pid}) did not exit after SIGKILL")
        return m

    def hang(self, m: Any) -> None:
        """Freeze machine ``m`` with SIGSTOP; return once it is stopped.

        It answers nothing, so calls with a timeout raise TimeoutError and the keepalive
        marks it STOPPED (and kills it) after ``keepalive_timeout``; :meth:`resume` first
        to let it carry on.
        """
        launch = self._launch(m)
        pid = launch.pid
        if not self._signal(pid, signal.SIGSTOP):
            raise ValueError(f"{m.name} has exited")
        self._hung.add(pid)
        launch.on_exit(lambda code: self._hung.discard(pid))   # its pid may be reused
        self._wait_status(pid, lambda s: s == psutil.STATUS_STOPPED, "stop")

    def resume(self, m: Any) -> None:
        """Let a hung machine run again (SIGCONT)."""
        pid = self._launch(m).pid
        self._hung.discard(pid)
        if self._signal(pid, signal.SIGCONT):
            self._wait_status(pid, lambda s: s != psutil.STATUS_STOPPED, "continue")

    @staticmethod
    def _wait_status(pid: int, ok: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + _FAULT_TIMEOUT
        while True:
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                return
            if ok(status) or status == psutil.STATUS_ZOMBIE:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} did not {what} (status {status})")
            time.sleep(0.002)

    def drop(self, m: Any) -> int:
        """Close every connection the driver has through ``m``'s relay now; return how many.

        Calls in flight on them raise ConnectionError (the machine answers probes, so it is
        not lost: :meth:`bigmp.Machine.retry_call` retries them). New connections work.
        """
        return self._relay_call(m, lambda r: r.drop())

    def delay(self, m: Any, seconds: float) -> None:
        """Deliver every byte to and from ``m`` ``seconds`` late (each way; 0 removes it).

        A call then takes at least ``2 * seconds``; more than ``keepalive_timeout / 2``
        makes the keepalive declare the machine lost.
        """
        self._relay_call(m, lambda r: r.set_delay(seconds))

    def partition(self, m: Any) -> None:
        """Cut ``m`` off: nothing reaches it or comes back, new connections go unanswered.

        Traffic is held, not discarded (as TCP retransmits over a link that loses every
        packet): after :meth:`heal` it flows again in order. Unhealed, the keepalive marks
        the machine STOPPED after ``keepalive_timeout`` and it is killed.
        """
        self._relay_call(m, lambda r: r.set_partitioned(True))

    def heal(self, m: Any = None) -> None:
        """End the partition of ``m`` (of every machine if None)."""
        if m is not None:
            self._relay_call(m, lambda r: r.set_partitioned(False))
            return
        hub = self._hub
        if hub is not None:
            hub.call(lambda: [r.set_partitioned(False) for r in hub.relays])

    def restart(self, m: Any, services: Optional[Mapping[str, Any]] = None,
                timeout: Optional[float] = None, **start_args: Any) -> Any:
        """Replace machine ``m`` by a new one that also answers at ``m.addr``; return it.

        ``m`` is killed first if it is still there. The replacement is started with
        ``b.start(1, services, ...)`` and is a machine of its own (its handle, its ``addr``);
        ``m``'s handle stays STOPPED, as states only move forward. But connections dialed to
        ``m``'s old address, as :meth:`B.dial` handles and other machines make them, reach
        the replacement: their :meth:`~bigmp.Machine.retry_call` succeeds once it is RUNNING.
        Faults injected on the replacement apply to its own address only.
        """
        from ..errors import StartError
        from ..machine import State
        relay = self._relay(m)
        launch = self._launch(m)
        if not launch.exited:
            self.kill(m)
        new = self.session.start(1, services=services, **start_args)[0]
        timeout = self.options.get("start_timeout", 60.0) if timeout is None else timeout
        if new.wait(State.RUNNING, timeout=timeout) != State.RUNNING:
            raise StartError(f"the replacement of {m.name} did not start: {new.err}")
        target = self.machine_address(new)
        self._hub_call(lambda: relay.reopen(target))
        new_launch = self._launch(new)
        new_launch.on_exit(lambda code: self._post(relay.shut))
        return new

    def _hub_call(self, fn: Callable[[], Any]) -> Any:
        hub = self._hub
        if hub is None:
            raise RuntimeError("the testing system has shut down")
        return hub.call(fn)

    # -- inspection -----------------------------------------------------------------------

    def machine_address(self, m: Any) -> Any:
        """The address ``m`` itself listens on (``m.addr`` is its relay's)."""
        return self._relay(m).target

    def connections(self, m: Any) -> int:
        """How many connections are open through ``m``'s relay now."""
        return self._relay_call(m, lambda r: len(r.pairs))
