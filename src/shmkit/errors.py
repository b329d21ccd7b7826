"""The exceptions and warnings shmkit raises.

Every error derives from :class:`ShmkitError`; most also derive from the
built-in exception a caller would already catch (``FileNotFoundError`` for a
missing name, ``ValueError`` for a bad argument), so existing handlers keep
working.
"""

from __future__ import annotations

import queue as _queue
from typing import Any

from ._lazy import load

__all__ = [
    "ShmkitError",
    "InvalidNameError",
    "NotFoundError",
    "ExistsError",
    "WrongKindError",
    "FormatVersionError",
    "MismatchError",
    "LayoutMismatchError",
    "CorruptError",
    "OutOfSpaceError",
    "UntrustedError",
    "SizeLimitError",
    "DescriptorLimitError",
    "ReadOnlyError",
    "ClosedError",
    "BusyError",
    "Timeout",
    "WouldBlock",
    "OwnerDiedWarning",
    # store
    "KeyExistsError",
    "UnsupportedTypeError",
    "ValueTooLargeError",
    "InvalidKeyError",
    # heap
    "StaleHandleError",
    "PinnedError",
    "HeapFullError",
    # channel
    "ChannelClosed",
    "SendersGone",
    "MessageTooLarge",
    "Empty",
    "Full",
    # redis backend (shmkit.connect)
    "BackendError",
    "LeaseLostError",
    "UnsupportedParameterError",
    # service
    "ServiceUnavailable",
    "WorkerDied",
    "RemoteError",
    "ReplyLost",
]


class ShmkitError(Exception):
    """Base class of every shmkit error."""


class InvalidNameError(ShmkitError, ValueError):
    """A name is empty, too long, or contains characters a name cannot have."""


class NotFoundError(ShmkitError, FileNotFoundError):
    """No shared object has this name (open it with create, or check the name)."""


class ExistsError(ShmkitError, FileExistsError):
    """``create()`` was asked for a name that already exists."""


class WrongKindError(ShmkitError, TypeError):
    """The name holds another kind of object (a Channel opened as a Store, say)."""


class FormatVersionError(ShmkitError):
    """The segment was written by a shmkit with another data layout version."""


class MismatchError(ShmkitError, ValueError):
    """An existing object was opened with an explicit parameter it does not have.

    A size or capacity smaller than asked, another heap size, another codec,
    another ``maxsize``...: the message names both values.  Leave the
    parameter out to adopt what exists, or unlink the object and create it
    again.
    """


class LayoutMismatchError(MismatchError, TypeError):
    """A record or array was opened with a dtype, type or shape other than its own."""


class CorruptError(ShmkitError):
    """Shared memory holds values no correct writer produces; nothing is trusted."""


class OutOfSpaceError(ShmkitError, MemoryError):
    """The file system behind the segment (usually /dev/shm) is full."""


class UntrustedError(ShmkitError, PermissionError):
    """The file at a shmkit name is not one this process may trust: another
    user owns it, or it is not a regular file (a FIFO, a directory, a socket).

    Nothing was read from it.  Pass ``trust_owner=`` (a uid or user name) to
    open a segment another user made on purpose; remove a planted file with
    ``shmkit rm`` (or rm(1) as its owner or root)."""


class SizeLimitError(ShmkitError, ValueError):
    """A size, shape, capacity or count beyond what shmkit can ever map or
    address; raised before anything is created."""


class DescriptorLimitError(ShmkitError, OSError):
    """The process (EMFILE) or the system (ENFILE) has no file descriptor left
    for one more object; close some, or raise ``ulimit -n``."""


class ReadOnlyError(ShmkitError, PermissionError):
    """A write through a segment opened with ``readonly=True``."""


class ClosedError(ShmkitError, ValueError):
    """The object was closed in this process."""


class BusyError(ShmkitError):
    """The object is in use in a way that forbids the call (all attach slots taken...)."""


class Timeout(ShmkitError, TimeoutError):
    """A blocking call's timeout passed before it could complete."""

    # True on a Timeout that shmkit raised because a call's own deadline
    # passed (the core marks its own, Python code makes them with
    # _timed_out): only those are turned into Empty, Full, another wait
    # slice or the end of a loop.  One that a signal handler raised during a
    # wait goes through as it is, as any other exception of the handler's.
    _deadline = False


def _timed_out(message: str) -> Timeout:
    """A :class:`Timeout` for a deadline that passed in shmkit's own call."""
    e = Timeout(message)
    e._deadline = True
    return e


class WouldBlock(ShmkitError):
    """A ``*_nowait`` call would have had to wait."""


class OwnerDiedWarning(RuntimeWarning):
    """A lock was taken over from a holder that died; check the data it guards."""


# --- store ---


class KeyExistsError(ShmkitError, KeyError):
    """``Store.add()`` was given a key that is already stored (assign to replace it)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class UnsupportedTypeError(ShmkitError, TypeError):
    """A key or value of a type the store cannot hold as it is.

    Keys are int, str or bytes.  Values are bytes, str, int, float, bool,
    None and numpy arrays; other objects need ``Store(name, codec="pickle")``.
    """


class ValueTooLargeError(ShmkitError, ValueError):
    """A key or value larger than the store can ever hold (see ``max_size``)."""


class InvalidKeyError(ShmkitError, ValueError):
    """A str key that no store can hold: a key is stored as its UTF-8 bytes,
    and a lone surrogate (as ``os.fsdecode`` makes of bytes that are not
    UTF-8) has none.  It replaces the codec's ``UnicodeEncodeError``, its
    cause, and is a ``ValueError`` as that is."""


class InvalidValueError(ShmkitError, ValueError):
    """A str value a store without ``codec="pickle"`` cannot hold: a str is
    stored as its UTF-8 bytes, which a lone surrogate has none of (a store
    with ``codec="pickle"`` pickles such a str).  The codec's
    ``UnicodeEncodeError`` is its cause."""


# --- heap ---


class StaleHandleError(ShmkitError, ValueError):
    """A heap handle names no live block: its block was freed, or the handle
    was forged or comes from another heap.  It never reaches anyone's data."""


class PinnedError(BusyError):
    """A pinned heap block cannot be freed or resized; leave the pin blocks first."""


class HeapFullError(OutOfSpaceError):
    """The heap has no room for the request, even after compacting it."""


# --- channel ---


class ChannelClosed(ShmkitError, EOFError):
    """The channel was closed for sending: ``send`` is refused, and ``recv``
    raises this once the messages already sent have all been received."""


class SendersGone(ChannelClosed):
    """A receive that asked to stop when no sender remains
    (``stop_when_no_senders=True``) found the channel empty, and every
    process that had sent on it has closed its handle or died."""


class MessageTooLarge(ShmkitError, ValueError):
    """A message is larger than the channel can ever hold (see ``max_message``);
    create the channel with a larger ``capacity=``."""


class Empty(WouldBlock, _queue.Empty):
    """Nothing to receive now: ``recv_nowait()``, or ``Queue.get`` whose wait
    ended.  Also a :class:`queue.Empty`, as ``multiprocessing.Queue`` raises."""


class Full(WouldBlock, _queue.Full):
    """No room to send now: ``send_nowait()``, or ``Queue.put`` whose wait
    ended.  Also a :class:`queue.Full`, as ``multiprocessing.Queue`` raises."""


# The class the compiled core raises for ChannelClosed (module.c reads it
# from here): ChannelClosed with what to do added to its message.
_SENT_AFTER_END = " was closed: no more messages can be sent"
_DRAINED = " is closed and drained"


class _ChannelEnded(ChannelClosed):
    """ChannelClosed as the core raises it, completed with what to do.

    The core says which channel and what happened; a channel ended by
    ``close_sending()`` stays ended for every later run that opens its name,
    so a refused send also says how to start afresh.
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_explain(args[0]),)
        super().__init__(*args)

    def __reduce__(self) -> tuple[Any, ...]:  # travels (to a Pool's parent, say) as itself
        return (ChannelClosed, self.args)


_ChannelEnded.__name__ = _ChannelEnded.__qualname__ = "ChannelClosed"
_ChannelEnded.__module__ = "shmkit"


def _explain(msg: str) -> str:
    if msg.startswith("channel ") and msg.endswith(_SENT_AFTER_END):
        shown = msg[len("channel "):-len(_SENT_AFTER_END)]
        try:  # ast only here: importing it costs more than this module
            name = load("ast").literal_eval(shown)
        except (ValueError, SyntaxError):
            name = shown
        return (f"channel {shown} was ended with close_sending(), possibly by an earlier "
                f"run: no more messages can be sent to it. Unlink it (`shmkit rm {name}`) "
                "and create it again to use the name afresh")
    if msg.startswith("channel ") and msg.endswith(_DRAINED):
        shown = msg[len("channel "):-len(_DRAINED)]
        return (f"channel {shown} was ended with close_sending() and every message "
                "sent before has been received")
    return msg


# --- redis backend (shmkit.connect("redis://...")) ---


class BackendError(ShmkitError, ConnectionError):
    """The Redis server behind a namespace could not be reached, went away
    (a restart, a network partition) or refused a command.

    The message names the server and what failed; the original redis-py
    exception is chained (``__cause__``).  A write that raised this may or
    may not have been applied: see docs/redis.md."""


class LeaseLostError(ShmkitError, RuntimeError):
    """A Redis-backed Mutex's lease ran out (the holder was stopped or cut
    off for longer than ``lease``) and another holder may have taken it;
    what the lock guarded may have been changed meanwhile (compare
    ``fencing_token`` values)."""


class UnsupportedParameterError(ShmkitError, TypeError):
    """A parameter the backend cannot honour (a ``path=`` or a byte
    ``capacity=`` for a Redis object): it is refused rather than ignored."""


# --- topic ---


class MessagesLost(ShmkitError):
    """A subscriber of a topic with ``overflow="overwrite"`` fell so far behind
    that messages were overwritten before it read them.  ``.missed`` says
    exactly how many; the subscriber goes on from the oldest message still
    there (the next ``recv`` returns it)."""

    def __init__(self, message: str = "", missed: int = 0) -> None:
        super().__init__(message)
        self.missed = missed

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0] if self.args else "", self.missed))


# --- service ---


class ServiceUnavailable(ShmkitError, ConnectionRefusedError):
    """A call to a service that has no worker attached (after the client's
    ``wait_for_worker`` seconds), or whose workers all left while the call
    waited.  Start a worker (``Service(name).serve(handler)``)."""


class WorkerDied(ShmkitError, ConnectionAbortedError):
    """The worker that took a call's request died before answering it (the
    kernel counted its attachment out).  The request may have been partly
    carried out; the message names the worker's pid (or that of the worker
    that took its place and told of it)."""


class RemoteError(ShmkitError, RuntimeError):
    """The worker's handler raised while answering the call (or the worker
    failed the request): the message holds the worker's traceback."""


class ReplyLost(ShmkitError, ConnectionAbortedError):
    """The worker answered the call, but its reply never reached the caller:
    the caller's reply channel was full (the process was stopped, or its
    event loop blocked, with many replies due) while the worker already kept
    as many undelivered replies as it may.  The request was answered (the
    reply may have been an error).  Read replies sooner, or make the client
    with a larger ``reply_capacity=``."""
