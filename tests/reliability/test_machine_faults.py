"""A machine killed mid-call, hung with SIGSTOP, cut off, delayed or disconnected."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import bigmp
import bigmp.testing as bt
from bigmp import State
from tests.conftest import wait_until
from tests.reliability._services import Gate, Payloads
from tests.reliability.conftest import gone, ssh_available

CALLERS = 8


@pytest.fixture(params=["testing"])
def b(request):
    with bt.start() as session:
        yield session


@pytest.fixture(params=["testing", "ssh"])
def any_b(request):
    """A session on the testing system, or on SSH machines (real sshd on loopback) with the
    testing system's timings; faults then come as plain signals."""
    if request.param == "ssh":
        if not ssh_available():
            pytest.skip("openssh-server is not installed")
        options = dict(request.getfixturevalue("sshd").options(), **bt.DEFAULTS)
    else:
        options = {"system": "testing"}
    with bigmp.start(**options) as session:
        yield session


def _kill(m):
    if isinstance(m._b.system, bt.TestingSystem):
        bt.kill(m, wait=False)
    else:
        os.kill(m.pid, signal.SIGKILL)


def _hang(m):
    if isinstance(m._b.system, bt.TestingSystem):
        bt.hang(m)
    else:
        os.kill(m.pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(m.pid).status() == psutil.STATUS_STOPPED,
                   timeout=10, what="SIGSTOP to take effect")


def _wait_running(machines):
    for m in machines:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING


def _background_calls(machines, stop, errors, counts):
    """Call every machine in a loop until ``stop``: the 'other machines are unaffected' probe."""
    def run(m):
        n = 0
        while not stop.is_set():
            try:
                assert m.call("P.echo", n, timeout=30) == n
                n += 1
            except Exception as exc:   # reported by the test
                errors.append((m.name, exc))
                return
        counts[m.name] = n
    threads = [threading.Thread(target=run, args=(m,)) for m in machines]
    for t in threads:
        t.start()
    return threads


def test_machine_killed_mid_call(any_b, figures):
    b = any_b
    services = {"G": Gate(), "P": Payloads()}
    victim, *others = b.start(3, services=services)
    _wait_running([victim] + others)
    stop, errors, counts = threading.Event(), [], {}
    background = _background_calls(others, stop, errors, counts)
    failed_at = {}
    futures = [victim.call_async("G.block", i) for i in range(CALLERS)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: failed_at.setdefault(i, time.monotonic()))
    wait_until(lambda: victim.call("G.entered", timeout=10) == CALLERS, timeout=30,
               what="all callers inside the method")
    t0 = time.monotonic()
    _kill(victim)
    timeout = b.options["keepalive_timeout"]
    for f in futures:
        with pytest.raises(bigmp.MachineLost):
            f.result(timeout=timeout + 10)
    latency = max(failed_at.values()) - t0
    assert victim.wait(State.STOPPED, timeout=timeout + 10) == State.STOPPED
    assert isinstance(victim.err, bigmp.MachineLost)
    stopped_after = time.monotonic() - t0

    # The lost machine is not retried: retry_call raises at once, it does not wait out its
    # deadline. A replacement started with the same services answers.
    t1 = time.monotonic()
    with pytest.raises(bigmp.MachineLost):
        victim.retry_call("P.echo", 1, deadline=30)
    retry_refused = time.monotonic() - t1
    assert retry_refused < 5
    replacement = b.start(1, services=services)[0]
    assert replacement.retry_call("P.echo", "again", deadline=30) == "again"

    stop.set()
    for t in background:
        t.join(30)
    assert errors == [], errors
    assert all(counts.get(m.name, 0) > 0 for m in others)
    assert all(m.call("P.echo", "ok") == "ok" for m in others)
    figures.add(f"machine SIGKILL mid-call [{b.system.name}]",
                f"{CALLERS}/{CALLERS} waiting callers got MachineLost, the last "
                f"{latency * 1000:.0f} ms after the kill (machine STOPPED after "
                f"{stopped_after * 1000:.0f} ms); retry_call on it raised MachineLost in "
                f"{retry_refused * 1000:.1f} ms (not retried); 2 other machines answered "
                f"{sum(counts.values())} calls meanwhile with 0 errors; retry_call on a "
                "replacement succeeded")


def test_retry_call_reaches_a_restarted_machine_at_the_same_address(b, figures):
    """A dialed handle (as machines hold of each other) retries through the outage."""
    services = {"P": Payloads()}
    m = b.start(1, services=services)[0]
    m.wait(State.RUNNING, timeout=30)
    old_pid = m.call("P.pid")
    dialed = bigmp.B.remote(b.authkey).dial(m.addr)   # what another machine would hold
    assert dialed.call("P.pid") == old_pid
    bt.kill(m)
    result = {}

    def retry():
        result["pid"] = dialed.retry_call("P.pid", deadline=60)
        result["at"] = time.monotonic()
    caller = threading.Thread(target=retry)
    caller.start()
    t0 = time.monotonic()
    replacement = b.system.restart(m, services=services)
    up = time.monotonic() - t0
    caller.join(60)
    assert result["pid"] == replacement.call("P.pid") != old_pid
    assert m.state == State.STOPPED and replacement.state == State.RUNNING
    figures.add("retry_call across a restart",
                f"a dialed handle's retry_call succeeded {1000 * (result['at'] - t0):.0f} ms "
                f"after the restart began (replacement RUNNING after {1000 * up:.0f} ms)")


def test_hung_machine_times_out_and_is_stopped_by_keepalive(any_b, figures):
    b = any_b
    m = b.start(1, services={"P": Payloads()})[0]
    pid = m.call("P.pid", timeout=60)
    t0 = time.monotonic()
    _hang(m)
    timeouts, took = 0, 0.0
    for _ in range(3):
        t1 = time.monotonic()
        with pytest.raises(TimeoutError):
            m.call("P.echo", 1, timeout=0.3)
        took = max(took, time.monotonic() - t1)
        timeouts += 1
    timeout = b.options["keepalive_timeout"]
    assert m.wait(State.STOPPED, timeout=timeout + 10) == State.STOPPED
    stopped_after = time.monotonic() - t0
    assert isinstance(m.err, bigmp.MachineLost) and "keepalive" in str(m.err)
    wait_until(lambda: gone(pid), timeout=15, what="the hung machine to be killed")
    with pytest.raises(bigmp.MachineStopped):
        m.call("P.echo", 1, timeout=5)
    figures.add(f"machine SIGSTOP [{b.system.name}]",
                f"{timeouts}/3 calls with a 0.3 s timeout raised TimeoutError (the slowest "
                f"after {took * 1000:.0f} ms); keepalive "
                f"marked it STOPPED {stopped_after:.2f} s after the hang (keepalive_timeout "
                f"{timeout:g} s, interval {b.options['keepalive_interval']:g} s) and it was killed")


@pytest.mark.parametrize("system", ["testing"])
def test_hung_machine_resumed_in_time_carries_on(system):
    with bt.start(keepalive_timeout=30) as b:
        m = b.start(1, services={"G": Gate(), "P": Payloads()})[0]
        m.wait(State.RUNNING, timeout=30)
        bt.hang(m)
        fut = m.call_async("P.echo", "after resume")
        with pytest.raises(TimeoutError):
            m.call("P.echo", 1, timeout=0.2)
        bt.resume(m)
        assert fut.result(timeout=30) == "after resume"
        assert m.state == State.RUNNING


def test_drop_breaks_calls_in_flight_and_retry_call_recovers(b, figures):
    m = b.start(1, services={"G": Gate(), "P": Payloads()})[0]
    m.wait(State.RUNNING, timeout=30)
    plain = m.call_async("G.block", "plain")
    retried = b._executor().submit(m.retry_call, "G.block", "retried", deadline=60)
    wait_until(lambda: m.call("G.entered", timeout=10) == 2, timeout=30,
               what="both calls inside the method")
    dropped = bt.drop(m)
    with pytest.raises(ConnectionError) as info:
        plain.result(timeout=30)
    assert not isinstance(info.value, bigmp.MachineStopped)
    # The pooled idle connection was cut too: it is found closed before use, and the next
    # call goes out on a new connection instead of failing.
    assert m.call("G.entered", timeout=10) in (2, 3)
    # retry_call has sent the call again on a new connection: release both invocations.
    wait_until(lambda: m.call("G.entered", timeout=10) == 3, timeout=30,
               what="retry_call to call again")
    m.call("G.release")
    assert retried.result(timeout=30) == "retried"
    assert m.state == State.RUNNING and m.call("P.echo", 5) == 5
    figures.add("drop",
                f"{dropped} connections cut: the call in flight raised ConnectionError "
                "(machine still RUNNING); the cut idle connection was found closed before "
                "reuse and the next call succeeded; retry_call called again and returned")


def test_delay_slows_every_call_and_can_be_lifted(b, figures):
    m = b.start(1, services={"P": Payloads()})[0]
    m.wait(State.RUNNING, timeout=30)
    bt.delay(m, 0.25)
    t0 = time.monotonic()
    assert m.call("P.echo", 1) == 1
    slow = time.monotonic() - t0
    assert slow >= 0.5            # a request and its reply, each 0.25 s late
    with pytest.raises(TimeoutError):
        m.call("P.echo", 2, timeout=0.2)
    bt.delay(m, 0)
    t0 = time.monotonic()
    assert m.call("P.echo", 3) == 3
    fast = time.monotonic() - t0
    assert m.state == State.RUNNING
    figures.add("delay", f"0.25 s each way: a call took {slow * 1000:.0f} ms; a 0.2 s timeout "
                         f"raised; lifted: {fast * 1000:.1f} ms")


def test_partition_stops_the_machine_within_the_keepalive_timeout(b, figures):
    m = b.start(1, services={"P": Payloads()})[0]
    pid = m.call("P.pid", timeout=30)
    t0 = time.monotonic()
    bt.partition(m)
    with pytest.raises(TimeoutError):
        m.call("P.echo", 1, timeout=0.3)
    timeout = b.options["keepalive_timeout"]
    assert m.wait(State.STOPPED, timeout=timeout + 10) == State.STOPPED
    stopped_after = time.monotonic() - t0
    assert isinstance(m.err, bigmp.MachineLost)
    wait_until(lambda: gone(pid), timeout=15, what="the partitioned machine to be killed")
    figures.add("partition", f"call with 0.3 s timeout raised TimeoutError; STOPPED after "
                             f"{stopped_after:.2f} s (keepalive_timeout {timeout:g} s), killed")


@pytest.mark.parametrize("system", ["testing"])
def test_healed_partition_delivers_what_was_held(system):
    with bt.start(keepalive_timeout=30) as b:
        m = b.start(1, services={"P": Payloads()})[0]
        m.wait(State.RUNNING, timeout=30)
        bt.partition(m)
        fut = m.call_async("P.echo", "held")
        new_conn = b._executor().submit(bigmp.B.remote(b.authkey).dial(m.addr).call,
                                        "P.echo", "new connection")
        with pytest.raises(TimeoutError):
            m.call("P.echo", 1, timeout=0.2)
        assert not fut.done()
        bt.heal(m)
        assert fut.result(timeout=30) == "held"
        assert new_conn.result(timeout=30) == "new connection"
        assert m.call("P.echo", 2) == 2 and m.state == State.RUNNING


def test_wait_for_n_exited_and_machines(b):
    sys_ = bt.system(b)
    assert sys_.N() == 0 and sys_.exited() == 0
    ms = b.start(3, services={"P": Payloads()})
    running = sys_.wait_for(3, timeout=30)
    assert sorted(m.name for m in running) == sorted(m.name for m in ms)
    assert sys_.N() == 3
    killed = sys_.kill()            # a random RUNNING machine
    killed.wait(State.STOPPED, timeout=30)
    assert sys_.N() == 2 and sys_.exited() == 1
    assert killed not in sys_.machines()
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        sys_.wait_for(3, timeout=30)   # only 2 left that could: it says so at once
    more = b.start(1, services={"P": Payloads()})
    assert len(sys_.wait_for(3, timeout=30)) == 3 and more[0].state == State.RUNNING
