"""Request/response for asyncio: ``shmkit.aio.Service``, ``Client`` and ``Worker``.

The classes of :mod:`shmkit.service` with coroutine methods: ``await
client.call(data, timeout=1.0)``, ``await worker.recv()``, ``async for req
in worker``, ``await service.serve(handler)`` (the handler may be a
coroutine function).  Arguments, results and errors are the blocking
forms'; they talk to blocking clients and workers of the same service.

>>> import asyncio, shmkit.aio
>>> async def main():
...     async with shmkit.aio.Service("doc-aio-echo") as svc:
...         serving = asyncio.create_task(svc.serve(bytes.upper, max_requests=2))
...         async with svc.client(wait_for_worker=5.0) as client:
...             replies = await asyncio.gather(client.call(b"a", timeout=5.0),
...                                            client.call(b"b", timeout=5.0))
...         await serving
...         svc.unlink()
...         return replies
>>> asyncio.run(main())
[b'A', b'B']

One client handle may have any number of calls in flight from the tasks of
one event loop: they share the thread's reply channel, and one reader task
per loop hands each reply to the call whose request id it carries (a
blocking client has one call in flight per thread, so it reads its own).
A cancelled or timed-out call leaves its request queued; its late reply is
dropped, never handed to another call.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import threading
import time
from typing import Any, Callable, TypeVar, cast

from . import service as _service
from .aio import _REPAIR_TIMEOUT, Channel, _nowait, _timed, _until
from .aio_wait import _describe
from .errors import ClosedError, ServiceUnavailable, ShmkitError, Timeout
from .segment import Segment
from .service import DEFAULT_REPLY_CAPACITY, Request

__all__ = ["Service", "Client", "Worker"]


class Service(_service.Service):
    """:class:`shmkit.Service` with awaitable :meth:`serve` and :meth:`call`.

    >>> import asyncio, shmkit.aio
    >>> async def main():
    ...     async with shmkit.aio.Service("doc-aio-svc") as svc:
    ...         async def handler(data):
    ...             await asyncio.sleep(0)
    ...             return data[::-1]
    ...         serving = asyncio.create_task(svc.serve(handler, max_requests=1))
    ...         await asyncio.sleep(0)  # the serving task attaches its worker
    ...         got = await svc.call(b"abc", timeout=5.0)
    ...         await serving
    ...         svc.unlink()
    ...         return got
    >>> asyncio.run(main())
    b'cba'
    """

    _channel_class = Channel
    _client: "Client | None" = None

    def worker(self) -> "Worker":
        """A :class:`Worker` of this service (one per task that serves)."""
        return Worker(self)

    def client(self, *, reply_capacity: int = DEFAULT_REPLY_CAPACITY,
               wait_for_worker: float = 0.0) -> "Client":
        """A :class:`Client` of this service."""
        return Client(self, reply_capacity=reply_capacity, wait_for_worker=wait_for_worker)

    async def serve(self, handler: Callable[[Any], Any], *,  # type: ignore[override]  # coroutine
                    timeout: float | None = None, max_requests: int | None = None,
                    objects: bool = True) -> int:
        """Answer requests until ``timeout`` seconds pass without one,
        ``max_requests`` were answered, or this handle is closed; returns how
        many were answered.  ``handler`` is a function or a coroutine
        function; otherwise as :meth:`shmkit.Service.serve`.  Requests are
        answered one at a time: run several ``serve()`` tasks to overlap
        them.  A cancelled ``serve()`` fails the request in hand."""
        timeout = _service._serve_args(handler, timeout, max_requests, objects)
        done = 0
        with Worker(self) as w:
            while max_requests is None or done < max_requests:
                try:
                    req = await w.recv(timeout)
                except ClosedError:
                    break
                except Timeout as e:
                    if not e._deadline:  # (a signal handler's own)
                        raise
                    break
                if req.pickled and not objects:
                    _service._refuse_object(req)
                    done += 1
                    continue
                try:
                    result = handler(req.object() if req.pickled else req.data)
                    if inspect.isawaitable(result):
                        result = await result
                    _service._answer(req, result)
                except Exception:  # the handler's
                    _service._failed(req)
                done += 1
        return done

    async def call(self, data: Any,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> bytes:
        """:meth:`Client.call` through a client this handle keeps."""
        return await self._own_client().call(data, timeout)

    async def call_object(self, obj: Any, timeout: float | None = None) -> Any:
        """:meth:`Client.call_object` through this handle's own client."""
        return await self._own_client().call_object(obj, timeout)

    def _own_client(self) -> "Client":
        return cast(Client, super()._own_client())  # made by client(): awaitable

    async def __aenter__(self) -> "Service":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


_Own = TypeVar("_Own", bound="_OwnRequests")


class _OwnRequests:
    """A worker or client of a blocking service's handle opens its own
    awaitable handle of the request channel, closed with it."""

    _own_requests: Channel | None = None

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]  # the service class's
        finally:
            own, self._own_requests = self._own_requests, None
            if own is not None:
                own.close()

    async def __aenter__(self: _Own) -> _Own:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Worker(_OwnRequests, _service.Worker):
    """:class:`shmkit.Worker` with an awaitable :meth:`recv` and ``async for``.

    >>> # async for req in service.worker():  req.reply(req.data.upper())
    """

    _own_requests: Channel | None = None

    def __init__(self, service: _service.Service) -> None:
        super().__init__(service)
        if not isinstance(self._requests, Channel):  # a blocking service's handle
            try:
                self._requests = self._own_requests = Channel(
                    self._held().name + ".requests", create=False)
            except BaseException:
                super().close()
                raise

    async def recv(self,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> Request:
        """The next request (:class:`Timeout` after ``timeout`` s); a
        cancelled ``recv`` takes none."""
        seg, requests, timeout, deadline = self._start_recv(timeout)
        while True:
            msg = self._box[0]
            if type(msg) is not bytes:  # (else taken before, and interrupted: handed out now)
                try:
                    msg = await self._take_awaited(cast(Channel, requests), seg,
                                                   self._step(deadline))
                except Timeout as e:
                    if not e._deadline:  # (a signal handler's own)
                        raise
                    self._check_deadline(seg, timeout, deadline)
                    continue
            req = self._took(seg, msg)
            if req is not None:
                return req

    async def _take_awaited(self, requests: Channel, seg: Segment, timeout: float) -> bytes:
        """The blocking worker's take (the request in the box, its id on
        record, in one call of the core), awaited as Channel.recv awaits."""
        take = self._take
        return await _until(lambda: _nowait(take, requests, seg, None, True),
                            lambda: _describe(requests, 0, False), timeout,
                            lambda: take(requests, seg, 0.0, False),
                            lambda: _timed(take, requests, seg, _REPAIR_TIMEOUT, False))

    def __aiter__(self) -> "Worker":
        return self

    async def __anext__(self) -> Request:
        try:
            return await self.recv()
        except ClosedError:
            raise StopAsyncIteration from None



_LOOK_EVERY = 0.2  # seconds between a reply reader's looks for dead workers, at most


class _Dispatch:
    """One thread's reply channel of a client, read by one task that hands
    each reply to the pending call with its request id, and looks for the
    workers of its pending calls that died (after each quiet step, and at
    least every ``_LOOK_EVERY`` seconds)."""

    __slots__ = ("client", "line", "pending", "task")

    def __init__(self, client: "Client", line: Any) -> None:
        self.client = client
        self.line = line
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self.task
        if task is None or task.done() or task.get_loop() is not loop:
            self.task = loop.create_task(self._read())

    async def _read(self) -> None:
        ch = cast(Channel, self.line.ch)
        step = 0.02
        gone = _service._WorkersGone(self.client)
        looked = time.monotonic()
        try:
            while self.pending:
                got = await ch.recv_many(len(self.pending), step)  # [] when step passed
                step = 0.02 if got else min(step * 2, _LOOK_EVERY)
                for msg in got:
                    self._deliver(msg)
                # after a quiet step, and also while the other calls' replies
                # never leave it quiet
                now = time.monotonic()
                if self.pending and (not got or now - looked >= _LOOK_EVERY):
                    self._look(gone)
                    looked = now
        except asyncio.CancelledError:
            for fut in self.pending.values():
                fut.cancel()
            raise
        except ShmkitError as e:  # the client was closed, or its channel damaged
            self._fail_all(e)
        finally:
            if self.task is asyncio.current_task():
                self.task = None

    def _deliver(self, msg: bytes) -> None:
        got = self.client._parse_reply(msg)
        if got is None:
            return
        fut = self.pending.get(got[0])
        if fut is None or fut.done():
            return  # a reply to a call that timed out or was cancelled: dropped
        if isinstance(got[1], ShmkitError):
            fut.set_exception(got[1])
        else:
            fut.set_result(got[1])

    def _look(self, gone: Any) -> None:
        """After a quiet while: fail the calls whose worker died, or all of
        them when every worker has been gone for ``wait_for_worker``."""
        dead = self.client._dead_takers(self.pending)
        if dead:
            while True:  # a worker may have answered just before dying
                try:
                    self._deliver(self.line.ch.recv_nowait())
                except ShmkitError:
                    break
            for rid, err in dead.items():
                fut = self.pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_exception(err)
        try:
            gone.check()
        except ServiceUnavailable as e:
            self._fail_all(e)

    def _fail_all(self, e: ShmkitError) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(type(e)(str(e)))


class Client(_OwnRequests, _service.Client):
    """:class:`shmkit.Client` with awaitable :meth:`call` and :meth:`call_object`.

    Any number of tasks may call through one client at once (see the
    module's notes).

    >>> # async with shmkit.aio.Client("resize") as c:  await c.call(b"x", timeout=1.0)
    """

    _channel_class = Channel
    _own_requests: Channel | None = None

    def __init__(self, service: str | _service.Service, *,
                 reply_capacity: int = DEFAULT_REPLY_CAPACITY,
                 wait_for_worker: float = 0.0) -> None:
        own = isinstance(service, str)
        if own:
            service = Service(cast(str, service))
        try:
            super().__init__(service, reply_capacity=reply_capacity,
                             wait_for_worker=wait_for_worker)
            if not isinstance(self._requests, Channel):  # a blocking service's handle
                self._requests = self._own_requests = Channel(self._seg.name + ".requests",
                                                              create=False)
        except BaseException:
            if own:
                cast(Service, service).close()
            raise
        self._own = own
        self._dispatch = threading.local()

    async def call(self, data: Any,  # type: ignore[override]  # coroutine
                   timeout: float | None = None) -> bytes:
        """Send ``data`` (bytes-like) and await the reply's bytes; raises
        like :meth:`shmkit.Client.call`.  A cancelled call's reply is dropped."""
        return await self._acall(_service._request_bytes(data), 0, timeout)

    async def call_object(self, obj: Any, timeout: float | None = None) -> Any:
        """Send ``obj`` pickled and await the reply unpickled (trust the workers)."""
        out = await self._acall(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL),
                                _service._F_PICKLE, timeout)
        return pickle.loads(out)

    async def _acall(self, payload: Any, flags: int, timeout: Any) -> bytes:
        timeout, deadline = self._start_call(timeout)
        end = self._worker_wait_end(deadline)
        if end is not None:
            await self._await_workers(end)
        line, rid, msg = self._request(payload, flags)
        d: _Dispatch | None = getattr(self._dispatch, "d", None)
        if d is None or d.line is not line:
            d = self._dispatch.d = _Dispatch(self, line)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        d.pending[rid] = fut
        try:
            try:
                await cast(Channel, self._requests_channel()).send(msg, timeout)
            except Timeout as e:
                if not e._deadline:  # (a signal handler's own)
                    raise
                raise self._requests_full(timeout) from None
            d.start(loop)
            if deadline is None:
                return await fut
            # a timer settling the future: cheaper than asyncio.wait_for's task
            timer = loop.call_later(max(deadline - time.monotonic(), 0.0), self._expire, fut,
                                    timeout, rid)
            try:
                return await fut
            finally:
                timer.cancel()
        finally:
            d.pending.pop(rid, None)

    def _expire(self, fut: asyncio.Future[bytes], timeout: float | None, rid: int) -> None:
        if not fut.done():
            fut.set_exception(self._no_reply(timeout, rid))

    async def _await_workers(self, end: float) -> None:
        pause = 0.001
        while not self._has_workers():
            if time.monotonic() >= end:
                raise self._unavailable()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        self._verified = time.monotonic()

