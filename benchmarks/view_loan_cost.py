"""What a 64 B message costs through a loan and through a view, in one process.

    PYTHONPATH=<tree>/src python benchmarks/view_loan_cost.py [--n 200000] [--rounds 7]

One channel, one thread: ``with ch.loan(64): pass`` then ``ch.recv()``, and
``ch.send(64 B)`` then ``with ch.recv_view(): pass``, ``--n`` times each, in
alternation.  Nanoseconds of thread CPU time per message, the best of
``--rounds`` rounds.  Run it against two trees in turn to see what a change
to the view and loan types costs (docs/benchmarks.md, "Views and loans in
the cyclic collector").
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import shmkit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="messages a round")
    p.add_argument("--rounds", type=int, default=7, help="rounds of each way")
    args = p.parse_args()
    n = args.n
    with shmkit.Channel(None, capacity=1 << 20) as ch:
        msg = b"x" * 64

        def loan() -> None:
            lend, recv = ch.loan, ch.recv
            for _ in range(n):
                with lend(64):
                    pass
                recv()

        def view() -> None:
            send, take = ch.send, ch.recv_view
            for _ in range(n):
                send(msg)
                with take():
                    pass

        ways: dict[str, Callable[[], None]] = {"loan, then recv()": loan,
                                               "send(), then a view": view}
        best = {k: float("inf") for k in ways}
        for _ in range(args.rounds):
            for k, fn in ways.items():
                t = time.thread_time_ns()
                fn()
                best[k] = min(best[k], (time.thread_time_ns() - t) / n)
    for k, ns in best.items():
        print(f"{k:24} {ns:8.1f} ns")


if __name__ == "__main__":
    main()
