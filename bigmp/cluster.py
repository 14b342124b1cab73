"""B, the session: start machines on a System, dial machines, shut everything down.

``bigmp.start(system="local")`` returns a B. ``b.start(n, services=...)`` launches n
machines at once and returns their handles, normally STARTING; each one is brought up in
the background (launch, handshake, environment, services and their ``init``), reaches
RUNNING, and is then kept alive by a :class:`~bigmp.keepalive.Keeper`.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

import cloudpickle

from . import config as _config
from . import output
from .errors import MachineLost, StartError
from .keepalive import Keeper
from .machine import Machine, State, _Shutdown
from .stats import Stats
from .systems import System, get_system
from .systems.base import read_handshake

log = logging.getLogger("bigmp")

__all__ = ["B", "start"]

_sessions: "weakref.WeakSet[B]" = weakref.WeakSet()


class B:
    """A bigmp session (bigmachine's ``B``): the machines of one driver."""

    def __init__(self, system: Optional[System], options: Dict[str, Any],
                 authkey: Optional[bytes] = None):
        self.system = system
        self.options = options
        self.authkey = authkey or secrets.token_bytes(32)
        self._machines: List[Machine] = []
        self._dialed: Dict[Any, Machine] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._closed = False
        # Calls this session made (bigmp.stats); None with the stats option off.
        self.stats: Optional[Stats] = Stats() if options.get("stats", True) else None
        self.debug = None                        # the debug HTTP server (serve_debug)
        if system is not None:
            _sessions.add(self)
            system.attach(self)

    @classmethod
    def remote(cls, authkey: bytes, config: Optional[Dict[str, Any]] = None) -> "B":
        """The session as seen from a machine: it can dial, not start."""
        return cls(None, _config.resolve(**(config or {})), authkey=authkey)

    # -- machines -------------------------------------------------------------------------

    def start(self, n: Optional[int] = None, services: Optional[Mapping[str, Any]] = None,
              environ: Optional[Mapping[str, str]] = None, args: Optional[Sequence[str]] = None,
              ) -> List[Machine]:
        """Launch ``n`` machines with ``services`` installed; return their handles at once.

        ``environ`` adds to the driver's environment on the machines; ``args`` replaces
        the driver's ``sys.argv[1:]`` there. A machine that fails to start is STOPPED with
        ``err`` saying why; it never hangs ``start`` or :meth:`Machine.wait`.
        """
        if self.system is None:
            raise RuntimeError("machines can only be started by the driver's session")
        if self._closed:
            raise RuntimeError("this session has been shut down")
        if n is None:
            n = self.system.capacity()   # local: one per CPU; ssh: per host, its CPUs
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        payloads: Dict[str, bytes] = {}
        pickling_error = None
        for name, svc in (services or {}).items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"bad service name {name!r}: a non-empty str without '.'")
            try:
                payloads[name] = cloudpickle.dumps(svc)
            except Exception as exc:
                pickling_error = StartError(f"service {name!r} cannot be pickled: {exc!r}")
                pickling_error.__cause__ = exc
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (environ or {}).items()})
        argv = list(sys.argv[:1]) + (list(args) if args is not None else list(sys.argv[1:]))
        machines = []
        with self._lock:
            for _ in range(n):
                m = Machine(self, self.system.machine_name(self._seq))
                self._seq += 1
                self._machines.append(m)
                machines.append(m)
        for m in machines:
            m._set_state(State.STARTING)
            if pickling_error is not None:
                m._set_state(State.STOPPED, pickling_error)
                continue
            threading.Thread(target=self._bring_up, args=(m, payloads, env, argv),
                             name=f"bigmp-start-{m.name}", daemon=True).start()
        return machines

    def _launch_config(self, name: str, env: Dict[str, str], argv: List[str]) -> Dict[str, Any]:
        """What every worker is told at launch (the System adds what it needs)."""
        timings = self.system.keepalive()
        return {"name": name, "authkey": self.authkey, "listen": self.system.listen_address(),
                "lease": timings["lease"], "grace": timings["grace"], "environ": env,
                "argv": argv, "options": {k: v for k, v in self.options.items()
                                          if k in ("connect_timeout", "handshake_timeout",
                                                   "max_frame", "stats")}}

    def _bring_up(self, m: Machine, payloads: Dict[str, bytes], env, argv) -> None:
        try:
            launch = self.system.launch(m.name, self._launch_config(m.name, env, argv))
        except Exception as exc:
            err = exc if isinstance(exc, StartError) else \
                StartError(f"could not launch {m.name}: {exc!r}")
            m._set_state(State.STOPPED, err)
            return
        m.launch = launch
        m.pid = launch.pid
        if self._closed or m.state == State.STOPPED:
            # The session shut down while this machine was launching: it must not linger.
            launch.close_control()
            launch.kill()
        m.output = output.forwarder().add(launch.output, m.name)
        # Not in the reporting thread: _exited may wait for the machine's last output.
        launch.on_exit(lambda code: threading.Thread(target=self._exited, args=(m, code),
                                                     daemon=True).start())
        try:
            line = read_handshake(launch.handshake, self.options["start_timeout"])
            if not line:
                raise StartError(f"{m.name} exited before its launch handshake"
                                 + self._tail(m))
            hello = json.loads(line)
            addr = tuple(hello["addr"]) if isinstance(hello["addr"], list) else hello["addr"]
            m.addr = self.system.driver_address(launch, addr)
            m.hostname = hello.get("hostname")
            m.pid = hello.get("pid", m.pid)
            self._check_versions(m, hello)
            # Keep the lease from now on: a slow init must not let it lapse.
            m.keepalive = Keeper(m, self.system.keepalive())
            m.keepalive.start()
            for name, payload in payloads.items():
                try:
                    m._invoke("Supervisor.register", (name, payload), {})
                except Exception as exc:
                    raise StartError(f"service {name!r} failed to start on {m.name}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if not isinstance(exc, StartError):
                exc = StartError(f"{m.name} failed to start: {exc!r}")
            m._set_state(State.STOPPED, exc)
            return
        finally:
            os.close(launch.handshake)
        m._set_state(State.RUNNING)

    @staticmethod
    def _check_versions(m: Machine, hello: Dict[str, Any]) -> None:
        """Driver and machine must agree on bigmp and on Python's minor version (pickles)."""
        import platform
        from . import __version__
        ours = platform.python_version_tuple()[:2]
        theirs = str(hello.get("python", "")).split(".")[:2]
        if theirs != list(ours):
            raise StartError(f"{m.name} runs Python {hello.get('python')}, the driver "
                             f"{platform.python_version()}: install Python "
                             f"{'.'.join(ours)} there (pickled code needs the same minor version)")
        if hello.get("bigmp") != __version__:
            raise StartError(f"{m.name} runs bigmp {hello.get('bigmp')}, the driver "
                             f"{__version__}: install bigmp {__version__} there")

    @staticmethod
    def _tail(m: Machine) -> str:
        if m.output is None:
            return ""
        m.output.drained.wait(2.0)
        lines = list(m.output.tail)[-10:]
        return ("; its last output:\n  " + "\n  ".join(lines)) if lines else ""

    def _exited(self, m: Machine, code: Optional[int]) -> None:
        if m.state == State.STOPPED:
            return
        if m._shutting_down:
            m._set_state(State.STOPPED, _Shutdown(f"{m.name} was shut down by its session"))
            return
        if code is None:
            how = "its launcher channel closed with no exit status (host or SSH session lost?)"
        elif code < 0:
            how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        m._set_state(State.STOPPED, MachineLost(f"machine {m.name} exited ({how})"
                                                + self._tail(m)))

    def _release(self, m: Machine) -> None:
        """Stop watching a STOPPED machine and make sure its process is gone."""
        if m.keepalive is not None:
            m.keepalive.stop()
        launch = m.launch
        if launch is not None:
            launch.close_control()
            if not isinstance(m.err, _Shutdown):
                launch.kill()

    def machines(self) -> List[Machine]:
        """Every machine this session started (in start order)."""
        with self._lock:
            return list(self._machines)

    def dial(self, addr: Any) -> Machine:
        """A handle on another machine of the session at ``addr`` (not owned: not kept alive)."""
        key = tuple(addr) if isinstance(addr, list) else addr
        with self._lock:
            for m in self._machines:
                if m.addr == key and m.state != State.STOPPED:
                    return m
            m = self._dialed.get(key)
            if m is not None and m.state != State.STOPPED:
                return m
            m = Machine(self, f"{key}", owned=False)
            m.addr = key
            self._dialed[key] = m
        m._set_state(State.STARTING)
        m._set_state(State.RUNNING)
        return m

    # -- observability: bigmp.profiling, bigmp.stats, bigmp.debug --------------------------

    def profile(self, seconds: float = 10.0, machine: Any = None, interval: float = 0.01,
                mode: str = "cpu", driver: Optional[bool] = None):
        """Sample every thread of every RUNNING machine (or ``machine``: a name, a Machine,
        or a list) for ``seconds`` at once; return one merged :class:`bigmp.profiling.Profile`.
        ``driver``: include the driver's own threads (entry ``"driver"``; by default when
        no ``machine`` is given: the whole program)."""
        from . import profiling
        return profiling.profile(self, seconds, machine, interval=interval, mode=mode,
                                 driver=driver)

    def collect_stats(self, timeout: float = 5.0) -> Dict[str, Any]:
        """Per-method call statistics: ``{"driver": ..., "machines": {name: ...}}``."""
        from . import stats
        return stats.collect(self, timeout)

    def serve_debug(self, address: Any = None):
        """Serve /debug/bigmp/{status,profile,stats} over HTTP (loopback unless ``address``
        names a host); return the server (``.url``). See :mod:`bigmp.debug`."""
        from . import debug
        return debug.serve(self, address)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bigmp-call")
            return self._pool

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Ask every machine to exit and wait (up to ``timeout``) until its output is flushed."""
        if self._closed:
            return
        self._closed = True
        if self.system is not None:
            self.system.prepare_shutdown()
        if self.debug is not None:
            self.debug.close()
        self._stop_machines(self.machines(), timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.system is not None:
            self.system.shutdown()

    def _stop_machines(self, machines: List[Machine], timeout: Optional[float]) -> None:
        """Ask ``machines`` to exit, wait for their output to drain, kill what is left."""
        timeout = self.options["shutdown_timeout"] if timeout is None else timeout
        for m in machines:
            m._shutting_down = True
            if m.keepalive is not None:
                m.keepalive.stop()
        running = [m for m in machines if m.state == State.RUNNING]

        def ask(m: Machine) -> None:
            try:
                m.call("Supervisor.shutdown", timeout=timeout)
            except Exception as exc:
                log.debug("shutdown of %s: %r", m.name, exc)

        threads = [threading.Thread(target=ask, args=(m,), daemon=True) for m in running]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for m in machines:
            m._set_state(State.STOPPED, _Shutdown(f"{m.name} was shut down by its session"))
            if m.launch is not None:
                m.launch.close_control()   # any machine still up sees EOF and exits
        for m in machines:
            if m.output is not None:
                if not m.output.drained.wait(max(0.0, deadline - time.monotonic())):
                    log.warning("output of %s did not drain within %g s", m.name, timeout)
        for m in machines:
            if m.launch is not None and m.launch.returncode is None and m.output is not None \
                    and not m.output.drained.is_set():
                m.launch.kill()

    def __enter__(self) -> "B":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        kind = self.system.name if self.system is not None else "remote"
        return f"<bigmp.B {kind} machines={len(self._machines)}>"


def start(system: Optional[str] = None, *, authkey: Optional[bytes] = None,
          **options: Any) -> B:
    """Start a session: ``with bigmp.start(system="local") as b: ...``.

    Options (see :mod:`bigmp.config`) come from these keywords, then ``BIGMP_*`` environment
    variables, then defaults. ``authkey`` defaults to a fresh random key per session.
    """
    worker = sys.modules.get("bigmp.worker")
    if worker is not None and worker.importing_main:
        raise RuntimeError(
            "bigmp.start() was called while a machine was importing the driver's main "
            "module: put the driver's code under `if __name__ == \"__main__\":` (as with "
            "multiprocessing's spawn), or machines would start machines of their own")
    opts = _config.resolve(system=system, **options)
    explicit = {k for k, v in options.items() if v is not None}
    b = B(get_system(opts["system"], opts, explicit), opts, authkey=authkey)
    if opts["debug_addr"]:
        try:
            b.serve_debug(opts["debug_addr"])
        except BaseException:
            b.shutdown()
            raise
    return b


@atexit.register
def _shutdown_all() -> None:
    for b in list(_sessions):
        try:
            b.shutdown()
        except Exception:
            pass

