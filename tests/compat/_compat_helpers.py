"""Module-level helpers for the manager compatibility suite.

Everything a manager server or a child process has to unpickle lives here, at
module level, so that it can be pickled *by reference* -- which is what the
stdlib needs for the 'spawn' start method.  ``bigmp`` is never imported at
module import time: the bigmp-based manager subclasses are built lazily by the
module ``__getattr__`` (PEP 562), so a spawned child that unpickles
``_compat_helpers.BigCompatManager`` rebuilds exactly the same class.
"""

import os
import queue
import threading
import traceback
import types
from multiprocessing.managers import BaseManager, BaseProxy

AUTHKEY = b"bigmp-compat-authkey"
LOOPBACK = ("127.0.0.1", 0)
# Upper bound for any blocking wait in the suite.  Tests never sleep to
# synchronise; this is only a deadline so a broken implementation fails
# instead of hanging.
TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# Referents (the objects living inside the manager server)
# ---------------------------------------------------------------------------

class CompatError(Exception):
    """A user-defined exception class raised by referents."""


class FooBar:
    """Like CPython's FooBar in _test_multiprocessing, plus a few extras."""

    def f(self):
        return "f()"

    def g(self):
        raise ValueError("g failed")

    def _h(self):
        return "_h()"

    def add(self, a, b=0):
        return a + b

    def echo(self, *args, **kwargs):
        return args, kwargs

    def fail(self, *args):
        raise CompatError(*args)

    def raise_key(self, key):
        raise KeyError(key)

    def unpicklable(self):
        return threading.Lock()

    def pid(self):
        return os.getpid()

    def __repr__(self):
        return "FooBar-repr"


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm2(self):
        return self.x * self.x + self.y * self.y

    def move(self, dx, dy):
        self.x += dx
        self.y += dy
        return (self.x, self.y)

    def coords(self):
        return (self.x, self.y)

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None

    def __repr__(self):
        return "Point(%r, %r)" % (self.x, self.y)


class Counter:
    def __init__(self, start=0):
        self._n = start
        self._lock = threading.Lock()

    def increment(self, n=1):
        with self._lock:
            self._n += n
            return self._n

    def value(self):
        return self._n

    def secret(self):
        # public, but deliberately not in CounterProxy._exposed_
        return "secret"


class Factory:
    def make_counter(self, start=0):
        return Counter(start)

    def make_point(self, x, y):
        return Point(x, y)

    def name(self):
        return "factory"


def squares(n=10):
    for i in range(n):
        yield i * i


_INIT_STATE = {}


def compat_initializer(key, value):
    """Manager-server initializer: records something the tests can query."""
    _INIT_STATE[key] = value


class InitProbe:
    def get(self, key):
        return _INIT_STATE.get(key)

    def pid(self):
        return os.getpid()


_TRACKED_LOCK = threading.Lock()
_TRACKED = {"alive": 0}


class Tracked:
    """Counts live instances in the server so referent lifetime is observable."""

    def __init__(self):
        with _TRACKED_LOCK:
            _TRACKED["alive"] += 1

    def __del__(self):
        with _TRACKED_LOCK:
            _TRACKED["alive"] -= 1

    def ping(self):
        return "pong"


class TrackerStats:
    def alive(self):
        return _TRACKED["alive"]


_SHARED_QUEUE = queue.Queue()


def get_shared_queue():
    """The classic 'get_queue' pattern of the multiprocessing docs."""
    return _SHARED_QUEUE


def failing_factory(message):
    raise CompatError(message)


def square(x):
    return x * x


def raise_value_error(message):
    raise ValueError(message)


# ---------------------------------------------------------------------------
# Proxy types
# ---------------------------------------------------------------------------

class IteratorProxy(BaseProxy):
    """Same shape as multiprocessing.managers.IteratorProxy / CPython's test."""
    _exposed_ = ("__next__",)

    def __iter__(self):
        return self

    def __next__(self):
        return self._callmethod("__next__")


class CounterProxy(BaseProxy):
    _exposed_ = ("increment", "value")

    def increment(self, n=1):
        return self._callmethod("increment", (n,))

    def value(self):
        return self._callmethod("value")

    # purely client-side helpers built on _callmethod
    def increment_twice(self):
        self.increment()
        return self.increment()

    @property
    def count(self):
        return self._callmethod("value")


class FactoryProxy(BaseProxy):
    _exposed_ = ("make_counter", "make_point", "name")
    _method_to_typeid_ = {"make_counter": "CounterRef", "make_point": "PointRef"}

    def make_counter(self, start=0):
        return self._callmethod("make_counter", (start,))

    def make_point(self, x, y):
        return self._callmethod("make_point", (x, y))

    def name(self):
        return self._callmethod("name")


# ---------------------------------------------------------------------------
# Manager classes
# ---------------------------------------------------------------------------

def register_compat_typeids(cls):
    """Register every typeid the BaseManager tests use on ``cls``."""
    cls.register("Foo", FooBar)
    cls.register("Bar", FooBar, exposed=("f", "_h"))
    cls.register("Point", Point)
    cls.register("Counter", Counter, proxytype=CounterProxy)
    cls.register("CounterRef", proxytype=CounterProxy, create_method=False)
    cls.register("PointRef", create_method=False)
    cls.register("Factory", Factory, method_to_typeid={"make_counter": "CounterRef"})
    cls.register("Factory2", Factory, proxytype=FactoryProxy)
    cls.register("Iterator", squares, proxytype=IteratorProxy, exposed=("__next__",))
    cls.register("InitProbe", InitProbe)
    cls.register("Tracked", Tracked)
    cls.register("TrackerStats", TrackerStats)
    cls.register("get_shared_queue", get_shared_queue)
    cls.register("Failing", failing_factory)
    cls.register("Seq", list, exposed=("__len__", "__getitem__", "__contains__", "append"))
    return cls


def register_queue_client(cls):
    """Client-side registration without callable (CPython's QueueManager2)."""
    cls.register("get_shared_queue")
    cls.register("Foo")
    return cls


def _make_subclass(name, base, setup):
    def body(ns):
        ns["__module__"] = __name__
        ns["__qualname__"] = name
        ns["__doc__"] = "compat-suite subclass of %s.%s" % (base.__module__, base.__qualname__)

    cls = types.new_class(name, (base,), exec_body=body)
    if setup is not None:
        setup(cls)
    return cls


StdCompatManager = _make_subclass("StdCompatManager", BaseManager, register_compat_typeids)
StdQueueClient = _make_subclass("StdQueueClient", BaseManager, register_queue_client)

# name -> (bigmp attribute, setup function); built on first access.
_LAZY_BIGMP_CLASSES = {
    "BigCompatManager": ("BigManager", register_compat_typeids),
    "BigQueueClient": ("BigManager", register_queue_client),
}


def __getattr__(name):
    spec = _LAZY_BIGMP_CLASSES.get(name)
    if spec is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    import bigmp

    base = getattr(bigmp, spec[0])
    cls = _make_subclass(name, base, spec[1])
    globals()[name] = cls
    return cls


def compat_manager_class(flavour):
    """Manager subclass with all compat typeids registered."""
    if flavour == "stdlib":
        return StdCompatManager
    return globals().get("BigCompatManager") or __getattr__("BigCompatManager")


def queue_client_class(flavour):
    """Manager subclass that registers the typeids *without* callables."""
    if flavour == "stdlib":
        return StdQueueClient
    return globals().get("BigQueueClient") or __getattr__("BigQueueClient")


# ---------------------------------------------------------------------------
# Child-process plumbing
# ---------------------------------------------------------------------------

def child_entry(conn, func, args, kwargs):
    """Process target: run func and report ('ok', result) or ('error', tb)."""
    try:
        try:
            result = func(*args, **kwargs)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))
    finally:
        conn.close()


class Child:
    """A child process running ``func(*args, **kwargs)`` via child_entry."""

    def __init__(self, ctx, func, *args, daemon=True, **kwargs):
        self.name = getattr(func, "__name__", repr(func))
        self._reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=child_entry,
                                   args=(writer, func, args, kwargs),
                                   daemon=daemon)
        self.process.start()
        writer.close()

    def result(self, timeout=TIMEOUT):
        try:
            if not self._reader.poll(timeout):
                raise AssertionError("child %s produced no result within %ss"
                                     % (self.name, timeout))
            try:
                status, value = self._reader.recv()
            except EOFError:
                self.process.join(timeout)
                raise AssertionError("child %s died without a result (exitcode %r)"
                                     % (self.name, self.process.exitcode))
        finally:
            self.close()
        if status != "ok":
            raise AssertionError("child %s failed:\n%s" % (self.name, value))
        return value

    def close(self):
        self._reader.close()
        self.process.join(TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(TIMEOUT)


def run_in_child(ctx, func, *args, daemon=True, **kwargs):
    return Child(ctx, func, *args, daemon=daemon, **kwargs).result()


def serve_forever_child(conn, manager_cls, address, authkey):
    """Process target: Manager(...).get_server().serve_forever()."""
    manager = manager_cls(address=address, authkey=authkey)
    server = manager.get_server()
    conn.send(server.address)
    conn.close()
    server.serve_forever()


# ---------------------------------------------------------------------------
# Functions run in child processes (BaseManager suite)
# ---------------------------------------------------------------------------

def child_use_counter_and_foo(counter, foo):
    out = {}
    out["increment"] = counter.increment(5)
    out["twice"] = counter.increment_twice()
    out["isinstance"] = isinstance(counter, CounterProxy)
    out["f"] = foo.f()
    out["add"] = foo.add(2, b=3)
    try:
        foo.g()
    except ValueError as e:
        out["g"] = ("ValueError", str(e))
    out["pid"] = os.getpid()
    return out


def child_iterate(proxy):
    return list(proxy)


def child_connect_and_put(client_cls, address, authkey, items):
    manager = client_cls(address=address, authkey=authkey)
    manager.connect()
    q = manager.get_shared_queue()
    for item in items:
        q.put(item)
    return len(items)


def child_create_via_inherited_manager(manager):
    counter = manager.Counter(10)
    counter.increment()
    foo = manager.Foo()
    return counter.value(), foo.f()


def child_runs_own_manager(manager_cls):
    """A child process starting (and shutting down) a manager of its own."""
    with manager_cls(address=LOOPBACK, authkey=AUTHKEY) as manager:
        counter = manager.Counter(1)
        return counter.increment(), manager.InitProbe().pid() != os.getpid()


def child_runs_own_sync_manager(manager_cls):
    with manager_cls(address=LOOPBACK, authkey=AUTHKEY) as manager:
        d = manager.dict(a=1)
        q = manager.Queue()
        q.put(d["a"] + 1)
        return q.get(timeout=TIMEOUT)


def child_recv_proxy_from_pipe(conn):
    counter = conn.recv()
    conn.close()
    return counter.increment(7)


def pool_task_increment(counter, n):
    return counter.increment(n)


# ---------------------------------------------------------------------------
# Functions run in child processes (SyncManager suite)
# ---------------------------------------------------------------------------

def child_queue_double(inq, outq, n):
    items = [inq.get(timeout=TIMEOUT) for _ in range(n)]
    for item in items:
        outq.put(item * 2)
    return items


def child_joinable_worker(q, results):
    handled = 0
    while True:
        item = q.get(timeout=TIMEOUT)
        try:
            if item is None:
                return handled
            results.append(item * 10)
            handled += 1
        finally:
            q.task_done()


def child_try_acquire(lock):
    got = lock.acquire(False)
    if got:
        lock.release()
    return got


def child_acquire_blocking(lock):
    got = lock.acquire(timeout=TIMEOUT)
    if got:
        lock.release()
    return got


def child_locked_increments(lock, value, n):
    for _ in range(n):
        with lock:
            value.value = value.value + 1
    return n


def child_semaphore_take(sem, n):
    return [sem.acquire(False) for _ in range(n)]


def child_condition_notify(cond, ns):
    with cond:
        ns.ready = True
        cond.notify_all()
    return True


def child_event_wait(event):
    return event.wait(TIMEOUT)


def child_event_set(event):
    event.set()
    return event.is_set()


def child_barrier_wait(barrier):
    return barrier.wait(TIMEOUT)


def child_barrier_info(barrier):
    return barrier.parties, barrier.n_waiting, barrier.broken


def child_dict_ops(d):
    d["child"] = "yes"
    d["x"] = d["x"] + 1
    return sorted(d.keys()), d.get("missing", "dflt"), len(d)


def child_list_ops(lst):
    lst.append("child")
    lst[0] = "changed"
    lst.extend([1, 2])
    return len(lst), lst[-1], list(lst)


def child_nested_ops(outer, table):
    outer[0]["from_child"] = True
    outer[1].append("child")
    table["list"].append(3)
    return dict(outer[0]), list(outer[1]), list(table["list"])


def child_namespace_ops(ns):
    ns.y = ns.x * 2
    del ns.z
    return ns.y, hasattr(ns, "z"), hasattr(ns, "_private")


def child_value_array_ops(value, array):
    value.value = value.value + 1
    array[0] = 99
    return value.get(), list(array), len(array)


def child_pool_ops(pool):
    # Note: no apply_async/imap here.  With the stdlib, a proxy that was
    # unpickled in another process has no manager, so methods listed in
    # method_to_typeid (which must build a new proxy) fail there.
    return (pool.map(square, range(5)),
            pool.apply(square, (7,)),
            pool.starmap(pow, [(2, 6)]))


def pool_task_put(q, item):
    q.put(item * 2)
    return item


def child_queue_get_nowait_empty(q):
    try:
        q.get_nowait()
    except queue.Empty:
        return "Empty"
    return "no exception"
