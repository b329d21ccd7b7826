"""What a Store put costs in one process, timed, or counted in instructions.

    PYTHONPATH=<tree>/src python benchmarks/put_cost.py [--keys 20000] [--rounds 7]
    PYTHONPATH=<tree>/src valgrind --tool=callgrind python benchmarks/put_cost.py --rounds 2

One store of ``--keys`` 16-byte keys and 100-byte values, filled first;
then ``st[k] = v`` over every key in a shuffled order, ``--rounds`` times.
Nanoseconds of thread CPU time per put, the best round.  Under callgrind,
the put's own instructions are the inclusive count of the core's
``table_ass_subscript`` divided by ``keys * rounds``: a count that does
not wander as this machine's timings do (docs/benchmarks.md, "A thread's
serial number, and a resize in one call").
"""
from __future__ import annotations

import argparse
import random
import time

import shmkit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=20_000, help="keys in the store")
    p.add_argument("--rounds", type=int, default=7, help="rounds of puts over every key")
    args = p.parse_args()
    keys = [f"key{i:012d}".encode() for i in range(args.keys)]
    value = b"v" * 100
    with shmkit.Store(None, size=64 << 20) as st:
        for k in keys:
            st[k] = value
        random.Random(1).shuffle(keys)
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.thread_time_ns()
            for k in keys:
                st[k] = value
            best = min(best, time.thread_time_ns() - t0)
    print(f"put: {best / len(keys):.1f} ns (best of {args.rounds} rounds of {len(keys)})")


if __name__ == "__main__":
    main()
