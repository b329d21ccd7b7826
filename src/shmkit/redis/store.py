"""A Store in a Redis hash: the same keys, values, encoding and errors as shmkit.Store.

Each key is one hash field, each value one hash value, encoded as the
shared-memory store encodes its records: the field is the key-type byte
(1 int, 2 str, 3 bytes) and the key's bytes (an int as 8 little-endian bytes,
or the fewest two's-complement bytes beyond 64 bits); the value is the
value-type byte (``VT_*``, as in ``_core/table.h``) and the record's value
bytes (an ndarray's u32 header length, header and data; a pickle's bytes).
Arrays and pickled objects go through shmkit.store's own encoder and
decoder functions.

>>> import shmkit                                                  # doctest: +SKIP
>>> st = shmkit.connect("redis://localhost:6379/0").Store("cache")  # doctest: +SKIP
>>> st["answer"] = 42; st["answer"]                                # doctest: +SKIP
42
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    MutableMapping,
    ValuesView,
)
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.exceptions import RedisError

from .. import _core
from .._object import DEFAULT, _Default, given
from ..errors import (
    CorruptError,
    InvalidKeyError,
    KeyExistsError,
    ReadOnlyError,
    UnsupportedTypeError,
    ValueTooLargeError,
    WrongKindError,
)
from .._arrays import writable_bytes
from .._lazy import numpy
from ..store import _VT_NDARRAY, _VT_PICKLE, _decode, _encode_pickle, _encode_plain
from ._base import (
    RedisNamespace,
    RedisObject,
    _translate,
    as_bytes_or_none,
    guard_all,
    guarded,
    refuse,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Store", "encode_key", "decode_key", "encode_value", "decode_value"]

KT_INT, KT_STR, KT_BYTES = 1, 2, 3
VT_BYTES, VT_STR, VT_INT, VT_FLOAT, VT_FALSE, VT_TRUE, VT_NONE = 1, 2, 3, 4, 5, 6, 7
_KT_BYTES_HEAD, _VT_BYTES_HEAD = bytes((KT_BYTES,)), bytes((VT_BYTES,))
MAX_KEY = 1 << 20  # as the shared-memory store (table.h MAX_KEY)
MAX_VALUE = (512 << 20) - 1  # Redis's largest string (proto-max-bulk-len), less the type byte
_SCAN = 512
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_VALUE_BYTES = {b: bytes([b]) for b in range(1, 10)}

_Key = int | str | bytes  # the key types, as shmkit.Store takes them

# A batch: check every add (absent) and delete (present) in order, then apply.
# KEYS[1] the hash; ARGV: op, field, value triples ("s" set, "a" add, "d" delete)
_BATCH = """
local present = {}
for i = 1, #ARGV, 3 do
  local op, f = ARGV[i], ARGV[i + 1]
  local p = present[f]
  if p == nil then p = redis.call('hexists', KEYS[1], f) == 1 end
  if op == 'a' then
    if p then return {1, f} end
    p = true
  elseif op == 'd' then
    if not p then return {2, f} end
    p = false
  else
    p = true
  end
  present[f] = p
end
for i = 1, #ARGV, 3 do
  if ARGV[i] == 'd' then redis.call('hdel', KEYS[1], ARGV[i + 1])
  else redis.call('hset', KEYS[1], ARGV[i + 1], ARGV[i + 2]) end
end
return {0}
"""

_POP = """
local v = redis.call('hget', KEYS[1], ARGV[1])
if v then redis.call('hdel', KEYS[1], ARGV[1]) end
return v
"""


def _int_bytes(v: int) -> bytes:
    if -(1 << 63) <= v < (1 << 63):
        return v.to_bytes(8, "little", signed=True)
    return v.to_bytes(abs(v).bit_length() // 8 + 1, "little", signed=True)


def encode_key(key: object) -> bytes:
    """The hash field of ``key``: its type byte and bytes, as the local store keeps them."""
    if type(key) is bytes and len(key) <= MAX_KEY:  # the usual key, in one step
        return _KT_BYTES_HEAD + key
    if isinstance(key, str):
        try:
            data = key.encode("utf-8")
        except UnicodeEncodeError as e:  # (only here: ordinary keys pay nothing)
            raise _unencodable(key, e) from e
        kt = KT_STR
    elif isinstance(key, bytes):
        data = bytes(key)
        kt = KT_BYTES
    elif isinstance(key, int) and not isinstance(key, bool):
        data = _int_bytes(int(key))
        kt = KT_INT
    else:
        extra = ("bool keys would collide with 0 and 1; use int(key)"
                 if isinstance(key, bool) else "convert the key first")
        raise UnsupportedTypeError(f"store keys must be int, str or bytes, not "
                                   f"{type(key).__name__}; {extra}")
    if len(data) > MAX_KEY:
        raise ValueTooLargeError(f"a key of {len(data)} bytes is longer than the store's "
                                 f"limit of {MAX_KEY} bytes; use a shorter key (a digest "
                                 "of it, say)")
    return bytes((kt,)) + data


def _unencodable(key: str, e: UnicodeEncodeError) -> InvalidKeyError:
    """The error of a str key UTF-8 cannot encode, as the local store words it."""
    at = e.start if 0 <= e.start < len(key) else 0
    return InvalidKeyError(
        f"store key {key!r:.80} cannot be stored: its character {key[at]!r} at position "
        f"{at} is a lone surrogate, which UTF-8 cannot encode; pass the key as bytes "
        "(os.fsencode(key) undoes os.fsdecode; key.encode('utf-8', 'surrogatepass') takes "
        "any), or use another key")


def decode_key(field: bytes) -> _Key:
    """The key of hash field ``field``; CorruptError for a field no shmkit writes."""
    if not field:
        raise CorruptError("an empty field, with no key-type byte (no shmkit writes one)")
    kt, data = field[0], field[1:]
    if len(data) > MAX_KEY:  # (encode_key refuses such a key: it could not be named)
        raise CorruptError(f"a key of {len(data)} bytes, beyond the limit of {MAX_KEY} "
                           "(no shmkit writes one)")
    if kt == KT_BYTES:
        return data
    if kt == KT_STR:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptError("a str key whose bytes are not UTF-8 (no shmkit writes "
                               "one)") from None
    if kt == KT_INT:
        v = int.from_bytes(data, "little", signed=True)
        # only the bytes encode_key gives: any other would not be found by its key
        if len(data) != 8 and _int_bytes(v) != data:
            raise CorruptError(f"an int key of {len(data)} bytes, not as shmkit writes "
                               f"{v} (8 bytes, or the fewest beyond 64 bits)")
        return v
    raise CorruptError(f"a key of type {kt}, which no shmkit writes")


def encode_value(value: Any, pickled: bool) -> bytes:
    """The hash value of ``value``: its VT_* byte and the record's value bytes."""
    t = type(value)
    out: bytes
    text = None
    if t is str:
        try:
            text = value.encode("utf-8")
        except UnicodeEncodeError:  # (a lone surrogate: pickled, or refused, as locally)
            pass
    if t is bytes:
        out = _VALUE_BYTES[VT_BYTES] + value
    elif text is not None:
        out = _VALUE_BYTES[VT_STR] + text
    elif value is True:
        return _VALUE_BYTES[VT_TRUE]
    elif value is False:
        return _VALUE_BYTES[VT_FALSE]
    elif value is None:
        return _VALUE_BYTES[VT_NONE]
    elif t is int:
        out = _VALUE_BYTES[VT_INT] + _int_bytes(value)
    elif t is float:
        return _VALUE_BYTES[VT_FLOAT] + _F64.pack(value)
    else:
        vt, head, body = (_encode_pickle if pickled else _encode_plain)(value)
        parts: list[bytes | memoryview] = [_VALUE_BYTES[vt]]
        if head is not None:
            parts += [_U32.pack(len(head)), head]
        parts.append(memoryview(body).cast("B") if not isinstance(body, bytes) else body)
        out = b"".join(parts)
    if len(out) - 1 > MAX_VALUE:
        raise ValueTooLargeError(f"a value of {len(out) - 1} bytes is larger than the "
                                 f"{MAX_VALUE} bytes a Redis string can hold; split it")
    return out


def decode_value(data: bytes, pickled: bool) -> Any:
    """The value of hash value ``data``; CorruptError for one no shmkit writes."""
    if not data:
        raise _unknown_value(data)
    vt = data[0]
    if vt == VT_BYTES:
        return data[1:]
    if vt == VT_STR:
        try:
            return data[1:].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptError("a str value whose bytes are not UTF-8 (no shmkit writes "
                               "one)") from None
    if vt == VT_INT:
        v = int.from_bytes(data[1:], "little", signed=True)
        if len(data) != 9 and _int_bytes(v) != data[1:]:  # (b"\x03" alone would read as 0)
            raise CorruptError(f"an int value of {len(data) - 1} bytes, not as shmkit writes "
                               f"{v} (8 bytes, or the fewest beyond 64 bits)")
        return v
    if vt == VT_FLOAT and len(data) == 9:
        return _F64.unpack_from(data, 1)[0]
    if vt in (VT_FALSE, VT_TRUE, VT_NONE) and len(data) == 1:
        return None if vt == VT_NONE else vt == VT_TRUE
    if vt == _VT_NDARRAY:
        arr, body = _array(data)
        if len(body):
            np = numpy()
            arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(body, np.uint8)
        return arr
    if vt == _VT_PICKLE:
        if not pickled:
            raise CorruptError("a pickled value, in a store opened without codec='pickle' "
                               "(no shmkit writes one there)")
        try:
            return pickle.loads(data[1:])
        except Exception as e:  # (as a Queue's entry that is no pickle)
            raise CorruptError(f"a pickle that does not load here ({e!r:.100}; a class "
                               "this process cannot import, or bytes no shmkit "
                               "wrote)") from e
    raise _unknown_value(data)


def _unknown_value(data: bytes) -> CorruptError:
    """The error of a value with no type byte, or one that does not fit its bytes."""
    if not data:
        return CorruptError("empty, with no value-type byte (no shmkit writes one)")
    return CorruptError(f"of value type {data[0]} and {len(data) - 1} bytes (no shmkit "
                        "writes one)")


def _array(data: bytes) -> tuple[Any, memoryview]:
    """An array value's empty array (from its header) and its data bytes, which
    the header's shape and dtype are checked to fill exactly."""
    if len(data) < 5:
        raise CorruptError(f"an array value of {len(data) - 1} bytes, too short for its "
                           "header length (no shmkit writes one)")
    (hn,) = _U32.unpack_from(data, 1)
    if hn > len(data) - 5:
        raise CorruptError(f"an array value whose header of {hn} bytes is longer than "
                           f"its {len(data) - 5} bytes (no shmkit writes one)")
    body = memoryview(data)[5 + hn:]
    try:
        return _decode(_VT_NDARRAY, data[5:5 + hn], len(body)), body
    except ValueError:
        raise CorruptError("an array value whose header is unreadable or does not match "
                           f"its {len(body)} bytes of data (no shmkit writes one)") from None


def update_pairs(other: Any, kwargs: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The (key, value) pairs ``dict.update(other, **kwargs)`` would store, in
    order, read as it reads them (and as :meth:`shmkit.Store.update` does)."""
    if isinstance(other, dict) and type(other).__iter__ is dict.__iter__:
        pairs = list(dict.items(other))  # dict's own pairs, whatever keys() says
    elif hasattr(other, "keys"):
        pairs = [(key, other[key]) for key in other.keys()]
    else:
        pairs = []
        for i, item in enumerate(other):
            try:
                pair = list(item)
            except TypeError:
                raise TypeError(f"cannot convert update sequence element #{i} to a "
                                "sequence") from None
            if len(pair) != 2:
                raise ValueError(f"update sequence element #{i} has length {len(pair)}; 2 "
                                 "is required")
            pairs.append((pair[0], pair[1]))
    pairs.extend(kwargs.items())
    return pairs


def _not_forked(pid: int, what: str) -> None:
    """Refuse to go on in a child forked by code that ``what`` ran (a pickled
    value's ``__reduce__``, an iterator): it holds none of its parent's write."""
    if os.getpid() != pid:
        raise RuntimeError(f"the process forked while {what}: the child holds none of its "
                           "parent's write, which the parent finishes, and the write was not "
                           "made here; write in the child outside it")


class _Batch:
    """One thread's open batch: its writes as the script takes them (op,
    field, value, ...; see _BATCH) and by field (None: deleted)."""

    __slots__ = ("pid", "ops", "overlay")

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child holds none of it
        self.ops: list[bytes | str] = []
        self.overlay: dict[bytes, bytes | None] = {}

    def write(self, op: str, field: bytes, data: bytes | None) -> None:
        # (a handle takes its batch before encoding, which may fork: a child
        # must not write into its copy, nor to the server as if outside one)
        _not_forked(self.pid, "a write inside a batch encoded its key or value")
        self.ops += (op, field, b"" if data is None else data)
        self.overlay[field] = data


@guard_all
class Store(RedisObject, MutableMapping[_Key, Any]):
    """A dict-like store in a Redis hash, shared by every process that reaches the server.

    ``ns.Store(name)`` (``ns = shmkit.connect("redis://...")``) creates or
    opens it.  The same keys, values, encoding and exceptions as
    :class:`shmkit.Store`: ``st[k] = v``, ``st[k]``, ``get``, ``add``,
    ``del``, ``pop``, ``in``, ``len``, iteration, ``items``, ``values``,
    ``get_many``, ``get_into``, ``nbytes``, ``clear``, ``batch()`` (applied
    atomically by one Lua script), ``statistics()``.

    Parameters
    ----------
    codec:
        ``None`` or ``"pickle"``, fixed at creation (MismatchError when
        opened with another; left out, adopted).
    readonly:
        Writes raise :class:`ReadOnlyError`.
    create:
        ``None`` create or open, ``True`` only create, ``False`` only open.
    on_destroy:
        Called once by :meth:`unlink` in this process.

    Parameters of the shared-memory store that Redis cannot honour
    (``path``, ``size``, ``max_size``, ``lifetime``...) raise
    :class:`UnsupportedParameterError` when given.

    Example
    -------
    >>> st = ns.Store("cache")                          # doctest: +SKIP
    >>> with st.batch():                                # doctest: +SKIP
    ...     st["a"] = 1; st["b"] = 2
    """

    _kind = "store"
    _unguarded = ("update",)  # the arguments' own OSError is theirs, not the server's

    def __init__(self, ns: RedisNamespace, name: str, *, codec: str | _Default | None = DEFAULT,
                 readonly: bool = False, create: bool | None = None,
                 on_destroy: Callable[[], Any] | None = None, **local_only: Any) -> None:
        super().__init__(ns, name)
        refuse("Store", name, local_only)
        if given(codec) and codec not in (None, "pickle"):
            raise ValueError(f"codec must be None or 'pickle', not {codec!r}")
        meta = self._open_meta(create, {"codec": (codec if given(codec) else None) or "none"})
        have = meta.get("codec")
        if have not in ("none", "pickle"):
            raise self._corrupt_meta("codec", have)
        if given(codec) and (codec or "none") != have:
            raise self._mismatch("store", name, "codec", codec,
                                 None if have == "none" else have)
        self._pickled = have == "pickle"
        self._refuse_foreign_key()
        self._readonly = bool(readonly)
        self._on_destroy = on_destroy
        # A batch is its thread's, as the shared-memory store's: another
        # thread's writes go to the server meanwhile, and it reads the server.
        # (by _core.thread_serial(), which no later thread is given, unlike
        # threading.get_ident(): a new thread never joins an ended one's batch)
        self._batches: dict[int, _Batch] = {}
        self._batch_script = self._r.register_script(_BATCH)
        self._pop_script = self._r.register_script(_POP)

    def _refuse_foreign_key(self) -> None:
        """WrongKindError if the store's key holds something other than a hash
        (another program's list or string, say): every read and write would
        fail on it.  A meta hash this open just made beside it is removed."""
        try:
            have = cast("bytes", self._r.type(self._key))  # (bytes: see as_bytes_or_none)
            if have in (b"hash", b"none"):
                return
            if self._created:
                self._r.delete(self._meta_key)
        except (RedisError, OSError) as e:
            raise _translate(self._ns, e, f"open {self._what_name()}") from e
        raise WrongKindError(
            f"{self._key!r} in {self._ns.url} is a Redis {have.decode(errors='replace')}, "
            "not the hash a store keeps its keys in (another program's key, or one made by "
            f"hand): use another name (or prefix), or delete that key (DEL {self._key}) if it "
            "is stale")

    def _open_batch(self) -> _Batch | None:
        """This thread's open batch, or None (a forked child holds none of its parent's)."""
        b = self._batches.get(_core.thread_serial())
        return b if b is not None and b.pid == os.getpid() else None

    def _reopen_args(self) -> dict[str, Any]:
        return {"readonly": self._readonly}

    # -- helpers --------------------------------------------------------------

    def _writable(self) -> None:
        self._live()
        if self._readonly:
            raise ReadOnlyError(f"store {self._name!r} was opened with readonly=True")

    def _raw(self, field: bytes, b: _Batch | None) -> bytes | None:
        """The stored bytes of ``field``, as batch ``b`` (if any) has them."""
        if b is not None and field in b.overlay:
            return b.overlay[field]
        return as_bytes_or_none(self._r.hget(self._key, field))

    def _key_of(self, field: bytes) -> _Key:
        """The key of ``field``; CorruptError naming the field if no shmkit wrote it."""
        try:
            return decode_key(field)
        except CorruptError as e:
            # (it names no key the API takes: the field is deleted in Redis itself)
            raise CorruptError(
                f"store {self._name!r}: the field {field!r:.80} of the hash {self._key!r} "
                f"in {self._ns.url} is {e}: another program wrote it; delete that field "
                f"(HDEL {self._key} <field>), or use another name or prefix. An iteration "
                "that raised this goes on with the other keys at its next step") from None

    def _value_of(self, key: object, raw: bytes, removed: bool = False) -> Any:
        """The value ``raw`` of ``key``; CorruptError naming the key if no shmkit
        wrote it (``removed``: pop() took it out)."""
        try:
            return decode_value(raw, self._pickled)
        except CorruptError as e:
            raise self._corrupt_value(f"key {key!r:.80}", e, removed) from e.__cause__

    def _field_value(self, field: bytes, raw: bytes) -> Any:
        """As _value_of, for values(), which decodes a field's key only to name it."""
        try:
            return decode_value(raw, self._pickled)
        except CorruptError as e:
            try:
                what = f"key {decode_key(field)!r:.80}"
            except CorruptError:
                what = f"the field {field!r:.80}"
            raise self._corrupt_value(what, e, False) from e.__cause__

    def _corrupt_value(self, what: str, e: CorruptError, removed: bool) -> CorruptError:
        fix = ("it was removed from the store" if removed else
               "delete the key or write it again (or use another name or prefix). An "
               "iteration that raised this goes on with the other keys at its next step")
        return CorruptError(f"store {self._name!r}: the value of {what} in the hash "
                            f"{self._key!r} in {self._ns.url} is {e}: another program wrote "
                            f"it; {fix}")

    # -- the mapping ----------------------------------------------------------

    def __getitem__(self, key: _Key) -> Any:
        self._live()
        raw = self._raw(encode_key(key), self._open_batch())
        if raw is None:
            raise KeyError(key)
        return self._value_of(key, raw)

    def get(self, key: _Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        self._live()
        raw = self._raw(encode_key(key), self._open_batch())
        return default if raw is None else self._value_of(key, raw)

    def __setitem__(self, key: _Key, value: Any) -> None:
        self._writable()
        b = self._open_batch()  # (before encoding, which may run code that forks)
        field, data = encode_key(key), encode_value(value, self._pickled)
        if b is not None:
            b.write("s", field, data)
            return
        self._r.hset(self._key, field, data)

    def add(self, key: _Key, value: Any) -> None:
        """Insert ``key``; :class:`KeyExistsError` (a KeyError) if it is already there."""
        self._writable()
        b = self._open_batch()  # (before encoding, which may run code that forks)
        field, data = encode_key(key), encode_value(value, self._pickled)
        if b is not None:
            if self._raw(field, b) is not None:
                raise self._exists(key)
            b.write("a", field, data)
            return
        if not self._r.hsetnx(self._key, field, data):
            raise self._exists(key)

    def _exists(self, key: object) -> KeyExistsError:
        return KeyExistsError(f"key {key!r} is already in store {self._name!r}; assign "
                              "st[key] = value to replace it")

    def __delitem__(self, key: _Key) -> None:
        self._writable()
        b = self._open_batch()  # (before encoding, which may run code that forks)
        field = encode_key(key)
        if b is not None:
            if self._raw(field, b) is None:
                raise KeyError(key)
            b.write("d", field, None)
            return
        if not self._r.hdel(self._key, field):
            raise KeyError(key)

    _missing = object()

    def pop(self, key: _Key, default: Any = _missing) -> Any:
        """Remove ``key`` and return its value, in one step (KeyError, or ``default``)."""
        self._writable()
        b = self._open_batch()  # (before encoding, which may run code that forks)
        field = encode_key(key)
        raw: bytes | None
        if b is not None:
            raw = self._raw(field, b)
            if raw is not None:
                # decoded first: a value no shmkit wrote stays, and nothing is staged
                value = self._value_of(key, raw)
                b.write("d", field, None)
                return value
        else:
            raw = self._pop_script(keys=[self._key], args=[field])
        if raw is None:
            if default is self._missing:
                raise KeyError(key)
            return default
        return self._value_of(key, raw, removed=True)

    def __contains__(self, key: object) -> bool:
        self._live()
        field = encode_key(key)
        b = self._open_batch()
        if b is not None and field in b.overlay:
            return b.overlay[field] is not None
        return bool(self._r.hexists(self._key, field))

    def __len__(self) -> int:
        self._live()
        return int(self._r.hlen(self._key))

    @guarded
    def _scan(self) -> Iterator[tuple[bytes, bytes]]:
        # HSCAN may return a field twice (the hash rehashed meanwhile): the
        # fields already given are skipped, so each key comes once.
        self._live()
        cursor, seen = 0, set[bytes]()
        while True:
            cursor, chunk = self._r.hscan(self._key, cursor, count=_SCAN)
            # fields and values (no no_values=), as bytes (see _base.as_bytes_or_none)
            for field, raw in cast("dict[bytes, bytes]", chunk).items():
                if field not in seen:
                    seen.add(field)
                    yield field, raw
            if cursor == 0:
                return

    def __iter__(self) -> Iterator[_Key]:
        """The keys (HSCAN).  A field no shmkit wrote raises CorruptError naming
        it, and the iterator's next step goes on with the others."""
        return _Entries(self._scan(), lambda field, _raw: self._key_of(field))

    def _pairs(self) -> Iterator[tuple[_Key, Any]]:
        def pair(field: bytes, raw: bytes) -> tuple[_Key, Any]:
            key = self._key_of(field)
            return key, self._value_of(key, raw)
        return _Entries(self._scan(), pair)

    def _values(self) -> Iterator[Any]:
        return _Entries(self._scan(), self._field_value)

    def keys(self) -> _Keys:
        return _Keys(self)

    def items(self) -> _Items:
        """``(key, value)`` pairs (HSCAN: keys present throughout come exactly once)."""
        return _Items(self)

    def values(self) -> _Values:
        return _Values(self)

    def get_many(self, keys: Iterable[_Key], *default: Any) -> list[Any]:
        """The values of ``keys`` in order, in one round trip (HMGET); KeyError for a
        missing key unless ``default`` is given."""
        self._live()
        if len(default) > 1:
            raise TypeError(f"get_many() takes at most 2 arguments ({len(default) + 1} given)")
        keys = list(keys)
        fields = [encode_key(k) for k in keys]
        if not fields:
            return []
        # bytes or nil, as _base.as_bytes_or_none says
        raws = cast("list[bytes | None]", self._r.hmget(self._key, fields))
        b = self._open_batch()
        if b is None and None not in raws:  # every key there: decode in one pass
            pickled = self._pickled
            with contextlib.suppress(CorruptError):  # (the loop below names the key)
                return [r[1:] if r[:1] == _VT_BYTES_HEAD else decode_value(r, pickled)
                        for r in cast("list[bytes]", raws)]
        out: list[Any] = []
        for key, field, raw in zip(keys, fields, raws):
            if b is not None and field in b.overlay:
                raw = b.overlay[field]
            if raw is None:
                if not default:
                    raise KeyError(key)
                out.append(default[0])
            else:
                out.append(self._value_of(key, raw))
        return out

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Store the pairs of ``other`` and then ``kwargs`` in one batch: as
        :meth:`shmkit.Store.update`, every pair or none."""
        pid = os.getpid()
        pairs = update_pairs(other, kwargs)  # read before anything is written
        _not_forked(pid, "update() read its pairs")
        with self.batch():
            for key, value in pairs:
                self[key] = value

    def get_into(self, key: _Key, buffer: Buffer) -> int:
        """Copy a ``bytes`` or array value's bytes into ``buffer``; return their count.

        As :meth:`shmkit.Store.get_into`: ValueTooLargeError (buffer unchanged)
        when it is too small, UnsupportedTypeError for other value types.
        """
        self._live()
        out = writable_bytes(buffer, "get_into()")
        raw = self._raw(encode_key(key), self._open_batch())
        if raw is None:
            raise KeyError(key)
        vt = raw[0] if raw else 0
        if vt == VT_BYTES:
            body = memoryview(raw)[1:]
        elif vt == _VT_NDARRAY:
            try:  # the header is checked as get() checks it: the data must fit it
                body = _array(raw)[1]
            except CorruptError as e:
                raise self._corrupt_value(f"key {key!r:.80}", e, False) from None
        elif vt not in _VALUE_BYTES:  # (empty, or a type no shmkit writes: as get() says)
            raise self._corrupt_value(f"key {key!r:.80}", _unknown_value(raw), False)
        else:
            raise UnsupportedTypeError(f"get_into(): the value of {key!r} is not bytes or a "
                                       "numpy array; get() it")
        if len(body) > len(out):
            raise ValueTooLargeError(f"the value of {key!r} has {len(body)} bytes, more than "
                                     f"the buffer's {len(out)}; pass a larger buffer")
        out[:len(body)] = body
        return len(body)

    def nbytes(self, key: _Key) -> int:
        """Bytes the value of ``key`` takes when encoded (KeyError if missing)."""
        self._live()
        field = encode_key(key)
        b = self._open_batch()
        if b is not None and field in b.overlay:
            raw = b.overlay[field]
            if raw is None:
                raise KeyError(key)
            return len(raw) - 1
        n = int(self._r.hstrlen(self._key, field))
        if n == 0:  # missing, or an empty value (no shmkit writes one: it has no type byte)
            if self._r.hexists(self._key, field):
                raise self._corrupt_value(f"key {key!r:.80}", _unknown_value(b""), False)
            raise KeyError(key)
        return n - 1

    def clear(self) -> None:
        """Remove every key (one DEL); RuntimeError inside a batch, as the local store."""
        self._writable()
        if self._open_batch() is not None:  # (as the shared-memory store's)
            raise RuntimeError("clear() cannot run inside a batch (it is not one of the writes "
                               "a batch stages); call it before or after the with block")
        self._r.delete(self._key)

    # -- the store ------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator["Store"]:
        """Group writes so other processes see all of them at once, or none.

        The writes are kept in this handle and applied by one Lua script when
        the block ends (atomic on the server); reads through this handle see
        them meanwhile, other processes see the state before.  An ``add`` of
        a present key or a ``del`` of a missing one raises at once, and is
        checked again by the script: if another process changed it meanwhile,
        nothing is applied and KeyExistsError/KeyError is raised at the end.
        If the block raises, its writes are discarded.  Batches nest.
        """
        self._writable()
        if self._open_batch() is not None:
            yield self
            return
        me, b = _core.thread_serial(), _Batch()
        self._batches[me] = b
        try:
            yield self
        finally:  # (in whichever thread leaves the block)
            self._batches.pop(me, None)
        ops = b.ops
        if os.getpid() != b.pid:
            raise RuntimeError("this batch was opened before the process forked, and a forked "
                               "child holds none of its parent's batch (the parent's goes on): "
                               "its writes in the block went to the server one by one, not as "
                               "part of it; open a batch in the child instead")
        if not ops:
            return
        try:
            got = self._batch_script(keys=[self._key], args=ops)
        except Exception as e:
            from ._base import _translate
            from redis.exceptions import RedisError
            if isinstance(e, (RedisError, OSError)) and not isinstance(e, KeyError):
                raise _translate(self._ns, e, f"batch on store {self._name!r}") from e
            raise
        if got[0] == 1:
            raise self._exists(decode_key(got[1]))
        if got[0] == 2:
            raise KeyError(decode_key(got[1]))

    def statistics(self) -> dict[str, Any]:
        """``{"keys", "used_bytes", "codec", "backend", "server"}`` (used_bytes: Redis's
        MEMORY USAGE estimate of the hash)."""
        self._live()
        pipe = self._r.pipeline(transaction=False)
        pipe.hlen(self._key)
        pipe.memory_usage(self._key)
        keys, used = pipe.execute()
        return {"keys": int(keys), "used_bytes": int(used or 0),
                "codec": "pickle" if self._pickled else "none", "backend": "redis",
                "server": self._ns.url}

    @property
    def used_bytes(self) -> int:
        """Redis's estimate of the bytes the hash takes (MEMORY USAGE)."""
        self._live()
        return int(self._r.memory_usage(self._key) or 0)

    @property
    def codec(self) -> str | None:
        return "pickle" if self._pickled else None

    @property
    def readonly(self) -> bool:
        return self._readonly

    def unlink(self) -> None:
        """Remove the store (its hash and meta) from Redis."""
        RedisObject.unlink(self)

    def close(self) -> None:
        """Release this handle (the store stays in Redis)."""
        RedisObject.close(self)

    def __repr__(self) -> str:
        if self._closed:
            return f"<shmkit.redis.Store {self._name!r} closed>"
        return f"<shmkit.redis.Store {self._name!r} at {self._ns.url}>"

    # unhashable, as a dict; typeshed writes the same line with the same ignore (list,
    # dict): mypy cannot express a method of object replaced by None
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return self is other


_T = TypeVar("_T")


class _Entries(Iterator[_T]):
    """Entries of a store decoded one by one from its HSCAN.  Not a generator:
    a field or value no shmkit wrote raises CorruptError from one step, and
    the next step goes on with the other entries (as a Channel's next receive
    goes on past an entry another program added)."""

    __slots__ = ("_scan", "_decode")

    def __init__(self, scan: Iterator[tuple[bytes, bytes]],
                 decode: Callable[[bytes, bytes], _T]) -> None:
        self._scan, self._decode = scan, decode

    def __iter__(self) -> _Entries[_T]:
        return self

    def __next__(self) -> _T:
        field, raw = next(self._scan)
        return self._decode(field, raw)


class _Keys(KeysView[_Key]):
    _mapping: Store

    def __iter__(self) -> Iterator[_Key]:
        return iter(self._mapping)  # (KeysView's own, a generator, ends at a CorruptError)


class _Items(ItemsView[_Key, Any]):
    _mapping: Store  # the view's mapping (set by ItemsView.__init__)

    def __iter__(self) -> Iterator[tuple[_Key, Any]]:
        return self._mapping._pairs()


class _Values(ValuesView[Any]):
    _mapping: Store

    def __iter__(self) -> Iterator[Any]:
        return self._mapping._values()
