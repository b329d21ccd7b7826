"""The Redis backend (shmkit.connect("redis://...")): what it costs over redis-py.

Benchmarks of three systems each, against one redis-server on a unix socket
(started here, as bench_store does):

* Store put and random get of 16-byte keys and 100-byte values: the backend's
  Store (HSET/HGET of the local encoding), redis-py's HSET/HGET on the same
  hash layout directly (the reference: the ratio is the backend's overhead),
  and the local shmkit.Store;
* the same Store in atomic batches of 256 puts (``batch()`` against a
  MULTI/EXEC pipeline) and in gets of 256 keys a call (``get_many`` against
  HMGET);
* Channel one-way, 64-byte messages, a receiver in a second process: the
  backend's Channel (XADD by a script; XREADGROUP with the previous XACK+XDEL
  pipelined), the same commands through redis-py directly, and the local
  shmkit.Channel;
* ``shmkit bridge``: 64-byte messages from a local Channel or Topic into a
  Redis stream against redis-py's pipelined XADD, and one message's round trip
  through two bridges against XADD/XREAD by hand.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable

from benchmarks.harness import workload

SPAWN = multiprocessing.get_context("spawn")
N_KEYS = 10_000
KEYS = [b"%016d" % i for i in range(N_KEYS)]
VALUE = b"v" * 100
MSG = b"m" * 64
_REDIS = shutil.which("redis-server")
REQ = ("redis", "hiredis") if _REDIS else ("redis", "hiredis", "redis-server")

PUT = "redis: Store put, 16 B keys, 100 B values"
GET = "redis: Store random get, 16 B keys, 100 B values"
ONE_WAY = "redis: Channel 64 B one-way, 2 processes"


_cache: dict[str, Any] = {}


def _once(key: str, make: Callable[[], Any], close: Callable[[Any], None] | None = None) -> Any:
    if key not in _cache:
        _cache[key] = make()
        if close is not None:
            atexit.register(close, _cache[key])
    return _cache[key]


def _redis_server() -> Any:
    """One redis-server on a unix socket in a temporary directory, for the whole run."""
    def start() -> tuple[subprocess.Popen, str, str]:
        d = tempfile.mkdtemp(prefix="shmkit-bench-redis-")
        sock = os.path.join(d, "redis.sock")
        proc = subprocess.Popen([_REDIS, "--port", "0", "--unixsocket", sock, "--save", "",
                                 "--appendonly", "no", "--dir", d],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        return proc, sock, d

    def stop(s: tuple) -> None:
        s[0].terminate()
        s[0].wait(5)
        shutil.rmtree(s[2], ignore_errors=True)

    return _once("redis", start, stop)


def _url() -> str:
    _proc, sock, _d = _redis_server()
    return f"unix://{sock}"


def _ns() -> Any:
    import shmkit
    return _once("ns", lambda: shmkit.connect(_url(), prefix="bench"), lambda n: n.close())


def _client() -> Any:
    import redis
    return _once("client", lambda: redis.Redis.from_url(_url()), lambda c: c.close())


def _order(n: int) -> list[bytes]:
    rng = random.Random(1)
    return [KEYS[rng.randrange(N_KEYS)] for _ in range(n)]


def _cycle(n: int) -> list[bytes]:
    return [KEYS[i % N_KEYS] for i in range(n)]


# -- Store ----------------------------------------------------------------------------


@workload(PUT, unit="kops/s", system="redis-py HSET (direct)", requires=REQ, reference=True)
def put_redis_py(n: int) -> float:
    r = _client()
    r.delete("bench:direct")
    keys = [b"\x03" + k for k in _cycle(n)]
    value = b"\x01" + VALUE
    t0 = time.perf_counter()
    for k in keys:
        r.hset("bench:direct", k, value)
    return time.perf_counter() - t0


@workload(PUT, system="shmkit Redis Store", requires=REQ)
def put_backend(n: int) -> float:
    st = _ns().Store("store")
    st.clear()
    keys = _cycle(n)
    t0 = time.perf_counter()
    for k in keys:
        st[k] = VALUE
    return time.perf_counter() - t0


@workload(PUT, system="shmkit.Store (local)")
def put_local(n: int) -> float:
    import shmkit
    st = shmkit.Store(None, size=16 << 20)
    keys = _cycle(n)
    t0 = time.perf_counter()
    for k in keys:
        st[k] = VALUE
    dt = time.perf_counter() - t0
    st.close()
    return dt


def _filled() -> None:
    def fill() -> bool:
        r = _client()
        p = r.pipeline(transaction=False)
        for k in KEYS:
            p.hset("bench:direct-get", b"\x03" + k, b"\x01" + VALUE)
        p.execute()
        st = _ns().Store("store-get")
        with st.batch():
            for k in KEYS:
                st[k] = VALUE
        return True
    _once("filled", fill)


def _local_store() -> Any:
    """A local Store holding every key, for the whole run."""
    import shmkit

    def make() -> Any:
        st = shmkit.Store(None, size=16 << 20)
        for k in KEYS:
            st[k] = VALUE
        return st
    return _once("local-store", make, lambda s: s.close())


@workload(GET, unit="kops/s", system="redis-py HGET (direct)", requires=REQ, reference=True)
def get_redis_py(n: int) -> float:
    _filled()
    r = _client()
    keys = [b"\x03" + k for k in _order(n)]
    t0 = time.perf_counter()
    for k in keys:
        r.hget("bench:direct-get", k)
    return time.perf_counter() - t0


@workload(GET, system="shmkit Redis Store", requires=REQ)
def get_backend(n: int) -> float:
    _filled()
    st = _ns().Store("store-get")
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        st[k]
    return time.perf_counter() - t0


@workload(GET, system="shmkit.Store (local)")
def get_local(n: int) -> float:
    st = _local_store()
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        st[k]
    return time.perf_counter() - t0


# -- Store, batched ----------------------------------------------------------------------

PUT_BATCH = "redis: Store put in atomic batches of 256, 16 B keys, 100 B values"
GET_BATCH = "redis: Store get of 256 keys in one call, 16 B keys, 100 B values"
BATCH = 256


@workload(PUT_BATCH, unit="kops/s", system="redis-py MULTI/EXEC pipeline of 256 HSET",
          requires=REQ, reference=True)
def put_batch_redis_py(n: int) -> float:
    r = _client()
    r.delete("bench:direct")
    keys = [b"\x03" + k for k in _cycle(n)]
    value = b"\x01" + VALUE
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        p = r.pipeline(transaction=True)
        for k in keys[i:i + BATCH]:
            p.hset("bench:direct", k, value)
        p.execute()
    return time.perf_counter() - t0


def _put_batches(st: Any, n: int) -> float:
    keys = _cycle(n)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        with st.batch():
            for k in keys[i:i + BATCH]:
                st[k] = VALUE
    return time.perf_counter() - t0


@workload(PUT_BATCH, system="shmkit Redis Store, with st.batch()", requires=REQ)
def put_batch_backend(n: int) -> float:
    st = _ns().Store("store")
    st.clear()
    return _put_batches(st, n)


@workload(PUT_BATCH, system="shmkit.Store (local), with st.batch()")
def put_batch_local(n: int) -> float:
    import shmkit
    st = shmkit.Store(None, size=16 << 20)
    try:
        return _put_batches(st, n)
    finally:
        st.close()


@workload(GET_BATCH, unit="kops/s", system="redis-py HMGET of 256 fields", requires=REQ,
          reference=True)
def get_batch_redis_py(n: int) -> float:
    _filled()
    r = _client()
    keys = [b"\x03" + k for k in _order(n)]
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        r.hmget("bench:direct-get", keys[i:i + BATCH])
    return time.perf_counter() - t0


@workload(GET_BATCH, system="shmkit Redis Store, get_many", requires=REQ)
def get_batch_backend(n: int) -> float:
    _filled()
    st = _ns().Store("store-get")
    keys = _order(n)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        st.get_many(keys[i:i + BATCH])
    return time.perf_counter() - t0


@workload(GET_BATCH, system="shmkit.Store (local), get_many")
def get_batch_local(n: int) -> float:
    st = _local_store()
    keys = _order(n)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        st.get_many(keys[i:i + BATCH])
    return time.perf_counter() - t0


# -- Channel one-way --------------------------------------------------------------------


def _sink(kind: str, url: str, name: str, n: int, ready: Any, done: Any) -> None:
    if kind == "direct":
        import redis
        r = redis.Redis.from_url(url)
        key = f"bench:{name}"
        prev: list[bytes] = []
        ready.set()
        got = 0
        while got < n:
            p = r.pipeline(transaction=False)
            if prev:
                p.xack(key, "g", *prev)
                p.xdel(key, *prev)
            p.xreadgroup("g", "c", {key: ">"}, count=1, block=1000)
            res = p.execute()[-1]
            prev = [e[0] for e in res[0][1]] if res else []
            got += len(prev)
    else:
        import shmkit
        ns = shmkit.connect(url, prefix="bench") if kind == "backend" else shmkit.connect("local")
        ch = ns.Channel(name)
        ready.set()
        recv = ch.recv
        for _ in range(n):
            recv()
        ch.close()
    done.set()


def _one_way(kind: str, n: int) -> float:
    name = f"ow-{secrets.token_hex(4)}"
    url = _url() if kind != "local" else ""
    if kind == "direct":
        r = _client()
        r.xgroup_create(f"bench:{name}", "g", id="0", mkstream=True)
        send = lambda m: r.xadd(f"bench:{name}", {"d": m})  # noqa: E731
        ch = None
    else:
        import shmkit
        ns = _ns() if kind == "backend" else shmkit.connect("local")
        ch = ns.Channel(name)
        send = ch.send
    ready, done = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_sink, args=(kind, url, name, n, ready, done), daemon=True)
    p.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the receiving process did not start")
        t0 = time.perf_counter()
        for _ in range(n):
            send(MSG)
        if not done.wait(600):
            raise RuntimeError("the receiving process did not finish")
        return time.perf_counter() - t0
    finally:
        p.join(30)
        if kind == "direct":
            _client().delete(f"bench:{name}")
        elif ch is not None:
            ch.unlink()
            ch.close()


@workload(ONE_WAY, unit="kops/s", system="redis-py XADD / XREADGROUP+XACK (direct)",
          requires=REQ, reference=True)
def one_way_redis_py(n: int) -> float:
    return _one_way("direct", n)


@workload(ONE_WAY, system="shmkit Redis Channel", requires=REQ)
def one_way_backend(n: int) -> float:
    return _one_way("backend", n)


@workload(ONE_WAY, system="shmkit.Channel (local)")
def one_way_local(n: int) -> float:
    return _one_way("local", n)


# -- shmkit bridge ----------------------------------------------------------------------

BRIDGE = "redis: bridge, 64 B messages from a local Channel into a Redis stream"
BRIDGE_RT = "redis: bridge, one 64 B message local -> Redis -> local (latency)"
BRIDGE_N = 50_000


def _bridge_proc(direction: str, local: str, remote: str, *extra: str) -> subprocess.Popen:
    """A `shmkit bridge` process, returned once it has said it runs."""
    import sys
    p = subprocess.Popen([sys.executable, "-m", "shmkit", "bridge", f"--{direction}", _url(),
                          "--prefix", "bench", "--remote", remote, *extra, local],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    if "shmkit bridge:" not in p.stderr.readline():
        p.kill()
        raise RuntimeError("the bridge did not start")
    return p


def _end(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(30)


@workload(BRIDGE, unit="kops/s", system="redis-py pipelined XADD, 256 a pipeline",
          requires=REQ, reference=True, n=BRIDGE_N)
def bridge_ref(n: int) -> float:
    r = _client()
    key = f"bench:xadd-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    for i in range(0, n, 256):
        p = r.pipeline(transaction=False)
        for _ in range(min(256, n - i)):
            p.xadd(key, {"d": MSG})
        p.execute()
    dt = time.perf_counter() - t0
    r.delete(key)
    return dt


def _bridge_rate(n: int, batch: str, topic: bool = False) -> float:
    import shmkit
    name = f"bb-{secrets.token_hex(4)}"
    local = (shmkit.Topic(name, capacity=8 << 20) if topic
             else shmkit.Channel(name, capacity=8 << 20))
    extra = ["--batch", batch] + (["--topic"] if topic else [])
    r = _client()
    key = _ns().key(name)
    p = None
    try:  # the local object is removed even when the bridge does not start
        p = _bridge_proc("to", name, name, *extra)
        if topic:  # the bridge subscribes once it runs: wait for it
            while not local.statistics()["subscribers"]:
                time.sleep(0.01)
        send = local.publish if topic else local.send
        t0 = time.perf_counter()
        for _ in range(n):
            send(MSG, 60)
        # every message crossed; counted by entries added, since a topic's stream is
        # trimmed to its history
        while r.xinfo_stream(key)["entries-added"] < n:
            time.sleep(0.001)
        return time.perf_counter() - t0
    finally:
        if p is not None:
            _end(p)
        r.delete(key, key + ":meta")
        local.close()
        shmkit.unlink(name)


@workload(BRIDGE, system="shmkit bridge --to, one message a call", requires=REQ, n=BRIDGE_N // 5)
def bridge_one(n: int) -> float:
    return _bridge_rate(n, "1")


@workload(BRIDGE, system="shmkit bridge --to --batch 256", requires=REQ, n=BRIDGE_N)
def bridge_batched(n: int) -> float:
    return _bridge_rate(n, "256")


@workload(BRIDGE, system="shmkit bridge --topic --to (batches of 256)", requires=REQ,
          n=BRIDGE_N)
def bridge_topic(n: int) -> float:
    return _bridge_rate(n, "256", topic=True)


def _xread_echo(url: str, key: str, n: int, ready: Any) -> None:
    import redis
    r = redis.Redis.from_url(url)
    last = "$"
    ready.set()
    for _ in range(n):
        got = r.xread({key: last}, count=1, block=0)
        last = got[0][1][0][0]
        r.xadd(key + ":back", {"d": got[0][1][0][1][b"d"]})


@workload(BRIDGE_RT, unit="µs round trip", system="redis-py XADD, XREAD in another process "
          "and back", requires=REQ, reference=True, n=2000)
def bridge_rt_ref(n: int) -> float:
    r = _client()
    key = f"bench:rt-{secrets.token_hex(4)}"
    ready = SPAWN.Event()
    p = SPAWN.Process(target=_xread_echo, args=(_url(), key, n, ready), daemon=True)
    p.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the echo process did not start")
        time.sleep(0.2)  # its first XREAD is blocking
        last = "0"
        t0 = time.perf_counter()
        for _ in range(n):
            r.xadd(key, {"d": MSG})
            got = r.xread({key + ":back": last}, count=1, block=0)
            last = got[0][1][0][0]
        return time.perf_counter() - t0
    finally:
        p.join(30)
        r.delete(key, key + ":back")


@workload(BRIDGE_RT, system="shmkit.Channel -> bridge --to -> Redis -> bridge --from -> "
          "shmkit.Channel", requires=REQ, n=2000)
def bridge_rt(n: int) -> float:
    import shmkit
    a_name, b_name = f"ba-{secrets.token_hex(4)}", f"bb-{secrets.token_hex(4)}"
    wire = f"wire-{secrets.token_hex(4)}"
    a, b = shmkit.Channel(a_name), shmkit.Channel(b_name)
    bridges: list[subprocess.Popen] = []
    try:  # the local channels are removed even when a bridge does not start
        bridges.append(_bridge_proc("to", a_name, wire))
        bridges.append(_bridge_proc("from", b_name, wire))
        a.send(MSG)
        b.recv(timeout=60)  # both bridges carry messages
        t0 = time.perf_counter()
        for _ in range(n):
            a.send(MSG)
            b.recv(timeout=60)
        return time.perf_counter() - t0
    finally:
        for p in bridges:
            _end(p)
        _client().delete(*_client().keys(f"bench:{{{wire}}}*"))
        for ch, name in ((a, a_name), (b, b_name)):
            ch.close()
            shmkit.unlink(name)
