"""Named segments across real processes: creation, access, growth, lifetime, bad input.

Every test uses unique names (other test runs share /dev/shm); a test that
could crash the interpreter runs the risky part in a child process, so a
crash shows up as a signal exit code instead of killing the suite.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import json
import os
import pickle
import random
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

from typing import Any

import numpy as np
import pytest

import shmkit
from shmkit import _core
from shmkit import segment as segmod
from conftest import SPAWN, SRC, interrupt_at_bytecode, run_python, spawn

SHM = "/dev/shm/shmkit."


def _path(name: str) -> str:
    return SHM + name


@contextlib.contextmanager
def closing_all(*objs):
    try:
        yield objs
    finally:
        for o in objs:
            o.close()


# -- children (module level so that spawn can import them) -----------------

def _race_create(name: str, go, size: int, out: str) -> None:
    go.wait(10)
    seg = shmkit.Segment(name, size=size)
    with open(out, "a") as f:
        f.write(f"{os.getpid()} {int(seg.created)}\n")
    seg.close()


def _race_struct(name: str, go, out: str, initlog: str) -> None:
    def init(rec):
        with open(initlog, "a") as f:
            f.write(f"{os.getpid()}\n")
        rec["a"] = 41
        time.sleep(0.05)  # let the others pile up waiting on the init
        rec["a"] += 1

    go.wait(10)
    s = shmkit.Struct(name, np.dtype([("a", "<i8"), ("b", "<f8")]), init=init)
    with open(out, "a") as f:
        f.write(f"{int(s.created)} {int(s.record['a'])}\n")
    s.close()


def _hold_open(name: str, ready, release, path: str | None = None) -> None:
    seg = shmkit.Segment.open(name, path=path)
    ready.set()
    release.wait(30)
    seg.close()


def _hold_open_forever(name: str, ready) -> None:
    seg = shmkit.Segment.open(name)
    ready.set()
    time.sleep(60)
    seg.close()


def _create_attached_and_wait(name: str, ready) -> None:
    seg = shmkit.Segment(name, size=64, lifetime="attached")
    ready.set()
    time.sleep(60)
    seg.close()


def _open_close(name: str) -> None:
    shmkit.Segment.open(name).close()


def _grow_watcher(name: str, ready, grown, done, new_size: int) -> None:
    seg = shmkit.Segment.open(name)
    old_view = seg.buf
    ready.set()
    assert grown.wait(20)
    assert seg.size == new_size, seg.size
    seg.write(b"from-child", offset=new_size - 10)
    assert seg.read(10, offset=new_size - 10) == b"from-child"
    arr = seg.ndarray("uint8")
    assert arr.shape == (new_size,)
    arr[-11] = 7
    assert len(old_view) < new_size  # an old view keeps its length, and stays valid
    old_view[0] = 1
    del arr, old_view
    seg.close()
    done.set()


def _write_through_pickle(seg: shmkit.Segment, data: bytes) -> None:
    seg.write(data, offset=0)
    seg.close()


def _pickled_mutex_try(m) -> None:
    # The parent holds it: we must not get it, and must be able to once released.
    sys.exit(0 if m.acquire(timeout=0.05) is False else 3)


def _init_then_sleep(name: str, ready, sleep: float) -> None:
    def init(rec):
        rec.x = 11
        ready.set()
        time.sleep(sleep)
        rec.x = 12

    import ctypes

    class Rec(ctypes.Structure):
        _fields_ = [("x", ctypes.c_int64)]

    s = shmkit.Struct(name, Rec, init=init)
    time.sleep(60)
    s.close()


# -- create, open, create-or-open ------------------------------------------

def test_create_open_and_created(name):
    with pytest.raises(shmkit.NotFoundError):
        shmkit.Segment.open(name)
    with pytest.raises(shmkit.NotFoundError):
        shmkit.Segment(name)  # no size: open only
    a = shmkit.Segment.create(name, size=100)
    assert a.created and a.name == name and a.size == 100 and a.path == _path(name)
    with pytest.raises(shmkit.ExistsError) as e:
        shmkit.Segment.create(name, size=100)
    assert isinstance(e.value, FileExistsError)
    b = shmkit.Segment.open(name)
    c = shmkit.Segment(name, size=50)  # exists, and has room for that: opened
    assert not b.created and not c.created and c.size == 100
    with pytest.raises(shmkit.MismatchError):  # smaller than asked: refused
        shmkit.Segment(name, size=5000)
    a.write(b"xyz", offset=10)
    assert b.read(3, offset=10) == b"xyz" and c.read(3, offset=10) == b"xyz"
    for s in (a, b, c):
        s.close()
    a.close()  # twice is fine
    with pytest.raises(shmkit.ClosedError):
        a.read(1)
    d = shmkit.Segment(name, size=1)
    assert not d.created
    d.close()
    d.unlink()
    with pytest.raises(shmkit.NotFoundError):
        d.unlink()
    assert not os.path.exists(_path(name))


def test_listing_and_unlink_by_name(name):
    shmkit.Segment(name, size=8).close()
    assert (name, _path(name)) in list(shmkit.list_segments())
    shmkit.unlink(name)
    assert name not in dict(shmkit.list_segments())
    with pytest.raises(shmkit.NotFoundError):
        shmkit.unlink(name)
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.unlink("../etc")
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.Segment.open(None)  # nothing to open


def test_context_manager_and_repr(name):
    with shmkit.Segment(name, size=16) as s:
        assert "size=16" in repr(s)
    assert s.closed and "closed" in repr(s)
    s.unlink()


def test_bad_sizes_and_arguments(name):
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError):
            shmkit.Segment(name, size=bad)
    with pytest.raises(ValueError):
        shmkit.Segment(name, size=10, lifetime="forever")
    with pytest.raises(ValueError):
        shmkit.Segment(name, size=10, max_attach=0)
    with pytest.raises(ValueError):
        shmkit.Segment.create(name, size=10, readonly=True)
    with pytest.raises(shmkit.NotFoundError):  # readonly never creates
        shmkit.Segment(name, size=10, readonly=True)
    assert not os.path.exists(_path(name))


def test_create_race_has_exactly_one_winner(name, tmp_path):
    out = str(tmp_path / "out")
    go = SPAWN.Event()
    procs = [spawn(_race_create, name, go, 4096, out) for _ in range(6)]
    time.sleep(0.3)
    go.set()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    flags = [int(line.split()[1]) for line in open(out).read().splitlines()]
    assert len(flags) == 6 and sum(flags) == 1


def test_struct_init_runs_exactly_once_under_a_race(name, tmp_path):
    out, initlog = str(tmp_path / "out"), str(tmp_path / "init")
    go = SPAWN.Event()
    procs = [spawn(_race_struct, name, go, out, initlog) for _ in range(6)]
    time.sleep(0.3)
    go.set()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(open(initlog).read().splitlines()) == 1
    rows = [tuple(map(int, line.split())) for line in open(out).read().splitlines()]
    assert sorted(c for c, _ in rows) == [0, 0, 0, 0, 0, 1]
    assert all(a == 42 for _, a in rows)  # nobody saw the record before init finished


def test_unique_names():
    segs = [shmkit.Segment(None, size=8) for _ in range(20)]
    try:
        assert len({s.name for s in segs}) == 20
        assert all(s.created and os.path.exists(s.path) for s in segs)
    finally:
        for s in segs:
            s.close()
    # Anonymous segments have the "attached" lifetime: the last close removes them.
    assert not any(os.path.exists(s.path) for s in segs)


# -- data access ------------------------------------------------------------

def test_read_write_are_bounds_checked(name):
    with shmkit.Segment(name, size=64) as s:
        assert s.write(b"abc", offset=61) == 3
        assert s.read(3, offset=61) == b"abc"
        assert s.read(offset=60) == b"\0abc"
        assert s.write(np.arange(4, dtype=np.uint16)) == 8  # any buffer
        assert s.read(8) == np.arange(4, dtype=np.uint16).tobytes()
        for n, off in ((1, 64), (65, 0), (4, 61), (-1, 0), (1, -1)):
            with pytest.raises(IndexError):
                s.read(n, offset=off)
        for off in (62, 64, -1, 1 << 62):
            with pytest.raises(IndexError):
                s.write(b"abc", offset=off)
        with pytest.raises(TypeError):
            s.read(1, offset=1.0)
        with pytest.raises(TypeError):
            s.write("text")
        assert s.read(3, offset=61) == b"abc"  # nothing changed by the failures


def test_buf_and_ndarray_share_memory_across_processes(name):
    with shmkit.Segment(name, size=4096) as s:
        buf = s.buf
        assert isinstance(buf, memoryview) and len(buf) == 4096 and not buf.readonly
        a = s.ndarray("int64", (8, 8))
        a[:] = np.arange(64).reshape(8, 8)
        assert s.ndarray("int64", 64, offset=0)[63] == 63
        with pytest.raises(IndexError):
            s.ndarray("int64", (8, 65))
        with pytest.raises(IndexError):
            s.ndarray("int64", 4, offset=4096 - 16)
        run_python(f"""
            import shmkit, numpy as np
            s = shmkit.Segment.open({name!r})
            a = s.ndarray("int64", (8, 8))
            assert a.sum() == sum(range(64)), a.sum()
            a[0, 0] = -5
            s.close()
        """)
        assert a[0, 0] == -5 and buf[0] == 0xFB
        del a, buf


def test_close_with_exported_views_never_segfaults():
    # In a child, so a crash would show as a signal exit code.
    proc = run_python("""
        import ctypes, shmkit
        seg = shmkit.Segment(None, size=1 << 16)
        name, addr = seg.name, seg._mapping.address
        buf = seg.buf
        arr = seg.ndarray("uint32")
        rec = ctypes.c_uint32.from_buffer(seg.buf)
        seg.close()
        seg.unlink()
        # Views stay valid after close...
        buf[100] = 9
        arr[1000] = 123456
        rec.value = 77
        assert arr[0] == 77 and buf[100] == 9 and arr[1000] == 123456
        def mapped():
            return any(int(l.split("-")[0], 16) == addr for l in open("/proc/self/maps"))
        assert mapped()
        for call in (lambda: seg.buf, lambda: seg.read(1), lambda: seg.ndarray()):
            try:
                call()
            except shmkit.ClosedError:
                pass
            else:
                raise AssertionError("a closed segment handed out memory")
        del buf, rec
        assert mapped()
        del arr
        # ...and the memory is unmapped once the last one is released.
        assert not mapped()
        print("ok")
    """)
    assert proc.stdout.strip() == "ok"


def test_readonly(name):
    with shmkit.Segment(name, size=64) as w:
        w.write(b"data")
        with shmkit.Segment.open(name, readonly=True) as r:
            assert r.readonly and r.read(4) == b"data"
            with pytest.raises(shmkit.ReadOnlyError) as e:
                r.write(b"x")
            assert isinstance(e.value, PermissionError)
            with pytest.raises(shmkit.ReadOnlyError):
                r.resize(128)
            assert r.buf.readonly
            a = r.ndarray("uint8")
            assert not a.flags.writeable
            with pytest.raises(ValueError):
                a[0] = 1
            with pytest.raises(PermissionError):
                r.lock.acquire()
            w.write(b"new!")
            assert r.read(4) == b"new!"  # sees the writer's changes
            assert w.readonly_attached()
            del a
        assert not w.readonly_attached()


def test_file_backed_segment_persists(tmp_path):
    path = tmp_path / "data.seg"
    with shmkit.Segment(None, size=1000, path=path) as s:
        assert s.path == str(path) and s.created
        s.write(b"persistent", offset=500)
    assert path.exists()
    proc = run_python(f"""
        import shmkit
        with shmkit.Segment.open(path={str(path)!r}) as s:
            print(s.read(10, offset=500).decode())
    """)
    assert proc.stdout.strip() == "persistent"
    assert path.exists()
    with pytest.raises(shmkit.NotFoundError):
        shmkit.Segment.open(path=tmp_path / "missing")
    with pytest.raises(shmkit.NotFoundError):
        shmkit.Segment(None, size=10, path=tmp_path / "no-such-dir" / "x")
    s = shmkit.Segment.open(path=path)
    s.close()
    s.unlink()
    assert not path.exists()


def test_mode(name, names):
    with shmkit.Segment(name, size=8):
        assert stat.S_IMODE(os.stat(_path(name)).st_mode) == 0o600
    old = os.umask(0o077)
    try:
        other = names()
        with shmkit.Segment(other, size=8, mode=0o640):
            assert stat.S_IMODE(os.stat(_path(other)).st_mode) == 0o640
    finally:
        os.umask(old)
    # Beyond the permission bits (set-user-ID and the like, which an
    # unprivileged creator would silently lose, or more than 32 bits, which
    # the core once truncated), a mode is refused, and nothing is made.
    for bad in (0o4600, 0o2770, 0o1777, 0o10000, -1, 2**32 + 0o600, 2**40, True, "0o600"):
        bad_name = names()
        with pytest.raises(ValueError, match="permission bits"):
            shmkit.Segment(bad_name, size=8, mode=bad)
        assert not os.path.exists(_path(bad_name))


def test_create_errors_name_the_directory_and_what_to_do(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with pytest.raises(shmkit.NotFoundError, match="does not exist.*another path"):
        shmkit.Segment(path=plain / "seg", size=8)
    with pytest.raises(shmkit.NotFoundError, match="does not exist"):
        shmkit.Segment(path=tmp_path / "missing" / "seg", size=8)
    # A directory this user may not write to (root's, opened by nobody).
    top = tempfile.mkdtemp(dir="/dev/shm", prefix="shmkit-test-")
    os.chmod(top, 0o755)
    locked = os.path.join(top, "locked")
    os.mkdir(locked, 0o755)
    code = textwrap.dedent(f"""
        import os, shmkit
        os.setgid(65534); os.setuid(65534)
        try:
            shmkit.Segment(path={os.path.join(locked, "seg")!r}, size=8)
        except PermissionError as e:
            print("refused:", e)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=SRC), timeout=60)
        assert "refused:" in out.stdout and "no permission to create" in out.stdout \
            and locked in out.stdout, out.stdout + out.stderr
        assert os.listdir(locked) == []
    finally:
        os.rmdir(locked)
        os.rmdir(top)


def test_symlink_at_the_name_is_refused(name, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, _path(name))
    try:
        with pytest.raises(shmkit.InvalidNameError):
            shmkit.Segment.open(name)
        with pytest.raises(shmkit.InvalidNameError):
            shmkit.Segment(name, size=4096)
        with pytest.raises(shmkit.ExistsError):
            shmkit.Segment.create(name, size=4096)
        assert victim.read_bytes() == b"precious"
        assert os.path.islink(_path(name))
    finally:
        os.unlink(_path(name))


@pytest.mark.parametrize("bad", ["a/b", "/abs", "..", ".", "", "x" * 201, "sp ace",
                                 "new\nline", 123, b"bytes", 1.5])
def test_name_validation(bad):
    with pytest.raises(shmkit.InvalidNameError) as e:
        shmkit.Segment(bad, size=8)
    assert isinstance(e.value, ValueError)
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.Segment.open(bad)
    with pytest.raises(shmkit.InvalidNameError):
        shmkit.Mutex(bad)


def test_longest_name_is_accepted(names):
    n = names()
    long = n + "x" * (200 - len(n))
    try:
        with shmkit.Segment(long, size=8) as s:
            assert s.created
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(long))


# -- growth -----------------------------------------------------------------

def test_resize_seen_by_another_process(name):
    s = shmkit.Segment(name, size=4096)
    ready, grown, done = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    new_size = 3 * 4096 + 100
    p = spawn(_grow_watcher, name, ready, grown, done, new_size)
    try:
        assert ready.wait(30)
        s.resize(new_size)
        assert s.size == new_size
        grown.set()
        p.join(30)
        assert p.exitcode == 0  # a SIGBUS would be -7
        assert s.read(10, offset=new_size - 10) == b"from-child"
        assert s.read(1, offset=new_size - 11) == b"\x07"
        assert s.read(1, offset=0) == b"\x01"
        assert s.info()["resizes"] == 1
    finally:
        s.close()


def test_shrink_then_stale_views_read_zeros():
    proc = run_python("""
        import shmkit
        s = shmkit.Segment(None, size=5 * 4096)
        try:
            s.write(b"\\xff" * (5 * 4096))
            stale = s.buf
            arr = s.ndarray("uint8")
            s.resize(100)
            assert s.size == 100
            assert bytes(stale[:100]) == b"\\xff" * 100   # kept
            assert not any(stale[100:]) and not arr[100:].any()  # zeros, no SIGBUS
            try:
                s.read(1, offset=100)
            except IndexError:
                pass
            else:
                raise AssertionError("read past the shrunk end")
            s.resize(3 * 4096)
            assert s.read(100) == b"\\xff" * 100
            assert not any(s.read(3 * 4096 - 100, offset=100))  # regrown bytes are zeros
            print("ok")
        finally:
            s.close(); s.unlink()
    """)
    assert proc.stdout.strip() == "ok"


def test_resize_bad_arguments(name):
    with shmkit.Segment(name, size=10, max_size=8192) as s:
        for bad in (-1, 1.5, "2", True):
            with pytest.raises(ValueError):
                s.resize(bad)
        with pytest.raises(ValueError):
            s.resize(8193)
        s.resize(8192)
        assert s.size == 8192 and s.max_size == 8192


def test_a_ctrl_c_at_any_step_of_a_resize_leaves_the_lock_free_and_the_bytes_whole(name):
    """A Ctrl-C at each bytecode of segment.py while it grows or shrinks a
    segment, as a signal handler raising there would: the resize happened
    whole or not at all, the segment's lock is free after it, and every byte
    the size covers is as it was.  (The lock used to be taken by one call
    and let go by a try block after it: a Ctrl-C as that call returned left
    the lock held, and another process's resize timed out naming this one.)"""
    segment_py = segmod.__file__
    pattern = bytes(range(256)) * 80
    gc.disable()  # (no collector callback, another library's, to take the interrupt)
    with contextlib.ExitStack() as stack:
        stack.callback(gc.enable)
        s = stack.enter_context(shmkit.Segment(name, size=5 * 4096, max_size=1 << 20))
        for start, target in ((3 * 4096, 5 * 4096), (5 * 4096, 100)):
            for k in range(1, 5000):
                s.resize(start)
                s.write(pattern[:start])
                seen = interrupt_at_bytecode(k, lambda c: c.co_filename == segment_py)
                try:
                    s.resize(target)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                assert not s.lock.locked(), f"Ctrl-C at bytecode {k}: the lock stayed held"
                assert s.size in (start, target), f"bytecode {k}: size {s.size}"
                assert s.read(min(s.size, start)) == pattern[:min(s.size, start)]
                assert not any(s.read(s.size - min(s.size, start), offset=min(s.size, start)))
                if seen[0] < k:  # the resize ran to its end uninterrupted
                    assert s.size == target
                    break
            else:
                raise AssertionError("the resize never ran to its end")
            assert k > 3  # it was interrupted at several points first


def test_a_thread_that_holds_the_segments_lock_resizes_under_it(name):
    """``with seg.lock: seg.resize(n)`` waited for its own lock forever (with
    the default timeout=None); the resize is now made under the lock, which
    stays held to the end of the block.  A lock that another thread of the
    process holds, or that another thread released for this one, makes the
    resize wait for it as before."""
    proc = run_python(f"""
        import threading, shmkit

        def in_thread(fn):
            t = threading.Thread(target=fn)
            t.start()
            t.join()

        with shmkit.Segment({name!r}, size=4096, max_size=1 << 20) as s:
            with s.lock:
                s.resize(8192)
                s.write(b"x", offset=8191)
                got = []
                in_thread(lambda: got.append(s.lock.acquire(timeout=0.1)))
                assert got == [False], "the lock was let go inside the block"
                s.resize(100)
                assert s.lock.locked() and s.size == 100
            assert not s.lock.locked()

            held, done = threading.Event(), threading.Event()
            def hold():
                with s.lock:
                    held.set()
                    done.wait()
            t = threading.Thread(target=hold)
            t.start()
            held.wait()
            try:
                s.resize(4096, timeout=0.2)
                raise AssertionError("resized while another thread held the lock")
            except shmkit.Timeout:
                pass
            finally:
                done.set()
                t.join()

            s.lock.acquire()
            in_thread(s.lock.release)  # let go for this thread by another one
            s.resize(4096, timeout=5)
            assert not s.lock.locked() and s.size == 4096
            print("ok")
    """, timeout=60)
    assert proc.stdout.split() == ["ok"]


def test_a_resize_through_another_handle_of_a_lock_this_thread_holds_is_refused(name):
    """``with a.lock: b.resize(n)``, a and b two handles of one segment in one
    thread, waited for itself (for ever with timeout=None): the lock word
    carries a's token, which b's resize took for another holder.  It is now
    BusyError at once.  Another thread's resize through b still waits for the
    block, and a lock of another segment held meanwhile changes nothing."""
    proc = run_python(f"""
        import threading, time, shmkit

        a = shmkit.Segment({name!r}, size=4096, max_size=1 << 20)
        b = shmkit.Segment({name!r})
        other = shmkit.Segment({name + "-other"!r}, size=4096)
        with a.lock:
            t0 = time.monotonic()
            try:
                b.resize(8192)  # timeout=None: for ever before
                raise AssertionError("resized through b under a's lock")
            except shmkit.BusyError as e:
                assert "another handle" in str(e), e
            assert time.monotonic() - t0 < 5
            assert a.lock.locked() and b.size == 4096
            got = []
            t = threading.Thread(target=lambda: got.append(b.resize(8192, timeout=30)))
            t.start()
            time.sleep(0.3)
            assert t.is_alive() and not got, "another thread resized inside the block"
        t.join(30)
        assert got == [None] and b.size == a.size == 8192
        with other.lock:
            b.resize(4096, timeout=5)  # another file's lock held by this thread
        with b.lock:
            b.resize(100, timeout=5)  # b's own lock: under it, as before
        assert a.size == 100 and not a.lock.locked()
        other.unlink(); a.unlink(); b.close()
        print("ok")
    """, timeout=60)
    assert proc.stdout.split() == ["ok"]


@pytest.mark.parametrize("new_size", [3 * 4096, 2 * 4096, 100])
def test_a_resize_gives_back_what_a_failed_one_left_past_the_payload(name, new_size):
    # A resizer killed in its allocation (or one that ran out of room part
    # way) leaves the file allocated past the payload: nothing lives there,
    # and no later resize gave it back.
    with shmkit.Segment(name, size=2 * 4096) as s:
        s.write(b"k" * 100)
        fd = os.open(s.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, s._hsize + 2 * 4096, 8 << 20)  # as a dead resizer left it
        finally:
            os.close(fd)
        assert _core.file_sizes(s._mapping)[1] > 8 << 20
        s.resize(new_size)
        assert _core.file_sizes(s._mapping)[1] < 1 << 20
        assert s.size == new_size and s.read(100) == b"k" * 100


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs, so running out of space is quick and harmless."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_out_of_space_is_an_exception(small_tmpfs):
    with pytest.raises(shmkit.OutOfSpaceError) as e:
        shmkit.Segment(None, size=16 << 20, path=small_tmpfs / "big")
    assert isinstance(e.value, MemoryError)
    assert os.listdir(small_tmpfs) == []  # no half-made or temporary file left
    s = shmkit.Segment(None, size=1 << 20, path=small_tmpfs / "grow")
    try:
        s.write(b"keep me", offset=100)
        with pytest.raises(shmkit.OutOfSpaceError):
            s.resize(64 << 20)
        assert s.size == 1 << 20 and s.read(7, offset=100) == b"keep me"
        s.resize(2 << 20)  # what fits still works
        assert s.size == 2 << 20
        # Opening an existing segment through create-or-open allocates nothing.
        big = shmkit.Segment(None, size=5 << 20, path=small_tmpfs / "big")
        again = shmkit.Segment(None, size=5 << 20, path=small_tmpfs / "big")
        assert big.created and not again.created
        assert sorted(os.listdir(small_tmpfs)) == ["big", "grow"]
        again.close()
        big.close()
    finally:
        s.close()
        s.unlink()


# -- lifetime ----------------------------------------------------------------

def test_attached_removed_when_last_closes(name):
    a = shmkit.Segment(name, size=64, lifetime="attached")
    b = shmkit.Segment.open(name)
    a.close()
    assert os.path.exists(_path(name))
    b.close()
    assert not os.path.exists(_path(name))


def test_attached_kept_while_another_process_lives(name):
    a = shmkit.Segment(name, size=64, lifetime="attached")
    ready, release = SPAWN.Event(), SPAWN.Event()
    p = spawn(_hold_open, name, ready, release)
    assert ready.wait(30)
    a.close()
    assert os.path.exists(_path(name))
    release.set()
    p.join(30)
    assert p.exitcode == 0
    assert not os.path.exists(_path(name))


def test_open_and_close_elsewhere_never_removes_it(name):
    # The stdlib resource-tracker bug: a process that merely opens and closes
    # must not delete what another process still uses.
    a = shmkit.Segment(name, size=64, lifetime="attached")
    a.write(b"alive")
    for _ in range(2):
        p = spawn(_open_close, name)
        p.join(30)
        assert p.exitcode == 0
    run_python(f"import shmkit; shmkit.Segment.open({name!r}).close()")
    assert os.path.exists(_path(name))
    assert a.read(5) == b"alive"
    # Persistent segments are never removed by closing at all.
    a.close()
    assert not os.path.exists(_path(name))


def test_persistent_survives_every_close(name):
    shmkit.Segment(name, size=8).close()
    p = spawn(_open_close, name)
    p.join(30)
    assert p.exitcode == 0 and os.path.exists(_path(name))


def test_attached_sigkilled_last_attacher_leaves_it_for_gc(name):
    ready = SPAWN.Event()
    p = spawn(_create_attached_and_wait, name, ready)
    assert ready.wait(30)
    p.kill()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert os.path.exists(_path(name))  # nobody could close it
    s = shmkit.Segment.open(name)
    assert [a["pid"] for a in s.attachments()] == [os.getpid()]
    s.close()  # the last (live) attacher leaving removes it
    assert not os.path.exists(_path(name))


def test_attached_readonly_last_closer_removes_it(name):
    w = shmkit.Segment(name, size=64, lifetime="attached")
    r = shmkit.Segment.open(name, readonly=True)
    w.close()
    assert os.path.exists(_path(name))  # the reader still uses it
    r.close()
    assert not os.path.exists(_path(name))


# -- self-description and bad segments ---------------------------------------

def test_wrong_kind(name):
    m = shmkit.Mutex(name)
    try:
        with pytest.raises(shmkit.WrongKindError) as e:
            shmkit.Segment.open(name)
        assert "mutex" in str(e.value)
        with pytest.raises(shmkit.WrongKindError):
            shmkit.Segment(name, size=10)
        with pytest.raises(shmkit.WrongKindError):
            shmkit.Event(name)
        with pytest.raises(shmkit.WrongKindError):
            shmkit.Array.open(name)
    finally:
        m.close()


def _patch(name: str, offset: int, data: bytes) -> None:
    fd = os.open(_path(name), os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_other_format_version(name):
    shmkit.Segment(name, size=16).close()
    _patch(name, 8, struct.pack("=I", segmod.FORMAT_VERSION + 1))
    with pytest.raises(shmkit.FormatVersionError) as e:
        shmkit.Segment.open(name)
    assert f"version {segmod.FORMAT_VERSION + 1}" in str(e.value)


@pytest.mark.parametrize("where,data", [
    (0, b"GARBAGE!"),                          # magic
    (12, struct.pack("=I", 99)),               # kind
    (20, struct.pack("=I", 0)),                # max_slots
    (20, struct.pack("=I", 5000)),
    (24, struct.pack("=Q", 12345)),            # header size
    (32, struct.pack("=Q", 1 << 50)),          # size > max_size
    (32, struct.pack("=Q", 1 << 30)),          # size beyond the file
    (40, struct.pack("=Q", 1 << 60)),          # max_size
    (72, struct.pack("=I", 4000)),             # layout length
    (1024, b"{not json"),                      # layout
    (1024, b"[1, 2, 3]"),
    (1024, b"\xff\xfe\x00"),
])
def test_corrupt_header_raises_corrupt_error(name, where, data):
    shmkit.Segment(name, size=4096).close()
    _patch(name, where, data)
    if where == 1024:
        _patch(name, 72, struct.pack("=I", len(data)))
    with pytest.raises(shmkit.CorruptError):
        shmkit.Segment.open(name)
    with pytest.raises(shmkit.CorruptError):
        shmkit.Segment(name, size=4096)


@pytest.mark.parametrize("length", [0, 100, 5000])
def test_truncated_or_foreign_file_raises_corrupt_error(name, length):
    with open(_path(name), "wb") as f:
        f.write(os.urandom(length))
    os.chmod(_path(name), 0o600)
    with pytest.raises(shmkit.CorruptError):
        shmkit.Segment.open(name)


def test_corruption_after_open_is_detected(name):
    with shmkit.Segment(name, size=4096) as s:
        peer = shmkit.Segment.open(name)
        _patch(name, 32, struct.pack("=Q", 1 << 40))  # a size the file cannot hold
        with pytest.raises(shmkit.CorruptError):
            peer.size
        with pytest.raises(shmkit.CorruptError):
            peer.read(1)
        _patch(name, 32, struct.pack("=Q", 4096))
        assert peer.read(1) == b"\0"
        # Hostile attach-table and lock words: bounded, never a crash.
        _patch(name, 68, struct.pack("=I", 0xFFFFFFFF))      # hwm
        _patch(name, 60, struct.pack("=I", 0x3FFFFFFF))      # lock owned by slot 1023
        assert {a["pid"] for a in peer.attachments()} == {os.getpid()}
        with pytest.warns(shmkit.OwnerDiedWarning):
            assert peer.lock.acquire(timeout=1)
        peer.lock.release()
        peer.close()


def test_half_created_segment_is_reported_and_openers_wait_for_init(name):
    # A creator still inside init: openers wait for it, then see init's work.
    ready = SPAWN.Event()
    p = spawn(_init_then_sleep, name, ready, 0.8)
    try:
        assert ready.wait(30)
        t0 = time.monotonic()
        s = shmkit.Struct(name)
        assert time.monotonic() - t0 > 0.3
        assert int(s.record["x"]) == 12
        s.close()
    finally:
        p.kill()
        p.join()


def test_creator_killed_inside_init_is_recovered_by_next_create(names):
    name = names()
    ready = SPAWN.Event()
    p = spawn(_init_then_sleep, name, ready, 60)
    assert ready.wait(30)
    result: list = []

    def opener():
        try:
            result.append(shmkit.Segment.open(name))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            result.append(e)

    t = threading.Thread(target=opener)
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and not result  # waiting for init, not failing
    p.kill()
    p.join()
    t0 = time.monotonic()
    t.join(10)
    assert time.monotonic() - t0 < 2
    # open() (no create) reports it as missing, and says why.
    assert isinstance(result[0], shmkit.NotFoundError), result
    assert "half-created" in str(result[0]) and "create-or-open" in str(result[0])
    # The next create-or-open recovers the name without anyone's help.
    with shmkit.Segment(name, size=8) as seg:
        assert seg.created and seg.size == 8


def test_init_that_raises_leaves_nothing_and_a_waiting_opener_creates(name):
    # The opener starts while the creator's init runs; init fails, so the
    # opener must create the segment itself rather than report corruption.
    code = f"""
        import shmkit, sys, time
        def init(seg):
            print("in init", flush=True)
            time.sleep(0.5)
            raise RuntimeError("boom")
        seg = shmkit.Segment.__new__(shmkit.Segment)
        try:
            seg._attach({name!r}, None, size=10, create=None, init=init)
        except RuntimeError:
            print("failed", flush=True)
    """
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "in init"
        s = shmkit.Segment(name, size=10)
        assert s.created
        s.close()
        assert proc.stdout.readline().strip() == "failed"
    finally:
        proc.wait(10)


# -- fork, pickling, attach table ---------------------------------------------

def _in_fork(fn) -> int:
    """Run fn() in a forked child; return its exit status (0 = fn returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - report through the exit code
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_child_reattaches_with_its_own_slot(name):
    s = shmkit.Segment(name, size=64)
    r = shmkit.Segment.open(name, readonly=True)
    m = shmkit.Mutex(None)
    try:
        parent_slot = s._token & 0x3FF
        m.acquire()

        def child():
            assert s._token and (s._token & 0x3FF) != parent_slot
            pids = {a["pid"] for a in s.attachments()}
            assert pids == {os.getpid(), os.getppid()}, pids
            assert r.read(1) == b"\0" and s.readonly_attached()
            s.write(b"c", offset=1)
            # The parent's holding is not ours: separate ownership.
            assert m.locked() and m.acquire(timeout=0.05) is False
            with pytest.raises(RuntimeError):
                m.release()
            r.close()
            s.close()

        assert _in_fork(child) == 0
        assert s.read(2) == b"\0c"
        assert {a["pid"] for a in s.attachments()} == {os.getpid()}
        assert s.readonly_attached()  # our own readonly handle r is still open
        m.release()
        # And the other way round: a child's holding is its own.
        assert _in_fork(lambda: (m.acquire(), os._exit(0))) == 0
        with pytest.warns(shmkit.OwnerDiedWarning):  # the child exited holding it
            assert m.acquire(timeout=2)
        assert m.recovered
        m.release()
    finally:
        r.close()
        s.close()
        m.close()
        m.unlink()


def test_threads_closing_one_handle_at_once_close_it_once():
    """Eight threads close one "attached" handle at the same moment, 200
    times: the core's one call ends the lifetime, with the GIL held, so
    exactly one of them removes the name and runs on_destroy, and the file
    is closed once (a second close of its number could close a file another
    thread opened meanwhile)."""
    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(200):
        calls: list[int] = []
        seg = shmkit.Segment(None, size=64, on_destroy=lambda: calls.append(1))
        path = seg.path
        go = threading.Barrier(8)

        def close() -> None:
            go.wait()
            seg.close()

        threads = [threading.Thread(target=close) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seg.closed and not os.path.exists(path)
        assert calls == [1]
    assert set(os.listdir("/proc/self/fd")) == fds


def test_a_resize_racing_another_threads_close_never_touches_another_file(tmp_path):
    """One thread resizes a segment up and down while another closes it and
    two more open a file of their own.  The resize's fallocate and punched
    hole borrow the descriptor from the mapping, which keeps it open until
    they return: the number the close frees, which an open may take at
    once, never reaches them (before, 242 rounds in 3,286 zeroed that other
    file's pages).  The resize ends with ClosedError."""
    victim = tmp_path / "victim"
    pattern = b"\xaa" * (1 << 20)
    errors: collections.Counter[str] = collections.Counter()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        t0, rounds = time.monotonic(), 0
        # 3 s, or up to 20 s on a loaded machine until 100 rounds are done
        while time.monotonic() - t0 < (3 if rounds >= 100 else 20):
            victim.write_bytes(pattern)
            seg = shmkit.Segment(None, 65536)
            stop = threading.Event()

            def resizer() -> None:
                try:
                    while not stop.is_set():
                        seg.resize(65536)
                        seg.resize(0)
                except Exception as e:
                    errors[type(e).__name__] += 1

            def opener() -> None:
                while not stop.is_set():
                    fd = os.open(victim, os.O_RDWR)
                    time.sleep(0)
                    os.close(fd)

            threads = [threading.Thread(target=f) for f in (resizer, opener, opener)]
            for t in threads:
                t.start()
            time.sleep(random.random() * 0.003)
            seg.close()
            time.sleep(0.001)
            stop.set()
            for t in threads:
                t.join()
            assert victim.read_bytes() == pattern, f"round {rounds}: the other file changed"
            rounds += 1
    finally:
        sys.setswitchinterval(switch)
    assert rounds >= 50
    assert set(errors) <= {"ClosedError"}, errors


def test_a_resize_whose_handle_another_thread_closes_lets_the_lock_go(name):
    """A handle closed by another thread while its resize allocates: the
    resize ends whole, and its lock is let go.  (The close took the token,
    so the release was refused: the word kept the closed attachment's token,
    and the next resizer took the lock over from a "dead" holder, with an
    OwnerDiedWarning about a live process.)"""
    with shmkit.Segment(name, size=4096, max_size=1 << 30) as other:
        landed = 0
        for k in range(40):
            seg = shmkit.Segment(name)
            errors: list[BaseException] = []

            def resize() -> None:
                try:
                    seg.resize(256 << 20 if k % 2 == 0 else 4096)
                except BaseException as e:
                    errors.append(e)

            t = threading.Thread(target=resize)
            t.start()
            time.sleep(random.random() * 0.02)
            seg.close()
            t.join()
            assert all(isinstance(e, shmkit.ClosedError) for e in errors), errors
            landed += bool(errors)
            assert not other.lock.locked(), f"round {k}: the closed handle's lock stayed held"
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                other.resize(4096 if k % 2 == 0 else 256 << 20, timeout=5)
        assert landed > 0, "no close fell inside a resize"


def test_a_child_forked_while_threads_close_attached_handles_runs_each_hook_once(tmp_path):
    """The main thread forks while four others close the last handles of 24
    "attached" objects, for 2 s and 11 rounds at least.  Each object's
    on_destroy runs once in all, in the process whose close removed its
    name: a child that inherits a handle its parent's thread was closing, or
    had just closed, neither runs the parent's hook again nor keeps its name."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        t0, rounds = time.monotonic(), 0
        # 2 s, and at least 11 rounds (a loaded machine under ASan runs few)
        while (time.monotonic() - t0 < 2 or rounds <= 10) and time.monotonic() - t0 < 60:
            runs: collections.Counter[int] = collections.Counter()
            handles = [shmkit.Segment(path=tmp_path / f"f{i}", size=64, lifetime="attached",
                                      on_destroy=functools.partial(runs.update, [i]))
                       for i in range(24)]
            start = threading.Barrier(5)

            def closer(part: list[shmkit.Segment]) -> None:
                start.wait()
                for h in part:
                    h.close()

            threads = [threading.Thread(target=closer, args=(handles[j::4],))
                       for j in range(4)]
            for t in threads:
                t.start()
            start.wait()
            time.sleep(random.random() * 0.0005)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                before = collections.Counter(runs)
                for h in handles:
                    h.close()
                os.write(w, json.dumps(sorted((runs - before).elements())).encode())
                os._exit(0)
            os.close(w)
            for t in threads:
                t.join()
            with os.fdopen(r, "rb") as f:
                in_child = json.loads(f.read() or b"null")
            assert os.waitpid(pid, 0)[1] == 0 and in_child is not None
            total = runs + collections.Counter(in_child)
            assert all(total[i] == 1 for i in range(24)), (rounds, dict(total))
            assert os.listdir(tmp_path) == []
            rounds += 1
    finally:
        sys.setswitchinterval(switch)
    assert rounds > 10


def test_a_handle_used_by_threads_while_another_closes_it_raises_only_closed_error():
    """Two threads use a handle (write, read, buf, size, info, attachments,
    resize, its lock) while the main thread closes it: every call either
    works or raises ClosedError, never a bare OSError (an fstat of the freed
    descriptor) or ValueError (the closed mapping's buffer), as some did."""
    ops = {
        "write": lambda h: h.write(b"abcdefgh", offset=0),
        "read": lambda h: h.read(8, offset=0),
        "buf": lambda h: h.buf.release(),
        "size": lambda h: h.size,
        "info": lambda h: h.info(),
        "attachments": lambda h: h.attachments(),
        "resize": lambda h: h.resize(128 if h.size == 64 else 64),
        # (released only when taken: the other thread may hold it past 10 ms)
        "lock": lambda h: h.lock.acquire(timeout=0.01) and h.lock.release(),
    }
    raised: collections.Counter[str] = collections.Counter()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            for name, op in ops.items():
                h = shmkit.Segment(None, 64)
                stop = threading.Event()

                def use() -> None:
                    try:
                        while not stop.is_set():
                            op(h)
                    except Exception as e:
                        raised[f"{name}: {type(e).__name__}"] += 1

                threads = [threading.Thread(target=use) for _ in range(2)]
                for t in threads:
                    t.start()
                time.sleep(0.001)
                h.close()
                stop.set()
                for t in threads:
                    t.join()
    finally:
        sys.setswitchinterval(switch)
    assert raised and all(k.endswith(": ClosedError") for k in raised), dict(raised)


_FORK_MID_CREATION = r"""
import os, sys, threading, time, shmkit
name = sys.argv[1]
inside, go = threading.Event(), threading.Event()
def init(seg):
    inside.set()
    go.wait()
threading.Thread(target=lambda: shmkit.Struct(name, "i8", init=init), daemon=True).start()
if not inside.wait(30):
    sys.exit("the creation never reached its init")
kid = os.fork()
if kid == 0:  # a worker: lives on, and must hold nothing of the creation
    held = [f for f in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{f}").startswith("/dev/shm/")]
    os.write(1, b"worker %d\n" % len(held))  # one write: lines never interleave
    time.sleep(120)
    os._exit(0)
os.write(1, b"forked %d\n" % kid)
time.sleep(120)
"""


@pytest.mark.parametrize("reserve", [4096, 1 << 30])
def test_a_fork_while_another_thread_opens_a_new_file_leaves_the_child_nothing(reserve):
    """The core lists a creation's file from the moment it is opened (with
    the GIL held) and maps it without releasing the GIL, so a child forked
    by another thread at any point of create_file neither holds the file
    open nor keeps it mapped (a mapping would keep the creator's open file,
    and its init lock, alive too).  Before, the file was listed only once
    mapped, and a thread waiting to fork got the GIL exactly at
    create_file's first release: about 99% of such children kept the file
    open, and with the descriptor listed but the mmap releasing the GIL,
    about half still kept it mapped."""
    where = f"/dev/shm/shmkit-test-forkcreate-{os.getpid()}-{os.urandom(3).hex()}"
    os.mkdir(where)
    stop = threading.Event()

    def creator() -> None:
        while not stop.is_set():
            fd, mapping = _core.create_file(where.encode(), b"", 0o600, 4096, reserve)
            mapping.detach(fd)

    t = threading.Thread(target=creator)
    t.start()
    forks = held = 0
    try:
        t0 = time.monotonic()
        # 2 s, and at least 10 forks (a loaded machine under ASan makes few)
        while (time.monotonic() - t0 < 2 or forks < 10) and time.monotonic() - t0 < 60:
            pid = os.fork()
            if pid == 0:
                n = 0
                for f in os.listdir("/proc/self/fd"):
                    with contextlib.suppress(OSError):
                        n += os.readlink(f"/proc/self/fd/{f}").startswith(where + "/")
                with open("/proc/self/maps") as maps:
                    n += sum(where + "/" in line for line in maps)
                os._exit(min(n, 100))
            held += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
            forks += 1
            time.sleep(0.002)
    finally:
        stop.set()
        t.join()
        os.rmdir(where)
    assert forks >= 10  # (few under ASan: a fork copies its shadow memory)
    assert held == 0, f"{held} of {forks} children kept a creation's file open or mapped"


def test_a_child_forked_mid_creation_holds_nothing_of_it(name):
    """Another thread is inside a creation's init when the process forks a
    long-lived worker, and then the creator is killed.  The worker let go of
    the creation's file (it would keep the init lock held, so openers time
    out, or hold a slot of the unpublished file, so it reads as damaged):
    open() says half-created, and the next create-or-open recovers the name."""
    proc = subprocess.Popen([sys.executable, "-c", _FORK_MID_CREATION, name],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=SRC))
    worker = None
    try:
        lines = sorted(proc.stdout.readline().split() for _ in range(2))
        assert lines[0][0] == "forked", lines
        worker = int(lines[0][1])
        assert lines[1] == ["worker", "0"], lines  # no descriptor of the creation
        proc.kill()
        proc.wait(10)
        with pytest.raises(shmkit.NotFoundError, match="half-created"):
            shmkit.Segment.open(name)
        with shmkit.Struct(name, "i8") as rec:
            assert rec._seg.created
            assert {a["pid"] for a in rec._seg.attachments()} == {os.getpid()}
    finally:
        proc.kill()
        proc.wait(10)
        if worker is not None:
            os.kill(worker, 9)


def test_an_init_that_forks_its_workers_keeps_their_writes():
    """The thread creating an object forks from inside init (workers that
    fill it in parallel): that creation is the child's own thread's, so the
    child keeps it, and the workers' writes reach the object."""
    def init(arr: Any) -> None:
        kids = []
        for half in range(2):
            pid = os.fork()
            if pid == 0:
                arr[half * 4:half * 4 + 4] = range(half * 4, half * 4 + 4)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    with shmkit.Array(None, "int64", 8, init=init) as a:
        assert a.array.tolist() == list(range(8))


def _child_of_init(name: str, order: str) -> tuple[str, bool, int]:
    """Create a Struct whose init forks a child that returns from init;
    ``order``: the parent finishes init after the child is gone ("waits"),
    publishes and closes before the child returns ("closes first"), or
    raises after the child is gone ("fails").  Returns (what the child's
    constructor did, whether the name exists at the end, the x read by a
    fresh opener or -1)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    kid = 0

    def init(rec: Any) -> None:
        nonlocal kid
        rec["x"] = 41
        kid = os.fork()
        if kid == 0:
            if order == "closes first":
                os.read(go_r, 1)
            return
        if order != "closes first":
            assert os.waitstatus_to_exitcode(os.waitpid(kid, 0)[1]) == 0
        if order == "fails":
            raise RuntimeError("init failed")
        rec["x"] = 42  # only now is the object ready

    s = None
    try:
        s = shmkit.Struct(name, np.dtype([("x", "i8")]), init=init)
    except BaseException as e:
        if kid == 0:
            held = sum(os.path.realpath(f"/proc/self/fd/{f}").startswith("/dev/shm/")
                       for f in os.listdir("/proc/self/fd"))
            os.write(w, f"{type(e).__name__}, {held} held\n".encode())
            os._exit(0)
        if order != "fails":
            raise
    if kid == 0:  # the child, back from the constructor: must not happen
        os.write(w, f"returned created={s.created}\n".encode())
        os._exit(0)
    if s is not None:
        assert s.created
        s.close()
    if order == "closes first":
        os.write(go_w, b"g")
        assert os.waitstatus_to_exitcode(os.waitpid(kid, 0)[1]) == 0
    report = os.read(r, 1000).decode().strip()
    for fd in (r, w, go_r, go_w):
        os.close(fd)
    path = segmod.segment_path(name)
    exists = os.path.exists(path)
    x = -1
    if exists:
        with shmkit.Struct.open(name) as again:
            x = int(again.record["x"])
    return report, exists, x


@pytest.mark.parametrize("order", ["waits", "closes first", "fails"])
def test_a_child_returning_from_init_leaves_the_creation_to_its_parent(name, order):
    """A child forked inside init that returns from it (instead of ending
    there) gets BusyError and lets go at once: it neither publishes the
    object, which its parent may still be filling, nor removes the name,
    which its parent may have published and closed, nor keeps a slot that
    would stop its parent from removing a creation whose init failed.
    Before, it went on with the descriptor the fork hook had replaced: it
    wrote the magic, its unlock failed (EBADF), and its clean-up removed
    the parent's name."""
    try:
        report, exists, x = _child_of_init(name, order)
        assert report == "BusyError, 0 held", report
        if order == "fails":
            assert not exists
        else:
            assert exists and x == 42
    finally:
        if os.path.exists(segmod.segment_path(name)):
            shmkit.unlink(name)


def test_fork_with_no_free_slot_closes_only_that_handle(name):
    full = shmkit.Segment(name, size=8, max_attach=1)
    m = shmkit.Mutex(None)
    try:
        def child():
            assert full.closed
            with pytest.raises(shmkit.ClosedError):
                full.read(1)
            assert m.acquire(timeout=1)
            m.release()

        assert _in_fork(child) == 0
        assert not full.closed and full.read(1) == b"\0"
    finally:
        full.close()
        m.close()
        m.unlink()


def test_pickle_segment_to_spawned_child(name):
    with shmkit.Segment(name, size=64) as s:
        p = spawn(_write_through_pickle, s, b"via pickle")
        p.join(30)
        assert p.exitcode == 0
        assert s.read(10) == b"via pickle"
        again = pickle.loads(pickle.dumps(s))
        assert again.name == name and not again.created
        again.close()


def test_pickle_segment_of_another_kind(name):
    m = shmkit.Mutex(name)
    try:
        m.acquire()
        p = spawn(_pickled_mutex_try, m)
        p.join(30)
        assert p.exitcode == 0
        m.release()
        seg = pickle.loads(pickle.dumps(m._seg))
        assert seg.kind == shmkit.Kind.MUTEX
        seg.close()
    finally:
        m.close()


def test_pickle_the_segment_lock(name):
    with shmkit.Segment(name, size=4096) as s:
        with s.lock:
            p = spawn(_pickled_mutex_try, s.lock)  # must see it held
            p.join(30)
            assert p.exitcode == 0


def test_attach_table_shows_live_attachers(name):
    s = shmkit.Segment(name, size=64)
    ready = [SPAWN.Event() for _ in range(2)]
    procs = [spawn(_hold_open_forever, name, ev) for ev in ready]
    try:
        for ev in ready:
            assert ev.wait(30)
        table = s.attachments()
        assert {a["pid"] for a in table} == {os.getpid(), *(p.pid for p in procs)}
        assert all(a["comm"] and a["attached"] > 0 for a in table)
        assert len({a["slot"] for a in table}) == 3
        info = s.info()
        assert info["kind"] == "raw" and len(info["attached"]) == 3
        assert info["lifetime"] == "persistent" and info["creator_pid"] == os.getpid()
        procs[0].kill()
        procs[0].join()
        assert {a["pid"] for a in s.attachments()} == {os.getpid(), procs[1].pid}
    finally:
        for p in procs:
            p.kill()
            p.join()
        s.close()
    with shmkit.Segment.open(name) as s:
        assert [a["pid"] for a in s.attachments()] == [os.getpid()]


def test_busy_when_attach_slots_are_used_up(name):
    a = shmkit.Segment(name, size=8, max_attach=2)
    b = shmkit.Segment.open(name)
    try:
        with pytest.raises(shmkit.BusyError) as e:
            shmkit.Segment.open(name)
        assert "max_attach" in str(e.value)
        b.close()
        c = shmkit.Segment.open(name)  # a freed slot is reused
        c.close()
    finally:
        a.close()
        b.close()


def test_half_constructed_objects_are_safe_to_collect(name):
    seen: list = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        shmkit.Segment(name, size=8).close()
        attempts = [
            lambda: shmkit.Segment("bad/name", size=8),
            lambda: shmkit.Segment(None, size=-1),
            lambda: shmkit.Segment(name, size=8, lifetime="x"),
            lambda: shmkit.Event(name),  # wrong kind
            lambda: shmkit.Segment.open(name + "-missing"),
            lambda: shmkit.Array(name, "f8", 3),
        ]
        for attempt in attempts:
            with pytest.raises(Exception):
                attempt()
        half = shmkit.Segment.__new__(shmkit.Segment)
        assert "closed" in repr(half)
        half.close()
        del half
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert seen == []


@pytest.mark.parametrize("param, asked", [
    ("mode", 0o640), ("lifetime", "attached"), ("max_size", 1 << 40), ("max_attach", 8),
])
def test_explicit_open_parameters_that_disagree_are_refused(name, param, asked):
    made = shmkit.Segment(name, size=64)  # mode 0o600, persistent, 4 GiB, 256 slots
    try:
        for opener in (lambda: shmkit.Segment(name, size=64, **{param: asked}),
                       lambda: shmkit.Segment.open(name, **{param: asked})):
            with pytest.raises(shmkit.MismatchError) as e:
                opener()
            assert param in str(e.value) and "leave" in str(e.value)
        # left out, the existing value is adopted; given and equal, it is accepted
        with shmkit.Segment(name, size=64) as again, shmkit.Segment.open(name, lifetime="persistent"):
            assert again.size == 64
        assert len(made.attachments()) == 1  # the refused opens left no attachment
    finally:
        made.close()


def _open_and_close(kind: str, name: str) -> None:
    calls = []
    obj = getattr(shmkit, kind)(name, on_destroy=lambda: calls.append(1))
    obj.close()
    assert calls == []  # closing a persistent object removes nothing


@pytest.mark.parametrize("kind, extra", [
    ("Segment", {"size": 64}), ("Mutex", {}), ("Event", {}), ("Semaphore", {}),
])
def test_on_destroy_runs_once_in_the_process_that_removes_the_name(name, kind, extra):
    calls = []
    obj = getattr(shmkit, kind)(name, on_destroy=lambda: calls.append(1), **extra)
    p = spawn(_open_and_close, kind, name)  # another process's close removes nothing
    p.join(60)
    assert p.exitcode == 0 and calls == []
    obj.unlink()
    obj.close()
    assert calls == [1]


def test_on_destroy_runs_at_the_last_close_of_an_attached_segment():
    calls = []
    seg = shmkit.Segment(None, size=64, on_destroy=lambda: calls.append(1))
    other = shmkit.Segment.open(seg.name)
    seg.close()
    assert calls == []  # another handle is still attached
    other.close()
    assert calls == []  # the hook belongs to the handle that was given it
    again = shmkit.Segment(None, size=64, on_destroy=lambda: calls.append(2))
    again.close()
    assert calls == [2]


def test_every_method_of_a_closed_segment_says_it_is_closed():
    """A closed handle refuses every operation with ClosedError (never an
    OSError about a descriptor it no longer has, which another file may
    have taken meanwhile); close() again and its plain facts still work."""
    s = shmkit.Segment(None, size=64)
    s.close()
    calls = {
        "attachments": lambda: s.attachments(), "info": lambda: s.info(),
        "ndarray": lambda: s.ndarray(), "read": lambda: s.read(1),
        "readonly_attached": lambda: s.readonly_attached(),
        "owner_pid": lambda: s.owner_pid(1), "resize": lambda: s.resize(128),
        "write": lambda: s.write(b"x"), "write_some": lambda: s.write_some(b"x"),
        "buf": lambda: s.buf, "layout": lambda: s.layout, "lock": lambda: s.lock,
        "size": lambda: s.size,
    }
    for what, call in calls.items():
        with pytest.raises(shmkit.ClosedError, match="closed"):
            call()
            pytest.fail(f"{what} worked on a closed handle")
    s.close()
    assert s.closed and s.name.startswith("anon-") and not s.readonly


def test_info_beside_a_resize_never_reports_a_truncated_file(name, monkeypatch):
    """``info()`` compares the file's length with the size the header holds.
    It read the file's length first: a grow by another process (or thread)
    in between, which extends the file and then stores the size, made a
    whole file look cut short, a CorruptError for nothing.  The grow here
    comes exactly in between, through another handle."""
    seg = shmkit.Segment(name, size=4096, max_size=1 << 24)
    other = shmkit.Segment(name)
    real = _core.file_sizes
    grows = [1 << 20, 1 << 22]

    def length_then_a_grow(m: Any) -> Any:
        sizes = real(m)
        if grows:
            monkeypatch.setattr(_core, "file_sizes", real)  # once
            other.resize(grows.pop(0))  # after the length was read
        return sizes

    try:
        monkeypatch.setattr(_core, "file_sizes", length_then_a_grow)
        assert seg.info()["size"] == 1 << 20
        other.resize(8192)  # a shrink keeps the file's length (holes)
        monkeypatch.setattr(_core, "file_sizes", length_then_a_grow)
        assert seg.info()["size"] == 1 << 22 and not grows
    finally:
        monkeypatch.setattr(_core, "file_sizes", real)
        other.close()
        seg.close()


def test_scan_beside_a_resize_never_reports_a_corrupt_file(name, monkeypatch):
    """``shmkit ls`` and ``shmkit info`` (inspect.scan) stat the file, then
    read its header: the length they compare with the header's size is read
    after the header, so a grow in between does not show a healthy segment
    as corrupt ("claims N bytes of payload but its file holds only M")."""
    from shmkit import inspect
    seg = shmkit.Segment(name, size=4096, max_size=1 << 24)
    other = shmkit.Segment(name)
    real = inspect._read_header

    def grown_after_the_stat(fd: int, st: os.stat_result, out: dict) -> None:
        other.resize(1 << 20)
        real(fd, st, out)

    try:
        monkeypatch.setattr(inspect, "_read_header", grown_after_the_stat)
        found = inspect.scan(name)
        assert (found["state"], found["size"]) == ("ok", 1 << 20)
    finally:
        other.close()
        seg.close()


def test_a_max_size_below_the_size_is_refused_not_raised_to_it(name):
    # max_size= below size= was raised to the size without a word.
    for make in (lambda: shmkit.Segment(name, 4096, max_size=10),
                 lambda: shmkit.Store(name, size=1 << 20, max_size=20000)):
        with pytest.raises(ValueError, match=r"max_size=\d+ is below size=\d+"):
            make()
        assert not os.path.exists(f"/dev/shm/shmkit.{name}")
    with pytest.raises(ValueError, match="at least 16384 bytes"):
        shmkit.Store(name, max_size=2000)
    with shmkit.Store(name, max_size=20000) as st:  # the default size fits under it
        assert st._seg.max_size == 20000
        st.unlink()


@pytest.mark.parametrize("given, error, text", [
    ({"mode": "abc"}, ValueError, "mode must be permission bits"),
    ({"mode": 0o4777}, ValueError, "mode must be permission bits"),
    ({"size": "x"}, ValueError, "size must be a non-negative int"),
    ({"size": -1}, ValueError, "size must be a non-negative int"),
    ({"max_size": "x"}, ValueError, "max_size must be a non-negative int"),
    ({"size": 1 << 50}, shmkit.SizeLimitError, "beyond"),
    ({"max_attach": "3"}, TypeError, "max_attach must be an int"),
])
def test_an_open_refuses_a_value_no_segment_can_have_as_a_creation_does(name, given, error,
                                                                      text):
    # On open these were only compared with the segment's own: a str raised
    # Python's TypeError from the comparison, size=-1 was taken as agreeing.
    with shmkit.Segment(name, 4096):
        fds = len(os.listdir(f"/proc/{os.getpid()}/fd"))
        for call in (lambda: shmkit.Segment.open(name, **given),
                     lambda: shmkit.Segment(name, **{"size": 4096, **given})):
            with pytest.raises(error, match=text):
                call()
        assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == fds  # no handle left open


def test_a_regular_file_that_cannot_be_read_is_refused_as_no_segment():
    # /proc/self/mem is a regular file of ours that no read at offset 0
    # reaches: the open raised a bare OSError (EIO).
    for call in (lambda: shmkit.Segment.open(path="/proc/self/mem"),
                 lambda: shmkit.Store.open(path="/proc/self/mem")):
        with pytest.raises(shmkit.CorruptError, match="cannot be read as a segment"):
            call()


@pytest.mark.parametrize("create", [1, 0, "x"])
def test_create_takes_true_false_or_none_only(name, create):
    # create=1 was taken as "not True": it opened an existing object where
    # create-only was meant.
    with shmkit.Store(name, create=True):
        for call in (lambda: shmkit.Store(name, create=create),
                     lambda: shmkit.Queue(name=name, create=create),
                     lambda: shmkit.Channel(name, create=create)):
            with pytest.raises(TypeError, match="create must be True"):
                call()
