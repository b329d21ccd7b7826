"""Typed records and arrays mapped by name, built once by their creator.

``Struct`` holds one record (a ctypes Structure or a numpy structured dtype);
``Array`` holds an n-dimensional numpy array.  ``init`` runs exactly once, in
the process that creates the segment, before any other process can open it.
Opening with another layout raises :class:`LayoutMismatchError`; opening
without a type rebuilds it from the layout stored in the header.

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

from .errors import CorruptError, FormatVersionError, LayoutMismatchError, ReadOnlyError
from .segment import Kind, Segment

__all__ = ["Struct", "Array"]

# Version of the layout description below; bump it when the encoding changes.
_FORMAT = 1


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
    return dt


class _Typed(Segment):
    """Shared construction: compare or adopt the layout stored in the header."""

    def _open_typed(self, name: str | None, layout: dict | None, size: int | None,
                    init: Callable[[Segment], None] | None, create: bool | None,
                    kwargs: dict) -> tuple[np.dtype, tuple]:
        self._attach(name, kwargs.pop("path", None), size=size, create=create,
                     layout=layout, init=init, **kwargs)
        try:
            stored = self.layout
            dtype, shape = self._parse_layout(stored)
            if layout is not None and not self.created and stored != layout:
                raise LayoutMismatchError(
                    f"{self.name!r} holds {_describe(stored)}, but was opened with "
                    f"{_describe(layout)}; open it with its own layout, or with no type "
                    "to adopt it")
        except BaseException:
            self.close()
            raise
        return dtype, shape

    def _parse_layout(self, stored: dict) -> tuple[np.dtype, tuple]:
        # The layout comes from shared memory: check all of it before use.
        fmt = stored.get("format")
        if fmt != _FORMAT:
            raise FormatVersionError(
                f"{self.name!r} describes its records in layout format {fmt}; this "
                f"shmkit reads format {_FORMAT}. Use the shmkit that made it, or remove "
                "it with `shmkit rm`")
        array = self._kind == Kind.ARRAY
        try:
            dtype = _dtype_from_layout(stored["dtype"])
            shape = tuple(stored["shape"]) if array else ()
            valid = not dtype.hasobject and all(
                type(d) is int and d >= 0 for d in shape)
        except Exception:  # any malformed description, however it fails
            valid = False
        if not valid:
            raise CorruptError(f"{self.name!r} has an unreadable record layout "
                               f"{str(stored)[:200]}; remove it with `shmkit rm`")
        need = dtype.itemsize
        for d in shape:
            need *= d
        if need > self.size:
            raise CorruptError(f"{self.name!r} describes {need} bytes of records but "
                               f"holds {self.size}; remove it with `shmkit rm`")
        return dtype, shape


def _describe(layout: dict) -> str:
    parts = [f"dtype {layout.get('dtype')}"]
    if "shape" in layout:
        parts.append(f"shape {tuple(layout['shape'])}")
    return ", ".join(parts)


class Struct(_Typed):
    """One record in shared memory, by name.

    Parameters
    ----------
    name:
        The segment name (``None`` makes a unique one).
    type:
        A ``ctypes.Structure`` subclass or a numpy (structured) dtype.  Needed
        to create; when opening, omit it to adopt the stored layout.
    init:
        Called once with the record by the creating process before the
        segment becomes visible.
    **kwargs:
        As for :class:`Segment` (``path``, ``lifetime``, ``mode``...).

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

    _kind = Kind.STRUCT

    def __init__(self, name: str | None = None, type: Any = None, *,
                 init: Callable[[Any], None] | None = None, create: bool | None = None,
                 **kwargs: Any) -> None:
        ctype = type if isinstance(type, builtin_type) and issubclass(
            type, (ctypes.Structure, ctypes.Union)) else None
        layout = size = None
        if type is not None:
            dt = _as_dtype(type)
            layout = {"format": _FORMAT, "dtype": _dtype_layout(dt), "itemsize": dt.itemsize}
            size = dt.itemsize
        elif create:
            raise TypeError("Struct.create needs a type")
        self._ctype = ctype
        run = (lambda seg: init(seg._view())) if init is not None else None
        self._dtype, _ = self._open_typed(name, layout, size, run, create, kwargs)

    @classmethod
    def create(cls, name: str | None = None, type: Any = None, **kwargs: Any) -> "Struct":
        return cls(name, type, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, type: Any = None, **kwargs: Any) -> "Struct":
        return cls(name, type, create=False, **kwargs)

    def __reduce__(self) -> tuple:
        return (_reopen_struct, (self.name, self.path, self._ctype, self.readonly))

    def _view(self) -> Any:
        if getattr(self, "_ctype", None) is not None:
            if self.readonly:
                raise ReadOnlyError(
                    f"{self.name!r} was opened readonly=True and a ctypes record is always "
                    "writable; open it without a type for a read-only numpy record")
            return self._ctype.from_buffer(self.buf)
        dt = getattr(self, "_dtype", None)
        if dt is None:
            dt = _dtype_from_layout(self.layout["dtype"])
        # frombuffer keeps the buffer exported for as long as the array lives,
        # so close() cannot unmap under it; np.ndarray(buffer=) does not.
        arr = np.frombuffer(self.buf, dtype=dt, count=1)
        return arr.reshape(arr.shape[1:])

    @property
    def record(self) -> Any:
        """The record itself, sharing memory with every other process."""
        return self._view()

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _describe(self) -> dict:
        return {"record": {"dtype": str(self._dtype), "itemsize": self._dtype.itemsize}}


builtin_type = type


class Array(_Typed):
    """An n-dimensional numpy array in shared memory, by name.

    ``Array(name, dtype, shape, init=fn)`` creates or opens it; ``.array`` is
    the ndarray (no copy) and the object itself works wherever numpy takes an
    array (``np.asarray(a)``, ``a[0, 1] = 3``).  Opening with another dtype or
    shape raises :class:`LayoutMismatchError`; ``Array.open(name)`` adopts the
    stored one.

    Example
    -------
    >>> a = Array(None, "int32", 4)
    >>> a[:] = [1, 2, 3, 4]; int(a.array.sum())
    10
    >>> a.close(); a.unlink()
    """

    _kind = Kind.ARRAY

    def __init__(self, name: str | None = None, dtype: Any = None, shape: Any = None, *,
                 init: Callable[[np.ndarray], None] | None = None,
                 create: bool | None = None, **kwargs: Any) -> None:
        layout = size = None
        if dtype is not None:
            dt = _as_dtype(dtype)
            if shape is None:
                raise TypeError("Array needs a shape with its dtype")
            shp = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
            if any(d < 0 for d in shp):
                raise ValueError(f"shape {shp} has a negative dimension")
            layout = {"format": _FORMAT, "dtype": _dtype_layout(dt), "shape": list(shp)}
            size = dt.itemsize * math.prod(shp)  # exact: numpy's int64 product wraps
        elif create:
            raise TypeError("Array.create needs a dtype and a shape")
        run = (lambda seg: init(seg._view())) if init is not None else None
        self._dtype, self._shape = self._open_typed(name, layout, size, run, create, kwargs)

    @classmethod
    def create(cls, name: str | None = None, dtype: Any = None, shape: Any = None,
               **kwargs: Any) -> "Array":
        return cls(name, dtype, shape, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, dtype: Any = None, shape: Any = None,
             **kwargs: Any) -> "Array":
        return cls(name, dtype, shape, create=False, **kwargs)

    def __reduce__(self) -> tuple:
        return (_reopen_array, (self.name, self.path, self.readonly))

    def _view(self) -> np.ndarray:
        stored = self.layout if getattr(self, "_dtype", None) is None else None
        dt = self._dtype if stored is None else _dtype_from_layout(stored["dtype"])
        shape = self._shape if stored is None else tuple(stored["shape"])
        count = 1
        for d in shape:
            count *= d
        # frombuffer keeps the buffer exported (see Struct._view).
        arr = np.frombuffer(self.buf, dtype=dt, count=count)
        arr = arr.reshape(tuple(shape) + arr.shape[1:])
        if self.readonly:
            arr.flags.writeable = False
        return arr

    @property
    def array(self) -> np.ndarray:
        """The shared ndarray (a new view object each time; same memory)."""
        return self._view()

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def shape(self) -> tuple:
        return self._shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self._view()
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key: Any) -> Any:
        return self._view()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._view()[key] = value

    def __len__(self) -> int:
        return self._shape[0] if self._shape else 0

    def _describe(self) -> dict:
        return {"array": {"dtype": str(self._dtype), "shape": list(self._shape)}}


def _reopen_struct(name: str, path: str, ctype: Any, readonly: bool = False) -> Struct:
    return Struct(name, ctype, create=False, path=path, readonly=readonly)


def _reopen_array(name: str, path: str, readonly: bool = False) -> Array:
    return Array(name, create=False, path=path, readonly=readonly)
