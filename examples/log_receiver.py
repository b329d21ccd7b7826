#!/usr/bin/env python3
"""Receive structured log records from any number of senders over a shmkit Channel.

    python examples/log_receiver.py --name logs --senders 2
    python examples/log_sender.py --name logs --id 0 &
    python examples/log_sender.py --name logs --id 1 &

Prints the records at --level (ERROR) and above as they arrive, with a progress bar,
and at the end a summary: records, records per second, and the latency from
the moment a sender made a record to the moment it was printed here.  It
stops when --senders senders have said goodbye, when the channel is ended
(``Channel(name).close_sending()`` from anywhere), or on Ctrl-C.  The exit status
is 0 when every sender's records all arrived, once each and in order.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgpack
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import shmkit

CAPACITY = 8 << 20
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
STYLE = {"DEBUG": "dim", "INFO": "", "WARNING": "yellow", "ERROR": "bold red"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="logs", help="channel name (default: logs)")
    parser.add_argument("--senders", type=int, default=0,
                        help="stop after this many senders said goodbye (0: run until closed)")
    parser.add_argument("--expect", type=int, default=0,
                        help="records expected in all (sizes the progress bar)")
    parser.add_argument("--level", default="ERROR", choices=list(LEVELS),
                        help="print records at this level and above (default: ERROR)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    console = Console()
    threshold = LEVELS[args.level]
    latencies: list[int] = []
    next_seq: dict[int, int] = {}
    problems: list[str] = []
    byes: dict[int, int] = {}
    received = 0
    started = None

    ch = shmkit.Channel(args.name, capacity=CAPACITY)
    progress = Progress(TextColumn("[bold]receiving[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:>9,.0f} records/s"), TimeElapsedColumn(),
                        console=console, transient=True, disable=args.quiet)
    task = progress.add_task("records", total=args.expect or None, rate=0.0)
    try:
        with progress:
            while not args.senders or len(byes) < args.senders:
                try:
                    batch = ch.recv_many(max_n=1024, timeout=0.25)
                except shmkit.ChannelClosed:
                    break
                now = time.monotonic_ns()
                for raw in batch:
                    rec = msgpack.unpackb(raw)
                    sender = rec["sender"]
                    if rec["type"] == "bye":
                        byes[sender] = rec["count"]
                        continue
                    if started is None:
                        started = time.monotonic()
                    received += 1
                    latencies.append(now - rec["mono_ns"])
                    expected = next_seq.get(sender, 0)
                    if rec["seq"] != expected:
                        problems.append(f"sender {sender}: record {rec['seq']} arrived "
                                        f"when {expected} was due")
                    next_seq[sender] = rec["seq"] + 1
                    if not args.quiet and LEVELS[rec["level"]] >= threshold:
                        stamp = time.strftime("%H:%M:%S", time.localtime(rec["time"]))
                        progress.console.print(
                            f"{stamp} [{STYLE[rec['level']]}]{rec['level']:<7}[/] "
                            f"sender {sender} #{rec['seq']:<6} {rec['logger']:<11} "
                            f"{rec['msg']}", highlight=False, markup=True)
                if batch and started is not None:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    progress.update(task, completed=received, rate=received / elapsed)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
    finally:
        stats = ch.statistics()
        ch.close()

    elapsed = time.monotonic() - started if started is not None else 0.0
    for sender, count in sorted(byes.items()):
        if next_seq.get(sender, 0) != count:
            problems.append(f"sender {sender} sent {count} records, "
                            f"{next_seq.get(sender, 0)} arrived")
    table = Table(title=f"log receiver: channel {args.name!r}", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column()
    table.add_row("records", f"{received:,} from {len(next_seq)} senders")
    table.add_row("time", f"{elapsed:.2f} s")
    table.add_row("records/s", f"{received / elapsed:,.0f}" if elapsed else "-")
    if latencies:
        lat = np.array(latencies) / 1e3
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        table.add_row("latency", f"p50 {p50:,.0f} µs   p90 {p90:,.0f} µs   "
                                 f"p99 {p99:,.0f} µs   max {lat.max():,.0f} µs")
    table.add_row("channel", f"sent {stats['sent']:,}  received {stats['received']:,}  "
                             f"dropped {stats['dropped']}")
    table.add_row("order", "every sender's records arrived once, in order" if not problems
                  else f"[red]{len(problems)} problems[/]")
    console.print(table)
    for p in problems[:10]:
        console.print(f"[red]{p}[/]")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
