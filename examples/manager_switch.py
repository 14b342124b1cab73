"""A multiprocessing BaseManager program, switched to bigmp by changing one line.

    python examples/manager_switch.py

Four worker processes increment a counter that lives in the manager's server process,
through proxies. The only bigmp-specific line is the import of ``BaseManager`` (see
below); with it, errors raised in the server come back with their remote traceback,
connections have timeouts, and ``CounterManager(system="local")`` would place the server
on a bigmp machine instead of a plain child process.
"""

import multiprocessing

# The switch. The standard-library version of this line is:
#     from multiprocessing.managers import BaseManager
from bigmp import BigManager as BaseManager


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, by=1):
        self.n += by
        return self.n

    def value(self):
        return self.n

    def fail(self):
        raise ValueError("counters cannot fail, except this one")


class CounterManager(BaseManager):
    pass


CounterManager.register("Counter", Counter)


def work(counter, times, lock):
    for _ in range(times):
        with lock:
            counter.incr()


def main():
    with CounterManager() as manager:
        counter = manager.Counter()
        lock = multiprocessing.Lock()
        workers = [multiprocessing.Process(target=work, args=(counter, 250, lock))
                   for _ in range(4)]
        for p in workers:
            p.start()
        for p in workers:
            p.join()
        print(f"manager class: {BaseManager.__module__}.{BaseManager.__name__}")
        print(f"count: {counter.value()}")
        try:
            counter.fail()
        except ValueError as exc:
            print(f"remote error came back as {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
