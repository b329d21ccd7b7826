/* gate.c - modules imported on first use, never across a fork.
 *
 * shmkit imports numpy, and a few modules only some calls need, the first
 * time they are needed (_lazy.py).  A thread inside such an import holds the
 * import locks of the modules it is loading; a child forked by another
 * thread at that moment inherits them, held by a thread it does not have,
 * and its first use of the module waits for them forever.  So every such
 * import passes a gate that a fork also passes: a fork waits for an import
 * under way, and no child starts inside one.
 *
 * Both waits end after GATE_WAIT_NS and go on without the gate, as they
 * would have before anything was imported lazily, when a cycle the import
 * locks cannot see holds them: a fork hook registered after ours that
 * holds a lock the import needs (logging's, when the module imported
 * through the gate is the first to import logging and then uses it), or an
 * import that waits for a thread or a module lock that itself waits for
 * the gate.  The parent then goes on after 5 s; a child forked so may hang,
 * as it could before.  None of the modules shmkit imports this way (numpy,
 * shmkit.records, ast, traceback) imports logging or sets up such a cycle.
 *
 * os.fork() waits first in its audit event, before CPython lists and runs
 * the fork hooks (gate_audit below): a Ctrl-C meanwhile is raised by
 * os.fork() with no child made, and hooks that other threads register
 * meanwhile run in pairs.  While the fork waits, and until its hooks take
 * the gate, an import that gets it gives it back (forks_waiting,
 * fork_intent_ns), so the before-fork hook waits only for forks that raise
 * no such event (subprocess's, with preexec_fn), or for an import begun
 * after 100 ms; not again once the audit's wait ran out.
 *
 * Every step is C.  Python fork hooks can be interrupted by a signal
 * handler (Ctrl-C) between two bytecodes, and CPython then forks anyway and
 * drops the exception: the gate was skipped, or left held for good.  Here a
 * signal that arrives while a fork hook waits stays pending.  A Ctrl-C in
 * the main thread's fork, from our first hook to our last, is held back and
 * raised again once the hooks registered before ours have run: logging's
 * are Python code, where it would be dropped (and logging's lock left
 * held).  So that ours run first before a fork and last after it, another
 * pair is registered once logging is imported after the first.  (A Python
 * fork hook registered after ours still sees a Ctrl-C that lands in it, as
 * it would without the gate, and one the before hook held while it
 * waited.)  An import's wait for the gate, and os.fork()'s in its audit
 * event, run the handlers between slices, with nothing held.
 *
 *   import_gated(name) -> module     import name through the gate; the
 *                                    first call in an interpreter registers
 *                                    the fork hooks
 *
 * The child's gate is reset by a pthread_atfork handler, not a Python hook:
 * it then runs for every fork, also one made by C code that bypasses
 * os.fork() and its hooks (the gate copied held by a thread the child has
 * not would stop its first lazy import for good).
 */
#include "shmkit.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>

#define GATE_WAIT_NS 5000000000LL
#define GATE_SLICE_NS 50000000LL

#if PY_VERSION_HEX >= 0x030D0000
#define gate_finalizing() Py_IsFinalizing()
#else
#define gate_finalizing() _Py_IsFinalizing()
#endif

/* glibc before 2.30 has no clocklock: a deadline on the wall clock then. */
#if defined(__GLIBC__) && !__GLIBC_PREREQ(2, 30)
#define GATE_CLOCK CLOCK_REALTIME
#define gate_lock_until(m, ts) pthread_mutex_timedlock((m), (ts))
#else
#define GATE_CLOCK CLOCK_MONOTONIC
#define gate_lock_until(m, ts) pthread_mutex_clocklock((m), CLOCK_MONOTONIC, (ts))
#endif

/* Recursive: an import through the gate may import another through it,
 * and a thread may fork from inside one. */
static pthread_mutex_t gate = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
/* Per forking thread, from its before-fork hooks to its after-fork ones: */
static __thread int fork_waited;    /* a hook has waited for the gate */
static __thread int audit_waited_out; /* this os.fork() waited its 5 s already */
static __thread int fork_held;      /* times the hooks took it */
static __thread int interrupt_held; /* a Ctrl-C held back across the fork */

/* A fork that has waited in its audit event, until its before-fork hook
 * takes the gate: an import in another thread that gets the gate meanwhile
 * (it was queued behind the import the fork waited for) gives it back, so
 * that the fork's hooks do not wait again.  Only for FORK_INTENT_NS, and an
 * import gives way for no longer in all: a later audit hook may refuse the
 * fork, and then no before hook comes.  Once a thread's next fork finds its
 * last one refused so, forks note no intent any more. */
#define FORK_INTENT_NS 100000000LL
static int64_t fork_intent_ns;   /* when it was set, 0 none (atomic) */
static __thread int fork_intending; /* this thread set it */
static int forks_refused;        /* a fork was refused after ours: no more intents */
static int forks_waiting;        /* os.fork() calls waiting for the gate (atomic) */
static __thread int fork_waiting_here; /* ... of them in this thread */
static __thread int imports_here; /* gated imports under way in this thread: one
                                   * inside another holds the gate already */

/* While the main thread forks, from our first before-fork hook to our last
 * after-fork one, SIGINT only sets sigint_seen: Python's handler would trip
 * a flag that the next Python code raises, and logging's hooks are Python
 * code that CPython runs around the fork (an outside Ctrl-C landing during
 * fork() itself was raised in logging's release, which then left its lock
 * held).  The old action is put back, and the signal raised again to it,
 * in the after-fork hook of the newest pair this fork's before hooks saw
 * (CPython runs the after hooks it listed when they began). */
static volatile sig_atomic_t sigint_seen;
static struct sigaction sigint_saved;
static volatile sig_atomic_t sigint_swapped; /* only the main thread swaps */
static int sigint_release_pair = -1; /* the pair whose after hook puts it back */

/* A handler installed while the recorder was SIGINT's action, and that
 * chains to the action it found (faulthandler.register(chain=True), many C
 * libraries), calls the recorder after the hold too, in this process and in
 * a child forked meanwhile.  It then trips Python's own flag
 * (PyErr_SetInterruptEx is async-signal-safe), as the Python handler that
 * the recorder displaced would have; forwarding to the displaced action
 * itself could loop back through a chaining handler to the recorder. */
static void
record_sigint(int sig)
{
    int saved_errno = errno;
    if (sigint_swapped)
        sigint_seen = 1;
    else if (Py_IsInitialized() && !gate_finalizing()) /* put back at exit too */
        PyErr_SetInterruptEx(sig);
    errno = saved_errno;
}

static void
sigint_hold(void)
{
    if (sigint_swapped || !_PyOS_IsMainThread())
        return;
    /* Only a handler is swapped: SIG_IGN must reach children exec'd by other
     * threads meanwhile (posix_spawn runs no fork handlers), and SIG_DFL
     * holds nothing to give back. */
    if (sigaction(SIGINT, NULL, &sigint_saved) != 0 || sigint_saved.sa_handler == SIG_IGN ||
        sigint_saved.sa_handler == SIG_DFL)
        return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = record_sigint;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigint_seen = 0;
    sigint_swapped = 1; /* before the swap: a child forked between the two restores */
    if (sigaction(SIGINT, &sa, NULL) != 0)
        sigint_swapped = 0;
}

static void
sigint_release(void)
{
    if (!sigint_swapped || !_PyOS_IsMainThread()) /* another thread's fork */
        return;
    /* Put back only our own: a hook may have set another action meanwhile
     * (signal.signal), which stands. */
    struct sigaction cur;
    if (sigaction(SIGINT, NULL, &cur) == 0 && cur.sa_handler == record_sigint)
        sigaction(SIGINT, &sigint_saved, NULL);
    sigint_swapped = 0;
    if (sigint_seen) {
        sigint_seen = 0;
        /* To the process, as from outside: a main thread that blocks SIGINT
         * leaves it to another thread, whose handler trips the flag. */
        kill(getpid(), SIGINT);
    }
}

/* In the child, whose only thread is the one that forked: a gate it held
 * (for the fork, or for an import it forked inside) starts afresh, free. */
static void
gate_reset_in_child(void)
{
    static const pthread_mutex_t fresh = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
    fork_waited = fork_held = 0;
    fork_intent_ns = 0;
    fork_intending = 0;
    forks_waiting = fork_waiting_here; /* the child's only thread's own waits */
    interrupt_held = 0; /* the parent's, as CPython clears pending signals in a child */
    if (sigint_swapped) {
        struct sigaction cur;
        if (sigaction(SIGINT, NULL, &cur) == 0 && cur.sa_handler == record_sigint)
            sigaction(SIGINT, &sigint_saved, NULL);
        sigint_swapped = sigint_seen = 0;
    }
    sigint_release_pair = -1;
    memcpy(&gate, &fresh, sizeof gate);
}

/* Take the gate within ns, with the GIL released: 1 taken, 0 not.  On the
 * monotonic clock: a wall clock stepped back (NTP, a user) must not stretch
 * a fork's wait, or the time between an import's signal checks. */
static int
gate_take(int64_t ns)
{
    struct timespec ts;
    clock_gettime(GATE_CLOCK, &ts);
    int64_t t = (int64_t)ts.tv_nsec + ns;
    ts.tv_sec += (time_t)(t / 1000000000LL);
    ts.tv_nsec = (long)(t % 1000000000LL);
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = gate_lock_until(&gate, &ts);
    Py_END_ALLOW_THREADS
    return r == 0;
}

/* The module `name` if this interpreter has imported it (a new reference),
 * NULL if not; NULL with an exception on error. */
static PyObject *
imported(const char *name)
{
    PyObject *str = PyUnicode_FromString(name);
    if (str == NULL)
        return NULL;
    PyObject *m = PyImport_GetModule(str);
    Py_DECREF(str);
    return m;
}

/* 1 if logging is imported (it registers its fork hooks then), 0 if not,
 * -1 with an exception. */
static int
logging_imported(void)
{
    PyObject *m = imported("logging");
    if (m == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_DECREF(m);
    return 1;
}

/* The gate's fork hooks are registered in this interpreter (the audit hook
 * is the runtime's): only then will a fork's hooks take the gate, and only
 * then may the fork claim it.  Read from this interpreter's module state. */
static int
interpreter_hooked(void)
{
    PyObject *m = imported("shmkit._core");
    int hooked = m != NULL && PyModule_Check(m) && PyModule_GetDef(m) == &shm_module &&
                 shm_mod_state(m)->gate_hooks > 0;
    Py_XDECREF(m);
    PyErr_Clear(); /* an audit hook that says 0 must leave no exception */
    return hooked;
}

static int register_pair(PyObject *mod);
static int gate_audit(const char *event, PyObject *args, void *data);

/* Once logging is imported after our only pair, a second pair after its
 * hooks.  A failure leaves the hooks as they are (a hook must not raise). */
static void
follow_logging(PyObject *mod)
{
    shm_state *st = shm_mod_state(mod);
    if (st->gate_hooks == 1 && !st->gate_after_logging &&
        (logging_imported() != 1 || register_pair(mod) < 0))
        PyErr_Clear();
}

/* The fork hooks: C functions with the module as self, so that no
 * bytecode runs in them.  With two pairs registered, the newer runs first
 * before a fork (it waits; the older takes the gate again at once) and
 * last after it (it gives the Ctrl-C back). */
static PyObject *
hook_before(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    sigint_hold();
    /* No signal checks while waiting: see the top of this file.  None at
     * exit either: a thread frozen there may hold the gate. */
    fork_held += gate_take(fork_waited || audit_waited_out || gate_finalizing() ? 0
                                                                                 : GATE_WAIT_NS);
    fork_waited = 1;
    audit_waited_out = 0;
    if (fork_intending) {
        fork_intending = 0;
        __atomic_store_n(&fork_intent_ns, 0, __ATOMIC_RELEASE);
    }
    /* A Ctrl-C that came meanwhile would be raised in the next Python
     * hook: hold it back.  (Only the main thread's hooks run handlers.) */
    if (PyOS_InterruptOccurred())
        interrupt_held++;
    follow_logging(mod); /* this fork's after-hooks include the new pair's */
    if (_PyOS_IsMainThread())
        sigint_release_pair = shm_mod_state(mod)->gate_hooks - 1;
    Py_RETURN_NONE;
}

static PyObject *
hook_after_in_parent(PyObject *mod, int pair)
{
    fork_waited = 0;
    if (fork_held > 0) { /* the fork is made: the gate may open before the last hook */
        fork_held--;
        pthread_mutex_unlock(&gate);
    }
    if (_PyOS_IsMainThread() && pair == sigint_release_pair) { /* the others have run */
        sigint_release_pair = -1;
        sigint_release();
        if (interrupt_held > 0) {
            interrupt_held = 0;
            PyErr_SetInterruptEx(SIGINT);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
after_0(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return hook_after_in_parent(mod, 0);
}
static PyObject *
after_1(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return hook_after_in_parent(mod, 1);
}

static PyMethodDef hook_defs[2][2] = {
    {{"gate_before_fork", hook_before, METH_NOARGS, NULL},
     {"gate_after_fork_in_parent", after_0, METH_NOARGS, NULL}},
    {{"gate_before_fork", hook_before, METH_NOARGS, NULL},
     {"gate_after_fork_in_parent", after_1, METH_NOARGS, NULL}},
};

/* os.register_at_fork(before=..., after_in_parent=...) with the next pair;
 * the first time, the child's reset too. */
static int
register_pair(PyObject *mod)
{
    shm_state *st = shm_mod_state(mod);
    static int reset_registered;
    if (!reset_registered) {
        int e = pthread_atfork(NULL, NULL, gate_reset_in_child);
        if (e != 0) {
            errno = e;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        reset_registered = 1;
        /* Once per process: audit hooks are the runtime's, not an
         * interpreter's.  If another audit hook refuses it, CPython says
         * nothing; forks then wait in the before-fork hook alone. */
        if (PySys_AddAuditHook(gate_audit, NULL) < 0)
            PyErr_Clear();
    }
    int i = st->gate_hooks;
    if (i >= 2)
        return 0;
    PyObject *os = PyImport_ImportModule("os"), *reg = NULL, *args = NULL, *kw = NULL,
             *before = NULL, *after = NULL, *r = NULL;
    if (os == NULL || (reg = PyObject_GetAttrString(os, "register_at_fork")) == NULL ||
        (args = PyTuple_New(0)) == NULL || (kw = PyDict_New()) == NULL ||
        (before = PyCFunction_New(&hook_defs[i][0], mod)) == NULL ||
        (after = PyCFunction_New(&hook_defs[i][1], mod)) == NULL ||
        PyDict_SetItemString(kw, "before", before) < 0 ||
        PyDict_SetItemString(kw, "after_in_parent", after) < 0)
        goto done;
    int after_logging = logging_imported(); /* read before registering */
    if (after_logging < 0)
        goto done;
    r = PyObject_Call(reg, args, kw);
    if (r != NULL) {
        st->gate_hooks = i + 1;
        st->gate_after_logging = after_logging;
    }
done:
    Py_XDECREF(os);
    Py_XDECREF(reg);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    Py_XDECREF(before);
    Py_XDECREF(after);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Another thread's os.fork() waits for the gate, or has waited and its
 * hooks have not yet taken it (see fork_intent_ns): an import gives way. */
static int
fork_intended(void)
{
    if (__atomic_load_n(&forks_waiting, __ATOMIC_ACQUIRE) > fork_waiting_here)
        return 1; /* the gate is unfair: without this, imports one after another
                   * in other threads could keep a fork waiting */
    int64_t t = __atomic_load_n(&fork_intent_ns, __ATOMIC_ACQUIRE);
    return t != 0 && !fork_intending && shm_now_ns() - t < FORK_INTENT_NS;
}

/* Take the gate, with the GIL released in slices and signal handlers run
 * between them, with nothing held: 1 taken, 0 not (by the deadline on the
 * monotonic clock, or at exit), -1 with the exception a handler raised. */
static int
gate_take_interruptible(int64_t deadline)
{
    /* Free: taken without letting the GIL go, which would let a thread
     * that is about to import queue up for the gate meanwhile. */
    if (pthread_mutex_trylock(&gate) == 0)
        return 1;
    for (int64_t left; (left = deadline - shm_now_ns()) > 0 && !gate_finalizing();) {
        int taken = gate_take(left < GATE_SLICE_NS ? left : GATE_SLICE_NS);
        /* A Ctrl-C during the wait is raised now, before what waited, and
         * handlers run with the gate free (one may wait for an import) */
        if (taken)
            pthread_mutex_unlock(&gate);
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (taken && pthread_mutex_trylock(&gate) == 0)
            return 1;
    }
    return 0;
}

/* os.fork() raises its audit event before it lists and runs the fork hooks:
 * the fork waits here for an import under way, as if it had been called a
 * moment later.  Meanwhile other threads may register fork hooks (a module
 * they import, such as logging or concurrent.futures): CPython lists them
 * with the rest, so their after hooks never run without their before ones.
 * And a Ctrl-C that comes while it waits is raised here, by os.fork(), with
 * no child made.  The gate is let go at once, with the fork's claim noted:
 * a hook after ours may still refuse the fork, and then no after-fork hook
 * would release it. */
static int
gate_audit(const char *event, PyObject *Py_UNUSED(args), void *Py_UNUSED(data))
{
    if (event[0] != 'o' || (strcmp(event, "os.fork") != 0 && strcmp(event, "os.forkpty") != 0))
        return 0;
    if (fork_intending) { /* this thread's last fork never reached its hooks */
        fork_intending = 0;
        __atomic_store_n(&fork_intent_ns, 0, __ATOMIC_RELEASE);
        forks_refused = 1; /* so imports no longer give way to forks */
    }
    fork_waiting_here++;
    __atomic_add_fetch(&forks_waiting, 1, __ATOMIC_RELEASE);
    int taken = gate_take_interruptible(shm_now_ns() + GATE_WAIT_NS);
    __atomic_sub_fetch(&forks_waiting, 1, __ATOMIC_RELEASE);
    fork_waiting_here--;
    audit_waited_out = taken == 0; /* its hooks need not wait a second time */
    if (taken > 0) {
        if (!forks_refused && interpreter_hooked()) {
            fork_intending = 1;
            __atomic_store_n(&fork_intent_ns, shm_now_ns(), __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&gate);
    }
    return taken < 0 ? -1 : 0;
}

static PyObject *
py_import_gated(PyObject *mod, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "import_gated(name): name must be a str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    /* Before the gate is first taken, once per interpreter (each keeps its
     * own fork hooks); a second pair once logging is imported. */
    shm_state *st = shm_mod_state(mod);
    if (st->gate_hooks == 0 && register_pair(mod) < 0)
        return NULL;
    follow_logging(mod);
    int64_t deadline = shm_now_ns() + GATE_WAIT_NS;
    int taken = gate_take_interruptible(deadline);
    int64_t give_way_until = shm_now_ns() + FORK_INTENT_NS; /* forks refused in a row */
    while (taken > 0 && !imports_here && fork_intended() && shm_now_ns() < give_way_until &&
           !gate_finalizing()) {
        /* let the fork's hooks have it */
        pthread_mutex_unlock(&gate);
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&(struct timespec){0, 1000000}, NULL);
        Py_END_ALLOW_THREADS
        taken = PyErr_CheckSignals() < 0 ? -1 : gate_take_interruptible(deadline);
    }
    if (taken < 0)
        return NULL; /* Ctrl-C while waiting: nothing is held */
    imports_here++;
    PyObject *m = PyImport_Import(name);
    imports_here--;
    if (taken)
        pthread_mutex_unlock(&gate);
    return m;
}

PyMethodDef shm_gate_methods[] = {
    {"import_gated", py_import_gated, METH_O,
     "import_gated($module, name, /)\n--\n\n"
     "Import the module name so that no fork happens while it is imported\n"
     "(a fork waits for it, up to 5 s).  shmkit._lazy.load() calls it once per name."},
    {NULL, NULL, 0, NULL},
};
