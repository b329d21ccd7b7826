"""Every kind of shmkit object against a damaged segment, idle and in use (tests/fuzz.py).

The bounded runs are part of ``make test``; the long run is ``-m stress`` with
``SHMKIT_FUZZ_CASES`` cases per kind and mode (see docs/testing.md).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz  # noqa: E402

# cases per kind in the bounded run: (idle, busy)
BOUNDED = (500, 200)
# in use, with a hammer process: every kind
BUSY = list(fuzz.KINDS)
CASES = [(k, "idle") for k in fuzz.KINDS] + [(k, "busy") for k in BUSY]


def _check(name: str, kind: str, mode: str, seed: int, cases: int, timeout: float,
           first: int = 0) -> None:
    t0 = time.monotonic()
    rc, out, done = fuzz.run_child(kind, mode, name, seed, cases, timeout, first)
    assert rc >= 0, f"{kind} {mode} seed {seed}: child died by signal {-rc}:\n{out[-5000:]}"
    assert rc == 0, out[-5000:]
    assert f"done {kind} {mode}: {cases} cases, 0 with" in out, out[-5000:]
    assert done > 0
    print(f"{kind} {mode}: {done} cases (seed {seed}) in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("kind,mode", CASES)
def test_damaged_object_never_crashes_hangs_or_raises_a_stray_error(name, kind, mode):
    _check(name, kind, mode, 1, BOUNDED[mode == "busy"], timeout=120)


# Cases the fuzzer once failed, replayed exactly: (kind, mode, seed, case).
FOUND = [
    # a damaged max_size below a later resize() request: ValueError, now SizeLimitError
    ("segment", "idle", 100, 2961),
    ("segment", "idle", 100, 25),
    # a damaged maximum below the stored value: release() raised ValueError, now corrupt
    ("semaphore", "idle", 1, 449),
    # the same, found by acquire() first: the unit it took was released beyond the
    # damaged maximum (ValueError), now acquire() and release() raise CorruptError
    ("semaphore", "idle", 102, 2924),
    ("semaphore", "idle", 101, 3602),
]


@pytest.mark.parametrize("kind,mode,seed,case", FOUND)
def test_fuzz_findings_stay_fixed(name, kind, mode, seed, case):
    _check(name, kind, mode, seed, 1, timeout=60, first=case)


@pytest.mark.stress
@pytest.mark.parametrize("kind,mode", CASES)
def test_damaged_object_fuzz_long(name, kind, mode):
    cases = int(os.environ.get("SHMKIT_FUZZ_CASES", "5000"))
    seed = int(os.environ.get("SHMKIT_FUZZ_SEED", "100"))
    _check(name, kind, mode, seed, cases, timeout=max(600.0, cases * 0.2))


def test_a_held_lock_overwritten_by_damage_is_reported_as_corrupt_on_release(name):
    """Found by the busy-mode fuzzer (store vacuum, segment resize): a lock word
    overwritten while this process held it made release() raise RuntimeError."""
    import struct

    import shmkit
    from shmkit import _core
    seg = shmkit.Segment.create(name, 4096)
    m = shmkit.Mutex(None)
    try:
        view = memoryview(seg._mapping)
        off = _core.layouts["segment"]["lock"]
        assert seg.lock.acquire(timeout=1)
        struct.pack_into("<I", view, off, 0x12345)  # another process's store
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            seg.lock.release()
        with pytest.warns(shmkit.OwnerDiedWarning):  # the stranger's token is no process
            assert seg.lock.acquire(timeout=1)
        seg.lock.release()
        with pytest.raises(RuntimeError, match="does not hold"):
            seg.lock.release()  # a release without acquire is still the caller's error
        mview = memoryview(m._seg._mapping)
        assert m.acquire(timeout=1)
        struct.pack_into("<I", mview, m._base, 0)
        with pytest.raises(shmkit.CorruptError):
            m.release()
        view.release()
        mview.release()
    finally:
        seg.close()
        seg.unlink()
        m.close()
        m.unlink()


@pytest.mark.parametrize("how", ["condition", "mutex"])
def test_a_lock_overwritten_while_held_is_corrupt_on_every_release(name, how):
    """Found by the busy-mode fuzzer (condition, seed 100, case 1398): the
    condition's lock word overwritten while a `with` block held it made
    wait() report CorruptError (its release found the damage), and then the
    block's own release raised RuntimeError ("does not hold"), hiding it.
    Each release of the overwritten word now reports the damage; taking the
    word again ends the episode."""
    import struct

    import shmkit
    h = shmkit.Condition(name) if how == "condition" else shmkit.Mutex(name)
    off = h._base if how == "mutex" else h._base + 0  # the mutex word comes first
    view = memoryview(h._seg._mapping)
    try:
        with pytest.raises(shmkit.CorruptError, match="overwritten") as caught:
            with h:
                struct.pack_into("<I", view, off, 19424)  # another process's store
                if how == "condition":
                    h.wait(0.01)  # releases (and finds the damage) first
        if how == "condition":  # wait() found it first, then the block's release
            assert isinstance(caught.value.__context__, shmkit.CorruptError)
            assert "overwritten" in str(caught.value.__context__)
        # the release after a release that reported it reports it once more,
        # then a release is the caller's error again
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            h.release()
        with pytest.raises(RuntimeError, match="does not hold"):
            h.release()
        # Taking the word again ends an episode that no second release closed.
        struct.pack_into("<I", view, off, 0)
        assert h.acquire(timeout=1)
        struct.pack_into("<I", view, off, 19424)
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            h.release()
        struct.pack_into("<I", view, off, 0)
        for _ in range(100):
            with h:
                pass
        with pytest.raises(RuntimeError, match="does not hold"):
            h.release()  # not the old episode's CorruptError
        assert h._seg._mapping.held_count == 0
    finally:
        view.release()
        h.close()
        h.unlink()


def test_header_changed_between_check_and_attach_is_not_reread(name, monkeypatch):
    """Found by the busy-mode fuzzer (mutex, seed 100): another process changing the
    header's max_slots between the open's check and its slot claim made the open
    divide by the new, unchecked value (ZeroDivisionError)."""
    import struct

    import shmkit
    from shmkit import _core, segment
    seg = shmkit.Segment.create(name, 4096)
    real_map = segment._map
    off = _core.layouts["segment"]["max_slots"]

    def map_then_damage(fd, *args, **kwargs):
        mapping = real_map(fd, *args, **kwargs)
        os.pwrite(fd, struct.pack("<I", 0), off)  # what the other process writes
        return mapping

    monkeypatch.setattr(segment, "_map", map_then_damage)
    try:
        other = shmkit.Segment.open(name)
        assert other._max_slots == seg._max_slots  # the checked value
        other.close()
    finally:
        monkeypatch.undo()
        seg.close()
        seg.unlink()


def _damage_size(seg, size: int) -> None:
    import struct

    from shmkit import _core
    view = memoryview(seg._mapping)
    struct.pack_into("<Q", view, _core.layouts["segment"]["size"], size)
    view.release()


def test_store_over_a_payload_too_small_is_corrupt(name):
    """Found by the busy-mode fuzzer (store, seed 100): a store opened while its
    header's size was damaged raised ValueError from the core."""
    import shmkit
    st = shmkit.Store(name, size=64 << 10, create=True)
    try:
        _damage_size(st._seg, 16)
        with pytest.raises(shmkit.CorruptError, match="too small for a store"):
            shmkit.Store(name, create=False)
    finally:
        st.close()


def test_records_over_a_shrunken_payload_are_corrupt(names):
    """Found by the busy-mode fuzzer (struct, array): a size damaged below the
    record layout after the open made the view raise numpy's ValueError."""
    import numpy as np

    import shmkit
    s = shmkit.Struct(names(), np.dtype([("a", "<i8"), ("b", "<f8")]), create=True)
    a = shmkit.Array(names(), "<f8", (100,), create=True)
    try:
        _damage_size(s._seg, 8)
        _damage_size(a._seg, 8)
        with pytest.raises(shmkit.CorruptError, match="layout needs 16"):
            s.record
        with pytest.raises(shmkit.CorruptError, match="layout needs 800"):
            a.array
    finally:
        s.close()
        a.close()


def test_segment_ndarray_checks_the_size_it_maps(name, monkeypatch):
    """Found by the busy-mode fuzzer (segment): a size shrunk by another process
    between ndarray()'s range check and its view raised numpy's ValueError."""
    import shmkit
    seg = shmkit.Segment.create(name, 8192)
    check = shmkit.Segment._check_range

    def check_then_shrink(self, offset, n):
        r = check(self, offset, n)
        _damage_size(self, 4096)  # the other process's store
        return r

    monkeypatch.setattr(shmkit.Segment, "_check_range", check_then_shrink)
    try:
        with pytest.raises(IndexError, match="outside the segment's 4096 bytes"):
            seg.ndarray("u1")
    finally:
        monkeypatch.undo()
        seg.close()
        seg.unlink()



def test_view_dropped_over_a_damaged_ring_is_freed_once(monkeypatch):
    """Found by the busy-mode fuzzer (channel, seed 101): a message view
    dropped while its ring was damaged reported the CorruptError with itself
    as the unraisable object; the hook's reference to it ran its dealloc a
    second time (a double free, then a segfault).  Each view also kept one
    reference to the segment's mapping for ever."""
    from conftest import run_python
    monkeypatch.setenv("PYTHONMALLOC", "debug")  # a double free is fatal at once
    out = run_python("""
        import struct, sys
        import shmkit
        from shmkit import _core
        ring = _core.layouts["ring"]
        ch = shmkit.Channel(None, capacity=4096)
        m = ch._seg._mapping
        refs = sys.getrefcount(m)
        ch.send(b"abc")
        with ch.recv_view(timeout=1) as mv:
            assert bytes(mv) == b"abc"
        ch.send(b"abc")
        assert bytes(ch.recv_view(timeout=1)) == b"abc"
        assert sys.getrefcount(m) == refs, ("mapping references", sys.getrefcount(m), refs)
        base = ch._seg._hsize
        view = memoryview(m)
        data = base + struct.unpack_from("<Q", view, base + ring["data_off"])[0]
        head = struct.unpack_from("<Q", view, base + ring["head"])[0]
        ch.send(b"defg")
        v = ch.recv_view(timeout=1)
        # the record lent out is overwritten: COMMITTED where TAKEN was
        struct.pack_into("<I", view, data + head % ch.capacity + 4, 0x80000001)
        del v  # its release finds the damage and reports it
        junk = [bytes(64) for _ in range(10000)]  # reuse what was freed
        del junk
        view.release()
        ch.close()
        print("survived")
    """, timeout=60)
    assert "survived" in out.stdout
    assert "CorruptError" in out.stderr and "behind the read position" in out.stderr


def test_rwlock_holds_overwritten_by_damage_are_reported_as_corrupt_on_release(name):
    """Found by the busy-mode fuzzer (rwlock, seeds 100-102): another process's
    store replaced the writers' lock word or this process's read count while
    it held them, and release_write()/release_read() raised RuntimeError."""
    import shmkit
    from shmkit import _core
    rw = shmkit.RWLock(name)
    try:
        m = rw._m
        assert rw.acquire_write(timeout=1)
        _core.store32(m, rw._base, 0)  # the writers' lock word, wiped
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            rw.release_write()
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            rw.release_write()  # again: the release of a `with` block around it
        with pytest.raises(RuntimeError, match="without holding it"):
            rw.release_write()  # then: still the caller's error
        _core.store32(m, rw._base + 4, 0)  # what the damage left of the state
        assert rw.acquire_read(timeout=1)
        for slot in range(rw._seg._max_slots):  # every read count, wiped
            _core.store64(m, rw._entry(slot), 0)
        with pytest.raises(shmkit.CorruptError, match="overwritten"):
            rw.release_read()
        with pytest.raises(RuntimeError, match="without a matching"):
            rw.release_read()  # the hold is gone: a second release is the caller's error
        with rw.write(timeout=1):  # and the lock still works
            pass
        with rw.read(timeout=1):
            pass
    finally:
        rw.close()


def test_semaphore_damaged_maximum_is_corrupt_and_over_release_stays_valueerror(names):
    """Found by the fuzzer (semaphore, seed 102 case 2924; seed 101 in use): a
    maximum damaged below the value plus the units held made the release of
    an acquired unit raise ValueError, the caller's error."""
    import shmkit
    from shmkit import _core
    s = shmkit.Semaphore(names(), value=3)
    bounded = shmkit.Semaphore(names(), value=1, maximum=1)
    try:
        assert s.acquire(timeout=1)
        _core.store32(s._m, s._base + 16, 3)  # maximum: none -> 3, under a holder
        with pytest.raises(shmkit.CorruptError, match="maximum changed"):
            s.release()
        _core.store32(s._m, s._base + 16, 1)  # a maximum below the value 2
        fresh = shmkit.Semaphore(s.name, create=False)  # opened over the damage
        try:
            with pytest.raises(shmkit.CorruptError, match="outside 0..1"):
                fresh.acquire(timeout=1)
            with pytest.raises(shmkit.CorruptError, match="outside 0..1"):
                fresh.release()
        finally:
            fresh.close()
        with pytest.raises(ValueError, match="beyond its maximum 1") as e:
            bounded.release()  # a sane maximum: the caller released what it never took
        assert not isinstance(e.value, shmkit.CorruptError)
        assert bounded.acquire(timeout=1)
        bounded.release()
    finally:
        s.close()
        bounded.close()


def test_heap_put_leaves_no_step_for_a_store_to_resize_its_block(name, monkeypatch):
    """Found by the busy-mode fuzzer (heap, seed 103): another process's store
    changed the size of the block put() had just allocated, and the copy into
    it raised memoryview's ValueError.  put() now allocates and copies in one
    call of the core, under the heap's lock and before the allocation
    commits: no other process sees the block before it is whole, and put()
    goes through no pin (where that store could land) at all."""
    import shmkit
    heap = shmkit.Heap(name, size=64 << 10, create=True)
    real_pin = shmkit.Heap.pin
    pins: list[int] = []

    def counted_pin(self, handle, **kwargs):
        pins.append(handle.index)
        return real_pin(self, handle, **kwargs)

    monkeypatch.setattr(shmkit.Heap, "pin", counted_pin)
    try:
        h = heap.put(b"x" * 100)
        assert pins == []
        assert heap.read(h) == b"x" * 100
    finally:
        monkeypatch.undo()
        heap.close()


def test_a_batch_replacing_an_index_word_damaged_meanwhile_is_corrupt(name):
    """Found by the busy-mode fuzzer (store, seed 101, case 51): a batch commit
    freed the block named by the index word it replaced without checking it,
    and a word that another process had damaged meanwhile made it write far
    outside the mapping (SIGSEGV).  Run in a forked child: a crash is a signal."""
    import shmkit
    from shmkit import _core
    pid = os.fork()
    if pid == 0:  # the child: 0 when the commit reports CorruptError
        code = 1
        try:
            st = shmkit.Store(name)
            st["a"] = b"1"
            seg = st._seg
            m, base = seg._mapping, seg._hsize
            ix = _core.load64(m, base + 8)  # the published index (table.h)
            nslots = _core.load64(m, base + ix + 16)
            words = [base + ix + 32 + 8 * i for i in range(nslots)]
            (slot,) = [o for o in words if _core.load64(m, o) > 1]  # "a"'s word
            try:
                with st.batch():
                    st["a"] = b"2"
                    w = _core.load64(m, slot)
                    _core.store64(m, slot, (w >> 40 << 40) | ((1 << 40) - 1))
            except shmkit.CorruptError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child died by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0, "the commit did not report the damaged word"


def test_len_in_a_batch_over_an_index_damage_shrank_is_corrupt(name):
    """len() inside a batch counts the batch's words against the published
    index: an index whose slot count damage made smaller than the batch's
    slots is CorruptError, not a read past the index.  Run in a forked
    child: a wild read is a signal."""
    import shmkit
    from shmkit import _core
    st = shmkit.Store(name)
    try:
        seg = st._seg
        m, base = seg._mapping, seg._hsize
        for i in range(20_000):
            st[i] = b"v"
        end = _core.load64(m, base + 32)
        pid = os.fork()
        if pid == 0:  # the child: 0 when len() reports the damage
            code = 1
            try:
                with st.batch():
                    for i in range(20_000):
                        st[i] = b"w"
                    assert st[0] == b"w"  # the batch's words now lie all over the index
                    f = (end - 256) & ~15  # an 8-word index in the free tail
                    _core.store64(m, base + f, 256 | 1 | 2)  # size | used | index
                    _core.store64(m, base + f + 16, 8)
                    _core.store64(m, base + 8, f)  # the header names it
                    _core.store64(m, base + 72, 0)  # the counters fit it
                    _core.store64(m, base + 80, 0)
                    try:
                        len(st)
                    except shmkit.CorruptError as e:
                        code = 0 if "beyond the index" in str(e) else 2
            except BaseException:
                pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), f"the child died by signal {os.WTERMSIG(status)}"
        assert os.WEXITSTATUS(status) == 0, "len() did not report the shrunk index"
    finally:
        st.close()


def test_a_batch_over_an_index_shrunk_by_damage_is_corrupt(name):
    """A batch's slots are checked against the index it publishes into: an
    index whose slot count damage shrank under the batch is CorruptError, and
    no word is stored beyond it.  (The busy-mode fuzzer, store seed 100, also
    crashed a commit that read its slots back from the journal in shared
    memory; the commit now publishes from its private copy.)"""
    import shmkit
    from shmkit import _core
    st = shmkit.Store(name)
    try:
        seg = st._seg
        m, base = seg._mapping, seg._hsize
        ix = _core.load64(m, base + 8)
        nslots = _core.load64(m, base + ix + 16)
        keys = [f"k{i}" for i in range(nslots // 2)]
        for k in keys:
            st[k] = b"v"
        ix = _core.load64(m, base + 8)
        nslots = _core.load64(m, base + ix + 16)
        # the key of the highest used slot, written again inside the batch
        words = [_core.load64(m, base + ix + 32 + 8 * i) for i in range(nslots)]
        top = max(i for i, w in enumerate(words) if w > 1)
        assert top >= nslots // 2  # half the slots used: one lies in the upper half
        beyond = base + ix + 32 + 8 * nslots  # the first word past the index
        before = _core.load64(m, beyond)
        with pytest.raises(shmkit.CorruptError, match="beyond the index"):
            with st.batch():
                for k in keys:
                    st[k] = b"w"
                assert st[keys[0]] == b"w"  # a read: the batch finds its words now
                _core.store64(m, base + ix + 16, nslots // 2)  # damage: still a valid size
        assert _core.load64(m, beyond) == before
    finally:
        st.close()
