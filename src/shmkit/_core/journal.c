/* journal.c - the undo journal (layout and contract in journal.h).
 *
 *   shm_journal jn;
 *   shm_journal_bind(&jn, m, payload, J_OFF, 32, FIRST_WORD, payload_len, "semaphore 's'");
 *   shm_jset32(&jn, VALUE_OFF, value - 1, 0);   // old value recorded first
 *   shm_jadd64(&jn, slot_off, 1);
 *   if (shm_journal_commit(&jn) < 0) ...         // both stores, or neither
 */
#include "journal.h"
#include <string.h>

static inline uint64_t *
jword(shm_journal *jn, uint64_t i)
{
    return (uint64_t *)(jn->base + jn->j_off) + i;
}

void
shm_journal_bind(shm_journal *jn, MappingObject *m, char *base, uint64_t j_off,
                 uint32_t cap, uint64_t lo, uint64_t hi, const char *what)
{
    *jn = (shm_journal){.m = m, .base = base, .j_off = j_off, .cap = cap, .lo = lo, .hi = hi,
                        .what = what, .overflow = 0};
}

void
shm_journal_format(shm_journal *jn)
{
    memset(jn->base + jn->j_off, 0, SHM_JOURNAL_BYTES(jn->cap));
}

/* Append (off, old) and publish the new count.  0, or -1 on overflow. */
static int
append(shm_journal *jn, uint64_t off, uint64_t old)
{
    uint64_t n = __atomic_load_n(jword(jn, 0), __ATOMIC_RELAXED);
    if (n >= jn->cap) {
        jn->overflow = 1;
        return -1;
    }
    __atomic_store_n(jword(jn, 1 + 2 * n), off, __ATOMIC_RELAXED);
    __atomic_store_n(jword(jn, 2 + 2 * n), old, __ATOMIC_RELAXED);
    __atomic_store_n(jword(jn, 0), n + 1, __ATOMIC_RELEASE);
    shm_crash_point("journal.append");
    return 0;
}

/* The step before a journaled store of val over old: 1 when the store is
 * to be made now (the old value is recorded under `entry`), 0 when there
 * is nothing to store (the same value: only the ordering a sequentially
 * consistent store gives is kept) or the journal is full. */
static inline int
record(shm_journal *jn, uint64_t entry, uint64_t old, uint64_t val, int seq_cst)
{
    if (old == val) {
        if (seq_cst)
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        return 0;
    }
    return append(jn, entry, old) == 0;
}

void
shm_jset64(shm_journal *jn, uint64_t off, uint64_t val, int seq_cst)
{
    uint64_t *w = (uint64_t *)(jn->base + off);
    if (record(jn, off, __atomic_load_n(w, __ATOMIC_RELAXED), val, seq_cst))
        __atomic_store_n(w, val, seq_cst ? __ATOMIC_SEQ_CST : __ATOMIC_RELEASE);
}

void
shm_jset32(shm_journal *jn, uint64_t off, uint32_t val, int seq_cst)
{
    uint32_t *w = (uint32_t *)(jn->base + off);
    if (record(jn, off | SHM_JOURNAL_W32, __atomic_load_n(w, __ATOMIC_RELAXED), val, seq_cst))
        __atomic_store_n(w, val, seq_cst ? __ATOMIC_SEQ_CST : __ATOMIC_RELEASE);
}

void
shm_jkeep64(shm_journal *jn, uint64_t off)
{
    append(jn, off, __atomic_load_n((uint64_t *)(jn->base + off), __ATOMIC_RELAXED));
}

static int
bad_entry(shm_journal *jn, const char *fmt, unsigned long long a)
{
    char msg[160];
    snprintf(msg, sizeof msg, fmt, a);
    PyErr_Format(shm_state_of((PyObject *)jn->m)->CorruptError,
                 "%s is corrupt: its undo journal %s; no correct writer leaves this, so "
                 "copy out what you still need and recreate it (shmkit rm)",
                 jn->what ? jn->what : "shared object", msg);
    return -1;
}

/* Is an entry's word inside the declared range, aligned, and outside the
 * journal?  All in unsigned arithmetic: width <= hi is checked first. */
static int
entry_ok(shm_journal *jn, uint64_t off, uint64_t width)
{
    uint64_t jend = jn->j_off + SHM_JOURNAL_BYTES(jn->cap);
    return off % width == 0 && off >= jn->lo && jn->hi >= width &&
           off <= jn->hi - width && (off + width <= jn->j_off || off >= jend);
}

int
shm_journal_rollback(shm_journal *jn)
{
    uint64_t n = __atomic_load_n(jword(jn, 0), __ATOMIC_ACQUIRE);
    if (n > jn->cap)
        return bad_entry(jn, "claims %llu entries", (unsigned long long)n);
    /* Check every entry before undoing any: a bad one leaves all as found. */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t e = __atomic_load_n(jword(jn, 1 + 2 * i), __ATOMIC_RELAXED);
        uint64_t width = (e & SHM_JOURNAL_W32) ? 4 : 8;
        if (!entry_ok(jn, e & ~SHM_JOURNAL_W32, width))
            return bad_entry(jn, "names offset %llu",
                             (unsigned long long)(e & ~SHM_JOURNAL_W32));
    }
    for (uint64_t i = n; i-- > 0;) {
        uint64_t e = __atomic_load_n(jword(jn, 1 + 2 * i), __ATOMIC_RELAXED);
        uint64_t old = __atomic_load_n(jword(jn, 2 + 2 * i), __ATOMIC_RELAXED);
        uint64_t off = e & ~SHM_JOURNAL_W32;
        if (e & SHM_JOURNAL_W32)
            __atomic_store_n((uint32_t *)(jn->base + off), (uint32_t)old, __ATOMIC_RELEASE);
        else
            __atomic_store_n((uint64_t *)(jn->base + off), old, __ATOMIC_RELEASE);
    }
    __atomic_store_n(jword(jn, 0), 0, __ATOMIC_RELEASE);
    jn->overflow = 0;
    return 0;
}

int
shm_journal_commit(shm_journal *jn)
{
    if (jn->overflow) {
        if (shm_journal_rollback(jn) == 0)
            PyErr_Format(PyExc_RuntimeError, "an operation on %s outgrew its undo journal "
                         "(%u entries) and was undone", jn->what ? jn->what : "a shared "
                         "object", jn->cap);
        return -1;
    }
    shm_crash_point("journal.commit");
    __atomic_store_n(jword(jn, 0), 0, __ATOMIC_RELEASE);
    shm_crash_point("journal.committed");
    return 0;
}
