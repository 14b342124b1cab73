"""Machine: the driver's handle on one machine, its states, and bigmachine's call contract.

States only move forward: UNSTARTED -> STARTING -> RUNNING -> STOPPED. Calls wait for
RUNNING, fail fast once STOPPED, and calls in flight when a machine stops raise at once
(their connections are shut down under them).
"""
from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from concurrent.futures import Future
from multiprocessing import managers as _mpm
from typing import Any, Dict, Optional

from . import connection, streams, wire
from .errors import MachineLost, MachineStopped

log = logging.getLogger("bigmp.machine")

__all__ = ["Machine", "State", "ServiceProxy"]


class State(enum.IntEnum):
    """A machine's state; it only ever moves forward."""

    UNSTARTED = 0
    STARTING = 1
    RUNNING = 2
    STOPPED = 3


_PLAIN = wire.PLAIN
_is_plain = wire.is_plain
_RUNNING, _STOPPED = State.RUNNING, State.STOPPED   # the hot paths: an enum lookup is 5x a global
_methods: Dict[str, tuple] = {}   # "Service.method" -> (service, method), parsed once


def _plain(args: tuple, kwargs: dict) -> bool:
    """Only plain values (wire.is_plain): nothing to stream, no reducer, no large buffer."""
    for a in args:
        if type(a) not in _PLAIN and not _is_plain(a):
            return False
    if kwargs:
        for v in kwargs.values():
            if type(v) not in _PLAIN and not _is_plain(v):
                return False
    return True


def _split(method: str):
    service, dot, name = method.partition(".")
    if not dot or not service or not name:
        raise ValueError(f"method must be 'Service.method', not {method!r}")
    return service, name


class Machine:
    """A machine of a session (or dialed from one). Create machines with :meth:`B.start`."""

    def __init__(self, session, name: str, owned: bool = True):
        self.name = name
        self._b = session
        self.owned = owned
        self.addr: Any = None
        self.hostname: Optional[str] = None
        self.pid: Optional[int] = None
        self._state = State.UNSTARTED
        self._err: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._idle: collections.deque = collections.deque()
        self._active: set = set()
        self._pool_lock = threading.Lock()
        self.launch = None          # the System's Launch (owned machines)
        self.keepalive = None       # keepalive.Keeper (owned machines)
        self.output = None          # output stream record (owned machines)
        self._shutting_down = False
        self._mux = None            # mux.MuxChannel for call_async, made on first use
        self._mux_dialing = False

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self._state.name} addr={self.addr!r}>"

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def err(self) -> Optional[BaseException]:
        """Why the machine stopped (None while it has not)."""
        return self._err

    def wait(self, state: State = State.RUNNING, timeout: Optional[float] = None) -> State:
        """Block until the machine has reached ``state`` (or a later one); return its state.

        Raises TimeoutError if that does not happen within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._state >= state, timeout):
                raise TimeoutError(f"{self.name} did not reach {state.name} within "
                                   f"{timeout} s (it is {self._state.name})")
            return self._state

    def _set_state(self, state: State, err: Optional[BaseException] = None) -> bool:
        with self._cond:
            if state <= self._state:
                return False
            self._state = state
            if state == State.STOPPED:
                self._err = err
            self._cond.notify_all()
        if state == State.STOPPED:
            self._close_connections()
            if err is not None and not isinstance(err, _Shutdown):
                log.warning("machine %s stopped: %s", self.name, err)
            if self.owned:
                self._b._release(self)   # stop its keepalive; kill what is left of it
        return True

    def _stopped_error(self) -> MachineStopped:
        err = self._err
        cls = type(err) if isinstance(err, MachineStopped) else MachineStopped
        exc = cls(f"machine {self.name} is stopped: {err}")
        exc.__cause__ = err
        return exc

    def _wait_running(self, deadline: Optional[float]) -> None:
        if self._state == State.RUNNING:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.wait(State.RUNNING, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name} was not RUNNING within the call's timeout") from None
        if self._state == State.STOPPED:
            raise self._stopped_error()

    # -- connections ----------------------------------------------------------------------

    def _dial(self, timeout: Optional[float] = None,
              accept: str = "accept_bigmp") -> connection.BigConnection:
        opts = self._b.options
        timeout = opts["connect_timeout"] if timeout is None else timeout
        conn = connection.Client(self.addr, authkey=self._b.authkey, timeout=timeout)
        conn.max_frame = opts["max_frame"]
        args = (f"driver->{self.name}", {"stream": True, "oob": True}) \
            if accept == "accept_bigmp" else (f"driver->{self.name} (async)",)
        try:
            # As _mpm.dispatch, with a deadline: a machine that hangs right after the
            # handshake must not hang its caller (the keepalive, above all).
            conn.send((None, accept, args, {}))
            if not conn.poll(timeout):
                raise TimeoutError(f"{self.name} did not accept the connection within "
                                   f"{timeout:g} s")
            kind, result = conn.recv()
            if kind != "#RETURN":
                raise _mpm.convert_to_error(kind, result)
            conn.enable_oob()
        except BaseException:
            conn.close()
            raise
        return conn

    # The pool needs no lock: deque.pop/append and set.add/discard are atomic, and a
    # connection taken while the machine stops is caught by the state check after it.

    def _pop_idle(self) -> Optional[connection.BigConnection]:
        """An idle pooled connection whose peer is still there (cut ones are closed)."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return None
            if not conn.idle_broken():
                return conn
            conn.close()

    def _acquire(self, deadline: Optional[float] = None) -> connection.BigConnection:
        conn = self._pop_idle()
        if conn is None:
            timeout = None
            if deadline is not None:   # a call's timeout bounds its dial too (a hung machine)
                timeout = min(self._b.options["connect_timeout"],
                              max(0.001, deadline - time.monotonic()))
            conn = self._dial(timeout)
        self._active.add(conn)
        if self._state is _STOPPED:
            self._release(conn, False)
            raise self._stopped_error()
        return conn

    def _release(self, conn, reusable: bool) -> None:
        self._active.discard(conn)
        if reusable and self._state is not _STOPPED and len(self._idle) < 64:
            self._idle.append(conn)
            if self._state is not _STOPPED:
                return
            self._close_idle()   # stopped meanwhile: _close_connections may have missed it
            return
        conn.close()

    def _close_idle(self) -> None:
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return

    def _close_connections(self) -> None:
        with self._pool_lock:
            active = list(self._active)
            mux, self._mux = self._mux, None
        if mux is not None:
            mux.shutdown()   # its reader fails every call in flight
        self._close_idle()
        for conn in active:
            conn.shutdown()   # wakes the caller blocked on it; it closes the fd itself

    def _lost(self, exc: BaseException, what: str) -> BaseException:
        """The error for a call whose connection broke: lost machine, or a temporary error."""
        # A dying process may still accept a connection and then reset it: ask again
        # briefly until the answer is clear (or the exit has been reported).
        deadline = time.monotonic() + (2.0 if self.owned else 0.0)
        while self.probe() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._state == State.STOPPED:
            return self._stopped_error()
        err = ConnectionError(f"connection to {self.name} lost during {what}: {exc!r}")
        err.__cause__ = exc
        return err

    def probe(self) -> Optional[bool]:
        """Is the machine still there? True: it answered; False: it is gone (now STOPPED);
        None: cannot tell yet (the connection broke during the handshake)."""
        if self._state == State.STOPPED:
            return False
        try:
            self._dial(timeout=self._b.options["connect_timeout"]).close()
            return True
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if not self.owned:
                return None   # a dialed machine may be restarting: only its owner can say
            if self._shutting_down:
                self._set_state(State.STOPPED, _Shutdown(f"{self.name} was shut down"))
                return False
            self._set_state(State.STOPPED, MachineLost(
                f"machine {self.name} is gone: its address {self.addr!r} refuses connections "
                f"({exc.strerror or exc!r})"))
            return False
        except Exception:
            return None if self._state != State.STOPPED else False

    # -- calls ----------------------------------------------------------------------------

    def call(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Call ``"Service.method"`` with the arguments; wait for RUNNING first.

        A generator result comes back as an iterator streamed item by item; a generator,
        file or :class:`bigmp.stream` argument is streamed to the machine. ``timeout``
        bounds the whole call (TimeoutError); a STOPPED machine raises MachineStopped.
        """
        if timeout is None:
            if self._state is not _RUNNING:
                self._wait_running(None)
            return self._invoke(method, args, kwargs, None)
        deadline = time.monotonic() + timeout
        self._wait_running(deadline)
        return self._invoke(method, args, kwargs, deadline)

    def _invoke(self, method: str, args: tuple, kwargs: dict,
                _deadline: Optional[float] = None) -> Any:
        """The call itself, whatever the state (bring-up uses it while STARTING)."""
        try:
            service, name = _methods[method]
        except KeyError:
            service, name = _split(method)
            if len(_methods) < 10000:
                _methods[method] = (service, name)
        deadline = _deadline
        sources = None
        plain = _plain(args, kwargs)
        if not plain:
            args, kwargs, sources = streams.split_stream_args(args, kwargs)
        try:
            # The common case inline: an idle pooled connection (see _acquire).
            conn = self._idle.pop()
            if conn.idle_broken():    # cut while idle (machine restarted, link reset)
                conn.close()
                conn = self._pop_idle()
                if conn is None:
                    raise IndexError
            self._active.add(conn)
            if self._state is _STOPPED:
                self._release(conn, False)
                raise self._stopped_error()
        except IndexError:
            conn = None
        try:
            if conn is None:
                conn = self._acquire(deadline)
        except (OSError, EOFError) as exc:
            if isinstance(exc, TimeoutError) and deadline is not None:
                raise TimeoutError(f"{method} on {self.name}: no connection within the "
                                   "call's timeout") from exc
            raise self._lost(exc, method) from None
        sender = None
        stats = self._b.stats   # bigmp.stats: per-method statistics
        token = stats.begin_call(conn) if stats is not None else None
        kind = None
        ok = False
        try:
            if plain:
                conn.send_plain((service, name, args, kwargs))
            else:
                conn.send((service, name, args, kwargs))
            if sources:
                # From another thread: a streamed reply may start before the input ends.
                sender = threading.Thread(target=streams.send_sources, args=(conn, sources),
                                          daemon=True, name=f"bigmp-stream-{self.name}")
                sender.start()
            if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{method} on {self.name} did not return in time")
            kind, result = conn.recv()
            if kind == "#STREAM":
                ok = None   # the stream owns the connection now
                return StreamReply(self, conn, method, sender)
            ok = True
        except (EOFError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise self._lost(exc, method) from None
        finally:
            if token is not None:
                stats.called(self.name, method, conn, token, kind)
            if ok is not None:
                if sender is not None:
                    if not ok:
                        conn.shutdown()   # the sender must not write on a broken call
                    sender.join()         # done or about to be: it finished its last frame
                self._release(conn, ok)
        if kind == "#RETURN":
            return result
        raise _mpm.convert_to_error(kind, result)

    def call_async(self, method: str, *args: Any, timeout: Optional[float] = None,
                   **kwargs: Any) -> "Future[Any]":
        """Like :meth:`call`, returning a :class:`concurrent.futures.Future`.

        On a RUNNING machine the call goes out at once on a connection that carries many
        calls in flight (:mod:`bigmp.mux`); streamed arguments, a ``timeout``, or a machine
        not yet RUNNING use a thread of the session instead.
        """
        if timeout is None and self._state is _RUNNING:
            plain = _plain(args, kwargs)
            if plain or not streams.split_stream_args(args, kwargs)[2]:
                channel = self._mux_channel()
                if channel is not None:
                    try:
                        service, name = _methods[method]
                    except KeyError:
                        service, name = _split(method)
                    return channel.submit(method, service, name, args, kwargs, plain)
        return self._b._executor().submit(self._call_unstreamed, method, args, kwargs, timeout)

    def _call_unstreamed(self, method: str, args: tuple, kwargs: dict,
                         timeout: Optional[float]) -> Any:
        # call_async gives no streamed results, whichever path it takes (see mux.py).
        result = self.call(method, *args, timeout=timeout, **kwargs)
        if isinstance(result, StreamReply):
            result.close()
            raise TypeError(f"{method} returned a generator: streamed results need call(), "
                            "not call_async()")
        return result

    def _mux_channel(self):
        """The mux channel if it is up; else start making it (in the background: dialing a
        hung machine must not block ``call_async``) and return None for now."""
        channel = self._mux
        if channel is not None and channel.dead is None:
            return channel
        with self._pool_lock:
            if self._mux_dialing or self._state is not State.RUNNING:
                return None
            self._mux_dialing = True
        threading.Thread(target=self._dial_mux, daemon=True,
                         name=f"bigmp-mux-dial-{self.name}").start()
        return None

    def _dial_mux(self) -> None:
        from .mux import MuxChannel
        try:
            conn = self._dial(accept="accept_mux")
            channel = MuxChannel(self, conn)
            with self._pool_lock:
                if self._state is State.STOPPED:
                    channel.shutdown()
                else:
                    self._mux = channel
        except Exception as exc:
            log.debug("no mux channel to %s: %r", self.name, exc)
        finally:
            self._mux_dialing = False

    async def acall(self, method: str, *args: Any, timeout: Optional[float] = None,
                    **kwargs: Any) -> Any:
        """Like :meth:`call`, for asyncio: ``await m.acall("PI.sample", n)``."""
        import asyncio
        return await asyncio.wrap_future(self.call_async(method, *args, timeout=timeout, **kwargs))

    def retry_call(self, method: str, *args: Any, deadline: float = 60.0,
                   backoff: float = 0.1, max_backoff: float = 5.0, **kwargs: Any) -> Any:
        """:meth:`call`, retrying temporary (connection) errors with backoff for ``deadline`` s.

        A remote exception or a STOPPED machine is not temporary and is raised at once.
        """
        end = time.monotonic() + deadline
        delay = backoff
        while True:
            try:
                return self.call(method, *args, **kwargs)
            except MachineStopped:
                raise
            except (ConnectionError, TimeoutError) as exc:
                if getattr(exc, "remote_origin", None):
                    raise   # raised by the method itself, not by the network
                left = end - time.monotonic()
                if left <= 0:
                    raise
                log.info("retrying %s on %s after %r", method, self.name, exc)
                time.sleep(min(delay, left))
                delay = min(delay * 2, max_backoff)

    def service(self, name: str) -> "ServiceProxy":
        """A proxy whose methods call the service: ``m.service("PI").sample(n)``."""
        return ServiceProxy(self, name)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop this machine alone (as :meth:`B.shutdown` does for all): ask it to exit,
        wait for its output to drain, kill it if it does not go."""
        if not self.owned:
            raise RuntimeError(f"{self.name} was dialed, not started, by this session: "
                               "only its owner can shut it down")
        self._b._stop_machines([self], timeout)

    def info(self) -> Dict[str, Any]:
        """pid, hostname, CPUs, memory, disk, load and more, measured on the machine."""
        return self.call("Supervisor.info")

    def ping(self, timeout: Optional[float] = None) -> bool:
        return self.call("Supervisor.ping", timeout=timeout)


class StreamReply:
    """The iterator a streamed call returns; it owns its connection until the stream ends.

    Close it (or use it as a context manager) to abandon a stream early; one that is
    dropped unread closes its connection when it is garbage collected (nothing leaks).
    """

    def __init__(self, machine: Machine, conn, method: str,
                 sender: Optional[threading.Thread] = None):
        self._machine = machine
        self._conn = conn
        self._method = method
        self._sender = sender   # still streaming our arguments, maybe

    def __iter__(self) -> "StreamReply":
        return self

    def __next__(self) -> Any:
        conn = self._conn
        if conn is None:
            raise StopIteration
        try:
            kind, value = conn.recv()
        except (EOFError, OSError) as exc:
            self._finish(False)
            raise self._machine._lost(exc, self._method) from None
        if kind == "#ITEM":
            return value
        self._finish(True)   # the server is done with this reply either way
        if kind == "#END":
            raise StopIteration
        raise _mpm.convert_to_error(kind, value)

    def _finish(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._sender is not None:
                if not reusable:
                    conn.shutdown()
                self._sender.join()
            self._machine._release(conn, reusable)

    def close(self) -> None:
        """Abandon the rest of the stream (its connection is closed, not reused)."""
        self._finish(False)

    def __enter__(self) -> "StreamReply":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Shutdown(MachineStopped):
    """The machine was shut down by its session (not an error)."""


class ServiceProxy:
    """A service of a machine as an object: attribute access gives callable methods."""

    def __init__(self, machine: Machine, name: str):
        self._machine = machine
        self._name = name

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        full = f"{self._name}.{method}"
        machine = self._machine

        def call(*args, **kwargs):
            if kwargs or machine._state is not _RUNNING:
                return machine.call(full, *args, **kwargs)   # timeout=, or not RUNNING yet
            return machine._invoke(full, args, kwargs, None)
        call.__name__ = method
        call.__qualname__ = full
        setattr(self, method, call)   # made once: later lookups do not come here
        return call

    def _callmethod(self, methodname: str, args=(), kwds={}):
        return self._machine.call(f"{self._name}.{methodname}", *args, **kwds)

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._name} on {self._machine.name}>"

