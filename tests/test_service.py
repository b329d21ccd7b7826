"""Request/response (shmkit.Service): real processes, kills, timeouts, misuse."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import glob
import os
import random
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import shmkit
import shmkit.aio
from shmkit import _core
from shmkit import aio_service as aio_service_mod
from shmkit import segment as segment_mod
from shmkit import service as service_mod
from shmkit.service import _reap_replies

from conftest import SPAWN, SRC, as_user, interrupt_at_bytecode, run_python, spawn
from conftest import fork_call as _fork, kill_wait as _kill


@pytest.fixture
def svc_name() -> Iterator[str]:
    """A unique service name; every name of the service is removed afterwards."""
    made = f"t-svc-{secrets.token_hex(5)}"
    yield made
    for path in glob.glob(f"/dev/shm/shmkit.{made}*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _files(name: str, part: str = "") -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/shmkit.{name}{part}*"))


def _replies(name: str) -> list[str]:
    return _files(name, ".reply.")


def _wait_until(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- children ------------------------------------------------------------------


def _tagging_worker(name: str, idle: float, out: Any) -> None:
    """Serve until idle; answer payload + b"|" + pid; report what was handled."""
    handled: list[bytes] = []
    pid = str(os.getpid()).encode()

    def handle(data: bytes) -> bytes:
        handled.append(data)
        return data + b"|" + pid

    with shmkit.Service(name) as svc:
        svc.serve(handle, timeout=idle)
    out.put(handled)


def _calling_client(name: str, tag: int, n: int, threads: int, out: Any) -> None:
    """Call n times from each of several threads; report (sent, bad, errors)."""
    bad: list[Any] = []
    sent: list[bytes] = []
    lock = threading.Lock()
    with shmkit.Client(name, wait_for_worker=30) as client:
        def run(t: int) -> None:
            for i in range(n):
                req = f"{tag}.{t}.{i}".encode() + b"x" * random.randrange(0, 200)
                rep = client.call(req, timeout=60)
                with lock:
                    sent.append(req)
                    if rep.rpartition(b"|")[0] != req:
                        bad.append((req, rep))
        ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    out.put((sent, bad))


# -- basics --------------------------------------------------------------------


def test_round_trip_names_and_close(svc_name):
    with shmkit.Service(svc_name) as svc:
        t = threading.Thread(target=svc.serve, args=(bytes.upper,), kwargs={"timeout": 30})
        t.start()
        with shmkit.Client(svc_name, wait_for_worker=30) as client:
            assert client.call(b"hello", timeout=30) == b"HELLO"
            assert client.call(bytearray(b"ab"), timeout=30) == b"AB"
            assert client.call(memoryview(b"cd"), timeout=30) == b"CD"
            assert len(_replies(svc_name)) == 1
            assert _files(svc_name) == sorted([f"shmkit.{svc_name}", f"shmkit.{svc_name}.requests"]
                                              + _replies(svc_name))
            listed = {o["name"]: o for o in shmkit.inspect.list_objects([f"{svc_name}*"])}
            assert listed[svc_name]["kind"] == "service"
            assert listed[svc_name]["state"] == "ok"
            assert listed[f"{svc_name}.requests"]["kind"] == "channel"
        # the client's close unlinks its reply channel at once
        assert _replies(svc_name) == []
        stats = svc.statistics()
        assert stats["served"] == 3 and stats["workers"] == 1 and stats["pending"] == 0
        svc.close()  # the serving thread's recv raises, serve returns
        t.join(30)
        assert not t.is_alive()
        svc2 = shmkit.Service.open(svc_name)
        svc2.unlink()
        svc2.close()
    assert _files(svc_name) == []


def test_ls_shows_the_service(svc_name):
    with shmkit.Service(svc_name) as svc, svc.worker():
        info = shmkit.inspect.describe(svc_name)
        assert info["kind"] == "service"
        assert info["service"]["workers"] == 1, info
        out = run_python("import sys; from shmkit.cli import main; main(["
                         f"'info', {svc_name!r}])", check=False)
        assert "workers" in out.stdout, out.stdout + out.stderr
        svc.unlink()


def test_many_clients_many_workers_every_reply_to_its_caller(svc_name):
    svc = shmkit.Service(svc_name)
    out = SPAWN.Queue()
    workers = [spawn(_tagging_worker, svc_name, 5.0, out) for _ in range(3)]
    clients = [spawn(_calling_client, svc_name, k, 150, 3, out) for k in range(4)]
    results = [out.get(timeout=240) for _ in range(len(clients) + len(workers))]
    for p in clients + workers:
        p.join(60)
        assert p.exitcode == 0
    sent: list[bytes] = []
    handled: list[bytes] = []
    for r in results:
        if isinstance(r, tuple):
            assert r[1] == [], f"replies delivered to the wrong call: {r[1][:3]}"
            sent += r[0]
        else:
            handled += r
    assert len(sent) == 4 * 3 * 150
    assert len(set(sent)) == len(sent)
    # each request handled exactly once: none lost, none duplicated
    assert sorted(handled) == sorted(sent)
    assert svc.statistics()["served"] == len(sent)
    assert _replies(svc_name) == []
    svc.unlink()
    svc.close()


def test_threads_of_one_process_get_their_own_replies(svc_name):
    svc = shmkit.Service(svc_name)
    out = SPAWN.Queue()
    workers = [spawn(_tagging_worker, svc_name, 3.0, out) for _ in range(2)]
    client = shmkit.Client(svc, wait_for_worker=30)
    bad: list[Any] = []
    # every thread is alive when each makes its first call, so none of their
    # channels is released as an ended thread's
    first = threading.Barrier(8)

    def run(t: int) -> None:
        for i in range(200):
            if i == 1:
                first.wait(60)
            req = f"{t}:{i}".encode()
            rep = client.call(req, timeout=60)
            if rep.rpartition(b"|")[0] != req:
                bad.append((req, rep))

    ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert bad == []
    assert len(_replies(svc_name)) == 8  # one reply channel per calling thread
    client.close()
    assert _replies(svc_name) == []
    for _ in workers:
        out.get(timeout=60)
    svc.unlink()
    svc.close()


def test_a_client_keeps_one_reply_channel_per_live_thread(svc_name):
    # A pool that replaces its threads, or a thread per request: the reply
    # channels of ended threads are released, not kept until close().
    svc = shmkit.Service(svc_name)
    out = SPAWN.Queue()
    worker = spawn(_tagging_worker, svc_name, 3.0, out)
    client = shmkit.Client(svc, wait_for_worker=30)
    replies: list[bytes] = []
    seen: list[int] = []

    def one_call(i: int) -> None:
        replies.append(client.call(str(i).encode(), timeout=60))
        seen.append(len(_replies(svc_name)))

    for i in range(40):  # one short-lived thread after another
        t = threading.Thread(target=one_call, args=(i,))
        t.start()
        t.join()
    assert [r.rpartition(b"|")[0] for r in replies] == [str(i).encode() for i in range(40)]
    assert max(seen) <= 2  # its own, and the ended thread's before it made its own
    called, long_lived = threading.Event(), threading.Event()
    stay = threading.Thread(target=lambda: (client.call(b"stay", timeout=60), called.set(),
                                            long_lived.wait(60)))
    stay.start()
    assert called.wait(60)
    assert len(_replies(svc_name)) == 1  # the last ended thread's went when it came
    one_call(99)  # this thread's first call: the live thread's channel stays
    assert len(_replies(svc_name)) == 2
    long_lived.set()
    stay.join()
    client.close()
    assert _replies(svc_name) == []
    out.get(timeout=60)
    worker.join(60)
    svc.unlink()
    svc.close()


def test_pickled_objects_and_handler_errors(svc_name):
    def handler(obj: Any) -> Any:
        if obj == "boom":
            raise KeyError("no such thing")
        return {"got": obj}

    with shmkit.Service(svc_name) as svc:
        t = threading.Thread(target=svc.serve, args=(handler,), kwargs={"timeout": 30})
        t.start()
        with svc.client(wait_for_worker=30) as client:
            assert client.call_object([1, 2], timeout=30) == {"got": [1, 2]}
            with pytest.raises(shmkit.RemoteError, match="no such thing") as e:
                client.call_object("boom", timeout=30)
            assert isinstance(e.value, RuntimeError)
            assert client.call_object(3, timeout=30) == {"got": 3}  # still serving
        assert svc.statistics()["failed"] == 1
        svc.close()
        t.join(30)
        shmkit.Service(svc_name).unlink()


class _PlantsAFile:
    """An object whose unpickling creates a file: proof that it was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("awaiting", [False, True], ids=["blocking", "aio"])
def test_a_service_served_for_bytes_only_never_unpickles_a_request(svc_name, tmp_path,
                                                                    awaiting):
    """serve(objects=False): a call_object() request is failed unread, so a
    caller cannot run code in the worker through pickle; bytes still work."""
    planted = tmp_path / "unpickled"
    serve = "svc.serve(lambda d: d.upper(), timeout=30, max_requests=3, objects=False)"
    kind, serve = (("shmkit.aio.Service", f"asyncio.run({serve})") if awaiting else
                   ("shmkit.Service", serve))
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, shmkit, shmkit.aio\n"
         f"with {kind}({svc_name!r}) as svc:\n"
         f"    print({serve})\n"],
        env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE)
    try:
        with shmkit.Client(svc_name, wait_for_worker=30) as client:
            assert client.call(b"abc", timeout=30) == b"ABC"
            with pytest.raises(shmkit.RemoteError, match=rf"service '{svc_name}': the worker failed "
                               r"the request:\nthis service serves bytes only \(serve\(objects=False\)\).*call\(\), not "
                               r"call_object\(\)"):
                client.call_object(_PlantsAFile(str(planted)), timeout=30)
            assert client.call(b"def", timeout=30) == b"DEF"  # still serving
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.strip() == b"3"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not planted.exists()
    with shmkit.Service(svc_name) as svc:
        assert svc.statistics()["failed"] == 1 and svc.statistics()["served"] == 3
        with pytest.raises(TypeError, match="objects must be True or False, not 0"):
            svc.serve(lambda d: d, timeout=0, objects=0)  # type: ignore[arg-type]
        svc.unlink()


def test_a_served_object_request_is_unpickled_by_default(svc_name, tmp_path):
    """The counterpart of serving bytes only: by default a worker unpickles what
    the caller sent, code included (the caller is trusted as the worker's user)."""
    planted = tmp_path / "unpickled"
    with shmkit.Service(svc_name) as svc:
        t = threading.Thread(target=svc.serve, args=(lambda obj: type(obj).__name__,),
                             kwargs={"timeout": 30, "max_requests": 1})
        t.start()
        with svc.client(wait_for_worker=30) as client:
            assert client.call_object(_PlantsAFile(str(planted)), timeout=30) == \
                "TextIOWrapper"
        t.join(30)
        svc.unlink()
    assert planted.exists()


# -- no worker, timeouts -------------------------------------------------------------


def test_no_worker_raises_at_once(svc_name):
    with shmkit.Service(svc_name) as svc, svc.client() as client:
        t0 = time.monotonic()
        with pytest.raises(shmkit.ServiceUnavailable, match="no worker") as e:
            client.call(b"x", timeout=60)
        assert isinstance(e.value, ConnectionError)
        assert time.monotonic() - t0 < 30  # at once, not after the call's timeout
        assert svc.statistics()["pending"] == 0  # nothing was sent
        svc.unlink()


def test_wait_for_worker_waits_for_one_to_come(svc_name):
    with shmkit.Service(svc_name) as svc, svc.client(wait_for_worker=60) as client:
        def late() -> None:
            time.sleep(0.3)
            svc.serve(bytes.upper, max_requests=1)
        t = threading.Thread(target=late)
        t.start()
        assert client.call(b"late", timeout=60) == b"LATE"
        t.join(30)
        svc.unlink()


def test_worker_that_left_cleanly_fails_waiting_call(svc_name):
    """A call waiting when the last worker leaves (its request still queued)."""
    with shmkit.Service(svc_name) as svc, svc.client() as client:
        w = svc.worker()
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(
            pytest.raises(shmkit.ServiceUnavailable, client.call, b"x", 60)))
        t.start()
        _wait_until(lambda: svc.statistics()["pending"] == 1, what="the request")
        w.close()
        t.join(60)
        assert result and "left" in str(result[0].value)
        svc.unlink()


def test_stale_reply_after_timeout_is_dropped(svc_name):
    with shmkit.Service(svc_name) as svc:
        def slow(data: bytes) -> bytes:
            if data == b"slow":
                time.sleep(1.0)
            return data + b"!"
        t = threading.Thread(target=svc.serve, args=(slow,), kwargs={"timeout": 30})
        t.start()
        with svc.client(wait_for_worker=30) as client:
            with pytest.raises(shmkit.Timeout, match="within 0.1 s"):
                client.call(b"slow", timeout=0.1)
            # the late b"slow!" reply arrives meanwhile; the next call gets its own
            assert client.call(b"next", timeout=30) == b"next!"
            assert client.call(b"again", timeout=30) == b"again!"
        svc.close()
        t.join(60)
        shmkit.Service(svc_name).unlink()


def test_worker_recv_timeout_and_unanswered_request_failed(svc_name):
    with shmkit.Service(svc_name) as svc:
        with svc.worker() as w:
            with pytest.raises(shmkit.Timeout, match="no request"):
                w.recv(timeout=0.05)
            res: list[Any] = []
            with svc.client() as client:
                t = threading.Thread(target=lambda: res.append(
                    pytest.raises(shmkit.RemoteError, client.call, b"a", 60)))
                t.start()
                req = w.recv(timeout=30)
                assert req.data == b"a" and not req.pickled
                with pytest.raises(TypeError, match="holds bytes"):
                    req.object()
                w.close()  # closing with the request unanswered fails it
                t.join(30)
                assert "stopped before answering" in str(res[0].value)
        svc.unlink()


# -- deaths ------------------------------------------------------------------------




def _hanging_worker(name: str) -> None:
    with shmkit.Service(name) as svc:
        svc.serve(lambda d: time.sleep(3600) or d)


def test_worker_killed_mid_request_raises_worker_died(svc_name):
    with shmkit.Service(svc_name) as svc, svc.client(wait_for_worker=60) as client:
        pid = _fork(_hanging_worker, svc_name)
        res: list[Any] = []

        def call() -> None:
            t0 = time.monotonic()
            try:
                client.call(b"x", timeout=120)
            except BaseException as e:
                res.append((e, time.monotonic() - t0))

        t = threading.Thread(target=call)
        t.start()
        _wait_until(lambda: svc.statistics()["busy"] == 1, what="the worker to take it")
        _kill(pid)
        t.join(120)
        err, took = res[0]
        assert isinstance(err, shmkit.WorkerDied), err
        assert isinstance(err, ConnectionError)
        assert f"pid {pid}" in str(err)
        assert took < 100  # well before the call's own timeout
        assert svc.statistics()["abandoned"] == 1
        svc.unlink()


def test_a_worker_that_takes_the_slot_of_one_that_died_with_a_request_fails_its_call(svc_name):
    """A worker killed holding a request, whose attach slot (and so its entry in
    the worker table) a new worker takes before the caller looked: the caller
    learns of the death all the same (the new worker tells it), where it waited
    for good, the other workers alive, its request in nobody's entry."""
    with shmkit.Service(svc_name, max_attach=12) as svc:
        taker = subprocess.Popen(
            [sys.executable, "-c",
             "import time, shmkit\n"
             f"with shmkit.Service({svc_name!r}) as svc, svc.worker() as w:\n"
             "    req = w.recv(timeout=60)\n"
             "    time.sleep(3600)\n"],
            env=dict(os.environ, PYTHONPATH=SRC))
        caller = subprocess.Popen(
            [sys.executable, "-c",
             "import shmkit\n"
             f"with shmkit.Client({svc_name!r}, wait_for_worker=60) as c:\n"
             "    try:\n"
             "        c.call(b'x', timeout=None)\n"
             "    except shmkit.WorkerDied as e:\n"
             "        print('WorkerDied', e)\n"],
            env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE, text=True)
        workers: list[Any] = []
        try:
            _wait_until(lambda: svc.statistics()["busy"] == 1, what="the worker to take it")
            [slot] = [s for s, _token, rid in svc._entries(svc._seg) if rid]
            os.kill(caller.pid, signal.SIGSTOP)  # so that it cannot look meanwhile
            taker.kill()
            taker.wait(30)
            while not any(w._token & 0x3FF == slot for w in workers):
                workers.append(svc.worker())  # (each takes a free slot)
            os.kill(caller.pid, signal.SIGCONT)
            out, _ = caller.communicate(timeout=30)
            assert out.startswith("WorkerDied"), out
            assert "died before answering" in out
            assert svc.statistics()["abandoned"] == 0
        finally:
            for p in (taker, caller):
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                    p.wait(30)
            for w in workers:
                w.close()
        svc.unlink()


def _client_then_wait(name: str, ready: Any) -> None:
    with shmkit.Client(name, wait_for_worker=60) as client:
        ready.set()
        client.call(b"for-the-dead", timeout=600)


def test_reply_to_a_dead_client_is_discarded(svc_name):
    with shmkit.Service(svc_name) as svc:
        ready = SPAWN.Event()
        w = svc.worker()
        p = spawn(_client_then_wait, svc_name, ready)
        req = w.recv(timeout=120)
        assert req.data == b"for-the-dead"
        assert len(_replies(svc_name)) == 1
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        # the worker's reply never blocks nor raises; the reply channel goes away
        req.reply(b"too late")
        with pytest.raises(shmkit.ClosedError, match="already answered"):
            req.reply(b"twice")
        w._sweep(time.monotonic())
        assert _replies(svc_name) == []
        # a request whose channel is gone is discarded and counted
        with svc.client(wait_for_worker=60) as c2:
            t = threading.Thread(target=lambda: pytest.raises(shmkit.Timeout, c2.call,
                                                              b"gone", 1.0))
            t.start()
            req2 = w.recv(timeout=60)
            t.join(60)
        assert not req2.reply(b"nobody")
        assert svc.statistics()["discarded"] >= 1
        w.close()
        svc.unlink()


def _fill(ch: shmkit.Channel, message: bytes) -> None:
    """Send ``message`` until the channel is full."""
    while True:
        try:
            ch.send_nowait(message)
        except shmkit.Full:
            return


def test_full_reply_channel_never_wedges_the_worker(svc_name):
    with shmkit.Service(svc_name) as svc:
        w = svc.worker()
        with svc.client(reply_capacity=4096) as client:
            # a call that gave up, whose caller then reads no replies
            with pytest.raises(shmkit.Timeout):
                client.call(b"q", timeout=0.1)
            line = client._line()
            _fill(line.ch, b"j" * 500)
            req = w.recv(timeout=60)
            t0 = time.monotonic()
            assert req.reply(b"r" * 500) is True  # kept for the caller, at once
            assert time.monotonic() - t0 < 30 and w._kept_n == 1
            assert svc.statistics()["discarded"] == 0
            # a reply larger than the caller's channel: the caller is told why
            res: list[Any] = []
            t = threading.Thread(target=lambda: res.append(
                pytest.raises(shmkit.RemoteError, client.call, b"big", 60)))
            t.start()
            w.recv(timeout=60).reply(b"x" * 10000)
            t.join(60)
            assert "reply_capacity" in str(res[0].value)
            # the first caller reads at last: the kept reply goes at the worker's next look
            assert set(line.ch.recv_many(100)) == {b"j" * 500}
            _ignore_timeout(w.recv, 0.05)
            assert line.ch.recv_nowait()[16:] == b"r" * 500
            stats = svc.statistics()
            assert (stats["served"], stats["discarded"], w._kept_n) == (1, 1, 0), stats
        w.close()
        svc.unlink()


# -- misuse --------------------------------------------------------------------------


def test_misuse_raises_specific_errors(svc_name):
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.Service("x" * 190)
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.Service(3)  # type: ignore[arg-type]
    with pytest.raises(shmkit.NotFoundError):
        shmkit.Service.open(svc_name)
    with pytest.raises(TypeError, match="Service"):
        shmkit.Client(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reply_capacity"):
        shmkit.Client(svc_name, reply_capacity=8)
    with pytest.raises(TypeError, match="wait_for_worker"):
        shmkit.Client(svc_name, wait_for_worker="soon")  # type: ignore[arg-type]
    svc = shmkit.Service(svc_name)
    with pytest.raises(TypeError, match="bytes-like"):
        svc.call("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"):
        svc.call(b"x", timeout="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        svc.serve(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_requests"):
        svc.serve(bytes, max_requests=-1)
    with pytest.raises(shmkit.MismatchError):
        shmkit.Service(svc_name, capacity=1 << 30)
    with pytest.raises(shmkit.WrongKindError):
        shmkit.Channel.open(svc_name)
    with shmkit.Channel(svc_name + "-ch", capacity=4096) as ch:
        with pytest.raises(shmkit.WrongKindError):
            shmkit.Service.open(svc_name + "-ch")
        ch.unlink()
    ro = shmkit.Service.open(svc_name, readonly=True)
    assert ro.statistics()["workers"] == 0
    with pytest.raises(PermissionError):
        ro.worker()
    with pytest.raises(PermissionError):
        ro.client()
    ro.close()
    w = svc.worker()
    with svc.client() as client:
        t = threading.Thread(target=lambda: pytest.raises(shmkit.RemoteError, client.call,
                                                          b"a", 60))
        t.start()
        req = w.recv(timeout=60)
        with pytest.raises(TypeError, match="bytes-like"):
            req.reply("text")  # type: ignore[arg-type]
        assert not req.answered
        req.fail("refused")
        t.join(60)
    w.close()
    w.close()  # twice is fine
    with pytest.raises(shmkit.ClosedError):
        w.recv(timeout=0)
    client = svc.client()
    client.close()
    with pytest.raises(shmkit.ClosedError):
        client.call(b"x")
    svc.unlink()
    svc.close()
    svc.close()
    with pytest.raises(shmkit.ClosedError):
        svc.call(b"x")
    with pytest.raises(shmkit.ClosedError):
        svc.statistics()


def test_malformed_requests_are_dropped_and_counted(svc_name):
    with shmkit.Service(svc_name) as svc, svc.worker() as w:
        raw = shmkit.Channel.open(svc_name + ".requests")
        raw.send(b"junk")
        import struct
        raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 5, 7)[:-1])  # one byte short
        raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 0, 7) + b"p")  # request id 0
        # a request of format 1, which named its reply channel
        name = f"{svc_name}.reply.{7:016x}".encode()
        raw.send(struct.pack("<BBHIQ", 1, 0, len(name), 1, 5) + name + b"p")
        raw.close()
        with pytest.raises(shmkit.Timeout):
            w.recv(timeout=0.2)
        assert svc.statistics()["malformed"] == 4
        svc.unlink()



def test_a_service_of_the_format_before_is_refused_saying_what_to_do(svc_name):
    """Format 1 had 16-byte worker entries and requests that named their reply
    channel: a service made by it is refused, not misread."""
    import json
    from conftest import set_layout
    with shmkit.Service(svc_name) as svc:
        layout = json.dumps({"format": 1, "requests": svc_name + ".requests"}).encode()
        set_layout(svc_name, layout)
        with pytest.raises(shmkit.FormatVersionError, match=r"format 1; this shmkit reads "
                           r"format 2.*shmkit rm"):
            shmkit.Service(svc_name)
        with pytest.raises(shmkit.FormatVersionError):
            shmkit.Client(svc_name)
        svc.unlink()

# -- kill loops ---------------------------------------------------------------------

_OK, _BAD, _DIED, _TIMEOUT, _UNAVAIL, _OTHER = range(6)


def _kill_worker(name: str) -> None:
    def handle(data: bytes) -> bytes:
        time.sleep(random.uniform(0, 0.004))
        return data + b"|" + str(os.getpid()).encode()

    random.seed()
    with shmkit.Service(name) as svc:
        svc.serve(handle)


def _kill_client(name: str, counts_name: str) -> None:
    counts = shmkit.Segment.open(counts_name)
    m, base = counts._mapping, counts._hsize
    tag = f"{os.getpid()}.{random.getrandbits(32)}"
    with shmkit.Client(name, wait_for_worker=5) as client:
        i = 0
        while True:
            i += 1
            req = f"{tag}.{i}".encode()
            try:
                rep = client.call(req, timeout=20)
                what = _OK if rep.rpartition(b"|")[0] == req else _BAD
            except shmkit.WorkerDied:
                what = _DIED
            except shmkit.Timeout:
                what = _TIMEOUT
            except shmkit.ServiceUnavailable:
                what = _UNAVAIL
            except Exception:
                what = _OTHER
            _core.add64(m, base + 8 * what, 1)


@contextlib.contextmanager
def _forked_rig(svc_name: str, counts_size: int,
                capacity: int) -> Iterator[tuple[Any, Any, list[int], list[int]]]:
    """A service, a segment of outcome counters (``<svc_name>-counts``), and
    two lists for the pids of forked workers and clients, which are all
    killed at the end, the names removed."""
    counts = shmkit.Segment(svc_name + "-counts", size=counts_size)
    svc = shmkit.Service(svc_name, capacity=capacity)
    ws: list[int] = []
    cs: list[int] = []
    try:
        yield svc, counts, ws, cs
    finally:
        for pid in ws + cs:
            _kill(pid)
        svc.unlink()
        svc.close()
        counts.unlink()
        counts.close()


def _counted(counts: Any) -> list[int]:
    return [_core.load64(counts._mapping, counts._hsize + 8 * k) for k in range(6)]


def _kill_run(svc_name: str, cycles: int, seed: int, workers: int = 3,
              clients: int = 3) -> dict[str, int]:
    rnd = random.Random(seed)
    with _forked_rig(svc_name, 64, 64 << 10) as (svc, counts, ws, cs):
        counts_name = counts.name
        ws.extend(_fork(_kill_worker, svc_name) for _ in range(workers))
        cs.extend(_fork(_kill_client, svc_name, counts_name) for _ in range(clients))
        kills = {"workers": 0, "clients": 0}
        for _ in range(cycles):
            time.sleep(rnd.uniform(0.005, 0.03))
            if rnd.random() < 0.5:
                _kill(ws.pop(rnd.randrange(len(ws))))
                ws.append(_fork(_kill_worker, svc_name))
                kills["workers"] += 1
            else:
                _kill(cs.pop(rnd.randrange(len(cs))))
                cs.append(_fork(_kill_client, svc_name, counts_name))
                kills["clients"] += 1
        time.sleep(0.2)
        for pid in cs:
            _kill(pid)
        cs.clear()
        got = _counted(counts)
        assert got[_BAD] == 0, f"a reply reached the wrong call: {got}"
        assert got[_OTHER] == 0, f"an unexpected error: {got}"
        assert got[_OK] > 0, got
        # the service works afterwards, and what dead callers left goes away
        with svc.client(wait_for_worker=30) as client:
            for i in range(20):
                req = f"after.{i}".encode()
                assert client.call(req, timeout=60).rpartition(b"|")[0] == req
        _wait_until(lambda: svc.statistics()["pending"] == 0, what="the queue to drain")
        time.sleep(1.5)  # a sweep by every live worker
        for pid in ws:
            _kill(pid)
        ws.clear()
        with svc.worker():  # a new worker reaps the reply channels nobody holds
            pass
        assert _replies(svc_name) == []
        return {"ok": got[_OK], "died": got[_DIED], "timeout": got[_TIMEOUT],
                "unavailable": got[_UNAVAIL], **kills}


def _stop_client(name: str, counts_name: str, me: int) -> None:
    """Calls in flight 48 at a time through one asyncio client whose reply
    channel holds about 12 replies; each outcome counted, and the rounds
    this client finished (word 8 + me)."""
    import shmkit.aio
    counts = shmkit.Segment.open(counts_name)
    m, base = counts._mapping, counts._hsize
    tag = f"{os.getpid()}.{random.getrandbits(32)}"

    async def run() -> None:
        async with shmkit.aio.Client(name, wait_for_worker=5, reply_capacity=4096) as client:
            i = 0
            while True:
                reqs = [f"{tag}.{i + k}.".encode().ljust(300, b"x") for k in range(48)]
                i += 48
                got = await asyncio.gather(*(client.call(r, timeout=30) for r in reqs),
                                           return_exceptions=True)
                for req, rep in zip(reqs, got):
                    if isinstance(rep, bytes):
                        what = _OK if rep.rpartition(b"|")[0] == req else _BAD
                    elif isinstance(rep, shmkit.Timeout):
                        what = _TIMEOUT
                    else:
                        what = _OTHER
                    _core.add64(m, base + 8 * what, 1)
                _core.add64(m, base + 8 * (8 + me), 1)

    asyncio.run(run())


def _stop_run(svc_name: str, cycles: int, seed: int) -> list[int]:
    """Two workers, two callers with many calls in flight; one caller at a
    time is stopped (SIGSTOP) for 50 to 400 ms, so that its reply channel
    fills, then continued.  Every call must get its own reply."""
    rnd = random.Random(seed)
    with _forked_rig(svc_name, 128, 256 << 10) as (svc, counts, ws, cs):
        ws.extend(_fork(_kill_worker, svc_name) for _ in range(2))
        cs.extend(_fork(_stop_client, svc_name, counts.name, me) for me in range(2))

        def rounds() -> list[int]:
            return [_core.load64(counts._mapping, counts._hsize + 8 * (8 + me))
                    for me in range(2)]

        _wait_until(lambda: _core.load64(counts._mapping, counts._hsize) > 0,
                    what="a first reply")
        for _ in range(cycles):
            pid = rnd.choice(cs)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(rnd.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGCONT)
            time.sleep(rnd.uniform(0.0, 0.1))
        # each caller finishes two more rounds: none waits for a reply that never comes
        after = [n + 2 for n in rounds()]
        _wait_until(lambda: all(n >= a for n, a in zip(rounds(), after)), timeout=20,
                    what="every caller's calls to be answered")
        got = _counted(counts)
        assert got[_BAD] == 0, f"a reply reached the wrong call: {got}"
        assert got[_TIMEOUT] == 0 and got[_OTHER] == 0, f"calls left unanswered: {got}"
        assert got[_OK] > 0, got
        return got


def test_callers_stopped_and_continued_at_random_get_every_reply(svc_name):
    """(Before, each stop dropped the replies past the channel's room after
    50 ms, and their calls timed out.)"""
    got = _stop_run(svc_name, 12, seed=3)
    assert got[_OK] >= 2 * 48


@pytest.mark.stress
def test_stress_callers_stopped_and_continued_at_random(svc_name):
    print(_stop_run(svc_name, 400, seed=4))


def test_kill_clients_and_workers_at_random(svc_name):
    res = _kill_run(svc_name, 30, seed=1)
    assert res["workers"] + res["clients"] == 30


@pytest.mark.stress
def test_stress_kill_clients_and_workers(svc_name):
    res = _kill_run(svc_name, 600, seed=2)
    print(res)
    assert res["died"] > 0


@contextlib.contextmanager
def _interrupt_rig(svc_name: str) -> Iterator[tuple[contextlib.ExitStack, Any, Any]]:
    """A service and a client of it for Ctrl-C-at-every-bytecode runs: the
    collector off (no collector callback, another library's, to take the
    interrupt), and a SIGINT handler of the program's own (an interrupt
    injected into a close that a __del__ runs is given back by tripping
    SIGINT again when the handler is Python's default, which would then
    raise at some later line of the test)."""
    gc.disable()
    was = signal.signal(signal.SIGINT, lambda *a: None)
    try:
        with contextlib.ExitStack() as stack:
            svc = stack.enter_context(shmkit.Service(svc_name))
            client = stack.enter_context(shmkit.Client(svc_name))
            yield stack, svc, client
    finally:
        signal.signal(signal.SIGINT, was)
        gc.enable()


def _outcome(client: shmkit.Client, data: bytes) -> Any:
    try:
        return client.call(data, timeout=20)
    except shmkit.ShmkitError as e:  # (anything but RemoteError fails the test, named)
        return type(e).__name__


def _queued_call(svc: Any, client: Any, data: bytes) -> tuple[threading.Thread, list[Any]]:
    """A call of ``data`` from another thread, once its request is queued;
    its outcome lands in the list."""
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(_outcome(client, data)))
    t.start()
    _wait_until(lambda: svc._requests.depth > 0, what="the request queued")
    return t, got


def _interrupted_at(k: int, files: set[str], fn: Callable[[], Any]) -> tuple[bool, int]:
    """fn() with a KeyboardInterrupt at the k-th bytecode of ``files``:
    (whether it was interrupted, the bytecodes seen)."""
    seen = interrupt_at_bytecode(k, lambda c: c.co_filename in files)
    try:
        fn()
        return False, seen[0]
    except KeyboardInterrupt:
        return True, seen[0]
    finally:
        sys.settrace(None)


def _serve_one(w: Any, timeout: float) -> None:
    """One request answered with its data in capitals (Timeout if none comes)."""
    req = w.recv(timeout)
    req.reply(req.data.upper())


def _call_outcome(t: threading.Thread, got: list[Any], k: int) -> Any:
    t.join(5)
    assert not t.is_alive(), f"Ctrl-C at bytecode {k}: the call still waits"
    return got[0]



def test_a_ctrl_c_at_any_step_of_a_new_workers_start_never_loses_the_news_of_a_dead_one(
        svc_name):
    """The entry of a worker that died holding a request, in the one free
    slot: a worker made there tells the caller, and one interrupted at any
    bytecode of its making leaves the entry as it was, for the next worker
    there to tell (its close cleared it, the caller waited for good)."""
    files = {service_mod.__file__, segment_mod.__file__, shmkit.channel.__file__,
             shmkit._object.__file__}
    with shmkit.Service(svc_name, max_attach=4) as base, _interrupt_rig(svc_name) as (
            _stack, svc, client):
        line = client._line()
        w0 = svc.worker()  # (the 4th slot: base, svc, client, w0)
        entry, dead = w0._entry, w0._token
        w0.close()
        m = svc._seg._mapping

        def notices(rid: int) -> int:
            n = 0
            while True:
                try:
                    got = client._parse_reply(line.ch.recv_nowait())
                except shmkit.Empty:
                    return n
                if got is not None and got[0] == rid:
                    assert isinstance(got[1], shmkit.WorkerDied), got
                    n += 1

        k = 0
        while True:
            k += 1
            rid = 1000 + k
            _core.store64(m, entry, dead)
            _core.store64(m, entry + 16, line.id)
            _core.store64(m, entry + 8, rid)
            made: list[Any] = []
            interrupted, seen = _interrupted_at(k, files, lambda: made.append(svc.worker()))
            if interrupted:
                gc.collect()  # the half-made worker's close, as its __del__ runs it
                if _core.load64(m, entry) == dead:
                    assert _core.load64(m, entry + 8) == rid, f"bytecode {k}"
                made.append(svc.worker())  # the next worker in that slot
            assert made[-1]._entry == entry
            made[-1].close()
            assert notices(rid) >= 1, f"Ctrl-C at bytecode {k}: the caller was never told"
            assert _core.load64(m, entry) == 0
            if not interrupted:
                break
        assert k > 300, k  # (the whole making was walked)
        svc.unlink()


def _plant_dead_entries(svc: Any, rid: int, reply: int) -> list[int]:
    """Every free slot's worker entry as a worker left it that died holding
    request ``rid`` of reply channel ``reply``; the entries' offsets."""
    seg = svc._seg
    m, used = seg._mapping, {slot for slot, _t, _r in svc._entries(seg)}
    held = {e["slot"] for e in seg.attachments()}
    out = []
    for slot in range(seg._max_slots):
        if slot in used or slot in held:
            continue
        entry = seg._hsize + service_mod._OFF_TABLE + slot * service_mod._ENTRY
        _core.store64(m, entry, (0xFFFFF << 10) | slot)  # (a generation long gone)
        _core.store64(m, entry + 16, reply)
        _core.store64(m, entry + 8, rid)
        out.append(entry)
    _core.store32(m, service_mod._OFF_HWM, seg._max_slots)  # (as their claims raised it)
    return out


def test_a_dead_taker_whose_pid_is_no_longer_known_is_named_without_one(svc_name):
    with shmkit.Service(svc_name, max_attach=4) as svc, svc.client() as client:
        _plant_dead_entries(svc, 66, client._line().id)
        err = client._dead_takers((66,))[66]
        assert "None" not in str(err) and str(err).startswith("the worker of service"), err
        svc.unlink()


_SLOW_READER = """
import asyncio, os, signal, sys, time, shmkit, shmkit.aio

async def main(name, n, how):
    async with shmkit.aio.Client(name, reply_capacity=4096) as c:  # (about 12 replies)
        calls = [asyncio.ensure_future(c.call(b"x" * 300)) for _ in range(n)]
        await asyncio.sleep(0.2)  # (every request sent)
        print("sent", flush=True)
        if how == "blocked":
            time.sleep(2)  # the event loop blocked: no reply read meanwhile
        else:
            os.kill(os.getpid(), signal.SIGSTOP)  # until the worker answered them all
        got = await asyncio.gather(*calls, return_exceptions=True)
        print(sum(g == b"X" * 300 for g in got), sum(isinstance(g, shmkit.ReplyLost)
                                                     for g in got), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def _until_stopped(pid: int) -> None:
    """Wait until child ``pid`` has stopped itself (SIGSTOP): until then it
    may still read, and a SIGCONT sent before would be lost."""
    _pid, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


def _serve_a_slow_reader(svc: Any, how: str, n: int = 50) -> tuple[str, Any]:
    """Answer ``n`` calls of a caller that reads no replies meanwhile (its
    event loop blocked, or the process stopped) then reads them; what it
    printed (replies, ReplyLost), and the worker."""
    with svc.worker() as w:
        p = subprocess.Popen([sys.executable, "-c", _SLOW_READER, svc.name, str(n), how],
                             env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline().strip() == "sent"
            if how == "stopped":
                _until_stopped(p.pid)
            served, t0, stopped = 0, time.monotonic(), how == "stopped"
            while p.poll() is None and time.monotonic() - t0 < 60:
                if served == n and stopped:
                    assert w._kept, "no reply was kept"
                    os.kill(p.pid, signal.SIGCONT)
                    stopped = False
                with contextlib.suppress(shmkit.Timeout):
                    req = w.recv(0.1)
                    req.reply(req.data.upper())
                    served += 1
            out, _ = p.communicate(timeout=10)
            assert served == n
            return out.strip(), (w._kept, w._kept_n, w._kept_bytes)
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(30)


@pytest.mark.parametrize("how", ["blocked", "stopped"])
def test_replies_to_a_caller_that_reads_none_for_a_while_reach_it_later(svc_name, how):
    """A caller with 50 calls in flight and room for about 12 replies reads
    none for a while (its event loop blocked 2 s, or the process stopped
    until every request was answered).  The replies that found its channel
    full are kept by the worker and sent as room comes: every call gets its
    reply.  (They were dropped after 50 ms each: 38 calls then waited for
    good, with timeout=None.)"""
    with shmkit.Service(svc_name) as svc:
        out, kept = _serve_a_slow_reader(svc, how)
        assert out == "50 0", out
        assert kept == ({}, 0, 0)
        stats = svc.statistics()
        assert (stats["served"], stats["discarded"]) == (50, 0), stats
        svc.unlink()


def test_replies_past_what_a_worker_keeps_make_their_calls_raise_reply_lost(svc_name,
                                                                            monkeypatch):
    """Past the bytes a worker keeps for callers that read none, a reply is
    dropped and a short notice kept in its place: its call raises ReplyLost
    (the request was carried out) instead of waiting on."""
    monkeypatch.setattr(service_mod, "_KEEP_BYTES", 1500)  # (four replies)
    with shmkit.Service(svc_name) as svc:
        out, kept = _serve_a_slow_reader(svc, "blocked")
        got, lost = map(int, out.split())
        assert got + lost == 50 and lost >= 30, out
        assert kept == ({}, 0, 0)
        stats = svc.statistics()
        assert (stats["served"], stats["discarded"]) == (got, lost), stats
        svc.unlink()


def test_the_news_for_a_caller_in_the_workers_own_process_names_the_callers_attachment(
        svc_name, monkeypatch):
    """The news of a dead worker, kept for a caller whose channel is full,
    needs the caller's token.  In the caller's own process other workers'
    handles of its channel have its pid too; the caller's is the one its
    process claimed first.  (The first in slot order was taken: here another
    worker's, which then looked dead, and the news was dropped.)"""
    import struct
    with shmkit.Service(svc_name, max_attach=4) as svc:
        c = svc.client(reply_capacity=4096)
        while c._line().token & 0x3FF == 0:  # (the caller's slot must not be the first)
            c = svc.client(reply_capacity=4096)
        line = c._line()
        with svc.worker() as w1, shmkit.Channel(svc_name + ".requests", create=False) as raw:
            raw.send(struct.pack("<BB2xIQQ", 2, 0, line.token, 7, line.id) + b"x")
            # the next handle of the caller's channel in this process takes slot 0
            probe = shmkit.Channel(line.ch.name, create=False)
            monkeypatch.setattr(segment_mod, "_claims", segment_mod._claims
                                - (probe._seg._mapping.token & 0x3FF) - 1)
            probe.close()
            _serve_one(w1, 5)  # (w1 holds the caller's channel now, in slot 0)
            assert w1._cache[line.id][0]._seg._mapping.token & 0x3FF == 0
            assert line.ch.recv_nowait()[16:] == b"X"
            _fill(line.ch, b"j" * 500)
            _fill(line.ch, b"j")
            _plant_dead_entries(svc, 55, line.id)
            with svc.worker() as w2:
                assert w2._kept[line.id].token == line.token
                with contextlib.suppress(shmkit.Empty):
                    while True:
                        line.ch.recv_nowait()
                _ignore_timeout(w2.recv, 0.05)
                rid, err = c._parse_reply(line.ch.recv_nowait())
                assert rid == 55 and isinstance(err, shmkit.WorkerDied), err
        c.close()
        svc.unlink()


def _stuck_line(svc_name: str, svc: Any, c: Any, w: Any, kept: int = 1) -> Any:
    """The client's reply line, full, and the reply b"A" to its request 11
    kept for it (``kept`` replies kept more than before, at all)."""
    line = c._line()
    with shmkit.Channel(svc_name + ".requests", create=False) as raw:
        raw.send(struct.pack("<BB2xIQQ", 2, 0, line.token, 11, line.id) + b"a")
    _fill(line.ch, b"j" * 500)
    _fill(line.ch, b"j")
    before = w._kept_n
    _serve_one(w, 5)
    assert w._kept_n == before + kept
    return line


def test_a_reply_for_a_channel_with_replies_kept_sends_them_first_when_there_is_room(
        svc_name, monkeypatch):
    """A reply for a caller with replies kept for it, once its channel has
    room again, sends those and itself at once (it was kept behind them until
    the worker's next recv, a handler's time later)."""
    import struct
    monkeypatch.setattr(service_mod, "_PAY_EVERY", 3600.0)  # (no look in recv meanwhile)
    with shmkit.Service(svc_name) as svc, svc.client(reply_capacity=4096) as c, \
            svc.worker() as w:
        line = _stuck_line(svc_name, svc, c, w)
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            raw.send(struct.pack("<BB2xIQQ", 2, 0, line.token, 12, line.id) + b"b")
        req = w.recv(5)
        assert set(line.ch.recv_many(100)) <= {b"j" * 500, b"j"}  # the caller reads
        assert req.reply(b"B") is True
        got = [c._parse_reply(m) for m in line.ch.recv_many(100, timeout=0)]
        assert got == [(11, b"A"), (12, b"B")] and w._kept_n == 0
        svc.unlink()


def test_a_channel_with_replies_kept_stays_open_however_many_others_come(svc_name,
                                                                         monkeypatch):
    """The worker's cache of reply channels never lets go of one with replies
    kept for it (its next look would have taken the channel for gone, or
    opened it again and again)."""
    monkeypatch.setattr(service_mod, "_MAX_CACHED", 2)
    monkeypatch.setattr(service_mod, "_KEEP_CHANNELS", 1)
    with shmkit.Service(svc_name) as svc, svc.client(reply_capacity=4096) as c, \
            svc.worker() as w:
        line = _stuck_line(svc_name, svc, c, w)
        others = [svc.client() for _ in range(3)]
        for other in others:
            t = threading.Thread(target=lambda: other.call(b"o", timeout=30))
            t.start()
            _serve_one(w, 30)
            t.join(30)
        assert line.id in w._cache and w._kept_n == 1
        assert set(line.ch.recv_many(100)) <= {b"j" * 500, b"j"}  # the caller reads
        _ignore_timeout(w.recv, 0.05)
        assert c._parse_reply(line.ch.recv_nowait()) == (11, b"A")
        for other in others:
            other.close()
        svc.unlink()


def test_a_file_of_another_format_under_a_reply_name_never_stops_a_worker_starting(svc_name):
    """A file under a reply channel's name holding shmkit's magic and another
    format version (a newer shmkit's channel, or a planted file): a new
    worker's sweep of dead callers' channels leaves it; it raised
    FormatVersionError out of Worker(), and no worker could start."""
    with shmkit.Service(svc_name) as svc:
        planted = f"{svc_name}.reply.{0xBAD:016x}"
        shmkit.Segment(planted, 4096).close()
        fd = os.open(f"/dev/shm/shmkit.{planted}", os.O_RDWR)
        os.pwrite(fd, struct.pack("=I", 99), 8)  # (the header's format version)
        os.close(fd)
        try:
            with svc.worker() as w, svc.client() as c:
                t = threading.Thread(target=lambda: c.call(b"x", timeout=30))
                t.start()
                _serve_one(w, 30)
                t.join(30)
            assert svc.statistics()["served"] == 1
        finally:
            os.unlink(f"/dev/shm/shmkit.{planted}")
        svc.unlink()


class _CountedSleeps:
    """A stand-in for a module's ``time`` that counts its sleeps."""

    def __init__(self) -> None:
        self.sleeps = 0

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_reply_channel_whose_attach_slots_are_all_held_is_never_waited_for(svc_name,
                                                                            monkeypatch):
    """A channel under a reply name made with one attach slot, which its
    maker holds: the worker's open gives up at once, each request (it
    slept 50 times 1 ms per request, as an open waits for a closer that
    holds every slot)."""
    import struct
    with shmkit.Service(svc_name) as svc, svc.worker() as w:
        held = shmkit.Channel(f"{svc_name}.reply.{0xF11:016x}", 4096, max_attach=1)
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            for _ in range(5):
                raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 5, 0xF11) + b"x")
        counted = _CountedSleeps()
        monkeypatch.setattr(segment_mod, "time", counted)
        for _ in range(5):
            _serve_one(w, 30)
        assert counted.sleeps == 0 and svc.statistics()["discarded"] == 5
        held.unlink()
        held.close()
        svc.unlink()


def test_a_caller_that_reads_slower_than_replies_come_never_makes_the_worker_wait(svc_name):
    """A caller whose reply channel is full and who reads one message every
    30 ms: forty replies to it are kept and sent as room comes, and the
    worker goes on at once (each waited for the caller's next read, which
    came before the 50 ms it waited at most)."""
    import struct
    with shmkit.Service(svc_name) as svc, svc.client(reply_capacity=4096) as c, \
            svc.worker() as w:
        line = c._line()
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            for rid in range(1, 41):
                raw.send(struct.pack("<BB2xIQQ", 2, 0, line.token, rid, line.id) + b"r")
        _fill(line.ch, b"j" * 17)  # (a reply's size: each read makes room for one)
        stop, got = threading.Event(), []

        def read_slowly() -> None:
            while not stop.wait(0.03):
                with contextlib.suppress(shmkit.Empty):
                    got.append(c._parse_reply(line.ch.recv_nowait()))

        reader = threading.Thread(target=read_slowly)
        reader.start()
        try:
            t0 = time.monotonic()
            for _ in range(40):
                _serve_one(w, 30)
            took = time.monotonic() - t0
            _wait_until(lambda: (_ignore_timeout(w.recv, 0.01), not w._kept)[1],
                        what="every kept reply to go")
        finally:
            stop.set()
            reader.join()
        with contextlib.suppress(shmkit.Empty):
            while True:
                got.append(c._parse_reply(line.ch.recv_nowait()))
        assert [g for g in got if g is not None] == [(rid, b"R") for rid in range(1, 41)]
        assert took < 0.6, took  # (1.2 s and more: each reply waited for a read)
        svc.unlink()


def test_a_reply_past_every_bound_of_the_keep_still_makes_its_call_raise(svc_name,
                                                                         monkeypatch):
    """Past the channels a worker keeps replies for, and past the messages
    it keeps for one channel, a reply is dropped and only its call's id
    kept: the call raises ReplyLost once its caller reads again (it was
    dropped without a word, and the call waited for good)."""
    monkeypatch.setattr(service_mod, "_KEEP_CHANNELS", 1)
    monkeypatch.setattr(service_mod, "_KEEP_CHANNEL_MAX", 1)
    monkeypatch.setattr(service_mod, "_SWEEP_EVERY", 0.0)
    with shmkit.Service(svc_name) as svc, svc.client(reply_capacity=4096) as c1, \
            svc.client(reply_capacity=4096) as c2, svc.worker() as w:
        line1 = _stuck_line(svc_name, svc, c1, w)  # (one reply kept for it: the limit)
        line2 = _stuck_line(svc_name, svc, c2, w, kept=0)  # (no channel left to keep for)
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            for rid in (12, 13, 14):  # (a notice kept in its place, then nothing kept)
                raw.send(struct.pack("<BB2xIQQ", 2, 0, line1.token, rid, line1.id) + b"x")
        for _ in range(3):
            _serve_one(w, 5)
        assert w._kept_n == 2 and w._owed_n == 3
        got: dict[Any, list[Any]] = {1: [], 2: []}
        end = time.monotonic() + 30
        while (len(got[1]) < 4 or len(got[2]) < 1) and time.monotonic() < end:
            for k, (c, line) in {1: (c1, line1), 2: (c2, line2)}.items():
                for msg in line.ch.recv_many(100, timeout=0):
                    if (parsed := c._parse_reply(msg)) is not None:
                        got[k].append(parsed)
            _ignore_timeout(w.recv, 0.01)  # (each look sends what it keeps, and tells)
        by_rid = {rid: r for rid, r in got[1]}
        assert by_rid[11] == b"A" and isinstance(by_rid[12], shmkit.ReplyLost) \
            and isinstance(by_rid[13], shmkit.ReplyLost) \
            and isinstance(by_rid[14], shmkit.ReplyLost), got
        [(rid, err)] = got[2]
        assert rid == 11 and isinstance(err, shmkit.ReplyLost), got
        assert w._owed_n == 0 and not w._owed and not w._kept
        svc.unlink()


def test_replies_kept_for_a_caller_that_dies_are_let_go(svc_name):
    """The replies kept for a caller killed before it read them are dropped
    (counted discarded) at the worker's next look, not kept for ever."""
    with shmkit.Service(svc_name) as svc, svc.worker() as w:
        p = subprocess.Popen([sys.executable, "-c", _SLOW_READER, svc_name, "30", "stopped"],
                             env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline().strip() == "sent"
            _until_stopped(p.pid)
            for _ in range(30):
                _serve_one(w, 10)
            assert w._kept_n > 0
        finally:
            p.kill()
            p.wait(30)
        kept = w._kept_n
        _wait_until(lambda: (_ignore_timeout(w.recv, 0.05), not w._kept)[1],
                    what="the kept replies to go")
        assert (w._kept_n, w._kept_bytes) == (0, 0)
        stats = svc.statistics()
        assert stats["discarded"] == kept and stats["served"] == 30 - kept, stats
        svc.unlink()


def _ignore_timeout(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except shmkit.Timeout:
        return None


def test_news_of_a_dead_worker_that_finds_its_callers_channel_full_reaches_it_later(
        svc_name):
    """The news of a dead worker for a caller whose reply channel is full is
    kept, like a reply, and sent once the caller has read: it raises
    WorkerDied.  A worker that closes first counts it discarded."""
    with shmkit.Service(svc_name, max_attach=4) as svc, svc.client(reply_capacity=4096) as c:
        line = c._line()
        for reads in (True, False):
            _fill(line.ch, b"x" * 512)
            _fill(line.ch, b"x")  # (the space left at the ring's end too)
            _plant_dead_entries(svc, 55, line.id)
            before = svc.statistics()["discarded"]
            with svc.worker() as w:
                assert w._kept_n == 1  # the news, kept
                if reads:
                    with contextlib.suppress(shmkit.Empty):
                        while True:
                            line.ch.recv_nowait()
                    _ignore_timeout(w.recv, 0.05)  # the worker's next look sends it
                    rid, err = c._parse_reply(line.ch.recv_nowait())
                    assert rid == 55 and isinstance(err, shmkit.WorkerDied), err
            assert svc.statistics()["discarded"] == before + (not reads)
            with contextlib.suppress(shmkit.Empty):
                while True:
                    line.ch.recv_nowait()
        svc.unlink()


def test_a_reply_channel_the_worker_may_not_open_is_discarded_never_raised(svc_name):
    """A reply channel id naming a file this user may not open (another
    user's, mode 0600), in a request and in a dead worker's entry: the reply
    and the news are discarded; neither the worker's start nor serve()
    raises (a PermissionError went through both)."""
    import struct
    with shmkit.Service(svc_name, mode=0o666) as svc:
        locked = shmkit.Channel(f"{svc_name}.reply.{0xABC:016x}", 4096, create=True,
                                mode=0o600)
        _plant_dead_entries(svc, 77, 0xABC)
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 5, 0xABC) + b"x")

        def serve() -> None:
            with shmkit.Service(svc_name) as s:
                assert s.serve(lambda d: d, timeout=0.5) == 1

        assert as_user(serve) == 0
        assert svc.statistics()["discarded"] == 2  # the news and the reply
        locked.unlink()
        locked.close()
        svc.unlink()


def test_a_file_held_as_if_being_made_under_a_reply_name_never_stalls_a_worker(svc_name):
    """A zero-filled file under a reply channel's name whose init lock is held,
    as a creator at work holds it, named by a request and by a dead worker's
    entry.  A reply channel is made before any request names it, so the
    worker gives up on it at once; it waited 10 s for each (the open's wait
    for a creator), per request and per new worker."""
    import struct
    with shmkit.Service(svc_name, max_attach=4) as svc, svc.client() as client:
        fake = 0xF00D
        path = f"/dev/shm/shmkit.{svc_name}.reply.{fake:016x}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 1 << 16)
            assert _core.ofd_lock(fd, _core.INIT_LOCK_BYTE, 1)
            _plant_dead_entries(svc, 88, fake)
            t0 = time.monotonic()
            with svc.worker() as w:
                started = time.monotonic() - t0
                with shmkit.Channel(svc_name + ".requests", create=False) as raw:
                    for _ in range(3):
                        raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 5, fake) + b"x")
                got: list[Any] = []
                t = threading.Thread(target=lambda: got.append(client.call(b"ok", timeout=60)))
                t.start()
                t0 = time.monotonic()
                while t.is_alive() and time.monotonic() - t0 < 60:
                    with contextlib.suppress(shmkit.Timeout):
                        req = w.recv(0.5)
                        req.reply(req.data)
                answered = time.monotonic() - t0
                t.join()
            assert got == [b"ok"]
            assert started < 5 and answered < 5, (started, answered)  # 10 s, and 30 s
            assert svc.statistics()["discarded"] == 4  # the news and three replies
        finally:
            os.close(fd)
            os.unlink(path)
        svc.unlink()


def test_a_reply_channel_name_linked_to_another_channel_gets_nothing(svc_name):
    """Hard links under reply channels' names, to the service's own request
    channel (whose echoed reply named the link again: the worker answered
    itself for ever) and to another caller's reply channel, in requests and
    in a dead worker's entry: nothing is written through them."""
    import struct
    with shmkit.Service(svc_name) as svc, svc.client() as other:
        victim = other._line()
        to_requests, to_victim = 0x1111, 0x2222
        for target, rid in ((f"{svc_name}.requests", to_requests),
                            (victim.ch.name, to_victim)):
            os.link(f"/dev/shm/shmkit.{target}", f"/dev/shm/shmkit.{svc_name}.reply.{rid:016x}")
        _plant_dead_entries(svc, 99, to_victim)
        with shmkit.Channel(svc_name + ".requests", create=False) as raw:
            for reply in (to_requests, to_victim):
                # (echoed, the reply's bytes 16..24 would name the link again)
                raw.send(struct.pack("<BB2xIQQ", 2, 0, 1, 5, reply)
                         + struct.pack("<Q", to_requests) * 8)
        n = svc.serve(lambda d: d, timeout=0.5)
        assert n == 2, n  # the two requests, and no reply of its own taken for one
        assert svc._requests.depth == 0
        with pytest.raises(shmkit.Empty):
            victim.ch.recv_nowait()
        assert svc.statistics()["discarded"] == 3  # two replies and the news
        svc.unlink()

@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
@pytest.mark.parametrize("awaited, then", [(False, "serves"), (True, "serves"),
                                           (False, "closes")])
def test_a_ctrl_c_at_any_step_of_a_workers_take_and_reply_never_loses_the_call(svc_name,
                                                                              awaited, then):
    """A Ctrl-C at each bytecode of the worker's code while it takes a
    request and replies, as a signal handler raising there would; the
    worker then goes on serving, or closes and another worker serves.  The
    call gets its reply, or RemoteError when the worker had handed the
    request out and not answered it; it never waits for good.  (A Ctrl-C
    between the take and the record of the request's id lost the request:
    the caller waited as long as any worker lived.  One in the reply's
    delivery marked it answered and sent nothing.)"""
    files = {service_mod.__file__, aio_service_mod.__file__}
    with _interrupt_rig(svc_name) as (stack, svc, client):
        workers: list[Any] = []
        stack.callback(lambda: workers[-1].close())
        workers.append(aio_service_mod.Worker(svc) if awaited else svc.worker())

        def serve_one(timeout: float) -> None:
            w = workers[-1]
            if awaited:
                async def one() -> None:
                    req = await w.recv(timeout)
                    req.reply(req.data.upper())
                asyncio.run(one())
            else:
                _serve_one(w, timeout)

        outcomes: collections.Counter[str] = collections.Counter()
        for k in range(1, 20000):
            data = b"r%d" % k
            t, got = _queued_call(svc, client, data)
            interrupted, seen = _interrupted_at(k, files, lambda: serve_one(5))
            if interrupted:  # serving goes on
                if then == "closes":  # (the next one first: never no worker at all)
                    workers.append(svc.worker())
                    workers[-2].close()
                with contextlib.suppress(shmkit.Timeout):
                    serve_one(0)
            outcome = _call_outcome(t, got, k)
            assert outcome in (data.upper(), "RemoteError"), f"bytecode {k}: {outcome!r}"
            outcomes["reply" if outcome == data.upper() else "failed"] += 1
            if seen < k:  # ran to its end uninterrupted
                break
        else:
            raise AssertionError("the worker's take and reply never ran to their end")
        assert k > 20 and outcomes["reply"] > 10, (k, outcomes)


def test_a_ctrl_c_at_any_step_of_keeping_and_sending_a_reply_never_loses_it(svc_name,
                                                                           monkeypatch):
    """A Ctrl-C at each bytecode of the worker's code while it answers a
    caller whose reply channel is full (so the reply is kept), and then, the
    caller having read, sends what it kept.  The caller gets its reply, or
    RemoteError for a request whose answer the Ctrl-C stopped; never
    nothing."""
    import struct
    monkeypatch.setattr(service_mod, "_PAY_EVERY", 0.0)
    with _interrupt_rig(svc_name) as (stack, svc, _client):
        client = stack.enter_context(svc.client(reply_capacity=4096))
        w = svc.worker()
        stack.callback(w.close)
        line = client._line()
        raw = stack.enter_context(shmkit.Channel(svc_name + ".requests", create=False))
        outcomes: collections.Counter[str] = collections.Counter()

        def replies(rid: int) -> list[Any]:
            """Read the caller's channel to its end: what came for ``rid``."""
            out = []
            while msgs := line.ch.recv_many(1000, timeout=0):
                for msg in msgs:
                    got = client._parse_reply(msg)
                    if got is not None and got[0] == rid:
                        out.append(got[1])
            return out

        for k in range(1, 20000):
            rid = 1000 + k
            raw.send(struct.pack("<BB2xIQQ", 2, 0, line.token, rid, line.id) + b"r%d" % k)
            _fill(line.ch, b"j" * 500)
            _fill(line.ch, b"j")

            def answer_then_send_kept() -> None:
                _serve_one(w, 5)
                got.extend(replies(rid))  # (the caller reads: room for what was kept)
                _ignore_timeout(w.recv, 0.001)

            got: list[Any] = []
            interrupted, seen = _interrupted_at(k, {service_mod.__file__},
                                                answer_then_send_kept)
            end = time.monotonic() + 5
            while not got and time.monotonic() < end:  # serving goes on
                got.extend(replies(rid))
                with contextlib.suppress(shmkit.Timeout):
                    _serve_one(w, 0.001)
            assert got, f"Ctrl-C at bytecode {k}: no reply ever came"
            first = got[0]
            assert first == b"R%d" % k or isinstance(first, shmkit.RemoteError), \
                f"bytecode {k}: {first!r}"
            outcomes["reply" if first == b"R%d" % k else "failed"] += 1
            with contextlib.suppress(shmkit.Timeout):
                _serve_one(w, 0.001)  # (settle a request left in hand)
            replies(0)
            if seen < k:  # ran to its end uninterrupted
                break
        else:
            raise AssertionError("the worker's answer never ran to its end")
        assert k > 20 and outcomes["reply"] > 10, (k, outcomes)
        assert w._kept_n == 0 and not w._kept


@pytest.mark.parametrize("holding", ["taken", "handed out"])
def test_a_ctrl_c_at_any_step_of_a_workers_close_never_loses_the_call(svc_name, holding):
    """A Ctrl-C at each bytecode of a worker's close() while it holds a
    request it took and never handed out (given back to the channel) or one
    it handed out (failed): the close ends whole, the Ctrl-C is raised after
    it, and the call gets its reply from another worker, or RemoteError.
    (The entry was cleared whatever the close had done before the Ctrl-C:
    the request was on record nowhere, and its caller waited for good.)"""
    with _interrupt_rig(svc_name) as (stack, svc, client):
        spare = stack.enter_context(svc.worker())
        for k in range(1, 5000):
            w = svc.worker()
            data = b"c%d" % k
            t, got = _queued_call(svc, client, data)
            if holding == "taken":  # as a Ctrl-C right after the take leaves it
                w._take(svc._requests, w._seg, 5, False)
            else:
                w.recv(timeout=5)
            interrupted, seen = _interrupted_at(k, {service_mod.__file__}, w.close)
            assert w.closed, f"Ctrl-C at bytecode {k}: the close was left half done"
            with contextlib.suppress(shmkit.Timeout):
                _serve_one(spare, 0)
            want = data.upper() if holding == "taken" else "RemoteError"
            outcome = _call_outcome(t, got, k)
            assert outcome == want, f"bytecode {k}: {outcome!r}"
            if seen < k:
                assert not interrupted
                break
        else:
            raise AssertionError("the close never ran to its end")
        assert k > 10


def test_a_ctrl_c_at_any_step_of_serve_leaves_no_worker_holding_a_request(svc_name):
    """serve() for one request under a Ctrl-C at each bytecode of the
    service's and the handles' code (the collector off, as between two of
    its runs): no worker is left holding the request, and the call gets its
    reply or RemoteError.  (One landing in the with-block's __exit__, before
    its close(), left the worker open with the request on record until the
    collector found it, and the caller waiting meanwhile.)"""
    files = {service_mod.__file__, segment_mod.__file__}
    with _interrupt_rig(svc_name) as (stack, svc, client):
        spare = stack.enter_context(svc.worker())
        for k in range(1, 20000):
            data = b"s%d" % k
            t, got = _queued_call(svc, client, data)
            _, seen = _interrupted_at(
                k, files, lambda: svc.serve(lambda d: d.upper(), timeout=5, max_requests=1))
            with contextlib.suppress(shmkit.Timeout):
                _serve_one(spare, 0)
            outcome = _call_outcome(t, got, k)
            assert outcome in (data.upper(), "RemoteError"), f"bytecode {k}: {outcome!r}"
            assert [w for w in svc.workers() if w["alive"]] == [
                {"pid": os.getpid(), "alive": True, "busy": False}], f"bytecode {k}"
            if seen < k:
                break
        else:
            raise AssertionError("serve() never ran to its end")
        assert k > 20


def test_a_request_given_back_by_another_threads_close_is_never_handed_out_too(svc_name):
    """A worker closed by another thread between its take of a request and
    handing it out: the close gives the request back, and the take's thread
    gets ClosedError instead of the request (it ran twice: there and in the
    worker that took it back)."""
    with shmkit.Service(svc_name) as svc, shmkit.Client(svc_name) as client, \
            svc.worker() as spare:
        w = svc.worker()
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(_outcome(client, b"once")))
        t.start()
        _wait_until(lambda: svc._requests.depth > 0, what="the request queued")
        msg = w._take(svc._requests, w._seg, 5, False)
        w.close()  # as another thread would, between the take and the hand-out
        with pytest.raises(shmkit.ClosedError):
            w._took(w._seg, msg)
        req = spare.recv(timeout=5)
        assert req.data == b"once"
        req.reply(b"ONCE")
        t.join(10)
        assert got == [b"ONCE"]
        with pytest.raises(shmkit.Timeout):
            spare.recv(timeout=0.1)


def test_a_calls_timeout_names_the_stopped_worker_that_took_it(svc_name):
    """The Timeout of a call whose worker stopped (SIGSTOP) with it names that
    worker and its state, and one nobody took says it is still queued."""
    with shmkit.Client(svc_name) as client:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "import os, signal, shmkit\n"
             f"with shmkit.Service({svc_name!r}) as svc, svc.worker() as w:\n"
             "    req = w.recv(timeout=30)\n"
             "    os.kill(os.getpid(), signal.SIGSTOP)\n"
             "    req.reply(req.data.upper())\n"],
            env=dict(os.environ, PYTHONPATH=SRC))
        try:
            _wait_until(lambda: client._has_workers(), what="the worker")
            with pytest.raises(shmkit.Timeout,
                               match=f"taken by the worker pid {proc.pid}, which is stopped"):
                client.call(b"a", timeout=1.0)
            with pytest.raises(shmkit.Timeout, match="still queued"):
                client.call(b"b", timeout=0.3)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(30) == 0


def test_ctrl_c_interrupts_a_waiting_call(svc_name):
    import subprocess
    import sys

    from conftest import SRC

    code = f"""
import shmkit
svc = shmkit.Service({svc_name!r})
w = svc.worker()            # attached, never answers
try:
    svc.call(b"x", timeout=120)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         text=True)
    try:
        _wait_until(lambda: os.path.exists(f"/dev/shm/shmkit.{svc_name}.requests")
                    and shmkit.Service.open(svc_name, readonly=True).statistics()["pending"]
                    == 1, what="the call to wait")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "interrupted" in out


def test_fork_gives_child_its_own_reply_channel_and_refuses_worker(svc_name):
    with shmkit.Service(svc_name) as svc, svc.worker() as w, svc.client() as client:
        parent_line = client._line()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                try:
                    w.recv(timeout=0)
                    code = 3
                except shmkit.ClosedError:
                    pass
                w.close()
                if client._line() is parent_line:
                    code = 4
                client.close()
            except BaseException:
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert svc.statistics()["workers"] == 1  # the parent's worker entry is intact
        assert os.path.exists(f"/dev/shm/shmkit.{parent_line.ch.name}")
        t = threading.Thread(target=lambda: client.call(b"p", timeout=60))
        t.start()
        w.recv(timeout=60).reply(b"ok")
        t.join(60)
        svc.unlink()


# ---- what a hostile or careless neighbour can send a worker -----------------


def _create_and_die_half_way(name: str) -> None:
    """Create a channel and be killed between linking its file into place and
    publishing it (inside the ring's initialisation)."""
    def die(*_args: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
    _core.Ring._init_ring = die
    shmkit.Channel(name, capacity=4096, lifetime="attached")


def test_a_worker_reaps_reply_channels_their_creators_left_half_made(svc_name):
    """A client killed while creating its reply channel leaves the file at its
    name but unpublished, or a hidden temporary file; a worker removes both,
    and leaves a temporary file whose creator is alive."""
    svc = shmkit.Service(svc_name)
    half = f"{svc_name}.reply.{secrets.token_hex(8)}"
    pid = _fork(_create_and_die_half_way, half)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and _replies(svc_name) == [f"shmkit.{half}"]
    dead_pid = _fork(lambda: None)
    os.waitpid(dead_pid, 0)
    tmp_dead = (f"/dev/shm/.shmkit.{svc_name}.reply.{secrets.token_hex(8)}."
                f"{dead_pid}.{secrets.token_hex(4)}.tmp")
    tmp_live = (f"/dev/shm/.shmkit.{svc_name}.reply.{secrets.token_hex(8)}."
                f"{os.getpid()}.{secrets.token_hex(4)}.tmp")
    for path in (tmp_dead, tmp_live):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    try:
        with svc.worker():
            pass
        assert _replies(svc_name) == []
        assert not os.path.exists(tmp_dead) and os.path.exists(tmp_live)
    finally:
        for path in (tmp_dead, tmp_live):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        svc.close()
        svc.unlink()


def test_a_forged_reply_name_never_stops_the_worker(svc_name):
    """A request whose reply channel id names `<service>.reply.<16 hex>` where
    something else than a live reply channel stands (here an Event) is
    discarded; the worker goes on."""
    import struct
    with shmkit.Service(svc_name) as svc:
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(n=svc.serve(lambda d: d, timeout=5)))
        t.start()
        bogus = svc_name + ".reply." + "a" * 16
        decoy = shmkit.Event(bogus)
        with shmkit.Channel(svc_name + ".requests", create=False) as hostile:
            hostile.send(struct.pack("<BB2xIQQ", 2, 0, 0, 1, int("a" * 16, 16)) + b"x", 1)
        with shmkit.Client(svc, wait_for_worker=10) as c:
            assert c.call(b"legit", timeout=10) == b"legit"  # the same worker answers
        t.join(30)
        assert "n" in out, "serve() raised"
        assert svc.statistics()["discarded"] >= 1
        decoy.unlink()
        decoy.close()
        svc.unlink()


def test_a_handler_result_that_is_no_reply_fails_that_call_only(svc_name):
    with shmkit.Service(svc_name) as svc:
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(
            n=svc.serve(lambda d: None if d == b"none" else d, timeout=5)))
        t.start()
        with shmkit.Client(svc, wait_for_worker=10) as c:
            with pytest.raises(shmkit.RemoteError, match="bytes-like"):
                c.call(b"none", timeout=10)
            assert c.call(b"next", timeout=10) == b"next"
        t.join(30)
        assert out.get("n") == 2
        svc.unlink()


def test_a_reply_that_is_not_contiguous_is_refused_before_it_counts(svc_name):
    import numpy as np
    with shmkit.Service(svc_name) as svc:
        def work():
            with svc.worker() as w:
                req = w.recv(timeout=10)
                with pytest.raises(TypeError, match="contiguous"):
                    req.reply(np.arange(10)[::2])
                assert not req.answered
                req.reply(b"fine")
        t = threading.Thread(target=work)
        t.start()
        with shmkit.Client(svc, wait_for_worker=10) as c:
            with pytest.raises(TypeError, match="contiguous"):
                c.call(np.arange(10)[::2], timeout=1)
            assert c.call(b"q", timeout=10) == b"fine"
        t.join(30)
        svc.unlink()


@pytest.mark.parametrize("bad", [{"capacity": 0}, {"lifetime": "bogus"}])
def test_a_service_that_fails_to_create_leaves_no_file(svc_name, bad):
    with pytest.raises(ValueError):
        shmkit.Service(svc_name, **bad)
    assert _files(svc_name) == []
