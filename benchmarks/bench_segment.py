"""Opening shared memory by name from another process.

* a 1 GiB segment, reading one byte: shmkit.Segment against
  multiprocessing.shared_memory and a bare os.open + mmap (the reference);
* every shmkit kind of 64 MiB (Segment, Array, Channel, Store, Heap), each
  opened by name, touched once (a byte, an element, the depth, the length,
  the capacity) and closed, against the same two anchors on a 64 MiB file;
  the Segment twice, with a growable kind's default 4 GiB reservation and
  made with max_size=size, to show what the reservation costs; and every
  kind twice, made with the "attached" lifetime (its every close tests
  whether it was the last) and with "persistent", a named object's default;
* a new Python program that imports what it needs, opens one object by name,
  touches it and exits: what a short-lived process pays to attach.

Except in the last, a long-lived spawned worker does the opens, so process
start-up is not timed;
each open is still the first in that worker for that mapping (nothing cached).
The worker times its own operations and reports the sum.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

from benchmarks.harness import workload

SIZE = 1 << 30
BENCH = "segment: open an existing 1 GiB segment in another process, read 1 byte, close"


def _worker(conn, system: str, name: str) -> None:
    import mmap

    import shmkit

    while True:
        n = conn.recv()
        if n is None:
            return
        t0 = time.perf_counter()
        if system == "shmkit":
            for _ in range(n):
                seg = shmkit.Segment.open(name)
                seg.buf[0]
                seg.close()
        elif system == "mp.shared_memory":
            from multiprocessing import shared_memory

            # Each attach registers the name with the resource tracker, which
            # this worker shares with its parent: the same entry as the
            # creator's, which the creator's unlink() removes.
            for _ in range(n):
                shm = shared_memory.SharedMemory(name)
                shm.buf[0]
                shm.close()
        elif system in _KIND_OPEN:
            open_and_touch = _KIND_OPEN[system]
            for _ in range(n):
                open_and_touch(name)
        else:
            path, size = name, os.path.getsize(name)
            for _ in range(n):
                fd = os.open(path, os.O_RDWR)
                m = mmap.mmap(fd, size)
                m[0]
                m.close()
                os.close(fd)
        conn.send(time.perf_counter() - t0)


def _touch_segment(name: str) -> None:
    import shmkit
    with shmkit.Segment.open(name) as seg:
        seg.buf[0]


def _touch_array(name: str) -> None:
    import shmkit
    with shmkit.Array.open(name) as a:
        a.array[0]


def _touch_channel(name: str) -> None:
    import shmkit
    with shmkit.Channel.open(name) as ch:
        ch.depth


def _touch_store(name: str) -> None:
    import shmkit
    with shmkit.Store.open(name) as st:
        len(st)


def _touch_heap(name: str) -> None:
    import shmkit
    with shmkit.Heap.open(name) as h:
        h.capacity


# "kind:<Kind>" systems: open by name, touch once, close.  Their objects have
# the "attached" lifetime, whose last closer removes them, and whose every
# close tests for that; "kind:<Kind> persistent" ones have the default
# lifetime of a named object, whose close makes no such test.
_TOUCH = {"Segment": _touch_segment, "Segment max_size": _touch_segment,
          "Array": _touch_array, "Channel": _touch_channel, "Store": _touch_store,
          "Heap": _touch_heap}
_PERSISTENT = " persistent"
_KIND_OPEN = {f"kind:{kind}{life}": touch for kind, touch in _TOUCH.items()
              for life in ("", _PERSISTENT)}


class _Worker:
    def __init__(self, system: str, name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, system, name), daemon=True)
        self.proc.start()

    def run(self, n: int) -> float:
        self.conn.send(n)
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already ended by multiprocessing's own exit handling
        self.proc.join(10)


_made: dict[str, tuple[object, _Worker]] = {}
KIND_SIZE = 64 << 20


def _make_kind(system: str) -> tuple[object, str]:
    import numpy as np

    import shmkit
    name = f"bench-attach-{system[5:].lower().replace(' ', '-')}-{os.getpid()}"
    kind = system[5:]
    life = "attached"
    if kind.endswith(_PERSISTENT):
        kind, life = kind[:-len(_PERSISTENT)], "persistent"
    if kind == "Segment":
        obj: object = shmkit.Segment(name, size=KIND_SIZE, lifetime=life)
    elif kind == "Segment max_size":
        obj = shmkit.Segment(name, size=KIND_SIZE, max_size=KIND_SIZE, lifetime=life)
    elif kind == "Array":
        obj = shmkit.Array(name, np.uint8, (KIND_SIZE,), lifetime=life)
    elif kind == "Channel":
        obj = shmkit.Channel(name, capacity=KIND_SIZE, lifetime=life)
    elif kind == "Store":
        obj = shmkit.Store(name, size=KIND_SIZE, lifetime=life)
    else:
        obj = shmkit.Heap(name, size=KIND_SIZE, lifetime=life)
    return obj, name


def _make_anchor(base: str, size: int) -> tuple[object, str]:
    """A multiprocessing.shared_memory block or a bare /dev/shm file of ``size``."""
    if base == "mp.shared_memory":
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(create=True, size=size)
        return shm, shm.name
    # (each caller its own file: the attach groups each make one, and remove it)
    name = f"/dev/shm/bench-bare-{size >> 20}m-{os.getpid()}-{os.urandom(3).hex()}"
    fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, size)
    os.close(fd)
    return name, name


def _setup(system: str):
    """The worker of ``system`` (made once): "shmkit" (1 GiB segment), "kind:<Kind>"
    (64 MiB), or an anchor, "bare" or "mp.shared_memory", with " 64 MiB" for the small one."""
    if system in _made:
        return _made[system][1]
    base = system
    if system in _KIND_OPEN:
        obj, name = _make_kind(system)
    elif system == "shmkit":
        import shmkit

        obj = shmkit.Segment(f"bench-open-{os.getpid()}", size=SIZE, lifetime="attached")
        name = obj.name
    else:
        base, _, small = system.partition(" ")
        obj, name = _make_anchor(base, KIND_SIZE if small else SIZE)
    w = _Worker(base, name)
    _made[system] = (obj, w)
    return w


def _cleanup() -> None:
    for system, (obj, w) in list(_made.items()):
        w.stop()
        if system == "shmkit" or system in _KIND_OPEN:
            if system.endswith(_PERSISTENT):
                obj.unlink()
            obj.close()
        elif system.startswith("mp.shared_memory"):
            obj.close()
            obj.unlink()
        else:
            os.unlink(obj)
    _made.clear()


import atexit  # noqa: E402

atexit.register(_cleanup)


@workload(BENCH, unit="µs/op", system="shmkit.Segment.open")
def shmkit_open(n: int) -> float:
    return _setup("shmkit").run(n)


@workload(BENCH, system="multiprocessing.shared_memory")
def mp_shared_memory_open(n: int) -> float:
    return _setup("mp.shared_memory").run(n)


@workload(BENCH, system="bare os.open + mmap", reference=True)
def bare_open_mmap(n: int) -> float:
    return _setup("bare").run(n)


def _queue_child(q, done) -> None:
    while True:
        arr = q.get()
        if arr is None:
            return
        done.put(int(arr[0]))
        del arr


@workload("segment: hand a 1 GiB array to another process", unit="ms/op",
          system="multiprocessing.Queue (pickled copy)", n=1)
def mp_queue_array(n: int) -> float:
    import numpy as np

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_queue_child, args=(q, done), daemon=True)
    p.start()
    arr = np.ones(SIZE, dtype=np.uint8)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            q.put(arr)
            done.get()
        return time.perf_counter() - t0
    finally:
        q.put(None)
        p.join(30)


@workload("segment: hand a 1 GiB array to another process",
          system="shmkit.Segment (open by name)", reference=True)
def shmkit_segment_array(n: int) -> float:
    return _setup("shmkit").run(n)


KINDS = "attach: open each kind of 64 MiB by name in another process, touch it, close"


@workload(KINDS, unit="µs/op", system="bare os.open + mmap", reference=True)
def kinds_bare(n: int) -> float:
    return _setup("bare 64 MiB").run(n)


@workload(KINDS, system="multiprocessing.shared_memory")
def kinds_mp(n: int) -> float:
    return _setup("mp.shared_memory 64 MiB").run(n)


def _kind_workload(kind: str, life: str) -> None:
    system = f"shmkit.{kind}.open"
    if kind == "Segment max_size":  # growable kinds reserve 4 GiB unless told otherwise
        system = "shmkit.Segment.open (made with max_size=size)"
    if life:
        system += ", lifetime persistent"
    @workload(KINDS, system=system)
    def run(n: int) -> float:
        return _setup(f"kind:{kind}{life}").run(n)
    run.__name__ = f"kinds_{kind.lower().replace(' ', '_')}{life.replace(' ', '_')}"


for _life in ("", _PERSISTENT):
    for _kind in _TOUCH:
        _kind_workload(_kind, _life)


PROGRAM = ("attach: start a Python program that opens one object of 64 MiB by name, "
           "touches it and exits")

# Each program, after `import sys`: open sys.argv[1], touch it once, close it.
_PROGRAMS = {
    "bare": "import mmap, os\n"
            "fd = os.open(sys.argv[1], os.O_RDWR); m = mmap.mmap(fd, 0); m[0]; m.close(); "
            "os.close(fd)",
    # Python 3.11 registers every attach with a resource tracker, which it
    # starts, and which unlinks the segment when the program exits; a
    # program that only attaches has to unregister it.
    "mp.shared_memory": "from multiprocessing import resource_tracker, shared_memory\n"
                        "shm = shared_memory.SharedMemory(sys.argv[1]); shm.buf[0]; "
                        "resource_tracker.unregister(shm._name, 'shared_memory'); shm.close()",
    "kind:Channel": "import shmkit\nwith shmkit.Channel.open(sys.argv[1]) as ch: ch.depth",
    "kind:Store": "import shmkit\nwith shmkit.Store.open(sys.argv[1]) as st: len(st)",
    "kind:Array": "import shmkit\nwith shmkit.Array.open(sys.argv[1]) as a: a.array[0]",
}
_program_objects: dict[str, tuple[object, str]] = {}


def _run_programs(system: str, n: int) -> float:
    """n runs of the program of ``system``, each a new interpreter as a user's
    would be: with this tree's shmkit, and its compiled modules cached (the
    calibration's runs write them) as an installed package has them."""
    import subprocess
    import sys

    import shmkit
    if system not in _program_objects:
        if system.startswith("kind:"):
            _program_objects[system] = _make_kind(system)
        else:
            _program_objects[system] = _make_anchor(system, KIND_SIZE)
    name = _program_objects[system][1]
    src = os.path.dirname(os.path.dirname(shmkit.__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = src
    cmd = [sys.executable, "-c", "import sys\n" + _PROGRAMS[system], name]
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def _cleanup_programs() -> None:
    for system, (obj, name) in _program_objects.items():
        if system.startswith("kind:"):
            obj.close()
        elif system == "mp.shared_memory":
            obj.close()
            obj.unlink()
        else:
            os.unlink(name)
    _program_objects.clear()


atexit.register(_cleanup_programs)


def _program_workload(system: str, label: str) -> None:
    @workload(PROGRAM, unit="ms/op", system=label, reference=system == "bare")
    def run(n: int) -> float:
        return _run_programs(system, n)
    run.__name__ = "program_" + system.replace("kind:", "").replace(".", "_").lower()


for _system, _label in (("bare", "bare os.open + mmap"),
                        ("mp.shared_memory", "multiprocessing.shared_memory"),
                        ("kind:Channel", "shmkit.Channel.open"),
                        ("kind:Store", "shmkit.Store.open"),
                        ("kind:Array", "shmkit.Array.open (imports numpy)")):
    _program_workload(_system, _label)


SAME = "attach: open one channel 600 times in one process, every handle kept"
_SAME_HANDLES = 600


def _same_object(n: int, open_one: Any, close_one: Any) -> float:
    """n opens, in runs of up to 600 handles held at once (only the opens timed)."""
    total, done = 0.0, 0
    while done < n:
        k = min(_SAME_HANDLES, n - done)
        t0 = time.perf_counter()
        handles = [open_one() for _ in range(k)]
        total += time.perf_counter() - t0
        for h in handles:
            close_one(h)
        done += k
    return total


@workload(SAME, unit="µs/op", system="bare os.open + mmap", reference=True)
def same_bare(n: int) -> float:
    import mmap

    import shmkit
    with shmkit.Channel(None, capacity=4096, max_attach=1024) as ch:
        path = ch.path

        def open_one() -> tuple[int, mmap.mmap]:
            fd = os.open(path, os.O_RDWR)
            return fd, mmap.mmap(fd, 0)

        def close_one(h: tuple[int, mmap.mmap]) -> None:
            h[1].close()
            os.close(h[0])
        return _same_object(n, open_one, close_one)


@workload(SAME, system="shmkit.Channel.open (each claims its own attach slot)")
def same_shmkit(n: int) -> float:
    import secrets

    import shmkit
    name = f"bench-same-{secrets.token_hex(4)}"
    with shmkit.Channel(name, capacity=4096, max_attach=1024):
        try:
            return _same_object(n, lambda: shmkit.Channel.open(name), lambda h: h.close())
        finally:
            shmkit.unlink(name)


# -- scaling: opening 1 to 10,000 objects in one process -------------------------------------

def _open_many(conn, names: list[str], paths: list[str]) -> None:
    """In a fresh process: open every name (shmkit) and close them all, then the
    same with a bare open+mmap of every file; for a few names, several times
    (the median per object is reported)."""
    import mmap
    import resource
    import statistics

    import shmkit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    shmkit.Channel.open(names[0]).close()  # first-use costs (imports, caches) untimed
    with open(paths[0], "rb") as f:
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ).close()
    times: list[tuple[float, float, float, float]] = []
    for _ in range(max(1, 2000 // len(names))):
        t0 = time.perf_counter()
        chans = [shmkit.Channel.open(n) for n in names]
        t1 = time.perf_counter()
        for ch in chans:
            ch.depth
        t2 = time.perf_counter()
        for ch in chans:
            ch.close()
        t3 = time.perf_counter()
        maps = []
        for p in paths:  # the mapping keeps a descriptor of its own
            fd = os.open(p, os.O_RDWR)
            maps.append(mmap.mmap(fd, os.fstat(fd).st_size))
            os.close(fd)
        t4 = time.perf_counter()
        for m in maps:
            m.close()
        t5 = time.perf_counter()
        times.append((t1 - t0, t3 - t2, t4 - t3, t5 - t4))
    conn.send(tuple(statistics.median(t[i] for t in times) for i in range(4)))


def scaling(counts: list[int], out: str = "docs/attach_scaling.png") -> list:
    """Open ``count`` channels of 64 KiB by name in a fresh process, then close
    them, at each count; bare open+mmap of the same files beside; plot the
    cost per object."""
    import shmkit

    ctx = mp.get_context("spawn")
    rows = []
    for count in counts:
        tag = f"bench-scale-{os.getpid()}"
        made = [shmkit.Channel(f"{tag}-{i}", capacity=64 << 10) for i in range(count)]
        try:
            names = [c.name for c in made]
            paths = [c.path for c in made]
            for c in made:
                c.close()
            here, there = ctx.Pipe()
            p = ctx.Process(target=_open_many, args=(there, names, paths))
            p.start()
            while not here.poll(1.0):
                if not p.is_alive():
                    raise RuntimeError(f"the opening process failed at {count} objects")
            opened, closed, bare_open, bare_close = here.recv()
            p.join(60)
        finally:
            for n in names:
                shmkit.segment.unlink(n)
        row = (count, opened / count * 1e6, closed / count * 1e6,
               bare_open / count * 1e6, bare_close / count * 1e6)
        rows.append(row)
        print(f"{count:>7,} objects: Channel.open {row[1]:6.1f} µs, close {row[2]:5.1f} µs; "
              f"bare open+mmap {row[3]:5.1f} µs, close {row[4]:5.1f} µs", flush=True)
    from benchmarks.plot import save_plot
    save_plot(rows, ((1, "shmkit.Channel.open"), (2, "shmkit close"),
                     (3, "bare os.open + mmap"), (4, "bare close")),
              xlabel="objects opened in one process (channels of 64 KiB)",
              ylabel="µs per object",
              title="Opening by name: cost per object as a process holds more", out=out)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Opening by name as a process holds more objects (plots "
                    "docs/attach_scaling.png); the side-by-side benchmarks run "
                    "with `python -m benchmarks --filter segment`.")
    parser.add_argument("--scaling", type=int, nargs="*", metavar="COUNT",
                        help="numbers of objects to open (default: 1 10 100 1000 10000)")
    scaling(parser.parse_args().scaling or [1, 10, 100, 1000, 10000])
