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
    for msg in ch:                                   # ends once drained after
        ...                                          # ch.close_sending()
    ch.close()                                       # this handle only

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
from typing import Any, Callable, Iterator

from . import _core
from ._object import DEFAULT, SharedObject, attach_segment, check_common, given, mismatch
from .errors import (
    ChannelClosed,
    Empty,
    FormatVersionError,
    Full,
    SizeLimitError,
    Timeout,
)
from .segment import DEFAULT_MAX_ATTACH, Kind, Segment, SegmentInfo

__all__ = ["Channel", "Queue"]



FORMAT = _core.RING_FORMAT
DEFAULT_CAPACITY = 1 << 20
QUEUE_CAPACITY = 8 << 20
_MAX_QUEUE_ITEMS = 1 << 46  # no ring (at most 64 TiB) holds more messages
_ROLES_OFF = _core.layouts["ring"]["roles"]  # ring header size: see _core/ring.h


def _ring_bytes(capacity: int, max_attach: int) -> int:
    return (_ROLES_OFF + 8 * max_attach + 63) // 64 * 64 + capacity


def _check_capacity(capacity: Any) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 64:
        raise ValueError(f"capacity must be an int of at least 64 bytes, not {capacity!r}")
    if capacity > 1 << 46:
        raise ValueError(f"capacity {capacity} is beyond the 64 TiB a ring can address")
    return (capacity + 63) // 64 * 64


class Channel(SharedObject, _core.Ring):
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

    Ending: ``close_sending()`` ends the channel for every process: sends
    raise :class:`ChannelClosed`, receivers get the messages already sent
    and then :class:`ChannelClosed` (iteration simply stops).  An ended
    channel stays ended: a later run that opens the same name gets the
    messages left in it, and its sends are refused; unlink the name
    (``shmkit rm``) to start afresh.  ``close()`` (and leaving a ``with``
    block) only releases this handle, as for every shmkit object.

    Every blocking call releases the GIL, lets Ctrl-C through, and survives
    peers killed at any point: a message whose sender died half-way is
    dropped, nothing else is lost or repeated.  One handle may be used from
    many threads.  Passed to a child process that ``multiprocessing`` starts,
    a handle hands over the open file, so the child reaches the channel even
    if this process closed it meanwhile; pickled otherwise, it goes by name.

    Parameters
    ----------
    name:
        The channel's name (``None``: a unique one, removed when the last
        handle closes).
    capacity:
        Ring bytes when creating (rounded up to 64; default 1 MiB).  When
        opening, a given capacity larger than the channel's raises
        :class:`MismatchError`; leave it out to adopt the channel's.
    on_destroy:
        Called (no arguments) once, in the process that removes the name:
        its ``unlink()``, or the last ``close()`` of an "attached" channel.
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
    MismatchError, CorruptError, and the other :class:`Segment` errors.

    Example
    -------
    >>> with Channel(None, capacity=4096) as ch:
    ...     ch.send(b"hello"); ch.send_many([b"a", b"b"])
    ...     ch.recv(timeout=1.0), ch.recv_many(max_n=10)
    2
    (b'hello', [b'a', b'b'])
    """

    _kind = Kind.CHANNEL
    _what = "channel"

    def __init__(self, name: str | None = None, capacity: int = DEFAULT, *,
                 create: bool | None = None, path: str | os.PathLike[str] | None = None,
                 lifetime: str | None = DEFAULT, mode: int = 0o600,
                 max_attach: int = DEFAULT, readonly: bool = False,
                 on_destroy: Callable[[], Any] | None = None,
                 trust_owner: int | str | None = None) -> None:
        self._open(name, capacity, create, path, lifetime, mode, max_attach, DEFAULT,
                   readonly, trust_owner)
        self._on_destroy = on_destroy

    def _open(self, name: str | None, capacity: Any, create: bool | None, path: Any,
              lifetime: Any, mode: int, max_attach: Any, max_items: Any,
              readonly: bool = False, trust_owner: int | str | None = None) -> None:
        default_cap = QUEUE_CAPACITY if self._kind == Kind.QUEUE else DEFAULT_CAPACITY
        cap = _check_capacity(capacity if given(capacity) else default_cap)
        items = max_items if given(max_items) else 0
        slots = max_attach if given(max_attach) else DEFAULT_MAX_ATTACH
        if lifetime is None or not given(lifetime):
            life = "attached" if name is None and path is None else "persistent"
        else:
            life = lifetime

        def init(seg: Segment) -> None:
            _core.Ring._init_ring(seg._mapping, seg._hsize, cap, items)

        seg = attach_segment(
            self._kind, name, path,
            size=_ring_bytes(cap, slots) if create is not False and not readonly else None,
            create=False if readonly else create, mode=mode, readonly=readonly,
            lifetime=life, max_attach=slots, init=init, trust_owner=trust_owner,
            layout={"format": FORMAT, "capacity": cap, "max_items": items})
        self._adopt(seg, capacity=cap if given(capacity) else DEFAULT, max_items=max_items,
                    lifetime=lifetime, max_attach=max_attach)

    def _adopt(self, seg: Segment, capacity: Any = DEFAULT, max_items: Any = DEFAULT,
               lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        what = self._kind.name.lower()
        try:
            layout = seg.layout
            fmt = layout.get("format")
            if fmt != FORMAT:
                raise FormatVersionError(
                    f"{what} {seg.name!r} has ring format {fmt}; this "
                    f"shmkit reads format {FORMAT}. Use the shmkit that made it, or "
                    "remove it with `shmkit rm` and create it again")
            self._bind(seg._mapping, seg._hsize, seg.name)
            if not seg.created:
                # An explicit parameter is honoured or refused, never ignored.
                if given(capacity) and self.capacity < capacity:
                    raise mismatch(what, seg.name, "capacity", capacity, self.capacity)
                have = layout.get("max_items", 0)
                if given(max_items) and max_items != have:
                    raise mismatch(what, seg.name, "maxsize", max_items, have)
                check_common(what, seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            self._unbind()
            seg.close()
            raise
        self._seg = seg

    @classmethod
    def create(cls, name: str | None = None, capacity: int = DEFAULT,
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

    def messages(self, *, timeout: float | None = None,
                 stop_when_no_senders: bool = False) -> Iterator[bytes]:
        """Iterate over received messages until the channel is closed and drained.

        ``stop_when_no_senders=True`` also ends the iteration once the
        channel is empty and every process that sent on it has closed its
        handle or died (a sender killed mid-message is counted out by the
        kernel); before the first message is sent it waits as usual.
        ``timeout`` bounds each wait (:class:`Timeout`).

        Example (a log receiver that ends when its senders have all gone)::

            for record in ch.messages(stop_when_no_senders=True):
                handle(record)
        """
        while True:
            try:
                yield self.recv(timeout, stop_when_no_senders=stop_when_no_senders)
            except ChannelClosed:
                return

    def close_sending(self) -> None:
        """End the channel for every process: no more sends, anywhere.

        Later sends (in any process, and in later runs that open the same
        name) raise :class:`ChannelClosed`; receivers get what was already
        sent, then :class:`ChannelClosed`, and iteration ends.  The handle
        stays open (call :meth:`close` to release it).  Ending cannot be
        undone: unlink the name and create the channel again.

        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(b"last"); ch.close_sending()
        ...     list(ch)
        [b'last']
        """
        self._held()
        self._close_sending()

    def close(self) -> None:
        """Release this handle; the channel carries on for the other processes.

        Calls blocked on this handle in other threads raise ValueError.  A
        channel made with ``name=None`` is removed when its last handle
        closes.  Safe to call twice.  To end the channel for everyone, use
        :meth:`close_sending`.
        """
        seg = self._seg
        if seg is None or seg.closed:
            return
        seg.close()
        self._wake_all()  # threads of ours asleep on it notice the close
        self._unbind()
        self._after_close(seg)

    def statistics(self) -> dict:
        """Counters and state of the channel, as every process sees them.

        ``{"capacity", "bytes_used", "depth", "sent", "received", "dropped",
        "producers", "consumers", "closed", "receivers_waiting",
        "senders_waiting", "max_items"}``: ``depth`` counts messages waiting;
        ``sent`` counts messages published or being written; ``dropped``
        those abandoned by senders that died while writing them;
        ``producers``/``consumers`` count live handles that have sent/received;
        ``closed`` is 1 once the channel was ended with ``close_sending()``.
        """
        self._held()
        return self._stats()

    def _describe(self) -> dict:
        s = self._stats()
        keys = ("depth", "capacity", "producers", "consumers", "sent", "received",
                "dropped", "closed", "bytes_used")
        return {self._kind.name.lower(): {k: s[k] for k in keys}}

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmkit.{type(self).__name__} {self.name!r} closed>"
        return (f"<shmkit.{type(self).__name__} {self.name!r} capacity={self.capacity}"
                f" depth={self.depth}>")


class Queue(SharedObject):
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
    processes as usual (``Process`` and ``Pool`` arguments, ``initargs``):
    the child is handed the open file, so it reaches the queue even if this
    process closes it, or exits, right after ``start()``.  Or open it
    elsewhere with ``Queue(name="jobs")``.

    Parameters
    ----------
    maxsize:
        At most this many objects queued (0: no limit but ``capacity``).
        When opening by name, a given maxsize must be the queue's own
        (:class:`MismatchError` otherwise); leave it out to adopt it.
    name:
        Open or create this name; ``None`` makes a unique one, removed when
        the last process closes it.
    capacity:
        Bytes of ring (default 8 MiB); ``put`` also blocks while the pickled
        objects waiting fill it.  When opening, a given capacity larger
        than the queue's raises :class:`MismatchError`.
    on_destroy:
        Called (no arguments) once, in the process that removes the name.

    Example
    -------
    >>> q = Queue()
    >>> q.put({"job": 1}); q.get(timeout=1.0)
    {'job': 1}
    >>> q.close()
    """

    _ch: Channel | None = None
    _what = "queue"
    _maxsize = 0
    _closed = True  # this handle's own flag: put/get check it without a property

    def __init__(self, maxsize: int = DEFAULT, *, name: str | None = None,
                 capacity: int = DEFAULT, create: bool | None = None,
                 ctx: Any = None, on_destroy: Callable[[], Any] | None = None,
                 **kwargs: Any) -> None:
        if given(maxsize) and (not isinstance(maxsize, int) or isinstance(maxsize, bool)
                               or maxsize < 0):
            raise ValueError(f"maxsize must be a non-negative int, not {maxsize!r}")
        if given(maxsize) and maxsize > _MAX_QUEUE_ITEMS:
            raise SizeLimitError(f"maxsize={maxsize} is beyond the {_MAX_QUEUE_ITEMS} items "
                                 "a queue can count; use 0 for no limit")
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._open(name, capacity, create, kwargs.get("path"), kwargs.get("lifetime", DEFAULT),
                 kwargs.get("mode", 0o600), kwargs.get("max_attach", DEFAULT), maxsize,
                 kwargs.get("readonly", False), kwargs.get("trust_owner"))
        self._take(ch)
        self._on_destroy = on_destroy

    @classmethod
    def open(cls, name: str, **kwargs: Any) -> "Queue":
        """Open an existing queue by name; :class:`NotFoundError` if there is none.

        ``Queue.open(name, readonly=True)`` only looks: ``qsize()``, ``info()``.
        """
        return cls(name=name, create=False, **kwargs)

    def _adopt(self, seg: Segment) -> None:
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._adopt(seg)
        self._take(ch)

    def _take(self, ch: Channel) -> None:
        self._ch = ch
        self._closed = False
        self._maxsize = ch._seg.layout.get("max_items", 0)
        self._send, self._send_nowait = ch.send, ch.send_nowait
        self._recv, self._recv_nowait = ch.recv, ch.recv_nowait

    @property
    def _seg(self) -> Segment | None:  # type: ignore[override]
        return None if self._ch is None else self._ch._seg

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
        to flush.  Safe to call twice.
        """
        self._closed = True
        ch = self._ch
        if ch is not None and not ch.closed:
            ch.close()
            self._after_close(ch._seg)

    def join_thread(self) -> None:
        """Nothing to wait for: ``put`` has already placed the object."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel (there is no feeder thread)."""

    def statistics(self) -> dict:
        """The channel counters (see :meth:`Channel.statistics`)."""
        return self._live().statistics()

    def _describe(self) -> dict:
        return self._live()._describe()

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def _live(self) -> Channel:
        if self.closed:
            raise ValueError(f"Queue {self!r} is closed")
        return self._ch  # type: ignore[return-value]

    def __repr__(self) -> str:
        if self.closed:
            return "<shmkit.Queue closed>"
        return f"<shmkit.Queue {self.name!r} maxsize={self._maxsize}>"


class _QueueChannel(Channel):
    _kind = Kind.QUEUE
