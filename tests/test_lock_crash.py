"""Mutex and Event killed at every crash point of their operations.

A forked child arms ``_core.fault(k, prefix)`` and runs the operation; it
SIGKILLs itself at the k-th named step ("lock.acquire.taken",
"lock.release.cleared", ...).  After each death the parent checks that the
object still works: the lock can be taken (reporting the dead holder when the
child died holding it) and released, the event can be set, waited and cleared.
"""
from __future__ import annotations

import os
import signal
import threading
import warnings

import shmkit
from shmkit import _core


def _fork_until_done(prefix: str, child_op, check, limit: int = 100) -> list[int]:
    """Kill a child at crash point k = 1, 2, ... until it completes; returns the
    points it died at."""
    killed = []
    for k in range(1, limit):
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                warnings.simplefilter("ignore")
                _core.fault(k, prefix)
                child_op()
                _core.fault(0)
                code = 0  # completed before reaching point k
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"child failed at point {k}: {status}"
            check()
            return killed
        assert os.WTERMSIG(status) == signal.SIGKILL, status
        killed.append(k)
        check()
    raise AssertionError(f"not done within {limit} crash points")


def _lock_works(name: str) -> None:
    m = shmkit.Mutex(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", shmkit.OwnerDiedWarning)
        assert m.acquire(timeout=10), "a dead child's lock was not taken over"
    m.release()
    assert m.acquire(timeout=1)
    m.release()
    m.close()


def test_mutex_killed_at_every_crash_point_uncontended(names):
    name = names()
    keep = shmkit.Mutex(name)

    def child():
        m = shmkit.Mutex(name)
        assert m.acquire(timeout=10)
        m.release()
        with m:
            pass

    killed = _fork_until_done("lock.", child, lambda: _lock_works(name))
    # taken by acquire(), marked and cleared by release(), then the same for `with`
    assert len(killed) >= 6, killed
    keep.close()


def test_mutex_killed_at_every_crash_point_with_a_waiter(names):
    """The waiter's slow path (taken while waiting) and the release that wakes it."""
    name = names()
    keep = shmkit.Mutex(name)

    def child():
        m = shmkit.Mutex(name)
        assert m.acquire(timeout=10)
        got = []
        t = threading.Thread(target=lambda: got.append(m.acquire(timeout=10)))
        t.start()
        while not (_core.load32(m._m, m._base) & 0x80000000):
            pass  # until the thread has said it sleeps (the waiters bit)
        m.release()
        t.join()
        assert got == [True]
        m.release()

    killed = _fork_until_done("lock.", child, lambda: _lock_works(name))
    assert len(killed) >= 4, killed
    keep.close()


def test_event_killed_while_setting(names):
    name = names()
    ev = shmkit.Event(name)

    def child():
        e = shmkit.Event(name)
        e.set()

    def check():
        e = shmkit.Event(name)
        assert e.is_set()  # the flag is stored before the wake
        e.clear()
        assert not e.wait(timeout=0.01)
        e.set()
        assert e.wait(timeout=1)
        e.clear()
        e.close()

    killed = _fork_until_done("event.", child, check)
    assert killed == [1]
    ev.close()
