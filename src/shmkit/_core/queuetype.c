/* queuetype.c - QueueCore: shmkit.Queue's get, one call of the core.
 *
 * shmkit.Queue is a Python class on this base.  Its get takes the next
 * message of the queue's channel, rebuilds the object while the message is
 * still there, and only then finishes it (ringtype.c, decode_lent): an
 * interrupt during the rebuild gives the message back.
 *
 * Being the method itself, not a call inside a Python method, matters
 * twice.  Python handles a signal that came during a call as the call
 * returns, in the calling frame: here that frame is the user's, and the
 * check just before returning (take_or_keep) runs the handler first, while
 * the object can still be kept for this handle's next get.  And an object
 * costs no Python frame of the queue's own. */
#include "msgtype.h"
#include "ring.h"

typedef struct {
    PyObject_HEAD
    PyObject *ring;      /* the queue's channel (a Ring); NULL when not bound */
    PyObject *decode[2]; /* pickle.loads; the unpacker of a big object's header */
    PyObject *kept;      /* list: objects taken, then an interrupt came before they were
                          * returned; the next gets return them first.  NULL if none yet */
} QueueCoreObject;

/* The first kept object, or NULL (no error) if none. */
static PyObject *
pop_kept(QueueCoreObject *q)
{
    if (q->kept == NULL || PyList_GET_SIZE(q->kept) == 0)
        return NULL;
    PyObject *obj = Py_NewRef(PyList_GET_ITEM(q->kept, 0));
    if (PyList_SetSlice(q->kept, 0, 1, NULL) < 0) { /* cannot fail: shrinking */
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

/* A signal handled here, after the message was finished, raises in this
 * call, which keeps the object: the handle's next get returns it.  Past
 * this check only the return is left (what any call's result risks). */
static PyObject *
take_or_keep(QueueCoreObject *q, PyObject *obj)
{
    if (PyErr_CheckSignals() == 0)
        return obj;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (q->kept == NULL)
        q->kept = PyList_New(0);
    if (q->kept == NULL || PyList_Append(q->kept, obj) < 0)
        PyErr_Clear(); /* no memory even for this: the object is lost */
    Py_DECREF(obj);
    PyErr_Restore(et, ev, tb);
    return NULL;
}

/* The receive behind get, get_nowait and _get_one.  With
 * empty_on_timeout (get), a timeout raises Empty naming the queue. */
static PyObject *
queue_get(QueueCoreObject *q, PyObject *timeout, int nowait, int empty_on_timeout)
{
    PyObject *obj = pop_kept(q);
    if (obj != NULL || PyErr_Occurred())
        return obj;
    if (q->ring == NULL) {
        PyErr_Format(PyExc_ValueError, "Queue %R is closed", (PyObject *)q);
        return NULL;
    }
    /* held for the call: another thread may close the queue meanwhile */
    PyObject *ring = Py_NewRef(q->ring);
    PyObject *decode[2] = {Py_NewRef(q->decode[0]), Py_NewRef(q->decode[1])};
    obj = ring_get_decoded((RingObject *)ring, timeout, nowait, decode);
    if (obj == NULL && empty_on_timeout && PyErr_ExceptionMatches(RING_ST(ring)->Timeout)) {
        PyErr_Clear();
        PyErr_Format(RING_ST(ring)->Empty, "queue %R stayed empty for %S s",
                     ((RingObject *)ring)->name, timeout);
    }
    Py_DECREF(decode[0]);
    Py_DECREF(decode[1]);
    Py_DECREF(ring);
    return obj == NULL ? NULL : take_or_keep(q, obj);
}

static PyObject *
QueueCore_get(QueueCoreObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"block", "timeout", NULL};
    PyObject *a[2];
    if (nargs == 0 && kw == NULL)
        return queue_get(q, NULL, 0, 1);
    if (msg_parse_args("get", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int block = a[0] ? PyObject_IsTrue(a[0]) : 1;
    if (block < 0)
        return NULL;
    return queue_get(q, a[1], !block, 1);
}

static PyObject *
QueueCore_get_nowait(QueueCoreObject *q, PyObject *Py_UNUSED(ignored))
{
    return queue_get(q, NULL, 1, 0);
}

static PyObject *
QueueCore_get_one(QueueCoreObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "nowait", NULL};
    PyObject *a[2];
    if (msg_parse_args("_get_one", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int nowait = a[1] ? PyObject_IsTrue(a[1]) : 1;
    if (nowait < 0)
        return NULL;
    return queue_get(q, a[0], nowait, 0);
}

/* _bind(ring, loads, unpack): what get receives from and decodes with. */
static PyObject *
QueueCore_bind(QueueCoreObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "_bind() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], shm_state_of((PyObject *)q)->Ring)) {
        PyErr_Format(PyExc_TypeError, "_bind() needs a Ring, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    if (!PyCallable_Check(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "_bind() needs two callables, loads and unpack");
        return NULL;
    }
    Py_XSETREF(q->ring, Py_NewRef(args[0]));
    Py_XSETREF(q->decode[0], Py_NewRef(args[1]));
    Py_XSETREF(q->decode[1], Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* _unbind(): get raises "closed" from now on; what was kept goes. */
static PyObject *
QueueCore_unbind(QueueCoreObject *q, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(q->ring);
    Py_CLEAR(q->kept);
    Py_RETURN_NONE;
}

static PyObject *
QueueCore_get_kept(QueueCoreObject *q, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(q->kept == NULL ? 0 : PyList_GET_SIZE(q->kept));
}

static int
QueueCore_traverse(QueueCoreObject *q, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(q));
    Py_VISIT(q->ring);
    Py_VISIT(q->decode[0]);
    Py_VISIT(q->decode[1]);
    Py_VISIT(q->kept);
    return 0;
}

static int
QueueCore_clear(QueueCoreObject *q)
{
    Py_CLEAR(q->ring);
    Py_CLEAR(q->decode[0]);
    Py_CLEAR(q->decode[1]);
    Py_CLEAR(q->kept);
    return 0;
}

static void
QueueCore_dealloc(QueueCoreObject *q)
{
    PyObject_GC_UnTrack(q);
    QueueCore_clear(q);
    shm_free_instance((PyObject *)q);
}

#define FAST (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef QueueCore_methods[] = {
    {"get", (PyCFunction)(void (*)(void))QueueCore_get, FAST,
     "get($self, /, block=True, timeout=None)\n--\n\n"
     "Remove and return an object, waiting while the queue is empty\n"
     "(``queue.Empty`` when ``block`` is false or ``timeout`` seconds pass).\n\n"
     "Big buffers come back backed by their payload's shared memory (no\n"
     "copy; numpy arrays are writable, as with ``multiprocessing``), held\n"
     "while the object needs them.  The object is rebuilt while it is\n"
     "still in the queue: a Ctrl-C meanwhile leaves it there, next in\n"
     "line, and a process killed meanwhile gives it back too; a Ctrl-C\n"
     "after it was taken keeps it for this handle's next ``get``.  A\n"
     "payload file that is missing, damaged or not yours raises\n"
     ":class:`NotFoundError`, :class:`CorruptError` or\n"
     ":class:`UntrustedError`, and an object that does not unpickle here\n"
     "(memory running out included) raises its error: that object is\n"
     "lost, the queue goes on.\n\n"
     ">>> q = Queue()\n"
     ">>> q.put({\"frame\": 1})\n"
     ">>> q.get(timeout=1.0)\n"
     "{'frame': 1}\n"
     ">>> q.close()"},
    {"get_nowait", (PyCFunction)QueueCore_get_nowait, METH_NOARGS,
     "get_nowait($self, /)\n--\n\n``get(False)``."},
    {"_get_one", (PyCFunction)(void (*)(void))QueueCore_get_one, FAST,
     "_get_one($self, /, timeout=None, nowait=True)\n--\n\n"
     "get for shmkit.aio: Empty when nowait, Timeout when the timeout passes."},
    {"_bind", (PyCFunction)(void (*)(void))QueueCore_bind, METH_FASTCALL,
     "_bind($self, ring, loads, unpack, /)\n--\n\n"
     "Receive from ring, decoding with loads (a pickle) or unpack (a big\n"
     "object's header: returns (object, after))."},
    {"_unbind", (PyCFunction)QueueCore_unbind, METH_NOARGS,
     "_unbind($self, /)\n--\n\nget raises 'closed' from now on."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef QueueCore_getset[] = {
    {"_kept", (getter)QueueCore_get_kept, NULL,
     "objects taken but not yet returned (an interrupt came first)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot queue_spec_slots[] = {
    {Py_tp_dealloc, QueueCore_dealloc},
    {Py_tp_traverse, QueueCore_traverse},
    {Py_tp_clear, QueueCore_clear},
    {Py_tp_doc, "QueueCore()\n--\n\nA Queue's get; shmkit.Queue builds on it."},
    {Py_tp_methods, QueueCore_methods},
    {Py_tp_getset, QueueCore_getset},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec queue_spec = {
    .name = "shmkit._core.QueueCore",
    .basicsize = sizeof(QueueCoreObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = queue_spec_slots,
};

int
shm_init_queue(PyObject *module)
{
    return shm_add_type(module, &queue_spec, &shm_mod_state(module)->QueueCore);
}
