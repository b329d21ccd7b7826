/* table.h - the store's shared layout and the declarations its two halves
 * share: table.c holds the shared-memory protocol (no Python objects, no
 * Python API; errors are reported as a code and a message, see shm_fail in error.c) and
 * tabletype.c the Table type (argument parsing, encoding of Python values,
 * the writers' lock and the readers' wait, which release the GIL).
 *
 * Layout of the payload (byte offsets from the payload start, native byte
 * order, which must be little-endian; all blocks 16-byte aligned):
 *
 *   0     store header (T_HEADER bytes), see THeader below.  Its first cache
 *         line is what readers touch: epoch, index offset, seed, heap bounds,
 *         index_gen (raised before each new index is published; scans name
 *         an index by offset and generation, as a new index may reuse the
 *         block of an old one).
 *         Bytes 1024-4095 (format 2) are `views`: one u32 per attach slot,
 *         (generation of the slot's attachment << 12) | its live views.
 *   4096  the heap: a chain of blocks from heap_start to heap_end; each block
 *         starts with
 *            0 head  u64   size (multiple of 16, >= 32) | flags
 *                          (B_USED, B_INDEX, B_JOURNAL)
 *            8 link  u64   next block of a free list (free blocks only)
 *         A record block (B_USED alone) continues
 *           16 hash  u64   hash of the key (seeded, see thash)
 *           24 klen  u32   key bytes
 *           28 ktype u8    KT_INT / KT_STR / KT_BYTES
 *           29 vtype u8    VT_*
 *           30 0     u16
 *           32 vlen  u64   value bytes
 *           40 key bytes, then value bytes
 *         An index block (B_USED|B_INDEX) continues
 *           16 nslots u64  a power of two; 24 reserved; 32 nslots u64 words
 *         A journal block (B_USED|B_JOURNAL) continues
 *           16 n u64, 24 index offset u64, 32 n entries of (slot u64, word u64)
 *
 * An index word is 0 (empty), 1 (tombstone) or (record offset / 16) in the
 * low 40 bits with the top 24 bits of the key's hash as a tag above them.
 * Linear probing from hash & (nslots - 1); at most 3/4 of the words are
 * non-empty.
 *
 */
#ifndef SHMKIT_TABLE_H
#define SHMKIT_TABLE_H

#include "journal.h"
#include <stddef.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the store's shared layout is little-endian"
#endif

#define T_HEADER 4096u
#define T_MIN_BLOCK 32u
#define T_REC_HDR 40u
#define T_INDEX_HDR 32u
#define T_JOURNAL_HDR 32u
#define T_MIN_SLOTS 64u
#define B_USED 1u
#define B_INDEX 2u
#define B_JOURNAL 4u
#define B_FLAGS 15u
#define W_EMPTY 0u
#define W_TOMB 1u
#define W_OFF_MASK ((1ull << 40) - 1)
#define W_TAG(h) ((h) >> 40)
#define ST_COMMIT 1u
#define ST_DIRTY 2u
#define NSMALL 65 /* exact bins for sizes 16*k, k < 65 */
#define NBINS 104
#define MAX_KEY (1u << 20)
#define MAX_RETRIES 200
#define RECYCLE_MIN (256u << 10)
#define T_VIEW_SLOTS 768u      /* attach slots that can hold views (header room) */
#define T_VIEW_BITS 12u        /* a view word: attachment generation << 12 | views */
#define T_VIEW_MAX ((1u << T_VIEW_BITS) - 1)

enum { KT_INT = 1, KT_STR = 2, KT_BYTES = 3 };
enum {
    VT_BYTES = 1, VT_STR, VT_INT, VT_FLOAT, VT_FALSE, VT_TRUE, VT_NONE,
    VT_NDARRAY, VT_PICKLE, VT_LAST = VT_PICKLE
};

typedef struct {
    /* line 0: read by every reader, written rarely */
    uint64_t epoch;      /* +2 per recycle; odd while a batch is applied */
    uint64_t index;      /* offset of the current index block */
    uint64_t seed;       /* hash seed, fixed at creation */
    uint64_t heap_start; /* T_HEADER */
    uint64_t heap_end;   /* end of the block chain */
    uint64_t index_gen;  /* +1 before each new index is published (scans) */
    uint64_t _r0[2];
    /* line 1: writers */
    uint32_t lock;       /* the writers' robust mutex */
    uint32_t state;      /* ST_COMMIT while a batch journal is applied, ST_DIRTY */
    uint64_t count;      /* live keys */
    uint64_t tombstones; /* tombstone index words */
    uint64_t used;       /* bytes of live record blocks */
    uint64_t pending;    /* bytes freed since the last recycle */
    uint64_t top;        /* the free block that ends at heap_end, or 0 */
    uint64_t journal;    /* the batch journal block while committing */
    uint64_t journal_n;
    /* line 2: statistics */
    uint64_t growths, index_growths, recycles, recoveries, vacuums, batches;
    /* A hint of the free lists that may hold blocks (bit b: bins[b]), so an
     * allocation does not read a hundred empty heads.  Set when a block is
     * pushed, cleared when a search finds the list empty and with the lists.
     * A wrong bit costs one look, or hides a list until the next recycle
     * rebuilds them all; it never hands out a block. */
    uint64_t bin_hint[2];
    /* free lists: exact sizes below 1040 bytes, then powers of two */
    uint64_t bins[NBINS];
    /* live views, per attach slot (format 2): (token generation << 12) | count.
     * A recycle is deferred while a live attachment's count is nonzero; the
     * count of a dead attachment is ignored (and cleared by writers). */
    uint32_t views[T_VIEW_SLOTS];
} THeader;

_Static_assert(sizeof(THeader) <= T_HEADER, "store header too large");
_Static_assert(offsetof(THeader, lock) == 64, "lock on its own line");

/* The block layouts as C structs, for the _Static_asserts below (the code
 * reads shared words by offset with atomics, after bounds checks). */
typedef struct {
    uint64_t head; /* size | B_* flags */
    uint64_t link; /* free blocks: next block of the free list */
} TBlockHead;

typedef struct {
    TBlockHead b;
    uint64_t hash;
    uint32_t klen;
    uint8_t ktype, vtype;
    uint16_t zero;
    uint64_t vlen;
    /* key bytes, then value bytes */
} TRecordHead;

typedef struct {
    TBlockHead b;
    uint64_t nslots;
    uint64_t _r;
    /* nslots u64 index words */
} TIndexHead;

typedef struct {
    TBlockHead b;
    uint64_t n;     /* entries */
    uint64_t index; /* offset of the index the entries are slots of */
    /* n x (u64 slot, u64 word) */
} TJournalHead;

#define T_AT(T, F, OFF) _Static_assert(offsetof(T, F) == (OFF), #T "." #F " moved")
T_AT(THeader, epoch, 0);
T_AT(THeader, index, 8);
T_AT(THeader, seed, 16);
T_AT(THeader, heap_start, 24);
T_AT(THeader, heap_end, 32);
T_AT(THeader, index_gen, 40);
T_AT(THeader, lock, 64);
T_AT(THeader, state, 68);
T_AT(THeader, count, 72);
T_AT(THeader, tombstones, 80);
T_AT(THeader, used, 88);
T_AT(THeader, pending, 96);
T_AT(THeader, top, 104);
T_AT(THeader, journal, 112);
T_AT(THeader, journal_n, 120);
T_AT(THeader, growths, 128);
T_AT(THeader, bin_hint, 176);
T_AT(THeader, bins, 192);
_Static_assert(NBINS <= 128, "bin_hint has a bit per bin");
T_AT(THeader, views, 1024);
T_AT(TBlockHead, link, 8);
T_AT(TRecordHead, hash, 16);
T_AT(TRecordHead, klen, 24);
T_AT(TRecordHead, ktype, 28);
T_AT(TRecordHead, vtype, 29);
T_AT(TRecordHead, zero, 30);
T_AT(TRecordHead, vlen, 32);
_Static_assert(sizeof(TRecordHead) == T_REC_HDR, "record header is 40 bytes");
T_AT(TIndexHead, nslots, 16);
_Static_assert(sizeof(TIndexHead) == T_INDEX_HDR, "index header is 32 bytes");
T_AT(TJournalHead, n, 16);
T_AT(TJournalHead, index, 24);
_Static_assert(sizeof(TJournalHead) == T_JOURNAL_HDR, "journal header is 32 bytes");
#undef T_AT

/* ---- the protocol's view of one handle (table.c) ---------------------------
 * Everything the protocol needs of a Table handle, in plain C: the Table
 * type (tabletype.c) embeds one and passes it to every t_* function. */
#include "shmkit.h"
#include <pthread.h>

#define LDA(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LDR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STA(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define W64(P, off) ((uint64_t *)((P) + (off)))

typedef struct {
    uint64_t slot; /* the index word's number */
    uint64_t word;
} OvEntry;

/* A batch's index words, not yet published: e[0..n) in the order they were
 * first set (so a commit walks them densely), found by slot through the
 * hash table pos[cap] of entry numbers + 1 (0: empty). */
typedef struct {
    OvEntry *e;        /* room for cap / 2 */
    uint32_t *pos;
    size_t n, cap;
    uint64_t newslots; /* entries whose published word is empty */
} Overlay;

/* A batch's put whose index word is not looked for yet.  A batch writes
 * each record at once but probes the index for the staged puts together
 * (at its next read, or when it is published), so that their cache misses
 * overlap instead of following one another. */
typedef struct {
    uint64_t off, hash; /* the record (its key at off + T_REC_HDR), the key's hash */
    uint32_t klen;
    uint8_t ktype;
} Staged;

typedef struct {
    Staged *e;
    size_t n, cap;
} StagedPuts;

typedef struct TCore {
    MappingObject *m;     /* the segment's mapping (held by the type) */
    uint64_t poff;        /* absolute offset of the payload in the mapping */
    uint64_t seed;
    int readonly;
    int64_t timeout_ns;   /* writer lock wait; -1 forever */
    int64_t read_timeout_ns; /* readers' wait for a batch to be published; -1 forever */
    unsigned long lock_thread; /* t_thread() of the holder while lock_depth > 0 */
    int lock_depth;
    int batch_depth;
    uint64_t end;         /* heap_end as checked when the lock was taken */
    Overlay ov;
    StagedPuts staged;    /* the open batch's puts not in ov yet (t_batch_resolve) */
    /* Grow the segment by at least `need` bytes (the type calls Python's
     * grow hook).  0, or -1 with the error already raised (TE_RAISED). */
    int (*grow)(struct TCore *t, uint64_t need);
} TCore;

#define HDR(t) ((THeader *)((t)->m->base + (t)->poff))
#define PAY(t) ((char *)(t)->m->base + (t)->poff)

/* The calling thread, as the lock's owner (shm_thread_serial: a new thread
 * never passes for an ended one). */
static inline unsigned long t_thread(void) { return shm_thread_serial(); }

/* ---- errors ------------------------------------------------------------------
 * A t_* function that fails returns -1 (0 for t_enter, (uint64_t)-1 for an
 * offset) after shm_fail() (error.c) recorded one of these codes and a
 * message for the calling thread; the type turns that record into an
 * exception (t_raise in tabletype.c).
 * TE_RAISED: a callback of the type (the grow hook) already raised. */
enum {
    TE_NONE, TE_RAISED, TE_CORRUPT, TE_NOMEM, TE_FULL, TE_READONLY, TE_CLOSED,
    TE_VALUE, TE_RUNTIME
};

/* ---- records and keys ---- */
typedef struct {
    const char *p;
    Py_ssize_t n;
    uint8_t type;
    uint64_t h;
    char small[8];
    char *big;
} TKey;

typedef struct {
    uint64_t size; /* block size */
    uint64_t hash;
    uint32_t klen;
    uint8_t ktype, vtype;
    uint64_t vlen;
} TRec;

typedef struct {
    uint64_t ix, nslots, mask;
    uint64_t *slots;
} TIndex;

/* Where a writer found (P_FOUND) or will put (P_ABSENT) a key. */
typedef struct {
    uint64_t slot, old; /* the slot and the word it holds now */
    int from_ov;        /* that word is the open batch's, not published */
} TSlot;

enum { P_ABSENT = 0, P_FOUND = 1, P_RACE = 2 };

uint64_t thash(const char *p, size_t n, uint64_t seed);
static inline uint64_t
t_key_hash(uint64_t seed, const char *p, size_t n, uint8_t type)
{
    return thash(p, n, seed ^ (type * 0x9E3779B97F4A7C15ull));
}
static inline uint64_t rec_word(uint64_t off, uint64_t hash) { return (off >> 4) | (W_TAG(hash) << 40); }
static inline uint64_t word_off(uint64_t w) { return (w & W_OFF_MASK) << 4; }
static inline uint64_t rd64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t rd32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* ---- the epoch ---- */
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
 * so they are the u64's first four bytes).  A batch changes the epoch by
 * one, so those bits change whenever the epoch does. */
#define EPOCH_WORD(h) ((uint32_t *)&(h)->epoch)

/* After the epoch was made even: wake the readers asleep on it. */
static inline void
epoch_wake(THeader *h)
{
    shm_futex_wake(EPOCH_WORD(h), INT32_MAX);
}

/* ---- entering, lock-free reading (table.c) ---- */
/* Every get calls these: inline, so the read path makes no calls of its own. */

/* Bytes of payload this process may touch. */
static inline uint64_t
t_lim(TCore *t)
{
    return (uint64_t)t->m->length - t->poff;
}

static inline int
t_live(TCore *t)
{
    if (__builtin_expect(t->m == NULL || t->m->base == NULL, 0))
        return shm_fail(TE_CLOSED, "the store is closed in this process; open it again");
    return 0;
}

/* Read and bounds-check a record header at off (each field read once).
 * Returns 0 when plausible, -1 when not (no exception set). */
static inline int
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

/* Is there a plausible index at ix?  1 with *nslots, else 0. */
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

int t_sync(TCore *t);
uint64_t t_enter(TCore *t);
int probe_ro(const char *P, uint64_t end, const TKey *k, uint64_t *off, TRec *rec);

/* The wait for an even epoch (the type runs it through wait.h). */
typedef struct {
    TCore *t;
    THeader *h;
    uint64_t even; /* out: the even epoch seen */
    int dead;      /* out: nobody alive is publishing */
} TEvenWait;
int t_even_ready(void *ctx, uint32_t *sleep_on);
int t_even_check(void *ctx);

/* ---- writers (lock held) ---- */
int t_recover(TCore *t);
int t_locked_check(TCore *t);
void t_mark_dirty(TCore *t);
static inline int t_in_batch(TCore *t) { return t->batch_depth > 0 && t->lock_thread == t_thread(); }
int t_free(TCore *t, uint64_t off); /* -1: the block is damaged (CorruptError) */
int t_index(TCore *t, TIndex *x);
uint64_t wword(TCore *t, TIndex *x, uint64_t i, int *from_ov);
int probe_w(TCore *t, TIndex *x, const TKey *k, uint64_t *slot, uint64_t *word, int *from_ov);
void ov_clear(Overlay *o);
int ov_fits(const Overlay *o, const TIndex *x);
void staged_clear(StagedPuts *sp);
int t_put_find(TCore *t, const TKey *k, TSlot *s);
int t_stage_room(TCore *t);
int t_stage(TCore *t, uint64_t off, const TKey *k);
int t_batch_resolve(TCore *t);
uint64_t t_put_write(TCore *t, const TKey *k, uint8_t vtype, uint64_t vlen, char **value);
int t_put_publish(TCore *t, const TSlot *s, uint64_t off, uint64_t hash);
int t_delete_find(TCore *t, const TKey *k, TSlot *s);
int t_delete_publish(TCore *t, const TSlot *s);
void t_batch_discard(TCore *t);
int t_batch_commit(TCore *t);
int t_clear_locked(TCore *t);
int t_format(TCore *t, uint64_t seed);

/* ---- views ---- */
int view_hold(TCore *t);
void view_unhold(MappingObject *m, uint64_t poff, uint32_t token);

/* ---- verification, statistics, vacuum ---- */
typedef struct {
    uint64_t blocks, records, used, free_bytes, largest_free, index_bytes;
} TWalk;
int t_verify(TCore *t, TWalk *out);
typedef struct {
    uint64_t count, tombstones, used, heap, free_bytes, free_blocks, largest_free,
        pending, index_slots, growths, index_growths, recycles, recoveries, vacuums,
        batches, epoch;
} TStats;
void t_stats(TCore *t, uint64_t end, TStats *s);
int t_vacuum(TCore *t, uint64_t *new_end, uint64_t *moved);

#endif
