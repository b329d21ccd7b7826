/* gate.c - modules imported on first use, never across a fork.
 *
 * shmkit imports numpy, and a few modules only some calls need, the first
 * time they are needed (_lazy.py).  A thread inside such an import holds the
 * import locks of the modules it is loading; a child forked by another
 * thread at that moment inherits them, held by a thread it does not have,
 * and its first use of the module waits for them forever.  So every such
 * import passes a gate that a fork also passes: a fork waits for an import
 * under way (at most GATE_FORK_WAIT_NS, in case a fork hook registered
 * later holds a lock the import needs), and no child starts inside one.
 *
 * Every step is C.  Python fork hooks can be interrupted by a signal
 * handler (Ctrl-C) between two bytecodes, and CPython then forks anyway and
 * drops the exception: the gate was skipped, or left held for good.  Here a
 * signal that arrives while a fork waits stays pending, and reaches the
 * program when fork() has returned; an import's wait for the gate runs the
 * handlers between slices, with nothing held.
 *
 *   import_gated(name) -> module     import name through the gate; the
 *                                    first call registers the fork hooks
 *                                    (late, so that they run before those
 *                                    of modules imported earlier: logging's
 *                                    takes a lock an import may need)
 *   gate_before_fork(), gate_after_fork_in_parent()
 *
 * The child's gate is reset by a pthread_atfork handler, not a Python hook:
 * it then runs for every fork, also one made by C code that bypasses
 * os.fork() and its hooks (the gate copied held by a thread the child has
 * not would stop its first lazy import for good).
 */
#include "shmkit.h"
#include <errno.h>
#include <pthread.h>
#include <time.h>

#define GATE_FORK_WAIT_NS 5000000000LL
#define GATE_SLICE_NS 50000000LL

/* Recursive: an import through the gate may import another through it,
 * and a thread may fork from inside one. */
static pthread_mutex_t gate = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static int hooked;             /* the fork hooks are registered */
static __thread int fork_held; /* times this thread's before-fork hooks took the gate */

/* In the child, whose only thread is the one that forked: a gate it held
 * (for the fork, or for an import it forked inside) starts afresh, free. */
static void
gate_reset_in_child(void)
{
    static const pthread_mutex_t fresh = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
    fork_held = 0;
    memcpy(&gate, &fresh, sizeof gate);
}

/* Take the gate within ns, with the GIL released: 1 taken, 0 not.  On the
 * monotonic clock: a wall clock stepped back (NTP, a user) must not stretch
 * a fork's wait, or the time between an import's signal checks. */
static int
gate_take(int64_t ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t t = (int64_t)ts.tv_nsec + ns;
    ts.tv_sec += (time_t)(t / 1000000000LL);
    ts.tv_nsec = (long)(t % 1000000000LL);
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = pthread_mutex_clocklock(&gate, CLOCK_MONOTONIC, &ts);
    Py_END_ALLOW_THREADS
    return r == 0;
}

/* os.register_at_fork(before=..., after_in_parent=...) with this module's
 * own hooks (C functions: no bytecode runs in them), and the child's reset. */
static int
register_hooks(PyObject *mod)
{
    static int reset_registered;
    if (!reset_registered) {
        int e = pthread_atfork(NULL, NULL, gate_reset_in_child);
        if (e != 0) {
            errno = e;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        reset_registered = 1;
    }
    PyObject *os = PyImport_ImportModule("os"), *reg = NULL, *args = NULL, *kw = NULL,
             *r = NULL;
    if (os == NULL || (reg = PyObject_GetAttrString(os, "register_at_fork")) == NULL ||
        (args = PyTuple_New(0)) == NULL || (kw = PyDict_New()) == NULL)
        goto done;
    static const char *hooks[][2] = {{"before", "gate_before_fork"},
                                     {"after_in_parent", "gate_after_fork_in_parent"}};
    for (size_t i = 0; i < 2; i++) {
        PyObject *f = PyObject_GetAttrString(mod, hooks[i][1]);
        if (f == NULL || PyDict_SetItemString(kw, hooks[i][0], f) < 0) {
            Py_XDECREF(f);
            goto done;
        }
        Py_DECREF(f);
    }
    r = PyObject_Call(reg, args, kw);
done:
    Py_XDECREF(os);
    Py_XDECREF(reg);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
py_import_gated(PyObject *mod, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "import_gated(name): name must be a str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    /* Before the gate is first taken: a fork that happened between taking
     * it and registering would copy it held into a child that never
     * opens it.  (Registered twice by a race, the hooks still pair up.) */
    if (!hooked) {
        if (register_hooks(mod) < 0)
            return NULL;
        hooked = 1;
    }
    while (!gate_take(GATE_SLICE_NS))
        if (PyErr_CheckSignals() < 0)
            return NULL; /* Ctrl-C while waiting: nothing is held */
    PyObject *m = PyImport_Import(name);
    pthread_mutex_unlock(&gate);
    return m;
}

static PyObject *
py_gate_before_fork(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    /* No signal checks while waiting: see the top of this file. */
    fork_held += gate_take(GATE_FORK_WAIT_NS);
    Py_RETURN_NONE;
}

static PyObject *
py_gate_after_fork_in_parent(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    if (fork_held > 0) {
        fork_held--;
        pthread_mutex_unlock(&gate);
    }
    Py_RETURN_NONE;
}

PyMethodDef shm_gate_methods[] = {
    {"import_gated", py_import_gated, METH_O,
     "import_gated($module, name, /)\n--\n\n"
     "Import the module name so that no fork happens while it is imported\n"
     "(a fork waits for it, up to 5 s).  shmkit._lazy.load() calls it once per name."},
    {"gate_before_fork", py_gate_before_fork, METH_NOARGS,
     "gate_before_fork($module, /)\n--\n\nA fork hook: wait for an import under way."},
    {"gate_after_fork_in_parent", py_gate_after_fork_in_parent, METH_NOARGS,
     "gate_after_fork_in_parent($module, /)\n--\n\nA fork hook: open the gate again."},
    {NULL, NULL, 0, NULL},
};
