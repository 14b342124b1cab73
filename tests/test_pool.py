"""bigmp.Pool against multiprocessing.Pool: same inputs, same results, same errors.

Most tests run twice, once per implementation (``impl``), so each one also checks that the
test is right about the standard library. bigmp-only behaviour (lambdas, lost machines,
sessions, progress bars) follows at the end.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.pool import MaybeEncodingError

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
def make_pool(impl):
    pools = []

    def make(processes=2, initializer=None, initargs=(), maxtasksperchild=None, **kw):
        if impl == "stdlib":
            p = multiprocessing.Pool(processes, initializer, initargs, maxtasksperchild)
        else:
            p = bigmp.Pool(processes, initializer, initargs, maxtasksperchild, **kw)
        pools.append(p)
        return p
    yield make
    for p in pools:
        p.terminate()
        p.join()


@pytest.fixture
def pool(make_pool):
    return make_pool()


def run_error(fn, *args, **kwargs):
    """The exception ``fn`` raises (fails the test if it returns)."""
    try:
        fn(*args, **kwargs)
    except BaseException as exc:   # noqa: B902 - we compare whatever comes out
        return exc
    pytest.fail(f"{fn} returned instead of raising")


# -- results ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunksize", [None, 1, 3, 7, 1000])
def test_map(pool, chunksize):
    assert pool.map(H.square, range(100), chunksize) == [x * x for x in range(100)]


def test_map_inputs(pool):
    assert pool.map(H.square, []) == []
    assert pool.map(H.square, (x for x in range(10))) == [x * x for x in range(10)]
    assert pool.map(H.identity, {3: 0, 1: 0}) == [3, 1]
    assert pool.map(H.identity, "abc", 2) == ["a", "b", "c"]


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_starmap(pool, chunksize):
    pairs = [(i, i + 1) for i in range(20)]
    assert pool.starmap(H.add, pairs, chunksize) == [a + b for a, b in pairs]
    assert pool.starmap_async(H.add, pairs, chunksize).get(30) == [a + b for a, b in pairs]
    assert pool.starmap(H.add, []) == []


def test_apply(pool):
    assert pool.apply(H.square, (7,)) == 49
    assert pool.apply(H.kwfunc, (1,), {"b": 2, "c": 3}) == (1, 2, 3)
    assert pool.apply(H.kwfunc, [5]) == (5, 0, 0)
    assert pool.apply(pow, (2, 10)) == 1024


def test_apply_async_result_object(pool):
    r = pool.apply_async(H.square, (6,))
    assert isinstance(r, multiprocessing.pool.AsyncResult)
    assert r.get(timeout=30) == 36
    r.wait()
    assert r.ready() and r.successful()


def test_map_async_result_object(pool):
    r = pool.map_async(H.square, range(10), 3)
    assert r.get(timeout=30) == [x * x for x in range(10)]
    assert r.ready() and r.successful()


@pytest.mark.parametrize("chunksize", [1, 4, 50])
def test_imap(pool, chunksize):
    assert list(pool.imap(H.square, range(30), chunksize)) == [x * x for x in range(30)]
    got = list(pool.imap_unordered(H.square, range(30), chunksize))
    assert sorted(got) == [x * x for x in range(30)]
    assert list(pool.imap(H.square, [], chunksize)) == []
    assert list(pool.imap(H.square, iter(range(5)), chunksize)) == [0, 1, 4, 9, 16]


class _Last:
    """A picklable callable (module-level class) binding the directory and count."""

    def __init__(self, d, n):
        self.d, self.n = d, n

    def __call__(self, x):
        return H.last_one(x, self.d, self.n)


def test_imap_order_versus_unordered(pool, tmp_path):
    n = 8
    d1, d2 = tmp_path / "ordered", tmp_path / "unordered"
    d1.mkdir()
    d2.mkdir()
    assert list(pool.imap(_Last(str(d1), n), range(n))) == list(range(n))
    got = list(pool.imap_unordered(_Last(str(d2), n), range(n)))
    assert set(got) == set(range(n))
    assert got[-1] == 0, "the slowest task came out last"


def test_imap_next_timeout(pool, tmp_path):
    gate = str(tmp_path / "gate")
    it = pool.imap(_Gated(gate), range(2))
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    H.touch(gate)
    assert it.next(timeout=30) == 0
    assert list(it) == [1]


class _Gated:
    def __init__(self, gate, started=None):
        self.gate, self.started = gate, started

    def __call__(self, x):
        return H.gated(x, self.gate, self.started)


# -- callbacks ----------------------------------------------------------------------------

def test_callbacks(pool):
    got, threads = [], []
    done = threading.Event()

    def cb(value):
        got.append(value)
        threads.append(threading.current_thread())
        done.set()
    r = pool.apply_async(H.square, (4,), callback=cb)
    assert r.get(30) == 16
    assert done.wait(30)
    assert got == [16]
    assert threads[0] is not threading.main_thread()

    maps = []
    r = pool.map_async(H.square, range(5), 2, callback=maps.append)
    assert r.get(30) == [0, 1, 4, 9, 16]
    wait_until(lambda: maps, what="map callback")
    assert maps == [[0, 1, 4, 9, 16]]


def test_error_callback(pool):
    errors, values = [], []
    r = pool.apply_async(H.fail_on, (5,), callback=values.append, error_callback=errors.append)
    with pytest.raises(ValueError, match="bad value 5"):
        r.get(30)
    assert r.ready() and not r.successful()
    wait_until(lambda: errors, what="error callback")
    assert values == [] and len(errors) == 1
    assert type(errors[0]) is ValueError and str(errors[0]) == "bad value 5"


def test_map_async_error_callback_called_once(pool):
    errors, values = [], []
    r = pool.map_async(H.fail_on, range(10), 1, callback=values.append,
                       error_callback=errors.append)
    with pytest.raises(ValueError, match="bad value 5"):
        r.get(30)
    wait_until(lambda: errors, what="error callback")
    assert values == [] and len(errors) == 1 and isinstance(errors[0], ValueError)


def test_empty_map_async_is_ready_at_once(pool):
    calls = []
    r = pool.map_async(H.square, [], callback=calls.append)
    assert r.ready() and r.get(0) == []


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_map_raises_the_task_exception(pool, chunksize):
    exc = run_error(pool.map, H.fail_on, range(10), chunksize)
    assert type(exc) is ValueError and str(exc) == "bad value 5"


def test_apply_raises_custom_exception_with_attributes(pool):
    exc = run_error(pool.apply, H.raise_custom, (42,))
    assert type(exc) is H.CustomError and exc.code == 42 and str(exc) == "custom 42"


def test_exception_carries_the_remote_traceback(pool):
    exc = run_error(pool.apply, H.fail_on, (5,))
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "fail_on" in text and "_pool_helpers.py" in text


def test_imap_exception_then_continues(pool):
    it = pool.imap(H.fail_on, range(8))
    got = [next(it) for _ in range(5)]
    assert got == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="bad value 5"):
        next(it)
    assert list(it) == [60, 70]


def test_imap_chunked_exception_ends_iteration(pool):
    it = pool.imap(H.fail_on, range(8), 2)
    assert [next(it) for _ in range(4)] == [0, 10, 20, 30]
    with pytest.raises(ValueError):
        next(it)
    assert list(it) == []


def test_imap_input_that_raises(pool):
    it = pool.imap(H.square, H.broken_input(10, 3))
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(KeyError, match="input broke at 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    exc = run_error(pool.map, H.square, H.broken_input(10, 3))
    assert type(exc) is KeyError


def test_unpicklable_result(pool):
    exc = run_error(pool.apply, H.unpicklable_result)
    assert type(exc) is MaybeEncodingError
    assert "Error sending result" in str(exc) and "lock" in str(exc)


def test_unpicklable_argument_or_function(pool):
    exc = run_error(pool.map, H.identity, [1, threading.Lock()], 1)
    assert type(exc) is TypeError and "pickle" in str(exc)
    exc = run_error(pool.apply, threading.Lock().locked)
    assert type(exc) is TypeError and "pickle" in str(exc)
    assert pool.map(H.square, [3]) == [9]     # the pool still works


def test_bad_arguments(impl, make_pool):
    Pool = multiprocessing.Pool if impl == "stdlib" else bigmp.Pool
    for kwargs, kind in [({"processes": 0}, ValueError), ({"maxtasksperchild": 0}, ValueError),
                         ({"maxtasksperchild": -1}, ValueError),
                         ({"initializer": 3}, TypeError)]:
        exc = run_error(Pool, **kwargs)
        assert type(exc) is kind, kwargs
    msgs = {str(run_error(Pool, processes=0)), str(run_error(Pool, maxtasksperchild=0)),
            str(run_error(Pool, initializer=3))}
    assert msgs == {"Number of processes must be at least 1",
                    "maxtasksperchild must be a positive int or None",
                    "initializer must be a callable"}
    pool = make_pool()
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap(H.square, range(3), 0)
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap_unordered(H.square, range(3), -1)
    with pytest.raises(NotImplementedError):
        pickle.dumps(pool)


# -- timeouts and lifecycle ---------------------------------------------------------------

def test_get_timeout(pool, tmp_path):
    gate = str(tmp_path / "gate")
    r = pool.apply_async(H.gated, (3, gate))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert not r.ready()
    with pytest.raises(ValueError):
        r.successful()
    r.wait(0.01)
    H.touch(gate)
    assert r.get(timeout=30) == 9


def test_terminate_stops_running_tasks(pool, tmp_path):
    gate = str(tmp_path / "never")
    started = tmp_path / "started"
    started.mkdir()
    r = pool.map_async(_Gated(gate, str(started)), range(4), 1)
    wait_until(lambda: len(os.listdir(started)) >= 2, timeout=30, what="tasks to start")
    began = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - began < 20
    assert not os.path.exists(gate)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(H.square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map_async(H.square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        pool.imap(H.square, [1])
    pool.terminate()   # twice is fine
    del r


def test_close_then_join_finishes_the_work(pool, impl):
    r = pool.map_async(H.square, range(50), 1)
    a = pool.apply_async(H.square, (9,))
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(H.square, (1,))
    pool.join()
    assert r.ready() and r.get(0) == [x * x for x in range(50)]
    assert a.get(0) == 81
    if impl == "bigmp":
        assert all(m.state == State.STOPPED for m in pool.session.machines())


def test_close_lets_a_pending_imap_finish(pool):
    it = pool.imap(H.square, range(40))
    pool.close()
    assert list(it) == [x * x for x in range(40)]
    pool.join()


def test_close_and_join_with_an_untouched_imap(pool):
    it = pool.imap(H.square, range(200))
    un = pool.imap_unordered(H.square, range(200), 7)
    pool.close()
    pool.join()
    assert list(it) == [x * x for x in range(200)]
    assert sorted(un) == [x * x for x in range(200)]


def test_context_manager(impl, make_pool):
    with make_pool() as p:
        assert p.map(H.square, range(5)) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(H.square, (2,))
    with pytest.raises(ValueError):
        with p:
            pass


def test_initializer(make_pool):
    pool = make_pool(2, H.init_set, ("hello",))
    got = pool.map(H.get_init, range(8), 1)
    assert all(v == ("hello", 1) for v in got)


@pytest.mark.parametrize("maxtasks", [1, 2])
def test_maxtasksperchild(make_pool, maxtasks):
    pool = make_pool(2, maxtasksperchild=maxtasks)
    pids = pool.map(H.getpid, range(8), 1)
    assert len(pids) == 8
    counts = {p: pids.count(p) for p in set(pids)}
    assert max(counts.values()) <= maxtasks
    assert len(counts) >= 8 // maxtasks
    assert os.getpid() not in counts


# -- bigmp only ---------------------------------------------------------------------------

@pytest.fixture
def bpool():
    pools = []

    def make(processes=2, *args, **kwargs):
        p = bigmp.Pool(processes, *args, **kwargs)
        pools.append(p)
        return p
    yield make
    for p in pools:
        p.terminate()


def test_lambdas_and_closures(bpool):
    pool = bpool()
    k = 3
    assert pool.map(lambda x: x * k, range(5)) == [0, 3, 6, 9, 12]
    assert pool.apply(lambda a, b=1: a - b, (10,), {"b": 4}) == 6
    assert sorted(pool.imap_unordered(lambda x: -x, range(4))) == [-3, -2, -1, 0]
    assert pool.starmap(lambda a, b: a * b, [(2, 3), (4, 5)]) == [6, 20]
    results = []
    pool.apply_async(lambda: "cb", callback=results.append).get(30)
    wait_until(lambda: results, what="callback")
    init = bpool(1, lambda v: H.init_set(v), ("from a lambda",))
    assert init.apply(H.get_init)[0] == "from a lambda"


def test_spawn_machines(bpool):
    pool = bpool(2, local_mode="spawn")
    assert pool.map(H.square, range(10), 1) == [x * x for x in range(10)]
    assert pool.apply(lambda: os.getpid()) != os.getpid()


def test_lost_machine_mid_map_is_resubmitted(bpool, tmp_path):
    """SIGKILL one machine while both run a task: the map still completes."""
    pool = bpool(2)
    gate = str(tmp_path / "gate")
    started = tmp_path / "started"
    started.mkdir()
    r = pool.map_async(_Gated(gate, str(started)), range(8), 1)
    wait_until(lambda: len(os.listdir(started)) >= 2, timeout=30, what="both machines busy")
    victim = pool.machines[0]
    pid = victim.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    victim.wait(State.STOPPED, timeout=30)
    assert isinstance(victim.err, bigmp.MachineLost)
    H.touch(gate)
    assert r.get(timeout=30) == [x * x for x in range(8)]
    runs = os.listdir(started)
    assert {int(name.split("-")[0]) for name in runs} == set(range(8))
    assert len(runs) >= 9, "the killed machine's task ran again (at least once)"
    # A new machine took the lost one's place: the pool keeps its size.
    wait_until(lambda: len(pool.machines) == 2, timeout=30, what="the pool's size back")
    assert victim not in pool.machines
    assert pool.apply(H.square, (5,)) == 25


def test_task_that_kills_its_machine_runs_again_elsewhere(bpool, tmp_path):
    pool = bpool(3)
    marker = str(tmp_path / "died")
    assert pool.starmap(H.die_once, [(x, marker) for x in range(10)], 1) == \
        [x * x for x in range(10)]
    assert os.path.exists(marker)
    # The one it killed was replaced (its replacement may still be starting).
    wait_until(lambda: len(pool.machines) == 3, timeout=30, what="the pool's size back")


def test_a_task_that_kills_every_machine_gives_up_and_the_pool_keeps_its_size(bpool):
    pool = bpool(2)
    with pytest.raises(bigmp.MachineLost, match="giving up") as info:
        pool.apply(H.die_always, (1,))       # run max_resubmits + 1 = 4 times
    assert not isinstance(info.value, bigmp.BrokenPool)
    # Every machine it killed was replaced (the last replacement may still be starting).
    wait_until(lambda: len(pool.machines) == 2, timeout=30, what="the pool's size back")
    assert pool.map(H.square, range(4), 1) == [0, 1, 4, 9]


def test_no_machines_left_fails_clearly(bpool):
    pool = bpool(2, H.init_fail)       # machines that never start are not replaced
    with pytest.raises(bigmp.BrokenPool, match="no machines left") as info:
        pool.map(H.square, range(4), 1)
    assert isinstance(info.value, bigmp.MachineLost)
    with pytest.raises(bigmp.BrokenPool):
        pool.apply_async(H.square, (1,)).get(30)
    with pytest.raises(bigmp.BrokenPool):
        next(pool.imap(H.square, [1, 2]))


def test_resubmission_limit(bpool, tmp_path):
    pool = bpool(3, max_resubmits=0)
    with pytest.raises(bigmp.MachineLost, match="giving up") as info:
        pool.apply(H.die_always, (1,))
    assert not isinstance(info.value, bigmp.BrokenPool)
    assert pool.map(H.square, range(6), 1) == [x * x for x in range(6)]


def test_machine_lost_while_idle_costs_no_resubmission(bpool):
    pool = bpool(2, max_resubmits=0)
    assert pool.map(H.square, range(4), 1) == [0, 1, 4, 9]
    victim = pool.machines[0]
    os.kill(victim.info()["pid"], signal.SIGKILL)
    victim.wait(State.STOPPED, timeout=30)
    assert pool.map(H.square, range(10), 1) == [x * x for x in range(10)]
    wait_until(lambda: len(pool.machines) == 2, timeout=30, what="the pool's size back")
    assert victim not in pool.machines
    assert set(pool.machines) == {m for m in pool.session.machines() if m is not victim}


def test_failing_initializer_breaks_the_pool(bpool):
    pool = bpool(2, H.init_fail)
    exc = run_error(pool.map, H.square, range(4))
    assert isinstance(exc, bigmp.BrokenPool)
    assert "initializer refused to start" in str(exc)


def test_terminate_fails_pending_results(bpool, tmp_path):
    pool = bpool(1)
    gate = str(tmp_path / "never")
    started = tmp_path / "started"
    started.mkdir()
    running = pool.apply_async(H.gated, (1, gate, str(started)))
    queued = pool.apply_async(H.square, (2,))
    wait_until(lambda: os.listdir(started), timeout=30, what="task to start")
    pool.terminate()
    for r in (running, queued):
        with pytest.raises(bigmp.MachineStopped, match="terminated"):
            r.get(timeout=10)


def test_callback_exception_does_not_hang(bpool, caplog):
    pool = bpool(1)

    def bad(value):
        raise RuntimeError("callback bug")
    assert pool.apply_async(H.square, (3,), callback=bad).get(30) == 9
    assert pool.map_async(H.square, [1, 2], callback=bad).get(30) == [1, 4]


def test_imap_reads_its_input_lazily(bpool):
    pool = bpool(2)
    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield i
            i += 1
    it = pool.imap(H.square, endless())
    assert [next(it) for _ in range(20)] == [x * x for x in range(20)]
    assert len(read) < 20 + 4 * 2 + 4 + 3, "the input is read a bounded way ahead"
    pool.terminate()
    with pytest.raises(bigmp.MachineStopped):
        for _ in range(100):
            next(it)


def test_unclosed_pool_warns_and_frees_its_machines():
    import gc
    pool = bigmp.Pool(1)
    assert pool.apply(H.square, (2,)) == 4
    machines = pool.session.machines()
    with pytest.warns(ResourceWarning, match="unclosed running bigmp pool"):
        del pool
        gc.collect()
    wait_until(lambda: all(m.state == State.STOPPED for m in machines), timeout=30,
               what="the machines of a forgotten pool to stop")


def test_pool_on_a_given_session():
    with bigmp.start() as b:
        other = b.start(1, services={"Echo": _Echo()})[0]
        pool = bigmp.Pool(2, session=b)
        assert pool.session is b
        assert pool.map(H.square, range(10)) == [x * x for x in range(10)]
        mine = pool.machines
        assert len(mine) == 2
        pool.close()
        pool.join()
        assert all(m.state == State.STOPPED for m in mine)
        assert not isinstance(mine[0].err, bigmp.MachineLost)
        assert other.call("Echo.echo", 5) == 5          # the session is still there
        with pytest.raises(TypeError):
            bigmp.Pool(1, session=b, system="local")


class _Echo:
    def echo(self, x):
        return x


def test_maxtasksperchild_on_a_given_session():
    with bigmp.start() as b:
        with bigmp.Pool(1, maxtasksperchild=1, session=b) as pool:
            pids = pool.map(H.getpid, range(4), 1)
        assert len(set(pids)) == 4
        retired = [m for m in b.machines() if m.state == State.STOPPED]
        assert len(retired) >= 3
        assert not any(isinstance(m.err, bigmp.MachineLost) for m in retired)


class _FakeTTY:
    def __init__(self):
        self.parts = []

    def isatty(self):
        return True

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_progress_is_silent_without_a_terminal(bpool, capsys):
    pool = bpool()
    assert pool.map(H.square, range(20), progress=True) == [x * x for x in range(20)]
    assert list(pool.imap(H.square, range(5), progress=True)) == [0, 1, 4, 9, 16]
    assert capsys.readouterr().err == ""


def test_progress_line_on_a_terminal(bpool, monkeypatch):
    pool = bpool()
    fake = _FakeTTY()
    monkeypatch.setitem(sys.modules, "tqdm", None)     # force the plain line
    monkeypatch.setattr(sys, "stderr", fake)
    assert pool.map(H.square, range(20), 3, progress=True) == [x * x for x in range(20)]
    out = "".join(fake.parts)
    assert "20/20" in out and "100%" in out and out.endswith("\n")
    fake.parts.clear()
    assert len(list(pool.imap_unordered(H.square, iter(range(7)), progress="squares"))) == 7
    out = "".join(fake.parts)
    assert "squares: 7" in out and out.endswith("\n")


def test_progress_uses_tqdm_when_installed(bpool, monkeypatch):
    import types
    bars = []

    class FakeBar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.setattr(sys, "stderr", _FakeTTY())
    pool = bpool()
    assert pool.map(H.square, range(30), 4, progress=True) == [x * x for x in range(30)]
    assert len(bars) == 1 and bars[0].total == 30 and bars[0].n == 30 and bars[0].closed


def test_pool_and_executor_on_every_backend(backend):
    """The same small workload on each backend of the contract suite (local fork, spawn, ssh)."""
    with bigmp.Pool(2, **backend) as pool:
        assert pool.map(H.square, range(10), 2) == [x * x for x in range(10)]
        assert pool.apply(lambda a, b: a * b, (6, 7)) == 42
        with pytest.raises(ValueError, match="bad value 5"):
            pool.map(H.fail_on, range(8))
        pool.close()
        pool.join()
    with bigmp.Executor(2, **backend) as ex:
        assert list(ex.map(H.add, range(4), range(4), chunksize=3)) == [0, 2, 4, 6]
