/* sync.c - what the sync primitives share (declared in sync.h): the scan of
 * per-slot counters, the Python handle's init and dealloc, and argument
 * parsing. */
#include "sync.h"

int
shm_sync_scan(const shm_sync_view *v, shm_slot_visit visit, void *ctx)
{
    for (uint32_t slot = 0; slot < v->m->max_slots; slot++) {
        uint64_t *e = shm_sync_entry(v, slot);
        uint64_t val = __atomic_load_n(e, __ATOMIC_SEQ_CST);
        if (SHM_SLOT_ENTRY_COUNT(val) == 0)
            continue;
        int r = visit(ctx, slot, e, val,
                      shm_token_alive(v->m, shm_slot_entry_token(val, slot)));
        if (r != 0)
            return r;
    }
    return 0;
}

/* ---- the Python handle ---- */

int
shm_sync_handle_init(shm_sync_handle *h, PyObject *args, PyObject *kwds,
                     const char *default_what, uint64_t table, const char *kind, char **b)
{
    static char *kwlist[] = {"mapping", "offset", "what", NULL};
    PyObject *mapping, *what = NULL;
    long long offset;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&L|U", kwlist, shm_mapping_converter,
                                     &mapping, &offset, &what))
        return -1;
    char *p;
    if (table == 0)
        p = shm_addr(mapping, offset, 4, 0);
    else if (kind != NULL && (offset < 0 || offset % 8 != 0)) {
        PyErr_Format(PyExc_ValueError, "a %s's offset must be a multiple of 8, not %lld",
                     kind, offset);
        return -1;
    }
    else
        p = shm_span(mapping, offset, shm_sync_footprint((MappingObject *)mapping, table),
                          0);
    if (p == NULL)
        return -1;
    what = what ? Py_NewRef(what) : PyUnicode_FromString(default_what);
    if (what == NULL)
        return -1;
    const char *s = PyUnicode_AsUTF8(what);
    if (s == NULL) {
        Py_DECREF(what);
        return -1;
    }
    Py_XSETREF(h->mapping, Py_NewRef(mapping));
    Py_XSETREF(h->what, what);
    h->what_s = s;
    h->offset = offset;
    if (b != NULL)
        *b = p;
    return 0;
}

void
shm_sync_handle_dealloc(PyObject *self)
{
    shm_sync_handle *h = (shm_sync_handle *)self;
    Py_XDECREF(h->mapping);
    Py_XDECREF(h->what);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

PyObject *
shm_sync_footprint_of(PyObject *max_slots, uint64_t table)
{
    long long n = PyLong_AsLongLong(max_slots);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLongLong((long long)table + 8 * n);
}

int
shm_sync_acquired(PyObject *self, int held, PyCFunction release)
{
    if (held <= 0)
        return held;
    shm_crash_point("sync.acquired");
    if (PyErr_CheckSignals() == 0)
        return held;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *done = release(self, NULL);
    if (done == NULL)
        PyErr_Clear(); /* (a damaged word, reported by the next acquire) */
    Py_XDECREF(done);
    PyErr_Restore(et, ev, tb);
    return -1;
}

/* ---- arguments ---- */

int64_t
shm_sync_deadline(PyObject *blocking_obj, PyObject *timeout)
{
    int blocking = blocking_obj ? PyObject_IsTrue(blocking_obj) : 1;
    if (blocking < 0)
        return -1;
    if (!blocking)
        return shm_nowait_timeout_check(timeout, "acquire()", "blocking") < 0 ? -1 : 0;
    return shm_lock_deadline(timeout);
}

int
shm_sync_parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       const char *sig, PyObject **blocking, PyObject **timeout)
{
    *blocking = nargs > 0 ? args[0] : NULL;
    *timeout = nargs > 1 ? args[1] : Py_None;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s takes at most 2 positional arguments", sig);
        return -1;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "blocking") == 0 && nargs < 1)
            *blocking = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && nargs < 2)
            *timeout = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError, "%s got an unexpected or repeated argument %R",
                         sig, key);
            return -1;
        }
    }
    return 0;
}
