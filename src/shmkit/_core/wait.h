/* wait.h - the core's one way to wait.
 *
 * Every blocking call of every structure waits through shm_wait_until (one
 * condition) or shm_wait_any (several, for waiting on many objects at
 * once).  A structure describes its condition with a shm_wait: the futex
 * word that changes when the condition may have become true, a ready()
 * test, and optional hooks to count itself as a sleeper (so that wakers
 * make a system call only when someone sleeps) and to check liveness and
 * repair after a slice asleep without news.  The policy is here, once:
 *
 *   1. spin for spin_ns with the GIL held (a partner that answers within
 *      microseconds is caught without a system call; giving the GIL up for
 *      so short a time can cost a whole switch interval to get it back);
 *   2. arm(), re-test ready() (closing the race with a waker that saw no
 *      sleeper), then sleep on the word with the GIL released, in slices:
 *      SHM_WAIT_FIRST_SLICE_NS first, then SHM_WAIT_SLICE_NS;
 *   3. after every wake-up: run signal handlers (Ctrl-C raises at once),
 *      and stop with ClosedError if the handle was closed meanwhile;
 *   4. after a slice without a wake-up, and once more before reporting a
 *      timeout: check() (is the holder alive? repair what the dead left);
 *      a wait whose caller checks liveness elsewhere (check_ns =
 *      SHM_FOREVER: the asyncio watchers, which sleep on up to 128 words
 *      and would pay for re-arming them all) sleeps on until a wake-up;
 *   5. disarm() on every way out.
 *
 * Every callback runs with the GIL held (lock.c's ready() changes the
 * registry of held locks, which the GIL orders); ready() must not touch
 * Python objects.  The caller pins the
 * mapping (shm_pin) for the whole wait.
 *
 *   shm_wait w = {.m = m, .word = &h->seq, .ctx = r, .ready = data_ready,
 *                 .arm = count_me, .disarm = uncount_me, .check = repair,
 *                 .spin_ns = 20000, .what = "channel 'logs'"};
 *   int r = shm_wait_until(&w, deadline);   // 1 ready, 0 timeout, -1 error
 */
#ifndef SHMKIT_WAIT_H
#define SHMKIT_WAIT_H

#include "shmkit.h"

#define SHM_WAIT_FIRST_SLICE_NS (1 * 1000 * 1000LL)  /* first sleep before a check */
#define SHM_WAIT_SLICE_NS (50 * 1000 * 1000LL)       /* longest sleep between checks */
#define SHM_WAIT_SPIN_NS (20 * 1000LL)               /* default spin before sleeping */
#define SHM_WAIT_SPIN_MIN_NS (2 * 1000LL)            /* an adaptive spin: at least this */
#define SHM_WAIT_SPIN_MAX_NS (50 * 1000LL)           /* and at most this */
#define SHM_WAIT_MAX (128)                           /* words one shm_wait_any can watch */

typedef struct shm_wait {
    MappingObject *m;     /* the mapping the word lives in (pinned by the caller) */
    uint32_t *word;       /* the futex word to sleep on */
    void *ctx;            /* passed to every hook */
    /* 1 when the condition holds.  Otherwise 0, with *sleep_on set to the
     * word's value that the test was made against (sleep only while the
     * word still holds it). */
    int (*ready)(void *ctx, uint32_t *sleep_on);
    void (*arm)(void *ctx);          /* optional: count us as a sleeper */
    void (*disarm)(void *ctx);       /* optional: and uncount us */
    int (*check)(void *ctx);         /* optional: liveness and repair; 0, or -1 set */
    int64_t spin_ns;      /* how long to spin before sleeping (0: do not spin) */
    /* Optional: a handle's adaptive spin, used instead of spin_ns.  Spinning
     * pays when the peer answers within microseconds and costs when it
     * needs our CPU to answer at all (more runnable processes than cores),
     * so shm_wait_until doubles it after a wait that the spin ended and
     * halves it after one that had to sleep, within SHM_WAIT_SPIN_MIN_NS ..
     * SHM_WAIT_SPIN_MAX_NS. */
    int64_t *spin_adapt;
    int64_t check_ns;     /* longest sleep between checks (0: SHM_WAIT_SLICE_NS;
                           * SHM_FOREVER: none until the deadline) */
    const char *what;     /* "channel 'logs'": for the closed-meanwhile error */
    int slept;            /* out: 1 if the wait had to sleep (for adaptive spins) */
} shm_wait;

/* Wait until w->ready() or the deadline (CLOCK_MONOTONIC ns, SHM_FOREVER).
 * Call with the GIL held.  Returns 1 ready, 0 timeout, -1 with an exception
 * set (KeyboardInterrupt or another signal handler's, ClosedError when the
 * handle was closed by another thread, or what check() raised). */
int shm_wait_until(shm_wait *w, int64_t deadline);

/* Wait until any of ws[0..n) is ready; *which is its index.  n is at most
 * SHM_WAIT_MAX.  Sleeps on all the words at once with futex_waitv (Linux
 * 5.16+), or in short slices on older kernels.  Same returns and rules. */
int shm_wait_any(shm_wait *const *ws, int n, int64_t deadline, int *which);

#endif
