"""The Supervisor: the system service installed on every machine.

It registers the user's services (running their ``init``), renews the lease the driver
keeps, reports machine information, and shuts the machine down. Its watchdog makes the
machine exit when the driver stops keeping it alive, in three layers: the lease lapses,
the driver's keepalive connection closes (after a short grace), or the launcher channel
(stdin of the worker: a pipe locally, the SSH session remotely) reaches EOF.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import platform
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Optional

import psutil

from . import __version__
from . import config as _config, stats as _stats

log = logging.getLogger("bigmp.supervisor")

__all__ = ["Supervisor", "machine_info"]


_proc: Optional[psutil.Process] = None


def _process() -> psutil.Process:
    """This process, kept: ``cpu_percent`` measures from one call to the next (a fresh
    Process always says 0.0). Primed at once, so the first reading covers the uptime."""
    global _proc
    if _proc is None or _proc.pid != os.getpid():   # a forked child must not reuse it
        _proc = psutil.Process()
        _proc.cpu_percent(interval=None)
    return _proc


def machine_info(started: float) -> Dict[str, Any]:
    """pid, host, CPUs, memory, disk, load and uptime of this machine (via psutil).

    ``cpu_percent`` is this process's CPU use since the previous call (100 = one core).
    """
    proc = _process()
    vm = psutil.virtual_memory()
    try:
        du = psutil.disk_usage(tempfile.gettempdir())
        disk = {"total": du.total, "used": du.used, "free": du.free, "percent": du.percent}
    except OSError:
        disk = {}
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "cpus": psutil.cpu_count() or 1,
        "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent,
                   "rss": proc.memory_info().rss},
        "disk": disk,
        "load": load,
        "cpu_percent": proc.cpu_percent(interval=None),
        "threads": proc.num_threads(),
        "uptime": time.time() - started,
        "python": platform.python_version(),
        "bigmp": __version__,
    }


def flush_all() -> None:
    """Flush Python's and C's stdio buffers so nothing printed is lost at exit."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


class Supervisor:
    """System service on every machine (installed as ``"Supervisor"``)."""

    def __init__(self, server, session, lease: float, grace: float):
        self._server = server
        self._session = session
        self._lease = lease
        self._grace = grace
        self._started = time.time()
        self._deadline = time.monotonic() + lease
        self._grace_deadline: Optional[float] = None
        self._driver_conns = 0
        self._lock = threading.Lock()
        self.exit_reason: Optional[str] = None
        self.exited = threading.Event()
        server.on_connection_closed = self._connection_closed
        if server.stats is None and _config.get("stats"):
            server.stats = _stats.Stats()   # per-method statistics of served calls
        _process()

    # -- called by the driver -------------------------------------------------------------

    def ping(self) -> bool:
        return True

    def getpid(self) -> int:
        return os.getpid()

    def info(self) -> Dict[str, Any]:
        return machine_info(self._started)

    def services(self) -> list:
        return sorted(self._server.services)

    def profile(self, seconds: float = 10.0, interval: float = 0.01,
                mode: str = "cpu") -> Dict[str, Any]:
        """Sample every thread of this machine for ``seconds`` (see :mod:`bigmp.profiling`)."""
        from . import profiling   # on demand: its imports are not every machine's to pay
        return profiling.sample(seconds, interval, mode)

    def stats(self, reset: bool = False) -> Dict[str, Any]:
        """Per-method statistics of the calls this machine served and made (:mod:`bigmp.stats`)."""
        return _stats.machine_stats(self._server, self._session, reset)

    def register(self, name: str, payload: bytes) -> None:
        """Install a cloudpickled service; run its ``init(b)`` first if it has one."""
        service = pickle.loads(payload)
        init = getattr(service, "init", None)
        if callable(init):
            init(self._session)
        self._server.install(name, service)

    def set_registry(self, payload: bytes) -> None:
        """Add BigManager typeids (a cloudpickled registry) to this machine's server."""
        registry = pickle.loads(payload)
        with self._server.mutex:
            self._server.registry.update(registry)

    def run(self, payload: bytes) -> Any:
        """Run a cloudpickled ``(fn, args)`` here (a BigManager initializer, for instance)."""
        fn, args = pickle.loads(payload)
        return fn(*args)

    def keepalive(self, lease: Optional[float] = None) -> Dict[str, Any]:
        """Renew the lease; the connection this arrives on becomes a driver connection."""
        state = self._server.connection_state()
        with self._lock:
            if lease is not None:
                self._lease = float(lease)
            self._deadline = time.monotonic() + self._lease
            self._grace_deadline = None
            if state is not None and not state.driver:
                state.driver = True
                self._driver_conns += 1
        vm = psutil.virtual_memory()
        return {"lease": self._lease, "memory_percent": vm.percent,
                "healthy": vm.percent < 95.0, "uptime": time.time() - self._started}

    def shutdown(self, reason: str = "shut down by the driver") -> None:
        """Exit once this reply has been sent."""
        with self._lock:
            # Recorded now: the driver closes the launcher channel as soon as it has the
            # reply, and that must not be mistaken for the driver dying.
            if self.exit_reason is None:
                self.exit_reason = reason
        self._server.after_reply(lambda: self._exit(reason))

    # -- machine side ---------------------------------------------------------------------

    def _connection_closed(self, conn, state) -> None:
        if state is None or not state.driver:
            return
        with self._lock:
            self._driver_conns -= 1
            if self._driver_conns == 0:
                self._grace_deadline = time.monotonic() + self._grace

    def _watch(self, lifeline_fd: Optional[int]) -> None:
        """Start the watchdog threads (lease, driver connection, launcher channel)."""
        threading.Thread(target=self._watch_lease, name="bigmp-lease", daemon=True).start()
        if lifeline_fd is not None:
            threading.Thread(target=self._watch_lifeline, args=(lifeline_fd,),
                             name="bigmp-lifeline", daemon=True).start()

    def _watch_lease(self) -> None:
        while not self.exited.wait(0.2):
            now = time.monotonic()
            with self._lock:
                lapsed = now > self._deadline
                orphaned = self._grace_deadline is not None and now > self._grace_deadline
            if lapsed:
                self._exit(f"lease of {self._lease:g} s lapsed: the driver stopped renewing it")
            elif orphaned:
                self._exit("the driver's connection closed and it did not come back "
                          f"within {self._grace:g} s")

    def _watch_lifeline(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        self._exit("the launcher channel closed (the driver exited)")

    def _exit(self, reason: str) -> None:
        """Stop serving; the worker's main thread flushes output and exits the process."""
        with self._lock:
            if self.exit_reason is None:
                self.exit_reason = reason
        self.exited.set()
        self._server.stop_event.set()
