"""shmkit.Channel and shmkit.Queue: real processes, real shared memory, real kills."""

from __future__ import annotations

import json
import os
import pickle
import queue
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmkit
from shmkit import _arrays, _core
from shmkit.channel import Channel, Queue
from shmkit.errors import (
    ChannelClosed,
    CorruptError,
    Empty,
    ExistsError,
    FormatVersionError,
    Full,
    LayoutMismatchError,
    MessageTooLarge,
    NotFoundError,
    Timeout,
    WouldBlock,
    WrongKindError,
)

from conftest import (SRC, Interrupt, as_user, interrupt_at_bytecode, kept_through_two_interrupts,
                      run_python, set_layout, spawn)
from conftest import fork_call as _fork, kill_wait as _kill

# Ring header offsets (see _core/ring.c)
TAIL, RESERVED, PLOCK = 64, 72, 80
HEAD, READ, RECEIVED, DROPPED, CLOCK, RETURNED = 128, 136, 144, 152, 160, 168


def _u64(ch: Channel, off: int) -> int:
    return _core.load64(ch._seg._mapping, ch._seg._hsize + off)


def _set64(ch: Channel, off: int, v: int) -> None:
    _core.store64(ch._seg._mapping, ch._seg._hsize + off, v)


# -- basics ------------------------------------------------------------------


def test_send_recv_roundtrip_and_order(name):
    with Channel(name, capacity=4096) as ch:
        assert ch.created and ch.capacity == 4096 and ch.max_message == 4088
        msgs = [bytes([i % 256]) * random.randrange(0, 300) for i in range(500)]
        for m in msgs:  # wraps the ring many times, with every length modulo 8
            ch.send(m, timeout=1)
            assert ch.recv(timeout=1) == m
        small = [m[:150] for m in msgs[:20]]  # 20 records of at most 160 bytes fit
        assert ch.send_many(small) == 20
        assert ch.recv_many(max_n=7) == small[:7]
        with pytest.raises(TypeError, match="not a bool"):
            ch.recv_many(True)  # read as 1 before
        assert ch.recv_many() == small[7:20]
        s = ch.statistics()
        assert s["sent"] == s["received"] == 520 and s["depth"] == 0 and s["dropped"] == 0
        assert s["producers"] == 1 and s["consumers"] == 1


def test_empty_message_and_buffers(name):
    with Channel(name, capacity=1024) as ch:
        ch.send(b"")
        assert ch.recv() == b""
        ch.send(bytearray(b"ba"))
        ch.send(memoryview(b"xmvx")[1:3])
        arr = np.arange(10, dtype=np.float64)
        ch.send(arr)
        assert ch.recv() == b"ba" and ch.recv() == b"mv"
        assert np.array_equal(np.frombuffer(ch.recv(), np.float64), arr)
        ch.send(arr.reshape(2, 5))
        out = np.empty((2, 5))
        assert ch.recv_array(np.float64, out=out) is out and np.array_equal(out.ravel(), arr)
        ch.send(b"into")
        buf = bytearray(3)
        with pytest.raises(shmkit.MessageTooLarge, match="stays in the channel"):
            ch.recv_into(buf)  # (a ValueError too; the Redis channel raises the same)
        buf = bytearray(10)
        assert ch.recv_into(buf, timeout=1) == 4 and buf[:4] == b"into"
        with pytest.raises(TypeError, match="writable"):
            ch.recv_into(b"readonly")
        with pytest.raises(TypeError, match="bytes-like"):
            ch.send("text")
        with pytest.raises(BufferError, match="contiguous"):
            ch.send(np.arange(10)[::2])


def test_recv_array_that_does_not_fit_leaves_the_message_unread(name):
    """recv_array with a dtype, shape or out= that a message does not fit
    raises LayoutMismatchError (a ValueError) and the message stays the next
    one: it was taken first, so numpy's ValueError (or out='s, for a smaller
    message) lost it.  Another process then receives it whole; a dtype of
    Python objects, or a shape with a dimension below -1, is refused before
    anything is taken."""
    with Channel(name, capacity=4096) as ch:
        run_python(f"""
            import numpy as np, shmkit
            with shmkit.Channel.open({name!r}) as ch:
                ch.send(b"abcde", timeout=10)
                ch.send(np.arange(6, dtype=np.int32), timeout=10)
        """)
        with pytest.raises(LayoutMismatchError, match="5 bytes.*left unread"):
            ch.recv_array(np.int32, timeout=5)
        assert ch.statistics()["depth"] == 2
        assert ch.recv(timeout=5) == b"abcde"
        for dtype, shape in ((np.int32, (4, 4)), (np.int32, (-1, 4)), (np.int64, (2,)),
                             ("V5", None), (np.uint8, 23)):
            with pytest.raises(LayoutMismatchError, match="24 bytes"):
                ch.recv_array(dtype, shape, timeout=5)
        for out in (np.zeros(5, np.int32), np.zeros((2, 2), np.int64), np.zeros(7, np.int32)):
            with pytest.raises(LayoutMismatchError, match="24 bytes.*left unread"):
                ch.recv_array(out=out, timeout=5)
            assert not out.any()  # nothing written either
        for shape in ((-2, 3), (-1, -1), -6):
            with pytest.raises(ValueError, match="-1"):
                ch.recv_array(np.int32, shape, timeout=5)
        for dtype in (object, [("a", "i4"), ("o", "O")]):
            with pytest.raises(TypeError, match="Python objects"):
                ch.recv_array(dtype, timeout=5)
            with pytest.raises(TypeError, match="Python objects"):
                ch.recv_array(out=np.empty(3, dtype), timeout=5)
        assert ch.statistics()["depth"] == 1
        got = run_python(f"""
            import numpy as np, shmkit
            with shmkit.Channel.open({name!r}) as ch:
                print(ch.recv_array(np.int32, (2, -1), timeout=10).tolist())
        """).stdout
        assert got.strip() == "[[0, 1, 2], [3, 4, 5]]"
        ch.send(np.arange(6, dtype=np.int32))
        with pytest.raises(LayoutMismatchError, match="left unread"):
            ch.recv_array(out=np.empty(2, np.int32), timeout=5)
        out = np.empty((3, 2), np.int32)
        assert ch.recv_array(out=out, timeout=5) is out and out.ravel().tolist() == list(range(6))
        ch.send(b"")  # an empty message is an array of none
        assert ch.recv_array(np.int64, timeout=5).shape == (0,)
        with pytest.raises(Empty):
            ch.recv_nowait()


def test_nowait_and_timeouts(name):
    with Channel(name, capacity=256) as ch:
        with pytest.raises(Empty) as e:
            ch.recv_nowait()
        assert isinstance(e.value, WouldBlock) and isinstance(e.value, queue.Empty)
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            ch.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 2
        assert ch.recv_many(timeout=0.05) == []
        n = 0
        with pytest.raises(Full):
            while True:
                ch.send_nowait(b"x" * 56)
                n += 1
        assert n == 4  # 4 records of 64 bytes fill 256
        with pytest.raises(Timeout):
            ch.send(b"y" * 56, timeout=0.1)
        with pytest.raises(Timeout) as e:
            ch.send_many([b"z"] * 3, timeout=0.05)
        assert "0 of 3" in str(e.value)
        assert ch.recv_nowait() == b"x" * 56
        with pytest.raises(Timeout) as e:
            ch.send_many([b"q" * 56, b"r" * 56], timeout=0.05)
        assert e.value.sent == 1


def test_message_too_large(name):
    with Channel(name, capacity=1024) as ch:
        ch.send(b"a" * 1016)  # exactly the largest message
        assert len(ch.recv()) == 1016
        with pytest.raises(MessageTooLarge, match="capacity="):
            ch.send(b"a" * 1017)
        with pytest.raises(MessageTooLarge, match=r"send_many\(\) sent none: message 1"):
            ch.send_many([b"ok", b"a" * 5000])
        assert ch.statistics()["sent"] == 1  # nothing of the failed batch went


def test_largest_message_fits_whatever_the_offset(name):
    with Channel(name, capacity=1024) as ch:
        for pad in range(0, 1024, 56):
            ch.send(b"p" * pad)
            assert ch.recv(timeout=1) == b"p" * pad
            ch.send(b"L" * 1016, timeout=1)  # needs a wrap marker, then the whole ring
            assert ch.recv(timeout=1) == b"L" * 1016


def test_close_sending_ends_iteration_after_drain(name):
    ch = Channel(name, capacity=4096)
    other = Channel.open(name)
    for i in range(5):
        ch.send(b"%d" % i)
    ch.close_sending()
    ch.close()
    with pytest.raises(ChannelClosed, match="close_sending"):
        other.send(b"late")
    assert list(other) == [b"%d" % i for i in range(5)]
    with pytest.raises(ChannelClosed):
        other.recv(timeout=1)
    with pytest.raises(ChannelClosed):
        other.recv_many(timeout=1)
    assert other.statistics()["closed"] == 1
    other.close()
    other.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        other.recv()


def test_close_sending_wakes_blocked_receiver(name):
    ch = Channel(name, capacity=4096)
    code = f"""
        import shmkit, time
        ch = shmkit.Channel.open({name!r})
        time.sleep(0.3)
        ch.close_sending()
        ch.close()
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                         env={**os.environ, "PYTHONPATH": SRC})
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=10)
    assert time.monotonic() - t0 < 5
    p.wait(10)
    ch.close()


@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_close_sending_while_a_stopped_sender_holds_the_lock_times_out_naming_it(name, then):
    """A sender stopped (SIGSTOP) inside ``loan()`` while it reserves room
    holds the senders' lock: ``close_sending(timeout=)`` raises Timeout
    within its timeout naming the stopped pid (it took no timeout and waited
    for good), on the asyncio class too, and leaves the channel open;
    resumed, the loan is sent; killed, the next send takes the lock over
    and the dead sender's reservation is dropped; then ending works.  What was sent
    before is received either way."""
    import shmkit.aio
    with Channel(name, capacity=4096) as ch, shmkit.aio.Channel.open(name) as ach:
        ch.send_many([b"a", b"b"])
        code = f"""
            import shmkit
            from shmkit import _core
            ch = shmkit.Channel.open({name!r})
            print("ready", flush=True)
            _core.fault(1, "ring.reserve.header", stop=True)  # stops holding the lock
            with ch.loan(4) as loan:
                loan.buffer[:] = b"late"
        """
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
        try:
            assert p.stdout.readline().strip() == "ready"
            _pid, status = os.waitpid(p.pid, os.WUNTRACED)  # until it is stopped
            assert os.WIFSTOPPED(status), status
            for handle, timeout in ((ch, 0.5), (ach, 0)):
                t0 = time.monotonic()
                with pytest.raises(Timeout, match=f"pid {p.pid}, which is stopped") as ei:
                    handle.close_sending(timeout=timeout)
                assert time.monotonic() - t0 < 5
                assert f"kill -CONT {p.pid}" in str(ei.value) and "producers'" in str(ei.value)
            with pytest.raises(ValueError, match="NaN"):
                ch.close_sending(timeout=float("nan"))
            assert ch.statistics()["closed"] == 0
            if then == "resumed":
                os.kill(p.pid, signal.SIGCONT)
                assert p.wait(30) == 0
            else:
                p.kill()
                p.wait(30)
            ch.send(b"more", timeout=5)  # the lock is free (or taken over) again
            ach.close_sending(timeout=10)
            with pytest.raises(ChannelClosed):
                ch.send(b"after", timeout=5)
            got = [b"a", b"b"] + ([b"late"] if then == "resumed" else []) + [b"more"]
            assert list(ch.messages(timeout=5)) == got
            assert ch.statistics()["closed"] == 1
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
            p.stdout.close()


def test_create_open_and_kinds(name, names):
    with pytest.raises(NotFoundError):
        Channel.open(name)
    ch = Channel.create(name, capacity=1000)
    assert ch.capacity == 1024  # rounded up to 64
    with pytest.raises(ExistsError):
        Channel.create(name)
    again = Channel(name, capacity=512)  # opens: room for what was asked
    assert not again.created and again.capacity == 1024
    with pytest.raises(shmkit.MismatchError) as ei:  # asked for more than it has
        Channel(name, capacity=1 << 20)
    assert "capacity=1024" in str(ei.value) and "capacity=1048576" in str(ei.value)
    with pytest.raises(WrongKindError, match="channel"):
        shmkit.Mutex(name)
    with pytest.raises(WrongKindError):
        Queue(name=name)
    with pytest.raises(ValueError, match="capacity"):
        Channel(names(), capacity=10)
    other = shmkit.Event(names())
    with pytest.raises(WrongKindError, match="event"):
        Channel(other.name)
    other.close()
    q = Queue(name=names())
    with pytest.raises(WrongKindError, match="queue"):
        Channel.open(q.name)
    q.close()
    info = again.info()
    assert info["kind"] == "channel"
    assert {"depth", "capacity", "producers", "consumers", "sent", "received"} <= set(
        info["channel"])
    ch.close(); again.close()


def test_anonymous_channel_is_removed_with_its_last_handle():
    ch = Channel(None, capacity=1024)
    path = ch.path
    assert os.path.exists(path)
    ch.close()
    assert not os.path.exists(path)


def test_format_version_is_checked(name):
    seg = shmkit.Segment.__new__(shmkit.Segment)
    seg._attach(name, None, size=8192, create=True, kind=shmkit.Kind.CHANNEL,
                layout={"format": 99})
    seg.close()
    with pytest.raises(FormatVersionError, match="format 99"):
        Channel.open(name)


def test_pickle_by_name(name):
    with Channel(name, capacity=1024) as ch:
        clone = pickle.loads(pickle.dumps(ch))
        clone.send(b"via clone")
        assert ch.recv() == b"via clone"
        clone.close()


# -- corrupt headers ------------------------------------------------------------


def test_corrupt_positions_raise(name):
    ch = Channel(name, capacity=1024)
    ch.send(b"abc")
    _set64(ch, TAIL, 1 << 40)  # tail far beyond head
    with pytest.raises(CorruptError, match="rm"):
        ch.send(b"x")
    _set64(ch, TAIL, 16)
    _set64(ch, READ, 64)  # read beyond tail
    with pytest.raises(CorruptError):
        ch.recv(timeout=1)
    _set64(ch, READ, 0)
    view = ch._seg.buf
    data_off = _u64(ch, 16)
    struct.pack_into("I", view, data_off, 4000)  # record length beyond the ring
    with pytest.raises(CorruptError):
        ch.recv(timeout=1)
    struct.pack_into("II", view, data_off, 3, 0x12345)  # unknown state
    with pytest.raises(CorruptError):
        ch.recv(timeout=1)
    view.release()
    ch.close()


def test_corrupt_header_on_open(name, names):
    ch = Channel(name, capacity=1024)
    view = ch._seg.buf
    struct.pack_into("Q", view, 8, 1 << 40)  # capacity beyond the segment
    view.release()
    with pytest.raises(CorruptError, match="impossible layout"):
        Channel.open(name)
    view = ch._seg.buf
    struct.pack_into("I", view, 0, 0xDEAD)  # magic
    view.release()
    with pytest.raises(CorruptError, match="magic"):
        Channel.open(name)
    ch.close()


FUZZ = """
import random, struct, sys
import shmkit
from shmkit.errors import ShmkitError
name, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
ch = shmkit.Channel.open(name)
for _ in range(300):
    view = ch._seg.buf
    for _ in range(rnd.randrange(1, 4)):
        off = rnd.choice([64, 72, 128, 136, 144, 152, 36, 24]) if rnd.random() < 0.6 else \\
            ch._seg._hsize * 0 + struct.unpack_from("Q", view, 16)[0] + rnd.randrange(0, 1024, 4)
        struct.pack_into("I", view, off, rnd.choice([0, 1, 7, 8, 0xFFFFFFFF, rnd.getrandbits(32),
                                                     0x80000001, 0x80000002, 0x40000000 | rnd.getrandbits(10)]))
    view.release()
    for op in range(6):
        try:
            [lambda: ch.send_nowait(b"x" * rnd.randrange(0, 900)),
             lambda: ch.recv_nowait(),
             lambda: ch.recv(timeout=0.002),
             lambda: ch.recv_many(timeout=0.002),
             lambda: ch.send(b"y" * rnd.randrange(0, 100), timeout=0.002),
             lambda: ch.recv_view_nowait().release()][op]()
        except (ShmkitError, BufferError):
            pass
print("survived")
"""


def test_fuzzed_header_never_crashes_or_hangs(name):
    Channel(name, capacity=1024).close()
    for seed in range(3):
        out = run_python(FUZZ, name, str(seed), timeout=60)
        assert "survived" in out.stdout


# -- zero copy ----------------------------------------------------------------


def test_recv_view_holds_space_until_released(name):
    with Channel(name, capacity=1024) as ch:
        ch.send(b"A" * 400)
        ch.send(b"B" * 400)
        v1 = ch.recv_view(timeout=1)
        v2 = ch.recv_view(timeout=1)
        assert v1.nbytes == 400
        with pytest.raises(Full):  # both records still lent out
            ch.send_nowait(b"C" * 400)
        with v2 as mv2:  # release out of order: the second one first
            assert bytes(mv2) == b"B" * 400 and mv2.readonly
        with pytest.raises(Full):
            ch.send_nowait(b"C" * 400)
        with v1 as mv1:
            assert bytes(mv1[:2]) == b"AA"
        ch.send_nowait(b"C" * 400)
        ch.send_nowait(b"D" * 400)
        with ch.recv_view() as mv:
            arr = np.frombuffer(mv, np.uint8)
            assert arr[0] == ord("C")
            del arr
        assert ch.recv() == b"D" * 400


def test_recv_view_refuses_release_while_array_alive(name):
    with Channel(name, capacity=1024) as ch:
        ch.send(b"abcd")
        v = ch.recv_view()
        mv = v.__enter__()
        arr = np.frombuffer(mv, np.uint8)
        with pytest.raises(BufferError, match="still (alive|exported)"):
            v.release()
        del arr
        v.release()
        with pytest.raises(ValueError):
            memoryview(v)


def test_forgotten_view_is_released_by_gc(name):
    with Channel(name, capacity=256) as ch:
        ch.send(b"x" * 200)
        v = ch.recv_view()
        with pytest.raises(Full):
            ch.send_nowait(b"y" * 200)
        del v
        ch.send_nowait(b"y" * 200)


def test_big_payload_roundtrip_between_processes(name):
    ch = Channel(name, capacity=64 << 20)
    data = np.random.default_rng(1).integers(0, 255, size=24 << 20, dtype=np.uint8)
    p = spawn(_echo_big, name)
    ch.send(data, timeout=30)
    got = np.empty_like(data)
    ch_back = Channel(name + ".back", capacity=64 << 20)
    try:
        ch_back.recv_array(np.uint8, out=got, timeout=60)
        assert np.array_equal(got, data)
    finally:
        p.join(30)
        ch_back.unlink(); ch_back.close()
        ch.close()


def _echo_big(name):
    ch = Channel.open(name)
    back = Channel(name + ".back", capacity=64 << 20)
    with ch.recv_view(timeout=30) as mv:
        back.send(mv, timeout=30)
    back.close()


# -- many processes, many threads ---------------------------------------------


def _producer(name, pid, n, batch):
    ch = Channel.open(name)
    rnd = random.Random(pid)
    msgs = [struct.pack("II", pid, i) + b"p" * rnd.randrange(0, 200) for i in range(n)]
    if batch:
        for i in range(0, n, 37):
            ch.send_many(msgs[i:i + 37], timeout=60)
    else:
        for m in msgs:
            ch.send(m, timeout=60)
    ch.close()


def _consumer(name, out_name):
    ch = Channel.open(name)
    out = Channel.open(out_name)
    seen = []
    try:
        while True:
            for m in ch.recv_many(max_n=64, timeout=60):
                seen.append(m[:8])
    except ChannelClosed:
        pass
    out.send(b"".join(seen), timeout=60)
    out.close()


@pytest.mark.parametrize("batch", [False, True])
def test_many_producers_many_consumers(names, batch):
    name, out_name = names(), names()
    ch = Channel(name, capacity=16 << 10)  # small: producers block, the ring wraps a lot
    out = Channel(out_name, capacity=1 << 20)
    n, producers, consumers = 3000, 3, 2
    ps = [spawn(_producer, name, i, n, batch) for i in range(producers)]
    cs = [spawn(_consumer, name, out_name) for _ in range(consumers)]
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    ch.close_sending()
    got: dict[int, list[int]] = {i: [] for i in range(producers)}
    for _ in range(consumers):
        blob = out.recv(timeout=60)
        last: dict[int, int] = {}
        for k in range(0, len(blob), 8):
            pid, seq = struct.unpack_from("II", blob, k)
            assert seq > last.get(pid, -1), "per-producer order within a consumer"
            last[pid] = seq
            got[pid].append(seq)
    for c in cs:
        c.join(60)
    for pid in range(producers):
        assert sorted(got[pid]) == list(range(n)), "each message exactly once"
    ch.close(); out.close()


def test_threads_share_one_handle(name):
    ch = Channel(name, capacity=8192)
    n, senders = 4000, 4
    received: list[bytes] = []
    lock = threading.Lock()

    def send(k):
        for i in range(n):
            ch.send(struct.pack("II", k, i), timeout=30)

    def recv():
        while True:
            try:
                batch = ch.recv_many(max_n=50, timeout=30)
            except ChannelClosed:
                return
            with lock:
                received.extend(batch)

    rs = [threading.Thread(target=recv) for _ in range(3)]
    ss = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
    for t in rs + ss:
        t.start()
    for t in ss:
        t.join()
    ch._close_sending()
    for t in rs:
        t.join(30)
    got = sorted(struct.unpack("II", m) for m in received)
    assert got == [(k, i) for k in range(senders) for i in range(n)]
    ch.close()


def test_detach_wakes_threads_blocked_on_the_handle(name):
    ch = Channel(name, capacity=1024)
    errors = []

    def wait():
        try:
            ch.recv()
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    ch.close()
    t.join(5)
    assert not t.is_alive() and errors


def test_blocked_recv_lets_ctrl_c_through(name):
    Channel(name, capacity=1024).close()
    code = f"""
        import shmkit, sys
        ch = shmkit.Channel.open({name!r})
        print("ready", flush=True)
        try:
            ch.recv()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    assert p.communicate(timeout=10)[0].strip() == "interrupted"


def test_idle_receiver_sleeps(name):
    """A blocked receiver spins briefly, then sleeps in the kernel."""
    Channel(name, capacity=1024).close()
    code = f"""
        import shmkit, time, resource
        ch = shmkit.Channel.open({name!r})
        t0 = time.process_time()
        try:
            ch.recv(timeout=1.0)
        except shmkit.Timeout:
            pass
        print(time.process_time() - t0)
    """
    cpu = float(run_python(code).stdout)
    assert cpu < 0.3, f"waiting 1 s cost {cpu:.2f} s of CPU"


# -- crashes --------------------------------------------------------------------




def _crash_producer(ch, done, pid_slot, start, big):
    """Send numbered messages forever; record each one as done after send() returned."""
    m = done._mapping
    rnd = random.Random(os.getpid())
    i = start
    while True:
        size = rnd.choice([0, 8, 100, 3000]) if not big else 8 << 20
        ch.send(struct.pack("II", pid_slot, i) + b"." * size, timeout=60)
        _core.store64(m, done._hsize + 8 * pid_slot, i + 1)
        i += 1


def _crash_consumer(ch, bits, view=False):
    """Receive forever; after recv() returned, set the message's bit in its producer's
    bitmap (a bit found set already is a duplicate) and check per-producer order.
    With ``view``, receive in place (fast, so that producers are the ones copying)."""
    m, hs = bits._mapping, bits._hsize
    last: dict[int, int] = {}
    while True:
        if view:
            with ch.recv_view(timeout=60) as mv:
                k, seq = struct.unpack_from("II", mv)
        else:
            k, seq = struct.unpack_from("II", ch.recv(timeout=60))
        if seq <= last.get(k, -1):
            _core.add64(m, hs + 8, 1)  # out of order
        last[k] = seq
        if seq >= MAX_SEQ:
            _core.add64(m, hs + 16, 1)
            continue
        off, bit = hs + 64 + k * (MAX_SEQ // 8) + (seq >> 6) * 8, 1 << (seq & 63)
        while True:
            v = _core.load64(m, off)
            if v & bit:
                _core.add64(m, hs, 1)  # delivered twice
                break
            if _core.cas64(m, off, v, v | bit):
                break


MAX_SEQ = 1 << 23  # message numbers per producer that the bitmaps can hold


def _kill_run(names, cycles, producers=3, consumers=2, kill_consumers=True, big=False,
              seed=0):
    """Run producers and consumers, SIGKILL one at random many times, then check that
    each producer's messages arrived in order, at most once, and none that send()
    confirmed is missing (but for one per consumer killed right after receiving it)."""
    rnd = random.Random(seed)
    ch = Channel(names(), capacity=64 << 10 if not big else 32 << 20)
    done = shmkit.Segment(names(), size=8 * producers)
    bits = shmkit.Segment(names(), size=64 + producers * MAX_SEQ // 8)
    prods, cons = {}, []
    in_flight: dict[int, set[int]] = {k: set() for k in range(producers)}
    first = [0] * producers  # the first number of each producer's current life
    for k in range(producers):
        prods[k] = _fork(_crash_producer, ch, done, k, 0, big)
    for _ in range(consumers):
        cons.append(_fork(_crash_consumer, ch, bits, big))
    consumer_kills = 0
    try:
        for _ in range(cycles):
            time.sleep(rnd.uniform(0.0, 0.02))
            if kill_consumers and rnd.random() < 0.4:
                _kill(cons.pop(rnd.randrange(len(cons))))
                consumer_kills += 1
                cons.append(_fork(_crash_consumer, ch, bits, big))
            else:
                k = rnd.randrange(producers)
                _kill(prods[k])
                # the message being sent when it died may have gone or not
                sending = max(first[k], _core.load64(done._mapping, done._hsize + 8 * k))
                in_flight[k].add(sending)
                first[k] = sending + 1
                prods[k] = _fork(_crash_producer, ch, done, k, first[k], big)
        for k in list(prods):
            _kill(prods.pop(k))
            in_flight[k].add(max(first[k], _core.load64(done._mapping, done._hsize + 8 * k)))
        confirmed = [_core.load64(done._mapping, done._hsize + 8 * k) for k in range(producers)]
        # the channel keeps working: the consumers drain it within a bounded time
        deadline = time.monotonic() + 30
        while ch.statistics()["depth"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ch.statistics()["depth"] == 0, ch.statistics()
        while cons:
            _kill(cons.pop())
        m, hs = bits._mapping, bits._hsize
        assert _core.load64(m, hs) == 0, "a message was delivered twice"
        assert _core.load64(m, hs + 8) == 0, "a producer's messages arrived out of order"
        assert _core.load64(m, hs + 16) == 0, "message numbers outgrew the bitmaps"
        view = bits.buf
        missing_total = 0
        for k in range(producers):
            words = np.frombuffer(view, np.uint8, count=MAX_SEQ // 8,
                                  offset=64 + k * (MAX_SEQ // 8))
            got = np.flatnonzero(np.unpackbits(words, bitorder="little"))
            del words
            gs = set(got.tolist())
            assert gs <= set(range(confirmed[k])) | in_flight[k], "a message never sent arrived"
            missing_total += len(set(range(confirmed[k])) - gs - in_flight[k])
        view.release()
        # each consumer killed may take one message with it (received, not yet marked)
        assert missing_total <= consumer_kills, (missing_total, consumer_kills)
        stats = ch.statistics()
        # and it still works
        ch.send(b"after", timeout=5)
        with Channel.open(ch.name) as reader:
            assert reader.recv(timeout=5) == b"after"
        return stats
    finally:
        for pid in list(prods.values()) + cons:
            _kill(pid)
        ch.close(); done.close(); bits.close()


def test_kill_producers_and_consumers_at_random(names):
    stats = _kill_run(names, cycles=30)
    assert stats["sent"] > 1000


def _send_and_die_mid_copy(name, size):
    ch = Channel.open(name)
    _core.fault(1, "ring.fill.copied")  # SIGKILL with the record copied, not committed
    ch.send(b"h" * size, timeout=10)


def test_kill_producers_mid_message(names):
    """Big messages make the copy window long: killed producers leave half-written
    records, which are dropped, and nothing else is lost."""
    stats = _kill_run(names, cycles=16, producers=2, consumers=1, kill_consumers=False,
                      big=True, seed=3)
    assert stats["sent"] >= 1
    # Where the random kills landed is up to the scheduler; this one lands mid-message.
    name = names()
    with Channel(name, capacity=32 << 20) as ch:
        ch.send(b"before")
        pid = _fork(_send_and_die_mid_copy, name, 8 << 20)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        ch.send(b"after", timeout=5)
        assert ch.recv(timeout=5) == b"before"
        assert ch.recv(timeout=5) == b"after"
        assert ch.statistics()["dropped"] == 1


def test_dead_view_holder_does_not_wedge_the_channel(names):
    name = names()
    ch = Channel(name, capacity=1024)
    ch.send(b"v" * 500)

    def hold():
        c = Channel.open(name)
        v = c.recv_view(timeout=5)
        print("holding", v.nbytes, flush=True)
        time.sleep(60)

    pid = _fork(hold)
    deadline = time.monotonic() + 10
    while ch.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Full):
        ch.send_nowait(b"w" * 600)
    _kill(pid)
    t0 = time.monotonic()
    ch.send(b"w" * 600, timeout=5)  # the dead holder's record is reclaimed
    assert time.monotonic() - t0 < 2
    assert ch.recv(timeout=1) == b"w" * 600
    ch.close()


def _hold_views_and_die(name: str, n_back: int, n_lost: int, wfd: int) -> None:
    """Take n_back views with redeliver=True, then n_lost plain ones, say
    which on the pipe, and wait to be killed."""
    c = Channel.open(name)
    held = [c.recv_view(timeout=5, redeliver=True) for _ in range(n_back)]
    held += [c.recv_view(timeout=5) for _ in range(n_lost)]
    os.write(wfd, b" ".join(bytes(v) for v in held) + b"\n")
    time.sleep(60)


def _killed_holding_views(name: str, n_back: int, n_lost: int) -> list[str]:
    """Fork a holder of views (_hold_views_and_die), SIGKILL it once it holds
    them; returns the messages it held."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _hold_views_and_die(name, n_back, n_lost, w)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.readline()
    _kill(pid)
    return line.split()


def test_views_taken_with_redeliver_go_back_when_their_holder_dies(name):
    ch = Channel(name, capacity=1 << 16)
    for i in range(10):
        ch.send(b"m%d" % i)
    held = _killed_holding_views(name, 3, 1)
    assert held == ["m0", "m1", "m2", "m3"]
    # this handle's first receive finds the dead holder: its three
    # redeliver views come back first, in order; the plain one is lost
    got = [ch.recv(timeout=5) for _ in range(9)]
    assert got == [b"m0", b"m1", b"m2"] + [b"m%d" % i for i in range(4, 10)]
    with pytest.raises(Empty):
        ch.recv_nowait()
    st = ch.statistics()
    assert (st["redelivered"], st["received"], st["depth"], st["bytes_used"]) == (3, 10, 0, 0)
    ch.send(b"after")
    assert ch.recv(timeout=5) == b"after"
    ch.close()


def test_the_depth_counts_a_dead_holders_redelivered_views_before_any_receive(name):
    """A view lent with redeliver=True to a consumer that died is queued again
    (the next receive gets it), so depth counts it at once: before, it was
    missing from depth until some receive had given it back."""
    ch = Channel(name, capacity=1 << 16)
    for i in range(6):
        ch.send(b"m%d" % i)
    assert _killed_holding_views(name, 2, 1) == ["m0", "m1", "m2"]
    # m0 and m1 go back; m2 (a plain view) was its holder's to lose
    assert ch.depth == 5 and ch.statistics()["depth"] == 5
    assert ch.statistics()["redelivered"] == 0  # counted, not given back yet
    got = [ch.recv(timeout=5) for _ in range(5)]
    assert got == [b"m0", b"m1", b"m3", b"m4", b"m5"]
    assert ch.depth == 0 and ch.statistics()["redelivered"] == 2
    # a live holder's redeliver view is not queued
    ch.send(b"held")
    with ch.recv_view(timeout=5, redeliver=True) as mv:
        assert bytes(mv) == b"held" and ch.depth == 0
    ch.close()


def test_a_waiting_receiver_gets_a_dead_holders_redelivered_view(names):
    name = names()
    ch = Channel(name, capacity=4096)
    with pytest.raises(Empty):
        ch.recv_nowait()  # this handle's first receive is behind it
    ch.send(b"only")
    held = _killed_holding_views(name, 1, 0)
    got: list = []
    t = threading.Thread(target=lambda: got.append(ch.recv(timeout=10)))
    t.start()  # finds the channel empty: its wait's repair gives the view back
    t.join(15)
    assert held == ["only"] and got == [b"only"]
    assert ch.statistics()["redelivered"] == 1
    ch.close()


def test_a_redelivered_view_can_go_back_again_and_a_released_one_never(name):
    ch = Channel(name, capacity=4096)
    ch.send(b"work")
    assert _killed_holding_views(name, 1, 0) == ["work"]
    assert _killed_holding_views(name, 1, 0) == ["work"]  # the second holder dies too
    with ch.recv_view(timeout=5, redeliver=True) as mv:
        assert bytes(mv) == b"work"
    ch.send(b"next")
    assert ch.recv(timeout=5) == b"next"
    with pytest.raises(Empty):
        ch.recv_nowait()
    st = ch.statistics()
    assert (st["redelivered"], st["depth"], st["bytes_used"]) == (2, 0, 0)
    ch.close()


@pytest.mark.parametrize("ending", ["nowait", "closed", "no_senders", "holding_a_view"])
def test_a_receive_that_finds_nothing_first_takes_back_dead_holders_views(names, ending):
    """A handle that has received before (so its first-receive repair is
    behind it) and would now report empty, closed or no senders, or that
    holds a view of its own, still gets a dead holder's redeliver view."""
    name = names()
    ch = Channel(name, capacity=4096)
    sender = Channel.open(name)
    sender.send(b"mine")
    sender.send(b"work")
    mine = ch.recv_view(timeout=5)  # a live view of this process at head
    assert bytes(mine) == b"mine"
    if ending != "holding_a_view":
        mine.release()
    assert _killed_holding_views(name, 1, 0) == ["work"]
    if ending == "nowait":
        assert ch.recv_nowait() == b"work"
    elif ending == "closed":
        sender.close_sending()
        assert list(ch) == [b"work"]  # then ChannelClosed ends the iteration
    elif ending == "no_senders":
        sender.close()
        assert ch.recv(timeout=5, stop_when_no_senders=True) == b"work"
        with pytest.raises(shmkit.SendersGone):
            ch.recv(timeout=5, stop_when_no_senders=True)
    else:
        assert ch.recv(timeout=5) == b"work"
        mine.release()
    assert ch.statistics()["redelivered"] == 1 and ch.depth == 0
    ch.close()
    if not sender.closed:
        sender.close()


def test_a_returned_count_left_too_high_is_set_right(name):
    # a consumer killed between taking a returned message again and lowering
    # the count leaves it one too high: the next look finds none and clears it
    ch = Channel(name, capacity=4096)
    for m in (b"a", b"b", b"x"):
        ch.send(m)
    assert ch.recv(timeout=5) == b"a" and ch.recv(timeout=5) == b"b"
    _core.store32(ch._seg._mapping, ch._seg._hsize + RETURNED, 1)
    assert ch.depth == 2
    assert ch.recv(timeout=5) == b"x"
    with pytest.raises(Empty):
        ch.recv_nowait()
    assert _core.load32(ch._seg._mapping, ch._seg._hsize + RETURNED) == 0 and ch.depth == 0
    ch.close()


def test_a_returned_count_left_too_high_never_keeps_a_bounded_queue_full(name):
    # no receiver runs: a sender waiting for room sets the count right itself
    q = Queue(maxsize=3, name=name)
    q.put(1)
    q.put(2)
    ring = q._ch
    _core.store32(ring._seg._mapping, ring._seg._hsize + RETURNED, 1)
    q.put(3, timeout=5)
    assert _core.load32(ring._seg._mapping, ring._seg._hsize + RETURNED) == 0
    assert [q.get(timeout=5) for _ in range(3)] == [1, 2, 3]
    q.close()


def test_a_damaged_returned_record_is_corrupt_not_a_crash(name):
    ch = Channel(name, capacity=4096)
    ch.send(b"a")
    ch.send(b"b")
    assert _killed_holding_views(name, 1, 0) == ["a"]
    head = _u64(ch, HEAD)
    rec = ch._seg._hsize + _u64(ch, 16) + head % ch.capacity  # data_off + offset
    _core.store32(ch._seg._mapping, rec, 1 << 30)  # len far past the ring
    _core.store32(ch._seg._mapping, rec + 4, 0x80000005)  # RETURNED
    _core.store32(ch._seg._mapping, ch._seg._hsize + RETURNED, 1)
    with pytest.raises(CorruptError):
        ch.recv(timeout=1)
    ch.close()


def test_a_full_channel_keeps_a_dead_holders_redelivered_views(name):
    # a sender waiting for space returns them; they keep their space until
    # received, so nothing is overwritten and nothing is lost
    ch = Channel(name, capacity=1024)
    msgs = [bytes([65 + i]) * 200 for i in range(4)]  # 208 bytes each: 832 of 1024
    for m in msgs:
        ch.send(m)
    held = _killed_holding_views(name, 2, 0)
    assert held == [msgs[0].decode(), msgs[1].decode()]
    with pytest.raises(Timeout):
        ch.send(b"x" * 400, timeout=0.5)
    assert ch.statistics()["redelivered"] == 2 and ch.depth == 4
    assert [ch.recv(timeout=5) for _ in range(4)] == msgs
    ch.send(b"x" * 400, timeout=5)
    assert ch.recv(timeout=5) == b"x" * 400
    ch.close()


def _hold_lock_and_die(name, off, q):
    ch = Channel.open(name)
    lock = _core.Lock(ch._seg._mapping, ch._seg._hsize + off)
    lock.acquire()
    q.put("held")
    time.sleep(60)


@pytest.mark.parametrize("off", [PLOCK, CLOCK])
def test_peer_killed_holding_a_ring_lock(name, off):
    ch = Channel(name, capacity=1024)
    ch.send(b"before")
    import multiprocessing
    q = multiprocessing.get_context("spawn").Queue()
    p = spawn(_hold_lock_and_die, name, off, q)
    assert q.get(timeout=30) == "held"
    p.kill()
    p.join()
    t0 = time.monotonic()
    ch.send(b"after", timeout=5)
    assert ch.recv(timeout=5) == b"before" and ch.recv(timeout=5) == b"after"
    assert time.monotonic() - t0 < 3
    ch.close()


def test_dead_sleepers_are_counted_out(name):
    ch = Channel(name, capacity=1024)

    def sleeper():
        Channel.open(name).recv()

    pids = [_fork(sleeper) for _ in range(3)]
    deadline = time.monotonic() + 10
    while ch.statistics()["receivers_waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ch.statistics()["receivers_waiting"] == 3
    for pid in pids:
        _kill(pid)
    with pytest.raises(Timeout):
        ch.recv(timeout=0.2)  # a waiter repairs the counts of dead sleepers
    assert ch.statistics()["receivers_waiting"] == 0
    ch.close()


@pytest.mark.stress
def test_stress_kill_cycles(names):
    for seed in range(10):
        _kill_run(names, cycles=300, seed=seed)
        _kill_run(names, cycles=100, producers=2, consumers=1, kill_consumers=False,
                  big=True, seed=seed)


# -- a signal handler raising as a receive returns -------------------------------


def _take(ch: Channel, how: str) -> object:
    if how == "recv":
        return ch.recv(timeout=1.0)
    if how == "recv_nowait":
        return ch.recv_nowait()
    if how == "recv_many":
        return ch.recv_many(2, timeout=1.0)
    if how == "recv_into":
        return ch.recv_into(bytearray(16), timeout=1.0)
    with ch.recv_view(timeout=1.0) as mv:
        return bytes(mv)


@pytest.mark.parametrize("how", ["recv", "recv_nowait", "recv_many", "recv_into", "recv_view"])
@pytest.mark.parametrize("then", ["recv", "recv_many", "recv_into", "recv_view", "recv_array"])
def test_a_signal_handler_raising_as_a_receive_takes_messages_loses_none(
        name, raising_handler, how, then):
    """A signal comes while a receive is taking messages (sent by another
    process): its handler's exception (Ctrl-C's KeyboardInterrupt) reaches the
    caller, and what the receive took stays with the handle, counted by depth
    and ready for shmkit.wait, for the next receive of any kind."""
    with Channel(name, capacity=4096) as ch:
        run_python(f"""
            from shmkit import Channel
            with Channel({name!r}) as ch:
                for m in (b"m0", b"m1", b"m2"):
                    ch.send(m)
            """)
        _core.fault(1, "ring.take.counters", signal=signal.SIGUSR1)
        with pytest.raises(Interrupt):
            _take(ch, how)
        _core.fault(0)
        assert ch.depth == 3
        assert shmkit.wait([ch], timeout=0) == [ch]
        got: list[bytes] = []
        while len(got) < 3:
            if then == "recv_many":
                got += ch.recv_many(3, timeout=1.0)
            elif then == "recv_into":
                buf = bytearray(16)
                got.append(bytes(buf[:ch.recv_into(buf, timeout=1.0)]))
            elif then == "recv_array":
                with pytest.raises(LayoutMismatchError):  # a misfit leaves it first
                    ch.recv_array(np.uint32, timeout=1.0)
                got.append(ch.recv_array(np.uint8, timeout=1.0).tobytes())
            else:
                got.append(_take(ch, then))  # type: ignore[arg-type]
        assert got == [b"m0", b"m1", b"m2"]
        assert ch.depth == 0 and ch._kept == 0


def test_messages_kept_across_an_interrupt_stay_with_the_parent_of_a_fork(name, raising_handler):
    """A forked child does not receive what its parent's handle kept (the parent
    returns it); a recv_into buffer too small leaves a kept message kept."""
    with Channel(name, capacity=4096) as ch:
        ch.send(b"kept-by-parent")
        ch.send(b"next")
        _core.fault(1, "ring.take.counters", signal=signal.SIGUSR1)
        with pytest.raises(Interrupt):
            ch.recv(timeout=1.0)
        _core.fault(0)
        assert ch._kept == 1

        def child() -> None:
            assert ch._kept == 0
            assert ch.recv_nowait() == b"next"
        pid = _fork(child)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        with pytest.raises(MessageTooLarge):
            ch.recv_into(bytearray(4))
        assert ch.recv_nowait() == b"kept-by-parent"
        with pytest.raises(Empty):
            ch.recv_nowait()


def test_recv_array_in_a_shape_of_no_items_numpy_refuses_takes_nothing(name):
    """A shape with a dimension of 0 fits an empty message, but numpy makes no
    array of some (a dimension, or a product of them, beyond its index type):
    its ValueError comes before the take, and the message stays."""
    with Channel(name, capacity=4096) as ch:
        ch.send(b"")
        for shape in ((2**64, 0), (0, 2**63), (2**40, 2**40, 0)):
            with pytest.raises(ValueError):
                ch.recv_array(np.uint8, shape, timeout=5)
            assert ch.depth == 1
        assert ch.recv_array(np.uint8, (0, 2**40), timeout=5).shape == (0, 2**40)


def test_recv_array_refuses_a_dtype_or_shape_that_is_not_outs(name):
    """A dtype or shape given with out= was ignored (the bytes went into out
    as they came); now it must be out's own, or ValueError before the take.
    out= alone, or with its own dtype and shape (-1 matching any one
    dimension), receives as before."""
    with Channel(name, capacity=4096) as ch:
        ch.send(np.arange(4, dtype=np.int32))
        out = np.zeros(4, np.int32)
        for given in ({"dtype": np.float32}, {"dtype": "u1"}, {"shape": (2, 2)},
                      {"shape": 5}, {"dtype": np.int32, "shape": (4, 1)}):
            with pytest.raises(ValueError, match="disagrees with out=") as ei:
                ch.recv_array(out=out, timeout=5, **given)
            assert not isinstance(ei.value, shmkit.LayoutMismatchError)
            assert ch.depth == 1 and not out.any()
        assert ch.recv_array(np.int32, (-1,), out=out, timeout=5) is out
        assert out.tolist() == [0, 1, 2, 3]
        ch.send(b"ab")
        assert ch.recv_array(out=np.zeros((1, 2), "u1"), timeout=5).tolist() == [[97, 98]]
        ch.send(b"ab")
        assert ch.recv_array(timeout=5).dtype == np.uint8


def test_recv_array_interrupted_as_it_makes_the_array_keeps_the_message(name):
    """A Ctrl-C at any bytecode of recv_array's making of the array, once the
    message is taken, leaves the message kept for the next receive."""
    with Channel(name, capacity=4096) as ch:
        k = 0
        while True:
            k += 1
            ch.send(np.arange(6, dtype=np.int32))
            seen = [0]
            try:
                seen = interrupt_at_bytecode(k, lambda c: c is _arrays.array_of.__code__)
                got = ch.recv_array(np.int32, (2, 3), timeout=1.0)
            except KeyboardInterrupt:
                sys.settrace(None)
                assert ch.depth == 1, k
                got = ch.recv_array(np.int32, (2, 3), timeout=1.0)
            finally:
                sys.settrace(None)
            assert got.tolist() == [[0, 1, 2], [3, 4, 5]], k
            assert ch.depth == 0, k
            if seen[0] < k:
                break
        assert k > 5


def test_a_receive_interrupted_while_freeing_the_space_of_a_copied_message_keeps_it(name):
    """recv_into copies a message out, marks it finished, then takes the
    consumers' lock to free its space.  A Ctrl-C while another receiver holds
    that lock ends the wait: the message, already taken, is kept for the next
    receive (it was lost)."""
    with Channel(name, capacity=4096) as ch:
        ch.send_many([b"first-msg", b"second-msg"])
        a = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import signal, sys
            from shmkit import Channel, _core
            class Interrupt(Exception): pass
            def handler(*a): raise Interrupt
            signal.signal(signal.SIGUSR1, handler)
            ch = Channel.open({name!r}); buf = bytearray(64)
            print("ready", flush=True)
            _core.fault(1, "ring.finish.done", stop=True)  # stops once it is finished
            try:
                n = ch.recv_into(buf, timeout=10)
                print("got", bytes(buf[:n]), flush=True)
            except Interrupt:
                print("interrupted", ch._kept, flush=True)
            _core.fault(0)
            sys.stdin.readline()
            print("next", ch.recv(timeout=5), flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=SRC))
        b = None
        try:
            assert a.stdout.readline().strip() == "ready"
            os.waitpid(a.pid, os.WUNTRACED)
            b = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
                from shmkit import Channel, _core
                ch = Channel.open({name!r})
                _core.fault(1, "ring.take.counters", stop=True)  # stops holding the lock
                print(ch.recv(timeout=10), flush=True)
            """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))
            os.waitpid(b.pid, os.WUNTRACED)
            os.kill(a.pid, signal.SIGUSR1)
            os.kill(a.pid, signal.SIGCONT)
            assert a.stdout.readline().strip() == "interrupted 1"
            os.kill(b.pid, signal.SIGCONT)
            assert b.stdout.readline().strip() == "b'second-msg'"
            a.stdin.write("\n")
            a.stdin.flush()
            assert a.stdout.readline().strip() == "next b'first-msg'"
            assert a.wait(10) == 0 and b.wait(10) == 0
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()


@pytest.mark.parametrize("how", ["recv", "recv_nowait", "recv_many", "recv_into", "recv_view",
                                 "recv_array"])
def test_a_receive_of_kept_messages_that_a_signal_handler_interrupts_keeps_them(
        name, raising_handler, how):
    """A receive that returns kept messages asks for signals last, as every
    receive does: an interrupt there leaves them kept, in order."""
    with Channel(name, capacity=4096) as ch:
        ch.send_many([b"m0", b"m1", b"m2"])
        kept_through_two_interrupts(
            ch, "ring.take.counters",
            lambda: ch.recv_array(np.uint8, timeout=1.0) if how == "recv_array"
            else _take(ch, how))


def test_a_view_interrupted_twice_while_a_peer_holds_the_consumers_lock_is_kept(name):
    """recv_view takes a message and a signal's handler raises before the view
    is made; a peer consumer stopped holding the consumers' lock makes the
    record's finishing wait, and a second signal ends that wait.  The message
    is kept for the next receive and the channel's space flows (the record
    stayed taken by nobody, the message lost and the ring jammed)."""
    with Channel(name, capacity=1 << 14) as ch:
        for i in range(10):
            ch.send(b"m%d" % i)
        peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from shmkit import Channel, _core
            ch = Channel.open({name!r})
            print("ready", flush=True)
            sys.stdin.readline()
            _core.fault(1, "ring.take", stop=True)  # stops holding the lock
            print(ch.recv_nowait(), flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=SRC))

        class First(Exception):
            pass

        class Second(Exception):
            pass

        def first(signum: int, frame: object) -> None:
            assert peer.stdin is not None
            peer.stdin.write("go\n")
            peer.stdin.flush()
            os.waitpid(peer.pid, os.WUNTRACED)
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            raise First

        def second(signum: int, frame: object) -> None:
            raise Second
        old = signal.signal(signal.SIGUSR1, first), signal.signal(signal.SIGALRM, second)
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            _core.fault(1, "ring.lend", signal=signal.SIGUSR1)
            with pytest.raises(First):
                ch.recv_view_nowait()
            _core.fault(0)
            assert ch._kept == 1
        finally:
            _core.fault(0)
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGUSR1, old[0])
            signal.signal(signal.SIGALRM, old[1])
            os.kill(peer.pid, signal.SIGCONT)
        assert peer.stdout.readline().strip() == "b'm1'"
        assert peer.wait(10) == 0
        assert ch.recv_many(20) == [b"m0"]
        assert ch.recv_many(20) == [b"m%d" % i for i in range(2, 10)]
        for _ in range(100):  # more than the ring holds: its space is freed
            ch.send(b"x" * 1000, timeout=5)
            assert ch.recv_nowait() == b"x" * 1000


def test_kept_messages_taken_by_two_threads_go_to_one_each(name, raising_handler):
    """Two threads of one handle take kept messages while collections (run
    inside the view's allocation) let the GIL go: each message goes to one
    thread, once, and none is lost."""
    import gc
    ch = Channel(name, capacity=1 << 16)
    slow = [False]

    def pause(phase: str, info: object) -> None:
        if slow[0] and phase == "start":
            time.sleep(0.002)  # a finalizer that lets the GIL go
    got2: list[bytes] = []
    stop = [False]

    def other() -> None:
        while not stop[0]:
            try:
                got2.append(ch.recv_nowait())
                time.sleep(0.01)
            except Empty:
                time.sleep(0.0001)
    gc.callbacks.append(pause)
    threshold = gc.get_threshold()
    th = threading.Thread(target=other)
    th.start()
    got1: list[bytes] = []
    try:
        for r in range(20):
            ch.send_many([b"r%03d-%d" % (r, i) for i in range(3)])
            _core.fault(1, "ring.take.counters", signal=signal.SIGUSR1)
            try:
                ch.recv_many(3, timeout=1)
            except Interrupt:
                pass
            _core.fault(0)
            gc.set_threshold(1)
            slow[0] = True
            try:
                with ch.recv_view_nowait() as mv:
                    got1.append(bytes(mv))
            except Empty:
                pass
            finally:
                slow[0] = False
                gc.set_threshold(*threshold)
            time.sleep(0.05)
    finally:
        stop[0] = True
        th.join()
        gc.callbacks.remove(pause)
        gc.set_threshold(*threshold)
    while True:
        try:
            got1.append(ch.recv_nowait())
        except Empty:
            break
    ch.close()
    every = sorted(got1 + got2)
    assert every == sorted(b"r%03d-%d" % (r, i) for r in range(20) for i in range(3))


# -- Queue ----------------------------------------------------------------------


def test_queue_basics():
    with Queue(maxsize=3) as q:
        assert q.empty() and not q.full() and q.qsize() == 0
        for i in range(3):
            q.put({"n": i, "s": "x" * i})
        assert q.full() and q.qsize() == 3
        with pytest.raises(queue.Full):
            q.put(99, block=False)
        with pytest.raises(queue.Full):
            q.put(99, timeout=0.05)
        with pytest.raises(queue.Full):
            q.put_nowait(99)
        assert [q.get() for _ in range(3)] == [{"n": i, "s": "x" * i} for i in range(3)]
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(False)
    with pytest.raises(ValueError, match="closed"):
        q.put(1)
    q.join_thread()


def test_queue_by_name_from_unrelated_process(name):
    q = Queue(name=name)
    run_python(f"""
        import shmkit
        q = shmkit.Queue(name={name!r})
        q.put(("hello", 42)); q.put([1.5, None])
        q.close()
    """)
    assert q.get(timeout=5) == ("hello", 42)
    assert q.get(timeout=5) == [1.5, None]
    q.close()


MP_PROGRAM = """
import multiprocessing as mp
import sys

def produce(q, k, n):
    for i in range(n):
        q.put((k, i, "payload" * (i % 5)))
    q.put(None)
    q.close()
    q.join_thread()

def consume(q, results, n_producers):
    got = []
    while True:
        item = q.get()
        if item is None:
            break
        got.append(item[:2])
    results.put(got)

if __name__ == "__main__":
    if sys.argv[1] == "shmkit":
        import shmkit
        Queue = shmkit.Queue
    else:
        Queue = mp.get_context("spawn").Queue
    ctx = mp.get_context("spawn")
    q, results = Queue(maxsize=100), Queue()
    assert q.empty() and q.qsize() == 0
    n, producers = 500, 3
    ps = [ctx.Process(target=produce, args=(q, k, n)) for k in range(producers)]
    cs = [ctx.Process(target=consume, args=(q, results, producers)) for _ in range(producers)]
    for p in ps + cs:
        p.start()
    got = []
    for _ in cs:
        got.extend(results.get(timeout=60))
    for p in ps + cs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(got) == [(k, i) for k in range(producers) for i in range(n)], len(got)
    try:
        q.get(timeout=0.05)
    except __import__("queue").Empty:
        pass
    q.put_nowait("x"); assert q.get(timeout=5) == "x"
    q.close(); q.join_thread(); results.close(); results.join_thread()
    print("ok", len(got))
"""


@pytest.mark.parametrize("impl", ["multiprocessing", "shmkit"])
def test_program_written_for_multiprocessing_queue(impl, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(MP_PROGRAM)
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, str(prog), impl], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 1500"


@pytest.mark.skipif(os.geteuid() != 0, reason="switches a child to another user")
def test_a_queue_shared_with_another_user_shares_its_big_objects_too(name):
    # A queue made with mode=0o666 for another user: its small objects
    # reached that user, its big ones were lost (UntrustedError: "cannot be
    # read here"), since their payload files were always made mode 0600.
    from shmkit.channel import _payload_files
    q = Queue(name=name, mode=0o666, create=True, payload_pool=0)
    try:
        q.put(np.arange(1 << 18))
        q.put("small")
        [payload] = _payload_files(q._path)
        assert os.stat(payload).st_mode & 0o777 == 0o666
        def receive() -> None:
            other = Queue.open(name)
            assert np.array_equal(other.get(timeout=10), np.arange(1 << 18))
            assert other.get(timeout=10) == "small"
        assert as_user(receive) == 0
    finally:
        q.close()
        shmkit.unlink(name)


def test_shmkit_rm_removes_a_queues_payload_files_as_unlink_does(name):
    from shmkit.channel import _payload_files
    q = Queue(name=name, create=True)
    q.put(np.arange(1 << 18))
    path = q._path
    q.close()
    assert len(_payload_files(path)) == 1
    proc = subprocess.run([sys.executable, "-m", "shmkit", "rm", "--yes", name],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert _payload_files(path) == []


def test_removing_an_object_never_removes_another_named_like_its_payload(tmp_path):
    # A path= queue may be named like the payload file of an object beside
    # it: shmkit rm of that object removed the queue's file.
    other = Queue(path=str(tmp_path / "a~oob.0123456789abcdef"), create=True)
    other.put("hello")
    shmkit.Store(path=str(tmp_path / "a"), create=True, lifetime="persistent").close()
    proc = subprocess.run([sys.executable, "-m", "shmkit", "rm", "--yes", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == ["a~oob.0123456789abcdef"]
    assert other.get(timeout=5) == "hello"
    other.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switches a child to another user")
def test_a_queue_whose_mode_changed_still_hands_its_owner_its_big_objects(name):
    # Payload files copied the queue file's mode: with the queue made
    # read-only (0o400), its own user's big objects were lost.  (As a user
    # that is not root, whom no mode stops.)
    def own_user() -> None:
        q = Queue(name=name, create=True, payload_pool=0)
        os.chmod(q._path, 0o400)
        q.put(np.arange(1 << 18))
        assert np.array_equal(q.get(timeout=5), np.arange(1 << 18))
        q.close()
    try:
        assert as_user(own_user) == 0
    finally:
        shmkit.unlink(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches children to other users")
def test_a_queue_given_to_a_group_gives_it_its_payload_files_too(name):
    # A sender of the group wrote payload files of its own primary group,
    # which the group's receivers could not open.
    q = Queue(name=name, mode=0o660, create=True, payload_pool=0)
    os.chown(q._path, -1, 65534)

    def send() -> None:
        Queue.open(name).put(np.arange(1 << 18))

    def receive() -> None:
        got = Queue.open(name, trust_owner=65533).get(timeout=10)
        assert np.array_equal(got, np.arange(1 << 18))
    try:
        assert as_user(send, 65533, 65533, [65534]) == 0
        assert as_user(receive, 65534, 65534, []) == 0
    finally:
        q.close()
        shmkit.unlink(name)


def test_queue_maxsize_shared_across_processes(name):
    q = Queue(2, name=name)
    other = Queue(name=name)  # opening adopts the creator's maxsize
    assert other.maxsize == 2
    other.put(1); other.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    assert q.get() == 1
    q.put(3)
    q.close(); other.close()


def test_queue_maxsize_is_the_rings_not_the_layouts_copy(name):
    # The layout text is a copy another user could rewrite: an explicit
    # maxsize was checked against it, and the adopted maxsize read from it,
    # while the ring went on enforcing its own.
    q = Queue(2, name=name)
    layout = dict(q._ch._seg._layout, max_items=5)
    set_layout(name, json.dumps(layout).encode())
    with pytest.raises(shmkit.MismatchError, match="maxsize=2.*maxsize=5"):
        Queue(5, name=name)
    other = Queue(name=name)
    assert other.maxsize == 2
    other.put(1); other.put(2)
    assert other.full()
    with pytest.raises(queue.Full):
        other.put(3, timeout=0.05)
    # the ring's own word changed since (by a neighbour with write access):
    # maxsize and full() say what put() now obeys
    _set64(q._ch, _core.layouts["ring"]["max_items"], 3)
    assert other.maxsize == 3 and not other.full()
    other.put(3)
    assert other.full()
    q.close(); other.close()
    assert other.maxsize == 2  # (as it was when opened)


def _channel_view(path):
    ch = Channel(path=path, capacity=4096, lifetime="attached")
    ch.send(b"x")
    ch.held = ch.recv_view(timeout=5)
    return ch


def _channel_loan(path):
    ch = Channel(path=path, capacity=4096, lifetime="attached")
    ch.held = ch.loan(5, timeout=5)
    return ch


def _topic_view(path):
    topic = shmkit.Topic(path=path, capacity=4096, lifetime="attached")
    sub = topic.subscribe()
    topic.publish(b"x")
    topic.held = sub.recv_view(timeout=5)
    return topic


def _topic_loan(path):
    topic = shmkit.Topic(path=path, capacity=4096, lifetime="attached")
    topic.held = topic.loan(5, timeout=5)
    return topic


def _view_entered(path):
    ch = Channel(path=path, capacity=4096, lifetime="attached")
    ch.send(b"x")
    view = ch.recv_view(timeout=5)
    ch.held = view.__enter__()  # its memoryview refers back to the view
    return ch


@pytest.mark.parametrize("make", [_channel_view, _channel_loan, _topic_view, _topic_loan,
                                  _view_entered])
def test_a_view_or_loan_stored_on_its_own_handle_is_collected(make, tmp_path):
    # A view or loan refers to its handle, and its types were invisible to
    # the collector: stored on that handle, the pair lived as long as the
    # process (an attached name, its descriptor, the record or the space).
    import gc
    import weakref

    path = tmp_path / "x"
    gc.collect()  # what earlier tests left: its descriptors must not count
    fds = len(os.listdir("/proc/self/fd"))
    handle = make(path)
    gone = weakref.ref(handle)
    del handle
    gc.collect()
    assert gone() is None
    assert not path.exists()
    assert len(os.listdir("/proc/self/fd")) == fds


# -- the demo -------------------------------------------------------------------


def test_demo_runs_senders_and_receiver_as_programs():
    out = run_python("""
        import sys
        from shmkit import demo
        sys.exit(demo.run(senders=3, records=3000, quiet=True))
    """, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9,000 from 3 senders" in out.stdout
    assert "arrived once, in order" in out.stdout


def test_example_programs_meet_by_name(name):
    from shmkit.demo import example_path
    env = {**os.environ, "PYTHONPATH": SRC}
    recv = subprocess.Popen([sys.executable, str(example_path("log_receiver.py")), "--name",
                             name, "--quiet"], stdout=subprocess.PIPE, text=True, env=env)
    send = subprocess.run([sys.executable, str(example_path("log_sender.py")), "--name", name,
                           "--records", "500", "--batch", "1"], env=env, timeout=60)
    assert send.returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Channel.open(name) as ch:
            if ch.depth == 0:
                break
        time.sleep(0.05)
    with Channel.open(name) as ch:
        ch.close_sending()  # ends the receiver once drained
    out = recv.communicate(timeout=30)[0]
    assert recv.returncode == 0, out
    assert "500 from 1 senders" in out


def test_readonly_handles_only_look(name, names):
    with Channel(name, capacity=1024) as ch:
        ch.send(b"x")
        with Channel.open(name, readonly=True) as ro:
            assert ro.depth == 1 and ro.info()["channel"]["producers"] == 1
            with pytest.raises(PermissionError, match="readonly"):
                ro.send(b"y")
            with pytest.raises(PermissionError, match="readonly"):
                ro.recv_nowait()
    qname = names()
    q = Queue(name=qname)
    q.put("a")
    qr = Queue.open(qname, readonly=True)
    assert qr.qsize() == 1 and qr.info()["queue"]["depth"] == 1
    with pytest.raises(NotFoundError):
        Queue.open(names())
    qr.close(); q.close()


def test_unlink_works_after_close_or_close_sending(name):
    ch = Channel(name, capacity=4096)
    ch.close_sending()
    ch.close()
    ch.unlink()
    assert not os.path.exists(f"/dev/shm/shmkit.{name}")
    ch = Channel(name, capacity=4096)
    ch.close()
    ch.unlink()
    with pytest.raises(shmkit.NotFoundError):
        ch.unlink()


# ---- hostile ring headers (core) --------------------------------------------


@pytest.mark.parametrize("field_off, value", [
    (20, 0xFFFFFFFF),   # data_off's high 32 bits: data_off + cap wraps
    (12, 0xFFFFFFFF),   # cap's high 32 bits
    (16, 0xFFFFFFC0),   # data_off's low 32 bits: far past the segment
])
def test_hostile_ring_header_is_refused_not_crashed_on(name, field_off, value):
    ch = Channel(name, capacity=4096)
    ch.send(b"x")
    _core.store32(ch._seg._mapping, ch._seg._hsize + field_off, value)
    ch.close()
    proc = run_python(f"""
        from shmkit.channel import Channel
        from shmkit.errors import CorruptError
        try:
            ch = Channel.open({name!r})
            ch.send(b"y", timeout=2)
            ch.recv(timeout=2)
        except CorruptError as e:
            print("refused:", e)
    """, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "refused:" in proc.stdout


# ---- crash points in the ring (core) -----------------------------------------


def _reporting_child(fn, *args):
    """Fork a child running fn(*args, wfd), which reports lines on the pipe
    wfd (an exception it raises is reported as "E ..."); returns the lines
    and the child's wait status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn(*args, w)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, b"E %s\n" % repr(e).encode()[:500])
        finally:
            os._exit(1)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return [line for line in f.read().split(b"\n") if line], status


def _die_at_ring_point(name, k, me, wfd):
    """Send 4 numbered messages (one of 70 KiB, so that a record wraps), receive
    3, take one view, close nothing; report each confirmed step on the pipe; die
    at the k-th ring crash point."""
    ch = Channel.open(name)
    _core.fault(k, "ring.")
    for i in range(4):
        pad = b"." * (70_000 if i == 2 else 10)
        ch.send(struct.pack("II", me, i) + pad, timeout=10)
        os.write(wfd, b"S %d %d\n" % (me, i))
    for _ in range(3):
        try:
            msg = ch.recv(timeout=0.2)
        except Timeout:
            break
        os.write(wfd, b"R %d %d\n" % struct.unpack_from("II", msg))
    try:
        with ch.recv_view(timeout=0.2) as mv:
            got = struct.unpack_from("II", mv)
        os.write(wfd, b"R %d %d\n" % got)
    except Timeout:
        pass
    _core.fault(0)
    os._exit(0)


def test_killed_at_every_ring_crash_point(name):
    """For k = 1, 2, ...: a child dies at the k-th ring crash point of its sends and
    receives.  After each death the parent drains the ring: no confirmed message is
    lost (but for one a killed receiver had taken), none arrives twice, each
    sender's messages arrive in order, and new senders and receivers still work."""
    ch = Channel(name, capacity=256 << 10)  # the child's 4 sends always fit
    received: dict[int, list[int]] = {}
    confirmed: dict[int, int] = {}
    kills = 0
    k = 0
    while True:
        k += 1
        assert k < 500, "the child never completed"
        lines, status = _reporting_child(_die_at_ring_point, name, k, k)
        for line in lines:
            assert not line.startswith(b"E "), (k, line)
            kind, who, seq = line.split()
            if kind == b"S":
                confirmed[int(who)] = int(seq) + 1
            else:
                received.setdefault(int(who), []).append(int(seq))
        killed = os.WIFSIGNALED(status)
        assert killed or os.WEXITSTATUS(status) == 0, status
        kills += killed
        while True:  # drain: a dead sender's half-written record is dropped
            try:
                msg = ch.recv(timeout=0.1)
            except Timeout:
                break
            who, seq = struct.unpack_from("II", msg)
            received.setdefault(who, []).append(seq)
        ch.send(b"probe", timeout=5)
        with Channel.open(name) as other:
            assert other.recv(timeout=5) == b"probe"
        if not killed:
            break
    lost = 0
    for who, seqs in received.items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), (who, seqs)
    for who, n in confirmed.items():
        lost += len(set(range(n)) - set(received.get(who, [])))
    assert lost <= kills and k > 20, (lost, kills, k)
    assert ch.statistics()["depth"] == 0
    ch.close()


def _retake_and_die_at_ring_point(name, k, wfd):
    """A new handle whose first receive gives back a dead holder's two views:
    take one again as a copy and one as a redeliver view, then a plain
    message as a copy; report each on the pipe; die at the k-th ring point."""
    ch = Channel.open(name)
    _core.fault(k, "ring.")
    msg = ch.recv(timeout=0.2)
    os.write(wfd, b"R %s\n" % msg)
    with ch.recv_view(timeout=0.2, redeliver=True) as mv:
        os.write(wfd, b"R %s\n" % bytes(mv))
    msg = ch.recv(timeout=0.2)
    os.write(wfd, b"R %s\n" % msg)
    _core.fault(0)
    os._exit(0)


def test_killed_at_every_crash_point_of_a_redelivery(name):
    """For k = 1, 2, ...: a holder of two redeliver views is killed, then a
    child dies at the k-th ring crash point while giving them back and taking
    them again.  After each death the parent drains: every message arrives
    (but for one a killed receiver had copied), the `returned` word is 0 and
    the channel is empty and works."""
    ch = Channel(name, capacity=64 << 10)
    delivered: dict[bytes, int] = {}
    sent: list[bytes] = []
    kills = k = 0
    while True:
        k += 1
        assert k < 300, "the child never completed"
        batch = [b"%d.%d" % (k, i) for i in range(3)]
        for m in batch:
            ch.send(m)
        sent += batch
        assert _killed_holding_views(name, 2, 0) == [batch[0].decode(), batch[1].decode()]
        lines, status = _reporting_child(_retake_and_die_at_ring_point, name, k)
        for line in lines:
            assert not line.startswith(b"E "), (k, line)
            msg = line.split()[1]
            delivered[msg] = delivered.get(msg, 0) + 1
        killed = os.WIFSIGNALED(status)
        assert killed or os.WEXITSTATUS(status) == 0, status
        kills += killed
        while True:
            try:
                msg = ch.recv(timeout=0.1)
            except Timeout:
                break
            delivered[msg] = delivered.get(msg, 0) + 1
        st = ch.statistics()
        assert (st["depth"], st["bytes_used"]) == (0, 0), (k, st)
        assert _core.load32(ch._seg._mapping, ch._seg._hsize + RETURNED) == 0, k
        if not killed:
            break
    assert set(delivered) <= set(sent)
    lost = [m for m in sent if m not in delivered]
    assert len(lost) <= kills and k > 10, (lost, kills, k)
    # only a view taken again and held when its holder died comes twice
    assert sum(n - 1 for n in delivered.values()) <= kills
    ch.send(b"probe")
    assert ch.recv(timeout=5) == b"probe"
    ch.close()


# -- stopping when no sender remains ----------------------------------------------------


def _send_then(name: str, n: int, how: str) -> None:
    ch = Channel.open(name)
    for i in range(n):
        ch.send(b"%d" % i)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    ch.close()


@pytest.mark.parametrize("how", ["close", "kill"])
def test_receiver_stops_once_empty_and_every_sender_is_gone(name, how):
    ch = Channel(name, capacity=1 << 16)
    try:
        got = []
        senders = [spawn(_send_then, name, 50, how) for _ in range(2)]
        for p in senders:
            p.join(60)
        # Nothing is lost: every message is delivered before the stop.
        for msg in ch.messages(timeout=30, stop_when_no_senders=True):
            got.append(msg)
        assert sorted(got) == sorted([b"%d" % i for i in range(50)] * 2)
        with pytest.raises(shmkit.SendersGone) as e:
            ch.recv(timeout=30, stop_when_no_senders=True)
        assert isinstance(e.value, shmkit.ChannelClosed) and "every process" in str(e.value)
        assert ch.recv_many(timeout=0.1) == []  # without the option it waits as before
    finally:
        ch.close()


def _late_sender(name: str, delay: float) -> None:
    time.sleep(delay)
    ch = Channel.open(name)
    ch.send(b"late")
    ch.close()


def test_receiver_waits_for_the_first_sender_and_wakes_when_the_last_goes(name):
    ch = Channel(name, capacity=1 << 16)
    try:
        p = spawn(_late_sender, name, 0.5)
        # before anyone sent it waits; asleep, it notices the sender leaving
        assert ch.recv(timeout=60, stop_when_no_senders=True) == b"late"
        start = time.monotonic()
        with pytest.raises(shmkit.SendersGone):
            ch.recv_many(timeout=60, stop_when_no_senders=True)
        assert time.monotonic() - start < 30
        p.join(30)
    finally:
        ch.close()


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not "
                    "in madvise mode here, so advice neither helps nor shows")
@pytest.mark.parametrize("kind", ["channel", "topic"])
def test_a_big_message_is_copied_out_into_memory_advised_onto_huge_pages(name, kind):
    """recv() of a large message fills a new bytes object: advised onto huge
    pages (as numpy advises its large arrays), the copy faults 512 times less
    (docs/benchmarks.md has the figures)."""
    import ctypes

    n = 8 << 20
    data = bytes(range(256)) * (n // 256)
    if kind == "channel":
        obj = shmkit.Channel(name, capacity=3 * n)
        send, sub = obj.send, obj
    else:
        obj = shmkit.Topic(name, capacity=3 * n)
        sub = obj.subscribe()
        send = obj.publish
    try:
        send(data)
        send(b"small" * 1000)
        got = sub.recv(timeout=5)
        small = sub.recv(timeout=5)
        assert got == data and small == b"small" * 1000
        middle = ctypes.cast(ctypes.c_char_p(got), ctypes.c_void_p).value + n // 2
        assert _vma_flags(middle).get("THPeligible") == "1"
        # (a small message is not advised, but where malloc puts it may be
        # memory an earlier big one left advised: nothing to assert there)
    finally:
        if kind == "topic":
            sub.close()
        obj.close()
