/* semaphore.c - the counting semaphore whose dead holders' units come back.
 *
 * Layout (offsets from the semaphore's start; format 2):
 *
 *      0  u32 robust lock (lock.c) guarding everything below but the hints
 *      4  i32 value: units free now
 *      8  u32 change counter: bumped after every release; waiters sleep on it
 *     12  u32 sleepers (a hint: a waiter that dies counted costs a spare wake-up)
 *     16  u32 maximum, or 0xFFFFFFFF for none
 *     32  undo journal, 4 entries (journal.h), up to 112
 *    128  u64 per attach slot: generation << 32 | holds (i32)
 *
 * Every change of value and holds is made under the lock, through the
 * journal, so a process killed (or interrupted) at any instruction leaves
 * either the whole update or none of it: value + live holds == initial +
 * releases beyond acquires.  The holds of an attachment that is gone (its
 * generation is not its slot's owner, or its OFD lock is released) are given
 * back by whoever next finds the pool empty, by a waiter after a slice
 * without news, and by the taker of the lock from a dead holder.
 *
 *   Semaphore(mapping, offset, what)   (Python subclasses it)
 *   .acquire(blocking=True, timeout=None) -> bool; .release(n=1)
 *   .value, .waiters, .maximum
 *   sem_format(mapping, offset, value, maximum=-1)   the creator, once
 */
#include "sync.h"
#include <limits.h>
#include <structmember.h>

#define SEM_LOCK 0
#define SEM_VALUE 4
#define SEM_SEQ 8
#define SEM_SLEEPERS 12
#define SEM_MAX 16
#define SEM_JOURNAL 32
#define SEM_JCAP 4
#define SEM_TABLE 128
#define SEM_NO_MAX 0xFFFFFFFFu

typedef struct {
    PyObject_HEAD
    PyObject *mapping;
    long long offset;
    PyObject *what;
    const char *what_s;
    uint32_t maximum;   /* the stored maximum as this handle found it */
} SemObject;

/* One operation's view: where the semaphore is, its journal. */
typedef struct {
    shm_sync_view view;
    shm_journal jn;
    SemObject *self;
} Sem;

static inline uint32_t *
u32at(Sem *s, uint64_t off)
{
    return shm_sync_u32(&s->view, off);
}

static inline uint64_t *
entry(Sem *s, uint32_t slot)
{
    return shm_sync_entry(&s->view, SEM_TABLE, slot);
}

static uint64_t
footprint(MappingObject *m)
{
    return SEM_TABLE + 8 * (uint64_t)m->max_slots;
}

/* Bind s to self's memory; -1 with an exception (closed, out of bounds). */
static int
bind(SemObject *self, Sem *s)
{
    MappingObject *m = (MappingObject *)self->mapping;
    if (shm_sync_bind(&s->view, self->mapping, self->offset, footprint(m), 1) < 0)
        return -1;
    s->self = self;
    shm_journal_bind(&s->jn, m, s->view.b, SEM_JOURNAL, SEM_JCAP, SEM_VALUE, footprint(m),
                     self->what_s);
    return 0;
}

/* Give back what the entry of slot holds and zero it (lock held); one
 * journaled update, committed.  Returns the units given back, or -1. */
static int64_t
give_back(Sem *s, uint32_t slot, const char *step_value, const char *step_held)
{
    uint64_t v = __atomic_load_n(entry(s, slot), __ATOMIC_ACQUIRE);
    int32_t held = (int32_t)SHM_SLOT_ENTRY_COUNT(v);
    if (held == 0)
        return 0;
    int32_t value = (int32_t)__atomic_load_n(u32at(s, SEM_VALUE), __ATOMIC_RELAXED);
    int64_t back = held > 0 ? held : 0;
    if ((int64_t)value + back > INT32_MAX)
        back = INT32_MAX - (int64_t)value; /* only a corrupt count gets here */
    shm_jset32(&s->jn, SEM_VALUE, (uint32_t)(value + (int32_t)back), 0);
    shm_crash_point(step_value);
    shm_jset64(&s->jn, SEM_TABLE + 8 * (uint64_t)slot, v & ~0xFFFFFFFFull, 0);
    shm_crash_point(step_held);
    if (shm_journal_commit(&s->jn) < 0)
        return -1;
    return back;
}

static void
announce(Sem *s, int64_t n)
{
    __atomic_add_fetch(u32at(s, SEM_SEQ), 1, __ATOMIC_SEQ_CST);
    if (n > 0 && __atomic_load_n(u32at(s, SEM_SLEEPERS), __ATOMIC_SEQ_CST) != 0)
        shm_futex_wake(u32at(s, SEM_SEQ), n > INT_MAX ? INT_MAX : (int)n);
}

/* Give back the units of every attachment that is gone (lock held). */
static int64_t
reclaim_dead(Sem *s)
{
    int64_t freed = 0;
    for (uint32_t slot = 0; slot < s->view.m->max_slots; slot++) {
        uint64_t v = __atomic_load_n(entry(s, slot), __ATOMIC_ACQUIRE);
        if (SHM_SLOT_ENTRY_COUNT(v) == 0)
            continue;
        if (shm_token_alive(s->view.m, shm_slot_entry_token(v, slot)))
            continue;
        int64_t r = give_back(s, slot, "sem.reclaim.value", "sem.reclaim.held");
        if (r < 0)
            return -1;
        freed += r;
    }
    return freed;
}

/* Our slot's entry may be a dead predecessor's: give its units back before
 * our first update overwrites it (lock held).  0, or -1. */
static int
reclaim_own(Sem *s)
{
    uint32_t slot = SHM_TOKEN_SLOT(s->view.m->token);
    uint64_t v = __atomic_load_n(entry(s, slot), __ATOMIC_ACQUIRE);
    if (SHM_SLOT_ENTRY_COUNT(v) == 0 || SHM_SLOT_ENTRY_GEN(v) == SHM_TOKEN_GEN(s->view.m->token))
        return 0;
    int64_t r = give_back(s, slot, "sem.reclaim.value", "sem.reclaim.held");
    if (r > 0)
        announce(s, r);
    return r < 0 ? -1 : 0;
}

/* The maximum never changes after sem_format, and no release or acquire
 * leaves value outside 0..maximum: a stored maximum other than the one
 * this handle found, or a value outside that range, is damage (lock
 * held).  Returns the bound on value, or -1 with CorruptError. */
static int64_t
sane_limit(Sem *s, int32_t value)
{
    uint32_t max = __atomic_load_n(u32at(s, SEM_MAX), __ATOMIC_RELAXED);
    int64_t limit = max == SEM_NO_MAX || max > INT32_MAX ? INT32_MAX : (int64_t)max;
    if (max != s->self->maximum) {
        PyErr_Format(shm_state_of(s->self->mapping)->CorruptError, "%s: its maximum changed from %u to %u, which no "
                     "correct writer does: its payload is damaged; recreate it",
                     s->self->what_s, s->self->maximum, max);
        return -1;
    }
    if (value < 0 || (int64_t)value > limit) {
        PyErr_Format(shm_state_of(s->self->mapping)->CorruptError, "%s holds value %d outside 0..%lld: its payload "
                     "is damaged; recreate it", s->self->what_s, value, (long long)limit);
        return -1;
    }
    return limit;
}

static int
repair(void *ctx, int owner_died)
{
    Sem *s = ctx;
    int64_t r = reclaim_dead(s);
    if (r > 0)
        announce(s, r);
    return r < 0 ? -1 : 0;
}

static int
lock(Sem *s)
{
    int r = shm_lock_acquire_repair(s->view.m, u32at(s, SEM_LOCK), SHM_FOREVER, &s->jn, repair, s);
    return r < 0 ? -1 : 0;
}

static void
unlock(Sem *s)
{
    shm_lock_release_journal(s->view.m, u32at(s, SEM_LOCK), &s->jn);
}

/* Add delta to our value and holds: one journaled update (lock held). */
static int
update(Sem *s, int32_t value, int32_t held_delta, const char *step_value,
       const char *step_held)
{
    uint32_t slot = SHM_TOKEN_SLOT(s->view.m->token);
    uint64_t v = __atomic_load_n(entry(s, slot), __ATOMIC_RELAXED);
    uint32_t held = SHM_SLOT_ENTRY_COUNT(v) + (uint32_t)held_delta;
    shm_jset32(&s->jn, SEM_VALUE, (uint32_t)value, 0);
    shm_crash_point(step_value);
    shm_jset64(&s->jn, SEM_TABLE + 8 * (uint64_t)slot,
               (uint64_t)SHM_TOKEN_GEN(s->view.m->token) << 32 | held, 0);
    shm_crash_point(step_held);
    return shm_journal_commit(&s->jn);
}

/* Under the lock: take a unit if one is free (looking for dead holders'
 * units first when check_dead).  1 taken, 0 none, -1 error. */
static int
try_take(Sem *s, int check_dead)
{
    if (lock(s) < 0)
        return -1;
    shm_crash_point("sem.acquire.locked");
    int r = reclaim_own(s);
    if (r == 0 &&
        sane_limit(s, (int32_t)__atomic_load_n(u32at(s, SEM_VALUE), __ATOMIC_RELAXED)) < 0)
        r = -1;
    if (r == 0) {
        int32_t value = (int32_t)__atomic_load_n(u32at(s, SEM_VALUE), __ATOMIC_RELAXED);
        if (value <= 0 && check_dead) {
            int64_t freed = reclaim_dead(s);
            if (freed < 0)
                r = -1;
            else if (freed > 0)
                announce(s, freed - 1);
            value = (int32_t)__atomic_load_n(u32at(s, SEM_VALUE), __ATOMIC_RELAXED);
        }
        if (r == 0 && value > 0)
            r = update(s, value - 1, 1, "sem.acquire.value", "sem.acquire.held") < 0 ? -1 : 1;
    }
    shm_crash_point("sem.acquire.committed");
    unlock(s);
    shm_crash_point("sem.acquire.unlocked");
    return r;
}

typedef struct {
    Sem *s;
    uint32_t seq0;
    int checked;
} SemWait;

static int
sem_ready(void *ctx, uint32_t *sleep_on)
{
    SemWait *w = ctx;
    uint32_t seq = __atomic_load_n(u32at(w->s, SEM_SEQ), __ATOMIC_SEQ_CST);
    if (seq != w->seq0 ||
        (int32_t)__atomic_load_n(u32at(w->s, SEM_VALUE), __ATOMIC_SEQ_CST) > 0)
        return 1;
    *sleep_on = seq;
    return 0;
}

static void
sem_arm(void *ctx)
{
    __atomic_add_fetch(u32at(((SemWait *)ctx)->s, SEM_SLEEPERS), 1, __ATOMIC_SEQ_CST);
}

static void
sem_disarm(void *ctx)
{
    uint32_t *n = u32at(((SemWait *)ctx)->s, SEM_SLEEPERS);
    uint32_t v = __atomic_load_n(n, __ATOMIC_RELAXED);
    while (v != 0 && !__atomic_compare_exchange_n(n, &v, v - 1, 0, __ATOMIC_SEQ_CST,
                                                  __ATOMIC_RELAXED))
        ;
}

/* After a slice without news: units of holders that died come back. */
static int
sem_check(void *ctx)
{
    Sem *s = ((SemWait *)ctx)->s;
    if (lock(s) < 0)
        return -1;
    int64_t r = reclaim_dead(s);
    if (r > 0)
        announce(s, r);
    unlock(s);
    return r < 0 ? -1 : 0;
}

static int
sem_acquire(SemObject *self, int64_t deadline)
{
    Sem s;
    if (bind(self, &s) < 0)
        return -1;
    int checked = 0;
    for (;;) {
        uint32_t seq0 = __atomic_load_n(u32at(&s, SEM_SEQ), __ATOMIC_SEQ_CST);
        int r = try_take(&s, !checked);
        if (r != 0)
            return r;
        checked = 1;
        if (shm_now_ns() >= deadline)
            return 0;
        SemWait sw = {&s, seq0, 0};
        shm_wait w = {.m = s.view.m, .word = u32at(&s, SEM_SEQ), .ctx = &sw, .ready = sem_ready,
                      .arm = sem_arm, .disarm = sem_disarm, .check = sem_check,
                      .spin_ns = SHM_WAIT_SPIN_NS, .what = self->what_s};
        r = shm_wait_until(&w, deadline);
        if (r < 0)
            return -1;
        if (r == 0)
            return 0;
    }
}

static int
sem_release(SemObject *self, long long n)
{
    Sem s;
    if (n < 1 || n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "release(n): n must be between 1 and %d, not %lld",
                     INT32_MAX, n);
        return -1;
    }
    if (bind(self, &s) < 0)
        return -1;
    shm_pin(self->mapping);
    int r = lock(&s);
    int locked = r == 0;
    if (r == 0) {
        shm_crash_point("sem.release.locked");
        r = reclaim_own(&s);
    }
    if (r == 0) {
        int32_t value = (int32_t)__atomic_load_n(u32at(&s, SEM_VALUE), __ATOMIC_RELAXED);
        uint32_t max = __atomic_load_n(u32at(&s, SEM_MAX), __ATOMIC_RELAXED);
        int64_t limit = sane_limit(&s, value);
        if (limit < 0)
            r = -1; /* damage: CorruptError */
        else if ((int64_t)value + n > limit) {
            /* a sane maximum: the caller released more than was acquired */
            if (max == SEM_NO_MAX || max > INT32_MAX)
                PyErr_Format(PyExc_ValueError, "%s released beyond 2**31 - 1 units "
                             "(value %d, n %lld)", self->what_s, value, n);
            else
                PyErr_Format(PyExc_ValueError, "%s released beyond its maximum %u "
                             "(value %d, n %lld); release only what was acquired",
                             self->what_s, max, value, n);
            r = -1;
        }
        else
            r = update(&s, value + (int32_t)n, -(int32_t)n, "sem.release.value",
                       "sem.release.held");
        if (r == 0) {
            shm_crash_point("sem.release.committed");
            __atomic_add_fetch(u32at(&s, SEM_SEQ), 1, __ATOMIC_SEQ_CST);
        }
    }
    if (locked)
        unlock(&s);
    shm_crash_point("sem.release.unlocked");
    if (r == 0 && __atomic_load_n(u32at(&s, SEM_SLEEPERS), __ATOMIC_SEQ_CST) != 0)
        shm_futex_wake(u32at(&s, SEM_SEQ), (int)n);
    shm_unpin(self->mapping);
    return r;
}

/* ---- shared argument helpers (sync.h) ---- */

int64_t
shm_sync_deadline(PyObject *blocking_obj, PyObject *timeout)
{
    int blocking = blocking_obj ? PyObject_IsTrue(blocking_obj) : 1;
    if (blocking < 0)
        return -1;
    if (!blocking)
        return 0;
    if (timeout != NULL && timeout != Py_None && PyNumber_Check(timeout)) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred())
            return -1;
        if (t == -1.0)
            return SHM_FOREVER;
    }
    return shm_deadline(timeout);
}

int
shm_sync_parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       const char *sig, PyObject **blocking, PyObject **timeout)
{
    *blocking = nargs > 0 ? args[0] : NULL;
    *timeout = nargs > 1 ? args[1] : Py_None;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s takes at most 2 positional arguments", sig);
        return -1;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "blocking") == 0 && nargs < 1)
            *blocking = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && nargs < 2)
            *timeout = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "%s got an unexpected or repeated argument %R",
                         sig, key);
            return -1;
        }
    }
    return 0;
}

/* ---- the Python type ---- */

static int
sem_init(SemObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "offset", "what", NULL};
    PyObject *mapping, *what = NULL;
    long long offset;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&L|U", kwlist, shm_mapping_converter, &mapping,
                                     &offset, &what))
        return -1;
    if (offset < 0 || offset % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "a semaphore's offset must be a multiple of 8, "
                     "not %lld", offset);
        return -1;
    }
    char *b = shm_sync_span(mapping, offset, footprint((MappingObject *)mapping), 0);
    if (b == NULL)
        return -1;
    what = what ? Py_NewRef(what) : PyUnicode_FromString("semaphore");
    if (what == NULL)
        return -1;
    const char *s = PyUnicode_AsUTF8(what);
    if (s == NULL) {
        Py_DECREF(what);
        return -1;
    }
    Py_XSETREF(self->mapping, Py_NewRef(mapping));
    Py_XSETREF(self->what, what);
    self->what_s = s;
    self->offset = offset;
    self->maximum = __atomic_load_n((uint32_t *)(b + SEM_MAX), __ATOMIC_ACQUIRE);
    return 0;
}

static void
sem_dealloc(SemObject *self)
{
    Py_XDECREF(self->mapping);
    Py_XDECREF(self->what);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

static int
ready_obj(SemObject *self)
{
    if (self->mapping == NULL) {
        PyErr_SetString(PyExc_TypeError, "the semaphore was not initialised");
        return -1;
    }
    return 0;
}

static PyObject *
py_sem_acquire(SemObject *self, PyObject *const *args, Py_ssize_t nargs,
               PyObject *kwnames)
{
    PyObject *blocking, *timeout;
    if (ready_obj(self) < 0 ||
        shm_sync_parse_acquire(args, nargs, kwnames, "acquire(blocking=True, timeout=None)",
                               &blocking, &timeout) < 0)
        return NULL;
    int64_t deadline = shm_sync_deadline(blocking, timeout);
    if (deadline < 0)
        return NULL;
    shm_pin(self->mapping);
    int r = sem_acquire(self, deadline);
    shm_unpin(self->mapping);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static PyObject *
py_sem_release(SemObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long n = 1;
    if (ready_obj(self) < 0)
        return NULL;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "release(n=1)");
        return NULL;
    }
    if (nargs == 1 && (n = PyLong_AsLongLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    if (sem_release(self, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
load_word(SemObject *self, uint64_t off)
{
    if (ready_obj(self) < 0)
        return NULL;
    uint32_t *w = shm_addr(self->mapping, self->offset + (long long)off, 4, 0);
    if (w == NULL)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(w, __ATOMIC_ACQUIRE));
}

static PyObject *
sem_get_value(SemObject *self, void *Py_UNUSED(c))
{
    PyObject *v = load_word(self, SEM_VALUE);
    if (v == NULL)
        return NULL;
    long x = (long)(int32_t)PyLong_AsUnsignedLong(v);
    Py_DECREF(v);
    return PyLong_FromLong(x);
}

static PyObject *
sem_get_waiters(SemObject *self, void *Py_UNUSED(c))
{
    return load_word(self, SEM_SLEEPERS);
}

static PyObject *
sem_get_maximum(SemObject *self, void *Py_UNUSED(c))
{
    PyObject *v = load_word(self, SEM_MAX);
    if (v == NULL)
        return NULL;
    if (PyLong_AsUnsignedLong(v) == SEM_NO_MAX) {
        Py_DECREF(v);
        Py_RETURN_NONE;
    }
    return v;
}

static PyObject *
sem_get_held(SemObject *self, void *Py_UNUSED(c))
{
    Sem s;
    if (ready_obj(self) < 0 || bind(self, &s) < 0)
        return NULL;
    if (s.view.m->token == 0)
        return PyLong_FromLong(0);
    uint64_t v = __atomic_load_n(entry(&s, SHM_TOKEN_SLOT(s.view.m->token)), __ATOMIC_ACQUIRE);
    if (SHM_SLOT_ENTRY_GEN(v) != SHM_TOKEN_GEN(s.view.m->token))
        return PyLong_FromLong(0);
    return PyLong_FromLong((int32_t)SHM_SLOT_ENTRY_COUNT(v));
}

static PyObject *
py_sem_format(PyObject *mod, PyObject *args)
{
    PyObject *mapping;
    long long offset, value, maximum = -1;
    if (!PyArg_ParseTuple(args, "O&LL|L:sem_format", shm_mapping_converter, &mapping, &offset,
                          &value, &maximum))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    if (value < 0 || value > INT32_MAX || maximum > INT32_MAX ||
        (maximum >= 0 && value > maximum)) {
        PyErr_Format(PyExc_ValueError, "need 0 <= value <= maximum < 2**31, got value=%lld "
                     "maximum=%lld", value, maximum);
        return NULL;
    }
    char *b = shm_sync_span(mapping, offset, footprint(m), 1);
    if (b == NULL)
        return NULL;
    memset(b + 4, 0, footprint(m) - 4);
    __atomic_store_n((uint32_t *)(b + SEM_MAX), maximum < 0 ? SEM_NO_MAX : (uint32_t)maximum,
                     __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(b + SEM_VALUE), (uint32_t)value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
py_sem_footprint(PyObject *mod, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLongLong(SEM_TABLE + 8 * n);
}

static PyMethodDef sem_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))py_sem_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, blocking=True, timeout=None)\n--\n\n"
     "acquire(blocking=True, timeout=None) -> bool\n\n"
     "Take one unit; False if none is free within timeout seconds."},
    {"release", (PyCFunction)(void (*)(void))py_sem_release, METH_FASTCALL,
     "release($self, n=1, /)\n--\n\nGive back n units and wake as many waiters."},
    {NULL}
};

static PyMemberDef sem_members[] = {
    {"offset", T_LONGLONG, offsetof(SemObject, offset), READONLY, NULL},
    {NULL}
};

static PyGetSetDef sem_getset[] = {
    {"value", (getter)sem_get_value, NULL,
     "Units free now (dead processes' units count once someone waits).", NULL},
    {"waiters", (getter)sem_get_waiters, NULL, "Waiters that may be asleep.", NULL},
    {"maximum", (getter)sem_get_maximum, NULL, "The bound on value, or None.", NULL},
    {"held", (getter)sem_get_held, NULL, "Units this attachment holds.", NULL},
    {NULL}
};

static PyType_Slot sem_spec_slots[] = {
    {Py_tp_dealloc, sem_dealloc},
    {Py_tp_doc, "Semaphore(mapping, offset, what='semaphore')\n--\n\n"
                "The counting semaphore at offset (128 + 8 * max_slots bytes, made by "
                "sem_format)."},
    {Py_tp_methods, sem_methods},
    {Py_tp_members, sem_members},
    {Py_tp_getset, sem_getset},
    {Py_tp_init, sem_init},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec sem_spec = {
    .name = "shmkit._core.Semaphore",
    .basicsize = sizeof(SemObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = sem_spec_slots,
};

static PyMethodDef module_fns[] = {
    {"sem_format", py_sem_format, METH_VARARGS,
     "sem_format($module, mapping, offset, value, maximum=-1, /)\n--\n\n"
     "Lay out a new semaphore (the creator, before anyone uses it)."},
    {"sem_footprint", py_sem_footprint, METH_O,
     "sem_footprint($module, max_slots, /)\n--\n\n"
     "sem_footprint(max_slots) -> int: bytes a semaphore needs."},
    {NULL}
};

int
shm_init_semaphore(PyObject *module)
{
    if (PyModule_AddFunctions(module, module_fns) < 0)
        return -1;
    return shm_add_type(module, &sem_spec, &shm_mod_state(module)->Semaphore);
}
