"""Queue.get rebuilds an object while its message is still in the queue: an
interrupt, a kill or a freeze of the receiver meanwhile leaves the object
there for the next get (see docs/channel.md, "A Ctrl-C during get")."""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shmkit
from shmkit import inspect

from conftest import SRC, STORM_PRELUDE, run_python, spawn

MiB = 1 << 20

# What the receiver's rebuilds do: fail with an interrupt that many times
# (this process), or, in a spawned receiver, report and sleep in the rebuild.
_interrupts = [0]
_slow: list = []


def _rebuild(tag, arr):
    if _interrupts[0] > 0:
        _interrupts[0] -= 1
        raise KeyboardInterrupt
    if _slow:
        _slow[0].set()  # inside the rebuild now
        # short sleeps: a signal whose handler ran just before a sleep began
        # (the test may stop this process there) is raised after that sleep
        for _ in range(1200):
            time.sleep(0.05)
    return tag, arr


class _Item:
    """Rebuilt by _rebuild, in the receiver's unpickling."""

    def __init__(self, tag, arr=None):
        self.tag, self.arr = tag, arr

    def __reduce__(self):
        return _rebuild, (self.tag, self.arr)


def _payloads(q) -> list[str]:
    prefix = os.path.basename(q.path) + "~oob."
    return [f for f in os.listdir(os.path.dirname(q.path)) if f.startswith(prefix)]


def _assert_pooled_file_free(q) -> None:
    """The queue's one pooled payload file is free again, for its sender's next object."""
    from shmkit import channel
    with open(os.path.join(os.path.dirname(q.path), _payloads(q)[0]), "rb") as f:
        f.seek(channel._STATE_OFF)
        assert int.from_bytes(f.read(4), "little") == channel._FREE


KINDS = {"small": ({}, None), "big, pooled": ({}, 2 * MiB),
         "big, a file each": ({"payload_pool": 0}, 2 * MiB)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_interrupt_while_an_object_is_rebuilt_leaves_it_next_in_line(name, kind):
    kwargs, nbytes = KINDS[kind]
    q = shmkit.Queue(name=name, **kwargs)
    try:
        arr = None if nbytes is None else np.arange(nbytes // 8, dtype=np.int64)
        q.put(_Item("first", arr))
        q.put(_Item("second", arr))
        _interrupts[0] = 2
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                q.get(timeout=5)
        assert q.qsize() == 2  # nothing was taken
        for tag in ("first", "second"):
            got, got_arr = q.get(timeout=5)
            assert got == tag
            if arr is not None:
                np.testing.assert_array_equal(got_arr, arr)
        assert q.qsize() == 0
        del got_arr
        if kwargs:  # a file each: removed by the get that took its object
            assert not _payloads(q)
    finally:
        _interrupts[0] = 0
        q.unlink()
        q.close()
    assert not _payloads(q)


def _refuse(tag, arr):
    raise ValueError(f"{tag} cannot be rebuilt here")


class _Refused:
    def __init__(self, arr=None):
        self.arr = arr

    def __reduce__(self):
        return _refuse, ("this one", self.arr)


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_object_that_cannot_be_rebuilt_is_lost_and_the_queue_goes_on(name, kind):
    """Its error is raised once, its payload file let go as if it was
    taken: given back, it would stop the queue for every receiver."""
    kwargs, nbytes = KINDS[kind]
    q = shmkit.Queue(name=name, **kwargs)
    try:
        arr = None if nbytes is None else np.ones(nbytes, np.uint8)
        q.put(_Refused(arr))
        q.put("after")
        with pytest.raises(ValueError, match="cannot be rebuilt"):
            q.get(timeout=5)
        assert q.get(timeout=5) == "after"
        assert q.qsize() == 0
        if kwargs:  # a file each: removed
            assert not _payloads(q)
        elif nbytes:  # pooled: free again, for its sender's next object
            _assert_pooled_file_free(q)
    finally:
        q.unlink()
        q.close()


class _Frozen(Exception):
    """An exception that refuses new attributes (as a frozen dataclass's)."""

    def __setattr__(self, attr, value):
        raise AttributeError(f"cannot set {attr!r}: frozen")


class _Hiding(Exception):
    """An exception that shows no attribute but Python's own."""

    def __getattribute__(self, attr):
        if not attr.startswith("__"):
            raise AttributeError(attr)
        return super().__getattribute__(attr)


_ODD_ERRORS = {"frozen": _Frozen, "hiding": _Hiding}


def _refuse_oddly(kind, arr):
    raise _ODD_ERRORS[kind](f"{kind}: cannot be rebuilt here")


class _RefusedOddly:
    def __init__(self, kind, arr):
        self.kind, self.arr = kind, arr

    def __reduce__(self):
        return _refuse_oddly, (self.kind, self.arr)


class _HandlerObject:
    def __call__(self, signum: int, frame: object) -> None:
        raise TimeoutError("never fired")

    def method(self, signum: int, frame: object) -> None:
        raise TimeoutError("never fired")


@pytest.mark.parametrize("handler", [None, "function", "callable", "method", "partial"])
@pytest.mark.parametrize("pool", [None, 0, 8 * MiB])  # small; big, a file each; pooled
@pytest.mark.parametrize("kind", list(_ODD_ERRORS))
def test_an_unpickling_error_of_any_class_loses_only_its_object_at_once(
        name, kind, pool, handler):
    """What the exception's class does with its attributes does not matter:
    the object is lost at its first try, its payload file let go; so it is
    with Python signal handlers installed that do not fire (a handler's own
    exception, not these, gives the object back)."""
    import functools
    obj = _HandlerObject()
    made = {None: None, "function": lambda signum, frame: obj(signum, frame),
            "callable": obj, "method": obj.method,
            "partial": functools.partial(_HandlerObject.method, obj)}[handler]
    old = [(signum, signal.signal(signum, made)) for signum in (signal.SIGUSR2, signal.SIGALRM)
           if made is not None]
    q = shmkit.Queue(name=name, payload_pool=0 if pool is None else pool)
    try:
        q.put(_RefusedOddly(kind, None if pool is None else np.ones(2 * MiB, np.uint8)))
        q.put("after")
        with pytest.raises(_ODD_ERRORS[kind], match="cannot be rebuilt"):
            q.get(timeout=5)
        assert q.get(timeout=5) == "after"  # not given back for a second try
        if pool == 0:
            assert not _payloads(q)
        elif pool:
            _assert_pooled_file_free(q)
    finally:
        for signum, handler_before in old:
            signal.signal(signum, handler_before)
        q.unlink()
        q.close()
    assert not _payloads(q)


class _TracebackHidden(ValueError):
    """Its traceback attribute raises; its class lookup raises too."""

    @property
    def __traceback__(self):  # type: ignore[override]
        raise RuntimeError("no traceback here")


def _refuse_hidden(arr):
    raise _TracebackHidden("cannot be rebuilt here")


class _RefusedHidden:
    def __init__(self, arr):
        self.arr = arr

    def __reduce__(self):
        return _refuse_hidden, (self.arr,)


class _OddHandler:
    """A callable handler whose attribute lookups raise."""

    def __call__(self, signum: int, frame: object) -> None:
        raise TimeoutError("never fired")

    def __getattr__(self, name: str) -> object:
        raise KeyError(name)


@pytest.mark.parametrize("pool", [None, 0])
def test_the_handler_check_runs_no_code_of_the_classes_it_looks_at(name, pool):
    """Telling a handler's exception from an object's reads only what no
    class can override: an error whose traceback attribute raises, under
    a handler object whose attributes raise, is still the object's and is
    lost at its first get (the check's own error took its place, and the
    object was retried a hundred times)."""
    old = signal.signal(signal.SIGUSR2, _OddHandler())
    q = shmkit.Queue(name=name, payload_pool=0 if pool is None else pool)
    try:
        q.put(_RefusedHidden(None if pool is None else np.ones(2 * MiB, np.uint8)))
        q.put("after")
        with pytest.raises(_TracebackHidden, match="cannot be rebuilt"):
            q.get(timeout=5)
        assert q.get(timeout=5) == "after"
    finally:
        signal.signal(signal.SIGUSR2, old)
        q.unlink()
        q.close()


class _Cancelled(BaseException):
    """A library's own interrupt (as some use for cancellation)."""


_NOTES_READ: list[int] = []


class _NotesOfItsOwn(BaseException):
    """An interrupt whose class keeps its notes its own way: noting the drop
    must run none of it (the core writes the instance's dict)."""

    @property
    def __notes__(self):  # type: ignore[override]
        _NOTES_READ.append(1)
        raise RuntimeError("a __notes__ of its own ran")

    def add_note(self, note):  # type: ignore[override]
        _NOTES_READ.append(1)
        raise RuntimeError("an add_note of its own ran")


_INTERRUPTS = {"SystemExit": SystemExit, "BaseException": _Cancelled,
               "own notes": _NotesOfItsOwn}


def _interrupt_oddly(kind, arr):
    raise _INTERRUPTS[kind]("every time")


class _InterruptsOddly(_RefusedOddly):
    def __reduce__(self):
        return _interrupt_oddly, (self.kind, self.arr)


def _says_dropped(e: BaseException) -> bool:
    """Does the error of a get say (a note) that its message is now dropped?"""
    assert not _NOTES_READ
    notes = vars(e).get("__notes__", ())
    return any("is now dropped: that object is lost" in n for n in notes)


@pytest.mark.parametrize("size", [None, 0, 8 * MiB])  # small; big, a file each; pooled
@pytest.mark.parametrize("kind", list(_INTERRUPTS))
def test_an_object_whose_rebuild_always_interrupts_is_given_up_after_a_hundred_tries(
        name, kind, size):
    """An interrupt other than a KeyboardInterrupt (SystemExit, a library's
    own BaseException) gives the message back, as a signal handler's may;
    raised for the same message every time, it is the message's after all:
    lost after a hundred tries more (its file let go), and the queue goes on."""
    q = shmkit.Queue(name=name, payload_pool=size or 0)
    try:
        q.put(_InterruptsOddly(kind, None if size is None else np.ones(2 * MiB, np.uint8)))
        q.put("after")
        for i in range(101):
            with pytest.raises(_INTERRUPTS[kind]) as e:
                q.get(timeout=5)
            assert _says_dropped(e.value) == (i == 100 and sys.version_info >= (3, 11))
        assert q.get(timeout=5) == "after"
        if size == 0:
            assert not _payloads(q)
    finally:
        q.unlink()
        q.close()
    assert not _payloads(q)


_SHARED_INTERRUPT = SystemExit("one instance, raised by every rebuild")


def _raise_the_shared_one(tag):
    raise _SHARED_INTERRUPT


class _RebuiltBy:
    """An object whose unpickling is ``rebuild(tag)`` (a function of this module)."""

    def __init__(self, rebuild, tag):
        self.rebuild, self.tag = rebuild, tag

    def __reduce__(self):
        return self.rebuild, (self.tag,)


def test_one_exception_instance_raised_for_two_messages_says_dropped_only_when_one_is(name):
    """A rebuild that raises one module-level instance every time: the note
    left on it when the first message was dropped is gone from the second
    message's failures until that one is dropped too."""
    q = shmkit.Queue(name=name)
    try:
        q.put(_RebuiltBy(_raise_the_shared_one, "a"))
        q.put(_RebuiltBy(_raise_the_shared_one, "b"))
        q.put("after")
        said = []
        for _ in range(202):
            with pytest.raises(SystemExit) as e:
                q.get(timeout=5)
            assert e.value is _SHARED_INTERRUPT
            said.append(_says_dropped(e.value))
        assert q.get(timeout=5) == "after"
        dropped = [i for i, s in enumerate(said) if s]
        assert dropped == ([100, 201] if sys.version_info >= (3, 11) else [])
    finally:
        _SHARED_INTERRUPT.__dict__.pop("__notes__", None)
        q.unlink()
        q.close()


# The queue that _interrupt_in_turn's inner get takes from, and the depth of gets.
_in_turn: list = []


def _interrupt_in_turn(tag, arr):
    """Take the other poison (as a signal handler's get would), then fail."""
    q, depth = _in_turn
    if depth == 0:
        _in_turn[1] = 1
        try:
            q.get(timeout=5)
        except SystemExit:
            pass
        finally:
            _in_turn[1] = 0
    raise SystemExit(f"{tag}, every time")


class _InterruptsInTurn:
    def __init__(self, tag, arr):
        self.tag, self.arr = tag, arr

    def __reduce__(self):
        return _interrupt_in_turn, (self.tag, self.arr)


def _interrupted_gets_then_next(q, most: int = 300) -> tuple[int, object]:
    """Get until a get returns: (how many raised SystemExit first, what came);
    (most, None) if none returned in that many tries."""
    for tries in range(most):
        try:
            return tries, q.get(timeout=5)
        except SystemExit:
            pass
    return most, None


@pytest.mark.parametrize("size", [None, 0, 8 * MiB])  # small; big, a file each; pooled
def test_two_objects_whose_rebuilds_interrupt_in_turn_are_both_given_up(name, size):
    """Each rebuild of one poison takes the other from the same handle first:
    the handle sees the two fail in turn, and still counts a hundred failures
    for each (before, a count of the last message only never passed one)."""
    q = shmkit.Queue(name=name, payload_pool=size or 0)
    _in_turn[:] = [q, 0]
    try:
        for tag in ("x", "y"):
            q.put(_InterruptsInTurn(tag, None if size is None else
                                    np.ones(2 * MiB, np.uint8)))
        q.put("after")
        assert _interrupted_gets_then_next(q) == (101, "after")
        if size == 0:
            assert not _payloads(q)
    finally:
        _in_turn.clear()
        q.unlink()
        q.close()
    assert not _payloads(q)


_failed_once: set = set()


def _interrupt_once(tag):
    if tag not in _failed_once:
        _failed_once.add(tag)
        raise SystemExit(f"{tag}, once")
    return tag


def test_counts_of_messages_another_handle_took_do_not_keep_the_slots(name):
    """Four messages fail once in one handle, then another handle takes
    them: the first handle never finishes them, and its counts of them must
    not hold its slots, or two poisons failing in turn there would evict
    each other and never be given up."""
    q = shmkit.Queue(name=name)
    other = shmkit.Queue.open(name)
    _in_turn[:] = [q, 0]
    try:
        for k in range(4):
            q.put(_RebuiltBy(_interrupt_once, f"once {k}"))
            with pytest.raises(SystemExit):
                q.get(timeout=5)
            assert other.get(timeout=5) == f"once {k}"
        for tag in ("x", "y"):
            q.put(_InterruptsInTurn(tag, None))
        q.put("after")
        assert _interrupted_gets_then_next(q) == (101, "after")
    finally:
        _in_turn.clear()
        _failed_once.clear()
        other.close()
        q.unlink()
        q.close()


_HANDLER_GETS_IN_THE_CACHE = r"""
import faulthandler, signal, sys
import numpy as np
import shmkit
from shmkit import channel
faulthandler.dump_traceback_later(60, exit=True)
where, at = sys.argv[1], sys.argv[2]
qa, qb = shmkit.Queue(path=where + "/a"), shmkit.Queue(path=where + "/b")  # pooled payloads
qa.put(("a", np.full(2 << 20, 1, np.uint8)))
qb.put(("b", np.full(2 << 20, 2, np.uint8)))
took = []
signal.signal(signal.SIGUSR1, lambda *a: took.append(qb.get(timeout=10)[0]))
armed = [True]
def now():  # the signal comes here, and its handler runs, the cache's lock held
    if armed[0]:
        armed[0] = False
        signal.raise_signal(signal.SIGUSR1)
if at == "lock":  # the first call made under the lock
    first = channel._received._unmap_dropped
    def unmap_dropped():
        now()
        return first()
    channel._received._unmap_dropped = unmap_dropped
else:  # while the cache's sizes are summed
    class Page(int):
        def __rsub__(self, other):
            now()
            return other - int(self)
    channel.PAGE = Page(channel.PAGE)
got = qa.get(timeout=10)
assert got[1].min() == got[1].max() == 1
for q in (qa, qb):
    q.unlink()
    q.close()
print(got[0], took)
"""


@pytest.mark.parametrize("at", ["lock", "sum"])
def test_a_signal_handler_that_gets_while_a_get_maps_a_payload(shm_dir, at):
    """The cache of received payload mappings is held by a get while it
    maps its payload: a signal handler's get, on the same thread, takes it
    again (before, it waited on it for good), and what it adds to the cache
    does not fail the interrupted get."""
    out = subprocess.run([sys.executable, "-c", _HANDLER_GETS_IN_THE_CACHE, shm_dir, at],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["a", "['b']"]


def _slow_receiver(q, inside, out):
    _slow.append(inside)
    out.put(q.get(timeout=60)[0])  # sleeps inside the first rebuild


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_receiver_killed_or_frozen_while_rebuilding_leaves_the_object(name, big, how):
    """Killed inside the rebuild: the object goes to the next receiver,
    before newer ones, and is counted queued at once.  Frozen there: it stays the frozen receiver's, which
    gets it once resumed, and the others go on with the next objects."""
    q = shmkit.Queue(name=name)
    ctx = multiprocessing.get_context("spawn")
    inside, out = ctx.Event(), ctx.Queue()
    arr = np.arange(MiB // 8, dtype=np.int64) if big else None
    p = spawn(_slow_receiver, q, inside, out)
    try:
        q.put(_Item("first", arr))
        q.put(_Item("second", arr))
        assert inside.wait(60)
        if how == "SIGKILL":
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            assert q.qsize() == 2  # the dead receiver's is queued again, before any get
            got = [q.get(timeout=30)[0], q.get(timeout=30)[0]]
            assert got == ["first", "second"]
        else:
            os.kill(p.pid, signal.SIGSTOP)
            assert q.qsize() == 1  # the frozen receiver's is still its own
            assert q.get(timeout=30)[0] == "second"
            with pytest.raises(shmkit.Empty):
                q.get(timeout=0.2)
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGINT)  # cut its sleep short: the rebuild fails...
            # ...with an interrupt, so the first object goes back to the queue
            p.join(30)
            assert q.get(timeout=30)[0] == "first"
        assert q.qsize() == 0
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.join(10)
        q.unlink()
        q.close()
    assert not _payloads(q)


def _interrupted_after_the_finish(q, out):
    from shmkit import _core
    _core.fault(1, "ring.finish.done", stop=True)  # stops once the message is finished
    try:
        q.get(timeout=60)
        out.put("returned")
    except KeyboardInterrupt:
        got = [q._kept]
        while q._kept or q.qsize():
            got.append(q.get_nowait())
        out.put(tuple(got))


def _interrupt_main_thread(pid: int) -> None:
    """SIGINT to the process's main thread (tgkill): a process-directed
    signal may go to another thread (numpy's), which trips Python's flag at
    a moment of its own, and the main thread raises it wherever it is then."""
    syscall = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)
    if syscall is None:
        pytest.skip("tgkill's number on this machine is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(syscall, pid, pid, signal.SIGINT) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def _interrupt_after_the_finish(q, receiver, then=None):
    """Run receiver(q, out) in a spawned process, which stops in its get once
    the message is finished (it arms that crash point); interrupt its main
    thread there and resume it: what it put on out.  then(out): what the
    test does once the receiver runs."""
    out = multiprocessing.get_context("spawn").Queue()
    p = spawn(receiver, q, out)
    try:
        if then is not None:
            then(out)
        deadline = time.monotonic() + 60
        while not inspect.process_stopped(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inspect.process_stopped(p.pid), "the receiver did not stop in its get"
        _interrupt_main_thread(p.pid)  # pending until it resumes, right after the finish
        os.kill(p.pid, signal.SIGCONT)
        got = out.get(timeout=60)
        p.join(30)
        return got
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.join(10)


def test_an_interrupt_after_the_finish_keeps_the_object_for_the_next_get(name):
    """A signal that comes after the message was finished is raised as the
    core's call returns, inside get: the object stays in the box, and the
    handle's next get returns it, before the next object in the queue."""
    q = shmkit.Queue(name=name)
    try:
        q.put("first")
        q.put("second")
        assert _interrupt_after_the_finish(q, _interrupted_after_the_finish) == (
            True, "first", "second")
        assert q.qsize() == 0
    finally:
        q.unlink()
        q.close()


def _awaited_interrupted_after_the_finish(q, out):
    import asyncio

    import shmkit.aio
    from shmkit import _core
    aq = shmkit.aio.Queue.open(q.name)
    loop = asyncio.new_event_loop()  # (not asyncio.run: its Ctrl-C cancels at an await)
    task = loop.create_task(aq.get(timeout=60))
    _core.fault(1, "ring.finish.done", stop=True)  # stops once the message is finished
    if not aq.qsize():
        loop.run_until_complete(asyncio.sleep(0.2))  # the get awaits the queue now
        out.put("awaiting")
    try:
        loop.run_until_complete(task)
        out.put("returned")
    except KeyboardInterrupt:
        got = [aq._kept]
        while aq._kept or aq.qsize():
            got.append(loop.run_until_complete(aq.get(timeout=10)))
        out.put(tuple(got))


@pytest.mark.parametrize("waits", [False, True])
def test_an_interrupt_after_the_finish_keeps_the_object_for_the_next_awaited_get(name, waits):
    """The same for shmkit.aio's get, whether it found the object at once or
    awaited it: the core's call returns the box there too."""
    q = shmkit.Queue(name=name)

    def put_both(out=None):
        if out is not None:
            assert out.get(timeout=60) == "awaiting"
        q.put("first")
        q.put("second")

    try:
        if not waits:
            put_both()
        got = _interrupt_after_the_finish(q, _awaited_interrupted_after_the_finish,
                                          put_both if waits else None)
        assert got == (True, "first", "second")
        assert q.qsize() == 0
    finally:
        q.unlink()
        q.close()


def test_closing_a_queue_refuses_get_and_drops_nothing_else(name):
    q = shmkit.Queue(name=name)
    q.put("a")
    get = q.get
    q.close()
    for call in (get, q.get, q.get_nowait, q._get_boxed):
        with pytest.raises(shmkit.ClosedError, match="is closed"):  # (a ValueError)
            call()
    with shmkit.Queue.open(name) as again:
        assert again.get(timeout=10) == "a"
        again.unlink()


_GET_STORM = STORM_PRELUDE + r"""
import numpy
where, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = shmkit.Queue(path=where + "/q", payload_pool=0 if kind == "private" else 8 << 20)
sender = os.fork()
if sender == 0:  # (the storm signals its parent only)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = shmkit.Queue(path=where + "/q", create=False)
    big = numpy.zeros(300 << 10, dtype=numpy.uint8)  # beyond OOB_THRESHOLD: a payload file
    for i in range(n):
        if kind == "small":
            s.put(("object", i))
        else:
            a = big.copy(); a[:8] = numpy.frombuffer(i.to_bytes(8, "little"), numpy.uint8)
            s.put(a)
    s.put(None)
    s.close()
    os._exit(0)
seen, interrupts = [], 0
while True:
    try:
        armed = True
        o = q.get(timeout=60)
        armed = False
    except KeyboardInterrupt:
        armed = False
        interrupts += 1
        continue
    if o is None:
        break
    seen.append(o[1] if kind == "small" else int.from_bytes(o[:8].tobytes(), "little"))
    del o
end_storm()
os.waitpid(sender, 0)
print(n - len(set(seen)), len(seen) - len(set(seen)), interrupts)
"""


@pytest.mark.parametrize("kind, n", [("small", 200_000), ("pooled", 3000), ("private", 2000)])
def test_a_ctrl_c_storm_over_gets_loses_no_object(shm_dir, kind, n):
    """A SIGINT every 0.2 ms over a receiver: an interrupt while an object
    is taken or rebuilt leaves it in the queue.  Only one that lands in the
    instant after the message is finished, as get returns, loses its
    object (as any call's result is lost to an exception raised as it
    returns): before, every interrupt after the message was taken lost it,
    a quarter of all interrupts (and, for big objects, its payload file)."""
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", _GET_STORM, shm_dir, kind, str(n)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lost, twice, interrupts = map(int, out.stdout.split())
    assert interrupts > 50  # the storm reached the gets
    assert twice == 0
    assert lost <= 2 + interrupts // 100, f"{lost} objects lost to {interrupts} interrupts"
    left = [f for f in os.listdir(shm_dir) if f != "q"]
    assert len(left) <= lost, f"payload files left: {left[:5]}"


def _get_inside(q):
    return "outer", q.get(timeout=10)


def _close_inside(q):
    q.close()
    return "closed inside"


class _Calls:
    """Unpickled by calling fn(q) (q: the receiving handle, set by the test)."""

    q = None

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return _call_with_queue, (self.fn,)


def _call_with_queue(fn):
    return fn(_Calls.q)


def test_a_get_inside_a_get_and_a_changed_box_lose_nothing(name):
    """A get made by the rebuild of another (its own object first), a close
    made by one, and a box a caller emptied (replaced, not read past its
    end) all leave every other object where it was."""
    q = _Calls.q = shmkit.Queue(name=name)
    try:
        q.put(_Calls(_get_inside))
        q.put("inner")
        q.put("next")
        assert q.get(timeout=10) == ("outer", "inner")
        q._get_boxed().clear()  # "next", taken into a box then emptied by hand
        q.put("after")
        assert q.get(timeout=10) == "after" and not q._kept
        q.put(_Calls(_close_inside))
        q.put("left")
        assert q.get(timeout=10) == "closed inside"
        with pytest.raises(shmkit.ClosedError, match="is closed"):  # (a ValueError)
            q.get()
        with shmkit.Queue.open(name) as again:
            assert again.get(timeout=10) == "left"
            again.unlink()
    finally:
        _Calls.q = None
        q.close()


def test_an_object_kept_across_a_fork_stays_the_parents(name):
    """The box holding an object (an interrupt came as get's call returned)
    when the process forks: the parent's next get returns it, the child's
    does not (it would be delivered twice)."""
    q = shmkit.Queue(name=name)
    try:
        q.put("kept")
        q.put("next")
        assert q._get_boxed() == ["kept"] and q._kept  # left full, as by that interrupt
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, repr((q._kept, q.get(timeout=10))).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            assert f.read() == "(False, 'next')"
        assert q.get(timeout=10) == "kept" and not q._kept
    finally:
        q.unlink()
        q.close()


class _HandlerError(Exception):
    """What a signal handler raised."""


@pytest.mark.parametrize("step", ["_check_trust", "_same_file"])
@pytest.mark.parametrize("error", [_HandlerError, TimeoutError, shmkit.BusyError])
@pytest.mark.parametrize("pool", [0, 8 * MiB])
def test_what_a_handler_raises_in_a_big_objects_own_steps_gives_it_back(
        name, monkeypatch, pool, error, step):
    """A signal handler's exception (not an interrupt) raised in a step of
    the unpacking of a big object's header, before its unpickling, is not
    the object's fault, whatever its class: the message goes back, with its
    payload file.  A handler raising TimeoutError (an alarm's), an OSError,
    or any ShmkitError lost the object: both classes counted as the file's
    fault."""
    from shmkit import channel
    q = shmkit.Queue(name=name, payload_pool=pool)
    try:
        q.put(np.arange(MiB // 8, dtype=np.int64))
        q.put("next")
        real = getattr(channel, step)

        def raise_once(*args):
            monkeypatch.setattr(channel, step, real)
            raise error("from a signal handler")

        monkeypatch.setattr(channel, step, raise_once)
        with pytest.raises(error):
            q.get(timeout=10)
        got = q.get(timeout=10)
        assert got[-1] == MiB // 8 - 1 and q.get(timeout=10) == "next"
        del got
        gc.collect()
        if not pool:
            assert not _payloads(q)
    finally:
        q.unlink()
        q.close()
    assert not _payloads(q)


_signals_left = [0]


def _rebuild_signalled(tag, arr):
    if _signals_left[0] > 0:
        _signals_left[0] -= 1
        signal.raise_signal(signal.SIGUSR1)  # its handler runs in this frame's next step
    return tag, arr


class _SignalledItem(_Item):
    """Its rebuild is stopped by what a signal handler raises (as an alarm
    coming during the rebuild would), a given number of times."""

    def __reduce__(self):
        return _rebuild_signalled, (self.tag, self.arr)


@pytest.mark.parametrize("error", [TimeoutError, shmkit.CorruptError])
@pytest.mark.parametrize("kind", list(KINDS))
def test_what_a_handler_raises_inside_an_unpickling_gives_the_object_back(name, kind, error):
    """A signal handler's exception raised while the unpickling runs Python
    code (numpy's _frombuffer, a reconstructor) is not the object's fault:
    the core and _unpack see a handler's frame on its way, and the object
    stays next in line.  An alarm's TimeoutError there lost it (any
    exception of an unpickling was the object's)."""
    kw, n = KINDS[kind]
    q = shmkit.Queue(name=name, **kw)

    def handler(signum: int, frame: object) -> None:
        raise error("from a signal handler")

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        q.put(_SignalledItem("it", None if n is None else np.arange(n // 8)))
        q.put("next")
        _signals_left[0] = 1
        with pytest.raises(error, match="from a signal handler"):
            q.get(timeout=10)
        tag, arr = q.get(timeout=10)
        assert tag == "it" and (arr is None if n is None else arr[-1] == n // 8 - 1)
        assert q.get(timeout=10) == "next"
        del arr
    finally:
        _signals_left[0] = 0
        signal.signal(signal.SIGUSR1, old)
        q.unlink()
        q.close()


def test_a_receiver_out_of_descriptors_gets_the_big_object_once_it_has_some(name):
    """No descriptor left to open the payload file is this process's want, not
    the file's fault: DescriptorLimitError says so, and the object stays
    next in line (it was lost, as if the file were damaged)."""
    out = run_python(f"""
        import os, resource, numpy as np, shmkit
        q = shmkit.Queue(name={name!r}, payload_pool=0)
        q.put(np.arange(1 << 17))
        q.put("next")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            q.get(timeout=5)
            print("got it with no descriptor left")
        except shmkit.DescriptorLimitError as e:
            print("refused:", "ulimit -n" in str(e))
        for fd in held:
            os.close(fd)
        print("then", int(q.get(timeout=5)[-1]), q.get(timeout=5))
        q.close()
        q.unlink()
        """)
    assert out.stdout.split("\n")[:2] == ["refused: True", f"then {(1 << 17) - 1} next"], \
        out.stdout


def test_a_big_object_whose_own_steps_always_fail_is_given_up_after_a_hundred_tries(
        name, monkeypatch):
    """Such an error, again and again for one message, is the message's after
    all: tried a hundred times more, then lost, and the queue goes on."""
    from shmkit import channel
    q = shmkit.Queue(name=name, payload_pool=0)
    try:
        q.put(np.zeros(300 << 10, dtype=np.uint8))  # just beyond OOB_THRESHOLD
        q.put("next")

        def always(*args):
            raise _HandlerError("every time")

        monkeypatch.setattr(channel, "_check_trust", always)
        for i in range(101):
            with pytest.raises(_HandlerError) as e:
                q.get(timeout=10)
            assert _says_dropped(e.value) == (i == 100 and sys.version_info >= (3, 11))
        assert q.get(timeout=10) == "next"
    finally:
        q.unlink()
        q.close()


class _ClosesOnDel:
    def __init__(self, q):
        self.q = q

    def __del__(self):
        self.q.close()


def test_a_changed_box_whose_contents_close_the_queue_as_it_goes(name):
    """The box a caller changed is replaced, and what frees the old one may
    close the handle: get then says it is closed, nothing else is lost."""
    q = shmkit.Queue(name=name)
    q.put("a")
    q.put("b")
    box = q._get_boxed()  # "a", left in the box
    box.append(_ClosesOnDel(q))
    del box
    with pytest.raises(shmkit.ClosedError, match="is closed"):  # (a ValueError)
        q.get(timeout=10)
    with shmkit.Queue.open(name) as again:
        assert again.get(timeout=10) == "b"
        again.unlink()


def _handler_gets(q, out):
    from shmkit import _core
    took = []
    signal.signal(signal.SIGINT, lambda *args: took.append(q.get_nowait()))
    _core.fault(1, "ring.finish.done", stop=True)  # stops once the message is finished
    got = q.get(timeout=60)
    out.put((took, got))


def test_a_signal_handler_that_gets_as_get_returns_takes_the_object_in_order(name):
    """A handler that gets from the queue, run as get's call returns, takes
    the object the call took; the interrupted get returns the next one."""
    q = shmkit.Queue(name=name)
    try:
        q.put("first")
        q.put("second")
        assert _interrupt_after_the_finish(q, _handler_gets) == (["first"], "second")
    finally:
        q.unlink()
        q.close()


def test_an_object_left_in_the_box_counts_and_makes_the_queue_ready(name):
    # An object a Ctrl-C left in the box (as the get returned it) is the next
    # get's, but qsize() said 0, empty() True, and shmkit.wait([q]) slept.
    import asyncio
    import shmkit.aio
    q = shmkit.Queue(name=name)
    try:
        q.put("kept")
        box = q._get_boxed()  # taken into the box; nobody emptied it
        assert box == ["kept"] and q._kept
        assert q.qsize() == 1 and not q.empty()
        t0 = time.monotonic()
        assert shmkit.wait([q], 5.0) == [q]
        assert shmkit.wait([q], 5.0, return_when=shmkit.ALL_COMPLETED) == [q]
        assert asyncio.run(shmkit.aio.wait([q], 5.0)) == [q]
        assert time.monotonic() - t0 < 4.0  # none of them slept its timeout
        del box
        assert q.get_nowait() == "kept"
        assert q.qsize() == 0 and q.empty() and shmkit.wait([q], 0.05) == []
    finally:
        q.close()
        q.unlink()
