"""Cluster-wide profiles: a sampler on each machine, merged on the driver.

``b.profile(seconds=10)`` asks every RUNNING machine (or ``machine=``) to run
:func:`sample` through ``Supervisor.profile``, all at the same time, and merges the
results into one :class:`Profile`. A profile can be written as

* collapsed stacks (``Profile.collapsed``), one ``frame;frame;frame count`` line per stack,
  as read by flamegraph.pl, speedscope and inferno;
* a pstats file (``Profile.dump_stats``), read by :mod:`pstats`, snakeviz and others;
* JSON (``Profile.to_json``), which keeps everything: machines, threads, frames.

Why a ``sys._current_frames`` sampler, and not a packaged profiler:

* **py-spy** samples from outside the process with ``ptrace``/``process_vm_readv``. That
  needs ``CAP_SYS_PTRACE`` or a permissive ``ptrace_scope``, which containers and many
  hosts refuse, and a native binary on every machine. Where it works it sees native
  frames too, but bigmp cannot rely on it.
* **yappi** is a tracing profiler: it hooks every function call of every thread while it
  runs. That slows the program it measures, often by several times for call-heavy code,
  and it reports per-function totals rather than stacks, so it gives no flame graph.
* A sampler thread that calls :func:`sys._current_frames` every ``interval`` sees every
  Python thread of the process (the threads of the services, the connection threads, the
  watchdogs), costs about 50 us per tick with 20 threads (0.5 % of a core at 100 Hz) and
  nothing between ticks, needs no privileges and no dependency, and works the same on
  every backend.

Its limits: it sees Python frames only (time in C code is charged to the Python frame that
called it); a thread that holds the GIL in C code for a long time delays the ticks; and
samples are taken when the sampler gets the GIL, so they lean toward GIL release points.

Modes and units. Every value in a profile is microseconds. In ``"cpu"`` mode (the
default) a thread's sample weighs the CPU time that thread used since the previous tick,
read from the Linux per-thread CPU clock by native thread id; a thread that did not run
weighs nothing, so the threads waiting on sockets and locks do not bury the busy ones, and
a watchdog that wakes for 20 us weighs 20 us. In ``"wall"`` mode every thread weighs the
time since the previous tick, which shows where threads wait. Threads that Python's
:mod:`threading` does not know (no native id) appear in ``"wall"`` mode only; where
per-thread clocks are missing (not Linux), ``"cpu"`` falls back to ``"wall"`` and says so.
"""
from __future__ import annotations

import io
import json
import marshal
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["sample", "Profile", "profile"]

MAX_DEPTH = 256
MAX_SECONDS = 3600.0
Frame = Tuple[str, int, str]          # (short file name, first line, qualified name)


# -- machine side ------------------------------------------------------------------------

def _thread_cpu_clock(native_id: int) -> Optional[float]:
    """CPU seconds used by the thread with this native id (Linux), or None."""
    # The kernel's per-thread CPU clock id: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED).
    # A thread id that has exited gives EINVAL, never another process's clock.
    try:
        return time.clock_gettime(((~native_id) << 3) | 6)
    except (OSError, OverflowError, AttributeError):
        return None


def _cpu_clocks_work() -> bool:
    nid = getattr(threading, "get_native_id", lambda: None)()
    return sys.platform.startswith("linux") and nid is not None \
        and _thread_cpu_clock(nid) is not None


class _Shortener:
    """File names relative to the longest ``sys.path`` entry that holds them."""

    def __init__(self):
        self.roots = sorted({os.path.abspath(p) for p in sys.path if p}, key=len, reverse=True)
        self.cache: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        short = self.cache.get(path)
        if short is None:
            short = path
            for root in self.roots:
                if path.startswith(root + os.sep):
                    short = path[len(root) + 1:]
                    break
            self.cache[path] = short
        return short


def sample(seconds: float = 10.0, interval: float = 0.01, mode: str = "cpu",
           skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Sample every thread of this process (but the caller's, and threads whose name starts
    with one of ``skip``) for ``seconds``.

    Each sample of a thread weighs what it stands for, in microseconds: in ``"cpu"`` mode
    the CPU time the thread used since the previous tick (so a watchdog that wakes for
    20 us weighs 20, not a whole tick), in ``"wall"`` mode the time since the previous tick.
    Returns a JSON-ready dict: ``frames`` (a table of ``[file, line, name]``), ``stacks``
    (``[thread name, [frame index, root first...], microseconds, samples]``), and totals.
    """
    if mode not in ("cpu", "wall"):
        raise ValueError(f"mode must be 'cpu' or 'wall', not {mode!r}")
    seconds = float(seconds)
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], not {seconds!r}")
    interval = max(0.001, float(interval))
    use_cpu = mode == "cpu" and _cpu_clocks_work()
    me = threading.get_ident()
    counts: Dict[Tuple[str, tuple], list] = {}     # (thread, codes leaf first) -> [us, n]
    last_cpu: Dict[int, float] = {}
    seen = set()
    ticks = 0
    start = time.perf_counter()
    end = start + seconds
    next_tick = last_tick = start
    while True:
        now = time.perf_counter()
        wall_us = int((now - last_tick) * 1e6) if ticks else int(interval * 1e6)
        last_tick = now
        threads = {t.ident: t for t in threading.enumerate()}
        frames = sys._current_frames()
        for ident, frame in frames.items():
            if ident == me:
                continue
            t = threads.get(ident)
            if skip and t is not None and t.name.startswith(skip):
                continue
            weight = wall_us
            if use_cpu:
                nid = getattr(t, "native_id", None)
                cpu = _thread_cpu_clock(nid) if nid is not None else None
                if cpu is None:
                    continue
                prev = last_cpu.get(ident)
                last_cpu[ident] = cpu
                if prev is None:
                    continue
                weight = int((cpu - prev) * 1e6)
                if weight <= 0:
                    continue
            codes = []
            f = frame
            while f is not None and len(codes) < MAX_DEPTH:
                codes.append(f.f_code)
                f = f.f_back
            key = (t.name if t is not None else f"thread-{ident}", tuple(codes))
            rec = counts.get(key)
            if rec is None:
                counts[key] = [weight, 1]
            else:
                rec[0] += weight
                rec[1] += 1
            seen.add(ident)
        frames = frame = f = None   # do not keep other threads' frames alive while asleep
        ticks += 1
        now = time.perf_counter()
        if now >= end:
            break
        next_tick = max(next_tick + interval, now)
        time.sleep(min(next_tick, end) - now)
    duration = time.perf_counter() - start
    short = _Shortener()
    index: Dict[Any, int] = {}
    table: List[list] = []
    stacks = []
    for (thread, codes), (us, n) in counts.items():
        ids = []
        for code in reversed(codes):            # root first
            i = index.get(code)
            if i is None:
                i = index[code] = len(table)
                table.append([short(code.co_filename), code.co_firstlineno,
                              getattr(code, "co_qualname", code.co_name)])
            ids.append(i)
        stacks.append([thread, ids, us, n])
    return {"version": 1, "mode": "cpu" if use_cpu else "wall", "requested_mode": mode,
            "interval": interval, "duration": duration, "ticks": ticks, "pid": os.getpid(),
            "hostname": socket.gethostname(), "threads": len(seen),
            "samples": sum(n for _, n in counts.values()),
            "us": sum(us for us, _ in counts.values()), "frames": table, "stacks": stacks}


# -- driver side -------------------------------------------------------------------------

def label(frame: Frame) -> str:
    """``name (file:line)``, the way py-spy names frames; no ';' (the stack separator)."""
    file, line, name = frame
    return f"{name} ({file}:{line})".replace(";", ":").replace("\n", " ")


class Profile:
    """Samples of one or more machines, merged.

    ``values`` maps ``(machine, thread, stack)`` (a stack is a tuple of frames, root
    first) to microseconds: CPU time in ``"cpu"`` mode, elapsed time in ``"wall"`` mode.
    ``machines`` holds each machine's sampling totals, ``errors`` the machines that failed.
    """

    def __init__(self, mode: str = "cpu", interval: float = 0.01):
        self.mode = mode
        self.interval = interval
        self.values: Dict[Tuple[str, str, Tuple[Frame, ...]], int] = {}
        self.machines: Dict[str, Dict[str, Any]] = {}
        self.errors: Dict[str, str] = {}

    def add(self, machine: str, result: Dict[str, Any]) -> None:
        """Merge one machine's :func:`sample` result."""
        frames = [tuple(f) for f in result["frames"]]
        for thread, ids, us, _n in result["stacks"]:
            key = (machine, thread, tuple(frames[i] for i in ids))
            self.values[key] = self.values.get(key, 0) + us
        self.machines[machine] = {k: result.get(k) for k in (
            "mode", "duration", "ticks", "pid", "hostname", "threads", "samples", "us")}
        if result.get("mode") != self.mode:
            self.mode = "mixed"

    @property
    def total(self) -> int:
        """All the time in the profile, in microseconds."""
        return sum(self.values.values())

    def by_machine(self) -> Dict[str, int]:
        """Microseconds per machine."""
        out: Dict[str, int] = {}
        for (machine, _t, _s), us in self.values.items():
            out[machine] = out.get(machine, 0) + us
        return out

    # -- formats ----------------------------------------------------------------------

    def stacks(self, by_machine: bool = False, by_thread: bool = False) -> Dict[Tuple[str, ...], int]:
        """Stacks as tuples of labels (root first), optionally under machine/thread frames."""
        out: Dict[Tuple[str, ...], int] = {}
        for (machine, thread, stack), us in self.values.items():
            prefix = (((DRIVER if machine == DRIVER else f"machine {machine}"),)
                      if by_machine else ()) + \
                     ((f"thread {thread}",) if by_thread else ())
            key = prefix + tuple(label(f) for f in stack)
            out[key] = out.get(key, 0) + us
        return out

    def collapsed(self, by_machine: bool = False, by_thread: bool = False) -> str:
        """Collapsed stacks (flamegraph.pl, speedscope, inferno); counts are microseconds."""
        lines = [f"{';'.join(k)} {us}" for k, us in
                 sorted(self.stacks(by_machine, by_thread).items()) if us > 0]
        return "\n".join(lines) + ("\n" if lines else "")

    def functions(self) -> Dict[str, Dict[str, Any]]:
        """Per function (label): ``self`` and ``total`` microseconds, ``total`` per machine."""
        out: Dict[str, Dict[str, Any]] = {}
        for (machine, _thread, stack), us in self.values.items():
            for lab in dict.fromkeys(label(f) for f in stack):   # once per stack
                rec = out.setdefault(lab, {"self": 0, "total": 0, "machines": {}})
                rec["total"] += us
                rec["machines"][machine] = rec["machines"].get(machine, 0) + us
            if stack:
                out[label(stack[-1])]["self"] += us
        return out

    def top(self, n: int = 10, by: str = "self") -> List[Tuple[str, int, int]]:
        """The ``n`` functions with the most ``by`` ("self" or "total") time:
        ``[(label, self us, total us), ...]``."""
        rows = sorted(self.functions().items(), key=lambda kv: (-kv[1][by], kv[0]))[:n]
        return [(lab, rec["self"], rec["total"]) for lab, rec in rows]

    def to_pstats(self) -> Dict[Frame, tuple]:
        """The profile as a :mod:`pstats` table (seconds).

        ``tt`` is the time with the function on top of the stack, ``ct`` the time with it
        anywhere on the stack (counted once per stack). A sampler cannot count calls, so
        both call counts hold the number of ``interval`` ticks the time amounts to (at
        least 1). Each caller edge carries the same numbers for that caller.
        """
        tick = self.interval * 1e6
        acc: Dict[Frame, list] = {}
        edges: Dict[Frame, Dict[Frame, list]] = {}
        for (_machine, _thread, stack), us in self.values.items():
            if not stack or us <= 0:
                continue
            for f in set(stack):
                a = acc.setdefault(f, [0, 0])
                a[1] += us
            acc[stack[-1]][0] += us
            for caller, callee in set(zip(stack, stack[1:])):
                edges.setdefault(callee, {}).setdefault(caller, [0, 0])[1] += us
            if len(stack) > 1:
                edges[stack[-1]][stack[-2]][0] += us

        def entry(tt_us: int, ct_us: int) -> tuple:
            calls = max(1, round(ct_us / tick))
            return calls, calls, tt_us / 1e6, ct_us / 1e6

        return {f: entry(tt, ct) + ({c: entry(*e) for c, e in edges.get(f, {}).items()},)
                for f, (tt, ct) in acc.items()}

    def dump_stats(self, path: str) -> None:
        """Write a file that ``pstats.Stats(path)`` loads."""
        with open(path, "wb") as f:
            marshal.dump(self.to_pstats(), f)

    def pstats_bytes(self) -> bytes:
        return marshal.dumps(self.to_pstats())

    def to_json(self) -> Dict[str, Any]:
        frames: Dict[Frame, int] = {}
        values = []
        for (machine, thread, stack), us in sorted(self.values.items()):
            values.append([machine, thread, [frames.setdefault(f, len(frames)) for f in stack], us])
        return {"version": 1, "unit": "microseconds", "mode": self.mode,
                "interval": self.interval, "machines": self.machines, "errors": self.errors,
                "frames": [list(f) for f in frames], "values": values}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Profile":
        p = cls(data.get("mode", "cpu"), data.get("interval", 0.01))
        frames = [tuple(f) for f in data["frames"]]
        for machine, thread, ids, us in data["values"]:
            key = (machine, thread, tuple(frames[i] for i in ids))
            p.values[key] = p.values.get(key, 0) + us
        p.machines = dict(data.get("machines") or {})
        p.errors = dict(data.get("errors") or {})
        return p

    def pprof_bytes(self) -> bytes:
        """The profile in pprof's format (gzipped profile.proto; see :mod:`bigmp.pprof`)."""
        from . import pprof
        return pprof.encode(self)

    def write(self, path: str, format: Optional[str] = None) -> str:
        """Write in ``format`` (collapsed, pstats, json, pprof), else as the file suffix
        says: ``.prof``/``.pstats`` pstats, ``.json`` JSON, ``.pb.gz``/``.pprof`` pprof,
        anything else collapsed."""
        format = format or guess_format(path)
        if format == "pstats":
            self.dump_stats(path)
        elif format == "pprof":
            with open(path, "wb") as f:
                f.write(self.pprof_bytes())
        elif format == "json":
            with open(path, "w") as f:
                json.dump(self.to_json(), f)
        elif format == "collapsed":
            with open(path, "w") as f:
                f.write(self.collapsed())
        else:
            raise ValueError(f"unknown profile format {format!r}: collapsed, pstats, json or "
                             "pprof")
        return format

    def summary(self, n: int = 10) -> str:
        """A short text report: machines, then the top functions by self time."""
        out = io.StringIO()
        kind = {"cpu": "CPU time", "wall": "wall time"}.get(self.mode, "time")
        out.write(f"{self.total / 1e6:.2f} s of {kind} from {len(self.machines)} machine(s)\n")
        for name, info in sorted(self.machines.items()):
            out.write(f"  {name}: {(info.get('us') or 0) / 1e6:.2f} s in {info.get('samples')} "
                      f"samples of {info.get('threads')} threads, {info.get('ticks')} ticks in "
                      f"{info.get('duration') or 0:.2f} s\n")
        for name, err in sorted(self.errors.items()):
            out.write(f"  {name}: not profiled: {err}\n")
        total = self.total or 1
        out.write("   self%  total%  function\n")
        for lab, s, t in self.top(n):
            out.write(f"  {100 * s / total:6.1f} {100 * t / total:7.1f}  {lab}\n")
        return out.getvalue()

    def __repr__(self) -> str:
        return f"<Profile {self.mode} {self.total / 1e6:.2f} s machines={sorted(self.machines)}>"


def guess_format(path: str) -> str:
    low = path.lower()
    if low.endswith((".prof", ".pstats")):
        return "pstats"
    if low.endswith(".json"):
        return "json"
    if low.endswith((".pb.gz", ".pprof")):
        return "pprof"
    return "collapsed"


def _targets(b, machine) -> Tuple[list, Dict[str, str]]:
    from .machine import Machine, State
    every = b.machines()
    if machine is None:
        chosen = every
    else:
        wanted = machine if isinstance(machine, (list, tuple, set)) else [machine]
        chosen = []
        for w in wanted:
            if isinstance(w, Machine):
                chosen.append(w)
                continue
            found = [m for m in every if m.name == w]
            if not found:
                raise LookupError(f"no machine named {w!r}; machines: {[m.name for m in every]}")
            chosen.extend(found)
    running = [m for m in chosen if m.state == State.RUNNING]
    skipped = {m.name: f"not RUNNING ({m.state.name})" for m in chosen
               if m.state != State.RUNNING and machine is not None}
    return running, skipped


def profile(b, seconds: float = 10.0, machine: Any = None, interval: float = 0.01,
            mode: str = "cpu", driver: Optional[bool] = None) -> Profile:
    """Profile the RUNNING machines of session ``b`` (or ``machine``: a name, a Machine,
    or a list of them) for ``seconds``, all at once; return the merged :class:`Profile`.

    ``driver``: sample the driver's own threads too, as the entry ``"driver"`` (default:
    when profiling the whole program, i.e. no ``machine`` given). A machine that fails to
    answer is left out and named in ``Profile.errors``; if nothing at all could be
    profiled, RuntimeError is raised.
    """
    if mode not in ("cpu", "wall"):
        raise ValueError(f"mode must be 'cpu' or 'wall', not {mode!r}")
    with_driver = machine is None if driver is None else bool(driver)
    targets, skipped = _targets(b, machine)
    prof = Profile(mode, interval)
    prof.errors.update(skipped)
    if not targets and not with_driver:
        raise RuntimeError("no RUNNING machine to profile" +
                           (f" ({skipped})" if skipped else ""))
    results: Dict[str, Any] = {}

    def run(m) -> None:
        try:
            results[m.name] = m.call("Supervisor.profile", seconds, interval, mode,
                                     timeout=float(seconds) + 30.0)
        except Exception as exc:
            results[m.name] = exc

    threads = [threading.Thread(target=run, args=(m,), daemon=True,
                                name=f"bigmp-profile-{m.name}") for m in targets]
    for t in threads:
        t.start()
    if with_driver:
        # Here, while the machines sample; the threads waiting for them are left out.
        prof.add(DRIVER, sample(seconds, interval, mode, skip=("bigmp-profile-",)))
    for t in threads:
        t.join()
    for m in targets:
        res = results.get(m.name)
        if isinstance(res, dict):
            prof.add(m.name, res)
        else:
            prof.errors[m.name] = f"{type(res).__name__}: {res}"
    if not prof.machines:
        raise RuntimeError(f"no machine could be profiled: {prof.errors}")
    return prof


DRIVER = "driver"       # the driver's entry in a Profile (b.profile(driver=True))


def merge(profiles: Iterable[Profile]) -> Profile:
    """One profile from several (machines with the same name are summed)."""
    out: Optional[Profile] = None
    for p in profiles:
        if out is None:
            out = Profile(p.mode, p.interval)
        for k, us in p.values.items():
            out.values[k] = out.values.get(k, 0) + us
        out.machines.update(p.machines)
        out.errors.update(p.errors)
    return out if out is not None else Profile()
