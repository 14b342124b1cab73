"""Module-level task functions for the Pool and Executor compatibility suites.

They live in an importable module so that the standard library's pools can pickle them
by reference. Tests synchronise through files in a temporary directory (the workers are
other processes), always polling with a deadline, never sleeping for a fixed time.
"""
from __future__ import annotations

import os
import signal
import threading
import time

DEADLINE = 30.0


class CustomError(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (self.args[0], self.code))


def square(x):
    return x * x


def identity(x):
    return x


def add(a, b):
    return a + b


def kwfunc(a, b=0, *, c=0):
    return (a, b, c)


def fail_on(x, bad=5):
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x * 10


def raise_custom(x):
    raise CustomError(f"custom {x}", code=x)


def getpid(_=None):
    return os.getpid()


def unpicklable_result(_=None):
    return threading.Lock()


_INIT = {"value": None, "calls": 0}


def init_set(value):
    _INIT["value"] = value
    _INIT["calls"] += 1


def get_init(_=None):
    return (_INIT["value"], _INIT["calls"])


def init_fail():
    raise RuntimeError("initializer refused to start")


def touch(path):
    with open(path, "a"):
        pass


def wait_for(path, deadline=DEADLINE):
    """Poll for ``path`` to exist; False if it does not within ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def gated(x, gate, started_dir=None):
    """Say we started (a file per task and process), then wait for the gate file."""
    if started_dir is not None:
        touch(os.path.join(started_dir, f"{x}-{os.getpid()}"))
    if not wait_for(gate):
        raise TimeoutError(f"gate {gate} never opened")
    return x * x


def last_one(x, done_dir, n):
    """Task 0 finishes only after tasks 1..n-1 have: imap ordering versus unordered."""
    if x == 0:
        end = time.monotonic() + DEADLINE
        while len(os.listdir(done_dir)) < n - 1:
            if time.monotonic() > end:
                raise TimeoutError("the other tasks did not finish")
            time.sleep(0.005)
    else:
        touch(os.path.join(done_dir, str(x)))
    return x


def die_once(x, marker, victim=3):
    """Task ``victim`` kills its own process the first time it runs (at-least-once)."""
    if x == victim:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def die_always(x):
    os.kill(os.getpid(), signal.SIGKILL)


def count_runs(x, runs_dir):
    touch(os.path.join(runs_dir, f"{x}-{os.getpid()}-{time.monotonic_ns()}"))
    return x


def broken_input(n, bad_at):
    for i in range(n):
        if i == bad_at:
            raise KeyError(f"input broke at {i}")
        yield i
