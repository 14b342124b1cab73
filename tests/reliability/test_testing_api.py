"""The user-facing helpers of bigmp.testing: TestCase, pytest fixtures, options, faults."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import unittest

import pytest

import bigmp
import bigmp.testing as bt
from bigmp import State
# The fixtures, as a user's test module or conftest.py imports them:
from bigmp.testing import bigmp_testing_options, testing_session, testing_system  # noqa: F401,F811
from tests.conftest import ROOT, wait_until
from tests.reliability._services import Payloads
from tests.reliability.conftest import gone


class TestTestingCase(bt.TestCase):
    """What a user writes: machines started in setUp, faults as methods."""

    bigmp_machines = 2
    bigmp_services = {"P": Payloads()}

    def test_machines_are_running(self):
        self.assertEqual(len(self.machines), 2)
        self.assertEqual(self.system.N(), 2)
        self.assertEqual(self.machines[0].call("P.echo", "x"), "x")

    def test_kill_is_a_machine_lost(self):
        m, other = self.machines
        self.kill(m)
        err = self.assertStopped(m, error=bigmp.MachineLost)
        self.assertIn("signal 9", str(err))
        with self.assertRaises(bigmp.MachineStopped):
            m.call("P.echo", 1)
        self.assertEqual(other.call("P.echo", 2), 2)
        self.assertEqual(self.system.exited(), 1)

    def test_a_hung_machine_left_hung_does_not_slow_teardown(self):
        self.hang(self.machines[0])   # tearDown resumes it before shutting down


class ShortLease(bt.TestCase):
    bigmp_options = {"keepalive_timeout": 7.0}

    def test_options(self):
        self.assertEqual(self.b.options["keepalive_timeout"], 7.0)
        self.assertEqual(self.b.options["keepalive_interval"], bt.DEFAULTS["keepalive_interval"])


def test_testing_case_tears_down_even_when_the_test_fails():
    pids = []

    class Failing(bt.TestCase):
        bigmp_machines = 1
        bigmp_services = {"P": Payloads()}

        def test_fails(self):
            pids.append(self.machines[0].call("P.pid"))
            self.hang(self.machines[0])
            self.fail("on purpose")
    result = unittest.TestResult()
    Failing("test_fails").run(result)
    assert len(result.failures) == 1 and "on purpose" in result.failures[0][1]
    assert pids and gone(pids[0])   # shut down (resumed first), not left behind


def test_testing_options_defaults_and_overrides(monkeypatch):
    with bt.start() as b:
        for key, value in bt.DEFAULTS.items():
            assert b.options[key] == value
    with bt.start(keepalive_lease=9.0) as b:
        assert b.options["keepalive_lease"] == 9.0
    default = bigmp.config.OPTIONS["keepalive_timeout"].default
    with bt.start(keepalive_timeout=default) as b:   # given, if equal to bigmp's default
        assert b.options["keepalive_timeout"] == default
        assert b.options["keepalive_interval"] == bt.DEFAULTS["keepalive_interval"]
    monkeypatch.setenv("BIGMP_KEEPALIVE_TIMEOUT", "4")
    with bigmp.start(system="testing") as b:
        assert b.options["keepalive_timeout"] == 4.0
    with pytest.raises(ValueError, match="testing system"):
        bt.start(system="local")


def test_testing_session_fixture(testing_session, testing_system):
    assert testing_system is testing_session.system
    m = testing_session.start(1, services={"P": Payloads()})[0]
    assert testing_system.wait_for(1, timeout=30) == [m]
    testing_system.partition(m)
    with pytest.raises(TimeoutError):
        m.call("P.echo", 1, timeout=0.2)
    testing_system.heal(m)
    assert m.call("P.echo", 2) == 2


def test_testing_faults_need_a_testing_machine():
    with bigmp.start(system="local") as b:
        m = b.start(1, services={"P": Payloads()})[0]
        with pytest.raises(TypeError, match="testing system"):
            bt.kill(m)
    with bt.start() as one, bt.start() as two:
        m = one.start(1, services={"P": Payloads()})[0]
        with pytest.raises(ValueError, match="not a started machine of this"):
            two.system.kill(m)


def test_testing_relay_follows_its_machine(testing_session, testing_system):
    m = testing_session.start(1, services={"P": Payloads()})[0]
    m.wait(State.RUNNING, timeout=30)
    relay = m.addr
    assert relay != testing_system.machine_address(m) and os.path.exists(relay)
    assert testing_system.connections(m) >= 2   # keepalive + the pooled call connection
    testing_system.kill(m)
    assert m.wait(State.STOPPED, timeout=30) == State.STOPPED
    wait_until(lambda: not os.path.exists(relay), timeout=10, what="the relay to go")
    with pytest.raises(FileNotFoundError):
        bigmp.connection.Client(relay, authkey=testing_session.authkey, timeout=5)


USER_CONFTEST = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import pytest

    pytest_plugins = ["bigmp.testing"]

    @pytest.fixture
    def bigmp_testing_options():
        return {{"keepalive_timeout": 3.0}}
""")

USER_TEST = textwrap.dedent("""
    import pytest
    import bigmp
    from tests.reliability._services import Payloads

    def test_user(testing_session, testing_system):
        assert testing_session.options["keepalive_timeout"] == 3.0
        m = testing_session.start(1, services={"P": Payloads()})[0]
        testing_system.kill(m)
        with pytest.raises(bigmp.MachineLost):
            m.call("P.echo", 1, timeout=30)
""")


def test_testing_pytest_plugin_in_a_users_project(tmp_path):
    (tmp_path / "conftest.py").write_text(USER_CONFTEST.format(root=ROOT))
    (tmp_path / "test_user.py").write_text(USER_TEST)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_testing_relay_keeps_large_data_intact_under_faults(testing_session, testing_system):
    """Backpressure (4 MiB held per direction at most), delay and partition with big frames."""
    m = testing_session.start(1, services={"P": Payloads()})[0]
    data = os.urandom(1 << 20) * 24          # 24 MiB: several times the relay's buffer
    assert m.call("P.echo", data) == data
    testing_system.delay(m, 0.02)
    assert m.call("P.echo", data) == data
    testing_system.delay(m, 0)
    testing_system.partition(m)
    fut = m.call_async("P.echo", data)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.3)
    testing_system.heal(m)
    assert fut.result(timeout=60) == data
    assert m.state == State.RUNNING
