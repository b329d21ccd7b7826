/* table.c - the Store's hash table in shared memory: the protocol.
 *
 * Key hashing, the lock-free lookup, crash-safe insert/update/delete, the
 * batch journal, recovery, verification, compaction and the space
 * allocator underneath.  This file holds no Python objects and calls no
 * Python API: it works on a TCore (table.h) and reports errors with
 * shm_fail() as a code and a message.  Its Python type, tabletype.c, parses
 * arguments, encodes and decodes values, takes the writers' lock and runs
 * the readers' wait (both release the GIL), and turns those records into
 * exceptions.  Python (store.py) adds growth of the segment, numpy/pickle
 * encoding, iteration and the public API.
 *
 * The shared layout, its constants and the _Static_asserts pinning every
 * field offset are in table.h, with the declarations both halves share.
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
#include "layout.h"
#include "wait.h"
#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdlib.h>


/* ---- hashing --------------------------------------------------------------
 * A compact 64-bit hash in the style of wyhash (public domain): 128-bit
 * multiply-fold mixing, overlapping reads for short keys.  Seeded per store,
 * so colliding keys cannot be precomputed. */
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

uint64_t
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

/* Damage found in shared memory (the type adds what to do about it). */
#define corrupt(...) shm_fail(TE_CORRUPT, __VA_ARGS__)

/* Pick up growth made by other processes: the segment header's size word,
 * checked against the file, as Segment._sync_size does. */
int
t_sync(TCore *t)
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
uint64_t
t_enter(TCore *t)
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


/* ---- reading records ------------------------------------------------------- */

/* The wait for an even epoch: ready once it is even, or once nobody alive
 * is publishing. */
int
t_even_ready(void *ctx, uint32_t *sleep_on)
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
int
t_even_check(void *ctx)
{
    TEvenWait *w = ctx;
    uint64_t v = LDA(&w->h->epoch);
    uint32_t owner = LDA(&w->h->lock) & SHM_TOKEN_MASK;
    if (LDA(&w->h->epoch) == v && (v & 1) &&
        (owner == 0 || !shm_token_alive(w->t->m, owner)))
        w->dead = 1;
    return 0;
}

/* ---- the lock-free lookup -------------------------------------------------- */

/* Probe for k without the lock.  Sets *off and *rec on P_FOUND. */
int
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
    h->bin_hint[b >> 6] |= 1ull << (b & 63);
}

/* The first bin from b on whose hint bit is set, or NBINS or more. */
static inline int
bin_next(const THeader *h, int b)
{
    while (b < NBINS) {
        uint64_t w = h->bin_hint[b >> 6] & (~0ull << (b & 63));
        if (w)
            return (b & ~63) + __builtin_ctzll(w);
        b = (b & ~63) + 64;
    }
    return NBINS;
}

/* Set the hint bit of every list that holds blocks; 1 if one was missing
 * (lists filled by an older writer, or a hint written wrong). */
static int
bins_rehint(THeader *h)
{
    uint64_t hint[2] = {0, 0};
    for (int b = 0; b < NBINS; b++)
        if (h->bins[b] != 0)
            hint[b >> 6] |= 1ull << (b & 63);
    int missing = (hint[0] & ~h->bin_hint[0]) != 0 || (hint[1] & ~h->bin_hint[1]) != 0;
    h->bin_hint[0] = hint[0];
    h->bin_hint[1] = hint[1];
    return missing;
}

/* Empty every free list (a recycle or a compaction rebuilds them). */
static inline void
bins_clear(THeader *h)
{
    memset(h->bins, 0, sizeof h->bins);
    memset(h->bin_hint, 0, sizeof h->bin_hint);
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
t_alloc(TCore *t, uint64_t size, unsigned flags)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t bsize;
    for (int b = bin_next(h, bin_of(size)); b < NBINS; b = bin_next(h, b + 1)) {
        if (h->bins[b] == 0) { /* a stale hint */
            h->bin_hint[b >> 6] &= ~(1ull << (b & 63));
            continue;
        }
        uint64_t *prev = &h->bins[b];
        for (int scan = 0; *prev && scan < 8; scan++) {
            uint64_t off = *prev;
            if (!free_ok(P, t->end, off, &bsize) || bin_of(bsize) != b) {
                h->state |= ST_DIRTY;
                corrupt("free list %d holds a bad block at %llu", b, (unsigned long long)off);
                return (uint64_t)-1;
            }
            if (bsize == size || bsize >= size + T_MIN_BLOCK) {
                uint64_t next = LDR(W64(P, off + 8));
                *prev = next;
                shm_crash_point("table.alloc.unlinked");
                /* The next put from this list reads the new head's link
                 * and writes its record there: start fetching it now. */
                if (prev == &h->bins[b] && next < t->end)
                    __builtin_prefetch(P + next, 1);
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
 * recycle, because lagging readers may still be copying them.  The offset
 * comes from an index word in shared memory: one that damage made point
 * outside the heap, or at a block whose size overruns it, is not followed
 * (nothing is stored) and is reported as CorruptError (-1). */
int
t_free(TCore *t, uint64_t off)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t->end;
    if (off < T_HEADER || (off & 15) || end < 16 || off > end - 16)
        return corrupt("a block to free at offset %llu lies outside the heap (%llu bytes)",
                       (unsigned long long)off, (unsigned long long)end);
    uint64_t head = LDR(W64(P, off)), size = head & ~(uint64_t)B_FLAGS;
    if (size < 16 || size > end - off)
        return corrupt("the block at offset %llu claims %llu bytes, beyond the heap's end "
                       "(%llu)", (unsigned long long)off, (unsigned long long)size,
                       (unsigned long long)end);
    STR(W64(P, off), size);
    shm_crash_point("table.free.marked");
    h->pending += size;
    if (!(head & (B_INDEX | B_JOURNAL)))
        STR(&h->used, LDR(&h->used) - size);
    shm_crash_point("table.free.counted");
    return 0;
}

/* Free a block that no reader can have seen (a batch's journal: readers
 * never read it) straight onto its free list instead of leaving it pending,
 * so the next batch's journal reuses memory that is still in cache.  A
 * later recycle merges it with its neighbours as usual. */
static int
t_free_unseen(TCore *t, uint64_t off)
{
    if (t_free(t, off) < 0)
        return -1;
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t size = LDR(W64(P, off)); /* t_free checked it and left it flagless */
    h->pending -= size;
    bin_push(P, h, off, size);
    shm_crash_point("table.free.binned");
    return 0;
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
view_slots(TCore *t)
{
    uint32_t n = t->m->max_slots;
    return n < T_VIEW_SLOTS ? n : T_VIEW_SLOTS;
}

/* 1 if some live attachment holds a view (lock held). */
static int
t_views_busy(TCore *t)
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
t_park(TCore *t)
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
    bins_clear(h);
    h->top = 0;
    h->pending = free_bytes;
    return 1;
}

/* How far ahead of the recycle's walk the chain is fetched. */
#define RECYCLE_AHEAD 2048

/* Make pending space reusable: bump the epoch, then walk the chain,
 * merging runs of free blocks and rebuilding the free lists.  Returns 0, or
 * 1 when deferred because a live attachment holds views (with `trusted`,
 * the free lists are left as they are; otherwise they are parked), or -1. */
static int
t_recycle_ex(TCore *t, int trusted)
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
    bins_clear(h);
    h->top = 0;
    shm_crash_point("table.recycle.emptied");
    /* Each header's address depends on the header before it: fetch the
     * lines RECYCLE_AHEAD bytes ahead so the walk does not wait on each. */
    uint64_t fetched = off;
    while (off < end) {
        if (fetched < off)
            fetched = off; /* a long free block was stepped over */
        for (; fetched < end && fetched - off < RECYCLE_AHEAD; fetched += 64)
            __builtin_prefetch(P + fetched);
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
t_recycle(TCore *t)
{
    return t_recycle_ex(t, 1);
}

/* Extend the heap to the segment's (grown) size.  Crash-safe: the new
 * block's header is written beyond heap_end first, then heap_end moves,
 * then the old top absorbs it. */
static int
t_extend(TCore *t)
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
t_alloc_grow(TCore *t, uint64_t size, unsigned flags)
{
    int recycled = 0, rehinted = 0;
    for (int tries = 0; tries < 64; tries++) {
        uint64_t off = t_alloc(t, size, flags);
        if (off != 0)
            return off;
        THeader *h = HDR(t);
        if (!rehinted) { /* before recycling or growing, trust no hint */
            rehinted = 1;
            if (bins_rehint(h))
                continue;
        }
        if (!recycled && h->pending >= size) {
            recycled = 1;
            if (t_recycle(t) < 0)
                return (uint64_t)-1;
            continue;
        }
        /* Room the segment has and the heap never took (the segment grew,
         * and a Ctrl-C then ended the hook before the extension below):
         * taken first, or each such growth would double the segment again,
         * and one at max_size would leave the store "full" half empty. */
        uint64_t end = t->end;
        if (t_extend(t) < 0)
            return (uint64_t)-1;
        if (t->end > end)
            continue;
        if (t->grow == NULL) {
            shm_fail(TE_FULL, "the store is full");
            return (uint64_t)-1;
        }
        if (t->grow(t, size + T_MIN_BLOCK) < 0) {
            shm_err.code = TE_RAISED;
            return (uint64_t)-1;
        }
        if (t_live(t) < 0 || t_extend(t) < 0)
            return (uint64_t)-1;
    }
    shm_fail(TE_FULL, "the store could not grow enough");
    return (uint64_t)-1;
}

/* ---- the index (lock held) ------------------------------------------------- */

int
t_index(TCore *t, TIndex *x)
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

static inline size_t
ov_home(uint64_t slot, size_t cap)
{
    return (size_t)((slot * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static inline OvEntry *
ov_find(Overlay *o, uint64_t slot)
{
    if (o->n == 0)
        return NULL;
    for (size_t mask = o->cap - 1, i = ov_home(slot, o->cap);; i = (i + 1) & mask) {
        uint32_t p = o->pos[i];
        if (p == 0)
            return NULL;
        if (o->e[p - 1].slot == slot)
            return &o->e[p - 1];
    }
}

/* Every overlay slot lies inside index x: a smaller index under an open
 * batch is damage, reported before any of its words is followed.  0, or
 * -1 (CorruptError). */
int
ov_fits(const Overlay *o, const TIndex *x)
{
    for (size_t j = 0; j < o->n; j++)
        if (o->e[j].slot >= x->nslots)
            return corrupt("a batch's slot %llu lies beyond the index's %llu slots",
                           (unsigned long long)o->e[j].slot,
                           (unsigned long long)x->nslots);
    return 0;
}

/* Make room for `want` entries, the table at half load at most. */
static int
ov_reserve(Overlay *o, size_t want)
{
    if (want * 2 <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 64;
    while (cap < want * 2)
        cap *= 2;
    if (cap / 2 > UINT32_MAX - 1)
        return shm_fail(TE_NOMEM, "a batch cannot change more than 2**31 index words");
    OvEntry *e = realloc(o->e, cap / 2 * sizeof *e);
    if (e == NULL)
        return shm_fail(TE_NOMEM, "no memory for the batch's index words");
    o->e = e;
    uint32_t *pos = calloc(cap, sizeof *pos);
    if (pos == NULL)
        return shm_fail(TE_NOMEM, "no memory for the batch's index words");
    for (size_t j = 0; j < o->n; j++) {
        size_t i = ov_home(e[j].slot, cap);
        while (pos[i])
            i = (i + 1) & (cap - 1);
        pos[i] = (uint32_t)j + 1;
    }
    free(o->pos);
    o->pos = pos;
    o->cap = cap;
    return 0;
}

/* Add an entry for a slot the overlay does not hold yet. */
static int
ov_add(Overlay *o, uint64_t slot, uint64_t word)
{
    if (ov_reserve(o, o->n + 1) < 0)
        return -1;
    size_t i = ov_home(slot, o->cap);
    while (o->pos[i])
        i = (i + 1) & (o->cap - 1);
    o->e[o->n] = (OvEntry){slot, word};
    o->pos[i] = (uint32_t)++o->n;
    return 0;
}

static int
ov_set(Overlay *o, uint64_t slot, uint64_t word)
{
    OvEntry *e = ov_find(o, slot);
    if (e) {
        e->word = word;
        return 0;
    }
    return ov_add(o, slot, word);
}

void
ov_clear(Overlay *o)
{
    free(o->e);
    free(o->pos);
    o->e = NULL;
    o->pos = NULL;
    o->cap = o->n = 0;
    o->newslots = 0;
}

/* The word at slot i as this writer sees it (its batch's words first). */
uint64_t
wword(TCore *t, TIndex *x, uint64_t i, int *from_ov)
{
    OvEntry *e = t->ov.n ? ov_find(&t->ov, i) : NULL;
    *from_ov = e != NULL;
    return e ? e->word : LDR(&x->slots[i]);
}

/* Probe under the lock.  P_FOUND: *slot holds the key, *word its word.
 * P_ABSENT: *slot is where to insert it.  -1: CorruptError. */
int
probe_w(TCore *t, TIndex *x, const TKey *k, uint64_t *slot, uint64_t *word,
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
 * unpublished words are carried over to their places in the new index
 * (see below).  With `at`, the new index goes at that offset (vacuum puts
 * it at the lowest free offset that fits); otherwise anywhere. */
static int
t_rebuild(TCore *t, uint64_t nslots, uint64_t at)
{
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    uint64_t bytes = (T_INDEX_HDR + 8 * nslots + 15) & ~(uint64_t)15;
    uint64_t nix = at ? at : t_alloc_grow(t, bytes, B_INDEX);
    if (nix == (uint64_t)-1)
        return -1;
    if (t_index(t, &x) < 0) /* the grow callback ran: read it again */
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
        /* Carry the batch's words over by what they mean, not by slot: a
         * word over a published record stays where that record now lies
         * when it is the same key's; any other record in the batch (a new
         * key, or another key put where the batch deleted one) gets a place
         * of its own in the new index, by its own hash. */
        Overlay old = t->ov, nov = {0};
        const char *bad = NULL;
        int nomem = 0;
        if (ov_fits(&old, &x) < 0)
            return -1;
        for (size_t j = 0; j < old.n; j++) {
            uint64_t s = old.e[j].slot, w = old.e[j].word, ns_i;
            uint64_t pub = LDR(&x.slots[s]);
            TRec r, rw;
            if (w > W_TOMB && rec_read(P, end, word_off(w), &rw) < 0) {
                bad = "bad batch record during index rebuild";
                break;
            }
            if (pub > W_TOMB) {
                if (rec_read(P, end, word_off(pub), &r) < 0) {
                    bad = "bad record during index rebuild";
                    break;
                }
                uint64_t probes = 0;
                ns_i = r.hash & mask;
                while (ns[ns_i] != pub && ++probes <= nslots)
                    ns_i = (ns_i + 1) & mask;
                if (ns[ns_i] != pub) {
                    bad = "a batch word lost its record during index rebuild";
                    break;
                }
                int same = w > W_TOMB && rw.hash == r.hash; /* same hash: same run */
                if (ov_set(&nov, ns_i, same ? w : W_TOMB) < 0) {
                    nomem = 1;
                    break;
                }
                if (same || w <= W_TOMB)
                    continue;
            } else if (w <= W_TOMB) {
                continue; /* a batch insert, deleted again in the batch */
            }
            ns_i = place(ns, mask, rw.hash, &nov);
            if (ns_i == UINT64_MAX) {
                bad = "more records than the index can hold";
                break;
            }
            if (ov_set(&nov, ns_i, w) < 0) {
                nomem = 1;
                break;
            }
            nov.newslots++;
        }
        if (bad || nomem) {
            ov_clear(&nov);
            return bad ? corrupt("%s", bad) : -1;
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

/* Room in index x for one more word at 3/4 load at most.  (A sum past the
 * index is no room, whatever damage made the counters say.) */
static inline int
index_has_room(TCore *t, const TIndex *x)
{
    THeader *h = HDR(t);
    uint64_t words = LDR(&h->count) + LDR(&h->tombstones) + t->ov.newslots;
    return words < x->nslots && (words + 1) * 4 <= x->nslots * 3;
}

/* Grow (or clean) the index before one more insertion if it would pass 3/4. */
static int
t_reserve(TCore *t)
{
    TIndex x;
    THeader *h = HDR(t);
    if (t_index(t, &x) < 0 || counts_ok(h, x.nslots) < 0)
        return -1;
    if (index_has_room(t, &x))
        return 0;
    /* The new index holds every published record and every key the open
     * batch puts into an empty word (newslots) or a tombstone.  A key put
     * where the batch deleted another is not counted: the deleted record
     * stays published until the commit, so the new index may fill sooner,
     * and grows again then. */
    uint64_t live = LDR(&h->count);
    for (size_t j = 0; j < t->ov.n; j++) {
        const OvEntry *e = &t->ov.e[j];
        live += e->word > W_TOMB && (e->slot >= x.nslots || LDR(&x.slots[e->slot]) <= W_TOMB);
    }
    uint64_t n = T_MIN_SLOTS;
    while (n < (live + 1) * 2)
        n *= 2;
    return t_rebuild(t, n, 0);
}

static int
t_maybe_recycle(TCore *t)
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

/* ---- the walk recovery and verification share --------------------------------
 * t_walk() is the one walk of the index and the block chain, which
 * t_recover() and t_verify() both call.  t_walk_index() reads every index
 * word once: it counts tombstones, marks the block each record word names
 * (one bit per 16-byte offset; the block must lie in the heap and be named
 * once) and hands each record word to visit.  t_walk_chain() then walks the
 * block chain from the heap start, checking each block's size, and tells
 * each block apart: the index, a record the index named, a used block
 * nothing names, a free block; every mark must be met at a block start.
 * Between the two, `counted` sees the counts (verification checks them
 * there).  All return 0, or -1 with an error recorded (shm_fail); the marks
 * are freed by the chain walk or on error. */

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
    mk->bm = calloc((size_t)(end >> 7) + 1, 1);
    if (mk->bm == NULL)
        return shm_fail(TE_NOMEM, "no memory for the index walk's marks");
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
    free(mk->bm);
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
    free(mk->bm);
    mk->bm = NULL;
    return r;
}

typedef int (*t_counted_fn)(void *ctx, const TMarks *mk);

static int
t_walk(const char *P, uint64_t end, const TIndex *x, TMarks *mk, t_word_fn word,
       t_counted_fn counted, t_block_fn block, void *ctx)
{
    if (t_walk_index(end, x, mk, word, ctx) < 0)
        return -1;
    if (counted != NULL && counted(ctx, mk) < 0) {
        free(mk->bm);
        mk->bm = NULL;
        return -1;
    }
    return t_walk_chain(P, end, x->ix, mk, block, ctx);
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

int
t_recover(TCore *t)
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
    if (t_walk(P, end, &x, &mk, NULL, NULL, recover_block, &rw) < 0)
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
int
view_hold(TCore *t)
{
    uint32_t token = t->m->token, slot = SHM_TOKEN_SLOT(token), gen = SHM_TOKEN_GEN(token);
    if (t->readonly)
        return shm_fail(TE_READONLY,
                      "view() counts itself in the store's header, which a "
                      "readonly=True handle cannot write; use get_into() or get(), "
                      "or open the store writable");
    if (token == 0) /* detached by a close in another thread, still mapped for its pins */
        return shm_fail(TE_CLOSED, "the store is closed in this process; open it again");
    if (slot >= view_slots(t))
        return shm_fail(TE_VALUE,
                      "view() is available to the first %u attachments of a store and "
                      "this process holds attach slot %u; use get_into() or get()",
                      (unsigned)T_VIEW_SLOTS, (unsigned)slot);
    uint32_t *w = &HDR(t)->views[slot], old = __atomic_load_n(w, __ATOMIC_RELAXED), nw;
    do {
        if ((old >> T_VIEW_BITS) != gen)
            nw = (gen << T_VIEW_BITS) | 1; /* a dead predecessor's count */
        else if ((old & T_VIEW_MAX) == T_VIEW_MAX)
            return shm_fail(TE_VALUE,
                          "this process already holds %u views of the store, the most "
                          "it can; release some first", (unsigned)T_VIEW_MAX);
        else
            nw = old + 1;
    } while (!__atomic_compare_exchange_n(w, &old, nw, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the count, then the epoch */
    return 0;
}

void
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

/* ---- verification, statistics, vacuum --------------------------------------- */

#define VFAIL(...) return corrupt(__VA_ARGS__)

typedef struct {
    TCore *t;
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

/* Between the walks: the header's counts against the index's. */
static int
verify_counts(void *ctx, const TMarks *mk)
{
    TVerifyWalk *vw = ctx;
    THeader *h = HDR(vw->t);
    uint64_t count = mk->count, tombs = mk->tombs;
    if (count != LDR(&h->count))
        VFAIL("count says %llu keys, the index holds %llu",
              (unsigned long long)LDR(&h->count), (unsigned long long)count);
    if (tombs != LDR(&h->tombstones))
        VFAIL("tombstone count says %llu, the index holds %llu",
              (unsigned long long)LDR(&h->tombstones), (unsigned long long)tombs);
    if ((count + tombs) * 4 > vw->x->nslots * 3)
        VFAIL("the index is over-full (%llu of %llu words)",
              (unsigned long long)(count + tombs), (unsigned long long)vw->x->nslots);
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

int
t_verify(TCore *t, TWalk *out)
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
    if (t_walk(P, end, &x, &mk, verify_word, verify_counts, verify_block, &vw) < 0)
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
t_compact(TCore *t, uint64_t index_slots, uint64_t *moved)
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
    Extent *fx = calloc(nfree + 1, sizeof *fx);
    uint64_t *ux = calloc(nused + 1, sizeof *ux);
    if (fx == NULL || ux == NULL) {
        free(fx);
        free(ux);
        return shm_fail(TE_NOMEM, "no memory to plan the compaction");
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
    bins_clear(h);
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
    free(fx);
    free(ux);
    return err ? -1 : 0;
}
/* ---- after the lock is taken ------------------------------------------------- */

/* Check the heap bound again now that no writer can move it (writers use
 * t->end from here on).  A writer's death was repaired by the lock; damage
 * marked by a live writer, or a batch it left half applied, is repaired
 * here the same way.  0, or -1. */
int
t_locked_check(TCore *t)
{
    THeader *h = HDR(t);
    if ((t->end = t_enter(t)) == 0)
        return -1;
    if (((LDR(&h->state) & (ST_COMMIT | ST_DIRTY)) || (LDR(&h->epoch) & 1)) &&
        t_recover(t) < 0)
        return -1;
    return 0;
}

/* Lock held, damage found: have the next writer run t_recover(), which
 * rebuilds everything derived (free lists, counters) from the index and
 * reports what it cannot repair. */
void
t_mark_dirty(TCore *t)
{
    if (t->m != NULL && t->m->base != NULL)
        HDR(t)->state |= ST_DIRTY;
}

/* ---- put and delete (lock held) ------------------------------------------------
 * A put is three steps, so that the type can encode the value between them:
 * t_put_find (room in the index, where the key goes), t_put_write (a new
 * record with the key; the caller writes the value's bytes), t_put_publish
 * (one release store of its index word, or into the open batch). */

int
t_put_find(TCore *t, const TKey *k, TSlot *s)
{
    TIndex x;
    if (t_batch_resolve(t) < 0 || t_maybe_recycle(t) < 0 || t_reserve(t) < 0 ||
        t_index(t, &x) < 0)
        return -1;
    return probe_w(t, &x, k, &s->slot, &s->old, &s->from_ov);
}

/* A record for key k with room for vlen value bytes at *value.  Returns its
 * offset, or (uint64_t)-1. */
uint64_t
t_put_write(TCore *t, const TKey *k, uint8_t vtype, uint64_t vlen, char **value)
{
    uint64_t size = (T_REC_HDR + (uint64_t)k->n + vlen + 15) & ~(uint64_t)15;
    uint64_t off = t_alloc_grow(t, size, 0);
    if (off == (uint64_t)-1)
        return off;
    shm_crash_point("table.put.allocated");
    char *P = PAY(t), *b = P + off;
    THeader *h = HDR(t);
    STR(&h->used, LDR(&h->used) + (LDR(W64(P, off)) & ~(uint64_t)B_FLAGS));
    STR((uint64_t *)(b + 16), k->h);
    STR((uint32_t *)(b + 24), (uint32_t)k->n);
    b[28] = (char)k->type;
    b[29] = (char)vtype;
    b[30] = b[31] = 0;
    STR((uint64_t *)(b + 32), vlen);
    memcpy(b + T_REC_HDR, k->p, (size_t)k->n);
    *value = b + T_REC_HDR + k->n;
    return off;
}

/* Put word w where probe_w found its key, in the open batch's words. */
static int
ov_put_found(TCore *t, const TIndex *x, const TSlot *s, uint64_t w)
{
    int fresh = !s->from_ov && LDR(&x->slots[s->slot]) == W_EMPTY;
    /* probe_w saw whether the overlay holds the slot: look it up only then */
    if ((s->from_ov ? ov_set(&t->ov, s->slot, w) : ov_add(&t->ov, s->slot, w)) < 0)
        return -1;
    t->ov.newslots += fresh;
    if (s->from_ov && s->old > W_TOMB)
        t_free(t, word_off(s->old)); /* this batch's own, never published */
    return 0;
}

int
t_put_publish(TCore *t, const TSlot *s, uint64_t off, uint64_t hash)
{
    TIndex x;
    if (t_index(t, &x) < 0) { /* the grow callback may have run: the index is the same */
        t_free(t, off);
        return -1;
    }
    THeader *h = HDR(t);
    uint64_t w = rec_word(off, hash), old = s->old;
    shm_crash_point("table.put.written");
    if (t_in_batch(t)) {
        if (ov_put_found(t, &x, s, w) < 0) {
            t_free(t, off);
            return -1;
        }
    } else {
        STA(&x.slots[s->slot], w); /* publish */
        shm_crash_point(old > W_TOMB ? "table.update.published" : "table.put.published");
        if (old > W_TOMB) {
            if (t_free(t, word_off(old)) < 0)
                return -1; /* stored; the word it replaced was damaged */
            shm_crash_point("table.update.freed");
        } else {
            if (old == W_TOMB)
                STR(&h->tombstones, LDR(&h->tombstones) - 1);
            shm_crash_point("table.put.tombstones");
            STR(&h->count, LDR(&h->count) + 1);
            shm_crash_point("table.put.counted");
        }
    }
    return 0;
}

int
t_delete_find(TCore *t, const TKey *k, TSlot *s)
{
    TIndex x;
    if (t_batch_resolve(t) < 0 || t_index(t, &x) < 0)
        return -1;
    return probe_w(t, &x, k, &s->slot, &s->old, &s->from_ov);
}

/* Replace the key's word (found by t_delete_find) by a tombstone. */
int
t_delete_publish(TCore *t, const TSlot *s)
{
    TIndex x;
    if (t_index(t, &x) < 0) /* a hook ran Python code */
        return -1;
    THeader *h = HDR(t);
    if (t_in_batch(t)) {
        if (ov_set(&t->ov, s->slot, W_TOMB) < 0)
            return -1;
        if (s->from_ov)
            t_free(t, word_off(s->old));
    } else {
        STA(&x.slots[s->slot], (uint64_t)W_TOMB);
        shm_crash_point("table.delete.published");
        int bad = t_free(t, word_off(s->old));
        shm_crash_point("table.delete.freed");
        STR(&h->count, LDR(&h->count) - 1);
        shm_crash_point("table.delete.counted");
        STR(&h->tombstones, LDR(&h->tombstones) + 1);
        shm_crash_point("table.delete.tombstones");
        if (bad < 0)
            return -1; /* deleted; the record it named was damaged */
    }
    return 0;
}

/* ---- batches (lock held) -------------------------------------------------------- */

/* Staged puts probed together at most: bounds the private memory of a long
 * batch, and a chunk this long already keeps the prefetches ahead. */
#define STAGE_MAX 4096
/* How far ahead of its probe a staged put's index word is prefetched; its
 * record is prefetched half as far ahead, once that word is in cache. */
#define PROBE_AHEAD 16
void
staged_clear(StagedPuts *sp)
{
    free(sp->e);
    sp->e = NULL;
    sp->n = sp->cap = 0;
}

/* Room for one more staged put (before its record is written, so that a
 * failure leaves nothing to undo); resolves the staged ones when full. */
int
t_stage_room(TCore *t)
{
    StagedPuts *sp = &t->staged;
    if (sp->n >= STAGE_MAX && t_batch_resolve(t) < 0)
        return -1;
    if (t_maybe_recycle(t) < 0)
        return -1;
    if (sp->n < sp->cap)
        return 0;
    size_t cap = sp->cap ? sp->cap * 2 : 256;
    Staged *e = realloc(sp->e, cap * sizeof *e);
    if (e == NULL)
        return shm_fail(TE_NOMEM, "no memory for the batch's puts");
    sp->e = e;
    sp->cap = cap;
    return 0;
}

/* Stage a put whose record (key k) was written at off; t_stage_room first.
 * Should the room be gone (nothing may stage in between), the record is
 * freed and -1 returned. */
int
t_stage(TCore *t, uint64_t off, const TKey *k)
{
    if (t->staged.n >= t->staged.cap) {
        t_free(t, off);
        return shm_fail(TE_RUNTIME, "a put was staged between another's room and its entry");
    }
    Staged *e = &t->staged.e[t->staged.n++];
    e->off = off;
    e->hash = k->h;
    e->klen = (uint32_t)k->n;
    e->ktype = k->type;
    return 0;
}

/* Probe the index for every staged put, in order, and set their words in
 * the batch's overlay, as t_put_find and t_put_publish would have one by
 * one.  Each probe's index word is prefetched PROBE_AHEAD puts ahead, and
 * the record it names half as far, so that the misses overlap.  On an
 * error the puts not yet in the overlay stay staged (discarding the batch
 * frees them).  0, or -1. */
int
t_batch_resolve(TCore *t)
{
    StagedPuts *sp = &t->staged;
    size_t n = sp->n, i = 0;
    if (n == 0)
        return 0;
    int r = ov_reserve(&t->ov, t->ov.n + n);
    char *P = PAY(t);
    TIndex x;
    if (r == 0 && (t_reserve(t) < 0 || t_index(t, &x) < 0))
        r = -1;
    for (; r == 0 && i < n; i++) {
        /* t_reserve's own test first: it reloads the index only to grow it */
        if (!index_has_room(t, &x) && (t_reserve(t) < 0 || t_index(t, &x) < 0)) {
            r = -1;
            break;
        }
        uint64_t end = t->end;
        if (i + PROBE_AHEAD < n)
            __builtin_prefetch(&x.slots[sp->e[i + PROBE_AHEAD].hash & x.mask]);
        if (i + PROBE_AHEAD / 2 < n) {
            uint64_t h2 = sp->e[i + PROBE_AHEAD / 2].hash;
            uint64_t w = LDR(&x.slots[h2 & x.mask]);
            if (w > W_TOMB && (w >> 40) == W_TAG(h2) && word_off(w) < end)
                __builtin_prefetch(P + word_off(w));
        }
        const Staged *e = &sp->e[i];
        TKey k = {.p = P + e->off + T_REC_HDR, .n = e->klen, .type = e->ktype, .h = e->hash};
        TSlot s;
        if (probe_w(t, &x, &k, &s.slot, &s.old, &s.from_ov) < 0 ||
            ov_put_found(t, &x, &s, rec_word(e->off, e->hash)) < 0) {
            r = -1;
            break;
        }
    }
    if (sp->n != n) /* let go meanwhile: a child forked in the grow hook holds none of it */
        return r;
    sp->n = n - i;
    memmove(sp->e, sp->e + i, sp->n * sizeof *sp->e);
    return r;
}

/* Free what the open batch allocated and forget its words. */
void
t_batch_discard(TCore *t)
{
    for (size_t j = 0; j < t->ov.n; j++)
        if (t->ov.e[j].word > W_TOMB)
            t_free(t, word_off(t->ov.e[j].word));
    ov_clear(&t->ov);
    for (size_t j = 0; j < t->staged.n; j++)
        t_free(t, t->staged.e[j].off);
    t->staged.n = 0;
}

/* Publish the batch: write its words to a journal block, mark it
 * committing, make the epoch odd, store the words, make it even. */
int
t_batch_commit(TCore *t)
{
    Overlay *ov = &t->ov;
    if (t_batch_resolve(t) < 0)
        return -1;
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
    if (ov_fits(ov, &x) < 0) {
        t_free_unseen(t, j);
        return -1;
    }
    uint64_t *e = W64(P, j + T_JOURNAL_HDR);
    for (size_t k = 0; k < n; k++) {
        e[2 * k] = ov->e[k].slot;
        e[2 * k + 1] = ov->e[k].word;
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
    int bad = 0; /* a replaced word that damage made bad: finish, then report */
    /* The words come from the private overlay, not back from the journal,
     * which lies in shared memory where another process may damage it. */
    for (size_t k = 0; k < n; k++) {
        uint64_t s = ov->e[k].slot, w = ov->e[k].word, pub = LDR(&x.slots[s]);
        STR(&x.slots[s], w);
        shm_crash_point("table.batch.word");
        if (pub > W_TOMB && t_free(t, word_off(pub)) < 0)
            bad = 1;
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
    if (t_free_unseen(t, j) < 0)
        bad = 1;
    h->batches++;
    ov_clear(ov);
    return bad ? -1 : 0;
}

/* Remove every key: publish a fresh empty index, then free the old one and
 * every record it named (lock held, outside a batch). */
int
t_clear_locked(TCore *t)
{
    TIndex x;
    if (t_index(t, &x) < 0)
        return -1;
    uint64_t bytes = (T_INDEX_HDR + 8 * T_MIN_SLOTS + 15) & ~(uint64_t)15;
    uint64_t nix = t_alloc_grow(t, bytes, B_INDEX);
    if (nix == (uint64_t)-1 || t_index(t, &x) < 0)
        return -1;
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
    return 0;
}

/* ---- statistics, vacuum, format ------------------------------------------------- */

/* The header's counters and a walk of the free lists (bounded, so a looping
 * list cannot hang it; lock held when the handle is writable). */
void
t_stats(TCore *t, uint64_t end, TStats *s)
{
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
    *s = (TStats){
        .count = LDR(&h->count), .tombstones = LDR(&h->tombstones),
        .used = LDR(&h->used), .heap = end - T_HEADER, .free_bytes = listed,
        .free_blocks = nfree, .largest_free = largest, .pending = h->pending,
        .index_slots = nslots, .growths = h->growths, .index_growths = h->index_growths,
        .recycles = h->recycles, .recoveries = h->recoveries, .vacuums = h->vacuums,
        .batches = h->batches, .epoch = LDR(&h->epoch)};
}

/* Compact the heap and cut off its free tail (lock held, outside a batch).
 * Sets the new heap end and the records moved; the caller shrinks the
 * segment to that end before unlocking.  0, or -1 (the heap is then marked
 * for recovery). */
int
t_vacuum(TCore *t, uint64_t *new_end_out, uint64_t *moved)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    TIndex x;
    *moved = 0;
    *new_end_out = t->end;
    if (t_index(t, &x) < 0 || counts_ok(h, x.nslots) < 0)
        goto fail;
    uint64_t n = T_MIN_SLOTS, count = LDR(&h->count);
    while (n < count * 2)
        n *= 2;
    /* records down; the index into the lowest hole left; records into the
     * hole the old index leaves */
    if (t_views_busy(t)) /* views hold the records where they are */
        return 0;
    /* a recycle deferred by a view taken meanwhile stops the compaction */
    int r;
    if ((r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, 0, moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, n, moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0 || (r = t_compact(t, 0, moved)) != 0 ||
        (r = t_recycle_ex(t, 0)) != 0) {
        if (r < 0)
            goto fail;
        *new_end_out = t->end;
        return 0;
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
    *new_end_out = new_end;
    return 0;
fail:
    if (shm_err.code == TE_CORRUPT)
        t_mark_dirty(t); /* the caller holds the lock and unlocks without an error */
    return -1;
}

/* Lay out an empty store over the whole payload (creator only). */
int
t_format(TCore *t, uint64_t seed)
{
    char *P = PAY(t);
    THeader *h = HDR(t);
    uint64_t end = t_lim(t) & ~(uint64_t)15;
    uint64_t ibytes = (T_INDEX_HDR + 8 * T_MIN_SLOTS + 15) & ~(uint64_t)15;
    if (end < T_HEADER + ibytes + T_MIN_BLOCK)
        return shm_fail(TE_VALUE, "a store needs at least 8 KiB");
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
    return 0;
}
