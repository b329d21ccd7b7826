"""Locks and events: uncontended cost, hand-off between processes, ping-pong."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import tempfile
import threading
import time

from benchmarks.harness import workload

UNCONTENDED = "lock: uncontended acquire+release"
HANDOFF = "lock: two processes incrementing one counter under the lock"
PINGPONG = "event: ping-pong round trip between two processes"


def _timed_loop(acquire, release, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        acquire()
        release()
    return time.perf_counter() - t0


def _timed_with(lock, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            pass
    return time.perf_counter() - t0


@workload(UNCONTENDED, unit="ns/op", system="shmkit.Mutex")
def shmkit_mutex(n: int) -> float:
    import shmkit

    m = shmkit.Mutex(None)
    try:
        return _timed_loop(m.acquire, m.release, n)
    finally:
        m.close()
        m.unlink()


@workload(UNCONTENDED, system="shmkit.Mutex (with block)")
def shmkit_mutex_with(n: int) -> float:
    import shmkit

    m = shmkit.Mutex(None)
    try:
        return _timed_with(m, n)
    finally:
        m.close()
        m.unlink()


@workload(UNCONTENDED, system="shmkit.Semaphore (with block)")
def shmkit_semaphore_with(n: int) -> float:
    import shmkit

    s = shmkit.Semaphore(None, value=1)
    try:
        return _timed_with(s, n)
    finally:
        s.close()
        s.unlink()


@workload(UNCONTENDED, system="threading.Lock")
def threading_lock(n: int) -> float:
    lock = threading.Lock()
    return _timed_loop(lock.acquire, lock.release, n)


@workload(UNCONTENDED, system="multiprocessing.Lock", reference=True)
def mp_lock(n: int) -> float:
    lock = mp.get_context("spawn").Lock()
    return _timed_loop(lock.acquire, lock.release, n)


@workload(UNCONTENDED, system="threading.Lock (with block)")
def threading_lock_with(n: int) -> float:
    return _timed_with(threading.Lock(), n)


@workload(UNCONTENDED, system="multiprocessing.Lock (with block)")
def mp_lock_with(n: int) -> float:
    return _timed_with(mp.get_context("spawn").Lock(), n)


@workload(UNCONTENDED, system="posix_ipc.Semaphore", requires=("posix_ipc",))
def posix_ipc_semaphore(n: int) -> float:
    import posix_ipc

    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    try:
        return _timed_loop(sem.acquire, sem.release, n)
    finally:
        sem.unlink()


@workload(UNCONTENDED, system="fcntl.flock")
def flock(n: int) -> float:
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        return _timed_loop(lambda: fcntl.flock(fd, fcntl.LOCK_EX),
                           lambda: fcntl.flock(fd, fcntl.LOCK_UN), n)


@workload(UNCONTENDED, system="fasteners.InterProcessLock", requires=("fasteners",))
def fasteners_lock(n: int) -> float:
    import fasteners

    with tempfile.TemporaryDirectory() as d:
        lock = fasteners.InterProcessLock(os.path.join(d, "lock"))
        return _timed_loop(lock.acquire, lock.release, n)


# -- hand-off: two processes, one lock, an exact shared counter -------------

def _shmkit_incr(lock_name: str, counter_name: str, k: int, go) -> None:
    import shmkit

    m = shmkit.Mutex.open(lock_name)
    c = shmkit.Array.open(counter_name)
    arr = c.array
    go.wait()
    for _ in range(k):
        with m:
            arr[0] += 1


def _mp_incr(lock, counter, k: int, go) -> None:
    go.wait()
    for _ in range(k):
        with lock:
            counter.value += 1


def _posix_incr(sem_name: str, counter, k: int, go) -> None:
    import posix_ipc

    sem = posix_ipc.Semaphore(sem_name)
    go.wait()
    for _ in range(k):
        sem.acquire()
        counter.value += 1
        sem.release()


def _run_pair(target, args, n: int) -> float:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    k = max(1, n // 2)
    procs = [ctx.Process(target=target, args=(*args, k, go), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # let both children import and reach the start line
    t0 = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode for p in procs):
        raise RuntimeError("a worker failed")
    return elapsed


@workload(HANDOFF, unit="ops/s", system="shmkit.Mutex", n=200_000)
def handoff_shmkit(n: int) -> float:
    import numpy as np

    import shmkit

    m = shmkit.Mutex(None)
    c = shmkit.Array(None, np.int64, 1)
    try:
        t = _run_pair(_shmkit_incr, (m.name, c.name), n)
        if int(c[0]) != 2 * max(1, n // 2):
            raise RuntimeError(f"counter {int(c[0])} != {n}: mutual exclusion broken")
        return t
    finally:
        for o in (m, c):
            o.close()
            o.unlink()


@workload(HANDOFF, system="multiprocessing.Lock", reference=True, n=200_000)
def handoff_mp(n: int) -> float:
    ctx = mp.get_context("spawn")
    lock, counter = ctx.Lock(), ctx.RawValue("q", 0)
    t = _run_pair(_mp_incr, (lock, counter), n)
    if counter.value != 2 * max(1, n // 2):
        raise RuntimeError("counter mismatch: mutual exclusion broken")
    return t


@workload(HANDOFF, system="posix_ipc.Semaphore", requires=("posix_ipc",), n=200_000)
def handoff_posix(n: int) -> float:
    import posix_ipc

    ctx = mp.get_context("spawn")
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    counter = ctx.RawValue("q", 0)
    try:
        t = _run_pair(_posix_incr, (sem.name, counter), n)
        if counter.value != 2 * max(1, n // 2):
            raise RuntimeError("counter mismatch: mutual exclusion broken")
        return t
    finally:
        sem.unlink()


# -- ping-pong ---------------------------------------------------------------

def _shmkit_pong(ping: str, pong: str, n: int) -> None:
    import shmkit

    a, b = shmkit.Event.open(ping), shmkit.Event.open(pong)
    for _ in range(n):
        a.wait()
        b.set()


def _mp_event_pong(a, b, n: int) -> None:
    for _ in range(n):
        a.wait()
        a.clear()
        b.set()


def _pipe_pong(conn, n: int) -> None:
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())


def _posix_pong(ping: str, pong: str, n: int) -> None:
    import posix_ipc

    a, b = posix_ipc.Semaphore(ping), posix_ipc.Semaphore(pong)
    for _ in range(n):
        a.acquire()
        b.release()


def _start(target, args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


@workload(PINGPONG, unit="µs round trip", system="shmkit.Event (auto-reset)")
def pingpong_shmkit(n: int) -> float:
    import shmkit

    a, b = shmkit.Event(None, auto_reset=True), shmkit.Event(None, auto_reset=True)
    p = _start(_shmkit_pong, (a.name, b.name, n + 1))
    try:
        a.set()
        b.wait()  # the partner is up
        t0 = time.perf_counter()
        for _ in range(n):
            a.set()
            b.wait()
        return time.perf_counter() - t0
    finally:
        p.join(10)
        for e in (a, b):
            e.close()
            e.unlink()


@workload(PINGPONG, system="multiprocessing.Pipe", reference=True)
def pingpong_pipe(n: int) -> float:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    p = _start(_pipe_pong, (there, n + 1))
    try:
        here.send_bytes(b"x")
        here.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(n):
            here.send_bytes(b"x")
            here.recv_bytes()
        return time.perf_counter() - t0
    finally:
        p.join(10)


@workload(PINGPONG, system="multiprocessing.Event")
def pingpong_mp_event(n: int) -> float:
    ctx = mp.get_context("spawn")
    a, b = ctx.Event(), ctx.Event()
    p = _start(_mp_event_pong, (a, b, n + 1))
    try:
        a.set()
        b.wait()
        b.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            a.set()
            b.wait()
            b.clear()
        return time.perf_counter() - t0
    finally:
        p.join(10)


@workload(PINGPONG, system="posix_ipc.Semaphore pair", requires=("posix_ipc",))
def pingpong_posix(n: int) -> float:
    import posix_ipc

    a = posix_ipc.Semaphore(None, posix_ipc.O_CREX)
    b = posix_ipc.Semaphore(None, posix_ipc.O_CREX)
    p = _start(_posix_pong, (a.name, b.name, n + 1))
    try:
        a.release()
        b.acquire()
        t0 = time.perf_counter()
        for _ in range(n):
            a.release()
            b.acquire()
        return time.perf_counter() - t0
    finally:
        p.join(10)
        a.unlink()
        b.unlink()
