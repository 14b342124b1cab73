"""bigmp: spread one Python program over many machines, the multiprocessing way.

A re-creation of GRAIL's bigmachine on :mod:`multiprocessing.managers`::

    import bigmp

    class CirclePI:
        def sample(self, n): ...

    with bigmp.start(system="local") as b:
        machines = b.start(4, services={"PI": CirclePI()})
        total = sum(m.call("PI.sample", 1_000_000) for m in machines)

and a drop-in ``BaseManager``: ``from bigmp import BigManager``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import add_arguments, options_from_args
from .errors import (BigmpError, MachineLost, MachineStopped, RemoteError, StartError,
                     UnknownMethod, UnknownService)
from .machine import Machine, ServiceProxy, State
from .cluster import B, start
from .managers import BigAutoProxy, BigManager, BigProxy, BigSyncManager
from .streams import stream
from .pool import BrokenPool, Pool
from .executor import Executor

__all__ = [
    "__version__", "start", "B", "Machine", "State", "ServiceProxy", "stream",
    "BigManager", "BigSyncManager", "BigProxy", "BigAutoProxy",
    "BigmpError", "MachineStopped", "MachineLost", "StartError", "RemoteError",
    "UnknownService", "UnknownMethod", "add_arguments", "options_from_args",
    "Pool", "Executor", "BrokenPool",
]
