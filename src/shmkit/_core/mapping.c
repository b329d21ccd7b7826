/* mapping.c - a reserved shared mapping that exports buffers safely.
 *
 * Mapping(fd, reserve, length, readonly=False) maps `reserve` bytes of the
 * file with MAP_NORESERVE.  Only the first `length` bytes (kept no larger
 * than the file by the Python side) are ever exported or touched, so growing
 * the file needs no remap: raise `length` and new views see more.
 *
 * Views keep the mapping alive.  close() unmaps at once when no buffer is
 * exported; otherwise it returns False and the unmap happens when the last
 * view is released.  A dangling view is therefore impossible.
 *
 * A segment's mapping owns its open file (open_segment, or adopt_fd once
 * the caller holds it), closed when the mapping is freed or by detach(): a Ctrl-C
 * between the Python steps of an open or a close, which used to leave the
 * file open and with it the attach slot's lock, held for good, now only
 * delays the close until the mapping goes.
 */
#include "shmkit.h"
#include "wait.h"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <structmember.h>
#include <unistd.h>

/* Forks of this process so far (counted before each, so parent and child
 * both see the new count).  A view made before a fork lives on in the
 * child too, so an armed claim_word() no longer knows when the last
 * view anywhere is gone: it does not fire after a fork. */
static unsigned long forks;

static void
count_fork(void)
{
    __atomic_add_fetch(&forks, 1, __ATOMIC_RELAXED);
}

/* Where a large reservation goes.  Unmapping a range makes the kernel walk
 * the page-middle-directory entries of every 1 GiB region of it that has a
 * page table, and the region where an object begins always has one: a
 * 4 GiB reservation placed by the kernel cost 9.9 µs to unmap against 4.1
 * for a 64 MiB mapping, and 4.5 when the range began 2 MiB below a 1 GiB
 * boundary (benchmarks/reservation_cost.c).  Finding such a place costs
 * system calls that eat the gain, so the process remembers the ranges its
 * large reservations freed and puts the next one there, so that its first
 * `length` bytes (what gets touched) end at a 1 GiB boundary, its anchor:
 * below a range the kernel chose, the highest boundary that keeps the new
 * start at or below it (less than 1 GiB down); below a range so placed,
 * the same anchor again, whatever the new length.  So reservations never
 * creep down the address space (towards the heap) one shift after
 * another, and none goes below 4 GiB.  MAP_FIXED_NOREPLACE refuses when
 * anything lives there now (thread stacks and allocators' arenas often sit
 * just below a range the kernel chose), or when the range is a little
 * shorter than asked (lengths are kept in whole MiB): the reservation is
 * then placed inside 1 GiB more of address space that the kernel chooses,
 * the rest given back, two calls more once, so that a range that missed
 * is placed from its next use on rather than missing for good.  One word per
 * range, address >> 12 (45 bits; the anchor for a placed one), placed (1),
 * MiB (18), in a ring of eight, the newest tried first: taken and given
 * back with atomic operations, so that threads, and a child forked
 * mid-update, need no lock. */
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000 /* kernels before 4.17 take it as a hint */
#endif
#define SPOT_REGION (1ULL << 30)
#define SPOT_FLOOR (1ULL << 32)       /* keep the low 4 GiB to whoever needs it */
#define SPOT_MIN_SLACK (256ULL << 20) /* smaller reservations gain too little */
#define SPOT_MIB_BITS 18
#define SPOT_MAX_MIB ((1ULL << SPOT_MIB_BITS) - 1)
#define SPOT_PLACED (1ULL << SPOT_MIB_BITS)
#define N_SPOTS 8
static uint64_t spots[N_SPOTS];
static unsigned spot_next;

static int
placed_by_us(size_t reserve, size_t length)
{
    return reserve >= length + SPOT_MIN_SLACK && reserve >> 20 <= SPOT_MAX_MIB;
}

/* How far below its anchor a range begins: its touched part in whole
 * 2 MiB pages, modulo the region. */
static uint64_t
touched_below(size_t length)
{
    return (((uint64_t)length + (2ULL << 20) - 1) & ~((2ULL << 20) - 1)) % SPOT_REGION;
}

/* Where to try `reserve` bytes, from a freed range large enough, and its
 * anchor (*anchor); 0 when no range is kept. */
static uintptr_t
spot_take(size_t reserve, size_t length, uintptr_t *anchor)
{
    uint64_t below = touched_below(length);
    unsigned newest = __atomic_load_n(&spot_next, __ATOMIC_ACQUIRE);
    for (unsigned k = 1; k <= N_SPOTS; k++) { /* the latest freed first: still free */
        unsigned i = (newest - k) % N_SPOTS;
        uint64_t w = __atomic_load_n(&spots[i], __ATOMIC_RELAXED);
        if (w == 0 || (w & SPOT_MAX_MIB) < (uint64_t)reserve >> 20)
            continue;
        if (!__atomic_compare_exchange_n(&spots[i], &w, 0, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        uint64_t at = (w >> (SPOT_MIB_BITS + 1)) << 12;
        uint64_t bound = at; /* a placed range's anchor */
        if (!(w & SPOT_PLACED)) {
            /* the highest boundary with bound - below at or below the
             * freed range's start; unsigned, so checked first */
            uint64_t top = at + below;
            if (top < at)
                continue;
            bound = top - top % SPOT_REGION;
        }
        if (bound < below + SPOT_FLOOR)
            continue;
        *anchor = (uintptr_t)bound;
        return (uintptr_t)(bound - below);
    }
    return 0;
}

/* A fork waits for the placements under way (map_placed) to end: a child
 * forked in the middle of one has no thread to finish it, and would keep
 * its room, reserve + 1 GiB of address space, for life.  Placements share
 * the lock; fork's prepare handler takes it alone, its parent and child
 * handlers let go.  Only the misses take it. */
#ifdef PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
/* (a fork waiting goes before placements that come after it) */
#define PLACING_INITIALIZER PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
#else
#define PLACING_INITIALIZER PTHREAD_RWLOCK_INITIALIZER
#endif
static pthread_rwlock_t placing = PLACING_INITIALIZER;

static void
fork_prepare(void)
{
    count_fork();
    pthread_rwlock_wrlock(&placing);
}

static void
fork_parent(void)
{
    pthread_rwlock_unlock(&placing);
}

/* The child's only thread is not the one that took the lock (glibc tells a
 * writer by its thread id, and an unlock there counts as a reader's,
 * leaving the lock held for good): it starts with a fresh lock, nothing
 * placing in it. */
static unsigned long child_generation;

static void
fork_child(void)
{
    static const pthread_rwlock_t fresh = PLACING_INITIALIZER;
    placing = fresh;
    child_generation++;
}

unsigned long
shm_child_generation(void)
{
    return child_generation;
}

__thread unsigned long shm_thread_serial_given __attribute__((tls_model("initial-exec")));
static unsigned long thread_serials; /* the last given */

unsigned long
shm_thread_serial_first(void)
{
    return shm_thread_serial_given = __atomic_add_fetch(&thread_serials, 1, __ATOMIC_RELAXED);
}

/* map_placed's work, with the placements' lock shared. */
static void *
map_in_room(int fd, size_t reserve, size_t span, uint64_t below, int prot, int flags,
            uintptr_t *anchor)
{
    void *room = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (room == MAP_FAILED)
        return MAP_FAILED;
    uint64_t lo = (uint64_t)(uintptr_t)room;
    /* the lowest boundary at or above lo + below: the start is in [lo, lo + 1 GiB) */
    uint64_t bound = (lo + below + SPOT_REGION - 1) & ~(SPOT_REGION - 1);
    uint64_t start = bound - below;
    void *p = MAP_FAILED;
    errno = ENOMEM; /* (a room below the floor) */
    if (bound >= below + SPOT_FLOOR) /* over our own room: replaces nothing else */
        p = mmap((void *)(uintptr_t)start, reserve, prot, flags | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        munmap(room, span);
        errno = err;
        return MAP_FAILED;
    }
    /* the kernel maps whole pages: the slack begins at the page after the
     * reservation's last (a reserve of header + max_size need not be whole
     * pages, and munmap refuses an address inside one) */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t end = start + ((reserve + page - 1) & ~(page - 1));
    uint64_t room_end = lo + ((span + page - 1) & ~(page - 1));
    if (start > lo)
        munmap(room, (size_t)(start - lo));
    if (room_end > end)
        munmap((void *)(uintptr_t)end, (size_t)(room_end - end));
    *anchor = (uintptr_t)bound;
    return p;
}

/* After a miss: `reserve` bytes of fd placed so that their first `length`
 * end at a 1 GiB boundary (*anchor), inside reserve + 1 GiB of address
 * space the kernel chose, the slack unmapped; MAP_FAILED (errno set) when
 * the kernel has no such space or would put it below the floor. */
static void *
map_placed(int fd, size_t reserve, size_t length, int prot, int flags, uintptr_t *anchor)
{
    size_t span = reserve + (size_t)SPOT_REGION;
    if (span < reserve) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    pthread_rwlock_rdlock(&placing);
    void *p = map_in_room(fd, reserve, span, touched_below(length), prot, flags, anchor);
    int err = errno;
    pthread_rwlock_unlock(&placing);
    errno = err;
    return p;
}

static void
spot_give(void *base, size_t reserve, uintptr_t anchor)
{
    uint64_t addr = anchor != 0 ? (uint64_t)anchor : (uint64_t)(uintptr_t)base;
    uint64_t w = (addr >> 12) << (SPOT_MIB_BITS + 1) | (uint64_t)reserve >> 20;
    if (((w >> (SPOT_MIB_BITS + 1)) << 12) != addr)
        return; /* an address wider than the word holds */
    if (anchor != 0)
        w |= SPOT_PLACED;
    /* a ring: the oldest range, the likeliest to be taken by now, goes */
    unsigned i = __atomic_fetch_add(&spot_next, 1, __ATOMIC_ACQ_REL) % N_SPOTS;
    __atomic_store_n(&spots[i], w, __ATOMIC_RELEASE);
}

/* Map `reserve` bytes of fd into self (GIL held; released around mmap):
 * 0, or -1 with OSError. */
static int
mapping_map(MappingObject *self, int fd, Py_ssize_t reserve, Py_ssize_t length, int readonly,
            int hold_gil)
{
    int prot = readonly ? PROT_READ : PROT_READ | PROT_WRITE;
    int flags = MAP_SHARED | MAP_NORESERVE;
    uintptr_t spot = 0, anchor = 0;
    if (placed_by_us((size_t)reserve, (size_t)length))
        spot = spot_take((size_t)reserve, (size_t)length, &anchor);
    void *p = MAP_FAILED;
    PyThreadState *ts = hold_gil ? NULL : PyEval_SaveThread();
    if (spot != 0) {
        p = mmap((void *)spot, (size_t)reserve, prot, flags | MAP_FIXED_NOREPLACE, fd, 0);
        if (p != MAP_FAILED && (uintptr_t)p != spot)
            anchor = 0; /* an old kernel took the address as a hint only */
        else if (p == MAP_FAILED)
            p = map_placed(fd, (size_t)reserve, (size_t)length, prot, flags, &anchor);
    }
    if (p == MAP_FAILED) {
        anchor = 0;
        p = mmap(NULL, (size_t)reserve, prot, flags, fd, 0);
    }
    int err = errno;
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    errno = err;
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->base = p;
    shm_sigbus_register(p, reserve);
    self->reserve = reserve;
    self->length = length;
    self->readonly = readonly;
    self->fd = fd;
    self->anchor = anchor;
    self->token = 0;
    self->table_off = 0;
    self->max_slots = 0;
    self->event_spin_ns = SHM_WAIT_SPIN_NS;
    return 0;
}

/* The lists of mappings are linked through two fields of each
 * mapping (prev and next), and changed with the GIL held only. */
#define LIST_PUSH(head, m, prev, next)                                                   \
    do {                                                                                 \
        (m)->prev = NULL;                                                                \
        (m)->next = (head);                                                              \
        if ((head) != NULL)                                                              \
            (head)->prev = (m);                                                          \
        (head) = (m);                                                                    \
    } while (0)
#define LIST_REMOVE(head, m, prev, next)                                                 \
    do {                                                                                 \
        if ((m)->prev != NULL)                                                           \
            (m)->prev->next = (m)->next;                                                 \
        else                                                                             \
            (head) = (m)->next;                                                          \
        if ((m)->next != NULL)                                                           \
            (m)->next->prev = (m)->prev;                                                 \
        (m)->prev = (m)->next = NULL;                                                    \
    } while (0)

/* Every live mapping, from its creation to its dealloc: lock.c asks which
 * other handle of this process holds a lock (shm_lock_mine_elsewhere). */
static MappingObject *live_head;

MappingObject *
shm_mappings_live(void)
{
    return live_head;
}

static PyObject *
mapping_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    MappingObject *self = (MappingObject *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        self->owned_fd = self->fd_unclosed = -1; /* 0 would be a descriptor */
        LIST_PUSH(live_head, self, live_prev, live_next);
    }
    return (PyObject *)self;
}

static int
mapping_init(MappingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "reserve", "length", "readonly", NULL};
    int fd, readonly = 0;
    Py_ssize_t reserve, length;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inn|p", kwlist, &fd, &reserve,
                                     &length, &readonly))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Mapping is already initialised");
        return -1;
    }
    if (reserve <= 0 || length < 0 || length > reserve) {
        PyErr_Format(PyExc_ValueError,
                     "need 0 <= length (%zd) <= reserve (%zd) and reserve > 0",
                     length, reserve);
        return -1;
    }
    return mapping_map(self, fd, reserve, length, readonly, 0);
}

MappingObject *
shm_mapping_new(shm_state *st, int fd, Py_ssize_t reserve, Py_ssize_t length, int readonly,
                int hold_gil)
{
    MappingObject *self = (MappingObject *)mapping_new(st->Mapping, NULL, NULL);
    if (self == NULL)
        return NULL;
    if (mapping_map(self, fd, reserve, length, readonly, hold_gil) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

/* The file lent out.  A call that lets the GIL go with the descriptor in
 * hand (growing the file, punching a hole, fsync) borrows it: if another
 * thread, or a signal handler, closed the handle meanwhile, the process
 * could reuse the number at once for a file of its own, and the call would
 * go on with that one (a punched hole zeroed another file's pages).  So a
 * close while the file is lent leaves it open, as fd_unclosed, and the last
 * return closes it.  Borrowing threads exist only in the process that
 * borrowed: a forked child closes such files at once (forget_creations),
 * and its own closes do not wait for lends of its parent's.  Mappings whose
 * close waits are listed for that. */
static MappingObject *unclosed_head;

static void
unclosed_close(MappingObject *m)
{
    if (m->fd_unclosed < 0)
        return;
    close(m->fd_unclosed);
    m->fd_unclosed = -1;
    LIST_REMOVE(unclosed_head, m, unclosed_prev, unclosed_next);
}

int
shm_mapping_lend_fd(MappingObject *m)
{
    if (m->owned_fd < 0) {
        PyErr_SetString(shm_state_of((PyObject *)m)->ClosedError,
                        "the segment is closed in this process");
        return -1;
    }
    pid_t me = getpid();
    if (m->fd_lent > 0 && m->fd_lent_pid != me)
        m->fd_lent = 0; /* lends of the parent's threads, which this child lacks */
    m->fd_lent_pid = me;
    m->fd_lent++;
    return m->owned_fd;
}

void
shm_mapping_return_fd(MappingObject *m)
{
    if (m->fd_lent > 0 && --m->fd_lent == 0)
        unclosed_close(m);
}

/* Creations in progress (open.c's create_file until end_creation): a child
 * forked meanwhile (another thread of the parent was creating) must not keep
 * the file open, mapped or attached: its open file description would keep
 * the creator's init lock held after the creator died, and its slot would
 * make the unpublished file look like a damaged live object.  A list (a
 * Queue's payloads stay listed while they wait for room: any number). */
static MappingObject *creating_head;

void
shm_creating_add(MappingObject *m, int private)
{
    if (m->creator_thread != 0)
        return;
    m->creator_thread = PyThread_get_thread_ident();
    m->creating_private = private;
    LIST_PUSH(creating_head, m, creating_prev, creating_next);
}

static void
creating_remove(MappingObject *m)
{
    if (m->creator_thread == 0)
        return;
    LIST_REMOVE(creating_head, m, creating_prev, creating_next);
    m->creator_thread = 0;
}

/* Remove the hidden name a creation's file was made under (file systems
 * without O_TMPFILE), if this process made it: once the file is linked under
 * its own name, or let go of.  Owned by the mapping, so that no interrupt
 * between two Python steps can leave it in the directory. */
void
shm_mapping_drop_temp(MappingObject *m)
{
    if (m->temp_name == NULL)
        return;
    if (m->temp_pid == getpid())
        (void)unlink(m->temp_name);
    PyMem_RawFree(m->temp_name);
    m->temp_name = NULL;
}

/* In a forked child, let go of the file: private zero pages over the range
 * (views the child holds, made by a thread it does not have, keep valid
 * addresses; PROT_NONE where even that cannot be had), the descriptor
 * closed, the attachment forgotten, so that nothing in the child refers to
 * the parent's open file (its locks) or its pages. */
static void
mapping_abandon(MappingObject *m)
{
    creating_remove(m);
    shm_mapping_drop_temp(m); /* (the parent's: only forgotten here) */
    m->abandoned = 1;
    if (m->base != NULL &&
        mmap(m->base, (size_t)m->reserve, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED)
        (void)mmap(m->base, (size_t)m->reserve, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (m->owned_fd >= 0) {
        close(m->owned_fd);
        m->owned_fd = -1;
    }
    shm_attach_detach(m);
}

/* In a forked child: each mapping listed by another thread of the parent
 * (which the child does not have), or listed as private (a Queue's payload,
 * which only its sender may send), is abandoned (above; segment.py then
 * closes the handle).  A creation of the forking thread itself goes on in
 * the child: an init that forks its workers must see their writes. */
static PyObject *
py_forget_creations(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    unsigned long me = PyThread_get_thread_ident();
    MappingObject *next;
    for (MappingObject *m = creating_head; m != NULL; m = next) {
        next = m->creating_next;
        if (m->creator_thread != me || m->creating_private)
            mapping_abandon(m); /* (unlists it) */
    }
    /* files whose close waited for a use by a thread the child lacks */
    while (unclosed_head != NULL)
        unclosed_close(unclosed_head); /* (unlists it) */
    Py_RETURN_NONE;
}

static PyObject *mapping_close(MappingObject *self, PyObject *Py_UNUSED(ignored));

/* Mapping.abandon(): mapping_abandon, then close (unmapped now, or once the
 * last view goes). */
static PyObject *
mapping_abandon_py(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    mapping_abandon(self);
    return mapping_close(self, NULL);
}

static PyObject *
mapping_end_creation(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    creating_remove(self);
    Py_RETURN_NONE;
}

static void
mapping_unmap(MappingObject *self)
{
    if (self->base != NULL) {
        shm_sigbus_unregister(self->base);
        if (munmap(self->base, (size_t)self->reserve) == 0 &&
            placed_by_us((size_t)self->reserve, (size_t)self->length))
            spot_give(self->base, (size_t)self->reserve, self->anchor);
        self->base = NULL;
        self->length = 0;
    }
}

/* Close the file this mapping owns, if it is fd (any, for -1): at once, or
 * when the last use it is lent to ends. */
static void
mapping_close_owned(MappingObject *self, int fd)
{
    if (self->owned_fd < 0 || (fd >= 0 && fd != self->owned_fd))
        return;
    if (self->fd_lent > 0 && self->fd_lent_pid == getpid() && self->fd_unclosed < 0) {
        self->fd_unclosed = self->owned_fd;
        LIST_PUSH(unclosed_head, self, unclosed_prev, unclosed_next);
    } else {
        close(self->owned_fd);
    }
    self->owned_fd = -1;
}

static void
mapping_dealloc(MappingObject *self)
{
    /* Exports hold a reference, so none can remain here. */
    creating_remove(self);
    shm_mapping_drop_temp(self);
    mapping_unmap(self);
    mapping_close_owned(self, -1); /* (a borrower holds a reference: none lends it now) */
    unclosed_close(self);
    LIST_REMOVE(live_head, self, live_prev, live_next);
    shm_free_instance((PyObject *)self);
}

/* Own fd from now on.  Called once the caller holds the mapping where its
 * clean-up finds it: owned at construction, a Ctrl-C as the constructor
 * returned would drop the mapping, closing fd, and the caller, which never
 * saw the mapping, would close fd again. */
static PyObject *
mapping_adopt_fd(MappingObject *self, PyObject *arg)
{
    int fd;
    if (!PyArg_Parse(arg, "i", &fd))
        return NULL;
    if (fd < 0 || (self->owned_fd >= 0 && self->owned_fd != fd)) {
        PyErr_Format(PyExc_ValueError, "cannot adopt file descriptor %d", fd);
        return NULL;
    }
    self->owned_fd = fd;
    Py_RETURN_NONE;
}

static PyObject *
mapping_close(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    creating_remove(self); /* a creation given up: no more to forget in a child */
    shm_mapping_drop_temp(self);
    if (self->exports > 0) {
        self->closing = 1;
        Py_RETURN_FALSE;
    }
    mapping_unmap(self);
    Py_RETURN_TRUE;
}

static int
path_or_none(PyObject *obj, void *out)
{
    if (obj == Py_None) {
        *(PyObject **)out = NULL;
        return 1;
    }
    return PyUnicode_FSConverter(obj, out);
}

/* A handle's close in one step, so that a Ctrl-C cannot split it: end the
 * "attached" lifetime when given the path (drop our lock, remove the name if
 * we were the last: shm_attach_end), forget the attachment, close its file
 * (fd, if this mapping owns it: a second detach, from a thread that raced
 * the first, must not close a number the process may have reused meanwhile;
 * the slot's lock goes with the file), and close the mapping. */
static PyObject *
mapping_detach(MappingObject *self, PyObject *args)
{
    int fd;
    PyObject *path = NULL;
    if (!PyArg_ParseTuple(args, "i|O&", &fd, path_or_none, &path))
        return NULL;
    /* No Python code runs inside: a signal handler's close runs before or
     * after.  Another thread's close may run while the lifetime's end lets
     * the GIL go: that end runs once, on the file it borrowed, which the
     * other close leaves open until the end is done. */
    if (path != NULL && fd >= 0 && fd == self->owned_fd)
        shm_attach_end(self, PyBytes_AS_STRING(path));
    Py_XDECREF(path);
    shm_attach_detach(self);
    if (fd >= 0)
        mapping_close_owned(self, fd);
    return mapping_close(self, NULL);
}

static PyObject *
mapping_set_length(MappingObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (self->base == NULL) {
        PyErr_SetString(shm_state_of((PyObject *)self)->ClosedError,
                        "the segment is closed in this process (by another thread?); "
                        "open it again");
        return NULL;
    }
    if (n < 0 || n > self->reserve) {
        PyErr_Format(PyExc_ValueError,
                     "length %zd is outside the reserved %zd bytes", n, self->reserve);
        return NULL;
    }
    self->length = n;
    Py_RETURN_NONE;
}

static int
mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags)
{
    if (self->base == NULL || self->closing) {
        PyErr_SetString(shm_state_of((PyObject *)self)->ClosedError,
                        "the segment is closed in this process (by another thread?); "
                        "open it again");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base, self->length,
                          self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
mapping_releasebuffer(MappingObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
    if (self->exports != 0)
        return;
    /* No view is left to read the bytes: the armed swap may tell a writer
     * so.  The length may have been lowered since it was armed. */
    if (self->idle_armed) {
        self->idle_armed = 0;
        if (self->base != NULL && self->idle_off <= self->length - 4 &&
            self->idle_forks == __atomic_load_n(&forks, __ATOMIC_RELAXED)) {
            uint32_t expected = self->idle_expected;
            __atomic_compare_exchange_n((uint32_t *)(self->base + self->idle_off), &expected,
                                        self->idle_value, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED);
        }
    }
    if (self->closing)
        mapping_unmap(self);
}

/* claim_word(offset, expected, held, idle, gone, path, dev, ino), in one
 * step (a Queue receiver's claim of a pooled payload file once the object
 * is its own: no interrupt can fall between the parts, nor split them from
 * the message's end).  If the 32-bit word at offset holds expected, it
 * becomes held while views of the mapping are alive and idle once the last
 * goes (at once if none is): the sender sees when the receiver is done.
 * If it holds gone instead (the sender let the file go to its receiver),
 * the file is the caller's alone: path is removed if it still names file
 * (dev, ino).  Returns the word found.  After a fork, the child holds the
 * views too: the armed swap no longer fires. */
static PyObject *
mapping_claim_word(MappingObject *self, PyObject *args)
{
    Py_ssize_t off;
    unsigned int expected, held, idle, gone;
    const char *path;
    unsigned long long dev, ino;
    if (!PyArg_ParseTuple(args, "nIIIIyKK:claim_word", &off, &expected, &held, &idle, &gone,
                          &path, &dev, &ino))
        return NULL;
    if (self->base == NULL || self->closing) {
        PyErr_SetString(shm_state_of((PyObject *)self)->ClosedError,
                        "the segment is closed in this process (by another thread?); "
                        "open it again");
        return NULL;
    }
    if (self->readonly) {
        PyErr_SetString(PyExc_ValueError, "the mapping is read-only: nothing can be stored");
        return NULL;
    }
    if (off < 0 || (off & 3) || self->length < 4 || off > self->length - 4) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is not an aligned 4-byte word within the %zd bytes",
                     off, self->length);
        return NULL;
    }
    uint32_t *word = (uint32_t *)(self->base + off);
    uint32_t found = (uint32_t)expected;
    if (__atomic_compare_exchange_n(word, &found, self->exports > 0 ? held : idle, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (self->exports > 0) {
            self->idle_forks = __atomic_load_n(&forks, __ATOMIC_RELAXED);
            self->idle_off = off;
            self->idle_expected = (uint32_t)held;
            self->idle_value = (uint32_t)idle;
            self->idle_armed = 1;
        }
    } else if (found == (uint32_t)gone) {
        struct stat st;
        if (lstat(path, &st) == 0 && (unsigned long long)st.st_dev == dev &&
            (unsigned long long)st.st_ino == ino)
            (void)unlink(path); /* gone meanwhile (gc): nothing left to do */
    }
    return PyLong_FromUnsignedLong(found);
}

static PyObject *
mapping_get_address(MappingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromVoidPtr(self->base);
}

/* The removal was this process's: its clean-up hook is this process's to
 * run (a child forked meanwhile inherits the mark, and the hook, too). */
static PyObject *
mapping_get_removed_here(MappingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->name_removed != 0 && self->name_removed == (int)getpid());
}

static PyObject *
mapping_get_closed(MappingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->base == NULL || self->closing);
}

/* After a fork: open the file again, through /proc/self/fd/old_fd, for an
 * open file of the child's own, and map it over the same addresses.  The
 * mapping inherited from the parent holds the parent's open file
 * description, and with it the parent's OFD locks (its attach slot): were
 * the parent to die, it would pass for alive, and its locks could not be
 * taken over, for as long as the child lived.  MAP_FIXED replaces the whole
 * reservation in one step; views keep their addresses and see the same
 * pages.  Then the mapping owns the new descriptor and closes the inherited
 * one: one call, so that an interrupt cannot strand either.  Runs in the
 * forked child's only thread.  The new descriptor, or OSError with old_fd
 * still owned and mapped. */
static PyObject *
mapping_reopen_file(MappingObject *self, PyObject *arg)
{
    int old_fd;
    if (!PyArg_Parse(arg, "i", &old_fd))
        return NULL;
    if (self->base == NULL)
        return PyLong_FromLong(old_fd); /* unmapped: nothing maps the file */
    if (old_fd < 0 || self->owned_fd != old_fd) {
        PyErr_Format(PyExc_ValueError, "reopen_file: the mapping does not own descriptor %d",
                     old_fd);
        return NULL;
    }
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", old_fd);
    int fd = open(proc, (self->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int prot = self->readonly ? PROT_READ : PROT_READ | PROT_WRITE;
    int flags = MAP_SHARED | MAP_NORESERVE | MAP_FIXED;
    if (mmap(self->base, (size_t)self->reserve, prot, flags, fd, 0) == MAP_FAILED) {
        int err = errno;
        (void)mmap(self->base, (size_t)self->reserve, prot, flags, old_fd, 0);
        close(fd);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->owned_fd = fd;
    close(old_fd);             /* (the parent's threads' lends of it: see lend_fd) */
    self->lifetime_ended = 0;  /* a parent's thread was closing: the child's own */
    return PyLong_FromLong(fd);
}

static PyMethodDef mapping_methods[] = {
    {"close", (PyCFunction)mapping_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "close() -> bool\n\nUnmap now and return True, or, while views are still "
     "exported, return False and unmap when the last one is released."},
    {"detach", (PyCFunction)mapping_detach, METH_VARARGS,
     "detach($self, fd, path=None, /)\n--\n\n"
     "detach(fd, path=None) -> bool\n\nWith path (the \"attached\" lifetime): drop "
     "this attachment's lock and remove path if it still names the file and nobody "
     "else is attached (name_removed then says so).  Then forget the attachment, close "
     "fd if this mapping owns it "
     "(its slot's lock goes with it) and close the mapping, in one step; close()'s "
     "result."},
    {"abandon", (PyCFunction)mapping_abandon_py, METH_NOARGS,
     "abandon($self, /)\n--\n\n"
     "abandon() -> bool\n\nIn a forked child: map private zero pages over the range "
     "(views made by a thread the child does not have stay valid), close the file "
     "this mapping owns and forget the attachment, then close(), so that the child "
     "keeps nothing of the parent's file."},
    {"end_creation", (PyCFunction)mapping_end_creation, METH_NOARGS,
     "end_creation($self, /)\n--\n\n"
     "The creation this mapping was made for is published (or given up): a "
     "child forked from now on keeps it like any other."},
    {"adopt_fd", (PyCFunction)mapping_adopt_fd, METH_O,
     "adopt_fd($self, fd, /)\n--\n\n"
     "Own fd: it is closed with the mapping (when freed, or by detach(fd))."},
    {"claim_word", (PyCFunction)mapping_claim_word, METH_VARARGS,
     "claim_word($self, offset, expected, held, idle, gone, path, dev, ino, /)\n--\n\n"
     "In one step: if the 32-bit word at offset holds expected, make it held "
     "while views of the mapping are alive and idle once the last is released "
     "(at once if none is); if it holds gone instead, remove path if it still "
     "names file (dev, ino).  Returns the word found.  After a fork the swap "
     "to idle no longer fires (the child holds views too)."},
    {"reopen_file", (PyCFunction)mapping_reopen_file, METH_O,
     "reopen_file($self, old_fd, /)\n--\n\n"
     "reopen_file(old_fd) -> int\n\nIn a forked child: open the file of old_fd "
     "again (the child's own open file), map it over the same addresses, own the "
     "new descriptor and close old_fd, so that the mapping no longer keeps the "
     "parent's open file, and its locks, alive.  OSError if that fails (old_fd "
     "still owned and mapped)."},
    {"set_length", (PyCFunction)mapping_set_length, METH_O,
     "set_length($self, n, /)\n--\n\n"
     "Set how many bytes are safe to touch (at most reserve). "
     "The caller guarantees the file is at least that long."},
    {NULL}
};

static PyMemberDef mapping_members[] = {
    {"reserve", T_PYSSIZET, offsetof(MappingObject, reserve), READONLY,
     "bytes of address space reserved"},
    {"length", T_PYSSIZET, offsetof(MappingObject, length), READONLY,
     "bytes currently exported by new views"},
    {"exports", T_PYSSIZET, offsetof(MappingObject, exports), READONLY,
     "buffers exported and not yet released"},
    {"readonly", T_INT, offsetof(MappingObject, readonly), READONLY, NULL},
    {"name_removed", T_INT, offsetof(MappingObject, name_removed), READONLY,
     "the pid of the process that removed the segment's name through this mapping "
     "(its parent's, in a forked child), or 0"},
    {"abandoned", T_INT, offsetof(MappingObject, abandoned), READONLY,
     "a forked child let go of it while another thread was creating it"},
    {"fd", T_INT, offsetof(MappingObject, fd), READONLY,
     "the segment's file descriptor used for liveness (set by attach_claim)"},
    {"token", T_UINT, offsetof(MappingObject, token), READONLY,
     "our lock-owner token (set by attach_claim, cleared by attach_detach)"},
    {"table_off", T_PYSSIZET, offsetof(MappingObject, table_off), 0,
     "byte offset of the attach table"},
    {"max_slots", T_UINT, offsetof(MappingObject, max_slots), 0,
     "number of attach-table slots"},
    {NULL}
};

static PyObject *
mapping_get_held_count(MappingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(shm_lock_held_count(self));
}

static PyGetSetDef mapping_getset[] = {
    {"held_count", (getter)mapping_get_held_count, NULL,
     "robust locks of this segment that threads of this process hold now", NULL},
    {"address", (getter)mapping_get_address, NULL, "base address (for diagnostics)", NULL},
    {"closed", (getter)mapping_get_closed, NULL, "True once close() was called", NULL},
    {"removed_here", (getter)mapping_get_removed_here, NULL,
     "True if this process removed the segment's name through this mapping", NULL},
    {NULL}
};

static PyType_Slot mapping_slots[] = {
    {Py_tp_dealloc, mapping_dealloc},
    {Py_bf_getbuffer, mapping_getbuffer},
    {Py_bf_releasebuffer, mapping_releasebuffer},
    {Py_tp_doc, "Mapping(fd, reserve, length, readonly=False)\n--\n\n"
                "A shared mapping of `reserve` bytes of which the first `length` "
                "are exported as buffers."},
    {Py_tp_methods, mapping_methods},
    {Py_tp_members, mapping_members},
    {Py_tp_getset, mapping_getset},
    {Py_tp_init, mapping_init},
    {Py_tp_new, mapping_new},
    {0, NULL},
};

static PyType_Spec mapping_spec = {
    .name = "shmkit._core.Mapping",
    .basicsize = sizeof(MappingObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = mapping_slots,
};

int
shm_is_mapping(PyObject *obj)
{
    return Py_TYPE(obj)->tp_dealloc == (destructor)mapping_dealloc;
}

int
shm_check_mapping(PyObject *obj)
{
    if (obj == NULL) { /* a handle made with __new__ and never initialised */
        PyErr_SetString(PyExc_TypeError, "this shmkit object was never initialised: "
                        "make it by calling its class, not its __new__");
        return -1;
    }
    if (shm_is_mapping(obj))
        return 0;
    PyErr_Format(PyExc_TypeError, "expected a shmkit Mapping, got %.100s",
                 Py_TYPE(obj)->tp_name);
    return -1;
}

int
shm_mapping_converter(PyObject *obj, void *out)
{
    if (shm_check_mapping(obj) < 0)
        return 0;
    *(PyObject **)out = obj;
    return 1;
}

/* Does a PEP 3118 format hold Python object references ('O')?  Field names,
 * between colons, are skipped: a name may contain the letter. */
static int
format_has_objects(const char *f)
{
    for (; f != NULL && *f; f++) {
        if (*f == ':') {
            const char *end = strchr(f + 1, ':');
            if (end == NULL)
                return 0;
            f = end;
        }
        else if (*f == 'O')
            return 1;
    }
    return 0;
}

/* For an exporter that gives no format (numpy, for a dtype PEP 3118 cannot
 * spell: datetime64, or a structure holding one): does o.dtype.hasobject
 * say it holds Python objects?  Any failure to tell is a no. */
static int
dtype_has_objects(PyObject *o)
{
    PyObject *dt = PyObject_GetAttrString(o, "dtype");
    PyObject *has = dt == NULL ? NULL : PyObject_GetAttrString(dt, "hasobject");
    int r = has == NULL ? 0 : PyObject_IsTrue(has);
    Py_XDECREF(dt);
    Py_XDECREF(has);
    PyErr_Clear();
    return r > 0;
}

int
shm_writable_bytes(PyObject *o, Py_buffer *b, const char *call)
{
    int objects;
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0)
        objects = format_has_objects(b->format);
    else {
        PyErr_Clear();
        if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s needs a writable, contiguous buffer (bytearray, "
                         "memoryview, numpy array), not %.100s", call, Py_TYPE(o)->tp_name);
            return -1;
        }
        objects = dtype_has_objects(o);
    }
    if (objects) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_TypeError, "%s cannot write into a %.100s of Python objects: "
                     "bytes written over its object references would crash the process; "
                     "pass a buffer of bytes or numbers", call, Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

void *
shm_addr(PyObject *obj, long long off, Py_ssize_t size, int writable)
{
    if (shm_check_mapping(obj) < 0)
        return NULL;
    MappingObject *m = (MappingObject *)obj;
    shm_state *st = shm_state_of(obj);
    if (m->base == NULL) {
        PyErr_SetString(st->ClosedError, "the segment is closed in this process; open it "
                        "again to use it");
        return NULL;
    }
    if (off < 0 || size < 0 || off > (long long)m->length - size) {
        PyErr_Format(st->CorruptError,
                     "offset %lld (+%zd bytes) is outside the segment's %zd bytes",
                     off, size, m->length);
        return NULL;
    }
    if (size > 1 && (off % size) != 0) {
        PyErr_Format(st->CorruptError,
                     "offset %lld is not aligned to %zd bytes", off, size);
        return NULL;
    }
    if (writable && m->readonly) {
        PyErr_SetString(st->ReadOnlyError,
                        "the segment was opened readonly=True; open it without "
                        "readonly to change it");
        return NULL;
    }
    return m->base + off;
}

void *
shm_span(PyObject *obj, long long off, uint64_t size, int writable)
{
    char *p = shm_addr(obj, off, 8, writable);
    if (p == NULL)
        return NULL;
    MappingObject *m = (MappingObject *)obj;
    if (size > (uint64_t)m->length || (uint64_t)off > (uint64_t)m->length - size) {
        PyErr_Format(shm_state_of(obj)->CorruptError,
                     "offset %lld (+%llu bytes) is outside the segment's %zd bytes", off,
                     (unsigned long long)size, m->length);
        return NULL;
    }
    return p;
}

void
shm_pin(PyObject *obj)
{
    Py_INCREF(obj);
    ((MappingObject *)obj)->exports++;
}

void
shm_unpin(PyObject *obj)
{
    mapping_releasebuffer((MappingObject *)obj, NULL);
    Py_DECREF(obj);
}

static PyObject *
py_thread_serial(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(shm_thread_serial());
}

static PyObject *
py_check_writable_bytes(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "check_writable_bytes(buffer, call) takes a "
                        "buffer and a str");
        return NULL;
    }
    const char *call = PyUnicode_AsUTF8(args[1]);
    Py_buffer b;
    if (call == NULL || shm_writable_bytes(args[0], &b, call) < 0)
        return NULL;
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

PyMethodDef shm_mapping_methods[] = {
    {"check_writable_bytes", (PyCFunction)(void (*)(void))py_check_writable_bytes,
     METH_FASTCALL,
     "check_writable_bytes($module, buffer, call, /)\n--\n\n"
     "check_writable_bytes(buffer, call) -> None\n\n"
     "Refuse (TypeError naming call) a buffer raw bytes may not be copied into: not\n"
     "writable, not contiguous, or of Python objects (a numpy object array)."},
    {"thread_serial", py_thread_serial, METH_NOARGS,
     "thread_serial($module, /)\n--\n\n"
     "thread_serial() -> int\n\nThe calling thread's serial number: never 0, and never "
     "given to another thread of this process, unlike threading.get_ident(), which the "
     "next thread is given once one ends."},
    {"forget_creations", py_forget_creations, METH_NOARGS,
     "forget_creations($module, /)\n--\n\n"
     "forget_creations()\n\nIn a forked child: let go of the files of other "
     "threads' creations in progress (their mappings are marked abandoned), and close "
     "the files of closed handles that the parent's threads still had in use."},
    {NULL}
};

int
shm_init_mapping(PyObject *module)
{
    static int counting;
    if (!counting) {
        if (pthread_atfork(fork_prepare, fork_parent, fork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return -1;
        }
        counting = 1;
    }
    return shm_add_type(module, &mapping_spec, &shm_mod_state(module)->Mapping);
}
