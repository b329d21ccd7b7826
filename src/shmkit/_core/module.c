/* module.c - shmkit._core: registers each part of the compiled core. */
#include "shmkit.h"

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
    if (shm_init_mapping(m) < 0 || shm_init_lock(m) < 0 || shm_init_ring(m) < 0 ||
        shm_init_table(m) < 0 ||
        shm_init_heap(m) < 0 ||
        add_functions(m, shm_atomic_methods) < 0 ||
        add_functions(m, shm_futex_methods) < 0 ||
        add_functions(m, shm_attach_methods) < 0 ||
        add_functions(m, shm_event_methods) < 0 ||
        add_functions(m, shm_crash_methods) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SHM_SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_LOCK_BASE", SHM_SLOT_LOCK_BASE) < 0 ||
        PyModule_AddIntConstant(m, "INIT_LOCK_BYTE", SHM_INIT_LOCK_BYTE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", SHM_MAX_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
