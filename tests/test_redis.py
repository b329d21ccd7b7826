"""The Redis backend (shmkit.connect("redis://...")) and `shmkit bridge`, against a
real redis-server that a fixture starts on a unix socket in a temporary directory.

Every cross-process test runs real programs (subprocess, spawn): two writers of
one Store, a consumer SIGKILLed before it acknowledged, a Mutex holder
SIGSTOPped past its lease, an Event set by another process, bridges killed
mid-stream, and the server itself stopped and restarted.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Iterator

import numpy as np
import pytest

import shmkit
from conftest import SRC, child_told_it_forked, fork_during_update, run_python, spawn

REDIS_SERVER = shutil.which("redis-server")
redis = pytest.importorskip("redis", reason="redis-py is in the test extra: "
                                            "pip install -e '.[test]'")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (`make test` installs it with apt-get)")


class Server:
    """A redis-server on a unix socket in its own directory; stop() and start() again."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shmkit-test-redis-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=self.sock)
        end = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is free too."""
    import socket
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class Cluster:
    """Three redis-server nodes on loopback ports made into one Redis Cluster."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shmkit-test-cluster-")
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        while len(self.ports) < 3:
            port = _free_port()
            if port not in self.ports:
                self.ports.append(port)
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes",
                 "--cluster-config-file", os.path.join(self.dir, f"nodes-{port}.conf"),
                 "--save", "", "--appendonly", "no", "--dir", self.dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nodes = [redis.Redis(port=p) for p in self.ports]
        end = time.monotonic() + 30
        for node in nodes:
            while True:
                try:
                    node.ping()
                    break
                except redis.exceptions.RedisError:
                    if time.monotonic() > end:
                        raise RuntimeError("a cluster node did not start")
                    time.sleep(0.02)
        subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        while not all(n.cluster("info")["cluster_state"] == "ok" for n in nodes):
            if time.monotonic() > end + 30:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.05)
        for node in nodes:
            node.close()
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    def remove(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli (Debian's redis-tools, installed with redis-server) is missing")
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    s.start()
    yield s
    s.remove()


@pytest.fixture
def prefix() -> str:
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def ns(server: Server, prefix: str) -> Iterator[Any]:
    n = shmkit.connect(server.url, prefix=prefix)
    yield n
    for key in n.r.scan_iter(f"{prefix}:*"):
        n.r.delete(key)
    n.close()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _program(code: str, *args: str) -> subprocess.Popen:
    """A separate python program, its stdout a pipe of lines."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next stdout line of ``proc`` (AssertionError with its stderr if none comes)."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        proc.kill()
        raise AssertionError(f"no line from the child; stderr:\n{proc.stderr.read()}")
    return out[0].strip()


# -- one test body, both backends ----------------------------------------------


@pytest.fixture(params=["local", "redis", "cluster"])
def any_ns(request: pytest.FixtureRequest, server: Server, prefix: str) -> Iterator[Any]:
    if request.param == "local":
        n = shmkit.connect("local", prefix=prefix)
    elif request.param == "redis":
        n = shmkit.connect(server.url, prefix=prefix)
    else:
        n = shmkit.connect(request.getfixturevalue("cluster").url, prefix=prefix)
        assert n.cluster
    yield n
    n.close()


def test_same_code_runs_on_either_backend(any_ns: Any) -> None:
    ns = any_ns
    st = ns.Store("s")
    try:
        st["a"] = 1
        st[7] = b"seven"
        st[b"raw"] = np.arange(6, dtype=np.int16).reshape(2, 3)
        st["f"] = 2.5
        st["n"] = None
        st["big"] = -(1 << 100)
        assert st["a"] == 1 and type(st["a"]) is int
        assert st[7] == b"seven" and st.get("missing", 0) == 0
        arr = st[b"raw"]
        assert arr.dtype == np.int16 and arr.shape == (2, 3) and arr[1, 2] == 5
        assert st["n"] is None and st["big"] == -(1 << 100)
        assert "a" in st and "b" not in st and len(st) == 6
        st.add("b", 2)
        with pytest.raises(shmkit.KeyExistsError):
            st.add("b", 3)
        with pytest.raises(KeyError):
            del st["nope"]
        with pytest.raises(shmkit.UnsupportedTypeError):
            st["x"] = [1, 2]
        with pytest.raises(shmkit.UnsupportedTypeError):
            st[True] = 1
        assert st.nbytes(7) == 5
        with st.batch():
            st["c"] = 3
            del st["a"]
        assert "a" not in st and st["c"] == 3
        with pytest.raises(RuntimeError):
            with st.batch():
                st["d"] = 4
                raise RuntimeError("discard")
        assert "d" not in st
        with pytest.raises(shmkit.UnsupportedTypeError):  # every pair or none
            st.update({"d": 4, "e": [5]})
        assert "d" not in st
        st.update([("d", 4)], e=5)
        assert st["d"] == 4 and st["e"] == 5
        del st["d"], st["e"]

        class OwnKeys(dict):  # type: ignore[type-arg]
            def keys(self) -> Any:  # dict.update reads a dict's own pairs
                return ["d"]
        st.update(OwnKeys(d=4, e=5))
        assert st["d"] == 4 and st["e"] == 5
        del st["d"], st["e"]
        assert sorted(k for k in st if isinstance(k, str)) == ["b", "big", "c", "f", "n"]
        assert dict(st.items())["c"] == 3
        assert st.get_many(["b", "c", "zz"], None) == [2, 3, None]
        assert st.pop("c") == 3 and "c" not in st
        assert st.statistics()["codec"] == "none"
    finally:
        st.unlink()
        st.close()

    ch = ns.Channel("c")
    try:
        ch.send(b"one")
        assert ch.send_many([b"two", memoryview(b"three")]) == 2
        assert ch.recv(timeout=5) == b"one"
        assert ch.recv_many(max_n=10, timeout=5) == [b"two", b"three"]
        with pytest.raises(shmkit.Timeout):
            ch.recv(timeout=0.05)
        with pytest.raises(shmkit.Empty):
            ch.recv_nowait()
        assert ch.recv_many(max_n=10, timeout=0.05) == []
        ch.send(b"last")
        with pytest.raises(ValueError, match="NaN"):  # the same signature and checks
            ch.close_sending(timeout=float("nan"))
        ch.close_sending(timeout=5.0)
        with pytest.raises(shmkit.ChannelClosed):
            ch.send(b"late")
        assert list(ch) == [b"last"]
    finally:
        ch.unlink()
        ch.close()

    q = ns.Queue("q", maxsize=2)
    try:
        q.put({"job": 1})
        q.put_nowait([2])
        assert q.full()
        with pytest.raises(shmkit.Full):
            q.put(3, timeout=0.05)
        assert q.get(timeout=5) == {"job": 1}
        assert q.get(timeout=5) == [2]
        with pytest.raises(shmkit.Empty):
            q.get(timeout=0.05)
        assert q.qsize() == 0 and q.empty() and q.maxsize == 2
    finally:
        q.unlink()
        q.close()

    m = ns.Mutex("m")
    try:
        assert m.acquire(timeout=5)
        assert m.locked()
        assert not m.acquire(blocking=False)
        m.release()
        with m:
            assert m.locked()
        assert not m.locked()
        with m.held(timeout=5):
            pass
    finally:
        m.unlink()
        m.close()

    e = ns.Event("e")
    try:
        assert not e.is_set() and e.wait(timeout=0.05) is False
        e.set()
        assert e.is_set() and e.wait(timeout=5) is True
        e.clear()
        assert not e.is_set()
    finally:
        e.unlink()
        e.close()


def test_a_closed_queue_raises_closed_error_on_either_backend(any_ns: Any) -> None:
    # The Redis Queue raised a plain ValueError where the local one raises
    # ClosedError (itself a ValueError, as multiprocessing's).
    q, keep = any_ns.Queue("closed-q"), any_ns.Queue("closed-q")
    try:
        q.put(1)
        q.close()
        for call in (lambda: q.put(2), q.get, q.get_nowait, q.qsize):
            with pytest.raises(shmkit.ClosedError, match="is closed"):
                call()
        assert keep.get(timeout=5) == 1  # the other handle goes on
    finally:
        keep.unlink()
        keep.close()


def test_timeouts_follow_one_rule_on_either_backend(any_ns: Any) -> None:
    """A timeout given to a call that does not block is refused, not ignored;
    a bool (numpy's too) is refused as a timeout; a negative one does not
    wait; -1 is a lock's "no timeout"; what converts to a float is taken."""
    ns = any_ns
    q, m, e, empty = ns.Queue("q"), ns.Mutex("m"), ns.Event("e"), ns.Queue("empty")
    try:
        q.put("kept")
        for t in (5, 0, 0.5, True, "x"):
            for call in (lambda: q.get(False, t), lambda: q.put(1, False, t),
                         lambda: m.acquire(False, t)):
                with pytest.raises(ValueError, match="takes no timeout; pass block"):
                    call()
        assert q.qsize() == 1 and not m.locked()
        for bad in (True, np.True_):
            for call in (lambda: q.get(True, bad), lambda: m.acquire(True, bad),
                         lambda: e.wait(bad)):
                with pytest.raises(TypeError, match="not (numpy\\.)?bool"):
                    call()
        assert q.qsize() == 1 and not m.locked()
        assert m.acquire(False, -1) and not m.acquire(False, None)
        m.release()
        assert m.acquire(True, -1)  # free: taken at once, "no timeout"
        t0 = time.monotonic()
        assert not m.acquire(True, -0.5) and e.wait(-3) is False
        with pytest.raises(shmkit.Empty):
            empty.get(True, -2)
        assert time.monotonic() - t0 < 5
        m.release()
        assert q.get(True, Decimal("0.5")) == "kept"
        assert m.acquire(True, Fraction(1, 2)) and e.wait(np.float32(0.01)) is False
        m.release()
    finally:
        for o in (q, m, e, empty):
            o.unlink()
            o.close()


def _refused_for_a_surrogate(call: Callable[[], Any], error: type) -> str:
    """call raises error, a ValueError whose cause is the codec's
    UnicodeEncodeError; its message."""
    with pytest.raises(error) as ei:
        call()
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value.__cause__, UnicodeEncodeError)
    return str(ei.value)


def test_a_str_key_utf8_cannot_encode_is_refused_alike_on_either_backend(
        any_ns: Any) -> None:
    """A str key with a lone surrogate raises the same InvalidKeyError (a
    ValueError, caused by the codec's UnicodeEncodeError, which each backend
    raised bare) with the same message, from each call that takes a key;
    nothing is stored."""
    st = any_ns.Store("surrogate")
    try:
        st["keep"] = 1
        texts = set()
        for call in (lambda: st.__setitem__("a\udc80", 1), lambda: st["a\udc80"],
                     lambda: "a\udc80" in st, lambda: st.get_many(["keep", "a\udc80"], None),
                     lambda: st.add("a\udc80", 1), lambda: st.pop("a\udc80", None),
                     lambda: st.update({"b": 1, "a\udc80": 2})):
            texts.add(_refused_for_a_surrogate(call, shmkit.InvalidKeyError))
        assert texts == {
            "store key 'a\\udc80' cannot be stored: its character '\\udc80' at position 1 is "
            "a lone surrogate, which UTF-8 cannot encode; pass the key as bytes "
            "(os.fsencode(key) undoes os.fsdecode; key.encode('utf-8', 'surrogatepass') "
            "takes any), or use another key"}
        with st.batch():
            with pytest.raises(shmkit.InvalidKeyError):
                st["a\udc80"] = 1
            st["in-batch"] = 2
        assert dict(st.items()) == {"keep": 1, "in-batch": 2}
        st[os.fsencode("a\udcff")] = 3  # the key as os.fsencode gives it
        assert st[b"a\xff"] == 3
    finally:
        st.unlink()
        st.close()


def test_a_str_value_utf8_cannot_encode_is_pickled_or_refused_alike_on_either_backend(
        any_ns: Any) -> None:
    """A str value with a lone surrogate raised the codec's bare
    UnicodeEncodeError.  A store with codec="pickle" now pickles it (it comes
    back equal); any other raises InvalidValueError (a ValueError, the
    codec's error its cause) with the same message on each backend, from
    each call that stores a value, and stores nothing."""
    plain, pickled = any_ns.Store("surrogate-plain"), any_ns.Store("surrogate-pickled",
                                                                   codec="pickle")
    try:
        plain["keep"] = "kept"
        texts = set()
        for call in (lambda: plain.__setitem__("k", "a\udc80"), lambda: plain.add("k", "a\udc80"),
                     lambda: plain.update({"k2": 1, "k": "a\udc80"}),
                     lambda: plain.setdefault("k", "a\udc80")):
            texts.add(_refused_for_a_surrogate(call, shmkit.InvalidValueError))
        assert texts == {
            "str value 'a\\udc80' cannot be stored: its character '\\udc80' at position 1 is "
            "a lone surrogate, which UTF-8 cannot encode; store it as bytes (os.fsencode(value) "
            "undoes os.fsdecode; value.encode('utf-8', 'surrogatepass') takes any), or create "
            "the store with codec='pickle', which pickles such a str"}
        with plain.batch():
            with pytest.raises(shmkit.InvalidValueError):
                plain["k"] = "a\udc80"
            plain["in-batch"] = "x"
        assert dict(plain.items()) == {"keep": "kept", "in-batch": "x"}
        pickled["k"] = "a\udc80b"
        pickled.update({"u": "\ud800"})
        assert pickled["k"] == "a\udc80b" and pickled.get_many(["u"]) == ["\ud800"]
        pickled["k"] = "plain text"  # an encodable str is stored as text, as before
        assert pickled["k"] == "plain text"
    finally:
        for st in (plain, pickled):
            st.unlink()
            st.close()


def test_a_buffer_of_python_objects_is_refused_by_every_copy_into_on_either_backend(
        any_ns: Any) -> None:
    """recv_into and get_into copy raw bytes: into a numpy array of objects
    (or with an object field) they would overwrite its references, and the
    process crashed when the array was next read or freed.  Each refuses it
    before taking anything: the message stays next, the value stays stored,
    and the array keeps its objects.  numpy gives no buffer format for a
    datetime64: its dtype says whether it holds objects, so a datetime
    array is written into and one with an object field beside is not."""
    ch, st = any_ns.Channel("objects-ch"), any_ns.Store("objects-st")
    try:
        ch.send(b"\x01" * 24)
        st["v"] = b"\x01" * 24
        plain = np.zeros(3, dtype=[("Obj", "i8")])  # a field name holding the letter O
        for target in (np.array([object(), "s", 3], dtype=object),
                       np.zeros(2, dtype=[("n", "i8"), ("o", "O")]),
                       np.zeros(2, dtype=[("t", "M8[s]"), ("o", "O")])):
            before = target.copy()
            for call in (lambda: ch.recv_into(target, timeout=1),
                         lambda: st.get_into("v", target)):
                with pytest.raises(TypeError, match="of Python objects") as ei:
                    call()
                assert "bytes or numbers" in str(ei.value)
            assert all(a is b or a == b for a, b in zip(before.tolist(), target.tolist()))
        assert st.get_into("v", plain) == 24
        assert ch.recv_into(plain, timeout=1) == 24 and plain.tobytes() == b"\x01" * 24
        times = np.zeros(3, "M8[s]")
        ch.send(b"\x01" * 24)
        assert st.get_into("v", times) == 24 and ch.recv_into(times, timeout=1) == 24
    finally:
        for obj in (ch, st):
            obj.unlink()
            obj.close()


def test_a_topic_runs_on_either_backend(any_ns: Any) -> None:
    topic = any_ns.Topic("ticks", history=2, overflow="overwrite")
    try:
        for m in (b"a", b"b", b"c"):
            topic.publish(m)
        late = topic.subscribe()             # the last two, then what follows
        fresh = topic.subscribe(history=0, timeout=5.0)   # only what follows
        with pytest.raises(ValueError, match="NaN"):  # the same signature and checks
            topic.subscribe(timeout=float("nan"))
        with pytest.raises(shmkit.SizeLimitError):
            topic.subscribe(history=3)
        topic.publish(b"d")
        topic.publish_array(np.arange(3, dtype=np.uint8))
        assert [late.recv(timeout=5) for _ in range(4)] == [b"b", b"c", b"d", b"\0\1\2"]
        assert fresh.recv(timeout=5) == b"d"
        assert fresh.recv_nowait() == b"\0\1\2"
        with pytest.raises(shmkit.Empty):
            fresh.recv_nowait()
        with pytest.raises(shmkit.Timeout):
            fresh.recv(timeout=0.05)
        assert late.received == 4 and late.missed == 0 and late.lag == 0
        assert topic.published == 5 and topic.history == 2
        late.close()
        with pytest.raises(shmkit.ClosedError):
            late.recv(timeout=0)
        fresh.close()
    finally:
        topic.close()
        topic.unlink()


def test_topic_fans_out_to_subscriber_processes_in_each_publishers_order(
        server: Server, prefix: str) -> None:
    subscriber = """
        import sys, shmkit
        topic = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Topic("fan")
        sub = topic.subscribe()
        print("subscribed", flush=True)
        seen = {}
        for _ in range(1000):
            who, n = sub.recv(timeout=60).split(b":")
            seen.setdefault(who, []).append(int(n))
        ok = all(v == list(range(500)) for v in seen.values()) and len(seen) == 2
        print("ok" if ok else f"bad {seen}", flush=True)
    """
    publisher = """
        import sys, shmkit
        topic = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Topic("fan")
        for i in range(500):
            topic.publish(sys.argv[3].encode() + b":%d" % i)
    """
    shmkit.connect(server.url, prefix=prefix).Topic("fan", maxlen=5000).close()
    subs = [_program(subscriber, server.url, prefix) for _ in range(3)]
    for p in subs:
        assert _line(p) == "subscribed"
    pubs = [_program(publisher, server.url, prefix, who) for who in ("p1", "p2")]
    for p in pubs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    for p in subs:
        assert _line(p, 120) == "ok"
        assert p.wait(timeout=30) == 0


def test_a_lagging_redis_subscriber_is_told_how_many_it_missed(ns: Any) -> None:
    topic = ns.Topic("lag", maxlen=10)
    sub = topic.subscribe()
    topic.publish_many(b"%d" % i for i in range(25))
    assert sub.lag == 25
    with pytest.raises(shmkit.MessagesLost) as e:
        sub.recv(timeout=5)
    assert e.value.missed == 15 and "larger maxlen" in str(e.value)
    assert sub.recv_many(100, timeout=5) == [b"%d" % i for i in range(15, 25)]
    assert sub.missed == 15 and sub.received == 10 and sub.lag == 0
    # a topic removed and made again: the subscriber starts over with it
    topic.unlink()
    topic2 = ns.Topic("lag", maxlen=10)
    topic2.publish(b"new")
    assert sub.recv(timeout=5) == b"new"


def test_topic_parameters_are_honoured_or_refused(ns: Any) -> None:
    with pytest.raises(shmkit.UnsupportedParameterError, match="overflow='block'"):
        ns.Topic("t", overflow="block")
    with pytest.raises(shmkit.UnsupportedParameterError, match="capacity"):
        ns.Topic("t", capacity=1 << 20)
    with pytest.raises(ValueError, match="maxlen=2 keeps fewer"):
        ns.Topic("t", history=5, maxlen=2)
    with pytest.raises(ValueError, match="history must be an int"):
        ns.Topic("t", history=-1)
    t = ns.Topic("t", history=3, maxlen=100)
    with pytest.raises(shmkit.MismatchError, match="history"):
        ns.Topic("t", history=4)
    with pytest.raises(shmkit.MismatchError, match="maxlen"):
        ns.Topic("t", maxlen=50)
    assert ns.Topic("t").maxlen == 100
    with pytest.raises(shmkit.WrongKindError):
        ns.Channel("t")
    ro = ns.Topic("t", readonly=True)
    with pytest.raises(shmkit.ReadOnlyError):
        ro.publish(b"x")
    assert ro.statistics() == {"published": 0, "kept": 0, "history": 3, "maxlen": 100,
                               "overflow": "overwrite"}
    t.close()
    with pytest.raises(shmkit.ClosedError):
        t.publish(b"x")


def test_a_waiting_redis_subscriber_lets_ctrl_c_through(server: Server, prefix: str) -> None:
    code = """
        import sys, shmkit
        sub = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Topic("idle").subscribe()
        print("waiting", flush=True)
        try:
            sub.recv()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """
    child = _program(code, server.url, prefix)
    assert _line(child) == "waiting"
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    assert _line(child) == "interrupted"
    assert child.wait(timeout=30) == 0


def test_on_a_cluster_each_objects_keys_share_one_slot_and_processes_meet(
        cluster: Cluster, prefix: str) -> None:
    ns = shmkit.connect(cluster.url, prefix=prefix)
    objs = [ns.Store("s"), ns.Channel("c"), ns.Mutex("m"), ns.Event("e", auto_reset=True),
            ns.Topic("t")]
    objs[0]["k"] = 1
    objs[1].send(b"x")
    with objs[2]:
        pass
    objs[3].set()
    objs[4].publish(b"y")
    for name in "scmet":
        keys = list(ns.r.scan_iter(f"{prefix}:{{{name}}}*"))
        assert len(keys) >= 2, (name, keys)  # its data and its meta, at least
        assert len({ns.r.keyslot(k) for k in keys}) == 1, (name, keys)
    code = """
        import sys, shmkit
        ns = shmkit.connect(sys.argv[1], prefix=sys.argv[2])
        ch, m, e = ns.Channel("c"), ns.Mutex("m"), ns.Event("e", auto_reset=True)
        assert e.wait(timeout=30)                # the token set before it started
        with m:
            print(ch.recv(timeout=30).decode(), m.fencing_token, flush=True)
    """
    child = _program(code, cluster.url, prefix)
    assert child.wait(timeout=120) == 0, child.stderr.read()
    got, fence = child.stdout.read().split()
    assert got == "x" and int(fence) == objs[2].fencing_token + 1
    for o in objs:
        o.unlink()
        o.close()
    ns.close()


def test_objects_made_with_the_older_key_layout_are_refused(ns: Any) -> None:
    ns.r.hset(f"{ns.prefix}:old:meta", mapping={"kind": "store", "format": "1"})
    for create in (None, True, False):  # created and removed again, or not found
        with pytest.raises(shmkit.FormatVersionError, match="older shmkit .format 1"):
            ns.Store("old", create=create)
        assert not ns.r.exists(f"{ns.prefix}:{{old}}:meta")  # nothing left beside it


def test_values_have_the_local_encoding(ns: Any, name: str) -> None:
    """The Redis hash value of each value is as long as the local store's record value."""
    values = [b"", b"xyz", "é", 0, -1, 1 << 63, -(1 << 200), 1.5, True, False, None,
              np.zeros((3, 0)), np.arange(10, dtype=">f8"),
              np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])]
    local = shmkit.Store(name)
    st = ns.Store("enc")
    try:
        for i, v in enumerate(values):
            local[i] = v
            st[i] = v
            assert st.nbytes(i) == local.nbytes(i), v
            got = st[i]
            if isinstance(v, np.ndarray):
                assert got.dtype == v.dtype and got.shape == v.shape
                assert np.array_equal(got, v) and got.flags.writeable
            else:
                assert got == v and type(got) is type(v)
    finally:
        local.close()
        local.unlink()


def test_store_pickle_codec_is_fixed_at_creation(ns: Any) -> None:
    st = ns.Store("p", codec="pickle")
    st["obj"] = {"a": [1, 2]}
    assert st["obj"] == {"a": [1, 2]}
    assert ns.Store("p").codec == "pickle"
    with pytest.raises(shmkit.MismatchError, match="codec"):
        ns.Store("p", codec=None)
    with pytest.raises(shmkit.UnsupportedTypeError, match="pickle"):
        ns.Store("plain")["x"] = {1}


def test_explicit_parameters_are_honoured_or_refused(ns: Any) -> None:
    with pytest.raises(shmkit.UnsupportedParameterError, match="size=65536"):
        ns.Store("s", size=65536)
    with pytest.raises(shmkit.UnsupportedParameterError, match="capacity"):
        ns.Channel("c", capacity=1 << 20)
    with pytest.raises(shmkit.UnsupportedParameterError, match="capacity"):
        ns.Queue("q", capacity=1 << 20)
    with pytest.raises(shmkit.UnsupportedParameterError, match="path"):
        ns.Mutex("m", path="/tmp/x")
    with pytest.raises(TypeError, match="unexpected keyword"):
        ns.Event("e", nonsense=1)
    ch = ns.Channel("c")
    with pytest.raises(shmkit.UnsupportedParameterError, match="stop_when_no_senders"):
        ch.recv(timeout=0.01, stop_when_no_senders=True)
    q = ns.Queue("q2", maxsize=5)
    with pytest.raises(shmkit.MismatchError, match="maxsize"):
        ns.Queue("q2", maxsize=6)
    assert ns.Queue("q2").maxsize == 5
    ev = ns.Event("auto", auto_reset=True)
    with pytest.raises(shmkit.MismatchError, match="auto_reset"):
        ns.Event("auto", auto_reset=False)
    with pytest.raises(shmkit.WrongKindError):
        ns.Store("c")
    with pytest.raises(shmkit.NotFoundError):
        ns.Channel("absent", create=False)
    with pytest.raises(shmkit.ExistsError):
        ns.Channel("c", create=True)
    with pytest.raises(shmkit.InvalidNameError):
        ns.Store("no/slash")
    with pytest.raises(shmkit.InvalidNameError):
        ns.Store(None)
    with pytest.raises(ValueError, match="neither 'local' nor a Redis URL"):
        shmkit.connect("http://example")
    q.close()
    ev.close()


def test_clear_inside_a_batch_is_refused_by_both_stores(ns: Any) -> None:
    # The Redis store's clear() in a batch deleted only the server's keys:
    # the batch's own puts survived it, and a key the batch had deleted made
    # it raise KeyError.  Both stores now refuse it, and the batch's other
    # writes are kept or discarded by the block as always.
    local = shmkit.Store(None)
    try:
        for st in (ns.Store("s"), local):
            st["x"], st["y"] = 0, 5
            with st.batch():
                st["a"] = 1
                del st["x"]
                with pytest.raises(RuntimeError, match="before or after the with block"):
                    st.clear()
                st["b"] = 2
            assert dict(st.items()) == {"y": 5, "a": 1, "b": 2}, type(st)
            st.clear()
            assert len(st) == 0
    finally:
        local.close()
        local.unlink()


@pytest.mark.parametrize("where", ["iterator", "pickled value"])
def test_a_child_forked_during_a_redis_update_writes_nothing(ns: Any, where: str) -> None:
    # As the shared-memory store's: the child holds none of its parent's
    # update, and is told at once instead of writing the pairs one by one
    # (it wrote the other 49 before the batch's end told it).
    st = ns.Store("s", codec="pickle")
    assert fork_during_update(st, where, at_child_end=st.__len__) == [(0, 0)]  # (the server's)
    assert dict(st.items()) == {i: i for i in range(100)}


class _ForksWhenEncoded(str):
    """A key whose encoding forks once; the parent waits for the child."""
    children: list[int] = []

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        if not self.children:
            self.children.append(os.fork())
            if self.children[0] > 0:
                _, status = os.waitpid(self.children[0], 0)
                self.children.append(os.waitstatus_to_exitcode(status))
        return str(self).encode(*args, **kwargs)


@pytest.mark.parametrize("op", ["pop", "del", "set", "add"])
def test_a_child_forked_by_a_key_inside_a_redis_batch_writes_nothing(ns: Any, op: str) -> None:
    # A str key's encode() can fork: the child, which holds none of the
    # batch, raises instead of writing to the server on its own (its pop
    # removed the key there, and the parent's batch then failed, KeyError).
    st = ns.Store("s")
    st["k"] = 1
    _ForksWhenEncoded.children = []
    key = _ForksWhenEncoded("k" if op in ("pop", "del") else "new")
    with child_told_it_forked(), st.batch():
        if op == "pop":
            assert st.pop(key) == 1
        elif op == "del":
            del st[key]
        elif op == "set":
            st[key] = 2
        else:
            st.add(key, 2)
    assert _ForksWhenEncoded.children[1:] == [0]
    assert dict(st.items()) == ({} if op in ("pop", "del") else {"k": 1, "new": 2})


def test_a_redis_batch_is_its_threads_and_a_forked_child_is_told(ns: Any) -> None:
    # As the shared-memory store's: another thread's write during a batch is
    # its own (it was discarded with the batch), and reads the server.
    st = ns.Store("s")
    seen: list[Any] = []

    def other_thread() -> None:
        st["b"] = 2
        seen.append(st.get("a"))
    with pytest.raises(KeyError):
        with st.batch():
            st["a"] = 1
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            raise KeyError("discard the batch")
    assert seen == [None] and st["b"] == 2 and "a" not in st
    pid = -1
    try:
        with st.batch():
            st["parent"] = 1
            pid = os.fork()
            if pid == 0:
                st["child"] = 2  # not into the parent's batch: to the server
                if st.get("parent") is not None:
                    os._exit(4)  # it read the parent's batch
            else:
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
                assert st["child"] == 2 and st.get("parent") == 1  # (its own batch)
    except BaseException as e:
        if pid != 0:
            raise
        os._exit(0 if type(e) is RuntimeError and "forked" in str(e) else 3)
    if pid == 0:  # the child applied its copy of the parent's batch
        os._exit(5)
    assert st["parent"] == 1 and st["child"] == 2

    # a batch left in another thread than the one that opened it ends there
    opened = st.batch()
    opened.__enter__()
    st["across threads"] = 1
    t = threading.Thread(target=opened.__exit__, args=(None, None, None))
    t.start()
    t.join()
    assert st._open_batch() is None and st["across threads"] == 1


def test_a_new_thread_never_joins_a_redis_batch_an_ended_thread_left_open(ns: Any) -> None:
    # The next thread is given an ended thread's threading.get_ident(): it
    # found that thread's open batch as its own and wrote into it.
    from test_store import _in_thread_of_a_reused_identifier
    st = ns.Store("s")
    left: list[Any] = []

    def open_batch() -> None:
        b = st.batch()
        b.__enter__()
        st["staged"] = 1
        left.append(b)

    def write() -> Any:
        st["other"] = 2  # to the server at once, as any other thread's write
        return st.get("staged")

    assert _in_thread_of_a_reused_identifier(open_batch, write) is None
    assert st["other"] == 2 and "staged" not in st
    left[0].__exit__(None, None, None)  # (from any thread, as above)
    assert st["staged"] == 1 and st["other"] == 2
    st["after"] = 1
    assert ns.Store("s")["after"] == 1

    def failing() -> Iterator[tuple[str, int]]:
        yield "c", 3
        raise ConnectionResetError("the caller's own socket")
    with pytest.raises(ConnectionResetError, match="caller's own"):  # not BackendError
        st.update(failing())
    assert "c" not in st


def test_store_readonly_and_batch_conflicts(ns: Any) -> None:
    st = ns.Store("s")
    st["k"] = 1
    ro = ns.Store("s", readonly=True)
    assert ro["k"] == 1
    with pytest.raises(shmkit.ReadOnlyError):
        ro["k"] = 2
    other = ns.Store("s")
    with pytest.raises(shmkit.KeyExistsError):
        with st.batch():
            st["a"] = 1
            st.add("late", 1)  # absent now: queued
            other["late"] = 0  # another writer takes the key before the batch ends
    assert "a" not in st and other["late"] == 0  # nothing of the batch applied


# -- between processes ---------------------------------------------------------


def test_two_processes_share_a_store(server: Server, prefix: str) -> None:
    """Two programs add the same 300 keys at once: each key is added by exactly one."""
    code = """
        import sys, shmkit
        st = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Store("shared")
        won = 0
        for i in range(300):
            try:
                st.add(i, sys.argv[3]); won += 1
            except shmkit.KeyExistsError:
                pass
        st[f"done-{sys.argv[3]}"] = won
        print(won)
    """
    procs = [_program(code, server.url, prefix, who) for who in ("p1", "p2")]
    won = [int(_line(p)) for p in procs]
    for p in procs:
        assert p.wait(timeout=60) == 0
    st = shmkit.connect(server.url, prefix=prefix).Store("shared")
    assert sum(won) == 300
    owners = [st[i] for i in range(300)]
    assert owners.count("p1") == won[0] and owners.count("p2") == won[1]
    assert st["done-p1"] == won[0] and len(st) == 302


def _consume_forever(url: str, prefix: str, ready: Any) -> None:
    ch = shmkit.connect(url, prefix=prefix).Channel("work", claim_idle=1.0)
    msg = ch.recv(timeout=30)
    ready.put(msg)
    time.sleep(3600)  # killed before it receives again (which would acknowledge)


def test_consumer_killed_before_ack_has_its_message_redelivered(
        server: Server, prefix: str) -> None:
    from conftest import SPAWN
    ns = shmkit.connect(server.url, prefix=prefix)
    ch = ns.Channel("work", claim_idle=1.0)
    ch.send(b"job-1")
    ready = SPAWN.Queue()
    child = spawn(_consume_forever, server.url, prefix, ready)
    assert ready.get(timeout=60) == b"job-1"
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    ch.send(b"job-2")
    got = [ch.recv(timeout=30), ch.recv(timeout=30)]
    assert sorted(got) == [b"job-1", b"job-2"]  # job-1 came again, from the dead one
    with pytest.raises(shmkit.Timeout):
        ch.recv(timeout=1.5)  # acknowledged by this consumer: never again
    assert ch.depth == 0


def test_acknowledged_message_is_not_redelivered(ns: Any) -> None:
    """The control: a consumer that closes normally acknowledged its message."""
    a = ns.Channel("w", claim_idle=0.2)
    b = ns.Channel("w", claim_idle=0.2)
    a.send(b"x")
    assert a.recv(timeout=5) == b"x"
    a.close()
    time.sleep(0.4)
    with pytest.raises(shmkit.Timeout):
        b.recv(timeout=0.5)


def test_mutex_lease_expires_when_holder_is_stopped(server: Server, prefix: str) -> None:
    code = """
        import sys, shmkit
        m = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Mutex("lock", lease=1.0)
        m.acquire()
        print(m.fencing_token, flush=True)
        sys.stdin.readline()
        try:
            m.release()
            print("released")
        except shmkit.LeaseLostError as e:
            print("lost", type(e).__mro__[1].__name__)
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), server.url,
                              prefix], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        first = int(_line(child))
        m = shmkit.connect(server.url, prefix=prefix).Mutex("lock", lease=5.0)
        assert not m.acquire(timeout=1.5)  # the running holder renews its lease
        os.kill(child.pid, signal.SIGSTOP)
        assert m.acquire(timeout=30)  # its lease runs out while it is stopped
        assert m.fencing_token > first and m.recovered
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("\n")
        child.stdin.flush()
        assert _line(child) == "lost ShmkitError"  # it may not release ours
        assert m.locked()
        m.release()
        assert m.acquire(timeout=5) and not m.recovered
        m.release()
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


def test_mutex_release_only_by_owner(ns: Any) -> None:
    a, b = ns.Mutex("m"), ns.Mutex("m")
    assert a.acquire(timeout=5)
    with pytest.raises(RuntimeError):
        b.release()
    assert a.locked()
    t0 = a.fencing_token
    a.release()
    assert b.acquire(timeout=5) and b.fencing_token == t0 + 1
    b.release()


def test_waiter_wakes_on_release_in_another_process(server: Server, prefix: str) -> None:
    code = """
        import sys, time, shmkit
        m = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Mutex("lock", lease=30.0)
        print("waiting", flush=True)
        t0 = time.monotonic()
        ok = m.acquire(timeout=60)
        print(ok, m.fencing_token, flush=True)
        m.release()
    """
    m = shmkit.connect(server.url, prefix=prefix).Mutex("lock", lease=30.0)
    assert m.acquire(timeout=5)
    child = _program(code, server.url, prefix)
    assert _line(child) == "waiting"
    time.sleep(0.3)
    token = m.fencing_token
    m.release()
    ok, theirs = _line(child).split()
    assert ok == "True" and int(theirs) == token + 1
    assert child.wait(timeout=30) == 0


def test_event_wakes_another_process(server: Server, prefix: str) -> None:
    code = """
        import sys, shmkit
        e = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Event(sys.argv[3])
        print("waiting", flush=True)
        print(e.wait(timeout=600), flush=True)  # woken by set(), long before the timeout
    """
    ns = shmkit.connect(server.url, prefix=prefix)
    for kind, auto in (("manual", False), ("auto", True)):
        e = ns.Event(kind, auto_reset=auto)
        child = _program(code, server.url, prefix, kind)
        assert _line(child) == "waiting"
        time.sleep(0.3)
        assert child.poll() is None  # still waiting: nothing set it
        e.set()
        assert _line(child) == "True"
        assert child.wait(timeout=30) == 0
        assert e.is_set() is (not auto)  # an auto-reset event let exactly one through


def test_blocking_recv_lets_ctrl_c_through(server: Server, prefix: str) -> None:
    code = """
        import sys, shmkit
        ch = shmkit.connect(sys.argv[1], prefix=sys.argv[2]).Channel("idle")
        print("waiting", flush=True)
        try:
            ch.recv()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """
    child = _program(code, server.url, prefix)
    assert _line(child) == "waiting"
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    assert _line(child) == "interrupted"
    assert child.wait(timeout=30) == 0


def test_queue_pickles_like_the_local_queue(ns: Any) -> None:
    q = ns.Queue("q")
    obj = {"a": (1, 2.5, "x"), "b": None}
    q.put(obj)
    (entry,) = ns.r.xrange(ns.key("q"))[:1]
    assert entry[1][b"d"] == pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    assert q.get(timeout=5) == obj


# -- the server going away ------------------------------------------------------


def test_redis_restart_gives_backend_error() -> None:
    srv = Server()
    srv.start()
    try:
        ns = shmkit.connect(srv.url, prefix="restart")
        st = ns.Store("s")
        ch = ns.Channel("c")
        m = ns.Mutex("m")
        st["k"] = 1
        srv.stop()
        for call in (lambda: st["k"], lambda: st.__setitem__("k", 2), lambda: len(st),
                     lambda: list(st.items()), lambda: ch.send(b"x"),
                     lambda: ch.recv(timeout=1), lambda: m.acquire(timeout=1)):
            with pytest.raises(shmkit.BackendError, match="could not be reached") as info:
                call()
            assert isinstance(info.value, ConnectionError)
            assert isinstance(info.value.__cause__, redis.exceptions.RedisError)
        with pytest.raises(shmkit.BackendError):
            shmkit.connect(srv.url)
        srv.start()  # without persistence: the data is gone, the handles work again
        assert st.get("k") is None
        st["k"] = 3
        assert st["k"] == 3
        ch.send(b"after")
        assert ch.recv(timeout=5) == b"after"
        assert m.acquire(timeout=5)
        m.release()
    finally:
        srv.remove()


def test_import_shmkit_does_not_need_redis() -> None:
    out = run_python("""
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import shmkit
        ns = shmkit.connect("local")
        assert "redis" not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            shmkit.connect("redis://localhost:1/0")
        except ImportError as e:
            print(e)
    """)
    assert "pip install 'shmkit[redis]'" in out.stdout


def test_recv_into_hands_back_a_message_it_cannot_write(ns: Any) -> None:
    """A read-only buffer is refused before receiving, and a buffer too small
    hands the message back: the next receive of the handle gets it, at once."""
    ch = ns.Channel("into", claim_idle=30)
    ch.send(b"hello")
    with pytest.raises(TypeError):  # (before it received: nothing is lost)
        ch.recv_into(b"xxxxxxxxxx", timeout=1)
    with pytest.raises(shmkit.MessageTooLarge):
        ch.recv_into(bytearray(2), timeout=1)
    buf = bytearray(10)
    assert ch.recv_into(buf, timeout=1) == 5 and bytes(buf[:5]) == b"hello"
    ch.send(b"next")
    assert ch.recv(timeout=1) == b"next"
    ch.close()
    assert ns.Channel("into").statistics()["depth"] == 0

def test_a_subscriber_starts_over_on_a_topic_made_again_or_lost_in_a_restart(
        prefix: str) -> None:
    """The topic unlinked and made again, or the server restarted without its
    data, and more published on the new stream than the subscriber had read
    on the old: it gets the new stream from its first message."""
    s = Server()
    s.start()
    try:
        ns = shmkit.connect(s.url, prefix=prefix)
        t = ns.Topic("reset")
        sub = t.subscribe()
        t.publish_many([b"old%d" % i for i in range(5)])
        assert sub.recv_many(10, timeout=1) == [b"old%d" % i for i in range(5)]
        t.unlink()
        again = ns.Topic("reset")
        again.publish_many([b"new%d" % i for i in range(7)])
        assert sub.recv_many(10, timeout=1) == [b"new%d" % i for i in range(7)]
        s.stop()
        s.start()  # without persistence: the topic is gone
        with pytest.raises((shmkit.errors.BackendError, shmkit.Empty)):
            sub.recv_nowait()  # (the connection broken by the restart, or retried)
        other = shmkit.connect(s.url, prefix=prefix)
        other.Topic("reset").publish_many([b"third%d" % i for i in range(9)])
        assert sub.recv_many(10, timeout=1) == [b"third%d" % i for i in range(9)]
        other.close()
        ns.close()
    finally:
        s.remove()

def test_ack_of_many_messages_at_once(ns: Any) -> None:
    """20,000 messages received and then acknowledged in one call: all of them."""
    ch = ns.Channel("many")
    ch.send_many([b"%d" % i for i in range(20_000)])
    got: list[bytes] = []
    while len(got) < 20_000:
        got += ch.recv_many(max_n=20_000, timeout=1)
    ch.ack()
    assert ch.statistics()["pending"] == 0 and ch.statistics()["depth"] == 0
    ch.close()

def test_a_forked_child_cannot_release_its_parents_redis_mutex(ns: Any) -> None:
    """As with the local Mutex, a forked child does not hold its parent's lock:
    its release() raises RuntimeError and the parent still holds it; and a
    closed handle's locked(), statistics() and holder_pid() raise ClosedError."""
    m = ns.Mutex("forked")
    assert m.acquire(timeout=5)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say what release() did, and leave at once
        try:
            m.release()
            os.write(w, b"released")
        except RuntimeError as e:
            os.write(w, str(e).encode()[:200])
        finally:
            os._exit(0)
    os.close(w)
    told = os.read(r, 300)
    os.close(r)
    os.waitpid(pid, 0)
    assert told.startswith(b"release of a shmkit lock that this process does not hold"), told
    assert m.locked() and m.holder_pid() == os.getpid()
    m.release()  # still its own: no LeaseLostError
    m.close()
    for call in (m.locked, m.statistics, m.holder_pid):
        with pytest.raises(shmkit.ClosedError):
            call()

def test_a_handle_left_open_after_unlink_cannot_remake_a_meta_of_no_kind(ns: Any) -> None:
    """A Topic publish or a Channel close_sending through a handle whose object
    another handle unlinked raises NotFoundError saying so, and writes nothing:
    the name stays free for every kind."""
    for make, write in ((ns.Topic, lambda t: t.publish(b"x")),
                        (ns.Channel, lambda c: c.close_sending())):
        a, stale = make("gone"), make("gone")
        a.unlink()
        with pytest.raises(shmkit.NotFoundError, match="was removed"):
            write(stale)
        assert ns.r.keys(f"{ns.prefix}:*") == []
        st = ns.Store("gone")  # the name is free
        st["k"] = 1
        st.unlink()
        stale.close()


def test_a_readonly_redis_channel_cannot_end_it(ns: Any) -> None:
    ch, ro = ns.Channel("ro"), ns.Channel("ro", readonly=True)
    with pytest.raises(shmkit.ReadOnlyError):
        ro.close_sending()
    assert not ch.sending_closed
    ch.send(b"still open")
    ch.close()
    ro.close()

def test_a_redis_subscriber_receives_in_one_thread_at_a_time(ns: Any) -> None:
    """As locally: a second thread's receive on a subscriber another thread is
    receiving with raises BusyError, and nothing is duplicated or lost."""
    t = ns.Topic("busy")
    sub = t.subscribe()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(sub.recv(timeout=10)))
    waiter.start()
    time.sleep(0.5)  # the waiter is in its blocking read
    for call in (sub.recv_nowait, lambda: sub.recv(timeout=0.1), lambda: sub.recv_many(5, 0.1)):
        with pytest.raises(shmkit.BusyError, match="give each thread its own subscriber"):
            call()
    t.publish_many([b"a", b"b"])
    waiter.join(10)
    assert got == [b"a"] and sub.recv_many(5, timeout=1) == [b"b"]
    assert sub.missed == 0
    t.close()

def test_a_prefixed_local_namespace_refuses_names_the_classes_refuse() -> None:
    ns = shmkit.connect("local", prefix=f"t-{secrets.token_hex(6)}")
    for bad in ("", 5, "a/b", ".."):
        with pytest.raises(shmkit.InvalidNameError):
            shmkit.Store(bad)  # type: ignore[arg-type]
        with pytest.raises(shmkit.InvalidNameError):
            ns.Store(bad)
    ns.close()

def test_foreign_data_under_an_objects_keys_raises_corrupt_or_wrong_kind(ns: Any) -> None:
    """Keys another program wrote raise the local error classes, saying what to
    do, and a receive goes on past a foreign stream entry (a Channel's is
    moved to <key>:rejected, a Topic's passed over)."""
    r, key = ns.r, ns.key
    ch = ns.Channel("ch")
    ch.send(b"a")
    r.xadd(key("ch"), {"x": "foreign"})
    ch.send(b"b")
    assert ch.recv_many(10, timeout=1) == [b"a", b"b"]  # then the news of the other
    with pytest.raises(shmkit.CorruptError, match="moved to the stream"):
        ch.recv(timeout=1)
    ch.send(b"c")
    assert ch.recv(timeout=1) == b"c"
    assert r.xrange(key("ch") + ":rejected")[0][1][b"x"] == b"foreign"

    t = ns.Topic("t")
    sub = t.subscribe()
    t.publish(b"1")
    r.xadd(key("t"), {"x": "foreign"}, id="2-1")
    r.hincrby(key("t") + ":meta", "published", 1)
    t.publish(b"3")
    assert sub.recv_many(10, timeout=1) == [b"1"]
    with pytest.raises(shmkit.CorruptError, match="passed over"):
        sub.recv(timeout=1)
    assert sub.recv(timeout=1) == b"3" and sub.missed == 0

    r.set(key("str"), "x")
    r.hset(key("str") + ":meta", mapping={"kind": "channel", "format": 2})
    with pytest.raises(shmkit.WrongKindError):
        ns.Channel("str")
    r.hset(key("tm") + ":meta", mapping={"kind": "topic", "format": 2})
    with pytest.raises(shmkit.CorruptError, match="history"):
        ns.Topic("tm")
    r.hset(key("qm") + ":meta", mapping={"kind": "queue", "format": 2, "maxsize": "abc"})
    with pytest.raises(shmkit.CorruptError, match="maxsize"):
        ns.Queue("qm")
    r.hset(key("u8") + ":meta", mapping={"kind": "store", "format": 2, "x": b"\xff"})
    with pytest.raises(shmkit.CorruptError, match="UTF-8"):
        ns.Store("u8")
    q = ns.Queue("q")
    q._ch.send(b"not a pickle")
    q.put(1)
    with pytest.raises(shmkit.CorruptError, match="not a pickle"):
        q.get(timeout=1)
    assert q.get(timeout=1) == 1
    m = ns.Mutex("m")
    r.set(key("m"), f"{socket.gethostname()}:abc:x")
    r.set(key("m") + ":fence", "zz")
    for call in (m.holder_pid, m.statistics):
        with pytest.raises(shmkit.CorruptError, match="another program"):
            call()


def test_a_redis_store_on_a_key_of_another_redis_type_is_refused_at_open(ns: Any) -> None:
    """A Store whose key another program made as a list, a string or a stream
    raises WrongKindError when opened, naming the type and what to do (it
    opened, and each read or write then raised a BackendError); the foreign
    key is left as it was, and no meta hash is left beside it."""
    r, key = ns.r, ns.key
    r.rpush(key("lst"), "a", "b")
    r.set(key("str"), "x")
    r.xadd(key("stm"), {"f": "v"})
    for name, shown in (("lst", "list"), ("str", "string"), ("stm", "stream")):
        for create in (None, True):
            with pytest.raises(shmkit.WrongKindError,
                               match=f"is a Redis {shown}, not the hash a store") as ei:
                ns.Store(name, create=create)
            assert "use another name" in str(ei.value) and f"DEL {key(name)}" in str(ei.value)
            assert not r.exists(key(name) + ":meta")
    assert r.lrange(key("lst"), 0, -1) == [b"a", b"b"] and r.get(key("str")) == b"x"
    # a store of ours whose hash was replaced: refused, its meta kept
    st = ns.Store("st")
    st["k"] = 1
    r.delete(key("st"))
    r.set(key("st"), "foreign")
    with pytest.raises(shmkit.WrongKindError, match="is a Redis string"):
        ns.Store("st", create=False)
    assert r.exists(key("st") + ":meta")
    r.delete(key("st"), key("lst"))
    assert ns.Store("st", create=False).get("k") is None  # removed: it opens again
    fresh = ns.Store("lst")
    fresh["k"] = 2
    assert fresh["k"] == 2


def _drain(it: Iterator[Any]) -> tuple[list[Any], list[str]]:
    """What an iterator gives, stepping past the CorruptErrors it raises (their texts)."""
    got: list[Any] = []
    errors: list[str] = []
    while True:
        try:
            got.append(next(it))
        except StopIteration:
            return got, errors
        except shmkit.CorruptError as e:
            errors.append(str(e))


def test_a_redis_store_field_no_shmkit_writes_raises_corrupt_and_iteration_goes_on(
        ns: Any) -> None:
    """An empty field, a str key that is not UTF-8, an unknown key type, an int
    key in bytes shmkit does not write: CorruptError naming the field and how
    to delete it, from the step that meets it; the next step goes on."""
    st = ns.Store("s")
    st.update({"a": 1, 7: 2, b"b": 3})
    foreign = [b"", b"\x02\xff\xfe", b"\x09abc", b"\x01\x05", b"\x02" + b"k" * ((1 << 20) + 1)]
    for field in foreign:
        ns.r.hset(ns.key("s"), field, b"\x01v")
    with pytest.raises(shmkit.CorruptError, match="HDEL"):
        list(st)
    keys, errors = _drain(iter(st))
    assert sorted(keys, key=repr) == sorted(["a", 7, b"b"], key=repr)
    assert len(errors) == len(foreign)
    for field in foreign:
        assert sum(f"{field!r:.80}" in e for e in errors) >= 1, (field, errors)
    assert all("store 's'" in e and "HDEL" in e for e in errors)
    assert _drain(iter(st.keys()))[1] == errors
    pairs, errors = _drain(iter(st.items()))
    assert sorted(pairs, key=repr) == sorted([("a", 1), (7, 2), (b"b", 3)], key=repr)
    assert len(errors) == len(foreign)
    values, errors = _drain(iter(st.values()))
    assert sorted(values, key=repr) == sorted([1, 2, 3, b"v", b"v", b"v", b"v", b"v"],
                                              key=repr) and not errors
    for field in foreign:
        ns.r.hdel(ns.key("s"), field)
    assert sorted(st, key=repr) == sorted(["a", 7, b"b"], key=repr)


def test_a_redis_store_value_no_shmkit_writes_raises_corrupt_naming_its_key(ns: Any) -> None:
    """A value another program wrote (a str that is not UTF-8, an int in other
    bytes, an unknown type, an array whose header does not fit, a pickle that
    does not load) raises CorruptError naming the key and what to do, from
    every read; iteration steps past it; pop() of it removes it."""
    st = ns.Store("v")
    st["a"] = 1
    st["arr"] = np.arange(4, dtype=np.int64)
    arr = ns.r.hget(ns.key("v"), b"\x02arr")
    foreign = {"s": b"\x02\xff\xfe", "i0": b"\x03", "i3": b"\x03\x01\x02\x03", "e": b"",
               "t": b"\xc8xyz", "hn": b"\x08" + (0xffffffff).to_bytes(4, "little") + b"x",
               "h": b"\x08\x01", "long": arr + b"extra", "short": arr[:-3],
               "p": b"\x09" + pickle.dumps(1)}
    for k, raw in foreign.items():
        ns.r.hset(ns.key("v"), b"\x02" + k.encode(), raw)
    for k in foreign:
        for call in (lambda: st[k], lambda: st.get(k), lambda: st.get_many(["a", k])):
            with pytest.raises(shmkit.CorruptError, match=f"key '{k}' .*delete the key"):
                call()
    pairs, errors = _drain(iter(st.items()))
    assert [p for p in pairs if p[0] == "a"] == [("a", 1)] and len(pairs) == 2
    assert len(errors) == len(foreign)
    values, errors = _drain(iter(st.values()))
    assert len(values) == 2 and len(errors) == len(foreign)
    assert all(any(f"key '{k}'" in e for e in errors) for k in foreign)
    with st.batch():
        with pytest.raises(shmkit.CorruptError, match="key 's'"):
            st.pop("s")
    assert "s" in st
    with pytest.raises(shmkit.CorruptError, match="key 's'.*removed"):
        st.pop("s")
    assert "s" not in st

    pk = ns.Store("pk", codec="pickle")
    ns.r.hset(ns.key("pk"), b"\x02g", b"\x09garbage")
    with pytest.raises(shmkit.CorruptError, match="key 'g'.*does not load") as info:
        pk["g"]
    assert info.value.__cause__ is not None


def test_redis_get_into_of_a_value_no_shmkit_writes_raises_corrupt(ns: Any) -> None:
    """get_into() checks an array value's header as get() does (it returned 0,
    or copied bytes the header does not describe), and refuses an empty value
    or an unknown type as get() does, naming the key; a good one is copied."""
    st = ns.Store("gi")
    st["arr"] = np.arange(4, dtype=np.int64)
    arr = ns.r.hget(ns.key("gi"), b"\x02arr")
    foreign = {"hn": b"\x08" + (0xffffffff).to_bytes(4, "little") + b"x", "h": b"\x08\x01",
               "long": arr + b"extra", "short": arr[:-3], "junk": b"\x08\x04\x00\x00\x00junkzz",
               "e": b"", "t": b"\xc8xyz"}
    for k, raw in foreign.items():
        ns.r.hset(ns.key("gi"), b"\x02" + k.encode(), raw)
        with pytest.raises(shmkit.CorruptError, match=f"key '{k}' .*delete the key"):
            st.get(k)
        buf = bytearray(b"\xaa" * 64)
        with pytest.raises(shmkit.CorruptError, match=f"key '{k}' .*delete the key"):
            st.get_into(k, buf)
        assert buf == b"\xaa" * 64
    out = np.zeros(4, np.int64)
    assert st.get_into("arr", out) == 32 and out.tolist() == [0, 1, 2, 3]


def test_redis_store_nbytes_of_an_empty_value_and_a_foreign_codec_raise_corrupt(
        ns: Any) -> None:
    """nbytes() of a present empty value raises CorruptError (not KeyError, while
    `in` says the key is there); a meta hash whose codec no shmkit writes
    raises CorruptError saying what to do."""
    st = ns.Store("nb")
    ns.r.hset(ns.key("nb"), b"\x02e", b"")
    assert "e" in st
    with pytest.raises(shmkit.CorruptError, match="key 'e' .*delete the key"):
        st.nbytes("e")
    with pytest.raises(KeyError):
        st.nbytes("missing")
    for codec in (None, "zstd"):
        ns.r.delete(ns.key("cm") + ":meta")
        ns.r.hset(ns.key("cm") + ":meta", mapping={"kind": "store", "format": 2,
                                                   **({"codec": codec} if codec else {})})
        with pytest.raises(shmkit.CorruptError, match="codec.*delete its keys"):
            ns.Store("cm")


# -- the bridge ------------------------------------------------------------------


def _bridge(direction: str, url: str, prefix: str, local: str, remote: str,
            topic: bool = False) -> subprocess.Popen:
    kind = ["--topic"] if topic else ["--claim-idle", "1"]
    p = subprocess.Popen([sys.executable, "-m", "shmkit", "bridge", f"--{direction}", url,
                          "--prefix", prefix, "--remote", remote, *kind,
                          "--batch", "16", local],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(p.stderr.readline()), daemon=True)
    t.start()
    t.join(60)
    assert line and "shmkit bridge:" in line[0], (line, p.poll())
    return p


def _stop(p: subprocess.Popen, sig: int) -> int:
    p.send_signal(sig)
    return p.wait(timeout=60)


def _drainer(ch: shmkit.Channel, received: list[int]) -> Callable[..., None]:
    """drain(until, timeout=60): receive numbered messages from ch into
    received until `until` distinct ones arrived (or the timeout passes)."""
    def drain(until: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(set(received)) < until and time.monotonic() < end:
            received.extend(int(m) for m in ch.recv_many(max_n=256, timeout=0.5))
    return drain


def test_bridge_carries_messages_and_survives_kills(server: Server, prefix: str,
                                                    names: Any) -> None:
    """local A -> bridge --to -> Redis -> bridge --from -> local B, both bridges
    stopped and restarted mid-stream (the --from one SIGKILLed twice): every
    message arrives, in order of first arrival."""
    a_name, b_name = names(), names()
    a = shmkit.Channel(a_name, capacity=1 << 20)
    b = shmkit.Channel(b_name, capacity=1 << 20)
    total = 3000
    to = _bridge("to", server.url, prefix, a_name, "wire")
    frm = _bridge("from", server.url, prefix, b_name, "wire")
    received: list[int] = []
    drain = _drainer(b, received)

    try:
        sender_done = threading.Event()

        def send_all() -> None:
            for i in range(total):
                a.send(b"%d" % i, timeout=60)
                if i % 100 == 0:
                    time.sleep(0.005)  # keep the stream going while the bridges die
            sender_done.set()

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        drain(300)
        assert _stop(frm, signal.SIGKILL) == -signal.SIGKILL
        frm = _bridge("from", server.url, prefix, b_name, "wire")
        drain(900)
        assert _stop(to, signal.SIGTERM) == 0  # a clean stop between two messages
        to = _bridge("to", server.url, prefix, a_name, "wire")
        drain(1500)
        assert _stop(frm, signal.SIGKILL) == -signal.SIGKILL
        frm = _bridge("from", server.url, prefix, b_name, "wire")
        assert sender_done.wait(120)
        drain(total, timeout=120)
        assert set(received) == set(range(total))  # nothing lost
        first: list[int] = []
        seen: set[int] = set()
        for n in received:
            if n not in seen:
                seen.add(n)
                first.append(n)
        assert first == sorted(first)  # one producer's order kept
        assert _stop(frm, signal.SIGINT) == 0 and _stop(to, signal.SIGINT) == 0
    finally:
        for p in (to, frm):
            if p.poll() is None:
                p.kill()
                p.wait()
        a.close()
        b.close()


def test_a_killed_to_bridge_loses_none_of_the_views_it_held(server: Server, prefix: str,
                                                            names: Any) -> None:
    """A --to bridge SIGKILLed while it holds a batch of views it could not add
    (Redis is down): the local channel gives them back and the next bridge
    carries them, once Redis is back."""
    a_name, b_name = names(), names()
    a = shmkit.Channel(a_name, capacity=1 << 20)
    b = shmkit.Channel(b_name, capacity=1 << 20)
    to = _bridge("to", server.url, prefix, a_name, "held")
    frm = _bridge("from", server.url, prefix, b_name, "held")
    received: list[int] = []
    drain = _drainer(b, received)

    try:
        for i in range(100):
            a.send(b"%d" % i)
        drain(100)
        server.stop()
        for i in range(100, 150):
            a.send(b"%d" % i)
        end = time.monotonic() + 30  # the bridge takes a batch and retries it
        while a.statistics()["received"] < 101 and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.2)
        held = a.statistics()["received"] - 100
        assert 1 <= held <= 16, held
        assert _stop(to, signal.SIGKILL) == -signal.SIGKILL
        server.start()
        to = _bridge("to", server.url, prefix, a_name, "held")
        drain(150)
        assert sorted(set(received)) == list(range(150))  # nothing lost
        assert a.statistics()["redelivered"] == held
        assert _stop(frm, signal.SIGINT) == 0 and _stop(to, signal.SIGINT) == 0
    finally:
        if server.proc is None:
            server.start()
        for p in (to, frm):
            if p.poll() is None:
                p.kill()
                p.wait()
        a.close()
        b.close()


def test_topic_bridges_carry_every_message_through_kills(server: Server, prefix: str,
                                                         names: Any) -> None:
    """local topic A -> bridge --topic --to -> Redis -> bridge --topic --from ->
    local topic B, the --from bridge SIGKILLed twice mid-stream: a subscriber of
    B gets every message, first arrivals in order, at most a batch again per kill."""
    a_name, b_name = names(), names()
    a = shmkit.Topic(a_name, capacity=1 << 20)
    b = shmkit.Topic(b_name, capacity=1 << 20)
    sub = b.subscribe()
    r = redis.Redis(unix_socket_path=server.sock)
    total, batch = 3000, 16
    to = _bridge("to", server.url, prefix, a_name, "wire-t", topic=True)
    frm = _bridge("from", server.url, prefix, b_name, "wire-t", topic=True)
    received: list[int] = []

    def wait_for(cond: Any, what: str) -> None:
        end = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.01)

    def drain(until: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(set(received)) < until and time.monotonic() < end:
            try:
                received.append(int(sub.recv(timeout=0.5)))
            except shmkit.Timeout:
                pass

    try:
        wait_for(lambda: len(a.statistics()["subscribers"]) == 1, "the --to bridge")
        wait_for(lambda: list(r.scan_iter(f"{prefix}:{{wire-t}}:bridge:*")), "the --from bridge")
        done = threading.Event()

        def publish_all() -> None:
            for i in range(total):
                a.publish(b"%d" % i, timeout=60)
                if i % 100 == 0:
                    time.sleep(0.005)  # keep the stream going while the bridge dies
            done.set()

        threading.Thread(target=publish_all, daemon=True).start()
        for until in (400, 1200):
            drain(until)
            assert _stop(frm, signal.SIGKILL) == -signal.SIGKILL
            frm = _bridge("from", server.url, prefix, b_name, "wire-t", topic=True)
        assert done.wait(120)
        drain(total, timeout=120)
        assert set(received) == set(range(total))  # nothing lost
        first = list(dict.fromkeys(received))
        assert first == sorted(first)  # the publisher's order kept
        assert len(received) - total <= 2 * batch  # at most a batch again per kill
        assert _stop(frm, signal.SIGINT) == 0 and _stop(to, signal.SIGINT) == 0
    finally:
        for p in (to, frm):
            if p.poll() is None:
                p.kill()
                p.wait()
        sub.close()
        a.close()
        b.close()
        r.close()


def test_a_running_bridge_shows_in_top_and_a_second_one_is_refused(
        server: Server, prefix: str, name: str) -> None:
    import json
    ch = shmkit.Channel(name, capacity=1 << 20)
    remote = shmkit.connect(server.url, prefix=prefix).Channel("shown")
    to = _bridge("to", server.url, prefix, name, "shown")
    try:
        for i in range(500):
            ch.send(b"%d" % i)
        assert [remote.recv(timeout=30) for _ in range(500)][-1] == b"499"
        out = subprocess.run([sys.executable, "-m", "shmkit", "top", "--once", "--json",
                              "--interval", "0.2", f"{name}*"],
                             capture_output=True, text=True, timeout=60, env=_env())
        objs = {o["name"]: o for o in json.loads(out.stdout)["objects"]}
        status = objs[f"{name}.bridge-to"]
        assert status["counters"]["pid"] == to.pid and status["counters"]["alive"] == 1
        assert status["counters"]["forwarded"] == 500
        assert f"bridge to Redis (pid {to.pid})" in status["activity"]
        again = subprocess.run([sys.executable, "-m", "shmkit", "bridge", "--to", server.url,
                                "--prefix", prefix, "--remote", "shown", name],
                               capture_output=True, text=True, timeout=60, env=_env())
        assert again.returncode == 1 and f"already runs as pid {to.pid}" in again.stderr
        assert _stop(to, signal.SIGINT) == 0
        assert not os.path.exists(f"/dev/shm/shmkit.{name}.bridge-to")  # removed with it
    finally:
        if to.poll() is None:
            to.kill()
            to.wait()
        remote.close()
        ch.close()


def test_topic_bridge_refuses_claim_idle(server: Server, prefix: str, name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "shmkit", "bridge", "--topic", "--to",
                          server.url, "--claim-idle", "5", name],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 2 and "--claim-idle is for channels" in out.stderr


def test_bridge_ctrl_c_stops_cleanly(server: Server, prefix: str, name: str) -> None:
    ch = shmkit.Channel(name, capacity=1 << 16)
    p = _bridge("from", server.url, prefix, name, "cc")
    remote = shmkit.connect(server.url, prefix=prefix).Channel("cc")
    remote.send(b"over")
    assert ch.recv(timeout=30) == b"over"
    assert _stop(p, signal.SIGINT) == 0
    assert "1 messages forwarded" in p.stderr.read()
    ch.close()


def test_a_to_bridge_carries_what_it_took_before_the_channel_ended(
        server: Server, prefix: str, name: str) -> None:
    """Messages sent and then the channel ended before the bridge starts: its
    first batch takes them all and then meets the end; it adds them before
    it ends the stream."""
    ch = shmkit.Channel(name, capacity=1 << 16)
    for i in range(5):
        ch.send(b"%d" % i)
    ch.close_sending()
    p = _bridge("to", server.url, prefix, name, "ending")
    assert p.wait(timeout=60) == 0
    remote = shmkit.connect(server.url, prefix=prefix).Channel("ending")
    assert [remote.recv(timeout=10) for _ in range(5)] == [b"%d" % i for i in range(5)]
    with pytest.raises(shmkit.ChannelClosed):
        remote.recv(timeout=10)
    remote.close()
    ch.close()


def test_a_topic_bridge_waits_out_redis_going_away_while_it_records_its_place(
        server: Server, prefix: str, name: str) -> None:
    """The --from topic bridge keeps its place with plain Redis commands: with
    the server gone they are retried like every other call (BackendError
    once stopped), never an error that ends the bridge."""
    from shmkit.errors import BackendError
    from shmkit.redis.bridge import Bridge

    lt = shmkit.Topic(name, capacity=1 << 16)
    logged: list[str] = []
    bridge = Bridge(name, server.url, "from", topic=True, prefix=prefix, remote="places",
                    log=logged.append)
    try:
        server.stop()
        stopper = threading.Timer(0.5, bridge.stop)
        stopper.start()
        assert bridge._rt is not None
        key = bridge._place
        with pytest.raises(BackendError, match="could not be reached"):
            bridge._retrying("record the bridge's place",
                             lambda: bridge._rt._r.set(key, 1))  # type: ignore[union-attr]
        stopper.join()
        assert any("retrying" in line for line in logged), logged
    finally:
        if server.proc is None:
            server.start()
        bridge.close()
        lt.close()


def test_bridge_queue_objects_travel_pickled(server: Server, prefix: str, names: Any) -> None:
    src, dst = names(), names()
    qa, qb = shmkit.Queue(name=src), shmkit.Queue(name=dst)
    p_to = subprocess.Popen([sys.executable, "-m", "shmkit", "bridge", "--queue", "--to",
                             server.url, "--prefix", prefix, "--remote", "q2", src],
                            stderr=subprocess.PIPE, text=True, env=_env())
    p_from = subprocess.Popen([sys.executable, "-m", "shmkit", "bridge", "--queue", "--from",
                               server.url, "--prefix", prefix, "--remote", "q2", dst],
                              stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for i in range(20):
            qa.put({"n": i})
        assert [qb.get(timeout=60) for _ in range(20)] == [{"n": i} for i in range(20)]
    finally:
        for p in (p_to, p_from):
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=60) == 0
        qa.close()
        qb.close()


def test_the_two_machine_example_runs(server: Server) -> None:
    example = os.path.join(os.path.dirname(SRC), "examples", "two_machines.py")
    out = subprocess.run([sys.executable, example, "500"], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    assert "500 jobs and 500 prices crossed from A to B" in out.stdout
    assert "every one once, in order" in out.stdout


def test_a_from_bridge_leaves_pending_what_its_ended_local_channel_refused(
        server: Server, prefix: str, name: str) -> None:
    """The local channel was ended: the bridge stops (exit 1) and every message
    it could not send stays pending on Redis; a bridge into the channel made
    again delivers them all."""
    ch = shmkit.Channel(name, capacity=1 << 16)
    ch.close_sending()
    ns = shmkit.connect(server.url, prefix=prefix)
    rc = ns.Channel("held")
    rc.send_many([b"m%d" % i for i in range(5)])
    p = _bridge("from", server.url, prefix, name, "held")
    assert p.wait(timeout=60) == 1
    assert rc.statistics()["depth"] == 5
    assert "5 messages stay pending on Redis" in p.stderr.read()
    ch.close()
    ch.unlink()
    ch = shmkit.Channel(name, capacity=1 << 16)
    p = _bridge("from", server.url, prefix, name, "held")
    try:
        assert [ch.recv(timeout=10) for _ in range(5)] == [b"m%d" % i for i in range(5)]
    finally:
        assert _stop(p, signal.SIGINT) == 0
    assert rc.statistics()["depth"] == 0
    ch.close()
    ns.close()


def test_a_from_bridge_sets_aside_a_message_too_large_for_its_local_channel(
        server: Server, prefix: str, name: str) -> None:
    """One message larger than the local channel can hold goes to the stream
    <key>:rejected with the reason, the bridge says so and carries the others."""
    ch = shmkit.Channel(name, capacity=4096)
    ns = shmkit.connect(server.url, prefix=prefix)
    rc = ns.Channel("big")
    rc.send_many([b"a", b"x" * 10_000, b"b"])
    p = _bridge("from", server.url, prefix, name, "big")
    try:
        assert [ch.recv(timeout=10) for _ in range(2)] == [b"a", b"b"]
    finally:
        assert _stop(p, signal.SIGINT) == 0
    err = p.stderr.read()
    assert "10000 bytes" in err and ":rejected" in err, err
    rejected = ns.r.xrange(ns.key("big") + ":rejected")
    assert len(rejected) == 1 and rejected[0][1][b"d"] == b"x" * 10_000
    assert b"10000 bytes" in rejected[0][1][b"why"]
    assert rc.statistics()["depth"] == 0
    rc.unlink()
    assert not ns.r.exists(ns.key("big") + ":rejected")
    ch.close()
    ns.close()


def test_a_topic_from_bridge_starts_over_on_a_remote_topic_made_again(
        server: Server, prefix: str, name: str) -> None:
    """The place a --topic --from bridge recorded belongs to its stream: on a
    topic made again it starts at the new stream's first message; a place
    that is not one a bridge wrote is replaced, with a warning naming it."""
    lt = shmkit.Topic(name, capacity=1 << 16)
    lsub = lt.subscribe()
    ns = shmkit.connect(server.url, prefix=prefix)
    rt = ns.Topic("again")
    def place() -> list[Any]:  # the place's key, once the bridge subscribed
        end = time.monotonic() + 30
        while not (found := list(ns.r.scan_iter(f"{prefix}:*:bridge:*"))):
            assert time.monotonic() < end
            time.sleep(0.01)
        return found

    p = _bridge("from", server.url, prefix, name, "again", topic=True)
    try:
        place()
        rt.publish_many([b"old%d" % i for i in range(5)])
        assert [lsub.recv(timeout=10) for _ in range(5)] == [b"old%d" % i for i in range(5)]
    finally:
        assert _stop(p, signal.SIGINT) == 0
    rt.unlink()
    rt = ns.Topic("again")
    rt.publish_many([b"new%d" % i for i in range(7)])
    p = _bridge("from", server.url, prefix, name, "again", topic=True)
    try:
        assert [lsub.recv(timeout=10) for _ in range(7)] == [b"new%d" % i for i in range(7)]
    finally:
        assert _stop(p, signal.SIGINT) == 0
    key, = place()
    ns.r.set(key, b"\xffgarbage")
    p = _bridge("from", server.url, prefix, name, "again", topic=True)
    try:
        end = time.monotonic() + 30
        while ns.r.get(key) == b"\xffgarbage":  # until the bridge recorded its own
            assert time.monotonic() < end
            time.sleep(0.01)
        rt.publish(b"after")
        assert lsub.recv(timeout=10) == b"after"
    finally:
        assert _stop(p, signal.SIGINT) == 0
    assert "garbage" in p.stderr.read()
    lsub.close()
    lt.close()
    ns.close()


def test_a_from_bridge_goes_on_past_foreign_stream_entries(
        server: Server, prefix: str, names: Any) -> None:
    """An entry shmkit did not write, in a channel's stream or a topic's, is
    logged as a warning naming it, and the bridge carries the messages after it."""
    ch_name, topic_name = names(), names()
    ch = shmkit.Channel(ch_name, capacity=1 << 16)
    lt = shmkit.Topic(topic_name, capacity=1 << 16)
    lsub = lt.subscribe()
    ns = shmkit.connect(server.url, prefix=prefix)
    rc, rt = ns.Channel("fc"), ns.Topic("ft")
    rc.send(b"a")
    ns.r.xadd(ns.key("fc"), {"x": "foreign"})
    rc.send(b"b")
    pc = _bridge("from", server.url, prefix, ch_name, "fc")
    pt = _bridge("from", server.url, prefix, topic_name, "ft", topic=True)
    try:
        assert [ch.recv(timeout=10) for _ in range(2)] == [b"a", b"b"]
        end = time.monotonic() + 30
        while not list(ns.r.scan_iter(f"{prefix}:*:bridge:*")):  # subscribed
            assert time.monotonic() < end
            time.sleep(0.01)
        ns.r.xadd(ns.key("ft"), {"x": "foreign"}, id="1-1")
        ns.r.hincrby(ns.key("ft") + ":meta", "published", 1)
        rt.publish(b"after")
        assert lsub.recv(timeout=10) == b"after"
    finally:
        assert _stop(pc, signal.SIGINT) == 0
        assert _stop(pt, signal.SIGINT) == 0
    assert "warning" in pc.stderr.read() and "warning" in pt.stderr.read()
    lsub.close()
    for obj in (ch, lt, ns):
        obj.close()
