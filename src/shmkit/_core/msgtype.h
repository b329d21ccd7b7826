/* msgtype.h - what the Python faces of the channel's ring (ringtype.c) and
 * the topic (topictype.c) share: argument parsing, taking a message's
 * buffer, pinning the handle's mapping for a call, and the message view, a
 * record lent in place (RecordView, TopicView).
 *
 * The helpers on the send and receive paths are static inline here, so
 * that each caller compiles them in as before; msgtype.c holds the error
 * paths and the view's methods. */
#ifndef SHMKIT_MSGTYPE_H
#define SHMKIT_MSGTYPE_H

#include "shmkit.h"
#include <sys/mman.h>

/* Messages this large are copied out into memory advised onto transparent
 * huge pages, as numpy advises its own large arrays. */
#define MSG_HUGE_COPY (4u << 20)

/* A new, uninitialised bytes object for a message of len bytes that is
 * about to be copied in.  For a large one, the 2 MiB pages wholly inside it
 * are advised onto huge pages first (MADV_HUGEPAGE): the copy then faults
 * once per 2 MiB instead of once per 4 KiB, which is most of the cost of
 * filling fresh memory.  The advice is only that: where the kernel has no
 * huge page to give, or transparent huge pages are off, nothing changes. */
static inline PyObject *
msg_new_bytes(Py_ssize_t len)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    if (out != NULL && (size_t)len >= MSG_HUGE_COPY) {
        const uintptr_t huge = 2u << 20;
        uintptr_t start = (uintptr_t)PyBytes_AS_STRING(out);
        uintptr_t first = (start + huge - 1) & ~(huge - 1);
        uintptr_t end = (start + (uintptr_t)len) & ~(huge - 1);
        if (end > first)
            (void)madvise((void *)first, end - first, MADV_HUGEPAGE);
    }
    return out;
}

/* Parse (positional..., keywords...) from a FASTCALL|KEYWORDS call into
 * out[] (NULL where not given); names ends with NULL, the first npos are
 * required.  Returns 0, or -1 with TypeError set. */
static inline int
msg_parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
               Py_ssize_t npos, const char *const *names, PyObject **out)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, nall = 0;
    while (names[nall])
        nall++;
    if (nargs > nall) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)",
                     fname, nall, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nall; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        for (; i < nall; i++)
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                break;
        if (i == nall || out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R",
                         fname, key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < npos; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* The arguments of _take(timeout=None, nowait=False).  Returns 0, or -1
 * with an error set. */
static inline int
msg_take_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kw, PyObject **timeout,
              int *nowait)
{
    static const char *const names[] = {"timeout", "nowait", NULL};
    PyObject *a[2];
    if (msg_parse_args("_take", args, nargs, kw, 0, names, a) < 0)
        return -1;
    *timeout = a[0];
    *nowait = a[1] ? PyObject_IsTrue(a[1]) : 0;
    return *nowait < 0 ? -1 : 0;
}

/* The deadline of a call: 0 for nowait, SHM_FOREVER for timeout None (or
 * not given), else shm_deadline's.  Returns 0, or -1 with an error set. */
static inline int
msg_deadline(PyObject *timeout, int nowait, int64_t *deadline)
{
    if (nowait) {
        *deadline = 0;
        return 0;
    }
    if (timeout == NULL || timeout == Py_None) {
        *deadline = SHM_FOREVER;
        return 0;
    }
    *deadline = shm_deadline(timeout);
    return *deadline < 0 ? -1 : 0;
}

/* The arguments of loan(nbytes, timeout=None): nbytes an int >= 0
 * (SizeLimitError otherwise; beyond Py_ssize_t it is clamped, for the
 * size check to refuse) and the deadline.  Returns 0, or -1 with an error. */
static inline int
msg_loan_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kw, PyObject *size_error,
              Py_ssize_t *len, int64_t *deadline)
{
    static const char *const names[] = {"nbytes", "timeout", NULL};
    PyObject *a[2];
    if (msg_parse_args("loan", args, nargs, kw, 1, names, a) < 0)
        return -1;
    if (!PyLong_Check(a[0])) {
        PyErr_Format(PyExc_TypeError, "loan() needs nbytes as an int, not %.100s",
                     Py_TYPE(a[0])->tp_name);
        return -1;
    }
    if (PyBool_Check(a[0])) { /* an int, but never meant as a size: loan(True) is a slip */
        PyErr_SetString(PyExc_TypeError, "loan(nbytes): nbytes is the message's size in "
                                         "bytes, an int, not a bool");
        return -1;
    }
    int overflow = 0;
    long long want = PyLong_AsLongLongAndOverflow(a[0], &overflow);
    if (want == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (!overflow && want < 0)) {
        PyErr_Format(size_error, "loan() needs nbytes >= 0, not %R", a[0]);
        return -1;
    }
    if (overflow > 0 || want > PY_SSIZE_T_MAX)
        want = PY_SSIZE_T_MAX;
    *len = (Py_ssize_t)want;
    return msg_deadline(a[1], 0, deadline);
}

/* The sizes of _take_sized(timeout, unit, nbytes) (recv_array): fit[0] the
 * multiple a message's length must be (0: any), fit[1] its length exactly
 * (UINT64_MAX: any, for nbytes None).  Returns 0, or -1 with an error set. */
static inline int
msg_fit_args(PyObject *unit, PyObject *nbytes, uint64_t fit[2])
{
    unsigned long long v = PyLong_AsUnsignedLongLong(unit);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    fit[0] = v;
    fit[1] = UINT64_MAX;
    if (nbytes != Py_None) {
        v = PyLong_AsUnsignedLongLong(nbytes);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        fit[1] = v;
    }
    return 0;
}

/* Does a message of len bytes fit (see msg_fit_args)? */
static inline int
msg_fits(const uint64_t fit[2], uint64_t len)
{
    return (fit[0] == 0 || len % fit[0] == 0) && (fit[1] == UINT64_MAX || len == fit[1]);
}

/* A bytes-like message for a `kind` ("channel", "topic") ring: bytes
 * without a buffer round-trip, else any C-contiguous buffer.  Returns 0
 * and fills *b (release with msg_release), or -1: TypeError ending with
 * `hint`, or BufferError. */
int msg_not_bytes(PyObject *o, Py_buffer *b, const char *kind, const char *hint);
static inline int
msg_get(PyObject *o, Py_buffer *b, const char *kind, const char *hint)
{
    if (PyBytes_CheckExact(o)) {
        b->obj = NULL;
        b->buf = PyBytes_AS_STRING(o);
        b->len = PyBytes_GET_SIZE(o);
        return 0;
    }
    return msg_not_bytes(o, b, kind, hint);
}

static inline void
msg_release(Py_buffer *b)
{
    if (b->obj)
        PyBuffer_Release(b);
}

/* Raise MessageTooLarge for a len-byte message that a `kind` ring named
 * `name` cannot hold (at most `most` bytes per message).  Returns -1. */
int msg_too_large(PyObject *self, const char *kind, PyObject *name, Py_ssize_t len,
                  unsigned long long most);

/* The messages of a batch call (send_many, publish_many), each held as a
 * buffer and checked by fits(self, len) (which raises, -1) before any is
 * sent.  msg_batch_get: 0, or -1 with an error set (.sent = 0) and
 * nothing held;
 * msg_batch_release gives every buffer back. */
typedef struct {
    PyObject *seq;
    Py_buffer *bufs;
    Py_ssize_t n;
} msg_batch;
int msg_batch_get(msg_batch *b, PyObject *iterable, const char *fname, const char *kind,
                  const char *hint, PyObject *self, int (*fits)(PyObject *, Py_ssize_t));
void msg_batch_release(msg_batch *b);

/* A batch call failed after `sent` of its messages went (0 too): say so
 * on the exception set, as its .sent attribute. */
void msg_note_sent(Py_ssize_t sent);

/* The mapping of a ring's handle `self`, pinned for the call: NULL with
 * ClosedError (or ReadOnlyError when to_use: sending or receiving needs a
 * live, writable attachment) set when it cannot be used.  kind names the
 * structure in the message, to_do what a readonly handle cannot do. */
MappingObject *msg_unusable(PyObject *self, MappingObject *m, PyObject *name, const char *kind,
                            const char *to_do);
static inline MappingObject *
msg_enter(PyObject *self, PyObject *mapping, PyObject *name, int to_use, const char *kind,
          const char *to_do)
{
    MappingObject *m = (MappingObject *)mapping;
    if (m == NULL || m->base == NULL || m->closing || (to_use && m->token == 0))
        return msg_unusable(self, m, name, kind, to_do);
    shm_pin(mapping);
    return m;
}

/* ---- messages kept across an interrupt --------------------------------
 *
 * Python runs a signal's handler (Ctrl-C's KeyboardInterrupt) as a call of C
 * returns, in the caller, before the result is stored: a message taken then
 * would be dropped with the result.  So a receive that copies messages out
 * asks for signals as its last step (msg_keep_if_interrupted), and if a
 * handler raises, what it took goes to the handle's kept list instead of its
 * caller; the next receive through the handle, in any thread, returns it
 * first.  A receive that lends a view checks before it takes, and gives the
 * record back.  What remains is a signal that comes in the few instructions
 * between that last check and the interpreter's own.  A forked child
 * forgets its parent's (gen); a handle's close drops them. */
typedef struct {
    PyObject *list;    /* the messages (bytes), in order; NULL when none yet */
    unsigned long gen; /* shm_child_generation() when list was made */
} msg_kept_t;

/* How many messages are kept (dropping a forked parent's first). */
static inline Py_ssize_t
msg_kept_count(msg_kept_t *k)
{
    if (k->list != NULL && k->gen != shm_child_generation())
        Py_CLEAR(k->list); /* the parent's: it returns them itself */
    return k->list == NULL ? 0 : PyList_GET_SIZE(k->list);
}

/* The last step of a receive that took `out` (a message's bytes, a list of
 * them, or, for a receive into a buffer, its length, the bytes being at
 * `into`): out, or NULL with the handler's exception set and them kept. */
PyObject *msg_keep(msg_kept_t *k, PyObject *out, const Py_buffer *into);
static inline PyObject *
msg_keep_if_interrupted(msg_kept_t *k, PyObject *out, const Py_buffer *into)
{
    return PyErr_CheckSignals() == 0 ? out : msg_keep(k, out, into);
}

/* The first n kept messages (at most), a new list, taken off. */
PyObject *msg_kept_take(msg_kept_t *k, Py_ssize_t n);
/* The first kept message (there is one), taken off: its bytes, or with
 * view_type, a view of them (holding them; m pinned while it lives). */
PyObject *msg_kept_give(msg_kept_t *k, PyTypeObject *view_type, MappingObject *m);
/* Put msgs (a message's bytes, or a list of them) in the kept list: at its
 * end (a receive a handler interrupted), or in front (one that took them
 * off but cannot return them). */
void msg_kept_put(msg_kept_t *k, PyObject *msgs, int in_front);
typedef struct MsgViewObject MsgViewObject;
/* A view's message kept, first in line (recv_array's, whose array making
 * failed or was interrupted); nothing for a released view. */
void msg_kept_view(msg_kept_t *k, MsgViewObject *v);

/* ---- the message view ------------------------------------------------ */

/* What a kind of view does that the other does not. */
typedef struct {
    /* Give the lent record back to its ring: called once, with v->mapping
     * still pinned (msgview_give_back unpins it after).  quiet: from
     * dealloc, where only a failure to give the record back is reported
     * (unraisable), not news about what was read.  Returns 0, or -1 with
     * an exception set. */
    int (*give_back)(MsgViewObject *v, int quiet);
    /* The BufferError message of release() while an array or memoryview
     * made from the view is alive. */
    const char *exported;
} msgview_ops;

/* A record lent in place.  payload points into the mapping, which stays
 * pinned until the record is given back. */
struct MsgViewObject {
    PyObject_HEAD
    const msgview_ops *ops;
    PyObject *owner;   /* the Ring or TopicSubscriber that lent it */
    PyObject *mapping; /* pinned while lent; NULL once given back */
    char *payload;
    Py_ssize_t len;
    Py_ssize_t exports;
    uint64_t pos;      /* the record's position in its ring */
    uint32_t token;    /* the attachment that took it */
    int released;
    PyObject *view;    /* the memoryview handed out by __enter__ */
};

/* A new view of type tp (RecordView, TopicView) on the len payload bytes
 * at payload, holding owner and a pin of m.  NULL with an error set. */
PyObject *msgview_new(PyTypeObject *tp, const msgview_ops *ops, PyObject *owner,
                      MappingObject *m, char *payload, Py_ssize_t len, uint64_t pos,
                      uint32_t token);
int msgview_give_back(MsgViewObject *v, int quiet);
PyObject *msgview_release(MsgViewObject *v, PyObject *ignored);
PyObject *msgview_enter(MsgViewObject *v, PyObject *ignored);
PyObject *msgview_exit(MsgViewObject *v, PyObject *const *args, Py_ssize_t nargs);
PyObject *msgview_get_nbytes(MsgViewObject *v, void *closure);
int msgview_getbuffer(MsgViewObject *v, Py_buffer *view, int flags);
void msgview_releasebuffer(MsgViewObject *v, Py_buffer *view);
void msgview_dealloc(MsgViewObject *v);
int msgview_traverse(MsgViewObject *v, visitproc visit, void *arg);
int msgview_clear(MsgViewObject *v);

/* The entries every view type has, for its tables. */
#define MSGVIEW_METHODS(release_doc)                                                      \
    {"release", (PyCFunction)msgview_release, METH_NOARGS,                               \
     "release($self, /)\n--\n\n" release_doc},                                            \
    {"__enter__", (PyCFunction)msgview_enter, METH_NOARGS, "__enter__($self, /)\n--\n\n" \
     "The message as a read-only memoryview."},                                           \
    {"__exit__", (PyCFunction)(void (*)(void))msgview_exit, METH_FASTCALL,               \
     "__exit__($self, *exc_info)\n--\n\nRelease the message (as release())."}
#define MSGVIEW_NBYTES \
    {"nbytes", (getter)msgview_get_nbytes, NULL, "the message's size in bytes", NULL}
#define MSGVIEW_SLOTS                              \
    {Py_tp_dealloc, msgview_dealloc},              \
    {Py_tp_traverse, msgview_traverse},            \
    {Py_tp_clear, msgview_clear},                  \
    {Py_bf_getbuffer, msgview_getbuffer},          \
    {Py_bf_releasebuffer, msgview_releasebuffer}

#endif
