"""Opening a 1 GiB segment from another process and reading one byte.

A long-lived spawned worker does the opens, so process start-up is not timed;
each open is still the first in that worker for that mapping (nothing cached).
The worker times its own operations and reports the sum.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from benchmarks.harness import workload

SIZE = 1 << 30
BENCH = "segment: open an existing 1 GiB segment in another process, read 1 byte, close"


def _worker(conn, system: str, name: str) -> None:
    import mmap

    import shmkit

    while True:
        n = conn.recv()
        if n is None:
            return
        t0 = time.perf_counter()
        if system == "shmkit":
            for _ in range(n):
                seg = shmkit.Segment.open(name)
                seg.buf[0]
                seg.close()
        elif system == "mp.shared_memory":
            from multiprocessing import resource_tracker, shared_memory

            for _ in range(n):
                shm = shared_memory.SharedMemory(name)
                shm.buf[0]
                shm.close()
            # The stdlib registers every attach for removal at exit; undo that once.
            resource_tracker.unregister("/" + name, "shared_memory")
        else:
            path = name
            for _ in range(n):
                fd = os.open(path, os.O_RDWR)
                m = mmap.mmap(fd, SIZE)
                m[0]
                m.close()
                os.close(fd)
        conn.send(time.perf_counter() - t0)


class _Worker:
    def __init__(self, system: str, name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, system, name), daemon=True)
        self.proc.start()

    def run(self, n: int) -> float:
        self.conn.send(n)
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already ended by multiprocessing's own exit handling
        self.proc.join(10)


_made: dict[str, tuple[object, _Worker]] = {}


def _setup(system: str):
    if system in _made:
        return _made[system][1]
    if system == "shmkit":
        import shmkit

        obj = shmkit.Segment(f"bench-open-{os.getpid()}", size=SIZE, lifetime="attached")
        name = obj.name
    elif system == "mp.shared_memory":
        from multiprocessing import shared_memory

        obj = shared_memory.SharedMemory(create=True, size=SIZE)
        name = obj.name
    else:
        name = f"/dev/shm/bench-bare-{os.getpid()}"
        fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o600)
        os.posix_fallocate(fd, 0, SIZE)
        os.close(fd)
        obj = name
    w = _Worker(system, name)
    _made[system] = (obj, w)
    return w


def _cleanup() -> None:
    for system, (obj, w) in list(_made.items()):
        w.stop()
        if system == "shmkit":
            obj.close()
        elif system == "mp.shared_memory":
            obj.close()
            obj.unlink()
        else:
            os.unlink(obj)
    _made.clear()


import atexit  # noqa: E402

atexit.register(_cleanup)


@workload(BENCH, unit="µs/op", system="shmkit.Segment.open")
def shmkit_open(n: int) -> float:
    return _setup("shmkit").run(n)


@workload(BENCH, system="multiprocessing.shared_memory")
def mp_shared_memory_open(n: int) -> float:
    return _setup("mp.shared_memory").run(n)


@workload(BENCH, system="bare os.open + mmap", reference=True)
def bare_open_mmap(n: int) -> float:
    return _setup("bare").run(n)


def _queue_child(q, done) -> None:
    while True:
        arr = q.get()
        if arr is None:
            return
        done.put(int(arr[0]))
        del arr


@workload("segment: hand a 1 GiB array to another process", unit="ms/op",
          system="multiprocessing.Queue (pickled copy)", n=1)
def mp_queue_array(n: int) -> float:
    import numpy as np

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_queue_child, args=(q, done), daemon=True)
    p.start()
    arr = np.ones(SIZE, dtype=np.uint8)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(arr)
            done.get()
        return time.perf_counter() - t0
    finally:
        q.put(None)
        p.join(30)


@workload("segment: hand a 1 GiB array to another process",
          system="shmkit.Segment (open by name)", reference=True)
def shmkit_segment_array(n: int) -> float:
    return _setup("shmkit").run(n)
