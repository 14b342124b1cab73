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
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
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
