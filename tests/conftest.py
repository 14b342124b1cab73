"""Shared fixtures: the contract suite runs once per backend listed in BACKENDS."""
from __future__ import annotations

import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Each backend: the keyword options given to bigmp.start. SSH, EC2 and the testing system
# join this list when they land; every backend must pass the same contract tests.
BACKENDS = {
    "local-fork": {"system": "local", "local_mode": "fork"},
    "local-spawn": {"system": "local", "local_mode": "spawn"},
    "ssh": None,   # filled in from the sshd fixture: a real OpenSSH server on loopback
    "testing": {"system": "testing"},   # local machines behind fault-injecting relays
}


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH sshd on 127.0.0.1-4 (skips when openssh-server is not installed)."""
    from tests.sshd import SSHD
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server is not installed (tests/system-deps.sh installs it)")
    server = SSHD(str(tmp_path_factory.mktemp("sshd")))
    yield server
    server.stop()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    if request.param == "ssh":
        return request.getfixturevalue("sshd").options()
    return dict(BACKENDS[request.param])


@pytest.fixture
def session(backend):
    import bigmp
    b = bigmp.start(**backend)
    yield b
    b.shutdown()


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
