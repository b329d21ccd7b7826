/* heaptype.c - shmkit._core.HeapCore and shmkit.Pin: the heap as Python types.
 *
 * The protocol is heap.c (no Python objects there); this file parses
 * arguments, maps the payload (shm_span), takes the heap's robust lock
 * (lock.c; the wait releases the GIL), lets other threads run during long
 * copies, makes the pins' memoryviews and raises the errors heap.c records
 * (shm_fail), naming the heap.  See heap.c for the protocol, the API summary
 * and the crash analysis, and heap.h for the layout.
 */
#include "heap.h"
#include <stdio.h>
#include <string.h>
#include <unistd.h>


typedef struct {
    PyObject_HEAD
    HCore core;         /* the protocol's state (heap.h) */
    PyObject *mapping;
    PyObject *name;
    PyObject *mv;       /* memoryview of the whole mapping; pins slice it */
    int pinned;         /* a pin was ever asked through this object: only then
                         * can its attachment hold one (pins_held() skips the
                         * pin table, a page a fresh handle has not touched) */
} HeapObject;

/* The HeapObject an operation's Ctx belongs to. */
#define OBJ(c) ((HeapObject *)((char *)(c)->h - offsetof(HeapObject, core)))

/* ---- errors: heap.c's record as an exception -------------------------------- */

static void
h_raise(HeapObject *self)
{
    if (PyErr_Occurred())
        return; /* raised by a shared module (journal.c, lock.c) */
    const char *m = shm_err.msg;
    shm_state *st = shm_state_of((PyObject *)self);
    switch (shm_err.code) {
    case HE_CORRUPT:
        PyErr_Format(st->CorruptError,
                     "heap %R is corrupt: %s; copy out what you still need and "
                     "recreate it (shmkit rm)", self->name, m);
        break;
    case HE_STALE:
        PyErr_Format(st->StaleHandleError,
                     "%s in heap %R", m, self->name);
        break;
    case HE_PINNED:
        PyErr_SetString(st->PinnedError, m);
        break;
    case HE_FULL:
        PyErr_SetString(st->HeapFullError, m);
        break;
    case HE_VALUE:
        PyErr_SetString(PyExc_ValueError, m);
        break;
    case HE_NOMEM:
        PyErr_SetString(PyExc_MemoryError, m);
        break;
    default:
        PyErr_SetString(PyExc_RuntimeError, m[0] ? m : "heap: unknown error");
        break;
    }
}

/* heap.c's hooks around long copies: other threads run meanwhile. */
static void *
heap_nogil(void)
{
    return PyEval_SaveThread();
}

static void
heap_gil(void *ts)
{
    PyEval_RestoreThread((PyThreadState *)ts);
}

/* ---- locking ------------------------------------------------------------- */

static int
begin(HeapObject *self, Ctx *c, int writable)
{
    c->h = &self->core;
    c->locked = 0;
    c->p = shm_span(self->mapping, self->core.hoff, self->core.plen, writable);
    if (c->p == NULL)
        return -1;
    /* a damaged size word is reported by lock() (which checks again);
     * lock-free calls (a pin's release, size_of) keep the bound they had */
    if (sync_units(c) < 0) {
        PyErr_Clear();
        shm_journal_bind(&c->jn, self->core.m, c->p, H_JOURNAL, J_MAX, H_FREEH, self->core.plen,
                         self->core.what);
    }
    shm_pin(self->mapping);
    return 0;
}

/* Release the lock.  Work left in the journal by a failed operation is
 * undone first, so no error path can publish a half-made change. */
static void
unlock(Ctx *c)
{
    if (!c->locked)
        return;
    c->locked = 0;
    shm_lock_release_journal(c->h->m, (uint32_t *)(c->p + H_LOCK), &c->jn);
}

static void
end(Ctx *c)
{
    unlock(c);
    shm_unpin(OBJ(c)->mapping);
}

static int
lock(Ctx *c, int64_t deadline)
{
    MappingObject *m = c->h->m;
    if (m->token == 0) {
        if (m->readonly)
            PyErr_Format(shm_state_of((PyObject *)OBJ(c))->ReadOnlyError,
                         "heap %R is open read-only here; open it without readonly=True "
                         "to change it", OBJ(c)->name);
        else /* closed by another thread since the call began */
            PyErr_Format(shm_state_of((PyObject *)OBJ(c))->ClosedError,
                         "heap %R is closed in this process", OBJ(c)->name);
        return -1;
    }
    int r = shm_lock_acquire_repair(m, (uint32_t *)(c->p + H_LOCK), deadline, NULL, NULL,
                                    NULL);
    if (r < 0)
        return -1;
    if (r == 0) {
        char who[SHM_HOLDER_PHRASE];
        shm_deadline_passed(shm_state_of((PyObject *)OBJ(c))->Timeout,
                     "could not lock heap %R before the timeout: it is held by %s, "
                     "perhaps in a long compaction; try again, or resume or end that process",
                     OBJ(c)->name,
                     shm_holder_phrase(m, __atomic_load_n((uint32_t *)(c->p + H_LOCK),
                                                          __ATOMIC_RELAXED), who, sizeof who));
        return -1;
    }
    c->locked = 1;
    if (locked_repair(c, r == 2) < 0) {
        h_raise(OBJ(c));
        unlock(c);
        return -1;
    }
    return 0;
}

/* ---- arguments ------------------------------------------------------------ */

static int
u64_arg(PyObject *o, unsigned long long *v)
{
    *v = PyLong_AsUnsignedLongLong(o);
    return *v == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

static int
parse_handle(PyObject *o, uint32_t *idx, uint32_t *gen)
{
    unsigned long long v;
    if (u64_arg(o, &v) < 0)
        return -1;
    *idx = (uint32_t)v;
    *gen = (uint32_t)(v >> 32);
    return 0;
}

static int64_t
get_deadline(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t i)
{
    return shm_deadline(nargs > i ? args[i] : NULL);
}

/* args[0] as a handle, once at least `need` arguments were given (else
 * TypeError with the call's usage). */
static int
handle_arg(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t need, const char *usage,
           uint32_t *idx, uint32_t *gen)
{
    if (nargs < need) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    return parse_handle(args[0], idx, gen);
}

/* What alloc() and realloc() return when h_alloc/h_realloc found no room. */
static PyObject *
no_room(int r)
{
    return PyLong_FromLong(r == HR_SPLIT ? ROOM_SPLIT : ROOM_SHORT);
}

/* The block of entry idx is being moved, freed or resized: wait for the
 * lock's holder to finish (until deadline), then let go of the lock. */
static int
settle(HeapObject *self, Ctx *c, uint32_t idx, int64_t deadline)
{
    if (lock(c, deadline) < 0)
        return -1;
    if (h_pin_settled(c, idx) < 0) {
        h_raise(self);
        return -1;
    }
    unlock(c);
    return 0;
}

/* ---- HeapCore methods ------------------------------------------------------- */

/* The start of a change that needs n bytes: bound writable, n in units,
 * the lock taken.  0, or -1 with an exception and nothing held. */
static int
begin_sized(HeapObject *self, Ctx *c, unsigned long long n, int64_t deadline, uint32_t *want)
{
    if (begin(self, c, 1) < 0)
        return -1;
    if (want_units(&self->core, n, want) < 0) {
        h_raise(self);
        end(c);
        return -1;
    }
    if (lock(c, deadline) < 0) {
        end(c);
        return -1;
    }
    return 0;
}

/* Its end: r from the protocol (0 done, ROOM_* not done, <0 error) as the
 * method's result, with `value` (a handle, or 0) when done. */
static PyObject *
end_sized(HeapObject *self, Ctx *c, int r, uint64_t value)
{
    PyObject *result = NULL;
    if (r < 0)
        h_raise(self);
    else
        result = r == 0 ? PyLong_FromUnsignedLongLong(value) : no_room(r);
    end(c);
    return result;
}


/* alloc(nbytes, zero, timeout) -> handle int, or ROOM_SPLIT when the free
 * space is enough but split up (the caller compacts), ROOM_SHORT when it is
 * not enough (the caller grows the heap). */
static PyObject *
heap_alloc(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long n;
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "alloc(nbytes, zero, timeout=None)");
        return NULL;
    }
    if (u64_arg(args[0], &n) < 0)
        return NULL;
    int zero = PyObject_IsTrue(args[1]);
    int64_t deadline = get_deadline(args, nargs, 2);
    if (zero < 0 || deadline < 0)
        return NULL;
    Ctx c;
    uint32_t want = 0;
    uint64_t handle = 0;
    if (begin_sized(self, &c, n, deadline, &want) < 0)
        return NULL;
    int r = h_alloc(&c, n, zero, NULL, want, &handle); /* before handle is read */
    return end_sized(self, &c, r, handle);
}

/* put(data, timeout=None) -> handle int, or ROOM_SPLIT / ROOM_SHORT as
 * alloc: a block holding a copy of data's bytes (any C-contiguous buffer),
 * allocated and filled in one call under the lock, so no Ctrl-C between
 * two Python steps can leave a block made and unfilled or unowned. */
static PyObject *
heap_put(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "put(data, timeout=None)");
        return NULL;
    }
    int64_t deadline = get_deadline(args, nargs, 1);
    if (deadline < 0)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Ctx c;
    uint32_t want = 0;
    uint64_t handle = 0;
    PyObject *result = NULL;
    if (begin_sized(self, &c, (unsigned long long)b.len, deadline, &want) == 0) {
        int r = h_alloc(&c, (uint64_t)b.len, 0, b.buf, want, &handle);
        result = end_sized(self, &c, r, handle);
    }
    PyBuffer_Release(&b);
    return result;
}

/* grow(data_bytes, timeout=None) -> data bytes now.  Extends the data area
 * to data_bytes (a multiple of 16, at most max_size), which the caller's
 * segment must already cover: the new units become a free block at the end,
 * merged with a free last block.  One journaled commit under the lock;
 * a no-op when the heap is already that large (another process grew it). */
static PyObject *
heap_grow(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long n;
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "grow(data_bytes, timeout=None)");
        return NULL;
    }
    if (u64_arg(args[0], &n) < 0)
        return NULL;
    int64_t deadline = get_deadline(args, nargs, 1);
    if (deadline < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    if (n / UNIT > self->core.max_units) {
        PyErr_Format(PyExc_ValueError, "heap %R cannot grow to %llu bytes: its max_size is "
                     "%llu", self->name, n, (unsigned long long)self->core.max_units * UNIT);
        goto out;
    }
    if (lock(&c, deadline) < 0)
        goto out;
    if (h_grow(&c, n) < 0)
        h_raise(self);
    else
        result = PyLong_FromUnsignedLongLong(self->core.units * UNIT);
out:
    end(&c);
    return result;
}

/* capacity() -> (data bytes now, max data bytes, data area offset); lock-free. */
static PyObject *
heap_capacity(HeapObject *self, PyObject *Py_UNUSED(ignored))
{
    Ctx c;
    if (begin(self, &c, 0) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("KKK", (unsigned long long)(self->core.units * UNIT),
                                (unsigned long long)(self->core.max_units * UNIT),
                                (unsigned long long)self->core.data_off);
    end(&c);
    return r;
}

/* free(handle, timeout=None) */
static PyObject *
heap_free(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    if (handle_arg(args, nargs, 1, "free(handle, timeout=None)", &idx, &gen) < 0)
        return NULL;
    int64_t deadline = get_deadline(args, nargs, 1);
    if (deadline < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    if (lock(&c, deadline) < 0)
        goto out;
    if (h_free(&c, idx, gen) < 0)
        h_raise(self);
    else
        result = Py_NewRef(Py_None);
out:
    end(&c);
    return result;
}

/* realloc(handle, nbytes, zero, timeout=None) -> 0 done, or ROOM_SPLIT /
 * ROOM_SHORT as alloc() (nothing changed; the caller compacts or grows). */
static PyObject *
heap_realloc(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    unsigned long long n;
    if (handle_arg(args, nargs, 3, "realloc(handle, nbytes, zero, timeout=None)", &idx,
                   &gen) < 0 || u64_arg(args[1], &n) < 0)
        return NULL;
    int zero = PyObject_IsTrue(args[2]);
    int64_t deadline = get_deadline(args, nargs, 3);
    if (zero < 0 || deadline < 0)
        return NULL;
    Ctx c;
    uint32_t want = 0;
    if (begin_sized(self, &c, n, deadline, &want) < 0)
        return NULL;
    return end_sized(self, &c, h_realloc(&c, idx, gen, n, zero, want), 0);
}

/* size_of(handle) -> int, without the lock unless the block is changing. */
static PyObject *
heap_size_of(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    if (handle_arg(args, nargs, 1, "size_of(handle)", &idx, &gen) < 0 ||
        (nargs > 1 && shm_timeout_check(args[1]) < 0)) /* (read only if it must wait) */
        return NULL;
    Ctx c;
    if (begin(self, &c, 0) < 0)
        return NULL;
    PyObject *result = NULL;
    uint64_t n;
    int64_t deadline = -2; /* read when a wait begins */
    MappingObject *m = self->core.m;
    for (int tries = 0, idle = 0;; tries++) {
        int r = h_size_read(&c, idx, gen, &n);
        if (r < 0) {
            h_raise(self);
            goto out;
        }
        if (r == 0)
            break;
        if (tries <= 1000)
            continue;
        if (deadline == -2 && (deadline = get_deadline(args, nargs, 1)) < 0)
            goto out;
        if (m->token != 0) {
            /* a resize or a move in progress: wait for it under the lock */
            if (settle(self, &c, idx, deadline) < 0)
                goto out;
            tries = 0;
            continue;
        }
        /* Read-only: no lock to take, so watch it.  A live holder is
         * changing the block: wait for it, within the timeout.  With the
         * lock free, or its holder dead, the entry stays busy only if it
         * was damaged (a dead holder's change is undone by the next
         * writable handle to take the lock). */
        uint32_t held = __atomic_load_n((uint32_t *)(c.p + H_LOCK), __ATOMIC_RELAXED);
        int live = (held & SHM_TOKEN_MASK) != 0 && shm_token_alive(m, held & SHM_TOKEN_MASK);
        if (!live && ++idle > 200000) {
            if ((held & SHM_TOKEN_MASK) != 0)
                PyErr_Format(shm_state_of((PyObject *)self)->BusyError,
                             "heap %R: block %u was being changed by a process that died; "
                             "the next call of a writable handle undoes that change, or "
                             "`shmkit gc`", self->name, idx);
            else {
                shm_fail(HE_CORRUPT, "handle entry %u stays marked busy", idx);
                h_raise(self);
            }
            goto out;
        }
        if (deadline != SHM_FOREVER && shm_now_ns() >= deadline) {
            char who[SHM_HOLDER_PHRASE];
            if (live)
                shm_deadline_passed(shm_state_of((PyObject *)self)->Timeout,
                             "block %u of heap %R was still being changed at the timeout, "
                             "by %s; try again, or resume or end that process", idx,
                             self->name, shm_holder_phrase(m, held, who, sizeof who));
            else /* (damage is told only after the bounded look above) */
                shm_deadline_passed(shm_state_of((PyObject *)self)->Timeout,
                             "block %u of heap %R was still marked as being changed at the "
                             "timeout, with %s holding its lock; a writable handle's next "
                             "call repairs a change its maker died in", idx, self->name,
                             (held & SHM_TOKEN_MASK) != 0 ? "a dead process" : "nobody");
            goto out;
        }
        Py_BEGIN_ALLOW_THREADS
        usleep(50);
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0)
            goto out;
    }
    result = PyLong_FromUnsignedLongLong(n);
out:
    end(&c);
    return result;
}

/* ---- Pin objects ----------------------------------------------------------
 * What heap.pin() returns: holds one pin until release() (or the end of its
 * `with`, or its deallocation), and the memoryview of the block, which it
 * releases with the pin.  The view is a slice of the heap's memoryview of the
 * whole mapping, so it keeps the mapping alive by itself. */

typedef struct {
    PyObject_HEAD
    HeapObject *heap;
    PyObject *handle;   /* the Handle object (or None) */
    PyObject *view;     /* NULL once released */
    uint64_t value;
    uint32_t token;     /* attachment that holds the pin */
} PinObject;

static int unpin_idx(HeapObject *self, uint32_t idx, uint32_t token);

static PyObject *
new_pin(HeapObject *heap, PyObject *value, PyObject *handle, long long off, uint64_t n,
        uint32_t token)
{
    if (heap->mv == NULL) {
        PyErr_Format(shm_state_of((PyObject *)heap)->ClosedError,
                     "heap %R is closed in this process; open it again", heap->name);
        return NULL;
    }
    unsigned long long v;
    if (u64_arg(value, &v) < 0)
        return NULL;
    if ((uint64_t)off + n > (uint64_t)PyMemoryView_GET_BUFFER(heap->mv)->len) {
        /* the heap grew since the view was made: view the mapping anew (at
         * its length now, which begin() checked); pins of the old view keep it */
        PyObject *mv = PyMemoryView_FromObject(heap->mapping);
        if (mv == NULL)
            return NULL;
        Py_SETREF(heap->mv, mv);
    }
    PyObject *start = PyLong_FromLongLong(off);
    PyObject *stop = PyLong_FromLongLong(off + (long long)n);
    PyObject *slice = start && stop ? PySlice_New(start, stop, NULL) : NULL;
    Py_XDECREF(start);
    Py_XDECREF(stop);
    PyObject *view = slice ? PyObject_GetItem(heap->mv, slice) : NULL;
    Py_XDECREF(slice);
    if (view == NULL)
        return NULL;
    PinObject *pin = PyObject_New(PinObject, shm_state_of((PyObject *)heap)->Pin);
    if (pin == NULL) {
        Py_DECREF(view);
        return NULL;
    }
    pin->heap = (HeapObject *)Py_NewRef(heap);
    pin->handle = Py_NewRef(handle);
    pin->view = view;
    pin->value = v;
    pin->token = token;
    return (PyObject *)pin;
}

static int
pin_release_impl(PinObject *self)
{
    PyObject *view = self->view;
    if (view == NULL)
        return 0;
    self->view = NULL;
    PyObject *r = PyObject_CallMethod(view, "release", NULL);
    if (r == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError)) {
            Py_DECREF(view);
            return -1;
        }
        PyErr_Clear(); /* an array over it still exists; it keeps the mapping alive */
    }
    Py_XDECREF(r);
    Py_DECREF(view);
    return unpin_idx(self->heap, (uint32_t)self->value, self->token) < 0 ? -1 : 0;
}

static PyObject *
pin_release(PinObject *self, PyObject *Py_UNUSED(ignored))
{
    if (pin_release_impl(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
pin_get_view(PinObject *self, void *Py_UNUSED(c))
{
    if (self->view == NULL) {
        PyErr_SetString(PyExc_ValueError, "this pin was released");
        return NULL;
    }
    return Py_NewRef(self->view);
}

static PyObject *
pin_exit(PinObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return pin_release(self, NULL);
}

static PyObject *
pin_get_handle(PinObject *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->handle);
}

static PyObject *
pin_get_released(PinObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->view == NULL);
}

static PyObject *
pin_repr(PinObject *self)
{
    if (self->view == NULL)
        return PyUnicode_FromFormat("<shmkit.Pin %R released>", self->handle);
    return PyUnicode_FromFormat("<shmkit.Pin %R %zd bytes>", self->handle,
                                PyObject_Length(self->view));
}

static void
pin_dealloc(PinObject *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (pin_release_impl(self) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    PyErr_Restore(type, value, tb);
    Py_XDECREF(self->handle);
    Py_XDECREF(self->heap);
    shm_free_instance((PyObject *)self);
}

static PyMethodDef pin_methods[] = {
    {"release", (PyCFunction)pin_release, METH_NOARGS,
     "release($self, /)\n--\n\nUnpin the block and release the view.  Safe to call twice."},
    {"__enter__", (PyCFunction)pin_get_view, METH_NOARGS, "__enter__($self, /)\n--\n\n"
     "The block's memoryview."},
    {"__exit__", (PyCFunction)(void (*)(void))pin_exit, METH_FASTCALL, "__exit__($self, *exc_info)\n--\n\n"
     "Release the pin (as release())."},
    {NULL}
};

static PyGetSetDef pin_getset[] = {
    {"view", (getter)pin_get_view, NULL, "the block's memoryview (until released)", NULL},
    {"handle", (getter)pin_get_handle, NULL, "the pinned block's handle", NULL},
    {"released", (getter)pin_get_released, NULL, "True once released", NULL},
    {NULL}
};

static PyType_Slot pin_spec_slots[] = {
    {Py_tp_dealloc, pin_dealloc},
    {Py_tp_repr, pin_repr},
    {Py_tp_doc, "A pinned heap block: its bytes stay where they are until release().\n\n"
                "Made by Heap.pin(); `with heap.pin(h) as view:` gives the block's\n"
                "memoryview and releases the pin (and the view) at the end."},
    {Py_tp_methods, pin_methods},
    {Py_tp_getset, pin_getset},
    {0, NULL},
};

static PyType_Spec pin_spec = {
    .name = "shmkit.Pin",
    .basicsize = sizeof(PinObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = pin_spec_slots,
};

/* pin(value, timeout=None, handle=None) -> Pin.
 * Lock-free unless the block is being moved, freed or resized. */
static PyObject *
heap_pin(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    if (handle_arg(args, nargs, 1, "pin(handle, timeout=None)", &idx, &gen) < 0 ||
        (nargs > 1 && shm_timeout_check(args[1]) < 0)) /* (read only if it must wait) */
        return NULL;
    uint32_t me = self->core.m->token;
    if (me == 0 && (self->core.m->base == NULL || self->core.m->closing)) {
        PyErr_Format(shm_state_of((PyObject *)self)->ClosedError,
                     "heap %R is closed in this process; open it again", self->name);
        return NULL;
    }
    if (me == 0 || SHM_TOKEN_SLOT(me) >= self->core.max_slots) {
        PyErr_Format(shm_state_of((PyObject *)self)->ReadOnlyError,
                     "heap %R is open read-only here; pinning needs a writable "
                     "attachment", self->name);
        return NULL;
    }
    self->pinned = 1; /* before any pin can exist */
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    int64_t deadline = -2;
    for (;;) {
        uint64_t *rec = NULL, off = 0, n = 0;
        int r = h_pin_take(&c, idx, gen, me, &rec, &off, &n);
        if (r < 0) {
            h_raise(self);
            goto out;
        }
        if (r > 0) {
            /* being moved, freed or resized: wait for the holder of the lock */
            if (deadline == -2 && (deadline = get_deadline(args, nargs, 1)) < 0)
                goto out;
            if (settle(self, &c, idx, deadline) < 0)
                goto out;
            continue;
        }
        result = new_pin(self, args[0], nargs > 2 ? args[2] : Py_None,
                         self->core.hoff + (long long)off, n, me);
        if (result == NULL)
            drop_pin(&c, rec);
        break;
    }
out:
    end(&c);
    return result;
}

/* Drop one pin that the attachment named by `token` holds on entry idx:
 * 0 done, 1 none held, -1 error. */
static int
unpin_idx(HeapObject *self, uint32_t idx, uint32_t token)
{
    MappingObject *m = self->core.m;
    if (token == 0 || m->token != token || SHM_TOKEN_SLOT(token) >= self->core.max_slots)
        return 1; /* detached (or forked): its records died with the attachment */
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return -1;
    int r = h_unpin(&c, idx, token);
    end(&c);
    return r;
}

/* unpin(value): drop one pin this attachment holds on the handle's block
 * (for pins taken without a Pin object; Pin.release() does this itself). */
static PyObject *
heap_unpin(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    if (handle_arg(args, nargs, 1, "unpin(handle)", &idx, &gen) < 0)
        return NULL;
    int r = unpin_idx(self, idx, self->core.m->token);
    if (r < 0)
        return NULL;
    if (r > 0)
        return PyErr_Format(PyExc_RuntimeError, "Handle(index=%u, generation=%u) is not "
                            "pinned by this attachment of heap %R", idx, gen, self->name);
    Py_RETURN_NONE;
}

/* pins_held() -> int: pins this attachment holds. */
static PyObject *
heap_pins_held(HeapObject *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t me = self->core.m->token;
    if (!self->pinned || me == 0 || SHM_TOKEN_SLOT(me) >= self->core.max_slots)
        return PyLong_FromLong(0);
    Ctx c;
    if (begin(self, &c, 0) < 0)
        return NULL;
    uint64_t held = h_pins_held(&c, me);
    end(&c);
    return PyLong_FromUnsignedLongLong(held);
}

/* compact_step(restart, until_bytes, budget_bytes, timeout=None)
 *   -> (moved_bytes, moved_blocks, free_run_bytes, done, pinned_skipped)
 * Slides used blocks down over the free space before them, starting at the
 * shared cursor, until `budget_bytes` moved, a free run of `until_bytes`
 * formed at the cursor, or the end.  Holds the lock for one step only. */
static PyObject *
heap_compact_step(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3) {
        PyErr_SetString(PyExc_TypeError,
                        "compact_step(restart, until_bytes, budget_bytes, timeout=None)");
        return NULL;
    }
    int restart = PyObject_IsTrue(args[0]);
    unsigned long long until = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long budget = PyLong_AsUnsignedLongLong(args[2]);
    if (restart < 0 || PyErr_Occurred())
        return NULL;
    int64_t deadline = get_deadline(args, nargs, 3);
    if (deadline < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    HStep st = {0};
    if (lock(&c, deadline) < 0)
        goto out;
    if (h_compact_step(&c, restart, until, budget, &st) < 0)
        h_raise(self);
    else
        result = Py_BuildValue("KKKiK", st.moved, st.nmoved, st.run, st.done, st.skipped);
out:
    end(&c);
    return result;
}

static int
dict_set(PyObject *d, const char *key, unsigned long long v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return r;
}

/* stats(locked=True, timeout=None) -> dict */
static PyObject *
heap_stats(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int locked = nargs > 0 ? PyObject_IsTrue(args[0]) : 1;
    int64_t deadline = get_deadline(args, nargs, 1);
    if (locked < 0 || deadline < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, locked) < 0)
        return NULL;
    PyObject *d = NULL;
    HStats s;
    if (locked && lock(&c, deadline) < 0)
        goto out;
    if (h_stats(&c, locked, &s) < 0) {
        h_raise(self);
        goto out;
    }
    if ((d = PyDict_New()) == NULL)
        goto out;
    uint64_t largest = s.largest_units, free_b = s.free;
    uint64_t big = largest ? (largest - 1) * UNIT : 0;
    static const char *names[ST_COUNT] = {"allocs", "frees", "moves", "moved_bytes",
                                          "compactions", "recoveries", "reclaimed_pins",
                                          "reallocs"};
    if (dict_set(d, "size", self->core.units * UNIT) < 0 ||
        dict_set(d, "max_size", self->core.max_units * UNIT) < 0 ||
        dict_set(d, "used", s.used) < 0 ||
        dict_set(d, "free", free_b) < 0 ||
        dict_set(d, "blocks", s.blocks) < 0 ||
        dict_set(d, "free_blocks", s.free_blocks) < 0 ||
        dict_set(d, "pinned", (unsigned long long)s.pinned) < 0 ||
        dict_set(d, "max_blocks", self->core.max_blocks) < 0 ||
        dict_set(d, "handles_used", s.handles_used) < 0)
        goto fail;
    for (int i = 0; i < ST_COUNT; i++)
        if (dict_set(d, names[i], s.stat[i]) < 0)
            goto fail;
    if (s.have_largest) {
        double frag = free_b ? 1.0 - (double)(largest * UNIT) / (double)free_b : 0.0;
        PyObject *f = PyFloat_FromDouble(frag < 0 ? 0 : frag);
        if (dict_set(d, "largest_free", big) < 0 || f == NULL ||
            PyDict_SetItemString(d, "fragmentation", f) < 0) {
            Py_XDECREF(f);
            goto fail;
        }
        Py_DECREF(f);
    } else if (PyDict_SetItemString(d, "largest_free", Py_None) < 0 ||
               PyDict_SetItemString(d, "fragmentation", Py_None) < 0) {
        goto fail;
    }
    goto out;
fail:
    Py_CLEAR(d);
out:
    end(&c);
    return d;
}

/* verify(timeout=None) -> dict: check every invariant; CorruptError if one fails. */
static PyObject *
heap_verify(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t deadline = get_deadline(args, nargs, 0);
    if (deadline < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *d = NULL;
    HVerify v = {0};
    if (lock(&c, deadline) < 0)
        goto out;
    if (h_verify(&c, &v) < 0) {
        h_raise(self);
        goto out;
    }
    if ((d = PyDict_New()) == NULL)
        goto out;
    if (dict_set(d, "blocks", v.blocks) < 0 || dict_set(d, "free_blocks", v.free_blocks) < 0 ||
        dict_set(d, "used", v.used) < 0 || dict_set(d, "free", v.free) < 0 ||
        dict_set(d, "handles_used", v.handles_used) < 0 ||
        dict_set(d, "free_handles", v.free_handles) < 0 ||
        dict_set(d, "pinned", (unsigned long long)v.pinned) < 0)
        Py_CLEAR(d);
out:
    end(&c);
    return d;
}

/* where(handle) -> (unit, nbytes, pins): test and debugging aid */
static PyObject *
heap_where(HeapObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t idx, gen;
    if (handle_arg(args, nargs, 1, "where(handle)", &idx, &gen) < 0)
        return NULL;
    Ctx c;
    if (begin(self, &c, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    uint64_t unit, n;
    int64_t pins;
    if (lock(&c, SHM_FOREVER) < 0)
        goto out;
    if (h_where(&c, idx, gen, &unit, &n, &pins) < 0)
        h_raise(self);
    else
        result = Py_BuildValue("KKL", (unsigned long long)unit, (unsigned long long)n,
                               (long long)pins);
out:
    end(&c);
    return result;
}

/* ---- construction ------------------------------------------------------- */

/* After h_layout or h_format refused its arguments. */
static PyObject *
layout_error(void)
{
    PyErr_SetString(PyExc_ValueError, shm_err.msg);
    return NULL;
}

static PyObject *
heap_layout(PyObject *mod, PyObject *args)
{
    unsigned long long data, most, blocks, pins, slots;
    uint64_t now, plen;
    if (!PyArg_ParseTuple(args, "KKKKK", &data, &most, &blocks, &pins, &slots))
        return NULL;
    if (h_layout(data, most, blocks, pins, slots, &now, &plen) < 0)
        return layout_error();
    return Py_BuildValue("KK", (unsigned long long)now, (unsigned long long)plen);
}

/* heap_format(mapping, payload_offset, data_bytes, max_blocks, max_pins,
 * max_slots, salt): lay out an empty heap in a fresh (zeroed) payload. */
static PyObject *
heap_format(PyObject *mod, PyObject *args)
{
    PyObject *mapping;
    long long hoff;
    unsigned long long data, most, blocks, pins, slots, salt;
    uint64_t now, plen;
    if (!PyArg_ParseTuple(args, "O&LKKKKKK", shm_mapping_converter, &mapping, &hoff, &data, &most,
                          &blocks, &pins, &slots, &salt))
        return NULL;
    if (h_layout(data, most, blocks, pins, slots, &now, &plen) < 0)
        return layout_error();
    char *p = shm_span(mapping, hoff, now, 1);
    if (p == NULL)
        return NULL;
    if (h_format(p, data, most, blocks, pins, slots, salt) < 0)
        return layout_error();
    Py_RETURN_NONE;
}

static int
heapobj_init(HeapObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "offset", "length", "name", NULL};
    PyObject *mapping, *name;
    long long hoff;
    unsigned long long plen;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&LKO", kwlist, shm_mapping_converter, &mapping,
                                     &hoff, &plen, &name))
        return -1;
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->mapping, Py_NewRef(mapping));
    HCore *h = &self->core;
    h->m = (MappingObject *)mapping;
    h->nogil = heap_nogil;
    h->gil = heap_gil;
    const char *nm = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    if (nm == NULL)
        PyErr_Clear();
    snprintf(h->what, sizeof h->what, "heap '%.80s'", nm ? nm : "?");
    h->plen = plen;
    char *p;
    if (plen < HDR_BYTES || (p = shm_span(mapping, hoff, plen, 0)) == NULL) {
        if (!PyErr_Occurred()) {
            shm_fail(HE_CORRUPT, "its payload is only %llu bytes", plen);
            h_raise(self);
        }
        return -1;
    }
    if (h_bind(h, p, plen, hoff) < 0) {
        h_raise(self);
        return -1;
    }
    Py_XSETREF(self->mv, PyMemoryView_FromObject(mapping));
    return self->mv ? 0 : -1;
}

/* close(): release the view of the mapping (views of pins live on). */
static PyObject *
heap_close(HeapObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *mv = self->mv;
    self->mv = NULL;
    if (mv != NULL) {
        PyObject *r = PyObject_CallMethod(mv, "release", NULL);
        Py_DECREF(mv);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static void
heapobj_dealloc(HeapObject *self)
{
    Py_XDECREF(self->mv);
    Py_XDECREF(self->mapping);
    Py_XDECREF(self->name);
    shm_free_instance((PyObject *)self);
}

#define FAST(NAME, DOC) \
    {#NAME, (PyCFunction)(void (*)(void))heap_##NAME, METH_FASTCALL, DOC}

static PyMethodDef heapobj_methods[] = {
    FAST(alloc, "alloc($self, nbytes, zero, timeout=None, /)\n--\n\n"
     "alloc(nbytes, zero, timeout=None) -> handle, or -1 split up, -2 short"),
    FAST(put, "put($self, data, timeout=None, /)\n--\n\n"
     "put(data, timeout=None) -> handle of a block holding a copy of data, or -1 split\n"
     "up, -2 short"),
    FAST(free, "free($self, value, timeout=None, /)\n--\n\n"),
    FAST(realloc, "realloc($self, value, nbytes, zero, timeout=None, /)\n--\n\n"
     "realloc(handle, nbytes, zero, timeout=None) -> 0, or -1 split up, "
                  "-2 short"),
    FAST(grow, "grow($self, data_bytes, timeout=None, /)\n--\n\n"
     "grow(data_bytes, timeout=None) -> data bytes now (segment extended first)"),
    {"capacity", (PyCFunction)heap_capacity, METH_NOARGS,
     "capacity($self, /)\n--\n\ncapacity() -> (data bytes, max data bytes, data offset)"},
    FAST(size_of, "size_of($self, value, timeout=None, /)\n--\n\n"
     "size_of(handle) -> nbytes"),
    FAST(pin, "pin($self, value, timeout=None, handle=None, /)\n--\n\n"
     "pin(value, timeout=None, handle=None) -> Pin"),
    FAST(unpin, "unpin($self, value, /)\n--\n\n"),
    {"pins_held", (PyCFunction)heap_pins_held, METH_NOARGS, "pins_held($self, /)\n--\n\n"
     "pins_held() -> int"},
    FAST(compact_step, "compact_step($self, restart, until, budget, timeout=None, /)\n--\n\n"
     "compact_step(restart, until, budget, timeout=None) -> "
                       "(moved_bytes, moved_blocks, free_run, done, pinned_skipped)"),
    FAST(stats, "stats($self, locked=True, timeout=None, /)\n--\n\n"
     "stats(locked=True, timeout=None) -> dict"),
    FAST(verify, "verify($self, timeout=None, /)\n--\n\n"
     "verify(timeout=None) -> dict; CorruptError when an invariant fails"),
    FAST(where, "where($self, value, /)\n--\n\nwhere(handle) -> (unit, nbytes, live pins)"),
    {"close", (PyCFunction)heap_close, METH_NOARGS, "close($self, /)\n--\n\n"
     "close(): release the mapping's view"},
    {NULL}
};

static PyType_Slot heapcore_spec_slots[] = {
    {Py_tp_dealloc, heapobj_dealloc},
    {Py_tp_doc, "HeapCore(mapping, offset, length, name)\n--\n\n"
                "The metadata operations of the heap whose payload is at offset."},
    {Py_tp_methods, heapobj_methods},
    {Py_tp_init, heapobj_init},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec heapcore_spec = {
    .name = "shmkit._core.HeapCore",
    .basicsize = sizeof(HeapObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = heapcore_spec_slots,
};

static PyMethodDef heap_functions[] = {
    {"heap_layout", heap_layout, METH_VARARGS,
     "heap_layout($module, data_bytes, max_data_bytes, max_blocks, max_pins, max_slots, /)\n--\n\n"
     "heap_layout(data_bytes, max_data_bytes, max_blocks, max_pins, max_slots) -> "
     "(payload bytes, max payload bytes)"},
    {"heap_format", heap_format, METH_VARARGS,
     "heap_format($module, mapping, offset, data_bytes, max_data_bytes, max_blocks, max_pins, max_slots, salt, /)\n--\n\n"
     "max_slots, salt)"},
    {NULL}
};

int
shm_init_heap(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    if (PyModule_AddFunctions(module, heap_functions) < 0 ||
        shm_add_type(module, &pin_spec, &st->Pin) < 0 ||
        shm_add_type(module, &heapcore_spec, &st->HeapCore) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "HEAP_FORMAT", HEAP_FORMAT);
}
