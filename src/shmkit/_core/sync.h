/* sync.h - shared helpers of the sync primitives (semaphore.c, rwlock.c,
 * condition.c): the view of one object, per-attach-slot counters and argument parsing.
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

#define SHM_SLOT_ENTRY_GEN(v) ((uint32_t)((v) >> 32) & 0xFFFFFu)
#define SHM_SLOT_ENTRY_COUNT(v) ((uint32_t)(v))

/* The token of the attachment that owns a per-slot entry. */
static inline uint32_t
shm_slot_entry_token(uint64_t v, uint32_t slot)
{
    return SHM_SLOT_ENTRY_GEN(v) << 10 | slot;
}

/* The `size` bytes at `off` of a mapping (8-aligned), or NULL with the
 * exception shm_addr raises (closed, readonly when writable, out of bounds). */
static inline char *
shm_sync_span(PyObject *mapping, long long off, uint64_t size, int writable)
{
    char *p = shm_addr(mapping, off, 8, writable);
    if (p == NULL)
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    if (size > (uint64_t)m->length || (uint64_t)off > (uint64_t)m->length - size) {
        PyErr_Format(shm_state_of(mapping)->CorruptError,
                     "offset %lld (+%llu bytes) is outside the segment's %zd bytes", off,
                     (unsigned long long)size, m->length);
        return NULL;
    }
    return p;
}

/* One call's view of a sync object: the mapping it lies in (kept mapped by
 * the caller for the call) and its first byte. */
typedef struct {
    MappingObject *m;
    char *b;
} shm_sync_view;

/* Bind v to the `size` bytes at `off` of mapping (shm_sync_span's checks).
 * 0, or -1 with an exception set. */
static inline int
shm_sync_bind(shm_sync_view *v, PyObject *mapping, long long off, uint64_t size,
              int writable)
{
    v->b = shm_sync_span(mapping, off, size, writable);
    if (v->b == NULL)
        return -1;
    v->m = (MappingObject *)mapping;
    return 0;
}

/* The u32 word at `off` of the object. */
static inline uint32_t *
shm_sync_u32(const shm_sync_view *v, uint64_t off)
{
    return (uint32_t *)(v->b + off);
}

/* The per-slot entry of `slot` in the table at `table` of the object. */
static inline uint64_t *
shm_sync_entry(const shm_sync_view *v, uint64_t table, uint32_t slot)
{
    return (uint64_t *)(v->b + table + 8 * (uint64_t)slot);
}

/* Deadline from acquire(blocking=True, timeout=None) arguments: nowait is 0,
 * None and -1 (threading.Lock's "forever") are SHM_FOREVER.  -1 on error. */
int64_t shm_sync_deadline(PyObject *blocking, PyObject *timeout);
/* Parse (blocking=True, timeout=None) from a FASTCALL call. 0, or -1 set. */
int shm_sync_parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                           const char *sig, PyObject **blocking, PyObject **timeout);

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
