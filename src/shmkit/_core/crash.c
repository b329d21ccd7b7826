/* crash.c - deterministic crash points for the tests.
 *
 * A crash point is a named step boundary of a shared-memory protocol
 * (journal.h).  Disarmed, each costs one load of a global.  Armed with
 *
 *     _core.fault(n, prefix="")   -> points left of the previous countdown
 *
 * the n-th point reached from now whose name starts with prefix SIGKILLs
 * the process, so a test can kill a forked child at every boundary of an
 * operation in turn: k = 1, 2, ... until the operation completes.
 * _core.fault(0) disarms and says how many points were left.  With
 * stop=True the point SIGSTOPs the process instead, which carries on from
 * there once continued: a peer frozen in the middle of an operation.  With
 * signal=N it sends signal N to its own thread and carries on: a Ctrl-C
 * that comes at that step, whose Python handler runs at the next check.
 */
#include "journal.h"
#include <signal.h>
#include <string.h>
#include <unistd.h>

long shm_fault_countdown;
static char fault_prefix[64];
static int fault_stop;
static int fault_signal;
static const char *last_point = "";

void
shm_crash_hit(const char *name)
{
    if (shm_fault_countdown <= 0)
        return;
    if (fault_prefix[0] && strncmp(name, fault_prefix, strlen(fault_prefix)) != 0)
        return;
    /* Every structure takes locks, so the lock's own points count only when
     * a test asks for them by name ("lock."): a structure's test that counts
     * all of its steps is not multiplied by them. */
    if (strncmp(name, "lock.", 5) == 0 && strncmp(fault_prefix, "lock.", 5) != 0)
        return;
    last_point = name;
    if (--shm_fault_countdown == 0) {
        if (fault_stop || fault_signal) {
            raise(fault_stop ? SIGSTOP : fault_signal); /* this thread, so that it comes here */
            return;
        }
        kill(getpid(), SIGKILL);
        pause();
    }
}

static PyObject *
py_fault(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", "prefix", "stop", "signal", NULL};
    long n;
    const char *prefix = "";
    int stop = 0, sig = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "l|spi:fault", kwlist, &n, &prefix, &stop,
                                     &sig))
        return NULL;
    if (sig < 0 || sig >= NSIG || sig == SIGKILL || sig == SIGSTOP || (stop && sig)) {
        PyErr_SetString(PyExc_ValueError, "fault(signal=N): N must be a catchable signal, "
                        "and not given with stop=True");
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "fault(n): n must be >= 0");
        return NULL;
    }
    if (strlen(prefix) >= sizeof fault_prefix) {
        PyErr_SetString(PyExc_ValueError, "fault(): prefix too long");
        return NULL;
    }
    long left = shm_fault_countdown;
    strcpy(fault_prefix, prefix);
    fault_stop = stop;
    fault_signal = sig;
    shm_fault_countdown = n;
    return PyLong_FromLong(left);
}

static PyObject *
py_last_crash_point(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(last_point);
}

PyMethodDef shm_crash_methods[] = {
    {"fault", (PyCFunction)(void (*)(void))py_fault, METH_VARARGS | METH_KEYWORDS,
     "fault(n, prefix='', stop=False, signal=0)\n--\n\n"
     "Tests only: SIGKILL this process at the n-th crash point reached from now\n"
     "whose name starts with prefix (SIGSTOP it, with stop=True; send its thread\n"
     "signal N and carry on, with signal=N); 0 disarms.\n"
     "Returns the points that were left of the previous countdown.\n\n"
     ">>> _core.fault(3, 'journal.')  # die at the third journal step"},
    {"last_crash_point", py_last_crash_point, METH_NOARGS,
     "last_crash_point()\n--\n\nThe name of the last armed crash point counted."},
    {NULL}
};
