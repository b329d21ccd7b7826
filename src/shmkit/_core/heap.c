/* heap.c - movable blocks in a shared segment, addressed by handles: the
 * protocol.
 *
 * This file holds the heap's metadata operations: allocation, free, realloc,
 * pins, compaction moves, crash repair and the consistency check.  They are
 * in C because they must be atomic with respect to Python: a Ctrl-C landing
 * between two stores of a Python-level update would leave the metadata half
 * changed under a lock that is then released normally.  Policy (when to
 * compact, error wording, numpy views) stays in heap.py.  This file holds no
 * Python objects and calls no Python API: it works on an HCore (heap.h) and
 * records errors with shm_fail(); its types, HeapCore and Pin, are in
 * heaptype.c, which parses arguments, takes the lock (lock.c: the wait
 * releases the GIL), makes the pins' memoryviews and raises the recorded
 * errors.
 *
 * The shared layout, its constants and the _Static_asserts pinning every
 * field offset are in heap.h.
 *
 * Crash safety.  Every metadata store made under the lock goes through the
 * core's undo journal (journal.h, shm_jset64()): the old word is appended
 * to the journal (count published with a release store) before the word
 * changes, and a finished operation commits by zeroing the count.  The lock
 * is taken with shm_lock_acquire_repair(): whoever next takes it and finds
 * a non-empty journal (or a dead owner) rolls it back, so a killed
 * operation never happened.  A compaction move is the exception: its copy
 * cannot be undone when the destination overlaps the source, so it is
 * rolled forward from the move journal by the lock's repair callback,
 * repair_move() (see move()).  Crash points (crash.c): every journaled
 * store and commit, and heap.move.claimed, heap.move.copied (per chunk),
 * heap.realloc.copied.
 *
 * Pins are lock-free hazard records.  A pinner writes (entry, count) into its
 * own slot's pin table with a sequentially consistent CAS and then reads the
 * entry's state; a lock holder about to move, free or resize a block sets
 * BUSY with a sequentially consistent store and then reads the pin tables
 * of every slot whose pinbits bit is set (a pinner sets it before its CAS).
 * One of the two sees the other: either the pinner sees BUSY (it backs off
 * and waits for the lock), or the mover sees the record (it leaves the block
 * alone).  Records of dead attachments are found by their attach generation
 * and cleared by the next scan.
 *
 *   heap_layout(data_bytes, max_data_bytes, max_blocks, max_pins, max_slots)
 *       -> (payload bytes, max payload bytes)
 *   heap_format(mapping, payload_offset, data_bytes, max_data_bytes, max_blocks,
 *               max_pins, max_slots, salt)        (the creator, before publishing)
 *   core = HeapCore(mapping, payload_offset, payload_length, name)
 *   v = core.alloc(100, False, None)              # handle as an int; -1 split up, -2 short
 *   v = core.put(data, None)                      # alloc and copy in, in one step; as alloc
 *   with core.pin(v, None, handle) as view: ...   # a Pin; lock-free
 *   core.free(v, None); core.realloc(v, n, zero, timeout) -> 0, -1 split up, -2 short
 *   core.grow(data_bytes, timeout)                # after the segment was extended
 *   core.compact_step(restart, until, budget, timeout); core.stats(); core.verify()
 *   _core.fault(k)                                # tests: SIGKILL at the k-th crash point
 */
#include "heap.h"
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

#define COPY_CHUNK (1u << 20)     /* bytes copied between progress records */
#define NOGIL_BYTES (256u << 10)  /* copies this large run without the GIL */

/* ---- words ------------------------------------------------------------------ */

static inline uint64_t *
at64(Ctx *c, uint64_t off)
{
    return (uint64_t *)(c->p + off);
}


static inline uint64_t
blk_off(Ctx *c, uint32_t unit)
{
    return c->h->data_off + (uint64_t)unit * UNIT;
}

static inline void
stat_add(Ctx *c, int which, uint64_t n)
{
    __atomic_fetch_add(at64(c, H_STAT + 8 * which), n, __ATOMIC_RELAXED);
}

/* End an operation: commit its journal, then count it in statistic `which`.
 * 0, or -1 (the journal overflowed and was rolled back). */
static int
commit(Ctx *c, int which, uint64_t n)
{
    if (shm_journal_commit(&c->jn) < 0)
        return -1;
    stat_add(c, which, n);
    return 0;
}

/* Give an operation up: undo what it journaled.  Returns -1. */
static int
undo(Ctx *c)
{
    shm_journal_rollback(&c->jn);
    return -1;
}

/* Damage (the type names the heap and what to do). */
#define corrupt(c, ...) ((void)(c), shm_fail(HE_CORRUPT, __VA_ARGS__))

/* ---- block headers ------------------------------------------------------- */

static uint32_t
hcheck(HCore *h, uint32_t unit, uint32_t size, uint32_t prev, uint32_t handle)
{
    uint64_t x = ((uint64_t)size << 32 | prev) * 0x9E3779B97F4A7C15ull;
    x ^= ((uint64_t)handle << 32 | unit) * 0xC2B2AE3D27D4EB4Full;
    x ^= h->salt;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (uint32_t)x;
}

static int
rd_blk(Ctx *c, uint64_t unit, Blk *b)
{
    HCore *h = c->h;
    if (unit >= h->units)
        return corrupt(c, "a block offset (%llu) lies past the data area of %llu units",
                       (unsigned long long)unit, (unsigned long long)h->units);
    uint64_t w0 = ld(c, blk_off(c, (uint32_t)unit));
    uint64_t w1 = ld(c, blk_off(c, (uint32_t)unit) + 8);
    b->size = (uint32_t)w0;
    b->prev = (uint32_t)(w0 >> 32);
    b->handle = (uint32_t)w1;
    if ((uint32_t)(w1 >> 32) != hcheck(h, (uint32_t)unit, b->size, b->prev, b->handle))
        return corrupt(c, "the block header at unit %llu fails its check",
                       (unsigned long long)unit);
    if (b->size < MIN_UNITS || b->size > h->units - unit)
        return corrupt(c, "the block at unit %llu claims %u units",
                       (unsigned long long)unit, b->size);
    if ((unit == 0) != (b->prev == 0) || b->prev > unit)
        return corrupt(c, "the block at unit %llu claims a predecessor of %u units",
                       (unsigned long long)unit, b->prev);
    if (b->handle > h->max_blocks)
        return corrupt(c, "the block at unit %llu names handle entry %u of %u",
                       (unsigned long long)unit, b->handle, h->max_blocks);
    return 0;
}

static void
wr_blk(Ctx *c, uint32_t unit, uint32_t size, uint32_t prev, uint32_t handle)
{
    uint64_t off = blk_off(c, unit);
    shm_jset64(&c->jn, off, (uint64_t)size | (uint64_t)prev << 32, 0);
    shm_jset64(&c->jn, off + 8, (uint64_t)handle | (uint64_t)hcheck(c->h, unit, size, prev, handle) << 32,
         0);
}

static int
set_prev(Ctx *c, uint32_t unit, uint32_t prev)
{
    Blk b;
    if (rd_blk(c, unit, &b) < 0)
        return -1;
    wr_blk(c, unit, b.size, prev, b.handle);
    return 0;
}

/* ---- free lists ---------------------------------------------------------- */

static int
bin_of(uint32_t size)
{
    if (size < 64)
        return (int)size;
    int lg = 63 - __builtin_clzll(size);
    return 64 + (lg - 6) * 2 + (int)((size >> (lg - 1)) & 1);
}

static uint32_t
bin_head(Ctx *c, int b)
{
    uint64_t w = ld(c, H_BINS + (uint64_t)(b >> 1) * 8);
    return (b & 1) ? (uint32_t)(w >> 32) : (uint32_t)w;
}

static void
set_bin_head(Ctx *c, int b, uint32_t v)
{
    uint64_t off = H_BINS + (uint64_t)(b >> 1) * 8;
    uint64_t w = ld(c, off);
    w = (b & 1) ? (w & 0xFFFFFFFFull) | (uint64_t)v << 32 : (w & ~0xFFFFFFFFull) | v;
    shm_jset64(&c->jn, off, w, 0);
    uint64_t boff = H_BITMAP + (uint64_t)(b >> 6) * 8;
    uint64_t bit = 1ull << (b & 63);
    uint64_t bm = ld(c, boff);
    shm_jset64(&c->jn, boff, v ? bm | bit : bm & ~bit, 0);
}

static inline uint64_t
links_off(Ctx *c, uint32_t unit)
{
    return blk_off(c, unit) + 16;
}

static int
check_link(Ctx *c, uint32_t link)
{
    if (link > c->h->units)
        return corrupt(c, "a free-list link (%u) points past the data area", link);
    return 0;
}

static int
list_push(Ctx *c, uint32_t unit, uint32_t size)
{
    int b = bin_of(size);
    uint32_t head = bin_head(c, b);
    if (check_link(c, head) < 0)
        return -1;
    shm_jset64(&c->jn, links_off(c, unit), (uint64_t)head, 0);
    if (head) {
        uint64_t lo = links_off(c, head - 1);
        uint64_t w = ld(c, lo);
        shm_jset64(&c->jn, lo, (w & 0xFFFFFFFFull) | (uint64_t)(unit + 1) << 32, 0);
    }
    set_bin_head(c, b, unit + 1);
    return 0;
}

static int
list_unlink(Ctx *c, uint32_t unit, uint32_t size)
{
    uint64_t w = ld(c, links_off(c, unit));
    uint32_t next = (uint32_t)w, prev = (uint32_t)(w >> 32);
    if (check_link(c, next) < 0 || check_link(c, prev) < 0)
        return -1;
    if (prev) {
        uint64_t lo = links_off(c, prev - 1);
        uint64_t pw = ld(c, lo);
        if ((uint32_t)pw != unit + 1)
            return corrupt(c, "the free lists disagree about the block at unit %u", unit);
        shm_jset64(&c->jn, lo, (pw & ~0xFFFFFFFFull) | next, 0);
    } else {
        int b = bin_of(size);
        if (bin_head(c, b) != unit + 1)
            return corrupt(c, "the free block at unit %u is missing from its list", unit);
        set_bin_head(c, b, next);
    }
    if (next) {
        uint64_t lo = links_off(c, next - 1);
        uint64_t nw = ld(c, lo);
        if ((uint32_t)(nw >> 32) != unit + 1)
            return corrupt(c, "the free lists disagree about the block at unit %u", unit);
        shm_jset64(&c->jn, lo, (nw & 0xFFFFFFFFull) | (uint64_t)prev << 32, 0);
    }
    return 0;
}

/* A free block of at least `want` units: 1 found (*unit, *b), 0 none, -1 error. */
static int
find_free(Ctx *c, uint32_t want, uint32_t *unit, Blk *b)
{
    int bin = bin_of(want);
    if (bin >= 64) {
        uint32_t link = bin_head(c, bin);
        for (int steps = 0; link && steps < 64; steps++) {
            if (check_link(c, link) < 0 || rd_blk(c, link - 1, b) < 0)
                return -1;
            if (b->handle)
                return corrupt(c, "a used block (unit %u) is on a free list", link - 1);
            if (b->size >= want) {
                *unit = link - 1;
                return 1;
            }
            link = (uint32_t)ld(c, links_off(c, link - 1));
        }
        bin++;
    } else if (bin_head(c, bin) == 0) {
        bin++;
    }
    for (int w = bin >> 6; w < NBINS / 64; w++) {
        uint64_t bm = ld(c, H_BITMAP + 8 * (uint64_t)w);
        if (w == bin >> 6)
            bm &= ~0ull << (bin & 63);
        if (!bm)
            continue;
        int found = w * 64 + __builtin_ctzll(bm);
        uint32_t link = bin_head(c, found);
        if (link == 0 || check_link(c, link) < 0)
            return link ? -1 : corrupt(c, "free list %d is marked used but empty", found);
        if (rd_blk(c, link - 1, b) < 0)
            return -1;
        if (b->handle || b->size < want || bin_of(b->size) != found)
            return corrupt(c, "the block at unit %u is on the wrong free list", link - 1);
        *unit = link - 1;
        return 1;
    }
    return 0;
}

/* Move the compaction cursor off a boundary that a merge into
 * [start, start+size) just removed. */
static void
fix_cursor(Ctx *c, uint32_t start, uint32_t size)
{
    uint64_t cur = ld(c, H_CURSOR);
    if (cur > start && cur < (uint64_t)start + size)
        shm_jset64(&c->jn, H_CURSOR, start, 0);
}

/* Make [unit, unit+size) free (its header's prev is `prev`), merging with free
 * neighbours.  Adjusts free_units/free_blocks; the caller adjusts used_*. */
static int
release_block(Ctx *c, uint32_t unit, uint32_t size, uint32_t prev)
{
    uint32_t start = unit, total = size, pv = prev;
    Blk b;
    int64_t blocks = 1;
    if (unit > 0) {
        if (rd_blk(c, unit - prev, &b) < 0)
            return -1;
        if (b.size != prev)
            return corrupt(c, "the block at unit %u does not end where the next begins",
                           unit - prev);
        if (b.handle == 0) {
            if (list_unlink(c, unit - prev, b.size) < 0)
                return -1;
            start = unit - prev;
            total += b.size;
            pv = b.prev;
            blocks--;
        }
    }
    uint64_t next = (uint64_t)unit + size;
    if (next < c->h->units) {
        if (rd_blk(c, next, &b) < 0)
            return -1;
        if (b.prev != size)
            return corrupt(c, "the block at unit %llu has a wrong predecessor size",
                           (unsigned long long)next);
        if (b.handle == 0) {
            if (list_unlink(c, (uint32_t)next, b.size) < 0)
                return -1;
            total += b.size;
            blocks--;
        }
    }
    wr_blk(c, start, total, pv, 0);
    if (list_push(c, start, total) < 0)
        return -1;
    uint64_t after = (uint64_t)start + total;
    if (after < c->h->units && set_prev(c, (uint32_t)after, total) < 0)
        return -1;
    fix_cursor(c, start, total);
    shm_jadd64(&c->jn, H_FREE_U, size);
    shm_jadd64(&c->jn, H_FREE_B, blocks);
    return 0;
}

/* Carve `want` units for entry idx out of the free block at unit; returns
 * the units actually taken (a remainder too small to stand alone is kept). */
static int64_t
take_block(Ctx *c, uint32_t unit, Blk *b, uint32_t want, uint32_t idx)
{
    if (list_unlink(c, unit, b->size) < 0)
        return -1;
    /* the caller may copy or clear the new block's bytes before it commits:
     * keep the free block's links, which those bytes overlay */
    shm_jkeep64(&c->jn, links_off(c, unit));
    uint32_t s = b->size;
    if (s - want >= MIN_UNITS) {
        wr_blk(c, unit, want, b->prev, idx + 1);
        wr_blk(c, unit + want, s - want, want, 0);
        if (list_push(c, unit + want, s - want) < 0)
            return -1;
        if ((uint64_t)unit + s < c->h->units && set_prev(c, unit + s, s - want) < 0)
            return -1;
        s = want;
    } else {
        wr_blk(c, unit, s, b->prev, idx + 1);
        shm_jadd64(&c->jn, H_FREE_B, -1);
    }
    shm_jadd64(&c->jn, H_FREE_U, -(int64_t)s);
    return s;
}

/* ---- locking ------------------------------------------------------------- */

static int repair_move(void *ctx, int owner_died);

/* Pick up growth made by any process: the segment's size word (extended
 * first, with the file, by whoever grows the heap), checked against the
 * reservation and the file as Segment._sync_size does, then the heap's
 * units word, checked against max_units and that size.  Lock-free callers
 * may see a growth that a crash will roll back: the bound is still memory
 * of the file, so it is safe for bounds checks; lock() calls this again
 * after any repair, so the locked code sees committed units only.  The
 * journal's range is the payload seen here, which covers every word a
 * growth can journal (the segment grows before the heap's units do). */
int
sync_units(Ctx *c)
{
    HCore *h = c->h;
    MappingObject *m = h->m;
    uint64_t size = __atomic_load_n((uint64_t *)(m->base + 32), __ATOMIC_ACQUIRE);
    uint64_t most = h->data_off + h->max_units * UNIT;
    if (size > most)
        size = most; /* the heap never uses more than its max_size */
    if (size > h->plen) {
        uint64_t end = (uint64_t)h->hoff + size;
        if (end < size || end > (uint64_t)m->reserve)
            return corrupt(c, "its segment claims %llu bytes, beyond its reservation",
                           (unsigned long long)size);
        if (end > (uint64_t)m->length) {
            struct stat st;
            if (m->fd < 0 || fstat(m->fd, &st) < 0 || (uint64_t)st.st_size < end)
                return corrupt(c, "its segment claims %llu bytes, more than its file holds",
                               (unsigned long long)size);
            m->length = (Py_ssize_t)end;
        }
        h->plen = size;
    }
    /* entries may name any word from the mutable header on, except the
     * journal itself (the shared journal checks each before undoing) */
    shm_journal_bind(&c->jn, h->m, c->p, H_JOURNAL, J_MAX, H_FREEH, h->plen, h->what);
    uint64_t u = ld(c, H_UNITS);
    if (u < MIN_UNITS || u > h->max_units || h->data_off + u * UNIT > h->plen)
        return corrupt(c, "it claims a data area of %llu units, beyond its segment's "
                       "%llu bytes (or its max_units %llu)", (unsigned long long)u,
                       (unsigned long long)h->plen, (unsigned long long)h->max_units);
    h->units = u;
    return 0;
}

/* ---- handles ------------------------------------------------------------- */

static uint32_t
initial_gen(HCore *h, uint32_t idx)
{
    uint64_t x = ((uint64_t)h->salt << 32 | idx) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 32;
    uint32_t g = (uint32_t)x;
    return g ? g : 1;
}


/* The type adds " in heap <name>". */
static int
stale(Ctx *c, uint32_t idx, uint32_t gen, const char *why)
{
    (void)c;
    return shm_fail(HE_STALE, "Handle(index=%u, generation=%u) %s", idx, gen, why);
}

/* Check that (idx, gen) names a live block; returns its state word in *st. */
int
check_handle(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *st)
{
    if (idx >= c->h->max_blocks)
        return stale(c, idx, gen, "is out of range (forged, or from another heap)");
    uint64_t fresh = ld(c, H_FRESH);
    if (idx >= fresh)
        return stale(c, idx, gen, "was never allocated (forged, or from another heap)");
    *st = ld(c, entry_off(c, idx) + E_STATE);
    if ((uint32_t)(*st >> 32) != gen)
        return stale(c, idx, gen, "is stale: its block was freed (or it is from another heap)");
    if (!(*st & F_LIVE))
        return stale(c, idx, gen, "is stale: its block was freed");
    return 0;
}

/* ---- pins ---------------------------------------------------------------- */

static inline uint64_t
pin_table(Ctx *c, uint32_t slot)
{
    return c->h->pins_off + (uint64_t)slot * c->h->stride;
}

static uint32_t
slots_in_use(Ctx *c)
{
    MappingObject *m = c->h->m;
    uint32_t hwm = __atomic_load_n((uint32_t *)(m->base + 68), __ATOMIC_ACQUIRE);
    return hwm < c->h->max_slots ? hwm : c->h->max_slots;
}

static uint32_t
pin_used(Ctx *c, uint64_t table)
{
    uint32_t used = __atomic_load_n((uint32_t *)(c->p + table), __ATOMIC_ACQUIRE);
    return used < c->h->max_pins ? used : c->h->max_pins;
}

/* The next attach slot at or after s that has ever pinned, or nslots. */
static uint32_t
next_pinning_slot(Ctx *c, uint32_t s, uint32_t nslots)
{
    while (s < nslots) {
        uint64_t bits = __atomic_load_n(at64(c, H_PINBITS + 8 * (uint64_t)(s >> 6)),
                                        __ATOMIC_SEQ_CST) >> (s & 63);
        if (bits)
            return s + (uint32_t)__builtin_ctzll(bits);
        s = (s | 63) + 1;
    }
    return nslots;
}

/* Walk the pin records of every attach slot below nslots that has pinned,
 * each loaded sequentially consistent: call seen(ctx, record) for each
 * record a live attachment holds on entry `want` - 1 (on any entry when
 * want is 0), and clear those of dead attachments when `reclaim`. */
static void
walk_pins(Ctx *c, uint32_t nslots, uint32_t want, int reclaim,
          void (*seen)(void *ctx, uint64_t rec), void *ctx)
{
    MappingObject *m = c->h->m;
    for (uint32_t s = next_pinning_slot(c, 0, nslots); s < nslots;
         s = next_pinning_slot(c, s + 1, nslots)) {
        uint64_t t = pin_table(c, s);
        uint32_t used = pin_used(c, t);
        for (uint32_t k = 0; k < used; k++) {
            uint64_t *rec = at64(c, t + PIN_HEAD + 8ull * k);
            uint64_t v = __atomic_load_n(rec, __ATOMIC_SEQ_CST);
            if ((uint32_t)v == 0 || (want && (uint32_t)v != want) || PIN_CNT(v) == 0)
                continue;
            if (shm_token_alive(m, PIN_GEN(v) << 10 | s))
                seen(ctx, v);
            else if (reclaim && __atomic_compare_exchange_n(rec, &v, 0, 0, __ATOMIC_SEQ_CST,
                                                            __ATOMIC_RELAXED))
                stat_add(c, ST_RECLAIMED, PIN_CNT(v));
        }
    }
}

static void
add_count(void *ctx, uint64_t rec)
{
    *(int64_t *)ctx += PIN_CNT(rec);
}

/* Live pins on entry idx, clearing records left by dead attachments.
 * Call with the lock held, after setting BUSY (the pinner's CAS then its
 * state load pair with our BUSY store then these loads). */
static int64_t
scan_pins(Ctx *c, uint32_t idx)
{
    int64_t live = 0;
    walk_pins(c, slots_in_use(c), idx + 1, 1, add_count, &live);
    return live;
}

/* Set BUSY on a live entry and make sure nobody pins it: 0 done (BUSY set,
 * journaled), 1 pinned (nothing changed), -1 error. */
static int
claim(Ctx *c, uint32_t idx, uint64_t st, int64_t *pins)
{
    uint64_t off = entry_off(c, idx) + E_STATE;
    uint64_t mark = ld(c, H_JOURNAL);
    shm_jset64(&c->jn, off, st | F_BUSY, 1);
    int64_t live = scan_pins(c, idx);
    if (pins)
        *pins = live;
    if (live == 0)
        return 0;
    /* Undo just the BUSY store (the journal may hold earlier work). */
    __atomic_store_n(at64(c, off), st, __ATOMIC_RELEASE);
    __atomic_store_n(at64(c, H_JOURNAL), mark, __ATOMIC_RELEASE);
    return 1;
}

static int
pinned_error(Ctx *c, uint32_t idx, uint32_t gen, int64_t pins, const char *what)
{
    return shm_fail(HE_PINNED,
                  "cannot %s Handle(index=%u, generation=%u) of %s: it is pinned "
                  "(%lld pin%s held); leave the `with heap.pin(...)` blocks first",
                  what, idx, gen, c->h->what, (long long)pins, pins == 1 ? "" : "s");
}

/* Claim the live block of handle (idx, gen) for a change (its entry is
 * marked BUSY through the journal) and read its header: 0 with the entry's
 * state before in *st, its first unit in *unit and the header in *b; -1
 * when it is pinned (HE_PINNED, nothing changed) or on error (undone). */
static int
claim_block(Ctx *c, uint32_t idx, uint32_t gen, const char *verb, uint64_t *st,
            uint64_t *unit, Blk *b)
{
    int64_t pins;
    if (check_handle(c, idx, gen, st) < 0)
        return -1;
    int r = claim(c, idx, *st, &pins);
    if (r != 0)
        return r > 0 ? pinned_error(c, idx, gen, pins, verb) : -1;
    *unit = ld(c, entry_off(c, idx) + E_UNIT);
    if (rd_blk(c, *unit, b) < 0)
        return undo(c);
    return 0;
}

/* ---- repair -------------------------------------------------------------- */

static void copy_forward(Ctx *c, uint64_t src, uint64_t dst, uint64_t total, uint64_t gap,
                         uint64_t done);
static int publish_move(Ctx *c);

/* The repair callback of the heap's lock (shm_lock_acquire_repair): called
 * with the lock held and the undo journal already rolled back, when the
 * previous holder died or left work unfinished.  Finishes an interrupted
 * move: its copy cannot be undone when the destination overlaps the
 * source, so it is rolled forward from the move journal. */
static int
repair_move(void *ctx, int owner_died)
{
    Ctx *c = ctx;
    (void)owner_died;
    stat_add(c, ST_RECOVERIES, 1);
    uint64_t active = ld(c, H_MOVE + M_ACTIVE);
    if (active == 0)
        return 0;
    HCore *h = c->h;
    uint64_t idx = ld(c, H_MOVE + M_IDX), src = ld(c, H_MOVE + M_SRC);
    uint64_t dst = ld(c, H_MOVE + M_DST), size = ld(c, H_MOVE + M_SIZE);
    uint64_t gap = ld(c, H_MOVE + M_GAP), done = ld(c, H_MOVE + M_DONE);
    if (active != 1 || idx >= h->max_blocks || size < MIN_UNITS || gap < MIN_UNITS ||
        dst >= h->units || src != dst + gap || src > h->units || size > h->units - src ||
        done > size * UNIT)
        return corrupt(c, "its move journal is inconsistent");
    copy_forward(c, src, dst, size * UNIT, gap * UNIT, done);
    return publish_move(c);
}

/* ---- compaction moves ----------------------------------------------------- */

/* Copy `total` bytes from unit src to unit dst (dst < src), starting at byte
 * `done`, in chunks no larger than the gap: a chunk never overwrites source
 * bytes not yet copied, so an interrupted copy resumes from the progress
 * record.  Runs without the GIL for large blocks. */
static void
copy_forward(Ctx *c, uint64_t src, uint64_t dst, uint64_t total, uint64_t gap,
             uint64_t done)
{
    char *from = c->p + c->h->data_off + src * UNIT;
    char *to = c->p + c->h->data_off + dst * UNIT;
    uint64_t chunk = gap < COPY_CHUNK ? gap : COPY_CHUNK;
    uint64_t *progress = at64(c, H_MOVE + M_DONE);
    int nogil = total - done >= NOGIL_BYTES && c->h->nogil != NULL;
    void *ts = nogil ? c->h->nogil() : NULL;
    while (done < total) {
        uint64_t n = total - done < chunk ? total - done : chunk;
        memcpy(to + done, from + done, n);
        done += n;
        __atomic_store_n(progress, done, __ATOMIC_RELEASE);
        shm_crash_point("heap.move.copied");
    }
    if (nogil)
        c->h->gil(ts);
}

/* Phase 3 of a move: the block now lives at dst; publish that, and turn the
 * space behind it into a free block.  One journaled commit. */
static int
publish_move(Ctx *c)
{
    uint32_t idx = (uint32_t)ld(c, H_MOVE + M_IDX);
    uint32_t src = (uint32_t)ld(c, H_MOVE + M_SRC), dst = (uint32_t)ld(c, H_MOVE + M_DST);
    uint32_t size = (uint32_t)ld(c, H_MOVE + M_SIZE), gap = (uint32_t)ld(c, H_MOVE + M_GAP);
    uint32_t prev = (uint32_t)ld(c, H_MOVE + M_PREV);
    if ((dst == 0) != (prev == 0) || prev > dst)
        return corrupt(c, "its move journal has a wrong predecessor size");
    uint64_t e = entry_off(c, idx);
    wr_blk(c, dst, size, prev, idx + 1);
    shm_jset64(&c->jn, e + E_UNIT, dst, 0);
    shm_jset64(&c->jn, e + E_STATE, ld(c, e + E_STATE) & ~(uint64_t)F_BUSY, 0);
    uint32_t fu = dst + size, fsz = gap;
    uint64_t next = (uint64_t)src + size;
    if (next < c->h->units) {
        Blk b;
        if (rd_blk(c, next, &b) < 0)
            goto fail;
        if (b.handle == 0) {
            if (list_unlink(c, (uint32_t)next, b.size) < 0)
                goto fail;
            fsz += b.size;
            shm_jadd64(&c->jn, H_FREE_B, -1);
        }
    }
    wr_blk(c, fu, fsz, size, 0);
    if (list_push(c, fu, fsz) < 0)
        goto fail;
    if ((uint64_t)fu + fsz < c->h->units && set_prev(c, fu + fsz, fsz) < 0)
        goto fail;
    shm_jset64(&c->jn, H_CURSOR, fu, 0);
    shm_jset64(&c->jn, H_MOVE + M_ACTIVE, 0, 0);
    if (commit(c, ST_MOVES, 1) < 0)
        return -1;
    stat_add(c, ST_MOVED, (uint64_t)size * UNIT);
    return 0;
fail:
    return undo(c);
}

/* Slide the used block at `src` down into the free block `dst` before it.
 * 1 moved, 0 pinned (left alone), -1 error (nothing changed). */
static int
move(Ctx *c, uint32_t dst, Blk *fb, uint32_t src, Blk *bb)
{
    uint32_t idx = bb->handle - 1;
    uint64_t e = entry_off(c, idx);
    uint64_t st = ld(c, e + E_STATE);
    if (idx >= ld(c, H_FRESH) || !(st & F_LIVE) || (st & F_BUSY) || ld(c, e + E_UNIT) != src ||
        ld(c, e + E_NBYTES) > ((uint64_t)bb->size - 1) * UNIT)
        return corrupt(c, "the block at unit %u and its handle entry %u disagree", src, idx);
    /* phase 1: claim the entry, take the free block off its list, write the
     * move journal; commit. */
    int r = claim(c, idx, st, NULL);
    if (r != 0)
        return r < 0 ? -1 : 0;
    if (list_unlink(c, dst, fb->size) < 0)
        return undo(c);
    shm_jset64(&c->jn, H_MOVE + M_IDX, idx, 0);
    shm_jset64(&c->jn, H_MOVE + M_SRC, src, 0);
    shm_jset64(&c->jn, H_MOVE + M_DST, dst, 0);
    shm_jset64(&c->jn, H_MOVE + M_SIZE, bb->size, 0);
    shm_jset64(&c->jn, H_MOVE + M_GAP, fb->size, 0);
    shm_jset64(&c->jn, H_MOVE + M_PREV, fb->prev, 0);
    shm_jset64(&c->jn, H_MOVE + M_DONE, 0, 0);
    shm_jset64(&c->jn, H_MOVE + M_ACTIVE, 1, 0);
    if (shm_journal_commit(&c->jn) < 0)
        return -1;
    shm_crash_point("heap.move.claimed");
    /* phase 2: copy.  From here on a crash is rolled forward by repair_move(). */
    copy_forward(c, src, dst, (uint64_t)bb->size * UNIT, (uint64_t)fb->size * UNIT, 0);
    /* phase 3: publish. */
    return publish_move(c) < 0 ? -1 : 1;
}


/* ---- after the lock is taken ------------------------------------------------ */

/* With the lock just taken (owner_died: from a dead holder): a dead holder
 * or a journal in force has the shared journal rolled back, then
 * repair_move() rolls an interrupted move forward.  The segment's size is
 * read again first: a growth that died holding the lock journaled words
 * that only the grown segment covers.  0, or -1 (the caller unlocks). */
int
locked_repair(Ctx *c, int owner_died)
{
    if (sync_units(c) < 0)
        return -1;
    if (owner_died || shm_journal_pending(&c->jn) != 0) {
        if (shm_journal_rollback(&c->jn) < 0 || repair_move(c, owner_died) < 0 ||
            sync_units(c) < 0)
            return -1;
    }
    /* a move whose publication failed (not a crash) is finished here */
    if (ld(c, H_MOVE + M_ACTIVE) != 0 && repair_move(c, 0) < 0)
        return -1;
    return 0;
}

/* ---- the operations (lock held) ----------------------------------------------- */

int
want_units(HCore *h, unsigned long long n, uint32_t *units)
{
    unsigned long long u = (n + UNIT - 1) / UNIT + 1;
    if (n > (unsigned long long)MAX_UNITS * UNIT || u > h->max_units)
        return shm_fail(HE_FULL,
                      "%llu bytes is more than %s can ever hold (its max_size is %llu "
                      "bytes of data area); create it with a larger max_size=", n,
                      h->what, (unsigned long long)h->max_units * UNIT);
    *units = u < MIN_UNITS ? MIN_UNITS : (uint32_t)u;
    return 0;
}

/* A long copy or clear lets other threads run (the type's nogil hook). */
static void
copy_bytes(Ctx *c, char *to, const char *from, uint64_t n)
{
    if (n >= NOGIL_BYTES && c->h->nogil != NULL) {
        void *ts = c->h->nogil();
        from ? memcpy(to, from, n) : memset(to, 0, n);
        c->h->gil(ts);
    } else {
        from ? memcpy(to, from, n) : memset(to, 0, n);
    }
}

static void
zero_bytes(Ctx *c, char *p, uint64_t n)
{
    copy_bytes(c, p, NULL, n);
}

/* Allocate n bytes (want units), cleared if zero, or holding a copy of
 * src's n bytes (put: the block is made with its bytes, so that no Ctrl-C
 * between two Python calls leaves one made and unfilled, nor unowned):
 * 0 with the handle (gen << 32 | idx) in *handle, HR_SPLIT when the free
 * space is enough but split up (the caller compacts), HR_SHORT when it is
 * not enough (the caller grows the heap), or -1. */
int
h_alloc(Ctx *c, uint64_t n, int zero, const char *src, uint32_t want, uint64_t *handle)
{
    HCore *self = c->h;
    uint32_t idx, gen, unit;
    Blk b;
    if (ld(c, H_FREE_U) < want)
        return HR_SHORT;
    uint64_t fh = ld(c, H_FREEH), fresh = ld(c, H_FRESH);
    if (fresh > self->max_blocks || fh > fresh)
        return corrupt(c, "its handle table counters are out of range");
    int r = find_free(c, want, &unit, &b);
    if (r < 0)
        return -1;
    if (r == 0)
        return HR_SPLIT;
    if (fh) {
        idx = (uint32_t)fh - 1;
        uint64_t st = ld(c, entry_off(c, idx) + E_STATE);
        uint64_t next = ld(c, entry_off(c, idx) + E_LINK);
        if ((st & F_LIVE) || next > fresh)
            return corrupt(c, "its list of free handles is damaged at entry %u", idx);
        gen = (uint32_t)(st >> 32);
        shm_jset64(&c->jn, H_FREEH, next, 0);
    } else if (fresh < self->max_blocks) {
        idx = (uint32_t)fresh;
        gen = initial_gen(self, idx);
        shm_jset64(&c->jn, H_FRESH, fresh + 1, 0);
    } else {
        return shm_fail(HE_FULL,
                      "all %u handles of %s are in use; free some blocks or create "
                      "the heap with a larger max_blocks=", self->max_blocks, self->what);
    }
    int64_t got = take_block(c, unit, &b, want, idx);
    if (got < 0)
        return undo(c);
    uint64_t e = entry_off(c, idx);
    shm_jset64(&c->jn, e + E_UNIT, unit, 0);
    shm_jset64(&c->jn, e + E_NBYTES, n, 0);
    shm_jset64(&c->jn, e + E_LINK, self->m->token, 0);
    shm_jset64(&c->jn, e + E_STATE, (uint64_t)gen << 32 | F_LIVE, 0);
    shm_jadd64(&c->jn, H_USED_U, got);
    shm_jadd64(&c->jn, H_USED_B, 1);
    /* before the commit: a death meanwhile undoes the allocation */
    if (src != NULL)
        copy_bytes(c, c->p + blk_off(c, unit) + UNIT, src, n);
    else if (zero)
        zero_bytes(c, c->p + blk_off(c, unit) + UNIT, n);
    if (commit(c, ST_ALLOCS, 1) < 0)
        return -1;
    *handle = (uint64_t)gen << 32 | idx;
    return 0;
}

/* Extend the data area to n bytes (a multiple of 16, at most max_size),
 * which the segment must already cover: the new units become a free block
 * at the end, merged with a free last block.  One journaled commit; a
 * no-op when the heap is already that large (another process grew it).
 * The caller extended the segment first and segments of heaps never
 * shrink, so a segment too short for n is a damaged size word. */
int
h_grow(Ctx *c, uint64_t n)
{
    HCore *self = c->h;
    uint64_t want = n / UNIT;
    uint64_t old = self->units;
    if (want <= old)
        return 0;
    if (self->data_off + want * UNIT > self->plen)
        return corrupt(c, "its segment says it holds %llu bytes, too few for the %llu "
                       "bytes of data area it was just extended for: its size word was "
                       "damaged", (unsigned long long)self->plen, (unsigned long long)n);
    /* the last block, walking from the compaction cursor (a block
     * boundary, usually near the end; bounded: every block is >= 2 units) */
    uint64_t u = ld(c, H_CURSOR);
    if (u >= old)
        u = 0;
    Blk b = {0, 0, 0};
    while (u < old) {
        if (rd_blk(c, u, &b) < 0)
            return -1;
        u += b.size;
    }
    if (u != old || b.size == 0)
        return corrupt(c, "its blocks do not end where its data area does");
    shm_crash_point("heap.grow.found");
    shm_jset64(&c->jn, H_UNITS, want, 0);
    self->units = want; /* release_block() bounds its checks by it */
    shm_crash_point("heap.grow.units");
    if (release_block(c, (uint32_t)old, (uint32_t)(want - old), b.size) < 0) {
        shm_journal_rollback(&c->jn);
        self->units = old;
        return -1;
    }
    shm_crash_point("heap.grow.released");
    if (shm_journal_commit(&c->jn) < 0) {
        self->units = old;
        return -1;
    }
    return 0;
}

int
h_free(Ctx *c, uint32_t idx, uint32_t gen)
{
    uint64_t st, unit;
    Blk b;
    if (claim_block(c, idx, gen, "free", &st, &unit, &b) < 0)
        return -1;
    uint64_t e = entry_off(c, idx);
    if (b.handle != idx + 1) {
        corrupt(c, "handle entry %u points at a block that is not its own", idx);
        return undo(c);
    }
    uint32_t ngen = gen + 1 ? gen + 1 : 1;
    shm_jset64(&c->jn, e + E_STATE, (uint64_t)ngen << 32, 0);
    shm_jset64(&c->jn, e + E_LINK, ld(c, H_FREEH), 0);
    shm_jset64(&c->jn, H_FREEH, idx + 1, 0);
    if (release_block(c, (uint32_t)unit, b.size, b.prev) < 0)
        return undo(c);
    shm_jadd64(&c->jn, H_USED_U, -(int64_t)b.size);
    shm_jadd64(&c->jn, H_USED_B, -1);
    return commit(c, ST_FREES, 1);
}

/* Resize the block to n bytes (want units): 0 done, or HR_SPLIT / HR_SHORT
 * as h_alloc (nothing changed; the caller compacts or grows), or -1. */
int
h_realloc(Ctx *c, uint32_t idx, uint32_t gen, uint64_t n, int zero, uint32_t want)
{
    HCore *self = c->h;
    uint64_t st, unit64;
    Blk b;
    if (claim_block(c, idx, gen, "resize", &st, &unit64, &b) < 0)
        return -1;
    uint64_t e = entry_off(c, idx);
    uint64_t old_n = ld(c, e + E_NBYTES);
    uint32_t unit = (uint32_t)unit64;
    if (b.handle != idx + 1 || old_n > ((uint64_t)b.size - 1) * UNIT) {
        corrupt(c, "handle entry %u and its block disagree", idx);
        goto fail;
    }
    uint32_t place = unit;
    if (want <= b.size) {
        if (b.size - want >= MIN_UNITS) {
            uint64_t next = (uint64_t)unit + b.size;
            wr_blk(c, unit, want, b.prev, idx + 1);
            if (next < self->units && set_prev(c, (uint32_t)next, b.size - want) < 0)
                goto fail;
            if (release_block(c, unit + want, b.size - want, want) < 0)
                goto fail;
            shm_jadd64(&c->jn, H_USED_U, -(int64_t)(b.size - want));
        }
    } else {
        uint64_t next = (uint64_t)unit + b.size;
        Blk nb = {0, 0, 1};
        if (next < self->units && rd_blk(c, next, &nb) < 0)
            goto fail;
        if (next < self->units && nb.handle == 0 && (uint64_t)b.size + nb.size >= want) {
            /* grow in place into the free block that follows */
            uint32_t total = b.size + nb.size;
            if (list_unlink(c, (uint32_t)next, nb.size) < 0)
                goto fail;
            /* zero=True clears over the free block's header and links */
            shm_jkeep64(&c->jn, blk_off(c, (uint32_t)next));
            shm_jkeep64(&c->jn, blk_off(c, (uint32_t)next) + 8);
            shm_jkeep64(&c->jn, links_off(c, (uint32_t)next));
            uint32_t keep = total - want >= MIN_UNITS ? want : total;
            wr_blk(c, unit, keep, b.prev, idx + 1);
            if (keep < total) {
                wr_blk(c, unit + keep, total - keep, keep, 0);
                if (list_push(c, unit + keep, total - keep) < 0)
                    goto fail;
            } else {
                shm_jadd64(&c->jn, H_FREE_B, -1);
            }
            uint64_t after = (uint64_t)unit + total;
            uint32_t before_after = keep < total ? total - keep : keep;
            if (after < self->units && set_prev(c, (uint32_t)after, before_after) < 0)
                goto fail;
            fix_cursor(c, unit, keep);
            shm_jadd64(&c->jn, H_FREE_U, -(int64_t)(keep - b.size));
            shm_jadd64(&c->jn, H_USED_U, keep - b.size);
        } else {
            /* copy to a new place, then free the old one */
            uint32_t nu;
            Blk fb;
            int found = ld(c, H_FREE_U) < want ? 0 : find_free(c, want, &nu, &fb);
            if (found < 0)
                goto fail;
            if (found == 0) {
                shm_journal_rollback(&c->jn);
                return ld(c, H_FREE_U) < want ? HR_SHORT : HR_SPLIT;
            }
            int64_t got = take_block(c, nu, &fb, want, idx);
            if (got < 0)
                goto fail;
            shm_jadd64(&c->jn, H_USED_U, got);
            char *to = c->p + blk_off(c, nu) + UNIT, *from = c->p + blk_off(c, unit) + UNIT;
            copy_bytes(c, to, from, old_n);
            shm_crash_point("heap.realloc.copied");
            /* take_block changed the old block's prev size if the new
             * block lies just before it: re-read its header */
            if (rd_blk(c, unit, &b) < 0)
                goto fail;
            if (release_block(c, unit, b.size, b.prev) < 0)
                goto fail;
            shm_jadd64(&c->jn, H_USED_U, -(int64_t)b.size);
            place = nu;
        }
    }
    if (zero && n > old_n)
        zero_bytes(c, c->p + blk_off(c, place) + UNIT + old_n, n - old_n);
    shm_jset64(&c->jn, e + E_UNIT, place, 0);
    shm_jset64(&c->jn, e + E_NBYTES, n, 0);
    shm_jset64(&c->jn, e + E_STATE, st, 0); /* clears BUSY */
    return commit(c, ST_REALLOCS, 1);
fail:
    return undo(c);
}

/* The size of a live block, without the lock: 0 with *n when the entry
 * held still while it was read, 1 when it is changing (retry, or wait for
 * the lock), -1 on error. */
int
h_size_read(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *n)
{
    uint64_t st, st2;
    if (check_handle(c, idx, gen, &st) < 0)
        return -1;
    *n = ld(c, entry_off(c, idx) + E_NBYTES);
    st2 = ld(c, entry_off(c, idx) + E_STATE);
    if (st != st2 || (st & F_BUSY))
        return 1;
    if (*n > ((uint64_t)MAX_UNITS) * UNIT)
        return corrupt(c, "handle entry %u claims %llu bytes", idx, (unsigned long long)*n);
    return 0;
}

/* ---- pins (lock-free) ------------------------------------------------------------ */

int
drop_pin(Ctx *c, uint64_t *rec)
{
    (void)c;
    for (;;) {
        uint64_t v = __atomic_load_n(rec, __ATOMIC_ACQUIRE);
        if (PIN_CNT(v) == 0)
            return -1;
        uint64_t nv = PIN_CNT(v) == 1 ? 0 : v - PIN_ONE;
        if (__atomic_compare_exchange_n(rec, &v, nv, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED))
            return 0;
    }
}

/* Pin the block of (idx, gen) for the attachment `me`: 0 pinned (*rec the
 * record that holds it, *off and *n the block's bytes, from the payload
 * start), 1 the block is being moved, freed or resized (nothing held: wait
 * for the lock's holder and try again), -1 error. */
int
h_pin_take(Ctx *c, uint32_t idx, uint32_t gen, uint32_t me, uint64_t **recp,
           uint64_t *offp, uint64_t *np)
{
    HCore *self = c->h;
    uint32_t agen = SHM_TOKEN_GEN(me), slot = SHM_TOKEN_SLOT(me);
    uint64_t table = pin_table(c, slot);
    uint32_t *usedp = (uint32_t *)(c->p + table);
    uint64_t st;
    if (idx >= self->max_blocks || idx >= ld(c, H_FRESH)) {
        check_handle(c, idx, gen, &st);
        return -1;
    }
    uint64_t e = entry_off(c, idx);
    uint64_t *bits = at64(c, H_PINBITS + 8 * (uint64_t)(slot >> 6));
    if (!(__atomic_load_n(bits, __ATOMIC_RELAXED) & (1ull << (slot & 63))))
        __atomic_fetch_or(bits, 1ull << (slot & 63), __ATOMIC_SEQ_CST);
    uint64_t *rec = NULL;
    int had = 0;
    uint32_t used = pin_used(c, table);
    /* 1. a record of ours for this entry: the entry cannot change under it */
    for (uint32_t k = 0; k < used && !rec; k++) {
        uint64_t *r = at64(c, table + PIN_HEAD + 8ull * k);
        uint64_t v = __atomic_load_n(r, __ATOMIC_ACQUIRE);
        if ((uint32_t)v == idx + 1 && PIN_GEN(v) == agen && PIN_CNT(v) > 0 &&
            PIN_CNT(v) < PIN_CNT_MAX &&
            __atomic_compare_exchange_n(r, &v, v + PIN_ONE, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            rec = r;
            had = 1;
        }
    }
    /* 2. otherwise claim a free record, or one left behind by an earlier
     * (now gone) owner of this attach slot */
    uint64_t mine = (uint64_t)(idx + 1) | PIN_ONE | (uint64_t)agen << 44;
    for (uint32_t k = 0; !rec && k < self->max_pins; k++) {
        if (k >= used) { /* raise the high-water mark before using record k */
            uint32_t u = __atomic_load_n(usedp, __ATOMIC_ACQUIRE);
            while (u <= k && !__atomic_compare_exchange_n(usedp, &u, k + 1, 0,
                                                          __ATOMIC_SEQ_CST,
                                                          __ATOMIC_ACQUIRE))
                ;
            used = k + 1;
        }
        uint64_t *r = at64(c, table + PIN_HEAD + 8ull * k);
        uint64_t v = __atomic_load_n(r, __ATOMIC_ACQUIRE);
        if (v != 0 && PIN_GEN(v) == agen && PIN_CNT(v) > 0)
            continue; /* ours, in use */
        if (__atomic_compare_exchange_n(r, &v, mine, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            rec = r;
    }
    if (!rec)
        return shm_fail(HE_RUNTIME, "this attachment of %s already holds "
                      "pins on %u blocks (max_pins); leave some `with heap.pin()` "
                      "blocks first", self->what, self->max_pins);
    st = __atomic_load_n(at64(c, e + E_STATE), __ATOMIC_SEQ_CST);
    if ((uint32_t)(st >> 32) != gen || !(st & F_LIVE)) {
        drop_pin(c, rec);
        if (check_handle(c, idx, gen, &st) == 0)
            stale(c, idx, gen, "is stale");
        return -1;
    }
    if ((st & F_BUSY) && !had) {
        /* being moved, freed or resized: wait for the holder of the lock */
        drop_pin(c, rec);
        return 1;
    }
    /* Without the lock, only what a pin keeps still may be read: the
     * block's size and owner.  Its prev size and check word change with
     * its neighbours (two stores), so the check word is not looked at. */
    uint64_t unit = ld(c, e + E_UNIT), n = ld(c, e + E_NBYTES);
    uint64_t size = unit < self->units ? (uint32_t)ld(c, blk_off(c, (uint32_t)unit)) : 0;
    uint32_t owner = unit < self->units ? (uint32_t)ld(c, blk_off(c, (uint32_t)unit) + 8)
                                        : 0;
    if (owner != idx + 1 || size < MIN_UNITS || size > self->units - unit ||
        n > (size - 1) * UNIT) {
        drop_pin(c, rec);
        return corrupt(c, "handle entry %u and its block disagree", idx);
    }
    *recp = rec;
    *offp = blk_off(c, (uint32_t)unit) + UNIT;
    *np = n;
    return 0;
}

/* Holding the lock after h_pin_take said busy: BUSY is only ever set by
 * the lock's holder (or finished by repair), so we must not see it. */
int
h_pin_settled(Ctx *c, uint32_t idx)
{
    if (ld(c, entry_off(c, idx) + E_STATE) & F_BUSY)
        return corrupt(c, "handle entry %u stays marked busy", idx);
    return 0;
}

/* Drop one pin that the attachment named by `token` holds on entry idx:
 * 0 done, 1 none held. */
int
h_unpin(Ctx *c, uint32_t idx, uint32_t token)
{
    uint64_t table = pin_table(c, SHM_TOKEN_SLOT(token));
    uint32_t used = pin_used(c, table);
    int r = 1;
    for (uint32_t k = 0; k < used && r; k++) {
        uint64_t *rec = at64(c, table + PIN_HEAD + 8ull * k);
        uint64_t v = __atomic_load_n(rec, __ATOMIC_ACQUIRE);
        if ((uint32_t)v == idx + 1 && PIN_GEN(v) == SHM_TOKEN_GEN(token) && PIN_CNT(v) > 0 &&
            drop_pin(c, rec) == 0)
            r = 0;
    }
    return r;
}

/* Pins the attachment `me` holds. */
uint64_t
h_pins_held(Ctx *c, uint32_t me)
{
    uint64_t table = pin_table(c, SHM_TOKEN_SLOT(me)), held = 0;
    uint32_t used = pin_used(c, table);
    for (uint32_t k = 0; k < used; k++) {
        uint64_t v = ld(c, table + PIN_HEAD + 8ull * k);
        if ((uint32_t)v && PIN_GEN(v) == SHM_TOKEN_GEN(me))
            held += PIN_CNT(v);
    }
    return held;
}

/* ---- compaction, statistics, verification (lock held) ------------------------------ */

/* Slide used blocks down over the free space before them, starting at the
 * shared cursor, until `budget` bytes moved, a free run of `until` bytes
 * formed at the cursor, or the end. */
int
h_compact_step(Ctx *c, int restart, uint64_t until, uint64_t budget, HStep *out)
{
    HCore *self = c->h;
    unsigned long long moved = 0, nmoved = 0, run = 0, skipped = 0;
    int done = 0;
    if (restart)
        stat_add(c, ST_COMPACTIONS, 1);
    uint64_t u = restart ? 0 : ld(c, H_CURSOR);
    if (u > self->units)
        return corrupt(c, "its compaction cursor is out of range");
    for (int scanned = 0;; scanned++) {
        if (u >= self->units) {
            done = 1;
            break;
        }
        if (scanned >= SCAN_LIMIT || moved >= budget)
            break;
        Blk fb, bb;
        if (rd_blk(c, u, &fb) < 0)
            return -1;
        if (fb.handle != 0) {
            u += fb.size;
            continue;
        }
        uint64_t next = u + fb.size;
        run = (uint64_t)fb.size * UNIT;
        if (next >= self->units) {
            done = 1;
            break;
        }
        if (until && run >= until)
            break;
        if (rd_blk(c, next, &bb) < 0)
            return -1;
        if (bb.handle == 0)
            return corrupt(c, "two free blocks are adjacent at unit %llu",
                           (unsigned long long)next);
        int r = move(c, (uint32_t)u, &fb, (uint32_t)next, &bb);
        if (r < 0)
            return -1;
        if (r == 0) {
            skipped++;
            run = 0;
            u = next + bb.size;
            continue;
        }
        moved += (uint64_t)bb.size * UNIT;
        nmoved++;
        u = ld(c, H_CURSOR);
        Blk nf;
        if (rd_blk(c, u, &nf) < 0)
            return -1;
        run = (uint64_t)nf.size * UNIT;
    }
    if (u <= self->units) {
        shm_jset64(&c->jn, H_CURSOR, u, 0);
        if (shm_journal_commit(&c->jn) < 0)
            return -1;
    }
    *out = (HStep){moved, nmoved, run, skipped, done};
    return 0;
}

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    uint32_t *seen; /* room for every record of the slots walked */
    size_t n;
} Entries;

static void
add_entry(void *ctx, uint64_t rec)
{
    Entries *e = ctx;
    e->seen[e->n++] = (uint32_t)rec;
}

/* Distinct entries pinned by live attachments; records of dead ones are
 * cleared when `reclaim`. */
static int64_t
count_pinned(Ctx *c, int reclaim)
{
    uint32_t nslots = slots_in_use(c);
    size_t cap = (size_t)nslots * c->h->max_pins;
    Entries e = {cap ? malloc(cap * sizeof *e.seen) : NULL, 0};
    if (cap && e.seen == NULL)
        return shm_fail(HE_NOMEM, "no memory to count the pins");
    walk_pins(c, nslots, 0, reclaim, add_entry, &e);
    uint32_t *seen = e.seen;
    size_t n = e.n;
    if (n > 1)
        qsort(seen, n, sizeof *seen, cmp_u32);
    int64_t distinct = 0;
    for (size_t i = 0; i < n; i++)
        distinct += (i == 0 || seen[i] != seen[i - 1]);
    free(seen);
    return distinct;
}

/* Counters, the largest free block (from the top free list: a bounded
 * look, exact in practice) and the distinct pinned entries.  Without the
 * lock (locked == 0) a damaged list only leaves the largest unknown. */
int
h_stats(Ctx *c, int locked, HStats *s)
{
    uint64_t largest = 0;
    int have_largest = 1;
    for (int b = NBINS - 1; b >= 0; b--) {
        uint32_t link = bin_head(c, b);
        if (!link)
            continue;
        /* the top list's blocks are within a factor 1.5 of each other: a
         * bounded look is exact in practice and cannot loop on a damaged list */
        for (uint64_t steps = 0; link && steps < 65536; steps++) {
            Blk blk;
            if (check_link(c, link) < 0 || rd_blk(c, link - 1, &blk) < 0) {
                if (locked)
                    return -1;
                have_largest = 0; /* a lock-free look may race with a change */
                break;
            }
            if (blk.size > largest)
                largest = blk.size;
            link = (uint32_t)ld(c, links_off(c, link - 1));
        }
        break;
    }
    int64_t pinned = count_pinned(c, locked);
    if (pinned < 0)
        return -1;
    s->used = ld(c, H_USED_U) * UNIT;
    s->free = ld(c, H_FREE_U) * UNIT;
    s->blocks = ld(c, H_USED_B);
    s->free_blocks = ld(c, H_FREE_B);
    s->handles_used = ld(c, H_FRESH);
    s->largest_units = largest;
    s->have_largest = have_largest;
    s->pinned = pinned;
    for (int i = 0; i < ST_COUNT; i++)
        s->stat[i] = ld(c, H_STAT + 8 * i);
    return 0;
}

/* Check every invariant: 0 with the totals, or -1 (CorruptError). */
int
h_verify(Ctx *c, HVerify *out)
{
    HCore *self = c->h;
    uint8_t *seen = NULL;
    int ret = -1;
    uint64_t fresh = ld(c, H_FRESH), cursor = ld(c, H_CURSOR);
    if (fresh > self->max_blocks)
        return corrupt(c, "it claims %llu handles were used, of %u", (unsigned long long)fresh,
                       self->max_blocks);
    seen = calloc(fresh ? fresh : 1, 1);
    if (seen == NULL)
        return shm_fail(HE_NOMEM, "no memory to verify the heap");
    uint64_t used_u = 0, used_b = 0, free_u = 0, free_b = 0, u = 0, prev = 0;
    int prev_free = 0, cursor_ok = cursor == 0 || cursor == self->units;
    while (u < self->units) {
        Blk b;
        if (rd_blk(c, u, &b) < 0)
            goto out;
        if (b.prev != prev) {
            corrupt(c, "the block at unit %llu names a predecessor of %u units, not %llu",
                    (unsigned long long)u, b.prev, (unsigned long long)prev);
            goto out;
        }
        cursor_ok |= (u == cursor);
        if (b.handle == 0) {
            if (prev_free) {
                corrupt(c, "two free blocks are adjacent at unit %llu", (unsigned long long)u);
                goto out;
            }
            free_u += b.size;
            free_b++;
        } else {
            uint32_t idx = b.handle - 1;
            uint64_t e = entry_off(c, idx);
            uint64_t st = ld(c, e + E_STATE);
            if (idx >= fresh || !(st & F_LIVE) || (st & F_BUSY) || ld(c, e + E_UNIT) != u ||
                ld(c, e + E_NBYTES) > ((uint64_t)b.size - 1) * UNIT) {
                corrupt(c, "the block at unit %llu and handle entry %u disagree",
                        (unsigned long long)u, idx);
                goto out;
            }
            if (seen[idx]++) {
                corrupt(c, "handle entry %u owns two blocks", idx);
                goto out;
            }
            used_u += b.size;
            used_b++;
        }
        prev_free = b.handle == 0;
        prev = b.size;
        u += b.size;
    }
    if (u != self->units || !cursor_ok) {
        corrupt(c, "its blocks or its compaction cursor do not line up");
        goto out;
    }
    if (used_u != ld(c, H_USED_U) || used_b != ld(c, H_USED_B) ||
        free_u != ld(c, H_FREE_U) || free_b != ld(c, H_FREE_B)) {
        corrupt(c, "its usage counters do not match its blocks");
        goto out;
    }
    /* free lists: every node a free block on the right list, links agree,
     * and together they hold each free block once */
    uint64_t listed = 0;
    for (int bin = 0; bin < NBINS; bin++) {
        uint32_t link = bin_head(c, bin), back = 0;
        uint64_t bm = ld(c, H_BITMAP + 8 * (uint64_t)(bin >> 6));
        if (!!link != !!(bm & (1ull << (bin & 63)))) {
            corrupt(c, "the free-list bitmap disagrees with list %d", bin);
            goto out;
        }
        while (link) {
            Blk b;
            if (check_link(c, link) < 0 || rd_blk(c, link - 1, &b) < 0)
                goto out;
            uint64_t w = ld(c, links_off(c, link - 1));
            if (b.handle || bin_of(b.size) != bin || (uint32_t)(w >> 32) != back ||
                ++listed > free_b) {
                corrupt(c, "free list %d is damaged at unit %u", bin, link - 1);
                goto out;
            }
            back = link;
            link = (uint32_t)w;
        }
    }
    if (listed != free_b) {
        corrupt(c, "%llu free blocks are missing from the free lists",
                (unsigned long long)(free_b - listed));
        goto out;
    }
    /* handle table: live entries each own one block; the rest form the
     * free-handle list */
    uint64_t live = 0, freelist = 0;
    for (uint64_t i = 0; i < fresh; i++) {
        uint64_t st = ld(c, entry_off(c, (uint32_t)i) + E_STATE);
        if (st & F_LIVE) {
            live++;
            if (!seen[i]) {
                corrupt(c, "handle entry %llu is live but owns no block", (unsigned long long)i);
                goto out;
            }
        } else if ((st >> 32) == 0 || (st & F_BUSY)) {
            corrupt(c, "free handle entry %llu has an impossible state", (unsigned long long)i);
            goto out;
        }
    }
    for (uint64_t link = ld(c, H_FREEH); link; freelist++) {
        if (link > fresh || freelist >= fresh ||
            (ld(c, entry_off(c, (uint32_t)(link - 1)) + E_STATE) & F_LIVE)) {
            corrupt(c, "its list of free handles is damaged");
            goto out;
        }
        link = ld(c, entry_off(c, (uint32_t)(link - 1)) + E_LINK);
    }
    if (live != used_b || live + freelist != fresh) {
        corrupt(c, "%llu live handles, %llu free handles and %llu used entries do not add up",
                (unsigned long long)live, (unsigned long long)freelist,
                (unsigned long long)fresh);
        goto out;
    }
    /* pins name entries that exist */
    uint32_t nslots = slots_in_use(c);
    for (uint32_t s = 0; s < nslots; s++) {
        uint64_t t = pin_table(c, s);
        if (__atomic_load_n((uint32_t *)(c->p + t), __ATOMIC_ACQUIRE) > self->max_pins) {
            corrupt(c, "the pin table of slot %u claims too many records", s);
            goto out;
        }
        uint32_t used = pin_used(c, t);
        for (uint32_t k = 0; k < used; k++) {
            uint64_t v = ld(c, t + PIN_HEAD + 8ull * k);
            if ((uint32_t)v > fresh) {
                corrupt(c, "a pin record of slot %u names entry %u", s, (uint32_t)v - 1);
                goto out;
            }
        }
    }
    int64_t pinned = count_pinned(c, 1);
    if (pinned < 0)
        goto out;
    *out = (HVerify){used_b, free_b, used_u * UNIT, free_u * UNIT, fresh, freelist, pinned};
    ret = 0;
out:
    free(seen);
    return ret;
}

/* Where a live block is, and its live pins (a test and debugging aid). */
int
h_where(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *unit, uint64_t *n, int64_t *pins)
{
    uint64_t st;
    if (check_handle(c, idx, gen, &st) < 0)
        return -1;
    *pins = scan_pins(c, idx);
    uint64_t e = entry_off(c, idx);
    *unit = ld(c, e + E_UNIT);
    *n = ld(c, e + E_NBYTES);
    return 0;
}

/* ---- construction ------------------------------------------------------- */

/* From the max data bytes and table sizes: where the pin tables and the
 * data area start, the most units, and the largest payload. */
static int
geometry(uint64_t data_bytes, uint64_t max_blocks, uint64_t max_pins, uint64_t max_slots,
         uint64_t *pins_off, uint64_t *data_off, uint64_t *units, uint64_t *plen)
{
    if (max_blocks < 1 || max_blocks > (1u << 30) || max_pins < 1 || max_pins > MAX_PINS ||
        max_slots < 1 || max_slots > SHM_MAX_SLOTS)
        return shm_fail(HE_VALUE, "need 1 <= max_blocks <= 2**30 and 1 <= max_pins <= "
                      "%u (got %llu, %llu)", MAX_PINS, (unsigned long long)max_blocks,
                      (unsigned long long)max_pins);
    uint64_t u = data_bytes / UNIT;
    if (u < MIN_UNITS || u > MAX_UNITS)
        return shm_fail(HE_VALUE, "a heap holds %u to %llu bytes of data, not %llu",
                      MIN_UNITS * UNIT, (unsigned long long)MAX_UNITS * UNIT,
                      (unsigned long long)data_bytes);
    *pins_off = HDR_BYTES + max_blocks * ENTRY_BYTES;
    uint64_t end = *pins_off + max_slots * (PIN_HEAD + 8 * max_pins);
    *data_off = (end + PAGE_BYTES - 1) / PAGE_BYTES * PAGE_BYTES;
    *units = u;
    *plen = *data_off + u * UNIT;
    return 0;
}

static int
initial_units(uint64_t data_bytes, uint64_t max_units, uint64_t *units)
{
    uint64_t u = data_bytes / UNIT;
    if (u < MIN_UNITS || u > max_units)
        return shm_fail(HE_VALUE, "a heap starts with %u bytes of data area or more, "
                      "and no more than its max_size (%llu), not %llu", MIN_UNITS * UNIT,
                      (unsigned long long)max_units * UNIT, (unsigned long long)data_bytes);
    *units = u;
    return 0;
}

/* The payload a heap needs now and at its max_size. */
int
h_layout(uint64_t data, uint64_t most, uint64_t blocks, uint64_t pins, uint64_t slots,
         uint64_t *plen_now, uint64_t *plen_max)
{
    uint64_t pins_off, data_off, max_units, units = 0;
    if (geometry(most, blocks, pins, slots, &pins_off, &data_off, &max_units, plen_max) < 0 ||
        initial_units(data, max_units, &units) < 0)
        return -1;
    *plen_now = data_off + units * UNIT;
    return 0;
}

/* Lay out an empty heap in a fresh (zeroed) payload at p, of the size
 * h_layout gave. */
int
h_format(char *p, uint64_t data, uint64_t most, uint64_t blocks, uint64_t pins,
         uint64_t slots, uint64_t salt)
{
    uint64_t pins_off, data_off, units = 0, max_units, plen;
    if (geometry(most, blocks, pins, slots, &pins_off, &data_off, &max_units, &plen) < 0 ||
        initial_units(data, max_units, &units) < 0)
        return -1;
    plen = data_off + units * UNIT;
    HCore fake = {.units = units, .salt = (uint32_t)salt, .max_blocks = (uint32_t)blocks,
                  .data_off = data_off, .plen = plen};
    Ctx c = {.h = &fake, .p = p};
    *at64(&c, H_TABLE) = HDR_BYTES;
    *at64(&c, H_PINS) = pins_off;
    *at64(&c, H_DATA) = data_off;
    *at64(&c, H_MAX_UNITS) = max_units;
    *at64(&c, H_UNITS) = units;
    *at64(&c, H_BLOCKS_PINS) = blocks | pins << 32;
    *at64(&c, H_SLOTS_SALT) = slots | (salt & 0xFFFFFFFFull) << 32;
    /* one free block spanning the data area, written without the journal */
    uint64_t off = data_off;
    *at64(&c, off) = units;
    *at64(&c, off + 8) = (uint64_t)hcheck(&fake, 0, (uint32_t)units, 0, 0) << 32;
    *at64(&c, off + 16) = 0;
    int b = bin_of((uint32_t)units);
    uint64_t bw = H_BINS + (uint64_t)(b >> 1) * 8;
    *at64(&c, bw) = (b & 1) ? 1ull << 32 : 1;
    *at64(&c, H_BITMAP + (uint64_t)(b >> 6) * 8) = 1ull << (b & 63);
    *at64(&c, H_FREE_U) = units;
    *at64(&c, H_FREE_B) = 1;
    *(uint32_t *)(p + H_FORMAT) = HEAP_FORMAT;
    __atomic_store_n(at64(&c, H_MAGIC), HEAP_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

/* Check the header of the heap whose plen payload bytes are at p (hoff in
 * h->m) and fill in h's geometry.  0, or -1 (CorruptError). */
int
h_bind(HCore *h, char *p, uint64_t plen, long long hoff)
{
    Ctx c = {.h = h, .p = p};
    h->plen = plen;
    if (ld(&c, H_MAGIC) != HEAP_MAGIC || *(uint32_t *)(c.p + H_FORMAT) != HEAP_FORMAT)
        return corrupt(&c, "its header has a bad magic number or format");
    uint64_t bp = ld(&c, H_BLOCKS_PINS), ss = ld(&c, H_SLOTS_SALT);
    uint64_t data_bytes = ld(&c, H_MAX_UNITS) * UNIT, pins_off, data_off, max_units, most;
    uint64_t units = ld(&c, H_UNITS);
    MappingObject *m = h->m;
    if (ld(&c, H_MAX_UNITS) > MAX_UNITS ||
        geometry(data_bytes, (uint32_t)bp, bp >> 32, (uint32_t)ss, &pins_off, &data_off,
                 &max_units, &most) < 0)
        return corrupt(&c, "its header describes an impossible geometry");
    /* the whole max_size must lie in this process's reservation, and the
     * data area as it is now in the payload that the file holds */
    if (ld(&c, H_TABLE) != HDR_BYTES || ld(&c, H_PINS) != pins_off ||
        ld(&c, H_DATA) != data_off || units < MIN_UNITS || units > max_units ||
        data_off + units * UNIT > plen || (uint64_t)hoff > (uint64_t)m->reserve ||
        most > (uint64_t)m->reserve - (uint64_t)hoff ||
        (uint32_t)ss != m->max_slots)
        return corrupt(&c, "its header does not match its size");
    h->hoff = hoff;
    h->table_off = HDR_BYTES;
    h->pins_off = pins_off;
    h->data_off = data_off;
    h->units = units;
    h->max_units = max_units;
    h->max_blocks = (uint32_t)bp;
    h->max_pins = (uint32_t)(bp >> 32);
    h->max_slots = (uint32_t)ss;
    h->salt = (uint32_t)(ss >> 32);
    h->stride = PIN_HEAD + 8ull * h->max_pins;
    return 0;
}
