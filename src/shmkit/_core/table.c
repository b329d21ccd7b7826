/* table.c - the Store's hash table in shared memory.
 *
 * The hot paths of shmkit.Store: key hashing, lock-free lookup, crash-safe
 * insert/update/delete, value encoding of the fixed types, and the space
 * allocator underneath.  Python (store.py) adds growth of the segment,
 * numpy/pickle encoding, iteration and the public API.
 *
 * The shared layout, its constants and the _Static_asserts pinning every
 * field offset are in table.h.
 *
 * Synchronisation.  Writers serialise on the robust mutex `lock` in the
 * header.  Readers take no lock:
 *   - records are never changed once published: a put writes a new record in
 *     free space and publishes it with one release store of its index word;
 *     a delete stores a tombstone.  The replaced record is only marked free
 *     ("pending"): its bytes stay intact.
 *   - pending space becomes reusable only in a recycle, which first adds 2 to
 *     `epoch` (then a release fence), so any write into recycled space comes
 *     after the epoch change.
 *   - a reader loads epoch (acquire), probes and copies, then (acquire fence)
 *     loads epoch again; if it changed the copy may be torn and it retries.
 *     Every offset and length read is bounds-checked first, and all record
 *     header fields are read once (relaxed atomics), so a torn or hostile
 *     record can cause a retry or a CorruptError, never a wild access.
 *   - a batch publishes many index words at once: epoch is made odd while its
 *     words are stored and even after; readers wait for an even epoch.
 * Recycles happen after about 1/8 of the heap is pending, so readers rarely
 * retry and the epoch's cache line is rarely written.
 *
 * Views (Store.view) hand out a record's bytes in place, so its space must
 * not be reused while one is held.  Each attachment counts its live views in
 * the header's views[its attach slot], tagged with its generation.  A view
 * adds one (seq_cst CAS, then a full fence) before it loads the epoch, and
 * is handed out only if the epoch did not move; a recycle reads the counts,
 * adds 2 to the epoch, makes a full fence and reads them again.  Either the
 * recycle sees the count and is deferred, or the view sees the new epoch
 * and retries.  Counts of dead attachments (shm_token_alive) are ignored and
 * cleared, so a process killed holding views holds nothing.  See
 * t_views_busy and t_recycle_ex.
 *
 * Waiting readers sleep through shm_wait_until (wait.h) on the epoch's low
 * 32 bits (little-endian: the u64's first four bytes), woken by the writer
 * that makes it even, up to the store's read timeout (Timeout naming the
 * lock holder's pid and whether it is stopped).
 *
 * Crash safety.  Every single publication is one atomic store, and the block
 * chain is consistent after every store (splits write the tail's header
 * before the head's new size; merges write one size).  A writer that dies
 * leaves at most an unreferenced block, a half-built index or a half-applied
 * batch.  The next writer gets the lock "recovered" and runs t_recover():
 * redo the batch journal if it was committing, mark every block the index
 * references, free the rest, recount, recycle.  Nothing in the free lists or
 * counters is trusted after a crash.  The lock is the core's robust mutex
 * taken with shm_lock_acquire_repair(), whose repair callback is t_recover.
 *
 * Why no undo journal (journal.h).  Everything a writer changes besides the
 * index (counters, free-list heads, top, block flags) is derived from the
 * index and the block chain and rebuilt by t_recover, and an index word
 * must never be rolled back: readers may already have returned what it
 * names.  Journaling would cost two shared stores and a release per word on
 * every put for state recovery recomputes anyway.  The batch journal is a
 * redo log, not an undo journal: its words were promised when the commit
 * began, and readers may have seen some during the odd epoch, so a dead
 * committer's batch is finished, never undone.
 *
 * Crash points: every step boundary of every mutating operation is
 * shm_crash_point("table.<op>.<step>") (list in docs/store.md).
 */
#include "table.h"
#include "wait.h"
#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <pythread.h>
#include <structmember.h>


#define LDA(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LDR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STA(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define W64(P, off) ((uint64_t *)((P) + (off)))

/* The store's own exceptions; read-only and closed handles raise the
 * core's ReadOnlyError and ClosedError (SHM_READONLY_EXC, SHM_CLOSED_EXC). */
static PyObject *t_KeyExists, *t_Unsupported, *t_TooLarge, *t_Busy;

/* ---- hashing --------------------------------------------------------------
 * A compact 64-bit hash in the style of wyhash (public domain): 128-bit
 * multiply-fold mixing, overlapping reads for short keys.  Seeded per store,
 * so colliding keys cannot be precomputed. */
static inline uint64_t
rd64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t
rd32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t
mix(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

#define H0 0xa0761d6478bd642full
#define H1 0xe7037ed1a0b428dbull
#define H2 0x8ebc6af09c88c6e3ull
#define H3 0x589965cc75374cc3ull

static uint64_t
thash(const char *p, size_t n, uint64_t seed)
{
    uint64_t a, b;
    seed ^= mix(seed ^ H0, H1);
    if (n <= 16) {
        if (n >= 4) {
            size_t q = (n >> 3) << 2;
            a = (rd32(p) << 32) | rd32(p + q);
            b = (rd32(p + n - 4) << 32) | rd32(p + n - 4 - q);
        } else if (n > 0) {
            a = ((uint64_t)(uint8_t)p[0] << 16) | ((uint64_t)(uint8_t)p[n >> 1] << 8) |
                (uint8_t)p[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        if (i > 48) {
            uint64_t s1 = seed, s2 = seed;
            do {
                seed = mix(rd64(p) ^ H1, rd64(p + 8) ^ seed);
                s1 = mix(rd64(p + 16) ^ H2, rd64(p + 24) ^ s1);
                s2 = mix(rd64(p + 32) ^ H3, rd64(p + 40) ^ s2);
                p += 48;
                i -= 48;
            } while (i > 48);
            seed ^= s1 ^ s2;
        }
        while (i > 16) {
            seed = mix(rd64(p) ^ H1, rd64(p + 8) ^ seed);
            i -= 16;
            p += 16;
        }
        a = rd64(p + i - 16);
        b = rd64(p + i - 8);
    }
    a ^= H1;
    b ^= seed;
    __uint128_t r = (__uint128_t)a * b;
    a = (uint64_t)r;
    b = (uint64_t)(r >> 64);
    return mix(a ^ H0 ^ n, b ^ H1);
}

/* ---- the Table object ------------------------------------------------------ */

typedef struct {
    uint64_t slot; /* slot + 1; 0 marks an unused entry */
    uint64_t word;
} OvEntry;

/* A batch's index words, not yet published: slot -> word. */
typedef struct {
    OvEntry *e;
    size_t cap, n;
    uint64_t newslots; /* entries whose published word is empty */
} Overlay;

typedef struct {
    PyObject_HEAD
    PyObject *mapping;
    MappingObject *m;
    uint64_t poff;        /* absolute offset of the payload in the mapping */
    uint64_t seed;
    int readonly;
    int pickle;           /* codec="pickle" */
    int64_t timeout_ns;   /* writer lock wait; -1 forever */
    int64_t read_timeout_ns; /* readers' wait for a batch to be published; -1 forever */
    PyObject *encode_hook; /* value -> (vtype, head, body) for other types */
    PyObject *decode_hook; /* (vtype, bytes) -> object or empty ndarray */
    PyObject *grow_hook;   /* need -> None: grows the segment */
    unsigned long lock_thread;
    int lock_depth;
    int batch_depth;
    uint64_t end;         /* heap_end as checked when the lock was taken */
    Overlay ov;
} TableObject;

#define HDR(t) ((THeader *)((t)->m->base + (t)->poff))
#define PAY(t) ((char *)(t)->m->base + (t)->poff)

/* Bytes of payload this process may touch. */
static inline uint64_t
t_lim(TableObject *t)
{
    return (uint64_t)t->m->length - t->poff;
}

static int
corrupt(const char *fmt, ...)
{
    va_list va;
    char buf[400];
    va_start(va, fmt);
    PyOS_vsnprintf(buf, sizeof buf, fmt, va);
    va_end(va);
    PyErr_Format(shm_CorruptError ? shm_CorruptError : PyExc_RuntimeError,
                 "store is corrupt: %s; run verify() for a full report, copy out "
                 "what still reads back and create the store again",
                 buf);
    return -1;
}

static int
t_live(TableObject *t)
{
    if (t->m == NULL || t->m->base == NULL) {
        PyErr_SetString(SHM_CLOSED_EXC,
                        "the store is closed in this process; open it again");
        return -1;
    }
    return 0;
}

/* Pick up growth made by other processes: the segment header's size word,
 * checked against the file, as Segment._sync_size does. */
static int
t_sync(TableObject *t)
{
    MappingObject *m = t->m;
    uint64_t size = __atomic_load_n((uint64_t *)(m->base + 32), __ATOMIC_ACQUIRE);
    uint64_t end = t->poff + size;
    if (end <= (uint64_t)m->length)
        return 0;
    struct stat st;
    if (size > (uint64_t)m->reserve || end > (uint64_t)m->reserve || m->fd < 0 ||
        fstat(m->fd, &st) < 0 || (uint64_t)st.st_size < end)
        return corrupt("the segment claims %llu bytes, more than its file holds",
                       (unsigned long long)size);
    m->length = (Py_ssize_t)end;
    return 0;
}

/* Enter any operation: live mapping, heap visible.  Returns the bound of
 * valid offsets (heap_end, never beyond the mapped length), 0 on error. */
static uint64_t
t_enter(TableObject *t)
{
    if (t_live(t) < 0)
        return 0;
    uint64_t end = LDA(&HDR(t)->heap_end);
    if (end > t_lim(t)) {
        if (t_sync(t) < 0)
            return 0;
        if (end > t_lim(t)) {
            corrupt("heap end %llu is beyond the segment's %llu bytes",
                    (unsigned long long)end, (unsigned long long)t_lim(t));
            return 0;
        }
    }
    if (end < T_HEADER + T_INDEX_HDR || (end & 15)) {
        corrupt("heap end %llu is impossible", (unsigned long long)end);
        return 0;
    }
    return end;
}

/* ---- keys ------------------------------------------------------------------ */

typedef struct {
    const char *p;
    Py_ssize_t n;
    uint8_t type;
    uint64_t h;
    char small[8];
    char *big;
} TKey;

static int
long_to_le(PyObject *o, unsigned char *buf, size_t n)
{
#if PY_VERSION_HEX >= 0x030D0000
    return _PyLong_AsByteArray((PyLongObject *)o, buf, n, 1, 1, 1);
#else
    return _PyLong_AsByteArray((PyLongObject *)o, buf, n, 1, 1);
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
    size_t bits = _PyLong_NumBits(o);
    if (bits == (size_t)-1 && PyErr_Occurred())
        return -1;
    return (Py_ssize_t)(bits / 8 + 1);
}

static void
key_release(TKey *k)
{
    if (k->big) {
        PyMem_Free(k->big);
        k->big = NULL;
    }
}

static int
key_encode(TableObject *t, PyObject *o, TKey *k)
{
    k->big = NULL;
    if (PyUnicode_Check(o)) {
        k->p = PyUnicode_AsUTF8AndSize(o, &k->n);
        if (k->p == NULL)
            return -1;
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
        PyErr_Format(t_Unsupported ? t_Unsupported : PyExc_TypeError,
                     "store keys must be int, str or bytes, not %.100s%s",
                     Py_TYPE(o)->tp_name,
                     PyBool_Check(o) ? " (bool keys would collide with 0 and 1; "
                                       "use int(key))" : "; convert the key first");
        return -1;
    }
    if (k->n > (Py_ssize_t)MAX_KEY) {
        key_release(k);
        PyErr_Format(t_TooLarge ? t_TooLarge : PyExc_ValueError,
                     "a key of %zd bytes is longer than the store's limit of %u bytes; "
                     "use a shorter key (a digest of it, say)",
                     k->n, MAX_KEY);
        return -1;
    }
    k->h = thash(k->p, (size_t)k->n, t->seed ^ (k->type * 0x9E3779B97F4A7C15ull));
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
    memset(v, 0, sizeof *v);
    PyTypeObject *tp = Py_TYPE(o);
    if (tp == &PyBytes_Type) {
        v->type = VT_BYTES;
        v->p = PyBytes_AS_STRING(o);
        v->n = PyBytes_GET_SIZE(o);
    } else if (tp == &PyUnicode_Type) {
        v->type = VT_STR;
        v->p = PyUnicode_AsUTF8AndSize(o, &v->n);
        if (v->p == NULL)
            return -1;
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
        if (t->encode_hook == NULL || t->encode_hook == Py_None) {
            PyErr_Format(t_Unsupported ? t_Unsupported : PyExc_TypeError,
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

/* ---- reading records ------------------------------------------------------- */

typedef struct {
    uint64_t size; /* block size */
    uint64_t hash;
    uint32_t klen;
    uint8_t ktype, vtype;
    uint64_t vlen;
} TRec;

/* Read and bounds-check a record header at off (each field read once).
 * Returns 0 when plausible, -1 when not (no exception set). */
static int
rec_read(const char *P, uint64_t end, uint64_t off, TRec *r)
{
    if (off < T_HEADER || (off & 15) || off > end - T_REC_HDR)
        return -1;
    const char *b = P + off;
    uint64_t head = LDR((const uint64_t *)b);
    r->size = head & ~(uint64_t)B_FLAGS;
    r->hash = LDR((const uint64_t *)(b + 16));
    r->klen = LDR((const uint32_t *)(b + 24));
    r->ktype = LDR((const uint8_t *)(b + 28));
    r->vtype = LDR((const uint8_t *)(b + 29));
    r->vlen = LDR((const uint64_t *)(b + 32));
    if (r->size > end - off || r->size < T_REC_HDR || r->klen > r->size - T_REC_HDR ||
        r->vlen > r->size - T_REC_HDR - r->klen)
        return -1;
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
            return _PyLong_FromByteArray((const unsigned char *)p, (size_t)n, 1, 1);
        break;
    case KT_STR:
        return PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "strict");
    case KT_BYTES:
        return PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    }
    PyErr_SetString(PyExc_ValueError, "bad key");
    return NULL;
}

static inline void
epoch_bump(THeader *h, uint64_t by)
{
    STA(&h->epoch, LDR(&h->epoch) + by);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* before any store that follows */
}

static inline int
epoch_same(THeader *h, uint64_t e)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return LDR(&h->epoch) == e;
}

/* The epoch as a futex word: its low 32 bits (the layout is little-endian,
 * table.h, so they are the u64's first four bytes).  A batch changes the
 * epoch by one, so those bits change whenever the epoch does. */
#define EPOCH_WORD(h) ((uint32_t *)&(h)->epoch)

/* After the epoch was made even: wake the readers asleep on it. */
static inline void
epoch_wake(THeader *h)
{
    shm_futex_wake(EPOCH_WORD(h), INT32_MAX);
}

/* The pid of the attachment named by token (0 if unknown), from the
 * segment's attach table, and whether /proc says it is stopped. */
static uint32_t
token_pid(TableObject *t, uint32_t token, int *stopped)
{
    MappingObject *m = t->m;
    uint32_t slot = SHM_TOKEN_SLOT(token), pid;
    *stopped = 0;
    if (token == 0 || slot >= m->max_slots)
        return 0;
    uint64_t off = (uint64_t)m->table_off + (uint64_t)slot * SHM_SLOT_SIZE;
    if (m->table_off < 0 || off + 8 > (uint64_t)m->length)
        return 0;
    pid = __atomic_load_n((uint32_t *)(m->base + off + 4), __ATOMIC_RELAXED);
    if (pid == 0)
        return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "r");
    if (f != NULL) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *rp = strrchr(buf, ')');
        if (rp != NULL && rp[1] == ' ' && (rp[2] == 'T' || rp[2] == 't'))
            *stopped = 1;
    }
    return pid;
}

typedef struct {
    TableObject *t;
    THeader *h;
    uint64_t even; /* out: the even epoch seen */
    int dead;      /* out: nobody alive is publishing */
} TEvenWait;

static int
even_ready(void *ctx, uint32_t *sleep_on)
{
    TEvenWait *w = ctx;
    uint64_t v = LDA(&w->h->epoch);
    if (!(v & 1)) {
        w->even = v;
        return 1;
    }
    if (w->dead)
        return 1;
    *sleep_on = (uint32_t)v;
    return 0;
}

/* Between slices asleep: is the batch's writer (the lock's holder) alive? */
static int
even_check(void *ctx)
{
    TEvenWait *w = ctx;
    uint64_t v = LDA(&w->h->epoch);
    uint32_t owner = LDA(&w->h->lock) & SHM_TOKEN_MASK;
    if (LDA(&w->h->epoch) == v && (v & 1) &&
        (owner == 0 || !shm_token_alive(w->t->m, owner)))
        w->dead = 1;
    return 0;
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
    THeader *h = HDR(t);
    if (t->lock_depth > 0 && t->lock_thread == PyThread_get_thread_ident())
        return 1; /* we hold the lock: nobody else can be publishing */
    TEvenWait ew = {t, h, 0, 0};
    shm_wait w = {.m = t->m, .word = EPOCH_WORD(h), .ctx = &ew, .ready = even_ready,
                  .check = even_check, .spin_ns = SHM_WAIT_SPIN_NS, .what = "store"};
    int64_t deadline = t->read_timeout_ns < 0 ? SHM_FOREVER
                                              : shm_now_ns() + t->read_timeout_ns;
    shm_pin(t->mapping); /* we let other threads run: keep the memory mapped */
    int r = shm_wait_until(&w, deadline);
    shm_unpin(t->mapping);
    if (r < 0)
        return -1;
    if (r == 0) {
        uint32_t owner = LDA(&h->lock) & SHM_TOKEN_MASK;
        int stopped = 0;
        uint32_t pid = token_pid(t, owner, &stopped);
        char who[160];
        if (pid)
            snprintf(who, sizeof who, "its writer, pid %u,%s", pid,
                     stopped ? " is stopped (/proc/<pid>/stat state T: SIGSTOP or a "
                               "debugger; SIGCONT resumes it) and" : "");
        else
            snprintf(who, sizeof who, "its writer");
        char secs[32];
        snprintf(secs, sizeof secs, "%.3g", t->read_timeout_ns / 1e9);
        PyErr_Format(shm_TimeoutError ? shm_TimeoutError : PyExc_TimeoutError,
                     "a batch was being published for longer than the store's "
                     "read_timeout (%s s): %s has held the store's lock since it "
                     "began (it may be stopped or very slow); raise read_timeout=, or "
                     "resume or kill that process",
                     secs, who);
        return -1;
    }
    if (t_live(t) < 0)
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
            return _PyLong_FromByteArray((const unsigned char *)p, (size_t)n, 1, 1);
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
        if (!locked && !epoch_same(HDR(t), epoch)) {
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

/* ---- the lock-free lookup -------------------------------------------------- */

enum { P_ABSENT = 0, P_FOUND = 1, P_RACE = 2 };

static inline int
index_ok(const char *P, uint64_t end, uint64_t ix, uint64_t *nslots)
{
    if (ix < T_HEADER || (ix & 15) || ix > end - T_INDEX_HDR)
        return 0;
    uint64_t n = LDR(W64(P, ix + 16));
    if (n < 8 || (n & (n - 1)) || n > (end - ix - T_INDEX_HDR) / 8)
        return 0;
    *nslots = n;
    return 1;
}

/* Probe for k without the lock.  Sets *off and *rec on P_FOUND. */
static int
probe_ro(const char *P, uint64_t end, const TKey *k, uint64_t *off, TRec *rec)
{
    uint64_t ix = LDA(W64(P, offsetof(THeader, index))), nslots;
    if (!index_ok(P, end, ix, &nslots))
        return P_RACE;
    const uint64_t *slots = W64(P, ix + T_INDEX_HDR);
    uint64_t mask = nslots - 1, i = k->h & mask, tag = W_TAG(k->h);
    for (uint64_t j = 0; j < nslots; j++, i = (i + 1) & mask) {
        uint64_t w = LDA(&slots[i]);
        if (w == W_EMPTY)
            return P_ABSENT;
        if (w == W_TOMB || (w >> 40) != tag)
            continue;
        uint64_t o = (w & W_OFF_MASK) << 4;
        if (rec_read(P, end, o, rec) < 0)
            return P_RACE;
        if (rec->hash != k->h || rec->klen != (uint64_t)k->n || rec->ktype != k->type ||
            memcmp(P + o + T_REC_HDR, k->p, (size_t)k->n) != 0)
            continue;
        *off = o;
        return P_FOUND;
    }
    return P_ABSENT;
}

/* ---- the writer lock ------------------------------------------------------- */

static int t_recover(TableObject *t);

/* Call with the lock held and an exception pending: if it is damage, have
 * the next writer run t_recover(), which rebuilds everything derived (free
 * lists, counters) from the index and reports what it cannot repair. */
static void
t_mark_damage(TableObject *t)
{
    if (shm_CorruptError && PyErr_ExceptionMatches(shm_CorruptError) && t->m->base)
        HDR(t)->state |= ST_DIRTY;
}

/* The repair callback of the writers' lock (shm_lock_acquire_repair): the
 * previous holder died.  The table keeps no undo journal (see the comment
 * at the top): t_recover() rebuilds what is derived from the index. */
static int
t_repair(void *ctx, int owner_died)
{
    (void)owner_died;
    return t_recover((TableObject *)ctx);
}

static int
t_lock(TableObject *t)
{
    if (t->readonly) {
        PyErr_SetString(SHM_READONLY_EXC,
                        "the store was opened readonly=True; open it without readonly "
                        "to change it");
        return -1;
    }
    unsigned long me = PyThread_get_thread_ident();
    if (t->lock_depth > 0 && t->lock_thread == me) {
        t->lock_depth++;
        return 0;
    }
    int64_t deadline = t->timeout_ns < 0 ? SHM_FOREVER : shm_now_ns() + t->timeout_ns;
    shm_pin(t->mapping);
    int r = shm_lock_acquire_repair(t->m, &HDR(t)->lock, deadline, NULL, t_repair, t);
    if (r <= 0) {
        shm_unpin(t->mapping); /* after a failed repair the lock is released */
        if (r == 0)
            PyErr_SetString(shm_TimeoutError ? shm_TimeoutError : PyExc_TimeoutError,
                            "another writer held the store's lock for longer than the "
                            "store's timeout (a long batch?)");
        return -1;
    }
    t->lock_depth = 1;
    t->lock_thread = me;
    /* Check the heap bound again now that no writer can move it; writers
     * use t->end from here on.  A writer's death was repaired above; damage
     * marked by a live writer, or a batch it left half applied, is
     * repaired here the same way. */
    THeader *h = HDR(t);
    if ((t->end = t_enter(t)) == 0 ||
        (((LDR(&h->state) & (ST_COMMIT | ST_DIRTY)) || (LDR(&h->epoch) & 1)) &&
         t_recover(t) < 0)) {
        PyObject *et, *ev, *tb;
        t_mark_damage(t);
        PyErr_Fetch(&et, &ev, &tb);
        t->lock_depth = 0;
        shm_lock_release(t->m, &HDR(t)->lock);
        shm_unpin(t->mapping);
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return 0;
}

static void
t_unlock(TableObject *t)
{
    if (PyErr_Occurred())
        t_mark_damage(t);
    if (--t->lock_depth > 0)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (t->m->base != NULL && shm_lock_release(t->m, &HDR(t)->lock) < 0)
        PyErr_Clear();
    shm_unpin(t->mapping);
    PyErr_Restore(et, ev, tb);
}

/* ---- the allocator (lock held) --------------------------------------------- */

static inline int
bin_of(uint64_t size)
{
    if (size < NSMALL * 16)
        return (int)(size >> 4);
    int b = NSMALL + (63 - __builtin_clzll(size)) - 10;
    return b < NBINS ? b : NBINS - 1;
}

static inline void
bin_push(char *P, THeader *h, uint64_t off, uint64_t size)
{
    int b = bin_of(size);
    STR(W64(P, off + 8), h->bins[b]);
    STR(W64(P, off), size);
    h->bins[b] = off;
}

/* Cut a used block of `size` from the free block at off (of bsize bytes):
 * the tail's header is written before the head's new size, so the chain is
 * whole after each store.  Returns the size actually used. */
static uint64_t
carve(char *P, THeader *h, uint64_t off, uint64_t bsize, uint64_t size, unsigned flags,
      int tail_to_bin)
{
    if (bsize - size >= T_MIN_BLOCK) {
        uint64_t tail = off + size;
        STR(W64(P, tail + 8), 0);
        STR(W64(P, tail), bsize - size);
        shm_crash_point("table.alloc.tail");
        STR(W64(P, off), size | flags);
        shm_crash_point("table.alloc.split");
        if (tail_to_bin) {
            bin_push(P, h, tail, bsize - size);
            shm_crash_point("table.alloc.binned");
        }
        return size;
    }
    STR(W64(P, off), bsize | flags);
    shm_crash_point("table.alloc.taken");
    return bsize;
}

static int
free_ok(const char *P, uint64_t end, uint64_t off, uint64_t *size)
{
    if (off < T_HEADER || (off & 15) || off > end - T_MIN_BLOCK)
        return 0;
    uint64_t head = LDR(W64(P, off));
    *size = head & ~(uint64_t)B_FLAGS;
    return !(head & B_FLAGS) && *size >= T_MIN_BLOCK && *size <= end - off;
}

/* Returns a block offset, 0 when there is no free block large enough, or
 * (uint64_t)-1 with CorruptError. */
static uint64_t
t_alloc(TableObject *t, uint64_t size, unsigned flags)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t bsize;
    for (int b = bin_of(size); b < NBINS; b++) {
        uint64_t *prev = &h->bins[b];
        for (int scan = 0; *prev && scan < 8; scan++) {
            uint64_t off = *prev;
            if (!free_ok(P, t->end, off, &bsize) || bin_of(bsize) != b) {
                h->state |= ST_DIRTY;
                corrupt("free list %d holds a bad block at %llu", b, (unsigned long long)off);
                return (uint64_t)-1;
            }
            if (bsize == size || bsize >= size + T_MIN_BLOCK) {
                *prev = LDR(W64(P, off + 8));
                shm_crash_point("table.alloc.unlinked");
                carve(P, h, off, bsize, size, B_USED | flags, 1);
                return off;
            }
            prev = (uint64_t *)(P + off + 8);
        }
    }
    uint64_t top = h->top;
    if (top) {
        if (!free_ok(P, t->end, top, &bsize) || top + bsize != t->end) {
            h->state |= ST_DIRTY;
            corrupt("the top block at %llu is bad", (unsigned long long)top);
            return (uint64_t)-1;
        }
        if (bsize == size || bsize >= size + T_MIN_BLOCK) {
            uint64_t got = carve(P, h, top, bsize, size, B_USED | flags, 0);
            h->top = got < bsize ? top + got : 0;
            shm_crash_point("table.alloc.top");
            return top;
        }
    }
    return 0;
}

/* Mark a published block free.  Its bytes stay as they are until the next
 * recycle, because lagging readers may still be copying them. */
static void
t_free(TableObject *t, uint64_t off)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t head = LDR(W64(P, off)), size = head & ~(uint64_t)B_FLAGS;
    STR(W64(P, off), size);
    shm_crash_point("table.free.marked");
    h->pending += size;
    if (!(head & (B_INDEX | B_JOURNAL)))
        STR(&h->used, LDR(&h->used) - size);
    shm_crash_point("table.free.counted");
}

/* ---- views: a per-attachment count that holds recycling off ----------------
 * A view (Store.view) hands out the bytes of a record in place, so the
 * record's space must not be reused while it is held.  Each attachment
 * counts its live views in views[its slot], tagged with its generation.
 * The reader adds one (a sequentially consistent read-modify-write, then a
 * full fence) before it loads the epoch and probes; a recycle adds 2 to the
 * epoch, makes a full fence, then reads the counts.  So either the recycle
 * sees the count (and is deferred), or the reader sees the new epoch (and
 * retries, finding the record that is current after the recycle).  Counts
 * of a dead attachment (its token no longer alive) are ignored and cleared,
 * so a process killed while it held a view holds nothing afterwards. */
static uint32_t
view_slots(TableObject *t)
{
    uint32_t n = t->m->max_slots;
    return n < T_VIEW_SLOTS ? n : T_VIEW_SLOTS;
}

/* 1 if some live attachment holds a view (lock held). */
static int
t_views_busy(TableObject *t)
{
    THeader *h = HDR(t);
    uint32_t n = view_slots(t);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t w = __atomic_load_n(&h->views[i], __ATOMIC_SEQ_CST);
        if ((w & T_VIEW_MAX) == 0)
            continue;
        uint32_t token = ((w >> T_VIEW_BITS) << 10) | i;
        if (shm_token_alive(t->m, token))
            return 1;
        /* dead: its views went with it (fails harmlessly if it changed) */
        __atomic_compare_exchange_n(&h->views[i], &w, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED);
    }
    return 0;
}

/* A recycle found live views after the free lists may have gone stale (in
 * recovery or a vacuum): park all free space as pending, none allocatable,
 * until a recycle that finds no views. */
static int
t_park(TableObject *t)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t->end, off, size, free_bytes = 0;
    for (off = T_HEADER; off < end; off += size) {
        uint64_t head = LDR(W64(P, off));
        size = head & ~(uint64_t)B_FLAGS;
        if (size < T_MIN_BLOCK || size > end - off) {
            h->state |= ST_DIRTY;
            return corrupt("block at %llu has size %llu", (unsigned long long)off,
                           (unsigned long long)size);
        }
        if (!(head & B_USED))
            free_bytes += size;
    }
    memset(h->bins, 0, sizeof h->bins);
    h->top = 0;
    h->pending = free_bytes;
    return 1;
}

/* Make pending space reusable: bump the epoch, then walk the chain,
 * merging runs of free blocks and rebuilding the free lists.  Returns 0, or
 * 1 when deferred because a live attachment holds views (with `trusted`,
 * the free lists are left as they are; otherwise they are parked), or -1. */
static int
t_recycle_ex(TableObject *t, int trusted)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t->end, off = T_HEADER, run = 0, runsize = 0;
    if (t_views_busy(t))
        return trusted ? 1 : t_park(t);
    epoch_bump(h, 2);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the epoch, then the view counts */
    if (t_views_busy(t))
        return t_park(t);
    shm_crash_point("table.recycle.epoch");
    memset(h->bins, 0, sizeof h->bins);
    h->top = 0;
    shm_crash_point("table.recycle.emptied");
    while (off < end) {
        uint64_t head = LDR(W64(P, off)), size = head & ~(uint64_t)B_FLAGS;
        if (size < T_MIN_BLOCK || size > end - off || (head & 8)) {
            h->state |= ST_DIRTY;
            return corrupt("block at %llu has size %llu", (unsigned long long)off,
                           (unsigned long long)size);
        }
        if (head & B_USED) {
            if (run) {
                bin_push(P, h, run, runsize);
                shm_crash_point("table.recycle.binned");
            }
            run = 0;
        } else if (run) {
            runsize += size;
            STR(W64(P, run), runsize);
            shm_crash_point("table.recycle.merged");
        } else {
            run = off;
            runsize = size;
        }
        off += size;
    }
    if (run) {
        STR(W64(P, run + 8), 0);
        h->top = run;
        shm_crash_point("table.recycle.top");
    }
    h->pending = 0;
    h->recycles++;
    shm_crash_point("table.recycle.done");
    return 0;
}

/* A recycle where the free lists are trusted (deferred: nothing changes). */
static int
t_recycle(TableObject *t)
{
    return t_recycle_ex(t, 1);
}

/* Extend the heap to the segment's (grown) size.  Crash-safe: the new
 * block's header is written beyond heap_end first, then heap_end moves,
 * then the old top absorbs it. */
static int
t_extend(TableObject *t)
{
    if (t_sync(t) < 0)
        return -1;
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t size = __atomic_load_n((uint64_t *)(t->m->base + 32), __ATOMIC_ACQUIRE);
    uint64_t new_end = size & ~(uint64_t)15, old_end = t->end;
    if (new_end > t_lim(t))
        new_end = t_lim(t) & ~(uint64_t)15;
    if (new_end < old_end + T_MIN_BLOCK)
        return 0;
    STR(W64(P, old_end + 8), 0);
    STR(W64(P, old_end), new_end - old_end);
    shm_crash_point("table.grow.block");
    STA(&h->heap_end, new_end);
    t->end = new_end;
    shm_crash_point("table.grow.end");
    uint64_t top = h->top, tsize;
    if (top && free_ok(P, old_end, top, &tsize) && top + tsize == old_end) {
        STR(W64(P, top), tsize + (new_end - old_end));
    } else {
        if (top && free_ok(P, old_end, top, &tsize))
            bin_push(P, h, top, tsize);
        h->top = old_end;
    }
    h->growths++;
    shm_crash_point("table.grow.top");
    return 0;
}

/* Allocate, recycling pending space or growing the segment as needed. */
static uint64_t
t_alloc_grow(TableObject *t, uint64_t size, unsigned flags)
{
    int recycled = 0;
    for (int tries = 0; tries < 64; tries++) {
        uint64_t off = t_alloc(t, size, flags);
        if (off != 0)
            return off;
        THeader *h = HDR(t);
        if (!recycled && h->pending >= size) {
            recycled = 1;
            if (t_recycle(t) < 0)
                return (uint64_t)-1;
            continue;
        }
        if (t->grow_hook == NULL || t->grow_hook == Py_None) {
            PyErr_SetString(PyExc_MemoryError, "the store is full");
            return (uint64_t)-1;
        }
        PyObject *r = PyObject_CallFunction(t->grow_hook, "K",
                                            (unsigned long long)(size + T_MIN_BLOCK));
        if (r == NULL)
            return (uint64_t)-1;
        Py_DECREF(r);
        if (t_live(t) < 0 || t_extend(t) < 0)
            return (uint64_t)-1;
    }
    PyErr_SetString(PyExc_MemoryError, "the store could not grow enough");
    return (uint64_t)-1;
}

/* ---- the index (lock held) ------------------------------------------------- */

typedef struct {
    uint64_t ix, nslots, mask;
    uint64_t *slots;
} TIndex;

static int
t_index(TableObject *t, TIndex *x)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    x->ix = LDR(&h->index);
    if (!index_ok(P, t->end, x->ix, &x->nslots) ||
        !(LDR(W64(P, x->ix)) & B_INDEX) ||
        (LDR(W64(P, x->ix)) & ~(uint64_t)B_FLAGS) < T_INDEX_HDR + 8 * x->nslots)
        return corrupt("the index at %llu is damaged", (unsigned long long)x->ix);
    x->mask = x->nslots - 1;
    x->slots = W64(P, x->ix + T_INDEX_HDR);
    return 0;
}

static inline OvEntry *
ov_find(Overlay *o, uint64_t slot)
{
    if (o->n == 0)
        return NULL;
    size_t mask = o->cap - 1, i = (size_t)((slot * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    for (;;) {
        OvEntry *e = &o->e[i];
        if (e->slot == 0)
            return NULL;
        if (e->slot == slot + 1)
            return e;
        i = (i + 1) & mask;
    }
}

static int
ov_set(Overlay *o, uint64_t slot, uint64_t word)
{
    OvEntry *e = ov_find(o, slot);
    if (e) {
        e->word = word;
        return 0;
    }
    if ((o->n + 1) * 2 > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        OvEntry *ne = PyMem_Calloc(cap, sizeof *ne), *old = o->e;
        if (ne == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        size_t oc = o->cap;
        o->e = ne;
        o->cap = cap;
        o->n = 0;
        for (size_t i = 0; i < oc; i++)
            if (old[i].slot)
                ov_set(o, old[i].slot - 1, old[i].word);
        PyMem_Free(old);
    }
    size_t mask = o->cap - 1, i = (size_t)((slot * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (o->e[i].slot)
        i = (i + 1) & mask;
    o->e[i].slot = slot + 1;
    o->e[i].word = word;
    o->n++;
    return 0;
}

static void
ov_clear(Overlay *o)
{
    PyMem_Free(o->e);
    o->e = NULL;
    o->cap = o->n = 0;
    o->newslots = 0;
}

static inline int
t_in_batch(TableObject *t)
{
    return t->batch_depth > 0 && t->lock_thread == PyThread_get_thread_ident();
}

/* The word at slot i as this writer sees it (its batch's words first). */
static inline uint64_t
wword(TableObject *t, TIndex *x, uint64_t i, int *from_ov)
{
    OvEntry *e = t->ov.n ? ov_find(&t->ov, i) : NULL;
    *from_ov = e != NULL;
    return e ? e->word : LDR(&x->slots[i]);
}

/* Probe under the lock.  P_FOUND: *slot holds the key, *word its word.
 * P_ABSENT: *slot is where to insert it.  -1: CorruptError. */
static int
probe_w(TableObject *t, TIndex *x, const TKey *k, uint64_t *slot, uint64_t *word,
        int *from_ov)
{
    char *P = PAY(t);
    uint64_t end = t->end, i = k->h & x->mask, tag = W_TAG(k->h);
    int64_t first_free = -1;
    int fo;
    for (uint64_t j = 0; j < x->nslots; j++, i = (i + 1) & x->mask) {
        uint64_t w = wword(t, x, i, &fo);
        if (w == W_EMPTY) {
            *slot = first_free >= 0 ? (uint64_t)first_free : i;
            *word = first_free >= 0 ? W_TOMB : W_EMPTY;
            *from_ov = 0;
            if (first_free >= 0)
                wword(t, x, *slot, from_ov);
            return P_ABSENT;
        }
        if (w == W_TOMB) {
            if (first_free < 0)
                first_free = (int64_t)i;
            continue;
        }
        if ((w >> 40) != tag)
            continue;
        TRec r;
        uint64_t o = (w & W_OFF_MASK) << 4;
        if (rec_read(P, end, o, &r) < 0)
            return corrupt("index word %llu points at a bad record (offset %llu)",
                           (unsigned long long)i, (unsigned long long)o);
        if (r.hash == k->h && r.klen == (uint64_t)k->n && r.ktype == k->type &&
            memcmp(P + o + T_REC_HDR, k->p, (size_t)k->n) == 0) {
            *slot = i;
            *word = w;
            *from_ov = fo;
            return P_FOUND;
        }
    }
    if (first_free >= 0) {
        *slot = (uint64_t)first_free;
        *word = W_TOMB;
        wword(t, x, *slot, from_ov);
        return P_ABSENT;
    }
    return corrupt("the index has no free word");
}

static inline uint64_t
rec_word(uint64_t off, uint64_t hash)
{
    return (off >> 4) | (W_TAG(hash) << 40);
}

static inline uint64_t
word_off(uint64_t w)
{
    return (w & W_OFF_MASK) << 4;
}

/* Place word w (a record with the given hash) in the first empty word of a
 * fresh index, skipping words the overlay `ov` already claims. */
static uint64_t
place(uint64_t *slots, uint64_t mask, uint64_t hash, Overlay *ov)
{
    uint64_t i = hash & mask;
    for (uint64_t j = 0; j <= mask; j++, i = (i + 1) & mask)
        if (slots[i] == W_EMPTY && !(ov && ov_find(ov, i)))
            return i;
    return UINT64_MAX; /* full: more records than the counts said */
}

/* Build a new index of nslots words from the published one and switch to
 * it with one release store; the old one becomes pending.  A batch's
 * unpublished words are carried over to their places in the new index.
 * With `low`, the new index goes at the lowest free offset that fits
 * (vacuum); otherwise anywhere. */
static int
t_rebuild(TableObject *t, uint64_t nslots, uint64_t at)
{
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    uint64_t bytes = (T_INDEX_HDR + 8 * nslots + 15) & ~(uint64_t)15;
    uint64_t nix = at ? at : t_alloc_grow(t, bytes, B_INDEX);
    if (nix == (uint64_t)-1)
        return -1;
    if (t_index(t, &x) < 0) /* the grow hook ran Python: read it again */
        return -1;
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t->end, mask = nslots - 1;
    uint64_t *ns = W64(P, nix + T_INDEX_HDR);
    STR(W64(P, nix + 16), nslots);
    STR(W64(P, nix + 24), 0);
    memset(ns, 0, 8 * nslots);
    uint64_t count = 0;
    for (uint64_t i = 0; i < x.nslots; i++) {
        uint64_t w = LDR(&x.slots[i]);
        if (w == W_EMPTY || w == W_TOMB)
            continue;
        TRec r;
        if (rec_read(P, end, word_off(w), &r) < 0)
            return corrupt("index word %llu points at a bad record", (unsigned long long)i);
        uint64_t at_i = place(ns, mask, r.hash, NULL);
        if (++count > nslots * 3 / 4 || at_i == UINT64_MAX)
            return corrupt("more records than the index can hold");
        ns[at_i] = w;
    }
    if (t->ov.n) {
        Overlay old = t->ov, nov = {0};
        for (size_t j = 0; j < old.cap; j++) {
            if (!old.e[j].slot)
                continue;
            uint64_t s = old.e[j].slot - 1, w = old.e[j].word;
            uint64_t pub = LDR(&x.slots[s]), ns_i;
            TRec r;
            if (pub != W_EMPTY && pub != W_TOMB) {
                /* it replaces or deletes a published record: same place */
                if (rec_read(P, end, word_off(pub), &r) < 0)
                    return corrupt("bad record during index rebuild");
                uint64_t probes = 0;
                ns_i = r.hash & mask;
                while (ns[ns_i] != pub && ++probes <= nslots)
                    ns_i = (ns_i + 1) & mask;
                if (ns[ns_i] != pub)
                    return corrupt("a batch word lost its record during index rebuild");
            } else if (w == W_TOMB || w == W_EMPTY) {
                continue; /* a batch insert, deleted again in the batch */
            } else {
                if (rec_read(P, end, word_off(w), &r) < 0)
                    return corrupt("bad batch record during index rebuild");
                ns_i = place(ns, mask, r.hash, &nov);
                if (ns_i == UINT64_MAX) {
                    ov_clear(&nov);
                    return corrupt("more records than the index can hold");
                }
                nov.newslots++;
            }
            if (ov_set(&nov, ns_i, w) < 0) {
                ov_clear(&nov);
                return -1;
            }
        }
        ov_clear(&t->ov);
        t->ov = nov;
    }
    shm_crash_point("table.rebuild.built");
    STR(&h->index_gen, LDR(&h->index_gen) + 1);
    STA(&h->index, nix);
    shm_crash_point("table.rebuild.published");
    t_free(t, x.ix);
    STR(&h->tombstones, 0);
    h->index_growths++;
    shm_crash_point("table.rebuild.done");
    return 0;
}

/* Grow (or clean) the index before one more insertion if it would pass 3/4. */
/* The key counters are derived data: check them against the index before
 * anything is sized by them (a wrong count must not hang or over-allocate). */
static int
counts_ok(THeader *h, uint64_t nslots)
{
    uint64_t c = LDR(&h->count), tb = LDR(&h->tombstones);
    if (c > nslots || tb > nslots - c)
        return corrupt("the counters say %llu keys and %llu tombstones, more than the "
                       "index's %llu words",
                       (unsigned long long)c, (unsigned long long)tb,
                       (unsigned long long)nslots);
    return 0;
}

static int
t_reserve(TableObject *t)
{
    TIndex x;
    THeader *h = HDR(t);
    if (t_index(t, &x) < 0 || counts_ok(h, x.nslots) < 0)
        return -1;
    uint64_t live = LDR(&h->count) + t->ov.newslots;
    if ((LDR(&h->count) + LDR(&h->tombstones) + t->ov.newslots + 1) * 4 <= x.nslots * 3)
        return 0;
    uint64_t n = T_MIN_SLOTS;
    while (n < (live + 1) * 2)
        n *= 2;
    return t_rebuild(t, n, 0);
}

static int
t_maybe_recycle(TableObject *t)
{
    THeader *h = HDR(t);
    uint64_t heap = t->end - T_HEADER;
    if (h->pending > RECYCLE_MIN && h->pending > heap / 8)
        return t_recycle(t);
    return 0;
}

/* ---- recovery and verification --------------------------------------------- */

static int
bit_get(const uint8_t *bm, uint64_t off)
{
    return (bm[off >> 7] >> ((off >> 4) & 7)) & 1;
}

static void
bit_set(uint8_t *bm, uint64_t off)
{
    bm[off >> 7] |= (uint8_t)(1u << ((off >> 4) & 7));
}

static void
bit_clear(uint8_t *bm, uint64_t off)
{
    bm[off >> 7] &= (uint8_t)~(1u << ((off >> 4) & 7));
}

/* Redo a committing batch, then rebuild everything derived: which blocks
 * are used, the counters and the free lists.  The index words are the
 * truth. */
/* ---- the walks recovery and verification share --------------------------------
 * t_walk_index() reads every index word once: it counts tombstones, marks
 * the block each record word names (one bit per 16-byte offset; the block
 * must lie in the heap and be named once) and hands each record word to
 * visit.  t_walk_chain() then walks the block chain from the heap start,
 * checking each block's size, and tells each block apart: the index, a
 * record the index named, a used block nothing names, a free block; every
 * mark must be met at a block start.  Both return 0, or -1 with an
 * exception set; the marks are freed by the chain walk or on error. */

typedef struct {
    uint8_t *bm;
    uint64_t count, tombs; /* record words, tombstones */
} TMarks;

enum { TB_INDEX, TB_RECORD, TB_STRAY, TB_FREE };
typedef int (*t_word_fn)(void *ctx, uint64_t slot, uint64_t word, uint64_t off);
typedef int (*t_block_fn)(void *ctx, uint64_t off, uint64_t head, uint64_t size, int kind);

static int
t_walk_index(uint64_t end, const TIndex *x, TMarks *mk, t_word_fn visit, void *ctx)
{
    mk->count = mk->tombs = 0;
    mk->bm = PyMem_Calloc((size_t)(end >> 7) + 1, 1);
    if (mk->bm == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint64_t i = 0; i < x->nslots; i++) {
        uint64_t w = LDR(&x->slots[i]);
        if (w == W_EMPTY)
            continue;
        if (w == W_TOMB) {
            mk->tombs++;
            continue;
        }
        uint64_t o = word_off(w);
        if (o < T_HEADER || o > end - T_REC_HDR) {
            corrupt("index word %llu points at %llu, outside the heap",
                    (unsigned long long)i, (unsigned long long)o);
            goto fail;
        }
        if (bit_get(mk->bm, o)) {
            corrupt("two index words point at the record at %llu", (unsigned long long)o);
            goto fail;
        }
        bit_set(mk->bm, o);
        mk->count++;
        if (visit != NULL && visit(ctx, i, w, o) < 0)
            goto fail;
    }
    return 0;
fail:
    PyMem_Free(mk->bm);
    mk->bm = NULL;
    return -1;
}

static int
t_walk_chain(const char *P, uint64_t end, uint64_t ix, TMarks *mk, t_block_fn visit,
             void *ctx)
{
    uint64_t off = T_HEADER, marked = mk->count;
    int r = -1;
    while (off < end) {
        uint64_t head = LDR(W64(P, off)), size = head & ~(uint64_t)B_FLAGS;
        if (size < T_MIN_BLOCK || size > end - off || (head & 8)) {
            corrupt("block at %llu has size %llu", (unsigned long long)off,
                    (unsigned long long)size);
            goto out;
        }
        int kind = off == ix                ? TB_INDEX
                   : bit_get(mk->bm, off)   ? TB_RECORD
                   : (head & B_FLAGS) != 0  ? TB_STRAY
                                            : TB_FREE;
        if (kind == TB_RECORD) {
            bit_clear(mk->bm, off);
            marked--;
        }
        if (visit(ctx, off, head, size, kind) < 0)
            goto out;
        off += size;
    }
    if (off != end)
        corrupt("the block chain overruns the heap end");
    else if (marked)
        corrupt("%llu index words point inside blocks", (unsigned long long)marked);
    else
        r = 0;
out:
    PyMem_Free(mk->bm);
    mk->bm = NULL;
    return r;
}

typedef struct {
    char *P;
    uint64_t end, used;
} TRecoverWalk;

/* Recovery's view of each block: check the index and the records it names,
 * free what nothing names (a dead writer's leftover), sum the records. */
static int
recover_block(void *ctx, uint64_t off, uint64_t head, uint64_t size, int kind)
{
    TRecoverWalk *rw = ctx;
    TRec r;
    switch (kind) {
    case TB_INDEX:
        if (!(head & B_INDEX))
            return corrupt("the index block is not marked");
        break;
    case TB_RECORD:
        if (!(head & B_USED) || (head & (B_INDEX | B_JOURNAL)) ||
            rec_read(rw->P, rw->end, off, &r) < 0)
            return corrupt("record at %llu is damaged", (unsigned long long)off);
        rw->used += size;
        break;
    case TB_STRAY:
        STR(W64(rw->P, off), size); /* used by nothing: a dead writer's leftover */
        break;
    }
    return 0;
}

static int
t_recover(TableObject *t)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t_enter(t);
    if (end == 0)
        return -1;
    t->end = end;
    h->state |= ST_DIRTY;
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    if (h->state & ST_COMMIT) {
        /* Check the whole journal before storing any of it: every entry a
         * slot of this index and a tombstone or a record with its tag. */
        uint64_t j = h->journal, n = h->journal_n, jhead, jsize;
        if (j < T_HEADER || (j & 15) || j > end - T_JOURNAL_HDR)
            return corrupt("the batch journal offset %llu is bad", (unsigned long long)j);
        jhead = LDR(W64(P, j));
        jsize = jhead & ~(uint64_t)B_FLAGS;
        if ((jhead & B_FLAGS) != (B_USED | B_JOURNAL) || jsize < T_JOURNAL_HDR ||
            jsize > end - j || n > (jsize - T_JOURNAL_HDR) / 16 ||
            LDR(W64(P, j + 16)) != n || LDR(W64(P, j + 24)) != x.ix)
            return corrupt("the batch journal is inconsistent");
        const uint64_t *e = W64(P, j + T_JOURNAL_HDR);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t s = LDR(&e[2 * i]), w = LDR(&e[2 * i + 1]);
            TRec r;
            if (s >= x.nslots || w == W_EMPTY ||
                (w != W_TOMB && (rec_read(P, end, word_off(w), &r) < 0 ||
                                 W_TAG(r.hash) != w >> 40)))
                return corrupt("batch journal entry %llu is bad", (unsigned long long)i);
        }
        /* Redo it as the batch did: readers wait while the epoch is odd. */
        if (!(LDR(&h->epoch) & 1))
            epoch_bump(h, 1);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t s = LDR(&e[2 * i]);
            if (s < x.nslots)
                STR(&x.slots[s], LDR(&e[2 * i + 1]));
        }
        h->state &= ~ST_COMMIT;
    }
    if (LDR(&h->epoch) & 1) {
        epoch_bump(h, 1); /* even: publishes the redone words */
        epoch_wake(h);
    }

    TMarks mk;
    TRecoverWalk rw = {P, end, 0};
    if (t_walk_index(end, &x, &mk, NULL, NULL) < 0 ||
        t_walk_chain(P, end, x.ix, &mk, recover_block, &rw) < 0)
        return -1;
    STR(&h->count, mk.count);
    STR(&h->tombstones, mk.tombs);
    STR(&h->used, rw.used);
    if (t_recycle_ex(t, 0) < 0)
        return -1;
    h->recoveries++;
    h->state &= ~ST_DIRTY;
    return 0;
}

/* ---- views: holding a record in place ------------------------------------- */

/* Add one to this attachment's view count (see t_views_busy).  0, or -1. */
static int
view_hold(TableObject *t)
{
    uint32_t token = t->m->token, slot = SHM_TOKEN_SLOT(token), gen = SHM_TOKEN_GEN(token);
    if (t->readonly) {
        PyErr_SetString(SHM_READONLY_EXC,
                        "view() counts itself in the store's header, which a "
                        "readonly=True handle cannot write; use get_into() or get(), "
                        "or open the store writable");
        return -1;
    }
    if (token == 0 || slot >= view_slots(t)) {
        PyErr_Format(PyExc_ValueError,
                     "view() is available to the first %u attachments of a store and "
                     "this process holds attach slot %u; use get_into() or get()",
                     (unsigned)T_VIEW_SLOTS, (unsigned)slot);
        return -1;
    }
    uint32_t *w = &HDR(t)->views[slot], old = __atomic_load_n(w, __ATOMIC_RELAXED), nw;
    do {
        if ((old >> T_VIEW_BITS) != gen)
            nw = (gen << T_VIEW_BITS) | 1; /* a dead predecessor's count */
        else if ((old & T_VIEW_MAX) == T_VIEW_MAX) {
            PyErr_Format(PyExc_ValueError,
                         "this process already holds %u views of the store, the most "
                         "it can; release some first", (unsigned)T_VIEW_MAX);
            return -1;
        } else
            nw = old + 1;
    } while (!__atomic_compare_exchange_n(w, &old, nw, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the count, then the epoch */
    return 0;
}

static void
view_unhold(MappingObject *m, uint64_t poff, uint32_t token)
{
    if (m->base == NULL || m->token != token)
        return; /* closed, or a forked child: not ours to count down */
    uint32_t slot = SHM_TOKEN_SLOT(token), gen = SHM_TOKEN_GEN(token);
    if (slot >= T_VIEW_SLOTS || poff + T_HEADER > (uint64_t)m->length)
        return;
    uint32_t *w = &((THeader *)(m->base + poff))->views[slot];
    uint32_t old = __atomic_load_n(w, __ATOMIC_RELAXED);
    do {
        if ((old >> T_VIEW_BITS) != gen || (old & T_VIEW_MAX) == 0)
            return;
    } while (!__atomic_compare_exchange_n(w, &old, old - 1, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
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
    Py_TYPE(v)->tp_free((PyObject *)v);
}

static PyBufferProcs view_as_buffer = {(getbufferproc)view_getbuffer,
                                       (releasebufferproc)view_releasebuffer};
static PyMethodDef view_methods[] = {
    {"_release", (PyCFunction)view_release, METH_NOARGS, NULL},
    {NULL}};
static PyGetSetDef view_getset[] = {
    {"_held", (getter)view_get_held, NULL, NULL, NULL},
    {NULL}};

static PyTypeObject View_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._core.TableView",
    .tp_basicsize = sizeof(ViewObject),
    .tp_dealloc = (destructor)view_dealloc,
    .tp_as_buffer = &view_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = view_methods,
    .tp_getset = view_getset,
    .tp_doc = "The bytes of one stored value, in place (see Store.view).",
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
    THeader *h = HDR(t);
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
            corrupt("the array record at %llu has a bad header", (unsigned long long)off);
        } else if (sr > 0)
            PyErr_Format(t_Unsupported ? t_Unsupported : PyExc_TypeError,
                         "%s reads only bytes and numpy array values, and this key "
                         "holds a value of type %s; use get()",
                         mode == M_INTO ? "get_into()" : "view()", vtype_name(r->vtype));
        else
            PyErr_Format(t_TooLarge ? t_TooLarge : PyExc_ValueError,
                         "get_into(): the value has %llu bytes and the buffer only %zd; "
                         "the buffer was left unchanged; pass one of at least that many "
                         "bytes",
                         (unsigned long long)dlen, into->len);
        return 0;
    }
    if (mode == M_INTO) {
        if (dlen >= (64u << 10)) {
            shm_pin(t->mapping); /* other threads run: keep the memory mapped */
            Py_BEGIN_ALLOW_THREADS
            memcpy(into->buf, P + doff, (size_t)dlen);
            Py_END_ALLOW_THREADS
            shm_unpin(t->mapping);
            if (t_live(t) < 0)
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
    ViewObject *v = PyObject_New(ViewObject, &View_Type);
    if (v == NULL) {
        Py_XDECREF(head);
        return 0;
    }
    v->mapping = Py_NewRef(t->mapping);
    v->poff = t->poff;
    v->p = (char *)P + doff;
    v->n = (Py_ssize_t)dlen;
    v->token = t->m->token;
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

/* The value (or with nbytes, its size) of the record at off, read under
 * the lock: CorruptError when it cannot be decoded. */
static PyObject *
value_locked(TableObject *t, uint64_t off, int nbytes)
{
    TRec rec;
    int race, post;
    char *P = PAY(t);
    if (rec_read(P, t->end, off, &rec) < 0) {
        corrupt("record at %llu is damaged", (unsigned long long)off);
        return NULL;
    }
    if (nbytes)
        return PyLong_FromUnsignedLongLong(rec.vlen);
    PyObject *o = val_decode(t, P, off, &rec, 0, 1, &race, &post);
    if (o == NULL && race && !PyErr_Occurred())
        corrupt("the record at %llu does not hold a valid value of type %d",
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
    if (t_index(t, &x) < 0)
        return NULL;
    int r = probe_w(t, &x, k, &slot, &w, &fo);
    if (r < 0)
        return NULL;
    *found = r == P_FOUND;
    if (!*found || mode == M_CONTAINS)
        return Py_NewRef(Py_None);
    if (mode == M_INTO || mode == M_VIEW) {
        TRec rec;
        PyObject *out;
        if (rec_read(PAY(t), t->end, word_off(w), &rec) < 0) {
            corrupt("record at %llu is damaged", (unsigned long long)word_off(w));
            return NULL;
        }
        read_raw(t, PAY(t), word_off(w), &rec, mode, into, 0, 1, held, &out);
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
    uint64_t end = t_enter(t);
    if (end == 0)
        return NULL;
    TKey k = *kp;
    PyObject *out = NULL;
    int held = 0;
    if (mode == M_VIEW) { /* before the epoch is loaded: see t_views_busy */
        if (view_hold(t) < 0)
            return NULL;
        held = 1;
    }
    if (t_in_batch(t)) {
        out = lookup_locked(t, &k, mode, found, into, &held);
        goto done;
    }
    THeader *h = HDR(t);
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
        char *P = PAY(t);
        if ((end = t_enter(t)) == 0) /* picks up growth */
            break;
        uint64_t off;
        TRec rec;
        int r = probe_ro(P, end, &k, &off, &rec);
        if (r == P_RACE) {
            if (!epoch_same(h, e))
                continue;
            if (!synced) { /* perhaps grown by another process: look again */
                synced = 1;
                if (t_sync(t) < 0)
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
        if (t->m->base == NULL) { /* closed by the decode hook */
            Py_XDECREF(o);
            t_live(t);
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
    if (t->readonly) {
        PyErr_SetString(t_Busy ? t_Busy : PyExc_RuntimeError,
                        "could not read a consistent value: writers keep changing the "
                        "store or it is damaged (this handle is readonly, so it cannot "
                        "take the writers' lock); retry, or open it writable");
        goto done;
    }
    if (t_lock(t) < 0)
        goto done;
    if (t_enter(t) != 0)
        out = lookup_locked(t, &k, mode, found, into, &held);
    t_unlock(t);
done:
    if (held && t->m->base != NULL)
        view_unhold(t->m, t->poff, t->m->token);
    return out;
}

static PyObject *
t_lookup_ex(TableObject *t, PyObject *key, int mode, int *found, Py_buffer *into)
{
    if (t_enter(t) == 0)
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

/* get_into(key, buffer) -> int */
static PyObject *
table_get_into(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get_into(key, buffer)");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "get_into(): buffer must be a writable C-contiguous buffer "
                     "(bytearray, numpy array, memoryview), not %.100s",
                     Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    int found = 0;
    PyObject *o = t_lookup_ex(t, args[0], M_INTO, &found, &b);
    PyBuffer_Release(&b);
    if (o != NULL && !found) {
        Py_DECREF(o);
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    return o;
}

/* _view(key) -> (TableView, vtype, array header bytes or None) */
static PyObject *
table_view(TableObject *t, PyObject *key)
{
    int found = 0;
    PyObject *o = t_lookup_ex(t, key, M_VIEW, &found, NULL);
    if (o != NULL && !found) {
        Py_DECREF(o);
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return o;
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
        uint64_t end = t_enter(t), nslots = 0;
        if (end == 0)
            goto fail;
        const char *P = PAY(t);
        uint64_t ix = LDA(&HDR(t)->index);
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
            if (o != NULL && !found) {
                Py_DECREF(o);
                o = NULL;
                if (nargs == 2)
                    o = Py_NewRef(args[1]);
                else
                    PyErr_SetObject(PyExc_KeyError, items[i0 + j]);
            }
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
    if (o != NULL && !found) {
        Py_DECREF(o);
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return o;
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
    if (o != NULL && !found) {
        Py_DECREF(o);
        return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    }
    return o;
}

static PyObject *
table_nbytes(TableObject *t, PyObject *key)
{
    return lookup_or_keyerror(t, key, M_NBYTES);
}

static Py_ssize_t
table_length(TableObject *t)
{
    uint64_t end = t_enter(t), nslots;
    if (end == 0)
        return -1;
    if (!index_ok(PAY(t), end, LDA(&HDR(t)->index), &nslots)) {
        corrupt("the index at %llu is damaged", (unsigned long long)LDR(&HDR(t)->index));
        return -1;
    }
    int64_t n = (int64_t)LDR(&HDR(t)->count);
    if ((uint64_t)n > nslots) {
        corrupt("the key count %llu is more than the index's %llu words",
                (unsigned long long)n, (unsigned long long)nslots);
        return -1;
    }
    if (t_in_batch(t)) {
        /* count the batch's own changes */
        TIndex x;
        if (t_index(t, &x) < 0)
            return -1;
        for (size_t j = 0; j < t->ov.cap; j++) {
            if (!t->ov.e[j].slot)
                continue;
            uint64_t pub = LDR(&x.slots[t->ov.e[j].slot - 1]), w = t->ov.e[j].word;
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
    if (t_enter(t) == 0)
        return -1;
    TKey k;
    TVal v;
    if (key_encode(t, key, &k) < 0)
        return -1;
    if (val_encode(t, value, &v) < 0) {
        key_release(&k);
        return -1;
    }
    int ret = -1;
    uint64_t room = (uint64_t)t->m->reserve - t->poff - T_HEADER;
    uint64_t need = T_REC_HDR + (uint64_t)k.n + v.len;
    if (v.len > room || need > room) {
        PyErr_Format(t_TooLarge ? t_TooLarge : PyExc_ValueError,
                     "a value of %llu bytes cannot fit in this store (max_size %llu "
                     "bytes); create the store with a larger max_size=",
                     (unsigned long long)v.len, (unsigned long long)room);
        goto out;
    }
    uint64_t size = (need + 15) & ~(uint64_t)15;
    if (t_lock(t) < 0)
        goto out;
    if (t_maybe_recycle(t) < 0 || t_reserve(t) < 0)
        goto unlock;
    TIndex x;
    uint64_t slot, old;
    int fo;
    if (t_index(t, &x) < 0)
        goto unlock;
    int r = probe_w(t, &x, &k, &slot, &old, &fo);
    if (r < 0)
        goto unlock;
    if (r == P_FOUND && mode == W_ADD) {
        PyObject *msg = PyUnicode_FromFormat(
            "key %R is already in the store; add() only inserts (use st[key] = value "
            "to replace it)", key);
        if (msg) {
            PyErr_SetObject(t_KeyExists ? t_KeyExists : PyExc_KeyError, msg);
            Py_DECREF(msg);
        }
        goto unlock;
    }
    uint64_t off = t_alloc_grow(t, size, 0);
    if (off == (uint64_t)-1)
        goto unlock;
    shm_crash_point("table.put.allocated");
    if (t_index(t, &x) < 0) /* the grow hook may have run: the index is the same */
        goto unlock;
    char *P = PAY(t), *b = P + off;
    THeader *h = HDR(t);
    STR(&h->used, LDR(&h->used) + (LDR(W64(P, off)) & ~(uint64_t)B_FLAGS));
    STR((uint64_t *)(b + 16), k.h);
    STR((uint32_t *)(b + 24), (uint32_t)k.n);
    b[28] = (char)k.type;
    b[29] = (char)v.type;
    b[30] = b[31] = 0;
    STR((uint64_t *)(b + 32), v.len);
    memcpy(b + T_REC_HDR, k.p, (size_t)k.n);
    uint64_t w = rec_word(off, k.h);
    if (val_write(&v, b + T_REC_HDR + k.n) < 0) {
        t_free(t, off); /* never published */
        goto unlock;
    }
    shm_crash_point("table.put.written");
    if (t_in_batch(t)) {
        int fresh = !fo && LDR(&x.slots[slot]) == W_EMPTY;
        if (ov_set(&t->ov, slot, w) < 0) {
            t_free(t, off);
            goto unlock;
        }
        t->ov.newslots += fresh;
        if (fo && old > W_TOMB)
            t_free(t, word_off(old)); /* this batch's own, never published */
    } else {
        STA(&x.slots[slot], w); /* publish */
        shm_crash_point(old > W_TOMB ? "table.update.published" : "table.put.published");
        if (old > W_TOMB) {
            t_free(t, word_off(old));
            shm_crash_point("table.update.freed");
        } else {
            if (old == W_TOMB)
                STR(&h->tombstones, LDR(&h->tombstones) - 1);
            shm_crash_point("table.put.tombstones");
            STR(&h->count, LDR(&h->count) + 1);
            shm_crash_point("table.put.counted");
        }
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
    if (t_enter(t) == 0)
        return NULL;
    TKey k;
    if (key_encode(t, key, &k) < 0)
        return NULL;
    PyObject *out = NULL;
    if (t_lock(t) < 0) {
        key_release(&k);
        return NULL;
    }
    TIndex x;
    uint64_t slot, old;
    int fo;
    if (t_index(t, &x) < 0)
        goto unlock;
    int r = probe_w(t, &x, &k, &slot, &old, &fo);
    if (r < 0)
        goto unlock;
    *found = r == P_FOUND;
    if (!*found) {
        out = Py_NewRef(Py_None);
        goto unlock;
    }
    THeader *h = HDR(t);
    if (want_value) {
        if ((out = value_locked(t, word_off(old), 0)) == NULL)
            goto unlock;
        if (t_index(t, &x) < 0) { /* a hook ran Python code */
            Py_CLEAR(out);
            goto unlock;
        }
    } else {
        out = Py_NewRef(Py_None);
    }
    if (t_in_batch(t)) {
        if (ov_set(&t->ov, slot, W_TOMB) < 0) {
            Py_CLEAR(out);
            goto unlock;
        }
        if (fo)
            t_free(t, word_off(old));
    } else {
        STA(&x.slots[slot], (uint64_t)W_TOMB);
        shm_crash_point("table.delete.published");
        t_free(t, word_off(old));
        shm_crash_point("table.delete.freed");
        STR(&h->count, LDR(&h->count) - 1);
        shm_crash_point("table.delete.counted");
        STR(&h->tombstones, LDR(&h->tombstones) + 1);
        shm_crash_point("table.delete.tombstones");
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
    if (o != NULL && !found) {
        Py_DECREF(o);
        if (nargs == 2)
            return Py_NewRef(args[1]);
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    return o;
}

/* ---- batches ---------------------------------------------------------------- */

static PyObject *
table_batch_begin(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter(t) == 0 || t_lock(t) < 0)
        return NULL;
    t->batch_depth++;
    Py_RETURN_NONE;
}

/* Free what the open batch allocated and forget its words. */
static void
batch_discard(TableObject *t)
{
    for (size_t j = 0; j < t->ov.cap; j++)
        if (t->ov.e[j].slot && t->ov.e[j].word > W_TOMB)
            t_free(t, word_off(t->ov.e[j].word));
    ov_clear(&t->ov);
}

/* Publish the batch: write its words to a journal block, mark it
 * committing, make the epoch odd, store the words, make it even. */
static int
batch_commit(TableObject *t)
{
    Overlay *ov = &t->ov;
    if (ov->n == 0)
        return 0;
    uint64_t n = ov->n;
    uint64_t j = t_alloc_grow(t, (T_JOURNAL_HDR + 16 * n + 15) & ~(uint64_t)15, B_JOURNAL);
    if (j == (uint64_t)-1)
        return -1;
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t *e = W64(P, j + T_JOURNAL_HDR), i = 0;
    for (size_t s = 0; s < ov->cap; s++) {
        if (!ov->e[s].slot)
            continue;
        e[2 * i] = ov->e[s].slot - 1;
        e[2 * i + 1] = ov->e[s].word;
        i++;
    }
    STR(W64(P, j + 16), n);
    STR(W64(P, j + 24), x.ix);
    h->journal = j;
    h->journal_n = n;
    shm_crash_point("table.batch.journal");
    __atomic_store_n(&h->state, h->state | ST_COMMIT, __ATOMIC_RELEASE);
    shm_crash_point("table.batch.committing");
    epoch_bump(h, 1); /* odd: readers wait */
    shm_crash_point("table.batch.odd");
    int64_t dcount = 0, dtomb = 0;
    for (i = 0; i < n; i++) {
        uint64_t s = e[2 * i], w = e[2 * i + 1], pub = LDR(&x.slots[s]);
        STR(&x.slots[s], w);
        shm_crash_point("table.batch.word");
        if (pub > W_TOMB)
            t_free(t, word_off(pub));
        dcount += (w > W_TOMB) - (pub > W_TOMB);
        dtomb += (w == W_TOMB) - (pub == W_TOMB);
    }
    epoch_bump(h, 1); /* even again: the release store publishes them all */
    epoch_wake(h);
    shm_crash_point("table.batch.even");
    STR(&h->count, LDR(&h->count) + (uint64_t)dcount);
    STR(&h->tombstones, LDR(&h->tombstones) + (uint64_t)dtomb);
    shm_crash_point("table.batch.counted");
    __atomic_store_n(&h->state, h->state & ~ST_COMMIT, __ATOMIC_RELEASE);
    shm_crash_point("table.batch.committed");
    t_free(t, j);
    h->batches++;
    ov_clear(ov);
    return 0;
}

static PyObject *
table_batch_end(TableObject *t, PyObject *arg)
{
    int commit = PyObject_IsTrue(arg);
    if (commit < 0)
        return NULL;
    if (!t_in_batch(t)) {
        PyErr_SetString(PyExc_RuntimeError, "no batch is open in this thread");
        return NULL;
    }
    int r = 0;
    if (--t->batch_depth == 0 && t_live(t) == 0) {
        if (commit)
            r = batch_commit(t);
        if (!commit || r < 0)
            batch_discard(t);
    }
    t_unlock(t);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_lock(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter(t) == 0 || t_lock(t) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
table_unlock(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t->lock_depth <= 0 || t->lock_thread != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "the store's lock is not held by this thread");
        return NULL;
    }
    t_unlock(t);
    Py_RETURN_NONE;
}

static PyObject *
table_clear(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter(t) == 0 || t_lock(t) < 0)
        return NULL;
    if (t_in_batch(t) && t->batch_depth) {
        t_unlock(t);
        PyErr_SetString(PyExc_RuntimeError, "clear() inside a batch is not supported");
        return NULL;
    }
    PyObject *ret = NULL;
    TIndex x;
    if (t_index(t, &x) < 0)
        goto out;
    uint64_t bytes = (T_INDEX_HDR + 8 * T_MIN_SLOTS + 15) & ~(uint64_t)15;
    uint64_t nix = t_alloc_grow(t, bytes, B_INDEX);
    if (nix == (uint64_t)-1 || t_index(t, &x) < 0)
        goto out;
    char *P = PAY(t);
    THeader *h = HDR(t);
    STR(W64(P, nix + 16), (uint64_t)T_MIN_SLOTS);
    STR(W64(P, nix + 24), 0);
    memset(P + nix + T_INDEX_HDR, 0, 8 * T_MIN_SLOTS);
    shm_crash_point("table.clear.built");
    STR(&h->index_gen, LDR(&h->index_gen) + 1);
    STA(&h->index, nix);
    shm_crash_point("table.clear.published");
    for (uint64_t i = 0; i < x.nslots; i++) {
        uint64_t w = LDR(&x.slots[i]);
        if (w > W_TOMB)
            t_free(t, word_off(w));
    }
    t_free(t, x.ix);
    shm_crash_point("table.clear.freed");
    STR(&h->count, 0);
    STR(&h->tombstones, 0);
    shm_crash_point("table.clear.counted");
    ret = Py_NewRef(Py_None);
out:
    t_unlock(t);
    return ret;
}

/* ---- scanning (iteration) --------------------------------------------------- */

/* _scan(index, start, max, what) -> (next, index, [entries], hashes, wrapped)
 * or None
 * when `index` is no longer the current index (the caller restarts).
 * `index` is a token naming one index: its offset / 16 with index_gen above
 * bit 40, because a later index may be placed where an earlier one was.
 * what: 0 keys, 1 values, 2 (key, value) pairs.  Entries of one call are
 * read under one epoch, so each is a value that was stored at some moment. */
static PyObject *
scan(TableObject *t, uint64_t want_ix, uint64_t start, uint64_t maxn, int what)
{
    int locked = t_in_batch(t);
    for (int attempt = 0; attempt < MAX_RETRIES; attempt++) {
        uint64_t end = t_enter(t);
        if (end == 0)
            return NULL;
        THeader *h = HDR(t);
        char *P = PAY(t);
        uint64_t e = LDA(&h->epoch);
        if (e & 1 && !locked) {
            int w = t_wait_even(t, &e);
            if (w < 0)
                return NULL;
            if (w > 0) { /* left odd by a dead writer: the lock repairs it */
                if (t->readonly) {
                    PyErr_SetString(t_Busy ? t_Busy : PyExc_RuntimeError,
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
            corrupt("the index at %llu is damaged", (unsigned long long)ix);
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
            uint64_t w = locked ? wword(t, &x, i, &fo) : LDA(&slots[i]), off = word_off(w);
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
            corrupt("a record listed in the index at slot %llu is damaged",
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
    PyErr_SetString(t_Busy ? t_Busy : PyExc_RuntimeError,
                    "writers kept changing the store while it was being listed; retry");
    return NULL;
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
    if (t_live(t) < 0)
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

/* ---- verification, statistics, vacuum --------------------------------------- */

typedef struct {
    uint64_t blocks, records, used, free_bytes, largest_free, index_bytes;
} TWalk;

#define VFAIL(...) return corrupt(__VA_ARGS__)

typedef struct {
    TableObject *t;
    const char *P;
    uint64_t end;
    const TIndex *x;
    TWalk *out;
    uint64_t used, nfree, last_free;
} TVerifyWalk;

/* Each record word: a well-formed record of a known type whose hash and
 * tag match its key, reachable from its home slot, and stored once. */
static int
verify_word(void *ctx, uint64_t i, uint64_t w, uint64_t o)
{
    TVerifyWalk *vw = ctx;
    const char *P = vw->P;
    const TIndex *x = vw->x;
    TRec r;
    if (rec_read(P, vw->end, o, &r) < 0)
        VFAIL("index word %llu points at %llu, not a record", (unsigned long long)i,
              (unsigned long long)o);
    uint64_t head = LDR(W64(P, o));
    if ((head & B_FLAGS) != B_USED)
        VFAIL("the index points at a block that is not a used record (%llu)",
              (unsigned long long)o);
    if (r.ktype < KT_INT || r.ktype > KT_BYTES || r.vtype < VT_BYTES || r.vtype > VT_LAST)
        VFAIL("record at %llu has key type %u, value type %u", (unsigned long long)o,
              r.ktype, r.vtype);
    uint64_t hh = thash(P + o + T_REC_HDR, r.klen,
                        vw->t->seed ^ (r.ktype * 0x9E3779B97F4A7C15ull));
    if (hh != r.hash)
        VFAIL("record at %llu has a wrong hash", (unsigned long long)o);
    if ((w >> 40) != W_TAG(hh))
        VFAIL("index word %llu has a wrong tag", (unsigned long long)i);
    if (r.ktype == KT_INT && r.klen < 8)
        VFAIL("int key of %u bytes at %llu", r.klen, (unsigned long long)o);
    /* reachable from its home slot without crossing an empty word, and no
     * other word for the same key before it */
    for (uint64_t s = hh & x->mask; s != i; s = (s + 1) & x->mask) {
        uint64_t w2 = LDR(&x->slots[s]);
        if (w2 == W_EMPTY)
            VFAIL("the key at %llu cannot be found from its home slot",
                  (unsigned long long)o);
        if (w2 > W_TOMB && (w2 >> 40) == (w >> 40)) {
            TRec r2;
            uint64_t o2 = word_off(w2);
            if (rec_read(P, vw->end, o2, &r2) == 0 && r2.hash == r.hash &&
                r2.klen == r.klen && r2.ktype == r.ktype &&
                memcmp(P + o2 + T_REC_HDR, P + o + T_REC_HDR, r.klen) == 0)
                VFAIL("the key at %llu is stored twice", (unsigned long long)o);
        }
    }
    return 0;
}

/* Each block: the index flagged as one, no used block unreferenced; sums. */
static int
verify_block(void *ctx, uint64_t off, uint64_t head, uint64_t size, int kind)
{
    TVerifyWalk *vw = ctx;
    TWalk *out = vw->out;
    out->blocks++;
    vw->last_free = 0;
    switch (kind) {
    case TB_INDEX:
        if ((head & B_FLAGS) != (B_USED | B_INDEX))
            VFAIL("the index block's flags are %llu", (unsigned long long)(head & 15));
        out->index_bytes = size;
        break;
    case TB_RECORD:
        vw->used += size;
        out->records++;
        break;
    case TB_STRAY:
        VFAIL("block at %llu is marked used but nothing refers to it",
              (unsigned long long)off);
    case TB_FREE:
        vw->nfree += size;
        vw->last_free = off;
        if (size > out->largest_free)
            out->largest_free = size;
        break;
    }
    return 0;
}

static int
t_verify(TableObject *t, TWalk *out)
{
    uint64_t end = t_enter(t);
    if (end == 0)
        return -1;
    char *P = PAY(t);
    THeader *h = HDR(t);
    memset(out, 0, sizeof *out);
    if (h->heap_start != T_HEADER)
        VFAIL("the heap start is %llu, not %u", (unsigned long long)h->heap_start,
              T_HEADER);
    if (LDR(&h->epoch) & 1)
        VFAIL("the epoch is odd (%llu) with no batch being applied",
              (unsigned long long)LDR(&h->epoch));
    if (h->state)
        VFAIL("state flags %u are set with no writer at work", h->state);
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    TMarks mk;
    TVerifyWalk vw = {t, P, end, &x, out, 0, 0, 0};
    if (t_walk_index(end, &x, &mk, verify_word, &vw) < 0)
        return -1;
    uint64_t count = mk.count, tombs = mk.tombs;
    if (count != LDR(&h->count) || tombs != LDR(&h->tombstones) ||
        (count + tombs) * 4 > x.nslots * 3) {
        PyMem_Free(mk.bm);
        if (count != LDR(&h->count))
            VFAIL("count says %llu keys, the index holds %llu",
                  (unsigned long long)LDR(&h->count), (unsigned long long)count);
        if (tombs != LDR(&h->tombstones))
            VFAIL("tombstone count says %llu, the index holds %llu",
                  (unsigned long long)LDR(&h->tombstones), (unsigned long long)tombs);
        VFAIL("the index is over-full (%llu of %llu words)",
              (unsigned long long)(count + tombs), (unsigned long long)x.nslots);
    }
    if (t_walk_chain(P, end, x.ix, &mk, verify_block, &vw) < 0)
        return -1;
    if (vw.used != LDR(&h->used))
        VFAIL("used bytes say %llu, the records take %llu",
              (unsigned long long)LDR(&h->used), (unsigned long long)vw.used);
    /* free lists + top + pending == free bytes */
    uint64_t listed = 0, budget = out->blocks + 1;
    for (int b = 0; b < NBINS; b++) {
        for (uint64_t f = h->bins[b]; f; f = LDR(W64(P, f + 8))) {
            uint64_t fs;
            if (!budget--)
                VFAIL("free list %d loops", b);
            if (!free_ok(P, end, f, &fs) || bin_of(fs) != b)
                VFAIL("free list %d holds a bad block at %llu", b, (unsigned long long)f);
            listed += fs;
        }
    }
    if (h->top) {
        uint64_t fs;
        if (!free_ok(P, end, h->top, &fs) || h->top + fs != end || vw.last_free != h->top)
            VFAIL("the top block at %llu is bad", (unsigned long long)h->top);
        listed += fs;
    }
    if (listed + h->pending != vw.nfree)
        VFAIL("free space does not add up: %llu listed + %llu pending != %llu free",
              (unsigned long long)listed, (unsigned long long)h->pending,
              (unsigned long long)vw.nfree);
    out->used = vw.used;
    out->free_bytes = vw.nfree;
    return 0;
}

static PyObject *
table_verify(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    TWalk w;
    if (t_enter(t) == 0 || t_lock(t) < 0)
        return NULL;
    int r = t_in_batch(t) ? (PyErr_SetString(PyExc_RuntimeError,
                                             "verify() inside a batch is not supported"),
                             -1)
                          : t_verify(t, &w);
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
    uint64_t end = t_enter(t);
    if (end == 0)
        return NULL;
    int locked = !t->readonly && t_lock(t) == 0;
    if (!t->readonly && !locked)
        return NULL;
    THeader *h = HDR(t);
    char *P = PAY(t);
    uint64_t listed = 0, largest = 0, nfree = 0, budget = (end >> 5) + 1, nslots = 0;
    for (int b = 0; b < NBINS && budget; b++) {
        for (uint64_t f = h->bins[b]; f && budget; f = LDR(W64(P, f + 8)), budget--) {
            uint64_t fs;
            if (!free_ok(P, end, f, &fs))
                break;
            listed += fs;
            nfree++;
            if (fs > largest)
                largest = fs;
        }
    }
    uint64_t fs;
    if (h->top && free_ok(P, end, h->top, &fs)) {
        listed += fs;
        nfree++;
        if (fs > largest)
            largest = fs;
    }
    index_ok(P, end, LDR(&h->index), &nslots);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsdsKsKsKsKsKsKsK}",
        "count", (unsigned long long)LDR(&h->count),
        "tombstones", (unsigned long long)LDR(&h->tombstones),
        "used_bytes", (unsigned long long)LDR(&h->used),
        "heap_bytes", (unsigned long long)(end - T_HEADER),
        "free_bytes", (unsigned long long)listed,
        "free_blocks", (unsigned long long)nfree,
        "largest_free", (unsigned long long)largest,
        "pending_bytes", (unsigned long long)h->pending,
        "index_slots", (unsigned long long)nslots,
        "fragmentation", listed ? 1.0 - (double)largest / (double)listed : 0.0,
        "growths", (unsigned long long)h->growths,
        "index_growths", (unsigned long long)h->index_growths,
        "recycles", (unsigned long long)h->recycles,
        "recoveries", (unsigned long long)h->recoveries,
        "vacuums", (unsigned long long)h->vacuums,
        "batches", (unsigned long long)h->batches,
        "epoch", (unsigned long long)LDR(&h->epoch));
    if (locked)
        t_unlock(t);
    return d;
}

typedef struct {
    uint64_t start, end;
} Extent;

/* Take `size` bytes from the lowest extent that fits (0 if none). */
static uint64_t
ext_take(char *P, THeader *h, Extent *fx, size_t nf, size_t *lo, uint64_t size,
         unsigned flags, uint64_t below)
{
    uint64_t dst = 0;
    for (size_t q = *lo; q < nf && fx[q].start < below; q++) {
        uint64_t len = fx[q].end - fx[q].start;
        if (len == size || len >= size + T_MIN_BLOCK) {
            dst = fx[q].start;
            fx[q].start += carve(P, h, dst, len, size, flags, 0);
            break;
        }
    }
    while (*lo < nf && fx[*lo].end - fx[*lo].start < T_MIN_BLOCK)
        (*lo)++;
    return dst;
}

/* One compaction pass (lock held, right after a recycle): move records,
 * highest first, into the lowest free space that fits below them.  Each
 * move copies the record, republishes its index word and leaves the old
 * copy pending, so readers are never shown a half-moved record.  With
 * index_slots, a new index of that many words is first placed as low as
 * possible.  The free lists are stale afterwards: recycle next. */
static int
t_compact(TableObject *t, uint64_t index_slots, uint64_t *moved)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t->end, off, size, nfree = 0, nused = 0;
    for (off = T_HEADER; off < end; off += size) {
        uint64_t head = LDR(W64(P, off));
        size = head & ~(uint64_t)B_FLAGS;
        if (size < T_MIN_BLOCK || size > end - off)
            return corrupt("block at %llu has a bad size", (unsigned long long)off);
        if (head & B_USED)
            nused++;
        else
            nfree++;
    }
    Extent *fx = PyMem_Calloc(nfree + 1, sizeof *fx);
    uint64_t *ux = PyMem_Calloc(nused + 1, sizeof *ux);
    if (fx == NULL || ux == NULL) {
        PyMem_Free(fx);
        PyMem_Free(ux);
        PyErr_NoMemory();
        return -1;
    }
    size_t nf = 0, nu = 0, lo = 0;
    for (off = T_HEADER; off < end && nu <= nused && nf <= nfree; off += size) {
        uint64_t head = LDR(W64(P, off));
        size = head & ~(uint64_t)B_FLAGS;
        if (size < T_MIN_BLOCK || size > end - off)
            break; /* changed under us: not by a writer, they wait for the lock */
        if ((head & B_FLAGS) == B_USED && nu < nused)
            ux[nu++] = off;
        else if (!(head & B_USED) && nf < nfree)
            fx[nf++] = (Extent){off, off + size};
    }
    memset(h->bins, 0, sizeof h->bins);
    h->top = 0;
    int err = 0;
    if (index_slots) {
        uint64_t ib = (T_INDEX_HDR + 8 * index_slots + 15) & ~(uint64_t)15;
        uint64_t nix = ext_take(P, h, fx, nf, &lo, ib, B_USED | B_INDEX, end);
        if (nix && t_rebuild(t, index_slots, nix) < 0) /* also drops tombstones */
            err = 1;
    }
    TIndex x;
    if (!err && t_index(t, &x) < 0)
        err = 1;
    for (size_t u = nu; u-- > 0 && !err;) {
        uint64_t src = ux[u];
        TRec r;
        if (rec_read(P, end, src, &r) < 0) {
            corrupt("record at %llu is damaged", (unsigned long long)src);
            err = 1;
            break;
        }
        uint64_t dst = ext_take(P, h, fx, nf, &lo, r.size, B_USED, src);
        if (!dst)
            continue;
        uint64_t dsize = LDR(W64(P, dst)) & ~(uint64_t)B_FLAGS;
        memcpy(P + dst + 16, P + src + 16, r.size - 16);
        shm_crash_point("table.vacuum.copied");
        uint64_t w = rec_word(src, r.hash), s = r.hash & x.mask, j;
        for (j = 0; j < x.nslots && LDR(&x.slots[s]) != w; j++)
            s = (s + 1) & x.mask;
        if (j == x.nslots) { /* not in the index: leave it */
            STR(W64(P, dst), dsize);
            continue;
        }
        STA(&x.slots[s], rec_word(dst, r.hash));
        shm_crash_point("table.vacuum.moved");
        STR(&h->used, LDR(&h->used) + dsize);
        t_free(t, src);
        (*moved)++;
    }
    PyMem_Free(fx);
    PyMem_Free(ux);
    return err ? -1 : 0;
}

/* Compact the heap and cut off its free tail.  Lock held; the caller
 * shrinks the segment to the returned heap end before unlocking. */
static PyObject *
table_vacuum(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_enter(t) == 0)
        return NULL;
    if (t->lock_depth <= 0 || t->lock_thread != PyThread_get_thread_ident() ||
        t_in_batch(t)) {
        PyErr_SetString(PyExc_RuntimeError, "vacuum needs the lock, outside a batch");
        return NULL;
    }
    char *P = PAY(t);
    THeader *h = HDR(t);
    TIndex x;
    if (t_index(t, &x) < 0 || counts_ok(h, x.nslots) < 0)
        goto fail;
    uint64_t n = T_MIN_SLOTS, count = LDR(&h->count), moved = 0;
    while (n < count * 2)
        n *= 2;
    /* records down; the index into the lowest hole left; records into the
     * hole the old index leaves */
    if (t_views_busy(t)) /* views hold the records where they are */
        return Py_BuildValue("KK", (unsigned long long)t->end, 0ull);
    /* a recycle deferred by a view taken meanwhile stops the compaction */
    int r;
    if ((r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, 0, &moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, n, &moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, 0, &moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0) {
        if (r < 0)
            goto fail;
        return Py_BuildValue("KK", (unsigned long long)t->end, (unsigned long long)moved);
    }
    /* cut the free tail, keeping the heap page-aligned in the file */
    uint64_t end = t->end, top = h->top, tsize, new_end = end, page = 4096;
    if (top && free_ok(P, end, top, &tsize) && top + tsize == end) {
        new_end = (top + T_MIN_BLOCK + page - 1) & ~(page - 1); /* poff is page-aligned */
        if (new_end + T_MIN_BLOCK <= end) {
            STR(W64(P, new_end + 8), 0);
            STR(W64(P, new_end), end - new_end);
            shm_crash_point("table.vacuum.tail");
            STR(W64(P, top), new_end - top);
            shm_crash_point("table.vacuum.split");
            STA(&h->heap_end, new_end);
            t->end = new_end;
            shm_crash_point("table.vacuum.cut");
        } else {
            new_end = end;
        }
    }
    h->vacuums++;
    return Py_BuildValue("KK", (unsigned long long)new_end, (unsigned long long)moved);
fail:
    t_mark_damage(t); /* the caller holds the lock: t_unlock sees no error */
    return NULL;
}

/* ---- setup -------------------------------------------------------------------- */

static PyObject *
table_bind(TableObject *t, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "payload", "readonly", "pickle", "encode",
                             "decode", "grow", "timeout", "read_timeout", NULL};
    PyObject *mapping, *enc = Py_None, *dec = Py_None, *grow = Py_None,
             *timeout = Py_None, *rtimeout = Py_None;
    unsigned long long poff;
    int readonly = 0, pickle = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!K|ppOOOOO", kwlist, &Mapping_Type,
                                     &mapping, &poff, &readonly, &pickle, &enc, &dec,
                                     &grow, &timeout, &rtimeout))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    if (m->base == NULL || poff % 4096 || poff + T_HEADER + T_INDEX_HDR > (uint64_t)m->length) {
        PyErr_Format(m->base == NULL || poff % 4096 ? PyExc_ValueError : shm_CorruptError,
                     "the segment's payload (%lld bytes) is too small for a store: its "
                     "header is damaged; recreate the store", (long long)m->length);
        return NULL;
    }
    int64_t tns = -1;
    if (timeout != Py_None) {
        double s = PyFloat_AsDouble(timeout);
        if (s == -1.0 && PyErr_Occurred())
            return NULL;
        tns = s < 0 ? 0 : (int64_t)(s * 1e9);
    }
    int64_t rns = -1;
    if (rtimeout != Py_None) {
        double s = PyFloat_AsDouble(rtimeout);
        if (s == -1.0 && PyErr_Occurred())
            return NULL;
        rns = s < 0 ? 0 : (int64_t)(s * 1e9);
    }
    Py_XSETREF(t->mapping, Py_NewRef(mapping));
    t->m = m;
    t->poff = poff;
    t->readonly = readonly;
    t->pickle = pickle;
    t->timeout_ns = tns;
    t->read_timeout_ns = rns;
    Py_XSETREF(t->encode_hook, Py_NewRef(enc));
    Py_XSETREF(t->decode_hook, Py_NewRef(dec));
    Py_XSETREF(t->grow_hook, Py_NewRef(grow));
    t->seed = LDR(&HDR(t)->seed);
    Py_RETURN_NONE;
}

/* _format(seed): lay out an empty store over the whole payload (creator only). */
static PyObject *
table_format(TableObject *t, PyObject *arg)
{
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(arg);
    if (PyErr_Occurred() || t_live(t) < 0)
        return NULL;
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t_lim(t) & ~(uint64_t)15;
    uint64_t ibytes = (T_INDEX_HDR + 8 * T_MIN_SLOTS + 15) & ~(uint64_t)15;
    if (end < T_HEADER + ibytes + T_MIN_BLOCK) {
        PyErr_SetString(PyExc_ValueError, "a store needs at least 8 KiB");
        return NULL;
    }
    memset(h, 0, sizeof *h);
    h->seed = seed;
    h->heap_start = T_HEADER;
    STR(W64(P, T_HEADER), ibytes | B_USED | B_INDEX);
    STR(W64(P, T_HEADER + 16), (uint64_t)T_MIN_SLOTS);
    memset(P + T_HEADER + T_INDEX_HDR, 0, 8 * T_MIN_SLOTS);
    uint64_t top = T_HEADER + ibytes;
    STR(W64(P, top), end - top);
    STR(W64(P, top + 8), 0);
    h->top = top;
    h->index = T_HEADER;
    STA(&h->heap_end, end);
    t->seed = seed;
    Py_RETURN_NONE;
}

static PyObject *
table_after_fork(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    /* The child holds none of its parent's locks or batches. */
    t->lock_depth = 0;
    t->batch_depth = 0;
    ov_clear(&t->ov);
    Py_RETURN_NONE;
}

static PyObject *
table_flush(TableObject *t, PyObject *Py_UNUSED(ignored))
{
    if (t_live(t) < 0)
        return NULL;
    int r;
    shm_pin(t->mapping);
    Py_BEGIN_ALLOW_THREADS
    r = msync(t->m->base, (size_t)t->m->length, MS_SYNC);
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
    uint64_t end = t_enter(t), off;
    if (end == 0)
        return NULL;
    TKey k;
    TRec r;
    if (key_encode(t, key, &k) < 0)
        return NULL;
    int found = probe_ro(PAY(t), end, &k, &off, &r);
    key_release(&k);
    if (found != P_FOUND)
        Py_RETURN_NONE;
    return Py_BuildValue("KK", (unsigned long long)(t->poff + off),
                         (unsigned long long)(t->poff + off + T_REC_HDR + r.klen));
}

static void
table_dealloc(TableObject *t)
{
    PyObject_GC_UnTrack(t);
    if (t->lock_depth > 0 && t->m && t->m->base) {
        if (t->batch_depth > 0)
            batch_discard(t); /* else its blocks stay used by nothing */
        t->lock_depth = 1;
        t_unlock(t);
    }
    ov_clear(&t->ov);
    Py_CLEAR(t->mapping);
    Py_CLEAR(t->encode_hook);
    Py_CLEAR(t->decode_hook);
    Py_CLEAR(t->grow_hook);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int
table_traverse(TableObject *t, visitproc visit, void *arg)
{
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
     "get(key, default=None)\n\nThe value stored under key, or default."},
    {"add", (PyCFunction)(void (*)(void))table_add, METH_FASTCALL,
     "add(key, value)\n\nInsert key; KeyExistsError if it is already there."},
    {"pop", (PyCFunction)(void (*)(void))table_pop, METH_FASTCALL,
     "pop(key[, default])\n\nRemove key and return its value, in one step."},
    {"get_into", (PyCFunction)(void (*)(void))table_get_into, METH_FASTCALL,
     "get_into(key, buffer) -> int\n\nCopy a bytes or array value into buffer."},
    {"get_many", (PyCFunction)(void (*)(void))table_get_many, METH_FASTCALL,
     "get_many(keys[, default]) -> list\n\nThe values of keys, in order."},
    {"_view", (PyCFunction)table_view, METH_O, NULL},
    {"nbytes", (PyCFunction)table_nbytes, METH_O,
     "nbytes(key) -> int\n\nBytes the value of key takes when encoded."},
    {"clear", (PyCFunction)table_clear, METH_NOARGS, "clear()\n\nRemove every key."},
    {"_bind", (PyCFunction)(void (*)(void))table_bind, METH_VARARGS | METH_KEYWORDS, NULL},
    {"_format", (PyCFunction)table_format, METH_O, NULL},
    {"_scan", (PyCFunction)(void (*)(void))table_scan, METH_FASTCALL, NULL},
    {"_batch_begin", (PyCFunction)table_batch_begin, METH_NOARGS, NULL},
    {"_batch_end", (PyCFunction)table_batch_end, METH_O, NULL},
    {"_lock", (PyCFunction)table_lock, METH_NOARGS, NULL},
    {"_unlock", (PyCFunction)table_unlock, METH_NOARGS, NULL},
    {"_verify", (PyCFunction)table_verify, METH_NOARGS, NULL},
    {"_stats", (PyCFunction)table_stats, METH_NOARGS, NULL},
    {"_vacuum", (PyCFunction)table_vacuum, METH_NOARGS, NULL},
    {"_flush", (PyCFunction)table_flush, METH_NOARGS, NULL},
    {"_after_fork", (PyCFunction)table_after_fork, METH_NOARGS, NULL},
    {"_locate", (PyCFunction)table_locate, METH_O, NULL},
    {NULL}
};

static PyMappingMethods table_as_mapping = {
    (lenfunc)table_length,
    (binaryfunc)table_subscript,
    (objobjargproc)table_ass_subscript,
};

static PySequenceMethods table_as_sequence = {
    .sq_contains = (objobjproc)table_contains,
};

PyTypeObject Table_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._core.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_dealloc = (destructor)table_dealloc,
    .tp_as_mapping = &table_as_mapping,
    .tp_as_sequence = &table_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The Store's hash table in shared memory (see shmkit.Store).",
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear_refs,
    .tp_methods = table_methods,
    .tp_new = PyType_GenericNew,
};

static PyObject *
table_set_classes(PyObject *mod, PyObject *args)
{
    PyObject *a, *b, *c, *d;
    if (!PyArg_ParseTuple(args, "OOOO", &a, &b, &c, &d))
        return NULL;
    Py_XSETREF(t_KeyExists, Py_NewRef(a));
    Py_XSETREF(t_Unsupported, Py_NewRef(b));
    Py_XSETREF(t_TooLarge, Py_NewRef(c));
    Py_XSETREF(t_Busy, Py_NewRef(d));
    Py_RETURN_NONE;
}

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
    {"table_set_classes", table_set_classes, METH_VARARGS,
     "table_set_classes(KeyExistsError, UnsupportedTypeError, ValueTooLargeError, "
     "BusyError)"},
    {"table_hash", table_hash, METH_VARARGS,
     "table_hash(data, seed) -> int: the store's 64-bit key hash."},
    {NULL}
};

int
shm_init_table(PyObject *module)
{
    if (PyType_Ready(&Table_Type) < 0 || PyType_Ready(&View_Type) < 0)
        return -1;
    Py_INCREF(&Table_Type);
    if (PyModule_AddObject(module, "Table", (PyObject *)&Table_Type) < 0)
        return -1;
    return PyModule_AddFunctions(module, table_functions);
}
