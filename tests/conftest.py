"""Fixtures shared by the test suite: unique names and real child processes."""

from __future__ import annotations

import contextlib
import dis
import glob
import multiprocessing
import os
import secrets
import signal
import struct
import subprocess
import sys
import textwrap
from typing import Any, Callable, Iterator

import pytest

SPAWN = multiprocessing.get_context("spawn")

# A test run started in the background of a non-interactive shell inherits
# SIGINT ignored, and so would every child it starts: Python then never
# raises KeyboardInterrupt, and the Ctrl-C tests could not test anything.
# A handler here is reset to the default in exec'd children.
signal.signal(signal.SIGINT, signal.default_int_handler)
SOURCE_TREE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# SHMKIT_TEST_INSTALLED=1 (`make wheel-test`) tests the installed package, not the
# source tree: SRC, which child processes get as PYTHONPATH, is then the directory
# the installed shmkit was imported from.
INSTALLED = os.environ.get("SHMKIT_TEST_INSTALLED") == "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers set COLUMNS and LINES (80x24): the programs the
    # tests run (shmkit ls, top) would lay their tables out for 80 columns,
    # where a run in one process gives them the 160 of a pipe.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
if INSTALLED:
    import shmkit as _shmkit

    SRC = os.path.dirname(os.path.dirname(os.path.abspath(_shmkit.__file__)))
    if os.path.commonpath([SRC, SOURCE_TREE]) == SOURCE_TREE:
        raise RuntimeError(f"SHMKIT_TEST_INSTALLED=1 but shmkit was imported from the "
                           f"source tree ({_shmkit.__file__}): run the tests from outside "
                           "it, with the installed package's python")
    os.environ["SHMKIT_TEST_PATH"] = SRC  # for test programs that run as scripts
else:
    SRC = SOURCE_TREE


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A segment name no other test (or concurrent test run) uses; removed afterwards."""
    made = f"t-{secrets.token_hex(6)}"
    yield made
    _remove(made)


@pytest.fixture
def names() -> Iterator[Callable[[], str]]:
    """A factory of unique names, all removed afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"t-{secrets.token_hex(6)}")
        return made[-1]

    yield make
    for n in made:
        _remove(n)


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A directory of this test's own in /dev/shm (tmpfs, as segments are),
    removed with what is left in it."""
    where = f"/dev/shm/shmkit-test-dir-{os.getpid()}-{secrets.token_hex(3)}"
    os.mkdir(where)
    yield where
    for f in os.listdir(where):
        os.unlink(os.path.join(where, f))
    os.rmdir(where)


def _remove(name: str) -> None:
    """Remove the object ``name`` and those a test derived from it
    (``name + "-s"``, a service's ``name.requests``): the tokens are all of
    one length, so no other test's name starts with this one."""
    for path in glob.glob(f"/dev/shm/shmkit.{glob.escape(name)}*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def spawn(target: Callable[..., Any], *args: Any) -> multiprocessing.Process:
    """Start ``target(*args)`` in a freshly spawned interpreter (not a fork)."""
    p = SPAWN.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def set_layout(name: str, text: bytes) -> None:
    """Write ``text`` as the layout description of segment ``name``, as another
    user with write access could."""
    fd = os.open(f"/dev/shm/shmkit.{name}", os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("=I", len(text)), 72)
        os.pwrite(fd, text, 1024)
    finally:
        os.close(fd)


def run_python(code: str, *args: str, timeout: float = 60, check: bool = True,
               **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``code`` in a separate python program, as an unrelated process would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def fork_call(fn: Callable[..., Any], *args: Any) -> int:
    """Run fn(*args) in a forked child that exits 0, or 1 after printing what
    it raised; returns the child's pid (for kill tests that SIGKILL it)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def as_user(fn: Callable[[], object], uid: int = 65534, gid: int = 65534,
            groups: list[int] | None = None) -> int:
    """Run ``fn()`` in a forked child that has become ``uid``/``gid`` (with
    the supplementary ``groups``, if given); its exit status: 0 when ``fn``
    returned, 1 (the error written to stderr) when it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if groups is not None:
                os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            fn()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the status
            os.write(2, f"child: {type(e).__name__}: {e}\n".encode())
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def interrupt_at_bytecode(k: int, traced: Callable[[Any], bool]) -> list[int]:
    """Trace the functions whose code objects ``traced`` accepts and raise
    KeyboardInterrupt at their k-th bytecode, as a Ctrl-C arriving there
    would (a signal handler runs between two bytecodes).  Returns the
    counter of bytecodes seen; a count below k means none was left to
    interrupt.  The caller ends it with ``sys.settrace(None)``."""
    count = [0]
    nop = dis.opmap["NOP"]

    def local(frame: Any, event: str, arg: Any) -> Any:
        # (not at a NOP: CPython never runs a signal handler there, and one
        # marks a try: that no handler of the block around it covers)
        if event == "opcode" and frame.f_code.co_code[frame.f_lasti] != nop:
            count[0] += 1
            if count[0] == k:
                raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if not traced(frame.f_code):
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    return count


def kill_wait(pid: int) -> None:
    """SIGKILL a child (gone already is fine) and reap it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


# The start of every Ctrl-C storm script: a forked sender sends SIGINT every
# 0.2 ms; the handler raises KeyboardInterrupt only while `armed`.
# end_storm() stops it and collects what the interrupts left unreferenced.
STORM_PRELUDE = r"""
import collections, functools, gc, os, signal, sys, time, shmkit
armed = False
def handler(sig, frame):
    if armed:
        raise KeyboardInterrupt
signal.signal(signal.SIGINT, handler)
parent = os.getpid()
kid = os.fork()
if kid == 0:  # (ends with its parent, whatever becomes of it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent:
        os.kill(parent, signal.SIGINT)
        time.sleep(0.0002)
    os._exit(0)
def end_storm():
    os.kill(kid, signal.SIGKILL)
    os.waitpid(kid, 0)
    gc.collect()
"""


@contextlib.contextmanager
def child_told_it_forked() -> Iterator[None]:
    """Run the block; a child forked inside it ends here: exit status 0 when
    the block raised RuntimeError saying the process forked, 3 for another
    error, 5 when the block went on to its end.  In the parent, errors pass
    through."""
    parent = os.getpid()
    try:
        yield
    except BaseException as e:
        if os.getpid() == parent:
            raise
        os._exit(0 if type(e) is RuntimeError and "forked" in str(e) else 3)
    if os.getpid() != parent:  # the child's operation went on
        os._exit(5)


class _ForksWhenPickled:
    def __init__(self, forked: Callable[[], None]) -> None:
        self.forked = forked

    def __reduce__(self) -> tuple[Any, ...]:
        self.forked()
        return (int, (50,))


def fork_during_update(st: Any, where: str,
                       at_child_end: Callable[[], Any] = lambda: None) -> list[Any]:
    """``st.update()`` of the pairs ``i: i`` for i < 100, whose 51st forks, in
    the iterator (``where="iterator"``) or as its value is pickled.  The child
    exits 0 when its update() raised RuntimeError saying it forked, 3 for
    another error, 5 when it returned.  The parent, still inside the update,
    waits for the child and notes ``(its exit code, at_child_end())``; the
    notes are returned once the update is done."""
    pid, seen = -1, []

    def fork() -> None:
        nonlocal pid
        pid = os.fork()
        if pid > 0:
            _, status = os.waitpid(pid, 0)
            seen.append((os.waitstatus_to_exitcode(status), at_child_end()))

    def pairs() -> Iterator[tuple[int, Any]]:
        for i in range(100):
            if i == 50 and where == "iterator":
                fork()
            yield i, (_ForksWhenPickled(fork) if i == 50 and where != "iterator" else i)
    with child_told_it_forked():
        st.update(pairs())
    return seen


class Interrupt(Exception):
    """What a test's SIGUSR1 handler raises, as Ctrl-C's raises KeyboardInterrupt."""


@pytest.fixture
def raising_handler() -> Iterator[None]:
    """SIGUSR1's handler raises Interrupt while the test runs: with
    ``_core.fault(k, prefix, signal=signal.SIGUSR1)``, a Ctrl-C that comes at
    a chosen step of the core.  The fault is disarmed afterwards."""
    from shmkit import _core

    def handler(signum: int, frame: Any) -> None:
        raise Interrupt
    old = signal.signal(signal.SIGUSR1, handler)
    yield
    _core.fault(0)
    signal.signal(signal.SIGUSR1, old)


def kept_through_two_interrupts(handle: Any, take_point: str,
                                receive: Callable[[], Any]) -> None:
    """``handle`` (a Channel or Subscriber, with the raising_handler
    fixture) has m0, m1, m2 to receive.  recv_many(3), interrupted at
    ``take_point`` as it takes them, keeps all three; ``receive``,
    interrupted as it returns kept messages, keeps them too: all three come
    next, in order."""
    from shmkit import _core
    _core.fault(1, take_point, signal=signal.SIGUSR1)
    with pytest.raises(Interrupt):
        handle.recv_many(3, timeout=1.0)
    _core.fault(1, "kept.", signal=signal.SIGUSR1)
    with pytest.raises(Interrupt):
        receive()
    _core.fault(0)
    assert handle._kept == 3
    assert handle.recv_many(5) == [b"m0", b"m1", b"m2"]
