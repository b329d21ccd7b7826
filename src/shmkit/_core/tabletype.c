/* tabletype.c - shmkit._core.Table: the Store's hash table as a Python type.
 *
 * The shared-memory protocol is table.c (no Python objects there); this file
 * parses arguments, encodes keys and values into bytes and decodes them back
 * (calling the store's hooks for arrays and pickles), takes the writers'
 * robust lock and runs the readers' wait for a batch (both release the GIL,
 * through lock.c and wait.c), and turns the protocol's error records
 * (shm_fail) into exceptions.  See table.c for the protocol and table.h for
 * the layout.
 */
#include "table.h"
#include "wait.h"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The module's state (its exception classes and types) from a handle. */
#define ST(t) shm_state_of((PyObject *)(t))

typedef struct TableObject {
    PyObject_HEAD
    TCore c;               /* the protocol's state (table.h) */
    PyObject *mapping;
    int pickle;            /* codec="pickle" */
    PyObject *encode_hook; /* value -> (vtype, head, body) for other types */
    PyObject *decode_hook; /* (vtype, bytes) -> object or empty ndarray */
    PyObject *grow_hook;   /* need -> None: grows the segment */
    uint64_t batch_gen;    /* outermost batches this handle opened, counted: a
                            * batch object ends only the batch it entered */
    int batch_doomed;      /* the batch's outermost block ended with an error while
                            * a block nested in it was open: the batch's end
                            * discards */
    int midway;            /* Python code runs with the lock held in the middle of
                            * an operation (the grow hook, decoding a value), or
                            * a locked read's copy lets the GIL go */
    uint64_t forks;        /* forks this process came through since the handle
                            * was made: a batch opened before one is the parent's */
    int forked_in_batch;   /* the last of them came inside a batch of the thread
                            * that forked (the child's only thread) */
    /* Listed among the handles whose lock is held (holders, below) while
     * holder_gen is the list's generation; 0 when not listed. */
    unsigned long holder_gen;
    uint32_t holder_token; /* its attachment's token when listed (kept if closed) */
    struct TableObject *holder_prev, *holder_next;
} TableObject;

/* ---- errors: the protocol's record as an exception ----------------------------- */

/* After a t_* function failed: raise what it recorded (unless a callback
 * already raised). */
static void
t_raise(TableObject *t)
{
    if (PyErr_Occurred())
        return;
    const char *m = shm_err.msg;
    switch (shm_err.code) {
    case TE_CORRUPT:
        PyErr_Format(ST(t)->CorruptError,
                     "store is corrupt: %s; run verify() for a full report, copy out "
                     "what still reads back and create the store again",
                     m);
        break;
    case TE_NOMEM:
    case TE_FULL:
        PyErr_SetString(PyExc_MemoryError, m);
        break;
    case TE_READONLY:
        PyErr_SetString(ST(t)->ReadOnlyError, m);
        break;
    case TE_CLOSED:
        PyErr_SetString(ST(t)->ClosedError, m);
        break;
    case TE_VALUE:
        PyErr_SetString(PyExc_ValueError, m);
        break;
    default:
        PyErr_Format(PyExc_RuntimeError, "store: %s", m[0] ? m : "unknown error");
        break;
    }
}

/* Damage found by this file: CorruptError, as the protocol words it. */
static int
corrupt(TableObject *t, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    shm_vfail(TE_CORRUPT, fmt, va);
    va_end(va);
    t_raise(t);
    return -1;
}

/* A protocol call's result, raising what it recorded when it failed:
 * raising(t, t_live(&t->c)) < 0. */
static inline int
raising(TableObject *t, int r)
{
    if (r < 0)
        t_raise(t);
    return r;
}
#define tt_live(t) raising(t, t_live(&(t)->c))
#define tt_sync(t) raising(t, t_sync(&(t)->c))
#define tt_index(t, x) raising(t, t_index(&(t)->c, x))
#define tt_view_hold(t) raising(t, view_hold(&(t)->c))

static __attribute__((noinline, cold)) uint64_t
tt_closed(TableObject *t)
{
    shm_fail(TE_CLOSED, "the store is closed in this process; open it again");
    t_raise(t);
    return 0;
}

/* t_enter, raising: the heap end, or 0 with an exception set. */
static inline uint64_t
tt_enter(TableObject *t)
{
    /* Closed while views were out, which keep it mapped: refused as closed
     * (a batch open meanwhile still ends, t_batch_end_as) */
    if (__builtin_expect(t->c.m != NULL && t->c.m->closing, 0))
        return tt_closed(t);
    uint64_t end = t_enter(&t->c);
    if (end == 0)
        t_raise(t);
    return end;
}

/* ---- keys ------------------------------------------------------------------ */

/* int.<name>(*args, signed=True), called on the int type itself so that an
 * int subclass cannot change what is stored. */
static PyObject *
int_signed(const char *name, PyObject *args)
{
    PyObject *meth = NULL, *kw = NULL, *r = NULL;
    if (args != NULL && (meth = PyObject_GetAttrString((PyObject *)&PyLong_Type, name)) != NULL &&
        (kw = Py_BuildValue("{sO}", "signed", Py_True)) != NULL)
        r = PyObject_Call(meth, args, kw);
    Py_XDECREF(meth);
    Py_XDECREF(kw);
    Py_XDECREF(args);
    return r;
}

/* The n little-endian two's complement bytes of the int o (n is enough). */
static int
long_to_le(PyObject *o, unsigned char *buf, size_t n)
{
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t need = PyLong_AsNativeBytes(o, buf, (Py_ssize_t)n, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
    if (need < 0)
        return -1;
    if ((size_t)need > n) {
        PyErr_SetString(PyExc_OverflowError, "int too large for its encoding");
        return -1;
    }
    return 0;
#else
    PyObject *b = int_signed("to_bytes", Py_BuildValue("(Ons)", o, (Py_ssize_t)n, "little"));
    if (b == NULL)
        return -1;
    memcpy(buf, PyBytes_AS_STRING(b), n);
    Py_DECREF(b);
    return 0;
#endif
}

/* The int stored as n little-endian two's complement bytes at p. */
static PyObject *
long_from_le(const char *p, uint64_t n)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromNativeBytes(p, (size_t)n, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    return int_signed("from_bytes", Py_BuildValue("(y#s)", p, (Py_ssize_t)n, "little"));
#endif
}

/* Canonical bytes of an int: 8 bytes if it fits int64, else the signed
 * little-endian bytes of length bits/8 + 1 (always more than 8). */
static Py_ssize_t
long_size(PyObject *o, int64_t *small)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        *small = v;
        return 8;
    }
    /* int.bit_length(o): the bits of abs(o), whatever a subclass says */
    PyObject *nb = PyObject_CallMethod((PyObject *)&PyLong_Type, "bit_length", "O", o);
    if (nb == NULL)
        return -1;
    Py_ssize_t bits = PyLong_AsSsize_t(nb);
    Py_DECREF(nb);
    if (bits < 0)
        return -1;
    return bits / 8 + 1;
}

static void
key_release(TKey *k)
{
    if (k->big) {
        PyMem_Free(k->big);
        k->big = NULL;
    }
}

/* A str key UTF-8 cannot encode (a lone surrogate): the codec's
 * UnicodeEncodeError becomes the cause of the store's InvalidKeyError.
 * Reached only once the encoding failed, so ordinary keys pay nothing;
 * any other error (MemoryError) passes through. */
static int
key_unencodable(TableObject *t, PyObject *o)
{
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return -1;
    PyObject *type, *cause, *tb;
    PyErr_Fetch(&type, &cause, &tb);
    PyErr_NormalizeException(&type, &cause, &tb);
    if (tb != NULL)
        PyException_SetTraceback(cause, tb);
    Py_ssize_t at = 0;
    if (PyUnicodeEncodeError_GetStart(cause, &at) < 0 || at < 0 ||
        at >= PyUnicode_GET_LENGTH(o)) {
        PyErr_Clear();
        at = 0;
    }
    PyObject *ch = PyUnicode_Substring(o, at, at + 1);
    if (ch == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(cause);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Format(ST(t)->InvalidKeyError,
                 "store key %.80R cannot be stored: its character %R at position %zd is a "
                 "lone surrogate, which UTF-8 cannot encode; pass the key as bytes "
                 "(os.fsencode(key) undoes os.fsdecode; key.encode('utf-8', 'surrogatepass') "
                 "takes any), or use another key", o, ch, at);
    Py_DECREF(ch);
    PyObject *etype, *err, *etb;
    PyErr_Fetch(&etype, &err, &etb);
    PyErr_NormalizeException(&etype, &err, &etb);
    Py_INCREF(cause);
    PyException_SetContext(err, cause); /* both steal a reference */
    PyException_SetCause(err, cause);
    PyErr_Restore(etype, err, etb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return -1;
}

static int
key_encode(TableObject *t, PyObject *o, TKey *k)
{
    k->big = NULL;
    if (PyUnicode_Check(o)) {
        k->p = PyUnicode_AsUTF8AndSize(o, &k->n);
        if (k->p == NULL)
            return key_unencodable(t, o);
        k->type = KT_STR;
    } else if (PyBytes_Check(o)) {
        k->p = PyBytes_AS_STRING(o);
        k->n = PyBytes_GET_SIZE(o);
        k->type = KT_BYTES;
    } else if (PyLong_Check(o) && !PyBool_Check(o)) {
        int64_t v;
        k->type = KT_INT;
        k->n = long_size(o, &v);
        if (k->n < 0)
            return -1;
        if (k->n == 8) {
            memcpy(k->small, &v, 8);
            k->p = k->small;
        } else if (k->n <= (Py_ssize_t)MAX_KEY) {
            k->big = PyMem_Malloc((size_t)k->n);
            if (k->big == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            if (long_to_le(o, (unsigned char *)k->big, (size_t)k->n) < 0) {
                key_release(k);
                return -1;
            }
            k->p = k->big;
        }
    } else {
        PyErr_Format(ST(t)->UnsupportedTypeError,
                     "store keys must be int, str or bytes, not %.100s%s",
                     Py_TYPE(o)->tp_name,
                     PyBool_Check(o) ? " (bool keys would collide with 0 and 1; "
                                       "use int(key))" : "; convert the key first");
        return -1;
    }
    if (k->n > (Py_ssize_t)MAX_KEY) {
        key_release(k);
        PyErr_Format(ST(t)->ValueTooLargeError,
                     "a key of %zd bytes is longer than the store's limit of %u bytes; "
                     "use a shorter key (a digest of it, say)",
                     k->n, MAX_KEY);
        return -1;
    }
    k->h = t_key_hash(t->c.seed, k->p, (size_t)k->n, k->type);
    return 0;
}

/* ---- values ---------------------------------------------------------------- */

typedef struct {
    uint8_t type;
    const char *p;   /* the value's bytes (or the ndarray body) */
    Py_ssize_t n;
    const char *head; /* ndarray header, stored after a u32 length */
    Py_ssize_t hn;
    uint64_t len;    /* total value bytes */
    char small[8];
    PyObject *bigint;
    PyObject *keep;  /* the encode hook's result */
    Py_buffer body;
    int has_body;
} TVal;

static void
val_release(TVal *v)
{
    if (v->has_body) {
        PyBuffer_Release(&v->body);
        v->has_body = 0;
    }
    Py_CLEAR(v->keep);
}

static int
val_encode(TableObject *t, PyObject *o, TVal *v)
{
    /* field by field: a memset of the whole struct (its Py_buffer too)
     * costs more than the rest of encoding a short value */
    v->p = v->head = NULL;
    v->n = v->hn = 0;
    v->bigint = v->keep = NULL;
    v->has_body = 0;
    PyTypeObject *tp = Py_TYPE(o);
    if (tp == &PyBytes_Type) {
        v->type = VT_BYTES;
        v->p = PyBytes_AS_STRING(o);
        v->n = PyBytes_GET_SIZE(o);
    } else if (tp == &PyUnicode_Type && (v->p = PyUnicode_AsUTF8AndSize(o, &v->n)) != NULL) {
        v->type = VT_STR;
    } else if (tp == &PyUnicode_Type && !PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        return -1; /* (no memory) */
    } else if (o == Py_True || o == Py_False) {
        v->type = o == Py_True ? VT_TRUE : VT_FALSE;
    } else if (o == Py_None) {
        v->type = VT_NONE;
    } else if (tp == &PyLong_Type) {
        int64_t s;
        v->type = VT_INT;
        v->n = long_size(o, &s);
        if (v->n < 0)
            return -1;
        if (v->n == 8) {
            memcpy(v->small, &s, 8);
            v->p = v->small;
        } else {
            v->bigint = o;
        }
    } else if (tp == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        v->type = VT_FLOAT;
        memcpy(v->small, &d, 8);
        v->p = v->small;
        v->n = 8;
    } else {
        /* (also a str UTF-8 cannot encode: the hook pickles it, or refuses it
         * with InvalidValueError) */
        PyErr_Clear();
        if (t->encode_hook == NULL || t->encode_hook == Py_None) {
            PyErr_Format(ST(t)->UnsupportedTypeError,
                         "cannot store a %.100s value", tp->tp_name);
            return -1;
        }
        PyObject *r = PyObject_CallOneArg(t->encode_hook, o);
        if (r == NULL)
            return -1;
        v->keep = r;
        long vt;
        PyObject *head, *body;
        if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3 ||
            (vt = PyLong_AsLong(PyTuple_GET_ITEM(r, 0))) < VT_NDARRAY || vt > VT_LAST) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_SystemError, "bad value encoder result");
            val_release(v);
            return -1;
        }
        head = PyTuple_GET_ITEM(r, 1);
        body = PyTuple_GET_ITEM(r, 2);
        v->type = (uint8_t)vt;
        if (head != Py_None) {
            if (!PyBytes_Check(head)) {
                PyErr_SetString(PyExc_SystemError, "bad value encoder header");
                val_release(v);
                return -1;
            }
            v->head = PyBytes_AS_STRING(head);
            v->hn = PyBytes_GET_SIZE(head);
        }
        if (PyObject_GetBuffer(body, &v->body, PyBUF_SIMPLE) < 0) {
            val_release(v);
            return -1;
        }
        v->has_body = 1;
        v->p = v->body.buf;
        v->n = v->body.len;
    }
    v->len = (uint64_t)v->n + (v->head ? 4 + (uint64_t)v->hn : 0);
    return 0;
}

/* Write the encoded value at dst (v->len bytes).  Calls no Python code. */
static int
val_write(TVal *v, char *dst)
{
    if (v->head) {
        uint32_t hn = (uint32_t)v->hn;
        memcpy(dst, &hn, 4);
        memcpy(dst + 4, v->head, (size_t)v->hn);
        dst += 4 + v->hn;
    }
    if (v->bigint)
        return long_to_le(v->bigint, (unsigned char *)dst, (size_t)v->n);
    if (v->n)
        memcpy(dst, v->p, (size_t)v->n);
    return 0;
}

static PyObject *
key_decode(uint8_t kt, const char *p, uint64_t n)
{
    switch (kt) {
    case KT_INT:
        if (n == 8)
            return PyLong_FromLongLong((long long)rd64(p));
        if (n > 8)
            return long_from_le(p, n);
        break;
    case KT_STR:
        return PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "strict");
    case KT_BYTES:
        return PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    }
    PyErr_SetString(PyExc_ValueError, "bad key");
    return NULL;
}

/* A reader found the epoch odd: a batch is being published.  Wait through
 * the core's wait (wait.h): spin, then sleep on the epoch's low 32 bits with
 * the GIL released, checking between slices that the lock's holder lives.
 * Returns 0 with the even epoch in *e; 1 when nobody alive is publishing
 * (its writer died, or damage), so the caller must read under the lock,
 * which repairs; -1 with Timeout after the store's read timeout (naming the
 * writer's pid, and whether it is stopped), or on Ctrl-C. */
static int
t_wait_even(TableObject *t, uint64_t *e)
{
    THeader *h = HDR(&t->c);
    if (t->c.lock_depth > 0 && t->c.lock_thread == t_thread())
        return 1; /* we hold the lock: nobody else can be publishing */
    TEvenWait ew = {&t->c, h, 0, 0};
    shm_wait w = {.m = t->c.m, .word = EPOCH_WORD(h), .ctx = &ew, .ready = t_even_ready,
                  .check = t_even_check, .spin_ns = SHM_WAIT_SPIN_NS, .what = "store"};
    int64_t deadline = t->c.read_timeout_ns < 0 ? SHM_FOREVER
                                              : shm_now_ns() + t->c.read_timeout_ns;
    shm_pin(t->mapping); /* we let other threads run: keep the memory mapped */
    int r = shm_wait_until(&w, deadline);
    uint32_t held = LDA(&h->lock); /* for the message: read while still pinned */
    shm_unpin(t->mapping);
    if (r < 0)
        return -1;
    if (r == 0) {
        char who[SHM_HOLDER_PHRASE], secs[32];
        snprintf(secs, sizeof secs, "%.3g", t->c.read_timeout_ns / 1e9);
        shm_deadline_passed(ST(t)->Timeout,
                     "a batch was being published for longer than the store's "
                     "read_timeout (%s s): the store's lock is held by %s (it may be "
                     "stopped or very slow); raise read_timeout=, or resume or end that "
                     "process",
                     secs, shm_holder_phrase(t->c.m, held, who, sizeof who));
        return -1;
    }
    if (tt_live(t) < 0)
        return -1;
    uint64_t v = ew.dead ? LDA(&h->epoch) : ew.even;
    if (v & 1)
        return 1; /* its writer died mid-batch: read under the lock, which repairs */
    *e = v;
    return 0;
}

/* Decode a record's value.  With *post set on return, the result is raw
 * pickle bytes: the caller validates, then unpickles.  NULL with *race set
 * (and no exception) when the bytes looked inconsistent. */
static PyObject *
val_decode(TableObject *t, const char *P, uint64_t off, const TRec *r, uint64_t epoch,
           int locked, int *race, int *post)
{
    const char *p = P + off + T_REC_HDR + r->klen;
    uint64_t n = r->vlen;
    PyObject *o = NULL;
    *race = 0;
    *post = 0;
    switch (r->vtype) {
    case VT_BYTES:
        return PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    case VT_STR:
        o = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "strict");
        if (o == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            *race = 1;
        }
        return o;
    case VT_INT:
        if (n == 8)
            return PyLong_FromLongLong((long long)rd64(p));
        if (n > 8)
            return long_from_le(p, n);
        break;
    case VT_FLOAT:
        if (n == 8) {
            double d;
            memcpy(&d, p, 8);
            return PyFloat_FromDouble(d);
        }
        break;
    case VT_FALSE:
    case VT_TRUE:
    case VT_NONE:
        if (n == 0)
            return Py_NewRef(r->vtype == VT_NONE ? Py_None
                             : r->vtype == VT_TRUE ? Py_True : Py_False);
        break;
    case VT_PICKLE:
        if (!t->pickle)
            break;
        *post = 1;
        return PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    case VT_NDARRAY: {
        if (n < 4)
            break;
        uint32_t hn = (uint32_t)rd32(p);
        if (hn > n - 4)
            break;
        PyObject *head = PyBytes_FromStringAndSize(p + 4, hn);
        if (head == NULL)
            return NULL;
        if (!locked && !epoch_same(HDR(&t->c), epoch)) {
            Py_DECREF(head);
            *race = 1;
            return NULL;
        }
        shm_pin(t->mapping); /* the hook runs Python code: keep the memory mapped */
        o = PyObject_CallFunction(t->decode_hook, "iOK", VT_NDARRAY, head,
                                  (unsigned long long)(n - 4 - hn));
        Py_DECREF(head);
        if (o != NULL) {
            Py_buffer b;
            if (PyObject_GetBuffer(o, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
                Py_CLEAR(o);
            } else {
                if ((uint64_t)b.len != n - 4 - hn) {
                    Py_CLEAR(o);
                    *race = 1;
                } else if (b.len) {
                    memcpy(b.buf, p + 4 + hn, (size_t)b.len);
                }
                PyBuffer_Release(&b);
            }
        } else if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear(); /* an unreadable header: torn, or corrupt if locked */
            *race = 1;
        }
        shm_unpin(t->mapping);
        return o;
    }
    }
    *race = 1;
    return NULL;
}

/* ---- the writer lock ------------------------------------------------------- */

/* Call with the lock held and an exception pending: if it is damage, have
 * the next writer run t_recover() (t_mark_dirty). */
static void
t_mark_damage(TableObject *t)
{
    if (PyErr_ExceptionMatches(ST(t)->CorruptError))
        t_mark_dirty(&t->c);
}

/* The repair callback of the writers' lock (shm_lock_acquire_repair): the
 * previous holder died.  The table keeps no undo journal (see the comment
 * at the top): t_recover() rebuilds what is derived from the index. */
static int
t_repair(void *ctx, int owner_died)
{
    (void)owner_died;
    TableObject *t = ctx;
    int r = t_recover(&t->c);
    if (r < 0)
        t_raise(t);
    return r;
}

/* ---- one thread, two handles -------------------------------------------------
 * A thread that holds the lock through one handle (in a batch, or while that
 * handle decodes a value or grows the store) and then writes through a
 * second handle of the same store, opened separately in this process, would
 * wait for itself for ever: nothing can end the first handle's holding
 * until this thread returns.  The handles whose lock is held are listed, in
 * an order the GIL keeps (as the lock's held registry), so that t_lock
 * refuses such a write at once.  A forked child holds none of its parent's
 * locks: each child starts the list empty, by its generation. */
static TableObject *holders;
static unsigned long holders_gen;

/* The list's generation in this process (never 0), emptied in a new child. */
static unsigned long
holders_now(void)
{
    unsigned long gen = shm_child_generation() + 1;
    if (holders_gen != gen) {
        holders = NULL; /* the parent's: their handles may be gone here */
        holders_gen = gen;
    }
    return gen;
}

static void
holder_add(TableObject *t)
{
    t->holder_gen = holders_now();
    t->holder_token = t->c.m->token;
    t->holder_prev = NULL;
    t->holder_next = holders;
    if (holders != NULL)
        holders->holder_prev = t;
    holders = t;
}

static void
holder_remove(TableObject *t)
{
    if (t->holder_gen != holders_now()) { /* unlisted, or listed by the parent */
        t->holder_gen = 0;
        return;
    }
    if (t->holder_prev != NULL)
        t->holder_prev->holder_next = t->holder_next;
    else
        holders = t->holder_next;
    if (t->holder_next != NULL)
        t->holder_next->holder_prev = t->holder_prev;
    t->holder_gen = 0;
}

/* Before t waits for its lock: BusyError (-1) when the holder is another
 * handle of this process, held by this very thread (closed since, or not).
 * The lock word names the holder's attachment: a live one of this process
 * in t's own attach table, listed with that token, of a store with the same
 * hash seed (random per store, kept by every handle of it).  The seed alone
 * would mix up a store with a copy of its file, whose attachments (and
 * entries copied with it) may carry the same tokens. */
static int
t_held_by_this_thread(TableObject *t, unsigned long me)
{
    holders_now();
    uint32_t v = LDA(&HDR(&t->c)->lock) & SHM_TOKEN_MASK;
    for (TableObject *o = holders; o != NULL && v != 0; o = o->holder_next) {
        /* (t itself is not listed as this thread's: t_lock re-entered it) */
        if (o->c.lock_thread == me && o->holder_token == v && o->c.seed == t->c.seed &&
            shm_token_pid(t->c.m, v, 1) == (uint32_t)getpid()) {
            PyErr_SetString(ST(t)->BusyError,
                            "this thread holds the store's lock through another handle "
                            "of it (in that handle's batch, or while it decodes a value "
                            "or grows the store), so this call would wait for itself for "
                            "ever; use that handle inside its with block, or this one "
                            "after the block");
            return -1;
        }
    }
    return 0;
}

/* Release the lock word and unpin the mapping, keeping any exception that
 * is pending (a release error is dropped: the lock was ours). */
static void
t_release(TableObject *t)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    holder_remove(t);
    if (t->c.m->base != NULL && shm_lock_release(t->c.m, &HDR(&t->c)->lock) < 0)
        PyErr_Clear();
    shm_unpin(t->mapping);
    PyErr_Restore(et, ev, tb);
}

/* The grow hook, and the decoding of a value read under the lock (pop(), a
 * read in a batch), run Python code in the middle of an operation, with
 * the lock held: a finalizer or a signal handler that runs there must not
 * start another operation on this handle from this thread, which would
 * find the write (or the batch's words) half made, or free the record or
 * index the read is still reading.  1 with RuntimeError set. */
static int
t_reentered(TableObject *t)
{
    if (!t->midway || t->c.lock_depth <= 0 || t->c.lock_thread != t_thread())
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "the store is in the middle of an operation on this thread: code "
                    "that runs inside it (a finalizer, a signal handler, while the store "
                    "grows or decodes a value under its lock) cannot use it; do that "
                    "work after the operation returns");
    return 1;
}

/* After Python code ran in the middle of an operation (encoding a value in
 * a batch, decoding one under the lock, the grow hook, update()'s loop): if
 * it forked (t->forks moved on from `forks`), this is the child, which holds
 * none of its parent's lock or batch and must not finish the operation (the
 * parent does).  -1 with RuntimeError set, or 0. */
static int
t_forked_since(TableObject *t, uint64_t forks, const char *what)
{
    if (t->forks == forks)
        return 0;
    PyErr_Format(PyExc_RuntimeError,
                 "the process forked while %s: the child holds none of its parent's lock "
                 "or batch, and the operation was not made here (the parent makes it); "
                 "write in the child outside it",
                 what);
    return -1;
}

/* Call a Python hook (the segment's grow or shrink) with n, in the middle of
 * an operation: code it runs cannot use this handle (t_reentered).  0, or
 * -1 with an exception set. */
static int
call_midway(TableObject *t, PyObject *hook, uint64_t n)
{
    uint64_t forks = t->forks;
    t->midway++;
    PyObject *r = PyObject_CallFunction(hook, "K", (unsigned long long)n);
    t->midway--;
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return t_forked_since(t, forks, "the store grew its segment under its lock");
}

/* Inside a batch, before its words are read: refuse nested use, probe the
 * staged puts, and load the index into x.  0, or -1 with an exception set. */
static int
batch_words(TableObject *t, TIndex *x)
{
    return t_reentered(t) || raising(t, t_batch_resolve(&t->c)) < 0 || tt_index(t, x) < 0
               ? -1 : 0;
}

static int
t_lock(TableObject *t)
{
    if (t->c.readonly) {
        PyErr_SetString(ST(t)->ReadOnlyError,
                        "the store was opened readonly=True; open it without readonly "
                        "to change it");
        return -1;
    }
    unsigned long me = t_thread();
    if (t->c.lock_depth > 0 && t->c.lock_thread == me) {
        if (t_reentered(t))
            return -1;
        t->c.lock_depth++;
        return 0;
    }
    if (holders != NULL && t_held_by_this_thread(t, me) < 0)
        return -1;
    int64_t deadline = t->c.timeout_ns < 0 ? SHM_FOREVER : shm_now_ns() + t->c.timeout_ns;
    shm_pin(t->mapping);
    int r = shm_lock_acquire_repair(t->c.m, &HDR(&t->c)->lock, deadline, NULL, t_repair, t);
    if (r <= 0) {
        char who[SHM_HOLDER_PHRASE];
        if (r == 0) /* named while still pinned */
            shm_holder_phrase(t->c.m, LDA(&HDR(&t->c)->lock), who, sizeof who);
        shm_unpin(t->mapping); /* after a failed repair the lock is released */
        if (r == 0) {
            char secs[32];
            snprintf(secs, sizeof secs, "%.3g", t->c.timeout_ns / 1e9);
            shm_deadline_passed(ST(t)->Timeout,
                         "the store's lock stayed held for longer than the store's timeout "
                         "(%s s), by a batch or a long operation: it is held by %s; raise "
                         "timeout=, or resume or end that process",
                         secs, who);
        }
        return -1;
    }
    t->c.lock_depth = 1;
    t->c.lock_thread = me;
    holder_add(t);
    /* A writer's death was repaired above; t_locked_check repairs what a
     * live writer marked as damage or left half applied. */
    if (t_locked_check(&t->c) < 0) {
        t_raise(t);
        t_mark_damage(t);
        t->c.lock_depth = 0;
        t_release(t);
        return -1;
    }
    return 0;
}

/* Enter, then take the lock: 0, or -1 with an exception set. */
static int
t_enter_lock(TableObject *t)
{
    return tt_enter(t) == 0 || t_lock(t) < 0 ? -1 : 0;
}

static void
t_unlock(TableObject *t)
{
    if (PyErr_Occurred())
        t_mark_damage(t);
    if (t->c.lock_depth <= 0) /* never released (and unpinned) twice */
        return;
    if (--t->c.lock_depth > 0)
        return;
    t_release(t);
}


/* The bytes of one record handed out in place: a read-only buffer that
 * holds the record (its attachment's view count) until it is released and
 * every buffer made from it is gone. */
typedef struct {
    PyObject_HEAD
    PyObject *mapping; /* pinned while held */
    uint64_t poff;
    char *p;
    Py_ssize_t n;
    uint32_t token;
    pid_t pid;
    Py_ssize_t exports;
    int held, released;
} ViewObject;

static void
view_drop(ViewObject *v)
{
    if (!v->held)
        return;
    v->held = 0;
    MappingObject *m = (MappingObject *)v->mapping;
    if (getpid() == v->pid)
        view_unhold(m, v->poff, v->token);
    shm_unpin(v->mapping);
}

static int
view_getbuffer(ViewObject *v, Py_buffer *b, int flags)
{
    if (v->released || !v->held) {
        PyErr_SetString(PyExc_BufferError, "this store view was released");
        return -1;
    }
    if (PyBuffer_FillInfo(b, (PyObject *)v, v->p, v->n, 1, flags) < 0)
        return -1;
    v->exports++;
    return 0;
}

static void
view_releasebuffer(ViewObject *v, Py_buffer *Py_UNUSED(b))
{
    if (--v->exports == 0 && v->released)
        view_drop(v);
}

static PyObject *
view_release(ViewObject *v, PyObject *Py_UNUSED(ignored))
{
    v->released = 1;
    if (v->exports == 0)
        view_drop(v);
    Py_RETURN_NONE;
}

static PyObject *
view_get_held(ViewObject *v, void *Py_UNUSED(c))
{
    return PyBool_FromLong(v->held);
}

static void
view_dealloc(ViewObject *v)
{
    view_drop(v);
    Py_XDECREF(v->mapping);
    shm_free_instance((PyObject *)v);
}

static PyMethodDef view_methods[] = {
    {"_release", (PyCFunction)view_release, METH_NOARGS, "_release($self, /)\n--\n\n"
     "Release the view now (buffers made from it stay valid until released)."},
    {NULL}};
static PyGetSetDef view_getset[] = {
    {"_held", (getter)view_get_held, NULL, NULL, NULL},
    {NULL}};

static PyType_Slot view_spec_slots[] = {
    {Py_tp_dealloc, view_dealloc},
    {Py_bf_getbuffer, view_getbuffer},
    {Py_bf_releasebuffer, view_releasebuffer},
    {Py_tp_methods, view_methods},
    {Py_tp_getset, view_getset},
    {Py_tp_doc, "The bytes of one stored value, in place (see Store.view)."},
    {0, NULL},
};

static PyType_Spec view_spec = {
    .name = "shmkit._core.TableView",
    .basicsize = sizeof(ViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = view_spec_slots,
};

/* ---- Python methods: reading ----------------------------------------------- */

enum { M_GET, M_CONTAINS, M_NBYTES, M_INTO, M_VIEW };

/* Where a bytes or array value's data lies: 0 with *doff, *dlen (and the
 * array header's length in *hn, 0 for bytes); 1 for another type; -1 when
 * the record does not hold a valid array header. */
static int
raw_span(const char *P, uint64_t off, const TRec *r, uint64_t *doff, uint64_t *dlen,
         uint32_t *hn)
{
    uint64_t v = off + T_REC_HDR + r->klen;
    *hn = 0;
    if (r->vtype == VT_BYTES) {
        *doff = v;
        *dlen = r->vlen;
        return 0;
    }
    if (r->vtype != VT_NDARRAY)
        return 1;
    if (r->vlen < 4)
        return -1;
    uint32_t n = (uint32_t)rd32(P + v);
    if (n > r->vlen - 4)
        return -1;
    *hn = n;
    *doff = v + 4 + n;
    *dlen = r->vlen - 4 - n;
    return 0;
}

static const char *
vtype_name(uint8_t vt)
{
    static const char *names[] = {"?", "bytes", "str", "int", "float", "bool", "bool",
                                  "None", "ndarray", "pickled object"};
    return vt <= VT_LAST ? names[vt] : "?";
}

/* get_into / view on a found record.  Returns 0 done (*out set, or an
 * exception), 1 when the epoch moved (retry), 2 when the record looks
 * damaged (the locked path judges).  `locked`: under the writer lock. */
static int
read_raw(TableObject *t, const char *P, uint64_t off, const TRec *r, int mode,
         Py_buffer *into, uint64_t e, int locked, int *held, PyObject **out)
{
    THeader *h = HDR(&t->c);
    uint64_t doff, dlen;
    uint32_t hn;
    *out = NULL;
    int sr = raw_span(P, off, r, &doff, &dlen, &hn);
    if (sr != 0 || (mode == M_INTO && dlen > (uint64_t)into->len)) {
        if (!locked && !epoch_same(h, e))
            return 1;
        if (sr < 0) {
            if (!locked)
                return 2;
            corrupt(t, "the array record at %llu has a bad header", (unsigned long long)off);
        } else if (sr > 0)
            PyErr_Format(ST(t)->UnsupportedTypeError,
                         "%s reads only bytes and numpy array values, and this key "
                         "holds a value of type %s; use get()",
                         mode == M_INTO ? "get_into()" : "view()", vtype_name(r->vtype));
        else
            PyErr_Format(ST(t)->ValueTooLargeError,
                         "get_into(): the value has %llu bytes and the buffer only %zd; "
                         "the buffer was left unchanged; pass one of at least that many "
                         "bytes",
                         (unsigned long long)dlen, into->len);
        return 0;
    }
    if (mode == M_INTO) {
        if (dlen >= (64u << 10)) {
            shm_pin(t->mapping); /* other threads run: keep the memory mapped */
            t->midway += locked; /* (no other thread may end our batch meanwhile) */
            Py_BEGIN_ALLOW_THREADS
            memcpy(into->buf, P + doff, (size_t)dlen);
            Py_END_ALLOW_THREADS
            t->midway -= locked;
            shm_unpin(t->mapping);
            if (tt_live(t) < 0)
                return 0;
        } else if (dlen) {
            memcpy(into->buf, P + doff, (size_t)dlen);
        }
        if (!locked && !epoch_same(h, e))
            return 1;
        *out = PyLong_FromUnsignedLongLong(dlen);
        return 0;
    }
    PyObject *head = NULL;
    if (r->vtype == VT_NDARRAY &&
        (head = PyBytes_FromStringAndSize(P + off + T_REC_HDR + r->klen + 4, hn)) == NULL)
        return 0;
    if (!locked && !epoch_same(h, e)) {
        Py_XDECREF(head);
        return 1;
    }
    ViewObject *v = PyObject_New(ViewObject, ST(t)->View);
    if (v == NULL) {
        Py_XDECREF(head);
        return 0;
    }
    v->mapping = Py_NewRef(t->mapping);
    v->poff = t->c.poff;
    v->p = (char *)P + doff;
    v->n = (Py_ssize_t)dlen;
    v->token = t->c.m->token;
    v->pid = getpid();
    v->exports = 0;
    v->released = 0;
    v->held = 1; /* takes over the hold */
    shm_pin(t->mapping);
    *held = 0;
    *out = Py_BuildValue("NiN", (PyObject *)v, (int)r->vtype, head ? head : Py_NewRef(Py_None));
    return 0;
}


static PyObject *finish_pickle(TableObject *t, PyObject *raw);

/* The header of the record at off, read under the lock: 0, or -1 with
 * CorruptError. */
static int
rec_locked(TableObject *t, uint64_t off, TRec *rec)
{
    if (rec_read(PAY(&t->c), t->c.end, off, rec) == 0)
        return 0;
    corrupt(t, "record at %llu is damaged", (unsigned long long)off);
    return -1;
}

/* The value (or with nbytes, its size) of the record at off, read under
 * the lock: CorruptError when it cannot be decoded. */
static PyObject *
value_locked(TableObject *t, uint64_t off, int nbytes)
{
    TRec rec;
    int race, post;
    char *P = PAY(&t->c);
    if (rec_locked(t, off, &rec) < 0)
        return NULL;
    if (nbytes)
        return PyLong_FromUnsignedLongLong(rec.vlen);
    t->midway++; /* the array hook runs Python code while P points into the record */
    PyObject *o = val_decode(t, P, off, &rec, 0, 1, &race, &post);
    t->midway--;
    if (o == NULL && race && !PyErr_Occurred())
        corrupt(t, "the record at %llu does not hold a valid value of type %d",
                (unsigned long long)off, rec.vtype);
    return o != NULL && post ? finish_pickle(t, o) : o;
}

/* Look a key up under the lock (in a batch, or after readers kept losing). */
static PyObject *
lookup_locked(TableObject *t, const TKey *k, int mode, int *found, Py_buffer *into,
              int *held)
{
    TIndex x;
    uint64_t slot, w;
    int fo;
    if (batch_words(t, &x) < 0)
        return NULL;
    int r = raising(t, probe_w(&t->c, &x, k, &slot, &w, &fo));
    if (r < 0)
        return NULL;
    *found = r == P_FOUND;
    if (!*found || mode == M_CONTAINS)
        return Py_NewRef(Py_None);
    if (mode == M_INTO || mode == M_VIEW) {
        TRec rec;
        PyObject *out;
        if (rec_locked(t, word_off(w), &rec) < 0)
            return NULL;
        read_raw(t, PAY(&t->c), word_off(w), &rec, mode, into, 0, 1, held, &out);
        return out;
    }
    return value_locked(t, word_off(w), mode == M_NBYTES);
}

static PyObject *
finish_pickle(TableObject *t, PyObject *raw)
{
    PyObject *o = PyObject_CallFunction(t->decode_hook, "iO", VT_PICKLE, raw);
    Py_DECREF(raw);
    return o;
}

/* The lock-free read.  Returns a new reference (Py_None when only presence
 * was asked) and sets *found; NULL with an exception on error. */
static PyObject *
t_lookup_key(TableObject *t, const TKey *kp, int mode, int *found, Py_buffer *into)
{
    uint64_t end = tt_enter(t);
    if (end == 0)
        return NULL;
    TKey k = *kp;
    PyObject *out = NULL;
    int held = 0;
    if (mode == M_VIEW) { /* before the epoch is loaded: see t_views_busy */
        if (tt_view_hold(t) < 0)
            return NULL;
        held = 1;
    }
    if (t_in_batch(&t->c)) {
        out = lookup_locked(t, &k, mode, found, into, &held);
        goto done;
    }
    THeader *h = HDR(&t->c);
    int synced = 0;
    for (int attempt = 0; attempt < MAX_RETRIES; attempt++) {
        uint64_t e = LDA(&h->epoch);
        if (e & 1) {
            int w = t_wait_even(t, &e);
            if (w < 0)
                break;
            if (w > 0)
                goto locked;
        }
        char *P = PAY(&t->c);
        if ((end = tt_enter(t)) == 0) /* picks up growth */
            break;
        uint64_t off;
        TRec rec;
        int r = probe_ro(P, end, &k, &off, &rec);
        if (r == P_RACE) {
            if (!epoch_same(h, e))
                continue;
            if (!synced) { /* perhaps grown by another process: look again */
                synced = 1;
                if (tt_sync(t) < 0)
                    break;
                continue;
            }
            goto locked;
        }
        *found = r == P_FOUND;
        if (!*found || mode == M_CONTAINS) {
            if (!epoch_same(h, e))
                continue;
            out = Py_NewRef(Py_None);
            break;
        }
        if (mode == M_NBYTES) {
            if (!epoch_same(h, e))
                continue;
            out = PyLong_FromUnsignedLongLong(rec.vlen);
            break;
        }
        if (mode == M_INTO || mode == M_VIEW) {
            int rr = read_raw(t, P, off, &rec, mode, into, e, 0, &held, &out);
            if (rr == 1)
                continue;
            if (rr == 2)
                goto locked;
            break;
        }
        int race, post;
        PyObject *o = val_decode(t, P, off, &rec, e, 0, &race, &post);
        if (t->c.m->base == NULL) { /* closed by the decode hook */
            Py_XDECREF(o);
            tt_live(t);
            break;
        }
        if (!epoch_same(h, e)) {
            Py_XDECREF(o);
            PyErr_Clear();
            continue;
        }
        if (o == NULL) {
            if (race && !PyErr_Occurred())
                goto locked; /* stable but undecodable: let the locked path judge */
            break;
        }
        out = post ? finish_pickle(t, o) : o;
        break;
    }
    if (out == NULL && !PyErr_Occurred())
        goto locked;
    goto done;

locked:
    /* Readers kept losing to writers, or the store looks damaged: read
     * under the writer lock, which also repairs after a dead writer. */
    if (t->c.readonly) {
        PyErr_SetString(ST(t)->BusyError,
                        "could not read a consistent value: writers keep changing the "
                        "store or it is damaged (this handle is readonly, so it cannot "
                        "take the writers' lock); retry, or open it writable");
        goto done;
    }
    if (t_lock(t) < 0)
        goto done;
    if (tt_enter(t) != 0)
        out = lookup_locked(t, &k, mode, found, into, &held);
    t_unlock(t);
done:
    if (held && t->c.m->base != NULL)
        view_unhold(t->c.m, t->c.poff, t->c.m->token);
    return out;
}

static PyObject *
t_lookup_ex(TableObject *t, PyObject *key, int mode, int *found, Py_buffer *into)
{
    if (tt_enter(t) == 0)
        return NULL;
    TKey k;
    if (key_encode(t, key, &k) < 0)
        return NULL;
    PyObject *out = t_lookup_key(t, &k, mode, found, into);
    key_release(&k);
    return out;
}

static PyObject *
t_lookup(TableObject *t, PyObject *key, int mode, int *found)
{
    return t_lookup_ex(t, key, mode, found, NULL);
}

/* A lookup's result o (a new reference, or NULL) and whether it found the
 * key (read after the lookup: never pass both from one call).  When it is
 * absent: dflt (a new reference to it), or KeyError(key) when dflt is NULL. */
static inline PyObject *
or_default(PyObject *o, int found, PyObject *key, PyObject *dflt)
{
    if (o == NULL || found)
        return o;
    Py_DECREF(o);
    if (dflt != NULL)
        return Py_NewRef(dflt);
    PyErr_SetObject(PyExc_KeyError, key);
    return NULL;
}

/* get_into(key, buffer) -> int */
static PyObject *
table_get_into(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_into(key, buffer)");
        return NULL;
    }
    Py_buffer b;
    if (shm_writable_bytes(args[1], &b, "get_into()") < 0)
        return NULL;
    int found = 0;
    PyObject *o = t_lookup_ex(t, args[0], M_INTO, &found, &b);
    PyBuffer_Release(&b);
    return or_default(o, found, args[0], NULL);
}

/* _view(key) -> (TableView, vtype, array header bytes or None) */
static PyObject *
table_view(TableObject *t, PyObject *key)
{
    int found = 0;
    PyObject *o = t_lookup_ex(t, key, M_VIEW, &found, NULL);
    return or_default(o, found, key, NULL);
}

/* get_many(keys, default=<KeyError>) -> list */
static PyObject *
table_get_many(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get_many(keys, default=<raise KeyError>)");
        return NULL;
    }
    /* a tuple of its own: decoding may run Python code that changes a list */
    PyObject *seq = PySequence_Tuple(args[0]);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = ((PyTupleObject *)seq)->ob_item;
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    /* In chunks: hash every key and prefetch its home slot, then prefetch
     * the records those slots name, then look each up as get() does; the
     * cache misses of a chunk overlap instead of coming one after another.
     * The prefetches only warm caches (they never fault and decide nothing). */
    enum { CHUNK = 16 };
    TKey ks[CHUNK];
    for (Py_ssize_t i0 = 0; i0 < n; i0 += CHUNK) {
        int m = n - i0 < CHUNK ? (int)(n - i0) : CHUNK, enc = 0, err = 0;
        uint64_t end = tt_enter(t), nslots = 0;
        if (end == 0)
            goto fail;
        const char *P = PAY(&t->c);
        uint64_t ix = LDA(&HDR(&t->c)->index);
        int ok = index_ok(P, end, ix, &nslots);
        const uint64_t *slots = ok ? W64(P, ix + T_INDEX_HDR) : NULL;
        for (; enc < m; enc++) {
            if (key_encode(t, items[i0 + enc], &ks[enc]) < 0) {
                err = 1;
                break;
            }
            if (ok)
                __builtin_prefetch(&slots[ks[enc].h & (nslots - 1)]);
        }
        for (int j = 0; ok && !err && j < m; j++) {
            uint64_t w = LDR(&slots[ks[j].h & (nslots - 1)]);
            if (w > W_TOMB && word_off(w) < end) {
                __builtin_prefetch(P + word_off(w));
                __builtin_prefetch(P + word_off(w) + 64);
            }
        }
        for (int j = 0; !err && j < m; j++) {
            int found = 0;
            PyObject *o = t_lookup_key(t, &ks[j], M_GET, &found, NULL);
            o = or_default(o, found, items[i0 + j], nargs == 2 ? args[1] : NULL);
            if (o == NULL)
                err = 1;
            else
                PyList_SET_ITEM(list, i0 + j, o);
        }
        for (int j = 0; j < enc; j++)
            key_release(&ks[j]);
        if (err)
            goto fail;
    }
    Py_DECREF(seq);
    return list;
fail:
    Py_DECREF(list);
    Py_DECREF(seq);
    return NULL;
}

/* A lookup in `mode` that raises KeyError when the key is absent. */
static PyObject *
lookup_or_keyerror(TableObject *t, PyObject *key, int mode)
{
    int found = 0;
    PyObject *o = t_lookup(t, key, mode, &found);
    return or_default(o, found, key, NULL);
}

static PyObject *
table_subscript(TableObject *t, PyObject *key)
{
    return lookup_or_keyerror(t, key, M_GET);
}

static int
table_contains(TableObject *t, PyObject *key)
{
    int found = 0;
    PyObject *o = t_lookup(t, key, M_CONTAINS, &found);
    if (o == NULL)
        return -1;
    Py_DECREF(o);
    return found;
}

static PyObject *
table_get(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    int found = 0;
    PyObject *o = t_lookup(t, args[0], M_GET, &found);
    return or_default(o, found, args[0], nargs == 2 ? args[1] : Py_None);
}

static PyObject *
table_nbytes(TableObject *t, PyObject *key)
{
    return lookup_or_keyerror(t, key, M_NBYTES);
}

static Py_ssize_t
table_length(TableObject *t)
{
    uint64_t end = tt_enter(t), nslots;
    if (end == 0)
        return -1;
    if (!index_ok(PAY(&t->c), end, LDA(&HDR(&t->c)->index), &nslots)) {
        corrupt(t, "the index at %llu is damaged", (unsigned long long)LDR(&HDR(&t->c)->index));
        return -1;
    }
    int64_t n = (int64_t)LDR(&HDR(&t->c)->count);
    if ((uint64_t)n > nslots) {
        corrupt(t, "the key count %llu is more than the index's %llu words",
                (unsigned long long)n, (unsigned long long)nslots);
        return -1;
    }
    if (t_in_batch(&t->c)) {
        /* count the batch's own changes */
        TIndex x;
        if (batch_words(t, &x) < 0 || raising(t, ov_fits(&t->c.ov, &x)) < 0)
            return -1;
        for (size_t j = 0; j < t->c.ov.n; j++) {
            uint64_t pub = LDR(&x.slots[t->c.ov.e[j].slot]), w = t->c.ov.e[j].word;
            n += (w > W_TOMB) - (pub > W_TOMB);
        }
    }
    return n < 0 ? 0 : (Py_ssize_t)n;
}

/* ---- Python methods: writing ----------------------------------------------- */

enum { W_SET, W_ADD };

static int
t_put(TableObject *t, PyObject *key, PyObject *value, int mode)
{
    if (tt_enter(t) == 0)
        return -1;
    TKey k;
    TVal v;
    /* Encoding may run Python code (pickle), which may fork: a child forked
     * inside a batch holds none of it, and must not wait for its parent's
     * lock to write the put alone. */
    uint64_t forks = t->forks;
    if (key_encode(t, key, &k) < 0)
        return -1;
    if (val_encode(t, value, &v) < 0) {
        key_release(&k);
        return -1;
    }
    int ret = -1;
    if (t->forked_in_batch &&
        t_forked_since(t, forks, "a write inside a batch encoded its value") < 0)
        goto out;
    uint64_t room = (uint64_t)t->c.m->reserve - t->c.poff - T_HEADER;
    uint64_t need = T_REC_HDR + (uint64_t)k.n + v.len;
    if (v.len > room || need > room) {
        PyErr_Format(ST(t)->ValueTooLargeError,
                     "a value of %llu bytes cannot fit in this store (max_size %llu "
                     "bytes); create the store with a larger max_size=",
                     (unsigned long long)v.len, (unsigned long long)room);
        goto out;
    }
    if (t_lock(t) < 0)
        goto out;
    /* A batch stages a plain put: its record now, its index word at the
     * batch's next read or when it is published (t_batch_resolve). */
    int staged = mode == W_SET && t_in_batch(&t->c);
    TSlot slot;
    int r = staged ? t_stage_room(&t->c) : t_put_find(&t->c, &k, &slot);
    if (r < 0) {
        t_raise(t);
        goto unlock;
    }
    if (r == P_FOUND && mode == W_ADD) {
        PyObject *msg = PyUnicode_FromFormat(
            "key %R is already in the store; add() only inserts (use st[key] = value "
            "to replace it)", key);
        if (msg) {
            PyErr_SetObject(ST(t)->KeyExistsError, msg);
            Py_DECREF(msg);
        }
        goto unlock;
    }
    char *dst;
    uint64_t off = t_put_write(&t->c, &k, v.type, v.len, &dst);
    if (off == (uint64_t)-1) {
        t_raise(t);
        goto unlock;
    }
    if (val_write(&v, dst) < 0) {
        t_free(&t->c, off); /* never published */
        goto unlock;
    }
    if (staged ? t_stage(&t->c, off, &k) : t_put_publish(&t->c, &slot, off, k.h)) {
        t_raise(t);
        goto unlock;
    }
    ret = 0;
unlock:
    t_unlock(t);
out:
    val_release(&v);
    key_release(&k);
    return ret;
}

/* Delete key; with want_value, return its value (pop).  Returns a new
 * reference (Py_None when !want_value), or NULL; *found tells if it was
 * there. */
static PyObject *
t_delete(TableObject *t, PyObject *key, int want_value, int *found)
{
    if (tt_enter(t) == 0)
        return NULL;
    TKey k;
    if (key_encode(t, key, &k) < 0)
        return NULL;
    PyObject *out = NULL;
    if (t_lock(t) < 0) {
        key_release(&k);
        return NULL;
    }
    TSlot slot;
    int r = t_delete_find(&t->c, &k, &slot);
    if (r < 0) {
        t_raise(t);
        goto unlock;
    }
    *found = r == P_FOUND;
    if (!*found) {
        out = Py_NewRef(Py_None);
        goto unlock;
    }
    if (want_value) {
        uint64_t forks = t->forks;
        t->midway++; /* and unpickling, before the delete is published */
        out = value_locked(t, word_off(slot.old), 0);
        t->midway--;
        if (out != NULL &&
            t_forked_since(t, forks, "pop() decoded the value under the store's lock") < 0)
            Py_CLEAR(out);
        if (out == NULL)
            goto unlock;
    } else {
        out = Py_NewRef(Py_None);
    }
    if (t_delete_publish(&t->c, &slot) < 0) {
        t_raise(t);
        Py_CLEAR(out);
    }
unlock:
    t_unlock(t);
    key_release(&k);
    return out;
}

static int
table_ass_subscript(TableObject *t, PyObject *key, PyObject *value)
{
    if (value != NULL)
        return t_put(t, key, value, W_SET);
    int found = 0;
    PyObject *o = t_delete(t, key, 0, &found);
    if (o == NULL)
        return -1;
    Py_DECREF(o);
    if (!found) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    return 0;
}

static PyObject *
table_add(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(key, value)");
        return NULL;
    }
    if (t_put(t, args[0], args[1], W_ADD) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_pop(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    int found = 0;
    PyObject *o = t_delete(t, args[0], 1, &found);
    return or_default(o, found, args[0], nargs == 2 ? args[1] : NULL);
}

/* ---- batches ---------------------------------------------------------------- */

/* Take the lock and open a batch (a nested one joins it): 0, or -1. */
static int
t_batch_begin(TableObject *t)
{
    if (t_enter_lock(t) < 0)
        return -1;
    if (t->c.batch_depth++ == 0) {
        t->batch_gen++;
        t->batch_doomed = 0;
    }
    return 0;
}

/* Close the batch that thread `owner` opened: publish its words when commit,
 * else discard them; release the lock.  Another thread may close it (a
 * generator's with-block closed there, a batch object freed there), as the
 * GIL orders every change of the table's state, when the batch alone holds
 * the lock (no batch nested in it, no lock taken inside it) and the owner is
 * in no operation that lets the GIL go or runs Python code under the lock
 * (midway): it then takes the lock over, so that the owner, from then on,
 * waits for it as any other thread, and ends the batch as its own.  0; -1
 * with an exception set; -2 with an exception set when it refused and the
 * batch is still open. */
static int
t_batch_end_as(TableObject *t, int commit, unsigned long owner, int outermost)
{
    if (t->c.batch_depth <= 0 || t->c.lock_thread != owner) {
        PyErr_SetString(PyExc_RuntimeError, "no batch is open in this thread");
        return -2;
    }
    if (owner != t_thread()) {
        const char *why = t->midway > 0 ? "is in the middle of an operation on the store"
                          : t->c.batch_depth > 1 ? "has another batch open inside it"
                          : t->c.lock_depth > 1 ? "holds the store's lock inside it"
                                                : NULL;
        if (why != NULL) {
            PyErr_Format(PyExc_RuntimeError, "the thread that opened this batch %s; leave "
                         "the batch in that thread, or after that ends", why);
            return -2;
        }
        t->c.lock_thread = t_thread(); /* taken over: ended below as ours */
    }
    if (t_reentered(t))
        return -2;
    int r = 0;
    /* The outermost block ended with an error before a block nested in it
     * (a generator's, closed first): the blocks nested in it end later, and
     * the batch's end then discards every write of them all. */
    if (!commit && outermost && t->c.batch_depth > 1)
        t->batch_doomed = 1;
    if (--t->c.batch_depth == 0 && tt_live(t) < 0)
        r = -1; /* unmapped meanwhile: ClosedError, raised */
    else if (t->c.batch_depth == 0) {
        int doomed = t->batch_doomed;
        t->batch_doomed = 0;
        if (commit && !doomed)
            r = t_batch_commit(&t->c);
        t->midway++; /* raising may run Python code; the discard is not done yet */
        if (r < 0)
            t_raise(t);
        if (!commit || doomed || r < 0)
            t_batch_discard(&t->c);
        t->midway--;
        if (commit && doomed) {
            PyErr_SetString(PyExc_RuntimeError,
                            "the batch was discarded, with this block's writes: the "
                            "with-block that opened it ended with an error while this "
                            "one, nested in it, was still open");
            r = -1;
        }
    }
    t_unlock(t);
    return r < 0 ? -1 : 0;
}

/* Close this thread's batch (t_batch_end_as). */
static int
t_batch_end(TableObject *t, int commit)
{
    return t_batch_end_as(t, commit, t_thread(), 0);
}

/* ---- update: many puts in one call, as one batch ----------------------------- */

/* Every UPDATE_CHECK puts, update() lets a signal's handler run (a C loop
 * over a dict runs no bytecode, where the interpreter would check) and
 * gives the GIL to a thread that has waited for it. */
enum { UPDATE_CHECK = 1024 };

typedef struct {
    Py_ssize_t done;
    uint64_t forks; /* t->forks when the update began */
} Update;

/* One pair of an update: 0, or -1 with an exception set. */
static int
update_put(TableObject *t, Update *u, PyObject *k, PyObject *v)
{
    if (t_forked_since(t, u->forks, "update() ran") < 0 || t_put(t, k, v, W_SET) < 0)
        return -1;
    if (++u->done % UPDATE_CHECK != 0)
        return 0;
    if (PyErr_CheckSignals() < 0)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    Py_END_ALLOW_THREADS
    return 0;
}

/* The pairs of a dict (one whose iteration is dict's: dict.update reads
 * those so, whatever keys() says).  The loop holds its own references, since
 * a value's encoding (pickle) may run code that changes the dict. */
static int
update_from_dict(TableObject *t, Update *u, PyObject *d)
{
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(d);
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        Py_INCREF(k);
        Py_INCREF(v);
        int r = update_put(t, u, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (r < 0)
            return -1;
        if (PyDict_GET_SIZE(d) != size) {
            PyErr_SetString(PyExc_RuntimeError, "the dict changed size during update()");
            return -1;
        }
    }
    return 0;
}

/* A mapping's keys() and [key], as dict.update reads one. */
static int
update_from_mapping(TableObject *t, Update *u, PyObject *m, PyObject *keys)
{
    PyObject *it = PyObject_GetIter(keys), *k;
    if (it == NULL)
        return -1;
    int r = 0;
    while (r == 0 && (k = PyIter_Next(it)) != NULL) {
        PyObject *v = PyObject_GetItem(m, k);
        r = v == NULL || update_put(t, u, k, v) < 0 ? -1 : 0;
        Py_XDECREF(v);
        Py_DECREF(k);
    }
    Py_DECREF(it);
    return r < 0 || PyErr_Occurred() ? -1 : 0;
}

/* An iterable of (key, value) pairs, with dict.update's errors. */
static int
update_from_pairs(TableObject *t, Update *u, PyObject *pairs)
{
    PyObject *it = PyObject_GetIter(pairs), *item;
    if (it == NULL)
        return -1;
    int r = 0;
    for (Py_ssize_t i = 0; r == 0 && (item = PyIter_Next(it)) != NULL; i++) {
        PyObject *pair = PySequence_Fast(item, "");
        if (pair == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                PyErr_Format(PyExc_TypeError, "cannot convert update sequence element #%zd "
                                              "to a sequence", i);
            r = -1;
        } else if (PySequence_Fast_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_ValueError, "update sequence element #%zd has length %zd; 2 "
                                           "is required", i, PySequence_Fast_GET_SIZE(pair));
            r = -1;
        } else {
            /* its own references: when the item is a list, PySequence_Fast
             * hands back that list, which code the put runs may empty */
            PyObject *k = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 0));
            PyObject *v = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 1));
            r = update_put(t, u, k, v);
            Py_DECREF(k);
            Py_DECREF(v);
        }
        Py_XDECREF(pair);
        Py_DECREF(item);
    }
    Py_DECREF(it);
    return r < 0 || PyErr_Occurred() ? -1 : 0;
}

/* update(other=(), /, **kwargs), as dict.update, in one batch: other
 * processes see every pair or none, and an error discards the pairs this
 * call wrote (inside an open batch() it joins that batch, whose end decides).
 * The staged puts of a batch overlap their cache misses. */
static PyObject *
table_update(TableObject *t, PyObject *args, PyObject *kwds)
{
    PyObject *other = NULL;
    if (!PyArg_UnpackTuple(args, "update", 0, 1, &other))
        return NULL;
    if (t_batch_begin(t) < 0)
        return NULL;
    Update u = {0, t->forks};
    int r = 0;
    if (other == NULL) {
        /* nothing but the keywords */
    } else if (PyDict_Check(other) && Py_TYPE(other)->tp_iter == PyDict_Type.tp_iter) {
        r = update_from_dict(t, &u, other); /* as dict.update: a dict's own pairs */
    } else {
        PyObject *keys = PyObject_GetAttrString(other, "keys");
        if (keys == NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear(); /* not a mapping: pairs */
        if (keys == NULL && PyErr_Occurred()) {
            r = -1;
        } else if (keys != NULL) {
            PyObject *ks = PyObject_CallNoArgs(keys);
            r = ks == NULL ? -1 : update_from_mapping(t, &u, other, ks);
            Py_XDECREF(ks);
            Py_DECREF(keys);
        } else {
            r = update_from_pairs(t, &u, other);
        }
    }
    if (r == 0 && kwds != NULL)
        r = update_from_dict(t, &u, kwds);
    if (t->forks != u.forks) { /* in a child: nothing here to end */
        if (r == 0)
            t_forked_since(t, u.forks, "update() ran");
        return NULL;
    }
    if (r < 0) { /* discard, raising the loop's error (the discard's own is misuse) */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (t_batch_end(t, 0) < 0)
            PyErr_Clear();
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (t_batch_end(t, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_batch_begin(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_batch_begin(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_batch_end(TableObject *t, PyObject *arg)
{
    int commit = PyObject_IsTrue(arg);
    if (commit < 0 || t_batch_end(t, commit) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- the batch as a context manager ---------------------------------------- */

/* `with st.batch():` opens the batch in __enter__ and closes it in __exit__,
 * both in C: the with statement protects the block from the instruction
 * after __enter__ returns, and a signal's handler (Ctrl-C) runs only at
 * the interpreter's next check, inside the block.  A batch opened by
 * Python code before a `try:` could be left open, with the lock held, by a
 * KeyboardInterrupt raised between the two. */
typedef struct {
    PyObject_HEAD
    TableObject *t;
    uint64_t forks;       /* t->forks at __enter__ */
    uint64_t gen;         /* t->batch_gen at __enter__: the batch it is part of */
    unsigned long thread; /* t_thread() of the thread that entered it */
    int outermost;        /* it opened the batch (others joined it) */
    int state;            /* 0 made, 1 entered, 2 exited */
} BatchObject;

static PyObject *
table_batch(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    BatchObject *b = PyObject_GC_New(BatchObject, ST(t)->TableBatch);
    if (b == NULL)
        return NULL;
    b->t = (TableObject *)Py_NewRef(t);
    b->forks = 0;
    b->gen = 0;
    b->thread = 0;
    b->outermost = 0;
    b->state = 0;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static PyObject *
batch_enter(PyObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    BatchObject *b = (BatchObject *)self;
    if (b->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, "a batch() is entered once; call batch() again "
                                            "for another block");
        return NULL;
    }
    if (t_batch_begin(b->t) < 0)
        return NULL;
    b->state = 1;
    b->forks = b->t->forks;
    b->gen = b->t->batch_gen;
    b->thread = t_thread();
    b->outermost = b->t->c.batch_depth == 1;
    return Py_NewRef((PyObject *)b->t);
}

static PyObject *
batch_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    BatchObject *b = (BatchObject *)self;
    int raised = nargs > 0 && args[0] != Py_None;
    if (b->state != 1) {
        PyErr_SetString(PyExc_RuntimeError, "this batch() is not open");
        return NULL;
    }
    b->state = 2;
    if (b->t->forks != b->forks) {
        if (raised) /* the block's own error, as it is */
            Py_RETURN_FALSE;
        PyErr_SetString(PyExc_RuntimeError,
                        "this batch was opened before the process forked, and a forked "
                        "child holds none of its parent's batch (the parent's goes on): "
                        "its writes in the block were not part of it; open a batch in "
                        "the child instead");
        return NULL;
    }
    if (b->gen != b->t->batch_gen || b->t->c.batch_depth <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "this batch() already ended, with the batch it "
                                            "was nested in");
        return NULL;
    }
    int r = t_batch_end_as(b->t, !raised, b->thread, b->outermost);
    if (r == -2) { /* refused: still open, for a later __exit__ or the dealloc */
        b->state = 1;
        return NULL;
    }
    if (r < 0)
        return NULL;
    Py_RETURN_FALSE;
}

static void
batch_dealloc(BatchObject *b)
{
    PyObject_GC_UnTrack(b);
    /* Entered and never left (its __exit__ not called), and nobody can leave
     * it any more: discard it, in whatever thread frees it, so that the lock
     * is not held by nothing. */
    TableObject *t = b->t;
    if (b->state == 1 && t != NULL && t->forks == b->forks && b->gen == t->batch_gen &&
        t->c.batch_depth > 0 && t->c.lock_thread == b->thread && t->c.m != NULL &&
        t->c.m->base != NULL && !t->midway) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (t_batch_end_as(t, 0, b->thread, b->outermost) < 0)
            PyErr_WriteUnraisable((PyObject *)t);
        PyErr_Restore(et, ev, tb);
    }
    Py_CLEAR(b->t);
    shm_free_instance((PyObject *)b);
}

static int
batch_traverse(BatchObject *b, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(b)); /* a heap type */
    Py_VISIT(b->t);
    return 0;
}

static const shm_special_def batch_specials[] = {
    {"__enter__", batch_enter, 0, "($self, /)", "Take the lock and open the batch."},
    {"__exit__", batch_exit, -1, "($self, *exc_info)",
     "Publish the batch, or discard it when the block raised; release the lock."},
    {NULL},
};

static PyType_Slot batch_spec_slots[] = {
    {Py_tp_dealloc, batch_dealloc},
    {Py_tp_traverse, batch_traverse},
    {Py_tp_doc, "A batch of a store's writes, as a context manager (see Store.batch)."},
    {0, NULL},
};

static PyType_Spec batch_spec = {
    .name = "shmkit._core.TableBatch",
    .basicsize = sizeof(BatchObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = batch_spec_slots,
};

static PyObject *
table_lock(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter_lock(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_unlock(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t->c.lock_depth <= 0 || t->c.lock_thread != t_thread()) {
        PyErr_SetString(PyExc_RuntimeError, "the store's lock is not held by this thread");
        return NULL;
    }
    if (t->c.lock_depth <= t->c.batch_depth) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the store's lock is held by a batch open on this thread; it is "
                        "released when the batch's with-block ends");
        return NULL;
    }
    if (t_reentered(t))
        return NULL;
    t_unlock(t);
    Py_RETURN_NONE;
}

static PyObject *
table_clear(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter_lock(t) < 0)
        return NULL;
    if (t_in_batch(&t->c) && t->c.batch_depth) {
        t_unlock(t);
        PyErr_SetString(PyExc_RuntimeError, "clear() cannot run inside a batch (it is not one "
                                            "of the writes a batch stages); call it before "
                                            "or after the with block");
        return NULL;
    }
    PyObject *ret = NULL;
    if (t_clear_locked(&t->c) < 0)
        t_raise(t);
    else
        ret = Py_NewRef(Py_None);
    t_unlock(t);
    return ret;
}

/* ---- scanning (iteration) --------------------------------------------------- */

/* One call of _scan(index, start, max, what), which scan() below makes:
 * -> (next, index, [entries], hashes, wrapped) or None
 * when `index` is no longer the current index (the caller restarts).
 * `index` is a token naming one index: its offset / 16 with index_gen above
 * bit 40, because a later index may be placed where an earlier one was.
 * what: 0 keys, 1 values, 2 (key, value) pairs.  Entries of one call are
 * read under one epoch, so each is a value that was stored at some moment.
 * Lock-free (locked 0), it sets *busy and returns NULL with no exception
 * when writers kept changing the chunk through every retry. */
static PyObject *
scan_chunk(TableObject *t, uint64_t want_ix, uint64_t start, uint64_t maxn, int what,
           int locked, int *busy)
{
    for (int attempt = 0; attempt < MAX_RETRIES; attempt++) {
        uint64_t end = tt_enter(t);
        if (end == 0)
            return NULL;
        THeader *h = HDR(&t->c);
        char *P = PAY(&t->c);
        uint64_t e = LDA(&h->epoch);
        if (e & 1 && !locked) {
            int w = t_wait_even(t, &e);
            if (w < 0)
                return NULL;
            if (w > 0) { /* left odd by a dead writer: the lock repairs it */
                if (t->c.readonly) {
                    PyErr_SetString(ST(t)->BusyError,
                                    "a writer died while publishing a batch; the next "
                                    "write repairs the store (this handle is readonly)");
                    return NULL;
                }
                if (t_lock(t) < 0)
                    return NULL;
                t_unlock(t);
                continue;
            }
        }
        uint64_t ix = LDA(&h->index), nslots;
        if (!index_ok(P, end, ix, &nslots)) {
            /* As for records below: a new index may lie beyond the heap end
             * loaded above when a writer grew the heap meanwhile. */
            if (!locked && (!epoch_same(h, e) || LDA(&h->heap_end) != end))
                continue;
            corrupt(t, "the index at %llu is damaged", (unsigned long long)ix);
            return NULL;
        }
        /* index_gen was raised before ix was published (acquire above) */
        uint64_t token = (ix >> 4) | (LDR(&h->index_gen) << 40);
        if (want_ix && want_ix != token)
            Py_RETURN_NONE;
        PyObject *list = PyList_New(0), *wrapped = PyList_New(0), *hashes;
        if (list == NULL || wrapped == NULL)
            goto fail;
        uint64_t i = start, stop = start + maxn > nslots ? nslots : start + maxn;
        const uint64_t *slots = W64(P, ix + T_INDEX_HDR);
        int bad = 0, err;
        uint64_t hv[1024];
        size_t nh = 0;
        TIndex x = {ix, nslots, nslots - 1, (uint64_t *)slots};
        for (; i < stop && nh < 1024; i++) {
            int fo, race, post;
            uint64_t w = locked ? wword(&t->c, &x, i, &fo) : LDA(&slots[i]), off = word_off(w);
            if (w <= W_TOMB)
                continue;
            TRec r;
            PyObject *k = NULL, *v = NULL, *item;
            if (rec_read(P, end, off, &r) < 0 ||
                (what != 1 &&
                 (k = key_decode(r.ktype, P + off + T_REC_HDR, r.klen)) == NULL)) {
                PyErr_Clear();
                bad = 1; /* torn, or damaged if the epoch holds */
                break;
            }
            if (what != 0) {
                v = val_decode(t, P, off, &r, e, locked, &race, &post);
                if (v == NULL) {
                    Py_XDECREF(k);
                    if (!race)
                        goto fail;
                    bad = 1;
                    break;
                }
                /* a pickle is unpickled in Python, after the epoch check */
                if (post && (v = Py_BuildValue("(N)", v)) == NULL) {
                    Py_XDECREF(k);
                    goto fail;
                }
            }
            item = what == 0 ? k : what == 1 ? v : PyTuple_Pack(2, k, v);
            if (what == 2) {
                Py_DECREF(k);
                Py_DECREF(v);
            }
            err = item == NULL || PyList_Append(list, item) < 0;
            Py_XDECREF(item);
            if (err)
                goto fail;
            hv[nh++] = r.hash;
            if ((r.hash & x.mask) > i) { /* its probe run wrapped round the end */
                PyObject *hh = PyLong_FromUnsignedLongLong(r.hash);
                err = hh == NULL || PyList_Append(wrapped, hh) < 0;
                Py_XDECREF(hh);
                if (err)
                    goto fail;
            }
        }
        /* A record is published beyond the heap end this scan loaded when
         * a writer grew the heap meanwhile (growth moves heap_end, not the
         * epoch; vacuum makes it common by cutting the heap first): the
         * index word was loaded with acquire after heap_end was stored, so
         * loading heap_end again tells that race from damage. */
        if (!locked && (!epoch_same(h, e) || (bad && LDA(&h->heap_end) != end))) {
            Py_DECREF(list);
            Py_DECREF(wrapped);
            continue;
        }
        if (bad) {
            corrupt(t, "a record listed in the index at slot %llu is damaged",
                    (unsigned long long)i);
            goto fail;
        }
        hashes = PyBytes_FromStringAndSize((const char *)hv, (Py_ssize_t)(nh * 8));
        if (hashes == NULL)
            goto fail;
        long long next = i >= nslots ? -1 : (long long)i;
        return Py_BuildValue("LKNNN", next, (unsigned long long)token, list, hashes,
                             wrapped);
    fail:
        Py_XDECREF(list);
        Py_XDECREF(wrapped);
        return NULL;
    }
    *busy = 1; /* no exception: scan() reads the chunk under the lock */
    return NULL;
}

/* A locked chunk: it reads the words through the index it loaded, while
 * decoding and collecting may run Python code (hooks, the collector). */
static PyObject *
scan_chunk_locked(TableObject *t, uint64_t want_ix, uint64_t start, uint64_t maxn, int what)
{
    int busy = 0; /* never set when locked: the epoch cannot change */
    t->midway++;
    PyObject *o = scan_chunk(t, want_ix, start, maxn, what, 1, &busy);
    t->midway--;
    return o;
}

static PyObject *
scan(TableObject *t, uint64_t want_ix, uint64_t start, uint64_t maxn, int what)
{
    if (!t_in_batch(&t->c)) {
        int busy = 0;
        PyObject *o = scan_chunk(t, want_ix, start, maxn, what, 0, &busy);
        if (!busy)
            return o;
        /* Writers kept changing the chunk while it was read: read it under
         * their lock, as a lookup does (which also repairs). */
        if (t->c.readonly) {
            PyErr_SetString(ST(t)->BusyError,
                            "writers kept changing the store while it was being listed "
                            "(this handle is readonly, so it cannot read under the "
                            "writers' lock); retry, or open it writable");
            return NULL;
        }
        if (t_enter_lock(t) < 0)
            return NULL;
        o = scan_chunk_locked(t, want_ix, start, maxn, what);
        t_unlock(t);
        return o;
    }
    TIndex bx;
    if (tt_enter(t) == 0 || batch_words(t, &bx) < 0)
        return NULL;
    return scan_chunk_locked(t, want_ix, start, maxn, what);
}

static PyObject *
table_scan(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long want_ix, start, maxn;
    int what;
    if (nargs != 4 || !PyArg_Parse(args[0], "K", &want_ix) ||
        !PyArg_Parse(args[1], "K", &start) || !PyArg_Parse(args[2], "K", &maxn) ||
        !PyArg_Parse(args[3], "i", &what)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_scan(index, start, max, what)");
        return NULL;
    }
    if (tt_live(t) < 0)
        return NULL;
    /* Building the entries runs Python code (the array hook, the garbage
     * collector) that may close the store: keep the memory mapped. */
    PyObject *mapping = Py_NewRef(t->mapping);
    shm_pin(mapping);
    PyObject *r = scan(t, want_ix, start, maxn, what);
    shm_unpin(mapping);
    Py_DECREF(mapping);
    return r;
}


static PyObject *
table_verify(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    TWalk w;
    if (t_enter_lock(t) < 0)
        return NULL;
    int r;
    if (t_in_batch(&t->c)) {
        PyErr_SetString(PyExc_RuntimeError, "verify() cannot run inside a batch, whose writes "
                                            "are not published yet; call it after the with "
                                            "block");
        r = -1;
    } else if ((r = t_verify(&t->c, &w)) < 0) {
        t_raise(t);
    }
    t_unlock(t);
    if (r < 0)
        return NULL;
    return Py_BuildValue("{sKsKsKsKsK}", "blocks", (unsigned long long)w.blocks,
                         "records", (unsigned long long)w.records, "used_bytes",
                         (unsigned long long)w.used, "free_bytes",
                         (unsigned long long)w.free_bytes, "index_bytes",
                         (unsigned long long)w.index_bytes);
}

static PyObject *
table_stats(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    uint64_t end = tt_enter(t);
    if (end == 0)
        return NULL;
    int locked = !t->c.readonly && t_lock(t) == 0;
    if (!t->c.readonly && !locked)
        return NULL;
    TStats s;
    t_stats(&t->c, end, &s);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsdsKsKsKsKsKsKsK}",
        "count", (unsigned long long)s.count,
        "tombstones", (unsigned long long)s.tombstones,
        "used_bytes", (unsigned long long)s.used,
        "heap_bytes", (unsigned long long)s.heap,
        "free_bytes", (unsigned long long)s.free_bytes,
        "free_blocks", (unsigned long long)s.free_blocks,
        "largest_free", (unsigned long long)s.largest_free,
        "pending_bytes", (unsigned long long)s.pending,
        "index_slots", (unsigned long long)s.index_slots,
        "fragmentation",
        s.free_bytes ? 1.0 - (double)s.largest_free / (double)s.free_bytes : 0.0,
        "growths", (unsigned long long)s.growths,
        "index_growths", (unsigned long long)s.index_growths,
        "recycles", (unsigned long long)s.recycles,
        "recoveries", (unsigned long long)s.recoveries,
        "vacuums", (unsigned long long)s.vacuums,
        "batches", (unsigned long long)s.batches,
        "epoch", (unsigned long long)s.epoch);
    if (locked)
        t_unlock(t);
    return d;
}

/* Take the lock, compact the heap and cut off its free tail, then have
 * shrink(new heap end) cut the segment to it, inside the operation; release
 * the lock.  All in one call, so that no Ctrl-C between two Python
 * statements leaves the lock held. */
static PyObject *
table_vacuum(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "_vacuum(shrink=None)");
        return NULL;
    }
    PyObject *shrink = nargs ? args[0] : Py_None;
    if (tt_enter(t) == 0)
        return NULL;
    if (t_in_batch(&t->c)) {
        PyErr_SetString(PyExc_RuntimeError, "vacuum() cannot run inside a batch; call it "
                                            "after the with block");
        return NULL;
    }
    if (t_lock(t) < 0)
        return NULL;
    uint64_t new_end, moved;
    PyObject *out = NULL;
    if (t_vacuum(&t->c, &new_end, &moved) < 0)
        t_raise(t); /* the heap is marked for recovery */
    /* Cutting the segment to new_end is part of the same operation: code
     * run in between must not grow the heap past it (see t_reentered). */
    else if (shrink == Py_None || call_midway(t, shrink, new_end) == 0)
        out = Py_BuildValue("KK", (unsigned long long)new_end, (unsigned long long)moved);
    t_unlock(t);
    return out;
}

/* ---- setup -------------------------------------------------------------------- */

/* The protocol's grow callback: Python's grow hook makes the segment at
 * least `need` bytes larger (store.py), or MemoryError when there is none. */
static int
table_grow(TCore *c, uint64_t need)
{
    TableObject *t = (TableObject *)((char *)c - offsetof(TableObject, c));
    if (t->grow_hook == NULL || t->grow_hook == Py_None) {
        PyErr_SetString(PyExc_MemoryError, "the store is full");
        return -1;
    }
    return call_midway(t, t->grow_hook, need);
}

static PyObject *
table_bind(TableObject *t, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "payload", "readonly", "pickle", "encode",
                             "decode", "grow", "timeout", "read_timeout", NULL};
    PyObject *mapping, *enc = Py_None, *dec = Py_None, *grow = Py_None,
             *timeout = Py_None, *rtimeout = Py_None;
    unsigned long long poff;
    int readonly = 0, pickle = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&K|ppOOOOO", kwlist, shm_mapping_converter,
                                     &mapping, &poff, &readonly, &pickle, &enc, &dec,
                                     &grow, &timeout, &rtimeout))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    if (m->base == NULL || poff % 4096 || poff + T_HEADER + T_INDEX_HDR > (uint64_t)m->length) {
        PyErr_Format(m->base == NULL || poff % 4096 ? PyExc_ValueError : ST(t)->CorruptError,
                     "the segment's payload (%lld bytes) is too small for a store: its "
                     "header is damaged; recreate the store", (long long)m->length);
        return NULL;
    }
    int64_t tns, rns;
    if (shm_timeout_ns(timeout, "timeout", &tns) < 0 ||
        shm_timeout_ns(rtimeout, "read_timeout", &rns) < 0)
        return NULL;
    Py_XSETREF(t->mapping, Py_NewRef(mapping));
    t->c.m = m;
    t->c.poff = poff;
    t->c.readonly = readonly;
    t->pickle = pickle;
    t->c.timeout_ns = tns;
    t->c.read_timeout_ns = rns;
    Py_XSETREF(t->encode_hook, Py_NewRef(enc));
    Py_XSETREF(t->decode_hook, Py_NewRef(dec));
    Py_XSETREF(t->grow_hook, Py_NewRef(grow));
    t->c.seed = LDR(&HDR(&t->c)->seed);
    t->c.grow = table_grow;
    Py_RETURN_NONE;
}

/* _format(seed): lay out an empty store over the whole payload (creator only). */
static PyObject *
table_format(TableObject *t, PyObject *arg)
{
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(arg);
    if (PyErr_Occurred() || tt_live(t) < 0)
        return NULL;
    if (t_format(&t->c, seed) < 0) {
        t_raise(t);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
table_after_fork(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    /* The child holds none of its parent's locks or batches. */
    t->forked_in_batch = t_in_batch(&t->c);
    t->c.lock_depth = 0;
    t->c.batch_depth = 0;
    t->batch_doomed = 0;
    t->midway = 0;
    holder_remove(t); /* (in a child, whose list starts empty, it only forgets it) */
    t->forks++;
    ov_clear(&t->c.ov);
    staged_clear(&t->c.staged);
    Py_RETURN_NONE;
}

static PyObject *
table_flush(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (tt_live(t) < 0)
        return NULL;
    int r;
    shm_pin(t->mapping);
    Py_BEGIN_ALLOW_THREADS
    r = msync(t->c.m->base, (size_t)t->c.m->length, MS_SYNC);
    Py_END_ALLOW_THREADS
    shm_unpin(t->mapping);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* _raw(key) -> (block offset, slot word) for tests that damage a record. */
static PyObject *
table_locate(TableObject *t, PyObject *key)
{
    uint64_t end = tt_enter(t), off;
    if (end == 0)
        return NULL;
    TKey k;
    TRec r;
    if (key_encode(t, key, &k) < 0)
        return NULL;
    int found = probe_ro(PAY(&t->c), end, &k, &off, &r);
    key_release(&k);
    if (found != P_FOUND)
        Py_RETURN_NONE;
    return Py_BuildValue("KK", (unsigned long long)(t->c.poff + off),
                         (unsigned long long)(t->c.poff + off + T_REC_HDR + r.klen));
}

static void
table_dealloc(TableObject *t)
{
    PyObject_GC_UnTrack(t);
    if (t->c.lock_depth > 0 && t->c.m && t->c.m->base) {
        if (t->c.batch_depth > 0)
            t_batch_discard(&t->c); /* else its blocks stay used by nothing */
        t->c.lock_depth = 1;
        t_unlock(t);
    }
    holder_remove(t); /* listed still if its lock was never released here */
    ov_clear(&t->c.ov);
    staged_clear(&t->c.staged);
    Py_CLEAR(t->mapping);
    Py_CLEAR(t->encode_hook);
    Py_CLEAR(t->decode_hook);
    Py_CLEAR(t->grow_hook);
    shm_free_instance((PyObject *)t);
}

static int
table_traverse(TableObject *t, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(t)); /* a heap type */
    Py_VISIT(t->mapping);
    Py_VISIT(t->encode_hook);
    Py_VISIT(t->decode_hook);
    Py_VISIT(t->grow_hook);
    return 0;
}

static int
table_clear_refs(TableObject *t)
{
    Py_CLEAR(t->encode_hook);
    Py_CLEAR(t->decode_hook);
    Py_CLEAR(t->grow_hook);
    return 0;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))table_get, METH_FASTCALL,
     "get($self, key, default=None, /)\n--\n\nThe value stored under key, or default."},
    {"add", (PyCFunction)(void (*)(void))table_add, METH_FASTCALL,
     "add($self, key, value, /)\n--\n\nInsert key; KeyExistsError if it is already there."},
    {"pop", (PyCFunction)(void (*)(void))table_pop, METH_FASTCALL,
     "pop($self, key, /, *default)\n--\n\nRemove key and return its value, in one step."},
    {"get_into", (PyCFunction)(void (*)(void))table_get_into, METH_FASTCALL,
     "get_into($self, key, buffer, /)\n--\n\n"
     "get_into(key, buffer) -> int\n\nCopy a bytes or array value into buffer."},
    {"update", (PyCFunction)(void (*)(void))table_update, METH_VARARGS | METH_KEYWORDS,
     "update($self, other=(), /, **kwargs)\n--\n\n"
     "Store the pairs of a mapping or of an iterable of pairs, then kwargs, as one batch."},
    {"get_many", (PyCFunction)(void (*)(void))table_get_many, METH_FASTCALL,
     "get_many($self, keys, /, *default)\n--\n\n"
     "get_many(keys[, default]) -> list\n\nThe values of keys, in order."},
    {"_view", (PyCFunction)table_view, METH_O, "_view($self, key, /)\n--\n\n"
     "The value of key in place: (TableView, vtype, array header or None); Store.view."},
    {"nbytes", (PyCFunction)table_nbytes, METH_O,
     "nbytes($self, key, /)\n--\n\n"
     "nbytes(key) -> int\n\nBytes the value of key takes when encoded."},
    {"clear", (PyCFunction)table_clear, METH_NOARGS, "clear($self, /)\n--\n\n"
     "Remove every key."},
    {"_bind", (PyCFunction)(void (*)(void))table_bind, METH_VARARGS | METH_KEYWORDS, "_bind($self, /, mapping, payload, readonly=False, pickle=False, encode=None, decode=None, grow=None, timeout=None, read_timeout=None)\n--\n\n"
     "Bind this handle to the store whose payload is at offset payload of mapping."},
    {"_format", (PyCFunction)table_format, METH_O, "_format($self, seed, /)\n--\n\n"
     "Lay out an empty store over the whole payload (the creator only)."},
    {"_scan", (PyCFunction)(void (*)(void))table_scan, METH_FASTCALL, "_scan($self, index, start, max, what, /)\n--\n\n"
     "Up to max entries from index word start: (next, index, entries, hashes, wrapped), or None when the index changed."},
    {"_batch", (PyCFunction)table_batch, METH_NOARGS, "_batch($self, /)\n--\n\n"
     "A context manager: a batch of this store's writes (see Store.batch)."},
    {"_batch_begin", (PyCFunction)table_batch_begin, METH_NOARGS, "_batch_begin($self, /)\n--\n\n"
     "Take the lock and open a batch (nested batches join it)."},
    {"_batch_end", (PyCFunction)table_batch_end, METH_O, "_batch_end($self, commit, /)\n--\n\n"
     "Close the batch: publish its words when commit is true, else discard them; release the lock."},
    {"_lock", (PyCFunction)table_lock, METH_NOARGS, "_lock($self, /)\n--\n\n"
     "Take the writers' lock (re-entrant in this thread)."},
    {"_unlock", (PyCFunction)table_unlock, METH_NOARGS, "_unlock($self, /)\n--\n\n"
     "Release the writers' lock taken by _lock()."},
    {"_verify", (PyCFunction)table_verify, METH_NOARGS, "_verify($self, /)\n--\n\n"
     "Check every invariant under the lock: a dict of totals, or CorruptError."},
    {"_stats", (PyCFunction)table_stats, METH_NOARGS, "_stats($self, /)\n--\n\n"
     "Counters of the store (a dict)."},
    {"_vacuum", (PyCFunction)(void (*)(void))table_vacuum, METH_FASTCALL,
     "_vacuum($self, shrink=None, /)\n--\n\n"
     "Take the lock, compact the heap, call shrink(new heap end) to cut the\n"
     "segment, release the lock: (new heap end, records moved)."},
    {"_flush", (PyCFunction)table_flush, METH_NOARGS, "_flush($self, /)\n--\n\n"
     "msync the mapping (a store on disk survives a crash of the machine)."},
    {"_after_fork", (PyCFunction)table_after_fork, METH_NOARGS, "_after_fork($self, /)\n--\n\n"
     "Forget the parent's locks and batch (in a forked child)."},
    {"_locate", (PyCFunction)table_locate, METH_O, "_locate($self, key, /)\n--\n\n"
     "(record offset, value offset) of key in the mapping, or None (tests)."},
    {NULL}
};



static PyType_Slot table_spec_slots[] = {
    {Py_tp_dealloc, table_dealloc},
    {Py_mp_length, table_length},
    {Py_mp_subscript, table_subscript},
    {Py_mp_ass_subscript, table_ass_subscript},
    {Py_sq_contains, table_contains},
    {Py_tp_doc, "Table()\n--\n\nThe Store's hash table in shared memory (see shmkit.Store)."},
    {Py_tp_traverse, table_traverse},
    {Py_tp_clear, table_clear_refs},
    {Py_tp_methods, table_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec table_spec = {
    .name = "shmkit._core.Table",
    .basicsize = sizeof(TableObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = table_spec_slots,
};

static PyObject *
table_hash(PyObject *mod, PyObject *args)
{
    Py_buffer b;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*K", &b, &seed))
        return NULL;
    uint64_t h = thash(b.buf, (size_t)b.len, seed);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef table_functions[] = {
    {"table_hash", table_hash, METH_VARARGS,
     "table_hash($module, data, seed, /)\n--\n\n"
     "table_hash(data, seed) -> int: the store's 64-bit key hash."},
    {NULL}
};

int
shm_init_table(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    if (shm_add_type(module, &table_spec, &st->Table) < 0)
        return -1;
    if (shm_add_type(module, &view_spec, &st->View) < 0)
        return -1;
    if (shm_add_type(module, &batch_spec, &st->TableBatch) < 0 ||
        shm_add_specials(module, st->TableBatch, batch_specials) < 0)
        return -1;
    return PyModule_AddFunctions(module, table_functions);
}
