"""What a put costs in a Store's four ways of writing many keys, in one process.

    PYTHONPATH=<tree>/src python benchmarks/update_cost.py [--keys 100000] [--rounds 7]

A store holding ``--keys`` keys (16 B keys, 100 B values) has every key
written again, in alternation: single puts (``st[k] = v``), ``batch()``
blocks of 1,000 puts, ``update()`` of 1,000 pairs a call (the dicts made
before the clock), and ``MutableMapping.update`` of the same dicts (one put
per pair, what ``update`` was before it became one batch in the core).

Nanoseconds of thread CPU time per put, the best of ``--rounds`` rounds, and
how many times faster than single puts.  See docs/benchmarks.md,
"Store.update: a batch in one call".
"""
from __future__ import annotations

import argparse
import time
from collections.abc import MutableMapping
from typing import Callable

import shmkit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=100_000, help="keys in the store")
    p.add_argument("--rounds", type=int, default=7, help="rounds of each way")
    args = p.parse_args()
    keys = [b"k%014d" % i for i in range(args.keys)]
    value = b"v" * 100
    with shmkit.Store(None, size=64 << 20) as st:
        for k in keys:
            st[k] = value
        chunks = [dict.fromkeys(keys[i:i + 1000], value) for i in range(0, len(keys), 1000)]

        def single() -> None:
            for k in keys:
                st[k] = value

        def batch() -> None:
            for i in range(0, len(keys), 1000):
                with st.batch():
                    for k in keys[i:i + 1000]:
                        st[k] = value

        def update() -> None:
            for chunk in chunks:
                st.update(chunk)

        def mapping_update() -> None:
            for chunk in chunks:
                MutableMapping.update(st, chunk)

        ways: list[Callable[[], None]] = [single, batch, update, mapping_update]
        best = {way.__name__: float("inf") for way in ways}
        for _ in range(args.rounds):
            for way in ways:
                t0 = time.thread_time_ns()
                way()
                best[way.__name__] = min(best[way.__name__],
                                         (time.thread_time_ns() - t0) / len(keys))
    for name, ns in best.items():
        print(f"{name:15s} {ns:8.1f} ns a put  {best['single'] / ns:5.2f}x single puts")


if __name__ == "__main__":
    main()
