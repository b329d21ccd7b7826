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
int shm_init_table(PyObject *module);
int shm_init_heap(PyObject *module);
int shm_init_ring(PyObject *module);
int shm_init_waitset(PyObject *module); /* waitset.c: after shm_init_ring */
int shm_init_topic(PyObject *module);

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

/* ---- module state ---------------------------------------------------------- */

/* The classes the core raises, from shmkit.errors: state field, name there. */
#define ERROR_CLASSES(X)                                                          \
    X(OwnerDiedWarning, "OwnerDiedWarning") X(CorruptError, "CorruptError")       \
    X(Timeout, "Timeout") X(ReadOnlyError, "ReadOnlyError")                       \
    X(ClosedError, "ClosedError") X(KeyExistsError, "KeyExistsError")             \
    X(UnsupportedTypeError, "UnsupportedTypeError")                               \
    X(ValueTooLargeError, "ValueTooLargeError") X(BusyError, "BusyError")         \
    X(StaleHandleError, "StaleHandleError") X(PinnedError, "PinnedError")         \
    X(HeapFullError, "HeapFullError") X(ChannelClosed, "_ChannelEnded")           \
    X(MessageTooLarge, "MessageTooLarge") X(Empty, "Empty") X(Full, "Full")        \
    X(SendersGone, "SendersGone") X(MessagesLost, "MessagesLost")

#define TYPES(X)                                                                  \
    X(Mapping) X(Lock) X(RWLock) X(Semaphore) X(Ring) X(RecordView) X(Table)      \
    X(View) X(HeapCore) X(Pin) X(Topic) X(TopicSubscriber) X(TopicView)

static int
core_traverse(PyObject *m, visitproc visit, void *arg)
{
    shm_state *st = shm_mod_state(m);
#define VISIT_EXC(F, N) Py_VISIT(st->F);
#define VISIT_TYPE(T) Py_VISIT(st->T);
    ERROR_CLASSES(VISIT_EXC)
    TYPES(VISIT_TYPE)
    return 0;
}

static int
core_clear(PyObject *m)
{
    shm_state *st = shm_mod_state(m);
#define CLEAR_EXC(F, N) Py_CLEAR(st->F);
#define CLEAR_TYPE(T) Py_CLEAR(st->T);
    ERROR_CLASSES(CLEAR_EXC)
    TYPES(CLEAR_TYPE)
    return 0;
}

static void
core_free(void *m)
{
    core_clear((PyObject *)m);
}

/* Import the error classes once.  shmkit.errors imports nothing of shmkit
 * (shmkit/__init__ imports this module, so errors must not import it). */
static int
load_errors(shm_state *st)
{
    PyObject *errors = PyImport_ImportModule("shmkit.errors");
    if (errors == NULL)
        return -1;
    int bad = 0;
#define LOAD_EXC(F, N) \
    if (!bad && (st->F = PyObject_GetAttrString(errors, N)) == NULL) \
        bad = 1;
    ERROR_CLASSES(LOAD_EXC)
    Py_DECREF(errors);
    return bad ? -1 : 0;
}

shm_state *
shm_state_of(PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *mod = PyType_GetModuleByDef(tp, &shm_module);
#else
    /* PyType_GetModuleByDef, which 3.11 added: the first heap type in the
     * MRO made by this module */
    PyObject *mod = NULL, *mro = tp->tp_mro;
    for (Py_ssize_t i = 0; mro != NULL && i < PyTuple_GET_SIZE(mro) && mod == NULL; i++) {
        PyTypeObject *b = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if ((b->tp_flags & Py_TPFLAGS_HEAPTYPE) && ((PyHeapTypeObject *)b)->ht_module &&
            PyModule_GetDef(((PyHeapTypeObject *)b)->ht_module) == &shm_module)
            mod = ((PyHeapTypeObject *)b)->ht_module;
    }
#endif
    if (mod == NULL) {
        PyErr_Clear();
        Py_FatalError("shmkit._core: an object of another module reached the core");
    }
    return shm_mod_state(mod);
}

int
shm_add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **slot)
{
    PyObject *tp = PyType_FromModuleAndSpec(module, spec, NULL);
    if (tp == NULL)
        return -1;
    *slot = (PyTypeObject *)tp;
    return PyModule_AddType(module, (PyTypeObject *)tp);
}


static int
add_functions(PyObject *module, PyMethodDef *defs)
{
    return PyModule_AddFunctions(module, defs);
}

/* The exec slot (PEP 489): state, types, functions and constants. */
static int
core_exec(PyObject *m)
{
    if (load_errors(shm_mod_state(m)) < 0)
        return -1;
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
        PyModule_AddIntConstant(m, "MAX_SLOTS", SHM_MAX_SLOTS) < 0)
        return -1;
    PyObject *layouts = make_layouts();
    if (layouts == NULL || PyModule_AddObject(m, "layouts", layouts) < 0) {
        Py_XDECREF(layouts);
        return -1;
    }
    if (shm_init_waitset(m) < 0)
        return -1;
    /* the topic (topictype.c): after the layouts, to which it adds its own */
    if (shm_init_topic(m) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

struct PyModuleDef shm_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmkit._core",
    .m_doc = "The compiled core of shmkit: mappings, atomics, futexes, robust locks.",
    .m_size = sizeof(shm_state),
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&shm_module);
}
