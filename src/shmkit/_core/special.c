/* special.c - __enter__ and __exit__ that cost no allocation per with-block.
 *
 * CPython 3.11's `with` statement looks both methods up on the type and
 * binds each to the object: for a method of a C type that is a new bound
 * method per lookup, made, tracked by the cyclic collector and freed again,
 * twice per block.  That doubled the cost of `with lock:` over
 * acquire()/release().  A special descriptor binds to a Bound object taken
 * from a small free list instead: what is left is the interpreter's two
 * type lookups and the two calls.
 *
 * Bound holds a strong reference to its object, as a bound method does, so
 * `with Mutex(name):` keeps the lock alive to its __exit__; it is tracked by
 * the collector while in use, so a bound method stored in its own object's
 * __dict__ is collected like any other cycle. */
#include "shmkit.h"

#include <stddef.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *owner; /* the type whose dict holds it */
    const shm_special_def *def;
    shm_state *st; /* its module's (the module outlives it: its type holds it) */
} SpecialObject;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *self;
    const shm_special_def *def;
    shm_state *st; /* where it goes back to when freed */
} BoundObject;

/* Both types are the module's, and bound objects given back are kept for
 * the next binding in its state: one list per interpreter, each guarded by
 * its GIL.  Each object keeps a pointer to that state, so that a binding
 * and a free do not look it up. */

/* A call of def on self, bound or not: positional arguments only, at most
 * def->max_args of them. */
static PyObject *
special_call(const shm_special_def *def, PyObject *self, PyObject *const *args,
             Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_Format(PyExc_TypeError, "%s() takes no keyword arguments", def->name);
        return NULL;
    }
    if (def->max_args >= 0 && nargs > def->max_args) {
        PyErr_Format(PyExc_TypeError, "%s() takes no arguments (%zd given)", def->name, nargs);
        return NULL;
    }
    return def->fn(self, args, nargs);
}

static int
special_check_self(SpecialObject *d, PyObject *obj)
{
    if (d->owner != NULL && PyObject_TypeCheck(obj, d->owner))
        return 0;
    if (d->owner == NULL) {
        PyErr_Format(PyExc_TypeError, "descriptor '%s' is cleared", d->def->name);
        return -1;
    }
    PyErr_Format(PyExc_TypeError, "descriptor '%s' for '%s' objects doesn't apply to a '%s' object",
                 d->def->name, d->owner->tp_name, Py_TYPE(obj)->tp_name);
    return -1;
}

static PyObject *
bound_vectorcall(BoundObject *b, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (b->self == NULL) { /* cleared by the collector */
        PyErr_Format(PyExc_ReferenceError, "%s(): its object is gone", b->def->name);
        return NULL;
    }
    return special_call(b->def, b->self, args, PyVectorcall_NARGS(nargsf), kwnames);
}

/* Unbound: Lock.__exit__(lock, None, None, None). */
static PyObject *
special_vectorcall(SpecialObject *d, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n < 1) {
        PyErr_Format(PyExc_TypeError, "unbound method %s.%s() needs an argument",
                     d->owner->tp_name, d->def->name);
        return NULL;
    }
    if (special_check_self(d, args[0]) < 0)
        return NULL;
    return special_call(d->def, args[0], args + 1, n - 1, kwnames);
}

static PyObject *
special_get(SpecialObject *d, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(d);
    if (special_check_self(d, obj) < 0)
        return NULL;
    shm_state *st = d->st;
    BoundObject *b;
    if (st->BoundSpecial == NULL) { /* the module's state was cleared at exit */
        PyErr_SetString(PyExc_RuntimeError, "shmkit._core is being torn down");
        return NULL;
    }
    if (st->special_nspare > 0) {
        b = (BoundObject *)st->special_spare[--st->special_nspare];
        PyObject_Init((PyObject *)b, st->BoundSpecial); /* holds the type again */
    } else if ((b = PyObject_GC_New(BoundObject, st->BoundSpecial)) == NULL) {
        return NULL;
    }
    b->vectorcall = (vectorcallfunc)bound_vectorcall;
    b->self = Py_NewRef(obj);
    b->def = d->def;
    b->st = st;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static void
bound_dealloc(BoundObject *b)
{
    PyTypeObject *tp = Py_TYPE(b);
    PyObject_GC_UnTrack(b);
    Py_CLEAR(b->self);
    shm_state *st = b->st;
    if (st->special_nspare < SHM_SPECIAL_SPARE)
        st->special_spare[st->special_nspare++] = (PyObject *)b;
    else
        tp->tp_free(b);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

static int
bound_traverse(BoundObject *b, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(b));
    Py_VISIT(b->self);
    return 0;
}

static int
bound_clear(BoundObject *b)
{
    Py_CLEAR(b->self);
    return 0;
}

static PyObject *
bound_repr(BoundObject *b)
{
    if (b->self == NULL)
        return PyUnicode_FromFormat("<bound method %s>", b->def->name);
    return PyUnicode_FromFormat("<bound method %s of %R>", b->def->name, b->self);
}

static PyObject *
bound_richcompare(PyObject *a, PyObject *o, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !Py_IS_TYPE(o, Py_TYPE(a)))
        Py_RETURN_NOTIMPLEMENTED;
    BoundObject *x = (BoundObject *)a, *y = (BoundObject *)o;
    int eq = x->self == y->self && x->def == y->def;
    return PyBool_FromLong(op == Py_EQ ? eq : !eq);
}

static Py_hash_t
bound_hash(BoundObject *b)
{
#if PY_VERSION_HEX >= 0x030D0000
    Py_hash_t h = Py_HashPointer(b->self) ^ Py_HashPointer((void *)b->def);
#else
    Py_hash_t h = _Py_HashPointer(b->self) ^ _Py_HashPointer((void *)b->def);
#endif
    return h == -1 ? -2 : h;
}

static PyObject *
bound_get_name(BoundObject *b, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(b->def->name);
}

static PyObject *
bound_get_doc(BoundObject *b, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(b->def->doc);
}

static PyObject *
bound_get_self(BoundObject *b, void *Py_UNUSED(c))
{
    return Py_NewRef(b->self ? b->self : Py_None);
}

static PyGetSetDef bound_getset[] = {
    {"__name__", (getter)bound_get_name, NULL, NULL, NULL},
    {"__doc__", (getter)bound_get_doc, NULL, NULL, NULL},
    {"__self__", (getter)bound_get_self, NULL, NULL, NULL},
    {NULL},
};

static PyMemberDef bound_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(BoundObject, vectorcall), READONLY},
    {NULL},
};

static PyType_Slot bound_slots[] = {
    {Py_tp_dealloc, bound_dealloc},
    {Py_tp_traverse, bound_traverse},
    {Py_tp_clear, bound_clear},
    {Py_tp_repr, bound_repr},
    {Py_tp_richcompare, bound_richcompare},
    {Py_tp_hash, bound_hash},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_getset, bound_getset},
    {Py_tp_members, bound_members},
    {0, NULL},
};

static PyType_Spec bound_spec = {
    .name = "shmkit._core.bound_special",
    .basicsize = sizeof(BoundObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = bound_slots,
};

/* ---- the descriptor ---- */

static void
special_dealloc(SpecialObject *d)
{
    PyTypeObject *tp = Py_TYPE(d);
    PyObject_GC_UnTrack(d);
    Py_CLEAR(d->owner);
    tp->tp_free(d);
    Py_DECREF(tp);
}

static int
special_traverse(SpecialObject *d, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(d));
    Py_VISIT(d->owner);
    return 0;
}

static int
special_clear(SpecialObject *d)
{
    Py_CLEAR(d->owner);
    return 0;
}

static PyObject *
special_repr(SpecialObject *d)
{
    return PyUnicode_FromFormat("<method '%s' of '%s' objects>", d->def->name,
                                d->owner ? d->owner->tp_name : "?");
}

static PyObject *
special_get_name(SpecialObject *d, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(d->def->name);
}

static PyObject *
special_get_qualname(SpecialObject *d, void *Py_UNUSED(c))
{
    return PyUnicode_FromFormat("%s.%s", d->owner ? _PyType_Name(d->owner) : "?",
                                d->def->name);
}

static PyObject *
special_get_doc(SpecialObject *d, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(d->def->doc);
}

static PyObject *
special_get_signature(SpecialObject *d, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(d->def->text_signature);
}

static PyObject *
special_get_objclass(SpecialObject *d, void *Py_UNUSED(c))
{
    return Py_NewRef(d->owner ? (PyObject *)d->owner : Py_None);
}

static PyGetSetDef special_getset[] = {
    {"__name__", (getter)special_get_name, NULL, NULL, NULL},
    {"__qualname__", (getter)special_get_qualname, NULL, NULL, NULL},
    {"__doc__", (getter)special_get_doc, NULL, NULL, NULL},
    {"__text_signature__", (getter)special_get_signature, NULL, NULL, NULL},
    {"__objclass__", (getter)special_get_objclass, NULL, NULL, NULL},
    {NULL},
};

static PyMemberDef special_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(SpecialObject, vectorcall), READONLY},
    {NULL},
};

static PyType_Slot special_slots[] = {
    {Py_tp_dealloc, special_dealloc},
    {Py_tp_traverse, special_traverse},
    {Py_tp_clear, special_clear},
    {Py_tp_repr, special_repr},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_descr_get, special_get},
    {Py_tp_getset, special_getset},
    {Py_tp_members, special_members},
    {0, NULL},
};

static PyType_Spec special_spec = {
    .name = "shmkit._core.special_method",
    .basicsize = sizeof(SpecialObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = special_slots,
};

/* ---- a hold for one with-block, taken and let go in C ----
 *
 * hold(acquire, args, release, release_args, on_timeout, result): `with` it
 * calls acquire(*args); true: the block runs holding it (__enter__ returns
 * result) and __exit__ calls release(*release_args) once; false: __enter__
 * raises what on_timeout() returns.  A with-block written in Python (a generator's
 * contextmanager, an __enter__ that calls acquire() and returns) runs
 * bytecode between the hold and the block, where a Ctrl-C raised by a
 * signal handler leaves it held with no __exit__ to come.  Here nothing runs
 * between acquire returning and the block: acquire and release must be the
 * core's own methods. */

typedef struct {
    PyObject_HEAD
    PyObject *acquire, *args, *release, *release_args, *on_timeout, *result;
    int state; /* 0 made, 1 held, 2 done */
} HoldObject;

static PyObject *
hold_enter(PyObject *self, PyObject *const *Py_UNUSED(a), Py_ssize_t Py_UNUSED(n))
{
    HoldObject *h = (HoldObject *)self;
    if (h->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, "this hold was entered already; ask for another");
        return NULL;
    }
    PyObject *r = PyObject_Call(h->acquire, h->args, NULL);
    if (r == NULL)
        return NULL;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (got < 0)
        return NULL;
    if (!got) {
        h->state = 2;
        PyObject *e = PyObject_CallNoArgs(h->on_timeout);
        if (e != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(e), e);
            Py_DECREF(e);
        }
        return NULL;
    }
    h->state = 1;
    return Py_NewRef(h->result);
}

static PyObject *
hold_exit(PyObject *self, PyObject *const *Py_UNUSED(a), Py_ssize_t Py_UNUSED(n))
{
    HoldObject *h = (HoldObject *)self;
    if (h->state != 1)
        Py_RETURN_FALSE;
    h->state = 2;
    PyObject *r = PyObject_Call(h->release, h->release_args, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static const shm_special_def hold_specials[] = {
    {"__enter__", hold_enter, 0, "($self, /)", "Take the hold (or raise on timeout)."},
    {"__exit__", hold_exit, -1, "($self, *exc_info)", "Let the hold go."},
    {NULL},
};

static int
hold_traverse(HoldObject *h, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(h));
    Py_VISIT(h->acquire);
    Py_VISIT(h->args);
    Py_VISIT(h->release);
    Py_VISIT(h->release_args);
    Py_VISIT(h->on_timeout);
    Py_VISIT(h->result);
    return 0;
}

static int
hold_clear(HoldObject *h)
{
    Py_CLEAR(h->acquire);
    Py_CLEAR(h->args);
    Py_CLEAR(h->release);
    Py_CLEAR(h->release_args);
    Py_CLEAR(h->on_timeout);
    Py_CLEAR(h->result);
    return 0;
}

static void
hold_dealloc(HoldObject *h)
{
    PyTypeObject *tp = Py_TYPE(h);
    PyObject_GC_UnTrack(h);
    hold_clear(h);
    tp->tp_free(h);
    Py_DECREF(tp);
}

static PyType_Slot hold_slots[] = {
    {Py_tp_dealloc, hold_dealloc},
    {Py_tp_traverse, hold_traverse},
    {Py_tp_clear, hold_clear},
    {0, NULL},
};

static PyType_Spec hold_spec = {
    .name = "shmkit._core.Hold",
    .basicsize = sizeof(HoldObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = hold_slots,
};

static PyObject *
py_hold(PyObject *mod, PyObject *const *a, Py_ssize_t n)
{
    if (n != 6 || !PyTuple_Check(a[1]) || !PyTuple_Check(a[3])) {
        PyErr_SetString(PyExc_TypeError, "hold(acquire, args: tuple, release, "
                                         "release_args: tuple, on_timeout, result)");
        return NULL;
    }
    HoldObject *h = PyObject_GC_New(HoldObject, shm_mod_state(mod)->Hold);
    if (h == NULL)
        return NULL;
    h->acquire = Py_NewRef(a[0]);
    h->args = Py_NewRef(a[1]);
    h->release = Py_NewRef(a[2]);
    h->release_args = Py_NewRef(a[3]);
    h->on_timeout = Py_NewRef(a[4]);
    h->result = Py_NewRef(a[5]);
    h->state = 0;
    PyObject_GC_Track(h);
    return (PyObject *)h;
}

static PyMethodDef hold_fns[] = {
    {"hold", (PyCFunction)(void (*)(void))py_hold, METH_FASTCALL,
     "hold($module, acquire, args, release, release_args, on_timeout, result, /)\n--\n\n"
     "A with-block hold taken and let go in C: acquire(*args), else raise\n"
     "on_timeout(); __enter__ returns result; __exit__ calls release(*release_args)."},
    {NULL},
};

int
shm_init_special(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    st->Special = (PyTypeObject *)PyType_FromModuleAndSpec(module, &special_spec, NULL);
    st->BoundSpecial = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bound_spec, NULL);
    if (st->Special == NULL || st->BoundSpecial == NULL)
        return -1;
    st->Hold = (PyTypeObject *)PyType_FromModuleAndSpec(module, &hold_spec, NULL);
    if (st->Hold == NULL || shm_add_specials(module, st->Hold, hold_specials) < 0 ||
        PyModule_AddObjectRef(module, "Hold", (PyObject *)st->Hold) < 0)
        return -1;
    return PyModule_AddFunctions(module, hold_fns);
}

int
shm_add_specials(PyObject *module, PyTypeObject *tp, const shm_special_def *defs)
{
    shm_state *st = shm_mod_state(module);
    for (const shm_special_def *def = defs; def->name != NULL; def++) {
        SpecialObject *d = PyObject_GC_New(SpecialObject, st->Special);
        if (d == NULL)
            return -1;
        d->vectorcall = (vectorcallfunc)special_vectorcall;
        d->owner = (PyTypeObject *)Py_NewRef(tp);
        d->def = def;
        d->st = st;
        PyObject_GC_Track(d);
        int r = PyDict_SetItemString(tp->tp_dict, def->name, (PyObject *)d);
        Py_DECREF(d);
        if (r < 0)
            return -1;
    }
    PyType_Modified(tp);
    return 0;
}
