"""The heap: allocation, compaction, and passing blocks between processes by handle."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from benchmarks.harness import workload

SMALL = "heap: alloc+free of a 64 B block"
LARGE = "heap: alloc+free of a 1 MiB block"
PIN = "heap: pin a 64 B block, read 8 bytes, unpin"
COMPACT_64K = "heap: compaction, 64 KiB blocks (every other one freed)"
COMPACT_4K = "heap: compaction, 4 KiB blocks (every other one freed)"
PASS = "heap: hand a 1 MiB block to another process and back (round trip)"

MiB = 1 << 20


# -- allocation ----------------------------------------------------------------

def _heap_alloc_free(n: int, size: int) -> float:
    import shmkit

    heap = shmkit.Heap(None, size=max(16 * MiB, 4 * size))
    alloc, free = heap.alloc, heap.free
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            free(alloc(size))
        return time.perf_counter() - t0
    finally:
        heap.close()
        heap.unlink()


def _bytearray_alloc_free(n: int, size: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        b = bytearray(size)
        del b
    return time.perf_counter() - t0


def _shared_memory_alloc_free(n: int, size: int) -> float:
    from multiprocessing import resource_tracker, shared_memory

    t0 = time.perf_counter()
    for _ in range(n):
        s = shared_memory.SharedMemory(create=True, size=size)
        s.close()
        s.unlink()
    elapsed = time.perf_counter() - t0
    del resource_tracker
    return elapsed


@workload(SMALL, unit="ns/op", system="shmkit.Heap")
def heap_small(n: int) -> float:
    return _heap_alloc_free(n, 64)


@workload(SMALL, system="bytearray (in-process floor)", reference=True)
def bytearray_small(n: int) -> float:
    return _bytearray_alloc_free(n, 64)


@workload(SMALL, system="multiprocessing.shared_memory (a segment per block)")
def shared_memory_small(n: int) -> float:
    return _shared_memory_alloc_free(n, 64)


@workload(LARGE, unit="ns/op", system="shmkit.Heap")
def heap_large(n: int) -> float:
    return _heap_alloc_free(n, MiB)


@workload(LARGE, system="bytearray (in-process floor)", reference=True)
def bytearray_large(n: int) -> float:
    return _bytearray_alloc_free(n, MiB)


@workload(LARGE, system="multiprocessing.shared_memory (a segment per block)")
def shared_memory_large(n: int) -> float:
    return _shared_memory_alloc_free(n, MiB)


# -- pinning -------------------------------------------------------------------

@workload(PIN, unit="ns/op", system="shmkit.Heap.pin (with block)")
def heap_pin(n: int) -> float:
    import shmkit

    heap = shmkit.Heap(None, size=MiB)
    h = heap.alloc(64)
    pin = heap.pin
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with pin(h) as view:
                view[:8]
        return time.perf_counter() - t0
    finally:
        heap.close()
        heap.unlink()


@workload(PIN, system="memoryview slice of a multiprocessing.shared_memory", reference=True)
def shared_memory_slice(n: int) -> float:
    from multiprocessing import shared_memory

    s = shared_memory.SharedMemory(create=True, size=4096)
    buf = s.buf
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            v = buf[128:192]
            v[:8]
            v.release()
        return time.perf_counter() - t0
    finally:
        del buf
        s.close()
        s.unlink()


# -- compaction ------------------------------------------------------------------

def _compact_heap(n: int, block: int) -> dict:
    import shmkit

    heap = shmkit.Heap(None, size=2 * n * (block + 16) + MiB, max_blocks=2 * n + 16)
    try:
        hs = [heap.alloc(block) for _ in range(2 * n)]
        for h in hs:
            with heap.pin(h) as view:  # touch every page, as real data would
                view[:] = b"\x5a" * block
        for h in hs[::2]:
            heap.free(h)
        t0 = time.perf_counter()
        out = heap.compact()
        elapsed = time.perf_counter() - t0
        if out["moved_blocks"] != n:
            raise RuntimeError(f"moved {out['moved_blocks']} blocks, expected {n}")
        return {"seconds": elapsed}
    finally:
        heap.close()
        heap.unlink()


def _memmove_blocks(n: int, block: int) -> float:
    """The same moves compaction makes, as numpy copies within one buffer."""
    stride = block + 16
    buf = np.full(2 * n * stride, 0x5A, dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(n):
        src, dst = (2 * i + 1) * stride, i * stride
        np.copyto(buf[dst:dst + block], buf[src:src + block])
    return time.perf_counter() - t0


@workload(COMPACT_64K, unit="GB/s", system="shmkit.Heap.compact", n=1024,
          bytes_per_op=64 << 10)
def compact_64k(n: int) -> dict:
    return _compact_heap(n, 64 << 10)


@workload(COMPACT_64K, system="numpy copy of the same blocks (memcpy)", reference=True,
          n=1024, bytes_per_op=64 << 10)
def memmove_64k(n: int) -> float:
    return _memmove_blocks(n, 64 << 10)


@workload(COMPACT_4K, unit="GB/s", system="shmkit.Heap.compact", n=8192,
          bytes_per_op=4 << 10)
def compact_4k(n: int) -> dict:
    return _compact_heap(n, 4 << 10)


@workload(COMPACT_4K, system="numpy copy of the same blocks (memcpy)", reference=True,
          n=8192, bytes_per_op=4 << 10)
def memmove_4k(n: int) -> float:
    return _memmove_blocks(n, 4 << 10)


# -- handing a block to another process ---------------------------------------------
#
# The producer has 1 MiB of fresh data to give the consumer, which looks at it
# (first and last byte) and answers.  With the heap the data is written once,
# into the block, and only the 8-byte handle travels; the consumer frees the
# block.  With a queue or pipe the bytes themselves travel (copied in and out).

def _heap_consumer_events(heap_name: str, slot_name: str, ready: str, done: str, n: int
                          ) -> None:
    import shmkit

    heap = shmkit.Heap.open(heap_name)
    slot = shmkit.Array(slot_name)
    go, back = shmkit.Event(ready, create=False), shmkit.Event(done, create=False)
    back.set()  # started
    for _ in range(n):
        if not go.wait(60):
            raise RuntimeError("no block came")
        h = shmkit.Handle.from_int(int(slot.array[0]))
        with heap.pin(h) as view:
            if view[0] != view[-1]:
                raise RuntimeError("block damaged")
        heap.free(h)
        back.set()
    heap.close()


def _heap_consumer_queue(heap_name: str, inbox, outbox, n: int) -> None:
    import shmkit

    heap = shmkit.Heap.open(heap_name)
    outbox.put(b"started")
    for _ in range(n):
        h = shmkit.Handle.from_bytes(inbox.get(timeout=60))
        with heap.pin(h) as view:
            if view[0] != view[-1]:
                raise RuntimeError("block damaged")
        heap.free(h)
        outbox.put(b"ok")
    heap.close()


def _bytes_consumer_queue(inbox, outbox, n: int) -> None:
    outbox.put(b"started")
    for _ in range(n):
        data = inbox.get(timeout=60)
        if data[0] != data[-1]:
            raise RuntimeError("block damaged")
        outbox.put(b"ok")


def _bytes_consumer_pipe(conn, n: int) -> None:
    conn.send_bytes(b"started")
    for _ in range(n):
        data = conn.recv_bytes()
        if data[0] != data[-1]:
            raise RuntimeError("block damaged")
        conn.send_bytes(b"ok")


_PAYLOAD = np.full(MiB, 7, dtype=np.uint8)


def _finish(p) -> None:
    p.join(30)
    if p.exitcode != 0:
        raise RuntimeError(f"consumer failed ({p.exitcode})")


@workload(PASS, unit="us/op", system="shmkit.Heap, handle via shmkit Event + Array", n=300)
def pass_heap_events(n: int) -> float:
    import shmkit

    ctx = mp.get_context("spawn")
    heap = shmkit.Heap(None, size=8 * MiB)
    slot = shmkit.Array(None, np.uint64, 1)
    go, back = shmkit.Event(None, auto_reset=True), shmkit.Event(None, auto_reset=True)
    p = ctx.Process(target=_heap_consumer_events,
                    args=(heap.name, slot.name, go.name, back.name, n), daemon=True)
    p.start()
    try:
        if not back.wait(60):
            raise RuntimeError("the consumer did not start")
        t0 = time.perf_counter()
        for _ in range(n):
            h = heap.alloc(MiB)
            with heap.pin_array(h) as a:
                np.copyto(a, _PAYLOAD)
            slot.array[0] = int(h)
            go.set()
            if not back.wait(60):
                raise RuntimeError("the consumer stopped answering")
        elapsed = time.perf_counter() - t0
        _finish(p)
        return elapsed
    finally:
        p.kill()
        for o in (heap, slot, go, back):
            o.close()
            o.unlink()


@workload(PASS, system="shmkit.Heap, handle via multiprocessing.Queue", n=300)
def pass_heap_queue(n: int) -> float:
    import shmkit

    ctx = mp.get_context("spawn")
    heap = shmkit.Heap(None, size=8 * MiB)
    inbox, outbox = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_heap_consumer_queue, args=(heap.name, inbox, outbox, n),
                    daemon=True)
    p.start()
    try:
        outbox.get(timeout=60)
        t0 = time.perf_counter()
        for _ in range(n):
            h = heap.alloc(MiB)
            with heap.pin_array(h) as a:
                np.copyto(a, _PAYLOAD)
            inbox.put(bytes(h))
            outbox.get(timeout=60)
        elapsed = time.perf_counter() - t0
        _finish(p)
        return elapsed
    finally:
        p.kill()
        heap.close()
        heap.unlink()


@workload(PASS, system="multiprocessing.Queue, the bytes", reference=True, n=300)
def pass_bytes_queue(n: int) -> float:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_bytes_consumer_queue, args=(inbox, outbox, n), daemon=True)
    p.start()
    try:
        outbox.get(timeout=60)
        t0 = time.perf_counter()
        for _ in range(n):
            inbox.put(_PAYLOAD.tobytes())
            outbox.get(timeout=60)
        elapsed = time.perf_counter() - t0
        _finish(p)
        return elapsed
    finally:
        p.kill()


@workload(PASS, system="multiprocessing.Pipe, the bytes", n=300)
def pass_bytes_pipe(n: int) -> float:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_bytes_consumer_pipe, args=(theirs, n), daemon=True)
    p.start()
    try:
        if not mine.poll(60):
            raise RuntimeError("the consumer did not start")
        mine.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(n):
            mine.send_bytes(_PAYLOAD)
            if not mine.poll(60):
                raise RuntimeError("the consumer stopped answering")
            mine.recv_bytes()
        elapsed = time.perf_counter() - t0
        _finish(p)
        return elapsed
    finally:
        p.kill()


def _heap_consumer_channel(heap_name: str, inbox: str, outbox: str, n: int) -> None:
    import shmkit

    heap = shmkit.Heap.open(heap_name)
    rx, tx = shmkit.Channel(inbox), shmkit.Channel(outbox)
    tx.send(b"started", timeout=60)
    for _ in range(n):
        h = shmkit.Handle.from_bytes(rx.recv(timeout=60))
        with heap.pin(h) as view:
            if view[0] != view[-1]:
                raise RuntimeError("block damaged")
        heap.free(h)
        tx.send(b"ok", timeout=60)
    heap.close()


try:
    import shmkit as _shmkit
    _HAVE_CHANNEL = hasattr(_shmkit, "Channel")
except Exception:  # pragma: no cover
    _HAVE_CHANNEL = False

if _HAVE_CHANNEL:
    @workload(PASS, system="shmkit.Heap, handle via shmkit.Channel", n=300)
    def pass_heap_channel(n: int) -> float:
        import shmkit

        ctx = mp.get_context("spawn")
        heap = shmkit.Heap(None, size=8 * MiB)
        inbox = shmkit.Channel(None, capacity=4096)
        outbox = shmkit.Channel(None, capacity=4096)
        p = ctx.Process(target=_heap_consumer_channel,
                        args=(heap.name, inbox.name, outbox.name, n), daemon=True)
        p.start()
        try:
            outbox.recv(timeout=60)
            t0 = time.perf_counter()
            for _ in range(n):
                h = heap.alloc(MiB)
                with heap.pin_array(h) as a:
                    np.copyto(a, _PAYLOAD)
                inbox.send(bytes(h), timeout=60)
                outbox.recv(timeout=60)
            elapsed = time.perf_counter() - t0
            _finish(p)
            return elapsed
        finally:
            p.kill()
            heap.close()
            heap.unlink()
            for ch in (inbox, outbox):
                ch.close()  # anonymous: removed with its last handle
