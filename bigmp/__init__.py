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

_LAZY = {"Pool": ".pool", "BrokenPool": ".pool", "Executor": ".executor"}


def __getattr__(name: str):
    # Pool and Executor load on first use: machines start faster without them.
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bigmp' has no attribute {name!r}")

__all__ = [
    "__version__", "start", "B", "Machine", "State", "ServiceProxy", "stream",
    "BigManager", "BigSyncManager", "BigProxy", "BigAutoProxy",
    "BigmpError", "MachineStopped", "MachineLost", "StartError", "RemoteError",
    "UnknownService", "UnknownMethod", "add_arguments", "options_from_args",
    "Pool", "Executor", "BrokenPool",
]
