"""The driver's side of the bootstrap exchange over a local subprocess (PopenChannel),
as the Slurm backend runs it (``srun ... python -c BOOT``), without SSH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from multiprocessing import managers

import pytest

import bigmp
from bigmp import connection
from bigmp.systems.base import read_handshake
from bigmp.systems.bootstrap import Bootstrap, HostCache, PopenChannel

KEY = b"k" * 32


def _config(name="w"):
    return {"name": name, "authkey": KEY, "listen": None, "lease": 60.0, "grace": 0.5,
            "environ": dict(os.environ)}


@pytest.fixture
def popen():
    procs = []

    def open_channel(argv):
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        procs.append(p)
        return PopenChannel(p, where="local test")
    yield open_channel, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_popen_channel_launches_a_worker_and_uploads_once(popen, tmp_path):
    open_channel, procs = popen
    boot = Bootstrap(str(tmp_path / "cache"))
    cache = HostCache()
    launches = []
    for i in range(2):
        launch = boot.launch(f"w{i}", _config(f"w{i}"), open_channel, python=sys.executable,
                             cache=cache, timeout=60)
        launches.append(launch)
        hello = json.loads(read_handshake(launch.handshake, 60))
        assert hello["pid"] == launch.pid == procs[i].pid   # the bootstrap became the worker
        assert hello["name"] == f"w{i}"
        conn = connection.Client(hello["addr"], authkey=KEY)
        managers.dispatch(conn, None, "accept_bigmp", ("test", {}))
        conn.close()
    assert len(cache.known) == 1   # the bundle's hash
    assert len([d for d in os.listdir(tmp_path / "cache") if d.startswith("code-")]) == 1
    for launch in launches:
        done = threading.Event()
        launch.on_exit(lambda code: done.set())
        launch.close_control()   # EOF on stdin: the worker exits
        assert done.wait(30)
        assert launch.returncode == 0
        os.close(launch.handshake)
        os.close(launch.output)


def test_popen_channel_reports_a_bootstrap_that_fails(popen, tmp_path):
    open_channel, _ = popen
    boot = Bootstrap(str(tmp_path / "cache"))

    def broken(argv):   # an interpreter that dies at once, saying why
        return open_channel([sys.executable, "-c",
                             "import sys; sys.stderr.write('no room'); sys.exit(5)"])
    with pytest.raises(bigmp.StartError, match="exited with status 5: no room"):
        boot.launch("w", _config(), broken, python=sys.executable, cache=HostCache(),
                    timeout=30)


def test_popen_channel_reports_a_python_mismatch(popen, tmp_path):
    open_channel, procs = popen
    boot = Bootstrap(str(tmp_path / "cache"))
    boot.python_version = "3.99"
    with pytest.raises(bigmp.StartError, match="install Python 3.99 there"):
        boot.launch("w", _config(), open_channel, python=sys.executable, cache=HostCache(),
                    timeout=30)
    assert procs[0].wait(10) != 0   # the bootstrap gave up too
