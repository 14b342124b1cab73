"""A machine killed mid-call, hung with SIGSTOP, cut off, delayed or disconnected."""
from __future__ import annotations

import threading
import time

import pytest

import bigmp
import bigmp.testing as bt
from bigmp import State
from tests.conftest import wait_until
from tests.reliability._services import Gate, Payloads
from tests.reliability.conftest import gone

CALLERS = 8


@pytest.fixture(params=["testing"])
def b(request):
    with bt.start() as session:
        yield session


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


def test_machine_killed_mid_call(b, figures):
    services = {"G": Gate(), "P": Payloads()}
    victim, *others = b.start(3, services=services)
    bt.wait_for(b, 3)
    stop, errors, counts = threading.Event(), [], {}
    background = _background_calls(others, stop, errors, counts)
    failed_at = {}
    futures = [victim.call_async("G.block", i) for i in range(CALLERS)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: failed_at.setdefault(i, time.monotonic()))
    wait_until(lambda: victim.call("G.entered", timeout=10) == CALLERS, timeout=30,
               what="all callers inside the method")
    t0 = time.monotonic()
    bt.kill(victim, wait=False)
    timeout = b.options["keepalive_timeout"]
    for f in futures:
        with pytest.raises(bigmp.MachineLost, match="killed by signal 9|refuses connections"):
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
    figures.add("machine SIGKILL mid-call",
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
        t = time.monotonic()
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


def test_hung_machine_times_out_and_is_stopped_by_keepalive(b, figures):
    m = b.start(1, services={"P": Payloads()})[0]
    pid = m.call("P.pid", timeout=30)
    t0 = time.monotonic()
    bt.hang(m)
    timeouts = 0
    for _ in range(3):
        with pytest.raises(TimeoutError):
            m.call("P.echo", 1, timeout=0.3)
        timeouts += 1
    timeout = b.options["keepalive_timeout"]
    assert m.wait(State.STOPPED, timeout=timeout + 10) == State.STOPPED
    stopped_after = time.monotonic() - t0
    assert isinstance(m.err, bigmp.MachineLost) and "keepalive" in str(m.err)
    wait_until(lambda: gone(pid), timeout=15, what="the hung machine to be killed")
    with pytest.raises(bigmp.MachineStopped):
        m.call("P.echo", 1, timeout=5)
    figures.add("machine SIGSTOP",
                f"{timeouts}/3 calls with a 0.3 s timeout raised TimeoutError; keepalive "
                f"marked it STOPPED {stopped_after:.2f} s after the hang (keepalive_timeout "
                f"{timeout:g} s, interval {b.options['keepalive_interval']:g} s) and it was killed")


def test_hung_machine_resumed_in_time_carries_on():
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
    # retry_call has sent the call again on a new connection: release both invocations.
    wait_until(lambda: m.call("G.entered", timeout=10) == 3, timeout=30,
               what="retry_call to call again")
    m.call("G.release")
    assert retried.result(timeout=30) == "retried"
    assert m.state == State.RUNNING and m.call("P.echo", 5) == 5
    figures.add("drop",
                f"{dropped} connections cut: the plain call raised ConnectionError (machine "
                "still RUNNING), retry_call called again and returned")


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


def test_healed_partition_delivers_what_was_held():
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
    with pytest.raises(TimeoutError):
        sys_.wait_for(3, timeout=0.2)
