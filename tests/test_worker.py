"""The worker's launch contract and its orphan-safety layers, driven by hand."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from multiprocessing import managers

import pytest

import bigmp
from bigmp import connection
from bigmp.systems.base import encode_config


@pytest.fixture
def worker():
    procs = []

    def launch(lease=60.0, grace=0.5):
        p = subprocess.Popen([sys.executable, "-m", "bigmp.worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        key = b"k" * 32
        p.stdin.write(encode_config({"name": "w", "authkey": key, "listen": None,
                                     "lease": lease, "grace": grace}))
        p.stdin.flush()
        hello = json.loads(p.stdout.readline())
        return p, hello, key
    yield launch
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _attach(addr, key):
    conn = connection.Client(addr, authkey=key)
    managers.dispatch(conn, None, "accept_bigmp", ("test", {}))
    return conn


def test_handshake_is_one_json_line_with_versions(worker):
    p, hello, key = worker()
    assert hello["pid"] == p.pid
    assert hello["python"] == platform.python_version()
    assert hello["bigmp"] == bigmp.__version__
    assert p.stdout.read(1) == b""   # nothing else ever comes on the handshake channel


def test_exits_when_launcher_channel_closes(worker):
    p, hello, key = worker()
    p.stdin.close()
    assert p.wait(timeout=10) == 0
    assert b"launcher channel closed" in p.stderr.read()


def test_exits_when_driver_connection_closes(worker):
    p, hello, key = worker(lease=600, grace=0.5)
    conn = _attach(hello["addr"], key)
    conn.send(("Supervisor", "keepalive", (600,), {}))
    assert conn.recv()[0] == "#RETURN"
    conn.close()   # the driver's keepalive connection is gone; stdin stays open
    assert p.wait(timeout=10) == 0
    assert b"driver's connection closed" in p.stderr.read()


def test_other_connections_closing_do_not_stop_it(worker):
    p, hello, key = worker(lease=600, grace=0.2)
    for _ in range(3):
        conn = _attach(hello["addr"], key)
        conn.send(("Supervisor", "ping", (), {}))
        assert conn.recv() == ("#RETURN", True)
        conn.close()
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.6)   # bounded wait: proves it did *not* exit after the grace
    conn = _attach(hello["addr"], key)
    conn.send(("Supervisor", "ping", (), {}))
    assert conn.recv() == ("#RETURN", True)
    conn.close()


def test_exits_when_lease_lapses(worker):
    p, hello, key = worker(lease=0.5)
    assert p.wait(timeout=10) == 0
    assert b"lease" in p.stderr.read()
