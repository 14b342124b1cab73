"""The machinery under :class:`bigmp.Pool` and :class:`bigmp.Executor`: task chunks on machines.

A :class:`TaskEngine` owns a set of machines (started on a session it is given, or on a
session of its own) and a queue of :class:`Chunk` objects. Each machine gets one driver
thread, its *slot*, that takes the next chunk, runs it with one call to the
:class:`TaskWorker` service on the machine and hands the outcome to the chunk's ``deliver``
callback. One chunk is in flight per machine.

Delivery is **at least once**: when a machine is lost (it exited, was killed, or stopped
answering its keepalives), the chunk it was running goes back to the front of the queue and
another machine runs it again, so a task may run more than once (and its side effects may
happen more than once). A chunk is resubmitted at most ``max_resubmits`` times; after that
its tasks fail with :class:`bigmp.MachineLost`. A lost machine is replaced by a new one in
its slot, as :class:`multiprocessing.Pool` replaces workers, unless it never started or its
slot lost ``max_resubmits + 2`` machines in a row without finishing a chunk (more than one
chunk's runs); the slot then ends. Once no slot is left, every task still waiting fails
with :class:`BrokenPool`, as does any new submission.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
import threading
import time
from concurrent.futures import BrokenExecutor
from multiprocessing.pool import MaybeEncodingError
from typing import Any, Callable, Deque, Dict, List, Optional

import cloudpickle

from .connection import dumps
from .errors import MachineLost, MachineStopped, StartError, pack_exception
from .machine import Machine, State

log = logging.getLogger("bigmp.tasks")

__all__ = ["TaskEngine", "TaskWorker", "Chunk", "Job", "BrokenPool", "SERVICE",
           "MAP", "STAR", "CALL"]

SERVICE = "BigmpTasks"

# How a chunk's items are applied: fn(x), fn(*x), or fn(*args, **kwargs) for x = (args, kwargs).
MAP, STAR, CALL = "map", "star", "call"


class BrokenPool(MachineLost, BrokenExecutor):
    """No machine is left to run the tasks: every one was lost or failed to start.

    A :class:`bigmp.MachineLost` and a :class:`concurrent.futures.BrokenExecutor`, so code
    written for ``ProcessPoolExecutor`` (which raises ``BrokenProcessPool``) catches it too.
    """


class TaskWorker:
    """The service on each machine of a pool: runs chunks of pickled ``(fn, items)``."""

    def __init__(self, initializer: Optional[Callable[..., Any]] = None, initargs=(),
                 wrap_encoding_errors: bool = True):
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.wrap_encoding_errors = wrap_encoding_errors

    def init(self, b) -> None:
        self._origin = os.environ.get("BIGMP_MACHINE") or f"{socket.gethostname()}:{os.getpid()}"
        if self.initializer is not None:
            self.initializer(*self.initargs)

    def run(self, fn_blob: bytes, mode: str, items_blob: bytes):
        """Apply the function to every item; ``(True, pickled results)`` or ``(False, error)``.

        The first exception stops the chunk (as in :mod:`multiprocessing.pool`) and travels
        back with its traceback; results that cannot be pickled fail the chunk with
        :class:`multiprocessing.pool.MaybeEncodingError` (a Pool) or with the pickling
        error itself (an Executor), as the standard library does.
        """
        origin = getattr(self, "_origin", None) or f"{socket.gethostname()}:{os.getpid()}"
        try:
            fn = pickle.loads(fn_blob)
            items = pickle.loads(items_blob)
            if mode == MAP:
                out = [fn(x) for x in items]
            elif mode == STAR:
                out = [fn(*x) for x in items]
            else:
                out = [fn(*a, **k) for a, k in items]
        except Exception as exc:
            return False, pack_exception(exc, origin)
        try:
            return True, bytes(dumps(out))
        except Exception as exc:
            if self.wrap_encoding_errors:
                exc = MaybeEncodingError(exc, out)
            return False, pack_exception(exc, origin)

    def getpid(self) -> int:
        return os.getpid()


class Job:
    """A function shared by the chunks of one submission, pickled once."""

    __slots__ = ("blob", "error")

    def __init__(self, fn: Callable[..., Any]):
        self.blob: Optional[bytes] = None
        self.error: Optional[BaseException] = None
        try:
            self.blob = bytes(dumps(fn))
        except Exception as exc:
            self.error = exc


class Chunk:
    """Items to run together on one machine; ``deliver(ok, value)`` is called exactly once.

    ``value`` is the list of results (one per item) when ``ok``, else the exception.
    ``start()`` (optional) is called once before the first run; if it returns False the
    chunk is dropped without being delivered (a cancelled future).
    """

    __slots__ = ("job", "mode", "items", "blob", "deliver", "start", "attempts", "started",
                 "size")

    def __init__(self, job: Job, mode: str, items: List[Any],
                 deliver: Callable[[bool, Any], None],
                 start: Optional[Callable[[], bool]] = None):
        self.job = job
        self.mode = mode
        self.items: Optional[List[Any]] = items
        self.size = len(items)
        self.blob: Optional[bytes] = None
        self.deliver = deliver
        self.start = start
        self.attempts = 0
        self.started = False


class _Lost(Exception):
    """The machine of a slot is gone (``err`` says why); ``ran``: the chunk may have run."""

    def __init__(self, err: BaseException, ran: bool = True):
        super().__init__(str(err))
        self.err = err
        self.ran = ran


class _Retry(Exception):
    """A connection failed but the machine may still be up: run the chunk again."""

    def __init__(self, err: BaseException):
        super().__init__(str(err))
        self.err = err




def retire(m: Machine, timeout: float = 10.0) -> None:
    """Shut one machine down on purpose (not a loss): no warning, no MachineLost."""
    if m.state == State.STOPPED:
        return
    try:
        m.wait(State.RUNNING, timeout=timeout)
    except TimeoutError:
        pass
    if m.state != State.STOPPED:
        m.shutdown(timeout)


class TaskEngine:
    """Machines, their slots, and the queue of chunks (see the module docstring)."""

    def __init__(self, processes: int, initializer=None, initargs=(), maxtasks=None, *,
                 session=None, system=None, options: Optional[Dict[str, Any]] = None,
                 max_resubmits: int = 3, kind: str = "pool", wrap_encoding_errors: bool = True):
        from .cluster import start as _start
        options = dict(options or {})
        if session is not None and (system is not None or options):
            raise TypeError("give either session= or system=/bigmp options, not both")
        worker = TaskWorker(initializer, initargs, wrap_encoding_errors)
        try:
            cloudpickle.dumps(worker)
        except Exception as exc:
            raise TypeError(f"the initializer and initargs cannot be pickled: {exc!r}") from exc
        self.kind = kind
        self.processes = processes
        self.maxtasks = maxtasks
        self.max_resubmits = max_resubmits
        self.services = {SERVICE: worker}
        self.owns_session = session is None
        self.b = _start(system=system, **options) if session is None else session
        self._cond = threading.Condition()
        self._queue: Deque[Chunk] = collections.deque()
        self._in_flight = 0
        self._feeders = 0
        self._closing = False
        self._terminated = False
        self.broken: Optional[BrokenPool] = None
        self._deliver_lock = threading.RLock()   # results and callbacks one at a time
        self._current: Dict[int, Machine] = {}
        self._live = 0
        self._last_loss: Optional[BaseException] = None
        self._threads: List[threading.Thread] = []
        self._released = False
        self._renew_lock = threading.Lock()
        self._retiring: List[threading.Thread] = []
        try:
            machines = self.b.start(processes, services=self.services)
        except BaseException:
            if self.owns_session:
                self.b.shutdown()
            raise
        self._live = len(machines)
        for i, m in enumerate(machines):
            self._current[i] = m
            t = threading.Thread(target=self._slot, args=(i, m), daemon=True,
                                 name=f"bigmp-{kind}-slot-{i}")
            self._threads.append(t)
        for t in self._threads:
            t.start()

    # -- the driver's side ------------------------------------------------------------------

    def machines(self) -> List[Machine]:
        """The machines currently running (or starting) tasks, one per live slot."""
        with self._cond:
            return [m for m in self._current.values() if m.state != State.STOPPED]

    def submit(self, chunks: List[Chunk]) -> None:
        """Queue chunks (they fail at once with BrokenPool when no machine is left)."""
        with self._cond:
            if self._terminated:
                failed, err = chunks, MachineStopped(f"the {self.kind} was terminated")
            elif self.broken is not None:
                failed, err = chunks, self.broken
            else:
                self._queue.extend(chunks)
                self._cond.notify(len(chunks))
                return
        for c in failed:
            self._deliver(c, False, err)

    def wait_backlog(self, limit: int) -> bool:
        """Block while more than ``limit`` chunks are queued; False once the engine is over."""
        with self._cond:
            while len(self._queue) > limit and not self._terminated and self.broken is None:
                self._cond.wait(1.0)
            return not self._terminated and self.broken is None

    def closing(self) -> bool:
        """close() or terminate() was called, or no machine is left."""
        return self._closing or self._terminated or self.broken is not None

    def drain(self) -> List[Chunk]:
        """Take every queued (not yet started) chunk off the queue and return them."""
        with self._cond:
            out = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return out

    def close(self) -> None:
        """No more chunks will come: slots finish the queue, then their machines stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for every slot to end (close or terminate first), then stop the machines."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:     # terminate() from a result callback runs in a slot
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._release_machines()

    def terminate(self) -> None:
        """Stop now: fail what is queued, stop the machines (failing what runs on them)."""
        with self._cond:
            already = self._terminated
            self._terminated = True
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if not already:
            err = MachineStopped(f"the {self.kind} was terminated before this task finished")
            for c in dropped:
                self._deliver(c, False, err)
        self._release_machines()
        self.join(timeout=30.0)

    def _release_machines(self) -> None:
        with self._renew_lock:          # no replacement machine is being started now
            with self._cond:
                if self._released:
                    return
                self._released = True
                machines = list(self._current.values())
                retiring, self._retiring = self._retiring, []
        # Let retirements under way finish, and machines still starting come up, so that
        # shutting them down is not mistaken for a loss and nothing is left half-started.
        for t in retiring:
            t.join(15.0)
        for m in machines:
            if m.state == State.STARTING:
                try:
                    m.wait(State.RUNNING, timeout=self.b.options.get("start_timeout", 60.0))
                except TimeoutError:
                    pass
        if self.owns_session:
            self.b.shutdown()
            return
        threads = [threading.Thread(target=retire, args=(m,), daemon=True) for m in machines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15.0)

    # -- delivery ---------------------------------------------------------------------------

    def _deliver(self, chunk: Chunk, ok: bool, value: Any) -> None:
        # A chunk that never started (broken or terminated) is delivered without start():
        # a PENDING future may take an exception directly.
        with self._deliver_lock:
            try:
                chunk.deliver(ok, value)
            except Exception:
                log.exception("a %s result callback raised", self.kind)

    # -- slots ------------------------------------------------------------------------------

    def _take(self) -> Optional[Chunk]:
        with self._cond:
            while True:
                if self._terminated:
                    return None
                if self._queue:
                    self._in_flight += 1
                    c = self._queue.popleft()
                    self._cond.notify_all()      # room for wait_backlog
                    return c
                if self._closing and self._in_flight == 0 and self._feeders == 0:
                    self._cond.notify_all()
                    return None
                self._cond.wait()

    def _finished(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._cond.notify_all()

    def begin_feed(self) -> None:
        """A feeder (imap) will submit more chunks: closing slots wait for it."""
        with self._cond:
            self._feeders += 1

    def end_feed(self) -> None:
        with self._cond:
            self._feeders -= 1
            self._cond.notify_all()

    def _slot(self, i: int, m: Machine) -> None:
        done = 0                 # chunks finished on this machine (maxtasksperchild)
        losses = 0               # machines this slot lost in a row, none finishing a chunk
        chunk: Optional[Chunk] = None
        while True:
            try:
                while True:
                    chunk = self._take()
                    if chunk is None:
                        break
                    if not chunk.started:
                        chunk.started = True
                        if chunk.start is not None and not chunk.start():
                            self._finished()
                            chunk = None
                            continue
                    try:
                        ok, value = self._run(m, chunk)
                    except _Retry as r:
                        c, chunk = chunk, None
                        self._resubmit(c, r.err)
                        continue
                    self._finished()
                    c, chunk = chunk, None
                    self._deliver(c, ok, value)
                    done += 1
                    losses = 0
                    if self.maxtasks is not None and done >= self.maxtasks and \
                            not self._terminated:
                        m = self._renew(i, m)
                        done = 0
                break
            except _Lost as lost:
                if not self._may_replace(lost.err, losses):
                    self._slot_lost(i, m, chunk, lost.err, lost.ran)
                    return
                # Its chunk goes back first (another slot may take it at once), then a
                # new machine takes this slot, as multiprocessing.Pool replaces workers.
                log.info("%s: machine %s lost; resubmitting its unfinished tasks and "
                         "starting a machine in its place", self.kind, m.name)
                if chunk is not None:
                    c, chunk = chunk, None
                    self._resubmit(c, lost.err, lost.ran)
                try:
                    m = self._replace(i)
                except _Lost as failed:
                    self._slot_lost(i, m, None, failed.err)
                    return
                losses += 1
                done = 0
            except Exception as exc:   # a bug here must not strand the chunk
                log.exception("%s slot %d failed", self.kind, i)
                self._slot_lost(i, m, chunk, exc)
                return
        # The queue is done (closed) or the engine terminated: the last slot out stops
        # the machines, so close() alone frees them once the work is done.
        with self._cond:
            self._live -= 1
            last = self._live == 0
        if last:
            self._release_machines()

    def _may_replace(self, err: BaseException, losses: int) -> bool:
        """Replace a lost machine unless the engine is stopping, the machine never started
        (the next would fail alike), or this slot lost more machines in a row, none
        finishing a chunk, than one chunk may cost (``max_resubmits`` + 1 runs) plus one:
        a task that kills its machine gives up on its own limit without costing a slot."""
        return not (self._terminated or self._released or isinstance(err, StartError)
                    or losses + 1 > self.max_resubmits + 2)

    def _replace(self, i: int, retiring: Optional[Machine] = None) -> Machine:
        """A new machine in slot ``i`` (``retiring``, if given, is shut down in the
        background); raises _Lost when it cannot be started."""
        with self._renew_lock:          # _release_machines waits for this
            if self._released:
                raise _Lost(MachineStopped(f"the {self.kind} was terminated"))
            try:
                new = self.b.start(1, services=self.services)[0]
            except Exception as exc:
                raise _Lost(exc) from None
            with self._cond:
                self._current[i] = new
            if retiring is not None:
                t = threading.Thread(target=retire, args=(retiring,), daemon=True,
                                     name=f"bigmp-retire-{retiring.name}")
                with self._cond:
                    self._retiring = [r for r in self._retiring if r.is_alive()] + [t]
                t.start()
        return new

    def _renew(self, i: int, old: Machine) -> Machine:
        """maxtasksperchild: a fresh machine replaces ``old``, which is retired."""
        return self._replace(i, retiring=old)

    def _run(self, m: Machine, chunk: Chunk):
        """Run ``chunk`` on ``m``: ``(ok, value)``; raises _Lost or _Retry for the machine."""
        if chunk.job.error is not None:
            return False, chunk.job.error
        if chunk.blob is None:
            try:
                chunk.blob = bytes(dumps(chunk.items))
            except Exception as exc:
                return False, exc
            chunk.items = None
        if m.state == State.STOPPED:     # died while idle: the chunk never ran there
            raise _Lost(m.err or MachineStopped(f"{m.name} is stopped"), ran=False)
        try:
            ok, payload = m.call(f"{SERVICE}.run", chunk.job.blob, chunk.mode, chunk.blob)
        except MachineStopped as exc:
            raise _Lost(exc) from None
        except Exception as exc:
            if getattr(exc, "remote_origin", None) is not None:
                return False, exc        # raised on the machine, outside the tasks
            if isinstance(exc, (ConnectionError, EOFError, OSError)):
                if m.state == State.STOPPED or m.probe() is False:
                    raise _Lost(m.err or exc) from None
                raise _Retry(exc) from None
            return False, exc
        if not ok:
            return False, payload
        try:
            return True, pickle.loads(payload)
        except Exception as exc:
            return False, exc

    def _resubmit(self, chunk: Chunk, err: BaseException, ran: bool = True) -> None:
        """Put a chunk whose machine failed back in front of the queue (or fail it)."""
        if ran:
            chunk.attempts += 1
        give_up = chunk.attempts > self.max_resubmits
        with self._cond:
            self._in_flight -= 1
            if not give_up and not self._terminated and self.broken is None:
                self._queue.appendleft(chunk)
                self._cond.notify_all()
                return
            self._cond.notify_all()
        if self._terminated:
            fail: BaseException = MachineStopped(
                f"the {self.kind} was terminated before this task finished")
        elif self.broken is not None:
            fail = self.broken
        else:
            fail = MachineLost(f"a chunk of {chunk.size} task(s) was run {chunk.attempts} "
                               f"time(s) and its machine failed every time; giving up "
                               f"(last: {err})")
            fail.__cause__ = err
        self._deliver(chunk, False, fail)

    def _slot_lost(self, i: int, m: Machine, chunk: Optional[Chunk], err: BaseException,
                   ran: bool = True) -> None:
        if not self._terminated and not isinstance(err, StartError):
            log.info("%s: machine %s lost; resubmitting its unfinished tasks", self.kind, m.name)
        if chunk is not None:
            self._resubmit(chunk, err, ran)
        with self._cond:
            self._live -= 1
            self._last_loss = err
            stranded: List[Chunk] = []
            if self._live == 0 and not self._terminated and self.broken is None:
                n = len(self._threads)
                self.broken = BrokenPool(
                    f"no machines left to run the {self.kind}'s tasks: all {n} were lost or "
                    f"failed to start (last: {type(err).__name__}: {err})")
                self.broken.__cause__ = err
                stranded = list(self._queue)
                self._queue.clear()
            self._cond.notify_all()
        for c in stranded:
            self._deliver(c, False, self.broken)
