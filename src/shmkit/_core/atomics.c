/* atomics.c - sequentially consistent atomics on shared words.
 *
 *   load32(m, off) / load64      -> int   (acquire)
 *   store32(m, off, v) / store64          (release)
 *   cas32(m, off, expected, new) / cas64 -> bool
 *   add32(m, off, delta) / add64  -> previous value (wraps)
 *
 * Each call checks bounds and natural alignment of the offset.
 */
#include "shmkit.h"

static int
parse_off(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *sig,
          long long *off)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %s", sig);
        return -1;
    }
    *off = PyLong_AsLongLong(args[1]);
    return (*off == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
as_u64(PyObject *o, uint64_t *v)
{
    /* Accept negative numbers as two's complement so deltas can be signed. */
    unsigned long long u = PyLong_AsUnsignedLongLongMask(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *v = u;
    return 0;
}

#define DEFINE_ATOMICS(BITS, T)                                                        \
    static PyObject *py_load##BITS(PyObject *mod, PyObject *const *a, Py_ssize_t n)    \
    {                                                                                  \
        long long off;                                                                 \
        if (parse_off(a, n, 2, "load" #BITS "(mapping, offset)", &off) < 0)            \
            return NULL;                                                               \
        T *p = shm_addr(a[0], off, sizeof(T), 0);                                      \
        if (p == NULL)                                                                 \
            return NULL;                                                               \
        return PyLong_FromUnsignedLongLong(__atomic_load_n(p, __ATOMIC_ACQUIRE));      \
    }                                                                                  \
    static PyObject *py_store##BITS(PyObject *mod, PyObject *const *a, Py_ssize_t n)   \
    {                                                                                  \
        long long off;                                                                 \
        uint64_t v;                                                                    \
        if (parse_off(a, n, 3, "store" #BITS "(mapping, offset, value)", &off) < 0 ||  \
            as_u64(a[2], &v) < 0)                                                      \
            return NULL;                                                               \
        T *p = shm_addr(a[0], off, sizeof(T), 1);                                      \
        if (p == NULL)                                                                 \
            return NULL;                                                               \
        __atomic_store_n(p, (T)v, __ATOMIC_RELEASE);                                   \
        Py_RETURN_NONE;                                                                \
    }                                                                                  \
    static PyObject *py_cas##BITS(PyObject *mod, PyObject *const *a, Py_ssize_t n)     \
    {                                                                                  \
        long long off;                                                                 \
        uint64_t e, v;                                                                 \
        if (parse_off(a, n, 4, "cas" #BITS "(mapping, offset, expected, new)", &off) < \
                0 ||                                                                   \
            as_u64(a[2], &e) < 0 || as_u64(a[3], &v) < 0)                              \
            return NULL;                                                               \
        T *p = shm_addr(a[0], off, sizeof(T), 1);                                      \
        if (p == NULL)                                                                 \
            return NULL;                                                               \
        T expected = (T)e;                                                             \
        return PyBool_FromLong(__atomic_compare_exchange_n(                            \
            p, &expected, (T)v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));               \
    }                                                                                  \
    static PyObject *py_add##BITS(PyObject *mod, PyObject *const *a, Py_ssize_t n)     \
    {                                                                                  \
        long long off;                                                                 \
        uint64_t d;                                                                    \
        if (parse_off(a, n, 3, "add" #BITS "(mapping, offset, delta)", &off) < 0 ||    \
            as_u64(a[2], &d) < 0)                                                      \
            return NULL;                                                               \
        T *p = shm_addr(a[0], off, sizeof(T), 1);                                      \
        if (p == NULL)                                                                 \
            return NULL;                                                               \
        return PyLong_FromUnsignedLongLong(                                            \
            __atomic_fetch_add(p, (T)d, __ATOMIC_SEQ_CST));                            \
    }

DEFINE_ATOMICS(32, uint32_t)
DEFINE_ATOMICS(64, uint64_t)

#define ENTRY(NAME, DOC) \
    {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, DOC}

PyMethodDef shm_atomic_methods[] = {
    ENTRY(load32, "load32($module, mapping, offset, /)\n--\n\n"
     "load32(mapping, offset) -> int: acquire load of a u32"),
    ENTRY(load64, "load64($module, mapping, offset, /)\n--\n\n"
     "load64(mapping, offset) -> int: acquire load of a u64"),
    ENTRY(store32, "store32($module, mapping, offset, value, /)\n--\n\n"
     "store32(mapping, offset, value): release store of a u32"),
    ENTRY(store64, "store64($module, mapping, offset, value, /)\n--\n\n"
     "store64(mapping, offset, value): release store of a u64"),
    ENTRY(cas32, "cas32($module, mapping, offset, expected, new, /)\n--\n\n"
     "cas32(mapping, offset, expected, new) -> bool"),
    ENTRY(cas64, "cas64($module, mapping, offset, expected, new, /)\n--\n\n"
     "cas64(mapping, offset, expected, new) -> bool"),
    ENTRY(add32, "add32($module, mapping, offset, delta, /)\n--\n\n"
     "add32(mapping, offset, delta) -> previous u32 (wraps)"),
    ENTRY(add64, "add64($module, mapping, offset, delta, /)\n--\n\n"
     "add64(mapping, offset, delta) -> previous u64 (wraps)"),
    {NULL}
};
