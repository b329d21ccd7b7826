"""What opening a growable object by name costs when the range its last
handle freed is taken, against the tree on PYTHONPATH.

    PYTHONPATH=<tree>/src python benchmarks/placement_cost.py

A Store is opened and closed by name in one process, in three layouts:

- ``blocked``: one page planted, once, where the core would shift the
  range the kernel chose for the first open, as a thread's stack or ASan's
  mappings may sit there; an open that misses once is placed from then on,
  or misses again every time (best of 7 x 2,000);
- ``free``: nothing in the way (best of 7 x 1,000 opens);
- ``miss``: a page planted inside the range each handle freed before the
  next open, so that every open misses its place (best of 7 x 1,000).

The opens that were placed are counted in each.

Microseconds per open and close.  See docs/benchmarks.md, "A freed range
that is taken, a topic's count after its tail".
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

import shmkit

GIB = 1 << 30
MAP_FIXED_NOREPLACE = 0x100000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def plant(at: int) -> bool:
    """An inaccessible page at ``at``, if nothing is there."""
    return _libc.mmap(at, 4096, 0, 0x02 | 0x20 | MAP_FIXED_NOREPLACE, -1, 0) == at


def touched(length: int) -> int:
    return -(-length // (2 << 20)) * (2 << 20)


def open_close(name: str, n: int, miss: bool) -> tuple[float, int]:
    """Seconds for n opens and closes, and how many were placed."""
    total, placed, planted = 0.0, 0, []
    for _ in range(n):
        t0 = time.perf_counter()
        h = shmkit.Store.open(name)
        a, length = h._seg._mapping.address, h._seg._mapping.length  # (gone once closed)
        h.close()
        total += time.perf_counter() - t0
        placed += (a + touched(length)) % GIB == 0
        if miss and plant(a + 65536):
            planted.append(a + 65536)
    for at in planted:
        _libc.munmap(at, 4096)
    return total, placed


def main() -> None:
    name = f"placement-cost-{os.getpid()}"
    st = shmkit.Store(name, size=1 << 20)
    try:
        # first, while the process has freed no range but this open's,
        # which the kernel placed: the page goes where the shift below it
        # would put the next one
        with shmkit.Store.open(name) as h:
            a, length = h._seg._mapping.address, h._seg._mapping.length
        below = touched(length) % GIB
        blocker = (a + below) // GIB * GIB - below
        if not plant(blocker):
            raise SystemExit("could not plant the page where the shift would go")
        for layout, n in (("blocked", 2000), ("free", 1000), ("miss", 1000)):
            runs = [open_close(name, n, layout == "miss") for _ in range(7)]
            if layout == "blocked":
                _libc.munmap(blocker, 4096)
            best = min(t for t, _ in runs) / n * 1e6
            placed = sum(p for _, p in runs)
            print(f"{layout:8s} {best:6.2f} us per open+close; placed {placed} of {7 * n}")
    finally:
        st.unlink()
        st.close()


if __name__ == "__main__":
    main()
