"""Remote errors: original type and message, remote traceback, and what cannot travel."""
from __future__ import annotations

import traceback

import pytest

import bigmp
from bigmp import State
from tests.services import Echo


@pytest.fixture
def machine(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    m.wait(State.RUNNING, timeout=30)
    return m


def test_exception_keeps_type_message_and_remote_traceback(machine):
    with pytest.raises(ValueError, match="bad input") as info:
        machine.call("Echo.fail", "bad input")
    exc = info.value
    frames = traceback.extract_tb(exc.__traceback__)
    assert any(f.name == "fail" and f.filename.endswith("services.py") for f in frames)
    printed = "".join(traceback.format_exception(exc))
    assert machine.name in printed
    assert "raise ValueError(message)" in printed


def test_unknown_service_and_method_name_what_exists(machine):
    with pytest.raises(bigmp.UnknownService, match="Echo") as info:
        machine.call("Nope.echo", 1)
    assert "Nope" in str(info.value)
    with pytest.raises(bigmp.UnknownMethod, match="'nope'") as info:
        machine.call("Echo.nope")
    assert "echo" in str(info.value)
    with pytest.raises(bigmp.UnknownMethod):
        machine.call("Echo._private")
    assert machine.call("Echo.echo", 1) == 1


def test_unpicklable_result_is_a_clear_error(machine):
    with pytest.raises(Exception, match="pickle"):
        machine.call("Echo.unpicklable_result")
    assert machine.call("Echo.echo", 2) == 2


def test_unpicklable_argument_is_a_clear_error(machine):
    import threading
    with pytest.raises(TypeError, match="pickle"):
        machine.call("Echo.echo", threading.Lock())
    assert machine.call("Echo.echo", 3) == 3


def test_unpicklable_exception_arrives_as_remote_error(machine):
    with pytest.raises(bigmp.RemoteError) as info:
        machine.call("Echo.unpicklable_error")
    assert "UnpicklableError" in str(info.value)
    assert "could not be pickled" in str(info.value)
    assert machine.call("Echo.echo", 4) == 4


def test_exception_that_fails_to_unpickle_arrives_as_remote_error(machine):
    with pytest.raises(bigmp.RemoteError) as info:
        machine.call("Echo.bad_unpickle_error")
    assert "BadUnpickle" in str(info.value)
    assert "a-b" in str(info.value)
