"""The call contract: call, proxies, futures, asyncio, timeouts, retries, concurrency."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from bigmp import State
from tests.conftest import wait_until
from tests.services import Barrier, Echo


@pytest.fixture
def machine(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    m.wait(State.RUNNING, timeout=30)
    return m


def test_call_waits_for_running_and_returns(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    assert m.call("Echo.add", 2, b=3) == 5   # issued while STARTING


def test_call_arguments_roundtrip(machine):
    value = {"a": [1, 2.5, None], "b": b"\x00" * 100000, "c": ("t", {1, 2})}
    assert machine.call("Echo.echo", value) == value
    assert machine.call("Echo.echo", lambda x: x + 1)(1) == 2   # cloudpickle fallback


def test_service_proxy(machine):
    echo = machine.service("Echo")
    assert echo.add(1, 2) == 3
    assert echo.echo("x") == "x"
    with pytest.raises(AttributeError):
        echo._private


def test_call_async_returns_future(machine):
    fut = machine.call_async("Echo.add", 40, 2)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=30) == 42
    bad = machine.call_async("Echo.fail", "async boom")
    with pytest.raises(ValueError, match="async boom"):
        bad.result(timeout=30)


def test_call_async_futures_behave_as_running_executor_futures(machine):
    """The mux path's Futures (and the thread path's) keep the concurrent.futures
    contract: running, not cancellable, callbacks, wait, as_completed, result()."""
    machine.call_async("Echo.noop").result(timeout=30)   # starts dialing the mux channel
    wait_until(lambda: machine._mux is not None, 30)     # later calls ride on it
    slow = machine.call_async("Echo.sleep", 0.5)
    assert slow.running() and not slow.done()
    with pytest.raises(concurrent.futures.TimeoutError):
        slow.result(timeout=0.01)
    assert slow.cancel() is False and not slow.cancelled()
    seen = []
    slow.add_done_callback(lambda f: seen.append(("before", f.result())))
    waiter = threading.Thread(target=lambda: seen.append(("waiter", slow.result(timeout=30))))
    waiter.start()   # a thread blocked in result() must be woken by the reply
    futs = [machine.call_async("Echo.add", i, 1) for i in range(50)]
    done, not_done = concurrent.futures.wait(futs + [slow], timeout=30)
    assert not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=30)) == \
        list(range(1, 51))
    waiter.join(30)
    slow.add_done_callback(lambda f: seen.append(("after", f.exception())))
    assert sorted(seen, key=str) == [("after", None), ("before", 0.5), ("waiter", 0.5)]
    bad = machine.call_async("Echo.fail", "mux boom")
    assert isinstance(bad.exception(timeout=30), ValueError)
    with pytest.raises(concurrent.futures.InvalidStateError):
        bad.set_result(1)   # completed once, by the channel


def test_waiting_on_call_futures_beside_stdlib_futures_from_many_threads(machine):
    """concurrent.futures.wait takes each future's lock in one global order: mixing bigmp
    call futures and executor futures, waited on from several threads at once, must not
    deadlock (pytest-timeout fails this test if it does)."""
    machine.call_async("Echo.noop").result(timeout=30)
    wait_until(lambda: machine._mux is not None, 30)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for _ in range(20):
            mixed = [machine.call_async("Echo.add", i, 1) if i % 2 else ex.submit(abs, -i)
                     for i in range(40)]
            results = []

            def waiter(fs):
                done, _ = concurrent.futures.wait(fs, timeout=30)
                results.append(len(done))

            threads = [threading.Thread(target=waiter, args=(mixed[k:] + mixed[:k],))
                       for k in (0, 13, 27)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == [40, 40, 40]
            assert [f.result() for f in mixed] == [i + 1 if i % 2 else i for i in range(40)]


def test_acall_in_asyncio(machine):
    async def main():
        return await asyncio.gather(*(machine.acall("Echo.add", i, 1) for i in range(20)))
    assert asyncio.run(main()) == [i + 1 for i in range(20)]


def test_timeout_raises_and_machine_keeps_serving(machine):
    with pytest.raises(TimeoutError):
        machine.call("Echo.sleep", 5, timeout=0.2)
    assert machine.call("Echo.echo", 7, timeout=10) == 7


def test_calls_run_concurrently(session):
    m = session.start(1, services={"B": Barrier(4)})[0]
    futures = [m.call_async("B.wait", 20) for _ in range(4)]
    results = sorted(f.result(timeout=30) for f in futures)
    assert results == [0, 1, 2, 3]


def test_many_threads_share_a_machine(machine):
    errors = []

    def worker(i):
        try:
            for j in range(50):
                assert machine.call("Echo.add", i, j) == i + j
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_retry_call_returns_when_no_error(machine):
    assert machine.retry_call("Echo.add", 1, 1, deadline=5) == 2


def test_retry_call_does_not_retry_remote_errors(machine):
    with pytest.raises(ValueError, match="once"):
        machine.retry_call("Echo.fail", "once", deadline=5)


def test_retry_call_gives_up_at_its_deadline(session, tmp_path):
    m = session.dial(str(tmp_path / "nobody-listens.sock"))
    with pytest.raises(ConnectionError):
        m.retry_call("Echo.echo", 1, deadline=0.5)
    assert m.state == State.RUNNING   # a dialed machine is not ours to declare lost


def test_retry_call_succeeds_once_the_machine_is_back(session, tmp_path):
    from bigmp.server import BigServer
    path = str(tmp_path / "later.sock")
    servers = []

    def start_later():   # a replacement appears at the address while the caller retries
        srv = BigServer({}, path, session.authkey, name="replacement")
        srv.install("Echo", Echo())
        servers.append(srv)
        srv.serve_until_stopped()
    timer = threading.Timer(0.3, lambda: threading.Thread(target=start_later,
                                                           daemon=True).start())
    timer.start()
    try:
        assert session.dial(path).retry_call("Echo.echo", "back", deadline=30) == "back"
    finally:
        timer.join()
        for srv in servers:
            srv.stop()


def test_bad_method_name_is_named(machine):
    with pytest.raises(ValueError, match="Service.method"):
        machine.call("nodot")


def test_many_async_calls_in_flight(session):
    machines = session.start(2, services={"Echo": Echo()})
    futures = [machines[i % 2].call_async("Echo.add", i, 1) for i in range(3000)]
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(3000)]


def test_call_async_of_a_streaming_method_says_to_use_call(machine):
    # The same answer before the multiplexed channel is up and after.
    with pytest.raises(TypeError, match="call_async"):
        machine.call_async("Echo.count", 3).result(timeout=30)
    futures = [machine.call_async("Echo.echo", i) for i in range(50)]
    assert [f.result(timeout=30) for f in futures] == list(range(50))
    with pytest.raises(TypeError, match="call_async"):
        machine.call_async("Echo.count", 3).result(timeout=30)
    assert list(machine.call("Echo.count", 3)) == [0, 1, 2]


def test_call_async_with_a_streamed_argument(machine):
    def numbers():
        yield from range(100)
    assert machine.call_async("Echo.total", numbers()).result(timeout=30) == sum(range(100))
