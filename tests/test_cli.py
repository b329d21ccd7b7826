"""The ``shmkit`` command, run as a real program against segments made by other processes."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any, Iterator

import pytest

import shmkit
from shmkit import inspect
from shmkit.segment import MAGIC

from conftest import INSTALLED, SOURCE_TREE, SPAWN, SRC, set_layout, spawn

ROOT = os.path.dirname(SOURCE_TREE)


# -- helpers ------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SHMKIT_DEBUG", None)
    return env


def cli(*args: str, rc: int | None = 0, module: str = "shmkit",
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m shmkit ARGS``; check the exit status and that no traceback leaked."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=60, env=_env(), cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    if rc is not None:
        assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def cli_json(*args: str, rc: int = 0) -> Any:
    return json.loads(cli(*args, "--json", rc=rc).stdout)


def entry(name: str) -> dict[str, Any]:
    """The ``shmkit ls --json`` entry of one name."""
    found = [o for o in cli_json("ls", name) if o["name"] == name]
    assert len(found) == 1, found
    return found[0]


def info(name: str) -> dict[str, Any]:
    (result,) = cli_json("info", name)
    return result


class Holder:
    """A separate python program that sets up objects, says "ready", and waits.

    It exits when its stdin is closed (``stop()``), or is killed (``kill()``).
    """

    def __init__(self, code: str) -> None:
        program = ("import os, sys, ctypes, numpy as np, shmkit\n"
                   + textwrap.dedent(code)
                   + "\nprint('ready', flush=True)\nsys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=_env())
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"holder failed: {line}{err}")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f and not f.closed:
                f.close()


@pytest.fixture
def holder() -> Iterator[Any]:
    made: list[Holder] = []

    def start(code: str) -> Holder:
        made.append(Holder(code))
        return made[-1]

    yield start
    for h in made:
        h.cleanup()


def shm(name: str) -> str:
    return f"/dev/shm/shmkit.{name}"


def header_bytes(name: str) -> bytes:
    """The header and attach table as they are in the file (for "changed nothing")."""
    with open(shm(name), "rb") as f:
        return f.read(4096 + 256 * 64)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- ls -----------------------------------------------------------------------


def test_ls_shows_kind_creator_and_live_attached_pid(name: str, holder: Any) -> None:
    h = holder(f"m = shmkit.Mutex({name!r})")
    obj = entry(name)
    assert obj["kind"] == "mutex" and obj["state"] == "ok"
    assert obj["creator_pid"] == h.pid
    assert [a["pid"] for a in obj["attached"]] == [h.pid]
    assert obj["lifetime"] == "persistent" and obj["size"] == 64

    table = cli("ls", name).stdout
    row = next(line for line in table.splitlines() if name in line)
    assert "mutex" in row and str(h.pid) in row and "persistent" in row and "ok" in row

    h.stop()  # closed cleanly: a persistent object stays, with nobody attached
    obj = entry(name)
    assert obj["attached"] == [] and obj["state"] == "ok"
    assert "no shmkit objects match" in cli("ls", name + "-nothing-like-it").stdout


def test_ls_does_not_attach_or_change_anything(name: str, holder: Any) -> None:
    holder(f"s = shmkit.Segment({name!r}, size=100, lifetime='attached')")
    before = header_bytes(name)
    cli("ls")
    cli("ls", "--json")
    cli("top", "--once")
    assert header_bytes(name) == before


# -- info ---------------------------------------------------------------------


def test_info_mutex_holder_alive_then_dead(name: str, holder: Any) -> None:
    h = holder(f"m = shmkit.Mutex({name!r}); m.acquire()")
    got = info(name)
    assert got["kind"] == "mutex"
    assert got["mutex"] == {"held": True, "holder_pid": h.pid, "holder_alive": True,
                            "waiters": False}
    assert f"held by pid {h.pid} (alive)" in cli("info", name).stdout

    h.kill()
    before = header_bytes(name)
    got = info(name)
    assert got["mutex"]["held"] and got["mutex"]["holder_pid"] == h.pid
    assert got["mutex"]["holder_alive"] is False
    assert got["attached"] == []
    text = cli("info", name).stdout
    assert f"held by pid {h.pid}, which is dead" in text
    # Looking changed nothing: same bytes, and the lock is still the dead holder's.
    assert header_bytes(name) == before
    m = shmkit.Mutex.open(name)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert m.acquire(timeout=10)
        assert m.recovered
        assert any(issubclass(w.category, shmkit.OwnerDiedWarning) for w in caught)
        assert info(name)["mutex"]["holder_pid"] == os.getpid()
        m.release()
        assert info(name)["mutex"] == {"held": False, "holder_pid": None,
                                       "holder_alive": False, "waiters": False}
        assert re.search(r"mutex\s+free", cli("info", name).stdout)
    finally:
        m.close()


def test_info_shows_waiters(name: str, holder: Any) -> None:
    h = holder(f"m = shmkit.Mutex({name!r}); m.acquire()")
    w = holder(f"""
        import threading
        m = shmkit.Mutex({name!r})
        threading.Thread(target=m.acquire, daemon=True).start()
    """)
    deadline = time.monotonic() + 20
    while not info(name)["mutex"]["waiters"]:
        assert time.monotonic() < deadline, "the waiter never showed"
        time.sleep(0.1)
    got = info(name)
    assert got["mutex"]["holder_pid"] == h.pid
    assert sorted(a["pid"] for a in got["attached"]) == sorted([h.pid, w.pid])
    assert "processes may be waiting" in cli("info", name).stdout


def test_info_sync_kinds_before_and_after_the_holder_dies(names: Any, holder: Any) -> None:
    rw, ev, sem, cond = names(), names(), names(), names()
    h = holder(f"""
        r = shmkit.RWLock({rw!r}); r.acquire_read()
        e = shmkit.Event({ev!r}, auto_reset=True); e.set()
        s = shmkit.Semaphore({sem!r}, value=3, maximum=5); s.acquire(); s.acquire()
        c = shmkit.Condition({cond!r}); c.acquire()
    """)
    got = {o["name"]: o for o in cli_json("info", rw, ev, sem, cond)}
    assert got[rw]["rwlock"]["readers"] == [{"pid": h.pid, "holds": 1}]
    assert not got[rw]["rwlock"]["writer"]["held"]
    assert got[ev]["event"] == {"set": True, "waiters": 0, "auto_reset": True}
    s = got[sem]["semaphore"]
    assert (s["value"], s["maximum"], s["holders"], s["dead_units"]) == (
        1, 5, [{"pid": h.pid, "units": 2}], 0)
    assert got[cond]["condition"]["lock"]["holder_pid"] == h.pid
    assert got[cond]["condition"]["lock"]["holder_alive"]

    text = cli("info", rw, ev, sem, cond).stdout
    assert f"pid {h.pid} × 1" in text and f"pid {h.pid} × 2" in text
    assert "set (auto-reset)" in text and "1 of at most 5" in text

    h.kill()
    got = {o["name"]: o for o in cli_json("info", rw, ev, sem, cond)}
    assert got[rw]["rwlock"]["readers"] == [] and got[rw]["rwlock"]["dead_reader_holds"] == 1
    assert got[sem]["semaphore"]["holders"] == []
    assert got[sem]["semaphore"]["dead_units"] == 2
    lock = got[cond]["condition"]["lock"]
    assert lock["held"] and lock["holder_pid"] == h.pid and not lock["holder_alive"]
    assert got[ev]["event"]["set"]  # an event has no holder: it stays set
    text = cli("info", rw, sem, cond).stdout
    assert "dead readers" in text and "dead holders" in text and "which is dead" in text


def test_info_record_and_array_layout(names: Any, holder: Any) -> None:
    st, arr = names(), names()
    holder(f"""
        class Point(ctypes.Structure):
            _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double), ("n", ctypes.c_int32)]
        s = shmkit.Struct({st!r}, Point)
        a = shmkit.Array({arr!r}, "float32", (4, 3))
    """)
    got = {o["name"]: o for o in cli_json("info", st, arr)}
    rec = got[st]["record"]
    assert got[st]["kind"] == "struct" and rec["itemsize"] == 24
    assert [(f["name"], f["dtype"], f["offset"]) for f in rec["fields"]] == [
        ("x", "float64", 0), ("y", "float64", 8), ("n", "int32", 16)]
    assert got[arr]["kind"] == "array"
    assert got[arr]["array"] == {"dtype": "float32", "shape": [4, 3]}
    text = cli("info", st, arr).stdout
    assert ".y" in text and "float64 at offset 8" in text
    assert "float32, shape (4, 3)" in text


def test_info_leaves_an_attached_lifetime_segment_alone(name: str, holder: Any) -> None:
    # A read-write open+close by info would remove it (it is the last to close).
    h = holder(f"s = shmkit.Segment({name!r}, size=4096, lifetime='attached')")
    h.kill()
    before = header_bytes(name)
    got = info(name)
    assert got["state"] == "stale" and got["lifetime"] == "attached"
    cli("info", name)
    assert os.path.exists(shm(name)) and header_bytes(name) == before


def test_info_by_path_and_missing_names(tmp_path: Any, name: str, holder: Any) -> None:
    path = str(tmp_path / "frames.shm")
    h = holder(f"s = shmkit.Segment(path={path!r}, size=1000)")
    (got,) = cli_json("info", path)
    assert got["path"] == path and got["kind"] == "raw" and got["size"] == 1000
    assert [a["pid"] for a in got["attached"]] == [h.pid]

    shmkit.Segment(name, size=10).close()
    proc = cli("info", "--json", "no-such-" + name, name, rc=1)
    assert f"no segment named 'no-such-{name}'" in proc.stderr
    assert [o["name"] for o in json.loads(proc.stdout)] == [name]  # carried on
    assert "no segment at" in cli("info", str(tmp_path / "nothing"), rc=1).stderr


# -- half-created and corrupt segments ----------------------------------------


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _header(version: int = 1, kind: int = 1, max_slots: int = 4, size: int = 0) -> bytes:
    hsize = 8192
    raw = bytearray(hsize + size)
    struct.pack_into("=8sIIIIQQQQIIIII", raw, 0, MAGIC, version, kind, 0, max_slots, hsize,
                     size, size, time.time_ns(), 1, 0, 0, 0, 0)
    return bytes(raw)


def test_half_created_and_corrupt_segments_are_listed(names: Any, holder: Any) -> None:
    half, creating, garbage, badkind, future, short, cut = (names() for _ in range(7))
    _write(shm(half), bytes(8192))                      # the creator died before the magic
    _write(shm(garbage), os.urandom(8192))
    _write(shm(badkind), _header(kind=99))
    _write(shm(future), _header(version=7))
    _write(shm(short), MAGIC + bytes(100))
    _write(shm(cut), _header()[:4200])                  # a whole header page, cut short
    _write(shm(creating), bytes(8192))
    holder(f"""
        from shmkit import _core  # a creator still at work: it holds the init lock
        fd = os.open({shm(creating)!r}, os.O_RDWR)
        assert _core.ofd_lock(fd, 0, 1)
    """)
    todo = [half, creating, garbage, badkind, future, short, cut]
    states = {o["name"]: o["state"] for o in cli_json("ls", *todo)}
    assert states[half] == "half-created"
    assert states[creating] == "creating"
    assert states[garbage] == "corrupt: not a shmkit segment (bad magic)"
    assert states[badkind] == "corrupt: an unknown kind 99"
    assert states[future] == "format v7"
    assert states[short].startswith("corrupt: the file is")
    assert states[cut] == "corrupt: the file holds only 4200 bytes, less than its 8192-byte header"

    table = cli("ls").stdout
    assert "half-created" in table and "format v7" in table
    for n in todo:
        (got,) = cli_json("info", n)
        assert got["state"] == states[n] and got["kind"] is None
        assert states[n] in cli("info", n).stdout
    assert "shmkit rm" in cli("info", garbage).stdout

    # gc removes the half-created one only; corrupt ones are left for `shmkit rm`.
    removed = [r["name"] for r in cli_json("gc", *todo)]
    assert removed == [half]
    assert not os.path.exists(shm(half))
    assert all(os.path.exists(shm(n)) for n in todo if n != half)
    cli("rm", "--yes", garbage, badkind, future, short, cut)
    assert not any(os.path.exists(shm(n)) for n in (garbage, badkind, future, short, cut))


# -- rm -----------------------------------------------------------------------


def test_rm_removes_reports_missing_and_carries_on(names: Any, holder: Any) -> None:
    a, b, missing = names(), names(), names()
    h = holder(f"x = shmkit.Segment({a!r}, size=10); y = shmkit.Event({b!r})")
    proc = cli("rm", "--yes", a, missing, b, rc=1)
    errors = proc.stderr.splitlines()
    assert f"no segment named {missing!r}" in errors[0]
    assert f"removed {a}" in proc.stdout and f"removed {b}" in proc.stdout
    assert not os.path.exists(shm(a)) and not os.path.exists(shm(b))
    # a warning per object that live processes still map, naming them
    assert [e for e in errors[1:] if "warning" in e] == [
        f"shmkit rm: warning: {n} is still mapped by pid {h.pid}: they keep their memory "
        "until they close it" for n in (a, b)]

    c = names()
    shmkit.Segment(c, size=10).close()
    result = cli_json("rm", "-y", c, missing, rc=1)
    assert [(r["name"], r["removed"]) for r in result] == [(missing, False), (c, True)]
    assert "invalid segment name" in cli("rm", "-y", "bad name!", rc=1).stderr


def test_removing_objects_that_are_not_queues_never_lists_dev_shm(names: Any,
                                                                   monkeypatch: Any) -> None:
    # Each removal looked for Queue payload files by listing the whole of
    # /dev/shm, whatever the kind: `shmkit rm` of 8,000 objects took 11 s,
    # of 20,000 two minutes.  Only a queue has payload files.
    made = [names() for _ in range(6)]
    for n in made[:3]:
        shmkit.Segment(n, size=64).close()
    for n in made[3:]:
        shmkit.Store(n, create=True, lifetime="persistent").close()
    queue = shmkit.Queue(name=names())
    queue.put(bytes(1 << 20))  # one payload file
    listed: list[str] = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d=".": listed.append(str(d)) or real(d))
    for n in made[:3]:
        inspect.remove(n)
    for n in made[3:]:
        shmkit.unlink(n)
    assert listed == [] and not any(os.path.exists(shm(n)) for n in made)
    path = queue.path
    inspect.remove(queue.name)  # a queue's payloads still go with it
    queue.close()
    assert listed and not [e for e in real("/dev/shm")
                           if e.startswith(os.path.basename(path) + "~oob.")]


def test_rm_by_path_refuses_a_file_that_is_not_a_segment(tmp_path: Any, holder: Any) -> None:
    seg = str(tmp_path / "seg.shm")
    holder(f"s = shmkit.Segment(path={seg!r}, size=10); s.close()")
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    assert "not a shmkit segment" in cli("rm", "-y", str(other), rc=1).stderr
    assert other.read_text() == "precious"
    cli("rm", "-y", seg)
    assert not os.path.exists(seg)


# -- gc -----------------------------------------------------------------------


def test_gc_removes_attached_lifetime_segments_of_dead_processes(names: Any,
                                                                 holder: Any) -> None:
    alive, dead, persistent, ro = names(), names(), names(), names()
    live = holder(f"s = shmkit.Segment({alive!r}, size=64, lifetime='attached')")
    gone = holder(f"""
        s = shmkit.Segment({dead!r}, size=64, lifetime='attached')
        p = shmkit.Segment({persistent!r}, size=64)
        r = shmkit.Segment({ro!r}, size=64, lifetime='attached')
    """)
    reader = holder(f"r = shmkit.Segment.open({ro!r}, readonly=True)")
    gone.kill()
    mine = [alive, dead, persistent, ro]
    assert entry(dead)["state"] == "stale" and entry(alive)["state"] == "ok"

    would = cli_json("gc", "--dry-run", *mine)
    assert [(r["name"], r["removed"]) for r in would] == [(dead, False)]
    assert "would remove " + dead in cli("gc", "--dry-run", *mine).stdout
    assert all(os.path.exists(shm(n)) for n in mine)  # a dry run removes nothing

    removed = cli_json("gc", *mine)
    assert [(r["name"], r["removed"]) for r in removed] == [(dead, True)]
    assert not os.path.exists(shm(dead))
    assert os.path.exists(shm(alive)) and os.path.exists(shm(persistent))
    assert os.path.exists(shm(ro))  # a live read-only handle keeps it

    live.kill()
    reader.kill()
    out = cli("gc", *mine).stdout
    assert f"removed {alive}" in out and f"removed {ro}" in out
    assert not os.path.exists(shm(alive)) and not os.path.exists(shm(ro))
    assert os.path.exists(shm(persistent))  # never: its lifetime is until unlink
    assert "nothing to remove" in cli("gc", *mine).stdout


def test_gc_does_not_rob_a_process_attaching_meanwhile(name: str) -> None:
    # The attacher opens the segment, checks that the name still refers to what it
    # attached to, then vanishes without closing (as a killed process would), so
    # the segment is garbage again at once, while gc keeps removing it.  If gc
    # unlinked under an attacher, the attacher would hold a removed file.
    code = f"""
        import os, time, shmkit
        attached = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            s = shmkit.Segment({name!r}, size=64, lifetime="attached")
            assert os.stat({shm(name)!r}).st_ino == os.fstat(s._fd).st_ino
            s._detach()  # drop the attachment without removing: like SIGKILL
            attached += 1
        print(attached)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    removed = 0
    try:
        cli("gc", name)
        end = time.monotonic() + 2
        while time.monotonic() < end and proc.poll() is None:
            removed += len(inspect.collect_garbage(patterns=[name]))
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert int(out) > 10 and removed > 0, (out, removed)


def test_gc_removes_stale_temp_files_only(names: Any, holder: Any) -> None:
    old, fresh, held = names(), names(), names()
    gone = dead_pid()
    paths = {
        old: f"/dev/shm/.shmkit.{old}.{gone}.0badf00d.tmp",
        fresh: f"/dev/shm/.shmkit.{fresh}.{os.getpid()}.0badf00d.tmp",
        held: f"/dev/shm/.shmkit.{held}.{gone}.0badf00d.tmp",
    }
    try:
        for p in paths.values():
            _write(p, bytes(4096))
        holder(f"""
            from shmkit import _core  # a creator at work holds the init lock
            fd = os.open({paths[held]!r}, os.O_RDWR)
            assert _core.ofd_lock(fd, 0, 1)
        """)
        assert [r["name"] for r in cli_json("gc", "--dry-run", old, fresh, held)] == [
            os.path.basename(paths[old])]
        assert os.path.exists(paths[old])
        cli("gc", old, fresh, held)
        assert not os.path.exists(paths[old])
        assert os.path.exists(paths[fresh])  # its (live) creator may be about to lock it
        assert os.path.exists(paths[held])   # a creator at work
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)


# -- top, help, usage, demo, bench ----------------------------------------------


def test_top_once_shows_lock_holders(name: str, holder: Any) -> None:
    h = holder(f"m = shmkit.Mutex({name!r}); m.acquire()")
    out = cli("top", "--once").stdout
    row = next(line for line in out.splitlines() if name in line)
    assert f"held by {h.pid}" in row
    h.kill()
    row = next(line for line in cli("top", "--once").stdout.splitlines() if name in line)
    assert f"held by {h.pid} (dead)" in row


def test_top_runs_until_interrupted(name: str) -> None:
    shmkit.Segment(name, size=10).close()
    proc = subprocess.Popen([sys.executable, "-m", "shmkit", "top", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    # Interrupt it once it runs (its first snapshot is out), not while it
    # is still starting up: a slow start (a loaded machine, ASan) is not a bug.
    # One thread reads all of stdout, so no output sits in another reader's buffer.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any(name in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(30) == 0, err
    reader.join(30)
    assert any(name in line for line in lines) and "Traceback" not in err


@pytest.mark.parametrize("command", ["", "ls", "info", "rm", "gc", "top", "demo", "bench"])
def test_help_has_purpose_and_examples(command: str) -> None:
    out = cli(*([command] if command else []), "--help").stdout
    assert "Examples:" in out
    examples = out.split("Examples:")[1]
    assert f"$ shmkit {command}".rstrip() in examples
    lines = [line for line in examples.splitlines() if line.strip()]
    for intent, cmd in zip(lines[::2], lines[1::2]):  # a sentence, then the command
        assert intent.startswith(" ") and intent.rstrip().endswith(":"), intent
        assert cmd.strip().startswith("$ shmkit"), cmd


@pytest.mark.parametrize("args", [[], ["nope"], ["ls", "--bogus"], ["info"], ["rm"],
                                  ["top", "--interval", "0"], ["demo", "--senders", "0"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = cli(*args, rc=2)
    assert "usage:" in proc.stderr


def test_entry_points() -> None:
    assert cli("--version", module="shmkit.cli").stdout.startswith("shmkit ")
    exe = os.path.join(os.path.dirname(sys.executable), "shmkit")
    if not os.path.exists(exe):
        pytest.skip("the shmkit script is not installed next to this python")
    proc = subprocess.run([exe, "ls", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)


def test_demo_runs_senders_and_a_receiver_to_a_summary() -> None:
    proc = cli("demo", "--senders", "2", "--records", "500", "--quiet")
    assert "1,000 from 2 senders" in proc.stdout, proc.stdout
    assert "every sender's records arrived once, in order" in proc.stdout


@pytest.mark.parametrize("after", [0.0, 0.1, 1.0])
def test_ctrl_c_in_a_terminal_ends_the_demo_without_tracebacks(after: float) -> None:
    # A terminal's Ctrl-C reaches every program of the demo's process group:
    # each sender printed a KeyboardInterrupt traceback, from its sending or,
    # just started, from its imports.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmkit", "demo", "--senders", "2", "--records", "100000000",
         "--quiet"], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=_env())
    try:
        deadline = time.monotonic() + 30
        while not glob.glob(f"/dev/shm/shmkit.demo-logs-{proc.pid}-*"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(after)  # the senders start, import, send
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert proc.returncode == 130, (proc.returncode, out)
    if after >= 1.0:  # the receiver was listening: it says so, and what came
        assert "interrupted" in out
    assert not glob.glob(f"/dev/shm/shmkit.demo-logs-{proc.pid}-*")


def test_bench_outside_a_checkout_says_how_to_get_them(tmp_path: Any) -> None:
    pkg = tmp_path / "site" / "shmkit"
    shutil.copytree(os.path.join(SRC, "shmkit"), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-m", "shmkit", "bench", "--list"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "make bench" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_runs_the_checkouts_benchmarks() -> None:
    if INSTALLED:
        pytest.skip("the installed package has no checkout (see the test above)")
    if not os.path.exists(os.path.join(ROOT, "benchmarks", "__main__.py")):
        pytest.skip("this checkout has no benchmarks/ yet")
    proc = cli("bench", "--list", cwd="/")
    assert proc.stdout.strip()


# -- hostile headers ----------------------------------------------------------


def _patched(data: bytes, *edits: tuple[int, str, Any]) -> bytes:
    raw = bytearray(data)
    for off, fmt, value in edits:
        struct.pack_into(fmt, raw, off, value)
    return bytes(raw)


def _hostile_variants(good: bytes) -> dict[str, bytes]:
    """Copies of a valid segment file with one field made inconsistent."""
    def layout(text: bytes) -> bytes:
        raw = bytearray(_patched(good, (72, "=I", len(text))))
        raw[1024:1024 + len(text)] = text
        return bytes(raw)

    payload = struct.unpack_from("=Q", good, 24)[0]
    out = {
        "layout_len": _patched(good, (72, "=I", 5000)),
        "layout_json": layout(b"{not json"),
        "layout_list": layout(b"[1, 2]"),
        "layout_dtype": layout(b'{"dtype": {"names": ["a"], "formats": []}, "itemsize": 3}'),
        "hwm": _patched(good, (68, "=I", 0xFFFFFFFF)),
        "max_slots": _patched(good, (20, "=I", 5000)),
        "hdr_size": _patched(good, (24, "=Q", 12345)),
        "size": _patched(good, (32, "=Q", 1 << 40)),
        # a mutex held by a token that no attachment can have (slot 1023 of 256)
        "mutex_word": _patched(good, (12, "=I", int(shmkit.Kind.MUTEX)),
                               (payload, "=I", 0x7FFFFFFF)),
        "table": good[:4096] + os.urandom(4096) + good[8192:],
    }
    for kind in shmkit.Kind:  # every kind's reader over a 12-byte struct payload
        out[f"kind_{kind.name.lower()}"] = _patched(good, (12, "=I", int(kind)))
    return out


def test_hostile_headers_never_crash_ls_or_info(names: Any, holder: Any) -> None:
    src = names()
    h = holder(f"s = shmkit.Struct({src!r}, np.dtype([('x', '<f8'), ('n', '<i4')]))")
    h.stop()
    with open(shm(src), "rb") as f:
        good = f.read()
    made = {}
    for label, data in _hostile_variants(good).items():
        made[label] = names()
        _write(shm(made[label]), data)
    by_name = {o["name"]: o for o in cli_json("info", *made.values())}
    assert set(by_name) == set(made.values())
    states = {label: by_name[n]["state"] for label, n in made.items()}
    for label in ("layout_len", "layout_json", "layout_list", "max_slots", "hdr_size", "size",
                  "layout_dtype"):  # a struct layout with no format: Struct refuses it
        assert states[label].startswith("corrupt: "), (label, states[label])
    for label in ("hwm", "table", "mutex_word"):
        assert states[label] == "ok", (label, states[label])
    assert by_name[made["hwm"]]["attached"] == []
    assert by_name[made["mutex_word"]]["mutex"] == {
        "held": True, "holder_pid": None, "holder_alive": False, "waiters": False}
    assert "detail_error" in by_name[made["kind_rwlock"]]  # payload too small for one
    for kind in shmkit.Kind:
        got = by_name[made[f"kind_{kind.name.lower()}"]]
        assert got["kind"] == kind.name.lower()
        # ls is honest: a payload format or a layout value the kind's class
        # would refuse is shown (a Semaphore's open needs its initial value).
        assert (got["state"] == "ok" or got["state"].startswith("format: ") or
                (kind is shmkit.Kind.SEMAPHORE and got["state"].startswith(
                    "corrupt: no value in its layout"))), got["state"]
    cli("ls", *made.values())
    cli("top", "--once")
    text = cli("info", *made.values()).stdout
    assert text.count("corrupt: ") >= 6


def test_layouts_of_the_wrong_types_or_lone_surrogates_never_stop_info_top_or_ls(
        names: Any) -> None:
    # Valid JSON another user wrote: one such object must not cost the
    # listing of the others, nor print what no terminal can encode.
    good = names()
    shmkit.Array(good, "<f8", 4, lifetime="persistent").close()
    hostile = {
        "shape 5": b'{"format":2,"dtype":"<f8","shape":5}',
        "shape null": b'{"format":2,"dtype":"<f8","shape":null}',
        "names 5": b'{"format":2,"dtype":{"names":5},"shape":[4]}',
        "surrogate name": b'{"format":2,"dtype":{"names":["\\ud800"],"formats":["<f8"],'
                          b'"offsets":[0],"itemsize":8},"shape":[4]}',
        "surrogate dtype": b'{"format":2,"dtype":"\\ud800","shape":[4]}',
    }
    made = {}
    for label, text in hostile.items():
        made[label] = names()
        shmkit.Array(made[label], "<f8", 4, lifetime="persistent").close()
        set_layout(made[label], text)
    for label in ("surrogate name", "surrogate dtype"):
        with pytest.raises(shmkit.CorruptError, match="lone surrogate"):
            shmkit.Array.open(made[label])
    info = {o["name"]: o for o in cli_json("info", good, *made.values())}
    assert info[good]["state"] == "ok"
    assert info[made["surrogate name"]]["state"].startswith("corrupt: ")
    assert good in cli("info", good, *made.values()).stdout
    top = json.loads(cli("top", "--once", "--json", good, *made.values()).stdout)
    shown = {o["name"]: o for o in top["objects"]}
    assert shown[good]["activity"] == "float64 (4,)"
    assert shown[made["shape 5"]]["activity"] == "unreadable shape"
    assert shown[made["names 5"]]["activity"] == "record (4,)"
    cli("top", "--once", good, *made.values())
    cli("ls")
    listed = {o["name"] for o in cli_json("ls")}
    assert listed >= {good, *made.values()}


@pytest.mark.parametrize("text, why", [
    (b'{"format":2.0,"dtype":"<f8","shape":[4]}', "format of 2.0"),
    (b'{"format":true,"dtype":"<f8","shape":[4]}', "format of True"),
    (b'{"format":2,"dtype":"<f8","shape":[4],"x":NaN}', "unreadable"),
    (b'{"format":2,"dtype":"<f8","shape":[-Infinity]}', "unreadable"),
    (b'{"format":2,"dtype":"<f8","shape":[4],"x":1e400}', "unreadable"),  # (an infinity)
    (b'{"format":2,"dtype":"<f8","shape":[4],"x":-1e999}', "unreadable"),
])
def test_a_layout_shmkit_never_writes_is_corrupt_to_open_and_to_ls(names: Any, text: bytes,
                                                                  why: str) -> None:
    # A format of 2.0 (or true) passed each kind's `format == 2` and opened,
    # while ls called it corrupt; NaN reached `--json` as no strict JSON, and
    # so did 1e400 as Infinity.
    name = names()
    shmkit.Array(name, "<f8", 4, lifetime="persistent").close()
    set_layout(name, text)
    with pytest.raises(shmkit.CorruptError, match=why):
        shmkit.Array.open(name)
    for command in (["ls", "--json", name], ["info", "--json", name],
                    ["top", "--once", "--json", name]):
        out = cli(*command).stdout
        json.loads(out, parse_constant=lambda word: pytest.fail(f"{word} in {command}"))
        assert "corrupt: " in out, (command, out)


@pytest.mark.parametrize("make, text, error, state", [
    (lambda n: shmkit.Event(n, create=True), b'{"auto_reset": "no"}', shmkit.CorruptError,
     "corrupt: auto_reset='no' in its layout"),
    (lambda n: shmkit.Event(n, create=True), b'{"auto_reset": 1}', shmkit.CorruptError,
     "corrupt: auto_reset=1 in its layout"),
    (lambda n: shmkit.Semaphore(n, value=2, create=True),
     b'{"format": 2, "value": null, "maximum": null}', shmkit.CorruptError,
     "corrupt: value=None in its layout"),
    (lambda n: shmkit.Semaphore(n, value=2, create=True), b'{"format": 2}',
     shmkit.CorruptError, "corrupt: no value in its layout"),
    (lambda n: shmkit.Semaphore(n, value=2, create=True), b'{"format": 9, "value": 2}',
     shmkit.FormatVersionError, "format: semaphore format 9"),
    (lambda n: shmkit.Condition(n, create=True), b'{"format": 9}',
     shmkit.FormatVersionError, "format: condition format 9"),
])
def test_ls_shows_a_sync_objects_layout_its_open_refuses(names: Any, make: Any, text: bytes,
                                                       error: type, state: str) -> None:
    # ls read the header only, and called these "ok" while opening them
    # raised: "ok" means the object can be opened.
    name = names()
    obj = make(name)
    try:
        set_layout(name, text)
        with pytest.raises(error):
            type(obj)(name, create=False)
        [listed] = cli_json("ls", name)
        assert listed["state"].startswith(state), listed["state"]
    finally:
        obj.close()


def test_a_long_state_never_squeezes_the_names_out_of_a_narrow_table(names: Any) -> None:
    good, bad = names(), names()
    for n in (good, bad):
        shmkit.Array(n, "<f8", 4, lifetime="persistent").close()
    set_layout(bad, b"[1, 2]")  # "corrupt: ... a layout description that is not an object"
    env = dict(_env(), COLUMNS="80")
    for command in (["ls"], ["top", "--once"]):
        proc = subprocess.run([sys.executable, "-m", "shmkit", *command, good, bad],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert good in proc.stdout and bad in proc.stdout, proc.stdout


def test_control_characters_another_user_wrote_reach_no_terminal(names: Any) -> None:
    # A field name with an OSC title sequence, a screen clear and a C1 CSI:
    # shown escaped, in the table and in info, never sent raw.
    import numpy as np

    n = names()
    odd = "x\x1b]0;PWNED\x07\x1b[2J\x9b1m"
    shmkit.Array(n, np.dtype([(odd, "<f8")]), 4, lifetime="persistent").close()
    text = cli("info", n).stdout
    assert "\\x1b]0;PWNED\\x07\\x1b[2J\\u009b1m" in text  # (\x9b: a byte not UTF-8)
    for command in (["info", n], ["ls", n], ["top", "--once", n]):
        out = cli(*command).stdout
        assert not any(c in out for c in "\x1b\x07\x9b"), (command, out)


def test_gc_and_rm_escape_the_file_names_another_user_planted(names: Any) -> None:
    # A creation temp file's name is any bytes another user chose (gc reads
    # every user's as root): escape sequences and bytes that are not UTF-8.
    base, gone = names(), dead_pid()
    planted = [f"/dev/shm/.shmkit.{base}\x1b]0;PWNED\x07\x1b[2J\u202e.{gone}.0badf00d.tmp",
               os.fsdecode(f"/dev/shm/.shmkit.{base}".encode() + b"\xff\xfe"
                           + f".{gone}.0badf00e.tmp".encode())]
    try:
        for path in planted:
            _write(path, bytes(4096))
        proc = subprocess.run([sys.executable, "-m", "shmkit", "gc", "--dry-run", f"{base}*"],
                              capture_output=True, timeout=60, env=_env())
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(b"would remove") == 2, proc.stdout
        assert not any(c in proc.stdout for c in (b"\x1b", b"\x07", b"\xff", b"\xe2\x80\xae"))
        assert b"\\x1b]0;PWNED\\x07\\x1b[2J\\u202e" in proc.stdout
        assert b"\\xff\\xfe" in proc.stdout
        # escaped once, in the name and in the reason (repr escaped it twice)
        assert b"\\\\" not in proc.stdout, proc.stdout
        assert proc.stdout.count(b"PWNED") == 2, proc.stdout  # the file and the object
    finally:
        for path in planted:
            if os.path.exists(path):
                os.unlink(path)


def test_info_keeps_its_values_beside_a_long_or_invisible_field_name(names: Any) -> None:
    # A 300-character field name squeezed every value out of an 100-column
    # info; a line end in one started a row of its own, and bidi overrides
    # and zero-width characters reached the terminal.
    import numpy as np

    n = names()
    shmkit.Array(n, np.dtype([("f" + "W" * 300, "<f8"), ("spoof\nrow\u202e\u200b", "<i4"),
                              ("tag\U000e0041\\x1b", "<i4")]),  # a tag; a fake escape
                 4, lifetime="persistent").close()
    proc = subprocess.run([sys.executable, "-m", "shmkit", "info", n], capture_output=True,
                          text=True, timeout=60, env=dict(_env(), COLUMNS="100"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines if line.split()}
    assert row["lifetime"] == ["persistent"] and row["size"][0] == "64", lines
    assert "tag\\U000e0041\\\\x1b" in proc.stdout
    assert "spoof\\x0arow\\u202e\\u200b" in proc.stdout
    assert not any(line.lstrip().startswith("row") for line in lines)
    assert not any(c in proc.stdout for c in "\u202e\u200b\U000e0041")


def test_describing_is_invisible_to_a_closing_last_process(names: Any) -> None:
    # While info has an object open, the last attached-lifetime process closing
    # must still remove it (a read-only handle's lock on byte 1 would stop it).
    for kind_open in (lambda n: shmkit.Segment(n, size=64, lifetime="attached"),
                      lambda n: shmkit.Mutex(n, lifetime="attached")):
        n = names()
        obj = kind_open(n)
        looker, why = inspect._open_readonly(
            shmkit.Kind[inspect.scan(n)["kind"].upper()], n, shm(n))
        try:
            assert why is None
            fd = os.open(shm(n), os.O_RDONLY)
            try:
                assert not shmkit._core.ofd_held(fd, 1, 1)
            finally:
                os.close(fd)
            obj.close()
            assert not os.path.exists(shm(n))
        finally:
            looker.close()


def test_links_and_fifos_are_listed_never_followed_or_opened(names: Any,
                                                             tmp_path: Any) -> None:
    link, fifo = names(), names()
    target = tmp_path / "precious"
    target.write_bytes(MAGIC + bytes(8192))
    os.symlink(target, shm(link))
    os.mkfifo(shm(fifo), 0o600)  # opening it for reading would block a careless tool
    states = {o["name"]: o["state"] for o in cli_json("ls", link, fifo)}
    assert states == {link: "unreadable: a symbolic link (never followed)",
                      fifo: "unreadable: not a regular file"}
    (got,) = cli_json("info", link)
    assert got["state"] == states[link]
    assert cli_json("gc", link, fifo) == []
    cli("rm", "--yes", link)
    assert not os.path.lexists(shm(link)) and target.exists()  # the link, not its target


@pytest.mark.skipif(os.geteuid() != 0, reason="plants the files as another user")
def test_files_named_dot_and_dot_dot_stop_no_listing(name: str, holder: Any) -> None:
    # Any local user may make /dev/shm/shmkit.. and shmkit... (names "." and
    # ".."): ls, gc and top then failed for everyone on the name they cannot
    # open, listing nothing and cleaning nothing.
    holder(f"s = shmkit.Segment({name!r}, size=64)")
    planted = [shm("."), shm("..")]
    try:
        for path in planted:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.chown(path, 65534, 65534)
        assert name in [o["name"] for o in cli_json("ls")]
        assert name in [o["name"] for o in inspect.list_objects()]
        assert name in cli("top", "--once").stdout
        cli_json("gc", "--dry-run")
        assert all(os.path.exists(p) for p in planted)  # not shmkit's to judge
    finally:
        for path in planted:
            os.unlink(path)


class Careless(shmkit.Segment):
    """A kind's class whose open() drops readonly=True (attaches read-write)."""

    _kind = shmkit.Kind.HEAP

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Careless":
        kwargs.pop("readonly", None)
        return super().open(name, **kwargs)


def test_a_class_ignoring_readonly_is_not_used_and_removes_nothing(
        name: str, holder: Any, monkeypatch: Any) -> None:
    h = holder(f"""
        s = shmkit.Segment.__new__(shmkit.Segment)
        s._attach({name!r}, None, size=64, create=True, kind=shmkit.Kind.HEAP,
                  lifetime="attached")
    """)
    h.kill()  # describing must not become its last closer (that would remove it)
    monkeypatch.setitem(inspect.KIND_CLASSES, shmkit.Kind.HEAP, f"{__name__}:Careless")
    got = inspect.describe(name)
    assert "ignores readonly=True" in got["detail_error"]
    assert got["kind"] == "heap" and got["state"] == "stale" and got["size"] == 64
    assert os.path.exists(shm(name))


# -- usage lines ----------------------------------------------------------------


@pytest.mark.parametrize("command,usage", [
    ("ls", "usage: shmkit ls [-h] [--json] [PATTERN ...]"),
    ("info", "usage: shmkit info [-h] [--json] NAME [NAME ...]"),
    ("rm", "usage: shmkit rm [-h] [--yes] [--json] PATTERN [PATTERN ...]"),
    ("gc", "usage: shmkit gc [-h] "),
    ("top", "usage: shmkit top [-h] [--interval SECONDS] [--once] [--json] [PATTERN ...]"),
    ("demo", "usage: shmkit demo [-h] [--senders N] [--records N] [--quiet]"),
    ("bench", "usage: shmkit bench [-h] ..."),
])
def test_every_subcommand_has_a_clean_usage_line(command: str, usage: str) -> None:
    out = cli(command, "--help").stdout
    first = " ".join(out.split("\n\n")[0].split())  # argparse may wrap it
    assert first.startswith(usage), first
    assert "COMMAND" not in first and "--version" not in first, first
    # a usage error names the same usage
    err = cli(command, "--no-such-flag", rc=2).stderr if command != "bench" else ""
    assert not err or " ".join(err.split()).startswith(f"usage: shmkit {command} ")


# -- rm: patterns, confirmation -------------------------------------------------


def test_rm_takes_patterns_lists_and_removes_with_yes(names: Any, holder: Any) -> None:
    base = names()
    a, b, c, other = f"{base}.a", f"{base}.b", f"{base}.c", names()
    try:
        h = holder(f"""
            x = shmkit.Segment({a!r}, size=1000)
            y = shmkit.Mutex({b!r}); y.close()
            z = shmkit.Event({c!r}); z.close()
            o = shmkit.Segment({other!r}, size=10); o.close()
        """)
        proc = cli("rm", "--yes", f"{base}.[ab]", f"{base}.*", rc=0)
        assert proc.stdout.splitlines() == [f"removed {a}", f"removed {b}", f"removed {c}"]
        assert f"warning: {a} is still mapped by pid {h.pid}" in proc.stderr
        assert not any(os.path.exists(shm(n)) for n in (a, b, c))
        assert os.path.exists(shm(other))  # not matched
        proc = cli("rm", "-y", f"{base}.*", rc=1)
        assert proc.stderr.strip() == (f"shmkit rm: no object matches '{base}.*'; "
                                       "see `shmkit ls`")
        assert proc.stdout == ""
    finally:
        for n in (a, b, c):
            if os.path.exists(shm(n)):
                os.unlink(shm(n))


def test_rm_of_a_service_removes_its_request_channel_and_only_that(names: Any) -> None:
    # `shmkit rm NAME` of a service left NAME.requests behind; a NAME.requests
    # that is not a channel is another object, and stays.
    svc, other = names(), names()
    try:
        shmkit.Service(svc).close()
        shmkit.Service(other).close()
        os.unlink(shm(f"{other}.requests"))
        shmkit.Store(f"{other}.requests", lifetime="persistent").close()
        result = cli_json("rm", "--yes", svc, other)
        assert [(r["name"], r["kind"], r["removed"]) for r in result] == [
            (svc, "service", True), (other, "service", True),
            (f"{svc}.requests", "channel", True)]
        assert not os.path.exists(shm(svc)) and not os.path.exists(shm(f"{svc}.requests"))
        assert os.path.exists(shm(f"{other}.requests"))  # a store: not the service's
        # named twice (its channel by path too): removed once; by path: the file only
        shmkit.Service(svc).close()
        result = cli_json("rm", "--yes", svc, shm(f"{svc}.requests"))
        assert [(r["kind"], r["removed"]) for r in result] == [("service", True),
                                                              ("channel", True)]
        shmkit.Service(svc).close()
        result = cli_json("rm", "--yes", shm(svc))
        assert [(r["kind"], r["removed"]) for r in result] == [("service", True)]
        assert os.path.exists(shm(f"{svc}.requests"))
    finally:
        for n in (svc, f"{svc}.requests", other, f"{other}.requests"):
            if os.path.exists(shm(n)):
                os.unlink(shm(n))


def test_rm_without_a_terminal_refuses_unless_yes(names: Any) -> None:
    a, b = names(), names()
    shmkit.Segment(a, size=10).close()
    shmkit.Segment(b, size=10).close()
    proc = cli("rm", a, b, rc=1)
    assert "stdin is not a terminal; pass --yes (-y)" in proc.stderr
    assert a in proc.stderr and b in proc.stderr
    assert os.path.exists(shm(a)) and os.path.exists(shm(b))
    proc = cli("rm", "--json", a, rc=1)
    assert json.loads(proc.stdout) == [] and "--yes" in proc.stderr
    assert os.path.exists(shm(a))
    result = cli_json("rm", "--yes", a, b)
    assert [(r["name"], r["removed"], r["kind"], r["size"]) for r in result] == [
        (a, True, "raw", 10), (b, True, "raw", 10)]
    assert not os.path.exists(shm(a)) and not os.path.exists(shm(b))


def _rm_on_terminal(answer: str, *args: str) -> subprocess.CompletedProcess:
    """``shmkit rm ARGS`` with a pseudo-terminal as stdin, answering ``answer``."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shmkit", "rm", *args], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
        os.close(slave)
        slave = -1
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_rm_on_a_terminal_lists_and_asks(names: Any, holder: Any) -> None:
    a, b = names(), names()
    h = holder(f"x = shmkit.Store({a!r}); y = shmkit.Mutex({b!r})")
    proc = _rm_on_terminal("n", a, b)
    assert proc.returncode == 0, proc.stderr
    assert "Remove these 2 objects? [y/N]" in proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in (a, b)}
    assert rows[a][1] == "store" and rows[b][1] == "mutex" and "64 B" in " ".join(rows[b])
    assert rows[a][-1] == str(h.pid) and rows[b][-1] == str(h.pid)
    assert "nothing removed" in proc.stdout
    assert os.path.exists(shm(a)) and os.path.exists(shm(b))

    proc = _rm_on_terminal("y", a)
    assert proc.returncode == 0, proc.stderr
    assert "Remove it? [y/N]" in proc.stderr and f"removed {a}" in proc.stdout
    assert f"{a} is still mapped by pid {h.pid}" in proc.stderr
    assert not os.path.exists(shm(a)) and os.path.exists(shm(b))

    # with --json the list and the question go to stderr: stdout stays JSON
    proc = _rm_on_terminal("yes", "--json", b)
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)] == [b]
    assert b in proc.stderr and "Remove it?" in proc.stderr
    assert not os.path.exists(shm(b))


# -- top: live activity ---------------------------------------------------------


def busy(prefix: str, ready: Any, stop: Any) -> None:
    """A spawned child keeping a channel, a store, a heap, a semaphore and a
    condition busy until told to stop."""
    import shmkit as sk

    ch = sk.Channel(f"{prefix}.ch", capacity=1 << 16)
    st = sk.Store(f"{prefix}.st")
    hp = sk.Heap(f"{prefix}.hp", size=1 << 20)
    sem = sk.Semaphore(f"{prefix}.sem", value=1)
    cond = sk.Condition(f"{prefix}.cond")
    stopping = False

    def waiter() -> None:  # notify() counts only when it finds someone waiting
        w = sk.Condition(f"{prefix}.cond")
        while not stopping:
            with w:
                w.wait(timeout=0.5)
        w.close()

    import threading

    thread = threading.Thread(target=waiter)
    thread.start()
    ready.set()
    i = 0
    end = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < end:
        for _ in range(50):
            ch.send(b"x" * 40)
            ch.recv(timeout=5)
            st[i] = b"v" * 24          # a new key, and one 100 keys old goes
            if i >= 100:
                del st[i - 100]
            hp.free(hp.alloc(64))
            with sem:
                pass
            i += 1
        with cond:
            cond.notify()
        time.sleep(0.001)  # let the waiter take its wake-up and wait again
    stopping = True
    thread.join()
    for obj in (ch, st, hp, sem, cond):
        obj.close()


def test_top_once_shows_rates_of_busy_objects(names: Any) -> None:
    base = names()
    kinds = ("ch", "st", "hp", "sem", "cond")
    ready, stop = SPAWN.Event(), SPAWN.Event()
    child = spawn(busy, base, ready, stop)
    try:
        assert ready.wait(60), "the busy child did not start"

        def busy_rates() -> tuple[dict[str, Any], dict[str, Any]]:
            snap = json.loads(cli("top", "--once", "--json", "--interval", "0.5",
                                  f"{base}.*").stdout)
            assert snap["interval"] == 0.5
            got = {o["name"].rsplit(".", 1)[1]: o for o in snap["objects"]}
            assert sorted(got) == sorted(kinds)
            return got, {k: got[k]["rates"] for k in kinds}

        got, r = busy_rates()
        assert r["ch"]["sent"] > 0 and r["ch"]["received"] > 0, r["ch"]
        assert got["ch"]["counters"]["sent"] > 0
        assert r["st"]["freed_bytes"] > 0, (r["st"], got["st"]["counters"])
        assert got["st"]["counters"]["keys"] > 0
        assert r["hp"]["allocs"] > 0 and r["hp"]["frees"] > 0, r["hp"]
        assert r["sem"]["changes"] > 0
        # notify() counts only when it finds a waiter not yet granted a wake-up,
        # which a loaded machine's scheduling decides: its rate is shown, maybe 0.
        assert "notifies" in r["cond"]

        text = cli("top", "--once", "--interval", "0.5", f"{base}.*").stdout
        rows = {line.split()[0].rsplit(".", 1)[1]: line for line in text.splitlines()
                if line.strip().startswith(base + ".")}
        assert re.search(r"[1-9][\d.,k]* sent/s", rows["ch"]), rows["ch"]
        assert re.search(r"[1-9][\d.,k]* received/s, depth \d", rows["ch"]), rows["ch"]
        assert re.search(r"[1-9][\d.,k]* allocs/s", rows["hp"]), rows["hp"]
        assert re.search(r"\d+ keys", rows["st"]) and "freed" in rows["st"], rows["st"]
        assert re.search(r"[1-9][\d.,k]* changes/s", rows["sem"]), rows["sem"]
        assert re.search(r"[\d.,k]+ notifies/s", rows["cond"]), rows["cond"]  # shown
    finally:
        stop.set()
        child.join(60)
        for k in kinds:
            if os.path.exists(shm(f"{base}.{k}")):
                os.unlink(shm(f"{base}.{k}"))
    assert child.exitcode == 0


def _serve_until_killed(name: str, ready: Any) -> None:
    import shmkit as sk

    with sk.Service(name) as svc, svc.worker() as w:
        ready.set()
        for req in w:
            req.reply(bytes(req.data).upper())


def test_top_shows_a_services_workers_and_its_rate(name: str) -> None:
    svc = shmkit.Service(name)
    ready = SPAWN.Event()
    worker = spawn(_serve_until_killed, name, ready)
    calling = True
    client = svc.client(wait_for_worker=30)

    def call() -> None:
        while calling:
            assert client.call(b"x", timeout=30) == b"X"

    caller = threading.Thread(target=call)
    try:
        assert ready.wait(60)
        caller.start()
        snap = json.loads(cli("top", "--once", "--json", "--interval", "0.5", name).stdout)
        (obj,) = snap["objects"]
        assert obj["kind"] == "service" and obj["counters"]["workers"] == 1, obj
        assert obj["rates"]["served"] > 0 and obj["counters"]["served"] > 0, obj
        row = next(line for line in cli("top", "--once", "--interval", "0.5",
                                        name).stdout.splitlines() if name in line)
        assert re.search(r"1 worker( \(1 busy\))?(, \d+ pending)?, [1-9][\d.,k]* served/s",
                         row), row
    finally:
        calling = False
        if caller.is_alive():
            caller.join(60)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(60)
    # The killed worker's entry stays in the table; top counts only the live.
    snap = json.loads(cli("top", "--once", "--json", "--interval", "0.1", name).stdout)
    assert snap["objects"][0]["counters"]["workers"] == 0
    assert svc.statistics()["workers"] == 0
    client.close()
    svc.unlink()
    svc.close()


def _serve_slowly(name: str, ready: Any) -> None:
    import shmkit as sk

    with sk.Service(name) as svc:
        ready.set()
        svc.serve(lambda data: (time.sleep(3), data)[1], timeout=2)


def test_top_shows_a_services_pending_calls(name: str) -> None:
    svc = shmkit.Service(name)
    ready = SPAWN.Event()
    worker = spawn(_serve_slowly, name, ready)
    client = svc.client(wait_for_worker=30)
    assert ready.wait(60)
    callers = [threading.Thread(target=client.call, args=(b"x",), kwargs={"timeout": 60})
               for _ in range(3)]
    for t in callers:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while svc.statistics()["pending"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        snap = json.loads(cli("top", "--once", "--json", "--interval", "0.1", name).stdout)
        c = snap["objects"][0]["counters"]
        assert (c["workers"], c["busy"], c["pending"]) == (1, 1, 2), c
        assert "1 worker (1 busy), 2 pending" in snap["objects"][0]["activity"]
    finally:
        for t in callers:
            t.join(60)
        worker.join(60)
        client.close()
        svc.unlink()
        svc.close()


def _subscribe_and_wait(name: str, ready: Any) -> None:
    from shmkit.topic import Topic

    topic = Topic(name)
    sub = topic.subscribe()
    ready.set()
    time.sleep(120)
    sub.close()


def test_top_shows_a_topics_subscribers_their_lag_and_losses(name: str) -> None:
    from shmkit.topic import Topic

    topic = Topic(name, capacity=4096, overflow="overwrite")
    reader, idle = topic.subscribe(), topic.subscribe()
    ready = SPAWN.Event()
    other = spawn(_subscribe_and_wait, name, ready)
    try:
        assert ready.wait(60)
        for _ in range(100):
            topic.publish(b"x" * 40)
        with pytest.raises(shmkit.MessagesLost):  # overwritten before it read them
            reader.recv(timeout=5)
        lost = reader.missed  # the idle one has not looked yet: its losses are not counted
        c = json.loads(cli("top", "--once", "--json", "--interval", "0.1",
                           name).stdout)["objects"][0]["counters"]
        assert (c["published"], c["subscribers"], c["max_lag"]) == (100, 3, 100), c
        assert c["missed"] == lost > 0, c
        os.kill(other.pid, signal.SIGKILL)
        other.join(60)
        row = next(line for line in cli("top", "--once", "--interval", "0.1",
                                        name).stdout.splitlines() if name in line)
        assert f"2 subscribers, lag up to 100, {lost} missed" in row, row
    finally:
        if other.is_alive():
            other.kill()
        reader.close()
        idle.close()
        topic.unlink()
        topic.close()


def test_top_reads_without_changing_anything(names: Any) -> None:
    ch, st, hp = names(), names(), names()
    with shmkit.Channel(ch, capacity=4096) as c:
        c.send(b"waiting")
    s = shmkit.Store(st)
    s["k"] = b"v"
    s.close()
    shmkit.Heap(hp, size=1 << 16).close()
    before = {n: open(shm(n), "rb").read() for n in (ch, st, hp)}
    snap = json.loads(cli("top", "--once", "--json", "--interval", "0.1", ch, st, hp).stdout)
    by = {o["name"]: o for o in snap["objects"]}
    assert by[ch]["counters"]["depth"] == 1 and by[st]["counters"]["keys"] == 1
    assert by[ch]["activity"].endswith("depth 1")
    assert {n: open(shm(n), "rb").read() for n in (ch, st, hp)} == before


def test_top_writes_plain_snapshots_when_not_on_a_terminal(name: str) -> None:
    shmkit.Mutex(name).close()
    proc = subprocess.Popen([sys.executable, "-m", "shmkit", "top", "--interval", "0.2",
                             name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()

    def snapshots() -> int:  # each starts with its heading line
        return sum(line.startswith("shmkit top") for line in list(lines))

    deadline = time.monotonic() + 30
    while snapshots() < 3 and time.monotonic() < deadline:  # they arrive one by one
        time.sleep(0.05)
    arrived = snapshots()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1]
    reader.join(30)
    assert arrived >= 3, (lines, err)
    assert proc.returncode == 0 and "Traceback" not in err
    assert any(name in line and "free" in line for line in lines), lines
    assert "\x1b[" not in "".join(lines)  # no terminal control codes


# -- true sizes -----------------------------------------------------------------


def test_sizes_are_payload_memory_and_growth_only_where_it_can_grow(names: Any) -> None:
    mutex, seg, store, chan = names(), names(), names(), names()
    shmkit.Mutex(mutex).close()
    shmkit.Segment(seg, size=1000, max_size=1 << 20).close()
    shmkit.Store(store).close()
    shmkit.Channel(chan, capacity=4096).close()
    used = {n: os.stat(shm(n)).st_blocks * 512 for n in (mutex, seg, store, chan)}
    text = {n: cli("info", n).stdout for n in (mutex, seg, store, chan)}
    assert re.search(r"size\s+64 B \(64 bytes\)", text[mutex]), text[mutex]
    assert re.search(r"memory\s+" + re.escape(_human(used[mutex])), text[mutex])
    assert "grows to" not in text[mutex] and "grows to" not in text[chan]
    assert re.search(r"grows to\s+1\.0 MiB", text[seg]), text[seg]
    assert "grows to" in text[store]
    table = cli("ls", mutex, seg).stdout
    row = next(line for line in table.splitlines() if mutex in line).split()
    assert row[2:6] == ["64", "B", *_human(used[mutex]).split()], row
    assert "MEMORY" in table


def _human(n: int) -> str:
    from shmkit.cli import _bytes

    return _bytes(n)


def test_an_error_line_shows_a_line_end_in_a_name_escaped(capsys: Any) -> None:
    # A planted file's name reaches gc's error line as it is: its line end
    # was joined into a space, and the name then read as another one.
    from shmkit.cli import _error

    _error("gc", "could not remove .shmkit.a\nb.tmp: Permission denied")
    err = capsys.readouterr().err
    assert err == "shmkit gc: could not remove .shmkit.a\\x0ab.tmp: Permission denied\n"
    _error("info", "no segment at /tmp/x\n")  # a path ending in a line end
    assert capsys.readouterr().err == "shmkit info: no segment at /tmp/x\\x0a\n"


# -- platform, license ------------------------------------------------------------


def _import_refused(pretend: str) -> str:
    """What ``import shmkit`` prints in a new interpreter after ``pretend``
    (a line that makes it another system or Python): the ShmkitError it
    raises, named, before the C core is loaded."""
    code = textwrap.dedent("""
        import sys
        %s
        try:
            import shmkit
        except ImportError as e:
            from shmkit.errors import ShmkitError
            assert isinstance(e, ShmkitError), type(e).__mro__
            assert "shmkit._core" not in sys.modules, "the C core was loaded"
            print(type(e).__name__, e)
        else:
            raise SystemExit("imported")
    """) % pretend
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_on_another_platform_says_linux_only() -> None:
    out = _import_refused('sys.platform = "darwin"')
    assert out.startswith("UnsupportedPlatformError shmkit runs on Linux only")
    assert "'darwin'" in out and "3.15" in out


def test_importing_with_python_3_10_says_3_11_or_newer() -> None:
    out = _import_refused('sys.version_info = (3, 10, 13, "final", 0)')
    assert out.startswith("UnsupportedPythonError shmkit needs CPython 3.11 or newer")


def test_license_and_platform_metadata() -> None:
    if INSTALLED:
        from importlib.metadata import metadata

        meta = metadata("shmkit")
        assert meta["License-Expression"] == "MIT"
        assert "Operating System :: POSIX :: Linux" in meta.get_all("Classifier")
        return
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "Operating System :: POSIX :: Linux" in project["project"]["classifiers"]
    assert project["project"]["requires-python"] == ">=3.11"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the shmkit authors" in text
