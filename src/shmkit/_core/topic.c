/* topic.c - the broadcast ring behind shmkit.Topic: every subscriber sees
 * every message.  The layout is in topic.h; docs/topic.md has the protocol
 * and the crash analysis.  No Python objects here: topictype.c makes them.
 *
 * Publishing (topic_publish), all under plock (lock.c, repaired after a
 * dead holder by topic_fix_publishers):
 *   1. journal {tail, seq} into the slot not in force, flip jsel;
 *   2. block mode: make sure no live subscriber holds the bytes the record
 *      will overwrite (floor, recomputed from the subscriber table only
 *      when the cached one says no; dead subscribers' entries are freed by
 *      kernel-backed liveness); else give up the lock and wait;
 *   3. if the record does not fit before the end: write a SKIP record and
 *      publish it (tail), so head may pass it;
 *   4. move head over the records that will be overwritten (release store,
 *      then a fence: a reader that sees head at or below its record after
 *      copying it read bytes nobody had started to overwrite);
 *   5. write header and payload, publish with tail, then store seq + 1;
 *   6. move the history window (hist), unlock, wake sleepers.
 * Receiving needs no lock: a subscriber reads the record at its own
 * cursor, checks head again after copying (seqlock), and moves its cursor.
 * A record whose sequence number is ahead of what the subscriber expected
 * means messages were overwritten: the difference is reported, exactly.
 */
#include "topic.h"
#include "journal.h"
#include "wait.h"
#include <limits.h>
#include <string.h>
#include <time.h>

int
topic_corrupt(const topic_t *t, const char *what, unsigned long long a, unsigned long long b)
{
    PyErr_Format(t->st->CorruptError,
                 "%s is corrupt: %s (%llu, %llu); no correct writer leaves this, so "
                 "remove it with `shmkit rm` and create it again", t->what, what, a, b);
    return -1;
}

/* ---- creating and binding ------------------------------------------------ */

int
topic_format(char *base, uint64_t avail, uint32_t max_slots, uint64_t cap, uint64_t history,
             uint32_t overflow, uint32_t max_subs)
{
    struct topic_hdr *h = (struct topic_hdr *)base;
    if (max_slots > SHM_MAX_SLOTS || max_subs < 1 || max_subs > TOPIC_MAX_SUBS ||
        cap < 64 || cap % 64 || cap > TOPIC_MAX_CAP || overflow > 1 ||
        history > TOPIC_MAX_HISTORY) {
        PyErr_SetString(PyExc_ValueError, "impossible topic parameters");
        return -1;
    }
    uint64_t data_off = topic_data_off(max_slots, max_subs);
    if (data_off > avail || cap > avail - data_off) {
        PyErr_Format(PyExc_ValueError, "the segment is too small for a topic of %llu bytes",
                     (unsigned long long)cap);
        return -1;
    }
    memset(base, 0, data_off);
    h->format = TOPIC_FORMAT;
    h->cap = cap;
    h->data_off = data_off;
    h->history = history;
    h->max_subs = max_subs;
    h->overflow = overflow;
    h->max_slots = max_slots;
    h->subs_off = (uint32_t)topic_subs_off(max_slots);
    STORE(&h->magic, TOPIC_MAGIC);
    return 0;
}

/* Every number the handle keeps is read once, here, and checked in
 * unsigned arithmetic before a pointer is formed from it. */
int
topic_bind(topic_t *t, shm_state *st, char *base, uint64_t avail, uint32_t seg_slots,
           const char *name)
{
    t->st = st;
    struct topic_hdr *h = (struct topic_hdr *)base;
    snprintf(t->what, sizeof t->what, "topic '%.140s'", name);
    if (avail < sizeof *h || ((uintptr_t)base & 63))
        return topic_corrupt(t, "no room for a topic header", avail, sizeof *h);
    uint32_t magic = LOAD(&h->magic), format = LOAD(&h->format);
    uint32_t max_slots = LOAD(&h->max_slots), max_subs = LOAD(&h->max_subs);
    uint32_t overflow = LOAD(&h->overflow), subs_off = LOAD(&h->subs_off);
    uint64_t cap = LOAD(&h->cap), data_off = LOAD(&h->data_off);
    uint64_t history = LOAD(&h->history);
    if (magic != TOPIC_MAGIC)
        return topic_corrupt(t, "bad topic magic", magic, TOPIC_MAGIC);
    if (format != TOPIC_FORMAT)
        return topic_corrupt(t, "topic format differs from its layout description", format,
                             TOPIC_FORMAT);
    if (max_slots != seg_slots || max_slots > SHM_MAX_SLOTS)
        return topic_corrupt(t, "attach slots differ from the segment's", max_slots, seg_slots);
    if (max_subs < 1 || max_subs > TOPIC_MAX_SUBS)
        return topic_corrupt(t, "impossible subscriber table size", max_subs, TOPIC_MAX_SUBS);
    if (subs_off != topic_subs_off(max_slots) || data_off != topic_data_off(max_slots, max_subs))
        return topic_corrupt(t, "tables at impossible offsets", subs_off, data_off);
    if (data_off > avail)
        return topic_corrupt(t, "data area beyond the segment", data_off, avail);
    if (cap < 64 || cap % 64 || cap > TOPIC_MAX_CAP || cap > avail - data_off)
        return topic_corrupt(t, "impossible capacity", cap, avail - data_off);
    if (overflow > 1)
        return topic_corrupt(t, "unknown overflow policy", overflow, 1);
    if (history > TOPIC_MAX_HISTORY)
        return topic_corrupt(t, "impossible history", history, TOPIC_MAX_HISTORY);
    t->h = h;
    t->roles = (uint64_t *)(base + TOPIC_ROLES_OFF);
    t->subs = (struct topic_sub *)(base + subs_off);
    t->data = base + data_off;
    t->cap = cap;
    t->history = history;
    t->max_slots = max_slots;
    t->max_subs = max_subs;
    t->overflow = overflow;
    return 0;
}

/* ---- records --------------------------------------------------------------- */

/* The bytes the record at p spans (a SKIP record runs to the end of the
 * ring), with its state in *st: 0 if the state is neither MSG nor SKIP or
 * the record would overrun `limit`. */
static inline uint64_t
trec_span(const topic_t *t, uint64_t p, uint64_t limit, uint32_t *st)
{
    trec_t *r = trec_at(t, p);
    uint32_t s = LOADR(&r->state);
    uint64_t off = p % t->cap;
    uint64_t total = s == TREC_SKIP ? t->cap - off : trec_total(LOADR(&r->len));
    *st = s;
    if ((s != TREC_SKIP && s != TREC_MSG) || total > t->cap - off || total > limit - p)
        return 0;
    return total;
}

/* Where a len-byte record published at tail tl goes: *skip bytes of SKIP
 * record first if it does not fit before the end.  Returns the position
 * head must reach first (no byte below it is overwritten). */
static inline uint64_t
trec_need(const topic_t *t, uint64_t tl, uint64_t len, uint64_t *skip)
{
    uint64_t total = trec_total(len), off = tl % t->cap;
    *skip = off + total > t->cap ? t->cap - off : 0;
    uint64_t end = tl + *skip + total;
    return end > t->cap ? end - t->cap : 0;
}

/* ---- sleepers ------------------------------------------------------------ */

/* The role table as ring.c's sleeper counting sees it. */
static inline ring_roles_t
topic_roles(topic_t *t)
{
    return (ring_roles_t){t->roles, t->max_slots, {&t->h->data_sleepers, &t->h->space_sleepers}};
}

/* ---- the publishers' lock ------------------------------------------------- */

/* After taking plock from a dead publisher: recount seq from the journal
 * (the records from the journal's tail to tail are whole: tail moves only
 * after a record is written), and put hist back within [head, tail]. */
static int
topic_fix_publishers(void *ctx, int owner_died)
{
    topic_t *t = ctx;
    struct topic_hdr *h = t->h;
    if (!owner_died)
        return 0;
    struct topic_journal *j = &h->j[LOADR(&h->jsel) & 1];
    uint64_t tl = LOADR(&h->tail), jt = LOADR(&j->tail), hd = LOADR(&h->head), n = 0;
    if (((jt | tl | hd) & 15) || jt > tl || tl - jt > t->cap || hd > tl || tl - hd > t->cap)
        return topic_corrupt(t, "bad publishers' journal", jt, tl);
    for (uint64_t p = jt; p < tl;) {
        uint32_t st;
        uint64_t total = trec_span(t, p, tl, &st);
        if (total == 0)
            return topic_corrupt(t, "bad record after the journal's tail", st, p);
        n += st == TREC_MSG;
        p += total;
    }
    STORE(&h->seq, LOADR(&j->seq) + n);
    shm_crash_point("topic.repair.counted");
    uint64_t hist = LOADR(&h->hist);
    if (hist < hd || hist > tl || (hist & 15))
        STORE(&h->hist, hist > tl ? tl : hd);
    return 0;
}

static int
topic_lock(topic_t *t, MappingObject *m, int64_t deadline)
{
    int got = ring_lock_word(m, &t->h->plock, deadline, topic_fix_publishers, t);
    if (got == 0) {
        char who[SHM_HOLDER_PHRASE];
        shm_deadline_passed(t->st->Timeout, "%s: its publishers' lock stayed held by %s; try "
                     "again, or resume or end that process", t->what,
                     shm_holder_phrase(m, __atomic_load_n(&t->h->plock, __ATOMIC_RELAXED),
                                       who, sizeof who));
        return -1;
    }
    return got < 0 ? -1 : 1;
}

/* Release plock.  An exception already raised (the damage that made the
 * caller give up) is kept; the release's own complaint about a lock word
 * overwritten meanwhile is dropped in its favour. */
static inline void
topic_unlock(MappingObject *m, topic_t *t)
{
    shm_lock_release_journal(m, &t->h->plock, NULL);
}

/* ---- the subscriber table ------------------------------------------------- */

int
topic_reclaim(topic_t *t, MappingObject *m)
{
    int n = 0;
    if (m->fd < 0 || m->token == 0)
        return 0; /* liveness cannot be asked: never guess */
    for (uint32_t i = 0; i < t->max_subs; i++) {
        struct topic_sub *s = &t->subs[i];
        uint32_t owner = LOAD(&s->owner);
        if (owner == 0 || owner == m->token)
            continue;
        if ((owner & ~SHM_TOKEN_MASK) == 0 && shm_token_alive(m, owner))
            continue;
        if (__atomic_compare_exchange_n(&s->owner, &owner, 0, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            shm_crash_point("topic.reclaim.freed");
            n++;
        }
    }
    ring_roles_t rt = topic_roles(t);
    ring_roles_fix(&rt, m);
    return n;
}

/* Where a hold really pins: a hold at a SKIP record (or at the tail, when
 * the next record starts with a SKIP of `skip` bytes) pins nothing there. */
static uint64_t
eff_hold(topic_t *t, uint64_t hold, uint64_t hd, uint64_t tl, uint64_t skip)
{
    hold &= ~15ull;
    if (hold < hd)
        hold = hd;
    if (hold >= tl)
        return tl + skip;
    trec_t *r = trec_at(t, hold);
    if (LOAD(&r->state) == TREC_SKIP) {
        uint64_t next = hold + (t->cap - hold % t->cap);
        return next > tl ? tl : next;
    }
    return hold;
}

/* The lowest byte any subscriber counted in the table still holds. */
static uint64_t
compute_floor(topic_t *t, uint64_t hd, uint64_t tl, uint64_t skip)
{
    uint64_t f = tl + skip;
    for (uint32_t i = 0; i < t->max_subs; i++) {
        struct topic_sub *s = &t->subs[i];
        if (LOAD(&s->owner) == 0)
            continue;
        uint64_t e = eff_hold(t, LOAD(&s->hold), hd, tl, skip);
        if (e < f)
            f = e;
    }
    return f;
}

/* Move head over whole records until it reaches at least `need`, then
 * store it.  Returns the new head, or 0 with CorruptError set. */
static int
advance_head(topic_t *t, uint64_t hd, uint64_t need, uint64_t tl, uint64_t *out)
{
    uint64_t q = hd;
    while (q < need) {
        uint32_t st;
        uint64_t total = trec_span(t, q, tl, &st);
        if (total == 0)
            return topic_corrupt(t, "bad record between head and tail", st, q);
        q += total;
    }
    if (q != hd) {
        STORE(&t->h->head, q);
        /* seqlock: a reader that still sees head at or below its record
         * after copying it (acquire fence, then head) read bytes nobody had
         * started to overwrite.  Only the order of this store before the
         * overwriting stores matters: a release fence (a compiler barrier
         * on x86, whose stores stay in order), not a full one, per record. */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        shm_crash_point("topic.publish.head");
        uint64_t hist = LOADR(&t->h->hist);
        if (hist < q)
            STORE(&t->h->hist, q);
    }
    *out = q;
    return 0;
}

/* ---- publishing ------------------------------------------------------------ */

/* With plock held: note in the journal that everything before tl is whole
 * and numbered below sq (a dead publisher's repair recounts seq from
 * there): into the slot not in force, then flip jsel. */
static void
journal_note(struct topic_hdr *h, uint64_t tl, uint64_t sq)
{
    uint32_t sel = LOADR(&h->jsel) & 1;
    STORER(&h->j[sel ^ 1].tail, tl);
    STORER(&h->j[sel ^ 1].seq, sq);
    STORE(&h->jsel, sel ^ 1);
}

/* Take plock and note where publishing starts in the journal.  1, or -1
 * unlocked. */
static int
publish_begin(topic_t *t, MappingObject *m, int64_t deadline)
{
    struct topic_hdr *h = t->h;
    if (topic_lock(t, m, deadline) < 0)
        return -1;
    journal_note(h, LOADR(&h->tail), LOADR(&h->seq));
    shm_crash_point("topic.publish.journal");
    return 1;
}

/* With plock held: make room for a len-byte record at tl (the tail, or
 * past the records of a run not published yet), numbered sq, and write its
 * header.  1 (rv filled), 0 no room (block mode), -1 corrupt; plock stays
 * held in every case. */
static int
reserve_locked(topic_t *t, MappingObject *m, uint64_t tl, uint64_t sq, uint64_t len,
               topic_resv *rv)
{
    struct topic_hdr *h = t->h;
    const uint64_t cap = t->cap;
    uint64_t hd = LOADR(&h->head);
    if (((tl | hd) & 15) || hd > tl || tl - hd > cap)
        return topic_corrupt(t, "head and tail out of order", hd, tl);
    uint64_t skip, need = trec_need(t, tl, len, &skip);
    uint64_t off = tl % cap;
    if (t->overflow == TOPIC_BLOCK) {
        uint64_t fl = LOADR(&h->floor);
        if (fl < need || fl > tl + skip) {
            fl = compute_floor(t, hd, tl, skip);
            if (fl < need && topic_reclaim(t, m) > 0)
                fl = compute_floor(t, hd, tl, skip);
            STORE(&h->floor, fl);
            if (fl < need)
                return 0;
        }
    }
    uint64_t nh;
    if (skip) {
        if (advance_head(t, hd, tl > off ? tl - off : 0, tl, &nh) < 0)
            return -1;
        hd = nh;
        trec_t *r = trec_at(t, tl);
        STORER(&r->len, (uint32_t)(skip - 16));
        STORER(&r->seq, 0);
        STORE(&r->state, TREC_SKIP);
        shm_crash_point("topic.publish.skip");
        tl += skip;
        STORE(&h->tail, tl);
        shm_crash_point("topic.publish.skip_tail");
        /* The record goes at the ring's start and may overwrite the journal's
         * tail (a record over half the capacity, or a run's earlier ones): a
         * repair must recount from here, where everything behind is whole. */
        journal_note(h, tl, sq);
        shm_crash_point("topic.publish.skip_journal");
    }
    if (advance_head(t, hd, need, tl, &nh) < 0)
        return -1;
    if (len >= BIG_COPY)
        /* a copy this large may use non-temporal stores, which a release
         * fence does not keep behind the store of head */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    trec_t *r = trec_at(t, tl);
    STORER(&r->len, (uint32_t)len);
    STORER(&r->seq, sq);
    STORER(&r->state, TREC_MSG);
    rv->tail = tl;
    rv->seq = sq;
    rv->head = nh;
    rv->len = len;
    return 1;
}

/* With plock held: publish the records written up to tl, the last of them
 * numbered sq - 1 (seq, then tail), then move the history window; nh is
 * head after the last one's reservation.  plock stays held. */
static void
publish_upto(topic_t *t, uint64_t tl, uint64_t sq, uint64_t nh)
{
    struct topic_hdr *h = t->h;
    shm_crash_point("topic.publish.copied");
    /* tail first: it alone publishes, and seq counts only what was.  A
     * publisher killed between the two leaves seq one short until the next
     * one's repair recounts it; seq first left it one ahead, a message
     * nobody could receive held every subscriber's lag at 1 meanwhile. */
    STORE(&h->tail, tl);
    shm_crash_point("topic.publish.tail");
    STORE(&h->seq, sq);
    shm_crash_point("topic.publish.seq");
    /* the history window: keep the last `history` messages */
    uint64_t q = LOADR(&h->hist), q0 = q;
    if (q < nh || q > tl || (q & 15))
        q = nh;
    while (q < tl) {
        uint32_t st;
        uint64_t span = trec_span(t, q, tl, &st);
        if (span == 0)
            break; /* the next publisher's head walk reports it */
        if (st == TREC_MSG && sq - LOADR(&trec_at(t, q)->seq) <= t->history)
            break;
        q += span;
    }
    if (q != q0) {
        STORE(&h->hist, q);
        shm_crash_point("topic.publish.hist");
    }
}

int
topic_reserve(topic_t *t, MappingObject *m, uint64_t len, int64_t deadline, topic_resv *rv)
{
    if (publish_begin(t, m, deadline) < 0)
        return -1;
    int k = reserve_locked(t, m, LOADR(&t->h->tail), LOADR(&t->h->seq), len, rv);
    if (k <= 0)
        topic_unlock(m, t);
    return k;
}

void *
topic_payload(topic_t *t, const topic_resv *rv)
{
    return trec_at(t, rv->tail) + 1;
}

/* Publish the record reserved (publish=1), or give the reservation up: tail
 * and seq unchanged, so nothing was published (head may have passed
 * records that publishing it would have overwritten).  Unlocks. */
void
topic_finish(topic_t *t, MappingObject *m, const topic_resv *rv, int publish)
{
    if (!publish) {
        shm_crash_point("topic.loan.abandoned");
        topic_unlock(m, t);
        return;
    }
    publish_upto(t, rv->tail + trec_total(rv->len), rv->seq + 1, rv->head);
    topic_unlock(m, t);
    ring_wake(&t->h->data_seq, &t->h->data_sleepers);
}

int
topic_publish(topic_t *t, MappingObject *m, const char *src, uint64_t len, int64_t deadline)
{
    topic_resv rv;
    int k = topic_reserve(t, m, len, deadline, &rv);
    if (k <= 0)
        return k;
    ring_copy(topic_payload(t, &rv), src, (size_t)len);
    topic_finish(t, m, &rv, 1);
    return 1;
}

Py_ssize_t
topic_publish_run(topic_t *t, MappingObject *m, const Py_buffer *bufs, Py_ssize_t n,
                  int64_t deadline)
{
    if (n <= 0)
        return 0;
    if (publish_begin(t, m, deadline) < 0)
        return -1;
    Py_ssize_t done = 0;
    int k = 1;
    /* the run's records are published together at its end (one store of
     * tail, which subscribers poll), and a dead publisher's repair
     * recounts them from the journal's tail, `start` */
    const uint64_t start = LOADR(&t->h->tail);
    uint64_t tl = start, sq = LOADR(&t->h->seq), nh = 0;
    while (done < n) {
        topic_resv rv;
        uint64_t len = (uint64_t)bufs[done].len, ran = tl - start;
        /* A run lets other publishers in every TOPIC_RUN_BYTES, and never
         * overwrites its own records: the next record and its wrap marker
         * (< one record) must fit in what the run has not written. */
        if (done > 0 && (ran >= TOPIC_RUN_BYTES || ran + 2 * trec_total(len) > t->cap))
            break;
        if ((k = reserve_locked(t, m, tl, sq, len, &rv)) <= 0)
            break;
        ring_copy(topic_payload(t, &rv), bufs[done].buf, (size_t)len);
        tl = rv.tail + trec_total(len);
        sq = rv.seq + 1;
        nh = rv.head;
        done++;
    }
    uint64_t marker = LOADR(&t->h->tail); /* past a wrap marker of a run cut short */
    if (marker > tl && marker - tl < t->cap)
        tl = marker;
    if (done > 0)
        publish_upto(t, tl, sq, nh);
    topic_unlock(m, t);
    if (done == 0)
        return k < 0 ? -1 : 0;
    ring_wake(&t->h->data_seq, &t->h->data_sleepers);
    if (k < 0)
        PyErr_Clear(); /* what went is counted; the next run meets the damage again */
    return done;
}

/* ---- waiting ------------------------------------------------------------------ */

/* A wait of topic_wait_space (space=1: room for a len-byte record) or
 * topic_wait_data (space=0: a record at subscriber s's cursor), for wait.h. */
typedef struct {
    topic_t *t;
    MappingObject *m;
    struct topic_sub *s;
    uint64_t len;
    uint32_t me;
    int space;
    const int *closed; /* data waits: the subscriber's, set by a close from another thread */
} topic_waiter;

static int
space_ready(void *ctx, uint32_t *sleep_on)
{
    topic_waiter *c = ctx;
    topic_t *t = c->t;
    struct topic_hdr *h = t->h;
    *sleep_on = LOAD(&h->space_seq);
    uint64_t tl = LOAD(&h->tail), hd = LOAD(&h->head);
    if (((tl | hd) & 15) || hd > tl)
        return 1; /* let the locked path name the damage */
    uint64_t skip, need = trec_need(t, tl, c->len, &skip);
    return compute_floor(t, hd, tl, skip) >= need;
}

static int
data_ready(void *ctx, uint32_t *sleep_on)
{
    topic_waiter *c = ctx;
    *sleep_on = LOAD(&c->t->h->data_seq);
    return LOAD(&c->t->h->tail) != LOADR(&c->s->pos) || __atomic_load_n(c->closed, __ATOMIC_RELAXED);
}

/* Count ourselves asleep, in an entry claimed first (a dead former owner's
 * counts taken off), or uncount. */
static void
tw_arm(void *ctx)
{
    topic_waiter *c = ctx;
    ring_roles_t rt = topic_roles(c->t);
    ring_roles_claim(&rt, c->me, 0);
    ring_roles_sleeper(&rt, c->me, c->space, +1);
}

static void
tw_disarm(void *ctx)
{
    topic_waiter *c = ctx;
    ring_roles_t rt = topic_roles(c->t);
    ring_roles_sleeper(&rt, c->me, c->space, -1);
}

/* After a slice without news: publishers free dead subscribers' entries
 * (which may hold the space), subscribers fix the sleeper counts. */
static int
tw_check(void *ctx)
{
    topic_waiter *c = ctx;
    if (c->space) {
        topic_reclaim(c->t, c->m);
    } else {
        ring_roles_t rt = topic_roles(c->t);
        ring_roles_fix(&rt, c->m);
    }
    return 0;
}

/* Wait through wait.h; the spin adapts as ring_wait's does.  1 ready, 0
 * timeout, -1 with an exception set. */
static int
topic_wait(topic_waiter *c, int64_t deadline, int64_t *spin_ns)
{
    topic_t *t = c->t;
    shm_wait w = {.m = c->m, .word = c->space ? &t->h->space_seq : &t->h->data_seq, .ctx = c,
                  .ready = c->space ? space_ready : data_ready, .arm = tw_arm,
                  .disarm = tw_disarm, .check = tw_check, .spin_adapt = spin_ns,
                  .what = t->what};
    return shm_wait_until(&w, deadline);
}

int
topic_wait_space(topic_t *t, MappingObject *m, uint64_t len, int64_t deadline,
                 int64_t *spin_ns)
{
    topic_waiter c = {t, m, NULL, len, m->token, 1, NULL};
    return topic_wait(&c, deadline, spin_ns);
}

int
topic_wait_data(topic_t *t, MappingObject *m, struct topic_sub *s, const int *closed,
                int64_t deadline, int64_t *spin_ns)
{
    topic_waiter c = {t, m, s, 0, m->token, 0, closed};
    return topic_wait(&c, deadline, spin_ns);
}

uint64_t
topic_slowest(topic_t *t, MappingObject *m, uint32_t *idx)
{
    uint64_t worst = 0, sq = LOAD(&t->h->seq);
    *idx = UINT32_MAX;
    for (uint32_t i = 0; i < t->max_subs; i++) {
        struct topic_sub *s = &t->subs[i];
        uint32_t owner = LOAD(&s->owner);
        if (owner == 0 || !shm_token_alive(m, owner))
            continue;
        uint64_t lag = sq - LOAD(&s->seq);
        if (lag <= sq && (lag > worst || *idx == UINT32_MAX)) {
            worst = lag;
            *idx = i;
        }
    }
    return worst;
}

/* ---- subscribing ------------------------------------------------------------ */

long
topic_subscribe(topic_t *t, MappingObject *m, uint64_t want, int64_t deadline)
{
    struct topic_hdr *h = t->h;
    uint32_t me = m->token;
    if (topic_lock(t, m, deadline) < 0)
        return -1;
    uint64_t tl = LOADR(&h->tail), hd = LOADR(&h->head), hist = LOADR(&h->hist);
    uint64_t sq = LOADR(&h->seq);
    if (((tl | hd | hist) & 15) || hd > tl || tl - hd > t->cap || hist > tl) {
        topic_unlock(m, t);
        return topic_corrupt(t, "head, history and tail out of order", hd, tl);
    }
    if (want > t->history)
        want = t->history;
    uint64_t q = hist < hd ? hd : hist, first = sq;
    while (q < tl) {
        uint32_t st;
        uint64_t span = trec_span(t, q, tl, &st);
        uint64_t rs = LOADR(&trec_at(t, q)->seq);
        if (span == 0 || (st == TREC_MSG && rs >= sq)) {
            topic_unlock(m, t);
            return topic_corrupt(t, "bad record in the history", st, q);
        }
        if (st == TREC_MSG && sq - rs <= want) {
            first = rs;
            break;
        }
        q += span;
    }
    long idx = -1;
    for (int round = 0; round < 2 && idx < 0; round++) {
        if (round == 1 && topic_reclaim(t, m) == 0)
            break;
        for (uint32_t i = 0; i < t->max_subs; i++) {
            if (LOAD(&t->subs[i].owner) == 0) {
                idx = (long)i;
                break;
            }
        }
    }
    if (idx < 0) {
        topic_unlock(m, t);
        PyErr_Format(t->st->BusyError, "%s already has its max_subscribers=%u live subscribers; "
                     "close some, or create the topic with a larger max_subscribers=",
                     t->what, t->max_subs);
        return -1;
    }
    struct topic_sub *s = &t->subs[idx];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    STORER(&s->pos, q);
    STORER(&s->hold, q);
    STORER(&s->seq, first);
    STORER(&s->received, 0);
    STORER(&s->missed, 0);
    STORER(&s->joined, (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
    STORE(&s->owner, me);
    shm_crash_point("topic.subscribe.claimed");
    if (t->overflow == TOPIC_BLOCK && LOADR(&h->floor) > q) {
        STORE(&h->floor, q);
        shm_crash_point("topic.subscribe.floor");
    }
    topic_unlock(m, t);
    return idx;
}

void
topic_unsubscribe(topic_t *t, uint32_t idx, uint32_t token)
{
    if (idx >= t->max_subs)
        return;
    uint32_t v = token;
    if (__atomic_compare_exchange_n(&t->subs[idx].owner, &v, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED)) {
        shm_crash_point("topic.unsubscribe.freed");
        if (t->overflow == TOPIC_BLOCK)
            ring_wake(&t->h->space_seq, &t->h->space_sleepers);
    }
}

/* ---- receiving ------------------------------------------------------------ */

int
topic_next(topic_t *t, struct topic_sub *s, uint64_t *pos, uint32_t *len, uint64_t *missed)
{
    struct topic_hdr *h = t->h;
    const uint64_t cap = t->cap;
    for (;;) {
        uint64_t p = LOADR(&s->pos);
        uint64_t hd = LOAD(&h->head); /* head first: it never passes a later tail */
        uint64_t tl = LOAD(&h->tail);
        if ((p | hd | tl) & 15)
            return topic_corrupt(t, "misaligned position", p, tl);
        if (hd > tl)
            return topic_corrupt(t, "head beyond the tail", hd, tl);
        if (p < hd) { /* overwritten: go on from the oldest record still there */
            STORE(&s->pos, hd);
            if (LOADR(&s->hold) < hd)
                STORE(&s->hold, hd);
            shm_crash_point("topic.recv.jumped");
            continue;
        }
        if (p > tl)
            return topic_corrupt(t, "a subscriber's position beyond the tail", p, tl);
        if (p == tl)
            return TN_EMPTY;
        trec_t *r = trec_at(t, p);
        uint64_t off = p % cap;
        uint32_t st = LOAD(&r->state), n = LOADR(&r->len);
        uint64_t rs = LOADR(&r->seq);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (p < LOADR(&h->head))
            continue; /* overwritten while we read its header */
        if (st == TREC_SKIP) {
            uint64_t total = cap - off;
            if ((uint64_t)n + 16 != total || total > tl - p)
                return topic_corrupt(t, "bad wrap marker", n, p);
            int moved_hold = LOADR(&s->hold) == p;
            STORE(&s->pos, p + total);
            if (moved_hold)
                STORE(&s->hold, p + total);
            continue;
        }
        if (st != TREC_MSG)
            return topic_corrupt(t, "unknown record state", st, p);
        uint64_t total = trec_total(n);
        if (total > cap - off || total > tl - p)
            return topic_corrupt(t, "record length overruns the ring", n, p);
        uint64_t want = LOADR(&s->seq);
        if (rs > want) {
            *missed = rs - want;
            STORE(&s->missed, LOADR(&s->missed) + *missed);
            STORE(&s->seq, rs);
            shm_crash_point("topic.recv.lost");
            return TN_LOST;
        }
        if (rs < want)
            return topic_corrupt(t, "a record's sequence number is behind the subscriber's",
                                 rs, want);
        *pos = p;
        *len = n;
        return TN_READY;
    }
}

int
topic_still_there(topic_t *t, uint64_t pos)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return pos >= LOADR(&t->h->head);
}

void
topic_set_hold(topic_t *t, struct topic_sub *s, uint64_t hold)
{
    STORE(&s->hold, hold);
    topic_wake_publishers(t);
}

int
topic_run(topic_t *t, struct topic_sub *s, uint64_t pos, uint32_t len, uint64_t *rpos,
          uint32_t *rlen, int max)
{
    const uint64_t cap = t->cap;
    uint64_t p = pos + trec_total(len), want = LOADR(&s->seq) + 1;
    uint64_t tl = LOAD(&t->h->tail); /* once: the run reads no shared line per record */
    int n = 1;
    rpos[0] = pos;
    rlen[0] = len;
    while (n < max && p < tl && tl - p <= cap) {
        trec_t *r = trec_at(t, p);
        uint64_t off = p % cap;
        uint32_t st = LOADR(&r->state), l = LOADR(&r->len);
        if (st == TREC_SKIP) {
            if ((uint64_t)l + 16 != cap - off || cap - off > tl - p)
                break;
            p += cap - off;
            continue;
        }
        uint64_t total = trec_total(l);
        if (st != TREC_MSG || total > cap - off || total > tl - p || LOADR(&r->seq) != want)
            break;
        rpos[n] = p;
        rlen[n] = l;
        n++;
        want++;
        p += total;
    }
    return n;
}

void
topic_advance(topic_t *t, struct topic_sub *s, uint64_t next, uint64_t count, uint64_t hold,
              int wake)
{
    STORE(&s->seq, LOADR(&s->seq) + count);
    STORE(&s->received, LOADR(&s->received) + count);
    STORE(&s->pos, next);
    shm_crash_point("topic.recv.advanced");
    STORE(&s->hold, hold < next ? hold : next);
    if (wake)
        topic_wake_publishers(t);
}

void
topic_wake_publishers(topic_t *t)
{
    if (t->overflow == TOPIC_BLOCK)
        ring_wake(&t->h->space_seq, &t->h->space_sleepers);
}
