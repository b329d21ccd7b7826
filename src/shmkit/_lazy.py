"""Modules imported on first use, never across a fork.

``import shmkit`` leaves numpy out (it takes longer than the rest of shmkit
together and starts a BLAS thread pool): it is imported the first time an
array is made, read or named.  A lazy import has one hazard an eager one has
not: while a thread is inside it, the thread holds the import locks of the
modules it is loading, and a child forked by another thread at that moment
inherits those locks held by a thread it does not have; its first use of the
module would wait for them forever.  So every lazy import here runs under
one lock that a fork also takes: a fork waits for an import under way to end
(a fraction of a second, once per process; at most FORK_WAIT seconds), and
no child starts inside one.  A Ctrl-C during that wait cannot let the fork
through early: it is delivered once the fork is made.
"""

from __future__ import annotations

import _thread
import functools
import importlib
import operator
import os
import threading
import time
from types import ModuleType
from typing import Any, Callable

# Reentrant: a module being imported here may itself import lazily.
_lock = threading.RLock()
_done: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The module ``name``, imported under the fork guard the first time."""
    module = _done.get(name)
    if module is None:
        with _lock:
            if not _hooked:
                _guard_forks()
            module = _done[name] = importlib.import_module(name)
    return module


def numpy() -> Any:
    """numpy, imported under the fork guard the first time.

    >>> numpy().arange(3).tolist()
    [0, 1, 2]
    """
    return load("numpy")


# How long a fork waits for an import under way.  The wait is bounded because
# a hook registered after this one (logging's, say) may hold a lock the
# importing thread needs; past it the fork goes on unguarded, as forks did
# before anything was imported lazily.
FORK_WAIT = 5.0
_forking = threading.local()  # what this thread's before-fork hook got


def _before_fork() -> None:
    deadline = time.monotonic() + FORK_WAIT
    held, interrupted = False, None
    while True:
        try:
            held = _lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            break
        except BaseException as e:  # a signal handler raised
            # CPython forks even if this hook raises: keep waiting, and let
            # the interruption through once the fork is made.
            interrupted = e
    _forking.held, _forking.interrupted = held, interrupted


def _after_fork_in_parent() -> None:
    held, interrupted = getattr(_forking, "held", False), getattr(_forking, "interrupted", None)
    _forking.held, _forking.interrupted = False, None
    if held:
        _lock.release()
    if isinstance(interrupted, KeyboardInterrupt) and not _deliver:  # one is enough
        _deliver.append(_thread.interrupt_main)  # Ctrl-C again, once the fork is made
    elif interrupted is not None:
        raise interrupted  # reported as CPython reports any fork hook's error


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # the copy of the parent's, held for the fork
    _forking.held, _forking.interrupted = False, None  # the parent's to deliver
    _deliver.clear()


# Calls to make after the fork, from C: interrupt_main() called from Python
# would raise the KeyboardInterrupt at once, inside the hook, where CPython
# reports and drops it.  Called by sorted()'s key, no Python code runs until
# fork() has returned to its caller, which the KeyboardInterrupt then reaches.
# It holds one call at most (sorting two would compare their results).
_deliver: list[Callable[[], object]] = []
_hooked = False


def _guard_forks() -> None:
    """Register the hooks, once (with _lock held), at the first lazy import
    rather than at import time: hooks run before a fork in the reverse order
    of their registration, so ours then wait before those of modules
    imported earlier (logging's takes its lock, which an import may need)."""
    global _hooked
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
    os.register_at_fork(after_in_parent=functools.partial(
        sorted, _deliver, key=operator.methodcaller("__call__")))
    os.register_at_fork(after_in_parent=_deliver.clear)
    _hooked = True
