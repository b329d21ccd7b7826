"""Waiting on several shmkit objects at once: :func:`shmkit.wait`.

Each kind of object describes what makes it ready to the compiled core
(``_core/waitset.c``) as ``(kind, target, offset, extra)``: which futex word
changes when it may have become ready and which test says it is.  One
thread then sleeps on up to 128 of them at once (Linux ``futex_waitv``)
with the GIL released.

>>> import shmkit
>>> ch, ev = shmkit.Channel(None, capacity=4096), shmkit.Event(None)
>>> ch.send(b"x")
>>> shmkit.wait([ch, ev], timeout=1.0) == [ch]
True
>>> ch.close(); ev.close(); ev.unlink()
"""

from __future__ import annotations

import time
from typing import Final, Literal, Sequence, TypeVar

from . import _core
from .channel import Channel, Queue
from .errors import ClosedError, ShmkitError
from .sync import Event, Mutex, RWLock, Semaphore, seconds

__all__ = ["wait", "MAX_OBJECTS", "FIRST_COMPLETED", "ALL_COMPLETED", "WaitArgumentError"]

FIRST_COMPLETED: Final = "FIRST_COMPLETED"
"""``return_when=``: return as soon as one object is ready (the default)."""
ALL_COMPLETED: Final = "ALL_COMPLETED"
"""``return_when=``: return once every object is ready at one check."""
# The same strings as concurrent.futures' and asyncio's constants, so that
# ``return_when=concurrent.futures.ALL_COMPLETED`` works too.


class WaitArgumentError(ShmkitError, ValueError):
    """An argument :func:`shmkit.wait` or :func:`shmkit.aio.wait` cannot take:
    no objects, too many, or a ``return_when`` other than FIRST_COMPLETED
    and ALL_COMPLETED."""


def _all_of(return_when: object, where: str) -> bool:
    """Whether ``return_when`` asks for all-of waiting (WaitArgumentError if neither)."""
    if return_when == FIRST_COMPLETED:
        return False
    if return_when == ALL_COMPLETED:
        return True
    raise WaitArgumentError(
        f"{where}: return_when={return_when!r} is not one of FIRST_COMPLETED and "
        "ALL_COMPLETED (shmkit objects have no FIRST_EXCEPTION: readiness raises nothing)")

MAX_OBJECTS = 128
"""How many objects one :func:`wait` (one sleeping thread) watches at most."""

T = TypeVar("T")

_Desc = tuple[int, object, int, int]
"""A readiness description: (kind, target, offset, extra), as ``_core.wait_ready`` takes."""


def _channel_of(obj: Channel | Queue) -> Channel:
    ch = obj._ch if isinstance(obj, Queue) else obj
    if ch is None or getattr(obj, "_closed", False) or ch._seg is None or ch._seg.closed:
        raise ClosedError(f"{obj!r} is closed in this process; open it again to wait on it")
    return ch


def _describe(obj: object, sending: int = 0, stop_when_no_senders: bool = False) -> _Desc:
    """The readiness description of ``obj``: for a channel or queue, data to
    receive (or, with ``sending`` > 0, room for a message of that many bytes);
    for an event, its flag; for a mutex, free; for a semaphore, a free unit;
    for a reader/writer lock, room for a reader.  ``stop_when_no_senders``:
    a channel is also ready once every process that sent on it has gone."""
    if isinstance(obj, (Channel, Queue)):
        ch = _channel_of(obj)
        if sending:
            return (_core.W_RING_SPACE, ch, 0, 8 + ((sending + 7) & ~7))
        return (_core.W_RING_DATA, ch, 0, int(stop_when_no_senders))
    if isinstance(obj, Event):
        kind = _core.W_EVENT
    elif isinstance(obj, Mutex):
        kind = _core.W_LOCK
    elif isinstance(obj, Semaphore):
        kind = _core.W_SEM
    elif isinstance(obj, RWLock):
        kind = _core.W_RW_READ
    else:
        raise TypeError(
            f"shmkit.wait() waits on Channel, Queue, Event, Mutex, Semaphore and RWLock "
            f"objects, not {type(obj).__name__}; wait on a Condition's lock "
            f"(cond.lock) or use cond.wait()")
    m = obj._m
    if m.closed:
        raise ClosedError(f"{obj!r} is closed in this process; open it again to wait on it")
    return (kind, m, obj._base, 0)


def wait(objects: Sequence[T], timeout: float | None = None, *,
         return_when: Literal["FIRST_COMPLETED", "ALL_COMPLETED"] = FIRST_COMPLETED,
         ) -> list[T]:
    """Wait until one (or, with ``return_when=ALL_COMPLETED``, every) object
    of ``objects`` is ready; return those that are.

    Like :func:`multiprocessing.connection.wait` (or ``select``) for shmkit
    objects.  An object is ready when its next call would not block:

    ==================  =========================================
    Channel, Queue      a message is waiting (or the channel has ended)
    Event               the flag is set
    Mutex               the lock is free
    Semaphore           a unit is free
    RWLock              a reader may enter (no writer in or waiting)
    ==================  =========================================

    An object whose holder (or a message's writer) died is reported ready
    too: the next call recovers it (a Mutex's ``acquire`` returns with
    ``recovered`` set, a channel's ``recv`` drops the dead sender's record).

    ``return_when`` takes the names of :func:`concurrent.futures.wait` and
    :func:`asyncio.wait` (the same strings, so theirs work too):
    ``FIRST_COMPLETED`` (the default) returns as soon as at least one is
    ready; ``ALL_COMPLETED`` returns once one check finds every object ready
    at once, and sleeps meanwhile on those that are not (an object ready
    earlier that is taken again before the others is waited for again).
    When ``timeout`` passes first, both return the objects ready at the last
    check, as ``concurrent.futures.wait`` returns its ``done`` set: ``[]``
    for FIRST_COMPLETED, possibly some for ALL_COMPLETED (compare the
    length with ``len(objects)``); neither raises.

    Readiness never consumes, and is a snapshot: another thread or process
    may take the message or the lock first, so the call that follows may
    still find nothing (use ``recv_nowait`` / ``acquire(False)`` and wait
    again), as after ``select``.  ``timeout`` None: wait forever.  One thread
    sleeps on up to :data:`MAX_OBJECTS` objects with the GIL released;
    Ctrl-C raises KeyboardInterrupt; a dead peer is looked for between slices.

    Raises :class:`WaitArgumentError` (a ValueError) for an empty list, more
    than 128 objects or another ``return_when``, TypeError for objects of
    other kinds, :class:`ClosedError` for a closed handle (a handle closed by
    another thread during the wait is returned as ready; its next call
    raises ClosedError).

    >>> import shmkit
    >>> ev, ch = shmkit.Event(None), shmkit.Channel(None, capacity=4096)
    >>> shmkit.wait([ev], timeout=0.01)
    []
    >>> ev.set(); shmkit.wait([ev, ch], timeout=1.0) == [ev]
    True
    >>> shmkit.wait([ev, ch], timeout=0.01, return_when=shmkit.ALL_COMPLETED) == [ev]
    True
    >>> ch.send(b"x"); len(shmkit.wait([ev, ch], 1.0, return_when=shmkit.ALL_COMPLETED))
    2
    >>> ch.close(); ev.close(); ev.unlink()
    """
    all_of = _all_of(return_when, "shmkit.wait(objects)")
    objs = list(objects)
    if not 1 <= len(objs) <= MAX_OBJECTS:
        raise WaitArgumentError(
            f"shmkit.wait(objects): need 1 to {MAX_OBJECTS} objects, got {len(objs)}; "
            "split a larger set over several threads or use shmkit.aio.wait, which has "
            "no such limit per process")
    if timeout is not None:
        timeout = seconds(timeout)
    descs = [_describe(o) for o in objs]
    kept = _kept(objs)
    if not all_of:
        ready, suspect = _core.wait_ready(descs, 0 if kept else timeout, True)
        chosen = set(ready) | set(suspect) | kept
        return [o for i, o in enumerate(objs) if i in chosen]
    deadline = None if timeout is None else time.monotonic() + timeout
    suspects = kept
    while True:
        now = _ready_all(descs, suspects)
        if len(now) == len(descs):
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        # Every object must be ready, so sleeping on any one that is not
        # loses nothing; sleeping on all of them wakes once per change.
        waiting = [i for i in range(len(descs)) if i not in now]
        ready, suspect = _core.wait_ready([descs[i] for i in waiting], left, True)
        suspects.update(waiting[k] for k in suspect)
    return [o for i, o in enumerate(objs) if i in now]


def _kept(objs: Sequence[object]) -> set[int]:
    """The indices of the queues and channels whose handle keeps what a
    receive took as a Ctrl-C came (a queue's box, a channel's kept
    messages): ready, though their ring may be empty."""
    return {i for i, o in enumerate(objs) if isinstance(o, (Queue, Channel)) and o._kept}


def _ready_all(descs: Sequence[_Desc], suspects: set[int]) -> set[int]:
    """The indices of the objects ready at one check (no sleep), with those
    found earlier to have a dead holder (they stay ready for their next call,
    which recovers them, and a check without sleep may not see it)."""
    ready = set(suspects)
    rest = [i for i in range(len(descs)) if i not in suspects]
    for at in range(0, len(rest), MAX_OBJECTS):
        part = rest[at:at + MAX_OBJECTS]
        r, s = _core.wait_ready([descs[i] for i in part], 0, False)
        ready.update(part[k] for k in r)
        ready.update(part[k] for k in s)
    return ready
