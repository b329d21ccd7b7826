/* uring.c - awaited waits woken by the kernel through io_uring.
 *
 * An event loop cannot sleep on a futex word, but it can poll a file
 * descriptor.  A Uring is one io_uring instance; each watch() hands the
 * futex word of one bound description (waitset.h's Watch, the protocol of
 * wait_ready) to the kernel as an IORING_OP_FUTEX_WAIT (Linux 6.7+), and
 * the completion that the waker's FUTEX_WAKE posts makes the ring's fd
 * readable: the loop's own epoll wakes, one wake-up per hop, no thread.
 *
 *   u = Uring()                 UringUnavailableError (an OSError) when the
 *                               kernel, seccomp or io_uring_disabled refuse
 *   u.watch(desc, key) -> bool  True: ready now (nothing in flight).  False:
 *                               armed (counted a sleeper) and in flight; the
 *                               mapping stays pinned and the target held
 *   u.reap() -> [key, ...]      the watches that completed (woken, or the
 *                               word changed first): disarmed and freed
 *   u.cancel(key) -> [key, ...] take the watch `key` out of flight now (its
 *                               completion is awaited here, so it is
 *                               disarmed and freed on return); the keys of
 *                               other completions met meanwhile
 *   u.fileno(), u.close(), len(u) (watches in flight)
 *
 * Cancelled watches are never reported.  A released lock or an auto-reset
 * event wakes one sleeper, and it may have been a watch, which takes
 * nothing: when such a watch was woken and the object is ready, the wake-up
 * is passed on (as wait_ready does).  After fork() a child never touches
 * its parent's ring or sleeper counts: close() there only unmaps and drops
 * its own references.
 *
 * No liburing: the three system calls and the uapi header's structures.
 * The GIL is held throughout (a cancellation's completion is posted
 * synchronously by the kernel, or by task work that our own
 * io_uring_enter runs), so one Uring is never used by two threads at once.
 */
#include <errno.h>
#include <pthread.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "waitset.h"

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif

#define U_OP_FUTEX_WAIT 51            /* IORING_OP_FUTEX_WAIT, Linux 6.7 */
#define U_FUTEX2_SIZE_U32 0x02        /* shared (no FUTEX2_PRIVATE): keyed on the page */
#define U_FUTEX_BITSET_ANY 0xffffffffu
#define U_CANCEL_ANY (1U << 2)        /* IORING_ASYNC_CANCEL_ANY, Linux 5.19 */
#define U_SQ_ENTRIES 256
#define U_CQ_ENTRIES 8192
#define U_BATCH 64                    /* completions taken off the ring at once */

typedef struct {
    Watch w;
    PyObject *target;  /* the description's target, held while in flight */
    PyObject *key;
} UWatch;

typedef struct {
    PyObject_HEAD
    int fd;
    unsigned forks;       /* fork_count when it was set up: another in a child */
    void *sq_ring, *cq_ring;
    size_t sq_len, cq_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_flags, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    PyObject *inflight;   /* key -> int (the UWatch's address) */
} UringObject;

/* Forks seen by this process, so that telling a parent's ring in a child
 * costs no getpid() system call on every watch, reap and completion. */
static unsigned fork_count;

static void
count_fork(void)
{
    fork_count++;
}

/* Set up by this process (not inherited through fork()). */
static inline int
mine(const UringObject *u)
{
    return u->forks == fork_count;
}

static long
enter(int fd, unsigned submit, unsigned complete, unsigned flags)
{
    return syscall(__NR_io_uring_enter, fd, submit, complete, flags, NULL, 0);
}

/* ---- setting up and tearing down ----------------------------------------- */

static void
unmap_ring(UringObject *u)
{
    if (u->sqes != NULL)
        munmap(u->sqes, u->sqes_len);
    if (u->cq_ring != NULL && u->cq_ring != u->sq_ring)
        munmap(u->cq_ring, u->cq_len);
    if (u->sq_ring != NULL)
        munmap(u->sq_ring, u->sq_len);
    u->sqes = NULL;
    u->sq_ring = u->cq_ring = NULL;
    if (u->fd >= 0)
        close(u->fd);
    u->fd = -1;
}

static PyObject *
unavailable(PyTypeObject *type, int err, const char *what)
{
    /* Uring is not subclassable: type is the module's own type */
    PyObject *mod = PyType_GetModule(type);
    if (mod == NULL)
        return NULL;
    PyObject *exc = PyObject_GetAttrString(mod, "UringUnavailableError");
    if (exc == NULL)
        return NULL;
    PyObject *msg = PyUnicode_FromFormat(
        "io_uring cannot wake awaits here (%s: %s); shmkit.aio uses watcher threads "
        "instead", what, err ? strerror(err) : "not supported by this kernel");
    if (msg != NULL) {
        PyObject *args = Py_BuildValue("(iO)", err ? err : ENOSYS, msg);
        if (args != NULL)
            PyErr_SetObject(exc, args);
        Py_XDECREF(args);
        Py_DECREF(msg);
    }
    Py_DECREF(exc);
    return NULL;
}

/* One of the ring's three shared areas, or NULL with the error set. */
static void *
map_part(PyTypeObject *type, int fd, size_t len, off_t off, const char *what)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off);
    if (p != MAP_FAILED)
        return p;
    unavailable(type, errno, what);
    return NULL;
}

/* 1 if the kernel supports opcodes FUTEX_WAIT and ASYNC_CANCEL. */
static int
probe(int fd)
{
    enum { OPS = 256 };
    size_t len = sizeof(struct io_uring_probe) + OPS * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *p = PyMem_Calloc(1, len);
    if (p == NULL)
        return -1;
    int ok = 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PROBE, p, OPS) == 0)
        ok = p->last_op >= U_OP_FUTEX_WAIT &&
             (p->ops[U_OP_FUTEX_WAIT].flags & IO_URING_OP_SUPPORTED) &&
             (p->ops[IORING_OP_ASYNC_CANCEL].flags & IO_URING_OP_SUPPORTED);
    PyMem_Free(p);
    return ok;
}

static PyObject *
Uring_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kw != NULL && PyDict_GET_SIZE(kw) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Uring() takes no arguments");
        return NULL;
    }
    UringObject *u = (UringObject *)type->tp_alloc(type, 0);
    if (u == NULL)
        return NULL;
    u->fd = -1;
    u->forks = fork_count;
    if ((u->inflight = PyDict_New()) == NULL)
        goto fail;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
    p.cq_entries = U_CQ_ENTRIES;
    long fd = syscall(__NR_io_uring_setup, U_SQ_ENTRIES, &p);
    if (fd < 0) {
        unavailable(type, errno, "io_uring_setup");
        goto fail;
    }
    u->fd = (int)fd;
    int ok = probe(u->fd);
    if (ok <= 0) {
        if (ok == 0)
            unavailable(type, 0, "IORING_OP_FUTEX_WAIT");
        goto fail;
    }
    if (!(p.features & IORING_FEAT_NODROP)) {
        unavailable(type, 0, "IORING_FEAT_NODROP");
        goto fail;
    }
    u->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_len > u->sq_len)
            u->sq_len = u->cq_len;
        u->cq_len = u->sq_len;
    }
    if ((u->sq_ring = map_part(type, u->fd, u->sq_len, IORING_OFF_SQ_RING,
                               "mmap of the submission ring")) == NULL)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        u->cq_ring = u->sq_ring;
    else if ((u->cq_ring = map_part(type, u->fd, u->cq_len, IORING_OFF_CQ_RING,
                                    "mmap of the completion ring")) == NULL)
        goto fail;
    u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    if ((u->sqes = map_part(type, u->fd, u->sqes_len, IORING_OFF_SQES,
                            "mmap of the submission entries")) == NULL)
        goto fail;
    char *s = u->sq_ring, *c = u->cq_ring;
    u->sq_head = (unsigned *)(s + p.sq_off.head);
    u->sq_tail = (unsigned *)(s + p.sq_off.tail);
    u->sq_mask = (unsigned *)(s + p.sq_off.ring_mask);
    u->sq_flags = (unsigned *)(s + p.sq_off.flags);
    u->sq_array = (unsigned *)(s + p.sq_off.array);
    u->cq_head = (unsigned *)(c + p.cq_off.head);
    u->cq_tail = (unsigned *)(c + p.cq_off.tail);
    u->cq_mask = (unsigned *)(c + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(c + p.cq_off.cqes);
    return (PyObject *)u;
fail:
    Py_DECREF(u);
    return NULL;
}

/* ---- submitting -------------------------------------------------------- */

/* Queue one entry and submit it: 0, or -1 with OSError set (nothing left
 * queued: an entry the kernel did not take is taken back). */
static int
submit(UringObject *u, const struct io_uring_sqe *e)
{
    unsigned tail = *u->sq_tail;
    unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= U_SQ_ENTRIES) { /* never: every entry is submitted at once */
        PyErr_SetString(PyExc_OSError, "io_uring submission ring full");
        return -1;
    }
    unsigned i = tail & *u->sq_mask;
    u->sqes[i] = *e;
    u->sq_array[i] = i;
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
    for (;;) {
        long r = enter(u->fd, 1, 0, 0);
        if (r == 1)
            return 0;
        int err = r < 0 ? errno : EAGAIN;
        if (err == EINTR)
            continue;
        if (__atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE) != tail + 1)
            __atomic_store_n(u->sq_tail, tail, __ATOMIC_RELEASE); /* not taken */
        else
            return 0; /* taken (its completion reports any failure) */
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

/* ---- completing ---------------------------------------------------------- */

/* A watch leaves flight: disarm, pass a wake-up it took for nothing on,
 * unpin.  Its references go to `graves` (dropped by the caller once the
 * ring's state is consistent: a finaliser they run may call back in); the
 * key is appended to `out` unless cancelled or `out` is NULL. */
static void
finish(UringObject *u, UWatch *uw, int res, PyObject *out, PyObject *graves)
{
    Watch *w = &uw->w;
    int gone = watch_gone(w);
    if (mine(u)) {
        w_disarm(w);
        uint32_t v;
        if (res == 0 && !gone && (w->kind == W_LOCK || w->kind == W_EVENT) && w_ready(w, &v))
            shm_futex_wake(w->word, 1);
    }
    PyObject *key = uw->key, *pin = w->pin, *target = uw->target;
    Py_INCREF(pin); /* shm_unpin drops the pin's reference; graves get ours */
    shm_unpin(pin);
    if (PyDict_DelItem(u->inflight, key) < 0)
        PyErr_Clear();
    if (out != NULL && res != -ECANCELED && PyList_Append(out, key) < 0)
        PyErr_Clear(); /* out of memory: the caller's timeout or checker still wakes it */
    PyMem_Free(uw);
    PyObject *refs[3] = {key, pin, target};
    for (int k = 0; k < 3; k++) {
        if (graves != NULL && PyList_Append(graves, refs[k]) < 0)
            PyErr_Clear(); /* out of memory: dropped at once below */
        Py_DECREF(refs[k]);
    }
}

/* Take every completion off the ring and finish its watch; *found set when
 * `target`'s completion was among them.  0, or -1 with an error set. */
static int
drain(UringObject *u, PyObject *out, PyObject *graves, UWatch *target, int *found)
{
    for (;;) {
        struct io_uring_cqe got[U_BATCH];
        int n = 0;
        unsigned head = *u->cq_head;
        unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        while (head != tail && n < U_BATCH)
            got[n++] = u->cqes[head++ & *u->cq_mask];
        __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
        for (int k = 0; k < n; k++) {
            UWatch *uw = (UWatch *)(uintptr_t)got[k].user_data;
            if (uw == NULL)
                continue; /* a cancellation's own completion */
            if (uw == target)
                *found = 1;
            finish(u, uw, got[k].res, out, graves);
        }
        if (n == U_BATCH)
            continue;
        if (__atomic_load_n(u->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) {
            /* the kernel kept completions that did not fit: bring them in */
            if (enter(u->fd, 0, 0, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            continue;
        }
        return 0;
    }
}

/* Wait (GIL held) until a completion is there. */
static int
await_completion(UringObject *u)
{
    while (enter(u->fd, 0, 1, IORING_ENTER_GETEVENTS) < 0) {
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

/* Cancel every watch in flight and wait for their completions; forcibly
 * finish any the kernel did not give back. */
static void
cancel_all(UringObject *u, PyObject *graves)
{
    if (u->fd >= 0 && mine(u) && PyDict_GET_SIZE(u->inflight) > 0) {
        struct io_uring_sqe e;
        memset(&e, 0, sizeof e);
        e.opcode = IORING_OP_ASYNC_CANCEL;
        e.fd = -1;
        e.cancel_flags = U_CANCEL_ANY;
        int dummy = 0;
        if (submit(u, &e) == 0)
            while (PyDict_GET_SIZE(u->inflight) > 0)
                if (drain(u, NULL, graves, NULL, &dummy) < 0 ||
                    (PyDict_GET_SIZE(u->inflight) > 0 && await_completion(u) < 0))
                    break;
        PyErr_Clear();
    }
    /* Not given back (an error above) or a forked child's copies: the ring
     * is closed next, and with it the kernel's waits. */
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_GET_SIZE(u->inflight) > 0) {
        pos = 0;
        if (!PyDict_Next(u->inflight, &pos, &k, &v))
            break;
        finish(u, (UWatch *)PyLong_AsVoidPtr(v), -ECANCELED, NULL, graves);
    }
}

static void
Uring_close_impl(UringObject *u)
{
    PyObject *graves = PyList_New(0);
    if (graves == NULL)
        PyErr_Clear();
    if (u->inflight != NULL)
        cancel_all(u, graves);
    unmap_ring(u);
    Py_XDECREF(graves);
}

static void
Uring_dealloc(UringObject *u)
{
    PyObject_GC_UnTrack(u);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    Uring_close_impl(u);
    PyErr_Restore(et, ev, tb);
    Py_CLEAR(u->inflight);
    shm_free_instance((PyObject *)u);
}

static int
Uring_traverse(UringObject *u, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(u));
    Py_VISIT(u->inflight);
    return 0;
}

static int
Uring_clear(UringObject *u)
{
    Uring_close_impl(u);
    return 0;
}

/* ---- the methods --------------------------------------------------------- */

static int
usable(UringObject *u)
{
    if (u->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the Uring is closed");
        return 0;
    }
    if (!mine(u)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this Uring belongs to the parent process; a forked child makes its own");
        return 0;
    }
    return 1;
}

static PyObject *
Uring_watch(UringObject *u, PyObject *const *a, Py_ssize_t n)
{
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "expected watch(desc, key)");
        return NULL;
    }
    if (!usable(u))
        return NULL;
    PyObject *desc = a[0], *key = a[1];
    int there = PyDict_Contains(u->inflight, key);
    if (there != 0) {
        if (there > 0)
            PyErr_Format(PyExc_ValueError, "Uring.watch(): key %R is already in flight", key);
        return NULL;
    }
    UWatch *uw = PyMem_Calloc(1, sizeof *uw);
    if (uw == NULL)
        return PyErr_NoMemory();
    Watch *w = &uw->w;
    if (watch_bind(w, desc, 0, shm_state_of((PyObject *)u)->Ring, "Uring.watch()") < 0) {
        PyMem_Free(uw);
        return NULL;
    }
    if (w->closed) { /* the caller's next call raises ClosedError */
        PyMem_Free(uw);
        Py_RETURN_TRUE;
    }
    shm_pin(w->pin);
    uint32_t v;
    int ready = w_ready(w, &v);
    if (!ready) {
        w_arm(w);
        /* A waker that saw no sleeper before we were counted changed the word. */
        ready = w_ready(w, &v);
    }
    PyObject *addr = NULL;
    if (!ready) {
        addr = PyLong_FromVoidPtr(uw);
        if (addr == NULL || PyDict_SetItem(u->inflight, key, addr) < 0)
            goto undo;
        struct io_uring_sqe e;
        memset(&e, 0, sizeof e);
        e.opcode = U_OP_FUTEX_WAIT;
        e.fd = U_FUTEX2_SIZE_U32;
        e.addr = (uint64_t)(uintptr_t)w->word;
        e.off = v; /* addr2: the value to sleep on */
        e.addr3 = U_FUTEX_BITSET_ANY;
        e.user_data = (uint64_t)(uintptr_t)uw;
        if (submit(u, &e) < 0) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            if (PyDict_DelItem(u->inflight, key) < 0)
                PyErr_Clear();
            PyErr_Restore(et, ev, tb);
            goto undo;
        }
        Py_DECREF(addr);
        uw->target = PyTuple_GET_ITEM(desc, 1);
        Py_INCREF(uw->target);
        uw->key = key;
        Py_INCREF(key);
        Py_RETURN_FALSE;
    }
    w_disarm(w);
    shm_unpin(w->pin);
    PyMem_Free(uw);
    Py_RETURN_TRUE;
undo:
    Py_XDECREF(addr);
    w_disarm(w);
    shm_unpin(w->pin);
    PyMem_Free(uw);
    return NULL;
}

static PyObject *
Uring_reap(UringObject *u, PyObject *Py_UNUSED(ignored))
{
    if (!usable(u))
        return NULL;
    PyObject *out = PyList_New(0), *graves = PyList_New(0);
    int found = 0;
    if (out == NULL || graves == NULL || drain(u, out, graves, NULL, &found) < 0)
        Py_CLEAR(out);
    Py_XDECREF(graves);
    return out;
}

static PyObject *
Uring_cancel(UringObject *u, PyObject *key)
{
    if (!usable(u))
        return NULL;
    PyObject *out = PyList_New(0), *graves = PyList_New(0);
    if (out == NULL || graves == NULL)
        goto fail;
    PyObject *addr = PyDict_GetItemWithError(u->inflight, key);
    if (addr == NULL) {
        if (PyErr_Occurred())
            goto fail;
        int found = 0; /* not in flight: what has completed meanwhile */
        if (drain(u, out, graves, NULL, &found) < 0)
            goto fail;
        Py_DECREF(graves);
        return out;
    }
    UWatch *uw = PyLong_AsVoidPtr(addr);
    if (uw == NULL)
        goto fail;
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_ASYNC_CANCEL;
    e.fd = -1;
    e.addr = (uint64_t)(uintptr_t)uw;
    e.user_data = 0;
    if (submit(u, &e) < 0)
        goto fail;
    int found = 0;
    for (;;) {
        if (drain(u, out, graves, uw, &found) < 0)
            goto fail;
        if (found)
            break;
        if (await_completion(u) < 0)
            goto fail;
    }
    Py_DECREF(graves);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(graves);
    return NULL;
}

static PyObject *
Uring_fileno(UringObject *u, PyObject *Py_UNUSED(ignored))
{
    if (u->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the Uring is closed");
        return NULL;
    }
    return PyLong_FromLong(u->fd);
}

static PyObject *
Uring_close(UringObject *u, PyObject *Py_UNUSED(ignored))
{
    Uring_close_impl(u);
    Py_RETURN_NONE;
}

static Py_ssize_t
Uring_len(UringObject *u)
{
    return u->inflight == NULL ? 0 : PyDict_GET_SIZE(u->inflight);
}

static PyObject *
Uring_get_closed(UringObject *u, void *Py_UNUSED(c))
{
    return PyBool_FromLong(u->fd < 0);
}

static PyMethodDef Uring_methods[] = {
    {"watch", (PyCFunction)(void (*)(void))Uring_watch, METH_FASTCALL,
     "watch($self, desc, key, /)\n--\n\n"
     "-> bool.  True when the described object is ready now (nothing is submitted);\n"
     "else count it a sleeper, submit a futex wait on its word and return False:\n"
     "reap() hands `key` back once it is woken."},
    {"reap", (PyCFunction)Uring_reap, METH_NOARGS,
     "reap($self, /)\n--\n\n-> list of the keys whose watch completed (each is disarmed and freed)"},
    {"cancel", (PyCFunction)Uring_cancel, METH_O,
     "cancel($self, key, /)\n--\n\n"
     "-> list.  Take the watch `key` out of flight (disarmed and freed on return; nothing\n"
     "if it is not in flight); the keys of other watches that completed meanwhile."},
    {"fileno", (PyCFunction)Uring_fileno, METH_NOARGS,
     "fileno($self, /)\n--\n\nthe ring's fd: readable when reap() has something"},
    {"close", (PyCFunction)Uring_close, METH_NOARGS,
     "close($self, /)\n--\n\ncancel every watch in flight and close the ring"},
    {NULL}
};

static PyGetSetDef Uring_getset[] = {
    {"closed", (getter)Uring_get_closed, NULL, "True once close() was called", NULL},
    {NULL}
};

static PyType_Slot Uring_slots[] = {
    {Py_tp_new, Uring_new},
    {Py_tp_dealloc, Uring_dealloc},
    {Py_tp_traverse, Uring_traverse},
    {Py_tp_clear, Uring_clear},
    {Py_tp_methods, Uring_methods},
    {Py_tp_getset, Uring_getset},
    {Py_mp_length, Uring_len},
    {Py_tp_doc, "Uring() -> awaited waits woken through io_uring (see uring.c)"},
    {0, NULL},
};

static PyType_Spec Uring_spec = {
    .name = "shmkit._core.Uring",
    .basicsize = sizeof(UringObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Uring_slots,
};

int
shm_init_uring(PyObject *module)
{
    static int counting;
    if (!counting) {
        if (pthread_atfork(NULL, NULL, count_fork) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork() failed");
            return -1;
        }
        counting = 1;
    }
    PyObject *errors = PyImport_ImportModule("shmkit.errors");
    if (errors == NULL)
        return -1;
    PyObject *base = PyObject_GetAttrString(errors, "ShmkitError");
    Py_DECREF(errors);
    if (base == NULL)
        return -1;
    PyObject *bases = PyTuple_Pack(2, base, PyExc_OSError);
    Py_DECREF(base);
    if (bases == NULL)
        return -1;
    PyObject *exc = PyErr_NewExceptionWithDoc(
        "shmkit._core.UringUnavailableError",
        "io_uring cannot wake awaited waits here (an old kernel, seccomp, "
        "io_uring_disabled): shmkit.aio falls back to watcher threads.",
        bases, NULL);
    Py_DECREF(bases);
    if (exc == NULL)
        return -1;
    PyObject *tp = PyType_FromModuleAndSpec(module, &Uring_spec, NULL);
    if (tp == NULL || PyModule_AddType(module, (PyTypeObject *)tp) < 0 ||
        PyModule_AddObjectRef(module, "UringUnavailableError", exc) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(exc);
        return -1;
    }
    Py_DECREF(tp);
    Py_DECREF(exc);
    return 0;
}
