/* sync.h - the protocol pieces the sync primitives share: the layouts of
 * their words, the view of one object, per-attach-slot counters, sleeper
 * accounting, the Python handle and argument parsing.  Each piece is written
 * once here (or in the file named beside it) and used both by the
 * primitive's own calls and by waitset.c, which waits on many at once.
 *
 * A per-slot counter is a u64 `generation << 32 | count` at table + 8 * slot.
 * The generation (20 bits, the attach slot's) names the attachment that owns
 * the count: an entry whose generation is not the slot's current owner's was
 * left by a process that is gone, and its count is reclaimed.
 */
#ifndef SHMKIT_SYNC_H
#define SHMKIT_SYNC_H

#include "shmkit.h"
#include "journal.h"
#include "wait.h"

/* ---- layouts (each file's head comment explains its own) ---- */

/* event.c: bit 0 the flag, the rest counts waiters in steps of 2. */
#define EVENT_FLAG 1u
#define EVENT_WAITER 2u

/* semaphore.c */
#define SEM_LOCK 0
#define SEM_VALUE 4
#define SEM_SEQ 8
#define SEM_SLEEPERS 12
#define SEM_MAX 16
#define SEM_JOURNAL 32
#define SEM_JCAP 4
#define SEM_TABLE 128
#define SEM_NO_MAX 0xFFFFFFFFu

/* rwlock.c; the state word's bits */
#define RW_LOCK 0
#define RW_STATE 4
#define RW_LEFT 8
#define RW_TABLE 64
#define RW_WRITER 1u   /* a writer is in or waiting */
#define RW_SLEEPERS 2u /* readers may sleep */

/* condition.c */
#define COND_LOCK 0
#define COND_SEQ 4
#define COND_GRANTED 12
#define COND_TABLE 64

/* ---- per-slot counters ---- */

#define SHM_SLOT_ENTRY_GEN(v) ((uint32_t)((v) >> 32) & 0xFFFFFu)
#define SHM_SLOT_ENTRY_COUNT(v) ((uint32_t)(v))
#define SHM_SLOT_ENTRY_CLEARED(v) ((v) & ~0xFFFFFFFFull) /* count zeroed, generation kept */

/* The token of the attachment that owns a per-slot entry. */
static inline uint32_t
shm_slot_entry_token(uint64_t v, uint32_t slot)
{
    return SHM_SLOT_ENTRY_GEN(v) << 10 | slot;
}

/* The count that entry v gives the attachment `token`: 0 when v is a gone
 * predecessor's. */
static inline uint32_t
shm_slot_entry_mine(uint64_t v, uint32_t token)
{
    return SHM_SLOT_ENTRY_GEN(v) == SHM_TOKEN_GEN(token) ? SHM_SLOT_ENTRY_COUNT(v) : 0;
}

/* The entry that gives the attachment `token` the count n. */
static inline uint64_t
shm_slot_entry_make(uint32_t token, uint32_t n)
{
    return (uint64_t)SHM_TOKEN_GEN(token) << 32 | n;
}

/* ---- the view of one object ---- */

/* The bytes of an object whose per-slot table starts at `table`. */
static inline uint64_t
shm_sync_footprint(const MappingObject *m, uint64_t table)
{
    return table + 8 * (uint64_t)m->max_slots;
}

/* One call's view of a sync object: the mapping it lies in (kept mapped by
 * the caller for the call), its first byte, where its per-slot table
 * starts, and its name for messages. */
typedef struct {
    MappingObject *m;
    char *b;
    uint64_t table;
    const char *what;
} shm_sync_view;

/* Bind v to the object at `off` of mapping whose table starts at `table`
 * (shm_span's checks over its whole footprint).  0, or -1 with an
 * exception set. */
static inline int
shm_sync_bind(shm_sync_view *v, PyObject *mapping, long long off, uint64_t table,
              int writable, const char *what)
{
    v->b = shm_span(mapping, off, shm_sync_footprint((MappingObject *)mapping, table),
                         writable);
    if (v->b == NULL)
        return -1;
    v->m = (MappingObject *)mapping;
    v->table = table;
    v->what = what;
    return 0;
}

/* The u32 word at `off` of the object. */
static inline uint32_t *
shm_sync_u32(const shm_sync_view *v, uint64_t off)
{
    return (uint32_t *)(v->b + off);
}

/* The per-slot entry of `slot`. */
static inline uint64_t *
shm_sync_entry(const shm_sync_view *v, uint32_t slot)
{
    return (uint64_t *)(v->b + v->table + 8 * (uint64_t)slot);
}

/* The same, for any struct s whose member `view` is the object's view. */
#define SHM_SYNC_U32(s, off) shm_sync_u32(&(s)->view, (off))
#define SHM_SYNC_ENTRY(s, slot) shm_sync_entry(&(s)->view, (slot))

/* Call visit(ctx, slot, entry, value, alive) for every slot whose entry
 * counts something, `alive` telling whether its owner still exists; stop at
 * the first non-zero return and return it (0 when every slot was seen). */
typedef int (*shm_slot_visit)(void *ctx, uint32_t slot, uint64_t *e, uint64_t v, int alive);
int shm_sync_scan(const shm_sync_view *v, shm_slot_visit visit, void *ctx);

/* ---- sleeper accounting and readiness, shared with waitset.c ---- */

/* event.c: count a waiter in the word (so that set() wakes), and uncount. */
static inline void
shm_event_arm(uint32_t *w)
{
    __atomic_fetch_add(w, EVENT_WAITER, __ATOMIC_SEQ_CST);
}

static inline void
shm_event_disarm(uint32_t *w)
{
    __atomic_fetch_sub(w, EVENT_WAITER, __ATOMIC_SEQ_CST);
}

/* lock.c: set the waiters bit of a held lock word whose value was v (so
 * that release wakes); the value to sleep on. */
static inline uint32_t
shm_lock_mark_waiters(uint32_t *word, uint32_t v)
{
    if (!(v & SHM_LOCK_WAITERS) &&
        __atomic_compare_exchange_n(word, &v, v | SHM_LOCK_WAITERS, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED))
        v |= SHM_LOCK_WAITERS;
    return v;
}

/* semaphore.c: a unit is free; count and uncount a sleeper (b: its start). */
static inline int
shm_sem_free(const char *b)
{
    return (int32_t)__atomic_load_n((const uint32_t *)(b + SEM_VALUE), __ATOMIC_SEQ_CST) > 0;
}

static inline void
shm_sem_arm(char *b)
{
    __atomic_add_fetch((uint32_t *)(b + SEM_SLEEPERS), 1, __ATOMIC_SEQ_CST);
}

static inline void
shm_sem_disarm(char *b)
{
    shm_sat_sub((uint32_t *)(b + SEM_SLEEPERS), 1);
}

/* rwlock.c: count readers as sleepers on the state word. */
static inline void
shm_rw_arm(char *b)
{
    __atomic_fetch_or((uint32_t *)(b + RW_STATE), RW_SLEEPERS, __ATOMIC_SEQ_CST);
}

/* rwlock.c: any slot of the lock's table counts read holds (dead readers'
 * too: dropping those is the writer's own step).  An announced writer waits
 * for 0 on the readers-left word, which readers bump as they leave. */
int shm_rw_readers_in(const shm_sync_view *v);

/* condition.c: a grant was made since seq0 (seq is COND_SEQ's value now). */
static inline int
shm_cond_granted(const char *b, uint32_t seq, uint32_t seq0)
{
    return seq != seq0 &&
           __atomic_load_n((const uint32_t *)(b + COND_GRANTED), __ATOMIC_ACQUIRE) > 0;
}

/* condition.c, with the condition's mutex held (b: its start).  held: 1 when
 * this attachment holds the mutex, else 0 with RuntimeError naming call()
 * and what, or with CorruptError when it took the mutex and another store
 * replaced its word.  count: add delta to our attachment's sleepers.  take_grant:
 * take a grant made since seq0, 1 if one was. */
int shm_cond_held(MappingObject *m, char *b, const char *what, const char *call);
void shm_cond_count(MappingObject *m, char *b, int delta);
int shm_cond_take_grant(char *b, uint32_t seq0);

/* ---- the Python side ---- */

/* The head of a sync object's Python handle: the mapping it holds, the
 * object's offset and its name. */
#define SHM_SYNC_HANDLE_HEAD \
    PyObject_HEAD            \
    PyObject *mapping;       \
    long long offset;        \
    PyObject *what;          \
    const char *what_s;

typedef struct {
    SHM_SYNC_HANDLE_HEAD
} shm_sync_handle;

/* tp_init's common part: parse (mapping, offset, what=default_what), check
 * the object's bytes (one u32 when table is 0, else the footprint of a
 * table at `table`; when kind is not NULL, an offset that is not a multiple
 * of 8 is a ValueError naming it) and fill the head.  *b (if b) is its start.
 * 0, or -1 with an exception set (the handle unchanged). */
int shm_sync_handle_init(shm_sync_handle *h, PyObject *args, PyObject *kwds,
                         const char *default_what, uint64_t table, const char *kind,
                         char **b);
/* tp_dealloc of such a handle (a heap type's instance). */
void shm_sync_handle_dealloc(PyObject *self);

/* cond_footprint(max_slots) and the like: the bytes of an object whose table
 * starts at `table`, for max_slots attach slots. */
PyObject *shm_sync_footprint_of(PyObject *max_slots, uint64_t table);

/* A plain acquire's last step, once the hold is taken (held != 0): ask for
 * signals.  Python runs a handler as a C call returns, in the caller,
 * before the result is stored, so a KeyboardInterrupt raised there would
 * leave the hold taken with no one to release it.  A handler that raises
 * gets the hold given back first, by the type's own release method,
 * release(self, NULL); then -1.  Else held.  (`with` needs none of this: a
 * raise after __enter__ is inside the block, and __exit__ releases.) */
int shm_sync_acquired(PyObject *self, int held, PyCFunction release);

/* Deadline from acquire(blocking=True, timeout=None) arguments: nowait is 0,
 * None and -1 (threading.Lock's "forever") are SHM_FOREVER.  -1 on error. */
int64_t shm_sync_deadline(PyObject *blocking, PyObject *timeout);
/* Parse (blocking=True, timeout=None) from a FASTCALL call. 0, or -1 set. */
int shm_sync_parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                           const char *sig, PyObject **blocking, PyObject **timeout);
/* A module function's (mapping, offset, ...) arguments: lo to hi of them
 * (else TypeError "expected sig"), the offset as a number in *off.  0, or
 * -1 with an exception set. */
static inline int
shm_sync_args(PyObject *const *a, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi,
              const char *sig, long long *off)
{
    if (n < lo || n > hi) {
        PyErr_Format(PyExc_TypeError, "expected %s", sig);
        return -1;
    }
    *off = PyLong_AsLongLong(a[1]);
    return *off == -1 && PyErr_Occurred() ? -1 : 0;
}

int shm_init_semaphore(PyObject *module);
int shm_init_rwlock(PyObject *module);
int shm_init_condition(PyObject *module);

static inline int
shm_init_sync(PyObject *module)
{
    return shm_init_semaphore(module) < 0 || shm_init_rwlock(module) < 0 ||
                   shm_init_condition(module) < 0
               ? -1
               : 0;
}

#endif
