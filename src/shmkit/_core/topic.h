/* topic.h - the broadcast ring behind shmkit.Topic: layout and protocol,
 * for topic.c (the protocol, no Python objects) and topictype.c (its
 * Python types).  docs/topic.md walks through the protocol and every death.
 *
 * Payload layout (offsets from the payload start, native byte order):
 *
 *      0  magic u32 "TPC1"          4  format u32 (TOPIC_FORMAT)
 *      8  cap u64                   bytes in the data area, a multiple of 64
 *     16  data_off u64              where the data area starts
 *     24  history u64               messages kept for subscribers that join late
 *     32  max_subs u32              entries of the subscriber table
 *     36  overflow u32              0 block, 1 overwrite
 *     40  max_slots u32             attach slots of the segment (role table)
 *     44  subs_off u32              where the subscriber table starts
 *     64  tail u64                  publishers' line: end of the published bytes
 *     72  seq u64                   sequence number of the next message
 *     80  floor u64                 (block) no live subscriber holds bytes below it
 *     88  hist u64                  first record kept as history
 *     96  plock u32                 publishers' robust lock (lock.c)
 *    100  jsel u32                  which journal is in force
 *    104  j[2] {tail, seq}          publishers' journals (topic_fix_publishers)
 *    192  head u64                  oldest byte still present: below it, overwritten
 *    256  data_seq u32, data_sleepers u32      subscribers asleep wait here
 *    320  space_seq u32, space_sleepers u32    publishers asleep wait here
 *    512  role table: u64 per attach slot: sleeper counts and the generation
 *  subs_off  subscriber table: max_subs entries of 64 bytes (struct topic_sub)
 *  data_off  data area: cap bytes of records
 *
 * A record is [u32 len | u32 state | u64 seq] and len bytes, padded to 16.
 * A record never straddles the end: a publisher whose record does not fit
 * writes a SKIP record over the rest first.
 *
 *     head <= tail,  tail - head <= cap,  head <= hist <= tail
 *     [head, tail)  published records, MSG or SKIP, each whole
 */
#ifndef SHMKIT_TOPIC_H
#define SHMKIT_TOPIC_H

#include "ring.h" /* the role table, its sleeper counts, LOAD/STORE, ring_wake */
#include <stddef.h>

#define TOPIC_MAGIC 0x31435054u /* "TPC1" */
#define TOPIC_FORMAT 1
#define TOPIC_ROLES_OFF 512
#define TOPIC_SUB_BYTES 64
#define TOPIC_MAX_SUBS 4096
#define TOPIC_MAX_CAP (1ull << 46)
#define TOPIC_MAX_HISTORY (1ull << 40)

#define TOPIC_BLOCK 0
#define TOPIC_OVERWRITE 1

#define TREC_MSG 0x3147534Du  /* "MSG1" */
#define TREC_SKIP 0x50494B53u /* "SKIP" */

/* The role table (ROLE_* in ring.h, without the producer and consumer
 * bits): bits 0-15 subscribers of this attachment asleep, 16-31 publishers
 * asleep, 40-59 the attach generation. */

struct topic_journal { uint64_t tail, seq; };

struct topic_hdr {
    uint32_t magic, format;
    uint64_t cap, data_off, history;
    uint32_t max_subs, overflow, max_slots, subs_off;
    char pad0[64 - 48];
    uint64_t tail, seq, floor, hist;
    uint32_t plock, jsel;
    struct topic_journal j[2];
    char pad1[192 - 136];
    uint64_t head;
    char pad2[256 - 200];
    uint32_t data_seq, data_sleepers;
    char pad3[320 - 264];
    uint32_t space_seq, space_sleepers;
    char pad4[TOPIC_ROLES_OFF - 328];
};
_Static_assert(offsetof(struct topic_hdr, cap) == 8, "cap");
_Static_assert(offsetof(struct topic_hdr, history) == 24, "history");
_Static_assert(offsetof(struct topic_hdr, max_subs) == 32, "max_subs");
_Static_assert(offsetof(struct topic_hdr, overflow) == 36, "overflow");
_Static_assert(offsetof(struct topic_hdr, max_slots) == 40, "max_slots");
_Static_assert(offsetof(struct topic_hdr, subs_off) == 44, "subs_off");
_Static_assert(offsetof(struct topic_hdr, tail) == 64, "publishers' line");
_Static_assert(offsetof(struct topic_hdr, seq) == 72, "seq");
_Static_assert(offsetof(struct topic_hdr, floor) == 80, "floor");
_Static_assert(offsetof(struct topic_hdr, hist) == 88, "hist");
_Static_assert(offsetof(struct topic_hdr, plock) == 96, "plock");
_Static_assert(offsetof(struct topic_hdr, jsel) == 100, "jsel");
_Static_assert(offsetof(struct topic_hdr, j) == 104, "journal");
_Static_assert(offsetof(struct topic_hdr, head) == 192, "head line");
_Static_assert(offsetof(struct topic_hdr, data_seq) == 256, "data wait line");
_Static_assert(offsetof(struct topic_hdr, space_seq) == 320, "space wait line");
_Static_assert(sizeof(struct topic_hdr) == TOPIC_ROLES_OFF, "role table");

/* One subscriber's cursor.  Written by its owner only (and, once the
 * owner's attachment is dead, freed by anyone with a CAS of owner). */
struct topic_sub {
    uint32_t owner;    /* attach token of the owning handle; 0: free */
    uint32_t pad;
    uint64_t pos;      /* next record to read */
    uint64_t hold;     /* oldest byte still in use (a lent view): <= pos */
    uint64_t seq;      /* sequence number expected next */
    uint64_t received; /* messages delivered */
    uint64_t missed;   /* messages lost to overwriting */
    uint64_t joined;   /* wall-clock ns of the subscription */
    uint64_t pad2;
};
_Static_assert(offsetof(struct topic_sub, pos) == 8, "sub pos");
_Static_assert(offsetof(struct topic_sub, hold) == 16, "sub hold");
_Static_assert(offsetof(struct topic_sub, seq) == 24, "sub seq");
_Static_assert(offsetof(struct topic_sub, received) == 32, "sub received");
_Static_assert(offsetof(struct topic_sub, missed) == 40, "sub missed");
_Static_assert(sizeof(struct topic_sub) == TOPIC_SUB_BYTES, "sub entry");

typedef struct {
    uint32_t len, state;
    uint64_t seq;
} trec_t;
_Static_assert(sizeof(trec_t) == 16, "record header");

/* A process's view of one topic: pointers into its mapping, and the
 * numbers checked once when bound (never re-read from shared memory). */
typedef struct {
    struct topic_hdr *h;
    char *data;
    uint64_t *roles;
    struct topic_sub *subs;
    uint64_t cap, history;
    uint32_t max_slots, max_subs, overflow;
    shm_state *st;  /* the core's state: the exception classes it raises */
    char what[160]; /* "topic 'name'", for messages */
} topic_t;

static inline uint64_t trec_total(uint64_t len) { return 16 + ((len + 15) & ~15ull); }
static inline trec_t *trec_at(const topic_t *t, uint64_t pos)
{
    return (trec_t *)(t->data + (pos & ~15ull) % t->cap);
}
static inline uint64_t topic_subs_off(uint32_t max_slots)
{
    return (TOPIC_ROLES_OFF + 8ull * max_slots + 63) & ~63ull;
}
static inline uint64_t topic_data_off(uint32_t max_slots, uint32_t max_subs)
{
    return topic_subs_off(max_slots) + (uint64_t)TOPIC_SUB_BYTES * max_subs;
}

int topic_corrupt(const topic_t *t, const char *what, unsigned long long a,
                  unsigned long long b);

/* Creating and binding. */
int topic_format(char *base, uint64_t avail, uint32_t max_slots, uint64_t cap,
                 uint64_t history, uint32_t overflow, uint32_t max_subs);
/* st: the core's state, kept in t for the errors the protocol raises. */
int topic_bind(topic_t *t, shm_state *st, char *base, uint64_t avail, uint32_t seg_slots,
               const char *name);

/* A publish split in two, for loans: topic_reserve takes plock and makes
 * room, writes the record's header past the tail and returns 1 with plock
 * held (0 no room, -1 error: unlocked); the caller writes the payload
 * (topic_payload), then topic_finish publishes it (seq, tail, history) or
 * gives it up, and unlocks. */
typedef struct {
    uint64_t tail, seq, head, len;
} topic_resv;
int topic_reserve(topic_t *t, MappingObject *m, uint64_t len, int64_t deadline,
                  topic_resv *rv);
void *topic_payload(topic_t *t, const topic_resv *rv);
void topic_finish(topic_t *t, MappingObject *m, const topic_resv *rv, int publish);
/* Publishing: 1 published, 0 no room (block mode: wait and retry), -1 error. */
int topic_publish(topic_t *t, MappingObject *m, const char *src, uint64_t len,
                  int64_t deadline);
/* Publish bufs[0..n) in order under one holding of plock (up to about
 * TOPIC_RUN_BYTES of records), waking subscribers once.  Returns how many
 * were published: fewer than n when the run's bytes ran out or there was
 * no room for the next (block mode) or damage stopped it (the next run
 * meets the damage again and says so); -1 with an error set when none
 * was published. */
#define TOPIC_RUN_BYTES (256u * 1024)
Py_ssize_t topic_publish_run(topic_t *t, MappingObject *m, const Py_buffer *bufs,
                             Py_ssize_t n, int64_t deadline);
/* Wait for room for a record of len bytes (block mode). 1, 0 timeout, -1 error. */
int topic_wait_space(topic_t *t, MappingObject *m, uint64_t len, int64_t deadline,
                     int64_t *spin_ns);
/* The most messages the slowest live subscriber is behind, and its pid. */
uint64_t topic_slowest(topic_t *t, MappingObject *m, uint32_t *pid);

/* Subscribing: claims an entry under plock, waited for until deadline
 * (Timeout naming its holder: a loan's, or a stopped publisher's).  want:
 * messages of history to deliver (at most the topic's).  Returns the entry
 * index, or -1. */
long topic_subscribe(topic_t *t, MappingObject *m, uint64_t want, int64_t deadline);
void topic_unsubscribe(topic_t *t, uint32_t idx, uint32_t token);
/* Free entries whose owner's attachment is dead.  Returns how many. */
int topic_reclaim(topic_t *t, MappingObject *m);

/* Receiving.  topic_next finds the message at the subscriber's cursor. */
enum { TN_EMPTY = 0, TN_READY = 1, TN_LOST = 2 };
int topic_next(topic_t *t, struct topic_sub *s, uint64_t *pos, uint32_t *len,
               uint64_t *missed);
/* After copying the record at pos: 1 if it was not overwritten meanwhile. */
int topic_still_there(topic_t *t, uint64_t pos);
/* After topic_next found the record at pos (len bytes): it and the records
 * after it, as far as the tail seen now, up to max in all: positions and
 * lengths into rpos/rlen.  Headers are read without the per-record
 * overwrite check (a batch reads no shared line per record):
 * topic_still_there(rpos[0]), after copying them all, checks them at once.
 * A header that does not follow on ends the run; topic_next reports it on
 * its next look.  Returns how many (>= 1). */
int topic_run(topic_t *t, struct topic_sub *s, uint64_t pos, uint32_t len, uint64_t *rpos,
              uint32_t *rlen, int max);
/* Move the cursor to next, past count records; hold is the oldest byte
 * still in use by this subscriber (next when nothing is lent).  wake=0
 * leaves waking publishers waiting for room (block mode) to a later
 * topic_wake_publishers, once for a batch. */
void topic_advance(topic_t *t, struct topic_sub *s, uint64_t next, uint64_t count,
                   uint64_t hold, int wake);
void topic_wake_publishers(topic_t *t);
void topic_set_hold(topic_t *t, struct topic_sub *s, uint64_t hold);
/* closed: the subscriber's flag; a close from another thread ends the wait. */
int topic_wait_data(topic_t *t, MappingObject *m, struct topic_sub *s, const int *closed,
                    int64_t deadline, int64_t *spin_ns);

#endif
