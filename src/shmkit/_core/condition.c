/* condition.c - the condition variable over its own robust mutex.
 *
 * Layout (offsets from the condition's start; format 2):
 *
 *      0  u32 robust mutex (lock.c): the condition's lock, held by callers
 *      4  u32 notify counter: bumped by every notify() that grants wake-ups
 *     12  u32 wake-ups granted by notify() and not yet taken
 *     64  u64 per attach slot: generation << 32 | sleepers of that attachment
 *
 * Every word is changed with the mutex held, one word at a time, and no
 * invariant spans two of them: notify() recomputes what it needs.  Sleepers
 * are counted per attach slot, so before granting wake-ups notify() counts
 * out the sleepers of attachments that are gone, and caps the grants at the
 * live sleepers: a waiter killed while it waited never banks a wake-up for
 * a later waiter.  A woken waiter re-takes the mutex and takes one grant; a
 * waiter that finds none left goes back to sleep, so notify(n) returns at
 * most n waits.
 *
 *   cond_wait(mapping, offset, timeout=None, what=None) -> bool
 *   cond_notify(mapping, offset, n, what=None)
 *   cond_sleepers(mapping, offset) -> int   (live sleepers)
 *   cond_footprint(max_slots) -> int
 */
#include "sync.h"
#include <limits.h>

#define COND_LOCK 0
#define COND_SEQ 4
#define COND_GRANTED 12
#define COND_TABLE 64

typedef struct {
    shm_sync_view view;
    const char *what;
} Cond;

static inline uint32_t *
cu32(Cond *c, uint64_t off)
{
    return shm_sync_u32(&c->view, off);
}

static inline uint64_t *
centry(Cond *c, uint32_t slot)
{
    return shm_sync_entry(&c->view, COND_TABLE, slot);
}

static int
cond_bind(Cond *c, PyObject *mapping, PyObject *off_obj, PyObject *what)
{
    long long off = PyLong_AsLongLong(off_obj);
    if (off == -1 && PyErr_Occurred())
        return -1;
    if (shm_check_mapping(mapping) < 0)
        return -1;
    MappingObject *m = (MappingObject *)mapping;
    if (shm_sync_bind(&c->view, mapping, off, COND_TABLE + 8 * (uint64_t)m->max_slots, 1) < 0)
        return -1;
    c->what = "condition";
    if (what != NULL && what != Py_None && (c->what = PyUnicode_AsUTF8(what)) == NULL)
        return -1;
    return 0;
}

static int
held_by_us(Cond *c, const char *call)
{
    uint32_t v = __atomic_load_n(cu32(c, COND_LOCK), __ATOMIC_ACQUIRE);
    if (c->view.m->token == 0 || (v & SHM_TOKEN_MASK) != c->view.m->token) {
        PyErr_Format(PyExc_RuntimeError, "%s() on %s without holding it", call, c->what);
        return 0;
    }
    return 1;
}

/* Add delta to our attachment's sleepers (mutex held). */
static void
count_me(Cond *c, int delta)
{
    uint32_t slot = SHM_TOKEN_SLOT(c->view.m->token);
    uint64_t v = __atomic_load_n(centry(c, slot), __ATOMIC_RELAXED);
    uint32_t n = SHM_SLOT_ENTRY_GEN(v) == SHM_TOKEN_GEN(c->view.m->token)
                     ? SHM_SLOT_ENTRY_COUNT(v) : 0; /* a gone predecessor's: not ours */
    if (delta < 0 && n == 0)
        return;
    __atomic_store_n(centry(c, slot),
                     (uint64_t)SHM_TOKEN_GEN(c->view.m->token) << 32 | (n + (uint32_t)delta),
                     __ATOMIC_RELEASE);
}

/* Count the live sleepers, zeroing the counts of attachments that are gone
 * (mutex held). */
static uint64_t
live_sleepers(Cond *c, int reap)
{
    uint64_t live = 0;
    for (uint32_t slot = 0; slot < c->view.m->max_slots; slot++) {
        uint64_t v = __atomic_load_n(centry(c, slot), __ATOMIC_ACQUIRE);
        if (SHM_SLOT_ENTRY_COUNT(v) == 0)
            continue;
        if (shm_token_alive(c->view.m, shm_slot_entry_token(v, slot)))
            live += SHM_SLOT_ENTRY_COUNT(v);
        else if (reap) {
            __atomic_store_n(centry(c, slot), v & ~0xFFFFFFFFull, __ATOMIC_RELEASE);
            shm_crash_point("cond.notify.reaped");
        }
    }
    return live;
}

typedef struct {
    Cond *c;
    uint32_t seq0;
} CondWait;

static int
cond_ready(void *ctx, uint32_t *sleep_on)
{
    CondWait *w = ctx;
    uint32_t seq = __atomic_load_n(cu32(w->c, COND_SEQ), __ATOMIC_ACQUIRE);
    if (seq != w->seq0 && __atomic_load_n(cu32(w->c, COND_GRANTED), __ATOMIC_ACQUIRE) > 0)
        return 1;
    *sleep_on = seq;
    return 0;
}

static int
relock(Cond *c)
{
    int r = shm_lock_acquire(c->view.m, cu32(c, COND_LOCK), SHM_FOREVER);
    if (r == 2 && shm_warn_owner_died(c->view.m, c->what) < 0)
        return -1; /* held: the caller's with-block releases it */
    return r < 0 ? -1 : 0;
}

/* Take a grant if one was made since we started waiting (mutex held). */
static int
take_grant(Cond *c, uint32_t seq0)
{
    uint32_t g = __atomic_load_n(cu32(c, COND_GRANTED), __ATOMIC_ACQUIRE);
    if (g == 0 || __atomic_load_n(cu32(c, COND_SEQ), __ATOMIC_ACQUIRE) == seq0)
        return 0;
    __atomic_store_n(cu32(c, COND_GRANTED), g - 1, __ATOMIC_RELEASE);
    return 1;
}

static int
cond_wait(Cond *c, int64_t deadline)
{
    if (!held_by_us(c, "wait"))
        return -1;
    uint32_t me = c->view.m->token;
    count_me(c, +1);
    uint32_t seq0 = __atomic_load_n(cu32(c, COND_SEQ), __ATOMIC_ACQUIRE);
    shm_crash_point("cond.wait.counted");
    if (shm_lock_release(c->view.m, cu32(c, COND_LOCK)) < 0)
        return -1;
    shm_crash_point("cond.wait.released");
    int notified = 0, err = 0;
    for (;;) {
        CondWait cw = {c, seq0};
        shm_wait w = {.m = c->view.m, .word = cu32(c, COND_SEQ), .ctx = &cw, .ready = cond_ready,
                      .spin_ns = SHM_WAIT_SPIN_NS, .what = c->what};
        int r = shm_wait_until(&w, deadline);
        if (r <= 0) {
            err = r < 0;
            break;
        }
        if (relock(c) < 0) {
            err = 1;
            break;
        }
        shm_crash_point("cond.wait.retaken");
        if (take_grant(c, seq0)) {
            notified = 1;
            break;
        }
        /* Another waiter took the last grant: sleep again. */
        if (shm_lock_release(c->view.m, cu32(c, COND_LOCK)) < 0) {
            err = 1;
            break;
        }
    }
    /* On every way out, hold the mutex again, as the caller's with-block
     * expects, and stop counting ourselves. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (c->view.m->token == me && c->view.m->base != NULL) {
        if ((__atomic_load_n(cu32(c, COND_LOCK), __ATOMIC_ACQUIRE) & SHM_TOKEN_MASK) != me &&
            relock(c) < 0) {
            if (type == NULL)
                PyErr_Fetch(&type, &value, &tb);
            else
                PyErr_Clear();
        }
        if ((__atomic_load_n(cu32(c, COND_LOCK), __ATOMIC_ACQUIRE) & SHM_TOKEN_MASK) == me) {
            /* A notify() that raced with our time-out counted us: take its
             * wake-up, so none is left for nobody. */
            if (!notified && !err && take_grant(c, seq0))
                notified = 1;
            count_me(c, -1);
            shm_crash_point("cond.wait.uncounted");
        }
    }
    PyErr_Restore(type, value, tb);
    if (PyErr_Occurred())
        return -1;
    return notified;
}

static int
cond_notify(Cond *c, long long n)
{
    if (!held_by_us(c, "notify"))
        return -1;
    uint64_t live = live_sleepers(c, 1);
    uint32_t granted = __atomic_load_n(cu32(c, COND_GRANTED), __ATOMIC_ACQUIRE);
    if (granted > live) { /* grants made for sleepers that are gone */
        granted = (uint32_t)live;
        __atomic_store_n(cu32(c, COND_GRANTED), granted, __ATOMIC_RELEASE);
        shm_crash_point("cond.notify.capped");
    }
    uint64_t k = live - granted;
    if ((uint64_t)n < k)
        k = (uint64_t)n;
    if (k == 0)
        return 0;
    __atomic_store_n(cu32(c, COND_GRANTED), granted + (uint32_t)k, __ATOMIC_RELEASE);
    shm_crash_point("cond.notify.granted");
    __atomic_add_fetch(cu32(c, COND_SEQ), 1, __ATOMIC_SEQ_CST);
    shm_crash_point("cond.notify.bumped");
    shm_futex_wake(cu32(c, COND_SEQ), k > INT_MAX ? INT_MAX : (int)k);
    return 0;
}

static PyObject *
py_cond_wait(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    Cond c;
    if (n < 2 || n > 4) {
        PyErr_SetString(PyExc_TypeError, "cond_wait(mapping, offset, timeout=None, what=None)");
        return NULL;
    }
    if (cond_bind(&c, a[0], a[1], n > 3 ? a[3] : NULL) < 0)
        return NULL;
    int64_t deadline = shm_deadline(n > 2 ? a[2] : NULL);
    if (deadline < 0)
        return NULL;
    shm_pin(a[0]);
    int r = cond_wait(&c, deadline);
    shm_unpin(a[0]);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static PyObject *
py_cond_notify(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    Cond c;
    if (n < 3 || n > 4) {
        PyErr_SetString(PyExc_TypeError, "cond_notify(mapping, offset, n, what=None)");
        return NULL;
    }
    long long k = PyLong_AsLongLong(a[2]);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (cond_bind(&c, a[0], a[1], n > 3 ? a[3] : NULL) < 0)
        return NULL;
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "notify(n): n must be >= 0, not %lld", k);
        return NULL;
    }
    if (cond_notify(&c, k) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
py_cond_sleepers(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    Cond c;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "cond_sleepers(mapping, offset)");
        return NULL;
    }
    long long off = PyLong_AsLongLong(a[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (shm_check_mapping(a[0]) < 0)
        return NULL;
    if (shm_sync_bind(&c.view, a[0], off,
                      COND_TABLE + 8 * (uint64_t)((MappingObject *)a[0])->max_slots, 0) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(live_sleepers(&c, 0));
}

static PyObject *
py_cond_footprint(PyObject *mod, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLongLong(COND_TABLE + 8 * n);
}

static PyMethodDef cond_fns[] = {
    {"cond_wait", (PyCFunction)(void (*)(void))py_cond_wait, METH_FASTCALL,
     "cond_wait($module, mapping, offset, timeout=None, what=None, /)\n--\n\n"
     "cond_wait(mapping, offset, timeout=None, what=None) -> bool\n\n"
     "With the condition's mutex held: release it, sleep until notified, take it\n"
     "again; False on timeout."},
    {"cond_notify", (PyCFunction)(void (*)(void))py_cond_notify, METH_FASTCALL,
     "cond_notify($module, mapping, offset, n, what=None, /)\n--\n\n"
     "With the mutex held: grant up to n wake-ups to live sleepers."},
    {"cond_sleepers", (PyCFunction)(void (*)(void))py_cond_sleepers, METH_FASTCALL,
     "cond_sleepers($module, mapping, offset, /)\n--\n\n"
     "cond_sleepers(mapping, offset) -> int: live sleepers."},
    {"cond_footprint", py_cond_footprint, METH_O,
     "cond_footprint($module, max_slots, /)\n--\n\n"
     "cond_footprint(max_slots) -> int: bytes a condition needs."},
    {NULL}
};

int
shm_init_condition(PyObject *module)
{
    return PyModule_AddFunctions(module, cond_fns);
}
