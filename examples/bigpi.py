"""Estimate pi by Monte Carlo sampling spread over several bigmp machines.

A port of bigmachine's bigpi example. Run it from a clone of the repository:

    python examples/bigpi.py --machines 4 --samples 10000000

The samples are cut into batches of at most 1,000,000 and the batches are
dealt round-robin to the machines. Each batch prints one progress line on its
machine; bigmp forwards it to this program's stderr, prefixed with the
machine's name. The estimate is printed to stdout. bigmp's own flags
(``--bigmp-system`` and friends) are listed by ``--help``.
"""

import argparse
import random
import time

import bigmp

BATCH = 1_000_000


class CirclePI:
    """A service that samples points in the unit square."""

    def sample(self, n: int) -> int:
        """Return how many of n random points fall inside the unit circle."""
        # A fresh generator seeded from os.urandom on every call: forked
        # machines share the driver's global random state, so using the
        # module-level functions would give every machine the same points.
        rng = random.Random()
        inside = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(n))
        print(f"sampled {n:,} points, {inside:,} inside the circle", flush=True)
        return inside


def batches(total: int, size: int = BATCH):
    """Yield batch sizes of at most size that add up to total."""
    for start in range(0, total, size):
        yield min(size, total - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000, help="total number of samples (default: %(default)s)")
    parser.add_argument("--machines", type=int, default=4, help="number of machines to start (default: %(default)s)")
    bigmp.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.machines < 1:
        parser.error("--samples and --machines must be at least 1")

    began = time.monotonic()
    with bigmp.start(**bigmp.options_from_args(args)) as b:
        # May return fewer machines than asked for (never zero).
        machines = b.start(args.machines, services={"PI": CirclePI()})
        futures = [
            machines[i % len(machines)].call_async("PI.sample", n)
            for i, n in enumerate(batches(args.samples))
        ]
        inside = sum(f.result() for f in futures)
        elapsed = time.monotonic() - began

    pi = 4 * inside / args.samples
    print(f"pi ≈ {pi:.5f} ({args.samples:,} samples on {len(machines)} machines in {elapsed:.2f} s)")


if __name__ == "__main__":
    main()
