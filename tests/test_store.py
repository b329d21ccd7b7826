"""shmkit.Store: a growable key-value map in shared memory, across real processes."""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np
import pytest

import shmkit
from shmkit import (
    BusyError,
    ClosedError,
    CorruptError,
    FormatVersionError,
    KeyExistsError,
    MismatchError,
    OutOfSpaceError,
    ReadOnlyError,
    Segment,
    ShmkitError,
    Store,
    UnsupportedTypeError,
    ValueTooLargeError,
    WrongKindError,
)

from conftest import (SPAWN, child_told_it_forked, fork_during_update, interrupt_at_bytecode,
                      run_python, spawn)


def exact(a, b) -> bool:
    """Equal and of the same type (arrays: same dtype, shape and bytes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# -- types and the mapping protocol ---------------------------------------------

VALUES = [
    b"", b"\x00" * 3, b"x" * 5000, "", "text", "ünïcødé ✓" * 50, 0, 1, -1, 2**63 - 1,
    -2**63, 2**63, -2**63 - 1, 2**200, -(3**150), 0.0, -0.0, 1.5, float("inf"),
    float("nan"), True, False, None,
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(7, dtype=np.int16),                     # 0-d
    np.zeros((0, 5), dtype=np.uint8),                # empty
    np.arange(10)[::3],                              # not contiguous
    np.asfortranarray(np.arange(6).reshape(2, 3)),   # Fortran order
    np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", ">f8")]),
    np.array(["2020-01-01", "2021-06-30"], dtype="M8[D]"),
    np.array(["ab", "cde"], dtype="U3"),
    np.array([True, False]),
]


def test_every_value_type_round_trips_exactly(name):
    with Store(name) as st:
        for i, v in enumerate(VALUES):
            st[i] = v
        for i, v in enumerate(VALUES):
            got = st[i]
            if isinstance(v, np.ndarray):
                assert exact(v, got), (v, got)
                assert got.flags.writeable
            else:
                assert exact(v, got), (v, got)
        st.verify()


def test_values_are_seen_exactly_by_another_process(name, tmp_path):
    with Store(name) as st:
        for i, v in enumerate(VALUES):
            st[i] = v
    out = tmp_path / "values.pickle"
    run_python(f"""
        import pickle, shmkit
        st = shmkit.Store.open({name!r})
        with open({str(out)!r}, "wb") as f:
            pickle.dump([st[i] for i in range({len(VALUES)})], f)
    """)
    for v, got in zip(VALUES, pickle.loads(out.read_bytes())):
        assert exact(v, got)


def test_key_type_is_part_of_the_key(name):
    with Store(name) as st:
        st[1] = "int"
        st["1"] = "str"
        st[b"1"] = "bytes"
        st[2**80] = "big"
        st[-2**80] = "negbig"
        assert (st[1], st["1"], st[b"1"], st[2**80], st[-2**80]) == (
            "int", "str", "bytes", "big", "negbig")
        assert len(st) == 5
        keys = list(st)
        assert sorted(map(repr, keys)) == sorted(map(repr, [1, "1", b"1", 2**80, -2**80]))
        assert {type(k) for k in keys} == {int, str, bytes}


def test_dict_methods(name):
    with Store(name) as st:
        assert len(st) == 0 and st.get("a") is None and st.get("a", 5) == 5
        st["a"] = 1
        st.add("b", 2)
        with pytest.raises(KeyExistsError) as ei:
            st.add("a", 99)
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, ShmkitError)
        assert "already" in str(ei.value)
        assert st["a"] == 1
        assert "a" in st and "zz" not in st and 3 not in st
        assert st.pop("a") == 1 and "a" not in st
        assert st.pop("a", "gone") == "gone"
        with pytest.raises(KeyError):
            st.pop("a")
        with pytest.raises(KeyError):
            st["a"]
        with pytest.raises(KeyError):
            del st["a"]
        assert st.setdefault("c", 3) == 3 and st.setdefault("c", 4) == 3
        st.update({"d": 4, "e": 5}, f=6)
        assert dict(st.items()) == {"b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
        assert sorted(st.values()) == [2, 3, 4, 5, 6]
        assert set(st.keys()) == {"b", "c", "d", "e", "f"}
        assert ("b", 2) in st.items() and 4 in st.values()
        assert st == {"b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
        assert st.nbytes("b") == 8
        st["s"] = "héllo"
        assert st.nbytes("s") == len("héllo".encode())
        with pytest.raises(KeyError):
            st.nbytes("missing")
        st.clear()
        assert len(st) == 0 and list(st) == []
        st["x"] = 1
        assert dict(st.items()) == {"x": 1}
        st.verify()


def test_matches_a_dict_under_random_operations(name):
    rng = random.Random(7)
    model: dict = {}
    with Store(name, size=16 << 10) as st:
        for step in range(20000):
            k = rng.choice([rng.randrange(300), f"k{rng.randrange(300)}",
                            bytes([rng.randrange(256)]) * rng.randrange(1, 40)])
            op = rng.random()
            if op < 0.55:
                v = rng.choice([b"v" * rng.randrange(0, 400), rng.random(), step,
                                f"s{step}" * rng.randrange(0, 30), None, True])
                st[k] = v
                model[k] = v
            elif op < 0.8:
                assert (k in st) == (k in model)
                if k in model:
                    del st[k]
                    del model[k]
            elif op < 0.85:
                with st.batch():
                    for j in range(rng.randrange(1, 20)):
                        kk = f"b{rng.randrange(100)}"
                        if rng.random() < 0.3 and kk in st:
                            del st[kk]
                            model.pop(kk)
                        else:
                            st[kk] = j
                            model[kk] = j
                    assert len(st) == len(model)
            else:
                assert exact(st.get(k, "nope"), model.get(k, "nope"))
            if step % 2000 == 0:
                st.verify()
                if step % 6000 == 0:
                    st.vacuum()
        assert len(st) == len(model)
        assert {repr(k): v for k, v in st.items()} == {repr(k): v for k, v in model.items()}
        st.verify()
        st.vacuum()
        st.verify()
        assert {repr(k): v for k, v in st.items()} == {repr(k): v for k, v in model.items()}


# -- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("key", [1.5, None, True, (1,), [1], bytearray(b"x"), object()])
def test_unsupported_key_types(name, key):
    with Store(name) as st:
        st["keep"] = 1
        with pytest.raises(UnsupportedTypeError) as ei:
            st[key] = 1
        assert isinstance(ei.value, TypeError)
        assert type(key).__name__ in str(ei.value)
        with pytest.raises(UnsupportedTypeError):
            st[key]
        assert dict(st.items()) == {"keep": 1}


@pytest.mark.parametrize("key", ["\udc80", "name-\ud800-x", "\ud83d\ude00"])
def test_a_str_key_utf8_cannot_encode_is_refused_as_a_bad_key(name, key):
    """A str key with a lone surrogate (as os.fsdecode makes of bytes that are
    not UTF-8) raises InvalidKeyError, a ValueError naming the key, the
    character and the way out, caused by the codec's UnicodeEncodeError (it
    raised that bare, from deep inside), from every call that takes a key;
    nothing is stored, and the same key as bytes is an ordinary key."""
    with Store(name) as st:
        st["keep"] = 1
        calls = [lambda: st.__setitem__(key, 1), lambda: st[key], lambda: st.get(key),
                 lambda: key in st, lambda: st.get_many(["keep", key], None),
                 lambda: st.add(key, 1), lambda: st.pop(key, None),
                 lambda: st.__delitem__(key), lambda: st.nbytes(key),
                 lambda: st.update({"a": 1, key: 2})]
        for call in calls:
            with pytest.raises(shmkit.InvalidKeyError, match="lone surrogate") as ei:
                call()
            assert isinstance(ei.value, ValueError)
            assert isinstance(ei.value.__cause__, UnicodeEncodeError)
            assert repr(key)[:20] in str(ei.value) and "surrogatepass" in str(ei.value)
        with st.batch():
            with pytest.raises(shmkit.InvalidKeyError):
                st[key] = 1
            st["in-batch"] = 2
        assert dict(st.items()) == {"keep": 1, "in-batch": 2}
        raw = key.encode("utf-8", "surrogatepass")
        st[raw] = 3
        assert st[raw] == 3
        st.verify()


class Thing:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Thing and other.x == self.x


@pytest.mark.parametrize("value", [bytearray(b"x"), [1, 2], {"a": 1}, (1,), Thing(1),
                                   np.float64(1.5), np.array([object()]), 1 + 2j])
def test_unsupported_value_types_name_the_way_out(name, value):
    with Store(name) as st:
        st["k"] = "before"
        with pytest.raises(UnsupportedTypeError) as ei:
            st["k"] = value
        assert "codec='pickle'" in str(ei.value)
        assert type(value).__qualname__ in str(ei.value)
        assert st["k"] == "before" and len(st) == 1


def test_pickle_codec_is_explicit_and_recorded(names):
    a, b = names(), names()
    with Store(a, codec="pickle") as st:
        st["obj"] = {"nested": [1, (2, 3)], "t": Thing(5)}
        st["arr"] = np.arange(3)
        st["plain"] = b"raw"
        assert st["obj"] == {"nested": [1, (2, 3)], "t": Thing(5)}
        assert exact(st["arr"], np.arange(3))
        assert dict(st.items())["obj"]["t"] == Thing(5)
        assert sum(1 for v in st.values() if type(v) is bytes and v == b"raw") == 1
        with Store.open(a) as other:  # no codec given: the store's own is adopted
            assert other.codec == "pickle" and other["obj"]["t"] == Thing(5)
        with pytest.raises(MismatchError, match="codec=None") as ei:
            Store.open(a, codec=None)  # given explicitly: refused, both named
        assert "codec='pickle'" in str(ei.value) and isinstance(ei.value, ValueError)
    with Store(b) as st:
        st["x"] = 1
    with pytest.raises(MismatchError, match="codec=None"):
        Store.open(b, codec="pickle")
    with pytest.raises(ValueError):
        Store(names(), codec="json")


def test_value_too_large_and_store_full(name):
    with Store(name, size=64 << 10, max_size=1 << 20) as st:
        st["a"] = b"a" * 1000
        with pytest.raises(ValueTooLargeError) as ei:
            st["big"] = b"x" * (2 << 20)
        assert isinstance(ei.value, ValueError) and "max_size" in str(ei.value)
        with pytest.raises(OutOfSpaceError, match="max_size"):
            for i in range(10_000):
                st[i] = b"y" * 1000
        assert st["a"] == b"a" * 1000
        st.verify()
        n = len(st)
        for i in range(n - 1):
            del st[i]
        st.vacuum()
        st["again"] = b"z" * 1000
        st.verify()


def test_opened_as_another_kind(names):
    a, b = names(), names()
    with Segment(a, size=4096):
        with pytest.raises(WrongKindError, match="open it as Raw"):
            Store(a)
    with Store(b):
        with pytest.raises(WrongKindError, match="store"):
            Segment.open(b)


@pytest.mark.parametrize("version", [1, 9])  # 1: made before views were counted
def test_other_format_version_is_refused(name, version):
    Store(name).close()
    path = f"/dev/shm/shmkit.{name}"
    with open(path, "r+b") as f:
        f.seek(1024)
        raw = f.read(200)
        assert b'"format":2' in raw
        f.seek(1024)
        f.write(raw.replace(b'"format":2', b'"format":%d' % version))
    with pytest.raises(FormatVersionError, match=f"format {version}; this shmkit reads format 2"):
        Store.open(name)


def damage(st: Store, key, where: str) -> None:
    rec, _ = st._locate(key)
    view = st._seg.buf
    base = st._seg._hsize
    off = rec - base
    if where == "length":
        view[off + 32:off + 40] = (1 << 40).to_bytes(8, "little")
    elif where == "hash":
        view[off + 16:off + 24] = b"\xff" * 8
    elif where == "index":
        ix = int.from_bytes(view[8:16], "little")
        view[ix + 32:ix + 32 + 8 * 64] = b"\xab" * (8 * 64)
    elif where == "chain":
        view[off:off + 8] = (3).to_bytes(8, "little")
    del view


@pytest.mark.parametrize("where", ["length", "index", "chain", "hash"])
def test_corrupt_store_raises_never_crashes(name, where):
    with Store(name, size=16 << 10) as st:
        for i in range(40):
            st[f"k{i}"] = b"v" * 50
        damage(st, "k3", where)
        with pytest.raises(CorruptError) as ei:
            st.verify()
        assert "verify()" in str(ei.value)
        # reads and writes fail cleanly (or still work where nothing is damaged)
        for op in (lambda: [st.get(f"k{i}") for i in range(40)],
                   lambda: st.__setitem__("new", b"x"),
                   lambda: list(st.items()),
                   lambda: st.vacuum()):
            try:
                op()
            except (CorruptError, KeyError):
                pass
    # another process too
    proc = run_python(f"""
        import shmkit
        st = shmkit.Store.open({name!r})
        try:
            st.verify()
        except shmkit.CorruptError as e:
            print("corrupt:", e)
    """)
    assert "corrupt:" in proc.stdout


def poke(st: Store, off: int, value: int, size: int = 8) -> None:
    """Write a little-endian word into the store header (payload offset)."""
    view = st._seg.buf
    view[off:off + size] = value.to_bytes(size, "little")
    del view


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 10**6])
def test_damaged_key_count_never_hangs(name, count):
    with Store(name, size=16 << 10, timeout=5) as st:
        for i in range(100):
            st[i] = i
        poke(st, 72, count)  # THeader.count
        for op in (lambda: len(st), lambda: st.__setitem__("new", 1)):
            with pytest.raises(CorruptError, match="count"):
                op()
        # the failed write marked the store for repair: the next one recounts
        st["new"] = 1
        assert len(st) == 101 and st.statistics()["recoveries"] == 1
        st.verify()
        poke(st, 72, count)
        for op in (lambda: st.vacuum(), lambda: list(st.items())):
            with pytest.raises(CorruptError, match="count"):
                op()
        st.verify()  # takes the lock: repairs first
        assert len(st) == 101


def test_an_odd_epoch_left_behind_is_repaired_by_the_next_writer(name):
    with Store(name, size=16 << 10) as st:
        for i in range(200):
            st[i] = b"v" * (i % 90)
        poke(st, 0, 7)  # as if a batch writer died while applying its words
        st["after"] = 1
        assert st.statistics()["recoveries"] == 1
        assert st.statistics()["epoch"] % 2 == 0
        assert all(st[i] == b"v" * (i % 90) for i in range(200))
        st.verify()


def test_heap_bounds_in_the_header_are_checked(name):
    with Store(name, size=16 << 10, timeout=5) as st:
        for i in range(50):
            st[i] = b"v" * 100
        # the heap start is a constant: damage to it is reported, never used
        poke(st, 24, 64)  # THeader.heap_start
        for i in range(2000):
            st[i % 80] = b"w" * (i % 300)
        assert st[5] == b"w" * (1925 % 300)
        with pytest.raises(CorruptError, match="heap start"):
            st.verify()
        poke(st, 24, 4096)
        st.verify()
        # an unaligned heap end is refused before anything is written there
        end = int.from_bytes(st._seg.buf[32:40], "little")
        poke(st, 32, end - 8)
        for op in (lambda: st.__setitem__("big", b"x" * 200_000), lambda: st[5],
                   lambda: st.verify()):
            with pytest.raises(CorruptError, match="heap end"):
                op()
        poke(st, 32, end)
        st.verify()
        st["big"] = b"x" * 200_000
        st.verify()


def u64(view, off: int) -> int:
    return int.from_bytes(view[off:off + 8], "little")


def _crash_mid_commit(st: Store) -> int:
    """Commit a batch, then put the store back as a writer killed right after
    marking it committing would leave it; returns the epoch it had."""
    st["a"], st["b"] = 1, 2
    view = st._seg.buf
    pre = bytes(view)
    with st.batch():
        del st["a"]
        st["b"] = 3
        st["c"] = 4
    ix, end = u64(view, 8), u64(view, 32)
    assert u64(view, 8) == u64(pre, 8)  # the same index: no rebuild
    nslots = u64(view, ix + 16)
    view[ix + 32:ix + 32 + 8 * nslots] = pre[ix + 32:ix + 32 + 8 * nslots]
    off = 4096
    while off < end:  # the replaced records: used again
        head = u64(pre, off)
        if head & 15 == 1:
            view[off:off + 8] = pre[off:off + 8]
        off += head & ~15
    j = u64(view, 112)  # THeader.journal, still naming the freed journal block
    view[j:j + 8] = (u64(view, j) | 1 | 4).to_bytes(8, "little")
    view[68:72] = (1).to_bytes(4, "little")  # state = committing
    epoch = u64(pre, 0)
    view[0:8] = pre[0:8]
    del view
    assert st.get("a") == 1 and st.get("b") == 2 and "c" not in st
    return epoch


def test_recovery_redoes_a_committing_batch_behind_an_odd_epoch(name):
    with Store(name) as st:
        epoch = _crash_mid_commit(st)
        st["d"] = 5  # the next writer repairs first
        assert "a" not in st and st["b"] == 3 and st["c"] == 4 and st["d"] == 5
        assert st.statistics()["recoveries"] == 1
        # odd while the words were stored, even after, then a recycle (+2)
        assert st.statistics()["epoch"] == epoch + 4
        st.verify()


def test_recovery_checks_the_whole_journal_before_redoing_it(name):
    with Store(name) as st:
        _crash_mid_commit(st)
        view = st._seg.buf
        j = u64(view, 112)
        # the last entry names a slot beyond the index: nothing may be stored
        n = u64(view, j + 16)
        view[j + 32 + 16 * (n - 1):j + 40 + 16 * (n - 1)] = (1 << 40).to_bytes(8, "little")
        del view
        with pytest.raises(CorruptError, match="journal entry"):
            st["d"] = 5
        assert st.get("a") == 1 and st.get("b") == 2 and "c" not in st


def test_recovery_survives_a_journal_of_a_hostile_size(name):
    # the journal claims a block of 16 bytes and 2**58 entries of zeros: the
    # size check used to underflow and the redo ran off the end of the file
    with Store(name) as st:
        for i in range(20):
            st[i] = b"x" * 200
        view = st._seg.buf
        ix = u64(view, 8)
        j = u64(view, 104) + 32  # inside the free top block: zeros to the end
        view[j:j + 8] = (16 | 1 | 4).to_bytes(8, "little")
        view[j + 16:j + 24] = (1 << 58).to_bytes(8, "little")
        view[j + 24:j + 32] = ix.to_bytes(8, "little")
        view[112:120] = j.to_bytes(8, "little")
        view[120:128] = (1 << 58).to_bytes(8, "little")
        view[68:72] = (1).to_bytes(4, "little")
        del view
    proc = run_python(f"""
        import shmkit
        st = shmkit.Store.open({name!r})
        try:
            st["x"] = 1
        except shmkit.CorruptError as e:
            print("corrupt:", e)
    """, check=False)
    assert proc.returncode == 0 and "journal" in proc.stdout, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("header", [b"(('<i4', (3,)) junk", b"('|V0', (1, 2**62))",
                                    b"('<f8', (5,))", b"\xff\xfe"])
def test_damaged_array_header_is_corrupt_not_valueerror(name, header):
    with Store(name) as st:
        st["arr"] = np.arange(3, dtype=np.int32)
        _, val = st._locate("arr")
        view = st._seg.buf
        off = val - st._seg._hsize
        hn = int.from_bytes(view[off:off + 4], "little")
        view[off + 4:off + 4 + hn] = header[:hn].ljust(hn, b" ")
        del view
        for op in (lambda: st["arr"], lambda: list(st.items()), lambda: st.pop("arr")):
            with pytest.raises(CorruptError, match="valid value|damaged|decoded"):
                op()
        with Store.open(name, readonly=True) as ro:
            with pytest.raises(ShmkitError):
                ro["arr"]


@pytest.mark.parametrize("hostile", ["object dtype", "minus", "plus", "attribute", "calls",
                                     "not", "deep"])
def test_a_hostile_array_header_is_corrupt(name, hostile):
    # Header bytes no writer produces: a dtype of objects would turn the
    # record's bytes into object pointers (a crash); the others make ast
    # fail with RecursionError or MemoryError, which must not pass for the
    # reader's own.
    with Store(name) as st:
        st["arr"] = np.zeros(3, dtype=[("x" * 200_000, "<i8")])  # a long header
        _, val = st._locate("arr")
        view = st._seg.buf
        off = val - st._seg._hsize
        hn = int.from_bytes(view[off:off + 4], "little")
        header = {"object dtype": "('|O', (3,))", "minus": "-" * (hn - 1) + "1",
                  "plus": "1" + "+1" * ((hn - 1) // 2), "attribute": "x" + ".a" * ((hn - 1) // 2),
                  "calls": "()" * (hn // 2), "not": "not " * ((hn - 1) // 4) + "1",
                  "deep": "(" * (hn // 2) + ")" * (hn // 2)}[hostile]
        view[off + 4:off + 4 + hn] = header.encode().ljust(hn, b" ")
        del view
        for op in (lambda: st["arr"], lambda: st.get_many(["arr"]), lambda: list(st.values()),
                   lambda: st.view_array("arr").__enter__(), lambda: st.pop("arr")):
            with pytest.raises(CorruptError):
                op()


def test_an_array_with_a_non_ascii_field_name_reads_back(name):
    with Store(name) as st:
        a = np.array([(1,), (2,), (3,)], dtype=[("é", "<i8")])
        st["arr"] = a
        assert st["arr"].dtype == a.dtype and np.array_equal(st["arr"], a)
        with st.view_array("arr") as got:
            assert np.array_equal(got, a)


def _overwrite_array_header(st, key, header: bytes) -> None:
    """Write header over the array header of st[key], padded with spaces to
    its length (the record keeps its size)."""
    _, val = st._locate(key)
    view = st._seg.buf
    off = val - st._seg._hsize
    hn = int.from_bytes(view[off:off + 4], "little")
    assert len(header) <= hn
    view[off + 4:off + 4 + hn] = header.ljust(hn, b" ")
    del view


def _every_array_read(st, key):
    return (lambda: st[key], lambda: st.get_many([key]), lambda: list(st.values()),
            lambda: st.view_array(key).__enter__(), lambda: st.pop(key))


@pytest.mark.parametrize("header", ["('|S0', (1000000000000,))", "('<U0', (1000000000000,))",
                                    "('|S', (1000000000000,))", "('U', (1000000, 1000000))",
                                    "('>U0', (1000000000000,))", "('|S0', (0, 1000000000000))",
                                    "([('a', '|S0', (3,))], (1000000000000,))"])
def test_an_unsized_string_dtype_in_a_header_is_corrupt_without_allocating(name, header):
    # itemsize 0 matches an empty body for any count, and np.empty makes it
    # S1/U1: 931 GiB asked, MemoryError, or gigabytes taken on every read.
    # (numpy refuses S0 as the base of a subarray field.)
    with Store(name) as st:
        st["arr"] = np.zeros(0, dtype=[("x" * 64, "<i8")])  # a long header, no data
        _overwrite_array_header(st, "arr", header.encode())
        for op in _every_array_read(st, "arr"):
            with pytest.raises(CorruptError):
                op()


@pytest.mark.parametrize("pattern", ['"\\', "'", "(", "(1,", "'a',", "'\\\\", " "])
def test_a_long_crafted_header_is_refused_in_time_linear_in_its_length(name, pattern):
    # A regular expression used to scan on from every unterminated quote:
    # 32 KB of "\ took seconds per read, 256 KB minutes, 1 MB about an hour,
    # with the writers' lock held for the second parse.  256 KB: long enough
    # for a quadratic scan to overrun the bound on a fast machine too.
    with Store(name) as st:
        st["arr"] = np.zeros(3, dtype=[("x" * (1 << 18), "<i8")])
        _, val = st._locate("arr")
        hn = int.from_bytes(st._seg.buf[val - st._seg._hsize:][:4], "little")
        _overwrite_array_header(st, "arr", (pattern * (hn // len(pattern))).encode())
        started = time.monotonic()
        with pytest.raises(CorruptError):
            st["arr"]
        took = time.monotonic() - started
        assert took < 30, f"reading a {hn}-byte crafted header took {took:.1f} s"


def test_an_array_of_unsized_string_fields_reads_back_without_allocating(name):
    # numpy keeps S0 inside a structured dtype at no bytes (it makes only a
    # bare S0 S1): a writer can store 10**12 such elements in 0 bytes.
    a = np.zeros(10**12, dtype=[("a", "S0"), ("b", [("c", "<U0")])])
    assert a.nbytes == 0
    with Store(name) as st:
        st["arr"] = a
        for got in (st["arr"], st.get_many(["arr"])[0], next(iter(st.values()))):
            assert got.dtype == a.dtype and got.shape == a.shape and got.nbytes == 0
        with st.view_array("arr") as got:
            assert got.dtype == a.dtype and got.shape == a.shape
        assert st.pop("arr").shape == a.shape


@pytest.mark.parametrize("header", [
    "(('<i4', (3,)), (2,))",  # a subarray dtype: np.empty would make it shape (2, 3)
    "([('a\x01', '<i4')], (6,))",  # control characters repr() escapes, here raw
    "([('a\x00', '<i4')], (6,))", "([('a\x85', '<i4')], (6,))", "(['<i4', '\t'], (6,))",
    "([('a\\a', '<i4')], (6,))",  # escapes repr() does not write
    "([('a\\0', '<i4')], (6,))", "([('a\\N{EM DASH}', '<i4')], (6,))",
    "([('a\\x4', '<i4')], (6,))", "([('a\\Uffffffff', '<i4')], (6,))",
    "([('a\\\n', '<i4')], (6,))", "([(b'a', '<i4')], (6,))", "([(r'a', '<i4')], (6,))",
    "(('<i4'), (6,))",  # parentheses that make no tuple
    "('<i4', (6,)) ('<i4', (6,))", "('<i4', (+6,))", "('<i4', (06,))", "('<i4', (6.0,))",
    "('<i4', (1_2,))", "('<i4', (0x6,))", "('<i4', (6,,))", "('<i4', (6,)))", "('<i4', (6,)",
    "('<i4', (" + "0" * 29 + "6,))",
    # type strings dtype.str never is: numpy parses comma strings with ast
    # (SyntaxError escaped), and 'a6' is deprecated (a warning, an error
    # under -W error)
    "('01', (24,))", "([('a', '|01')], (6,))", "('i4,(01)i4', (3,))",
    "([('a', 'i4,i4')], (3,))", "('a24', (1,))", "('<i4 ', (6,))",
])
def test_a_header_that_is_not_what_a_writer_makes_is_corrupt(name, header):
    # each of these is what ast.literal_eval would read, or a near miss of
    # the literal: a header is exactly repr((descr, shape)) or damage
    with Store(name) as st:
        st["arr"] = np.zeros(6, dtype=[("x" * 64, "<i4")])  # 24 bytes of data
        _overwrite_array_header(st, "arr", header.encode())
        for op in _every_array_read(st, "arr"):
            with pytest.raises(CorruptError):
                op()


def test_an_array_read_inside_another_array_read_parses_both(name):
    # A gc callback that reads an array while another array's header is
    # parsed: CPython 3.11's ast is not re-entrant (SystemError "AST
    # constructor recursion depth mismatch" on every read).
    import gc
    with Store(name) as st:
        st["a"] = np.arange(3)
        st["b"] = np.zeros((2, 2), dtype=[("f", "<f4", (2,))])
        seen = []

        def callback(phase, info):
            if phase == "start":
                seen.append(st["b"].shape)
        threshold = gc.get_threshold()
        gc.callbacks.append(callback)
        gc.set_threshold(1, 1, 1)
        try:
            got = [st["a"] for _ in range(500)]
        finally:
            gc.callbacks.remove(callback)
            gc.set_threshold(*threshold)
        assert seen and all(shape == (2, 2) for shape in seen)
        assert all(np.array_equal(a, np.arange(3)) for a in got)


_DTYPES = [np.dtype("<i4"), np.dtype(">f8"), np.dtype("<c16"), np.dtype("?"), np.dtype("U5"),
           np.dtype("V7"), np.dtype("M8[ns]"), np.dtype("m8[D]"), np.dtype([]),
           np.dtype([("a", "<i4"), ("b", "S3")]),
           np.dtype([(("a title", "name"), "<i4"), ("x", "<f8", (2, 3))]),
           np.dtype([("a", "u1"), ("b", "<i8")], align=True),
           np.dtype([("it's \"quoted\" \\ \n\t é ☃ \x01 \U0001f600", "<i2")]),
           np.dtype([("n", [("m", "<u2", (2,)), ("o", "V3")])]),
           np.dtype([("b", ("i1", (2,)), (3,))]),
           np.dtype([("it's", "<i2"), ('"', "u1"), ("\x7f\x85\xa0\u2028\U000e0001\ud800\r", "<i2")]),
           np.dtype(">U3"), np.dtype("S1"), np.dtype("M8"), np.dtype(">m8[100us]"), np.dtype("V0"),
           np.dtype([("s", "S0"), ("z", "<i4", (0,)), ("t", "<f2")]),
           np.dtype([("a", "u1"), ("n", [("b", "u1"), ("c", ">i8")], (2,))], align=True),
           np.dtype({"names": ["a", "b"], "formats": ["u1", ">i4"], "offsets": [1, 7],
                     "itemsize": 16})]  # gaps: padding fields named ''


@pytest.mark.parametrize("dtype", _DTYPES, ids=[str(i) for i in range(len(_DTYPES))])
def test_every_kind_of_dtype_reads_back(name, dtype):
    # np.dtype([]) has elements of no bytes: its view used to be CorruptError
    rng = np.random.default_rng(5)
    with Store(name) as st:
        for shape in [(), (0,), (3,), (2, 3, 1), (1000, 0)]:
            raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
            a = raw.view(dtype).reshape(shape) if dtype.itemsize else np.zeros(shape, dtype)
            st["arr"] = a
            got = st["arr"]
            assert got.dtype == dtype and got.shape == a.shape
            assert got.tobytes() == a.tobytes()
            with st.view_array("arr") as v:
                assert v.dtype == dtype and v.tobytes() == a.tobytes()


def test_store_closed_by_code_run_during_iteration_never_crashes(name):
    # the array hook runs Python code in the middle of a scan; closing the
    # store there used to unmap the memory the scan went on reading
    with Store(name) as st:
        for i in range(2000):  # several scan chunks
            st[i] = np.arange(i % 5 + 1)
    proc = run_python(f"""
        import shmkit, shmkit.store as S
        st = shmkit.Store.open({name!r})
        seg = st._seg

        def closing_decode(*args):
            st.close()
            return S._decode(*args)

        st._bind(seg._mapping, seg._hsize, decode=closing_decode, encode=S._encode_plain)
        try:
            print(len(list(st.items())))
        except shmkit.ClosedError as e:
            print("closed:", e)
    """, check=False)
    assert proc.returncode == 0 and "closed:" in proc.stdout, (proc.returncode, proc.stderr)


def test_closed_and_readonly(name):
    st = Store(name)
    st["a"] = 1
    ro = Store.open(name, readonly=True)
    assert ro["a"] == 1 and ro.readonly
    with pytest.raises(ReadOnlyError):
        ro["b"] = 2
    with pytest.raises(ReadOnlyError):
        del ro["a"]
    st.close()
    st.close()
    with pytest.raises(ClosedError):
        st["a"]
    with pytest.raises(ClosedError):
        st["a"] = 2
    with pytest.raises(ClosedError):
        len(st)
    ro.close()


# -- sharing between processes ------------------------------------------------------

def _grow_child(name, n):
    st = Store.open(name)
    for i in range(n):
        st[i] = b"%d" % i * 20
    st.close()


def test_growth_is_seen_by_other_processes(name):
    with Store(name, size=16 << 10) as st:
        st["first"] = "here"
        size0 = st.allocated_bytes
        p = spawn(_grow_child, name, 30_000)
        p.join(60)
        assert p.exitcode == 0
        assert len(st) == 30_001 and st.allocated_bytes > 50 * size0
        for i in range(0, 30_000, 997):
            assert st[i] == b"%d" % i * 20
        assert st["first"] == "here"
        stats = st.statistics()
        assert stats["growths"] >= 5 and stats["index_growths"] >= 5
        st.verify()


def test_pickling_by_name_reopens_in_a_child(name):
    with Store(name) as st:
        st["k"] = "v"
        blob = pickle.dumps(st)
        out = run_python(f"""
            import pickle, shmkit
            st = pickle.loads({blob!r})
            print(st["k"]); st["child"] = 1
        """)
        assert out.stdout.strip() == "v" and st["child"] == 1


def test_file_backed_store_survives_and_flushes(tmp_path):
    path = tmp_path / "store.db"
    with Store(path=path) as st:
        st["durable"] = b"yes"
        st.flush()
    out = run_python(f"""
        import shmkit
        st = shmkit.Store.open(path={str(path)!r})
        print(st["durable"].decode()); st.verify()
    """)
    assert out.stdout.strip() == "yes"
    os.unlink(path)


def test_code_run_while_vacuum_cuts_the_segment_cannot_grow_it(name):
    # vacuum() cuts the heap, then the segment: a finalizer that ran between
    # the two and grew the store through the same handle had its record
    # punched out by the cut (zeros read back, then CorruptError).
    import gc

    with Store(name, size=1 << 20) as st:
        for i in range(200):
            st[f"k{i}"] = b"x" * 4000
        for i in range(0, 200, 2):
            del st[f"k{i}"]
        refused: list[str] = []

        def callback(phase: str, info: dict) -> None:
            if phase == "start" and not refused and _inside_store_function("shrink"):
                try:
                    st["big"] = b"\xab" * (3 << 20)
                except RuntimeError as e:
                    refused.append(str(e))

        thresholds = gc.get_threshold()
        gc.callbacks.append(callback)
        try:
            gc.set_threshold(1)
            assert st.vacuum() > 0
        finally:
            gc.set_threshold(*thresholds)
            gc.callbacks.remove(callback)
        assert refused and "middle of an operation on this thread" in refused[0]
        assert "big" not in st and len(st) == 100 and st["k199"] == b"x" * 4000
        st.verify()
        st["big"] = b"\xab" * (3 << 20)  # after the vacuum, it works
        assert st["big"] == b"\xab" * (3 << 20)
        st.verify()


def test_vacuum_gives_memory_back(name):
    with Store(name) as st:
        for i in range(60_000):
            st[i] = b"x" * 200
        fd = st._seg._fd
        full = os.fstat(fd).st_blocks * 512
        for i in range(60_000):
            if i % 50:
                del st[i]
        released = st.vacuum()
        after = os.fstat(fd).st_blocks * 512
        assert released > 0 and after < full / 5, (full, after)
        assert len(st) == 1200 and all(st[i] == b"x" * 200 for i in range(0, 60_000, 50))
        st.verify()
        st.update({f"n{i}": i for i in range(1000)})  # grows again from the smaller size
        st.verify()


def test_info_describes_the_store(name):
    with Store(name) as st:
        for i in range(100):
            st[i] = i
        info = st.info()
        assert info["kind"] == "store"
        s = info["store"]
        for field in ("count", "used_bytes", "allocated_bytes", "fragmentation", "growths"):
            assert field in s
        assert s["count"] == 100 and s["used_bytes"] == st.used_bytes > 0
        assert st.allocated_bytes >= st.used_bytes
        assert st.statistics()["count"] == 100
        assert "keys=100" in repr(st)


# -- concurrency ------------------------------------------------------------------------

def _pattern(key: int, gen: int) -> bytes:
    n = 1 + (key * 7 + gen * 13) % 300
    return bytes([gen % 251]) * n + key.to_bytes(4, "little")


def _writer(name, seconds, stop_flag):
    st = Store.open(name)
    gen = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop_flag.is_set():
        for k in range(200):
            st[k] = _pattern(k, gen)
        with st.batch():
            st["a"] = gen
            st["b"] = -gen
        if gen % 7 == 0:
            for k in range(200, 260):
                st.pop(k, None)
        else:
            for k in range(200, 260):
                st[k] = _pattern(k, gen)
        gen += 1
    st.close()


def _reader(name, seconds, q):
    st = Store.open(name, readonly=True)
    bad = reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for k in range(0, 260, 3):
            v = st.get(k)
            reads += 1
            if v is None:
                continue
            gen = v[0]
            if v[-4:] != k.to_bytes(4, "little") or v[:-4] != bytes([gen]) * (len(v) - 4):
                bad += 1
        for key, value in st.items():
            if isinstance(key, int) and value[-4:] != key.to_bytes(4, "little"):
                bad += 1
    q.put((bad, reads))
    st.close()


def _batch_reader(name, seconds, q):
    """Reads a and b in one scan (one epoch), so a half-applied batch would show."""
    st = Store.open(name)
    bad = n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        d = dict(st._scan(0, 0, 1 << 20, 2)[2]) if len(st) < 1000 else {}
        if "a" in d and "b" in d:
            n += 1
            if d["a"] != -d["b"]:
                bad += 1
    q.put((bad, n))
    st.close()


def test_readers_in_other_processes_never_see_torn_values(name):
    with Store(name, size=16 << 10) as st:
        stop = SPAWN.Event()
        q = SPAWN.Queue()
        w = spawn(_writer, name, 4.0, stop)
        readers = [spawn(_reader, name, 3.0, q), spawn(_batch_reader, name, 3.0, q)]
        results = [q.get(timeout=60) for _ in readers]
        stop.set()
        for p in readers + [w]:
            p.join(30)
            assert p.exitcode == 0
        assert sum(r[0] for r in results) == 0, results
        assert all(r[1] > 0 for r in results), results
        st.verify()
        assert st.statistics()["recycles"] > 0  # readers did race with space reuse


def test_many_threads_share_one_store(name):
    with Store(name, size=16 << 10) as st:
        errors = []

        def work(t):
            try:
                for i in range(3000):
                    st[i + t * 100_000] = f"{t}:{i}"
                    if i % 10 == 0:
                        with st.batch():
                            st[f"t{t}"] = i
                            st[f"u{t}"] = i
                    assert st.get(i + t * 100_000) == f"{t}:{i}"
                    if i % 3 == 0:
                        del st[i + t * 100_000]
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert len(st) == 6 * 2000 + 12
        for t in range(6):
            assert st[f"t{t}"] == st[f"u{t}"] == 2990
        st.verify()


def test_batch_is_all_or_nothing_and_private_until_published(name):
    with Store(name) as st:
        st["a"] = 0
        with pytest.raises(RuntimeError):
            with st.batch():
                st["a"] = 1
                st["new"] = 1
                assert st["a"] == 1 and "new" in st and len(st) == 2
                raise RuntimeError("abandon")
        assert st["a"] == 0 and "new" not in st and len(st) == 1
        seen = []
        with st.batch():
            st["a"] = 2
            for i in range(500):  # enough inserts to rebuild the index mid-batch
                st[i] = i
            del st[3]
            t = threading.Thread(target=lambda: seen.append((st.get("a"), len(st))))
            t.start()
            t.join()
            out = run_python(f"""
                import shmkit
                st = shmkit.Store.open({name!r}, readonly=True)
                print(st["a"], len(st), 10 in st)
            """)
            assert out.stdout.split() == ["0", "1", "False"]
            expected = {i: i for i in range(500) if i != 3}
            expected["a"] = 2
            assert dict(st.items()) == expected
        assert seen == [(0, 1)]  # another thread saw the state before the batch
        assert st["a"] == 2 and len(st) == 500 and 3 not in st
        assert st.statistics()["batches"] == 1
        st.verify()


def test_a_batchs_own_puts_are_read_back_by_every_kind_of_read(name):
    # A batch writes each put's record at once and looks its index word up
    # later, many together: every read inside the batch must still see the
    # puts before it, in order, and a dropped batch must free their records.
    with Store(name) as st:
        for i in range(100):
            st[i] = -i
        used = st.statistics()["used_bytes"]
        with st.batch():
            for i in range(9000):  # more puts than are ever staged at once
                st[i % 3000] = i  # updates, inserts, and the same key again
            assert (st[0], st[2999], st[1500]) == (6000, 8999, 7500)
            assert len(st) == 3000
            st["new"] = "x"
            assert "new" in st and st.get("new") == "x"
            st["add"] = 1
            with pytest.raises(KeyExistsError):
                st.add("add", 2)
            st["pop"] = 2
            assert st.pop("pop") == 2 and "pop" not in st
            st["gone"] = 3
            del st["gone"]
            st["seen"] = b"in place"
            with st.view("seen") as v:
                assert bytes(v) == b"in place"
            st["keys"] = 4
            assert {k for k in st if isinstance(k, str)} == {"new", "add", "seen", "keys"}
            st["items"] = 5
            assert dict(st.items())["items"] == 5
            st["last"] = 6
        expected = {i: 6000 + i for i in range(3000)}
        expected.update(new="x", add=1, seen=b"in place", keys=4, items=5, last=6)
        assert dict(st.items()) == expected
        st.verify()
        used = st.statistics()["used_bytes"]
        with pytest.raises(RuntimeError):
            with st.batch():
                for i in range(10_000):
                    st[f"dropped {i}"] = b"x" * 100
                st[0] = "dropped too"
                raise RuntimeError("drop it")
        assert dict(st.items()) == expected
        assert st.statistics()["used_bytes"] == used
        st.verify()


def test_a_key_put_where_the_batch_deleted_another_survives_the_index_growing(name):
    # A batch deletes A, puts B into A's tombstone, then grows the index: the
    # rebuild must give B a place by B's own hash, not A's place.
    from shmkit import _core
    with Store(name) as st:
        st["A"] = b"a"

        def home(key, nslots):
            off, _ = st._locate(key)
            return _core.load64(st._seg._mapping, off + 16) & (nslots - 1)

        for i in range(100_000):  # a B whose run starts at A's slot now, but not at 128
            b = f"B{i}"
            st[b] = 0
            fits = home(b, 64) == home("A", 64) and home(b, 128) != home("A", 128)
            del st[b]
            if fits:
                break
        st.vacuum()  # the tombstones go: the index has 64 words again
        assert st.statistics()["index_slots"] == 64
        with st.batch():
            del st["A"]
            st[b] = b"b"
            for i in range(60):  # the index grows to 128 words
                st[f"fill {i}"] = i
        assert st.statistics()["index_slots"] >= 128
        assert st.get(b) == b"b" and b in set(st.keys()) and "A" not in st
        assert len(st) == 61
        st.verify()


@pytest.mark.parametrize("staged", [255, 4096])
def test_code_run_while_the_store_grows_cannot_use_it_mid_write(name, staged):
    # The grow hook is Python code in the middle of a write: a finalizer the
    # collector runs there must be refused, not find the write half made
    # (255 staged puts: the put that grows and the finalizer's would take the
    # staged array's last entry; 4,096: the finalizer's read would probe the
    # puts the grow interrupted probing).
    import gc
    with Store(name, size=64 << 10) as st:
        refused = []

        class PutsWhenCollected:
            def __del__(self):
                try:
                    st["from a finalizer"] = 1
                except RuntimeError as e:
                    refused.append(str(e))

        thresholds = gc.get_threshold()
        try:
            with st.batch():
                for i in range(staged):
                    st[f"k{i}"] = i
                garbage = PutsWhenCollected()
                garbage.cycle = garbage
                del garbage
                gc.set_threshold(1)
                st["grows"] = b"g" * (1 << 20)
                gc.set_threshold(*thresholds)
        finally:
            gc.set_threshold(*thresholds)
        gc.collect()
        assert refused and "middle of an operation on this thread" in refused[0]
        assert "from a finalizer" not in st
        assert len(st) == staged + 1 and st[f"k{staged - 1}"] == staged - 1
        st.verify()
        st["from a finalizer"] = 1  # after the write, it works
        st.verify()


def test_the_lock_a_batch_holds_is_not_released_under_it(name):
    # Releasing it left the batch open without the lock: its end then
    # published unlocked and released the lock (and the mapping's pin) twice.
    with Store(name) as st:
        with st.batch():
            st["a"] = 1
            with pytest.raises(RuntimeError, match="held by a batch"):
                st._unlock()
            st["b"] = 2
        with pytest.raises(RuntimeError, match="not held by this thread"):
            st._unlock()
        assert dict(st.items()) == {"a": 1, "b": 2}
        st["c"] = 3  # the lock was released once, by the batch
        st.verify()


def test_an_array_read_from_a_deep_stack_is_not_reported_as_damage(name):
    # Near the recursion limit, parsing an array's header raises
    # RecursionError: that is the caller's stack, not a damaged record, so
    # it must neither be CorruptError nor send the store to recovery.
    import sys
    with Store(name) as st:
        st["a"] = np.arange(1000)

        def at_depth(d: int, read: Callable[[], object]) -> object:
            return at_depth(d - 1, read) if d > 0 else read()

        def attempt(read: Callable[[], object]) -> BaseException | None:
            try:
                read()
            except BaseException as e:  # noqa: BLE001 - what it raised is the point
                return e
            return None

        seen = set()
        limit = sys.getrecursionlimit()
        for read in (lambda: st["a"], lambda: st.get_many(["a"]), lambda: list(st.values())):
            for d in range(limit - 120, limit):
                try:
                    e = at_depth(d, lambda: attempt(read))
                except RecursionError:
                    continue
                seen.add(type(e).__name__)
                assert not isinstance(e, shmkit.CorruptError), e
        assert "RecursionError" in seen  # some depth did reach the header's parse
        assert st.statistics()["recoveries"] == 0
        assert np.array_equal(st["a"], np.arange(1000))
        st.verify()


def test_an_inner_batch_joins_the_outer_one(name):
    # The outer batch's end decides for both: an error the outer block
    # catches discards nothing; one that leaves it discards both.
    with Store(name) as st:
        with st.batch():
            st["outer"] = 1
            try:
                with st.batch():
                    st["inner"] = 2
                    raise ValueError("caught by the outer block")
            except ValueError:
                pass
            assert st["inner"] == 2
        assert dict(st.items()) == {"outer": 1, "inner": 2}
        with pytest.raises(KeyError):
            with st.batch():
                st["outer"] = 10
                with st.batch():
                    st["inner"] = 20
                    st["gone"] = 3
                raise KeyError("leaves the outer block")
        assert dict(st.items()) == {"outer": 1, "inner": 2}
        st.verify()


# -- update(): dict.update in one batch ------------------------------------------


class _KeysAndItems:
    """A mapping as dict.update reads one: keys() and [key]."""

    def __init__(self, d: dict) -> None:
        self.d = d

    def keys(self):
        return list(self.d)

    def __getitem__(self, key):
        return self.d[key]


class _OwnKeys(dict):
    def keys(self):  # dict.update reads a dict's own pairs, not these
        return ["a"]


class _OwnGetitem(dict):
    def __getitem__(self, key):
        return 99


class _OwnIter(dict):
    def __iter__(self):  # ...unless its iteration is its own: then keys() and [key]
        return iter(["a"])

    def keys(self):
        return ["a"]


@pytest.mark.parametrize("make", [
    lambda: ((_OwnKeys(a=1, b=2),), {}),
    lambda: ((_OwnGetitem(a=1, b=2),), {}),
    lambda: ((_OwnIter(a=1, b=2),), {}),
    lambda: (({"a": 1, 2: b"two"},), {}),
    lambda: (([("a", 1), (2, b"two")],), {}),
    lambda: (((pair for pair in [("a", 1), (b"k", 3.5)]),), {}),
    lambda: (([["a", None]],), {"b": -(1 << 70)}),
    lambda: ((_KeysAndItems({"a": 1, 3: "three"}),), {}),
    lambda: ((), {"a": 1, "b": 2}),
    lambda: ((), {}),
    lambda: (({},), {"a": 1}),
], ids=["dict's keys()", "dict's [key]", "dict's iteration", "dict", "pairs", "generator", "pairs and kwargs", "keys and getitem", "kwargs",
        "nothing", "empty dict and kwargs"])
def test_update_stores_what_dict_update_would(name, make):
    with Store(name) as st:
        st["a"] = 0
        st["kept"] = 1
        expected = {"a": 0, "kept": 1}
        args, kwargs = make()
        expected.update(*args, **kwargs)
        args, kwargs = make()
        st.update(*args, **kwargs)
        assert dict(st.items()) == expected
        st.verify()


@pytest.mark.parametrize("bad, error, message", [
    ([("a", 1, 2)], ValueError, "element #0 has length 3; 2 is required"),
    ([("a", 1), "abc"], ValueError, "element #1 has length 3"),
    ([("a", 1), 5], TypeError, "element #1 to a sequence"),
    (5, TypeError, "not iterable"),
    ({"a": 1, "b": object()}, shmkit.UnsupportedTypeError, "cannot store"),
    ({"a": 1, (1, 2): 2}, shmkit.UnsupportedTypeError, "tuple"),
    (_KeysAndItems({"a": 1, "b": 2, "missing": 3}), KeyError, "missing"),
])
def test_update_refuses_what_dict_update_refuses_and_stores_none_of_its_pairs(name, bad,
                                                                               error, message):
    with Store(name) as st:
        st["a"] = 0
        if isinstance(bad, _KeysAndItems):
            del bad.d["missing"]
            bad.keys = lambda: ["a", "b", "missing"]
        with pytest.raises(error, match=message):
            st.update(bad)
        with pytest.raises(TypeError):
            st.update({}, {})
        assert dict(st.items()) == {"a": 0}
        assert st.statistics()["batches"] == 0
        st["after"] = 1  # no batch left open, the lock free
        st.verify()


def test_update_of_a_readonly_or_closed_store_is_refused(name):
    with Store(name) as st:
        with Store.open(name, readonly=True) as ro:
            with pytest.raises(ReadOnlyError):
                ro.update({"a": 1})
        st.close()
        with pytest.raises(ClosedError):
            st.update({"a": 1})


def test_an_update_inside_a_batch_joins_it(name):
    # The block's end decides: an error that leaves the block discards the
    # update too; an update error the block catches keeps the pairs before it.
    with Store(name) as st:
        with pytest.raises(KeyError):
            with st.batch():
                st.update({"a": 1, "b": 2})
                assert st["a"] == 1
                raise KeyError("discard")
        assert len(st) == 0
        with st.batch():
            with pytest.raises(UnsupportedTypeError):
                st.update({"c": 3, "d": object()})
            st["e"] = 5
        assert dict(st.items()) == {"c": 3, "e": 5}
        assert st.statistics()["batches"] == 1
        st.verify()


def _reader_of_whole_updates(name, last, ready, stop, result):
    st = Store.open(name, readonly=True)
    reads = torn = 0
    while not stop.is_set():
        first = st[0]
        if st[last] < first:  # key 0 is written first: a later key lagging behind is torn
            torn += 1
        reads += 1
        if reads == 100:
            ready.set()
    result.put((reads, torn))


def test_another_process_sees_every_pair_of_an_update_or_none(name):
    keys = 2000
    with Store(name, size=1 << 20) as st:
        st.update(dict.fromkeys(range(keys), 0))
        ready, stop, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        p = spawn(_reader_of_whole_updates, name, keys - 1, ready, stop, result)
        try:
            assert ready.wait(60)
            for version in range(1, 301):
                st.update(dict.fromkeys(range(keys), version))
            stop.set()
            reads, torn = result.get(timeout=60)
        finally:
            stop.set()
            p.join(30)
            p.kill()
        assert reads > 1000 and torn == 0, f"{torn} of {reads} reads saw a torn update"
        st.verify()


def test_ctrl_c_at_any_moment_of_an_update_leaves_all_its_pairs_or_none(name):
    # A dict's pairs are written by a C loop that runs no bytecode: it lets
    # the signal's handler run every 1,024 pairs, and the KeyboardInterrupt
    # discards the pairs written so far.
    keys = 10_000
    with Store(name, size=4 << 20, timeout=2.0) as st:
        versions = [dict.fromkeys(range(keys), v) for v in (1, 2)]
        st.update(versions[0])
        calls = 0

        def one():
            nonlocal calls
            calls += 1
            st.update(versions[calls % 2])
        rounds = 200
        for _ in _interrupted_at_random(one, rounds, seed=11):
            with pytest.raises(RuntimeError, match="no batch is open"):
                st._batch_end(False)
            assert len(set(st.get_many(range(keys)))) == 1
        published = st.statistics()["batches"] - 1
        discarded = calls - published
        assert discarded >= rounds // 2, (
            f"only {discarded} of {rounds} interrupts stopped an update before it published")
        st.verify()
        st["after"] = 1  # the lock is free


def test_other_threads_run_and_write_during_a_long_update(name):
    # The update gives the GIL to a thread that waits for it, every 1,024
    # pairs; a thread's own update waits for the lock, then goes in.
    with Store(name, size=128 << 20, timeout=60) as st:
        big = {i: i for i in range(1_000_000)}
        runs: list[float] = []  # when the spinner got the GIL back
        stop = False

        def spin():
            last = 0.0
            while not stop:
                now = time.monotonic()
                if now - last > 0.001:
                    runs.append(now)
                last = now
        spinner = threading.Thread(target=spin)
        writer = threading.Thread(target=lambda: st.update({"from a thread": 1}))
        spinner.start()
        try:
            time.sleep(0.05)
            writer.start()
            t0 = time.monotonic()
            st.update(big)
            t1 = time.monotonic()
        finally:
            stop = True
            spinner.join()
            writer.join(60)
        # (the spinner may also run once as the update returns, before t1 is read)
        inside = [r for r in runs if t0 < r < t1 - 0.02]
        assert inside, (
            f"no other thread ran during the {t1 - t0:.3f} s update")
        assert st["from a thread"] == 1 and len(st) == len(big) + 1
        st.verify()


class _EmptiesItsPair:
    def __init__(self, pair: list) -> None:
        self.pair = pair

    def __reduce__(self):
        self.pair.clear()  # the key's last reference, if the update held none
        self.filler = ["Z" * 279 + str(i) for i in range(200)]  # reuse its memory
        return (int, (7,))


def test_an_update_pair_emptied_while_its_value_is_encoded_stores_what_it_held(name):
    with Store(name, codec="pickle") as st:
        key = "".join(["key-"] * 70)  # made at run time: no constant keeps it alive
        pair: list = [key, None]
        pair[1] = _EmptiesItsPair(pair)
        del key
        st.update([pair])
        assert list(st.keys()) == ["key-" * 70] and st["key-" * 70] == 7
        st.verify()


class _AddsToItsDict:
    def __init__(self, d: dict) -> None:
        self.d = d

    def __reduce__(self):
        self.d["added while pickled"] = 1
        return (int, (0,))


def test_update_refuses_a_dict_that_changes_under_it(name):
    with Store(name, codec="pickle") as st:
        d: dict = {"a": 1}
        d["b"] = _AddsToItsDict(d)
        with pytest.raises(RuntimeError, match="changed size during update"):
            st.update(d)
        assert len(st) == 0
        st.verify()


@pytest.mark.parametrize("where", ["iterator", "pickled value"])
def test_a_child_forked_during_an_update_is_told_and_the_parents_completes(name, where):
    # The child holds none of the parent's batch: it neither waits for the
    # parent's lock (the parent waits for it here) nor writes a pair alone.
    with Store(name, timeout=10.0, codec="pickle") as st:
        assert fork_during_update(st, where) == [(0, None)]
        assert dict(st.items()) == {i: i for i in range(100)}
        st.verify()


def _inside_store_function(function: str) -> bool:
    """Whether store.py's `function` is on the calling thread's stack."""
    import sys
    f = sys._getframe()
    while f is not None:
        if f.f_code.co_name == function and f.f_code.co_filename.endswith("store.py"):
            return True
        f = f.f_back
    return False


@pytest.mark.parametrize("read", ["get", "items"])
def test_code_run_while_a_batch_decodes_a_value_cannot_use_the_store(name, read):
    # A read in a batch decodes an array value with the lock held, while it
    # still reads the record (and, iterating, the index): a collector's
    # callback that runs in the decode hook and deletes and rewrites must be
    # refused, not free what the read reads.  (Without the refusal the get
    # returned other records' bytes, and the iteration raised CorruptError
    # on a healthy store, losing the batch.)
    import gc
    arrays = {f"a{i}": np.full(10_000, i, dtype=np.int64) for i in range(20)}
    with Store(name, size=1 << 20) as st:
        refused: list[str] = []

        def callback(phase: str, info: dict) -> None:
            if phase != "start" or refused or not _inside_store_function("_decode"):
                return
            try:
                for k in arrays:
                    del st[k]  # this batch's own records: freed at once
                for i in range(20_000):  # recycles them, and grows the index
                    st[f"n{i}"] = b"\xee" * 400
            except RuntimeError as e:
                refused.append(str(e))

        thresholds = gc.get_threshold()
        gc.callbacks.append(callback)
        try:
            with st.batch():
                for k, a in arrays.items():
                    st[k] = a
                assert len(st) == len(arrays)  # their words are in the batch's overlay
                gc.set_threshold(1)
                if read == "get":
                    got = {k: st[k] for k in arrays}
                else:
                    got = dict(st.items())
                gc.set_threshold(*thresholds)
        finally:
            gc.set_threshold(*thresholds)
            gc.callbacks.remove(callback)
        assert refused and "middle of an operation on this thread" in refused[0]
        assert sorted(got) == sorted(arrays)
        assert all(np.array_equal(got[k], a) for k, a in arrays.items())
        assert len(st) == len(arrays) and "n0" not in st
        st.verify()


class _WritesWhenUnpickled:
    """A value whose unpickling writes to a store (pop() decodes mid-write)."""
    store: Store | None = None
    refused: list = []

    def __setstate__(self, state):
        self.__dict__.update(state)
        try:
            _WritesWhenUnpickled.store["written while unpickling"] = 1
        except RuntimeError as e:
            _WritesWhenUnpickled.refused.append(str(e))


def test_code_run_while_pop_decodes_its_value_cannot_use_the_store(name):
    with Store(name, codec="pickle") as st:
        v = _WritesWhenUnpickled()
        v.x = 1
        st["k"] = v
        _WritesWhenUnpickled.store, _WritesWhenUnpickled.refused = st, []
        try:
            got = st.pop("k")  # unpickled between finding the key and deleting it
            assert isinstance(got, _WritesWhenUnpickled) and got.x == 1
            assert "middle of an operation" in _WritesWhenUnpickled.refused[0]
            assert "k" not in st and "written while unpickling" not in st
            got2 = st.get("k", None)
            assert got2 is None
            st["k"] = v
            assert st["k"].x == 1  # a plain get may write: it is not mid-write
            assert st["written while unpickling"] == 1
        finally:
            _WritesWhenUnpickled.store = None
        st.verify()


def test_a_batch_of_inserts_over_many_tombstones_grows_the_index_enough(name):
    # Inserts that reuse tombstones take no empty word, but the index a batch
    # rebuilds must still hold them all (it was sized without them).
    with Store(name) as st:
        i = 0
        while True:  # the index 70% full of keys ...
            s = st.statistics()
            if s["count"] >= 0.7 * s["index_slots"] and s["index_slots"] >= 4096:
                break
            st[i] = 0
            i += 1
        for k in range(i):  # ... then of tombstones
            del st[k]
        n = st.statistics()["index_slots"] // 2
        with st.batch():
            for j in range(n):
                st[f"new {j}"] = j
        assert len(st) == n and st[f"new {n - 1}"] == n - 1
        st.verify()


class _ForksWhenUnpickled:
    """A value whose unpickling forks: the child starts mid-write (in pop())."""
    store: Store | None = None

    def __setstate__(self, state):
        self.__dict__.update(state)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                with _ForksWhenUnpickled.store.batch():
                    _ForksWhenUnpickled.store["from the child"] = 1
                code = 0
            finally:
                os._exit(code)
        self.child = pid


def test_a_child_forked_in_the_middle_of_a_write_can_write(name):
    # The child of a fork made inside pop() holds none of its parent's write:
    # its own batch must work and let go of the lock.
    with Store(name, codec="pickle", timeout=10.0) as st:
        v = _ForksWhenUnpickled()
        v.x = 1  # some state, so that unpickling calls __setstate__
        st["k"] = v
        _ForksWhenUnpickled.store = st
        try:
            got = st.pop("k")
        finally:
            _ForksWhenUnpickled.store = None
        _, status = os.waitpid(got.child, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert st["from the child"] == 1
        st["after"] = 1  # the lock is free
        st.verify()


class _ForksAndGoesOnWhenUnpickled:
    """A value whose unpickling forks, and whose child goes on with pop()."""

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.child = os.fork()


def test_a_child_forked_while_pop_decodes_does_not_delete_too(name):
    # The child of a fork made while pop() unpickles holds none of its
    # parent's lock: it must not publish the delete that its parent does.
    # (It did: the store then counted one key fewer than its index held,
    # and verify() failed.)
    with Store(name, codec="pickle", timeout=10.0) as st:
        for i in range(20):
            st[i] = i
        v = _ForksAndGoesOnWhenUnpickled()
        v.x = 1
        st["k"] = v
        with child_told_it_forked():
            got = st.pop("k")
        _, status = os.waitpid(got.child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "k" not in st and len(st) == 20
        st.verify()
        st["after"] = 1  # the lock is free
        assert len(st) == 21
        st.verify()


def test_a_child_forked_while_the_store_grows_does_not_finish_the_write(name, monkeypatch):
    # Growing runs Python code under the lock (a signal handler there may
    # fork): the child holds none of its parent's lock or put, and is told,
    # instead of writing the put alone while its parent writes it too.
    from shmkit import store as store_module
    resize, children = store_module._resize, []

    def resize_then_fork(seg, size, timeout):
        resize(seg, size, timeout)
        if not children:
            children.append(os.fork())

    with Store(name, size=1 << 16, max_size=1 << 24, timeout=10.0) as st:
        monkeypatch.setattr(store_module, "_resize", resize_then_fork)
        with child_told_it_forked():
            for i in range(2000):
                st[i] = b"v" * 100
        monkeypatch.setattr(store_module, "_resize", resize)
        _, status = os.waitpid(children[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(st) == 2000 and st[1999] == b"v" * 100
        st.verify()


def _big_batches(name, ready, n, rounds):
    st = Store.open(name)
    ready.set()
    for r in range(1, rounds + 1):
        with st.batch():
            for i in range(n):
                st[i] = r
            st["x"] = r
    st.close()


def test_readers_wait_out_a_long_batch_commit(name):
    # publishing a batch of 200,000 words keeps the epoch odd for a while:
    # readers (readonly ones too, and iterators) must wait, not give up
    with Store(name, size=32 << 20) as st:
        st["x"] = 0
        ready = SPAWN.Event()
        p = spawn(_big_batches, name, ready, 200_000, 3)
        assert ready.wait(30)
        ro = Store.open(name, readonly=True)
        seen = set()
        while p.is_alive():
            seen.add(ro["x"])
            for k in ro.keys():
                pass
        p.join(30)
        assert p.exitcode == 0
        seen.add(ro["x"])
        assert seen >= {0, 3}
        assert len(ro) == 200_001 and ro[199_999] == 3
        ro.close()
        st.verify()


def _iter_writer(name, seconds):
    st = Store.open(name)
    rng = random.Random(3)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(300):
            k = 1000 + rng.randrange(3000)
            if rng.random() < 0.5:
                st[k] = k * 3
            else:
                st.pop(k, None)
    st.close()


def test_iteration_while_another_process_writes(name):
    with Store(name, size=16 << 10) as st:
        for k in range(1000):
            st[k] = k * 3  # these stay for the whole test
        p = spawn(_iter_writer, name, 3.0)
        deadline = time.monotonic() + 2.5
        rounds = 0
        while time.monotonic() < deadline:
            items = list(st.items())
            keys = [k for k, _ in items]
            assert len(keys) == len(set(keys))
            assert all(v == k * 3 for k, v in items)
            assert set(range(1000)) <= set(keys)
            rounds += 1
        p.join(30)
        assert p.exitcode == 0 and rounds >= 1
        st.verify()


def _put_and_vacuum_writer(name, seconds):
    st = Store.open(name)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        st[f"x{n % 50}"] = b"y" * 300
        st.vacuum()  # moves records: every recycle changes the epoch
        n += 1
        time.sleep(0.001)
    st.close()


def test_iteration_outlasts_a_writer_that_keeps_changing_every_chunk(name):
    # Decoding 400 arrays takes longer than the writer's pace, so no
    # lock-free read of a chunk ever completes: the chunk is then read under
    # the writers' lock (it used to raise BusyError after its retries).
    with Store(name, size=64 << 10) as st:
        for i in range(400):
            st[f"m{i}"] = np.arange(i % 50, dtype="<i4")
        p = spawn(_put_and_vacuum_writer, name, 4.0)
        deadline = time.monotonic() + 3.0
        rounds = 0
        while time.monotonic() < deadline:
            got = {k: v for k, v in st.items() if k.startswith("m")}
            assert len(got) == 400
            assert all(np.array_equal(got[f"m{i}"], np.arange(i % 50)) for i in range(400))
            rounds += 1
        p.join(30)
        assert p.exitcode == 0 and rounds >= 1
        st.verify()


# -- crashes ----------------------------------------------------------------------------

def _ops(seed: int, count: int):
    """The deterministic operation sequence a crash-test writer runs."""
    rng = random.Random(seed)
    for i in range(count):
        r = rng.random()
        if r < 0.6:
            k = rng.randrange(400)
            big = 3000 if rng.random() < 0.2 else 1  # long copies under the lock
            yield [("set", k, _pattern(k, i) * rng.randrange(1, 4) * big)]
        elif r < 0.8:
            yield [("del", rng.randrange(400), None)]
        else:
            yield [("set", rng.randrange(400), i) for _ in range(rng.randrange(2, 30))]


def _crash_writer(name, seed, ack, count):
    st = Store.open(name)
    for n, op in enumerate(_ops(seed, count)):
        if len(op) == 1:
            kind, k, v = op[0]
            if kind == "set":
                st[k] = v
            else:
                st.pop(k, None)
        else:
            with st.batch():
                for _, k, v in op:
                    st[k] = v
        ack.send_bytes(n.to_bytes(4, "little"))
    st.close()


def _apply(model: dict, op) -> None:
    for kind, k, v in op:
        if kind == "set":
            model[k] = v
        else:
            model.pop(k, None)


def crash_rounds(name: str, rounds: int, rng: random.Random) -> dict:
    stats = {"recoveries": 0, "acked": 0}
    model: dict = {}
    with Store(name, size=16 << 10) as st:
        for r in range(rounds):
            # model: everything written by finished rounds
            base = dict(model)
            for k, v in base.items():
                assert exact(st.get(k), v)
            seed = rng.randrange(1 << 30)
            reader, writer = SPAWN.Pipe(duplex=False)
            p = SPAWN.Process(target=_crash_writer, args=(name, seed, writer, 100_000),
                              daemon=True)
            p.start()
            writer.close()
            done = 0
            try:
                reader.recv_bytes()  # it is writing
                done = 1
            except EOFError:
                pass
            time.sleep(rng.uniform(0, 0.03))
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            try:
                while True:
                    reader.recv_bytes()
                    done += 1
            except EOFError:
                pass
            reader.close()
            stats["acked"] += done
            ops = _ops(seed, done + 1)
            for _ in range(done):
                _apply(model, next(ops))
            inflight = next(ops)
            new = dict(model)
            _apply(new, inflight)
            # the first write recovers; verify() takes the lock, so it recovers too
            st.verify()
            keys = {k for _, k, _ in inflight}
            got = {k: st.get(k, "<absent>") for k in keys}
            old_state = {k: model.get(k, "<absent>") for k in keys}
            new_state = {k: new.get(k, "<absent>") for k in keys}
            same = lambda a, b: all(exact(a[k], b[k]) for k in keys)  # noqa: E731
            assert same(got, old_state) or same(got, new_state), (r, inflight, got)
            if same(got, new_state):
                model = new
            assert len(st) == len(model)
            for k, v in model.items():
                assert exact(st[k], v), (r, k)
            stats["recoveries"] = st.statistics()["recoveries"]
    print("crash rounds:", stats)
    return stats


def test_writer_killed_at_random_points(name):
    stats = crash_rounds(name, 10, random.Random(11))
    assert stats["acked"] > 0


@pytest.mark.stress
def test_writer_killed_at_random_points_many_times(name):
    stats = crash_rounds(name, 300, random.Random(12345))
    assert stats["recoveries"] >= 20


def _hold_lock_and_die(name, ready):
    st = Store.open(name)
    st._lock()
    st._batch_begin()
    st["half"] = "written"
    ready.set()
    time.sleep(60)


def test_dead_lock_holder_is_recovered_automatically(name):
    with Store(name, timeout=10) as st:
        st["kept"] = 1
        ready = SPAWN.Event()
        p = spawn(_hold_lock_and_die, name, ready)
        assert ready.wait(30)
        assert st["kept"] == 1  # readers never wait for the writer
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        st["after"] = 2  # takes the lock over and repairs first
        assert "half" not in st and st["kept"] == 1
        assert st.statistics()["recoveries"] == 1
        st.verify()


def test_write_times_out_behind_a_long_batch(name):
    with Store(name) as st:
        ready = SPAWN.Event()
        p = spawn(_hold_lock_and_die, name, ready)
        try:
            assert ready.wait(30)
            other = Store.open(name, timeout=0.2)
            t0 = time.monotonic()
            with pytest.raises(shmkit.Timeout):
                other["x"] = 1
            assert time.monotonic() - t0 < 5
            other.close()
        finally:
            p.kill()
            p.join()
        st["x"] = 1
        st.verify()


def _put_in_a_batch(st: Store) -> None:
    with st.batch():
        st["b"] = 1


_SECOND_HANDLE_WRITES = {
    "set": lambda b: b.__setitem__("b", 1),
    "add": lambda b: b.add("b", 1),
    "del": lambda b: b.__delitem__("kept"),
    "pop": lambda b: b.pop("kept"),
    "update": lambda b: b.update({"b": 1, "c": 2}),
    "batch": lambda b: _put_in_a_batch(b),
    "clear": lambda b: b.clear(),
}


@pytest.mark.parametrize("op", sorted(_SECOND_HANDLE_WRITES))
def test_a_second_handle_used_by_the_thread_in_a_batch_is_refused_at_once(name, op):
    # The batch's lock can only be let go by this thread: waiting for it
    # through another handle of the store would be waiting for ever (or, with
    # a timeout, a Timeout that blames nobody else).
    with Store(name) as a, Store.open(name, timeout=10.0) as b:
        a["kept"] = 0
        with a.batch():
            a["in batch"] = 1
            t0 = time.monotonic()
            with pytest.raises(BusyError, match="another handle"):
                _SECOND_HANDLE_WRITES[op](b)
            assert time.monotonic() - t0 < 5
            a["in batch too"] = 2
        assert dict(b.items()) == {"kept": 0, "in batch": 1, "in batch too": 2}
        _SECOND_HANDLE_WRITES[op](b)  # the lock is free again
        a.verify()


def test_a_second_handle_is_refused_after_the_holding_one_closed_in_its_batch(name):
    # Closing the first handle inside its batch lets go of its file, not of
    # the lock, which the block's end releases: the second handle must still
    # know whose lock it is.
    with Store(name) as keep, Store.open(name, timeout=10.0) as b:
        a = Store.open(name)
        with a.batch():
            a["in batch"] = 1
            a.close()
            t0 = time.monotonic()
            with pytest.raises(BusyError, match="another handle"):
                b["b"] = 1
            assert time.monotonic() - t0 < 5
        b["b"] = 1  # the block's end released it
        assert dict(keep.items()) == {"in batch": 1, "b": 1}
        keep.verify()


def test_a_ctrl_c_at_any_step_of_a_growth_never_leaves_room_the_store_cannot_use():
    # A Ctrl-C in the grow hook after the segment grew, before the store's
    # heap took the room: the next growth doubled the segment again from
    # its new size, so a store whose growth reached max_size said "full"
    # for good with half its memory unused.
    import shmkit.store as store_module
    store_py = store_module.__file__
    value = b"v" * 100
    gc.disable()  # (no collector callback, another library's, to take the interrupt)
    try:
        _grow_under_interrupts(store_py, value)
    finally:
        gc.enable()


def _grow_under_interrupts(store_py: str, value: bytes) -> None:
    for k in range(1, 2000):
        with shmkit.Store(None, size=64 << 10, max_size=128 << 10) as st:
            seen = interrupt_at_bytecode(k, lambda c: c.co_filename == store_py)
            interrupted = None
            try:
                for i in range(500):  # ~80 KiB of records: more than 64 KiB holds
                    interrupted = i
                    st[f"key{i:05d}"] = value
                interrupted = None
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            for i in range(500):  # the rest, and again what may not have landed
                st[f"key{i:05d}"] = value
            assert len(st) == 500 and st.verify()["records"] == 500
            if seen[0] < k:
                assert interrupted is None
                break
    else:
        raise AssertionError("the puts never ran to their end")
    assert k > 3


def _in_thread_of_a_reused_identifier(first: Any, then: Any) -> Any:
    """Run first() in a thread that ends, then then() in a new thread given
    the same threading.get_ident() (glibc hands an ended thread's identifier
    to the next); returns what then() returned or raised."""
    idents: list[int] = []
    out: list[Any] = []

    def run(fn: Any) -> None:
        idents.append(threading.get_ident())
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, args=(first,))
    t.start()
    t.join()
    for _ in range(50):  # until the identifier is given again
        t = threading.Thread(target=run, args=(then,))
        t.start()
        t.join(30)
        if idents[-1] == idents[0]:
            return out[-1]
        out.pop()
        idents.pop()
    pytest.skip("no thread was given the ended thread's identifier again")


def test_a_new_thread_never_passes_for_an_ended_one_that_left_its_batch_open(name):
    # A thread that entered a batch and ended without leaving it: the next
    # thread got its identifier and wrote inside that batch, as the batch's
    # own thread.  It now waits for the lock as any other thread does.
    with shmkit.Store(name, timeout=0.3) as st:
        st["kept"] = 1
        left: list[Any] = []

        def open_batch() -> None:
            b = st.batch()
            b.__enter__()
            st["staged"] = 2
            left.append(b)

        def write() -> str:
            st["other"] = 3
            return "wrote"

        got = _in_thread_of_a_reused_identifier(open_batch, write)
        assert isinstance(got, shmkit.Timeout), got
        assert st.get("other") is None and st.get("staged") is None and st["kept"] == 1
        left.pop().__exit__(None, None, None)  # left here, it ends here: published
        assert st["staged"] == 2
        st["other"] = 3


@pytest.mark.parametrize("how", ["closed", "freed"])
def test_a_batch_whose_block_ends_in_another_thread_ends_there(name, how):
    # A generator suspended inside `with st.batch():`, closed (or freed) by
    # another thread: the block's exit there was refused, the batch stayed
    # open with the lock held for the process's life, and the thread that
    # opened it wrote into it afterwards, never to be published.
    with shmkit.Store(name, timeout=2) as st:
        def gen() -> Any:
            with st.batch():
                st["in generator"] = 1
                yield

        handed: list[Any] = []
        opened, closed, wrote = threading.Event(), threading.Event(), threading.Event()

        def opener() -> None:
            handed.append(gen())  # (held by the list alone)
            next(handed[0])
            opened.set()
            closed.wait(30)
            st["opener after"] = 2  # not into the batch that was discarded
            wrote.set()

        t = threading.Thread(target=opener)
        t.start()
        assert opened.wait(30)
        if how == "closed":
            handed.pop().close()  # GeneratorExit through the block: discarded
        else:
            handed.clear()  # freed unclosed: discarded as it goes
            gc.collect()
        st["here"] = 3  # the lock is free at once
        closed.set()
        assert wrote.wait(30)
        t.join()
        assert "in generator" not in st and st["here"] == 3 and st["opener after"] == 2
        with shmkit.Store.open(name) as other:  # published, for every handle
            assert dict(other.items()) == {"here": 3, "opener after": 2}


def test_a_copy_of_the_stores_file_is_not_taken_for_the_store(tmp_path):
    # A copy made while this thread held the store's batch carries the same
    # hash seed, the holder's token in its lock word and the holder's entry
    # (this pid): its lock is nobody's, and is taken over as a dead holder's.
    original, copy = tmp_path / "a.store", tmp_path / "b.store"
    with Store(path=original) as a:
        with a.batch():
            a["in batch"] = 1
            shutil.copyfile(original, copy)
            with Store(path=copy, timeout=10.0) as b:
                b["y"] = 2  # not BusyError: the copy's lock is not a's
                assert b["y"] == 2
                b.verify()
        assert a["in batch"] == 1


def test_a_second_handle_used_by_another_thread_waits_for_the_batch(name):
    with Store(name) as a, Store.open(name, timeout=30.0) as b:
        done: list[BaseException | None] = []

        def write() -> None:
            try:
                b["from the thread"] = 1
                done.append(None)
            except BaseException as e:  # pragma: no cover - reported below
                done.append(e)
        with a.batch():
            a["in batch"] = 1
            th = threading.Thread(target=write)
            th.start()
            th.join(0.3)
            assert th.is_alive() and not done  # it waits for this batch
        th.join(30)
        assert done == [None]
        assert dict(a.items()) == {"in batch": 1, "from the thread": 1}


class _WritesThroughAnotherHandle:
    """A value whose unpickling writes through ``handle``."""

    handle: Store | None = None

    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        assert _WritesThroughAnotherHandle.handle is not None
        _WritesThroughAnotherHandle.handle["from setstate"] = 1


def test_a_batch_ends_elsewhere_only_when_its_thread_is_between_operations(name):
    # Another thread could end a batch while its thread copied a big value
    # out (get_into lets the GIL go for 64 KiB and more): the block was freed
    # and could be taken by the next put mid-copy, and get_into returned a
    # mix of both.  Nor may it end one with another batch, or the lock,
    # taken inside it.
    big = 64 << 20
    first, second = b"B" * big, b"C" * big
    refused_mid_copy = 0
    with Store(name, size=100 << 20, max_size=100 << 20) as st:  # room for one value
        for _ in range(3):
            b = st.batch()
            buf = bytearray(big)
            copied: list[Any] = []
            started = threading.Event()

            def owner() -> None:
                b.__enter__()
                st["k"] = first
                started.set()
                try:
                    copied.append(st.get_into("k", buf))
                except KeyError:  # (the batch ended before the read began)
                    copied.append(None)

            t = threading.Thread(target=owner)
            t.start()
            assert started.wait(30)
            time.sleep(0.001)  # into the copy (a few ms)
            while True:  # ended once the owner is out of its read
                try:
                    b.__exit__(ValueError, ValueError("discard"), None)
                    break
                except RuntimeError as e:
                    assert "in the middle of an operation" in str(e)
                    refused_mid_copy += 1
            st["other"] = second  # in the block the discarded value freed
            t.join()
            assert copied == [None] or (copied == [big] and buf.count(b"B"[0]) == big)
            assert "k" not in st
            del st["other"]
        assert refused_mid_copy > 0

        outer, inner = st.batch(), st.batch()
        left: list[BaseException] = []
        outer.__enter__()
        st["outer"] = 1
        inner.__enter__()
        st["inner"] = 2

        def leave_outer() -> None:
            try:
                outer.__exit__(ValueError, ValueError("discard"), None)
            except RuntimeError as e:
                left.append(e)
        other = threading.Thread(target=leave_outer)
        other.start()
        other.join()
        assert "another batch open inside it" in str(left[0])
        inner.__exit__(None, None, None)
        outer.__exit__(ValueError, ValueError("discard"), None)  # in its thread: discarded
        assert "outer" not in st and "inner" not in st


def test_an_outer_block_that_ends_with_an_error_first_discards_the_whole_batch(name):
    # Two generators' blocks, the second joining the first's batch: the
    # first closed (an error: GeneratorExit) while the second was open only
    # lowered the depth, and the second's end then published both blocks'
    # writes, in its thread or another's.
    with Store(name) as st, Store.open(name) as other:
        def gen(key: str) -> Any:
            with st.batch():
                st[key] = 1
                yield

        for where in ("here", "another thread"):
            g1, g2 = gen("g1"), gen("g2")
            next(g1)
            next(g2)
            g1.close()
            errors: list[BaseException] = []

            def finish() -> None:
                try:
                    next(g2, None)
                except RuntimeError as e:
                    errors.append(e)
            if where == "here":
                finish()
            else:
                t = threading.Thread(target=finish)
                t.start()
                t.join()
            assert "discarded" in str(errors[0]), where
            assert "g1" not in other and "g2" not in other, where
            st["after"] = 1  # the lock is free
            del st["after"]


def test_a_batch_freed_in_its_thread_under_a_nested_one_discards_it_all(name):
    # The outer batch object freed by the collector while update()'s own
    # batch was open inside it: its discard only lowered the depth, and the
    # update's end published the outer batch's writes.
    with Store(name) as st, Store.open(name) as other:
        b = st.batch()
        b.__enter__()
        st["outer"] = 1
        cycle: list[Any] = [b]
        cycle.append(cycle)
        del b, cycle

        def pairs() -> Any:
            yield "u", 1
            gc.collect()
            yield "v", 2
        with pytest.raises(RuntimeError, match="discarded"):
            st.update(pairs())
        assert dict(other.items()) == {}
        st["after"] = 1  # the lock is free
        assert dict(other.items()) == {"after": 1}


def test_a_child_forked_in_the_grow_hook_while_a_batch_commits_exits_cleanly(monkeypatch):
    # The child came back into the commit with the batch's staged puts let
    # go by the fork hook, and crashed moving them.
    import shmkit.store as store_module
    real = store_module._grow
    armed = [False]

    def grow(seg: Any, timeout: Any, need: int) -> None:
        if armed[0]:
            armed[0] = False
            if os.fork() == 0:
                try:
                    real(seg, timeout, need)
                finally:
                    armed.append("child")
                return
        real(seg, timeout, need)
    monkeypatch.setattr(store_module, "_grow", grow)
    with Store(None, size=64 << 10) as st:
        b = st.batch()
        b.__enter__()
        n = 0
        while st.statistics()["largest_free"] > 16 * (n + 1) + 64:
            st[f"k{n}"] = b"v" * 48
            n += 1
        armed[0] = True  # the commit's journal needs room: the hook forks
        try:
            b.__exit__(None, None, None)
        except RuntimeError as e:
            assert "child" in armed and "forked" in str(e)
            os._exit(0)
        if "child" in armed:
            os._exit(3)  # the child must not finish the parent's commit
        _, status = os.wait()
        assert os.waitstatus_to_exitcode(status) == 0
        assert all(st[f"k{i}"] == b"v" * 48 for i in range(n))
        st.verify()


class _EndsItsBatchElsewhere:
    """A value whose unpickling has another thread leave ``batch``."""

    batch: Any = None
    errors: list[BaseException] = []

    def __init__(self) -> None:
        self.state = 1  # (some state, so that unpickling calls __setstate__)

    def __setstate__(self, state: dict) -> None:
        def leave() -> None:
            try:
                _EndsItsBatchElsewhere.batch.__exit__(None, None, None)
            except RuntimeError as e:
                _EndsItsBatchElsewhere.errors.append(e)
        t = threading.Thread(target=leave)
        t.start()
        t.join()


def test_another_thread_cannot_end_a_batch_whose_thread_is_mid_operation(name):
    with Store(name, codec="pickle") as st:
        st["k"] = _EndsItsBatchElsewhere()
        b = _EndsItsBatchElsewhere.batch = st.batch()
        try:
            b.__enter__()
            st["staged"] = 1
            st.pop("k")  # its unpickling runs under the lock, in the batch
        finally:
            _EndsItsBatchElsewhere.batch = None
        [error] = _EndsItsBatchElsewhere.errors
        assert "in the middle of an operation" in str(error)
        b.__exit__(None, None, None)  # still open: left here, published
        assert dict(st.items()) == {"staged": 1}
        st.verify()


def test_a_second_handle_used_while_pop_decodes_under_the_lock_is_refused(name):
    with Store(name, codec="pickle") as a, Store.open(name, timeout=10.0) as b:
        a["k"] = _WritesThroughAnotherHandle()
        _WritesThroughAnotherHandle.handle = b
        try:
            t0 = time.monotonic()
            with pytest.raises(BusyError, match="another handle"):
                a.pop("k")
            assert time.monotonic() - t0 < 5
        finally:
            _WritesThroughAnotherHandle.handle = None
        assert list(a.keys()) == ["k"]  # nothing was lost
        a.verify()


def test_a_child_forked_in_a_batch_holds_nothing_of_its_parents(names, monkeypatch):
    # The list of handles that hold their lock is the parent's: a child starts
    # with none, so it never walks to a handle it freed (which the debug
    # allocator fills with a pattern that crashes the walk), nor takes the
    # parent's batch for its own thread's.
    monkeypatch.setenv("PYTHONMALLOC", "debug")
    run_python("""
        import gc, os, sys, time
        from shmkit import Store
        with Store(sys.argv[1]) as st, Store(sys.argv[2]) as other:
            h = Store.open(sys.argv[1])
            pid = -1
            try:
                with h.batch():
                    h["parent"] = 1
                    pid = os.fork()
                    if pid > 0:
                        time.sleep(0.3)
            except RuntimeError as e:
                if pid != 0:
                    raise
                code = 3
                try:  # the child: free the handle its parent's batch listed
                    told = "forked" in str(e)
                    b = Store.open(sys.argv[1], timeout=30.0)  # not in h's memory
                    h.close()
                    del h, e
                    gc.collect()
                    with other.batch():
                        other["child"] = 1
                    b["child"] = 2  # waits for the parent's batch to end
                    b.close()
                    code = 0 if told else 4
                finally:
                    os._exit(code)
            if pid == 0:
                os._exit(5)
            h.close()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            assert st["parent"] == 1 and st["child"] == 2 and other["child"] == 1
            st.verify()
            st.unlink()
            other.unlink()
    """, names(), names())


def test_a_handle_freed_while_listed_as_holding_is_forgotten(names, monkeypatch):
    # A handle whose holding was reset without a release (the fork hook's
    # reset, called here in the parent) and then freed must leave the list:
    # the debug allocator's pattern in freed memory crashes a walk through it.
    monkeypatch.setenv("PYTHONMALLOC", "debug")
    run_python("""
        import gc, sys, threading
        import shmkit
        from shmkit import Store
        first, second = sys.argv[1], sys.argv[2]
        with Store(first) as keep, Store(second) as other:
            b = Store.open(second, timeout=0.3)  # made first: not in a's memory
            a = Store.open(first)
            a._lock()
            a._after_fork()
            a.close()
            del a
            gc.collect()
            held, done = threading.Event(), threading.Event()

            def hold():
                with other.batch():  # listed ahead of what is left of a
                    held.set()
                    done.wait(30)
            t = threading.Thread(target=hold)
            t.start()
            assert held.wait(30)
            try:
                b["x"] = 2  # walks the whole list: another thread holds the lock
            except shmkit.Timeout:
                pass
            else:
                raise AssertionError("b's write did not wait for the batch")
            done.set()
            t.join()
            b.close()
            keep.unlink()
            other.unlink()
    """, names(), names())


def test_odd_epoch_readers_time_out_while_the_writer_lives_and_repair_after(name):
    with Store(name, timeout=0.3) as st:
        st["kept"] = 1
        ready = SPAWN.Event()
        p = spawn(_hold_lock_and_die, name, ready)
        try:
            assert ready.wait(30)
            poke(st, 0, u64(st._seg.buf, 0) + 1)  # "publishing", by a live writer
            ro = Store.open(name, readonly=True, timeout=0.3)
            for op in (lambda: st["kept"], lambda: ro["kept"], lambda: list(ro.items())):
                t0 = time.monotonic()
                with pytest.raises(shmkit.Timeout, match="batch"):
                    op()
                assert 0.25 < time.monotonic() - t0 < 5
        finally:
            p.kill()
            p.join()
        # the publisher is dead: readonly readers say so, a writable one repairs
        with pytest.raises(BusyError, match="died"):
            list(ro.items())
        assert st["kept"] == 1 and "half" not in st
        assert st.statistics()["recoveries"] == 1
        assert ro["kept"] == 1
        ro.close()
        st.verify()


def _interrupted_at_random(op, rounds, seed):
    """Run op() in a loop until a one-shot timer's handler raises
    KeyboardInterrupt (as Ctrl-C does), `rounds` times, each 20-300 µs in;
    yield after each interrupt, with no timer armed."""
    rng = random.Random(seed)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        for _ in range(rounds):
            try:  # the timer may fire as setitimer returns, on a busy machine
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(20e-6, 300e-6))
                while True:
                    op()
            except KeyboardInterrupt:
                pass
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("op", ["batch", "vacuum"])
def test_ctrl_c_at_any_moment_leaves_no_batch_open_and_no_lock_held(name, op):
    # An interrupt right after the batch is opened (or vacuum takes the
    # lock) used to fall outside the code that closes it: the thread kept
    # the batch, its later writes joined a batch never published, and other
    # writers waited for the lock.
    with Store(name, size=64 << 10, timeout=2.0) as st:
        for i in range(50):
            st[i] = b"x" * 100
        i = 0

        def one():
            nonlocal i
            i += 1
            if op == "batch":
                with st.batch():
                    st[i % 50] = b"y" * (i % 100)
            else:
                st.vacuum()
        left_open = 0
        for _ in _interrupted_at_random(one, 1500, seed=7):
            try:
                st._batch_end(False) if op == "batch" else st._unlock()
                left_open += 1
            except RuntimeError as e:
                assert "no batch is open" in str(e) or "not held" in str(e)
        assert left_open == 0, f"{left_open} of 1500 interrupts left the lock held ({op})"
        assert len(st) == 50
        st.verify()
        run_python(f"""
            import shmkit
            with shmkit.Store.open({name!r}, timeout=2.0) as st:
                st["from another process"] = 1
        """)
        assert st["from another process"] == 1


def test_vacuum_and_dropped_batches_respect_the_lock_holder(name):
    with Store(name, timeout=0.3) as st:
        st["a"] = 1
        st._lock()
        errors = []

        def other():
            try:
                st.vacuum()  # another thread: it waits for the lock
            except shmkit.Timeout as e:
                errors.append(e)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        st._unlock()
        assert len(errors) == 1 and "lock" in str(errors[0])
        with st.batch():
            with pytest.raises(RuntimeError, match="inside a batch"):
                st.vacuum()
        st.verify()
    # a Store dropped with a batch open gives the batch's blocks back
    code = f"""
        import shmkit
        st = shmkit.Store.open({name!r})
        st._batch_begin()
        for i in range(100):
            st[i] = b"x" * 100
        del st
        st = shmkit.Store.open({name!r})
        st.verify()
        print(len(st))
    """
    assert run_python(code).stdout.split() == ["1"]


def test_fork_child_uses_the_store(name):
    with Store(name) as st:
        st["parent"] = 1
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                st["child"] = st["parent"] + 1
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert st["child"] == 2


@pytest.mark.parametrize("leaves", ["normally", "by raising"])
def test_a_child_forked_inside_a_batch_is_told_the_batch_is_the_parents(name, leaves):
    # The child holds none of the parent's batch: leaving the block says so,
    # an error raised in it passes through as it is, and the parent's batch
    # publishes untouched.
    with Store(name, timeout=10.0) as st:
        pid = -1
        try:
            with st.batch():
                st["parent"] = 1
                pid = os.fork()
                if pid == 0 and leaves == "by raising":
                    raise LookupError("the block's own error")
                if pid > 0:
                    _, status = os.waitpid(pid, 0)
                    assert os.waitstatus_to_exitcode(status) == 0
                    st["parent too"] = 2
        except BaseException as e:
            if pid != 0:
                raise
            expected = (LookupError if leaves == "by raising" else RuntimeError,
                        "the block's own error" if leaves == "by raising" else "forked")
            os._exit(0 if type(e) is expected[0] and expected[1] in str(e) else 3)
        if pid == 0:  # pragma: no cover - the child left the block with no error
            os._exit(5)
        assert st["parent"] == 1 and st["parent too"] == 2
        st["after"] = 3  # the lock is free
        st.verify()


def _told_of_the_fork_inside_its_batch(st: Store) -> bool:
    """Whether a child forked inside a batch of ``st`` is told the batch is
    its parent's when it leaves the block."""
    pid = -1
    try:
        with st.batch():
            st["in batch"] = 1
            pid = os.fork()
            if pid > 0:
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status) == 0
    except BaseException as e:
        if pid != 0:
            raise
        os._exit(0 if type(e) is RuntimeError and "forked" in str(e) else 3)
    if pid == 0:  # the child left the parent's batch with no error
        os._exit(5)
    return False


def test_the_fork_hook_forgets_closed_and_dropped_handles_and_still_finds_open_ones(name):
    # The child's fork hook reaches every open store through a registry that
    # close() and a dropped handle leave; a handle made where a dropped one's
    # entry was (the same id) is still reached.
    from shmkit import store as store_module
    live = store_module._live
    before = len(live)
    with Store(name, timeout=10.0) as st:
        assert len(live) == before + 1
        for _ in range(200):
            Store.open(name)  # dropped unclosed
        closed = Store.open(name)
        closed.close()
        assert len(live) == before + 1
        other = Store.open(name, timeout=10.0)
        assert len(live) == before + 2
        assert _told_of_the_fork_inside_its_batch(other)
        other.close()
        assert st["in batch"] == 1
    assert len(live) == before
    del closed, other, st


def test_a_store_opened_while_a_dropped_one_is_collected_is_still_reset_in_a_child():
    # A store in a reference cycle is collected: its weak reference's
    # callback, then its close from __del__, each remove its entry.  A store
    # opened in between (here by another object's __del__ in the same pass)
    # must keep its own.
    opened: list[Store] = []

    class OpensOne:
        def __del__(self) -> None:
            opened.append(Store(None, timeout=10.0))

    try:
        for _ in range(20):
            opener = OpensOne()  # (made first: its __del__ runs first)
            dropped = Store(None)
            dropped.cycle, opener.store = opener, dropped
            del dropped, opener
            gc.collect()
        assert len(opened) == 20
        assert all(_told_of_the_fork_inside_its_batch(st) for st in opened)
    finally:
        for st in opened:
            st.close()


def test_two_threads_closing_one_store_leave_the_others_reset_in_a_child():
    stop = threading.Event()
    opened: list[Store] = []

    def close_twice() -> None:
        while not stop.is_set():
            st = Store(None)
            both = [threading.Thread(target=st.close) for _ in range(2)]
            for t in both:
                t.start()
            for t in both:
                t.join()

    closer = threading.Thread(target=close_twice)
    closer.start()
    try:
        for _ in range(300):
            opened.append(Store(None, timeout=10.0))
    finally:
        stop.set()
        closer.join()
    try:
        assert all(_told_of_the_fork_inside_its_batch(st) for st in opened[::10])
        from shmkit import store as store_module
        assert all(store_module._live.get(id(st._live_ref)) is st._live_ref for st in opened)
    finally:
        for st in opened:
            st.close()


def test_a_batch_object_is_entered_once_and_discarded_when_dropped_open(name):
    with Store(name, timeout=1.0) as st:
        b = st.batch()
        with b as same:
            assert same is st
            st["a"] = 1
        with pytest.raises(RuntimeError, match="entered once"):
            with b:
                pass
        with pytest.raises(RuntimeError, match="not open"):
            b.__exit__(None, None, None)
        b = st.batch()
        b.__enter__()
        st["c"] = 3
        errors = []

        def exit_here():
            try:
                b.__exit__(None, None, None)
            except RuntimeError as e:
                errors.append(e)
        other = threading.Thread(target=exit_here)
        other.start()
        other.join()
        assert errors == [] and st["c"] == 3  # left in another thread, it ends there
        with pytest.raises(RuntimeError, match="not open"):
            b.__exit__(None, None, None)
        b = st.batch()
        b.__enter__()  # and never left: dropping it discards the batch
        st["lost"] = 1
        del b
        assert "lost" not in st and st["a"] == 1
        run_python(f"""
            import shmkit
            with shmkit.Store.open({name!r}, timeout=1.0) as st:
                st["b"] = 2  # the lock was released
        """)
        st.verify()


def test_hash_is_stable_and_seeded():
    h = shmkit._core.table_hash
    assert h(b"abc", 1) == h(b"abc", 1)
    assert h(b"abc", 1) != h(b"abc", 2) and h(b"abc", 1) != h(b"abd", 1)
    seen = {h(bytes([i]) * n, 0) for i in range(256) for n in range(0, 70, 7)}
    assert len(seen) == 256 * 10 - 255  # all distinct except the 256 empty strings


def _grow_and_vacuum_writer(name, seconds):
    # Fill the store past its size (it grows), empty it, vacuum (it shrinks),
    # again and again: new records keep landing beyond the heap end an
    # iterating reader loaded a moment before.
    st = Store.open(name)
    deadline = time.monotonic() + seconds
    gen = 0
    while time.monotonic() < deadline:
        gen += 1
        for k in range(2000, 2400):
            st[k] = bytes([gen & 255]) * 300
        for k in range(2000, 2400):
            del st[k]
        st.vacuum()
    st.close()


def test_iteration_races_growth_after_vacuum_without_false_corruption(name):
    with Store(name, size=16 << 10) as st:
        for k in range(50):
            st[k] = k * 3  # these stay for the whole test
        p = spawn(_grow_and_vacuum_writer, name, 4.0)
        try:
            deadline = time.monotonic() + 3.5
            rounds = 0
            while time.monotonic() < deadline:
                items = dict(st.items())  # raised CorruptError before the fix
                assert all(items[k] == k * 3 for k in range(50))
                rounds += 1
        finally:
            p.join(60)
        assert p.exitcode == 0 and rounds >= 1
        st.verify()


def test_a_scan_restarts_when_a_new_index_reuses_an_old_ones_place(name):
    # An iteration resumes with the token of the index it was reading; a new
    # index placed where an earlier one was freed must not pass for it
    # (before the fix the token was the offset: iteration went on through a
    # different index, giving keys twice or missing some).
    with Store(name, size=16 << 10) as st:
        tokens, places = [], set()
        for _ in range(400):
            st.clear()
            st["a"] = 1
            tokens.append(st._scan(0, 0, 1, 0)[1])
            places.add(tokens[-1] & ((1 << 40) - 1))
        assert len(places) < len(tokens)  # places were reused
        assert all(st._scan(tok, 0, 1, 0) is None for tok in tokens[:-1])
        assert st._scan(tokens[-1], 0, 1, 0) is not None
