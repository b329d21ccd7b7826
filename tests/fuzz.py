"""A damage fuzzer for every kind of shmkit object: never a crash, a hang or a stray error.

For each kind a child program (so that a crash shows as a signal exit code)
creates the object, fills it, and keeps a copy of its whole mapping (segment
header, attach table, payload).  Each trial restores that copy, damages it
once or a few times, then opens a fresh handle by name and runs every
operation of the kind with short timeouts.  Every failure must be a
ShmkitError (or the KeyError of a key damage made unreachable); anything
else, a signal or a hang (a watchdog timer ends the child) fails the run.

Damage strategies (``mutate``):

* ``bit``     flip one bit anywhere in the mapping;
* ``u64``     a random or plausible u64 (an offset, a size, a small count, an
              extreme) at a random 8-aligned offset;
* ``bytes``   a burst of 1-32 random bytes at a random offset;
* ``field``   a plausible value in a chosen header field: the segment header
              and attach-table fields from ``shmkit._core.layouts``, and each
              kind's payload fields (ring header and roles from
              ``layouts["ring"]``, the sync payloads documented in sync.py,
              the heap header and handle table of heap.h, the store header of
              table.c).

Modes: ``idle`` damages the copy and then opens a fresh handle; ``busy`` does
the same while a hammer process opens the object and runs its operations in a
loop (it is killed at the end; if it died of a signal or raised a stray error
meanwhile, the run fails).

Queue payloads are pickles: the gets run here, in the fuzz child, never in the
test process, and an exception raised by ``pickle.loads`` on damaged bytes
(``UNPICKLE_ERRORS``) is expected from ``get`` alone.

    python tests/fuzz.py run KIND MODE NAME SEED CASES [FIRST]   # reproduce a failure
    FUZZ_TRACE=1 python tests/fuzz.py run ...               # print each case's damage
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("SHMKIT_TEST_PATH") or os.path.join(os.path.dirname(HERE), "src")
T = 0.02  # timeout of every blocking operation
UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                   ImportError, IndexError, KeyError, UnicodeDecodeError, OverflowError,
                   MemoryError, RecursionError, struct.error)

# -- fields ---------------------------------------------------------------


def _widths(table: dict) -> dict:
    """name -> (offset, width) from a layouts table (width 4 or 8 by the next field)."""
    items = sorted((v, k) for k, v in table.items()
                   if k not in ("format_version", "bytes") and isinstance(v, int))
    out = {}
    for i, (off, k) in enumerate(items):
        nxt = items[i + 1][0] if i + 1 < len(items) else off + 8
        out[k] = (off, 4 if nxt - off < 8 or off % 8 else 8)
    return out


def header_fields(seg: Any) -> dict:
    from shmkit import _core
    seg_l = _core.layouts["segment"]
    out = {f"seg.{k}": v for k, v in _widths(seg_l).items()
           if k not in ("layout", "attach_table")}
    out["seg.layout"] = (seg_l["layout"], 8)
    att = _core.layouts["attach_entry"]
    for slot in (0, 1, 2):
        base = seg_l["attach_table"] + slot * att["bytes"]
        for k, (off, w) in _widths(att).items():
            out[f"attach{slot}.{k}"] = (base + off, w)
    return out


def _payload(hsize: int, fields: dict) -> dict:
    return {k: (hsize + off, w) for k, (off, w) in fields.items()}


def _slots(prefix: str, base: int, n: int = 4) -> dict:
    return {f"{prefix}.slot{i}": (base + 8 * i, 8) for i in range(n)}


SYNC_FIELDS = {
    "mutex": {"lock": (0, 4)},
    "event": {"word": (0, 4)},
    "rwlock": {"wlock": (0, 4), "state": (4, 4), "left": (8, 4), **_slots("read", 64)},
    "semaphore": {"mutex": (0, 4), "value": (4, 4), "changes": (8, 4), "sleepers": (12, 4),
                  "maximum": (16, 4), **{f"undo{i}": (32 + 8 * i, 8) for i in range(8)},
                  **_slots("holds", 128)},
    "condition": {"mutex": (0, 4), "notify": (4, 4), "granted": (12, 4),
                  **_slots("sleepers", 64)},
}
# heap.h: header, then the handle table at 4096 (32-byte entries)
HEAP_FIELDS = {"magic": (8, 8), "table_off": (16, 8), "pins_off": (24, 8), "data_off": (32, 8),
               "max_units": (40, 8), "free_handle": (64, 8), "fresh": (72, 8),
               "used_units": (80, 8), "used_blocks": (88, 8), "free_units": (96, 8),
               "free_blocks": (104, 8), "cursor": (112, 8), "units": (120, 8),
               "bitmap0": (128, 8), "bitmap1": (136, 8), "pinbits0": (768, 8),
               **{f"entry{e}.{f}": (4096 + 32 * e + o, 8) for e in range(6)
                  for f, o in (("state", 0), ("unit", 8), ("nbytes", 16), ("link", 24))}}
# table.c THeader
STORE_FIELDS = {"epoch": (0, 8), "index": (8, 8), "seed": (16, 8), "heap_start": (24, 8),
                "heap_end": (32, 8), "lock": (64, 4), "state": (68, 4), "count": (72, 8),
                "tombstones": (80, 8), "used": (88, 8), "pending": (96, 8), "top": (104, 8),
                "journal": (112, 8), "journal_n": (120, 8),
                **{f"bin{b}": (192 + 8 * b, 8) for b in range(0, 104, 7)}}


def ring_fields() -> dict:
    from shmkit import _core
    out = _widths({k: v for k, v in _core.layouts["ring"].items() if k != "roles"})
    roles = _core.layouts["ring"]["roles"]
    out.update({f"roles{i}": (roles + 8 * i, 8) for i in range(16)})
    return out


def topic_fields(seg: Any) -> dict:
    from shmkit import _core
    lay = _core.layouts["topic"]
    out = _widths({k: v for k, v in lay.items() if k not in ("roles", "record_header")})
    subs = (lay["roles"] + 8 * seg._max_slots + 63) // 64 * 64
    for i in range(2):
        out.update({f"sub{i}.{k}": (subs + 64 * i + off, w)
                    for k, (off, w) in _widths(lay["subscriber"]).items()})
    return out


# -- values and damage ----------------------------------------------------


def plausible(rng: random.Random, total: int) -> int:
    """A value the object might really hold: an offset, a size, a count, an extreme."""
    r = rng.random()
    if r < 0.3:
        return rng.randrange(0, total + 4096) & ~rng.choice([0, 7, 15])
    if r < 0.5:
        return rng.choice([0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 48, 64, 511, 512, 4095,
                           4096, 4097, 65536])
    if r < 0.65:
        return rng.choice([2**63, 2**64 - 1, 2**64 - 16, 2**40, 2**32, 2**32 - 1, 2**31,
                           2**31 - 1, 2**63 - 1, 0x7FFFFFFF, 0x80000000,
                           0x80000005, 0xC0000401, 0x00000401])  # record states
    if r < 0.8:
        return rng.randrange(0, 600)
    return rng.getrandbits(64)


def mutate(rng: random.Random, view: memoryview, total: int, fields: dict) -> str:
    """Damage the mapping once; returns what was done (for the failure report)."""
    r = rng.random()
    if r < 0.15:
        off = rng.randrange(total)
        bit = 1 << rng.randrange(8)
        view[off] ^= bit
        return f"bit {bit} at {off}"
    if r < 0.3:
        off = rng.randrange(total - 8) & ~7
        v = plausible(rng, total)
        struct.pack_into("<Q", view, off, v)
        return f"u64 {v} at {off}"
    if r < 0.4:
        n = rng.randrange(1, 33)
        off = rng.randrange(total - n)
        view[off:off + n] = rng.randbytes(n)
        return f"{n} bytes at {off}"
    name = rng.choice(list(fields))
    off, width = fields[name]
    if off + width > total:
        return "nothing"
    v = plausible(rng, total)
    if rng.random() < 0.2:  # near the value already there
        old = int.from_bytes(view[off:off + width], "little")
        v = old + rng.choice([-1, 1, -16, 16, 1 << 32, -(1 << 32), 4096])
    v &= (1 << 8 * width) - 1
    view[off:off + width] = v.to_bytes(width, "little")
    return f"field {name} = {v}"


# -- kinds ----------------------------------------------------------------


class Kind:
    def __init__(self, setup: Callable, open_: Callable, ops: Callable, fields: Callable,
                 allowed: Callable | None = None) -> None:
        self.setup, self.open, self.ops, self.fields = setup, open_, ops, fields
        self.allowed = allowed or (lambda op: ())


def _seg_of(obj: Any) -> Any:
    import shmkit
    return obj if isinstance(obj, shmkit.Segment) else obj._seg


def _kinds() -> dict:
    import numpy as np
    import shmkit

    def segment_ops(h, rng):
        yield "read", lambda: h.read(64, rng.randrange(0, 8192))
        yield "write", lambda: h.write(b"x" * 16, rng.randrange(0, 8192))
        yield "buf", lambda: bytes(h.buf[:32])
        yield "ndarray", lambda: h.ndarray("u8", None, 0).sum()
        yield "info", h.info
        yield "attachments", h.attachments
        yield "layout", lambda: h.layout
        yield "lock", lambda: h.lock.acquire(timeout=T) and h.lock.release()
        yield "resize", lambda: h.resize(rng.choice([8192, 16384, 12288]), timeout=T)

    def mutex_ops(h, rng):
        yield "acquire", lambda: h.acquire(timeout=T) and h.release()
        yield "nowait", lambda: (h.acquire_nowait(), h.release())
        yield "locked", h.locked
        yield "holder", lambda: h.holder_pid
        yield "statistics", h.statistics
        yield "release", h.release

    def rwlock_ops(h, rng):
        def read():
            with h.read(timeout=T):
                pass

        def write():
            with h.write(timeout=T):
                pass
        yield "read", read
        yield "write", write
        yield "statistics", h.statistics

    def event_ops(h, rng):
        yield "set", h.set
        yield "is_set", h.is_set
        yield "wait", lambda: h.wait(T)
        yield "clear", h.clear
        yield "wait0", lambda: h.wait(0)
        yield "statistics", h.statistics

    def semaphore_ops(h, rng):
        yield "acquire", lambda: h.acquire(timeout=T) and h.release()
        yield "nowait", lambda: (h.acquire_nowait(), h.release())
        yield "release", h.release
        yield "statistics", h.statistics

    def condition_ops(h, rng):
        def waited():
            if h.acquire(timeout=T):
                try:
                    h.wait(T)
                    h.notify()
                    h.notify_all()
                finally:
                    h.release()
        yield "wait", waited
        yield "statistics", h.statistics

    def struct_ops(h, rng):
        yield "read", lambda: (int(h.record["a"]), float(h.record["b"]))
        yield "write", lambda: h.record.__setitem__("a", rng.randrange(100))
        yield "lock", lambda: h.lock.acquire(timeout=T) and h.lock.release()
        yield "statistics", h.statistics

    def array_ops(h, rng):
        yield "sum", lambda: h.array.sum()
        yield "write", lambda: h.array.__setitem__(rng.randrange(100), 7)
        yield "shape", lambda: h.shape
        yield "lock", lambda: h.lock.acquire(timeout=T) and h.lock.release()
        yield "statistics", h.statistics

    def channel_ops(h, rng):
        for _ in range(3):
            yield "send", lambda: h.send(rng.randbytes(rng.randrange(0, 300)), timeout=T)
        yield "recv", lambda: h.recv(timeout=T)
        yield "recv_nowait", h.recv_nowait
        yield "recv_view", lambda: bytes(h.recv_view(timeout=T, redeliver=rng.random() < 0.5))
        yield "recv_array", lambda: h.recv_array("u1", timeout=T)
        yield "statistics", h.statistics
        yield "close_sending", h.close_sending if rng.random() < 0.1 else h.statistics

    def queue_ops(h, rng):
        yield "put", lambda: h.put({"k": rng.random(), "b": b"x" * rng.randrange(200)},
                                   timeout=T)
        yield "get", lambda: h.get(timeout=T)
        yield "get_nowait", h.get_nowait
        yield "qsize", h.qsize
        yield "empty", h.empty
        yield "full", h.full
        yield "statistics", h.statistics

    def heap_ops(h, rng):
        handles = getattr(h, "_fuzz_handles", [])
        for i in range(12):
            hd = shmkit.Handle(i, rng.choice([0, 1, 2]))
            yield "read", lambda hd=hd: h.read(hd, timeout=T)
            yield "size_of", lambda hd=hd: h.size_of(hd)
        for hd in handles[:10]:
            yield "read", lambda hd=hd: h.read(hd, timeout=T)
        yield "alloc", lambda: h.alloc(rng.randrange(1, 3000), timeout=T)
        yield "put", lambda: h.put(b"y" * rng.randrange(1, 500), timeout=T)
        if handles:
            hd = rng.choice(handles)
            yield "write", lambda: h.write(hd, b"z" * 8, timeout=T)
            yield "realloc", lambda: h.realloc(hd, rng.randrange(1, 2000), timeout=T)

            def pinned():
                with h.pin(hd, timeout=T) as p:
                    bytes(p[:8])
            yield "pin", pinned
            yield "free", lambda: h.free(rng.choice(handles), timeout=T)
        yield "statistics", lambda: h.statistics(timeout=T)
        yield "verify", lambda: h.verify(timeout=T)
        if rng.random() < 0.3:
            yield "compact", lambda: h.compact(timeout=T)

    def store_ops(h, rng):
        keys = [f"k{i}" for i in range(60)] + list(range(40))
        for k in rng.sample(keys, 30):
            yield "get", lambda k=k: h.get(k)
        for k in rng.sample(keys, 8):
            yield "setitem", lambda k=k: h.__setitem__(k, b"n" * rng.randrange(300))
        for k in rng.sample(keys, 4):
            yield "delitem", lambda k=k: h.__delitem__(k)
        yield "contains", lambda: rng.choice(keys) in h
        yield "len", lambda: len(h)
        yield "items", lambda: list(h.items())

        def batch():
            with h.batch():
                for k in rng.sample(keys, 6):
                    h[k] = k
                h.pop(rng.choice(keys), None)
        yield "batch", batch
        yield "statistics", h.statistics
        yield "verify", h.verify
        if rng.random() < 0.2:
            yield "vacuum", h.vacuum

    rec = np.dtype([("a", "<i8"), ("b", "<f8"), ("c", "S24")])

    def sync(cls, key, **kw):
        # a bare release() of what was never acquired: the caller's ValueError
        # (beyond the maximum) or RuntimeError (not held)
        return Kind(lambda n: cls(n, create=True, **kw), lambda n: cls(n, create=False),
                    {"mutex": mutex_ops, "rwlock": rwlock_ops, "event": event_ops,
                     "semaphore": semaphore_ops, "condition": condition_ops}[key],
                    lambda seg: _payload(seg._hsize, SYNC_FIELDS[key]),
                    allowed=lambda op: ValueError if op == "release" else ())

    def heap_setup(n):
        h = shmkit.Heap(n, size=64 << 10, create=True)
        for i in range(20):
            hd = h.put(bytes([i]) * (10 + 37 * i))
            if i % 4 == 0:
                h.free(hd)
        return h

    def heap_open(n):
        h = shmkit.Heap(n, create=False)
        h._fuzz_handles = [shmkit.Handle(i, g) for i in range(20) for g in (0, 1)]
        return h

    def store_setup(n):
        st = shmkit.Store(n, size=64 << 10, create=True, timeout=1.0)
        for i in range(60):
            st[f"k{i}"] = f"v{i}" * (i % 9)
            st[i % 40] = np.arange(i % 11)
        for i in range(0, 60, 5):
            del st[f"k{i}"]
        return st

    def channel_setup(n):
        ch = shmkit.Channel(n, 8192, create=True)
        for i in range(20):
            ch.send(bytes([i]) * (i * 13))
        for _ in range(5):
            ch.recv()
        return ch

    def queue_setup(n):
        q = shmkit.Queue(name=n, capacity=8192, create=True)
        for i in range(15):
            q.put({"i": i, "s": "x" * i})
        for _ in range(4):
            q.get()
        return q

    def topic_setup(n):
        t = shmkit.Topic(n, 8192, history=4, overflow="overwrite", create=True)
        s = t.subscribe()
        for i in range(40):
            t.publish(bytes([i]) * (i * 13))
        t._fuzz_sub = s  # a subscriber entry in use, with its cursor
        return t

    def topic_ops(h, rng):
        subs: list = []
        yield "subscribe", lambda: subs.append(h.subscribe(history=rng.randrange(0, 5)))
        for _ in range(3):
            yield "publish", lambda: h.publish(rng.randbytes(rng.randrange(0, 300)), timeout=T)
        yield "recv", lambda: subs and subs[0].recv(timeout=T)
        yield "recv_view", lambda: subs and subs[0].recv_view(timeout=T).release()
        yield "statistics", h.statistics

    ring = lambda seg: _payload(seg._hsize, ring_fields())  # noqa: E731
    return {
        "segment": Kind(lambda n: shmkit.Segment.create(n, 8192, max_size=1 << 20),
                        lambda n: shmkit.Segment.open(n), segment_ops, lambda seg: {},
                        # an offset past a (damaged, smaller) size is the caller's IndexError
                        allowed=lambda op: IndexError if op in ("read", "write", "ndarray") else ()),
        "mutex": sync(shmkit.Mutex, "mutex"),
        "rwlock": sync(shmkit.RWLock, "rwlock"),
        "event": sync(shmkit.Event, "event"),
        "semaphore": sync(shmkit.Semaphore, "semaphore", value=3),
        "condition": sync(shmkit.Condition, "condition"),
        "struct": Kind(lambda n: shmkit.Struct(n, rec, create=True),
                       lambda n: shmkit.Struct(n, rec, create=False), struct_ops,
                       lambda seg: {}),
        "array": Kind(lambda n: shmkit.Array(n, "<f8", (100,), create=True),
                      lambda n: shmkit.Array(n, "<f8", (100,), create=False), array_ops,
                      lambda seg: {}),
        "channel": Kind(channel_setup, lambda n: shmkit.Channel(n, create=False),
                        channel_ops, ring),
        "queue": Kind(queue_setup, lambda n: shmkit.Queue(name=n, create=False), queue_ops,
                      ring, allowed=lambda op: UNPICKLE_ERRORS if op.startswith("get") else ()),
        "store": Kind(store_setup, lambda n: shmkit.Store(n, create=False, timeout=T),
                      store_ops, lambda seg: _payload(seg._hsize, STORE_FIELDS)),
        # write puts 8 bytes into a block whose size the operations' own
        # realloc(1..2000) may have made smaller: IndexError ("realloc() it
        # first") is the documented answer, damage or not
        "heap": Kind(heap_setup, heap_open, heap_ops,
                     lambda seg: _payload(seg._hsize, HEAP_FIELDS),
                     allowed=lambda op: IndexError if op == "write" else ()),
        "topic": Kind(topic_setup, lambda n: shmkit.Topic(n, create=False), topic_ops,
                      lambda seg: _payload(seg._hsize, topic_fields(seg))),
    }


KINDS = ["segment", "mutex", "rwlock", "event", "semaphore", "condition", "struct", "array",
         "channel", "queue", "store", "heap", "topic"]

# -- the child ------------------------------------------------------------


def _where(e: BaseException) -> str:
    """The innermost frames of e's traceback, for the failure report."""
    import traceback
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    return "at " + " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                              for f in reversed(frames))


def exercise(kind: Kind, name: str, rng: random.Random) -> list:
    """Open a fresh handle and run every operation; returns the unexpected exceptions."""
    import warnings

    from shmkit import ShmkitError
    bad: list = []
    try:
        h = kind.open(name)
    except ShmkitError:
        return bad
    except Exception as e:  # noqa: BLE001
        return [f"open: {type(e).__name__}: {e} {_where(e)}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for op, fn in kind.ops(h, rng):
                try:
                    fn()
                except (ShmkitError, KeyError, TimeoutError):
                    pass
                except kind.allowed(op):
                    pass
                except RuntimeError as e:  # releasing what this handle does not hold
                    if op != "release":
                        bad.append(f"{op}: {type(e).__name__}: {e}")
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{op}: {type(e).__name__}: {e} {_where(e)}")
        finally:
            try:
                h.close()
            except ShmkitError:
                pass
            except Exception as e:  # noqa: BLE001
                bad.append(f"close: {type(e).__name__}: {e}")
    return bad


def watchdog() -> None:
    """Make a case that outlives ``watch(seconds)`` a hang: SIGALRM then has
    faulthandler print every thread's stack and, chained to the default
    action, end the process with a signal that the parent reports.  Arming an
    interval timer costs microseconds, where faulthandler's own
    dump_traceback_later starts and joins a thread for every case."""
    faulthandler.register(signal.SIGALRM, all_threads=True, chain=True)


def watch(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, seconds)  # 0 disarms


def hammer(kind_name: str, name: str, seed: int) -> None:
    """The busy mode's other process: open and run the operations until killed."""
    sys.path.insert(0, SRC)
    kind = _kinds()[kind_name]
    rng = random.Random(seed)
    watchdog()
    while True:
        watch(20.0)
        bad = exercise(kind, name, rng)
        if bad:
            print(f"hammer: {bad[:3]}", file=sys.stderr, flush=True)
            os._exit(3)


def _hammer_proc(kind_name: str, name: str, seed: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-X", "faulthandler", __file__, "hammer", kind_name, name, str(seed)],
                            env=env, stderr=subprocess.PIPE, text=True)


def run(kind_name: str, mode: str, name: str, seed: int, cases: int,
        case_seconds: float = 20.0, first: int = 0) -> int:
    """The child: returns the number of cases with unexpected exceptions."""
    sys.path.insert(0, SRC)
    import shmkit
    kind = _kinds()[kind_name]
    def prepare():
        obj = kind.setup(name)
        seg = _seg_of(obj)
        total = seg._hsize + seg.size
        view = memoryview(seg._mapping)
        return obj, seg, total, view, bytes(view[:total])

    obj, seg, total, view, image = prepare()
    fields = {**header_fields(seg), **kind.fields(seg)}
    path = seg.path
    helper = _hammer_proc(kind_name, name, seed) if mode == "busy" else None
    watchdog()
    failures = 0
    for case in range(first, first + cases):
        crng = random.Random(seed * 1_000_003 + case)
        if not os.path.exists(path):  # damage let a handle think it was the last one
            view.release()
            obj.close()
            obj, seg, total, view, image = prepare()
        view[:total] = image
        what = [mutate(crng, view, total, fields) for _ in range(crng.choice([1, 1, 2, 4]))]
        if os.environ.get("FUZZ_TRACE"):
            print(f"case {case}: {what}", flush=True, file=sys.stderr)
        watch(case_seconds)
        bad = exercise(kind, name, crng)
        watch(0)
        if bad:
            failures += 1
            print(f"{kind_name} {mode} seed {seed} case {case}: {what}: {bad[:3]}", flush=True)
        if helper is not None and helper.poll() is not None:
            print(f"hammer exited {helper.returncode} at case {case}: {what}: "
                  f"{helper.stderr.read()[-2000:]}", flush=True)
            return failures + 1
    if helper is not None:
        helper.kill()
        helper.wait()
    view[:total] = image
    view.release()
    for end in (obj.close, lambda: shmkit.unlink(name)):
        try:
            end()
        except shmkit.ShmkitError:
            pass
    print(f"done {kind_name} {mode}: {cases} cases, {failures} with unexpected errors",
          flush=True)
    return failures


def run_child(kind_name: str, mode: str, name: str, seed: int, cases: int,
              timeout: float, first: int = 0) -> tuple[int, str, int]:
    """Run one child (cases ``first`` .. ``first + cases - 1``); returns
    (returncode, output, cases)."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-X", "faulthandler", __file__, "run", kind_name, mode, name,
            str(seed), str(cases), str(first)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        err = e.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
        return -signal.SIGALRM, f"hung:\n{out[-3000:]}{err[-3000:]}", 0
    return proc.returncode, proc.stdout + proc.stderr, cases


if __name__ == "__main__":
    if sys.argv[1] == "hammer":
        hammer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    sys.exit(1 if run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                      int(sys.argv[6]), first=int(sys.argv[7]) if len(sys.argv) > 7 else 0)
             else 0)
