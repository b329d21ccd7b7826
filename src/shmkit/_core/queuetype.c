/* queuetype.c - QueueCore: shmkit.Queue's receive, one call of the core.
 *
 * shmkit.Queue is a Python class on this base.  Its get takes the next
 * message of the queue's channel, rebuilds the object while the message is
 * still there, and only then finishes it (ringtype.c, decode_lent): an
 * interrupt during the rebuild gives the message back.
 *
 * Python handles a signal that came during a call of C code as that call
 * returns, in the calling frame: whatever a handler raises there would
 * lose an object already finished.  So the main thread's object comes back
 * in the handle's box, a list of one item, and Queue.get (and shmkit.aio's)
 * empties the box in Python with no point between the call and the
 * emptying where a handler runs: an interrupt raised as the call returns
 * leaves the object in the box, and the next call returns it first.  (A
 * handler that itself gets from the queue takes the object, and the
 * interrupted get, finding the box empty, gets the next one.)  Only the
 * main thread runs signal handlers, and only it uses the box (a thread
 * switch may come as the call returns, as a handler may); other threads'
 * objects come back in a list of their own. */
#include "msgtype.h"
#include "ring.h"

#include <pthread.h>

/* Forks this process and its ancestors made (counted in the child only,
 * unlike mapping.c's count, which parent and child both see change): a box
 * that holds an object across a fork is the parent's, which its next get
 * returns; the child's must not return it too. */
static unsigned long forks;

static void
count_fork(void)
{
    forks++;
}

typedef struct {
    PyObject_HEAD
    PyObject *ring;      /* the queue's channel (a Ring); NULL when not bound */
    PyObject *decode[3]; /* pickle.loads; the unpacker of a big object's header;
                            whether a signal handler raised an exception */
    PyObject *box;       /* [object, or itself when empty]: the main thread's (see above) */
    unsigned long box_forks; /* `forks` when the box was last looked at */
} QueueCoreObject;

/* A box, empty: it holds itself (no object sent can be it). */
static PyObject *
new_box(void)
{
    PyObject *box = PyList_New(1);
    if (box != NULL)
        PyList_SET_ITEM(box, 0, Py_NewRef(box));
    return box;
}

/* Is the handle's box one to use?  Not one a caller changed (it is a plain
 * list), nor one from before a fork (its object is the parent's). */
static inline int
box_current(QueueCoreObject *q)
{
    return PyList_GET_SIZE(q->box) == 1 && q->box_forks == forks;
}

/* The main thread's box (a new reference: a close by another thread or by
 * the decoding may drop the handle's meanwhile), or NULL on other threads.
 * One not current is replaced. */
static PyObject *
main_box(QueueCoreObject *q)
{
    if (q->box == NULL || !_PyOS_IsMainThread())
        return NULL;
    if (box_current(q))
        return Py_NewRef(q->box);
    PyObject *box = new_box();
    if (box == NULL) {
        PyErr_Clear(); /* this call goes without */
        return NULL;
    }
    PyObject *old = q->box;
    q->box = Py_NewRef(box);
    q->box_forks = forks;
    Py_DECREF(old); /* last: what it frees may run code that closes the handle */
    return box;
}

/* The box's object (borrowed), or NULL if it holds none. */
static inline PyObject *
boxed(PyObject *box)
{
    PyObject *obj = box != NULL ? PyList_GET_ITEM(box, 0) : NULL;
    return obj == box ? NULL : obj;
}

/* The receive behind _get_boxed: its timeout raises Empty naming the queue
 * (a Timeout that a signal handler raised meanwhile goes through as it is). */
static PyObject *
queue_get(QueueCoreObject *q, PyObject *timeout, int nowait)
{
    if (q->ring == NULL) {
        PyErr_Format(shm_state_of((PyObject *)q)->ClosedError,
                     "Queue %R is closed in this process; open it again", (PyObject *)q);
        return NULL;
    }
    /* held for the call: another thread may close the queue meanwhile */
    PyObject *ring = Py_NewRef(q->ring);
    PyObject *decode[3] = {Py_NewRef(q->decode[0]), Py_NewRef(q->decode[1]),
                           Py_NewRef(q->decode[2])};
    PyObject *obj = ring_get_decoded((RingObject *)ring, timeout, nowait, decode);
    if (obj == NULL && shm_deadline_error(RING_ST(ring)->Timeout)) {
        PyErr_Clear();
        PyObject *shown = shm_timeout_shown(timeout);
        if (shown != NULL)
            PyErr_Format(RING_ST(ring)->Empty, "queue %R stayed empty for %U s",
                         ((RingObject *)ring)->name, shown);
        Py_XDECREF(shown);
    }
    Py_DECREF(decode[0]);
    Py_DECREF(decode[1]);
    Py_DECREF(decode[2]);
    Py_DECREF(ring);
    return obj;
}

/* _get_boxed(block=True, timeout=None): Queue.get's call.  Returns the box,
 * holding the object; on another thread, or if the box holds one already
 * (a get that the decoding made, itself interrupted as it returned), a new
 * list.  A box holding an object kept from a call whose return was
 * interrupted is returned as it is. */
static PyObject *
QueueCore_get_boxed(QueueCoreObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"block", "timeout", NULL};
    PyObject *a[2] = {NULL, NULL};
    if ((nargs > 0 || kw != NULL) &&
        msg_parse_args("_get_boxed", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int block = a[0] ? PyObject_IsTrue(a[0]) : 1;
    if (block < 0 || (!block && shm_nowait_timeout_check(a[1], "get()", "block") < 0))
        return NULL;
    PyObject *box = main_box(q);
    if (boxed(box) != NULL)
        return box;
    PyObject *obj = queue_get(q, a[1], !block);
    if (obj != NULL && box != NULL && PyList_GET_SIZE(box) == 1 && boxed(box) == NULL) {
        PyList_SetItem(box, 0, obj); /* (drops the box's own reference to itself) */
        return box;
    }
    Py_XDECREF(box);
    if (obj == NULL)
        return NULL;
    PyObject *own = PyList_New(1);
    if (own == NULL) { /* no memory even for this: the object is lost */
        Py_DECREF(obj);
        return NULL;
    }
    PyList_SET_ITEM(own, 0, obj);
    return own;
}

/* _bind(ring, loads, unpack, by_a_handler): what get receives from and
 * decodes with. */
static PyObject *
QueueCore_bind(QueueCoreObject *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "_bind() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], shm_state_of((PyObject *)q)->Ring)) {
        PyErr_Format(PyExc_TypeError, "_bind() needs a Ring, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    if (!PyCallable_Check(args[1]) || !PyCallable_Check(args[2]) ||
        !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "_bind() needs three callables, loads, unpack "
                        "and by_a_handler");
        return NULL;
    }
    PyObject *box = new_box();
    if (box == NULL)
        return NULL;
    Py_XSETREF(q->box, box);
    q->box_forks = forks;
    Py_XSETREF(q->ring, Py_NewRef(args[0]));
    Py_XSETREF(q->decode[0], Py_NewRef(args[1]));
    Py_XSETREF(q->decode[1], Py_NewRef(args[2]));
    Py_XSETREF(q->decode[2], Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

/* _unbind(): get raises "closed" from now on; a kept object goes. */
static PyObject *
QueueCore_unbind(QueueCoreObject *q, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(q->ring);
    Py_CLEAR(q->box);
    Py_RETURN_NONE;
}

static PyObject *
QueueCore_get_kept(QueueCoreObject *q, void *Py_UNUSED(c))
{
    return PyBool_FromLong(q->box != NULL && box_current(q) && boxed(q->box) != NULL);
}

static int
QueueCore_traverse(QueueCoreObject *q, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(q));
    Py_VISIT(q->ring);
    Py_VISIT(q->decode[0]);
    Py_VISIT(q->decode[1]);
    Py_VISIT(q->decode[2]);
    Py_VISIT(q->box);
    return 0;
}

static int
QueueCore_clear(QueueCoreObject *q)
{
    Py_CLEAR(q->ring);
    Py_CLEAR(q->decode[0]);
    Py_CLEAR(q->decode[1]);
    Py_CLEAR(q->decode[2]);
    Py_CLEAR(q->box);
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
    {"_get_boxed", (PyCFunction)(void (*)(void))QueueCore_get_boxed, FAST,
     "_get_boxed($self, /, block=True, timeout=None)\n--\n\n"
     "Queue.get's call: a list holding the object (the main thread's box,\n"
     "which get empties).  Empty when block is false or the timeout passes."},
    {"_bind", (PyCFunction)(void (*)(void))QueueCore_bind, METH_FASTCALL,
     "_bind($self, ring, loads, unpack, by_a_handler, /)\n--\n\n"
     "Receive from ring, decoding with loads (a pickle) or unpack (a big\n"
     "object's header, and a list to append after to if the unpickling fails:\n"
     "returns (object, after)); by_a_handler(exception) tells whether a\n"
     "pickle's decoding was stopped by a signal handler's exception."},
    {"_unbind", (PyCFunction)QueueCore_unbind, METH_NOARGS,
     "_unbind($self, /)\n--\n\nget raises 'closed' from now on."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef QueueCore_getset[] = {
    {"_kept", (getter)QueueCore_get_kept, NULL,
     "whether the box keeps an object (an interrupt came as the call returned)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot queue_spec_slots[] = {
    {Py_tp_dealloc, QueueCore_dealloc},
    {Py_tp_traverse, QueueCore_traverse},
    {Py_tp_clear, QueueCore_clear},
    {Py_tp_doc, "QueueCore()\n--\n\nA Queue's receive; shmkit.Queue builds on it."},
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
    static int counting; /* once per process, whatever imports the module again */
    if (!counting) {
        int err = pthread_atfork(NULL, NULL, count_fork);
        if (err != 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        counting = 1;
    }
    return shm_add_type(module, &queue_spec, &shm_mod_state(module)->QueueCore);
}
