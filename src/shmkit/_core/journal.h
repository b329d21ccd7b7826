/* journal.h - the core's one undo journal, and its crash points.
 *
 * Every structure that changes several shared words under a robust lock
 * (the heap, the store's table, the ring's counters, the sync primitives)
 * makes each change through this journal: the old value is appended to the
 * journal (the entry first, then the count, with a release store), and only
 * then is the word changed.  A finished operation commits by zeroing the
 * count.  Whoever next takes the lock and finds a non-empty journal, or
 * takes the lock from a dead holder, rolls it back newest first, so an
 * operation killed at any instruction either happened or did not.
 *
 * Shared layout of a journal with room for `cap` entries (16 + 16 * cap
 * bytes, 8-aligned, inside the structure it protects):
 *
 *      0  u64 count                 entries in force (0: nothing to undo)
 *      8  u64 off[0] | W32          offset of the word from the structure's
 *                                   start; bit 63 set for a u32 word
 *     16  u64 old[0]                its value before the change
 *     ...
 *
 * Offsets come from shared memory, so a rollback checks each against the
 * range the structure declared ([lo, hi), naturally aligned, never inside
 * the journal itself) before it stores anything: a hostile journal yields
 * CorruptError, never a wild store.
 *
 * Crash points.  shm_crash_point("name") is a no-op until a test arms it
 * with _core.fault(n, prefix): the n-th crash point whose name starts with
 * prefix then SIGKILLs the process (or SIGSTOPs it, with stop=True).  Every journaled store and every commit
 * is one; structures add their own at each step boundary that matters.
 */
#ifndef SHMKIT_JOURNAL_H
#define SHMKIT_JOURNAL_H

#include "shmkit.h"

#define SHM_JOURNAL_BYTES(cap) (16u + 16u * (uint64_t)(cap))
#define SHM_JOURNAL_W32 (1ull << 63)

typedef struct {
    MappingObject *m;   /* the mapping base lies in (names the module's errors) */
    char *base;         /* the structure's start: entry offsets are from here */
    uint64_t j_off;     /* the journal's own offset from base */
    uint32_t cap;       /* entries it has room for */
    uint64_t lo, hi;    /* a word named by an entry lies within [lo, hi) */
    const char *what;   /* for error messages: "heap 'x'", "semaphore 'y'" */
    int overflow;       /* an operation outgrew the journal: refuse to commit */
} shm_journal;

/* Describe a journal; writes nothing to shared memory. */
void shm_journal_bind(shm_journal *jn, MappingObject *m, char *base, uint64_t j_off,
                      uint32_t cap, uint64_t lo, uint64_t hi, const char *what);
/* Zero a new journal (the creator, before publishing the structure). */
void shm_journal_format(shm_journal *jn);

/* Entries in force; anything above cap is reported as corrupt by rollback. */
static inline uint64_t
shm_journal_pending(const shm_journal *jn)
{
    return __atomic_load_n((uint64_t *)(jn->base + jn->j_off), __ATOMIC_ACQUIRE);
}

/* Record the old value, then store (release; sequentially consistent when
 * seq_cst is set).  Storing a value equal to the current one records
 * nothing.  On overflow nothing is stored and commit will fail. */
void shm_jset64(shm_journal *jn, uint64_t off, uint64_t val, int seq_cst);
void shm_jset32(shm_journal *jn, uint64_t off, uint32_t val, int seq_cst);
static inline void
shm_jadd64(shm_journal *jn, uint64_t off, int64_t delta)
{
    uint64_t *w = (uint64_t *)(jn->base + off);
    shm_jset64(jn, off, __atomic_load_n(w, __ATOMIC_RELAXED) + (uint64_t)delta, 0);
}
static inline void
shm_jadd32(shm_journal *jn, uint64_t off, int32_t delta)
{
    uint32_t *w = (uint32_t *)(jn->base + off);
    shm_jset32(jn, off, __atomic_load_n(w, __ATOMIC_RELAXED) + (uint32_t)delta, 0);
}
/* Record the u64 at off as it is now, so a rollback restores it after
 * something other than shm_jset (a copy, a memset) overwrites it. */
void shm_jkeep64(shm_journal *jn, uint64_t off);

/* Undo every entry, newest first, and empty the journal.  Returns 0, or -1
 * with CorruptError set when an entry is impossible (nothing is stored past
 * the first bad entry; the journal is left as found). */
int shm_journal_rollback(shm_journal *jn);
/* Make the operation's changes final.  Returns 0, or -1 with RuntimeError
 * after rolling back when the operation outgrew the journal. */
int shm_journal_commit(shm_journal *jn);

/* ---- crash points (crash.c) ---- */
extern long shm_fault_countdown;
void shm_crash_hit(const char *name);
static inline void
shm_crash_point(const char *name)
{
    if (__builtin_expect(shm_fault_countdown != 0, 0))
        shm_crash_hit(name);
}

/* ---- the robust lock with repair (lock.c) ----
 * Take the lock at word.  When the previous holder died, or left a journal
 * in force, roll the journal back (if jn) and then call repair(ctx, died)
 * (if not NULL) for what the journal cannot express, all before returning.
 * Returns 1 acquired, 2 acquired and repaired after a dead holder, 0 on
 * timeout, -1 with an exception set (the lock is then not held). */
typedef int (*shm_repair_fn)(void *ctx, int owner_died);
int shm_lock_acquire_repair(MappingObject *m, uint32_t *word, int64_t deadline,
                            shm_journal *jn, shm_repair_fn repair, void *ctx);
/* Release; a journal still in force (an operation that failed half way)
 * is rolled back first, so no error path publishes a half-made change.
 * Keeps any exception already set. */
void shm_lock_release_journal(MappingObject *m, uint32_t *word, shm_journal *jn);

#endif
