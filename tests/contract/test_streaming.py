"""Streaming results and arguments."""
from __future__ import annotations

import io

import pytest

import bigmp
from bigmp import State
from tests.services import Echo


@pytest.fixture
def machine(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    m.wait(State.RUNNING, timeout=30)
    return m


def test_generator_result_is_streamed(machine):
    it = machine.call("Echo.count", 1000)
    assert not isinstance(it, list)
    assert list(it) == list(range(1000))
    assert machine.call("Echo.echo", 1) == 1


def test_exception_mid_stream_is_raised_at_that_point(machine):
    got = []
    with pytest.raises(KeyError, match="mid-stream"):
        for x in machine.call("Echo.count_then_fail", 3):
            got.append(x)
    assert got == [0, 1, 2]


def test_abandoned_stream_does_not_break_the_machine(machine):
    it = machine.call("Echo.count", 10 ** 7)
    assert next(it) == 0
    it.close()
    assert machine.call("Echo.echo", "ok") == "ok"


def test_generator_argument_is_streamed(machine):
    def numbers():
        yield from range(10000)
    assert machine.call("Echo.total", numbers()) == sum(range(10000))
    assert machine.call("Echo.total", bigmp.stream([1, 2, 3])) == 6


def test_file_argument_is_streamed(machine, tmp_path):
    data = bytes(range(256)) * 20000
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert machine.call("Echo.read_all", f) == data
    assert machine.call("Echo.lines", io.BytesIO(b"a\nbb\nccc\n")) == [b"a", b"bb", b"ccc"]


def test_stream_has_backpressure(session):
    from tests.services import Producer
    m = session.start(1, services={"P": Producer()})[0]
    it = m.call("P.produce", 65536)
    for _ in range(10):
        next(it)
    # Socket buffers bound how far the producer can run ahead of a paused consumer.
    assert m.call("P.produced") < 10 + 1000
    it.close()


def test_generator_method_consumes_streamed_input(machine):
    def numbers():
        yield from range(5000)
    assert list(machine.call("Echo.double_each", numbers())) == [2 * i for i in range(5000)]


def test_streamed_arguments_can_be_read_in_any_order(machine):
    assert machine.call("Echo.second_first", bigmp.stream([1, 2]), bigmp.stream([3, 4])) == \
        ([3, 4], [1, 2])


def test_stream_argument_after_unknown_method_leaves_connection_usable(machine):
    for _ in range(3):
        with pytest.raises(bigmp.UnknownMethod):
            machine.call("Echo.nope", bigmp.stream(range(100)))
        assert machine.call("Echo.echo", "fine") == "fine"


def test_failing_argument_iterator_raises_in_the_method(machine):
    def broken():
        yield 1
        raise OSError("source broke")
    with pytest.raises(OSError, match="source broke"):
        machine.call("Echo.total", broken())
    assert machine.call("Echo.echo", "fine") == "fine"


def test_unread_stream_gives_its_connection_back(machine):
    import gc
    for _ in range(50):
        machine.call("Echo.count", 10)   # dropped without reading
    gc.collect()
    assert len(machine._active) == 0
    assert machine.call("Echo.echo", "ok") == "ok"


def test_manager_proxy_call_before_reading_a_stream():
    class M(bigmp.BigManager):
        pass
    M.register("Echo", Echo)
    with M() as manager:
        e = manager.Echo()
        it = e.count(3)
        assert e.echo(5) == 5          # its own connection: the stream still owns the first
        assert list(it) == [0, 1, 2]
        assert e.echo(6) == 6


def test_failing_iterator_of_a_buffered_stream_still_raises(machine):
    def broken():
        yield 1
        raise OSError("first stream broke")
    # second_first reads the second stream first, so the first one is buffered whole.
    with pytest.raises(OSError, match="first stream broke"):
        machine.call("Echo.second_first", broken(), bigmp.stream([3, 4]))
    assert machine.call("Echo.echo", "fine") == "fine"
