#!/usr/bin/env python3
"""What per-method statistics cost on the hot path of a small call.

    taskset -c 0 python3 benchmarks/stats_overhead.py [--calls 2000] [--rounds 15]

1. Round trip of ``m.call("Supervisor.ping")``, ``--calls`` per round, with statistics on
   (driver and machine) and off, the two interleaved round by round; medians per call.
   With ``--plain`` it only measures the round trip as it is (for a checkout without
   bigmp.stats: ``PYTHONPATH=/path/to/old/checkout python3 ... --plain``).
2. The hooks alone, driver side (``begin_call`` + ``called``) and machine side
   (``begin_served`` + ``served``), on a stand-in connection: their pure CPU cost.
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import cloudpickle

import bigmp


def _set_server_stats(on: bool) -> None:
    import multiprocessing
    from bigmp.stats import Stats
    server = multiprocessing.current_process()._manager_server
    server.stats = Stats() if on else None


def set_stats(b, m, on: bool) -> None:
    from bigmp.stats import Stats
    b.stats = Stats() if on else None
    m.call("Supervisor.run", cloudpickle.dumps((_set_server_stats, (on,))))


def round_trip(m, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        m.call("Supervisor.ping")
    return (time.perf_counter() - t0) / calls * 1e6


def hooks(n: int = 200_000) -> dict:
    from bigmp.stats import Stats
    s = Stats()
    conn = types.SimpleNamespace(nsent=0, nrecv=0, last_recv=0)
    server = types.SimpleNamespace(services={"Supervisor": object()}, id_to_obj={})
    request = ("Supervisor", "ping", (), {})
    msg = ("#RETURN", True)
    out = {}
    t0 = time.perf_counter()
    for _ in range(n):
        tok = s.begin_call(conn)
        s.called("m-0", "Supervisor.ping", conn, tok, "#RETURN")
    out["driver hooks"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        tok = s.begin_served(conn)
        s.served(server, conn, request, msg, tok)
    out["machine hooks"] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--plain", action="store_true", help="no toggling: just the round trip")
    args = ap.parse_args()
    with bigmp.start(system="local") as b:
        m = b.start(1)[0]
        m.wait()
        round_trip(m, args.calls)   # warm up: connections, caches
        if args.plain:
            xs = [round_trip(m, args.calls) for _ in range(args.rounds)]
            print(f"round trip: median {statistics.median(xs):.2f} us/call "
                  f"(min {min(xs):.2f}, max {max(xs):.2f}; {args.rounds} x {args.calls} calls)")
            return
        on, off = [], []
        for _ in range(args.rounds):
            for flag, acc in ((True, on), (False, off)):
                set_stats(b, m, flag)
                acc.append(round_trip(m, args.calls))
        mon, moff = statistics.median(on), statistics.median(off)
        paired = statistics.median(a - b for a, b in zip(on, off))
        print(f"round trip, stats on : median {mon:.2f} us/call (min {min(on):.2f})")
        print(f"round trip, stats off: median {moff:.2f} us/call (min {min(off):.2f})")
        print(f"overhead             : {paired:+.2f} us/call (median of paired rounds), "
              f"{min(on) - min(off):+.2f} (minima)")
    for k, v in hooks().items():
        print(f"{k:<21}: {v:.2f} us/call (CPU cost of the hook alone)")


if __name__ == "__main__":
    main()
