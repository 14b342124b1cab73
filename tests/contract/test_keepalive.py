"""Keepalive and orphan safety: machines never outlive their driver for long."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import bigmp
from bigmp import State
from tests.conftest import ROOT, wait_until
from tests.services import Echo


def _gone(pid):
    try:
        p = psutil.Process(pid)
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_machine_exits_when_its_lease_lapses(backend):
    # The driver renews far less often than the lease: the machine must leave by itself.
    with bigmp.start(keepalive_lease=1.0, keepalive_interval=30, keepalive_timeout=60,
                     **backend) as b:
        m = b.start(1, services={"Echo": Echo()})[0]
        pid = m.call("Echo.pid")
        wait_until(lambda: _gone(pid), timeout=15, what="machine exit after lease lapse")
        assert m.wait(State.STOPPED, timeout=15) == State.STOPPED
        assert isinstance(m.err, bigmp.MachineLost)


def test_killed_machine_is_stopped_and_in_flight_calls_raise(backend):
    with bigmp.start(**backend) as b:
        m, other = b.start(2, services={"Echo": Echo()})
        pid = m.call("Echo.pid")
        fut = m.call_async("Echo.sleep", 60)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(bigmp.MachineLost):
            fut.result(timeout=15)
        assert m.wait(State.STOPPED, timeout=15) == State.STOPPED
        assert isinstance(m.err, bigmp.MachineLost)
        with pytest.raises(bigmp.MachineStopped):
            m.call("Echo.echo", 1)
        assert other.call("Echo.echo", "still here") == "still here"


def test_hung_machine_is_marked_stopped_by_keepalive(backend):
    with bigmp.start(keepalive_interval=0.2, keepalive_timeout=1.5, **backend) as b:
        m = b.start(1, services={"Echo": Echo()})[0]
        pid = m.call("Echo.pid")
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10,
                   what="the machine to be stopped by SIGSTOP")
        try:
            with pytest.raises(TimeoutError):
                m.call("Echo.echo", 1, timeout=0.3)
            assert m.wait(State.STOPPED, timeout=15) == State.STOPPED
            assert "keepalive" in str(m.err), repr(m.err)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_until(lambda: _gone(pid), timeout=15, what="hung machine to be killed")


DRIVER = textwrap.dedent("""
    import sys, bigmp
    sys.path.insert(0, {root!r})
    from tests.services import Echo
    b = bigmp.start(**{backend!r})
    ms = b.start(3, services={{"Echo": Echo()}})
    print(" ".join(str(m.call("Echo.pid")) for m in ms), flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_machines_exit_when_the_driver_dies(backend, how):
    code = DRIVER.format(root=ROOT, backend=backend)
    # Long lease on purpose: only the connection/launcher-channel layers can end them fast.
    env = dict(os.environ, BIGMP_KEEPALIVE_LEASE="300")
    driver = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 3 and all(not _gone(p) for p in pids)
        if how == "SIGKILL":
            driver.kill()
        else:
            driver.stdin.close()
        driver.wait(timeout=30)
        wait_until(lambda: all(_gone(p) for p in pids), timeout=10,
                   what="machines to exit after their driver")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
