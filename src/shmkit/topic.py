"""Topics: every subscriber sees every message.

A :class:`Topic` is a broadcast ring of byte messages in a named segment.
Any number of processes publish to it; each :class:`Subscriber` receives
every message published after it subscribed (plus up to ``history``
earlier ones), in each publisher's order, exactly once::

    import shmkit
    topic = shmkit.Topic("prices", capacity=1 << 20, history=16)
    topic.publish(b"tick", timeout=1.0)
    with topic.subscribe() as sub:          # in any process
        msg = sub.recv(timeout=1.0)
        with sub.recv_view() as mv:         # zero copy
            ...

Slow subscribers: with ``overflow="block"`` (the default) publishers wait
for the slowest live subscriber; with ``overflow="overwrite"`` they never
wait, and a subscriber that fell behind gets :class:`MessagesLost` (with
``.missed``) and goes on from the oldest message still there.

The protocol is C (``_core/topic.c``); docs/topic.md describes the layout
and what happens when a process dies at any point.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Iterator

from ._arrays import received_array
from ._lazy import numpy
from . import _core
from ._object import DEFAULT, SharedObject, attach_segment, check_common, given, mismatch
from .errors import (
    BusyError,
    Empty,
    FormatVersionError,
    MessagesLost,
    SizeLimitError,
    Timeout,
)
from .segment import DEFAULT_MAX_ATTACH, Kind, Segment, check_max_attach

__all__ = ["Topic", "Subscriber"]

FORMAT = _core.TOPIC_FORMAT
DEFAULT_CAPACITY = 1 << 20
DEFAULT_MAX_SUBSCRIBERS = 64
MAX_SUBSCRIBERS = 4096
MAX_HISTORY = 1 << 40
_OVERFLOW = {"block": 0, "overwrite": 1}
_LAYOUT: dict[str, Any] = _core.layouts["topic"]  # holds a nested "subscriber" dict
_ROLES_OFF: int = _LAYOUT["roles"]
_SUB_BYTES: int = _LAYOUT["subscriber"]["bytes"]


def _topic_bytes(capacity: int, max_attach: int, max_subscribers: int) -> int:
    return (_ROLES_OFF + 8 * max_attach + 63) // 64 * 64 + _SUB_BYTES * max_subscribers \
        + capacity


def _check_int(what: str, value: Any, lo: int, hi: int, unit: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{what} must be an int of at least {lo}{unit}, not {value!r}")
    if value > hi:
        raise SizeLimitError(f"{what}={value} is beyond the limit of {hi}{unit}; "
                             f"give at most {hi}")
    return value


class Subscriber(_core.TopicSubscriber):
    """One subscriber's cursor on a :class:`Topic` (made by ``topic.subscribe()``).

    ``recv(timeout=None)`` -> bytes, ``recv_nowait()`` (:class:`Empty`),
    ``recv_view(timeout=None)`` (zero copy, a context manager),
    ``recv_array(dtype, shape)``, iteration, ``close()``; ``lag``,
    ``received`` and ``missed`` count messages.  A subscriber belongs to the
    process (and is meant for the thread) that made it; closing its topic
    handle closes it.

    >>> with Topic(None, capacity=4096) as topic, topic.subscribe() as sub:
    ...     topic.publish(b"hello")
    ...     sub.recv(timeout=1.0)
    b'hello'
    """

    __slots__ = ()

    def recv_view(self, timeout: float | None = None) -> Any:
        """The next message in place: a context manager whose ``with`` value
        is a read-only memoryview of it in shared memory.

        With ``overflow="block"`` publishers keep the message's space until
        the block ends (or ``.release()``); with ``"overwrite"`` they do not
        wait for it, and leaving the block raises :class:`MessagesLost` if
        the message was overwritten meanwhile (``.intact`` tells before).

        >>> with Topic(None, capacity=4096) as topic, topic.subscribe() as sub:
        ...     topic.publish(b"frame")
        ...     with sub.recv_view(timeout=1.0) as mv:
        ...         bytes(mv[:2])
        b'fr'
        """
        return self._take(timeout)

    def recv_view_nowait(self) -> Any:
        """:meth:`recv_view`, raising :class:`Empty` instead of waiting."""
        return self._take(None, True)

    def recv_array(self, dtype: Any = "uint8", shape: Any = None, *,
                   timeout: float | None = None) -> Any:
        """The next message as a numpy array (one copy, straight from the ring).

        ``shape`` (default: one dimension) may have one dimension of -1,
        which the message's size sets.  A message that no array of
        ``dtype`` and ``shape`` fits exactly raises
        :class:`LayoutMismatchError` and stays unread: the next receive
        gets it.

        >>> import numpy as np
        >>> with Topic(None, capacity=4096) as topic, topic.subscribe() as sub:
        ...     topic.publish(np.arange(3, dtype=np.int32))
        ...     sub.recv_array(np.int32, timeout=1.0).tolist()
        [0, 1, 2]
        """
        return received_array(self, "topic", self.topic_name, dtype, shape, timeout)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        """The next message, waiting as long as it takes (``MessagesLost``
        propagates; iterating again goes on)."""
        return self.recv()

    def messages(self, timeout: float | None = None) -> Iterator[bytes]:
        """Iterate until no message arrives within ``timeout`` seconds."""
        while True:
            try:
                yield self.recv(timeout)
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
                return

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a Subscriber belongs to the process that made it; pass the "
                        "Topic and call subscribe() in the other process")

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmkit.Subscriber of {self.topic_name!r} closed>"
        return f"<shmkit.Subscriber of {self.topic_name!r} #{self.index} lag={self.lag}>"


class Topic(SharedObject, _core.Topic):
    """A topic of byte messages shared by name: every subscriber sees every message.

    ``Topic(name, capacity=n)`` opens ``name`` if it exists and creates it
    otherwise (``create=True`` / ``False`` insist).  A message takes its
    length rounded up to 16, plus 16 bytes; the largest is ``capacity - 16``
    bytes (``max_message``).

    Publishing: ``publish(data, timeout=None)``, ``publish_nowait(data)``,
    ``publish_array(array)``; ``data`` is any bytes-like object, copied in
    once.  Subscribing: ``subscribe(history=None)`` returns a
    :class:`Subscriber`.

    Every blocking call releases the GIL and lets Ctrl-C through.  A
    publisher or subscriber killed at any point blocks nobody: its lock is
    taken over and its subscriber entry is freed through the kernel's
    record of which attachments live.  Passed to a child that
    ``multiprocessing`` starts, a handle hands over the open file; pickled
    otherwise, it goes by name.

    Parameters
    ----------
    name:
        The topic's name (``None``: a unique one, removed when the last
        handle closes).
    capacity:
        Ring bytes when creating (rounded up to 64; default 1 MiB).  When
        opening, a given capacity larger than the topic's raises
        :class:`MismatchError`.
    history:
        Earlier messages a new subscriber receives, at most (default 0).
        The ring keeps them as long as they fit.
    overflow:
        ``"block"`` (default): publishers wait for the slowest live
        subscriber.  ``"overwrite"``: publishers never wait; a subscriber
        that fell behind gets :class:`MessagesLost`.
    max_subscribers:
        Entries of the subscriber table (default 64, at most 4096).
    on_destroy, create, path, lifetime, mode, max_attach, readonly, trust_owner:
        As for :class:`shmkit.Channel`.  ``history``, ``overflow`` and
        ``max_subscribers`` given when opening must be the topic's own
        (:class:`MismatchError` otherwise); leave them out to adopt them.

    Example
    -------
    >>> with Topic(None, capacity=4096, history=2) as topic:
    ...     topic.publish(b"a"); topic.publish(b"b"); topic.publish(b"c")
    ...     with topic.subscribe() as late:
    ...         late.recv(timeout=1.0), late.recv(timeout=1.0)
    (b'b', b'c')
    """

    _kind = Kind.TOPIC
    _what = "topic"

    def __init__(self, name: str | None = None, capacity: int = DEFAULT, *,
                 history: int = DEFAULT, overflow: str = DEFAULT,
                 max_subscribers: int = DEFAULT, create: bool | None = None,
                 path: str | os.PathLike[str] | None = None,
                 lifetime: str | None = DEFAULT, mode: int | None = None,
                 max_attach: int = DEFAULT, readonly: bool = False,
                 on_destroy: Callable[[], Any] | None = None,
                 trust_owner: int | str | None = None) -> None:
        cap = _check_int("capacity", capacity if given(capacity) else DEFAULT_CAPACITY,
                         64, 1 << 46, " bytes")
        cap = (cap + 63) // 64 * 64
        hist = _check_int("history", history if given(history) else 0, 0, MAX_HISTORY,
                          " messages")
        if given(overflow) and overflow not in _OVERFLOW:
            raise ValueError(f"overflow must be \"block\" or \"overwrite\", not {overflow!r}")
        ovf = overflow if given(overflow) else "block"
        subs = _check_int("max_subscribers",
                          max_subscribers if given(max_subscribers) else DEFAULT_MAX_SUBSCRIBERS,
                          1, MAX_SUBSCRIBERS)
        slots = check_max_attach(max_attach) if given(max_attach) else DEFAULT_MAX_ATTACH
        if lifetime is None or not given(lifetime):
            life = "attached" if name is None and path is None else "persistent"
        else:
            life = lifetime

        def init(seg: Segment) -> None:
            _core.Topic._init_topic(seg._mapping, seg._hsize, cap, hist, _OVERFLOW[ovf], subs)

        self._watch_subscribers()
        seg = attach_segment(
            Kind.TOPIC, name, path,
            size=_topic_bytes(cap, slots, subs) if create is not False and not readonly
            else None,
            create=False if readonly else create, mode=mode, readonly=readonly,
            lifetime=life, max_attach=slots, init=init, trust_owner=trust_owner,
            layout={"format": FORMAT, "capacity": cap, "history": hist, "overflow": ovf,
                    "max_subscribers": subs})
        self._adopt(seg, capacity=cap if given(capacity) else DEFAULT,
                    history=history, overflow=overflow, max_subscribers=max_subscribers,
                    lifetime=lifetime, max_attach=max_attach)
        self._on_destroy = on_destroy

    def _adopt(  # type: ignore[override]  # the named state, as Channel._adopt takes it
            self, seg: Segment, capacity: Any = DEFAULT, history: Any = DEFAULT,
            overflow: Any = DEFAULT, max_subscribers: Any = DEFAULT,
            lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        if not hasattr(self, "_subs"):
            self._watch_subscribers()
        try:
            layout = seg._layout
            fmt = layout.get("format")
            if fmt != FORMAT:
                raise FormatVersionError(
                    f"topic {seg.name!r} has topic format {fmt}; this shmkit reads "
                    f"format {FORMAT}. Use the shmkit that made it, or remove it with "
                    "`shmkit rm` and create it again")
            self._bind(seg._mapping, seg._hsize, seg.name)
            if not seg.created:
                # An explicit parameter is honoured or refused, never ignored.
                if given(capacity) and self.capacity < capacity:
                    raise mismatch("topic", seg.name, "capacity", capacity, self.capacity)
                if given(history) and history != self.history:
                    raise mismatch("topic", seg.name, "history", history, self.history)
                if given(overflow) and overflow != self.overflow:
                    raise mismatch("topic", seg.name, "overflow", overflow, self.overflow)
                if given(max_subscribers) and max_subscribers != self.max_subscribers:
                    raise mismatch("topic", seg.name, "max_subscribers", max_subscribers,
                                   self.max_subscribers)
                check_common("topic", seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            self._unbind()
            seg.close()
            raise
        self._seg = seg

    @classmethod
    def create(cls, name: str | None = None, capacity: int = DEFAULT,
               **kwargs: Any) -> "Topic":
        """Create a topic; :class:`ExistsError` if the name is taken."""
        return cls(name, capacity, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Topic":
        """Open an existing topic; :class:`NotFoundError` if there is none."""
        return cls(name, create=False, **kwargs)

    def subscribe(self, history: int | None = None, *,
                  timeout: float | None = None) -> Subscriber:
        """A new subscriber: it receives every message published from now on,
        plus up to ``history`` earlier ones still kept (default: the topic's
        ``history``; at most that).

        Subscribing takes the publishers' lock for a moment; ``timeout``
        bounds the wait for it (``None``: as long as it takes), then
        :class:`Timeout` names the process holding it (a publisher inside
        a loan, or one stopped with SIGSTOP).  Raises :class:`BusyError`
        when ``max_subscribers`` live subscribers exist already (entries
        of dead processes are freed first), and :class:`SizeLimitError` for
        a ``history`` beyond the topic's.

        >>> with Topic(None, capacity=4096) as topic:
        ...     sub = topic.subscribe(timeout=1.0)
        ...     topic.publish(b"x"); sub.recv(timeout=1.0)
        b'x'
        """
        self._held()
        if history is not None:
            _check_int("history", history, 0, self.history, " messages (the topic's history)")
        sub = self._subscribe(Subscriber, history, timeout)
        ref = weakref.ref(sub, self._forget_sub)
        self._subs[id(ref)] = ref
        return sub

    def _watch_subscribers(self) -> None:
        """The subscribers this handle closes with it, by weak reference: the
        callback that forgets one is C (``_core.forgetter``), so that no line
        of Python runs as a subscriber is freed, for a Ctrl-C to be lost in
        (a ``WeakSet``'s callback is Python)."""
        self._subs: dict[int, weakref.ref[Subscriber]] = {}
        self._forget_sub = _core.forgetter(self._subs)

    def publish_array(self, array: Any, timeout: float | None = None) -> None:
        """Publish a numpy array's bytes (made C-contiguous first if need be).

        >>> import numpy as np
        >>> with Topic(None, capacity=4096) as topic:
        ...     topic.publish_array(np.zeros(4))
        """
        np = numpy()
        self.publish(np.ascontiguousarray(array).data, timeout)

    def close(self) -> None:
        """Release this handle and close its subscribers; the topic carries on
        for the other processes.  Safe to call twice."""
        super().close()

    def _release(self) -> None:
        for ref in list(self._subs.values()):
            sub = ref()
            if sub is not None:
                sub.close()

    def _segment_closed(self) -> None:
        self._wake_all()  # threads of ours asleep on it notice the close
        self._unbind()

    def statistics(self) -> dict[str, Any]:
        """Counters and state, as every process sees them.

        ``{"capacity", "bytes_used", "published", "history", "overflow",
        "max_subscribers", "subscribers", "subscribers_waiting",
        "publishers_waiting"}``; ``subscribers`` lists the live ones:
        ``{"index", "pid", "lag", "received", "missed", "joined"}`` (``lag``
        in messages not read yet, ``missed`` lost to overwriting).
        """
        seg = self._held()
        s = self._stats()
        for sub in s["subscribers"]:
            sub["pid"] = _core.token_owner_pid(seg._mapping, sub.pop("token"), False)
        return s

    def _describe(self) -> dict[str, Any]:
        s = self.statistics()
        return {"topic": {k: s[k] for k in ("capacity", "bytes_used", "published", "history",
                                            "overflow", "subscribers")}}

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmkit.Topic {self.name!r} closed>"
        return (f"<shmkit.Topic {self.name!r} capacity={self.capacity} "
                f"overflow={self.overflow!r} published={self.published}>")
