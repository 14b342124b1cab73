"""The testing system: local machines with fault injection, for users' own unit tests.

Machines are real local processes started exactly as :class:`~bigmp.systems.local.LocalSystem`
starts them (fork server by default, or ``local_mode="spawn"``). What the testing system adds:

* **short keepalive timings** (lease 5 s, interval 0.2 s, timeout 2 s, shutdown 5 s) for
  options the program does not give, so a lost or hung machine is noticed in a test's
  time scale; explicit keywords and ``BIGMP_*`` variables still win;
* **fault injection** on one machine: :meth:`~TestingSystem.kill` (SIGKILL),
  :meth:`~TestingSystem.hang` / :meth:`~TestingSystem.resume` (SIGSTOP / SIGCONT),
  :meth:`~TestingSystem.drop` (break the driver's connections to it),
  :meth:`~TestingSystem.delay` (added latency) and :meth:`~TestingSystem.partition` /
  :meth:`~TestingSystem.heal` (traffic held both ways, as a network that loses every packet);
* bigmachine's testsystem helpers: :meth:`~TestingSystem.machines`, :meth:`~TestingSystem.N`,
  :meth:`~TestingSystem.exited` and :meth:`~TestingSystem.wait_for`.

Network faults need something between driver and machine. :meth:`driver_address` gives the
driver the address of a *relay* instead of the machine's own: a private unix socket in the
driver whose connections are forwarded byte for byte to the machine by one selector thread
(:class:`_Hub`) per testing system. The relay can then cut, delay or hold the traffic. It
mirrors its machine: once the machine has exited or refuses connections, the relay's socket
is removed too, so the driver sees a lost machine exactly as it would without the relay.

Only connections dialed to ``m.addr`` pass the relay (the driver's calls and keepalives, and
``b.dial(m.addr)`` from other machines). Proxies that a manager on the machine hands out
carry the machine's own address and bypass it.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import psutil

from .. import config as _config
from .base import Launch
from .local import LocalSystem
from .relay import _Hub, _Relay

log = logging.getLogger("bigmp.testing")

__all__ = ["TestingSystem", "DEFAULTS"]

# Options the testing system shortens when the program does not give them.
DEFAULTS: Dict[str, float] = {
    "keepalive_lease": 5.0,
    "keepalive_interval": 0.2,
    "keepalive_timeout": 2.0,
    "shutdown_timeout": 5.0,
}

_FAULT_TIMEOUT = 10.0        # how long a fault call waits for its effect (a signal landing)


class TestingSystem(LocalSystem):
    """Local machines behind fault-injecting relays (``bigmp.start(system="testing")``)."""

    __test__ = False   # not a pytest test class, despite its name
    name = "testing"

    def __init__(self, options: Dict[str, Any], explicit: Optional[Iterable[str]] = None):
        # Short timings where the program gave none (``explicit``: the options it did give;
        # unknown, an option at bigmp's own default counts as not given). ``options`` is the
        # session's own dict, so b.options shows what is in effect.
        given = set(explicit) if explicit is not None else None
        for key, value in DEFAULTS.items():
            opt = _config.OPTIONS[key]
            if os.environ.get(opt.env) is not None:
                continue
            left = key not in given if given is not None else options.get(key) == opt.default
            if left:
                options[key] = value
        super().__init__(options)
        self.session: Any = None
        self._hub: Optional[_Hub] = _Hub()
        self._hung: set = set()
        self._rng = random.Random(0)

    # -- System hooks ---------------------------------------------------------------------

    def attach(self, session: Any) -> None:
        self.session = session

    def driver_address(self, launch: Launch, addr: Any) -> Any:
        hub = self._hub
        if hub is None or (isinstance(addr, (tuple, list)) and addr and addr[0] == "tls"):
            return addr
        name = f"pid {launch.pid}"

        def make() -> _Relay:
            relay = _Relay(hub, name, addr)
            hub.relays.append(relay)
            return relay
        relay = hub.call(make)
        launch.relay = relay   # type: ignore[attr-defined]
        # The relay goes when its machine goes (not waited for: exits are reported from
        # the fork server's reader thread).
        launch.on_exit(lambda code: self._post(relay.shut))
        return relay.path

    def prepare_shutdown(self) -> None:
        """Undo faults so that the session's shutdown reaches every machine at once."""
        for pid in list(self._hung):
            self._signal(pid, signal.SIGCONT)
        self._hung.clear()
        hub = self._hub
        if hub is not None:
            def restore() -> None:
                for relay in hub.relays:
                    relay.delay = 0.0
                    relay.set_partitioned(False)
            try:
                hub.call(restore)
            except (RuntimeError, TimeoutError):
                pass

    def shutdown(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.close()
        super().shutdown()

    # -- bigmachine's testsystem helpers --------------------------------------------------

    def _session_machines(self) -> list:
        return self.session.machines() if self.session is not None else []

    def machines(self) -> list:
        """The machines of this session that are RUNNING now."""
        from ..machine import State
        return [m for m in self._session_machines() if m.state == State.RUNNING]

    def N(self) -> int:   # noqa: N802 - bigmachine's name
        """How many machines are RUNNING now."""
        return len(self.machines())

    def exited(self) -> int:
        """How many machine processes of this session have exited (for any reason)."""
        return sum(1 for m in self._session_machines()
                   if m.launch is not None and m.launch.exited)

    def wait_for(self, n: int, timeout: Optional[float] = None) -> list:
        """Wait until at least ``n`` machines are RUNNING; return the RUNNING machines.

        Raises TimeoutError after ``timeout`` seconds (default: the ``start_timeout`` option),
        and RuntimeError at once when too few machines are left that could still get there.
        """
        from ..machine import State
        timeout = self.options.get("start_timeout", 60.0) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            running = self.machines()
            if len(running) >= n:
                return running
            alive = [m for m in self._session_machines() if m.state < State.STOPPED]
            if len(alive) < n:
                stopped = [f"{m.name}: {m.err}" for m in self._session_machines()
                           if m.state == State.STOPPED]
                raise RuntimeError(f"{n} machines cannot be RUNNING: only {len(alive)} are "
                                   "starting or running; stopped: " + "; ".join(stopped))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(running)} of {n} machines RUNNING after {timeout:g} s")
            time.sleep(0.01)

    # -- faults ---------------------------------------------------------------------------

    def _launch(self, m: Any) -> Launch:
        """``m``'s launch, once ``m`` is RUNNING (a fault on a STARTING machine waits)."""
        from ..machine import State
        if getattr(m, "_b", None) is not self.session or self.session is None:
            raise ValueError(f"{m!r} is not a started machine of this testing session")
        if m.state < State.RUNNING:
            try:
                m.wait(State.RUNNING, timeout=self.options.get("start_timeout", 60.0))
            except TimeoutError:
                pass
        launch = getattr(m, "launch", None)
        if launch is None or m.state < State.RUNNING:
            raise ValueError(f"{m.name} never started ({m.state.name}: {m.err})")
        return launch

    def _relay(self, m: Any) -> _Relay:
        relay = getattr(self._launch(m), "relay", None)
        if relay is None:
            raise ValueError(f"{m.name} has no relay")
        return relay

    def _post(self, fn: Callable[[], Any]) -> None:
        hub = self._hub
        if hub is not None:
            try:
                hub.call(fn, wait=False)
            except RuntimeError:
                pass

    def _relay_call(self, m: Any, fn: Callable[[_Relay], Any]) -> Any:
        relay = self._relay(m)
        hub = self._hub
        if hub is None:
            raise RuntimeError("the testing system has shut down")
        return hub.call(lambda: fn(relay))

    @staticmethod
    def _signal(pid: Optional[int], sig: int) -> bool:
        if not pid:
            return False
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill(self, m: Any = None, wait: bool = True) -> Any:
        """SIGKILL machine ``m`` (a random RUNNING one if None); return it.

        With ``wait``, return once its exit has been reported (the driver then marks it
        STOPPED with :class:`bigmp.MachineLost` within moments: ``m.wait(State.STOPPED)``).
        """
        if m is None:
            running = self.machines()
            if not running:
                raise ValueError("no RUNNING machine to kill")
            m = self._rng.choice(running)
        launch = self._launch(m)
        gone = threading.Event()
        launch.on_exit(lambda code: gone.set())
        self._signal(launch.pid, signal.SIGKILL)
        self._hung.discard(launch.pid)
        if wait and not gone.wait(_FAULT_TIMEOUT):
            raise TimeoutError(f"{m.name} (pid {launch.pid}) did not exit after SIGKILL")
        return m

    def hang(self, m: Any) -> None:
        """Freeze machine ``m`` with SIGSTOP; return once it is stopped.

        It answers nothing, so calls with a timeout raise TimeoutError and the keepalive
        marks it STOPPED (and kills it) after ``keepalive_timeout``; :meth:`resume` first
        to let it carry on.
        """
        launch = self._launch(m)
        pid = launch.pid
        if not self._signal(pid, signal.SIGSTOP):
            raise ValueError(f"{m.name} has exited")
        self._hung.add(pid)
        launch.on_exit(lambda code: self._hung.discard(pid))   # its pid may be reused
        self._wait_status(pid, lambda s: s == psutil.STATUS_STOPPED, "stop")

    def resume(self, m: Any) -> None:
        """Let a hung machine run again (SIGCONT)."""
        pid = self._launch(m).pid
        self._hung.discard(pid)
        if self._signal(pid, signal.SIGCONT):
            self._wait_status(pid, lambda s: s != psutil.STATUS_STOPPED, "continue")

    @staticmethod
    def _wait_status(pid: int, ok: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + _FAULT_TIMEOUT
        while True:
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                return
            if ok(status) or status == psutil.STATUS_ZOMBIE:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} did not {what} (status {status})")
            time.sleep(0.002)

    def drop(self, m: Any) -> int:
        """Close every connection the driver has through ``m``'s relay now; return how many.

        Calls in flight on them raise ConnectionError (the machine answers probes, so it is
        not lost: :meth:`bigmp.Machine.retry_call` retries them). New connections work.
        """
        return self._relay_call(m, lambda r: r.drop())

    def delay(self, m: Any, seconds: float) -> None:
        """Deliver every byte to and from ``m`` ``seconds`` late (each way; 0 removes it).

        A call then takes at least ``2 * seconds``; more than ``keepalive_timeout / 2``
        makes the keepalive declare the machine lost.
        """
        self._relay_call(m, lambda r: r.set_delay(seconds))

    def partition(self, m: Any) -> None:
        """Cut ``m`` off: nothing reaches it or comes back, new connections go unanswered.

        Traffic is held, not discarded (as TCP retransmits over a link that loses every
        packet): after :meth:`heal` it flows again in order. Unhealed, the keepalive marks
        the machine STOPPED after ``keepalive_timeout`` and it is killed.
        """
        self._relay_call(m, lambda r: r.set_partitioned(True))

    def heal(self, m: Any = None) -> None:
        """End the partition of ``m`` (of every machine if None)."""
        if m is not None:
            self._relay_call(m, lambda r: r.set_partitioned(False))
            return
        hub = self._hub
        if hub is not None:
            hub.call(lambda: [r.set_partitioned(False) for r in hub.relays])

    def restart(self, m: Any, services: Optional[Mapping[str, Any]] = None,
                timeout: Optional[float] = None, **start_args: Any) -> Any:
        """Replace machine ``m`` by a new one that also answers at ``m.addr``; return it.

        ``m`` is killed first if it is still there. The replacement is started with
        ``b.start(1, services, ...)`` and is a machine of its own (its handle, its ``addr``);
        ``m``'s handle stays STOPPED, as states only move forward. But connections dialed to
        ``m``'s old address, as :meth:`B.dial` handles and other machines make them, reach
        the replacement: their :meth:`~bigmp.Machine.retry_call` succeeds once it is RUNNING.
        Faults injected on the replacement apply to its own address only.
        """
        from ..errors import StartError
        from ..machine import State
        relay = self._relay(m)
        launch = self._launch(m)
        if not launch.exited:
            self.kill(m)
        new = self.session.start(1, services=services, **start_args)[0]
        timeout = self.options.get("start_timeout", 60.0) if timeout is None else timeout
        if new.wait(State.RUNNING, timeout=timeout) != State.RUNNING:
            raise StartError(f"the replacement of {m.name} did not start: {new.err}")
        target = self.machine_address(new)
        self._hub_call(lambda: relay.reopen(target))
        new_launch = self._launch(new)
        new_launch.on_exit(lambda code: self._post(relay.shut))
        return new

    def _hub_call(self, fn: Callable[[], Any]) -> Any:
        hub = self._hub
        if hub is None:
            raise RuntimeError("the testing system has shut down")
        return hub.call(fn)

    # -- inspection -----------------------------------------------------------------------

    def machine_address(self, m: Any) -> Any:
        """The address ``m`` itself listens on (``m.addr`` is its relay's)."""
        return self._relay(m).target

    def connections(self, m: Any) -> int:
        """How many connections are open through ``m``'s relay now."""
        return self._relay_call(m, lambda r: len(r.pairs))
