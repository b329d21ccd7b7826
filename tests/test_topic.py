"""shmkit.Topic: every subscriber sees every message; real processes, real kills."""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import shmkit
from shmkit import _arrays, _core
from shmkit.errors import (
    BusyError,
    ClosedError,
    CorruptError,
    Empty,
    FormatVersionError,
    Full,
    LayoutMismatchError,
    MessagesLost,
    MessageTooLarge,
    MismatchError,
    NotFoundError,
    SizeLimitError,
    Timeout,
    WrongKindError,
)
from shmkit.topic import Subscriber, Topic

from conftest import (Interrupt, interrupt_at_bytecode, kept_through_two_interrupts,
                      run_python, spawn)
from conftest import fork_call as _fork, kill_wait as _kill

L = _core.layouts["topic"]




def _wait(pid: int, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    _kill(pid)
    raise AssertionError("child did not finish")


def _msg(who: int, seq: int, size: int = 0) -> bytes:
    return struct.pack("II", who, seq) + b"." * size


# -- basics ---------------------------------------------------------------------------


def test_a_topic_and_its_subscriber_in_a_cycle_are_collected(name):
    # The subscriber's reference to its topic was invisible to the collector:
    # `topic.sub = topic.subscribe()` kept the handle, its descriptor, its
    # subscriber entry and an "attached" name for the process's life.
    import gc
    import weakref

    gc.collect()  # what earlier tests left: its descriptors must not count
    fds = len(os.listdir("/proc/self/fd"))
    with Topic(name, capacity=4096) as keep:
        for _ in range(keep.max_subscribers + 4):  # more than the table holds
            t = Topic.open(name)
            t.sub = t.subscribe()
            gone = weakref.ref(t)
            del t
            gc.collect()
            assert gone() is None
        assert keep.statistics()["subscribers"] == []
    assert len(os.listdir("/proc/self/fd")) == fds
    path = f"/dev/shm/shmkit.{name}-attached"
    t = Topic(path=path, capacity=4096, lifetime="attached")
    t.sub = t.subscribe()
    del t
    gc.collect()
    assert not os.path.exists(path)  # its last handle went: the name too


def test_an_open_loan_collected_in_another_thread_is_abandoned(name):
    # A cycle holding an open topic loan, collected by another thread: the
    # collector's clear refused to end it there, then ran again from the
    # dealloc on what it had cleared (a crash), and the topic stayed locked.
    import gc
    import sys

    reports: list[object] = []
    hook, sys.unraisablehook = sys.unraisablehook, reports.append
    gc.disable()
    try:
        with Topic(name, capacity=1 << 14) as topic:
            made, collected = threading.Event(), threading.Event()

            def make_cycle() -> None:  # and stay alive while another thread collects
                held = [topic.loan(16, timeout=5)]
                held.append(held)
                del held
                made.set()
                collected.wait(30)
            maker = threading.Thread(target=make_cycle)
            maker.start()
            assert made.wait(30)
            collector = threading.Thread(target=gc.collect)
            collector.start()
            collector.join()
            collected.set()
            maker.join()
            topic.publish(b"after", timeout=5)  # the publishers' lock is free
            assert topic.published == 1
            pid = _fork(lambda: Topic.open(name).publish(b"other", timeout=5))
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0  # another process publishes
    finally:
        gc.enable()
        sys.unraisablehook = hook
    assert reports == []


def test_a_loan_left_by_an_ended_thread_is_not_a_new_threads_with_its_identifier(name):
    # The next thread got the ended thread's identifier, and with it the
    # right to send the loan (or found itself refused a publish as if it
    # held the loan).
    from test_store import _in_thread_of_a_reused_identifier
    with Topic(name, capacity=1 << 14) as topic:
        left: list[Any] = []

        def take() -> None:
            left.append(topic.loan(8, timeout=5))

        got = _in_thread_of_a_reused_identifier(take, lambda: left[0].send())
        assert isinstance(got, shmkit.BusyError), got
        assert "in that thread" in str(got)
        assert topic.published == 0
        left.clear()  # a loan nobody can use any more: abandoned as it goes
        topic.publish(b"after", timeout=5)
        assert topic.published == 1


def test_every_subscriber_gets_every_message_in_order(name):
    with Topic(name, capacity=4096) as topic:
        assert topic.created and topic.capacity == 4096 and topic.max_message == 4080
        assert topic.overflow == "block" and topic.history == 0
        subs = [topic.subscribe() for _ in range(3)]
        msgs = [bytes([i % 256]) * random.randrange(0, 300) for i in range(400)]
        for i, m in enumerate(msgs):  # wraps the ring many times, every length mod 16
            topic.publish(m, timeout=5)
            for s in subs:
                assert s.recv(timeout=5) == m
        assert [s.lag for s in subs] == [0, 0, 0]
        assert [s.received for s in subs] == [400] * 3
        st = topic.statistics()
        assert st["published"] == 400 and len(st["subscribers"]) == 3
        assert all(e["pid"] == os.getpid() for e in st["subscribers"])
        for s in subs:
            with pytest.raises(Empty):
                s.recv_nowait()
            with pytest.raises(Timeout):
                s.recv(timeout=0.01)


def test_joiners_see_only_later_messages_plus_history(name):
    with Topic(name, capacity=8192, history=3) as topic:
        for i in range(10):
            topic.publish(b"%d" % i)
        late = topic.subscribe()
        assert [late.recv(timeout=1) for _ in range(3)] == [b"7", b"8", b"9"]
        none = topic.subscribe(history=0)
        one = topic.subscribe(history=1)
        topic.publish(b"10")
        assert none.recv(timeout=1) == b"10" and late.recv(timeout=1) == b"10"
        assert one.recv(timeout=1) == b"9" and one.recv(timeout=1) == b"10"
        with pytest.raises(SizeLimitError, match="history=4"):
            topic.subscribe(history=4)
    with Topic(None, capacity=4096) as plain:
        plain.publish(b"before")
        s = plain.subscribe()
        plain.publish(b"after")
        assert s.recv(timeout=1) == b"after"


def test_history_is_what_still_fits(name):
    with Topic(name, capacity=1024, history=100, overflow="overwrite") as topic:
        for i in range(200):
            topic.publish(_msg(0, i, 40))  # 64 bytes each: 16 fit
        s = topic.subscribe()
        got = []
        while True:
            try:
                got.append(struct.unpack_from("II", s.recv_nowait())[1])
            except Empty:
                break
        assert got == list(range(200 - len(got), 200)) and 10 <= len(got) <= 16


def test_views_arrays_and_iteration(name):
    with Topic(name, capacity=1 << 16) as topic, topic.subscribe() as sub:
        topic.publish_array(np.arange(12, dtype=np.int32).reshape(3, 4))
        a = sub.recv_array(np.int32, (3, 4), timeout=1)
        assert a.shape == (3, 4) and a[2, 3] == 11
        topic.publish(b"view me")
        with sub.recv_view(timeout=1) as mv:
            assert bytes(mv) == b"view me" and mv.readonly
        topic.publish(b"x")
        topic.publish(b"y")
        it = iter(sub)
        assert next(it) == b"x" and next(it) == b"y"
        assert list(sub.messages(timeout=0.05)) == []
        topic.publish(b"z")
        assert list(sub.messages(timeout=0.05)) == [b"z"]


@pytest.mark.parametrize("overflow", ["block", "overwrite"])
def test_recv_array_that_does_not_fit_leaves_the_message_unread(name, overflow):
    """recv_array with a dtype or shape a message does not fit raises
    LayoutMismatchError (a ValueError) and the message stays the next one
    (it was taken first, so numpy's ValueError lost it); a shape with a
    dimension below -1 is refused before anything is taken (numpy read
    (-2, 3) as (-1, 3))."""
    with Topic(name, capacity=4096, overflow=overflow) as topic, topic.subscribe() as sub:
        run_python(f"""
            import numpy as np, shmkit
            with shmkit.Topic.open({name!r}) as t:
                t.publish(b"abcde", timeout=10)
                t.publish(np.arange(6, dtype=np.int32), timeout=10)
        """)
        with pytest.raises(LayoutMismatchError, match="5 bytes.*left unread"):
            sub.recv_array(np.int32, timeout=5)
        assert sub.lag == 2 and sub.received == 0
        assert sub.recv(timeout=5) == b"abcde"
        for dtype, shape in ((np.int32, (4, 4)), (np.int32, (-1, 4)), (np.int64, (2,)),
                             ("V5", None)):
            with pytest.raises(LayoutMismatchError, match="24 bytes"):
                sub.recv_array(dtype, shape, timeout=5)
        for shape in ((-2, 3), (-1, -1), -6):
            with pytest.raises(ValueError, match="-1"):
                sub.recv_array(np.int32, shape, timeout=5)
        assert sub.lag == 1
        a = sub.recv_array(np.int32, (2, -1), timeout=5)
        assert a.shape == (2, 3) and a.tolist() == [[0, 1, 2], [3, 4, 5]]
        with pytest.raises(Empty):
            sub.recv_nowait()


def test_views_pin_their_space_in_block_mode(name):
    with Topic(name, capacity=1024) as topic, topic.subscribe() as sub:
        topic.publish(b"a" * 400)
        v = sub.recv_view(timeout=1)
        topic.publish(b"b" * 400)
        assert sub.recv(timeout=1) == b"b" * 400
        with pytest.raises(Timeout):  # the held view keeps the first record's space
            topic.publish(b"c" * 400, timeout=0.2)
        with v as mv:
            assert bytes(mv) == b"a" * 400
        topic.publish(b"c" * 400, timeout=1)
        assert sub.recv(timeout=1) == b"c" * 400


def test_overwritten_view_is_reported_on_release(name):
    with Topic(name, capacity=1024, overflow="overwrite") as topic, topic.subscribe() as sub:
        topic.publish(b"a" * 400)
        v = sub.recv_view(timeout=1)
        assert v.intact
        for _ in range(4):
            topic.publish(b"b" * 400)
        assert not v.intact
        with pytest.raises(MessagesLost) as e:
            with v:
                pass
        assert e.value.missed == 1


def test_overwrite_reports_exact_losses_then_goes_on(name):
    with Topic(name, capacity=1024, overflow="overwrite") as topic, topic.subscribe() as sub:
        for i in range(100):
            topic.publish(_msg(0, i, 40), timeout=0)  # never waits
        with pytest.raises(MessagesLost) as e:
            sub.recv(timeout=1)
        first = struct.unpack_from("II", sub.recv(timeout=1))[1]
        assert e.value.missed == first and sub.missed == first
        rest = [struct.unpack_from("II", sub.recv_nowait())[1] for _ in range(99 - first)]
        assert rest == list(range(first + 1, 100))
        assert sub.received + sub.missed == 100 and sub.lag == 0
        assert isinstance(e.value, shmkit.ShmkitError) and "overwritten" in str(e.value)


def test_threads_publish_and_subscribe(name):
    topic = Topic(name, capacity=1 << 14)
    n, pubs = 2000, 3
    ready = threading.Barrier(4 + pubs)
    results: dict[int, list[tuple[int, int]]] = {}

    def reader(k):
        with topic.subscribe() as sub:
            ready.wait()
            got = []
            for _ in range(n * pubs):
                got.append(struct.unpack_from("II", sub.recv(timeout=30)))
            results[k] = got

    def writer(w):
        ready.wait()
        for i in range(n):
            topic.publish(_msg(w, i, i % 50), timeout=30)

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    ts += [threading.Thread(target=writer, args=(w,)) for w in range(pubs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert len(results) == 4
    for got in results.values():
        for w in range(pubs):
            assert [s for who, s in got if who == w] == list(range(n))
    topic.close()


def test_one_subscriber_is_not_shared_between_threads(name):
    with Topic(name, capacity=4096) as topic, topic.subscribe() as sub:
        errors = []

        def waiter():
            try:
                sub.recv(timeout=0.5)
            except Timeout:
                pass

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        try:
            sub.recv(timeout=0.1)
        except BusyError as e:
            errors.append(e)
        except Timeout:
            pass
        t.join()
        assert errors and "another thread" in str(errors[0])


def _take(sub: Any, how: str) -> object:
    """One receive of the subscriber, of the kind ``how`` names."""
    if how == "recv":
        return sub.recv(timeout=1.0)
    if how == "recv_nowait":
        return sub.recv_nowait()
    if how == "recv_many":
        return sub.recv_many(2, timeout=1.0)
    if how == "recv_array":
        return sub.recv_array(np.uint8, timeout=1.0)
    with sub.recv_view(timeout=1.0) as mv:
        return bytes(mv)


@pytest.mark.parametrize("how", ["recv", "recv_nowait", "recv_many"])
@pytest.mark.parametrize("then", ["recv", "recv_many", "recv_view", "recv_array"])
def test_a_signal_handler_raising_as_a_subscriber_copies_messages_loses_none(
        name, raising_handler, how, then):
    """A signal comes as a subscriber takes messages (published by another
    process): its handler's exception reaches the caller, and what it took
    stays with the subscriber for its next receive of any kind."""
    with Topic(name, capacity=1 << 14) as topic, topic.subscribe() as sub:
        run_python(f"""
            from shmkit import Topic
            with Topic({name!r}) as t:
                for m in (b"m0", b"m1", b"m2"):
                    t.publish(m)
            """)
        _core.fault(1, "topic.recv.copied", signal=signal.SIGUSR1)
        with pytest.raises(Interrupt):
            _take(sub, how)
        _core.fault(0)
        assert sub._kept == (2 if how == "recv_many" else 1)
        got: list[bytes] = []
        while len(got) < 3:
            if then == "recv_many":
                got += sub.recv_many(3, timeout=1.0)
            elif then == "recv_view":
                view = sub.recv_view(timeout=1.0)
                assert view.intact
                with view as mv:
                    got.append(bytes(mv))
            elif then == "recv_array":
                with pytest.raises(LayoutMismatchError):  # a misfit leaves it first
                    sub.recv_array(np.uint32, timeout=1.0)
                got.append(sub.recv_array(np.uint8, timeout=1.0).tobytes())
            else:
                got.append(sub.recv(timeout=1.0))
        assert got == [b"m0", b"m1", b"m2"]
        assert sub._kept == 0 and sub.lag == 0


@pytest.mark.parametrize("how", ["recv", "recv_nowait", "recv_many", "recv_view", "recv_array"])
def test_a_receive_of_kept_messages_that_a_signal_handler_interrupts_keeps_them(
        name, raising_handler, how):
    """A subscriber's receive that returns kept messages asks for signals
    last, as every receive does: an interrupt there leaves them kept."""
    with Topic(name, capacity=1 << 14) as topic, topic.subscribe() as sub:
        for m in (b"m0", b"m1", b"m2"):
            topic.publish(m)
        kept_through_two_interrupts(sub, "topic.recv.copied", lambda: _take(sub, how))


def test_recv_array_interrupted_as_it_makes_the_array_keeps_the_message(name):
    """A Ctrl-C at any bytecode of a subscriber's making of the array, once the
    message is taken, leaves the message kept for the next receive."""
    with Topic(name, capacity=1 << 14) as topic, topic.subscribe() as sub:
        k = 0
        while True:
            k += 1
            topic.publish(np.arange(6, dtype=np.int32))
            seen = [0]
            try:
                seen = interrupt_at_bytecode(k, lambda c: c is _arrays.array_of.__code__)
                got = sub.recv_array(np.int32, (2, 3), timeout=1.0)
            except KeyboardInterrupt:
                sys.settrace(None)
                assert sub._kept == 1, k
                got = sub.recv_array(np.int32, (2, 3), timeout=1.0)
            finally:
                sys.settrace(None)
            assert got.tolist() == [[0, 1, 2], [3, 4, 5]], k
            if seen[0] < k:
                break
        assert k > 3


def test_messages_kept_across_an_interrupt_come_before_a_loss_met_after_them(name):
    """recv_many takes a run of messages, then finds the rest overwritten: it
    returns the run and leaves the loss for the next call.  A Ctrl-C as it
    returns keeps the run; the next receives return it first, then raise
    MessagesLost, in the order the topic had them."""
    import subprocess
    import textwrap
    from conftest import SRC
    with Topic(name, capacity=1 << 15, overflow="overwrite") as topic:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import signal, sys
            from shmkit import Topic, _core
            from shmkit.errors import MessagesLost
            class Interrupt(Exception): pass
            def handler(*a): raise Interrupt
            signal.signal(signal.SIGUSR1, handler)
            with Topic.open({name!r}) as topic, topic.subscribe() as sub:
                print("ready", flush=True)
                sys.stdin.readline()
                _core.fault(2, "topic.recv.copied", stop=True)  # the second run, copied
                try:
                    sub.recv_many(10000, timeout=5)
                    print("no interrupt", flush=True)
                except Interrupt:
                    pass
                _core.fault(0)
                print(sub._kept, sub.recv(timeout=1), flush=True)
                try:
                    while True:
                        sub.recv(timeout=1)
                except MessagesLost:
                    print("lost after", sub._kept, flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=SRC))
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "ready"
            for i in range(600):
                topic.publish(b"%016d" % i)
            child.stdin.write("\n")
            child.stdin.flush()
            os.waitpid(child.pid, os.WUNTRACED)  # stopped, its first run taken
            for i in range(4000):  # laps it
                topic.publish(b"x" * 16)
            os.kill(child.pid, signal.SIGUSR1)
            os.kill(child.pid, signal.SIGCONT)
            kept, first = child.stdout.readline().strip().split(maxsplit=1)
            assert int(kept) > 1 and first == "b'0000000000000000'"
            assert child.stdout.readline().strip() == "lost after 0"
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


# -- misuse -----------------------------------------------------------------------------


def test_misuse_raises_specific_errors(name, names):
    with pytest.raises(ValueError, match="capacity"):
        Topic(names(), capacity=10)
    with pytest.raises(SizeLimitError):
        Topic(names(), capacity=1 << 50)
    with pytest.raises(ValueError, match="overflow"):
        Topic(names(), overflow="drop")
    with pytest.raises(ValueError, match="max_subscribers"):
        Topic(names(), max_subscribers=0)
    with pytest.raises(SizeLimitError):
        Topic(names(), max_subscribers=5000)
    with pytest.raises(ValueError, match="history"):
        Topic(names(), history=-1)
    with pytest.raises(NotFoundError):
        Topic.open(names())
    topic = Topic(name, capacity=1024, history=2, max_subscribers=2)
    with pytest.raises(MessageTooLarge, match="1008"):
        topic.publish(b"x" * 1009)
    topic.publish(b"x" * 1008)
    with pytest.raises(TypeError, match="bytes-like"):
        topic.publish("text")
    with pytest.raises(BufferError):
        topic.publish(np.arange(10)[::2])
    for kw in ({"history": 3}, {"overflow": "overwrite"}, {"max_subscribers": 3},
               {"capacity": 2048}):
        with pytest.raises(MismatchError, match=list(kw)[0]):
            Topic(name, **kw)
    with Topic(name, capacity=512, history=2, overflow="block") as same:  # agreeing: fine
        assert same.capacity == 1024
    a, b = topic.subscribe(), topic.subscribe()
    with pytest.raises(BusyError, match="max_subscribers=2"):
        topic.subscribe()
    a.close()
    c = topic.subscribe()
    with pytest.raises(ClosedError):
        a.recv_nowait()
    with pytest.raises(TypeError):
        Subscriber()
    with pytest.raises(TypeError, match="belongs to the process"):
        import pickle
        pickle.dumps(b)
    topic.close()
    assert b.closed and c.closed
    with pytest.raises(ClosedError):
        b.recv_nowait()
    with pytest.raises(ClosedError):
        topic.publish(b"x")
    with pytest.raises(ClosedError):
        topic.subscribe()
    with shmkit.Channel(names(), capacity=4096) as ch:
        with pytest.raises(WrongKindError):
            Topic.open(ch.name)
    ro = Topic.open(name, readonly=True)
    with pytest.raises(PermissionError):
        ro.publish(b"x")
    assert ro.statistics()["published"] == 1
    ro.close()


def test_batches_check_every_message_first_and_say_what_went(name):
    with Topic(name, capacity=1024) as topic:
        sub = topic.subscribe()
        assert topic.publish_many([]) == 0 and sub.recv_many(timeout=0) == []
        for bad, err in ([b"a", b"x" * 1009], MessageTooLarge), ([b"a", "text"], TypeError), \
                ([b"a", np.arange(10)[::2]], BufferError), (b"ab", TypeError), (5, TypeError):
            with pytest.raises(err):
                topic.publish_many(bad)
            assert topic.published == 0  # nothing of a refused batch went
        assert topic.publish_many((bytearray(b"%d" % i) for i in range(3))) == 3
        assert sub.recv_many() == [b"0", b"1", b"2"]
        # block mode: the subscriber does not read, so the batch stops where room ends
        with pytest.raises(Timeout) as e:
            topic.publish_many([b"y" * 100] * 20, timeout=0.05)
        went = e.value.sent
        assert 0 < went < 20 and topic.published == 3 + went
        assert sub.recv_many(max_n=2) == [b"y" * 100] * 2
        assert len(sub.recv_many()) == went - 2 and sub.lag == 0
        for bad_n in (0, -1):
            with pytest.raises(ValueError, match="max_n"):
                sub.recv_many(bad_n)
        with pytest.raises(TypeError):
            sub.recv_many("3")
        with topic.loan(4, timeout=1):
            with pytest.raises(BusyError, match="open loan"):
                topic.publish_many([b"a"])
        assert sub.recv_many(timeout=1) == [bytes(4)]
        sub.close()
        with pytest.raises(ClosedError):
            sub.recv_many()
    with pytest.raises(ClosedError):
        topic.publish_many([b"a"])


@pytest.mark.parametrize("how", ["recv", "recv_many"])
def test_a_loss_report_cut_short_by_ctrl_c_is_raised_by_the_next_call(name, monkeypatch, how):
    """Ctrl-C landing while MessagesLost is being made (its __init__ runs
    Python code) leaves the count for the next call: no loss goes unreported."""
    with Topic(name, capacity=1024, overflow="overwrite") as topic:
        sub = topic.subscribe()
        topic.publish_many([b"%03d" % i + b"." * 100 for i in range(40)])
        init = MessagesLost.__init__
        hits = []

        def interrupted(self, *args):
            if not hits:
                hits.append(1)
                raise KeyboardInterrupt
            init(self, *args)

        monkeypatch.setattr(MessagesLost, "__init__", interrupted)
        receive = getattr(sub, how)
        with pytest.raises(KeyboardInterrupt):
            receive(timeout=0)
        with pytest.raises(MessagesLost) as e:
            receive(timeout=0)
        rest = sub.recv_many()
        assert e.value.missed == sub.missed and e.value.missed + len(rest) == 40


def _publish_numbers(name, n):
    pad = b"." * 1000  # runs long enough to be overwritten while they are copied
    with Topic.open(name) as topic:
        for i in range(0, n, 50):
            topic.publish_many([b"%09d" % j + pad for j in range(i, min(n, i + 50))])


def test_recv_many_refuses_a_bool_for_max_n(name):
    """recv_many(True) raises TypeError, as a bool given for a count or a
    timeout elsewhere does (it took True as max_n=1), and takes nothing."""
    with Topic(name, capacity=4096) as topic, topic.subscribe() as sub:
        run_python(f"""
            import shmkit
            with shmkit.Topic.open({name!r}) as t:
                t.publish_many([b"a", b"b"], timeout=10)
        """)
        for flag in (True, False, np.True_):
            with pytest.raises(TypeError, match="max_n"):
                sub.recv_many(flag, timeout=5)
            with pytest.raises(TypeError, match="max_n"):
                sub.recv_many(max_n=flag, timeout=5)
        assert sub.lag == 2
        assert sub.recv_many(2, timeout=5) == [b"a", b"b"]


def test_recv_many_keeps_a_loss_for_the_next_call(name):
    """Overwrite mode: a loss met after taking messages is raised by the next
    call, with the exact count, and the messages taken are returned."""
    with Topic(name, capacity=16384, overflow="overwrite") as topic:
        sub = topic.subscribe()
        topic.publish_many([b"%03d" % i for i in range(5)])
        assert sub.recv_many(2) == [b"000", b"001"]
        topic.publish_many([b"%03d" % i + b"." * 900 for i in range(5, 40)])
        with pytest.raises(MessagesLost) as e:
            sub.recv_many()
        first = e.value.missed
        rest = sub.recv_many()
        assert first + len(rest) == 38 and sub.missed == first
        assert [int(m[:3]) for m in rest] == list(range(40 - len(rest), 40))
        # a publisher in another process overwrites while recv_many copies:
        # losses found behind messages already taken add up exactly
        n = 100_000
        pid = _fork(_publish_numbers, name, n)
        got = lost = calls = 0
        last = -1
        while True:
            try:
                ms = sub.recv_many(1000, timeout=0)
            except MessagesLost as e:
                lost += e.missed
                continue
            calls += 1
            if not ms:
                if pid and os.waitpid(pid, os.WNOHANG)[0]:
                    pid = 0
                if not pid and sub.lag == 0:
                    break
                continue
            for m in ms:
                assert int(m[:9]) > last
                last = int(m[:9])
            got += len(ms)
        assert last == n - 1 and got + lost == n and sub.missed == first + lost
        assert lost > 0


def _die_publishing(name, point, msgs):
    pid = os.fork()
    if pid == 0:
        t2 = Topic.open(name)
        _core.fault(1, point)
        t2.publish_many(msgs)
        os._exit(3)
    _, st = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(st)


@pytest.mark.parametrize("point", ["topic.publish.skip_tail", "topic.publish.skip_journal",
                                   "topic.publish.head", "topic.publish.copied",
                                   "topic.publish.seq", "topic.publish.tail"])
def test_repair_after_a_record_that_wraps_over_its_own_marker(name, point):
    """A record of more than half the ring, wrapping at an offset smaller than
    itself, overwrites its own wrap marker: the repair after its publisher
    died recounts from the marker's end (a journal entry written there), so
    the topic goes on, with no false loss in block mode."""
    t = Topic(name, capacity=1024)  # block
    sub = t.subscribe()
    t.publish(b"a")
    assert sub.recv(timeout=1) == b"a"
    _die_publishing(name, point, [b"x" * t.max_message])
    got = sub.recv_many(timeout=0.2)  # the big one if its tail was stored
    t.publish(b"after", timeout=1)
    got += sub.recv_many(timeout=0.2)
    assert got[-1] == b"after" and got[:-1] in ([], [b"x" * t.max_message])
    assert t.published == 1 + len(got) and sub.missed == 0
    t.close()


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("point", ["topic.publish.journal", "topic.publish.copied",
                                   "topic.publish.tail", "topic.publish.seq"])
def test_a_publisher_killed_anywhere_leaves_no_lag_nobody_can_receive(name, point, many):
    """However a publisher dies, with nobody publishing after it: once a
    subscriber has received what can be received its lag is 0, and the topic
    never counts a message no subscriber can receive.  (seq was stored before
    tail: a publisher killed between the two held every subscriber's lag at
    1 until another publisher came, seen in the kill tests under load.)"""
    t = Topic(name, capacity=4096)
    sub = t.subscribe()
    t.publish(b"a")
    assert sub.recv(timeout=1) == b"a"
    pid = os.fork()
    if pid == 0:
        t2 = Topic.open(name)
        _core.fault(1, point)
        if many:
            t2.publish_many([b"x", b"y"])
        else:
            t2.publish(b"x")
        os._exit(3)
    _, st = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(st)
    got = sub.recv_many(timeout=0.2)
    assert got in ([], [b"x", b"y"] if many else [b"x"])
    assert sub.lag == 0 and t.statistics()["subscribers"][0]["lag"] == 0
    assert t.published <= 1 + len(got)
    t.publish(b"after", timeout=1)
    got += sub.recv_many(timeout=0.2)
    assert got[-1] == b"after" and t.published == 1 + len(got) and sub.lag == 0
    assert sub.missed == 0
    t.close()


def test_close_from_another_thread_ends_its_receive_and_steals_nothing(name):
    """A subscriber closed while another thread waits in its recv_many keeps its
    entry until that receive ends (ClosedError): a new subscriber given the
    entry afterwards gets every message."""
    t = Topic(name, capacity=4096)
    s1 = t.subscribe()
    out = []

    def receive():
        try:
            out.append(s1.recv_many(timeout=3))
        except ClosedError as e:
            out.append(e)

    th = threading.Thread(target=receive)
    th.start()
    time.sleep(0.2)
    s1.close()
    th.join(5)
    assert not th.is_alive() and isinstance(out[0], ClosedError)
    s2 = t.subscribe()
    t.publish_many([b"a", b"b", b"c"])
    assert s2.recv_many(timeout=0.5) == [b"a", b"b", b"c"]
    t.close()


def test_publish_many_says_sent_zero_and_refuses_a_loan_its_iterable_opens(name):
    t = Topic(name, capacity=1024)
    sub = t.subscribe()
    t.publish(b"x" * 900)
    with pytest.raises(Timeout) as e:
        t.publish_many([b"y" * 500], timeout=0.01)
    assert e.value.sent == 0
    sub.close()
    loans = []

    def gen():
        yield b"a"
        loans.append(t.loan(4))
        yield b"b"

    with pytest.raises(BusyError, match="open loan"):
        t.publish_many(gen(), timeout=1)
    loans[0].abandon()
    assert t.published == 1
    t.close()


def test_full_nowait_in_block_mode(name):
    with Topic(name, capacity=256) as topic, topic.subscribe():
        topic.publish_nowait(b"a" * 100)
        with pytest.raises(Full, match="subscriber 0 is 1 messages behind"):
            topic.publish_nowait(b"a" * 200)


# -- processes ----------------------------------------------------------------------------


def _subscriber_proc(topic, ready, k, expect, out, batch=False):
    sub = topic.subscribe()
    _core.add64(ready._mapping, ready._hsize, 1)
    last: dict[int, int] = {}
    bad = lost = 0
    got = 0
    rnd = random.Random(k)
    while got + lost < expect:
        try:
            ms = sub.recv_many(rnd.choice([1, 7, 300, 5000]), timeout=60) if batch else \
                [sub.recv(timeout=60)]
        except MessagesLost as e:
            lost += e.missed
            continue
        if not ms:
            break  # recv_many's timeout: the counts below tell
        for m in ms:
            who, seq = struct.unpack_from("II", m)
            if seq != last.get(who, -1) + 1 and topic.overflow == "block":
                bad += 1
            if seq <= last.get(who, -1):
                bad += 1
            last[who] = seq
            got += 1
            if topic.overflow == "overwrite" and got % 50 == 0:
                time.sleep(0.002)  # fall behind now and then
    out.write(struct.pack("QQQ", got, lost, bad), k * 24)


def _publisher_proc(topic, who, n, size, batch=False):
    rnd = random.Random(who)
    i = 0
    while i < n:
        if batch:
            k = min(n - i, rnd.choice([1, 5, 64, 700]))
            assert topic.publish_many([_msg(who, j, size) for j in range(i, i + k)],
                                      timeout=60) == k
            i += k
        else:
            topic.publish(_msg(who, i, size), timeout=60)
            i += 1


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("overflow", ["block", "overwrite"])
def test_subscribers_by_publishers_across_processes(names, overflow, batch):
    """Every subscriber gets every publisher's messages in order, once; in
    overwrite mode every loss is reported, exactly (a loss recv_many meets
    after taking messages is raised by its next call)."""
    nsub, npub, n = 3, 2, 3000
    topic = Topic(names(), capacity=1 << 15, overflow=overflow)
    ready = shmkit.Segment(names(), size=8)
    out = shmkit.Segment(names(), size=24 * nsub)
    subs = [spawn(_subscriber_proc, topic, ready, k, npub * n, out, batch)
            for k in range(nsub)]
    end = time.monotonic() + 60
    while _core.load64(ready._mapping, ready._hsize) < nsub and time.monotonic() < end:
        time.sleep(0.01)
    pubs = [spawn(_publisher_proc, topic, w, n, w * 37, batch) for w in range(npub)]
    for p in pubs + subs:
        p.join(120)
        assert p.exitcode == 0
    for k in range(nsub):
        got, lost, bad = struct.unpack("QQQ", out.read(24, k * 24))
        assert bad == 0, k
        assert got + lost == npub * n, (got, lost)  # every loss reported, exactly
        if overflow == "block":
            assert lost == 0
    assert topic.statistics()["published"] == npub * n
    topic.close()


def _never_reads(topic, ready):
    sub = topic.subscribe()
    _core.add64(ready._mapping, ready._hsize, 1)
    time.sleep(600)
    sub.close()


def test_block_waits_for_a_live_subscriber_and_reclaims_a_dead_one(names):
    topic = Topic(names(), capacity=1024)
    ready = shmkit.Segment(names(), size=8)
    pid = _fork(_never_reads, topic, ready)
    while _core.load64(ready._mapping, ready._hsize) < 1:
        time.sleep(0.01)
    for _ in range(8):  # 8 records of 128 bytes fill the ring
        topic.publish(b"m" * 100, timeout=5)
    with pytest.raises(Timeout, match="did not read"):
        topic.publish(b"m" * 100, timeout=0.3)
    st = topic.statistics()
    assert st["subscribers"][0]["pid"] == pid and st["subscribers"][0]["lag"] == 8
    _kill(pid)
    for _ in range(50):  # its place is reclaimed: the publisher goes on
        topic.publish(b"m" * 100, timeout=10)
    assert topic.statistics()["subscribers"] == []
    topic.close()


def _view_and_die(topic, ready):
    sub = topic.subscribe()
    v = sub.recv_view(timeout=10)
    with v:
        _core.add64(ready._mapping, ready._hsize, 1)
        time.sleep(600)


def test_a_dead_view_holder_releases_its_message(names):
    topic = Topic(names(), capacity=1024)
    ready = shmkit.Segment(names(), size=8)
    pid = _fork(_view_and_die, topic, ready)
    time.sleep(0.2)
    topic.publish(b"v" * 400, timeout=5)
    while _core.load64(ready._mapping, ready._hsize) < 1:
        time.sleep(0.01)
    topic.publish(b"w" * 400, timeout=5)
    with pytest.raises(Timeout):
        topic.publish(b"w" * 400, timeout=0.2)
    blocked = threading.Thread(target=lambda: topic.publish(b"x" * 400, timeout=20))
    blocked.start()
    time.sleep(0.1)
    _kill(pid)  # a publisher asleep for space notices within a slice
    blocked.join(30)
    assert not blocked.is_alive()
    topic.close()


BATCH_MAX = 40  # the most messages a batch publisher may have in flight when killed


def _crash_publisher(topic, done, who, start, batch=False):
    m = done._mapping
    rnd = random.Random(os.getpid())
    i = start
    while True:
        k = rnd.randrange(1, BATCH_MAX + 1) if batch else 1
        msgs = [_msg(who, j, rnd.choice([0, 8, 100, 3000])) for j in range(i, i + k)]
        if batch:
            topic.publish_many(msgs, timeout=60)
        else:
            topic.publish(msgs[0], timeout=60)
        _core.store64(m, done._hsize + 8 * who, i + k)
        i += k


def _crash_subscriber(topic, errors, batch=False):
    sub = topic.subscribe()
    last: dict[int, int] = {}
    while True:
        try:
            ms = sub.recv_many(64, timeout=60) if batch else [sub.recv(timeout=60)]
        except MessagesLost:  # overwrite mode: told, and goes on from the oldest kept
            continue
        for m in ms:
            who, seq = struct.unpack_from("II", m)
            if seq <= last.get(who, -1):
                _core.store64(errors._mapping, errors._hsize, 1)
            last[who] = seq


@pytest.mark.parametrize("cycles,overflow,batch", [
    (30, "block", False),
    (30, "block", True),
    pytest.param(1000, "block", False, marks=pytest.mark.stress),
    pytest.param(1000, "overwrite", False, marks=pytest.mark.stress),
    pytest.param(1000, "block", True, marks=pytest.mark.stress),
    pytest.param(1000, "overwrite", True, marks=pytest.mark.stress),
])
def test_random_kills_of_publishers_and_subscribers(names, cycles, overflow, batch):
    """SIGKILL publishers and subscribers at random; a checker subscriber in this
    process accounts for every publisher's sequence numbers: none twice, none out
    of order, none that publish() (or publish_many()) confirmed missing (block),
    every loss reported exactly (overwrite).  batch: publish_many and recv_many;
    a batch cut short by a kill publishes a prefix of itself."""
    inflight = BATCH_MAX if batch else 1
    rnd = random.Random(7 + cycles)
    npub = 3
    topic = Topic(names(), capacity=64 << 10, max_subscribers=8, overflow=overflow)
    done = shmkit.Segment(names(), size=8 * npub)
    errors = shmkit.Segment(names(), size=8)
    checker = topic.subscribe()
    got: dict[int, list[int]] = {w: [] for w in range(npub)}
    stop = threading.Event()
    failures = []
    lost = [0]

    def check():
        while not stop.is_set():
            try:
                ms = checker.recv_many(100, timeout=0.1) if batch else \
                    [checker.recv(timeout=0.1)]
            except Timeout:
                continue
            except MessagesLost as e:
                lost[0] += e.missed
                continue
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
                return
            for m in ms:
                who, seq = struct.unpack_from("II", m)
                got[who].append(seq)

    t = threading.Thread(target=check)
    t.start()
    first = [0] * npub
    in_flight: dict[int, set[int]] = {w: set() for w in range(npub)}
    pubs = {w: _fork(_crash_publisher, topic, done, w, 0, batch) for w in range(npub)}
    subs = [_fork(_crash_subscriber, topic, errors, batch) for _ in range(2)]
    try:
        for _ in range(cycles):
            time.sleep(rnd.uniform(0, 0.02))
            if rnd.random() < 0.4:
                _kill(subs.pop(rnd.randrange(len(subs))))
                subs.append(_fork(_crash_subscriber, topic, errors, batch))
            else:
                w = rnd.randrange(npub)
                _kill(pubs[w])
                sending = max(first[w], _core.load64(done._mapping, done._hsize + 8 * w))
                in_flight[w].update(range(sending, sending + inflight))
                first[w] = sending + inflight
                pubs[w] = _fork(_crash_publisher, topic, done, w, first[w], batch)
        for w in list(pubs):
            _kill(pubs.pop(w))
            sending = max(first[w], _core.load64(done._mapping, done._hsize + 8 * w))
            in_flight[w].update(range(sending, sending + inflight))
        confirmed = [_core.load64(done._mapping, done._hsize + 8 * w) for w in range(npub)]
        end = time.monotonic() + 30
        while checker.lag and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
        for p in subs:
            _kill(p)
    assert not failures, failures
    assert checker.lag == 0
    assert _core.load64(errors._mapping, errors._hsize) == 0, "a subscriber saw disorder"
    missing = 0
    for w in range(npub):
        seqs = got[w]
        assert seqs == sorted(set(seqs)), "duplicate or reordered"
        gone = set(range(confirmed[w])) - set(seqs) - in_flight[w]
        missing += len(gone)
        if overflow == "block":
            assert not gone, "a confirmed message lost"
    # overwrite: every message lost was reported (in-flight ones of killed
    # publishers may have been published and then overwritten as well)
    assert missing <= lost[0] <= missing + sum(len(v) for v in in_flight.values())
    assert checker.missed == lost[0]
    # the topic still works for newcomers
    with topic.subscribe() as fresh:
        topic.publish(b"probe", timeout=5)
        assert fresh.recv(timeout=5) == b"probe"
    assert len(topic.statistics()["subscribers"]) == 1  # the killed ones are not counted
    topic.close()


def _die_at_point(name, k, w, batch=False):
    topic = Topic.open(name)
    sub = topic.subscribe(history=2)
    _core.fault(k, "topic.")
    msgs = [_msg(1, i, 3000 if i % 2 else 10) for i in range(4)]
    if batch:  # one run of 4 records: every point of a run, a repair after each
        assert topic.publish_many(msgs, timeout=10) == 4
        os.write(w, b"".join(b"S %d\n" % i for i in range(4)))
    else:
        for i, m in enumerate(msgs):
            topic.publish(m, timeout=10)
            os.write(w, b"S %d\n" % i)
    for _ in range(6):
        try:
            ms = sub.recv_many(3, timeout=0.5) if batch else [sub.recv(timeout=0.5)]
        except (Timeout, MessagesLost):
            continue
        with topic.subscribe():  # join and leave: their crash points too
            pass
        for m in ms:
            if len(m) >= 8:  # not one of the parent's probes (history)
                os.write(w, b"R %d\n" % struct.unpack_from("II", m)[1])
    topic.publish(_msg(1, 99), timeout=10)
    with sub.recv_view(timeout=5) as mv:
        bytes(mv)
    sub.close()
    _core.fault(0)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("overflow", ["block", "overwrite"])
def test_killed_at_every_topic_crash_point(name, overflow, batch):
    """For k = 1, 2, ...: a child dies at the k-th topic crash point of its
    publishes, subscriptions and receives.  After each death the parent's own
    subscriber gets each confirmed message once, in order; new publishers and
    subscribers work, and nothing stays blocked."""
    topic = Topic(name, capacity=16 << 10, history=2, max_subscribers=4,
                  overflow=overflow)
    watcher = topic.subscribe(history=0)
    seen: list[int] = []
    kills = k = 0
    while True:
        k += 1
        assert k < 300, "the child never completed"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _die_at_point(name, k, w, batch)
            except BaseException as e:  # noqa: BLE001
                os.write(w, b"E %s\n" % repr(e).encode()[:300])
            finally:
                os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            lines = [x for x in f.read().split(b"\n") if x]
        for line in lines:
            assert not line.startswith(b"E "), (k, line)
        confirmed = {int(x.split()[1]) for x in lines if x.startswith(b"S ")}
        killed = os.WIFSIGNALED(status)
        kills += killed
        mine = []
        while True:
            try:
                m = watcher.recv(timeout=0.05)
            except Timeout:
                break
            mine.append(struct.unpack_from("II", m)[1])
        mine = [s for s in mine if s != 99]
        assert mine == sorted(set(mine)), (k, mine)
        assert confirmed <= set(mine), (k, confirmed, mine)
        topic.publish(b"probe", timeout=5)  # nothing blocks: a dead subscriber is freed
        assert watcher.recv(timeout=5) == b"probe"
        with Topic.open(name) as other, other.subscribe(history=0) as s2:
            other.publish(b"probe2", timeout=5)
            assert s2.recv(timeout=5) == b"probe2"
        assert watcher.recv(timeout=5) == b"probe2"
        if not killed:
            break
    assert kills > 15, kills
    assert len(topic.statistics()["subscribers"]) == 1
    topic.close()


# -- damage -------------------------------------------------------------------------


def test_hostile_header_bytes_raise_corrupt_error(name):
    topic = Topic(name, capacity=4096, history=1)
    topic.publish(b"hello")
    seg = topic._seg
    base = seg._hsize
    fields = [(L["magic"], 4), (L["format"], 4), (L["cap"], 8), (L["data_off"], 8),
              (L["max_subs"], 4), (L["overflow"], 4), (L["max_slots"], 4),
              (L["subs_off"], 4), (L["history"], 8)]
    rnd = random.Random(3)
    for off, width in fields:
        for value in (0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), rnd.getrandbits(8 * width)):
            old = _read(seg, base + off, width)
            _write(seg, base + off, value.to_bytes(width, "little"))
            try:
                with Topic.open(name) as t2:
                    # some values are harmless (an equal one): then it must still work
                    with t2.subscribe() as s:
                        t2.publish(b"ok", timeout=1)
                        s.recv(timeout=1)
            except (CorruptError, FormatVersionError, MismatchError, Timeout):
                pass
            finally:
                _write(seg, base + off, old)
    # positions: head beyond tail, misaligned tail, a record with a wild length
    sub = topic.subscribe(history=0)
    for off, value in ((L["head"], 1 << 60), (L["tail"], 8), (L["tail"], 1 << 62)):
        old = bytes(_read(seg, base + off, 8))
        _write(seg, base + off, value.to_bytes(8, "little"))
        with pytest.raises(CorruptError, match="topic"):  # (off, value) in the report
            try:
                sub.recv_nowait()
            except Empty:
                topic.publish(b"x", timeout=1)
            raise AssertionError((off, value))
        _write(seg, base + off, old)
    topic.close()


def _read(seg, off, n):
    return b"".join(_core.load32(seg._mapping, off + i).to_bytes(4, "little")
                    for i in range(0, n, 4))


def _write(seg, off, data):
    for i in range(0, len(data), 4):
        _core.store32(seg._mapping, off + i, int.from_bytes(data[i:i + 4], "little"))


def test_hostile_records_and_cursors_raise_corrupt_error(name):
    topic = Topic(name, capacity=4096)
    sub = topic.subscribe()
    topic.publish(b"a" * 32)
    seg = topic._seg
    data_off = _core.load64(seg._mapping, seg._hsize + L["data_off"])
    rec = seg._hsize + data_off
    _core.store32(seg._mapping, rec, 0xFFFFFFF0)  # wild length
    with pytest.raises(CorruptError, match="overruns"):
        sub.recv_nowait()
    _core.store32(seg._mapping, rec, 32)
    _core.store32(seg._mapping, rec + 4, 7)  # unknown state
    with pytest.raises(CorruptError, match="state"):
        sub.recv_nowait()
    _core.store32(seg._mapping, rec + 4, 0x3147534D)
    subs_off = _core.load32(seg._mapping, seg._hsize + L["subs_off"])
    entry = seg._hsize + subs_off + sub.index * 64
    _core.store64(seg._mapping, entry + 8, 1 << 40)  # cursor beyond the tail
    with pytest.raises(CorruptError, match="beyond the tail"):
        sub.recv_nowait()
    _core.store64(seg._mapping, entry + 8, 0)
    assert sub.recv_nowait() == b"a" * 32
    topic.close()


# -- waiting, forks, the documented layout ------------------------------------------


def test_blocked_recv_and_publish_let_ctrl_c_through(name):
    import subprocess
    import sys
    import textwrap

    from conftest import SRC
    Topic(name, capacity=256).close()
    for call in ("sub.recv()", "t.publish(b'x' * 200); t.publish(b'x' * 200)"):
        code = f"""
            import shmkit
            t = shmkit.Topic.open({name!r})
            sub = t.subscribe(history=0)
            print("ready", flush=True)
            try:
                {call}
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        """
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        assert p.communicate(timeout=10)[0].strip() == "interrupted", call


@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_subscribe_while_a_stopped_peer_holds_the_lock_times_out_naming_it(name, then):
    """A publisher stopped (SIGSTOP) inside a loan holds the publishers'
    lock: ``subscribe(timeout=)`` raises Timeout within its timeout naming
    the stopped pid (it took no timeout and waited for good), while what
    takes no lock (a subscriber's close, ``lag``, ``statistics()``) goes on;
    resumed, the loan is published and subscribing works again; killed, the
    next subscribe takes the lock over."""
    import subprocess
    import sys
    import textwrap

    from conftest import SRC
    with Topic(name, capacity=4096) as t:
        early, spare = t.subscribe(), t.subscribe()
        code = f"""
            import os, signal, shmkit
            t = shmkit.Topic.open({name!r})
            with t.loan(4) as loan:
                loan.buffer[:] = b"late"
                print("loaned", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
        """
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
        try:
            assert p.stdout.readline().strip() == "loaned"
            _pid, status = os.waitpid(p.pid, os.WUNTRACED)  # until it is stopped
            assert os.WIFSTOPPED(status), status
            for timeout in (0.3, 0):
                t0 = time.monotonic()
                with pytest.raises(Timeout, match=f"pid {p.pid}, which is stopped"):
                    t.subscribe(timeout=timeout)
                assert time.monotonic() - t0 < 5
            t0 = time.monotonic()
            assert early.lag == 0 and len(t.statistics()["subscribers"]) == 2
            spare.close()
            assert len(t.statistics()["subscribers"]) == 1
            assert time.monotonic() - t0 < 5
            if then == "resumed":
                os.kill(p.pid, signal.SIGCONT)
                assert p.wait(30) == 0
                assert early.recv(timeout=5) == b"late"
            else:
                p.kill()
                p.wait(30)
            with t.subscribe(timeout=10) as late:
                t.publish(b"next", timeout=5)
                assert late.recv(timeout=5) == b"next"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
            p.stdout.close()


def test_closing_the_topic_wakes_a_waiting_subscriber(name):
    topic = Topic(name, capacity=4096)
    sub = topic.subscribe()
    errors = []

    def wait():
        try:
            sub.recv(timeout=20)
        except ValueError as e:  # ClosedError
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    topic.close()
    t.join(10)
    assert not t.is_alive() and errors and isinstance(errors[0], ClosedError)


def test_dead_sleepers_are_counted_out(name):
    topic = Topic(name, capacity=4096)

    def sleeper():
        Topic.open(name).subscribe().recv()

    pids = [_fork(sleeper) for _ in range(3)]
    deadline = time.monotonic() + 10
    while topic.statistics()["subscribers_waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert topic.statistics()["subscribers_waiting"] == 3
    for pid in pids:
        _kill(pid)
    sub = topic.subscribe()
    with pytest.raises(Timeout):
        sub.recv(timeout=0.3)  # a waiter takes the dead sleepers' counts off
    assert topic.statistics()["subscribers_waiting"] == 0
    topic.close()


def test_a_forked_child_cannot_use_its_parents_subscriber(name):
    topic = Topic(name, capacity=4096)
    sub = topic.subscribe()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sub.recv_nowait()
            os.write(w, b"no error")
        except ClosedError as e:
            os.write(w, b"closed" if "subscribe again" in str(e) else b"other")
        except BaseException as e:  # noqa: BLE001
            os.write(w, repr(e).encode()[:200])
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 300) == b"closed"
    os.close(r)
    topic.publish(b"still mine")
    assert sub.recv(timeout=1) == b"still mine"  # the child's exit left it alone
    topic.close()


def test_layout_table_in_docs_matches_the_core():
    import re
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(here, "docs", "topic.md"), encoding="utf-8").read()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    doc: dict[str, int] = {}
    for line in block.splitlines():
        if line.startswith(("subs_off", "data_off")):
            continue  # the tables' own lines: offsets within an entry follow
        for off, field in re.findall(r"(?:^|\s{2,})(\d+)\s+([a-z_]+)", line):
            doc.setdefault(field, int(off))
    doc["roles"] = doc.pop("role")
    fields = {k: v for k, v in L.items()
              if k not in ("format_version", "bytes", "subscriber", "record_header")}
    fields.pop("data_sleepers")
    fields.pop("space_sleepers")  # on the same line as their sequence words
    assert {k: doc.get(k) for k in fields} == fields
    # the entry's fields (its owner at 0 and its seq share names with the header's)
    sub = {k: v for k, v in L["subscriber"].items() if k not in ("bytes", "owner", "seq")}
    assert {k: doc.get(k) for k in sub} == sub
    assert L["format_version"] == _core.TOPIC_FORMAT == 1


def test_ls_and_top_count_what_was_published(name):
    """`shmkit top` and `ls` read the counters with pread, at the offsets of
    topic.h: 100 publishes of 64 B show as 100 published and 7.8 KiB in use,
    and the subscriber that read none of them as 100 behind."""
    from shmkit import inspect
    t = Topic(name, capacity=1 << 16)
    sub = t.subscribe()
    try:
        for _ in range(100):
            t.publish(b"x" * 64)
        (row,) = inspect.sample([name])
        assert row["counters"]["published"] == 100
        assert row["counters"]["bytes_used"] == 100 * (16 + 64)
        assert row["counters"]["subscribers"] == 1 and row["counters"]["max_lag"] == 100
        assert inspect.activity(row) == ("100 published, 1 subscriber, lag up to 100, "
                                         "7.8 KiB of 64.0 KiB in the ring")
    finally:
        sub.close()
        t.close()
