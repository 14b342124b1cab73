"""bigmp.Pool: the :class:`multiprocessing.pool.Pool` API, with tasks run on bigmp machines.

::

    import bigmp

    def square(x):
        return x * x

    with bigmp.Pool(4, system="local") as pool:
        print(pool.map(square, range(10)))

The machinery (one chunk in flight per machine, resubmission of a lost machine's work) is
in :mod:`bigmp.tasks`; the result objects are those of :mod:`multiprocessing.pool`, so
``get(timeout)``, ``wait``, ``ready`` and ``successful`` behave exactly as there.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import warnings
from multiprocessing import pool as _mpp
from typing import Any, Callable, Iterable, Optional

from .errors import MachineStopped
from .progress import Counter, make_progress
from .tasks import CALL, MAP, STAR, BrokenPool, Chunk, Job, TaskEngine

log = logging.getLogger("bigmp.pool")

__all__ = ["Pool", "ApplyResult", "AsyncResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator", "BrokenPool"]

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"


def _safe(callback: Optional[Callable[[Any], Any]], what: str):
    """A callback whose exception is logged rather than leaving its result never ready."""
    if callback is None:
        return None

    def call(value):
        try:
            callback(value)
        except Exception:
            log.exception("a Pool %s raised", what)
    return call


class ApplyResult(_mpp.ApplyResult):
    """What ``apply_async`` returns: ``get(timeout)``, ``wait``, ``ready``, ``successful``.

    A :class:`multiprocessing.pool.AsyncResult`; callbacks run in a driver thread, one at
    a time, as in the standard library.
    """

    def __init__(self, pool, callback=None, error_callback=None):
        super().__init__(pool, _safe(callback, "callback"),
                         _safe(error_callback, "error_callback"))


AsyncResult = ApplyResult


class MapResult(_mpp.MapResult):
    """What ``map_async`` and ``starmap_async`` return (ready once every chunk is in)."""

    def __init__(self, pool, chunksize, length, callback=None, error_callback=None):
        super().__init__(pool, chunksize, length, _safe(callback, "callback"),
                         _safe(error_callback, "error_callback"))


class _Counted:
    """Counts the results the caller has taken, so the feeder reads only a bounded way ahead."""

    def _init_count(self) -> None:
        self._taken = 0
        self._room = threading.Condition(threading.Lock())

    def next(self, timeout=None):
        # The standard library's next(), plus the count.
        with self._cond:
            try:
                item = self._items.popleft()
            except IndexError:
                if self._index == self._length:
                    self._pool = None
                    raise StopIteration from None
                self._cond.wait(timeout)
                try:
                    item = self._items.popleft()
                except IndexError:
                    if self._index == self._length:
                        self._pool = None
                        raise StopIteration from None
                    raise _mpp.TimeoutError from None
        with self._room:
            self._taken += 1
            self._room.notify_all()
        success, value = item
        if success:
            return value
        raise value

    __next__ = next

    def _wait_room(self, submitted: int, ahead: int, stop: Callable[[], bool]) -> None:
        with self._room:
            while submitted - self._taken >= ahead and not stop():
                self._room.wait(0.5)


class IMapIterator(_Counted, _mpp.IMapIterator):
    """What ``imap`` returns: results in order; ``next(timeout)`` as in the standard library."""

    def __init__(self, pool):
        super().__init__(pool)
        self._init_count()


class IMapUnorderedIterator(_Counted, _mpp.IMapUnorderedIterator):
    """What ``imap_unordered`` returns: results as they complete."""

    def __init__(self, pool):
        super().__init__(pool)
        self._init_count()


def _apply_deliver(result: ApplyResult):
    def deliver(ok: bool, value: Any) -> None:
        result._set(0, (True, value[0]) if ok else (False, value))
    return deliver


def _map_deliver(result, i: int, size: int, counter: Counter, single: bool):
    def deliver(ok: bool, value: Any) -> None:
        counter.add(size)
        if single:
            result._set(i, (True, value[0]) if ok else (False, value))
        else:
            result._set(i, (ok, value))
    return deliver


class Pool:
    """A :class:`multiprocessing.pool.Pool` whose workers are bigmp machines.

    ``Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None, *,
    session=None, system=None, max_resubmits=3, **options)``

    * ``processes``: how many machines to start (default ``os.cpu_count()``); each runs one
      task chunk at a time.
    * ``session``: a :class:`bigmp.B` to start the machines on. Without it the pool starts
      (and at the end shuts down) a session of its own with ``bigmp.start(system=system,
      **options)``; ``options`` are bigmp's settings (``local_mode="spawn"``, ...).
    * ``initializer(*initargs)`` runs once on each machine before it takes tasks. If it
      raises, that machine fails to start; when none is left, tasks fail with
      :class:`BrokenPool` (the standard library would restart workers forever).
    * ``maxtasksperchild``: after that many chunks a machine is shut down and a fresh one is
      started on the session in its place.

    Functions, lambdas and closures travel by pickle, or by cloudpickle when pickle cannot
    name them. A task's exception is raised by ``get()``/``map()`` as its own type, with the
    traceback from the machine.

    **At-least-once.** When a machine is lost (it exits, is killed, or stops answering),
    the chunks it had not finished are resubmitted to the remaining machines, so a task may
    run more than once: make tasks idempotent, or tolerate repeated side effects. A chunk is
    resubmitted at most ``max_resubmits`` times (then it fails with
    :class:`bigmp.MachineLost`). A lost machine is replaced by a new one (not one that
    never started, nor after ``max_resubmits + 2`` losses in a row without a finished
    chunk); once no machine is left every unfinished task fails with :class:`BrokenPool`.

    Differences from :mod:`multiprocessing`: ``terminate()`` fails the unfinished tasks
    with :class:`bigmp.MachineStopped` rather than leaving their results pending forever;
    ``imap`` reads its input lazily (a bounded number of chunks ahead of the caller, until
    ``close()``) instead of all at once; ``map(..., chunksize=0)`` raises ValueError; callback exceptions are logged.
    ``map``, ``starmap``, ``imap`` and ``imap_unordered`` (and their async forms) take
    ``progress=True`` for a progress bar on stderr (tqdm when installed; nothing when
    stderr is not a terminal).
    """

    def __init__(self, processes: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: Optional[int] = None, *,
                 session=None, system: Optional[str] = None, max_resubmits: int = 3,
                 **options: Any):
        self._state = "INIT"
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._cache: dict = {}
        self._engine = TaskEngine(processes, initializer, tuple(initargs), maxtasksperchild,
                                  session=session, system=system, options=options,
                                  max_resubmits=max_resubmits, kind="pool")
        self._state = RUN

    # -- what is running ----------------------------------------------------------------

    @property
    def session(self):
        """The :class:`bigmp.B` the machines run on."""
        return self._engine.b

    @property
    def machines(self):
        """The machines currently taking tasks (lost and retired ones are left out)."""
        return self._engine.machines()

    def __repr__(self) -> str:
        return f"<bigmp.Pool state={self._state} pool_size={self._processes}>"

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- apply --------------------------------------------------------------------------

    def apply(self, func: Callable, args=(), kwds={}) -> Any:
        """``func(*args, **kwds)`` on a machine; wait for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args=(), kwds={}, callback=None,
                    error_callback=None) -> ApplyResult:
        """Like :meth:`apply`, returning an :class:`ApplyResult` at once."""
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        chunk = Chunk(Job(func), CALL, [(tuple(args), dict(kwds))], _apply_deliver(result))
        self._engine.submit([chunk])
        return result

    # -- map ----------------------------------------------------------------------------

    def map(self, func: Callable, iterable: Iterable[Any], chunksize: Optional[int] = None,
            *, progress: Any = False) -> list:
        """``[func(x) for x in iterable]``, computed in chunks on the machines."""
        return self._map_async(func, iterable, MAP, chunksize, progress=progress).get()

    def map_async(self, func: Callable, iterable: Iterable[Any],
                  chunksize: Optional[int] = None, callback=None, error_callback=None, *,
                  progress: Any = False) -> MapResult:
        """Like :meth:`map`, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback,
                               progress)

    def starmap(self, func: Callable, iterable: Iterable[Iterable[Any]],
                chunksize: Optional[int] = None, *, progress: Any = False) -> list:
        """``[func(*args) for args in iterable]``."""
        return self._map_async(func, iterable, STAR, chunksize, progress=progress).get()

    def starmap_async(self, func: Callable, iterable: Iterable[Iterable[Any]],
                      chunksize: Optional[int] = None, callback=None, error_callback=None,
                      *, progress: Any = False) -> MapResult:
        """Like :meth:`starmap`, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, STAR, chunksize, callback, error_callback,
                               progress)

    def _map_async(self, func, iterable, mode, chunksize=None, callback=None,
                   error_callback=None, progress: Any = False) -> MapResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        n = len(iterable)
        if chunksize is None:
            chunksize, extra = divmod(n, self._processes * 4)
            if extra:
                chunksize += 1
        if n == 0:
            chunksize = 0
        elif chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        result = MapResult(self, chunksize, n, callback, error_callback)
        if n == 0:
            return result
        counter = Counter(make_progress(progress, n), n)
        job = Job(func)
        it = iter(iterable)
        chunks = []
        for i in itertools.count():
            items = list(itertools.islice(it, chunksize))
            if not items:
                break
            chunks.append(Chunk(job, mode, items,
                                _map_deliver(result, i, len(items), counter, False)))
        self._engine.submit(chunks)
        return result

    # -- imap ---------------------------------------------------------------------------

    def imap(self, func: Callable, iterable: Iterable[Any], chunksize: int = 1, *,
             progress: Any = False):
        """Results of ``func`` over ``iterable`` in order, as they become available."""
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return self._imap(IMapIterator(self), func, iterable, chunksize, progress)

    def imap_unordered(self, func: Callable, iterable: Iterable[Any], chunksize: int = 1, *,
                       progress: Any = False):
        """Like :meth:`imap`, in the order the results complete."""
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        return self._imap(IMapUnorderedIterator(self), func, iterable, chunksize, progress)

    def _imap(self, result, func, iterable, chunksize: int, progress: Any):
        total = len(iterable) if hasattr(iterable, "__len__") else None
        counter = Counter(make_progress(progress, total), total)
        engine = self._engine
        engine.begin_feed()
        try:
            threading.Thread(target=_feed, name="bigmp-pool-feeder", daemon=True,
                             args=(engine, result, Job(func), iterable, chunksize, counter,
                                   4 * self._processes + 4)).start()
        except BaseException:
            engine.end_feed()
            raise
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)

    # -- ending -------------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more tasks; machines stop once the submitted ones are done."""
        if self._state == RUN:
            self._state = CLOSE
            self._engine.close()
            self._wake_feeders()

    def _wake_feeders(self) -> None:
        for r in list(self._cache.values()):
            if isinstance(r, _Counted):
                with r._room:
                    r._room.notify_all()

    def terminate(self) -> None:
        """Stop the machines now; unfinished tasks fail with :class:`bigmp.MachineStopped`."""
        self._state = TERMINATE
        self._engine.terminate()
        self._wake_feeders()

    def join(self) -> None:
        """Wait until every task is done and the machines have stopped (after close/terminate)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._engine.join()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn=warnings.warn):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running bigmp pool {self!r}", ResourceWarning, source=self)
            engine = getattr(self, "_engine", None)
            if engine is not None:
                engine.close()


def _feed(engine: TaskEngine, result, job: Job, iterable, chunksize: int, counter: Counter,
          limit: int) -> None:
    """imap's feeder thread: read the input lazily, a bounded number of chunks ahead."""
    single = chunksize == 1
    i = 0
    count = 0

    def fail(err: BaseException) -> None:
        with engine._deliver_lock:
            result._set(i, (False, err))
            result._set_length(i + 1)
        counter.close()

    try:
        try:
            it = iter(iterable)
        except Exception as exc:
            fail(exc)
            return
        while True:
            try:
                items = list(itertools.islice(it, chunksize))
            except Exception as exc:
                fail(exc)
                return
            if not items:
                break
            # Stay ``limit`` chunks ahead of what the caller has taken (until close(): then
            # everything is read, so that close(); join() works with an untouched iterator)
            # and of what the machines have taken.
            result._wait_room(i, limit, engine.closing)
            if not engine.wait_backlog(limit):
                fail(engine.broken or MachineStopped("the pool was terminated before this "
                                                     "task finished"))
                return
            engine.submit([Chunk(job, MAP, items,
                                 _map_deliver(result, i, len(items), counter, single))])
            i += 1
            count += len(items)
        with engine._deliver_lock:
            result._set_length(i)
        counter.set_total(count)
    finally:
        engine.end_feed()
