/* module.c - shmkit._core: registers each part of the compiled core. */
#include "shmkit.h"
#include "sync.h"
#include "layout.h"
#include "ring.h"

extern PyMethodDef shm_atomic_methods[];
extern PyMethodDef shm_futex_methods[];
extern PyMethodDef shm_attach_methods[];
extern PyMethodDef shm_event_methods[];
extern PyMethodDef shm_crash_methods[];
extern PyTypeObject Lock_Type;
int shm_init_table(PyObject *module);
int shm_init_heap(PyObject *module);
int shm_init_ring(PyObject *module);

static PyObject *
set_classes(PyObject *mod, PyObject *args)
{
    PyObject *owner_died, *corrupt, *timeout, *readonly = NULL, *closed = NULL;
    if (!PyArg_ParseTuple(args, "OOO|OO", &owner_died, &corrupt, &timeout, &readonly,
                          &closed))
        return NULL;
    if (readonly != NULL)
        Py_XSETREF(shm_ReadOnlyError, Py_NewRef(readonly));
    if (closed != NULL)
        Py_XSETREF(shm_ClosedError, Py_NewRef(closed));
    Py_XSETREF(shm_OwnerDiedWarning, Py_NewRef(owner_died));
    Py_XSETREF(shm_CorruptError, Py_NewRef(corrupt));
    Py_XSETREF(shm_TimeoutError, Py_NewRef(timeout));
    Py_RETURN_NONE;
}

/* _core.layouts: {"segment": {...}, "attach_entry": {...}, "ring": {...}}, each
 * field's byte offset plus "format_version" and "bytes" (its length). */
static int
put(PyObject *d, const char *key, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    int r = o == NULL ? -1 : PyDict_SetItemString(d, key, o);
    Py_XDECREF(o);
    return r;
}

#define OFF(d, type, field) put(d, #field, (long long)offsetof(type, field))

static PyObject *
make_layouts(void)
{
    PyObject *all = PyDict_New(), *seg = PyDict_New(), *ent = PyDict_New(),
             *ring = PyDict_New();
    int bad = all == NULL || seg == NULL || ent == NULL || ring == NULL;
    if (!bad) {
        typedef struct shm_segment_hdr S;
        bad = put(seg, "format_version", SHM_SEGMENT_FORMAT) < 0 ||
              put(seg, "bytes", SHM_HEADER_BYTES) < 0 ||
              OFF(seg, S, magic) < 0 || OFF(seg, S, version) < 0 || OFF(seg, S, kind) < 0 ||
              OFF(seg, S, flags) < 0 || OFF(seg, S, max_slots) < 0 ||
              OFF(seg, S, hdr_size) < 0 || OFF(seg, S, size) < 0 ||
              OFF(seg, S, max_size) < 0 || OFF(seg, S, created) < 0 ||
              OFF(seg, S, creator) < 0 || OFF(seg, S, lock) < 0 ||
              OFF(seg, S, resizes) < 0 || OFF(seg, S, hwm) < 0 ||
              OFF(seg, S, layout_len) < 0 || put(seg, "layout", SHM_LAYOUT_OFF) < 0 ||
              put(seg, "attach_table", SHM_HEADER_BYTES) < 0;
    }
    if (!bad) {
        typedef struct shm_attach_entry E;
        bad = put(ent, "format_version", SHM_SEGMENT_FORMAT) < 0 ||
              put(ent, "bytes", SHM_SLOT_SIZE) < 0 || OFF(ent, E, gen) < 0 ||
              OFF(ent, E, pid) < 0 || OFF(ent, E, attached) < 0 || OFF(ent, E, comm) < 0;
    }
    if (!bad) {
        typedef struct ring_hdr R;
        bad = put(ring, "format_version", RING_FORMAT) < 0 || put(ring, "bytes", RING_ROLES_OFF) < 0 ||
              OFF(ring, R, magic) < 0 || OFF(ring, R, format) < 0 || OFF(ring, R, cap) < 0 ||
              OFF(ring, R, data_off) < 0 || OFF(ring, R, max_items) < 0 ||
              OFF(ring, R, max_slots) < 0 || OFF(ring, R, closed) < 0 ||
              OFF(ring, R, tail) < 0 || OFF(ring, R, reserved) < 0 ||
              OFF(ring, R, plock) < 0 || OFF(ring, R, jp_sel) < 0 || OFF(ring, R, jp) < 0 ||
              OFF(ring, R, head) < 0 || OFF(ring, R, read) < 0 ||
              OFF(ring, R, received) < 0 || OFF(ring, R, dropped) < 0 ||
              OFF(ring, R, clock) < 0 || OFF(ring, R, jr_sel) < 0 ||
              OFF(ring, R, data_seq) < 0 || OFF(ring, R, data_sleepers) < 0 ||
              OFF(ring, R, space_seq) < 0 || OFF(ring, R, space_sleepers) < 0 ||
              OFF(ring, R, jr) < 0 || put(ring, "roles", RING_ROLES_OFF) < 0;
    }
    if (!bad)
        bad = PyDict_SetItemString(all, "segment", seg) < 0 ||
              PyDict_SetItemString(all, "attach_entry", ent) < 0 ||
              PyDict_SetItemString(all, "ring", ring) < 0;
    Py_XDECREF(seg);
    Py_XDECREF(ent);
    Py_XDECREF(ring);
    if (bad)
        Py_CLEAR(all);
    return all;
}

static PyMethodDef module_methods[] = {
    {"set_classes", set_classes, METH_VARARGS,
     "set_classes(OwnerDiedWarning, CorruptError, Timeout, ReadOnlyError=None, "
     "ClosedError=None): the exception "
     "classes the core raises (defined in Python)."},
    {NULL}
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "shmkit._core",
    "The compiled core of shmkit: mappings, atomics, futexes, robust locks.", -1,
    module_methods,
};

static int
add_functions(PyObject *module, PyMethodDef *defs)
{
    return PyModule_AddFunctions(module, defs);
}

PyMODINIT_FUNC
PyInit__core(void)
{
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    if (shm_init_mapping(m) < 0 || shm_init_sigbus(m) < 0 ||
        shm_init_lock(m) < 0 || shm_init_ring(m) < 0 ||
        shm_init_table(m) < 0 ||
        shm_init_heap(m) < 0 || shm_init_sync(m) < 0 ||
        add_functions(m, shm_atomic_methods) < 0 ||
        add_functions(m, shm_futex_methods) < 0 ||
        add_functions(m, shm_attach_methods) < 0 ||
        add_functions(m, shm_event_methods) < 0 ||
        add_functions(m, shm_crash_methods) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SHM_SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_LOCK_BASE", SHM_SLOT_LOCK_BASE) < 0 ||
        PyModule_AddIntConstant(m, "INIT_LOCK_BYTE", SHM_INIT_LOCK_BYTE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", SHM_MAX_SLOTS) < 0 ||
        PyModule_AddObject(m, "layouts", make_layouts()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* the topic (topictype.c): after the layouts, to which it adds its own */
    int shm_init_topic(PyObject *module);
    if (shm_init_topic(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
