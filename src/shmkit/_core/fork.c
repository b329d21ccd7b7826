/* fork.c - a forked child's after-fork work, safe from signal handlers.
 *
 * In a child, shmkit's after-fork hook gives every handle an open file and
 * attach slot of its own (segment.py), and the other modules forget what
 * belonged to the parent.  A Python signal handler (Ctrl-C) raising in the
 * middle would stop that work halfway, and CPython drops an exception raised
 * in a fork hook: the child would go on with handles that pass for its
 * parent's.  So a C hook, registered just before that Python hook (after-fork
 * hooks run in registration order, with no bytecode between two of them),
 * blocks every asynchronous signal, and the Python hook's last step lets them
 * through again: those that came meanwhile are delivered then, and raise in
 * the child's own code, after the hooks.
 *
 *   fork_hold_signals()     block them; one a handler was about to get
 *                           (it came before the block) is held back too
 *   fork_release_signals()  the mask as it was; a held Ctrl-C is raised
 *
 * The faults a bad access raises synchronously (SIGBUS, SIGSEGV, SIGILL,
 * SIGFPE, SIGTRAP) stay deliverable: blocked, they would kill the process.
 */
#include "shmkit.h"
#include <signal.h>

/* The child's only thread runs both hooks: no other thread reads these. */
static sigset_t saved_mask;
static int holding;
static int interrupt_held;

static PyObject *
py_fork_hold_signals(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    sigset_t all;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGTRAP);
    if (!holding && pthread_sigmask(SIG_BLOCK, &all, &saved_mask) == 0)
        holding = 1;
    /* A signal that came after CPython cleared the child's pending ones and
     * before the block has tripped a flag the next bytecode would act on:
     * run its handler here instead.  A KeyboardInterrupt is given back on
     * release; another exception is dropped, as CPython drops any raised in
     * a fork hook. */
    if (PyErr_CheckSignals() < 0) {
        interrupt_held = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *
py_fork_release_signals(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    if (holding) {
        holding = 0;
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
    }
    if (interrupt_held) {
        interrupt_held = 0;
        PyErr_SetInterruptEx(SIGINT);
    }
    Py_RETURN_NONE;
}

PyMethodDef shm_fork_methods[] = {
    {"fork_hold_signals", py_fork_hold_signals, METH_NOARGS,
     "fork_hold_signals($module, /)\n--\n\n"
     "In a forked child, before shmkit's after-fork work: block asynchronous "
     "signals (fork_release_signals lets them through)."},
    {"fork_release_signals", py_fork_release_signals, METH_NOARGS,
     "fork_release_signals($module, /)\n--\n\n"
     "The signal mask as before fork_hold_signals; a Ctrl-C it held back is raised."},
    {NULL}
};
