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


def _check(name: str, kind: str, mode: str, seed: int, cases: int, timeout: float,
           first: int = 0) -> None:
    t0 = time.monotonic()
    rc, out, done = fuzz.run_child(kind, mode, name, seed, cases, timeout, first)
    assert rc >= 0, f"{kind} {mode} seed {seed}: child died by signal {-rc}:\n{out[-5000:]}"
    assert rc == 0, out[-5000:]
    assert f"done {kind} {mode}: {cases} cases, 0 with" in out, out[-5000:]
    assert done > 0
    print(f"{kind} {mode}: {done} cases (seed {seed}) in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("mode", ["idle", "busy"])
@pytest.mark.parametrize("kind", fuzz.KINDS)
def test_damaged_object_never_crashes_hangs_or_raises_a_stray_error(name, kind, mode):
    _check(name, kind, mode, 1, BOUNDED[mode == "busy"], timeout=120)


# Cases the fuzzer once failed, replayed exactly: (kind, mode, seed, case).
FOUND = [
    # a damaged max_size below a later resize() request: ValueError, now SizeLimitError
    ("segment", "idle", 100, 2961),
    ("segment", "idle", 100, 25),
]


@pytest.mark.parametrize("kind,mode,seed,case", FOUND)
def test_fuzz_findings_stay_fixed(name, kind, mode, seed, case):
    _check(name, kind, mode, seed, 1, timeout=60, first=case)


@pytest.mark.stress
@pytest.mark.parametrize("mode", ["idle", "busy"])
@pytest.mark.parametrize("kind", fuzz.KINDS)
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
