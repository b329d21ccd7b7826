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

/* One call's view of a condition (its name in view.what). */
typedef struct {
    shm_sync_view view;
} Cond;

static int
cond_bind(Cond *c, PyObject *mapping, long long off, PyObject *what, int writable)
{
    if (shm_check_mapping(mapping) < 0)
        return -1;
    const char *w = "condition";
    if (what != NULL && what != Py_None && (w = PyUnicode_AsUTF8(what)) == NULL)
        return -1;
    return shm_sync_bind(&c->view, mapping, off, COND_TABLE, writable, w);
}

/* ---- the protocol pieces that waitset.c's coroutine wait shares (sync.h) ---- */

int
shm_cond_held(MappingObject *m, char *b, const char *what, const char *call)
{
    int held = shm_lock_check_held(m, (uint32_t *)(b + COND_LOCK));
    if (held == 0)
        PyErr_Format(PyExc_RuntimeError, "%s() on %s without holding it", call, what);
    return held > 0;
}

void
shm_cond_count(MappingObject *m, char *b, int delta)
{
    uint64_t *e = (uint64_t *)(b + COND_TABLE + 8 * (uint64_t)SHM_TOKEN_SLOT(m->token));
    /* a gone predecessor's count is not ours */
    uint32_t n = shm_slot_entry_mine(__atomic_load_n(e, __ATOMIC_RELAXED), m->token);
    if (delta < 0 && n == 0)
        return;
    __atomic_store_n(e, shm_slot_entry_make(m->token, n + (uint32_t)delta), __ATOMIC_RELEASE);
}

int
shm_cond_take_grant(char *b, uint32_t seq0)
{
    uint32_t *granted = (uint32_t *)(b + COND_GRANTED);
    uint32_t g = __atomic_load_n(granted, __ATOMIC_ACQUIRE);
    if (g == 0 || __atomic_load_n((uint32_t *)(b + COND_SEQ), __ATOMIC_ACQUIRE) == seq0)
        return 0;
    __atomic_store_n(granted, g - 1, __ATOMIC_RELEASE);
    return 1;
}

/* ---- the condition's own calls ---- */

/* Count the live sleepers, zeroing the counts of attachments that are gone
 * when reap (mutex held). */
typedef struct {
    uint64_t live;
    int reap;
} Sleepers;

static int
sleepers_visit(void *ctx, uint32_t slot, uint64_t *e, uint64_t v, int alive)
{
    Sleepers *sl = ctx;
    if (alive)
        sl->live += SHM_SLOT_ENTRY_COUNT(v);
    else if (sl->reap) {
        __atomic_store_n(e, SHM_SLOT_ENTRY_CLEARED(v), __ATOMIC_RELEASE);
        shm_crash_point("cond.notify.reaped");
    }
    return 0;
}

static uint64_t
live_sleepers(Cond *c, int reap)
{
    Sleepers sl = {0, reap};
    shm_sync_scan(&c->view, sleepers_visit, &sl);
    return sl.live;
}

typedef struct {
    Cond *c;
    uint32_t seq0;
} CondWait;

static int
cond_ready(void *ctx, uint32_t *sleep_on)
{
    CondWait *w = ctx;
    uint32_t seq = __atomic_load_n(SHM_SYNC_U32(w->c, COND_SEQ), __ATOMIC_ACQUIRE);
    if (shm_cond_granted(w->c->view.b, seq, w->seq0))
        return 1;
    *sleep_on = seq;
    return 0;
}

/* Take the mutex back.  *held says whether this call now holds it, which
 * the word cannot say: it carries the process's token, and another thread
 * of ours may hold it.  -1 with an error set (held or not), else 0. */
static int
relock(Cond *c, int *held)
{
    int r = shm_lock_acquire(c->view.m, SHM_SYNC_U32(c, COND_LOCK), SHM_FOREVER);
    *held = r > 0;
    if (r == 2 && shm_warn_owner_died(c->view.m, c->view.what) < 0)
        return -1; /* held: the caller's with-block releases it */
    return r < 0 ? -1 : 0;
}

/* Take the mutex back on the way out of wait(), keeping the first error in
 * exc[] (type, value, traceback).  An interruption (KeyboardInterrupt,
 * SystemExit: what signal handlers raise) while another thread of this
 * process holds the mutex is kept for later and the take-back goes on:
 * raising without the mutex would let the caller's with-block release that
 * thread's hold, since the word carries the process's token, not the
 * thread's.  That thread runs, so it lets go.  A holder in another process,
 * which may be stopped, lets the interruption through at once. */
static void
retake(Cond *c, uint32_t me, int *held, PyObject **exc)
{
    for (;;) {
        int r = relock(c, held);
        if (r == 0)
            return;
        int interrupted = PyErr_ExceptionMatches(PyExc_BaseException) &&
                          !PyErr_ExceptionMatches(PyExc_Exception);
        if (exc[0] == NULL)
            PyErr_Fetch(&exc[0], &exc[1], &exc[2]);
        else
            PyErr_Clear();
        if (*held || !interrupted || c->view.m->token != me || c->view.m->base == NULL ||
            (__atomic_load_n(SHM_SYNC_U32(c, COND_LOCK), __ATOMIC_ACQUIRE) &
             SHM_TOKEN_MASK) != me)
            return;
    }
}

static int
cond_wait(Cond *c, int64_t deadline)
{
    if (!shm_cond_held(c->view.m, c->view.b, c->view.what, "wait"))
        return -1;
    uint32_t me = c->view.m->token;
    shm_cond_count(c->view.m, c->view.b, +1);
    uint32_t seq0 = __atomic_load_n(SHM_SYNC_U32(c, COND_SEQ), __ATOMIC_ACQUIRE);
    shm_crash_point("cond.wait.counted");
    if (shm_lock_release(c->view.m, SHM_SYNC_U32(c, COND_LOCK)) < 0)
        return -1;
    shm_crash_point("cond.wait.released");
    int notified = 0, err = 0, held = 0;
    for (;;) {
        CondWait cw = {c, seq0};
        shm_wait w = {.m = c->view.m, .word = SHM_SYNC_U32(c, COND_SEQ), .ctx = &cw, .ready = cond_ready,
                      .spin_ns = SHM_WAIT_SPIN_NS, .what = c->view.what};
        int r = shm_wait_until(&w, deadline);
        if (r <= 0) {
            err = r < 0;
            break;
        }
        if (relock(c, &held) < 0) {
            err = 1;
            break;
        }
        shm_crash_point("cond.wait.retaken");
        if (shm_cond_take_grant(c->view.b, seq0)) {
            notified = 1;
            break;
        }
        /* Another waiter took the last grant: sleep again. */
        held = 0;
        if (shm_lock_release(c->view.m, SHM_SYNC_U32(c, COND_LOCK)) < 0) {
            err = 1;
            break;
        }
    }
    /* On every way out, hold the mutex again, as the caller's with-block
     * expects, and stop counting ourselves. */
    PyObject *exc[3];
    PyErr_Fetch(&exc[0], &exc[1], &exc[2]);
    if (c->view.m->token == me && c->view.m->base != NULL) {
        if (!held)
            retake(c, me, &held, exc);
        if (held) {
            /* A notify() that raced with our time-out counted us: take its
             * wake-up, so none is left for nobody. */
            if (!notified && !err && shm_cond_take_grant(c->view.b, seq0))
                notified = 1;
            shm_cond_count(c->view.m, c->view.b, -1);
            shm_crash_point("cond.wait.uncounted");
        }
    }
    PyErr_Restore(exc[0], exc[1], exc[2]);
    if (PyErr_Occurred())
        return -1;
    return notified;
}

static int
cond_notify(Cond *c, long long n)
{
    if (!shm_cond_held(c->view.m, c->view.b, c->view.what, "notify"))
        return -1;
    uint64_t live = live_sleepers(c, 1);
    uint32_t granted = __atomic_load_n(SHM_SYNC_U32(c, COND_GRANTED), __ATOMIC_ACQUIRE);
    if (granted > live) { /* grants made for sleepers that are gone */
        granted = (uint32_t)live;
        __atomic_store_n(SHM_SYNC_U32(c, COND_GRANTED), granted, __ATOMIC_RELEASE);
        shm_crash_point("cond.notify.capped");
    }
    uint64_t k = live - granted;
    if ((uint64_t)n < k)
        k = (uint64_t)n;
    if (k == 0)
        return 0;
    __atomic_store_n(SHM_SYNC_U32(c, COND_GRANTED), granted + (uint32_t)k, __ATOMIC_RELEASE);
    shm_crash_point("cond.notify.granted");
    __atomic_add_fetch(SHM_SYNC_U32(c, COND_SEQ), 1, __ATOMIC_SEQ_CST);
    shm_crash_point("cond.notify.bumped");
    shm_futex_wake(SHM_SYNC_U32(c, COND_SEQ), k > INT_MAX ? INT_MAX : (int)k);
    return 0;
}

static PyObject *
py_cond_wait(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    Cond c;
    long long off;
    /* the timeout first: its __float__ may close the condition */
    int64_t deadline = shm_deadline(n > 2 ? a[2] : NULL);
    if (deadline < 0 ||
        shm_sync_args(a, n, 2, 4, "cond_wait(mapping, offset, timeout=None, what=None)",
                      &off) < 0 ||
        cond_bind(&c, a[0], off, n > 3 ? a[3] : NULL, 1) < 0)
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
    long long off, k;
    if (n >= 3 && PyBool_Check(a[2])) { /* an int, never meant as a count */
        PyErr_SetString(PyExc_TypeError, "notify(n): n is how many waiters to wake, an "
                                         "int, not a bool");
        return NULL;
    }
    if (shm_sync_args(a, n, 3, 4, "cond_notify(mapping, offset, n, what=None)", &off) < 0 ||
        ((k = PyLong_AsLongLong(a[2])) == -1 && PyErr_Occurred()) ||
        cond_bind(&c, a[0], off, n > 3 ? a[3] : NULL, 1) < 0)
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
    long long off;
    if (shm_sync_args(a, n, 2, 2, "cond_sleepers(mapping, offset)", &off) < 0 ||
        cond_bind(&c, a[0], off, NULL, 0) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(live_sleepers(&c, 0));
}

static PyObject *
py_cond_footprint(PyObject *mod, PyObject *arg)
{
    return shm_sync_footprint_of(arg, COND_TABLE);
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
