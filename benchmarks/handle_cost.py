"""What each kind's handle adds to an open by name, against the tree on
PYTHONPATH.

    PYTHONPATH=<tree>/src python benchmarks/handle_cost.py [--rounds 7]

One object of each kind (64 MiB, persistent) is opened by name and closed
again in one process, two ways, in alternation: through its handle
(``Store.open(name).close()``) and as the bare segment under it (the
``attach_segment`` call every handle makes, then its ``close()``).  The
difference is the handle's own part: its parameter checks, its binding to
the core, its registrations and its close.  That part runs right after the
open's system calls, with the caches they cleared, so it costs several
times what the same lines cost in a loop that makes no system call.

Microseconds per open and close, the best of ``--rounds`` rounds of 2,000.
See docs/benchmarks.md, "The handles' own part of an open by name".
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import numpy as np

import shmkit
from shmkit._object import attach_segment
from shmkit.segment import Kind

SIZE = 64 << 20
KINDS = ("Store", "Heap", "Array", "Channel", "Segment")


def make(kind: str, name: str) -> Any:
    if kind == "Array":
        return shmkit.Array(name, np.uint8, (SIZE,), lifetime="persistent")
    if kind == "Channel":
        return shmkit.Channel(name, capacity=SIZE, lifetime="persistent")
    return getattr(shmkit, kind)(name, size=SIZE, lifetime="persistent")


def through_handle(kind: str, name: str) -> Callable[[], None]:
    cls = getattr(shmkit, kind)

    def run() -> None:
        cls.open(name).close()
    return run


def bare_segment(kind: str, name: str) -> Callable[[], None]:
    k = Kind.RAW if kind == "Segment" else Kind[kind.upper()]

    def run() -> None:
        attach_segment(k, name, None, size=None, create=False).close()
    return run


def best(run: Callable[[], None], n: int, times: list[float]) -> None:
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    times.append((time.perf_counter() - t0) / n * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="rounds of 2,000 (default 7)")
    args = ap.parse_args()
    objects = {k: make(k, f"handle-cost-{k.lower()}-{os.getpid()}") for k in KINDS}
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for kind, obj in objects.items():
                for way, runner in (("handle", through_handle), ("segment", bare_segment)):
                    best(runner(kind, obj.name), 2000, times.setdefault((kind, way), []))
        print(f"{'kind':8s} {'handle':>8s} {'segment':>8s} {'its part':>9s}  (µs per open+close)")
        for kind in KINDS:
            h, s = min(times[(kind, "handle")]), min(times[(kind, "segment")])
            print(f"{kind:8s} {h:8.2f} {s:8.2f} {h - s:9.2f}")
    finally:
        for obj in objects.values():
            obj.unlink()
            obj.close()


if __name__ == "__main__":
    main()
