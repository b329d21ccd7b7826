"""Typed records and arrays mapped by name, built once by their creator.

``Struct`` holds one record (a ctypes Structure or a numpy structured dtype);
``Array`` holds an n-dimensional numpy array.  ``init`` runs exactly once, in
the process that creates the segment, before any other process can open it.
Opening with another layout raises :class:`LayoutMismatchError`; opening
without a type rebuilds it from the layout stored in the header.

Each holds its segment privately: the record or array is the only way to
its bytes, and it covers exactly the payload.  A ``ctypes.c_char * N``
field is one fixed-length bytes value (numpy ``S{N}``), as in ctypes.

>>> import numpy as np, shmkit
>>> a = shmkit.Array(None, "float32", (2, 3), init=lambda arr: arr.fill(1.5))
>>> float(a.array.sum())
9.0
>>> a.close(); a.unlink()
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Callable

import numpy as np

from ._object import DEFAULT, Lock, SharedObject, attach_segment, check_common, segment_options
from .errors import (
    CorruptError,
    FormatVersionError,
    LayoutMismatchError,
    ReadOnlyError,
    SizeLimitError,
)
from .segment import Kind, Segment

__all__ = ["Struct", "Array"]

# Version of the layout description below; bump it when the encoding changes.
# 2: a ctypes ``c_char * N`` field is stored as one ``S{N}`` value, not N ``S1``.
_FORMAT = 2


def _dtype_layout(dt: np.dtype) -> Any:
    """A JSON-able, exact description of a dtype (names, formats, offsets).

    A plain dtype is its ``.str`` ('<f8'); a sub-array field ('<i4', (3,)) is
    ``{"subdtype": ..., "shape": [3]}``; a structured dtype lists its fields.
    """
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return {"subdtype": _dtype_layout(base), "shape": list(shape)}
    if dt.fields is None:
        return dt.str
    return {
        "names": list(dt.names),
        "formats": [_dtype_layout(dt.fields[n][0]) for n in dt.names],
        "offsets": [dt.fields[n][1] for n in dt.names],
        "itemsize": dt.itemsize,
    }


def _dtype_from_layout(layout: Any) -> np.dtype:
    if isinstance(layout, str):
        return np.dtype(layout)
    if "subdtype" in layout:
        return np.dtype((_dtype_from_layout(layout["subdtype"]),
                         tuple(int(d) for d in layout["shape"])))
    return np.dtype({
        "names": layout["names"],
        "formats": [_dtype_from_layout(f) for f in layout["formats"]],
        "offsets": layout["offsets"],
        "itemsize": layout["itemsize"],
    })


def _char_arrays_as_bytes(dt: np.dtype) -> np.dtype:
    """``c_char * N`` comes from numpy as N one-byte cells ('S1', (N,)); make it
    one N-byte string ('S{N}'), as ctypes itself reads and writes it."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        if base == np.dtype("S1") and shape:
            inner = np.dtype(f"S{shape[-1]}")
            return inner if len(shape) == 1 else np.dtype((inner, shape[:-1]))
        return np.dtype((_char_arrays_as_bytes(base), shape))
    if dt.fields is None:
        return dt
    return np.dtype({
        "names": list(dt.names),
        "formats": [_char_arrays_as_bytes(dt.fields[n][0]) for n in dt.names],
        "offsets": [dt.fields[n][1] for n in dt.names],
        "itemsize": dt.itemsize,
    })


def _as_dtype(t: Any) -> np.dtype:
    try:
        dt = np.dtype(t)
    except TypeError as e:
        raise TypeError(f"{t!r} is neither a ctypes type nor a numpy dtype: {e}") from None
    if dt.hasobject:
        # Python object references are addresses in one process: another
        # process reading them would crash.
        raise TypeError(f"{t!r} holds Python objects, which cannot live in shared "
                        "memory; use plain numbers, bytes ('S10') or str ('U10') fields")
    if isinstance(t, type) and issubclass(t, (ctypes.Structure, ctypes.Union, ctypes.Array)):
        dt = _char_arrays_as_bytes(dt)
    return dt


# numpy's limit on an array's dimensions (the dtype's own count with them)
_MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
_MAX_ELEMENTS = (1 << 63) - 1  # numpy's sizes are signed 64-bit


def _element(dt: np.dtype) -> tuple[np.dtype, int]:
    """The record type under ``dt``'s sub-arrays, and the dimensions they add
    to a view (each of a sub-array of sub-arrays: numpy keeps those apart)."""
    dims = 0
    while dt.subdtype is not None:
        dt, sub = dt.subdtype
        dims += len(sub)
    return dt, dims


def _deepest(dt: np.dtype) -> int:
    """The most dimensions ``dt`` adds to a view of it or of any field in it
    (``a["f"]["g"]`` adds the sub-arrays of the records and of each field)."""
    element, dims = _element(dt)
    if element.fields is None:
        return dims
    return dims + max((_deepest(f[0]) for f in element.fields.values()), default=0)


def _view_problem(dt: np.dtype, shape: tuple, t: Any = None) -> Exception | None:
    """Why numpy makes no view of records of ``dt`` (given as ``t``) in
    ``shape``, or None: an unsized or empty type without fields ('S0',
    ('<f8', (0,)); a record of no fields is fine), more dimensions than it
    makes (counting the one a view is made in first), or more bytes than it
    counts, a record of no bytes and a dimension of 0 counting as 1 (the size
    check against the segment does not see them)."""
    if dt.itemsize == 0 and dt.names is None:
        return TypeError(f"{dt if t is None else t!r} has no bytes (itemsize 0) and no "
                         "fields, and numpy makes no array of it; give its size ('S10', "
                         "'U10', 'V8')")
    dims = max(len(shape), 1) + _deepest(dt)
    if dims > _MAX_DIMS:
        return ValueError(f"shape {shape} and dtype {dt} make {dims} dimensions (with the "
                          "sub-arrays of its fields); numpy makes arrays of at most "
                          f"{_MAX_DIMS}")
    count = max(dt.itemsize, 1)
    for d in shape:
        count *= d or 1
        if count > _MAX_ELEMENTS:
            return SizeLimitError(f"shape {shape} of {dt} is more than numpy can count "
                                  "(2**63 bytes, a dimension of 0 or a record of no bytes "
                                  "counting as 1)")
    return None


# Decoded record layouts, by kind and layout text: objects of one layout
# reuse it, so a reopen parses no layout (about 1 µs of an open by name);
# each gets its own copy of the dtype (0.1 µs), whose state can be changed
# in place (dtype.__setstate__). Only dtypes without fields, in their
# sub-arrays too: a structured dtype's field names can be renamed in place,
# which must not reach other handles.
_RECORDS: dict[tuple[Kind, bytes], tuple[np.dtype, tuple]] = {}


def _records_of(seg: Segment) -> tuple[np.dtype, tuple]:
    """The dtype and shape of the stored layout (untrusted), checked once per
    distinct layout text; the dtype is this handle's own copy, since
    dtype.__setstate__ changes one in place."""
    key = (seg.kind, seg._layout_text)
    got = _RECORDS.get(key)
    if got is None:
        got = _checked_records(seg)
        if _element(got[0])[0].names is None:
            if len(_RECORDS) >= 4096:
                _RECORDS.clear()
            _RECORDS[key] = got
    dtype, shape = got
    return dtype.newbyteorder(dtype.byteorder), shape  # (an equal copy)


def _checked_records(seg: Segment) -> tuple[np.dtype, tuple]:
    """The dtype and shape the stored layout describes, or the error it earns."""
    stored = seg._layout
    fmt = stored.get("format")
    if fmt != _FORMAT:
        raise FormatVersionError(
            f"{seg.name!r} describes its records in layout format {fmt}; this "
            f"shmkit reads format {_FORMAT}. Use the shmkit that made it, or remove "
            "it with `shmkit rm`")
    try:
        dtype = _dtype_from_layout(stored["dtype"])
        shape = tuple(stored["shape"]) if seg.kind == Kind.ARRAY else ()
        valid = (not dtype.hasobject and all(type(d) is int and d >= 0 for d in shape)
                 and _view_problem(dtype, shape) is None)
    except Exception:  # any malformed description, however it fails
        valid = False
    if not valid:
        raise CorruptError(f"{seg.name!r} has an unreadable record layout "
                           f"{str(stored)[:200]}; remove it with `shmkit rm`")
    return dtype, shape


def _parse_layout(seg: Segment, asked: dict | None) -> tuple[np.dtype, tuple]:
    """Check the stored layout (untrusted) and compare it with the one asked for."""
    dtype, shape = _records_of(seg)
    need = dtype.itemsize
    for d in shape:
        need *= d
    if need > seg.size:
        raise CorruptError(f"{seg.name!r} describes {need} bytes of records but "
                           f"holds {seg.size}; remove it with `shmkit rm`")
    if asked is not None and not seg.created and seg._layout != asked:
        raise LayoutMismatchError(
            f"{seg.name!r} holds {_describe(seg._layout)}, but was opened with "
            f"{_describe(asked)}; open it with its own layout, or with no type "
            "to adopt it")
    return dtype, shape


def _describe(layout: dict) -> str:
    parts = [f"dtype {layout.get('dtype')}"]
    if "shape" in layout:
        parts.append(f"shape {tuple(layout['shape'])}")
    return ", ".join(parts)


def _payload(seg: Segment, need: int) -> memoryview:
    """The payload view, refused if its size (read from the shared header, which
    another process may have damaged) is below the ``need`` bytes of the layout."""
    buf = seg.buf
    if len(buf) < need:
        raise CorruptError(f"{seg.name!r} holds {len(buf)} bytes but its layout needs "
                           f"{need}: the segment header is damaged; recreate it")
    return buf


def _struct_view(seg: Segment, dtype: np.dtype, ctype: Any) -> Any:
    if ctype is not None:
        if seg.readonly:
            raise ReadOnlyError(
                f"{seg.name!r} was opened readonly=True and a ctypes record is always "
                "writable; open it without a type for a read-only numpy record")
        return ctype.from_buffer(_payload(seg, ctypes.sizeof(ctype)))
    # frombuffer keeps the buffer exported for as long as the array lives,
    # so close() cannot unmap under it; np.ndarray(buffer=) does not.
    arr = np.frombuffer(_payload(seg, dtype.itemsize), dtype=dtype, count=1)
    arr = arr.reshape(arr.shape[1:])
    if seg.readonly:
        arr.flags.writeable = False
    return arr


def _array_view(seg: Segment, dtype: np.dtype, shape: tuple) -> np.ndarray:
    count = 1
    for d in shape:
        count *= d
    # frombuffer keeps the buffer exported (see _struct_view).
    arr = np.frombuffer(_payload(seg, count * dtype.itemsize), dtype=dtype, count=count)
    arr = arr.reshape(tuple(shape) + arr.shape[1:])
    if seg.readonly:
        arr.flags.writeable = False
    return arr


class _Typed(SharedObject):
    """What Struct and Array share: the layout, the lock, the payload size."""

    _dtype: np.dtype
    _lock: Lock | None = None

    @property
    def dtype(self) -> np.dtype:
        """The record's numpy dtype, as stored (the same in every process)."""
        return self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes of records (the payload)."""
        return self._held().size

    @property
    def lock(self) -> Lock:
        """A crash-robust lock kept with the data: hold it while changing several
        fields that readers must see together (``with rec.lock:``)."""
        if self._lock is None:
            self._lock = Lock(self._held().lock)
        return self._lock

    def statistics(self) -> dict:
        """``{"nbytes", "dtype", "shape", "attached"}``."""
        seg = self._held()
        return {"nbytes": seg.size, "dtype": str(self._dtype),
                "shape": list(getattr(self, "_shape", ())),
                "attached": len(seg.attachments())}


class Struct(_Typed):
    """One record in shared memory, by name.

    Parameters
    ----------
    name:
        The object's name (``None`` makes a unique one).
    type:
        A ``ctypes.Structure`` subclass or a numpy (structured) dtype.  Needed
        to create; when opening, omit it to adopt the stored layout.
    init:
        Called once with the record by the creating process before the
        record becomes visible.
    on_destroy:
        Called (no arguments) once, in the process that removes the name:
        its ``unlink()``, or the last ``close()`` with ``lifetime="attached"``.
    **kwargs:
        As for :class:`Segment` (``path``, ``lifetime``, ``mode``, ``readonly``...).

    ``.record`` is the live record: a ctypes instance over the shared bytes
    when ``type`` was a ctypes type, else a 0-d numpy array.  Hold ``.lock``
    while changing several fields that readers must see together.

    Example
    -------
    >>> import ctypes
    >>> class Point(ctypes.Structure):
    ...     _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double)]
    >>> s = Struct(None, Point, init=lambda p: setattr(p, "x", 2.0))
    >>> s.record.x
    2.0
    >>> s.close(); s.unlink()
    """

    _what = "struct"
    _ctype: Any = None

    def __init__(self, name: str | None = None, type: Any = None, *,
                 init: Callable[[Any], None] | None = None, create: bool | None = None,
                 on_destroy: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        ctype = type if isinstance(type, builtin_type) and issubclass(
            type, (ctypes.Structure, ctypes.Union)) else None
        layout = size = dt = None
        if type is not None:
            dt = _as_dtype(type)
            problem = _view_problem(dt, (), type)
            if problem is not None:
                raise problem
            layout = {"format": _FORMAT, "dtype": _dtype_layout(dt), "itemsize": dt.itemsize}
            size = dt.itemsize
        elif create:
            raise TypeError("Struct.create needs a type")
        run = (lambda seg: init(_struct_view(seg, dt, ctype))) if init is not None else None
        kwargs = segment_options("Struct", kwargs)
        lifetime, max_attach = kwargs.pop("lifetime", DEFAULT), kwargs.pop("max_attach", DEFAULT)
        extra = {k: v for k, v in (("lifetime", lifetime), ("max_attach", max_attach))
                 if v is not DEFAULT}
        seg = attach_segment(Kind.STRUCT, name, kwargs.pop("path", None), size=size,
                             create=create, layout=layout, init=run, **extra, **kwargs)
        self._on_destroy = on_destroy
        self._adopt(seg, ctype=ctype, asked=layout, lifetime=lifetime, max_attach=max_attach)

    def _adopt(self, seg: Segment, ctype: Any = None, asked: dict | None = None,
               lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        try:
            self._dtype, _ = _parse_layout(seg, asked)
            check_common("struct", seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self._ctype = ctype

    def _state(self) -> dict:
        return {"ctype": self._ctype}

    @classmethod
    def create(cls, name: str | None = None, type: Any = None, **kwargs: Any) -> "Struct":
        """Create a new record; :class:`ExistsError` if the name is taken."""
        return cls(name, type, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, type: Any = None, **kwargs: Any) -> "Struct":
        """Open an existing record; :class:`NotFoundError` if there is none."""
        return cls(name, type, create=False, **kwargs)

    @property
    def record(self) -> Any:
        """The record itself, sharing memory with every other process."""
        return _struct_view(self._held(), self._dtype, self._ctype)

    def _describe(self) -> dict:
        return {"record": {"dtype": str(self._dtype), "itemsize": self._dtype.itemsize}}

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"dtype={self._dtype}"
        return f"<shmkit.Struct {self.name!r} {state}>"


builtin_type = type


class Array(_Typed):
    """An n-dimensional numpy array in shared memory, by name.

    ``Array(name, dtype, shape, init=fn)`` creates or opens it; ``.array`` is
    the ndarray (no copy) and the object itself works wherever numpy takes an
    array (``np.asarray(a)``, ``a[0, 1] = 3``).  Opening with another dtype or
    shape raises :class:`LayoutMismatchError`; ``Array.open(name)`` adopts the
    stored one.  ``on_destroy`` and the other keywords are as for
    :class:`Struct`.

    Example
    -------
    >>> a = Array(None, "int32", 4)
    >>> a[:] = [1, 2, 3, 4]; int(a.array.sum())
    10
    >>> a.close(); a.unlink()
    """

    _what = "array"
    _shape: tuple = ()

    def __init__(self, name: str | None = None, dtype: Any = None, shape: Any = None, *,
                 init: Callable[[np.ndarray], None] | None = None,
                 create: bool | None = None, on_destroy: Callable[[], Any] | None = None,
                 **kwargs: Any) -> None:
        layout = size = dt = shp = None
        if dtype is not None:
            dt = _as_dtype(dtype)
            if shape is None:
                raise TypeError("Array needs a shape with its dtype")
            shp = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
            if any(d < 0 for d in shp):
                raise ValueError(f"shape {shp} has a negative dimension")
            problem = _view_problem(dt, shp, dtype)
            if problem is not None:
                raise problem
            layout = {"format": _FORMAT, "dtype": _dtype_layout(dt), "shape": list(shp)}
            size = dt.itemsize * math.prod(shp)  # exact: numpy's int64 product wraps
        elif create:
            raise TypeError("Array.create needs a dtype and a shape")
        run = (lambda seg: init(_array_view(seg, dt, shp))) if init is not None else None
        kwargs = segment_options("Array", kwargs)
        lifetime, max_attach = kwargs.pop("lifetime", DEFAULT), kwargs.pop("max_attach", DEFAULT)
        extra = {k: v for k, v in (("lifetime", lifetime), ("max_attach", max_attach))
                 if v is not DEFAULT}
        seg = attach_segment(Kind.ARRAY, name, kwargs.pop("path", None), size=size,
                             create=create, layout=layout, init=run, **extra, **kwargs)
        self._on_destroy = on_destroy
        self._adopt(seg, asked=layout, lifetime=lifetime, max_attach=max_attach)

    def _adopt(self, seg: Segment, asked: dict | None = None, lifetime: Any = DEFAULT,
               max_attach: Any = DEFAULT) -> None:
        try:
            self._dtype, self._shape = _parse_layout(seg, asked)
            check_common("array", seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            seg.close()
            raise
        self._seg = seg

    @classmethod
    def create(cls, name: str | None = None, dtype: Any = None, shape: Any = None,
               **kwargs: Any) -> "Array":
        """Create a new array; :class:`ExistsError` if the name is taken."""
        return cls(name, dtype, shape, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, dtype: Any = None, shape: Any = None,
             **kwargs: Any) -> "Array":
        """Open an existing array; :class:`NotFoundError` if there is none."""
        return cls(name, dtype, shape, create=False, **kwargs)

    def _view(self) -> np.ndarray:
        return _array_view(self._held(), self._dtype, self._shape)

    @property
    def array(self) -> np.ndarray:
        """The shared ndarray (a new view object each time; same memory)."""
        return self._view()

    @property
    def shape(self) -> tuple:
        return self._shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """numpy's protocol (numpy 2 trusts the result and copies nothing
        more): ``copy=True`` a private copy, ``copy=None`` the shared memory
        itself when ``dtype`` needs no conversion, ``copy=False`` the shared
        memory or ValueError.

        >>> a = Array(None, "int32", 2)
        >>> b = np.array(a, copy=True); b[0] = 5; int(a[0])
        0
        >>> a.close(); a.unlink()
        """
        arr = self._view()
        if copy:
            return arr.astype(arr.dtype if dtype is None else dtype, copy=True)
        out = arr if dtype is None else arr.astype(dtype, copy=False)
        if copy is not None and out is not arr:
            raise ValueError(f"array {self.name!r} holds {arr.dtype}; a {np.dtype(dtype)} "
                             "array of it needs a copy, which copy=False refuses: give "
                             "copy=None, or the array's own dtype")
        return out

    def __getitem__(self, key: Any) -> Any:
        return self._view()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._view()[key] = value

    def __len__(self) -> int:
        return self._shape[0] if self._shape else 0

    def _describe(self) -> dict:
        return {"array": {"dtype": str(self._dtype), "shape": list(self._shape)}}

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"dtype={self._dtype} shape={self._shape}"
        return f"<shmkit.Array {self.name!r} {state}>"


# shmkit.Array and shmkit.Struct, however this module was imported (the
# package imports it on first use: see shmkit/__init__.py).
Struct.__module__ = Array.__module__ = "shmkit"
