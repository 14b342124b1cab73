"""Frames on a connection: the stdlib's format, read and written with fewer copies and calls.

A frame is ``!i`` length + pickle, exactly as :mod:`multiprocessing.connection` writes it,
so a stdlib peer can still talk to us. What changes is how we do it:

* reads go through a read-ahead buffer: a small request arrives in one ``read`` call
  (the stdlib needs two: the length, then the body), and big bodies are read straight
  into one buffer of their size;
* each connection keeps its own pickler (the stdlib builds a new one, copying the reducer
  table, for every message);
* between two bigmp ends (``oob`` set once both said so), large buffers travel *out of
  band* (pickle protocol 5): the frame is ``-2``, the pickle, then the raw buffers, written
  with one vectored ``writev`` and read into buffers of their own, so 100 MiB of bytes is
  not copied into and out of a pickle stream;
* frames longer than ``max_frame`` are refused before their body is read (or sent).
"""
from __future__ import annotations

import io
import os
import pickle
import select
import socket
import struct
from multiprocessing import connection as _mpc
from multiprocessing.reduction import ForkingPickler
from typing import Any, List, Optional

import cloudpickle

from . import buffers, config

__all__ = ["BigConnection", "TLSConnection", "FrameTooLarge", "dumps", "loads", "OOB_MIN"]

_HDR = struct.Struct("!i")
_Q = struct.Struct("!Q")
_READ_AHEAD = 65536
OOB_MIN = 1 << 16          # buffers at least this large travel out of band
_OOB_MARK = -2
_IS_BYTES = 1 << 63
# Scalars whose pickle never consults a reducer and never holds a large buffer: a
# message of these (in tuples and dicts) may skip the ForkingPickler (see send_plain).
PLAIN = frozenset((int, float, str, bool, type(None), complex))
_PLAIN_ITEMS = 64           # containers longer than this are not scanned (is_plain)


def _plain_item(x: Any) -> bool:
    t = type(x)
    return t in PLAIN or (t is bytes and len(x) < OOB_MIN)


def is_plain(x: Any) -> bool:
    """Does ``x`` pickle to the same bytes with ``pickle.dumps`` as with the ForkingPickler,
    holding no buffer to send out of band? True for a PLAIN scalar, a bytes under OOB_MIN,
    and an exact tuple, list or dict of at most 64 of those (the C pickler handles these
    types itself, before any reducer table). Anything else: False (the general path)."""
    t = type(x)
    if t in PLAIN:
        return True
    if t is tuple or t is list:
        if len(x) > _PLAIN_ITEMS:
            return False
        for y in x:
            if type(y) not in PLAIN and not _plain_item(y):
                return False
        return True
    if t is dict:
        if len(x) > _PLAIN_ITEMS:
            return False
        for k, v in x.items():
            if not (_plain_item(k) and _plain_item(v)):
                return False
        return True
    return t is bytes and len(x) < OOB_MIN
_pdumps = pickle.dumps
_HUP_EVENTS = select.POLLIN | getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP


class FrameTooLarge(ValueError):
    """A frame is longer than the configured maximum (``max_frame``): never retried."""


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (protocol 5, multiprocessing reducers); cloudpickle what pickle can't name."""
    buf = io.BytesIO()
    try:
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError) as first:
        try:
            return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise first from exc
    return buf.getvalue()


def loads(data: Any) -> Any:
    return pickle.loads(data)


def _bytes_from(buf) -> bytes:
    return buf if type(buf) is bytes else bytes(buf)


class _LargeBytes:
    """Stands in for a large ``bytes`` so its data goes out of band (pickle keeps bytes
    in-band); the receiver gets ``bytes`` again."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol):
        return (_bytes_from, (pickle.PickleBuffer(self.data),))


def _mark_large(obj: Any) -> Any:
    """Wrap large bytes in a message: ``(ident, name, args, kwds)`` or ``(kind, result)``."""
    if type(obj) is not tuple:
        return obj
    found = False
    for x in obj:
        t = type(x)
        if t is bytes:
            if len(x) >= OOB_MIN:
                found = True
                break
        elif t is tuple:
            for y in x:
                if type(y) is bytes and len(y) >= OOB_MIN:
                    found = True
                    break
        elif t is dict:
            for y in x.values():
                if type(y) is bytes and len(y) >= OOB_MIN:
                    found = True
                    break
    if not found:
        return obj
    return tuple(_wrap(x) for x in obj)


def _wrap(x: Any) -> Any:
    t = type(x)
    if t is bytes:
        return _LargeBytes(x) if len(x) >= OOB_MIN else x
    if t is tuple:
        return tuple(_LargeBytes(y) if type(y) is bytes and len(y) >= OOB_MIN else y for y in x)
    if t is dict:
        return {k: _LargeBytes(v) if type(v) is bytes and len(v) >= OOB_MIN else v
                for k, v in x.items()}
    return x


class _Buf:
    """What ``Connection._recv_bytes`` returns (the stdlib's callers use these two)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def getvalue(self) -> bytes:
        return bytes(self.data)

    def getbuffer(self) -> memoryview:
        return memoryview(self.data)


class BigConnection(_mpc.Connection):
    """A :class:`multiprocessing.connection.Connection` with the changes the module lists."""

    max_frame: Optional[int] = None
    oob = False     # both ends are bigmp: large buffers may travel out of band
    # Running totals of pickled payload bytes (frame headers excluded), for bigmp.stats.
    nsent = nrecv = last_recv = 0

    def __init__(self, handle, readable=True, writable=True):
        super().__init__(handle, readable, writable)
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rpos = self._rend = 0
        self.max_frame = config.max_frame()   # read once: the hot path must not parse env
        self._pbuf = io.BytesIO()
        self._pickler: Optional[pickle.Pickler] = None
        self._oob: List[pickle.PickleBuffer] = []
        poller = select.poll()
        poller.register(handle, _HUP_EVENTS)
        self._hup = poller.poll   # see idle_broken

    # -- limits -------------------------------------------------------------------------

    def _limit(self) -> int:
        return self.max_frame if self.max_frame is not None else config.max_frame()

    def _too_large(self, size: int, sending: bool) -> FrameTooLarge:
        limit = self._limit()
        if sending:
            return FrameTooLarge(f"message of {size} bytes is longer than the maximum frame "
                                 f"of {limit} bytes (max_frame / BIGMP_MAX_FRAME)")
        return FrameTooLarge(f"peer sent a frame longer than the maximum of {limit} bytes "
                             "(BIGMP_MAX_FRAME); the connection is closed")

    # -- sending ------------------------------------------------------------------------

    def _pickle(self, obj: Any):
        """(payload, out-of-band buffers); the payload view is valid until the next call."""
        buf = self._pbuf
        buf.seek(0)
        buf.truncate()
        oob = self._oob
        oob.clear()
        if self.oob:
            obj = _mark_large(obj)
            pickler = self._pickler
            if pickler is None:
                pickler = self._pickler = ForkingPickler(buf, 5, True, self._keep)
        else:
            pickler = self._pickler
            if pickler is None:
                pickler = self._pickler = ForkingPickler(buf, 5)
        try:
            pickler.dump(obj)
        except (pickle.PicklingError, AttributeError, TypeError) as first:
            oob.clear()
            try:
                return cloudpickle.dumps(obj, protocol=5), []
            except Exception as exc:
                raise first from exc
        finally:
            pickler.clear_memo()   # the memo must not keep the message alive (buffers.keep)
        found = list(oob)
        oob.clear()
        return buf.getbuffer(), found

    def enable_oob(self) -> None:
        """Both ends are bigmp: send large buffers out of band from now on."""
        self.oob = True
        self._pickler = None

    def send_plain(self, obj: Any) -> None:
        """:meth:`send` for a message the caller knows is only tuples, dicts and
        plain values (:func:`is_plain`): no reducer and no large buffer can be involved, so the C
        pickler's one-call ``dumps`` gives the very bytes the ForkingPickler would, in a
        third of the time (no BytesIO, no dispatch table)."""
        if self._handle is None or not self._writable:
            self._check_closed()
            self._check_writable()
        parts, n = self.encode_plain(obj)
        self.nsent += n
        if len(parts) == 1:
            self._send(parts[0])
        else:
            self._sendv(parts)

    def encode_plain(self, obj: Any) -> tuple:
        """:meth:`encode` for a message of plain values (see :meth:`send_plain`)."""
        payload = _pdumps(obj, 5)
        n = len(payload)
        limit = self.max_frame
        if n > (limit if limit is not None else config.max_frame()):
            raise self._too_large(n, True)
        if n < 16384:
            return [_HDR.pack(n) + payload], n
        if n > 0x7fffffff:
            return [_HDR.pack(-1), _Q.pack(n), payload], n
        return [_HDR.pack(n), payload], n

    def _send_bytes(self, buf) -> None:
        n = len(buf)
        if n > 0x7fffffff:
            self._sendv([_HDR.pack(-1), _Q.pack(n), buf])
        elif n < 16384:
            self._send(_HDR.pack(n) + bytes(buf))
        else:
            self._sendv([_HDR.pack(n), buf])   # one writev, not two writes

    def _keep(self, pb: pickle.PickleBuffer):
        raw = pb.raw()
        if raw.nbytes < OOB_MIN:
            return True    # small: in band after all
        self._oob.append(raw)
        return False

    def send(self, obj: Any) -> None:
        self._check_closed()
        self._check_writable()
        payload, buffers = self._pickle(obj)
        try:
            size = len(payload) + sum(b.nbytes for b in buffers)
            if size > self._limit():
                raise self._too_large(size, True)
            self.nsent += size
            if buffers:
                # Each length's top bit says "this buffer was a bytes object": the reader
                # then fills a bytes object directly (see bigmp.buffers).
                head = [_HDR.pack(_OOB_MARK), struct.pack("!I", len(buffers) + 1),
                        _Q.pack(len(payload))] + \
                    [_Q.pack(b.nbytes | (_IS_BYTES if type(b.obj) is bytes else 0))
                     for b in buffers]
                self._sendv([b"".join(head), payload] + buffers)
            else:
                self._send_bytes(payload)
        finally:
            if isinstance(payload, memoryview):
                payload.release()

    def encode(self, obj: Any) -> tuple:
        """(the buffers of ``obj``'s frame, its payload size), to send later with
        :meth:`send_encoded` (the caller serialises calls to encode)."""
        payload, buffers = self._pickle(obj)
        try:
            size = len(payload) + sum(b.nbytes for b in buffers)
            if size > self._limit():
                raise self._too_large(size, True)
            if buffers:
                head = [_HDR.pack(_OOB_MARK), struct.pack("!I", len(buffers) + 1),
                        _Q.pack(len(payload))] + \
                    [_Q.pack(b.nbytes | (_IS_BYTES if type(b.obj) is bytes else 0))
                     for b in buffers]
                return [b"".join(head), bytes(payload)] + buffers, size
            if size > 0x7fffffff:
                return [_HDR.pack(-1), _Q.pack(size), bytes(payload)], size
            return [_HDR.pack(len(payload)) + bytes(payload)], size
        finally:
            if isinstance(payload, memoryview):
                payload.release()

    def send_encoded(self, parts: List[Any], size: int) -> None:
        """Write frames made by :meth:`encode` (one ``writev`` for all of them)."""
        self._check_closed()
        self.nsent += size
        self._sendv(parts)

    def _sendv(self, parts: List[Any]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        fd = self._handle
        while views:
            n = os.writev(fd, views[:1024])
            while n:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    # -- receiving ----------------------------------------------------------------------
    # A fixed read-ahead buffer: bytes [_rpos, _rend) of _rbuf are read but not consumed.

    def _read_into(self, view: memoryview) -> int:
        return os.readv(self._handle, [view])

    def _fill(self, n: int) -> None:
        """Have at least ``n`` unconsumed bytes in the read-ahead buffer."""
        have = self._rend - self._rpos
        if have >= n:
            return
        rbuf = self._rbuf
        if self._rpos + n > len(rbuf):
            # Move what is left to the front (n <= _READ_AHEAD: it then fits).
            rbuf[:have] = rbuf[self._rpos:self._rend]
            self._rpos, self._rend = 0, have
        view = self._rview
        while self._rend - self._rpos < n:
            got = self._read_into(view[self._rend:])
            if got == 0:
                if self._rend == self._rpos:
                    raise EOFError
                raise OSError("got end of file during message")
            self._rend += got

    def _take(self, n: int):
        """The next ``n`` bytes: a view into the read-ahead buffer when they fit (valid
        until the next read), else a buffer of their own filled straight from the socket."""
        if n <= _READ_AHEAD:
            self._fill(n)
            start = self._rpos
            self._rpos += n
            if self._rpos == self._rend:
                self._rpos = self._rend = 0
            return self._rview[start:start + n]
        out, view = buffers.fresh_bytearray(n)
        self._fill_view(view)
        buffers.keep(out)   # a pickle's bytes: garbage once loaded, reusable next time
        return out

    def _fill_view(self, view: memoryview) -> None:
        """Fill ``view``: first from the read-ahead buffer, then straight from the socket."""
        n = len(view)
        have = min(n, self._rend - self._rpos)
        view[:have] = self._rview[self._rpos:self._rpos + have]
        self._rpos += have
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        pos = have
        while pos < n:
            got = self._read_into(view[pos:])
            if got == 0:
                raise OSError("got end of file during message")
            pos += got

    def _frame_size(self) -> int:
        self._fill(4)
        size, = _HDR.unpack_from(self._rbuf, self._rpos)
        self._rpos += 4
        if size == -1:
            self._fill(8)
            size, = _Q.unpack_from(self._rbuf, self._rpos)
            self._rpos += 8
        return size

    def _recv_bytes(self, maxsize=None):
        size = self._frame_size()
        if size < 0 or (maxsize is not None and size > maxsize):
            return None
        return _Buf(bytes(self._take(size)))

    def recv(self) -> Any:
        if self._handle is None or not self._readable:
            self._check_closed()
            self._check_readable()
        # The common case inline: a small frame that is (or, after one read, will be)
        # whole in the read-ahead buffer.
        pos = self._rpos
        if self._rend - pos < 4:
            self._fill(4)
            pos = self._rpos
        size, = _HDR.unpack_from(self._rbuf, pos)
        if 0 <= size <= _READ_AHEAD - 4:
            limit = self.max_frame
            if size > (limit if limit is not None else config.max_frame()):
                raise self._too_large(size, False)
            if self._rend - pos < 4 + size:
                self._fill(4 + size)
                pos = self._rpos
            start = pos + 4
            end = start + size
            if end == self._rend:
                self._rpos = self._rend = 0
            else:
                self._rpos = end
            self.last_recv = size
            self.nrecv += size
            return pickle.loads(self._rview[start:end])
        size = self._frame_size()
        if size == _OOB_MARK:
            return self._recv_oob()
        if size < 0 or size > self._limit():
            raise self._too_large(size, False)
        self.last_recv = size
        self.nrecv += size
        return pickle.loads(self._take(size))

    def _recv_oob(self) -> Any:
        self._fill(4)
        count, = struct.unpack_from("!I", self._rbuf, self._rpos)
        self._rpos += 4
        raw = [_Q.unpack(self._take(8))[0] for _ in range(count)]
        lengths = [n & ~_IS_BYTES for n in raw]
        if sum(lengths) > self._limit():
            raise self._too_large(sum(lengths), False)
        payload = bytes(self._take(lengths[0]))
        buffers = [self._take_own(n, bool(r & _IS_BYTES)) for n, r in zip(lengths[1:], raw[1:])]
        self.last_recv = n = sum(lengths)
        self.nrecv += n
        return pickle.loads(payload, buffers=buffers)

    def _take_own(self, n: int, as_bytes: bool = False):
        """The next ``n`` bytes in a buffer of their own (it outlives the next read):
        a ``bytes`` object when the sender's was one, else a writable bytearray."""
        obj, view = buffers.fresh_bytes(n) if as_bytes else buffers.fresh_bytearray(n)
        self._fill_view(view)
        view.release()
        buffers.keep(obj)
        return obj

    def _poll(self, timeout):
        if self._rend > self._rpos:
            return True   # read ahead already: the fd would not say so
        return super()._poll(timeout)

    def idle_broken(self) -> bool:
        """For a connection between calls: has the peer hung up (or sent what nobody asked
        for)? One poll(2) with no wait, ~0.3 us; a pooled connection cut while idle is then
        not used for a call that would fail."""
        return self._rend > self._rpos or bool(self._hup(0))

    def read_some(self) -> None:
        """One read into the read-ahead buffer (call when the fd is readable)."""
        have = self._rend - self._rpos
        if self._rend == len(self._rbuf):
            self._rbuf[:have] = self._rbuf[self._rpos:self._rend]
            self._rpos, self._rend = 0, have
        got = self._read_into(self._rview[self._rend:])
        if got == 0:
            raise EOFError
        self._rend += got

    def frame_ready(self) -> bool:
        """Can :meth:`recv` return without reading more? (True also for frames too big for
        the buffer: recv then reads them itself.)"""
        have = self._rend - self._rpos
        if have < 4:
            return False
        size, = _HDR.unpack_from(self._rbuf, self._rpos)
        return size < 0 or size > _READ_AHEAD - 4 or have >= 4 + size

    def shutdown(self) -> None:
        """Wake any thread blocked on this connection (it sees EOF) without closing the fd."""
        try:
            s = socket.socket(fileno=os.dup(self.fileno()))
        except OSError:
            return
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            s.close()


class TLSConnection(BigConnection):
    """A BigConnection over an :class:`ssl.SSLSocket` (remote machines)."""

    def __init__(self, sock):
        import ssl   # loaded already: sock is an SSLSocket (machines without TLS never pay)
        self._sock = sock
        self._eof = ssl.SSLEOFError
        super().__init__(sock.fileno())

    # Reads and writes go to the SSLSocket's SSL object itself when it has one: the
    # SSLSocket methods around it (closed checks, flag checks, the sendall loop) cost ~3 us
    # of a ~17 us round trip. What those wrappers add is kept: a ragged EOF reads as 0.

    def _send(self, buf, write=None):
        ssl_obj = self._sock._sslobj
        if ssl_obj is None:
            self._sock.sendall(buf)    # closed (or never wrapped): it raises the right error
            return
        view = memoryview(buf).cast("B")
        sent, n = 0, len(view)
        while sent < n:
            sent += ssl_obj.write(view[sent:] if sent else view)

    def _sendv(self, parts: List[Any]) -> None:
        for p in parts:
            self._send(p)

    def _read_into(self, view: memoryview) -> int:
        ssl_obj = self._sock._sslobj
        if ssl_obj is None:
            return self._sock.recv_into(view)
        try:
            return ssl_obj.read(len(view), view)
        except self._eof:
            return 0

    def _poll(self, timeout):
        if self._rend > self._rpos or self._sock.pending():
            return True   # decrypted or read-ahead bytes waiting: the fd would not say so
        return bool(_mpc.wait([self._sock], timeout))

    def _close(self, _close=None):
        self._sock.close()

    def settimeout(self, timeout: Optional[float]) -> None:
        self._sock.settimeout(timeout)
