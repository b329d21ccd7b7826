/* msgtype.c - the error paths of msgtype.h's helpers, and the message view
 * that RecordView (ringtype.c) and TopicView (topictype.c) are made of: a
 * record lent in place, exported read-only through the buffer protocol and
 * given back to its ring once by release(), __exit__ or dealloc, through
 * its kind's give_back.
 *
 *   with ch.recv_view() as mv: ...      (mv: a read-only memoryview)
 */
#include "msgtype.h"
#include "journal.h" /* shm_crash_point */

int
msg_not_bytes(PyObject *o, Py_buffer *b, const char *kind, const char *hint)
{
    if (PyUnicode_Check(o) || !PyObject_CheckBuffer(o)) {
        PyErr_Format(PyExc_TypeError, "a %s message must be bytes-like (bytes, "
                     "bytearray, memoryview, numpy array), not %.100s; %s", kind,
                     Py_TYPE(o)->tp_name, hint);
        return -1;
    }
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_BufferError, "a %s message must be one contiguous block "
                     "of memory; copy it first (numpy.ascontiguousarray)", kind);
        return -1;
    }
    return 0;
}

int
msg_too_large(PyObject *self, const char *kind, PyObject *name, Py_ssize_t len,
              unsigned long long most)
{
    PyErr_Format(shm_state_of(self)->MessageTooLarge, "a message of %zd bytes does not fit "
                 "in %s %R, which holds at most %llu bytes per message; create the %s with "
                 "a larger capacity=", len, kind, name, most, kind);
    return -1;
}

void
msg_batch_release(msg_batch *b)
{
    for (Py_ssize_t i = 0; i < b->n; i++)
        msg_release(&b->bufs[i]);
    PyMem_Free(b->bufs);
    Py_CLEAR(b->seq);
    b->bufs = NULL;
    b->n = 0;
}

int
msg_batch_get(msg_batch *b, PyObject *iterable, const char *fname, const char *kind,
              const char *hint, PyObject *self, int (*fits)(PyObject *, Py_ssize_t))
{
    char what[64];
    PyOS_snprintf(what, sizeof what, "%s() needs an iterable of messages", fname);
    b->n = 0;
    b->bufs = NULL;
    if ((b->seq = PySequence_Fast(iterable, what)) == NULL) {
        msg_note_sent(0);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(b->seq);
    PyObject **items = PySequence_Fast_ITEMS(b->seq);
    if ((b->bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer))) == NULL) {
        PyErr_NoMemory();
        msg_batch_release(b);
        msg_note_sent(0);
        return -1;
    }
    for (; b->n < n; b->n++) {
        if (msg_get(items[b->n], &b->bufs[b->n], kind, hint) < 0)
            break;
        if (fits(self, b->bufs[b->n].len) < 0) {
            /* say which message, and that none went */
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyErr_Format(et, "%s() sent none: message %zd: %S", fname, b->n, ev);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            b->n++; /* release this one too */
            break;
        }
    }
    if (b->n == n && !PyErr_Occurred())
        return 0;
    msg_batch_release(b);
    msg_note_sent(0);
    return -1;
}

void
msg_note_sent(Py_ssize_t sent)
{
    if (!PyErr_Occurred())
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    PyObject *s = PyLong_FromSsize_t(sent);
    if (ev && s && PyObject_SetAttrString(ev, "sent", s) < 0)
        PyErr_Clear(); /* the batch's own error is the one to raise */
    Py_XDECREF(s);
    PyErr_Restore(et, ev, tb);
}

MappingObject *
msg_unusable(PyObject *self, MappingObject *m, PyObject *name, const char *kind,
             const char *to_do)
{
    if (m != NULL && m->base != NULL && !m->closing && m->readonly)
        PyErr_Format(shm_state_of(self)->ReadOnlyError, "%s %R was opened readonly=True; "
                     "open it without readonly to %s", kind, name, to_do);
    else
        PyErr_Format(shm_state_of(self)->ClosedError, "%s %R is closed in this process; "
                     "open it again to use it", kind, name ? name : Py_None);
    return NULL;
}

/* ---- messages kept across an interrupt (msgtype.h) -------------------- */

/* A signal handler raised: keep out's messages (its exception stays set). */
PyObject *
msg_keep(msg_kept_t *k, PyObject *out, const Py_buffer *into)
{
    if (into == NULL) {
        msg_kept_put(k, out, 0);
    } else { /* (the buffer may be put to other use meanwhile) */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *msg = PyBytes_FromStringAndSize(into->buf, PyLong_AsSsize_t(out));
        if (msg == NULL)
            PyErr_Clear(); /* no memory: lost, as it was before this list */
        PyErr_Restore(et, ev, tb);
        if (msg != NULL)
            msg_kept_put(k, msg, 0);
        Py_XDECREF(msg);
    }
    Py_DECREF(out);
    return NULL;
}

static int kept_view_back(MsgViewObject *Py_UNUSED(v), int Py_UNUSED(quiet)) { return 0; }

static const msgview_ops kept_view_ops = {
    .give_back = kept_view_back,
    .exported = "an array or memoryview made from the message view is still alive; copy "
                "what you need inside the with block",
};

/* Both take what they return off the list before anything that allocates
 * (a collection there may run a finalizer that lets the GIL go, and another
 * thread's receive take from the list meanwhile), and ask for signals as
 * their last step, as every receive does: a handler that raises puts what
 * they took back in front, for the next receive. */
PyObject *
msg_kept_give(msg_kept_t *k, PyTypeObject *view_type, MappingObject *m)
{
    PyObject *msg = Py_NewRef(PyList_GET_ITEM(k->list, 0));
    if (PySequence_DelItem(k->list, 0) < 0) {
        Py_DECREF(msg);
        return NULL;
    }
    PyObject *out = view_type == NULL
                        ? Py_NewRef(msg)
                        : msgview_new(view_type, &kept_view_ops, msg, m, PyBytes_AS_STRING(msg),
                                      PyBytes_GET_SIZE(msg), 0, 0);
    shm_crash_point("kept.give");
    if (out == NULL || PyErr_CheckSignals() < 0) { /* kept again, first in line */
        Py_XDECREF(out);
        out = NULL;
        msg_kept_put(k, msg, 1);
    }
    Py_DECREF(msg);
    return out;
}

PyObject *
msg_kept_take(msg_kept_t *k, Py_ssize_t n)
{
    PyObject *all = k->list; /* the list itself, which no other receive sees now */
    k->list = NULL;
    PyObject *first = PyList_GetSlice(all, 0, n);
    if (first != NULL && PyList_SetSlice(all, 0, n, NULL) < 0)
        Py_CLEAR(first); /* (all as it was) */
    msg_kept_put(k, all, 1); /* the rest before any kept meanwhile */
    Py_DECREF(all);
    shm_crash_point("kept.take");
    if (first != NULL && PyErr_CheckSignals() < 0) {
        msg_kept_put(k, first, 1);
        Py_CLEAR(first);
    }
    return first;
}

/* Put msgs (a message's bytes, or a list of them) in the kept list, at its
 * end or in front; with no memory they are lost, as they were before this
 * list.  The exception set, if any, stays. */
void
msg_kept_put(msg_kept_t *k, PyObject *msgs, int in_front)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    Py_ssize_t at = in_front ? 0 : msg_kept_count(k); /* (a forked parent's list dropped) */
    if (k->list == NULL && (k->list = PyList_New(0)) != NULL)
        k->gen = shm_child_generation();
    if (k->list == NULL ||
        (PyList_CheckExact(msgs) ? PyList_SetSlice(k->list, at, at, msgs)
                                 : PyList_Insert(k->list, at, msgs)) < 0)
        PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* A view's message kept, first in line (recv_array's, whose array making
 * failed or was interrupted once the message was taken); a released view
 * has nothing left to keep. */
void
msg_kept_view(msg_kept_t *k, MsgViewObject *v)
{
    if (v->released || v->mapping == NULL)
        return;
    PyObject *b = PyBytes_FromStringAndSize(v->payload, v->len);
    if (b == NULL) {
        PyErr_Clear(); /* no memory: lost, as it was before */
        return;
    }
    msg_kept_put(k, b, 1);
    Py_DECREF(b);
}

/* ---- the message view ------------------------------------------------ */

PyObject *
msgview_new(PyTypeObject *tp, const msgview_ops *ops, PyObject *owner, MappingObject *m,
            char *payload, Py_ssize_t len, uint64_t pos, uint32_t token)
{
    MsgViewObject *v = PyObject_GC_New(MsgViewObject, tp);
    if (v == NULL)
        return NULL;
    v->ops = ops;
    v->owner = Py_NewRef(owner);
    v->mapping = (PyObject *)m;
    shm_pin((PyObject *)m); /* our reference: the memory stays mapped while the view lives */
    v->payload = payload;
    v->len = len;
    v->exports = 0;
    v->pos = pos;
    v->token = token;
    v->released = 0;
    v->view = NULL;
    PyObject_GC_Track(v);
    return (PyObject *)v;
}

/* Give the record back, once.  Returns 0, or -1 with an exception set. */
int
msgview_give_back(MsgViewObject *v, int quiet)
{
    if (v->released)
        return 0;
    v->released = 1;
    int r = v->ops->give_back(v, quiet);
    shm_unpin(v->mapping);
    v->mapping = NULL;
    return r;
}

PyObject *
msgview_release(MsgViewObject *v, PyObject *Py_UNUSED(ignored))
{
    if (v->view != NULL) {
        PyObject *res = PyObject_CallMethod(v->view, "release", NULL);
        if (res == NULL) {
            if (PyErr_ExceptionMatches(PyExc_BufferError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_BufferError, v->ops->exported);
            }
            return NULL;
        }
        Py_DECREF(res);
        Py_CLEAR(v->view);
    }
    if (v->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "the message view is still exported (an "
                        "array or memoryview uses it); release those first");
        return NULL;
    }
    if (msgview_give_back(v, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
msgview_enter(MsgViewObject *v, PyObject *Py_UNUSED(ignored))
{
    if (v->released) {
        PyErr_SetString(PyExc_ValueError, "the message view was already released");
        return NULL;
    }
    if (v->view == NULL && (v->view = PyMemoryView_FromObject((PyObject *)v)) == NULL)
        return NULL;
    return Py_NewRef(v->view);
}

PyObject *
msgview_exit(MsgViewObject *v, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    PyObject *r = msgview_release(v, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

PyObject *
msgview_get_nbytes(MsgViewObject *v, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(v->len);
}

int
msgview_getbuffer(MsgViewObject *v, Py_buffer *view, int flags)
{
    if (v->released) {
        PyErr_SetString(PyExc_ValueError, "the message view was released");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)v, v->payload, v->len, 1, flags) < 0)
        return -1;
    v->exports++;
    return 0;
}

void
msgview_releasebuffer(MsgViewObject *v, Py_buffer *Py_UNUSED(view))
{
    v->exports--;
}

/* Give the record back, as a view that nobody can use any more does, and
 * let go of what it refers to: for dealloc, and for the collector when the
 * view is in a cycle (its memoryview, which refers back to it, or a handle
 * it was stored on: `ch.view = ch.recv_view()`). */
int
msgview_clear(MsgViewObject *v)
{
    /* A view dropped while an exception unwinds the frame that held it
     * runs here with that exception pending: set it aside, so that the
     * give-back neither runs with it set nor replaces or clears it. */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    Py_CLEAR(v->view);
    /* The error is reported against the owner, not v: the unraisable hook
     * takes a reference to its object, and dropping it would run this
     * dealloc a second time and free v twice. */
    if (!v->released && msgview_give_back(v, 1) < 0)
        PyErr_WriteUnraisable(v->owner);
    Py_CLEAR(v->owner);
    PyErr_Restore(et, ev, tb);
    return 0;
}

int
msgview_traverse(MsgViewObject *v, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(v)); /* a heap type */
    Py_VISIT(v->owner);
    Py_VISIT(v->view);
    return 0;
}

void
msgview_dealloc(MsgViewObject *v)
{
    PyObject_GC_UnTrack(v);
    msgview_clear(v);
    PyTypeObject *tp = Py_TYPE(v);
    PyObject_GC_Del(v);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}
