"""Large receive buffers: reused only when nobody holds them, never changed under a holder."""
from __future__ import annotations

import os

import pytest

import bigmp
from bigmp import buffers
from tests.conftest import wait_until

SIZE = 3 << 20     # above buffers.POPULATE_MIN: these take the reuse path


class Store:
    def __init__(self):
        self.kept = []

    def echo(self, x):
        return x

    def put(self, x):
        self.kept.append(x)
        return len(self.kept)

    def get(self, i):
        return self.kept[i]


def _hash_kept():
    for obj in buffers._spare.kept:   # (in a function: no reference outlives the loop)
        if type(obj) is bytes:
            hash(obj)


@pytest.fixture(scope="module")
def machine():
    with bigmp.start(system="local") as b:
        yield b.start(1, services={"Store": Store()})[0]


def test_a_result_the_caller_keeps_never_changes(machine):
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    first = machine.call("Store.echo", a)
    second = machine.call("Store.echo", b)
    assert first == a and second == b and first is not second


def test_a_dropped_result_is_filled_again_with_the_next_one(machine):
    if not buffers._REUSE:
        pytest.skip("no buffer reuse on this interpreter")
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    first = machine.call("Store.echo", a)
    del first
    _hash_kept()              # a cached hash must not survive the reuse
    kept = {id(o) for o in buffers._spare.kept}   # this process (the driver) keeps them
    second = machine.call("Store.echo", b)
    assert id(second) in kept             # a kept buffer filled again: no new page faults
    assert second == b and hash(second) == hash(b)
    ba = machine.call("Store.echo", bytearray(a))
    assert type(ba) is bytearray and ba == a   # another type: never handed a bytes


def test_a_loop_that_holds_the_previous_result_reuses_the_one_before(machine):
    """`r = m.call(...)` in a loop still holds the previous result while the next one
    arrives: the buffer before it is free by then, and reused."""
    if not buffers._REUSE:
        pytest.skip("no buffer reuse on this interpreter")
    datas = [os.urandom(SIZE) for _ in range(6)]
    ids, r = [], None
    for d in datas:
        r = machine.call("Store.echo", d)
        assert r == d
        ids.append(id(r))
    assert len(set(ids[2:])) == 2      # two buffers take turns once the loop runs
    assert machine.call("Store.echo", b"short") == b"short"


def test_arguments_a_service_keeps_are_not_reused(machine):
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    n = machine.call("Store.put", a)
    machine.call("Store.put", b)          # same size: must not land in the kept one
    assert machine.call("Store.get", n - 1) == a
    assert machine.call("Store.get", n) == b


def test_async_calls_with_large_buffers_keep_their_own_results(machine):
    datas = [os.urandom(SIZE) for _ in range(4)]
    futs = [machine.call_async("Store.echo", d) for d in datas]
    assert [f.result(timeout=60) for f in futs] == datas


def test_the_kept_buffer_is_let_go_when_idle(monkeypatch):
    monkeypatch.setattr(buffers, "SPARE_SECONDS", 0.2)
    spare = buffers._Spare()
    monkeypatch.setattr(buffers, "_spare", spare)
    obj, view = buffers.fresh_bytearray(SIZE)
    view.release()
    buffers.keep(obj)
    if not buffers._REUSE:
        assert spare.kept == []
        return
    assert spare.kept == [obj] and spare.kept[0] is obj
    del obj
    wait_until(lambda: spare.kept == [], 10, what="the kept buffer to expire")


def test_many_threads_moving_large_buffers_each_keep_exact_results(machine):
    """Buffers handed out for reuse under concurrency: every result a thread holds stays
    what it received, whatever the other threads receive meanwhile."""
    import threading
    sizes = (SIZE, SIZE + 1, 2 * SIZE)
    errors = []

    def worker(k):
        try:
            held = []
            for i in range(8):
                data = os.urandom(sizes[(k + i) % 3])
                kind = bytearray if i % 2 else bytes
                out = machine.call("Store.echo", kind(data)) if i % 4 < 2 else \
                    machine.call_async("Store.echo", kind(data)).result(timeout=60)
                if out != data or type(out) is not kind:
                    errors.append(f"thread {k} call {i}: wrong result")
                if i % 3 == 0:
                    held.append((out, data))   # kept: must never change under us
                del out
            for out, data in held:
                if out != data:
                    errors.append(f"thread {k}: a held result changed")
        except Exception as exc:   # reported below, with the thread's number
            errors.append(f"thread {k}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
