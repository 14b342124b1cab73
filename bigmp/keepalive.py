"""Driver-side keepalive: renew each machine's lease and notice at once when it is gone.

One thread per machine holds a dedicated connection and calls ``Supervisor.keepalive``
every ``interval`` seconds. Between calls it polls that connection, so a machine that dies
(EOF) is noticed immediately, not at the next tick. A machine that does not answer for
``timeout`` seconds, or whose address refuses connections, is marked STOPPED.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional

from .errors import MachineLost

log = logging.getLogger("bigmp.keepalive")

__all__ = ["Keeper"]


class Keeper:
    """Keeps one machine alive and watches it."""

    def __init__(self, machine, timings: Dict[str, float]):
        self.machine = machine
        self.lease = timings["lease"]
        self.interval = timings["interval"]
        self.timeout = timings["timeout"]
        self.last_ok = time.monotonic()
        self.latency: Optional[float] = None
        self.reply: Dict[str, Any] = {}
        self.healthy = True            # as the last keepalive reply said
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"bigmp-keepalive-{machine.name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _fail(self, why: str) -> None:
        from .machine import State
        self.machine._set_state(State.STOPPED, MachineLost(f"machine {self.machine.name} lost: {why}"))

    def _run(self) -> None:
        from .machine import State
        m = self.machine
        conn = None
        while not self._stop.is_set() and m.state != State.STOPPED:
            waited = time.monotonic() - self.last_ok
            if waited > self.timeout:
                self._fail(f"no keepalive answer for {waited:.1f} s (timeout {self.timeout:g} s)")
                break
            try:
                if conn is None:
                    conn = m._dial(timeout=max(0.05, self.timeout - waited))
                t0 = time.monotonic()
                conn.send(("Supervisor", "keepalive", (self.lease,), {}))
                left = self.timeout - (t0 - self.last_ok)
                if not conn.poll(max(0.05, left)):
                    self._fail(f"no keepalive answer for {self.timeout:g} s (machine hung?)")
                    break
                kind, reply = conn.recv()
                if kind != "#RETURN":
                    raise OSError(f"keepalive failed: {reply!r}")
                self.latency = time.monotonic() - t0
                self.last_ok = time.monotonic()
                self.reply = reply
                healthy = reply.get("healthy", True)
                if healthy != self.healthy:   # said on each change, not at every tick
                    if healthy:
                        log.info("machine %s is healthy again: memory %.0f%% used", m.name,
                                 reply.get("memory_percent", 0))
                    else:
                        log.warning("machine %s is unhealthy: memory %.0f%% used", m.name,
                                    reply.get("memory_percent", 0))
                    self.healthy = healthy
                # Readable before the next tick means EOF: the machine went away.
                if conn.poll(self.interval) and not self._stop.is_set():
                    raise EOFError("keepalive connection closed by the machine")
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                self._fail(f"its address refuses connections ({exc!r})")
                break
            except Exception as exc:   # EOF, reset, or a handshake cut short by an exit
                if conn is not None:
                    conn.close()
                    conn = None
                if self._stop.is_set():
                    break
                log.info("keepalive to %s failed (%r); retrying", m.name, exc)
                self._stop.wait(min(self.interval, 0.5))
        if conn is not None:
            conn.close()
