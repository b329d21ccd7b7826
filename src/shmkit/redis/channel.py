"""A Channel on a Redis stream with one consumer group: at-least-once delivery.

Each send is an XADD (field ``d``: the message bytes) to the stream
``<prefix>:<name>``; every handle is a consumer of the group ``shmkit``
(named ``host:pid:random``, or ``consumer=``).  A received message is
acknowledged (XACK, and XDEL: the stream keeps only unacknowledged entries)
when this handle receives again, calls :meth:`Channel.ack`, or closes.  A
consumer killed in between leaves its messages pending; once they have been
idle ``claim_idle`` seconds, any other consumer's receive takes them over
(XAUTOCLAIM) and gets them: at-least-once, where the local channel is
exactly-once (docs/redis.md).

>>> ns = shmkit.connect("redis://localhost:6379/0")      # doctest: +SKIP
>>> ch = ns.Channel("jobs"); ch.send(b"job")             # doctest: +SKIP
>>> ch.recv(timeout=1.0)                                 # doctest: +SKIP
b'job'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, ResponseError

from .. import _core
from .._arrays import writable_bytes
from .._object import DEFAULT, _Default, given
from ..sync import optional_seconds
from ..errors import (
    _timed_out,
    ChannelClosed,
    CorruptError,
    Empty,
    Full,
    MessageTooLarge,
    ReadOnlyError,
    ShmkitError,
    UnsupportedTypeError,
    WrongKindError,
)
from ._base import (CHUNK, RedisNamespace, RedisObject, deadline, guard_all, guarded, refuse,
                    remaining)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Channel"]

GROUP = "shmkit"
MAX_MESSAGE = 512 << 20  # Redis's largest string (proto-max-bulk-len default)
CLAIM_IDLE = 30.0
_SEND_CHUNK = 1000

# A stream entry as redis-py parses it (bytes: see _base.as_bytes_or_none): its id and
# fields, or None for an entry deleted while it was pending.
_Entry = tuple[bytes, dict[bytes, bytes] | None]

# KEYS[1] stream, KEYS[2] meta; ARGV[1] maxsize (0: none), ARGV[2..] messages.
# Returns -1 when the channel was closed for sending, else how many were added
# (fewer than given when maxsize leaves less room).
_SEND = """
if redis.call('hget', KEYS[2], 'closed') == '1' then return -1 end
local max = tonumber(ARGV[1])
local n = #ARGV - 1
if max > 0 then
  local room = max - redis.call('xlen', KEYS[1])
  if room <= 0 then return 0 end
  if n > room then n = room end
end
for i = 2, n + 1 do redis.call('xadd', KEYS[1], '*', 'd', ARGV[i]) end
return n
"""

# KEYS[1] stream; ARGV ids: acknowledge and remove, in one step (500 ids per
# call: unpack() of them all would overflow Lua's stack beyond a few thousand)
_ACK = """
local n = 0
for i = 1, #ARGV, 500 do
  local j = math.min(i + 499, #ARGV)
  redis.call('xack', KEYS[1], 'shmkit', unpack(ARGV, i, j))
  n = n + redis.call('xdel', KEYS[1], unpack(ARGV, i, j))
end
return n
"""

#: The suffix of a channel's stream of set-aside entries: what a receiver could
#: not hand on (another program's entry, a message too large for a bridge's
#: local channel), kept there until someone deletes it.
REJECTED = ":rejected"

# KEYS[1] stream, KEYS[2] its rejected stream; ARGV[1] id, ARGV[2] why.  Copies
# the entry (its fields as they are) with the reason, then acknowledges and
# removes it: one step, so it is in one of the two streams at every moment.
_REJECT = """
local fields = {'why', ARGV[2], 'id', ARGV[1]}
local e = redis.call('xrange', KEYS[1], ARGV[1], ARGV[1])
if e[1] then
  for _, v in ipairs(e[1][2]) do fields[#fields + 1] = v end
end
redis.call('xadd', KEYS[2], '*', unpack(fields))
redis.call('xack', KEYS[1], 'shmkit', ARGV[1])
return redis.call('xdel', KEYS[1], ARGV[1])
"""


# KEYS[1] meta: end the channel, if it still exists (1; else 0: a handle left
# open after unlink() would make a meta of no kind)
_CLOSE_SENDING = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('hset', KEYS[1], 'closed', '1')
return 1
"""


def _as_bytes(data: Buffer) -> bytes:
    if type(data) is bytes:
        return data
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("send() needs a C-contiguous buffer; np.ascontiguousarray() it")
    return mv.tobytes()


@guard_all
class Channel(RedisObject):
    """A channel of byte messages on a Redis stream, shared by name.

    The interface of :class:`shmkit.Channel`: ``send``, ``send_nowait``,
    ``send_many``, ``recv``, ``recv_nowait``, ``recv_many``, ``recv_into``,
    ``messages``, iteration, ``close_sending``, ``depth``, ``statistics``.
    Per-producer order is kept (one stream); delivery is at-least-once:
    a message received by a handle that dies (or stalls) before it
    acknowledged it is delivered again, to another consumer, once it has
    been idle ``claim_idle`` seconds.

    Parameters
    ----------
    capacity:
        Refused (:class:`UnsupportedParameterError`) when given: a stream
        counts messages, not bytes; a Queue takes ``maxsize=``.
    claim_idle:
        Seconds a received, unacknowledged message waits before another
        consumer may take it over (default 30); fixed per handle.
    consumer:
        This handle's consumer name in the group (default ``host:pid:random``).
        A handle that reuses the name of a dead one first gets that one's
        pending messages back at once (``shmkit bridge`` does this).
    create, readonly, on_destroy:
        As for :class:`shmkit.Channel` (``on_destroy`` runs in :meth:`unlink`).

    Example
    -------
    >>> ch = ns.Channel("logs")                         # doctest: +SKIP
    >>> ch.send(b"a"); ch.send_many([b"b", b"c"])       # doctest: +SKIP
    >>> ch.recv(timeout=1.0), ch.recv_many(max_n=10)    # doctest: +SKIP
    (b'a', [b'b', b'c'])
    """

    _kind = "channel"
    _maxsize = 0
    _extra_keys = (REJECTED,)

    def __init__(self, ns: RedisNamespace, name: str, capacity: int | _Default = DEFAULT, *,
                 create: bool | None = None, claim_idle: float = CLAIM_IDLE,
                 consumer: str | None = None, readonly: bool = False,
                 on_destroy: Callable[[], Any] | None = None, **local_only: Any) -> None:
        super().__init__(ns, name)
        refuse(type(self).__name__, name, dict(local_only, capacity=capacity))
        if (isinstance(claim_idle, bool) or not isinstance(claim_idle, (int, float))
                or not 0 < claim_idle < 1e9):
            raise ValueError(f"claim_idle must be a number of seconds > 0, not {claim_idle!r}")
        self._setup(create, {}, claim_idle, consumer, readonly, on_destroy)

    def _setup(self, create: bool | None, fields: dict[str, Any], claim_idle: float,
               consumer: str | None, readonly: bool,
               on_destroy: Callable[[], Any] | None) -> dict[str, str]:
        meta = self._open_meta(create, fields)
        self._claim_ms = max(1, int(claim_idle * 1000))
        self._claim_idle = claim_idle
        self._fixed_consumer = consumer
        self._consumer = consumer or self._ns.client_id()
        self._pid = os.getpid()
        self._readonly = bool(readonly)
        self._on_destroy = on_destroy
        self._unacked: list[bytes] = []
        self._own_first = consumer is not None  # take back our own pending entries first
        self._last_claim = 0.0
        self._send_script = self._r.register_script(_SEND)
        self._ack_script = self._r.register_script(_ACK)
        self._reject_script = self._r.register_script(_REJECT)
        self._corrupt: CorruptError | None = None  # raised by the next receive
        self._ensure_group()
        return meta

    def _reopen_args(self) -> dict[str, Any]:
        return {"claim_idle": self._claim_idle, "readonly": self._readonly}

    def _ensure_group(self) -> None:
        try:
            self._r.xgroup_create(self._key, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "WRONGTYPE" in str(e):
                raise WrongKindError(
                    f"{self._ns.key(self._name)!r} in {self._ns.url} is a Redis key of another "
                    f"type than the stream a {self._kind} needs (another program's, or "
                    "another kind's): use another name, or delete that key") from None
            if "BUSYGROUP" not in str(e):
                raise

    def _check(self, sending: bool) -> None:
        self._live()
        if self._readonly:
            raise ReadOnlyError(f"{self._kind} {self._name!r} was opened with readonly=True")
        if os.getpid() != self._pid:  # a forked child is its own consumer
            self._pid = os.getpid()
            self._consumer = self._fixed_consumer or self._ns.client_id()
            self._unacked = []

    # -- sending --------------------------------------------------------------

    @guarded  # the bridge calls it directly: a lost server is BackendError
    def _send_some(self, messages: list[bytes]) -> int:
        n = self._send_script(keys=[self._key, self._meta_key],
                              args=[self._maxsize, *messages])
        if n < 0:
            raise ChannelClosed(f"{self._kind} {self._name!r} was closed: no more messages "
                                "can be sent; unlink it and create it again to start afresh")
        return int(n)

    def _encode_all(self, messages: Iterable[Buffer]) -> list[bytes]:
        out = []
        for m in messages:
            b = _as_bytes(m)
            if len(b) > MAX_MESSAGE:
                raise MessageTooLarge(f"a message of {len(b)} bytes is larger than the "
                                      f"{MAX_MESSAGE} bytes a Redis stream entry can hold")
            out.append(b)
        return out

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        """Send one bytes-like message; waits while a Queue's ``maxsize`` is reached
        (:class:`Timeout` after ``timeout`` seconds)."""
        self._check(True)
        msg = self._encode_all([data])
        end = deadline(timeout)
        if self._send_some(msg) == 1:
            return
        self._wait_room(msg, end, timeout)

    def _wait_room(self, msgs: list[bytes], end: float | None,
                   timeout: float | None) -> int:
        # Only a bounded Queue is ever full: wait for room, backing off up to 50 ms.
        sent, pause = 0, 0.001
        while True:
            if end is not None and time.monotonic() >= end:
                raise _timed_out(f"{self._kind} {self._name!r} stayed full ({self._maxsize} "
                                 f"messages) for {_core.shown_seconds(timeout)} s")
            time.sleep(min(pause, remaining(end)))
            pause = min(pause * 2, 0.05)
            sent += self._send_some(msgs[sent:sent + _SEND_CHUNK])
            if sent == len(msgs):
                return sent

    def send_nowait(self, data: Buffer) -> None:
        """Send without waiting; :class:`Full` when a Queue's ``maxsize`` is reached."""
        self._check(True)
        if self._send_some(self._encode_all([data])) == 0:
            raise Full(f"{self._kind} {self._name!r} is full ({self._maxsize} messages)")

    def send_many(self, messages: Iterable[Buffer], timeout: float | None = None) -> int:
        """Send messages in order (one script call per 1000); returns how many."""
        self._check(True)
        msgs = self._encode_all(messages)
        end = deadline(timeout)
        sent = 0
        while sent < len(msgs):
            chunk = msgs[sent:sent + _SEND_CHUNK]
            n = self._send_some(chunk)
            sent += n
            if n < len(chunk):
                sent += self._wait_room(msgs[sent:sent + _SEND_CHUNK], end, timeout)
        return sent

    def close_sending(self, *, timeout: float | None = None) -> None:
        """End the channel for every process: sends raise :class:`ChannelClosed`;
        receivers get what was sent, then ChannelClosed.

        ``timeout`` is the local channel's (a bound on its wait for the
        senders' lock), checked the same way: ending a Redis channel is one
        script, which takes no lock and so waits for none; its round trip
        is bounded by the connection's ``socket_timeout``."""
        optional_seconds(timeout)
        self._live()
        if self._readonly:
            raise ReadOnlyError(f"{self._kind} {self._name!r} was opened with readonly=True; "
                                "open it without readonly to end it")
        if not self._r.eval(_CLOSE_SENDING, 1, self._meta_key):
            raise self._removed()

    @property
    def sending_closed(self) -> bool:
        return self._r.hget(self._meta_key, "closed") == b"1"

    # -- receiving ------------------------------------------------------------

    def ack(self) -> None:
        """Acknowledge the messages this handle received so far (done by the next
        receive and by close() anyway)."""
        self._live()
        if self._unacked:
            ids, self._unacked = self._unacked, []
            self._ack_script(keys=[self._key], args=ids)

    def _read(self, count: int, block_ms: int | None, start: str = ">") -> list[bytes]:
        ids, self._unacked = self._unacked, []
        # a cluster's pipelines carry no scripts, and a read of our own pending
        # entries must not see these again (a missing script would be loaded
        # after the read): one more trip
        if ids and (self._ns.cluster or start != ">"):
            try:
                self._ack_script(keys=[self._key], args=ids)
            except BaseException:
                self._unacked = ids
                raise
            ids = []
        pipe = self._r.pipeline(transaction=False)
        if ids:
            pipe.evalsha(self._ack_script.sha, 1, self._key, *ids)
        pipe.xreadgroup(GROUP, self._consumer, {self._key: start}, count=count,
                        block=block_ms)
        # raise_on_error=False: a failed acknowledgement must not lose the
        # read that ran after it in the same round trip
        res = pipe.execute(raise_on_error=False)
        got = res[-1]
        if isinstance(got, Exception):
            if ids:
                self._unacked = ids
            if "NOGROUP" not in str(got):
                raise got
            self._ensure_group()  # the server lost it (a restart without persistence)
            return []
        out = self._keep(got[0][1] if got else [])
        if ids and isinstance(res[0], Exception):
            if isinstance(res[0], NoScriptError):  # the server restarted: load it again
                self._ack_script(keys=[self._key], args=ids)
            else:  # acknowledged with the next receive
                self._unacked = ids + self._unacked
        return out

    def _keep(self, entries: list[_Entry]) -> list[bytes]:
        out: list[bytes] = []
        dead: list[bytes] = []
        for ident, fields in entries:
            if not fields:  # deleted while pending: acknowledge it away
                dead.append(ident)
                continue
            data = fields.get(b"d")
            if not isinstance(data, bytes):  # another program's entry: set it aside
                self._corrupt = self._reject(ident, "has no 'd' field")
                continue
            self._unacked.append(ident)
            out.append(data)
        if dead:
            self._r.xack(self._key, GROUP, *dead)
        if not out and self._corrupt is not None:
            e, self._corrupt = self._corrupt, None
            raise e
        return out

    def _reject(self, ident: bytes, why: str) -> CorruptError:
        """Move entry ``ident`` to the rejected stream (acknowledged and removed
        here); returns the error that tells of it."""
        rejected = self._key + REJECTED
        self._reject_script(keys=[self._key, rejected], args=[ident, why])
        if ident in self._unacked:
            self._unacked.remove(ident)
        return CorruptError(
            f"{self._kind} {self._name!r}: stream entry {ident.decode()} {why}, so it "
            f"cannot be delivered; it was moved to the stream {rejected!r} (read it "
            "there with XRANGE, delete that key when done) and the next messages follow")

    def _claim(self, count: int) -> list[bytes]:
        self._last_claim = time.monotonic()
        try:
            got = self._r.xautoclaim(self._key, GROUP, self._consumer, self._claim_ms,
                                     start_id="0-0", count=count)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group()
            return []
        entries = got[1]
        if len(got) > 2 and got[2]:  # deleted entries still pending
            self._r.xack(self._key, GROUP, *got[2])
        return self._keep([e for e in entries if e is not None])

    @guarded  # as _send_some
    def _take(self, count: int, timeout: float | None, nowait: bool = False) -> list[bytes]:
        self._check(False)
        if self._corrupt is not None:  # set aside by the last receive, which had others
            e, self._corrupt = self._corrupt, None
            raise e
        if self._own_first:  # a reused consumer name: its own pending entries first
            got = self._read(count, None, start="0")
            if got:
                return got
            self._own_first = False
        end = deadline(timeout)
        if time.monotonic() - self._last_claim > min(self._claim_idle / 2, 5.0):
            got = self._claim(count)  # now and then, even while new messages keep coming
            if got:
                return got
        got = self._read(count, None)
        if got:
            return got
        while True:
            got = self._claim(count)
            if got:
                return got
            pipe = self._r.pipeline(transaction=False)
            pipe.hget(self._meta_key, "closed")
            pipe.xlen(self._key)
            closed, depth = pipe.execute()
            if closed == b"1" and depth == 0:
                raise ChannelClosed(f"{self._kind} {self._name!r} is closed and drained")
            if nowait:
                return []
            wait = remaining(end)
            if wait <= 0:
                return []
            got = self._read(count, max(1, int(wait * 1000)))
            if got:
                return got
            if end is not None and time.monotonic() >= end:
                return []

    def recv(self, timeout: float | None = None,
             stop_when_no_senders: bool = False) -> bytes:
        """The next message; :class:`Timeout` after ``timeout`` seconds;
        ChannelClosed once closed and drained.  Acknowledges the previous one."""
        refuse("recv", self._name, {"stop_when_no_senders": stop_when_no_senders})
        got = self._take(1, timeout)
        if not got:
            raise _timed_out(f"nothing arrived on {self._kind} {self._name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        return got[0]

    def recv_nowait(self) -> bytes:
        """The next message if one is ready, else :class:`Empty`."""
        got = self._take(1, 0, nowait=True)
        if not got:
            raise Empty(f"{self._kind} {self._name!r} is empty")
        return got[0]

    def recv_many(self, max_n: int = 1024, timeout: float | None = None,
                  stop_when_no_senders: bool = False) -> list[bytes]:
        """Up to ``max_n`` ready messages, waiting for the first; ``[]`` on timeout."""
        refuse("recv_many", self._name, {"stop_when_no_senders": stop_when_no_senders})
        if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
            raise ValueError(f"max_n must be an int >= 1, not {max_n!r}")
        return self._take(max_n, timeout)

    def recv_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """Receive into a writable buffer; returns the message's length.  A message
        larger than the buffer raises :class:`MessageTooLarge` and is handed back
        unacknowledged: this handle's next receive gets it again (another handle
        after ``claim_idle``)."""
        try:  # checked before receiving: the message would be lost
            out = writable_bytes(buffer, "recv_into()")
        except TypeError as e:
            raise UnsupportedTypeError(str(e)) from None
        msg = self.recv(timeout)
        try:
            if len(msg) > len(out):
                raise MessageTooLarge(f"a message of {len(msg)} bytes does not fit the "
                                      f"buffer's {len(out)}; it will be delivered again")
            out[:len(msg)] = msg
        except BaseException:
            self._unacked.pop()  # handed back: not acknowledged, and read again first
            self._own_first = True
            raise
        return len(msg)

    def messages(self, *, timeout: float | None = None,
                 stop_when_no_senders: bool = False) -> Iterator[bytes]:
        """Iterate until the channel is closed and drained (or ``timeout`` passes
        with nothing: :class:`Timeout`)."""
        refuse("messages", self._name, {"stop_when_no_senders": stop_when_no_senders})
        while True:
            try:
                yield self.recv(timeout)
            except ChannelClosed:
                return

    def __iter__(self) -> Iterator[bytes]:
        return self.messages()

    # -- state ----------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Messages not yet acknowledged: waiting, or received by another handle
        and not acknowledged yet (this handle's own are not counted)."""
        self._live()
        return max(0, int(self._r.xlen(self._key)) - len(self._unacked))

    @property
    def max_message(self) -> int:
        return MAX_MESSAGE

    @property
    def claim_idle(self) -> float:
        return self._claim_idle

    @property
    def consumer(self) -> str:
        return self._consumer

    def statistics(self) -> dict[str, int]:
        """``{"depth", "pending", "consumers", "sent", "closed", "maxsize"}``: pending
        counts messages received and not acknowledged; sent counts every XADD."""
        self._live()
        pipe = self._r.pipeline(transaction=False)
        pipe.xinfo_stream(self._key)
        pipe.xinfo_groups(self._key)
        pipe.hget(self._meta_key, "closed")
        stream, groups, closed = pipe.execute()
        group: dict[str, Any] = next(
            (g for g in groups if g["name"] in (GROUP, GROUP.encode())), {})
        return {"depth": int(stream["length"]), "pending": int(group.get("pending", 0)),
                "consumers": int(group.get("consumers", 0)),
                "sent": int(stream.get("entries-added", 0) or 0),
                "closed": int(closed == b"1"), "maxsize": self._maxsize}

    def close(self) -> None:
        """Acknowledge what this handle received and release it (the channel stays)."""
        if self._closed:
            return
        try:
            if self._unacked and os.getpid() == self._pid:
                self.ack()
        except ShmkitError:
            pass  # the server is away: they stay pending, and are delivered again
        finally:
            self._closed = True

    def unlink(self) -> None:
        """Remove the stream, its group and its meta from Redis."""
        RedisObject.unlink(self)

    def __repr__(self) -> str:
        if self._closed:
            return f"<shmkit.redis.{type(self).__name__} {self._name!r} closed>"
        return f"<shmkit.redis.{type(self).__name__} {self._name!r} at {self._ns.url}>"
