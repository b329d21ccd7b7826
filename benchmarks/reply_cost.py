"""What a service worker's take and reply cost in one process, timed.

    PYTHONPATH=<tree>/src python benchmarks/reply_cost.py [--batch 500] [--rounds 30]

One service, one client's reply channel and one worker in this process:
``--batch`` requests of 64 bytes are queued on the request channel, then the
worker takes and answers each (``recv()`` and ``reply()``), then the replies
are read off.  Nanoseconds of thread CPU time per request taken and
answered, the median and the best of ``--rounds`` batches: the worker's own
Python and core calls, with no wake-up of another process in the figure
(docs/benchmarks.md, "Replies kept for callers that read none").
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import time

import shmkit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=500, help="requests taken per timed batch")
    p.add_argument("--rounds", type=int, default=30, help="timed batches")
    args = p.parse_args()
    name = f"reply-cost-{os.getpid()}"
    with shmkit.Service(name) as svc, svc.client() as client, svc.worker() as w, \
            shmkit.Channel(name + ".requests", create=False) as raw:
        line = client._line()
        request = struct.pack("<BB2xIQQ", 2, 0, line.token, 1, line.id) + b"x" * 64
        times = []
        for _ in range(args.rounds):
            for _ in range(args.batch):
                raw.send_nowait(request)
            t0 = time.thread_time_ns()
            for _ in range(args.batch):
                req = w.recv(1.0)
                req.reply(req.data)
            times.append((time.thread_time_ns() - t0) / args.batch)
            line.ch.recv_many(args.batch)
        print(f"take and reply: median {statistics.median(times):.0f} ns, "
              f"best {min(times):.0f} ns a request")
        svc.unlink()


if __name__ == "__main__":
    main()
