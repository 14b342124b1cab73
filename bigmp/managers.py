"""BigManager and BigSyncManager: drop-in :mod:`multiprocessing.managers` with the faults fixed.

Swap ``BaseManager`` for :class:`BigManager` (``SyncManager`` for :class:`BigSyncManager`)
and code keeps working; in addition:

* exceptions from the server keep their remote traceback (and say where they were raised);
* connections use TCP_NODELAY and have connect/handshake timeouts;
* a pickled proxy carries its authkey, so it works in any process of the session;
* a proxy whose connection went stale (server restarted) reconnects instead of failing forever;
* a server started by :meth:`BigManager.start` exits when its parent process dies;
* ``BigManager(system="local")`` places the server on a bigmp machine of any backend.
"""
from __future__ import annotations

import copyreg
import os
import signal
import threading
from multiprocessing import managers as _mpm, process as _process, util as _util
from multiprocessing.connection import wait as _wait
from typing import Any, Callable, Optional

from . import tls
from .server import SERIALIZERS, BigServer

__all__ = ["BigManager", "BigSyncManager", "BigProxy", "BigAutoProxy", "Token"]

Token = _mpm.Token


_legacy_servers: set = set()


class BigProxyMixin:
    """What bigmp changes in :class:`multiprocessing.managers.BaseProxy`."""

    def _connect(self):
        name = _process.current_process().name
        if threading.current_thread().name != "MainThread":
            name += "|" + threading.current_thread().name
        address = self._token.address
        conn = self._Client(address, authkey=self._authkey)
        if address not in _legacy_servers:
            try:
                oob = hasattr(conn, "enable_oob")   # not for the xmlrpclib serializer
                _mpm.dispatch(conn, None, "accept_bigmp", (name, {"stream": True, "oob": oob}))
                if oob:
                    conn.enable_oob()
                self._tls.connection = conn
                return
            except _mpm.RemoteError as exc:
                conn.close()
                if "unrecognized" not in str(exc):
                    raise
                _legacy_servers.add(address)   # a stdlib server: speak its dialect
                conn = self._Client(address, authkey=self._authkey)
        _mpm.dispatch(conn, None, "accept_connection", (name,))
        self._tls.connection = conn

    def _callmethod(self, methodname, args=(), kwds={}):
        conn = getattr(self._tls, "connection", None)
        if conn is None:
            self._connect()
            conn = self._tls.connection
        request = (self._id, methodname, args, kwds)
        try:
            conn.send(request)
        except (BrokenPipeError, ConnectionResetError, OSError):
            # The cached connection is stale (the server restarted or dropped it): the
            # request never left, so reconnect once and send it again.
            self._drop_connection()
            self._connect()
            conn = self._tls.connection
            conn.send(request)
        try:
            kind, result = conn.recv()
        except (EOFError, OSError):
            self._drop_connection()
            raise
        if kind == "#RETURN":
            return result
        if kind == "#STREAM":
            return self._stream(conn)
        if kind == "#PROXY":
            exposed, token = result
            registry = getattr(self._manager, "_registry", None) or {}
            proxytype = registry.get(token.typeid, (None,) * 4)[-1] or BigAutoProxy
            token.address = self._token.address
            proxy = proxytype(token, self._serializer, manager=self._manager,
                              authkey=self._authkey, exposed=exposed)
            c = self._Client(token.address, authkey=self._authkey)
            _mpm.dispatch(c, None, "decref", (token.id,))
            return proxy
        raise _mpm.convert_to_error(kind, result)

    def _stream(self, conn):
        # The connection belongs to the stream until it ends: detach it now, so a call
        # made before the stream is read dials a connection of its own.
        self._tls.connection = None
        return self._iter_stream(conn)

    def _iter_stream(self, conn):
        finished = False
        try:
            while True:
                kind, value = conn.recv()
                if kind == "#ITEM":
                    yield value
                elif kind == "#END":
                    finished = True
                    return
                else:
                    finished = True
                    raise _mpm.convert_to_error(kind, value)
        finally:
            if finished and getattr(self._tls, "connection", None) is None:
                self._tls.connection = conn
            else:
                conn.close()

    def _drop_connection(self):
        conn = getattr(self._tls, "connection", None)
        self._tls.connection = None
        try:
            del self._tls.connection
        except AttributeError:
            pass
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def __reduce__(self):
        # The stdlib drops the authkey unless it is spawning a child, so a proxy sent to
        # another process of the session fails authentication; bigmp keeps it.
        kwds = {"authkey": bytes(self._authkey)}
        # A server on another host speaks TLS: the session's client credentials travel
        # with the proxy like its authkey (both are the session's secret).
        creds = tls.credentials(self._authkey) if tls.is_tls_address(self._token.address) \
            else None
        if getattr(self, "_isauto", False):
            kwds["exposed"] = self._exposed_
            return (_rebuild_wrapped, (None, self._token, self._serializer, kwds, creds))
        base = getattr(type(self), "_bigmp_base", type(self))
        return (_rebuild_wrapped, (base, self._token, self._serializer, kwds, creds))


class BigProxy(BigProxyMixin, _mpm.BaseProxy):
    """Base class for bigmp proxies (use it where you would subclass ``BaseProxy``)."""


_wrapped_cache: dict = {}


class _WrappedProxyMeta(type):
    """Metaclass of wrapped proxy types, so pickle can rebuild them from the user's class."""


def _reduce_wrapped_type(cls):
    return (wrap_proxytype, (cls._bigmp_base,))


# copyreg is consulted (by metaclass) before pickle falls back to "save the class by name",
# which would fail: the wrapped type has the user's qualname but is not that object.
copyreg.pickle(_WrappedProxyMeta, _reduce_wrapped_type)


def wrap_proxytype(proxytype: Any) -> Any:
    """A subclass of a user's ``BaseProxy`` subclass with bigmp's fixes mixed in."""
    if proxytype is None or proxytype is _mpm.AutoProxy:
        return BigAutoProxy
    if not isinstance(proxytype, type) or not issubclass(proxytype, _mpm.BaseProxy):
        return proxytype
    if issubclass(proxytype, BigProxyMixin):
        return proxytype
    wrapped = _wrapped_cache.get(proxytype)
    if wrapped is None:
        meta = type(proxytype)
        if meta is not type:
            meta = type("_Wrapped" + meta.__name__, (_WrappedProxyMeta, meta), {})
            copyreg.pickle(meta, _reduce_wrapped_type)
        else:
            meta = _WrappedProxyMeta
        wrapped = meta(proxytype.__name__, (BigProxyMixin, proxytype),
                       {"__module__": proxytype.__module__, "_bigmp_base": proxytype,
                        "__qualname__": proxytype.__qualname__})
        _wrapped_cache[proxytype] = wrapped
    return wrapped


def _rebuild_wrapped(base, token, serializer, kwds, creds=None):
    if creds is not None and tls.credentials(kwds["authkey"]) is None:
        tls.register(kwds["authkey"], tls.Credentials(**creds))
    return _mpm.RebuildProxy(wrap_proxytype(base), token, serializer, kwds)


_auto_cache: dict = {}


def _make_proxy_type(name: str, exposed) -> type:
    exposed = tuple(exposed)
    try:
        return _auto_cache[(name, exposed)]
    except KeyError:
        pass
    dic = {}
    for meth in exposed:
        exec("""def %s(self, /, *args, **kwds):
        return self._callmethod(%r, args, kwds)""" % (meth, meth), dic)
    proxytype = type(name, (BigProxy,), dic)
    proxytype._exposed_ = exposed
    _auto_cache[(name, exposed)] = proxytype
    return proxytype


def BigAutoProxy(token, serializer, manager=None, authkey=None, exposed=None, incref=True,
                 manager_owned=False):
    """The stdlib's ``AutoProxy`` built on :class:`BigProxy`."""
    serializer = SERIALIZERS.get(serializer, serializer)
    _Client = _mpm.listener_client[serializer][1]
    if authkey is None and manager is not None:
        authkey = manager._authkey
    if authkey is None:
        authkey = _process.current_process().authkey
    if exposed is None:
        conn = _Client(token.address, authkey=authkey)
        try:
            exposed = _mpm.dispatch(conn, None, "get_methods", (token,))
        finally:
            conn.close()
    ProxyType = _make_proxy_type("AutoProxy[%s]" % token.typeid, exposed)
    proxy = ProxyType(token, serializer, manager=manager, authkey=authkey, incref=incref,
                      manager_owned=manager_owned)
    proxy._isauto = True
    return proxy


def _watch_parent(server: BigServer, poll: float = 1.0) -> None:
    """Stop ``server`` when the process that started it dies (the stdlib never does)."""
    parent = _process.parent_process()
    ppid = os.getppid()
    sentinel = getattr(parent, "sentinel", None)
    while not server.stop_event.is_set():
        if sentinel is not None:
            if _wait([sentinel], poll):
                break
        elif server.stop_event.wait(poll):
            return
        if os.getppid() != ppid:
            break
    server.stop_event.set()


class BigManager(_mpm.BaseManager):
    """A :class:`multiprocessing.managers.BaseManager` that can also live on a bigmp machine.

    Args are those of ``BaseManager``; ``system`` (e.g. ``"local"``) and further keyword
    options (see :mod:`bigmp.config`) place the server on a machine started by that bigmp
    backend instead of a child process.
    """

    _Server = BigServer

    def __init__(self, address=None, authkey=None, serializer="pickle", ctx=None, *,
                 shutdown_timeout: float = 1.0, system: Optional[str] = None, **options: Any):
        if serializer not in SERIALIZERS:
            raise ValueError(f"unknown serializer {serializer!r}; use 'pickle' or 'xmlrpclib'")
        if system is not None and serializer != "pickle":
            raise ValueError("a manager placed on a machine (system=) speaks pickle; "
                             f"serializer={serializer!r} is not supported there")
        super().__init__(address, authkey, SERIALIZERS[serializer], ctx,
                         shutdown_timeout=shutdown_timeout)
        self._system = system
        self._options = options
        self._session = None

    @classmethod
    def register(cls, typeid, callable=None, proxytype=None, exposed=None,
                 method_to_typeid=None, create_method=True):
        """As ``BaseManager.register``; proxies get bigmp's fixes."""
        super().register(typeid, callable, wrap_proxytype(proxytype), exposed,
                         method_to_typeid, create_method)

    def get_server(self):
        """A :class:`BigServer` to run in this process (the stdlib hard-codes its own)."""
        if self._system is not None:
            raise ValueError("get_server() runs a server in this process; it does not apply "
                             "to a manager placed on a machine with system=")
        if self._state.value != _mpm.State.INITIAL:
            if self._state.value == _mpm.State.STARTED:
                raise _mpm.ProcessError("Already started server")
            elif self._state.value == _mpm.State.SHUTDOWN:
                raise _mpm.ProcessError("Manager has shut down")
            raise _mpm.ProcessError(f"Unknown state {self._state.value!r}")
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def start(self, initializer: Optional[Callable] = None, initargs=()):
        """Start the server: a child process, or with ``system=`` a bigmp machine."""
        if self._system is None:
            return super().start(initializer, initargs)
        from .placement import start_on_machine
        start_on_machine(self, initializer, initargs)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the server to exit (the machine to stop, with ``system=``)."""
        machine = getattr(self, "_machine", None)
        if machine is None:
            return super().join(timeout)
        from .machine import State
        try:
            machine.wait(State.STOPPED, timeout)
        except TimeoutError:
            pass

    @classmethod
    def _run_server(cls, registry, address, authkey, serializer, writer, initializer=None,
                    initargs=()):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if initializer is not None:
            initializer(*initargs)
        server = cls._Server(registry, address, authkey, serializer)
        writer.send(server.address)
        writer.close()
        threading.Thread(target=_watch_parent, args=(server,), daemon=True,
                         name="bigmp-parent-watch").start()
        _util.info("manager serving at %r", server.address)
        server.serve_forever()


class BigSyncManager(BigManager):
    """:class:`multiprocessing.managers.SyncManager` on bigmp: the same shared types."""


for _typeid, (_callable, _exposed, _m2t, _proxytype) in _mpm.SyncManager._registry.items():
    BigSyncManager.register(_typeid, _callable, _proxytype, exposed=_exposed,
                            method_to_typeid=_m2t,
                            create_method=_typeid in vars(_mpm.SyncManager))
del _typeid, _callable, _exposed, _m2t, _proxytype
