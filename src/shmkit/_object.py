"""What every shared structure offers, whatever it holds.

A structure (``Struct``, ``Array``, ``Channel``, ``Queue``, ``Store``,
``Heap``) *holds* its segment, as the stdlib's ``ShareableList`` holds its
``SharedMemory``, and exposes only what keeps it whole: ``name``, ``path``,
``created``, ``closed``, ``readonly``, ``info()``, ``attachments()``,
``statistics()``, ``close()``, ``unlink()``, ``with``, and pickling for
child processes.  The segment's own ``resize``, ``buf`` and ``write`` stay
private: through them one process could break the structure for all.

Pickling to a child that ``multiprocessing`` is starting hands the child the
open file (``multiprocessing.reduction.DupFd``, the way it hands over
pipes), so the child reaches the object even if the parent has closed it,
or exited, before the child runs.  Pickled any other way, an object travels
by name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypedDict

from . import _core
from .errors import ClosedError
from .segment import Closing, Kind, Segment, SegmentInfo, mismatch

__all__ = ["SharedObject", "DEFAULT", "mismatch", "attach_segment"]


class _Default:
    """Marks a parameter the caller did not give (``None`` may be a real value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"

    def __reduce__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def given(value: Any) -> bool:
    """True when the caller passed the parameter explicitly."""
    return value is not DEFAULT


def attach_segment(kind: Kind, name: str | None, path: Any, *, size: int | None,
                   create: bool | None, layout: dict[str, Any] | None = None,
                   init: Callable[[Segment], None] | None = None, mode: int | None = None,
                   **kwargs: Any) -> Segment:
    """Create or open the segment a structure will hold.  An explicit ``mode``
    (None: not given, 0o600 when creating) that an existing one lacks is
    refused, as by :class:`Segment`."""
    seg = Segment.__new__(Segment)
    seg._attach(name, path, size=size, create=create, kind=kind, layout=layout, init=init,
                mode=0o600 if mode is None else mode, **kwargs)
    if mode is not None and not seg.created:
        error = seg._disagreement(kind.name.lower(), mode=mode)
        if error is not None:
            seg.close()
            raise error
    return seg


class SegmentOptions(TypedDict, total=False):
    """What a structure with few options of its own (an array, a record)
    takes for its segment, as :class:`Segment` does."""

    path: str | os.PathLike[str] | None
    readonly: bool
    mode: int | None
    lifetime: str | None
    max_attach: int | None
    trust_owner: int | str | None


class SyncOptions(SegmentOptions, total=False):
    """What a lock, an event, a semaphore or a condition takes for its segment."""

    on_destroy: Callable[[], Any] | None


def segment_options(owner: str, kwargs: Mapping[str, object],
                    allowed: type = SegmentOptions) -> dict[str, Any]:
    """``kwargs`` less those given as None (each option's "not given") if each
    is a key of ``allowed`` (a TypedDict), else the TypeError Python gives for
    an unexpected keyword, naming those it takes."""
    for key in kwargs:
        if key not in allowed.__annotations__:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}; it takes "
                            f"{', '.join(allowed.__annotations__)}")
    return {key: value for key, value in kwargs.items() if value is not None}


def check_common(what: str, seg: Segment, *, lifetime: Any = DEFAULT,
                 max_attach: Any = DEFAULT) -> None:
    """Refuse an explicit ``lifetime`` or ``max_attach`` the existing object
    lacks (its ``mode``: :func:`attach_segment`)."""
    if seg.created or (lifetime is DEFAULT and max_attach is DEFAULT):
        return
    error = seg._disagreement(what, lifetime=None if lifetime is DEFAULT else lifetime,
                              max_attach=None if max_attach is DEFAULT else max_attach)
    if error is not None:
        raise error


class SharedObject(Closing):
    """The handle side of every structure: it holds a private segment.

    Subclasses set ``_seg`` (or a ``_seg`` property), ``_what`` (a word for
    messages), and implement ``_adopt(seg, **state)`` (bind to an attached
    segment, checking what was asked) and ``_state()`` (what a child needs
    besides the segment to rebuild the handle).
    """

    _seg: Segment | None = None
    _what = "object"
    _on_destroy: Callable[[], Any] | None = None

    # -- the segment, privately ---------------------------------------------

    def _held(self) -> Segment:
        seg = self._seg
        if seg is None or seg.closed:
            raise ClosedError(f"{self._what} {self.name!r} is closed in this process; "
                              "open it again")
        return seg

    def _adopt(self, seg: Segment, **state: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {}

    # -- what every structure offers -----------------------------------------

    @property
    def name(self) -> str:
        """The name other processes open it by (a generated one if made with ``None``)."""
        seg = self._seg
        return seg.name if seg is not None else ""

    @property
    def path(self) -> str:
        """The file that holds it."""
        seg = self._seg
        return seg.path if seg is not None else ""

    @property
    def created(self) -> bool:
        """True only in the process whose call created it."""
        seg = self._seg
        return seg is not None and seg.created

    @property
    def closed(self) -> bool:
        """True once this handle was closed."""
        seg = self._seg
        return seg is None or seg.closed

    @property
    def readonly(self) -> bool:
        """True if this handle was opened with ``readonly=True``."""
        seg = self._seg
        return seg is not None and seg.readonly

    def attachments(self) -> list[dict[str, Any]]:
        """The live handles: ``[{"slot", "pid", "attached", "comm"}]``."""
        return self._held().attachments()

    def info(self) -> SegmentInfo:
        """What ``shmkit info`` shows: the header facts, attachments and own detail."""
        info = self._held().info()
        info.update(self._describe())
        return info

    def _describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release this handle; the object stays for the other processes.

        An object made with ``lifetime="attached"`` is removed by the last
        handle to close (and its ``on_destroy`` runs there).  Safe to call
        twice.
        """
        seg = self._seg
        if seg is None:
            return
        if seg.closed:
            # A close that a Ctrl-C stopped after the name went: the hook
            # still runs, once (nothing else happens for a closed handle).
            seg.close()
            self._after_close(seg)
            return
        self._release()
        try:
            seg.close()
            self._segment_closed()
        finally:  # an interrupt in close() must not skip on_destroy
            self._after_close(seg)

    def _release(self) -> None:
        """Let go of what the structure built over the mapping (before unmapping)."""

    def _segment_closed(self) -> None:
        """What the structure does once its segment is closed in this process."""

    def _after_close(self, seg: Segment) -> None:
        if seg._removed:
            self._destroyed()

    def unlink(self) -> None:
        """Remove the name now; processes that opened it keep using it.

        Works on a closed handle too.  Runs ``on_destroy`` in this process.
        Raises :class:`NotFoundError` if the name is already gone.
        """
        seg = self._seg
        if seg is None:
            raise ClosedError(f"this {self._what} handle was never opened")
        seg.unlink()
        self._destroyed()

    def _destroyed(self) -> None:
        # taken and called in one step of the core: closes racing here run it
        # once, and no Ctrl-C falls between taking it and calling it
        _core.pop_and_call(self.__dict__, "_on_destroy")

    def __reduce__(self) -> tuple[Any, ...]:
        seg = self._held()
        dup = None
        from multiprocessing import context, reduction

        if context.get_spawning_popen() is not None:
            # Being sent to a child that is starting: hand it the open file.
            dup = reduction.DupFd(seg._fd)
        return (_rebuild, (type(self), seg.name, seg.path, seg.readonly, int(seg.kind),
                           dup, self._state()))


def _rebuild(cls: type[SharedObject], name: str, path: str, readonly: bool, kind: int, dup: Any,
             state: dict[str, Any]) -> Any:
    """Unpickle a structure: through the handed-over file if any, else by name."""
    seg = None
    if dup is not None:
        try:
            seg = Segment._from_fd(dup.detach(), name, path, kind=Kind(kind),
                                   readonly=readonly)
        except FileNotFoundError:  # no /proc: fall back to the name
            seg = None
    if seg is None:
        seg = attach_segment(Kind(kind), name, path, size=None, create=False,
                             readonly=readonly)
    obj: Any = cls.__new__(cls)
    obj._adopt(seg, **state)
    return obj


class Lock:
    """A structure's crash-robust lock, without a way to the segment it lives in.

    ``with rec.lock:`` holds it; ``acquire(blocking=True, timeout=None)``,
    ``acquire_nowait()``, ``release()``, ``locked()``, ``held(timeout)``,
    ``recovered`` and ``holder_pid()`` work as on :class:`shmkit.Mutex`.
    """

    __slots__ = ("_mutex",)

    def __init__(self, mutex: Any) -> None:
        self._mutex = mutex

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False if ``timeout`` passed or ``blocking`` is false and it is held."""
        return bool(self._mutex.acquire(blocking, timeout))

    def acquire_nowait(self) -> None:
        """Take the lock if it is free, else raise :class:`WouldBlock`."""
        self._mutex.acquire_nowait()

    def release(self) -> None:
        self._mutex.release()

    def locked(self) -> bool:
        return bool(self._mutex.locked())

    @property
    def recovered(self) -> bool:
        """True while held after taking it over from a holder that died."""
        return bool(self._mutex.recovered)

    def holder_pid(self) -> int | None:
        """The pid of the live holder, or None."""
        pid: int | None = self._mutex.holder_pid()
        return pid

    @contextmanager
    def held(self, timeout: float | None = None) -> Iterator["Lock"]:
        """``with rec.lock.held(timeout=1.0):`` holds it, or raises :class:`Timeout`."""
        with self._mutex.held(timeout):
            yield self

    def __enter__(self) -> "Lock":
        self._mutex.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mutex.__exit__(*exc)

    def __repr__(self) -> str:
        return f"<shmkit lock held={self.locked()}>"
