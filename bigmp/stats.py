"""Per-method call statistics (bigmachine's RPC stats): count, errors, total and max time,
request and reply bytes.

Two kinds of table use the same :class:`Stats` class:

* on a machine, ``BigServer.stats`` counts the calls it *served*
  (:meth:`Stats.begin_served` / :meth:`Stats.served`, hooked into ``BigServer.serve_client``);
* on the driver (and on a machine that dials another), ``B.stats`` counts the calls it
  *made*, per machine and method (:meth:`Stats.begin_call` / :meth:`Stats.called`, hooked
  into ``Machine._invoke``).

Both hooks sit on the hot path of every call, so they do as little as possible there: one
``perf_counter`` and two attribute reads to begin, then a dict lookup and six list updates
under an uncontended lock to record. Byte counts come from the connection's running
totals (``BigConnection.nsent``/``nrecv``: pickled payload bytes, frame headers excluded),
so nothing is pickled twice. A request's bytes include its streamed arguments, and a
streamed reply's bytes include all its items; on the driver, a streamed reply is recorded
when its ``#STREAM`` header arrives (its time is the time to the first reply frame, and its
reply bytes are that header's). Connections without byte counters (the xmlrpclib dialect)
count 0 bytes.

Times are seconds. The table holds at most ``limit`` distinct keys; further keys are
counted under ``(other)`` so a stream of distinct unknown names cannot grow it forever.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["Stats", "aggregate", "machine_stats", "collect"]

_now = time.perf_counter
_OK = frozenset(("#RETURN", "#STREAM", "#PROXY"))
_FIELDS = ("count", "errors", "total", "max", "request_bytes", "reply_bytes")
OTHER = "(other)"


class Stats:
    """A thread-safe table of per-method call statistics."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.since = time.time()
        self._lock = threading.Lock()
        # (scope, method) or, for served calls, ("", ident, name)
        #   -> [count, errors, total, max, request_bytes, reply_bytes]
        self._table: Dict[tuple, list] = {}

    # -- recording (hot path) -----------------------------------------------------------

    def record(self, scope: str, method: str, seconds: float, error: bool,
               request_bytes: int = 0, reply_bytes: int = 0) -> None:
        """Count one call of ``method`` (on ``scope``: a machine name, or "" when served)."""
        self.record_sums(scope, {method: [1, int(error), seconds, seconds, request_bytes,
                                          reply_bytes]})

    def record_sums(self, scope: str, sums: Dict[str, list]) -> None:
        """Count many calls at once: ``sums`` maps a method to [count, errors, total
        seconds, max seconds, request bytes, reply bytes] of its calls."""
        table, lock = self._table, self._lock
        for method, s in sums.items():
            key = (scope, method)
            rec = table.get(key)
            if rec is None:
                rec = self._add(key)
            with lock:
                rec[0] += s[0]
                rec[1] += s[1]
                rec[2] += s[2]
                if s[3] > rec[3]:
                    rec[3] = s[3]
                rec[4] += s[4]
                rec[5] += s[5]

    def _add(self, key: tuple) -> list:
        with self._lock:
            rec = self._table.get(key)
            if rec is None:
                if len(self._table) >= self.limit:
                    key = (key[0], OTHER)   # 2-tuple: read as the method "(other)"
                    rec = self._table.get(key)
                if rec is None:
                    rec = self._table[key] = [0, 0, 0.0, 0.0, 0, 0]
            return rec

    # The four hooks below repeat record() inline: a Python call per call costs more than
    # the bookkeeping itself. Direct attribute reads; AttributeError only for connections
    # without byte counters (xmlrpclib). try/finally around the lock is free in 3.11+.

    @staticmethod
    def begin_call(conn: Any) -> tuple:
        """Driver side, before the request is sent."""
        try:
            return _now(), conn.nsent, conn.nrecv
        except AttributeError:
            return _now(), 0, 0

    def called(self, machine: str, method: str, conn: Any, token: tuple,
               kind: Optional[str]) -> None:
        """Driver side, once the reply (or the failure) is in. ``kind`` None: it raised."""
        t0, sent, recv = token
        dt = _now() - t0
        try:
            req, rep = conn.nsent - sent, conn.nrecv - recv
        except AttributeError:
            req = rep = 0
        key = (machine, method)
        rec = self._table.get(key)
        if rec is None:
            rec = self._add(key)
        lock = self._lock
        lock.acquire()
        try:
            rec[0] += 1
            if kind not in _OK:
                rec[1] += 1
            rec[2] += dt
            if dt > rec[3]:
                rec[3] = dt
            rec[4] += req
            rec[5] += rep
        finally:
            lock.release()

    @staticmethod
    def begin_served(conn: Any) -> tuple:
        """Machine side, right after the request frame was received."""
        try:
            return _now(), conn.nsent, conn.nrecv - conn.last_recv
        except AttributeError:
            return _now(), 0, 0

    def served(self, server: Any, conn: Any, request: Any, msg: Any, token: tuple) -> None:
        """Machine side, once the reply (and any stream) has been sent."""
        t0, sent, recv = token
        dt = _now() - t0
        try:
            req, rep = conn.nrecv - recv, conn.nsent - sent
        except AttributeError:
            req = rep = 0
        try:
            ident, name = request[0], request[1]
        except Exception:
            ident, name = "?", "?"
        if ident not in server.services:
            # A shared object of a manager: count it by type, not by its (unique) ident.
            entry = server.id_to_obj.get(ident)
            if entry is not None:
                ident = type(entry[0]).__name__
        key = ("", ident, name)          # formatted as "ident.name" only when read
        rec = self._table.get(key)
        if rec is None:
            rec = self._add(key)
        lock = self._lock
        lock.acquire()
        try:
            rec[0] += 1
            if msg[0] not in _OK:
                rec[1] += 1
            rec[2] += dt
            if dt > rec[3]:
                rec[3] = dt
            rec[4] += req
            rec[5] += rep
        finally:
            lock.release()

    # -- reading --------------------------------------------------------------------------

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per (scope, method): the counters plus ``mean`` (seconds)."""
        with self._lock:
            items = [(k, list(v)) for k, v in self._table.items()]
        out = []
        for key, rec in sorted(items, key=lambda kv: tuple(map(str, kv[0]))):
            scope, method = key if len(key) == 2 else (key[0], f"{key[1]}.{key[2]}")
            row = {"machine": scope, "method": method}
            row.update(zip(_FIELDS, rec))
            row["mean"] = rec[2] / rec[0] if rec[0] else 0.0
            out.append(row)
        return out

    def snapshot(self) -> Dict[str, Any]:
        """JSON-ready: ``{"since", "methods": {method: counters}, "rows": [...]}``."""
        rows = self.rows()
        return {"since": self.since, "methods": aggregate(rows), "rows": rows}

    def reset(self) -> None:
        with self._lock:
            self._table.clear()
            self.since = time.time()


def aggregate(rows: Iterable[Dict[str, Any]], by: str = "method",
              where=None) -> Dict[str, Dict[str, Any]]:
    """Sum rows per ``by`` ("method" or "machine"); ``where(row)`` filters rows."""
    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if where is not None and not where(row):
            continue
        acc = out.get(row[by])
        if acc is None:
            acc = out[row[by]] = {f: 0 for f in _FIELDS}
            acc["total"] = acc["max"] = 0.0
        for f in _FIELDS:
            if f == "max":
                acc[f] = max(acc[f], row[f])
            else:
                acc[f] += row[f]
    for acc in out.values():
        acc["mean"] = acc["total"] / acc["count"] if acc["count"] else 0.0
    return out


def user_calls(rows: Iterable[Dict[str, Any]]) -> Tuple[int, int]:
    """(calls, errors) over methods that are not bigmp's own ``Supervisor.*`` traffic."""
    calls = errors = 0
    for row in rows:
        if not row["method"].startswith("Supervisor."):
            calls += row["count"]
            errors += row["errors"]
    return calls, errors


def machine_stats(server: Any, session: Any = None, reset: bool = False) -> Dict[str, Any]:
    """What ``Supervisor.stats`` returns: calls this machine served, and calls it made."""
    out: Dict[str, Any] = {"served": None, "called": None}
    for key, stats in (("served", getattr(server, "stats", None)),
                       ("called", getattr(session, "stats", None))):
        if stats is not None:
            out[key] = stats.snapshot()
            if reset:
                stats.reset()
    return out


def collect(b: Any, timeout: float = 5.0) -> Dict[str, Any]:
    """Driver and machine statistics of session ``b`` (machines asked in parallel).

    ``{"driver": snapshot, "machines": {name: Supervisor.stats() or {"error": ...}}}``;
    only RUNNING machines are asked.
    """
    from concurrent.futures import ThreadPoolExecutor
    from .machine import State

    machines = [m for m in b.machines() if m.state == State.RUNNING]
    out: Dict[str, Any] = {"driver": b.stats.snapshot() if b.stats is not None else None,
                           "machines": {}}
    if not machines:
        return out
    with ThreadPoolExecutor(max_workers=min(32, len(machines)),
                            thread_name_prefix="bigmp-stats") as pool:
        futures = {m.name: pool.submit(m.call, "Supervisor.stats", timeout=timeout)
                   for m in machines}
        for name, fut in futures.items():
            try:
                out["machines"][name] = fut.result()
            except Exception as exc:
                out["machines"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
