/* event.c - a cross-process event on one u32.
 *
 * Word: bit 0 is the flag; the rest counts waiters (in steps of 2) so that
 * set() makes a system call only when someone may be asleep.  A waiter that
 * dies while counted only costs a spare wake-up later.  Auto-reset events
 * hand each set() to exactly one waiter, which clears the flag with a CAS.
 *
 *   event_wait(m, off, timeout=None, auto_reset=False) -> bool
 *   event_set(m, off, auto_reset=False)
 *   event_clear(m, off)
 */
#include "shmkit.h"
#include <errno.h>
#include <limits.h>

#define SPIN_NS (30 * 1000LL)
#define SLICE_NS (50 * 1000 * 1000LL)

/* Try to take the flag: 1 if observed (and consumed when auto_reset). */
static inline int
try_take(uint32_t *w, int auto_reset)
{
    uint32_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    while (v & 1u) {
        if (!auto_reset)
            return 1;
        if (__atomic_compare_exchange_n(w, &v, v & ~1u, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return 1;
    }
    return 0;
}

static int
event_wait(uint32_t *w, int64_t deadline, int auto_reset)
{
    if (try_take(w, auto_reset))
        return 1;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t spin_end = shm_now_ns() + SPIN_NS;
    if (spin_end > deadline)
        spin_end = deadline;
    do {
        for (int i = 0; i < 64 && !got; i++) {
            cpu_relax();
            got = try_take(w, auto_reset);
        }
    } while (!got && shm_now_ns() < spin_end);
    Py_END_ALLOW_THREADS
    if (got)
        return 1;
    __atomic_fetch_add(w, 2u, __ATOMIC_SEQ_CST);
    int result = 0;
    for (;;) {
        if (try_take(w, auto_reset)) {
            result = 1;
            break;
        }
        uint32_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
        if (v & 1u)
            continue;
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = shm_futex_wait(w, v, deadline, SLICE_NS);
        Py_END_ALLOW_THREADS
        if (err != 0 && PyErr_CheckSignals() < 0) {
            result = -1;
            break;
        }
        if (err == ETIMEDOUT && shm_now_ns() >= deadline)
            break;
    }
    __atomic_fetch_sub(w, 2u, __ATOMIC_SEQ_CST);
    return result;
}

static int
parse(PyObject *const *a, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi, const char *sig,
      uint32_t **w, int writable)
{
    if (n < lo || n > hi) {
        PyErr_Format(PyExc_TypeError, "expected %s", sig);
        return -1;
    }
    long long off = PyLong_AsLongLong(a[1]);
    if (off == -1 && PyErr_Occurred())
        return -1;
    *w = shm_addr(a[0], off, 4, writable);
    return *w == NULL ? -1 : 0;
}

static PyObject *
py_event_wait(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    uint32_t *w;
    if (parse(a, n, 2, 4, "event_wait(mapping, offset, timeout=None, auto_reset=False)",
              &w, 1) < 0)
        return NULL;
    int64_t deadline = shm_deadline(n > 2 ? a[2] : NULL);
    if (deadline < 0)
        return NULL;
    int auto_reset = n > 3 ? PyObject_IsTrue(a[3]) : 0;
    if (auto_reset < 0)
        return NULL;
    shm_pin(a[0]);
    int r = event_wait(w, deadline, auto_reset);
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
    uint32_t old = __atomic_fetch_or(w, 1u, __ATOMIC_SEQ_CST);
    if ((old >> 1) != 0)
        shm_futex_wake(w, auto_reset ? 1 : INT_MAX);
    Py_RETURN_NONE;
}

static PyObject *
py_event_clear(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    uint32_t *w;
    if (parse(a, n, 2, 2, "event_clear(mapping, offset)", &w, 1) < 0)
        return NULL;
    __atomic_fetch_and(w, ~1u, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

PyMethodDef shm_event_methods[] = {
    {"event_wait", (PyCFunction)(void (*)(void))py_event_wait, METH_FASTCALL,
     "event_wait(mapping, offset, timeout=None, auto_reset=False) -> bool\n\n"
     "Wait for the event's flag (consuming it when auto_reset); False on timeout."},
    {"event_set", (PyCFunction)(void (*)(void))py_event_set, METH_FASTCALL,
     "event_set(mapping, offset, auto_reset=False)"},
    {"event_clear", (PyCFunction)(void (*)(void))py_event_clear, METH_FASTCALL,
     "event_clear(mapping, offset)"},
    {NULL}
};
