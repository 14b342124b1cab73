"""CallFuture: the :class:`concurrent.futures.Future` of one multiplexed call.

A program may hold thousands of these at once (``[m.call_async(...) for ...]``), and each
stdlib Future brings its own ``threading.Condition`` (a Python object, its RLock and a
deque): with the entry that tracks the call, that is several objects per call for the
garbage collector to walk again and again while the calls are pending -- about half of
the driver's time per async call in a 10,000-call burst (measured with ``gc.disable()``).

A CallFuture keeps the Future API and semantics but allocates no Condition:

* its ``_condition`` is a bare RLock (a C object the collector does not track). The
  stdlib only enters, acquires and releases a future's ``_condition`` outside the waiting
  methods, so :func:`concurrent.futures.wait`, :func:`~concurrent.futures.as_completed`,
  ``add_done_callback`` and ``done()`` work unchanged, and each future keeps a lock of
  its own: ``wait`` takes them in the stdlib's global order (by id), deadlock-free. (One
  lock shared by all CallFutures would break that order when stdlib futures are waited on
  beside them by two threads.) ``cancel()`` would notify, but never reaches it: see below;
* a thread that blocks in ``result()``/``exception()`` waits on an Event made for that
  future only then;
* it is born RUNNING: its request is already on its way, so, like an executor's running
  task, it cannot be cancelled (``cancel()`` returns False).

It also carries the call's bookkeeping (method, start time, request bytes) in its own
slots, instead of a list beside it.
"""
from __future__ import annotations

import threading
from _thread import RLock as _RLock
from concurrent.futures import Future, InvalidStateError, TimeoutError as _FutureTimeout
from concurrent.futures._base import FINISHED as _FINISHED, RUNNING as _RUNNING
from typing import Any, Optional

__all__ = ["CallFuture"]


class CallFuture(Future):
    """A Future completed by a mux channel's reader (see the module doc)."""

    def __init__(self, method: str = "", t0: float = 0.0):
        self._condition = _RLock()
        self._state = _RUNNING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self._event: Optional[threading.Event] = None
        self._method = method         # "Service.method", for the statistics
        self._t0 = t0                 # when it was submitted
        self._request_bytes = 0

    def _complete(self, result: Any, exception: Optional[BaseException]) -> None:
        with self._condition:
            if self._state != _RUNNING:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = _FINISHED
            for waiter in self._waiters:
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            event = self._event
        if event is not None:
            event.set()
        if self._done_callbacks:
            self._invoke_callbacks()

    def set_result(self, result: Any) -> None:
        self._complete(result, None)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        self._complete(None, exception)

    def _wait(self, timeout: Optional[float]) -> None:
        with self._condition:
            if self._state == _FINISHED:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise _FutureTimeout()

    def result(self, timeout: Optional[float] = None) -> Any:
        self._wait(timeout)
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None   # as the stdlib: no reference cycle through the traceback
        return self._result

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._wait(timeout)
        return self._exception
