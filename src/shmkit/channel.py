"""Message channels between processes, and a drop-in ``multiprocessing.Queue``.

A :class:`Channel` is a ring of variable-size byte messages in a named
segment.  Any number of unrelated processes open it by name, send and
receive; every message is delivered exactly once and each producer's
messages arrive in the order it sent them::

    import shmkit
    ch = shmkit.Channel("logs", capacity=8 << 20)   # create or open
    ch.send(b"record", timeout=1.0)                  # blocks while full
    msg = ch.recv(timeout=1.0)                       # blocks while empty
    ch.send_many([b"a", b"b"]); ch.recv_many(max_n=1024, timeout=0.1)
    for msg in ch:                                   # ends after ch.close()
        ...                                          # once drained

Large messages need not be copied out: ``with ch.recv_view() as mv:`` lends
the message in place, and ``send`` takes any buffer (a numpy array) as is.

:class:`Queue` carries Python objects (pickled, as ``multiprocessing``
does) with the ``multiprocessing.Queue`` interface.

The hot path is C (``_core/ring.c``); the protocol, the crash analysis and
the waiting strategy are described in docs/channel.md.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterator

from . import _core
from .errors import (
    ChannelClosed,
    Empty,
    FormatVersionError,
    Full,
    MessageTooLarge,
    NotFoundError,
    Timeout,
)
from .segment import DEFAULT_MAX_ATTACH, Kind, Segment, SegmentInfo

__all__ = ["Channel", "Queue"]

_core.ring_set_classes(ChannelClosed, MessageTooLarge, Empty, Full)

FORMAT = _core.RING_FORMAT
DEFAULT_CAPACITY = 1 << 20
QUEUE_CAPACITY = 8 << 20
_ROLES_OFF = _core.layouts["ring"]["roles"]  # ring header size: see _core/ring.h


def _ring_bytes(capacity: int, max_attach: int) -> int:
    return (_ROLES_OFF + 8 * max_attach + 63) // 64 * 64 + capacity


def _check_capacity(capacity: Any) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 64:
        raise ValueError(f"capacity must be an int of at least 64 bytes, not {capacity!r}")
    if capacity > 1 << 46:
        raise ValueError(f"capacity {capacity} is beyond the 64 TiB a ring can address")
    return (capacity + 63) // 64 * 64


class Channel(_core.Ring):
    """A channel of byte messages shared by name.

    ``Channel(name, capacity=n)`` opens ``name`` if it exists and creates it
    with ``n`` bytes of ring otherwise (``create=True`` / ``False`` insist).
    A message takes its length rounded up to 8, plus 8 bytes; the largest
    message is ``capacity - 8`` bytes (``max_message``).

    Sending: ``send(data, timeout=None)`` (blocks while full),
    ``send_nowait(data)`` (raises :class:`Full`), ``send_many(msgs)``.
    ``data`` is any bytes-like object: bytes, bytearray, memoryview, a
    C-contiguous numpy array; it is copied in once, never pickled.

    Receiving: ``recv(timeout=None)`` -> bytes (raises :class:`Timeout`),
    ``recv_nowait()`` (raises :class:`Empty`), ``recv_many(max_n, timeout)``
    -> list, ``recv_into(buffer)``, ``recv_view()`` (zero copy),
    ``recv_array()``, and iteration.

    Ending: ``close()`` closes the channel for sending, for every process:
    sends raise :class:`ChannelClosed`, receivers get the messages already
    sent and then :class:`ChannelClosed` (iteration simply stops).
    ``detach()`` (and leaving a ``with`` block) only lets go of this handle.

    Every blocking call releases the GIL, lets Ctrl-C through, and survives
    peers killed at any point: a message whose sender died half-way is
    dropped, nothing else is lost or repeated.  One handle may be used from
    many threads.  A handle pickles by name (pass it to child processes).

    Parameters
    ----------
    name:
        The channel's name (``None``: a unique one, removed when the last
        process detaches).
    capacity:
        Ring bytes when creating (rounded up to 64; default 1 MiB).
    create:
        ``None`` create or open, ``True`` only create, ``False`` only open.
    path, lifetime, mode, max_attach:
        As for :class:`shmkit.Segment`.
    readonly:
        Open an existing channel only to look at it (``statistics()``,
        ``info()``); sending and receiving raise PermissionError.

    Raises
    ------
    WrongKindError (the name holds something else), FormatVersionError,
    CorruptError, and the other :class:`Segment` errors.

    Example
    -------
    >>> with Channel(None, capacity=4096) as ch:
    ...     ch.send(b"hello"); ch.send_many([b"a", b"b"])
    ...     ch.recv(timeout=1.0), ch.recv_many(max_n=10)
    2
    (b'hello', [b'a', b'b'])
    """

    _kind = Kind.CHANNEL
    _seg: Segment | None = None
    _path: str | None = None  # kept after detach(), so unlink() still works

    def __init__(self, name: str | None = None, capacity: int = DEFAULT_CAPACITY, *,
                 create: bool | None = None, path: str | os.PathLike[str] | None = None,
                 lifetime: str | None = None, mode: int = 0o600,
                 max_attach: int = DEFAULT_MAX_ATTACH, readonly: bool = False) -> None:
        self._open(name, capacity, create, path, lifetime, mode, max_attach, 0, readonly)

    def _open(self, name: str | None, capacity: int, create: bool | None, path: Any,
              lifetime: str | None, mode: int, max_attach: int, max_items: int,
              readonly: bool = False) -> None:
        cap = _check_capacity(capacity)
        if lifetime is None:
            lifetime = "attached" if name is None and path is None else "persistent"

        def init(seg: Segment) -> None:
            _core.Ring._init_ring(seg._mapping, seg._hsize, cap, max_items)

        seg = Segment.__new__(Segment)
        seg._attach(name, path, size=_ring_bytes(cap, max_attach)
                    if create is not False and not readonly else None,
                    create=False if readonly else create, kind=self._kind, mode=mode,
                    readonly=readonly,
                    lifetime=lifetime, max_attach=max_attach, init=init,
                    layout={"format": FORMAT, "capacity": cap, "max_items": max_items})
        try:
            fmt = seg.layout.get("format")
            if fmt != FORMAT:
                raise FormatVersionError(
                    f"{self._kind.name.lower()} {seg.name!r} has ring format {fmt}; this "
                    f"shmkit reads format {FORMAT}. Use the shmkit that made it, or "
                    "remove it with `shmkit rm` and create it again")
            self._bind(seg._mapping, seg._hsize, seg.name)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self._path = seg.path

    @classmethod
    def create(cls, name: str | None = None, capacity: int = DEFAULT_CAPACITY,
               **kwargs: Any) -> "Channel":
        """Create a channel; :class:`ExistsError` if the name is taken."""
        return cls(name, capacity, create=True, **kwargs)

    @classmethod
    def open(cls, name: str, **kwargs: Any) -> "Channel":
        """Open an existing channel; :class:`NotFoundError` if there is none.

        ``Channel.open(name, readonly=True)`` only looks (what ``shmkit info`` needs).
        """
        return cls(name, create=False, **kwargs)

    # -- receiving in place --------------------------------------------------

    def recv_view(self, timeout: float | None = None) -> Any:
        """Take the next message without copying it: a context manager
        whose ``with`` value is a read-only memoryview of the message in
        shared memory, valid inside the block.

        The message's space is not reused until the block ends (or
        ``.release()`` is called); views may be released in any order.
        Arrays made from the view must be gone when the block ends (copy
        what you keep).  Raises like :meth:`recv`.

        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(b"big payload")
        ...     with ch.recv_view(timeout=1.0) as mv:
        ...         bytes(mv[:3])
        b'big'
        """
        return self._take(timeout)

    def recv_view_nowait(self) -> Any:
        """:meth:`recv_view`, raising :class:`Empty` instead of waiting."""
        return self._take(None, True)

    def recv_array(self, dtype: Any = "uint8", shape: Any = None, *,
                   timeout: float | None = None, out: Any = None) -> Any:
        """Receive a message as a numpy array (one copy, straight from the ring).

        ``out=`` (a writable C-contiguous array) receives the bytes in place
        and must be exactly the message's size.

        >>> import numpy as np
        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(np.arange(4, dtype=np.int32))
        ...     ch.recv_array(np.int32, timeout=1.0).tolist()
        [0, 1, 2, 3]
        """
        import numpy as np

        if out is not None:
            if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
                    and out.flags.writeable):
                raise ValueError("out= must be a writable, C-contiguous numpy array")
            n = self.recv_into(out, timeout)
            if n != out.nbytes:
                raise ValueError(f"the message held {n} bytes but out= has {out.nbytes}; "
                                 "its bytes are at the start of out")
            return out
        with self._take(timeout) as mv:
            src = np.frombuffer(mv, dtype=dtype)
            try:
                result = (src.reshape(shape) if shape is not None else src).copy()
            finally:
                del src
        return result

    # -- iteration and ending --------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return self.recv()
        except ChannelClosed:
            raise StopIteration from None

    def close(self) -> None:
        """Close the channel for sending, for everyone, and detach this handle.

        Later sends (in any process) raise :class:`ChannelClosed`; receivers
        get what was already sent, then :class:`ChannelClosed` (iteration
        ends).  Safe to call twice.
        """
        if self._seg is not None and not self._seg.closed:
            self._close_sending()
        self.detach()

    def detach(self) -> None:
        """Let go of this handle only; the channel stays open for the others.

        Calls blocked on this handle in other threads raise ValueError.  A
        channel made with ``name=None`` is removed when its last handle
        detaches.  Safe to call twice.
        """
        seg = self._seg
        if seg is None:
            return
        self._seg = None
        seg.close()
        self._wake_all()  # threads of ours asleep on it notice the close
        self._unbind()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __del__(self) -> None:
        try:
            self.detach()
        except Exception:
            pass

    def __reduce__(self) -> tuple:
        seg = self._live()
        return (_reopen, (type(self), seg.name, seg.path))

    def unlink(self) -> None:
        """Remove the name now; attached processes keep using the channel.

        Works after ``close()`` or ``detach()`` too; :class:`NotFoundError` if
        the name is already gone.
        """
        if self._seg is not None:
            self._seg.unlink()
            return
        if self._path is None:
            raise ValueError("this channel handle was never opened")
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            raise NotFoundError(f"channel {self._path!r} was already removed") from None

    # -- introspection -----------------------------------------------------

    def _live(self) -> Segment:
        if self._seg is None:
            raise ValueError("this channel handle was closed; open the channel again")
        return self._seg

    @property
    def name(self) -> str:
        return self._live().name

    @property
    def segment(self) -> Segment:
        """The segment holding the ring."""
        return self._live()

    @property
    def created(self) -> bool:
        """True only in the process whose call created the channel."""
        return self._live().created

    @property
    def closed(self) -> bool:
        """True once this handle was closed or detached."""
        return self._seg is None

    def statistics(self) -> dict:
        """Counters and state of the channel, as every process sees them.

        ``{"capacity", "bytes_used", "depth", "sent", "received", "dropped",
        "producers", "consumers", "closed", "receivers_waiting",
        "senders_waiting", "max_items"}``: ``depth`` counts messages waiting;
        ``sent`` counts messages published or being written; ``dropped``
        those abandoned by senders that died while writing them;
        ``producers``/``consumers`` count live handles that have sent/received.
        """
        self._live()
        return self._stats()

    def _describe(self) -> dict:
        s = self._stats()
        keys = ("depth", "capacity", "producers", "consumers", "sent", "received",
                "dropped", "closed", "bytes_used")
        return {self._kind.name.lower(): {k: s[k] for k in keys}}

    def info(self) -> SegmentInfo:
        """What ``shmkit info`` shows: the segment's facts plus the ring's counters."""
        info = self._live().info()
        info.update(self._describe())
        return info

    def __repr__(self) -> str:
        if self._seg is None:
            return f"<shmkit.{type(self).__name__} closed>"
        return (f"<shmkit.{type(self).__name__} {self._seg.name!r} capacity={self.capacity}"
                f" depth={self.depth}>")


def _reopen(cls: type, name: str, path: str) -> Any:
    return cls.open(name, path=path)


class Queue:
    """``multiprocessing.Queue`` over shared memory, for Python objects.

    Same interface: ``put(obj, block=True, timeout=None)``, ``get(block=True,
    timeout=None)``, ``put_nowait``, ``get_nowait``, ``qsize``, ``empty``,
    ``full``, ``close``, ``join_thread``, ``cancel_join_thread``; raises
    :class:`queue.Empty` / :class:`queue.Full` (as :class:`shmkit.Empty` /
    :class:`shmkit.Full`).  Objects are pickled, as multiprocessing does: only
    share a queue with processes you trust, since unpickling runs code.

    Unlike ``multiprocessing.Queue`` there is no feeder thread: ``put``
    returns once the object is in shared memory, and ``get`` works from
    processes that were never its children, by name.  Pass a queue to child
    processes as usual (it pickles by name), or open it elsewhere with
    ``Queue(name="jobs")``.

    Parameters
    ----------
    maxsize:
        At most this many objects queued (0: no limit but ``capacity``).
    name:
        Open or create this name; ``None`` makes a unique one, removed when
        the last process closes it.
    capacity:
        Bytes of ring (default 8 MiB); ``put`` also blocks while the pickled
        objects waiting fill it.

    Example
    -------
    >>> q = Queue()
    >>> q.put({"job": 1}); q.get(timeout=1.0)
    {'job': 1}
    >>> q.close()
    """

    _ch: Channel | None = None
    _closed = True

    def __init__(self, maxsize: int = 0, *, name: str | None = None,
                 capacity: int = QUEUE_CAPACITY, create: bool | None = None,
                 ctx: Any = None, **kwargs: Any) -> None:
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be a non-negative int, not {maxsize!r}")
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._open(name, capacity, create, kwargs.get("path"), kwargs.get("lifetime"),
                 kwargs.get("mode", 0o600), kwargs.get("max_attach", DEFAULT_MAX_ATTACH),
                 maxsize)
        self._adopt(ch)

    @classmethod
    def open(cls, name: str, **kwargs: Any) -> "Queue":
        """Open an existing queue by name; :class:`NotFoundError` if there is none.

        ``Queue.open(name, readonly=True)`` only looks: ``qsize()``, ``info()``.
        """
        q = cls.__new__(cls)
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._open(name, 64, False, kwargs.get("path"), None, 0o600, DEFAULT_MAX_ATTACH, 0,
                 kwargs.get("readonly", False))
        q._adopt(ch)
        return q

    def _adopt(self, ch: Channel) -> None:
        self._ch = ch
        self._closed = False
        self._maxsize = ch.segment.layout.get("max_items", 0)
        self._send, self._send_nowait = ch.send, ch.send_nowait
        self._recv, self._recv_nowait = ch.recv, ch.recv_nowait

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue, waiting while it is full (``queue.Full`` when
        ``block`` is false or ``timeout`` seconds pass)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        if not block:
            self._send_nowait(data)
            return
        try:
            self._send(data, timeout)
        except Timeout:
            raise Full(f"queue {self.name!r} stayed full for {timeout} s") from None

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an object, waiting while the queue is empty
        (``queue.Empty`` when ``block`` is false or ``timeout`` seconds pass)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not block:
            return pickle.loads(self._recv_nowait())
        try:
            return pickle.loads(self._recv(timeout))
        except Timeout:
            raise Empty(f"queue {self.name!r} stayed empty for {timeout} s") from None

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """How many objects are queued (exact at the moment it is read)."""
        return self._live().depth

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    def close(self) -> None:
        """This process will use the queue no more (other processes carry on).

        Objects already put stay in the queue; there is no feeder thread
        to flush.
        """
        if self._ch is not None:
            self._ch.detach()
        self._closed = True

    def join_thread(self) -> None:
        """Nothing to wait for: ``put`` has already placed the object."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel (there is no feeder thread)."""

    def unlink(self) -> None:
        """Remove the name now; processes that opened it carry on."""
        self._live().unlink()

    def statistics(self) -> dict:
        """The channel counters (see :meth:`Channel.statistics`)."""
        return self._live().statistics()

    def _describe(self) -> dict:
        return self._live()._describe()

    def info(self) -> SegmentInfo:
        return self._live().info()

    @property
    def name(self) -> str:
        return self._live().name

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def _live(self) -> Channel:
        if self._closed or self._ch is None:
            raise ValueError(f"Queue {self!r} is closed")
        return self._ch

    def __reduce__(self) -> tuple:
        ch = self._live()
        return (_reopen_queue, (ch.name, ch.segment.path))

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._ch is None or self._closed:
            return "<shmkit.Queue closed>"
        return f"<shmkit.Queue {self._ch.name!r} maxsize={self._maxsize}>"


class _QueueChannel(Channel):
    _kind = Kind.QUEUE


def _reopen_queue(name: str, path: str) -> Queue:
    return Queue.open(name, path=path)
