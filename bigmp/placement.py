"""``BigManager(system=...)``: a manager whose server is a bigmp machine.

The machine is started by the named backend with no services; the manager's registry (and
initializer) are shipped to it by cloudpickle, and the manager then talks to the machine's
address exactly as it would to a child process it had started itself.
"""
from __future__ import annotations

from multiprocessing import managers as _mpm, util as _util

import cloudpickle

from .machine import State

__all__ = ["start_on_machine"]


def _shutdown_session(session, state) -> None:
    try:
        session.shutdown()
    finally:
        state.value = _mpm.State.SHUTDOWN


def start_on_machine(manager, initializer=None, initargs=()) -> None:
    """Start ``manager``'s server on a machine of ``manager._system``."""
    from .cluster import start

    if manager._state.value != _mpm.State.INITIAL:
        if manager._state.value == _mpm.State.STARTED:
            raise _mpm.ProcessError("Already started server")
        raise _mpm.ProcessError(f"Unknown state {manager._state.value!r}")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    session = start(system=manager._system, authkey=bytes(manager._authkey), **manager._options)
    try:
        machine = session.start(1)[0]
        if machine.wait(State.RUNNING) != State.RUNNING:
            raise machine.err
        machine.call("Supervisor.set_registry", cloudpickle.dumps(dict(manager._registry)))
        if initializer is not None:
            machine.call("Supervisor.run", cloudpickle.dumps((initializer, tuple(initargs))))
    except BaseException:
        session.shutdown()
        raise
    manager._address = machine.addr
    manager._session = session
    manager._machine = machine
    manager._state.value = _mpm.State.STARTED
    manager.shutdown = _util.Finalize(manager, _shutdown_session,
                                      args=(session, manager._state), exitpriority=0)
