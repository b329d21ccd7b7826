"""``shmkit bridge``: forward a local Channel, Queue or Topic to a Redis stream, or back.

Processes on each machine keep talking through shared memory; one bridge per
direction and machine carries the messages across::

    machine A:  shmkit bridge --to   redis://r:6379/0 jobs   # local 'jobs' -> stream
    machine B:  shmkit bridge --from redis://r:6379/0 jobs   # stream -> local 'jobs'

``--to`` takes messages in place from the local channel (``recv_view`` with
``redeliver=True``, up to ``--batch`` at a time, one by default), adds them
to the stream (XADD), and only then releases them.  ``--from`` reads the
stream as the consumer ``bridge:<host>:<name>``, sends each message into the
local channel, and acknowledges it on Redis only after that send returned;
a message the local channel can never hold (or an entry shmkit did not
write) is moved to the stream ``<key>:rejected`` with a warning, and a local
channel that was ended stops the bridge (exit 1) with the rest left pending.

Where duplicates and losses can occur (docs/redis.md has the whole table):

- ``--from`` killed after a local send and before the acknowledgement: that
  message is delivered again when a bridge with the same consumer name starts
  (at once) or after ``--claim-idle`` seconds (any other consumer): a
  duplicate, never a loss.
- ``--to`` killed while it holds views (before or after the XADD): the local
  channel gives them back, and the next bridge (or any receiver of the
  channel) takes them again, before newer messages: those already added are
  added twice (at most ``--batch`` per kill, one by default), none is lost.
  Ctrl-C and SIGTERM never cause that: they stop the bridge between two
  batches.

Topics (``--topic``): ``--to`` subscribes to the local topic and publishes
what it receives to the Redis topic, a batch at a time; ``--from`` subscribes
to the Redis topic and publishes into the local one, and after each batch
records in Redis how far it got (``<prefix>:<remote>:bridge:<host>:<name>``),
so that a bridge restarted after a kill goes on from there: at most one
batch is published twice, none is lost while Redis keeps it (``maxlen``).
A ``--to`` bridge only sees what is published while it is subscribed.

Stopping: Ctrl-C (SIGINT) or SIGTERM finish the message in hand and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .._lazy import load, numpy

if TYPE_CHECKING:
    from ..channel import Channel as LocalChannel
    from ..channel import Queue as LocalQueue
    from ..topic import Subscriber as LocalSubscriber
    from ..topic import Topic as LocalTopic
    from .channel import Channel as RedisChannel
    from ._base import RedisNamespace
    from .queue import Queue as RedisQueue
    from .topic import Subscriber as RedisSubscriber
    from .topic import Topic as RedisTopic

__all__ = ["add_bridge_command", "cmd_bridge", "Bridge"]

_POLL = 0.2  # seconds a wait lasts before the stop flag is looked at again
_LAG_EVERY = 1.0  # seconds between two looks at how far behind the bridge is

#: A running bridge's status, a local Struct named ``<name>.bridge-to`` or
#: ``<name>.bridge-from`` (``shmkit top`` shows it): the bridge's pid,
#: messages forwarded, messages waiting to be forwarded (``lag``: the local
#: channel's depth or topic subscriber's lag for ``--to``, the Redis stream's
#: for ``--from``), and messages lost to overwriting or trimming (``missed``).
STATUS_FIELDS = ("pid", "forwarded", "lag", "missed")
STATUS_LAYOUT = struct.Struct("<QQQQ")
STATUS_SUFFIXES = (".bridge-to", ".bridge-from")

_T = TypeVar("_T")

_EXAMPLES = """\
examples:
  Local channel 'jobs' to the Redis stream 'shmkit:{jobs}' (on the sending machine):
    shmkit bridge --to redis://redis.example:6379/0 jobs
  And from that stream into local channel 'jobs' (on the receiving machine):
    shmkit bridge --from redis://redis.example:6379/0 jobs
  A local Queue, another remote name and prefix:
    shmkit bridge --queue --from unix:///run/redis.sock --prefix app --remote work jobs
  A local topic published to Redis, and on another machine received from it:
    shmkit bridge --topic --to redis://redis.example:6379/0 ticks
    shmkit bridge --topic --from redis://redis.example:6379/0 ticks
"""


def add_bridge_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       formatter: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    """Declare ``shmkit bridge`` on the CLI's subparsers."""
    purpose = ("forward a local Channel, Queue or Topic to a Redis stream (--to) or a Redis "
               "stream into it (--from), until Ctrl-C")
    p = sub.add_parser("bridge", prog="shmkit bridge", help=purpose,
                       description=purpose[0].upper() + purpose[1:] + ".",
                       epilog=_EXAMPLES, formatter_class=formatter)
    p.set_defaults(subparser=p, func=cmd_bridge)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", metavar="URL", help="forward the local object to this Redis")
    way.add_argument("--from", dest="from_", metavar="URL",
                     help="forward from this Redis into the local object")
    p.add_argument("name", metavar="NAME", help="the local Channel (or Queue, or Topic) name")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--queue", action="store_true",
                      help="the local object is a Queue (its pickled objects go as they are)")
    kind.add_argument("--topic", action="store_true",
                      help="the local object is a Topic, and so is the Redis one (every "
                           "subscriber on each side gets every message)")
    p.add_argument("--prefix", default="shmkit", help="the Redis key prefix (default shmkit)")
    p.add_argument("--remote", metavar="NAME", help="the Redis object's name (default NAME)")
    p.add_argument("--claim-idle", type=float, default=None, metavar="SECONDS",
                   help="--from: seconds before another consumer takes over messages a "
                        "dead bridge had not acknowledged (default 30)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="messages carried per Redis round trip (default 256; 1 for a channel "
                        "or queue --to: a bridge killed with a batch in hand loses it)")
    return p


class Bridge:
    """One direction of a bridge; ``run()`` until ``stop()`` (or a signal)."""

    def __init__(self, name: str, url: str, direction: str, *, queue: bool = False,
                 topic: bool = False, prefix: str = "shmkit", remote: str | None = None,
                 claim_idle: float = 30.0, batch: int = 256,
                 log: Callable[[str], object] | None = None) -> None:
        import socket

        from .. import channel as _local
        from . import connect

        if direction not in ("to", "from"):
            raise ValueError(f"direction must be 'to' or 'from', not {direction!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, not {batch!r}")
        if queue and topic:
            raise ValueError("a bridge carries a Queue or a Topic, not both")
        self.direction = direction
        self.name = name
        self._status: Any = None
        self.log: Callable[[str], object] = (
            log or (lambda text: print(text, file=sys.stderr, flush=True)))
        self.stopping = False
        self.forwarded = 0
        self._batch = batch
        remote = remote or name
        self.ns = connect(url, prefix=prefix)
        self._lq: LocalQueue | None = None
        self._rq: RedisQueue | None = None
        self._lt: LocalTopic | None = None
        self._rt: RedisTopic | None = None
        self.local: LocalChannel
        if topic:
            self._topic_setup(name, remote, url, prefix, direction)
            return
        if queue:
            self._lq = _local.Queue(name=name)
            if self._lq._ch is None:  # only before Queue() has opened it
                raise ValueError(f"local queue {name!r} has no channel")
            self.local = self._lq._ch  # the queue's pickled objects, as bytes
        else:
            self.local = _local.Channel(name)
        consumer = f"bridge:{socket.gethostname()}:{name}" if direction == "from" else None
        # a Redis URL: connect() returns a RedisNamespace, whose kinds are these
        self.remote: RedisChannel
        if queue:
            self._rq = self.ns.Queue(remote, claim_idle=claim_idle, consumer=consumer)
            self.remote = self._rq._ch
        else:
            self.remote = self.ns.Channel(remote, claim_idle=claim_idle, consumer=consumer)
        self.what = (f"local {'queue' if queue else 'channel'} {name!r} "
                     f"{'->' if direction == 'to' else '<-'} {url} {prefix}:{{{remote}}}")

    def _topic_setup(self, name: str, remote: str, url: str, prefix: str,
                     direction: str) -> None:
        import socket

        from ..topic import Topic
        self._lt = Topic(name)
        self._rt = self.ns.Topic(remote)
        self._place = f"{self._rt._key}:bridge:{socket.gethostname()}:{name}"
        self.what = (f"local topic {name!r} {'->' if direction == 'to' else '<-'} {url} "
                     f"{prefix}:{{{remote}}}")

    def stop(self, *_: object) -> None:
        self.stopping = True

    def _claim_status(self) -> None:
        """Make (or take over) this bridge's status record; BusyError when a
        live bridge of the same name and direction already runs."""
        from ..errors import BusyError
        from ..inspect import _pid_gone
        np = numpy()
        Struct = load("shmkit.records").Struct
        dt = np.dtype([(f, "<u8") for f in STATUS_FIELDS])
        self._status = Struct(f"{self.name}.bridge-{self.direction}", dt, lifetime="attached")
        rec = self._status.record
        with self._status.lock:
            pid = int(rec["pid"])
            busy = bool(pid) and pid != os.getpid() and not _pid_gone(pid)
            if not busy:
                rec["pid"], rec["forwarded"], rec["lag"], rec["missed"] = os.getpid(), 0, 0, 0
        if busy:
            self._status.close()
            self._status = None
            raise BusyError(f"a bridge of {self.name!r} ({self.direction}) already runs as "
                            f"pid {pid}; stop it first (two would share one place)")
        self._record = rec
        self._lag_at = 0.0

    def _count(self, forwarded: int = 0, missed: int = 0) -> None:
        """Add to the status record's counters (what ``shmkit top`` reads)."""
        self.forwarded += forwarded
        rec = self._record
        if forwarded:
            rec["forwarded"] = self.forwarded
        if missed:
            rec["missed"] += missed

    def _lag_due(self) -> bool:
        now = time.monotonic()
        if now - self._lag_at < _LAG_EVERY:
            return False
        self._lag_at = now
        return True

    def run(self) -> int:
        try:
            self._claim_status()
        except BaseException:
            self.close()
            raise
        self.log(f"shmkit bridge: {self.what} (Ctrl-C stops)")
        try:
            if self._lt is not None:
                status = self._topic_to() if self.direction == "to" else self._topic_from()
            else:
                status = self._to() if self.direction == "to" else self._from()
        finally:
            self.close()
        self.log(f"shmkit bridge: stopped; {self.forwarded} messages forwarded")
        return status

    def close(self) -> None:
        for obj in (self._lq, getattr(self, "local", None), self._rq,
                    getattr(self, "remote", None), self._lt, self._rt, self._status):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass
        self.ns.close()

    def _retrying(self, what: str, func: Callable[[], _T]) -> _T:
        """``func()``, retried while the Redis server cannot be reached (until stop).

        ``func`` may also call redis-py directly (the bridge's recorded place):
        its errors count as the backend's."""
        from redis.exceptions import RedisError

        from ..errors import BackendError
        from ._base import _translate
        pause, said = 0.1, False
        while True:
            try:
                try:
                    return func()
                except RedisError as raw:
                    raise _translate(cast("RedisNamespace", self.ns), raw, what) from raw
            except BackendError as e:
                if not said:
                    self.log(f"shmkit bridge: {what}: {e}; retrying")
                    said = True
                if self.stopping:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _to(self) -> int:
        from ..errors import BackendError, ChannelClosed, Empty, Timeout
        while not self.stopping:
            if self._lag_due():
                self._record["lag"] = self.local.depth
            views: list[Any] = []
            ended = False
            try:
                # views of a killed bridge go back to the channel (redeliver)
                views.append(self.local.recv_view(timeout=_POLL, redeliver=True))
                while len(views) < self._batch:
                    views.append(self.local.recv_view_nowait(redeliver=True))
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
                continue
            except Empty:
                pass
            except ChannelClosed:
                ended = True  # the views taken before it still go out first
            if ended and not views:
                self._retrying("close the stream", self.remote.close_sending)
                self.log("shmkit bridge: the local channel was ended; the stream is ended too")
                return 0
            with contextlib.ExitStack() as held:  # released once Redis has the messages
                data = [bytes(held.enter_context(v)) for v in views]
                try:
                    self._retrying("send", lambda: self._send_remote(data))
                    sent = True
                except BackendError:  # stopped while Redis was away
                    sent = False
            if not sent:  # give them back
                for d in data:
                    self.local.send(d)
                return 1
            self._count(len(views))
        return 0

    def _send_remote(self, data: list[bytes]) -> None:
        """Add messages to the stream in order, waiting while a remote Queue is full."""
        from ..errors import BackendError
        pause, sent = 0.001, 0
        while True:
            sent += self.remote._send_some(data[sent:sent + 1000])
            if sent == len(data):
                return
            if self.stopping:
                raise BackendError("stopped while the remote queue was full")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _from(self) -> int:
        from ..errors import BackendError, ChannelClosed, CorruptError, Timeout
        rch = self.remote
        while not self.stopping:
            if self._lag_due():
                try:
                    self._record["lag"] = rch.depth
                except BackendError:
                    pass  # the receive below retries and says so
            try:
                # acknowledges the previous batch: every one of it was handed on
                msgs = self._retrying("receive", lambda: rch._take(self._batch, _POLL))
            except ChannelClosed:
                self.local.close_sending()
                self.log("shmkit bridge: the stream was ended; the local channel is ended too")
                return 0
            except CorruptError as e:  # set aside already: the bridge goes on
                self.log(f"shmkit bridge: warning: {e}")
                continue
            except BackendError:
                return 1
            # the batch's ids, in order: the last ones this handle received
            ids = rch._unacked[len(rch._unacked) - len(msgs):]
            done = 0  # messages handed on (sent, or set aside)
            try:
                for msg in msgs:
                    if not self._hand_on(msg, ids[done]):
                        break
                    done += 1
            except ChannelClosed:
                self._keep_pending(ids[done:])
                self._retrying("acknowledge", rch.ack)
                self.log(f"shmkit bridge: the local channel {self.name!r} was ended "
                         f"(close_sending()); {len(msgs) - done} messages stay pending on "
                         "Redis for the next bridge: unlink the local channel, create it "
                         "again and start the bridge again")
                return 1
            except BaseException:
                self._keep_pending(ids[done:])  # close() acknowledges only those handed on
                raise
            if done < len(msgs):  # stopped: the others stay pending for this consumer name
                self._keep_pending(ids[done:])
                self._retrying("acknowledge", rch.ack)
                return 0
        try:
            self._retrying("acknowledge", rch.ack)
        except BackendError:
            return 1
        return 0

    def _keep_pending(self, ids: list[bytes]) -> None:
        """Leave these received messages unacknowledged: they were not handed on."""
        left = set(ids)
        self.remote._unacked = [i for i in self.remote._unacked if i not in left]

    def _hand_on(self, msg: bytes, ident: bytes) -> bool:
        """Send one message into the local channel; False if stopped first.  A
        message the local channel can never hold is set aside on Redis."""
        from ..errors import MessageTooLarge, Timeout
        while not self.stopping:
            try:
                self.local.send(msg, timeout=_POLL)
                self._count(1)
                return True
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
            except MessageTooLarge as e:
                why = f"is {len(msg)} bytes, more than local channel {self.name!r} holds"
                err = self._retrying("set aside", lambda: self.remote._reject(ident, why))
                self.log(f"shmkit bridge: warning: {err} ({e})")
                return True
        return False

    def _topic_to(self) -> int:
        from ..errors import BackendError, MessagesLost
        assert self._lt is not None and self._rt is not None
        rt = self._rt
        with self._lt.subscribe(history=0) as sub:
            while not self.stopping:
                if self._lag_due():
                    self._record["lag"] = sub.lag
                batch: list[bytes] = []
                try:
                    batch = sub.recv_many(self._batch, timeout=_POLL)
                except MessagesLost as e:
                    self._count(missed=e.missed)
                    self.log(f"shmkit bridge: {e.missed} local messages were overwritten "
                             "before the bridge read them")
                if not batch:
                    continue
                try:
                    self._retrying("publish", lambda: rt.publish_many(batch))
                except BackendError:  # stopped while Redis was away
                    self.log(f"shmkit bridge: {len(batch)} messages not published")
                    return 1
                self._count(len(batch))
        return 0

    def _parse_place(self, kept: bytes | None) -> tuple[int, bytes | None] | None:
        """The recorded place, or None: none yet, or not one a bridge wrote (then
        it is replaced, with a warning naming it, as on a first start)."""
        if kept is None:
            return None
        try:
            return _place_value(kept)
        except (ValueError, UnicodeDecodeError):
            self.log(f"shmkit bridge: warning: the place recorded at {self._place!r} is "
                     f"{kept[:40]!r}, not one a bridge writes; starting from the newest "
                     "message, as a first start does (and recording the place again)")
            return None

    def _topic_from(self) -> int:
        from ..errors import BackendError, CorruptError, MessagesLost, Timeout
        from ._base import as_bytes_or_none
        from .topic import Subscriber
        assert self._lt is not None and self._rt is not None
        lt, r, place = self._lt, self._rt._r, self._place
        try:
            kept = self._retrying("read the bridge's place",
                                  lambda: as_bytes_or_none(r.get(place)))
        except BackendError:
            return 1
        sub: RedisSubscriber
        found = self._parse_place(kept)
        if found is not None:  # a subscriber of another stream starts over at its first
            sub = Subscriber(self._rt, found[0], _stream=found[1])
        else:  # a first start: from now on, and a restart goes on from here
            sub = self._rt.subscribe(history=0)
            start = f"{sub.position}:{sub._stream.decode()}"
            try:
                self._retrying("record the bridge's place",
                               lambda: r.set(place, start, nx=kept is None))
            except BackendError:
                return 1
        while not self.stopping:
            if self._lag_due():
                try:
                    self._record["lag"] = sub.lag
                except BackendError:
                    pass  # the receive below retries and says so
            try:
                msgs = self._retrying("receive", lambda: sub.recv_many(self._batch, _POLL))
            except MessagesLost as e:
                self._count(missed=e.missed)
                self.log(f"shmkit bridge: {e.missed} messages were trimmed from the stream "
                         "before the bridge read them")
                continue
            except CorruptError as e:  # passed over: the bridge goes on
                self.log(f"shmkit bridge: warning: {e}")
                continue
            except BackendError:
                return 1
            done = 0  # published locally; the batch's numbers are consecutive
            for msg in msgs:
                while not self.stopping:
                    try:  # a local topic that makes publishers wait: keep looking at stop
                        lt.publish(msg, timeout=_POLL)
                        done += 1
                        break
                    except Timeout as e:
                        if not e._deadline:  # (a signal handler's own)
                            raise
                        continue
                if self.stopping:
                    break
            self._count(done)
            if msgs:
                at = f"{sub.position - (len(msgs) - done)}:{sub._stream.decode()}"
                try:
                    self._retrying("record the bridge's place", lambda: r.set(place, at))
                except BackendError:
                    return 1
        return 0


def _place_value(raw: bytes) -> tuple[int, bytes | None]:
    """A recorded place ``<number>:<stream stamp>`` (a bare number: an older bridge's,
    in the topic's stream of now); ValueError if it is neither."""
    number, colon, stamp = raw.partition(b":")
    pos = int(number.decode("ascii"))
    if pos < 0 or not (stamp.isalnum() or not stamp):
        raise ValueError(raw)
    return pos, stamp if colon else None


def cmd_bridge(args: argparse.Namespace) -> int:
    """Run ``shmkit bridge`` (see the module docstring)."""
    url = args.to if args.to is not None else args.from_
    if args.topic and args.claim_idle is not None:
        args.subparser.error("--claim-idle is for channels and queues: a topic's messages "
                             "are not taken by one consumer")
    bridge = Bridge(args.name, url, "to" if args.to is not None else "from",
                    queue=args.queue, topic=args.topic, prefix=args.prefix, remote=args.remote,
                    claim_idle=30.0 if args.claim_idle is None else args.claim_idle,
                    batch=args.batch if args.batch is not None
                    else 1 if args.to is not None and not args.topic else 256)
    old = {sig: signal.signal(sig, bridge.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return bridge.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
