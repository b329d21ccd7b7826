"""``multiprocessing.Queue``'s interface on a Redis stream (pickled objects).

The objects are pickled as :class:`shmkit.Queue` pickles them, and travel as
the messages of a Redis :class:`~shmkit.redis.channel.Channel` of kind
``queue``: at-least-once, per-producer order, ``maxsize`` honoured (``put``
waits while that many objects are not yet acknowledged).

>>> q = shmkit.connect("redis://localhost:6379/0").Queue("jobs")   # doctest: +SKIP
>>> q.put({"job": 1}); q.get(timeout=1.0)                          # doctest: +SKIP
{'job': 1}
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from .. import _core
from .._object import DEFAULT, _Default, given
from ..errors import ClosedError, Empty, Full, Timeout
from ._base import RedisNamespace, guard_all, refuse
from .channel import CLAIM_IDLE, Channel

__all__ = ["Queue"]

_MAX_ITEMS = 1 << 62


class _QueueChannel(Channel):
    _kind = "queue"


@guard_all
class Queue:
    """``multiprocessing.Queue`` over a Redis stream, shared by name.

    ``put(obj, block=True, timeout=None)``, ``get(block=True, timeout=None)``,
    ``put_nowait``, ``get_nowait``, ``qsize``, ``empty``, ``full``, ``close``,
    ``join_thread``, ``cancel_join_thread``; :class:`queue.Empty` /
    :class:`queue.Full` (as :class:`shmkit.Empty` / :class:`shmkit.Full`).

    Parameters
    ----------
    maxsize:
        At most this many objects not yet acknowledged (0: no limit); fixed at
        creation: opening with another raises :class:`MismatchError`.
    claim_idle, consumer, create, readonly, on_destroy:
        As for the Redis :class:`Channel`.
    capacity:
        Refused when given (a stream has no byte capacity).

    Example
    -------
    >>> q = ns.Queue("jobs", maxsize=100)            # doctest: +SKIP
    >>> q.put([1, 2]); q.get(timeout=1.0)             # doctest: +SKIP
    [1, 2]
    """

    def __init__(self, ns: RedisNamespace, name: str, maxsize: int | _Default = DEFAULT, *,
                 capacity: int | _Default = DEFAULT, create: bool | None = None,
                 claim_idle: float = CLAIM_IDLE, consumer: str | None = None,
                 readonly: bool = False, on_destroy: Callable[[], Any] | None = None,
                 **local_only: Any) -> None:
        if given(maxsize) and (not isinstance(maxsize, int) or isinstance(maxsize, bool)
                               or not 0 <= maxsize <= _MAX_ITEMS):
            raise ValueError(f"maxsize must be an int from 0 to {_MAX_ITEMS}, not {maxsize!r}")
        refuse("Queue", name, dict(local_only, capacity=capacity))
        ch = _QueueChannel.__new__(_QueueChannel)
        super(Channel, ch).__init__(ns, name)  # RedisObject: name and keys
        if (isinstance(claim_idle, bool) or not isinstance(claim_idle, (int, float))
                or not 0 < claim_idle < 1e9):
            raise ValueError(f"claim_idle must be a number of seconds > 0, not {claim_idle!r}")
        meta = ch._setup(create, {"maxsize": maxsize if given(maxsize) else 0}, claim_idle,
                         consumer, readonly, on_destroy)
        try:
            have = int(meta.get("maxsize", 0))
        except ValueError:
            raise ch._corrupt_meta("maxsize", meta.get("maxsize")) from None
        if given(maxsize) and maxsize != have:
            raise ch._mismatch("queue", name, "maxsize", maxsize, have)
        ch._maxsize = have
        self._ch = ch
        self._ns = ns

    def _what_name(self) -> str:
        return f"queue {self._ch._name!r}"

    def __reduce__(self) -> tuple[Callable[[RedisNamespace, str, float], Queue],
                                  tuple[RedisNamespace, str, float]]:
        return (_reopen_queue, (self._ns, self._ch._name, self._ch._claim_idle))

    @property
    def name(self) -> str:
        return self._ch._name

    @property
    def maxsize(self) -> int:
        return self._ch._maxsize

    @property
    def closed(self) -> bool:
        return self._ch._closed

    @property
    def created(self) -> bool:
        return self._ch._created

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` (pickled), waiting while ``maxsize`` objects are queued
        (``queue.Full`` when ``block`` is false or ``timeout`` seconds pass)."""
        if self._ch._closed:
            raise self._closed_error()
        if not block and timeout is not None:
            _core.nowait_timeout_check(timeout, "put()", "block")
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        if not block:
            self._ch.send_nowait(data)
            return
        try:
            self._ch.send(data, timeout)
        except Timeout as e:
            if not e._deadline:  # (a signal handler's own)
                raise
            raise Full(f"queue {self.name!r} stayed full for "
                       f"{_core.shown_seconds(timeout)} s") from None

    def _loads(self, data: bytes) -> Any:
        """Unpickle a message just received; one that is no pickle is set aside."""
        try:
            return pickle.loads(data)
        except Exception as e:
            raise self._ch._reject(self._ch._unacked[-1], f"is not a pickle ({e!r:.100})"
                                   ) from e

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an object (``queue.Empty`` when ``block`` is false or
        ``timeout`` seconds pass).  The previous one is acknowledged."""
        if self._ch._closed:
            raise self._closed_error()
        if not block:
            if timeout is not None:
                _core.nowait_timeout_check(timeout, "get()", "block")
            return self._loads(self._ch.recv_nowait())
        try:
            return self._loads(self._ch.recv(timeout))
        except Timeout as e:
            if not e._deadline:  # (a signal handler's own)
                raise
            raise Empty(f"queue {self.name!r} stayed empty for "
                        f"{_core.shown_seconds(timeout)} s") from None

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def ack(self) -> None:
        """Acknowledge the objects got so far (the next get and close() do it anyway)."""
        self._ch.ack()

    def qsize(self) -> int:
        """Objects not yet acknowledged."""
        if self._ch._closed:
            raise self._closed_error()
        return self._ch.depth

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.maxsize > 0 and self.qsize() >= self.maxsize

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"Queue {self!r} is closed in this process; open it again")

    def close(self) -> None:
        """Acknowledge what was got and release this handle (the queue stays)."""
        self._ch.close()

    def unlink(self) -> None:
        """Remove the queue's keys from Redis."""
        self._ch.unlink()

    def join_thread(self) -> None:
        """Nothing to wait for: ``put`` has already sent the object."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel (there is no feeder thread)."""

    def statistics(self) -> dict[str, int]:
        """The stream counters (see :meth:`Channel.statistics`)."""
        return self._ch.statistics()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<shmkit.redis.Queue closed>"
        return f"<shmkit.redis.Queue {self.name!r} maxsize={self.maxsize}>"


def _reopen_queue(ns: RedisNamespace, name: str, claim_idle: float) -> Queue:
    return Queue(ns, name, claim_idle=claim_idle)
