"""BigServer: the stdlib manager server with its faults fixed, and bigmp's services on it.

Differences from :class:`multiprocessing.managers.Server` that a caller can see:

* a method's exception comes back with its remote traceback and the machine's name;
* named services (``"PI"``) sit beside typeid-created objects in the same table, pinned
  (no refcount), so ``("PI", "sample", args, kwds)`` is an ordinary manager request;
* unknown services and methods are errors that list what exists;
* a generator result is streamed to bigmp clients (they say so when they attach);
* the handshake has deadlines, failed handshakes are logged and closed, each connection's
  thread ends and closes its socket on every path, and the accept loop stops on shutdown.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import types
from multiprocessing import connection as _mpc, managers as _mpm, process as _process, util as _util
from traceback import format_exc
from typing import Any, Callable, Dict, Optional

from . import connection, streams, wire
from .errors import UnknownMethod, UnknownService, Unserializable, pack_exception

log = logging.getLogger("bigmp.server")

__all__ = ["BigServer", "public_methods", "SERIALIZERS"]

_GeneratorType = types.GeneratorType
_PLAIN, _is_plain = wire.PLAIN, wire.is_plain
_BigConnection = wire.BigConnection


def public_methods(obj: Any) -> list:
    """Callable attributes not starting with ``_`` (what a service exposes)."""
    out = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            if callable(getattr(obj, name)):
                out.append(name)
        except Exception:
            continue
    return out


def _xml_ready() -> None:
    # The stdlib's _xml_dumps/_xml_loads use a module global that only its own
    # XmlListener/XmlClient import.
    import xmlrpc.client
    _mpc.xmlrpclib = xmlrpc.client


class _XmlListener(connection.Listener):
    def accept(self):
        _xml_ready()
        conn = super().accept()
        return _mpc.ConnectionWrapper(conn, _mpc._xml_dumps, _mpc._xml_loads)


def _XmlClient(*args, **kwds):
    _xml_ready()
    return _mpc.ConnectionWrapper(connection.Client(*args, **kwds), _mpc._xml_dumps,
                                  _mpc._xml_loads)


# User-facing serializer name -> the name registered in the stdlib's table, so that every
# stdlib code path that looks up ``listener_client[serializer]`` (servers, proxies,
# AutoProxy, rebuilt proxies) gets our Listener/Client.
SERIALIZERS = {"pickle": "bigmp", "xmlrpclib": "bigmp-xmlrpclib",
               "bigmp": "bigmp", "bigmp-xmlrpclib": "bigmp-xmlrpclib"}
_mpm.listener_client.setdefault("bigmp", (connection.Listener, connection.Client))
_mpm.listener_client.setdefault("bigmp-xmlrpclib", (_XmlListener, _XmlClient))


class BigServer(_mpm.Server):
    """A manager server that is also a bigmp machine's RPC endpoint."""

    public = list(_mpm.Server.public) + ["accept_bigmp", "accept_mux"]

    def __init__(self, registry: Dict[str, tuple], address: Any, authkey: bytes,
                 serializer: str = "bigmp", name: Optional[str] = None):
        serializer = SERIALIZERS.get(serializer, serializer)
        super().__init__(registry, address, authkey, serializer)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.services: Dict[str, Any] = {}
        self.stop_event = threading.Event()
        self._local = threading.local()
        self.on_connection_closed: Optional[Callable[[Any, Any], None]] = None
        self.stats = None  # set by the stats module when per-method statistics are on

    # -- services ---------------------------------------------------------------------

    def install(self, name: str, obj: Any) -> None:
        """Serve ``obj`` as service ``name``: all its public methods become callable."""
        if not name or "." in name:
            raise ValueError(f"bad service name {name!r}: it must be non-empty and contain no '.'")
        with self.mutex:
            self.services[name] = obj
            # init(b) runs once at registration; it is not a method to call remotely.
            exposed = set(public_methods(obj)) - {"init"}
            self.id_to_obj[name] = (obj, exposed, None)

    def connection_state(self) -> Any:
        """Per-connection scratch space for the method running in this thread."""
        return getattr(self._local, "state", None)

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in this connection's thread once the current reply has been sent."""
        self._local.after.append(fn)

    # -- accepting ----------------------------------------------------------------------

    def serve_forever(self):
        """As the stdlib: serve until shutdown, then ``sys.exit(0)``."""
        self.serve_until_stopped()
        self.stop()
        sys.exit(0)

    def serve_until_stopped(self) -> None:
        """Accept connections until :attr:`stop_event` is set."""
        _process.current_process()._manager_server = self
        accepter = threading.Thread(target=self.accepter, name="bigmp-accept", daemon=True)
        accepter.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        except (KeyboardInterrupt, SystemExit):
            pass

    def accepter(self):
        while not self.stop_event.is_set():
            try:
                c = self.listener.accept()
            except OSError:
                if self.stop_event.is_set() or self.listener._socket is None:
                    return
                self.stop_event.wait(0.05)   # EMFILE and the like: do not spin
                continue
            t = threading.Thread(target=self.handle_request, args=(c,), daemon=True,
                                 name="bigmp-conn")
            t.start()

    def _handle_request(self, c):
        try:
            connection.handshake_server(c, self.authkey)
        except Exception as exc:
            # Nothing from an unauthenticated peer is unpickled; say why and hang up.
            log.warning("%s: rejected a connection: %s", self.name, exc)
            return
        request = None
        try:
            request = c.recv()
            ignore, funcname, args, kwds = request
            if funcname not in self.public:
                raise ValueError(f"{funcname!r} unrecognized")
            func = getattr(self, funcname)
        except Exception:
            msg = ("#TRACEBACK", format_exc())
        else:
            try:
                result = func(c, *args, **kwds)
            except Exception:
                msg = ("#TRACEBACK", format_exc())
            else:
                msg = ("#RETURN", result)
        try:
            c.send(msg)
        except Exception:
            pass

    def handle_request(self, conn):
        try:
            self._handle_request(conn)
        except (SystemExit, EOFError, OSError):
            pass
        finally:
            conn.close()

    def accept_bigmp(self, c, name: str, caps: dict):
        """Like ``accept_connection``, for bigmp clients: streamed replies, and large
        buffers out of band (both ends switch after this reply)."""
        threading.current_thread().name = name
        c.send(("#RETURN", None))
        if caps.get("oob") and hasattr(c, "enable_oob"):
            c.enable_oob()
        self.serve_client(c, streaming=bool(caps.get("stream")))

    def accept_mux(self, c, name: str):
        """A connection that carries many tagged calls at once (see :mod:`bigmp.mux`)."""
        threading.current_thread().name = name
        c.send(("#RETURN", None))
        if hasattr(c, "enable_oob"):
            c.enable_oob()
        from . import mux
        mux.serve(self, c)

    def accept_connection(self, c, name):
        threading.current_thread().name = name
        c.send(("#RETURN", None))
        self.serve_client(c)

    # -- serving one connection -----------------------------------------------------------

    def serve_client(self, conn, streaming: bool = False):
        self._local.state = types.SimpleNamespace(conn=conn, driver=False)
        after = self._local.after = []
        stopping = self.stop_event.is_set
        try:
            while not stopping():
                try:
                    request = conn.recv()
                except connection.FrameTooLarge as exc:
                    # Tell the peer why before hanging up: its stream is out of sync now.
                    self._send(conn, ("#ERROR", pack_exception(exc, self.name)), None)
                    return
                except (EOFError, OSError):
                    return
                stats = self.stats   # bigmp.stats: per-method statistics
                token = stats.begin_served(conn) if stats is not None else None
                msg, stream, demux = self._dispatch(conn, request, streaming)
                if stream is None and demux is not None and not self._drain(demux):
                    return
                if not self._send(conn, msg, request):
                    return
                if stream is not None and not self._send_stream(conn, stream, demux):
                    return
                if token is not None:
                    stats.served(self, conn, request, msg, token)
                if after:   # filled by after_reply() during the call, rarely
                    fns = after[:]
                    after.clear()
                    for fn in fns:
                        fn()
                # Hold nothing of this call while waiting for the next: its large buffers
                # may then be reused (bigmp.buffers).
                request = msg = stream = demux = None
        finally:
            hook = self.on_connection_closed
            if hook is not None:
                hook(conn, self._local.state)
            conn.close()

    def _lookup(self, ident):
        try:
            return self.id_to_obj[ident]
        except KeyError:
            try:
                return self.id_to_local_proxy_obj[ident]
            except KeyError:
                pass
        raise UnknownService(f"no service or shared object {ident!r} on {self.name}; "
                             f"services: {sorted(self.services)}")

    def _dispatch(self, conn, request, streaming):
        """Run one request; return (reply, generator-to-stream-or-None, demux-or-None)."""
        demux = None
        try:
            ident, methodname, args, kwds = request
            if streaming and (args or kwds):
                # Bound first, so that the streamed frames are drained whatever happens.
                args, kwds, demux = streams.bind_stream_args(conn, args, kwds)
            obj, exposed, gettypeid = self._lookup(ident)
            if methodname not in exposed:
                fallback = self.fallback_mapping.get(methodname)
                if fallback is None:
                    raise UnknownMethod(
                        f"{type(obj).__name__} {ident!r} on {self.name} has no exposed method "
                        f"{methodname!r}; methods: {sorted(exposed)}")
                return ("#RETURN", fallback(self, conn, ident, obj, *args, **kwds)), None, demux
            res = getattr(obj, methodname)(*args, **kwds)
            if streaming and type(res) is _GeneratorType:
                # The generator may still read its streamed input: drain after it ends.
                return ("#STREAM", None), res, demux
            typeid = gettypeid and gettypeid.get(methodname, None)
            if typeid:
                rident, rexposed = self.create(conn, typeid, res)
                token = _mpm.Token(typeid, self.address, rident)
                return ("#PROXY", (rexposed, token)), None, demux
            return ("#RETURN", res), None, demux
        except Exception as e:
            return ("#ERROR", pack_exception(e, self.name)), None, demux

    def _send(self, conn, msg, request) -> bool:
        try:
            try:
                if (type(msg[1]) in _PLAIN or _is_plain(msg[1])) and \
                        isinstance(conn, _BigConnection):
                    conn.send_plain(msg)
                else:
                    conn.send(msg)
            except (EOFError, OSError, BrokenPipeError):
                raise
            except Exception as exc:
                # The result could not be pickled: say so, keep serving.
                err = Unserializable(f"the reply to {request and request[1]!r} could not be "
                                     f"pickled on {self.name}: {type(exc).__name__}: {exc}")
                conn.send(("#ERROR", pack_exception(err, self.name)))
            return True
        except (EOFError, OSError):
            return False
        except Exception:
            _util.info("failure to send reply to %r", request)
            return False

    @staticmethod
    def _drain(demux) -> bool:
        try:
            demux.drain()   # the caller's streamed frames must be off the wire first
            return True
        except Exception:
            return False

    def _send_stream(self, conn, gen, demux=None) -> bool:
        try:
            for item in gen:
                conn.send(("#ITEM", item))
        except (EOFError, OSError):
            gen.close()   # the caller went away: run the generator's finally blocks
            return False
        except Exception as exc:
            if demux is not None and not self._drain(demux):
                return False
            return self._send(conn, ("#ERROR", pack_exception(exc, self.name)), None)
        if demux is not None and not self._drain(demux):
            return False
        return self._send(conn, ("#END", None), None)

    def stop(self) -> None:
        """Stop accepting and serving; close the listener."""
        self.stop_event.set()
        try:
            self.listener.close()
        except Exception:
            pass
