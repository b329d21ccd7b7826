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

from typing import Sequence, TypeVar

from . import _core
from .channel import Channel, Queue
from .errors import ClosedError
from .sync import Event, Mutex, RWLock, Semaphore

__all__ = ["wait", "MAX_OBJECTS"]

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


def wait(objects: Sequence[T], timeout: float | None = None) -> list[T]:
    """Wait until at least one of ``objects`` is ready; return those that are.

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

    Readiness never consumes, and is a snapshot: another thread or process
    may take the message or the lock first, so the call that follows may
    still find nothing (use ``recv_nowait`` / ``acquire(False)`` and wait
    again), as after ``select``.  Returns ``[]`` when ``timeout`` seconds
    pass first (None: wait forever).  One thread sleeps on up to
    :data:`MAX_OBJECTS` objects with the GIL released; Ctrl-C raises
    KeyboardInterrupt; a dead peer is looked for between slices.

    Raises ValueError for an empty list or more than 128 objects,
    TypeError for objects of other kinds, :class:`ClosedError` for a closed
    handle (a handle closed by another thread during the wait is returned
    as ready; its next call raises ClosedError).

    >>> import shmkit
    >>> ev = shmkit.Event(None)
    >>> shmkit.wait([ev], timeout=0.01)
    []
    >>> ev.set(); shmkit.wait([ev], timeout=1.0) == [ev]
    True
    >>> ev.close(); ev.unlink()
    """
    objs = list(objects)
    if not 1 <= len(objs) <= MAX_OBJECTS:
        raise ValueError(f"shmkit.wait(objects): need 1 to {MAX_OBJECTS} objects, got "
                         f"{len(objs)}; split a larger set over several threads or use "
                         "shmkit.aio, which has no such limit per process")
    descs = [_describe(o) for o in objs]
    ready, suspect = _core.wait_ready(descs, timeout, True)
    chosen = set(ready) | set(suspect)
    return [o for i, o in enumerate(objs) if i in chosen]
