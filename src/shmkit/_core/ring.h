/* ring.h - the message ring's shared-memory layout and protocol, for
 * ring.c (the protocol) and ringtype.c (its Python type).  See ring.c for
 * the layout, the protocol and the crash analysis. */
#ifndef SHMKIT_RING_H
#define SHMKIT_RING_H

#include "shmkit.h"
#include "journal.h" /* shm_lock_acquire_repair */
#include "msgtype.h"  /* msg_kept_t */
#include <limits.h>
#include <stddef.h>
#include <string.h>

#define RING_MAGIC 0x31474e52u /* "RNG1" */
#define RING_FORMAT 3 /* 2: ABANDONED is counted when passed (loans); 3: LENT, RETURNED */
#define RING_ROLES_OFF 512

#define SPIN_START_NS (20 * 1000LL) /* a new handle's spin before sleeping */
#define BIG_COPY (256 * 1024)        /* copies this large run without the GIL */

/* Record states.  The top two bits say what the low 30 hold. */
#define ST_KIND(s) ((s) & 0xC0000000u)
#define ST_RESERVED 0x40000000u /* | producer token: being written */
#define ST_TAKEN 0xC0000000u    /* | consumer token: lent out as a view */
#define ST_LENT 0x00000000u     /* | consumer token (never 0): lent out as a view
                                   that goes back to the channel if its holder dies */
#define ST_FIXED 0x80000000u
#define ST_COMMITTED 0x80000001u
#define ST_SKIP 0x80000002u
#define ST_ABANDONED 0x80000003u
#define ST_DONE 0x80000004u
#define ST_RETURNED 0x80000005u /* a LENT record whose holder died: delivered again */

/* Lent out as a view (TAKEN or LENT): the low 30 bits name the holder. */
static inline int
st_lent(uint32_t s)
{
    return ST_KIND(s) == ST_TAKEN || (ST_KIND(s) == ST_LENT && s != 0);
}

/* Role-table entry of one attach slot (the topic, topic.h, keeps the same
 * table at the same offset, without bits 32 and 33):
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
    uint32_t returned;     /* at least the RETURNED records below read (clock) */
    uint32_t pad2a;
    uint64_t redelivered;  /* records given back by dead holders so far */
    char pad2[192 - 184];
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
_Static_assert(offsetof(struct ring_hdr, returned) == 168, "returned records");
_Static_assert(offsetof(struct ring_hdr, jr) == 320, "consumers' journal");
_Static_assert(offsetof(struct ring_hdr, data_seq) == 192, "data wait line");
_Static_assert(offsetof(struct ring_hdr, space_seq) == 256, "space wait line");
_Static_assert(sizeof(struct ring_hdr) == RING_ROLES_OFF, "role table");

typedef struct {
    uint32_t len, state;
} rec_t;

/* How many messages a handle counts the failures of at once: those that a
 * signal handler's get interleaves (see message_at_fault). */
#define BACK_SLOTS 4

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
    struct {                /* messages Queue.get gave back for a non-interrupt, */
        uint64_t pos;       /* and how often (ringtype.c, message_at_fault); */
        int times;          /* free: times 0, or its message finished (back_stale) */
    } back[BACK_SLOTS];
    PyObject *name;
    msg_kept_t kept;        /* messages taken as a signal handler raised: the
                             * next receive's (msgtype.h) */
} RingObject;


/* The module's state (exception classes, types) from a ring object. */
#define RING_ST(r) shm_state_of((PyObject *)(r))

static inline uint64_t rec_total(uint64_t len) { return 8 + ((len + 7) & ~7ull); }
static inline rec_t *rec_at(RingObject *r, uint64_t pos)
{
    return (rec_t *)(r->data + (pos & ~7ull) % r->cap);
}
/* Copy a message in or out of a ring (ring.c, topic.c and their types):
 * one this large (BIG_COPY) runs without the GIL. */
static inline void
ring_copy(void *dst, const void *src, size_t len)
{
    if (len >= BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src, len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(dst, src, len);
    }
}
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOADR(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORER(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

int ring_corrupt(RingObject *r, const char *what, unsigned long long a,
                 unsigned long long b);

/* ---- handles ---- */
static inline void ring_leave(MappingObject *m) { shm_unpin((PyObject *)m); }
void ring_claim_entry(RingObject *r, uint32_t me, uint64_t bits);
/* Our role entry, claimed and announcing `bits`: one table write per
 * handle and role, remembered in role_token and role_bits. */
static inline void
ring_claim(RingObject *r, uint32_t me, uint64_t bits)
{
    if (r->role_token != me || (r->role_bits & bits) != bits)
        ring_claim_entry(r, me, bits);
}

int ring_claim_consumer(RingObject *r, MappingObject *m, uint32_t me);
/* Before a receive reports the channel empty (or closed, or without
 * senders): give back what dead holders of views hold (ring_repair). */
int ring_repair_empty(RingObject *r, MappingObject *m);
int ring_give_back(RingObject *r, uint64_t pos, uint32_t me);
/* Lock-free hint for waiters: a record lent to a dead holder, or a finished
 * one stuck at head, needs a repair (ring_repair's look at the views). */
int ring_views_need_repair(RingObject *r, MappingObject *m);
/* Messages waiting to be received, counting those lent to consumers that
 * died, which the next receive gives back (lock-free read). */
uint64_t ring_depth(RingObject *r, MappingObject *m);

/* ---- the role table and its sleeper counts (the ring's and the topic's) ---- */
/* Where one handle sees a role table: its entries and the two global sleeper
 * words it accounts for, sleepers[0] on the data side, [1] on the space side.
 * Pointers into the handle's mapping; max_slots fixed when it was bound. */
typedef struct {
    uint64_t *roles;
    uint32_t max_slots;
    uint32_t *sleepers[2];
} ring_roles_t;

static inline ring_roles_t
ring_roles_of(RingObject *r)
{
    return (ring_roles_t){r->roles, r->max_slots, {&r->h->data_sleepers, &r->h->space_sleepers}};
}
/* Make the entry of attachment `me` ours (taking off the sleeper counts a
 * dead former owner of the slot left) and announce `bits` in it. */
void ring_roles_claim(const ring_roles_t *rt, uint32_t me, uint64_t bits);
/* Count (+1) or uncount (-1) one sleeper of attachment `me` on the data
 * (space=0) or space (1) side, in the global word and in its claimed entry. */
void ring_roles_sleeper(const ring_roles_t *rt, uint32_t me, int space, int delta);
/* Take off the sleeper counts of dead attachments (m asks the kernel), and
 * clear a global word that no live entry accounts for. */
void ring_roles_fix(const ring_roles_t *rt, MappingObject *m);

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

/* ---- the consumers' side ---- */
/* One holding of clock that takes records (see ring_take_begin). */
typedef struct {
    uint64_t head, received, dropped;
} take_t;

enum { T_EMPTY = 0, T_READY = 1, T_WRITING = 2 };

void ring_take_begin(struct ring_hdr *h, take_t *tk);
int ring_take_end(RingObject *r, take_t *tk);
void ring_take_copied(RingObject *r, take_t *tk, uint64_t pos, uint32_t len);
void ring_take_lent(RingObject *r, take_t *tk, uint64_t pos, uint32_t len, uint32_t me,
                    int redeliver);
int ring_next(RingObject *r, take_t *tk, uint64_t *pos, uint32_t *len);
int ring_reclaim(RingObject *r);
int ring_lock(RingObject *r, MappingObject *m, uint32_t *word, uint32_t me, int64_t deadline);
/* Take a ring's robust lock (the ring's plock or clock, the topic's plock)
 * through lock.c, which records the holding: the uncontended case is
 * shm_lock_try's one CAS; otherwise wait until the deadline, at least a
 * grace period, and after a dead holder call repair(ctx, 1) to recount
 * from the ring's journal.  1 taken, 0 still held by a live process (no
 * exception set: the caller names the lock), -1 with an exception set. */
#define LOCK_GRACE_NS (200 * 1000 * 1000LL)
static inline int
ring_lock_word(MappingObject *m, uint32_t *word, int64_t deadline,
               shm_repair_fn repair, void *ctx)
{
    int got = shm_lock_try(m, word);
    if (got != 0)
        return got < 0 ? -1 : 1;
    int64_t grace = shm_now_ns() + LOCK_GRACE_NS;
    return shm_lock_acquire_repair(m, word, deadline > grace ? deadline : grace, NULL, repair,
                                   ctx);
}
/* Lock-free hints for waiters (ring_wait, and waitset.c's wait on many):
 * is there a record to look at, is there room for a `total`-byte record?
 * Anything odd says yes, so that the checking call runs. */
int ring_data_ready(RingObject *r);
int ring_space_ready(RingObject *r, uint64_t total);
/* ring_roles_sleeper on this ring's role table. */
void ring_sleeper(RingObject *r, uint32_t me, int space, int delta);
/* Release a ring lock we hold (lock.c un-records the holding).  A word
 * that no longer shows our token (damage) has nothing to release; that
 * error is dropped, and an exception already pending (the reason a
 * failing call is unlocking) is kept, never cleared with it. */
static inline void
ring_unlock(MappingObject *m, uint32_t *word)
{
    shm_lock_release_journal(m, word, NULL);
}

/* ---- the producers' side ---- */
Py_ssize_t ring_reserve(RingObject *r, MappingObject *m, uint32_t me, const Py_ssize_t *lens,
                        Py_ssize_t n, uint64_t *pos, int64_t deadline);
void ring_fill(RingObject *r, uint64_t pos, const char *src, Py_ssize_t len);
int ring_settle(rec_t *rec, uint32_t me, int publish);

/* ---- loans (ringtype.c): a message built in place, then sent or abandoned ---- */
enum { LOAN_OPEN = 0, LOAN_SENT = 1, LOAN_ABANDONED = 2 };
typedef struct LoanObject LoanObject;
typedef struct {
    /* Refuse to end the loan now (before anything changes): -1 with an
     * exception set, else 0.  May be NULL. */
    int (*check)(LoanObject *l);
    /* Send (publish=1) or abandon: the protocol's last steps.  Called once,
     * with the mapping still pinned.  0, or -1 with an exception set. */
    int (*end)(LoanObject *l, int publish);
} loan_ops;
struct LoanObject {
    PyObject_HEAD
    const loan_ops *ops;
    PyObject *owner;       /* the Ring or Topic */
    PyObject *mapping;     /* pinned while open; NULL once ended */
    char *payload;
    Py_ssize_t len;
    Py_ssize_t exports;    /* buffer exports alive */
    PyObject *view_ref;    /* weak reference to the memoryview of .buffer */
    int state;
    PyObject *weakrefs;
    /* the channel's: its header, the record, the attachment that reserved it */
    struct ring_hdr *h;
    rec_t *rec;
    uint32_t token;
    /* the topic's: its reservation, and the thread holding its lock */
    uint64_t aux[3];
    unsigned long thread;
};
/* A new loan of `owner` (not open: dealloc does nothing), and opening it
 * over len bytes at payload, pinning m. */
PyObject *loan_new(const loan_ops *ops, PyObject *owner);
void loan_open(LoanObject *l, MappingObject *m, char *payload, Py_ssize_t len);

/* ---- waiting ---- */
int ring_wait(RingObject *r, MappingObject *m, uint32_t me, int space, uint64_t total,
              int64_t deadline, int stop_no_senders);
/* Every attachment that ever sent is gone (closed or died), and something
 * was sent: a receiver that asked to stop then, stops. */
int ring_senders_gone(RingObject *r, MappingObject *m);
int ring_backoff(int *fruitless);
/* Queue.get's receive (queuetype.c): the next message, decoded by
 * decode[0] (a pickle) or decode[1] (a big object's header) while it stays
 * in the channel, then finished (ringtype.c, decode_lent); decode[2] tells
 * a signal handler's exception from a pickle's own. */
PyObject *ring_get_decoded(RingObject *r, PyObject *timeout, int nowait, PyObject *const *decode);

#endif
