"""One program: machines' stdout and stderr on the driver's stderr, prefixed, nothing lost."""
from __future__ import annotations


import bigmp
from tests.services import Echo


def test_stdout_and_stderr_are_prefixed_on_driver_stderr(backend, capfd):
    with bigmp.start(**backend) as b:
        m = b.start(1, services={"Echo": Echo()})[0]
        m.call("Echo.say", "hello from stdout")
        m.call("Echo.say_err", "hello from stderr")
    err = capfd.readouterr().err
    assert f"{m.name}: hello from stdout" in err
    assert f"{m.name}: hello from stderr" in err


def test_subprocess_output_is_captured_at_fd_level(backend, capfd):
    with bigmp.start(**backend) as b:
        m = b.start(1, services={"Echo": Echo()})[0]
        assert m.call("Echo.shell", "echo from-a-subprocess; echo to-stderr >&2") == 0
    err = capfd.readouterr().err
    assert f"{m.name}: from-a-subprocess" in err
    assert f"{m.name}: to-stderr" in err


def test_nothing_printed_before_shutdown_is_lost(backend, capfd):
    lines = [f"line {i:05d}" for i in range(3000)]
    with bigmp.start(**backend) as b:
        machines = b.start(2, services={"Echo": Echo()})
        for m in machines:
            assert m.call("Echo.say", *lines) == len(lines)
    err = capfd.readouterr().err
    for m in machines:
        got = [l.split(": ", 1)[1] for l in err.splitlines() if l.startswith(m.name + ": line")]
        assert got == lines
