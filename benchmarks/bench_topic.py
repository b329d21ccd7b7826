"""Topic benchmarks: one publisher, every subscriber gets every message.

Each workload forks its subscribers, waits until they have subscribed, then
times ``n`` publishes until the last subscriber has received all ``n``:

* 64-byte messages to 1 and to 4 subscribers (messages per second, as each
  subscriber receives them), single calls and batched (``publish_many`` of
  256, ``recv_many``), against pyzmq PUB/SUB over ``ipc://`` (if pyzmq
  is installed; high-water marks off, so it drops nothing) and against one
  ``multiprocessing.Queue`` per subscriber;
* 6 MB frames to 4 subscribers that read them in place (``recv_view``),
  against one plain numpy copy of a frame per publish in this process (what
  the cheapest hand-off that copies would cost) and against pyzmq PUB/SUB
  over ``ipc://`` sending and receiving each frame without a copy of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import tempfile
import time
from typing import Any, Callable

from benchmarks.harness import workload

FORK = multiprocessing.get_context("fork")
MSG = b"m" * 64
FRAME = 6_000_000
N_SMALL = 100_000
BATCH = 256
N_FRAMES = 200


def _name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(4)}"


def _trampoline(target: Callable[..., None], ready: Any, done: Any, *args: Any) -> None:
    target(ready, *args)
    done.set()


def _peers(k: int, target: Callable[..., None], *args: Any) -> list:
    """Fork k peers running target(ready, *args); return them once all are ready."""
    out = []
    for _ in range(k):
        ready, done = FORK.Event(), FORK.Event()
        p = FORK.Process(target=_trampoline, args=(target, ready, done, *args), daemon=True)
        p.start()
        p.done = done
        p.ready = ready
        out.append(p)
    for p in out:
        if not p.ready.wait(30):
            for q in out:
                q.kill()
            raise RuntimeError("benchmark peer did not start")
    return out


def _finish(ps: list) -> float:
    """Wait until every peer has done its part; return that moment."""
    ok = all(p.done.wait(300) for p in ps)
    t = time.perf_counter()
    for p in ps:
        p.join(30)
        if p.is_alive():
            p.kill()
            ok = False
    if not ok:
        raise RuntimeError("benchmark peer did not finish")
    return t


# -- 64 B fan-out ---------------------------------------------------------------------


def _topic_sub(ready, name, n, batch=False):
    import shmkit
    t = shmkit.Topic.open(name)
    sub = t.subscribe()
    ready.set()
    if batch:
        recv_many = sub.recv_many
        got = 0
        while got < n:
            got += len(recv_many())
        return
    recv = sub.recv
    for _ in range(n):
        recv()


def _topic_fanout(k: int, n: int, batch: int = 0) -> float:
    """n messages to k subscribers: one publish each, or publish_many of
    `batch` with every subscriber calling recv_many."""
    import shmkit
    t = shmkit.Topic(_name(), capacity=1 << 20)
    try:
        ps = _peers(k, _topic_sub, t.name, n, bool(batch))
        if batch:
            msgs = [MSG] * batch
            publish_many = t.publish_many
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                publish_many(msgs if n - i >= batch else msgs[:n - i])
        else:
            publish = t.publish
            t0 = time.perf_counter()
            for _ in range(n):
                publish(MSG)
        return _finish(ps) - t0
    finally:
        t.unlink()
        t.close()


HELLO = b"hello"


def _zmq_sub(ready, addr, n, copy=True):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(addr)
    s.recv()  # the publisher's hello: subscribed and connected
    ready.set()
    recv = s.recv
    got = 0
    while got < n:
        m = recv(copy=copy)  # a frame in place (copy=False), as the Topic's view
        if len(m) != len(HELLO):
            got += 1
    s.close()
    ctx.term()


def _zmq_fanout(k: int, n: int, payload: Any = MSG) -> float:
    """k subscribers; payload is sent as it is (without a copy when large)."""
    import threading

    import zmq
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    addr = f"ipc://{tempfile.gettempdir()}/{_name()}"
    pub.bind(addr)
    stop = threading.Event()

    def hello():  # until every subscriber got one (zmq's late joiner)
        while not stop.is_set():
            pub.send(HELLO)
            time.sleep(0.01)

    try:
        h = threading.Thread(target=hello)
        h.start()
        try:
            ps = _peers(k, _zmq_sub, addr, n, len(payload) < 65536)
        finally:
            stop.set()
            h.join()
        send = pub.send
        copy = len(payload) < 65536
        t0 = time.perf_counter()
        for _ in range(n):
            send(payload, copy=copy)
        return _finish(ps) - t0
    finally:
        pub.close(linger=0)
        ctx.term()
        try:
            os.unlink(addr[len("ipc://"):])
        except FileNotFoundError:
            pass


def _mpq_sub(ready, q, n):
    ready.set()
    get = q.get
    for _ in range(n):
        get()


def _mpq_fanout(k: int, n: int) -> float:
    qs = [FORK.Queue() for _ in range(k)]
    ps = [_peers(1, _mpq_sub, q, n)[0] for q in qs]
    puts = [q.put for q in qs]
    t0 = time.perf_counter()
    for _ in range(n):
        for put in puts:
            put(MSG)
    return _finish(ps) - t0


for _k in (1, 4):
    _bench = f"topic: 64 B fan-out to {_k} subscriber{'s' if _k > 1 else ''} (per subscriber)"
    workload(_bench, unit="Mops/s", system="shmkit.Topic", n=N_SMALL)(
        lambda n, k=_k: _topic_fanout(k, n))
    workload(_bench, system=f"shmkit.Topic publish_many/recv_many ({BATCH} a batch)",
             n=N_SMALL * 4)(lambda n, k=_k: _topic_fanout(k, n, BATCH))
    workload(_bench, system="pyzmq PUB/SUB ipc", requires=("zmq",), n=N_SMALL)(
        lambda n, k=_k: _zmq_fanout(k, n))
    workload(_bench, system="mp.Queue per subscriber", reference=True, n=N_SMALL // 4)(
        lambda n, k=_k: _mpq_fanout(k, n))


# -- 6 MB frames, zero copy -------------------------------------------------------------


def _frame_sub(ready, name, n):
    import shmkit
    t = shmkit.Topic.open(name)
    sub = t.subscribe()
    ready.set()
    take = sub.recv_view
    for _ in range(n):
        with take() as mv:
            mv[0]  # touch it: a viewer reads the frame in place


@workload("topic: 6 MB frames to 4 zero-copy subscribers", unit="GB/s", system="shmkit.Topic",
          n=N_FRAMES, bytes_per_op=FRAME)
def frames_topic(n: int) -> float:
    import numpy as np

    import shmkit
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    t = shmkit.Topic(_name(), capacity=8 * (FRAME + 64))
    try:
        for _ in range(8):  # one lap, so first-touch page faults are not timed
            t.publish(frame)
        ps = _peers(4, _frame_sub, t.name, n)
        t0 = time.perf_counter()
        for _ in range(n):
            t.publish(frame, timeout=60)
        return _finish(ps) - t0
    finally:
        t.unlink()
        t.close()


@workload("topic: 6 MB frames to 4 zero-copy subscribers",
          system="pyzmq PUB/SUB ipc (frames sent and received without a copy)",
          requires=("zmq",), n=N_FRAMES // 4)
def frames_zmq(n: int) -> float:
    import numpy as np
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    return _zmq_fanout(4, n, frame)


@workload("topic: 6 MB frames to 4 zero-copy subscribers", system="one numpy copy per frame",
          reference=True, n=N_FRAMES)
def frames_copy(n: int) -> float:
    import numpy as np
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    out = np.empty_like(frame)
    np.copyto(out, frame)
    t0 = time.perf_counter()
    for _ in range(n):
        np.copyto(out, frame)
    return time.perf_counter() - t0
