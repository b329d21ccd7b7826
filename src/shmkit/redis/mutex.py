"""A Mutex on Redis: a renewed lease with a fencing token.

Taking it is one script: ``SET <key> <holder> NX PX <lease>`` and, when that
succeeds, ``INCR <key>:fence`` (the fencing token, larger for every holder
there ever was).  While it is held a background thread renews the lease every
``lease / 3`` seconds, only if the key still names this holder.  Release is a
compare-and-delete, so only the holder releases; it also pushes a wake-up on
``<key>:wake``, a list the waiters block on (BLPOP), so they do not poll.

A holder that is stopped (SIGSTOP, a pause, a partition) for longer than the
lease loses it: another process takes it with a larger fencing token, and the
old holder's release raises :class:`LeaseLostError`.  Pass the token to the
storage the lock guards, and have it refuse a smaller token than it has seen.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from typing import Any

from redis.exceptions import RedisError

from .. import _core
from ..errors import _timed_out, CorruptError, LeaseLostError, WouldBlock
from ..sync import lock_timeout
from ._base import (
    _HOST,
    RedisNamespace,
    RedisObject,
    as_bytes_or_none,
    deadline,
    guard_all,
    refuse,
)

__all__ = ["Mutex"]

LEASE = 10.0

# KEYS lock, fence, owner-marker; ARGV holder, lease ms.
# {token, recovered} when taken, {0, pttl} when held by another.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local rec = redis.call('exists', KEYS[3])
  redis.call('set', KEYS[3], ARGV[1])
  return {redis.call('incr', KEYS[2]), rec}
end
return {0, redis.call('pttl', KEYS[1])}
"""

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS lock, owner-marker, wake; ARGV holder, lease ms
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2], KEYS[3])
  redis.call('rpush', KEYS[3], '1')
  redis.call('pexpire', KEYS[3], ARGV[2])
  return 1
end
return 0
"""


@guard_all
class Mutex(RedisObject):
    """A mutual-exclusion lease in Redis, shared by name, with a fencing token.

    ``acquire(blocking=True, timeout=None)``, ``release()``, ``locked()``,
    ``acquire_nowait()``, ``held(timeout)``, ``with mutex:`` as for
    :class:`shmkit.Mutex`.  The lock belongs to this handle (another handle,
    even in the same process, cannot release it).

    Parameters
    ----------
    lease:
        Seconds the lease lasts without renewal (default 10); renewed every
        ``lease / 3`` while held.  A holder unable to renew for ``lease``
        seconds loses the lock.
    create:
        ``None`` create or open, ``True`` only create, ``False`` only open.

    Attributes: ``fencing_token`` (the token of the current or last
    acquisition, None before any), ``recovered`` (the previous holder's lease
    ran out instead of being released).

    Example
    -------
    >>> m = ns.Mutex("table")                            # doctest: +SKIP
    >>> with m:                                          # doctest: +SKIP
    ...     storage.write(data, fence=m.fencing_token)
    """

    _kind = "mutex"
    _extra_keys = (":fence", ":owner", ":wake")

    def __init__(self, ns: RedisNamespace, name: str, *, lease: float = LEASE,
                 create: bool | None = None, on_destroy: Callable[[], Any] | None = None,
                 **local_only: Any) -> None:
        super().__init__(ns, name)
        refuse("Mutex", name, local_only)
        if (isinstance(lease, bool) or not isinstance(lease, (int, float))
                or not 0.05 <= lease <= 1e6):
            raise ValueError(f"lease must be a number of seconds from 0.05 to 1e6, "
                             f"not {lease!r}")
        self._open_meta(create, {})
        self._lease = float(lease)
        self._lease_ms = max(50, int(lease * 1000))
        self._on_destroy = on_destroy
        self._holder: str | None = None
        self._holder_pid = 0  # the process that took it: a forked child does not hold it
        self._token: int | None = None
        self._recovered = False
        self._lost = threading.Event()
        self._stop: threading.Event | None = None
        self._renewer: threading.Thread | None = None
        self._since = 0.0
        self._acquire_s = self._r.register_script(_ACQUIRE)
        self._renew_s = self._r.register_script(_RENEW)
        self._release_s = self._r.register_script(_RELEASE)
        k = self._key
        self._keys = (k, k + ":fence", k + ":owner", k + ":wake")

    def _reopen_args(self) -> dict[str, Any]:
        return {"lease": self._lease}

    # -- taking and giving back -----------------------------------------------

    def _try(self) -> int:
        """Take it if free; returns 0 when taken, else the ms its lease has left."""
        holder = self._ns.client_id()
        token, extra = self._acquire_s(keys=list(self._keys[:3]),
                                       args=[holder, self._lease_ms])
        if token == 0:
            return max(int(extra), 1) if int(extra) > 0 else 1
        self._holder, self._token, self._recovered = holder, int(token), bool(extra)
        self._holder_pid = os.getpid()
        self._since = time.monotonic()
        self._lost.clear()
        self._start_renewer(holder)
        return 0

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False when ``blocking`` is false or ``timeout`` passes first.

        Waiters sleep on the lock's wake-up list (BLPOP), for at most the
        holder's remaining lease at a time, so an expired lease is noticed.
        """
        self._live()
        if not blocking and timeout is not None:
            _core.nowait_timeout_check(timeout, "acquire()", "blocking")
        end = deadline(lock_timeout(timeout))
        while True:
            left_ms = self._try()
            if left_ms == 0:
                return True
            if not blocking:
                return False
            wait = left_ms / 1000
            if end is not None:
                wait = min(wait, end - time.monotonic())
                if wait <= 0:
                    return False
            wait = max(0.01, min(wait, 1.0))
            self._r.blpop([self._keys[3]], timeout=wait)

    def acquire_nowait(self) -> None:
        """Take the lock if it is free, else raise :class:`WouldBlock`."""
        if not self.acquire(False):
            raise WouldBlock(f"mutex {self._name!r} is held")

    def release(self) -> None:
        """Give the lock back.  RuntimeError if this handle does not hold it;
        :class:`LeaseLostError` (a RuntimeError) if its lease ran out meanwhile."""
        self._live()
        holder = self._holder
        if holder is None:
            raise RuntimeError(f"mutex {self._name!r} is not held by this handle")
        if self._holder_pid != os.getpid():  # as the local Mutex: the holder is the parent
            raise RuntimeError(f"release of a shmkit lock that this process does not hold "
                               f"(mutex {self._name!r} is held by pid {self._holder_pid}, "
                               "which forked this process); release it there")
        self._stop_renewer()
        self._holder = None
        held = time.monotonic() - self._since
        done = self._release_s(keys=[self._keys[0], self._keys[2], self._keys[3]],
                               args=[holder, self._lease_ms])
        if not done:
            raise LeaseLostError(
                f"mutex {self._name!r}: the lease (lease={self._lease} s) ran out after "
                f"{held:.1f} s of holding (fencing token {self._token}) and the lock may "
                "have been taken since; what it guards may have been changed meanwhile")

    @contextmanager
    def held(self, timeout: float | None = None) -> Iterator["Mutex"]:
        """``with m.held(timeout=1.0):`` holds the lock, or raises :class:`Timeout`."""
        if not self.acquire(timeout=timeout):
            raise _timed_out(f"could not take mutex {self._name!r} within "
                             f"{_core.shown_seconds(timeout)} s")
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> "Mutex":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the renewer ----------------------------------------------------------

    def _start_renewer(self, holder: str) -> None:
        stop = threading.Event()
        self._stop = stop
        t = threading.Thread(target=self._renew_loop, args=(holder, stop),
                             name=f"shmkit-lease-{self._name}", daemon=True)
        self._renewer = t
        t.start()

    def _renew_loop(self, holder: str, stop: threading.Event) -> None:
        interval = self._lease / 3
        last_ok = time.monotonic()
        while not stop.wait(interval):
            try:
                ok = self._renew_s(keys=[self._keys[0]], args=[holder, self._lease_ms])
            except (RedisError, OSError):
                if time.monotonic() - last_ok >= self._lease:
                    self._lost.set()
                    return
                continue  # the server may come back before the lease runs out
            if not ok:
                self._lost.set()
                return
            last_ok = time.monotonic()

    def _stop_renewer(self) -> None:
        stop, t = self._stop, self._renewer
        self._stop = self._renewer = None
        if stop is not None:
            stop.set()
        if t is not None and t is not threading.current_thread():
            t.join()

    # -- state ----------------------------------------------------------------

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current (or last) acquisition by this handle."""
        return self._token

    @property
    def recovered(self) -> bool:
        """True if the last acquisition found the previous holder's lease run out."""
        return self._recovered

    @property
    def lease(self) -> float:
        return self._lease

    @property
    def lost(self) -> bool:
        """True once the renewer found the lease gone while this handle held it."""
        return self._holder is not None and self._lost.is_set()

    def locked(self) -> bool:
        """True while anyone holds the lease."""
        self._live()
        return bool(self._r.exists(self._keys[0]))

    def holder_pid(self) -> int | None:
        """The pid of the holder if it runs on this host, else None (free, or remote)."""
        self._live()
        raw = as_bytes_or_none(self._r.get(self._keys[0]))
        if raw is None:
            return None
        host, _, rest = raw.decode(errors="replace").partition(":")
        if host != _HOST:
            return None
        try:
            return int(rest.partition(":")[0])
        except ValueError:
            raise self._foreign_holder(raw) from None

    def statistics(self) -> dict[str, Any]:
        """``{"locked", "holder", "lease_left_ms", "fencing_token", "recovered"}``."""
        self._live()
        pipe = self._r.pipeline(transaction=False)
        pipe.get(self._keys[0])
        pipe.pttl(self._keys[0])
        pipe.get(self._keys[1])
        holder, pttl, fence = pipe.execute()
        try:
            return {"locked": holder is not None,
                    "holder": holder.decode() if holder else None,
                    "lease_left_ms": max(int(pttl), 0) if holder else 0,
                    "fencing_token": int(fence or 0), "recovered": self._recovered}
        except (UnicodeDecodeError, ValueError):
            raise self._foreign_holder((holder or b"") + b" / " + (fence or b"")) from None

    def _foreign_holder(self, raw: bytes) -> CorruptError:
        return CorruptError(
            f"mutex {self._name!r}: the lock keys {self._key!r} hold {raw[:60]!r}, which no "
            "shmkit writes (a holder is host:pid:random, the fencing counter an integer); "
            "another program uses these keys: use another name, or delete them")

    def close(self) -> None:
        """Release this handle; a lock it holds is released first."""
        if self._closed:
            return
        try:
            if self._holder is not None and self._holder_pid == os.getpid():
                try:
                    self.release()
                except LeaseLostError:
                    pass
        finally:
            self._stop_renewer()
            self._closed = True

    def unlink(self) -> None:
        """Remove the lock, its fencing counter and meta (tokens restart at 1)."""
        RedisObject.unlink(self)

    def __repr__(self) -> str:
        return f"<shmkit.redis.Mutex {self._name!r} token={self._token}>"
