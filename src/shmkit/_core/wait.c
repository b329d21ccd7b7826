/* wait.c - the one way to wait (policy and contract in wait.h). */
#include "wait.h"
#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#define SHM_FUTEX2_SIZE_U32 0x02
#define POLL_SLICE_NS (1 * 1000 * 1000LL) /* without futex_waitv: poll the others */

struct waitv_entry { /* the kernel's struct futex_waitv */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static int have_waitv = 1; /* cleared once the kernel says ENOSYS */

static int
closed_meanwhile(shm_wait *w, uint32_t token)
{
    MappingObject *m = w->m;
    if (m->base != NULL && !m->closing && m->token == token)
        return 0;
    PyErr_Format(shm_state_of((PyObject *)w->m)->ClosedError, "%s was closed in this process while a call waited on "
                 "it", w->what ? w->what : "the object");
    return 1;
}

/* The index of the first of ws[0..n) that is ready (vals[i] set for those
 * tested before it), or -1. */
static int
first_ready(shm_wait *const *ws, int n, uint32_t *vals)
{
    for (int k = 0; k < n; k++)
        if (ws[k]->ready(ws[k]->ctx, &vals[k]))
            return k;
    return -1;
}

/* Spin with the GIL held until one is ready or the spin ends.  Returns the
 * index of a ready one, or -1. */
static int
spin(shm_wait *const *ws, int n, uint32_t *vals, int64_t spin_ns, int64_t deadline)
{
    int k = first_ready(ws, n, vals);
    if (k >= 0 || spin_ns <= 0)
        return k;
    int64_t end = shm_now_ns() + spin_ns;
    if (end > deadline)
        end = deadline;
    do {
        for (int i = 0; i < 16; i++) {
            cpu_relax();
            if ((k = first_ready(ws, n, vals)) >= 0)
                return k;
        }
    } while (shm_now_ns() < end);
    return -1;
}

/* One sleep on all the words, at most until min(deadline, now + slice).
 * Returns 0 woken (or a value had changed), ETIMEDOUT, or EINTR. */
static int
sleep_on(shm_wait *const *ws, const uint32_t *vals, int n, int64_t deadline, int64_t slice)
{
    if (n == 1)
        return shm_futex_wait(ws[0]->word, vals[0], deadline, slice);
    int64_t now = shm_now_ns();
    if (now >= deadline)
        return ETIMEDOUT;
    int64_t until = deadline - now > slice ? now + slice : deadline;
    if (have_waitv) {
        struct waitv_entry e[SHM_WAIT_MAX];
        for (int i = 0; i < n; i++) {
            e[i].val = vals[i];
            e[i].uaddr = (uint64_t)(uintptr_t)ws[i]->word;
            e[i].flags = SHM_FUTEX2_SIZE_U32; /* shared: keyed on the page */
            e[i].reserved = 0;
        }
        struct timespec ts = {until / 1000000000LL, until % 1000000000LL};
        long r = syscall(SYS_futex_waitv, e, (unsigned)n, 0,
                         until == SHM_FOREVER ? NULL : &ts, CLOCK_MONOTONIC);
        if (r >= 0 || errno == EAGAIN)
            return 0;
        if (errno != ENOSYS)
            return errno;
        have_waitv = 0;
    }
    /* An old kernel: sleep on the first word, in short slices, and re-test
     * the others after each. */
    return shm_futex_wait(ws[0]->word, vals[0], until,
                          slice < POLL_SLICE_NS ? slice : POLL_SLICE_NS);
}

/* Run every check(): 0, or -1 as soon as one raises. */
static int
check_all(shm_wait *const *ws, int n)
{
    for (int k = 0; k < n; k++)
        if (ws[k]->check && ws[k]->check(ws[k]->ctx) < 0)
            return -1;
    return 0;
}

static int
wait_many(shm_wait *const *ws, int n, int64_t deadline, int *which)
{
    uint32_t tokens[SHM_WAIT_MAX], vals[SHM_WAIT_MAX];
    int64_t spin_ns = 0, check_ns = SHM_FOREVER;
    for (int i = 0; i < n; i++) {
        tokens[i] = ws[i]->m->token;
        ws[i]->slept = 0;
        if (ws[i]->spin_ns > spin_ns)
            spin_ns = ws[i]->spin_ns;
        int64_t c = ws[i]->check_ns > 0 ? ws[i]->check_ns : SHM_WAIT_SLICE_NS;
        if (c < check_ns)
            check_ns = c;
    }
    int k = spin(ws, n, vals, shm_now_ns() >= deadline ? 0 : spin_ns, deadline);
    if (k >= 0) {
        *which = k;
        return 1;
    }
    for (int i = 0; i < n; i++)
        if (ws[i]->arm)
            ws[i]->arm(ws[i]->ctx);
    int result = 0;
    int64_t slice = check_ns < SHM_WAIT_FIRST_SLICE_NS ? check_ns : SHM_WAIT_FIRST_SLICE_NS;
    if (check_ns == SHM_FOREVER)
        slice = SHM_FOREVER;
    for (;;) {
        /* After arming: a waker that ran before we were counted changed
         * the state, and ready() sees it now. */
        if ((k = first_ready(ws, n, vals)) >= 0) {
            *which = k;
            result = 1;
            break;
        }
        if (shm_now_ns() >= deadline) {
            /* Before reporting a timeout, ask once whether a dead peer is
             * what we waited for. */
            if (check_all(ws, n) < 0)
                result = -1;
            else if ((k = first_ready(ws, n, vals)) >= 0) {
                *which = k;
                result = 1;
            }
            break;
        }
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = sleep_on(ws, vals, n, deadline, slice);
        Py_END_ALLOW_THREADS
        for (int i = 0; i < n; i++)
            ws[i]->slept = 1;
        if (PyErr_CheckSignals() < 0) {
            result = -1;
            break;
        }
        for (k = 0; k < n; k++)
            if (closed_meanwhile(ws[k], tokens[k]))
                break;
        if (k < n) {
            result = -1;
            break;
        }
        if (err == ETIMEDOUT && shm_now_ns() < deadline) {
            /* A whole slice without a wake-up: is the peer we wait for alive? */
            slice = check_ns;
            if (check_all(ws, n) < 0) {
                result = -1;
                break;
            }
        }
    }
    for (int i = 0; i < n; i++)
        if (ws[i]->disarm)
            ws[i]->disarm(ws[i]->ctx);
    return result;
}

int
shm_wait_until(shm_wait *w, int64_t deadline)
{
    int which;
    int64_t *adapt = w->spin_adapt;
    if (adapt == NULL)
        return wait_many(&w, 1, deadline, &which);
    int64_t spin = *adapt < SHM_WAIT_SPIN_MIN_NS   ? SHM_WAIT_SPIN_MIN_NS
                   : *adapt > SHM_WAIT_SPIN_MAX_NS ? SHM_WAIT_SPIN_MAX_NS
                                                   : *adapt;
    w->spin_ns = spin;
    int r = wait_many(&w, 1, deadline, &which);
    if (r == 1)
        *adapt = w->slept ? spin / 2 : spin * 2 + 1000;
    return r;
}

int
shm_wait_any(shm_wait *const *ws, int n, int64_t deadline, int *which)
{
    if (n < 1 || n > SHM_WAIT_MAX) {
        PyErr_Format(PyExc_ValueError, "can wait on 1 to %d objects at once, not %d",
                     SHM_WAIT_MAX, n);
        return -1;
    }
    return wait_many(ws, n, deadline, which);
}
