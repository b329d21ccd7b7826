"""What every structure promises, across kinds and real processes.

Each structure holds its segment and offers no way to resize, remap or
write outside its payload; an explicit parameter is honoured or refused;
``close()`` releases a handle; ``statistics()`` is one name; a Queue or
Channel handed to a child survives its parent; ``on_destroy`` runs once, in
the process that removes the name.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import pickle
import sys
import time
import types

import numpy as np
import pytest

import shmkit
from shmkit import _core
from shmkit.segment import Segment

from conftest import SPAWN, run_python, spawn


class Rec(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("tag", ctypes.c_char * 16)]


KINDS = ["struct", "array", "heap", "store", "channel", "queue"]


def make(kind: str, name: str | None, **kw):
    if kind == "struct":
        return shmkit.Struct(name, Rec, **kw)
    if kind == "array":
        return shmkit.Array(name, "f8", (4, 2), **kw)
    if kind == "heap":
        return shmkit.Heap(name, size=1 << 16, **kw)
    if kind == "store":
        return shmkit.Store(name, **kw)
    if kind == "channel":
        return shmkit.Channel(name, capacity=4096, **kw)
    return shmkit.Queue(name=name, **kw)


def reopen(kind: str, name: str):
    return {"struct": shmkit.Struct, "array": shmkit.Array, "heap": shmkit.Heap,
            "store": shmkit.Store, "channel": shmkit.Channel,
            "queue": shmkit.Queue}[kind].open(name)


def exercise(kind: str, obj) -> None:
    """A use of the structure that touches its shared state."""
    if kind == "struct":
        obj.record.n += 1
    elif kind == "array":
        obj[0, 0] += 1
    elif kind == "heap":
        obj.free(obj.put(b"x" * 100))
        obj.verify()
    elif kind == "store":
        obj["k"] = obj.get("k", 0) + 1
    elif kind == "channel":
        obj.send(b"ping")
        assert obj.recv(timeout=10) == b"ping"
    else:
        obj.put({"ping": 1})
        assert obj.get(timeout=10) == {"ping": 1}


# -- 1. a structure holds its segment --------------------------------------------

# Segment methods and properties that reach the raw bytes or the mapping.
RAW = {"resize", "buf", "write", "write_some", "ndarray", "read", "segment", "mapping",
       "remap", "truncate", "lock_segment"}


def _public(obj) -> dict:
    out = {}
    for attr in dir(obj):
        if attr.startswith("_"):
            continue
        try:
            out[attr] = getattr(obj, attr)
        except Exception as e:  # a property that refuses (closed, readonly...) offers nothing
            out[attr] = e
    return out


def _check_no_raw_access(kind: str, obj, payload: int) -> None:
    assert not isinstance(obj, Segment)
    for attr, value in _public(obj).items():
        where = f"{kind}.{attr}"
        if attr in RAW and not (kind == "heap" and attr in ("read", "write")):
            pytest.fail(f"{where} offers raw access to the segment")
        found = next((k.__dict__[attr] for k in type(obj).__mro__ if attr in k.__dict__),
                     None)
        if found is not None and found is Segment.__dict__.get(attr):
            pytest.fail(f"{where} is Segment's own {attr}")
        assert not isinstance(value, (Segment, _core.Mapping)), where
        if isinstance(value, memoryview):
            assert value.readonly or value.nbytes <= payload, where
        if isinstance(value, np.ndarray):
            assert value.nbytes <= payload, where
        # One level down (a lock, a record): still no way to the segment.
        if not callable(value) and not isinstance(value, (int, str, bytes, dict, list,
                                                          tuple, np.ndarray, np.dtype)):
            for sub, inner in _public(value).items():
                assert not isinstance(inner, (Segment, _core.Mapping)), f"{where}.{sub}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_public_attribute_keeps_the_structure_whole(kind, name):
    obj = make(kind, name)
    try:
        exercise(kind, obj)
        payload = obj._seg.size
        _check_no_raw_access(kind, obj, payload)
        for gone in ("resize", "buf", "ndarray", "segment", "stats", "detach"):
            assert not hasattr(obj, gone), f"{kind}.{gone} still exists"
        assert callable(obj.statistics) and isinstance(obj.statistics(), dict)
        info = obj.info()
        assert info["kind"] == kind and info["name"] == name
        assert [a["pid"] for a in obj.attachments()] == [os.getpid()]
        assert obj.readonly is False and obj.created and not obj.closed
        assert obj.path == f"/dev/shm/shmkit.{name}"
    finally:
        obj.close()
    assert obj.closed
    obj.close()  # twice is fine


def test_record_views_are_bounded_to_the_payload(name, names):
    s = shmkit.Struct(name, Rec)
    view = s.record
    assert ctypes.sizeof(view) == ctypes.sizeof(Rec) == s.nbytes
    t = shmkit.Struct.open(name)  # the numpy record: exactly one item
    assert t.record.nbytes == s.nbytes
    a = shmkit.Array(names(), "i4", (3, 5))
    assert a.array.nbytes == a.nbytes == 60
    with pytest.raises(shmkit.ClosedError):
        s.close()
        s.record
    for o in (t, a):
        o.close()


def _verify_heap(name: str, wire: bytes, array_name: str) -> None:
    heap = shmkit.Heap.open(name)
    heap.verify()
    assert heap.read(shmkit.Handle.from_bytes(wire)) == b"block 0"
    heap.close()
    a = shmkit.Array.open(array_name)
    assert a.shape == (8,) and a[7] == 7
    a.close()


def test_no_process_can_resize_a_heap_or_array_under_the_others(names):
    # Before: heap.resize(4096) was accepted, and every other process then
    # got CorruptError; array.resize() did the same to an Array.
    heap = shmkit.Heap(names(), size=1 << 16)
    first = heap.put(b"block 0")
    a = shmkit.Array(names(), "i8", 8, init=lambda arr: arr.__setitem__(slice(None),
                                                                         np.arange(8)))
    for obj in (heap, a):
        with pytest.raises(AttributeError):
            obj.resize(4096)
        with pytest.raises(AttributeError):
            obj.buf
    p = spawn(_verify_heap, heap.name, bytes(first), a.name)
    p.join(60)
    assert p.exitcode == 0
    heap.verify()
    heap.close()
    a.close()


def test_struct_lock_is_shared_and_robust(name):
    s = shmkit.Struct(name, Rec)
    with s.lock:
        assert s.lock.locked() and s.lock.holder_pid() == os.getpid()
        proc = run_python(f"""
            import shmkit
            s = shmkit.Struct.open({name!r})
            print(s.lock.acquire(timeout=0.2))
            s.close()
        """)
        assert proc.stdout.strip() == "False"
    assert not s.lock.locked()
    s.close()


# -- 2. honest opening -------------------------------------------------------------

def _create_in_child(code: str) -> None:
    run_python("import shmkit, numpy as np\n" + code)


def test_segment_smaller_than_asked_is_refused(name):
    # Before: a 1 MiB request opened an existing 256-byte segment and failed
    # later with IndexError.
    _create_in_child(f"shmkit.Segment({name!r}, size=256).close()")
    with pytest.raises(shmkit.MismatchError) as ei:
        shmkit.Segment(name, size=1 << 20)
    msg = str(ei.value)
    assert "size=256" in msg and "size=1048576" in msg and isinstance(ei.value, ValueError)
    with shmkit.Segment(name, size=100) as seg:  # it has room for that
        assert seg.size == 256
    with shmkit.Segment.open(name) as seg:
        assert seg.size == 256


def test_channel_and_queue_parameters_are_honoured_or_refused(names):
    ch_name, q_name = names(), names()
    _create_in_child(f"shmkit.Channel({ch_name!r}, capacity=4096).close()\n"
                     f"shmkit.Queue(3, name={q_name!r}, capacity=8192).close()")
    # Before: a Channel asked for 8 MiB got 4 KiB.
    with pytest.raises(shmkit.MismatchError, match="capacity=8388608"):
        shmkit.Channel(ch_name, capacity=8 << 20)
    with shmkit.Channel(ch_name) as ch:  # left out: adopted
        assert ch.capacity == 4096
    with pytest.raises(shmkit.MismatchError) as ei:
        shmkit.Queue(5, name=q_name)
    assert "maxsize=3" in str(ei.value) and "maxsize=5" in str(ei.value)
    with pytest.raises(shmkit.MismatchError):
        shmkit.Queue(0, name=q_name)  # the default, but given: refused too
    with pytest.raises(shmkit.MismatchError, match="capacity"):
        shmkit.Queue(name=q_name, capacity=1 << 20)
    with shmkit.Queue(name=q_name) as q:
        assert q.maxsize == 3
        q.put(1)
    with shmkit.Queue(3, name=q_name) as q:
        assert q.get(timeout=5) == 1
    with pytest.raises(shmkit.MismatchError, match="lifetime"):
        shmkit.Channel(ch_name, lifetime="attached")


def test_heap_size_is_honoured_or_refused(name):
    # Before: a Heap asked for 16 MiB got 64 KiB.
    _create_in_child(f"shmkit.Heap({name!r}, size=1 << 16, max_size=1 << 20).close()")
    with pytest.raises(shmkit.MismatchError) as ei:
        shmkit.Heap(name, size=16 << 20)
    assert "max_size=1048576" in str(ei.value) and "size=16777216" in str(ei.value)
    for kw in ({"max_blocks": 5}, {"max_pins": 3}, {"max_attach": 8}):
        with pytest.raises(shmkit.MismatchError, match=list(kw)[0]):
            shmkit.Heap(name, **kw)
    with shmkit.Heap(name) as heap, shmkit.Heap(name, size=1 << 16, max_pins=64) as same:
        assert heap.capacity == same.capacity == 1 << 16
    with shmkit.Heap.open(name, size=1 << 16) as heap:
        assert not heap.created
    with shmkit.Heap.open(name, size=1 << 18) as heap:  # honoured: the heap grows to it
        assert heap.capacity == 1 << 18


def test_store_and_records_parameters_are_honoured_or_refused(names):
    st_name, a_name = names(), names()
    _create_in_child(f"shmkit.Store({st_name!r}, codec='pickle', max_size=1 << 24).close()\n"
                     f"shmkit.Array({a_name!r}, 'f4', (2, 3)).close()")
    with pytest.raises(shmkit.MismatchError, match="codec"):
        shmkit.Store(st_name, codec=None)
    with pytest.raises(shmkit.MismatchError, match="max_size"):
        shmkit.Store(st_name, max_size=1 << 30)
    with pytest.raises(shmkit.MismatchError, match="size"):
        shmkit.Store(st_name, size=1 << 25)
    with shmkit.Store(st_name) as st:  # codec adopted
        st["obj"] = {1, 2}
        assert st.codec == "pickle" and st["obj"] == {1, 2}
    with pytest.raises(shmkit.MismatchError) as ei:
        shmkit.Array(a_name, "f4", (3, 2))
    assert isinstance(ei.value, shmkit.LayoutMismatchError)
    assert isinstance(ei.value, TypeError)  # as before


# Every kind opened by name: the structures as `make` builds them, and the rest.
OPENERS = {**{kind: functools.partial(make, kind) for kind in KINDS},
           "mutex": lambda n, **kw: shmkit.Mutex(n, **kw),
           "rwlock": lambda n, **kw: shmkit.RWLock(n, **kw),
           "event": lambda n, **kw: shmkit.Event(n, **kw),
           "semaphore": lambda n, **kw: shmkit.Semaphore(n, 1, **kw),
           "condition": lambda n, **kw: shmkit.Condition(n, **kw),
           "topic": lambda n, **kw: shmkit.Topic(n, **kw)}


@pytest.mark.parametrize("kind", OPENERS)
def test_every_kind_refuses_an_option_it_lacks_or_an_existing_object_disagrees_with(
        kind, name):
    """An existing object opened with another ``lifetime``, ``max_attach`` or
    ``mode`` is refused, as a Segment is: before, a lock, an event, a
    semaphore or a condition ignored all three, and every other kind the
    mode.  An option a kind does not take raises the TypeError Python gives,
    naming the kind, not an internal call; a Queue took any keyword at all."""
    made = OPENERS[kind](name, lifetime="persistent")
    try:
        for option, value in (("lifetime", "attached"), ("max_attach", 8), ("mode", 0o644)):
            with pytest.raises(shmkit.MismatchError, match=f"{kind} .* exists with {option}="):
                OPENERS[kind](name, **{option: value})
        OPENERS[kind](name, lifetime="persistent", max_attach=256, mode=0o600).close()
        with pytest.raises(TypeError, match=r"^[A-Za-z]+(\.__init__)?\(\) got an unexpected "
                                            r"keyword argument 'max_size_typo'"):
            OPENERS[kind](name, max_size_typo=1)
        from shmkit.inspect import scan  # nothing refused kept a handle
        assert [a["pid"] for a in scan(name)["attached"]] == [os.getpid()]
    finally:
        made.close()


@pytest.mark.parametrize("kind", OPENERS)
def test_every_kind_checks_max_attach_before_it_sizes_anything(kind, name):
    """Each kind sizes its attachment table from ``max_attach`` before its
    segment exists: a float, a bool or a str is refused there with the one
    message, where some kinds opened (16.0) and others failed on the size
    they computed from it; nothing is left behind."""
    for bad in (16.0, True, "4"):
        with pytest.raises(TypeError, match="^max_attach must be an int"):
            OPENERS[kind](name, max_attach=bad)
    with pytest.raises(ValueError, match="^max_attach must be 1..1024, not 0"):
        OPENERS[kind](name, max_attach=0)
    assert not os.path.exists(shmkit.segment.segment_path(name))
    OPENERS[kind](name, max_attach=2).close()


# -- 3. one meaning per name -----------------------------------------------------------

def _close_handle(name: str) -> None:
    ch = shmkit.Channel.open(name)
    ch.send(b"from child")
    ch.close()


def test_channel_close_releases_only_this_handle(name):
    # Before: close() in the child ended the channel for every process.
    ch = shmkit.Channel(name, capacity=4096)
    p = spawn(_close_handle, name)
    p.join(60)
    assert p.exitcode == 0
    assert ch.recv(timeout=10) == b"from child"
    ch.send(b"still open")
    assert ch.recv(timeout=10) == b"still open"
    assert not ch.sending_closed and ch.statistics()["closed"] == 0
    ch.close()


def test_a_channel_ended_in_an_earlier_run_says_what_to_do(name):
    run_python(f"""
        import shmkit
        ch = shmkit.Channel({name!r}, capacity=4096)
        ch.send(b"left over")
        ch.close_sending()
        ch.close()
    """)
    proc = run_python(f"""
        import shmkit
        ch = shmkit.Channel({name!r}, capacity=4096)
        print(list(ch))                     # the earlier run's messages, then the end
        try:
            ch.send(b"new run")
        except shmkit.ChannelClosed as e:
            print(e)
        ch.close()
    """)
    first, second = proc.stdout.strip().splitlines()
    assert first == "[b'left over']"
    assert "close_sending()" in second and "earlier run" in second
    assert f"shmkit rm {name}" in second
    shmkit.unlink(name)
    with shmkit.Channel(name, capacity=4096) as ch:  # as the message says
        ch.send(b"fresh")
        assert ch.recv(timeout=5) == b"fresh"


def test_the_ended_error_pickles_as_channel_closed(name):
    with shmkit.Channel(name, capacity=4096) as ch:
        ch.close_sending()
        with pytest.raises(shmkit.ChannelClosed) as ei:
            ch.send(b"x")
    again = pickle.loads(pickle.dumps(ei.value))  # as a Pool sends it back
    assert type(again) is shmkit.ChannelClosed and str(again) == str(ei.value)
    assert isinstance(ei.value, EOFError)


# -- 4. Queue and Channel under spawn ---------------------------------------------------

def _drain_queue(q, results, n: int) -> None:
    results.put(sorted(q.get(timeout=30) for _ in range(n)))
    q.close()
    results.close()


def test_queue_survives_parent_close_right_after_start():
    # Before: the child failed with NotFoundError (the last close removed the name).
    q, results = shmkit.Queue(), shmkit.Queue()
    for i in range(10):
        q.put(i)
    p = spawn(_drain_queue, q, results, 10)
    q.close()
    assert results.get(timeout=60) == list(range(10))
    p.join(60)
    assert p.exitcode == 0
    results.close()


def test_queue_survives_parent_garbage_collection_after_start():
    q, results = shmkit.Queue(), shmkit.Queue()
    path = q.path
    for i in range(5):
        q.put(i)
    p = spawn(_drain_queue, q, results, 5)
    del q
    gc.collect()
    assert results.get(timeout=60) == list(range(5))
    p.join(60)
    assert p.exitcode == 0
    assert not os.path.exists(path)  # the child's close, the last, removed it
    results.close()


def _echo_channel(ch, out) -> None:
    for msg in ch:
        out.send(msg.upper())
    out.close()
    ch.close()


def test_channel_survives_parent_close_right_after_start():
    ch, out = shmkit.Channel(capacity=4096), shmkit.Channel(capacity=4096)
    p = spawn(_echo_channel, ch, out)
    ch.send(b"abc")
    ch.close_sending()
    ch.close()
    assert out.recv(timeout=60) == b"ABC"
    p.join(60)
    assert p.exitcode == 0
    out.close()


_pool_queue = None


def _pool_init(q) -> None:
    global _pool_queue
    _pool_queue = q


def _pool_square(x: int) -> int:
    _pool_queue.put(x * x)
    return x


def test_pool_initializer_args_carry_a_queue():
    q = shmkit.Queue()
    with SPAWN.Pool(2, initializer=_pool_init, initargs=(q,)) as pool:
        assert sorted(pool.map(_pool_square, range(20))) == list(range(20))
    assert sorted(q.get(timeout=30) for _ in range(20)) == [x * x for x in range(20)]
    q.close()


class _ParentGone:
    """Unpickled before the queue: waits until the process that started us exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self):
        return (_wait_parent_gone, (self.pid,))


def _wait_parent_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while os.getppid() == pid and time.monotonic() < deadline:
        time.sleep(0.01)


def _orphan(gate, q, out_name: str) -> None:
    out = shmkit.Channel.open(out_name)
    out.send(pickle.dumps([q.get(timeout=30) for _ in range(5)]))
    out.close()
    q.close()


def _short_lived_parent(out_name: str) -> None:
    q = shmkit.Queue()
    for i in range(5):
        q.put(i)
    p = SPAWN.Process(target=_orphan, args=(_ParentGone(os.getpid()), q, out_name))
    p.start()
    path = q.path
    q.close()
    del q
    gc.collect()
    assert not os.path.exists(path)
    os._exit(0)


def test_a_child_opens_a_queue_whose_parent_is_gone(name):
    out = shmkit.Channel(name, capacity=4096)
    middle = SPAWN.Process(target=_short_lived_parent, args=(name,))
    middle.start()
    middle.join(60)
    assert middle.exitcode == 0
    assert pickle.loads(out.recv(timeout=60)) == [0, 1, 2, 3, 4]
    out.close()


def test_pickled_outside_a_spawn_goes_by_name(name):
    q = shmkit.Queue(name=name)
    clone = pickle.loads(pickle.dumps(q))
    clone.put("x")
    assert q.get(timeout=5) == "x" and clone.name == name
    clone.close()
    q.close()


# -- 5. the clean-up hook ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_on_destroy_runs_once_in_the_process_that_unlinks(kind, name):
    calls = []
    obj = make(kind, name, on_destroy=lambda: calls.append(1))
    other = reopen(kind, name)
    other.close()
    assert calls == []
    obj.unlink()
    assert calls == [1]
    with pytest.raises(shmkit.NotFoundError):
        obj.unlink()
    obj.close()
    assert calls == [1]


def _last_closer(kind: str, name: str, mark: str, go) -> None:
    obj = make(kind, name, on_destroy=lambda: open(mark, "w").close(),
               lifetime="attached")
    go.wait(30)
    obj.close()


@pytest.mark.parametrize("kind", ["heap", "store", "channel", "array"])
def test_on_destroy_runs_in_the_last_closer_only(kind, name, tmp_path):
    mine = []
    obj = make(kind, name, on_destroy=lambda: mine.append(1), lifetime="attached")
    mark = str(tmp_path / "destroyed")
    go = SPAWN.Event()
    p = spawn(_last_closer, kind, name, mark, go)
    deadline = time.monotonic() + 60
    while len(obj.attachments()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    obj.close()  # not the last: nothing removed, no hook here
    assert mine == [] and os.path.exists(f"/dev/shm/shmkit.{name}")
    go.set()
    p.join(60)
    assert p.exitcode == 0
    assert os.path.exists(mark) and not os.path.exists(f"/dev/shm/shmkit.{name}")
    assert mine == []


# -- 6. the partial write on a raw segment ------------------------------------------------

def test_write_some_writes_what_fits(name):
    with shmkit.Segment(name, size=16) as seg:
        assert seg.write_some(b"0123456789", offset=10) == 6
        assert seg.write_some(b"abc", offset=16) == 0
        assert seg.write_some(b"xy", offset=0) == 2
        with pytest.raises(IndexError):
            seg.write_some(b"x", offset=-1)
        with pytest.raises(IndexError):
            seg.write(b"0123456789", offset=10)  # the strict one is unchanged
        proc = run_python(f"""
            import shmkit
            with shmkit.Segment.open({name!r}) as s:
                print(s.read())
        """)
        assert proc.stdout.strip() == repr(b"xy" + bytes(8) + b"012345")
        with shmkit.Segment.open(name, readonly=True) as ro:
            with pytest.raises(shmkit.ReadOnlyError):
                ro.write_some(b"x")


def _bool_timeouts() -> dict:
    """Each kind's blocking calls, with timeout=True, on objects that would
    have something to give (a bool read as one second was a slip's result)."""
    q, ch = shmkit.Queue(), shmkit.Channel(None)
    big = shmkit.Queue(payload_pool=0)  # a file of its own per big object
    q.put(1)
    ch.send(b"x")
    m, rw, sem = shmkit.Mutex(None), shmkit.RWLock(None), shmkit.Semaphore(None, 1)
    ev, cond = shmkit.Event(None), shmkit.Condition(None)
    heap, topic = shmkit.Heap(None, size=1 << 20), shmkit.Topic(None)
    seg = shmkit.Segment(None, size=4096, max_size=1 << 20)
    cond.acquire()
    block = heap.alloc(8)
    calls = {
        "Queue.get": lambda t: q.get(True, t), "Queue.put": lambda t: q.put(2, True, t),
        "Channel.recv": lambda t: ch.recv(timeout=t),
        "Channel.recv_many": lambda t: ch.recv_many(4, timeout=t),
        "Channel.send": lambda t: ch.send(b"y", timeout=t),
        "Channel.loan": lambda t: ch.loan(8, timeout=t),
        "Mutex.acquire": lambda t: m.acquire(True, t),
        "RWLock.acquire_write": lambda t: rw.acquire_write(timeout=t),
        "Semaphore.acquire": lambda t: sem.acquire(True, t),
        "Event.wait": lambda t: ev.wait(t), "Condition.wait": lambda t: cond.wait(t),
        "Queue.put, big": lambda t: big.put(np.ones(1 << 20, np.uint8), True, t),
        "Condition.wait_for": lambda t: cond.wait_for(lambda: False, t),
        "Heap.alloc": lambda t: heap.alloc(8, timeout=t),
        "Heap.pin": lambda t: heap.pin(block, timeout=t),
        "Heap.compact": lambda t: heap.compact(timeout=t),
        "Topic.publish": lambda t: topic.publish(b"x", timeout=t),
        "Segment.resize": lambda t: seg.resize(8192, timeout=t),
    }
    untouched = lambda: (q.qsize(), ch.depth, m.locked(), sem.acquire(False) and  # noqa: E731
                         (sem.release() or True), seg.size, big.qsize(),
                         [f for f in os.listdir(os.path.dirname(big.path))
                          if f.startswith(os.path.basename(big.path) + "~")])
    return {"calls": calls, "untouched": untouched,
            "close": [q, ch, big, m, rw, sem, ev, cond, heap, topic, seg]}


def test_a_timeout_given_to_a_call_that_does_not_block_is_refused():
    """``get(False, 5)`` asks two things: it is refused with a ValueError
    that says which to drop, as threading.Lock refuses it, before anything
    is taken or a payload file made; None, and a lock's -1, are taken."""
    q, big = shmkit.Queue(), shmkit.Queue(payload_pool=0)
    m, sem, cond = shmkit.Mutex(None), shmkit.Semaphore(None, 1), shmkit.Condition(None)
    rec = shmkit.Array(None, shape=(4,), dtype=np.int64)
    try:
        q.put(1)
        calls = {"Queue.get": (lambda t: q.get(False, t), "block"),
                 "Queue.put": (lambda t: q.put(2, False, t), "block"),
                 "Queue.put, big": (lambda t: big.put(np.ones(1 << 20, np.uint8), False, t),
                                    "block"),
                 "Mutex.acquire": (lambda t: m.acquire(False, t), "blocking"),
                 "Semaphore.acquire": (lambda t: sem.acquire(False, t), "blocking"),
                 "Condition.acquire": (lambda t: cond.acquire(False, t), "blocking"),
                 "Array.lock.acquire": (lambda t: rec.lock.acquire(False, t), "blocking")}
        files = lambda: [f for f in os.listdir(os.path.dirname(big.path))  # noqa: E731
                         if f.startswith(os.path.basename(big.path) + "~")]
        for what, (call, flag) in calls.items():
            for t in (5, 0, 0.25, -0.5, True, np.float64(1), "x"):
                with pytest.raises(ValueError, match=f"with {flag}=False: a call that does not "
                                                     f"block takes no timeout; pass {flag}=True"):
                    call(t)
                    pytest.fail(f"{what} ignored timeout={t!r}")
        assert (q.qsize(), big.qsize(), files(), m.locked(), sem.value) == (1, 0, [], False, 1)
        assert q.get(False, None) == 1 and q.qsize() == 0
        for lock in (m, sem, cond, rec.lock):
            assert lock.acquire(False, None) is True
            lock.release()
            assert lock.acquire(False, -1) is True
            lock.release()
    finally:
        for o in (q, big, m, sem, cond, rec):
            o.close()


def test_every_timeout_follows_the_one_rule(name):
    """The core's waits, those written in Python, the store's and the
    service's timeouts take and refuse the same values: what converts to a
    float, or an int too large for one, but no bool (numpy's, and its arrays
    of bools, included), no NaN, nothing else."""
    from decimal import Decimal
    from fractions import Fraction
    ev, cond = shmkit.Event(None), shmkit.Condition(None)
    svc = shmkit.Service(name)
    values = [0, -1, 0.001, -0.5, float("-inf"), Decimal("0.001"), Fraction(1, 1000),
              np.float32(0.001), np.int64(0), -10**400, True, np.True_, np.array(True),
              float("nan"), "0.1", b"1", [1]]

    def outcome(call):
        try:
            call()
        except (shmkit.Timeout, shmkit.ServiceUnavailable):  # (no worker: none asked)
            return "waited"
        except (TypeError, ValueError) as e:
            return type(e).__name__ + (" NaN" if "NaN" in str(e) else "")
        return "waited"

    def in_python_wait(t):
        with cond:
            return cond.wait_for(lambda: False, t)

    surfaces = {"Event.wait (core)": lambda t: ev.wait(t),
                "shmkit.wait (Python)": lambda t: shmkit.wait([ev], t),
                "Condition.wait_for (Python)": in_python_wait,
                "Store(read_timeout)": lambda t: shmkit.Store(None, read_timeout=t).close(),
                "Service.call": lambda t: svc.call(b"x", timeout=t)}
    try:
        seen = {what: [outcome(lambda: call(t)) for t in values]
                for what, call in surfaces.items()}
        expected = ["waited"] * 10 + ["TypeError"] * 3 + ["ValueError NaN"] + ["TypeError"] * 3
        assert seen == {what: expected for what in surfaces}
        ev.set()  # an int beyond any float is as long as infinity, not an OverflowError
        assert ev.wait(10**400) and shmkit.wait([ev], 10**400) == [ev]
        shmkit.Store(None, timeout=10**400, read_timeout=10**400).close()
    finally:
        svc.unlink()
        for o in (ev, cond, svc):
            o.close()


class _DtypeInterrupts(np.ndarray):
    """An array whose dtype, read to tell an array of bools, raises a Ctrl-C."""

    @property
    def dtype(self):  # type: ignore[override]
        raise KeyboardInterrupt


def test_every_array_of_bools_is_refused_and_a_ctrl_c_in_its_dtype_goes_through():
    """Arrays of bools of any ndarray class are refused as bools are (a
    masked one was taken as 1 s), and an interrupt raised while the dtype is
    read reaches the caller instead of being dropped."""
    import numpy.ma as ma
    ev = shmkit.Event(None)
    try:
        for t in (np.array(True), ma.array(True), np.array([[False]])):
            with pytest.raises(TypeError, match="must be a number of seconds"):
                ev.wait(t)
        hostile = np.zeros(()).view(_DtypeInterrupts)
        for call in (lambda: ev.wait(hostile), lambda: _core.seconds(hostile)):
            with pytest.raises(KeyboardInterrupt):
                call()
    finally:
        ev.close()


class _ConvertsOnce:
    """A timeout that converts to seconds once, and raises after."""

    def __init__(self):
        self.left = 1

    def __float__(self):
        if not self.left:
            raise RuntimeError("converted twice")
        self.left -= 1
        return 0.05


@pytest.mark.parametrize("stub", [None, types.ModuleType("numpy")])
def test_a_blocked_or_stub_numpy_leaves_timeouts_as_they_are(monkeypatch, stub):
    """With numpy blocked (None in sys.modules) or replaced by a module
    without arrays, a timeout of any number still waits (the array check
    raised AttributeError for every Decimal); the message after a wait
    does not convert the timeout again, so one that converts once still
    ends in Empty."""
    from decimal import Decimal
    from fractions import Fraction
    ev, q = shmkit.Event(None), shmkit.Queue(name=None)
    try:
        monkeypatch.setitem(sys.modules, "numpy", stub)
        assert ev.wait(Fraction(1, 50)) is False
        with pytest.raises(shmkit.Empty, match="stayed empty for 0.02 s"):
            q.get(timeout=Decimal("0.02"))
        monkeypatch.undo()
        with pytest.raises(shmkit.Empty):
            q.get(timeout=_ConvertsOnce())
    finally:
        ev.close()
        q.close()


def test_a_timeout_whose_conversion_closes_the_object_meets_a_closed_handle(names):
    """A timeout's ``__float__`` is Python code, and may close the very object
    it is a timeout for: each wait reads its timeout before it forms an
    address in the segment (Event.wait and Condition.wait did it after, and
    crashed the process)."""
    out = run_python(f"""
        import shmkit
        makers = {{"Event.wait": (lambda n: shmkit.Event(n), lambda o, t: o.wait(t)),
                   "Condition.wait": (lambda n: shmkit.Condition(n),
                                      lambda o, t: (o.acquire(), o.wait(t))),
                   "Mutex.acquire": (lambda n: shmkit.Mutex(n), lambda o, t: o.acquire(True, t)),
                   "Semaphore.acquire": (lambda n: shmkit.Semaphore(n, 0),
                                         lambda o, t: o.acquire(True, t)),
                   "RWLock.acquire_write": (lambda n: shmkit.RWLock(n),
                                            lambda o, t: o.acquire_write(t)),
                   "Queue.get": (lambda n: shmkit.Queue(name=n), lambda o, t: o.get(True, t))}}
        for (what, (make, wait)), name in zip(makers.items(), {[names() for _ in range(6)]!r}):
            obj = make(name)
            class Closing:
                def __float__(self):
                    obj.close()
                    return 0.05
            try:
                wait(obj, Closing())
                print(what, "returned")
            except Exception as e:
                print(what, type(e).__name__)
            shmkit.unlink(name)
        """)
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) == 6 and all(line.endswith((" ClosedError", " ValueError")) for line in lines), \
        out.stdout


def test_a_store_keeps_its_timeouts_as_read_once_and_minus_one_does_not_wait(name):
    """A Store's timeouts are read once, by the one rule: -1 does not wait
    for the segment's lock when the store grows, as for any negative timeout
    (it was threading's "no timeout" there, and waited for ever), and a
    timeout whose value changes between two reads leaves no segment behind."""
    class Flip:
        reads = 0

        def __float__(self) -> float:
            Flip.reads += 1
            return 1.0 if Flip.reads == 1 else float("nan")

    with shmkit.Store(name, read_timeout=Flip()) as st:
        st["k"] = 1
        assert Flip.reads == 1 and st["k"] == 1
    shmkit.unlink(name)
    shmkit.Store(name, size=1 << 16).close()
    ready = SPAWN.Event()
    holder = spawn(_hold_segment_lock, name, ready, 3.0)
    try:
        assert ready.wait(60)
        with shmkit.Store(name, timeout=-1) as st:
            t0 = time.monotonic()
            with pytest.raises(shmkit.Timeout, match="within 0"):
                st["big"] = b"x" * (4 << 20)  # grows: needs the segment's lock
            assert time.monotonic() - t0 < 2.0
            assert "big" not in st
    finally:
        holder.join(30)
    assert holder.exitcode == 0


def _hold_segment_lock(name: str, ready, seconds: float) -> None:
    st = shmkit.Store(name)
    with st._seg.lock:  # what a growing writer takes
        ready.set()
        time.sleep(seconds)
    st.close()


def test_a_bool_timeout_is_refused_by_every_blocking_call():
    """timeout=True (``get(True, True)``) is a slip, refused with a TypeError
    before anything is taken, and a big object's payload file is not left
    behind; before, it was read as one second."""
    objs = _bool_timeouts()
    try:
        before = objs["untouched"]()
        for what, call in objs["calls"].items():
            for bad in (True, False, np.True_, np.False_):
                with pytest.raises(TypeError, match="not (numpy\\.)?bool"):
                    call(bad)
                    pytest.fail(f"{what} took a bool timeout")
        assert objs["untouched"]() == before == (1, 1, False, True, 4096, 0, [])
        for bad in (True, np.False_):  # the store's timeouts, kept for later calls
            for param in ("timeout", "read_timeout"):
                with pytest.raises(TypeError, match=f"^{param} must be a number"):
                    shmkit.Store(None, **{param: bad})
    finally:
        for o in objs["close"]:
            o.close()
