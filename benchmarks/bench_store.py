"""Store benchmarks: 100,000 keys of 16 bytes with 100-byte values.

Three benchmarks, each against the same competitors: put, random get, and get
from a second process while the first keeps writing (with the reader's solo
rate as an extra metric, ``vs_solo``).  A plain dict is the reference.  A
fourth, of shmkit alone, updates existing keys with single puts and with
``batch()`` blocks, at 100,000 keys and at 1,000 (all in cache): what a
batch saves, against single puts at 100,000 keys as the reference.

Also a scaling run (not part of ``python -m benchmarks``)::

    python -m benchmarks.bench_store --scaling 1000 10000 100000 1000000 10000000

which times puts (inserts; updates singly and in ``batch()`` blocks) and gets
from 1,000 to 10,000,000 keys and saves
``docs/store_scaling.png`` (matplotlib, in the ``bench`` extra).
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from benchmarks.harness import workload

N_KEYS = 100_000
KEYS = [b"%016d" % i for i in range(N_KEYS)]  # 16 bytes
VALUE = b"v" * 100
SPAWN = multiprocessing.get_context("spawn")

PUT = "store: put, 100k keys of 16 B, 100 B values"
GET = "store: random get, 100k keys of 16 B, 100 B values"
GET2 = "store: get in a 2nd process while the 1st keeps writing"

_REDIS = shutil.which("redis-server")
REDIS_REQ = ("redis",) if _REDIS else ("redis", "redis-server")


def _order(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [KEYS[rng.randrange(N_KEYS)] for _ in range(n)]


def _cycle(n: int) -> list[bytes]:
    return [KEYS[i % N_KEYS] for i in range(n)]


# -- shared set-up, made once per process -------------------------------------------

_cache: dict[str, Any] = {}


def _once(key: str, make: Callable[[], Any], close: Callable[[Any], None] | None = None) -> Any:
    if key not in _cache:
        _cache[key] = make()
        if close is not None:
            atexit.register(close, _cache[key])
    return _cache[key]


def _redis_server() -> Any:
    def start() -> tuple[subprocess.Popen, str, str]:
        d = tempfile.mkdtemp(prefix="shmkit-bench-redis-")
        sock = os.path.join(d, "redis.sock")
        proc = subprocess.Popen([_REDIS, "--port", "0", "--unixsocket", sock, "--save", "",
                                 "--appendonly", "no", "--dir", d],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        return proc, sock, d

    def stop(s: tuple) -> None:
        s[0].terminate()
        s[0].wait(5)
        shutil.rmtree(s[2], ignore_errors=True)

    return _once("redis", start, stop)


def _redis_client() -> Any:
    import redis

    _proc, sock, _d = _redis_server()
    return redis.Redis(unix_socket_path=sock)


def _manager() -> Any:
    return _once("manager", lambda: SPAWN.Manager(), lambda m: m.shutdown())


def _new_store(name: str | None = None) -> Any:
    import shmkit

    return shmkit.Store(name, size=64 << 20)


def _filled_store() -> Any:
    def make() -> Any:
        st = _new_store()
        for k in KEYS:
            st[k] = VALUE
        return st

    def close(st: Any) -> None:
        st.close()
        st.unlink()

    return _once("store", make, close)


def _lmdb_env(path: str | None = None) -> Any:
    import lmdb

    return lmdb.open(path or tempfile.mkdtemp(prefix="shmkit-bench-lmdb-"),
                     map_size=1 << 30, sync=False, metasync=False, writemap=True)


def _filled_lmdb() -> Any:
    def make() -> Any:
        env = _lmdb_env()
        with env.begin(write=True) as txn:
            for k in KEYS:
                txn.put(k, VALUE)
        return env

    return _once("lmdb", make, lambda env: shutil.rmtree(env.path(), ignore_errors=True))


# -- put -------------------------------------------------------------------------------

@workload(PUT, unit="ops/s", system="dict", reference=True)
def put_dict(n: int) -> float:
    d: dict = {}
    keys = _cycle(n)
    t0 = time.perf_counter()
    for k in keys:
        d[k] = VALUE
    return time.perf_counter() - t0


def _timed_puts(st: Any, keys: list[bytes], batch: int, update: bool = False) -> float:
    """Seconds to put every key, in batch() blocks of `batch` puts when batch > 0,
    or with update: in update() calls of `batch` pairs (dicts made before the clock)."""
    if update:
        chunks = [dict.fromkeys(keys[i:i + batch], VALUE) for i in range(0, len(keys), batch)]
        t0 = time.perf_counter()
        for chunk in chunks:
            st.update(chunk)
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    if batch:
        for i in range(0, len(keys), batch):
            with st.batch():
                for k in keys[i:i + batch]:
                    st[k] = VALUE
    else:
        for k in keys:
            st[k] = VALUE
    return time.perf_counter() - t0


def _put_store(n: int, batch: int = 0, update: bool = False) -> float:
    """n puts into a new store, in batch() blocks (or update() calls) of `batch` puts."""
    st = _new_store()
    try:
        return _timed_puts(st, _cycle(n), batch, update)
    finally:
        st.close()
        st.unlink()


@workload(PUT, system="shmkit.Store")
def put_store(n: int) -> float:
    return _put_store(n)


@workload(PUT, system="shmkit.Store, batch() of 1000 puts")
def put_store_batched(n: int) -> float:
    return _put_store(n, 1000)


@workload(PUT, system="shmkit.Store.update, 1000 pairs a call")
def put_store_update(n: int) -> float:
    return _put_store(n, 1000, update=True)


@workload(PUT, system="py-lmdb, a transaction per put", requires=("lmdb",))
def put_lmdb(n: int) -> float:
    env = _lmdb_env()
    keys = _cycle(n)
    try:
        t0 = time.perf_counter()
        for k in keys:
            with env.begin(write=True) as txn:
                txn.put(k, VALUE)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(env.path(), ignore_errors=True)


@workload(PUT, system="py-lmdb, batched (1000 per transaction)", requires=("lmdb",))
def put_lmdb_batched(n: int) -> float:
    env = _lmdb_env()
    keys = _cycle(n)
    try:
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            with env.begin(write=True) as txn:
                for k in keys[i:i + 1000]:
                    txn.put(k, VALUE)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(env.path(), ignore_errors=True)


@workload(PUT, system="UltraDict", requires=("UltraDict",))
def put_ultradict(n: int) -> float:
    from UltraDict import UltraDict

    d = UltraDict(buffer_size=64 << 20, full_dump_size=64 << 20)
    keys = _cycle(n)
    try:
        t0 = time.perf_counter()
        for k in keys:
            d[k] = VALUE
        return time.perf_counter() - t0
    finally:
        d.unlink()


@workload(PUT, system="shared-memory-dict", requires=("shared_memory_dict",))
def put_smd(n: int) -> float:
    from shared_memory_dict import SharedMemoryDict

    d = SharedMemoryDict(name=f"bench{os.getpid()}{random.randrange(1 << 30)}",
                         size=64 << 20)
    keys = _cycle(min(n, 2000))
    try:
        t0 = time.perf_counter()
        for k in keys:
            d[k] = VALUE
        return {"seconds": time.perf_counter() - t0, "ops": len(keys)}  # type: ignore[return-value]
    finally:
        d.shm.close()
        d.shm.unlink()


@workload(PUT, system="multiprocessing.Manager().dict()")
def put_manager(n: int) -> float:
    d = _manager().dict()
    keys = _cycle(n)
    t0 = time.perf_counter()
    for k in keys:
        d[k] = VALUE
    return time.perf_counter() - t0


@workload(PUT, system="Redis, unix socket", requires=REDIS_REQ)
def put_redis(n: int) -> float:
    r = _redis_client()
    r.flushdb()
    keys = _cycle(n)
    t0 = time.perf_counter()
    for k in keys:
        r.set(k, VALUE)
    return time.perf_counter() - t0


@workload(PUT, system="Redis, unix socket, pipelined (1000)", requires=REDIS_REQ)
def put_redis_pipelined(n: int) -> float:
    r = _redis_client()
    r.flushdb()
    keys = _cycle(n)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        p = r.pipeline(transaction=False)
        for k in keys[i:i + 1000]:
            p.set(k, VALUE)
        p.execute()
    return time.perf_counter() - t0


# -- update: what a batch saves ----------------------------------------------------------

UPDATE = "store: update existing keys, single puts against batch() of 1000"


def _updated_store(nkeys: int) -> Any:
    def make() -> Any:
        st = _new_store()
        for k in KEYS[:nkeys]:
            st[k] = VALUE
        return st

    def close(st: Any) -> None:
        st.close()
        st.unlink()

    return _once(f"update {nkeys}", make, close)


def _update(n: int, nkeys: int, batch: int, update: bool = False) -> float:
    """n puts over the nkeys keys already stored, singly, in batch() blocks or in
    update() calls."""
    return _timed_puts(_updated_store(nkeys), [KEYS[i % nkeys] for i in range(n)], batch,
                       update)


@workload(UPDATE, unit="ops/s", system="shmkit.Store, 100k keys", reference=True)
def update_store(n: int) -> float:
    return _update(n, N_KEYS, 0)


@workload(UPDATE, system="shmkit.Store, batch() of 1000, 100k keys")
def update_store_batched(n: int) -> float:
    return _update(n, N_KEYS, 1000)


@workload(UPDATE, system="shmkit.Store.update of 1000 pairs, 100k keys")
def update_store_update(n: int) -> float:
    return _update(n, N_KEYS, 1000, update=True)


@workload(UPDATE, system="shmkit.Store, 1k keys (in cache)")
def update_store_cached(n: int) -> float:
    return _update(n, 1000, 0)


@workload(UPDATE, system="shmkit.Store, batch() of 1000, 1k keys (in cache)")
def update_store_cached_batched(n: int) -> float:
    return _update(n, 1000, 1000)


@workload(UPDATE, system="shmkit.Store.update of 1000 pairs, 1k keys (in cache)")
def update_store_cached_update(n: int) -> float:
    return _update(n, 1000, 1000, update=True)


# -- get ---------------------------------------------------------------------------------

@workload(GET, unit="ops/s", system="dict", reference=True)
def get_dict(n: int) -> float:
    d = dict.fromkeys(KEYS, VALUE)
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        d[k]
    return time.perf_counter() - t0


@workload(GET, system="shmkit.Store")
def get_store(n: int) -> float:
    st = _filled_store()
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        st[k]
    return time.perf_counter() - t0


@workload(GET, system="shmkit.Store.get_many, 100 keys a call")
def get_many_store(n: int) -> float:
    st = _filled_store()
    keys = _order(n)
    calls = [keys[i:i + 100] for i in range(0, n, 100)]
    t0 = time.perf_counter()
    for c in calls:
        st.get_many(c)
    return time.perf_counter() - t0


@workload(GET, system="shmkit.Store.get_into, one reused buffer")
def get_into_store(n: int) -> float:
    st = _filled_store()
    keys = _order(n)
    buf = bytearray(len(VALUE))
    get_into = st.get_into
    t0 = time.perf_counter()
    for k in keys:
        get_into(k, buf)
    return time.perf_counter() - t0


@workload(GET, system="shmkit.Store.view, with-block per get")
def view_store(n: int) -> float:
    st = _filled_store()
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        with st.view(k) as mv:
            mv[0]
    return time.perf_counter() - t0


@workload(GET, system="py-lmdb, a transaction per get", requires=("lmdb",))
def get_lmdb(n: int) -> float:
    env = _filled_lmdb()
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        with env.begin() as txn:
            txn.get(k)
    return time.perf_counter() - t0


@workload(GET, system="py-lmdb, batched (1000 per transaction)", requires=("lmdb",))
def get_lmdb_batched(n: int) -> float:
    env = _filled_lmdb()
    keys = _order(n)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        with env.begin() as txn:
            for k in keys[i:i + 1000]:
                txn.get(k)
    return time.perf_counter() - t0


@workload(GET, system="UltraDict", requires=("UltraDict",))
def get_ultradict(n: int) -> float:
    from UltraDict import UltraDict

    d = _once("ultradict", lambda: UltraDict(dict.fromkeys(KEYS, VALUE),
                                             buffer_size=64 << 20, full_dump_size=64 << 20),
              lambda d: d.unlink())
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        d[k]
    return time.perf_counter() - t0


@workload(GET, system="shared-memory-dict", requires=("shared_memory_dict",))
def get_smd(n: int) -> float:
    from shared_memory_dict import SharedMemoryDict

    def make() -> Any:
        d = SharedMemoryDict(name=f"benchget{os.getpid()}", size=64 << 20)
        d.update(dict.fromkeys(KEYS, VALUE))
        return d

    def close(d: Any) -> None:
        d.shm.close()
        d.shm.unlink()

    d = _once("smd", make, close)
    keys = _order(min(n, 2000))
    t0 = time.perf_counter()
    for k in keys:
        d[k]
    return {"seconds": time.perf_counter() - t0, "ops": len(keys)}  # type: ignore[return-value]


@workload(GET, system="multiprocessing.Manager().dict()")
def get_manager(n: int) -> float:
    def make() -> Any:
        d = _manager().dict()
        d.update(dict.fromkeys(KEYS, VALUE))
        return d

    d = _once("manager-dict", make)
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        d[k]
    return time.perf_counter() - t0


def _filled_redis() -> Any:
    r = _redis_client()

    def fill() -> bool:
        r.flushdb()
        p = r.pipeline(transaction=False)
        for k in KEYS:
            p.set(k, VALUE)
        p.execute()
        return True

    _once("redis-filled", fill)
    return r


@workload(GET, system="Redis, unix socket", requires=REDIS_REQ)
def get_redis(n: int) -> float:
    r = _filled_redis()
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        r.get(k)
    return time.perf_counter() - t0


@workload(GET, system="Redis, unix socket, pipelined (1000)", requires=REDIS_REQ)
def get_redis_pipelined(n: int) -> float:
    r = _filled_redis()
    keys = _order(n)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        p = r.pipeline(transaction=False)
        for k in keys[i:i + 1000]:
            p.get(k)
        p.execute()
    return time.perf_counter() - t0


# -- get in a second process while the first writes ------------------------------------------

def _store_writer(name: str, ready: Any, stop: Any) -> None:
    import shmkit

    st = shmkit.Store.open(name)
    rng = random.Random(2)
    ready.set()
    while not stop.is_set():
        for _ in range(1000):
            st[KEYS[rng.randrange(N_KEYS)]] = VALUE
    st.close()


def _lmdb_writer(path: str, ready: Any, stop: Any) -> None:
    env = _lmdb_env(path)
    rng = random.Random(2)
    ready.set()
    while not stop.is_set():
        for _ in range(1000):
            with env.begin(write=True) as txn:
                txn.put(KEYS[rng.randrange(N_KEYS)], VALUE)


def _ultradict_writer(name: str, ready: Any, stop: Any) -> None:
    from UltraDict import UltraDict

    d = UltraDict(name=name, create=False)
    rng = random.Random(2)
    ready.set()
    while not stop.is_set():
        for _ in range(1000):
            d[KEYS[rng.randrange(N_KEYS)]] = VALUE


def _redis_writer(sock: str, ready: Any, stop: Any) -> None:
    import redis

    r = redis.Redis(unix_socket_path=sock)
    rng = random.Random(2)
    ready.set()
    while not stop.is_set():
        for _ in range(200):
            r.set(KEYS[rng.randrange(N_KEYS)], VALUE)


def _manager_writer(d: Any, ready: Any, stop: Any) -> None:
    rng = random.Random(2)
    ready.set()
    while not stop.is_set():
        for _ in range(100):
            d[KEYS[rng.randrange(N_KEYS)]] = VALUE


def _with_writer(n: int, get: Callable[[bytes], Any], target: Callable[..., None],
                 *args: Any) -> dict:
    """Time n gets alone, then n gets while a writer process writes."""
    keys = _order(n)
    t0 = time.perf_counter()
    for k in keys:
        get(k)
    solo = time.perf_counter() - t0
    ready, stop = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=target, args=(*args, ready, stop), daemon=True)
    p.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the writer process did not start")
        time.sleep(0.05)
        t0 = time.perf_counter()
        for k in keys:
            get(k)
        busy = time.perf_counter() - t0
    finally:
        stop.set()
        p.join(30)
        if p.is_alive():
            p.kill()
    return {"seconds": busy, "vs_solo": solo / busy}


@workload(GET2, unit="ops/s", system="shmkit.Store", reference=True, n=300_000)
def get2_store(n: int) -> dict:
    st = _filled_store()
    return _with_writer(n, st.__getitem__, _store_writer, st.name)


@workload(GET2, system="py-lmdb, a transaction per get", requires=("lmdb",), n=200_000)
def get2_lmdb(n: int) -> dict:
    env = _filled_lmdb()

    def get(k: bytes) -> Any:
        with env.begin() as txn:
            return txn.get(k)

    return _with_writer(n, get, _lmdb_writer, env.path())


@workload(GET2, system="UltraDict", requires=("UltraDict",), n=100_000)
def get2_ultradict(n: int) -> dict:
    from UltraDict import UltraDict

    d = _once("ultradict2", lambda: UltraDict(dict.fromkeys(KEYS, VALUE),
                                              buffer_size=64 << 20,
                                              full_dump_size=64 << 20),
              lambda d: d.unlink())
    return _with_writer(n, d.__getitem__, _ultradict_writer, d.name)


@workload(GET2, system="Redis, unix socket", requires=REDIS_REQ, n=20_000)
def get2_redis(n: int) -> dict:
    r = _filled_redis()
    return _with_writer(n, r.get, _redis_writer, _redis_server()[1])


@workload(GET2, system="multiprocessing.Manager().dict()", n=5_000)
def get2_manager(n: int) -> dict:
    d = _once("manager-dict2", lambda: _manager().dict(dict.fromkeys(KEYS, VALUE)))
    return _with_writer(n, d.__getitem__, _manager_writer, d)


# -- scaling: 1,000 to 10,000,000 keys -------------------------------------------------------

def scaling(sizes: list[int], out: str = "docs/store_scaling.png", ops: int = 200_000) -> list:
    """Time put (insert), put (update) singly and in batch() blocks of 1,000, and
    random get at each store size; plot them."""
    import shmkit

    rows = []
    for size in sizes:
        keys = [b"%016d" % i for i in range(size)]
        st = shmkit.Store(None, size=1 << 20)
        try:
            t0 = time.perf_counter()
            for k in keys:
                st[k] = VALUE
            insert = (time.perf_counter() - t0) / size
            rng = random.Random(5)
            sample = [keys[rng.randrange(size)] for _ in range(ops)]
            update = _timed_puts(st, sample, 0) / ops
            batched = _timed_puts(st, sample, 1000) / ops
            t0 = time.perf_counter()
            for k in sample:
                st[k]
            get = (time.perf_counter() - t0) / ops
            d = dict.fromkeys(keys, VALUE)
            t0 = time.perf_counter()
            for k in sample:
                d[k]
            dget = (time.perf_counter() - t0) / ops
            del d
            rows.append((size, insert * 1e9, update * 1e9, get * 1e9, dget * 1e9,
                         st.allocated_bytes, batched * 1e9))
            print(f"{size:>11,} keys: insert {insert * 1e9:6.0f} ns, update "
                  f"{update * 1e9:6.0f} ns, in batch() {batched * 1e9:6.0f} ns "
                  f"({update / batched:.2f}x), get {get * 1e9:6.0f} ns (dict "
                  f"{dget * 1e9:4.0f} ns), {st.allocated_bytes / 2**20:8.1f} MiB", flush=True)
        finally:
            st.close()
            st.unlink()
    from benchmarks.plot import save_plot
    save_plot(rows, ((1, "Store put (insert)"), (2, "Store put (update)"),
                     (6, "Store put (update), batch() of 1000"), (3, "Store get"),
                     (4, "dict get")),
              xlabel="keys in the store (16 B keys, 100 B values)",
              ylabel="ns per operation (from Python)",
              title="shmkit.Store: cost per operation as the store grows", out=out)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--scaling":
        sizes = [int(a) for a in sys.argv[2:]] or [1_000, 10_000, 100_000, 1_000_000,
                                                   10_000_000]
        scaling(sizes)
    else:
        print(__doc__)
