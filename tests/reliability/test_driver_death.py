"""The driver SIGKILLed with 8 machines running: no machine process is left, every time."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT
from tests.reliability.conftest import gone, ssh_available

ROUNDS = {"testing": 20, "ssh": 3}
MACHINES = 8

DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import bigmp
    from tests.services import Echo
    b = bigmp.start(**{options!r})
    ms = b.start({n}, services={{"Echo": Echo()}})
    print(" ".join(str(m.call("Echo.pid", timeout=60)) for m in ms), flush=True)
    sys.stdin.read()
""")


def _one_round(options, timeout):
    """Start a driver with MACHINES machines, SIGKILL it; return seconds until none is left."""
    code = DRIVER.format(root=ROOT, options=options, n=MACHINES)
    driver = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        line = driver.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == MACHINES, f"driver printed {line!r}"
        assert not any(gone(p) for p in pids)
        t0 = time.monotonic()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        while not all(gone(p) for p in pids):
            if time.monotonic() - t0 > timeout:
                left = [p for p in pids if not gone(p)]
                raise AssertionError(f"machines {left} still running {timeout:g} s after "
                                     "their driver was SIGKILLed")
            time.sleep(0.005)
        return time.monotonic() - t0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


@pytest.fixture(params=["testing", "ssh"])
def driver_options(request):
    if request.param == "ssh":
        if not ssh_available():
            pytest.skip("openssh-server is not installed")
        sshd = request.getfixturevalue("sshd")
        return "ssh", dict(sshd.options(), keepalive_lease=5.0)
    # The testing system's defaults: lease 5 s, keepalive timeout 2 s.
    return "testing", {"system": "testing"}


def test_driver_sigkill_leaves_no_machine(driver_options, figures):
    kind, options = driver_options
    lease = options.get("keepalive_lease", 5.0)
    # The configured bound: the lease, the layer of last resort. The launcher channel
    # (the fork server's pipe, the SSH session) normally ends them far sooner.
    bound = lease + 5.0
    times = [_one_round(options, bound) for _ in range(ROUNDS[kind])]
    figures.add(f"driver SIGKILL [{kind}]",
                f"{len(times)}/{ROUNDS[kind]} rounds x {MACHINES} machines: no process left; "
                f"time to the last exit median {statistics.median(times) * 1000:.0f} ms, "
                f"max {max(times) * 1000:.0f} ms (bound: lease {lease:g} s + 5 s)")
