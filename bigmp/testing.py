"""Helpers for testing programs that use bigmp: a session on the testing system, faults,
pytest fixtures and a ``unittest`` base class. See docs/testing.md.

::

    import bigmp, bigmp.testing as bt

    with bt.start() as b:                          # machines are local processes
        m, other = b.start(2, services={"Cache": Cache()})
        bt.wait_for(b, 2)                          # both RUNNING
        bt.kill(m)                                 # SIGKILL
        with pytest.raises(bigmp.MachineLost):
            m.call("Cache.get", "k")

pytest: ``pytest_plugins = ["bigmp.testing"]`` in a ``conftest.py`` gives the fixtures
``testing_session`` (a session on the testing system, shut down after the test),
``testing_system`` (its :class:`~bigmp.systems.testing.TestingSystem`) and
``bigmp_testing_options`` (override it to pass options). unittest: subclass
:class:`TestCase`.
"""
from __future__ import annotations

import unittest
from typing import Any, Dict, List, Mapping, Optional

from .cluster import B, start as _start
from .machine import Machine, State
from .systems.testing import DEFAULTS, TestingSystem

__all__ = ["start", "system", "kill", "hang", "resume", "drop", "delay", "partition", "heal",
           "wait_for", "TestCase", "TestingSystem", "DEFAULTS"]


def start(**options: Any) -> B:
    """A session on the testing system: ``bigmp.start(system="testing", **options)``.

    Options are bigmp's (see :mod:`bigmp.config`); the keepalive timings default to the
    testing system's short ones (:data:`DEFAULTS`).
    """
    if options.setdefault("system", "testing") != "testing":
        raise ValueError(f"bigmp.testing.start runs the testing system, not {options['system']!r}")
    return _start(**options)


def system(of: Any) -> TestingSystem:
    """The testing system of a session or of one of its machines."""
    session = of._b if isinstance(of, Machine) else of
    sys_ = getattr(session, "system", None)
    if not isinstance(sys_, TestingSystem):
        raise TypeError(f"{of!r} does not belong to a session on the testing system "
                        f"(start it with bigmp.testing.start() or system=\"testing\")")
    return sys_


def kill(m: Machine, wait: bool = True) -> Machine:
    """SIGKILL machine ``m`` (see :meth:`TestingSystem.kill`)."""
    return system(m).kill(m, wait=wait)


def hang(m: Machine) -> None:
    """SIGSTOP machine ``m`` and wait until it is stopped."""
    system(m).hang(m)


def resume(m: Machine) -> None:
    """SIGCONT a hung machine."""
    system(m).resume(m)


def drop(m: Machine) -> int:
    """Break the driver's connections to ``m`` (calls in flight raise ConnectionError)."""
    return system(m).drop(m)


def delay(m: Machine, seconds: float) -> None:
    """Deliver all traffic to and from ``m`` ``seconds`` late, each way (0 to stop)."""
    system(m).delay(m, seconds)


def partition(m: Machine) -> None:
    """Hold all traffic to and from ``m`` until :func:`heal`."""
    system(m).partition(m)


def heal(m: Machine) -> None:
    """End ``m``'s partition: held traffic flows again."""
    system(m).heal(m)


def wait_for(b: B, n: int, timeout: Optional[float] = None) -> List[Machine]:
    """Wait until ``n`` machines of session ``b`` are RUNNING; return the RUNNING ones."""
    return system(b).wait_for(n, timeout)


class TestCase(unittest.TestCase):
    """A ``unittest.TestCase`` with a testing session per test.

    ``setUp`` starts ``self.b`` (options from the class attribute ``bigmp_options``) and
    ``self.system``; the session is shut down after the test, even when it fails. With
    ``bigmp_machines`` and ``bigmp_services`` set, ``setUp`` also starts that many machines
    and waits until they are RUNNING (``self.machines``). The fault helpers are methods.
    """

    bigmp_options: Mapping[str, Any] = {}
    bigmp_machines: int = 0
    bigmp_services: Optional[Mapping[str, Any]] = None

    b: B
    system: TestingSystem
    machines: List[Machine]

    def setUp(self) -> None:
        super().setUp()
        self.b = start(**dict(self.bigmp_options))
        self.addCleanup(self.b.shutdown)
        self.system = system(self.b)
        self.machines = []
        if self.bigmp_machines:
            self.machines = self.start_machines(self.bigmp_machines, self.bigmp_services)

    def start_machines(self, n: int, services: Optional[Mapping[str, Any]] = None,
                       wait: bool = True) -> List[Machine]:
        """``self.b.start(n, services)``; with ``wait``, fail unless all reach RUNNING."""
        machines = self.b.start(n, services=services)
        if wait:
            for m in machines:
                state = m.wait(State.RUNNING, timeout=self.b.options["start_timeout"])
                if state != State.RUNNING:
                    self.fail(f"{m.name} did not start: {m.err}")
        return machines

    def kill(self, m: Optional[Machine] = None, wait: bool = True) -> Machine:
        return self.system.kill(m, wait=wait)

    def hang(self, m: Machine) -> None:
        self.system.hang(m)

    def resume(self, m: Machine) -> None:
        self.system.resume(m)

    def drop(self, m: Machine) -> int:
        return self.system.drop(m)

    def delay(self, m: Machine, seconds: float) -> None:
        self.system.delay(m, seconds)

    def partition(self, m: Machine) -> None:
        self.system.partition(m)

    def heal(self, m: Optional[Machine] = None) -> None:
        self.system.heal(m)

    def wait_for(self, n: int, timeout: Optional[float] = None) -> List[Machine]:
        return self.system.wait_for(n, timeout)

    def assertStopped(self, m: Machine, timeout: Optional[float] = None,  # noqa: N802
                      error: type = BaseException) -> BaseException:
        """Wait (up to the keepalive timeout and a margin) until ``m`` is STOPPED with an
        error of type ``error``; return that error."""
        if timeout is None:
            timeout = self.b.options["keepalive_timeout"] + 10.0
        try:
            m.wait(State.STOPPED, timeout=timeout)
        except TimeoutError:
            self.fail(f"{m.name} is still {m.state.name} after {timeout:g} s")
        self.assertIsInstance(m.err, error)
        return m.err


# -- pytest fixtures (``pytest_plugins = ["bigmp.testing"]``) ---------------------------------

try:
    import pytest as _pytest
except ImportError:   # pragma: no cover - pytest is optional
    _pytest = None

if _pytest is not None:
    @_pytest.fixture
    def bigmp_testing_options() -> Dict[str, Any]:
        """Options for ``testing_session``; override this fixture to change them."""
        return {}

    @_pytest.fixture
    def testing_session(bigmp_testing_options: Dict[str, Any]):
        """A session on the testing system, shut down after the test."""
        b = start(**dict(bigmp_testing_options))
        try:
            yield b
        finally:
            b.shutdown()

    @_pytest.fixture
    def testing_system(testing_session: B) -> TestingSystem:
        """The :class:`TestingSystem` of ``testing_session`` (faults, wait_for, N, ...)."""
        return system(testing_session)
