/* ringtype.c - the Python face of the message ring: shmkit._core.Ring
 * (which shmkit.Channel subclasses, so that ch.send(b) is one C call) and
 * RecordView (a received message lent in place).  The protocol itself is
 * in ring.c.
 *
 *   ch.send(data, timeout=None)      ch.recv(timeout=None) -> bytes
 *   ch.send_nowait(data)             ch.recv_nowait() -> bytes
 *   ch.send_many(msgs, timeout=None) ch.recv_many(max_n=1024, timeout=None)
 *   ch.recv_into(buffer, timeout=None) -> int
 *   ch._take(timeout=None) -> RecordView: with view as memoryview: ...
 */
#include "ring.h"
#include "journal.h"
#include "msgtype.h"
#include <structmember.h>
#include <string.h>


/* ---- Python: argument helpers ----------------------------------------- */

#define CHANNEL_HINT "encode it, or use shmkit.Queue for Python objects"

/* For sending and receiving (to_use: a live, writable attachment), or for
 * reading the ring's state. */
static inline MappingObject *
ring_enter_any(RingObject *r, int to_use)
{
    return msg_enter((PyObject *)r, r->mapping, r->name, to_use, "channel", "send or receive");
}

static inline MappingObject *ring_enter(RingObject *r) { return ring_enter_any(r, 1); }

static int
check_size(RingObject *r, Py_ssize_t len)
{
    if ((uint64_t)len > UINT32_MAX - 16 || rec_total((uint64_t)len) > r->cap)
        return msg_too_large((PyObject *)r, "channel", r->name, len,
                             (unsigned long long)(r->cap - 8));
    return 0;
}

/* ---- Python: sending -------------------------------------------------- */

/* Send n messages (bufs) in order, as many per lock holding as fit.
 * Returns how many were sent; on error also sets *err. */
static Py_ssize_t
ring_send(RingObject *r, MappingObject *m, Py_buffer *bufs, Py_ssize_t n,
          PyObject *timeout, int nowait, int *err)
{
    uint32_t me = m->token;
    ring_claim(r, me, ROLE_PRODUCER);
    Py_ssize_t lens_small[64], *lens = lens_small, done = 0;
    int fruitless = 0;
    uint64_t pos_small[64], *pos = pos_small;
    int64_t deadline;
    *err = 0;
    if (msg_deadline(timeout, nowait, &deadline) < 0) {
        *err = 1;
        return 0;
    }
    if (n > 64) {
        lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)n);
        pos = PyMem_Malloc(sizeof(uint64_t) * (size_t)n);
        if (!lens || !pos) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        lens[i] = bufs[i].len;
    while (done < n) {
        Py_ssize_t k = ring_reserve(r, m, me, lens + done, n - done, pos, deadline);
        if (k < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < k; i++)
            ring_fill(r, pos[i], bufs[done + i].buf, bufs[done + i].len);
        if (k > 0)
            ring_wake(&r->h->data_seq, &r->h->data_sleepers);
        done += k;
        if (done == n)
            break;
        if (k == 0) {
            int w = nowait ? 0 : ring_wait(r, m, me, 1, rec_total((uint64_t)lens[done]),
                                           deadline, 0);
            if (w < 0)
                goto fail;
            if (w == 0) {
                if (nowait)
                    PyErr_Format(RING_ST(r)->Full, "channel %R is full", r->name);
                else
                    shm_deadline_passed(RING_ST(r)->Timeout, "channel %R stayed full for the "
                                 "timeout; %zd of %zd messages were sent", r->name, done, n);
                goto fail;
            }
            if (ring_backoff(&fruitless) < 0)
                goto fail;
        }
    }
    goto out;
fail:
    *err = 1;
out:
    if (lens != lens_small)
        PyMem_Free(lens);
    if (pos != pos_small)
        PyMem_Free(pos);
    return done;
}

static PyObject *
send_impl(RingObject *r, PyObject *msg, PyObject *timeout, int nowait)
{
    Py_buffer b;
    if (msg_get(msg, &b, "channel", CHANNEL_HINT) < 0)
        return NULL;
    if (check_size(r, b.len) < 0) {
        msg_release(&b);
        return NULL;
    }
    MappingObject *m = ring_enter(r);
    if (m == NULL) {
        msg_release(&b);
        return NULL;
    }
    int err;
    ring_send(r, m, &b, 1, timeout, nowait, &err);
    ring_leave(m);
    msg_release(&b);
    if (err)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Ring_send(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"data", "timeout", NULL};
    PyObject *a[2];
    if (msg_parse_args("send", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    return send_impl(r, a[0], a[1], 0);
}

static PyObject *
Ring_send_nowait(RingObject *r, PyObject *msg)
{
    return send_impl(r, msg, NULL, 1);
}

static int
batch_fits(PyObject *r, Py_ssize_t len)
{
    return check_size((RingObject *)r, len);
}

static PyObject *
Ring_send_many(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"messages", "timeout", NULL};
    PyObject *a[2];
    msg_batch b;
    if (msg_parse_args("send_many", args, nargs, kw, 1, names, a) < 0 ||
        msg_batch_get(&b, a[0], "send_many", "channel", CHANNEL_HINT, (PyObject *)r,
                      batch_fits) < 0)
        return NULL; /* nothing sent */
    Py_ssize_t sent = 0;
    int err = 1;
    MappingObject *m = ring_enter(r);
    if (m != NULL) {
        sent = ring_send(r, m, b.bufs, b.n, a[1], 0, &err);
        ring_leave(m);
    }
    msg_batch_release(&b);
    if (err) {
        msg_note_sent(sent);
        return NULL;
    }
    return PyLong_FromSsize_t(sent);
}

/* ---- Python: receiving ------------------------------------------------ */

/* The sized takes last: the hot path asks `how >= R_INTO` once. */
enum { R_COPY, R_VIEW, R_DECODE, R_INTO, R_FIT };

/* A sized take's terms: R_INTO copies the message into `into` if it has
 * room; R_FIT lends it as a view (as R_VIEW, not redelivered) if its
 * length fits `fit` (msg_fits).  Either leaves one that does not in the
 * channel, next in line. */
typedef struct {
    Py_buffer *into;
    uint64_t fit[2];
} sized_t;

/* recv_impl's own outcome of ring_next (beside ring.h's T_*): an R_FIT
 * message that does not fit, left where it is. */
enum { T_MISFIT = T_WRITING + 1 };

static PyObject *make_view(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len,
                           uint32_t me);
static int view_finish(RingObject *r, MappingObject *m, rec_t *rec, uint32_t token);

/* view_finish on a failing path: the exception that made the call fail is
 * the one it raises; a second one from finishing the record is dropped. */
static void
view_finish_keep(RingObject *r, MappingObject *m, rec_t *rec, uint32_t token)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (view_finish(r, m, rec, token) < 0)
        PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* A record this call lent but cannot hand out (the call is failing): a
 * redeliver view goes back to the channel, any other is finished. */
static void
lent_undo(RingObject *r, MappingObject *m, uint64_t pos, uint32_t me, int redeliver)
{
    if (!redeliver) {
        view_finish_keep(r, m, rec_at(r, pos), me);
        return;
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    struct ring_hdr *h = r->h;
    rec_t *rec = rec_at(r, pos);
    if (ring_lock(r, m, &h->clock, me, SHM_FOREVER) < 0) {
        PyErr_Clear();
        /* (a signal's handler ended the wait) A redeliver view is given back
         * by a waiter's repair once we are gone; a record taken otherwise,
         * which no repair gives back, is finished rather than left to hold
         * the channel's space while this handle lives. */
        if (LOAD(&rec->state) == (ST_TAKEN | (me & SHM_TOKEN_MASK)) &&
            view_finish(r, m, rec, me) < 0)
            PyErr_Clear();
    } else {
        int back = ring_give_back(r, pos, me);
        ring_unlock(m, &h->clock);
        if (back)
            ring_wake(&h->data_seq, &h->data_sleepers);
    }
    PyErr_Restore(et, ev, tb);
}

/* A record this call took but cannot hand out, as a signal's handler
 * raised: its bytes kept for the next receive (msgtype.h) and the record
 * finished.  0 (nothing done) with no memory for the bytes. */
static int
keep_record(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len, uint32_t me)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *msg = PyBytes_FromStringAndSize((const char *)(rec_at(r, pos) + 1), len);
    if (msg == NULL)
        PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    if (msg == NULL)
        return 0;
    msg_kept_put(&r->kept, msg, 1);
    Py_DECREF(msg);
    view_finish_keep(r, m, rec_at(r, pos), me);
    return 1;
}

/* Run a decoding's `after` (None, or a call of the core) once its message
 * is finished: housekeeping of the payload file, whose failure never
 * changes the outcome.  The exception set, if any, is kept. */
static void
run_after(PyObject *after)
{
    if (after == NULL || after == Py_None)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *done = PyObject_CallNoArgs(after);
    Py_XDECREF(done);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* Is the exception that stopped a decoding the message's fault, which
 * finishes it (lost)?  Never a KeyboardInterrupt: a Ctrl-C gives it back,
 * however often.  For a pickle, any other Exception is.  For a big
 * object's header (decoded by unpack), the unpickling's errors are (unpack
 * then has appended the payload file's let-go to at_fault, a list only
 * this call holds), and so are the verdicts of unpack's checks that the
 * file is missing, damaged or not to be trusted (it appends None to
 * at_fault just before it raises one: an exception's class does not tell,
 * since a signal handler may raise any), and memory (an object too big for
 * this process must not stop the queue).  Anything else came from a signal
 * handler, an Exception raised on unpack's way (a TimeoutError of an alarm,
 * say), this process running out of descriptors, or another interrupt
 * (SystemExit...), or a handler's exception that stopped a pickle's
 * decoding (`handler`, raised_by_a_handler).  It gives the message back,
 * unless the same message failed so UNPACK_RETRIES times here: then it is
 * the message's
 * too, which must not stop the queue either (a storm of such signals fails
 * one message 4 times in a row in a few thousand; a pickle whose rebuild
 * raises SystemExit fails it every time).  The count is kept for each of
 * the last BACK_SLOTS messages that failed so and are still in the queue
 * (back_stale), not for the last alone: two such poisons, one taken by a
 * handler's get inside the other's rebuild, fail in turn.  *after, a new
 * reference, is the let-go at_fault holds, if any, when it is the
 * message's fault.  Runs no Python code: the exception, whatever its class
 * does, is only matched by type.  The exception stays set. */
#define UNPACK_RETRIES 100

/* Is the message a slot counts no longer waiting to be taken again (freed,
 * or finished: delivered or dropped, through this handle or another)?  A
 * stale slot is free for the next message that fails; so a get that
 * finishes a message has nothing to forget. */
static int
back_stale(RingObject *r, uint64_t pos)
{
    struct ring_hdr *h = r->h;
    if (pos < LOAD(&h->head) || pos >= LOAD(&h->read))
        return 1;
    uint32_t st = LOAD(&rec_at(r, pos)->state); /* (pos reduced modulo cap) */
    return st != ST_RETURNED && !st_lent(st);
}

/* Say on the exception set (a note in __notes__, as BaseException.add_note
 * leaves one, Python 3.11 on) whether its message is dropped after
 * UNPACK_RETRIES: the error alone is the one that gave it back the times
 * before.  One exception object raised again and again (a rebuild that
 * raises a module's one instance) carries the note once, and only when its
 * message is dropped.  Written into the instance's dict, so that no code
 * of the exception's class runs (a __notes__ property, an add_note). */
static void
note_dropped(int dropped)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (tb != NULL && ev != NULL)
        PyException_SetTraceback(ev, tb);
    /* the instance's dict: made for a drop only, looked at if there is one */
    PyObject *dict = NULL;
    if (ev != NULL && PyExceptionInstance_Check(ev))
        dict = dropped ? PyObject_GenericGetDict(ev, NULL)
                       : Py_XNewRef(((PyBaseExceptionObject *)ev)->dict);
    PyObject *note = dict != NULL && PyDict_CheckExact(dict) ? PyUnicode_FromString(
        "its message failed so " Py_STRINGIFY(UNPACK_RETRIES) " times before, given back "
        "each time, and is now dropped: that object is lost") : NULL;
    if (note != NULL) {
        PyObject *notes = PyDict_GetItemString(dict, "__notes__"); /* borrowed */
        Py_ssize_t i = -1, n = notes != NULL && PyList_CheckExact(notes) ? PyList_GET_SIZE(notes)
                                                                        : 0;
        for (Py_ssize_t k = 0; k < n && i < 0; k++) {
            PyObject *item = PyList_GET_ITEM(notes, k);
            if (PyUnicode_CheckExact(item) && PyUnicode_Compare(item, note) == 0)
                i = k;
        }
        if (!dropped && i >= 0) {
            PyList_SetSlice(notes, i, i + 1, NULL);
        } else if (dropped && i < 0 && notes != NULL && PyList_CheckExact(notes)) {
            PyList_Append(notes, note);
        } else if (dropped && notes == NULL) {
            PyObject *fresh = PyList_New(1);
            if (fresh != NULL) {
                PyList_SET_ITEM(fresh, 0, Py_NewRef(note));
                PyDict_SetItemString(dict, "__notes__", fresh);
                Py_DECREF(fresh);
            }
        }
        Py_DECREF(note);
    }
    Py_XDECREF(dict);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
#else
    (void)dropped;
#endif
}

static __attribute__((cold, noinline)) int
message_at_fault(RingObject *r, uint64_t pos, PyObject *at_fault, int handler,
                 PyObject **after)
{
    *after = NULL;
    if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return 0;
    int fault = 0;
    if (PyErr_ExceptionMatches(PyExc_Exception) && !handler)
        fault = at_fault == NULL || PyList_GET_SIZE(at_fault) > 0 ||
                PyErr_ExceptionMatches(PyExc_MemoryError);
    if (!fault) {
        int i, least = 0; /* its slot, or a free one, or the one of the fewest failures */
        for (i = 0; i < BACK_SLOTS; i++) {
            if (r->back[i].times > 0 && r->back[i].pos == pos)
                break;
            if (r->back[i].times > 0 && back_stale(r, r->back[i].pos))
                r->back[i].times = 0;
            if (r->back[i].times < r->back[least].times)
                least = i;
        }
        if (i == BACK_SLOTS) {
            i = least;
            r->back[i].pos = pos;
            r->back[i].times = 0;
        }
        fault = ++r->back[i].times > UNPACK_RETRIES;
        note_dropped(fault);
    }
    if (fault && at_fault != NULL && PyList_GET_SIZE(at_fault) > 0)
        *after = Py_NewRef(PyList_GET_ITEM(at_fault, 0));
    return fault;
}

/* Did a signal handler raise the exception set, while the decoding ran
 * Python code (numpy's _frombuffer, a __setstate__)?  Its class does not
 * tell; `check` (channel.py, _raised_by_a_signal_handler) looks for a
 * handler's frame on its way.  The exception is set again after; one the
 * check raised (a handler that ran meanwhile) takes its place, and is a
 * handler's too. */
static __attribute__((cold, noinline)) int
raised_by_a_handler(PyObject *check)
{
    if (check == NULL || check == Py_None || !PyErr_ExceptionMatches(PyExc_Exception))
        return 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (tb != NULL && ev != NULL)
        PyException_SetTraceback(ev, tb);
    PyObject *res = PyObject_CallOneArg(check, ev != NULL ? ev : Py_None);
    if (res == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return 1;
    }
    int yes = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (yes < 0) {
        PyErr_Clear();
        yes = 0;
    }
    PyErr_Restore(et, ev, tb);
    return yes;
}

/* Queue.get's step (R_DECODE): the message at pos, lent to us and marked to
 * go back to the channel if we die, is copied out and decoded while it is
 * still in the channel, and finished only once decoded.  decode[0] (loads)
 * decodes a message that holds a pickle (decode[2], whether a signal
 * handler raised what it raised); decode[1] (unpack), one whose first
 * byte is 0 (an out-of-band header), with a fresh list at_fault
 * (see message_at_fault), returning (object, after): after is None or a
 * callable of the core (no Python code, so no interrupt can fall inside
 * it), run right after the message is finished, such as the claim of its
 * payload file.  A decoding that an interrupt stopped gives the message
 * back, first in line: a Ctrl-C never loses it, nor does what a signal
 * handler raised in unpack's own steps.  An error that is the message's
 * (message_at_fault) finishes it (its payload file let go), and is raised. */
static PyObject *
decode_lent(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len, uint32_t me,
            PyObject *const *decode)
{
    rec_t *rec = rec_at(r, pos);
    PyObject *obj = NULL, *after = NULL, *at_fault = NULL;
    PyObject *data = msg_new_bytes(len);
    if (data != NULL) {
        ring_copy(PyBytes_AS_STRING(data), (const char *)(rec + 1), len);
        PyObject *res = NULL;
        if (len == 0 || PyBytes_AS_STRING(data)[0] != 0) {
            res = PyObject_CallOneArg(decode[0], data);
        } else if ((at_fault = PyList_New(0)) != NULL) {
            PyObject *args[2] = {data, at_fault};
            res = PyObject_Vectorcall(decode[1], args, 2, NULL);
        }
        Py_DECREF(data);
        if (at_fault == NULL || res == NULL) {
            obj = res;
        } else if (PyTuple_CheckExact(res) && PyTuple_GET_SIZE(res) == 2) {
            obj = Py_NewRef(PyTuple_GET_ITEM(res, 0));
            after = Py_NewRef(PyTuple_GET_ITEM(res, 1));
            Py_DECREF(res);
        } else {
            Py_DECREF(res);
            PyErr_SetString(PyExc_TypeError, "unpack must return (object, after)");
        }
    }
    /* A signal that came while the decoding ran C code only (pickle.loads
     * of plain data runs no Python code, where handlers run) is handled
     * here, while the message can still go back: past the finish below,
     * its exception would land as this call returns, and lose the object. */
    int signalled = 0;
    if (obj != NULL && PyErr_CheckSignals() < 0) {
        signalled = 1; /* (whatever its handler raised: not the message's fault) */
        Py_CLEAR(obj);
        Py_CLEAR(after);
    }
    /* A pickle's decoding stopped by a handler's exception: counted, as
     * unpack's own steps are (unpack tells for a big object).  Asked
     * before `ours` is read: the check's code may close the handle. */
    int handler = obj == NULL && !signalled && at_fault == NULL &&
                  raised_by_a_handler(decode[2]);
    /* Still attached through this handle?  (Code the decoding ran may have
     * closed it; our token is then dead, and a repair gives the record
     * back.) */
    int ours = m->token == me && m->base != NULL && r->mapping == (PyObject *)m;
    if (obj == NULL) {
        /* Whatever a signal handler raised just above is not the message's
         * fault; see message_at_fault for the rest.  The message's fault
         * would be again for the next receiver: it is finished, and its
         * payload file let go as if taken. */
        PyObject *let_go = NULL;
        if (!ours) {
            /* (a repair gives it back) */
        } else if (signalled || !message_at_fault(r, pos, at_fault, handler, &let_go)) {
            lent_undo(r, m, pos, me, 1);
        } else {
            view_finish_keep(r, m, rec, me);
            run_after(let_go);
            Py_XDECREF(let_go);
        }
        Py_XDECREF(at_fault);
        return NULL;
    }
    Py_XDECREF(at_fault);
    /* The object is taken once the record is marked finished, which comes
     * first; what may fail after it (taking the lock to free the record's
     * space, which the next receive does anyway) must not lose it. */
    if (view_finish(r, m, rec, me) < 0)
        PyErr_Clear();
    run_after(after);
    Py_XDECREF(after);
    return obj;
}

static int
message_too_large(RingObject *r, Py_ssize_t len, Py_ssize_t room)
{
    PyErr_Format(shm_state_of((PyObject *)r)->MessageTooLarge,
                 "the next message on channel %R has %zd bytes, more than the buffer's %zd; "
                 "it stays in the channel: receive it into a larger buffer, or with recv()",
                 r->name, len, room);
    return -1;
}

/* May a sized take (how >= R_INTO, its terms sz) have a message of len
 * bytes?  T_READY; T_MISFIT for R_FIT's other lengths; -1 with
 * MessageTooLarge for more than R_INTO's buffer holds.  Either refusal
 * leaves the message where it is. */
static int
sized_fit(RingObject *r, int how, const sized_t *sz, uint64_t len)
{
    if (how == R_INTO && len > (uint64_t)sz->into->len)
        return message_too_large(r, (Py_ssize_t)len, sz->into->len);
    if (how == R_FIT && !msg_fits(sz->fit, len))
        return T_MISFIT;
    return T_READY;
}

/* The first message this handle kept across an interrupt (msgtype.h), as a
 * receive of kind `how` returns it (recv_impl's), and taken off the list;
 * one that a sized take refuses stays, as in the channel. */
static PyObject *
kept_give(RingObject *r, MappingObject *m, int how, const sized_t *sz)
{
    PyObject *msg = PyList_GET_ITEM(r->kept.list, 0);
    Py_ssize_t len = PyBytes_GET_SIZE(msg);
    int k = how >= R_INTO ? sized_fit(r, how, sz, (uint64_t)len) : T_READY;
    if (k != T_READY)
        return k == T_MISFIT ? PyLong_FromSsize_t(len) : NULL;
    if (how != R_INTO)
        return msg_kept_give(&r->kept, how == R_COPY ? NULL : RING_ST(r)->RecordView, m);
    memcpy(sz->into->buf, PyBytes_AS_STRING(msg), (size_t)len);
    PyObject *taken = msg_kept_give(&r->kept, NULL, m);
    if (taken == NULL)
        return NULL;
    Py_DECREF(taken);
    return PyLong_FromSsize_t(len);
}

/* Take one message: bytes (R_COPY), a RecordView (R_VIEW), copied into
 * sz->into (R_INTO, returning its length; a message that does not fit stays
 * in the channel), a RecordView of one that fits sz->fit (R_FIT; another
 * stays in the channel and its length is returned, an int, for recv_array
 * to say why), or decoded (R_DECODE, with `decode`: see decode_lent).
 * Waits until the deadline; raises Empty (nowait), Timeout, or
 * ChannelClosed when the channel is closed and drained. */
static int
senders_gone_error(RingObject *r)
{
    PyErr_Format(RING_ST(r)->SendersGone, "channel %R is empty and every process that sent on "
                 "it has closed it or died", r->name);
    return -1;
}

static PyObject *
recv_impl(RingObject *r, PyObject *timeout, int nowait, int how, const sized_t *sz,
          int stop_no_senders, int redeliver, PyObject *const *decode)
{
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    if (r->kept.list != NULL && how != R_DECODE && msg_kept_count(&r->kept) > 0) {
        PyObject *out = kept_give(r, m, how, sz);
        ring_leave(m);
        return out;
    }
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    int64_t deadline;
    PyObject *out = NULL;
    int fruitless = 0, looked_back = 0;
    if (ring_claim_consumer(r, m, me) < 0 || msg_deadline(timeout, nowait, &deadline) < 0) {
        ring_leave(m);
        return NULL;
    }
    for (;;) {
        uint64_t pos = 0;
        uint32_t len = 0;
        take_t tk;
        int closed = LOAD(&h->closed);
        if (ring_lock(r, m, &h->clock, me, deadline) < 0)
            break;
        ring_take_begin(h, &tk);
        int k = ring_next(r, &tk, &pos, &len);
        /* a sized take looks at the length here, under the lock and before
         * anything is taken, so that a message that does not fit stays */
        if (k == T_READY && how >= R_INTO)
            k = sized_fit(r, how, sz, len);
        int lend = k == T_READY && (how != R_COPY || len >= BIG_COPY);
        int back = (how == R_VIEW && redeliver) || how == R_DECODE;
        if (lend) {
            ring_take_lent(r, &tk, pos, len, me, back);
        } else if (k == T_READY) {
            out = PyBytes_FromStringAndSize((const char *)(rec_at(r, pos) + 1), len);
            if (out != NULL)
                ring_take_copied(r, &tk, pos, len);
            else
                k = -1;
        }
        int freed = ring_take_end(r, &tk);
        ring_unlock(m, &h->clock);
        if (freed > 0)
            ring_wake(&h->space_seq, &h->space_sleepers);
        if (freed < 0 || k < 0) {
            Py_CLEAR(out);
            if (lend)
                lent_undo(r, m, pos, me, back);
            break;
        }
        if (lend) {
            if (how == R_DECODE) {
                out = decode_lent(r, m, pos, len, me, decode);
                break;
            }
            if (how == R_VIEW || how == R_FIT) {
                /* A signal handler that raises first: a redeliver view goes
                 * back to the channel; another's bytes are kept for the next
                 * receive and its record finished, with no wait for the
                 * consumers' lock (which a second signal would end). */
                int signalled = PyErr_CheckSignals() < 0;
                if (signalled && !back && keep_record(r, m, pos, len, me))
                    break;
                out = signalled ? NULL : make_view(r, m, pos, len, me);
                if (out == NULL)
                    lent_undo(r, m, pos, me, back || signalled);
                break;
            }
            out = how == R_INTO ? PyLong_FromUnsignedLong(len) : msg_new_bytes(len);
            if (out == NULL) { /* no memory: the message goes back, first in line */
                lent_undo(r, m, pos, me, 1);
                break;
            }
            char *dst = how == R_INTO ? sz->into->buf : PyBytes_AS_STRING(out);
            ring_copy(dst, (const char *)(rec_at(r, pos) + 1), len);
            /* Finished first, then its space freed under the consumers' lock,
             * a wait that a signal handler's exception can end: the message,
             * taken, is then kept for the next receive. */
            if (view_finish(r, m, rec_at(r, pos), me) < 0)
                out = msg_keep(&r->kept, out, how == R_INTO ? sz->into : NULL);
            break;
        }
        if (k == T_READY)
            break;
        if (k == T_MISFIT) {
            out = PyLong_FromUnsignedLong(len);
            break;
        }
        if (k == T_EMPTY && !looked_back) {
            /* before saying empty, closed or no senders (or waiting): views
             * of dead holders may be given back */
            looked_back = 1;
            int back_now = ring_repair_empty(r, m);
            if (back_now < 0)
                break;
            if (back_now)
                continue;
        }
        if (closed && k == T_EMPTY) {
            PyErr_Format(RING_ST(r)->ChannelClosed, "channel %R is closed and drained", r->name);
            break;
        }
        if (stop_no_senders && k == T_EMPTY && ring_senders_gone(r, m)) {
            senders_gone_error(r);
            break;
        }
        int w = nowait ? 0 : ring_wait(r, m, me, 0, 0, deadline, stop_no_senders);
        if (w < 0)
            break;
        if (w == 0) {
            if (nowait)
                PyErr_Format(RING_ST(r)->Empty, "channel %R is empty", r->name);
            else
                shm_deadline_passed(RING_ST(r)->Timeout, "no message arrived on channel %R "
                             "within the timeout", r->name);
            break;
        }
        if (ring_backoff(&fruitless) < 0)
            break;
    }
    ring_leave(m);
    if (out != NULL && (how == R_COPY || how == R_INTO))
        return msg_keep_if_interrupted(&r->kept, out, how == R_INTO ? sz->into : NULL);
    return out;
}

static PyObject *
Ring_recv(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "stop_when_no_senders", NULL};
    PyObject *a[2];
    if (nargs == 0 && kw == NULL)
        return recv_impl(r, NULL, 0, R_COPY, NULL, 0, 0, NULL);
    if (msg_parse_args("recv", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int stop = a[1] ? PyObject_IsTrue(a[1]) : 0;
    if (stop < 0)
        return NULL;
    return recv_impl(r, a[0], 0, R_COPY, NULL, stop, 0, NULL);
}

static PyObject *
Ring_recv_nowait(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    return recv_impl(r, NULL, 1, R_COPY, NULL, 0, 0, NULL);
}

/* _take_noted(timeout, nowait, mapping, offset, box): a service worker's
 * take of a request (service.py, Worker.recv).  The next message, as
 * recv() or recv_nowait() takes it, is put in box[0] (a list of one) and
 * its u64s at bytes 8 and 16 (the request's id and its reply channel's;
 * 0 where the message is shorter) stored at `offset` and `offset + 8` of
 * `mapping` (the worker's entry), the id last, before this call returns:
 * a Ctrl-C can then fall before the take or after both, never between
 * them, so the request is never out of the channel with no worker holding
 * it on record, and the worker keeps it to hand out or give back. */
static PyObject *
Ring_take_noted(RingObject *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "_take_noted() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    int nowait = PyObject_IsTrue(args[1]);
    if (nowait < 0)
        return NULL;
    long long off = PyLong_AsLongLong(args[3]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    PyObject *box = args[4];
    if (!PyList_CheckExact(box) || PyList_GET_SIZE(box) != 1) {
        PyErr_SetString(PyExc_TypeError, "_take_noted() needs a list of one item as its box");
        return NULL;
    }
    /* refused before anything is taken */
    if (shm_addr(args[2], off, 8, 1) == NULL || shm_addr(args[2], off + 8, 8, 1) == NULL)
        return NULL;
    PyObject *msg = recv_impl(r, nowait ? NULL : args[0], nowait, R_COPY, NULL, 0, 0, NULL);
    if (msg == NULL)
        return NULL;
    uint64_t note[2] = {0, 0}; /* the request's id, its reply channel's */
    Py_ssize_t have = PyBytes_GET_SIZE(msg) - 8;
    if (have > 0)
        memcpy(note, PyBytes_AS_STRING(msg) + 8, have < 16 ? (size_t)have : 16);
    if (have < 8)
        note[0] = 0; /* no whole id: none */
    Py_INCREF(msg);
    if (!PyList_CheckExact(box) || PyList_GET_SIZE(box) != 1) {
        /* another thread changed the box meanwhile: the message goes back */
        PyObject *sent = send_impl(r, msg, NULL, 1);
        Py_XDECREF(sent);
        Py_DECREF(msg);
        Py_DECREF(msg);
        if (sent != NULL)
            PyErr_SetString(PyExc_RuntimeError, "_take_noted(): the box was changed while "
                            "the call waited; the message was sent back");
        return NULL;
    }
    /* (the box takes one reference, the caller the other; what it held
     * goes once the id is stored, since freeing it may run code) */
    PyObject *was = PyList_GET_ITEM(box, 0);
    PyList_SET_ITEM(box, 0, msg);
    /* Again after the wait: another thread may have closed the worker. */
    uint64_t *word = shm_addr(args[2], off, 8, 1);
    uint64_t *reply = word != NULL ? shm_addr(args[2], off + 8, 8, 1) : NULL;
    if (reply != NULL) { /* the id last: whoever reads it finds its channel */
        __atomic_store_n(reply, note[1], __ATOMIC_RELAXED);
        __atomic_store_n(word, note[0], __ATOMIC_RELEASE);
    }
    Py_XDECREF(was);
    if (reply == NULL) {
        Py_DECREF(msg);
        return NULL;
    }
    return msg;
}

/* _give_back(box): box[0], a message that _take_noted took, sent back on
 * the channel without waiting, and the box emptied, in one call: a worker
 * that closes with a request it never handed out returns it to the other
 * workers; a Ctrl-C can fall before or after, never between (which would
 * queue it twice, or lose it).  Raises as send_nowait, the box unchanged. */
static PyObject *
Ring_give_back(RingObject *r, PyObject *box)
{
    if (!PyList_CheckExact(box) || PyList_GET_SIZE(box) != 1 ||
        !PyBytes_CheckExact(PyList_GET_ITEM(box, 0))) {
        PyErr_SetString(PyExc_TypeError, "_give_back() needs a list holding one bytes");
        return NULL;
    }
    /* Claimed first (the box's reference taken over): a hand-out in another
     * thread while the send lets the GIL go finds the box empty. */
    PyObject *msg = PyList_GET_ITEM(box, 0);
    PyList_SET_ITEM(box, 0, Py_NewRef(Py_None));
    PyObject *sent = send_impl(r, msg, NULL, 1);
    if (sent == NULL && PyList_GET_ITEM(box, 0) == Py_None) {
        PyList_SET_ITEM(box, 0, msg); /* not sent: kept */
        Py_DECREF(Py_None);
        return NULL;
    }
    Py_DECREF(msg);
    return sent;
}

static PyObject *
Ring_take(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "nowait", "redeliver", NULL};
    PyObject *a[3];
    if (msg_parse_args("_take", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int nowait = a[1] ? PyObject_IsTrue(a[1]) : 0;
    int redeliver = a[2] ? PyObject_IsTrue(a[2]) : 0;
    if (nowait < 0 || redeliver < 0)
        return NULL;
    return recv_impl(r, a[0], nowait, R_VIEW, NULL, 0, redeliver, NULL);
}

/* _keep(view): recv_array's when making the array of a view _take_sized
 * returned failed or was interrupted: the message is kept for the next
 * receive, first in line (msgtype.h).  Anything but a RecordView: nothing.
 * One call of the core, which no signal handler stops halfway. */
static PyObject *
Ring_keep(RingObject *r, PyObject *view)
{
    if (Py_IS_TYPE(view, RING_ST(r)->RecordView))
        msg_kept_view(&r->kept, (MsgViewObject *)view);
    Py_RETURN_NONE;
}

/* _take_sized(timeout, unit, nbytes): _take, for a message whose length is
 * a multiple of unit (0: any) and, unless nbytes is None, nbytes exactly;
 * another is left in the channel, next in line, and its length returned
 * (recv_array). */
static PyObject *
Ring_take_sized(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "unit", "nbytes", NULL};
    PyObject *a[3];
    sized_t sz = {.into = NULL};
    if (msg_parse_args("_take_sized", args, nargs, kw, 3, names, a) < 0 ||
        msg_fit_args(a[1], a[2], sz.fit) < 0)
        return NULL;
    return recv_impl(r, a[0], 0, R_FIT, &sz, 0, 0, NULL);
}

/* Queue.get's receive (queuetype.c): R_DECODE. */
PyObject *
ring_get_decoded(RingObject *r, PyObject *timeout, int nowait, PyObject *const *decode)
{
    return recv_impl(r, timeout, nowait, R_DECODE, NULL, 0, 1, decode);
}

static PyObject *
Ring_recv_into(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"buffer", "timeout", NULL};
    PyObject *a[2];
    Py_buffer b;
    if (msg_parse_args("recv_into", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    if (shm_writable_bytes(a[0], &b, "recv_into()") < 0)
        return NULL;
    sized_t sz = {.into = &b};
    PyObject *res = recv_impl(r, a[1], 0, R_INTO, &sz, 0, 0, NULL);
    PyBuffer_Release(&b);
    return res;
}

static PyObject *
Ring_recv_many(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"max_n", "timeout", "stop_when_no_senders", NULL};
    PyObject *a[3];
    if (msg_parse_args("recv_many", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int stop = a[2] ? PyObject_IsTrue(a[2]) : 0;
    if (stop < 0)
        return NULL;
    Py_ssize_t max_n = 1024;
    if (a[0] && PyBool_Check(a[0])) { /* an int, but never meant as a count */
        PyErr_SetString(PyExc_TypeError, "recv_many(max_n): max_n is how many messages "
                                         "to take at most, an int, not a bool");
        return NULL;
    }
    if (a[0] && (max_n = PyNumber_AsSsize_t(a[0], PyExc_OverflowError)) == -1 &&
        PyErr_Occurred())
        return NULL;
    if (max_n < 1) {
        PyErr_SetString(PyExc_ValueError, "recv_many() needs max_n >= 1");
        return NULL;
    }
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    if (r->kept.list != NULL && msg_kept_count(&r->kept) > 0) { /* those first, and no more */
        PyObject *first = msg_kept_take(&r->kept, max_n);
        ring_leave(m);
        return first;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        ring_leave(m);
        return NULL;
    }
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    int64_t deadline;
    int fruitless = 0, looked_back = 0;
    int failed = ring_claim_consumer(r, m, me) < 0 || msg_deadline(a[1], 0, &deadline) < 0;
    while (!failed) {
        int k = T_EMPTY;
        take_t tk;
        int closed = LOAD(&h->closed);
        if (ring_lock(r, m, &h->clock, me, deadline) < 0) {
            failed = 1;
            break;
        }
        ring_take_begin(h, &tk);
        while (PyList_GET_SIZE(list) < max_n) {
            uint64_t pos;
            uint32_t len;
            k = ring_next(r, &tk, &pos, &len);
            if (k != T_READY)
                break;
            if (len >= BIG_COPY && PyList_GET_SIZE(list) > 0)
                break; /* leave big ones to a call of their own */
            PyObject *b = PyBytes_FromStringAndSize((const char *)(rec_at(r, pos) + 1), len);
            if (b == NULL || PyList_Append(list, b) < 0) {
                Py_XDECREF(b);
                k = -1;
                break;
            }
            Py_DECREF(b);
            ring_take_copied(r, &tk, pos, len);
        }
        int freed = ring_take_end(r, &tk);
        ring_unlock(m, &h->clock);
        if (freed > 0)
            ring_wake(&h->space_seq, &h->space_sleepers);
        if (k < 0 || freed < 0) {
            failed = 1;
            break;
        }
        if (PyList_GET_SIZE(list) > 0)
            break;
        if (k == T_EMPTY && !looked_back) { /* as recv_impl */
            looked_back = 1;
            int back_now = ring_repair_empty(r, m);
            if (back_now < 0) {
                failed = 1;
                break;
            }
            if (back_now)
                continue;
        }
        if (closed && k == T_EMPTY) {
            PyErr_Format(RING_ST(r)->ChannelClosed, "channel %R is closed and drained", r->name);
            failed = 1;
            break;
        }
        if (stop && k == T_EMPTY && ring_senders_gone(r, m)) {
            failed = senders_gone_error(r) < 0;
            break;
        }
        int w = ring_wait(r, m, me, 0, 0, deadline, stop);
        if (w < 0 || (w > 0 && ring_backoff(&fruitless) < 0))
            failed = 1;
        if (w <= 0 || failed)
            break;
    }
    ring_leave(m);
    if (failed && PyList_GET_SIZE(list) == 0) {
        Py_DECREF(list);
        return NULL;
    }
    PyErr_Clear(); /* messages already taken are delivered */
    return msg_keep_if_interrupted(&r->kept, list, NULL);
}

/* ---- Python: loans, a message built in place ---------------------------- */

/* A loan is a reservation (ring_reserve) whose payload the caller writes in
 * place instead of ring_fill's copy; send() or abandon() ends it with one
 * store (ring_settle).  Its memory is exported writable through the buffer
 * protocol; every export is counted, and the loan is settled only when none
 * is left (a memoryview handed out by .buffer is released by the loan
 * itself), so no array or memoryview can write into the ring after the
 * message went out or its space was given back.  A loan dropped unsettled
 * is abandoned; a sender killed inside one leaves RESERVED|token, which the
 * ring's dead-sender repair abandons. */
static const char *const loan_states[] = {"open", "sent", "abandoned"};

static int
loan_finished_error(LoanObject *l)
{
    PyErr_Format(shm_state_of(l->owner)->ClosedError, "the loan was already %s; take a new one "
                 "with loan()", loan_states[l->state]);
    return -1;
}

/* Release the memoryview handed out by .buffer and check that no other
 * export is alive.  Returns 0, or -1 with BufferError set. */
static int
loan_unexport(LoanObject *l)
{
    PyObject *v = NULL;
    if (l->view_ref != NULL) {
        v = PyWeakref_GetObject(l->view_ref);
        if (v == NULL)
            return -1;
        Py_INCREF(v);
        if (v != Py_None) {
            PyObject *res = PyObject_CallMethod(v, "release", NULL);
            if (res == NULL) {
                Py_DECREF(v);
                if (!PyErr_ExceptionMatches(PyExc_BufferError))
                    return -1;
                PyErr_Clear();
                goto exported;
            }
            Py_DECREF(res);
        }
        Py_DECREF(v);
        Py_CLEAR(l->view_ref);
    }
    if (l->exports == 0)
        return 0;
exported:
    PyErr_SetString(PyExc_BufferError,
                    "an array or memoryview made from the loan is still alive; delete it "
                    "(del arr) before the with block ends or send() is called: the "
                    "message stays unsent until then, and is abandoned once the loan and "
                    "every view of it are gone");
    return -1;
}

/* Send (publish=1) or abandon the loan through its kind's end().  quiet:
 * from dealloc or the collector, in whatever thread: nobody can use the
 * loan any more (an export left is garbage too), so it is abandoned with no
 * check, and always ends (its state moves on, its mapping is unpinned). */
static int
loan_settle(LoanObject *l, int publish, int quiet)
{
    if (l->state != LOAN_OPEN)
        return loan_finished_error(l);
    if (!quiet && ((l->ops->check != NULL && l->ops->check(l) < 0) || loan_unexport(l) < 0))
        return -1;
    l->state = publish ? LOAN_SENT : LOAN_ABANDONED;
    int r = l->ops->end(l, publish);
    shm_unpin(l->mapping);
    l->mapping = NULL;
    return r;
}

/* The channel's end of a loan: one store (ring_settle). */
static int
ring_loan_end(LoanObject *l, int publish)
{
    int ours = ring_settle(l->rec, l->token, publish);
    if (ours)
        ring_wake(&l->h->data_seq, &l->h->data_sleepers);
    if (!ours && publish) {
        l->state = LOAN_ABANDONED;
        PyErr_Format(RING_ST(l->owner)->ClosedError, "channel %R was closed in this process "
                     "while the loan was open, so the message was abandoned, not sent",
                     ((RingObject *)l->owner)->name);
        return -1;
    }
    return 0;
}

static const loan_ops ring_loan_ops = {.end = ring_loan_end, .check = NULL};

PyObject *
loan_new(const loan_ops *ops, PyObject *owner)
{
    LoanObject *l = PyObject_GC_New(LoanObject, shm_state_of(owner)->Loan);
    if (l == NULL)
        return NULL;
    l->ops = ops;
    l->owner = Py_NewRef(owner);
    l->mapping = NULL;
    l->h = NULL;
    l->rec = NULL;
    l->payload = NULL;
    l->len = 0;
    l->exports = 0;
    l->view_ref = NULL;
    l->token = 0;
    l->state = LOAN_ABANDONED; /* until the caller made it open */
    l->weakrefs = NULL;
    memset(l->aux, 0, sizeof l->aux);
    l->thread = 0;
    PyObject_GC_Track(l);
    return (PyObject *)l;
}

void
loan_open(LoanObject *l, MappingObject *m, char *payload, Py_ssize_t len)
{
    l->mapping = (PyObject *)m;
    shm_pin(l->mapping);
    l->payload = payload;
    l->len = len;
    l->state = LOAN_OPEN;
}

static PyObject *
Ring_loan(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    Py_ssize_t len;
    int64_t deadline;
    if (msg_loan_args(args, nargs, kw, RING_ST(r)->SizeLimitError, &len, &deadline) < 0)
        return NULL;
    if (check_size(r, len) < 0)
        return NULL;
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    uint32_t me = m->token;
    ring_claim(r, me, ROLE_PRODUCER);
    LoanObject *l = (LoanObject *)loan_new(&ring_loan_ops, (PyObject *)r);
    if (l == NULL) {
        ring_leave(m);
        return NULL;
    }
    l->h = r->h;
    l->token = me;
    int fruitless = 0;
    for (;;) {
        uint64_t pos;
        Py_ssize_t k = ring_reserve(r, m, me, &len, 1, &pos, deadline);
        if (k < 0)
            break;
        if (k == 1) { /* from here the object owns the record: dealloc abandons it */
            l->rec = rec_at(r, pos);
            loan_open(l, m, (char *)(l->rec + 1), len);
            shm_crash_point("ring.loan.reserved");
            ring_leave(m);
            return (PyObject *)l;
        }
        int w = ring_wait(r, m, me, 1, rec_total((uint64_t)len), deadline, 0);
        if (w < 0)
            break;
        if (w == 0) {
            shm_deadline_passed(RING_ST(r)->Timeout, "channel %R had no room for a loan of %zd "
                         "bytes within the timeout", r->name, len);
            break;
        }
        if (ring_backoff(&fruitless) < 0)
            break;
    }
    ring_leave(m);
    Py_DECREF(l);
    return NULL;
}

static PyObject *
Loan_send(LoanObject *l, PyObject *Py_UNUSED(ignored))
{
    if (loan_settle(l, 1, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Loan_abandon(LoanObject *l, PyObject *Py_UNUSED(ignored))
{
    if (loan_settle(l, 0, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Loan_enter(LoanObject *l, PyObject *Py_UNUSED(ignored))
{
    if (l->state != LOAN_OPEN) {
        loan_finished_error(l);
        return NULL;
    }
    return Py_NewRef((PyObject *)l);
}

/* Leaving the with block: send, or abandon after an exception.  An abandon
 * that finds exports alive (an array in the frame the exception unwinds)
 * leaves the loan open, abandoned when it is freed; the caller's exception
 * goes on. */
static PyObject *
Loan_exit(LoanObject *l, PyObject *const *args, Py_ssize_t nargs)
{
    int failed = nargs > 0 && args[0] != Py_None;
    if (l->state != LOAN_OPEN)
        Py_RETURN_FALSE; /* settled inside the block */
    if (!failed) {
        if (loan_settle(l, 1, 0) < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    if (loan_settle(l, 0, 0) < 0)
        PyErr_Clear();
    Py_RETURN_FALSE;
}

static int
loan_getbuffer(LoanObject *l, Py_buffer *view, int flags)
{
    if (l->state != LOAN_OPEN) {
        loan_finished_error(l);
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)l, l->payload, l->len, 0, flags) < 0)
        return -1;
    l->exports++;
    return 0;
}

static void
loan_releasebuffer(LoanObject *l, Py_buffer *Py_UNUSED(view))
{
    l->exports--;
}

static PyObject *
Loan_get_buffer(LoanObject *l, void *Py_UNUSED(c))
{
    if (l->state != LOAN_OPEN) {
        loan_finished_error(l);
        return NULL;
    }
    if (l->view_ref != NULL) {
        PyObject *v = PyWeakref_GetObject(l->view_ref);
        if (v == NULL)
            return NULL;
        if (v != Py_None)
            return Py_NewRef(v);
        Py_CLEAR(l->view_ref);
    }
    PyObject *v = PyMemoryView_FromObject((PyObject *)l);
    if (v == NULL)
        return NULL;
    if ((l->view_ref = PyWeakref_NewRef(v, NULL)) == NULL)
        Py_CLEAR(v);
    return v;
}

/* loan.ndarray(dtype="uint8", shape=None, offset=0): a numpy array over the
 * loan's bytes from offset (all that is left when shape is None). */
static PyObject *
Loan_ndarray(LoanObject *l, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"dtype", "shape", "offset", NULL};
    PyObject *a[3], *np = NULL, *dt = NULL, *shape = NULL, *out = NULL, *item = NULL;
    if (msg_parse_args("ndarray", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    if (l->state != LOAN_OPEN) {
        loan_finished_error(l);
        return NULL;
    }
    Py_ssize_t offset = 0;
    if (a[2] != NULL && (offset = PyLong_AsSsize_t(a[2])) == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0 || offset > l->len) {
        PyErr_Format(shm_state_of(l->owner)->SizeLimitError, "ndarray() needs offset from 0 to "
                     "the loan's %zd bytes, not %zd", l->len, offset);
        return NULL;
    }
    if ((np = PyImport_ImportModule("numpy")) == NULL)
        return NULL;
    dt = a[0] ? PyObject_CallMethod(np, "dtype", "O", a[0])
              : PyObject_CallMethod(np, "dtype", "s", "uint8");
    if (dt == NULL || (item = PyObject_GetAttrString(dt, "itemsize")) == NULL)
        goto out;
    Py_ssize_t isz = PyLong_AsSsize_t(item), room = l->len - offset, count = 1;
    if (isz == -1 && PyErr_Occurred())
        goto out;
    if (a[1] == NULL || a[1] == Py_None) {
        if (isz <= 0 || room % isz) {
            PyErr_Format(shm_state_of(l->owner)->SizeLimitError, "the loan's %zd bytes from "
                         "offset %zd are not a whole number of %zd-byte items; give "
                         "shape=", room, offset, isz);
            goto out;
        }
        shape = Py_BuildValue("(n)", room / isz);
    } else {
        shape = PyLong_Check(a[1]) ? PyTuple_Pack(1, a[1]) : PySequence_Tuple(a[1]);
    }
    if (shape == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); i++) {
        Py_ssize_t d = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, i));
        if (d == -1 && PyErr_Occurred())
            goto out;
        if (d < 0 || (d > 0 && count > PY_SSIZE_T_MAX / d)) {
            count = -1;
            break;
        }
        count *= d;
    }
    if (count < 0 || (isz > 0 && count > room / isz) || count * isz > room) {
        PyErr_Format(shm_state_of(l->owner)->SizeLimitError, "an array of shape %R and dtype %R "
                     "does not fit in the loan's %zd bytes from offset %zd; loan as many "
                     "bytes as the array has", shape, dt, l->len, offset);
        goto out;
    }
    /* frombuffer keeps its export of the loan while the array lives (an
     * ndarray(buffer=) would not, and could outlive the loan unseen) */
    PyObject *flat = PyObject_CallMethod(np, "frombuffer", "OOnn", (PyObject *)l, dt, count,
                                         offset);
    if (flat != NULL) {
        out = PyObject_CallMethod(flat, "reshape", "O", shape);
        Py_DECREF(flat);
    }
out:
    Py_XDECREF(item);
    Py_XDECREF(shape);
    Py_XDECREF(dt);
    Py_XDECREF(np);
    return out;
}

static PyObject *
Loan_get_nbytes(LoanObject *l, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(l->len);
}

static PyObject *
Loan_get_state(LoanObject *l, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(loan_states[l->state]);
}

/* Abandon the loan, as one nobody can use any more is, and let go of what
 * it refers to: for dealloc, and for the collector when the loan is in a
 * cycle (stored on its own handle: `ch.loan_ = ch.loan(n)`). */
static int
Loan_clear(LoanObject *l)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (l->state == LOAN_OPEN && loan_settle(l, 0, 1) < 0)
        PyErr_WriteUnraisable(l->owner); /* abandoned all the same */
    Py_CLEAR(l->view_ref);
    Py_CLEAR(l->owner);
    PyErr_Restore(et, ev, tb);
    return 0;
}

static int
Loan_traverse(LoanObject *l, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(l)); /* a heap type */
    Py_VISIT(l->owner);
    Py_VISIT(l->view_ref);
    return 0;
}

static void
Loan_dealloc(LoanObject *l)
{
    PyObject_GC_UnTrack(l);
    if (l->weakrefs != NULL) /* (keeps an exception that is pending) */
        PyObject_ClearWeakRefs((PyObject *)l);
    Loan_clear(l); /* (sets a pending exception aside itself) */
    PyTypeObject *tp = Py_TYPE(l);
    PyObject_GC_Del(l);
    Py_DECREF(tp);
}

static PyMethodDef loan_methods[] = {
    {"send", (PyCFunction)Loan_send, METH_NOARGS,
     "send($self, /)\n--\n\nSend (publish) the message (all nbytes of it) in one step.  Raises "
     "BufferError while an\narray or memoryview made from the loan is alive, ClosedError "
     "once settled."},
    {"abandon", (PyCFunction)Loan_abandon, METH_NOARGS,
     "abandon($self, /)\n--\n\nGive the space back unsent: no receiver ever sees the "
     "message."},
    {"ndarray", (PyCFunction)(void (*)(void))Loan_ndarray, METH_FASTCALL | METH_KEYWORDS,
     "ndarray($self, /, dtype='uint8', shape=None, offset=0)\n--\n\n"
     "A writable numpy array over the loan's bytes from offset (delete it before\n"
     "the message is sent).\n\n>>> arr = loan.ndarray('uint8', (1080, 1920, 3))"},
    {"__enter__", (PyCFunction)Loan_enter, METH_NOARGS, "__enter__($self, /)\n--\n\n"
     "The loan itself."},
    {"__exit__", (PyCFunction)(void (*)(void))Loan_exit, METH_FASTCALL,
     "__exit__($self, *exc_info)\n--\n\nSend the message, or abandon it after an "
     "exception."},
    {NULL}
};

static PyGetSetDef loan_getset[] = {
    {"nbytes", (getter)Loan_get_nbytes, NULL, "the message's size in bytes", NULL},
    {"buffer", (getter)Loan_get_buffer, NULL,
     "a writable memoryview of the message (released when the loan ends)", NULL},
    {"state", (getter)Loan_get_state, NULL, "'open', 'sent' or 'abandoned'", NULL},
    {NULL}
};

static PyMemberDef loan_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(LoanObject, weakrefs), READONLY},
    {NULL}
};

static PyType_Slot loan_spec_slots[] = {
    {Py_tp_dealloc, Loan_dealloc},
    {Py_tp_traverse, Loan_traverse},
    {Py_tp_clear, Loan_clear},
    {Py_bf_getbuffer, loan_getbuffer},
    {Py_bf_releasebuffer, loan_releasebuffer},
    {Py_tp_doc, "Space reserved in a channel or topic for one message, written in place.\n\n"
                "``with ch.loan(n) as loan:`` fills ``loan.buffer`` (a writable memoryview) "
                "or\n``loan.ndarray(dtype, shape)``; leaving the block sends the message, an "
                "exception\nabandons it.  See Channel.loan and Topic.loan."},
    {Py_tp_methods, loan_methods},
    {Py_tp_getset, loan_getset},
    {Py_tp_members, loan_members},
    {0, NULL},
};

static PyType_Spec loan_spec = {
    .name = "shmkit._core.Loan",
    .basicsize = sizeof(LoanObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_GC,
    .slots = loan_spec_slots,
};

/* ---- Python: binding, closing, statistics ----------------------------- */

static PyObject *
Ring_init_ring(PyObject *Py_UNUSED(cls), PyObject *args)
{
    PyObject *mapping;
    long long off;
    unsigned long long cap, max_items;
    if (!PyArg_ParseTuple(args, "O&LKK", shm_mapping_converter, &mapping, &off, &cap, &max_items))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    uint64_t data_off = (RING_ROLES_OFF + 8ull * m->max_slots + 63) & ~63ull;
    if (cap < 64 || cap % 8 || cap > (1ull << 46)) {
        PyErr_Format(PyExc_ValueError, "ring capacity must be a multiple of 8 from 64 to "
                     "2**46, not %llu", cap);
        return NULL;
    }
    struct ring_hdr *h = shm_addr(mapping, off, 8, 1);
    if (h == NULL)
        return NULL;
    if (off % 64 || (long long)(data_off + cap) > m->length - off) {
        PyErr_Format(PyExc_ValueError, "the segment is too small for a ring of %llu bytes",
                     cap);
        return NULL;
    }
    memset(h, 0, data_off);
    h->format = RING_FORMAT;
    h->cap = cap;
    h->data_off = data_off;
    h->max_items = max_items;
    h->max_slots = m->max_slots;
    STORE(&h->magic, RING_MAGIC);
    return PyLong_FromUnsignedLongLong(data_off);
}

/* 1 when a ring header's numbers cannot describe a ring inside `avail`
 * bytes (from the header's start) of a segment with `seg_slots` attach
 * slots.  Unsigned arithmetic throughout: no sum can wrap. */
static int
ring_layout_bad(uint64_t avail, uint32_t seg_slots, uint32_t max_slots, uint64_t cap,
                uint64_t data_off)
{
    if (max_slots != seg_slots || max_slots > SHM_MAX_SLOTS)
        return 1;
    uint64_t roles_end = RING_ROLES_OFF + 8ull * max_slots;
    if (data_off < roles_end || data_off % 64 || data_off > avail)
        return 1;
    if (cap < 64 || cap % 8 || cap > (1ull << 46) || cap > avail - data_off)
        return 1;
    return 0;
}

static PyObject *
Ring_bind(RingObject *r, PyObject *args)
{
    PyObject *mapping, *name;
    long long off;
    if (!PyArg_ParseTuple(args, "O&LO", shm_mapping_converter, &mapping, &off, &name))
        return NULL;
    Py_XSETREF(r->name, Py_NewRef(name));
    MappingObject *m = (MappingObject *)mapping;
    struct ring_hdr *h = shm_addr(mapping, off, 8, 0);
    if (h == NULL)
        return NULL;
    if ((uint64_t)m->length < (uint64_t)off ||
        (uint64_t)m->length - (uint64_t)off < RING_ROLES_OFF || off % 64) {
        ring_corrupt(r, "no room for a ring header", (unsigned long long)off,
                     (unsigned long long)m->length);
        return NULL;
    }
    /* Every number the handle keeps from the header is read once, here,
     * and checked in unsigned arithmetic before any pointer is formed. */
    uint32_t magic = LOAD(&h->magic), format = LOAD(&h->format);
    uint32_t max_slots = LOAD(&h->max_slots);
    uint64_t cap = LOAD(&h->cap), data_off = LOAD(&h->data_off);
    if (magic != RING_MAGIC) {
        ring_corrupt(r, "bad ring magic", magic, RING_MAGIC);
        return NULL;
    }
    if (format != RING_FORMAT) {
        ring_corrupt(r, "ring format differs from its layout description", format,
                     RING_FORMAT);
        return NULL;
    }
    if (ring_layout_bad((uint64_t)m->length - (uint64_t)off, m->max_slots, max_slots,
                        cap, data_off)) {
        ring_corrupt(r, "ring header describes an impossible layout", cap, data_off);
        return NULL;
    }
    Py_XSETREF(r->mapping, Py_NewRef(mapping));
    Py_CLEAR(r->kept.list);
    r->h = h;
    r->roles = (uint64_t *)((char *)h + RING_ROLES_OFF);
    r->data = (char *)h + data_off;
    r->cap = cap;
    r->max_slots = max_slots;
    r->role_token = 0;
    r->role_bits = 0;
    r->head_seen = LOAD(&h->head);
    r->tail_seen = LOAD(&h->tail);
    r->spin_ns = SPIN_START_NS;
    Py_RETURN_NONE;
}

static PyObject *
Ring_unbind(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(r->mapping);
    Py_CLEAR(r->kept.list);
    Py_RETURN_NONE;
}

static void
wake_all(struct ring_hdr *h)
{
    __atomic_fetch_add(&h->data_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->space_seq, 1, __ATOMIC_SEQ_CST);
    shm_futex_wake(&h->data_seq, INT_MAX);
    shm_futex_wake(&h->space_seq, INT_MAX);
}

/* _close_sending(timeout=None): the wait for plock ends at the deadline in
 * ring_lock's Timeout naming the holder (a sender stopped while reserving
 * holds it); None waits as long as it takes, as a send does. */
static PyObject *
Ring_close_sending(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", NULL};
    PyObject *a[1];
    int64_t deadline;
    if (msg_parse_args("_close_sending", args, nargs, kw, 0, names, a) < 0 ||
        msg_deadline(a[0], 0, &deadline) < 0)
        return NULL;
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    /* under plock, so that no send reserves after a receiver saw "closed" */
    if (ring_lock(r, m, &h->plock, m->token, deadline) < 0) {
        ring_leave(m);
        return NULL;
    }
    shm_crash_point("ring.close_sending.locked");
    STORE(&h->closed, 1);
    shm_crash_point("ring.close_sending.closed");
    ring_unlock(m, &h->plock);
    wake_all(h);
    ring_leave(m);
    Py_RETURN_NONE;
}

static PyObject *
Ring_wake_all(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = (MappingObject *)r->mapping;
    if (m != NULL && m->base != NULL && !m->closing)
        wake_all(r->h);
    Py_RETURN_NONE;
}

static PyObject *
Ring_stats(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = ring_enter_any(r, 0);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    long producers = 0, consumers = 0;
    for (uint32_t slot = 0; slot < r->max_slots; slot++) {
        uint64_t v = LOAD(&r->roles[slot]);
        if (!(v & (ROLE_PRODUCER | ROLE_CONSUMER)))
            continue;
        if (!shm_token_alive(m, (ROLE_GEN(v) << 10) | slot))
            continue;
        producers += (v & ROLE_PRODUCER) != 0;
        consumers += (v & ROLE_CONSUMER) != 0;
    }
    uint64_t reserved = LOAD(&h->reserved), received = LOAD(&h->received);
    uint64_t dropped = LOAD(&h->dropped), t = LOAD(&h->tail), hd = LOAD(&h->head);
    uint64_t depth = ring_depth(r, m) + (uint64_t)msg_kept_count(&r->kept);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsKslslsisIsI}", "capacity", (unsigned long long)r->cap,
        "bytes_used", (unsigned long long)(t - hd), "depth", (unsigned long long)depth, "sent",
        (unsigned long long)(reserved - dropped), "received",
        (unsigned long long)received, "dropped", (unsigned long long)dropped,
        "redelivered", (unsigned long long)LOAD(&h->redelivered), "max_items", (unsigned long long)h->max_items, "producers", producers,
        "consumers", consumers, "closed", (int)LOAD(&h->closed), "receivers_waiting",
        LOAD(&h->data_sleepers), "senders_waiting", LOAD(&h->space_sleepers));
    ring_leave(m);
    return d;
}

static PyObject *
Ring_get_capacity(RingObject *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap);
}

static PyObject *
Ring_get_max_message(RingObject *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap ? r->cap - 8 : 0);
}

/* The most messages it queues (0: no limit), as the ring enforces it: what an
 * explicit maxsize is checked against, not the layout text's copy. */
static PyObject *
Ring_get_max_items(RingObject *r, void *Py_UNUSED(c))
{
    MappingObject *m = ring_enter_any(r, 0);
    if (m == NULL)
        return NULL;
    uint64_t n = LOAD(&r->h->max_items);
    ring_leave(m);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *
Ring_get_kept(RingObject *r, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(msg_kept_count(&r->kept));
}

static PyObject *
Ring_get_depth(RingObject *r, void *Py_UNUSED(c))
{
    MappingObject *m = ring_enter_any(r, 0);
    if (m == NULL)
        return NULL;
    uint64_t depth = ring_depth(r, m) + (uint64_t)msg_kept_count(&r->kept);
    ring_leave(m);
    return PyLong_FromUnsignedLongLong(depth);
}

static PyObject *
Ring_get_closed(RingObject *r, void *Py_UNUSED(c))
{
    MappingObject *m = (MappingObject *)r->mapping;
    if (m == NULL || m->base == NULL)
        Py_RETURN_TRUE;
    return PyBool_FromLong(LOAD(&r->h->closed) != 0);
}

static void
Ring_dealloc(RingObject *r)
{
    Py_CLEAR(r->mapping);
    Py_CLEAR(r->name);
    Py_CLEAR(r->kept.list);
    PyTypeObject *tp = Py_TYPE(r);
    tp->tp_free((PyObject *)r);
    Py_DECREF(tp); /* a heap type: its instances hold it */
}

#define FAST (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef Ring_methods[] = {
    {"_keep", (PyCFunction)Ring_keep, METH_O,
     "_keep($self, view, /)\n--\n\n"
     "Keep a view's message for the next receive (recv_array's, when its array failed)."},
    {"send", (PyCFunction)(void (*)(void))Ring_send, FAST,
     "send($self, /, data, timeout=None)\n--\n\n"
     "Copy one bytes-like message in; block while the channel "
     "is full.\nRaises Timeout, ChannelClosed, MessageTooLarge.\n\n"
     ">>> ch.send(b'hello', timeout=1.0)"},
    {"send_nowait", (PyCFunction)Ring_send_nowait, METH_O,
     "send_nowait($self, data, /)\n--\n\n"
     "Send one message or raise Full (a WouldBlock) if it does not fit now."},
    {"send_many", (PyCFunction)(void (*)(void))Ring_send_many, FAST,
     "send_many($self, /, messages, timeout=None)\n--\n\n"
     "send_many(messages, timeout=None) -> int\n\nSend messages in order, as many per "
     "lock holding as fit.\nReturns how many were sent; on Timeout the exception's .sent "
     "says how many went.\n\n>>> ch.send_many([b'a', b'b'])\n2"},
    {"recv", (PyCFunction)(void (*)(void))Ring_recv, FAST,
     "recv($self, /, timeout=None, stop_when_no_senders=False)\n--\n\n"
     "recv(timeout=None, stop_when_no_senders=False) -> bytes\n\nTake the next message; "
     "block until one arrives.\nRaises Timeout, or ChannelClosed once the channel is "
     "closed and drained.\nWith stop_when_no_senders, also stop (SendersGone, a ChannelClosed) "
     "once it is\nempty and every process that sent on it has closed it or died.\n\n"
     ">>> ch.recv(timeout=1.0)\nb'hello'"},
    {"recv_into", (PyCFunction)(void (*)(void))Ring_recv_into, FAST,
     "recv_into($self, /, buffer, timeout=None)\n--\n\n"
     "recv_into(buffer, timeout=None) -> int\n\nCopy the next message into a writable "
     "buffer (a bytearray, a numpy array)\nand return its length.  A message larger than "
     "the buffer raises ValueError\nand stays in the channel.\n\n"
     ">>> n = ch.recv_into(buf, timeout=1.0)"},
    {"_take_noted", (PyCFunction)(void (*)(void))Ring_take_noted, METH_FASTCALL,
     "_take_noted($self, timeout, nowait, mapping, offset, box, /)\n--\n\n"
     "A service worker's take of a request: the next message put in box[0] and its "
     "id and reply channel's\n(the u64s at bytes 8 and 16) stored at offset and offset + 8 "
     "of mapping, in one call."},
    {"_give_back", (PyCFunction)Ring_give_back, METH_O,
     "_give_back($self, box, /)\n--\n\nbox[0] sent back without waiting and the box "
     "emptied, in one call (a service worker's untaken-out request)."},
    {"recv_nowait", (PyCFunction)Ring_recv_nowait, METH_NOARGS,
     "recv_nowait($self, /)\n--\n\n"
     "recv_nowait() -> bytes\n\nTake the next message or raise Empty (a WouldBlock)."},
    {"recv_many", (PyCFunction)(void (*)(void))Ring_recv_many, FAST,
     "recv_many($self, /, max_n=1024, timeout=None, stop_when_no_senders=False)\n--\n\n"
     "recv_many(max_n=1024, timeout=None, stop_when_no_senders=False) -> list[bytes]\n\n"
     "Take up to max_n messages "
     "that are ready, waiting for the first;\nreturns [] if the timeout passes first, "
     "raises ChannelClosed once closed and drained."},
    {"loan", (PyCFunction)(void (*)(void))Ring_loan, FAST,
     "loan($self, /, nbytes, timeout=None)\n--\n\n"
     "loan(nbytes, timeout=None) -> Loan\n\nReserve room for one nbytes message and "
     "build it in place; block while\nthe channel is full.  Leaving the with block sends "
     "it in one step, an\nexception abandons it (receivers never see it), and so does "
     "the sender's\ndeath.  Raises Timeout, ChannelClosed, MessageTooLarge.\n\n"
     ">>> with ch.loan(5, timeout=1.0) as loan:\n...     loan.buffer[:] = b'hello'"},
    {"_take", (PyCFunction)(void (*)(void))Ring_take, FAST,
     "_take($self, /, timeout=None, nowait=False, redeliver=False)\n--\n\n"
     "_take(timeout=None, nowait=False, redeliver=False) -> RecordView (see "
     "Channel.recv_view)"},
    {"_take_sized", (PyCFunction)(void (*)(void))Ring_take_sized, FAST,
     "_take_sized($self, /, timeout, unit, nbytes)\n--\n\n"
     "_take, for a message of a multiple of unit bytes (0: any) and of nbytes\n"
     "(None: any); another is left in the channel and its length returned"},
    {"_bind", (PyCFunction)Ring_bind, METH_VARARGS,
     "_bind($self, mapping, offset, name, /)\n--\n\n"
     "_bind(mapping, offset, name): attach this handle to the ring at offset"},
    {"_unbind", (PyCFunction)Ring_unbind, METH_NOARGS, "_unbind($self, /)\n--\n\n"
     "_unbind(): forget the mapping"},
    {"_init_ring", (PyCFunction)Ring_init_ring, METH_VARARGS | METH_STATIC,
     "_init_ring(mapping, offset, capacity, max_items, /)\n--\n\n"
     "_init_ring(mapping, offset, capacity, max_items) -> data offset (creator only)"},
    {"_close_sending", (PyCFunction)(void (*)(void))Ring_close_sending, FAST,
     "_close_sending($self, /, timeout=None)\n--\n\n"
     "_close_sending(timeout=None): set the closed flag under the producers' lock "
     "(waited for\nuntil timeout, then Timeout naming its holder) and wake every waiter"},
    {"_wake_all", (PyCFunction)Ring_wake_all, METH_NOARGS, "_wake_all($self, /)\n--\n\n"},
    {"_stats", (PyCFunction)Ring_stats, METH_NOARGS, "_stats($self, /)\n--\n\n"
     "_stats() -> dict"},
    {NULL}
};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "bytes in the ring's data area", NULL},
    {"max_message", (getter)Ring_get_max_message, NULL, "largest message in bytes", NULL},
    {"depth", (getter)Ring_get_depth, NULL,
     "messages waiting to be received, with views lent (redeliver=True) to "
     "consumers that died, which the next receive gets, and messages this handle "
     "kept across an interrupt", NULL},
    {"_kept", (getter)Ring_get_kept, NULL,
     "messages this handle took as a signal handler raised: its next receives' own",
     NULL},
    {"_max_items", (getter)Ring_get_max_items, NULL,
     "the most messages queued at once, as the ring enforces it (0: no limit)", NULL},
    {"sending_closed", (getter)Ring_get_closed, NULL,
     "True once the channel was closed for sending", NULL},
    {NULL}
};

static PyType_Slot ring_spec_slots[] = {
    {Py_tp_dealloc, Ring_dealloc},
    {Py_tp_doc, "Ring()\n--\n\nThe message ring's hot path; shmkit.Channel builds on it."},
    {Py_tp_methods, Ring_methods},
    {Py_tp_getset, Ring_getset},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec ring_spec = {
    .name = "shmkit._core.Ring",
    .basicsize = sizeof(RingObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = ring_spec_slots,
};

/* ---- zero-copy views ---------------------------------------------------- */

/* A lent record is finished: mark it DONE, then reclaim if we still can. */
static int
view_finish(RingObject *r, MappingObject *m, rec_t *rec, uint32_t token)
{
    /* ours, taken or lent: one compare-and-swap from the state found (a
     * repair may change it meanwhile; a failed one costs as much) */
    uint32_t st = LOAD(&rec->state);
    if (st == (ST_TAKEN | token) || st == (ST_LENT | token))
        __atomic_compare_exchange_n(&rec->state, &st, ST_DONE, 0, __ATOMIC_RELEASE,
                                    __ATOMIC_RELAXED);
    shm_crash_point("ring.finish.done");
    if (m->token != token || m->base == NULL || r->mapping != (PyObject *)m)
        return 0; /* detached meanwhile: a later waiter reclaims it */
    struct ring_hdr *h = r->h;
    if (ring_lock(r, m, &h->clock, token, SHM_FOREVER) < 0)
        return -1;
    int freed = ring_reclaim(r);
    ring_unlock(m, &h->clock);
    if (freed > 0)
        ring_wake(&h->space_seq, &h->space_sleepers);
    return freed < 0 ? -1 : 0;
}

/* RecordView's give_back: finish the record (view_finish). */
static int
rv_give_back(MsgViewObject *v, int Py_UNUSED(quiet))
{
    return view_finish((RingObject *)v->owner, (MappingObject *)v->mapping,
                       (rec_t *)v->payload - 1, v->token);
}

static const msgview_ops rv_ops = {
    .give_back = rv_give_back,
    .exported = "an array or memoryview made from the message view is still alive; copy "
                "what you need inside the with block (the message is freed when they are "
                "all gone)",
};

static PyObject *
make_view(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len, uint32_t me)
{
    return msgview_new(RING_ST(r)->RecordView, &rv_ops, (PyObject *)r, m,
                       (char *)(rec_at(r, pos) + 1), len, pos, me);
}

static PyMethodDef rv_methods[] = {
    MSGVIEW_METHODS("Give the message's memory back to the channel."),
    {NULL}
};

static PyGetSetDef rv_getset[] = {
    MSGVIEW_NBYTES,
    {NULL}
};

static PyType_Slot rv_spec_slots[] = {
    MSGVIEW_SLOTS,
    {Py_tp_doc, "A received message lent in place (read-only).  Use it as a context "
                "manager:\n``with ch.recv_view() as mv:`` gives a memoryview valid "
                "inside the block."},
    {Py_tp_methods, rv_methods},
    {Py_tp_getset, rv_getset},
    {0, NULL},
};

static PyType_Spec rv_spec = {
    .name = "shmkit._core.RecordView",
    .basicsize = sizeof(MsgViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_GC,
    .slots = rv_spec_slots,
};

/* ---- module glue ------------------------------------------------------- */

int
shm_init_ring(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    if (shm_add_type(module, &ring_spec, &st->Ring) < 0 ||
        shm_add_type(module, &rv_spec, &st->RecordView) < 0 ||
        shm_add_type(module, &loan_spec, &st->Loan) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "RING_FORMAT", RING_FORMAT);
}
