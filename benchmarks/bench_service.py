"""Service benchmarks: request/response against pyzmq REQ/REP.

* round trip of a 64-byte request and a 64-byte reply, one client and one
  worker in another process: ``shmkit.Service`` (``Client.call``) and
  ``shmkit.aio.Service`` (both sides awaiting) against pyzmq REQ/REP over
  ``ipc://`` (if pyzmq is installed: the ``bench`` extra);
* 64-byte calls with 64 in flight from one event loop (``shmkit.aio.Client``,
  ``asyncio.gather``) against the same calls made one after another by a
  blocking client: what carrying many calls at once on one reply channel buys.

The worker is forked, waits until it is serving, and only the calls are
timed.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from benchmarks.bench_channel import _finish, _name, _peer
from benchmarks.harness import workload

MSG = b"m" * 64
RT_N = 20000


def _shmkit_worker(ready: Any, name: str, n: int) -> None:
    import shmkit
    with shmkit.Service(name) as svc, svc.worker() as w:
        ready.set()
        for _ in range(n):
            req = w.recv()
            req.reply(req.data)


@workload("service: 64 B request/response", unit="µs round trip", system="shmkit.Service",
          n=RT_N)
def rt_shmkit(n: int) -> float:
    import shmkit
    svc = shmkit.Service(_name(), capacity=1 << 16)
    try:
        p = _peer(_shmkit_worker, svc.name, n + 1)
        with svc.client(reply_capacity=1 << 16, wait_for_worker=30) as client:
            call = client.call
            call(MSG, 30)
            t0 = time.perf_counter()
            for _ in range(n):
                call(MSG, 30)
            dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        svc.unlink()
        svc.close()


def _aio_worker(ready: Any, name: str, n: int) -> None:
    import asyncio

    import shmkit.aio

    async def main() -> None:
        async with shmkit.aio.Service(name) as svc, svc.worker() as w:
            ready.set()
            for _ in range(n):
                req = await w.recv()
                req.reply(req.data)

    asyncio.run(main())


@workload("service: 64 B request/response", system="shmkit.aio.Service (both awaiting)",
          n=RT_N // 4)
def rt_aio(n: int) -> float:
    import asyncio

    import shmkit.aio
    svc = shmkit.aio.Service(_name(), capacity=1 << 16)

    async def calls(client: Any) -> float:
        call = client.call
        await call(MSG, 30)
        t0 = time.perf_counter()
        for _ in range(n):
            await call(MSG, 30)
        return time.perf_counter() - t0

    try:
        p = _peer(_aio_worker, svc.name, n + 1)
        with svc.client(reply_capacity=1 << 16, wait_for_worker=30) as client:
            dt = asyncio.run(calls(client))
        _finish(p)
        return dt
    finally:
        svc.unlink()
        svc.close()


IN_FLIGHT = 64


@workload("service: 64 B calls, 64 in flight", unit="kops/s",
          system="shmkit.aio.Client (asyncio.gather)", n=RT_N)
def pipelined_aio(n: int) -> float:
    import asyncio

    import shmkit.aio
    svc = shmkit.aio.Service(_name(), capacity=1 << 16)

    async def calls(client: Any) -> float:
        call = client.call
        await call(MSG, 30)
        t0 = time.perf_counter()
        for _ in range(n // IN_FLIGHT):
            await asyncio.gather(*[call(MSG, 30) for _ in range(IN_FLIGHT)])
        return time.perf_counter() - t0  # n // IN_FLIGHT * IN_FLIGHT calls: n rounds down

    try:
        p = _peer(_shmkit_worker, svc.name, n // IN_FLIGHT * IN_FLIGHT + 1)
        with svc.client(reply_capacity=1 << 16, wait_for_worker=30) as client:
            dt = asyncio.run(calls(client))
        _finish(p)
        return dt
    finally:
        svc.unlink()
        svc.close()


@workload("service: 64 B calls, 64 in flight", system="shmkit.Client, one call at a time",
          reference=True, n=RT_N)
def pipelined_ref(n: int) -> float:
    return rt_shmkit(n)


def _zmq_rep(ready: Any, addr: str, n: int) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.connect(addr)
    ready.set()
    recv, send = s.recv, s.send
    for _ in range(n):
        send(recv())
    s.close()
    ctx.term()


@workload("service: 64 B request/response", system="pyzmq REQ/REP ipc", requires=("zmq",),
          reference=True, n=RT_N)
def rt_zmq(n: int) -> float:
    import zmq
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    addr = f"ipc://{tempfile.gettempdir()}/{_name()}"
    req.bind(addr)
    try:
        p = _peer(_zmq_rep, addr, n + 1)
        send, recv = req.send, req.recv
        send(MSG); recv()
        t0 = time.perf_counter()
        for _ in range(n):
            send(MSG)
            recv()
        dt = time.perf_counter() - t0
        _finish(p)
        return dt
    finally:
        req.close(linger=0)
        ctx.term()
        try:
            os.unlink(addr[len("ipc://"):])
        except FileNotFoundError:
            pass
