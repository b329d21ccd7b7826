"""The Redis namespace, the base of every Redis-backed object, and error translation.

Every key of an object named ``n`` in a namespace with prefix ``p`` starts
with ``p:{n}``: the data (a hash, a stream, a string), ``p:{n}:meta`` (a hash:
``kind``, ``format`` and the parameters fixed at creation), and the kind's
own extra keys (``:fence``, ``:wake``...).  The braces are Redis Cluster's
hash tag: every key of one object lives in one hash slot, so the scripts
that touch several of them run on a cluster too.  One name holds one kind,
as in shared memory: opening a Store's name as a Channel raises WrongKindError.
"""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

try:
    import redis as _redis
    from redis.exceptions import RedisError
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis backend of shmkit needs redis-py: pip install 'shmkit[redis]' "
        f"(it brings redis and hiredis); {_e}") from _e

from .._object import DEFAULT, given
from ..errors import (
    BackendError,
    ClosedError,
    CorruptError,
    ExistsError,
    FormatVersionError,
    InvalidNameError,
    NotFoundError,
    ShmkitError,
    UnsupportedParameterError,
    WrongKindError,
)
from ..segment import _validate_name, mismatch
from ..sync import _deadline
from . import Namespace

if TYPE_CHECKING:
    from typing_extensions import Self

    from .channel import Channel
    from .event import Event
    from .mutex import Mutex
    from .queue import Queue
    from .store import Store
    from .topic import Topic

FORMAT = 2  # the layout of shmkit's Redis keys (meta hash "format" field)
# Format 1 named an object's keys p:n... without a hash tag.
CHUNK = 1.0  # the longest single blocking Redis call, in seconds

_HOST = socket.gethostname()

# Create or open an object's meta hash in one step.
# KEYS[1] meta; ARGV[1] "create" | "open" | "either", ARGV[2..] field, value pairs
_META = """
if redis.call('exists', KEYS[1]) == 0 then
  if ARGV[1] == 'open' then return {0} end
  redis.call('hset', KEYS[1], unpack(ARGV, 2))
  return {1}
end
if ARGV[1] == 'create' then return {2} end
return {3, redis.call('hgetall', KEYS[1])}
"""

_REASONS = {
    "path": "a Redis object lives in the server, not in a file",
    "size": "Redis sizes its data itself; bound memory with the server's maxmemory",
    "max_size": "Redis sizes its data itself; bound memory with the server's maxmemory",
    "capacity": "a Redis stream counts messages, not bytes (a Queue takes maxsize=)",
    "lifetime": "a Redis object lives until unlink(), whatever the handles do",
    "max_attach": "Redis has no attach table",
    "mode": "Redis has no file permissions (use the server's ACLs)",
    "trust_owner": "Redis has no file owners (use the server's ACLs)",
    "read_timeout": "Redis reads never wait for a writer",
    "timeout": "Redis writes never wait for a lock (connect(socket_timeout=) bounds "
               "each command)",
    "stop_when_no_senders": "a Redis stream does not know its senders",
    "ctx": "a Redis queue needs no multiprocessing context",
}


def refuse(what: str, name: str, params: dict[str, Any]) -> None:
    """Refuse every explicit parameter the Redis backend cannot honour."""
    for key, value in params.items():
        if not given(value) or value is None or value is False:
            continue
        if key == "mode" and value == 0o600:
            continue
        reason = _REASONS.get(key)
        if reason is None:
            raise TypeError(f"{what}() got an unexpected keyword argument {key!r}")
        raise UnsupportedParameterError(
            f"{what} {name!r} on Redis cannot honour {key}={value!r}: {reason}; leave "
            f"{key}= out for a Redis namespace")


def _translate(ns: "RedisNamespace", e: BaseException, what: str) -> BackendError:
    where = f"the Redis server at {ns.url}"
    if isinstance(e, _redis.exceptions.BusyLoadingError):
        return BackendError(f"{what}: {where} is loading its data after a restart; retry "
                            f"in a moment ({e})")
    if isinstance(e, (_redis.exceptions.ConnectionError, _redis.exceptions.TimeoutError,
                      OSError)):
        return BackendError(f"{what}: {where} could not be reached ({e}); check that it "
                            "runs and is reachable.  A write in progress may or may not "
                            "have been applied (docs/redis.md)")
    return BackendError(f"{what}: {where} refused a command: {e}")


class _Guarded(Protocol):
    """What a guarded method's object has: its namespace and a name for messages."""

    @property
    def _ns(self) -> RedisNamespace: ...

    def _what_name(self) -> str: ...


_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)


def guarded(func: _F) -> _F:
    """Turn redis-py exceptions raised by a method into :class:`BackendError`."""
    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def gen(self: _Guarded, *args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from func(self, *args, **kwargs))
            except ShmkitError:
                raise
            except (RedisError, OSError) as e:
                raise _translate(self._ns, e, self._what_name()) from e
        return cast("_F", gen)  # the same signature: functools.wraps keeps it

    @functools.wraps(func)
    def call(self: _Guarded, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, *args, **kwargs)
        except ShmkitError:
            raise
        except (RedisError, OSError) as e:
            raise _translate(self._ns, e, self._what_name()) from e
    return cast("_F", call)


_GUARDED_DUNDERS = {"__getitem__", "__setitem__", "__delitem__", "__contains__", "__len__",
                    "__iter__", "__next__", "__enter__", "__exit__", "__repr__"}


def guard_all(cls: _C) -> _C:
    """Class decorator: every public method (and the mapping dunders) guarded,
    but those the class names in ``_unguarded``: methods that run the caller's
    code (iterators, mappings), whose OSError is theirs, and reach the server
    only through guarded methods."""
    skip = getattr(cls, "_unguarded", ())
    for key, value in list(vars(cls).items()):
        if not callable(value) or isinstance(value, type) or key in skip:
            continue
        if key.startswith("_") and key not in _GUARDED_DUNDERS:
            continue
        setattr(cls, key, guarded(value))
    return cls


# When a wait of a timeout ends (None: never): the local objects' rule.
deadline = _deadline


def remaining(end: float | None) -> float:
    """Seconds left before ``end`` (CHUNK at most, so waits stay interruptible)."""
    if end is None:
        return CHUNK
    return max(0.0, min(CHUNK, end - time.monotonic()))


def as_bytes_or_none(value: bytes | str | None) -> bytes | None:
    """A string reply of redis-py (or nil: a missing key or field), as the bytes it is.

    Every client of a namespace returns bytes (RedisNamespace refuses
    ``decode_responses=True``); redis-py's annotations say ``bytes | str``
    because they cannot see that option.  The other replies that hold
    strings are cast in place, citing this.  No check: this is on every read.
    """
    return cast("bytes | None", value)


class RedisNamespace(Namespace):
    """Objects in a Redis server, by name (see :func:`shmkit.connect`)."""

    backend = "redis"
    prefix: str = "shmkit"  # always a str (connect(prefix=) or this default)
    cluster = False  # the URL named a node of a Redis Cluster

    def __init__(self, url: str, *, prefix: str = "shmkit", socket_timeout: float = 10.0,
                 **client_options: Any) -> None:
        self.url = url
        self.prefix = prefix
        self._options: dict[str, Any] = dict(client_options, socket_timeout=socket_timeout)
        if socket_timeout is not None and not socket_timeout > CHUNK + 1:
            raise ValueError(f"socket_timeout must be more than {CHUNK + 1} s (blocking "
                             f"calls wait up to {CHUNK} s at a time), not {socket_timeout!r}")
        try:
            first: _redis.Redis = _redis.Redis.from_url(url, **self._options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot use Redis URL {url!r}: {e}") from e
        if first.connection_pool.connection_kwargs.get("decode_responses"):
            first.close()
            raise UnsupportedParameterError(
                f"a namespace on {url} cannot honour decode_responses=True: shmkit encodes "
                "keys and values itself and reads bytes back; leave decode_responses out "
                "(of the keywords and of the URL)")
        self._closed = False
        self.r = first
        try:
            self.cluster = first.info("cluster").get("cluster_enabled") == 1
            if self.cluster:  # a node of a Redis Cluster: talk to the whole cluster
                first.close()
                self.r = cast("_redis.Redis", _redis.RedisCluster.from_url(url, **self._options))
                self.r.ping()
        except (RedisError, OSError) as e:
            raise _translate(self, e, "connect") from e
        self._meta = self.r.register_script(_META)

    # -- the kinds ------------------------------------------------------------

    def Store(self, name: str, **kwargs: Any) -> Store:  # noqa: N802
        from .store import Store
        return Store(self, name, **kwargs)

    def Channel(self, name: str, **kwargs: Any) -> Channel:  # noqa: N802
        from .channel import Channel
        return Channel(self, name, **kwargs)

    def Queue(self, name: str, maxsize: int | None = None,  # noqa: N802
              **kwargs: Any) -> Queue:
        from .queue import Queue
        return Queue(self, name, DEFAULT if maxsize is None else maxsize, **kwargs)

    def Mutex(self, name: str, **kwargs: Any) -> Mutex:  # noqa: N802
        from .mutex import Mutex
        return Mutex(self, name, **kwargs)

    def Event(self, name: str, **kwargs: Any) -> Event:  # noqa: N802
        from .event import Event
        return Event(self, name, **kwargs)

    def Topic(self, name: str, **kwargs: Any) -> Topic:  # noqa: N802
        from .topic import Topic
        return Topic(self, name, **kwargs)

    # -- plumbing -------------------------------------------------------------

    def key(self, name: str) -> str:
        """The key of object ``name``: the others add a suffix to it; the braces
        keep them all in one hash slot of a cluster."""
        return f"{self.prefix}:{{{name}}}"

    def client_id(self) -> str:
        """``host:pid:random``: who holds a lease or consumes a stream."""
        return f"{_HOST}:{os.getpid()}:{secrets.token_hex(4)}"

    def close(self) -> None:
        """Close the connections (objects opened through it stop working)."""
        if not self._closed:
            self._closed = True
            self.r.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RedisNamespace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[[str, str, dict[str, Any]], RedisNamespace],
                                  tuple[str, str, dict[str, Any]]]:
        return (_reconnect, (self.url, self.prefix, self._options))

    def __repr__(self) -> str:
        return f"<shmkit namespace {self.url} prefix={self.prefix!r}>"


def _reconnect(url: str, prefix: str, options: dict[str, Any]) -> RedisNamespace:
    return RedisNamespace(url, prefix=prefix, **options)


_thread_ids = threading.local()


class RedisObject:
    """What every Redis-backed object has: a name, meta, close, unlink, ``with``."""

    _kind = ""
    _extra_keys: tuple[str, ...] = ()

    def __init__(self, ns: RedisNamespace, name: str | None) -> None:
        if name is None:
            raise InvalidNameError(
                f"a Redis {self._kind} needs a name: it is not removed with its last "
                "handle, so an anonymous one would be left behind; pass a name")
        _validate_name(name)
        self._ns = ns
        self._r = ns.r
        self._name = name
        self._key = ns.key(name)
        self._meta_key = self._key + ":meta"
        self._closed = False
        self._created = False
        self._on_destroy: Callable[[], Any] | None = None

    def _what_name(self) -> str:
        return f"{self._kind} {getattr(self, '_name', '?')!r}"

    def _open_meta(self, create: bool | None, fields: dict[str, Any]) -> dict[str, str]:
        """Create or open the meta hash; check kind and format.  Returns its fields."""
        mode = "either" if create is None else ("create" if create else "open")
        args: list[Any] = [mode, "kind", self._kind, "format", FORMAT]
        for k, v in fields.items():
            args += [k, v]
        try:
            got = self._ns._meta(keys=[self._meta_key], args=args)
        except (RedisError, OSError) as e:
            raise _translate(self._ns, e, f"open {self._what_name()}") from e
        status = got[0]
        if status in (0, 1):
            # Not found, or just created: under the format 1 layout it may exist
            # (an open of a present object, the usual case, costs no lookup)
            self._refuse_format_1(status == 1)
        if status == 0:
            raise NotFoundError(f"no {self._kind} {self._name!r} in {self._ns.url} (prefix "
                                f"{self._ns.prefix!r}); create it (create=None or True)")
        if status == 2:
            raise ExistsError(f"{self._kind} {self._name!r} already exists in {self._ns.url}; "
                              "open it (create=None or False), or unlink() it first")
        if status == 1:
            self._created = True
            return {k: str(v) for k, v in fields.items()}
        raw = got[1]
        try:
            meta = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
        except UnicodeDecodeError:
            raise self._corrupt_meta("a field", "bytes that are not UTF-8") from None
        if meta.get("kind") != self._kind:
            raise WrongKindError(f"{self._ns.key(self._name)!r} in {self._ns.url} holds kind "
                                 f"{meta.get('kind')!r}, not a {self._kind!r}; use another name")
        if meta.get("format") != str(FORMAT):
            raise FormatVersionError(
                f"{self._kind} {self._name!r} has shmkit Redis format {meta.get('format')}; "
                f"this shmkit reads format {FORMAT}; use the shmkit that made it, or unlink it")
        return meta

    def _refuse_format_1(self, created: bool) -> None:
        """FormatVersionError if format 1 keys of this name exist; a meta hash
        just created beside them is removed first."""
        old = f"{self._ns.prefix}:{self._name}:meta"
        try:
            if not self._r.exists(old):
                return
            if created:
                self._r.delete(self._meta_key)
        except (RedisError, OSError) as e:
            raise _translate(self._ns, e, f"open {self._what_name()}") from e
        raise FormatVersionError(
            f"{self._kind} {self._name!r} in {self._ns.url} was made by an older shmkit "
            f"(format 1, keys {self._ns.prefix}:{self._name}...); this shmkit reads "
            f"format {FORMAT}: use the shmkit that made it, or delete those keys")

    @staticmethod
    def _mismatch(what: str, name: str, param: str, asked: Any, found: Any) -> Exception:
        return mismatch(what, name, param, asked, found)

    def _corrupt_meta(self, field: str, value: object) -> CorruptError:
        """The error of a meta hash that no shmkit wrote (another program's keys)."""
        return CorruptError(
            f"{self._kind} {self._name!r}: the meta hash {self._meta_key!r} in "
            f"{self._ns.url} has {field} = {value!r:.60}, which no shmkit writes; another "
            "program uses these keys: use another name (or prefix), or delete its keys "
            f"({self._key}*) if they are stale")

    def _removed(self) -> NotFoundError:
        """The error of a write through a handle whose object is gone from Redis."""
        return NotFoundError(
            f"{self._kind} {self._name!r} was removed from {self._ns.url} (unlink() by "
            "another handle, or a server restart without persistence) after this handle "
            "opened it; nothing was written: open it again to make it anew")

    def _live(self) -> None:
        if self._closed:
            raise ClosedError(f"{self._kind} {self._name!r} was closed in this process")

    @property
    def name(self) -> str:
        """The object's name (its Redis keys are ``<prefix>:<name>...``)."""
        return self._name

    @property
    def created(self) -> bool:
        """True if this handle created the object."""
        return self._created

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this handle; the object stays in Redis for everyone else."""
        self._closed = True

    def unlink(self) -> None:
        """Remove the object's keys from Redis (handles still open see it gone)."""
        self._r.delete(self._key, self._meta_key,
                       *(self._key + suffix for suffix in self._extra_keys))
        if self._on_destroy is not None:
            self._on_destroy()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[
            Callable[[RedisNamespace, type[RedisObject], str, dict[str, Any]], RedisObject],
            tuple[RedisNamespace, type[RedisObject], str, dict[str, Any]]]:
        return (_reopen, (self._ns, type(self), self._name, self._reopen_args()))

    def _reopen_args(self) -> dict[str, Any]:
        """The keywords that open this object again in another process."""
        return {}


def _reopen(ns: RedisNamespace, cls: type[RedisObject], name: str,
            kwargs: dict[str, Any]) -> RedisObject:
    return cls(ns, name, **kwargs)
