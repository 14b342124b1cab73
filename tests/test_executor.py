"""bigmp.Executor against concurrent.futures.ProcessPoolExecutor: same inputs, same outcomes."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import threading
import traceback

import pytest

import bigmp
from bigmp import State
from tests import _pool_helpers as H
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["stdlib", "bigmp"])
def impl(request):
    return request.param


@pytest.fixture
def make_executor(impl):
    made = []

    def make(max_workers=2, **kwargs):
        if impl == "stdlib":
            ex = cf.ProcessPoolExecutor(max_workers, **kwargs)
        else:
            ex = bigmp.Executor(max_workers, **kwargs)
        made.append(ex)
        return ex
    yield make
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def ex(make_executor):
    return make_executor()


class _Gated:
    def __init__(self, gate, started=None):
        self.gate, self.started = gate, started

    def __call__(self, x):
        return H.gated(x, self.gate, self.started)


def test_submit(ex):
    f = ex.submit(H.square, 7)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=30) == 49
    assert f.done() and not f.cancelled() and f.exception() is None
    assert ex.submit(H.kwfunc, 1, c=3).result(30) == (1, 0, 3)
    assert ex.submit(pow, 2, 8).result(30) == 256


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map(ex, chunksize):
    assert list(ex.map(H.square, range(50), chunksize=chunksize)) == [x * x for x in range(50)]
    assert list(ex.map(H.add, range(5), range(10, 20), chunksize=chunksize)) == \
        [a + b for a, b in zip(range(5), range(10, 20))]
    assert list(ex.map(H.square, [], chunksize=chunksize)) == []
    assert list(ex.map(H.square, (x for x in range(4)), chunksize=chunksize)) == [0, 1, 4, 9]


@pytest.mark.parametrize("chunksize", [1, 2, 4])
def test_map_exception_position(ex, chunksize):
    got = []
    with pytest.raises(ValueError, match="bad value 5"):
        for value in ex.map(H.fail_on, range(10), chunksize=chunksize):
            got.append(value)
    # Results before the failing chunk come out, then the exception.
    first_of_chunk = (5 // chunksize) * chunksize
    assert got == [x * 10 for x in range(first_of_chunk)]


def test_future_exception(ex):
    f = ex.submit(H.raise_custom, 7)
    exc = f.exception(timeout=30)
    assert type(exc) is H.CustomError and exc.code == 7 and str(exc) == "custom 7"
    with pytest.raises(H.CustomError):
        f.result()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "raise_custom" in text and "_pool_helpers.py" in text


def test_unpicklable_result_and_argument(ex):
    exc = ex.submit(H.unpicklable_result).exception(30)
    assert type(exc) is TypeError and "pickle" in str(exc) and "lock" in str(exc)
    exc = ex.submit(H.identity, threading.Lock()).exception(30)
    assert isinstance(exc, TypeError) and "pickle" in str(exc)


def test_done_callbacks_wait_and_as_completed(ex):
    seen = []
    done = threading.Event()
    f = ex.submit(H.square, 3)

    def cb(fut):
        seen.append(fut.result())
        done.set()
    f.add_done_callback(cb)
    assert done.wait(30) and seen == [9]
    fs = [ex.submit(H.square, i) for i in range(6)]
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == \
        [i * i for i in range(6)]
    finished, pending = cf.wait(fs, timeout=30)
    assert len(finished) == 6 and not pending


def test_result_timeout(ex, tmp_path):
    gate = str(tmp_path / "gate")
    f = ex.submit(H.gated, 2, gate)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    H.touch(gate)
    assert f.result(timeout=30) == 4


def test_map_timeout(ex, tmp_path):
    gate = str(tmp_path / "gate")
    it = ex.map(_Gated(gate), range(3), timeout=0.05)
    with pytest.raises(TimeoutError):
        next(it)
    H.touch(gate)


def test_cancel_a_pending_future(ex, tmp_path):
    gate = str(tmp_path / "gate")
    started = tmp_path / "started"
    started.mkdir()
    blockers = [ex.submit(H.gated, i, gate, str(started)) for i in range(2)]
    wait_until(lambda: len(os.listdir(started)) == 2, timeout=30, what="workers busy")
    rest = [ex.submit(H.square, i) for i in range(8)]
    assert rest[-1].cancel()
    assert rest[-1].cancelled()
    H.touch(gate)
    assert [b.result(30) for b in blockers] == [0, 1]
    assert [f.result(30) for f in rest[:-1]] == [i * i for i in range(7)]
    with pytest.raises(cf.CancelledError):
        rest[-1].result()


def test_shutdown(ex):
    fs = [ex.submit(H.square, i) for i in range(10)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [i * i for i in range(10)]
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(H.square, 1)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.map(H.square, [1])
    ex.shutdown()   # again: fine


def test_shutdown_without_wait_still_finishes(ex):
    fs = [ex.submit(H.square, i) for i in range(10)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in fs] == [i * i for i in range(10)]


def test_shutdown_cancel_futures(ex, tmp_path):
    gate = str(tmp_path / "gate")
    started = tmp_path / "started"
    started.mkdir()
    blockers = [ex.submit(H.gated, i, gate, str(started)) for i in range(2)]
    wait_until(lambda: len(os.listdir(started)) == 2, timeout=30, what="workers busy")
    rest = [ex.submit(H.square, i) for i in range(10)]
    ex.shutdown(wait=False, cancel_futures=True)
    H.touch(gate)
    assert [b.result(30) for b in blockers] == [0, 1]
    cancelled = [f for f in rest if f.cancelled()]
    assert cancelled, "queued work was cancelled"
    assert rest[-1].cancelled()
    for i, f in enumerate(rest):
        if not f.cancelled():
            assert f.result(30) == i * i


def test_context_manager(make_executor):
    with make_executor() as e:
        fs = [e.submit(H.square, i) for i in range(5)]
    assert all(f.done() for f in fs)
    with pytest.raises(RuntimeError):
        e.submit(H.square, 1)


def test_initializer(make_executor):
    e = make_executor(2, initializer=H.init_set, initargs=("ready",))
    assert set(e.map(H.get_init, range(6))) == {("ready", 1)}


def test_failing_initializer_breaks_the_executor(make_executor):
    e = make_executor(2, initializer=H.init_fail)
    f = e.submit(H.square, 2)
    with pytest.raises(cf.BrokenExecutor):
        f.result(timeout=30)

    def broken():
        try:
            e.submit(H.square, 3)
        except cf.BrokenExecutor:
            return True
        return False
    wait_until(broken, timeout=30, what="submit to fail")


def test_bad_arguments(impl, ex):
    Executor = cf.ProcessPoolExecutor if impl == "stdlib" else bigmp.Executor
    for n in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(n)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Executor(1, initializer=5)
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(H.square, [1], chunksize=0)


def test_map_generator_close_cancels_the_rest(ex, tmp_path):
    gate = str(tmp_path / "gate")
    it = ex.map(_Gated(gate), range(20))
    it.close()
    H.touch(gate)
    assert ex.submit(H.square, 3).result(30) == 9


# -- bigmp only ---------------------------------------------------------------------------

@pytest.fixture
def bex():
    made = []

    def make(max_workers=2, **kwargs):
        e = bigmp.Executor(max_workers, **kwargs)
        made.append(e)
        return e
    yield make
    for e in made:
        e.shutdown(wait=False, cancel_futures=True)


def test_lambdas(bex):
    e = bex()
    k = 5
    assert e.submit(lambda a, b=1: a * b * k, 2, b=3).result(30) == 30
    assert list(e.map(lambda a, b: a - b, [10, 20], [1, 2], chunksize=2)) == [9, 18]


def test_lost_machine_mid_map_is_resubmitted(bex, tmp_path):
    e = bex(2)
    gate = str(tmp_path / "gate")
    started = tmp_path / "started"
    started.mkdir()
    it = e.map(_Gated(gate, str(started)), range(6))
    wait_until(lambda: len(os.listdir(started)) >= 2, timeout=30, what="both machines busy")
    victim = e.machines[1]
    os.kill(victim.info()["pid"], signal.SIGKILL)
    victim.wait(State.STOPPED, timeout=30)
    H.touch(gate)
    assert list(it) == [x * x for x in range(6)]
    assert len(os.listdir(started)) >= 7


def test_a_task_that_always_kills_its_machine_gives_up_and_the_executor_goes_on(bex):
    e = bex(2)
    f = e.submit(H.die_always, 1)
    with pytest.raises(bigmp.MachineLost, match="giving up") as info:
        f.result(timeout=60)
    assert not isinstance(info.value, bigmp.BrokenPool)
    # Every machine it killed was replaced (the last replacement may still be starting).
    wait_until(lambda: len(e.machines) == 2, timeout=30, what="two machines again")
    assert e.submit(H.square, 3).result(timeout=30) == 9


def test_no_machines_left(bex):
    e = bex(2, initializer=H.init_fail)   # machines that never start are not replaced
    f = e.submit(H.square, 1)
    with pytest.raises(bigmp.BrokenPool, match="no machines left"):
        f.result(timeout=30)
    with pytest.raises(cf.BrokenExecutor):
        e.submit(H.square, 1)


def test_on_a_given_session():
    with bigmp.start() as b:
        with bigmp.Executor(2, session=b) as e:
            assert list(e.map(H.square, range(8), chunksize=3)) == [x * x for x in range(8)]
            mine = e.machines
        assert all(m.state == State.STOPPED for m in mine)
        assert not any(isinstance(m.err, bigmp.MachineLost) for m in mine)


def test_map_progress(bex, monkeypatch):
    class TTY:
        parts = []

        def isatty(self):
            return True

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys, "stderr", TTY())
    e = bex()
    assert list(e.map(H.square, range(12), chunksize=5, progress=True)) == \
        [x * x for x in range(12)]
    wait_until(lambda: "".join(TTY.parts).endswith("\n"), what="bar closed")
    assert "12/12" in "".join(TTY.parts)
