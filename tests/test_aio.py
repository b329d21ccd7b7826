"""shmkit.wait (several objects at once) and shmkit.aio (asyncio), across real processes.

Timing checks are liveness checks with wide margins (a ticker keeps ticking,
a call returns within seconds), never speed; speed is benchmarks/bench_aio.py's.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import numpy as np
import pytest

import shmkit
import shmkit.aio as aio
from conftest import SRC, interrupt_at_bytecode, run_python, spawn

PROMPT = 5.0  # "promptly": seconds, on a shared and noisy machine


def _produce(name: str, n: int, delay: float, pause_every: int = 0) -> None:
    ch = shmkit.Channel(name)
    time.sleep(delay)
    for i in range(n):
        ch.send(i.to_bytes(4, "little"), timeout=60)
        if pause_every and i % pause_every == 0:
            time.sleep(0.001)
    ch.close()


def _set_later(name: str, delay: float) -> None:
    ev = shmkit.Event(name)
    time.sleep(delay)
    ev.set()
    ev.close()


def _send_later(name: str, delay: float, data: bytes) -> None:
    ch = shmkit.Channel(name)
    time.sleep(delay)
    ch.send(data)
    ch.close()


def _hold_mutex(name: str, ready) -> None:
    m = shmkit.Mutex(name)
    m.acquire()
    ready.set()
    time.sleep(120)


def _hold_semaphore(name: str, ready) -> None:
    s = shmkit.Semaphore(name, value=1)
    s.acquire()
    ready.set()
    time.sleep(120)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _uring_works() -> bool:
    try:
        shmkit._core.Uring().close()
        return True
    except shmkit._core.UringUnavailableError:
        return False


@pytest.fixture(params=["io_uring", "threads"])
def waker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with awaits woken through io_uring, then by watcher threads
    (SHMKIT_AIO_WAKER, which spawned children inherit too)."""
    if request.param == "io_uring" and not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    monkeypatch.setenv("SHMKIT_AIO_WAKER", request.param)
    return request.param


@pytest.fixture
def threads_waker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test is about the watcher threads themselves."""
    monkeypatch.setenv("SHMKIT_AIO_WAKER", "threads")


# ---- shmkit.wait --------------------------------------------------------------

def test_wait_reports_what_another_process_made_ready(names):
    a, b = shmkit.Channel(names(), capacity=4096), shmkit.Channel(names(), capacity=4096)
    ev = shmkit.Event(names())
    try:
        assert shmkit.wait([a, b, ev], timeout=0.05) == []
        p = spawn(_send_later, b.name, 0.3, b"for b")
        got = shmkit.wait([a, b, ev], timeout=30)
        p.join(30)
        assert got == [b]
        # Readiness never consumes: the message is still there, and still ready.
        assert shmkit.wait([a, b, ev], timeout=0) == [b]
        p = spawn(_set_later, ev.name, 0.2)
        assert b.recv_nowait() == b"for b"
        assert shmkit.wait([a, b, ev], timeout=30) == [ev]
        p.join(30)
        assert ev.is_set()
    finally:
        for o in (a, b, ev):
            o.close()
        ev.unlink()


def test_wait_on_locks_and_semaphores(names):
    m, s, rw = shmkit.Mutex(names()), shmkit.Semaphore(names(), value=0), shmkit.RWLock(names())
    q = shmkit.Queue()
    try:
        m.acquire()
        rw.acquire_write()
        assert shmkit.wait([m, s, rw, q], timeout=0.05) == []
        threading.Timer(0.2, m.release).start()
        assert shmkit.wait([m, s, rw, q], timeout=30) == [m]
        s.release()
        q.put("x")
        rw.release_write()
        assert shmkit.wait([m, s, rw, q], timeout=30) == [m, s, rw, q]
        assert q.get_nowait() == "x" and s.acquire(False) and m.acquire(False)
        m.release()
    finally:
        for o in (m, s, rw):
            o.close()
            o.unlink()
        q.close()


def test_wait_refuses_bad_input(names):
    ev = shmkit.Event(names())
    cond = shmkit.Condition(names())
    try:
        with pytest.raises(ValueError, match="1 to 128"):
            shmkit.wait([])
        with pytest.raises(ValueError, match="got 129"):
            shmkit.wait([ev] * 129)
        with pytest.raises(TypeError, match="Condition"):
            shmkit.wait([ev, cond])
        with pytest.raises(TypeError, match="int"):
            shmkit.wait([3])
        ch = shmkit.Channel(None, capacity=4096)
        ch.close()
        with pytest.raises(shmkit.ClosedError):
            shmkit.wait([ev, ch])
        assert shmkit.wait([ev] * 128, timeout=0) == []
    finally:
        ev.close()
        ev.unlink()
        cond.close()
        cond.unlink()


def test_wait_returns_a_channel_closed_by_another_thread(names):
    ch = shmkit.Channel(names(), capacity=4096)
    ev = shmkit.Event(names())
    try:
        threading.Timer(0.2, ch.close).start()
        t0 = time.monotonic()
        assert shmkit.wait([ch, ev], timeout=30) == [ch]
        assert time.monotonic() - t0 < PROMPT
        with pytest.raises(shmkit.ClosedError):
            ch.recv_nowait()
    finally:
        ev.close()
        ev.unlink()


def test_wait_finds_a_killed_holder_and_releases_the_gil(name):
    from conftest import SPAWN

    m = shmkit.Mutex(name)
    ev = shmkit.Event(None)
    ready = SPAWN.Event()
    p = spawn(_hold_mutex, name, ready)
    assert ready.wait(60)
    got: list = []
    t = threading.Thread(target=lambda: got.append(shmkit.wait([ev, m], timeout=60)))
    t.start()
    spins = 0
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this thread runs while the other waits
        spins += 1
    assert t.is_alive() and spins > 1000
    killed = time.monotonic()
    p.kill()
    t.join(60)
    # The liveness check between slices found the dead holder: m is ready...
    assert got == [[m]] and time.monotonic() - killed < PROMPT
    # ...and the next call recovers it, as after any dead holder.
    with pytest.warns(shmkit.OwnerDiedWarning):
        assert m.acquire(False)
    assert m.recovered
    m.release()
    m.close()
    ev.close()
    p.join(30)


# ---- asyncio: the loop keeps running --------------------------------------------

def test_asyncio_consumer_of_a_producer_process_keeps_the_loop_running(name, waker):
    n = 300

    async def main() -> tuple[list[int], int, int]:
        ch = aio.Channel(name, capacity=4096)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.create_task(ticker())
        p = spawn(_produce, name, n, 0.5, 10)
        first = await ch.recv(timeout=60)  # waits about 0.5 s for the producer
        ticks_at_first = ticks
        got = [int.from_bytes(first, "little")]
        while len(got) < n:
            got.append(int.from_bytes(await ch.recv(timeout=60), "little"))
        t.cancel()
        p.join(30)
        ch.close()
        return got, ticks_at_first, ticks

    got, ticks_at_first, _ = asyncio.run(main())
    assert got == list(range(n))
    # A blocking recv in the coroutine would have frozen the ticker at 0.
    assert ticks_at_first >= 3


def test_async_for_send_and_queue(names):
    async def main() -> None:
        ch = aio.Channel(names(), capacity=256)
        sent = []

        async def sender() -> None:
            for i in range(50):  # more than 256 bytes: awaits room
                await ch.send(bytes([i]) * 20, timeout=30)
                sent.append(i)
            assert await ch.send_many([b"y", b"z"], timeout=30) == 2
            ch.close_sending()

        t = asyncio.create_task(sender())
        got = [m async for m in ch]
        await t
        assert got == [bytes([i]) * 20 for i in range(50)] + [b"y", b"z"]
        ch.close()

        q = aio.Queue(maxsize=2)
        await q.put(1)
        await q.put(2)
        with pytest.raises(queue.Full):
            await q.put(3, timeout=0.05)
        putter = asyncio.create_task(q.put(3, timeout=30))
        assert await q.get(timeout=30) == 1
        await putter
        assert [await q.get(), await q.get()] == [2, 3]
        with pytest.raises(queue.Empty):
            await q.get(timeout=0.05)
        q.close()

    asyncio.run(main())


def test_other_receive_forms(name):
    async def main() -> None:
        ch = aio.Channel(name, capacity=4096)
        p = spawn(_send_later, name, 0.2, b"abcdef")
        buf = bytearray(16)
        assert await ch.recv_into(buf, timeout=30) == 6 and buf[:6] == b"abcdef"
        p.join(30)
        loop = asyncio.get_running_loop()
        sync = shmkit.Channel(name)  # the plain handle's calls, from callbacks
        loop.call_later(0.05, sync.send_nowait, b"view")
        view = await ch.recv_view(timeout=30)
        with view as mv:
            assert bytes(mv) == b"view"
        loop.call_later(0.05, sync.send_many, [b"1", b"2", b"3"])
        got = await ch.recv_many(10, timeout=30)
        while len(got) < 3:
            got += await ch.recv_many(10, timeout=30)
        assert got == [b"1", b"2", b"3"]
        assert await ch.recv_many(10, timeout=0.05) == []
        with pytest.raises(shmkit.Timeout, match="no message arrived"):
            await ch.recv(timeout=0.05)
        ch.close()
        sync.close()

    asyncio.run(main())


def test_recv_array_that_does_not_fit_leaves_the_message_unread(name):
    """The awaited recv_array refuses a message that its dtype, shape or
    out= does not fit as the blocking one does (LayoutMismatchError), also
    one it awaited from another process, and leaves it the next message
    (it was taken, then numpy's ValueError or out='s lost it)."""
    async def main() -> None:
        ch = aio.Channel(name, capacity=4096)
        p = spawn(_send_later, name, 0.2, b"abcde")
        with pytest.raises(shmkit.LayoutMismatchError, match="5 bytes.*left unread"):
            await ch.recv_array(np.int32, timeout=30)
        p.join(30)
        for out in (np.zeros(2, np.int32), np.zeros(6, np.uint8)):
            with pytest.raises(shmkit.LayoutMismatchError, match="5 bytes.*left unread"):
                await ch.recv_array(out=out, timeout=30)
            assert not out.any()
        with pytest.raises(ValueError, match="-1"):
            await ch.recv_array(np.uint8, (-2, 5), timeout=30)
        assert ch.depth == 1
        assert (await ch.recv_array("S5", timeout=30)).tolist() == [b"abcde"]
        ch.send_nowait(np.arange(4, dtype=np.int16))
        with pytest.raises(shmkit.LayoutMismatchError, match="8 bytes"):
            await ch.recv_array(np.int16, (3,), timeout=30)
        out = np.empty((2, 2), np.int16)
        assert await ch.recv_array(out=out, timeout=30) is out
        assert out.tolist() == [[0, 1], [2, 3]]
        with pytest.raises(shmkit.Timeout, match="no message arrived"):
            await ch.recv_array(np.int16, timeout=0.05)
        ch.close()

    asyncio.run(main())


def test_timeouts_and_results_match_the_blocking_calls(names):
    async def main() -> None:
        m, e = aio.Mutex(names()), aio.Event(names())
        s, rw = aio.Semaphore(names(), value=0), aio.RWLock(names())
        try:
            assert await m.acquire(timeout=1)
            assert await m.acquire(timeout=0.05) is False
            assert await m.acquire(blocking=False) is False
            with pytest.raises(shmkit.Timeout):
                async with m.held(timeout=0.05):
                    pass
            m.release()
            async with m:
                assert m.locked()
            assert not m.locked()
            assert await e.wait(timeout=0.05) is False
            asyncio.get_running_loop().call_later(0.05, e.set)
            assert await e.wait(timeout=30) is True
            assert await s.acquire(timeout=0.05) is False
            asyncio.get_running_loop().call_later(0.05, s.release)
            async with s:
                assert s.value == 0
            assert s.value == 1
            assert await rw.acquire_read(timeout=1)
            assert await rw.acquire_write(timeout=0.1) is False
            rw.release_read()
            async with rw.write(timeout=30):
                assert await rw.acquire_read(timeout=0.05) is False
            async with rw.read(timeout=30):
                pass
            with pytest.raises(TypeError, match="async with"):
                with m:
                    pass
        finally:
            for o in (m, e, s, rw):
                o.close()
                o.unlink()

    asyncio.run(main())


def test_auto_reset_event_hands_each_set_to_one_coroutine(name, waker):
    async def main() -> None:
        e = aio.Event(name, auto_reset=True)
        waits = [asyncio.create_task(e.wait(timeout=30)) for _ in range(5)]
        await asyncio.sleep(0.05)
        pending = set(waits)
        for _ in range(3):  # one set() at a time: a set flag does not count sets
            e.set()
            done, pending = await asyncio.wait(pending, timeout=10,
                                               return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and all(t.result() for t in done)
        await asyncio.sleep(0.1)
        assert len(pending) == 2 and not any(t.done() for t in pending)
        assert not e.is_set()
        for t in pending:
            t.cancel()
        e.close()

    asyncio.run(main())


# ---- cancellation -------------------------------------------------------------

def test_cancelled_receives_lose_no_message(name, waker):
    n = 3000

    async def main() -> tuple[list[int], int]:
        ch = aio.Channel(name, capacity=1024)
        p = spawn(_produce, name, n, 0.2, 3)
        got: list[int] = []
        cancelled = 0
        rng = random.Random(7)
        while len(got) < n:
            try:
                m = await asyncio.wait_for(ch.recv(timeout=60), rng.choice([0.0002, 0.001,
                                                                             0.003]))
            except asyncio.TimeoutError:
                cancelled += 1
                continue
            got.append(int.from_bytes(m, "little"))
        p.join(30)
        assert ch.depth == 0
        ch.close()
        return got, cancelled

    got, cancelled = asyncio.run(main())
    assert got == list(range(n))  # none lost, none twice, in order
    assert cancelled > 0  # the test did cancel receives


_WAKE_UP_STEPS = {"io_uring": (aio._Ring.reap, aio._Ring._ready),
                  "threads": (aio._settle_fired, aio._settle)}


def test_an_interrupt_at_any_point_of_a_wake_up_leaves_no_await_stuck(name, waker):
    """A Ctrl-C (here raised by a trace function, as a signal handler would
    raise it) at each bytecode in turn of the loop's side of a wake-up (the
    ring's reap and settling of its futures; the settling of what a watcher
    thread fired): the awaited get it interrupted still returns its object,
    woken there or by the checker's next look, and leaves nothing behind."""
    codes = {f.__code__ for f in _WAKE_UP_STEPS[waker]}
    q = aio.Queue(name=name)
    try:
        for at in itertools.count(1):
            loop = asyncio.new_event_loop()
            hub = aio._hub()
            others = set(hub.where)  # (what earlier tests' closed loops left)
            try:
                task = loop.create_task(q.get(timeout=30))
                loop.run_until_complete(asyncio.sleep(0.02))  # the get now awaits
                ring = aio._ring(loop)
                assert len(ring.waits if ring is not None else set(hub.where) - others) == 1
                q.put_nowait(at)
                seen = interrupt_at_bytecode(at, codes.__contains__)
                try:
                    loop.run_until_complete(asyncio.wait({task}, timeout=10))
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                loop.run_until_complete(asyncio.wait({task}, timeout=10))
                assert task.done() and task.result() == at, f"interrupted at {at}"
                if ring is not None:
                    assert not ring.waits and not ring.descs and not len(ring.uring)
                else:
                    assert not set(hub.where) - others
                    assert not _fired_for(loop)
            finally:
                loop.close()
            if seen[0] < at:  # no bytecode was left to interrupt
                break
        assert at > 10
    finally:
        q.unlink()
        q.close()


def _fired_for(loop: asyncio.AbstractEventLoop) -> list:
    """What the watchers fired for ``loop`` and it has not settled yet."""
    futs = [ref() for ref, _ in list(aio._hub().fired.values())]
    return [f for f in futs if f is not None and f.get_loop() is loop]


def test_a_wake_up_for_a_stopped_loop_is_fired_again_sparingly(name, threads_waker):
    """What a watcher fired for a loop that does not run stays unsettled;
    the checker fires it again 2, 4, 8... looks later, not at every look,
    so the loop's queue of callbacks grows by a few, not by twenty a
    second; once the loop runs, the await returns and nothing is left."""
    ev = aio.Event(name)
    loop = asyncio.new_event_loop()
    try:
        hub = aio._hub()
        others = set(hub.where)  # (what earlier tests' closed loops left)
        task = loop.create_task(ev.wait(30))
        loop.run_until_complete(asyncio.sleep(0.02))  # the wait now awaits; the loop stops
        assert len(set(hub.where) - others) == 1
        shmkit.Event(name).set()
        time.sleep(1.0)  # 20 looks of the checker
        queued = len(loop._ready)  # type: ignore[attr-defined]
        assert 1 <= queued <= 6, queued

        assert len(_fired_for(loop)) == 1 and not set(hub.where) - others
        loop.run_until_complete(asyncio.wait({task}, timeout=10))
        assert task.result() is True and not _fired_for(loop)
    finally:
        loop.close()
        ev.close()
        ev.unlink()


def test_a_loop_dropped_unclosed_with_a_fired_wake_up_is_freed(name, threads_waker):
    """What the watchers fired is listed only weakly: a loop stopped with a
    fired await, then dropped unclosed, goes with its garbage, and the
    checker forgets the wake-up."""
    ev = aio.Event(name)
    try:
        loop = asyncio.new_event_loop()
        task = loop.create_task(ev.wait(30))
        loop.run_until_complete(asyncio.sleep(0.02))  # the wait now awaits; the loop stops
        time.sleep(0.2)  # the checker's looks see it too
        shmkit.Event(name).set()
        deadline = time.monotonic() + 10
        while not _fired_for(loop) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_fired_for(loop)) == 1
        gone = weakref.ref(loop)
        fired = len(aio._hub().fired)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unclosed loop, its pending task
            del loop, task
            aio._here.__dict__.clear()  # this thread's cache of its last loop
            gc.collect()
        assert gone() is None
        deadline = time.monotonic() + 10
        while len(aio._hub().fired) >= fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(aio._hub().fired) < fired  # the checker forgot it
    finally:
        ev.close()
        ev.unlink()


def test_cancelled_acquires_never_leave_a_lock_held(name, waker):
    async def main() -> int:
        m = aio.Mutex(name)
        other = shmkit.Mutex(name)  # a second handle, used from a thread
        rng = random.Random(3)
        won = 0
        for _ in range(300):
            other.acquire()
            t = asyncio.create_task(m.acquire(timeout=30))
            await asyncio.sleep(0)
            threading.Timer(rng.choice([0, 0.0005, 0.002]), other.release).start()
            await asyncio.sleep(rng.choice([0, 0.0003, 0.001, 0.003]))
            t.cancel()
            try:
                if await t:
                    won += 1
                    m.release()
            except asyncio.CancelledError:
                pass
            # Whatever happened, the lock is ours to take now: nobody holds it.
            assert other.acquire(timeout=10)
            other.release()
        assert not m.locked()
        m.close()
        other.close()
        return won

    asyncio.run(main())


# ---- scale: many awaits, few threads, no busy waiting ----------------------------

def test_ten_thousand_awaits_use_a_few_threads_and_no_cpu(names, threads_waker):
    events = [aio.Event(names()) for _ in range(50)]
    before = _threads()

    async def main() -> tuple[int, float, int]:
        tasks = [asyncio.create_task(events[i % 50].wait(timeout=120)) for i in range(10000)]
        await asyncio.sleep(0.5)
        during = _threads()
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)  # everyone waits; the process should be idle
        cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        watchers = aio.watcher_count()
        for e in events:
            e.set()
        assert all(await asyncio.gather(*tasks))
        return during, cpu, watchers

    during, cpu, watchers = asyncio.run(main())
    for e in events:
        e.close()
        e.unlink()
    assert watchers == 1  # 50 distinct objects: one watcher thread
    assert during - before <= 2  # and the checker thread that looks for dead peers
    assert cpu < 0.25  # a busy wait would use a whole core


def _switches(tid: int) -> int:
    """How many times the thread ``tid`` of this process has gone to sleep."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def test_idle_watchers_never_wake_and_one_checker_looks_for_dead_peers(names, threads_waker):
    # 300 channels: three watchers.  While nothing happens, a watcher sleeps
    # in one futex_waitv (re-arming 128 words for each liveness look would
    # cost ~2 us per word); the one checker thread makes those looks.
    chans = [aio.Channel(names(), capacity=64) for _ in range(300)]

    async def main() -> tuple[list[int], int, list[bytes]]:
        tasks = [asyncio.create_task(c.recv(timeout=60)) for c in chans]
        await asyncio.sleep(0.5)
        hub = aio._hub()
        tids = [w.thread.native_id for w in hub.watchers]
        checker = getattr(hub, "checker", None)
        checker_tid = checker.native_id if checker is not None else None
        before = [_switches(t) for t in tids]
        checker0 = _switches(checker_tid) if checker_tid else 0
        await asyncio.sleep(2.0)
        woke = [_switches(t) - b for t, b in zip(tids, before)]
        looks = _switches(checker_tid) - checker0 if checker_tid else 0
        for i, c in enumerate(chans):
            c.send_nowait(b"%d" % i)
        return woke, looks, await asyncio.gather(*tasks)

    try:
        woke, looks, got = asyncio.run(main())
        assert len(woke) == 3
        assert max(woke) <= 1, woke  # a sleep in 50 ms liveness slices wakes ~40 times
        # the checker does look: every CHECK_EVERY s, or, as 300 channels
        # take a while to look at, every 200 times a look's CPU time (up to
        # 2 s on a loaded machine)
        assert looks >= 1
        assert got == [b"%d" % i for i in range(300)]
    finally:
        for c in chans:
            c.close()


def test_more_distinct_objects_than_one_watcher_watches(names, threads_waker):
    events = [aio.Event(names()) for _ in range(300)]
    try:
        async def main() -> list:
            tasks = [asyncio.create_task(e.wait(timeout=60)) for e in events]
            await asyncio.sleep(0.3)
            assert aio.watcher_count() >= 3  # 127 objects per watcher
            for e in events[::-1]:
                e.set()
            return await asyncio.gather(*tasks)

        assert all(asyncio.run(main()))
        # aio.wait: any number of objects, and it reports the ready ones only
        async def waiter() -> list:
            for e in events:
                e.clear()
            asyncio.get_running_loop().call_later(0.1, events[250].set)
            return await aio.wait(events, timeout=30)

        assert asyncio.run(waiter()) == [events[250]]
    finally:
        for e in events:
            e.close()
            e.unlink()


# ---- dead peers, closing, several loops -------------------------------------------

def _await_across_a_kill(hold, name: str, start, waiting=lambda: True):
    """Run ``hold(name, ready)`` in a spawned process; await ``start()`` while it
    holds, check the await waits (and ``waiting()``), SIGKILL the holder.
    Returns the await's result and the OwnerDiedWarnings it issued."""
    from conftest import SPAWN

    ready = SPAWN.Event()
    p = spawn(hold, name, ready)
    assert ready.wait(60)

    async def main():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t = asyncio.create_task(start())
            await asyncio.sleep(0.3)
            assert not t.done() and waiting()
            p.kill()
            return await t, [str(x.message) for x in w
                             if issubclass(x.category, shmkit.OwnerDiedWarning)]

    try:
        return asyncio.run(main())
    finally:
        p.kill()
        p.join(30)


def test_killed_holder_of_an_awaited_mutex(name, waker):
    m = aio.Mutex(name)
    t0 = time.monotonic()
    got, warned = _await_across_a_kill(_hold_mutex, name, lambda: m.acquire(timeout=60))
    assert got and m.recovered and len(warned) == 1
    assert time.monotonic() - t0 < 0.3 + PROMPT
    m.release()
    m.close()


def test_killed_holder_of_an_awaited_semaphore(name, waker):
    s = aio.Semaphore(name, value=1)
    got, _ = _await_across_a_kill(_hold_semaphore, name, lambda: s.acquire(timeout=60))
    assert got
    s.release()
    s.close()


def _hold_redeliver_view(name: str, ready) -> None:
    ch = shmkit.Channel.open(name)
    view = ch.recv_view(timeout=30, redeliver=True)
    assert bytes(view) == b"work"
    ready.set()
    time.sleep(60)


def test_an_awaited_receive_gets_a_killed_holders_redelivered_view(name, waker):
    sender = shmkit.Channel(name, capacity=4096)
    sender.send(b"work")
    ch = aio.Channel.open(name)
    t0 = time.monotonic()
    got, _ = _await_across_a_kill(_hold_redeliver_view, name,
                                  lambda: ch.recv(timeout=60))
    assert got == b"work" and ch.statistics()["redelivered"] == 1
    assert time.monotonic() - t0 < 0.3 + PROMPT
    ch.close()
    sender.close()


def test_closing_the_handle_while_awaiting_raises_closed_error(names, waker):
    async def main() -> None:
        ch = aio.Channel(names(), capacity=4096)
        e = aio.Event(names())
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, ch.close)
        with pytest.raises(shmkit.ClosedError):
            await ch.recv(timeout=30)
        seg = e._seg
        loop.call_later(0.1, e.close)
        with pytest.raises(shmkit.ClosedError):
            await e.wait(timeout=30)
        seg.unlink()

    asyncio.run(main())


def test_a_closed_loop_leaves_the_watchers_working(name, threads_waker):
    ch = aio.Channel(name, capacity=4096)
    loop = asyncio.new_event_loop()
    task = loop.create_task(ch.recv(timeout=60))
    loop.run_until_complete(asyncio.sleep(0.1))
    assert not task.done()
    loop.close()  # with the receive still pending
    ch.send_nowait(b"one")  # wakes the watcher, which finds the loop closed
    time.sleep(0.1)

    async def again() -> bytes:
        return await ch.recv(timeout=30)

    assert asyncio.run(again()) == b"one"  # the pending receive took nothing
    assert aio.watcher_count() >= 1
    ch.close()


def test_several_loops_in_several_threads(name, waker):
    n, k = 400, 4
    got: list[list[int]] = [[] for _ in range(k)]
    ch = shmkit.Channel(name, capacity=4096)

    def run(i: int) -> None:
        async def consume() -> None:
            mine = aio.Channel(name)
            async for m in mine:
                got[i].append(int.from_bytes(m, "little"))
            mine.close()

        asyncio.run(consume())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    p = spawn(_produce, name, n, 0.2, 7)
    p.join(60)
    ch.close_sending()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    ch.close()
    everything = sorted(x for g in got for x in g)
    assert everything == list(range(n))
    assert sum(1 for g in got if g) >= 2  # the loops did share the work


# ---- Ctrl-C -------------------------------------------------------------------------

_CTRL_C = {
    "asyncio": """
        import asyncio
        async def main():
            ch = shmkit.aio.Channel(N)
            print("ready", flush=True)
            await ch.recv()
        def block():
            asyncio.run(main())
    """,
    "asyncio-mutex": """
        import asyncio
        async def main():
            m = shmkit.aio.Mutex(N)
            print("ready", flush=True)
            await m.acquire()
        def block():
            asyncio.run(main())
    """,
    "wait": """
        def block():
            ch, ev = shmkit.Channel(N), shmkit.Event(None)
            print("ready", flush=True)
            shmkit.wait([ch, ev])
    """,
}


def test_ctrl_c_ends_asyncio_run_and_wait(names):
    held = shmkit.Mutex(names())
    held.acquire()
    chans = {k: shmkit.Channel(names(), capacity=4096) for k in ("asyncio", "wait")}
    target = {"asyncio": chans["asyncio"].name, "wait": chans["wait"].name,
              "asyncio-mutex": held.name}
    env = dict(os.environ, PYTHONPATH=SRC)
    procs = {}
    for kind, body in _CTRL_C.items():
        code = ("import shmkit, shmkit.aio, sys, time\nN = sys.argv[1]\n" +
                textwrap.dedent(body) + textwrap.dedent("""
            try:
                block()
            except KeyboardInterrupt:
                print("interrupted", time.monotonic(), flush=True)
            else:
                print("returned", flush=True)
        """))
        procs[kind] = subprocess.Popen([sys.executable, "-c", code, target[kind]], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    try:
        for p in procs.values():
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        for p in procs.values():
            assert p.poll() is None
        sent = time.monotonic()
        for p in procs.values():
            p.send_signal(signal.SIGINT)
        for kind, p in procs.items():
            out, err = p.communicate(timeout=20)
            word, _, when = out.strip().partition(" ")
            assert word == "interrupted", (kind, out, err)
            assert float(when) - sent < PROMPT, kind
            assert p.returncode == 0, (kind, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    # The interrupted waiters left nothing behind.
    held.release()
    assert held.acquire(timeout=1)
    held.release()
    held.close()
    for c in chans.values():
        c.close()


def _produce_and_stay(name: str, n: int) -> None:
    ch = shmkit.Channel(name)
    for i in range(n):
        ch.send(i.to_bytes(4, "little"))
    time.sleep(120)  # killed here: it never closes its handle, nobody is woken


def test_messages_stop_when_every_sender_has_gone(name, waker):
    async def main() -> list[int]:
        ch = aio.Channel(name, capacity=4096)
        p = spawn(_produce_and_stay, name, 5)
        got = []
        async for m in ch.messages(stop_when_no_senders=True):
            got.append(int.from_bytes(m, "little"))
            if len(got) == 5:
                await asyncio.sleep(0.2)  # the next receive is asleep by now
                p.kill()
        p.join(30)
        with pytest.raises(shmkit.SendersGone):
            await ch.recv(timeout=30, stop_when_no_senders=True)
        ch.close()
        return got

    t0 = time.monotonic()
    assert asyncio.run(main()) == list(range(5))
    assert time.monotonic() - t0 < 30  # ended by the senders going, not by a timeout


def _send_and_notify(cond_name: str, ch_name: str, delay: float) -> None:
    c, ch = shmkit.Condition(cond_name), shmkit.Channel(ch_name)
    time.sleep(delay)
    with c:
        ch.send(b"state changed")
        c.notify_all()
    ch.close()
    c.close()


def test_condition_wait_for_a_notify_from_another_process(names):
    async def main() -> None:
        c, ch = aio.Condition(names()), shmkit.Channel(names(), capacity=4096)
        p = spawn(_send_and_notify, c.name, ch.name, 0.3)
        async with c:
            assert await c.wait_for(lambda: ch.depth > 0, timeout=60)
            assert c.lock.locked()
        p.join(30)
        async with c:
            assert await c.wait(timeout=0.05) is False  # nobody notifies
            assert c.lock.locked()
        with pytest.raises(RuntimeError, match="without holding"):
            await c.wait(timeout=0.05)
        assert shmkit.Condition.statistics(c)["waiters"] == 0
        c.close()
        c.unlink()
        ch.close()

    asyncio.run(main())


def test_cancelled_condition_waits_hold_the_lock_and_leave_no_count(name, waker):
    async def main() -> None:
        c = aio.Condition(name)
        other = shmkit.Condition(name)
        rng = random.Random(5)
        outcomes = {"notified": 0, "cancelled": 0}

        async def waiter() -> None:
            async with c:
                try:
                    if await c.wait(timeout=30):
                        outcomes["notified"] += 1
                finally:
                    assert c.lock.locked()  # held again, on every way out

        def notify() -> None:
            with other:
                other.notify()

        for _ in range(100):
            t = asyncio.create_task(waiter())
            await asyncio.sleep(rng.choice([0, 0.0005, 0.002]))
            threading.Timer(rng.choice([0, 0.0005, 0.002]), notify).start()
            await asyncio.sleep(rng.choice([0, 0.0003, 0.001, 0.003]))
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            await asyncio.sleep(0.005)  # let the notifier thread finish
            assert not c.lock.locked()
        assert shmkit.Condition.statistics(c)["waiters"] == 0
        # Nothing banked for nobody: no old notify() wakes a new waiter.
        async with c:
            assert await c.wait(timeout=0.05) is False
        c.close()
        other.close()

    asyncio.run(main())


# ---- all-of waiting: return_when=ALL_COMPLETED ------------------------------------

def _make_ready_one_by_one(chans: list[str], events: list[str], sem: str, step: float) -> None:
    """Make each object ready in turn, ``step`` seconds apart."""
    objs: list = [shmkit.Channel(n) for n in chans] + [shmkit.Event(n) for n in events]
    objs.append(shmkit.Semaphore(sem))
    for o in objs:
        time.sleep(step)
        if isinstance(o, shmkit.Channel):
            o.send(b"ready")
        elif isinstance(o, shmkit.Event):
            o.set()
        else:
            o.release()
    for o in objs:
        o.close()


def _all_ready_now(chans, events, sem) -> bool:
    """Whether every object is ready, looked at with the objects' own calls."""
    return (all(c.recv_nowait() == b"ready" for c in chans)
            and all(e.is_set() for e in events) and sem.acquire(False))


def test_wait_all_returns_once_every_object_is_ready(names):
    chans = [shmkit.Channel(names(), capacity=4096) for _ in range(3)]
    events = [shmkit.Event(names()) for _ in range(2)]
    sem = shmkit.Semaphore(names(), value=0)
    objs = [*chans, *events, sem]
    try:
        # None ready, then some: ALL_COMPLETED waits the timeout out and
        # returns the ready ones, as concurrent.futures.wait returns `done`.
        assert shmkit.wait(objs, timeout=0.05, return_when=shmkit.ALL_COMPLETED) == []
        events[1].set()
        t0 = time.monotonic()
        assert shmkit.wait(objs, timeout=0.5, return_when=shmkit.ALL_COMPLETED) == [events[1]]
        assert time.monotonic() - t0 >= 0.45  # it did not return early
        assert shmkit.wait(objs, timeout=30) == [events[1]]  # FIRST_COMPLETED: at once
        events[1].clear()
        p = spawn(_make_ready_one_by_one, [c.name for c in chans], [e.name for e in events],
                  sem.name, 0.15)
        got = shmkit.wait(objs, timeout=60, return_when=shmkit.ALL_COMPLETED)
        p.join(30)
        assert got == objs
        # Readiness never consumes: everything is still there to take.
        assert _all_ready_now(chans, events, sem)
    finally:
        for o in objs:
            o.close()
        for o in (*events, sem):
            o.unlink()


def _take_then_set(ch_name: str, ev_name: str) -> None:
    ch, ev = shmkit.Channel(ch_name), shmkit.Event(ev_name)
    assert ch.recv(timeout=60) == b"first"  # the channel is not ready any more
    time.sleep(0.3)
    ev.set()  # now only the event is
    time.sleep(0.5)
    ch.send(b"second")  # and now both
    ch.close()
    ev.close()


def test_wait_all_waits_again_for_an_object_taken_meanwhile(names, waker):
    ch, ev = shmkit.Channel(names(), capacity=4096), shmkit.Event(names())
    try:
        ch.send(b"first")
        p = spawn(_take_then_set, ch.name, ev.name)
        # ch is ready at first, then taken by the child before ev is set: a
        # wait that remembered "ch was ready" would return with ch empty.
        got = shmkit.wait([ch, ev], timeout=60, return_when=shmkit.ALL_COMPLETED)
        assert got == [ch, ev]
        assert ch.recv_nowait() == b"second"
        p.join(30)
    finally:
        ch.close()
        ev.close()
        ev.unlink()


def test_wait_all_counts_a_killed_holder_ready(name):
    from conftest import SPAWN

    m, ev = shmkit.Mutex(name), shmkit.Event(None)
    ready = SPAWN.Event()
    p = spawn(_hold_mutex, name, ready)
    assert ready.wait(60)
    try:
        ev.set()
        assert shmkit.wait([m, ev], timeout=0.2, return_when=shmkit.ALL_COMPLETED) == [ev]
        p.kill()
        t0 = time.monotonic()
        assert shmkit.wait([ev, m], timeout=60, return_when=shmkit.ALL_COMPLETED) == [ev, m]
        assert time.monotonic() - t0 < PROMPT
        with pytest.warns(shmkit.OwnerDiedWarning):
            assert m.acquire(False)
        m.release()
    finally:
        p.join(30)
        m.close()
        ev.close()


def test_wait_return_when_refuses_other_values(names):
    import concurrent.futures

    ev = shmkit.Event(names())
    try:
        for bad in ("FIRST_EXCEPTION", "all", True, None):
            with pytest.raises(shmkit.aio_wait.WaitArgumentError, match="return_when"):
                shmkit.wait([ev], 0, return_when=bad)
            with pytest.raises(ValueError, match="return_when"):
                asyncio.run(aio.wait([ev], 0, return_when=bad))
        ev.set()
        # concurrent.futures' and asyncio's constants are the same strings
        assert shmkit.wait([ev], 0, return_when=concurrent.futures.ALL_COMPLETED) == [ev]
        assert asyncio.run(aio.wait([ev], 0, return_when=asyncio.ALL_COMPLETED)) == [ev]
        assert shmkit.wait([ev], 0, return_when=asyncio.FIRST_COMPLETED) == [ev]
        with pytest.raises(shmkit.aio_wait.WaitArgumentError, match="got 0"):
            shmkit.wait([], return_when=shmkit.ALL_COMPLETED)
        with pytest.raises(shmkit.aio_wait.WaitArgumentError, match="got none"):
            asyncio.run(aio.wait([], return_when=aio.ALL_COMPLETED))
    finally:
        ev.close()
        ev.unlink()


def _set_events_in_turn(names_: list[str], step: float) -> None:
    # forked: a child of the test process, sharing nothing but the names
    evs = [shmkit.Event(n) for n in names_]
    for e in evs:
        time.sleep(step)
        e.set()
    os._exit(0)


def test_aio_wait_all_keeps_the_loop_running(names, waker):
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    events = [aio.Event(names()) for _ in range(200)]  # more than one sleeping thread's 128
    order = list(range(len(events)))
    random.Random(7).shuffle(order)

    async def main() -> tuple[list, list, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        # some set, one never: the timeout passes, the ready ones come back
        events[order[0]].set()
        partial = await aio.wait(events, 0.3, return_when=aio.ALL_COMPLETED)
        events[order[0]].clear()
        p = fork.Process(target=_set_events_in_turn,
                         args=([events[i].name for i in order], 0.005), daemon=True)
        p.start()
        got = await aio.wait(events, 60, return_when=aio.ALL_COMPLETED)
        await asyncio.get_running_loop().run_in_executor(None, p.join, 30)
        tick.cancel()
        return partial, got, ticks

    partial, got, ticks = asyncio.run(main())
    try:
        assert partial == [events[order[0]]]
        assert got == events
        assert all(e.is_set() for e in events)
        assert ticks > 10  # the loop ran while the coroutine waited
    finally:
        for e in events:
            e.close()
            e.unlink()


def test_ctrl_c_ends_a_wait_for_all(names):
    ch, ev = shmkit.Channel(names(), capacity=4096), shmkit.Event(names())
    ev.set()  # one of the two is ready: the wait goes on for the other
    code = textwrap.dedent("""
        import shmkit, sys, time
        ch, ev = shmkit.Channel(sys.argv[1]), shmkit.Event(sys.argv[2])
        print("ready", flush=True)
        try:
            shmkit.wait([ch, ev], return_when=shmkit.ALL_COMPLETED)
        except KeyboardInterrupt:
            print("interrupted", time.monotonic(), flush=True)
        else:
            print("returned", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code, ch.name, ev.name],
                         env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert p.poll() is None  # still waiting: only one of the two is ready
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        word, _, when = out.strip().partition(" ")
        assert word == "interrupted", (out, err)
        assert float(when) - sent < PROMPT
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ch.close()
        ev.close()
        ev.unlink()


# ---- other event loops: uvloop, anyio (asyncio backend); trio refused ----------------

def _peer_of_every_kind(ch_name: str, ev_name: str, m_name: str, ready) -> None:
    ch, ev, m = shmkit.Channel(ch_name), shmkit.Event(ev_name), shmkit.Mutex(m_name)
    m.acquire()
    ready.set()
    time.sleep(0.3)
    m.release()  # 1: the mutex is free
    for i in range(50):  # 2: fifty messages, then the end
        ch.send(i.to_bytes(4, "little"))
        if i % 10 == 0:
            time.sleep(0.01)
    ch.close_sending()
    time.sleep(0.1)
    ev.set()  # 3: the event
    for o in (ch, ev, m):
        o.close()


async def _exercise(ch_name: str, ev_name: str, m_name: str) -> dict:
    """Each class's wait, woken by another process or thread, from a coroutine."""
    loop = asyncio.get_running_loop()
    out: dict = {"loop": type(loop).__module__, "waker": aio.waker()}
    ch, ev, m = aio.Channel(ch_name), aio.Event(ev_name), aio.Mutex(m_name)
    out["mutex"] = await m.acquire(timeout=60)
    m.release()
    out["messages"] = [int.from_bytes(x, "little") async for x in ch]
    out["event"] = await ev.wait(timeout=60)
    sem, q, rw = aio.Semaphore(None, value=0), aio.Queue(), aio.RWLock(None)
    threading.Timer(0.05, sem.release).start()
    out["semaphore"] = await sem.acquire(timeout=60)
    threading.Timer(0.05, q.put_nowait, ({"n": 1},)).start()
    out["queue"] = await q.get(timeout=60)
    async with rw.read():
        pass
    cond = aio.Condition(None)
    async with cond:
        out["condition"] = await cond.wait(timeout=0.05)  # nobody notifies: False
        out["condition_held"] = cond.lock.locked()
    cond.close()
    cond.unlink()
    threading.Timer(0.05, sem.release).start()
    out["all"] = await aio.wait([ev, sem], 60, return_when=aio.ALL_COMPLETED) == [ev, sem]
    with pytest.raises(shmkit.Timeout):
        await aio.Channel(None, capacity=4096).recv(timeout=0.05)
    for o in (ch, ev, m, sem, q, rw):
        o.close()
    sem.unlink()
    rw.unlink()
    return out


def _run_under(runner: str, fn, *args):
    if runner == "asyncio":
        return asyncio.run(fn(*args))
    if runner == "uvloop":
        import uvloop
        return uvloop.run(fn(*args))
    import anyio
    use_uvloop = runner == "anyio-asyncio-uvloop"
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": use_uvloop})


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "anyio-asyncio",
                                    "anyio-asyncio-uvloop"])
def test_every_class_under_uvloop_and_anyio(names, runner, waker):
    from conftest import SPAWN

    ch = shmkit.Channel(names(), capacity=4096)
    ev, m = shmkit.Event(names()), shmkit.Mutex(names())
    ready = SPAWN.Event()
    p = spawn(_peer_of_every_kind, ch.name, ev.name, m.name, ready)
    try:
        assert ready.wait(60)
        out = _run_under(runner, _exercise, ch.name, ev.name, m.name)
        p.join(30)
        assert out["loop"].startswith("uvloop" if "uvloop" in runner else "asyncio")
        assert out["waker"] == waker
        assert out["messages"] == list(range(50))
        assert out["mutex"] and out["event"] and out["semaphore"] and out["all"]
        assert out["queue"] == {"n": 1}
        assert out["condition"] is False and out["condition_held"]
    finally:
        if p.is_alive():
            p.kill()
        for o in (ch, ev, m):
            o.close()
        ev.unlink()
        m.unlink()


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_anyio_cancel_scopes_lose_no_message(name, use_uvloop, waker):
    import anyio

    n = 2000
    ch = aio.Channel(name, capacity=1 << 16)
    p = spawn(_produce, name, n, 0.2, 50)

    async def main() -> tuple[list[int], int]:
        got: list[int] = []
        timed_out = 0

        async def consumer() -> None:
            nonlocal timed_out
            while len(got) < n:
                with anyio.move_on_after(0.001) as scope:  # cancels many receives
                    got.append(int.from_bytes(await ch.recv(), "little"))
                timed_out += scope.cancelled_caught

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
        return got, timed_out

    try:
        got, timed_out = anyio.run(main, backend="asyncio",
                                   backend_options={"use_uvloop": use_uvloop})
        assert got == list(range(n))  # each once, in order
        assert timed_out > 0  # some receives were cancelled while waiting
    finally:
        p.join(30)
        ch.close()


def test_trio_is_refused_with_a_pointer_to_threads(names):
    import anyio

    ch = aio.Channel(names(), capacity=4096)
    ev = aio.Event(names())
    ch.send_nowait(b"waiting")  # even a call that would not wait is refused

    async def main() -> list[str]:
        errors = []
        for call in (ch.recv, ev.wait, lambda: aio.wait([ev], 1.0)):
            try:
                await call()
            except aio.NoEventLoopError as exc:
                errors.append(str(exc))
        return errors

    try:
        errors = anyio.run(main, backend="trio")
        assert len(errors) == 3 and all("trio.to_thread.run_sync" in e for e in errors)
        assert isinstance(aio.NoEventLoopError("x"), RuntimeError)
        assert ch.recv_nowait() == b"waiting"  # the refused call took nothing
    finally:
        ch.close()
        ev.close()
        ev.unlink()


# ---- many tasks, one channel each --------------------------------------------------

def _send_each_its_index(names_: list[str]) -> None:
    chans = [shmkit.Channel(n) for n in names_]
    for i, c in enumerate(chans):
        c.send(i.to_bytes(4, "little"))
    for c in chans:
        c.close()


def test_two_thousand_tasks_on_their_own_channels_use_few_threads(names, threads_waker):
    import math
    import resource

    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * n + 256:  # a descriptor per channel
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n + 256)
                                                    if hard != resource.RLIM_INFINITY
                                                    else 2 * n + 256, hard))
    chans = [aio.Channel(names(), capacity=64) for _ in range(n)]
    before = _threads()

    async def main() -> tuple[list[bool], int]:
        async def one(i: int) -> bool:
            return int.from_bytes(await chans[i].recv(timeout=300), "little") == i

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks)
        during = _threads()
        p = spawn(_send_each_its_index, [c.name for c in chans])
        got = await asyncio.gather(*tasks)
        await asyncio.get_running_loop().run_in_executor(None, p.join, 60)
        return got, during

    try:
        got, during = asyncio.run(main())
        assert got == [True] * n  # every task got its own channel's message
        # one watcher thread per 127 channels, and no thread per await
        assert during - before <= math.ceil(n / 127) + 2
    finally:
        for c in chans:
            c.close()


def test_a_bool_timeout_is_refused_before_anything_is_taken(names):
    """The awaited calls refuse timeout=True as the blocking ones do, also
    when they would not have had to wait, and leave everything as it was;
    Condition.wait still holds the lock and counts no waiter."""
    async def main() -> None:
        q, ch = aio.Queue(), aio.Channel(None)
        m, sem, ev = aio.Mutex(None), aio.Semaphore(None, 1), aio.Event(None)
        rw, cond = aio.RWLock(None), aio.Condition(None)
        try:
            q.put_nowait(1)
            ch.send_nowait(b"x")
            ev.set()
            calls = [lambda t: q.get(True, t), lambda t: q.put(2, True, t),
                     lambda t: ch.recv(t), lambda t: ch.send(b"y", t),
                     lambda t: ch.recv_many(4, t), lambda t: m.acquire(True, t),
                     lambda t: sem.acquire(True, t), lambda t: ev.wait(t),
                     lambda t: rw.acquire_read(t), lambda t: rw.acquire_write(t)]
            for call in calls:
                for bad in (True, False):
                    with pytest.raises(TypeError, match="not bool"):
                        await call(bad)
            assert (q.qsize(), ch.depth, m.locked(), sem.value) == (1, 1, False, 1)
            async with cond:
                with pytest.raises(TypeError, match="not bool"):
                    await cond.wait(True)
                assert cond.lock.locked() and cond.statistics()["waiters"] == 0
        finally:
            for o in (q, ch, m, sem, ev, rw, cond):
                o.close()

    asyncio.run(main())


def test_an_awaited_call_that_does_not_block_refuses_a_timeout():
    """As the blocking calls: ``await q.get(False, 5)`` is refused with a
    ValueError before anything is taken; None, and a lock's -1, are taken."""
    async def main() -> None:
        q, big = aio.Queue(), aio.Queue(payload_pool=0)
        m, sem, cond = aio.Mutex(None), aio.Semaphore(None, 1), aio.Condition(None)
        try:
            q.put_nowait(1)
            calls = [lambda t: q.get(False, t), lambda t: q.put(2, False, t),
                     lambda t: big.put(np.ones(1 << 20, np.uint8), False, t),
                     lambda t: m.acquire(False, t), lambda t: sem.acquire(False, t),
                     lambda t: cond.acquire(False, t)]
            for call in calls:
                for t in (5, 0, -0.5, True):
                    with pytest.raises(ValueError, match="does not block takes no timeout"):
                        await call(t)
            files = [f for f in os.listdir(os.path.dirname(big.path))
                     if f.startswith(os.path.basename(big.path) + "~")]
            assert (q.qsize(), big.qsize(), files, m.locked(), sem.value) == (1, 0, [], False, 1)
            assert await q.get(False, None) == 1
            for lock in (m, sem, cond):
                assert await lock.acquire(False, -1) is True
                lock.release()
        finally:
            for o in (q, big, m, sem, cond):
                o.close()

    asyncio.run(main())


def test_an_awaited_lock_reads_its_timeout_as_the_blocking_one(name):
    """One rule for a lock's timeout, the core's: a value that only compares
    equal to -1 is not threading's "no timeout" (the awaited acquire, which
    compared in Python, waited for ever on it while the blocking one gave up)."""
    class EqualToAll(float):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = float.__hash__

    m = shmkit.Mutex(name)
    assert m.acquire()
    try:
        async def main() -> bool:
            am = aio.Mutex(name)
            try:
                return await asyncio.wait_for(am.acquire(True, EqualToAll(0.05)), 20)
            finally:
                am.close()

        assert m.acquire(True, EqualToAll(0.05)) is False
        assert asyncio.run(main()) is False
        assert shmkit.sync.lock_timeout(-1) is None and shmkit.sync.lock_timeout(-2) == 0.0
    finally:
        m.release()
        m.close()


@pytest.mark.parametrize("bad,error", [(float("nan"), ValueError), ("0.5", TypeError),
                                       (True, TypeError)])
def test_every_form_of_wait_checks_its_timeout_alike(name, bad, error):
    """The sync and awaited waits, first-of and all-of, refuse the same timeouts."""
    ev = shmkit.Event(name)
    try:
        for when in (shmkit.FIRST_COMPLETED, shmkit.ALL_COMPLETED):
            with pytest.raises(error, match="timeout"):
                shmkit.wait([ev], bad, return_when=when)
            with pytest.raises(error, match="timeout"):
                asyncio.run(shmkit.aio.wait([ev], bad, return_when=when))
    finally:
        ev.close()
        ev.unlink()


# ---- RWLock.acquire_write: the awaiting writer goes first, as the blocking one ----------

def _writer_waiting(rw: shmkit.RWLock) -> bool:
    return bool(rw.statistics()["writer_waiting_or_in"])  # the state's bit 0


def _read_hand_over_hand(name: str, ready, stop) -> None:
    """Hold a read lock at all times, taking the next hold before dropping the
    last, so that the readers' count never falls to zero; only a refused hold
    (a writer announced) lets it fall, and then the reader waits its turn."""
    rw = shmkit.RWLock(name)
    assert rw.acquire_read(timeout=60)
    ready.set()
    while not stop.is_set():
        took = rw.acquire_read(timeout=0.002)
        rw.release_read()
        if not took:
            assert rw.acquire_read(timeout=60)
    rw.release_read()
    rw.close()


def _read_in_bursts(name: str, ready, stop) -> None:
    rw = shmkit.RWLock(name)
    rng = random.Random(os.getpid())
    ready.set()
    while not stop.is_set():
        assert rw.acquire_read(timeout=60)
        time.sleep(rng.random() * 0.002)
        rw.release_read()
        time.sleep(rng.random() * 0.001)
    rw.close()


def _hold_read(name: str, ready) -> None:
    rw = shmkit.RWLock(name)
    assert rw.acquire_read(timeout=60)
    ready.set()
    time.sleep(120)


_TRY_READ = """
import shmkit, sys
rw = shmkit.RWLock(sys.argv[1])
took = rw.acquire_read(timeout=float(sys.argv[2]))
if took:
    rw.release_read()
print(took)
"""

_TRY_BOTH = """
import shmkit, sys, warnings
warnings.simplefilter("ignore", shmkit.OwnerDiedWarning)
rw = shmkit.RWLock(sys.argv[1])
wrote = rw.acquire_write(timeout=5)
if wrote:
    rw.release_write()
read = rw.acquire_read(timeout=5)
if read:
    rw.release_read()
print(wrote, read)
"""


def test_async_writer_is_not_starved_by_a_stream_of_readers(name):
    from conftest import SPAWN

    rw = aio.RWLock(name)
    ready, stop = SPAWN.Event(), SPAWN.Event()
    p = spawn(_read_hand_over_hand, name, ready, stop)
    assert ready.wait(60)

    async def main() -> None:
        for _ in range(3):
            assert p.pid in rw.statistics()["readers"]  # the stream is in
            assert await rw.acquire_write(timeout=10)
            assert rw.statistics()["readers"] == {}
            rw.release_write()
            await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
    finally:
        stop.set()
        p.join(60)
    assert p.exitcode == 0
    rw.close()


def test_async_writer_holds_back_new_readers_while_it_waits(name):
    rw = aio.RWLock(name)
    mine = shmkit.RWLock(name)  # a read hold of this process: the writer waits for it

    async def main() -> None:
        assert mine.acquire_read(timeout=10)
        t = asyncio.create_task(rw.acquire_write(timeout=60))
        await asyncio.sleep(0.2)
        assert not t.done() and _writer_waiting(rw)
        refused = await asyncio.to_thread(run_python, _TRY_READ, name, "0")
        assert refused.stdout.split() == ["False"]
        assert not t.done()
        mine.release_read()
        assert await asyncio.wait_for(t, 60)
        assert rw.statistics()["writer_pid"] == os.getpid()
        rw.release_write()
        took = await asyncio.to_thread(run_python, _TRY_READ, name, "0")
        assert took.stdout.split() == ["True"]

    asyncio.run(main())
    mine.close()
    rw.close()


def _assert_no_write_left(rw: aio.RWLock) -> None:
    assert not _writer_waiting(rw)
    assert not rw._wlock.locked()
    assert rw._m.held_count == 0


def test_cancelled_async_write_acquires_leave_no_announcement(name, waker):
    from conftest import SPAWN

    rw = aio.RWLock(name)
    mine = shmkit.RWLock(name)  # a read hold of this process: the writer must wait
    ready, stop = SPAWN.Event(), SPAWN.Event()
    p = spawn(_read_in_bursts, name, ready, stop)
    assert ready.wait(60)

    async def main() -> tuple[int, int]:
        rng = random.Random(5)
        won = cancelled = 0
        for i in range(200):
            # Every fourth write waits behind a read of ours, so some cancels
            # surely land mid-wait however the other reader is scheduled.
            held = i % 4 == 0 and mine.acquire_read(timeout=10)
            t = asyncio.create_task(rw.acquire_write(timeout=30))
            await asyncio.sleep(rng.choice([0, rng.random() * 0.005]))
            t.cancel()
            try:
                if await t:
                    assert not held
                    won += 1
                    rw.release_write()
            except asyncio.CancelledError:
                cancelled += 1
            if held:
                mine.release_read()
            _assert_no_write_left(rw)
            if i % 50 == 49:  # other processes' writers and readers go on
                both = await asyncio.to_thread(run_python, _TRY_BOTH, name)
                assert both.stdout.split() == ["True", "True"]
        return won, cancelled

    try:
        won, cancelled = asyncio.run(main())
    finally:
        stop.set()
        p.join(60)
    assert p.exitcode == 0  # the reader never waited 60 s
    assert cancelled >= 50
    _assert_no_write_left(rw)
    mine.close()
    rw.close()


def test_awaiting_writer_gets_the_lock_when_the_reader_is_killed(name, waker):
    rw = aio.RWLock(name)
    got, warned = _await_across_a_kill(_hold_read, name, lambda: rw.acquire_write(timeout=60),
                                       lambda: _writer_waiting(rw))
    assert got and rw.recovered and len(warned) == 1 and "reader died" in warned[0]
    assert rw.statistics()["readers"] == {}
    rw.release_write()
    rw.close()


def test_a_killed_async_writer_is_recovered(name):
    from conftest import fork_call, kill_wait

    rw = shmkit.RWLock(name)
    assert rw.acquire_read(timeout=10)  # the child's writer announces itself, then waits

    def child() -> None:
        async def main() -> None:
            await aio.RWLock(name).acquire_write(timeout=60)

        asyncio.run(main())

    pid = fork_call(child)
    try:
        end = time.monotonic() + 30
        while not (_writer_waiting(rw) and rw.statistics()["writer_pid"] == pid):
            assert time.monotonic() < end, "the child's writer never announced itself"
            time.sleep(0.01)
    finally:
        kill_wait(pid)
    rw.release_read()
    with pytest.warns(shmkit.OwnerDiedWarning, match="writer died"):
        assert rw.acquire_read(timeout=10)  # takes the dead writer's mutex over
    assert rw.recovered
    rw.release_read()
    assert not _writer_waiting(rw)

    async def main() -> bool:
        return await aio.RWLock(name).acquire_write(timeout=10)

    other = shmkit.RWLock(name)
    assert asyncio.run(main())  # and a writer after it
    other.close()
    rw.close()


@pytest.mark.parametrize("ending", ["taken", "timed out"])
def test_async_write_acquire_killed_at_every_crash_point(name, ending):
    from conftest import fork_call

    rw = shmkit.RWLock(name)

    def child(k: int) -> None:
        warnings.simplefilter("ignore", shmkit.OwnerDiedWarning)

        async def main() -> None:
            lock = aio.RWLock(name)
            shmkit._core.fault(k, "rw.write.")
            if await lock.acquire_write(timeout=30 if ending == "taken" else 0.1):
                lock.release_write()
            shmkit._core.fault(0)

        asyncio.run(main())

    for k in range(1, 50):
        assert rw.acquire_read(timeout=10)  # a reader in: the child's writer waits
        release = threading.Timer(0.2 if ending == "taken" else 0.5, rw.release_read)
        release.start()
        pid = fork_call(child, k)
        _, status = os.waitpid(pid, 0)
        release.join()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", shmkit.OwnerDiedWarning)
            assert rw.acquire_write(timeout=5), f"killed at point {k}"  # nobody holds it
            rw.release_write()
            assert rw.acquire_read(timeout=5)
            rw.release_read()
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
    assert k >= 3  # locked, announced, and the state cleared on the way out
    rw.close()


def test_async_write_timeout_undoes_the_announcement(name):
    from conftest import SPAWN

    rw = aio.RWLock(name)
    ready = SPAWN.Event()
    p = spawn(_hold_read, name, ready)
    assert ready.wait(60)
    other = shmkit.RWLock(name)
    got: list[bool] = []

    async def main() -> None:
        t = asyncio.create_task(rw.acquire_write(timeout=1.0))
        await asyncio.sleep(0.3)
        assert not t.done() and _writer_waiting(rw)
        # a reader held back by the announcement, asleep until it is undone
        reader = threading.Thread(target=lambda: got.append(other.acquire_read(timeout=60)))
        reader.start()
        assert await t is False
        _assert_no_write_left(rw)
        await asyncio.to_thread(reader.join, 30)
        assert got == [True]  # woken by the undo, long before its 60 s
        other.release_read()
        assert await rw.acquire_read(timeout=0)
        rw.release_read()

    try:
        asyncio.run(main())
    finally:
        p.kill()
        p.join(30)
    other.close()
    rw.close()


_AWAIT_WRITE_THEN_STAY = """
import asyncio, shmkit, shmkit.aio, sys, time
async def main():
    rw = shmkit.aio.RWLock(sys.argv[1])
    t = asyncio.create_task(rw.acquire_write())
    end = time.monotonic() + 30
    while not rw.statistics()["writer_waiting_or_in"] and time.monotonic() < end:
        await asyncio.sleep(0.01)
    print("ready" if rw.statistics()["writer_waiting_or_in"] else "never", flush=True)
    await t
try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
sys.stdin.read()  # stay alive while the parent looks
"""


def test_ctrl_c_undoes_an_awaited_write_announcement(name):
    rw = shmkit.RWLock(name)
    assert rw.acquire_read(timeout=10)  # the child's writer announces itself, then waits
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.Popen([sys.executable, "-c", _AWAIT_WRITE_THEN_STAY, name], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert rw.statistics()["writer_pid"] == p.pid
        p.send_signal(signal.SIGINT)
        assert p.stdout.readline().strip() == "interrupted"
        # Undone by the live child itself, not recovered from a dead one.
        assert p.poll() is None
        assert not _writer_waiting(rw) and rw.statistics()["writer_pid"] is None
        assert rw.acquire_read(timeout=0)  # a new reader goes in at once
        rw.release_read()
        rw.release_read()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to recover
            assert rw.acquire_write(timeout=5)
        rw.release_write()
    finally:
        p.stdin.close()
        try:
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, p.stderr.read()
    rw.close()


@pytest.mark.parametrize("kind", ["Mutex", "Semaphore", "RWLock"])
def test_minus_one_means_no_timeout_for_every_awaited_lock(kind, name):
    # As for the blocking calls (threading.Lock's convention): timeout=-1
    # waits, here until another process lets go after 0.3 s.
    import subprocess
    import sys
    obj = getattr(aio, kind)(name, **({"value": 1} if kind == "Semaphore" else {}))
    take, give = {"Mutex": ("acquire", "release"), "Semaphore": ("acquire", "release"),
                  "RWLock": ("acquire_read", "release_read")}[kind]
    hold = (f"import shmkit, time, sys\n"
            f"o = shmkit.{kind}.open(sys.argv[1])\n"
            f"o.{take}(); print('held', flush=True); time.sleep(0.3); o.{give}()\n")
    p = subprocess.Popen([sys.executable, "-c", hold, obj.name], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"

        async def main() -> bool:
            if kind == "RWLock":
                got = await obj.acquire_write(timeout=-1)
                obj.release_write()
            else:
                got = await obj.acquire(timeout=-1)
                obj.release()
            return got

        assert asyncio.run(main()) is True
        assert p.wait(30) == 0
    finally:
        p.kill()
        obj.close()
        obj.unlink()


# ---- io_uring: one wake per hop, nothing left behind ----------------------------

def _echo_awaiting(a: str, b: str, n: int) -> None:
    async def run() -> None:
        ca, cb = aio.Channel.open(a), aio.Channel.open(b)
        await cb.send(aio.waker().encode())
        for _ in range(n):
            await cb.send(await ca.recv(timeout=60), timeout=60)
        ca.close()
        cb.close()

    asyncio.run(run())


def test_round_trips_with_both_sides_awaiting(names, waker):
    n = 2000
    a, b = aio.Channel(names(), capacity=1 << 14), aio.Channel(names(), capacity=1 << 14)
    p = spawn(_echo_awaiting, a.name, b.name, n)

    async def main() -> tuple[str, str, list[bytes]]:
        theirs = (await b.recv(timeout=60)).decode()
        got = []
        for i in range(n):
            await a.send(i.to_bytes(4, "little") * 16, timeout=60)  # 64 B
            got.append(await b.recv(timeout=60))
        return aio.waker(), theirs, got

    try:
        ours, theirs, got = asyncio.run(main())
        assert ours == theirs == waker
        assert got == [i.to_bytes(4, "little") * 16 for i in range(n)]
        p.join(30)
        assert p.exitcode == 0
        assert a.statistics()["receivers_waiting"] == b.statistics()["receivers_waiting"] == 0
    finally:
        p.kill()
        a.close()
        b.close()


def _waiting_counts(ch: aio.Channel, ev: aio.Event, sem: aio.Semaphore) -> tuple[int, ...]:
    return (ch.statistics()["receivers_waiting"], ev.statistics()["waiters"], sem.statistics()["waiters"])


def test_a_cancelled_await_leaves_no_sleeper_counted(names, waker):
    ch = aio.Channel(names(), capacity=4096)
    ev, sem = aio.Event(names()), aio.Semaphore(names(), value=0)

    async def main() -> tuple[tuple[int, ...], tuple[int, ...]]:
        tasks = [asyncio.create_task(ch.recv(timeout=60)),
                 asyncio.create_task(ev.wait(timeout=60)),
                 asyncio.create_task(sem.acquire(timeout=60))]
        await asyncio.sleep(0.3)
        waiting = _waiting_counts(ch, ev, sem)  # counted, as blocking calls are
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return waiting, _waiting_counts(ch, ev, sem)

    try:
        waiting, after = asyncio.run(main())
        assert waiting == (1, 1, 1)
        if waker == "io_uring":
            assert after == (0, 0, 0)  # the cancel took the wait out of flight at once
        deadline = time.monotonic() + PROMPT  # the watcher threads let go soon after
        while _waiting_counts(ch, ev, sem) != (0, 0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _waiting_counts(ch, ev, sem) == (0, 0, 0)
        assert ch._seg._mapping.exports == 0 and ev._m.exports == 0  # nothing pinned
    finally:
        for o in (ch, ev, sem):
            o.close()
        ev.unlink()
        sem.unlink()


def test_io_uring_awaits_start_no_thread_and_never_wake(names):
    if not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    n = 1000
    chans = [aio.Channel(names(), capacity=64) for _ in range(n)]
    before, watchers_before = _threads(), aio.watcher_count()  # earlier tests' watchers

    async def main() -> tuple[int, int, int, float, int, int, list[bytes]]:
        assert aio.waker() == "io_uring"
        tasks = [asyncio.create_task(c.recv(timeout=60)) for c in chans]
        await asyncio.sleep(0.5)
        during = _threads()
        waiting = sum(c.statistics()["receivers_waiting"] for c in chans)
        hub = aio._hub()
        checker = hub.checker.native_id if hub.checker is not None else None
        me = threading.get_native_id()
        switches0 = _switches(me)
        looks0 = _switches(checker) if checker else 0
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)  # every task awaits: the loop sleeps in epoll
        cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        woke = _switches(me) - switches0
        # The checker backs off to keep its share of a core small, so on a
        # loaded machine its second look may come after the window above.
        deadline = time.monotonic() + 30
        while checker and _switches(checker) - looks0 < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        looks = _switches(checker) - looks0 if checker else 0
        for i, c in enumerate(chans):
            c.send_nowait(b"%d" % i)
        return during, waiting, aio.watcher_count(), cpu, woke, looks, \
            await asyncio.gather(*tasks)

    try:
        during, waiting, watchers, cpu, woke, looks, got = asyncio.run(main())
        assert watchers == watchers_before  # no watcher thread started
        assert during - before <= 1  # at most the checker that looks for dead peers
        assert waiting == n  # each await counted a sleeper: senders wake it
        assert woke <= 5, woke  # the loop's thread slept through (one timer wake)
        assert looks >= 2  # the checker does look every CHECK_EVERY s or so
        assert cpu < 0.25  # a busy wait would use a whole core
        assert got == [b"%d" % i for i in range(n)]
        assert sum(c.statistics()["receivers_waiting"] for c in chans) == 0
    finally:
        for c in chans:
            c.close()


def test_io_uring_awaits_are_not_limited_by_max_watchers(names, monkeypatch):
    if not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    monkeypatch.setattr(aio, "MAX_WATCHERS", 1)  # 127 objects, were threads watching
    events = [aio.Event(names()) for _ in range(300)]
    watchers = aio.watcher_count()  # earlier tests' watchers

    async def main() -> list[bool]:
        tasks = [asyncio.create_task(e.wait(timeout=60)) for e in events]
        await asyncio.sleep(0.3)
        assert aio.watcher_count() == watchers  # none started
        for e in events[::-1]:
            e.set()
        return await asyncio.gather(*tasks)

    try:
        assert all(asyncio.run(main()))
    finally:
        for e in events:
            e.close()
            e.unlink()


def test_a_hostile_description_raises_and_never_crashes(names):
    if not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    from shmkit import _core

    ev, ch = shmkit.Event(names()), shmkit.Channel(names(), capacity=4096)
    m, size = ev._m, ev._m.length
    u = _core.Uring()
    corrupt = shmkit.CorruptError  # what wait_ready raises for the same descriptions
    bad = [((_core.W_EVENT, m, size, 0), corrupt),              # past the end
           ((_core.W_EVENT, m, size - 2, 0), corrupt),          # straddles the end
           ((_core.W_EVENT, m, 1 << 62, 0), corrupt),
           ((_core.W_EVENT, m, -8, 0), corrupt),
           ((_core.W_LOCK, m, 2, 0), corrupt),                  # misaligned
           ((_core.W_SEM, m, size - 8, 0), corrupt),            # its table runs past the end
           ((_core.W_COND, m, (1 << 64) - 8, 0), OverflowError),
           ((99, m, 0, 0), ValueError),
           ((_core.W_EVENT, "not a mapping", 0, 0), TypeError),
           ((_core.W_RING_DATA, m, 0, 0), TypeError),           # a mapping, not a channel
           ((_core.W_EVENT, m, 0), TypeError),
           ("desc", TypeError)]
    try:
        for desc, error in bad:
            with pytest.raises(error):
                u.watch(desc, 1)
            assert len(u) == 0 and m.exports == 0  # nothing in flight, nothing pinned
        # and the ring still works
        assert u.watch(_describe_ev(ev), 2) is False
        with pytest.raises(ValueError, match="in flight"):
            u.watch(_describe_ev(ev), 2)
        assert len(u) == 1 and m.exports == 1 and ev.statistics()["waiters"] == 1
        assert u.cancel(2) == [] and len(u) == 0 and m.exports == 0
        assert ev.statistics()["waiters"] == 0
        u.close()
        with pytest.raises(ValueError, match="closed"):
            u.watch(_describe_ev(ev), 3)
    finally:
        u.close()
        ev.close()
        ch.close()
        ev.unlink()


def _describe_ev(ev: shmkit.Event) -> tuple:
    from shmkit.aio_wait import _describe
    return _describe(ev)


def test_a_loop_closed_or_dropped_with_awaits_in_flight_leaves_nothing_counted(name):
    if not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    import gc

    ch = aio.Channel(name, capacity=4096)
    mapping = ch._seg._mapping

    def counted() -> tuple[int, int]:
        return ch.statistics()["receivers_waiting"], mapping.exports

    # closed without cancelling its tasks: the next ring made in this thread
    # closes the closed loop's ring
    loop = asyncio.new_event_loop()
    task = loop.create_task(ch.recv(timeout=60))
    loop.run_until_complete(asyncio.sleep(0.2))
    assert counted() == (1, 1)
    loop.close()

    async def nothing() -> None:
        await aio.Event(None).wait(timeout=0)

    asyncio.run(nothing())
    assert counted() == (0, 0)
    ch.send_nowait(b"one")  # the abandoned receive took nothing
    del task, loop

    # a thread that ends with its loop neither closed nor cancelled: the
    # loop is garbage, and with it its ring
    other = aio.Channel(None, capacity=4096)
    seen: list[int] = []

    def abandon() -> None:
        lp = asyncio.new_event_loop()
        t = lp.create_task(other.recv(timeout=60))
        lp.run_until_complete(asyncio.sleep(0.2))
        seen.append(other.statistics()["receivers_waiting"])
        seen.append(other._seg._mapping.exports)
        del t

    th = threading.Thread(target=abandon)
    th.start()
    th.join()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            gc.collect()
    assert seen == [1, 1]
    assert other.statistics()["receivers_waiting"] == 0 and other._seg._mapping.exports == 0
    other.close()
    assert ch.recv_nowait() == b"one"
    ch.close()


def test_a_forked_child_makes_its_own_ring(names):
    if not _uring_works():
        pytest.skip("io_uring cannot wake awaits on this kernel")
    a = aio.Channel(names(), capacity=4096)
    ev = aio.Event(names())

    async def main() -> bytes:
        t = asyncio.create_task(a.recv(timeout=60))
        await asyncio.sleep(0.2)  # in flight in this loop's ring
        pid = os.fork()
        if pid == 0:  # the child: its own loop, its own ring
            code = 1
            try:
                async def child() -> bool:
                    threading.Timer(0.1, ev.set).start()
                    return await ev.wait(timeout=30) and aio.waker() == "io_uring"

                code = 0 if asyncio.run(child()) else 2
            finally:
                os._exit(code)
        _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert a.statistics()["receivers_waiting"] == 1  # the child left ours alone
        a.send_nowait(b"still woken")
        return await t

    try:
        assert asyncio.run(main()) == b"still woken"
    finally:
        a.close()
        ev.close()
        ev.unlink()


_REFUSE_IO_URING = """
import ctypes, ctypes.util, os, struct
# a seccomp filter that fails io_uring_setup (425) with EPERM, as a container
# runtime's default profile does
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
ops = [(0x20, 0, 0, 0),                      # load the syscall number
       (0x15, 0, 1, 425),                    # io_uring_setup?
       (0x06, 0, 0, 0x00050000 | 1),         # then fail with EPERM
       (0x06, 0, 0, 0x7fff0000)]             # else allow
prog = b"".join(struct.pack("HBBI", *op) for op in ops)
buf = ctypes.create_string_buffer(prog)

class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

fp = Fprog(len(ops), ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0                  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0   # PR_SET_SECCOMP, FILTER
"""


def test_where_io_uring_is_refused_awaits_fall_back_to_threads(names):
    ev = shmkit.Event(names())
    code = _REFUSE_IO_URING + """
import asyncio, errno, sys, threading
import shmkit, shmkit.aio as aio
try:
    shmkit._core.Uring()
except shmkit._core.UringUnavailableError as exc:
    assert isinstance(exc, OSError) and isinstance(exc, shmkit.ShmkitError)
    print("refused", errno.errorcode[exc.errno])

async def main():
    e = aio.Event.open(sys.argv[1])
    threading.Timer(0.1, e.set).start()
    return aio.waker(), await e.wait(timeout=30), aio.watcher_count()

print(*asyncio.run(main()))
"""
    out = run_python(code, ev.name).stdout.split()
    assert out == ["refused", "EPERM", "threads", "True", "1"]
    # required, it is an error; a value it does not know, too
    code = _REFUSE_IO_URING + """
import asyncio, os, shmkit, shmkit.aio as aio

async def main():
    return await aio.Event(None).wait(timeout=0.01)

for value, error in [("io_uring", shmkit._core.UringUnavailableError),
                     ("uring", aio.WakerError)]:
    os.environ["SHMKIT_AIO_WAKER"] = value
    try:
        asyncio.run(main())
    except error as exc:
        print(type(exc).__name__, "SHMKIT_AIO_WAKER" in str(exc) or "io_uring" in str(exc))
"""
    assert run_python(code).stdout.split() == ["UringUnavailableError", "True",
                                               "WakerError", "True"]
    ev.close()
    ev.unlink()


def _await_briefly_and_exit(name: str) -> None:
    async def run() -> None:
        ch = aio.Channel.open(name)
        with pytest.raises(shmkit.Timeout):
            await ch.recv(timeout=0.05)

    asyncio.run(run())


def test_a_process_that_exits_after_awaiting_leaves_no_sleeper_counted(names, waker):
    # The watcher thread, poked when the await gave up, may still be in its
    # wait when the process exits: it must leave it (and uncount) first.
    ch = shmkit.Channel(names())
    try:
        for _ in range(10):
            p = spawn(_await_briefly_and_exit, ch.name)
            p.join(30)
            assert p.exitcode == 0
            assert ch.statistics()["receivers_waiting"] == 0
    finally:
        ch.close()
