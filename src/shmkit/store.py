"""A growable key-value map in shared memory that many processes read and write.

``Store(name)`` creates the store or opens it; any process that opens the same
name sees the same keys.  It behaves like a ``dict``::

    import shmkit
    st = shmkit.Store("cache")          # create or open; grows as needed
    st[42] = b"..."; st["user:7"] = "text"; st[b"raw"] = b"bytes"
    st.add("new", 1)                    # insert only: KeyExistsError if present
    st["user:7"], st.get("nope", 0), "new" in st, len(st)
    with st.batch():                    # readers see both writes or neither
        st["a"] = 1; st["b"] = 2
    for key, value in st.items(): ...
    del st[42]; st.vacuum()             # compact and give memory back

Keys are int, str or bytes (``1``, ``"1"`` and ``b"1"`` are three keys).
Values are bytes, str, int, float, bool, None or numpy arrays, and come back
with their exact type; other objects need ``codec="pickle"``, chosen when the
store is created.

Reads take no lock; writes are serialised by a crash-robust lock and made
crash-safe (see docs/store.md for the design).  The C side is
``shmkit._core.Table`` (src/shmkit/_core/table.c).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import warnings
import weakref
from collections.abc import ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any, Callable

from ._lazy import numpy
from . import _core
from ._object import DEFAULT, SharedObject, attach_segment, check_common, mismatch
from .errors import (
    CorruptError,
    FormatVersionError,
    InvalidValueError,
    MismatchError,
    OutOfSpaceError,
    OwnerDiedWarning,
    UnsupportedTypeError,
)
from .segment import PAGE, Kind, Segment, _align, _check_numbers, at_fork_in_child
from .sync import optional_seconds

__all__ = ["Store"]

FORMAT = 2  # the store's own layout version, kept in the segment's layout JSON
# (2: the header's per-attachment view counts; format 1 stores are refused)
_DEFAULT_SIZE = 256 << 10
READ_TIMEOUT = 30.0  # seconds a read waits for another process's batch by default
_MIN_SIZE = 16 << 10
_VT_NDARRAY = 8
_VT_PICKLE = 9
_OFF_COUNT = 72  # store-header words read directly (see table.c, THeader)
_OFF_USED = 88
_SCAN = 512


# -- value encoding for what C does not encode itself --------------------------

def _unsupported(value: Any) -> UnsupportedTypeError:
    return UnsupportedTypeError(
        f"cannot store a {type(value).__module__}.{type(value).__qualname__} value: a "
        "Store holds bytes, str, int, float, bool, None and numpy arrays (exact types, "
        "so that they come back as they went in); convert it, or create the store with "
        "codec='pickle' to pickle other objects (unpickling runs code: use it only "
        "among processes you trust)")


def _encode_array(value: Any) -> tuple[int, bytes, Any] | None:
    np = numpy()
    if type(value) is not np.ndarray:
        return None
    if value.dtype.hasobject:
        return None
    descr = np.lib.format.dtype_to_descr(value.dtype)
    head = repr((descr, tuple(int(d) for d in value.shape))).encode()
    body = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    return (_VT_NDARRAY, head, body)


def _unencodable_str(value: str) -> InvalidValueError:
    """The error for a str value UTF-8 cannot encode (a lone surrogate), in a
    store without codec="pickle"; the codec's error is its cause."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        err = InvalidValueError(
            f"str value {value!r:.80} cannot be stored: its character "
            f"{value[e.start]!r} at position {e.start} is a lone surrogate, which UTF-8 "
            "cannot encode; store it as bytes (os.fsencode(value) undoes os.fsdecode; "
            "value.encode('utf-8', 'surrogatepass') takes any), or create the store with "
            "codec='pickle', which pickles such a str")
        err.__cause__ = e
        return err
    raise AssertionError("an encodable str")  # (only called once encoding failed)


def _encode_plain(value: Any) -> tuple[int, bytes | None, Any]:
    """A value the core does not encode itself, in a store without
    codec="pickle": a numpy array (also a str that UTF-8 cannot encode,
    which is refused)."""
    if type(value) is str:
        raise _unencodable_str(value)
    mod = type(value).__module__
    if mod == "numpy":
        enc = _encode_array(value)
        if enc is not None:
            return enc
    raise _unsupported(value)


def _encode_pickle(value: Any) -> tuple[int, bytes | None, Any]:
    """A value the core does not encode itself, in a store with
    codec="pickle": a numpy array as the plain store has it, anything else
    (a str UTF-8 cannot encode too) pickled."""
    if type(value).__module__ == "numpy":
        enc = _encode_array(value)
        if enc is not None:
            return enc
    try:
        return (_VT_PICKLE, None, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as e:
        raise UnsupportedTypeError(f"cannot pickle a {type(value).__qualname__} value: "
                                   f"{e}") from e


def _decode(vtype: int, data: bytes, body_len: int = 0) -> Any:
    if vtype == _VT_PICKLE:
        return pickle.loads(data)
    np = numpy()
    try:
        text = data.decode("utf-8")  # repr() of non-ASCII field names, encoded
        descr, shape = _parse_header(text)
        _check_type_strings(descr)
        dtype = np.lib.format.descr_to_dtype(descr)
        if dtype.hasobject:  # never written: its bytes would become object pointers
            raise ValueError("an array header names a dtype that holds objects")
        if dtype.itemsize == 0 and np.empty(0, dtype).dtype.itemsize:
            # an unsized string (S0, U0), never written since numpy makes it
            # S1/U1: np.empty would allocate for a count that the check
            # below lets through against 0 bytes
            raise ValueError("an array header names an unsized string dtype")
        if dtype.subdtype is not None:  # never written: np.empty folds it into the shape
            raise ValueError("an array header names a subarray dtype")
        shape = tuple(shape)
        count = 1
        for d in shape:
            if not isinstance(d, int):
                raise ValueError(d)
            count *= d
        if count * dtype.itemsize != body_len:
            raise ValueError("array header does not match its data")
        return np.empty(shape, dtype)
    except _HEADER_ERRORS:
        # the C side retries (a torn read) or reports CorruptError.  Other
        # errors (RecursionError from a deep caller, MemoryError) are not
        # the header's and pass through as they are.
        raise ValueError("unreadable array header") from None


# What reading a header of wrong bytes raises (SyntaxError: numpy's own
# parse of a type string, which _check_type_strings keeps it from).
_HEADER_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                  SyntaxError)
# A header is repr((descr, shape)) (_encode_array): tuples and lists of str
# literals and non-negative ints.  It is parsed here, in one pass with no
# recursion, rather than by ast.literal_eval: hostile bytes then cost time
# linear in their length and can raise only ValueError (never ast's
# RecursionError or MemoryError, which must mean the reader's own), and a
# parse is not broken by another one that a gc callback runs inside it
# (ast's is not re-entrant in CPython 3.11).
# A str literal in single quotes: the characters repr() leaves as they are
# (not the quote, a backslash or a control character), and backslash
# escapes, checked by _unescape.  Possessive, so that the engine keeps no
# backtracking state per escape (a long run of them cost 130 bytes a byte).
_HEADER_STR = r"""'([^'\\\x00-\x1f\x7f-\x9f]*+(?:\\.[^'\\\x00-\x1f\x7f-\x9f]*+)*+)'"""
_HEADER_TOKEN = re.compile(r" *(?:([(\[])|([)\]])|(,)|(0|[1-9][0-9]{0,29})(?![0-9])|"
                           + _HEADER_STR + "|" + _HEADER_STR.replace("'", '"') + ")")
_HEADER_ESCAPE = re.compile(r"\\(?:([\\'\"])|([nrt])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})"
                            r"|U([0-9a-fA-F]{8})|(.?))", re.S)
_ESCAPED = {"n": "\n", "r": "\r", "t": "\t"}
_MAX_HEADER_NESTING = 64
# The type strings of a writer's descr: dtype.str, a byte order, a kind, a
# size and a datetime unit ('<f8', '|S5', '<M8[100us]').  numpy parses
# others ('i4,(2)f8', comma strings) with ast, which must not see hostile
# bytes.
_HEADER_TYPE = re.compile(r"[<>|=][a-zA-Z?][0-9]{0,9}(?:\[[0-9]{0,9}[a-zA-Z]{1,7}\])?")


def _check_type_strings(descr: Any) -> None:
    """ValueError unless every type in descr is a dtype.str (see _HEADER_TYPE)."""
    todo = [descr]
    while todo:
        d = todo.pop()
        if isinstance(d, str):
            if not _HEADER_TYPE.fullmatch(d):
                raise ValueError("an array header names a type no writer makes")
        elif isinstance(d, list):  # fields: (name, type) or (name, type, shape)
            for field in d:
                if not isinstance(field, tuple) or not 2 <= len(field) <= 3:
                    raise ValueError("an array header's field is not (name, type[, shape])")
                todo.append(field[1])
        elif isinstance(d, tuple) and len(d) == 2:  # a subarray in a subarray field
            todo.append(d[0])
        else:
            raise ValueError("an array header's type is neither a string nor fields")


def _unescape(m: re.Match[str]) -> str:
    quote, letter, x2, u4, u8, other = m.groups()
    if other is not None:
        raise ValueError("an escape that repr() does not write")
    if quote is not None:
        return quote
    if letter is not None:
        return _ESCAPED[letter]
    code = int(x2 or u4 or u8, 16)
    if code > 0x10FFFF:  # past the last code point: chr() would raise OverflowError
        raise ValueError("an escape beyond the last code point")
    return chr(code)


def _parse_header(text: str) -> Any:
    """The tuple repr((descr, shape)) wrote; ValueError for anything else."""
    stack: list[list[Any]] = []  # each open bracket: [items, closer, saw a comma]
    items: list[Any] = []  # the top level: one value
    pos, after_value = 0, False
    while True:
        m = _HEADER_TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip(" ") or stack or len(items) != 1:
                raise ValueError("not the literal an array header is")
            return items[0]
        pos = m.end()
        opener, closer, comma, digits, single, double = m.groups()
        if opener:
            if after_value or len(stack) >= _MAX_HEADER_NESTING:
                raise ValueError("a bracket after a value, or nested too deep")
            stack.append([items, ")" if opener == "(" else "]", False])
            items, after_value = [], False
        elif closer:
            if not stack or stack[-1][1] != closer:
                raise ValueError("a bracket closes what it did not open")
            outer, _, saw_comma = stack.pop()
            if closer == ")" and len(items) == 1 and not saw_comma:
                raise ValueError("parentheses around one value, not a tuple")
            outer.append(tuple(items) if closer == ")" else items)
            items, after_value = outer, True
        elif comma:
            if not after_value or not stack:
                raise ValueError("a comma where no value ends")
            stack[-1][2] = True
            after_value = False
        else:
            if after_value or (not stack and items):
                raise ValueError("two values with no comma between")
            if digits is not None:
                items.append(int(digits))
            else:
                body = single if single is not None else double
                items.append(_HEADER_ESCAPE.sub(_unescape, body) if "\\" in body else body)
            after_value = True


def _grow(seg: Segment, timeout: float | None, need: int) -> None:
    """Grow the store's segment by at least ``need`` bytes (geometrically),
    waiting at most ``timeout`` for the segment's lock."""
    old = seg.size
    want = old + need
    new = old * 2 if old < (1 << 30) else old + (old >> 2)
    new = _align(max(new, want), PAGE)
    if new > seg.max_size:
        new = seg.max_size
        if new < want:
            raise OutOfSpaceError(
                f"store {seg.name!r} is full: it reached its max_size of {seg.max_size} "
                "bytes; delete keys and vacuum(), or create it with a larger max_size=")
    _resize(seg, new, timeout)


def _format(seg: Segment) -> None:
    """Lay out an empty store (only in the call that creates it)."""
    table = _core.Table()
    table._bind(seg._mapping, seg._hsize)
    table._format(int.from_bytes(os.urandom(8), "little"))


def _resize(seg: Segment, size: int, timeout: float | None) -> None:
    with warnings.catch_warnings():
        # A writer killed while resizing leaves the segment's own lock to be
        # taken over; the store repairs itself, so this is not news.
        warnings.simplefilter("ignore", OwnerDiedWarning)
        seg.resize(size, timeout)


# Every open store of this process, for the child's fork hook: keyed by the
# id of its weak reference, whose callback removes it when a handle is dropped
# unclosed, and close() removes it first.  The handle holds its reference, so
# that no other can take that id while a close or a __del__ may still remove
# it (a callback, then a close from __del__, or two threads' closes).  (A
# WeakValueDictionary made and dropped two Python-level objects per open,
# about 2 µs of an open by name.)
_live: "dict[int, weakref.ref[Store]]" = {}
# (C: a Ctrl-C cannot stop it at its first line, as it would a Python function)
_forget = _core.forgetter(_live)


class Store(SharedObject, _core.Table, MutableMapping):  # type: ignore[misc]
    """A dict-like map in shared memory, shared by name between processes.

    Parameters
    ----------
    name:
        The store's name (see :class:`shmkit.Segment` for the rules); ``None``
        makes a unique one (see ``.name``).
    size:
        Initial bytes when creating (default 256 KiB); the store grows by
        itself, up to ``max_size``.  When opening, a given size beyond the
        store's ``max_size`` raises :class:`MismatchError`.
    path:
        Keep the store in this file instead of /dev/shm: it outlives a reboot
        (call ``flush()`` to make writes durable).
    codec:
        ``None`` (the fixed types only) or ``"pickle"`` to also store any
        picklable object.  Fixed at creation; opening with another codec
        raises :class:`MismatchError`, leaving it out adopts the store's.
    readonly:
        Open for reading only; writes raise :class:`ReadOnlyError`.
    create:
        ``None`` create or open, ``True`` create only, ``False`` open only.
    timeout:
        Seconds a write may wait for another writer (``None``: no limit);
        :class:`shmkit.Timeout` after that.
    read_timeout:
        Seconds a read (``get``, ``in``, ``get_into``, ``get_many``, ``view``,
        iteration) may wait for a batch another process is publishing
        (default: ``timeout`` when given, else 30; ``None``: no limit); :class:`shmkit.Timeout` after that,
        naming the writer's pid and whether it is stopped.
    lifetime, mode, max_size, max_attach:
        As for :class:`shmkit.Segment`; ``max_size`` (default 4 GiB) bounds
        growth and costs only address space.  ``lifetime`` defaults to
        ``"attached"`` for ``name=None`` (removed with its last user).  Given
        when opening, each must be the store's own (:class:`MismatchError`
        otherwise).
    on_destroy:
        Called (no arguments) once, in the process that removes the name:
        its ``unlink()``, or the last ``close()`` with ``lifetime="attached"``.
    trust_owner:
        Also open a store owned by this user (uid or name); see
        :class:`shmkit.Segment`.

    Besides the ``dict`` methods (``get``, ``pop``, ``setdefault``,
    ``update``, ``clear``, ``keys``, ``values``, ``items``): ``add``,
    ``nbytes``, ``batch``, ``vacuum``, ``flush``, ``verify``,
    ``statistics``, ``used_bytes``, ``allocated_bytes``.

    Raises
    ------
    UnsupportedTypeError (a TypeError), ValueTooLargeError (a ValueError),
    KeyExistsError (a KeyError), CorruptError, OutOfSpaceError,
    ReadOnlyError, WrongKindError, FormatVersionError, MismatchError.

    Example
    -------
    >>> with Store(None) as st:
    ...     st["answer"] = 42
    ...     st["answer"], "answer" in st, len(st)
    (42, True, 1)
    """

    _what = "store"
    _codec: str | None = None
    _live_ref: "weakref.ref[Store] | None" = None

    def __init__(self, name: str | None = None, *, size: int | None = None,
                 path: str | os.PathLike[str] | None = None, codec: str | None = DEFAULT,
                 readonly: bool = False, create: bool | None = None,
                 timeout: float | None = None,
                 read_timeout: float | None = DEFAULT, lifetime: str = DEFAULT,
                 mode: int | None = None, max_size: int | None = None,
                 max_attach: int = DEFAULT,
                 on_destroy: Callable[[], Any] | None = None,
                 trust_owner: int | str | None = None) -> None:
        # (`is DEFAULT` rather than given(): this runs on every open)
        if codec is not DEFAULT and codec not in (None, "pickle"):
            raise ValueError(f"codec must be None or 'pickle', not {codec!r}")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                 or size < _MIN_SIZE):
            raise ValueError(f"size must be an int of at least {_MIN_SIZE} bytes, "
                             f"not {size!r}")
        # Refused before the segment is made, and read once: the core keeps
        # the seconds (tabletype.c), and a negative one is 0 for the
        # segment's lock too, where -1 would be threading's "no timeout".
        timeout = optional_seconds(timeout, "timeout")
        if read_timeout is DEFAULT:
            read_timeout = timeout if timeout is not None else READ_TIMEOUT
        read_timeout = optional_seconds(read_timeout, "read_timeout")
        default_size = _DEFAULT_SIZE
        if max_size is not None:
            _check_numbers(max_size=max_size)
            if max_size > 1 << 44:
                raise ValueError("max_size cannot exceed 16 TiB")
            if max_size < _MIN_SIZE:
                raise ValueError(f"max_size must be at least {_MIN_SIZE} bytes, a store's "
                                 f"smallest size, not {max_size!r}")
            default_size = min(max_size, _DEFAULT_SIZE)  # (a larger size= is refused)
        layout = {"format": FORMAT, "codec": (None if codec is DEFAULT else codec) or "none"}

        extra = {}
        if lifetime is not DEFAULT:
            extra["lifetime"] = lifetime
        if max_attach is not DEFAULT:
            extra["max_attach"] = max_attach
        seg = attach_segment(Kind.STORE, name, path,
                             size=(size or default_size) if create is not False else None,
                             create=create, layout=layout, init=_format, readonly=readonly,
                             mode=mode, max_size=max_size, trust_owner=trust_owner, **extra)
        self._on_destroy = on_destroy
        self._adopt(seg, codec=codec, timeout=timeout, read_timeout=read_timeout,
                    size=size, max_size=max_size, lifetime=lifetime, max_attach=max_attach)

    def _adopt(self, seg: Segment, codec: Any = DEFAULT, timeout: float | None = None,
               read_timeout: Any = DEFAULT,
               size: int | None = None, max_size: int | None = None,
               lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        try:
            stored = seg._layout
            if stored.get("format") != FORMAT:
                raise FormatVersionError(
                    f"store {seg.name!r} has store format {stored.get('format')}; this "
                    f"shmkit reads format {FORMAT}. Use the shmkit that made it, or "
                    "remove it with `shmkit rm`")
            have = stored.get("codec")
            if have not in ("none", "pickle"):
                raise FormatVersionError(f"store {seg.name!r} has an unknown codec "
                                         f"{have!r}; use the shmkit that made it")
            if not seg.created:
                # An explicit parameter is honoured or refused, never ignored.
                if codec is not DEFAULT and (codec or "none") != have:
                    raise mismatch("store", seg.name, "codec", codec,
                                   None if have == "none" else have)
                if max_size is not None and max_size != seg.max_size:
                    raise mismatch("store", seg.name, "max_size", max_size, seg.max_size)
                if size is not None and size > seg.max_size:
                    raise MismatchError(
                        f"store {seg.name!r} exists and can grow to max_size="
                        f"{seg.max_size} bytes, but size={size} was asked; leave size= "
                        f"out to adopt it, or unlink it (`shmkit rm {seg.name}`) and "
                        "create it again with a larger max_size=")
                check_common("store", seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self._timeout = timeout
        self._codec = "pickle" if have == "pickle" else None
        pick = self._codec == "pickle"
        if read_timeout is DEFAULT:
            read_timeout = timeout if timeout is not None else READ_TIMEOUT
        # (positional: the core parses them faster than keywords)
        self._bind(seg._mapping, seg._hsize, seg.readonly, pick,
                   _encode_pickle if pick else _encode_plain, _decode,
                   functools.partial(_grow, seg, timeout), timeout, read_timeout)
        self._live_ref = ref = weakref.ref(self, _forget)
        _live[id(ref)] = ref  # (its writes are safe from many threads)

    def _segment_closed(self) -> None:
        ref = self._live_ref
        if ref is not None:
            _live.pop(id(ref), None)

    @classmethod
    def create(cls, name: str | None = None, **kwargs: Any) -> "Store":
        """Create a new store; :class:`shmkit.ExistsError` if the name is taken."""
        return cls(name, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Store":
        """Open an existing store; :class:`shmkit.NotFoundError` if there is none."""
        return cls(name, create=False, **kwargs)

    # -- mapping protocol (get/set/del/len/in are in C) ---------------------

    def __iter__(self) -> Iterator[Any]:
        return self._entries(0)

    def items(self) -> "_Items":  # type: ignore[override]
        """A view of ``(key, value)`` pairs; each pair was stored at some moment.

        Iterating while other processes write never fails (a readonly
        handle may raise :class:`BusyError` if writers keep changing a chunk
        it reads): keys present the whole time are seen exactly once, keys
        added or removed meanwhile may or may not be.
        """
        return _Items(self)

    def values(self) -> "_Values":  # type: ignore[override]
        """A view of the values (see :meth:`items`)."""
        return _Values(self)

    def _entries(self, what: int) -> Iterator[Any]:
        # Each _scan call reads up to _SCAN index words under one epoch; other
        # processes write between the calls.  A key deleted and put again can
        # land further on in its probe run (another key took its old word),
        # and a replaced index makes the scan start over, so every hash given
        # is remembered and a key is given once, whatever moved meanwhile.
        ix, pos = 0, 0
        given: set[int] = set()
        unwrap = self._codec == "pickle" and what != 0
        while pos >= 0:
            got = self._scan(ix, pos, _SCAN, what)
            if got is None:
                ix, pos = 0, 0
                continue
            pos, ix, entries, hashes, _wrapped = got
            if unwrap:
                entries = [_unwrap(e, what) for e in entries]
            for entry, h in zip(entries, memoryview(hashes).cast("Q")):
                if h not in given:
                    given.add(h)
                    yield entry

    # -- reading in place ---------------------------------------------------

    def get_into(self, key: Any, buffer: Any) -> int:  # type: ignore[override]
        """Copy a ``bytes`` or numpy array value's bytes into ``buffer``; return their count.

        ``buffer`` is any writable C-contiguous buffer (bytearray, numpy
        array, memoryview).  The first ``n`` bytes receive the value (an
        array's data in C order, without its dtype or shape); the rest are
        left as they were.  A buffer smaller than the value raises
        :class:`ValueTooLargeError` (a ValueError) naming both sizes and
        leaves the buffer unchanged; a missing key raises KeyError; a value of
        another type (str, int, ...) raises :class:`UnsupportedTypeError` (a
        TypeError).  Large copies run with the GIL released.

        >>> import numpy as np
        >>> with Store(None) as st:
        ...     st["k"] = b"abc"
        ...     buf = bytearray(8)
        ...     st.get_into("k", buf), bytes(buf[:3])
        (3, b'abc')
        """
        return _core.Table.get_into(self, key, buffer)

    def get_many(self, keys: Any, *default: Any) -> list:  # type: ignore[override]
        """The values of ``keys``, in order, in one call.

        A missing key raises KeyError, unless a ``default`` is given, which
        then stands for it.  Each value is read consistently on its own (the
        list is not one snapshot: use :meth:`batch` on the writing side for
        keys that must change together).

        >>> with Store(None) as st:
        ...     st["a"] = 1; st["b"] = 2
        ...     st.get_many(["a", "b"]), st.get_many(["a", "x"], None)
        ([1, 2], [1, None])
        """
        return _core.Table.get_many(self, keys, *default)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:  # type: ignore[override]
        """Store the pairs of ``other`` and then ``kwargs``, as ``dict.update``, in one batch.

        ``other`` is a mapping (its ``keys()`` and ``[key]``; a ``dict``'s own
        pairs) or an iterable of ``(key, value)`` pairs.  Other processes see
        every pair or none, as with :meth:`batch`: an error (a value of an
        unsupported type, Ctrl-C, a full store) discards the pairs this call
        wrote and raises.  Inside an open ``batch()`` block the pairs join
        that batch instead, as an inner block does: its end publishes or
        discards them.  The writers' lock is held for the call, so split a
        very large update into chunks when other writers must not wait that
        long.

        >>> with Store(None) as st:
        ...     st.update({"a": 1, "b": 2}, c=3)
        ...     sorted(st.items())
        [('a', 1), ('b', 2), ('c', 3)]
        """
        _core.Table.update(self, other, **kwargs)

    def view(self, key: Any) -> "StoreView":
        """The bytes of a ``bytes`` or array value in place, without a copy.

        Use it as a context manager: ``with st.view(key) as mv:`` gives a
        read-only memoryview (``.array`` on the view object is a read-only
        numpy array for array values).  While the view is held, the record's
        memory is not reused: writers may overwrite or delete the key and
        vacuum, and the view keeps showing the bytes it was taken on; the
        space is reclaimed by the first recycle after it is released.  A
        process killed while holding views holds nothing afterwards.  Any
        buffer made from the view (``np.frombuffer(mv)``, a slice) keeps the
        record held until it is released too.  KeyError for a missing key,
        UnsupportedTypeError for other value types, ReadOnlyError on a
        readonly handle (a view counts itself in the store's header).

        >>> with Store(None) as st:
        ...     st["k"] = b"abc"
        ...     with st.view("k") as mv:
        ...         bytes(mv[:2])
        b'ab'
        """
        return StoreView(self, key)

    @contextlib.contextmanager
    def view_array(self, key: Any) -> Iterator[Any]:
        """``with st.view_array(key) as a:`` a read-only numpy array in place.

        As :meth:`view`, for a key holding a numpy array (UnsupportedTypeError
        otherwise).

        >>> import numpy as np
        >>> with Store(None) as st:
        ...     st["a"] = np.arange(4)
        ...     with st.view_array("a") as a:
        ...         int(a.sum())
        6
        """
        v = StoreView(self, key)
        try:
            if v.array is None:
                raise UnsupportedTypeError(
                    f"view_array(): the value of {key!r} is bytes, not a numpy array; "
                    "use view()")
            yield v.array
        finally:
            v.release()

    # -- store operations ---------------------------------------------------

    def batch(self) -> contextlib.AbstractContextManager["Store"]:
        """Group writes so other processes see all of them at once, or none.

        The store's write lock is held for the block, so keep it short;
        reads by other processes go on meanwhile and see the state before
        the batch until it is published.  If the block raises, its writes
        are discarded.  Batches nest: an inner block joins the outer one,
        whose end publishes or discards every write of both, so an error
        that an inner block raises and the outer block catches discards
        nothing.  A child forked inside the block holds none of the
        parent's batch: leaving the block there raises ``RuntimeError``.

        >>> with Store(None) as st:
        ...     with st.batch():
        ...         st["a"] = 1; st["b"] = 2
        ...     sorted(st.items())
        [('a', 1), ('b', 2)]
        """
        # Opened and closed by the core's __enter__ and __exit__, so that a
        # Ctrl-C cannot fall between opening the batch and guarding it.
        return self._batch()  # type: ignore[no-any-return]

    def vacuum(self) -> int:
        """Compact the records and give free memory back; returns bytes released.

        Records move down into free space (readers retry around the moves),
        the free tail is cut off and its pages are returned to the system.
        """
        seg = self._held()

        def shrink(new_end: int) -> None:
            if new_end < seg.size:
                _resize(seg, new_end, self._timeout)

        before = seg.size
        self._vacuum(shrink)  # lock, compact, cut the segment, unlock: one call
        return before - seg.size

    def flush(self) -> None:
        """Make every write so far durable (msync, and fsync for a file path)."""
        seg = self._held()
        self._flush()
        _core.sync_file(seg._mapping)

    def verify(self) -> dict:
        """Check every invariant of the store; raises CorruptError naming the first broken one.

        Returns what it counted (blocks, records, used/free/index bytes).
        Holds the write lock while it runs (readers are not stopped).
        """
        self._held()
        self._seg._check_truncated(look=True)  # a shrunk file: nothing below is trusted
        return self._verify()

    def statistics(self) -> dict:
        """Counts and sizes: keys, used/free/allocated bytes, fragmentation, growth."""
        seg = self._held()
        stats = self._stats()
        stats["allocated_bytes"] = seg._hsize + seg.size
        stats["file_bytes"] = _core.file_sizes(seg._mapping)[1]
        stats["codec"] = self._codec or "none"
        return stats

    @property
    def used_bytes(self) -> int:
        """Bytes taken by the live records (keys, values and their headers)."""
        seg = self._held()
        return _core.load64(seg._mapping, seg._hsize + _OFF_USED)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of shared memory the store holds (header included)."""
        seg = self._held()
        return seg._hsize + seg.size

    @property
    def codec(self) -> str | None:
        """``None`` or ``"pickle"``, as chosen when the store was created."""
        return self._codec

    def _describe(self) -> dict:
        seg = self._held()
        stats = self._stats()
        stats["allocated_bytes"] = seg._hsize + seg.size
        stats["codec"] = self._codec or "none"
        return {"store": stats}

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmkit.Store {self.name!r} closed>"
        return (f"<shmkit.Store {self.name!r} keys={len(self)} "
                f"used={self.used_bytes}>")

    __hash__ = None  # type: ignore[assignment]


class StoreView:
    """A stored ``bytes`` or array value held in place (see :meth:`Store.view`).

    ``memory`` is a read-only memoryview of the value's bytes; ``array`` the
    read-only numpy array for array values (else None).  ``release()`` (or
    leaving the ``with`` block) ends it.
    """

    __slots__ = ("_raw", "memory", "array", "__weakref__")

    def __init__(self, store: Store, key: Any) -> None:
        raw, vtype, head = store._view(key)
        self._raw = raw
        self.memory: memoryview | None = memoryview(raw)
        self.array: Any = None
        if head is not None:
            try:
                empty = _decode(_VT_NDARRAY, head, len(self.memory))
                np = numpy()
                if empty.nbytes:  # not for no elements, or elements of no bytes
                    arr = np.frombuffer(raw, dtype=empty.dtype).reshape(empty.shape)
                else:
                    arr = empty
                    arr.flags.writeable = False
                self.array = arr
            except ValueError:
                # the header was copied while the view held the record: damage
                self.release()
                raise CorruptError(f"store is corrupt: the array header of key {key!r} "
                                   "cannot be read; run verify() for a full report, copy "
                                   "out what still reads back and create the store "
                                   "again") from None
            except BaseException:
                self.release()
                raise

    def __enter__(self) -> memoryview:
        if self.memory is None:
            raise ValueError("this store view was released; take a new one")
        return self.memory

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """End the view: the record may be reused once no buffer made from it is left."""
        self.array = None
        mv, self.memory = self.memory, None
        if mv is not None:
            try:
                mv.release()
            except BufferError:
                pass  # a buffer made from it is alive: it keeps the record held
        self._raw._release()

    @property
    def held(self) -> bool:
        """True while the record is held (this view or a buffer made from it is alive)."""
        return bool(self._raw._held)


class _Items(ItemsView):
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self._mapping._entries(2)  # type: ignore[attr-defined]


class _Values(ValuesView):
    def __iter__(self) -> Iterator[Any]:
        return self._mapping._entries(1)  # type: ignore[attr-defined]


def _unwrap(entry: Any, what: int) -> Any:
    # A pickled value arrives as a 1-tuple of its bytes (validated, not yet
    # unpickled); every other value arrives decoded.
    if what == 1:
        return pickle.loads(entry[0]) if type(entry) is tuple else entry
    key, value = entry
    return (key, pickle.loads(value[0])) if type(value) is tuple else entry


def _after_fork_in_child() -> None:
    for ref in list(_live.values()):
        st = ref()
        if st is not None:
            st._after_fork()


at_fork_in_child(_after_fork_in_child)
