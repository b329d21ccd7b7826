/* heap.h - the heap's shared layout and the declarations its two halves
 * share: heap.c holds the protocol (no Python objects, no Python API; errors
 * are recorded with shm_fail, error.c) and heaptype.c the HeapCore and Pin types.
 *
 * Payload layout (offsets from the payload start; a "unit" is 16 bytes; a
 * "word" is a u64 and pairs of u32 fields are packed into words as
 * lo | hi << 32, so the layout does not depend on byte order):
 *
 *   0     header, 4096 bytes
 *           0  u32 lock         robust mutex (lock.c) guarding every change
 *           4  u32 format       HEAP_FORMAT
 *           8  u64 magic        HEAP_MAGIC
 *          16  u64 table_off    handle table (always 4096)
 *          24  u64 pins_off     pin tables
 *          32  u64 data_off     data area (page aligned)
 *          40  u64 max_units    most units the data area may grow to (< 2^32)
 *          48  word max_blocks | max_pins << 32
 *          56  word max_slots | salt << 32
 *        -- changed only under the lock, through the undo journal --
 *          64  u64 free_handle  first free handle-table entry + 1 (0: none)
 *          72  u64 fresh        entries ever used; those past it are untouched
 *          80  u64 used_units   96 u64 free_units
 *          88  u64 used_blocks 104 u64 free_blocks
 *         112  u64 cursor       compaction cursor: always a block boundary
 *         120  u64 units        data area size in units now (grows, never shrinks;
 *                               the segment's file is extended before it grows)
 *         128  u64 bitmap[2]    bit b set <=> free list b is not empty
 *        -- statistics, atomic adds, not journaled --
 *         192  u64 allocs, frees, moves, moved_bytes, compactions,
 *                  recoveries, reclaimed_pins, reallocs
 *         256  word bins[64]    free-list heads, two per word (unit + 1)
 *         768  u64 pinbits[16]  bit s set once attach slot s has pinned (never cleared)
 *        1024  move journal     active, idx, src, dst, size, gap, prev, done
 *        2048  undo journal     the core's shared journal (journal.h), 127 entries:
 *                               u64 count, then count x (u64 off | W32 << 63, u64 old)
 *   4096  handle table, max_blocks x 32 bytes
 *           0 u64 state   generation << 32 | flags (1 LIVE, 2 BUSY)
 *           8 u64 unit    first unit of the block
 *          16 u64 nbytes  size the caller asked for
 *          24 u64 link    free entry: next free entry + 1; live: allocator token
 *   pins_off  pin tables, max_slots x (64 + 8 x max_pins) bytes
 *           0 u32 used    records in use, high-water mark
 *          64 u64 record  entry + 1 (bits 0-31) | count (32-43) | attach gen (44-63)
 *   data_off  blocks, back to back, each with a 16-byte header
 *           0 word size | prev << 32     units, header included; size of the block before
 *           8 word handle | check << 32  entry + 1 (0 = free); hash of the header and its place
 *          16 word next | prev << 32     free blocks only: free-list links (unit + 1)
 *
 */
#ifndef SHMKIT_HEAP_H
#define SHMKIT_HEAP_H

#include "journal.h"
#include <stddef.h>

#define HEAP_FORMAT 3u
#define HEAP_MAGIC 0x31504145484d4853ull /* "SHMHEAP1" */
#define UNIT 16u
#define MIN_UNITS 2u
#define MAX_UNITS 0xFFFFFFF0u
#define NBINS 128
#define HDR_BYTES 4096u
#define ENTRY_BYTES 32u
#define PIN_HEAD 64u
#define MAX_PINS 4096u
#define PAGE_BYTES 4096u

#define H_LOCK 0
#define H_FORMAT 4
#define H_MAGIC 8
#define H_TABLE 16
#define H_PINS 24
#define H_DATA 32
#define H_MAX_UNITS 40
#define H_BLOCKS_PINS 48
#define H_SLOTS_SALT 56
#define H_FREEH 64
#define H_FRESH 72
#define H_USED_U 80
#define H_USED_B 88
#define H_FREE_U 96
#define H_FREE_B 104
#define H_CURSOR 112
#define H_UNITS 120
#define H_BITMAP 128
#define H_STAT 192
#define H_BINS 256
#define H_PINBITS 768
#define H_MOVE 1024
#define H_JOURNAL 2048
#define J_MAX 127u

enum { ST_ALLOCS, ST_FREES, ST_MOVES, ST_MOVED, ST_COMPACTIONS, ST_RECOVERIES,
       ST_RECLAIMED, ST_REALLOCS, ST_COUNT };
enum { M_ACTIVE = 0, M_IDX = 8, M_SRC = 16, M_DST = 24, M_SIZE = 32, M_GAP = 40,
       M_PREV = 48, M_DONE = 56 };
enum { E_STATE = 0, E_UNIT = 8, E_NBYTES = 16, E_LINK = 24 };

#define F_LIVE 1u
#define F_BUSY 2u
#define PIN_ONE (1ull << 32)
#define PIN_CNT(v) ((uint32_t)(((v) >> 32) & 0xFFFu))
#define PIN_GEN(v) ((uint32_t)((v) >> 44))
#define PIN_CNT_MAX 0xFFFu

/* The layout as C structs, for the _Static_asserts below: the code
 * addresses fields by the offsets above (the payload is reached through a
 * checked base pointer, never through these types). */
typedef struct {
    uint32_t lock, format;
    uint64_t magic, table_off, pins_off, data_off, max_units;
    uint64_t blocks_pins, slots_salt;
    /* changed only under the lock, through the undo journal */
    uint64_t free_handle, fresh, used_units, used_blocks, free_units, free_blocks;
    uint64_t cursor, units;
    uint64_t bitmap[NBINS / 64];
    uint64_t _r1[6];
    uint64_t stat[8];          /* atomic adds, not journaled */
    uint64_t bins[NBINS / 2];  /* two u32 heads per word */
    uint64_t pinbits[16];
    uint64_t _r2[16];
    uint64_t move[8];          /* the move journal: HeapMove */
    uint64_t _r3[120];
    uint64_t journal[2 + 2 * J_MAX]; /* the shared undo journal (journal.h) */
} HeapHeader;

typedef struct {
    uint64_t state;  /* generation << 32 | F_LIVE | F_BUSY */
    uint64_t unit;   /* first unit of the block */
    uint64_t nbytes; /* size the caller asked for */
    uint64_t link;   /* free: next free entry + 1; live: allocator token */
} HeapEntry;

typedef struct {
    uint64_t active, idx, src, dst, size, gap, prev, done;
} HeapMove;

typedef struct {
    uint64_t size_prev;    /* size | prev << 32, in units */
    uint64_t handle_check; /* entry + 1 (0: free) | check << 32 */
    uint64_t links;        /* free blocks: next | prev << 32 (unit + 1) */
} HeapBlock;

#define HEAP_AT(T, F, OFF) _Static_assert(offsetof(T, F) == (OFF), #T "." #F " moved")
HEAP_AT(HeapHeader, lock, H_LOCK);
HEAP_AT(HeapHeader, format, H_FORMAT);
HEAP_AT(HeapHeader, magic, H_MAGIC);
HEAP_AT(HeapHeader, table_off, H_TABLE);
HEAP_AT(HeapHeader, pins_off, H_PINS);
HEAP_AT(HeapHeader, data_off, H_DATA);
HEAP_AT(HeapHeader, max_units, H_MAX_UNITS);
HEAP_AT(HeapHeader, blocks_pins, H_BLOCKS_PINS);
HEAP_AT(HeapHeader, slots_salt, H_SLOTS_SALT);
HEAP_AT(HeapHeader, free_handle, H_FREEH);
HEAP_AT(HeapHeader, fresh, H_FRESH);
HEAP_AT(HeapHeader, used_units, H_USED_U);
HEAP_AT(HeapHeader, used_blocks, H_USED_B);
HEAP_AT(HeapHeader, free_units, H_FREE_U);
HEAP_AT(HeapHeader, free_blocks, H_FREE_B);
HEAP_AT(HeapHeader, cursor, H_CURSOR);
HEAP_AT(HeapHeader, units, H_UNITS);
HEAP_AT(HeapHeader, bitmap, H_BITMAP);
HEAP_AT(HeapHeader, stat, H_STAT);
HEAP_AT(HeapHeader, bins, H_BINS);
HEAP_AT(HeapHeader, pinbits, H_PINBITS);
HEAP_AT(HeapHeader, move, H_MOVE);
HEAP_AT(HeapHeader, journal, H_JOURNAL);
_Static_assert(sizeof(HeapHeader) == HDR_BYTES, "the heap header is one page");
_Static_assert(SHM_JOURNAL_BYTES(J_MAX) == HDR_BYTES - H_JOURNAL,
               "the undo journal fills the header's last half");
_Static_assert(ST_COUNT <= 8, "statistics fit their words");
HEAP_AT(HeapEntry, state, E_STATE);
HEAP_AT(HeapEntry, unit, E_UNIT);
HEAP_AT(HeapEntry, nbytes, E_NBYTES);
HEAP_AT(HeapEntry, link, E_LINK);
_Static_assert(sizeof(HeapEntry) == ENTRY_BYTES, "a handle entry is 32 bytes");
HEAP_AT(HeapMove, active, M_ACTIVE);
HEAP_AT(HeapMove, idx, M_IDX);
HEAP_AT(HeapMove, src, M_SRC);
HEAP_AT(HeapMove, dst, M_DST);
HEAP_AT(HeapMove, size, M_SIZE);
HEAP_AT(HeapMove, gap, M_GAP);
HEAP_AT(HeapMove, prev, M_PREV);
HEAP_AT(HeapMove, done, M_DONE);
_Static_assert(sizeof(HeapMove) == 64, "the move journal is 8 words");
_Static_assert(offsetof(HeapBlock, links) == UNIT, "a block header is one unit");
#undef HEAP_AT

/* ---- the protocol's view of one heap (heap.c) -------------------------------
 * The geometry is validated once, when the handle is made (h_bind); the
 * header's copy is never trusted again. */
#include "shmkit.h"

#define ROOM_SPLIT (-1) /* alloc/realloc: enough free space, but split up */
#define ROOM_SHORT (-2) /* alloc/realloc: not enough free space: grow */
#define SCAN_LIMIT 4096 /* headers a compaction step walks at most */

typedef struct HCore {
    MappingObject *m;   /* the segment's mapping (held by the type) */
    long long hoff;     /* payload offset within the mapping */
    uint64_t plen;      /* payload bytes this process has seen (grows with the heap) */
    uint64_t table_off, pins_off, data_off, stride;
    uint64_t units;     /* data area now: re-read at every begin() and under the lock */
    uint64_t max_units; /* the most the data area may grow to */
    uint32_t max_blocks, max_pins, max_slots, salt;
    char what[96];      /* "heap 'name'", for messages */
    /* Let other threads run during a long copy (the type releases the GIL);
     * NULL: copy without. */
    void *(*nogil)(void);
    void (*gil)(void *);
} HCore;

/* One operation's view: the payload's address and the heap's geometry. */
typedef struct {
    HCore *h;
    char *p;
    shm_journal jn; /* the undo journal at H_JOURNAL */
    int locked;
} Ctx;

typedef struct {
    uint32_t size, prev, handle;
} Blk;

/* ---- errors ------------------------------------------------------------------
 * A failing h_* function returns -1 after shm_fail() (error.c) recorded one
 * of these codes and a message for the calling thread; the type raises it
 * (h_raise in heaptype.c).  The core's shared modules it calls (journal.c)
 * raise their own. */
enum { HE_NONE, HE_CORRUPT, HE_STALE, HE_PINNED, HE_FULL, HE_VALUE, HE_RUNTIME, HE_NOMEM };

static inline uint64_t ld(Ctx *c, uint64_t off)
{
    return __atomic_load_n((uint64_t *)(c->p + off), __ATOMIC_ACQUIRE);
}
static inline uint64_t entry_off(Ctx *c, uint32_t idx)
{
    return c->h->table_off + (uint64_t)idx * ENTRY_BYTES;
}

/* ---- heap.c ---- */
int sync_units(Ctx *c);
int locked_repair(Ctx *c, int owner_died);
int want_units(HCore *h, unsigned long long n, uint32_t *units);
int check_handle(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *st);
enum { HR_SPLIT = 1, HR_SHORT = 2 }; /* no room (see ROOM_SPLIT, ROOM_SHORT) */
int h_alloc(Ctx *c, uint64_t n, int zero, const char *src, uint32_t want, uint64_t *handle);
int h_grow(Ctx *c, uint64_t n);
int h_free(Ctx *c, uint32_t idx, uint32_t gen);
int h_realloc(Ctx *c, uint32_t idx, uint32_t gen, uint64_t n, int zero, uint32_t want);
int h_size_read(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *n);
int h_pin_take(Ctx *c, uint32_t idx, uint32_t gen, uint32_t me, uint64_t **rec,
               uint64_t *off, uint64_t *n);
int h_pin_settled(Ctx *c, uint32_t idx);
int drop_pin(Ctx *c, uint64_t *rec);
int h_unpin(Ctx *c, uint32_t idx, uint32_t token);
uint64_t h_pins_held(Ctx *c, uint32_t me);
typedef struct {
    unsigned long long moved, nmoved, run, skipped;
    int done;
} HStep;
int h_compact_step(Ctx *c, int restart, uint64_t until, uint64_t budget, HStep *out);
typedef struct {
    uint64_t used, free, blocks, free_blocks, handles_used, largest_units;
    uint64_t stat[ST_COUNT];
    int64_t pinned;
    int have_largest;
} HStats;
int h_stats(Ctx *c, int locked, HStats *s);
typedef struct {
    uint64_t blocks, free_blocks, used, free, handles_used, free_handles;
    int64_t pinned;
} HVerify;
int h_verify(Ctx *c, HVerify *v);
int h_where(Ctx *c, uint32_t idx, uint32_t gen, uint64_t *unit, uint64_t *n, int64_t *pins);
int h_layout(uint64_t data, uint64_t most, uint64_t blocks, uint64_t pins, uint64_t slots,
             uint64_t *plen_now, uint64_t *plen_max);
int h_format(char *p, uint64_t data, uint64_t most, uint64_t blocks, uint64_t pins,
             uint64_t slots, uint64_t salt);
int h_bind(HCore *h, char *p, uint64_t plen, long long hoff);

#endif
