/* table.h - the store's shared layout (table.c holds the protocol and the
 * Table type that uses it).
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
    uint64_t _r2[2];
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
T_AT(THeader, bins, 192);
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

#endif
