"""Two producers and a consumer pass heap blocks by handle.

Each producer allocates blocks in a shared heap, fills them with a numpy
array, and sends each block's handle (8 bytes) through a channel.  The
consumer pins each block, checks it in place and frees it.  Only the handle
travels: the block's bytes are written once and never copied.

    python examples/heap_pipeline.py                  # 200 blocks per producer
    python examples/heap_pipeline.py --blocks 1000 --size 1048576
    python examples/heap_pipeline.py --transport queue   # multiprocessing.Queue

The heap compacts itself when the freed space is scattered, while the
consumer reads: a block that is pinned never moves.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

import shmkit

DONE = b"done"


def open_transport(kind: str, name: str, queue=None):
    """(send, recv, leave) over a shmkit Channel, or over a multiprocessing Queue.

    Leaving closes this process's handle only (the channel carries on for the
    others); each producer says DONE, since close_sending() would end the
    channel for every producer.
    """
    if kind == "queue":
        return queue.put, lambda: queue.get(timeout=60), lambda: None
    ch = shmkit.Channel(name, capacity=4096)
    return (lambda b: ch.send(b, timeout=60)), (lambda: ch.recv(timeout=60)), ch.close


def alloc_waiting(heap: shmkit.Heap, n: int) -> shmkit.Handle:
    """Allocate, waiting while the heap is full: the consumer frees as it reads."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return heap.alloc(n)
        except shmkit.HeapFullError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def producer(heap_name: str, chan_name: str, transport: str, queue, who: int,
             blocks: int, size: int) -> None:
    heap = shmkit.Heap(heap_name)
    send, _, close = open_transport(transport, chan_name, queue)
    rng = np.random.default_rng(who)
    for seq in range(blocks):
        n = int(rng.integers(size // 2, size + 1)) // 8 * 8
        h = alloc_waiting(heap, n)
        with heap.pin_array(h, np.int64) as a:     # the block, as an array: no copy
            a[0], a[1] = who, seq
            a[2:] = np.arange(a.size - 2) + seq
        send(bytes(h))                             # 8 bytes on the wire
    send(DONE)
    close()
    heap.close()


def consumer(heap_name: str, chan_name: str, transport: str, queue, producers: int,
             results) -> None:
    heap = shmkit.Heap(heap_name)
    _, recv, close = open_transport(transport, chan_name, queue)
    received, done, nbytes = 0, 0, 0
    last = {}
    while done < producers:
        msg = recv()
        if msg == DONE:
            done += 1
            continue
        h = shmkit.Handle.from_bytes(msg)
        with heap.pin_array(h, np.int64) as a:     # pinned: it cannot move meanwhile
            who, seq = int(a[0]), int(a[1])
            expected = (a.size - 2) * (a.size - 3) // 2 + seq * (a.size - 2)
            assert int(a[2:].sum()) == expected, f"block {seq} of producer {who} damaged"
            assert last.get(who, -1) == seq - 1, "blocks of one producer arrive in order"
            last[who] = seq
            nbytes += a.nbytes
        heap.free(h)
        received += 1
    close()
    heap.close()
    results.put((received, nbytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200, help="blocks per producer")
    parser.add_argument("--size", type=int, default=64 << 10, help="largest block, bytes")
    parser.add_argument("--transport", choices=("channel", "queue"), default="channel")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    tag = f"{os.getpid()}"
    heap_name, chan_name = f"example-heap-{tag}", f"example-chan-{tag}"
    # A heap of 32 blocks' worth: producers wait on the channel, and the heap
    # reuses (and compacts) the space the consumer frees.
    heap = shmkit.Heap.create(heap_name, size=32 * (args.size + 64))
    queue = ctx.Queue() if args.transport == "queue" else None
    if args.transport == "channel":
        shmkit.Channel(chan_name, capacity=4096).close()  # made here, used by the workers
    results = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=producer, args=(heap_name, chan_name, args.transport, queue,
                                                who, args.blocks, args.size))
             for who in (1, 2)]
    procs.append(ctx.Process(target=consumer, args=(heap_name, chan_name, args.transport,
                                                    queue, 2, results)))
    try:
        for p in procs:
            p.start()
        received, nbytes = results.get(timeout=600)
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise SystemExit(f"{p.name} failed with exit code {p.exitcode}")
        seconds = time.perf_counter() - t0
        print(f"consumer received {received} blocks ({nbytes / 1e6:.1f} MB) "
              f"in {seconds:.2f} s")
        stats = heap.statistics()
        print(f"heap: {stats['allocs']} allocations, {stats['moves']} blocks moved by "
              f"compaction, {stats['blocks']} left")
        heap.verify()
        print("heap verified")
    finally:
        heap.close()
        heap.unlink()
        if args.transport == "channel":
            try:
                shmkit.unlink(chan_name)
            except shmkit.NotFoundError:
                pass


if __name__ == "__main__":
    main()
