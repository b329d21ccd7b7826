"""Service benchmarks: request/response against pyzmq REQ/REP.

* round trip of a 64-byte request and a 64-byte reply, one client and one
  worker in another process: ``shmkit.Service`` (``Client.call``) against
  pyzmq REQ/REP over ``ipc://`` (if pyzmq is installed: the ``bench`` extra).

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
