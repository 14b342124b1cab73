"""bigmp.BigManager must be a drop-in replacement for
multiprocessing.managers.BaseManager.

Each test is parametrised over [stdlib, bigmp] (see conftest.py); the stdlib
run proves the test encodes real BaseManager behaviour.
"""

import copy
import gc
import io
import multiprocessing
import os
import pickle
import threading
import time
from multiprocessing import AuthenticationError, ProcessError
from multiprocessing.managers import BaseManager, BaseProxy, RemoteError

import pytest

from . import _compat_helpers as H

pytestmark = pytest.mark.timeout(60)


def _assert_nothing_listens(address):
    """After shutdown the server's port must refuse new connections."""
    import socket

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(tuple(address), timeout=H.TIMEOUT).close()


# ---------------------------------------------------------------------------
# register()
# ---------------------------------------------------------------------------

class TestRegister:
    def test_register_creates_method_named_after_typeid(self, base_cls):
        class M(base_cls):
            pass

        M.register("Thing", H.FooBar)
        assert callable(getattr(M, "Thing"))
        assert M.Thing.__name__ == "Thing"

    def test_registered_typeids_on_module_level_subclass(self, compat_cls):
        for name in ("Foo", "Bar", "Point", "Counter", "Factory", "Factory2",
                     "Iterator", "InitProbe", "get_shared_queue"):
            assert callable(getattr(compat_cls, name)), name

    def test_create_method_false_adds_no_method(self, base_cls, compat_cls):
        class M(base_cls):
            pass

        M.register("Hidden", H.FooBar, create_method=False)
        assert not hasattr(M, "Hidden")
        assert not hasattr(compat_cls, "CounterRef")
        assert not hasattr(compat_cls, "PointRef")

    def test_register_on_subclass_does_not_leak(self, base_cls, make_manager):
        class A(base_cls):
            pass

        class B(base_cls):
            pass

        A.register("OnlyA", H.FooBar)

        class C(A):
            pass

        assert hasattr(A, "OnlyA")
        assert hasattr(C, "OnlyA")  # inherited by sub-subclasses
        assert not hasattr(base_cls, "OnlyA")
        assert not hasattr(B, "OnlyA")
        assert not hasattr(BaseManager, "OnlyA")

        # Re-registering a typeid on a subclass does not change the parent.
        C.register("OnlyA", H.Point)
        C.register("OnlyC", H.Counter, proxytype=H.CounterProxy)
        assert not hasattr(A, "OnlyC")

        a = make_manager(A)
        c = make_manager(C)
        assert a.OnlyA().f() == "f()"
        p = c.OnlyA(3, 4)
        assert p.norm2() == 25
        assert c.OnlyC(1).increment() == 2

    def test_register_on_sync_subclass_does_not_leak(self, sync_cls):
        class S(sync_cls):
            pass

        S.register("Extra", H.FooBar)
        assert hasattr(S, "Extra")
        assert hasattr(S, "dict") and hasattr(S, "Queue")
        assert not hasattr(sync_cls, "Extra")
        assert not hasattr(multiprocessing.managers.SyncManager, "Extra")

    def test_local_subclass_registration_usable(self, base_cls, make_manager):
        class M(base_cls):
            pass

        M.register("Counter", H.Counter, proxytype=H.CounterProxy)
        M.register("Foo", H.FooBar)
        m = make_manager(M)
        assert m.Counter(5).increment() == 6
        assert m.Foo().add(1, 2) == 3

    def test_register_explicit_autoproxy(self, base_cls, make_manager):
        class M(base_cls):
            pass

        M.register("Foo", H.FooBar, proxytype=multiprocessing.managers.AutoProxy)
        m = make_manager(M)
        foo = m.Foo()
        assert isinstance(foo, BaseProxy)
        assert foo.add(1, 2) == 3

    def test_register_without_callable_proxies_the_argument(self, base_cls, make_manager):
        class M(base_cls):
            pass

        M.register("Wrap")
        m = make_manager(M)
        wrapped = m.Wrap(H.Point(1, 2))  # the server proxies (a copy of) the argument
        assert wrapped.norm2() == 5
        assert wrapped.move(1, 1) == (2, 3)
        with pytest.raises(Exception):
            m.Wrap()  # without a callable exactly one argument is required

    def test_default_exposed_is_public_methods(self, manager):
        foo = manager.Foo()
        present = [n for n in ("f", "g", "_h", "add", "echo") if hasattr(foo, n)]
        assert present == ["f", "g", "add", "echo"]

    def test_exposed_restricts_methods(self, manager):
        bar = manager.Bar()
        present = [n for n in ("f", "g", "_h", "add") if hasattr(bar, n)]
        assert present == ["f", "_h"]
        assert bar.f() == "f()"
        assert bar._h() == "_h()"
        assert bar._callmethod("_h") == "_h()"

    def test_callmethod_of_unexposed_method_raises_remote_error(self, manager):
        foo = manager.Foo()
        assert foo._callmethod("f") == "f()"
        with pytest.raises(RemoteError):
            foo._callmethod("_h")
        # the proxy (and its connection) remains usable afterwards
        assert foo.f() == "f()"

    def test_user_proxytype_with_exposed_and_own_methods(self, manager):
        counter = manager.Counter(10)
        assert isinstance(counter, H.CounterProxy)
        assert isinstance(counter, BaseProxy)
        assert counter.increment() == 11
        assert counter.increment(4) == 15
        assert counter.increment_twice() == 17
        assert counter.count == 17
        assert counter.value() == 17
        assert not hasattr(counter, "secret")

    def test_proxytype_exposed_limits_callmethod(self, manager):
        counter = manager.Counter()
        # 'secret' is public on the referent but not in CounterProxy._exposed_
        with pytest.raises(RemoteError):
            counter._callmethod("secret")
        assert counter.increment() == 1

    def test_method_to_typeid_returns_proxy_of_registered_proxytype(self, manager):
        factory = manager.Factory()
        assert factory.name() == "factory"
        c1 = factory.make_counter(100)
        c2 = factory.make_counter()
        assert isinstance(c1, H.CounterProxy)
        assert isinstance(c2, H.CounterProxy)
        assert c1.increment() == 101
        assert c2.increment() == 1
        assert c1.value() == 101
        # returned proxies are independent, usable after the factory is gone
        del factory
        gc.collect()
        assert c1.increment_twice() == 103

    def test_proxytype_method_to_typeid_attribute(self, manager):
        factory = manager.Factory2()
        assert isinstance(factory, H.FactoryProxy)
        counter = factory.make_counter(3)
        assert isinstance(counter, H.CounterProxy)
        assert counter.increment() == 4
        point = factory.make_point(1, 2)
        assert isinstance(point, BaseProxy)  # an AutoProxy for typeid 'PointRef'
        assert point.norm2() == 5
        assert point.move(2, 2) == (3, 4)
        assert point._getvalue() == H.Point(3, 4)


# ---------------------------------------------------------------------------
# start() / shutdown() / context manager / address
# ---------------------------------------------------------------------------

class TestLifecycle:
    def test_address_before_start_is_constructor_value(self, compat_cls):
        m = compat_cls(address=("127.0.0.1", 0), authkey=H.AUTHKEY)
        assert tuple(m.address) == ("127.0.0.1", 0)

    def test_start_binds_loopback_address(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        host, port = m.address
        assert host == "127.0.0.1"
        assert isinstance(port, int) and port > 0

    def test_start_and_shutdown(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        assert m.Foo().f() == "f()"
        address = m.address
        m.shutdown()
        _assert_nothing_listens(address)

    def test_proxy_call_after_shutdown_raises(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        used = m.Foo()
        assert used.f() == "f()"  # this thread now has a connection
        unused = m.Counter()  # ... and this proxy's first call will need a new one
        m.shutdown()
        with pytest.raises((EOFError, OSError)):
            used.f()
        with pytest.raises((EOFError, OSError)):
            unused.increment()

    def test_manager_started_from_a_thread(self, make_manager, compat_cls):
        m = make_manager(compat_cls, start=False)
        worker = threading.Thread(target=m.start)
        worker.start()
        worker.join(H.TIMEOUT)
        assert not worker.is_alive()
        assert m.Counter(1).increment() == 2

    def test_garbage_collected_manager_shuts_down_server(self, compat_cls):
        m = compat_cls(address=H.LOOPBACK, authkey=H.AUTHKEY)
        m.start()
        address = m.address
        client = compat_cls(address=address, authkey=H.AUTHKEY)
        client.connect()  # the server is up
        del client, m
        gc.collect()
        _assert_nothing_listens(address)

    def test_shutdown_is_idempotent(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        m.shutdown()
        m.shutdown()

    def test_join_after_shutdown(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        m.shutdown()
        m.join(timeout=H.TIMEOUT)

    def test_server_runs_in_another_process(self, manager):
        assert manager.InitProbe().pid() != os.getpid()
        assert manager.Foo().pid() != os.getpid()

    def test_start_with_initializer(self, make_manager, compat_cls):
        m = make_manager(compat_cls, start=False)
        m.start(H.compat_initializer, ("color", "blue"))
        probe = m.InitProbe()
        assert probe.get("color") == "blue"
        # the initializer ran in the server, not here
        assert "color" not in H._INIT_STATE

    def test_start_with_initializer_keywords(self, make_manager, compat_cls):
        m = make_manager(compat_cls, start=False)
        m.start(initializer=H.compat_initializer, initargs=("answer", 42))
        assert m.InitProbe().get("answer") == 42

    def test_start_initializer_not_callable_raises_type_error(self, make_manager, compat_cls):
        m = make_manager(compat_cls, start=False)
        with pytest.raises(TypeError):
            m.start(1)
        # still startable afterwards
        m.start()
        assert m.Foo().f() == "f()"

    def test_start_twice_raises_process_error(self, manager):
        with pytest.raises(ProcessError):
            manager.start()

    def test_start_after_shutdown_raises_process_error(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        m.shutdown()
        with pytest.raises(ProcessError):
            m.start()

    def test_context_manager_starts_and_shuts_down(self, compat_cls):
        with compat_cls(address=H.LOOPBACK, authkey=H.AUTHKEY) as m:
            assert isinstance(m, compat_cls)
            assert m.Foo().f() == "f()"
            address = m.address
        _assert_nothing_listens(address)

    def test_context_manager_on_prestarted_manager(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        with m as entered:
            assert entered is m
            assert m.Counter(1).increment() == 2
            address = m.address
        _assert_nothing_listens(address)

    def test_context_manager_after_shutdown_raises(self, make_manager, compat_cls):
        m = make_manager(compat_cls)
        m.shutdown()
        with pytest.raises(ProcessError):
            with m:
                pass

    def test_constructor_accepts_ctx_and_shutdown_timeout(self, make_manager, compat_cls):
        m = make_manager(compat_cls, ctx=multiprocessing.get_context("fork"),
                         shutdown_timeout=5.0)
        assert m.Foo().f() == "f()"

    def test_start_with_spawn_context(self, make_manager, compat_cls):
        m = make_manager(compat_cls, start=False, ctx=multiprocessing.get_context("spawn"))
        m.start(H.compat_initializer, ("ctx", "spawn"))
        assert m.InitProbe().get("ctx") == "spawn"
        assert m.Counter(1).increment() == 2
        assert list(m.Iterator(4)) == [0, 1, 4, 9]
        with pytest.raises(ValueError, match="g failed"):
            m.Foo().g()

    def test_default_authkey_is_process_authkey(self, make_manager, compat_cls):
        m = make_manager(compat_cls, authkey=None)
        client = make_manager(compat_cls, start=False, address=m.address, authkey=None)
        client.connect()
        assert client.Foo().f() == "f()"
        explicit = make_manager(compat_cls, start=False, address=m.address,
                                authkey=bytes(multiprocessing.current_process().authkey))
        explicit.connect()
        assert explicit.Counter(0).increment() == 1


# ---------------------------------------------------------------------------
# connect() / get_server() / authentication
# ---------------------------------------------------------------------------

class TestConnect:
    def test_connect_second_manager_object(self, manager, make_manager, compat_cls):
        client = make_manager(compat_cls, start=False, address=manager.address)
        client.connect()
        assert tuple(client.address) == tuple(manager.address)
        assert client.Foo().f() == "f()"
        assert client.Counter(2).increment() == 3
        # both see the same server-side singleton
        manager.get_shared_queue().put("from-owner")
        assert client.get_shared_queue().get(timeout=H.TIMEOUT) == "from-owner"

    def test_connect_with_client_registered_without_callable(self, manager, make_manager,
                                                             client_cls):
        client = make_manager(client_cls, start=False, address=manager.address)
        client.connect()
        q = client.get_shared_queue()
        q.put({"k": [1, 2]})
        assert manager.get_shared_queue().get(timeout=H.TIMEOUT) == {"k": [1, 2]}
        assert client.Foo().add(5, b=6) == 11

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_connect_from_child_process(self, manager, client_cls, method):
        ctx = multiprocessing.get_context(method)
        n = H.run_in_child(ctx, H.child_connect_and_put, client_cls, manager.address,
                           H.AUTHKEY, ["a", 1, (2, 3)])
        assert n == 3
        q = manager.get_shared_queue()
        assert [q.get(timeout=H.TIMEOUT) for _ in range(3)] == ["a", 1, (2, 3)]

    def test_get_server_serve_forever_in_subprocess(self, make_manager, compat_cls,
                                                    client_cls, fork_ctx):
        reader, writer = fork_ctx.Pipe(duplex=False)
        proc = fork_ctx.Process(target=H.serve_forever_child,
                                args=(writer, compat_cls, H.LOOPBACK, H.AUTHKEY),
                                daemon=True)
        proc.start()
        writer.close()
        try:
            assert reader.poll(H.TIMEOUT), "server did not report its address"
            address = reader.recv()
            host, port = address
            assert host == "127.0.0.1" and port > 0

            client = make_manager(compat_cls, start=False, address=address)
            client.connect()
            assert client.Foo().f() == "f()"
            counter = client.Counter(1)
            assert counter.increment() == 2

            other = make_manager(client_cls, start=False, address=address)
            other.connect()
            client.get_shared_queue().put("via-served")
            assert other.get_shared_queue().get(timeout=H.TIMEOUT) == "via-served"
        finally:
            reader.close()
            proc.terminate()
            proc.join(H.TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(H.TIMEOUT)

    def test_get_server_after_start_raises_process_error(self, manager):
        with pytest.raises(ProcessError):
            manager.get_server()

    def test_wrong_authkey_raises_authentication_error(self, manager, make_manager,
                                                       compat_cls):
        client = make_manager(compat_cls, start=False, address=manager.address,
                              authkey=b"not-the-right-key")
        with pytest.raises(AuthenticationError):
            client.connect()
        # the server is unaffected
        assert manager.Foo().f() == "f()"

    def test_connect_to_closed_port_raises_connection_refused(self, make_manager, compat_cls,
                                                              closed_port):
        client = make_manager(compat_cls, start=False, address=("127.0.0.1", closed_port))
        with pytest.raises(ConnectionRefusedError):
            client.connect()

    def test_authkey_bytes_roundtrip(self, make_manager, compat_cls):
        key = os.urandom(32)
        m = make_manager(compat_cls, authkey=key)
        client = make_manager(compat_cls, start=False, address=m.address, authkey=key)
        client.connect()
        assert client.Foo().echo(1, k=2) == ((1,), {"k": 2})


# ---------------------------------------------------------------------------
# Proxies of typeid-created objects
# ---------------------------------------------------------------------------

class TestProxies:
    def test_method_calls_with_args_and_kwargs(self, manager):
        foo = manager.Foo()
        assert foo.f() == "f()"
        assert foo.add(1, 2) == 3
        assert foo.add(1, b=41) == 42
        assert foo.add(a=[1], b=[2]) == [1, 2]
        assert foo.echo(1, "two", x=3.0, y=None) == ((1, "two"), {"x": 3.0, "y": None})

    def test_callmethod_with_args_and_kwds(self, manager):
        foo = manager.Foo()
        assert foo._callmethod("add", (1,), {"b": 2}) == 3
        assert foo._callmethod("echo", (1, 2), {"k": "v"}) == ((1, 2), {"k": "v"})
        with pytest.raises(ValueError, match="g failed"):
            foo._callmethod("g")

    def test_exposed_dunder_methods(self, manager):
        seq = manager.Seq([1, 2])
        assert len(seq) == 2
        assert seq[0] == 1 and seq[-1] == 2
        assert 2 in seq and 3 not in seq
        seq.append(3)
        assert len(seq) == 3
        assert [x for x in seq] == [1, 2, 3]  # iteration via __getitem__/IndexError
        with pytest.raises(IndexError):
            seq[10]
        assert not hasattr(seq, "pop")

    def test_constructor_args_and_kwargs(self, manager):
        p = manager.Point(3, y=4)
        assert p.norm2() == 25
        assert p.coords() == (3, 4)

    def test_builtin_exception_type_and_message(self, manager):
        foo = manager.Foo()
        with pytest.raises(ValueError) as info:
            foo.g()
        assert type(info.value) is ValueError
        assert str(info.value) == "g failed"
        with pytest.raises(KeyError) as info:
            foo.raise_key("missing-key")
        assert type(info.value) is KeyError
        assert info.value.args == ("missing-key",)

    def test_user_exception_type_and_args(self, manager):
        foo = manager.Foo()
        with pytest.raises(H.CompatError) as info:
            foo.fail("boom", 42)
        assert type(info.value) is H.CompatError
        assert info.value.args == ("boom", 42)
        # the proxy keeps working after remote exceptions
        assert foo.f() == "f()"

    def test_exception_in_user_proxytype_method(self, manager):
        factory = manager.Factory2()
        with pytest.raises(TypeError):
            factory.make_point(1)  # missing positional argument on the server side
        assert factory.name() == "factory"

    def test_unpicklable_result_raises_remote_error(self, manager):
        foo = manager.Foo()
        with pytest.raises(RemoteError):
            foo.unpicklable()
        assert foo.f() == "f()"

    def test_unpicklable_argument_raises_in_caller(self, manager):
        foo = manager.Foo()
        with pytest.raises(TypeError):
            foo.echo(threading.Lock())
        # nothing half-sent: the connection is still in sync
        assert foo.f() == "f()"
        assert foo.add(1, 1) == 2

    def test_file_like_arguments_pass_by_value(self, manager):
        foo = manager.Foo()
        args, kwargs = foo.echo(io.BytesIO(b"bytes"), text=io.StringIO("text"))
        assert type(args[0]) is io.BytesIO and args[0].getvalue() == b"bytes"
        assert type(kwargs["text"]) is io.StringIO and kwargs["text"].getvalue() == "text"

    def test_failing_create_raises_remote_error(self, manager):
        with pytest.raises(RemoteError) as info:
            manager.Failing("creation exploded")
        assert "creation exploded" in str(info.value)
        assert manager.Foo().f() == "f()"

    def test_getvalue_returns_copy(self, manager):
        p = manager.Point(1, 2)
        value = p._getvalue()
        assert type(value) is H.Point
        assert value == H.Point(1, 2)
        value.x = 100  # a copy: the referent is not affected
        assert p.coords() == (1, 2)
        p.move(1, 1)
        assert p._getvalue() == H.Point(2, 3)

    def test_deepcopy_returns_value(self, manager):
        p = manager.Point(5, 6)
        value = copy.deepcopy(p)
        assert type(value) is H.Point
        assert value == H.Point(5, 6)

    def test_repr_and_str(self, manager):
        foo = manager.Foo()
        assert "Foo" in repr(foo)
        assert str(foo) == "FooBar-repr"
        counter = manager.Counter()
        assert "Counter" in repr(counter)

    def test_iterator_proxy(self, manager):
        it = manager.Iterator()
        assert isinstance(it, H.IteratorProxy)
        assert iter(it) is it
        assert list(it) == [i * i for i in range(10)]
        with pytest.raises(StopIteration):
            next(it)

    def test_iterator_proxy_with_argument_and_next(self, manager):
        it = manager.Iterator(3)
        assert next(it) == 0
        assert next(it) == 1
        assert next(it) == 4
        with pytest.raises(StopIteration):
            next(it)

    def test_proxy_used_from_many_threads(self, manager):
        counter = manager.Counter()
        foo = manager.Foo()
        errors = []

        def work(i):
            try:
                for _ in range(20):
                    counter.increment()
                assert foo.add(i, 1) == i + 1
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(H.TIMEOUT)
            assert not t.is_alive()
        assert errors == []
        assert counter.value() == 120

    def test_referent_released_when_last_proxy_dropped(self, manager):
        stats = manager.TrackerStats()
        before = stats.alive()
        a = manager.Tracked()
        b = manager.Tracked()
        assert a.ping() == "pong"
        assert stats.alive() == before + 2
        del a
        gc.collect()
        assert stats.alive() == before + 1
        assert b.ping() == "pong"
        del b
        gc.collect()
        assert stats.alive() == before

    def test_proxy_pickle_roundtrip_in_process(self, make_manager, compat_cls):
        m = make_manager(compat_cls, authkey=None)  # proxies carry no authkey when pickled
        counter = m.Counter(1)
        clone = pickle.loads(pickle.dumps(counter))
        assert isinstance(clone, H.CounterProxy)
        assert clone.increment() == 2
        assert counter.value() == 2
        foo = m.Foo()  # keep the original alive: it owns the server-side reference
        foo_clone = pickle.loads(pickle.dumps(foo))
        assert foo_clone.f() == "f()"

    def test_pickle_serializer_explicit(self, make_manager, compat_cls):
        m = make_manager(compat_cls, serializer="pickle")
        p = m.Point(1, 1)
        assert p._getvalue() == H.Point(1, 1)
        assert m.Foo().echo(H.Point(2, 2)) == ((H.Point(2, 2),), {})
        assert m.Counter(1).increment() == 2
        client = make_manager(compat_cls, start=False, address=m.address, serializer="pickle")
        client.connect()
        assert client.Foo().f() == "f()"

    def test_xmlrpclib_serializer(self, make_manager, compat_cls, client_cls):
        m = make_manager(compat_cls, serializer="xmlrpclib")
        foo = m.Foo()
        assert foo.f() == "f()"
        assert foo.add(2, b=3) == 5
        assert foo.add("a", "b") == "ab"
        assert m.Counter(1).increment(2) == 3
        values = ["hello world", None, True, 2.25, "hall\xe5 v\xe4rlden",
                  "\u043f\u0440\u0438\u0432\u0456\u0442", b"hall\xe5 v\xe4rlden"]
        client = make_manager(client_cls, start=False, address=m.address,
                              serializer="xmlrpclib")
        client.connect()
        q = client.get_shared_queue()
        q.put(tuple(values))
        # xmlrpclib turns tuples into lists
        assert m.get_shared_queue().get(timeout=H.TIMEOUT) == values
        q.put({"a": 1, "b": [1, 2]})
        assert q.get(timeout=H.TIMEOUT) == {"a": 1, "b": [1, 2]}
        # objects xmlrpclib cannot marshal are rejected
        with pytest.raises(Exception):
            q.put(time.sleep)


# ---------------------------------------------------------------------------
# Proxies used by other processes
# ---------------------------------------------------------------------------

class TestProxiesInChildren:
    def test_proxies_passed_to_child(self, manager, child_ctx):
        counter = manager.Counter(0)
        foo = manager.Foo()
        out = H.run_in_child(child_ctx, H.child_use_counter_and_foo, counter, foo)
        assert out["increment"] == 5
        assert out["twice"] == 7
        assert out["isinstance"] is True
        assert out["f"] == "f()"
        assert out["add"] == 5
        assert out["g"] == ("ValueError", "g failed")
        assert out["pid"] != os.getpid()
        assert counter.value() == 7

    def test_iterator_proxy_passed_to_child(self, manager, child_ctx):
        it = manager.Iterator(5)
        assert next(it) == 0
        assert H.run_in_child(child_ctx, H.child_iterate, it) == [1, 4, 9, 16]
        with pytest.raises(StopIteration):
            next(it)

    def test_method_to_typeid_proxy_passed_to_child(self, manager, child_ctx):
        counter = manager.Factory2().make_counter(50)
        out = H.run_in_child(child_ctx, H.child_use_counter_and_foo, counter, manager.Foo())
        assert out["twice"] == 57
        assert counter.value() == 57

    def test_child_process_runs_its_own_manager(self, compat_cls, child_ctx):
        # non-daemonic: daemonic processes may not start the manager's server process
        assert H.run_in_child(child_ctx, H.child_runs_own_manager, compat_cls,
                              daemon=False) == (2, True)

    def test_proxy_passed_to_pool_workers(self, make_manager, compat_cls, fork_ctx):
        # Pool tasks pickle proxies outside of spawning: with the stdlib they then
        # carry no authkey, so this relies on the process authkey (authkey=None).
        m = make_manager(compat_cls, authkey=None)
        counter = m.Counter(0)
        with fork_ctx.Pool(2) as pool:
            results = pool.starmap(H.pool_task_increment, [(counter, 1)] * 8)
        assert sorted(results) == list(range(1, 9))
        assert counter.value() == 8

    def test_fork_child_uses_inherited_manager(self, manager, fork_ctx):
        assert H.run_in_child(fork_ctx, H.child_create_via_inherited_manager,
                              manager) == (11, "f()")

    def test_proxy_sent_through_pipe_to_child(self, make_manager, compat_cls, fork_ctx):
        m = make_manager(compat_cls, authkey=None)
        counter = m.Counter(1)
        reader, writer = fork_ctx.Pipe(duplex=False)
        child = H.Child(fork_ctx, H.child_recv_proxy_from_pipe, reader)
        reader.close()
        writer.send(counter)
        writer.close()
        assert child.result() == 8
        assert counter.value() == 8


# ---------------------------------------------------------------------------
# Mixed deployments: a program that switched to bigmp talking to one that did not
# (for the stdlib param both sides are stdlib, which proves the tests)
# ---------------------------------------------------------------------------

class TestWireCompat:
    """The "reference" side is always the stdlib BaseManager."""

    def test_reference_client_connects_to_server(self, manager, make_manager):
        client = make_manager(H.StdQueueClient, start=False, address=manager.address)
        client.connect()
        client.get_shared_queue().put("from-stdlib-client")
        assert manager.get_shared_queue().get(timeout=H.TIMEOUT) == "from-stdlib-client"
        foo = client.Foo()
        assert foo.add(1, b=2) == 3
        with pytest.raises(ValueError, match="g failed"):
            foo.g()

    def test_client_connects_to_reference_server(self, make_manager, client_cls):
        server = make_manager(H.StdCompatManager)
        client = make_manager(client_cls, start=False, address=server.address)
        client.connect()
        client.get_shared_queue().put("to-stdlib-server")
        assert server.get_shared_queue().get(timeout=H.TIMEOUT) == "to-stdlib-server"
        foo = client.Foo()
        assert foo.add(1, b=2) == 3
        with pytest.raises(ValueError, match="g failed"):
            foo.g()
