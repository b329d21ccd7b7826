"""A Topic on a Redis stream: every subscriber reads the whole stream from its own place.

Publishing is one script call: it counts the message in the meta hash
(``published``) and adds it to the stream ``<prefix>:<name>`` with the id
``<n>-1``, where ``n`` is that count, trimming the stream to ``maxlen``
entries.  The ids make every message's number visible to subscribers: a
subscriber that has read up to number ``p`` reads ids numbered above ``p`` next
(XREAD, no consumer group: nothing is acknowledged, nothing is shared), and
when the first entry it gets is numbered above ``p + 1``, the ones between
were trimmed before it read them: it raises :class:`MessagesLost` with
exactly that count, then goes on from the oldest entry still there, as a
local topic with ``overflow="overwrite"`` does.

>>> ns = shmkit.connect("redis://localhost:6379/0")       # doctest: +SKIP
>>> topic = ns.Topic("ticks", history=10)                 # doctest: +SKIP
>>> sub = topic.subscribe(); topic.publish(b"t1")         # doctest: +SKIP
>>> sub.recv(timeout=1.0)                                 # doctest: +SKIP
b't1'
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from .. import _core
from ..sync import optional_seconds
from .._lazy import numpy
from .._object import DEFAULT, _Default, given
from ..errors import _timed_out, BusyError, ClosedError, CorruptError, Empty, MessagesLost, ReadOnlyError
from ._base import (RedisNamespace, RedisObject, as_bytes_or_none, deadline, guard_all,
                    refuse, remaining)
from .channel import _as_bytes, MAX_MESSAGE

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Topic", "Subscriber"]

DEFAULT_MAXLEN = 10_000
_READ_AT_ONCE = 256
_MAX_SEQ = (1 << 64) - 1  # the largest second part of a stream id

# KEYS[1] stream, KEYS[2] meta; ARGV[1] maxlen, ARGV[2..] messages.  Returns the
# number of the last message added, or -1 when the meta is gone (a handle
# left open after unlink(): writing would make a meta of no kind).
_PUBLISH = """
if redis.call('exists', KEYS[2]) == 0 then return -1 end
local n = #ARGV - 1
local last = redis.call('hincrby', KEYS[2], 'published', n)
for i = 1, n do
  redis.call('xadd', KEYS[1], 'maxlen', ARGV[1], (last - n + i) .. '-1', 'd', ARGV[i + 1])
end
return last
"""


def _number(ident: bytes) -> int:
    """A message's number: the first part of its stream id ``<n>-1``."""
    return int(ident.split(b"-", 1)[0])


@guard_all
class Topic(RedisObject):
    """A topic of byte messages on a Redis stream: every subscriber sees every message.

    The interface of :class:`shmkit.Topic`: ``publish``, ``publish_nowait``,
    ``publish_many``, ``publish_array``, ``subscribe(history=None)``,
    ``published``, ``history``, ``statistics``.  Publishers never wait: the
    stream keeps the last ``maxlen`` messages, and a subscriber that falls
    further behind gets :class:`MessagesLost` (with ``.missed``), then the
    oldest message still kept: the local ``overflow="overwrite"``.

    Parameters
    ----------
    history:
        Earlier messages a new subscriber receives, at most (default 0).
    maxlen:
        Messages the stream keeps (default 10,000, at least ``history``):
        how far a subscriber may fall behind before it misses some.
    overflow:
        Only ``"overwrite"`` (the default here); ``"block"`` is refused,
        since Redis cannot see which subscribers are alive to wait for them.
    capacity:
        Refused when given: a stream counts messages, not bytes (``maxlen=``).
    create, readonly, on_destroy:
        As for :class:`shmkit.Topic`.

    Example
    -------
    >>> topic = ns.Topic("prices", history=1)           # doctest: +SKIP
    >>> topic.publish(b"a"); topic.publish(b"b")        # doctest: +SKIP
    >>> topic.subscribe().recv(timeout=1.0)             # doctest: +SKIP
    b'b'
    """

    _kind = "topic"

    def __init__(self, ns: RedisNamespace, name: str, capacity: int | _Default = DEFAULT, *,
                 history: int | _Default = DEFAULT, maxlen: int | _Default = DEFAULT,
                 overflow: str | _Default = DEFAULT, create: bool | None = None,
                 readonly: bool = False, on_destroy: Callable[[], Any] | None = None,
                 **local_only: Any) -> None:
        super().__init__(ns, name)
        refuse("Topic", name, dict(local_only, capacity=capacity))
        if given(overflow) and overflow != "overwrite":
            if overflow == "block":
                raise self._unsupported_block(name)
            raise ValueError(f"overflow must be \"block\" or \"overwrite\", not {overflow!r}")
        hist = _count("history", history, 0) if given(history) else 0
        most = _count("maxlen", maxlen, 1) if given(maxlen) else max(DEFAULT_MAXLEN, hist)
        if most < hist:
            raise ValueError(f"maxlen={most} keeps fewer messages than history={hist}; "
                             "give a maxlen of at least the history")
        # "stream": this stream's own stamp, so that a subscriber tells a topic made
        # again (or lost by a server restart) from the one it read
        meta = self._open_meta(create, {"history": hist, "maxlen": most, "published": 0,
                                        "stream": secrets.token_hex(8)})
        if not self._created:
            for what, asked, have in (("history", history, meta.get("history")),
                                      ("maxlen", maxlen, meta.get("maxlen"))):
                if given(asked) and str(asked) != have:
                    raise self._mismatch("topic", name, what, asked, have)
        try:
            self._history = int(meta["history"])
            self._maxlen = int(meta["maxlen"])
        except (KeyError, ValueError) as e:
            field = e.args[0] if isinstance(e, KeyError) else "history or maxlen"
            raise self._corrupt_meta(str(field), meta.get(str(field))) from None
        self._readonly = bool(readonly)
        self._on_destroy = on_destroy
        self._publish = self._r.register_script(_PUBLISH)

    @staticmethod
    def _unsupported_block(name: str) -> Exception:
        from ..errors import UnsupportedParameterError
        return UnsupportedParameterError(
            f"Topic {name!r} on Redis cannot honour overflow='block': the server cannot "
            "tell which subscribers are alive to wait for them; leave overflow= out (the "
            "stream keeps maxlen= messages, and a subscriber further behind is told how "
            "many it missed)")

    def _reopen_args(self) -> dict[str, Any]:
        return {"readonly": self._readonly}

    # -- publishing -----------------------------------------------------------

    def _writable(self) -> None:
        self._live()
        if self._readonly:
            raise ReadOnlyError(f"topic {self._name!r} was opened with readonly=True")

    def publish(self, data: Buffer, timeout: float | None = None) -> None:
        """Publish one bytes-like message (never waits: ``timeout`` is checked
        and always met)."""
        deadline(timeout)
        self.publish_many([data])

    def publish_nowait(self, data: Buffer) -> None:
        """Publish one message (as :meth:`publish`: a Redis topic never waits)."""
        self.publish_many([data])

    def publish_many(self, messages: Iterable[Buffer], timeout: float | None = None) -> int:
        """Publish messages in order, in one script call per 1000; returns how
        many (never waits: ``timeout`` is checked and always met)."""
        deadline(timeout)
        self._writable()
        msgs = [_as_bytes(m) for m in messages]
        for m in msgs:
            if len(m) > MAX_MESSAGE:
                from ..errors import MessageTooLarge
                raise MessageTooLarge(f"a message of {len(m)} bytes is larger than the "
                                      f"{MAX_MESSAGE} bytes a Redis stream entry can hold")
        for i in range(0, len(msgs), 1000):
            if self._publish(keys=[self._key, self._meta_key],
                             args=[self._maxlen, *msgs[i:i + 1000]]) == -1:
                raise self._removed()
        return len(msgs)

    def publish_array(self, array: Any, timeout: float | None = None) -> None:
        """Publish a numpy array's bytes (made C-contiguous first if need be)."""
        np = numpy()
        self.publish(np.ascontiguousarray(array).data, timeout)

    # -- subscribing ----------------------------------------------------------

    def subscribe(self, history: int | None = None, *,
                  timeout: float | None = None) -> "Subscriber":
        """A subscriber of every message published from now on, plus up to
        ``history`` earlier ones still kept (default: the topic's ``history``).

        ``timeout`` is the local topic's (a bound on its wait for the
        publishers' lock), checked the same way: a Redis subscribe takes no
        lock, so it never waits for one; its round trip is bounded by the
        connection's ``socket_timeout``."""
        optional_seconds(timeout)
        self._live()
        if history is None:
            history = self._history
        elif _count("history", history, 0) > self._history:
            from ..errors import SizeLimitError
            raise SizeLimitError(f"history={history} is beyond topic {self._name!r}'s "
                                 f"history of {self._history} messages")
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self._meta_key, "published", "stream")
        (published, stream), = pipe.execute()
        return Subscriber(self, max(0, int(published or 0) - history), _stream=stream or b"")

    # -- state ----------------------------------------------------------------

    @property
    def published(self) -> int:
        """Messages published so far (by every process)."""
        self._live()
        return int(self._r.hget(self._meta_key, "published") or 0)

    @property
    def history(self) -> int:
        return self._history

    @property
    def maxlen(self) -> int:
        return self._maxlen

    @property
    def overflow(self) -> str:
        return "overwrite"

    @property
    def max_message(self) -> int:
        return MAX_MESSAGE

    def statistics(self) -> dict[str, Any]:
        """``{"published", "kept", "history", "maxlen", "overflow"}``: ``kept`` is
        how many messages the stream holds now.  (Subscribers are not listed:
        Redis keeps no record of readers.)"""
        self._live()
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self._meta_key, "published")
        pipe.xlen(self._key)
        published, kept = pipe.execute()
        return {"published": int(published or 0), "kept": int(kept), "history": self._history,
                "maxlen": self._maxlen, "overflow": "overwrite"}

    def __repr__(self) -> str:
        if self._closed:
            return f"<shmkit.redis.Topic {self._name!r} closed>"
        return f"<shmkit.redis.Topic {self._name!r} at {self._ns.url}>"


def _count(what: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{what} must be an int >= {lo}, not {value!r}")
    return value


@guard_all
class Subscriber:
    """One subscriber of a Redis :class:`Topic`: its own place in the stream.

    ``recv(timeout=None)``, ``recv_nowait()``, ``recv_many``, ``messages()``,
    iteration, ``received``, ``missed``, ``lag``, ``close()``.  It lives in
    this process only: nothing about it is stored in Redis, so a subscriber
    that dies leaves nothing behind.
    """

    def __init__(self, topic: Topic, start: int, *, _stream: bytes | None = None) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a message number >= 0, not {start!r}")
        # the stamp of the stream that ``start`` counts in (default: the topic's now)
        if _stream is None:
            _stream = as_bytes_or_none(topic._r.hget(topic._meta_key, "stream")) or b""
        self._stream = _stream
        self._topic = topic
        self._ns = topic._ns
        self._r = topic._r
        self._key = topic._key
        self._pos = start  # the number of the last message read (or skipped)
        # (number, message or None for an entry shmkit did not write, id)
        self._buf: collections.deque[tuple[int, bytes | None, bytes]] = collections.deque()
        self._received = 0
        self._missed = 0
        self._closed = False
        self._pid = os.getpid()
        self._busy = threading.Lock()  # one receive at a time: it moves the place

    def _what_name(self) -> str:
        return f"subscriber of topic {self._topic._name!r}"

    def _live(self) -> None:
        if self._closed or self._topic.closed:
            raise ClosedError(f"this subscriber of topic {self._topic._name!r} is closed")

    def _fill(self, block_ms: int | None) -> None:
        """Read what follows our place (waiting up to ``block_ms``)."""
        # bytes replies: see _base.as_bytes_or_none
        pipe = self._r.pipeline(transaction=False)
        # every id of a number above ours (ours are <n>-1; others may be written)
        pipe.xread({self._key: f"{self._pos}-{_MAX_SEQ}"}, count=_READ_AT_ONCE,
                   block=block_ms)
        pipe.hmget(self._topic._meta_key, "stream", "published")  # after the read
        got, (stream, published) = cast(
            "tuple[list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes] | None]]]], "
            "tuple[bytes | None, bytes | None]]", pipe.execute())
        if (stream or b"") != self._stream or int(published or 0) < self._pos:
            # Another stream: the topic was removed and made again, or the server
            # restarted without its data.  What this read got may come from either:
            # start over from the new stream's beginning.
            self._stream = stream or b""
            self._pos = 0
            return
        for ident, fields in got[0][1] if got else ():
            number = _number(ident)
            if self._buf and number <= self._buf[-1][0]:
                continue  # another program's entry with a number already seen
            data = fields.get(b"d") if fields else None
            if not ident.endswith(b"-1"):
                data = None  # another program's entry: its number is passed over
            self._buf.append((number, data, ident))

    def _next(self, timeout: float | None, nowait: bool) -> bytes | None:
        self._live()
        if not self._buf:
            end = deadline(timeout)
            self._fill(None)
            while not self._buf and not nowait:
                wait = remaining(end)
                if wait <= 0:
                    break
                self._fill(max(1, int(wait * 1000)))
                self._live()
        if not self._buf:
            return None
        n, data, ident = self._buf[0]
        if n > self._pos + 1:
            missed = n - self._pos - 1
            self._pos = n - 1
            self._missed += missed
            raise MessagesLost(
                f"{missed} message{'s' if missed != 1 else ''} of topic "
                f"{self._topic._name!r} {'was' if missed == 1 else 'were'} trimmed from the "
                f"stream before this subscriber read {'it' if missed == 1 else 'them'} (it "
                f"keeps {self._topic._maxlen}: read faster, or create the topic with a "
                "larger maxlen=)", missed)
        self._buf.popleft()
        self._pos = n
        if data is None:
            raise CorruptError(
                f"topic {self._topic._name!r}: stream entry {ident.decode()} is not one "
                f"shmkit publishes (id <number>-1, field 'd'): another program writes to "
                f"{self._key!r}; it was passed over, the next receive goes on (use "
                "another name or prefix)")
        self._received += 1
        return data

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message; :class:`Timeout` after ``timeout`` seconds;
        :class:`MessagesLost` (with ``.missed``) when some were trimmed first."""
        with self._receiving():
            got = self._next(timeout, False)
        if got is None:
            raise _timed_out(f"nothing was published on topic {self._topic._name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        return got

    def recv_nowait(self) -> bytes:
        """The next message if one is there, else :class:`Empty`."""
        with self._receiving():
            got = self._next(0, True)
        if got is None:
            raise Empty(f"nothing new on topic {self._topic._name!r}")
        return got

    def recv_many(self, max_n: int = 1024, timeout: float | None = None) -> list[bytes]:
        """Up to ``max_n`` messages, waiting for the first; ``[]`` on timeout."""
        if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
            raise ValueError(f"max_n must be an int >= 1, not {max_n!r}")
        with self._receiving():
            first = self._next(timeout, False)
            if first is None:
                return []
            out = [first]
            while (len(out) < max_n and self._buf and self._buf[0][0] == self._pos + 1
                   and self._buf[0][1] is not None):  # (a foreign entry: the next call's)
                out.append(self._next(0, True) or b"")
            return out

    @contextlib.contextmanager
    def _receiving(self) -> Iterator[None]:
        """Hold this subscriber for one receive; BusyError if another thread does."""
        if not self._busy.acquire(blocking=False):
            raise BusyError(f"this subscriber of topic {self._topic._name!r} is receiving in "
                            "another thread; give each thread its own subscriber "
                            "(topic.subscribe())")
        try:
            yield
        finally:
            self._busy.release()

    def messages(self, timeout: float | None = None) -> Iterator[bytes]:
        """Iterate over messages as they come (:class:`Timeout` after ``timeout``
        seconds with none)."""
        while True:
            yield self.recv(timeout)

    def __iter__(self) -> Iterator[bytes]:
        return self.messages()

    @property
    def position(self) -> int:
        """The number of the last message this subscriber read (or was told it
        missed): ``Subscriber(topic, position)`` in another process goes on
        right after it (``shmkit bridge --topic --from`` keeps it in Redis)."""
        return self._pos

    @property
    def received(self) -> int:
        return self._received

    @property
    def missed(self) -> int:
        return self._missed

    @property
    def lag(self) -> int:
        """Messages published that this subscriber has not read yet."""
        self._live()
        return max(0, self._topic.published - self._pos)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop subscribing (nothing to release in Redis)."""
        self._closed = True
        self._buf.clear()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self._pos}"
        return f"<shmkit.redis.Subscriber of {self._topic._name!r} {state}>"
