"""Machines calling each other: a service that calls a service on another machine.

    python examples/machine_to_machine.py [--machines 3]

Every machine runs a ``Store`` (a small key-value store). A service gets its machine's
session ``b`` in ``init(self, b)``; ``b.dial(addr)`` then gives it a handle on any other
machine of the session, called exactly like the driver's handles. Here machine 0 stores a
value, every other machine fetches it straight from machine 0 (the driver only passes the
address), and a message is relayed around the ring of machines and back.
"""

import argparse
import os

import bigmp


class Store:
    def init(self, b):
        self.b = b            # this machine's session: it can dial, not start machines
        self.data = {}

    def put(self, key, value):
        self.data[key] = value

    def get(self, key):
        return self.data.get(key)

    def fetch_from(self, addr, key):
        """Get ``key`` from the Store on the machine at ``addr`` and keep a copy here."""
        value = self.b.dial(addr).call("Store.get", key)
        self.data[key] = value
        return f"pid {os.getpid()} fetched {key}={value!r}"

    def relay(self, addrs, message):
        """Add this machine's pid to ``message`` and pass it on to the next address."""
        message = message + [os.getpid()]
        if not addrs:
            return message
        return self.b.dial(addrs[0]).call("Store.relay", addrs[1:], message)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=3)
    bigmp.add_arguments(parser)
    args = parser.parse_args(argv)

    with bigmp.start(**bigmp.options_from_args(args)) as b:
        machines = b.start(max(2, args.machines), services={"Store": Store()})
        for m in machines:
            m.wait()
        first, others = machines[0], machines[1:]
        first.call("Store.put", "greeting", "hello from machine 0")
        for m in others:
            print(m.call("Store.fetch_from", first.addr, "greeting"))
        pids = [m.info()["pid"] for m in machines]
        ring = [m.addr for m in machines[1:]] + [first.addr]
        path = first.call("Store.relay", ring, [])
        print(f"relay visited pids {path}")
        print(f"ring closed: {path[0] == path[-1] == pids[0] and sorted(set(path)) == sorted(pids)}")


if __name__ == "__main__":
    main()
