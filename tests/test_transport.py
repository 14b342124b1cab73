"""Transport: NODELAY, timeouts, frame caps and bad input never hang a caller or kill a server."""
from __future__ import annotations

import os
import socket
import struct
import threading

import psutil
import pytest
from multiprocessing import AuthenticationError

import bigmp
from bigmp import connection
from bigmp.server import BigServer
from tests.conftest import wait_until


class Thing:
    def echo(self, x):
        return x

    def big(self, n):
        return "y" * n


@pytest.fixture
def server():
    srv = BigServer({}, ("127.0.0.1", 0), b"secret-key", "pickle", name="test-server")
    srv.install("Thing", Thing())
    t = threading.Thread(target=srv.serve_until_stopped, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(5)


def call(address, authkey=b"secret-key", x=1):
    from multiprocessing import managers
    conn = connection.Client(address, authkey=authkey)
    try:
        managers.dispatch(conn, None, "accept_bigmp", ("t", {"stream": True}))
        conn.send(("Thing", "echo", (x,), {}))
        kind, result = conn.recv()
        assert kind == "#RETURN"
        return result
    finally:
        conn.close()


def test_tcp_connections_set_nodelay(server):
    conn = connection.Client(server.address, authkey=b"secret-key")
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        s.close()
    finally:
        conn.close()


def test_connect_timeout_to_a_silent_listener():
    # A socket that listens but never accepts: the handshake must time out, not hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(TimeoutError):
            connection.Client(silent.getsockname(), authkey=b"k", timeout=0.3)
    finally:
        silent.close()


def test_connection_refused_is_immediate():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()
    with pytest.raises(ConnectionRefusedError):
        connection.Client(addr, authkey=b"k", timeout=5)


def test_wrong_authkey_is_rejected_and_server_keeps_serving(server):
    with pytest.raises(AuthenticationError):
        connection.Client(server.address, authkey=b"wrong")
    assert call(server.address) == 1


def _threads_and_fds():
    p = psutil.Process()
    return p.num_threads(), p.num_fds()


@pytest.mark.parametrize("garbage", [
    os.urandom(64),                                   # random bytes
    struct.pack("!i", 1000) + b"short",               # truncated frame
    struct.pack("!i", 0x7FFFFFF0),                    # absurd length before auth
    b"",                                              # connect and hang up
])
def test_garbage_before_auth_is_dropped(server, garbage):
    assert call(server.address) == 1
    before = _threads_and_fds()
    for _ in range(20):
        s = socket.create_connection(server.address)
        try:
            if garbage:
                s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1024):   # the server's challenge, if any, then its hang-up
                pass
        except OSError:
            pass                  # it may hang up first: that is a fine answer too
        s.close()
    assert call(server.address, x=2) == 2
    wait_until(lambda: _threads_and_fds() <= (before[0], before[1]), timeout=10,
               what="server threads and fds to return to their level")


def test_frame_beyond_maximum_after_auth_is_refused(server, monkeypatch):
    monkeypatch.setenv("BIGMP_MAX_FRAME", "1000")
    from multiprocessing import managers
    conn = connection.Client(server.address, authkey=b"secret-key")
    managers.dispatch(conn, None, "accept_bigmp", ("t", {}))
    conn._send(struct.pack("!i", 10 ** 9))   # announce 1 GB, send nothing more
    kind, err = conn.recv()
    assert kind == "#ERROR"
    assert isinstance(err, connection.FrameTooLarge) and "maximum of 1000" in str(err)
    with pytest.raises(EOFError):
        conn.recv()
    conn.close()
    monkeypatch.delenv("BIGMP_MAX_FRAME")
    assert call(server.address, x=3) == 3


def test_client_refuses_oversized_frame(monkeypatch):
    a, b = socket.socketpair()
    ca, cb = connection.BigConnection(a.detach()), connection.BigConnection(b.detach())
    ca.max_frame, cb.max_frame = 10 ** 6, 100
    ca.send(b"x" * 1000)
    with pytest.raises(connection.FrameTooLarge, match="BIGMP_MAX_FRAME"):
        cb.recv()
    ca.close()
    cb.close()


def test_oversized_argument_is_refused_before_sending_and_not_retried():
    with bigmp.start(max_frame=100_000) as b:
        m = b.start(1, services={"T": Thing()})[0]
        with pytest.raises(connection.FrameTooLarge, match="max_frame"):
            m.retry_call("T.echo", b"x" * 200_000, deadline=30)
        assert m.call("T.echo", b"y" * 1000) == b"y" * 1000


def test_an_oversized_async_call_or_reply_fails_alone():
    """Plain async calls (and replies) travel pickled together: one too large for the
    frame cap must fail by itself, not take the calls batched with it along."""
    with bigmp.start(max_frame=100_000) as b:
        m = b.start(1, services={"T": Thing()})[0]
        m.call("T.echo", 0)      # RUNNING: the next call_async starts dialing the mux
        wait_until(lambda: m.call_async("T.echo", 0).result(timeout=30) == 0 and
                   m._mux is not None, 30, what="the mux channel")
        futs = [m.call_async("T.echo", "x" * 200_000) if i == 5 else
                m.call_async("T.big", 200_000) if i == 9 else m.call_async("T.echo", i)
                for i in range(40)]
        with pytest.raises(connection.FrameTooLarge, match="max_frame"):
            futs[5].result(timeout=30)
        with pytest.raises(connection.FrameTooLarge):
            futs[9].result(timeout=30)
        assert [f.result(timeout=30) for i, f in enumerate(futs) if i not in (5, 9)] == \
            [i for i in range(40) if i not in (5, 9)]
        assert m.call("T.echo", "still fine") == "still fine"


def test_deeply_recursive_argument_is_an_error_not_a_crash(server):
    nested = []
    for _ in range(100000):
        nested = [nested]
    with pytest.raises(RecursionError):
        call(server.address, x=nested)
    assert call(server.address, x=4) == 4


@pytest.mark.parametrize("value", [
    b"\x00\x01" * (1 << 20),                       # large bytes: out of band, back as bytes
    bytearray(os.urandom(1 << 18)),               # large bytearray: out of band, writable
    (b"a" * 100000, {"k": b"b" * 70000}, "small"),
    [b"c" * 100000],                               # inside a list: in band, still exact
])
def test_large_buffers_round_trip_exactly(value):
    with bigmp.start() as b:
        m = b.start(1, services={"T": Thing()})[0]
        got = m.call("T.echo", value)
        assert got == value and type(got) is type(value)
        if isinstance(got, bytearray):
            got[0] ^= 1   # writable, as a bytearray must be
        if isinstance(got, tuple):
            assert type(got[0]) is bytes and type(got[1]["k"]) is bytes


def _pair():
    a, b = socket.socketpair()
    return connection.BigConnection(a.detach()), connection.BigConnection(b.detach())


def test_send_plain_writes_the_frame_send_writes():
    ca, cb = _pair()
    try:
        for oob in (False, True):       # before and after both ends said they are bigmp
            if oob:
                ca.enable_oob()
            for msg in [("Echo", "echo", (1, 2.5, "x" * 20000, None, True, 3j), {}),
                        ("#RETURN", "y" * 70000), ("#RETURN", None),
                        ("Echo", "echo", ([1, "a", b"b" * 100], {"k": 1.5, b"x": None}),
                         {"kw": (1, 2)}),
                        ("#RETURN", [b"z" * 65535, "s", 7])]:
                ca.send_plain(msg)
                plain = os.read(cb.fileno(), 1 << 20)
                ca.send(msg)
                assert os.read(cb.fileno(), 1 << 20) == plain
    finally:
        ca.close()
        cb.close()


def test_is_plain_takes_only_what_pickles_alike_without_large_buffers():
    from bigmp.wire import OOB_MIN, is_plain

    class Str(str):
        pass
    yes = [1, 2.5, "s", None, True, 1j, b"x" * (OOB_MIN - 1), (1, "a"), [None] * 64,
           {"a": 1, b"b": b"c"}, (), [], {}]
    no = [b"x" * OOB_MIN, [b"x" * OOB_MIN], {"k": b"x" * OOB_MIN}, [1] * 65, ((1,),),
          [[1]], {"k": [1]}, Str("s"), [Str("s")], bytearray(b"x"), object(), {1, 2},
          (1, object())]
    assert all(is_plain(x) for x in yes)
    assert not any(is_plain(x) for x in no)


def test_send_plain_refuses_an_oversized_frame_before_writing():
    ca, cb = _pair()
    try:
        ca.max_frame = 100
        with pytest.raises(connection.FrameTooLarge, match="max_frame"):
            ca.send_plain(("#RETURN", "z" * 1000))
        ca.send_plain(("#RETURN", 7))
        assert cb.recv() == ("#RETURN", 7)   # nothing of the refused frame was written
    finally:
        ca.close()
        cb.close()


class _Trickle(connection.BigConnection):
    """Reads at most ``step`` bytes at a time: frames arrive in pieces, deterministically."""

    step = 1

    def _read_into(self, view):
        return super()._read_into(view[:self.step])


@pytest.mark.parametrize("step", [1, 3, 1000, 1 << 20])
@pytest.mark.parametrize("size", [0, 1, 100, 65513, 65514, 65515, 65536, 70000])
def test_frames_arriving_in_pieces_are_read_whole(size, step):
    """The read-ahead fast path around its edges: header and body split across reads,
    several frames in one read, bodies of 65531-65533 bytes (the read-ahead buffer is
    65536: the fast path takes up to 65532), and larger ones."""
    import pickle
    a, b = socket.socketpair()
    ca, cb = connection.BigConnection(a.detach()), _Trickle(b.detach())
    cb.step = step
    try:
        payload = b"p" * size
        body = pickle.dumps(payload, 5)
        stream = (struct.pack("!i", len(body)) + body) * 3
        writer = threading.Thread(target=os.write, args=(ca.fileno(), stream))
        writer.start()   # 3 frames may exceed the socket buffer: write while reading
        assert [cb.recv() for _ in range(3)] == [payload] * 3
        writer.join(10)
    finally:
        ca.close()
        cb.close()


def test_idle_broken_tells_a_cut_connection_from_a_live_one():
    ca, cb = _pair()
    other_a, other_b = _pair()
    try:
        assert not ca.idle_broken()               # live and quiet: usable
        cb.close()
        assert ca.idle_broken()                   # the peer hung up while it sat idle
        other_b.send(("#RETURN", "unasked"))
        assert other_a.idle_broken()              # data nobody asked for: out of step
    finally:
        for c in (ca, other_a, other_b):
            c.close()
