/* rwlock.c - the writer-preferring reader/writer lock, dead readers counted out.
 *
 * Layout (offsets from the lock's start):
 *
 *      0  u32 writers' robust mutex (lock.c): a dead writer is recovered through it
 *      4  u32 state: bit 0 a writer is in or waiting, bit 1 readers may sleep
 *      8  u32 readers-left counter: bumped by a reader stepping out while a
 *             writer waits (the writer sleeps on it)
 *     64  u64 per attach slot: generation << 32 | read holds
 *
 * A reader increments its own slot's count, then re-checks the state; if a
 * writer has come in it steps back.  A writer takes the mutex, sets bit 0
 * (new readers now wait) and waits until every slot's count is zero; a slot
 * whose attachment is gone is zeroed instead of waited for.  Each method is
 * one C call: Ctrl-C is seen only inside its waits, which undo what the call
 * did, so an interrupt never leaves this process holding a lock it does not
 * know about.  A coroutine's acquire_write (aio.py) makes the same steps as
 * three calls, with its awaits between them (see "the coroutine form" below).
 *
 *   RWLock(mapping, offset, what)   (Python subclasses it)
 *   .acquire_read(timeout=None) -> bool; .release_read()
 *   .acquire_write(timeout=None) -> bool; .release_write()
 *   ._write_begin(ticket) -> bool; ._write_finish(ticket) -> bool;
 *   ._write_abandon(ticket)
 *   .recovered, .writer_token
 */
#include "sync.h"
#include <limits.h>
#include <structmember.h>

typedef struct {
    SHM_SYNC_HANDLE_HEAD
    int recovered;
    long read_holds;    /* read holds taken through this handle, not yet released */
    uint32_t holds_token; /* the attachment they were taken under (a forked
                           * child's handle has another, and none of them) */
    /* The coroutine form's write acquire between its calls: the ticket of
     * the call that took the writers' mutex and announced itself (0: none),
     * whether that mutex was a dead writer's, whether dead readers' holds
     * were dropped since. */
    unsigned long long w_ticket;
    int w_died, w_dead_readers;
} RWObject;

typedef struct {
    shm_sync_view view;
    RWObject *self;
    int recovered;  /* a writer died holding it (acquire_read) */
    int dead_readers;
    int busy;       /* reap_readers found live read holds */
    uint32_t seq;
} RW;

static int
rw_bind(RWObject *self, RW *r)
{
    if (self->mapping == NULL) {
        PyErr_SetString(PyExc_TypeError, "the RWLock was not initialised");
        return -1;
    }
    if (shm_sync_bind(&r->view, self->mapping, self->offset, RW_TABLE, 1, self->what_s) < 0)
        return -1;
    if (r->view.m->token == 0) {
        PyErr_Format(shm_state_of(self->mapping)->ClosedError, "%s is closed or was opened readonly",
                     self->what_s);
        return -1;
    }
    r->self = self;
    r->recovered = r->dead_readers = 0;
    return 0;
}

/* Change our slot's read holds by delta.  0, or -1 when a release finds
 * none: CorruptError if this handle took a hold that the entry no longer
 * shows (another process's store replaced it), else RuntimeError. */
static int
count(RW *r, int delta)
{
    uint32_t me = r->view.m->token;
    uint64_t *e = SHM_SYNC_ENTRY(r, SHM_TOKEN_SLOT(me));
    uint64_t v = __atomic_load_n(e, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t n = shm_slot_entry_mine(v, me);
        if (delta < 0 && n == 0) {
            if (r->self->read_holds > 0 && r->self->holds_token == me)
                PyErr_Format(shm_state_of(r->self->mapping)->CorruptError, "the read hold this process took on %s "
                             "was overwritten (its entry shows %u holds of attachment "
                             "generation %u, this one is %u): the segment is damaged; "
                             "check its data (shmkit info) or recreate it",
                             r->self->what_s, (unsigned)SHM_SLOT_ENTRY_COUNT(v),
                             (unsigned)SHM_SLOT_ENTRY_GEN(v), (unsigned)SHM_TOKEN_GEN(me));
            else
                PyErr_Format(PyExc_RuntimeError, "release_read() of %s without a "
                             "matching acquire_read() in this process (a forked child "
                             "holds none of its parent's read holds)", r->self->what_s);
            return -1;
        }
        if (__atomic_compare_exchange_n(e, &v, shm_slot_entry_make(me, n + (uint32_t)delta), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE))
            return 0;
    }
}

/* The state word, and whether a writer is in or waiting. */
static inline uint32_t
state(RW *r)
{
    return __atomic_load_n(SHM_SYNC_U32(r, RW_STATE), __ATOMIC_SEQ_CST);
}

static void
readers_left(RW *r)
{
    if (state(r) & RW_WRITER) {
        __atomic_add_fetch(SHM_SYNC_U32(r, RW_LEFT), 1, __ATOMIC_SEQ_CST);
        shm_futex_wake(SHM_SYNC_U32(r, RW_LEFT), 1);
    }
}

static void
release_state(RW *r)
{
    uint32_t s = __atomic_exchange_n(SHM_SYNC_U32(r, RW_STATE), 0, __ATOMIC_SEQ_CST);
    shm_crash_point("rw.write.state_cleared");
    if (s & RW_SLEEPERS)
        shm_futex_wake(SHM_SYNC_U32(r, RW_STATE), INT_MAX);
}

/* ---- readers ---- */

static int
rd_ready(void *ctx, uint32_t *sleep_on)
{
    RW *r = ctx;
    uint32_t s = state(r);
    if (!(s & RW_WRITER))
        return 1;
    *sleep_on = s;
    return 0;
}

static void
rd_arm(void *ctx)
{
    shm_rw_arm(((RW *)ctx)->view.b);
}

/* After a slice without news: did the writer die holding it? */
static int
rd_check(void *ctx)
{
    RW *r = ctx;
    uint32_t owner = __atomic_load_n(SHM_SYNC_U32(r, RW_LOCK), __ATOMIC_ACQUIRE) & SHM_TOKEN_MASK;
    if (owner == 0 || shm_token_alive(r->view.m, owner))
        return 0;
    int got = shm_lock_acquire(r->view.m, SHM_SYNC_U32(r, RW_LOCK), 0);
    if (got < 0)
        return -1;
    if (got == 0)
        return 0;
    /* We hold the writers' mutex, so no writer is in: whatever the state
     * says is left over from the dead one. */
    if (got == 2)
        r->recovered = 1;
    release_state(r);
    shm_lock_release(r->view.m, SHM_SYNC_U32(r, RW_LOCK));
    return 0;
}

static int
acquire_read(RWObject *self, int64_t deadline)
{
    RW r;
    if (rw_bind(self, &r) < 0)
        return -1;
    for (;;) {
        if (!(state(&r) & RW_WRITER)) {
            if (count(&r, +1) < 0)
                return -1;
            shm_crash_point("rw.read.counted");
            if (!(state(&r) & RW_WRITER))
                break;
            count(&r, -1); /* a writer came in: step back and let it go first */
            shm_crash_point("rw.read.stepped_back");
            readers_left(&r);
        }
        shm_wait w = {.m = r.view.m, .word = SHM_SYNC_U32(&r, RW_STATE), .ctx = &r, .ready = rd_ready,
                      .arm = rd_arm, .check = rd_check, .spin_ns = SHM_WAIT_SPIN_NS,
                      .what = self->what_s};
        int got = shm_wait_until(&w, deadline);
        if (got <= 0)
            return got;
    }
    self->recovered = r.recovered;
    if (r.recovered) {
        if (PyErr_WarnFormat(shm_state_of(self->mapping)->OwnerDiedWarning, 1,
                             "read lock of %s: a writer died while holding it; the lock "
                             "was recovered, check the data it guards", self->what_s) < 0) {
            count(&r, -1);
            readers_left(&r);
            return -1;
        }
    }
    if (self->holds_token != r.view.m->token) { /* a forked child's first */
        self->holds_token = r.view.m->token;
        self->read_holds = 0;
    }
    self->read_holds++;
    return 1;
}

/* ---- writers ---- */

/* Give the write hold up: clear the state, release the writers' mutex. */
static void
drop_write(RW *r)
{
    release_state(r);
    shm_lock_release_journal(r->view.m, SHM_SYNC_U32(r, RW_LOCK), NULL);
}

/* Any live-looking read holds?  (No liveness check: that is wr_check's.) */
int
shm_rw_readers_in(const shm_sync_view *v)
{
    for (uint32_t slot = 0; slot < v->m->max_slots; slot++)
        if (SHM_SLOT_ENTRY_COUNT(__atomic_load_n(shm_sync_entry(v, slot), __ATOMIC_SEQ_CST)))
            return 1;
    return 0;
}

/* Zero the holds of readers that are gone; returns whether live ones remain. */
static int
reap_visit(void *ctx, uint32_t slot, uint64_t *e, uint64_t v, int alive)
{
    RW *r = ctx;
    if (!alive && __atomic_compare_exchange_n(e, &v, SHM_SLOT_ENTRY_CLEARED(v), 0,
                                              __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
        r->dead_readers = 1;
        shm_crash_point("rw.write.reaped");
    }
    else
        r->busy = 1;
    return 0;
}

static int
reap_readers(RW *r)
{
    r->busy = 0;
    shm_sync_scan(&r->view, reap_visit, r);
    return r->busy;
}

static int
wr_ready(void *ctx, uint32_t *sleep_on)
{
    RW *r = ctx;
    uint32_t seq = __atomic_load_n(SHM_SYNC_U32(r, RW_LEFT), __ATOMIC_SEQ_CST);
    if (seq != r->seq || !shm_rw_readers_in(&r->view))
        return 1;
    *sleep_on = seq;
    return 0;
}

static int
wr_check(void *ctx)
{
    reap_readers((RW *)ctx);
    return 0;
}

/* Take the writers' mutex by the deadline (a dead writer's is taken over)
 * and announce a writer: new readers wait from now on.  1 taken, 2 taken
 * from a dead writer, 0 timeout, -1 error. */
static int
lock_and_announce(RW *r, int64_t deadline)
{
    int got = shm_lock_acquire(r->view.m, SHM_SYNC_U32(r, RW_LOCK), deadline);
    if (got <= 0)
        return got;
    shm_crash_point("rw.write.locked");
    __atomic_fetch_or(SHM_SYNC_U32(r, RW_STATE), RW_WRITER, __ATOMIC_SEQ_CST);
    shm_crash_point("rw.write.announced");
    return got;
}

/* Every reader is out: the write hold is ours.  Set `recovered` and warn
 * when the mutex was a dead writer's or dead readers' holds were dropped.
 * 1, or -1 with the hold given up (the warning raised as an error). */
static int
write_taken(RWObject *self, RW *r, int died, int dead_readers)
{
    self->recovered = died || dead_readers;
    if (!self->recovered)
        return 1;
    int bad;
    if (died)
        bad = shm_warn_owner_died((MappingObject *)self->mapping, self->what_s);
    else
        bad = PyErr_WarnFormat(shm_state_of(self->mapping)->OwnerDiedWarning, 1,
                               "write lock of %s: a reader died while holding it; its "
                               "holds were dropped", self->what_s);
    if (bad < 0) {
        drop_write(r);
        return -1;
    }
    return 1;
}

static int
acquire_write(RWObject *self, int64_t deadline)
{
    RW r;
    if (rw_bind(self, &r) < 0)
        return -1;
    int got = lock_and_announce(&r, deadline);
    if (got <= 0)
        return got;
    for (;;) {
        r.seq = __atomic_load_n(SHM_SYNC_U32(&r, RW_LEFT), __ATOMIC_SEQ_CST);
        if (!reap_readers(&r))
            break;
        shm_wait w = {.m = r.view.m, .word = SHM_SYNC_U32(&r, RW_LEFT), .ctx = &r, .ready = wr_ready,
                      .check = wr_check, .spin_ns = SHM_WAIT_SPIN_NS, .what = self->what_s};
        int w_got = shm_wait_until(&w, deadline);
        if (w_got <= 0) { /* timeout, Ctrl-C, closed: leave no write hold behind */
            if (r.view.m->token != 0)
                drop_write(&r);
            return w_got;
        }
    }
    return write_taken(self, &r, got == 2, r.dead_readers);
}

static int
release_write(RWObject *self)
{
    RW r;
    if (rw_bind(self, &r) < 0)
        return -1;
    uint32_t v = __atomic_load_n(SHM_SYNC_U32(&r, RW_LOCK), __ATOMIC_ACQUIRE);
    if ((v & SHM_TOKEN_MASK) != r.view.m->token) {
        /* lock.c tells the two apart: CorruptError when this process took
         * the word and another store replaced it (the state is then no
         * longer ours to clear), RuntimeError when it never took it. */
        if (shm_lock_release(r.view.m, SHM_SYNC_U32(&r, RW_LOCK)) < 0 &&
            PyErr_ExceptionMatches(PyExc_RuntimeError) &&
            !PyErr_ExceptionMatches(shm_state_of(self->mapping)->CorruptError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_RuntimeError, "release_write() of %s without holding it",
                         self->what_s);
        }
        return -1;
    }
    release_state(&r);
    return shm_lock_release(r.view.m, SHM_SYNC_U32(&r, RW_LOCK));
}

/* ---- the coroutine form of acquire_write, in three calls -------------------
 *
 * acquire_write above takes the mutex, announces itself and waits for the
 * readers to leave inside one call.  A coroutine awaits between those steps,
 * so its acquire_write (aio.py) is three calls, each one step of the same
 * protocol on the same words, made under a ticket that names the await:
 *
 *   _write_begin(ticket) -> bool   take the writers' mutex without waiting (a
 *                                  dead writer's is taken over) and announce
 *                                  the writer; False when the mutex is held
 *   (await W_RW_WRITE (waitset.c): no read holds left, or a dead reader's)
 *   _write_finish(ticket) -> bool  drop the holds of dead readers; when no
 *                                  reader is left the write hold is ours
 *                                  (recovered and warnings as acquire_write);
 *                                  False: readers are still in
 *   _write_abandon(ticket)         on every other way out: if this ticket's
 *                                  announcement stands, undo it (clear the
 *                                  state, wake sleeping readers, release the
 *                                  mutex), as acquire_write does on timeout
 *
 * Between two calls the words are as acquire_write leaves them between two
 * of its steps, so a kill there is recovered as it is (the next reader or
 * writer takes a dead writer's mutex over and clears its state).  The
 * ticket lives in the handle from the call that announces, so that an
 * abandon made after any interruption finds it, and a coroutine that never
 * announced undoes nothing (another coroutine of this handle may have). */

static int
parse_ticket(PyObject *arg, unsigned long long *ticket)
{
    *ticket = PyLong_AsUnsignedLongLong(arg);
    if (*ticket == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (*ticket == 0) {
        PyErr_SetString(PyExc_ValueError, "a write ticket is a positive integer, not 0");
        return -1;
    }
    return 0;
}

/* Does this attachment hold the writers' mutex? */
static int
write_mine(RW *r)
{
    uint32_t v = __atomic_load_n(SHM_SYNC_U32(r, RW_LOCK), __ATOMIC_ACQUIRE);
    return (v & SHM_TOKEN_MASK) == r->view.m->token;
}

static PyObject *
py_write_begin(RWObject *self, PyObject *arg)
{
    unsigned long long ticket;
    RW r;
    if (parse_ticket(arg, &ticket) < 0 || rw_bind(self, &r) < 0)
        return NULL;
    shm_pin(self->mapping);
    int got = lock_and_announce(&r, 0);
    shm_unpin(self->mapping);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_FALSE;
    self->w_ticket = ticket;
    self->w_died = got == 2;
    self->w_dead_readers = 0;
    Py_RETURN_TRUE;
}

static PyObject *
py_write_finish(RWObject *self, PyObject *arg)
{
    unsigned long long ticket;
    RW r;
    if (parse_ticket(arg, &ticket) < 0 || rw_bind(self, &r) < 0)
        return NULL;
    if (self->w_ticket != ticket || !write_mine(&r)) {
        if (self->w_ticket == ticket)
            self->w_ticket = 0;
        PyErr_Format(PyExc_RuntimeError, "acquire_write() of %s no longer holds the writers' "
                     "mutex it took (was release_write() called while it waited?)",
                     self->what_s);
        return NULL;
    }
    int busy = reap_readers(&r);
    self->w_dead_readers |= r.dead_readers;
    if (busy)
        Py_RETURN_FALSE;
    self->w_ticket = 0;
    if (write_taken(self, &r, self->w_died, self->w_dead_readers) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *
py_write_abandon(RWObject *self, PyObject *arg)
{
    unsigned long long ticket;
    if (parse_ticket(arg, &ticket) < 0)
        return NULL;
    if (self->w_ticket != ticket)
        Py_RETURN_NONE; /* announced nothing, or finished */
    self->w_ticket = 0;
    RW r;
    if (rw_bind(self, &r) < 0) {
        /* Closed meanwhile: the attachment that holds the mutex is gone, and
         * the next reader or writer takes it over. */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (write_mine(&r))
        drop_write(&r);
    Py_RETURN_NONE;
}

/* ---- the Python type ---- */

static int
rw_init(RWObject *self, PyObject *args, PyObject *kwds)
{
    if (shm_sync_handle_init((shm_sync_handle *)self, args, kwds, "rwlock", RW_TABLE, NULL,
                             NULL) < 0)
        return -1;
    self->recovered = 0;
    self->read_holds = 0;
    self->holds_token = 0;
    self->w_ticket = 0;
    return 0;
}

static int64_t
timeout_deadline(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *sig)
{
    PyObject *timeout = nargs > 0 ? args[0] : Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 1 || nkw > 1 || (nkw == 1 && (nargs > 0 ||
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0))) {
        PyErr_Format(PyExc_TypeError, "%s takes one argument, timeout", sig);
        return -1;
    }
    if (nkw == 1)
        timeout = args[0];
    return shm_sync_deadline(NULL, timeout);
}

static PyObject *py_release_read(PyObject *obj, PyObject *Py_UNUSED(ignored));
static PyObject *py_release_write(PyObject *obj, PyObject *Py_UNUSED(ignored));

/* acquire_read() and acquire_write(): parse the timeout, call fn pinned;
 * a signal's handler that raises as it returns gets the hold released. */
static PyObject *
timed_acquire(RWObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *sig, int (*fn)(RWObject *, int64_t), PyCFunction release)
{
    int64_t deadline = timeout_deadline(args, nargs, kwnames, sig);
    if (deadline < 0 || self->mapping == NULL)
        return deadline < 0 ? NULL : (PyErr_SetString(PyExc_TypeError, "not initialised"), NULL);
    shm_pin(self->mapping);
    int r = fn(self, deadline);
    shm_unpin(self->mapping);
    r = shm_sync_acquired((PyObject *)self, r, release);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static PyObject *
py_acquire_read(RWObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return timed_acquire(self, args, nargs, kwnames, "acquire_read()", acquire_read,
                         py_release_read);
}

static PyObject *
py_acquire_write(RWObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return timed_acquire(self, args, nargs, kwnames, "acquire_write()", acquire_write,
                         py_release_write);
}

static PyObject *
py_release_read(PyObject *obj, PyObject *Py_UNUSED(ignored))
{
    RWObject *self = (RWObject *)obj;
    RW r;
    if (rw_bind(self, &r) < 0)
        return NULL;
    int n = count(&r, -1);
    if (self->read_holds > 0 && self->holds_token == r.view.m->token)
        self->read_holds--; /* released, or lost to damage (CorruptError) */
    if (n < 0)
        return NULL;
    shm_crash_point("rw.read.released");
    readers_left(&r);
    Py_RETURN_NONE;
}

static PyObject *
py_release_write(PyObject *obj, PyObject *Py_UNUSED(ignored))
{
    if (release_write((RWObject *)obj) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
rw_get_writer(RWObject *self, void *Py_UNUSED(c))
{
    if (self->mapping == NULL)
        return PyLong_FromLong(0);
    uint32_t *w = shm_addr(self->mapping, self->offset, 4, 0);
    if (w == NULL)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(w, __ATOMIC_ACQUIRE) & SHM_TOKEN_MASK);
}

static PyMethodDef rw_methods[] = {
    {"acquire_read", (PyCFunction)(void (*)(void))py_acquire_read,
     METH_FASTCALL | METH_KEYWORDS,
     "acquire_read($self, /, timeout=None)\n--\n\n"
     "acquire_read(timeout=None) -> bool\n\nTake a read hold; False if timeout passes first."},
    {"release_read", py_release_read, METH_NOARGS,
     "release_read($self, /)\n--\n\nDrop one read hold of this process."},
    {"acquire_write", (PyCFunction)(void (*)(void))py_acquire_write,
     METH_FASTCALL | METH_KEYWORDS,
     "acquire_write($self, /, timeout=None)\n--\n\n"
     "acquire_write(timeout=None) -> bool\n\nTake the write hold; False if timeout passes "
     "first."},
    {"release_write", py_release_write, METH_NOARGS,
     "release_write($self, /)\n--\n\nDrop the write hold."},
    {"_write_begin", (PyCFunction)py_write_begin, METH_O,
     "_write_begin($self, ticket, /)\n--\n\n"
     "-> bool: take the writers' mutex without waiting and announce a writer\n"
     "(the coroutine acquire_write's first step)."},
    {"_write_finish", (PyCFunction)py_write_finish, METH_O,
     "_write_finish($self, ticket, /)\n--\n\n"
     "-> bool: drop dead readers' holds; True when no reader is left and the\n"
     "write hold is ours, False while readers are in."},
    {"_write_abandon", (PyCFunction)py_write_abandon, METH_O,
     "_write_abandon($self, ticket, /)\n--\n\n"
     "Undo the announcement this ticket made, if it stands (on timeout or\n"
     "cancellation); nothing otherwise."},
    {NULL}
};

static PyMemberDef rw_members[] = {
    {"recovered", T_BOOL, offsetof(RWObject, recovered), READONLY,
     "True when the last acquire found a dead writer or dead readers"},
    {NULL}
};

static PyGetSetDef rw_getset[] = {
    {"writer_token", (getter)rw_get_writer, NULL, "token of the writer, 0 if none", NULL},
    {NULL}
};

static PyType_Slot rw_spec_slots[] = {
    {Py_tp_dealloc, shm_sync_handle_dealloc},
    {Py_tp_doc, "RWLock(mapping, offset, what='rwlock')\n--\n\n"
                "The reader/writer lock at offset (64 + 8 * max_slots zeroed bytes)."},
    {Py_tp_methods, rw_methods},
    {Py_tp_members, rw_members},
    {Py_tp_getset, rw_getset},
    {Py_tp_init, rw_init},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec rw_spec = {
    .name = "shmkit._core.RWLock",
    .basicsize = sizeof(RWObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = rw_spec_slots,
};

int
shm_init_rwlock(PyObject *module)
{
    return shm_add_type(module, &rw_spec, &shm_mod_state(module)->RWLock);
}
