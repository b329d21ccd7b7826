#!/usr/bin/env python3
"""Send structured log records to a log receiver through a shmkit Channel.

Start a receiver first (or after: whichever comes first creates the channel),
then any number of senders; they meet by the channel's name:

    python examples/log_receiver.py --name logs --senders 2
    python examples/log_sender.py --name logs --id 0 --records 10000
    python examples/log_sender.py --name logs --id 1 --records 10000

Each record is a dict encoded with msgpack: when it was made (wall clock for
people, monotonic nanoseconds for measuring latency), who sent it, its
sequence number, level, logger and message.  A last record of type "bye"
tells the receiver this sender is done and how many records it sent.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import msgpack

import shmkit

CAPACITY = 8 << 20  # bytes of ring; send() waits while the receiver catches up

LEVELS = ["DEBUG"] * 30 + ["INFO"] * 64 + ["WARNING"] * 5 + ["ERROR"]
LOGGERS = ["app.http", "app.db", "app.cache", "worker.jobs", "auth"]
MESSAGES = {
    "app.http": "GET /api/items/{n} 200 in {ms} ms",
    "app.db": "query items by owner took {ms} ms ({n} rows)",
    "app.cache": "cache miss for key item:{n}",
    "worker.jobs": "job {n} finished in {ms} ms",
    "auth": "token refreshed for user {n}",
}


def make_record(sender: int, seq: int, rnd: random.Random) -> dict:
    logger = rnd.choice(LOGGERS)
    return {
        "type": "log",
        "sender": sender,
        "pid": os.getpid(),
        "seq": seq,
        "time": time.time(),
        "mono_ns": time.monotonic_ns(),
        "level": rnd.choice(LEVELS),
        "logger": logger,
        "msg": MESSAGES[logger].format(n=rnd.randrange(10_000), ms=rnd.randrange(1, 250)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="logs", help="channel name (default: logs)")
    parser.add_argument("--id", type=int, default=0, help="this sender's number")
    parser.add_argument("--records", type=int, default=10_000, help="records to send")
    parser.add_argument("--batch", type=int, default=32,
                        help="records per send_many() call (1: one send() each)")
    parser.add_argument("--rate", type=float, default=0,
                        help="records per second to aim at (default 0: as fast as possible)")
    args = parser.parse_args(argv)

    rnd = random.Random(args.id)
    pack = msgpack.Packer().pack
    with shmkit.Channel(args.name, capacity=CAPACITY) as ch:
        seq = 0
        start = time.monotonic()
        try:
            while seq < args.records:
                if args.rate > 0:  # keep to the schedule, like a real program logging
                    ahead = start + seq / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                n = min(args.batch, args.records - seq)
                ch.send_many([pack(make_record(args.id, seq + i, rnd)) for i in range(n)],
                             timeout=30)
                seq += n
            ch.send(pack({"type": "bye", "sender": args.id, "count": seq}), timeout=30)
        except shmkit.ChannelClosed:
            print(f"sender {args.id}: the channel was ended (close_sending) after {seq} records",
                  file=sys.stderr)
            return 1
        except shmkit.Timeout:
            print(f"sender {args.id}: the channel stayed full for 30 s; is a receiver "
                  "running?", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C in a terminal reaches every program of its group
        sys.exit(130)
