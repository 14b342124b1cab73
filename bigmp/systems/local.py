"""Local machines: one process per machine on this host.

``local_mode="fork"`` (the default on Linux) forks machines from a fork server made when
the session starts: a machine is RUNNING in milliseconds and sees the driver's modules as
they were. ``local_mode="spawn"`` runs ``python -m bigmp.worker`` in a fresh interpreter
(services travel by cloudpickle, the driver's main module is imported as ``__mp_main__``).
Machines listen on private unix sockets (0600 in a 0700 directory).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, Optional

from .base import Launch, System, encode_config
from .forkserver import ForkServer

__all__ = ["LocalSystem"]


class _LocalLaunch(Launch):
    def kill(self) -> None:
        if self.pid and not self.exited:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pipes():
    control_r, control_w = os.pipe()
    hand_r, hand_w = os.pipe()
    out_r, out_w = os.pipe()
    for fd in (control_w, hand_r, out_r):
        os.set_inheritable(fd, False)
    return (control_r, hand_w, out_w), (control_w, hand_r, out_r)


class LocalSystem(System):
    """Machines as processes on this host (fork server or fresh interpreter)."""

    name = "local"

    def __init__(self, options: Dict[str, Any]):
        super().__init__(options)
        mode = options.get("local_mode", "fork")
        if mode not in ("fork", "spawn"):
            raise ValueError(f"local_mode must be 'fork' or 'spawn', not {mode!r}")
        if mode == "fork" and not hasattr(os, "fork"):
            mode = "spawn"
        self.mode = mode
        self._forkserver: Optional[ForkServer] = ForkServer() if mode == "fork" else None

    def launch(self, name: str, config: Dict[str, Any]) -> Launch:
        if self.mode == "spawn":
            # A fresh interpreter imports the driver's main module as multiprocessing's
            # spawn does, so what pickle names in __main__ resolves there.
            from multiprocessing import spawn
            prep = spawn.get_preparation_data(name)
            prep.pop("authkey", None)
            config = dict(config, main=prep, sys_path=[p for p in sys.path if p])
        data = encode_config(config)
        theirs, ours = _pipes()
        launch = _LocalLaunch()
        launch.control, launch.handshake, launch.output = ours
        try:
            if self._forkserver is not None:
                launch.pid = self._forkserver.fork(list(theirs), launch._exited)
            else:
                launch.pid = self._spawn(theirs, launch)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(launch.control, view):]
        except OSError:
            # It died before reading its configuration: the handshake will say so.
            launch.kill()
        return launch

    def _spawn(self, fds, launch: Launch) -> int:
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen([self.options.get("python") or "python3", "-m", "bigmp.worker"],
                                stdin=fds[0], stdout=fds[1], stderr=fds[2], env=env,
                                close_fds=True, start_new_session=True)
        threading.Thread(target=lambda: launch._exited(proc.wait()), daemon=True,
                         name=f"bigmp-wait-{proc.pid}").start()
        return proc.pid

    def shutdown(self) -> None:
        fs, self._forkserver = self._forkserver, None
        if fs is not None:
            fs.close()
