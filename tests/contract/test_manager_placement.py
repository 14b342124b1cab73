"""BigManager on a machine of each backend, and proxies that travel between processes."""
from __future__ import annotations

import multiprocessing
import os
import traceback

import pytest

import bigmp
from tests.services import Echo


class Counter:
    def __init__(self, start=0):
        self.value = start

    def inc(self, by=1):
        self.value += by
        return self.value

    def get(self):
        return self.value

    def pid(self):
        return os.getpid()

    def fail(self):
        raise ArithmeticError("counter broke")


class PlacedManager(bigmp.BigManager):
    pass


PlacedManager.register("Counter", Counter)


def _bump(proxy, n, done):
    for _ in range(n):
        proxy.inc()
    done.put(proxy.get())


def test_manager_server_on_a_machine(backend):
    opts = dict(backend)
    system = opts.pop("system")
    with PlacedManager(system=system, **opts) as manager:
        c = manager.Counter(10)
        assert c.inc(5) == 15
        assert c.pid() != os.getpid()
        with pytest.raises(ArithmeticError, match="counter broke") as info:
            c.fail()
        assert any(f.name == "fail" for f in traceback.extract_tb(info.value.__traceback__))


def test_pickled_proxy_works_in_another_process(backend):
    # The stdlib drops the authkey when a proxy is pickled outside spawning; bigmp keeps it,
    # so a proxy handed to a process that has a different default authkey still works.
    opts = dict(backend)
    system = opts.pop("system")
    with PlacedManager(system=system, **opts) as manager:
        c = manager.Counter()
        ctx = multiprocessing.get_context("spawn")
        done = ctx.Queue()
        p = ctx.Process(target=_bump, args=(c, 25, done))
        p.start()
        try:
            assert done.get(timeout=60) == 25
        finally:
            p.join(30)
        assert c.get() == 25


def test_proxy_passed_to_a_machine(session):
    manager = PlacedManager()
    manager.start()
    try:
        c = manager.Counter()
        m = session.start(1, services={"Echo": Echo()})[0]
        # Pickled to the machine with its authkey, the proxy calls the manager from there.
        assert m.call("Echo.use", c, "inc", 3) == 3
        assert c.get() == 3
    finally:
        manager.shutdown()
