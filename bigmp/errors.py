"""bigmp's exceptions, and how a service's exception travels back with its remote traceback.

A method's exception is re-raised in the caller as its *own* type with its message; its
``__traceback__`` holds the machine's frames (rebuilt with tblib), and a note names the
machine. An exception that cannot be pickled (or unpickled on the caller) arrives as a
:class:`RemoteError` carrying the remote text, so nothing is lost and nothing hangs.
"""
from __future__ import annotations

import pickle
import traceback
from multiprocessing.managers import RemoteError as _MpRemoteError
from typing import Any, Optional

import cloudpickle

try:
    from tblib import Traceback as _TbTraceback
except ImportError:  # pragma: no cover - tblib is a declared dependency
    _TbTraceback = None

__all__ = ["BigmpError", "MachineStopped", "MachineLost", "RemoteError", "UnknownService",
           "UnknownMethod", "Unserializable", "StartError"]


class BigmpError(Exception):
    """Base class of bigmp's own errors."""


class MachineStopped(BigmpError):
    """The machine is STOPPED: calls to it fail fast with this (fatal, not retried)."""


class MachineLost(MachineStopped, ConnectionError):
    """The machine stopped unexpectedly (exited, was killed, or stopped answering)."""


class StartError(MachineStopped):
    """The machine failed while starting (launch, handshake, service registration or init)."""


class RemoteError(BigmpError, _MpRemoteError):
    """A remote exception that could not travel as itself; ``str()`` has the remote traceback."""

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.args[0], self.remote_type, self.remote_traceback))

    def __str__(self) -> str:
        text = self.args[0] if self.args else ""
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class _Named(BigmpError, _MpRemoteError):
    # Also a multiprocessing RemoteError: what stdlib manager code catches for these.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownService(_Named, LookupError):
    """No service (or shared object) of that name is on the machine."""


class UnknownMethod(_Named, AttributeError):
    """The service has no public (exposed) method of that name."""


class Unserializable(_Named, TypeError):
    """A result could not be pickled to send it back (the stdlib's ``#UNSERIALIZABLE``)."""


def _rebuild(data: Optional[bytes], tb: Optional[dict], text: str, type_name: str,
             origin: str) -> BaseException:
    """Runs in the caller when the error frame is unpickled."""
    exc: Optional[BaseException] = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception as why:
            exc = RemoteError(f"{type_name} raised on {origin} could not be unpickled here "
                              f"({why!r})", type_name, text)
    if not isinstance(exc, BaseException):
        exc = RemoteError(f"{type_name} raised on {origin} could not be pickled", type_name, text)
    if tb is not None and _TbTraceback is not None:
        try:
            exc = exc.with_traceback(_TbTraceback.from_dict(tb).as_traceback())
        except Exception:
            pass
    if origin and hasattr(exc, "add_note"):
        exc.add_note(f"(raised remotely on {origin})")
    exc.remote_origin = origin
    return exc


class _ErrorCarrier:
    """Pickles as a call to :func:`_rebuild`: the receiver gets the exception itself."""

    __slots__ = ("args",)

    def __init__(self, *args: Any):
        self.args = args

    def __reduce__(self):
        return (_rebuild, self.args)


def pack_exception(exc: BaseException, origin: str) -> Any:
    """What the server sends as the ``#ERROR`` payload for ``exc`` raised in a method."""
    tb = None
    frames = exc.__traceback__
    # Start at the service's own frames: the server's dispatch frames are noise to users.
    while frames is not None and frames.tb_next is not None and \
            frames.tb_frame.f_globals.get("__name__", "").startswith("bigmp."):
        frames = frames.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, frames))
    if _TbTraceback is not None and frames is not None:
        try:
            tb = _TbTraceback(frames).to_dict()
        except Exception:
            tb = None
    data: Optional[bytes]
    try:
        data = cloudpickle.dumps(exc.with_traceback(None), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # an exception whose unpickling fails (bad __init__) is caught here
    except Exception:
        data = None
    return _ErrorCarrier(data, tb, text, type(exc).__qualname__, origin)
