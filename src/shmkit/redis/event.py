"""An Event on Redis: waiters are notified, they do not poll.

A manual-reset event is the string ``<key>`` (``1`` while set) and a pub/sub
channel ``<key>:set``: ``set()`` writes the flag and publishes in one script;
``wait()`` subscribes first, then reads the flag, then waits for a
publication, so a ``set()`` between the two cannot be missed.

An auto-reset event (``auto_reset=True``) is a list ``<key>:token`` of at most
one element: ``set()`` pushes one if there is none, each ``wait()`` pops it
(BLPOP), so each ``set()`` releases exactly one waiter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.client import PubSub

from ..errors import ClosedError
from ._base import RedisNamespace, RedisObject, deadline, guard_all, refuse, remaining

__all__ = ["Event"]

_SET = """
redis.call('set', KEYS[1], '1')
redis.call('publish', KEYS[2], '1')
return 1
"""

_SET_AUTO = """
if redis.call('llen', KEYS[1]) == 0 then redis.call('rpush', KEYS[1], '1') end
return 1
"""


@guard_all
class Event(RedisObject):
    """A cross-machine event: ``set()``, ``clear()``, ``wait(timeout)``, ``is_set()``.

    As :class:`shmkit.Event`, including ``auto_reset`` (fixed at creation;
    MismatchError when opened with another, adopted when left out).

    Example
    -------
    >>> e = ns.Event("ready")                 # doctest: +SKIP
    >>> e.set(); e.wait(timeout=0.1)          # doctest: +SKIP
    True
    """

    _kind = "event"
    _extra_keys = (":set", ":token")

    def __init__(self, ns: RedisNamespace, name: str, *, auto_reset: bool | None = None,
                 create: bool | None = None, on_destroy: Callable[[], Any] | None = None,
                 **local_only: Any) -> None:
        super().__init__(ns, name)
        refuse("Event", name, local_only)
        meta = self._open_meta(create, {"auto_reset": int(bool(auto_reset))})
        have = meta.get("auto_reset") == "1"
        if auto_reset is not None and bool(auto_reset) != have:
            raise self._mismatch("event", name, "auto_reset", bool(auto_reset), have)
        self._auto = have
        self._on_destroy = on_destroy
        self._chan = self._key + ":set"
        self._token = self._key + ":token"
        self._set_s = self._r.register_script(_SET_AUTO if have else _SET)

    @property
    def auto_reset(self) -> bool:
        return self._auto

    def set(self) -> None:
        """Set the flag and wake the waiters (one waiter if auto-reset)."""
        self._live()
        if self._auto:
            self._set_s(keys=[self._token])
        else:
            self._set_s(keys=[self._key, self._chan])

    def clear(self) -> None:
        self._live()
        self._r.delete(self._token if self._auto else self._key)

    def is_set(self) -> bool:
        self._live()
        if self._auto:
            return bool(self._r.llen(self._token))
        return bool(self._r.exists(self._key))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set; False if ``timeout`` seconds pass first.  Ctrl-C gets through."""
        self._live()
        end = deadline(timeout)
        if self._auto:
            while True:
                wait = remaining(end)
                if wait <= 0:
                    return bool(self._r.lpop(self._token))
                if self._r.blpop([self._token], timeout=max(wait, 0.01)) is not None:
                    return True
                if end is not None and time.monotonic() >= end:
                    return False
        # subscribe confirmations seen: the wait starts after one.  redis-py leaves
        # Redis.pubsub() unannotated in some releases (it returns a PubSub)
        ps: PubSub = self._r.pubsub()  # type: ignore[no-untyped-call,unused-ignore]
        try:
            ps.subscribe(self._chan)
            while True:  # the subscription is confirmed before the flag is read
                msg = ps.get_message(timeout=remaining(end))
                if msg is not None and msg.get("type") == "subscribe":
                    break
                if self._closed:
                    raise ClosedError(f"event {self._name!r} was closed in this process")
                if end is not None and time.monotonic() >= end:
                    return bool(self._r.exists(self._key))
            if self._r.exists(self._key):
                return True
            while True:
                wait = remaining(end)
                if wait <= 0:
                    return bool(self._r.exists(self._key))
                msg = ps.get_message(timeout=wait)
                if msg is not None and msg.get("type") == "message":
                    return True
        finally:
            ps.close()

    def statistics(self) -> dict[str, Any]:
        """``{"set", "auto_reset", "waiters"}`` (waiters: subscribers of a manual event)."""
        self._live()
        waiters = 0
        if not self._auto:
            waiters = int(dict(self._r.pubsub_numsub(self._chan)).get(self._chan.encode(), 0))
        return {"set": self.is_set(), "auto_reset": self._auto, "waiters": waiters}

    def close(self) -> None:
        """Release this handle (the event stays in Redis)."""
        RedisObject.close(self)

    def unlink(self) -> None:
        """Remove the event's keys from Redis."""
        RedisObject.unlink(self)

    def __repr__(self) -> str:
        return f"<shmkit.redis.Event {self._name!r} auto_reset={self._auto}>"

