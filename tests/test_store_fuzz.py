"""shmkit.Store against a corrupt or hostile segment: never a crash, a hang or a stray error.

A child program (so that a crash shows as a signal exit code) fills a store with
a few hundred keys of mixed types and keeps a copy of the whole mapping.  Each
trial restores that copy, damages it (random bytes, random or plausible u64s at
random offsets, chosen store-header fields, index words, record and block
headers, the batch journal), then runs every operation: get/in/nbytes on every
key, put, add, delete, pop, a batch, update, len, iteration, statistics, verify, vacuum.
Every failure must be a ShmkitError (CorruptError mostly) or the KeyError of a
key that is no longer found; anything else, a signal or a hang fails the test.

    python tests/test_store_fuzz.py NAME SEED TRIALS     # reproduce a failure
"""

from __future__ import annotations

import faulthandler
import os
import random
import struct
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("SHMKIT_TEST_PATH") or os.path.join(os.path.dirname(HERE), "src")

# store-header fields (payload offsets; see the THeader comment in table.c)
FIELDS = {"epoch": 0, "index": 8, "seed": 16, "heap_start": 24, "heap_end": 32,
          "lock": 64, "state": 68, "count": 72, "tombstones": 80, "used": 88,
          "pending": 96, "top": 104, "journal": 112, "journal_n": 120,
          "bin_hint0": 176, "bin_hint1": 184}
BINS = 192  # bins[0] at 192, 104 words


def _keys_and_values(rng: random.Random) -> dict:
    import numpy as np
    data: dict = {}
    for i in range(300):
        key = rng.choice([i, -i * 7919, 2**70 + i, f"k{i}", f"ключ{i}" * (i % 5 + 1),
                          bytes([i % 256]) * (1 + i % 40)])
        value = rng.choice([
            b"v" * rng.randrange(0, 300), f"s{i}" * rng.randrange(0, 20), i, -2**90 - i,
            i / 7, True, False, None, np.arange(i % 17, dtype=np.int32),
            np.zeros((2, i % 5), dtype="f8"),
        ])
        data[key] = value
    return data


def _plausible(rng: random.Random, heap_end: int) -> int:
    """A value the store might really hold: an offset, a size, a small count."""
    r = rng.random()
    if r < 0.35:
        return rng.randrange(0, max(heap_end, 16) + 4096) & ~15
    if r < 0.5:
        return rng.choice([0, 1, 2, 3, 15, 16, 31, 32, 33, 48, 64, 4096, 4128])
    if r < 0.6:
        return rng.choice([2**63, 2**64 - 1, 2**64 - 16, 2**40, 2**32 - 1, 2**63 - 1])
    if r < 0.75:
        return rng.randrange(0, 600)
    return rng.getrandbits(64)


def _mutate(rng: random.Random, view: memoryview, hsize: int, heap_end: int) -> str:
    """Damage the mapping once; returns what was done (for the failure report)."""
    pay = view[hsize:hsize + heap_end]
    n = len(pay)
    ix = struct.unpack_from("<Q", pay, 8)[0]
    kind = rng.random()
    if kind < 0.2:
        off = rng.randrange(n)
        bit = 1 << rng.randrange(8)
        pay[off] ^= bit
        return f"flip bit {bit} at {off}"
    if kind < 0.35:
        off = rng.randrange(n - 8) & ~7
        v = _plausible(rng, heap_end)
        struct.pack_into("<Q", pay, off, v)
        return f"u64 {v} at {off}"
    if kind < 0.55:
        name = rng.choice(list(FIELDS))
        off = FIELDS[name]
        v = _plausible(rng, heap_end)
        if name in ("lock", "state"):
            struct.pack_into("<I", pay, off, v & 0xFFFFFFFF)
        else:
            struct.pack_into("<Q", pay, off, v)
        if name == "state" and rng.random() < 0.7:  # a "committing" journal
            struct.pack_into("<I", pay, off, 1)
            struct.pack_into("<Q", pay, FIELDS["journal"], _plausible(rng, heap_end))
            struct.pack_into("<Q", pay, FIELDS["journal_n"], rng.randrange(0, 40))
        return f"field {name} = {v}"
    if kind < 0.62:
        b = rng.randrange(104)
        v = _plausible(rng, heap_end)
        struct.pack_into("<Q", pay, BINS + 8 * b, v)
        return f"bin {b} = {v}"
    if kind < 0.8 and 4096 <= ix < n - 40:
        nslots = struct.unpack_from("<Q", pay, ix + 16)[0]
        if rng.random() < 0.15 or not 8 <= nslots <= (n - ix) // 8:
            v = _plausible(rng, heap_end)
            struct.pack_into("<Q", pay, ix + 16, v)
            return f"nslots = {v}"
        s = rng.randrange(nslots)
        v = rng.choice([0, 1, 2, _plausible(rng, heap_end) >> 4,
                        struct.unpack_from("<Q", pay, ix + 32 + 8 * rng.randrange(nslots))[0],
                        _plausible(rng, heap_end)])
        struct.pack_into("<Q", pay, ix + 32 + 8 * s, v)
        return f"index word {s} = {v}"
    # a block or record header field, found by walking the chain
    off, blocks = 4096, []
    while off < n - 16 and len(blocks) < 5000:
        size = struct.unpack_from("<Q", pay, off)[0] & ~15
        if size < 32:
            break
        blocks.append(off)
        off += size
    if not blocks:
        return "nothing"
    blk = rng.choice(blocks)
    field = rng.choice([0, 0, 8, 16, 24, 24, 28, 32])
    if field == 28:
        pay[blk + 28 + rng.randrange(2)] = rng.randrange(256)
        return f"record type byte at {blk}"
    v = _plausible(rng, heap_end)
    if field == 0 and rng.random() < 0.5:
        v = (struct.unpack_from("<Q", pay, blk)[0] & ~15) | rng.randrange(16)
    if field == 24:
        struct.pack_into("<I", pay, blk + 24, v & 0xFFFFFFFF)
    else:
        struct.pack_into("<Q", pay, blk + field, v)
    return f"block {blk} +{field} = {v}"


def _exercise(st, keys: list, rng: random.Random) -> list:
    """Run every operation; returns the unexpected exceptions."""
    from shmkit import ShmkitError
    bad = []

    def op(fn, *args):
        try:
            return fn(*args)
        except KeyError:
            return None  # a key that damage made unreachable (KeyExistsError too)
        except ShmkitError:
            return None
        except Exception as e:  # noqa: BLE001
            bad.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}")
            return None

    def each(fn, sample):
        for k in sample:
            op(fn, k)

    sample = rng.sample(keys, 40)
    each(st.get, keys)
    each(st.__contains__, sample)
    each(st.nbytes, sample[:10])
    op(len, st)
    op(lambda: list(st.items()))
    op(lambda: [k for k in st])
    op(lambda: list(st.values()))
    for k in sample[:8]:
        op(st.__setitem__, k, b"new" * rng.randrange(50))
    op(st.__setitem__, f"fresh{rng.random()}", "x" * rng.randrange(3000))
    op(st.add, rng.choice(keys), 1)
    each(st.__delitem__, sample[8:14])
    each(lambda k: st.pop(k, None), sample[14:18])

    def batch():
        with st.batch():
            for k in sample[18:30]:
                st[k] = k
            for k in sample[30:34]:
                st.pop(k, None)
            len(st)
            st.get(sample[18])
    op(batch)

    def batch_of_puts():  # probed only by the commit
        with st.batch():
            for k in sample[34:40]:
                st[k] = k * 2
    op(batch_of_puts)
    op(lambda: st.update({k: k * 3 for k in sample[:6]}, fresh=b"kw"))  # one batch
    op(st.update, [(k, None) for k in sample[6:9]])
    op(st.statistics)
    op(st.info)
    op(st.verify)
    if rng.random() < 0.3:
        op(st.vacuum)
    if rng.random() < 0.05:
        op(st.clear)
    op(st.get, keys[0])
    op(len, st)
    return bad


def fuzz(name: str, seed: int, trials: int, trial_seconds: float = 20.0) -> int:
    """The child: returns the number of trials with unexpected exceptions."""
    sys.path.insert(0, SRC)
    import shmkit
    rng = random.Random(seed)
    st = shmkit.Store(name, size=64 << 10, timeout=1.0)
    data = _keys_and_values(rng)
    st.update(data)
    for k in list(data)[::5]:
        del st[k]  # tombstones and pending space
    st.verify()
    keys = list(data)
    seg = st._seg
    hsize = seg._hsize
    m = seg._mapping
    view = memoryview(m)
    total = hsize + seg.size
    image = bytes(view[:total])
    failures = 0
    for trial in range(trials):
        trng = random.Random(seed * 1_000_003 + trial)
        view[:total] = image
        heap_end = struct.unpack_from("<Q", view, hsize + 32)[0]
        what = [_mutate(trng, view, hsize, heap_end) for _ in range(trng.choice([1, 1, 2, 4]))]
        faulthandler.dump_traceback_later(trial_seconds, exit=True)
        print(f"trial {trial}: {what}", flush=True, file=sys.stderr) if os.environ.get(
            "FUZZ_TRACE") else None
        bad = _exercise(st, keys, trng)
        faulthandler.cancel_dump_traceback_later()
        if bad:
            failures += 1
            print(f"trial {trial} seed {seed}: {what}: {bad[:3]}", flush=True)
    view[:total] = image
    st.verify()
    view.release()
    st.close()
    print(f"done {trials} trials, {failures} with unexpected errors", flush=True)
    return failures


def _run(name: str, seed: int, trials: int, timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, name, str(seed), str(trials)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzz child hung (seed {seed}): {(e.stdout or '')[-3000:]}"
                    f"{(e.stderr or '')[-3000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode >= 0, f"fuzz child died by signal {-proc.returncode}:\n{out[-5000:]}"
    assert proc.returncode == 0, out[-5000:]
    assert f"done {trials} trials, 0 with" in proc.stdout, out[-5000:]
    print(f"{trials} trials in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("hint", [2**64 - 1, 0, 0x5555555555555555])
def test_a_wrong_free_list_hint_costs_space_never_data(name, hint):
    """The allocator's hint of non-empty free lists (bin_hint) is written by
    every writer, so any process can set it wrong: every bit on, every bit
    off, or bits at random.  Allocation must still hand out only free
    blocks (every value reads back, verify() passes), and a recycle must
    bring hidden free space back."""
    sys.path.insert(0, SRC)
    import shmkit
    rng = random.Random(hint & 0xFFFF)
    with shmkit.Store(name, size=256 << 10) as st:
        want = {}
        for i in range(3000):  # mixed sizes, updates and deletes fill the free lists
            k = f"k{rng.randrange(600)}"
            if rng.random() < 0.2 and k in want:
                del st[k], want[k]
            else:
                want[k] = b"v" * rng.randrange(0, 700)
                st[k] = want[k]
        seg = st._seg
        view = memoryview(seg._mapping)
        for round_ in range(6):
            struct.pack_into("<QQ", view, seg._hsize + FIELDS["bin_hint0"], hint, hint)
            for i in range(2000):
                k = f"k{rng.randrange(600)}"
                want[k] = bytes([round_]) * rng.randrange(0, 700)
                st[k] = want[k]
            assert dict(st.items()) == want
            st.verify()
        view.release()
        assert st.statistics()["recycles"] > 0


def test_a_store_at_its_max_size_finds_free_lists_its_hint_hides(name):
    """A zero hint over full free lists (a store written by an older shmkit,
    or a stray write) in a store that cannot grow: the allocation that finds
    nothing rebuilds the hint from the list heads before it calls the store
    full."""
    sys.path.insert(0, SRC)
    import shmkit
    with shmkit.Store(name, size=256 << 10, max_size=256 << 10) as st:
        n = 0
        with pytest.raises(shmkit.ShmkitError):
            while True:
                st[f"k{n}"] = b"x" * 1000
                n += 1
        for j in range(0, n, 2):
            del st[f"k{j}"]
        st["trigger"] = b"y" * 1000  # recycles: the freed blocks go to the lists
        assert st.statistics()["free_blocks"] >= n // 2 - 2
        seg = st._seg
        view = memoryview(seg._mapping)
        struct.pack_into("<QQ", view, seg._hsize + FIELDS["bin_hint0"], 0, 0)
        view.release()
        for j in range(0, n - 2, 2):
            st[f"n{j}"] = b"z" * 1000
        st.verify()


@pytest.mark.parametrize("seed", [1, 2])
def test_damaged_store_never_crashes_hangs_or_raises_a_stray_error(name, seed):
    _run(name, seed, 1000, timeout=120)


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(100, 108))
def test_damaged_store_fuzz_long(name, seed):
    _run(name, seed, 10000, timeout=1800)


if __name__ == "__main__":
    sys.exit(1 if fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])) else 0)
