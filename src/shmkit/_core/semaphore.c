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

typedef struct {
    SHM_SYNC_HANDLE_HEAD
    uint32_t maximum;   /* the stored maximum as this handle found it */
} SemObject;

/* One operation's view: where the semaphore is, its journal. */
typedef struct {
    shm_sync_view view;
    shm_journal jn;
    SemObject *self;
} Sem;

/* Bind s to self's memory; -1 with an exception (closed, out of bounds). */
static int
bind(SemObject *self, Sem *s)
{
    if (shm_sync_bind(&s->view, self->mapping, self->offset, SEM_TABLE, 1, self->what_s) < 0)
        return -1;
    s->self = self;
    shm_journal_bind(&s->jn, s->view.m, s->view.b, SEM_JOURNAL, SEM_JCAP, SEM_VALUE,
                     shm_sync_footprint(s->view.m, SEM_TABLE), self->what_s);
    return 0;
}

/* Give back what the entry of slot holds and zero it (lock held); one
 * journaled update, committed.  Returns the units given back, or -1. */
static int64_t
give_back(Sem *s, uint32_t slot, const char *step_value, const char *step_held)
{
    uint64_t v = __atomic_load_n(SHM_SYNC_ENTRY(s, slot), __ATOMIC_ACQUIRE);
    int32_t held = (int32_t)SHM_SLOT_ENTRY_COUNT(v);
    if (held == 0)
        return 0;
    int32_t value = (int32_t)__atomic_load_n(SHM_SYNC_U32(s, SEM_VALUE), __ATOMIC_RELAXED);
    int64_t back = held > 0 ? held : 0;
    if ((int64_t)value + back > INT32_MAX)
        back = INT32_MAX - (int64_t)value; /* only a corrupt count gets here */
    shm_jset32(&s->jn, SEM_VALUE, (uint32_t)(value + (int32_t)back), 0);
    shm_crash_point(step_value);
    shm_jset64(&s->jn, SEM_TABLE + 8 * (uint64_t)slot, SHM_SLOT_ENTRY_CLEARED(v), 0);
    shm_crash_point(step_held);
    if (shm_journal_commit(&s->jn) < 0)
        return -1;
    return back;
}

static void
announce(Sem *s, int64_t n)
{
    __atomic_add_fetch(SHM_SYNC_U32(s, SEM_SEQ), 1, __ATOMIC_SEQ_CST);
    if (n > 0 && __atomic_load_n(SHM_SYNC_U32(s, SEM_SLEEPERS), __ATOMIC_SEQ_CST) != 0)
        shm_futex_wake(SHM_SYNC_U32(s, SEM_SEQ), n > INT_MAX ? INT_MAX : (int)n);
}

/* Give back the units of every attachment that is gone (lock held). */
typedef struct {
    Sem *s;
    int64_t freed;
} Reclaim;

static int
reclaim_visit(void *ctx, uint32_t slot, uint64_t *e, uint64_t v, int alive)
{
    Reclaim *rc = ctx;
    if (alive)
        return 0;
    int64_t r = give_back(rc->s, slot, "sem.reclaim.value", "sem.reclaim.held");
    if (r < 0)
        return -1;
    rc->freed += r;
    return 0;
}

static int64_t
reclaim_dead(Sem *s)
{
    Reclaim rc = {s, 0};
    return shm_sync_scan(&s->view, reclaim_visit, &rc) < 0 ? -1 : rc.freed;
}

/* Wake as many waiters as the r units that came back.  0, or -1 if r is. */
static int
announce_back(Sem *s, int64_t r)
{
    if (r > 0)
        announce(s, r);
    return r < 0 ? -1 : 0;
}

static int
reclaim_announce(Sem *s)
{
    return announce_back(s, reclaim_dead(s));
}

/* Our slot's entry may be a dead predecessor's: give its units back before
 * our first update overwrites it (lock held).  0, or -1. */
static int
reclaim_own(Sem *s)
{
    uint32_t slot = SHM_TOKEN_SLOT(s->view.m->token);
    uint64_t v = __atomic_load_n(SHM_SYNC_ENTRY(s, slot), __ATOMIC_ACQUIRE);
    if (SHM_SLOT_ENTRY_COUNT(v) == 0 || SHM_SLOT_ENTRY_GEN(v) == SHM_TOKEN_GEN(s->view.m->token))
        return 0;
    return announce_back(s, give_back(s, slot, "sem.reclaim.value", "sem.reclaim.held"));
}

/* The maximum never changes after sem_format, and no release or acquire
 * leaves value outside 0..maximum: a stored maximum other than the one
 * this handle found, or a value outside that range, is damage (lock
 * held).  Returns the bound on value, or -1 with CorruptError. */
static int64_t
sane_limit(Sem *s, int32_t value)
{
    uint32_t max = __atomic_load_n(SHM_SYNC_U32(s, SEM_MAX), __ATOMIC_RELAXED);
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
    return reclaim_announce(ctx);
}

static int
lock(Sem *s)
{
    int r = shm_lock_acquire_repair(s->view.m, SHM_SYNC_U32(s, SEM_LOCK), SHM_FOREVER, &s->jn, repair, s);
    return r < 0 ? -1 : 0;
}

static void
unlock(Sem *s)
{
    shm_lock_release_journal(s->view.m, SHM_SYNC_U32(s, SEM_LOCK), &s->jn);
}

/* Add delta to our value and holds: one journaled update (lock held). */
static int
update(Sem *s, int32_t value, int32_t held_delta, const char *step_value,
       const char *step_held)
{
    uint32_t slot = SHM_TOKEN_SLOT(s->view.m->token);
    uint64_t v = __atomic_load_n(SHM_SYNC_ENTRY(s, slot), __ATOMIC_RELAXED);
    uint32_t held = SHM_SLOT_ENTRY_COUNT(v) + (uint32_t)held_delta;
    shm_jset32(&s->jn, SEM_VALUE, (uint32_t)value, 0);
    shm_crash_point(step_value);
    shm_jset64(&s->jn, SEM_TABLE + 8 * (uint64_t)slot, shm_slot_entry_make(s->view.m->token, held),
               0);
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
        sane_limit(s, (int32_t)__atomic_load_n(SHM_SYNC_U32(s, SEM_VALUE), __ATOMIC_RELAXED)) < 0)
        r = -1;
    if (r == 0) {
        int32_t value = (int32_t)__atomic_load_n(SHM_SYNC_U32(s, SEM_VALUE), __ATOMIC_RELAXED);
        if (value <= 0 && check_dead) {
            int64_t freed = reclaim_dead(s);
            if (freed < 0)
                r = -1;
            else if (freed > 0)
                announce(s, freed - 1);
            value = (int32_t)__atomic_load_n(SHM_SYNC_U32(s, SEM_VALUE), __ATOMIC_RELAXED);
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
} SemWait;

static int
sem_ready(void *ctx, uint32_t *sleep_on)
{
    SemWait *w = ctx;
    uint32_t seq = __atomic_load_n(SHM_SYNC_U32(w->s, SEM_SEQ), __ATOMIC_SEQ_CST);
    if (seq != w->seq0 || shm_sem_free(w->s->view.b))
        return 1;
    *sleep_on = seq;
    return 0;
}

static void
sem_arm(void *ctx)
{
    shm_sem_arm(((SemWait *)ctx)->s->view.b);
}

static void
sem_disarm(void *ctx)
{
    shm_sem_disarm(((SemWait *)ctx)->s->view.b);
}

/* After a slice without news: units of holders that died come back. */
static int
sem_check(void *ctx)
{
    Sem *s = ((SemWait *)ctx)->s;
    if (lock(s) < 0)
        return -1;
    int r = reclaim_announce(s);
    unlock(s);
    return r;
}

static int
sem_acquire(SemObject *self, int64_t deadline)
{
    Sem s;
    if (bind(self, &s) < 0)
        return -1;
    int checked = 0;
    for (;;) {
        uint32_t seq0 = __atomic_load_n(SHM_SYNC_U32(&s, SEM_SEQ), __ATOMIC_SEQ_CST);
        int r = try_take(&s, !checked);
        if (r != 0)
            return r;
        checked = 1;
        if (shm_now_ns() >= deadline)
            return 0;
        SemWait sw = {&s, seq0};
        shm_wait w = {.m = s.view.m, .word = SHM_SYNC_U32(&s, SEM_SEQ), .ctx = &sw, .ready = sem_ready,
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
        int32_t value = (int32_t)__atomic_load_n(SHM_SYNC_U32(&s, SEM_VALUE), __ATOMIC_RELAXED);
        uint32_t max = __atomic_load_n(SHM_SYNC_U32(&s, SEM_MAX), __ATOMIC_RELAXED);
        int64_t limit = sane_limit(&s, value);
        if (limit < 0)
            r = -1; /* damage: CorruptError */
        else if ((int64_t)value + n > limit) {
            /* a sane maximum: the caller released more than was acquired,
             * unless this process holds those n units: then no correct
             * history leaves the value this high (a dead holder's damaged
             * count, given back by a reclaim, raised it) */
            uint32_t slot = SHM_TOKEN_SLOT(s.view.m->token);
            uint64_t own = __atomic_load_n(SHM_SYNC_ENTRY(&s, slot), __ATOMIC_RELAXED);
            int32_t held = SHM_SLOT_ENTRY_GEN(own) == SHM_TOKEN_GEN(s.view.m->token)
                               ? (int32_t)SHM_SLOT_ENTRY_COUNT(own)
                               : 0;
            if ((int64_t)held >= n)
                PyErr_Format(shm_state_of(self->mapping)->CorruptError,
                             "%s holds value %d, and this process holds %d units: "
                             "releasing %lld would pass its limit %lld, which no correct "
                             "history reaches: its payload is damaged; recreate it",
                             self->what_s, value, held, n, (long long)limit);
            else if (max == SEM_NO_MAX || max > INT32_MAX)
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
            __atomic_add_fetch(SHM_SYNC_U32(&s, SEM_SEQ), 1, __ATOMIC_SEQ_CST);
        }
    }
    if (locked)
        unlock(&s);
    shm_crash_point("sem.release.unlocked");
    if (r == 0 && __atomic_load_n(SHM_SYNC_U32(&s, SEM_SLEEPERS), __ATOMIC_SEQ_CST) != 0)
        shm_futex_wake(SHM_SYNC_U32(&s, SEM_SEQ), (int)n);
    shm_unpin(self->mapping);
    return r;
}

/* ---- the Python type ---- */

static int
sem_init(SemObject *self, PyObject *args, PyObject *kwds)
{
    char *b;
    if (shm_sync_handle_init((shm_sync_handle *)self, args, kwds, "semaphore", SEM_TABLE,
                             "semaphore", &b) < 0)
        return -1;
    self->maximum = __atomic_load_n((uint32_t *)(b + SEM_MAX), __ATOMIC_ACQUIRE);
    return 0;
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

/* sem_acquire with the mapping pinned for the wait (another thread may
 * close the handle meanwhile). */
static int
sem_acquire_pinned(SemObject *self, int64_t deadline)
{
    shm_pin(self->mapping);
    int r = sem_acquire(self, deadline);
    shm_unpin(self->mapping);
    return r;
}

/* release() of one unit, as a method without arguments (shm_sync_acquired) */
static PyObject *
release_unit(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    if (sem_release((SemObject *)self, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
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
    int r = shm_sync_acquired((PyObject *)self, sem_acquire_pinned(self, deadline),
                              release_unit);
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
    if (nargs == 1 && PyBool_Check(args[0])) { /* an int, never meant as a count */
        PyErr_SetString(PyExc_TypeError, "release(n): n is how many units to give back, "
                                         "an int, not a bool");
        return NULL;
    }
    if (nargs == 1 && (n = PyLong_AsLongLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    if (sem_release(self, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* `with sem:` takes one unit for the block and gives it back after. */
static PyObject *
sem_enter(PyObject *obj, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    SemObject *self = (SemObject *)obj;
    if (ready_obj(self) < 0 || sem_acquire_pinned(self, SHM_FOREVER) < 0)
        return NULL;
    return Py_NewRef(obj);
}

static PyObject *
sem_exit(PyObject *obj, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    SemObject *self = (SemObject *)obj;
    if (ready_obj(self) < 0 || sem_release(self, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static const shm_special_def sem_specials[] = {
    {"__enter__", sem_enter, 0, "($self, /)", "Take one unit (as acquire())."},
    {"__exit__", sem_exit, -1, "($self, *exc_info)", "Give the unit back."},
    {NULL},
};

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
    uint64_t v = __atomic_load_n(SHM_SYNC_ENTRY(&s, SHM_TOKEN_SLOT(s.view.m->token)), __ATOMIC_ACQUIRE);
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
    char *b = shm_span(mapping, offset, shm_sync_footprint(m, SEM_TABLE), 1);
    if (b == NULL)
        return NULL;
    memset(b + 4, 0, shm_sync_footprint(m, SEM_TABLE) - 4);
    __atomic_store_n((uint32_t *)(b + SEM_MAX), maximum < 0 ? SEM_NO_MAX : (uint32_t)maximum,
                     __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(b + SEM_VALUE), (uint32_t)value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *
py_sem_footprint(PyObject *mod, PyObject *arg)
{
    return shm_sync_footprint_of(arg, SEM_TABLE);
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
    {Py_tp_dealloc, shm_sync_handle_dealloc},
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
    shm_state *st = shm_mod_state(module);
    if (shm_add_type(module, &sem_spec, &st->Semaphore) < 0)
        return -1;
    return shm_add_specials(module, st->Semaphore, sem_specials);
}
