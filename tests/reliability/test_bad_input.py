"""Bad input: each gives a clear error, and the machine keeps serving with no growth in its
open fds or threads (measured on the machine's process)."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError, managers

import pytest

import bigmp
import bigmp.testing as bt
from bigmp import State, connection
from tests.reliability._services import Gate, Payloads
from tests.reliability.conftest import settle, usage
from tests.services import Echo

MAX_FRAME = 1_000_000
REPEAT = 20


@pytest.fixture(params=["testing"])
def machine(request):
    with bt.start(max_frame=MAX_FRAME) as b:
        m = b.start(1, services={"Echo": Echo(), "P": Payloads(), "G": Gate()})[0]
        assert m.wait(State.RUNNING, timeout=30) == State.RUNNING
        yield m


def _measured(m, figures, name, action, repeat=REPEAT):
    """Run ``action`` ``repeat`` times; the machine must still answer, and its fds and
    threads must come back to where they were. Return what the last action returned."""
    assert m.call("P.echo", "before") == "before"   # one pooled connection, as after
    pid = m.pid
    before = usage(pid)
    out = None
    for _ in range(repeat):
        out = action()
    assert m.call("P.echo", "after") == "after"
    after = settle(pid, before)
    figures.add(f"bad input: {name}",
                f"x{repeat} -> {out}; machine still serving; fds {before[0]} -> {after[0]}, "
                f"threads {before[1]} -> {after[1]}")
    return out


def _addr(m):
    return bt.system(m).machine_address(m)   # the machine itself, not its relay


def _raw(m):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(_addr(m))
    return s


def _send_and_hang_up(m, data):
    """Send ``data`` on a fresh, unauthenticated connection; return what the server did."""
    s = _raw(m)
    got = b""
    try:
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(4096)    # the challenge, if any, then the server's hang-up
            if not chunk:
                return "server hung up" + (" after its challenge" if got else "")
            got += chunk
    except OSError as exc:
        return f"server reset the connection ({type(exc).__name__})"
    finally:
        s.close()


def _authenticated(m):
    conn = connection.Client(_addr(m), authkey=m._b.authkey)
    managers.dispatch(conn, None, "accept_bigmp", ("bad-input", {"stream": True}))
    return conn


def _error_of(fn):
    try:
        fn()
    except BaseException as exc:   # what the caller sees is the figure
        return exc
    raise AssertionError("no error")


def _short(exc):
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}({text[:90]!r})"


# -- before authentication --------------------------------------------------------------

def test_wrong_authkey(machine, figures):
    def action():
        exc = _error_of(lambda: connection.Client(_addr(machine), authkey=b"w" * 32))
        assert isinstance(exc, AuthenticationError) and "rejected" in str(exc)
        return _short(exc)
    _measured(machine, figures, "wrong authkey", action)


@pytest.mark.parametrize("name,data", [
    ("random bytes", os.urandom(64)),
    ("truncated frame before auth", struct.pack("!i", 1000) + b"short"),
    ("absurd frame length before auth", struct.pack("!i", 0x7FFFFFF0)),
    ("connect and hang up", b""),
])
def test_garbage_before_authentication(machine, figures, name, data):
    _measured(machine, figures, name, lambda: _send_and_hang_up(machine, data))


# -- after authentication: raw frames ----------------------------------------------------

def test_truncated_frame_after_auth(machine, figures):
    def action():
        conn = _authenticated(machine)
        os.write(conn.fileno(), struct.pack("!i", 1000) + b"short")
        conn.close()
        return "connection closed by the sender; the server thread ended"
    _measured(machine, figures, "truncated frame after auth", action)


def test_malformed_async_requests(machine, figures):
    """The multiplexed channel: garbage requests, alone or inside a batch frame beside
    good ones, are dropped (no call id to answer); the good ones are answered."""
    def action():
        conn = connection.Client(_addr(machine), authkey=machine._b.authkey)
        managers.dispatch(conn, None, "accept_mux", ("bad-input",))
        conn.enable_oob()
        for bad in (7, None, "x", (), [], [1, "junk", (2, "P", "echo", ("ok",), {}), 3.5]):
            conn.send(bad)
        conn.send((9, "P", "echo", ("last",), {}))
        got = {}
        while len(got) < 2:
            reply = conn.recv()
            for call_id, kind, value in reply if type(reply) is list else [reply]:
                got[call_id] = (kind, value)
        conn.close()
        assert got == {2: ("#RETURN", "ok"), 9: ("#RETURN", "last")}
        return "garbage dropped, the two good calls in between answered"
    _measured(machine, figures, "malformed async (mux) requests", action, repeat=5)


@pytest.mark.parametrize("name,header", [
    ("frame length beyond max_frame", struct.pack("!i", 10 ** 9)),
    ("8-byte frame length of 1 TiB", struct.pack("!i", -1) + struct.pack("!Q", 1 << 40)),
    ("out-of-band frame announcing 1 TiB",
     struct.pack("!iI", -2, 2) + struct.pack("!QQ", 100, 1 << 40)),
])
def test_frame_beyond_the_maximum(machine, figures, name, header):
    def action():
        conn = _authenticated(machine)
        try:
            os.write(conn.fileno(), header)   # and nothing more: nothing is allocated
            kind, err = conn.recv()
            assert kind == "#ERROR" and isinstance(err, connection.FrameTooLarge)
            assert f"maximum of {MAX_FRAME}" in str(err)
            with pytest.raises(EOFError):
                conn.recv()                   # then it hangs up: the stream is out of sync
            return _short(err) + " then hang-up"
        finally:
            conn.close()
    _measured(machine, figures, name, action)


def test_deeply_nested_request_pickle(machine, figures):
    depth = 200_000
    # ("P", "length", (nested,), {}) with nested 200k lists deep, written by hand: the
    # unpickler builds it without recursion, the method sees an ordinary list.
    nested = b"]" * depth + b"a" * (depth - 1)
    payload = (pickle.PROTO + b"\x04" + pickle.MARK + pickle.SHORT_BINUNICODE + b"\x01P"
               + pickle.SHORT_BINUNICODE + b"\x06length" + nested + pickle.TUPLE1
               + pickle.EMPTY_DICT + pickle.TUPLE + pickle.STOP)

    def action():
        conn = _authenticated(machine)
        try:
            conn.send_bytes(payload)
            kind, result = conn.recv()
            assert (kind, result) == ("#RETURN", 1)
            return f"served: len() of a {depth}-deep list = {result}"
        finally:
            conn.close()
    _measured(machine, figures, "deeply nested request (raw pickle)", action, repeat=5)


# -- through the driver's API ------------------------------------------------------------

def test_argument_beyond_max_frame_is_refused_before_sending(machine, figures):
    def action():
        exc = _error_of(lambda: machine.call("P.length", b"x" * (2 * MAX_FRAME)))
        assert isinstance(exc, connection.FrameTooLarge) and "max_frame" in str(exc)
        return _short(exc)
    _measured(machine, figures, "argument beyond max_frame", action)


def test_result_beyond_max_frame(machine, figures):
    def action():
        exc = _error_of(lambda: machine.call("P.sized", 2 * MAX_FRAME))
        assert isinstance(exc, bigmp.BigmpError) and "maximum frame" in str(exc)
        return _short(exc)
    _measured(machine, figures, "result beyond max_frame", action)


@pytest.mark.parametrize("name,call,expect,text", [
    ("unpicklable argument", ("Echo.echo", threading.Lock()), TypeError, "pickle"),
    ("unpicklable result", ("Echo.unpicklable_result",), TypeError, "could not be pickled"),
    ("unpicklable exception", ("Echo.unpicklable_error",), bigmp.RemoteError,
     "could not be pickled"),
    ("exception whose unpickling fails", ("Echo.bad_unpickle_error",), bigmp.RemoteError,
     "a-b"),
    ("unknown service", ("Nope.echo", 1), bigmp.UnknownService, "services: "),
    ("unknown method", ("Echo.nope",), bigmp.UnknownMethod, "methods: "),
    ("private method", ("Echo._private",), bigmp.UnknownMethod, "methods: "),
    ("deeply recursive argument", ("P.length", "DEEP"), RecursionError, "recursion"),
    ("deeply recursive result", ("P.deep", 100_000), bigmp.BigmpError, "recursion"),
])
def test_bad_calls(machine, figures, name, call, expect, text):
    method, *args = call
    if args == ["DEEP"]:
        args = [Payloads().deep(100_000)]

    def action():
        exc = _error_of(lambda: machine.call(method, *args, timeout=60))
        assert isinstance(exc, expect), repr(exc)
        assert text in str(exc), str(exc)
        return _short(exc)
    _measured(machine, figures, name, action, repeat=5 if "deep" in name else REPEAT)


def test_method_that_never_returns(machine, figures):
    """The caller's timeout fires; the method's thread (and its connection's fd) are held
    until the method returns: bigmp does not cancel a running method."""
    m = machine
    assert m.call("P.echo", "before") == "before"
    before = usage(m.pid)
    t0 = time.monotonic()
    for i in range(5):
        with pytest.raises(TimeoutError):
            m.call("G.block", i, timeout=0.2)
    took = (time.monotonic() - t0) / 5
    assert m.call("G.entered") == 5
    held = usage(m.pid)
    assert m.call("P.echo", "meanwhile") == "meanwhile"
    m.call("G.release")
    after = settle(m.pid, before)
    figures.add("bad input: method that never returns",
                f"x5 -> TimeoutError after {took * 1000:.0f} ms each (timeout 200 ms); held "
                f"meanwhile: fds {before[0]} -> {held[0]}, threads {before[1]} -> {held[1]} "
                f"(one each per blocked call, no cancellation); once it returns: fds "
                f"{after[0]}, threads {after[1]}")


@pytest.mark.parametrize("system", ["testing"])
def test_call_after_shutdown(system, figures):
    with bt.start() as b:
        m, one = b.start(2, services={"P": Payloads()})
        assert m.call("P.echo", 1) == 1 and one.call("P.echo", 1) == 1
        one.shutdown()
        t0 = time.monotonic()
        with pytest.raises(bigmp.MachineStopped, match="shut down"):
            one.call("P.echo", 2, timeout=30)
        single = time.monotonic() - t0
        assert m.call("P.echo", 3) == 3
    t0 = time.monotonic()
    with pytest.raises(bigmp.MachineStopped, match="stopped"):
        m.call("P.echo", 4, timeout=30)
    session = time.monotonic() - t0
    with pytest.raises(RuntimeError, match="shut down"):
        b.start(1)
    figures.add("bad input: call after shutdown",
                f"MachineStopped in {single * 1e3:.2f} ms after Machine.shutdown (the other "
                f"machine kept serving), in {session * 1e3:.2f} ms after the session's "
                "shutdown; b.start then raises RuntimeError")
