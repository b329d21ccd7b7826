"""A Timeout that a signal handler raises during a blocking call goes through
as it is: shmkit turns only its own deadlines into Empty, Full, another wait
slice or the end of a loop.  (A watchdog that raises shmkit.Timeout from
SIGALRM must stop the call it interrupts, whatever that call is.)"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import shmkit

from conftest import SRC


class _Watchdog(shmkit.Timeout):
    """What the handler raises (a Timeout, so that only its identity tells)."""


@contextlib.contextmanager
def _alarm(after: float = 0.2) -> Iterator[list[_Watchdog]]:
    """SIGALRM in ``after`` seconds, whose handler raises a Timeout."""
    raised: list[_Watchdog] = []

    def handler(signum: int, frame: Any) -> None:
        e = _Watchdog("the watchdog's own timeout")
        raised.append(e)
        raise e

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        yield raised
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _raises_the_handlers(call: Callable[[], Any]) -> None:
    with _alarm() as raised:
        t0 = time.monotonic()
        with pytest.raises(shmkit.Timeout) as got:
            call()
    assert raised and got.value is raised[0], f"{type(got.value).__name__}: {got.value}"
    assert time.monotonic() - t0 < 10


@pytest.fixture
def base() -> Iterator[str]:
    made = f"t-ht-{secrets.token_hex(5)}"
    yield made
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(f"shmkit.{made}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{entry}")


def test_the_cores_own_timeouts_are_marked_and_a_handlers_is_not(base):
    with shmkit.Channel(base, 4096, create=True) as ch:
        with pytest.raises(shmkit.Timeout) as got:
            ch.recv(timeout=0.01)
        assert got.value._deadline is True
        assert shmkit.Timeout("made by hand")._deadline is False
        _raises_the_handlers(lambda: ch.recv(timeout=None))
        ch.unlink()


@pytest.mark.parametrize("size", [16, 1 << 20], ids=["in the ring", "out of band"])
def test_a_queue_lets_a_handlers_timeout_through(base, size):
    with shmkit.Queue(name=base, capacity=4096) as q:
        _raises_the_handlers(lambda: q.get())  # (empty)
        with pytest.raises(shmkit.Empty):  # its own deadline is still Empty
            q.get(timeout=0.01)
        while True:  # fill it
            try:
                q.put(b"x" * 16, timeout=0.01)
            except shmkit.Full:
                break
        _raises_the_handlers(lambda: q.put(bytearray(size)))
        with pytest.raises(shmkit.Full):
            q.put(bytearray(size), timeout=0.01)
        q.unlink()


def test_a_worker_and_serve_let_a_handlers_timeout_through(base):
    with shmkit.Service(base) as svc:
        with svc.worker() as w:
            _raises_the_handlers(lambda: w.recv())
        _raises_the_handlers(lambda: svc.serve(lambda d: d))  # not a quiet return
        assert svc.serve(lambda d: d, timeout=0.05) == 0  # its own deadline: one
        svc.unlink()


def test_a_call_lets_a_handlers_timeout_through(base):
    with shmkit.Service(base) as svc:
        worker = subprocess.Popen(
            [sys.executable, "-c",
             "import time, shmkit\n"
             f"with shmkit.Service({base!r}) as svc:\n"
             "    svc.serve(lambda d: time.sleep(30) or d, max_requests=1)\n"],
            env=dict(os.environ, PYTHONPATH=SRC))
        try:
            with svc.client(wait_for_worker=30) as client:
                _raises_the_handlers(lambda: client.call(b"slow"))
        finally:
            worker.kill()
            worker.wait(30)
        svc.unlink()


def test_a_subscribers_messages_let_a_handlers_timeout_through(base):
    with shmkit.Topic(base, 4096, create=True) as topic, topic.subscribe() as sub:
        def read_all() -> list[bytes]:
            return list(sub.messages(timeout=30))  # ends only at its own timeout

        _raises_the_handlers(read_all)
        assert list(sub.messages(timeout=0.01)) == []
        topic.unlink()


def test_a_handlers_timeout_in_another_thread_than_the_call_is_never_seen(base):
    """(The other side: a handler runs in the main thread only, so a call in
    another thread times out by its own deadline, as Empty.)"""
    with shmkit.Queue(name=base, capacity=4096) as q:
        got: list[Any] = []

        def get() -> None:
            try:
                q.get(timeout=0.5)
            except BaseException as e:
                got.append(e)

        t = threading.Thread(target=get)
        with _alarm(0.1) as raised:
            t.start()
            with pytest.raises(_Watchdog):
                time.sleep(5)
        t.join(10)
        assert raised and isinstance(got[0], shmkit.Empty)
        q.unlink()
