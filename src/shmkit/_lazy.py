"""Modules imported on first use, never across a fork.

``import shmkit`` leaves numpy out (it takes longer than the rest of shmkit
together and starts a BLAS thread pool): it is imported the first time an
array is made, read or named.  A lazy import has one hazard an eager one has
not: while a thread is inside it, the thread holds the import locks of the
modules it is loading, and a child forked by another thread at that moment
inherits those locks held by a thread it does not have; its first use of the
module would wait for them forever.  So every lazy import here runs under
one lock that a fork also takes: a fork waits for an import under way to end
(a fraction of a second, once per process), and no child starts inside one.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any

# Reentrant: a module being imported here may itself import lazily.
_lock = threading.RLock()
_done: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The module ``name``, imported under the fork guard the first time."""
    module = _done.get(name)
    if module is None:
        with _lock:
            module = _done[name] = importlib.import_module(name)
    return module


def numpy() -> Any:
    """numpy, imported under the fork guard the first time.

    >>> numpy().arange(3).tolist()
    [0, 1, 2]
    """
    return _done.get("numpy") or load("numpy")


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # the copy of the parent's, held for the fork


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
