"""Case 8 of bench.py: Pool.map of 2,000 one-millisecond tasks, bigmp.Pool against
multiprocessing.Pool with the same number of processes, measured in the same run."""
from __future__ import annotations

import multiprocessing
import os
import time

import bigmp

now = time.perf_counter


def one_ms(x):
    end = time.perf_counter() + 0.001   # busy, not sleeping: a millisecond of CPU work
    while time.perf_counter() < end:
        pass
    return x


def case_pool(cfg, row):
    n = cfg["pool_tasks"]
    procs = len(os.sched_getaffinity(0))
    big, base = [], []
    with bigmp.Pool(procs) as pool, multiprocessing.get_context("fork").Pool(procs) as std:
        pool.map(one_ms, range(procs * 4))
        std.map(one_ms, range(procs * 4))
        for _ in range(cfg["repeat"]):
            t0 = now()
            assert pool.map(one_ms, range(n)) == list(range(n))
            big.append(now() - t0)
            t0 = now()
            assert std.map(one_ms, range(n)) == list(range(n))
            base.append(now() - t0)
    row("8", f"Pool.map of {n} 1-ms tasks, {procs} processes", "s", big, base,
        "multiprocessing.Pool", ("ratio<=", 1.2))
