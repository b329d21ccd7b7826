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
 *     84  jp_sel u32              which producers' journal is in force
 *     88  jp[2] {tail, reserved}  producers' journals (ring_fix_producers)
 *    128  head u64                consumers' line: bytes before it are free
 *    136  read u64                next record to hand to a consumer
 *    144  received u64            messages taken so far
 *    152  dropped u64             messages abandoned by dead producers
 *    160  clock u32               consumers' robust lock
 *    164  jr_sel u32              which consumers' journal is in force
 *    168  returned u32            at least the RETURNED records in [head, read)
 *    176  redelivered u64         records given back by dead view holders so far
 *    192  data_seq u32, data_sleepers u32     consumers asleep wait here
 *    256  space_seq u32, space_sleepers u32   producers asleep wait here
 *    320  jr[2] {read, received, dropped}     consumers' journals
 *    512  role table: u64 per attach slot (see ROLE_* in ring.h)
 *    data_off: the data area, cap bytes of records
 *
 * A record is an 8-byte header [u32 len | u32 state] and len payload bytes,
 * padded to 8.  A record never straddles the end of the ring: a producer
 * whose record does not fit before the end first writes a SKIP record
 * covering the rest, then starts again at offset 0.
 *
 *     head <= read <= tail,   tail - head <= cap
 *
 *     [head, read)  taken records: DONE, SKIP, ABANDONED, TAKEN or LENT by
 *                   a consumer that still holds a zero-copy view of it, or
 *                   RETURNED (a LENT record whose holder died) waiting to be
 *                   delivered again
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
 * is gone, marks the record ABANDONED; whichever consumer passes an
 * ABANDONED record counts it in `dropped`.  A loan (Channel.loan) is a
 * reservation whose payload the caller writes in place: its owner ends it
 * with one store, COMMITTED or ABANDONED (ring_settle).  Each holding of a lock
 * first writes a journal of the counters it will change; the next holder
 * of a lock whose holder died recounts from the journal, finishes records
 * the dead consumer had copied and gives back one it had marked but not
 * passed.  A view holder's death leaves TAKEN|token or LENT|token at head;
 * a waiter finds the token dead and finishes a TAKEN record, or gives a LENT
 * one back: it counts it in `returned` first and then marks it RETURNED, so
 * `returned` is never below the records there are.  A consumer that finds
 * `returned` non-zero takes the first RETURNED record after head before the
 * one at read (copying it, DONE, or lending it again), then uncounts it; one
 * that finds none sets `returned` to 0.  Each step is one store, so a
 * process killed at any instruction leaves a state the others can read.
 * docs/channel.md walks through every step.
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
#include "ring.h"
#include "journal.h"
#include "wait.h"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>


int
ring_corrupt(RingObject *r, const char *what, unsigned long long a, unsigned long long b)
{
    PyErr_Format(RING_ST(r)->CorruptError,
                 "channel %R is corrupt: %s (%llu, %llu); no correct writer leaves "
                 "this, so remove it with `shmkit rm` and create it again",
                 r->name ? r->name : Py_None, what, a, b);
    return -1;
}

/* The bytes the record at position p (in state st) spans, a skip marker
 * running to the end of the ring, checked to end by `limit`: 0 if it would
 * overrun (a real span is at least 8).  The lock-free looks take an
 * overrun for a record changing under them. */
static uint64_t
rec_extent(RingObject *r, uint64_t p, uint32_t st, uint64_t limit)
{
    uint64_t off = p % r->cap;
    uint64_t total = st == ST_SKIP ? r->cap - off : rec_total(LOADR(&rec_at(r, p)->len));
    return total > r->cap - off || total > limit - p ? 0 : total;
}

/* rec_extent, with CorruptError set when it is 0 (under the lock nothing
 * changes: an overrun is damage). */
static uint64_t
rec_span(RingObject *r, uint64_t p, uint32_t st, uint64_t limit, const char *overrun)
{
    uint64_t total = rec_extent(r, p, st, limit);
    if (total == 0)
        ring_corrupt(r, overrun, LOADR(&rec_at(r, p)->len), p);
    return total;
}

/* Whether [head, read), the records taken and not yet passed by head, is
 * out of order: read behind head, further than the ring, or unaligned. */
static inline int
taken_span_bad(RingObject *r, uint64_t hd, uint64_t rd)
{
    return rd < hd || rd - hd > r->cap || ((hd | rd) & 7);
}

/* ---- the role table and its sleeper counts ----------------------------- */

void
ring_roles_claim(const ring_roles_t *rt, uint32_t me, uint64_t bits)
{
    uint32_t slot = SHM_TOKEN_SLOT(me), gen = SHM_TOKEN_GEN(me);
    if (slot >= rt->max_slots)
        return;
    uint64_t *e = &rt->roles[slot], v = LOAD(e);
    for (;;) {
        uint64_t nv = ROLE_GEN(v) == gen ? v | bits : ROLE_FOR(gen) | bits;
        if (nv == v)
            return;
        if (__atomic_compare_exchange_n(e, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            if (ROLE_GEN(v) != gen) {
                /* the slot's former owner died asleep: take its counts off */
                uint32_t d = (uint32_t)(v & 0xFFFF), s = (uint32_t)((v >> 16) & 0xFFFF);
                if (d)
                    shm_sat_sub(rt->sleepers[0], d);
                if (s)
                    shm_sat_sub(rt->sleepers[1], s);
            }
            return;
        }
    }
}

/* Ordered so that a process killed between the two counts leaves the
 * global word too high (a spare wake-up, until ring_roles_fix finds no
 * sleeper anywhere and clears it), never too low; a cleaner that took our
 * entry's counts off already fixed the global word. */
void
ring_roles_sleeper(const ring_roles_t *rt, uint32_t me, int space, int delta)
{
    uint32_t slot = SHM_TOKEN_SLOT(me);
    uint32_t *g = rt->sleepers[space != 0];
    uint64_t unit = space ? ROLE_SPACE_SLEEPER : ROLE_DATA_SLEEPER;
    if (slot >= rt->max_slots)
        return;
    if (delta > 0)
        __atomic_fetch_add(g, 1, __ATOMIC_SEQ_CST);
    uint64_t *e = &rt->roles[slot], v = LOAD(e);
    while (ROLE_GEN(v) == SHM_TOKEN_GEN(me)) {
        if (delta < 0 && (v & (unit * 0xFFFF)) == 0)
            return;
        uint64_t nv = delta > 0 ? v + unit : v - unit;
        if (__atomic_compare_exchange_n(e, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            if (delta < 0)
                shm_sat_sub(g, 1);
            return;
        }
    }
    if (delta > 0)
        shm_sat_sub(g, 1); /* our entry is not ours: take the global count back */
}

void
ring_roles_fix(const ring_roles_t *rt, MappingObject *m)
{
    uint32_t *gw[2] = {rt->sleepers[0], rt->sleepers[1]};
    uint32_t gd = LOADR(gw[0]), gs = LOADR(gw[1]);
    if (gd == 0 && gs == 0)
        return;
    uint64_t live_d = 0, live_s = 0;
    for (uint32_t slot = 0; slot < rt->max_slots; slot++) {
        uint64_t *e = &rt->roles[slot], v = LOAD(e);
        if ((v & ROLE_SLEEPERS) == 0)
            continue;
        uint32_t tok = (ROLE_GEN(v) << 10) | slot;
        if (slot == SHM_TOKEN_SLOT(m->token) || shm_token_alive(m, tok)) {
            live_d += v & 0xFFFF;
            live_s += (v >> 16) & 0xFFFF;
            continue;
        }
        if (__atomic_compare_exchange_n(e, &v, v & ~ROLE_SLEEPERS, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            uint32_t d = (uint32_t)(v & 0xFFFF), s = (uint32_t)((v >> 16) & 0xFFFF);
            if (d)
                shm_sat_sub(gw[0], d);
            if (s)
                shm_sat_sub(gw[1], s);
        }
    }
    /* No sleeper counted anywhere: whatever the global words still say was
     * left by a process killed between its two counts.  (A sleeper counted
     * in the global word but not yet in its entry may lose its wake-up; it
     * then wakes at the end of its slice.) */
    if (live_d == 0 && (gd = LOADR(gw[0])) != 0)
        __atomic_compare_exchange_n(gw[0], &gd, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    if (live_s == 0 && (gs = LOADR(gw[1])) != 0)
        __atomic_compare_exchange_n(gw[1], &gs, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

/* ring_claim's first claim for a token and role bits. */
void
ring_claim_entry(RingObject *r, uint32_t me, uint64_t bits)
{
    if (SHM_TOKEN_SLOT(me) >= r->max_slots)
        return;
    ring_roles_t rt = ring_roles_of(r);
    ring_roles_claim(&rt, me, bits);
    if (r->role_token != me)
        r->role_bits = 0;
    r->role_token = me;
    r->role_bits |= bits;
}

void
ring_sleeper(RingObject *r, uint32_t me, int space, int delta)
{
    ring_roles_t rt = ring_roles_of(r);
    ring_roles_sleeper(&rt, me, space, delta);
}

/* ---- the consumers' side (call with clock held) ----------------------- */

/* One holding of clock that takes records.  It starts by writing the
 * journal (read, received, dropped as they were); it moves read record by
 * record, and stores the counters and then head once, at the end.  So if
 * its holder dies, either head has not passed the journal's read position
 * and the records from there to read are intact and can be counted again
 * (ring_fix_consumers), or the counters were already stored. */

void
ring_take_begin(struct ring_hdr *h, take_t *tk)
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
    shm_crash_point("ring.take.journal");
}

/* Move read past the record at rd (total bytes); head follows at the end
 * if nothing before it is lent out.  Returns 1 if head will move. */
static inline int
ring_take_pass(struct ring_hdr *h, take_t *tk, uint64_t rd, uint64_t total)
{
    STORE(&h->read, rd + total);
    shm_crash_point("ring.take.pass");
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
        return ring_corrupt(r, "head and read positions out of order", hd, rd);
    while (hd < rd) {
        uint32_t st = LOAD(&rec_at(r, hd)->state);
        if (st_lent(st) || st == ST_RETURNED)
            break;
        if (st != ST_SKIP && st != ST_DONE && st != ST_ABANDONED)
            return ring_corrupt(r, "unexpected record state behind the read position", st, hd);
        uint64_t total = rec_span(r, hd, st, rd, "record overruns the read position");
        if (total == 0)
            return -1;
        hd += total;
    }
    if (hd == start)
        return 0;
    STORE(&h->head, hd);
    shm_crash_point("ring.reclaim.head");
    return 1;
}

int
ring_reclaim(RingObject *r)
{
    return ring_reclaim_from(r, LOADR(&r->h->head));
}

/* End a holding: counters first, then head.  Returns 1 if head moved. */
int
ring_take_end(RingObject *r, take_t *tk)
{
    struct ring_hdr *h = r->h;
    STORE(&h->received, tk->received);
    STORE(&h->dropped, tk->dropped);
    shm_crash_point("ring.take.counters");
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
        return ring_corrupt(r, "read position outside the ring", rd, hd);
    if (hd <= jr) { /* head did not pass the journal: recount [jr, rd) */
        if (jr > rd || (jr & 7))
            return ring_corrupt(r, "bad consumers' journal", jr, rd);
        uint64_t taken = 0, dropped = 0;
        for (uint64_t p = jr; p < rd;) {
            uint32_t st = LOAD(&rec_at(r, p)->state);
            uint64_t total = rec_span(r, p, st, rd, "record overruns the read position");
            if (total == 0)
                return -1;
            if (st == ST_ABANDONED)
                dropped++;
            else if (st != ST_SKIP)
                taken++;
            p += total;
        }
        STORE(&h->received, LOADR(&j->received) + taken);
        STORE(&h->dropped, LOADR(&j->dropped) + dropped);
        shm_crash_point("ring.repair.consumers.counted");
    }
    for (uint64_t p = hd; p < rd;) { /* copied, head not yet moved: finish */
        rec_t *rec = rec_at(r, p);
        uint32_t st = LOAD(&rec->state);
        uint64_t total = rec_span(r, p, st, rd, "record overruns the read position");
        if (total == 0)
            return -1;
        if (st == ST_COMMITTED) {
            STORE(&rec->state, ST_DONE);
            shm_crash_point("ring.repair.consumers.done");
        }
        p += total;
    }
    if (rd < t && st_lent(LOAD(&rec_at(r, rd)->state)))
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
        return ring_corrupt(r, "bad producers' journal", jt, t);
    for (uint64_t p = jt; p < t;) {
        uint32_t st = LOAD(&rec_at(r, p)->state);
        uint64_t total = rec_span(r, p, st, t, "record overruns the tail");
        if (total == 0)
            return -1;
        n += st != ST_SKIP;
        p += total;
    }
    STORE(&h->reserved, LOADR(&j->reserved) + n);
    shm_crash_point("ring.repair.producers.counted");
    return 0;
}

/* The repair hook of the ring's locks: after taking one from a dead
 * holder, recount from its journal (ring_fix_consumers/producers). */
typedef struct {
    RingObject *r;
    uint32_t *word;
} ring_lock_ctx;

static int
ring_lock_repair(void *ctx, int owner_died)
{
    ring_lock_ctx *c = ctx;
    if (!owner_died)
        return 0;
    return c->word == &c->r->h->clock ? ring_fix_consumers(c->r) : ring_fix_producers(c->r);
}

/* Take plock or clock (ring_lock_word), repairing after a dead holder. */
int
ring_lock(RingObject *r, MappingObject *m, uint32_t *word, uint32_t me, int64_t deadline)
{
    (void)me;
    ring_lock_ctx ctx = {r, word};
    int got = ring_lock_word(m, word, deadline, ring_lock_repair, &ctx);
    if (got == 0) {
        char who[SHM_HOLDER_PHRASE];
        shm_deadline_passed(RING_ST(r)->Timeout, "channel %R: its %s lock stayed held by %s; try "
                     "again, or resume or end that process", r->name ? r->name : Py_None,
                     word == &r->h->clock ? "consumers'" : "producers'",
                     shm_holder_phrase(m, __atomic_load_n(word, __ATOMIC_RELAXED), who,
                                       sizeof who));
        return -1;
    }
    return got < 0 ? -1 : 1;
}

/* Find the next deliverable record at read, passing over SKIP and
 * ABANDONED records.  Returns T_READY with *pos and *len, T_EMPTY,
 * T_WRITING (a producer is still writing it), or -1 on error. */
/* The first RETURNED record in [head, read): 1 with *pos and *len, 0 when
 * there is none (and `returned` is set to 0, undoing the excess a killed
 * counter left), -1 on error. */
static int
ring_returned(RingObject *r, uint64_t *pos, uint32_t *len)
{
    struct ring_hdr *h = r->h;
    uint64_t hd = LOADR(&h->head), rd = LOADR(&h->read);
    if (taken_span_bad(r, hd, rd))
        return ring_corrupt(r, "head and read positions out of order", hd, rd);
    for (uint64_t p = hd; p < rd;) {
        uint32_t st = LOAD(&rec_at(r, p)->state);
        uint64_t total = rec_span(r, p, st, rd, "record overruns the read position");
        if (total == 0)
            return -1;
        if (st == ST_RETURNED) {
            uint32_t n = LOADR(&rec_at(r, p)->len); /* rec_span read it once already */
            if (rec_total(n) != total)
                return ring_corrupt(r, "a returned record's length changed", n, p);
            *pos = p;
            *len = n;
            return 1;
        }
        p += total;
    }
    STORER(&h->returned, 0);
    return 0;
}

int
ring_next(RingObject *r, take_t *tk, uint64_t *pos, uint32_t *len)
{
    struct ring_hdr *h = r->h;
    if (LOADR(&h->returned) != 0) {
        int k = ring_returned(r, pos, len);
        if (k != 0)
            return k < 0 ? -1 : T_READY;
    }
    for (;;) {
        uint64_t rd = LOADR(&h->read), hd = LOADR(&h->head);
        if (rd >= r->tail_seen) {
            r->tail_seen = LOAD(&h->tail);
            if (rd >= r->tail_seen) {
                if (rd > r->tail_seen)
                    return ring_corrupt(r, "read position beyond the tail", rd, r->tail_seen);
                return T_EMPTY;
            }
        }
        if (((rd | hd) & 7) || rd < hd || rd - hd > r->cap || r->tail_seen - hd > r->cap)
            return ring_corrupt(r, "positions out of order", hd, rd);
        uint64_t off = rd % r->cap, total;
        rec_t *rec = rec_at(r, rd);
        uint32_t st = LOAD(&rec->state), n = LOADR(&rec->len);
        if (ST_KIND(st) == ST_RESERVED)
            return T_WRITING;
        if (st == ST_SKIP) {
            total = r->cap - off;
            if ((uint64_t)n + 8 != total)
                return ring_corrupt(r, "bad wrap marker", n, rd);
        } else if (st == ST_COMMITTED || st == ST_ABANDONED) {
            total = rec_total(n);
        } else {
            return ring_corrupt(r, "unexpected record state at the read position", st, rd);
        }
        if (total > r->cap - off || total > r->tail_seen - rd)
            return ring_corrupt(r, "record length overruns the ring", n, rd);
        if (st == ST_COMMITTED) {
            *pos = rd;
            *len = n;
            return T_READY;
        }
        if (st == ST_ABANDONED)
            tk->dropped++; /* counted by the holding that passes it */
        ring_take_pass(h, tk, rd, total);
    }
}

/* The record at pos was copied out: count it and pass it. */
/* A RETURNED record (below read) was taken again: it was counted as
 * received the first time, and read already passed it. */
static int
ring_retaken(struct ring_hdr *h, uint64_t pos)
{
    if (pos >= LOADR(&h->read))
        return 0;
    uint32_t n = LOADR(&h->returned);
    STORER(&h->returned, n ? n - 1 : 0);
    shm_crash_point("ring.retake.uncounted");
    return 1;
}

void
ring_take_copied(RingObject *r, take_t *tk, uint64_t pos, uint32_t len)
{
    if (pos < LOADR(&r->h->read)) {
        STORE(&rec_at(r, pos)->state, ST_DONE);
        shm_crash_point("ring.retake.copied");
        ring_retaken(r->h, pos);
        return;
    }
    if (tk->head != pos) {
        STORE(&rec_at(r, pos)->state, ST_DONE);
        shm_crash_point("ring.take.copied");
    }
    tk->received++;
    ring_take_pass(r->h, tk, pos, rec_total(len));
}

/* The record at pos is lent out as a view: mark it, count it, pass it.
 * With `redeliver` (and a token to name us by), it is marked LENT: if we die
 * holding it, it goes back to the channel. */
void
ring_take_lent(RingObject *r, take_t *tk, uint64_t pos, uint32_t len, uint32_t me,
               int redeliver)
{
    me &= SHM_TOKEN_MASK;
    STORE(&rec_at(r, pos)->state, (redeliver && me != 0 ? ST_LENT : ST_TAKEN) | me);
    shm_crash_point("ring.lend.marked");
    if (ring_retaken(r->h, pos))
        return;
    tk->received++;
    STORE(&r->h->read, pos + rec_total(len));
    shm_crash_point("ring.lend.read");
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
    (void)me;
    if (shm_lock_try(m, &h->clock) <= 0) {
        PyErr_Clear();
        return 0; /* a consumer is busy: it will pass the marker itself */
    }
    int passed = LOADR(&h->read) == was && LOADR(&h->head) == was;
    if (passed) {
        take_t tk;
        ring_take_begin(h, &tk);
        STORE(&h->tail, t);  /* a valid SKIP record first, then pass it */
        shm_crash_point("ring.reserve.skip_tail");
        ring_take_pass(h, &tk, was, t - was);
        passed = ring_take_end(r, &tk) > 0;
    }
    ring_unlock(m, &h->clock);
    return passed;
}

/* Reserve records for n payloads of lens[] at the tail, as many as fit now
 * (SKIP markers included), under plock.  Fills pos[]; returns how many were
 * reserved (0 when full), or -1 with an exception set. */
Py_ssize_t
ring_reserve(RingObject *r, MappingObject *m, uint32_t me, const Py_ssize_t *lens,
             Py_ssize_t n, uint64_t *pos, int64_t deadline)
{
    struct ring_hdr *h = r->h;
    const uint64_t cap = r->cap;
    if (ring_lock(r, m, &h->plock, me, deadline) < 0)
        return -1;
    if (LOADR(&h->closed)) {
        ring_unlock(m, &h->plock);
        PyErr_Format(RING_ST(r)->ChannelClosed, "channel %R was closed: no more messages can be sent",
                     r->name);
        return -1;
    }
    uint64_t t = LOADR(&h->tail), t0 = t, hd = r->head_seen;
    uint64_t reserved = LOADR(&h->reserved);
    uint32_t sel = LOADR(&h->jp_sel) & 1; /* the journal: see ring_fix_producers */
    STORER(&h->jp[sel ^ 1].reserved, reserved);
    STORER(&h->jp[sel ^ 1].tail, t);
    STORE(&h->jp_sel, sel ^ 1);
    shm_crash_point("ring.reserve.journal");
    if ((t & 7) || t - hd > cap) {
        r->head_seen = hd = LOAD(&h->head);
        if (((t | hd) & 7) || t - hd > cap) {
            ring_unlock(m, &h->plock);
            return ring_corrupt(r, "tail and head further apart than the capacity", t, hd);
        }
    }
    uint64_t room = UINT64_MAX;
    if (h->max_items) {
        uint64_t queued = reserved - LOAD(&h->received) - LOAD(&h->dropped) +
                          LOADR(&h->returned);
        if (queued > (1ull << 62)) {
            ring_unlock(m, &h->plock);
            return ring_corrupt(r, "more messages received than sent", reserved,
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
                return ring_corrupt(r, "tail and head further apart than the capacity", t, hd);
            }
            if (cap - (t - hd) < need)
                break;
        }
        rec_t *rec = (rec_t *)(r->data + off);
        if (off + total > cap) {            /* wrap: mark the rest as skipped */
            STORER(&rec->len, (uint32_t)(cap - off - 8));
            STORER(&rec->state, ST_SKIP);
            shm_crash_point("ring.reserve.skip");
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
        shm_crash_point("ring.reserve.header");
        pos[k++] = t;
        t += total;
    }
    if (t != t0) {
        STORE(&h->reserved, reserved + (uint64_t)k);
        shm_crash_point("ring.reserve.count");
        STORE(&h->tail, t);                 /* publish the headers */
        shm_crash_point("ring.reserve.tail");
    }
    ring_unlock(m, &h->plock);
    return k;
}

/* Publish (COMMITTED) or abandon (ABANDONED) a record reserved by token
 * `me` whose payload was written in place (a loan): one store, as
 * ring_fill's last.  It fails (returns 0) only if the record is no longer
 * ours: our attachment was closed meanwhile and a waiter, finding the
 * token dead, abandoned it.  A consumer counts an abandoned record in
 * `dropped` when it passes it (ring_next), so no lock is needed here. */
int
ring_settle(rec_t *rec, uint32_t me, int publish)
{
    uint32_t want = ST_RESERVED | me;
    int ok = __atomic_compare_exchange_n(&rec->state, &want,
                                         publish ? ST_COMMITTED : ST_ABANDONED, 0,
                                         __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    shm_crash_point(publish ? "ring.loan.sent" : "ring.loan.abandoned");
    return ok;
}

void
ring_fill(RingObject *r, uint64_t pos, const char *src, Py_ssize_t len)
{
    rec_t *rec = rec_at(r, pos);
    ring_copy(rec + 1, src, (size_t)len);
    shm_crash_point("ring.fill.copied");
    STORE(&rec->state, ST_COMMITTED);
    shm_crash_point("ring.fill.committed");
}

/* ---- waiting ----------------------------------------------------------- */

/* Is there anything for a consumer to look at?  A lock-free hint; anything
 * odd says yes so that the checking path runs. */
int
ring_data_ready(RingObject *r)
{
    struct ring_hdr *h = r->h;
    if (LOAD(&h->returned) != 0)
        return 1; /* a message given back by a dead holder */
    uint64_t rd = LOAD(&h->read), t = LOAD(&h->tail);
    if (rd == t)
        return LOAD(&h->closed) != 0; /* closed and drained: the caller stops */
    if (rd > t || t - rd > r->cap || ((rd | t) & 7))
        return 1;
    return ST_KIND(LOAD(&rec_at(r, rd)->state)) != ST_RESERVED;
}

int
ring_space_ready(RingObject *r, uint64_t total)
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
        uint64_t queued = LOAD(&h->reserved) - LOAD(&h->received) - LOAD(&h->dropped) +
                          LOADR(&h->returned);
        if (queued >= h->max_items && queued <= (1ull << 62))
            return 0;
    }
    return 1;
}

static int ring_repair(RingObject *r, MappingObject *m);

/* 1 when senders have come and none is attached any more (a receiver that
 * asked to stop then stops once the ring is empty). */
int
ring_senders_gone(RingObject *r, MappingObject *m)
{
    if (LOAD(&r->h->reserved) == 0)
        return 0; /* nobody has sent yet: wait for the first sender */
    for (uint32_t slot = 0; slot < r->max_slots; slot++) {
        uint64_t v = LOAD(&r->roles[slot]);
        if ((v & ROLE_PRODUCER) && shm_token_alive(m, (ROLE_GEN(v) << 10) | slot))
            return 0;
    }
    return 1;
}

/* ring_wait's condition for wait.h: the sequence word of the side waited
 * for, its readiness test, our count as a sleeper, and the repair of dead
 * peers (and, when asked, the end of all senders) after a slice without
 * news. */
typedef struct {
    RingObject *r;
    MappingObject *m;
    uint32_t me;
    int space;
    uint64_t total;
    int stop_no_senders;
    int gone; /* no sender is left: ready, the caller finds the ring empty */
} ring_waiter;

static int
rw_ready(void *ctx, uint32_t *sleep_on)
{
    ring_waiter *c = ctx;
    struct ring_hdr *h = c->r->h;
    /* the word's value before the test: a change after it ends the sleep */
    *sleep_on = __atomic_load_n(c->space ? &h->space_seq : &h->data_seq, __ATOMIC_SEQ_CST);
    return c->gone || (c->space ? ring_space_ready(c->r, c->total) : ring_data_ready(c->r));
}

static void
rw_arm(void *ctx)
{
    ring_waiter *c = ctx;
    ring_sleeper(c->r, c->me, c->space, +1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void
rw_disarm(void *ctx)
{
    ring_waiter *c = ctx;
    ring_sleeper(c->r, c->me, c->space, -1);
}

static int
rw_check(void *ctx)
{
    ring_waiter *c = ctx;
    if (ring_repair(c->r, c->m) < 0)
        return -1;
    /* A sender that died or closed wakes nobody: look after each slice. */
    if (c->stop_no_senders && ring_senders_gone(c->r, c->m))
        c->gone = 1;
    return 0;
}

/* Wait until a consumer (space=0) or a producer of a `total`-byte record
 * (space=1) has something to do, or the deadline passes, through wait.h,
 * with the handle's adaptive spin.  Returns 1 ready, 0 timeout, -1 with an
 * exception set (Ctrl-C, ClosedError when the handle was closed meanwhile). */
int
ring_wait(RingObject *r, MappingObject *m, uint32_t me, int space, uint64_t total,
          int64_t deadline, int stop_no_senders)
{
    if (deadline != SHM_FOREVER && shm_now_ns() >= deadline)
        return 0;
    ring_waiter c = {r, m, me, space, total, stop_no_senders, 0};
    char what[96] = "the channel";
    if (r->name != NULL && PyUnicode_Check(r->name)) {
        const char *name = PyUnicode_AsUTF8(r->name);
        if (name != NULL)
            snprintf(what, sizeof what, "channel '%s'", name);
        else
            PyErr_Clear(); /* the generic words will do */
    }
    shm_wait w = {.m = m, .word = space ? &r->h->space_seq : &r->h->data_seq, .ctx = &c,
                  .ready = rw_ready, .arm = rw_arm, .disarm = rw_disarm, .check = rw_check,
                  .spin_adapt = &r->spin_ns, .what = what};
    return shm_wait_until(&w, deadline);
}

/* The liveness of the holders met in one walk: a few tokens remembered, so
 * that a batch of one holder's views costs one question to the kernel. */
typedef struct {
    uint32_t token[8];
    uint8_t alive[8];
    int n;
} token_cache;

static int
holder_alive(token_cache *c, MappingObject *m, uint32_t token)
{
    if (token == m->token)
        return 1;
    for (int i = 0; i < c->n; i++)
        if (c->token[i] == token)
            return c->alive[i];
    int alive = shm_token_alive(m, token) != 0;
    if (c->n < 8) {
        c->token[c->n] = token;
        c->alive[c->n++] = (uint8_t)alive;
    }
    return alive;
}

/* Without the lock: is there work in [head, read) for ring_fix_lent?  A
 * finished record at head that head did not pass (its releaser could not
 * reclaim), a record lent to a dead holder, or a RETURNED one while
 * `returned` is 0.  Records change under us: anything inconsistent says
 * yes, and the repair looks again under the lock. */
static int
ring_lent_work(RingObject *r, MappingObject *m, token_cache *tc)
{
    struct ring_hdr *h = r->h;
    uint64_t hd = LOAD(&h->head), rd = LOAD(&h->read);
    if (hd == rd)
        return 0;
    if (taken_span_bad(r, hd, rd))
        return 1;
    uint32_t returned = LOAD(&h->returned);
    for (uint64_t p = hd; p < rd;) {
        uint32_t st = LOAD(&rec_at(r, p)->state);
        uint64_t total = rec_extent(r, p, st, rd);
        if (total == 0)
            return 1;
        if (st_lent(st)) {
            if (!holder_alive(tc, m, st & SHM_TOKEN_MASK))
                return 1;
        } else if (st == ST_RETURNED) {
            if (returned == 0)
                return 1;
        } else if (p == hd) {
            return 1;
        }
        p += total;
    }
    return 0;
}

int
ring_views_need_repair(RingObject *r, MappingObject *m)
{
    token_cache tc = {.n = 0};
    return ring_lent_work(r, m, &tc);
}

/* Without the lock: how many records in [head, read) are lent to consumers
 * that died.  Each goes back to the channel at the next receive
 * (ring_fix_lent), so it is queued already, though no receive has counted
 * it in `returned` yet.  Records change under us: anything inconsistent
 * counts none. */
static uint64_t
ring_lent_to_dead(RingObject *r, MappingObject *m)
{
    struct ring_hdr *h = r->h;
    uint64_t hd = LOAD(&h->head), rd = LOAD(&h->read), n = 0;
    if (hd == rd || taken_span_bad(r, hd, rd) || m->fd < 0)
        return 0;
    token_cache tc = {.n = 0};
    for (uint64_t p = hd; p < rd;) {
        uint32_t st = LOAD(&rec_at(r, p)->state);
        uint64_t total = rec_extent(r, p, st, rd);
        if (total == 0)
            return 0;
        if (ST_KIND(st) == ST_LENT && st != 0 && !holder_alive(&tc, m, st & SHM_TOKEN_MASK))
            n++;
        p += total;
    }
    return n;
}

uint64_t
ring_depth(RingObject *r, MappingObject *m)
{
    struct ring_hdr *h = r->h;
    uint64_t reserved = LOAD(&h->reserved), received = LOAD(&h->received);
    uint64_t depth = reserved - received - LOAD(&h->dropped) + LOAD(&h->returned);
    if (depth > reserved)
        return 0; /* read while the counters moved, or damaged */
    uint64_t lost = ring_lent_to_dead(r, m);
    return lost > reserved - depth ? depth : depth + lost;
}

/* Under clock: give back or finish every record in [head, read) lent to a
 * dead consumer: LENT ones go back to the channel (counted in `returned`
 * before they are marked), TAKEN ones are finished; then move head.  Sets
 * *returned when one went back.  Returns -1 on error. */
static int
ring_fix_lent(RingObject *r, MappingObject *m, token_cache *tc, int *returned)
{
    struct ring_hdr *h = r->h;
    uint64_t hd = LOADR(&h->head), rd = LOADR(&h->read);
    uint32_t found = 0;
    if (taken_span_bad(r, hd, rd))
        return ring_corrupt(r, "head and read positions out of order", hd, rd);
    for (uint64_t p = hd; p < rd;) {
        rec_t *rec = rec_at(r, p);
        uint32_t st = LOAD(&rec->state);
        uint64_t total = rec_span(r, p, st, rd, "record overruns the read position");
        if (total == 0)
            return -1;
        p += total;
        if (st == ST_RETURNED)
            found++;
        if (!st_lent(st) || holder_alive(tc, m, st & SHM_TOKEN_MASK))
            continue; /* finished (ring_reclaim checks them), returned, or held */
        if (ST_KIND(st) == ST_TAKEN) {
            STORE(&rec->state, ST_DONE);
            shm_crash_point("ring.repair.finished");
            continue;
        }
        STORER(&h->returned, LOADR(&h->returned) + 1);
        shm_crash_point("ring.repair.counted");
        STORE(&rec->state, ST_RETURNED);
        shm_crash_point("ring.repair.returned");
        STORER(&h->redelivered, LOADR(&h->redelivered) + 1);
        found++;
        *returned = 1;
    }
    if (found && LOADR(&h->returned) == 0)
        STORER(&h->returned, found); /* damage lost the count: find them again */
    return ring_reclaim(r);
}

/* Under clock: a view this process took but could not hand out (no memory
 * for the view object, or a signal handler raised first) goes back to the
 * channel. */
int
ring_give_back(RingObject *r, uint64_t pos, uint32_t me)
{
    struct ring_hdr *h = r->h;
    rec_t *rec = rec_at(r, pos);
    uint32_t st = LOAD(&rec->state);
    if (st != (ST_LENT | (me & SHM_TOKEN_MASK)) && st != (ST_TAKEN | (me & SHM_TOKEN_MASK)))
        return 0;
    STORER(&h->returned, LOADR(&h->returned) + 1);
    shm_crash_point("ring.give_back.counted");
    STORE(&rec->state, ST_RETURNED);
    shm_crash_point("ring.give_back.returned");
    return 1;
}

/* Clear up after dead peers: a record at read reserved by a dead producer
 * is abandoned; records lent to dead consumers are finished or given back
 * (ring_fix_lent); a `returned` that a killed retaker left too high is set
 * right; the sleeper counts of dead attachments are taken off.  Returns -1
 * on error. */
static int
ring_repair(RingObject *r, MappingObject *m)
{
    struct ring_hdr *h = r->h;
    uint32_t me = m->token;
    if (me == 0 || m->fd < 0)
        return 0; /* liveness cannot be asked; never guess */
    uint64_t rd = LOAD(&h->read), t = LOAD(&h->tail);
    uint32_t st_r = rd < t ? LOAD(&rec_at(r, rd)->state) : 0;
    token_cache tc = {.n = 0};
    int work = (ST_KIND(st_r) == ST_RESERVED &&
                !shm_token_alive(m, st_r & SHM_TOKEN_MASK)) ||
               LOAD(&h->returned) != 0 || ring_lent_work(r, m, &tc);
    if (work) {
        int freed = 0, got_data = 0;
        take_t tk;
        if (ring_lock(r, m, &h->clock, me, shm_now_ns() + LOCK_GRACE_NS) < 0)
            return -1;
        ring_take_begin(h, &tk);
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
                ring_corrupt(r, "record length overruns the ring", LOADR(&rec->len), rd);
                goto fail;
            }
            /* ring_next passes (and counts) it on the next round */
            STORE(&rec->state, ST_ABANDONED);
            shm_crash_point("ring.repair.abandoned");
            got_data = 1;
        }
        if ((freed = ring_take_end(r, &tk)) < 0)
            goto fail;
        if (LOADR(&h->returned) != 0) { /* set right a count a killed retaker left high */
            uint64_t pos;
            uint32_t len;
            if (ring_returned(r, &pos, &len) < 0)
                goto fail;
        }
        int k = ring_fix_lent(r, m, &tc, &got_data);
        if (k < 0)
            goto fail;
        freed |= k;
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
sleepers:;
    ring_roles_t rt = ring_roles_of(r);
    ring_roles_fix(&rt, m);
    return 0;
}

/* Claim our role entry as a consumer.  A handle's first receive also
 * clears up after dead peers (ring_repair), so that a receiver started after
 * one that died holding views gets their messages back before newer ones,
 * without waiting first.  Returns -1 on error. */
int
ring_claim_consumer(RingObject *r, MappingObject *m, uint32_t me)
{
    if (r->role_token == me && (r->role_bits & ROLE_CONSUMER))
        return 0;
    ring_claim_entry(r, me, ROLE_CONSUMER);
    return ring_repair(r, m);
}

/* A receive found nothing to take and would report it (empty, closed, no
 * senders) or start waiting: while records are out as views, first give back
 * what dead holders hold.  Returns 1 when messages came back, 0, or -1. */
int
ring_repair_empty(RingObject *r, MappingObject *m)
{
    struct ring_hdr *h = r->h;
    if (LOAD(&h->head) == LOAD(&h->read))
        return 0;
    if (ring_repair(r, m) < 0)
        return -1;
    return LOAD(&h->returned) != 0;
}

/* After many rounds in which the ring looked ready but yielded nothing
 * (other consumers were quicker, or the state is corrupt in a way the
 * checks cannot name), sleep a millisecond: this bounds the CPU burnt. */
int
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

