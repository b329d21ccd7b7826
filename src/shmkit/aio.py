"""shmkit for asyncio: the same objects, with coroutine methods.

``shmkit.aio.Channel``, ``Queue``, ``Event``, ``Mutex``, ``RWLock``,
``Semaphore``, ``Condition``, ``Service``, ``Client`` and ``Worker`` are
the classes of :mod:`shmkit`, opened
the same way (by name, ``.at(...)``, passed to other processes), whose
blocking methods are coroutines with the same arguments, results and
errors (``await ch.recv(timeout=1.0)`` raises :class:`shmkit.Timeout` like
``ch.recv(timeout=1.0)``).  The ``*_nowait`` methods, ``release()``,
``set()``, ``notify()`` stay plain calls: they never wait.

>>> import asyncio, shmkit.aio
>>> async def main():
...     async with shmkit.aio.Channel(None, capacity=4096) as ch:
...         ch.send_nowait(b"hi")
...         return await ch.recv(timeout=1.0)
>>> asyncio.run(main())
b'hi'

How it waits: a coroutine first tries the non-blocking form of its call.
If that would block, it hands the object's readiness description
(:mod:`shmkit.aio_wait`) to its event loop's io_uring (one per running
loop, Linux 6.7+): the ring counts it a sleeper, as a blocking call does,
and sleeps on the object's futex word with an ``IORING_OP_FUTEX_WAIT``.
The waker's ``FUTEX_WAKE`` posts a completion, which makes the ring's fd
(one of the loop's readers) readable: the loop itself is woken by the
kernel, one wake-up per hop, with no thread in between and no spinning in
the loop.  The coroutine retries, and waits again if another took the
message or the lock first.  Where io_uring cannot be used (an older kernel,
seccomp, ``io_uring_disabled``), or when the environment variable
``SHMKIT_AIO_WAKER=threads`` asks for it, watcher threads wait instead: one
per 127 distinct objects (at most :data:`MAX_WATCHERS`) sleeps on all
their words at once and wakes the futures through
``loop.call_soon_threadsafe``.  An idle await never wakes: one checker
thread per process looks for dead peers among every awaited object (see
:data:`CHECK_EVERY`).

Cancellation loses nothing: a message is only taken, and a lock only
held, by the non-blocking call itself, which runs to completion between
two awaits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import itertools
import os
import threading
import time
import weakref
from typing import (TYPE_CHECKING, Any, AsyncIterator, Callable, Final, Literal, NoReturn,
                    Sequence, TypeVar, cast)

from ._arrays import array_of, array_terms
from . import _core
from ._object import DEFAULT
from . import channel as _channel
from . import segment as _segment
from . import sync as _sync
from .aio_wait import (ALL_COMPLETED, FIRST_COMPLETED, WaitArgumentError, _all_of,
                       _describe, _Desc, _kept, _ready_all)
from .errors import _timed_out, ChannelClosed, ClosedError, Empty, Full, ShmkitError, Timeout, WouldBlock
from .sync import lock_timeout, seconds

if TYPE_CHECKING:
    from ._core import RecordView
    from .aio_service import Client, Service, Worker
    from .channel import _Buffer
    from .segment import Segment

__all__ = ["Channel", "Queue", "Event", "Mutex", "RWLock", "Semaphore", "Condition",
           "Service", "Client", "Worker", "wait", "FIRST_COMPLETED", "ALL_COMPLETED", "MAX_WATCHERS", "TooManyWaitsError",
           "NoEventLoopError", "WakerError", "watcher_count", "waker", "CHECK_EVERY"]

MAX_WATCHERS = 32
"""Watcher threads per process at most, each watching 127 distinct objects:
a limit of the watcher threads alone (``SHMKIT_AIO_WAKER=threads`` or no
io_uring); awaits woken through io_uring have none."""
_PER_WATCHER = 127  # futex_waitv takes 128 words; one is the watcher's wake word
_LOOK_AT_ONCE = 128  # descriptions per wait_ready call of the checker
_REPAIR_TIMEOUT = 0.02  # a repairing call's wait: past the channel's first 5 ms slice
CHECK_EVERY = 0.05
"""Seconds between two looks for dead peers (a killed lock holder, a producer
killed mid-message) among every awaited object, as often as a blocking call
looks; with many objects the checker waits longer, so that it spends at
most 1/:data:`_CHECK_SHARE` of a core."""
_CHECK_SHARE = 200
_write_tickets = itertools.count(1)  # RWLock.acquire_write: one per call

T = TypeVar("T")


class _Again(enum.Enum):
    """What an attempt returns when its call would have had to wait."""

    AGAIN = 1


_AGAIN: Final = _Again.AGAIN
_READY, _SUSPECT, _EXPIRED = 1, 2, 3
_Key = tuple[int, int, int, int]  # a description with its target replaced by id()
_Flag = int | BaseException  # what a watcher hands a future: _READY, _SUSPECT or an error
_Futures = dict[asyncio.Future[int], asyncio.AbstractEventLoop]  # awaiter: its loop
# the futures a watcher fired, until their loop settled them (their entries
# are gone from the hub by then): id(future) -> (a weak reference to it, the
# flag); weak, so that a loop dropped unclosed with such a future goes
_Fired = dict[int, tuple["weakref.ref[asyncio.Future[int]]", _Flag]]


class TooManyWaitsError(ShmkitError, RuntimeError):
    """More distinct objects are awaited at once than the watchers can watch."""


class WakerError(ShmkitError, ValueError):
    """``SHMKIT_AIO_WAKER`` holds a value other than ``threads``, ``io_uring``
    or nothing."""


class NoEventLoopError(ShmkitError, RuntimeError):
    """A shmkit.aio coroutine was awaited where no asyncio event loop runs
    (under trio, for one): its waits are woken through the asyncio loop."""


_here = threading.local()  # .loop: the asyncio loop last found running in this thread


def _loop() -> asyncio.AbstractEventLoop:
    # asyncio.get_running_loop() makes a getpid() system call on Python 3.11
    # (its fork check); a loop that this thread found running and that still
    # runs is this thread's loop, since a loop runs in one thread at a time
    # (a forked child forgets it: _forget_hub).
    loop: asyncio.AbstractEventLoop | None = getattr(_here, "loop", None)
    if loop is not None and loop.is_running():
        return loop
    try:
        loop = _here.loop = asyncio.get_running_loop()
        return loop
    except RuntimeError:
        raise NoEventLoopError(
            "shmkit.aio coroutines run under an asyncio event loop (asyncio.run, uvloop, "
            "anyio's asyncio backend) and none runs in this thread; under trio, open the "
            "object with the blocking class (shmkit.Channel, ...) and call it in a thread: "
            "await trio.to_thread.run_sync(ch.recv, 1.0)") from None


# ---- the watchers -----------------------------------------------------------

class _Entry:
    """One watched object: its description and the futures awaiting it."""

    __slots__ = ("key", "desc", "futures", "watcher")

    def __init__(self, key: _Key, desc: _Desc, watcher: "_Watcher") -> None:
        self.key, self.desc, self.watcher = key, desc, watcher
        self.futures: _Futures = {}


def _settle(futures: list[asyncio.Future[int]], flag: _Flag) -> None:
    for f in futures:
        if not f.done():
            if isinstance(flag, BaseException):
                f.set_exception(flag)
            else:
                f.set_result(flag)


def _fire(fired: _Fired, futures: _Futures, flag: _Flag) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[int]]] = {}
    for fut, loop in futures.items():
        by_loop.setdefault(loop, []).append(fut)
    for loop, futs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_fired, fired, futs, flag)
        except RuntimeError:  # the loop was closed: nobody awaits these any more
            for fut in futs:
                fired.pop(id(fut), None)


def _settle_fired(fired: _Fired, futures: list[asyncio.Future[int]], flag: _Flag) -> None:
    """(The loop's thread.)  Settle what a watcher fired, then forget it: a
    Ctrl-C before the end leaves it in ``fired``, settled again by the
    checker's next look."""
    _settle(futures, flag)
    for f in futures:
        fired.pop(id(f), None)


class _Watcher:
    """A thread that sleeps on up to 127 objects' words and one wake word."""

    def __init__(self, hub: "_Hub") -> None:
        self.hub = hub
        self.entries: dict[_Key, _Entry] = {}
        self.idle = threading.Condition(hub.lock)
        fd = os.memfd_create("shmkit-aio-wake", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4096)
            self.wake = _core.Mapping(fd, 4096, 4096)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept open: the mapping refers to it
        self.thread = threading.Thread(target=self._run, name="shmkit-aio-watcher",
                                       daemon=True)
        self.thread.start()

    def poke(self) -> None:
        """The set of entries changed: make the thread look again (lock held)."""
        _core.add32(self.wake, 0, 1)
        _core.futex_wake(self.wake, 0, 1)
        self.idle.notify()

    def _run(self) -> None:
        hub = self.hub
        while True:
            with hub.lock:
                while not self.entries and not hub.stopped:
                    self.idle.wait()
                if hub.stopped:
                    return
                entries = list(self.entries.values())
                seen = _core.load32(self.wake, 0)
            descs = [e.desc for e in entries]
            descs.append((_core.W_WORD, self.wake, 0, seen))
            # Sleep until a word changes: no liveness slices (the hub's
            # checker looks for dead peers without re-arming 128 words).
            hub.settle(entries, _look(descs, None, False))
            del entries, descs  # held while idle, they would keep loops alive


def _look(descs: list[_Desc], timeout: float | None,
          check: bool) -> Sequence[tuple[int, _Flag]]:
    """(index, flag) for each of ``descs`` ready or suspect after a wait_ready."""
    try:
        ready, suspect = _core.wait_ready(descs, timeout, False, check)
    except BaseException as exc:  # a description went bad: tell its awaiters
        return [(i, exc) for i in range(len(descs))]
    return [(i, _READY) for i in ready] + [(i, _SUSPECT) for i in suspect]


class _Hub:
    """This process's watchers and which one watches each object."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watchers: list[_Watcher] = []
        self.where: dict[_Key, _Entry] = {}
        self.stopped = False
        self.watching = threading.Condition(self.lock)
        self.checker: threading.Thread | None = None
        # the event loops' rings (id -> weak reference), and whether the
        # checker sleeps because nothing is awaited (a ring's first wait
        # in flight then wakes it)
        self.rings: dict[int, weakref.ref[_Ring]] = {}
        self.checker_idle = False
        self.fired: _Fired = {}

    def start_checker(self) -> None:
        """Start the checker thread unless it runs (lock held)."""
        if self.checker is None:
            self.checker = threading.Thread(target=self._check, daemon=True,
                                            name="shmkit-aio-checker")
            self.checker.start()

    def nudge(self) -> None:
        """A ring has a wait in flight: the idle checker starts looking."""
        with self.lock:
            self.checker_idle = False
            self.watching.notify()

    def _rings(self) -> list[_Ring]:
        """The live rings (lock held)."""
        rings = []
        for k, ref in list(self.rings.items()):
            r = ref()
            if r is None:
                del self.rings[k]
            else:
                rings.append(r)
        return rings

    def _anything(self) -> bool:
        """Is anything awaited at all (lock held)?"""
        return bool(self.where or self.fired) or any(r.waits for r in self._rings())

    def settle(self, entries: list[_Entry], flags: Sequence[tuple[int, _Flag]]) -> None:
        """Stop watching the entries that ``flags`` names (indices past the
        entries, such as a watcher's wake word, are skipped) and wake their
        awaiters; a watcher that still sleeps on one of them looks again."""
        fired: list[tuple[_Futures, _Flag]] = []
        changed: set[_Watcher] = set()
        with self.lock:
            for i, flag in flags:
                if i >= len(entries):
                    continue
                e = entries[i]
                if self.where.get(e.key) is e:
                    del self.where[e.key]
                    del e.watcher.entries[e.key]
                    changed.add(e.watcher)
                    fired.append((e.futures, flag))
                    for fut in e.futures:
                        self.fired[id(fut)] = (weakref.ref(fut), flag)
            for w in changed:  # one poke per watcher, none to the caller itself
                if threading.current_thread() is not w.thread:
                    w.poke()
        for futures, flag in fired:
            _fire(self.fired, futures, flag)

    def _fire_again(self, looks: dict[int, int]) -> dict[int, int]:
        """(The checker.)  Fire again what is still not settled 2, 4, 8...
        looks after it was fired: its loop's settling never ran to its end
        (a Ctrl-C in it), or the loop is busy or stopped, whose queue of
        callbacks must not grow by one a look.  ``looks``: how many looks
        saw each fired future so far (by id); returns this look's counts."""
        again: dict[_Flag, _Futures] = {}
        now: dict[int, int] = {}
        with self.lock:  # (only the lock's holders add; a loop's thread may forget)
            for k, (ref, flag) in list(self.fired.items()):
                fut = ref()
                if fut is None or fut.done():
                    self.fired.pop(k, None)
                    continue
                n = now[k] = looks.get(k, 0) + 1
                if n > 1 and n & (n - 1) == 0:
                    again.setdefault(flag, {})[fut] = fut.get_loop()
        for flag, futures in again.items():
            _fire(self.fired, futures, flag)
        return now

    def _check(self) -> None:
        """The checker thread: every CHECK_EVERY seconds (longer with many
        objects), one look at every awaited object with timeout 0, which
        runs each kind's liveness check: a dead holder or writer in the way
        wakes its awaiters, whose repairing call makes progress.  It looks
        at the watcher threads' entries and at the waits in flight in every
        loop's ring; while nothing is awaited it sleeps."""
        pause = CHECK_EVERY
        fired: dict[int, int] = {}
        while True:
            with self.lock:
                # idle first, then look: a ring that adds a wait after the
                # look finds checker_idle set and nudges
                self.checker_idle = True
                while not self._anything() and not self.stopped:
                    self.watching.wait()
                self.checker_idle = False
                if self.stopped:
                    return
                self.watching.wait(pause)
                batches = [list(w.entries.values()) for w in self.watchers if w.entries]
                rings = self._rings()
            spent = time.thread_time()
            while batches:  # none held while asleep: dropped loops are garbage
                entries = batches.pop()
                self.settle(entries, _look([e.desc for e in entries], 0, True))
                del entries
            while rings:
                rings.pop().look()
            fired = self._fire_again(fired)
            spent = time.thread_time() - spent
            pause = max(CHECK_EVERY, spent * _CHECK_SHARE)

    def add(self, key: _Key, desc: _Desc, fut: asyncio.Future[int],
            loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            e = self.where.get(key)
            if e is None:
                w = next((w for w in self.watchers if len(w.entries) < _PER_WATCHER), None)
                if w is None:
                    if len(self.watchers) >= MAX_WATCHERS:
                        raise TooManyWaitsError(
                            f"this process awaits {len(self.where)} distinct shmkit objects "
                            f"at once, the most its {MAX_WATCHERS} watcher threads watch "
                            f"({_PER_WATCHER} each); raise shmkit.aio.MAX_WATCHERS or await "
                            "fewer objects at a time")
                    w = _Watcher(self)
                    self.watchers.append(w)
                    self.start_checker()
                e = self.where[key] = w.entries[key] = _Entry(key, desc, w)
                w.poke()
                if len(self.where) == 1:
                    self.watching.notify()
            e.futures[fut] = loop

    def discard(self, key: _Key, fut: asyncio.Future[int]) -> None:
        with self.lock:
            self.fired.pop(id(fut), None)
            e = self.where.get(key)
            if e is None or e.futures.pop(fut, None) is None or e.futures:
                return
            # Nobody awaits it any more: stop watching (and counting as a sleeper).
            del self.where[key]
            del e.watcher.entries[key]
            e.watcher.poke()


_hub_lock = threading.Lock()
_the_hub: _Hub | None = None


def _hub() -> _Hub:
    global _the_hub
    hub = _the_hub
    if hub is None:
        with _hub_lock:
            if _the_hub is None:
                _the_hub = _Hub()
            hub = _the_hub
    return hub


def _stop_watchers() -> None:
    """At exit: let each watcher thread leave its wait before the interpreter
    stops the daemon threads, so that no sleeper it counted on a shared
    object (a channel's receivers_waiting) stays counted after we are gone."""
    hub = _the_hub
    if hub is None:
        return
    with hub.lock:
        hub.stopped = True
        for w in hub.watchers:
            w.poke()
        hub.watching.notify_all()
        threads = [w.thread for w in hub.watchers]
        if hub.checker is not None:
            threads.append(hub.checker)
    for t in threads:
        t.join(1.0)
    with hub.lock:  # an await in a later exit handler starts afresh
        hub.watchers, hub.where, hub.checker, hub.stopped = [], {}, None, False


atexit.register(_stop_watchers)


# ---- io_uring: one ring per running loop -------------------------------------

_WAKER_VAR = "SHMKIT_AIO_WAKER"
_wait_ids = itertools.count(1)  # the keys of the waits in flight in the rings
_refused: list[BaseException] = []  # why _core.Uring() failed in this process, once


class _Ring:
    """One event loop's io_uring (``_core.Uring``): the futex waits of the
    awaits this loop runs, each counted a sleeper like a blocking call.  Its
    fd is one of the loop's readers: a waker's FUTEX_WAKE posts a
    completion, the loop wakes, and the reader callback reaps the
    completions and settles their futures in the loop's own thread."""

    __slots__ = ("uring", "loop", "hub", "fd", "waits", "descs", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, hub: _Hub) -> None:
        self.uring = _core.Uring()
        self.loop, self.hub = loop, hub
        # the waits in flight: key -> future, and key -> description, which
        # the checker thread looks at (copied in one C call, no object made
        # per wait: an idle look over 10,000 waits stays cheap)
        self.waits: dict[int, asyncio.Future[int]] = {}
        self.descs: dict[int, _Desc] = {}
        self.fd = self.uring.fileno()
        try:
            loop.add_reader(self.fd, self.reap)
        except BaseException:
            self.uring.close()
            raise

    def reap(self) -> None:
        """The ring's fd is readable: settle the futures of completed waits."""
        self._ready(self.uring.reap())

    def _ready(self, keys: list[int]) -> None:
        # Settled before it is forgotten: a Ctrl-C in between leaves a wait
        # the awaiter ends as it resumes, never one nobody settles (the
        # checker looks only at those still in self.descs).
        waits, descs = self.waits, self.descs
        for k in keys:
            fut = waits.get(k)
            if fut is not None and not fut.done():
                fut.set_result(_READY)
            descs.pop(k, None)
            waits.pop(k, None)

    def watch(self, desc: _Desc, fut: asyncio.Future[int]) -> int:
        """0 when ``desc`` is ready now; else the key of its wait, now in
        flight, whose completion settles ``fut``.  Raises what the
        description's binding raises (ValueError, TypeError...)."""
        k = next(_wait_ids)
        if self.uring.watch(desc, k):
            return 0
        self.waits[k] = fut
        self.descs[k] = desc
        if self.hub.checker_idle:
            self.hub.nudge()
        return k

    def cancel(self, k: int) -> None:
        """Take wait ``k`` out of flight (uncounted and unpinned on return)."""
        self.descs.pop(k, None)
        if self.waits.pop(k, None) is not None:
            self._ready(self.uring.cancel(k))

    def look(self) -> None:
        """(The checker thread.)  One liveness look at every wait in flight:
        those ready or suspect (a dead peer in the way, a handle closed) are
        flagged to their futures in the loop's thread."""
        now = self.descs.copy()
        keys, descs = list(now), list(now.values())
        flags: list[tuple[int, _Flag]] = []
        for at in range(0, len(descs), _LOOK_AT_ONCE):
            flags += [(keys[at + i], f)
                      for i, f in _look(descs[at:at + _LOOK_AT_ONCE], 0, True)]
        if flags:
            try:
                self.loop.call_soon_threadsafe(self._flagged, flags)
            except RuntimeError:
                pass  # the loop was closed: its ring is closed with the next one made

    def _flagged(self, flags: list[tuple[int, _Flag]]) -> None:
        for k, flag in flags:
            fut = self.waits.get(k)  # the awaiter cancels the wait when it resumes
            if fut is not None:
                _settle([fut], flag)

    def close(self) -> None:
        """Cancel every wait in flight (uncounted, unpinned) and close the ring."""
        self.waits, self.descs = {}, {}
        if not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
        self.uring.close()


def _waker_setting() -> str:
    v = os.environ.get(_WAKER_VAR, "")
    if v not in ("", "threads", "io_uring"):
        raise WakerError(f"{_WAKER_VAR}={v!r}: expected 'threads' (watcher threads), "
                         "'io_uring' (io_uring, or an error where it cannot be used) or "
                         "nothing (io_uring where it can be used, else threads)")
    return v


def _ring(loop: asyncio.AbstractEventLoop) -> _Ring | None:
    """The running loop's ring, made on its first await; None for the
    watcher threads (SHMKIT_AIO_WAKER=threads, or no io_uring here)."""
    mine: tuple[asyncio.AbstractEventLoop, _Ring | None] | None = getattr(_here, "ring", None)
    if mine is not None and mine[0] is loop:
        return mine[1]
    hub = _hub()
    with hub.lock:
        rings = hub._rings()
    ring = next((r for r in rings if r.loop is loop and not r.uring.closed), None)
    for r in rings:
        if r.loop.is_closed() and not r.uring.closed:
            r.close()  # a loop closed with waits in flight: uncount and unpin them
    if ring is None:
        setting = _waker_setting()
        if setting == "io_uring" or (setting == "" and not _refused):
            try:
                ring = _Ring(loop, hub)
            except _core.UringUnavailableError as exc:
                if setting == "io_uring":
                    raise
                _refused.append(exc)
        if ring is not None:
            with hub.lock:
                hub.rings[id(ring)] = weakref.ref(ring)
                hub.start_checker()
    _here.ring = (loop, ring)
    return ring


def _forget_hub() -> None:  # a forked child has none of the parent's threads or loops
    global _the_hub, _here
    _the_hub = None
    _here = threading.local()


_segment.at_fork_in_child(_forget_hub)


def watcher_count() -> int:
    """How many watcher threads this process runs (a diagnostic): 0 while
    every await is woken through io_uring.

    >>> import shmkit.aio
    >>> shmkit.aio.watcher_count() >= 0
    True
    """
    hub = _the_hub
    return 0 if hub is None else len(hub.watchers)


def waker() -> Literal["io_uring", "threads"]:
    """How the running loop's awaits are woken: ``"io_uring"`` (the loop's
    own ring) or ``"threads"`` (watcher threads: ``SHMKIT_AIO_WAKER=threads``,
    or io_uring cannot be used here).

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     return shmkit.aio.waker()
    >>> asyncio.run(main()) in ("io_uring", "threads")
    True
    """
    return "threads" if _ring(_loop()) is None else "io_uring"


def _key(desc: _Desc) -> _Key:
    return (desc[0], id(desc[1]), desc[2], desc[3])


def _watch(ring: _Ring | None, loop: asyncio.AbstractEventLoop, desc: _Desc,
           fut: asyncio.Future[int]) -> Any:
    """Start a wait for ``desc`` whose readiness settles ``fut``, through the
    loop's ring or else the watcher threads: its handle for :func:`_unwatch`,
    or None when the ring found the object ready at once."""
    if ring is not None:
        return ring.watch(desc, fut) or None
    key = _key(desc)
    _hub().add(key, desc, fut, loop)
    return key


def _unwatch(ring: _Ring | None, handle: Any, fut: asyncio.Future[int]) -> None:
    """End a wait that :func:`_watch` started (uncounted and unpinned on return)."""
    if ring is not None:
        ring.cancel(handle)
    else:
        _hub().discard(handle, fut)


async def _until(attempt: Callable[[], T | _Again], describe: Callable[[], _Desc],
                 timeout: float | None, expired: Callable[[], T],
                 repair: Callable[[], T | _Again] | None = None, *,
                 tried: bool = False) -> T:
    """Run ``attempt()`` until it returns something other than _AGAIN,
    awaiting readiness in between; ``expired()`` once the timeout passes
    (after a last attempt); ``repair()`` once when a dead peer is in the way.
    ``tried``: the caller's own first attempt just failed (skip it here).
    Nothing spins in the loop: an await is woken by the kernel (io_uring)
    or a watcher thread."""
    loop = _loop()
    # (a bad timeout is refused before anything is taken, as by the blocking call)
    deadline = None if timeout is None else loop.time() + seconds(timeout)
    if not tried:
        r = attempt()
        if r is not _AGAIN:
            return r
    ring = _ring(loop)
    at_once = 0  # retries that found the object ready without waiting
    while True:
        if deadline is not None and loop.time() >= deadline:
            return expired()
        fut: asyncio.Future[int] = loop.create_future()
        handle = _watch(ring, loop, describe(), fut)
        if handle is None:  # ready now: retry at once (another may take it first)
            at_once += 1
            if at_once % 8 == 0:
                await asyncio.sleep(0)  # others' turn, should readiness keep lying
            r = attempt()
            if r is not _AGAIN:
                return r
            continue
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, _settle, [fut], _EXPIRED)
        try:
            flag = await fut
        finally:
            if timer is not None:
                timer.cancel()
            _unwatch(ring, handle, fut)
        if flag == _SUSPECT and repair is not None:
            r = repair()
        else:
            r = attempt()
        if r is not _AGAIN:
            return r


def _nowait(call: Callable[..., T], *args: Any) -> T | _Again:
    try:
        return call(*args)
    except WouldBlock:
        return _AGAIN


def _timed(call: Callable[..., T], *args: Any) -> T | _Again:
    """A repairing call: the blocking form with a short timeout, which runs
    the structure's own repair of what a dead peer left."""
    try:
        return call(*args)
    except Timeout as e:
        if not e._deadline:  # (a signal handler's own)
            raise
        return _AGAIN


# ---- channels -----------------------------------------------------------------
#
# The classes below subclass the blocking ones (so that isinstance, pickling,
# shmkit.wait and the blocking helpers keep working) but give the blocking
# methods' names to coroutines, as zmq.asyncio does: an aio object is not a
# drop-in for code that calls those methods without awaiting.  Each such
# method carries ``# type: ignore[override]`` for that reason ("coroutine",
# "async generator", "async context manager"); Queue.get, recv_array and
# Condition.wait_for need none only because the blocking forms return Any.

class Channel(_channel.Channel):
    """:class:`shmkit.Channel` with coroutine ``send``, ``send_many``, ``recv``,
    ``recv_many``, ``recv_into``, ``recv_view``, ``recv_array``, and ``async for``.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     async with shmkit.aio.Channel(None, capacity=4096) as ch:
    ...         await ch.send(b"a"); ch.close_sending()
    ...         return [m async for m in ch]
    >>> asyncio.run(main())
    [b'a']
    """

    async def send(self, data: _Buffer,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> None:
        """Send one message, awaiting room (raises like :meth:`shmkit.Channel.send`)."""
        _loop()
        if timeout is not None and (type(timeout) is not float or timeout != timeout):
            seconds(timeout)  # refused before anything is sent, as by the blocking call
        try:  # the common case first, without building the waiting machinery
            return _channel.Channel.send_nowait(self, data)
        except WouldBlock:
            pass
        await _until(lambda: _nowait(_channel.Channel.send_nowait, self, data),
                     lambda: _describe(self, max(memoryview(data).nbytes, 1)), timeout,
                     lambda: _channel.Channel.send(self, data, 0),
                     lambda: _timed(_channel.Channel.send, self, data, _REPAIR_TIMEOUT),
                     tried=True)

    async def send_many(self, messages: Sequence[_Buffer],  # type: ignore[override]  # coroutine
                        timeout: float | None = None) -> int:
        """Send messages in order, awaiting room; returns how many were sent."""
        msgs = list(messages)
        sent = 0
        loop = _loop()
        deadline = None if timeout is None else loop.time() + seconds(timeout)
        try:
            while sent < len(msgs):
                sent += _channel.Channel.send_many(self, msgs[sent:], 0)
        except Timeout as e:
            if not e._deadline:  # (a signal handler's own)
                raise
            pass
        while sent < len(msgs):
            left = None if deadline is None else deadline - loop.time()
            try:
                await self.send(msgs[sent], left)
            except Timeout as exc:
                setattr(exc, "sent", sent)  # as the core's send_many sets it
                raise
            sent += 1
            try:
                if sent < len(msgs):
                    sent += _channel.Channel.send_many(self, msgs[sent:], 0)
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
                pass
        return sent

    async def recv(self, timeout: float | None = None,  # type: ignore[override]  # coroutine
                   stop_when_no_senders: bool = False) -> bytes:
        """Take the next message, awaiting one (raises like :meth:`shmkit.Channel.recv`)."""
        _loop()
        if timeout is not None and (type(timeout) is not float or timeout != timeout):
            seconds(timeout)  # refused before anything is taken, as by the blocking call
        if not stop_when_no_senders:
            try:  # the common case first, without building the waiting machinery
                return _channel.Channel.recv_nowait(self)
            except WouldBlock:
                pass

        def attempt() -> bytes | _Again:
            if stop_when_no_senders:
                return _timed(_channel.Channel.recv, self, 0, True)
            return _nowait(_channel.Channel.recv_nowait, self)

        return await _until(attempt, lambda: _describe(self, 0, stop_when_no_senders), timeout,
                            lambda: _channel.Channel.recv(self, 0, stop_when_no_senders),
                            lambda: _timed(_channel.Channel.recv, self, _REPAIR_TIMEOUT,
                                           stop_when_no_senders),
                            tried=not stop_when_no_senders)

    async def recv_many(self, max_n: int = 1024,  # type: ignore[override]  # coroutine
                        timeout: float | None = None,
                        stop_when_no_senders: bool = False) -> list[bytes]:
        """Take up to ``max_n`` ready messages, awaiting the first; ``[]`` on timeout."""
        def attempt() -> list[bytes] | _Again:
            got = _channel.Channel.recv_many(self, max_n, 0, stop_when_no_senders)
            return got if got else _AGAIN

        def repair() -> list[bytes] | _Again:
            got = _channel.Channel.recv_many(self, max_n, _REPAIR_TIMEOUT, stop_when_no_senders)
            return got if got else _AGAIN

        def expired() -> list[bytes]:
            return []

        return await _until(attempt, lambda: _describe(self, 0, stop_when_no_senders),
                            timeout, expired, repair)

    async def recv_into(self, buffer: _Buffer,  # type: ignore[override]  # coroutine
                        timeout: float | None = None) -> int:
        """Copy the next message into ``buffer``; returns its length."""
        return await _until(lambda: _timed(_channel.Channel.recv_into, self, buffer, 0),
                            lambda: _describe(self), timeout,
                            lambda: _channel.Channel.recv_into(self, buffer, 0),
                            lambda: _timed(_channel.Channel.recv_into, self, buffer,
                                           _REPAIR_TIMEOUT))

    async def recv_view(self,  # type: ignore[override]  # coroutine
                        timeout: float | None = None, *,
                        redeliver: bool = False) -> RecordView:
        """Take the next message without copying (see :meth:`shmkit.Channel.recv_view`)."""
        return await _until(lambda: _nowait(self._take, None, True, redeliver),
                            lambda: _describe(self), timeout,
                            lambda: self._take(0, False, redeliver),
                            lambda: _timed(self._take, _REPAIR_TIMEOUT, False, redeliver))

    async def recv_array(self, dtype: Any = DEFAULT, shape: Any = None, *,
                         timeout: float | None = None, out: Any = None) -> Any:
        """Receive a message as a numpy array (see :meth:`shmkit.Channel.recv_array`);
        one that the array does not fit raises LayoutMismatchError and stays."""
        np, dt, unit, nbytes = array_terms(dtype, shape, out, "channel")
        view = await _until(lambda: _timed(self._take_sized, 0, unit, nbytes),
                            lambda: _describe(self), timeout,
                            lambda: self._take_sized(0, unit, nbytes),
                            lambda: _timed(self._take_sized, _REPAIR_TIMEOUT, unit, nbytes))
        try:
            return array_of("channel", self.name, np, view, dt, shape, unit, nbytes, out)
        except BaseException:
            self._keep(view)  # (as _arrays.received_array)
            raise

    def __iter__(self) -> NoReturn:
        raise TypeError("iterate over a shmkit.aio.Channel with `async for`")

    def __aiter__(self) -> "Channel":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def messages(self, *,  # type: ignore[override]  # async generator
                       timeout: float | None = None,
                       stop_when_no_senders: bool = False) -> AsyncIterator[bytes]:
        """``async for m in ch.messages(...)``: as :meth:`shmkit.Channel.messages`."""
        while True:
            try:
                yield await self.recv(timeout, stop_when_no_senders)
            except ChannelClosed:
                return

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Queue(_channel.Queue):
    """:class:`shmkit.Queue` with coroutine ``put`` and ``get``.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     q = shmkit.aio.Queue()
    ...     await q.put({"n": 1})
    ...     item = await q.get(timeout=1.0)
    ...     q.close()
    ...     return item
    >>> asyncio.run(main())
    {'n': 1}
    """

    async def put(self, obj: Any, block: bool = True,  # type: ignore[override]  # coroutine
                  timeout: float | None = None) -> None:
        """Put ``obj``, awaiting room (``queue.Full`` when ``block`` is false or on timeout)."""
        if self._closed:
            raise self._closed_error()
        if not block and timeout is not None:
            _core.nowait_timeout_check(timeout, "put()", "block")
        data, out = self._pack(obj)
        if not block or out is not None:
            if out is not None:
                if not block:
                    self._put_out_of_band(data, out, False, None)
                    return
                return await self._put_big(data, out, timeout)
            return self._send_nowait(data)
        _loop()
        if timeout is not None and (type(timeout) is not float or timeout != timeout):
            seconds(timeout)  # refused before anything is sent, as by the blocking call
        try:  # the common case first, without building the waiting machinery
            return self._send_nowait(data)
        except WouldBlock:
            pass
        ch = self._ch

        def expired() -> NoReturn:
            raise Full(f"queue {self.name!r} stayed full for {_core.shown_seconds(timeout)} s")

        await _until(lambda: _nowait(self._send_nowait, data),
                     lambda: _describe(ch, len(data)), timeout, expired,
                     lambda: _timed(self._send, data, _REPAIR_TIMEOUT), tried=True)

    async def _put_big(self, data: bytes, out: Any, timeout: float | None) -> None:
        # The payload file goes with the message, or is removed if the
        # message is refused (see Queue._put_out_of_band).
        ch = self._ch

        def expired() -> NoReturn:
            raise Full(f"queue {self.name!r} stayed full for {_core.shown_seconds(timeout)} s")

        try:
            await _until(lambda: _nowait(self._send_nowait, data),
                         lambda: _describe(ch, len(data)), timeout, expired,
                         lambda: _timed(self._send, data, _REPAIR_TIMEOUT))
        except (Full, ChannelClosed, ValueError, TypeError, asyncio.CancelledError):
            # (cancelled only while awaiting room: no send was under way;
            # TypeError, ValueError: a bad timeout, a closed handle)
            out.unsent()
            raise
        except BaseException:
            out.sent()  # perhaps sent: `shmkit gc` removes it if no message names it
            raise
        out.sent()

    async def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an object, awaiting one (``queue.Empty`` as for ``get``)."""
        if self._closed:
            raise self._closed_error()
        # The core's call returns the object in the main thread's box, as
        # for the blocking get (shmkit.Queue.get): it reaches this frame
        # with no await on the way, and is taken out of the box here.
        if not block:
            box = self._get_boxed(False, timeout)
        else:
            _loop()
            if timeout is not None and (type(timeout) is not float or timeout != timeout):
                seconds(timeout)  # refused before anything is taken, as by the blocking call
            try:  # the common case first, without building the waiting machinery
                box = self._get_boxed(False)
            except WouldBlock:
                ch = self._ch

                def expired() -> NoReturn:
                    raise Empty(f"queue {self.name!r} stayed empty for "
                                f"{_core.shown_seconds(timeout)} s")

                box = await _until(lambda: _nowait(self._get_boxed, False),
                                   lambda: _describe(ch), timeout, expired,
                                   lambda: _nowait(self._get_boxed, True, _REPAIR_TIMEOUT),
                                   tried=True)
        obj = box[0]
        box[0] = box  # empty: it holds itself
        if obj is box:  # taken by a get that a signal handler made meanwhile
            return await self.get(block, timeout)
        return obj

    def put_nowait(self, obj: Any) -> None:
        if self._closed:
            raise self._closed_error()
        _channel.Queue.put(self, obj, False)

    def get_nowait(self) -> Any:
        return _channel.Queue.get(self, False)  # (its own check of a closed queue)


# ---- locks and events ---------------------------------------------------------

class Event(_sync.Event):
    """:class:`shmkit.Event` whose ``wait`` is a coroutine.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     e = shmkit.aio.Event(None)
    ...     e.set()
    ...     ok = await e.wait(timeout=1.0)
    ...     e.close(); e.unlink()
    ...     return ok
    >>> asyncio.run(main())
    True
    """

    async def wait(self,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> bool:
        """Await the flag (taking it if auto-reset); False if ``timeout`` passes first."""
        what = f"event {self._seg.name!r}"

        def attempt() -> bool | _Again:
            return True if _core.event_wait(self._m, self._base, 0, self._auto, what) else _AGAIN

        return await _until(attempt, lambda: _describe(self), timeout, lambda: False)


def _acquire_attempt(call: Callable[..., bool], *args: Any) -> Callable[[], bool | _Again]:
    return lambda: True if call(*args) else _AGAIN


class Mutex(_sync.Mutex):
    """:class:`shmkit.Mutex` with a coroutine ``acquire`` and ``async with``.

    A holder killed while a coroutine awaits the lock is recovered exactly
    as by the blocking call: the coroutine gets the lock, ``recovered`` is
    True and :class:`shmkit.OwnerDiedWarning` is issued.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     m = shmkit.aio.Mutex(None)
    ...     async with m:
    ...         held = m.locked()
    ...     m.close(); m.unlink()
    ...     return held
    >>> asyncio.run(main())
    True
    """

    async def acquire(self, blocking: bool = True,  # type: ignore[override]  # coroutine
                      timeout: float | None = None) -> bool:
        """Await the lock; False if ``timeout`` passes first (as ``acquire``)."""
        if not blocking:
            return _core.Lock.acquire(self, False, timeout)
        timeout = lock_timeout(timeout)
        return await _until(_acquire_attempt(_core.Lock.acquire, self, False),
                            lambda: _describe(self), timeout, lambda: False)

    async def __aenter__(self) -> "Mutex":
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __enter__(self) -> "Mutex":
        raise TypeError("hold a shmkit.aio.Mutex with `async with`")

    @contextlib.asynccontextmanager
    async def held(self,  # type: ignore[override]  # async context manager
                   timeout: float | None = None) -> AsyncIterator["Mutex"]:
        """``async with m.held(timeout=1.0):`` holds the lock, or raises Timeout."""
        if not await self.acquire(timeout=timeout):
            raise _timed_out(f"could not take mutex {self.name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        try:
            yield self
        finally:
            self.release()


class Semaphore(_sync.Semaphore):
    """:class:`shmkit.Semaphore` with a coroutine ``acquire`` and ``async with``.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     s = shmkit.aio.Semaphore(None, value=1)
    ...     async with s:
    ...         v = s.value
    ...     s.close(); s.unlink()
    ...     return v
    >>> asyncio.run(main())
    0
    """

    async def acquire(self, blocking: bool = True,  # type: ignore[override]  # coroutine
                      timeout: float | None = None) -> bool:
        """Await a unit; False if ``timeout`` passes first."""
        if not blocking:
            return _core.Semaphore.acquire(self, False, timeout)
        return await _until(_acquire_attempt(_core.Semaphore.acquire, self, False),
                            lambda: _describe(self), lock_timeout(timeout), lambda: False)

    async def __aenter__(self) -> "Semaphore":
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __enter__(self) -> "Semaphore":
        raise TypeError("hold a shmkit.aio.Semaphore with `async with`")


class RWLock(_sync.RWLock):
    """:class:`shmkit.RWLock` with coroutine ``acquire_read``/``acquire_write``
    and ``async with rw.read()`` / ``rw.write()``.

    Writer-preferring like the blocking lock: a coroutine awaiting the write
    lock takes the writers' mutex and announces itself, so that new readers
    (in any process) wait from then on, and then awaits the readers already
    in.  A reader that dies holding the lock is counted out and a writer
    that dies is recovered, as with the blocking calls (``recovered``,
    :class:`shmkit.OwnerDiedWarning`).  A timeout or a cancellation undoes
    the announcement: readers go on at once.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     rw = shmkit.aio.RWLock(None)
    ...     async with rw.read():
    ...         pass
    ...     async with rw.write(timeout=1.0):
    ...         pass
    ...     rw.close(); rw.unlink()
    >>> asyncio.run(main())
    """

    async def acquire_read(self,  # type: ignore[override]  # coroutine
                           timeout: float | None = None) -> bool:
        """Await a read hold; False if ``timeout`` passes first."""
        timeout = lock_timeout(timeout)
        return await _until(_acquire_attempt(_core.RWLock.acquire_read, self, 0),
                            lambda: _describe(self), timeout, lambda: False)

    async def acquire_write(self,  # type: ignore[override]  # coroutine
                            timeout: float | None = None) -> bool:
        """Await the write hold; False if ``timeout`` passes first.

        The blocking call's steps, one compiled call each (``_core/rwlock.c``):
        await the writers' mutex and announce the writer, then await the
        readers' leaving; on timeout or cancellation the announcement is
        undone before this returns or raises.
        """
        loop = _loop()
        timeout = lock_timeout(timeout)
        deadline = None if timeout is None else loop.time() + seconds(timeout)
        ticket = next(_write_tickets)  # names this call's announcement in the core
        core = _core.RWLock

        def begin() -> bool | _Again:
            return True if core._write_begin(self, ticket) else _AGAIN

        def finish() -> bool | _Again:
            return True if core._write_finish(self, ticket) else _AGAIN

        def readers_gone() -> _Desc:
            if self._m.closed:
                _describe(self)  # raises ClosedError
            return (_core.W_RW_WRITE, self._m, self._base, 0)

        try:
            # A dead writer's mutex is reported suspect: begin() takes it over.
            if not await _until(begin, lambda: _describe(self._wlock), timeout,
                                lambda: False, begin):
                return False
            left = None if deadline is None else deadline - loop.time()
            # A dead reader is reported suspect: finish() drops its holds.
            return await _until(finish, readers_gone, left, lambda: False, finish)
        finally:
            core._write_abandon(self, ticket)  # nothing once finish() returned True

    @contextlib.asynccontextmanager
    async def read(self,  # type: ignore[override]  # async context manager
                   timeout: float | None = None) -> AsyncIterator[None]:
        """``async with rw.read():`` a read hold for the block; Timeout if not in time."""
        if not await self.acquire_read(timeout):
            raise _timed_out(f"could not read-lock {self.name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        try:
            yield
        finally:
            self.release_read()

    @contextlib.asynccontextmanager
    async def write(self,  # type: ignore[override]  # async context manager
                    timeout: float | None = None) -> AsyncIterator[None]:
        """``async with rw.write():`` the write hold for the block; Timeout if not in time."""
        if not await self.acquire_write(timeout):
            raise _timed_out(f"could not write-lock {self.name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        try:
            yield
        finally:
            self.release_write()


class Condition(_sync.Condition):
    """:class:`shmkit.Condition` with coroutine ``acquire``, ``wait``,
    ``wait_for`` and ``async with``.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     c = shmkit.aio.Condition(None)
    ...     async with c:
    ...         c.notify_all()
    ...         late = await c.wait(timeout=0.01)
    ...     c.close(); c.unlink()
    ...     return late
    >>> asyncio.run(main())
    False
    """

    lock: Mutex  # the aio Mutex: awaited by acquire, wait and ``async with``

    def _setup(self, seg: Segment, offset: int) -> None:
        super()._setup(seg, offset)
        # _embedded builds an instance of the class it is called on
        self.lock = cast(Mutex, Mutex._embedded(seg, offset, self._what))

    async def acquire(self, blocking: bool = True,  # type: ignore[override]  # coroutine
                      timeout: float | None = None) -> bool:
        return await self.lock.acquire(blocking, timeout)

    async def __aenter__(self) -> "Condition":
        await self.lock.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()

    def __enter__(self) -> "Condition":
        raise TypeError("hold a shmkit.aio.Condition with `async with`")

    async def wait(self,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> bool:
        """Release the lock, await a ``notify()``, re-take the lock; False on timeout.

        As :meth:`shmkit.Condition.wait`: call it holding the condition
        (``async with cond:``); it holds it again when it returns, and also
        when it is cancelled (a cancelled wait re-takes the lock, then raises
        CancelledError, as :meth:`asyncio.Condition.wait` does).
        """
        m, base = self._m, self._base
        loop = _loop()  # (a bad timeout is refused before the lock is given up)
        deadline = None if timeout is None else loop.time() + seconds(timeout)
        holding = notified = cancelled = False
        seq0 = _core.cond_enter(m, base)  # RuntimeError unless we hold it
        desc: _Desc = (_core.W_COND, m, base, seq0)

        def granted() -> bool | _Again:
            return True if _core.wait_ready([desc], 0, False)[0] else _AGAIN

        try:
            while not notified:
                left = None if deadline is None else deadline - loop.time()
                if not await _until(granted, lambda: desc, left, lambda: False):
                    break
                await self.lock.acquire()
                holding = True
                if _core.cond_take(m, base, seq0):
                    notified = True
                else:  # another waiter took the last grant: wait again
                    self.lock.release()
                    holding = False
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            while not holding:  # hold it again on every way out
                try:
                    await self.lock.acquire()
                    holding = True
                except asyncio.CancelledError:
                    cancelled = True
            if not notified:
                # A notify() that raced with our time-out counted us: take its
                # wake-up, so none is left for nobody (not when cancelled).
                notified = _core.cond_leave(m, base, seq0, not cancelled)
        if cancelled:
            raise asyncio.CancelledError
        return notified

    async def wait_for(self, predicate: Callable[[], Any],
                       timeout: float | None = None) -> Any:
        """Await until ``predicate()`` is true (holding the condition); returns its last value."""
        loop = _loop()
        deadline = None if timeout is None else loop.time() + seconds(timeout)
        result = predicate()
        while not result:
            if deadline is not None and loop.time() >= deadline:
                break
            await self.wait(None if deadline is None else deadline - loop.time())
            result = predicate()
        return result


async def wait(objects: Sequence[T], timeout: float | None = None, *,
               return_when: Literal["FIRST_COMPLETED", "ALL_COMPLETED"] = FIRST_COMPLETED,
               ) -> list[T]:
    """Await until one (or, with ``return_when=ALL_COMPLETED``, every) object
    of ``objects`` is ready; return those that are.

    The coroutine form of :func:`shmkit.wait`, same rules: readiness never
    consumes; when ``timeout`` passes first, the objects ready at the last
    check (``[]`` for FIRST_COMPLETED, perhaps some for ALL_COMPLETED); no
    limit of 128 objects.  ALL_COMPLETED watches one object that is not
    ready at a time (every one has to be), so it takes one wait in flight
    (or one watcher entry) however many objects it is given.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     a, b = shmkit.aio.Event(None), shmkit.aio.Event(None)
    ...     asyncio.get_running_loop().call_later(0.01, a.set)
    ...     asyncio.get_running_loop().call_later(0.02, b.set)
    ...     got = await shmkit.aio.wait([a, b], 5.0, return_when=shmkit.aio.ALL_COMPLETED)
    ...     for e in (a, b):
    ...         e.close(); e.unlink()
    ...     return len(got)
    >>> asyncio.run(main())
    2
    """
    all_of = _all_of(return_when, "shmkit.aio.wait(objects)")
    objs = list(objects)
    if not objs:
        raise WaitArgumentError("shmkit.aio.wait(objects): need at least one object, got none")
    descs = [_describe(o) for o in objs]
    loop = _loop()
    deadline = None if timeout is None else loop.time() + seconds(timeout)
    # found with a dead holder (ready for the call that recovers), or a queue
    # whose box keeps an object
    suspects = _kept(objs)
    while True:
        now = _ready_all(descs, suspects)
        if len(now) == len(descs) or (now and not all_of):
            break
        if deadline is not None and loop.time() >= deadline:
            break
        waiting = [i for i in range(len(descs)) if i not in now]
        if all_of:
            waiting = waiting[:1]  # every one must be ready: one not ready will do
        ring = _ring(loop)
        fut: asyncio.Future[int] = loop.create_future()
        added: list[Any] = []  # the handles of the waits started
        timer = None
        try:
            for i in waiting:
                handle = _watch(ring, loop, descs[i], fut)
                if handle is None:  # ready now: look at them all again
                    _settle([fut], _READY)
                    break
                added.append(handle)
            if deadline is not None:
                timer = loop.call_at(deadline, _settle, [fut], _EXPIRED)
            flag = await fut
        finally:
            if timer is not None:
                timer.cancel()
            for handle in added:
                _unwatch(ring, handle, fut)
        if flag == _SUSPECT and all_of:
            suspects.add(waiting[0])
    return [o for i, o in enumerate(objs) if i in now]


def __getattr__(name: str) -> Any:
    # Request/response lives in its own module, built on this one's Channel.
    if name in ("Service", "Client", "Worker"):
        from . import aio_service
        return getattr(aio_service, name)
    raise AttributeError(f"module 'shmkit.aio' has no attribute {name!r}")
