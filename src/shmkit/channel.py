"""Message channels between processes, and a drop-in ``multiprocessing.Queue``.

A :class:`Channel` is a ring of variable-size byte messages in a named
segment.  Any number of unrelated processes open it by name, send and
receive; every message is delivered exactly once and each producer's
messages arrive in the order it sent them::

    import shmkit
    ch = shmkit.Channel("logs", capacity=8 << 20)   # create or open
    ch.send(b"record", timeout=1.0)                  # blocks while full
    msg = ch.recv(timeout=1.0)                       # blocks while empty
    ch.send_many([b"a", b"b"]); ch.recv_many(max_n=1024, timeout=0.1)
    for msg in ch:                                   # ends once drained after
        ...                                          # ch.close_sending()
    ch.close()                                       # this handle only

Large messages need not be copied out: ``with ch.recv_view() as mv:`` lends
the message in place, and ``send`` takes any buffer (a numpy array) as is.

:class:`Queue` carries Python objects (pickled, as ``multiprocessing``
does) with the ``multiprocessing.Queue`` interface; objects of any size:
big buffers travel out of band, in a payload file mapped by the receiver.

The hot path is C (``_core/ring.c``); the protocol, the crash analysis and
the waiting strategy are described in docs/channel.md.
"""

from __future__ import annotations

import _signal
import atexit
import errno
import functools
import io
import os
import pickle
import re
import stat
import struct
import threading
import time
import types
import weakref
from typing import Any, Callable, Iterator

from ._arrays import received_array
from . import _core
from ._object import DEFAULT, SharedObject, attach_segment, check_common, given, mismatch
from .errors import (
    ChannelClosed,
    ClosedError,
    CorruptError,
    Empty,
    FormatVersionError,
    Full,
    MessageTooLarge,
    NotFoundError,
    OutOfSpaceError,
    ShmkitError,
    SizeLimitError,
    Timeout,
    UntrustedError,
    WouldBlock,
)
from .segment import (
    DEFAULT_MAX_ATTACH,
    PAGE,
    SHM_DIR,
    Kind,
    Segment,
    SegmentInfo,
    _check_trust,
    _limit_error,
    _link_new,
    _new_file,
    at_fork_in_child,
    check_max_attach,
)

__all__ = ["Channel", "Queue"]



FORMAT = _core.RING_FORMAT
DEFAULT_CAPACITY = 1 << 20
QUEUE_CAPACITY = 8 << 20
_MAX_QUEUE_ITEMS = 1 << 46  # no ring (at most 64 TiB) holds more messages
_ROLES_OFF = _core.layouts["ring"]["roles"]  # ring header size: see _core/ring.h


def _ring_bytes(capacity: int, max_attach: int) -> int:
    return (_ROLES_OFF + 8 * max_attach + 63) // 64 * 64 + capacity


# -- Queue: big buffers out of band ------------------------------------------------
#
# A Queue message in the ring is either a plain pickle (it starts with the
# PROTO opcode 0x80) or, when the object holds big buffers, an out-of-band
# header (it starts with a 0 byte, which no pickle does) naming a payload file
# beside the queue's file that holds those buffers, and the pickle itself too
# when it is big.  See docs/channel.md, "Big objects".
#
# Ring message of an out-of-band object (native byte order):
#    0  magic       8  _OOB_MAGIC
#    8  nbufs       u32  out-of-band buffers
#   12  flags       u32  bit 0: the pickle is in the payload file;
#                        bit 1: pooled, its sender keeps the name for reuse
#   16  size        u64  payload file bytes
#   24  pickle_off  u64  offset of the pickle in the file (flag set)
#   32  pickle_len  u64  pickle bytes
#   40  token       16   the payload file's name suffix (hex)
#   56  nbufs x (offset u64, length u64) of each buffer in the file
#   ..  the pickle, when it is not in the file
# Payload file "<queue file>~oob.<token>" (mode 0600):
#    0  magic 8 _FILE_MAGIC, version u32, 4 spare, size u64, token 16
#   64  state u32  of a pooled file: _FREE, _SENT (a message names it, or its
#                  sender is writing it), _HELD (its receiver has it mapped),
#                  _DROPPED (its sender let it go; receivers unmap it),
#                  _ORPHANED (its sender closed while a message names it:
#                  its receiver takes it as its own)
#  4096 the buffers (and the pickle), each at a page boundary
# Everything in both is checked before use: they come from shared memory.

#: Buffers (numpy arrays, bytearrays, PickleBuffers) of at least this many
#: bytes leave the ring, and so does a pickle of at least this many bytes.
OOB_THRESHOLD = 256 << 10
_OOB_MAGIC = b"\x00SHMOOB\x01"
_FILE_MAGIC = b"\x89SHMOOB\x00"
_OOB_VERSION = 2  # 2: the state word of pooled files
_OOB_HEAD = struct.Struct("=8sIIQQQ16s")
_OOB_BUF = struct.Struct("=QQ")
_FILE_HEAD = struct.Struct("=8sI4xQ16s")
_STATE = struct.Struct("=I")
_OOB_SEP = "~oob."
_TOKEN_RE = re.compile(rb"[0-9a-f]{16}")
_IOV_MAX = 512
_WRITE_MAX = 1 << 30  # bytes per pwritev call (Linux writes at most 2 GiB - 4 KiB)
#: A payload no message in its queue's ring names, and that no sender holds,
#: is removed by ``shmkit gc`` once its file is this old (seconds): a receiver
#: opens the payload of a message it took at once, well within this time.
PAYLOAD_GRACE = 60.0
#: Bytes of payload files a sending Queue handle keeps mapped for reuse
#: (``Queue(payload_pool=...)``): writing into a file whose pages exist and
#: are mapped costs a copy; a new file costs a page allocation per 4 KiB too.
PAYLOAD_POOL = 256 << 20
_STATE_OFF = 64
_FREE, _SENT, _HELD, _DROPPED, _ORPHANED = 0, 1, 2, 3, 4
_IN_FILE, _POOLED = 1, 2
_LET_GO = (_STATE.pack(_FREE), _STATE.pack(_DROPPED))  # no message names these
_HELD_LONG = 1.0  # seconds: a pooled file held this long is let go when room is needed
_COPY_CHUNK = 1 << 20  # bytes copied per step, so other threads get the GIL between


def _payload_prefix(queue_path: str) -> tuple[str, str]:
    """``(directory, file name prefix)`` of a queue's payload files."""
    return os.path.dirname(queue_path), os.path.basename(queue_path) + _OOB_SEP


def _payload_files(queue_path: str) -> list[str]:
    """Paths of the payload files of the queue at ``queue_path``."""
    directory, prefix = _payload_prefix(queue_path)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, e) for e in entries
            if e.startswith(prefix) and _TOKEN_RE.fullmatch(e[len(prefix):].encode())]


def _open_file(path: str, writable: bool = True) -> io.FileIO:
    """Open ``path`` (no symbolic link followed, a FIFO not waited for) as a
    file object that closes it when dropped.  The core opens it for FileIO,
    which holds it before any Python runs: a Ctrl-C cannot leave it open."""
    return io.FileIO(path, "r+b" if writable else "rb", opener=_core.opener)


def _is_payload_of(fd: int, path: str) -> bool:
    """Whether the file open at ``fd`` is the payload file named ``path``: its
    magic, and the token its name ends with.  A ``path=`` object may be named
    like one (``a~oob.<16 hex>`` beside ``a``); a sender links only whole
    files, so a payload file always has both."""
    head = os.pread(fd, _FILE_HEAD.size, 0)
    return (len(head) == _FILE_HEAD.size and head[:8] == _FILE_MAGIC
            and _FILE_HEAD.unpack(head)[3] == path[-16:].encode())


def _remove_payloads(queue_path: str) -> int:
    """Remove every payload file of a queue whose name is gone; returns how many.
    A regular file at such a name is removed only if it is a payload file
    (``_is_payload_of``).  Anything else there (a FIFO, a symbolic link) was
    planted."""
    n = 0
    for path in _payload_files(queue_path):
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                with _open_file(path, writable=False) as file:
                    if not _is_payload_of(file.fileno(), path):
                        continue
            os.unlink(path)
            n += 1
        except OSError:
            pass  # gone meanwhile, unreadable, or another user's (not ours to remove)
    return n


class _Outgoing:
    """A payload file being sent: open and locked (byte 0) until the message
    naming it is committed, so that ``shmkit gc`` leaves it alone meanwhile.
    ``owner``, a mapping of its header page, owns the descriptor: dropped,
    it closes the file."""

    __slots__ = ("fd", "owner", "path")

    def __init__(self, fd: int, owner: Any, path: str) -> None:
        self.fd, self.owner, self.path = fd, owner, path

    def sent(self) -> None:
        """The message is in the ring: the receiver owns the file now."""
        self.owner.detach(self.fd)  # closes the file (a second call does nothing)

    def unsent(self) -> None:
        """The ring refused the message: remove the file."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sent()


def _write_all(fd: int, parts: list[tuple[int, Any]], what: str) -> None:
    """Write each ``(offset, buffer)`` into ``fd``, contiguous runs in one pwritev."""
    try:
        for off, buf in parts:
            view = memoryview(buf).cast("B")
            done = 0
            while done < view.nbytes:
                chunk = view[done:done + _WRITE_MAX]
                n = os.pwritev(fd, [chunk], off + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpaceError(
                f"no room to store {what} ({e.strerror}); free some (shmkit ls / "
                "shmkit gc), or send smaller objects") from None
        if e.errno == errno.EFBIG:
            raise SizeLimitError(f"{what} is larger than a file may be here "
                                 f"({e.strerror}); send smaller objects") from None
        raise


def _create_payload(queue_path: str, size: int, parts: list[tuple[int, Any]],
                    what: str, whole: bool, mode: int, group: int
                    ) -> tuple[_Outgoing, bytes]:
    """Write a payload file of ``size`` bytes; return it open and locked, and its token.
    ``whole``: map all of it, for a pool to keep (its ``owner.reserve`` is
    then ``size``), unless there is no address space for that.  ``mode``
    and ``group``: the queue file's, so that whoever may use the queue may
    read its payload files (and its owner always may).

    A sender killed at any point leaves nothing, a temporary file of a dead
    process, or a complete file that no live process holds: ``shmkit gc``
    removes the last two (the last only if no message names it).
    """
    directory, prefix = _payload_prefix(queue_path)
    try:
        vfs = os.statvfs(directory)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = None
    if free is not None and size > free:
        raise OutOfSpaceError(
            f"{what} needs {size} bytes of shared memory but {directory} has {free} free; "
            "free some (shmkit ls / shmkit gc), enlarge it, or send smaller objects")
    token = os.urandom(8).hex().encode()
    path = os.path.join(directory, prefix + token.decode())
    # Made as segments are (`_new_file`: no name yet, its lock on byte 0
    # held, a mapping owning the descriptor, listed as private until sent,
    # so that no forked child keeps it), written, then linked into place
    # whole.  Only the header page is allocated: the writes allocate the
    # rest (allocating it all first cost 5% at 64 MiB).  Only a file for the
    # pool is mapped whole: an object's own needs no address space.
    try:
        fd, owner = _new_file(path, what, mode, PAGE, size if whole else PAGE, True)
    except OutOfSpaceError:
        if not whole:
            raise
        # no address space to keep it mapped: a file of its own (or, out of
        # room, the same error again)
        fd, owner = _new_file(path, what, mode, PAGE, PAGE, True)
    try:
        if group != os.getegid():
            try:  # the queue file's group, for a group it is shared with
                os.fchown(fd, -1, group)
            except PermissionError:
                pass  # not one of this user's groups: the group cannot read it
        head = _FILE_HEAD.pack(_FILE_MAGIC, _OOB_VERSION, size, token).ljust(
            _STATE_OFF, b"\0") + _STATE.pack(_SENT)
        _write_all(fd, [(0, head), *parts], what)
        # the last buffer may end short of the page-rounded size the message
        # names (and the receiver checks): the file is that size, whole
        os.ftruncate(fd, size)
        if owner.reserve == size:
            owner.set_length(size)
        try:
            _link_new(fd, owner, path)
        except OSError as e:
            raise _limit_error(e, f"store {what}") from None
        return _Outgoing(fd, owner, path), token
    except BaseException:
        owner.detach(fd)  # the file goes with it (and its hidden name), unless linked
        raise


class _PoolFile:
    """One payload file of a pool: open (holding the lock on byte 0 that tells
    ``shmkit gc`` and receivers a live sender keeps it) and mapped whole, the
    mapping (``mem``, made with the file) owning the descriptor."""

    __slots__ = ("fd", "path", "token", "size", "mem")

    def __init__(self, out: _Outgoing, token: bytes, size: int) -> None:
        self.fd, self.mem, self.path = out.fd, out.owner, out.path
        self.token, self.size = token, size

    def let_go(self) -> None:
        """Unmap and close the file (its lock goes with it), in one step."""
        self.mem.detach(self.fd)

    def state(self) -> int:
        return _core.load32(self.mem, _STATE_OFF)

    def drop(self, unlink: bool) -> None:
        """Leave the pool; remove the name too when ``unlink`` (receivers that
        mapped it keep their pages until their views go, then unmap it)."""
        _core.store32(self.mem, _STATE_OFF, _DROPPED)
        if unlink and _same_file(self.path, os.fstat(self.fd)):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.let_go()


class _PayloadPool:
    """The payload files one sending handle keeps for reuse, up to ``limit`` bytes.

    A pooled file's state word says who has it: ``_FREE`` (the sender may
    reuse it), ``_SENT`` (the sender is writing it, or a message names it),
    ``_HELD`` (its receiver has it mapped) or ``_DROPPED`` (the sender let it
    go).  Every change is a compare-and-swap but the sender's drop: the
    sender claims a free file, the receiver marks it held once the object
    is its own, and free again once the last view of that mapping is gone
    (``Mapping.claim_word``, one step), so bytes a receiver still sees are
    never rewritten.
    The sender's lock on byte 0 lasts as long as the file is pooled: a
    receiver that frees a file nobody holds removes it, and so does the next
    sender that starts a file (``_sweep``), and ``shmkit gc``.
    """

    def __init__(self, queue_path: str, limit: int) -> None:
        self.queue_path, self.limit = queue_path, limit
        self.files: list[_PoolFile] = []
        self.lock = threading.Lock()
        self.swept = False
        self.ref = ref = weakref.ref(self, _forget_pool)
        _pools[id(ref)] = ref

    def forked(self) -> None:
        """In a forked child: let go of the parent's files here (our copies of
        its descriptors, which would keep its locks held, and of its mappings,
        which would keep pages it drops)."""
        self.lock = threading.Lock()
        files, self.files = self.files, []
        for f in files:
            # (not close(): a view a writing thread held, which the child
            # does not have, would keep the file mapped for ever)
            f.mem.abandon()

    def _pruned(self) -> list[_PoolFile]:
        """``files`` (the lock held), without those already let go: a file
        leaves the list only after it is let go (so that a child forked
        meanwhile lets it go too), and a Ctrl-C may land between the two."""
        self.files = [f for f in self.files if not f.mem.closed]
        return self.files

    def take(self, size: int) -> _PoolFile | None:
        """A free pooled file of ``size`` to ``2 * size`` bytes, now ``_SENT``."""
        with self.lock:
            for f in self._pruned():
                if size <= f.size <= 2 * size and _core.cas32(f.mem, _STATE_OFF, _FREE, _SENT):
                    if os.fstat(f.fd).st_nlink:
                        os.utime(f.fd)  # its age is what gc's grace measures
                        return f
                    f.drop(False)  # removed by Queue.unlink(): forget it
                    self.files.remove(f)
                    return None
        return None

    def room(self, size: int) -> bool:
        """Whether a new file of ``size`` bytes may join, after letting go of
        files that did not fit (free ones), of files held for over
        ``_HELD_LONG`` seconds since their receiver took them (it keeps its
        own mapping: a receiver that keeps an object, or died holding it),
        and of files that no queued message names and no receiver took
        within ``PAYLOAD_GRACE`` (it died in between).  What counts is the
        bytes the files carry (their header pages aside): a 256 MiB pool
        takes four 64 MiB arrays."""
        need = size - PAGE
        if need > self.limit:
            return False
        with self.lock:
            used = sum(f.size - PAGE for f in self._pruned())
            for f in list(self.files):
                if used + need <= self.limit:
                    break
                st, age = f.state(), time.time() - os.fstat(f.fd).st_mtime
                if ((st == _FREE and _core.cas32(f.mem, _STATE_OFF, _FREE, _SENT))
                        or (st == _HELD and age > _HELD_LONG)
                        or (st != _FREE and age > PAYLOAD_GRACE and self._unnamed(f))):
                    f.drop(True)  # still in the list: a child forked meanwhile lets it go
                    self.files.remove(f)
                    used -= f.size - PAGE
            return used + need <= self.limit

    def _unnamed(self, f: _PoolFile) -> bool:
        """Whether no queued message names ``f`` (sent, or in a state no live
        receiver left it in, long ago): its receiver died before marking it
        held, as gc's rule for unnamed payloads has it."""
        ring = _ring_bytes_of(self.queue_path)
        return ring is None or f.token not in ring

    def add(self, f: _PoolFile) -> None:
        with self.lock:
            self.files.append(f)

    def close(self) -> None:
        """Remove the names of files no message names; a file still in flight
        is left to its receiver, which removes it once done (nobody holds it)."""
        with self.lock:  # the files stay listed until let go (see forked)
            for f in self._pruned():
                if _core.cas32(f.mem, _STATE_OFF, _SENT, _ORPHANED):
                    # a message names it: its receiver takes it as its own (its
                    # swap to held fails on this state), or gc once none does
                    f.let_go()
                else:
                    f.drop(True)  # free, or held: its receiver has what it needs
            self.files = []


class _PooledOutgoing:
    """A pooled payload file being sent (see :class:`_Outgoing`)."""

    __slots__ = ("file",)

    def __init__(self, f: _PoolFile) -> None:
        self.file = f

    def sent(self) -> None:
        pass  # _SENT until its receiver hands it back

    def unsent(self) -> None:
        _core.store32(self.file.mem, _STATE_OFF, _FREE)


def _sweep(queue_path: str) -> None:
    """Remove the queue's free payload files that no sender holds any more
    (left by a sender that exited without closing, or was killed)."""
    for path in _payload_files(queue_path):
        _remove_if_let_go(path)


def _remove_if_let_go(path: str, key: tuple[int, int] | None = None,
                      hand_back: bool = False) -> None:
    """Open the payload file at ``path`` and remove it if it was let go (see
    :func:`_remove_let_go`); ``key``: only if it is still that (device,
    inode), else only a regular file of ours.  ``hand_back``: mark it free
    first (a receiver that copied the object out, keeping no mapping), so
    that it stays for its sender to reuse, or goes if no sender holds it."""
    try:
        file = _open_file(path)
    except OSError as e:
        if _raised_by_a_signal_handler(e):  # (an alarm's TimeoutError is the caller's)
            raise
        return  # removed meanwhile: nothing to do
    with file:
        try:
            fd = file.fileno()
            st = os.fstat(fd)
            if ((st.st_dev, st.st_ino) == key if key is not None else
                    stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                    and st.st_size >= PAGE):
                if hand_back:
                    os.pwrite(fd, _STATE.pack(_FREE), _STATE_OFF)
                _remove_let_go(fd, path, st)
        except OSError as e:
            if _raised_by_a_signal_handler(e):
                raise


def _pooled_write(f: _PoolFile, parts: list[tuple[int, Any]]) -> None:
    """Copy each ``(offset, buffer)`` into the mapped file ``f``."""
    dst = memoryview(f.mem)
    try:
        for off, buf in parts:
            src = memoryview(buf).cast("B")
            for at in range(0, src.nbytes, _COPY_CHUNK):
                piece = src[at:at + _COPY_CHUNK]
                dst[off + at:off + at + piece.nbytes] = piece
    finally:
        dst.release()


def _is_pooled_format(fd: int) -> bool:
    """Whether the payload file open at ``fd`` has the state word (format 2)."""
    head = os.pread(fd, _FILE_HEAD.size, 0)
    return (len(head) == _FILE_HEAD.size and head[:8] == _FILE_MAGIC
            and _FILE_HEAD.unpack(head)[1] == _OOB_VERSION)


def _let_go(fd: int) -> bool:
    """Whether the payload file open at ``fd`` is a pooled file (format 2)
    whose state says no message names it: free or dropped."""
    return _is_pooled_format(fd) and os.pread(fd, _STATE.size, _STATE_OFF) in _LET_GO


def _remove_let_go(fd: int, path: str, st: os.stat_result) -> bool:
    """Remove the pooled payload file open at ``fd`` if no sender holds it
    (its lock, taken here), its state says no message names it, and no
    queued message does (read after the lock, as gc does: a damaged state
    word must not cost a queued object); mark it dropped first, so that
    receivers that keep a mapping of it let go too."""
    if not (_core.ofd_lock(fd, 0, 1) and _let_go(fd)):
        return False
    directory, entry = os.path.split(path)
    qfile, _, token = entry.rpartition(_OOB_SEP)
    ring = _ring_bytes_of(os.path.join(directory, qfile))
    if (ring is not None and token.encode() in ring) or not _same_file(path, st):
        return False
    os.pwrite(fd, _STATE.pack(_DROPPED), _STATE_OFF)
    os.unlink(path)
    return True


class _Received:
    """Mappings of pooled payload files this process received, kept (up to
    ``files`` of them and ``nbytes``) for the next object in the same file:
    mapping a file again faults in each of its pages once more (about half a
    microsecond per 4 KiB here), which is most of a big receive.

    A mapping hands its file back (state free) by itself once the last view
    of an object is released (``Mapping.claim_word``), and is unmapped
    at this process's next big receive once its sender dropped it, or when
    a handle of its queue closes and no object uses it.  One that
    leaves the cache is unmapped, and its file removed if it is free and no
    sender holds it any more (its sender closed or died: nobody reuses it).
    A forked child starts with none (the parent's stay the parent's).
    """

    def __init__(self, files: int, nbytes: int) -> None:
        self.files, self.nbytes = files, nbytes
        self.maps: dict[tuple[int, int], tuple[str, Any]] = {}  # oldest first
        # re-entrant: a signal handler may get from a queue while this
        # thread's get holds it (so loops go over a copy, and entries may be
        # found gone: popped, not deleted)
        self.lock = threading.RLock()

    def view(self, path: str, fd: int, st: os.stat_result, size: int) -> memoryview:
        """A view of the whole file, through the kept mapping when it is idle,
        else a new one that is kept.  The view is made under the lock, so no
        other thread's eviction can unmap it in between.  OSError (ENOMEM:
        no mapping left) as from ``Mapping``."""
        key = (st.st_dev, st.st_ino)
        gone: list[tuple[str, tuple[int, int], Any]] = []
        with self.lock:
            self._unmap_dropped()
            entry = self.maps.pop(key, None)
            if entry is not None:
                mem = entry[1]
                if entry[0] != path or mem.closed or mem.exports or mem.length != size:
                    entry = None  # not reused: its own views keep it as long as needed
            if entry is None:
                mem = _core.Mapping(fd, size, size)
                entry = (path, mem)
            view = memoryview(mem)
            self.maps[key] = entry  # the most recent now
            total = sum(m.length - PAGE for _, m in list(self.maps.values()))
            for k, (p, m) in list(self.maps.items()):
                if len(self.maps) <= self.files and total <= self.nbytes:
                    break
                if not m.exports and self.maps.pop(k, None) is not None:
                    total -= m.length - PAGE
                    gone.append((p, k, m))
        for p, k, m in gone:
            self._forget(p, k, m)
        return view

    def tidy(self) -> None:
        """Unmap the idle mappings whose senders let their files go."""
        if self.maps:
            with self.lock:
                self._unmap_dropped()

    def _unmap_dropped(self) -> None:
        """Unmap the idle mappings whose senders let their files go (lock held):
        only this cache still kept their pages."""
        for key, (_p, m) in list(self.maps.items()):
            if m.closed or (not m.exports
                            and _core.load32(m, _STATE_OFF) in (_DROPPED, _ORPHANED)):
                self.maps.pop(key, None)
                m.close()

    def let_go_of(self, queue_path: str) -> None:
        """Unmap the idle mappings of one queue's payload files: a handle of
        it closed (one a received object still uses stays, and hands its
        file back when the object goes)."""
        prefix = queue_path + _OOB_SEP
        with self.lock:
            gone = [(p, k, m) for k, (p, m) in list(self.maps.items())
                    if p.startswith(prefix) and not m.exports]
            for _p, k, _m in gone:
                self.maps.pop(k, None)
        for p, k, m in gone:
            self._forget(p, k, m)

    def clear(self) -> None:
        with self.lock:
            maps, self.maps = self.maps, {}
        for key, (p, m) in maps.items():
            self._forget(p, key, m)

    def forked(self) -> None:
        """In a forked child: the parent's mappings are not ours to keep."""
        self.lock = threading.RLock()
        maps, self.maps = self.maps, {}
        for _p, m in maps.values():
            m.close()  # unmapped now, or when the child's inherited views go

    @staticmethod
    def _forget(path: str, key: tuple[int, int], mem: Any) -> None:
        free = not mem.closed and not mem.exports and (
            _core.load32(mem, _STATE_OFF) == _FREE)
        mem.close()
        if free:
            _remove_if_let_go(path, key)


_received = _Received(16, PAYLOAD_POOL)
atexit.register(_received.clear)
# Every payload pool of this process, for the child's fork hook: keyed by
# the id of its weak reference, whose callback (C: no line of Python for a
# Ctrl-C to stop, as a WeakSet's would have) removes it when the pool goes.
_pools: "dict[int, weakref.ref[_PayloadPool]]" = {}
_forget_pool = _core.forgetter(_pools)


def _after_fork_in_child() -> None:
    for ref in list(_pools.values()):
        pool = ref()
        if pool is not None:
            pool.forked()
    _received.forked()


at_fork_in_child(_after_fork_in_child)


class _BigBuffer(Exception):
    """Raised by :func:`_in_band` at the first big buffer: pickle again, out of band."""


def _in_band(pb: pickle.PickleBuffer) -> bool:
    # The callback of the first, plain pickling (no closure to make per put).
    try:
        n = pb.raw().nbytes
    except BufferError:
        return True
    if n >= OOB_THRESHOLD:
        raise _BigBuffer
    return True


_dumps = pickle.dumps
_loads = pickle.loads


def _pack(obj: Any, queue_path: str, max_message: int, name: str, queue: Any,
          data: bytes | None = None, pool: _PayloadPool | None = None,
          ) -> tuple[bytes, _Outgoing | _PooledOutgoing | None]:
    """Pickle ``obj`` for the ring: ``(message, None)`` for a small object;
    for a big one, the out-of-band header and the payload file holding its
    big buffers (one copy each, straight from the object's memory).
    ``queue``: the queue's mapping, whose file's mode and group a new payload
    file takes.
    ``data``: ``obj`` already pickled in band, holding no big buffer.
    ``pool``: the sending handle's payload pool, reused and filled if given."""
    bufs: list[memoryview] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:
            return True  # not contiguous: in band (pickle then says why it cannot)
        if raw.nbytes < OOB_THRESHOLD:
            return True
        bufs.append(raw)
        return False

    if data is None:
        data = pickle.dumps(obj, 5, buffer_callback=out_of_band)
    if not bufs and len(data) < OOB_THRESHOLD and len(data) <= max_message:
        return data, None
    table_bytes = _OOB_HEAD.size + _OOB_BUF.size * len(bufs)
    pickle_in_file = len(data) >= OOB_THRESHOLD or table_bytes + len(data) > max_message
    parts: list[tuple[int, Any]] = []
    table = []
    off = PAGE
    for b in bufs:
        parts.append((off, b))
        table.append(_OOB_BUF.pack(off, b.nbytes))
        off = (off + b.nbytes + PAGE - 1) // PAGE * PAGE
    poff = 0
    if pickle_in_file:
        poff = off
        parts.append((off, data))
        off += len(data)
    size = off
    flags = _IN_FILE if pickle_in_file else 0
    out: _Outgoing | _PooledOutgoing
    f = pool.take(size) if pool is not None else None
    if f is not None:
        try:
            _pooled_write(f, parts)
        except BaseException:
            _core.store32(f.mem, _STATE_OFF, _FREE)
            raise
        out, token, size, flags = _PooledOutgoing(f), f.token, f.size, flags | _POOLED
    else:
        what = f"an object of {size} bytes for queue {name!r}"
        keep = pool is not None and pool.room(size)
        if keep and not pool.swept:  # type: ignore[union-attr]
            pool.swept = True  # type: ignore[union-attr]
            _sweep(queue_path)
        mode, group = _core.file_access(queue)
        out, token = _create_payload(queue_path, size, parts, what, keep,
                                     mode & 0o777 | 0o600, group)
        if keep and out.owner.reserve == size:  # (else no address space: its own)
            f = _PoolFile(out, token, size)
            pool.add(f)  # type: ignore[union-attr]
            # listed until now, so that a child forked meanwhile let it go;
            # from now on the pool's forked() does
            f.mem.end_creation()
            out, flags = _PooledOutgoing(f), flags | _POOLED
    head = _OOB_HEAD.pack(_OOB_MAGIC, len(bufs), flags, size, poff, len(data), token)
    return b"".join([head, *table, b"" if pickle_in_file else data]), out


def _lost(name: str, why: str) -> str:
    return (f"queue {name!r}: the object just taken is lost: {why}. The queue goes on; "
            "the next get() returns the next object")


def _handler_code(handler: Any) -> Any:
    """The code object a Python signal handler runs (None for the default
    ones, which are C): a function's, a bound method's, a partial's, or a
    callable object's ``__call__``'s.  Only types and the classes' own
    attributes are read, so none of the handler's own code runs here."""
    for _ in range(8):  # (a partial of a bound method...)
        kind = type(handler)
        if kind is types.FunctionType:
            return handler.__code__
        if kind is types.MethodType:
            handler = handler.__func__
        elif kind is functools.partial:
            handler = handler.func
        else:
            call = None
            for cls in _MRO.__get__(kind, type):
                call = _CLASS_DICT.__get__(cls, type).get("__call__")
                if call is not None:
                    break
            if type(call) is not types.FunctionType:
                return None  # a builtin (the default handlers), SIG_DFL, SIG_IGN, None
            handler = call
    return None


# Read through their own descriptors: the attribute lookups of an exception's
# or a handler's class may do anything (raise, loop, hide).
_TRACEBACK: Any = BaseException.__dict__["__traceback__"]
_CONTEXT: Any = BaseException.__dict__["__context__"]
_MRO: Any = type.__dict__["__mro__"]
_CLASS_DICT: Any = type.__dict__["__dict__"]


def _raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Whether a Python signal handler raised ``exc`` (or what it is the
    context of): one of the frames on its way is a handler's.  Its class
    does not tell: an alarm's handler may raise a TimeoutError, or any error
    a rebuild could raise.  Asked only when a rebuild failed; a rebuild
    that a handler stopped is not the object's fault, and gives it back.
    Runs no code of the exception's or the handlers' classes, and catches
    nothing: what a handler raises in here is the caller's."""
    codes = set()
    for signum in _signal.valid_signals():  # (the C module's: no Python frame)
        code = _handler_code(_signal.getsignal(signum))
        if code is not None:
            codes.add(code)
    for _ in range(16):  # (an exception and what it was raised in)
        if not codes or not isinstance(exc, BaseException):
            return False
        tb = _TRACEBACK.__get__(exc, BaseException)
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                return True
            tb = tb.tb_next
        exc = _CONTEXT.__get__(exc, BaseException)
    return False


def _unpack(queue_path: str, name: str, trust_uid: int | None, data: bytes,
            at_fault: list[Callable[[], Any] | None]) -> tuple[Any, Callable[[], Any] | None]:
    """Rebuild an object from its ring message (see :func:`_pack`), while the
    message is still in the channel (``Queue.get``, the core's
    ``decode_lent``): ``(object, after)``.

    Nothing another process sees changes here but for files found damaged
    (their message is lost anyway): an interrupt here leaves the message,
    and the file it names, as they were, for the channel to give out again.
    What takes the file once the object is ours, ``after``, is a call of
    the core made right after the message is finished: a pooled file is
    marked held (free once the object's views are gone), and a file now
    only ours is removed.

    An ``Exception`` is the message's fault, which finishes it (lost), when
    the unpickling raised it (``after``, the file's let-go, is then appended
    to ``at_fault``, a list the core made for this call; not when a signal
    handler raised it there: :func:`_raised_by_a_signal_handler`), when a
    check here found the file missing, damaged or not to be
    trusted (``None`` is appended just before the verdict is raised), or
    when it is a :class:`MemoryError` (an object too big for this process
    must not stop the queue).  The core gives the message back on any
    other: what a signal handler raised on the way (a ``TimeoutError`` from
    an alarm's handler, a ``shmkit.Timeout``...), this process running out
    of descriptors, an ``OSError`` of a step, and an interrupt; a hundred
    times for one message at most, but for a KeyboardInterrupt.
    """
    if not data.startswith(_OOB_MAGIC):
        try:
            return pickle.loads(data), None
        except BaseException as e:
            if not _raised_by_a_signal_handler(e):
                at_fault.append(None)
            raise
    if len(data) < _OOB_HEAD.size:
        raise _lost_error(at_fault, CorruptError, name,
                          f"its message holds only {len(data)} bytes")
    _m, nbufs, flags, size, poff, plen, token = _OOB_HEAD.unpack_from(data)
    table_end = _OOB_HEAD.size + _OOB_BUF.size * nbufs
    if (not _TOKEN_RE.fullmatch(token) or flags > (_IN_FILE | _POOLED) or size < PAGE
            or table_end > len(data)):
        raise _lost_error(at_fault, CorruptError, name, "its out-of-band header is damaged")
    bufs = [_OOB_BUF.unpack_from(data, _OOB_HEAD.size + _OOB_BUF.size * i)
            for i in range(nbufs)]
    in_file, pooled = bool(flags & _IN_FILE), bool(flags & _POOLED)
    if in_file:
        bufs_check = [*bufs, (poff, plen)]
    else:
        bufs_check = bufs
        if len(data) - table_end != plen:
            raise _lost_error(at_fault, CorruptError, name, "its out-of-band header is damaged")
    for off, n in bufs_check:
        if off < PAGE or off > size or n > size - off:
            raise _lost_error(at_fault, CorruptError, name, f"its message names bytes "
                              f"{off}..{off + n} of a {size}-byte payload")
    directory, prefix = _payload_prefix(queue_path)
    path = os.path.join(directory, prefix + token.decode())
    where = f"payload {os.path.basename(path)!r} of queue {name!r}"
    try:
        file = _open_file(path)
    except OSError as e:
        if _raised_by_a_signal_handler(e):
            raise  # (a handler's, not the file's: given back)
        if isinstance(e, FileNotFoundError):
            raise _lost_error(at_fault, NotFoundError, name, f"its payload file {path} is gone "
                              "(the queue was removed, or `shmkit gc` found it orphaned)"
                              ) from None
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV):
            # as a FIFO, which opens and which the owner check refuses
            raise _lost_error(at_fault, UntrustedError, name, f"{path} is not a regular file "
                              f"({e.strerror}); refusing to read it") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise _lost_error(at_fault, UntrustedError, name, f"{path} cannot be read here "
                              f"({e.strerror}): another user's file, or its mode forbids it"
                              ) from None
        # this process's want (descriptors, memory): the message goes back
        raise _limit_error(e, f"open {where}") from None
    with file:
        fd = file.fileno()
        st = os.fstat(fd)
        try:
            _check_trust(st, where, path, trust_uid)  # before reading a byte
        except UntrustedError as e:
            raise _lost_error(at_fault, UntrustedError, name, str(e)) from None
        mine = _same_file(path, st)
        # A damaged file is removed (if ours) once the core is told: the
        # message is lost whatever comes during the removal.
        if st.st_size != size:
            error = _lost_error(at_fault, CorruptError, name, f"{path} holds {st.st_size} "
                                f"bytes, not the {size} its message names")
            if mine:
                _unlink_damaged(path)
            raise error
        head = os.pread(fd, _FILE_HEAD.size, 0)
        if head != _FILE_HEAD.pack(_FILE_MAGIC, _OOB_VERSION, size, token):
            whole = head[:8] == _FILE_MAGIC and len(head) == _FILE_HEAD.size
            version = _FILE_HEAD.unpack(head)[1] if whole else _OOB_VERSION
            if version != _OOB_VERSION:
                error = _lost_error(at_fault, FormatVersionError, name,
                                    f"{path} is payload format {version}, this shmkit reads "
                                    f"{_OOB_VERSION}: its sender runs another shmkit "
                                    "version; run the same version on both sides")
            else:
                error = _lost_error(at_fault, CorruptError, name, f"{path} does not hold "
                                    "the payload its message names (bad header)")
            if mine:
                _unlink_damaged(path)
            raise error
        if pooled and not _core.ofd_held(fd, 0, 1):
            pooled = False  # its sender closed or died: nobody reuses it, ours now
        if not pooled:
            _received.tidy()  # (a pooled receive tidies as it looks the file up)
        view: memoryview | None = None
        mem: Any = None
        after: Callable[[], Any] | None = None
        hand_back = False
        if pooled:
            try:
                view = _received.view(path, fd, st, size)
            except OSError as e:
                if e.errno != errno.ENOMEM:
                    raise
                hand_back = True  # copied out below: free at once
            else:
                mem = view.obj
                state = _core.load32(mem, _STATE_OFF)
                if state == _SENT:
                    # Read as it is: its sender rewrites no file a message
                    # names, and the message stays ours while we read.  Once
                    # the object is ours, the file is held, and free again
                    # (for its sender to reuse) when the views made from
                    # this mapping are all gone; or ours to remove, if its
                    # sender closed meanwhile.
                    after = functools.partial(mem.claim_word, _STATE_OFF, _SENT, _HELD, _FREE,
                                              _ORPHANED, os.fsencode(path), st.st_dev,
                                              st.st_ino)
                    try:
                        os.utime(fd)  # held since now (what the sender's _HELD_LONG measures)
                    except OSError as e:
                        if _raised_by_a_signal_handler(e):  # the caller's, not ignored
                            raise
                else:
                    view.release()
                    view = None
                    # its sender closed while this message was queued: ours
                    # now.  Any other state is not that of a file just sent:
                    # its sender might rewrite it under us, so copy it out.
                    pooled = state != _ORPHANED
        if view is None:
            mem = None
            if not (hand_back or pooled):  # (a pooled file we cannot trust: copied)
                try:
                    mem = _core.Mapping(fd, size, size)
                except OSError as e:
                    if e.errno != errno.ENOMEM:
                        raise
            if mem is None:
                # No mapping left in this process (vm.max_map_count), or a
                # pooled file in a state we cannot trust: copy out.
                mem = bytearray(size)
                if os.preadv(fd, [mem], 0) != size:
                    raise _lost_error(at_fault, CorruptError, name,
                                      f"{path} was cut short while read") from None
            view = memoryview(mem)
            if hand_back:
                # (the rare case of no address space left.)  Its sender may
                # reuse the file from now on: the message must not be given
                # back after this, so whatever stops the rebuild now loses
                # the object (an interrupt too, save a KeyboardInterrupt,
                # which the core always gives back).
                at_fault.append(None)
                _remove_if_let_go(path, (st.st_dev, st.st_ino), hand_back=True)
            elif mine and not pooled:
                # Ours once the object is: nobody else will ever open it.
                after = functools.partial(os.unlink, path)
    buffers = [view[off:off + n] for off, n in bufs]
    blob = view[poff:poff + plen] if in_file else memoryview(data)[table_end:]
    try:
        obj = pickle.loads(blob, buffers=buffers)
    except BaseException as e:
        # Lost if it is the message's fault (the core's message_at_fault):
        # the core then lets its file go as it would have once the object
        # was taken.  Not if a signal handler raised it, in Python code of
        # the rebuild (numpy's _frombuffer) or as loads returned.
        if not _raised_by_a_signal_handler(e):
            at_fault.append(after)
        raise
    finally:
        del blob, buffers, view
        if isinstance(mem, _core.Mapping) and not pooled:
            mem.close()  # unmapped now, or when the object's last buffer goes
    return obj, after


def _unlink_damaged(path: str) -> None:
    """Remove a damaged payload file, if this process may: one it may not
    (another user's, in a sticky /dev/shm) is left to its owner's `shmkit gc`;
    the verdict on the message stands either way."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _lost_error(at_fault: list[Callable[[], Any] | None], cls: type[ShmkitError], name: str,
                why: str) -> ShmkitError:
    """The verdict of one of `_unpack`'s checks that the payload file is at
    fault: the core is told first (``at_fault``), so that the message is
    finished and the object lost, not given back, whatever comes after."""
    at_fault.append(None)
    return cls(_lost(name, why))


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)


def orphan_payloads(dry_run: bool = False,
                    match: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Find (and unless ``dry_run`` remove) orphaned Queue payload files in /dev/shm.

    A payload file is orphaned when no sender holds it (the sender committed
    its message, or died) and either its queue no longer exists, or no
    message in its queue's ring names it and it is either a pooled file its
    receiver handed back (or its sender let go), or older than
    :data:`PAYLOAD_GRACE` (its receiver died between taking the message and
    opening the payload).  A payload a queued message names is never removed.
    ``match(queue name)`` limits the search.  Only your own files (root:
    everyone's).  Returns ``[{"name", "path", "reason", "removed"}]``.
    """
    from .segment import PREFIX

    out: list[dict[str, Any]] = []
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return out
    rings: dict[str, bytes | None] = {}
    euid = os.geteuid()
    for entry in entries:
        if not entry.startswith(PREFIX) or _OOB_SEP not in entry:
            continue
        qfile, _, token = entry.rpartition(_OOB_SEP)
        qname = qfile[len(PREFIX):]
        if not _TOKEN_RE.fullmatch(token.encode()) or (match is not None
                                                        and not match(qname)):
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            reason = _orphan_reason(path, os.path.join(SHM_DIR, qfile), token.encode(),
                                    rings, euid, dry_run)
        except FileNotFoundError:
            continue
        except OSError as e:
            out.append({"name": entry, "path": path, "reason": "queue payload",
                        "removed": False, "error": e.strerror or str(e)})
            continue
        if reason is not None:
            out.append({"name": entry, "path": path, "reason": reason,
                        "removed": not dry_run})
    return out


def _orphan_reason(path: str, qpath: str, token: bytes, rings: dict[str, bytes | None],
                   euid: int, dry_run: bool) -> str | None:
    # Anything but a regular file of ours (root: anyone's) is not ours to
    # judge, and is looked at before it is opened (and again once open, for
    # a swap): another user's payload (mode 0600) or a directory there must
    # not make gc fail for everyone.
    def ours(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and (euid == 0 or st.st_uid == euid)

    if not ours(os.lstat(path)):
        return None
    try:
        file = _open_file(path)
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
            return None  # swapped for a directory, a link or a FIFO meanwhile
        raise
    with file:
        fd = file.fileno()
        st = os.fstat(fd)
        if not ours(st):
            return None
        if not _core.ofd_lock(fd, 0, 1):
            return None  # its sender is at work, or keeps it for reuse
        if not _is_payload_of(fd, path):
            return None  # an object of its own (path=), named like a payload
        if qpath not in rings:
            rings[qpath] = _ring_bytes_of(qpath)
        ring = rings[qpath]
        if ring is None:
            reason = "payload of a queue that no longer exists"
        elif token in ring:
            return None  # a message may still name it
        elif _let_go(fd):
            # handed back by its receiver, or let go: only its sender would
            # reuse it, and no sender holds it (no age rule needed)
            reason = "pooled queue payload whose sender is gone"
        elif time.time() - st.st_mtime < PAYLOAD_GRACE:
            return None
        else:
            reason = ("queue payload no sender holds and no queued message names "
                      "(its receiver died before opening it, or its sender before sending)")
        if not _same_file(path, st):
            return None
        if not dry_run:
            if _is_pooled_format(fd):  # receivers that keep a mapping of it let go
                os.pwrite(fd, _STATE.pack(_DROPPED), _STATE_OFF)
            os.unlink(path)
        return reason


_RING_POS = struct.Struct("=QQ")


def _queued_bytes(fd: int, file_size: int) -> bytes:
    """The bytes of the messages queued in the ring of the queue file ``fd``:
    from the consumers' head to the producers' tail, which cover every
    message committed and not yet released.  Should the ring's numbers not
    make sense, the whole file (conservative: more names are kept)."""
    def whole() -> bytes:
        return b"".join(os.pread(fd, min(1 << 24, file_size - off), off)
                        for off in range(0, file_size, 1 << 24))

    head = os.pread(fd, 32, 0)
    if len(head) < 32:
        return whole()
    (hsize,) = struct.unpack_from("=Q", head, 24)
    ring = os.pread(fd, _ROLES_OFF, hsize) if hsize < file_size else b""
    lay = _core.layouts["ring"]
    if len(ring) < _ROLES_OFF:
        return whole()
    cap, data_off = struct.unpack_from("=QQ", ring, lay["cap"])
    (tail,) = struct.unpack_from("=Q", ring, lay["tail"])
    (start,) = struct.unpack_from("=Q", ring, lay["head"])
    base = hsize + data_off
    if not (0 < cap and base + cap <= file_size and start <= tail and tail - start <= cap):
        return whole()
    a, n = start % cap, tail - start
    first = os.pread(fd, min(n, cap - a), base + a)
    rest = os.pread(fd, n - len(first), base) if n > len(first) else b""
    return first + rest


def _ring_bytes_of(qpath: str) -> bytes | None:
    """The queued messages of the queue at ``qpath`` (None if there is no queue there).

    Read after the payload's lock was taken: a message naming the payload was
    committed before (its sender holds the lock until then), so it is either
    in these bytes or already taken.
    """
    try:
        file = _open_file(qpath, writable=False)
    except (FileNotFoundError, IsADirectoryError):
        return None
    with file:
        fd = file.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        head = os.pread(fd, 16, 0)
        if len(head) < 16 or struct.unpack_from("=I", head, 12)[0] != Kind.QUEUE:
            # Not a queue (any more): keep payloads only if something else
            # might be one of ours in the making (no magic yet).
            return None if head[:1] == b"\x89" else b""
        return _queued_bytes(fd, st.st_size)


def _check_capacity(capacity: Any) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 64:
        raise ValueError(f"capacity must be an int of at least 64 bytes, not {capacity!r}")
    if capacity > 1 << 46:
        raise ValueError(f"capacity {capacity} is beyond the 64 TiB a ring can address")
    return (capacity + 63) // 64 * 64


class Channel(SharedObject, _core.Ring):
    """A channel of byte messages shared by name.

    ``Channel(name, capacity=n)`` opens ``name`` if it exists and creates it
    with ``n`` bytes of ring otherwise (``create=True`` / ``False`` insist).
    A message takes its length rounded up to 8, plus 8 bytes; the largest
    message is ``capacity - 8`` bytes (``max_message``).

    Sending: ``send(data, timeout=None)`` (blocks while full),
    ``send_nowait(data)`` (raises :class:`Full`), ``send_many(msgs)``.
    ``data`` is any bytes-like object: bytes, bytearray, memoryview, a
    C-contiguous numpy array; it is copied in once, never pickled.

    Receiving: ``recv(timeout=None)`` -> bytes (raises :class:`Timeout`),
    ``recv_nowait()`` (raises :class:`Empty`), ``recv_many(max_n, timeout)``
    -> list, ``recv_into(buffer)``, ``recv_view()`` (zero copy),
    ``recv_array()``, and iteration.

    Ending: ``close_sending()`` ends the channel for every process: sends
    raise :class:`ChannelClosed`, receivers get the messages already sent
    and then :class:`ChannelClosed` (iteration simply stops).  An ended
    channel stays ended: a later run that opens the same name gets the
    messages left in it, and its sends are refused; unlink the name
    (``shmkit rm``) to start afresh.  ``close()`` (and leaving a ``with``
    block) only releases this handle, as for every shmkit object.

    Every blocking call releases the GIL, lets Ctrl-C through, and survives
    peers killed at any point: a message whose sender died half-way is
    dropped, nothing else is lost or repeated.  One handle may be used from
    many threads.  Passed to a child process that ``multiprocessing`` starts,
    a handle hands over the open file, so the child reaches the channel even
    if this process closed it meanwhile; pickled otherwise, it goes by name.

    Parameters
    ----------
    name:
        The channel's name (``None``: a unique one, removed when the last
        handle closes).
    capacity:
        Ring bytes when creating (rounded up to 64; default 1 MiB).  When
        opening, a given capacity larger than the channel's raises
        :class:`MismatchError`; leave it out to adopt the channel's.
    on_destroy:
        Called (no arguments) once, in the process that removes the name:
        its ``unlink()``, or the last ``close()`` of an "attached" channel.
    create:
        ``None`` create or open, ``True`` only create, ``False`` only open.
    path, lifetime, mode, max_attach:
        As for :class:`shmkit.Segment`.
    readonly:
        Open an existing channel only to look at it (``statistics()``,
        ``info()``); sending and receiving raise PermissionError.

    Raises
    ------
    WrongKindError (the name holds something else), FormatVersionError,
    MismatchError, CorruptError, and the other :class:`Segment` errors.

    Example
    -------
    >>> with Channel(None, capacity=4096) as ch:
    ...     ch.send(b"hello"); ch.send_many([b"a", b"b"])
    ...     ch.recv(timeout=1.0), ch.recv_many(max_n=10)
    2
    (b'hello', [b'a', b'b'])
    """

    _kind = Kind.CHANNEL
    _what = "channel"

    def __init__(self, name: str | None = None, capacity: int = DEFAULT, *,
                 create: bool | None = None, path: str | os.PathLike[str] | None = None,
                 lifetime: str | None = DEFAULT, mode: int | None = None,
                 max_attach: int = DEFAULT, readonly: bool = False,
                 on_destroy: Callable[[], Any] | None = None,
                 trust_owner: int | str | None = None) -> None:
        self._open(name, capacity, create, path, lifetime, mode, max_attach, DEFAULT,
                   readonly, trust_owner)
        self._on_destroy = on_destroy

    @classmethod
    def _open_made(cls, name: str) -> "Channel":
        """Open ``name``, a channel that must be made in full already (a
        service's reply channel, made before the request that names it),
        waiting for nobody: a file still being made under that name, or held
        as if it were, is refused at once (Timeout), and a channel whose
        attach slots are all held (a closer holds them all as it removes
        it) at once too (BusyError)."""
        self = cls.__new__(cls)
        self._open(name, DEFAULT, False, None, DEFAULT, None, DEFAULT, DEFAULT,
                   ready_wait=0.0)
        return self

    def _open(self, name: str | None, capacity: Any, create: bool | None, path: Any,
              lifetime: Any, mode: int | None, max_attach: Any, max_items: Any,
              readonly: bool = False, trust_owner: int | str | None = None,
              ready_wait: float | None = None) -> None:
        # (`is DEFAULT` rather than given(): this runs on every open)
        default_cap = QUEUE_CAPACITY if self._kind == Kind.QUEUE else DEFAULT_CAPACITY
        cap = _check_capacity(default_cap if capacity is DEFAULT else capacity)
        items = 0 if max_items is DEFAULT else max_items
        slots = DEFAULT_MAX_ATTACH if max_attach is DEFAULT else check_max_attach(max_attach)
        if lifetime is None or lifetime is DEFAULT:
            life = "attached" if name is None and path is None else "persistent"
        else:
            life = lifetime

        def init(seg: Segment) -> None:
            _core.Ring._init_ring(seg._mapping, seg._hsize, cap, items)

        seg = attach_segment(
            self._kind, name, path,
            size=_ring_bytes(cap, slots) if create is not False and not readonly else None,
            create=False if readonly else create, mode=mode, readonly=readonly,
            lifetime=life, max_attach=slots, init=init, trust_owner=trust_owner,
            layout={"format": FORMAT, "capacity": cap, "max_items": items},
            ready_wait=ready_wait)
        self._adopt(seg, capacity=DEFAULT if capacity is DEFAULT else cap, max_items=max_items,
                    lifetime=lifetime, max_attach=max_attach)

    def _adopt(self, seg: Segment, capacity: Any = DEFAULT, max_items: Any = DEFAULT,
               lifetime: Any = DEFAULT, max_attach: Any = DEFAULT) -> None:
        what = self._what
        try:
            layout = seg._layout
            fmt = layout.get("format")
            if fmt != FORMAT:
                raise FormatVersionError(
                    f"{what} {seg.name!r} has ring format {fmt}; this "
                    f"shmkit reads format {FORMAT}. Use the shmkit that made it, or "
                    "remove it with `shmkit rm` and create it again")
            self._bind(seg._mapping, seg._hsize, seg.name)
            if not seg.created:
                # An explicit parameter is honoured or refused, never ignored.
                if capacity is not DEFAULT and self.capacity < capacity:
                    raise mismatch(what, seg.name, "capacity", capacity, self.capacity)
                have = self._max_items  # the ring's, not the layout's copy
                if max_items is not DEFAULT and max_items != have:
                    raise mismatch(what, seg.name, "maxsize", max_items, have)
                check_common(what, seg, lifetime=lifetime, max_attach=max_attach)
        except BaseException:
            self._unbind()
            seg.close()
            raise
        self._seg = seg

    @classmethod
    def create(cls, name: str | None = None, capacity: int = DEFAULT,
               **kwargs: Any) -> "Channel":
        """Create a channel; :class:`ExistsError` if the name is taken."""
        return cls(name, capacity, create=True, **kwargs)

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Channel":
        """Open an existing channel; :class:`NotFoundError` if there is none.

        ``Channel.open(name, readonly=True)`` only looks (what ``shmkit info`` needs).
        """
        return cls(name, create=False, **kwargs)

    # -- receiving in place --------------------------------------------------

    def recv_view(self, timeout: float | None = None, *, redeliver: bool = False) -> Any:
        """Take the next message without copying it: a context manager
        whose ``with`` value is a read-only memoryview of the message in
        shared memory, valid inside the block.

        The message's space is not reused until the block ends (or
        ``.release()`` is called); views may be released in any order.
        Arrays made from the view must be gone when the block ends (copy
        what you keep).  Raises like :meth:`recv`.

        If this process dies (or closes this handle) while it holds the
        view, the message is lost by default: it counts as received.  With
        ``redeliver=True`` it goes back to the channel instead, once another
        handle notices (on its first receive, when a receive waits, or when
        a send finds the channel full), and is received again before newer
        messages: at least once rather than at most once, for work that
        must not be lost (``statistics()["redelivered"]`` counts them).  A
        view released normally is finished either way.

        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(b"big payload")
        ...     with ch.recv_view(timeout=1.0) as mv:
        ...         bytes(mv[:3])
        b'big'
        """
        return self._take(timeout, False, redeliver)

    def recv_view_nowait(self, *, redeliver: bool = False) -> Any:
        """:meth:`recv_view`, raising :class:`Empty` instead of waiting."""
        return self._take(None, True, redeliver)

    def recv_array(self, dtype: Any = DEFAULT, shape: Any = None, *,
                   timeout: float | None = None, out: Any = None) -> Any:
        """Receive a message as a numpy array (one copy, straight from the ring).

        ``dtype`` defaults to uint8.  ``shape`` (default: one dimension) may
        have one dimension of -1, which the message's size sets.  ``out=``
        (a writable C-contiguous array) receives the bytes in place instead,
        and must be exactly the message's size; a ``dtype`` or ``shape``
        given with it must be its own (ValueError otherwise).  A message that no array of ``dtype`` and ``shape``
        (or ``out``) fits exactly raises :class:`LayoutMismatchError` and
        stays in the channel: the next receive gets it.

        >>> import numpy as np
        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(np.arange(4, dtype=np.int32))
        ...     ch.recv_array(np.int32, timeout=1.0).tolist()
        [0, 1, 2, 3]
        """
        return received_array(self, "channel", self.name, dtype, shape, timeout, out)

    # -- iteration and ending --------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return self.recv()
        except ChannelClosed:
            raise StopIteration from None

    def messages(self, *, timeout: float | None = None,
                 stop_when_no_senders: bool = False) -> Iterator[bytes]:
        """Iterate over received messages until the channel is closed and drained.

        ``stop_when_no_senders=True`` also ends the iteration once the
        channel is empty and every process that sent on it has closed its
        handle or died (a sender killed mid-message is counted out by the
        kernel); before the first message is sent it waits as usual.
        ``timeout`` bounds each wait (:class:`Timeout`).

        Example (a log receiver that ends when its senders have all gone)::

            for record in ch.messages(stop_when_no_senders=True):
                handle(record)
        """
        while True:
            try:
                yield self.recv(timeout, stop_when_no_senders=stop_when_no_senders)
            except ChannelClosed:
                return

    def close_sending(self, *, timeout: float | None = None) -> None:
        """End the channel for every process: no more sends, anywhere.

        Later sends (in any process, and in later runs that open the same
        name) raise :class:`ChannelClosed`; receivers get what was already
        sent, then :class:`ChannelClosed`, and iteration ends.  The handle
        stays open (call :meth:`close` to release it).  Ending cannot be
        undone: unlink the name and create the channel again.

        Ending takes the senders' lock for a moment, as a send does;
        ``timeout`` bounds the wait for it (``None``, the default: as long
        as it takes, as for ``send()``), then :class:`Timeout` names the
        process holding it (a sender stopped with SIGSTOP, or in a debugger,
        while it reserved room) and the channel is left as it was.  A
        sender that died holding it is taken over, not waited for.

        >>> with Channel(None, capacity=4096) as ch:
        ...     ch.send(b"last"); ch.close_sending(timeout=5.0)
        ...     list(ch)
        [b'last']
        """
        self._held()
        self._close_sending(timeout)

    def close(self) -> None:
        """Release this handle; the channel carries on for the other processes.

        Calls blocked on this handle in other threads raise ValueError.  A
        channel made with ``name=None`` is removed when its last handle
        closes.  Safe to call twice.  To end the channel for everyone, use
        :meth:`close_sending`.
        """
        super().close()

    def _segment_closed(self) -> None:
        self._wake_all()  # threads of ours asleep on it notice the close
        self._unbind()

    def statistics(self) -> dict:
        """Counters and state of the channel, as every process sees them.

        ``{"capacity", "bytes_used", "depth", "sent", "received", "dropped",
        "redelivered", "producers", "consumers", "closed", "receivers_waiting",
        "senders_waiting", "max_items"}``: ``depth`` counts messages waiting;
        ``sent`` counts messages published or being written; ``dropped``
        those abandoned by senders that died while writing them;
        ``redelivered`` those given back by receivers that died holding them
        as ``recv_view(redeliver=True)`` views (``depth`` counts them again
        until they are received);
        ``producers``/``consumers`` count live handles that have sent/received;
        ``closed`` is 1 once the channel was ended with ``close_sending()``.
        """
        self._held()
        return self._stats()

    def _describe(self) -> dict:
        s = self._stats()
        keys = ("depth", "capacity", "producers", "consumers", "sent", "received",
                "dropped", "redelivered", "closed", "bytes_used")
        return {self._kind.name.lower(): {k: s[k] for k in keys}}

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmkit.{type(self).__name__} {self.name!r} closed>"
        return (f"<shmkit.{type(self).__name__} {self.name!r} capacity={self.capacity}"
                f" depth={self.depth}>")


class Queue(SharedObject, _core.QueueCore):
    """``multiprocessing.Queue`` over shared memory, for Python objects.

    Same interface: ``put(obj, block=True, timeout=None)``, ``get(block=True,
    timeout=None)``, ``put_nowait``, ``get_nowait``, ``qsize``, ``empty``,
    ``full``, ``close``, ``join_thread``, ``cancel_join_thread``; raises
    :class:`queue.Empty` / :class:`queue.Full` (as :class:`shmkit.Empty` /
    :class:`shmkit.Full`).  Objects are pickled, as multiprocessing does: only
    share a queue with processes you trust, since unpickling runs code.

    Unlike ``multiprocessing.Queue`` there is no feeder thread: ``put``
    returns once the object is in shared memory, and ``get`` works from
    processes that were never its children, by name.  Pass a queue to child
    processes as usual (``Process`` and ``Pool`` arguments, ``initargs``):
    the child is handed the open file, so it reaches the queue even if this
    process closes it, or exits, right after ``start()``.  Or open it
    elsewhere with ``Queue(name="jobs")``.

    Parameters
    ----------
    maxsize:
        At most this many objects queued (0: no limit but ``capacity``).
        When opening by name, a given maxsize must be the queue's own
        (:class:`MismatchError` otherwise); leave it out to adopt it.
    name:
        Open or create this name; ``None`` makes a unique one, removed when
        the last process closes it.
    capacity:
        Bytes of ring (default 8 MiB); ``put`` also blocks while the pickled
        objects waiting fill it.  It does not bound an object's size:
        buffers and pickles of ``OOB_THRESHOLD`` (256 KiB) or more go to a
        payload file beside the queue (docs/channel.md, "Big objects").  When opening, a given capacity larger than the queue's
        raises :class:`MismatchError`.
    on_destroy:
        Called (no arguments) once, in the process that removes the name.
    payload_pool:
        Bytes of big objects whose payload files this handle keeps and
        reuses (default ``PAYLOAD_POOL``, 256 MiB; in this process, not
        passed to children): a file its receiver is done with is written
        again in place, a copy instead of fresh pages.  0: every big object
        gets a file of its own, removed by its receiver.

    Example
    -------
    >>> q = Queue()
    >>> q.put({"job": 1}); q.get(timeout=1.0)
    {'job': 1}
    >>> q.close()
    """

    _ch: Channel | None = None
    _what = "queue"
    _maxsize = 0
    _closed = True  # this handle's own flag: put/get check it without a property
    _oob_limit = 0  # a pickle this long leaves the ring (see _take)
    _path = ""
    _pool: _PayloadPool | None = None
    _pool_finalizer: "weakref.finalize[Any, Any] | None" = None
    _pool_limit = PAYLOAD_POOL

    def __init__(self, maxsize: int = DEFAULT, *, name: str | None = None,
                 capacity: int = DEFAULT, create: bool | None = None,
                 ctx: Any = None, on_destroy: Callable[[], Any] | None = None,
                 payload_pool: int = DEFAULT, path: str | os.PathLike[str] | None = None,
                 lifetime: str | None = DEFAULT, mode: int | None = None,
                 max_attach: int = DEFAULT, readonly: bool = False,
                 trust_owner: int | str | None = None) -> None:
        if given(maxsize) and (not isinstance(maxsize, int) or isinstance(maxsize, bool)
                               or maxsize < 0):
            raise ValueError(f"maxsize must be a non-negative int, not {maxsize!r}")
        if given(maxsize) and maxsize > _MAX_QUEUE_ITEMS:
            raise SizeLimitError(f"maxsize={maxsize} is beyond the {_MAX_QUEUE_ITEMS} items "
                                 "a queue can count; use 0 for no limit")
        if given(payload_pool):
            if (not isinstance(payload_pool, int) or isinstance(payload_pool, bool)
                    or payload_pool < 0):
                raise ValueError(f"payload_pool must be a non-negative int (bytes), "
                                 f"not {payload_pool!r}")
            self._pool_limit = payload_pool
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._open(name, capacity, create, path, lifetime, mode, max_attach, maxsize, readonly,
                 trust_owner)
        self._take(ch)
        self._on_destroy = on_destroy

    @classmethod
    def open(cls, name: str | None = None, **kwargs: Any) -> "Queue":
        """Open an existing queue by name; :class:`NotFoundError` if there is none.

        ``Queue.open(name, readonly=True)`` only looks: ``qsize()``, ``info()``.
        """
        return cls(name=name, create=False, **kwargs)

    def _adopt(self, seg: Segment) -> None:
        ch = _QueueChannel.__new__(_QueueChannel)
        ch._adopt(seg)
        self._take(ch)

    def _take(self, ch: Channel) -> None:
        self._ch = ch
        self._closed = False
        self._maxsize = ch._max_items
        self._send, self._send_nowait = ch.send, ch.send_nowait
        # get (_get_boxed, the core's QueueCore) decodes big objects' headers with
        # a partial of plain values: a bound method would tie the handle in a cycle
        self._bind(ch, _loads, functools.partial(_unpack, ch._seg.path, ch._seg.name,
                                                 ch._seg._trust_uid),
                   _raised_by_a_signal_handler)
        self._path = ch._seg.path
        self._oob_limit = min(OOB_THRESHOLD, ch.max_message + 1)

    @property
    def _seg(self) -> Segment | None:  # type: ignore[override]
        return None if self._ch is None else self._ch._seg

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue, waiting while it is full (``queue.Full`` when
        ``block`` is false or ``timeout`` seconds pass; a timeout with ``block``
        false is refused with ValueError, as by ``threading.Lock``).

        Big buffers in ``obj`` (numpy arrays, bytearrays: see ``OOB_THRESHOLD``)
        and big pickles go to a payload file, copied once; the ring carries
        a small header naming it.  Raises :class:`OutOfSpaceError` when
        /dev/shm has no room for them (nothing is left behind)."""
        if self._closed:
            raise self._closed_error()
        if not block and timeout is not None:
            _core.nowait_timeout_check(timeout, "put()", "block")
        try:
            data = _dumps(obj, 5, buffer_callback=_in_band)
        except _BigBuffer:
            data = None
        if data is None or len(data) >= self._oob_limit:
            data, out = _pack(obj, self._path, self._oob_limit - 1, self.name,
                              self._seg._mapping, data, self._payload_pool())
            if out is not None:
                return self._put_out_of_band(data, out, block, timeout)
        try:
            if block:
                self._send(data, timeout)
            else:
                self._send_nowait(data)
        except Timeout as e:
            if not e._deadline:  # (a signal handler's own)
                raise
            raise Full(f"queue {self.name!r} stayed full for "
                       f"{_core.shown_seconds(timeout)} s") from None

    def _pack(self, obj: Any) -> tuple[bytes, _Outgoing | _PooledOutgoing | None]:
        if self._closed:
            raise self._closed_error()
        return _pack(obj, self._path, self._oob_limit - 1, self.name, self._seg._mapping,
                     None, self._payload_pool())

    def _payload_pool(self) -> _PayloadPool | None:
        """This handle's pool of payload files (made at the first big object;
        a forked child's copy starts empty: ``_PayloadPool.forked``)."""
        pool = self._pool
        if pool is not None or self._pool_limit <= 0:
            return pool
        pool = self._pool = _PayloadPool(self._path, self._pool_limit)
        # (for a handle dropped unclosed; close() detaches it, so that no
        # Python callback runs as a closed handle is freed, for a Ctrl-C that
        # its __del__ gave back to land in and be dropped)
        self._pool_finalizer = weakref.finalize(self, pool.close)
        return pool

    def _put_out_of_band(self, data: bytes, out: _Outgoing | _PooledOutgoing, block: bool,
                         timeout: float | None) -> None:
        try:
            if not block:
                self._send_nowait(data)
            else:
                self._send(data, timeout)
        except (WouldBlock, Timeout, ChannelClosed, MessageTooLarge, ValueError,
                TypeError) as e:  # (TypeError, ValueError: a bad timeout, a closed handle)
            out.unsent()  # the core refused it: no message names the file
            if isinstance(e, Timeout) and e._deadline:  # (not a signal handler's)
                raise Full(f"queue {self.name!r} stayed full for "
                           f"{_core.shown_seconds(timeout)} s") from None
            raise
        except BaseException:
            # Perhaps sent (Ctrl-C right after the commit): keep the file;
            # `shmkit gc` removes it if no message names it.
            out.sent()
            raise
        out.sent()

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an object, waiting while the queue is empty
        (``queue.Empty`` when ``block`` is false or ``timeout`` seconds pass;
        a timeout with ``block`` false is refused with ValueError).

        Big buffers come back backed by their payload's shared memory (no
        copy; numpy arrays are writable, as with ``multiprocessing``), held
        while the object needs them.  The object is rebuilt while it is
        still in the queue: a Ctrl-C meanwhile leaves it there, next in
        line, and a process killed meanwhile gives it back too.  A payload
        file that is missing, damaged or not yours raises
        :class:`NotFoundError`, :class:`CorruptError` or
        :class:`UntrustedError`, and an object that does not unpickle here
        (memory running out included) raises its error: that object is
        lost, the queue goes on.  No descriptor left to open its payload
        (:class:`DescriptorLimitError`) leaves it next in line, as does
        what a signal handler raises meanwhile.

        >>> q = Queue()
        >>> q.put({"frame": 1})
        >>> q.get(timeout=1.0)
        {'frame': 1}
        >>> q.close()
        """
        # The core's call (_core/queuetype.c) returns the object in a list,
        # the main thread's box, emptied here with no point between the
        # call and here where a signal handler runs but the call's own
        # end: an interrupt raised there leaves the object in the box, and
        # the next get returns it first.
        box = self._get_boxed(block, timeout)
        obj = box[0]
        box[0] = box  # empty: it holds itself
        if obj is box:  # taken by a get that a signal handler made as the call returned
            return Queue.get(self, block, timeout)  # (shmkit.aio's get is a coroutine)
        return obj

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """How many objects are queued (exact at the moment it is read; an
        object a receiver killed inside its ``get()`` was taking counts, since
        the next ``get()`` takes it, and so does one a Ctrl-C left in this
        handle's box for its next ``get()``)."""
        return self._live().depth + self._kept

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        ch = self._live()
        limit = ch._max_items  # read where the ring keeps it: what put() obeys
        return limit > 0 and ch.depth >= limit

    def close(self) -> None:
        """This process will use the queue no more (other processes carry on).

        Objects already put stay in the queue; there is no feeder thread
        to flush.  Safe to call twice.
        """
        self._unbind()
        self._closed = True
        if self._pool is not None:
            if self._pool_finalizer is not None:
                self._pool_finalizer.detach()
            self._pool.close()
        ch = self._ch
        seg = None if ch is None else ch._seg
        if seg is None:
            return
        try:
            # (closed already: runs what a Ctrl-C left of an earlier close)
            ch.close()
        finally:  # an interrupt in close() must not leave the payloads
            try:
                self._after_close(seg)
            finally:
                _received.let_go_of(seg.path)

    def unlink(self) -> None:
        """Remove the queue's name, and the payload files of the big objects
        in it: a process that still holds the queue gets its small objects,
        and :class:`NotFoundError` for each big one (lost)."""
        super().unlink()

    def _destroyed(self) -> None:
        seg = self._seg
        if seg is not None:
            _remove_payloads(seg.path)
        super()._destroyed()

    def join_thread(self) -> None:
        """Nothing to wait for: ``put`` has already placed the object."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel (there is no feeder thread)."""

    def statistics(self) -> dict:
        """The channel counters (see :meth:`Channel.statistics`)."""
        return self._live().statistics()

    def _describe(self) -> dict:
        return self._live()._describe()

    @property
    def maxsize(self) -> int:
        """The most objects queued at once (0: no limit), as the ring enforces
        it; once closed, as it was when opened."""
        try:
            return self._live()._max_items
        except ValueError:  # closed: ClosedError, a ValueError as multiprocessing raises
            return self._maxsize

    def _live(self) -> Channel:
        if self.closed:
            raise self._closed_error()
        return self._ch  # type: ignore[return-value]

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"Queue {self!r} is closed in this process; open it again")

    def __repr__(self) -> str:
        if self.closed:
            return "<shmkit.Queue closed>"
        return f"<shmkit.Queue {self.name!r} maxsize={self.maxsize}>"


class _QueueChannel(Channel):
    _kind = Kind.QUEUE
    _what = "queue"
