"""shmkit: share memory between processes on one machine, by name.

Raw segments, typed records and numpy arrays, crash-robust locks and events,
message channels, request/response services, a growable key-value store and a heap of movable blocks.

>>> import shmkit
>>> with shmkit.Segment(None, size=16) as seg:
...     seg.write(b"hi"); seg.read(2)
2
b'hi'
"""

# -- platform: Linux and CPython 3.11+, checked before anything touches the C core
import sys as _sys

if not _sys.platform.startswith("linux"):
    from .errors import ShmkitError as _ShmkitError

    class UnsupportedPlatformError(_ShmkitError, ImportError):
        """shmkit was imported on a system other than Linux."""

    raise UnsupportedPlatformError(
        f"shmkit runs on Linux only (kernel 3.15 or newer: it uses open file description "
        f"locks, futexes, MAP_NORESERVE and fallocate punch holes), not on "
        f"{_sys.platform!r}; share memory between processes there with "
        f"multiprocessing.shared_memory")
if _sys.version_info < (3, 11):
    from .errors import ShmkitError as _ShmkitError

    class UnsupportedPythonError(_ShmkitError, ImportError):
        """shmkit was imported by a Python older than 3.11."""

    raise UnsupportedPythonError(
        f"shmkit needs CPython 3.11 or newer (its parsers use possessive patterns, and "
        f"3.10's support has ended), not {_sys.version.split()[0]}; run it with a newer "
        f"Python")
del _sys
# -----------------------------------------------------------------------------

from .errors import (
    BusyError,
    ClosedError,
    CorruptError,
    ExistsError,
    FormatVersionError,
    InvalidKeyError,
    InvalidValueError,
    InvalidNameError,
    KeyExistsError,
    LayoutMismatchError,
    MismatchError,
    NotFoundError,
    DescriptorLimitError,
    OutOfSpaceError,
    OwnerDiedWarning,
    ReadOnlyError,
    ShmkitError,
    SizeLimitError,
    Timeout,
    UnsupportedTypeError,
    UntrustedError,
    ValueTooLargeError,
    WouldBlock,
    WrongKindError,
)
import typing as _typing

from .heap import Handle, Heap, HeapFullError, PinnedError, StaleHandleError
from .channel import Channel, Queue
from .errors import ChannelClosed, Empty, Full, MessageTooLarge, SendersGone
from . import _lazy
if _typing.TYPE_CHECKING:  # imported on first use: see __getattr__ below
    from .records import Array, Struct
from .segment import Kind, Segment, list_segments, unlink
from .sync import Condition, Event, Mutex, RWLock, Semaphore
from .store import Store
from .aio_wait import ALL_COMPLETED, FIRST_COMPLETED, wait  # the asyncio forms: shmkit.aio
from .errors import BackendError, LeaseLostError, UnsupportedParameterError
from .redis import connect  # shmkit.connect("local" | "redis://..."); redis-py only when used
from .topic import Subscriber, Topic
from .errors import MessagesLost
from .service import Client, Request, Service, Worker
from .errors import RemoteError, ReplyLost, ServiceUnavailable, WorkerDied
from . import inspect  # shmkit.inspect: list, describe and clean up objects (not in __all__)

__version__ = "0.1.0"

__all__ = [
    "Segment", "Kind", "list_segments", "unlink",
    "Mutex", "RWLock", "Event", "Semaphore", "Condition",
    "Struct", "Array",
    "Store", "KeyExistsError", "UnsupportedTypeError", "ValueTooLargeError", "InvalidKeyError",
    "InvalidValueError",
    "ShmkitError", "InvalidNameError", "NotFoundError", "ExistsError", "WrongKindError",
    "FormatVersionError", "MismatchError", "LayoutMismatchError", "CorruptError",
    "OutOfSpaceError", "UntrustedError", "SizeLimitError", "DescriptorLimitError",
    "ReadOnlyError", "ClosedError", "BusyError", "Timeout", "WouldBlock",
    "OwnerDiedWarning",
    "Heap", "Handle", "StaleHandleError", "PinnedError", "HeapFullError",
    "Channel", "Queue", "ChannelClosed", "SendersGone", "MessageTooLarge", "Empty", "Full",
    "wait", "FIRST_COMPLETED", "ALL_COMPLETED",
    "connect", "BackendError", "LeaseLostError", "UnsupportedParameterError",
    "Topic", "Subscriber", "MessagesLost",
    "Service", "Client", "Worker", "Request", "ServiceUnavailable", "WorkerDied",
    "RemoteError", "ReplyLost",
]


# Importing numpy takes longer than the rest of shmkit together, and starts
# its BLAS thread pool: processes that share no arrays (a logging client, a
# web worker with a cache) never pay for it.  The numpy-backed kinds are
# imported the first time they are named, under the fork guard of _lazy.py
# (records.py shows them as shmkit's, however it was imported).
_LAZY = frozenset({"Array", "Struct"})

for _name in __all__:  # shmkit.Store, not shmkit.store.Store
    if _name in _LAZY:
        continue
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, type(__builtins__)):
        try:
            _obj.__module__ = "shmkit"
        except (AttributeError, TypeError):
            pass
del _name, _obj

if not _typing.TYPE_CHECKING:  # type checkers see the import above, and still report typos
    def __getattr__(name: str) -> object:
        if name not in _LAZY:
            raise AttributeError(f"module 'shmkit' has no attribute {name!r}")
        obj = getattr(_lazy.load("shmkit.records"), name)
        globals()[name] = obj
        return obj


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
