"""Modules imported on first use, never across a fork.

``import shmkit`` leaves numpy out (it takes longer than the rest of shmkit
together and starts a BLAS thread pool): it is imported the first time an
array is made, read or named, as are a few modules only some calls need.  A
lazy import has a hazard an eager one has not: a child forked while another
thread is inside it inherits that import's locks, held by a thread it does
not have, and hangs at its first use of the module.  Each lazy import passes
the core's gate (``_core/gate.c``), which a fork also passes: the fork waits
for the import under way, and no child starts inside one.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

_done: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The module ``name``, imported through the fork gate the first time."""
    module = _done.get(name)
    if module is None:
        from . import _core  # here: shmkit.errors imports this module, and _core imports it
        module = _done[name] = _core.import_gated(name)
    return module


def numpy() -> Any:
    """numpy, imported through the fork gate the first time.

    >>> numpy().arange(3).tolist()
    [0, 1, 2]
    """
    return load("numpy")
