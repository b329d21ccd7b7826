"""asyncio: coroutines talking through shmkit.aio against the blocking call and
against asyncio over sockets (the usual way an event loop talks to another
process) and zmq.asyncio.

The round trips fork an echo peer that awaits too (outside the timing) and
time ``n`` round trips of a 64-byte message made from a coroutine under
``asyncio.run`` (the blocking shmkit row makes them from plain code, against a
blocking peer).  The one-way rows time ``n`` 64-byte messages from the
receiving coroutine's first message to its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import secrets
import socket
import threading
import time
from typing import Any, Callable

from benchmarks.harness import workload

GROUP = "asyncio: 64 B round trip"
FORK = multiprocessing.get_context("fork")
MSG = b"m" * 64
RT_N = 20000  # round trips per call: the echo process is started each call


# (as in bench_channel.py; the harness loads each module on its own)
def _name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(8)}"  # (10,000 at once: no collision)


def _trampoline(target: Callable[..., None], ready: Any, done: Any, *args: Any) -> None:
    target(ready, *args)
    done.set()


def _peer(target: Callable[..., None], *args: Any, context: Any = FORK) -> Any:
    """Fork a peer running target(ready, *args); return it once it is ready."""
    ready, done = context.Event(), context.Event()
    p = context.Process(target=_trampoline, args=(target, ready, done, *args), daemon=True)
    p.start()
    p.done = done
    deadline = time.monotonic() + 120
    while not ready.wait(0.1):
        if not p.is_alive() or time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"benchmark peer did not start (exit code {p.exitcode})")
    return p


def _finish(p: Any) -> None:
    finished = p.done.wait(120)
    p.join(30)
    if not finished or p.is_alive():
        p.kill()
        raise RuntimeError("benchmark peer did not finish")


def _shmkit_echo(ready, a, b, n):
    import shmkit
    ca, cb = shmkit.Channel.open(a), shmkit.Channel.open(b)
    ready.set()
    recv, send = ca.recv, cb.send
    for _ in range(n):
        send(recv())


def _shmkit_echo_aio(ready, a, b, n):
    import shmkit.aio

    async def run() -> None:
        ca, cb = shmkit.aio.Channel.open(a), shmkit.aio.Channel.open(b)
        ready.set()
        recv, send = ca.recv, cb.send
        for _ in range(n):
            await send(await recv())

    asyncio.run(run())


@workload(GROUP, unit="µs round trip", system="shmkit.aio.Channel (await)", n=RT_N // 2)
def rt_aio(n: int) -> float:
    import shmkit.aio

    a = shmkit.aio.Channel(_name(), capacity=1 << 16)
    b = shmkit.aio.Channel(_name(), capacity=1 << 16)

    async def run() -> float:
        await a.send(MSG)
        await b.recv()
        t0 = time.perf_counter()
        for _ in range(n):
            await a.send(MSG)
            await b.recv()
        return time.perf_counter() - t0

    try:
        p = _peer(_shmkit_echo_aio, a.name, b.name, n + 1)
        dt = asyncio.run(run())
        _finish(p)
        return dt
    finally:
        for c in (a, b):
            c.unlink()
            c.close()


@workload(GROUP, system="shmkit.Channel (blocking)", n=RT_N)
def rt_sync(n: int) -> float:
    import shmkit

    a, b = shmkit.Channel(_name(), capacity=1 << 16), shmkit.Channel(_name(), capacity=1 << 16)
    try:
        p = _peer(_shmkit_echo, a.name, b.name, n + 1)
        a.send(MSG)
        b.recv()
        t0 = time.perf_counter()
        for _ in range(n):
            a.send(MSG)
            b.recv()
        dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        for c in (a, b):
            c.unlink()
            c.close()


def _streams_echo(ready, sock, n):
    async def run() -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        ready.set()
        for _ in range(n):
            writer.write(await reader.readexactly(len(MSG)))
        writer.close()

    asyncio.run(run())


@workload(GROUP, system="asyncio streams over socketpair", reference=True, n=RT_N // 2)
def rt_asyncio_socketpair(n: int) -> float:
    here, there = socket.socketpair()

    async def run() -> float:
        reader, writer = await asyncio.open_connection(sock=here)
        writer.write(MSG)
        await reader.readexactly(len(MSG))
        t0 = time.perf_counter()
        for _ in range(n):
            writer.write(MSG)
            await reader.readexactly(len(MSG))
        dt = time.perf_counter() - t0
        writer.close()
        return dt

    p = _peer(_streams_echo, there, n + 1)
    there.close()
    try:
        dt = asyncio.run(run())
        _finish(p)
        return dt
    finally:
        here.close()


@workload(GROUP, system="asyncio sock_recv over socketpair", n=RT_N // 2)
def rt_asyncio_sock(n: int) -> float:
    here, there = socket.socketpair()
    here.setblocking(False)

    async def run() -> float:
        loop = asyncio.get_running_loop()

        async def trip() -> None:
            await loop.sock_sendall(here, MSG)
            got = 0
            while got < len(MSG):
                got += len(await loop.sock_recv(here, len(MSG) - got))

        await trip()
        t0 = time.perf_counter()
        for _ in range(n):
            await trip()
        return time.perf_counter() - t0

    p = _peer(_streams_echo, there, n + 1)
    there.close()
    try:
        dt = asyncio.run(run())
        _finish(p)
        return dt
    finally:
        here.close()


def _zmq_rep(ready, addr, n):
    import zmq
    import zmq.asyncio

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        rep = ctx.socket(zmq.REP)
        rep.bind(addr)
        ready.set()
        for _ in range(n):
            await rep.send(await rep.recv())
        rep.close(linger=0)
        ctx.term()

    asyncio.run(run())


@workload(GROUP, system="zmq.asyncio REQ/REP over ipc", requires=("zmq",), n=RT_N // 2)
def rt_zmq_asyncio(n: int) -> float:
    import tempfile

    import zmq
    import zmq.asyncio

    with tempfile.TemporaryDirectory() as d:
        addr = f"ipc://{d}/rep"
        p = _peer(_zmq_rep, addr, n + 1)
        ctx = zmq.asyncio.Context()
        req = ctx.socket(zmq.REQ)
        req.connect(addr)

        async def run() -> float:
            await req.send(MSG)
            await req.recv()
            t0 = time.perf_counter()
            for _ in range(n):
                await req.send(MSG)
                await req.recv()
            return time.perf_counter() - t0

        try:
            dt = asyncio.run(run())
            _finish(p)
            return dt
        finally:
            req.close(linger=0)
            ctx.term()


# -- one way: a coroutine sends, a coroutine in another process receives ------------
#
# The receiver times from its first message to its last and hands the seconds
# back through ``took``; asyncio streams carry length-prefixed frames (a 4-byte
# length, then the payload), read with readexactly as a framed protocol is.

ONE_WAY = "asyncio: 64 B one-way"
OW_N = 200000
OW_BATCH = 256


def _ow_peer(target: Callable[..., Any], took: Any, *args: Any) -> Any:
    return _peer(_ow_trampoline, target, took, *args)


def _ow_trampoline(ready, target, took, *args):
    async def run() -> None:
        took.value = await target(ready, *args)

    asyncio.run(run())


def _ow_result(p: Any, took: Any) -> float:
    _finish(p)
    return took.value


async def _shmkit_sink(ready, name, n, batched):
    import shmkit.aio

    ch = shmkit.aio.Channel.open(name)
    ready.set()
    await ch.recv()
    t0 = time.perf_counter()
    if batched:
        got = 0
        while got < n:
            got += len(await ch.recv_many(OW_BATCH * 4))
    else:
        recv = ch.recv
        for _ in range(n):
            await recv()
    return time.perf_counter() - t0


def _shmkit_one_way(n: int, batched: bool) -> float:
    import shmkit.aio

    ch = shmkit.aio.Channel(_name(), capacity=1 << 20)
    took = FORK.Value("d")

    async def run() -> None:
        if batched:
            batch = [MSG] * OW_BATCH
            await ch.send(MSG)
            for _ in range(n // OW_BATCH):
                await ch.send_many(batch)
        else:
            send = ch.send
            for _ in range(n + 1):
                await send(MSG)

    try:
        p = _ow_peer(_shmkit_sink, took, ch.name, n // OW_BATCH * OW_BATCH if batched else n,
                     batched)
        asyncio.run(run())
        return _ow_result(p, took)
    finally:
        ch.unlink()
        ch.close()


@workload(ONE_WAY, unit="kops/s", system="shmkit.aio.Channel: await send / await recv",
          n=OW_N)
def ow_aio(n: int) -> float:
    return _shmkit_one_way(n, False)


@workload(ONE_WAY, unit="kops/s",
          system=f"shmkit.aio.Channel: send_many / recv_many ({OW_BATCH} a batch)",
          n=OW_N // OW_BATCH * OW_BATCH)
def ow_aio_batched(n: int) -> float:
    return _shmkit_one_way(n, True)


async def _streams_sink(ready, sock, n):
    reader, writer = await asyncio.open_connection(sock=sock)
    ready.set()
    frame = await reader.readexactly(4 + len(MSG))
    assert frame[4:] == MSG
    t0 = time.perf_counter()
    for _ in range(n):
        length = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(length)
    dt = time.perf_counter() - t0
    writer.close()
    return dt


@workload(ONE_WAY, unit="kops/s", system="asyncio streams over a socketpair, framed",
          reference=True, n=OW_N)
def ow_streams(n: int) -> float:
    here, there = socket.socketpair()
    took = FORK.Value("d")

    async def run() -> None:
        _, writer = await asyncio.open_connection(sock=here)
        for i in range(n + 1):
            writer.write(len(MSG).to_bytes(4, "big") + MSG)  # framed as each message is
            if i % OW_BATCH == 0:
                await writer.drain()
        writer.close()
        await writer.wait_closed()  # the last frames are written before the loop ends

    try:
        p = _ow_peer(_streams_sink, took, there, n)
        there.close()
        asyncio.run(run())
        return _ow_result(p, took)
    finally:
        here.close()


async def _zmq_sink(ready, addr, n):
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(addr)
    ready.set()
    await pull.recv()
    t0 = time.perf_counter()
    for _ in range(n):
        await pull.recv()
    dt = time.perf_counter() - t0
    pull.close(linger=0)
    ctx.term()
    return dt


@workload(ONE_WAY, unit="kops/s", system="zmq.asyncio PUSH/PULL over ipc", requires=("zmq",),
          n=OW_N)
def ow_zmq(n: int) -> float:
    import tempfile

    import zmq
    import zmq.asyncio

    took = FORK.Value("d")
    with tempfile.TemporaryDirectory() as d:
        addr = f"ipc://{d}/pull"
        p = _ow_peer(_zmq_sink, took, addr, n)
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(addr)

        async def run() -> None:
            for _ in range(n + 1):
                await push.send(MSG)

        try:
            asyncio.run(run())
            return _ow_result(p, took)
        finally:
            push.close(linger=-1)  # deliver what is queued before the context ends
            ctx.term()


# -- 10,000 tasks awaiting in one process -------------------------------------------
#
# Each task awaits recv on its own channel: 10,000 futex waits in the loop's
# io_uring, or, with SHMKIT_AIO_WAKER=threads, 79 watcher threads
# (shmkit.aio.MAX_WATCHERS is raised for the run).  Reported beside the time
# to wake them all (per task): the threads, the resident memory and the CPU
# seconds the process burns in IDLE_S seconds while every task waits.

TASKS = 10000
IDLE_S = 10.0


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _cpu_seconds() -> float:
    """utime + stime of this process (every thread), from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raise_fd_limit(needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY
                                                    else min(hard, max(needed, soft)), hard))


def _waker(ready, go, names):
    """Open every channel (outside the timing), then send each its index.
    Spawned, not forked: a fork would inherit the n descriptors of the
    benchmark's own handles and open n more."""
    import shmkit
    chans = [shmkit.Channel.open(nm) for nm in names]
    ready.set()
    go.wait(120)
    for i, c in enumerate(chans):
        c.send(i.to_bytes(4, "little"))
    for c in chans:
        c.close()


def many_tasks(n: int, idle: float = IDLE_S) -> dict:
    """n tasks, each awaiting recv on its own channel: the figures of the
    idle wait, then the time from "send them all" until every task has its
    message (each task's message is checked)."""
    import shmkit.aio

    _raise_fd_limit(2 * n + 256)
    watchers_before = shmkit.aio.MAX_WATCHERS
    shmkit.aio.MAX_WATCHERS = max(watchers_before, -(-n // 127) + 1)
    rss0, threads0 = _proc_status("VmRSS"), threading.active_count()
    chans = [shmkit.aio.Channel(_name(), capacity=64) for _ in range(n)]
    spawn = multiprocessing.get_context("spawn")
    go = spawn.Event()
    try:
        p = _peer(_waker, go, [c.name for c in chans], context=spawn)

        async def run() -> dict:
            async def one(i: int) -> bool:
                return int.from_bytes(await chans[i].recv(timeout=600), "little") == i

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            while not any(t.done() for t in tasks):  # until every task sleeps on its channel
                await asyncio.sleep(0.05)
                if all(c.statistics()["receivers_waiting"] for c in chans):
                    break
            await asyncio.sleep(0.5)
            out = {"io_uring": float(shmkit.aio.waker() == "io_uring"),
                   "threads": threading.active_count(),
                   "threads_proc": _proc_status("Threads"),
                   "watchers": shmkit.aio.watcher_count(),
                   "rss_mib": _proc_status("VmRSS") / 1024,
                   "rss_added_mib": (_proc_status("VmRSS") - rss0) / 1024}
            cpu0, pcpu0 = _cpu_seconds(), time.process_time()
            await asyncio.sleep(idle)
            out["idle_cpu_s"] = _cpu_seconds() - cpu0
            out["idle_process_time_s"] = time.process_time() - pcpu0
            t0 = time.perf_counter()
            go.set()
            ok = await asyncio.gather(*tasks)
            out["seconds"] = time.perf_counter() - t0
            if not all(ok):
                raise RuntimeError(f"{ok.count(False)} of {n} tasks got another's message")
            return out

        out = asyncio.run(run())
        _finish(p)
        out["threads_before"] = threads0
        return out
    finally:
        shmkit.aio.MAX_WATCHERS = watchers_before
        for c in chans:  # every one, whatever another's unlink raised
            with contextlib.suppress(shmkit.NotFoundError):
                c.unlink()
            c.close()


def _many_tasks_child(n: int, out: Any, waker: str) -> None:
    os.environ["SHMKIT_AIO_WAKER"] = waker  # read at the loop's first await
    out.put(many_tasks(n))


MANY = "asyncio: 10,000 tasks awaiting recv, one channel each"


@workload(MANY, unit="µs/op", system="shmkit.aio.Channel (io_uring)", n=TASKS)
def many_tasks_aio(n: int) -> dict:
    return _many_tasks_in_a_process(n, "io_uring")


@workload(MANY, unit="µs/op", system="shmkit.aio.Channel (SHMKIT_AIO_WAKER=threads)", n=TASKS)
def many_tasks_aio_threads(n: int) -> dict:
    return _many_tasks_in_a_process(n, "threads")


def _many_tasks_in_a_process(n: int, waker: str) -> dict:
    # In a process of its own: the threads, memory and idle CPU counted are
    # the tasks' and watchers' alone, not the benchmark runner's (whose
    # progress display redraws ten times a second).
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    p = spawn.Process(target=_many_tasks_child, args=(n, out, waker))
    p.start()
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                return out.get(timeout=1)
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"the workload's process ended (exit code "
                                       f"{p.exitcode}) without a result") from None
                if time.monotonic() > deadline:
                    raise
    finally:
        p.join(60)
        if p.exitcode is None:
            p.kill()


# -- oversubscribed: round trips beside busy-looping processes ------------------------
#
# The two peers of a round trip share the cores with BUSY processes per core
# that spin in pure Python (started before the peers, killed after): the
# case where a spinning wait loses its core and a sleeping one must be
# scheduled back in.  Four per core against multiprocessing.Pipe, one per
# core against posix_ipc's MessageQueue (both anchors run in both).

def _spin_forever() -> None:
    while True:
        pass


class _Busy:
    """``with _Busy(k):`` k busy-looping processes per usable core."""

    def __init__(self, per_core: int) -> None:
        self.count = per_core * len(os.sched_getaffinity(0))
        self.procs: list[Any] = []

    def __enter__(self) -> "_Busy":
        try:
            for _ in range(self.count):
                p = FORK.Process(target=_spin_forever, daemon=True)
                p.start()
                self.procs.append(p)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(30)


def _event_echo(ready, a, b, n):
    import shmkit
    ea, eb = shmkit.Event(a), shmkit.Event(b)
    ready.set()
    wait, set_ = ea.wait, eb.set
    for _ in range(n):
        wait()
        set_()


def rt_event(n: int) -> float:
    import shmkit

    a, b = shmkit.Event(_name(), auto_reset=True), shmkit.Event(_name(), auto_reset=True)
    try:
        p = _peer(_event_echo, a.name, b.name, n + 1)
        a.set()
        b.wait()
        t0 = time.perf_counter()
        for _ in range(n):
            a.set()
            b.wait()
        dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        for e in (a, b):
            e.close()
            e.unlink()


def rt_event_aio(n: int) -> float:
    import shmkit.aio

    a = shmkit.aio.Event(_name(), auto_reset=True)
    b = shmkit.aio.Event(_name(), auto_reset=True)

    async def run() -> float:
        a.set()
        await b.wait()
        t0 = time.perf_counter()
        for _ in range(n):
            a.set()
            await b.wait()
        return time.perf_counter() - t0

    try:
        p = _peer(_event_echo, a.name, b.name, n + 1)
        dt = asyncio.run(run())
        _finish(p)
        return dt
    finally:
        for e in (a, b):
            e.close()
            e.unlink()


def _pipe_echo(ready, conn, n):
    ready.set()
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())


def rt_pipe(n: int) -> float:
    here, there = FORK.Pipe()
    p = _peer(_pipe_echo, there, n + 1)
    there.close()
    try:
        here.send_bytes(MSG)
        here.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(n):
            here.send_bytes(MSG)
            here.recv_bytes()
        dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        here.close()


def _mq_echo(ready, a, b, n):
    import posix_ipc
    qa, qb = posix_ipc.MessageQueue(a), posix_ipc.MessageQueue(b)
    ready.set()
    for _ in range(n):
        qb.send(qa.receive()[0])


def rt_posix_mq(n: int) -> float:
    import posix_ipc
    qa = posix_ipc.MessageQueue("/" + _name(), posix_ipc.O_CREX, max_message_size=64)
    qb = posix_ipc.MessageQueue("/" + _name(), posix_ipc.O_CREX, max_message_size=64)
    try:
        p = _peer(_mq_echo, qa.name, qb.name, n + 1)
        qa.send(MSG)
        qb.receive()
        t0 = time.perf_counter()
        for _ in range(n):
            qa.send(MSG)
            qb.receive()
        dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        for q in (qa, qb):
            q.unlink()
            q.close()


OVER_N = 2000  # round trips per call: each may wait for a time slice of the busy ones


def _oversubscribed(per_core: int, reference: str) -> None:
    bench = f"oversubscribed, {per_core} busy process{'es' if per_core > 1 else ''}/core: " \
            "64 B round trip"
    systems: list[tuple[str, Callable[[int], float], tuple[str, ...]]] = [
        ("shmkit.Channel", rt_sync, ()),
        ("shmkit.aio.Channel (await)", rt_aio, ()),
        ("shmkit.Event", rt_event, ()),
        ("shmkit.aio.Event (await)", rt_event_aio, ()),
        ("multiprocessing.Pipe", rt_pipe, ()),
        ("posix_ipc.MessageQueue", rt_posix_mq, ("posix_ipc",)),
    ]
    for system, inner, requires in systems:
        def run(n: int, inner: Callable[[int], float] = inner) -> float:
            with _Busy(per_core):
                return inner(n)

        run.__name__ = f"over{per_core}_{inner.__name__}"
        workload(bench, unit="µs round trip", system=system, requires=requires,
                 reference=system == reference, n=OVER_N)(run)


_oversubscribed(4, "multiprocessing.Pipe")
_oversubscribed(1, "posix_ipc.MessageQueue")
