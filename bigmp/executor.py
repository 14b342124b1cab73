"""bigmp.Executor: a :class:`concurrent.futures.Executor` whose workers are bigmp machines.

::

    import bigmp

    with bigmp.Executor(4) as ex:
        fut = ex.submit(pow, 2, 10)
        print(fut.result(), list(ex.map(abs, [-1, -2], chunksize=2)))

Same machinery as :class:`bigmp.Pool` (see :mod:`bigmp.tasks`).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent import futures as _cf
from typing import Any, Callable, Iterable, Iterator, List, Optional

from .progress import Counter, make_progress
from .tasks import CALL, STAR, BrokenPool, Chunk, Job, TaskEngine

__all__ = ["Executor", "BrokenPool"]


def _future_deliver(fut: _cf.Future, single: bool, counter: Optional[Counter] = None,
                    size: int = 1):
    def deliver(ok: bool, value: Any) -> None:
        if counter is not None:
            counter.add(size)
        if fut.cancelled():
            return
        try:
            if ok:
                fut.set_result(value[0] if single else value)
            else:
                fut.set_exception(value)
        except _cf.InvalidStateError:
            pass    # cancelled meanwhile
    return deliver


def _result_or_cancel(fut: _cf.Future, timeout: Optional[float] = None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut


class Executor(_cf.Executor):
    """A :class:`concurrent.futures.Executor` (like ``ProcessPoolExecutor``) over machines.

    ``Executor(max_workers=None, *, session=None, system=None, initializer=None,
    initargs=(), max_resubmits=3, **options)``: ``max_workers`` machines (default
    ``os.cpu_count()``) started on ``session``, or on a session of the executor's own made
    with ``bigmp.start(system=system, **options)``. ``initializer(*initargs)`` runs once on
    each machine.

    ``submit`` returns a :class:`concurrent.futures.Future`; ``map(fn, *iterables,
    timeout=None, chunksize=1, progress=False)`` yields results in order;
    ``shutdown(wait=True, *, cancel_futures=False)`` as in the standard library.

    **At-least-once**: the unfinished work of a lost machine is resubmitted to the others,
    so a call may run more than once. When no machine is left, pending futures fail with
    :class:`BrokenPool` (a :class:`concurrent.futures.BrokenExecutor`) and so does
    ``submit``.
    """

    def __init__(self, max_workers: Optional[int] = None, *, session=None,
                 system: Optional[str] = None, initializer: Optional[Callable] = None,
                 initargs: Iterable[Any] = (), max_resubmits: int = 3, **options: Any):
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._max_workers = max_workers
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._engine = TaskEngine(max_workers, initializer, tuple(initargs), None,
                                  session=session, system=system, options=options,
                                  max_resubmits=max_resubmits, kind="executor",
                                  wrap_encoding_errors=False)

    @property
    def session(self):
        """The :class:`bigmp.B` the machines run on."""
        return self._engine.b

    @property
    def machines(self):
        """The machines currently taking work."""
        return self._engine.machines()

    def __repr__(self) -> str:
        state = "shutdown" if self._shutdown else "running"
        return f"<bigmp.Executor {state} max_workers={self._max_workers}>"

    def _check(self) -> None:
        if self._engine.broken is not None:
            raise BrokenPool(str(self._engine.broken)) from self._engine.broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> _cf.Future:
        """Schedule ``fn(*args, **kwargs)`` on a machine; return its Future."""
        with self._shutdown_lock:
            self._check()
            fut: _cf.Future = _cf.Future()
            self._engine.submit([Chunk(Job(fn), CALL, [(args, kwargs)],
                                       _future_deliver(fut, True),
                                       start=fut.set_running_or_notify_cancel)])
            return fut

    def map(self, fn: Callable, *iterables: Iterable[Any], timeout: Optional[float] = None,
            chunksize: int = 1, progress: Any = False) -> Iterator[Any]:
        """``fn`` over ``zip(*iterables)``, results in order; chunks of ``chunksize`` calls.

        The inputs are read at once (as in the standard library). Iterating raises
        TimeoutError if a result is not ready ``timeout`` seconds after this call, and a
        call's exception when its result is reached (for chunks: at the chunk's first item).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if timeout is not None:
            end_time = timeout + time.monotonic()
        args = list(zip(*iterables))
        counter = Counter(make_progress(progress, len(args)), len(args))
        job = Job(fn)
        it = iter(args)
        fs: List[_cf.Future] = []
        chunks = []
        while True:
            items = list(itertools.islice(it, chunksize))
            if not items:
                break
            fut: _cf.Future = _cf.Future()
            fs.append(fut)
            chunks.append(Chunk(job, STAR, items, _future_deliver(fut, False, counter,
                                                                  len(items)),
                                start=fut.set_running_or_notify_cancel))
        with self._shutdown_lock:
            self._check()
            self._engine.submit(chunks)

        def result_iterator():
            try:
                fs.reverse()
                while fs:
                    if timeout is None:
                        chunk = _result_or_cancel(fs.pop())
                    else:
                        chunk = _result_or_cancel(fs.pop(), end_time - time.monotonic())
                    yield from chunk
            finally:
                for future in fs:
                    future.cancel()
        return result_iterator()

    def __del__(self):
        if getattr(self, "_shutdown", True) is False and hasattr(self, "_engine"):
            self._engine.close()   # the machines stop once the submitted work is done

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; optionally cancel what has not started; stop the machines
        once the rest is done (waiting for it when ``wait``)."""
        with self._shutdown_lock:
            self._shutdown = True
        engine = self._engine
        if cancel_futures:
            kept = []
            for chunk in engine.drain():
                # A chunk's start() is its future's set_running_or_notify_cancel: the
                # future is still PENDING here, so cancel() succeeds and we drop the chunk.
                fut = getattr(chunk.start, "__self__", None)
                if fut is None or not fut.cancel():
                    kept.append(chunk)
            if kept:
                engine.submit(kept)
        engine.close()
        if wait:
            engine.join()
