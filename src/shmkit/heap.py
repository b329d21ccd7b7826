"""A heap of movable blocks in shared memory, addressed by handles.

Any process attached to the heap allocates blocks, gets a small
:class:`Handle` for each, and can pass that handle (8 bytes) to any other
process.  The heap grows on demand up to ``max_size``.  To touch a block's
bytes, *pin* it: a pinned block does not move,
and the view is valid inside the ``with``.  ``compact()`` slides unpinned
blocks together to join the free space; handles stay valid.  A handle used
after its block was freed raises :class:`StaleHandleError`, never reaching
another block's data::

    import numpy as np, shmkit
    heap = shmkit.Heap("pool", size=256 << 20)        # create or open
    h = heap.alloc(1 << 20)                          # a Handle
    with heap.pin_array(h, "float32") as a:          # numpy, no copy
        a[:] = np.arange(a.size)
    wire = bytes(h)                                  # 8 bytes for a pipe or channel
    same = shmkit.Handle.from_bytes(wire)            # ... in another process
    with heap.pin(same) as view:
        first = bytes(view[:4])
    heap.free(h)
    heap.close()

Crash robustness: a process killed at any point (holding pins, or inside
alloc, free, realloc or a compaction move) leaves the heap consistent; its
pins are released and a half-done change is rolled back (or, for a block
copy, rolled forward) by the next process that takes the heap's lock.
:meth:`Heap.verify` checks every invariant.  The layout and protocols are
described in ``_core/heap.c`` and ``docs/heap.md``.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

from ._lazy import numpy
from . import _core
from .errors import (
    BusyError,
    ClosedError,
    CorruptError,
    FormatVersionError,
    HeapFullError,
    MismatchError,
    OwnerDiedWarning,
    PinnedError,
    ReadOnlyError,
    SizeLimitError,
    StaleHandleError,
)
from ._object import DEFAULT, SharedObject, attach_segment, check_common, given, mismatch
from .segment import DEFAULT_MAX_ATTACH, DEFAULT_RESERVE, Kind, Segment, check_max_attach
from .sync import _deadline

__all__ = ["Heap", "Handle", "Pin", "ArrayPin", "HeapFullError", "PinnedError",
           "StaleHandleError"]


HEAP_FORMAT = _core.HEAP_FORMAT
_UNIT = 16
_STEP_BUDGET = 256 << 10   # bytes a compaction step moves before releasing the lock
_DEFAULT_PINS = 64
_MAX_DATA = 0xFFFFFFF0 * _UNIT  # block sizes are u32 counts of 16-byte units
_PAGE = 4096
_SPLIT, _SHORT = -1, -2  # alloc/realloc: free space split up / too little
_new = object.__new__


class Handle:
    """A reference to one heap block: table index and generation, 8 bytes.

    Handles are small, hashable and picklable values, and travel between
    processes as 8 bytes (``bytes(h)`` / ``Handle.from_bytes(b)``).  They stay
    valid while their block moves; after ``free`` the generation no longer
    matches and every use raises :class:`StaleHandleError`.

    Example
    -------
    >>> h = Handle(3, 7)
    >>> Handle.from_bytes(bytes(h)) == h, h.index, h.generation
    (True, 3, 7)
    """

    __slots__ = ("_value",)

    def __init__(self, index: int, generation: int) -> None:
        if not (0 <= index < 1 << 32 and 0 <= generation < 1 << 32):
            raise ValueError("a handle's index and generation are 32-bit unsigned ints")
        self._value = generation << 32 | index

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Handle":
        """The handle whose ``bytes()`` are ``data`` (8 bytes, as sent by a peer).

        >>> Handle.from_bytes(b"\\x01\\0\\0\\0\\x02\\0\\0\\0")
        Handle(index=1, generation=2)
        """
        raw = bytes(data)
        if len(raw) != 8:
            raise ValueError(f"a handle is 8 bytes, not {len(raw)}")
        return _handle(int.from_bytes(raw, "little"))

    @classmethod
    def from_int(cls, value: int) -> "Handle":
        """The handle whose ``int()`` is ``value`` (a u64)."""
        if not 0 <= value < 1 << 64:
            raise ValueError("a handle is a 64-bit unsigned int")
        return _handle(value)

    @property
    def index(self) -> int:
        """The block's entry in the heap's handle table."""
        return self._value & 0xFFFFFFFF

    @property
    def generation(self) -> int:
        """Bumped each time the entry is freed, so old handles go stale."""
        return self._value >> 32

    def __bytes__(self) -> bytes:
        return self._value.to_bytes(8, "little")

    def __int__(self) -> int:
        return self._value

    def __eq__(self, other: object) -> bool:
        if type(other) is not Handle:
            return NotImplemented
        return self._value == other._value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple:
        return (_handle, (self._value,))

    def __repr__(self) -> str:
        return f"Handle(index={self.index}, generation={self.generation})"


def _handle(value: int, _cls: type = Handle) -> Handle:
    h = _new(_cls)
    h._value = value
    return h


Pin = _core.Pin
# Pin (a C type, _core/heap.c): a pinned block; its bytes stay where they are
# until release().  `with heap.pin(h) as view:` gives the block's memoryview
# (.view) and releases the pin, and the view, at the end; a Pin that is
# garbage collected releases itself.  An array made from the view that
# outlives the pin still points into the mapping (it cannot crash), but the
# block may then move or be freed: copy what you keep.


class ArrayPin:
    """A pin whose ``with`` gives a numpy array over the block (see :meth:`Heap.pin_array`)."""

    __slots__ = ("_pin", "_array")

    def __init__(self, pin: Any, array: Any) -> None:
        self._pin = pin
        self._array = array

    @property
    def array(self) -> Any:
        """The array (until released)."""
        if self._pin.released:
            raise ValueError("this pin was released")
        return self._array

    @property
    def handle(self) -> Handle:
        return self._pin.handle

    @property
    def released(self) -> bool:
        return self._pin.released

    def release(self) -> None:
        """Unpin the block; the array must not be used afterwards."""
        self._array = None
        self._pin.release()

    def __enter__(self) -> Any:
        return self.array

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<shmkit.ArrayPin {self._pin!r}>"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


class Heap(SharedObject):
    """A heap of movable blocks in a named segment, shared by many processes.

    ``Heap(name, size=n)`` opens ``name`` if it exists, else creates it with
    ``n`` bytes of data area (block headers of 16 bytes come out of it);
    ``Heap.create`` / ``Heap.open`` insist on one or the other.  The heap
    holds its segment privately: blocks are reached only through handles,
    pins and the methods below.

    Parameters
    ----------
    name:
        The heap's name (``None`` makes a unique one, see ``.name``).
    size:
        Bytes of data area when creating (rounded down to 16); the heap
        grows from there on demand.  When opening, a given size is honoured
        (a smaller heap grows to it) or, beyond the heap's ``max_size``,
        refused with :class:`MismatchError`; leave it out to adopt the heap
        as it is.
    max_size:
        The most bytes of data area the heap may grow to (default
        ``max(size, 4 GiB)``; at most about 64 GiB).  Only address space is
        reserved; memory is taken as the heap grows.  When opening, a given
        max_size must be the heap's own.
    max_blocks:
        Handle-table entries: the most blocks that can exist at once, fixed
        at creation (default ``max(size // 1024, max_size // 65536)``, at
        least 1024, at most 4 Mi).
    max_pins:
        Distinct blocks one attachment may hold pinned at once (default 64).
    on_destroy:
        Called (no arguments) once, in the process that removes the name:
        its ``unlink()``, or the last ``close()`` with ``lifetime="attached"``.
    path, readonly, mode, lifetime, max_attach:
        As for :class:`shmkit.Segment`.  A read-only attachment can only
        look (``statistics()``, ``shmkit info``).

    Raises
    ------
    NotFoundError, ExistsError, WrongKindError, FormatVersionError,
    CorruptError, OutOfSpaceError, InvalidNameError, MismatchError

    Example
    -------
    >>> with Heap(None, size=1 << 16) as heap:
    ...     h = heap.put(b"hello")
    ...     heap.read(h), heap.size_of(h)
    (b'hello', 5)
    """

    _what = "heap"
    _heapcore: Any = None
    _readonly = False

    def __init__(self, name: str | None = None, size: int | None = None, *,
                 max_size: int | None = None, max_blocks: int | None = None, max_pins: int = DEFAULT,
                 create: bool | None = None, path: str | os.PathLike[str] | None = None,
                 readonly: bool = False, mode: int | None = None, lifetime: str = DEFAULT,
                 max_attach: int = DEFAULT,
                 on_destroy: Callable[[], Any] | None = None,
                 trust_owner: int | str | None = None) -> None:
        payload = layout = init = None
        data = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 2 * _UNIT:
                raise ValueError(f"size must be an int of at least {2 * _UNIT} bytes, "
                                 f"not {size!r}")
            data = size // _UNIT * _UNIT
        if max_size is not None and (not isinstance(max_size, int)
                                     or isinstance(max_size, bool)
                                     or not 2 * _UNIT <= max_size <= _MAX_DATA):
            raise ValueError(f"max_size must be an int in {2 * _UNIT}..{_MAX_DATA} bytes, "
                             f"not {max_size!r}")
        if max_blocks is not None and (not isinstance(max_blocks, int)
                                       or isinstance(max_blocks, bool)
                                       or not 1 <= max_blocks <= 1 << 30):
            raise ValueError(f"max_blocks must be an int in 1..2**30, not {max_blocks!r}")
        if given(max_pins) and (not isinstance(max_pins, int) or isinstance(max_pins, bool)
                                or not 1 <= max_pins <= 4096):
            raise ValueError(f"max_pins must be an int in 1..4096, not {max_pins!r}")
        slots = check_max_attach(max_attach) if given(max_attach) else DEFAULT_MAX_ATTACH
        top = None
        if data is not None and create is not False:
            if max_size is None:
                most = min(max(data, DEFAULT_RESERVE), _MAX_DATA)
            else:
                most = max_size // _UNIT * _UNIT
                if most < data:
                    raise ValueError(f"max_size={max_size} is smaller than size={size}; "
                                     "give a max_size of at least size")
            blocks = max_blocks
            if blocks is None:
                blocks = min(max(data // 1024, most // 65536, 1024), 1 << 22)
            pins = max_pins if given(max_pins) else _DEFAULT_PINS
            payload, top = _core.heap_layout(data, most, blocks, pins, slots)
            layout = {"format": HEAP_FORMAT, "data_bytes": data, "max_size": most,
                      "max_blocks": blocks, "max_pins": pins}
            salt = int.from_bytes(os.urandom(4), "little")

            def init(seg: Segment) -> None:
                _core.heap_format(seg._mapping, seg._hsize, data, most, blocks, pins, slots,
                                  salt)
        elif create:
            raise ValueError("creating a heap needs size=")
        if given(lifetime):
            life: str | None = lifetime
        else:
            life = None  # "attached" for name=None, else persistent (the segment decides)
        seg = attach_segment(Kind.HEAP, name, path, size=payload, create=create,
                             readonly=readonly, mode=mode, lifetime=life,
                             max_size=top, max_attach=slots, layout=layout, init=init,
                             trust_owner=trust_owner)
        self._on_destroy = on_destroy
        self._adopt(seg, size=data, max_size=max_size, max_blocks=max_blocks,
                    max_pins=max_pins, lifetime=lifetime, max_attach=max_attach)
        if data is not None and not seg.created and not seg.readonly:
            try:  # honoured: an existing heap grows to the size asked for
                self._grow_to(data, None)
            except BaseException:
                self.close()
                raise

    def _adopt(self, seg: Segment, size: int | None = None, max_size: int | None = None,
               max_blocks: int | None = None, max_pins: Any = DEFAULT,
               lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        try:
            stored = seg._layout
            fmt = stored.get("format")
            if fmt != HEAP_FORMAT:
                raise FormatVersionError(
                    f"heap {seg.name!r} has heap format {fmt}; this shmkit reads format "
                    f"{HEAP_FORMAT}. Use the shmkit that made it, or remove it with "
                    "`shmkit rm`")
            most = stored.get("max_size", 0)
            if type(most) is not int or most < 0:
                raise CorruptError(f"heap {seg.name!r} has an unreadable max_size {most!r}")
            if not seg.created:
                # An explicit parameter is honoured or refused, never ignored.
                asked_max = None if max_size is None else max_size // _UNIT * _UNIT
                for param, asked in (("max_size", asked_max), ("max_blocks", max_blocks),
                                     ("max_pins", None if max_pins is DEFAULT else max_pins)):
                    if asked is not None and stored.get(param) != asked:
                        raise mismatch("heap", seg.name, param, asked, stored.get(param))
                if size is not None and size > most:
                    raise MismatchError(
                        f"heap {seg.name!r} exists and can grow to max_size={most} bytes, "
                        f"but size={size} was asked; leave size= out to adopt it, or "
                        f"unlink it (`shmkit rm {seg.name}`) and create it again with a "
                        "larger max_size=")
                check_common("heap", seg, lifetime=lifetime, max_attach=max_attach)
            core = _core.HeapCore(seg._mapping, seg._hsize, seg._sync_size(), seg.name)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self._readonly = seg.readonly
        self._heapcore = core

    @classmethod
    def create(cls, name: str | None = None, size: int = 0, **kwargs: Any) -> "Heap":
        """Create a new heap; :class:`ExistsError` if the name is taken.

        >>> h = Heap.create(size=4096); h.created
        True
        >>> h.close(); h.unlink()
        """
        return cls(name, size, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Heap":
        """Open an existing heap; :class:`NotFoundError` if there is none.

        ``size=`` and the other parameters, if given, must match the heap.
        """
        return cls(name, create=False, **kwargs)

    # -- internals -----------------------------------------------------------

    def _core_rw(self) -> Any:
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        if self._readonly:
            raise ReadOnlyError(f"heap {self.name!r} was opened readonly=True; open it "
                                "without readonly to allocate, pin or free")
        return core

    @staticmethod
    def _value(h: Handle) -> int:
        if type(h) is not Handle:
            raise TypeError(f"expected a shmkit.Handle, not {type(h).__name__}; "
                            "rebuild one with Handle.from_bytes()")
        return h._value

    def _compact_until(self, until: int, deadline: float | None) -> dict:
        core = self._core_rw()
        out = {"moved_bytes": 0, "moved_blocks": 0, "pinned_skipped": 0}
        restart = True
        while True:
            moved, blocks, run, done, skipped = core.compact_step(
                restart, until, _STEP_BUDGET, _remaining(deadline))
            restart = False
            out["moved_bytes"] += moved
            out["moved_blocks"] += blocks
            out["pinned_skipped"] += skipped
            if done or (until and run >= until):
                return out

    def _no_room(self, nbytes: int) -> HeapFullError:
        s = self.statistics()
        if s["size"] >= s["max_size"]:
            return HeapFullError(
                f"heap {self.name!r} is full: it reached its max_size of {s['max_size']} "
                f"bytes, with {s['free']} bytes free but no run of {nbytes} bytes "
                f"(block header included: {_block_bytes(nbytes)}), even after compacting "
                f"({s['pinned']} pinned block(s)); free or unpin some blocks, or create it "
                "with a larger max_size=")
        return HeapFullError(
            f"heap {self.name!r} has {s['free']} bytes free but no run of {nbytes} bytes, "
            f"even after compacting and growing: {s['pinned']} pinned block(s) keep the "
            "free space apart (or other processes took it meanwhile); unpin blocks, free "
            "some, or try again")

    def _grow(self, nbytes: int, deadline: float | None) -> bool:
        """Grow the data area so that a block of ``nbytes`` fits at its end:
        doubling, or at least by the block, up to max_size.  The segment's
        file is extended first (harmless if we die before the heap's words
        change), then the heap's units, in one journaled step.  False when
        the heap is already at its max_size."""
        have, most, _ = self._core_rw().capacity()
        if have >= most:
            return False
        self._grow_to(max(have * 2 if have < 1 << 30 else have + (have >> 2),
                          have + _block_bytes(nbytes)), deadline)
        return True

    def _grow_to(self, want: int, deadline: float | None) -> None:
        """Grow the data area to at least ``want`` bytes (a page multiple, at
        most max_size); nothing when it is that large already."""
        core = self._core_rw()
        have, most, data_off = core.capacity()
        if want <= have:
            return
        want = min(-(-want // _PAGE) * _PAGE, most)
        with warnings.catch_warnings():
            # a grower killed while extending leaves the segment's own lock to
            # be taken over; the heap repairs itself, so this is not news
            warnings.simplefilter("ignore", OwnerDiedWarning)
            self._seg._grow_to(data_off + want, _remaining(deadline))
        core.grow(want, _remaining(deadline))

    def _make_room(self, code: int, nbytes: int, tries: list[int],
                   deadline: float | None) -> None:
        """After alloc/realloc found no room: compact when the free space is
        enough but split up (up to three times), else grow; HeapFullError
        when neither can help."""
        if code == _SPLIT and tries[0] < 3:
            tries[0] += 1
            self._compact_until(_block_bytes(nbytes), deadline)
            return
        tries[1] += 1
        if tries[1] > 8 or not self._grow(nbytes, deadline):
            raise self._no_room(nbytes)

    # -- blocks --------------------------------------------------------------

    def alloc(self, nbytes: int, *, zero: bool = False, timeout: float | None = None
              ) -> Handle:
        """Allocate a block of ``nbytes`` and return its handle.

        The bytes are not cleared (like ``numpy.empty``) unless ``zero=True``.
        When the free space is enough in total but split up, the heap
        compacts itself and tries again; when it is too little, the heap
        grows (doubling, up to ``max_size``).  Handles and pins stay valid.

        Raises :class:`HeapFullError` when it cannot fit even at
        ``max_size``, :class:`Timeout`
        if the heap's lock is not free within ``timeout`` seconds.

        >>> with Heap(None, size=4096) as heap:
        ...     heap.size_of(heap.alloc(100, zero=True))
        100
        """
        core = self._heapcore
        if core is None or self._readonly:
            core = self._core_rw()
        if type(nbytes) is not int or not 0 <= nbytes < 1 << 63:
            nbytes = _nbytes(nbytes)
        v = core.alloc(nbytes, zero, timeout)
        if v < 0:
            deadline = _deadline(timeout)
            tries = [0, 0]
            while v < 0:
                self._make_room(v, nbytes, tries, deadline)
                v = core.alloc(nbytes, zero, _remaining(deadline))
        return _handle(v)

    def put(self, data: Any, *, timeout: float | None = None) -> Handle:
        """Allocate a block holding a copy of ``data`` (any bytes-like object).

        The block is made and filled in one step of the core, under the
        heap's lock: a Ctrl-C or a death leaves it whole or not made.
        ``timeout`` bounds the wait for the lock, as for :meth:`alloc`.

        >>> with Heap(None, size=4096) as heap:
        ...     heap.read(heap.put(b"abc"))
        b'abc'
        """
        core = self._heapcore
        if core is None or self._readonly:
            core = self._core_rw()
        src = memoryview(data).cast("B")
        # one core call allocates and copies in (under the lock), so no
        # Ctrl-C between two steps leaves a block made but unfilled, or
        # made and owned by nobody; only the handle's return remains, as
        # alloc's (and os.open's)
        v = core.put(src, timeout)
        if v < 0:
            deadline = _deadline(timeout)
            tries = [0, 0]
            while v < 0:
                self._make_room(v, src.nbytes, tries, deadline)
                v = core.put(src, _remaining(deadline))
        return _handle(v)

    def free(self, handle: Handle, *, timeout: float | None = None) -> None:
        """Free the block; its handle (and every copy of it) goes stale.

        Raises :class:`PinnedError` while anyone holds it pinned, and
        :class:`StaleHandleError` if it was already freed.
        """
        core = self._heapcore
        if core is None or self._readonly:
            core = self._core_rw()
        if type(handle) is not Handle:
            self._value(handle)  # raises TypeError
        core.free(handle._value, timeout)

    def size_of(self, handle: Handle, *, timeout: float | None = None) -> int:
        """The size the block was allocated (or last resized) with.

        Lock-free, unless the block is being moved or resized by another
        process: then it waits for that change to end, :class:`Timeout`
        after ``timeout`` seconds (``None``: as long as it takes).

            >>> heap.size_of(h, timeout=1.0)  # doctest: +SKIP
        """
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        return core.size_of(self._value(handle), timeout)

    def realloc(self, handle: Handle, nbytes: int, *, zero: bool = False,
                timeout: float | None = None) -> Handle:
        """Resize the block to ``nbytes``, keeping its content (and its handle).

        Grows in place when the space after it is free, else copies it to a
        new place (compacting or growing the heap as :meth:`alloc` does);
        the returned handle is ``handle`` itself.  New bytes are
        cleared only with ``zero=True``.  Raises :class:`PinnedError` while
        it is pinned, :class:`HeapFullError` if it cannot fit.
        """
        core = self._core_rw()
        v = self._value(handle)
        if type(nbytes) is not int or not 0 <= nbytes < 1 << 63:
            nbytes = _nbytes(nbytes)
        r = core.realloc(v, nbytes, zero, timeout)
        if r < 0:
            deadline = _deadline(timeout)
            tries = [0, 0]
            while r < 0:
                self._make_room(r, nbytes, tries, deadline)
                r = core.realloc(v, nbytes, zero, _remaining(deadline))
        return handle

    def pin(self, handle: Handle, *, timeout: float | None = None) -> Pin:
        """Pin the block so it cannot move; ``with heap.pin(h) as view:``.

        The memoryview covers exactly ``size_of(h)`` bytes and is valid until
        the pin is released (the end of the ``with``).  Pinning is lock-free;
        it waits (up to ``timeout``) only while the block is being moved.
        Any number of processes may pin the same block at once.

        >>> with Heap(None, size=4096) as heap:
        ...     h = heap.alloc(4)
        ...     with heap.pin(h) as view:
        ...         view[:] = b"abcd"
        ...     heap.read(h)
        b'abcd'
        """
        core = self._heapcore
        if core is None or self._readonly:
            core = self._core_rw()
        if type(handle) is not Handle:
            self._value(handle)  # raises TypeError
        return core.pin(handle._value, timeout, handle)

    def pin_array(self, handle: Handle, dtype: Any = "uint8", shape: Any = None, *,
                  offset: int = 0, timeout: float | None = None) -> ArrayPin:
        """Pin the block and view it as a numpy array, without copying.

        ``shape`` defaults to as many items of ``dtype`` as fit after
        ``offset``; given, its dimensions are ints of at least 0 (no -1:
        the array may cover less than the block, so none is implied).
        ``with heap.pin_array(h, "float64", (3, 4)) as a:``

        >>> import numpy as np
        >>> with Heap(None, size=4096) as heap:
        ...     h = heap.alloc(32)
        ...     with heap.pin_array(h, np.int64) as a:
        ...         a[:] = 7
        ...     int(np.frombuffer(heap.read(h), np.int64).sum())
        28
        """
        np = numpy()
        dt = np.dtype(dtype)
        if shape is not None:
            # numpy reads any negative dimension as -1, "what is left": refused
            # before pinning, as is a dimension that is no int
            if hasattr(shape, "__iter__"):
                shape = tuple(_index(d, "a dimension of shape") for d in shape)
            else:
                shape = (_index(shape, "shape"),)
            if any(d < 0 for d in shape):
                raise ValueError(f"shape {shape} has a negative dimension; give each "
                                 "dimension as an int of at least 0")
        pin = self.pin(handle, timeout=timeout)
        try:
            n = pin.view.nbytes
            if shape is None:
                shape = ((n - offset) // dt.itemsize,) if n > offset else (0,)
            count = 1
            for d in shape:
                count *= d
            if offset < 0 or offset + count * dt.itemsize > n:
                raise ValueError(f"{count} items of {dt} at offset {offset} do not fit in "
                                 f"the block's {n} bytes")
            arr = np.frombuffer(pin.view, dtype=dt, count=count, offset=offset).reshape(shape)
        except BaseException:
            pin.release()
            raise
        return ArrayPin(pin, arr)

    def read(self, handle: Handle, *, timeout: float | None = None) -> bytes:
        """A copy of the block's bytes."""
        with self.pin(handle, timeout=timeout) as view:
            return bytes(view)

    def write(self, handle: Handle, data: Any, offset: int = 0, *,
              timeout: float | None = None) -> int:
        """Copy ``data`` into the block at ``offset``; returns its length."""
        if type(offset) is not int:
            offset = _index(offset, "offset")
        src = memoryview(data).cast("B")
        with self.pin(handle, timeout=timeout) as view:
            if offset < 0 or offset + src.nbytes > view.nbytes:
                raise IndexError(f"bytes {offset}..{offset + src.nbytes} are outside the "
                                 f"block's {view.nbytes} bytes; realloc() it first")
            view[offset:offset + src.nbytes] = src
        return src.nbytes

    # -- the whole heap ------------------------------------------------------

    def compact(self, *, timeout: float | None = None) -> dict:
        """Slide unpinned blocks together so the free space is one run.

        Handles stay valid; pinned blocks stay put (free space before them
        remains).  The lock is released every ~256 KiB moved, so other
        processes keep allocating meanwhile, and readers holding pins are
        never stopped.  Returns ``{"moved_bytes", "moved_blocks",
        "pinned_skipped"}``.
        """
        deadline = _deadline(timeout)
        return self._compact_until(0, deadline)

    def statistics(self, *, timeout: float | None = None) -> dict:
        """Usage: ``size``, ``used``, ``free``, ``largest_free``, ``blocks``,
        ``free_blocks``, ``pinned``, ``fragmentation`` (0 when the free space
        is one run, towards 1 when it is scattered), and counters (allocs,
        frees, moves, moved_bytes, compactions, recoveries, reclaimed_pins).
        Byte counts include the 16-byte block headers.
        """
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        if self._readonly:
            return core.stats(False, timeout)
        return core.stats(True, timeout)

    def verify(self, *, timeout: float | None = None) -> dict:
        """Check every invariant of the heap; :class:`CorruptError` names the first broken one.

        Walks all blocks, free lists, the handle table and the pin tables
        (under the lock), so it costs time proportional to the heap's size.
        Returns a summary (blocks, free_blocks, used, free, handles_used,
        free_handles, pinned).
        """
        self._seg._check_truncated(look=True)  # a shrunk file: nothing below is trusted
        return self._core_rw().verify(timeout)

    @property
    def capacity(self) -> int:
        """Bytes of data area now (block headers included); grows on demand."""
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        return core.capacity()[0]

    @property
    def max_size(self) -> int:
        """The most bytes of data area the heap may grow to."""
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        return core.capacity()[1]

    def _where(self, handle: Handle) -> tuple[int, int, int]:
        """(block unit, nbytes, live pins): where the block lives now (tests)."""
        return self._core_rw().where(self._value(handle))

    def pins_held(self) -> int:
        """Pins this attachment holds now."""
        core = self._heapcore
        if core is None:
            raise ClosedError(f"heap {self.name!r} is closed in this process")
        return core.pins_held()

    def close(self) -> None:
        """Release this handle.  Raises :class:`BusyError` while it holds pins.

        Safe to call twice.  With ``lifetime="attached"`` the last handle to
        close removes the heap (and runs ``on_destroy`` there).
        """
        core = self._heapcore
        if not self.closed and core is not None and not self._readonly and core.pins_held():
            raise BusyError(f"heap {self.name!r}: this attachment still holds "
                            f"{core.pins_held()} pin(s); release them before close()")
        super().close()  # (closed: runs what a Ctrl-C left of an earlier close)

    def _release(self) -> None:
        core, self._heapcore = self._heapcore, None
        if core is not None:
            core.close()

    def _describe(self) -> dict:
        try:
            s = self.statistics(timeout=1.0)
        except Exception as e:  # info must not fail on a damaged heap
            return {"heap": {"error": f"{type(e).__name__}: {e}"}}
        keep = ("size", "max_size", "used", "free", "largest_free", "fragmentation", "blocks",
                "free_blocks", "pinned", "max_blocks", "handles_used", "allocs", "frees",
                "moves", "moved_bytes", "compactions", "recoveries", "reclaimed_pins")
        return {"heap": {k: s[k] for k in keep if k in s}}

    def __repr__(self) -> str:
        if self.closed or self._heapcore is None:
            return f"<shmkit.Heap {self.name!r} closed>"
        return f"<shmkit.Heap {self.name!r} capacity={self.capacity}>"


def _block_bytes(nbytes: int) -> int:
    return max(2, -(-nbytes // _UNIT) + 1) * _UNIT


def _nbytes(v: Any) -> int:
    """A block's size as alloc() and realloc() take it: an int (or what
    converts like one, as numpy's integers), not a bool, 0 to 2**63 - 1."""
    v = _index(v, "nbytes")
    if v < 0:
        raise ValueError(f"nbytes must be >= 0, not {v}")
    if v >= 1 << 63:
        raise SizeLimitError(f"nbytes {v} is more than any heap can hold; ask for less")
    return v


def _index(v: Any, what: str) -> int:
    """An int argument (or what converts like one), never a bool."""
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        return v.__index__()
    except AttributeError:
        raise TypeError(f"{what} must be an int, not {type(v).__name__}") from None
