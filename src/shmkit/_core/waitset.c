/* waitset.c - wait until any of several objects is ready, without consuming.
 *
 * Each object describes what makes it ready as a tuple
 *
 *   (kind, target, offset, extra)
 *
 *   W_EVENT      mapping, event word        the flag is set
 *   W_LOCK       mapping, lock word         the robust mutex is free
 *   W_SEM        mapping, semaphore start   a unit is free
 *   W_RW_READ    mapping, rwlock start      no writer is in or waiting
 *   W_RING_DATA  Ring, -, stop              a message (or the end) is there;
 *                                           stop=1: or every sender has gone
 *   W_RING_SPACE Ring, -, record bytes      a record of that size fits
 *   W_WORD       mapping, u32 word, value   the word no longer holds value
 *   W_COND       mapping, condition, seq0   notify() granted a wake-up since seq0
 *   W_RW_WRITE   mapping, rwlock start      no read holds are left (for the
 *                                           writer this process announced)
 *
 * and wait_ready() sleeps on all of their futex words at once through
 * shm_wait_any (wait.h): spin (when asked), count itself a sleeper as each
 * structure's own waiters do (so that wakers make their system call),
 * sleep in slices with the GIL released, let Ctrl-C through, and after a
 * slice without news run the liveness check of each kind.  A check that
 * finds a dead holder or a dead writer in the way reports the object as
 * "suspect": ready for a call that repairs (a try-acquire takes a dead
 * holder's lock over; a receive with a short timeout abandons a dead
 * producer's record).
 *
 * Readiness never consumes and is only a hint: another process or thread
 * may take the message or the lock before the caller's own non-blocking
 * call, which then finds nothing and waits again.  An object whose handle
 * is closed (before or during the wait) is reported ready, so that the
 * caller's next call on it raises ClosedError.
 *
 * The tests and the sleeper accounting are the structures' own (sync.h's
 * shm_event_arm, shm_lock_mark_waiters, shm_sem_free, shm_cond_granted...,
 * ring.h's ring_sleeper), so wakers never skip a wake-up this waiter needs.
 *
 *   wait_ready(descs, timeout=None, spin=True, check=True) -> (ready, suspect)
 *       lists of indices into descs; check=False: no liveness checks
 *       between slices (sleep until a wake-up or the timeout), for a caller
 *       that checks the same objects with timeout=0 calls of its own
 */
#include "waitset.h"

/* ---- the hooks ----------------------------------------------------------- */

int
w_ready(void *ctx, uint32_t *sleep_on)
{
    Watch *w = ctx;
    if (w->closed || w->suspect)
        return 1;
    uint32_t v = __atomic_load_n(w->word, __ATOMIC_SEQ_CST);
    switch (w->kind) {
    case W_EVENT:
        if (v & EVENT_FLAG)
            return 1;
        break;
    case W_LOCK:
        if (v == 0)
            return 1;
        if (w->armed)
            v = shm_lock_mark_waiters(w->word, v);
        break;
    case W_SEM:
        if (shm_sem_free(w->b))
            return 1;
        break;
    case W_RW_READ:
        if (!(v & RW_WRITER))
            return 1;
        break;
    case W_RING_DATA:
        if (ring_data_ready(w->r))
            return 1;
        break;
    case W_RING_SPACE:
        if (ring_space_ready(w->r, w->total))
            return 1;
        break;
    case W_WORD:
        if (v != w->value)
            return 1;
        break;
    case W_COND:
        if (shm_cond_granted(w->b, v, w->value))
            return 1;
        break;
    case W_RW_WRITE: /* v, the readers-left word, read before the scan */
        if (!shm_rw_readers_in(&(shm_sync_view){w->m, w->b, RW_TABLE, NULL}))
            return 1;
        break;
    }
    *sleep_on = v;
    return 0;
}

void
w_arm(void *ctx)
{
    Watch *w = ctx;
    switch (w->kind) {
    case W_EVENT:
        shm_event_arm(w->word);
        break;
    case W_SEM:
        shm_sem_arm(w->b);
        break;
    case W_RW_READ:
        shm_rw_arm(w->b);
        break;
    case W_RING_DATA:
    case W_RING_SPACE:
        if (w->me == 0)
            return; /* no attachment: nobody counts us; the slices still look */
        ring_claim(w->r, w->me, 0);
        ring_sleeper(w->r, w->me, w->kind == W_RING_SPACE, +1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        break;
    }
    w->armed = 1;
}

void
w_disarm(void *ctx)
{
    Watch *w = ctx;
    if (!w->armed)
        return;
    w->armed = 0;
    switch (w->kind) {
    case W_EVENT:
        shm_event_disarm(w->word);
        break;
    case W_SEM:
        shm_sem_disarm(w->b);
        break;
    case W_RING_DATA:
    case W_RING_SPACE:
        if (w->me != 0 && w->m->base != NULL) /* pinned: mapped even if closed */
            ring_sleeper(w->r, w->me, w->kind == W_RING_SPACE, -1);
        break;
    }
}

/* Is `token` (non-zero, not ours) an attachment that is gone? */
static int
dead(Watch *w, uint32_t token)
{
    token &= SHM_TOKEN_MASK;
    return token != 0 && token != w->m->token && !shm_token_alive(w->m, token);
}

/* A per-slot holder that is gone: a semaphore's units, a reader's holds
 * (shm_sync_scan's visit). */
static int
holder_dead_visit(void *ctx, uint32_t slot, uint64_t *e, uint64_t v, int alive)
{
    uint32_t token = shm_slot_entry_token(v, slot);
    return !alive && token != 0 && token != ((Watch *)ctx)->m->token; /* dead() */
}

/* The record at `from` (before `to`) of the ring is being written by a
 * process that is gone. */
static int
dead_writer(Watch *w, uint64_t from, uint64_t to)
{
    if (from >= to || to - from > w->r->cap || ((from | to) & 7))
        return 0;
    uint32_t s = LOAD(&rec_at(w->r, from)->state);
    return ST_KIND(s) == ST_RESERVED && dead(w, s);
}

int
w_check(void *ctx)
{
    Watch *w = ctx;
    if (w->closed || w->m->fd < 0)
        return 0; /* liveness cannot be asked; never guess */
    switch (w->kind) {
    case W_LOCK:
        w->suspect = dead(w, __atomic_load_n(w->word, __ATOMIC_ACQUIRE));
        break;
    case W_RW_READ:
        w->suspect = dead(w, __atomic_load_n((uint32_t *)(w->b + RW_LOCK),
                                             __ATOMIC_ACQUIRE));
        break;
    case W_SEM:
    case W_RW_WRITE: {
        /* a dead holder of units, or a dead reader in the announced
         * writer's way: the writer's next step drops its holds */
        shm_sync_view v = {w->m, w->b, w->kind == W_SEM ? SEM_TABLE : RW_TABLE, NULL};
        if (shm_sync_scan(&v, holder_dead_visit, w))
            w->suspect = 1;
        break;
    }
    case W_RING_DATA: {
        /* every sender gone (extra = 1: a receive that stops then), or a
         * record at read that a dead producer was writing */
        struct ring_hdr *h = w->r->h;
        if (w->value && w->m->token != 0 && ring_senders_gone(w->r, w->m)) {
            w->suspect = 1;
            break;
        }
        /* or views whose dead holders may give their messages back */
        w->suspect = dead_writer(w, LOAD(&h->read), LOAD(&h->tail)) ||
                     ring_views_need_repair(w->r, w->m);
        break;
    }
    case W_RING_SPACE: {
        /* records lent to consumers that died, holding head back */
        w->suspect = ring_views_need_repair(w->r, w->m);
        break;
    }
    }
    return 0;
}

/* ---- binding a description --------------------------------------------- */

int
watch_open(MappingObject *m)
{
    return m->base != NULL && !m->closing;
}

int
watch_bind(Watch *w, PyObject *desc, Py_ssize_t i, PyTypeObject *ring_type, const char *fn)
{
    memset(w, 0, sizeof *w);
    if (!PyTuple_Check(desc) || PyTuple_GET_SIZE(desc) != 4) {
        PyErr_Format(PyExc_TypeError, "%s: description %zd must be a tuple "
                     "(kind, target, offset, extra)", fn, i);
        return -1;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(desc, 0));
    long long off = PyLong_AsLongLong(PyTuple_GET_ITEM(desc, 2));
    long long extra = PyLong_AsLongLong(PyTuple_GET_ITEM(desc, 3));
    if (PyErr_Occurred())
        return -1;
    PyObject *target = PyTuple_GET_ITEM(desc, 1);
    w->kind = (int)kind;
    if (kind == W_RING_DATA || kind == W_RING_SPACE) {
        if (!PyObject_TypeCheck(target, ring_type)) {
            PyErr_Format(PyExc_TypeError, "%s: description %zd needs a channel", fn, i);
            return -1;
        }
        w->r = (RingObject *)target;
        if (w->r->mapping == NULL) {
            w->closed = 1; /* unbound: the caller's call raises ClosedError */
            return 0;
        }
        if (kind == W_RING_SPACE && (extra < 0 || (uint64_t)extra > w->r->cap))
            extra = (long long)w->r->cap; /* the send call explains the size */
        w->total = (uint64_t)extra;
        w->value = kind == W_RING_DATA && extra != 0; /* stop when no senders */
        w->pin = w->r->mapping;
        w->m = (MappingObject *)w->pin;
        if (!watch_open(w->m)) {
            w->closed = 1;
            return 0;
        }
        struct ring_hdr *h = w->r->h;
        w->word = kind == W_RING_DATA ? &h->data_seq : &h->space_seq;
    } else if (kind >= W_EVENT && kind <= W_RW_WRITE) {
        if (!shm_is_mapping(target)) {
            PyErr_Format(PyExc_TypeError, "%s: description %zd needs a mapping", fn, i);
            return -1;
        }
        w->pin = target;
        w->m = (MappingObject *)target;
        if (!watch_open(w->m)) {
            w->closed = 1;
            return 0;
        }
        uint64_t span = 4;
        if (kind == W_SEM)
            span = shm_sync_footprint(w->m, SEM_TABLE);
        else if (kind == W_RW_WRITE)
            span = shm_sync_footprint(w->m, RW_TABLE);
        else if (kind == W_RW_READ)
            span = RW_STATE + 4;
        else if (kind == W_COND)
            span = COND_GRANTED + 4;
        w->b = span == 4 ? shm_addr(target, off, 4, kind != W_WORD)
                         : shm_span(target, off, span, 1);
        if (w->b == NULL)
            return -1;
        w->word = (uint32_t *)(w->b + (kind == W_SEM        ? SEM_SEQ
                                       : kind == W_RW_READ  ? RW_STATE
                                       : kind == W_RW_WRITE ? RW_LEFT
                                       : kind == W_COND     ? COND_SEQ
                                                            : 0));
        w->value = (uint32_t)extra;
    } else {
        PyErr_Format(PyExc_ValueError, "%s: description %zd has unknown kind %ld",
                     fn, i, kind);
        return -1;
    }
    w->me = w->m->token;
    return 0;
}

int
watch_gone(const Watch *w)
{
    return w->m->token != w->me || !watch_open(w->m) ||
           (w->r != NULL && w->r->mapping != w->pin);
}

/* A channel handle without an attachment cannot count itself a sleeper, so
 * no sender wakes it: only the slices look again. */
int
watch_unarmed(const Watch *w)
{
    return (w->kind == W_RING_DATA || w->kind == W_RING_SPACE) && w->me == 0;
}

static PyObject *
py_wait_ready(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    if (n < 1 || n > 4) {
        PyErr_SetString(PyExc_TypeError,
                        "expected wait_ready(descs, timeout=None, spin=True, check=True)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(a[0], "wait_ready() needs a sequence of descriptions");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count < 1 || count > SHM_WAIT_MAX) {
        PyErr_Format(PyExc_ValueError, "wait_ready() waits on 1 to %d objects at once, "
                     "not %zd", SHM_WAIT_MAX, count);
        Py_DECREF(seq);
        return NULL;
    }
    int64_t deadline = shm_deadline(n > 1 ? a[1] : NULL);
    int spin = n > 2 ? PyObject_IsTrue(a[2]) : 1;
    int check = n > 3 ? PyObject_IsTrue(a[3]) : 1;
    if (deadline < 0 || spin < 0 || check < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    Watch ws[SHM_WAIT_MAX];
    shm_wait sw[SHM_WAIT_MAX];
    shm_wait *ptr[SHM_WAIT_MAX];
    Py_ssize_t bound = 0, live = 0;
    int r = 0, which = -1;
    PyObject *ready = NULL, *suspect = NULL, *out = NULL;
    for (; bound < count; bound++) {
        if (watch_bind(&ws[bound], PySequence_Fast_GET_ITEM(seq, bound), bound,
                       shm_mod_state(mod)->Ring, "wait_ready()") < 0)
            goto done;
        if (!ws[bound].closed)
            shm_pin(ws[bound].pin);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (ws[i].closed)
            continue;
        sw[live] = (shm_wait){.m = ws[i].m, .word = ws[i].word, .ctx = &ws[i],
                              .ready = w_ready, .arm = w_arm, .disarm = w_disarm,
                              .check = w_check, .spin_ns = spin ? SHM_WAIT_SPIN_NS : 0,
                              .check_ns = check || watch_unarmed(&ws[i]) ? 0 : SHM_FOREVER,
                              .what = "an object waited on"};
        ptr[live] = &sw[live];
        live++;
    }
    if (live == (Py_ssize_t)count) {
        r = shm_wait_any(ptr, (int)live, deadline, &which);
        for (Py_ssize_t i = 0, j = 0; i < count; i++)
            if (!ws[i].closed)
                ws[i].slept = sw[j++].slept;
        if (r < 0 && PyErr_ExceptionMatches(shm_mod_state(mod)->ClosedError)) {
            /* closed by another thread meanwhile: report it ready */
            PyErr_Clear();
            r = 0;
        }
        if (r < 0)
            goto done;
    }
    ready = PyList_New(0);
    suspect = PyList_New(0);
    if (ready == NULL || suspect == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        Watch *w = &ws[i];
        uint32_t v;
        if (!w->closed && watch_gone(w))
            w->closed = 1;
        int yes = w->closed || w->suspect || w_ready(w, &v);
        if (!yes)
            continue;
        if (!w->closed && (w->kind == W_LOCK || w->kind == W_EVENT) && w->slept)
            /* Released locks and auto-reset events wake one sleeper, and it
             * may have been us, who take nothing: pass the wake-up on, so
             * that a blocked taker elsewhere does not wait a whole slice. */
            shm_futex_wake(w->word, 1);
        PyObject *k = PyLong_FromSsize_t(i);
        if (k == NULL || PyList_Append(w->suspect && !w->closed ? suspect : ready, k) < 0) {
            Py_XDECREF(k);
            goto done;
        }
        Py_DECREF(k);
    }
    out = PyTuple_Pack(2, ready, suspect);
done:
    for (Py_ssize_t i = 0; i < bound; i++)
        if (ws[i].word != NULL) /* bound open, so pinned */
            shm_unpin(ws[i].pin);
    Py_XDECREF(ready);
    Py_XDECREF(suspect);
    Py_DECREF(seq);
    return out;
}

/* ---- a coroutine's condition wait, in three calls --------------------------
 *
 * condition.c's cond_wait counts itself, releases the mutex, sleeps, re-takes
 * the mutex and takes a grant inside one call.  A coroutine cannot re-take
 * the mutex inside a call, so its wait is three, each one C call made with
 * the mutex held (the same words, changed one at a time, as condition.c):
 *
 *   cond_enter(mapping, off, what) -> seq0     count us, release the mutex
 *   (await W_COND (mapping, off, seq0) ready, then re-take the mutex)
 *   cond_take(mapping, off, seq0) -> bool      a grant since seq0: take it, uncount
 *   cond_leave(mapping, off, seq0, take) -> bool   giving up: take a grant a
 *                                              racing notify() made if take, uncount
 */

static char *
cond_bind(PyObject *const *a, Py_ssize_t n, Py_ssize_t want, const char *sig)
{
    long long off;
    if (shm_sync_args(a, n, want, want, sig, &off) < 0)
        return NULL;
    if (!shm_is_mapping(a[0])) {
        PyErr_SetString(PyExc_TypeError, "expected a shmkit Mapping");
        return NULL;
    }
    return shm_span(a[0], off, shm_sync_footprint((MappingObject *)a[0], COND_TABLE), 1);
}

static PyObject *
py_cond_enter(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    char *b = cond_bind(a, n, 2, "cond_enter(mapping, offset)");
    if (b == NULL)
        return NULL;
    MappingObject *m = (MappingObject *)a[0];
    if (SHM_TOKEN_SLOT(m->token) >= m->max_slots) {
        PyErr_SetString(PyExc_RuntimeError, "cond_enter(): no attach slot");
        return NULL;
    }
    if (!shm_cond_held(m, b, "a condition", "wait"))
        return NULL;
    shm_cond_count(m, b, +1);
    uint32_t seq0 = __atomic_load_n((uint32_t *)(b + COND_SEQ), __ATOMIC_ACQUIRE);
    if (shm_lock_release(m, (uint32_t *)b) < 0) {
        shm_cond_count(m, b, -1);
        return NULL;
    }
    return PyLong_FromUnsignedLong(seq0);
}

static PyObject *
py_cond_take(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    char *b = cond_bind(a, n, 3, "cond_take(mapping, offset, seq0)");
    if (b == NULL)
        return NULL;
    unsigned long seq0 = PyLong_AsUnsignedLong(a[2]);
    if (PyErr_Occurred())
        return NULL;
    MappingObject *m = (MappingObject *)a[0];
    if (!shm_cond_held(m, b, "a condition", "wait"))
        return NULL;
    if (!shm_cond_take_grant(b, (uint32_t)seq0))
        Py_RETURN_FALSE;
    shm_cond_count(m, b, -1);
    Py_RETURN_TRUE;
}

static PyObject *
py_cond_leave(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    char *b = cond_bind(a, n, 4, "cond_leave(mapping, offset, seq0, take)");
    if (b == NULL)
        return NULL;
    unsigned long seq0 = PyLong_AsUnsignedLong(a[2]);
    int take = PyObject_IsTrue(a[3]);
    if (PyErr_Occurred() || take < 0)
        return NULL;
    MappingObject *m = (MappingObject *)a[0];
    if (!shm_cond_held(m, b, "a condition", "wait"))
        return NULL;
    int got = take && shm_cond_take_grant(b, (uint32_t)seq0);
    shm_cond_count(m, b, -1);
    return PyBool_FromLong(got);
}

static PyMethodDef waitset_methods[] = {
    {"wait_ready", (PyCFunction)(void (*)(void))py_wait_ready, METH_FASTCALL,
     "wait_ready($module, descs, timeout=None, spin=True, check=True, /)\n--\n\n"
     "-> (ready, suspect).  Wait until any described object is ready; return the indices of those\n"
     "ready now and of those whose holder or writer died (a repairing call\n"
     "makes progress).  Never consumes; closed handles count as ready.\n"
     "check=False: look for dead holders only when the timeout passes."},
    {"cond_enter", (PyCFunction)(void (*)(void))py_cond_enter, METH_FASTCALL,
     "cond_enter($module, mapping, offset, /)\n--\n\n"
     "-> seq0: count us a sleeper, release the mutex"},
    {"cond_take", (PyCFunction)(void (*)(void))py_cond_take, METH_FASTCALL,
     "cond_take($module, mapping, offset, seq0, /)\n--\n\n"
     "-> bool: take a grant made since seq0 (mutex held)"},
    {"cond_leave", (PyCFunction)(void (*)(void))py_cond_leave, METH_FASTCALL,
     "cond_leave($module, mapping, offset, seq0, take, /)\n--\n\n"
     "-> bool: stop waiting (mutex held)"},
    {NULL}
};

int
shm_init_waitset(PyObject *module)
{
    if (PyModule_AddFunctions(module, waitset_methods) < 0 || shm_init_uring(module) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "W_EVENT", W_EVENT) < 0 ||
                   PyModule_AddIntConstant(module, "W_LOCK", W_LOCK) < 0 ||
                   PyModule_AddIntConstant(module, "W_SEM", W_SEM) < 0 ||
                   PyModule_AddIntConstant(module, "W_RW_READ", W_RW_READ) < 0 ||
                   PyModule_AddIntConstant(module, "W_RING_DATA", W_RING_DATA) < 0 ||
                   PyModule_AddIntConstant(module, "W_RING_SPACE", W_RING_SPACE) < 0 ||
                   PyModule_AddIntConstant(module, "W_WORD", W_WORD) < 0 ||
                   PyModule_AddIntConstant(module, "W_COND", W_COND) < 0 ||
                   PyModule_AddIntConstant(module, "W_RW_WRITE", W_RW_WRITE) < 0
               ? -1
               : 0;
}
