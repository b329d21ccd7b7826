"""Channel loans: a message built in place in the ring and sent in one step.
Real processes, real shared memory, real kills."""

from __future__ import annotations

import os
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

from shmkit import _core
from shmkit.channel import Channel
from shmkit.errors import (
    ChannelClosed,
    ClosedError,
    Empty,
    MessageTooLarge,
    ReadOnlyError,
    ShmkitError,
    SizeLimitError,
    Timeout,
)

from conftest import SRC, spawn
from conftest import fork_call as _fork

PAYLOAD = 56  # bytes after the (who, seq) header of a test message


def _pattern(who: int, seq: int, n: int = PAYLOAD) -> bytes:
    return bytes((who * 31 + seq * 7 + i) & 255 for i in range(n))


def _drain(ch: Channel, timeout: float = 0.5) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(ch.recv(timeout=timeout))
        except Timeout:
            return out


# -- round trips ------------------------------------------------------------------


def _recv_and_echo_back(name: str, back: str) -> None:
    with Channel.open(name) as ch, Channel.open(back) as out:
        raw = ch.recv(timeout=30)
        frame = ch.recv_array(np.uint16, (120, 160), timeout=30)
        with ch.recv_view(timeout=30) as mv:
            big = bytes(mv)
        out.send(raw + b"|" + str(int(frame.sum())).encode() + b"|"
                 + str(len(big)).encode() + b"|" + big[:4], timeout=30)
        # and loans the other way
        with out.loan(6, timeout=30) as loan:
            loan.buffer[:] = b"loaned"
        with out.loan(4 * 10, timeout=30) as loan:
            arr = loan.ndarray(np.int32, (2, 5))
            arr[:] = np.arange(10).reshape(2, 5)
            del arr


def test_round_trip_bytes_and_numpy_across_processes(names):
    name, back = names(), names()
    ch = Channel(name, capacity=1 << 20)
    out = Channel(back, capacity=4096)
    p = spawn(_recv_and_echo_back, name, back)
    with ch.loan(5, timeout=10) as loan:
        assert loan.nbytes == 5 and loan.state == "open"
        loan.buffer[:] = b"bytes"
    assert loan.state == "sent"
    frame = np.arange(120 * 160, dtype=np.uint16).reshape(120, 160)
    with ch.loan(frame.nbytes, timeout=10) as loan:
        arr = loan.ndarray(np.uint16, frame.shape)
        arr[...] = frame  # the one write: straight into the ring
        del arr
    big = 300 << 10  # received in place, a view over the loan's bytes
    with ch.loan(big, timeout=10) as loan:
        mv = loan.buffer
        mv[:4] = b"BIG!"
        mv[4:] = b"\x01" * (big - 4)
    assert out.recv(timeout=30) == b"bytes|%d|%d|BIG!" % (int(frame.sum()), big)
    assert out.recv(timeout=30) == b"loaned"
    assert np.frombuffer(out.recv(timeout=30), np.int32).tolist() == list(range(10))
    p.join(30)
    assert p.exitcode == 0
    assert ch.statistics()["depth"] == 0
    ch.close()
    out.close()


def test_exception_abandons_and_receivers_never_see_it(name):
    ch = Channel(name, capacity=4096)
    with pytest.raises(RuntimeError):
        with ch.loan(5) as loan:
            loan.buffer[:] = b"never"
            raise RuntimeError("changed my mind")
    assert loan.state == "abandoned"
    ch.send(b"after")
    assert ch.recv(timeout=5) == b"after"
    with pytest.raises(Empty):
        ch.recv_nowait()
    st = ch.statistics()
    assert (st["depth"], st["sent"], st["received"], st["dropped"]) == (0, 1, 1, 1)
    # explicit abandon, and a loan dropped without being settled
    ch.loan(3).abandon()
    lost = ch.loan(3)
    lost.buffer[:] = b"xyz"
    del lost
    ch.send(b"last")
    assert ch.recv(timeout=5) == b"last"
    st = ch.statistics()
    assert (st["depth"], st["dropped"], st["bytes_used"]) == (0, 3, 0)
    ch.close()


def test_open_loan_holds_back_later_messages_in_order(name):
    """Messages arrive in the order their space was reserved: a second loan
    (or a plain send) behind an open one waits for it, whichever ends first."""
    ch = Channel(name, capacity=4096)
    first = ch.loan(1)
    second = ch.loan(1)
    ch.send(b"3")
    second.buffer[:] = b"2"
    second.send()
    with pytest.raises(Empty):
        ch.recv_nowait()
    first.buffer[:] = b"1"
    first.send()
    assert [ch.recv(timeout=5) for _ in range(3)] == [b"1", b"2", b"3"]
    ch.close()


# -- the buffer after the loan ----------------------------------------------------


def test_buffer_is_unusable_once_the_loan_ends(name):
    ch = Channel(name, capacity=4096)
    loan = ch.loan(4)
    mv = loan.buffer
    assert loan.buffer is mv and not mv.readonly
    mv[:] = b"abcd"
    loan.send()
    with pytest.raises(ValueError, match="released"):
        mv[0] = 1  # the memoryview was released by the loan
    for use in (lambda: loan.buffer, loan.send, loan.abandon, lambda: memoryview(loan),
                lambda: loan.ndarray()):
        with pytest.raises(ClosedError, match="already sent"):
            use()
    assert ch.recv(timeout=5) == b"abcd"
    ch.close()


def test_send_is_refused_while_an_array_of_the_loan_lives(name):
    ch = Channel(name, capacity=4096)
    with pytest.raises(BufferError, match="del arr"):
        with ch.loan(8) as loan:
            arr = loan.ndarray(np.uint8)
            arr[:] = 7
    assert loan.state == "open"
    with pytest.raises(Empty):
        ch.recv_nowait()  # held back, not sent, not torn
    view = memoryview(arr)
    with pytest.raises(BufferError):
        loan.send()
    del view, arr
    loan.send()
    assert ch.recv(timeout=5) == b"\x07" * 8
    # a slice of .buffer outliving the block is caught the same way
    loan = ch.loan(4)
    part = loan.buffer[1:]
    with pytest.raises(BufferError):
        loan.send()
    del part
    loan.send()
    assert len(ch.recv(timeout=5)) == 4
    # an array alive when an exception leaves the block: the loan stays
    # open until the array goes, then is abandoned, never sent
    with pytest.raises(KeyError):
        with ch.loan(8) as loan:
            arr = loan.ndarray(np.uint8)
            raise KeyError("x")
    assert loan.state == "open"
    del arr, loan
    ch.send(b"next")
    assert ch.recv(timeout=5) == b"next"
    assert ch.statistics()["dropped"] == 1
    ch.close()


# -- misuse -----------------------------------------------------------------------


def test_hostile_sizes_and_arguments(name):
    ch = Channel(name, capacity=4096)
    for n in (4089, 1 << 40, 2**80):
        with pytest.raises(MessageTooLarge, match="4088"):
            ch.loan(n)
    with pytest.raises(SizeLimitError, match="nbytes >= 0"):
        ch.loan(-1)
    with pytest.raises(SizeLimitError):
        ch.loan(-2**80)
    for bad in (1.5, "8", None, b"8"):
        with pytest.raises(TypeError):
            ch.loan(bad)
    with pytest.raises(TypeError):
        ch.loan(8, timeout="soon")
    with ch.loan(0) as loan:  # an empty message is a message
        assert loan.buffer.nbytes == 0
    assert ch.recv(timeout=5) == b""
    with ch.loan(4088) as loan:  # the largest there is
        loan.buffer[-1:] = b"!"
    assert ch.recv(timeout=5)[-1:] == b"!"
    with ch.loan(12) as loan:
        for dtype, shape, offset in ((np.int64, None, 0), (np.uint8, (13,), 0),
                                     (np.uint8, (4, -3), 0), (np.uint8, None, 13),
                                     (np.uint8, (2**62, 2**62), 0), (np.uint8, None, -1)):
            with pytest.raises(SizeLimitError):
                loan.ndarray(dtype, shape, offset)
        with pytest.raises(TypeError):
            loan.ndarray("no such dtype")
        a = loan.ndarray(np.uint32, 2, offset=4)
        a[:] = [1, 2]
        del a
    assert ch.recv(timeout=5)[4:] == struct.pack("=II", 1, 2)
    # nothing stored was lost by the refusals
    assert ch.statistics()["depth"] == 0
    ch.close()


def test_a_bool_size_is_refused_by_every_loan(names):
    """loan(True) is a slip, not a loan of 1 byte (it was one): every loan
    (Channel, asyncio Channel, Topic) refuses a bool size with TypeError
    naming nbytes, and reserves nothing; a receiver in another process gets
    only the message of the real loan that follows."""
    import asyncio

    import shmkit.aio as aio
    from shmkit import Topic
    cname, tname = names(), names()
    with Channel(cname, capacity=4096) as ch, aio.Channel(cname) as ach, \
            Topic(tname, capacity=4096, history=4) as topic:
        for loan in (ch.loan, ach.loan, topic.loan):
            for bad in (True, False):
                with pytest.raises(TypeError, match="nbytes.*not a bool"):
                    loan(bad)
                with pytest.raises(TypeError, match="nbytes.*not a bool"):
                    loan(nbytes=bad, timeout=1)
        assert ch.statistics()["depth"] == 0 and topic.statistics()["published"] == 0
        with ch.loan(2, timeout=5) as lo:
            lo.buffer[:] = b"ch"
        with topic.loan(2, timeout=5) as lo:
            lo.buffer[:] = b"tp"
        got = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import shmkit
            with shmkit.Channel.open({cname!r}) as ch, shmkit.Topic.open({tname!r}) as t, \\
                    t.subscribe(history=4) as sub:
                print(ch.recv_many(10, timeout=30), sub.recv_many(10, timeout=30))
        """)], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
        assert got.stdout.split() == ["[b'ch']", "[b'tp']"], got.stderr
        assert asyncio.run(ach.recv_many(10, timeout=0.05)) == []


def test_full_closed_readonly_and_after_close(name):
    ch = Channel(name, capacity=64)  # room for one 48-byte message
    held = ch.loan(48)
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="no room for a loan of 8 bytes"):
        ch.loan(8, timeout=0.2)
    assert time.monotonic() - t0 < 30
    held.abandon()
    with pytest.raises(Empty):
        ch.recv_nowait()  # passes the abandoned record: room again
    ch.loan(8, timeout=5).send()
    assert ch.recv(timeout=5) == bytes(8)
    with Channel.open(name, readonly=True) as ro:
        with pytest.raises(ReadOnlyError, match="readonly"):
            ro.loan(1)
    open_loan = ch.loan(2)
    ch.close_sending()
    with pytest.raises(ChannelClosed):
        ch.loan(1)
    open_loan.buffer[:] = b"ok"  # reserved before the close: it still goes
    open_loan.send()
    assert ch.recv(timeout=5) == b"ok"
    ch.close()
    with pytest.raises(ClosedError):
        ch.loan(1)


def test_loan_outlives_the_close_of_its_channel_handle(name):
    """close() does not end an open loan: like a message view, the loan keeps
    its mapping and attachment until it is sent or abandoned."""
    ch = Channel(name, capacity=4096)
    other = Channel.open(name)
    loan = ch.loan(4)
    ch.close()
    with pytest.raises(ClosedError):
        ch.loan(1)
    loan.buffer[:] = b"late"
    loan.send()
    other.send(b"flows")
    assert [other.recv(timeout=10), other.recv(timeout=10)] == [b"late", b"flows"]
    abandoned = Channel.open(name)
    loan = abandoned.loan(4)
    abandoned.close()
    del loan
    other.send(b"still")
    assert other.recv(timeout=10) == b"still"
    assert other.statistics()["depth"] == 0
    other.close()


# -- threads ------------------------------------------------------------------------


def test_threads_of_one_process_each_take_loans(name):
    ch = Channel(name, capacity=2048)  # small: loans wait for room
    n, threads = 300, 4
    errors: list[BaseException] = []

    def sender(who: int) -> None:
        try:
            for seq in range(n):
                size = 8 + (seq * 13 + who) % 200
                with ch.loan(size, timeout=30) as loan:
                    mv = loan.buffer
                    mv[:8] = struct.pack("=II", who, seq)
                    mv[8:] = bytes([who]) * (size - 8)
                    if seq % 10 == 3:
                        raise LookupError  # abandoned
        except LookupError:
            sender_rest(who, seq + 1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def sender_rest(who: int, start: int) -> None:
        for seq in range(start, n):
            try:
                with ch.loan(8, timeout=30) as loan:
                    loan.buffer[:] = struct.pack("=II", who, seq)
                    if seq % 10 == 3:
                        raise LookupError
            except LookupError:
                pass

    ts = [threading.Thread(target=sender, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    got: dict[int, list[int]] = {w: [] for w in range(threads)}
    with Channel.open(name) as rx:
        want = threads * (n - n // 10)
        for _ in range(want):
            msg = rx.recv(timeout=60)
            who, seq = struct.unpack_from("=II", msg)
            assert msg[8:] == bytes([who]) * (len(msg) - 8)
            got[who].append(seq)
    for t in ts:
        t.join(30)
    assert not errors, errors
    for w in range(threads):
        assert got[w] == [s for s in range(n) if s % 10 != 3]
    with pytest.raises(Empty):
        ch.recv_nowait()
    assert ch.statistics()["depth"] == 0
    ch.close()


# -- death inside a loan --------------------------------------------------------------


def _loaning_sender(name: str, who: int, n: int, die_at: int, wfd: int) -> None:
    """Send n messages by loan, reporting each on the pipe; SIGKILL ourselves
    inside the loan of message die_at (-1: never), half written."""
    ch = Channel.open(name)
    for seq in range(n):
        with ch.loan(8 + PAYLOAD, timeout=30) as loan:
            mv = loan.buffer
            mv[:8] = struct.pack("=II", who, seq)
            if seq == die_at:
                mv[8:8 + PAYLOAD // 2] = _pattern(who, seq, PAYLOAD // 2)
                os.write(wfd, b"D %d %d\n" % (who, seq))
                os.kill(os.getpid(), signal.SIGKILL)
            mv[8:] = _pattern(who, seq)
            del mv
        os.write(wfd, b"S %d %d\n" % (who, seq))
    ch.close()


def test_sigkill_inside_a_loan_many_times(name):
    """Each round, two forked senders loan messages at once; one is SIGKILLed
    inside a loan.  The killed message is never seen, nothing is lost or
    duplicated or torn, the survivor's messages flow, and the ring counts one
    drop per kill."""
    ch = Channel(name, capacity=8192)
    rng = random.Random(7)
    rounds, n = 100, 40
    seen: dict[int, list[int]] = {}
    sent: dict[int, int] = {}
    dead: set[tuple[int, int]] = set()
    for rnd in range(rounds):
        r, w = os.pipe()
        a, b = 2 * rnd + 1, 2 * rnd + 2  # both rounds' messages fit in the ring
        pids = [_fork(_loaning_sender, name, a, n, rng.randrange(n), w),
                _fork(_loaning_sender, name, b, n, -1, w)]
        os.close(w)
        statuses = [os.waitpid(p, 0)[1] for p in pids]
        with os.fdopen(r, "rb") as f:
            for line in f.read().split(b"\n"):
                if line:
                    kind, who_s, seq_s = line.split()
                    if kind == b"S":
                        sent[int(who_s)] = int(seq_s) + 1
                    else:
                        dead.add((int(who_s), int(seq_s)))
        assert os.WIFSIGNALED(statuses[0]) and os.WTERMSIG(statuses[0]) == signal.SIGKILL
        assert os.WIFEXITED(statuses[1]) and os.WEXITSTATUS(statuses[1]) == 0
        # the dead sender's record holds the rest back until a waiting
        # receiver finds its owner gone and abandons it
        die_at = next(seq for who, seq in dead if who == a)
        for _ in range(die_at + n):
            msg = ch.recv(timeout=30)
            who, seq = struct.unpack_from("=II", msg)
            assert msg[8:] == _pattern(who, seq), (who, seq)  # never torn
            seen.setdefault(who, []).append(seq)
    assert _drain(ch, 0.5) == []  # the last abandoned record is passed, not delivered
    assert len(dead) == rounds
    for (who, seq) in dead:
        assert seen.get(who, []) == list(range(seq)), who  # the killed one never seen
    for who, n_sent in sent.items():
        if who % 2 == 0:
            assert seen[who] == list(range(n)) and n_sent == n
    st = ch.statistics()
    assert (st["depth"], st["dropped"]) == (0, rounds)
    assert st["received"] == sum(len(s) for s in seen.values())
    ch.close()


def _die_at_loan_point(name: str, k: int, me: int, wfd: int) -> None:
    """Three loans of 1500 bytes (so that records wrap), the second abandoned by
    an exception; die at the k-th ring crash point."""
    ch = Channel.open(name)
    _core.fault(k, "ring.")
    for i in range(3):
        try:
            with ch.loan(1500, timeout=10) as loan:
                mv = loan.buffer
                mv[:8] = struct.pack("=II", me, i)
                mv[8:] = bytes([i + 1]) * 1492
                del mv
                if i == 1:
                    raise LookupError
            os.write(wfd, b"S %d %d\n" % (me, i))
        except LookupError:
            pass
    _core.fault(0)
    os._exit(0)


def test_killed_at_every_loan_crash_point(name):
    """For k = 1, 2, ...: a child dies at the k-th ring crash point of its loans
    (reserving, sending, abandoning).  After each death the parent drains: every
    confirmed message arrives once, in order, whole; the abandoned one never."""
    ch = Channel(name, capacity=8192)
    points: set[str] = set()
    k = 0
    while True:
        k += 1
        assert k < 200, "the child never completed"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _die_at_loan_point(name, k, k, w)
            finally:
                os._exit(1)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            confirmed = [int(line.split()[2]) for line in f.read().split(b"\n") if line]
        got = []
        for msg in _drain(ch, 0.3):
            me, i = struct.unpack_from("=II", msg)
            assert me == k and msg[8:] == bytes([i + 1]) * 1492, (k, me, i)
            got.append(i)
        assert 1 not in got and got == sorted(set(got)), (k, got)
        assert set(confirmed) <= set(got), (k, confirmed, got)
        ch.send(b"probe", timeout=5)
        assert ch.recv(timeout=5) == b"probe"
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0 and got == [0, 2]
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        points.add(str(k))
    assert k > 10
    assert ch.statistics()["depth"] == 0
    ch.close()


def test_ctrl_c_inside_a_loan_abandons_it(name):
    ch = Channel(name, capacity=4096)
    code = f"""
        import shmkit, sys, time
        ch = shmkit.Channel.open({name!r})
        try:
            with ch.loan(7) as loan:
                loan.buffer[:] = b"half-wr"
                print("ready", flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            print(loan.state, flush=True)
        ch.send(b"after")
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    assert p.communicate(timeout=30)[0].strip() == "abandoned"
    assert ch.recv(timeout=10) == b"after"
    with pytest.raises(Empty):
        ch.recv_nowait()
    assert ch.statistics()["dropped"] == 1
    ch.close()


# -- Topic loans ---------------------------------------------------------------------------


def _topic_receiver(name: str, back: str, n: int) -> None:
    from shmkit import Topic
    with Topic.open(name) as t, t.subscribe(history=n) as sub, Channel.open(back) as out:
        got = []
        for _ in range(n):
            with sub.recv_view(timeout=30) as mv:
                got.append(bytes(mv[:4]) + b"%d" % len(mv))
        out.send(b",".join(got), timeout=30)


def test_topic_loan_round_trip_to_subscribers_in_other_processes(names):
    from shmkit import Topic
    name, back = names(), names()
    topic = Topic(name, capacity=1 << 20, history=4)
    out = Channel(back, capacity=4096)
    with topic.loan(5, timeout=10) as loan:
        loan.buffer[:] = b"bytes"
    frame = np.arange(120 * 160, dtype=np.uint16).reshape(120, 160)
    with topic.loan(frame.nbytes, timeout=10) as loan:
        arr = loan.ndarray(np.uint16, frame.shape)
        arr[...] = frame
        del arr
    with pytest.raises(ZeroDivisionError):
        with topic.loan(7, timeout=10) as loan:
            loan.buffer[:] = b"dropped"
            1 / 0
    topic.publish(b"last", timeout=10)
    ps = [spawn(_topic_receiver, name, back, 3) for _ in range(2)]
    want = b"byte5,\x00\x00\x01\x00%d,last4" % frame.nbytes
    assert [out.recv(timeout=60), out.recv(timeout=60)] == [want, want]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0
    assert topic.statistics()["published"] == 3
    topic.close()
    out.close()


def test_topic_loan_misuse(name):
    from shmkit import BusyError, Topic
    topic = Topic(name, capacity=4096, overflow="block")
    sub = topic.subscribe()
    with pytest.raises(MessageTooLarge):
        topic.loan(4096)
    with pytest.raises(SizeLimitError):
        topic.loan(-5)
    with pytest.raises(TypeError):
        topic.loan("5")
    loan = topic.loan(3)
    for again in (lambda: topic.publish(b"x"), lambda: topic.loan(1), topic.subscribe):
        with pytest.raises(BusyError, match="open loan"):
            again()
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: errors.append(
        pytest.raises(BusyError, loan.send).value))
    t.start()
    t.join(10)
    assert errors and "in that thread" in str(errors[0])
    loan.buffer[:] = b"one"
    loan.send()
    with pytest.raises(ClosedError):
        loan.send()
    assert sub.recv(timeout=5) == b"one"
    # a loan waits for room like publish, and times out naming the laggard
    for i in range(20):
        try:
            topic.publish_nowait(b"%d" % i * 100)
        except Exception:
            break
    with pytest.raises(Timeout, match="no room for a loan"):
        topic.loan(1000, timeout=0.2)
    with Topic.open(name, readonly=True) as ro:
        with pytest.raises(ReadOnlyError):
            ro.loan(1)
    sub.close()
    topic.close()
    with pytest.raises(ClosedError):
        topic.loan(1)


def test_topic_loans_from_threads_wait_for_each_other(name):
    from shmkit import Topic
    topic = Topic(name, capacity=1 << 16, overflow="block")
    sub = topic.subscribe()
    n, threads = 200, 4
    errors: list[BaseException] = []

    def publisher(who: int) -> None:
        try:
            for seq in range(n):
                with topic.loan(8, timeout=30) as loan:
                    loan.buffer[:] = struct.pack("=II", who, seq)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=publisher, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    got: dict[int, list[int]] = {w: [] for w in range(threads)}
    for _ in range(n * threads):
        who, seq = struct.unpack("=II", sub.recv(timeout=60))
        got[who].append(seq)
    for t in ts:
        t.join(30)
    assert not errors, errors
    assert all(got[w] == list(range(n)) for w in range(threads))
    topic.close()


def _topic_loaner(name: str, who: int, n: int, die_at: int, wfd: int) -> None:
    from shmkit import Topic
    topic = Topic.open(name)
    for seq in range(n):
        with topic.loan(8 + PAYLOAD, timeout=30) as loan:
            mv = loan.buffer
            mv[:8] = struct.pack("=II", who, seq)
            if seq == die_at:
                mv[8:8 + PAYLOAD // 2] = _pattern(who, seq, PAYLOAD // 2)
                os.write(wfd, b"D %d %d\n" % (who, seq))
                os.kill(os.getpid(), signal.SIGKILL)
            mv[8:] = _pattern(who, seq)
            del mv
        os.write(wfd, b"S %d %d\n" % (who, seq))
    topic.close()


def test_sigkill_inside_a_topic_loan_many_times(name):
    """A publisher killed inside a loan dies holding the publishers' lock: the
    next publisher takes it over and repairs from the journal.  The killed
    message is never seen, the rest arrive once, in order, whole."""
    from shmkit import Topic
    topic = Topic(name, capacity=1 << 16, overflow="block")
    sub = topic.subscribe()
    rng = random.Random(3)
    rounds, n = 30, 30
    seen: dict[int, list[int]] = {}
    for rnd in range(rounds):
        r, w = os.pipe()
        a, b = 2 * rnd + 1, 2 * rnd + 2
        die_at = rng.randrange(n)
        pids = [_fork(_topic_loaner, name, a, n, die_at, w),
                _fork(_topic_loaner, name, b, n, -1, w)]
        os.close(w)
        for _ in range(die_at + n):
            msg = sub.recv(timeout=30)
            who, seq = struct.unpack_from("=II", msg)
            assert msg[8:] == _pattern(who, seq), (who, seq)
            seen.setdefault(who, []).append(seq)
        statuses = [os.waitpid(p, 0)[1] for p in pids]
        os.close(r)
        assert os.WIFSIGNALED(statuses[0]) and os.WEXITSTATUS(statuses[1]) == 0
        assert seen.get(a, []) == list(range(die_at)) and seen[b] == list(range(n))
    with pytest.raises(Timeout):
        sub.recv(timeout=0.3)
    topic.publish(b"probe", timeout=5)
    assert sub.recv(timeout=5) == b"probe"
    topic.close()


def _die_at_topic_loan_point(name: str, k: int, wfd: int) -> None:
    from shmkit import Topic
    topic = Topic.open(name)
    _core.fault(k, "topic.")
    for i in range(4):
        try:
            with topic.loan(3000 if i % 2 else 10, timeout=10) as loan:
                mv = loan.buffer
                mv[:8] = struct.pack("=II", k, i)
                mv[8:] = bytes([i + 1]) * (len(mv) - 8)
                del mv
                if i == 2:
                    raise LookupError
            os.write(wfd, b"S %d\n" % i)
        except LookupError:
            pass
    _core.fault(0)


def test_killed_at_every_topic_loan_crash_point(name):
    from shmkit import Topic
    topic = Topic(name, capacity=16 << 10, overflow="block")
    sub = topic.subscribe()
    k = 0
    while True:
        k += 1
        assert k < 300, "the child never completed"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _die_at_topic_loan_point(name, k, w)
            finally:
                os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            confirmed = {int(x.split()[1]) for x in f.read().split(b"\n") if x}
        got = []
        while True:
            try:
                m = sub.recv(timeout=0.05)
            except Timeout:
                break
            who, i = struct.unpack_from("=II", m)
            assert who == k and m[8:] == bytes([i + 1]) * (len(m) - 8), (k, who, i)
            got.append(i)
        assert 2 not in got and got == sorted(set(got)) and confirmed <= set(got), (k, got)
        topic.publish(b"probe", timeout=5)  # the lock a dead loan held is taken over
        assert sub.recv(timeout=5) == b"probe"
        if not os.WIFSIGNALED(status):
            assert got == [0, 1, 3]
            break
    assert k > 10
    topic.close()


def test_ring_format_1_is_refused(name):
    """Format 2 counts an abandoned record when it is passed (so that a loan
    is abandoned with one store); a format 1 ring counted it when marked, and
    mixing the two would miscount, so it is refused."""
    import shmkit
    from shmkit.errors import FormatVersionError
    seg = shmkit.Segment.__new__(shmkit.Segment)
    seg._attach(name, None, size=8192, create=True, kind=shmkit.Kind.CHANNEL,
                layout={"format": 1})
    seg.close()
    with pytest.raises(FormatVersionError, match="format 1"):
        Channel.open(name)
