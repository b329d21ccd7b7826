"""Hostile neighbours and hard limits at the segment layer.

Another local user, a careless neighbour or a dead creator must never crash,
hang or fool shmkit: files owned by someone else or that are not regular
files are refused before a byte is read; half-created names are recovered;
resources running out raise a specific error and leave nothing behind.
Tests run as root, so "another user" is a forked child that drops to
``nobody`` (uid 65534).
"""

from __future__ import annotations

import glob
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmkit
from shmkit import inspect
from shmkit.segment import MAGIC

from conftest import SRC, as_user, run_python

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _path(name: str) -> str:
    return f"/dev/shm/shmkit.{name}"


def _leftovers(name: str) -> list[str]:
    return glob.glob(f"/dev/shm/shmkit.{name}") + glob.glob(f"/dev/shm/.shmkit.{name}.*")


# -- 1. name squatting --------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/shmkit-pwned-by-pickle",))


@ROOT_ONLY
def test_queue_squatted_by_another_user_is_refused_before_unpickling(name):
    marker = "/tmp/shmkit-pwned-by-pickle"
    if os.path.isdir(marker):
        os.rmdir(marker)

    def squat():
        q = shmkit.Queue(name=name, capacity=4096, mode=0o666)
        q.put(_Evil())
        q.close()

    assert as_user(squat) == 0
    assert os.stat(_path(name)).st_uid == NOBODY
    with pytest.raises(shmkit.UntrustedError) as e:
        shmkit.Queue(name=name)
    assert isinstance(e.value, PermissionError)
    assert "trust_owner=65534" in str(e.value) and "nobody" in str(e.value)
    with pytest.raises(shmkit.UntrustedError):
        shmkit.Queue.open(name)
    assert not os.path.exists(marker)
    # Naming the owner opens it on purpose (reading would still unpickle).
    q = shmkit.Queue.open(name, trust_owner="nobody")
    assert q.qsize() == 1
    q.close()


@ROOT_ONLY
@pytest.mark.parametrize("make, reopen", [
    (lambda n: shmkit.Segment(n, size=64), lambda n, **k: shmkit.Segment.open(n, **k)),
    (lambda n: shmkit.Segment(n, size=64), lambda n, **k: shmkit.Segment(n, size=64, **k)),
    (lambda n: shmkit.Mutex(n), lambda n, **k: shmkit.Mutex(n, **k)),
    (lambda n: shmkit.Event(n), lambda n, **k: shmkit.Event.open(n, **k)),
    (lambda n: shmkit.RWLock(n), lambda n, **k: shmkit.RWLock(n, **k)),
    (lambda n: shmkit.Semaphore(n), lambda n, **k: shmkit.Semaphore(n, **k)),
    (lambda n: shmkit.Condition(n), lambda n, **k: shmkit.Condition(n, **k)),
    (lambda n: shmkit.Array(n, "f8", 8), lambda n, **k: shmkit.Array(n, **k)),
    (lambda n: shmkit.Struct(n, np.dtype([("x", "i8")])), lambda n, **k: shmkit.Struct(n, **k)),
    (lambda n: shmkit.Channel(n, 4096), lambda n, **k: shmkit.Channel.open(n, **k)),
    (lambda n: shmkit.Store(n, size=1 << 16), lambda n, **k: shmkit.Store(n, **k)),
    (lambda n: shmkit.Heap(n, 64 << 10), lambda n, **k: shmkit.Heap.open(n, **k)),
])
def test_every_kind_refuses_a_file_of_another_owner_unless_trusted(name, make, reopen):
    obj = make(name)
    obj.close()
    os.chown(_path(name), NOBODY, NOBODY)
    with pytest.raises(shmkit.UntrustedError):
        reopen(name)
    reopen(name, trust_owner=NOBODY).close()
    reopen(name, trust_owner="nobody").close()


@ROOT_ONLY
def test_forged_messages_between_ordinary_users_are_refused(name):
    # Two ordinary users: nobody squats the name, daemon (uid 1) is the victim.
    def squat():
        ch = shmkit.Channel(name, 4096, mode=0o666)
        ch.send(b"forged")
        ch.close()

    assert as_user(squat) == 0
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setuid(1)
            try:
                shmkit.Channel(name, 4096)
            except shmkit.UntrustedError:
                code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@ROOT_ONLY
def test_path_files_are_checked_too(tmp_path):
    p = tmp_path / "seg"
    shmkit.Segment(None, size=64, path=p).close()
    os.chown(p, NOBODY, NOBODY)
    with pytest.raises(shmkit.UntrustedError):
        shmkit.Segment.open(path=p)
    shmkit.Segment.open(path=p, trust_owner=NOBODY).close()


def test_trust_owner_is_validated(name):
    with pytest.raises(ValueError, match="no such user"):
        shmkit.Segment(name, size=8, trust_owner="no-such-user-here")
    with pytest.raises(TypeError):
        shmkit.Segment(name, size=8, trust_owner=1.5)


# -- 2. files that are not regular files -------------------------------------


def _plant(kind: str, path: str) -> object:
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "dir":
        os.mkdir(path, 0o700)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        return s
    return None


def _unplant(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket"])
def test_non_regular_file_is_refused_without_hanging(name, kind):
    path = _path(name)
    keep = _plant(kind, path)
    try:
        # In another process with a timeout: a FIFO used to hang the open forever.
        proc = run_python(f"""
            import shmkit
            opens = [
                lambda: shmkit.Segment.open({name!r}),
                lambda: shmkit.Segment.open({name!r}, readonly=True),
                lambda: shmkit.Segment({name!r}, size=64),
                lambda: shmkit.Event({name!r}),
                lambda: shmkit.Store.open({name!r}),
            ]
            for op in opens:
                try:
                    op()
                except shmkit.UntrustedError as e:
                    assert "not a regular file" in str(e), e
                else:
                    raise SystemExit("opened a non-regular file")
            print("refused")
        """, timeout=30)
        assert proc.stdout.strip() == "refused"
        # The command copes too: ls lists it, info describes it, gc leaves it.
        facts = inspect.scan(name)
        assert facts["state"].startswith("unreadable")
        assert inspect.describe(name)["state"] == facts["state"]
        assert all(r["name"] != name for r in inspect.collect_garbage(orphans=True))
    finally:
        _unplant(path)
        if keep is not None:
            keep.close()


# -- 3. short files ------------------------------------------------------------


def test_short_file_with_magic_raises_at_once(name):
    with open(_path(name), "wb") as f:
        f.write(MAGIC + b"\0" * 100)
    os.chmod(_path(name), 0o600)
    proc = run_python(f"""
        import shmkit, time
        t = time.monotonic()
        try:
            shmkit.Segment.open({name!r})
        except shmkit.CorruptError as e:
            print(round(time.monotonic() - t), e)
    """, timeout=30)
    assert proc.stdout.startswith("0 ") and "holds only 108 bytes" in proc.stdout


def test_size_beyond_file_is_reported_in_unsigned_words(name):
    shmkit.Segment(name, size=8192).close()
    hsize = shmkit.Segment.open(name)._hsize
    for length, words in [(1000, "holds only 1000 bytes, less than its"),
                          (hsize + 100, "holds only 100 after the header")]:
        os.truncate(_path(name), length)
        # In another process with a timeout: a short file used to loop forever.
        proc = run_python(f"""
            import shmkit
            for op in (lambda: shmkit.Segment.open({name!r}),
                       lambda: shmkit.Segment({name!r}, size=8)):
                try:
                    op()
                except shmkit.CorruptError as e:
                    print(e)
        """, timeout=30)
        lines = proc.stdout.splitlines()
        assert len(lines) == 2, proc.stdout
        for line in lines:
            assert words in line and not re.search(r"\s-\d", line), line


# -- 5. gc and zeroed magic -------------------------------------------------------


def test_gc_never_removes_a_live_object_whose_magic_was_zeroed(name):
    child = subprocess.Popen(
        [sys.executable, "-c", f"import shmkit, sys\nseg = shmkit.Segment({name!r}, size=4096)\n"
         "print('attached', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert child.stdout.readline().strip() == "attached"
        with open(_path(name), "r+b") as f:
            f.write(b"\0" * 8)
        assert inspect.scan(name)["state"] != "half-created"
        inspect.collect_garbage()
        inspect.collect_garbage(orphans=True)
        assert os.path.exists(_path(name))
        with pytest.raises(shmkit.CorruptError, match="attached"):
            shmkit.Segment(name, size=4096)
        assert os.path.exists(_path(name))
    finally:
        child.stdin.close()
        child.wait(30)


@pytest.mark.parametrize("kind", ["segment", "mutex"])
def test_a_lowered_slot_count_is_refused_while_a_holder_is_above_it(name, kind):
    """The header's max_slots, lowered to a count that keeps the header's
    size (so the header check accepts it), used to make a new handle take
    every holder above the count for dead: it stole a held Mutex ("its
    previous holder died"), and as the last closer of an "attached" segment
    it removed the name they held.  (Found by the core fuzzer's segment
    kind.)  An open now refuses such a header, and a closer proves it is
    last over every slot byte there can be."""
    import struct

    from shmkit import segment as segment_mod

    size = segment_mod._header_size(256)
    fewer = min(n for n in range(1, 257) if segment_mod._header_size(n) == size)
    if kind == "segment":
        make, reopen = (lambda: shmkit.Segment(name, size=4096, lifetime="attached",
                                               max_attach=256),
                        lambda: shmkit.Segment.open(name))
    else:
        make, reopen = (lambda: shmkit.Mutex(name, max_attach=256),
                        lambda: shmkit.Mutex.open(name))
    holders = [make()]
    seg_of = (lambda h: h) if kind == "segment" else (lambda h: h._seg)
    while seg_of(holders[-1])._token & 0x3FF < fewer:  # slots go upwards from where claims start
        holders.append(reopen())
    high = holders.pop()
    for h in holders:
        h.close()
    if kind == "mutex":
        assert high.acquire(timeout=1)
    with open(_path(name), "r+b") as f:  # max_slots: u32 at offset 20
        f.seek(20)
        f.write(struct.pack("<I", fewer))
    try:
        with pytest.raises(shmkit.CorruptError, match="header was damaged"):
            reopen()
        assert os.path.exists(_path(name))
        if kind == "mutex":
            assert high.locked()
            high.release()
    finally:
        high.close()
    if kind == "segment":
        assert not os.path.exists(_path(name))  # its real last closer still removes it
    else:
        shmkit.unlink(name)


def test_a_closer_proves_it_is_last_over_every_slot_there_can_be(name):
    """The closer's own check, without the open's: a handle that opened
    before the count was lowered, closing after, still sees a holder above
    it (it locks every slot byte, not the header's count)."""
    import struct

    from shmkit import segment as segment_mod

    size = segment_mod._header_size(256)
    fewer = min(n for n in range(1, 257) if segment_mod._header_size(n) == size)
    def slot(h):
        return h._token & 0x3FF

    # slots go upwards from where claims start, wrapping: open until there is a
    # handle below the lowered count (the closer) and one above it
    holders = [shmkit.Segment(name, size=4096, lifetime="attached", max_attach=256)]
    while not (any(slot(h) >= fewer for h in holders)
               and any(slot(h) < fewer for h in holders)):
        holders.append(shmkit.Segment.open(name))
    high = next(h for h in holders if slot(h) >= fewer)
    closer = next(h for h in holders if slot(h) < fewer)
    for h in holders:
        if h is not high and h is not closer:
            h.close()
    closer._max_slots = fewer  # as if it had opened the lowered header
    closer.close()
    assert os.path.exists(_path(name)), "a closer removed a segment still held"
    high.close()
    assert not os.path.exists(_path(name))


# -- 6. killed creators -------------------------------------------------------------


def _slow_init(arr):
    arr[:] = 1
    time.sleep(0.003)


_MAKERS = {
    "array": lambda n: shmkit.Array(n, "f8", (256,), init=_slow_init),
    "struct": lambda n: shmkit.Struct(n, np.dtype([("x", "i8")]),
                                      init=lambda r: time.sleep(0.003)),
    "heap": lambda n: shmkit.Heap(n, 256 << 10),
    "store": lambda n: shmkit.Store(n, size=1 << 16),
    "channel": lambda n: shmkit.Channel(n, 1 << 16),
    "event": lambda n: shmkit.Event(n),
}


def _kill_creators(name: str, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = list(_MAKERS)
    hits = {k: 0 for k in kinds}
    for i in range(rounds):
        kind = kinds[i % len(kinds)]
        make = _MAKERS[kind]
        pid = os.fork()
        if pid == 0:
            try:
                make(name)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if os.path.exists(_path(name)) and inspect.scan(name)["state"] == "half-created":
            hits[kind] += 1
        obj = make(name)  # must succeed, whatever state the kill left
        obj.close()
        os.unlink(_path(name))
    return hits


def test_killed_creators_never_wedge_a_name(name):
    hits = _kill_creators(name, 60, seed=1)
    inspect.collect_garbage(patterns=[name])  # temp files of creators killed before link()
    assert not _leftovers(name)
    print("half-created states recovered:", hits)


@pytest.mark.stress
def test_killed_creators_never_wedge_a_name_stress(name):
    hits = _kill_creators(name, 1200, seed=2)
    assert sum(hits.values()) > 0, hits
    inspect.collect_garbage(patterns=[name])
    assert not _leftovers(name)


def test_open_of_half_created_name_says_so(name):
    pid = os.fork()
    if pid == 0:
        try:
            shmkit.Array(name, "f8", 4, init=lambda a: time.sleep(60))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while not os.path.exists(_path(name)) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with pytest.raises(shmkit.NotFoundError, match="half-created"):
        shmkit.Array.open(name)
    with shmkit.Array(name, "f8", 4) as a:
        assert a.created


# -- 7. limits ------------------------------------------------------------------------


def test_huge_array_shape_is_refused_before_anything_is_created(name):
    with pytest.raises(shmkit.SizeLimitError) as e:
        shmkit.Array(name, np.float64, (2**62, 2**62))
    assert isinstance(e.value, ValueError)
    assert not _leftovers(name)
    with pytest.raises(shmkit.SizeLimitError):
        shmkit.Segment(name, size=1 << 50)
    assert not _leftovers(name)


def test_absurd_queue_maxsize_is_refused():
    with pytest.raises(shmkit.SizeLimitError):
        shmkit.Queue(maxsize=2**70)


def test_fixed_size_kinds_reserve_only_what_they_need(name):
    ev = shmkit.Event(name)
    try:
        assert ev._seg.max_size == ev._seg.size
    finally:
        ev.close()
    with shmkit.Segment(None, size=10) as s:
        assert s.max_size == shmkit.segment.DEFAULT_RESERVE


def test_twenty_thousand_objects_open_in_one_process():
    # Each object holds one file descriptor (its attach lock lives on it): as
    # many objects as the descriptor limit allows, up to 20,000.
    proc = run_python("""
        import os, resource, shmkit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 20000 if hard == resource.RLIM_INFINITY else min(20000, hard - 100)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        objs = [shmkit.Mutex(None) for _ in range(want)]
        assert len({o._seg.name for o in objs}) == want >= 19000
        for o in objs:
            o.close()
        print("ok")
    """, timeout=300)
    assert proc.stdout.strip() == "ok"


def test_exhaustion_raises_specific_errors_and_leaves_nothing():
    proc = run_python("""
        import glob, os, resource, shmkit
        me = os.getpid()
        # Address space: a reservation the process may not have.  Not under
        # AddressSanitizer (make asan): its shadow memory needs terabytes of
        # address space, so a 4 GiB limit makes the sanitizer itself fail.
        if "libasan" not in os.environ.get("LD_PRELOAD", ""):
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
            try:
                shmkit.Segment("exhaust-as-%d" % os.getpid(), size=4096, max_size=8 << 30)
            except shmkit.OutOfSpaceError as e:
                assert "address space" in str(e), e
            else:
                raise SystemExit("no OutOfSpaceError")
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        # File descriptors.
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(shmkit.Event(None))
        except shmkit.DescriptorLimitError as e:
            assert isinstance(e, OSError) and "ulimit" in str(e), e
        paths = [h._seg.path for h in held]
        for h in held:
            h.close()
        left = glob.glob(f"/dev/shm/.shmkit.*.{me}.*.tmp") + glob.glob(f"/dev/shm/*exhaust-as-{me}")
        left += [p for p in paths if os.path.exists(p)]
        assert not left, left
        print("ok")
    """, timeout=120)
    assert proc.stdout.strip() == "ok"


def test_full_tmpfs_and_no_inodes_leave_nothing(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=1m,nr_inodes=4 none {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        made = []
        with pytest.raises(shmkit.OutOfSpaceError):
            for i in range(10):
                made.append(shmkit.Segment(None, size=64, path=mnt / f"s{i}"))
        for s in made:
            s.close()
        names = os.listdir(mnt)
        assert not [n for n in names if n.endswith(".tmp")], names
        with pytest.raises(shmkit.OutOfSpaceError):
            shmkit.Segment(None, size=4 << 20, path=mnt / "big")
        assert not os.path.exists(mnt / "big")
    finally:
        assert os.system(f"umount {mnt}") == 0  # nothing of ours keeps it busy


def test_channel_close_on_a_corrupt_ring_detaches_then_reports(name):
    ch = shmkit.Channel(name, 4096)
    seg = ch._seg
    with open(_path(name), "r+b") as f:  # scribble over the ring header
        f.seek(seg._hsize)
        f.write(b"\xff" * 256)
    try:
        ch.close()
    except shmkit.ShmkitError:
        pass
    assert ch.closed and seg.closed


# -- 10. anonymous objects never outlive their users ----------------------------------

_ANON = """
import os, signal, sys, numpy as np, shmkit
objs = [shmkit.Segment(None, size=64), shmkit.Store(None), shmkit.Heap(None, 64 << 10),
        shmkit.Channel(None, 4096), shmkit.Queue(), shmkit.Mutex(None), shmkit.Event(None),
        shmkit.RWLock(None), shmkit.Semaphore(None), shmkit.Condition(None),
        shmkit.Array(None, "f8", 8), shmkit.Struct(None, np.dtype([("x", "i8")]))]
print(" ".join(o._seg.path if hasattr(o, "_seg") else o.path for o in objs), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_anonymous_objects_vanish_when_their_process_exits():
    proc = run_python(_ANON, "exit")
    paths = proc.stdout.split()
    assert len(paths) == 12
    assert [p for p in paths if os.path.exists(p)] == []


def test_anonymous_objects_of_a_killed_process_are_collected():
    proc = run_python(_ANON, "kill", check=False)
    assert proc.returncode == -signal.SIGKILL
    paths = proc.stdout.split()
    assert len(paths) == 12 and all(os.path.exists(p) for p in paths)
    removed = {r["path"] for r in inspect.collect_garbage() if r["removed"]}
    assert set(paths) <= removed
    assert [p for p in paths if os.path.exists(p)] == []


# -- 4. a file truncated under live users ---------------------------------------------

_TRUNC = {
    "segment": ("o = shmkit.Segment(N, size=1 << 16)", "seg = o",
                "o.write(b'x' * 4096, offset=8192); o.read(4096, offset=8192)"),
    "store": ("o = shmkit.Store(N)", "seg = o._seg",
              "o['k'] = b'v' * 1000; o['k']; o.verify()"),
    "heap": ("o = shmkit.Heap(N, 256 << 10)", "seg = o._seg",
             "h = o.put(b'x' * 1000); o.read(h, timeout=1); o.free(h, timeout=1); o.verify(timeout=1)"),
    "channel": ("o = shmkit.Channel(N, 1 << 16)", "seg = o._seg",
                "o.send_nowait(b'x' * 100); o.recv_nowait()"),
    "queue": ("o = shmkit.Queue(name=N)", "seg = o._ch._seg",
              "o.put_nowait(1); o.get_nowait()"),
    "array": ("o = shmkit.Array(N, 'f8', 4096)", "seg = o._seg", "o.array[:] += 1"),
    "mutex": ("o = shmkit.Mutex(N)", "seg = o._seg",
              "o.acquire(timeout=1) and o.release()"),
    "event": ("o = shmkit.Event(N)", "seg = o._seg", "o.set(); o.clear()"),
}


@pytest.mark.parametrize("kind", sorted(_TRUNC))
def test_truncated_file_raises_corrupt_error_not_sigbus(name, kind):
    make, seg, op = _TRUNC[kind]
    code = f"""
import sys, time, shmkit
N = {name!r}
{make}
{seg}
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 20
try:
    while time.monotonic() < deadline:
        {op}
        seg.size  # checks for truncation
        seg.info()
except shmkit.ShmkitError as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(0)
print("no error", flush=True)
sys.exit(3)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert child.stdout.readline().strip() == "ready"
        os.truncate(_path(name), 0)
        child.stdin.write("go\n")
        child.stdin.flush()
        out = child.stdout.read()
        assert child.wait(60) == 0, (child.returncode, out)
        assert "Error" in out, out
    finally:
        child.kill()
        child.wait()


def test_an_open_racing_a_truncation_never_returns_a_cut_short_handle(name, tmp_path):
    """A file cut short and restored over and over by another process while
    it is opened: the truncation can land between the header check and the
    slot claim, whose write then faults (the SIGBUS guard maps a private zero
    page there, so the slot's entry is lost).  Such an open raises
    CorruptError; it never hands back a handle whose mapping is already
    marked truncated."""
    seg = shmkit.Segment(name, size=1 << 16)
    seg.buf[:4] = b"DATA"
    seg.close()
    copy = tmp_path / "whole"
    copy.write_bytes(open(_path(name), "rb").read())
    hostile = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, time
            fd = os.open({_path(name)!r}, os.O_RDWR)
            whole = open({str(copy)!r}, "rb").read()
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                os.ftruncate(fd, 0); os.ftruncate(fd, len(whole)); os.pwrite(fd, whole, 0)
            """)])
    opened = refused = cut_short = 0
    try:
        time.sleep(0.2)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                o = shmkit.Segment.open(name)
            except (shmkit.CorruptError, shmkit.NotFoundError):
                refused += 1
                continue
            opened += 1
            cut_short += o._mapping.truncated
            o.close()
    finally:
        hostile.wait(30)
    assert refused > 0 and opened > 0, (refused, opened)  # the race did happen
    assert cut_short == 0, f"{cut_short} of {opened} opens returned a truncated mapping"
    with shmkit.Segment.open(name) as seg:  # restored whole: opens as before
        assert bytes(seg.buf[:4]) == b"DATA"


# -- 8. frozen peers --------------------------------------------------------------------


def test_info_names_a_stopped_lock_holder_and_waiters_time_out(name):
    child = subprocess.Popen(
        [sys.executable, "-c", f"import shmkit, sys\nm = shmkit.Mutex({name!r})\nm.acquire()\n"
         "print('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert child.stdout.readline().strip() == "held"
        assert "holder_stopped" not in inspect.describe(name)["mutex"]
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10  # the stop is delivered asynchronously
        while not inspect.process_stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        got = inspect.describe(name)["mutex"]
        assert got["holder_pid"] == child.pid and got["holder_stopped"] is True
        out = subprocess.run([sys.executable, "-m", "shmkit", "info", name],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": SRC}).stdout
        assert "STOPPED" in out and str(child.pid) in out
        m = shmkit.Mutex(name)
        try:
            assert m.acquire(timeout=0.2) is False  # a stopped holder is waited on, boundedly
            with pytest.raises(shmkit.Timeout, match=rf"held by pid {child.pid}, which is "
                                                     rf"stopped .*kill -CONT {child.pid}"):
                with m.held(timeout=0.2):
                    pass
        finally:
            m.close()
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


# kind: (how to make it, the operation each side makes, where the child stops:
# a crash point reached with the structure's lock held)
_FROZEN_OPS = {
    "store": ("shmkit.Store({name!r}, timeout=0.3)", "obj['k'] = b'v'", "table.put."),
    "channel": ("shmkit.Channel({name!r}, capacity=1 << 16)",
                "obj.send(b'm', timeout=0.3)", "ring.reserve."),
    "topic": ("shmkit.Topic({name!r}, capacity=1 << 16)",
              "obj.publish(b'm', timeout=0.3)", "topic.publish."),
    "heap": ("shmkit.Heap({name!r}, size=1 << 16)", "obj.alloc(64, timeout=0.3)",
             "journal."),
}


@pytest.mark.parametrize("kind", sorted(_FROZEN_OPS))
def test_a_peer_stopped_inside_an_operation_is_named_by_the_timeout_it_causes(name, kind):
    make, op, point = _FROZEN_OPS[kind]
    obj = eval(make.format(name=name))  # noqa: S307 - the table above
    child = subprocess.Popen(
        [sys.executable, "-c", f"import shmkit, sys\nfrom shmkit import _core\n"
         f"obj = {make.format(name=name)}\n_core.fault(1, {point!r}, stop=True)\n"
         f"{op}\nprint('done', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + 30
        while not inspect.process_stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inspect.process_stopped(child.pid), "the child did not stop at " + point
        t0 = time.monotonic()
        with pytest.raises(shmkit.Timeout, match=rf"pid {child.pid}, which is stopped "
                                                 rf".*kill -CONT {child.pid}.*resume or end"):
            exec(op)  # noqa: S102 - the table above
        assert time.monotonic() - t0 < 10
        os.kill(child.pid, signal.SIGCONT)
        assert child.stdout.readline().strip() == "done"  # its operation completes
        exec(op)  # and ours goes through
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()
        obj.close()


def test_a_timeout_names_a_holder_in_this_process_and_never_a_damaged_pid(name):
    m = shmkit.Mutex(name)
    try:
        held, done = threading.Event(), threading.Event()

        def hold() -> None:
            with m:
                held.set()
                done.wait(30)
        t = threading.Thread(target=hold)
        t.start()
        assert held.wait(30)
        with pytest.raises(shmkit.Timeout, match=rf"this process \(pid {os.getpid()}\), "
                                                 "through this same handle"):
            with m.held(timeout=0.1):
                pass
        done.set()
        t.join()
        with pytest.raises(OverflowError):
            shmkit._core.holder_phrase(m._m, 1 << 32)
        with pytest.raises(OverflowError):
            shmkit._core.holder_phrase(m._m, -1)
        assert shmkit._core.holder_phrase(m._m, 0).startswith("no process now")
    finally:
        m.close()
    child = subprocess.Popen(
        [sys.executable, "-c", f"import shmkit, sys\nm = shmkit.Mutex({name!r})\nm.acquire()\n"
         "print('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    m = shmkit.Mutex(name)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(shmkit.Timeout, match=rf"held by pid {child.pid}; try again"):
            with m.held(timeout=0.1):
                pass
        # A damaged entry: a pid past PID_MAX_LIMIT would read as -1 or a
        # process group to kill(1); it is never printed.
        slot = next(a["slot"] for a in m._seg.attachments() if a["pid"] == child.pid)
        table = shmkit._core.layouts["segment"]["attach_table"]
        entry = shmkit._core.layouts["attach_entry"]
        for bad in (0xFFFFFFFF, 1 << 31, 4194304):
            shmkit._core.store32(m._seg._mapping, table + slot * entry["bytes"] + entry["pid"],
                                 bad)
            with pytest.raises(shmkit.Timeout, match="held by another process; try again"):
                with m.held(timeout=0.1):
                    pass
    finally:
        child.kill()
        child.wait()
        m.close()


def _stopped_holding_segment_lock(kind: str, name: str) -> subprocess.Popen:
    """A process that opens ``name`` as ``kind``, takes its segment's own lock
    (as a resize or a heap growth does) and is then stopped."""
    open_ = {"segment": f"shmkit.Segment({name!r})", "heap": f"shmkit.Heap({name!r})"}[kind]
    seg = "h" if kind == "segment" else "h._seg"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import shmkit, sys\nh = {open_}\n{seg}.lock.acquire()\n"
         "print('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    assert child.stdout.readline().strip() == "held"
    os.kill(child.pid, signal.SIGSTOP)
    return child


@pytest.mark.parametrize("kind", ["segment", "heap"])
def test_growing_beside_a_stopped_resizer_times_out_naming_it(name, kind):
    if kind == "segment":
        obj = shmkit.Segment(name, size=4096, max_size=1 << 20)
    else:
        obj = shmkit.Heap(name, size=1 << 16, max_size=1 << 24)
    child = _stopped_holding_segment_lock(kind, name)
    try:
        t0 = time.monotonic()
        with pytest.raises(shmkit.Timeout, match=f"held by pid {child.pid}"):
            if kind == "segment":
                obj.resize(8192, timeout=0.3)
            else:  # a block larger than the data area: the heap must grow
                obj.alloc(1 << 20, timeout=0.3)
        assert time.monotonic() - t0 < 10
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()
        # its holder gone, the lock is taken over and the growth goes through
        if kind == "segment":
            obj.resize(8192, timeout=5)
            assert obj.size == 8192
        else:
            h = obj.alloc(1 << 20, timeout=5)
            assert obj.size_of(h) == 1 << 20
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()
        obj.close()


# -- 11. orphans and races ----------------------------------------------------------------


def test_gc_lists_orphans_and_removes_them_only_when_asked(name):
    run_python(f"import shmkit; shmkit.Store({name!r}).close()")  # its creator exits
    env = {**os.environ, "PYTHONPATH": SRC}
    gc = [sys.executable, "-m", "shmkit", "gc", name]
    out = subprocess.run(gc, capture_output=True, text=True, timeout=60, env=env).stdout
    assert f"orphan {name}" in out and "--orphans" in out
    assert os.path.exists(_path(name))
    [o] = inspect.find_orphans([name])
    assert o["kind"] == "store" and o["size"] > 0 and o["age"] >= 0
    out = subprocess.run(gc + ["--orphans"], capture_output=True, text=True, timeout=60,
                         env=env).stdout
    assert f"removed {name}" in out and not os.path.exists(_path(name))


def test_ls_says_untrusted_for_another_owners_file(name):
    shmkit.Segment(name, size=64).close()
    os.chown(_path(name), NOBODY, NOBODY)
    assert inspect.scan(name)["state"].startswith("untrusted: owned by uid 65534")


def _attach_loop(name: str, seconds: float) -> str:
    return f"""
        import os, struct, time, shmkit
        dead = 0x3FFFFFF0  # no such pid: the creator is "gone", so gc --orphans may act
        robbed = attached = 0
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            s = shmkit.Segment({name!r}, size=64)
            if s.created:
                shmkit._core.store32(s._mapping, 56, dead)
            try:
                if os.stat(s.path).st_ino != os.fstat(s._fd).st_ino:
                    robbed += 1
            except FileNotFoundError:
                robbed += 1
            attached += 1
            s._detach()
        print(attached, robbed)
    """


def _race_gc(name: str, seconds: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_attach_loop(name, seconds))],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    removed = 0
    try:
        while proc.poll() is None:
            removed += sum(r["removed"] for r in
                           inspect.collect_garbage(patterns=[name], orphans=True))
    finally:
        out, _ = proc.communicate(timeout=60)
    attached, robbed = map(int, out.split())
    assert robbed == 0 and attached > 10, (attached, robbed)
    assert removed > 0


def test_gc_orphans_never_robs_a_process_attaching_meanwhile(name):
    _race_gc(name, 3)


@pytest.mark.stress
def test_gc_orphans_never_robs_a_process_attaching_meanwhile_stress(name):
    _race_gc(name, 60)
