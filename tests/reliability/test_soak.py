"""A bounded soak: many threads x many calls of mixed sizes, zero errors, flat RSS and fds."""
from __future__ import annotations

import os
import random
import threading
import time

import psutil
import pytest

import bigmp.testing as bt
from bigmp import State
from tests.reliability._services import Payloads
from tests.reliability.conftest import rss, usage
from tests.services import Barrier

THREADS = 16
CALLS = 500             # per thread and phase
WARMUP_PHASES = 3       # connection pools, caches and the allocator settle
PHASES = 6              # measured
# Mixed sizes: small control calls, medium pickles, buffers sent out of band (>= 64 KiB).
SIZES = [0] * 40 + [100] * 30 + [10_000] * 15 + [100_000] * 10 + [256_000] * 5
TOLERANCE = 0.05


def _work(machines, calls, seed, errors, done):
    rng = random.Random(seed)
    n = 0
    try:
        for _ in range(calls):
            m = machines[rng.randrange(len(machines))]
            size = rng.choice(SIZES)
            if rng.random() < 0.5:
                payload = os.urandom(8) * (size // 8) if size else rng.randrange(1 << 30)
                assert m.call("P.echo", payload, timeout=60) == payload
            else:
                got = m.call("P.sized", size, timeout=60)
                assert len(got) == size
            n += 1
    except Exception as exc:   # counted: the soak requires zero
        errors.append(repr(exc))
    done.append(n)


def _phase(machines, calls, seed):
    errors, done = [], []
    threads = [threading.Thread(target=_work, args=(machines, calls, seed + i, errors, done))
               for i in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sum(done), errors, time.monotonic() - t0


def _snapshot(machines):
    pids = [m.pid for m in machines]
    return {"rss": [rss(p) for p in pids], "fds": [usage(p)[0] for p in pids],
            "driver_fds": psutil.Process().num_fds()}


def _flat(before, after):
    return abs(after - before) <= TOLERANCE * before


@pytest.fixture(params=["testing"])
def b(request):
    with bt.start() as session:
        yield session


def test_soak_zero_errors_flat_memory_and_fds(b, figures):
    machines = b.start(2, services={"P": Payloads(), "B": Barrier(THREADS)})
    for m in machines:
        assert m.wait(State.RUNNING, timeout=30) == State.RUNNING
        # THREADS calls in the method at once: the connection pool reaches the size the
        # soak can need (one per thread), so it cannot grow later and pass for a leak.
        waits = [m.call_async("B.wait", 30) for _ in range(THREADS)]
        assert sorted(f.result(timeout=60) for f in waits) == list(range(THREADS))
    for phase in range(WARMUP_PHASES):
        n, errors, _ = _phase(machines, CALLS, seed=100 * phase)
        assert errors == [] and n == THREADS * CALLS
    before = _snapshot(machines)
    samples = [before]
    total, took = 0, 0.0
    for phase in range(PHASES):
        n, errors, t = _phase(machines, CALLS, seed=10_000 + 100 * phase)
        assert errors == [], errors[:5]
        assert n == THREADS * CALLS
        total += n
        took += t
        samples.append(_snapshot(machines))
    after = samples[-1]
    assert all(m.state == State.RUNNING for m in machines)
    peak = [max(s["rss"][i] for s in samples) for i in range(len(machines))]
    change = [(a - b_) / b_ for b_, a in zip(before["rss"], after["rss"])]
    figures.add("soak",
                f"{THREADS} threads x {PHASES * CALLS} calls ({total} calls, sizes 0 B-250 kB, "
                f"2 machines, after {WARMUP_PHASES * THREADS * CALLS} warm-up calls) in "
                f"{took:.1f} s, 0 errors; machine RSS "
                + ", ".join(f"{x / 2**20:.1f} -> {y / 2**20:.1f} MiB ({c:+.1%}, peak "
                            f"{p / 2**20:.1f})" for x, y, c, p in
                            zip(before["rss"], after["rss"], change, peak))
                + f"; machine fds {before['fds']} -> {after['fds']}; driver fds "
                  f"{before['driver_fds']} -> {after['driver_fds']} (tolerance 5%)")
    for x, y in zip(before["rss"], after["rss"]):
        assert _flat(x, y), f"machine RSS {x} -> {y}"
    for x, y in zip(before["fds"], after["fds"]):
        assert _flat(x, y), f"machine fds {x} -> {y}"
    assert _flat(before["driver_fds"], after["driver_fds"])
