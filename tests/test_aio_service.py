"""Awaitable request/response (shmkit.aio.Service, Client, Worker) across real processes."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import threading
import time
from typing import Any

import pytest

import shmkit
import shmkit.aio as aio

from conftest import SPAWN, spawn
from conftest import fork_call as _fork, kill_wait as _kill
from test_service import _wait_until, svc_name  # noqa: F401  (a fixture, used by name)


def _tagging_worker(name: str, idle: float) -> None:
    """A blocking worker: answers payload + b"|" + its pid until idle."""
    pid = str(os.getpid()).encode()
    with shmkit.Service(name) as svc:
        svc.serve(lambda data: data + b"|" + pid, timeout=idle)


def _async_worker(name: str, idle: float, out: Any) -> None:
    """An awaiting worker whose handler is a coroutine function."""
    async def handler(data: bytes) -> bytes:
        await asyncio.sleep(0)
        return data[::-1]

    async def main() -> int:
        async with aio.Service(name) as svc:
            return await svc.serve(handler, timeout=idle)

    out.put(asyncio.run(main()))


def _hanging_worker(name: str) -> None:
    with shmkit.Service(name) as svc:
        svc.serve(lambda d: time.sleep(3600) or d)


def test_many_calls_in_flight_from_one_loop_each_get_their_own_reply(svc_name):
    with shmkit.Service(svc_name) as svc:
        workers = [spawn(_tagging_worker, svc_name, 3.0) for _ in range(2)]

        async def main() -> list[tuple[bytes, bytes]]:
            async with aio.Client(svc_name, wait_for_worker=30) as client:
                reqs = [f"req-{i}".encode() * (1 + i % 7) for i in range(400)]
                reps = await asyncio.gather(*(client.call(r, timeout=60) for r in reqs))
                return list(zip(reqs, reps))

        got = asyncio.run(main())
        assert len(got) == 400
        assert all(rep.rpartition(b"|")[0] == req for req, rep in got)
        pids = {rep.rpartition(b"|")[2] for _req, rep in got}
        assert pids <= {str(p.pid).encode() for p in workers}
        for p in workers:
            p.join(60)
            assert p.exitcode == 0
        assert svc.statistics()["served"] == 400
        assert not glob.glob(f"/dev/shm/shmkit.{svc_name}.reply.*")  # the client released it
        svc.unlink()


def test_an_awaiting_worker_serves_blocking_and_awaiting_clients(svc_name):
    out = SPAWN.Queue()
    with shmkit.Service(svc_name) as svc:
        w = spawn(_async_worker, svc_name, 2.0, out)
        with svc.client(wait_for_worker=30) as client:  # blocking
            assert client.call(b"abc", timeout=30) == b"cba"

        async def main() -> Any:
            async with aio.Client(svc, wait_for_worker=30) as client:  # a blocking handle
                a = await client.call(b"xyz", timeout=30)
                b = await client.call_object({"k": 1}, timeout=30)
                return a, b

        with pytest.raises(shmkit.RemoteError, match="unhashable|reverse|not subscript"):
            # call_object: the handler reverses a dict: its error comes back
            asyncio.run(main())
        w.join(60)
        assert w.exitcode == 0 and out.get(timeout=10) == 3  # the failed call counts too
        assert svc.statistics()["failed"] == 1
        svc.unlink()


def test_a_timed_out_or_cancelled_call_leaves_the_next_its_own_reply(svc_name):
    async def main(svc: aio.Service) -> None:
        worker = svc.worker()
        client = svc.client()
        try:
            with pytest.raises(shmkit.Timeout, match="late reply will be dropped"):
                await client.call(b"one", timeout=0.05)
            cancelled = asyncio.create_task(client.call(b"two", timeout=30))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            # the worker answers both late, then the third call
            for _ in range(2):
                req = await worker.recv(timeout=5)
                req.reply(b"late " + req.data)
            third = asyncio.create_task(client.call(b"three", timeout=30))
            req = await worker.recv(timeout=5)
            assert req.data == b"three"
            req.reply(b"on time")
            assert await third == b"on time"
        finally:
            client.close()
            worker.close()

    with aio.Service(svc_name) as svc:
        asyncio.run(main(svc))
        svc.unlink()


def test_a_worker_killed_mid_request_fails_that_call_only(svc_name):
    with shmkit.Service(svc_name) as svc:
        pid = _fork(_hanging_worker, svc_name)

        async def main() -> tuple[Any, float]:
            async with aio.Client(svc_name, wait_for_worker=60) as client:
                t0 = time.monotonic()
                task = asyncio.create_task(client.call(b"x", timeout=120))
                while svc.statistics()["busy"] != 1:
                    await asyncio.sleep(0.01)
                _kill(pid)
                try:
                    await task
                except BaseException as e:  # noqa: BLE001
                    return e, time.monotonic() - t0
                return None, 0.0

        err, took = asyncio.run(main())
        assert isinstance(err, shmkit.WorkerDied), err
        assert f"pid {pid}" in str(err) and took < 100
        svc.unlink()


def test_a_call_whose_worker_died_fails_while_other_replies_keep_coming(svc_name):
    """The reply reader looks for dead workers every 0.2 s even while the
    other calls' replies keep it busy (it looked only after 20 ms without a
    reply: the call waited as long as the others went on)."""
    with shmkit.Service(svc_name) as svc:
        pid = _fork(_hanging_worker, svc_name)
        quick = threading.Thread(target=lambda: svc.serve(lambda d: d, timeout=2.0))

        async def main() -> tuple[Any, float, int]:
            async with aio.Client(svc_name, wait_for_worker=60) as client:
                task = asyncio.create_task(client.call(b"hang", timeout=None))
                while svc.statistics()["busy"] != 1:
                    await asyncio.sleep(0.01)
                quick.start()
                answered, stop = [0], asyncio.Event()

                async def loop() -> None:
                    while not task.done() and not stop.is_set():
                        await client.call(b"q", timeout=30)
                        answered[0] += 1

                loops = [asyncio.create_task(loop()) for _ in range(8)]
                while answered[0] < 100:
                    await asyncio.sleep(0.01)
                _kill(pid)
                t0 = time.monotonic()
                done, _ = await asyncio.wait([task], timeout=20)
                took = time.monotonic() - t0
                stop.set()
                await asyncio.gather(*loops)
                if not done:
                    task.cancel()
                return (task.exception() if done else None), took, answered[0]

        err, took, answered = asyncio.run(main())
        quick.join(30)
        assert isinstance(err, shmkit.WorkerDied), (err, answered)
        assert took < 20
        svc.unlink()


def test_no_worker_raises_at_once_and_wait_for_worker_waits(svc_name):
    with aio.Service(svc_name) as svc:
        async def main() -> bytes:
            with pytest.raises(shmkit.ServiceUnavailable, match="no worker attached"):
                await svc.call(b"x", timeout=5)
            serving = asyncio.create_task(_serve_later(svc))
            async with svc.client(wait_for_worker=10) as client:
                got = await client.call(b"x", timeout=10)
            await serving
            return got

        assert asyncio.run(main()) == b"X"
        svc.unlink()


async def _serve_later(svc: aio.Service) -> None:
    await asyncio.sleep(0.2)
    await svc.serve(bytes.upper, max_requests=1)


def test_cancelling_serve_fails_the_request_in_hand(svc_name):
    async def main(svc: aio.Service) -> None:
        started = asyncio.Event()

        async def slow(data: bytes) -> bytes:
            started.set()
            await asyncio.sleep(3600)
            return data

        serving = asyncio.create_task(svc.serve(slow))
        async with svc.client(wait_for_worker=5) as client:
            call = asyncio.create_task(client.call(b"x", timeout=30))
            await started.wait()
            serving.cancel()
            with pytest.raises(shmkit.RemoteError, match="stopped before answering"):
                await call
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert svc.statistics()["workers"] == 0

    with aio.Service(svc_name) as svc:
        asyncio.run(main(svc))
        svc.unlink()


def test_async_for_over_a_worker_and_threads_with_their_own_loops(svc_name):
    with aio.Service(svc_name) as svc:
        stop = threading.Event()

        def serve() -> None:
            async def main() -> None:
                async with svc.worker() as w:
                    async for req in w:
                        req.reply(req.data + b"!")
                        if stop.is_set():
                            return
            asyncio.run(main())

        server = threading.Thread(target=serve)
        server.start()
        client = svc.client(wait_for_worker=10)
        bad: list[Any] = []

        def calls(t: int) -> None:
            async def main() -> None:
                reqs = [f"{t}.{i}".encode() for i in range(50)]
                reps = await asyncio.gather(*(client.call(r, timeout=30) for r in reqs))
                bad.extend((q, p) for q, p in zip(reqs, reps) if p != q + b"!")
            asyncio.run(main())

        callers = [threading.Thread(target=calls, args=(t,)) for t in range(3)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(60)
        assert not bad
        stop.set()
        asyncio.run(client.call(b"last", timeout=10))
        server.join(30)
        assert not server.is_alive()
        client.close()
        svc.unlink()


def test_closing_a_client_fails_its_pending_calls(svc_name):
    async def main(svc: aio.Service) -> None:
        worker = svc.worker()
        client = svc.client()
        try:
            call = asyncio.create_task(client.call(b"x", timeout=30))
            await worker.recv(timeout=5)  # taken, never answered
            client.close()
            with pytest.raises(shmkit.ClosedError):
                await call
            with pytest.raises(shmkit.ClosedError):
                await client.call(b"y", timeout=1)
        finally:
            worker.close()

    with aio.Service(svc_name) as svc:
        asyncio.run(main(svc))
        svc.unlink()


def test_ctrl_c_in_an_awaiting_client_leaves_the_service_working(svc_name):
    import subprocess
    import sys
    from conftest import SRC
    code = f"""
import asyncio, sys, shmkit.aio as aio
async def main():
    async with aio.Client({svc_name!r}, wait_for_worker=30) as c:
        print("calling", flush=True)
        await c.call(b"x", timeout=600)
try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
"""
    with shmkit.Service(svc_name) as svc:
        w = svc.worker()  # attached, never answers: the call waits
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
        try:
            assert p.stdout.readline().strip() == "calling"
            _wait_until(lambda: svc.statistics()["pending"] == 1, what="the request")
            os.kill(p.pid, signal.SIGINT)
            assert p.wait(30) == 0
            assert p.stdout.read().strip() == "interrupted"
        finally:
            p.kill()
            p.wait()
        req = w.recv(timeout=5)
        assert req.reply(b"late") is False  # its caller is gone: discarded, counted
        assert svc.statistics()["discarded"] == 1
        w.close()
        svc.unlink()
