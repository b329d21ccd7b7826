"""Locks and events across real processes, including processes killed by SIGKILL.

The kill-at-random-points loops run briefly here; ``make stress`` runs them
thousands of times (``test_kill_cycles_stress``).  Timing checks use wide
margins: the machine may be busy, and no test asserts a speed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import shmkit
import shmkit.aio
from shmkit import _core
from conftest import (SPAWN, SRC, Interrupt, interrupt_at_bytecode, run_python, set_layout,
                      spawn)

PROMPT = 1.0  # seconds: "promptly" after a holder dies (it is ~1-50 ms)


def _quiet() -> None:
    warnings.simplefilter("ignore", shmkit.OwnerDiedWarning)


def _elapsed(fn, *args, **kwargs):
    t = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - t


def _make(kind: str, name: str):
    if kind == "mutex":
        return shmkit.Mutex(name)
    if kind == "rwlock":
        return shmkit.RWLock(name)
    if kind == "semaphore":
        return shmkit.Semaphore(name, value=1)
    if kind == "condition":
        return shmkit.Condition(name)
    raise ValueError(kind)


def _locked(obj):
    """A context manager for an exclusive holding of any of the primitives."""
    return obj.write() if isinstance(obj, shmkit.RWLock) else obj


# -- children -----------------------------------------------------------------

def _increment(kind: str, lock_name: str, counter_name: str, n: int) -> None:
    lock = _make(kind, lock_name)
    arr = shmkit.Array.open(counter_name)
    for _ in range(n):
        with _locked(lock):
            v = int(arr[0])
            arr[0] = v + 1
    arr.close()
    lock.close()


def _hold(kind: str, name: str, ready, release=None) -> None:
    """Take `kind` and keep it until `release` is set (or until killed)."""
    if kind == "mutex":
        obj = shmkit.Mutex(name)
        obj.acquire()
    elif kind == "write":
        obj = shmkit.RWLock(name)
        obj.acquire_write()
    elif kind == "read":
        obj = shmkit.RWLock(name)
        obj.acquire_read()
    elif kind == "semaphore":
        obj = shmkit.Semaphore(name, value=2)
        obj.acquire()
    elif kind == "condition":
        obj = shmkit.Condition(name)
        obj.acquire()
    else:
        raise ValueError(kind)
    ready.set()
    if release is None:
        time.sleep(120)
        return
    release.wait(60)
    if kind == "write":
        obj.release_write()
    elif kind == "read":
        obj.release_read()
    else:
        obj.release()


def _wait_event(name: str, auto: bool, results: str, i: int, timeout: float) -> None:
    ev = shmkit.Event(name, auto_reset=auto, create=False)
    out = shmkit.Array.open(results)
    r = ev.wait(timeout=timeout)
    out[i] = 1 if r else 2


def _wait_condition(name: str, results: str, i: int) -> None:
    c = shmkit.Condition(name, create=False)
    out = shmkit.Array.open(results)
    with c:
        r = c.wait(timeout=5)
    out[i] = 1 if r else 2


def _wait_for_value(name: str, data: str) -> None:
    c = shmkit.Condition(name, create=False)
    arr = shmkit.Array.open(data)
    with c:
        ok = c.wait_for(lambda: arr[0] >= 3, timeout=10)
    sys.exit(0 if ok else 5)


# -- mutual exclusion ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mutex", "rwlock", "semaphore", "condition"])
def test_mutual_exclusion_exact_counter(kind, names):
    lock_name, counter = names(), names()
    lock = _make(kind, lock_name)
    arr = shmkit.Array(counter, "int64", 1)
    procs = [spawn(_increment, kind, lock_name, counter, 1500) for _ in range(3)]
    _increment(kind, lock_name, counter, 500)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert arr[0] == 3 * 1500 + 500
    arr.close()
    lock.close()


def test_mutex_basics(name):
    m = shmkit.Mutex(name)
    assert not m.locked() and m.holder_pid() is None
    assert m.acquire() is True
    assert m.locked() and m.holder_pid() == os.getpid() and not m.recovered
    assert m.statistics()["holder_pid"] == os.getpid()
    m.release()
    with pytest.raises(RuntimeError):
        m.release()
    with m:
        assert m.locked()
    with m.held(timeout=1) as held:
        assert held is m
    m.acquire_nowait()
    m.release()
    assert shmkit.Mutex.open(name).name == name
    with pytest.raises(shmkit.ExistsError):
        shmkit.Mutex.create(name)
    m.close()
    with pytest.raises(ValueError):  # closed
        m.acquire()


@pytest.mark.parametrize("kind", ["Mutex", "Semaphore"])
def test_with_blocks_bind_like_methods(kind, names):
    """`with` binds __enter__/__exit__ without a new method object per block
    (special.c); the binding must still behave as a bound method does."""
    import gc
    import inspect
    import weakref

    cls = getattr(shmkit, kind)
    name = names()
    kw = {"value": 1} if kind == "Semaphore" else {}
    watcher = cls(name, **kw)

    def busy() -> bool:
        return watcher.locked() if kind == "Mutex" else watcher.value == 0

    # a handle made for the block alone lives until its __exit__ has run
    with cls(name):
        gc.collect()
        assert busy()
    assert not busy()
    # an exception in the block: released, and the exception is not swallowed
    with pytest.raises(KeyError):
        with watcher:
            raise KeyError("x")
    assert not busy()
    # unbound and bound calls, and their argument checks
    cls.__enter__(watcher)
    assert busy()
    cls.__exit__(watcher, None, None, None)
    assert not busy()
    with pytest.raises(TypeError, match="doesn't apply"):
        cls.__enter__(object())
    with pytest.raises(TypeError, match="takes no arguments"):
        watcher.__enter__(1)
    with pytest.raises(TypeError, match="keyword"):
        watcher.__exit__(exc=None)
    assert str(inspect.signature(cls.__enter__)) == "(self, /)"
    assert watcher.__exit__.__self__ is watcher and watcher.__exit__.__name__ == "__exit__"
    # equal and hashed as bound methods are (atexit.unregister relies on it)
    assert watcher.__exit__ == watcher.__exit__ and watcher.__exit__ != watcher.__enter__
    assert hash(watcher.__exit__) == hash(watcher.__exit__)
    assert watcher.__exit__ != cls(name).__exit__
    # a bound method keeps its object, and one stored in its own object is a
    # cycle that the collector frees (the handle's mapping with it)
    other = cls(name)
    exit_ = other.__exit__
    other.__enter__()
    del other
    assert busy()
    exit_(None, None, None)
    assert not busy()
    del exit_
    cyclic = cls(name)
    cyclic.own = cyclic.__enter__
    gone = weakref.ref(cyclic)
    del cyclic
    gc.collect()
    assert gone() is None
    # many threads entering blocks at once: exclusion holds, nothing leaks
    hits = [0]

    def work() -> None:
        for _ in range(2000):
            with watcher:
                v = hits[0]
                hits[0] = v + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert hits[0] == 8000 and not busy()
    watcher.close()


@pytest.mark.parametrize("kind", ["Mutex", "Semaphore"])
def test_a_handle_that_was_never_initialised_raises_and_never_crashes(kind):
    """``cls.__new__(cls)`` gives a handle without a mapping: every way of
    taking or giving back the lock must raise TypeError, not touch memory."""
    calls = ["with h: pass", "h.acquire()", "h.acquire(timeout=0.1)", "h.acquire(False)",
             "h.release()", "h.__enter__()", "h.__exit__(None, None, None)",
             f"shmkit.{kind}.__exit__(h, None, None, None)"]
    code = f"""
        import shmkit
        for call in {calls!r}:
            h = shmkit.{kind}.__new__(shmkit.{kind})
            try:
                exec(call)
            except TypeError as e:
                assert "initialised" in str(e), (call, e)
            else:
                raise AssertionError(call + " did not raise")
        print("ok")
    """
    proc = run_python(code)
    assert proc.stdout.strip() == "ok"


def _release_later(obj, delay: float, how: str = "release") -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), getattr(obj, how)()))
    t.start()
    return t


def test_none_and_minus_one_wait_forever(names):
    """timeout=None (and threading's -1 for acquire) means no time limit, not 0."""
    m = shmkit.Mutex(names())
    rw = shmkit.RWLock(names())
    sem = shmkit.Semaphore(names(), value=0)
    cond = shmkit.Condition(names())
    other_m, other_rw = shmkit.Mutex(m.name), shmkit.RWLock(rw.name)
    other_cond = shmkit.Condition(cond.name)
    for timeout in (None, -1):
        other_m.acquire()
        t = _release_later(other_m, 0.2)
        (got, dt) = _elapsed(m.acquire, timeout=timeout)
        assert got and dt > 0.1
        m.release()
        t.join()
        other_cond.acquire()
        t = _release_later(other_cond, 0.2)
        got, dt = _elapsed(cond.acquire, timeout=timeout)
        assert got and dt > 0.1
        cond.release()
        t.join()
        other_rw.acquire_write()
        t = _release_later(other_rw, 0.2, "release_write")
        got, dt = _elapsed(rw.acquire_read, timeout=timeout)
        assert got and dt > 0.1
        rw.release_read()
        t.join()
        t = _release_later(sem, 0.2)
        got, dt = _elapsed(sem.acquire, timeout=timeout)
        assert got and dt > 0.1
        t.join()
    with cond:  # a wait whose deadline has passed returns at once
        got, dt = _elapsed(cond.wait, -1)
        assert got is False and dt < 0.5
        got, dt = _elapsed(cond.wait_for, lambda: False, 0.05)
        assert got is False and dt < 0.5
    for o in (m, rw, sem, cond, other_m, other_rw, other_cond):
        o.close()


def test_rwlock_basics(names):
    rw = shmkit.RWLock(names())
    with pytest.raises(RuntimeError):
        rw.release_read()  # not held
    with pytest.raises(RuntimeError):
        rw.release_write()
    with rw.read():
        with rw.read(timeout=1):  # read holds nest
            assert rw.statistics()["readers"] == {os.getpid(): 2}
        assert rw.acquire_write(timeout=0.05) is False  # our own reader counts too
    with rw.write():
        assert rw.statistics()["writer_pid"] == os.getpid()
        assert rw.acquire_read(timeout=0.05) is False
    assert rw.statistics() == {"writer_pid": None, "readers": {},
                               "writer_waiting_or_in": False}
    rw.close()


def test_embedded_objects(name):
    seg = shmkit.Segment(name, size=8192)
    m = shmkit.Mutex.at(seg, 0)
    ev = shmkit.Event.at(seg, 64, auto_reset=True)
    rw = shmkit.RWLock.at(seg, 128)  # 64 + 8 * max_attach bytes each
    sem = shmkit.Semaphore.at(seg, 128 + 64 + 8 * 256, value=2)
    cond = shmkit.Condition.at(seg, 8192 - 64 - 8 * 256)
    with m:
        assert seg.read(4, offset=0) != b"\0\0\0\0"
    ev.set()
    assert ev.wait(0) and not ev.is_set()
    with rw.read():
        pass
    with rw.write():
        pass
    assert sem.acquire() and sem.acquire() and not sem.acquire(timeout=0)
    sem.release(2)
    with cond:
        assert cond.wait(timeout=0.01) is False
    with pytest.raises(shmkit.CorruptError):
        shmkit.Mutex.at(seg, 1 << 20)  # outside the segment
    seg.close()


# -- timeouts --------------------------------------------------------------------

def test_timeouts_return_false_or_raise(names):
    n_mutex, n_w, n_r, n_sem, n_cond, n_ev = (names() for _ in range(6))
    m, rw_w, rw_r = shmkit.Mutex(n_mutex), shmkit.RWLock(n_w), shmkit.RWLock(n_r)
    sem, cond, ev = shmkit.Semaphore(n_sem, value=2), shmkit.Condition(n_cond), \
        shmkit.Event(n_ev)
    readies, release = [SPAWN.Event() for _ in range(5)], SPAWN.Event()
    holders = [spawn(_hold, k, n, r, release) for k, n, r in zip(
        ["mutex", "write", "read", "semaphore", "condition"],
        [n_mutex, n_w, n_r, n_sem, n_cond], readies)]
    try:
        for r in readies:
            assert r.wait(30)
        sem.acquire()  # the holder has the other unit
        t = 0.2
        cases = [
            lambda: m.acquire(timeout=t),
            lambda: rw_w.acquire_read(timeout=t),
            lambda: rw_w.acquire_write(timeout=t),
            lambda: rw_r.acquire_write(timeout=t),
            lambda: sem.acquire(timeout=t),
            lambda: cond.acquire(timeout=t),
            lambda: ev.wait(timeout=t),
        ]
        for case in cases:
            result, dt = _elapsed(case)
            assert result is False
            assert t * 0.9 <= dt < t + 1.5, dt
        for case in (lambda: m.acquire(False), lambda: m.acquire(timeout=0),
                     lambda: sem.acquire(False), lambda: rw_w.acquire_read(timeout=0),
                     lambda: ev.wait(0)):
            result, dt = _elapsed(case)
            assert result is False and dt < 0.5
        with pytest.raises(shmkit.Timeout) as e:
            with m.held(timeout=0.05):
                pass
        assert isinstance(e.value, TimeoutError)
        for ctx in (rw_w.read(timeout=0.05), rw_w.write(timeout=0.05)):
            with pytest.raises(shmkit.Timeout):
                with ctx:
                    pass
        with pytest.raises(shmkit.WouldBlock):
            m.acquire_nowait()
        with pytest.raises(shmkit.WouldBlock):
            sem.acquire_nowait()
        # A negative timeout (a deadline already passed) never waits.
        for case in (lambda: m.acquire(timeout=-0.5), lambda: rw_w.acquire_read(timeout=-0.5),
                     lambda: rw_w.acquire_write(timeout=-2), lambda: sem.acquire(timeout=-0.5),
                     lambda: cond.acquire(timeout=-0.5), lambda: ev.wait(-1)):
            result, dt = _elapsed(case)
            assert result is False and dt < 0.5
        with rw_r.read(timeout=0.5):  # readers share
            pass
        # an int beyond any float is as long as infinity: -10**400 does not wait
        result, dt = _elapsed(lambda: m.acquire(timeout=-10 ** 400))
        assert result is False and dt < 0.5
        # A timed-out writer leaves the lock usable for readers.
        assert rw_r.acquire_read(timeout=0.5)
        rw_r.release_read()
    finally:
        release.set()
        for p in holders:
            p.join(30)
    assert all(p.exitcode == 0 for p in holders)
    # Everything is free again.
    assert m.acquire(timeout=1) and rw_w.acquire_write(timeout=1)
    assert cond.acquire(timeout=1)
    for obj in (m, rw_w, rw_r, sem, cond, ev):
        obj.close()


# -- Ctrl-C and the GIL -------------------------------------------------------------

_BLOCKERS = {
    "mutex": "m = shmkit.Mutex(N)\nblock = m.acquire",
    "mutex-with": "m = shmkit.Mutex(N)\ndef block():\n    with m: pass",
    "rwlock-read": "rw = shmkit.RWLock(N)\nblock = rw.acquire_read",
    "rwlock-write": "rw = shmkit.RWLock(N)\nblock = rw.acquire_write",
    "event": "e = shmkit.Event(N)\nblock = e.wait",
    "event-auto": "e = shmkit.Event(N, auto_reset=True)\nblock = e.wait",
    "semaphore": "s = shmkit.Semaphore(N, value=0)\nblock = s.acquire",
    "condition": "c = shmkit.Condition(N)\ndef block():\n    with c: c.wait()",
}


def test_ctrl_c_interrupts_every_blocking_call(names):
    # The parent holds what the children wait for, with no timeout.
    n = {k: names() for k in _BLOCKERS}
    keep = [shmkit.Mutex(n["mutex"]), shmkit.Mutex(n["mutex-with"]),
            shmkit.RWLock(n["rwlock-read"]), shmkit.RWLock(n["rwlock-write"]),
            shmkit.Event(n["event"]), shmkit.Event(n["event-auto"], auto_reset=True),
            shmkit.Semaphore(n["semaphore"], value=0), shmkit.Condition(n["condition"])]
    keep[0].acquire()
    keep[1].acquire()
    keep[2].acquire_write()
    keep[3].acquire_read()
    env = dict(os.environ, PYTHONPATH=SRC)
    procs = {}
    for kind, setup in _BLOCKERS.items():
        code = "import shmkit, sys, time\nN = sys.argv[1]\n" + setup + textwrap.dedent("""
            print("ready", flush=True)
            try:
                block()
            except KeyboardInterrupt:
                print("interrupted", time.monotonic(), flush=True)
            else:
                print("returned", flush=True)
        """)
        procs[kind] = subprocess.Popen([sys.executable, "-c", code, n[kind]], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    try:
        for p in procs.values():
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # let them fall asleep in the kernel
        for p in procs.values():
            assert p.poll() is None  # still blocked
        sent = time.monotonic()
        for p in procs.values():
            p.send_signal(signal.SIGINT)
        for kind, p in procs.items():
            out, err = p.communicate(timeout=10)
            word, _, when = out.strip().partition(" ")
            assert word == "interrupted", (kind, out, err)
            assert float(when) - sent < 1.0, (kind, float(when) - sent)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    keep[0].release()
    keep[1].release()
    keep[2].release_write()
    keep[3].release_read()
    # The interrupted waiters left nothing behind: everything can be taken.
    assert keep[2].acquire_read(timeout=1) and keep[3].acquire_write(timeout=1)
    for k in keep:
        k.close()


def test_waiting_releases_the_gil(names):
    m, other = shmkit.Mutex(names()), None
    other = shmkit.Mutex(m.name)  # a second attachment: another owner
    other.acquire()
    rw = shmkit.RWLock(names())
    rw_other = shmkit.RWLock(rw.name)
    rw_other.acquire_write()
    ev, sem, cond = shmkit.Event(names()), shmkit.Semaphore(names(), value=0), \
        shmkit.Condition(names())
    waits = [lambda: m.acquire(timeout=0.4), lambda: rw.acquire_read(timeout=0.4),
             lambda: ev.wait(0.4), lambda: sem.acquire(timeout=0.4),
             lambda: cond.acquire() and (cond.wait(0.4), cond.release())]
    for wait in waits:
        t = threading.Thread(target=wait)
        count = 0
        t.start()
        time.sleep(0.05)
        while t.is_alive():
            count += 1
        t.join()
        assert count > 10_000, count  # this thread ran while the other waited
    other.release()
    rw_other.release_write()
    for o in (m, other, rw, rw_other, ev, sem, cond):
        o.close()


def test_many_threads_of_one_process(names):
    m = shmkit.Mutex(names())
    rw = shmkit.RWLock(names())
    sem = shmkit.Semaphore(names(), value=2)
    ev = shmkit.Event(names())
    counter = [0]
    pair = [0, 0]
    inside, most, bad = [0], [0], []
    guard = threading.Lock()

    def bump():
        for _ in range(300):
            with m:
                v = counter[0]
                time.sleep(0) if v % 50 == 0 else None
                counter[0] = v + 1

    def write():
        for _ in range(100):
            with rw.write():
                pair[0] += 1
                time.sleep(0)
                pair[1] += 1

    def read():
        for _ in range(100):
            with rw.read():
                if pair[0] != pair[1]:
                    bad.append(tuple(pair))

    def limited():
        for _ in range(50):
            with sem:
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0001)
                with guard:
                    inside[0] -= 1

    woke = []
    threads = [threading.Thread(target=f) for f in [bump] * 6 + [write] * 3 + [read] * 3
               + [limited] * 5]
    waiters = [threading.Thread(target=lambda: woke.append(ev.wait(5))) for _ in range(4)]
    for t in threads + waiters:
        t.start()
    time.sleep(0.2)
    ev.set()
    for t in threads + waiters:
        t.join(60)
    assert counter[0] == 1800
    assert pair[0] == pair[1] == 300 and bad == []
    assert most[0] <= 2 and sem.value == 2
    assert woke == [True] * 4
    for o in (m, rw, sem, ev):
        o.close()


def test_threads_churning_one_segments_lock_registry(name):
    """The registry of held locks (one per segment in a process) is changed
    with plain loads and stores, ordered by the GIL.  Eight threads take and
    release eight locks of one segment, nested, blocking and non-blocking,
    with the interpreter switching threads as often as it can: a registry
    entry lost or overwritten would show as a lock taken over as damaged
    (OwnerDiedWarning, a lost update) or an entry left behind."""
    seg = shmkit.Segment(name, size=4096)
    locks = [shmkit.Mutex.at(seg, 64 * i) for i in range(8)]
    counts, totals, errors = [0] * 8, [0] * 8, []
    guard = threading.Lock()

    def work(seed):
        rng = random.Random(seed)
        mine = [0] * 8
        try:
            for _ in range(400):
                held = []
                for i in sorted(rng.sample(range(8), rng.randint(1, 3))):  # one order: no deadlock
                    if rng.random() < 0.3:
                        if not locks[i].acquire(blocking=False):
                            continue
                    else:
                        locks[i].acquire()
                    held.append(i)
                for i in held:
                    v = counts[i]
                    if rng.random() < 0.1:
                        time.sleep(0)
                    counts[i] = v + 1
                    mine[i] += 1
                for i in reversed(held):
                    locks[i].release()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        with guard:
            totals[:] = [t + n for t, n in zip(totals, mine)]

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert counts == totals and sum(totals) > 8 * 400
    assert seg._mapping.held_count == 0
    assert all(not lk.locked() for lk in locks)
    seg.close()


# -- events and conditions across processes ----------------------------------------

def _results(names, n):
    arr = shmkit.Array(names(), "int8", n)
    return arr


def _wait_until(pred, timeout=10.0, poll=0.01):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(poll)
    return True


def test_an_event_in_a_with_block_is_closed_at_its_end(names):
    """``with shmkit.Event(name) as ev:`` closes the handle, as for a Channel;
    what was set stays set for the next handle."""
    name = names()
    with shmkit.Event(name) as ev:
        ev.set()
    assert ev.closed
    with shmkit.aio.Event(name) as again:
        assert again.is_set() and not again.closed
        again.unlink()
    assert again.closed


def test_manual_event_wakes_every_waiter(names):
    ev = shmkit.Event(names())
    out = _results(names, 3)
    procs = [spawn(_wait_event, ev.name, False, out.name, i, 20) for i in range(3)]
    assert _wait_until(lambda: ev.statistics()["waiters"] == 3, 30)
    assert not out.array.any()
    ev.set()
    for p in procs:
        p.join(30)
    assert list(out.array) == [1, 1, 1]
    assert ev.is_set() and ev.wait(0)  # stays set until cleared
    ev.clear()
    assert not ev.is_set() and ev.wait(0.05) is False
    ev.close()
    out.close()


def test_a_signal_handler_raising_as_an_auto_reset_wait_takes_the_set_gives_it_back(
        names, raising_handler):
    """A signal comes as an auto-reset wait consumes a set made by another
    process: the handler's exception (Ctrl-C's KeyboardInterrupt) reaches the
    caller and the set goes back to the event, for the next wait."""
    with shmkit.Event(names(), auto_reset=True) as ev:
        run_python(f"""
            import shmkit
            with shmkit.Event({ev.name!r}) as ev:
                ev.set()
            """)
        _core.fault(1, "event.wait.taken", signal=signal.SIGUSR1)
        with pytest.raises(Interrupt):
            ev.wait(1.0)
        _core.fault(0)
        assert ev.is_set()
        assert shmkit.wait([ev], timeout=0) == [ev]
        assert ev.wait(0) and not ev.wait(0)  # one set, one wait
        ev.unlink()


_PLAIN_ACQUIRES = [("Mutex", "acquire", ()), ("Mutex", "acquire", (True, 1.0)),
                   ("Condition", "acquire", ()), ("Semaphore", "acquire", ()),
                   ("Semaphore", "acquire", (True, 1.0)), ("RWLock", "acquire_read", ()),
                   ("RWLock", "acquire_write", (1.0,))]


@pytest.mark.parametrize("kind, call, args", _PLAIN_ACQUIRES)
def test_a_signal_handler_raising_as_a_plain_acquire_returns_leaves_nothing_held(
        names, raising_handler, kind, call, args):
    """A signal comes as a plain acquire() returns, the hold taken: the
    handler's exception (Ctrl-C's KeyboardInterrupt) reaches the caller,
    which never saw the acquire succeed and so releases nothing.  The hold
    is given back first: another process takes the object at once, and so
    does this handle.  (It stayed held by a live process, for good.)"""
    obj = getattr(shmkit, kind)(names(), **({"value": 1} if kind == "Semaphore" else {}))
    try:
        _core.fault(1, "sync.acquired", signal=signal.SIGUSR1)
        with pytest.raises(Interrupt):
            getattr(obj, call)(*args)
        _core.fault(0)
        take, give = (("acquire_write(0)", "release_write()") if kind == "RWLock"
                      else ("acquire(False)", "release()"))
        out = run_python(f"""
            import shmkit
            x = shmkit.{kind}({obj.name!r})
            got = x.{take}
            print(got)
            if got:
                x.{give}
            x.close()
            """)
        assert out.stdout.split() == ["True"]
        assert getattr(obj, call)(*args)
        getattr(obj, "release_read" if call == "acquire_read" else
                "release_write" if call == "acquire_write" else "release")()
    finally:
        obj.unlink()
        obj.close()


def test_auto_reset_event_releases_one_waiter_per_set(names):
    ev = shmkit.Event(names(), auto_reset=True)
    assert shmkit.Event(ev.name).auto_reset  # adopted by whoever opens it
    out = _results(names, 3)
    procs = [spawn(_wait_event, ev.name, True, out.name, i, 20) for i in range(3)]
    assert _wait_until(lambda: ev.statistics()["waiters"] == 3, 30)
    for k in (1, 2, 3):
        ev.set()
        assert _wait_until(lambda: int((out.array == 1).sum()) >= k)
        time.sleep(0.3)  # nobody else may follow
        assert int((out.array == 1).sum()) == k
        assert not ev.is_set()  # consumed by the waiter it released
    for p in procs:
        p.join(30)
    ev.set()
    assert ev.wait(0) and not ev.wait(0)  # one set, one wait
    ev.close()
    out.close()


def test_condition_wait_that_times_out_takes_the_mutex_back_from_another_thread(names):
    """A wait() that times out while another thread of the same process
    holds the mutex waits for it, as threading.Condition does: the lock word
    carries the process's token, so it cannot tell that this thread lost it."""
    c = shmkit.Condition(names())
    events = []

    def waiter():
        with c:
            events.append("A waits")
            assert c.wait(0.1) is False
            events.append("A back")
        events.append("A out")

    def holder():
        while "A waits" not in events:
            time.sleep(0.001)
        time.sleep(0.03)  # A sleeps in wait(): the mutex is free
        with c:
            events.append("B in")
            time.sleep(0.4)
            events.append("B out")

    threads = [threading.Thread(target=waiter), threading.Thread(target=holder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert events == ["A waits", "B in", "B out", "A back", "A out"]
    assert not c.lock.locked() and c._m.held_count == 0
    c.close()


def test_ctrl_c_while_a_wait_takes_the_mutex_back_from_another_thread(name):
    """Ctrl-C (twice) while wait() waits to take the mutex back from another
    thread of the process: wait() raises KeyboardInterrupt only once it holds
    the mutex again, so its with-block releases its own hold, never the
    other thread's (the word carries the process's token, not the thread's)."""
    out = run_python(f"""
        import signal, sys, threading, time
        import shmkit
        c = shmkit.Condition({name!r})
        events, errors = [], []
        main = threading.main_thread().ident

        def holder():
            try:
                while "A waits" not in events:
                    time.sleep(0.001)
                time.sleep(0.03)
                with c:
                    events.append("B in")
                    for _ in range(2):
                        time.sleep(0.2)  # A's wait has timed out: it waits for the mutex
                        signal.pthread_kill(main, signal.SIGINT)
                    time.sleep(0.2)
                    events.append("B out")
            except BaseException as e:
                errors.append(repr(e))

        t = threading.Thread(target=holder)
        t.start()
        try:
            with c:
                events.append("A waits")
                try:
                    c.wait(0.05)
                except KeyboardInterrupt:
                    events.append("A interrupted, holding" if c.lock.locked() else "A lost it")
        except BaseException as e:
            errors.append(repr(e))
        t.join(30)
        print(events, errors, c.lock.locked())
    """)
    assert out.stdout.split("\n")[0] == (
        "['A waits', 'B in', 'B out', 'A interrupted, holding'] [] False")


def test_condition_notify_counts(names):
    cond = shmkit.Condition(names())
    out = _results(names, 3)
    procs = [spawn(_wait_condition, cond.name, out.name, i) for i in range(3)]
    assert _wait_until(lambda: cond.statistics()["waiters"] == 3, 30)
    with cond:
        cond.notify(1)
    assert _wait_until(lambda: int((out.array == 1).sum()) == 1)
    time.sleep(0.3)  # longer than a sleep slice: notify(1) woke exactly one
    assert int((out.array != 0).sum()) == 1
    with cond:
        cond.notify_all()
    for p in procs:
        p.join(30)
    assert list(out.array) == [1, 1, 1]
    with pytest.raises(RuntimeError):
        cond.notify()  # not held
    with pytest.raises(RuntimeError):
        cond.wait(0.01)
    cond.close()
    out.close()


def test_condition_wait_for_across_processes(names):
    cond = shmkit.Condition(names())
    data = shmkit.Array(names(), "int64", 1)
    p = spawn(_wait_for_value, cond.name, data.name)
    for _ in range(3):
        time.sleep(0.1)
        with cond:
            data[0] += 1
            cond.notify_all()
    p.join(30)
    assert p.exitcode == 0
    with cond:
        assert bool(cond.wait_for(lambda: data[0] == 3, timeout=0)) is True
        assert cond.wait_for(lambda: False, timeout=0.1) is False
    cond.close()
    data.close()


# -- crash robustness ----------------------------------------------------------------

def _spawn_holder(kind, name, **kw):
    ready = SPAWN.Event()
    p = spawn(_hold, kind, name, ready)
    assert ready.wait(30)
    return p


def _kill(*procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.join(30)
        assert p.exitcode == -signal.SIGKILL


def test_dead_mutex_holder(name):
    m = shmkit.Mutex(name)
    p = _spawn_holder("mutex", name)
    assert m.holder_pid() == p.pid
    _kill(p)
    assert m.holder_pid() is None  # its holder is gone
    with pytest.warns(shmkit.OwnerDiedWarning, match="previous holder died"):
        got, dt = _elapsed(m.acquire, timeout=10)
    assert got and dt < PROMPT and m.recovered
    m.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.acquire(timeout=1)
    assert not m.recovered
    m.release()
    m.close()


def test_a_dead_holders_forked_child_does_not_keep_its_lock(name):
    """A holder forks a child that lives on without touching the lock, then
    is killed.  The child's inherited mapping must not keep the parent's open
    file (and its attach slot's lock) alive: the lock is taken over at once,
    while the child still runs."""
    m = shmkit.Mutex(name)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, signal, sys, time
            import shmkit
            m = shmkit.Mutex(sys.argv[1])
            m.acquire()
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            print(child, flush=True)
            sys.stdin.readline()
            os.kill(os.getpid(), signal.SIGKILL)
        """), name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    child = int(proc.stdout.readline())
    try:
        assert m.locked()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == -signal.SIGKILL
        os.kill(child, 0)  # the child lives on
        with pytest.warns(shmkit.OwnerDiedWarning, match="previous holder died"):
            got, dt = _elapsed(m.acquire, timeout=10)
        assert got and dt < PROMPT and m.recovered
        os.kill(child, 0)
        m.release()
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()
        proc.stdin.close()
    m.close()


def test_waiter_asleep_when_the_holder_dies(name):
    m = shmkit.Mutex(name)
    p = _spawn_holder("mutex", name)
    got = []

    def waiter():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got.append((m.acquire(timeout=20), time.monotonic(), m.recovered, len(w)))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)  # the waiter is asleep in its long slices by now
    killed = time.monotonic()
    _kill(p)
    t.join(20)
    ok, when, recovered, warned = got[0]
    assert ok and recovered and warned == 1
    assert when - killed < PROMPT
    m.release()
    m.close()


def test_try_lock_on_a_dead_holder_takes_it(name):
    m = shmkit.Mutex(name)
    _kill(_spawn_holder("mutex", name))
    with pytest.warns(shmkit.OwnerDiedWarning):
        assert m.acquire(blocking=False)
    assert m.recovered
    m.release()
    m.close()


def test_dead_writer(names):
    rw = shmkit.RWLock(names())
    _kill(_spawn_holder("write", rw.name))
    with pytest.warns(shmkit.OwnerDiedWarning, match="writer died"):
        got, dt = _elapsed(rw.acquire_read, timeout=10)
    assert got and dt < PROMPT and rw.recovered
    rw.release_read()
    assert rw.acquire_write(timeout=1) and not rw.recovered
    rw.release_write()
    # And a writer behind a dead writer.
    _kill(_spawn_holder("write", rw.name))
    with pytest.warns(shmkit.OwnerDiedWarning):
        got, dt = _elapsed(rw.acquire_write, timeout=10)
    assert got and dt < PROMPT and rw.recovered
    rw.release_write()
    rw.close()


def test_dead_readers_never_block_a_writer(names):
    rw = shmkit.RWLock(names())
    readers = [_spawn_holder("read", rw.name) for _ in range(2)]
    live = _spawn_holder("read", rw.name)
    assert set(rw.statistics()["readers"]) == {p.pid for p in readers + [live]}
    assert rw.acquire_write(timeout=0.2) is False  # live readers do block
    _kill(*readers)
    assert rw.acquire_write(timeout=0.2) is False  # one is still alive
    _kill(live)
    with pytest.warns(shmkit.OwnerDiedWarning, match="reader died"):
        got, dt = _elapsed(rw.acquire_write, timeout=10)
    assert got and dt < PROMPT and rw.recovered
    assert rw.statistics()["readers"] == {}
    rw.release_write()
    assert rw.acquire_read(timeout=1)
    rw.release_read()
    rw.close()


def test_dead_semaphore_holders_units_come_back(names):
    sem = shmkit.Semaphore(names(), value=2)
    holders = [_spawn_holder("semaphore", sem.name) for _ in range(2)]
    assert sem.value == 0 and sem.acquire(timeout=0.1) is False
    _kill(*holders)
    got1, dt = _elapsed(sem.acquire, timeout=10)
    got2 = sem.acquire(timeout=1)
    assert got1 and got2 and dt < PROMPT
    assert sem.acquire(timeout=0) is False  # exactly two, none made up
    sem.release(2)
    assert sem.value == 2
    with pytest.raises(ValueError):
        sem.release(0)
    sem.close()


def test_semaphore_units_survive_slot_reuse(names):
    # A newcomer that gets the dead holder's attach slot must not erase its holds.
    sem = shmkit.Semaphore(names(), value=2, max_attach=2)
    _kill(_spawn_holder("semaphore", sem.name))
    newcomer = shmkit.Semaphore(sem.name, create=False)
    assert newcomer.acquire(timeout=1)  # a unit is free: no reclaim pass needed
    newcomer.release()
    assert newcomer.value == 2
    newcomer.close()
    sem.close()


def test_bounded_semaphore(names):
    sem = shmkit.Semaphore(names(), value=1, maximum=2)
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert sem.value == 2
    for bad in ({"value": -1}, {"value": 3, "maximum": 2}, {"value": 2 ** 31},
                {"maximum": False}, {"maximum": "2"}, {"value": True}, {"maximum": 2.0}):
        with pytest.raises(ValueError, match="need 0 <= value <= maximum"):
            shmkit.Semaphore(names(), **bad)
    sem.close()
    # a maximum of 0 starts with no unit, and can be asked for again when opened
    # (the default value of 1 was checked against it there too)
    none = shmkit.Semaphore(names(), maximum=0)
    again = shmkit.Semaphore(none.name, maximum=0)
    assert (none.value, again.maximum) == (0, 0)
    none.close(); again.close()


def test_dead_condition_holder(names):
    cond = shmkit.Condition(names())
    _kill(_spawn_holder("condition", cond.name))
    with pytest.warns(shmkit.OwnerDiedWarning):
        got, dt = _elapsed(cond.acquire, timeout=10)
    assert got and dt < PROMPT
    assert cond.wait(0.05) is False
    cond.release()
    cond.close()


def test_pickled_objects_reach_a_spawned_child(names):
    m = shmkit.Mutex(names())
    m.acquire()
    ready = SPAWN.Event()
    p = spawn(_pickle_target, m, shmkit.Event(names()), ready)
    assert ready.wait(30)
    m.release()
    p.join(30)
    assert p.exitcode == 0
    m.close()


def _pickle_target(m, ev, ready) -> None:
    assert m.acquire(timeout=0) is False  # held by the parent
    ready.set()
    assert m.acquire(timeout=20)
    ev.set()
    assert ev.wait(0)


# -- kill at random points ------------------------------------------------------------
#
# Victims hammer one primitive and are SIGKILLed at random moments; after
# every cycle the survivor (this process) must get it within a bound and the
# data it guards must be consistent.  Data: a shared int64 array
#   0 a, 1 b    updated a += 1; b += 1 under the lock; a dead updater leaves
#               a - b == 1, which the next holder repairs (b = a)
#   2 ops       progress of the victims
#   3 dirty     RWLock: set by a writer while it updates
#   4 errors    a victim saw an impossible state
#   5 inside    Semaphore: holders inside at once

A, B, OPS, DIRTY, ERRORS, INSIDE = range(6)


def _victim(kind: str, lock_name: str, data_name: str, role: int) -> None:
    _quiet()
    if kind == "mutex":
        lock = shmkit.Mutex(lock_name)
    elif kind == "rwlock":
        lock = shmkit.RWLock(lock_name)
    else:
        lock = shmkit.Semaphore(lock_name, value=2)
    arr = shmkit.Array.open(data_name)
    d = arr.array
    m, base = arr._seg._mapping, arr._seg._hsize
    while True:
        if kind == "mutex":
            with lock:
                if lock.recovered:
                    d[B] = d[A]
                d[A] += 1
                d[B] += 1
        elif kind == "rwlock" and role % 2 == 0:
            with lock.write():
                if d[DIRTY]:
                    d[B] = d[A]
                d[DIRTY] = 1
                d[A] += 1
                d[B] += 1
                d[DIRTY] = 0
        elif kind == "rwlock":
            with lock.read():
                if not d[DIRTY] and d[A] != d[B]:
                    _core.add64(m, base + 8 * ERRORS, 1)
        else:
            with lock:
                if _core.add64(m, base + 8 * INSIDE, 1) >= 2:
                    _core.add64(m, base + 8 * ERRORS, 1)
                _core.add64(m, base + 8 * INSIDE, -1)
        _core.add64(m, base + 8 * OPS, 1)


class _Forked:
    """A victim in a forked child (cheap enough for thousands of cycles)."""

    def __init__(self, *args):
        self.pid = os.fork()
        if self.pid == 0:
            try:
                _victim(*args)
            except BaseException:  # noqa: BLE001 - shown, then exit 1
                import traceback
                traceback.print_exc()
            finally:
                os._exit(1)

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)

    def join(self):
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


class _Spawned:
    def __init__(self, *args):
        self.p = spawn(_victim, *args)

    def kill(self):
        self.p.kill()

    def join(self):
        self.p.join(30)
        assert self.p.exitcode == -signal.SIGKILL


def kill_cycles(kind: str, cycles: int, names, victim=_Forked, victims: int = 2,
                max_delay: float = 0.01, bound: float = 2.0) -> dict:
    """Run `cycles` kill cycles; return what happened (the caller asserts)."""
    lock_name, data_name = names(), names()
    lock = {"mutex": shmkit.Mutex, "rwlock": shmkit.RWLock,
            "semaphore": lambda n: shmkit.Semaphore(n, value=2)}[kind](lock_name)
    arr = shmkit.Array(data_name, "int64", 6)
    d = arr.array
    rng = random.Random(os.getpid())
    stats = {"cycles": cycles, "held": 0, "recovered": 0, "worst": 0.0, "errors": 0}
    try:
        for cycle in range(cycles):
            start = int(d[OPS])
            procs = [victim(kind, lock_name, data_name, cycle + i) for i in range(victims)]
            # Kill them at a random moment once they really run.
            assert _wait_until(lambda: d[OPS] > start + 10, 60, poll=0.0005)
            time.sleep(rng.uniform(0, max_delay))
            for p in procs:
                p.kill()
                time.sleep(rng.uniform(0, max_delay / 10))
            for p in procs:
                p.join()
            d[INSIDE] = 0
            units_free = lock.value if kind == "semaphore" else 0
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                t = time.monotonic()
                if kind == "mutex":
                    ok = lock.acquire(timeout=bound)
                    recovered = lock.recovered
                elif kind == "rwlock":
                    ok = lock.acquire_write(timeout=bound)
                    recovered = lock.recovered
                else:
                    ok = lock.acquire(timeout=bound) and lock.acquire(timeout=bound)
                    recovered = units_free < 2  # dead holders' units were reclaimed
                took = time.monotonic() - t
            stats["worst"] = max(stats["worst"], took)
            if not ok:
                continue
            consistent = True
            if kind == "mutex":
                # Repaired by whoever recovered it; a dead updater leaves one step.
                consistent = d[A] - d[B] in ((0, 1) if recovered else (0,))
                d[B] = d[A]
                lock.release()
            elif kind == "rwlock":
                consistent = d[A] - d[B] in ((0, 1) if d[DIRTY] else (0,))
                d[B] = d[A]
                d[DIRTY] = 0
                lock.release_write()
            else:
                consistent = lock.acquire(timeout=0) is False  # no third unit
                lock.release(2)
                consistent = consistent and lock.value == 2
            stats["recovered"] += bool(recovered or warned)
            stats["held"] += consistent
        stats["errors"] = int(d[ERRORS])
        stats["ops"] = int(d[OPS])
        # Victims only open existing names: nothing half-made may be left.
        stats["tmp_files"] = [f for f in os.listdir("/dev/shm") if f.endswith(".tmp")
                              and (lock_name in f or data_name in f)]
    finally:
        arr.close()
        lock.close()
    return stats


def _check(stats: dict) -> None:
    assert stats["held"] == stats["cycles"], stats
    assert stats["errors"] == 0, stats
    assert stats["worst"] < 2.0, stats
    assert stats["tmp_files"] == [], stats


@pytest.mark.parametrize("kind", ["mutex", "rwlock", "semaphore"])
def test_kill_at_random_points(kind, names):
    stats = kill_cycles(kind, 30, names)
    _check(stats)
    assert stats["recovered"] > 0  # some kills did land inside the lock
    assert stats["ops"] > 30


def test_kill_spawned_processes_at_random_points(names):
    stats = kill_cycles("mutex", 6, names, victim=_Spawned, max_delay=0.05)
    _check(stats)


@pytest.mark.stress
@pytest.mark.parametrize("kind", ["mutex", "rwlock", "semaphore"])
def test_kill_cycles_stress(kind, names):
    cycles = int(os.environ.get("SHMKIT_STRESS_CYCLES", "3000"))
    t = time.monotonic()
    stats = kill_cycles(kind, cycles, names)
    print(f"\n{kind}: {stats['held']}/{stats['cycles']} kill cycles recovered "
          f"({stats['recovered']} took over from a dead holder, worst acquire "
          f"{stats['worst'] * 1e3:.1f} ms, {stats['ops']} victim operations, "
          f"{time.monotonic() - t:.0f} s)")
    _check(stats)


# -- no system call when uncontended ---------------------------------------------------

@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_uncontended_operations_make_no_system_call(tmp_path):
    code = textwrap.dedent("""
        import shmkit, sys
        n = int(sys.argv[1])
        m, rw = shmkit.Mutex(None), shmkit.RWLock(None)
        ev, sem = shmkit.Event(None), shmkit.Semaphore(None, value=1)
        for _ in range(n):
            m.acquire(); m.release()
            with m: pass
            rw.acquire_read(); rw.release_read()
            rw.acquire_write(); rw.release_write()
            ev.set(); ev.wait(0); ev.clear()
            sem.acquire(); sem.release()
        for o in (m, rw, ev, sem):
            o.close(); o.unlink()
    """)
    counts = []
    for n in (0, 3000):
        out = tmp_path / f"trace{n}"
        subprocess.run(["strace", "-f", "-c", "-e", "trace=futex,fcntl", "-o", str(out),
                        sys.executable, "-c", code, str(n)], check=True,
                       env=dict(os.environ, PYTHONPATH=SRC), capture_output=True)
        total = 0
        for line in out.read_text().splitlines():
            parts = line.split()
            if parts and parts[-1] in ("futex", "fcntl"):
                total += int(parts[3])
        counts.append(total)
    # 3000 rounds of 10 lock operations: a system call each would be 30000.
    assert counts[1] - counts[0] < 100, counts


@pytest.mark.stress
@pytest.mark.parametrize("kind", ["mutex", "semaphore"])
def test_kill_spawned_stress(kind, names):
    """Fewer cycles, but every victim a freshly spawned interpreter."""
    cycles = int(os.environ.get("SHMKIT_STRESS_SPAWNED_CYCLES", "60"))
    t = time.monotonic()
    stats = kill_cycles(kind, cycles, names, victim=_Spawned, max_delay=0.05)
    print(f"\n{kind} (spawned victims): {stats['held']}/{stats['cycles']} kill cycles "
          f"recovered ({stats['recovered']} took over from a dead holder, worst acquire "
          f"{stats['worst'] * 1e3:.1f} ms, {time.monotonic() - t:.0f} s)")
    _check(stats)


def test_a_lock_word_damaged_to_hold_our_own_token_is_taken_over(name):
    # A word naming this very attachment that no thread of ours locked can
    # only be damage; waiting on it would be forever, so it is recovered.
    m = shmkit.Mutex(name)
    try:
        _core.store32(m._m, m._base, m._m.token)
        with pytest.warns(shmkit.OwnerDiedWarning):
            assert m.acquire(timeout=None)
        assert m.recovered
        m.release()
        assert m.acquire(timeout=1) and not m.recovered
        m.release()
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["Mutex", "Event", "RWLock", "Semaphore", "Condition"])
def test_every_sync_handle_says_when_it_is_closed(kind, names):
    cls = getattr(shmkit, kind)
    h = cls(names())
    assert h.closed is False
    h.close()
    assert h.closed is True
    h.unlink()
    with shmkit.Segment(names(), size=4096, lifetime="attached") as seg:
        placed = cls.at(seg, 64)
        assert placed.closed is False
    assert placed.closed is True  # its segment was closed


def test_locks_of_readonly_or_closed_handles_raise_the_specific_errors(name):
    m = shmkit.Mutex(name)
    ro = shmkit.Mutex.open(name, readonly=True)
    try:
        with pytest.raises(shmkit.ReadOnlyError, match="readonly"):
            ro.acquire()
        with pytest.raises(PermissionError):  # still the builtin callers catch
            ro.acquire(timeout=0)
    finally:
        ro.close()
    m.close()
    with pytest.raises(shmkit.ClosedError, match="closed"):
        m.acquire()
    with pytest.raises(ValueError):
        m.locked()


def test_holding_more_locks_of_one_segment_than_the_registry_keeps_is_refused(name):
    # One entry per thread and lock: the 65th lock held at once is refused
    # with a message that says why, and nothing is left taken.
    seg = shmkit.Segment(name, size=8192)
    locks = [shmkit.Mutex.at(seg, 64 * i) for i in range(65)]
    for lock in locks[:64]:
        assert lock.acquire(timeout=0)
    with pytest.raises(RuntimeError, match="hold or wait for 64 shmkit locks of one segment"):
        locks[64].acquire()
    assert not locks[64].locked() and seg._mapping.held_count == 64
    for lock in locks[:64]:
        lock.release()
    assert locks[64].acquire(timeout=0)
    locks[64].release()
    assert seg._mapping.held_count == 0
    seg.close()


@pytest.mark.parametrize("keep_view", [False, True], ids=["unmapped", "still mapped"])
def test_releasing_a_lock_of_a_closed_segment_says_it_is_closed(name, keep_view):
    # A view keeps the memory mapped after close(): still ClosedError, not
    # RuntimeError("... does not hold"), which blames the caller.
    seg = shmkit.Segment(name, size=8192)
    lock = shmkit.Mutex.at(seg, 0)
    cond = shmkit.Condition.at(seg, 64)
    lock.acquire()
    cond.acquire()
    view = seg.buf[0:8] if keep_view else None
    seg.close()
    with pytest.raises(shmkit.ClosedError, match="closed"):
        lock.release()
    for call in (cond.wait, cond.notify, cond.release):
        with pytest.raises(shmkit.ClosedError, match="closed"):
            call()
    del view


# -- Ctrl-C storms: an interrupt between any two steps leaves the state exact -----------

_STORM = r"""
import os, random, signal, sys, time
import shmkit
name, want, seed, reconcile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sem = shmkit.Semaphore(name)
rnd = random.Random(seed)


def interrupt(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGALRM, interrupt)
hits = cycles = 0
end = time.monotonic() + 30
while hits < want and time.monotonic() < end:
    try:
        signal.setitimer(signal.ITIMER_REAL, rnd.uniform(5e-6, 300e-6))
        while True:
            if sem.acquire(timeout=0.02):
                sem.release()
            cycles += 1
    except KeyboardInterrupt:
        signal.setitimer(signal.ITIMER_REAL, 0)
        hits += 1
        if reconcile == "yes":
            # The interrupt may have come after acquire() took its unit and
            # before the caller saw it: the semaphore knows what we hold.
            held = getattr(sem, "held", 0)
            if held > 0:
                sem.release(held)
signal.setitimer(signal.ITIMER_REAL, 0)
print(hits, cycles, sem.value, getattr(sem, "held", None), flush=True)
os._exit(0)
"""


def _all_units_back(sem, initial: int) -> None:
    """Exactly ``initial`` units can be taken (dead holders' reclaimed), not one more."""
    got = [sem.acquire(timeout=5) for _ in range(initial)]
    assert all(got), f"only {sum(got)} of {initial} units came back"
    assert sem.acquire(timeout=0) is False, f"more than {initial} units"
    sem.release(initial)
    assert sem.value == initial


@pytest.mark.parametrize("initial", [1, 3])
def test_semaphore_survives_a_ctrl_c_storm(initial, names):
    sem = shmkit.Semaphore(names(), value=initial)
    for seed in range(3):
        out = run_python(_STORM, sem.name, "300", str(seed), "yes", timeout=120)
        hits, cycles, value, held = out.stdout.split()
        assert int(hits) >= 100 and int(cycles) > 0
        if held != "None":
            assert int(value) + int(held) == initial  # exact while the child lived
            assert int(held) == 0
        _all_units_back(sem, initial)
    sem.close()


def _interrupt_at_opcode(k: int) -> list:
    """Raise KeyboardInterrupt at the k-th bytecode of shmkit's sync.py."""
    sync_py = os.path.join("shmkit", "sync.py")
    return interrupt_at_bytecode(k, lambda code: code.co_filename.endswith(sync_py))


@pytest.mark.parametrize("initial", [1, 3])
def test_semaphore_interrupted_at_every_bytecode(initial, names):
    # A child is interrupted at the k-th bytecode shmkit runs in Python during
    # acquire/release (k = 1, 2, ... until none is left), then exits: every unit
    # comes back, and no unit is made up.
    name = names()
    sem = shmkit.Semaphore(name, value=initial)
    for k in range(1, 5000):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                s = shmkit.Semaphore(name)
                if initial > 1:
                    assert s.acquire(timeout=10)  # hold one unit already
                count = _interrupt_at_opcode(k)
                try:
                    with s:
                        pass
                    s.acquire(timeout=10)
                    s.release()
                    code = 0 if count[0] < k else 2  # 0: nothing left to interrupt
                except KeyboardInterrupt:
                    code = 2
                finally:
                    sys.settrace(None)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 2), status
        _all_units_back(sem, initial)
        if os.WEXITSTATUS(status) == 0:
            break
    sem.close()


# -- crash points: a kill at every step boundary of every operation -----------------

def _fork_until_done(prefix: str, child_op, check, limit: int = 200) -> int:
    """Fork a child that runs ``child_op(arm)`` and dies at crash point k, for k = 1,
    2, ... until the child completes; ``check()`` runs after every death.
    Returns how many points were killed at."""
    for k in range(1, limit):
        pid = os.fork()
        if pid == 0:  # the child: exit 0 when the operation completed
            code = 1
            try:
                _quiet()
                code = 0 if child_op(lambda: _core.fault(k, prefix)) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"child failed at k={k}"
            check()
            return k - 1
        assert os.WTERMSIG(status) == signal.SIGKILL
        check()
    raise AssertionError(f"the operation did not complete within {limit} crash points")


@pytest.mark.parametrize("op", ["acquire", "release", "reclaim"])
def test_semaphore_killed_at_every_crash_point(op, names):
    initial = 2
    name = names()
    sem = shmkit.Semaphore(name, value=initial)

    def dead_holders():  # units of processes that died holding them
        for _ in range(initial):
            pid = os.fork()
            if pid == 0:
                try:
                    assert shmkit.Semaphore(name).acquire(timeout=10)
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
            assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL

    if op == "reclaim":  # the child's acquire must reclaim them
        dead_holders()

    def child(arm):
        s = shmkit.Semaphore(name)
        if op == "release":
            assert s.acquire(timeout=10)
        arm()
        ok = s.acquire(timeout=10) if op != "release" else (s.release() or True)
        _core.fault(0)
        return ok

    def check():
        _all_units_back(sem, initial)
        if op == "reclaim":
            dead_holders()

    points = _fork_until_done("", child, check)
    assert points >= 4
    sem.close()


# -- Condition: dead sleepers are counted out -----------------------------------------

def _fork_waiter(name: str, timeout: float = 5) -> int:
    """A forked process waiting on the condition; exits 0 if notified, 1 if not."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            _quiet()
            c = shmkit.Condition(name)
            with c:
                code = 0 if c.wait(timeout=timeout) else 1
        finally:
            os._exit(code)
    return pid


def _wait_for_sleepers(cond, n: int) -> None:
    end = time.monotonic() + 30
    while cond.statistics()["waiters"] < n:
        assert time.monotonic() < end, cond.statistics()
        time.sleep(0.01)
    time.sleep(0.1)  # let the last one reach its sleep


def test_condition_notify_grants_nothing_to_dead_waiters(names):
    cond = shmkit.Condition(names())
    dead = [_fork_waiter(cond.name) for _ in range(5)]
    _wait_for_sleepers(cond, 5)
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with cond:
        cond.notify_all()  # nobody alive waits: no wake-up may be banked
    before = cond.statistics()["waiters"]
    live = [_fork_waiter(cond.name) for _ in range(3)]
    _wait_for_sleepers(cond, before + 3)
    with cond:
        cond.notify(1)
    codes = [os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in live]
    assert sorted(codes) == [0, 1, 1], codes  # exactly one woken, two timed out
    cond.close()


# -- Event and Condition: a close() by another thread ends the wait ----------------------

@pytest.mark.parametrize("kind", ["event", "condition"])
def test_wait_without_timeout_ends_when_another_thread_closes(kind, names):
    obj = shmkit.Event(names()) if kind == "event" else shmkit.Condition(names())
    got = []

    def waiter():
        try:
            if kind == "event":
                obj.wait()
            else:
                obj.acquire()
                obj.wait()
            got.append("returned")
        except Exception as e:  # noqa: BLE001 - the class is what the test checks
            got.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.3)
    obj.close()
    t.join(10)
    assert not t.is_alive(), f"{kind}.wait() still blocked after close()"
    assert len(got) == 1 and isinstance(got[0], shmkit.ClosedError), got


# -- honest opening --------------------------------------------------------------------

def test_explicit_parameters_that_disagree_are_refused(names):
    ev = shmkit.Event(names())  # manual reset
    with pytest.raises(shmkit.MismatchError, match="auto_reset=False.*auto_reset=True"):
        shmkit.Event(ev.name, auto_reset=True)
    again = shmkit.Event(ev.name)  # left out: adopts what exists
    assert again.auto_reset is False
    assert shmkit.Event(ev.name, auto_reset=False).auto_reset is False
    sem = shmkit.Semaphore(names(), value=2, maximum=4)
    with pytest.raises(shmkit.MismatchError, match="value=2.*value=3"):
        shmkit.Semaphore(sem.name, value=3)
    with pytest.raises(ValueError, match="maximum=4.*maximum=5"):  # also a ValueError
        shmkit.Semaphore(sem.name, maximum=5)
    adopted = shmkit.Semaphore(sem.name)
    assert adopted.value == 2 and adopted.maximum == 4
    for o in (ev, again, sem, adopted):
        o.close()


def test_a_layout_another_user_rewrote_is_refused_not_believed(names):
    # The layout text is a copy of what the creator asked for: an Event read
    # auto_reset with bool() (so "no" meant True), and a Semaphore checked an
    # explicit maximum against the layout's copy, not the maximum it enforces.
    ev = shmkit.Event(names(), lifetime="persistent")
    ev.close()
    set_layout(ev.name, b'{"auto_reset": "no"}')
    with pytest.raises(shmkit.CorruptError, match="auto_reset='no'.*shmkit rm"):
        shmkit.Event(ev.name)
    sem = shmkit.Semaphore(names(), value=2, maximum=4, lifetime="persistent")
    sem.close()
    set_layout(sem.name, b'{"format": 2, "value": 2, "maximum": 5}')
    with pytest.raises(shmkit.MismatchError, match="maximum=4.*maximum=5"):
        shmkit.Semaphore(sem.name, maximum=5)
    kept = shmkit.Semaphore(sem.name, maximum=4)
    assert kept.maximum == 4
    kept.close()
    for text, why in ((b'{"format": 2, "value": 2.5, "maximum": 4}', "value=2.5.*an int"),
                      (b'{"format": 2, "value": null, "maximum": 4}', "value=None"),
                      (b'{"format": 2, "maximum": 4}', "no value"),
                      (b'{"format": 2, "value": 2, "value": 3, "maximum": 4}', "twice")):
        set_layout(sem.name, text)
        with pytest.raises(shmkit.CorruptError, match=why):
            shmkit.Semaphore(sem.name)
    for text, why in ((b'{"auto_reset": null}', "auto_reset=None"),
                      (b'{"auto_reset": "no", "auto_reset": true}', "twice")):
        set_layout(ev.name, text)
        with pytest.raises(shmkit.CorruptError, match=why):
            shmkit.Event(ev.name)
    set_layout(ev.name, b'{}')  # (left out: a manual reset, as the default)
    with shmkit.Event(ev.name) as adopted:
        assert adopted.auto_reset is False


def test_sync_objects_do_not_hand_out_their_segment(names):
    for obj in (shmkit.Mutex(names()), shmkit.Event(names()), shmkit.RWLock(names()),
                shmkit.Semaphore(names()), shmkit.Condition(names())):
        assert not hasattr(obj, "segment")
        obj.close()


# -- RWLock: an interrupted acquire_write never leaves a hidden write hold ---------------

def test_rwlock_interrupted_acquire_write_leaves_no_hold(names):
    # A live child is interrupted at the k-th bytecode shmkit runs in Python during
    # acquire_write (k = 1, 2, ... until none is left) while a reader is in, so the
    # writer waits; then the parent must take the write lock while the child lives.
    name = names()
    rw = shmkit.RWLock(name)
    for k in range(1, 5000):
        assert rw.acquire_read(timeout=10)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                child = shmkit.RWLock(name)
                count = _interrupt_at_opcode(k)
                try:
                    if child.acquire_write(timeout=1):
                        child.release_write()
                    code = 0 if count[0] < k else 2
                except KeyboardInterrupt:
                    code = 2
                finally:
                    sys.settrace(None)
                os.write(w, b"x")
                time.sleep(0.5 if code == 0 else 3)  # stay alive while the parent checks
            finally:
                os._exit(code)
        os.close(w)
        threading.Timer(0.2, rw.release_read).start()
        assert os.read(r, 1) == b"x"
        os.close(r)
        got = rw.acquire_write(timeout=2)
        if got:
            rw.release_write()
        _, status = os.waitpid(pid, 0)
        assert got, f"interrupted at bytecode {k}, the child kept the write lock"
        if os.WEXITSTATUS(status) == 0:
            break
    rw.close()


@pytest.mark.parametrize("op", ["read", "write"])
def test_rwlock_killed_at_every_crash_point(op, names):
    _quiet()
    name = names()
    rw = shmkit.RWLock(name)

    def child(arm):
        lock = shmkit.RWLock(name)
        arm()
        if op == "read":
            ok = lock.acquire_read(timeout=10)
            lock.release_read()
        else:
            ok = lock.acquire_write(timeout=10)
            lock.release_write()
        _core.fault(0)
        return ok

    def check():
        got = rw.acquire_write(timeout=5)  # nobody holds it after the death
        assert got
        rw.release_write()
        assert rw.acquire_read(timeout=5)
        rw.release_read()

    assert _fork_until_done("rw.", child, check) >= 2
    rw.close()


def test_condition_killed_at_every_crash_point(names):
    _quiet()
    name = names()
    cond = shmkit.Condition(name)

    def child(arm):
        c = shmkit.Condition(name)
        with c:
            arm()
            c.wait(timeout=0.1)
            _core.fault(0)
        return True

    def check():
        assert cond.statistics()["waiters"] == 0  # the dead one is not counted
        a, b = _fork_waiter(name, 1.5), _fork_waiter(name, 1.5)
        _wait_for_sleepers(cond, 2)
        with cond:
            cond.notify(1)
        codes = sorted(os.WEXITSTATUS(os.waitpid(p, 0)[1]) for p in (a, b))
        assert codes == [0, 1], codes  # exactly one live waiter woken

    assert _fork_until_done("cond.", child, check) >= 2
    cond.close()


_WITH_HOLDS = {
    "condition": lambda m, c, rw: c,
    "mutex.held": lambda m, c, rw: m.held(timeout=5),
    "rwlock.read": lambda m, c, rw: rw.read(timeout=5),
    "rwlock.write": lambda m, c, rw: rw.write(timeout=5),
}


@pytest.mark.parametrize("form", sorted(_WITH_HOLDS))
def test_a_ctrl_c_at_any_bytecode_of_a_with_hold_leaves_nothing_held(names, form):
    # `with cond:`, `with m.held():`, `with rw.read():` and `with rw.write():`
    # were written in Python (an __enter__ that acquired and returned, a
    # generator's contextmanager): a Ctrl-C between the hold and the block
    # left the lock held, with no __exit__ to come.
    import contextlib
    m, c, rw = shmkit.Mutex(names()), shmkit.Condition(names()), shmkit.RWLock(names())
    ours = (os.path.join("shmkit", "sync.py"), os.path.abspath(contextlib.__file__))
    try:
        for k in range(1, 1000):
            count = interrupt_at_bytecode(k, lambda code: code.co_filename.endswith(ours))
            try:
                with _WITH_HOLDS[form](m, c, rw):
                    pass
                done = count[0] < k  # nothing left to interrupt
            except KeyboardInterrupt:
                done = False
            finally:
                sys.settrace(None)
            st = rw.statistics()
            assert not (m.locked() or c.locked() or st["readers"] or st["writer_pid"]), (k, st)
            if done:
                break
        else:
            pytest.fail("still interrupting after 1,000 bytecodes")
        with _WITH_HOLDS[form](m, c, rw):  # and the form still holds
            assert m.locked() or c.locked() or rw.statistics()["readers"] or \
                rw.statistics()["writer_pid"]
    finally:
        for o in (m, c, rw):
            o.close()
            o.unlink()


@pytest.mark.parametrize("kind", ["Mutex", "Semaphore"])
def test_the_repr_of_a_closed_lock_never_raises(kind):
    # repr() read the lock's word, so a closed handle's raised ClosedError
    # (in logging, tracebacks, and shmkit.wait's own "is closed" message).
    obj = getattr(shmkit, kind)(None)
    obj.close()
    assert repr(obj).endswith(" closed>")
    with pytest.raises(shmkit.ClosedError, match=r"closed> is closed in this process"):
        shmkit.wait([obj], 0)


def test_a_forked_childs_release_read_of_its_parents_hold_is_no_damage(name):
    # The handle's count of read holds went to the child with the fork, so
    # the child's release_read() said the segment was damaged (CorruptError)
    # instead of that it holds none.
    rw = shmkit.RWLock(name)
    assert rw.acquire_read(timeout=5)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            rw.release_read()
        except RuntimeError as e:
            code = 0 if "forked child holds none" in str(e) else 2
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, status
    assert rw.statistics()["readers"] == {os.getpid(): 1}  # the parent's hold stands
    rw.release_read()
    assert rw.statistics()["readers"] == {}
    rw.close()
    rw.unlink()


def test_counts_and_flags_refuse_a_bool_or_a_stand_in(name):
    # release(True) and notify(True) were taken as 1, auto_reset="no" made an
    # auto-reset event; Semaphore(value=True) was already refused.
    s = shmkit.Semaphore(None, value=2)
    c = shmkit.Condition(None)
    try:
        with pytest.raises(TypeError, match="not a bool"):
            s.release(True)
        with c, pytest.raises(TypeError, match="not a bool"):
            c.notify(True)
        with pytest.raises(TypeError, match="auto_reset must be True, False or None"):
            shmkit.Event(name, auto_reset="no")
        assert not os.path.exists(f"/dev/shm/shmkit.{name}")
        assert s.value == 2
    finally:
        for o in (s, c):
            o.close()
