"""Look at shmkit objects from the outside: list, describe, remove, collect garbage.

These are the functions behind the ``shmkit`` command; programs can call
them too (a supervisor that cleans up after crashed workers, a health page
that shows who holds which lock)::

    >>> from shmkit import inspect
    >>> for obj in inspect.list_objects():             # doctest: +SKIP
    ...     print(obj["name"], obj["kind"], obj["state"], obj["attached"])
    >>> inspect.collect_garbage(dry_run=True)          # doctest: +SKIP
    []

Listing never attaches: it opens each file read-only, reads the header with
``os.pread`` and asks the kernel which attach-slot locks are held, so it
changes nothing and cannot be confused by a half-created or corrupt segment
(those are listed with their ``state``).  :func:`describe` opens the object
read-only with the class for its kind to add kind-specific detail (lock
holder, waiters, record layout); a read-only handle claims no attach slot and
never removes an ``attached``-lifetime segment when it closes.

Every function returns plain dicts and lists (what ``--json`` prints).
Targets are names (``"jobs"``) or, when they contain a ``/``, file paths of
segments created with ``path=``.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import stat
import struct
import time
from typing import Any, Iterator, Sequence

from ._lazy import load, numpy
from . import _core
from .errors import (
    CorruptError,
    FormatVersionError,
    InvalidNameError,
    NotFoundError,
    ShmkitError,
)
from .segment import (
    _ATTACH_SPAN,
    _FLAG_ATTACHED,
    _HEADER_BYTES,
    _READER_BYTE,
    MAGIC,
    PREFIX,
    SHM_DIR,
    Kind,
    Segment,
    _Header,
    list_segments,
    process_stopped,
    segment_path,
)

__all__ = [
    "KIND_CLASSES",
    "resolve",
    "scan",
    "list_objects",
    "describe",
    "counters",
    "sample",
    "rates",
    "activity",
    "select",
    "remove",
    "collect_garbage",
    "find_orphans",
]

#: The class that opens each kind, as ``"module:Class"`` (imported on demand,
#: so a kind whose module is not installed is still described as a segment).
KIND_CLASSES: dict[Kind, str] = {
    Kind.RAW: "shmkit.segment:Segment",
    Kind.MUTEX: "shmkit.sync:Mutex",
    Kind.RWLOCK: "shmkit.sync:RWLock",
    Kind.EVENT: "shmkit.sync:Event",
    Kind.SEMAPHORE: "shmkit.sync:Semaphore",
    Kind.CONDITION: "shmkit.sync:Condition",
    Kind.STRUCT: "shmkit.records:Struct",
    Kind.ARRAY: "shmkit.records:Array",
    Kind.CHANNEL: "shmkit.channel:Channel",
    Kind.QUEUE: "shmkit.channel:Queue",
    Kind.STORE: "shmkit.store:Store",
    Kind.HEAP: "shmkit.heap:Heap",
    Kind.TOPIC: "shmkit.topic:Topic",
    Kind.SERVICE: "shmkit.service:Service",
}

_SLOT_BASE = _core.SLOT_LOCK_BASE
_INIT_BYTE = _core.INIT_LOCK_BYTE
_TOKEN_MASK = 0x3FFFFFFF
_WAITERS_BIT = 0x80000000
_TMP_SUFFIX = ".tmp"
_TMP_PREFIX = "." + PREFIX
_TMP_GRACE = 60.0  # seconds: a temp file this old is no creator's work in progress


def _anyone_attached(fd: int) -> bool:
    """Whether any other open file holds an attach lock (kernel-backed, whatever the
    header says)."""
    return _core.ofd_held(fd, *_ATTACH_SPAN)


# -- finding things -------------------------------------------------------


def resolve(target: str) -> tuple[str, str]:
    """``(name, path)`` for a segment name, or for a file path (contains ``/``).

    >>> resolve("jobs")
    ('jobs', '/dev/shm/shmkit.jobs')
    >>> resolve("/var/lib/app/frames")
    ('/var/lib/app/frames', '/var/lib/app/frames')
    """
    if "/" in target:
        path = os.path.abspath(target)
        return path, path
    return target, segment_path(target)


def _blank(name: str, path: str) -> dict[str, Any]:
    return {
        "name": name, "path": path, "state": "ok", "kind": None, "size": None,
        "max_size": None, "file_bytes": None, "format_version": None, "lifetime": None,
        "created": None, "creator_pid": None, "max_attach": None, "attached": [],
        "readonly_attached": False, "resizes": None, "layout": None,
        "uid": None, "mode": None,
    }


def scan(target: str) -> dict[str, Any]:
    """Header facts and live attachments of one object, without attaching to it.

    The result has ``name, path, state, kind, size, max_size, file_bytes,
    format_version, lifetime, created, creator_pid, max_attach, attached
    ([{"slot", "pid", "attached", "comm"}]), readonly_attached, resizes,
    layout, uid, mode``.  ``state`` is ``"ok"``; ``"stale"`` (lifetime
    ``attached`` and no process attached any more: ``shmkit gc`` removes it);
    ``"creating"`` (its creator is still initialising it); ``"half-created"``
    (its creator died before finishing); ``"corrupt: <reason>"``;
    ``"format vN"`` (made by a shmkit with another data format); or
    ``"unreadable: <reason>"``.  Fields that could not be read are None.

    Raises :class:`NotFoundError` if there is no such object.

    >>> scan("no-such-object")
    Traceback (most recent call last):
    shmkit.errors.NotFoundError: ...
    """
    name, path = resolve(target)
    out = _blank(name, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if "/" in target:
            raise NotFoundError(f"no segment at {path}") from None
        raise NotFoundError(f"no segment named {name!r} ({path}); see `shmkit ls`") from None
    except OSError as e:
        try:
            st = os.lstat(path)
            out.update(uid=st.st_uid, mode=stat.S_IMODE(st.st_mode), file_bytes=st.st_size)
        except OSError:
            pass
        reason = "a symbolic link (never followed)" if e.errno == errno.ELOOP else e.strerror
        out["state"] = f"unreadable: {reason}"
        return out
    try:
        st = os.fstat(fd)
        out.update(uid=st.st_uid, mode=stat.S_IMODE(st.st_mode),
                   file_bytes=st.st_blocks * 512)
        if not stat.S_ISREG(st.st_mode):
            out["state"] = "unreadable: not a regular file"
            return out
        _read_header(fd, st, out)
    finally:
        os.close(fd)
    return out


def _read_header(fd: int, st: os.stat_result, out: dict[str, Any]) -> None:
    raw = os.pread(fd, _HEADER_BYTES, 0)
    if raw[:8] != MAGIC and raw[:8].strip(b"\0") == b"":
        # No magic yet: a creator at work (it holds the init lock) or one that died.
        if _core.ofd_held(fd, _INIT_BYTE, 1):
            out["state"] = "creating"
            return
        raw = os.pread(fd, _HEADER_BYTES, 0)  # it may have finished meanwhile
        if raw[:8] != MAGIC:
            if len(raw) < _HEADER_BYTES:  # creators link only whole files
                out["state"] = (f"corrupt: the file is {len(raw)} bytes, shorter than a "
                                "header")
            elif _anyone_attached(fd):
                out["state"] = "corrupt: no magic, yet processes are attached"
            else:
                out["state"] = "half-created"
            return
    if raw[:8] != MAGIC:
        out["state"] = "corrupt: not a shmkit segment (bad magic)"
        return
    if len(raw) < _HEADER_BYTES:
        out["state"] = f"corrupt: the file is {len(raw)} bytes, shorter than a header"
        return
    out["format_version"] = version = struct.unpack_from("=I", raw, 8)[0]
    try:
        # The file's length read after the header: a resize extends the file
        # before it stores the size, so one in between cannot make a whole
        # file look short (Segment._check_truncated reads in this order too).
        h = _Header(raw, "", os.fstat(fd).st_size)
    except FormatVersionError:
        out["state"] = f"format v{version}"
        return
    except CorruptError as e:
        reason = str(e).strip()  # its texts start after the segment's name, here ""
        if reason.startswith("has "):
            reason = reason[4:]
        elif reason.startswith("'s "):
            reason = "the" + reason[2:]
        out["state"] = "corrupt: " + reason
        return
    out.update(
        kind=h.kind.name.lower(), size=h.size, max_size=h.max_size,
        lifetime="attached" if h.flags & _FLAG_ATTACHED else "persistent",
        created=h.created_ns / 1e9, creator_pid=h.creator_pid, max_attach=h.max_slots,
        resizes=h.resizes, layout=h.layout,
        attached=_attachments(fd, min(h.hwm, h.max_slots)),
        readonly_attached=_core.ofd_held(fd, _READER_BYTE, 1),
    )
    if out["lifetime"] == "attached" and not out["attached"] and not out["readonly_attached"]:
        out["state"] = "stale"
        return
    # What the open path checks next: whose file it is, and the kind's own
    # payload format (kept in the layout), so "ok" means it can be opened.
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        out["state"] = (f"untrusted: owned by uid {st.st_uid}; open it with "
                        f"trust_owner={st.st_uid}")
        return
    why = _payload_format_problem(h.kind, h.layout)
    if why:
        out["state"] = why


#: Where each kind keeps the payload format version its class reads.
_PAYLOAD_FORMATS: dict[Kind, tuple[str, str]] = {
    Kind.CHANNEL: ("shmkit.channel", "FORMAT"),
    Kind.QUEUE: ("shmkit.channel", "FORMAT"),
    Kind.STORE: ("shmkit.store", "FORMAT"),
    Kind.HEAP: ("shmkit.heap", "HEAP_FORMAT"),
    Kind.TOPIC: ("shmkit.topic", "FORMAT"),
    Kind.SERVICE: ("shmkit.service", "FORMAT"),
    Kind.STRUCT: ("shmkit.records", "_FORMAT"),
    Kind.ARRAY: ("shmkit.records", "_FORMAT"),
    Kind.SEMAPHORE: ("shmkit.sync", "Semaphore._FORMAT"),
    Kind.CONDITION: ("shmkit.sync", "Condition._FORMAT"),
}


def _payload_format_problem(kind: Kind, layout: dict[str, Any]) -> str | None:
    """The state to show if the kind's class would refuse the layout: its
    payload format, or a field it reads (an Event's or a Semaphore's)."""
    where = _PAYLOAD_FORMATS.get(kind)
    if where is not None:
        try:
            expected: Any = functools.reduce(getattr, where[1].split("."), load(where[0]))
        except (ImportError, AttributeError):
            return None
        got = layout.get("format")
        if not isinstance(got, int) or isinstance(got, bool):
            return f"corrupt: its layout names no {kind.name.lower()} format"
        if got != expected:
            return f"format: {kind.name.lower()} format {got!r}, this shmkit reads {expected}"
    if kind in (Kind.EVENT, Kind.SEMAPHORE):
        why: str | None = load("shmkit.sync").layout_problem(kind.name.lower(), layout)
        if why is not None:
            return "corrupt: " + why.removeprefix("has ")
    return None


def _attachments(fd: int, hwm: int) -> list[dict[str, Any]]:
    """Live attachments among slots [0, hwm): those whose slot lock someone holds."""
    return [{k: e[k] for k in ("slot", "pid", "attached", "comm")}
            for e in _core.attach_table(fd, max(hwm, 0))]


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def list_objects(patterns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """:func:`scan` of every shmkit object in /dev/shm, sorted by name.

    ``patterns`` (shell wildcards such as ``"cache.*"``) keeps only the
    names matching one of them.  Objects that vanish while being listed are
    left out.
    """
    out = []
    for name, _path in list_segments():
        if not _matches(name, patterns):
            continue
        try:
            out.append(scan(name))
        except NotFoundError:
            continue
    return out


# -- describing one object -------------------------------------------------


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(load(module), attr)


def _open_readonly(kind: Kind, name: str, path: str) -> tuple[Any, str | None]:
    """Open read-only with the kind's class; fall back to a plain segment.

    Returns ``(object, why_not)``: ``why_not`` says why the kind's own class
    could not be used (module missing, its open refused), else None.
    """
    why = None
    pname = None if "/" in name else name  # a path target is opened by path
    spec = KIND_CLASSES.get(kind)
    if spec is not None and spec != KIND_CLASSES[Kind.RAW]:
        cls_name = spec.split(":")[1]
        try:
            cls = _import(spec)
        except (ImportError, AttributeError) as e:
            why = f"{spec} is not available ({e})"
        else:
            try:
                opener = getattr(cls, "open", None)
                if callable(opener):
                    obj = opener(pname, path=path, readonly=True)
                else:
                    obj = cls(pname, create=False, path=path, readonly=True)
            except NotFoundError:
                raise
            except Exception as e:  # the class could not read it: say so, show the segment
                why = f"{cls_name} could not open it read-only: {e}"
            else:
                seg = _segment_of(obj)
                if seg is None or seg.readonly:
                    return _unseen(obj), None
                # It ignored readonly=True and attached read-write.  Leave without
                # close(): as the last attachment that would remove the object.
                seg._detach()
                why = f"{cls_name} ignores readonly=True, so it is not used to look"
    seg = Segment.__new__(Segment)
    seg._attach(pname, path, size=None, create=False, readonly=True, kind=kind)
    return _unseen(seg), why


def _segment_of(obj: Any) -> Segment | None:
    """The Segment an object lives in (itself, ``.segment`` or ``._seg``)."""
    if isinstance(obj, Segment):
        return obj
    for attr in ("segment", "_seg"):
        try:
            seg = getattr(obj, attr, None)
        except Exception:
            continue
        if isinstance(seg, Segment):
            return seg
    return None


def _unseen(obj: Any) -> Any:
    """Drop the shared lock a read-only handle holds on byte 1.

    While held, a last ``attached``-lifetime process closing would see a
    reader and leave the segment behind for ``gc``; looking must not do that.
    Without it we are invisible: if the segment is removed meanwhile, our
    mapping stays valid and we read what it held.
    """
    seg = _segment_of(obj)
    if seg is not None and seg.readonly and not seg.closed:
        _core.ofd_unlock(seg._fd, _READER_BYTE, 1)
    return obj


def _slot_pid(seg: Segment, token: int) -> int | None:
    """The pid recorded for the attachment named by ``token`` (alive or not)."""
    return _core.token_owner_pid(seg._mapping, token, False)


def _lock_state(seg: Segment, off: int) -> dict[str, Any]:
    """Holder and waiters of the robust mutex word at absolute ``off``."""
    word = _core.load32(seg._mapping, off)
    token = word & _TOKEN_MASK
    if not token:
        return {"held": False, "holder_pid": None, "holder_alive": False,
                "waiters": bool(word & _WAITERS_BIT)}
    pid = _slot_pid(seg, token)
    alive = bool(_core.token_alive(seg._mapping, token))
    out = {"held": True, "holder_pid": pid, "holder_alive": alive,
           "waiters": bool(word & _WAITERS_BIT)}
    if alive and process_stopped(pid):
        out["holder_stopped"] = True  # present only when it is so: SIGSTOP, a debugger
    return out


def _slot_counts(seg: Segment, base: int, signed: bool = False) -> tuple[list[Any], int]:
    """Per-attachment counts stored as u64 ``gen << 32 | count`` at ``base``.

    Returns ``([{"pid", "count"}] of live attachments, total count of dead ones)``.
    """
    m = seg._mapping
    live: dict[int, int] = {}
    dead = 0
    for slot, _off, v, count, alive in _core.slot_counts(m, base):
        if signed and count >= 1 << 31:
            count -= 1 << 32
        token = ((v >> 32) & 0xFFFFF) << 10 | slot
        if alive:
            pid = _slot_pid(seg, token) or 0
            live[pid] = live.get(pid, 0) + count
        else:
            dead += count
    return [{"pid": p, "count": c} for p, c in sorted(live.items())], dead


def _sync_detail(kind: Kind, obj: Any) -> dict[str, Any]:
    seg = obj._seg
    if kind is Kind.MUTEX:
        return {"mutex": _lock_state(seg, obj._base)}
    if kind is Kind.CONDITION:
        stats = obj.statistics()
        return {"condition": {"lock": _lock_state(seg, obj.lock._base),
                              "waiters": stats["waiters"]}}
    if kind is Kind.EVENT:
        return {"event": obj.statistics()}
    if kind is Kind.RWLOCK:
        readers, dead = _slot_counts(seg, obj._base + 64)
        stats = obj.statistics()
        return {"rwlock": {"writer": _lock_state(seg, obj._wlock._base),
                           "readers": [{"pid": r["pid"], "holds": r["count"]} for r in readers],
                           "dead_reader_holds": dead,
                           "writer_waiting_or_in": stats["writer_waiting_or_in"]}}
    if kind is Kind.SEMAPHORE:
        holders, dead = _slot_counts(seg, obj._base + 128, signed=True)
        stats = obj.statistics()
        return {"semaphore": {"value": stats["value"],
                              "maximum": obj.maximum,
                              "waiters": stats["waiters"],
                              "holders": [{"pid": h["pid"], "units": h["count"]}
                                          for h in holders],
                              "dead_units": max(dead, 0),
                              "lock": _lock_state(seg, obj._base)}}
    return {}


def _fields(dtype: Any) -> list[dict[str, Any]]:
    if dtype.fields is None:
        return []
    return [{"name": n, "dtype": str(dtype.fields[n][0]), "offset": dtype.fields[n][1]}
            for n in dtype.names]


def describe(target: str) -> dict[str, Any]:
    """Everything ``shmkit info`` shows about one object.

    The :func:`scan` facts, then, for a healthy object, what its own class
    reports when opened read-only: the segment's lock (``lock``: held,
    holder_pid, holder_alive, waiters) and kind-specific detail under the
    kind's name (``mutex``, ``rwlock``, ``event``, ``semaphore``,
    ``condition``; ``record`` / ``array`` with the record layout; the
    ``info()`` of channels, stores and heaps).  A holder that died keeps its
    pid with ``holder_alive: False`` (the next acquirer recovers the lock).
    ``detail_error`` says why kind-specific detail is missing, if it is.

    Opening read-only claims no attach slot, writes nothing and never
    removes the object, so describing changes nothing another process sees.

    Raises :class:`NotFoundError` if there is no such object.
    """
    out = scan(target)
    if out["state"] not in ("ok", "stale"):
        return out
    kind = Kind[out["kind"].upper()]
    try:
        obj, why = _open_readonly(kind, out["name"], out["path"])
    except NotFoundError:
        raise
    except ShmkitError as e:  # changed under us (removed and re-made, corrupted)
        out["detail_error"] = str(e)
        return out
    try:
        seg = _segment_of(obj)
        own_info = getattr(obj, "info", None)
        if callable(own_info):  # segments, records, channels, stores, heaps
            out.update(own_info())
        elif seg is not None:   # sync objects: segment facts, then their locks
            out.update(seg.info())
            out.update(_sync_detail(kind, obj))
        out["state"] = "stale" if out["state"] == "stale" and not out["attached"] else "ok"
        if seg is not None:
            out["lock"] = _lock_state(seg, 60)
        dtype = getattr(obj, "dtype", None)
        for key in ("record", "array"):
            if key in out and getattr(dtype, "fields", None) is not None:
                out[key]["fields"] = _fields(dtype)
        if why:
            out["detail_error"] = why
    except Exception as e:  # kind detail is a bonus: never lose the header facts
        out["detail_error"] = f"{type(e).__name__}: {e}"
    finally:
        # Detach without close(): closing an "attached"-lifetime object as its
        # last user would remove it, and looking must not.
        seg = _segment_of(obj)
        if seg is not None:
            seg._detach()
        else:
            obj.close()
    return out


# -- live activity (shmkit top) --------------------------------------------

# Payload offsets of the counters each kind keeps (see the layout comments of
# _core/ring.c, _core/table.c, _core/heap.c and shmkit/sync.py).
_RING_MAGIC = 0x31474E52            # "RNG1"
_RING = struct.Struct("=IIQQQII24xQQ")  # 0: magic .. closed, 64: tail, reserved
_RING_CONSUMERS = struct.Struct("=QQQQ")                       # 128: head, read, received, dropped
_TABLE = struct.Struct("=QQQQQ")    # 64: lock|state, count, tombstones, used, pending
_TABLE_STATS = struct.Struct("=QQQQQQ")  # 128: growths, index_growths, recycles, recoveries, vacuums, batches
_HEAP_MAGIC = 0x31504145484D4853    # "SHMHEAP1"
_HEAP_USED = struct.Struct("=QQQQ")  # 80: used_units, used_blocks, free_units, free_blocks
_HEAP_STATS = struct.Struct("=QQQQQQQQ")  # 192: allocs, frees, moves, moved_bytes, compactions, recoveries, reclaimed_pins, reallocs
_HEAP_UNIT = 16

#: Counters that only grow: ``top`` shows them per second.
_CUMULATIVE = frozenset({
    "sent", "received", "dropped", "recycles", "growths", "batches", "allocs", "frees",
    "moves", "moved_bytes", "compactions", "reallocs", "changes", "notifies", "published",
    "served", "discarded", "failed", "malformed", "forwarded"})
#: Levels whose change per second ``top`` shows as well (a store keeps no
#: operation counters: its keys and bytes moving are the activity).
_LEVELS = frozenset({"keys", "used_bytes"})


def counters(summary: dict[str, Any]) -> dict[str, int]:
    """The live counters an object keeps in shared memory, read without attaching.

    ``summary`` is a :func:`scan` result.  The file is opened read-only and
    read with ``os.pread``: nothing is mapped, locked or written, so looking
    changes nothing.  What comes back depends on the kind:

    - channel, queue: ``sent``, ``received``, ``dropped`` (messages, since
      creation), ``depth`` (waiting now), ``bytes_used``, ``capacity``,
      ``closed``;
    - store: ``keys``, ``used_bytes``, ``pending_bytes`` (freed since the
      last recycle), ``tombstones``, ``recycles``, ``growths``, ``batches``
      (the store counts no gets or puts);
    - heap: ``allocs``, ``frees``, ``reallocs``, ``moves``, ``moved_bytes``,
      ``compactions``, ``blocks``, ``used_bytes``;
    - semaphore: ``value``, ``changes`` (acquires and releases), ``waiting``;
      condition: ``notifies``, ``waiting``; event: ``set``, ``waiting``;
      mutex: ``held``, ``waiters`` (a mutex counts no acquisitions);
    - service: ``served``, ``discarded``, ``failed``, ``malformed`` (since
      creation), ``workers`` (live now), ``busy`` (handling a request now),
      ``pending`` (requests waiting: the depth of its ``.requests`` channel);
    - topic: ``published``, ``bytes_used``, ``capacity``, and of its live
      subscribers: ``subscribers``, ``max_lag`` (messages the furthest
      behind has yet to read), ``missed`` (lost to overwriting, in all).

    Returns ``{}`` for other kinds, for objects that are not healthy, and
    when what the file holds is not what the kind writes (numbers read from
    shared memory are never trusted).

    >>> counters(scan("logs"))                        # doctest: +SKIP
    {'sent': 120345, 'received': 120301, 'dropped': 0, 'depth': 44, ...}
    """
    kind = summary.get("kind")
    if kind == "struct" and _is_bridge(summary):
        kind = "bridge"
    if summary.get("state") not in ("ok", "stale") or kind not in _COUNTER_READERS:
        return {}
    try:
        fd = os.open(summary["path"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        raw = os.pread(fd, 32, 0)
        if raw[:8] != MAGIC or len(raw) < 32:
            return {}
        hsize = struct.unpack_from("=Q", raw, 24)[0]
        if not _HEADER_BYTES <= hsize < 1 << 40:
            return {}
        out = _COUNTER_READERS[kind](fd, hsize)
    except (OSError, struct.error):
        return {}
    finally:
        os.close(fd)
    if kind == "service" and out:  # its calls waiting: the depth of its request channel
        path = summary["path"] + ".requests"
        try:
            requests = counters(scan(path)) if os.path.exists(path) else {}
        except ShmkitError:
            requests = {}
        out["pending"] = requests.get("depth", 0)
    return out


def _read(fd: int, layout: struct.Struct, off: int) -> tuple[int, ...] | None:
    data = os.pread(fd, layout.size, off)
    return layout.unpack(data) if len(data) == layout.size else None


def _ring_counters(fd: int, base: int) -> dict[str, int]:
    head = _read(fd, _RING, base)
    tail = _read(fd, _RING_CONSUMERS, base + 128)
    if head is None or tail is None or head[0] != _RING_MAGIC:
        return {}
    _magic, _fmt, cap, _data_off, _max_items, _slots, closed, tail_pos, reserved = head
    head_pos, _read_pos, received, dropped = tail
    depth = reserved - received - dropped
    return {"sent": max(reserved - dropped, 0), "received": received, "dropped": dropped,
            "depth": depth if 0 <= depth <= reserved else 0,
            "bytes_used": min(max(tail_pos - head_pos, 0), cap), "capacity": cap,
            "closed": int(bool(closed))}


_TOPIC = struct.Struct("=IIQQQ32xQQ")  # 0: magic .. history, 64: tail, seq (_core/topic.h)
_TOPIC_HEAD = struct.Struct("=Q")      # 192: head
_TOPIC_MAGIC = 0x31435054


_TOPIC_SUB = struct.Struct("=IIQQQQQQQ")  # owner, pad, pos, hold, seq, received, missed, ...


def _topic_counters(fd: int, base: int) -> dict[str, int]:
    h = _read(fd, _TOPIC, base)
    head = _read(fd, _TOPIC_HEAD, base + 192)
    table = _read(fd, struct.Struct("=I8xI"), base + 32)  # max_subs, subs_off
    if h is None or head is None or table is None or h[0] != _TOPIC_MAGIC:
        return {}
    _magic, _fmt, cap, _data_off, _history, tail_pos, seq = h
    out = {"published": seq, "bytes_used": min(max(tail_pos - head[0], 0), cap),
           "capacity": cap, "subscribers": 0, "max_lag": 0, "missed": 0}
    max_subs, subs_off = table
    raw = os.pread(fd, _TOPIC_SUB.size * min(max_subs, _core.MAX_SLOTS), base + subs_off)
    for entry in struct.iter_unpack(_TOPIC_SUB.format, raw[:len(raw) // 64 * 64]):
        owner, _pad, _pos, _hold, expected, _received, missed = entry[:7]
        if not owner or not _token_alive(fd, owner):
            continue
        out["subscribers"] += 1
        if expected <= seq:  # numbers from shared memory: a bad one counts no lag
            out["max_lag"] = max(out["max_lag"], seq - expected)
        out["missed"] += missed
    return out


def _token_alive(fd: int, token: int) -> bool:
    """Whether attachment ``token`` (slot in the low 10 bits, generation
    above) is the live holder of its slot in the file's attach table."""
    entry = _core.attach_file_entry(fd, token & 0x3FF)
    return entry is not None and entry["gen"] == token >> 10 and bool(entry["alive"])


def _store_counters(fd: int, base: int) -> dict[str, int]:
    level = _read(fd, _TABLE, base + 64)
    stats = _read(fd, _TABLE_STATS, base + 128)
    if level is None or stats is None:
        return {}
    _lock, keys, tombstones, used, pending = level
    growths, _index_growths, recycles, _recoveries, _vacuums, batches = stats
    return {"keys": keys, "used_bytes": used, "pending_bytes": pending,
            "tombstones": tombstones, "recycles": recycles, "growths": growths,
            "batches": batches}


def _heap_counters(fd: int, base: int) -> dict[str, int]:
    ident = _read(fd, struct.Struct("=IIQ"), base)
    used = _read(fd, _HEAP_USED, base + 80)
    stats = _read(fd, _HEAP_STATS, base + 192)
    if ident is None or used is None or stats is None or ident[2] != _HEAP_MAGIC:
        return {}
    used_units, used_blocks, _free_units, _free_blocks = used
    allocs, frees, moves, moved, compactions, _rec, _reclaimed, reallocs = stats
    return {"allocs": allocs, "frees": frees, "reallocs": reallocs, "moves": moves,
            "moved_bytes": moved, "compactions": compactions, "blocks": used_blocks,
            "used_bytes": used_units * _HEAP_UNIT}


def _sync_words(fd: int, base: int) -> tuple[int, int, int, int] | None:
    w = _read(fd, struct.Struct("=4I"), base)
    return None if w is None else (w[0], w[1], w[2], w[3])


def _mutex_counters(fd: int, base: int) -> dict[str, int]:
    w = _sync_words(fd, base)
    if w is None:
        return {}
    return {"held": int(bool(w[0] & _TOKEN_MASK)), "waiters": int(bool(w[0] & _WAITERS_BIT))}


def _event_counters(fd: int, base: int) -> dict[str, int]:
    w = _sync_words(fd, base)
    return {} if w is None else {"set": w[0] & 1, "waiting": w[0] >> 1}


def _semaphore_counters(fd: int, base: int) -> dict[str, int]:
    w = _sync_words(fd, base)
    if w is None:
        return {}
    value = w[1] - (1 << 32) if w[1] >= 1 << 31 else w[1]
    return {"value": value, "changes": w[2], "waiting": w[3]}


def _condition_counters(fd: int, base: int) -> dict[str, int]:
    w = _sync_words(fd, base)
    return {} if w is None else {"notifies": w[1], "waiting": w[2]}


_SERVICE = struct.Struct("=IIQQQQ")  # 0: magic, format, served, discarded, failed, malformed
_SEGMENT_HWM = _core.layouts["segment"]["hwm"]


def _service_counters(fd: int, base: int) -> dict[str, int]:
    from .service import _ENTRY, _ENTRY_LAYOUT, _MAGIC, _OFF_TABLE, FORMAT  # (its layout)

    h = _read(fd, _SERVICE, base)
    hwm = _read(fd, struct.Struct("=I"), _SEGMENT_HWM)
    if h is None or hwm is None or h[0] != _MAGIC or h[1] != FORMAT:
        return {}
    _magic, _fmt, served, discarded, failed, malformed = h
    table = os.pread(fd, _ENTRY * min(hwm[0], _core.MAX_SLOTS), base + _OFF_TABLE)
    workers = busy = 0
    for token, rid, _reply in _ENTRY_LAYOUT.iter_unpack(table[:len(table) // _ENTRY * _ENTRY]):
        token &= 0xFFFFFFFF
        if token and _token_alive(fd, token):
            workers += 1
            busy += rid != 0
    return {"served": served, "discarded": discarded, "failed": failed,
            "malformed": malformed, "workers": workers, "busy": busy}


def _is_bridge(summary: dict[str, Any]) -> bool:
    """A ``shmkit bridge``'s status record (see shmkit/redis/bridge.py)."""
    from .redis.bridge import STATUS_FIELDS, STATUS_SUFFIXES
    dtype = (summary.get("layout") or {}).get("dtype")
    n = len(STATUS_FIELDS)
    return (str(summary.get("name", "")).endswith(STATUS_SUFFIXES) and isinstance(dtype, dict)
            and dtype.get("names") == list(STATUS_FIELDS)
            and dtype.get("formats") == ["<u8"] * n
            and dtype.get("offsets") == [8 * i for i in range(n)])


def _bridge_counters(fd: int, base: int) -> dict[str, int]:
    from .redis.bridge import STATUS_FIELDS, STATUS_LAYOUT
    got = _read(fd, STATUS_LAYOUT, base)
    if got is None:
        return {}
    out = dict(zip(STATUS_FIELDS, got))
    out["alive"] = int(out["pid"] > 0 and not _pid_gone(out["pid"]))
    return out


_COUNTER_READERS = {
    "bridge": _bridge_counters,
    "channel": _ring_counters, "queue": _ring_counters, "store": _store_counters,
    "heap": _heap_counters, "mutex": _mutex_counters, "event": _event_counters,
    "semaphore": _semaphore_counters, "condition": _condition_counters,
    "topic": _topic_counters, "service": _service_counters,
}


def sample(patterns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """:func:`list_objects`, each with its live ``counters`` and the ``sampled`` time.

    Two samples taken a moment apart give the rates ``shmkit top`` shows
    (:func:`rates`).  ``sampled`` is ``time.monotonic()`` just after the
    object's counters were read.
    """
    out = []
    for obj in list_objects(patterns):
        obj["counters"] = counters(obj)
        obj["sampled"] = time.monotonic()
        out.append(obj)
    return out


def rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Per-second change of each counter between two :func:`sample` entries of one object.

    Only counters that only grow (messages sent, allocations...) and a
    store's levels (keys, used bytes) are given; an object that was removed
    and made again in between (another creation time) gives ``{}``, as does
    a counter that went backwards.  For a store, ``freed_bytes`` (records
    replaced or deleted) comes from its pending bytes; when a recycle came in
    between it is a lower bound.

    >>> a = sample(["logs"]); time.sleep(1); b = sample(["logs"])   # doctest: +SKIP
    >>> rates(a[0], b[0])                                             # doctest: +SKIP
    {'sent': 40211.0, 'received': 40198.5, 'dropped': 0.0}
    """
    if before.get("created") != after.get("created") or before.get("path") != after.get(
            "path"):
        return {}
    seconds = after.get("sampled", 0.0) - before.get("sampled", 0.0)
    was, now = before.get("counters") or {}, after.get("counters") or {}
    if seconds <= 0 or not was or not now:
        return {}
    out: dict[str, float] = {}
    for key, value in now.items():
        if key not in was:
            continue
        delta = value - was[key]
        if key in _CUMULATIVE:
            if delta < 0:
                return {}  # counters went back: not the same object's history
            out[key] = delta / seconds
        elif key in _LEVELS:
            out[key] = delta / seconds
    if after.get("kind") == "store" and "pending_bytes" in now and "pending_bytes" in was:
        # Bytes of records replaced or deleted: pending grows by them and a
        # recycle sets it back to 0, so across a recycle this is a lower bound.
        freed = now["pending_bytes"]
        if now.get("recycles") == was.get("recycles"):
            freed -= was["pending_bytes"]
        out["freed_bytes"] = max(freed, 0) / seconds
    return out


def activity(summary: dict[str, Any], per_second: dict[str, float] | None = None) -> str:
    """A few words on what an object is doing now, for ``shmkit top``.

    ``"held by 4242"``, ``"held by 4242 (dead)"``, ``"set, 2 waiting"``,
    ``"1.2k sent/s, 1.2k received/s, depth 3"``, ``"80 allocs/s, 79 frees/s,
    2 moves/s"``, ``"1,024 keys +50/s, used 64.0 KiB +3.1 KiB/s"``,
    ``"float64 (1024, 3)"``...  ``summary`` is a :func:`scan` or
    :func:`sample` result (its ``counters`` are read if missing);
    ``per_second`` comes from :func:`rates`.  Reads with ``os.pread`` (no
    attaching); returns ``""`` when there is nothing to say.
    """
    if summary.get("state") not in ("ok", "stale"):
        return ""
    kind, layout = summary.get("kind"), summary.get("layout") or {}
    if kind == "array":
        shape = layout.get("shape", [])
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            return "unreadable shape"  # (the layout is another's: any JSON)
        return f"{_dtype_text(layout.get('dtype'))} {tuple(shape)}"
    c = summary.get("counters")
    if kind == "struct" and _is_bridge(summary):
        return _bridge_text(summary, counters(summary) if c is None else c, per_second or {})
    if kind == "struct":
        return _dtype_text(layout.get("dtype"))
    if c is None:
        c = counters(summary)
    r = per_second or {}
    if kind in ("channel", "queue"):
        return _ring_text(c, r)
    if kind == "store":
        return _store_text(c, r)
    if kind == "heap":
        return _heap_text(c, r)
    if kind == "topic":
        return _topic_text(c, r)
    if kind == "service":
        return _service_text(c, r)
    if kind not in ("mutex", "rwlock", "event", "semaphore", "condition"):
        return ""
    text = _sync_text(summary, kind)
    if kind == "semaphore" and c:
        text = _join(text, _rate(r, "changes", "changes"))
    if kind == "condition" and c:
        text = _join(text, _rate(r, "notifies", "notifies"),
                     f"{c['waiting']} waiting" if c.get("waiting") else "")
    return text


def _number(x: float) -> str:
    """1234 -> "1,234"; 12345.6 -> "12.3k"; 0.25 -> "0.25"."""
    if x >= 10_000_000:
        return f"{x / 1e6:.1f}M"
    if x >= 10_000:
        return f"{x / 1e3:.1f}k"
    if x >= 10 or x == int(x):
        return f"{x:,.0f}"
    return f"{x:.2g}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _rate(r: dict[str, float], key: str, label: str, size: bool = False) -> str:
    if key not in r:
        return ""
    v = r[key]
    return f"{_size(v) if size else _number(v)} {label}/s"


def _signed(r: dict[str, float], key: str, size: bool = False) -> str:
    if not r.get(key):
        return ""
    v = r[key]
    text = _size(abs(v)) if size else _number(abs(v))
    return f"{'+' if v > 0 else '-'}{text}/s"


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _ring_text(c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    return _join(_rate(r, "sent", "sent"), _rate(r, "received", "received"),
                 _rate(r, "dropped", "dropped") if r.get("dropped") else "",
                 f"depth {c['depth']:,}", "closed" if c.get("closed") else "")


def _topic_text(c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    subs = c.get("subscribers", 0)
    return _join(_rate(r, "published", "published"),
                 f"{c['published']:,} published" if "published" not in r else "",
                 f"{subs} subscriber{'' if subs == 1 else 's'}",
                 f"lag up to {c['max_lag']:,}" if c.get("max_lag") else "",
                 f"{c['missed']:,} missed" if c.get("missed") else "",
                 f"{_size(c['bytes_used'])} of {_size(c['capacity'])} in the ring")


def _bridge_text(summary: dict[str, Any], c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    way = "to Redis" if str(summary.get("name", "")).endswith(".bridge-to") else "from Redis"
    if not c.get("alive"):
        return f"bridge {way}, pid {c['pid']} gone: {c['forwarded']:,} forwarded"
    return _join(f"bridge {way} (pid {c['pid']})", _rate(r, "forwarded", "forwarded"),
                 f"{c['forwarded']:,} forwarded" if "forwarded" not in r else "",
                 f"lag {c['lag']:,}", f"{c['missed']:,} missed" if c.get("missed") else "")


def _service_text(c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    workers = f"{c['workers']} worker{'' if c['workers'] == 1 else 's'}"
    return _join(workers + (f" ({c['busy']} busy)" if c["busy"] else ""),
                 f"{c['pending']:,} pending" if c.get("pending") else "",
                 _rate(r, "served", "served"),
                 _rate(r, "failed", "failed") if r.get("failed") else "",
                 _rate(r, "discarded", "discarded") if r.get("discarded") else "")


def _store_text(c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    keys = " ".join(p for p in (f"{c['keys']:,} keys", _signed(r, "keys")) if p)
    used = " ".join(p for p in (f"used {_size(c['used_bytes'])}",
                                _signed(r, "used_bytes", size=True)) if p)
    freed = _rate(r, "freed_bytes", "freed", size=True) if r.get("freed_bytes") else ""
    recycles = _rate(r, "recycles", "recycles") if r.get("recycles") else ""
    return _join(keys, used, freed, recycles)


def _heap_text(c: dict[str, int], r: dict[str, float]) -> str:
    if not c:
        return ""
    return _join(_rate(r, "allocs", "allocs"), _rate(r, "frees", "frees"),
                 _rate(r, "moves", "moves") if r.get("moves") else "",
                 _rate(r, "reallocs", "reallocs") if r.get("reallocs") else "",
                 f"{c['blocks']:,} blocks, {_size(c['used_bytes'])}")


def _sync_text(summary: dict[str, Any], kind: str) -> str:
    """Lock holder, event and semaphore state from the payload's first words."""
    try:
        fd = os.open(summary["path"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        raw = os.pread(fd, _HEADER_BYTES, 0)
        if raw[:8] != MAGIC or len(raw) < _HEADER_BYTES:
            return ""
        hsize = struct.unpack_from("=Q", raw, 24)[0]
        words = os.pread(fd, 16, hsize) if hsize < 1 << 40 else b""
        if len(words) < 16:
            return ""
        w0, w1, _w2, w3 = struct.unpack("=4I", words)
        if kind == "event":
            state = "set" if w0 & 1 else "clear"
            return f"{state}, {w0 >> 1} waiting" if w0 >> 1 else state
        if kind == "semaphore":
            value = w1 - (1 << 32) if w1 >= 1 << 31 else w1
            return f"value {value}" + (f", {w3} waiting" if w3 else "")
        text = _holder_text(fd, w0)
        if kind == "rwlock":  # word 0 is the writers' mutex
            return "no writer" if text == "free" else "write-" + text
        return text
    finally:
        os.close(fd)


def _holder_text(fd: int, word: int) -> str:
    token = word & _TOKEN_MASK
    if not token:
        return "free"
    entry = _core.attach_file_entry(fd, token & 0x3FF)
    if entry is None:
        return "held"
    same = entry["gen"] == token >> 10
    alive = same and entry["alive"]
    who = f"held by {entry['pid']}" if same else "held"
    return who + ("" if alive else " (dead)") + (", waiters" if word & _WAITERS_BIT else "")


def _dtype_text(layout: Any) -> str:
    if isinstance(layout, str):
        try:
            np = numpy()
            return str(np.dtype(layout))
        except (TypeError, ValueError, SyntaxError):  # (numpy's own parse of comma strings)
            return layout
    if isinstance(layout, dict):
        names = layout.get("names", [])
        return f"record of {len(names)} fields" if isinstance(names, list) else "record"
    return ""


# -- removing ---------------------------------------------------------------


def remove(target: str) -> dict[str, Any]:
    """Remove one object's name (processes attached keep their mapping), and
    a Queue's payload files.

    Returns the :func:`scan` facts taken just before removal, so a caller can
    warn about processes still attached.  A file path must hold a shmkit
    segment (the magic); names in /dev/shm are always shmkit's own.

    Raises :class:`NotFoundError` if missing, :class:`CorruptError` for a
    path that is not a shmkit segment.
    """
    name, path = resolve(target)
    facts = scan(target)
    if "/" in target and not _has_magic(path):
        raise CorruptError(f"{path} is not a shmkit segment ({facts['state']}); "
                           "remove it with rm(1) if you are sure")
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise NotFoundError(f"{target!r} was removed meanwhile ({path})") from None
    # a Queue's payload files (its big objects) go with it, as with shmkit.unlink();
    # only a queue has them (or a file whose header could not say), and looking
    # lists the whole of /dev/shm: once per object removed would be quadratic
    if facts["kind"] in (None, "queue"):
        load("shmkit.channel")._remove_payloads(path)
    return facts


_GLOB = frozenset("*?[")


def select(targets: Sequence[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The objects that names, paths and shell patterns pick, as ``shmkit rm`` does.

    A target with ``*``, ``?`` or ``[`` is a pattern matched against every
    name (as in :func:`list_objects`); one with a ``/`` is a file path; any
    other is one name.  Returns ``(objects, problems)``: the :func:`scan`
    facts of each object picked (once, in the order given), and one
    ``(target, message)`` per target that picked nothing or is not a name a
    segment can have.

    >>> select(["cache.*", "jobs", "nope"])       # doctest: +SKIP
    ([{'name': 'cache.a', ...}, {'name': 'jobs', ...}], [('nope', "no segment named ...")])
    """
    picked: dict[str, dict[str, Any]] = {}
    problems: list[tuple[str, str]] = []
    for target in targets:
        if "/" not in target and _GLOB & set(target):
            found = list_objects([target])
            if not found:
                problems.append((target, f"no object matches {target!r}; see `shmkit ls`"))
            for obj in found:
                picked.setdefault(obj["path"], obj)
            continue
        try:
            obj = scan(target)
        except (NotFoundError, InvalidNameError) as e:
            problems.append((target, str(e)))
            continue
        picked.setdefault(obj["path"], obj)
    return list(picked.values()), problems


def _has_magic(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.pread(fd, 8, 0) == MAGIC
    finally:
        os.close(fd)


def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _reap_stale(path: str, dry_run: bool) -> bool:
    """Remove an attached-lifetime segment nobody is attached to.

    The same protocol as ``Segment.close()``: an exclusive OFD lock over the
    readonly byte and every slot byte proves nobody is attached and keeps
    anyone from attaching while we unlink; an opener that raced with us sees
    the link count drop to 0 and starts over.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        raw = os.pread(fd, _HEADER_BYTES, 0)
        if raw[:8] != MAGIC or len(raw) < _HEADER_BYTES:
            return False
        h = _Header(raw, repr(path), st.st_size)
        if not h.flags & _FLAG_ATTACHED:
            return False  # persistent: never ours to remove
        if not _core.ofd_lock(fd, *_ATTACH_SPAN):
            return False  # someone is attached (or attaching) now
        if not _same_file(path, fd):
            return False
        if not dry_run:
            os.unlink(path)
        return True
    finally:
        os.close(fd)  # drops our locks


def _reap_half_created(path: str, dry_run: bool) -> bool:
    """Remove a segment whose creator died before publishing it.

    Holding the init lock proves no creator is at work; the magic is checked
    again under it (a creator writes the magic before dropping the lock).
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if not _core.ofd_lock(fd, _INIT_BYTE, 1):
            return False
        # Whatever the header says, never remove what a live process holds;
        # holding every attach byte also keeps anyone from attaching meanwhile.
        if not _core.ofd_lock(fd, *_ATTACH_SPAN):
            return False
        if os.pread(fd, 8, 0) == MAGIC or not _same_file(path, fd):
            return False
        if not dry_run:
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _temp_file(entry: str) -> tuple[str, int | None] | None:
    """``(name, creator pid)`` of a hidden creation temp file's directory
    entry (``.shmkit.<name>.<pid>.<random>.tmp``), or None for any other."""
    if not (entry.startswith(_TMP_PREFIX) and entry.endswith(_TMP_SUFFIX)):
        return None
    parts = entry.split(".")  # "", "shmkit", name..., pid, random, "tmp"
    pid = int(parts[-3]) if len(parts) >= 6 and parts[-3].isdigit() else None
    name = ".".join(parts[2:-3]) if len(parts) >= 6 else entry
    return name, pid


def _temp_files() -> Iterator[tuple[str, str, int | None]]:
    """``(name, path, creator pid)`` of hidden creation temp files in /dev/shm."""
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return
    for entry in entries:
        temp = _temp_file(entry)
        if temp is not None:
            yield temp[0], os.path.join(SHM_DIR, entry), temp[1]


def _pid_gone(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _reap_temp(path: str, pid: int | None, dry_run: bool) -> bool:
    """Remove a creation temp file left by a creator that died.

    A creator locks byte 0 right after creating the file; to be sure we do
    not catch one between those two calls, the file must also belong to a
    process that is gone, or be older than a minute.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if not (_pid_gone(pid) or time.time() - st.st_mtime > _TMP_GRACE):
            return False
        if not _core.ofd_lock(fd, _INIT_BYTE, 1) or not _same_file(path, fd):
            return False
        if not dry_run:
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _yours(uid: int | None) -> bool:
    """Objects gc may clean: your own (root: everyone's)."""
    euid = os.geteuid()
    return euid == 0 or uid == euid


def _reap_orphan(path: str, dry_run: bool) -> bool:
    """Remove a published persistent object nobody is attached to.

    The exclusive lock over every attach byte proves nobody is attached and
    keeps anyone from attaching while we unlink.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, 8, 0) != MAGIC:
            return False
        if not _core.ofd_lock(fd, *_ATTACH_SPAN) or not _same_file(path, fd):
            return False
        if not dry_run:
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def find_orphans(patterns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Persistent objects that no live process is attached to and whose creator
    is dead: perhaps forgotten, perhaps kept on purpose (a persistent object
    is meant to outlive its creator), so only ``collect_garbage(orphans=True)``
    (``shmkit gc --orphans``) removes them.

    Returns ``[{"name", "path", "kind", "size", "file_bytes", "age",
    "creator_pid"}]`` (``age`` in seconds since creation) for your own
    objects (root: everyone's).
    """
    out = []
    now = time.time()
    for obj in list_objects(patterns):
        if (obj["state"] != "ok" or obj["lifetime"] != "persistent" or obj["attached"]
                or obj["readonly_attached"] or not _yours(obj["uid"])
                or not _pid_gone(obj["creator_pid"])):
            continue
        out.append({"name": obj["name"], "path": obj["path"], "kind": obj["kind"],
                    "size": obj["size"], "file_bytes": obj["file_bytes"],
                    "age": max(0.0, now - (obj["created"] or now)),
                    "creator_pid": obj["creator_pid"]})
    return out


def collect_garbage(dry_run: bool = False, patterns: Sequence[str] | None = None,
                    orphans: bool = False) -> list[dict[str, Any]]:
    """Remove what crashed processes left behind in /dev/shm.

    - segments with ``lifetime="attached"`` whose attached processes are all
      gone (the last one died instead of closing);
    - half-created segments (their creator died before finishing);
    - hidden creation temp files (``.shmkit.*.tmp``) of dead creators;
    - Queue payload files (``shmkit.<queue>~oob.*``) no sender holds whose
      queue is gone, or that no queued message names (see
      :func:`shmkit.channel.orphan_payloads`);
    - with ``orphans=True`` only, the persistent objects :func:`find_orphans`
      lists (nobody attached, creator dead).

    ``patterns`` (shell wildcards) limits it to the objects (and the temp
    files of the objects) whose names match.  Only your own objects are
    considered (root: everyone's).  Never removes a persistent segment, a
    corrupt one (``shmkit rm`` it if you know it is garbage) or anything a
    live process holds: before any removal, gc takes an exclusive lock over
    every attach byte of the file, which fails while any process is attached
    (the kernel's own record, whatever the header says) and keeps anyone from
    attaching until the name is gone.  Returns one ``{"name", "path", "reason",
    "removed"}`` per object removed (or, with ``dry_run=True``, that would
    be; ``removed`` is then False); one that could not be removed has
    ``"error"`` set.

    >>> collect_garbage(dry_run=True)     # doctest: +SKIP
    [{'name': 'jobs', 'path': '/dev/shm/shmkit.jobs', 'reason': ..., 'removed': False}]
    """
    out: list[dict[str, Any]] = []

    def attempt(name: str, path: str, reason: str, reap: Any, *args: Any) -> None:
        try:
            if reap(path, *args, dry_run):
                out.append({"name": name, "path": path, "reason": reason,
                            "removed": not dry_run})
        except FileNotFoundError:
            pass  # gone meanwhile
        except (OSError, ShmkitError) as e:
            out.append({"name": name, "path": path, "reason": reason, "removed": False,
                        "error": getattr(e, "strerror", None) or str(e)})

    for obj in list_objects(patterns):
        if not _yours(obj["uid"]):
            continue
        if obj["state"] == "stale":
            attempt(obj["name"], obj["path"],
                    "lifetime 'attached' and every attached process is gone",
                    _reap_stale)
        elif obj["state"] == "half-created":
            attempt(obj["name"], obj["path"], "half-created: its creator died",
                    _reap_half_created)
    if orphans:
        for obj in find_orphans(patterns):
            attempt(obj["name"], obj["path"],
                    f"orphan: persistent, nobody attached, its creator (pid "
                    f"{obj['creator_pid']}) is gone", _reap_orphan)
    from .channel import orphan_payloads  # Queue payload files (docs/channel.md)

    out.extend(orphan_payloads(dry_run, lambda q: _matches(q, patterns)))
    for name, path, pid in _temp_files():
        try:
            uid = os.lstat(path).st_uid
        except FileNotFoundError:
            continue
        if _matches(name, patterns) and _yours(uid):
            attempt(os.path.basename(path), path, f"creation temp file of '{name}' left "
                    "by a process that died", _reap_temp, pid)
    return out
