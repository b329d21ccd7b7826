"""Cross-process locks and events that survive their holders being killed.

Each is opened by name (its own small segment) or placed inside another
object's segment with ``.at(segment, offset)``; data structures embed them.
Every blocking call takes ``timeout=``, releases the GIL while it waits and
lets Ctrl-C through.  Uncontended calls make no system call.

>>> import shmkit
>>> m = shmkit.Mutex(None)                  # a fresh, uniquely named mutex
>>> with m:
...     pass                                # held here, by this process
>>> m.close(); m.unlink()

Crash robustness: if a holder dies (even by SIGKILL), the next acquirer gets
the lock at once, :class:`OwnerDiedWarning` is issued and ``.recovered`` is
True for that holding, so the caller can check the data the lock guards.

Payload layouts (offsets from the object's start, native byte order)::

    Mutex      0 u32 lock word (see _core/lock.c)
    Event      0 u32 flag | waiters << 1 (see _core/event.c)
    RWLock     (see _core/rwlock.c)
               0 u32 writers' mutex   4 u32 state (bit 0 writer in, bit 1 readers asleep)
               8 u32 readers-left counter (the writer sleeps on it)
              64 u64 per attach slot: generation << 32 | read holds
    Semaphore  format 2 (see _core/semaphore.c)
               0 u32 mutex  4 i32 value  8 u32 change counter  12 u32 sleepers
              16 u32 maximum (or 0xFFFFFFFF)  32 undo journal (4 entries)
             128 u64 per attach slot: generation << 32 | holds (i32)
    Condition  format 2 (see _core/condition.c)
               0 u32 mutex  4 u32 notify counter
              12 u32 wake-ups granted by notify() and not yet taken
              64 u64 per attach slot: generation << 32 | sleepers

RWLock, Semaphore and Condition run their whole protocol in the compiled core, so
Ctrl-C or a kill between two Python bytecodes never leaves them half changed.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, cast

from . import _core
from .errors import (
    _timed_out,
    CorruptError,
    FormatVersionError,
    MismatchError,
    ShmkitError,
    Timeout,
    WouldBlock,
)
from ._object import DEFAULT, SyncOptions, attach_segment, check_common, segment_options
from .segment import _OFF_HWM, DEFAULT_MAX_ATTACH, Kind, Segment, check_max_attach

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Mutex", "RWLock", "Event", "Semaphore", "Condition"]

_ALL = 0x7FFFFFFF
_GEN_MASK = 0xFFFFF


def seconds(timeout: float, what: str = "timeout") -> float:
    """A timeout as every wait written in Python takes it, by the core's rule
    (``_core.seconds``): what converts to a float, as for ``time.sleep``,
    but not a bool (numpy's included) nor NaN; a negative one counts as 0.
    ``what`` names the parameter in the error.

    >>> seconds(2), seconds(-1.0)
    (2.0, 0.0)
    """
    if type(timeout) is float and timeout == timeout:  # the common case first
        return timeout if timeout > 0.0 else 0.0
    return _core.seconds(timeout, what)


def optional_seconds(timeout: float | None, what: str = "timeout") -> float | None:
    """:func:`seconds`, or None (no limit) for None: a timeout an object keeps."""
    return None if timeout is None else seconds(timeout, what)


def lock_timeout(timeout: float | None) -> float | None:
    """A lock's timeout as the core's acquire reads it (``_core.lock_timeout``):
    checked as by :func:`seconds`, -1 is threading.Lock's "no timeout" (None),
    other negative values do not wait (0.0)."""
    return None if timeout is None else _core.lock_timeout(timeout)


def _deadline(timeout: float | None) -> float | None:
    # As in the C core and threading's waits: None waits forever, a negative
    # timeout (a deadline already passed) does not wait at all.
    if timeout is None:
        return None
    return time.monotonic() + seconds(timeout)


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _slot_counts(m: Any, table: int) -> Iterator[tuple[int, int, int, int, bool]]:
    """``(slot, offset, word, count, alive)`` for each non-zero per-attach-slot
    entry (``generation << 32 | count``) of the table at absolute ``table``;
    ``alive`` says whether the attachment that owns the count still exists."""
    for slot in range(min(_core.load32(m, _OFF_HWM), m.max_slots)):
        off = table + 8 * slot
        v = _core.load64(m, off)
        count = v & 0xFFFFFFFF
        if count:
            token = ((v >> 32) & _GEN_MASK) << 10 | slot
            yield slot, off, v, count, token == m.token or _core.token_alive(m, token)


class _Placed:
    """Shared plumbing: where the object lives and how to open it by name."""

    _kind: Kind
    _seg: Segment
    _own_segment = False

    @classmethod
    def _footprint(cls, max_slots: int) -> int:
        return 64

    def _place(self, seg: Segment, offset: int) -> None:
        self._seg = seg
        self._m = seg._live_mapping()
        self._base = seg._hsize + offset
        self._offset = offset

    @classmethod
    def _named_segment(cls, name: str | None, create: bool | None, layout: dict[str, Any],
                       init: Callable[[Segment], None] | None,
                       kwargs: Mapping[str, object]) -> Segment:
        opts = segment_options(cls.__name__, kwargs, SyncOptions) if kwargs else {}
        lifetime, max_attach = opts.get("lifetime", DEFAULT), opts.get("max_attach", DEFAULT)
        slots = DEFAULT_MAX_ATTACH if max_attach is DEFAULT else check_max_attach(max_attach)
        size = cls._footprint(slots) if create is not False else None
        seg = attach_segment(cls._kind, name, opts.pop("path", None), size=size, create=create,
                             layout=layout, init=init, **opts)
        try:  # an explicit parameter is honoured or refused, never ignored
            check_common(cls._kind.name.lower(), seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            seg.close()
            raise
        return seg

    @classmethod
    def create(cls, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """Create it by name; :class:`ExistsError` if the name is taken."""
        return cast(Any, cls)(name, *args, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> Any:
        """Open it by name; :class:`NotFoundError` if there is none."""
        return cast(Any, cls)(name, create=False, **kwargs)

    @property
    def name(self) -> str:
        return self._seg.name

    @property
    def closed(self) -> bool:
        """True once this handle was closed (for one placed with ``at()``:
        once the segment holding it was)."""
        seg = getattr(self, "_seg", None)
        return seg is None or seg.closed

    def close(self) -> None:
        """Close this handle (and its segment if it has one of its own)."""
        if self._own_segment:
            self._seg.close()

    def unlink(self) -> None:
        """Remove the name (only for objects opened by name)."""
        self._seg.unlink()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._own_segment:
            return (_open_named, (type(self), self._seg))
        return (cast(Any, type(self)).at, (self._seg, self._offset))


def _segment_lock(seg: Segment) -> "Mutex":
    return cast("Mutex", seg.lock)


def _open_named(cls: type[_Placed], seg: Segment) -> Any:
    obj: Any = cls.__new__(cls)
    obj._adopt(seg)
    return obj


class Mutex(_core.Lock, _Placed):
    """A crash-robust mutual-exclusion lock shared by name.

    ``acquire(blocking=True, timeout=None)`` and ``release()`` behave like
    :class:`threading.Lock` (any thread of the holding process may release);
    ``with mutex:`` holds it for the block.

    Parameters: as for :class:`shmkit.Segment` (``name``, ``path``,
    ``lifetime``, ``mode``...); created if missing, opened if present.

    Example
    -------
    >>> m = Mutex(None)
    >>> m.acquire(timeout=1.0)
    True
    >>> m.locked(), m.recovered
    (True, False)
    >>> m.release(); m.close(); m.unlink()
    """

    _kind = Kind.MUTEX

    def __init__(self, name: str | None = None, *, create: bool | None = None,
                 **kwargs: Unpack[SyncOptions]) -> None:
        self._adopt(self._named_segment(name, create, {}, None, kwargs))

    def _adopt(self, seg: Segment) -> None:
        self._own_segment = True
        self._place(seg, 0)
        super().__init__(self._m, self._base, f"mutex {seg.name!r}")

    @classmethod
    def at(cls, segment: Segment, offset: int) -> "Mutex":
        """The mutex stored at ``offset`` of ``segment``'s payload (4 bytes, zeroed = free)."""
        return cls._embedded(segment, offset, f"mutex at {offset} of {segment.name!r}")

    @classmethod
    def _embedded(cls, segment: Segment, offset: int, what: str,
                  absolute: bool = False) -> "Mutex":
        obj = cls.__new__(cls)
        obj._place(segment, offset)
        if absolute:
            obj._base = offset
            obj._in_header = True
        _core.Lock.__init__(obj, obj._m, obj._base, what)
        return obj

    _in_header = False

    def __reduce__(self) -> tuple[Any, ...]:
        if self._in_header:  # a segment's own lock (header offset, not payload)
            return (_segment_lock, (self._seg,))
        return super().__reduce__()

    def acquire_nowait(self) -> None:
        """Take the lock if it is free, else raise :class:`WouldBlock`."""
        if not self.acquire(False):
            raise WouldBlock(f"{self.name!r} is held")

    def held(self, timeout: float | None = None) -> ContextManager["Mutex"]:
        """``with m.held(timeout=1.0):`` holds the lock, or raises :class:`Timeout`.

        Taken and let go in the core (``_core.hold``): a Ctrl-C never lands
        between the hold and the block."""
        return _core.hold(_core.Lock.acquire, (self, True, timeout), _core.Lock.release,
                          (self,), lambda: self._held_timeout(timeout), self)

    def _held_timeout(self, timeout: float | None) -> Timeout:
        return _timed_out(f"could not take mutex {self.name!r} within "
                          f"{_core.shown_seconds(timeout)} s: it is "
                          f"held by {self._holder_phrase()}; try again, or resume or end "
                          "that process")

    def _holder_phrase(self) -> str:
        """Who holds it, for a Timeout's message: "pid N", "pid N, which is
        stopped (...)" or "another process"."""
        try:
            return _core.holder_phrase(self._m, self.owner_token)
        except ShmkitError:  # closed meanwhile by another thread: the Timeout stands
            return "another process"

    def holder_pid(self) -> int | None:
        """The pid of the live holder, or None when free (or its holder died)."""
        return self._seg.owner_pid(self.owner_token)

    def statistics(self) -> dict[str, Any]:
        """``{"locked", "holder_pid", "waiters", "recovered"}`` for this lock."""
        return {"locked": self.locked(), "holder_pid": self.holder_pid(),
                "waiters": self.has_waiters, "recovered": self.recovered}

    def __repr__(self) -> str:  # (never raises: logging, tracebacks and debuggers call it)
        if self.closed:
            return f"<shmkit.Mutex {self.name!r} closed>"
        return f"<shmkit.Mutex {self.name!r} locked={self.locked()}>"


class Event(_Placed):
    """A cross-process event: ``set()``, ``clear()``, ``wait(timeout)``, ``is_set()``.

    With ``auto_reset=True`` each ``set()`` releases exactly one waiter and the
    flag clears itself (a Win32 auto-reset event); otherwise it stays set
    until ``clear()`` (like :class:`threading.Event`).  Opening an existing
    event, leave ``auto_reset`` out to adopt its kind; passing a different
    one raises :class:`MismatchError`.

    ``with Event(name) as e:`` closes the handle at the end of the block
    (an event has nothing to hold, so ``with`` means what it means for a
    Channel, not for a Mutex).

    Example
    -------
    >>> e = Event(None)
    >>> e.set(); e.wait(timeout=0.1)
    True
    >>> e.close(); e.unlink()
    >>> with Event(None) as e:
    ...     e.set(); e.is_set()
    True
    """

    _kind = Kind.EVENT

    def __enter__(self) -> "Event":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __init__(self, name: str | None = None, *, auto_reset: bool | None = None,
                 create: bool | None = None, **kwargs: Unpack[SyncOptions]) -> None:
        if auto_reset is not None and not isinstance(auto_reset, bool):
            # ("no" would be true: an auto-reset event nobody asked for)
            raise TypeError(f"auto_reset must be True, False or None (adopt the existing "
                            f"event's), not {auto_reset!r}")
        seg = self._named_segment(name, create, {"auto_reset": bool(auto_reset)}, None,
                                  kwargs)
        _check_param(seg, "event", "auto_reset",
                     None if auto_reset is None else bool(auto_reset),
                     _layout_field(seg, "event", "auto_reset", bool, False))
        self._adopt(seg)

    def _adopt(self, seg: Segment) -> None:
        self._own_segment = True
        self._place(seg, 0)
        self._auto: bool = _layout_field(seg, "event", "auto_reset", bool, False)

    @classmethod
    def at(cls, segment: Segment, offset: int, auto_reset: bool = False) -> "Event":
        """The event stored at ``offset`` of ``segment``'s payload (4 bytes)."""
        obj = cls.__new__(cls)
        obj._place(segment, offset)
        obj._auto = auto_reset
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        if self._own_segment:
            return super().__reduce__()
        return (type(self).at, (self._seg, self._offset, self._auto))

    @property
    def auto_reset(self) -> bool:
        return self._auto

    def set(self) -> None:
        """Set the flag and wake the waiters (one waiter if auto-reset)."""
        _core.event_set(self._m, self._base, self._auto)

    def clear(self) -> None:
        _core.event_clear(self._m, self._base)

    def is_set(self) -> bool:
        return bool(_core.load32(self._m, self._base) & 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set; False if ``timeout`` seconds pass first."""
        return _core.event_wait(self._m, self._base, timeout, self._auto,
                                f"event {self._seg.name!r}")

    def statistics(self) -> dict[str, Any]:
        word = _core.load32(self._m, self._base)
        return {"set": bool(word & 1), "waiters": word >> 1, "auto_reset": self._auto}


class RWLock(_core.RWLock, _Placed):
    """A writer-preferring reader/writer lock shared by name.

    Any number of readers, or one writer.  A waiting writer stops new readers
    from entering.  Readers are counted per attached process, so a reader
    that dies never blocks writers: its holds are dropped and the writer gets
    ``.recovered`` (and an :class:`OwnerDiedWarning`).  A writer that dies is
    recovered through its robust mutex.  ``acquire_read``/``acquire_write``
    and the releases run wholly in the compiled core (``_core/rwlock.c``):
    Ctrl-C while waiting undoes the call, never leaving a hold behind.

    Example
    -------
    >>> rw = RWLock(None)
    >>> with rw.read(): pass
    >>> with rw.write(timeout=1.0): pass
    >>> rw.acquire_write(timeout=1.0)
    True
    >>> rw.release_write(); rw.close(); rw.unlink()
    """

    _kind = Kind.RWLOCK

    def __init__(self, name: str | None = None, *, create: bool | None = None,
                 **kwargs: Unpack[SyncOptions]) -> None:
        self._adopt(self._named_segment(name, create, {}, None, kwargs))

    @classmethod
    def _footprint(cls, max_slots: int) -> int:
        return 64 + 8 * max_slots

    def _adopt(self, seg: Segment) -> None:
        self._own_segment = True
        self._setup(seg, 0)

    def _setup(self, seg: Segment, offset: int) -> None:
        self._place(seg, offset)
        self._wlock = Mutex._embedded(seg, offset, f"write lock of {seg.name!r}")
        _core.RWLock.__init__(self, self._m, self._base, f"rwlock {seg.name!r}")

    @classmethod
    def at(cls, segment: Segment, offset: int) -> "RWLock":
        """The lock stored at ``offset`` (``64 + 8 * max_attach`` zeroed bytes, 8-aligned)."""
        obj = cls.__new__(cls)
        obj._setup(segment, offset)
        return obj

    def _entry(self, slot: int) -> int:
        return self._base + 64 + 8 * slot

    # Both holds are taken and let go in the core (_core.hold): a Ctrl-C
    # never lands between the hold and the block.
    def read(self, timeout: float | None = None) -> ContextManager[None]:
        """``with rw.read():`` a read hold for the block; :class:`Timeout` if not in time."""
        return _core.hold(_core.RWLock.acquire_read, (self, timeout), _core.RWLock.release_read,
                          (self,), lambda: self._hold_timeout("read", timeout), None)

    def write(self, timeout: float | None = None) -> ContextManager[None]:
        """``with rw.write():`` the write hold for the block; :class:`Timeout` if not in time."""
        return _core.hold(_core.RWLock.acquire_write, (self, timeout),
                          _core.RWLock.release_write, (self,),
                          lambda: self._hold_timeout("write", timeout), None)

    def _hold_timeout(self, how: str, timeout: float | None) -> Timeout:
        return _timed_out(f"could not {how}-lock {self.name!r} within "
                          f"{_core.shown_seconds(timeout)} s")

    def statistics(self) -> dict[str, Any]:
        m = self._m
        readers: dict[int, int] = {}
        for slot, _off, v, count, alive in _slot_counts(m, self._entry(0)):
            if alive:
                token = ((v >> 32) & _GEN_MASK) << 10 | slot
                pid = self._seg.owner_pid(token) or os.getpid()
                readers[pid] = readers.get(pid, 0) + count
        return {"writer_pid": self._wlock.holder_pid(), "readers": readers,
                "writer_waiting_or_in": bool(_core.load32(m, self._base + 4) & 1)}


class Semaphore(_core.Semaphore, _Placed):
    """A counting semaphore shared by name; counts held by dead processes return.

    ``acquire(blocking=True, timeout=None)`` takes one unit, ``release(n=1)``
    gives units back.  Each process's holds are recorded in its attach slot,
    so when a process dies its units go back to the pool.  With ``maximum=``
    set, releasing beyond it raises ``ValueError`` (a bounded semaphore).
    The whole protocol runs in the compiled core (``_core/semaphore.c``):
    Ctrl-C or a kill at any point leaves value and holds consistent.

    Parameters: ``value`` (units free at creation: 1 by default, 0 when
    ``maximum=0``) and ``maximum``; when the
    semaphore exists already, leave them out to adopt what it has, or pass
    them to insist (a different stored value raises :class:`MismatchError`).

    Example
    -------
    >>> s = Semaphore(None, value=2)
    >>> s.acquire(), s.acquire(), s.acquire(timeout=0)
    (True, True, False)
    >>> s.release(); s.value
    1
    >>> s.close(); s.unlink()
    """

    _kind = Kind.SEMAPHORE
    _FORMAT = 2  # version of the payload layout above

    def __init__(self, name: str | None = None, value: int | None = None, *,
                 maximum: int | None = None, create: bool | None = None,
                 **kwargs: Unpack[SyncOptions]) -> None:
        # one unit at creation, or none where the maximum allows none
        initial = value if value is not None else 0 if maximum == 0 else 1
        if (not _whole(initial) or not 0 <= initial < 2**31
                or (maximum is not None
                    and not (_whole(maximum) and initial <= maximum < 2**31))):
            raise ValueError(f"Semaphore: need 0 <= value <= maximum < 2**31, got "
                             f"value={value!r} maximum={maximum!r}")

        def init(seg: Segment) -> None:
            _core.sem_format(seg._mapping, seg._hsize, initial,
                             -1 if maximum is None else maximum)

        seg = self._named_segment(name, create, {"format": self._FORMAT, "value": initial,
                                                 "maximum": maximum}, init, kwargs)
        _check_format(seg, "semaphore", self._FORMAT)
        _check_param(seg, "semaphore", "value", value,
                     _layout_field(seg, "semaphore", "value", int))
        self._adopt(seg)
        # the maximum the semaphore keeps and enforces, not the layout's copy
        _check_param(seg, "semaphore", "maximum", maximum, self.maximum)

    @classmethod
    def _footprint(cls, max_slots: int) -> int:
        return _core.sem_footprint(max_slots)

    def _adopt(self, seg: Segment) -> None:
        self._own_segment = True
        self._setup(seg, 0)

    def _setup(self, seg: Segment, offset: int) -> None:
        self._place(seg, offset)
        _core.Semaphore.__init__(self, self._m, self._base, f"semaphore {seg.name!r}")

    @classmethod
    def at(cls, segment: Segment, offset: int, value: int | None = None,
           maximum: int | None = None) -> "Semaphore":
        """The semaphore at ``offset`` (``128 + 8 * max_attach`` bytes, 8-aligned).

        ``value`` (and ``maximum``) lay it out afresh: pass them once, from
        the process that places it, before anyone uses it.
        """
        obj = cls.__new__(cls)
        obj._place(segment, offset)
        if value is not None:
            _core.sem_format(obj._m, obj._base, value, -1 if maximum is None else maximum)
        _core.Semaphore.__init__(obj, obj._m, obj._base,
                                 f"semaphore at {offset} of {segment.name!r}")
        return obj

    def acquire_nowait(self) -> None:
        """Take a unit now or raise :class:`WouldBlock`."""
        if not self.acquire(False):
            raise WouldBlock(f"semaphore {self.name!r} has no free unit")

    def statistics(self) -> dict[str, Any]:
        """``{"value", "waiters"}``: units free now, waiters that may be asleep."""
        return {"value": self.value, "waiters": self.waiters}

    def __repr__(self) -> str:  # (never raises, as Mutex's)
        if self.closed:
            return f"<shmkit.Semaphore {self.name!r} closed>"
        return f"<shmkit.Semaphore {self.name!r} value={self.value}>"


def _check_format(seg: Segment, what: str, expected: int) -> None:
    fmt = seg._layout.get("format")
    if fmt != expected:
        seg.close()
        raise FormatVersionError(
            f"{what} {seg.name!r} has layout format {fmt}; this shmkit reads format "
            f"{expected}. Use the shmkit that made it, or remove it with `shmkit rm`")


_MISSING = object()


def _whole(n: object) -> bool:
    """An int that is not a bool (True is no count of units)."""
    return isinstance(n, int) and not isinstance(n, bool)


def _layout_field(seg: Segment, what: str, key: str, kind: type, default: Any = _MISSING
                  ) -> Any:
    """The layout's ``key``, which shmkit writes as a ``kind`` (a bool, or an
    int that is not one): anything else is damage, refused rather than read
    as something the creator never asked for (``bool("no")`` is True).  A
    key left out reads as ``default``, or is damage when there is none."""
    why = _field_problem(seg._layout, key, kind, default)
    if why is not None:
        seg.close()
        raise CorruptError(f"{what} {seg.name!r} {why}: it is damaged; remove it with "
                           "`shmkit rm` and create it again")
    return seg._layout.get(key, default)


def _field_problem(layout: dict[str, Any], key: str, kind: type, default: Any) -> str | None:
    value = layout.get(key, _MISSING)
    if type(value) is kind or (value is _MISSING and default is not _MISSING):
        return None
    found = "no " + key if value is _MISSING else f"{key}={value!r}"
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    return f"has {found} in its layout, where shmkit writes {article} {kind.__name__}"


#: The layout fields each kind reads as it opens: (key, type, default when
#: left out; _MISSING: required).
_LAYOUT_FIELDS: dict[str, tuple[tuple[str, type, Any], ...]] = {
    "event": (("auto_reset", bool, False),),
    "semaphore": (("value", int, _MISSING),),
}


def layout_problem(kind: str, layout: dict[str, Any]) -> str | None:
    """Why an open of a ``kind`` ("event", "semaphore") would refuse this
    layout as damaged, or None: what ``shmkit ls`` shows for it."""
    for key, type_, default in _LAYOUT_FIELDS.get(kind, ()):
        why = _field_problem(layout, key, type_, default)
        if why is not None:
            return why
    return None


def _check_param(seg: Segment, what: str, param: str, given: Any, stored: Any) -> None:
    """An explicitly given parameter must match the existing object's."""
    if given is not None and given != stored:
        seg.close()
        raise MismatchError(
            f"{what} {seg.name!r} exists with {param}={stored!r}, not the {param}={given!r} "
            f"asked for; leave {param} out to adopt the existing one, or remove it with "
            "`shmkit rm`")


class Condition(_core.Lock, _Placed):
    """A condition variable with its own robust mutex, shared by name.

    Use it as :class:`threading.Condition`: hold it (``with cond:``), then
    ``wait(timeout)`` / ``wait_for(predicate, timeout)`` or ``notify(n)`` /
    ``notify_all()``.

    Example
    -------
    >>> c = Condition(None)
    >>> with c:
    ...     c.notify_all()
    ...     c.wait(timeout=0.01)
    False
    >>> c.close(); c.unlink()
    """

    _kind = Kind.CONDITION

    _FORMAT = 2  # version of the payload layout above

    def __init__(self, name: str | None = None, *, create: bool | None = None,
                 **kwargs: Unpack[SyncOptions]) -> None:
        self._adopt(self._named_segment(name, create, {"format": self._FORMAT}, None,
                                        kwargs))

    @classmethod
    def _footprint(cls, max_slots: int) -> int:
        return _core.cond_footprint(max_slots)

    def _adopt(self, seg: Segment) -> None:
        _check_format(seg, "condition", self._FORMAT)
        self._own_segment = True
        self._setup(seg, 0)

    def _setup(self, seg: Segment, offset: int) -> None:
        self._place(seg, offset)
        self._what = f"condition {seg.name!r}"
        self.lock = Mutex._embedded(seg, offset, self._what)
        # The condition is its lock too (the word at its offset): acquire,
        # release and `with cond:` are the core's, so a Ctrl-C never lands
        # between taking the lock and the block.
        _core.Lock.__init__(self, self._m, self._base, self._what)

    @classmethod
    def at(cls, segment: Segment, offset: int) -> "Condition":
        """The condition at ``offset`` of the payload (``64 + 8 * max_attach`` zeroed bytes)."""
        obj = cls.__new__(cls)
        obj._setup(segment, offset)
        return obj

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, sleep until notified, re-take it; False on timeout.

        ``notify(n)`` grants n wake-ups to the processes already waiting;
        each wait takes at most one, so no more than n waits return True.
        It returns or raises holding the lock again; Ctrl-C while another
        thread of this process holds it raises once this thread has it
        back (a holder in another process lets it through at once).
        Raises :class:`ClosedError` if another thread closes the handle.
        """
        return _core.cond_wait(self._m, self._base, timeout, self._what)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true; returns its last value."""
        deadline = _deadline(timeout)
        result = predicate()
        while not result:
            if _expired(deadline):
                break
            self.wait(None if deadline is None else deadline - time.monotonic())
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters; the caller must hold the condition.

        Waiters of processes that died are counted out first: a wake-up is
        only granted to a live waiter.
        """
        _core.cond_notify(self._m, self._base, n, self._what)

    def notify_all(self) -> None:
        self.notify(_ALL)

    def statistics(self) -> dict[str, Any]:
        return {"waiters": _core.cond_sleepers(self._m, self._base),
                "holder_pid": self.lock.holder_pid()}
