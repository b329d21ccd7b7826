"""Store.get_into, get_many, view and the readers' timeout, across real processes."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import shmkit
from shmkit import ReadOnlyError, Store, UnsupportedTypeError, ValueTooLargeError

from conftest import SPAWN, run_python, spawn


def poke(st: Store, off: int, value: int, size: int = 8) -> None:
    """Write a little-endian word into the store header (payload offset)."""
    view = st._seg.buf
    view[off:off + size] = value.to_bytes(size, "little")
    del view


def epoch(st: Store) -> int:
    view = st._seg.buf
    try:
        return int.from_bytes(view[0:8], "little")
    finally:
        del view


# -- get_into -----------------------------------------------------------------------

def test_get_into_copies_bytes_and_array_data(name):
    with Store(name) as st:
        st["b"] = b"hello"
        arr = np.arange(12, dtype=np.float32).reshape(3, 4)
        st["a"] = arr
        st["big"] = os.urandom(3 << 20)  # copied with the GIL released
        buf = bytearray(b"#" * 8)
        assert st.get_into("b", buf) == 5 and buf == b"hello###"
        out = np.zeros(12, dtype=np.float32)
        assert st.get_into("a", out) == 48 and (out.reshape(3, 4) == arr).all()
        big = bytearray(4 << 20)
        assert st.get_into("big", big) == 3 << 20
        assert bytes(big[:3 << 20]) == st["big"]
        assert st.get_into("b", memoryview(bytearray(5))) == 5
        st[b""] = b""
        assert st.get_into(b"", bytearray()) == 0


def test_get_into_refuses_bad_input_and_leaves_the_buffer_unchanged(name):
    with Store(name) as st:
        st["b"] = b"x" * 100
        st["i"] = 7
        st["s"] = "text"
        small = bytearray(b"0123456789")
        with pytest.raises(ValueTooLargeError, match="100 bytes.*only 10") as e:
            st.get_into("b", small)
        assert isinstance(e.value, ValueError)
        assert small == b"0123456789"
        with pytest.raises(KeyError):
            st.get_into("missing", small)
        for key, typename in (("i", "int"), ("s", "str")):
            with pytest.raises(UnsupportedTypeError, match=typename):
                st.get_into(key, bytearray(100))
        with pytest.raises(TypeError, match="writable"):
            st.get_into("b", b"x" * 200)  # read-only buffer
        with pytest.raises(TypeError, match="writable"):
            st.get_into("b", np.zeros((20, 20))[:, ::2])  # not contiguous
        assert st["b"] == b"x" * 100


# -- get_many -----------------------------------------------------------------------

def test_get_many_returns_values_in_order(name):
    with Store(name) as st:
        for i in range(100):
            st[i] = f"v{i}"
        keys = list(range(99, -1, -3))
        assert st.get_many(keys) == [f"v{i}" for i in keys]
        assert st.get_many(iter([1, 2])) == ["v1", "v2"]
        with pytest.raises(KeyError) as e:
            st.get_many([1, "absent", 2])
        assert e.value.args == ("absent",)
        assert st.get_many([1, "absent"], None) == ["v1", None]
        assert st.get_many([]) == []
        with pytest.raises(TypeError):
            st.get_many(5)


# -- views --------------------------------------------------------------------------

_CHURN = """
import sys
from shmkit import Store
st = Store.open(sys.argv[1])
for round in range(40):
    st["v"] = bytes([round % 251]) * (1 << 20)   # replaces the viewed record again and again
    for i in range(64):
        st[i] = bytes([round]) * 20000
del st["v"]
st.vacuum()
for i in range(64):
    st[i] = b"z" * 20000
st.vacuum()
print(st.statistics()["recycles"])
"""


def test_view_bytes_never_change_while_another_process_rewrites_deletes_and_vacuums(name):
    original = os.urandom(1 << 20)
    with Store(name) as st:
        st["v"] = original
        before = st.statistics()["recycles"]
        with st.view("v") as mv:
            assert mv.readonly and len(mv) == len(original)
            with pytest.raises(TypeError):
                mv[0] = 0
            run_python(_CHURN, name, timeout=120)
            assert "v" not in st
            assert bytes(mv) == original  # still the bytes it was taken on
            assert st.statistics()["recycles"] == before  # recycling waited
        st.verify()
        # released: the next vacuum recycles and gives the space back
        size = st._seg.size
        st.vacuum()
        assert st.statistics()["recycles"] > before
        assert st._seg.size < size
        st.verify()


def test_view_of_an_array_and_buffers_made_from_it(name):
    arr = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    with Store(name) as st:
        st["a"] = arr
        st["empty"] = np.zeros((0, 3))
        v = st.view("a")
        assert v.held and (v.array == arr).all() and v.array.shape == (2, 3, 4)
        assert not v.array.flags.writeable
        kept = v.array  # a buffer made from the view keeps the record held
        v.release()
        assert v.held
        st["a"] = 0
        st.vacuum()
        assert (kept == arr).all()
        del kept
        assert not v.held
        with pytest.raises(ValueError, match="released"):
            with v:
                pass
        with st.view_array("empty") as e:
            assert e.shape == (0, 3)
        st["b"] = b"abc"
        with pytest.raises(UnsupportedTypeError, match="not a numpy array"):
            with st.view_array("b"):
                pass
        st["i"] = 5
        with pytest.raises(UnsupportedTypeError, match="int"):
            st.view("i")
        with pytest.raises(KeyError):
            st.view("missing")
        st.vacuum()
        st.verify()
        # nothing is held any more: a recycle ran
        assert st._seg.buf[1024:4096].tobytes().count(0) >= 3072 - 4


def test_view_needs_a_writable_handle(name):
    with Store(name) as st:
        st["b"] = b"abc"
        with Store.open(name, readonly=True) as ro:
            with pytest.raises(ReadOnlyError, match="get_into"):
                ro.view("b")
            buf = bytearray(3)
            assert ro.get_into("b", buf) == 3 and buf == b"abc"


def _hold_view(name, ready):
    st = Store.open(name)
    v = st.view("v")
    assert v.held
    ready.set()
    time.sleep(120)


def test_a_process_killed_while_holding_a_view_does_not_block_recycling(name):
    with Store(name) as st:
        st["v"] = b"x" * 100000
        ready = SPAWN.Event()
        p = spawn(_hold_view, name, ready)
        try:
            assert ready.wait(60)
            before = st.statistics()["recycles"]
            del st["v"]
            st.vacuum()
            assert st.statistics()["recycles"] == before  # held by a live process
        finally:
            p.kill()
            p.join()
        st.vacuum()
        assert st.statistics()["recycles"] > before
        st.verify()


# -- readers and a frozen batch writer ---------------------------------------------

def _frozen_writer(name, ready, go):
    st = Store.open(name)
    st._lock()
    view = st._seg.buf
    e = int.from_bytes(view[0:8], "little")
    view[0:8] = (e + 1).to_bytes(8, "little")  # mid-batch: the epoch is odd
    ready.set()
    go.wait(120)
    view[0:8] = (e + 2).to_bytes(8, "little")
    del view
    st._unlock()
    time.sleep(120)


def test_a_stopped_batch_writer_makes_readers_time_out_naming_it(name):
    with Store(name, read_timeout=0.5) as st:
        st["kept"] = 1
        ready, go = SPAWN.Event(), SPAWN.Event()
        p = spawn(_frozen_writer, name, ready, go)
        try:
            assert ready.wait(60)
            os.kill(p.pid, signal.SIGSTOP)
            for op in (lambda: st["kept"], lambda: st.get_many(["kept"]),
                       lambda: st.get_into("kept", bytearray(8)), lambda: list(st)):
                t0 = time.monotonic()
                with pytest.raises(shmkit.Timeout, match=f"pid {p.pid}.*stopped"):
                    op()
                assert 0.4 < time.monotonic() - t0 < 30
            os.kill(p.pid, signal.SIGCONT)
            go.set()
            assert st["kept"] == 1  # waits for the writer to finish, then reads
            assert epoch(st) % 2 == 0
        finally:
            p.kill()
            p.join()


def test_a_killed_batch_writer_is_recovered_by_a_waiting_reader(name):
    with Store(name, read_timeout=60) as st:
        st["kept"] = 1
        ready, go = SPAWN.Event(), SPAWN.Event()
        p = spawn(_frozen_writer, name, ready, go)
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGSTOP)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        t0 = time.monotonic()
        assert st["kept"] == 1  # sees the holder dead, reads under the lock, repairs
        assert time.monotonic() - t0 < 30
        assert st.statistics()["recoveries"] == 1
        st.verify()


def test_read_timeout_is_checked(name):
    """By the one timeout rule (as for every wait), before the store is made."""
    for bad, error in (("1", TypeError), (float("nan"), ValueError), (True, TypeError)):
        with pytest.raises(error, match="^read_timeout must be a number of seconds"):
            Store(name, read_timeout=bad)
    assert not os.path.exists(shmkit.segment.segment_path(name))


def test_a_store_closed_while_a_view_is_out_refuses_every_call_and_keeps_the_view(name):
    # The view keeps the mapping: reads through the closed handle went on
    # working, and view() blamed its attach slot (ValueError) instead of
    # the close.
    st = Store(name, create=True)
    st["a"] = b"x" * 100
    held = st.view("a")
    view = held.__enter__()
    st.close()
    calls = {
        "get": lambda: st.get("a"), "put": lambda: st.__setitem__("b", b"y"),
        "del": lambda: st.__delitem__("a"), "len": lambda: len(st), "iter": lambda: list(st),
        "get_many": lambda: st.get_many(["a"]), "update": lambda: st.update({"c": 1}),
        "view": lambda: st.view("a").__enter__(), "contains": lambda: "a" in st,
    }
    for what, call in calls.items():
        with pytest.raises(shmkit.ClosedError, match="closed"):
            call()
    assert bytes(view) == b"x" * 100  # the view still reads what it held
    held.__exit__(None, None, None)
    with Store.open(name) as again:
        assert again["a"] == b"x" * 100 and "b" not in again and "c" not in again
