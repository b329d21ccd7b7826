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
 *   close_on_exit                      a handle's __exit__: self.close()
 *   close_to_the_end                   a close(): self._close(), called again
 *                                      while a Ctrl-C stops it, then the
 *                                      Ctrl-C raised
 *   close_at_del                       a handle's __del__: close(), called
 *                                      again while an exception (a Ctrl-C)
 *                                      stops it, and the Ctrl-C given back
 *                                      once it is done (to Python's own
 *                                      handler)
 *   swap_if(box, expected, new)        box[0] replaced if it is `expected`
 *   pop_and_call(d, key)               d.pop(key)() if there is one: a hook
 *                                      taken and called with no point between
 *   forgetter(registry) -> callable    a weak reference's callback that
 *                                      removes registry[id(ref)]
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

/* Whether SIGINT's handler is still Python's own, default_int_handler,
 * which does nothing but raise KeyboardInterrupt: only then can the
 * interrupt be given back by tripping SIGINT again. */
static int
sigint_is_python_default(void)
{
    PyObject *signal = PyImport_ImportModule("signal");
    if (signal == NULL)
        return 0;
    PyObject *now = PyObject_CallMethod(signal, "getsignal", "i", SIGINT);
    PyObject *dflt = PyObject_GetAttrString(signal, "default_int_handler");
    int same = now != NULL && now == dflt;
    Py_XDECREF(now);
    Py_XDECREF(dflt);
    Py_DECREF(signal);
    return same;
}

/* A KeyboardInterrupt that a __del__ caught while this thread was inside
 * another one's close (a handle dropped by an on_destroy hook): the
 * outermost gives it back once its own close is done, so that it stops
 * neither that close nor the hook.  The pid keeps a child forked by the
 * hook from giving back its parent's.  (Per thread, under the GIL.) */
static __thread int del_depth;
static __thread pid_t del_interrupted;

/* A handle's __del__: close() again each time an exception stops it (a
 * signal handler's: KeyboardInterrupt, SystemExit from sys.exit(), an
 * alarm's TimeoutError; close() can always be called again), at most 100
 * calls, so that the name and slot do not stay while the process lives.
 * An Exception a close still raises is dropped, as a garbage-collected
 * handle has nobody to tell; another one (SystemExit), CPython reports.
 *
 * CPython drops what __del__ raises, so a Ctrl-C is given back by tripping
 * SIGINT again (PyErr_SetInterruptEx): the handler then raises at the
 * caller's next check, as for any Ctrl-C, and shmkit's waits and os.fork()
 * (which clears it in the child) see it as theirs.  That runs the handler a
 * second time, so it is done only when the handler is Python's default one
 * and the exception exactly KeyboardInterrupt, which the default raises; a
 * handler of the program's own already ran and chose what the Ctrl-C does,
 * and its exception stays dropped.  (Raising it as an asynchronous
 * exception instead escapes the checks that blocking calls make, and a
 * forked child inherits it.) */
static PyObject *
close_at_del(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *close = PyObject_GetAttrString(self, "close");
    PyObject *result = NULL;
    PyObject *et = NULL, *ev = NULL, *tb = NULL; /* the first that is no Exception */
    del_depth++;
    for (int tries = 1; close != NULL; tries++) {
        result = PyObject_CallNoArgs(close);
        if (result != NULL || tries == 100)
            break;
        if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            if (PyErr_Occurred() == PyExc_KeyboardInterrupt) /* what the default raises */
                del_interrupted = getpid();
            PyErr_Clear();
        } else if (et == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Fetch(&et, &ev, &tb);
        } else {
            PyErr_Clear();
        }
    }
    del_depth--;
    Py_XDECREF(close);
    if (result == NULL && PyErr_ExceptionMatches(PyExc_Exception))
        PyErr_Clear();
    if (et != NULL) { /* reported as CPython would have, the close done first */
        PyObject *t2, *v2, *tb2;
        PyErr_Fetch(&t2, &v2, &tb2);
        PyErr_Restore(et, ev, tb);
        PyErr_WriteUnraisable(self);
        PyErr_Restore(t2, v2, tb2);
    }
    if (del_depth == 0 && del_interrupted != 0) {
        int mine = del_interrupted == getpid();
        del_interrupted = 0;
        if (mine) {
            PyObject *t2, *v2, *tb2;
            PyErr_Fetch(&t2, &v2, &tb2); /* (the lookup must not meet a pending error) */
            if (sigint_is_python_default())
                PyErr_SetInterruptEx(SIGINT);
            PyErr_Clear();
            PyErr_Restore(t2, v2, tb2);
        }
    }
    if (result == NULL && !PyErr_Occurred())
        result = Py_NewRef(Py_None);
    return result;
}

static PyMethodDef close_at_del_def = {
    "__del__", close_at_del, METH_NOARGS,
    "__del__($self, /)\n--\n\nclose(), called again while a Ctrl-C stops it."};

/* A close that must end whole, for a class's close(): self._close() again
 * each time a KeyboardInterrupt stops it (at most 100 calls; _close can
 * always be called again), then the first of them raised, as the Ctrl-C
 * it was.  Any other exception ends it as it is. */
static PyObject *
close_to_the_end(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *close = PyObject_GetAttrString(self, "_close");
    if (close == NULL)
        return NULL;
    PyObject *result = NULL, *et = NULL, *ev = NULL, *tb = NULL;
    for (int tries = 1;; tries++) {
        result = PyObject_CallNoArgs(close);
        if (result != NULL || tries == 100 || !PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
            break;
        if (et == NULL)
            PyErr_Fetch(&et, &ev, &tb);
        else
            PyErr_Clear();
    }
    Py_DECREF(close);
    if (et != NULL) {
        if (result == NULL) { /* the interrupt first; what ended it is dropped */
            PyErr_Clear();
        } else {
            Py_CLEAR(result);
        }
        PyErr_Restore(et, ev, tb);
    }
    return result;
}

/* A handle's __exit__: self.close(), with no bytecode of its own before
 * the call for a Ctrl-C to stop (one landing there left a with-block's
 * handle open, to be closed only by the collector). */
static PyObject *
close_on_exit(PyObject *self, PyObject *Py_UNUSED(args))
{
    PyObject *r = PyObject_CallMethod(self, "close", NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef close_on_exit_def = {
    "__exit__", close_on_exit, METH_VARARGS,
    "__exit__($self, /, *exc)\n--\n\nself.close()."};

static PyMethodDef close_to_the_end_def = {
    "close", close_to_the_end, METH_NOARGS,
    "close($self, /)\n--\n\nself._close(), called again while a Ctrl-C stops it; the "
    "Ctrl-C raised once it is done."};

/* _core.close_at_del and _core.close_to_the_end: method descriptors (C
 * from the first step, so no bytecode runs in them for a signal to stop)
 * for a class's __del__ and close. */
int
shm_init_fork(PyObject *module)
{
    PyObject *descr = PyDescr_NewMethod(&PyBaseObject_Type, &close_at_del_def);
    if (descr == NULL || PyModule_AddObject(module, "close_at_del", descr) < 0) {
        Py_XDECREF(descr);
        return -1;
    }
    descr = PyDescr_NewMethod(&PyBaseObject_Type, &close_to_the_end_def);
    if (descr == NULL || PyModule_AddObject(module, "close_to_the_end", descr) < 0) {
        Py_XDECREF(descr);
        return -1;
    }
    descr = PyDescr_NewMethod(&PyBaseObject_Type, &close_on_exit_def);
    if (descr == NULL || PyModule_AddObject(module, "close_on_exit", descr) < 0) {
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

/* A weak reference's callback that removes the reference from a registry
 * keyed by its id: C, so that a Ctrl-C cannot stop it before it starts (as
 * it would a function of Python, whose exception CPython only reports) and
 * leave the entry behind. */
static PyObject *
forget_ref(PyObject *registry, PyObject *ref)
{
    PyObject *key = PyLong_FromVoidPtr(ref);
    if (key == NULL)
        return NULL;
    int found = PyDict_Contains(registry, key);
    int failed = found < 0 || (found && PyDict_DelItem(registry, key) < 0);
    Py_DECREF(key);
    return failed ? NULL : Py_NewRef(Py_None);
}

static PyMethodDef forget_ref_def = {
    "forget_ref", forget_ref, METH_O,
    "Remove registry[id(ref)], if there is one."};

static PyObject *
py_forgetter(PyObject *mod, PyObject *registry)
{
    if (!PyDict_CheckExact(registry)) {
        PyErr_SetString(PyExc_TypeError, "forgetter needs a dict");
        return NULL;
    }
    return PyCFunction_New(&forget_ref_def, registry);
}

/* swap_if(box, expected, new) -> bool: box[0] = new if box[0] is expected,
 * in one step (a list of one, as a service worker's request slot: its take
 * is handed out by one thread while another thread's close may give it
 * back, and exactly one of them must get it; a lock would stay held after
 * a Ctrl-C landing just as it was taken). */
static PyObject *
py_swap_if(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_CheckExact(args[0]) || PyList_GET_SIZE(args[0]) != 1) {
        PyErr_SetString(PyExc_TypeError, "swap_if(box, expected, new) needs a list of one");
        return NULL;
    }
    PyObject *was = PyList_GET_ITEM(args[0], 0);
    if (was != args[1])
        Py_RETURN_FALSE;
    PyList_SET_ITEM(args[0], 0, Py_NewRef(args[2]));
    Py_DECREF(was);
    Py_RETURN_TRUE;
}

PyMethodDef shm_fork_methods[] = {
    {"swap_if", (PyCFunction)(void (*)(void))py_swap_if, METH_FASTCALL,
     "swap_if($module, box, expected, new, /)\n--\n\n"
     "box[0] = new if box[0] is expected (a list of one), in one step; whether it was."},
    {"pop_and_call", py_pop_and_call, METH_VARARGS,
     "pop_and_call($module, d, key, /)\n--\n\n"
     "pop_and_call(d, key)\n\nTake d[key] out of the dict and call it (nothing "
     "if missing or None), with no point between for a signal to stop."},

    {"forgetter", py_forgetter, METH_O,
     "forgetter($module, registry, /)\n--\n\n"
     "forgetter(registry) -> callable\n\nA callable (C, so that no signal stops it "
     "halfway) that removes registry[id(ref)] for the ref it is given: a weak "
     "reference's callback for a registry of weak references keyed by their id."},

    {"signals_held", py_signals_held, METH_O,
     "signals_held($module, func, /)\n--\n\n"
     "signals_held(func) -> callable\n\nA callable (C, so no bytecode runs before "
     "the block) that calls func() with every asynchronous signal blocked and then "
     "restores the mask; for os.register_at_fork(after_in_child=...)."},
    {NULL}
};
