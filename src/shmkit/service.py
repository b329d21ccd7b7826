"""Request/response between processes: many clients, many workers, one name.

A :class:`Service` is a name that clients send requests to and workers
answer.  Each request gets exactly one reply, delivered to the caller that
sent it::

    import shmkit

    # a worker process (start as many as you like)
    with shmkit.Service("resize") as svc:
        svc.serve(lambda data: data.upper())        # until Ctrl-C

    # a client process (as many as you like, from any number of threads)
    with shmkit.Client("resize") as client:
        reply = client.call(b"hello", timeout=1.0)  # b'HELLO'

What a service is made of (all listed by ``shmkit ls``):

``<name>``
    the service header (kind ``service``): a table of the workers, each
    entry the worker's kernel-backed attachment token and the ids of the
    request it is handling and of that request's reply channel, and the
    served/discarded/failed counters;
``<name>.requests``
    the request :class:`~shmkit.Channel` every worker receives from;
``<name>.reply.<16 hex digits>``
    one reply channel per client handle and thread, lifetime "attached":
    unlinked by the client's ``close()``, and removed by the workers (or
    ``shmkit gc``) when its client died.

A request carries its reply channel's 64-bit id (the 16 hex digits of its
name), the client's attachment token on it and a 63-bit request id; the
reply carries the request id back, so a reply that arrives after its call
timed out is recognised and dropped, never handed to the next call.  See
docs/service.md.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import struct
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from ._lazy import load
from . import _core
from . import segment as _segment
from ._object import DEFAULT, SharedObject, _Default, attach_segment, check_common
from .channel import DEFAULT_CAPACITY, Channel
from .errors import (
    _timed_out,
    ClosedError,
    CorruptError,
    FormatVersionError,
    Full,
    InvalidNameError,
    MessageTooLarge,
    NotFoundError,
    RemoteError,
    ReplyLost,
    ServiceUnavailable,
    ShmkitError,
    Timeout,
    WorkerDied,
    WrongKindError,
)
from .segment import DEFAULT_MAX_ATTACH, Closing, Kind, Segment, check_max_attach
from .sync import optional_seconds

__all__ = ["Service", "Client", "Worker", "Request"]

FORMAT = 2
DEFAULT_REPLY_CAPACITY = 1 << 20
#: Longest service name: its channels' names add at most 23 characters.
MAX_NAME = 200 - len(".reply.") - 16

# Service header payload (u64 words unless said otherwise):
#   0  magic u32 "SVC1", format u32
#   8  served      replies handed to a live caller's channel
#  16  discarded   replies dropped: caller gone, or its reply channel full
#  24  failed      requests answered with an error (the handler raised)
#  32  malformed   requests dropped because they could not be parsed
#  64  workers: one 24-byte entry per attach slot of the header segment:
#      token u64 (the worker's attachment token; 0: no worker), rid u64
#      (the request it is handling; 0: none), reply u64 (that request's
#      reply channel id, so that a worker that takes the slot of one that
#      died holding a request can tell its caller)
_MAGIC = 0x31435653
_OFF_SERVED, _OFF_DISCARDED, _OFF_FAILED, _OFF_MALFORMED = 8, 16, 24, 32
_OFF_TABLE = 64
_ENTRY_LAYOUT = struct.Struct("=QQQ")  # token, rid, reply (see above)
_ENTRY = _ENTRY_LAYOUT.size
_OFF_HWM = _core.layouts["segment"]["hwm"]

# Request: version u8, flags u8, 2 bytes unused, client token u32, request
# id u64, reply channel id u64 (its name: the service's, ".reply.", the id
# in 16 hex digits); then the payload.  The ids are where the worker's
# entry takes them (Channel._take_noted).
_REQ = struct.Struct("<BB2xIQQ")
_REQ_SIZE = _REQ.size
# Reply: version u8, status u8, 6 bytes unused, request id u64; then the payload.
_REP = struct.Struct("<BB6xQ")
_VERSION = 2
_F_PICKLE = 1
_OK, _ERROR, _DIED = 0, 1, 2  # _DIED: its worker died (told by the one in its slot)
_LOST = 3  # the reply could not be kept for a caller whose channel stayed full
_RID_MASK = (1 << 63) - 1

_FIRST_STEP = 0.02  # seconds a call waits for its reply before it first checks its worker
_SWEEP_EVERY = 1.0  # seconds between a worker's checks of its cached reply channels
_MAX_CACHED = 256   # reply channels a worker keeps open at most
# Replies a worker keeps for live callers whose reply channel is full (a
# stopped process, a blocked event loop, a slow reader), sent once there is
# room, tried again every _PAY_EVERY seconds.  At most, a worker: _KEEP_BYTES
# and _KEEP_MAX messages, for _KEEP_CHANNELS channels (which stay open: half
# the cache); a channel: _KEEP_CHANNEL_BYTES and _KEEP_CHANNEL_MAX replies,
# past which a reply is a short notice (ReplyLost), up to twice as many
# messages in all (so that one caller, a hostile one included, cannot take
# a worker's whole keep).
_KEEP_BYTES = 64 << 20
_KEEP_MAX = 65536
_KEEP_CHANNELS = _MAX_CACHED // 2
_KEEP_CHANNEL_BYTES = 16 << 20
_KEEP_CHANNEL_MAX = 4096
_PAY_EVERY = 0.02
# what an open of a reply channel raises when the name holds none of ours
_GONE = (NotFoundError, FileNotFoundError, WrongKindError, CorruptError, FormatVersionError,
         PermissionError, ValueError)
# anything an open of a reply channel raises (_GONE, or out of descriptors, slots...)
_UNOPENED = (ShmkitError, ValueError, OSError)
_REOPEN_TRIES = 100  # looks at a kept channel that cannot be opened, then dropped
# Past those bounds a reply is dropped and only its call's id kept (8 bytes),
# to tell the caller (ReplyLost) at the sweeps, opening at most _OWED_OPENS of
# those channels a sweep, up to _OWED_MAX ids a worker.
_OWED_MAX = 1 << 18
_OWED_OPENS = 64


def _service_bytes(max_attach: int) -> int:
    return _OFF_TABLE + _ENTRY * max_attach


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"a service name must be a str, not {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise InvalidNameError(
            f"service name {name[:40]!r}... has {len(name)} characters; a service name "
            f"has at most {MAX_NAME} (its channels' names add up to 23)")
    return name


class Service(SharedObject):
    """A request/response service shared by name.

    ``Service(name)`` creates the service or opens it (``create=True`` /
    ``False`` insist).  The same handle serves both sides:

    - workers: :meth:`serve` (a loop calling a handler), or :meth:`worker`
      for a :class:`Worker` that hands out :class:`Request` objects;
    - clients: :meth:`call`, or :meth:`client` for a :class:`Client`.

    Parameters
    ----------
    name:
        The service's name (at most 177 characters of a segment name).
    capacity:
        Bytes of the request channel when creating (default 1 MiB); the
        largest request is about this much.  When opening, a given
        capacity larger than the service's raises :class:`MismatchError`.
    create:
        ``None`` create or open, ``True`` only create, ``False`` only open.
    lifetime, mode, max_attach:
        As for :class:`shmkit.Segment` (``max_attach`` bounds how many
        workers and clients may hold the service at once).
    readonly:
        Only look (``statistics()``, ``info()``): calls and workers raise.

    Example
    -------
    >>> svc = Service("doc-echo")
    >>> import threading
    >>> t = threading.Thread(target=svc.serve, args=(bytes.upper,),
    ...                      kwargs={"max_requests": 1}); t.start()
    >>> with svc.client(wait_for_worker=5.0) as client:
    ...     client.call(b"ping", timeout=5.0)
    b'PING'
    >>> t.join(); svc.unlink(); svc.close()
    """

    _kind = Kind.SERVICE
    _what = "service"
    _requests: Channel | None = None
    _client: "Client | None" = None
    _channel_class: type[Channel] = Channel  # shmkit.aio.Service: awaitable channels

    def __init__(self, name: str, capacity: int | _Default = DEFAULT, *,
                 create: bool | None = None, lifetime: str | _Default | None = DEFAULT,
                 mode: int | None = None, max_attach: int | _Default = DEFAULT,
                 readonly: bool = False,
                 on_destroy: Callable[[], Any] | None = None) -> None:
        name = _check_name(name)
        slots = DEFAULT_MAX_ATTACH if isinstance(max_attach, _Default) else \
            check_max_attach(max_attach)
        life = "persistent" if isinstance(lifetime, _Default) or lifetime is None else lifetime

        def init(seg: Segment) -> None:
            _core.store32(seg._mapping, seg._hsize + 4, FORMAT)
            _core.store32(seg._mapping, seg._hsize, _MAGIC)

        seg = attach_segment(
            Kind.SERVICE, name, None,
            size=_service_bytes(slots) if create is not False and not readonly else None,
            create=False if readonly else create, mode=mode, readonly=readonly,
            lifetime=life, max_attach=slots, init=init,
            layout={"format": FORMAT, "requests": name + ".requests"})
        try:
            self._check(seg)
            if not seg.created:
                check_common("service", seg, lifetime=lifetime, max_attach=max_attach)
            try:
                self._requests = self._channel_class(
                    name + ".requests", capacity, create=False if readonly else None,
                    lifetime=lifetime, mode=mode, max_attach=max_attach, readonly=readonly)
            except NotFoundError:
                if not readonly:
                    raise
                self._requests = None  # only looking: the header alone is described
        except BaseException:
            if seg.created:  # a header without its request channel is no service
                try:
                    seg.unlink()
                except ShmkitError:
                    pass
            seg.close()
            raise
        self._seg = seg
        self._on_destroy = on_destroy
        self._lock = threading.Lock()

    @staticmethod
    def _check(seg: Segment) -> None:
        fmt = seg._layout.get("format")
        if fmt != FORMAT:
            raise FormatVersionError(
                f"service {seg.name!r} has format {fmt}; this shmkit reads format {FORMAT}. "
                "Use the shmkit that made it, or remove it with `shmkit rm` and create "
                "it again")
        m, base = seg._mapping, seg._hsize
        if seg.size < _service_bytes(seg._max_slots) or _core.load32(m, base) != _MAGIC:
            raise CorruptError(f"service {seg.name!r} has no valid header; remove it with "
                               f"`shmkit rm {seg.name}` and create it again")

    def _adopt(self, seg: Segment, **state: Any) -> None:
        try:
            self._check(seg)
            self._requests = self._channel_class(seg.name + ".requests", create=False,
                                     readonly=seg.readonly)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self._lock = threading.Lock()

    @classmethod
    def open(cls, name: str, *, path: str | None = None, **kwargs: Any) -> "Service":
        """Open an existing service; :class:`NotFoundError` if there is none.

        ``Service.open(name, readonly=True)`` only looks (``shmkit info``).
        ``path`` may only name the service's own file in /dev/shm: a
        service's channels live there.
        """
        if path is not None and os.path.abspath(path) != _shm_path(_check_name(name)):
            raise ValueError(f"a service lives in /dev/shm; path={path!r} cannot hold one")
        return cls(name, create=False, **kwargs)

    # -- what the worker table says ---------------------------------------------

    def _entries(self, seg: Segment) -> Iterator[tuple[int, int, int]]:
        """(slot, token, rid) of every entry that names a worker."""
        m, base = seg._mapping, seg._hsize + _OFF_TABLE
        n = min(_core.load32(m, _OFF_HWM), seg._max_slots)
        for slot in range(n):
            token = _core.load64(m, base + slot * _ENTRY)
            if token:
                yield slot, token, _core.load64(m, base + slot * _ENTRY + 8)

    def workers(self) -> list[dict[str, Any]]:
        """The workers: ``[{"pid", "alive", "busy"}]``; a dead worker's entry
        stays (``alive`` False) until another attachment takes its slot."""
        seg = self._held()
        out = []
        for _slot, token, rid in self._entries(seg):
            alive = _core.token_alive(seg._mapping, token & 0xFFFFFFFF)
            pid = _core.token_owner_pid(seg._mapping, token & 0xFFFFFFFF, False)
            out.append({"pid": pid, "alive": alive, "busy": rid != 0})
        return out

    def _live_workers(self, seg: Segment) -> int:
        return sum(1 for _s, token, _r in self._entries(seg)
                   if _core.token_alive(seg._mapping, token & 0xFFFFFFFF))

    def statistics(self) -> dict[str, int]:
        """``{"workers", "busy", "pending", "served", "discarded", "failed",
        "malformed", "abandoned"}``: live workers, those handling a request,
        requests waiting in the request channel, replies handed over, replies
        dropped (caller gone, or past what a worker keeps for callers whose
        reply channel is full), requests answered
        with an error, requests that could not be parsed, and requests that
        workers which died were handling."""
        seg = self._held()
        m, base = seg._mapping, seg._hsize
        workers = busy = abandoned = 0
        for _slot, token, rid in self._entries(seg):
            if _core.token_alive(m, token & 0xFFFFFFFF):
                workers += 1
                busy += rid != 0
            else:
                abandoned += rid != 0
        req = self._requests
        return {"workers": workers, "busy": busy,
                "pending": req.depth if req is not None and not req.closed else 0,
                "served": _core.load64(m, base + _OFF_SERVED),
                "discarded": _core.load64(m, base + _OFF_DISCARDED),
                "failed": _core.load64(m, base + _OFF_FAILED),
                "malformed": _core.load64(m, base + _OFF_MALFORMED),
                "abandoned": abandoned}

    def _describe(self) -> dict[str, Any]:
        return {"service": self.statistics()}

    # -- the two sides ----------------------------------------------------------

    def worker(self) -> "Worker":
        """A :class:`Worker` of this service, for the calling thread."""
        return Worker(self)

    def client(self, *, reply_capacity: int = DEFAULT_REPLY_CAPACITY,
               wait_for_worker: float = 0.0) -> "Client":
        """A :class:`Client` of this service (see :class:`Client` for the parameters)."""
        return Client(self, reply_capacity=reply_capacity, wait_for_worker=wait_for_worker)

    def serve(self, handler: Callable[[Any], Any], *, timeout: float | None = None,
              max_requests: int | None = None, objects: bool = True) -> int:
        """Answer requests with ``handler`` until ``timeout`` seconds pass
        without one, ``max_requests`` were answered, or this handle is closed.

        ``handler(data)`` gets the request's bytes and returns the reply
        (any bytes-like object); a request sent with :meth:`Client.call_object`
        is unpickled first and the handler's result pickled back.  Unpickling
        runs code the caller chose: with ``objects=False`` such a request is
        never unpickled and its caller gets a :class:`RemoteError` (serve
        that way when users you do not trust as yourself may call).  If the
        handler raises an ``Exception``, the caller gets a
        :class:`RemoteError` with the traceback and serving goes on;
        ``KeyboardInterrupt`` (Ctrl-C) fails the request and propagates.
        Returns how many requests were answered.

        >>> svc.serve(lambda data: data.upper(), objects=False)  # doctest: +SKIP
        """
        timeout = _serve_args(handler, timeout, max_requests, objects)
        done = 0
        with Worker(self) as w:
            while max_requests is None or done < max_requests:
                try:
                    req = w.recv(timeout)
                except ClosedError:
                    break
                except Timeout as e:
                    if not e._deadline:  # (a signal handler's own)
                        raise
                    break
                if req.pickled and not objects:
                    _refuse_object(req)
                else:
                    try:
                        _answer(req, handler(req.object() if req.pickled else req.data))
                    except Exception:  # the handler's
                        _failed(req)
                done += 1
        return done

    def call(self, data: Any, timeout: float | None = None) -> bytes:
        """Send ``data`` (bytes-like) and return the reply: :meth:`Client.call`
        through a client this handle keeps (one reply channel per thread)."""
        return self._own_client().call(data, timeout)

    def call_object(self, obj: Any, timeout: float | None = None) -> Any:
        """:meth:`Client.call_object` through this handle's own client."""
        return self._own_client().call_object(obj, timeout)

    def _own_client(self) -> "Client":
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self.client()
        return client

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Release this handle (and its client's reply channels); the service
        carries on for the other processes.  Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
        req = self._requests
        if req is not None:
            req.close()
        super().close()

    def unlink(self) -> None:
        """Remove the service's names (header, request channel, and reply
        channels nobody holds); processes that hold them carry on.
        Raises :class:`NotFoundError` if the header's name is already gone."""
        seg = self._seg
        if seg is None:
            raise ClosedError("this service handle was never opened")
        name = seg.name
        try:
            os.unlink(_shm_path(name + ".requests"))
        except FileNotFoundError:
            pass
        _reap_replies(name)
        super().unlink()

    def __enter__(self) -> "Service":
        return self

    def __repr__(self) -> str:
        if self.closed:
            return "<shmkit.Service closed>"
        return f"<shmkit.Service {self.name!r}>"


def _serve_args(handler: Any, timeout: Any, max_requests: Any,
                objects: Any) -> float | None:
    """Check serve()'s arguments; returns the checked timeout."""
    checked = optional_seconds(timeout)
    if not isinstance(objects, bool):
        raise TypeError(f"objects must be True or False, not {objects!r}")
    if max_requests is not None and (not isinstance(max_requests, int)
                                     or isinstance(max_requests, bool) or max_requests < 0):
        raise ValueError(f"max_requests must be a non-negative int or None, "
                         f"not {max_requests!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {type(handler).__name__}")
    return checked


def _answer(req: Request, result: Any) -> None:
    """Reply to ``req`` with a handler's result (pickled if the call was)."""
    try:
        if req.pickled:
            req.reply_object(result)
        else:
            req.reply(result)
    except Exception:  # a result that is no reply
        _failed(req)


def _refuse_object(req: Request) -> None:
    """Fail a call_object() request unread, for a serve(objects=False)."""
    req.fail("this service serves bytes only (serve(objects=False)), so it never "
             "unpickles a request: send bytes with call(), not call_object()")


def _failed(req: Request) -> None:
    """Fail ``req`` with the traceback of the exception being handled."""
    if not req.answered:
        req.fail(load("traceback").format_exc())  # imported when a handler first raises


def _request_bytes(data: Any) -> memoryview:
    """``data`` as one contiguous block of memory, or TypeError saying what to use."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"call() sends bytes-like data (bytes, bytearray, memoryview, "
                        f"a numpy array), not {type(data).__name__}; use "
                        "call_object() to send a Python object") from None
    if not view.c_contiguous:
        raise TypeError("call() sends one contiguous block of memory; copy it first "
                        "(numpy.ascontiguousarray)")
    return view


def _shm_path(name: str) -> str:
    from .segment import segment_path
    return segment_path(name)


def _reap_replies(service: str) -> int:
    """Remove the reply channels of ``service`` that no live process holds,
    with those their creators left half-made (killed while creating them)."""
    from .inspect import _reap_half_created, _reap_stale, _reap_temp, _temp_file

    prefix = os.path.basename(_shm_path(service + ".reply."))
    folder = os.path.dirname(_shm_path(service))
    removed = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        return 0
    for entry in entries:
        path = os.path.join(folder, entry)
        try:
            temp = _temp_file(entry)  # built by a creator, not yet linked
            if entry.startswith(prefix):
                removed += (_reap_stale(path, False) or _reap_half_created(path, False))
            elif temp is not None and temp[0].startswith(service + ".reply."):
                removed += _reap_temp(path, temp[1], False)
        except (OSError, ValueError, ShmkitError):
            pass  # (not ours to judge: a file planted there, another shmkit's channel)
    return removed


class Request:
    """One request a :class:`Worker` received; answer it exactly once.

    ``data`` is the request's bytes (``object()`` unpickles a request made
    with :meth:`Client.call_object`); :meth:`reply` sends the answer,
    :meth:`fail` makes the caller raise :class:`RemoteError`.  A request
    left unanswered is failed when the worker takes the next one or closes.
    """

    __slots__ = ("data", "id", "pickled", "_worker", "_reply_to", "_token", "answered")

    def __init__(self, worker: "Worker", data: bytes, rid: int, pickled: bool,
                 reply_to: int, token: int) -> None:
        self.data = data
        self.id = rid
        self.pickled = pickled
        self._worker = worker
        self._reply_to = reply_to  # the reply channel's id
        self._token = token
        self.answered = False

    def object(self) -> Any:
        """The request unpickled (only for requests sent with ``call_object``;
        unpickling runs code: serve only clients you trust)."""
        if not self.pickled:
            raise TypeError("this request holds bytes (sent with call()), not a pickled "
                            "object; read .data")
        return pickle.loads(self.data)

    def reply(self, data: Any) -> bool:
        """Send ``data`` (bytes-like) to the caller.  Returns False if the
        reply is discarded (and counted): the caller is gone, the reply is
        larger than its reply channel, or the channel is full and the worker
        keeps as many replies as it may.  True otherwise (sent, or kept to be
        sent once the caller's channel has room).

        >>> # inside a worker loop:  req.reply(b"done")
        """
        if type(data) is bytes:  # (the common case: no view to make)
            return self._send(_OK, data)
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(f"a reply must be bytes-like (bytes, bytearray, memoryview, "
                            f"a numpy array), not {type(data).__name__}; use "
                            "reply_object() to send a Python object") from None
        if not view.c_contiguous:
            raise TypeError("a reply must be one contiguous block of memory; copy it "
                            "first (numpy.ascontiguousarray)")
        return self._send(_OK, view)

    def reply_object(self, obj: Any) -> bool:
        """Send ``obj`` pickled (the caller used ``call_object``)."""
        return self._send(_OK, pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))

    def fail(self, message: str) -> bool:
        """Make the caller raise :class:`RemoteError` with ``message``."""
        return self._send(_ERROR, str(message).encode("utf-8", "replace"))

    def _send(self, status: int, payload: Any) -> bool:
        if self.answered:
            raise ClosedError(f"request {self.id:#x} was already answered; a request "
                              "gets exactly one reply")
        # Answered once the reply is sent: one interrupted on the way (Ctrl-C)
        # leaves the request unanswered, for the worker's next recv() or
        # close() to fail (a second reply to a call already answered is
        # dropped by its client, which knows its calls by id).
        return self._worker._deliver(self, status, payload)

    def __repr__(self) -> str:
        return (f"<shmkit.Request id={self.id:#x} {len(self.data)} bytes"
                f"{' answered' if self.answered else ''}>")


class _Kept:
    """The replies a worker keeps for one caller's reply channel: the caller's
    token, ``(message, counter when sent, counter when dropped)`` in order,
    their bytes, and the looks since it could last be opened."""

    __slots__ = ("token", "queue", "nbytes", "fails")

    def __init__(self, token: int) -> None:
        self.token = token
        self.queue: collections.deque[tuple[bytes, int, int]] = collections.deque()
        self.nbytes = 0
        self.fails = 0


class Worker(Closing):
    """One worker of a :class:`Service`: takes requests and answers them.

    Made by ``service.worker()``; meant for one thread (start one worker per
    thread to serve from several).  While it is open the service counts it,
    and a caller whose request it holds learns of its death (by the kernel's
    account of its attachment) as :class:`WorkerDied`.

    >>> svc = Service("doc-worker")
    >>> with svc.worker() as w:
    ...     svc.statistics()["workers"]
    ...     # for req in w: req.reply(req.data.upper())
    1
    >>> svc.unlink(); svc.close()
    """

    _seg: Segment | None = None

    def __init__(self, service: Service) -> None:
        if not isinstance(service, Service):
            raise TypeError(f"Worker needs a Service, not {type(service).__name__}")
        # The request this worker holds: the message as the core took it
        # (Channel._take_noted, which records its id in our entry in the
        # same call), until recv() hands it out as a Request, which stays
        # until it is answered.  One slot, changed by single stores, so a
        # Ctrl-C at any point leaves the request either here or answered.
        self._box: list[Any] = [None]
        svc_seg = service._held()
        if svc_seg.readonly:
            raise PermissionError(f"service {svc_seg.name!r} was opened readonly=True; "
                                  "open it without readonly to serve it")
        self._service = service
        self._requests = service._requests
        # Our own attachment: its slot is our entry in the worker table, and
        # the kernel tells every caller when it dies.
        seg = attach_segment(Kind.SERVICE, svc_seg.name, None, size=None, create=False)
        self._seg = seg
        m = seg._mapping
        self._token = m.token
        self._entry = seg._hsize + _OFF_TABLE + (self._token & 0x3FF) * _ENTRY
        self._name = svc_seg.name
        # the name every reply channel of this service has: the prefix, then 16 hex digits
        self._prefix = self._name + ".reply."
        self._pid = _segment._pid
        self._cache: dict[int, tuple[Channel, int]] = {}  # by reply channel id
        # Replies kept for callers whose channel stayed full, by reply channel
        # id, sent in order as room comes (_pay).
        self._kept: dict[int, _Kept] = {}
        self._paid = 0.0
        # Past the keep's bounds: by reply channel id, (the caller's token,
        # [(request id, status)]) whose calls are told at the sweeps (_tell_owed).
        self._owed: dict[int, tuple[int, collections.deque[tuple[int, int]]]] = {}
        self._owed_n = 0
        self._tell_the_caller_of_a_dead_worker(seg)
        _core.store64(m, self._entry + 8, 0)
        _core.store64(m, self._entry, self._token)
        self._swept = time.monotonic()
        _reap_replies(svc_seg.name)  # channels of callers that died unanswered

    def _tell_the_caller_of_a_dead_worker(self, seg: Segment) -> None:
        """Our entry, a worker's that died holding a request (its slot is
        ours now): tell that request's caller, before the entry that says so
        is ours.  Its caller would otherwise find the id in no entry, and,
        the other workers alive, wait for good.  (Again after a Ctrl-C: the
        entry is cleared only once it is ours, by the stores that follow,
        never by the close of a worker interrupted before them; the caller
        drops a second notice.)  A caller whose reply channel stays full
        gets it later, as it would a reply (``_keep``)."""
        m = seg._mapping
        rid = _core.load64(m, self._entry + 8)
        if _core.load64(m, self._entry) == 0 or rid == 0:
            return
        reply = _core.load64(m, self._entry + 16)
        text = (f"the worker of service {seg.name!r} that took the request "
                "died before answering it (the worker that took its place, pid "
                f"{os.getpid()}, found it); the request may have been partly carried out")
        # Its caller's token (for the liveness tests of a full channel) is that
        # of the attachment the process that made the channel claimed first.
        try:
            got = self._channel(reply, 0)
        except _UNOPENED:
            got = None
        token = self._maker_token(got[0]) if got is not None else 0
        if token:
            self._cache[reply] = (got[0], token)  # type: ignore[index]
        if not token or self._send_reply(reply, token, rid, _DIED, text.encode()) is False:
            _core.add64(m, seg._hsize + _OFF_DISCARDED, 1)
        if reply not in self._kept:
            self._drop(reply)

    @property
    def _kept_n(self) -> int:
        """Messages kept, for every channel (at most _KEEP_CHANNELS of them)."""
        return sum(len(k.queue) for k in self._kept.values())

    @property
    def _kept_bytes(self) -> int:
        return sum(k.nbytes for k in self._kept.values())

    def _held(self) -> Segment:
        seg = self._seg
        if seg is None or seg._closed:
            raise ClosedError("this worker is closed; make another with service.worker()")
        if self._pid != _segment._pid:
            raise ClosedError("this worker belongs to the process that made it (this one "
                              "was forked from it); make a worker here with service.worker()")
        return seg

    def recv(self, timeout: float | None = None) -> Request:
        """The next request (waits; :class:`Timeout` after ``timeout`` s).

        A request taken before and not answered is failed first.
        """
        seg, requests, timeout, deadline = self._start_recv(timeout)
        while True:
            msg = self._box[0]
            if type(msg) is not bytes:  # (else taken before, and interrupted: handed out now)
                try:
                    msg = self._take(requests, seg, self._step(deadline), False)
                except Timeout as e:
                    if not e._deadline:  # (a signal handler's own)
                        raise
                    self._check_deadline(seg, timeout, deadline)
                    continue
            req = self._took(seg, msg)
            if req is not None:
                return req

    @property
    def _current(self) -> Request | None:
        cur = self._box[0]
        return cur if type(cur) is Request else None

    def _settle_current(self, why: str) -> None:
        """Fail the request handed out and not answered (which frees the slot),
        or free the slot of one answered whose delivery a Ctrl-C stopped
        before it could."""
        cur = self._current
        if cur is not None and not cur.answered:
            cur.fail(why)
        elif cur is not None:
            self._box[0] = None

    def _take(self, requests: Channel, seg: Segment, timeout: float | None,
              nowait: bool) -> bytes:
        try:
            return requests._take_noted(timeout, nowait, seg._mapping, self._entry + 8,
                                        self._box)
        except ClosedError:
            self._give_back()  # taken as another thread closed this worker
            raise

    def _start_recv(self, timeout: Any) -> tuple[Segment, Channel, float | None, float | None]:
        seg = self._held()
        if timeout is not None:
            timeout = optional_seconds(timeout)
        self._settle_current("the worker took another request without answering this one")
        requests = self._requests
        if requests is None:
            raise ClosedError("the service handle of this worker is closed")
        return seg, requests, timeout, None if timeout is None else time.monotonic() + timeout

    def _step(self, deadline: float | None) -> float:
        """How long the next wait for a request may take (sweeping first, and
        sending kept replies, when due)."""
        now = time.monotonic()
        if now - self._swept >= _SWEEP_EVERY:
            self._sweep(now)
        step = _SWEEP_EVERY
        if self._kept:  # (replies wait for room: look again soon)
            if now - self._paid >= _PAY_EVERY:
                self._pay(now)
            step = _PAY_EVERY
        return max(step if deadline is None else min(step, deadline - now), 0.0)

    def _check_deadline(self, seg: Segment, timeout: float | None,
                        deadline: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise _timed_out(f"no request for service {seg.name!r} within "
                             f"{_core.shown_seconds(timeout)} s")

    def _took(self, seg: Segment, msg: bytes) -> Request | None:
        """The request in the box as a Request, now this worker's current one
        (its id is on record since the take); None if it was malformed."""
        req = self._parse(msg)
        # Handed out only if still here: another thread's close() may have
        # given it back (one step of the core, so exactly one of them has it).
        if not _core.swap_if(self._box, msg, req):
            raise ClosedError("this worker was closed; make another with service.worker()")
        if req is not None:
            return req
        _core.store64(seg._mapping, self._entry + 8, 0)
        _core.add64(seg._mapping, seg._hsize + _OFF_MALFORMED, 1)
        return None

    def _parse(self, msg: bytes) -> Request | None:
        # (a request names only a reply channel of this service: its id)
        if len(msg) >= _REQ_SIZE:
            version, flags, token, rid, reply = _REQ.unpack_from(msg)
            if version == _VERSION and rid:
                return Request(self, msg[_REQ_SIZE:], rid, bool(flags & _F_PICKLE), reply,
                               token)
        return None

    def _give_back(self) -> None:
        """A request taken and never handed out goes back to the channel for
        another worker (none of it was carried out), or, with no room there,
        is failed.  Either can be done again after an interrupt: the send
        back and the box's emptying are one call of the core, and a second
        failure reply to a call is dropped by its client."""
        msg = self._box[0]
        if type(msg) is not bytes:
            return
        requests = self._requests
        try:
            if requests is None:
                raise ClosedError("the service handle is closed")
            requests._give_back(self._box)  # (claims the box first: see _took)
            return
        except (ShmkitError, ValueError):
            pass
        req = self._parse(msg)
        if req is not None:  # (again after a Ctrl-C: its client drops a second one)
            # (not req.fail(): the worker may be closed already, see _take)
            ok = self._send_reply(req._reply_to, req._token, req.id, _ERROR,
                                  b"the worker that took the request stopped before "
                                  b"starting it; it was not carried out")
            seg = self._seg
            if seg is not None and not seg.closed:  # (counted as _deliver counts)
                _core.add64(seg._mapping, seg._hsize + _OFF_FAILED, 1)
                if ok is not None:
                    _core.add64(seg._mapping,
                                seg._hsize + (_OFF_SERVED if ok else _OFF_DISCARDED), 1)
        _core.swap_if(self._box, msg, None)

    def __iter__(self) -> Iterator[Request]:
        """Requests, one after another, until this worker or its service closes."""
        while True:
            try:
                yield self.recv()
            except ClosedError:
                return

    def _deliver(self, req: Request, status: int, payload: Any) -> bool:
        seg = self._held()
        m, base = seg._mapping, seg._hsize
        ok = self._send_reply(req._reply_to, req._token, req.id, status, payload)
        req.answered = True
        if self._box[0] is req:
            self._box[0] = None
            _core.store64(m, self._entry + 8, 0)
        if status == _ERROR:
            _core.add64(m, base + _OFF_FAILED, 1)
        if ok is None:  # (kept: counted when it is sent or dropped)
            return True
        _core.add64(m, base + (_OFF_SERVED if ok else _OFF_DISCARDED), 1)
        return ok

    def _send_reply(self, reply: int, caller: int, rid: int, status: int,
                    payload: Any) -> bool | None:
        """Send the reply to request ``rid`` (``status``, ``payload``) to reply
        channel ``reply`` of the caller whose token is ``caller`` (0: not
        known).  True if sent, False if dropped, None if kept to be sent
        once the caller's channel has room (``_keep``)."""
        got = self._cache.get(reply)
        if got is None or got[1] != caller:  # (else the usual case: open already)
            try:
                got = self._channel(reply, caller)
            except _UNOPENED:
                return False  # the caller is gone, or the name holds no reply channel
        ch, token = got
        head = _REP.pack(_VERSION, status, rid)
        message = b"".join((head, payload))
        try:
            # Replies kept for it go first: this one is kept behind them
            # (at once, no wait again) unless they all went now.
            if self._kept and reply in self._kept:
                if not self._pay_channel(reply):
                    if len(message) > ch.max_message:
                        raise MessageTooLarge
                    return self._keep(reply, token, rid, message, status)
                if self._cache.get(reply) is not got:  # (paying opened it again)
                    try:
                        ch, token = self._channel(reply, caller)
                    except _UNOPENED:
                        return False
            ch.send_nowait(message)
            return True
        except MessageTooLarge:
            text = (f"the reply of {len(message) - len(head)} bytes is larger than the "
                    f"caller's reply channel holds ({ch.max_message - len(head)} bytes); "
                    "make the client with a larger reply_capacity=").encode()
            notice = _REP.pack(_VERSION, _ERROR, rid) + text
            try:
                if reply not in self._kept:
                    ch.send_nowait(notice)
                    return False
            except Full:
                pass
            except ShmkitError:
                return False
            self._keep(reply, token, rid, notice, _ERROR, counted=True)
            return False
        except Full:
            if token and not _core.token_alive(ch._seg._mapping,  # type: ignore[union-attr]
                                               token):
                self._drop(reply)
                return False
            # The caller reads no replies now (stopped, its event loop
            # blocked, or slower than us): never wait for it, nor lose its reply.
            return self._keep(reply, token, rid, message, status)
        except ShmkitError:  # closed, ended or damaged meanwhile: the reply is lost
            self._drop(reply)
            return False

    def _channel(self, reply: int, caller: int) -> tuple[Channel, int]:
        """Reply channel ``reply`` and its caller's token, open (and cached).
        Raises as ``_open_reply`` does: ``_GONE`` if the name holds no reply
        channel of this service (or a caller's no longer), anything else if
        it cannot be opened now."""
        cached = self._cache.get(reply)
        if cached is not None and cached[1] == caller:
            return cached
        if cached is not None:
            self._drop(reply)
        ch = self._open_reply(reply)
        if len(self._cache) >= _MAX_CACHED:  # (never one with replies kept for it)
            self._drop(next(r for r in self._cache if r not in self._kept))
        cached = self._cache[reply] = (ch, caller)
        return cached

    def _open_reply(self, reply: int) -> Channel:
        """Open reply channel ``reply``; raises as an open does if the name
        holds no channel, or one this user may not open, or a file still
        "being made" (a reply channel is made before any request names it:
        no reason to wait), and NotFoundError for a second name of a file."""
        ch = Channel._open_made(f"{self._prefix}{reply:016x}")
        if os.fstat(ch._seg._fd).st_nlink != 1:  # type: ignore[union-attr]
            # A second name of one file (a hard link made under a reply
            # channel's name, to our request channel or another service's
            # reply channel): a reply channel has one.
            ch.close()
            raise NotFoundError(f"{self._prefix}{reply:016x} is a second name of a file")
        return ch

    def _keep(self, reply: int, token: int, rid: int, message: bytes, status: int,
              counted: bool = False) -> bool | None:
        """Keep ``message`` (of ``status``; ``counted``: a notice whose reply
        was counted already) for a live caller whose reply channel stayed
        full, to send once it has room (``_pay``): None.  A reply past the
        bytes kept (``_KEEP_BYTES``, ``_KEEP_CHANNEL_BYTES`` for its channel)
        or its channel's ``_KEEP_CHANNEL_MAX`` replies is dropped and a short
        notice kept instead, so that its call raises ReplyLost rather than
        wait on: False.  Past ``_KEEP_MAX`` messages, ``_KEEP_CHANNELS``
        channels or twice ``_KEEP_CHANNEL_MAX`` messages for its channel,
        False: dropped, its call told at the sweeps (``_owe``).  With no
        token of the caller known: False, dropped."""
        if not token:  # (no caller known: nobody to keep it for)
            return False
        kept = self._kept.get(reply)
        if (len(self._kept) >= _KEEP_CHANNELS if kept is None
                else len(kept.queue) >= 2 * _KEEP_CHANNEL_MAX) or self._kept_n >= _KEEP_MAX:
            self._owe(reply, token, rid, _DIED if status == _DIED else _LOST)
            return False
        if counted:
            sent = dropped = 0
        else:
            sent, dropped = (0, _OFF_DISCARDED) if status == _DIED else (_OFF_SERVED,
                                                                        _OFF_DISCARDED)
        answered = True
        if sent and (self._kept_bytes + len(message) > _KEEP_BYTES or (
                kept is not None and (kept.nbytes + len(message) > _KEEP_CHANNEL_BYTES
                                      or len(kept.queue) >= _KEEP_CHANNEL_MAX))):
            message = self._notice(_LOST, rid)
            sent, dropped, answered = 0, 0, False
        if kept is None:
            kept = self._kept[reply] = _Kept(token)
        kept.nbytes += len(message)  # (first: a Ctrl-C before the append leaves it high)
        kept.queue.append((message, sent, dropped))
        return None if answered else False

    def _notice(self, status: int, rid: int) -> bytes:
        """The short reply telling call ``rid`` that its reply was dropped
        (_LOST: ReplyLost) or its worker died (_DIED), while its caller's
        reply channel was full: short, so that many fit in that channel."""
        what = ("its worker died" if status == _DIED else
                "its worker kept as many replies for callers that read none as it "
                "may, and dropped this one; the request was answered")
        return _REP.pack(_VERSION, status, rid) + (
            f"service {self._name!r}, pid {os.getpid()}: while this "
            f"caller's reply channel was full, {what}").encode()

    @staticmethod
    def _maker_token(ch: Channel) -> int:
        """The token of the attachment of reply channel ``ch`` that the
        process that made it (its caller) claimed first, if it lives; else 0."""
        seg = ch._seg
        if seg is None or seg.closed:
            return 0
        own = seg._mapping.token & 0x3FF  # (a worker of the caller's process has its pid)
        first = None
        for e in _core.attachments(seg._mapping):
            if e["alive"] and e["pid"] == seg._creator_pid and e["slot"] != own and (
                    first is None or e["attached"] < first["attached"]):
                first = e
        return 0 if first is None else int(first["slot"] | (first["gen"] & 0xFFFFF) << 10)

    def _pay(self, now: float) -> None:
        """Send the kept replies, in order, as far as their channels have room;
        forget those of callers that died (counted discarded)."""
        self._paid = now
        for reply in list(self._kept):
            self._pay_channel(reply)

    def _pay_channel(self, reply: int) -> bool:
        """Send what is kept for reply channel ``reply`` as far as it has room;
        True once nothing is kept for it."""
        kept = self._kept.get(reply)
        if kept is None:
            return True
        try:
            ch = self._channel(reply, kept.token)[0]  # (open again if closed meanwhile)
        except _GONE:
            self._forget_kept(reply)
            return True
        except _UNOPENED:
            # (out of descriptors, slots...: again at the next look, for a while)
            kept.fails += 1
            if kept.fails >= _REOPEN_TRIES:
                self._forget_kept(reply)
                return True
            return False
        kept.fails = 0
        seg = self._seg  # (closed by another thread meanwhile: counted by nobody)
        m = seg._mapping if seg is not None and not seg.closed else None
        while kept.queue:
            try:
                item = kept.queue[0]
            except IndexError:  # (emptied by another thread's close)
                break
            message, sent, _dropped = item
            try:
                ch.send_nowait(message)
            except Full:
                if not _core.token_alive(ch._seg._mapping, kept.token):  # type: ignore
                    self._forget_kept(reply)
                    return True
                return False
            except (ShmkitError, ValueError):  # closed or damaged meanwhile
                self._forget_kept(reply)
                return True
            # (sent, then taken off: a Ctrl-C between the two sends it twice,
            # and its caller drops the second; not taken off if another
            # thread's close took it meanwhile)
            if kept.queue and kept.queue[0] is item:
                kept.queue.popleft()
                kept.nbytes -= len(message)
            if sent and m is not None:
                _core.add64(m, seg._hsize + sent, 1)  # type: ignore[union-attr]
        if self._kept.get(reply) is kept:
            del self._kept[reply]
        return True

    def _forget_kept(self, reply: int) -> None:
        """Drop the replies kept for ``reply``, whose caller is gone (each
        counted discarded, the news of a dead worker included)."""
        kept = self._kept.get(reply)
        if kept is None:
            return
        seg = self._seg
        while kept.queue:
            try:
                message, _sent, dropped = kept.queue.popleft()
            except IndexError:
                break
            kept.nbytes -= len(message)
            if dropped and seg is not None and not seg.closed:
                _core.add64(seg._mapping, seg._hsize + dropped, 1)
        if self._kept.get(reply) is kept:
            del self._kept[reply]
        self._drop(reply)

    def _drop(self, reply: int) -> None:
        entry = self._cache.pop(reply, None)
        if entry is not None:
            entry[0].close()  # the last holder of a dead caller's channel removes it

    def _sweep(self, now: float) -> None:
        """Close cached reply channels whose caller closed or died, and drop
        what was kept for them; tell the calls whose replies were dropped."""
        self._swept = now
        for reply, (ch, token) in list(self._cache.items()):
            seg = ch._seg
            if seg is None or seg.closed or not _core.token_alive(seg._mapping, token):
                self._forget_kept(reply)
                self._drop(reply)
        if self._owed:
            self._tell_owed()

    def _owe(self, reply: int, token: int, rid: int, status: int) -> None:
        """Remember to tell call ``rid`` of reply channel ``reply`` that its
        reply was dropped (status _LOST), or its worker died (_DIED)."""
        if self._owed_n >= _OWED_MAX:
            return  # (past every bound: its call waits for its timeout)
        entry = self._owed.get(reply)
        if entry is None or entry[0] != token:
            if entry is not None:  # (another token for it: a hostile request's)
                self._owed_n -= len(entry[1])
            entry = self._owed[reply] = (token, collections.deque())
        self._owed_n += 1
        entry[1].append((rid, status))

    def _tell_owed(self) -> None:
        """Send the owed notices, as far as there is room, for at most
        ``_OWED_OPENS`` channels (the rest at the next sweeps); forget those
        of callers gone.  A channel not cached is opened for it and closed.
        (Each notice is taken off once sent: a Ctrl-C between the two sends
        it twice, and its caller drops the second.)"""
        for reply in list(self._owed)[:_OWED_OPENS]:
            token, rids = self._owed[reply]
            gone, ch = False, None
            try:
                cached = self._cache.get(reply)
                ch = cached[0] if cached is not None else self._open_reply(reply)
                while rids:
                    rid, status = rids[0]
                    ch.send_nowait(self._notice(status, rid))
                    rids.popleft()
                    self._owed_n -= 1
            except Full:  # (again at the next sweep, if its caller lives)
                gone = not _core.token_alive(ch._seg._mapping, token)  # type: ignore
            except _UNOPENED:
                gone = True  # no reply channel of ours: nobody to tell
            finally:
                if ch is not None and reply not in self._cache:
                    ch.close()
            if gone or not rids:
                self._owed.pop(reply, None)
                self._owed_n -= len(rids)
            else:
                self._owed[reply] = self._owed.pop(reply)  # (to the end of the line)

    def statistics(self) -> dict[str, int]:
        """The service's statistics (see :meth:`Service.statistics`)."""
        self._held()
        return self._service.statistics()

    @property
    def closed(self) -> bool:
        return self._seg is None or self._seg.closed

    # close() is the core's: _close() again each time a Ctrl-C stops it, so
    # that no request is left neither answered, given back nor on record.
    close = _core.close_to_the_end

    def _close(self) -> None:
        """Leave the service: a request still unanswered is failed, one taken
        and never handed out given back, the worker's entry is cleared, and
        its reply channels are released.  Each step can be done again."""
        seg = self._seg
        if seg is None or seg.closed:
            return
        if seg._mapping is None or seg._mapping.closed:
            seg.close()  # a close interrupted after its detach: only that is left
            return
        # Forked: the entry is the parent's.  Not ours yet (a Ctrl-C in
        # __init__ before its stores): it may still tell of a dead worker's
        # request, for the next worker in this slot to pass on.  Leave it.
        mine = (self._pid == _segment._pid
                and _core.load64(seg._mapping, self._entry) == self._token)
        if mine:
            self._settle_current("the worker stopped before answering")
            self._give_back()
            _core.store64(seg._mapping, self._entry + 8, 0)
            _core.store64(seg._mapping, self._entry, 0)
        if (self._kept or self._owed) and self._pid == _segment._pid:
            self._pay(time.monotonic())  # (a last try; the rest go with this worker)
            for reply in list(self._kept):
                self._forget_kept(reply)
            self._tell_owed()
            self._owed.clear()
        for reply in list(self._cache):
            self._drop(reply)
        seg.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"token={self._token:#x}"
        return f"<shmkit.Worker {state}>"


class _Line:
    """One thread's reply channel: its id as requests carry it, its token,
    the next request id."""

    __slots__ = ("ch", "id", "token", "pid", "next_id", "thread")

    def __init__(self, ch: Channel, reply_id: int) -> None:
        self.ch = ch
        self.id = reply_id  # the 16 hex digits that end its name
        self.token = ch._seg._mapping.token  # type: ignore[union-attr]
        self.pid = _segment._pid
        self.next_id = random.getrandbits(63) | 1
        self.thread = weakref.ref(threading.current_thread())

    def orphaned(self) -> bool:
        """Its thread has ended (or the line came from before a fork)."""
        t = self.thread()
        return self.pid != _segment._pid or t is None or not t.is_alive()

    def release(self) -> None:
        if self.pid == _segment._pid:
            try:
                self.ch.unlink()
            except NotFoundError:
                pass
        self.ch.close()


class _WorkersGone:
    """Tells a waiting call when every worker has been gone for the client's
    ``wait_for_worker`` seconds (its request stays queued for the next one)."""

    __slots__ = ("client", "since")

    def __init__(self, client: "Client") -> None:
        self.client = client
        self.since: float | None = None

    def check(self) -> None:
        client = self.client
        if client._has_workers():
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since >= client._wait_for_worker:
            client._verified = -1.0e9
            raise ServiceUnavailable(
                f"every worker of service {client._seg.name!r} left while the request "
                "waited; it stays queued for the next worker, whose reply will be dropped")


class Client(Closing):
    """The calling side of a :class:`Service`.

    ``Client(name)`` opens (or creates) the service by name;
    ``Client(service)`` uses an open handle.  Each thread that calls gets
    its own reply channel (made at its first call), so any number of
    threads may call at once, each getting its own replies.  The channels
    of threads that have ended are released when another thread makes its
    first call, so a pool that replaces its threads keeps one reply
    channel per live thread.

    Parameters
    ----------
    service:
        A service name, or an open :class:`Service`.
    reply_capacity:
        Bytes of each reply channel (default 1 MiB): the largest reply.
    wait_for_worker:
        Seconds a call waits for a worker to attach when there is none
        (default 0: raise :class:`ServiceUnavailable` at once).

    Example
    -------
    >>> svc = Service("doc-client")
    >>> import threading
    >>> t = threading.Thread(target=svc.serve, args=(lambda d: d[::-1],),
    ...                      kwargs={"max_requests": 1}); t.start()
    >>> with Client("doc-client", wait_for_worker=5.0) as client:
    ...     client.call(b"abc", timeout=5.0)
    b'cba'
    >>> t.join(); svc.unlink(); svc.close()
    """

    _service: Service | None = None
    _own = False
    _closed = True
    _channel_class: type[Channel] = Channel  # of its reply channels

    def __init__(self, service: str | Service, *,
                 reply_capacity: int = DEFAULT_REPLY_CAPACITY,
                 wait_for_worker: float = 0.0) -> None:
        if not isinstance(reply_capacity, int) or isinstance(reply_capacity, bool) \
                or reply_capacity < 64:
            raise ValueError(f"reply_capacity must be an int of at least 64 bytes, "
                             f"not {reply_capacity!r}")
        wait = optional_seconds(wait_for_worker, "wait_for_worker")
        if isinstance(service, str):
            service = Service(service)
            self._own = True
        elif not isinstance(service, Service):
            raise TypeError(f"Client needs a service name or a Service, "
                            f"not {type(service).__name__}")
        seg = service._held()
        if seg.readonly:
            if self._own:
                service.close()
            raise PermissionError(f"service {seg.name!r} was opened readonly=True; "
                                  "open it without readonly to call it")
        self._service = service
        self._seg = seg
        self._requests = service._requests
        self._reply_capacity = reply_capacity
        self._wait_for_worker = wait or 0.0
        self._local = threading.local()
        self._lines: list[_Line] = []
        self._lock = threading.Lock()
        self._verified = -1.0e9  # when a live worker was last seen
        self._closed = False

    @property
    def name(self) -> str:
        """The service's name."""
        return self._seg.name

    @property
    def closed(self) -> bool:
        return self._closed

    def _line(self) -> _Line:
        line: _Line | None = getattr(self._local, "line", None)
        if line is not None and line.pid == _segment._pid:
            return line
        if self._closed:
            raise ClosedError(f"client of service {self._seg.name!r} is closed")
        reply_id = int.from_bytes(os.urandom(8), "big")
        name = f"{self._seg.name}.reply.{reply_id:016x}"
        ch = self._channel_class(name, self._reply_capacity, create=True, lifetime="attached")
        line = _Line(ch, reply_id)
        self._local.line = line
        with self._lock:
            # Threads come and go (a pool, a thread per request): the lines
            # of those that ended are released here, so that a client keeps
            # one reply channel per live calling thread, not one per thread
            # that ever called.
            ended: list[_Line] = []
            live = [line]
            for x in self._lines:  # each asked once: a thread may end meanwhile
                (ended if x.orphaned() else live).append(x)
            self._lines = live
        for x in ended:
            x.release()
        return line

    def _check_workers(self, deadline: float | None) -> None:
        end = self._worker_wait_end(deadline)
        if end is None:
            return
        pause = 0.001
        while not self._has_workers():
            if time.monotonic() >= end:
                raise self._unavailable()
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        self._verified = time.monotonic()

    def _worker_wait_end(self, deadline: float | None) -> float | None:
        """None when a live worker was seen just now, else until when a call
        may wait for one to attach."""
        now = time.monotonic()
        if now - self._verified < 0.1:
            return None
        end = now + self._wait_for_worker
        return end if deadline is None else min(end, deadline)

    def _has_workers(self) -> bool:
        service = self._service
        assert service is not None
        return service._live_workers(self._seg) > 0

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"service {self._seg.name!r} has no worker attached; start one "
            "(service.serve(handler)), or make the client with "
            "wait_for_worker=seconds to wait for one")

    def call(self, data: Any, timeout: float | None = None) -> bytes:
        """Send ``data`` (any bytes-like object) and return the reply's bytes.

        Raises
        ------
        ServiceUnavailable: no worker is attached (after ``wait_for_worker``).
        WorkerDied: the worker handling the request died (raised as soon as
            the caller notices, within about 0.2 s of the death).
        RemoteError: the worker's handler raised; the message holds its traceback.
        ReplyLost: the request was carried out, but its reply found this
            thread's reply channel full for longer than the worker could keep it.
        Timeout: no reply within ``timeout`` seconds (a late reply is dropped).
        ClosedError: the client was closed.  TypeError: ``data`` is not bytes-like.
        """
        return self._call(data if type(data) is bytes else _request_bytes(data), 0, timeout)

    def call_object(self, obj: Any, timeout: float | None = None) -> Any:
        """Send ``obj`` pickled and return the reply unpickled (the worker's
        handler gets and returns objects).  Unpickling runs code: use it
        only with workers you trust.  Raises like :meth:`call`."""
        out = self._call(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), _F_PICKLE, timeout)
        return pickle.loads(out)

    def _call(self, payload: Any, flags: int, timeout: Any) -> bytes:
        timeout, deadline = self._start_call(timeout)
        if time.monotonic() - self._verified >= 0.1:  # else a live worker was seen just now
            self._check_workers(deadline)
        line, rid, msg = self._request(payload, flags)
        requests = self._requests
        assert requests is not None
        try:
            requests.send(msg, timeout)
        except Timeout as e:
            if not e._deadline:  # (a signal handler's own)
                raise
            raise self._requests_full(timeout) from None
        return self._await(line, rid, timeout, deadline)

    def _start_call(self, timeout: Any) -> tuple[float | None, float | None]:
        if timeout is not None:
            timeout = optional_seconds(timeout)
        if self._closed:
            raise ClosedError(f"client of service {self._seg.name!r} is closed")
        return timeout, None if timeout is None else time.monotonic() + timeout

    def _request(self, payload: Any, flags: int) -> tuple[_Line, int, bytes]:
        """This thread's reply line, a fresh request id, and the request message."""
        line = self._line()
        rid = line.next_id
        line.next_id = (rid + 1) & _RID_MASK or 1
        msg = b"".join((_REQ.pack(_VERSION, flags, line.token, rid, line.id), payload))
        return line, rid, msg

    def _requests_channel(self) -> Channel:
        requests = self._requests
        assert requests is not None
        return requests

    def _requests_full(self, timeout: float | None) -> Timeout:
        return _timed_out(f"the request channel of service {self._seg.name!r} stayed full "
                          f"for {_core.shown_seconds(timeout)} s: its workers do not keep up")

    def _await(self, line: _Line, rid: int, timeout: float | None,
               deadline: float | None) -> bytes:
        """The reply to request ``rid``, checking between waits that its worker
        (and any worker) is still there."""
        ch = line.ch
        step = _FIRST_STEP
        gone: _WorkersGone | None = None  # made only once a wait runs out
        while True:
            wait = step if deadline is None else min(step, deadline - time.monotonic())
            try:
                msg = ch.recv(wait if wait > 0.0 else 0.0)
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._no_reply(timeout, rid) from None
                got = self._check_taker(line, rid)
                if got is not None:
                    return got
                if gone is None:
                    gone = _WorkersGone(self)
                gone.check()
                step = min(step * 2, 0.2)
                continue
            got = self._reply(msg, rid)
            if got is not None:
                return got

    def _no_reply(self, timeout: float | None, rid: int) -> Timeout:
        return _timed_out(f"no reply from service {self._seg.name!r} within "
                          f"{_core.shown_seconds(timeout)} s{self._taker_phrase(rid)}; "
                          "a late reply will be dropped")

    def _taker_phrase(self, rid: int) -> str:
        """Who holds request ``rid``, for a Timeout: ", taken by pid N (which is
        stopped ...)", or what else may have become of it when no live worker
        has it on record ("" once this handle is closed)."""
        service, seg = self._service, self._seg
        if service is None or seg is None or seg.closed:
            return ""
        try:
            for _slot, token, held in service._entries(seg):
                if held == rid and _core.token_alive(seg._mapping, token & 0xFFFFFFFF):
                    who = _core.holder_phrase(seg._mapping, token & 0xFFFFFFFF)
                    return f", taken by the worker {who}"
        except ShmkitError:  # closed meanwhile: the Timeout stands as it is
            pass
        return (", held by no live worker: still queued, or answered by a worker that "
                "ended before the reply found room in the reply channel")

    def _parse_reply(self, msg: bytes) -> tuple[int, bytes | ShmkitError] | None:
        """(request id, the reply's bytes or the error to raise), or None
        for a message that is no reply of this version."""
        if len(msg) < _REP.size:
            return None
        version, status, rid = _REP.unpack_from(msg)
        if version != _VERSION:
            return None
        if status == _OK:
            return rid, msg[_REP.size:]
        text = msg[_REP.size:].decode("utf-8", "replace")
        if status == _DIED:
            return rid, WorkerDied(text)
        if status == _LOST:
            return rid, ReplyLost(f"service {self._seg.name!r}: {text}")
        return rid, RemoteError(f"service {self._seg.name!r}: the worker failed the request:\n"
                                + text)

    def _reply(self, msg: bytes, rid: int) -> bytes | None:
        if msg[:_REP.size] == _REP.pack(_VERSION, _OK, rid):  # the usual answer
            return msg[_REP.size:]
        got = self._parse_reply(msg)
        if got is None or got[0] != rid:
            return None  # a reply to an earlier call that timed out: dropped
        if isinstance(got[1], ShmkitError):
            raise got[1]
        return got[1]

    def _dead_takers(self, rids: Any) -> dict[int, WorkerDied]:
        """Of the requests ``rids``, those that a worker took and died with."""
        service = self._service
        assert service is not None
        seg = self._seg
        out = {}
        for _slot, token, held in service._entries(seg):
            if held in rids and not _core.token_alive(seg._mapping, token & 0xFFFFFFFF):
                pid = _core.token_owner_pid(seg._mapping, token & 0xFFFFFFFF, False)
                who = f"the worker (pid {pid})" if pid else "the worker"  # (slot since reused)
                out[held] = WorkerDied(
                    f"{who} of service {seg.name!r} that took the request died before "
                    "answering it; the request may have been partly carried out")
        return out

    def _check_taker(self, line: _Line, rid: int) -> bytes | None:
        dead = self._dead_takers((rid,))
        if not dead:
            return None
        # It may have answered just before dying.
        while True:
            try:
                msg = line.ch.recv_nowait()
            except Exception:
                break
            got = self._reply(msg, rid)
            if got is not None:
                return got
        raise dead[rid]

    def close(self) -> None:
        """Unlink and release every reply channel of this client; calls
        waiting in other threads raise ClosedError.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            lines, self._lines = self._lines, []
        for line in lines:
            line.release()
        if self._own and self._service is not None:
            self._service.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<shmkit.Client closed>"
        return f"<shmkit.Client of {self._seg.name!r}>"
