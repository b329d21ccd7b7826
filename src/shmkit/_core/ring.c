/* ring.c - the message ring behind shmkit.Channel and shmkit.Queue.
 *
 * A byte ring in a segment's payload carries variable-size messages from
 * any number of producers to any number of consumers, in any processes.
 * Positions are 64-bit byte counts that only grow (offset = pos % cap), so
 * "full", "empty" and "who is ahead" never wrap around.
 *
 * Payload layout (offsets from the payload start, native byte order):
 *
 *      0  magic u32 "RNG1"        4  format u32 (RING_FORMAT)
 *      8  cap u64                 bytes in the data area, a multiple of 8
 *     16  data_off u64            where the data area starts
 *     24  max_items u64           0, or at most this many messages queued
 *     32  max_slots u32           attach slots of the segment (role table)
 *     36  closed u32              1: no more sends; receivers drain and stop
 *     64  tail u64                producers' line: end of the reserved bytes
 *     72  reserved u64            messages reserved so far
 *     80  plock u32               producers' robust lock (lock.c)
 *    128  head u64                consumers' line: bytes before it are free
 *    136  read u64                next record to hand to a consumer
 *    144  received u64           messages taken so far
 *    152  dropped u64             messages abandoned by dead producers
 *    160  clock u32               consumers' robust lock
 *    192  data_seq u32, data_sleepers u32     consumers asleep wait here
 *    256  space_seq u32, space_sleepers u32   producers asleep wait here
 *    512  role table: u64 per attach slot (see ROLE_*)
 *    data_off: the data area, cap bytes of records
 *
 * A record is an 8-byte header [u32 len | u32 state] and len payload bytes,
 * padded to 8.  A record never straddles the end of the ring: a producer
 * whose record does not fit before the end first writes a SKIP record
 * covering the rest, then starts again at offset 0.
 *
 *     head <= read <= tail,   tail - head <= cap
 *
 *     [head, read)  taken records: DONE, SKIP, ABANDONED, or TAKEN by a
 *                   consumer that still holds a zero-copy view of it
 *     [read, tail)  records to deliver: RESERVED (being written), COMMITTED,
 *                   SKIP, ABANDONED
 *
 * Sending: under plock, check space (tail - head + need <= cap), write the
 * record header with state RESERVED|token, publish it with a release store
 * of tail, unlock.  Copy the payload with no lock held, then publish it
 * with a release store of state = COMMITTED.  Receiving: under clock, take
 * the COMMITTED record at read (copying it, or marking it TAKEN|token for a
 * view), advance read, and advance head over every finished record.
 *
 * Crashes.  The locks are robust: a dead holder's lock is taken over.  A
 * producer dead before tail moved leaves nothing; one dead after leaves a
 * RESERVED record whose token names it: a waiting consumer that sleeps a
 * slice without news asks the kernel (shm_token_alive) and, if the producer
 * is gone, marks the record ABANDONED and skips it.  A consumer dead while
 * holding clock can only leave COMMITTED records between head and read; the
 * next holder marks them DONE.  A view holder's death leaves TAKEN|token at
 * head; a waiter finds the token dead and finishes the record.  Each of
 * these is one store, so a process killed at any instruction leaves a state
 * the others can read.  docs/channel.md walks through every step.
 *
 * Waiting: spin on the condition, then sleep on a sequence word, counted in
 * its sleepers word and in our role-table entry.  Wakers bump the sequence
 * and call futex_wake only when the sleepers word is non-zero, so the busy
 * path makes no system call.  A sleeper that dies leaves its count in its
 * role entry, from which a later waiter subtracts it.
 *
 * Everything read from shared memory is untrusted: positions, lengths and
 * states are checked before use and a bad one raises CorruptError.  Offsets
 * are always taken modulo the capacity fixed when the handle was bound.
 */
#include "shmkit.h"
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define RING_MAGIC 0x31474e52u /* "RNG1" */
#define RING_FORMAT 1
#define RING_ROLES_OFF 512

#define SPIN_GIL_NS (2 * 1000LL)     /* poll this long before letting the GIL go */
#define SPIN_MAX_NS (50 * 1000LL)    /* then spin at most this long without it */
#define SPIN_START_NS (20 * 1000LL)
#define FIRST_SLICE_NS (5 * 1000 * 1000LL)
#define SLICE_NS (50 * 1000 * 1000LL) /* longest sleep between checks */
#define LOCK_GRACE_NS (200 * 1000 * 1000LL)
#define BIG_COPY (256 * 1024)        /* copies this large run without the GIL */

/* Record states.  The top two bits say what the low 30 hold. */
#define ST_KIND(s) ((s) & 0xC0000000u)
#define ST_RESERVED 0x40000000u /* | producer token: being written */
#define ST_TAKEN 0xC0000000u    /* | consumer token: lent out as a view */
#define ST_FIXED 0x80000000u
#define ST_COMMITTED 0x80000001u
#define ST_SKIP 0x80000002u
#define ST_ABANDONED 0x80000003u
#define ST_DONE 0x80000004u

/* Role-table entry of one attach slot:
 *   bits 0-15 consumers of this attachment asleep, 16-31 producers asleep,
 *   bit 32 has sent, bit 33 has received, bits 40-59 attach generation. */
#define ROLE_DATA_SLEEPER 1ull
#define ROLE_SPACE_SLEEPER (1ull << 16)
#define ROLE_SLEEPERS 0xFFFFFFFFull
#define ROLE_PRODUCER (1ull << 32)
#define ROLE_CONSUMER (1ull << 33)
#define ROLE_GEN(e) ((uint32_t)((e) >> 40) & 0xFFFFFu)
#define ROLE_FOR(gen) ((uint64_t)(gen) << 40)

/* A journal is written in full into the slot the selector does not point
 * at, then the selector flips (one store): a holder killed while writing it
 * leaves the previous, complete one in force. */
struct pjournal { uint64_t tail, reserved; };
struct cjournal { uint64_t read, received, dropped; };

struct ring_hdr {
    uint32_t magic, format;
    uint64_t cap, data_off, max_items;
    uint32_t max_slots, closed;
    char pad0[64 - 40];
    uint64_t tail, reserved;
    uint32_t plock, jp_sel;
    struct pjournal jp[2];
    char pad1[128 - 120];
    uint64_t head, read, received, dropped;
    uint32_t clock, jr_sel;
    char pad2[192 - 168];
    uint32_t data_seq, data_sleepers;
    char pad3[256 - 200];
    uint32_t space_seq, space_sleepers;
    char pad4[320 - 264];
    struct cjournal jr[2];
    char pad5[RING_ROLES_OFF - 368];
};
_Static_assert(offsetof(struct ring_hdr, tail) == 64, "producers' line");
_Static_assert(offsetof(struct ring_hdr, head) == 128, "consumers' line");
_Static_assert(offsetof(struct ring_hdr, clock) == 160, "consumers' lock");
_Static_assert(offsetof(struct ring_hdr, jp) == 88, "producers' journal");
_Static_assert(offsetof(struct ring_hdr, jr) == 320, "consumers' journal");
_Static_assert(offsetof(struct ring_hdr, data_seq) == 192, "data wait line");
_Static_assert(offsetof(struct ring_hdr, space_seq) == 256, "space wait line");
_Static_assert(sizeof(struct ring_hdr) == RING_ROLES_OFF, "role table");

typedef struct {
    uint32_t len, state;
} rec_t;

/* A process's handle on one ring.  Pointers are into this process's
 * mapping, which never moves while `mapping` is referenced. */
typedef struct {
    PyObject_HEAD
    PyObject *mapping;      /* the segment's Mapping; NULL when unbound */
    struct ring_hdr *h;
    char *data;
    uint64_t *roles;
    uint64_t cap;           /* fixed when bound: never re-read */
    uint32_t max_slots;
    uint32_t role_token;    /* token our role entry was claimed for */
    uint64_t role_bits;     /* roles announced for role_token */
    uint64_t head_seen;     /* a lower bound of head (producers) */
    uint64_t tail_seen;     /* a lower bound of tail (consumers) */
    int64_t spin_ns;        /* how long waits spin before sleeping (adaptive) */
    PyObject *name;
} RingObject;

typedef struct {
    PyObject_HEAD
    RingObject *ring;
    PyObject *mapping;
    rec_t *rec;
    char *payload;
    Py_ssize_t len;
    uint32_t token;
    Py_ssize_t exports;
    int released;
    PyObject *view;         /* the memoryview handed out by __enter__ */
} RecordViewObject;

static PyTypeObject Ring_Type, RecordView_Type;
static PyObject *ChannelClosed, *MessageTooLarge, *EmptyError, *FullError;

static inline uint64_t rec_total(uint64_t len) { return 8 + ((len + 7) & ~7ull); }
static inline rec_t *rec_at(RingObject *r, uint64_t pos)
{
    return (rec_t *)(r->data + (pos & ~7ull) % r->cap);
}
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOADR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORER(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

static int
corrupt(RingObject *r, const char *what, unsigned long long a, unsigned long long b)
{
    PyErr_Format(shm_CorruptError ? shm_CorruptError : PyExc_RuntimeError,
                 "channel %R is corrupt: %s (%llu, %llu); no correct writer leaves "
                 "this, so remove it with `shmkit rm` and create it again",
                 r->name ? r->name : Py_None, what, a, b);
    return -1;
}

/* ---- handles, roles and sleepers ------------------------------------- */

/* Check the handle is usable and pin its mapping for the call.  Returns
 * the mapping, or NULL with ClosedError-like ValueError set. */
static MappingObject *
ring_enter_any(RingObject *r, int to_use)
{
    MappingObject *m = (MappingObject *)r->mapping;
    if (m == NULL || m->base == NULL || m->closing || (to_use && m->token == 0)) {
        if (m != NULL && m->base != NULL && !m->closing && m->readonly)
            PyErr_Format(PyExc_PermissionError, "channel %R was opened readonly=True; "
                         "open it without readonly to send or receive", r->name);
        else
            PyErr_Format(PyExc_ValueError, "channel %R is closed in this process; open "
                         "it again to use it", r->name ? r->name : Py_None);
        return NULL;
    }
    shm_pin((PyObject *)m);
    return m;
}

/* For sending and receiving: a live, writable attachment. */
static inline MappingObject *ring_enter(RingObject *r) { return ring_enter_any(r, 1); }

static inline void ring_leave(MappingObject *m) { shm_unpin((PyObject *)m); }

/* Subtract n from a sleepers word, stopping at 0. */
static void
sat_sub(uint32_t *w, uint32_t n)
{
    uint32_t v = LOAD(w);
    while (!__atomic_compare_exchange_n(w, &v, v > n ? v - n : 0, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE))
        ;
}

/* Make our role entry ours (clearing what a dead former owner of the slot
 * left) and announce `bits`.  Cheap after the first call. */
static void
ring_claim(RingObject *r, uint32_t me, uint64_t bits)
{
    if (r->role_token == me && (r->role_bits & bits) == bits)
        return;
    uint32_t slot = SHM_TOKEN_SLOT(me);
    if (slot >= r->max_slots)
        return;
    uint64_t *e = &r->roles[slot], v = LOAD(e);
    for (;;) {
        uint64_t nv;
        if (ROLE_GEN(v) == SHM_TOKEN_GEN(me))
            nv = v | bits;
        else
            nv = ROLE_FOR(SHM_TOKEN_GEN(me)) | bits;
        if (__atomic_compare_exchange_n(e, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            if (ROLE_GEN(v) != SHM_TOKEN_GEN(me)) {
                /* the slot's former owner died asleep: take its counts off */
                uint32_t d = (uint32_t)(v & 0xFFFF), s = (uint32_t)((v >> 16) & 0xFFFF);
                if (d)
                    sat_sub(&r->h->data_sleepers, d);
                if (s)
                    sat_sub(&r->h->space_sleepers, s);
            }
            break;
        }
    }
    if (r->role_token != me)
        r->role_bits = 0;
    r->role_token = me;
    r->role_bits |= bits;
}

/* Count (delta = +1) or uncount (-1) one sleeper of ours, in the global
 * word and in our role entry.  Ordered so that a process killed between
 * the two leaves the global word too high (a spare wake-up, until a repair
 * finds no sleeper anywhere and clears it), never too low; a cleaner that
 * took our entry's counts off already fixed the global word. */
static void
ring_sleeper(RingObject *r, uint32_t me, int space, int delta)
{
    uint32_t slot = SHM_TOKEN_SLOT(me);
    uint32_t *g = space ? &r->h->space_sleepers : &r->h->data_sleepers;
    uint64_t unit = space ? ROLE_SPACE_SLEEPER : ROLE_DATA_SLEEPER;
    if (slot >= r->max_slots)
        return;
    if (delta > 0)
        __atomic_fetch_add(g, 1, __ATOMIC_SEQ_CST);
    uint64_t *e = &r->roles[slot], v = LOAD(e);
    while (ROLE_GEN(v) == SHM_TOKEN_GEN(me)) {
        if (delta < 0 && (v & (unit * 0xFFFF)) == 0)
            return;
        uint64_t nv = delta > 0 ? v + unit : v - unit;
        if (__atomic_compare_exchange_n(e, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            if (delta < 0)
                sat_sub(g, 1);
            return;
        }
    }
}

/* Wake everyone asleep on seq, if anyone is counted asleep.  The fence
 * pairs with the sleeper's count-then-recheck: one of us sees the other. */
static inline void
ring_wake(uint32_t *seq, uint32_t *sleepers)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (LOADR(sleepers)) {
        __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST);
        shm_futex_wake(seq, INT_MAX);
    }
}

/* ---- the consumers' side (call with clock held) ----------------------- */

/* One holding of clock that takes records.  It starts by writing the
 * journal (read, received, dropped as they were); it moves read record by
 * record, and stores the counters and then head once, at the end.  So if
 * its holder dies, either head has not passed the journal's read position
 * and the records from there to read are intact and can be counted again
 * (ring_fix_consumers), or the counters were already stored. */
typedef struct {
    uint64_t head, received, dropped;
} take_t;

static inline void
take_begin(struct ring_hdr *h, take_t *tk)
{
    tk->head = LOADR(&h->head);
    tk->received = LOADR(&h->received);
    tk->dropped = LOADR(&h->dropped);
    uint32_t sel = LOADR(&h->jr_sel) & 1;
    struct cjournal *j = &h->jr[sel ^ 1];
    STORER(&j->received, tk->received);
    STORER(&j->dropped, tk->dropped);
    STORER(&j->read, LOADR(&h->read));
    STORE(&h->jr_sel, sel ^ 1);
}

/* Move read past the record at rd (total bytes); head follows at the end
 * if nothing before it is lent out.  Returns 1 if head will move. */
static inline int
take_pass(struct ring_hdr *h, take_t *tk, uint64_t rd, uint64_t total)
{
    STORE(&h->read, rd + total);
    if (tk->head == rd) {
        tk->head = rd + total;
        return 1;
    }
    return 0;
}

/* Move head over finished records (DONE, SKIP, ABANDONED) from `hd`, and
 * store it if it moved.  Returns 1 if it moved, -1 on error. */
static int
ring_reclaim_from(RingObject *r, uint64_t hd)
{
    struct ring_hdr *h = r->h;
    uint64_t rd = LOADR(&h->read), start = LOADR(&h->head);
    if (hd < start || rd < hd || rd - hd > r->cap)
        return corrupt(r, "head and read positions out of order", hd, rd);
    while (hd < rd) {
        uint64_t off = hd % r->cap, total;
        rec_t *rec = rec_at(r, hd);
        uint32_t st = LOAD(&rec->state), len = LOADR(&rec->len);
        if (st == ST_SKIP)
            total = r->cap - off;
        else if (st == ST_DONE || st == ST_ABANDONED)
            total = rec_total(len);
        else if (ST_KIND(st) == ST_TAKEN)
            break;
        else
            return corrupt(r, "unexpected record state behind the read position", st, hd);
        if (total > r->cap - off || total > rd - hd)
            return corrupt(r, "record overruns the read position", len, hd);
        hd += total;
    }
    if (hd == start)
        return 0;
    STORE(&h->head, hd);
    return 1;
}

static inline int
ring_reclaim(RingObject *r)
{
    return ring_reclaim_from(r, LOADR(&r->h->head));
}

/* End a holding: counters first, then head.  Returns 1 if head moved. */
static inline int
take_end(RingObject *r, take_t *tk)
{
    struct ring_hdr *h = r->h;
    STORE(&h->received, tk->received);
    STORE(&h->dropped, tk->dropped);
    return ring_reclaim_from(r, tk->head);
}

/* After taking clock from a dead consumer: recount what its holding took,
 * finish the records it had copied, and give back one it was lending out
 * but had not passed yet.  Every step is idempotent, so a recoverer that
 * dies too leaves work the next one can redo. */
static int
ring_fix_consumers(RingObject *r)
{
    struct ring_hdr *h = r->h;
    struct cjournal *j = &h->jr[LOADR(&h->jr_sel) & 1];
    uint64_t hd = LOADR(&h->head), rd = LOADR(&h->read), jr = LOADR(&j->read);
    uint64_t t = LOAD(&h->tail);
    if (rd < hd || rd - hd > r->cap || t < rd || t - rd > r->cap || ((hd | rd | t) & 7))
        return corrupt(r, "read position outside the ring", rd, hd);
    if (hd <= jr) { /* head did not pass the journal: recount [jr, rd) */
        if (jr > rd || (jr & 7))
            return corrupt(r, "bad consumers' journal", jr, rd);
        uint64_t taken = 0, dropped = 0;
        for (uint64_t p = jr; p < rd;) {
            uint64_t off = p % r->cap;
            rec_t *rec = rec_at(r, p);
            uint32_t st = LOAD(&rec->state), len = LOADR(&rec->len);
            uint64_t total = st == ST_SKIP ? r->cap - off : rec_total(len);
            if (total > r->cap - off || total > rd - p)
                return corrupt(r, "record overruns the read position", len, p);
            if (st == ST_ABANDONED)
                dropped++;
            else if (st != ST_SKIP)
                taken++;
            p += total;
        }
        if (rd < t && LOAD(&rec_at(r, rd)->state) == ST_ABANDONED)
            dropped++; /* marked, not yet passed: the next holding passes it */
        STORE(&h->received, LOADR(&j->received) + taken);
        STORE(&h->dropped, LOADR(&j->dropped) + dropped);
    }
    for (uint64_t p = hd; p < rd;) { /* copied, head not yet moved: finish */
        rec_t *rec = rec_at(r, p);
        uint32_t st = LOAD(&rec->state);
        uint64_t total = st == ST_SKIP ? r->cap - p % r->cap : rec_total(LOADR(&rec->len));
        if (total > r->cap - p % r->cap || total > rd - p)
            return corrupt(r, "record overruns the read position", LOADR(&rec->len), p);
        if (st == ST_COMMITTED)
            STORE(&rec->state, ST_DONE);
        p += total;
    }
    if (rd < t && ST_KIND(LOAD(&rec_at(r, rd)->state)) == ST_TAKEN)
        STORE(&rec_at(r, rd)->state, ST_COMMITTED); /* lent, never passed: undo */
    return ring_reclaim(r) < 0 ? -1 : 0;
}

/* After taking plock from a dead producer: recount the messages of its
 * holding from its journal (no producer has written since). */
static int
ring_fix_producers(RingObject *r)
{
    struct ring_hdr *h = r->h;
    struct pjournal *j = &h->jp[LOADR(&h->jp_sel) & 1];
    uint64_t t = LOADR(&h->tail), jt = LOADR(&j->tail), n = 0;
    if (jt > t || t - jt > r->cap || ((jt | t) & 7))
        return corrupt(r, "bad producers' journal", jt, t);
    for (uint64_t p = jt; p < t;) {
        uint64_t off = p % r->cap;
        rec_t *rec = rec_at(r, p);
        uint32_t st = LOAD(&rec->state), len = LOADR(&rec->len);
        uint64_t total = st == ST_SKIP ? r->cap - off : rec_total(len);
        if (total > r->cap - off || total > t - p)
            return corrupt(r, "record overruns the tail", len, p);
        n += st != ST_SKIP;
        p += total;
    }
    STORE(&h->reserved, LOADR(&j->reserved) + n);
    return 0;
}

static int
ring_lock(RingObject *r, MappingObject *m, uint32_t *word, uint32_t me, int64_t deadline)
{
    uint32_t free_ = 0;
    if (__atomic_compare_exchange_n(word, &free_, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 1;
    int64_t grace = shm_now_ns() + LOCK_GRACE_NS;
    int got = shm_lock_acquire(m, word, deadline > grace ? deadline : grace);
    if (got == 0) {
        PyErr_Format(shm_TimeoutError, "channel %R: its %s lock stayed held by a live "
                     "process; try again", r->name ? r->name : Py_None,
                     word == &r->h->plock ? "producers'" : "consumers'");
        return -1;
    }
    if (got == 2 && (word == &r->h->clock ? ring_fix_consumers(r) : ring_fix_producers(r)) < 0) {
        shm_lock_release(m, word);
        return -1;
    }
    return got < 0 ? -1 : 1;
}

static inline void
ring_unlock(MappingObject *m, uint32_t *word)
{
    uint32_t v = __atomic_exchange_n(word, 0, __ATOMIC_RELEASE);
    if (v & SHM_LOCK_WAITERS)
        shm_futex_wake(word, 1);
}

enum { T_EMPTY = 0, T_READY = 1, T_WRITING = 2 };

/* Find the next deliverable record at read, passing over SKIP and
 * ABANDONED records.  Returns T_READY with *pos and *len, T_EMPTY,
 * T_WRITING (a producer is still writing it), or -1 on error. */
static int
ring_next(RingObject *r, take_t *tk, uint64_t *pos, uint32_t *len)
{
    struct ring_hdr *h = r->h;
    for (;;) {
        uint64_t rd = LOADR(&h->read), hd = LOADR(&h->head);
        if (rd >= r->tail_seen) {
            r->tail_seen = LOAD(&h->tail);
            if (rd >= r->tail_seen) {
                if (rd > r->tail_seen)
                    return corrupt(r, "read position beyond the tail", rd, r->tail_seen);
                return T_EMPTY;
            }
        }
        if (((rd | hd) & 7) || rd < hd || rd - hd > r->cap || r->tail_seen - hd > r->cap)
            return corrupt(r, "positions out of order", hd, rd);
        uint64_t off = rd % r->cap, total;
        rec_t *rec = rec_at(r, rd);
        uint32_t st = LOAD(&rec->state), n = LOADR(&rec->len);
        if (ST_KIND(st) == ST_RESERVED)
            return T_WRITING;
        if (st == ST_SKIP) {
            total = r->cap - off;
            if ((uint64_t)n + 8 != total)
                return corrupt(r, "bad wrap marker", n, rd);
        } else if (st == ST_COMMITTED || st == ST_ABANDONED) {
            total = rec_total(n);
        } else {
            return corrupt(r, "unexpected record state at the read position", st, rd);
        }
        if (total > r->cap - off || total > r->tail_seen - rd)
            return corrupt(r, "record length overruns the ring", n, rd);
        if (st == ST_COMMITTED) {
            *pos = rd;
            *len = n;
            return T_READY;
        }
        take_pass(h, tk, rd, total);
    }
}

/* The record at pos was copied out: count it and pass it. */
static inline void
take_copied(RingObject *r, take_t *tk, uint64_t pos, uint32_t len)
{
    if (tk->head != pos)
        STORE(&rec_at(r, pos)->state, ST_DONE);
    tk->received++;
    take_pass(r->h, tk, pos, rec_total(len));
}

/* The record at pos is lent out as a view: mark it, count it, pass it. */
static inline void
take_lent(RingObject *r, take_t *tk, uint64_t pos, uint32_t len, uint32_t me)
{
    STORE(&rec_at(r, pos)->state, ST_TAKEN | me);
    tk->received++;
    STORE(&r->h->read, pos + rec_total(len));
}

/* ---- the producers' side ---------------------------------------------- */

/* The ring is empty but its tail is too near the end for the record we
 * want: the SKIP marker just written at `was` would hold the space until a
 * consumer passes it.  If no record is pending, pass it ourselves (taking
 * clock after plock: the only order in which both are held). */
static int
ring_pass_skip(RingObject *r, MappingObject *m, uint32_t me, uint64_t was, uint64_t t)
{
    struct ring_hdr *h = r->h;
    uint32_t free_ = 0;
    if (!__atomic_compare_exchange_n(&h->clock, &free_, me, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0; /* a consumer is busy: it will pass the marker itself */
    int passed = LOADR(&h->read) == was && LOADR(&h->head) == was;
    if (passed) {
        take_t tk;
        take_begin(h, &tk);
        STORE(&h->tail, t);  /* a valid SKIP record first, then pass it */
        take_pass(h, &tk, was, t - was);
        passed = take_end(r, &tk) > 0;
    }
    ring_unlock(m, &h->clock);
    return passed;
}

/* Reserve records for n payloads of lens[] at the tail, as many as fit now
 * (SKIP markers included), under plock.  Fills pos[]; returns how many were
 * reserved (0 when full), or -1 with an exception set. */
static Py_ssize_t
ring_reserve(RingObject *r, MappingObject *m, uint32_t me, const Py_ssize_t *lens,
             Py_ssize_t n, uint64_t *pos, int64_t deadline)
{
    struct ring_hdr *h = r->h;
    const uint64_t cap = r->cap;
    if (ring_lock(r, m, &h->plock, me, deadline) < 0)
        return -1;
    if (LOADR(&h->closed)) {
        ring_unlock(m, &h->plock);
        PyErr_Format(ChannelClosed, "channel %R was closed: no more messages can be sent",
                     r->name);
        return -1;
    }
    uint64_t t = LOADR(&h->tail), t0 = t, hd = r->head_seen;
    uint64_t reserved = LOADR(&h->reserved);
    uint32_t sel = LOADR(&h->jp_sel) & 1; /* the journal: see ring_fix_producers */
    STORER(&h->jp[sel ^ 1].reserved, reserved);
    STORER(&h->jp[sel ^ 1].tail, t);
    STORE(&h->jp_sel, sel ^ 1);
    if ((t & 7) || t - hd > cap) {
        r->head_seen = hd = LOAD(&h->head);
        if (((t | hd) & 7) || t - hd > cap) {
            ring_unlock(m, &h->plock);
            return corrupt(r, "tail and head further apart than the capacity", t, hd);
        }
    }
    uint64_t room = UINT64_MAX;
    if (h->max_items) {
        uint64_t queued = reserved - LOAD(&h->received) - LOAD(&h->dropped);
        if (queued > (1ull << 62)) {
            ring_unlock(m, &h->plock);
            return corrupt(r, "more messages received than sent", reserved,
                           LOAD(&h->received));
        }
        room = queued >= h->max_items ? 0 : h->max_items - queued;
    }
    Py_ssize_t k = 0;
    while (k < n && (uint64_t)k < room) {
        uint64_t total = rec_total((uint64_t)lens[k]), off = t % cap;
        uint64_t need = off + total > cap ? cap - off : total;
        if (cap - (t - hd) < need) {
            r->head_seen = hd = LOAD(&h->head);
            if (t - hd > cap) {
                ring_unlock(m, &h->plock);
                return corrupt(r, "tail and head further apart than the capacity", t, hd);
            }
            if (cap - (t - hd) < need)
                break;
        }
        rec_t *rec = (rec_t *)(r->data + off);
        if (off + total > cap) {            /* wrap: mark the rest as skipped */
            STORER(&rec->len, (uint32_t)(cap - off - 8));
            STORER(&rec->state, ST_SKIP);
            uint64_t was = t;
            t += cap - off;
            if (hd != was)
                r->head_seen = hd = LOAD(&h->head);
            if (hd == was && ring_pass_skip(r, m, me, was, t))
                r->head_seen = hd = t;
            continue;
        }
        STORER(&rec->len, (uint32_t)lens[k]);
        STORER(&rec->state, ST_RESERVED | me);
        pos[k++] = t;
        t += total;
    }
    if (t != t0) {
        STORE(&h->reserved, reserved + (uint64_t)k);
        STORE(&h->tail, t);                 /* publish the headers */
    }
    ring_unlock(m, &h->plock);
    return k;
}

static void
ring_fill(RingObject *r, uint64_t pos, const char *src, Py_ssize_t len)
{
    rec_t *rec = rec_at(r, pos);
    if (len >= BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(rec + 1, src, (size_t)len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(rec + 1, src, (size_t)len);
    }
    STORE(&rec->state, ST_COMMITTED);
}

/* ---- waiting ----------------------------------------------------------- */

/* Is there anything for a consumer to look at?  A lock-free hint; anything
 * odd says yes so that the checking path runs. */
static int
data_ready(RingObject *r)
{
    struct ring_hdr *h = r->h;
    uint64_t rd = LOAD(&h->read), t = LOAD(&h->tail);
    if (rd == t)
        return LOAD(&h->closed) != 0; /* closed and drained: the caller stops */
    if (rd > t || t - rd > r->cap || ((rd | t) & 7))
        return 1;
    return ST_KIND(LOAD(&rec_at(r, rd)->state)) != ST_RESERVED;
}

static int
space_ready(RingObject *r, uint64_t total)
{
    struct ring_hdr *h = r->h;
    if (LOAD(&h->closed))
        return 1;
    uint64_t t = LOAD(&h->tail), hd = LOAD(&h->head), off = t % r->cap;
    if (t - hd > r->cap || ((t | hd) & 7))
        return 1;
    uint64_t need = off + total > r->cap ? r->cap - off : total;
    if (r->cap - (t - hd) < need)
        return 0;
    if (h->max_items) {
        uint64_t queued = LOAD(&h->reserved) - LOAD(&h->received) - LOAD(&h->dropped);
        if (queued >= h->max_items && queued <= (1ull << 62))
            return 0;
    }
    return 1;
}

static int ring_repair(RingObject *r, MappingObject *m);

/* Wait until a consumer (space=0) or a producer of a `total`-byte record
 * (space=1) has something to do, or the deadline passes.  Spins (GIL
 * held) for an adaptive moment, then sleeps on the sequence word as a
 * counted sleeper, without the GIL.  After each slice asleep without
 * news it repairs what dead peers left.  Returns 1 ready, 0 timeout, -1
 * with an exception set (Ctrl-C, handle closed meanwhile). */
static int
ring_wait(RingObject *r, MappingObject *m, uint32_t me, int space, uint64_t total,
          int64_t deadline)
{
#define READY() (space ? space_ready(r, total) : data_ready(r))
    if (deadline != SHM_FOREVER && shm_now_ns() >= deadline)
        return 0;
    /* Spinning pays when the peer answers within microseconds, and costs
     * when it needs our CPU to answer at all (more runnable processes than
     * cores).  So the spin adapts: it doubles after a wait that it ended
     * and halves after one that had to sleep. */
    int64_t start = shm_now_ns(), spin = r->spin_ns;
    do {
        for (int i = 0; i < 16; i++) {
            if (READY()) {
                r->spin_ns = spin * 2 + 1000 > SPIN_MAX_NS ? SPIN_MAX_NS : spin * 2 + 1000;
                return 1;
            }
            cpu_relax();
        }
    } while (shm_now_ns() - start < SPIN_GIL_NS);
    if (shm_now_ns() >= deadline)
        return 0;
    /* Keep the GIL while spinning (at most SPIN_MAX_NS): giving it up for
     * tens of microseconds lets another thread take it, and getting it back
     * can then cost up to the interpreter's switch interval (5 ms).  A
     * thread of ours that must run to answer makes the spin fail and so
     * shrink to nothing. */
    int ready = 0;
    if (spin > 0) {
        int64_t end = start + spin;
        if (end > deadline)
            end = deadline;
        do {
            for (int i = 0; i < 64 && !ready; i++) {
                cpu_relax();
                ready = READY();
            }
        } while (!ready && shm_now_ns() < end);
    }
    if (ready) {
        r->spin_ns = spin * 2 + 1000 > SPIN_MAX_NS ? SPIN_MAX_NS : spin * 2 + 1000;
        return 1;
    }
    struct ring_hdr *h = r->h;
    uint32_t *seq = space ? &h->space_seq : &h->data_seq;
    int result = 0;
    int64_t slice = FIRST_SLICE_NS;
    ring_sleeper(r, me, space, +1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (;;) {
        uint32_t s = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        if (READY()) {
            result = 1;
            break;
        }
        if (shm_now_ns() >= deadline)
            break;
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = shm_futex_wait(seq, s, deadline, slice);
        Py_END_ALLOW_THREADS
        if (err != 0 && PyErr_CheckSignals() < 0) {
            result = -1;
            break;
        }
        if (m->token != me || m->closing) {
            PyErr_Format(PyExc_ValueError, "channel %R was closed in this process "
                         "while a call waited on it", r->name);
            result = -1;
            break;
        }
        if (err == ETIMEDOUT) {
            slice = SLICE_NS;
            if (ring_repair(r, m) < 0) {
                result = -1;
                break;
            }
        }
    }
    ring_sleeper(r, me, space, -1);
    if (result == 1)
        r->spin_ns = spin / 2;
    return result;
#undef READY
}

/* Clear up after dead peers: a record at read reserved by a dead producer
 * is abandoned; records at head lent to dead consumers are finished; the
 * sleeper counts of dead attachments are taken off.  Returns -1 on error. */
static int
ring_repair(RingObject *r, MappingObject *m)
{
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    if (me == 0 || m->fd < 0)
        return 0; /* liveness cannot be asked; never guess */
    uint64_t rd = LOAD(&h->read), hd = LOAD(&h->head), t = LOAD(&h->tail);
    uint32_t st_r = rd < t ? LOAD(&rec_at(r, rd)->state) : 0;
    uint32_t st_h = hd < rd ? LOAD(&rec_at(r, hd)->state) : 0;
    int work = (ST_KIND(st_r) == ST_RESERVED &&
                !shm_token_alive(m, st_r & SHM_TOKEN_MASK)) ||
               (ST_KIND(st_h) == ST_TAKEN && !shm_token_alive(m, st_h & SHM_TOKEN_MASK));
    if (work) {
        int freed = 0, got_data = 0;
        take_t tk;
        if (ring_lock(r, m, &h->clock, me, shm_now_ns() + LOCK_GRACE_NS) < 0)
            return -1;
        take_begin(h, &tk);
        for (;;) { /* abandon dead producers' records at read */
            uint64_t pos;
            uint32_t len;
            int k = ring_next(r, &tk, &pos, &len);
            if (k < 0)
                goto fail;
            if (k != T_WRITING)
                break;
            rd = LOADR(&h->read);
            rec_t *rec = rec_at(r, rd);
            uint32_t st = LOAD(&rec->state);
            if (shm_token_alive(m, st & SHM_TOKEN_MASK))
                break;
            uint64_t total = rec_total(LOADR(&rec->len));
            if (total > r->cap - rd % r->cap || total > r->tail_seen - rd) {
                corrupt(r, "record length overruns the ring", LOADR(&rec->len), rd);
                goto fail;
            }
            STORE(&rec->state, ST_ABANDONED);
            tk.dropped++;
            take_pass(h, &tk, rd, total);
            got_data = 1;
        }
        if ((freed = take_end(r, &tk)) < 0)
            goto fail;
        for (;;) { /* finish records lent to dead consumers */
            hd = LOADR(&h->head);
            if (hd >= LOADR(&h->read))
                break;
            rec_t *rec = rec_at(r, hd);
            uint32_t st = LOAD(&rec->state);
            if (ST_KIND(st) != ST_TAKEN || shm_token_alive(m, st & SHM_TOKEN_MASK))
                break;
            STORE(&rec->state, ST_DONE);
            int k = ring_reclaim(r);
            if (k < 0)
                goto fail;
            freed |= k;
        }
        ring_unlock(m, &h->clock);
        if (freed)
            ring_wake(&h->space_seq, &h->space_sleepers);
        if (got_data)
            ring_wake(&h->data_seq, &h->data_sleepers);
        goto sleepers;
    fail:
        ring_unlock(m, &h->clock);
        return -1;
    }
sleepers:
    uint32_t gd = LOADR(&h->data_sleepers), gs = LOADR(&h->space_sleepers);
    if (gd == 0 && gs == 0)
        return 0;
    uint64_t live_d = 0, live_s = 0;
    for (uint32_t slot = 0; slot < r->max_slots; slot++) {
        uint64_t *e = &r->roles[slot], v = LOAD(e);
        if ((v & ROLE_SLEEPERS) == 0)
            continue;
        uint32_t tok = (ROLE_GEN(v) << 10) | slot;
        if (slot == SHM_TOKEN_SLOT(me) || shm_token_alive(m, tok)) {
            live_d += v & 0xFFFF;
            live_s += (v >> 16) & 0xFFFF;
            continue;
        }
        if (__atomic_compare_exchange_n(e, &v, v & ~ROLE_SLEEPERS, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            uint32_t d = (uint32_t)(v & 0xFFFF), s = (uint32_t)((v >> 16) & 0xFFFF);
            if (d)
                sat_sub(&h->data_sleepers, d);
            if (s)
                sat_sub(&h->space_sleepers, s);
        }
    }
    /* No sleeper counted anywhere: whatever the global words still say was
     * left by a process killed between its two counts.  (A sleeper counted
     * in the global word but not yet in its entry may lose its wake-up; it
     * then wakes at the end of its slice.) */
    if (live_d == 0 && (gd = LOADR(&h->data_sleepers)) != 0)
        __atomic_compare_exchange_n(&h->data_sleepers, &gd, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED);
    if (live_s == 0 && (gs = LOADR(&h->space_sleepers)) != 0)
        __atomic_compare_exchange_n(&h->space_sleepers, &gs, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED);
    return 0;
}

/* After many rounds in which the ring looked ready but yielded nothing
 * (other consumers were quicker, or the state is corrupt in a way the
 * checks cannot name), sleep a millisecond: this bounds the CPU burnt. */
static int
ring_backoff(int *fruitless)
{
    if (++*fruitless < 64)
        return 0;
    *fruitless = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals();
}

/* ---- Python: argument helpers ----------------------------------------- */

/* Parse (positional..., timeout=None) from a FASTCALL|KEYWORDS call. */
static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           Py_ssize_t npos, const char *const *names, PyObject **out)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t nall = 0;
    while (names[nall])
        nall++;
    if (nargs > nall) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)",
                     fname, nall, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nall; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        for (; i < nall; i++)
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                break;
        if (i == nall || out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R",
                         fname, key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < npos; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* A bytes-like message: bytes without a buffer round-trip, else any
 * C-contiguous buffer.  Returns 0 and fills *b (release with release_msg). */
static int
get_msg(PyObject *o, Py_buffer *b)
{
    if (PyBytes_CheckExact(o)) {
        b->obj = NULL;
        b->buf = PyBytes_AS_STRING(o);
        b->len = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (PyUnicode_Check(o) || !PyObject_CheckBuffer(o)) {
        PyErr_Format(PyExc_TypeError, "a channel message must be bytes-like (bytes, "
                     "bytearray, memoryview, numpy array), not %.100s; encode it, or use "
                     "shmkit.Queue for Python objects", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_BufferError, "a channel message must be one contiguous block "
                     "of memory; copy it first (numpy.ascontiguousarray)");
        return -1;
    }
    return 0;
}

static inline void
release_msg(Py_buffer *b)
{
    if (b->obj)
        PyBuffer_Release(b);
}

static int
check_size(RingObject *r, Py_ssize_t len)
{
    if ((uint64_t)len > UINT32_MAX - 16 || rec_total((uint64_t)len) > r->cap) {
        PyErr_Format(MessageTooLarge, "a message of %zd bytes does not fit in channel %R, "
                     "which holds at most %llu bytes per message; create the channel with "
                     "a larger capacity=", len, r->name,
                     (unsigned long long)(r->cap - 8));
        return -1;
    }
    return 0;
}

static int
deadline_of(PyObject *timeout, int64_t *deadline)
{
    *deadline = shm_deadline(timeout);
    return *deadline < 0 ? -1 : 0;
}

/* ---- Python: sending -------------------------------------------------- */

/* Send n messages (bufs) in order, as many per lock holding as fit.
 * Returns how many were sent; on error also sets *err. */
static Py_ssize_t
ring_send(RingObject *r, MappingObject *m, Py_buffer *bufs, Py_ssize_t n,
          PyObject *timeout, int nowait, int *err)
{
    uint32_t me = m->token;
    ring_claim(r, me, ROLE_PRODUCER);
    Py_ssize_t lens_small[64], *lens = lens_small, done = 0;
    int fruitless = 0;
    uint64_t pos_small[64], *pos = pos_small;
    int64_t deadline = nowait ? 0 : SHM_FOREVER;
    *err = 0;
    if (!nowait && timeout != NULL && timeout != Py_None && deadline_of(timeout, &deadline) < 0) {
        *err = 1;
        return 0;
    }
    if (n > 64) {
        lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)n);
        pos = PyMem_Malloc(sizeof(uint64_t) * (size_t)n);
        if (!lens || !pos) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        lens[i] = bufs[i].len;
    while (done < n) {
        Py_ssize_t k = ring_reserve(r, m, me, lens + done, n - done, pos, deadline);
        if (k < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < k; i++)
            ring_fill(r, pos[i], bufs[done + i].buf, bufs[done + i].len);
        if (k > 0)
            ring_wake(&r->h->data_seq, &r->h->data_sleepers);
        done += k;
        if (done == n)
            break;
        if (k == 0) {
            int w = nowait ? 0 : ring_wait(r, m, me, 1, rec_total((uint64_t)lens[done]),
                                           deadline);
            if (w < 0)
                goto fail;
            if (w == 0) {
                if (nowait)
                    PyErr_Format(FullError, "channel %R is full", r->name);
                else
                    PyErr_Format(shm_TimeoutError, "channel %R stayed full for the "
                                 "timeout; %zd of %zd messages were sent", r->name, done, n);
                goto fail;
            }
            if (ring_backoff(&fruitless) < 0)
                goto fail;
        }
    }
    goto out;
fail:
    *err = 1;
out:
    if (lens != lens_small)
        PyMem_Free(lens);
    if (pos != pos_small)
        PyMem_Free(pos);
    return done;
}

static PyObject *
send_impl(RingObject *r, PyObject *msg, PyObject *timeout, int nowait)
{
    Py_buffer b;
    if (get_msg(msg, &b) < 0)
        return NULL;
    if (check_size(r, b.len) < 0) {
        release_msg(&b);
        return NULL;
    }
    MappingObject *m = ring_enter(r);
    if (m == NULL) {
        release_msg(&b);
        return NULL;
    }
    int err;
    ring_send(r, m, &b, 1, timeout, nowait, &err);
    ring_leave(m);
    release_msg(&b);
    if (err)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Ring_send(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"data", "timeout", NULL};
    PyObject *a[2];
    if (parse_args("send", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    return send_impl(r, a[0], a[1], 0);
}

static PyObject *
Ring_send_nowait(RingObject *r, PyObject *msg)
{
    return send_impl(r, msg, NULL, 1);
}

static PyObject *
Ring_send_many(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"messages", "timeout", NULL};
    PyObject *a[2];
    if (parse_args("send_many", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(a[0], "send_many() needs an iterable of messages");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0, sent = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    MappingObject *m = NULL;
    int err = 1;
    if (bufs == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (; got < n; got++) {
        if (get_msg(items[got], &bufs[got]) < 0)
            goto out;
        if (check_size(r, bufs[got].len) < 0) {
            PyErr_Format(MessageTooLarge, "message %zd of send_many() has %zd bytes; "
                         "channel %R holds at most %llu bytes per message; nothing was "
                         "sent", got, bufs[got].len, r->name,
                         (unsigned long long)(r->cap - 8));
            got++; /* release this one too */
            goto out;
        }
    }
    if ((m = ring_enter(r)) == NULL)
        goto out;
    sent = ring_send(r, m, bufs, n, a[1], 0, &err);
    ring_leave(m);
out:
    for (Py_ssize_t i = 0; i < got; i++)
        release_msg(&bufs[i]);
    PyMem_Free(bufs);
    Py_DECREF(seq);
    if (err) {
        if (PyErr_Occurred() && sent) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyObject *s = PyLong_FromSsize_t(sent);
            if (ev && s)
                PyObject_SetAttrString(ev, "sent", s);
            Py_XDECREF(s);
            PyErr_Restore(et, ev, tb);
        }
        return NULL;
    }
    return PyLong_FromSsize_t(sent);
}

/* ---- Python: receiving ------------------------------------------------ */

enum { R_COPY, R_VIEW, R_INTO };

static PyObject *make_view(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len,
                           uint32_t me);
static int view_finish(RingObject *r, MappingObject *m, rec_t *rec, uint32_t token);

/* Take one message: bytes (R_COPY), a RecordView (R_VIEW), or copied into
 * `into` (R_INTO, returning its length; a message that does not fit stays
 * in the channel).  Waits until the deadline; raises Empty (nowait),
 * Timeout, or ChannelClosed when the channel is closed and drained. */
static PyObject *
recv_impl(RingObject *r, PyObject *timeout, int nowait, int how, Py_buffer *into)
{
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    ring_claim(r, me, ROLE_CONSUMER);
    int64_t deadline = nowait ? 0 : SHM_FOREVER;
    PyObject *out = NULL;
    int fruitless = 0;
    if (!nowait && timeout != NULL && timeout != Py_None && deadline_of(timeout, &deadline) < 0) {
        ring_leave(m);
        return NULL;
    }
    for (;;) {
        uint64_t pos = 0;
        uint32_t len = 0;
        take_t tk;
        int closed = LOAD(&h->closed);
        if (ring_lock(r, m, &h->clock, me, deadline) < 0)
            break;
        take_begin(h, &tk);
        int k = ring_next(r, &tk, &pos, &len);
        if (k == T_READY && how == R_INTO && (Py_ssize_t)len > into->len) {
            PyErr_Format(PyExc_ValueError, "the next message on channel %R has %u bytes, "
                         "more than the buffer's %zd; it stays in the channel", r->name,
                         len, into->len);
            k = -1;
        }
        int lend = k == T_READY && (how != R_COPY || len >= BIG_COPY);
        if (lend) {
            take_lent(r, &tk, pos, len, me);
        } else if (k == T_READY) {
            out = PyBytes_FromStringAndSize((const char *)(rec_at(r, pos) + 1), len);
            if (out != NULL)
                take_copied(r, &tk, pos, len);
            else
                k = -1;
        }
        int freed = take_end(r, &tk);
        ring_unlock(m, &h->clock);
        if (freed > 0)
            ring_wake(&h->space_seq, &h->space_sleepers);
        if (freed < 0 || k < 0) {
            Py_CLEAR(out);
            if (lend)
                view_finish(r, m, rec_at(r, pos), me);
            break;
        }
        if (lend) {
            if (how == R_VIEW) {
                out = make_view(r, m, pos, len, me);
                if (out == NULL)
                    view_finish(r, m, rec_at(r, pos), me);
                break;
            }
            out = how == R_INTO ? PyLong_FromUnsignedLong(len)
                                : PyBytes_FromStringAndSize(NULL, len);
            if (out != NULL) {
                char *dst = how == R_INTO ? into->buf : PyBytes_AS_STRING(out);
                const char *src = (const char *)(rec_at(r, pos) + 1);
                if (len >= BIG_COPY) {
                    Py_BEGIN_ALLOW_THREADS
                    memcpy(dst, src, len);
                    Py_END_ALLOW_THREADS
                } else {
                    memcpy(dst, src, len);
                }
            }
            if (view_finish(r, m, rec_at(r, pos), me) < 0)
                Py_CLEAR(out);
            break;
        }
        if (k == T_READY)
            break;
        if (closed && k == T_EMPTY) {
            PyErr_Format(ChannelClosed, "channel %R is closed and drained", r->name);
            break;
        }
        int w = nowait ? 0 : ring_wait(r, m, me, 0, 0, deadline);
        if (w < 0)
            break;
        if (w == 0) {
            if (nowait)
                PyErr_Format(EmptyError, "channel %R is empty", r->name);
            else
                PyErr_Format(shm_TimeoutError, "no message arrived on channel %R "
                             "within the timeout", r->name);
            break;
        }
        if (ring_backoff(&fruitless) < 0)
            break;
    }
    ring_leave(m);
    return out;
}

static PyObject *
Ring_recv(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", NULL};
    PyObject *a[1];
    if (nargs == 0 && kw == NULL)
        return recv_impl(r, NULL, 0, R_COPY, NULL);
    if (parse_args("recv", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    return recv_impl(r, a[0], 0, R_COPY, NULL);
}

static PyObject *
Ring_recv_nowait(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    return recv_impl(r, NULL, 1, R_COPY, NULL);
}

static PyObject *
Ring_take(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout", "nowait", NULL};
    PyObject *a[2];
    if (parse_args("_take", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    int nowait = a[1] ? PyObject_IsTrue(a[1]) : 0;
    if (nowait < 0)
        return NULL;
    return recv_impl(r, a[0], nowait, R_VIEW, NULL);
}

static PyObject *
Ring_recv_into(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"buffer", "timeout", NULL};
    PyObject *a[2];
    Py_buffer b;
    if (parse_args("recv_into", args, nargs, kw, 1, names, a) < 0)
        return NULL;
    if (PyObject_GetBuffer(a[0], &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "recv_into() needs a writable, contiguous buffer "
                     "(bytearray, memoryview, numpy array), not %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    PyObject *res = recv_impl(r, a[1], 0, R_INTO, &b);
    PyBuffer_Release(&b);
    return res;
}

static PyObject *
Ring_recv_many(RingObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"max_n", "timeout", NULL};
    PyObject *a[2];
    if (parse_args("recv_many", args, nargs, kw, 0, names, a) < 0)
        return NULL;
    Py_ssize_t max_n = 1024;
    if (a[0] && (max_n = PyLong_AsSsize_t(a[0])) == -1 && PyErr_Occurred())
        return NULL;
    if (max_n < 1) {
        PyErr_SetString(PyExc_ValueError, "recv_many() needs max_n >= 1");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    MappingObject *m = ring_enter(r);
    if (m == NULL) {
        Py_DECREF(list);
        return NULL;
    }
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    ring_claim(r, me, ROLE_CONSUMER);
    int64_t deadline = SHM_FOREVER;
    int fruitless = 0;
    int failed = a[1] != NULL && a[1] != Py_None && deadline_of(a[1], &deadline) < 0;
    while (!failed) {
        int k = T_EMPTY;
        take_t tk;
        int closed = LOAD(&h->closed);
        if (ring_lock(r, m, &h->clock, me, deadline) < 0) {
            failed = 1;
            break;
        }
        take_begin(h, &tk);
        while (PyList_GET_SIZE(list) < max_n) {
            uint64_t pos;
            uint32_t len;
            k = ring_next(r, &tk, &pos, &len);
            if (k != T_READY)
                break;
            if (len >= BIG_COPY && PyList_GET_SIZE(list) > 0)
                break; /* leave big ones to a call of their own */
            PyObject *b = PyBytes_FromStringAndSize((const char *)(rec_at(r, pos) + 1), len);
            if (b == NULL || PyList_Append(list, b) < 0) {
                Py_XDECREF(b);
                k = -1;
                break;
            }
            Py_DECREF(b);
            take_copied(r, &tk, pos, len);
        }
        int freed = take_end(r, &tk);
        ring_unlock(m, &h->clock);
        if (freed > 0)
            ring_wake(&h->space_seq, &h->space_sleepers);
        if (k < 0 || freed < 0) {
            failed = 1;
            break;
        }
        if (PyList_GET_SIZE(list) > 0)
            break;
        if (closed && k == T_EMPTY) {
            PyErr_Format(ChannelClosed, "channel %R is closed and drained", r->name);
            failed = 1;
            break;
        }
        int w = ring_wait(r, m, me, 0, 0, deadline);
        if (w < 0 || (w > 0 && ring_backoff(&fruitless) < 0))
            failed = 1;
        if (w <= 0 || failed)
            break;
    }
    ring_leave(m);
    if (failed && PyList_GET_SIZE(list) == 0) {
        Py_DECREF(list);
        return NULL;
    }
    PyErr_Clear(); /* messages already taken are delivered */
    return list;
}

/* ---- Python: binding, closing, statistics ----------------------------- */

static PyObject *
Ring_init_ring(PyObject *Py_UNUSED(cls), PyObject *args)
{
    PyObject *mapping;
    long long off;
    unsigned long long cap, max_items;
    if (!PyArg_ParseTuple(args, "O!LKK", &Mapping_Type, &mapping, &off, &cap, &max_items))
        return NULL;
    MappingObject *m = (MappingObject *)mapping;
    uint64_t data_off = (RING_ROLES_OFF + 8ull * m->max_slots + 63) & ~63ull;
    if (cap < 64 || cap % 8 || cap > (1ull << 46)) {
        PyErr_Format(PyExc_ValueError, "ring capacity must be a multiple of 8 from 64 to "
                     "2**46, not %llu", cap);
        return NULL;
    }
    struct ring_hdr *h = shm_addr(mapping, off, 8, 1);
    if (h == NULL)
        return NULL;
    if (off % 64 || (long long)(data_off + cap) > m->length - off) {
        PyErr_Format(PyExc_ValueError, "the segment is too small for a ring of %llu bytes",
                     cap);
        return NULL;
    }
    memset(h, 0, data_off);
    h->format = RING_FORMAT;
    h->cap = cap;
    h->data_off = data_off;
    h->max_items = max_items;
    h->max_slots = m->max_slots;
    STORE(&h->magic, RING_MAGIC);
    return PyLong_FromUnsignedLongLong(data_off);
}

static PyObject *
Ring_bind(RingObject *r, PyObject *args)
{
    PyObject *mapping, *name;
    long long off;
    if (!PyArg_ParseTuple(args, "O!LO", &Mapping_Type, &mapping, &off, &name))
        return NULL;
    Py_XSETREF(r->name, Py_NewRef(name));
    MappingObject *m = (MappingObject *)mapping;
    struct ring_hdr *h = shm_addr(mapping, off, 8, 0);
    if (h == NULL)
        return NULL;
    if (off % 64 || off > m->length - RING_ROLES_OFF) {
        corrupt(r, "no room for a ring header", off, m->length);
        return NULL;
    }
    uint64_t cap = LOAD(&h->cap), data_off = LOAD(&h->data_off);
    if (LOAD(&h->magic) != RING_MAGIC) {
        corrupt(r, "bad ring magic", LOAD(&h->magic), RING_MAGIC);
        return NULL;
    }
    if (h->format != RING_FORMAT) {
        corrupt(r, "ring format differs from its layout description", h->format,
                RING_FORMAT);
        return NULL;
    }
    if (h->max_slots != m->max_slots ||
        data_off < RING_ROLES_OFF + 8ull * h->max_slots || data_off % 64 ||
        cap < 64 || cap % 8 || cap > (1ull << 46) ||
        (long long)(data_off + cap) > m->length - off) {
        corrupt(r, "ring header describes an impossible layout", cap, data_off);
        return NULL;
    }
    Py_XSETREF(r->mapping, Py_NewRef(mapping));
    r->h = h;
    r->roles = (uint64_t *)((char *)h + RING_ROLES_OFF);
    r->data = (char *)h + data_off;
    r->cap = cap;
    r->max_slots = h->max_slots;
    r->role_token = 0;
    r->role_bits = 0;
    r->head_seen = LOAD(&h->head);
    r->tail_seen = LOAD(&h->tail);
    r->spin_ns = SPIN_START_NS;
    Py_RETURN_NONE;
}

static PyObject *
Ring_unbind(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(r->mapping);
    Py_RETURN_NONE;
}

static void
wake_all(struct ring_hdr *h)
{
    __atomic_fetch_add(&h->data_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->space_seq, 1, __ATOMIC_SEQ_CST);
    shm_futex_wake(&h->data_seq, INT_MAX);
    shm_futex_wake(&h->space_seq, INT_MAX);
}

static PyObject *
Ring_close_sending(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = ring_enter(r);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    /* under plock, so that no send reserves after a receiver saw "closed" */
    if (ring_lock(r, m, &h->plock, m->token, SHM_FOREVER) < 0) {
        ring_leave(m);
        return NULL;
    }
    STORE(&h->closed, 1);
    ring_unlock(m, &h->plock);
    wake_all(h);
    ring_leave(m);
    Py_RETURN_NONE;
}

static PyObject *
Ring_wake_all(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = (MappingObject *)r->mapping;
    if (m != NULL && m->base != NULL && !m->closing)
        wake_all(r->h);
    Py_RETURN_NONE;
}

static PyObject *
Ring_stats(RingObject *r, PyObject *Py_UNUSED(ignored))
{
    MappingObject *m = ring_enter_any(r, 0);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    long producers = 0, consumers = 0;
    for (uint32_t slot = 0; slot < r->max_slots; slot++) {
        uint64_t v = LOAD(&r->roles[slot]);
        if (!(v & (ROLE_PRODUCER | ROLE_CONSUMER)))
            continue;
        if (!shm_token_alive(m, (ROLE_GEN(v) << 10) | slot))
            continue;
        producers += (v & ROLE_PRODUCER) != 0;
        consumers += (v & ROLE_CONSUMER) != 0;
    }
    uint64_t reserved = LOAD(&h->reserved), received = LOAD(&h->received);
    uint64_t dropped = LOAD(&h->dropped), t = LOAD(&h->tail), hd = LOAD(&h->head);
    uint64_t depth = reserved - received - dropped;
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKslslsisIsI}", "capacity", (unsigned long long)r->cap,
        "bytes_used", (unsigned long long)(t - hd), "depth",
        (unsigned long long)(depth > reserved ? 0 : depth), "sent",
        (unsigned long long)(reserved - dropped), "received",
        (unsigned long long)received, "dropped", (unsigned long long)dropped,
        "max_items", (unsigned long long)h->max_items, "producers", producers,
        "consumers", consumers, "closed", (int)LOAD(&h->closed), "receivers_waiting",
        LOAD(&h->data_sleepers), "senders_waiting", LOAD(&h->space_sleepers));
    ring_leave(m);
    return d;
}

static PyObject *
Ring_get_capacity(RingObject *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap);
}

static PyObject *
Ring_get_max_message(RingObject *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap ? r->cap - 8 : 0);
}

static PyObject *
Ring_get_depth(RingObject *r, void *Py_UNUSED(c))
{
    MappingObject *m = ring_enter_any(r, 0);
    if (m == NULL)
        return NULL;
    struct ring_hdr *h = r->h;
    uint64_t reserved = LOAD(&h->reserved), received = LOAD(&h->received);
    uint64_t depth = reserved - received - LOAD(&h->dropped);
    ring_leave(m);
    return PyLong_FromUnsignedLongLong(depth > reserved ? 0 : depth);
}

static PyObject *
Ring_get_closed(RingObject *r, void *Py_UNUSED(c))
{
    MappingObject *m = (MappingObject *)r->mapping;
    if (m == NULL || m->base == NULL)
        Py_RETURN_TRUE;
    return PyBool_FromLong(LOAD(&r->h->closed) != 0);
}

static void
Ring_dealloc(RingObject *r)
{
    Py_CLEAR(r->mapping);
    Py_CLEAR(r->name);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

#define FAST (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef Ring_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Ring_send, FAST,
     "send(data, timeout=None)\n\nCopy one bytes-like message in; block while the channel "
     "is full.\nRaises Timeout, ChannelClosed, MessageTooLarge.\n\n"
     ">>> ch.send(b'hello', timeout=1.0)"},
    {"send_nowait", (PyCFunction)Ring_send_nowait, METH_O,
     "send_nowait(data)\n\nSend one message or raise Full (a WouldBlock) if it does not fit now."},
    {"send_many", (PyCFunction)(void (*)(void))Ring_send_many, FAST,
     "send_many(messages, timeout=None) -> int\n\nSend messages in order, as many per "
     "lock holding as fit.\nReturns how many were sent; on Timeout the exception's .sent "
     "says how many went.\n\n>>> ch.send_many([b'a', b'b'])\n2"},
    {"recv", (PyCFunction)(void (*)(void))Ring_recv, FAST,
     "recv(timeout=None) -> bytes\n\nTake the next message; block until one arrives.\n"
     "Raises Timeout, or ChannelClosed once the channel is closed and drained.\n\n"
     ">>> ch.recv(timeout=1.0)\nb'hello'"},
    {"recv_into", (PyCFunction)(void (*)(void))Ring_recv_into, FAST,
     "recv_into(buffer, timeout=None) -> int\n\nCopy the next message into a writable "
     "buffer (a bytearray, a numpy array)\nand return its length.  A message larger than "
     "the buffer raises ValueError\nand stays in the channel.\n\n"
     ">>> n = ch.recv_into(buf, timeout=1.0)"},
    {"recv_nowait", (PyCFunction)Ring_recv_nowait, METH_NOARGS,
     "recv_nowait() -> bytes\n\nTake the next message or raise Empty (a WouldBlock)."},
    {"recv_many", (PyCFunction)(void (*)(void))Ring_recv_many, FAST,
     "recv_many(max_n=1024, timeout=None) -> list[bytes]\n\nTake up to max_n messages "
     "that are ready, waiting for the first;\nreturns [] if the timeout passes first, "
     "raises ChannelClosed once closed and drained."},
    {"_take", (PyCFunction)(void (*)(void))Ring_take, FAST,
     "_take(timeout=None, nowait=False) -> RecordView (see Channel.recv_view)"},
    {"_bind", (PyCFunction)Ring_bind, METH_VARARGS,
     "_bind(mapping, offset, name): attach this handle to the ring at offset"},
    {"_unbind", (PyCFunction)Ring_unbind, METH_NOARGS, "_unbind(): forget the mapping"},
    {"_init_ring", (PyCFunction)Ring_init_ring, METH_VARARGS | METH_STATIC,
     "_init_ring(mapping, offset, capacity, max_items) -> data offset (creator only)"},
    {"_close_sending", (PyCFunction)Ring_close_sending, METH_NOARGS,
     "_close_sending(): set the closed flag and wake every waiter"},
    {"_wake_all", (PyCFunction)Ring_wake_all, METH_NOARGS, "_wake_all()"},
    {"_stats", (PyCFunction)Ring_stats, METH_NOARGS, "_stats() -> dict"},
    {NULL}
};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "bytes in the ring's data area", NULL},
    {"max_message", (getter)Ring_get_max_message, NULL, "largest message in bytes", NULL},
    {"depth", (getter)Ring_get_depth, NULL, "messages waiting to be received", NULL},
    {"sending_closed", (getter)Ring_get_closed, NULL,
     "True once the channel was closed for sending", NULL},
    {NULL}
};

static PyTypeObject Ring_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._core.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The message ring's hot path; shmkit.Channel builds on it.",
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_new = PyType_GenericNew,
};

/* ---- zero-copy views ---------------------------------------------------- */

static PyObject *
make_view(RingObject *r, MappingObject *m, uint64_t pos, uint32_t len, uint32_t me)
{
    RecordViewObject *v = PyObject_New(RecordViewObject, &RecordView_Type);
    if (v == NULL)
        return NULL;
    v->ring = (RingObject *)Py_NewRef(r);
    v->mapping = Py_NewRef((PyObject *)m);
    shm_pin((PyObject *)m); /* the memory stays mapped while the view lives */
    v->rec = rec_at(r, pos);
    v->payload = (char *)(v->rec + 1);
    v->len = len;
    v->token = me;
    v->exports = 0;
    v->released = 0;
    v->view = NULL;
    return (PyObject *)v;
}

/* A lent record is finished: mark it DONE, then reclaim if we still can. */
static int
view_finish(RingObject *r, MappingObject *m, rec_t *rec, uint32_t token)
{
    uint32_t taken = ST_TAKEN | token;
    __atomic_compare_exchange_n(&rec->state, &taken, ST_DONE, 0, __ATOMIC_RELEASE,
                                __ATOMIC_RELAXED);
    if (m->token != token || m->base == NULL || r->mapping != (PyObject *)m)
        return 0; /* detached meanwhile: a later waiter reclaims it */
    struct ring_hdr *h = r->h;
    if (ring_lock(r, m, &h->clock, token, SHM_FOREVER) < 0)
        return -1;
    int freed = ring_reclaim(r);
    ring_unlock(m, &h->clock);
    if (freed > 0)
        ring_wake(&h->space_seq, &h->space_sleepers);
    return freed < 0 ? -1 : 0;
}

static int
rv_release_record(RecordViewObject *v)
{
    if (v->released)
        return 0;
    v->released = 1;
    int r = view_finish(v->ring, (MappingObject *)v->mapping, v->rec, v->token);
    shm_unpin(v->mapping);
    v->mapping = NULL;
    return r;
}

static PyObject *
rv_release(RecordViewObject *v, PyObject *Py_UNUSED(ignored))
{
    if (v->view != NULL) {
        PyObject *res = PyObject_CallMethod(v->view, "release", NULL);
        if (res == NULL) {
            if (PyErr_ExceptionMatches(PyExc_BufferError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_BufferError,
                                "an array or memoryview made from the message view is "
                                "still alive; copy what you need inside the with block "
                                "(the message is freed when they are all gone)");
            }
            return NULL;
        }
        Py_DECREF(res);
        Py_CLEAR(v->view);
    }
    if (v->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "the message view is still exported (an "
                        "array or memoryview uses it); release those first");
        return NULL;
    }
    if (rv_release_record(v) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
rv_enter(RecordViewObject *v, PyObject *Py_UNUSED(ignored))
{
    if (v->released) {
        PyErr_SetString(PyExc_ValueError, "the message view was already released");
        return NULL;
    }
    if (v->view == NULL && (v->view = PyMemoryView_FromObject((PyObject *)v)) == NULL)
        return NULL;
    return Py_NewRef(v->view);
}

static PyObject *
rv_exit(RecordViewObject *v, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *r = rv_release(v, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static int
rv_getbuffer(RecordViewObject *v, Py_buffer *view, int flags)
{
    if (v->released) {
        PyErr_SetString(PyExc_ValueError, "the message view was released");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)v, v->payload, v->len, 1, flags) < 0)
        return -1;
    v->exports++;
    return 0;
}

static void
rv_releasebuffer(RecordViewObject *v, Py_buffer *Py_UNUSED(view))
{
    v->exports--;
}

static void
rv_dealloc(RecordViewObject *v)
{
    Py_CLEAR(v->view);
    if (!v->released && rv_release_record(v) < 0)
        PyErr_WriteUnraisable((PyObject *)v);
    Py_CLEAR(v->ring);
    PyObject_Free(v);
}

static PyObject *
rv_get_nbytes(RecordViewObject *v, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(v->len);
}

static PyMethodDef rv_methods[] = {
    {"release", (PyCFunction)rv_release, METH_NOARGS,
     "release()\n\nGive the message's memory back to the channel."},
    {"__enter__", (PyCFunction)rv_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))rv_exit, METH_FASTCALL, NULL},
    {NULL}
};

static PyGetSetDef rv_getset[] = {
    {"nbytes", (getter)rv_get_nbytes, NULL, "the message's size in bytes", NULL},
    {NULL}
};

static PyBufferProcs rv_as_buffer = {
    (getbufferproc)rv_getbuffer,
    (releasebufferproc)rv_releasebuffer,
};

static PyTypeObject RecordView_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._core.RecordView",
    .tp_basicsize = sizeof(RecordViewObject),
    .tp_dealloc = (destructor)rv_dealloc,
    .tp_as_buffer = &rv_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received message lent in place (read-only).  Use it as a context "
              "manager:\n``with ch.recv_view() as mv:`` gives a memoryview valid "
              "inside the block.",
    .tp_methods = rv_methods,
    .tp_getset = rv_getset,
};

/* ---- module glue ------------------------------------------------------- */

static PyObject *
ring_set_classes(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *closed, *big, *empty, *full;
    if (!PyArg_ParseTuple(args, "OOOO", &closed, &big, &empty, &full))
        return NULL;
    Py_XSETREF(ChannelClosed, Py_NewRef(closed));
    Py_XSETREF(MessageTooLarge, Py_NewRef(big));
    Py_XSETREF(EmptyError, Py_NewRef(empty));
    Py_XSETREF(FullError, Py_NewRef(full));
    Py_RETURN_NONE;
}

static PyMethodDef ring_functions[] = {
    {"ring_set_classes", ring_set_classes, METH_VARARGS,
     "ring_set_classes(ChannelClosed, MessageTooLarge, Empty, Full)"},
    {NULL}
};

int
shm_init_ring(PyObject *module)
{
    ChannelClosed = Py_NewRef(PyExc_EOFError);
    MessageTooLarge = Py_NewRef(PyExc_ValueError);
    EmptyError = Py_NewRef(PyExc_BlockingIOError);
    FullError = Py_NewRef(PyExc_BlockingIOError);
    if (PyType_Ready(&Ring_Type) < 0 || PyType_Ready(&RecordView_Type) < 0)
        return -1;
    if (PyModule_AddFunctions(module, ring_functions) < 0)
        return -1;
    Py_INCREF(&Ring_Type);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&Ring_Type) < 0)
        return -1;
    Py_INCREF(&RecordView_Type);
    if (PyModule_AddObject(module, "RecordView", (PyObject *)&RecordView_Type) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "RING_FORMAT", RING_FORMAT);
}
