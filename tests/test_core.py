"""The compiled core's shared layers: the robust lock's held registry, as used by the
ring; attachments; layouts."""

from __future__ import annotations

import struct
import threading
import time
import warnings

import pytest

import shmkit
from shmkit import _core
from shmkit.channel import Channel
from shmkit.errors import OwnerDiedWarning

PLOCK, CLOCK = 80, 160  # the ring's producers' and consumers' lock words


def _hold_while(lock: _core.Lock, held: threading.Event, go: threading.Event) -> None:
    with lock:
        held.set()
        go.wait(10)
        time.sleep(0.02)  # the sender is asleep on the word by now


def _contended_sends(ch: Channel, n: int) -> None:
    """n sends, each finding the producers' lock held by another thread of ours."""
    m = ch._seg._mapping
    lock = _core.Lock(m, ch._seg._hsize + PLOCK)
    for i in range(n):
        held, go = threading.Event(), threading.Event()
        t = threading.Thread(target=_hold_while, args=(lock, held, go))
        t.start()
        assert held.wait(10)
        go.set()
        ch.send(b"m%d" % i, timeout=10)
        t.join(10)


def test_held_list_does_not_grow_across_contended_sends(name):
    ch = Channel(name, capacity=64 << 10)
    m = ch._seg._mapping
    _contended_sends(ch, 50)
    assert m.held_count == 0
    assert [ch.recv(timeout=5) for _ in range(50)] == [b"m%d" % i for i in range(50)]
    assert m.held_count == 0
    ch.close()


def test_own_token_left_on_a_lock_is_taken_over_after_contended_sends(name):
    """A lock word carrying our token that no thread of ours holds is damage, taken
    over at once.  A holding left recorded by an earlier contended send hid it, and
    the send waited for a holder that does not exist."""
    ch = Channel(name, capacity=64 << 10)
    m, hs = ch._seg._mapping, ch._seg._hsize
    _contended_sends(ch, 5)
    _core.store32(m, hs + PLOCK, ch._seg._token)
    ch.send(b"after", timeout=2)
    assert _core.load32(m, hs + PLOCK) == 0
    assert [ch.recv(timeout=5) for _ in range(6)][-1] == b"after"
    ch.close()


def test_threads_of_one_handle_never_take_the_lock_from_each_other(name):
    """Senders and receivers in threads of one process, on one handle, under
    contention (a small ring, a thread holding the producers' lock now and then):
    every message exactly once, in order per sender, no takeover reported."""
    ch = Channel(name, capacity=2048)
    m, hs = ch._seg._mapping, ch._seg._hsize
    n, senders = 1500, 3
    got: dict[int, list[int]] = {k: [] for k in range(senders)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def send(k: int) -> None:
        try:
            for i in range(n):
                ch.send(struct.pack("II", k, i), timeout=30)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def recv() -> None:
        try:
            while True:
                for msg in ch.recv_many(max_n=7, timeout=30):
                    k, i = struct.unpack("II", msg)
                    got[k].append(i)
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ != "ChannelClosed":
                errors.append(e)

    def meddle() -> None:
        lock = _core.Lock(m, hs + PLOCK)
        clock = _core.Lock(m, hs + CLOCK)
        while not stop.is_set():
            with lock:
                time.sleep(0.0005)
            with clock:
                time.sleep(0.0005)

    with warnings.catch_warnings():
        warnings.simplefilter("error", OwnerDiedWarning)
        ss = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
        rs = [threading.Thread(target=recv) for _ in range(2)]
        md = threading.Thread(target=meddle)
        for t in ss + rs + [md]:
            t.start()
        for t in ss:
            t.join(120)
        stop.set()
        md.join(10)
        ch._close_sending()
        for t in rs:
            t.join(30)
    assert not errors, errors
    for k in range(senders):
        assert sorted(got[k]) == list(range(n)), "each message exactly once"
    assert m.held_count == 0
    ch.close()


# ---- attachments ----------------------------------------------------------


def test_mapping_token_and_fd_are_read_only(name):
    import shmkit

    seg = shmkit.Segment(name, size=4096)
    m = seg._mapping
    token, fd = m.token, m.fd
    with pytest.raises(AttributeError):
        m.token = token ^ 1
    with pytest.raises(AttributeError):
        m.fd = 0
    assert (m.token, m.fd) == (token, fd) and token != 0
    seg.close()
    assert (m.token, m.fd) == (0, -1)


def test_attach_entry_is_decoded_in_c(name):
    import os

    import shmkit

    seg = shmkit.Segment(name, size=4096)
    slot = seg._token & 0x3FF
    e = _core.attach_entry(seg._mapping, slot)
    assert e["pid"] == os.getpid() and e["alive"] and e["gen"] == seg._token >> 10
    assert abs(e["attached"] - time.time()) < 600
    assert _core.token_owner_pid(seg._mapping, seg._token) == os.getpid()
    assert _core.attach_entry(seg._mapping, 1 << 20) is None
    assert [a["slot"] for a in seg.attachments()] == [slot]
    seg.close()


# ---- layouts ----------------------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402
import struct as _struct  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _doc_offsets(doc: str, start: str) -> dict[str, int]:
    """``offset name`` pairs of the first fenced block after the line ``start``."""
    text = open(os.path.join(DOCS, doc), encoding="utf-8").read()
    block = text[text.index(start):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    out: dict[str, int] = {}
    for line in block.splitlines():
        for off, field in re.findall(r"(?:^|\s{2,})(\d+)\s+([a-z_]+)", line):
            out.setdefault(field, int(off))
    return out


def test_segment_header_table_in_docs_matches_the_core():
    hdr = _core.layouts["segment"]
    doc = _doc_offsets("architecture.md", "### File layout")
    doc["attach_table"] = doc.pop("attach")
    fields = {k: v for k, v in hdr.items() if k not in ("format_version", "bytes")}
    assert {k: doc.get(k) for k in fields} == fields
    assert hdr["bytes"] == hdr["attach_table"] == 4096


def test_ring_table_in_docs_matches_the_core():
    ring = _core.layouts["ring"]
    doc = _doc_offsets("channel.md", "## Layout")
    doc["roles"] = doc.pop("role")
    fields = {k: v for k, v in ring.items() if k not in ("format_version", "bytes")}
    fields.pop("data_sleepers")
    fields.pop("space_sleepers")  # on the same line as their sequence words
    assert {k: doc.get(k) for k in fields} == fields
    assert ring["format_version"] == _core.RING_FORMAT


def test_python_constants_come_from_the_core():
    from shmkit import channel, segment

    hdr = _core.layouts["segment"]
    assert segment._OFF_HWM == hdr["hwm"] and segment._OFF_LOCK == hdr["lock"]
    assert segment.FORMAT_VERSION == hdr["format_version"]
    assert channel._ROLES_OFF == _core.layouts["ring"]["roles"]
    # the struct segment.py unpacks the header with agrees, field by field
    fmt = segment._HEADER.format.lstrip("=")
    codes = re.findall(r"\d*[a-zA-Z]", fmt)
    names = ["magic", "version", "kind", "flags", "max_slots", "hdr_size", "size",
             "max_size", "created", "creator", "lock", "resizes", "hwm", "layout_len"]
    for i, field in enumerate(names):
        assert _struct.calcsize("=" + "".join(codes[:i])) == hdr[field], field
    e = _core.layouts["attach_entry"]
    assert (e["gen"], e["pid"], e["attached"], e["comm"], e["bytes"]) == (0, 4, 8, 24, 64)


# -- the module's surface ---------------------------------------------------------


def _core_callables():
    import inspect as _inspect
    for name, obj in vars(_core).items():
        if isinstance(obj, type) and obj.__module__.startswith("shmkit"):
            for attr, f in vars(obj).items():
                if callable(f) and (not attr.startswith("__") or attr in ("__enter__", "__exit__")):
                    yield f"{name}.{attr}", f
        elif callable(obj) and not name.startswith("_"):
            yield name, obj
    del _inspect


def test_every_core_function_and_method_has_a_signature():
    import inspect
    missing = []
    for what, f in _core_callables():
        try:
            inspect.signature(f)
        except ValueError:
            missing.append(what)
    assert not missing, f"no text signature: {missing}"
    assert str(inspect.signature(_core.Table.pop)) == "(self, key, /, *default)"
    assert str(inspect.signature(_core.HeapCore)) == "(mapping, offset, length, name)"


def test_core_raises_the_classes_of_shmkit_errors_with_no_set_classes_call():
    from shmkit import errors
    assert not [n for n in dir(_core) if n.endswith("set_classes")]
    seg = shmkit.Segment(None, size=4096)
    try:
        ro = _core.Mapping(seg._fd, 8192, 8192, readonly=True)
        with pytest.raises(errors.ReadOnlyError):
            _core.store32(ro, 0, 1)
        ro.close()
        with pytest.raises(errors.ClosedError):
            _core.load32(ro, 0)
    finally:
        seg.close()


def test_big_int_keys_keep_their_stored_encoding():
    # int keys beyond 64 bits are stored as bit_length // 8 + 1 signed
    # little-endian bytes; stores made before must keep finding them
    with shmkit.Store(None) as st:
        for k in (2**64, 2**80, -2**80, 2**63, -2**63 - 1, 2**1000 + 7):
            st[k] = k
            off, voff = st._locate(k)
            n = k.bit_length() // 8 + 1
            raw = bytes(memoryview(st._seg._mapping)[voff - n:voff])
            assert raw == k.to_bytes(n, "little", signed=True)
            assert st[k] == k
