/* fork.c - a forked child's after-fork work, safe from signal handlers.
 *
 * In a child, shmkit's after-fork hook gives every handle an open file and
 * attach slot of its own (segment.py), and the other modules forget what
 * belonged to the parent.  A Python signal handler (Ctrl-C) raising in the
 * middle would stop that work halfway, and CPython drops an exception raised
 * in a fork hook: the child would go on with handles that pass for its
 * parent's.  So the hook CPython calls is C: it blocks every asynchronous
 * signal, calls the Python function, and restores the mask.  Signals that
 * came meanwhile are delivered then, and Python raises them at the next
 * bytecode: the child's own code, where os.fork() returns (or a fork hook
 * registered after this one, as it would without it).  One callable, made
 * and registered in one statement: an interrupted import cannot leave a
 * hold registered without the release that ends it.
 *
 *   signals_held(func) -> callable   func(), with the signals held back
 *
 * The faults a bad access raises synchronously (SIGBUS, SIGSEGV, SIGILL,
 * SIGFPE, SIGTRAP) stay deliverable: blocked, they would kill the process.
 */
#include "shmkit.h"
#include <signal.h>

static PyObject *
call_held(PyObject *func, PyObject *Py_UNUSED(ignored))
{
    sigset_t async, saved;
    sigfillset(&async);
    sigdelset(&async, SIGBUS);
    sigdelset(&async, SIGSEGV);
    sigdelset(&async, SIGILL);
    sigdelset(&async, SIGFPE);
    sigdelset(&async, SIGTRAP);
    int blocked = pthread_sigmask(SIG_BLOCK, &async, &saved) == 0;
    /* A signal that came after CPython cleared the child's pending ones and
     * before the block has tripped a flag that func's first bytecode would
     * act on: run its handler here instead.  A KeyboardInterrupt is given
     * back once func has run; another exception is dropped, as CPython drops
     * any raised in a fork hook. */
    int interrupted = 0;
    if (PyErr_CheckSignals() < 0) {
        interrupted = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        PyErr_Clear();
    }
    PyObject *result = PyObject_CallNoArgs(func);
    if (blocked)
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (interrupted)
        PyErr_SetInterruptEx(SIGINT);
    return result;
}

static PyMethodDef call_held_def = {
    "call_with_signals_held", call_held, METH_NOARGS,
    "Call the wrapped function with every asynchronous signal blocked."};

static PyObject *
py_signals_held(PyObject *mod, PyObject *func)
{
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "signals_held needs a callable");
        return NULL;
    }
    return PyCFunction_New(&call_held_def, func);
}

PyMethodDef shm_fork_methods[] = {
    {"signals_held", py_signals_held, METH_O,
     "signals_held($module, func, /)\n--\n\n"
     "signals_held(func) -> callable\n\nA callable (C, so no bytecode runs before "
     "the block) that calls func() with every asynchronous signal blocked and then "
     "restores the mask; for os.register_at_fork(after_in_child=...)."},
    {NULL}
};
