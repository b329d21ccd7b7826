"""One program, two backends: shared memory on this machine, or a Redis server.

``shmkit.connect(url)`` returns a *namespace* whose ``Store``, ``Channel``,
``Queue``, ``Mutex``, ``Event`` and ``Topic`` methods open objects by name; code written
against a namespace runs on either backend::

    import shmkit
    ns = shmkit.connect("local")                          # shared memory (the default)
    ns = shmkit.connect("redis://host:6379/0", prefix="app")   # a Redis server
    st = ns.Store("cache"); st["k"] = b"v"
    ch = ns.Channel("jobs"); ch.send(b"job"); ch.recv(timeout=1.0)
    with ns.Mutex("table"): ...
    ns.Event("ready").wait(timeout=5.0)

The Redis backend needs ``pip install shmkit[redis]`` (redis-py and hiredis);
importing shmkit, and the local namespace, never import redis.  What holds
and what weakens on Redis is in docs/redis.md; ``shmkit bridge`` forwards a
local Channel or Queue to a Redis stream and back (``shmkit.redis.bridge``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidNameError, UnsupportedParameterError
from ..segment import _validate_name

if TYPE_CHECKING:
    from ..channel import Channel, Queue
    from ..store import Store
    from ..sync import Event, Mutex
    from ..topic import Topic

__all__ = ["connect", "LocalNamespace", "Namespace"]

_SCHEMES = ("redis://", "rediss://", "unix://")


class Namespace:
    """What both namespaces offer: the kinds, by name (see :func:`connect`).

    The kinds return Any here: a local namespace opens :class:`shmkit.Store`
    and the rest, a Redis one the classes of ``shmkit.redis``, and which one
    :func:`connect` returns depends on its URL.  Each subclass names its own.
    """

    backend: str = ""
    url: str = ""
    prefix: str | None = None

    def Store(self, name: str, **kwargs: Any) -> Any:  # noqa: N802 (a kind)
        raise NotImplementedError

    def Channel(self, name: str, **kwargs: Any) -> Any:  # noqa: N802
        raise NotImplementedError

    def Queue(self, name: str, maxsize: int | None = None,  # noqa: N802
              **kwargs: Any) -> Any:
        raise NotImplementedError

    def Mutex(self, name: str, **kwargs: Any) -> Any:  # noqa: N802
        raise NotImplementedError

    def Event(self, name: str, **kwargs: Any) -> Any:  # noqa: N802
        raise NotImplementedError

    def Topic(self, name: str, **kwargs: Any) -> Any:  # noqa: N802
        raise NotImplementedError

    def close(self) -> None:
        """Release what the namespace holds (the Redis connections); objects
        opened through it must not be used afterwards."""

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalNamespace(Namespace):
    """Shared memory on this machine: ``ns.Store(name)`` is ``shmkit.Store(name)``.

    With ``prefix="app"`` the names are ``app.<name>`` (a Redis namespace's
    prefix keeps its objects apart in the same way).  Every keyword the
    module-level classes take is passed through.

    >>> ns = LocalNamespace()
    >>> st = ns.Store(None); st["a"] = 1; st["a"]
    1
    >>> st.close()
    """

    backend = "local"
    url = "local"

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is not None:
            _validate_name(prefix)
        self.prefix = prefix

    def _name(self, name: str | None) -> str | None:
        if name is None or self.prefix is None:
            return name
        _validate_name(name)  # alone: "" or 5 would make a valid "<prefix>.<name>"
        return f"{self.prefix}.{name}"

    def Store(self, name: str | None, **kwargs: Any) -> Store:  # noqa: N802
        from ..store import Store
        return Store(self._name(name), **kwargs)

    def Channel(self, name: str | None, **kwargs: Any) -> Channel:  # noqa: N802
        from ..channel import Channel
        return Channel(self._name(name), **kwargs)

    def Queue(self, name: str | None, maxsize: int | None = None,  # noqa: N802
              **kwargs: Any) -> Queue:
        from .._object import DEFAULT
        from ..channel import Queue
        return Queue(DEFAULT if maxsize is None else maxsize, name=self._name(name), **kwargs)

    def Mutex(self, name: str | None, **kwargs: Any) -> Mutex:  # noqa: N802
        from ..sync import Mutex
        return Mutex(self._name(name), **kwargs)

    def Event(self, name: str | None, **kwargs: Any) -> Event:  # noqa: N802
        from ..sync import Event
        return Event(self._name(name), **kwargs)

    def Topic(self, name: str | None, **kwargs: Any) -> Topic:  # noqa: N802
        from ..topic import Topic
        return Topic(self._name(name), **kwargs)

    def __repr__(self) -> str:
        return f"<shmkit namespace local prefix={self.prefix!r}>"

    def __reduce__(self) -> tuple[type[LocalNamespace], tuple[str | None]]:
        return (LocalNamespace, (self.prefix,))


def connect(url: str = "local", *, prefix: str | None = None,
            socket_timeout: float = 10.0, **client_options: Any) -> Namespace:
    """A namespace of shmkit objects: ``"local"`` (shared memory) or a Redis URL.

    Parameters
    ----------
    url:
        ``"local"`` for shared memory on this machine (the default), or a
        Redis URL: ``redis://host:6379/0``, ``rediss://...`` (TLS),
        ``unix:///path/redis.sock?db=0``.  A node of a Redis Cluster is
        recognised (``INFO cluster``) and the whole cluster used.
    prefix:
        Keeps the namespace's objects apart from others on the same backend:
        Redis keys are ``<prefix>:{<name>}...`` (default prefix ``"shmkit"``);
        local names are ``<prefix>.<name>`` (default: the names as given).
    socket_timeout:
        Redis only: seconds a command may take on the network before
        :class:`shmkit.BackendError` (blocking waits are cut into shorter
        calls, so they may last longer).
    client_options:
        Redis only: further keywords for ``redis.Redis.from_url`` (``password=``,
        ``ssl_ca_certs=``...); ``decode_responses=True`` is refused
        (:class:`shmkit.UnsupportedParameterError`): shmkit reads bytes back.

    Raises
    ------
    ValueError for an unknown URL scheme; ImportError naming the extra to
    install when redis-py is missing; :class:`shmkit.BackendError` when the
    server does not answer.

    Example
    -------
    >>> ns = connect("local")
    >>> ns.backend
    'local'
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str ('local' or 'redis://...'), not {type(url).__name__}")
    if url == "local":
        if client_options or socket_timeout != 10.0:
            raise UnsupportedParameterError(
                f"connect('local') cannot honour {sorted(client_options) or ['socket_timeout']}: "
                "those are Redis client options; leave them out for shared memory")
        return LocalNamespace(prefix)
    if not url.startswith(_SCHEMES):
        raise ValueError(f"url {url!r} is neither 'local' nor a Redis URL "
                         f"({', '.join(s + '...' for s in _SCHEMES)})")
    if prefix is not None:
        _check_prefix(prefix)
    from ._base import RedisNamespace
    return RedisNamespace(url, prefix=prefix if prefix is not None else "shmkit",
                          socket_timeout=socket_timeout, **client_options)


def _check_prefix(prefix: object) -> None:
    if not isinstance(prefix, str) or not prefix or len(prefix) > 200:
        raise InvalidNameError(f"prefix must be a non-empty str of at most 200 characters, "
                               f"not {prefix!r}")
