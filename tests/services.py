"""Services used by the tests (importable, so spawned machines can load them by reference)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


class Echo:
    def echo(self, x):
        return x

    def noop(self):
        return None

    def add(self, a, b=0):
        return a + b

    def pid(self):
        return os.getpid()

    def env(self, name):
        return os.environ.get(name)

    def argv(self):
        return list(sys.argv)

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def fail(self, message):
        raise ValueError(message)

    def say(self, *lines):
        for line in lines:
            print(line)
        return len(lines)

    def say_err(self, text):
        print(text, file=sys.stderr)

    def shell(self, command):
        # A subprocess writes straight to fd 1: captured only if capture is at fd level.
        return subprocess.call(command, shell=True)

    def count(self, n):
        for i in range(n):
            yield i

    def count_then_fail(self, n):
        for i in range(n):
            yield i
        raise KeyError("mid-stream")

    def total(self, items):
        return sum(items)

    def double_each(self, items):
        for x in items:
            yield 2 * x

    def second_first(self, a, b):
        second = list(b)
        return second, list(a)

    def read_all(self, f):
        return f.read()

    def lines(self, f):
        return [line.rstrip(b"\n") for line in f]

    def unpicklable_result(self):
        return threading.Lock()

    def unpicklable_error(self):
        raise UnpicklableError(threading.Lock())

    def bad_unpickle_error(self):
        raise BadUnpickle("a", "b")

    def module_file(self, name):
        import importlib
        return importlib.import_module(name).__file__

    def use(self, proxy, method, *args):
        return getattr(proxy, method)(*args)

    def _private(self):
        return "hidden"


class UnpicklableError(Exception):
    pass


class BadUnpickle(Exception):
    """Pickles fine, but its __init__ needs two arguments and args holds one."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


class Barrier:
    """Proves calls run concurrently: n callers must all be inside wait() at once."""

    def __init__(self, n):
        self.n = n
        self._barrier = None

    def init(self, b):
        self._barrier = threading.Barrier(self.n)

    def wait(self, timeout):
        return self._barrier.wait(timeout)


class WithInit:
    def __init__(self):
        self.ready = False

    def init(self, b):
        self.ready = True
        self.session = b

    def is_ready(self):
        return self.ready

    def forward(self, addr, method, *args):
        """Call another machine of the session from this one."""
        return self.session.dial(addr).call(method, *args)

    def forward_async(self, addr, method, n, timeout=30.0):
        """``n`` async calls ``method(i)`` on another machine, in rounds until one ran on
        the multiplexed channel (earlier rounds go by threads while it is dialed)."""
        import concurrent.futures
        d = self.session.dial(addr)
        deadline = time.monotonic() + timeout
        while True:
            muxed = d._mux is not None
            futs = [d.call_async(method, i) for i in range(n)]
            concurrent.futures.wait(futs, timeout=60)
            out = [f.result() for f in futs]
            if muxed or time.monotonic() > deadline:
                return out, muxed


class FailingInit:
    def init(self, b):
        raise RuntimeError("init refused")

    def never(self):
        return "unreachable"


class Producer:
    """An endless stream of chunks that counts how many it has produced."""

    def __init__(self):
        self.count = 0

    def produce(self, size):
        chunk = b"x" * size
        while True:
            self.count += 1
            yield chunk

    def produced(self):
        return self.count


class SlowInit:
    def init(self, b):
        time.sleep(2.5)   # longer than the lease the test sets

    def ok(self):
        return "ok"


def open_fds():
    import os
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


class FdLister:
    def targets(self):
        import os
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return out
