/* waitset.h - one object's readiness, as wait_ready() and Uring watch it.
 *
 * A description (kind, target, offset, extra) (the table in waitset.c) is
 * bound to a Watch: the futex word to sleep on and the structure's own
 * readiness test, sleeper count and liveness check, which shm_wait (wait.h)
 * calls as hooks.  waitset.c's wait_ready() sleeps on up to 128 Watches at
 * once in a thread; uring.c's Uring hands each Watch's word to io_uring, so
 * that an event loop is woken by the kernel.  Both follow one protocol:
 *
 *   watch_bind(&w, desc, i, ring_type, "fn()")   check and bind (no pin)
 *   shm_pin(w.pin)                               unless w.closed
 *   w_ready(&w, &v)? -> ready
 *   w_arm(&w); w_ready(&w, &v)? -> w_disarm, ready    (the waker that saw
 *                                                no sleeper changed the word)
 *   sleep while *w.word == v
 *   watch_gone(&w)? -> ready (the caller's next call raises ClosedError)
 *   w_disarm(&w); shm_unpin(w.pin)
 *
 * Every offset read from the description or from shared memory is checked
 * by watch_bind (shm_addr, shm_span) before a pointer is formed.
 */
#ifndef SHMKIT_WAITSET_H
#define SHMKIT_WAITSET_H

#include "ring.h"
#include "sync.h"
#include "wait.h"

enum { W_EVENT = 1, W_LOCK, W_SEM, W_RW_READ, W_RING_DATA, W_RING_SPACE, W_WORD, W_COND,
       W_RW_WRITE };

typedef struct {
    int kind;
    PyObject *pin;     /* the mapping pinned for the wait */
    MappingObject *m;
    RingObject *r;
    uint32_t *word;    /* the futex word */
    char *b;           /* the structure's start (sem, rwlock, condition) */
    uint64_t total;    /* W_RING_SPACE: record bytes */
    uint32_t value;    /* W_WORD: the value to wait away from */
    uint32_t me;       /* our token when the wait began */
    int armed, suspect, closed;
    int slept;         /* the wait slept (and so may have taken a wake-up) */
} Watch;

/* Bind description number i (for messages) of a call named fn.  0, with
 * w->closed set when the handle is closed (nothing pinned, nothing to
 * watch), or -1 with TypeError/ValueError/CorruptError set. */
int watch_bind(Watch *w, PyObject *desc, Py_ssize_t i, PyTypeObject *ring_type,
               const char *fn);
/* The shm_wait hooks (wait.h) of a bound Watch. */
int w_ready(void *ctx, uint32_t *sleep_on);
void w_arm(void *ctx);
void w_disarm(void *ctx);
int w_check(void *ctx);
/* 1 if the mapping is open (not closed, not closing). */
int watch_open(MappingObject *m);
/* 1 if the handle was closed (or re-attached) since watch_bind: its word may
 * no longer be read through the handle; the caller reports it ready. */
int watch_gone(const Watch *w);
/* 1 for a channel handle without an attachment: nobody counts it a sleeper,
 * so no sender wakes it; only liveness looks find it ready. */
int watch_unarmed(const Watch *w);

/* uring.c: the Uring type (called by shm_init_waitset). */
int shm_init_uring(PyObject *module);

#endif
