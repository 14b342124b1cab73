"""Machine lifecycle: states, start, init, shutdown, info, environment and argv."""
from __future__ import annotations

import os
import threading

import pytest

import bigmp
from bigmp import State
from tests.services import Echo, FailingInit, WithInit


def test_start_returns_n_machines_that_reach_running(session):
    machines = session.start(3, services={"Echo": Echo()})
    assert len(machines) == 3
    assert all(m.state in (State.STARTING, State.RUNNING) for m in machines)
    assert session.machines() == machines
    for m in machines:
        assert m.wait(State.RUNNING, timeout=30) == State.RUNNING
        assert m.err is None
        assert m.addr is not None and m.hostname
    pids = {m.call("Echo.pid") for m in machines}
    assert len(pids) == 3 and os.getpid() not in pids


def test_states_only_move_forward(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(m.state)
    t = threading.Thread(target=watch)
    t.start()
    m.wait(State.RUNNING, timeout=30)
    session.shutdown()
    stop.set()
    t.join()
    assert m.state == State.STOPPED
    assert seen == sorted(seen), "a state moved backwards"


def test_call_after_shutdown_fails_fast(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    assert m.call("Echo.echo", 1) == 1
    session.shutdown()
    assert m.state == State.STOPPED
    with pytest.raises(bigmp.MachineStopped, match="stopped"):
        m.call("Echo.echo", 1, timeout=5)


def test_wait_timeout_raises(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    m.wait(State.RUNNING, timeout=30)
    with pytest.raises(TimeoutError):
        m.wait(State.STOPPED, timeout=0.05)


def test_context_manager_shuts_down(backend):
    with bigmp.start(**backend) as b:
        m = b.start(1, services={"Echo": Echo()})[0]
        assert m.call("Echo.echo", "x") == "x"
    assert m.state == State.STOPPED


def test_init_runs_before_running(session):
    m = session.start(1, services={"S": WithInit()})[0]
    assert m.call("S.is_ready") is True


def test_failing_init_stops_machine_with_its_error(session):
    m = session.start(1, services={"Bad": FailingInit()})[0]
    assert m.wait(State.RUNNING, timeout=30) == State.STOPPED
    assert isinstance(m.err, bigmp.StartError)
    assert "init refused" in str(m.err)
    assert isinstance(m.err.__cause__, RuntimeError)
    with pytest.raises(bigmp.MachineStopped, match="init refused"):
        m.call("Bad.never", timeout=5)


def test_unpicklable_service_stops_machine(session):
    m = session.start(2, services={"Lock": threading.Lock()})
    for machine in m:
        assert machine.wait(State.STOPPED, timeout=30) == State.STOPPED
        assert isinstance(machine.err, bigmp.StartError)
        assert "cannot be pickled" in str(machine.err)


def test_service_defined_in_test_module_by_value(session):
    class Local:            # not importable by name: cloudpickle ships it by value
        def hello(self, who):
            return f"hello {who}"
    m = session.start(1, services={"L": Local()})[0]
    assert m.call("L.hello", "you") == "hello you"


def test_info_reports_process_and_host(session):
    m = session.start(1, services={"Echo": Echo()})[0]
    info = m.info()
    assert info["pid"] == m.call("Echo.pid")
    assert info["cpus"] >= 1
    assert info["memory"]["total"] > 0 and info["memory"]["rss"] > 0
    assert "percent" in info["disk"]
    assert len(info["load"]) == 3


def test_environment_and_argv_reach_machines(session, monkeypatch):
    monkeypatch.setenv("BIGMP_TEST_FROM_DRIVER", "driver-value")
    m, n = session.start(1, services={"Echo": Echo()}, environ={"EXTRA": "42"})[0], \
        session.start(1, services={"Echo": Echo()}, args=["--flag", "x"])[0]
    assert m.call("Echo.env", "BIGMP_TEST_FROM_DRIVER") == "driver-value"
    assert m.call("Echo.env", "EXTRA") == "42"
    import sys
    assert m.call("Echo.argv")[1:] == sys.argv[1:]
    assert n.call("Echo.argv")[1:] == ["--flag", "x"]


def test_machines_call_each_other(session):
    a, b = session.start(2, services={"S": WithInit(), "Echo": Echo()})
    b.wait(State.RUNNING, timeout=30)
    assert a.call("S.forward", b.addr, "Echo.pid") == b.call("Echo.pid")
    d = session.dial(b.addr)
    assert d.call("Echo.echo", 5) == 5
    # Async calls from one machine to another ride the caller machine's own mux threads.
    results, muxed = a.call("S.forward_async", b.addr, "Echo.echo", 200)
    assert results == list(range(200)) and muxed


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="unknown bigmp option"):
        bigmp.start(no_such_option=1)
    with pytest.raises(ValueError, match="unknown bigmp system"):
        bigmp.start(system="nowhere")


def test_slow_init_is_kept_alive_by_keepalives(backend):
    from tests.services import SlowInit
    with bigmp.start(keepalive_lease=1.0, keepalive_interval=0.2, **backend) as b:
        m = b.start(1, services={"S": SlowInit()})[0]
        assert m.call("S.ok", timeout=30) == "ok"


def test_init_is_not_a_remote_method(session):
    m = session.start(1, services={"S": WithInit()})[0]
    with pytest.raises(bigmp.UnknownMethod):
        m.call("S.init", None)


def test_machines_do_not_inherit_driver_files(backend, tmp_path):
    from tests.services import FdLister
    marker = tmp_path / "driver-only.txt"
    with open(marker, "w"):
        with bigmp.start(**backend) as b:
            m = b.start(1, services={"F": FdLister()})[0]
            assert str(marker) not in m.call("F.targets")


SPAWN_DRIVER = '''
import sys
sys.path.insert(0, {root!r})
print("printed at import time of the driver's main module")
import bigmp
from tests.services import Echo
if __name__ == "__main__":
    with bigmp.start(system="local", local_mode="spawn") as b:
        m = b.start(1, services={{"Echo": Echo()}})[0]
        print("result", m.call("Echo.echo", 41) + 1)
'''


def test_spawned_machine_survives_prints_in_driver_main(tmp_path):
    import subprocess
    import sys
    from tests.conftest import ROOT
    script = tmp_path / "driver.py"
    script.write_text(SPAWN_DRIVER.format(root=ROOT))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "result 42" in out.stdout
    assert "local-0: printed at import time" in out.stderr


def test_one_machine_can_be_shut_down_alone(session, capfd):
    a, b = session.start(2, services={"Echo": Echo()})
    a.call("Echo.say", "last words")
    a.shutdown()
    assert a.state == State.STOPPED
    assert not isinstance(a.err, bigmp.MachineLost)
    with pytest.raises(bigmp.MachineStopped):
        a.call("Echo.echo", 1)
    assert b.call("Echo.echo", 2) == 2
    assert f"{a.name}: last words" in capfd.readouterr().err
