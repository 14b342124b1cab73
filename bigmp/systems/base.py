"""The System interface: what a backend (local, ssh, ec2, testing) must do, and nothing more.

A backend only *launches* worker processes and hands back their three channels (see
:mod:`bigmp.worker`); calls, keepalives, output prefixing and service registration live
outside ``systems/`` and are the same for every backend.
"""
from __future__ import annotations

import abc
import base64
import os
import pickle
import select
import threading
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ["System", "Launch", "read_handshake", "encode_config"]


class Launch(abc.ABC):
    """One launched worker process, as the driver sees it.

    ``control`` is a writable fd, or -1 where :meth:`close_control` is overridden (SSH);
    closing it tells the worker the driver is gone.
    ``handshake`` and ``output`` readable fds. The driver owns and closes all three.
    """

    control: int
    handshake: int
    output: int
    pid: Optional[int] = None

    def __init__(self) -> None:
        self._on_exit: List[Callable[[Optional[int]], None]] = []
        self.returncode: Optional[int] = None
        self.exited = False
        self._control_lock = threading.Lock()

    def close_control(self) -> None:
        """Close the control channel once (the worker sees EOF and exits)."""
        with self._control_lock:
            fd, self.control = self.control, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def on_exit(self, fn: Callable[[Optional[int]], None]) -> None:
        """Call ``fn(returncode)`` when the process has exited (now, if it already has)."""
        with self._control_lock:
            if not self.exited:
                self._on_exit.append(fn)
                return
        fn(self.returncode)

    def _exited(self, returncode: Optional[int]) -> None:
        """Backends call this once the process is gone (``None``: status unknown)."""
        with self._control_lock:
            if self.exited:
                return
            self.exited = True
            self.returncode = returncode
            fns, self._on_exit = self._on_exit, []
        for fn in fns:
            fn(returncode)

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the process now (SIGKILL or the backend's equivalent)."""


class System(abc.ABC):
    """A backend that starts machines. Subclasses live one per module in ``bigmp.systems``."""

    name: str = "?"

    def __init__(self, options: Dict[str, Any]):
        self.options = options

    def attach(self, session: Any) -> None:
        """Called once by the session that owns this System (its authkey is known now)."""

    @abc.abstractmethod
    def launch(self, name: str, config: Dict[str, Any]) -> Launch:
        """Start one worker process and send it ``config`` (see :func:`encode_config`)."""

    def capacity(self) -> int:
        """How many machines ``b.start()`` starts when given no count."""
        return os.cpu_count() or 1

    def machine_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def keepalive(self) -> Dict[str, float]:
        """Keepalive timings: lease, interval and timeout (seconds)."""
        o = self.options
        return {"lease": o["keepalive_lease"], "interval": o["keepalive_interval"],
                "timeout": o["keepalive_timeout"], "grace": o["driver_grace"]}

    def listen_address(self) -> Any:
        """Where workers should listen (None: a private unix socket)."""
        return None

    def driver_address(self, launch: "Launch", addr: Any) -> Any:
        """The address the driver dials for a worker that listens on ``addr``.

        Backends that put something between driver and machine (an SSH tunnel, a fault
        injecting relay, a NAT'd cloud address) map it here; by default it is ``addr``.
        """
        return addr

    def prepare_shutdown(self) -> None:
        """Called first by the session's shutdown (the testing system undoes its faults)."""

    def shutdown(self) -> None:
        """Release what the backend holds (fork server, SSH connections, ...)."""


def encode_config(config: Dict[str, Any]) -> bytes:
    """The control line a worker reads first (see :mod:`bigmp.worker`)."""
    return base64.b64encode(pickle.dumps(config, protocol=4)) + b"\n"


def read_handshake(fd: int, timeout: float) -> bytes:
    """Read the one handshake line from ``fd`` within ``timeout`` seconds (b'' on EOF)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no launch handshake within {timeout:g} s")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\n", 1)[0]
