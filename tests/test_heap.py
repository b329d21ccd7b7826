"""The heap: handles, pins, compaction, many processes, crashes and corruption."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shmkit
from shmkit import _core
from shmkit.errors import (
    BusyError,
    ClosedError,
    CorruptError,
    FormatVersionError,
    HeapFullError,
    NotFoundError,
    PinnedError,
    ReadOnlyError,
    ShmkitError,
    StaleHandleError,
    Timeout,
    WrongKindError,
)
from shmkit.heap import ArrayPin, Handle, Heap

from conftest import SPAWN, SRC, interrupt_at_bytecode, run_python, spawn


def pattern(h: Handle, n: int, start: int = 0) -> bytes:
    """The bytes the tests write into the block of ``h``: checkable at any prefix."""
    seed = (h.index * 131 + h.generation) & 0xFF
    return ((np.arange(start, start + n, dtype=np.uint64) * 7 + seed) & 0xFF).astype(
        np.uint8).tobytes()


def fill(heap: Heap, h: Handle, start: int = 0) -> None:
    with heap.pin(h) as view:
        view[start:] = pattern(h, len(view) - start, start)


def check(heap: Heap, h: Handle, n: int | None = None) -> None:
    with heap.pin(h) as view:
        n = len(view) if n is None else n
        assert bytes(view[:n]) == pattern(h, n), f"content of {h} damaged"


@pytest.fixture
def heap(name):
    with Heap(name, size=1 << 20, max_size=1 << 20) as h:
        yield h


# -- handles -------------------------------------------------------------------


def test_handle_value_semantics():
    h = Handle(5, 0xDEADBEEF)
    assert (h.index, h.generation) == (5, 0xDEADBEEF)
    assert len(bytes(h)) == 8 and Handle.from_bytes(bytes(h)) == h
    assert Handle.from_bytes(bytearray(bytes(h))) == h
    assert Handle.from_bytes(memoryview(bytes(h))) == h
    assert Handle.from_int(int(h)) == h
    assert pickle.loads(pickle.dumps(h)) == h
    assert {h: 1}[Handle(5, 0xDEADBEEF)] == 1 and h != Handle(5, 1) and h != int(h)
    assert repr(h) == "Handle(index=5, generation=3735928559)"
    with pytest.raises(ValueError, match="8 bytes"):
        Handle.from_bytes(b"1234567")
    with pytest.raises(ValueError):
        Handle(-1, 0)
    with pytest.raises(ValueError):
        Handle.from_int(1 << 64)


def test_alloc_write_read_free(heap):
    h = heap.alloc(100)
    assert heap.size_of(h) == 100
    fill(heap, h)
    check(heap, h)
    assert heap.write(h, b"xyz", 10) == 3 and heap.read(h)[10:13] == b"xyz"
    with pytest.raises(IndexError):
        heap.write(h, b"xyz", 99)
    z = heap.alloc(50, zero=True)
    assert heap.read(z) == bytes(50)
    p = heap.put(b"payload")
    assert heap.read(p) == b"payload" and heap.size_of(p) == 7
    e = heap.alloc(0)
    assert heap.read(e) == b"" and heap.size_of(e) == 0
    for x in (h, z, p, e):
        heap.free(x)
    s = heap.statistics()
    assert s["blocks"] == 0 and s["used"] == 0 and s["free"] == s["size"] == 1 << 20
    assert s["allocs"] == 4 and s["frees"] == 4
    heap.verify()


def test_stale_and_forged_handles_never_reach_data(heap, names):
    a = heap.put(b"a" * 32)
    heap.free(a)
    b = heap.put(b"b" * 32)  # reuses the entry with a new generation
    assert b.index == a.index and b.generation != a.generation
    for call in (heap.read, heap.free, heap.size_of, heap.pin, lambda h: heap.realloc(h, 8),
                 lambda h: heap.pin_array(h)):
        with pytest.raises(StaleHandleError, match="stale"):
            call(a)
    with pytest.raises(StaleHandleError, match="out of range"):
        heap.read(Handle(heap.statistics()["max_blocks"], 1))
    with pytest.raises(StaleHandleError, match="never allocated"):
        heap.read(Handle(500, 1))
    rng = random.Random(1)
    for _ in range(2000):  # forged handles: random bits
        forged = Handle.from_int(rng.getrandbits(64) & ~(0xFFFFFFF0))  # index 0..15
        if forged == b:
            continue
        with pytest.raises(StaleHandleError):
            heap.read(forged)
    with Heap(names(), size=1 << 16) as other:  # a handle from another heap
        c = other.put(b"c" * 32)
        assert c.index == b.index
        with pytest.raises(StaleHandleError):
            heap.read(c)
    with pytest.raises(TypeError, match="Handle"):
        heap.read(int(b))
    with pytest.raises(StaleHandleError):
        heap.free(a)  # double free
    assert heap.read(b) == b"b" * 32
    heap.verify()


def test_a_ctrl_c_at_any_step_of_put_leaves_no_block_made_and_unfilled(name):
    """A Ctrl-C at each bytecode of heap.py while put() runs, as a signal
    handler raising there would: the block was made holding the data (only
    the handle's return was cut short, as alloc's can be) or not at all, and
    another process finds the heap whole.  (put allocated, then pinned and
    copied in a try block after it: a Ctrl-C as alloc returned left a block
    of stale bytes that nothing would free.)"""
    import shmkit.heap as heapmod
    heap_py = heapmod.__file__
    data = bytes(range(256)) * 4
    gc.disable()  # (no collector callback to take the interrupt)
    try:
        with Heap(name, size=1 << 16) as heap:
            keep = heap.put(b"k" * 64)
            for k in range(1, 2000):
                # the next block takes this one's entry (generation + 1) and bytes: zeros
                probe = heap.put(bytes(len(data)))
                heap.free(probe)
                blocks = heap.statistics()["blocks"]
                seen = interrupt_at_bytecode(k, lambda c: c.co_filename == heap_py)
                h = None
                try:
                    h = heap.put(data)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                assert heap.pins_held() == 0
                now = heap.statistics()["blocks"]
                assert now in (blocks, blocks + 1), f"Ctrl-C at bytecode {k}: {now} blocks"
                if now > blocks:
                    if h is None:  # made; its handle's return was interrupted
                        h = Handle(probe.index, probe.generation + 1)
                    assert heap.read(h) == data, f"Ctrl-C at bytecode {k}: a block unfilled"
                    heap.free(h)
                if seen[0] < k:  # the put ran to its end uninterrupted
                    break
            else:
                raise AssertionError("the put never ran to its end")
            assert k > 3  # it was interrupted at several points first
            run_python(f"""
                import shmkit
                with shmkit.Heap.open({name!r}) as heap:
                    heap.verify()
                    assert heap.statistics()["blocks"] == 1, heap.statistics()
            """)
            heap.free(keep)
    finally:
        gc.enable()


def test_pin_array_refuses_a_negative_dimension(name):
    """A negative dimension in pin_array's shape raises ValueError, before
    any pin (numpy read (-2,) as "what is left", so pin_array(h, "u1", (-2,))
    gave the whole block and (4, -1) a (4, 4) array); the block another
    process wrote stays as it was."""
    with Heap(name, size=1 << 16) as heap:
        proc = run_python(f"""
            import shmkit
            with shmkit.Heap.open({name!r}) as heap:
                print(int(heap.put(bytes(range(16)))))
        """)
        h = Handle.from_int(int(proc.stdout))
        for shape in ((-2,), -16, (4, -1), (-1,), (-3, -1), (2, np.int64(-8))):
            with pytest.raises(ValueError, match="negative dimension"):
                heap.pin_array(h, "u1", shape)
            assert heap.pins_held() == 0
        with pytest.raises(TypeError, match="not bool"):
            heap.pin_array(h, "u1", True)
        with heap.pin_array(h, "u1", (4, 4)) as a:
            assert a.tolist()[3] == [12, 13, 14, 15]
        with heap.pin_array(h, "u1", np.int64(3)) as a:
            assert a.tolist() == [0, 1, 2]
        heap.free(h)


def test_pin_views_and_numpy_without_copy(heap):
    h = heap.alloc(8 * 12)
    with heap.pin_array(h, np.float64, (3, 4)) as a:
        assert a.shape == (3, 4) and a.dtype == np.float64
        a[:] = np.arange(12).reshape(3, 4)
        with heap.pin(h) as view:  # nested pins of one block by one process
            b = np.frombuffer(view, np.float64)
            assert b.ctypes.data == a.ctypes.data  # same memory: no copy
            assert b[5] == 5.0
            assert heap._where(h)[2] == 2
            del b
    assert heap._where(h)[2] == 0 and heap.pins_held() == 0
    with heap.pin_array(h, "int32", offset=8) as a:
        assert a.shape == (22,)
    with pytest.raises(ValueError, match="do not fit"):
        heap.pin_array(h, "float64", (13,))
    assert heap.pins_held() == 0
    p = heap.pin(h)
    view = p.view
    assert not p.released and p.handle == h and "96 bytes" in repr(p)
    p.release()
    p.release()
    assert p.released
    with pytest.raises(ValueError):
        view[0]  # the view is released with the pin
    with pytest.raises(ValueError):
        p.view
    # an array kept past the pin cannot crash anything; the pin is still dropped
    with heap.pin(h) as view:
        kept = np.frombuffer(view, np.uint8)
    assert heap.pins_held() == 0 and kept.sum() >= 0
    del kept
    # an unreleased Pin object releases itself when collected
    p = heap.pin(h)
    assert heap.pins_held() == 1
    del p
    gc.collect()
    assert heap.pins_held() == 0
    ap = heap.pin_array(h, "u1")
    assert isinstance(ap, ArrayPin) and ap.array.size == 96
    ap.release()
    with pytest.raises(ValueError):
        ap.array


def test_pinned_blocks_cannot_be_freed_or_resized(heap):
    h = heap.put(b"x" * 100)
    with heap.pin(h):
        with pytest.raises(PinnedError, match="pinned"):
            heap.free(h)
        with pytest.raises(PinnedError):
            heap.realloc(h, 10)
        with pytest.raises(BusyError, match="pin"):
            heap.close()
    heap.realloc(h, 10)
    assert heap.read(h) == b"x" * 10
    heap.free(h)
    heap.verify()


def test_pins_are_counted_per_handle_and_only_a_pinning_handle_is_busy(heap):
    h = heap.put(b"y" * 64)
    other = Heap.open(heap.name)
    try:
        with heap.pin(h):
            # the other handle has its own attach slot: it holds none of these
            assert heap.pins_held() == 1 and other.pins_held() == 0
            with other.pin(h), other.pin(h):
                assert other.pins_held() == 2 and heap.pins_held() == 1
                with pytest.raises(BusyError, match="2 pin"):
                    other.close()
            assert other.pins_held() == 0
            other.close()  # its pins are gone: it closes though heap still pins
            assert other.closed and heap.pins_held() == 1
        fresh = Heap.open(heap.name)
        assert fresh.pins_held() == 0
        fresh.close()
    finally:
        other.close()
    heap.verify()


def test_realloc_keeps_content_and_handle(heap):
    a = heap.alloc(100)
    fill(heap, a)
    wall = heap.alloc(10)  # keeps a from growing in place
    assert heap.realloc(a, 5000) is a
    assert heap.size_of(a) == 5000
    check(heap, a, 100)
    fill(heap, a)
    heap.free(wall)
    heap.realloc(a, 6000)  # grows in place into the freed space (and beyond)
    check(heap, a, 5000)
    heap.realloc(a, 20, zero=True)
    check(heap, a)
    heap.realloc(a, 40, zero=True)
    assert heap.read(a)[20:] == bytes(20)
    heap.verify()


def test_compaction_moves_unpinned_blocks_and_keeps_handles(heap):
    hs = [heap.alloc(random.Random(i).randrange(1, 3000)) for i in range(300)]
    for h in hs:
        fill(heap, h)
    for h in hs[::2]:
        heap.free(h)
    keep = hs[1::2]
    pinned = keep[40]
    before = heap.statistics()
    assert before["fragmentation"] > 0.2 and before["free_blocks"] > 100
    with heap.pin(pinned) as view:
        address = np.frombuffer(view, np.uint8).ctypes.data
        where = heap._where(pinned)[0]
        out = heap.compact()
        assert heap._where(pinned)[0] == where  # a pinned block stays put
        assert np.frombuffer(view, np.uint8).ctypes.data == address
        assert bytes(view) == pattern(pinned, len(view))
    assert out["moved_blocks"] > 100 and out["pinned_skipped"] >= 1
    after = heap.statistics()
    assert after["free_blocks"] <= 2 and after["moves"] >= out["moved_blocks"]
    for h in keep:
        check(heap, h)
    heap.compact()
    assert heap.statistics()["fragmentation"] == 0.0 and heap.statistics()["free_blocks"] == 1
    heap.verify()


def test_alloc_compacts_when_fragmented(heap):
    hs = [heap.alloc(4000) for _ in range(250)]
    for h in hs:
        fill(heap, h)
    for h in hs[::2]:
        heap.free(h)
    s = heap.statistics()
    assert s["largest_free"] < 300_000 < s["free"]
    big = heap.alloc(300_000)  # fits only after compaction
    assert heap.statistics()["moves"] > 0
    for h in hs[1::2]:
        check(heap, h)
    heap.free(big)
    a = hs[1]
    heap.realloc(a, 400_000)  # realloc compacts too
    check(heap, a, 4000)
    with pytest.raises(HeapFullError, match="max_size of 1048576 bytes.*max_size="):
        heap.alloc(900_000)
    with pytest.raises(HeapFullError, match="can ever hold"):
        heap.alloc(1 << 40)
    heap.verify()


def test_pinned_blocks_can_keep_a_request_from_fitting(heap):
    hs = [heap.alloc(60_000) for _ in range(16)]
    pins = [heap.pin(h) for h in hs[1::2]]
    for h in hs[::2]:
        heap.free(h)
    with pytest.raises(HeapFullError, match="pinned"):
        heap.alloc(200_000)
    for p in pins:
        p.release()
    heap.alloc(200_000)
    heap.verify()


def test_handle_table_and_pin_table_limits(names):
    with Heap(names(), size=1 << 16, max_blocks=8, max_pins=2) as heap:
        hs = [heap.alloc(8) for _ in range(8)]
        with pytest.raises(HeapFullError, match="max_blocks"):
            heap.alloc(8)
        heap.free(hs.pop())
        hs.append(heap.alloc(8))
        with heap.pin(hs[0]), heap.pin(hs[1]), heap.pin(hs[1]):
            with pytest.raises(RuntimeError, match="max_pins"):
                heap.pin(hs[2])
        with heap.pin(hs[2]):
            pass
        heap.verify()


def test_open_by_name_kind_format_and_readonly(name, names):
    with pytest.raises(NotFoundError):
        Heap.open(name)
    with pytest.raises(ValueError):
        Heap(name, size=8)
    with Heap.create(name, size=1 << 16) as heap:
        h = heap.put(b"shared")
        with Heap(name) as again:
            assert again.read(h) == b"shared" and not again.created
        with Heap.open(name, readonly=True) as ro:
            assert ro.statistics()["blocks"] == 1
            with pytest.raises(ReadOnlyError):
                ro.alloc(1)
            with pytest.raises(ReadOnlyError):
                ro.pin(h)
            assert ro.size_of(h) == 6
        info = heap.info()
        assert info["kind"] == "heap" and info["heap"]["blocks"] == 1
        assert set(info["heap"]) >= {"used", "free", "largest_free", "fragmentation", "pinned"}
        with pytest.raises(WrongKindError):
            shmkit.Mutex.open(name)
    with pytest.raises(ClosedError):
        heap.alloc(1)
    with pytest.raises(ClosedError):
        heap.statistics()
    raw = names()
    with shmkit.Segment(raw, size=64):
        pass
    with pytest.raises(WrongKindError):
        Heap.open(raw)


@pytest.mark.parametrize("fmt", [1, 2, 9])  # 1: the journal before the core's shared one; 2: fixed size
def test_other_format_version_is_refused(name, fmt):
    Heap(name, size=1 << 16).close()
    with open(f"/dev/shm/shmkit.{name}", "r+b") as f:
        raw = f.read(4096)
        n = struct.unpack_from("=I", raw, 72)[0]
        mine = f'"format":{_core.HEAP_FORMAT}'.encode()
        assert mine in raw[1024:1024 + n]
        layout = raw[1024:1024 + n].replace(mine, f'"format":{fmt}'.encode())
        f.seek(1024)
        f.write(layout)
    with pytest.raises(FormatVersionError, match=f"format {fmt}"):
        Heap.open(name)


def test_lock_timeout(heap):
    with _held(heap):
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            heap.alloc(8, timeout=0.05)
        assert time.monotonic() - t0 < 2


def test_sizes_offsets_and_limits_refuse_bools_and_sizes_past_any_heap(heap, names):
    """True passed for 1 byte, and 2**64 raised a bare OverflowError; a
    closed handle's pins_held() said 0."""
    h = heap.put(b"abc")
    for call in (lambda: heap.alloc(True), lambda: heap.realloc(h, True),
                 lambda: heap.write(h, b"x", offset=True),
                 lambda: heap.write(h, b"x", offset=1.5)):
        with pytest.raises(TypeError):
            call()
    for call in (lambda: heap.alloc(2 ** 64), lambda: heap.realloc(h, 1 << 63)):
        with pytest.raises(shmkit.SizeLimitError, match="more than any heap"):
            call()
    assert heap.alloc(np.uint8(3)) and heap.read(h) == b"abc"
    for kw in ({"max_blocks": True}, {"max_pins": True}):
        with pytest.raises(ValueError):
            Heap(names(), size=4096, **kw)
    other = Heap(names(), size=4096)
    other.close()
    with pytest.raises(ClosedError):
        other.pins_held()


@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_size_of_a_block_a_stopped_peer_is_moving_times_out_naming_it(name, then):
    """A peer stopped (SIGSTOP) in the middle of moving a block in a
    compaction: ``size_of`` of that block waits for the move within its
    timeout and raises Timeout naming the stopped pid, through a writable
    handle and a read-only one; once the peer is killed, the read-only
    handle's Timeout comes as promptly, and the writable handle repairs the
    move.  (It took no timeout and waited for good; a read-only handle
    raised CorruptError, "stays marked busy", after some 26 s, about a heap
    that was whole.)"""
    with Heap(name, size=8 << 20) as heap, Heap(name, readonly=True) as ro:
        small = heap.alloc(64)
        big = heap.put(b"m" * (2 << 20))
        heap.free(small)  # the compaction moves `big` down into the gap
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from shmkit import _core; from shmkit.heap import Heap\n"
             f"h = Heap({name!r})\n"
             "_core.fault(1, 'heap.move.copied', stop=True)\n"
             "h.compact()\n"],
            env=dict(os.environ, PYTHONPATH=SRC))
        try:
            deadline = time.monotonic() + 30
            while True:  # until it stops inside the move
                with open(f"/proc/{proc.pid}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "T":
                        break
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            for handle in (heap, ro):
                t0 = time.monotonic()
                with pytest.raises(Timeout, match=f"pid {proc.pid}.*stopped"):
                    handle.size_of(big, timeout=0.3)
                assert time.monotonic() - t0 < 5
            if then == "killed":
                proc.kill()
                proc.wait(30)
                t0 = time.monotonic()
                with pytest.raises(Timeout, match="a dead process holding its lock"):
                    ro.size_of(big, timeout=0.3)
                assert time.monotonic() - t0 < 5
            else:
                os.kill(proc.pid, signal.SIGCONT)
                assert proc.wait(30) == 0
            assert heap.size_of(big, timeout=5) == ro.size_of(big) == 2 << 20
            assert heap.read(big) == b"m" * (2 << 20)
        finally:
            if proc.poll() is None:
                proc.kill()
                os.kill(proc.pid, signal.SIGCONT)
                proc.wait()


class _held:
    """Hold the heap's internal lock from another thread of this process."""

    def __init__(self, heap: Heap) -> None:
        self.lock = _core.Lock(heap._seg._mapping, heap._seg._hsize, "heap lock")

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_threads_share_one_heap(heap):
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(400):
                r = rng.random()
                if r < 0.45 or not mine:
                    h = heap.alloc(rng.randrange(1, 2000))
                    fill(heap, h)
                    mine.append(h)
                elif r < 0.85:
                    h = mine.pop(rng.randrange(len(mine)))
                    check(heap, h)
                    heap.free(h)
                elif r < 0.95:
                    check(heap, rng.choice(mine))
                else:
                    heap.compact()
            for h in mine:
                check(heap, h)
                heap.free(h)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert heap.statistics()["blocks"] == 0
    heap.verify()


def test_pickled_heap_opens_by_name(heap):
    h = heap.put(b"by name")
    again = pickle.loads(pickle.dumps(heap))
    try:
        assert again.read(h) == b"by name" and again.name == heap.name
    finally:
        again.close()


def _pin_and_hang(name: str, wire: bytes, pinned) -> None:
    heap = Heap.open(name)
    pin = heap.pin(Handle.from_bytes(wire))
    pinned.set()
    time.sleep(60)
    pin.release()


def test_pins_of_a_killed_process_are_released(name):
    heap = Heap(name, size=1 << 16)
    h = heap.put(b"held")
    pinned = SPAWN.Event()
    p = spawn(_pin_and_hang, name, bytes(h), pinned)
    assert pinned.wait(60)
    assert heap.statistics()["pinned"] == 1
    with pytest.raises(PinnedError):
        heap.free(h)
    p.kill()
    p.join(30)
    heap.free(h)  # the dead process's pin record is found and cleared
    s = heap.statistics()
    assert s["pinned"] == 0 and s["reclaimed_pins"] == 1 and s["blocks"] == 0
    heap.verify()
    heap.close()


def test_ctrl_c_interrupts_a_call_waiting_for_the_heap_lock(name):
    Heap(name, size=1 << 16).close()
    code = f"""
        import signal, threading, os, time
        from shmkit import _core
        from shmkit.heap import Heap
        heap = Heap.open({name!r})
        lock = _core.Lock(heap._seg._mapping, heap._seg._hsize, "heap lock")
        lock.acquire()  # held by this attachment: alloc() below must wait
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            heap.alloc(8)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t0, 1))
        lock.release()
        heap.close()
    """
    proc = run_python(code, timeout=30)
    assert "interrupted after" in proc.stdout, proc.stdout


# -- a model: the heap against a dict of handle -> bytes ------------------------

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)


class HeapModel(RuleBasedStateMachine):
    """Random alloc/free/realloc/write/pin/compact, compared with plain bytes."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.heap = Heap(None, size=64 << 10, max_size=64 << 10, max_blocks=64, max_pins=4)
        self.model: dict[Handle, bytes] = {}
        self.dead: list[Handle] = []
        self.pins: list = []

    @rule(target=handles, n=st.integers(0, 6000), data=st.binary(max_size=64))
    def alloc(self, n, data):
        try:
            h = self.heap.alloc(n)
        except HeapFullError:
            return multiple()
        content = (data * (n // max(len(data), 1) + 1))[:n] if data else bytes(n)
        self.heap.write(h, content)
        self.model[h] = content
        return h

    @rule(h=consumes(handles))
    def free(self, h):
        if any(p.handle == h and not p.released for p in self.pins):
            with pytest.raises(PinnedError):
                self.heap.free(h)
            return
        self.heap.free(h)
        del self.model[h]
        self.dead.append(h)

    @rule(h=handles, n=st.integers(0, 9000))
    def realloc(self, h, n):
        if any(p.handle == h and not p.released for p in self.pins):
            with pytest.raises(PinnedError):
                self.heap.realloc(h, n)
            return
        try:
            self.heap.realloc(h, n)
        except HeapFullError:
            assert self.heap.size_of(h) == len(self.model[h])
            return
        old = self.model[h]
        self.model[h] = old[:n] + self.heap.read(h)[len(old):n]

    @rule(h=handles, at=st.integers(0, 100), data=st.binary(min_size=1, max_size=40))
    def write(self, h, at, data):
        cur = self.model[h]
        if at + len(data) > len(cur):
            with pytest.raises(IndexError):
                self.heap.write(h, data, at)
            return
        self.heap.write(h, data, at)
        self.model[h] = cur[:at] + data + cur[at + len(data):]

    @rule(h=handles)
    def pin(self, h):
        if len([p for p in self.pins if not p.released]) >= 3:
            return
        self.pins.append(self.heap.pin(h))

    @rule()
    def unpin(self):
        for p in self.pins:
            if not p.released:
                assert bytes(p.view) == self.model[p.handle]
                p.release()
                return

    @rule()
    def compact(self):
        where = {p.handle: self.heap._where(p.handle)[0] for p in self.pins if not p.released}
        self.heap.compact()
        for h, unit in where.items():
            assert self.heap._where(h)[0] == unit

    @rule(i=st.integers(0, 1000))
    def stale(self, i):
        if self.dead:
            h = self.dead[i % len(self.dead)]
            if h not in self.model:
                with pytest.raises(StaleHandleError):
                    self.heap.size_of(h)

    @invariant()
    def contents_match(self):
        for h, content in self.model.items():
            assert self.heap.size_of(h) == len(content)
            assert self.heap.read(h) == content
        s = self.heap.statistics()
        assert s["blocks"] == len(self.model)
        assert s["used"] + s["free"] == s["size"]

    def teardown(self):
        for p in self.pins:
            p.release()
        try:
            self.heap.verify()
        finally:
            self.heap.close()
            self.heap.unlink()


TestHeapModel = HeapModel.TestCase
TestHeapModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


# -- across processes ------------------------------------------------------------


def _produce(name: str, q, count: int, seed: int) -> None:
    heap = Heap.open(name)
    rng = random.Random(seed)
    for _ in range(count):
        h = heap.alloc(rng.randrange(1, 100_000))
        fill(heap, h)
        q.put(bytes(h))  # 8 bytes on the wire
    q.put(None)
    heap.close()


def test_handles_travel_between_processes_by_queue(name):
    heap = Heap(name, size=16 << 20, max_size=16 << 20)
    q = SPAWN.Queue()
    producers = [spawn(_produce, name, q, 60, seed) for seed in (1, 2)]
    done, seen = 0, 0
    while done < 2:
        wire = q.get(timeout=60)
        if wire is None:
            done += 1
            continue
        assert len(wire) == 8
        h = Handle.from_bytes(wire)
        check(heap, h)
        heap.free(h)
        seen += 1
    for p in producers:
        p.join(30)
        assert p.exitcode == 0
    assert seen == 120 and heap.statistics()["blocks"] == 0
    heap.verify()
    heap.close()


def _produce_to_array(name: str, slots_name: str, ready_name: str, taken_name: str,
                      base: int, count: int) -> None:
    heap = Heap.open(name)
    slots = shmkit.Array(slots_name)
    ready, taken = shmkit.Event(ready_name, auto_reset=True), shmkit.Event(taken_name,
                                                                       auto_reset=True)
    for i in range(count):
        h = heap.alloc(1000 + base + i)
        fill(heap, h)
        slots.array[base] = int(h)
        ready.set()
        assert taken.wait(30)
    heap.close()


def test_handles_travel_through_shared_array_and_events(names):
    name = names()
    heap = Heap(name, size=4 << 20, max_size=4 << 20)
    slots = shmkit.Array(names(), "uint64", (1,))
    ready = shmkit.Event(names(), auto_reset=True)
    taken = shmkit.Event(names(), auto_reset=True)
    p = spawn(_produce_to_array, name, slots.name, ready.name, taken.name, 0, 30)
    for i in range(30):
        assert ready.wait(30)
        h = Handle.from_int(int(slots.array[0]))
        assert heap.size_of(h) == 1000 + i
        check(heap, h)
        heap.free(h)
        taken.set()
    p.join(30)
    assert p.exitcode == 0 and heap.statistics()["blocks"] == 0
    for o in (heap, slots, ready, taken):
        o.close()


def _pin_and_watch(name: str, wire: bytes, stop_name: str, result,
                   started_name: str | None = None) -> None:
    """Pin a block over and over while another process compacts; the bytes must hold."""
    heap = Heap.open(name)
    h = Handle.from_bytes(wire)
    stop = shmkit.Event(stop_name)
    started = shmkit.Event(started_name) if started_name else None
    rounds = 0
    while not stop.is_set():
        with heap.pin(h) as view:
            a = np.frombuffer(view, np.uint8)
            addr = a.ctypes.data
            first = bytes(view)
            for _ in range(20):
                assert np.frombuffer(view, np.uint8).ctypes.data == addr
                if bytes(view) != first:
                    result.put("changed under a pin")
                    return
            del a
        rounds += 1
        if started is not None and rounds == 1:
            started.set()
    result.put(rounds)
    heap.close()


def test_compaction_never_moves_what_another_process_pins(names):
    name = names()
    heap = Heap(name, size=8 << 20, max_size=8 << 20)
    hs = [heap.alloc(20_000) for _ in range(300)]
    for h in hs:
        fill(heap, h)
    watched = hs[151]
    stop = shmkit.Event(names())
    result = SPAWN.Queue()
    started = shmkit.Event(names())
    p = spawn(_pin_and_watch, name, bytes(watched), stop.name, result, started.name)
    # Compact only once the watcher pins: on a loaded machine a spawned child
    # can take seconds to start, and a watch that never ran proves nothing.
    assert started.wait(timeout=120), "the watcher never pinned"
    rng = random.Random(5)
    live = list(hs)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for _ in range(20):
            victim = live.pop(rng.randrange(len(live)))
            if victim == watched:
                live.append(victim)
                continue
            heap.free(victim)
        heap.compact()
        while len(live) < 300:
            h = heap.alloc(rng.randrange(1000, 30_000))
            fill(heap, h)
            live.append(h)
    stop.set()
    rounds = result.get(timeout=30)
    p.join(30)
    assert isinstance(rounds, int) and rounds > 0, rounds
    assert heap.statistics()["moves"] > 100
    for h in live:
        check(heap, h)
    heap.verify()
    heap.close()
    stop.close()


def _random_worker(name: str, seed: int, seconds: float, out) -> None:
    heap = Heap.open(name)
    rng = random.Random(seed)
    mine: list[Handle] = []
    ops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = rng.random()
        try:
            if r < 0.4 or not mine:
                h = heap.alloc(rng.choice((16, 64, 500, 4000, 40_000)))
                fill(heap, h)
                mine.append(h)
            elif r < 0.75:
                h = mine.pop(rng.randrange(len(mine)))
                check(heap, h)
                heap.free(h)
            elif r < 0.85:
                h = rng.choice(mine)
                n = rng.randrange(1, 50_000)
                old = heap.size_of(h)
                heap.realloc(h, n)
                check(heap, h, min(old, n))
                fill(heap, h)
            elif r < 0.97:
                with heap.pin(rng.choice(mine)) as view:
                    bytes(view)
            else:
                heap.compact()
        except HeapFullError:
            for h in mine[: len(mine) // 2]:
                heap.free(h)
            del mine[: len(mine) // 2]
        ops += 1
    for h in mine:
        check(heap, h)
        heap.free(h)
    out.put(ops)
    heap.close()


def test_many_processes_allocate_free_pin_and_compact_at_once(name):
    heap = Heap(name, size=4 << 20, max_size=4 << 20, max_blocks=4096)
    out = SPAWN.Queue()
    workers = [spawn(_random_worker, name, seed, 4.0, out) for seed in range(3)]
    ops = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert all(n > 100 for n in ops), ops
    s = heap.statistics()
    assert s["blocks"] == 0 and s["free"] == s["size"]
    heap.verify()
    heap.close()


# -- the example ---------------------------------------------------------------------


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "heap_pipeline.py")


def _run_example(*args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.skipif(not hasattr(shmkit, "Channel"), reason="shmkit.Channel not merged yet")
def test_example_pipeline_with_channel():
    out = _run_example("--blocks", "50")
    assert "consumer received 100 blocks" in out and "heap verified" in out, out


def test_example_pipeline_with_queue_transport():
    out = _run_example("--blocks", "40", "--transport", "queue")
    assert "consumer received 80 blocks" in out and "heap verified" in out, out


# -- crashes ---------------------------------------------------------------------
#
# A child process runs a fixed script that touches every kind of change (alloc,
# free, realloc in place and by copy, pins, compaction with overlapping and
# disjoint moves) and logs each step through a pipe, an intent before and a
# record after.  _core.fault(k) makes it SIGKILL itself at the k-th crash
# point (every journaled store, commit and copy chunk).  After each death the
# parent checks the heap: verify() passes, every block the child reported is
# intact, an interrupted free or realloc either happened or did not, the
# child's pins are gone, and at most the one allocation in flight leaked.

_REC = struct.Struct("=cQQ")


def _note(fd: int, op: bytes, h: Handle | None = None, n: int = 0) -> None:
    os.write(fd, _REC.pack(op, int(h) if h is not None else 0, n))


def _script(heap: Heap, fd: int) -> None:
    def alloc(n: int, zero: bool = False) -> Handle:
        _note(fd, b"a", None, n)
        h = heap.alloc(n, zero=zero)
        fill(heap, h)
        _note(fd, b"A", h, n)
        return h

    def free(h: Handle) -> None:
        _note(fd, b"F", h)
        heap.free(h)
        _note(fd, b"f", h)

    def realloc(h: Handle, n: int, zero: bool = False) -> None:
        _note(fd, b"r", h, n)
        heap.realloc(h, n, zero=zero)
        _note(fd, b"R", h, n)

    a, b, c, d = alloc(200), alloc(3000), alloc(100), alloc(5000)
    free(a)                      # a hole before b: b will slide over itself
    realloc(c, 4000, zero=True)  # d follows c: moved by copy
    pin = heap.pin(d)
    _note(fd, b"P", d)
    heap.compact()               # overlapping slide of b, pinned d stays
    _note(fd, b"C")
    pin.release()
    _note(fd, b"U", d)
    e = alloc(20_000, zero=True)
    free(b)
    realloc(d, 100)              # shrink in place
    realloc(e, 30_000, zero=True)  # grow in place, cleared
    heap.compact()               # disjoint moves
    _note(fd, b"C")
    free(c)
    _note(fd, b"Z")


def _run_child(heap: Heap, k: int) -> tuple[bool, bytes]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            _core.fault(k)
            _script(heap, w)
            code = 0 if _core.fault(0) == 0 else 3
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if not killed:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 3), status
    return killed, b"".join(chunks)


class _Log:
    """What a (dead) worker's log says about its blocks."""

    def __init__(self, log: bytes) -> None:
        self.valid: dict[Handle, int] = {}   # handle -> bytes known to hold the pattern
        self.sizes: dict[Handle, set] = {}   # handle -> sizes it may have now
        self.maybe_freed: set[Handle] = set()
        self.alloc_in_flight = False
        for i in range(0, len(log) - len(log) % _REC.size, _REC.size):
            op, v, n = _REC.unpack_from(log, i)
            h = Handle.from_int(v)
            if op == b"a":
                self.alloc_in_flight = True
            elif op == b"A":
                self.alloc_in_flight = False
                self.valid[h], self.sizes[h] = n, {n}
            elif op == b"F":
                self.maybe_freed.add(h)
            elif op == b"f":
                self.maybe_freed.discard(h)
                del self.valid[h], self.sizes[h]
            elif op == b"r":
                self.valid[h] = min(self.valid[h], n)
                self.sizes[h] = self.sizes[h] | {n}
            elif op == b"R":
                self.sizes[h] = {n}
            elif op == b"W":
                self.valid[h] = n

    def check(self, heap: Heap) -> list[Handle]:
        """Check the blocks the log vouches for; returns those still allocated."""
        alive = []
        for h, valid in self.valid.items():
            if h in self.maybe_freed:
                try:
                    heap.size_of(h)
                except StaleHandleError:
                    continue  # the interrupted free happened
            assert heap.size_of(h) in self.sizes[h], (h, heap.size_of(h), self.sizes[h])
            check(heap, h, valid)
            alive.append(h)
        return alive


def _check_after_crash(heap: Heap, log: bytes) -> None:
    heap.verify()  # takes the dead child's lock over and repairs
    parsed = _Log(log)
    assert heap.statistics()["pinned"] == 0  # the dead child's pins were released
    known = len(parsed.check(heap))
    leaked = heap.statistics()["blocks"] - known
    assert leaked in ((0, 1) if parsed.alloc_in_flight else (0,)), leaked
    # and the heap goes on working
    x = heap.alloc(1000)
    fill(heap, x)
    heap.compact()
    check(heap, x)
    heap.free(x)
    heap.verify()


def _random_script(heap: Heap, fd: int, seed: int, steps: int | None) -> None:
    """Random alloc/free/realloc/pin/compact, logged like _script; runs until
    killed when ``steps`` is None."""
    rng = random.Random(seed)
    mine: dict[Handle, int] = {}
    pins: list = []
    step = 0
    while steps is None or step < steps:
        step += 1
        r = rng.random()
        try:
            if r < 0.35 or not mine:
                n = rng.choice((0, 16, 100, 1000, 5000, 20_000))
                _note(fd, b"a", None, n)
                h = heap.alloc(n, zero=rng.random() < 0.2)
                fill(heap, h)
                _note(fd, b"A", h, n)
                mine[h] = n
            elif r < 0.6:
                h = rng.choice(list(mine))
                if any(p.handle == h for p in pins):
                    continue
                _note(fd, b"F", h)
                heap.free(h)
                _note(fd, b"f", h)
                del mine[h]
            elif r < 0.75:
                h = rng.choice(list(mine))
                if any(p.handle == h for p in pins):
                    continue
                n = rng.choice((8, 300, 3000, 12_000, 40_000))
                _note(fd, b"r", h, n)
                heap.realloc(h, n, zero=rng.random() < 0.3)
                _note(fd, b"R", h, n)
                fill(heap, h)
                _note(fd, b"W", h, n)
                mine[h] = n
            elif r < 0.85:
                if len(pins) < 3:
                    pins.append(heap.pin(rng.choice(list(mine))))
                else:
                    pins.pop(rng.randrange(len(pins))).release()
            else:
                heap.compact()
        except HeapFullError:
            for p in pins:
                p.release()
            pins.clear()
            if not mine:
                time.sleep(0.001)  # the other worker holds the space
                continue
            h = rng.choice(list(mine))
            _note(fd, b"F", h)
            heap.free(h)
            _note(fd, b"f", h)
            del mine[h]
    for p in pins:
        p.release()


def _fork(target, *args) -> tuple[int, int]:
    """Fork a child running target(heap..., fd); returns (pid, read end of its log)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            target(*args, w)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        into += chunk


def _chaos(names, rounds: int, seed: int) -> None:
    """Two workers run random operations; one at a time is SIGKILLed at a random
    moment and replaced, while the other keeps going."""
    heap = Heap(names(), size=1 << 20, max_size=1 << 20, max_blocks=2048)
    rng = random.Random(seed)
    workers = []   # (pid, fd, log)

    def start(i: int) -> None:
        pid, fd = _fork(lambda h, s, w: _random_script(h, w, s, None), heap, seed * 1000 + i)
        os.set_blocking(fd, False)
        workers.append((pid, fd, bytearray()))

    def kill_oldest() -> _Log:
        pid, fd, log = workers.pop(0)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"worker ended by itself: {status}"
        os.set_blocking(fd, True)
        _drain(fd, log)
        os.close(fd)
        return _Log(bytes(log))

    leaks = 0
    start(0)
    start(1)
    try:
        for i in range(rounds):
            deadline = time.monotonic() + rng.uniform(0.002, 0.05)
            while time.monotonic() < deadline:
                for _, fd, log in workers:
                    _drain(fd, log)
                time.sleep(0.001)
            dead = kill_oldest()
            heap.verify()
            for h in dead.check(heap):
                heap.free(h)
            leaks += dead.alloc_in_flight
            start(i + 2)
        while workers:
            dead = kill_oldest()
            for h in dead.check(heap):
                heap.free(h)
            leaks += dead.alloc_in_flight
    finally:
        for pid, fd, _ in workers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
    s = heap.verify()
    assert s["pinned"] == 0 and s["blocks"] <= leaks, (s, leaks)
    heap.close()


def test_workers_killed_at_random_moments(names):
    _chaos(names, rounds=25, seed=1)


@pytest.mark.stress
def test_workers_killed_at_random_moments_many_times(names):
    for seed in range(2, 12):
        _chaos(names, rounds=300, seed=seed)


@pytest.mark.stress
def test_crash_at_every_point_of_random_scripts(names):
    for seed in range(10):
        with Heap(None, size=256 << 10) as heap:
            r, w = os.pipe()
            _core.fault(1 << 30)
            try:
                _random_script(heap, w, seed, 40)
            finally:
                total = (1 << 30) - _core.fault(0)
                os.close(r)
                os.close(w)
            heap.unlink()
        for k in range(1, total + 1):
            with Heap(names(), size=256 << 10) as heap:
                pid, fd = _fork(lambda h, w: (_core.fault(k),
                                              _random_script(h, w, seed, 40)), heap)
                log = bytearray()
                _drain(fd, log)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                assert os.WIFSIGNALED(status), (seed, k, status)
                _check_after_crash(heap, bytes(log))


def _crash_points() -> int:
    with Heap(None, size=256 << 10) as heap:
        r, w = os.pipe()
        _core.fault(1 << 30)
        try:
            _script(heap, w)
        finally:
            left = _core.fault(0)
            os.close(r)
            os.close(w)
        heap.unlink()
    return (1 << 30) - left


def _sweep(names, points) -> int:
    kills = 0
    for k in points:
        with Heap(names(), size=256 << 10) as heap:
            killed, log = _run_child(heap, k)
            kills += killed
            _check_after_crash(heap, log)
    return kills


def test_crash_at_every_point_leaves_heap_consistent(names):
    total = _crash_points()
    assert total > 200
    assert _sweep(names, range(1, total + 1)) == total
    assert _sweep(names, [total + 1]) == 0  # past the last point: it finishes


# -- corruption -------------------------------------------------------------------

_FUZZ = r"""
import random, sys
import numpy as np
import shmkit
from shmkit import _core
from shmkit.heap import Heap, Handle

rounds, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
allowed = (shmkit.ShmkitError, ValueError, TypeError, RuntimeError, MemoryError,
           PermissionError, IndexError, OverflowError)
outcomes = {}
for r in range(rounds):
    heap = Heap(None, size=64 << 10, max_size=64 << 10, max_blocks=64, max_pins=4)
    hs = [heap.alloc(rng.randrange(1, 3000)) for _ in range(12)]
    for h in hs[::3]:
        heap.free(h)
    hs = hs[1::3] + hs[2::3]
    pin = heap.pin(hs[0])
    m, base = heap._seg._mapping, heap._seg._hsize
    data_off = _core.load64(m, base + 32)
    units = [heap._where(h)[0] for h in hs]
    # words that matter: the mutable header, the journals, handle entries,
    # pin records, block headers and free-list links
    targets = ([64 + 8 * i for i in range(16)] + [256 + 8 * i for i in range(70)]
               + [1024 + 8 * i for i in range(8)] + [2048 + 8 * i for i in range(12)]
               + [4096 + 8 * i for i in range(4 * 20)]
               + [4096 + 64 * 32 + 64 + 8 * i for i in range(4)]
               + [data_off + 16 * u + d for u in units for d in (0, 8, 16)]
               + [data_off + 16 * rng.randrange(4096) + d for _ in range(8) for d in (0, 8)])
    for _ in range(rng.choice((1, 1, 2, 4))):
        off = base + rng.choice(targets)
        old = _core.load64(m, off)
        kind = rng.random()
        if kind < 0.3:
            new = old ^ (1 << rng.randrange(64))
        elif kind < 0.6:
            new = (old & ~0xFFFFFFFF) | rng.randrange(0, 5000)
        elif kind < 0.8:
            new = rng.randrange(0, 1 << 16) << 32 | rng.randrange(0, 1 << 16)
        else:
            new = rng.getrandbits(64)
        _core.store64(m, off, new)
    ops = [heap.verify, heap.statistics, heap.compact,
           lambda: heap.alloc(rng.randrange(0, 5000)),
           lambda: heap.realloc(rng.choice(hs), rng.randrange(0, 9000)),
           lambda: heap.free(rng.choice(hs)),
           lambda: heap.read(rng.choice(hs)),
           lambda: heap.size_of(rng.choice(hs)),
           lambda: [np.frombuffer(p.view, np.uint8).sum() for p in [heap.pin(rng.choice(hs))]],
           lambda: Heap.open(heap.name).close(),
           lambda: heap.read(Handle.from_int(rng.getrandbits(64)))]
    for _ in range(12):
        op = rng.choice(ops)
        try:
            op()
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except allowed as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    pin.release()
    try:
        heap.close()
    except allowed:
        pass
    heap.unlink()
print(outcomes)
"""


def test_corrupt_heap_raises_and_never_crashes():
    proc = run_python(_FUZZ, "150", "7", timeout=120, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "CorruptError" in proc.stdout, proc.stdout


@pytest.mark.stress
def test_corrupt_heap_raises_and_never_crashes_many_seeds():
    for seed in range(20):
        proc = run_python(_FUZZ, "300", str(100 + seed), timeout=600, check=False)
        assert proc.returncode == 0, (seed, proc.returncode, proc.stderr[-3000:])


def test_corrupt_header_is_refused_on_open(name):
    Heap(name, size=1 << 16).close()
    with open(f"/dev/shm/shmkit.{name}", "r+b") as f:
        hsize = struct.unpack_from("=Q", f.read(32), 24)[0]
        f.seek(hsize + 32)               # data_off
        f.write(struct.pack("=Q", 1 << 40))
    with pytest.raises(CorruptError, match="geometry|does not match"):
        Heap.open(name)


# -- growth ------------------------------------------------------------------------


def _grow_in_child(name: str, result) -> None:
    """Allocate well past the heap's initial size; report the handles."""
    heap = Heap.open(name)
    hs = []
    for i in range(40):
        h = heap.alloc(8000 + i)
        fill(heap, h)
        hs.append(bytes(h))
    result.put((hs, heap.capacity))
    heap.close()


def _pin_across_growth(name: str, wire: bytes, pinned_ev: str, grown_ev: str, inbox,
                       outbox) -> None:
    """Hold a pin while another process grows the heap; then read a block in the new area."""
    heap = Heap.open(name)
    h = Handle.from_bytes(wire)
    pinned, grown = shmkit.Event(pinned_ev), shmkit.Event(grown_ev)
    with heap.pin(h) as view:
        addr = np.frombuffer(view, np.uint8).ctypes.data
        before = bytes(view)
        pinned.set()
        assert grown.wait(60)
        same = (bytes(view) == before == pattern(h, len(view))
                and np.frombuffer(view, np.uint8).ctypes.data == addr)
    new = Handle.from_bytes(inbox.get(timeout=60))
    ok_new = heap.read(new) == pattern(new, heap.size_of(new))
    outbox.put((same, ok_new, heap.capacity))
    heap.close()


def test_heap_grows_across_processes_and_keeps_handles_and_pins(names):
    name = names()
    heap = Heap(name, size=64 << 10, max_size=16 << 20)
    assert heap.capacity == 64 << 10 and heap.max_size == 16 << 20
    s = heap.statistics()
    assert s["size"] == 64 << 10 and s["max_size"] == 16 << 20
    old = [heap.alloc(3000 + i) for i in range(10)]
    for h in old:
        fill(heap, h)
    pinned, grown = shmkit.Event(names()), shmkit.Event(names())
    # one queue each way: a reply read from the queue just written could be our own item
    to_pinner, from_pinner, from_grower = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    pinner = spawn(_pin_across_growth, name, bytes(old[3]), pinned.name, grown.name, to_pinner,
                   from_pinner)
    assert pinned.wait(60)
    grower = spawn(_grow_in_child, name, from_grower)
    wires, child_cap = from_grower.get(timeout=60)
    grower.join(30)
    assert grower.exitcode == 0
    assert child_cap > 64 << 10 and heap.capacity == heap.statistics()["size"] >= child_cap
    grown.set()
    to_pinner.put(wires[-1])  # a block in the grown area
    same, ok_new, pinner_cap = from_pinner.get(timeout=60)
    pinner.join(30)
    assert pinner.exitcode == 0 and same and ok_new and pinner_cap >= child_cap
    for h in old:
        check(heap, h)
    for w in wires:
        check(heap, Handle.from_bytes(w))
    assert heap._where(Handle.from_bytes(wires[-1]))[0] * 16 >= 64 << 10
    info = heap.info()["heap"]
    assert info["size"] == heap.capacity and info["max_size"] == 16 << 20
    heap.verify()
    for o in (heap, pinned, grown):
        o.close()


def test_alloc_and_realloc_grow_to_max_size_then_raise(names):
    with Heap(names(), size=4096, max_size=256 << 10) as heap:
        a = heap.put(b"a" * 1000)
        b = heap.alloc(100_000)  # more than the heap has: it grows
        assert heap.capacity >= 100_000 + 4096
        heap.realloc(a, 150_000)  # realloc grows it too
        assert heap.read(a)[:1000] == b"a" * 1000 and heap.size_of(b) == 100_000
        with pytest.raises(HeapFullError, match=r"max_size of 262144 bytes.*max_size="):
            heap.alloc(50_000)
        with pytest.raises(HeapFullError, match=r"max_size of 262144 bytes.*max_size="):
            heap.realloc(b, 200_000)
        assert heap.capacity == heap.max_size == 256 << 10
        with pytest.raises(HeapFullError, match=r"can ever hold.*max_size="):
            heap.alloc(300_000)
        assert heap.read(a)[:1000] == b"a" * 1000 and heap.size_of(b) == 100_000
        heap.free(b)
        heap.alloc(50_000)
        heap.verify()


def test_growth_defaults_and_max_size_mismatch_on_open(names):
    name = names()
    with Heap(None, size=1 << 16) as heap:  # default: grows to 4 GiB, reserving only
        assert heap.max_size == 4 << 30 and heap.capacity == 1 << 16
        assert heap.statistics()["max_blocks"] >= 65536
    with pytest.raises(ValueError, match="max_size"):
        Heap(name, size=1 << 20, max_size=1 << 16)
    with pytest.raises(ValueError, match="max_size"):
        Heap(name, size=1 << 16, max_size=1 << 40)
    with Heap(name, size=1 << 16, max_size=1 << 20) as heap:
        with pytest.raises(shmkit.MismatchError, match=r"max_size=1048576, but max_size=2097152"):
            Heap(name, max_size=2 << 20)
        with pytest.raises(shmkit.MismatchError, match=r"max_size=1048576.*size=2097152"):
            Heap(name, size=2 << 20)
        with Heap(name, size=1 << 18, max_size=1 << 20) as same:  # honoured: it grows
            assert same.capacity == heap.capacity == 1 << 18
        heap.verify()


def _grow_script(heap: Heap, keep: list[Handle]) -> None:
    big = heap.alloc(6000)              # too little free: grows, merging the free tail
    fill(heap, big)
    rest = heap.statistics()["largest_free"]
    heap.alloc(rest)                    # the last block is now used
    heap.alloc(100)                     # grows with a new block at the end
    heap.realloc(keep[0], 20_000)       # realloc grows the heap too


def _grow_crash_child(heap: Heap, keep: list[Handle], k: int) -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            _core.fault(k)
            _grow_script(heap, keep)
            code = 0 if _core.fault(0) == 0 else 3
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3), status
    return killed


def test_crash_at_every_point_of_growth_leaves_heap_usable(names):
    def fresh() -> tuple[Heap, list[Handle]]:
        heap = Heap(names(), size=4096, max_size=1 << 20)
        keep = [heap.alloc(1000), heap.alloc(1500)]
        for h in keep:
            fill(heap, h)
        return heap, keep

    heap, keep = fresh()
    _core.fault(1 << 30)
    try:
        _grow_script(heap, keep)
    finally:
        total = (1 << 30) - _core.fault(0)
    grown_points = 0
    _core.fault(1 << 30, "heap.grow.")
    heap2, keep2 = fresh()
    try:
        _grow_script(heap2, keep2)
    finally:
        grown_points = (1 << 30) - _core.fault(0)
    assert grown_points == 3 * 3  # found, units, released: three growths
    for h in (heap, heap2):
        h.close()
        h.unlink()
    assert total > 40
    kills = 0
    for k in range(1, total + 2):
        heap, keep = fresh()
        kills += _grow_crash_child(heap, keep, k)
        heap.verify()
        assert heap.read(keep[1]) == pattern(keep[1], 1500)
        assert heap.read(keep[0])[:1000] == pattern(keep[0], 1000)
        assert 4096 <= heap.capacity <= 1 << 20
        h = heap.alloc(60_000)  # still usable: grows again
        fill(heap, h)
        check(heap, h)
        heap.verify()
        heap.close()
        heap.unlink()
    assert kills == total


def test_a_size_word_lowered_under_a_growing_heap_is_corrupt(name, monkeypatch):
    """Found by the busy-mode fuzzer (heap, seed 100): the segment's size word
    lowered by another process between the grower's extension of the segment
    and the heap's own growth made alloc() raise RuntimeError ("extend the
    segment first"), an internal error.  A heap's segment never shrinks and
    its grower always extends it first, so that is damage: CorruptError."""
    h = shmkit.Heap(name, size=64 << 10, max_size=4 << 20)
    seg = h._seg
    before = seg._sync_size()
    real = type(seg)._grow_to

    def grow_then_damage(self, size, timeout=None):
        real(self, size, timeout)
        view = memoryview(self._mapping)
        struct.pack_into("=Q", view, 32, before)  # the header's size word
        view.release()

    monkeypatch.setattr(type(seg), "_grow_to", grow_then_damage)
    try:
        with pytest.raises(shmkit.CorruptError, match="size word was damaged"):
            h.alloc(200 << 10, timeout=5)
    finally:
        monkeypatch.undo()
        h.close()


def test_a_pin_that_a_close_overtook_raises_closed_error(name):
    # A pin whose call had the handle's core when another thread closed the
    # heap raised a plain ValueError where every other call raises ClosedError.
    heap = Heap(name, size=1 << 16, create=True)
    h = heap.alloc(16)
    core = heap._heapcore  # as pin() holds it, in a thread the close overtakes
    heap.close()
    with pytest.raises(shmkit.ClosedError, match="is closed in this process"):
        core.pin(h._value, None, h)
    with pytest.raises(shmkit.ClosedError, match="is closed in this process"):
        heap.pin(h)
    with Heap.open(name) as again:
        again.free(h)
        again.unlink()
