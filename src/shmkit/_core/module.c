/* module.c - shmkit._core: registers each part of the compiled core. */
#include "shmkit.h"
#include "sync.h"
#include "layout.h"
#include "ring.h"

extern PyMethodDef shm_atomic_methods[];
extern PyMethodDef shm_futex_methods[];
extern PyMethodDef shm_attach_methods[];
extern PyMethodDef shm_open_methods[];
extern PyMethodDef shm_event_methods[];
extern PyMethodDef shm_crash_methods[];
extern PyMethodDef shm_gate_methods[];
extern PyMethodDef shm_fork_methods[];
extern PyMethodDef shm_mapping_methods[];
int shm_init_table(PyObject *module);
int shm_init_heap(PyObject *module);
int shm_init_ring(PyObject *module);
int shm_init_queue(PyObject *module); /* queuetype.c */
int shm_init_waitset(PyObject *module); /* waitset.c: after shm_init_ring */
int shm_init_topic(PyObject *module);
int shm_init_fork(PyObject *module);

/* _core.layouts: {"segment": {...}, "attach_entry": {...}, "ring": {...}}, each
 * field's byte offset plus "format_version" and "bytes" (its length). */
typedef struct {
    const char *name;
    long long v;
} Field;

#define OFF(type, field) {#field, (long long)offsetof(type, field)}

static const Field segment_fields[] = {
    {"format_version", SHM_SEGMENT_FORMAT}, {"bytes", SHM_HEADER_BYTES},
    OFF(struct shm_segment_hdr, magic), OFF(struct shm_segment_hdr, version),
    OFF(struct shm_segment_hdr, kind), OFF(struct shm_segment_hdr, flags),
    OFF(struct shm_segment_hdr, max_slots), OFF(struct shm_segment_hdr, hdr_size),
    OFF(struct shm_segment_hdr, size), OFF(struct shm_segment_hdr, max_size),
    OFF(struct shm_segment_hdr, created), OFF(struct shm_segment_hdr, creator),
    OFF(struct shm_segment_hdr, lock), OFF(struct shm_segment_hdr, resizes),
    OFF(struct shm_segment_hdr, hwm), OFF(struct shm_segment_hdr, layout_len),
    {"layout", SHM_LAYOUT_OFF}, {"attach_table", SHM_HEADER_BYTES}, {NULL, 0}};

static const Field entry_fields[] = {
    {"format_version", SHM_SEGMENT_FORMAT}, {"bytes", SHM_SLOT_SIZE},
    OFF(struct shm_attach_entry, gen), OFF(struct shm_attach_entry, pid),
    OFF(struct shm_attach_entry, attached), OFF(struct shm_attach_entry, comm), {NULL, 0}};

static const Field ring_fields[] = {
    {"format_version", RING_FORMAT}, {"bytes", RING_ROLES_OFF},
    OFF(struct ring_hdr, magic), OFF(struct ring_hdr, format), OFF(struct ring_hdr, cap),
    OFF(struct ring_hdr, data_off), OFF(struct ring_hdr, max_items),
    OFF(struct ring_hdr, max_slots), OFF(struct ring_hdr, closed), OFF(struct ring_hdr, tail),
    OFF(struct ring_hdr, reserved), OFF(struct ring_hdr, plock), OFF(struct ring_hdr, jp_sel),
    OFF(struct ring_hdr, jp), OFF(struct ring_hdr, head), OFF(struct ring_hdr, read),
    OFF(struct ring_hdr, received), OFF(struct ring_hdr, dropped), OFF(struct ring_hdr, clock),
    OFF(struct ring_hdr, jr_sel), OFF(struct ring_hdr, returned),
    OFF(struct ring_hdr, redelivered), OFF(struct ring_hdr, data_seq),
    OFF(struct ring_hdr, data_sleepers), OFF(struct ring_hdr, space_seq),
    OFF(struct ring_hdr, space_sleepers), OFF(struct ring_hdr, jr),
    {"roles", RING_ROLES_OFF}, {NULL, 0}};

static const struct {
    const char *name;
    const Field *fields;
} layout_list[] = {{"segment", segment_fields}, {"attach_entry", entry_fields}, {"ring", ring_fields}};

/* {name: value} of a NULL-terminated list of fields. */
static PyObject *
fields_dict(const Field *f)
{
    PyObject *d = PyDict_New();
    for (; d != NULL && f->name != NULL; f++) {
        PyObject *o = PyLong_FromLongLong(f->v);
        if (o == NULL || PyDict_SetItemString(d, f->name, o) < 0)
            Py_CLEAR(d);
        Py_XDECREF(o);
    }
    return d;
}

static PyObject *
make_layouts(void)
{
    PyObject *all = PyDict_New();
    for (size_t i = 0; all != NULL && i < sizeof layout_list / sizeof layout_list[0]; i++) {
        PyObject *d = fields_dict(layout_list[i].fields);
        if (d == NULL || PyDict_SetItemString(all, layout_list[i].name, d) < 0)
            Py_CLEAR(all);
        Py_XDECREF(d);
    }
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
    X(InvalidKeyError, "InvalidKeyError")                                         \
    X(StaleHandleError, "StaleHandleError") X(PinnedError, "PinnedError")         \
    X(HeapFullError, "HeapFullError") X(ChannelClosed, "_ChannelEnded")           \
    X(MessageTooLarge, "MessageTooLarge") X(Empty, "Empty") X(Full, "Full")        \
    X(SendersGone, "SendersGone") X(MessagesLost, "MessagesLost")                \
    X(SizeLimitError, "SizeLimitError") X(ShmkitError, "ShmkitError")

#define TYPES(X)                                                                  \
    X(Mapping) X(Lock) X(RWLock) X(Semaphore) X(Ring) X(RecordView) X(Loan) X(Table)\
    X(View) X(HeapCore) X(Pin) X(Topic) X(TopicSubscriber) X(TopicView) X(Special)     \
    X(BoundSpecial) X(TableBatch) X(QueueCore) X(Hold)

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
    while (st->special_nspare > 0)
        PyObject_GC_Del(st->special_spare[--st->special_nspare]);
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

void
shm_free_instance(PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    tp->tp_free(obj);
    Py_DECREF(tp); /* a heap type: its instances hold it */
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
    if (shm_init_mapping(m) < 0 || shm_init_sigbus(m) < 0 || shm_init_special(m) < 0 ||
        shm_init_lock(m) < 0 || shm_init_ring(m) < 0 || shm_init_queue(m) < 0 ||
        shm_init_table(m) < 0 ||
        shm_init_heap(m) < 0 || shm_init_sync(m) < 0 || shm_init_fork(m) < 0 ||
        add_functions(m, shm_atomic_methods) < 0 ||
        add_functions(m, shm_futex_methods) < 0 ||
        add_functions(m, shm_attach_methods) < 0 ||
        add_functions(m, shm_open_methods) < 0 ||
        add_functions(m, shm_event_methods) < 0 ||
        add_functions(m, shm_crash_methods) < 0 ||
        add_functions(m, shm_gate_methods) < 0 ||
        add_functions(m, shm_fork_methods) < 0 ||
        add_functions(m, shm_mapping_methods) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SHM_SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_LOCK_BASE", SHM_SLOT_LOCK_BASE) < 0 ||
        PyModule_AddIntConstant(m, "INIT_LOCK_BYTE", SHM_INIT_LOCK_BYTE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", SHM_MAX_SLOTS) < 0 ||
        PyModule_AddObject(m, "MAX_RESERVE", PyLong_FromUnsignedLongLong(SHM_MAX_RESERVE)) < 0)
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
