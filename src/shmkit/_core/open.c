/* open.c - creating a segment's file, and opening a published one by name,
 * each in one call.
 *
 *   header_size(max_slots) -> int
 *       The header's size for that attach table (creators use it too).
 *
 *   header_problem(raw, file_size) -> str | None
 *       The checks every segment header gets before anything is formed from
 *       it (all fields untrusted, unsigned arithmetic): None when they pass,
 *       else the name of the first field found wrong ("magic", "version",
 *       "slots", "header_size", "size", "file_header", "file_payload",
 *       "layout_len").  segment.py turns the name into its message.
 *
 *   open_segment(path, writable, kind, trust_uid, start, comm) -> tuple | None
 *       Open, check, map and attach in one call: open without following a
 *       symbolic link or blocking on a FIFO; refuse what is not a regular
 *       file owned by this user, root or trust_uid (-1: nobody else); read
 *       the header and check it as above, and its kind; map header_size +
 *       max_size bytes; claim a slot (shm_attach_claim) or the reader byte;
 *       make sure the name was not removed meanwhile (a last closer).
 *       Returns (fd, mapping, flags, max_slots, header_size, size, max_size,
 *       created_ns, creator_pid, layout bytes) with the mapping attached, or
 *       None, having undone every step, for anything else: missing file, not
 *       yet published, damaged, refused, busy, out of address space.  Then
 *       segment.py takes its step-by-step path, which waits, recovers,
 *       creates or raises the specific error with what to do.  Keeping the
 *       uncommon cases there keeps each message in one place; opening an
 *       existing object, the common case, costs one call.
 *
 *   create_file(directory, fallback, mode, length, reserve, nameless=True,
 *               private=False) -> (fd, mapping)
 *       A new file of `length` bytes, allocated (posix_fallocate: a full
 *       /dev/shm fails here, not with a SIGBUS later), of exactly `mode`,
 *       its init lock held (an OFD lock on byte 0), and mapped (`reserve`
 *       bytes), the mapping owning the descriptor.  It has no name
 *       (O_TMPFILE), so a creator interrupted or killed before it links the
 *       file to its name leaves nothing.  Where the file system has no
 *       O_TMPFILE it is made at the hidden name `fallback` instead (O_EXCL,
 *       no symbolic link followed), a name the mapping holds: link_file
 *       removes it as it links the file, and the mapping when it lets the
 *       file go, in the process that made it (nameless=False takes that
 *       way at once).
 *       From its open until end_creation it is listed: a child forked by
 *       another thread lets go of it (by any thread, if private).
 *       Failures raise OSError with the errno, having left nothing.
 *
 *   resize_payload(mapping, header_size, max_size, size, grow_only, timeout,
 *                  what) -> 0 | 1 | 2
 *       The whole of a resize, under the segment's own lock: take the lock
 *       (0 when the timeout passes first; 2 when its holder had died, with
 *       OwnerDiedWarning naming `what`), check the header's size against
 *       max_size and the file, then grow (posix_fallocate, finished in
 *       smaller pieces when signals keep interrupting it: tmpfs undoes an
 *       interrupted call's work) or shrink (the pages past the new size
 *       given back to the system, the rest of the last page zeroed), store
 *       the new size, count the resize and let the lock go (a thread that
 *       holds the lock already resizes under it and keeps it).  grow_only
 *       leaves a payload already that large as it is.  No Ctrl-C can fall
 *       between taking the lock and letting it go; one that interrupts the
 *       allocation leaves the size as it was.
 *
 *   sync_file(mapping)          fsync of the mapping's file
 *   file_sizes(mapping) -> (size, allocated bytes)   fstat of it
 *   file_access(mapping) -> (permission bits, group id)   of it
 *       These, and resize_payload, borrow the file for the call
 *       (shm_mapping_lend_fd): a close by another thread meanwhile cannot
 *       hand its descriptor number to a file the process opens next, and
 *       these calls to that file; ClosedError once the handle is closed.
 *
 *   link_file(fd, path, mapping)
 *       Give the file of fd (made by create_file) the name path, and remove
 *       the hidden name the mapping holds, if any; FileExistsError if path
 *       is taken.  Through /proc/self/fd (no privilege needed), or
 *       AT_EMPTY_PATH where /proc is not mounted.
 *
 *   opener(path, flags) -> fd
 *       open(2) with O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC added, as the
 *       opener of io.FileIO: FileIO holds the descriptor as soon as this
 *       returns, before any Python runs, so no Ctrl-C can fall between the
 *       open and the object that closes it.
 */
#include "shmkit.h"
#include "layout.h"
#include "journal.h" /* shm_lock_release_journal */
#include "sync.h"    /* shm_sync_deadline */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char segment_magic[8] = "\x89SHMKIT";  /* and a NUL: 8 bytes */

/* The header size of a table of max_slots slots: the attach table after the
 * fixed header, rounded up to whole pages. */
static uint64_t
header_size_for(uint32_t max_slots)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t n = SHM_HEADER_BYTES + (uint64_t)max_slots * SHM_SLOT_SIZE;
    return (n + page - 1) / page * page;
}

/* NULL when the header passes, else the name of the first bad field. */
static const char *
header_problem(const struct shm_segment_hdr *h, uint64_t file_size)
{
    if (memcmp(h->magic, segment_magic, 8) != 0)
        return "magic";
    if (h->version != SHM_SEGMENT_FORMAT)
        return "version";
    if (h->max_slots < 1 || h->max_slots > SHM_MAX_SLOTS)
        return "slots";
    if (h->hdr_size != header_size_for(h->max_slots))
        return "header_size";
    if (h->size > h->max_size || h->max_size > SHM_MAX_RESERVE)
        return "size";
    if (file_size < h->hdr_size)
        return "file_header";
    if (file_size - h->hdr_size < h->size)
        return "file_payload";
    if (h->layout_len > SHM_HEADER_BYTES - SHM_LAYOUT_OFF)
        return "layout_len";
    return NULL;
}

static PyObject *
py_header_size(PyObject *mod, PyObject *arg)
{
    unsigned long n = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (n < 1 || n > SHM_MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError, "max_slots must be 1..%d, not %lu", SHM_MAX_SLOTS, n);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(header_size_for((uint32_t)n));
}

static PyObject *
py_header_problem(PyObject *mod, PyObject *args)
{
    Py_buffer raw;
    unsigned long long file_size;
    if (!PyArg_ParseTuple(args, "y*K", &raw, &file_size))
        return NULL;
    struct shm_segment_hdr h;
    if (raw.len < (Py_ssize_t)sizeof h) {
        PyBuffer_Release(&raw);
        PyErr_Format(PyExc_ValueError, "a header is %zu bytes, not %zd", sizeof h, raw.len);
        return NULL;
    }
    memcpy(&h, raw.buf, sizeof h);
    PyBuffer_Release(&raw);
    const char *problem = header_problem(&h, file_size);
    if (problem == NULL)
        Py_RETURN_NONE;
    return PyUnicode_InternFromString(problem);
}

/* Is a file of this owner one we may read?  This user's, root's, or the
 * owner the caller trusts (trust_uid, -1 for none). */
static int
trusted_owner(uid_t uid, long long trust_uid)
{
    return uid == geteuid() || uid == 0 || (trust_uid >= 0 && (long long)uid == trust_uid);
}

static PyObject *
open_segment_at(PyObject *mod, const char *path, int writable, unsigned int kind,
                long long trust_uid, unsigned int start, const char *comm, Py_ssize_t comm_len)
{
    /* The whole header page: the fixed fields and the layout text. */
    union {
        struct shm_segment_hdr h;
        char bytes[SHM_HEADER_BYTES];
    } raw;
    struct stat st;
    ssize_t got = -1;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    /* O_NONBLOCK: a FIFO planted at the name must not hang the open. */
    fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        trusted_owner(st.st_uid, trust_uid))
        got = pread(fd, raw.bytes, sizeof raw.bytes, 0); /* only now read a byte */
    Py_END_ALLOW_THREADS
    if (fd < 0)
        Py_RETURN_NONE;
    const struct shm_segment_hdr *h = &raw.h;
    /* (header_problem bounds max_size, and so the reservation below) */
    if (got != (ssize_t)sizeof raw.bytes || header_problem(h, (uint64_t)st.st_size) != NULL ||
        h->kind != kind) {
        close(fd);
        Py_RETURN_NONE;
    }
    MappingObject *m = shm_mapping_new(shm_mod_state(mod), fd,
                                       (Py_ssize_t)(h->hdr_size + h->max_size),
                                       (Py_ssize_t)(h->hdr_size + h->size), !writable, 0);
    if (m == NULL) {
        PyErr_Clear(); /* out of address space, or a limit: the slow path says which */
        close(fd);
        Py_RETURN_NONE;
    }
    m->table_off = SHM_HEADER_BYTES;
    m->max_slots = h->max_slots;
    int attached = writable ? shm_attach_claim(m, fd, start, comm, (size_t)comm_len)
                            : shm_attach_reader(m, fd);
    if (attached != 1) {
        PyErr_Clear();
        goto undo;
    }
    /* A last "attached" closer, or `shmkit gc`, may have removed the name
     * between our open and our claim (nobody was attached then).  With the
     * slot ours, neither can remove it any more. */
    if (fstat(fd, &st) != 0 || st.st_nlink == 0) {
        shm_attach_detach(m);
        goto undo; /* closing fd drops the slot's lock */
    }
    PyObject *out = Py_BuildValue(
        "(iNIIKKKKIy#)", fd, (PyObject *)m, h->flags, h->max_slots,
        (unsigned long long)h->hdr_size, (unsigned long long)h->size,
        (unsigned long long)h->max_size, (unsigned long long)h->created, h->creator,
        raw.bytes + SHM_LAYOUT_OFF, (Py_ssize_t)h->layout_len);
    if (out == NULL)
        close(fd); /* "N" took the mapping's reference even so */
    else
        m->owned_fd = fd; /* dropped before a handle holds it: closed with it */
    return out;
undo:
    Py_DECREF(m); /* unmaps */
    close(fd);
    Py_RETURN_NONE;
}

static PyObject *
py_open_segment(PyObject *mod, PyObject *args)
{
    PyObject *path;
    const char *comm;
    Py_ssize_t comm_len;
    int writable;
    unsigned int kind, start;
    long long trust_uid;
    if (!PyArg_ParseTuple(args, "O&pILIy#", PyUnicode_FSConverter, &path, &writable, &kind,
                          &trust_uid, &start, &comm, &comm_len))
        return NULL;
    PyObject *out = open_segment_at(mod, PyBytes_AS_STRING(path), writable, kind, trust_uid,
                                    start, comm, comm_len);
    Py_DECREF(path);
    return out;
}

/* posix_fallocate of [offset, offset + length), kept going when a signal
 * interrupts it, unless its handler raised: 0, an errno, or -1 with the
 * handler's exception set.  tmpfs undoes what an interrupted call had
 * allocated, so a handler that runs more often than one call takes (a
 * profiler's timer) would have it start over for ever: the rest goes in
 * pieces, halved at each interruption, and each piece done is kept. */
static int
allocate(int fd, off_t offset, off_t length)
{
    const off_t least = 64 << 10;
    off_t piece = length;
    while (length > 0) {
        off_t n = length < piece ? length : piece;
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = posix_fallocate(fd, offset, n);
        Py_END_ALLOW_THREADS
        if (err == 0) {
            offset += n;
            length -= n;
            continue;
        }
        if (err != EINTR)
            return err;
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (piece > least)
            piece /= 2;
    }
    return 0;
}

/* 0 for 0; -1 with the exception set for -1 (set already) or an errno
 * (OSError). */
static int
file_op_error(int err)
{
    if (err > 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return err == 0 ? 0 : -1;
}

/* None for 0; NULL with the exception set otherwise (file_op_error). */
static PyObject *
file_op_result(int err)
{
    if (file_op_error(err) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* op on m's file, borrowed for the call, with the GIL let go: 0 or an
 * errno; -1 with ClosedError when the handle was closed. */
static int
on_lent_file(MappingObject *m, int (*op)(int fd, off_t offset, off_t length), off_t offset,
             off_t length)
{
    int fd = shm_mapping_lend_fd(m);
    if (fd < 0)
        return -1;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = op(fd, offset, length);
    Py_END_ALLOW_THREADS
    shm_mapping_return_fd(m);
    return err;
}

static int
punch(int fd, off_t offset, off_t length)
{
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) == 0)
        return 0;
    return errno == EOPNOTSUPP ? 0 : errno; /* a file system without holes keeps the pages */
}

static int
sync_all(int fd, off_t offset, off_t length)
{
    return fsync(fd) == 0 ? 0 : errno;
}

/* fstat of m's file, through its borrowed descriptor: 0, or -1 with an
 * exception (ClosedError once the handle is closed, OSError). */
static int
lent_fstat(MappingObject *m, struct stat *st)
{
    int fd = shm_mapping_lend_fd(m); /* (the GIL stays held: for its closed check) */
    if (fd < 0)
        return -1;
    int r = fstat(fd, st);
    int err = errno;
    shm_mapping_return_fd(m);
    if (r == 0)
        return 0;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* Give back [from, to) of m's file (best effort: a failure leaves memory
 * allocated, nothing wrong). */
static void
give_back(MappingObject *m, uint64_t from, uint64_t to)
{
    if (to > from && on_lent_file(m, punch, (off_t)from, (off_t)(to - from)) < 0)
        PyErr_Clear();
}

/* A resize with the segment's lock held (see resize_payload): 0, or -1 with
 * an exception and the size as it was.  Nothing past the payload is ever
 * live, so whatever the file holds there (a resizer killed or failing part
 * way through its allocation) is given back too. */
static int
resize_locked(MappingObject *m, uint64_t hsize, uint64_t max_size, uint64_t size,
              int grow_only)
{
    shm_state *state = shm_state_of((PyObject *)m);
    struct shm_segment_hdr *h = (struct shm_segment_hdr *)m->base;
    if (shm_sigbus_truncated(m->base)) { /* what we read of it may be a stand-in page */
        PyErr_SetString(state->CorruptError, "the segment's file was truncated by another "
                        "process; nothing in it can be trusted: remove it and make it again");
        return -1;
    }
    uint64_t old = __atomic_load_n(&h->size, __ATOMIC_ACQUIRE);
    if (grow_only && size <= old)
        return 0;
    struct stat st;
    if (lent_fstat(m, &st) < 0)
        return -1;
    const uint64_t file_end = (uint64_t)st.st_size;
    /* (hsize + max_size fits the mapping's reservation: checked by the caller) */
    if (old > max_size || hsize + old > file_end) {
        PyErr_Format(state->CorruptError,
                     "its header claims %llu bytes, more than its %s (%llu bytes); remove "
                     "it and make it again", (unsigned long long)old,
                     old > max_size ? "max_size" : "file holds",
                     (unsigned long long)(old > max_size ? max_size : file_end - hsize));
        return -1;
    }
    const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    const uint64_t keep = hsize + size, end = hsize + old;
    const uint64_t keep_up = (keep + page - 1) / page * page;
    if (size > old) {
        int fd = shm_mapping_lend_fd(m);
        if (fd < 0)
            return -1;
        int err = allocate(fd, (off_t)end, (off_t)(size - old));
        shm_mapping_return_fd(m);
        if (err != 0) { /* what the allocation got before it failed goes back */
            PyObject *type, *value, *tb;
            if (err < 0)
                PyErr_Fetch(&type, &value, &tb);
            give_back(m, (end + page - 1) / page * page, keep);
            if (err < 0)
                PyErr_Restore(type, value, tb);
            return file_op_error(err);
        }
    } else if (size < old) {
        if (end > keep_up &&
            file_op_error(on_lent_file(m, punch, (off_t)keep_up, (off_t)(end - keep_up))) < 0)
            return -1;
        give_back(m, end > keep_up ? end : keep_up, file_end);
        /* The rest of the last page is kept: zeroed, so that growing again
         * shows zeros there too, never the old bytes. */
        memset(m->base + keep, 0, (size_t)((keep_up < end ? keep_up : end) - keep));
    }
    __atomic_store_n(&h->size, size, __ATOMIC_RELEASE);
    __atomic_add_fetch(&h->resizes, 1, __ATOMIC_RELEASE);
    if (size >= old) /* (a shrink gave it back above) */
        give_back(m, keep_up, file_end); /* left past the old payload by a failed resize */
    return 0;
}

static PyObject *
py_resize_payload(PyObject *mod, PyObject *args)
{
    PyObject *obj, *timeout;
    long long hsize, max_size, size;
    int grow_only;
    const char *what;
    if (!PyArg_ParseTuple(args, "O&LLLpOs", shm_mapping_converter, &obj, &hsize, &max_size,
                          &size, &grow_only, &timeout, &what))
        return NULL;
    MappingObject *m = (MappingObject *)obj;
    if (hsize < SHM_HEADER_BYTES || hsize % sysconf(_SC_PAGESIZE) != 0 || max_size < 0 ||
        size < 0 ||
        size > max_size || (m->base != NULL && (uint64_t)hsize + (uint64_t)max_size >
                                               (uint64_t)m->reserve)) {
        PyErr_SetString(PyExc_ValueError, "resize_payload: need 0 <= size <= max_size, a "
                        "whole-page header, and the header and max_size within the mapping");
        return NULL;
    }
    int64_t deadline = shm_sync_deadline(Py_True, timeout);
    if (deadline < 0)
        return NULL;
    uint32_t *word = shm_addr(obj, offsetof(struct shm_segment_hdr, lock), 4, 1);
    if (word == NULL)
        return NULL;
    shm_pin(obj); /* mapped until we are done, whatever another thread closes */
    /* A thread that holds the lock already (`with seg.lock: seg.resize(n)`)
     * resizes under it, and keeps it: waiting for it would be forever. */
    int mine = shm_lock_mine(m, word);
    if (!mine && shm_lock_mine_elsewhere(m, word)) {
        /* ... and through another handle of the segment, waiting would be
         * for ever just the same: only this thread can end that block. */
        PyErr_Format(shm_state_of(obj)->BusyError,
                     "this thread holds the %s through another handle of the segment "
                     "(in a `with other.lock:` block), so this call would wait for "
                     "itself for ever; resize through that handle, or after its block",
                     what);
        shm_unpin(obj);
        return NULL;
    }
    int r = mine ? 1 : shm_lock_acquire(m, word, deadline);
    if (r > 0 && ((r == 2 && shm_warn_owner_died(m, what) < 0) ||
                  resize_locked(m, (uint64_t)hsize, (uint64_t)max_size, (uint64_t)size,
                                grow_only) < 0)) {
        if (!mine)
            shm_lock_release_journal(m, word, NULL); /* keeps the exception */
        r = -1;
    } else if (r > 0 && !mine && shm_lock_release(m, word) < 0) {
        r = -1; /* (closed by another thread meanwhile: the lock is let go) */
    }
    shm_unpin(obj);
    return r < 0 ? NULL : PyLong_FromLong(r);
}

static PyObject *
py_sync_file(PyObject *mod, PyObject *arg)
{
    PyObject *obj;
    if (!shm_mapping_converter(arg, &obj))
        return NULL;
    return file_op_result(on_lent_file((MappingObject *)obj, sync_all, 0, 0));
}

/* lent_fstat of the file of arg, a mapping: 0, or -1 with an exception. */
static int
arg_fstat(PyObject *arg, struct stat *st)
{
    PyObject *obj;
    return shm_mapping_converter(arg, &obj) ? lent_fstat((MappingObject *)obj, st) : -1;
}

static PyObject *
py_file_sizes(PyObject *mod, PyObject *arg)
{
    struct stat st;
    if (arg_fstat(arg, &st) < 0)
        return NULL;
    return Py_BuildValue("(LL)", (long long)st.st_size, (long long)st.st_blocks * 512);
}

static PyObject *
py_file_access(PyObject *mod, PyObject *arg)
{
    struct stat st;
    if (arg_fstat(arg, &st) < 0)
        return NULL;
    return Py_BuildValue("(lk)", (long)(st.st_mode & 07777), (unsigned long)st.st_gid);
}

static PyObject *
py_create_file(PyObject *mod, PyObject *args)
{
    const char *directory, *fallback;
    unsigned int mode;
    Py_ssize_t length, reserve;
    int nameless = 1, private = 0;
    if (!PyArg_ParseTuple(args, "yyInn|pp", &directory, &fallback, &mode, &length, &reserve,
                          &nameless, &private))
        return NULL;
    if (length <= 0 || reserve < length || mode > 07777) {
        PyErr_SetString(PyExc_ValueError, "create_file: need 0 < length <= reserve, mode <= 0o7777");
        return NULL;
    }
    int fd, named = 0;
    /* With the GIL held up to the listing (none of these calls blocks: the
     * lock is new, the mapping a reservation), so that a fork from another
     * thread, which needs the GIL, finds the file listed from its first
     * moment: forget_creations then lets go of it in the child.  Only the
     * allocation, which may take long, releases the GIL, once listed. */
    fd = nameless ? open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, (mode_t)mode) : -1;
    if (fd < 0 && (!nameless || errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
        fd = open(fallback, O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, (mode_t)mode);
        named = fd >= 0;
    }
    if (fd < 0 || fchmod(fd, (mode_t)mode) != 0 || /* exactly mode, whatever the umask */
        shm_ofd_setlk(fd, SHM_INIT_LOCK_BYTE, 1, F_WRLCK) != 1) { /* new: never busy */
        PyErr_SetFromErrno(PyExc_OSError);
        goto undo;
    }
    MappingObject *m = shm_mapping_new(shm_mod_state(mod), fd, reserve, length, 0, 1);
    if (m == NULL)
        goto undo;
    m->owned_fd = fd; /* from here, the descriptor goes with the mapping */
    if (named) { /* and the hidden name too: removed when linked or let go of */
        size_t n = strlen(fallback) + 1;
        m->temp_name = PyMem_RawMalloc(n);
        if (m->temp_name == NULL) {
            Py_DECREF(m); /* closes fd */
            unlink(fallback);
            return PyErr_NoMemory();
        }
        memcpy(m->temp_name, fallback, n);
        m->temp_pid = getpid();
    }
    shm_creating_add(m, private);
    int err = allocate(fd, 0, (off_t)length);
    if (err > 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = err != 0 ? NULL : Py_BuildValue("(iO)", fd, (PyObject *)m);
    Py_DECREF(m); /* on failure, its dealloc unmaps it, removes the name, closes fd */
    return out;
undo:
    if (fd >= 0) {
        if (named)
            unlink(fallback);
        close(fd);
    }
    return NULL;
}

/* Name the file of fd path (it was made without a name, or under the
 * mapping's hidden one, which then goes in the same call: no interrupt can
 * fall between the two and leave it). */
static PyObject *
py_link_file(PyObject *mod, PyObject *args)
{
    int fd, rc;
    const char *path;
    PyObject *made;
    if (!PyArg_ParseTuple(args, "iyO&", &fd, &path, shm_mapping_converter, &made))
        return NULL;
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    Py_BEGIN_ALLOW_THREADS
    rc = linkat(AT_FDCWD, proc, AT_FDCWD, path, AT_SYMLINK_FOLLOW);
    if (rc != 0 && errno == ENOENT && access("/proc/self/fd", F_OK) != 0)
        rc = linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    shm_mapping_drop_temp((MappingObject *)made);
    Py_RETURN_NONE;
}

static PyObject *
py_opener(PyObject *mod, PyObject *args)
{
    PyObject *given, *path;
    int flags, fd;
    if (!PyArg_ParseTuple(args, "Oi", &given, &flags) ||
        !PyUnicode_FSConverter(given, &path))
        return NULL;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        /* O_NONBLOCK: a FIFO planted at the name must not hang the open. */
        fd = open(PyBytes_AS_STRING(path), flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (fd >= 0 || errno != EINTR || PyErr_CheckSignals() < 0)
            break;
    }
    PyObject *out = NULL;
    if (fd < 0) {
        if (!PyErr_Occurred())
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, given);
    } else if ((out = PyLong_FromLong(fd)) == NULL) {
        close(fd);
    }
    Py_DECREF(path);
    return out;
}

PyMethodDef shm_open_methods[] = {
    {"header_size", py_header_size, METH_O,
     "header_size($module, max_slots, /)\n--\n\n"
     "header_size(max_slots) -> int\n\nThe header's size for an attach table of "
     "max_slots slots: the fixed header and the table, in whole pages."},
    {"header_problem", py_header_problem, METH_VARARGS,
     "header_problem($module, raw, file_size, /)\n--\n\n"
     "header_problem(raw, file_size) -> str | None\n\nThe first field of a segment "
     "header found wrong, by name, or None when every check passes."},
    {"open_segment", py_open_segment, METH_VARARGS,
     "open_segment($module, path, writable, kind, trust_uid, start, comm, /)\n--\n\n"
     "open_segment(path, writable, kind, trust_uid, start, comm) -> tuple | None\n\n"
     "Open, check, map and attach a published segment in one call; None (nothing "
     "left open) when anything is out of the ordinary."},
    {"create_file", py_create_file, METH_VARARGS,
     "create_file($module, directory, fallback, mode, length, reserve, nameless=True, "
     "private=False, /)\n--\n\n"
     "create_file(directory, fallback, mode, length, reserve, nameless=True, "
     "private=False) -> "
     "(fd, mapping)\n\n"
     "A new, allocated and mapped file without a name (O_TMPFILE; at the hidden name "
     "fallback where the file system lacks it, which the mapping then holds and removes "
     "when link_file links the file or the mapping lets it go), its init lock held, the "
     "mapping owning the descriptor."},
    {"resize_payload", py_resize_payload, METH_VARARGS,
     "resize_payload($module, mapping, header_size, max_size, size, grow_only, timeout, "
     "what, /)\n--\n\n"
     "resize_payload(...) -> 0 | 1 | 2\n\nThe whole of a segment's resize under its own "
     "lock, in one call: 0 when the lock stayed held past the timeout, 2 after taking it "
     "over from a dead holder (OwnerDiedWarning naming what)."},
    {"sync_file", py_sync_file, METH_O,
     "sync_file($module, mapping, /)\n--\n\nfsync of the mapping's file."},
    {"file_sizes", py_file_sizes, METH_O,
     "file_sizes($module, mapping, /)\n--\n\n"
     "file_sizes(mapping) -> (size, allocated bytes)\n\nfstat of the mapping's file."},
    {"file_access", py_file_access, METH_O,
     "file_access($module, mapping, /)\n--\n\n"
     "file_access(mapping) -> (permission bits, group id)\n\nOf the mapping's file."},
    {"link_file", py_link_file, METH_VARARGS,
     "link_file($module, fd, path, mapping, /)\n--\n\n"
     "link_file(fd, path, mapping)\n\nName the file of fd (made by create_file) "
     "path, and remove the hidden name mapping holds it under, if any; FileExistsError "
     "if the name is taken."},
    {"opener", py_opener, METH_VARARGS,
     "opener($module, path, flags, /)\n--\n\n"
     "opener(path, flags) -> int\n\nopen(2) with O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC "
     "added: the opener of an io.FileIO that holds the descriptor before any Python "
     "runs."},
    {NULL}
};
