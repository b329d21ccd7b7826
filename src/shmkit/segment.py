"""Named shared-memory segments: the layer every shmkit object stands on.

A segment is a file in /dev/shm (or at a path of your choosing, to outlive a
reboot) with a self-describing header, mapped at a reserved address range so
it can grow without remapping.  Two programs started separately meet by name::

    import shmkit
    seg = shmkit.Segment("frames", size=1 << 20)   # create or open
    seg.write(b"hello", offset=0)
    assert seg.read(5, offset=0) == b"hello"
    with seg.lock:                                 # the segment's robust mutex
        ...
    seg.close()

File layout (native byte order, all offsets in bytes)::

    0     header (4096 bytes)
            0  magic      8  b"\\x89SHMKIT\\x00", written last when created
            8  version    u32  FORMAT_VERSION
           12  kind       u32  Kind
           16  flags      u32  bit 0: removed when the last attachment closes
           20  max_slots  u32  attach-table slots
           24  hdr_size   u64  offset of the payload
           32  size       u64  payload bytes in use (changes with resize)
           40  max_size   u64  payload bytes reserved in every mapping
           48  created    u64  wall-clock ns
           56  creator    u32  pid of the creating process
           60  lock       u32  the segment's robust mutex
           64  resizes    u32  how many times the payload was resized
           68  hwm        u32  highest attach slot ever used + 1
           72  layout_len u32  bytes of layout JSON at offset 1024
         1024  layout     JSON describing the payload (kind specific)
    4096  attach table: max_slots entries of 64 bytes
            0 gen u32, 4 pid u32, 8 attached ns u64, 24 comm 16 bytes
    hdr_size  payload

Liveness is kernel-backed: an attachment holds an OFD lock on byte
4096+slot of the file (see docs/architecture.md).
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import pwd
import re
import stat
import struct
import sys
import time
import weakref
from enum import IntEnum
from typing import Any, Callable, Iterator, TypeVar

from ._lazy import numpy
from . import _core
from .errors import (
    _timed_out,
    BusyError,
    ClosedError,
    CorruptError,
    DescriptorLimitError,
    ExistsError,
    FormatVersionError,
    InvalidNameError,
    MismatchError,
    NotFoundError,
    OutOfSpaceError,
    ReadOnlyError,
    SizeLimitError,
    UntrustedError,
    WrongKindError,
)

__all__ = ["Segment", "Kind", "SegmentInfo", "segment_path", "list_segments", "unlink"]


MAGIC = b"\x89SHMKIT\x00"
FORMAT_VERSION = _core.layouts["segment"]["format_version"]
SHM_DIR = "/dev/shm"
PREFIX = "shmkit."
PAGE = os.sysconf("SC_PAGE_SIZE")

_HEADER = struct.Struct("=8sIIIIQQQQIIIII")  # magic .. layout_len, 76 bytes
_HDR = _core.layouts["segment"]  # offsets declared once, in _core/layout.h
_HEADER_BYTES = _HDR["attach_table"]
_OFF_SIZE = _HDR["size"]
_OFF_LOCK = _HDR["lock"]
_OFF_RESIZES = _HDR["resizes"]
_OFF_HWM = _HDR["hwm"]
_LAYOUT_OFF = _HDR["layout"]
_LAYOUT_MAX = _HEADER_BYTES - _LAYOUT_OFF
_SLOT = _core.SLOT_SIZE
_SLOT_LOCK_BASE = _core.SLOT_LOCK_BASE
_READER_BYTE = 1  # shared lock held by readonly attachments
# (start, length) of every byte an attachment can lock: the read-only byte and
# all possible slots.  Locked whole, it proves that nobody is attached, whatever
# a (perhaps damaged) header says of max_slots.
_ATTACH_SPAN = (_READER_BYTE, _SLOT_LOCK_BASE + _core.MAX_SLOTS - _READER_BYTE)
_FLAG_ATTACHED = 1

DEFAULT_MAX_ATTACH = 256
# Address space reserved by the kinds that grow (raw segments, stores) when no
# max_size= is given; nothing is allocated.  Fixed-size kinds reserve exactly
# their size, so tens of thousands of them fit in one process's 128 TiB.
DEFAULT_RESERVE = 4 << 30
_MAX_RESERVE = _core.MAX_RESERVE  # the largest max_size a header may claim (64 TiB)
_OPEN_WAIT = 10.0  # seconds to wait for a creator to finish initialising

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+-]{1,200}")


class Kind(IntEnum):
    """What a segment holds; stored in its header."""

    RAW = 1
    MUTEX = 2
    RWLOCK = 3
    EVENT = 4
    SEMAPHORE = 5
    CONDITION = 6
    STRUCT = 7
    ARRAY = 8
    CHANNEL = 9
    QUEUE = 10
    STORE = 11
    HEAP = 12
    TOPIC = 13
    SERVICE = 14


def check_max_attach(max_attach: int) -> int:
    """A given ``max_attach``: an int of 1.._core.MAX_SLOTS (every object's
    attachment table is sized from it before its segment is made)."""
    if not isinstance(max_attach, int) or isinstance(max_attach, bool):
        raise TypeError(f"max_attach must be an int (how many handles may be attached at "
                        f"once), not {type(max_attach).__name__}")
    if not 1 <= max_attach <= _core.MAX_SLOTS:
        raise ValueError(f"max_attach must be 1..{_core.MAX_SLOTS}, not {max_attach}")
    return max_attach


def _check_numbers(size: int | None = None, max_size: int | None = None,
                   mode: int | None = None, max_attach: int | None = None) -> None:
    """Refuse a given size, max_size, mode or max_attach that no segment can
    have (None: not given), when creating and when comparing on open."""
    for what, n in (("size", size), ("max_size", max_size)):
        if n is None:
            continue
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{what} must be a non-negative int, not {n!r}")
        if n > _MAX_RESERVE:
            raise SizeLimitError(f"{what}={n} is beyond the {_MAX_RESERVE} bytes (64 TiB) "
                                 "of address space a segment can map; ask for less")
    if max_size is not None and size is not None and max_size < size:
        raise ValueError(f"max_size={max_size} is below size={size}: max_size is the most "
                         "the size may grow to; give at least the size, or leave max_size "
                         "out")
    if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool)
                             or not 0 <= mode <= 0o777):
        # set-user-ID, set-group-ID and sticky bits mean nothing here, and an
        # unprivileged creator would silently lose the first two
        raise ValueError(f"mode must be permission bits 0..0o777, like 0o600, not {mode!r}")
    if max_attach is not None:
        check_max_attach(max_attach)


def _is_valid_name(name: str) -> bool:
    """Whether ``name`` can name a segment (``.`` and ``..`` name no file)."""
    return name not in (".", "..") and _NAME_RE.fullmatch(name) is not None


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"a segment name must be a str, not {type(name).__name__}")
    if not _is_valid_name(name):
        raise InvalidNameError(
            f"invalid segment name {name!r}: use 1 to 200 characters from "
            "A-Z a-z 0-9 and _ . : @ + - (no '/', no '..'), or pass path= for a file"
        )
    return name


_PATHS: dict[str, str] = {}  # names already validated, and their files


def segment_path(name: str) -> str:
    """The file that backs the segment called ``name``.

    >>> segment_path("frames")
    '/dev/shm/shmkit.frames'
    """
    path = _PATHS.get(name) if type(name) is str else None
    if path is None:
        path = os.path.join(SHM_DIR, PREFIX + _validate_name(name))
        if len(_PATHS) >= 4096:
            _PATHS.clear()
        _PATHS[name] = path
    return path


def _resolve(name: str | None, path: str | os.PathLike[str] | None) -> tuple[str, str]:
    if path is not None:
        p = os.path.abspath(os.fspath(path))
        if os.path.basename(p) in ("", ".", ".."):
            raise InvalidNameError(f"path {p!r} does not name a file")
        return (name or p), p
    if name is None:
        name = "anon-" + os.urandom(8).hex()
    return name, segment_path(name)


# Creators make the file without a name (O_TMPFILE) wherever the file system
# allows; False takes the hidden-name way, the one for file systems without
# it, everywhere (the tests use it to exercise that way on tmpfs).
_NAMELESS = True


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


_header_size = _core.header_size  # the fixed header and the attach table, in whole pages


_pid = os.getpid()  # getpid() is a system call; the at-fork hook refreshes this
_claims = 0  # attach slots this process claimed: where the next claim starts looking


def _claim_start() -> int:
    """Where this process's next slot claim starts: its pid (so processes
    spread over the table), then one further each time (so many handles of one
    object in one process do not each pass the slots the earlier ones took)."""
    global _claims
    _claims += 1
    return _pid + _claims - 1
_KINDS = {int(k): k for k in Kind}  # faster than Kind(n) on every open


_GROWABLE = frozenset({Kind.RAW, Kind.STORE})  # kinds that resize(); see DEFAULT_RESERVE
_FILE_TYPES = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
               (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link"))


def _file_type(mode: int) -> str:
    for test, what in _FILE_TYPES:
        if test(mode):
            return what
    return "special file"


def _owner_uid(owner: int | str) -> int:
    """The uid named by ``trust_owner=`` (a uid or a user name)."""
    if isinstance(owner, bool) or not isinstance(owner, (int, str)):
        raise TypeError(f"trust_owner must be a uid (int) or a user name (str), not {owner!r}")
    if isinstance(owner, int):
        if not 0 <= owner < 1 << 32:
            raise ValueError(f"trust_owner={owner} is not a uid")
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError(f"trust_owner={owner!r}: no such user on this system") from None


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _check_trust(st: os.stat_result, where: str, path: str, trust_uid: int | None) -> None:
    """Refuse a file this process must not read: not a regular file, or owned
    by someone other than this user, root or the owner the caller trusts."""
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedError(
            f"{where} ({path}) is a {_file_type(st.st_mode)}, not a regular file; "
            "refusing to open it (someone may have put it there to hang or crash the "
            "users of this name). Remove it, or use another name")
    uid = st.st_uid
    if uid != os.geteuid() and uid != 0 and uid != trust_uid:
        raise UntrustedError(
            f"{where} ({path}) belongs to {_user(uid)}, not to you ({_user(os.geteuid())}); "
            "refusing to read it: another user may have created the name first to feed "
            f"you forged data. Remove it, or pass trust_owner={uid} if you share it with "
            "that user on purpose")


def _limit_error(e: OSError, what: str) -> Exception:
    """A specific error for resources running out, else ``e`` itself."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return DescriptorLimitError(
            e.errno, f"no file descriptor left to {what} ({e.strerror}); close objects "
            "you no longer use, or raise the limit (ulimit -n)")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(
            f"no room in {SHM_DIR} (or the path's file system) to {what} ({e.strerror}: "
            "out of space or inodes); free some (shmkit ls / shmkit gc)")
    return e


def _no_address_space(where: str, reserve: int) -> OutOfSpaceError:
    return OutOfSpaceError(
        f"no address space left to map {where} ({reserve} bytes reserved): too "
        "many objects are open in this process, or max_size= is too large; close "
        "some, or give growable objects a smaller max_size=")


_NAME_MAX = 255  # bytes in one directory entry's name (Linux file systems)


def _new_file(path: str, what: str, mode: int, length: int, reserve: int,
              private: bool = False) -> tuple[int, Any]:
    """A new file for ``path``, made by one call of the core
    (``_core.create_file``: no name yet, exactly ``mode``, its init lock held,
    ``length`` bytes allocated, ``reserve`` mapped, the mapping owning the
    descriptor and listed as a creation until ``end_creation``; ``private``:
    no forked child keeps it), or the error that fits, naming ``what`` and
    saying what to do.  Returns ``(fd, mapping)``.  Where the file system
    lacks O_TMPFILE the file is made under a hidden name, which the mapping
    holds: removed when :func:`_link_new` gives the file its name, or when
    the mapping lets the file go."""
    directory, base = os.path.split(path)
    suffix = f".{os.getpid()}.{os.urandom(4).hex()}.tmp"
    # The name in the hidden one only tells `shmkit gc` whose it was: cut
    # short, so that a name near the file system's 255-byte limit still fits.
    keep = _NAME_MAX - 1 - len(suffix)
    while len(os.fsencode(base)) > keep:
        base = base[:-1]
    tmp = os.path.join(directory, f".{base}{suffix}")
    try:
        fd, mapping = _core.create_file(os.fsencode(directory), os.fsencode(tmp), mode,
                                        length, reserve, _NAMELESS, private)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise NotFoundError(f"directory {directory!r} does not exist "
                                f"({e.strerror}); create it, or give another path") from None
        if e.errno == errno.ENAMETOOLONG:
            raise _too_long(path) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(e.errno, f"no permission to create {what} in "
                                  f"{directory} ({e.strerror}); choose a directory you "
                                  "may write to", path) from None
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OutOfSpaceError(
                f"not enough space or inodes in {directory} for {length} bytes "
                f"({e.strerror}); free some (shmkit ls / shmkit gc) or ask "
                "for less") from None
        if e.errno == errno.ENOMEM:
            raise _no_address_space(what, reserve) from None
        raise _limit_error(e, f"create {what}") from None
    return fd, mapping


def _too_long(path: str) -> InvalidNameError:
    shown = path if len(path) <= 120 else "..." + path[-100:]
    return InvalidNameError(f"path {shown!r} ({len(os.fsencode(path))} bytes) is longer "
                            "than the file system allows (255 bytes a name, 4096 a "
                            "path); give a shorter one")


def _link_new(fd: int, mapping: Any, path: str) -> None:
    """Give a file made by :func:`_new_file` its name (and remove its hidden
    one, if it has one, in the same call): FileExistsError if the name is
    taken, InvalidNameError if it is too long (a file made without a name
    meets the limit only here)."""
    try:
        _core.link_file(fd, os.fsencode(path), mapping)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise _too_long(path) from None
        raise


def _map(fd: int, reserve: int, length: int, where: str, readonly: bool = False) -> Any:
    try:
        return _core.Mapping(fd, reserve, length, readonly=readonly)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise _no_address_space(where, reserve) from None
        raise


def _let_go(fd: int, mapping: Any) -> None:
    """Close the file and mapping of a handle that was not made after all."""
    if mapping is None:
        os.close(fd)
    else:  # adopted already, or a Ctrl-C fell just before: adopt_fd is a no-op then
        mapping.adopt_fd(fd)
        mapping.detach(fd)


class _Header:
    """The fixed header fields, decoded and checked (everything is untrusted).

    The checks themselves are the core's (``_core.header_problem``, the same
    that ``_core.open_segment`` makes); this says what each failure means."""

    def __init__(self, raw: bytes, where: str, file_size: int) -> None:
        (magic, self.version, kind, self.flags, self.max_slots, self.header_size,
         self.size, self.max_size, self.created_ns, self.creator_pid, _lock,
         self.resizes, self.hwm, layout_len) = _HEADER.unpack_from(raw)
        problem = _core.header_problem(raw, file_size)
        if problem == "magic":
            raise CorruptError(f"{where} is not a shmkit segment (bad magic {magic!r}); "
                               "remove it with `shmkit rm` if it is yours")
        if problem == "version":
            raise FormatVersionError(
                f"{where} has data format version {self.version}; this shmkit reads "
                f"version {FORMAT_VERSION}. Use the shmkit that made it, or remove it "
                "with `shmkit rm`")
        known = _KINDS.get(kind)
        if known is None:
            raise CorruptError(f"{where} has an unknown kind {kind}")
        self.kind: Kind = known
        if problem is not None:
            raise CorruptError(where + {
                "slots": f" has an impossible attach-table size {self.max_slots}",
                "header_size": f" has an inconsistent header size {self.header_size}",
                "size": f" has size {self.size} beyond its maximum {self.max_size}",
                "file_header": f"'s file holds only {file_size} bytes, less than its "
                               f"{self.header_size}-byte header",
                "file_payload": f" claims {self.size} bytes of payload but its file holds "
                                f"only {file_size - self.header_size} after the header",
                "layout_len": f" has a layout description of {layout_len} bytes",
            }[problem])
        self.layout_text = raw[_LAYOUT_OFF:_LAYOUT_OFF + layout_len]
        self.layout = _decode_layout(self.layout_text, where)


_LAYOUTS: dict[bytes, dict[str, Any]] = {}  # decoded layouts: objects of a kind share few


def _layout_of(text: bytes, name: str) -> dict[str, Any]:
    """The layout ``text`` of segment ``name`` describes, decoded once per
    distinct text; shared, so never changed (``Segment.layout`` hands users
    their own copy)."""
    layout = _LAYOUTS.get(text)
    if layout is None:
        layout = _decode_layout(text, repr(name))
        if len(_LAYOUTS) >= 4096:
            _LAYOUTS.clear()
        _LAYOUTS[text] = layout
    return layout


# Above the deepest layout shmkit writes in its 3 KB (a record nested in a
# record 55 times nests 111 levels), below what the JSON parser can take.
_MAX_LAYOUT_DEPTH = 256


def _nesting(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (brackets in
    strings do not count).  One pass: hostile text costs time linear in its
    length."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(word: str) -> Any:
    """json's NaN, Infinity and -Infinity, which shmkit never writes (and
    strict JSON, such as ``shmkit ls --json``, cannot carry)."""
    raise ValueError(word)


def _finite(word: str) -> float:
    """A number with a fraction or exponent, refused where it overflows to an
    infinity (``1e400``): the constants above by another spelling."""
    value = float(word)
    if not math.isfinite(value):
        raise ValueError(word)
    return value


class _KeyGivenTwice(ValueError):
    """A layout object names a key twice, which shmkit never writes (json
    would settle it by keeping the last)."""


def _distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _KeyGivenTwice
    return obj


def _decode_layout(text: bytes, where: str) -> dict[str, Any]:
    """The layout description (JSON) of a checked header."""
    if not text or text == b"{}":
        return {}
    # UTF-8 as written, decoded here: json.loads would guess an encoding from
    # bytes (UTF-16 too), which the nesting count must read the same way.
    # Nesting is refused before the parser sees it: hostile bytes nested past
    # its depth would raise RecursionError, which must mean the reader's own.
    try:
        chars = text.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptError(f"{where} has a layout description that is not UTF-8") from None
    if (chars.count("[") + chars.count("{") > _MAX_LAYOUT_DEPTH
            and _nesting(chars) > _MAX_LAYOUT_DEPTH):
        raise CorruptError(f"{where} has a layout description nested more than "
                           f"{_MAX_LAYOUT_DEPTH} levels deep, deeper than shmkit writes: "
                           "it is damaged; remove it with `shmkit rm`")
    try:
        layout = json.loads(chars, parse_constant=_no_constant, parse_float=_finite,
                            object_pairs_hook=_distinct_keys)
    except ValueError as e:
        why = " (a key given twice)" if isinstance(e, _KeyGivenTwice) else ""
        raise CorruptError(f"{where} has an unreadable layout description{why}; remove it "
                           "with `shmkit rm`") from None
    if not isinstance(layout, dict):
        raise CorruptError(f"{where} has a layout description that is not an object")
    # Every kind compares its format with ==, where 2.0 and True pass too.
    fmt = layout.get("format", 0)
    if type(fmt) is not int:
        raise CorruptError(f"{where} has a layout format of {fmt!r}, not a whole number as "
                           "shmkit writes: it is damaged; remove it with `shmkit rm`")
    if "\\u" in chars:
        # An escaped lone surrogate decodes to a str no one can print or
        # encode (shmkit writes a pair for each character past U+FFFF).
        try:
            json.dumps(layout, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise CorruptError(f"{where} has a layout description with a lone surrogate "
                               "escape, which shmkit never writes: it is damaged; remove it "
                               "with `shmkit rm`") from None
    return layout


def mismatch(what: str, name: str, param: str, asked: Any, found: Any) -> MismatchError:
    """The error for an explicit parameter the existing object does not have."""
    return MismatchError(
        f"{what} {name!r} exists with {param}={found!r}, but {param}={asked!r} was "
        f"asked; leave {param}= out to adopt what exists, or unlink it (`shmkit rm "
        f"{name}`) and create it again")


_H = TypeVar("_H", bound="Closing")


class Closing:
    """What every handle does with ``with`` and at garbage collection: ``close()``."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        return self

    # self.close(), from the core: a Python __exit__ has bytecodes before the
    # call where a Ctrl-C would leave the handle open for the collector.
    __exit__ = _core.close_on_exit

    # CPython drops whatever __del__ raises, and nothing would close this
    # handle again: a Ctrl-C landing inside close() (lost to the program
    # either way) must not leave the close half done.  So __del__ is the
    # core's, which calls close() again after an interrupt, with no bytecode
    # of its own for a signal to stop.
    __del__ = _core.close_at_del


# What Segment.open checks against the existing segment, when given.
_ASKED = ("size", "mode", "lifetime", "max_size", "max_attach")


class SegmentInfo(dict[str, Any]):
    """A plain dict describing a segment, as ``shmkit info --json`` prints it."""


# Open segments of this process, for the at-fork hook (weak: never keeps one open).
_live: "dict[int, weakref.ref[Segment]]" = {}


class Segment(Closing):
    """A named region of shared memory with a self-describing header.

    ``Segment(name, size=n)`` opens ``name`` if it exists and creates it with
    ``n`` zeroed bytes otherwise; ``.created`` is True only in the process that
    made it (exactly one wins a race).  ``Segment.create`` and ``Segment.open``
    insist on one or the other.

    Parameters
    ----------
    name:
        1 to 200 characters of ``A-Z a-z 0-9 _ . : @ + -``; ``None`` makes a
        unique name (see ``.name``).
    size:
        Payload bytes when creating.  Required to create; when opening, an
        existing segment smaller than ``size`` raises :class:`MismatchError`
        (leave it out, or use ``Segment.open``, to adopt any size).
    path:
        Back the segment by this file instead of /dev/shm (survives reboots).
    readonly:
        Map read-only; writes raise :class:`ReadOnlyError`.
    mode:
        File permissions when creating, 0..0o777 (default 0o600: this user only).
    lifetime:
        ``"persistent"`` (until ``unlink()``; the default for named segments)
        or ``"attached"`` (the default for ``name=None``): removed when the
        last attached process closes it.  Segments whose attached processes
        all died are removed by ``shmkit gc``.
    max_size:
        Largest size ``resize`` may reach (address space only; default 4 GiB).
    max_attach:
        Attach-table slots: how many handles may be open at once (default 256).
    on_destroy:
        Called (no arguments) once, in the process that removes the name: its
        ``unlink()``, or the last ``close()`` of an ``"attached"`` segment;
        never in the others.  The sync kinds take it too.
    trust_owner:
        Also accept a file owned by this user (a uid or a user name).  By
        default only files owned by you (or root) are opened; anything else,
        and anything that is not a regular file, raises
        :class:`UntrustedError` before a byte of it is read.

    Raises
    ------
    InvalidNameError, NotFoundError, ExistsError, WrongKindError,
    FormatVersionError, CorruptError, OutOfSpaceError, BusyError, MismatchError,
    UntrustedError, SizeLimitError, DescriptorLimitError

    Example
    -------
    >>> with Segment(None, size=64) as seg:
    ...     seg.write(b"abc", offset=1)
    ...     seg.read(3, offset=1)
    b'abc'
    """

    _kind = Kind.RAW
    _closed = True
    _fd = -1
    _mapping: Any = None
    _token = 0
    _name = ""  # set by every constructor; the defaults let repr() and close()
    _path = ""  # work on a half-made object
    _readonly = False
    _created = False
    _flags = 0
    _trust_uid: int | None = None
    _lock_obj: Any = None  # the segment's Mutex, made on first use
    _ready_wait = _OPEN_WAIT  # seconds an open waits for a creator (0: and no closer)

    def __init__(self, name: str | None = None, size: int | None = None, *,
                 path: str | os.PathLike[str] | None = None, readonly: bool = False,
                 mode: int | None = None, lifetime: str | None = None,
                 max_size: int | None = None, max_attach: int | None = None,
                 trust_owner: int | str | None = None,
                 on_destroy: Callable[[], Any] | None = None) -> None:
        self._on_destroy = on_destroy
        self._attach(name, path, size=size, create=None, readonly=readonly,
                     mode=0o600 if mode is None else mode, lifetime=lifetime,
                     max_size=max_size,
                     max_attach=DEFAULT_MAX_ATTACH if max_attach is None else max_attach,
                     trust_owner=trust_owner)
        if not self._created:
            self._refuse_disagreeing(size=size, mode=mode, lifetime=lifetime,
                                     max_size=max_size, max_attach=max_attach)

    def _refuse_disagreeing(self, size: int | None = None, mode: int | None = None,
                            lifetime: str | None = None, max_size: int | None = None,
                            max_attach: int | None = None) -> None:
        # An explicit parameter is honoured or refused: an existing segment
        # smaller than asked would fail later with IndexError far from the
        # cause, and another lifetime or mode would surprise just as late.
        error = self._disagreement("segment", size=size, mode=mode, lifetime=lifetime,
                                   max_size=max_size, max_attach=max_attach)
        if error is not None:
            self.close()
            raise error

    def _disagreement(self, what: str, size: int | None = None, mode: int | None = None,
                      lifetime: str | None = None, max_size: int | None = None,
                      max_attach: int | None = None) -> MismatchError | None:
        """The error for the first given parameter this segment lacks (None
        when all agree); the structures built on segments ask it too."""
        if size is not None and (have := self._sync_size()) < size:
            return mismatch(what, self._name, "size", size, have)
        if max_size is not None and self._max_size < max_size:
            return mismatch(what, self._name, "max_size", max_size, self._max_size)
        if max_attach is not None and max_attach != self._max_slots:
            return mismatch(what, self._name, "max_attach", max_attach, self._max_slots)
        life = "attached" if self._flags & _FLAG_ATTACHED else "persistent"
        if lifetime is not None and lifetime != life:
            return mismatch(what, self._name, "lifetime", lifetime, life)
        if mode is not None and mode != (have := os.fstat(self._fd).st_mode & 0o7777):
            return mismatch(what, self._name, "mode", oct(mode), oct(have))
        return None

    # -- construction -----------------------------------------------------

    @classmethod
    def create(cls, name: str | None = None, size: int = 0, **kwargs: Any) -> "Segment":
        """Create a new segment; :class:`ExistsError` if the name is taken.

        >>> seg = Segment.create(size=16); seg.created
        True
        """
        self = cls.__new__(cls)
        self._attach(name, kwargs.pop("path", None), size=size, create=True, **kwargs)
        return self

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Segment":
        """Open an existing segment; :class:`NotFoundError` if there is none.

        >>> Segment.open("no-such-name")
        Traceback (most recent call last):
        shmkit.errors.NotFoundError: ...
        """
        self = cls.__new__(cls)
        asked = {k: kwargs.pop(k) for k in _ASKED if kwargs.get(k) is not None} \
            if kwargs else None
        if asked:  # compared after the open: refused first if no segment can have it
            _check_numbers(**{k: v for k, v in asked.items() if k != "lifetime"})
        self._attach(name, kwargs.pop("path", None), size=None, create=False, **kwargs)
        if asked:
            self._refuse_disagreeing(**asked)
        return self

    @classmethod
    def _from_fd(cls, fd: int, name: str, path: str, *, kind: Kind | None = None,
                 readonly: bool = False) -> "Segment":
        """Attach through ``fd``, an open descriptor of the segment's file.

        A parent process hands its descriptor to a spawned child (as
        ``multiprocessing`` hands over pipes), so the child reaches the
        object even after the parent closed it and its name was removed.
        The file is reopened through ``/proc/self/fd`` to get an open file of
        our own (attach slots are OFD locks, one per open file), and ``fd`` is
        closed before a slot is claimed: an inherited descriptor shares the
        parent's open file, and with it the locks the parent held, which must
        go when the parent has let go.
        """
        self = cls.__new__(cls)
        self._kind = kind or cls._kind
        self._name, self._path = name, path
        self._readonly = bool(readonly)
        self._created = False
        self._lock_obj = None
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            own = os.open(f"/proc/self/fd/{fd}", flags)
        finally:
            os.close(fd)
        mapping = None
        try:
            st = os.fstat(own)
            _check_trust(st, repr(name), path, None)  # before reading a byte
            head = self._wait_ready(own, False, st)
            if head.kind != self._kind:
                raise WrongKindError(
                    f"{name!r} is a {head.kind.name.lower()}, not a "
                    f"{self._kind.name.lower()}; open it as {head.kind.name.title()}")
            mapping = _map(own, head.header_size + head.max_size,
                           head.header_size + head.size, repr(name), readonly=self._readonly)
            mapping.adopt_fd(own)  # held where the except finds it: now it may own
        except BaseException:
            _let_go(own, mapping)
            raise
        self._setup(own, mapping, head.header_size, head)
        return self

    def _attach(self, name: str | None, path: Any, *, size: int | None,
                create: bool | None, readonly: bool = False, mode: int = 0o600,
                lifetime: str | None = None, max_size: int | None = None,
                max_attach: int = DEFAULT_MAX_ATTACH, layout: dict[str, Any] | None = None,
                init: Callable[["Segment"], None] | None = None,
                kind: Kind | None = None, trust_owner: int | str | None = None,
                on_destroy: Callable[[], Any] | None = None,
                ready_wait: float | None = None) -> None:
        if on_destroy is not None:
            self._on_destroy = on_destroy
        if ready_wait is not None:
            self._ready_wait = ready_wait
        kind = self._kind = kind or self._kind
        if name is None and path is None and create is False:
            raise InvalidNameError("open() needs a name or a path")
        if lifetime is None:  # anonymous objects never outlive their users
            lifetime = "attached" if name is None and path is None else "persistent"
        self._trust_uid = None if trust_owner is None else _owner_uid(trust_owner)
        self._name, self._path = _resolve(name, path)
        self._readonly = bool(readonly)
        self._created = False
        self._lock_obj = None
        if lifetime not in ("persistent", "attached"):
            raise ValueError(f"lifetime must be 'persistent' or 'attached', not {lifetime!r}")
        if create is not None and create is not True and create is not False:
            # (create=1 read as "not True" opened an existing object)
            raise TypeError(f"create must be True (create only), False (open only) or None "
                            f"(either), not {create!r}")
        if size is None and create:
            raise ValueError("create() needs size=")
        if (size is not None or max_size is not None or type(mode) is not int
                or mode != 0o600 or type(max_attach) is not int
                or max_attach != DEFAULT_MAX_ATTACH):  # (an open's defaults: nothing to check)
            _check_numbers(size=size, max_size=max_size, mode=mode, max_attach=max_attach)
        if readonly and create:
            raise ValueError("cannot create a segment readonly=True")
        may_create = create is not False and size is not None and not readonly
        for _ in range(100):
            # Open first: creating builds a whole file (payload included)
            # before it can find out that the name is taken.
            if create is not True:
                try:
                    self._open_file(kind, may_create)
                    return
                except NotFoundError:
                    raise
                except FileNotFoundError:
                    if not may_create:
                        raise NotFoundError(
                            f"no segment named {self._name!r} ({self._path}); create it "
                            "with a size first, or check the name with `shmkit ls`") from None
            assert size is not None  # may_create
            try:
                self._create_file(kind, size, mode, lifetime, max_size, max_attach,
                                  layout or {}, init)
                return
            except FileExistsError:
                if create:
                    raise ExistsError(f"a segment named {self._name!r} already exists; "
                                      "open it, or unlink it first") from None
        raise BusyError(f"{self._name!r} was created and removed repeatedly while opening")

    def _create_file(self, kind: Kind, size: int, mode: int, lifetime: str,
                     max_size: int | None, max_attach: int, layout: dict[str, Any],
                     init: Callable[["Segment"], None] | None) -> None:
        if max_size is None:
            max_size = DEFAULT_RESERVE if kind in _GROWABLE else size
        max_size = max(size, max_size)
        layout_bytes = json.dumps(layout, separators=(",", ":")).encode()
        if len(layout_bytes) > _LAYOUT_MAX:
            raise ValueError(f"layout description too long ({len(layout_bytes)} bytes)")
        hsize = _header_size(max_attach)
        # Built in a file without a name (O_TMPFILE), under the init lock,
        # then linked to its name: the link is the atomic "first creator
        # wins"; the winner alone runs init, and openers wait for its magic.
        # A creator interrupted or killed before the link leaves nothing (the
        # mapping owns the file); after it, see the except below.
        creator = _pid
        mapping: Any  # a buffer (the stub declares __buffer__ from 3.12 only)
        fd, mapping = _new_file(self._path, repr(self._name), mode, hsize + size,
                                hsize + max_size)
        try:
            flags = _FLAG_ATTACHED if lifetime == "attached" else 0
            head = _HEADER.pack(b"\0" * 8, FORMAT_VERSION, int(kind), flags, max_attach,
                                hsize, size, max_size, time.time_ns(), os.getpid(), 0, 0,
                                0, len(layout_bytes))
            view = memoryview(mapping)
            view[:len(head)] = head
            view[_LAYOUT_OFF:_LAYOUT_OFF + len(layout_bytes)] = layout_bytes
            view.release()
            try:
                _link_new(fd, mapping, self._path)
            except FileExistsError:
                raise
            except OSError as e:
                raise _limit_error(e, f"create {self._name!r}") from None
            # From here on the name is visible; openers wait for the magic.
            self._setup(fd, mapping, hsize)
            self._created = True
            if init is not None:
                init(self)
                if _pid != creator:
                    # A child forked inside init: the creation is its
                    # parent's, which alone publishes it, or removes it if
                    # its init fails.  The child lets go at once (its slot
                    # would keep the parent from removing a failed one).
                    raise BusyError(
                        f"{self._name!r} is being created by this process's parent, "
                        "which forked it inside init=: the object is the parent's to "
                        "finish. End the child inside init (os._exit), or open the "
                        "object by name once the parent has created it")
            view = memoryview(mapping)
            view[:8] = MAGIC  # publish: the header and init are complete
            view.release()
            _core.ofd_unlock(fd, _core.INIT_LOCK_BYTE, 1)
            mapping.end_creation()  # a child forked from now on keeps it
        except BaseException:
            # First, one call of the core (no handler runs inside it), the
            # same as an "attached" object's last close: remove the name if
            # it names our file and nobody else holds it, so that it is not
            # left half-created, and let the file go.  (A kill between the
            # link and the magic does leave that: the next create-or-open, or
            # `shmkit gc`, recovers it.)  Not in a child forked inside init:
            # the name is its parent's.  (`_pid`, not getpid(): a call before
            # the core's would be a point where a second Ctrl-C lands first.)
            if _pid == creator:
                mapping.detach(fd, self._path)
            self._created = False
            if self._mapping is mapping:
                self._detach()
            else:
                _let_go(fd, mapping)  # a traceback must not keep the file mapped
            raise

    def _open_file(self, kind: Kind, may_create: bool = False) -> None:
        # The common case, a published object that passes every check, in one
        # call of the core; it returns None (leaving nothing open) for all
        # else, which the steps below handle: they wait for a creator,
        # recover a half-created file, or raise the error that fits.
        got = _core.open_segment(self._path, not self._readonly, kind,
                                 -1 if self._trust_uid is None else self._trust_uid,
                                 _claim_start(), _process_name())
        if got is not None:
            fd, mapping, flags, max_slots, hsize, _size, max_size, created_ns, creator, \
                text = got
            self._keep(fd, mapping, hsize, flags, max_slots, max_size, created_ns, creator,
                       text)
            self._attached()
            return
        where = repr(self._name)
        # Never read what is not a regular file: O_NONBLOCK makes opening a
        # FIFO return at once (a socket fails with ENXIO, a directory opened
        # for writing with EISDIR), and the fstat below refuses them all.
        # (Only root can make device nodes, and /dev/shm is mounted nodev.)
        flags = ((os.O_RDONLY if self._readonly else os.O_RDWR) | os.O_NOFOLLOW
                 | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fd = os.open(self._path, flags)
        except OSError as e:
            if e.errno == errno.ENOTDIR:  # a file where a directory should be: no segment
                raise FileNotFoundError(e.errno, e.strerror, self._path) from None
            if e.errno == errno.ELOOP:
                raise InvalidNameError(f"{self._path} is a symbolic link; refusing to "
                                       "follow it") from None
            if e.errno == errno.ENAMETOOLONG:
                raise _too_long(self._path) from None
            if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
                raise UntrustedError(f"{where} ({self._path}) is not a regular file "
                                     f"({e.strerror}); refusing to open it") from None
            if e.errno == errno.EACCES:
                raise PermissionError(e.errno, f"no permission to open segment "
                                      f"{self._name!r}: {e.strerror}", self._path) from None
            raise _limit_error(e, f"open {where}") from None
        made: Any = None
        try:
            st = os.fstat(fd)
            _check_trust(st, where, self._path, self._trust_uid)  # before reading a byte
            head = self._wait_ready(fd, may_create, st)
            if head.kind != kind:
                raise WrongKindError(
                    f"{self._name!r} is a {head.kind.name.lower()}, not a "
                    f"{kind.name.lower()}; open it as {head.kind.name.title()}")
            made = _map(fd, head.header_size + head.max_size, head.header_size + head.size,
                        where, readonly=self._readonly)
            made.adopt_fd(fd)
        except BaseException:
            _let_go(fd, made)
            raise
        self._setup(fd, made, head.header_size, head)
        # A last "attached" closer, or `shmkit gc`, may have removed it between
        # our open and our slot claim (nobody was attached then): start over.
        # Once the slot is ours, neither can remove it.
        if os.fstat(fd).st_nlink == 0:
            self._detach()
            raise FileNotFoundError(self._path)

    def _wait_ready(self, fd: int, may_recover: bool = False,
                    st: os.stat_result | None = None) -> _Header:
        where = repr(self._name)
        deadline = time.monotonic() + self._ready_wait
        pause = 0.0005
        while True:
            st = st or os.fstat(fd)
            try:
                raw = os.pread(fd, _HEADER_BYTES, 0)
            except OSError as e:  # a file of /proc, say: regular, ours, and no segment
                if e.errno in (errno.EINTR, errno.ENOMEM):
                    raise
                raise CorruptError(f"{where}'s file cannot be read as a segment "
                                   f"({e.strerror}): it is not a shmkit segment; check the "
                                   "name or path") from None
            if raw[:8] == MAGIC:
                if len(raw) < _HEADER_BYTES:
                    raise CorruptError(
                        f"{where}'s file holds only {len(raw)} bytes, less than its "
                        f"{_HEADER_BYTES}-byte header; remove it with `shmkit rm` and "
                        "create it again")
                return _Header(raw, where, st.st_size)
            if raw[:8].strip(b"\0"):
                raise CorruptError(f"{where} is not a shmkit segment (bad magic "
                                   f"{raw[:8]!r}); remove it with `shmkit rm` if it is yours")
            if len(raw) < _HEADER_BYTES:  # creators link only whole files: not a creation
                raise CorruptError(
                    f"{where}'s file holds only {len(raw)} bytes, less than a "
                    f"{_HEADER_BYTES}-byte header: it is not a shmkit segment; remove it "
                    "with `shmkit rm` if it is yours")
            if not _core.ofd_held(fd, _core.INIT_LOCK_BYTE, 1) \
                    and os.pread(fd, 8, 0) != MAGIC:
                if os.fstat(fd).st_nlink == 0:  # its creator's init failed: start over
                    raise FileNotFoundError(self._path)
                self._half_created(fd, may_recover)  # raises, or recovers and waits
            if time.monotonic() >= deadline:
                raise _timed_out(f"{where} is still being created after {self._ready_wait} s "
                                 "(its creator holds the init lock; see `shmkit info`)")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
            st = None

    def _half_created(self, fd: int, may_recover: bool) -> None:
        """The file has no magic and no creator at work: its creator died
        before publishing it (or the magic was overwritten).

        Never removes what a live process is attached to.  Otherwise, for a
        create-or-open, takes the init lock (so exactly one process
        recovers), removes the name if it still names this file, and raises
        FileNotFoundError so that the caller creates it afresh; an ``open()``
        raises NotFoundError.  Returns (to wait) if another process got the
        init lock first.
        """
        where = repr(self._name)
        if _core.ofd_held(fd, *_ATTACH_SPAN):
            raise CorruptError(
                f"{where} has no valid magic bytes, yet processes are attached to it: "
                "someone overwrote its header; its data can no longer be trusted. Copy "
                "out what you need, then remove it with `shmkit rm` and create it again")
        if not may_recover:
            raise NotFoundError(
                f"{where} was left half-created by a process that died while creating "
                "it; create-or-open it (with a size) to recreate it, or remove it with "
                "`shmkit gc`")
        if not _core.ofd_lock(fd, _core.INIT_LOCK_BYTE, 1):
            return  # someone else is recovering or creating: wait for them
        # Hold every attach byte too: nobody can attach while we decide.
        if not _core.ofd_lock(fd, *_ATTACH_SPAN) or os.pread(fd, 8, 0) == MAGIC:
            # Someone attached, or it was published meanwhile: look again.
            _core.ofd_unlock(fd, *_ATTACH_SPAN)
            _core.ofd_unlock(fd, _core.INIT_LOCK_BYTE, 1)
            return
        try:
            here = os.stat(self._path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
                os.unlink(self._path)
        except FileNotFoundError:
            pass
        raise FileNotFoundError(self._path)

    def _setup(self, fd: int, mapping: Any, header_size: int,
               head: "_Header | None" = None) -> None:
        if head is not None:
            # The header as it was checked: another process may change the
            # mapping's copy at any time, and the attach table and the
            # reservation were sized from these values.
            self._keep(fd, mapping, header_size, head.flags, head.max_slots, head.max_size,
                       head.created_ns, head.creator_pid, head.layout_text)
        else:  # just created by this process
            (_m, _v, _k, flags, max_slots, _h, _s, max_size, created_ns, creator_pid, *_r,
             layout_len) = _HEADER.unpack_from(mapping)
            self._keep(fd, mapping, header_size, flags, max_slots, max_size, created_ns,
                       creator_pid, bytes(memoryview(mapping)[_LAYOUT_OFF:_LAYOUT_OFF
                                                              + layout_len]))
        mapping.table_off = _HEADER_BYTES
        mapping.max_slots = self._max_slots
        self._claim_slot()
        self._attached()

    def _attached(self) -> None:
        """The handle holds its slot: known to the at-fork and at-exit hooks,
        and its layout decoded (an unreadable one lets the slot go again)."""
        self._token = self._mapping.token
        _live[id(self)] = weakref.ref(self)
        try:
            self._layout = _layout_of(self._layout_text, self._name)
        except CorruptError:
            self._detach()
            raise

    def _keep(self, fd: int, mapping: Any, header_size: int, flags: int, max_slots: int,
              max_size: int, created_ns: int, creator_pid: int, layout_text: bytes) -> None:
        """Hold the open file and mapping, and the header fields as checked."""
        self._mapping = mapping  # first: it owns fd, which _detach closes through it
        self._fd = fd
        self._hsize = header_size
        self._flags = flags
        self._max_slots = max_slots
        self._max_size: int = max_size
        self._created_ns = created_ns
        self._creator_pid = creator_pid
        self._layout_text = layout_text
        self._closed = False

    def _claim_slot(self) -> None:
        fd, n, m = self._fd, self._max_slots, self._mapping
        if self._readonly:
            # Fails only while a last closer holds every slot to remove it.
            for attempt in range(50):
                got = _core.attach_reader(m, fd)
                if got == -1:
                    self._slot_count_damaged()
                if got:
                    return
                time.sleep(0.001)
            self._detach()
            raise BusyError(f"{self._name!r} is being removed; open it again")
        attempts = 50 if self._ready_wait else 1
        for attempt in range(attempts):
            token = _core.attach_claim(m, fd, _claim_start(), _process_name())
            if token == -1:
                self._slot_count_damaged()
            if token == -2:
                # cut short since its header was checked: the claim's writes
                # faulted onto the SIGBUS guard's private zero page
                self._detach()
                raise CorruptError(
                    f"{self._name!r}'s file was truncated by another process while it "
                    "was being opened; open it again, and if it stays short, copy out "
                    f"what you need, remove it (`shmkit rm {self._name}`) and create it "
                    "again")
            if token:
                return
            if attempt < attempts - 1:
                time.sleep(0.001)  # a closing process may hold every slot for a moment
        self._detach()
        raise BusyError(f"all {n} attach slots of {self._name!r} are in use; close unused "
                        "handles, or create it with a larger max_attach=")

    def _slot_count_damaged(self) -> None:
        # The core found a live process holding an attach slot at or above the
        # header's max_slots: the count was damaged (lowered to one that keeps
        # the header's size, which the header check cannot see), and this
        # handle would take those holders for dead and their locks for free.
        self._detach()
        raise CorruptError(
            f"{self._name!r}'s header says it has {self._max_slots} attach slots, yet a "
            "live process holds one beyond them: its header was damaged. Copy out what "
            "you need, then remove it with `shmkit rm` and create it again")

    def _reattach_after_fork(self) -> None:
        # The child shares the parent's open file, and so its locks: take a
        # fresh open file and slot so each process is known on its own.  The
        # mapping holds the open file too: the core maps the same pages
        # through the new one and closes the inherited one, in one call, or a
        # dead parent would look alive while this child lives.
        if self._closed:
            return
        if self._mapping.closed:  # a close() interrupted after its detach
            self._detach()
            return
        if self._mapping.abandoned or self._mapping.name_removed:
            # Another thread of the parent was creating it, or closing it
            # as its last holder (the name is gone; the clean-up is that
            # thread's, in the parent): not the child's to keep.
            self._detach()
            return
        _core.attach_detach(self._mapping)
        self._fd = self._mapping.reopen_file(self._fd)
        self._claim_slot()
        self._token = self._mapping.token

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Detach from the segment.  Safe to call twice.

        Views taken from ``.buf`` stay valid until released; the memory is
        unmapped after the last one goes.  With ``lifetime="attached"`` the
        last process to close removes the segment.
        """
        try:
            if not self._closed:
                # One call of the core, which runs no Python code: a close
                # racing it (another thread's, or a signal handler's made
                # while this thread is inside one) finds nothing left to do,
                # and one that a Ctrl-C interrupted can be called again.  It
                # ends the "attached" lifetime too: our lock dropped, the
                # name removed if nobody else holds it (once, on the file it
                # borrows: see Mapping.detach).
                self._detach(self._path if self._flags & _FLAG_ATTACHED else None)
        finally:
            # From the mapping, where the core noted it, and on every call: a
            # Ctrl-C just after the removal, even inside this finally, must
            # not skip the clean-up hook for good (the next close(), or the
            # handle's __del__, runs it; _destroyed runs it once).
            if self._removed:
                self._destroyed()

    @property
    def _removed(self) -> bool:
        """This handle's close() removed the name (lifetime "attached"), in
        this process: a child forked meanwhile inherits the mark, and the
        clean-up hook with it, which are its parent's."""
        m = self._mapping
        return m is not None and m.removed_here

    _on_destroy: Callable[[], Any] | None = None

    def _destroyed(self) -> None:
        # The clean-up hook runs once, in the process that removed the name
        # (taken and called in one step of the core: closes racing here run
        # it once, and no Ctrl-C falls between taking it and calling it).
        _core.pop_and_call(self.__dict__, "_on_destroy")

    def _detach(self, last_path: str | None = None) -> None:
        # One step in the core: a Ctrl-C cannot leave the file open (the
        # mapping owns it: without a mapping there is no file to close), nor,
        # given ``last_path``, an "attached" object whose last holder let go.
        # First, so that an interrupted close() can be called again; a second
        # detach finds the file closed and does nothing.
        if self._mapping is not None:
            self._mapping.detach(self._fd, last_path)
        self._closed = True
        _live.pop(id(self), None)
        self._fd = -1
        self._token = 0

    def unlink(self) -> None:
        """Remove the name now; attached processes keep their mapping.

        Raises :class:`NotFoundError` if it was already removed, except by
        this handle's own ``close()`` (the ``"attached"`` lifetime, the
        default of anonymous segments): then there is nothing left to do.
        """
        if self._removed:
            return
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            raise NotFoundError(f"segment {self._name!r} was already removed") from None
        self._destroyed()


    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (type(self), self._name, self._path, self._readonly, self._kind,
                          getattr(self, "_trust_uid", None)))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"size={self.size}"
        return f"<shmkit.{type(self).__name__} {self._name!r} {state}>"

    # -- properties -------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name (a generated one when created with ``name=None``)."""
        return self._name

    @property
    def path(self) -> str:
        """The file backing the segment."""
        return self._path

    @property
    def created(self) -> bool:
        """True only in the process whose call created the segment."""
        return self._created

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def size(self) -> int:
        """Payload bytes, as resized by any process."""
        return self._sync_size()

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def layout(self) -> dict[str, Any]:
        """The payload's layout description, as written by the creator (a new
        dict each time).

        >>> Segment(size=16).layout
        {}
        """
        self._live_mapping()
        return _decode_layout(self._layout_text, repr(self._name))

    @property
    def buf(self) -> memoryview:
        """A writable memoryview of the payload (read-only if opened so).

        Release it (``del`` or ``.release()``) when done; ``close()`` keeps
        the memory mapped until every view is gone.
        """
        size = self._sync_size()
        view = memoryview(self._mapping)
        try:
            return view[self._hsize:self._hsize + size]
        finally:
            view.release()

    @property
    def lock(self) -> Any:
        """The segment's own robust mutex (see :class:`shmkit.Mutex`)."""
        if self._lock_obj is None:
            from .sync import Mutex
            self._lock_obj = Mutex._embedded(self, _OFF_LOCK, f"lock of {self._name!r}",
                                             absolute=True)
        return self._lock_obj

    def _live_mapping(self) -> Any:
        if self._closed:
            raise ClosedError(f"segment {self._name!r} is closed in this process")
        return self._mapping

    def _check_truncated(self, look: bool = False) -> None:
        """Raise CorruptError if another process truncated the file: a page of
        ours faulted past its end (see _core/sigbus.c), or, with ``look``,
        the file is now shorter than the header and payload."""
        m = self._live_mapping()
        # The size first, then the file's: a resize extends the file before
        # it stores the new size (and a shrink punches holes, keeping the
        # file's length), so a resize in between, by another thread or
        # process, cannot make a whole file look short.  (The file's size
        # through the mapping, which lends its descriptor: never a number
        # another thread's close freed for reuse.)
        if m.truncated or (look and self._hsize + _core.load64(m, _OFF_SIZE)
                           > _core.file_sizes(m)[0]):
            raise CorruptError(
                f"{self._name!r}'s file was truncated to {_core.file_sizes(m)[0]} bytes "
                "by another process; its data can no longer be trusted; copy out what you "
                "need and recreate it")

    def _sync_size(self) -> int:
        m = self._live_mapping()
        size = _core.load64(m, _OFF_SIZE)
        if m.truncated:  # after the load: the load itself may be what faulted
            self._check_truncated()
        end = self._hsize + size
        if end > m.length:
            if size > self._max_size or end > _core.file_sizes(m)[0]:
                raise CorruptError(f"{self._name!r} claims {size} bytes, more than its "
                                   "file holds")
            m.set_length(end)
        return size

    # -- data access ------------------------------------------------------

    def _check_range(self, offset: int, n: int) -> int:
        size = self._sync_size()
        if not isinstance(offset, int) or not isinstance(n, int):
            raise TypeError("offset and length must be ints")
        if offset < 0 or n < 0 or offset + n > size:
            raise IndexError(f"bytes {offset}..{offset + n} are outside the segment's "
                             f"{size} bytes; resize() it or use a smaller offset")
        return self._hsize + offset

    def read(self, n: int | None = None, offset: int = 0) -> bytes:
        """Copy ``n`` bytes (default: to the end) starting at ``offset``.

        >>> with Segment(None, size=8) as s:
        ...     s.read(2, offset=6)
        b'\\x00\\x00'
        """
        if n is None:
            n = self._sync_size() - offset
        start = self._check_range(offset, n)
        view = memoryview(self._mapping)
        try:
            return bytes(view[start:start + n])
        finally:
            view.release()

    def write(self, data: Any, offset: int = 0) -> int:
        """Copy ``data`` (any bytes-like object) in at ``offset``; returns its length.

        Raises :class:`IndexError` past the end and :class:`ReadOnlyError` on a
        read-only segment.
        """
        if self._readonly:
            raise ReadOnlyError(f"segment {self._name!r} was opened readonly=True; open it "
                                "without readonly to write")
        src = memoryview(data).cast("B")
        start = self._check_range(offset, src.nbytes)
        view = memoryview(self._mapping)
        try:
            view[start:start + src.nbytes] = src
        finally:
            view.release()
        return src.nbytes

    def write_some(self, data: Any, offset: int = 0) -> int:
        """Copy as much of ``data`` as fits at ``offset``; returns the bytes written.

        The partial counterpart of :meth:`write`: the bytes that would fall
        past the end are left out (0 when ``offset`` is at or past the end).
        Raises :class:`ReadOnlyError` on a read-only segment and
        :class:`IndexError` for a negative offset.

        >>> with Segment(None, size=4) as s:
        ...     s.write_some(b"abcdef", offset=1), s.read()
        (3, b'\\x00abc')
        """
        if self._readonly:
            raise ReadOnlyError(f"segment {self._name!r} was opened readonly=True; open it "
                                "without readonly to write")
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if offset < 0:
            raise IndexError(f"offset {offset} is negative; offsets count from 0")
        src = memoryview(data).cast("B")
        n = max(0, min(src.nbytes, self._sync_size() - offset))
        if n:
            self.write(src[:n], offset)
        return n

    def ndarray(self, dtype: Any = "uint8", shape: Any = None, offset: int = 0) -> Any:
        """A numpy array over the payload, sharing its memory (no copy).

        >>> with Segment(None, size=32) as s:
        ...     a = s.ndarray("int64", (4,)); a[:] = 7; int(s.ndarray("int64").sum())
        28
        """
        np = numpy()
        dt = np.dtype(dtype)
        size = self._sync_size()
        if shape is None:
            shape = ((size - offset) // dt.itemsize,)
        elif isinstance(shape, int):
            shape = (shape,)
        count = 1
        for d in shape:
            count *= d
        self._check_range(offset, count * dt.itemsize)
        buf = self.buf  # the size may have changed since the check: another process
        if offset + count * dt.itemsize > len(buf):
            raise IndexError(f"bytes {offset}..{offset + count * dt.itemsize} are outside "
                             f"the segment's {len(buf)} bytes; resize() it or use a "
                             "smaller offset")
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=offset).reshape(shape)
        if self._readonly:
            arr.flags.writeable = False
        return arr

    def resize(self, size: int, timeout: float | None = None) -> None:
        """Grow or shrink the payload while other processes use it.

        Growth allocates the new pages now (raising :class:`OutOfSpaceError`
        instead of a later SIGBUS); shrinking gives the memory back with a
        hole punch, so stale views read zeros rather than faulting.  Other
        processes see the new size on their next access.  A resize holds the
        segment's lock: :class:`Timeout` after ``timeout`` seconds if another
        process holds it that long (``None``: wait as long as it takes).  A
        thread that holds the lock already (``with seg.lock:``) resizes under
        it, and the lock stays held until its block ends; one that holds it
        through another handle of the segment gets :class:`BusyError`.

            >>> seg.resize(2 * seg.size, timeout=1.0)  # doctest: +SKIP
        """
        if self._readonly:
            raise ReadOnlyError(f"segment {self._name!r} was opened readonly=True")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size must be a non-negative int, not {size!r}")
        if size > self._max_size:
            raise SizeLimitError(f"{size} bytes is beyond this segment's max_size "
                             f"{self._max_size}; create it with a larger max_size=")
        self._resize(size, timeout, "resize", grow_only=False)

    def _grow_to(self, size: int, timeout: float | None = None) -> None:
        """Grow the payload to at least ``size`` bytes, never shrinking it: for a
        structure inside the segment that grows from several processes at once
        (the heap), where a plain ``resize`` from a stale size would shrink."""
        self._resize(size, timeout, "grow", grow_only=True)

    def _resize(self, size: int, timeout: float | None, what: str, grow_only: bool) -> None:
        # One call of the core takes the lock, checks the file (truncated,
        # or shorter than the header's size), resizes and lets the lock go:
        # no Ctrl-C can land between the steps and leave the lock held.
        try:
            taken = _core.resize_payload(self._live_mapping(), self._hsize, self._max_size,
                                         size, grow_only, timeout, f"lock of {self._name!r}")
        except CorruptError as e:
            raise CorruptError(f"segment {self._name!r}: {e}") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OutOfSpaceError(
                    f"no space to grow {self._name!r} to {size} bytes "
                    f"({e.strerror}); free some or ask for less") from None
            raise
        if not taken:
            raise _timed_out(f"could not {what} {self._name!r} within "
                             f"{_core.shown_seconds(timeout)} s: its lock is "
                             f"held by {self.lock._holder_phrase()}; try again, or resume or "
                             "end that process")
        self._sync_size()

    # -- introspection ----------------------------------------------------

    def attachments(self) -> list[dict[str, Any]]:
        """The live attachments: ``[{"slot", "pid", "attached", "comm"}]``."""
        return [{k: e[k] for k in ("slot", "pid", "attached", "comm")}
                for e in _core.attachments(self._live_mapping())]

    def readonly_attached(self) -> bool:
        """True if some other process has it open with ``readonly=True``."""
        self._live_mapping()  # ClosedError, not EBADF, once closed
        return _core.ofd_held(self._live_mapping(), _READER_BYTE, 1)

    def owner_pid(self, token: int) -> int | None:
        """The pid of the live attachment named by a lock-owner token."""
        if token == 0:
            return None
        return _core.token_owner_pid(self._live_mapping(), token)

    def info(self) -> SegmentInfo:
        """What ``shmkit info`` shows: header facts, attachments, kind detail."""
        m = self._live_mapping()
        self._check_truncated(look=True)
        lock = self.lock
        holder = lock.owner_token
        attached = self.attachments()
        info = SegmentInfo(
            name=self._name, path=self._path, kind=self._kind.name.lower(),
            size=self.size, max_size=self._max_size,
            file_bytes=_core.file_sizes(m)[1],
            format_version=FORMAT_VERSION,
            lifetime="attached" if self._flags & _FLAG_ATTACHED else "persistent",
            created=self._created_ns / 1e9, creator_pid=self._creator_pid,
            attached=attached, readonly_attached=self.readonly_attached(),
            resizes=_core.load32(m, _OFF_RESIZES),
            lock={"held": bool(holder), "holder_pid": self.owner_pid(holder),
                  "holder_alive": bool(holder) and self.owner_pid(holder) is not None,
                  "waiters": lock.has_waiters},
            layout=self.layout,
        )
        if process_stopped(info["lock"]["holder_pid"]):
            info["lock"]["holder_stopped"] = True  # present only when it is so
        info.update(self._describe())
        return info

    def _describe(self) -> dict[str, Any]:
        """Kind-specific detail for ``info()``; subclasses extend it."""
        return {}


def _reopen(cls: type[Segment], name: str, path: str, readonly: bool,
            kind: Kind = Kind.RAW, trust_owner: int | None = None) -> Segment:
    # The kind travels too: a Segment carrying a Mutex or a Channel is a plain
    # Segment instance whose class default kind is RAW.  So does the owner the
    # sender chose to trust.
    seg = cls.__new__(cls)
    seg._attach(name, path, size=None, create=False, readonly=readonly, kind=Kind(kind),
                trust_owner=trust_owner)
    return seg


_comm: tuple[int, bytes] | None = None


def _process_name() -> bytes:
    """This process's name as the attach table stores it (16 bytes), cached per pid."""
    global _comm
    if _comm is None or _comm[0] != _pid:
        try:
            with open("/proc/self/comm", "rb") as f:
                name = f.read().strip()
        except OSError:
            name = b"?"
        _comm = (_pid, name[:16].ljust(16, b"\0"))
    return _comm[1]


def process_stopped(pid: int | None) -> bool:
    """True if ``pid`` is stopped (SIGSTOP, a debugger: state ``T`` or ``t`` in
    ``/proc/<pid>/stat``): alive, so its locks are not recovered, but making
    no progress; whoever waits on it waits until it continues or times out."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state
    # follows the last ")".
    rest = stat_line[stat_line.rfind(b")") + 1:].split()
    return bool(rest) and rest[0] in (b"T", b"t")


_child_hooks: list[Callable[[], None]] = []


def at_fork_in_child(hook: Callable[[], None]) -> None:
    """Run ``hook`` in a forked child after every handle has its own slot,
    with signal handlers held back (``_core/fork.c``)."""
    _child_hooks.append(hook)


def _after_fork_in_child() -> None:
    # Runs with signals held back (see the registration below).
    global _pid, _claims
    _pid = os.getpid()
    _claims = 0
    _core.forget_creations()  # the parent's creations in progress are not ours
    for ref in list(_live.values()):
        seg = ref()
        if seg is None:
            continue
        try:
            seg._reattach_after_fork()
        except Exception:
            # Without its own slot this process would pass for its parent:
            # close the handle here (its uses raise ClosedError) and go on
            # with the others.
            try:
                seg._detach()
            except Exception:
                seg._closed = True
    for hook in _child_hooks:
        try:
            hook()
        except Exception as e:  # reported, as CPython reports a failing fork hook
            sys.stderr.write(f"shmkit: after-fork hook {hook.__qualname__} failed: {e!r}\n")


# Called through C that blocks asynchronous signals around it (_core/fork.c):
# a Ctrl-C cannot stop the work halfway, leaving handles on the parent's slot.
os.register_at_fork(after_in_child=_core.signals_held(_after_fork_in_child))


def _close_attached_at_exit() -> None:
    # Anonymous (lifetime "attached") objects must not outlive a process that
    # exits normally, even if a handle is still referenced somewhere.
    for ref in list(_live.values()):
        seg = ref()
        if seg is not None and not seg._closed and seg._flags & _FLAG_ATTACHED:
            try:
                seg.close()
            except Exception:
                pass


atexit.register(_close_attached_at_exit)


def list_segments() -> Iterator[tuple[str, str]]:
    """Yield ``(name, path)`` of every shmkit segment in /dev/shm."""
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(PREFIX):  # creation temp files start with "."
            name = entry[len(PREFIX):]
            if _is_valid_name(name):  # (anyone may make "shmkit.." there)
                yield name, os.path.join(SHM_DIR, entry)


def unlink(name: str) -> None:
    """Remove the segment called ``name``; :class:`NotFoundError` if missing.
    A Queue's payload files (its big objects) go with it, as with
    ``Queue.unlink()``."""
    path = segment_path(name)
    queue = _may_be_a_queue(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise NotFoundError(f"no segment named {name!r}") from None
    if queue:
        from .channel import _remove_payloads  # (channel imports this module)
        _remove_payloads(path)


def _may_be_a_queue(path: str) -> bool:
    """Whether the file at ``path`` may be a Queue's: its header says so, or
    cannot say.  Only a queue has payload files, and looking for them lists
    the whole of /dev/shm: removing many objects one by one would list it
    once per object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        head = os.pread(fd, _HDR["kind"] + 4, 0)
    except OSError:
        return True
    finally:
        os.close(fd)
    return (len(head) < _HDR["kind"] + 4 or head[:8] != MAGIC
            or struct.unpack_from("=I", head, _HDR["kind"])[0] == Kind.QUEUE)
