/* futex.c - sleeping on a shared u32 word, with timeouts and Ctrl-C.
 *
 * Shared (not FUTEX_PRIVATE) futexes: the kernel keys them on the page, so
 * processes that map the segment at different addresses meet on one word.
 * Sleeps are cut into slices so that a caller can run signal handlers and
 * liveness checks between them; a signal delivered to the sleeping thread
 * ends the sleep at once with EINTR.
 *
 *   futex_wait(mapping, offset, expected, timeout=None) -> bool
 *   futex_wake(mapping, offset, n=1) -> int
 *   seconds(timeout, what='timeout') -> float   the timeout rule, for Python's waits
 *   lock_timeout(timeout) -> float | None        the same for a lock (-1: no end)
 *   shown_seconds(timeout) -> str                 a timeout as messages show it
 *   nowait_timeout_check(timeout, call, flag) -> None
 */
#include "sync.h"
#include <stdarg.h>
#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <sys/syscall.h>
#include <string.h>
#include <time.h>
#include <unistd.h>


int64_t
shm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Is o a bool: 1, 0, or -1 with the error of code it ran (an ndarray
 * subclass's dtype).  numpy's bool is no int subclass, so PyBool_Check
 * misses it; its type's name ("numpy.bool", "numpy.bool_" before numpy 2)
 * finds it, and an array, of any ndarray class, whose dtype is of bools
 * (np.array(True) converts to a float too) is found through numpy's own
 * ndarray when numpy is imported: without it, o can be no array. */
static int
is_bool(PyObject *o)
{
    if (PyFloat_Check(o)) /* numpy's float64 too: no array */
        return 0;
    if (PyLong_Check(o))
        return PyBool_Check(o);
    const char *name = Py_TYPE(o)->tp_name;
    if (strcmp(name, "numpy.bool") == 0 || strcmp(name, "numpy.bool_") == 0)
        return 1;
    static PyObject *numpy_name; /* (the GIL is held) */
    if (numpy_name == NULL && (numpy_name = PyUnicode_InternFromString("numpy")) == NULL)
        return -1;
    PyObject *np = PyImport_GetModule(numpy_name); /* no import */
    if (np == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *nd = PyObject_GetAttrString(np, "ndarray");
    Py_DECREF(np);
    if (nd == NULL) { /* numpy blocked (None in sys.modules) or a stub: no arrays */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    int array = PyType_Check(nd) && PyObject_TypeCheck(o, (PyTypeObject *)nd);
    Py_DECREF(nd);
    if (!array)
        return 0;
    PyObject *dtype = PyObject_GetAttrString(o, "dtype");
    PyObject *kind = dtype != NULL ? PyObject_GetAttrString(dtype, "kind") : NULL;
    Py_XDECREF(dtype);
    if (kind == NULL)
        return -1;
    int b = PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "b") == 0;
    Py_DECREF(kind);
    return b;
}

/* A timeout as a double: 0, or 1 when it is no number (a bool, or what
 * does not convert to a float; nothing set), or -1 with the number's own
 * error (its __float__ raising, a Ctrl-C in it). */
static int
float_of(PyObject *timeout, double *t)
{
    int b = is_bool(timeout);
    if (b != 0)
        return b;
    *t = PyFloat_AsDouble(timeout);
    if (*t != -1.0 || !PyErr_Occurred())
        return 0;
    if (PyLong_Check(timeout) && Py_TYPE(timeout)->tp_as_number->nb_float ==
                                     PyLong_Type.tp_as_number->nb_float &&
        PyErr_ExceptionMatches(PyExc_OverflowError)) {
        /* an int beyond any float (int's own conversion said so): as far as
         * infinity, on its side of 0 */
        PyErr_Clear();
        *t = _PyLong_Sign(timeout) < 0 ? -HUGE_VAL : HUGE_VAL;
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_TypeError))
        return -1;
    PyErr_Clear();
    return 1;
}

/* A timeout float_of read (r, t) as messages show it: a new str, or NULL.
 * One whose conversion fails now (it worked when the call began) is shown
 * by its type: the message is the call's outcome, not this error's; an
 * interrupt goes through. */
static PyObject *
shown_of(PyObject *timeout, int r, double t)
{
    if (r < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return PyUnicode_FromFormat("(a %s)", Py_TYPE(timeout)->tp_name);
    }
    if (r < 0)
        return NULL;
    if (r > 0)
        return PyObject_Repr(timeout);
    char *s = PyOS_double_to_string(t, 'r', 0, 0, NULL);
    if (s == NULL)
        return NULL;
    PyObject *out = PyUnicode_FromString(s);
    PyMem_Free(s);
    return out;
}

PyObject *
shm_timeout_shown(PyObject *timeout)
{
    double t = 0;
    int r = float_of(timeout, &t);
    return shown_of(timeout, r, t);
}

/* The mark a Timeout of shmkit's own deadline carries (errors.py: the
 * class says False), so that the layers that turn it into another outcome
 * (Queue's Empty and Full, a worker's next wait slice, the end of an
 * iteration) let through a Timeout that a signal handler raised during
 * the wait, as they let through any other exception of the handler's.
 * (Only on the way out of a timed-out wait: the name is made each time.) */
#define DEADLINE_MARK "_deadline"

PyObject *
shm_deadline_passed(PyObject *type, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyErr_FormatV(type, fmt, va);
    va_end(va);
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && PyObject_SetAttrString(v, DEADLINE_MARK, Py_True) < 0) {
        Py_XDECREF(t);
        Py_XDECREF(v);
        Py_XDECREF(tb);
        return NULL; /* (the error making the mark failed with: memory) */
    }
    PyErr_Restore(t, v, tb);
    return NULL;
}

int
shm_deadline_error(PyObject *type)
{
    if (!PyErr_ExceptionMatches(type))
        return 0;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject *got = v != NULL ? PyObject_GetAttrString(v, DEADLINE_MARK) : NULL;
    int yes = got == Py_True;
    Py_XDECREF(got);
    PyErr_Restore(t, v, tb); /* (replaces any error of the look itself) */
    return yes;
}

/* A timeout's seconds, as every blocking call takes them (Python's waits
 * through seconds() below): whatever converts to a float, as for time.sleep,
 * but not a bool (get(True, True) is a slip, not one second) nor NaN. */
static int
timeout_seconds(PyObject *timeout, const char *what, double *t)
{
    int r = float_of(timeout, t);
    if (r > 0)
        PyErr_Format(PyExc_TypeError, "%s must be a number of seconds or None, not %s",
                     what, Py_TYPE(timeout)->tp_name);
    else if (r == 0 && *t != *t)
        PyErr_Format(PyExc_ValueError, "%s must be a number of seconds, not NaN", what);
    else
        return r;
    return -1;
}

int
shm_timeout_check(PyObject *timeout)
{
    double t;
    return timeout == NULL || timeout == Py_None ? 0 : timeout_seconds(timeout, "timeout", &t);
}

int
shm_nowait_timeout_check(PyObject *timeout, const char *call, const char *flag)
{
    double t;
    if (timeout == NULL || timeout == Py_None)
        return 0;
    int r = float_of(timeout, &t);
    if (r < 0)
        return -1;
    if (r == 0 && t == -1.0)
        return 0; /* threading's "no timeout" */
    PyObject *shown = shown_of(timeout, r, t);
    if (shown == NULL)
        return -1;
    PyErr_Format(PyExc_ValueError,
                 "%s was given timeout=%U with %s=False: a call that does not block "
                 "takes no timeout; pass %s=True to wait up to the timeout, or leave "
                 "the timeout out", call, shown, flag, flag);
    Py_DECREF(shown);
    return -1;
}

/* Seconds as nanoseconds: a negative timeout means "do not wait"; beyond
 * 10**9 s, -1 (for ever, and no overflow). */
static int64_t
ns_of(double t)
{
    if (t < 0)
        t = 0;
    return t <= 1e9 ? (int64_t)(t * 1e9) : -1;
}

/* The deadline of a timeout (None: for ever); for a lock (`lock`), -1 is
 * threading's "no timeout" too. */
static int64_t
deadline_of(PyObject *timeout, int lock)
{
    double t;
    if (timeout == NULL || timeout == Py_None)
        return SHM_FOREVER;
    if (timeout_seconds(timeout, "timeout", &t) < 0)
        return -1;
    int64_t ns = lock && t == -1.0 ? -1 : ns_of(t);
    return ns < 0 ? SHM_FOREVER : shm_now_ns() + ns;
}

int64_t
shm_deadline(PyObject *timeout)
{
    return deadline_of(timeout, 0);
}

int64_t
shm_lock_deadline(PyObject *timeout)
{
    return deadline_of(timeout, 1);
}

int
shm_timeout_ns(PyObject *timeout, const char *what, int64_t *ns)
{
    *ns = -1;
    if (timeout == NULL || timeout == Py_None)
        return 0;
    double t;
    if (timeout_seconds(timeout, what, &t) < 0)
        return -1;
    *ns = ns_of(t);
    return 0;
}

int
shm_futex_wait(uint32_t *word, uint32_t expected, int64_t deadline, int64_t slice_ns)
{
    int64_t now = shm_now_ns();
    if (now >= deadline)
        return ETIMEDOUT;
    int64_t wait = deadline - now;
    if (slice_ns > 0 && wait > slice_ns)
        wait = slice_ns;
    struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
    int forever = deadline == SHM_FOREVER && (slice_ns <= 0 || slice_ns == SHM_FOREVER);
    long r = syscall(SYS_futex, word, FUTEX_WAIT, expected, forever ? NULL : &ts, NULL, 0);
    if (r == 0)
        return 0;
    if (errno == EAGAIN)
        return 0; /* the value had already changed */
    return errno; /* ETIMEDOUT or EINTR */
}

int
shm_futex_wake(uint32_t *word, int n)
{
    long r = syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? 0 : (int)r;
}

/* The word differs from the value we wait out. */
struct change_ctx {
    uint32_t *word;
    uint32_t expected;
};

static int
changed(void *ctx, uint32_t *sleep_on)
{
    struct change_ctx *c = ctx;
    *sleep_on = c->expected;
    return __atomic_load_n(c->word, __ATOMIC_ACQUIRE) != c->expected;
}

int
shm_wait_change(MappingObject *m, uint32_t *word, uint32_t expected, int64_t deadline)
{
    struct change_ctx c = {word, expected};
    shm_wait w = {.m = m, .word = word, .ctx = &c, .ready = changed,
                  .spin_ns = SHM_WAIT_SPIN_NS, .what = "the segment"};
    return shm_wait_until(&w, deadline);
}

static PyObject *
py_futex_wait(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    long long off;
    if (shm_sync_args(args, nargs, 3, 4, "futex_wait(mapping, offset, expected, timeout=None)",
                      &off) < 0)
        return NULL;
    unsigned long expected = PyLong_AsUnsignedLongMask(args[2]);
    if (expected == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    int64_t deadline = shm_deadline(nargs == 4 ? args[3] : NULL);
    if (deadline < 0)
        return NULL;
    uint32_t *word = shm_addr(args[0], off, 4, 0);
    if (word == NULL)
        return NULL;
    shm_pin(args[0]);
    int r = shm_wait_change((MappingObject *)args[0], word, (uint32_t)expected, deadline);
    shm_unpin(args[0]);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *
py_futex_wake(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    long long off;
    if (shm_sync_args(args, nargs, 2, 3, "futex_wake(mapping, offset, n=1)", &off) < 0)
        return NULL;
    int n = 1;
    if (nargs == 3) {
        n = PyLong_AsLong(args[2]);
        if (n == -1 && PyErr_Occurred())
            return NULL;
    }
    uint32_t *word = shm_addr(args[0], off, 4, 0);
    if (word == NULL)
        return NULL;
    return PyLong_FromLong(shm_futex_wake(word, n));
}

static PyObject *
py_seconds(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    const char *what = "timeout";
    if (nargs < 1 || nargs > 2 || (nargs == 2 && !PyUnicode_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "seconds(timeout, what='timeout') takes a timeout "
                        "and the str naming it");
        return NULL;
    }
    if (nargs == 2 && (what = PyUnicode_AsUTF8(args[1])) == NULL)
        return NULL;
    double t;
    if (timeout_seconds(args[0], what, &t) < 0)
        return NULL;
    return PyFloat_FromDouble(t > 0 ? t : 0.0);
}

static PyObject *
py_lock_timeout(PyObject *Py_UNUSED(mod), PyObject *timeout)
{
    double t;
    if (timeout == Py_None)
        Py_RETURN_NONE;
    if (timeout_seconds(timeout, "timeout", &t) < 0)
        return NULL;
    if (t == -1.0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(t > 0 ? t : 0.0);
}

static PyObject *
py_nowait_timeout_check(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "nowait_timeout_check(timeout, call, flag) takes "
                        "a timeout and two str");
        return NULL;
    }
    const char *call = PyUnicode_AsUTF8(args[1]), *flag = PyUnicode_AsUTF8(args[2]);
    if (call == NULL || flag == NULL || shm_nowait_timeout_check(args[0], call, flag) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
py_shown_seconds(PyObject *Py_UNUSED(mod), PyObject *timeout)
{
    return shm_timeout_shown(timeout);
}

PyMethodDef shm_futex_methods[] = {
    {"shown_seconds", (PyCFunction)py_shown_seconds, METH_O,
     "shown_seconds($module, timeout, /)\n--\n\n"
     "shown_seconds(timeout) -> str\n\n"
     "A timeout as an error message shows it: its seconds as a float's repr\n"
     "(an int beyond any float as inf), or its repr when it is no number."},
    {"seconds", (PyCFunction)(void (*)(void))py_seconds, METH_FASTCALL,
     "seconds($module, timeout, what='timeout', /)\n--\n\n"
     "seconds(timeout, what='timeout') -> float\n\n"
     "A timeout's seconds by the rule of every blocking call: what converts to\n"
     "a float, not a bool nor NaN; a negative one is 0.0."},
    {"lock_timeout", (PyCFunction)py_lock_timeout, METH_O,
     "lock_timeout($module, timeout, /)\n--\n\n"
     "lock_timeout(timeout) -> float | None\n\n"
     "A lock's timeout by the rule of its acquire: as seconds(), but None for\n"
     "-1, threading's \"no timeout\"."},
    {"nowait_timeout_check", (PyCFunction)(void (*)(void))py_nowait_timeout_check,
     METH_FASTCALL,
     "nowait_timeout_check($module, timeout, call, flag, /)\n--\n\n"
     "nowait_timeout_check(timeout, call, flag) -> None\n\n"
     "Refuse (ValueError) a timeout other than None or -1 given to a call whose\n"
     "flag (block, blocking) is false."},
    {"futex_wait", (PyCFunction)(void (*)(void))py_futex_wait, METH_FASTCALL,
     "futex_wait($module, mapping, offset, expected, timeout=None, /)\n--\n\n"
     "futex_wait(mapping, offset, expected, timeout=None) -> bool\n\n"
     "Wait until the u32 at offset differs from expected; False on timeout.\n"
     "Spins briefly, then sleeps with the GIL released; Ctrl-C interrupts."},
    {"futex_wake", (PyCFunction)(void (*)(void))py_futex_wake, METH_FASTCALL,
     "futex_wake($module, mapping, offset, n=1, /)\n--\n\n"
     "futex_wake(mapping, offset, n=1) -> int\n\nWake up to n sleepers on the word."},
    {NULL}
};
