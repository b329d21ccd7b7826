"""Loan benchmarks: a message built in place in the ring against one built in
a buffer of its own and then copied in by ``send`` or ``publish``.

* 6 MB frames (1920x1080 RGB) to 4 channel receivers, or to 4 topic
  subscribers (each gets every frame), that read them in place
  (``recv_view``): the publisher builds each frame (one write of its bytes,
  as a camera or a decoder would) either straight into a loan, or into a
  numpy buffer that ``send`` (``publish``) then copies into the ring.  The reference is one
  plain numpy copy of a frame in this process, which is what building a
  frame costs when the destination stays in the CPU's cache; a loan's target
  is at least 80% of its frames per second.  The ring's 8 frames (48 MB) do
  not fit in a cache, so a copy into 8 buffers in turn is measured too.
* 64-byte messages one way, by loan and by ``send``.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import time
from typing import Any, Callable

from benchmarks.harness import workload

FORK = multiprocessing.get_context("fork")
FRAME = 1920 * 1080 * 3
N_FRAMES = 200
RECEIVERS = 4


def _name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(8)}"  # (10,000 at once: no collision)


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


# -- 6 MB frames ---------------------------------------------------------------------------


def _frame_receiver(ready, name):
    import shmkit
    ch = shmkit.Channel.open(name)
    ready.set()
    take = ch.recv_view
    while True:
        try:
            with take(timeout=120) as mv:
                mv[0]  # touch it: a viewer reads the frame in place
        except shmkit.ChannelClosed:
            return


def _frames(n: int, loan: bool) -> float:
    import numpy as np

    import shmkit
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    built = np.empty_like(frame)
    ch = shmkit.Channel(_name(), capacity=8 * (FRAME + 64))
    try:
        for _ in range(16):  # two laps, so first-touch page faults are not timed
            ch.send(frame)
            ch.recv_view().release()
        ps = _peers(RECEIVERS, _frame_receiver, ch.name)
        t0 = time.perf_counter()
        if loan:
            for _ in range(n):
                with ch.loan(FRAME, timeout=60) as lent:
                    arr = lent.ndarray()
                    np.copyto(arr, frame)  # the frame is built in the ring
                    del arr
        else:
            for _ in range(n):
                np.copyto(built, frame)  # built in a buffer of its own...
                ch.send(built, timeout=60)  # ...then copied in
        ch.close_sending()
        return _finish(ps) - t0
    finally:
        ch.unlink()
        ch.close()


@workload("loans: 6 MB frames to 4 zero-copy receivers", unit="GB/s", n=N_FRAMES,
          system="shmkit.Channel.loan (built in place)", bytes_per_op=FRAME)
def frames_loan(n: int) -> float:
    return _frames(n, loan=True)


@workload("loans: 6 MB frames to 4 zero-copy receivers", n=N_FRAMES,
          system="shmkit.Channel.send (built, then copied)")
def frames_send(n: int) -> float:
    return _frames(n, loan=False)


@workload("loans: 6 MB frames to 4 zero-copy receivers", system="one numpy copy per frame",
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


@workload("loans: 6 MB frames to 4 zero-copy receivers", n=N_FRAMES,
          system="one numpy copy per frame into 8 buffers in turn (the ring's footprint)")
def frames_copy_cold(n: int) -> float:
    import numpy as np
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    outs = [np.empty_like(frame) for _ in range(8)]
    for out in outs:
        np.copyto(out, frame)
    t0 = time.perf_counter()
    for i in range(n):
        np.copyto(outs[i % 8], frame)
    return time.perf_counter() - t0


def _topic_frame_sub(ready, name, n):
    import shmkit
    t = shmkit.Topic.open(name)
    sub = t.subscribe()
    ready.set()
    take = sub.recv_view
    for _ in range(n):
        with take(timeout=120) as mv:
            mv[0]  # touch it: a viewer reads the frame in place


def _topic_frames(n: int, loan: bool) -> float:
    import numpy as np

    import shmkit
    frame = np.random.default_rng(0).integers(0, 255, FRAME, dtype=np.uint8)
    built = np.empty_like(frame)
    t = shmkit.Topic(_name(), capacity=8 * (FRAME + 64))
    try:
        for _ in range(16):  # two laps, so first-touch page faults are not timed
            t.publish(frame)
        ps = _peers(RECEIVERS, _topic_frame_sub, t.name, n)
        t0 = time.perf_counter()
        if loan:
            for _ in range(n):
                with t.loan(FRAME, timeout=60) as lent:
                    arr = lent.ndarray()
                    np.copyto(arr, frame)  # the frame is built in the ring
                    del arr
        else:
            for _ in range(n):
                np.copyto(built, frame)
                t.publish(built, timeout=60)
        return _finish(ps) - t0
    finally:
        t.unlink()
        t.close()


@workload("loans: 6 MB frames to 4 zero-copy subscribers", unit="GB/s", n=N_FRAMES,
          system="shmkit.Topic.loan (built in place)", bytes_per_op=FRAME)
def topic_frames_loan(n: int) -> float:
    return _topic_frames(n, loan=True)


@workload("loans: 6 MB frames to 4 zero-copy subscribers", n=N_FRAMES,
          system="shmkit.Topic.publish (built, then copied)")
def topic_frames_publish(n: int) -> float:
    return _topic_frames(n, loan=False)


@workload("loans: 6 MB frames to 4 zero-copy subscribers", system="one numpy copy per frame",
          reference=True, n=N_FRAMES)
def topic_frames_copy(n: int) -> float:
    return frames_copy(n)


@workload("loans: 6 MB frames to 4 zero-copy subscribers", n=N_FRAMES,
          system="one numpy copy per frame into 8 buffers in turn (the ring's footprint)")
def topic_frames_copy_cold(n: int) -> float:
    return frames_copy_cold(n)


# -- 64 B one way ----------------------------------------------------------------------------


def _small_receiver(ready, name, n):
    import shmkit
    ch = shmkit.Channel.open(name)
    ready.set()
    recv = ch.recv
    for _ in range(n):
        recv()


@workload("loans: 64 B one-way", unit="kops/s", system="shmkit.Channel.loan")
def small_loan(n: int) -> float:
    import shmkit
    ch = shmkit.Channel(_name(), capacity=1 << 20)
    try:
        ps = _peers(1, _small_receiver, ch.name, n)
        msg = b"m" * 64
        loan = ch.loan
        t0 = time.perf_counter()
        for _ in range(n):
            with loan(64) as lent:
                lent.buffer[:] = msg
        return _finish(ps) - t0
    finally:
        ch.unlink()
        ch.close()


@workload("loans: 64 B one-way", system="shmkit.Channel.send", reference=True)
def small_send(n: int) -> float:
    import shmkit
    ch = shmkit.Channel(_name(), capacity=1 << 20)
    try:
        ps = _peers(1, _small_receiver, ch.name, n)
        msg = b"m" * 64
        send = ch.send
        t0 = time.perf_counter()
        for _ in range(n):
            send(msg)
        return _finish(ps) - t0
    finally:
        ch.unlink()
        ch.close()
