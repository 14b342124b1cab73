"""Listener and Client for manager traffic: the stdlib wire format with its faults fixed.

The frames are those of :mod:`multiprocessing.connection` (a 4-byte length, then the
payload) so a stdlib peer can still talk to us, but:

* TCP sockets set ``TCP_NODELAY``: without it every new authenticated connection pays the
  ~40 ms Nagle/delayed-ACK stall;
* connect and the HMAC handshake have timeouts, so a dead or silent peer cannot hang a caller;
* a frame longer than ``max_frame`` is refused *before* its body is allocated;
* nothing is unpickled before the peer has passed the HMAC challenge (done by the caller of
  :meth:`Listener.accept`, as the stdlib server does, so a slow client never blocks accept);
* payloads are pickled with protocol 5 and fall back to cloudpickle for lambdas and classes
  that plain pickle cannot name.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from multiprocessing import AuthenticationError, connection as _mpc
from typing import Optional, Tuple, Union

from . import config, tls
from .wire import BigConnection, FrameTooLarge, TLSConnection, dumps, loads  # noqa: F401

Address = Union[Tuple[str, int], str]

__all__ = ["BigConnection", "Listener", "Client", "dumps", "loads", "FrameTooLarge",
           "handshake_server", "handshake_client"]


# A unix socket's queue is bounded by the sender's SO_SNDBUF (208 KiB by default): a
# large message then crosses in many small write/read pairs with a context switch each.
# Up to this much (the kernel caps it at net.core.wmem_max) only costs memory while data
# is queued. TCP keeps its autotuning (setting a buffer size would turn it off).
UNIX_SNDBUF = 4 << 20


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        except OSError:
            pass


def address_type(address: Address) -> str:
    return "AF_UNIX" if isinstance(address, str) else "AF_INET"


class _Deadline:
    """Wraps a connection so each receive of the handshake waits at most ``timeout``."""

    def __init__(self, conn: _mpc.Connection, timeout: Optional[float]):
        self.conn, self.timeout = conn, timeout

    def send_bytes(self, data):
        self.conn.send_bytes(data)

    def recv_bytes(self, maxlength=None):
        if self.timeout is not None and not self.conn.poll(self.timeout):
            raise TimeoutError(f"authentication handshake timed out after {self.timeout} s")
        data = self.conn.recv_bytes(maxlength)
        return data


def handshake_server(conn: _mpc.Connection, authkey: bytes, timeout: Optional[float] = None) -> None:
    """Server side of the stdlib HMAC challenge, with a deadline on each step."""
    t = config.handshake_timeout() if timeout is None else timeout
    d = _Deadline(conn, t)
    settimeout = getattr(conn, "settimeout", None)
    if settimeout is not None:
        settimeout(t)   # TLS: bounds the TLS handshake hidden in the first send
    try:
        _mpc.deliver_challenge(d, authkey)
        _mpc.answer_challenge(d, authkey)
    except (EOFError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            raise
        raise AuthenticationError(f"authentication handshake failed: {exc!r}") from exc
    if settimeout is not None:
        settimeout(None)


class HandshakeInterrupted(AuthenticationError, ConnectionResetError):
    """The server hung up during the handshake: also a ConnectionError, so a caller treats
    it as a lost connection (the machine died or gave up), not only as a refused key."""


def handshake_client(conn: _mpc.Connection, authkey: bytes, timeout: Optional[float] = None) -> None:
    """Client side of the stdlib HMAC challenge, with a deadline on each step."""
    t = config.handshake_timeout() if timeout is None else timeout
    d = _Deadline(conn, t)
    settimeout = getattr(conn, "settimeout", None)
    if settimeout is not None:
        settimeout(t)
    try:
        _mpc.answer_challenge(d, authkey)
        _mpc.deliver_challenge(d, authkey)
    except EOFError as exc:
        # A wrong key is answered with a rejection; EOF means the server went away.
        raise HandshakeInterrupted(
            "server closed the connection during authentication (wrong authkey?)") from exc
    except AssertionError as exc:
        # Python < 3.12 asserts that the server's first message is a challenge.
        raise AuthenticationError("the server did not send an authentication challenge "
                                  "(not a bigmp machine?)") from exc
    if settimeout is not None:
        settimeout(None)


class Listener:
    """A listening socket whose :meth:`accept` returns an *unauthenticated* BigConnection.

    Same constructor as :class:`multiprocessing.connection.Listener`; when ``authkey`` is
    given, :meth:`accept` runs the handshake itself (with a deadline).
    """

    def __init__(self, address: Optional[Address] = None, family: Optional[str] = None,
                 backlog: int = 128, authkey: Optional[bytes] = None):
        # As the stdlib: no address means a unix socket in a private temporary directory.
        self._tls = tls.is_tls_address(address)
        if self._tls:
            address = tuple(address[1:])
        family = family or (address and address_type(address)) or "AF_UNIX"
        self._tmpdir = None
        if address is None:
            address = unix_address() if family == "AF_UNIX" else ("127.0.0.1", 0)
            if family == "AF_UNIX":
                self._tmpdir = os.path.dirname(address)
        if family == "AF_UNIX":
            sock = bind_unix(address)
            self._unlink = address
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            self._unlink = None
        # The stdlib server asks for 16: bursts of new connections (many threads calling
        # at once) overflow that, and a unix-socket connect then fails with EAGAIN.
        sock.listen(max(backlog, 1024))
        self._socket = sock
        self._family = family
        self.address = sock.getsockname()
        if family == "AF_INET6":
            self.address = self.address[:2]
        if self._tls:
            self.address = ("tls",) + tuple(self.address)
        self._authkey = authkey
        self.last_accepted = None

    def accept(self) -> BigConnection:
        s, self.last_accepted = self._socket.accept()
        s.setblocking(True)
        _tune(s)
        conn = TLSConnection(tls.wrap_server(s)) if self._tls else BigConnection(s.detach())
        if self._authkey is not None:
            try:
                handshake_server(conn, self._authkey)
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        if self._unlink:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None
        if self._tmpdir:
            try:
                os.rmdir(self._tmpdir)
            except OSError:
                pass
            self._tmpdir = None

    def fileno(self) -> int:
        return self._socket.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _connect(s: socket.socket, address, timeout: float) -> None:
    # A unix socket whose accept queue is full answers EAGAIN at once instead of waiting
    # like TCP does; retry until the deadline.
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            s.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"connecting to {address!r}: accept queue full for "
                                   f"{timeout} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def Client(address: Address, family: Optional[str] = None, authkey: Optional[bytes] = None,
           timeout: Optional[float] = None) -> BigConnection:
    """Connect, set TCP_NODELAY and authenticate; like the stdlib ``Client``.

    ``timeout`` bounds the connect and each handshake step (default: the
    ``connect_timeout`` and ``handshake_timeout`` options).
    """
    t = config.connect_timeout() if timeout is None else timeout
    use_tls = tls.is_tls_address(address)
    if use_tls:
        address = tuple(address[1:])
    family = family or address_type(address)
    if family == "AF_UNIX":
        s = socket.socket(socket.AF_UNIX)
    else:
        address = tuple(address)
        s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    try:
        s.settimeout(t)
        _tune(s)
        _connect(s, address, t)
        if use_tls:
            s = tls.wrap_client(s, authkey)   # the TLS handshake, within the timeout
        else:
            s.settimeout(None)
    except socket.timeout as exc:
        s.close()
        raise TimeoutError(f"connecting to {address!r} timed out after {t} s") from exc
    except BaseException:
        s.close()
        raise
    conn = TLSConnection(s) if use_tls else BigConnection(s.detach())
    if authkey is not None:
        try:
            handshake_client(conn, authkey, timeout)   # None: the handshake_timeout option
        except BaseException:
            conn.close()
            raise
    return conn


def bind_unix(path: str) -> socket.socket:
    """A unix socket bound at ``path`` that only our user may connect to (0600).

    chmod after bind rather than a umask around it: the umask is process-wide, so changing
    it would race with files other threads create. Until the chmod the socket has the
    umask's mode (under the usual 022 others cannot connect), and bigmp's own paths sit in
    0700 directories anyway.
    """
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_address() -> str:
    """A fresh path for a unix socket in a private temporary directory."""
    d = tempfile.mkdtemp(prefix="bigmp-")
    os.chmod(d, 0o700)
    return os.path.join(d, "sock")

