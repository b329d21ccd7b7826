"""A message as a numpy array (Channel and Subscriber ``recv_array``), and a
buffer to copy one into (the Redis backend's ``recv_into`` and ``get_into``).

The core checks the message's length against what the array needs before
it takes the message (``_take_sized``), so that one that does not fit stays
unread, the next message, and :class:`LayoutMismatchError` says so.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from . import _core
from ._lazy import numpy
from ._object import DEFAULT
from .errors import LayoutMismatchError, SizeLimitError


def array_terms(dtype: Any, shape: Any, out: Any, what: str
                ) -> tuple[Any, Any, int, int | None]:
    """numpy, the dtype, and the sizes a message must have (see array_fit)
    for recv_array's array of ``dtype`` (uint8 when DEFAULT) in ``shape``,
    or ``out``; what no message fits is refused here, before anything is
    taken, and so are a dtype or shape given with ``out`` that are not its."""
    np = numpy()
    if out is None:
        dt = np.dtype("uint8" if dtype is DEFAULT else dtype)
        unit, nbytes = array_fit(np, dt, shape, what)
        return np, dt, unit, nbytes
    if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
            and out.flags.writeable):
        raise ValueError("out= must be a writable, C-contiguous numpy array")
    if out.dtype.hasobject:  # (recv_into would have written bytes over its pointers)
        raise TypeError(f"numpy makes no array of a message's bytes in dtype {out.dtype} "
                        "(Python objects); give an out= of a sized dtype")
    if dtype is not DEFAULT and np.dtype(dtype) != out.dtype:
        raise ValueError(f"dtype {np.dtype(dtype)} disagrees with out=, an array of "
                         f"{out.dtype}: give out= alone (its dtype is used), or its dtype")
    if shape is not None and not _same_shape(shape, out.shape):
        raise ValueError(f"shape {shape} disagrees with out=, of shape {out.shape}: give "
                         "out= alone (its shape is used), or its shape")
    return np, out.dtype, 0, out.nbytes


def _same_shape(shape: Any, have: tuple[int, ...]) -> bool:
    """Is ``shape`` (-1 matching any one dimension) ``have``?"""
    dims = _dims(shape)
    return len(dims) == len(have) and all(d in (-1, h) for d, h in zip(dims, have))


def writable_bytes(buffer: Any, call: str) -> memoryview:
    """``buffer`` as a writable memoryview of bytes, for a copy into it;
    TypeError naming ``call`` for a buffer raw bytes may not be written to
    (read-only, not contiguous, of Python objects: the core's check)."""
    _core.check_writable_bytes(buffer, call)
    try:
        return memoryview(buffer).cast("B")
    except ValueError:  # numpy gives no format for a datetime64: view its bytes
        return memoryview(buffer.reshape(-1).view(numpy().uint8))


def array_fit(np: Any, dt: Any, shape: Any, what: str) -> tuple[int, int | None]:
    """The bytes a message must be a multiple of, and exactly (None: any),
    for recv_array to make an array of ``dt`` in ``shape`` of it.  A shape
    no message fits is refused here; ``what`` ("channel", "topic") names
    the messages in that error."""
    if dt.itemsize == 0 or dt.hasobject:
        raise TypeError(f"numpy makes no array of a message's bytes in dtype {dt} "
                        "(no bytes, or Python objects); give a sized dtype ('u1', 'S10', 'V8')")
    if shape is None:
        return dt.itemsize, None
    dims = _dims(shape)
    if any(d < -1 for d in dims) or dims.count(-1) > 1:
        raise ValueError(f"shape {shape}: give dimensions of at least 0, one of which may "
                         "be -1 (set by the message's size)")
    if len(dims) + dt.ndim > 16:  # beyond numpy's limit (32 or 64): its ValueError
        np.empty((0,) * len(dims), dt)
    if 0 in dims and -1 not in dims:
        # no items, but numpy still refuses a dimension beyond its index type,
        # or a product of them that is: its ValueError, before the take
        np.empty(dims, dt)
    # frombuffer makes items of dt's base type (a sub-array dtype adds its
    # dimensions), which the shape counts: whole dt items, and whole rows
    base = dt.base.itemsize if dt.subdtype is not None else dt.itemsize
    known = math.prod(d for d in dims if d != -1) * base
    if known >= 1 << 32:
        raise SizeLimitError(f"shape {shape} of {dt} is {known} bytes or more, beyond any "
                             f"{what} message (under 2**32 bytes); give a smaller shape")
    if -1 not in dims:
        if known % dt.itemsize:
            raise ValueError(f"shape {shape} of {dt} is {known} bytes, not a whole number "
                             f"of its {dt.itemsize}-byte items")
        return 0, known
    if known == 0:
        raise ValueError(f"shape {shape}: a dimension of 0 leaves -1 unknowable; give "
                         "every dimension")
    return math.lcm(known, dt.itemsize), None


def _dims(shape: Any) -> tuple[int, ...]:
    """A shape's dimensions: an int, or a sequence of them."""
    try:
        return (operator.index(shape),)
    except TypeError:
        return tuple(operator.index(d) for d in shape)


def misfit(what: str, name: str | None, length: int, dt: Any, shape: Any, unit: int,
           nbytes: int | None, out: bool = False) -> LayoutMismatchError:
    """The error for a message of ``length`` bytes, left unread, that no
    array of ``dt`` in ``shape`` fits (its terms ``unit`` and ``nbytes``,
    as array_fit gave them); ``out``: that array is recv_array's out=."""
    return LayoutMismatchError(
        f"{what} {name!r}: the next message has {length} bytes, and "
        + ("out=, " if out else "") + f"an array of {dt}"
        + ("" if shape is None else f" in shape {shape}") + ("," if out else "") + " needs "
        + (f"{nbytes}" if nbytes is not None else f"a multiple of {unit}")
        + "; it was left unread: receive it with recv(), or recv_array() with "
        + ("an out= of its size" if out else "a dtype and shape that fit it"))


def received_array(handle: Any, what: str, name: str | None, dtype: Any, shape: Any,
                   timeout: float | None, out: Any = None) -> Any:
    """recv_array of a Channel or a Subscriber (``handle``, whose messages
    ``what`` names): the next message as an array, or into ``out``."""
    np, dt, unit, nbytes = array_terms(dtype, shape, out, what)
    view = handle._take_sized(timeout, unit, nbytes)
    try:
        return array_of(what, name, np, view, dt, shape, unit, nbytes, out)
    except BaseException:
        # the array was not made (no memory, a Ctrl-C): the message is kept
        # for the next receive, in one call of the core
        handle._keep(view)
        raise


def array_of(what: str, name: str | None, np: Any, view: Any, dt: Any, shape: Any,
             unit: int, nbytes: int | None, out: Any = None) -> Any:
    """recv_array's result from what ``_take_sized`` returned: the message's
    view, or its length if it did not fit (it was left unread).  The view is
    let go as the caller's frame ends, not here: a failure (no memory, a
    Ctrl-C) before then leaves it for the caller to keep (``_keep``)."""
    if type(view) is int:
        raise misfit(what, name, view, dt, shape if out is None else out.shape, unit, nbytes,
                     out is not None)
    src = np.frombuffer(view, dtype=dt if out is None else np.uint8)
    if out is None:
        return (src.reshape(shape) if shape is not None else src).copy()
    if out.nbytes:
        out.reshape(-1).view(np.uint8)[...] = src
    return out
