"""bigmp.BigSyncManager must be a drop-in replacement for
multiprocessing.managers.SyncManager.

Each test is parametrised over [stdlib, bigmp] (see conftest.py); the stdlib
run proves the test encodes real SyncManager behaviour.  Shared objects are
exercised from the owning thread, from other threads and from child processes
('fork' and 'spawn').
"""

import copy
import io
import multiprocessing
import queue
import threading
from multiprocessing import AuthenticationError, ProcessError
from multiprocessing.managers import BaseProxy, RemoteError

import pytest

from . import _compat_helpers as H

pytestmark = pytest.mark.timeout(60)


def _run_threads(targets):
    """Start one thread per callable, join with a deadline, re-raise errors."""
    errors = []
    results = [None] * len(targets)

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # pragma: no cover - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(H.TIMEOUT)
        assert not t.is_alive(), "thread did not finish within deadline"
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------
# Manager-level behaviour
# ---------------------------------------------------------------------------

class TestSyncManagerLifecycle:
    def test_registered_typeids(self, sync_cls):
        for name in ("Queue", "JoinableQueue", "Event", "Lock", "RLock", "Semaphore",
                     "BoundedSemaphore", "Condition", "Barrier", "Pool", "list", "dict",
                     "Value", "Array", "Namespace"):
            assert callable(getattr(sync_cls, name)), name

    def test_context_manager(self, sync_cls):
        with sync_cls(address=H.LOOPBACK, authkey=H.AUTHKEY) as m:
            assert isinstance(m, sync_cls)
            d = m.dict(a=1)
            assert d["a"] == 1
            host, port = m.address
            assert host == "127.0.0.1" and port > 0

    def test_start_with_initializer(self, make_manager, sync_cls):
        # CPython TestInitializers: the initializer runs in the server process
        # and may use proxies of another manager.
        ns = make_manager(sync_cls).Namespace(test=0)
        m = make_manager(sync_cls, start=False)
        with pytest.raises(TypeError):
            m.start(1)
        m.start(_bump_namespace, (ns,))
        assert ns.test == 1

    def test_proxy_types(self, sm):
        from multiprocessing import managers as mpm

        assert isinstance(sm.list(), mpm.ListProxy)
        assert isinstance(sm.dict(), mpm.DictProxy)
        for proxy in (sm.Queue(), sm.JoinableQueue(), sm.Lock(), sm.RLock(), sm.Semaphore(),
                      sm.BoundedSemaphore(), sm.Condition(), sm.Event(), sm.Barrier(2),
                      sm.Value("i", 0), sm.Array("i", [0]), sm.Namespace()):
            assert isinstance(proxy, BaseProxy), type(proxy)

    def test_child_process_runs_its_own_manager(self, sync_cls, child_ctx):
        assert H.run_in_child(child_ctx, H.child_runs_own_sync_manager, sync_cls,
                              daemon=False) == 2

    def test_start_twice_raises(self, sm):
        with pytest.raises(ProcessError):
            sm.start()

    def test_connect_second_manager(self, sm_default, make_manager, sync_cls):
        sm = sm_default
        client = make_manager(sync_cls, start=False, address=sm.address, authkey=None)
        client.connect()
        d = client.dict(k="v")
        lst = client.list([1, 2])
        assert d["k"] == "v"
        assert list(lst) == [1, 2]
        # proxies from the owner can be handed to objects created by the client
        lst.append(sm.dict(x=1))
        assert lst[2]["x"] == 1

    def test_get_server_serve_forever_in_subprocess(self, make_manager, sync_cls, fork_ctx):
        reader, writer = fork_ctx.Pipe(duplex=False)
        proc = fork_ctx.Process(target=H.serve_forever_child,
                                args=(writer, sync_cls, H.LOOPBACK, H.AUTHKEY), daemon=True)
        proc.start()
        writer.close()
        try:
            assert reader.poll(H.TIMEOUT), "server did not report its address"
            address = reader.recv()
            a = make_manager(sync_cls, start=False, address=address)
            a.connect()
            b = make_manager(sync_cls, start=False, address=address)
            b.connect()
            q = a.Queue()
            d = b.dict()
            q.put("item")
            d["from-b"] = q.get(timeout=H.TIMEOUT)
            assert dict(d) == {"from-b": "item"}
            lock = a.Lock()
            with lock:
                assert H.run_in_child(fork_ctx, H.child_try_acquire, lock) is False
        finally:
            reader.close()
            proc.terminate()
            proc.join(H.TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(H.TIMEOUT)

    def test_wrong_authkey(self, sm, make_manager, sync_cls):
        client = make_manager(sync_cls, start=False, address=sm.address, authkey=b"wrong")
        with pytest.raises(AuthenticationError):
            client.connect()
        assert sm.list([1])[0] == 1

    def test_connect_refused(self, make_manager, sync_cls, closed_port):
        client = make_manager(sync_cls, start=False, address=("127.0.0.1", closed_port))
        with pytest.raises(ConnectionRefusedError):
            client.connect()

    def test_pickle_serializer_explicit(self, make_manager, sync_cls):
        m = make_manager(sync_cls, serializer="pickle")
        q = m.Queue()
        q.put(H.Point(1, 2))
        assert q.get(timeout=H.TIMEOUT) == H.Point(1, 2)

    def test_start_with_spawn_context(self, make_manager, sync_cls):
        m = make_manager(sync_cls, ctx=multiprocessing.get_context("spawn"))
        d = m.dict()
        d["k"] = [1, 2]
        assert d["k"] == [1, 2]
        lock = m.Lock()
        with lock:
            assert H.run_in_child(multiprocessing.get_context("fork"),
                                  H.child_try_acquire, lock) is False

    def test_authkey_bytes_and_default(self, make_manager, sync_cls):
        m = make_manager(sync_cls, authkey=None)
        client = make_manager(sync_cls, start=False, address=m.address, authkey=None)
        client.connect()
        assert client.Value("i", 3).value == 3


def _bump_namespace(ns):
    ns.test += 1


# ---------------------------------------------------------------------------
# Queue / JoinableQueue
# ---------------------------------------------------------------------------

class TestQueue:
    @pytest.mark.parametrize("typeid", ["Queue", "JoinableQueue"])
    def test_queue_basics(self, sm, typeid):
        q = getattr(sm, typeid)(2)
        assert q.empty()
        q.put(5)
        q.put_nowait(6)
        assert q.qsize() == 2
        assert q.full()
        with pytest.raises(queue.Full):
            q.put_nowait(7)
        with pytest.raises(queue.Full):
            q.put(7, timeout=0.01)
        assert q.get() == 5
        assert q.get_nowait() == 6
        assert q.empty()
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.01)
        with pytest.raises(queue.Empty):
            q.get(False)

    def test_queue_fifo_objects(self, sm):
        q = sm.Queue()
        items = [1, "two", (3,), {"four": 4}, H.Point(5, 5), None]
        for item in items:
            q.put(item)
        assert [q.get(timeout=H.TIMEOUT) for _ in items] == items

    def test_queue_file_like_values_by_value(self, sm):
        q = sm.Queue()
        q.put(io.BytesIO(b"payload"))
        got = q.get(timeout=H.TIMEOUT)
        assert type(got) is io.BytesIO and got.getvalue() == b"payload"
        d = sm.dict()
        d["s"] = io.StringIO("text")
        assert d["s"].getvalue() == "text"

    def test_unpicklable_argument_keeps_proxy_usable(self, sm):
        lst = sm.list()
        with pytest.raises(TypeError):
            lst.append(threading.Lock())
        lst.append(1)
        assert list(lst) == [1]

    def test_queue_threads_producer_consumer(self, sm):
        q = sm.Queue()
        n_producers, per = 4, 25

        def produce(base):
            return lambda: [q.put(base + i) for i in range(per)] and None

        def consume():
            return [q.get(timeout=H.TIMEOUT) for _ in range(n_producers * per)]

        results = _run_threads([produce(1000 * k) for k in range(n_producers)] + [consume])
        got = results[-1]
        assert sorted(got) == sorted(1000 * k + i for k in range(n_producers)
                                     for i in range(per))
        # FIFO per producer
        for k in range(n_producers):
            mine = [x for x in got if 1000 * k <= x < 1000 * (k + 1)]
            assert mine == sorted(mine)

    def test_queue_child(self, sm, child_ctx):
        inq, outq = sm.Queue(), sm.Queue()
        for item in (1, 2, 3):
            inq.put(item)
        assert H.run_in_child(child_ctx, H.child_queue_double, inq, outq, 3) == [1, 2, 3]
        assert [outq.get(timeout=H.TIMEOUT) for _ in range(3)] == [2, 4, 6]
        assert H.run_in_child(child_ctx, H.child_queue_get_nowait_empty, inq) == "Empty"

    def test_queue_passed_to_pool_workers(self, sm_default, fork_ctx):
        q = sm_default.Queue()
        with fork_ctx.Pool(2) as pool:
            assert sorted(pool.starmap(H.pool_task_put, [(q, i) for i in range(6)])) == \
                list(range(6))
        assert sorted(q.get(timeout=H.TIMEOUT) for _ in range(6)) == [0, 2, 4, 6, 8, 10]

    def test_joinable_queue_task_done_and_join(self, sm):
        q = sm.JoinableQueue()
        for i in range(3):
            q.put(i)
        for _ in range(3):
            q.get()
            q.task_done()
        q.join()  # returns immediately: all tasks done
        with pytest.raises(ValueError):
            q.task_done()  # called too many times

    def test_joinable_queue_child_worker(self, sm, child_ctx):
        q = sm.JoinableQueue()
        results = sm.list()
        child = H.Child(child_ctx, H.child_joinable_worker, q, results)
        try:
            for i in range(1, 5):
                q.put(i)
            joined = threading.Thread(target=q.join, daemon=True)
            joined.start()
            joined.join(H.TIMEOUT)
            assert not joined.is_alive(), "JoinableQueue.join() did not return"
            assert sorted(results) == [10, 20, 30, 40]
            q.put(None)
            assert child.result() == 4
        finally:
            child.close()


# ---------------------------------------------------------------------------
# Lock / RLock / Semaphore / BoundedSemaphore
# ---------------------------------------------------------------------------

class TestLocks:
    def test_lock_basics(self, sm):
        lock = sm.Lock()
        assert lock.acquire() is True
        assert lock.acquire(False) is False
        assert lock.acquire(timeout=0.01) is False
        lock.release()
        with pytest.raises(RuntimeError):
            lock.release()  # already released
        with lock:
            assert lock.acquire(blocking=False) is False
        assert lock.acquire(blocking=False) is True
        lock.release()

    def test_lock_threads_mutual_exclusion(self, sm):
        lock = sm.Lock()
        value = sm.Value("i", 0)

        def work():
            for _ in range(25):
                with lock:
                    value.value = value.value + 1

        _run_threads([work] * 4)
        assert value.value == 100

    def test_lock_released_by_other_thread(self, sm):
        lock = sm.Lock()
        lock.acquire()
        # a plain Lock (unlike RLock) may be released by another thread
        _run_threads([lock.release])
        assert lock.acquire(False) is True
        lock.release()

    def test_lock_child(self, sm, child_ctx):
        lock = sm.Lock()
        with lock:
            assert H.run_in_child(child_ctx, H.child_try_acquire, lock) is False
        assert H.run_in_child(child_ctx, H.child_try_acquire, lock) is True
        lock.acquire()
        child = H.Child(child_ctx, H.child_acquire_blocking, lock)
        lock.release()
        assert child.result() is True

    def test_lock_child_and_parent_increments(self, sm, child_ctx):
        lock = sm.Lock()
        value = sm.Value("i", 0)
        child = H.Child(child_ctx, H.child_locked_increments, lock, value, 30)
        for _ in range(30):
            with lock:
                value.value = value.value + 1
        assert child.result() == 30
        assert value.value == 60

    def test_rlock_reentrant_and_owned(self, sm):
        rlock = sm.RLock()
        assert rlock.acquire()
        assert rlock.acquire()  # re-entrant for the owning thread
        assert _run_threads([lambda: rlock.acquire(False)]) == [False]

        def release_not_owner():
            with pytest.raises(RuntimeError):
                rlock.release()

        _run_threads([release_not_owner])
        rlock.release()
        rlock.release()
        with pytest.raises(RuntimeError):
            rlock.release()
        assert _run_threads([lambda: child_like_try(rlock)]) == [True]

    def test_rlock_child(self, sm, child_ctx):
        rlock = sm.RLock()
        with rlock:
            with rlock:
                assert H.run_in_child(child_ctx, H.child_try_acquire, rlock) is False
        assert H.run_in_child(child_ctx, H.child_try_acquire, rlock) is True

    def test_semaphore(self, sm):
        sem = sm.Semaphore(2)
        assert sem.acquire() and sem.acquire()
        assert sem.acquire(False) is False
        assert _run_threads([lambda: sem.acquire(False)]) == [False]
        sem.release()
        assert _run_threads([lambda: sem.acquire(False)]) == [True]
        sem.release()
        sem.release()
        sem.release()  # a plain Semaphore may exceed its initial value
        assert [sem.acquire(False) for _ in range(4)] == [True, True, True, False]

    def test_semaphore_wakes_blocked_thread(self, sm):
        sem = sm.Semaphore(0)
        result = []
        waiter = threading.Thread(target=lambda: result.append(sem.acquire(timeout=H.TIMEOUT)))
        waiter.start()
        sem.release()
        waiter.join(H.TIMEOUT)
        assert result == [True]

    def test_semaphore_child(self, sm, child_ctx):
        sem = sm.Semaphore(3)
        sem.acquire()
        assert H.run_in_child(child_ctx, H.child_semaphore_take, sem, 3) == [True, True, False]
        sem.release()
        assert sem.acquire(False) is True

    def test_bounded_semaphore(self, sm):
        sem = sm.BoundedSemaphore(1)
        with pytest.raises(ValueError):
            sem.release()  # released too many times
        assert sem.acquire(False) is True
        assert sem.acquire(False) is False
        sem.release()
        with sem:
            assert sem.acquire(False) is False

    def test_bounded_semaphore_child(self, sm, child_ctx):
        sem = sm.BoundedSemaphore(2)
        assert H.run_in_child(child_ctx, H.child_semaphore_take, sem, 3) == [True, True, False]
        sem.release()
        sem.release()
        with pytest.raises(ValueError):
            sem.release()


def child_like_try(lock):
    got = lock.acquire(False)
    if got:
        lock.release()
    return got


# ---------------------------------------------------------------------------
# Condition / Event / Barrier
# ---------------------------------------------------------------------------

class TestConditionEventBarrier:
    def test_condition_basics(self, sm):
        cond = sm.Condition()
        with cond:
            assert cond.wait(0.01) is False  # nobody notifies: times out
            assert cond.wait_for(lambda: True, timeout=0) is True
            cond.notify()
            cond.notify_all()
        with pytest.raises(RuntimeError):
            cond.notify()  # not holding the lock

    def test_condition_with_supplied_lock(self, sm_default):
        sm = sm_default
        lock = sm.Lock()
        cond = sm.Condition(lock)
        with cond:
            assert lock.acquire(False) is False
        assert lock.acquire(False) is True
        lock.release()

    def test_condition_notify_all_threads(self, sm):
        cond = sm.Condition()
        ns = sm.Namespace(go=False, waiting=0)

        def waiter():
            with cond:
                ns.waiting = ns.waiting + 1
                cond.notify_all()
                return cond.wait_for(lambda: ns.go, timeout=H.TIMEOUT)

        def releaser():
            with cond:
                assert cond.wait_for(lambda: ns.waiting == 3, timeout=H.TIMEOUT)
                ns.go = True
                cond.notify_all()
            return "released"

        assert _run_threads([waiter, waiter, waiter, releaser]) == [True, True, True,
                                                                    "released"]

    def test_condition_child_notifies(self, sm, child_ctx):
        cond = sm.Condition()
        ns = sm.Namespace(ready=False)
        with cond:
            child = H.Child(child_ctx, H.child_condition_notify, cond, ns)
            assert cond.wait_for(lambda: ns.ready, timeout=H.TIMEOUT) is True
        assert child.result() is True

    def test_event_basics(self, sm):
        event = sm.Event()
        assert event.is_set() is False
        assert event.wait(0.01) is False
        event.set()
        assert event.is_set() is True
        assert event.wait() is True
        assert event.wait(0) is True
        event.clear()
        assert event.is_set() is False

    def test_event_threads(self, sm):
        event = sm.Event()
        waiters = [lambda: event.wait(H.TIMEOUT)] * 3
        results = _run_threads(waiters + [lambda: event.set()])
        assert results == [True, True, True, None]

    def test_event_child(self, sm, child_ctx):
        event = sm.Event()
        child = H.Child(child_ctx, H.child_event_wait, event)
        event.set()
        assert child.result() is True
        other = sm.Event()
        assert H.run_in_child(child_ctx, H.child_event_set, other) is True
        assert other.is_set() is True

    def test_barrier_properties(self, sm):
        barrier = sm.Barrier(3)
        assert barrier.parties == 3
        assert barrier.n_waiting == 0
        assert barrier.broken is False
        barrier.abort()
        assert barrier.broken is True
        with pytest.raises(threading.BrokenBarrierError):
            barrier.wait(H.TIMEOUT)
        barrier.reset()
        assert barrier.broken is False

    def test_barrier_threads(self, sm):
        barrier = sm.Barrier(3)
        results = _run_threads([lambda: barrier.wait(H.TIMEOUT)] * 3)
        assert sorted(results) == [0, 1, 2]
        assert barrier.broken is False

    def test_barrier_timeout_breaks(self, sm):
        barrier = sm.Barrier(2)
        with pytest.raises(threading.BrokenBarrierError):
            barrier.wait(0.01)
        assert barrier.broken is True

    def test_barrier_child(self, sm, child_ctx):
        barrier = sm.Barrier(2)
        assert H.run_in_child(child_ctx, H.child_barrier_info, barrier) == (2, 0, False)
        child = H.Child(child_ctx, H.child_barrier_wait, barrier)
        mine = barrier.wait(H.TIMEOUT)
        theirs = child.result()
        assert sorted([mine, theirs]) == [0, 1]


# ---------------------------------------------------------------------------
# dict / list (incl. nested proxies)
# ---------------------------------------------------------------------------

class TestDictList:
    def test_dict_operations(self, sm):
        d = sm.dict({"a": 1}, b=2)
        assert len(d) == 2
        assert d["a"] == 1 and d["b"] == 2
        d["c"] = 3
        assert "c" in d and "zz" not in d
        assert d.get("zz") is None
        assert d.get("zz", 5) == 5
        assert sorted(d.keys()) == ["a", "b", "c"]
        assert sorted(d.values()) == [1, 2, 3]
        assert sorted(d.items()) == [("a", 1), ("b", 2), ("c", 3)]
        assert sorted(iter(d)) == ["a", "b", "c"]
        assert sorted(d) == ["a", "b", "c"]
        d.update({"d": 4}, e=5)
        assert d.pop("e") == 5
        assert d.pop("e", "gone") == "gone"
        assert d.setdefault("f", 6) == 6
        assert d.setdefault("f", 7) == 6
        del d["f"]
        with pytest.raises(KeyError):
            d["missing"]
        with pytest.raises(KeyError):
            del d["missing"]
        assert d.copy() == {"a": 1, "b": 2, "c": 3, "d": 4}
        assert type(d.copy()) is dict
        assert dict(d) == {"a": 1, "b": 2, "c": 3, "d": 4}
        assert d._getvalue() == {"a": 1, "b": 2, "c": 3, "d": 4}
        assert copy.deepcopy(d) == {"a": 1, "b": 2, "c": 3, "d": 4}
        key, value = d.popitem()
        assert key == "d" and value == 4
        d.clear()
        assert len(d) == 0

    def test_dict_str_and_repr(self, sm):
        d = sm.dict(a=1)
        assert str(d) == "{'a': 1}"
        assert "dict" in repr(d)

    def test_list_operations(self, sm):
        lst = sm.list([3, 1, 2])
        assert len(lst) == 3
        lst.append(4)
        lst.extend([5, 6])
        lst.insert(0, 0)
        assert list(lst) == [0, 3, 1, 2, 4, 5, 6]
        assert lst[0] == 0 and lst[-1] == 6
        assert lst[1:3] == [3, 1]
        assert lst.index(2) == 3
        assert lst.count(3) == 1
        assert 5 in lst and 42 not in lst
        lst.remove(5)
        assert lst.pop() == 6
        assert lst.pop(0) == 0
        lst.sort()
        assert list(lst) == [1, 2, 3, 4]
        lst.reverse()
        assert list(lst) == [4, 3, 2, 1]
        lst[0] = "x"
        del lst[1]
        assert list(lst) == ["x", 2, 1]
        assert lst + [9] == ["x", 2, 1, 9]
        assert lst * 2 == ["x", 2, 1, "x", 2, 1]
        assert 2 * lst == ["x", 2, 1, "x", 2, 1]
        assert list(reversed(lst)) == [1, 2, "x"]
        assert [x for x in lst] == ["x", 2, 1]
        with pytest.raises(IndexError):
            lst[10]
        with pytest.raises(ValueError):
            lst.index("nope")
        assert lst._getvalue() == ["x", 2, 1]
        assert copy.deepcopy(lst) == ["x", 2, 1]

    def test_list_inplace_operators_keep_proxy(self, sm):
        lst = sm.list([5])
        orig = lst
        lst += [7]
        assert lst is orig
        assert list(lst) == [5, 7]
        lst *= 2
        assert lst is orig
        assert list(lst) == [5, 7, 5, 7]

    def test_list_str_and_repr(self, sm):
        lst = sm.list([1, "a"])
        assert str(lst) == "[1, 'a']"
        assert "list" in repr(lst)

    def test_dict_list_threads(self, sm):
        d = sm.dict()
        lst = sm.list()

        def work(k):
            def run():
                for i in range(20):
                    d["%d-%d" % (k, i)] = i
                    lst.append((k, i))
            return run

        _run_threads([work(k) for k in range(4)])
        assert len(d) == 80
        assert len(lst) == 80
        assert sorted(lst) == sorted((k, i) for k in range(4) for i in range(20))

    def test_dict_child(self, sm, child_ctx):
        d = sm.dict(x=1)
        keys, missing, n = H.run_in_child(child_ctx, H.child_dict_ops, d)
        assert keys == ["child", "x"] and missing == "dflt" and n == 2
        assert d["child"] == "yes" and d["x"] == 2

    def test_list_child(self, sm, child_ctx):
        lst = sm.list(["a", "b"])
        n, last, seen = H.run_in_child(child_ctx, H.child_list_ops, lst)
        assert (n, last) == (5, 2)
        assert seen == ["changed", "b", "child", 1, 2]
        assert list(lst) == seen

    def test_nested_proxies(self, sm_default):
        sm = sm_default
        inner_d = sm.dict()
        inner_l = sm.list()
        outer = sm.list([inner_d, inner_l])
        outer[0]["k"] = "v"
        outer[1].append(1)
        assert inner_d["k"] == "v"
        assert list(inner_l) == [1]
        assert isinstance(outer[0], BaseProxy)
        inner_d["k2"] = "v2"
        assert outer[0]["k2"] == "v2"
        # documented pattern: a dict of managed lists
        table = sm.dict()
        table["list"] = sm.list()
        table["list"].append(1)
        table["list"].append(2)
        assert list(table["list"]) == [1, 2]
        # nested proxies survive the original local proxies being dropped
        del inner_d, inner_l
        assert outer[0]["k"] == "v"
        assert list(outer[1]) == [1]

    def test_nested_proxies_child(self, sm_default, child_ctx):
        sm = sm_default
        outer = sm.list([sm.dict(a=1), sm.list(["p"])])
        table = sm.dict(list=sm.list([1, 2]))
        got = H.run_in_child(child_ctx, H.child_nested_ops, outer, table)
        assert got == ({"a": 1, "from_child": True}, ["p", "child"], [1, 2, 3])
        assert outer[0]["from_child"] is True
        assert list(outer[1]) == ["p", "child"]
        assert list(table["list"]) == [1, 2, 3]


# ---------------------------------------------------------------------------
# Namespace / Value / Array
# ---------------------------------------------------------------------------

class TestNamespaceValueArray:
    def test_namespace(self, sm):
        ns = sm.Namespace(x=1, z="zed")
        assert ns.x == 1
        ns.y = "two"
        assert ns.y == "two"
        del ns.y
        assert not hasattr(ns, "y")
        with pytest.raises(AttributeError):
            ns.missing
        rendered = str(ns)
        assert "x=1" in rendered and "z='zed'" in rendered
        # names starting with '_' are attributes of the proxy, not the referent
        ns._private = 5
        assert ns._private == 5
        assert "_private" not in str(ns)

    def test_namespace_child(self, sm, child_ctx):
        ns = sm.Namespace(x=21, z=0)
        y, has_z, has_private = H.run_in_child(child_ctx, H.child_namespace_ops, ns)
        assert (y, has_z, has_private) == (42, False, False)
        assert ns.y == 42
        assert not hasattr(ns, "z")

    def test_value(self, sm):
        v = sm.Value("i", 7)
        assert v.value == 7
        assert v.get() == 7
        v.value = 8
        assert v.get() == 8
        v.set(9)
        assert v.value == 9
        d = sm.Value("d", 1.5)
        assert d.value == 1.5
        c = sm.Value(str, "text")  # the manager Value accepts any object
        assert c.value == "text"

    def test_array(self, sm):
        a = sm.Array("i", [1, 2, 3])
        assert len(a) == 3
        assert a[0] == 1 and a[-1] == 3
        a[1] = 20
        assert list(a) == [1, 20, 3]
        assert list(a[0:2]) == [1, 20]
        with pytest.raises(IndexError):
            a[5]
        d = sm.Array("d", [0.5] * 4)
        assert list(d) == [0.5] * 4

    def test_value_array_child(self, sm, child_ctx):
        v = sm.Value("i", 1)
        a = sm.Array("i", range(4))
        got = H.run_in_child(child_ctx, H.child_value_array_ops, v, a)
        assert got == (2, [99, 1, 2, 3], 4)
        assert v.value == 2
        assert list(a) == [99, 1, 2, 3]

    def test_value_threads_with_lock(self, sm):
        v = sm.Value("i", 0)
        lock = sm.RLock()

        def work():
            for _ in range(20):
                with lock:
                    v.value += 1

        _run_threads([work] * 3)
        assert v.value == 60


# ---------------------------------------------------------------------------
# Pool
# ---------------------------------------------------------------------------

class TestPool:
    def test_pool_apply_map(self, sm):
        pool = sm.Pool(2)
        try:
            assert pool.apply(H.square, (3,)) == 9
            assert pool.apply(pow, (2, 10)) == 1024
            assert pool.map(H.square, range(6)) == [0, 1, 4, 9, 16, 25]
            assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
            assert pool.apply_async(H.square, (4,)).get(H.TIMEOUT) == 16
            res = pool.map_async(H.square, [1, 2])
            assert res.get(H.TIMEOUT) == [1, 4]
            assert list(pool.imap(H.square, range(4))) == [0, 1, 4, 9]
            assert sorted(pool.imap_unordered(H.square, range(4))) == [0, 1, 4, 9]
            with pytest.raises(ValueError, match="bad input"):
                pool.apply(H.raise_value_error, ("bad input",))
            with pytest.raises(ValueError, match="async bad"):
                pool.apply_async(H.raise_value_error, ("async bad",)).get(H.TIMEOUT)
            pool.close()
            pool.join()
        finally:
            pool.terminate()

    def test_pool_context_manager(self, sm):
        with sm.Pool(1) as pool:
            assert pool.map(H.square, [2, 3]) == [4, 9]

    def test_pool_threads(self, sm):
        pool = sm.Pool(2)
        try:
            results = _run_threads([lambda i=i: pool.apply(H.square, (i,)) for i in range(4)])
            assert results == [0, 1, 4, 9]
        finally:
            pool.terminate()

    def test_pool_child(self, sm, child_ctx):
        pool = sm.Pool(2)
        try:
            got = H.run_in_child(child_ctx, H.child_pool_ops, pool)
            assert got == ([0, 1, 4, 9, 16], 49, [64])
        finally:
            pool.terminate()


# ---------------------------------------------------------------------------
# Errors surfaced through SyncManager proxies
# ---------------------------------------------------------------------------

class TestSyncErrors:
    def test_unexposed_method_raises_remote_error(self, sm):
        d = sm.dict()
        with pytest.raises(RemoteError):
            d._callmethod("fromkeys", ([1],))
        assert len(d) == 0

    def test_queue_exception_types_in_threads(self, sm):
        q = sm.Queue(1)

        def empty():
            with pytest.raises(queue.Empty):
                q.get_nowait()
            return "ok"

        assert _run_threads([empty, empty]) == ["ok", "ok"]
