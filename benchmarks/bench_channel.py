"""Channel and Queue benchmarks: shmkit against the usual ways to pass messages.

Every workload runs a peer process (forked, so start-up is cheap and outside
the timing), waits until it is ready, then times ``n`` operations:

* round trip of a 64-byte message (ping-pong through two one-way paths),
  with iceoryx2's publish/subscribe as an anchor where it is installed (its
  Python binding does not block in receive: both of its sides poll);
* the same round trip timed one by one, for its p50/p90/p99/p99.9 and mean;
* one-way throughput of 64-byte messages, single calls and batched calls;
* one-way throughput of 1 MiB and 64 MiB payloads in GB/s, copying and
  zero-copy, against a hand-made ``multiprocessing.shared_memory`` + numpy
  copy and one in-process numpy copy (the memory-bandwidth limit);
* ``shmkit.Queue`` against ``multiprocessing.Queue`` with small objects.

posix_ipc message queues are left out of the large-payload runs: the kernel
caps a message at ``/proc/sys/fs/mqueue/msgsize_max`` (8 KiB by default).
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from benchmarks.harness import workload

FORK = multiprocessing.get_context("fork")
MSG = b"m" * 64
BATCH = 256
# distinct objects, so that pickling a list of them cannot share one copy
BATCH_MSGS = [b"m" * 62 + i.to_bytes(2, "little") for i in range(BATCH)]
RT_N = 20000  # round trips per call: the echo process is started each call
MiB = 1 << 20


def _name() -> str:
    return f"bench-{os.getpid()}-{secrets.token_hex(8)}"  # (10,000 at once: no collision)


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


def _finish(p: Any) -> float:
    """Wait until the peer has done its part; return that moment (process exit
    is not timed)."""
    finished = p.done.wait(120)
    t = time.perf_counter()
    p.join(30)
    if not finished or p.is_alive():
        p.kill()
        raise RuntimeError("benchmark peer did not finish")
    return t


# -- round trip -------------------------------------------------------------------


def _shmkit_echo(ready, a, b, n):
    import shmkit
    ca, cb = shmkit.Channel.open(a), shmkit.Channel.open(b)
    ready.set()
    recv, send = ca.recv, cb.send
    for _ in range(n):
        send(recv())


@contextmanager
def _shmkit_round_trips(n: int) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
    """(send, recv) of a warmed-up shmkit round trip through an echo process."""
    import shmkit
    a, b = shmkit.Channel(_name(), capacity=1 << 16), shmkit.Channel(_name(), capacity=1 << 16)
    try:
        p = _peer(_shmkit_echo, a.name, b.name, n + 1)
        send, recv = a.send, b.recv
        send(MSG); recv()
        yield (lambda: send(MSG)), recv
        _finish(p)
    finally:
        for c in (a, b):
            c.unlink(); c.close()


def _loop(n: int, send: Callable[[], Any], recv: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        send()
        recv()
    return time.perf_counter() - t0


@workload("channel: 64 B round trip", unit="µs round trip", system="shmkit.Channel", n=RT_N)
def rt_shmkit(n: int) -> float:
    with _shmkit_round_trips(n) as (send, recv):
        return _loop(n, send, recv)


def _pipe_echo(ready, conn, n):
    ready.set()
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())


@contextmanager
def _pipe_round_trips(n: int) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
    here, there = FORK.Pipe()
    p = _peer(_pipe_echo, there, n + 1)
    here.send_bytes(MSG); here.recv_bytes()
    yield (lambda: here.send_bytes(MSG)), here.recv_bytes
    _finish(p)


@workload("channel: 64 B round trip", system="multiprocessing.Pipe", reference=True, n=RT_N)
def rt_pipe(n: int) -> float:
    with _pipe_round_trips(n) as (send, recv):
        return _loop(n, send, recv)


def _queue_echo(ready, a, b, n):
    ready.set()
    for _ in range(n):
        b.put(a.get())


@workload("channel: 64 B round trip", system="multiprocessing.Queue", n=RT_N // 4)
def rt_mp_queue(n: int) -> float:
    a, b = FORK.Queue(), FORK.Queue()
    p = _peer(_queue_echo, a, b, n + 1)
    a.put(MSG); b.get()
    t0 = time.perf_counter()
    for _ in range(n):
        a.put(MSG)
        b.get()
    dt = time.perf_counter() - t0
    _finish(p)
    return dt


@workload("channel: 64 B round trip", system="faster_fifo.Queue", requires=("faster_fifo",),
          n=RT_N // 4)
def rt_faster_fifo(n: int) -> float:
    import faster_fifo
    a, b = faster_fifo.Queue(1 << 20), faster_fifo.Queue(1 << 20)
    p = _peer(_queue_echo, a, b, n + 1)
    a.put(MSG); b.get()
    t0 = time.perf_counter()
    for _ in range(n):
        a.put(MSG)
        b.get()
    dt = time.perf_counter() - t0
    _finish(p)
    return dt


def _mq_echo(ready, a, b, n):
    import posix_ipc
    qa, qb = posix_ipc.MessageQueue(a), posix_ipc.MessageQueue(b)
    ready.set()
    for _ in range(n):
        qb.send(qa.receive()[0])


@contextmanager
def _mq_round_trips(n: int) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
    import posix_ipc
    qa = posix_ipc.MessageQueue("/" + _name(), posix_ipc.O_CREX, max_message_size=64)
    qb = posix_ipc.MessageQueue("/" + _name(), posix_ipc.O_CREX, max_message_size=64)
    try:
        p = _peer(_mq_echo, qa.name, qb.name, n + 1)
        qa.send(MSG); qb.receive()
        yield (lambda: qa.send(MSG)), qb.receive
        _finish(p)
    finally:
        for q in (qa, qb):
            q.unlink(); q.close()


@workload("channel: 64 B round trip", system="posix_ipc.MessageQueue", requires=("posix_ipc",),
          n=RT_N)
def rt_posix_mq(n: int) -> float:
    with _mq_round_trips(n) as (send, recv):
        return _loop(n, send, recv)


def _iox_ports(a: str, b: str) -> tuple[Any, Any, Any]:
    """An iceoryx2 node and two publish/subscribe services of 64-byte payloads."""
    import ctypes

    import iceoryx2 as iox2
    iox2.set_log_level_from_env_or(iox2.LogLevel.Warn)
    payload = ctypes.c_uint8 * 64
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    sa, sb = (node.service_builder(iox2.ServiceName.new(x)).publish_subscribe(payload)
              .open_or_create() for x in (a, b))
    return node, sa, sb


def _iox_echo(ready, a: str, b: str) -> None:
    """Send back every sample of service a on service b, polling (as the
    binding's receive does not block), until a sample starting with 0."""
    node, sa, sb = _iox_ports(a, b)
    sub, pub = sa.subscriber_builder().create(), sb.publisher_builder().create()
    ready.set()
    receive = sub.receive
    while True:
        while (sample := receive()) is None:
            pass
        data = sample.payload().contents
        stop = data[0] == 0
        pub.loan_uninit().write_payload(data).send()
        del sample
        if stop:
            return


class _Iceoryx2:
    """The calling side of an iceoryx2 round trip: ping on a, pong on b."""

    def __init__(self) -> None:
        import ctypes
        self.a, self.b = f"bench/{_name()}/a", f"bench/{_name()}/b"
        self.p = _peer(_iox_echo, self.a, self.b)
        self.node, sa, sb = _iox_ports(self.a, self.b)
        self.pub, self.sub = sa.publisher_builder().create(), sb.subscriber_builder().create()
        self.msg = (ctypes.c_uint8 * 64)(*MSG)
        # Until the two sides see each other, a sample may reach nobody: ping
        # until a pong comes back, then drop any extra pongs.
        deadline = time.monotonic() + 30
        while not self._pong(0.01):
            if time.monotonic() > deadline:
                raise RuntimeError("iceoryx2 echo did not answer")
        time.sleep(0.05)
        while self.sub.receive() is not None:
            pass

    def _pong(self, wait: float) -> bool:
        self.send()
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if self.sub.receive() is not None:
                return True
        return False

    def send(self) -> None:
        self.pub.loan_uninit().write_payload(self.msg).send()

    def recv(self) -> None:
        receive = self.sub.receive
        while (sample := receive()) is None:
            pass
        del sample

    def close(self) -> None:
        import ctypes
        self.pub.loan_uninit().write_payload((ctypes.c_uint8 * 64)()).send()  # stop
        _finish(self.p)


@workload("channel: 64 B round trip", system="iceoryx2 publish/subscribe (both polling)",
          requires=("iceoryx2",), n=RT_N)
def rt_iceoryx2(n: int) -> float:
    iox = _Iceoryx2()
    try:
        return _loop(n, iox.send, iox.recv)
    finally:
        iox.close()


# -- round-trip latency distribution --------------------------------------------------------

LAT = "channel: 64 B round-trip latency, each timed (p50/p90/p99/p99.9 in notes)"


def _percentiles(samples_ns: list[int]) -> dict:
    """The run's seconds and its latency percentiles and mean, in µs."""
    xs = sorted(samples_ns)
    n = len(xs)

    def at(q: float) -> float:
        return xs[min(n - 1, int(q * n))] / 1e3

    total = sum(xs)
    return {"seconds": total / 1e9, "p50_us": at(0.50), "p90_us": at(0.90),
            "p99_us": at(0.99), "p999_us": at(0.999), "mean_us": total / n / 1e3}


def _timed_round_trips(n: int, send: Callable[[], Any], recv: Callable[[], Any]) -> dict:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t = clock()
        send()
        recv()
        samples[i] = clock() - t
    return _percentiles(samples)


@workload(LAT, unit="µs round trip", system="shmkit.Channel", n=4 * RT_N)
def lat_shmkit(n: int) -> dict:
    with _shmkit_round_trips(n) as (send, recv):
        return _timed_round_trips(n, send, recv)


@workload(LAT, system="multiprocessing.Pipe", reference=True, n=RT_N)
def lat_pipe(n: int) -> dict:
    with _pipe_round_trips(n) as (send, recv):
        return _timed_round_trips(n, send, recv)


@workload(LAT, system="iceoryx2 publish/subscribe (both polling)", requires=("iceoryx2",),
          n=RT_N)
def lat_iceoryx2(n: int) -> dict:
    iox = _Iceoryx2()
    try:
        return _timed_round_trips(n, iox.send, iox.recv)
    finally:
        iox.close()


@workload(LAT, system="posix_ipc.MessageQueue", requires=("posix_ipc",), n=RT_N)
def lat_posix_mq(n: int) -> dict:
    with _mq_round_trips(n) as (send, recv):
        return _timed_round_trips(n, send, recv)


# -- one-way throughput, 64-byte messages -----------------------------------------------


def _shmkit_sink(ready, name, n, batched, view, warm=0, into=0):
    import shmkit
    ch = shmkit.Channel.open(name)
    out = None
    if into:
        import numpy as np
        out = np.empty(into, np.uint8)
    for _ in range(warm):  # a first lap, so that every page of the ring is mapped
        if out is not None:
            ch.recv_into(out)
        else:
            with ch.recv_view():
                pass
    ready.set()
    if into:
        for _ in range(n):
            ch.recv_into(out)
    elif batched:
        got = 0
        while got < n:
            got += len(ch.recv_many(BATCH * 4))
    elif view:
        for _ in range(n):
            with ch.recv_view():
                pass
    else:
        recv = ch.recv
        for _ in range(n):
            recv()


def _shmkit_one_way(n: int, size: int, batched: bool = False, view: bool = False,
                    capacity: int = 1 << 20, into: bool = False) -> float:
    import shmkit
    ch = shmkit.Channel(_name(), capacity=capacity)
    try:
        msg = MSG if size == 64 else _payload(size)
        warm = 0 if size == 64 else capacity // (size + 8)
        for _ in range(warm):
            ch.send(msg)
        p = _peer(_shmkit_sink, ch.name, n, batched, view, warm, size if into else 0)
        t0 = time.perf_counter()
        if batched:
            for _ in range(n // BATCH):
                ch.send_many(BATCH_MSGS)
            ch.send_many(BATCH_MSGS[:n % BATCH])
        else:
            send = ch.send
            for _ in range(n):
                send(msg)
        return _finish(p) - t0
    finally:
        ch.unlink(); ch.close()


@workload("channel: 64 B one-way, single calls", unit="kops/s", system="shmkit.Channel")
def ow_shmkit(n: int) -> float:
    return _shmkit_one_way(n, 64)


def _pipe_sink(ready, conn, n, batched):
    ready.set()
    if batched:
        got = 0
        while got < n:
            got += len(conn.recv())
    else:
        for _ in range(n):
            conn.recv_bytes()


@workload("channel: 64 B one-way, single calls", system="multiprocessing.Pipe")
def ow_pipe(n: int) -> float:
    here, there = FORK.Pipe()
    p = _peer(_pipe_sink, there, n, False)
    t0 = time.perf_counter()
    for _ in range(n):
        here.send_bytes(MSG)
    return _finish(p) - t0


def _queue_sink(ready, q, n, batched):
    ready.set()
    if batched:
        got = 0
        while got < n:
            got += len(q.get_many(max_messages_to_get=BATCH * 4))
    else:
        for _ in range(n):
            q.get()


@workload("channel: 64 B one-way, single calls", system="multiprocessing.Queue", reference=True)
def ow_mp_queue(n: int) -> float:
    q = FORK.Queue()
    p = _peer(_queue_sink, q, n, False)
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(MSG)
    return _finish(p) - t0


@workload("channel: 64 B one-way, single calls", system="faster_fifo.Queue",
          requires=("faster_fifo",))
def ow_faster_fifo(n: int) -> float:
    import faster_fifo
    q = faster_fifo.Queue(1 << 20)
    p = _peer(_queue_sink, q, n, False)
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(MSG)
    return _finish(p) - t0


def _mq_sink(ready, name, n):
    import posix_ipc
    q = posix_ipc.MessageQueue(name)
    ready.set()
    for _ in range(n):
        q.receive()


@workload("channel: 64 B one-way, single calls", system="posix_ipc.MessageQueue",
          requires=("posix_ipc",))
def ow_posix_mq(n: int) -> float:
    import posix_ipc
    q = posix_ipc.MessageQueue("/" + _name(), posix_ipc.O_CREX, max_message_size=64)
    try:
        p = _peer(_mq_sink, q.name, n)
        t0 = time.perf_counter()
        for _ in range(n):
            q.send(MSG)
        return _finish(p) - t0
    finally:
        q.unlink(); q.close()


@workload("channel: 64 B one-way, batched calls", unit="kops/s",
          system="shmkit.Channel send_many/recv_many")
def owb_shmkit(n: int) -> float:
    return _shmkit_one_way(n, 64, batched=True)


@workload("channel: 64 B one-way, batched calls", system="faster_fifo put_many/get_many",
          requires=("faster_fifo",), reference=True)
def owb_faster_fifo(n: int) -> float:
    import faster_fifo
    q = faster_fifo.Queue(1 << 20)
    p = _peer(_queue_sink, q, n, True)
    t0 = time.perf_counter()
    for _ in range(n // BATCH):
        q.put_many(BATCH_MSGS, block=True, timeout=60)
    if n % BATCH:
        q.put_many(BATCH_MSGS[:n % BATCH], block=True, timeout=60)
    return _finish(p) - t0


@workload("channel: 64 B one-way, batched calls", system="multiprocessing.Pipe (lists)")
def owb_pipe(n: int) -> float:
    here, there = FORK.Pipe()
    p = _peer(_pipe_sink, there, n, True)
    t0 = time.perf_counter()
    for _ in range(n // BATCH):
        here.send(BATCH_MSGS)
    if n % BATCH:
        here.send(BATCH_MSGS[:n % BATCH])
    return _finish(p) - t0


# -- large payloads ------------------------------------------------------------------


def _payload(size: int) -> Any:
    import numpy as np
    return np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)


def _large(size: int, n: int | None) -> dict:
    """Register the large-payload systems for one size."""
    title = f"channel: {size // MiB} MiB messages"
    cap = 4 * size + 64 * 1024  # four messages in flight, as the hand-made ring below

    @workload(title, unit="GB/s", system="shmkit.Channel (copy in, copy out)",
              bytes_per_op=size, n=n)
    def copy(n: int) -> float:
        return _shmkit_one_way(n, size, capacity=cap)

    @workload(title, system="shmkit.Channel (copy in, zero-copy view)", bytes_per_op=size, n=n)
    def zero_copy(n: int) -> float:
        return _shmkit_one_way(n, size, view=True, capacity=cap)

    @workload(title, system="shmkit.Channel (copy in, recv_into a buffer)", bytes_per_op=size,
              n=n)
    def into(n: int) -> float:
        return _shmkit_one_way(n, size, capacity=cap, into=True)

    @workload(title, system="shmkit.Channel recv_into alone (message waiting, sender idle)",
              bytes_per_op=size, n=n)
    def into_alone(n: int) -> float:
        return _recv_into_alone(n, size, cap)

    @workload(title, system="multiprocessing.Pipe", bytes_per_op=size, n=n)
    def pipe(n: int) -> float:
        here, there = FORK.Pipe()
        p = _peer(_pipe_sink, there, n, False)
        data = _payload(size).tobytes()
        t0 = time.perf_counter()
        for _ in range(n):
            here.send_bytes(data)
        return _finish(p) - t0

    @workload(title, system="multiprocessing.Queue", bytes_per_op=size, n=n)
    def mp_queue(n: int) -> float:
        q = FORK.Queue(4)
        p = _peer(_queue_sink, q, n, False)
        data = _payload(size).tobytes()
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(data)
        return _finish(p) - t0

    @workload(title, system="faster_fifo.Queue", requires=("faster_fifo",), bytes_per_op=size,
              n=n)
    def ff(n: int) -> float:
        import faster_fifo
        q = faster_fifo.Queue(cap)
        p = _peer(_queue_sink, q, n, False)
        data = _payload(size).tobytes()
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(data, timeout=60)
        return _finish(p) - t0

    @workload(title, system="shared_memory + numpy (hand-made)", bytes_per_op=size, n=n)
    def hand_made(n: int) -> float:
        return _hand_made(n, size)

    @workload(title, system="shared_memory + numpy (hand-made, into a new np.empty each)",
              bytes_per_op=size, n=n)
    def hand_made_fresh(n: int) -> float:  # what recv() does: a new object per message
        return _hand_made(n, size, fresh=True)

    @workload(title, system="numpy copy in one process", bytes_per_op=size, n=n,
              reference=True)
    def in_process(n: int) -> float:
        import numpy as np
        src, dst = _payload(size), np.empty(size, np.uint8)
        np.copyto(dst, src)
        t0 = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        return time.perf_counter() - t0

    return locals()


def _alone_sink(ready, name, go_name, ack_name, size, n, warm, spent):
    import numpy as np

    import shmkit
    clock = time.perf_counter
    with shmkit.Channel.open(name) as ch, shmkit.Channel.open(go_name) as go, \
            shmkit.Channel.open(ack_name) as ack:
        out = np.empty(size, np.uint8)
        for _ in range(warm):  # a first lap: every page of the ring and buffer is mapped
            ch.recv_into(out)
        ready.set()
        total = 0.0
        for _ in range(n):
            go.recv()  # the message is whole in the ring
            t = clock()
            ch.recv_into(out)
            total += clock() - t
            ack.send(b"")
        spent.value = total


def _recv_into_alone(n: int, size: int, capacity: int) -> float:
    """The receiver's own time in recv_into(), summed: each message is already
    whole in the ring when it is called, and the sender waits for its ack, so
    the copy out has the memory bus to itself, as the in-process copy does.
    (The rows beside it time the pipeline, whose two copies share the bus.)"""
    import shmkit
    spent = FORK.Value("d", 0.0)
    with shmkit.Channel(_name(), capacity=capacity) as ch, \
            shmkit.Channel(_name(), capacity=4096) as go, \
            shmkit.Channel(_name(), capacity=4096) as ack:
        try:
            msg = _payload(size)
            warm = capacity // (size + 8)
            for _ in range(warm):
                ch.send(msg)
            p = _peer(_alone_sink, ch.name, go.name, ack.name, size, n, warm, spent)
            for _ in range(n):
                ch.send(msg)
                go.send(b"")
                ack.recv(timeout=30)
            _finish(p)
            return spent.value
        finally:
            for c in (ch, go, ack):
                c.unlink()


def _hand_sink(ready, shm_name, size, n, slots, full, empty, fresh):
    import numpy as np
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(shm_name)
    ring = np.ndarray((slots, size), np.uint8, shm.buf)
    out = np.empty(size, np.uint8)
    for i in range(slots):  # the first lap (pages mapped), as for shmkit
        full.acquire()
        np.copyto(out, ring[i % slots])
        empty.release()
    ready.set()
    for i in range(slots, slots + n):
        full.acquire()
        if fresh:
            out = np.empty(size, np.uint8)
        np.copyto(out, ring[i % slots])
        empty.release()
    del ring
    shm.close()


def _hand_made(n: int, size: int, fresh: bool = False) -> float:
    """What people write by hand: a shared_memory block of slots, numpy copies in
    and out, and two semaphores for full and empty slots.  ``fresh``: the
    receiver copies each message into a new array (else into one it reuses)."""
    import numpy as np
    from multiprocessing import shared_memory
    slots = 4
    shm = shared_memory.SharedMemory(create=True, size=slots * size)
    try:
        ring = np.ndarray((slots, size), np.uint8, shm.buf)
        full, empty = FORK.Semaphore(0), FORK.Semaphore(slots)
        src = _payload(size)
        for i in range(slots):
            np.copyto(ring[i], src)
            full.release()
        p = _peer(_hand_sink, shm.name, size, n, slots, full, empty, fresh)
        t0 = time.perf_counter()
        for i in range(slots, slots + n):
            empty.acquire()
            np.copyto(ring[i % slots], src)
            full.release()
        dt = _finish(p) - t0
        del ring
        return dt
    finally:
        shm.close(); shm.unlink()


_large(MiB, None)
_large(64 * MiB, 16)


# -- Queue with Python objects -------------------------------------------------------

OBJ = {"id": 12345, "name": "sensor-7", "values": [1.5, 2.5, 3.5], "ok": True}


def _obj_sink(ready, q, n):
    ready.set()
    for _ in range(n):
        q.get()


@workload("queue: small Python objects one-way", unit="kops/s", system="shmkit.Queue")
def q_shmkit(n: int) -> float:
    import shmkit
    q = shmkit.Queue()
    try:
        p = _peer(_obj_sink, q, n)
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(OBJ)
        return _finish(p) - t0
    finally:
        q.close()


@workload("queue: small Python objects one-way", system="multiprocessing.Queue",
          reference=True)
def q_mp(n: int) -> float:
    q = FORK.Queue()
    p = _peer(_obj_sink, q, n)
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(OBJ)
    return _finish(p) - t0


@workload("queue: small Python objects one-way", system="faster_fifo.Queue",
          requires=("faster_fifo",))
def q_faster_fifo(n: int) -> float:
    import faster_fifo
    q = faster_fifo.Queue(1 << 20)
    p = _peer(_obj_sink, q, n)
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(OBJ)
    return _finish(p) - t0


# -- Queue with a big numpy array ------------------------------------------------------

BIG = 64 * MiB


WARM = 8  # objects through the queue before timing (its steady state), as the hand-made fills its slots


def _big_sink(ready, q, n, copy_out, warmed):
    import numpy as np
    out = np.empty(BIG, np.uint8) if copy_out else None
    if out is not None:
        out[:] = 0  # its pages mapped, as the hand-made receiver's
    ready.set()
    for i in range(WARM + n):
        a = q.get()
        if out is not None:
            np.copyto(out, a)
        del a
        if i == WARM - 1:
            warmed.set()


def _big_queue(q: Any, n: int, copy_out: bool = False) -> float:
    src = _payload(BIG)
    warmed = FORK.Event()
    p = _peer(_big_sink, q, n, copy_out, warmed)
    for _ in range(WARM):
        q.put(src)
    if not warmed.wait(60):
        p.kill()
        raise RuntimeError("benchmark peer did not take the first objects")
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(src)
    return _finish(p) - t0


@workload("queue: 64 MiB numpy array one-way", unit="GB/s", system="shmkit.Queue",
          bytes_per_op=BIG, n=8)
def big_q_shmkit(n: int) -> float:
    import shmkit
    q = shmkit.Queue(4)
    try:
        return _big_queue(q, n)
    finally:
        q.close()


@workload("queue: 64 MiB numpy array one-way",
          system="shmkit.Queue (receiver copies the array out)", bytes_per_op=BIG, n=8)
def big_q_shmkit_copy(n: int) -> float:
    import shmkit
    q = shmkit.Queue(4)
    try:
        return _big_queue(q, n, copy_out=True)
    finally:
        q.close()


@workload("queue: 64 MiB numpy array one-way",
          system="shmkit.Queue(payload_pool=0): a new file per object", bytes_per_op=BIG, n=8)
def big_q_shmkit_no_pool(n: int) -> float:
    import shmkit
    q = shmkit.Queue(4, payload_pool=0)
    try:
        return _big_queue(q, n)
    finally:
        q.close()


@workload("queue: 64 MiB numpy array one-way", system="multiprocessing.Queue",
          bytes_per_op=BIG, n=8)
def big_q_mp(n: int) -> float:
    return _big_queue(FORK.Queue(4), n)


@workload("queue: 64 MiB numpy array one-way", system="shared_memory + numpy (hand-made)",
          bytes_per_op=BIG, n=8, reference=True)
def big_q_hand_made(n: int) -> float:
    return _hand_made(n, BIG)


# -- scaling: message sizes from 64 B to 64 MiB -------------------------------------------------

def _pipe_one_way(n: int, size: int) -> float:
    here, there = FORK.Pipe()
    p = _peer(_pipe_sink, there, n, False)
    data = MSG if size == 64 else _payload(size).tobytes()
    t0 = time.perf_counter()
    for _ in range(n):
        here.send_bytes(data)
    return _finish(p) - t0


def scaling(sizes: list[int], out: str = "docs/message_scaling.png") -> list:
    """One-way GB/s at each message size: shmkit.Channel (copy in, recv_into a
    reused buffer), the hand-made shared_memory + numpy copy, and
    multiprocessing.Pipe; plot them."""
    rows = []
    for size in sizes:
        n = max(16, min(200_000, (256 * MiB) // size))
        capacity = max(1 << 20, 4 * (size + 64))
        shm = _shmkit_one_way(n, size, capacity=capacity, into=size > 64)
        hand = _hand_made(n, size)
        pipe = _pipe_one_way(max(16, n // 8), size)
        row = (size, n * size / shm / 1e9, n * size / hand / 1e9,
               max(16, n // 8) * size / pipe / 1e9)
        rows.append(row)
        print(f"{size:>10,} B: shmkit.Channel {row[1]:7.3f} GB/s, hand-made {row[2]:7.3f} "
              f"GB/s, Pipe {row[3]:7.3f} GB/s", flush=True)
    from benchmarks.plot import save_plot
    save_plot(rows, ((1, "shmkit.Channel (copy in, recv_into)"),
                     (2, "shared_memory + numpy (hand-made)"), (3, "multiprocessing.Pipe")),
              xlabel="message size (bytes)", ylabel="GB/s, one way",
              title="One-way throughput as messages grow", out=out, logy=True)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="One-way throughput from 64 B to 64 MiB messages (plots "
                    "docs/message_scaling.png); the side-by-side benchmarks run with "
                    "`python -m benchmarks --filter channel`.")
    parser.add_argument("--scaling", type=int, nargs="*", metavar="BYTES",
                        help="message sizes (default: 64 B, 1 KiB, 16 KiB, 256 KiB, 4 MiB, "
                             "64 MiB)")
    scaling(parser.parse_args().scaling or [64, 1 << 10, 16 << 10, 256 << 10, 4 << 20,
                                            64 << 20])
