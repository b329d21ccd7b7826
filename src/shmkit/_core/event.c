/* event.c - a cross-process event on one u32.
 *
 * Word: bit 0 is the flag; the rest counts waiters (in steps of 2) so that
 * set() makes a system call only when someone may be asleep.  A waiter that
 * dies while counted only costs a spare wake-up later.  Waits go through
 * wait.h (spin, sliced sleeps, Ctrl-C, ClosedError when closed meanwhile).  Auto-reset events
 * hand each set() to exactly one waiter, which clears the flag with a CAS.
 *
 *   event_wait(m, off, timeout=None, auto_reset=False, what=None) -> bool
 *   event_set(m, off, auto_reset=False)
 *   event_clear(m, off)
 */
#include "sync.h"
#include <limits.h>

/* Try to take the flag: 1 if observed (and consumed when auto_reset). */
static inline int
try_take(uint32_t *w, int auto_reset)
{
    uint32_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    while (v & EVENT_FLAG) {
        if (!auto_reset)
            return 1;
        if (__atomic_compare_exchange_n(w, &v, v & ~EVENT_FLAG, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return 1;
    }
    return 0;
}

typedef struct {
    uint32_t *w;
    int auto_reset;
} EventWait;

static int
ev_ready(void *ctx, uint32_t *sleep_on)
{
    EventWait *e = ctx;
    for (;;) {
        if (try_take(e->w, e->auto_reset))
            return 1;
        uint32_t v = __atomic_load_n(e->w, __ATOMIC_ACQUIRE);
        if (!(v & EVENT_FLAG)) { /* never sleep on a set word: test it again */
            *sleep_on = v;
            return 0;
        }
    }
}

static void
ev_arm(void *ctx)
{
    shm_event_arm(((EventWait *)ctx)->w);
}

static void
ev_disarm(void *ctx)
{
    shm_event_disarm(((EventWait *)ctx)->w);
}

/* Wait through wait.h: spin (adapting, per mapping: a set() answered within
 * microseconds keeps it long, one from a descheduled peer shortens it),
 * count ourselves as a waiter, sleep in slices; Ctrl-C and a close() by
 * another thread end it. */
static int
event_wait(MappingObject *m, uint32_t *w, int64_t deadline, int auto_reset, const char *what)
{
    EventWait e = {w, auto_reset};
    shm_wait sw = {.m = m, .word = w, .ctx = &e, .ready = ev_ready, .arm = ev_arm,
                   .disarm = ev_disarm, .spin_adapt = &m->event_spin_ns, .what = what};
    return shm_wait_until(&sw, deadline);
}

static int
parse(PyObject *const *a, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi, const char *sig,
      uint32_t **w, int writable)
{
    long long off;
    if (shm_sync_args(a, n, lo, hi, sig, &off) < 0)
        return -1;
    *w = shm_addr(a[0], off, 4, writable);
    return *w == NULL ? -1 : 0;
}

/* Raise the flag and wake (one waiter for an auto-reset event, else all)
 * if anyone may be asleep. */
static void
event_raise(uint32_t *w, int auto_reset)
{
    uint32_t old = __atomic_fetch_or(w, EVENT_FLAG, __ATOMIC_SEQ_CST);
    shm_crash_point("event.set.flagged");
    if (old >= EVENT_WAITER)
        shm_futex_wake(w, auto_reset ? 1 : INT_MAX);
}

static PyObject *
py_event_wait(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    /* The arguments that may run Python code (a timeout's __float__ may
     * close the event) are read before the word's address is formed. */
    int64_t deadline = shm_deadline(n > 2 ? a[2] : NULL);
    if (deadline < 0)
        return NULL;
    int auto_reset = n > 3 ? PyObject_IsTrue(a[3]) : 0;
    if (auto_reset < 0)
        return NULL;
    uint32_t *w;
    if (parse(a, n, 2, 5, "event_wait(mapping, offset, timeout=None, auto_reset=False, "
              "what=None)", &w, 1) < 0)
        return NULL;
    const char *what = "the event";
    if (n > 4 && a[4] != Py_None && (what = PyUnicode_AsUTF8(a[4])) == NULL)
        return NULL;
    shm_pin(a[0]);
    int r = event_wait((MappingObject *)a[0], w, deadline, auto_reset, what);
    if (r == 1 && auto_reset) {
        /* A signal handler that raises now (Ctrl-C) would do it as this call
         * returns, and the set consumed would be lost with the result: it is
         * asked for here instead, and the set given back for the next wait.
         * (The mapping is pinned: code the handler runs cannot unmap w.) */
        shm_crash_point("event.wait.taken");
        if (PyErr_CheckSignals() < 0) {
            event_raise(w, 1);
            r = -1;
        }
    }
    shm_unpin(a[0]);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static PyObject *
py_event_set(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    uint32_t *w;
    if (parse(a, n, 2, 3, "event_set(mapping, offset, auto_reset=False)", &w, 1) < 0)
        return NULL;
    int auto_reset = n > 2 ? PyObject_IsTrue(a[2]) : 0;
    if (auto_reset < 0)
        return NULL;
    event_raise(w, auto_reset);
    Py_RETURN_NONE;
}

static PyObject *
py_event_clear(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    uint32_t *w;
    if (parse(a, n, 2, 2, "event_clear(mapping, offset)", &w, 1) < 0)
        return NULL;
    __atomic_fetch_and(w, ~EVENT_FLAG, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

PyMethodDef shm_event_methods[] = {
    {"event_wait", (PyCFunction)(void (*)(void))py_event_wait, METH_FASTCALL,
     "event_wait($module, mapping, offset, timeout=None, auto_reset=False, what=None, /)\n--\n\n"
     "event_wait(mapping, offset, timeout=None, auto_reset=False, what=None) -> bool\n\n"
     "Wait for the event's flag (consuming it when auto_reset); False on timeout;\n"
     "ClosedError naming `what` when another thread closes the mapping meanwhile."},
    {"event_set", (PyCFunction)(void (*)(void))py_event_set, METH_FASTCALL,
     "event_set($module, mapping, offset, auto_reset=False, /)\n--\n\n"},
    {"event_clear", (PyCFunction)(void (*)(void))py_event_clear, METH_FASTCALL,
     "event_clear($module, mapping, offset, /)\n--\n\n"},
    {NULL}
};
