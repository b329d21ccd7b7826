/* fork.c - calls that a Python signal handler cannot stop halfway: a forked
 * child's after-fork work, and a handle's close from its __del__.
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
 *   close_at_del                       a handle's __del__: close(), called
 *                                      again while a Ctrl-C stops it
 *   pop_and_call(d, key)               d.pop(key)() if there is one: a hook
 *                                      taken and called with no point between
 *
 * CPython drops an exception raised in __del__ too, and nothing would
 * finish a close that a Ctrl-C stopped there: the handle's "attached" name
 * would stay while the process lives.  A __del__ written in Python has a
 * point where the interpreter checks for signals before any try of its own
 * can catch them (as the function starts), and a retry loop has another
 * (its jump back); this one is a method descriptor of C, so nothing but
 * close() itself runs Python, and it is called again after each interrupt.
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

/* close() again each time a KeyboardInterrupt stops it, at most 100 calls;
 * another exception, or the 100th interrupt, is the result. */
static PyObject *
close_through_interrupts(PyObject *close)
{
    for (int tries = 1;; tries++) {
        PyObject *result = PyObject_CallNoArgs(close);
        if (result != NULL || tries == 100 || !PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
            return result;
        PyErr_Clear();
    }
}

/* A handle's __del__: its close() through interrupts; a close that fails
 * otherwise is dropped, as a garbage-collected handle has nobody to tell. */
static PyObject *
close_at_del(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *close = PyObject_GetAttrString(self, "close");
    PyObject *result = close == NULL ? NULL : close_through_interrupts(close);
    Py_XDECREF(close);
    if (result == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return result;
}

static PyMethodDef close_at_del_def = {
    "__del__", close_at_del, METH_NOARGS,
    "__del__($self, /)\n--\n\nclose(), called again while a Ctrl-C stops it."};

/* _core.close_at_del: a method descriptor (C from the first step, so no
 * bytecode runs in it for a signal to stop) for a class's __del__. */
int
shm_init_fork(PyObject *module)
{
    PyObject *descr = PyDescr_NewMethod(&PyBaseObject_Type, &close_at_del_def);
    if (descr == NULL || PyModule_AddObject(module, "close_at_del", descr) < 0) {
        Py_XDECREF(descr);
        return -1;
    }
    return 0;
}

/* The clean-up hook of a removed object (on_destroy) runs once: taken from
 * the handle's __dict__ and called in one step, so that no Ctrl-C can fall
 * between taking it and calling it, and lose it. */
static PyObject *
py_pop_and_call(PyObject *mod, PyObject *args)
{
    PyObject *dict, *key, *hook;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &dict, &key))
        return NULL;
    if (!PyUnicode_CheckExact(key)) { /* (a str: no Python code runs in the lookup) */
        PyErr_SetString(PyExc_TypeError, "pop_and_call: the key must be a str");
        return NULL;
    }
    hook = PyDict_GetItemWithError(dict, key);
    if (hook == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    Py_INCREF(hook);
    if (PyDict_DelItem(dict, key) < 0) {
        Py_DECREF(hook);
        return NULL;
    }
    if (hook == Py_None) {
        Py_DECREF(hook);
        Py_RETURN_NONE;
    }
    PyObject *result = PyObject_CallNoArgs(hook);
    Py_DECREF(hook);
    return result;
}

PyMethodDef shm_fork_methods[] = {
    {"pop_and_call", py_pop_and_call, METH_VARARGS,
     "pop_and_call($module, d, key, /)\n--\n\n"
     "pop_and_call(d, key)\n\nTake d[key] out of the dict and call it (nothing "
     "if missing or None), with no point between for a signal to stop."},

    {"signals_held", py_signals_held, METH_O,
     "signals_held($module, func, /)\n--\n\n"
     "signals_held(func) -> callable\n\nA callable (C, so no bytecode runs before "
     "the block) that calls func() with every asynchronous signal blocked and then "
     "restores the mask; for os.register_at_fork(after_in_child=...)."},
    {NULL}
};
