"""asyncio: a coroutine's round trip through shmkit.aio against the blocking call
and against asyncio over a socket pair (the usual way an event loop talks to
another process).

Each workload forks an echo peer (blocking calls, outside the timing) and
times ``n`` round trips of a 64-byte message made from a coroutine under
``asyncio.run`` (the blocking shmkit row makes them from plain code).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
import socket
import time
from typing import Any, Callable

from benchmarks.harness import workload

GROUP = "asyncio: 64 B round trip"
FORK = multiprocessing.get_context("fork")
MSG = b"m" * 64
RT_N = 20000  # round trips per call: the echo process is started each call


# (as in bench_channel.py; the harness loads each module on its own)
def _name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(4)}"


def _trampoline(target: Callable[..., None], ready: Any, done: Any, *args: Any) -> None:
    target(ready, *args)
    done.set()


def _peer(target: Callable[..., None], *args: Any) -> Any:
    """Fork a peer running target(ready, *args); return it once it is ready."""
    ready, done = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_trampoline, args=(target, ready, done, *args), daemon=True)
    p.start()
    p.done = done
    if not ready.wait(30):
        p.kill()
        raise RuntimeError("benchmark peer did not start")
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
        p = _peer(_shmkit_echo, a.name, b.name, n + 1)
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


def _socket_echo(ready, sock, n):
    ready.set()
    for _ in range(n):
        data = b""
        while len(data) < len(MSG):
            data += sock.recv(len(MSG) - len(data))
        sock.sendall(data)


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

    p = _peer(_socket_echo, there, n + 1)
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

    p = _peer(_socket_echo, there, n + 1)
    there.close()
    try:
        dt = asyncio.run(run())
        _finish(p)
        return dt
    finally:
        here.close()
