/* topictype.c - the Python face of the broadcast ring: shmkit._core.Topic
 * (which shmkit.Topic subclasses, so that topic.publish(b) is one C call),
 * TopicSubscriber (a cursor; shmkit.Subscriber subclasses it) and
 * TopicView (a message lent in place).  The protocol is in topic.c.
 *
 *   topic.publish(data, timeout=None)      sub.recv(timeout=None) -> bytes
 *   topic.publish_nowait(data)             sub.recv_nowait() -> bytes
 *   topic.publish_many(msgs, timeout=None) sub.recv_many(max_n=1024, timeout=None)
 *   topic._subscribe(cls, history=None, timeout=None)
 *                                          sub._take(timeout=None, nowait=False)
 */
#include "topic.h"
#include "journal.h"
#include "msgtype.h"
#include <string.h>
#include <structmember.h>

#define LENT_MAX 64 /* views one subscriber may hold at once */
#define RUN_MAX 256 /* messages recv_many copies per look at the tail */

/* The core's state (exception classes, types) from any object of these types. */
#define TST(o) shm_state_of((PyObject *)(o))

typedef struct {
    PyObject_HEAD
    PyObject *mapping; /* the segment's Mapping; NULL when unbound */
    topic_t t;
    int64_t spin_ns;
    PyObject *name;
    unsigned long loan_thread; /* the thread holding an open loan (plock), or 0 */
} TopicObject;

typedef struct {
    PyObject_HEAD
    TopicObject *topic;
    PyObject *mapping;  /* the mapping the subscription was made in */
    uint32_t idx, token;
    int closed, busy;
    uint32_t nlent;
    uint64_t lent[LENT_MAX]; /* positions of views not yet released, ascending */
    uint64_t lost; /* losses met but not yet raised (see sub_report_lost) */
    int64_t spin_ns;
    msg_kept_t kept; /* messages taken as a signal handler raised: the next
                      * receive's (msgtype.h) */
    PyObject *weakreflist;
} SubObject;


/* ---- helpers ------------------------------------------------------------ */

/* The topic's mapping, pinned for the call, or NULL with an error set. */
static inline MappingObject *
topic_enter(TopicObject *o, int to_use)
{
    return msg_enter((PyObject *)o, o->mapping, o->name, to_use, "topic",
                     "publish or subscribe");
}

/* Raise MessagesLost(msg, missed); msg NULL: an error is already set. */
static void
raise_lost_msg(shm_state *st, PyObject *msg, uint64_t missed)
{
    if (msg == NULL)
        return;
    PyObject *exc = PyObject_CallFunction(st->MessagesLost, "OK", msg,
                                          (unsigned long long)missed);
    Py_DECREF(msg);
    if (exc == NULL)
        return;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
}

static void
raise_lost(shm_state *st, PyObject *name, uint64_t missed)
{
    raise_lost_msg(st, PyUnicode_FromFormat(
        "topic %R: %llu message%s %s this subscriber read %s; it goes on from the oldest "
        "message still there (create the topic with a larger capacity, or "
        "overflow=\"block\", to lose none)", name, (unsigned long long)missed,
        missed == 1 ? "" : "s", missed == 1 ? "was overwritten before" : "were overwritten "
        "before", missed == 1 ? "it" : "them"), missed);
}

/* ---- Topic: publishing ----------------------------------------------------- */

/* An open loan holds plock for its thread: that thread's next publish,
 * loan or subscription on the handle would wait for itself.  -1 with
 * BusyError set then. */
static int
topic_loan_busy(TopicObject *o, const char *what)
{
    if (o->loan_thread == 0 || o->loan_thread != shm_thread_serial())
        return 0;
    PyErr_Format(TST(o)->BusyError, "this thread has an open loan on topic %R, which holds "
                 "the publishers' lock: send or abandon it before the next %s", o->name,
                 what);
    return -1;
}

/* MessageTooLarge unless a len-byte message fits the ring. */
static int
publish_fits(TopicObject *o, Py_ssize_t len)
{
    if ((uint64_t)len <= UINT32_MAX - 32 && trec_total((uint64_t)len) <= o->t.cap)
        return 0;
    return msg_too_large((PyObject *)o, "topic", o->name, len,
                         (unsigned long long)(o->t.cap - 16));
}

/* Publish one message (it fits), waiting until the deadline while the
 * slowest live subscriber holds the space.  0, or -1 with Full (nowait),
 * Timeout or another error set. */
static int
publish_one(TopicObject *o, MappingObject *m, const Py_buffer *b, int64_t deadline, int nowait)
{
    topic_t *t = &o->t;
    int fruitless = 0;
    for (;;) {
        int k = topic_publish(t, m, b->buf, (uint64_t)b->len, deadline);
        if (k != 0)
            return k > 0 ? 0 : -1;
        int w = nowait ? 0 : topic_wait_space(t, m, (uint64_t)b->len, deadline, &o->spin_ns);
        if (w < 0)
            return -1;
        if (w == 0) {
            uint32_t idx;
            uint64_t lag = topic_slowest(t, m, &idx);
            if (nowait)
                PyErr_Format(TST(o)->Full, "topic %R is full: subscriber %u is %llu messages "
                             "behind (overflow=\"block\")", o->name, idx,
                             (unsigned long long)lag);
            else
                shm_deadline_passed(TST(o)->Timeout, "topic %R stayed full for the timeout: "
                             "subscriber %u is %llu messages behind and did not read "
                             "(overflow=\"block\" waits for the slowest live subscriber; "
                             "use overflow=\"overwrite\" not to wait)", o->name, idx,
                             (unsigned long long)lag);
            return -1;
        }
        if (ring_backoff(&fruitless) < 0) /* looked ready but was not */
            return -1;
    }
}

static PyObject *
publish_impl(TopicObject *o, PyObject *msg, PyObject *timeout, int nowait)
{
    Py_buffer b;
    if (topic_loan_busy(o, "publish") < 0)
        return NULL;
    if (msg_get(msg, &b, "topic", "encode it first") < 0)
        return NULL;
    int64_t deadline;
    MappingObject *m = NULL;
    PyObject *res = NULL;
    if (msg_deadline(timeout, nowait, &deadline) < 0)
        goto out;
    if ((m = topic_enter(o, 1)) == NULL)
        goto out;
    if (publish_fits(o, b.len) < 0 || publish_one(o, m, &b, deadline, nowait) < 0)
        goto out;
    res = Py_NewRef(Py_None);
out:
    if (m != NULL)
        shm_unpin((PyObject *)m);
    msg_release(&b);
    return res;
}

static PyObject *
Topic_publish(TopicObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"data", "timeout", NULL};
    PyObject *a[2];
    if (msg_parse_args("publish", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    return publish_impl(o, a[0], a[1], 0);
}

static PyObject *
Topic_publish_nowait(TopicObject *o, PyObject *msg)
{
    return publish_impl(o, msg, NULL, 1);
}

static int
batch_fits(PyObject *o, Py_ssize_t len)
{
    return publish_fits((TopicObject *)o, len);
}

/* Every message is checked before the first is published; the deadline
 * covers the whole batch.  On an error, .sent on the exception says how
 * many were published (in order: the first .sent of them). */
static PyObject *
Topic_publish_many(TopicObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"messages", "timeout", NULL};
    PyObject *a[2];
    int64_t deadline;
    msg_batch b;
    if (msg_parse_args("publish_many", args, nargs, kw, 1, names, a) < 0 ||
        topic_loan_busy(o, "publish") < 0 || msg_deadline(a[1], 0, &deadline) < 0 ||
        msg_batch_get(&b, a[0], "publish_many", "topic", "encode it first", (PyObject *)o,
                      batch_fits) < 0)
        return NULL; /* nothing published */
    Py_ssize_t sent = 0, n = b.n;
    MappingObject *m = NULL;
    /* a generator may have opened a loan meanwhile */
    if (topic_loan_busy(o, "publish") == 0 && (m = topic_enter(o, 1)) != NULL) {
        while (sent < n) {
            /* runs under one holding of the lock; when the next has no room,
             * publish it alone as publish() would, waiting */
            Py_ssize_t k = topic_publish_run(&o->t, m, b.bufs + sent, n - sent, deadline);
            if (k == 0 && publish_one(o, m, &b.bufs[sent], deadline, 0) == 0)
                k = 1;
            if (k <= 0)
                break;
            sent += k;
        }
        shm_unpin((PyObject *)m);
    }
    msg_batch_release(&b);
    if (sent < n) {
        msg_note_sent(sent);
        return NULL;
    }
    return PyLong_FromSsize_t(sent);
}

/* ---- Topic: loans ------------------------------------------------------------ */

/* A topic loan holds plock from topic_reserve to topic_finish, so a live
 * one is ended in the thread that took it, which the topic knows as its
 * loan's (loan_thread).  One nobody can use any more (dealloc, the
 * collector) is abandoned in whatever thread frees it (loan_settle). */
static int
topic_loan_check(LoanObject *l)
{
    if (l->thread == shm_thread_serial())
        return 0;
    PyErr_Format(shm_state_of(l->owner)->BusyError, "a topic loan holds the publishers' lock "
                 "of topic %R for the thread that took it: send or abandon it in that thread",
                 ((TopicObject *)l->owner)->name);
    return -1;
}

static int
topic_loan_end(LoanObject *l, int publish)
{
    TopicObject *o = (TopicObject *)l->owner;
    topic_resv rv = {l->aux[0], l->aux[1], l->aux[2], (uint64_t)l->len};
    o->loan_thread = 0;
    topic_finish(&o->t, (MappingObject *)l->mapping, &rv, publish);
    return 0;
}

static const loan_ops topic_loan_ops = {.check = topic_loan_check, .end = topic_loan_end};

static PyObject *
Topic_loan(TopicObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    Py_ssize_t len;
    int64_t deadline;
    if (msg_loan_args(args, nargs, kw, TST(o)->SizeLimitError, &len, &deadline) < 0)
        return NULL;
    MappingObject *m = topic_enter(o, 1);
    if (m == NULL)
        return NULL;
    topic_t *t = &o->t;
    LoanObject *l = NULL;
    if ((uint64_t)len > UINT32_MAX - 32 || trec_total((uint64_t)len) > t->cap) {
        msg_too_large((PyObject *)o, "topic", o->name, len, (unsigned long long)(t->cap - 16));
        goto out;
    }
    if (topic_loan_busy(o, "loan") < 0)
        goto out;
    if ((l = (LoanObject *)loan_new(&topic_loan_ops, (PyObject *)o)) == NULL)
        goto out;
    int fruitless = 0;
    for (;;) {
        topic_resv rv;
        int k = topic_reserve(t, m, (uint64_t)len, deadline, &rv);
        if (k < 0)
            break;
        if (k > 0) { /* plock held: from here the loan ends it (dealloc abandons) */
            l->aux[0] = rv.tail;
            l->aux[1] = rv.seq;
            l->aux[2] = rv.head;
            l->thread = shm_thread_serial();
            o->loan_thread = l->thread;
            loan_open(l, m, topic_payload(t, &rv), len);
            shm_crash_point("topic.loan.reserved");
            shm_unpin((PyObject *)m);
            return (PyObject *)l;
        }
        int w = topic_wait_space(t, m, (uint64_t)len, deadline, &o->spin_ns);
        if (w < 0)
            break;
        if (w == 0) {
            uint32_t idx;
            uint64_t lag = topic_slowest(t, m, &idx);
            shm_deadline_passed(TST(o)->Timeout, "topic %R had no room for a loan of %zd bytes "
                         "within the timeout: subscriber %u is %llu messages behind "
                         "(overflow=\"block\")", o->name, len, idx, (unsigned long long)lag);
            break;
        }
        if (ring_backoff(&fruitless) < 0)
            break;
    }
out:
    Py_XDECREF(l);
    shm_unpin((PyObject *)m);
    return NULL;
}

/* ---- Topic: subscribing, binding, statistics ----------------------------- */

static PyObject *
Topic_subscribe(TopicObject *o, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"cls", "history", "timeout", NULL};
    PyObject *a[3];
    int64_t deadline;
    if (msg_parse_args("_subscribe", args, nargs, kw, 1, names, a) < 0 ||
        msg_deadline(a[2], 0, &deadline) < 0)
        return NULL;
    if (!PyType_Check(a[0]) || !PyType_IsSubtype((PyTypeObject *)a[0], TST(o)->TopicSubscriber)) {
        PyErr_SetString(PyExc_TypeError, "_subscribe() needs a TopicSubscriber class");
        return NULL;
    }
    MappingObject *m = topic_enter(o, 1);
    if (m == NULL)
        return NULL;
    uint64_t want = o->t.history;
    if (a[1] != NULL && a[1] != Py_None) {
        long long w = PyLong_AsLongLong(a[1]);
        if (w == -1 && PyErr_Occurred()) {
            shm_unpin((PyObject *)m);
            return NULL;
        }
        if (w < 0 || (uint64_t)w > o->t.history) {
            PyErr_Format(PyExc_ValueError, "history=%lld: topic %R keeps at most %llu earlier "
                         "messages; give 0 to %llu", w, o->name,
                         (unsigned long long)o->t.history, (unsigned long long)o->t.history);
            shm_unpin((PyObject *)m);
            return NULL;
        }
        want = (uint64_t)w;
    }
    SubObject *s = (SubObject *)((PyTypeObject *)a[0])->tp_alloc((PyTypeObject *)a[0], 0);
    if (s == NULL) {
        shm_unpin((PyObject *)m);
        return NULL;
    }
    long idx = topic_loan_busy(o, "subscribe") < 0 ? -1 : topic_subscribe(&o->t, m, want, deadline);
    if (idx < 0) {
        s->closed = 1;
        Py_DECREF(s);
        shm_unpin((PyObject *)m);
        return NULL;
    }
    s->topic = (TopicObject *)Py_NewRef(o);
    s->mapping = Py_NewRef((PyObject *)m);
    s->idx = (uint32_t)idx;
    s->token = m->token;
    s->spin_ns = SPIN_START_NS;
    shm_unpin((PyObject *)m);
    return (PyObject *)s;
}

static PyObject *
Topic_init_topic(PyObject *Py_UNUSED(cls), PyObject *args)
{
    PyObject *mapping;
    long long off;
    unsigned long long cap, history;
    unsigned int overflow, max_subs;
    if (!PyArg_ParseTuple(args, "O&LKKII", shm_mapping_converter, &mapping, &off, &cap, &history,
                          &overflow, &max_subs))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    char *base = shm_addr(mapping, off, TOPIC_ROLES_OFF, 1);
    if (base == NULL)
        return NULL;
    if (off % 64) {
        PyErr_SetString(PyExc_ValueError, "a topic must start 64-aligned");
        return NULL;
    }
    if (topic_format(base, (uint64_t)m->length - (uint64_t)off, m->max_slots, cap, history,
                     overflow, max_subs) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Topic_bind(TopicObject *o, PyObject *args)
{
    PyObject *mapping, *name;
    long long off;
    if (!PyArg_ParseTuple(args, "O&LU", shm_mapping_converter, &mapping, &off, &name))
        return NULL;
    Py_XSETREF(o->name, Py_NewRef(name));
    MappingObject *m = (MappingObject *)mapping;
    char *base = shm_addr(mapping, off, 8, 0);
    if (base == NULL)
        return NULL;
    const char *nm = PyUnicode_AsUTF8(name);
    if (nm == NULL)
        return NULL;
    topic_t t;
    memset(&t, 0, sizeof t);
    if (off < 0 || (uint64_t)m->length < (uint64_t)off ||
        topic_bind(&t, TST(o), base, (uint64_t)m->length - (uint64_t)off, m->max_slots, nm) < 0)
        return NULL;
    o->t = t;
    o->spin_ns = SPIN_START_NS;
    Py_XSETREF(o->mapping, Py_NewRef(mapping));
    Py_RETURN_NONE;
}

static PyObject *
Topic_unbind(TopicObject *o, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(o->mapping);
    Py_RETURN_NONE;
}

static PyObject *
Topic_wake_all(TopicObject *o, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = (MappingObject *)o->mapping;
    if (m != NULL && m->base != NULL && !m->closing) {
        struct topic_hdr *h = o->t.h;
        __atomic_fetch_add(&h->data_seq, 1, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(&h->space_seq, 1, __ATOMIC_SEQ_CST);
        shm_futex_wake(&h->data_seq, INT_MAX);
        shm_futex_wake(&h->space_seq, INT_MAX);
    }
    Py_RETURN_NONE;
}

/* statistics: the counters and one entry per live subscriber (its token, so
 * that Python can name its process) */
static PyObject *
Topic_stats(TopicObject *o, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = topic_enter(o, 0);
    if (m == NULL)
        return NULL;
    topic_t *t = &o->t;
    struct topic_hdr *h = t->h;
    uint64_t sq = LOAD(&h->seq), tl = LOAD(&h->tail), hd = LOAD(&h->head);
    PyObject *subs = PyList_New(0);
    PyObject *d = NULL;
    if (subs == NULL)
        goto out;
    for (uint32_t i = 0; i < t->max_subs; i++) {
        struct topic_sub *s = &t->subs[i];
        uint32_t owner = LOAD(&s->owner);
        if (owner == 0 || (owner & ~SHM_TOKEN_MASK) || !shm_token_alive(m, owner))
            continue;
        uint64_t ss = LOAD(&s->seq), lag = sq - ss;
        PyObject *e = Py_BuildValue("{sIsIsKsKsKsK}", "index", i, "token", owner, "lag",
                                    (unsigned long long)(lag > sq ? 0 : lag), "received",
                                    (unsigned long long)LOAD(&s->received), "missed",
                                    (unsigned long long)LOAD(&s->missed), "joined",
                                    (unsigned long long)LOAD(&s->joined));
        if (e == NULL || PyList_Append(subs, e) < 0) {
            Py_XDECREF(e);
            goto out;
        }
        Py_DECREF(e);
    }
    d = Py_BuildValue("{sKsKsKsKsssIsOsIsI}", "capacity", (unsigned long long)t->cap,
                      "bytes_used", (unsigned long long)(tl >= hd ? tl - hd : 0), "published",
                      (unsigned long long)sq, "history", (unsigned long long)t->history,
                      "overflow", t->overflow ? "overwrite" : "block", "max_subscribers",
                      t->max_subs, "subscribers", subs, "subscribers_waiting",
                      LOAD(&h->data_sleepers), "publishers_waiting",
                      LOAD(&h->space_sleepers));
out:
    Py_XDECREF(subs);
    shm_unpin((PyObject *)m);
    return d;
}

static PyObject *
Topic_get_capacity(TopicObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(o->mapping ? o->t.cap : 0);
}

static PyObject *
Topic_get_max_message(TopicObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(o->mapping ? o->t.cap - 16 : 0);
}

static PyObject *
Topic_get_history(TopicObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(o->t.history);
}

static PyObject *
Topic_get_overflow(TopicObject *o, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(o->t.overflow ? "overwrite" : "block");
}

static PyObject *
Topic_get_max_subscribers(TopicObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(o->t.max_subs);
}

static PyObject *
Topic_get_published(TopicObject *o, void *Py_UNUSED(c))
{
    MappingObject *m = topic_enter(o, 0);
    if (m == NULL)
        return NULL;
    uint64_t sq = LOAD(&o->t.h->seq);
    shm_unpin((PyObject *)m);
    return PyLong_FromUnsignedLongLong(sq);
}

static void
Topic_dealloc(TopicObject *o)
{
    Py_CLEAR(o->mapping);
    Py_CLEAR(o->name);
    PyTypeObject *tp = Py_TYPE(o);
    tp->tp_free((PyObject *)o);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

#define FAST (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef Topic_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))Topic_publish, FAST,
     "publish($self, /, data, timeout=None)\n--\n\nCopy one bytes-like message in for every subscriber.\n"
     "With overflow=\"block\", wait while the slowest live subscriber holds the space\n"
     "(Timeout); with \"overwrite\", never wait.\n\n>>> topic.publish(b'tick', timeout=1.0)"},
    {"publish_many", (PyCFunction)(void (*)(void))Topic_publish_many, FAST,
     "publish_many($self, /, messages, timeout=None)\n--\n\n"
     "publish_many(messages, timeout=None) -> int\n\nPublish bytes-like messages in order, "
     "as publish() would one by one, in\none call: how many were published.  All are checked "
     "first (MessageTooLarge\npublishes none); on Timeout the exception's .sent says how many "
     "went.\n\n>>> topic.publish_many([b'a', b'b'], timeout=1.0)\n2"},
    {"publish_nowait", (PyCFunction)Topic_publish_nowait, METH_O,
     "publish_nowait($self, data, /)\n--\n\nPublish, or raise Full (a WouldBlock) if a subscriber holds "
     "the space."},
    {"loan", (PyCFunction)(void (*)(void))Topic_loan, FAST,
     "loan($self, /, nbytes, timeout=None)\n--\n\n"
     "loan(nbytes, timeout=None) -> Loan\n\nReserve room for one nbytes message and build "
     "it in place, holding the\npublishers' lock; leaving the with block publishes it in "
     "one step, an\nexception (or the publisher's death) abandons it.  End it in the same "
     "thread.\nRaises Timeout, MessageTooLarge, BusyError.\n\n"
     ">>> with topic.loan(5, timeout=1.0) as loan:\n...     loan.buffer[:] = b'hello'"},
    {"_subscribe", (PyCFunction)(void (*)(void))Topic_subscribe, FAST,
     "_subscribe($self, /, cls, history=None, timeout=None)\n--\n\n"
     "A new cursor of class cls (see Topic.subscribe)."},
    {"_bind", (PyCFunction)Topic_bind, METH_VARARGS,
     "_bind($self, mapping, offset, name, /)\n--\n\n"
     "Attach this handle to the topic at offset."},
    {"_unbind", (PyCFunction)Topic_unbind, METH_NOARGS,
     "_unbind($self, /)\n--\n\nForget the mapping."},
    {"_init_topic", (PyCFunction)Topic_init_topic, METH_VARARGS | METH_STATIC,
     "_init_topic(mapping, offset, capacity, history, overflow, max_subscribers, /)\n--\n\n"
     "Format a new topic at offset (creator only)."},
    {"_wake_all", (PyCFunction)Topic_wake_all, METH_NOARGS,
     "_wake_all($self, /)\n--\n\nWake every sleeping publisher and subscriber."},
    {"_stats", (PyCFunction)Topic_stats, METH_NOARGS,
     "_stats($self, /)\n--\n\nThe counters and the live subscribers, as a dict."},
    {NULL}
};

static PyGetSetDef Topic_getset[] = {
    {"capacity", (getter)Topic_get_capacity, NULL, "bytes in the ring's data area", NULL},
    {"max_message", (getter)Topic_get_max_message, NULL, "largest message in bytes", NULL},
    {"history", (getter)Topic_get_history, NULL, "earlier messages kept for late joiners",
     NULL},
    {"overflow", (getter)Topic_get_overflow, NULL, "\"block\" or \"overwrite\"", NULL},
    {"max_subscribers", (getter)Topic_get_max_subscribers, NULL,
     "entries of the subscriber table", NULL},
    {"published", (getter)Topic_get_published, NULL, "messages published so far", NULL},
    {NULL}
};

static PyType_Slot topic_spec_slots[] = {
    {Py_tp_dealloc, Topic_dealloc},
    {Py_tp_doc, "Topic()\n--\n\nThe broadcast ring's hot path; shmkit.Topic builds on it."},
    {Py_tp_methods, Topic_methods},
    {Py_tp_getset, Topic_getset},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec topic_spec = {
    .name = "shmkit._core.Topic",
    .basicsize = sizeof(TopicObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = topic_spec_slots,
};

/* ---- TopicSubscriber ------------------------------------------------------- */

/* Check the subscription is usable from this thread now and pin the
 * mapping.  Returns the entry, or NULL with an error set. */
static struct topic_sub *
sub_enter(SubObject *s, MappingObject **mp, int busy)
{
    TopicObject *o = s->topic;
    MappingObject *m = (MappingObject *)s->mapping;
    if (s->closed || o == NULL || m == NULL || o->mapping != (PyObject *)m ||
        m->base == NULL || m->closing || m->token == 0) {
        PyErr_Format(TST(s)->ClosedError, "this subscriber of topic %R is closed; subscribe "
                     "again", o && o->name ? o->name : Py_None);
        return NULL;
    }
    if (m->token != s->token) {
        PyErr_Format(TST(s)->ClosedError, "this subscriber of topic %R belongs to the process "
                     "that subscribed (this one is a fork of it); subscribe again here",
                     o->name);
        return NULL;
    }
    struct topic_sub *e = &o->t.subs[s->idx];
    if (LOAD(&e->owner) != s->token) {
        PyErr_Format(TST(s)->ClosedError, "this subscriber of topic %R lost its place in the "
                     "subscriber table (the table was damaged); subscribe again", o->name);
        return NULL;
    }
    if (busy && s->busy) {
        PyErr_Format(TST(s)->BusyError, "this subscriber of topic %R is receiving in another "
                     "thread; give each thread its own subscriber (topic.subscribe())",
                     o->name);
        return NULL;
    }
    shm_pin((PyObject *)m);
    if (busy)
        s->busy = 1;
    *mp = m;
    return e;
}

static void sub_unsubscribe(SubObject *s);

static void
sub_leave(SubObject *s, MappingObject *m, int busy)
{
    if (busy) {
        s->busy = 0;
        if (s->closed) /* closed by another thread meanwhile: leave the table now */
            sub_unsubscribe(s);
    }
    shm_unpin((PyObject *)m);
}

/* After a wait or a copy without the GIL: ClosedError (-1) if another
 * thread closed this subscriber meanwhile. */
static int
sub_still_open(SubObject *s)
{
    if (!s->closed)
        return 0;
    PyErr_Format(TST(s)->ClosedError, "this subscriber of topic %R was closed while it "
                 "received", s->topic->name);
    return -1;
}

static uint64_t
sub_hold(SubObject *s, uint64_t next)
{
    return s->nlent ? s->lent[0] : next;
}

static PyObject *make_tview(SubObject *s, MappingObject *m, uint64_t pos, uint32_t len);

/* Raise the losses counted in s->lost (met now, or by a recv_many that
 * returned the messages it had taken first): -1 with MessagesLost set;
 * else 0.  The count is cleared only once MessagesLost is raised: if
 * making it fails (Ctrl-C inside its __init__, no memory), the next call
 * reports it. */
static int
sub_report_lost(SubObject *s)
{
    uint64_t missed = s->lost;
    if (missed == 0)
        return 0;
    raise_lost(TST(s), s->topic->name, missed);
    if (PyErr_ExceptionMatches(TST(s)->MessagesLost))
        s->lost = 0;
    return -1;
}

enum { HOW_COPY, HOW_VIEW };

/* fit (or NULL): the sizes a message must have to be taken, fit[0] a
 * multiple of (0: any), fit[1] exactly (UINT64_MAX: any).  A message that
 * does not fit is left unread and its length returned, an int, for the
 * caller to say why (recv_array: an array of it would not fit). */
static PyObject *
recv_impl(SubObject *s, PyObject *timeout, int nowait, int how, const uint64_t *fit)
{
    MappingObject *m;
    int64_t deadline;
    if (msg_deadline(timeout, nowait, &deadline) < 0)
        return NULL;
    struct topic_sub *e = sub_enter(s, &m, 1);
    if (e == NULL)
        return NULL;
    TopicObject *o = s->topic;
    topic_t *t = &o->t;
    PyObject *out = NULL;
    /* Kept messages first: they came before any loss met since (as
     * recv_many's), and a view of one holds no place in the ring. */
    if (s->kept.list != NULL && msg_kept_count(&s->kept) > 0) {
        uint64_t len = (uint64_t)PyBytes_GET_SIZE(PyList_GET_ITEM(s->kept.list, 0));
        if (fit != NULL && !msg_fits(fit, len))
            out = PyLong_FromUnsignedLongLong(len); /* (as below) */
        else
            out = msg_kept_give(&s->kept, how == HOW_VIEW ? TST(s)->TopicView : NULL, m);
        goto done;
    }
    if (sub_report_lost(s) < 0)
        goto done;
    if (how == HOW_VIEW && s->nlent >= LENT_MAX) {
        PyErr_Format(TST(s)->BusyError, "this subscriber of topic %R holds %d views; release some "
                     "first", o->name, LENT_MAX);
        goto done;
    }
    for (;;) {
        uint64_t pos = 0, missed = 0;
        uint32_t len = 0;
        int k = topic_next(t, e, &pos, &len, &missed);
        if (k < 0)
            goto done;
        if (k == TN_LOST) {
            s->lost += missed;
            sub_report_lost(s);
            goto done;
        }
        if (k == TN_READY) {
            const char *src = (const char *)(trec_at(t, pos) + 1);
            if (fit != NULL && !msg_fits(fit, len)) {
                out = PyLong_FromUnsignedLong(len);
                goto done;
            }
            if (how == HOW_VIEW) {
                if (PyErr_CheckSignals() < 0)
                    goto done; /* a handler raised: nothing taken */
                if (t->overflow == TOPIC_BLOCK) {
                    s->lent[s->nlent++] = pos;
                }
                topic_advance(t, e, pos + trec_total(len), 1, sub_hold(s, pos + trec_total(len)), 1);
                shm_crash_point("topic.recv.lent");
                out = make_tview(s, m, pos, len);
                if (out == NULL && t->overflow == TOPIC_BLOCK) {
                    s->nlent--;
                    topic_set_hold(t, e, sub_hold(s, LOADR(&e->pos)));
                }
                goto done;
            }
            out = msg_new_bytes(len);
            if (out == NULL)
                goto done;
            ring_copy(PyBytes_AS_STRING(out), src, len);
            shm_crash_point("topic.recv.copied");
            if (!topic_still_there(t, pos)) {
                Py_CLEAR(out); /* torn: the next look reports the loss */
                continue;
            }
            topic_advance(t, e, pos + trec_total(len), 1, sub_hold(s, pos + trec_total(len)), 1);
            sub_leave(s, m, 1);
            return msg_keep_if_interrupted(&s->kept, out, NULL);
        }
        if (nowait) {
            PyErr_Format(TST(s)->Empty, "no new message on topic %R", o->name);
            goto done;
        }
        int w = topic_wait_data(t, m, e, &s->closed, deadline, &s->spin_ns);
        if (w < 0 || sub_still_open(s) < 0)
            goto done;
        if (w == 0) {
            shm_deadline_passed(TST(s)->Timeout, "no message arrived on topic %R within the "
                         "timeout", o->name);
            goto done;
        }
    }
done:
    sub_leave(s, m, 1);
    return out;
}

static PyObject *
Sub_recv(SubObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", NULL};
    PyObject *a[1];
    if (msg_parse_args("recv", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    return recv_impl(s, a[0], 0, HOW_COPY, NULL);
}

static PyObject *
Sub_recv_nowait(SubObject *s, PyObject *Py_UNUSED(ignored))
{
    return recv_impl(s, NULL, 1, HOW_COPY, NULL);
}

/* Wait as recv() for the first message, then take those already there, up
 * to max_n, without waiting.  A loss met after the first is left for the
 * next call to raise, so that the messages taken are returned. */
static PyObject *
Sub_recv_many(SubObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"max_n", "timeout", NULL};
    PyObject *a[2];
    int64_t deadline;
    Py_ssize_t max_n = 1024;
    if (msg_parse_args("recv_many", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    if (a[0] && (PyBool_Check(a[0]) || !PyIndex_Check(a[0]))) {
        /* recv_many(True) is a slip, not max_n=1 */
        PyErr_Format(PyExc_TypeError, "max_n must be an int, not %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    if (a[0] && (max_n = PyNumber_AsSsize_t(a[0], PyExc_OverflowError)) == -1 &&
        PyErr_Occurred())
        return NULL;
    if (max_n < 1) {
        PyErr_SetString(PyExc_ValueError, "recv_many() needs max_n >= 1");
        return NULL;
    }
    if (msg_deadline(a[1], 0, &deadline) < 0)
        return NULL;
    MappingObject *m;
    struct topic_sub *e = sub_enter(s, &m, 1);
    if (e == NULL)
        return NULL;
    TopicObject *o = s->topic;
    topic_t *t = &o->t;
    if (s->kept.list != NULL && msg_kept_count(&s->kept) > 0) { /* those first, and no more */
        PyObject *first = msg_kept_take(&s->kept, max_n);
        sub_leave(s, m, 1);
        return first;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL || sub_report_lost(s) < 0)
        goto fail;
    while (PyList_GET_SIZE(list) < max_n) {
        uint64_t pos = 0, missed = 0;
        uint32_t len = 0;
        int k = topic_next(t, e, &pos, &len, &missed);
        if (k < 0)
            goto fail;
        if (k == TN_LOST) {
            s->lost += missed;
            if (PyList_GET_SIZE(list) > 0)
                break; /* the messages taken go out now, the loss with the next call */
            sub_report_lost(s);
            goto fail;
        }
        if (k == TN_READY) {
            uint64_t rpos[RUN_MAX];
            uint32_t rlen[RUN_MAX];
            Py_ssize_t had = PyList_GET_SIZE(list), room = max_n - had;
            int n = topic_run(t, e, pos, len, rpos, rlen, room < RUN_MAX ? (int)room : RUN_MAX);
            for (int i = 0; i < n; i++) {
                PyObject *b = msg_new_bytes(rlen[i]);
                if (b == NULL || PyList_Append(list, b) < 0) {
                    Py_XDECREF(b); /* none of the run taken: it stays for the next call */
                    PyList_SetSlice(list, had, PY_SSIZE_T_MAX, NULL);
                    goto fail;
                }
                Py_DECREF(b);
                ring_copy(PyBytes_AS_STRING(b), (const char *)(trec_at(t, rpos[i]) + 1), rlen[i]);
            }
            shm_crash_point("topic.recv.copied");
            if (!topic_still_there(t, rpos[0])) {
                /* some were overwritten while copied: the next look reports the loss */
                PyList_SetSlice(list, had, PY_SSIZE_T_MAX, NULL);
                continue;
            }
            uint64_t next = rpos[n - 1] + trec_total(rlen[n - 1]);
            topic_advance(t, e, next, (uint64_t)n, sub_hold(s, next), 0);
            continue;
        }
        if (PyList_GET_SIZE(list) > 0)
            break;
        int w = topic_wait_data(t, m, e, &s->closed, deadline, &s->spin_ns);
        if (w < 0 || sub_still_open(s) < 0)
            goto fail;
        if (w == 0)
            break; /* [] on timeout, as Channel.recv_many */
    }
    topic_wake_publishers(t);
    sub_leave(s, m, 1);
    return msg_keep_if_interrupted(&s->kept, list, NULL);
fail:
    if (list != NULL && PyList_GET_SIZE(list) > 0)
        topic_wake_publishers(t);
    sub_leave(s, m, 1);
    if (list != NULL && PyList_GET_SIZE(list) > 0) {
        PyErr_Clear(); /* messages already taken are delivered */
        return msg_keep_if_interrupted(&s->kept, list, NULL);
    }
    Py_XDECREF(list);
    return NULL;
}

static PyObject *
Sub_take(SubObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    PyObject *timeout;
    int nowait;
    if (msg_take_args(args, nargs, kw, &timeout, &nowait) < 0)
        return NULL;
    return recv_impl(s, timeout, nowait, HOW_VIEW, NULL);
}

/* _take_sized(timeout, unit, nbytes): _take, for a message whose length is
 * a multiple of unit (0: any) and, unless nbytes is None, nbytes exactly;
 * another is left unread and its length returned (recv_array). */
static PyObject *
Sub_take_sized(SubObject *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "unit", "nbytes", NULL};
    PyObject *a[3];
    uint64_t fit[2];
    if (msg_parse_args("_take_sized", args, nargs, kw, 3, names, a) < 0 ||
        msg_fit_args(a[1], a[2], fit) < 0)
        return NULL;
    return recv_impl(s, a[0], 0, HOW_VIEW, fit);
}

static void
sub_unsubscribe(SubObject *s)
{
    TopicObject *o = s->topic;
    MappingObject *m = (MappingObject *)s->mapping;
    if (o != NULL && m != NULL && o->mapping == (PyObject *)m && m->base != NULL &&
        m->token == s->token && s->token != 0)
        topic_unsubscribe(&o->t, s->idx, s->token);
    s->nlent = 0;
}

/* A receive running in another thread (busy) still uses the entry: it
 * leaves the table when that receive ends (sub_leave); its wait ends now. */
static void
sub_close(SubObject *s)
{
    if (s->closed)
        return;
    __atomic_store_n(&s->closed, 1, __ATOMIC_RELAXED);
    if (!s->busy) {
        sub_unsubscribe(s);
        return;
    }
    TopicObject *o = s->topic;
    MappingObject *m = (MappingObject *)s->mapping;
    if (o != NULL && m != NULL && o->mapping == (PyObject *)m && m->base != NULL)
        ring_wake(&o->t.h->data_seq, &o->t.h->data_sleepers);
}

static PyObject *
Sub_close(SubObject *s, PyObject *Py_UNUSED(ignored))
{
    sub_close(s);
    Py_CLEAR(s->kept.list);
    Py_RETURN_NONE;
}

static PyObject *
Sub_get_closed(SubObject *s, void *Py_UNUSED(c))
{
    MappingObject *m = (MappingObject *)s->mapping;
    return PyBool_FromLong(s->closed || m == NULL || m->base == NULL ||
                           s->topic == NULL || s->topic->mapping != (PyObject *)m);
}

static PyObject *
sub_counter(SubObject *s, int which)
{
    MappingObject *m;
    struct topic_sub *e = sub_enter(s, &m, 0);
    if (e == NULL)
        return NULL;
    uint64_t v;
    if (which == 0) {
        uint64_t sq = LOAD(&s->topic->t.h->seq), mine = LOAD(&e->seq);
        v = sq >= mine ? sq - mine : 0;
    } else {
        v = which == 1 ? LOAD(&e->received) : LOAD(&e->missed);
    }
    sub_leave(s, m, 0);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *Sub_get_lag(SubObject *s, void *c) { (void)c; return sub_counter(s, 0); }
static PyObject *Sub_get_kept(SubObject *s, void *c) { (void)c; return PyLong_FromSsize_t(msg_kept_count(&s->kept)); }
static PyObject *Sub_get_received(SubObject *s, void *c) { (void)c; return sub_counter(s, 1); }
static PyObject *Sub_get_missed(SubObject *s, void *c) { (void)c; return sub_counter(s, 2); }

static PyObject *
Sub_get_index(SubObject *s, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(s->idx);
}

static PyObject *
Sub_get_topic_name(SubObject *s, void *Py_UNUSED(c))
{
    if (s->topic == NULL || s->topic->name == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(s->topic->name);
}

static int Sub_clear(SubObject *s);

static void
Sub_dealloc(SubObject *s)
{
    PyObject_GC_UnTrack(s);
    if (s->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)s);
    Sub_clear(s);
    PyTypeObject *tp = Py_TYPE(s);
    tp->tp_free((PyObject *)s);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

/* A subscriber refers to its topic handle, which a program may make refer
 * back to it (`topic.sub = topic.subscribe()`): the collector must see that
 * edge, or such a pair, its descriptor and its subscriber entry, live as
 * long as the process. */
static int
Sub_traverse(SubObject *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s)); /* a heap type */
    Py_VISIT(s->topic);
    Py_VISIT(s->mapping);
    Py_VISIT(s->kept.list);
    return 0;
}

/* Leave the topic, then let go: for dealloc, and for the collector when
 * the subscriber is unreachable in a cycle. */
static int
Sub_clear(SubObject *s)
{
    sub_close(s);
    Py_CLEAR(s->topic);
    Py_CLEAR(s->mapping);
    Py_CLEAR(s->kept.list);
    return 0;
}

static PyObject *
Sub_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyErr_SetString(PyExc_TypeError, "subscribers are made by Topic.subscribe()");
    return NULL;
}

/* _keep(view): as the Ring's (ringtype.c), for recv_array; a view of a
 * message overwritten meanwhile (overflow="overwrite") is not kept: it is
 * lost, as its release reports. */
static int tv_intact(MsgViewObject *v);

static PyObject *
Sub_keep(SubObject *s, PyObject *view)
{
    if (Py_IS_TYPE(view, TST(s)->TopicView) && tv_intact((MsgViewObject *)view))
        msg_kept_view(&s->kept, (MsgViewObject *)view);
    Py_RETURN_NONE;
}

static PyMethodDef Sub_methods[] = {
    {"_keep", (PyCFunction)Sub_keep, METH_O,
     "_keep($self, view, /)\n--\n\n"
     "Keep a view's message for the next receive (recv_array's, when its array failed)."},
    {"recv", (PyCFunction)(void (*)(void))Sub_recv, FAST,
     "recv($self, /, timeout=None)\n--\n\nThe next message; wait until one is published.\n"
     "Raises Timeout, or MessagesLost (with .missed) when messages were overwritten before\n"
     "this subscriber read them; the next call goes on from the oldest one still there.\n\n"
     ">>> sub.recv(timeout=1.0)\nb'tick'"},
    {"recv_nowait", (PyCFunction)Sub_recv_nowait, METH_NOARGS,
     "recv_nowait($self, /)\n--\n\nThe next message, or raise Empty (a WouldBlock)."},
    {"recv_many", (PyCFunction)(void (*)(void))Sub_recv_many, FAST,
     "recv_many($self, /, max_n=1024, timeout=None)\n--\n\n"
     "recv_many(max_n=1024, timeout=None) -> list[bytes]\n\nWait as recv() for the next "
     "message, then take the ones already published\nafter it, up to max_n, in one call; [] "
     "on timeout.  Raises MessagesLost as\nrecv() does; a loss met after the first message is "
     "raised by the next call,\nso the messages taken are never dropped.\n\n"
     ">>> sub.recv_many(timeout=1.0)\n[b'a', b'b']"},
    {"_take", (PyCFunction)(void (*)(void))Sub_take, FAST,
     "_take($self, /, timeout=None, nowait=False)\n--\n\n"
     "The next message as a TopicView (see Subscriber.recv_view)."},
    {"_take_sized", (PyCFunction)(void (*)(void))Sub_take_sized, FAST,
     "_take_sized($self, /, timeout, unit, nbytes)\n--\n\n"
     "_take, for a message of a multiple of unit bytes (0: any) and of nbytes\n"
     "(None: any); another is left unread and its length returned."},
    {"close", (PyCFunction)Sub_close, METH_NOARGS,
     "close($self, /)\n--\n\nLeave the topic: publishers stop keeping messages for this subscriber."},
    {NULL}
};

static PyGetSetDef Sub_getset[] = {
    {"closed", (getter)Sub_get_closed, NULL, "True once closed (or its topic handle is)",
     NULL},
    {"lag", (getter)Sub_get_lag, NULL, "messages published that it has not read yet", NULL},
    {"_kept", (getter)Sub_get_kept, NULL,
     "messages it took as a signal handler raised: its next receives' own", NULL},
    {"received", (getter)Sub_get_received, NULL, "messages it received", NULL},
    {"missed", (getter)Sub_get_missed, NULL, "messages it lost to overwriting", NULL},
    {"index", (getter)Sub_get_index, NULL, "its entry in the subscriber table", NULL},
    {"topic_name", (getter)Sub_get_topic_name, NULL, "the topic's name", NULL},
    {NULL}
};

static PyMemberDef Sub_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(SubObject, weakreflist), READONLY, NULL},
    {NULL}
};

static PyType_Slot sub_spec_slots[] = {
    {Py_tp_dealloc, Sub_dealloc},
    {Py_tp_traverse, Sub_traverse},
    {Py_tp_clear, Sub_clear},
    {Py_tp_doc, "A subscriber's cursor on a topic; shmkit.Subscriber builds on it.\n"
                "Made by Topic.subscribe(), never directly."},
    {Py_tp_methods, Sub_methods},
    {Py_tp_getset, Sub_getset},
    {Py_tp_members, Sub_members},
    {Py_tp_new, Sub_new},
    {0, NULL},
};

static PyType_Spec sub_spec = {
    .name = "shmkit._core.TopicSubscriber",
    .basicsize = sizeof(SubObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = sub_spec_slots,
};

/* ---- TopicView: a message lent in place ------------------------------------ */

/* Give the record back: drop it from the subscriber's lent list and let
 * publishers reuse its space.  Raises MessagesLost (unless quiet) if its
 * bytes were overwritten while lent (overflow="overwrite" reuses them). */
static int
tv_give_back(MsgViewObject *v, int quiet)
{
    SubObject *s = (SubObject *)v->owner;
    MappingObject *m = (MappingObject *)v->mapping;
    int intact = 1;
    if (!s->closed && s->topic->mapping == (PyObject *)m && m->base != NULL &&
        m->token == s->token) {
        topic_t *t = &s->topic->t;
        intact = topic_still_there(t, v->pos);
        for (uint32_t i = 0; i < s->nlent; i++) {
            if (s->lent[i] == v->pos) {
                memmove(&s->lent[i], &s->lent[i + 1], (s->nlent - i - 1) * sizeof(uint64_t));
                s->nlent--;
                struct topic_sub *e = &t->subs[s->idx];
                if (LOAD(&e->owner) == s->token)
                    topic_set_hold(t, e, sub_hold(s, LOADR(&e->pos)));
                shm_crash_point("topic.recv.released");
                break;
            }
        }
    }
    if (intact || quiet)
        return 0;
    raise_lost_msg(TST(v), PyUnicode_FromFormat(
        "topic %R: the message lent as a view was overwritten while it was held "
        "(overflow=\"overwrite\" never waits); what was read from it may be torn: "
        "copy it (recv) or release views sooner", s->topic ? s->topic->name : Py_None), 1);
    return -1;
}

static const msgview_ops tv_ops = {
    .give_back = tv_give_back,
    .exported = "an array or memoryview made from the message view is still alive; copy "
                "what you need inside the with block",
};

static PyObject *
make_tview(SubObject *s, MappingObject *m, uint64_t pos, uint32_t len)
{
    return msgview_new(TST(s)->TopicView, &tv_ops, (PyObject *)s, m,
                       (char *)(trec_at(&s->topic->t, pos) + 1), len, pos, s->token);
}

static int
tv_intact(MsgViewObject *v)
{
    if (v->released)
        return 0;
    if (v->ops != &tv_ops) /* a view of a kept message: its bytes are the handle's own */
        return 1;
    return topic_still_there(&((SubObject *)v->owner)->topic->t, v->pos);
}

static PyObject *
tv_get_intact(MsgViewObject *v, void *Py_UNUSED(c))
{
    return PyBool_FromLong(tv_intact(v));
}

static PyMethodDef tv_methods[] = {
    MSGVIEW_METHODS("Give the message's space back.  With overflow=\"overwrite\", raises\n"
                    "MessagesLost if it was overwritten while held."),
    {NULL}
};

static PyGetSetDef tv_getset[] = {
    MSGVIEW_NBYTES,
    {"intact", (getter)tv_get_intact, NULL,
     "False once the message was overwritten (overflow=\"overwrite\" only)", NULL},
    {NULL}
};

static PyType_Slot tv_spec_slots[] = {
    MSGVIEW_SLOTS,
    {Py_tp_doc, "A topic message lent in place (read-only): ``with sub.recv_view() as mv:``."},
    {Py_tp_methods, tv_methods},
    {Py_tp_getset, tv_getset},
    {0, NULL},
};

static PyType_Spec tv_spec = {
    .name = "shmkit._core.TopicView",
    .basicsize = sizeof(MsgViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_GC,
    .slots = tv_spec_slots,
};

/* ---- module glue ------------------------------------------------------------ */

/* _core.layouts["topic"]: the header's and a subscriber entry's offsets. */
static int
put(PyObject *d, const char *key, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    int r = o == NULL ? -1 : PyDict_SetItemString(d, key, o);
    Py_XDECREF(o);
    return r;
}

#define TOFF(d, type, field) put(d, #field, (long long)offsetof(type, field))

static int
add_layout(PyObject *module)
{
    PyObject *layouts = PyObject_GetAttrString(module, "layouts");
    if (layouts == NULL) {
        PyErr_Clear();
        return 0; /* registered before the layouts: Python reads the constants */
    }
    PyObject *d = PyDict_New(), *sub = PyDict_New();
    typedef struct topic_hdr T;
    typedef struct topic_sub S;
    int bad = d == NULL || sub == NULL ||
              put(d, "format_version", TOPIC_FORMAT) < 0 || put(d, "bytes", TOPIC_ROLES_OFF) < 0 ||
              TOFF(d, T, magic) < 0 || TOFF(d, T, format) < 0 || TOFF(d, T, cap) < 0 ||
              TOFF(d, T, data_off) < 0 || TOFF(d, T, history) < 0 || TOFF(d, T, max_subs) < 0 ||
              TOFF(d, T, overflow) < 0 || TOFF(d, T, max_slots) < 0 || TOFF(d, T, subs_off) < 0 ||
              TOFF(d, T, tail) < 0 || TOFF(d, T, seq) < 0 || TOFF(d, T, floor) < 0 ||
              TOFF(d, T, hist) < 0 || TOFF(d, T, plock) < 0 || TOFF(d, T, jsel) < 0 ||
              TOFF(d, T, j) < 0 || TOFF(d, T, head) < 0 || TOFF(d, T, data_seq) < 0 ||
              TOFF(d, T, data_sleepers) < 0 || TOFF(d, T, space_seq) < 0 ||
              TOFF(d, T, space_sleepers) < 0 || put(d, "roles", TOPIC_ROLES_OFF) < 0 ||
              put(sub, "bytes", TOPIC_SUB_BYTES) < 0 || TOFF(sub, S, owner) < 0 ||
              TOFF(sub, S, pos) < 0 || TOFF(sub, S, hold) < 0 || TOFF(sub, S, seq) < 0 ||
              TOFF(sub, S, received) < 0 || TOFF(sub, S, missed) < 0 ||
              TOFF(sub, S, joined) < 0 || put(d, "record_header", sizeof(trec_t)) < 0 ||
              PyDict_SetItemString(d, "subscriber", sub) < 0 ||
              PyDict_SetItemString(layouts, "topic", d) < 0;
    Py_XDECREF(d);
    Py_XDECREF(sub);
    Py_DECREF(layouts);
    return bad ? -1 : 0;
}

int
shm_init_topic(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    if (shm_add_type(module, &topic_spec, &st->Topic) < 0 ||
        shm_add_type(module, &sub_spec, &st->TopicSubscriber) < 0 ||
        shm_add_type(module, &tv_spec, &st->TopicView) < 0)
        return -1;
    if (add_layout(module) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "TOPIC_FORMAT", TOPIC_FORMAT);
}
