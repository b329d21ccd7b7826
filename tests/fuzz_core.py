"""A damage fuzzer for the C core's checks: microseconds a case, no open by name.

tests/fuzz.py damages a mapping and then opens a fresh handle by name (file
open, fstat, mmap, attach-slot claim) and runs the public API with 20 ms
timeouts: thorough, a few hundred cases a second.  This fuzzer keeps one
mapping and skips that open path (fuzz.py keeps covering it).  Each case

* restores the saved image of the whole mapping (segment header, attach
  table, payload);
* damages it 1-4 times with fuzz.py's ``mutate`` (its strategies, its
  ``plausible`` values and its field tables): 9 damages in 10 in the attach
  table and the payload, 1 in 10 over the whole mapping with the header
  fields the core reads (``hwm``, ``lock``, ``max_slots``);
* binds a new core object over the same Mapping, so that the C layout checks
  run again (``_core.Ring._bind``, ``_core.Topic._bind``, ``_core.Table._bind``,
  ``_core.HeapCore(...)``, ``_core.Lock``/``RWLock``/``Semaphore``, the
  event and condition functions), and runs the kind's core operations with
  timeout 0 (the try-forms), releasing what it took.

Every failure must be a ShmkitError (or the KeyError of a key the damage made
unreachable).  Anything else, a signal, or a case outliving its SIGALRM
interval timer (fuzz.py's ``watchdog``/``watch``) fails the run, which prints
the kind, seed, case, the damage, and the command that replays it.

Kinds: every object with checks in the C core.  ``queue`` is a ring bound with
an item limit (``max_items``), the path Queue(maxsize=...) takes; a Queue
without maxsize is the ``channel`` ring at core level (its pickles are Python's
and fuzz.py covers them).  Struct, Array and a raw Segment have no checks
beyond the segment header and the attach table, which every open runs: for
them each case opens a second handle by name over the damaged file (half the
damage goes to every header field), uses it with timeout 0 and closes it.

    python tests/fuzz_core.py run KIND NAME SEED CASES [FIRST]   # run / replay
    FUZZ_TRACE=1 python tests/fuzz_core.py run ...               # print each case's damage
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fuzz  # noqa: E402  (its SRC honours SHMKIT_TEST_PATH)

KINDS = ["segment", "struct", "array", "service", "mutex", "rwlock", "event", "semaphore",
         "condition", "channel", "queue", "store", "heap", "topic"]
CASE_SECONDS = float(os.environ.get("SHMKIT_CORE_FUZZ_CASE_SECONDS", "10"))
# header fields the core itself reads (attach.c's hwm, the segment lock, the
# slot count that bounds the attach table)
CORE_HEADER = ("seg.hwm", "seg.lock", "seg.max_slots")

Ops = Iterator[tuple[str, Callable[[], Any]]]


# -- per kind: bind a core object over the mapping and run its operations --


def _loan(obj: Any, rng: random.Random) -> None:
    """A loan of a ring or topic: reserve, write in place, then send or abandon
    (or, one time in ten, leave it to be dropped unsent)."""
    loan = obj.loan(rng.choice([0, 1, 8, rng.randrange(300)]), timeout=0)
    with memoryview(loan.buffer) as mv:  # released before the send
        mv[:8] = b"\xa5" * min(8, mv.nbytes)
    r = rng.random()
    if r < 0.6:
        loan.send()
    elif r < 0.9:
        loan.abandon()


class CoreKind:
    """setup(name) -> public object (fuzz.py's); bind(obj, seg) -> core state;
    ops(state, rng) -> (op, fn) pairs; unbind(state) after the ops."""

    def __init__(self, setup: Callable, bind: Callable, ops: Callable,
                 unbind: Callable = lambda st: None, allowed: Callable = lambda op: (),
                 raw: bool = False) -> None:
        self.setup, self.bind, self.ops, self.unbind = setup, bind, ops, unbind
        self.allowed = allowed  # op -> exception classes that are the caller's (IndexError)
        # raw: the checks are the segment header's (opened by name each case), so
        # damage goes to every header field, not only those the core reads
        self.raw = raw


_STORE_WRITES = ("setitem", "add", "batch", "update", "vacuum", "clear")  # the ops that allocate


def _kinds() -> dict:
    import shmkit
    from shmkit import _core
    from shmkit import store as store_mod
    pub = fuzz._kinds()

    def where(obj: Any, what: str) -> tuple:
        return obj._m, obj._base, f"{what} {obj._seg.name!r}"

    # sync ------------------------------------------------------------------
    def mutex_bind(obj, seg):
        m, base, what = where(obj, "mutex")
        return _core.Lock(m, base, what)

    def mutex_ops(lk, rng):
        def take():
            if lk.acquire(True, 0):
                lk.locked()
                lk.owner_token
                lk.release()
        yield "acquire", take
        yield "nonblocking", lambda: lk.acquire(False) and lk.release()
        yield "locked", lk.locked
        yield "owner", lambda: lk.owner_token
        yield "waiters", lambda: lk.has_waiters
        yield "token_alive", lambda: _core.token_alive(lk.mapping, lk.owner_token)
        yield "owner_pid", lambda: _core.token_owner_pid(lk.mapping, lk.owner_token)

    def rwlock_bind(obj, seg):
        m, base, what = where(obj, "rwlock")
        return _core.RWLock(m, base, what)

    def rwlock_ops(rw, rng):
        def read():
            for _ in range(rng.choice([1, 2])):
                if not rw.acquire_read(0):
                    return
                try:
                    rw.writer_token
                finally:
                    rw.release_read()

        def write():
            if rw.acquire_write(0):
                rw.release_write()

        def write_steps():
            ticket = rng.randrange(1, 1 << 20)
            if rw._write_begin(ticket):
                if rw._write_finish(ticket):
                    rw.release_write()
                else:
                    rw._write_abandon(ticket)
        for op, fn in (("read", read), ("write", write), ("write_steps", write_steps)):
            yield op, fn
        yield "writer", lambda: rw.writer_token

    def event_bind(obj, seg):
        return where(obj, "event")

    def event_ops(st, rng):
        m, base, what = st
        auto = rng.random() < 0.5
        yield "wait0", lambda: _core.event_wait(m, base, 0, auto, what)
        yield "set", lambda: _core.event_set(m, base, auto)
        yield "wait", lambda: _core.event_wait(m, base, 0, auto, what)
        yield "clear", lambda: _core.event_clear(m, base)
        yield "set", lambda: _core.event_set(m, base, not auto)
        yield "wait", lambda: _core.event_wait(m, base, 0, not auto, what)

    def sem_bind(obj, seg):
        m, base, what = where(obj, "semaphore")
        return _core.Semaphore(m, base, what)

    def sem_ops(sem, rng):
        def take():
            n = 0
            try:
                for _ in range(rng.choice([1, 2, 4])):
                    if not sem.acquire(True, 0):
                        break
                    n += 1
                sem.value
                sem.held
            finally:
                if n:
                    sem.release(n)
        yield "acquire", take
        yield "nonblocking", lambda: sem.acquire(False) and sem.release()
        yield "value", lambda: sem.value
        yield "waiters", lambda: sem.waiters
        yield "maximum", lambda: sem.maximum
        yield "held", lambda: sem.held

    def cond_bind(obj, seg):
        m, base, what = where(obj, "condition")
        return m, base, what, _core.Lock(m, base, what)

    def cond_ops(st, rng):
        m, base, what, lk = st

        def held():
            if not lk.acquire(True, 0):
                return
            try:
                _core.cond_wait(m, base, 0, what)  # releases and re-takes the lock
                _core.cond_notify(m, base, rng.choice([1, 2, 1 << 30]), what)
            finally:
                lk.release()

        def waitset():  # aio.Condition.wait's steps: enter holding, release, re-take
            if not lk.acquire(True, 0):
                return
            holding = True
            try:
                seq0 = _core.cond_enter(m, base)  # counts this waiter, releases the mutex
                holding = False
                desc = (_core.W_COND, m, base, seq0)
                _core.wait_ready([desc], 0, False)
                holding = lk.acquire(True, 0)
                if holding and not _core.cond_take(m, base, seq0):
                    _core.cond_leave(m, base, seq0, rng.random() < 0.5)
            finally:
                if holding:
                    lk.release()
        yield "wait_notify", held
        yield "sleepers", lambda: _core.cond_sleepers(m, base)
        yield "waitset", waitset
        yield "wait_ready", lambda: _core.wait_ready([(_core.W_COND, m, base, 0),
                                                      (_core.W_LOCK, m, base, 0)], 0)

    # ring ------------------------------------------------------------------
    def ring_bind(obj, seg):
        r = _core.Ring()
        r._bind(seg._mapping, seg._hsize, seg.name)
        return r

    def ring_unbind(r):
        r._unbind()

    def ring_ops(r, rng):
        def msg():
            return rng.randbytes(rng.choice([0, 1, 8, rng.randrange(300)]))
        yield "props", lambda: (r.capacity, r.max_message, r.depth, r.sending_closed)
        yield "send_nowait", lambda: r.send_nowait(msg())
        yield "send", lambda: r.send(msg(), timeout=0)
        yield "send_many", lambda: r.send_many([msg() for _ in range(rng.randrange(1, 5))],
                                               timeout=0)
        yield "recv_nowait", r.recv_nowait
        yield "recv", lambda: r.recv(timeout=0, stop_when_no_senders=rng.random() < 0.5)
        # a buffer of max_message bytes: a longer record is damage, not the caller's error
        yield "recv_into", lambda: r.recv_into(bytearray(r.max_message), timeout=0)
        yield "recv_many", lambda: r.recv_many(rng.randrange(1, 6), timeout=0)

        def take():
            v = r._take(timeout=0, nowait=rng.random() < 0.5, redeliver=rng.random() < 0.5)
            try:
                bytes(memoryview(v)[:16]) if sys.version_info >= (3, 12) else v.nbytes
            finally:
                v.release()
        yield "take", take
        yield "loan", lambda: _loan(r, rng)
        yield "stats", r._stats
        yield "wait_ready", lambda: _core.wait_ready([(_core.W_RING_DATA, r, 0, 0),
                                                      (_core.W_RING_SPACE, r, 0, 64)], 0)
        if rng.random() < 0.1:
            yield "close_sending", r._close_sending
            yield "wake_all", r._wake_all

    def queue_setup(n):
        q = shmkit.Queue(maxsize=12, name=n, capacity=8192, create=True)
        for i in range(10):
            q.put({"i": i, "s": "x" * i})
        for _ in range(3):
            q.get()
        return q

    def heap_setup(n):
        # fuzz.py's heap with a small handle table: the default's 2 MiB of
        # entries would make restoring the image dominate every case
        h = shmkit.Heap(n, size=64 << 10, max_size=256 << 10, max_blocks=256, create=True)
        for i in range(20):
            hd = h.put(bytes([i]) * (10 + 37 * i))
            if i % 4 == 0:
                h.free(hd)
        return h

    # topic -----------------------------------------------------------------
    def topic_bind(obj, seg):
        t = _core.Topic()
        t._bind(seg._mapping, seg._hsize, seg.name)
        return t, []

    def topic_unbind(st):
        t, subs = st
        for s in subs:
            try:
                s.close()
            except shmkit.ShmkitError:
                pass
        t._unbind()

    def topic_ops(st, rng):
        t, subs = st
        yield "props", lambda: (t.capacity, t.max_message, t.history, t.overflow,
                                t.max_subscribers, t.published)
        # a history the topic keeps (as read now): a longer one is the caller's ValueError
        yield "subscribe", lambda: subs.append(t._subscribe(
            _core.TopicSubscriber, rng.choice([None, 0, rng.randrange(t.history + 1)])))
        for _ in range(rng.randrange(1, 4)):
            yield "publish_nowait", lambda: t.publish_nowait(rng.randbytes(rng.randrange(300)))
        yield "publish", lambda: t.publish(rng.randbytes(rng.randrange(300)), timeout=0)
        yield "publish_many", lambda: t.publish_many(
            [rng.randbytes(rng.randrange(300)) for _ in range(rng.randrange(40))], timeout=0)

        def recv():
            for s in subs:
                s.recv_nowait()
                s.recv(timeout=0)
                s.recv_many(rng.choice([1, 3, 1000]), timeout=0)
                (s.lag, s.received, s.missed, s.index, s.closed)

        def take():
            for s in subs:
                v = s._take(timeout=0, nowait=True)
                try:
                    v.intact
                    v.nbytes
                finally:
                    v.release()
        yield "recv", recv
        yield "take", take
        yield "loan", lambda: _loan(t, rng)
        yield "stats", t._stats
        if subs and rng.random() < 0.3:
            yield "unsubscribe", lambda: subs.pop().close()
        if rng.random() < 0.1:
            yield "wake_all", t._wake_all

    def _raw(vtype, data, body_len=0):
        return bytearray(body_len)  # the buffer the core fills with the array's bytes

    # store -----------------------------------------------------------------
    def store_bind(obj, seg):
        tb = _core.Table()
        # array values come back as plain buffers: parsing their headers is
        # store.py's Python, which fuzz.py covers; here it would cost most of a case
        tb._bind(seg._mapping, seg._hsize, encode=store_mod._encode_plain,
                 decode=_raw, timeout=0, read_timeout=0)
        return tb

    def store_ops(tb, rng):
        keys = [f"k{i}" for i in range(60)] + list(range(40)) + [b"b1"]
        for k in rng.sample(keys, 12):
            yield "get", lambda k=k: tb.get(k)
        yield "getitem", lambda: tb[rng.choice(keys)]
        yield "get_many", lambda: tb.get_many(rng.sample(keys, 5), None)
        yield "get_into", lambda: tb.get_into(rng.choice(keys), bytearray(64))
        yield "nbytes", lambda: tb.nbytes(rng.choice(keys))
        yield "locate", lambda: tb._locate(rng.choice(keys))

        def view():
            v, _, _ = tb._view(rng.choice(keys))
            v._release()
        yield "view", view
        for k in rng.sample(keys, 4):
            yield "setitem", lambda k=k: tb.__setitem__(k, b"n" * rng.randrange(300))
        yield "add", lambda: tb.add(rng.choice(keys), "a" * rng.randrange(50))
        for k in rng.sample(keys, 2):
            yield "delitem", lambda k=k: tb.__delitem__(k)
        yield "pop", lambda: tb.pop(rng.choice(keys), None)
        yield "contains", lambda: rng.choice(keys) in tb
        yield "len", lambda: len(tb)
        yield "scan", lambda: tb._scan(rng.randrange(0, 64), rng.randrange(0, 8), 16,
                                       rng.randrange(0, 4))

        def batch():
            tb._batch_begin()
            commit = False
            try:
                for k in rng.sample(keys, 3):
                    tb[k] = k
                if rng.random() < 0.5:  # a read probes the staged puts; else the commit does
                    tb.pop(rng.choice(keys), None)
                commit = rng.random() < 0.8
            finally:
                tb._batch_end(commit)
        yield "batch", batch
        yield "update", lambda: tb.update({k: k for k in rng.sample(keys, 3)},
                                          kw=b"u" * rng.randrange(100))
        yield "stats", tb._stats
        yield "verify", tb._verify
        def vacuum():  # Store.vacuum's steps
            tb._lock()
            try:
                tb._vacuum()
            finally:
                tb._unlock()
        if rng.random() < 0.2:
            yield "vacuum", vacuum
        if rng.random() < 0.05:
            yield "clear", tb.clear
        yield "flush", tb._flush

    # heap ------------------------------------------------------------------
    def heap_bind(obj, seg):
        return _core.HeapCore(seg._mapping, seg._hsize, seg.size, seg.name), []

    def heap_unbind(st):
        core, pins = st
        for p in pins:
            try:
                p.release()
            except shmkit.ShmkitError:
                pass
        core.close()

    def heap_ops(st, rng):
        core, pins = st
        values = [g << 32 | i for i in range(20) for g in (0, 1)]
        got: list = []

        def some():
            return rng.choice(got) if got and rng.random() < 0.5 else rng.choice(values)
        for v in rng.sample(values, 6):
            yield "size_of", lambda v=v: core.size_of(v, 0)
            yield "where", lambda v=v: core.where(v)
        def keep(v):  # a handle, or a negative ROOM_* code (compact / grow first)
            if v >= 0:
                got.append(v)
        yield "alloc", lambda: keep(core.alloc(rng.randrange(1, 3000), rng.random() < 0.5, 0))
        yield "realloc", lambda: keep(core.realloc(some(), rng.randrange(1, 2000),
                                                   rng.random() < 0.5, 0))

        def pin():
            p = core.pin(some(), 0)
            pins.append(p)
            bytes(p.view[:8])
            if rng.random() < 0.7:
                pins.remove(p)
                p.release()
        yield "pin", pin
        yield "pins_held", core.pins_held
        yield "free", lambda: core.free(some(), 0)
        yield "capacity", core.capacity
        yield "stats", lambda: core.stats(rng.random() < 0.8, 0)
        yield "verify", lambda: core.verify(0)
        if rng.random() < 0.3:
            yield "compact", lambda: core.compact_step(rng.random() < 0.5,
                                                       rng.choice([0, 1, 1 << 20]),
                                                       rng.randrange(1, 64), 0)
        if rng.random() < 0.1:
            # as Heap._grow asks: at most the max_size capacity() reports (beyond
            # it is the caller's ValueError), within the segment it resized first
            yield "grow", lambda: core.grow(min(rng.choice([0, 4096, 32 << 10, 64 << 10]),
                                                core.capacity()[1]), 0)

    # raw segment, struct, array ---------------------------------------------
    # Their only checks are the segment header's and the attach table's, run by
    # every open: each case opens a second handle by name over the damaged
    # file (the whole Python and C open path), uses it with timeout 0, closes it.
    def raw_bind(kind_name):
        return lambda obj, seg: pub[kind_name].open(seg.name)

    def raw_ops(kind_name):
        # fuzz.py's operations of the kind (run() sets its timeout T to 0), less
        # resize (it would change the file's size under the saved image) and, but
        # one case in ten, the walks of the whole attach table (0.1 ms each)
        def ops(h, rng):
            for op, fn in pub[kind_name].ops(h, rng):
                if op == "resize" or (op in ("info", "attachments") and rng.random() >= 0.1):
                    continue
                yield op, fn
        return ops

    def raw_unbind(h):
        h.close()

    def raw(kind_name):
        return CoreKind(pub[kind_name].setup, raw_bind(kind_name), raw_ops(kind_name),
                        raw_unbind, pub[kind_name].allowed, raw=True)

    # service: its header segment (counters and the worker table); the request
    # channel is the channel kind's
    def service_setup(n):
        svc = shmkit.Service(n, 1 << 16, create=True)
        svc._fuzz_worker = svc.worker()  # an entry in use
        return svc

    def service_ops(h, rng):
        yield "workers", h.workers
        yield "statistics", h.statistics
        if rng.random() < 0.1:  # a worker's start lists /dev/shm for dead callers' channels
            def serve():
                with h.worker() as w:
                    w.recv(timeout=0)
            yield "worker", serve

    def service_unbind(h):
        h.close()

    return {
        "segment": raw("segment"),
        "struct": raw("struct"),
        "array": raw("array"),
        "service": CoreKind(service_setup, lambda obj, seg: shmkit.Service.open(seg.name),
                            service_ops, service_unbind, raw=True),
        "mutex": CoreKind(pub["mutex"].setup, mutex_bind, mutex_ops),
        "rwlock": CoreKind(pub["rwlock"].setup, rwlock_bind, rwlock_ops),
        "event": CoreKind(pub["event"].setup, event_bind, event_ops),
        "semaphore": CoreKind(pub["semaphore"].setup, sem_bind, sem_ops),
        "condition": CoreKind(pub["condition"].setup, cond_bind, cond_ops),
        "channel": CoreKind(pub["channel"].setup, ring_bind, ring_ops, ring_unbind),
        "queue": CoreKind(queue_setup, ring_bind, ring_ops, ring_unbind),
        # bound here without a grow hook: a write the allocator cannot place
        # (the store full, or its free space made unusable by the damage) is
        # MemoryError("the store is full"), where store.py would grow it
        "store": CoreKind(pub["store"].setup, store_bind, store_ops,
                          allowed=lambda op: MemoryError if op in _STORE_WRITES else ()),
        "heap": CoreKind(heap_setup, heap_bind, heap_ops, heap_unbind),
        "topic": CoreKind(pub["topic"].setup, topic_bind, topic_ops, topic_unbind),
    }


# -- the child ------------------------------------------------------------


def _fields(kind_name: str, seg: Any) -> dict:
    """fuzz.py's field tables for the kind: header and attach table, payload."""
    if kind_name == "service":
        from shmkit import service
        h = seg._hsize
        table = service._OFF_TABLE
        entries = {f"worker{i}.{f}": (h + table + i * service._ENTRY + off, 8)
                   for i in range(3) for f, off in (("token", 0), ("rid", 8))}
        return {**fuzz.header_fields(seg), "svc.magic": (h, 4), "svc.format": (h + 4, 4),
                **{f"svc.count{i}": (h + 8 * i, 8) for i in range(1, 5)}, **entries}
    pub = fuzz._kinds()[{"queue": "channel"}.get(kind_name, kind_name)]
    return {**fuzz.header_fields(seg), **pub.fields(seg)}


def exercise(kind: CoreKind, obj: Any, seg: Any, rng: random.Random) -> tuple[list, bool]:
    """Bind the core object and run the operations; returns the unexpected
    errors and whether the damaged object could be bound at all."""
    from shmkit import ShmkitError
    bad: list = []
    try:
        state = kind.bind(obj, seg)
    except ShmkitError:
        return bad, False
    except Exception as e:  # noqa: BLE001
        return [f"bind: {type(e).__name__}: {e} {fuzz._where(e)}"], False
    try:
        for op, fn in kind.ops(state, rng):
            try:
                fn()
            except (ShmkitError, KeyError):
                pass
            except kind.allowed(op):
                pass
            except Exception as e:  # noqa: BLE001
                bad.append(f"{op}: {type(e).__name__}: {e} {fuzz._where(e)}")
    finally:
        try:
            kind.unbind(state)
        except ShmkitError:
            pass
        except Exception as e:  # noqa: BLE001
            bad.append(f"unbind: {type(e).__name__}: {e} {fuzz._where(e)}")
    return bad, True


def replay_command(kind_name: str, seed: int, case: int) -> str:
    return (f"FUZZ_TRACE=1 {os.path.basename(sys.executable)} tests/fuzz_core.py run "
            f"{kind_name} fuzzcore-replay {seed} 1 {case}")


def run(kind_name: str, name: str, seed: int, cases: int, first: int = 0) -> int:
    """The child: returns the number of cases with unexpected exceptions."""
    import warnings

    import shmkit
    from shmkit import _core
    fuzz.T = 0.0  # every operation, fuzz.py's too, with timeout 0
    kind = _kinds()[kind_name]
    obj = kind.setup(name)
    seg = fuzz._seg_of(obj)
    total = seg._hsize + seg.size
    view = memoryview(seg._mapping)
    image = bytes(view[:total])
    lo = _core.layouts["segment"]["attach_table"]
    fields = _fields(kind_name, seg)
    header = {k: v for k, v in fields.items()
              if kind.raw or k in CORE_HEADER or k.startswith("attach")}
    to_header = 0.5 if kind.raw else 0.1
    inner = {k: (off - lo, w) for k, (off, w) in fields.items() if off >= lo}
    sub = view[lo:total]
    trace = bool(os.environ.get("FUZZ_TRACE"))
    fuzz.watchdog()
    failures = bound = 0
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    for case in range(first, first + cases):
        crng = random.Random(seed * 1_000_003 + case)
        view[:total] = image
        what = []
        for _ in range(crng.choice([1, 1, 2, 4])):
            if crng.random() >= to_header:
                what.append(f"+{lo} " + fuzz.mutate(crng, sub, total - lo, inner))
            else:
                what.append(fuzz.mutate(crng, view, total, header))
        if trace:
            print(f"case {case}: {what}", flush=True, file=sys.stderr)
        fuzz.watch(CASE_SECONDS)
        bad, ok = exercise(kind, obj, seg, crng)
        bound += ok
        fuzz.watch(0)
        if bad:
            failures += 1
            print(f"{kind_name} seed {seed} case {case}: {what}: {bad[:3]}\n"
                  f"  replay: {replay_command(kind_name, seed, case)}", flush=True)
    elapsed = time.perf_counter() - t0
    view[:total] = image
    sub.release()
    view.release()
    for end in (obj.close, lambda: shmkit.unlink(name),
                lambda: kind_name == "service" and shmkit.unlink(name + ".requests")):
        try:
            end()
        except shmkit.ShmkitError:
            pass
    print(f"done {kind_name}: {cases} cases, {failures} with unexpected errors, {bound} "
          f"bound ({cases / max(elapsed, 1e-9):.0f} cases/s, {elapsed:.1f} s)", flush=True)
    return failures


def run_child(kind_name: str, name: str, seed: int, cases: int, timeout: float,
              first: int = 0, env: dict | None = None) -> tuple[int, str]:
    """Run one child (cases ``first`` .. ``first + cases - 1``); returns
    (returncode, output).  A child killed by the timeout reports -SIGALRM."""
    import signal
    import subprocess
    env = dict(env or os.environ)
    env["PYTHONPATH"] = fuzz.SRC + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-X", "faulthandler", __file__, "run", kind_name, name,
            str(seed), str(cases), str(first)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        err = e.stderr or b""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
        return -signal.SIGALRM, f"hung:\n{out[-3000:]}{err[-3000:]}"
    return proc.returncode, proc.stdout + proc.stderr


if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[1] != "run":
        sys.exit(__doc__)
    sys.path.insert(0, fuzz.SRC)
    sys.exit(1 if run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                      int(sys.argv[6]) if len(sys.argv) > 6 else 0) else 0)
