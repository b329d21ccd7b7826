/* lock.c - the crash-robust mutex on one shared u32.
 *
 * Word: 0 when free, else the owner's token (slot | generation << 10), with
 * bit 31 set while a waiter may be asleep (Drepper, "Futexes are tricky",
 * mutex #2).  Acquire is one CAS when free; release is one exchange and a
 * wake only if bit 31 was set.  No system call when uncontended.
 *
 * A waiter that sleeps a whole slice without being woken, or whose timeout
 * ran out (a try-lock included), asks the kernel whether the owner's
 * attachment still exists (attach.c).  If not, it
 * takes the lock over with a CAS from the dead value, so exactly one waiter
 * wins, and reports it: acquire returns "recovered" and the caller checks or
 * repairs whatever the lock guards.
 *
 *   Lock(mapping, offset, what="lock")
 *   .acquire(blocking=True, timeout=None) -> bool; .release(); with lock: ...
 *   .recovered: True when the current holding was taken from a dead owner
 */
#include "sync.h"
#include <errno.h>
#include <sys/stat.h>
#include <structmember.h>

#define SPIN_NS (10 * 1000LL) /* spin this long before sleeping */

static inline int
cas(uint32_t *w, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(w, &expected, desired, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

/* ---- the held registry ---------------------------------------------------
 * m->held[] records, per mapping, every lock word that a thread of this
 * process holds or is taking: one u64 per (thread, lock), 0 when free, else
 * (offset << 3) | state.  It is private to this process, and what orders its
 * changes is the GIL: every read and change of it happens with the GIL held
 * (the core lets the GIL go only around sleeps and long copies, never inside
 * these functions; an ASan build checks it, SHM_CHECK_GIL, though on 3.11
 * PyGILState_Check cannot tell once a sub-interpreter exists).  So a claim is a
 * plain load and store, and a fast acquire and release cost the two locked
 * instructions on the word alone.  (A free-threaded CPython turns the GIL
 * back on for this module, which does not declare Py_mod_gil.)  The entries
 * are still accessed as relaxed atomics, so that no access can tear.
 * Every path that takes a robust lock records it here first (TRYING), and
 * every release marks it RELEASING before the word is freed and clears it
 * after, so:
 *
 *   a word carrying our token is legitimately ours exactly while some entry
 *   of another thread names it as TRYING, HOLDS or RELEASING.
 *
 * A waiter that finds our token on the word and no such entry has found
 * damage (nobody of ours will ever release it) and takes the word over. */
#define HELD_TRYING 1u    /* about to CAS the word, or just did */
#define HELD_HOLDS 2u     /* holds it */
#define HELD_WAITING 3u   /* waiting for it; will go back to TRYING to CAS */
#define HELD_RELEASING 4u /* releasing it: the word may still carry our token */
/* Held, then overwritten by someone else's store (damage), which a release
 * reported.  Kept so that a second release of the word (a `with` block
 * around a call that released and reported it) reports the damage again
 * instead of blaming the caller; freed by that release, or when a thread of
 * ours takes the word again.  Never counts as holding it. */
#define HELD_DAMAGED 5u
#define HELD_OFF(e) ((e) >> 3)
#define HELD_STATE(e) ((unsigned)((e) & 7u))

static inline uint64_t
held_entry(MappingObject *m, uint32_t *word, unsigned state)
{
    return ((uint64_t)((char *)word - m->base) << 3) | state;
}

#ifdef SHM_CHECK_GIL
#define HELD_UNDER_GIL()                                                            \
    do {                                                                            \
        if (!PyGILState_Check())                                                    \
            Py_FatalError("shmkit: a lock's held registry changed without the GIL"); \
    } while (0)
#else
#define HELD_UNDER_GIL() ((void)0)
#endif

static inline uint64_t
held_get(MappingObject *m, int i)
{
    return __atomic_load_n(&m->held[i], __ATOMIC_RELAXED);
}

static inline void
held_put(MappingObject *m, int i, uint64_t e)
{
    HELD_UNDER_GIL();
    __atomic_store_n(&m->held[i], e, __ATOMIC_RELAXED);
}

/* Claim a free entry for word in state TRYING.  Returns its index, or -1
 * with RuntimeError when this process already holds SHM_HELD_MAX locks.
 * The CAS on the word that follows orders the entry before it. */
static int
held_claim(MappingObject *m, uint32_t *word)
{
    for (int i = 0; i < SHM_HELD_MAX; i++) {
        if (held_get(m, i) == 0) {
            held_put(m, i, held_entry(m, word, HELD_TRYING));
            m->held_thread[i] = shm_thread_serial();
            return i;
        }
    }
    PyErr_Format(PyExc_RuntimeError, "threads of this process hold or wait for %d shmkit "
                 "locks of one segment at once (one per thread and lock), the most it can; "
                 "release some, or wait from fewer threads", SHM_HELD_MAX);
    return -1;
}

static inline void
held_set(MappingObject *m, int i, uint32_t *word, unsigned state)
{
    held_put(m, i, held_entry(m, word, state));
}

static inline void
held_free(MappingObject *m, int i)
{
    held_put(m, i, 0);
}

/* Does a thread of ours other than entry `self` hold, take or release word? */
static int
held_by_other_thread(MappingObject *m, uint32_t *word, int self)
{
    uint64_t off = (uint64_t)((char *)word - m->base);
    for (int i = 0; i < SHM_HELD_MAX; i++) {
        uint64_t e = held_get(m, i);
        if (i != self && e != 0 && HELD_OFF(e) == off && HELD_STATE(e) != HELD_WAITING &&
            HELD_STATE(e) != HELD_DAMAGED)
            return 1;
    }
    return 0;
}

int
shm_lock_mine(MappingObject *m, uint32_t *word)
{
    if (m->token == 0 || (__atomic_load_n(word, __ATOMIC_RELAXED) & SHM_TOKEN_MASK) != m->token)
        return 0;
    uint64_t e = held_entry(m, word, HELD_HOLDS);
    unsigned long me = shm_thread_serial();
    for (int i = 0; i < SHM_HELD_MAX; i++)
        if (held_get(m, i) == e && m->held_thread[i] == me)
            return 1;
    return 0;
}

/* Is o the file of m?  Both are live (fd >= 0); fstat of an fd is cheap
 * and asked only for a mapping already found holding a word with our
 * thread, m's word's token and offset. */
static int
same_file(MappingObject *m, MappingObject *o)
{
    struct stat a, b;
    return m->fd >= 0 && o->fd >= 0 && fstat(m->fd, &a) == 0 && fstat(o->fd, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

int
shm_lock_mine_elsewhere(MappingObject *m, uint32_t *word)
{
    uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED) & SHM_TOKEN_MASK;
    if (v == 0 || v == m->token)
        return 0;
    /* The holder's entry names the word by its offset, the same in every
     * mapping of the file; the token alone would match many files' slots. */
    uint64_t e = ((uint64_t)((char *)word - m->base) << 3) | HELD_HOLDS;
    unsigned long me = shm_thread_serial();
    for (MappingObject *o = shm_mappings_live(); o != NULL; o = o->live_next) {
        if (o == m || o->token != v || o->token_pid != getpid())
            continue; /* (a token a forked child never claimed is its parent's) */
        for (int i = 0; i < SHM_HELD_MAX; i++)
            if (held_get(o, i) == e && o->held_thread[i] == me && same_file(m, o))
                return 1;
    }
    return 0;
}

int
shm_lock_held_count(MappingObject *m)
{
    int n = 0;
    for (int i = 0; i < SHM_HELD_MAX; i++)
        n += HELD_STATE(held_get(m, i)) == HELD_HOLDS;
    return n;
}

void
shm_lock_forget_all(MappingObject *m)
{
    for (int i = 0; i < SHM_HELD_MAX; i++)
        held_put(m, i, 0);
    m->held_damaged = 0;
}

/* The index of an entry equal to e, or -1. */
static int
held_find(MappingObject *m, uint64_t e)
{
    for (int i = 0; i < SHM_HELD_MAX; i++)
        if (held_get(m, i) == e)
            return i;
    return -1;
}

/* Change an entry from `from` to `to`: its index, or -1 if none was.  (Two
 * racing releases of one word cannot both find it: the GIL orders them.) */
static int
held_swap(MappingObject *m, uint64_t from, uint64_t to)
{
    for (int i = 0; i < SHM_HELD_MAX; i++) {
        if (held_get(m, i) == from) {
            held_put(m, i, to);
            return i;
        }
    }
    return -1;
}

/* Free the DAMAGED entry of word, if there is one: 1 if there was. */
static int
held_undamage(MappingObject *m, uint32_t *word)
{
    if (held_swap(m, held_entry(m, word, HELD_DAMAGED), 0) < 0)
        return 0;
    m->held_damaged--;
    return 1;
}

/* The word is ours again: a damage reported on it before is over. */
static inline void
held_taken(MappingObject *m, int i, uint32_t *word)
{
    held_set(m, i, word, HELD_HOLDS);
    if (m->held_damaged != 0)
        held_undamage(m, word);
}

static int
no_token(MappingObject *m)
{
    shm_state *st = shm_state_of((PyObject *)m);
    if (m->base != NULL && m->readonly)
        PyErr_SetString(st->ReadOnlyError, "the segment was opened readonly=True; "
                        "open it without readonly to take its locks");
    else
        PyErr_SetString(st->ClosedError,
                        "the segment is closed; open it again to use its locks");
    return -1;
}

int
shm_lock_try(MappingObject *m, uint32_t *word)
{
    const uint32_t me = m->token;
    if (me == 0)
        return no_token(m);
    if (__atomic_load_n(word, __ATOMIC_RELAXED) != 0)
        return 0;
    int i = held_claim(m, word);
    if (i < 0)
        return -1;
    if (cas(word, 0, me)) {
        shm_crash_point("lock.acquire.taken");
        held_taken(m, i, word);
        return 1;
    }
    held_free(m, i);
    return 0;
}

static int acquire_slow(MappingObject *m, uint32_t *word, int64_t deadline, int self);

int
shm_lock_acquire(MappingObject *m, uint32_t *word, int64_t deadline)
{
    const uint32_t me = m->token;
    if (me == 0)
        return no_token(m);
    int i = held_claim(m, word);
    if (i < 0)
        return -1;
    int r;
    if (cas(word, 0, me)) {
        shm_crash_point("lock.acquire.taken");
        r = 1;
    } else {
        r = acquire_slow(m, word, deadline, i);
    }
    if (r > 0)
        held_taken(m, i, word);
    else
        held_free(m, i);
    return r;
}

/* CAS the word from v to desired with our entry marked TRYING meanwhile. */
static int
try_cas(MappingObject *m, uint32_t *word, int self, uint32_t v, uint32_t desired)
{
    held_set(m, self, word, HELD_TRYING);
    if (cas(word, v, desired)) {
        shm_crash_point(v == 0 ? "lock.acquire.taken_waiting" : "lock.acquire.taken_over");
        return 1;
    }
    held_set(m, self, word, HELD_WAITING);
    return 0;
}

/* The slow path waits through wait.c.  ready() takes the word when it is
 * free (keeping the waiters bit once we are counted as a sleeper), or takes
 * it over when it carries our own token and no other thread of ours holds
 * it (damage); check(), after a slice without news and before a timeout,
 * takes it over from a dead holder. */
typedef struct {
    MappingObject *m;
    uint32_t *word;
    uint32_t me;
    int self;   /* our registry entry */
    int armed;  /* counted as a sleeper: set the waiters bit */
    int got;    /* 1 acquired, 2 taken over */
} lock_wait;

static int
lock_ready(void *ctx, uint32_t *sleep_on)
{
    lock_wait *c = ctx;
    if (c->got)
        return 1;
    uint32_t v = __atomic_load_n(c->word, __ATOMIC_RELAXED);
    uint32_t bit = c->armed ? SHM_LOCK_WAITERS : 0;
    if (v == 0) {
        /* Others may still sleep: an armed waiter keeps the waiters bit. */
        if (try_cas(c->m, c->word, c->self, 0, c->me | bit)) {
            c->got = 1;
            return 1;
        }
        *sleep_on = __atomic_load_n(c->word, __ATOMIC_RELAXED);
        return 0;
    }
    if ((v & SHM_TOKEN_MASK) == c->me && !held_by_other_thread(c->m, c->word, c->self)) {
        /* Our token, but no thread of ours holds or takes it: damage.
         * Waiting would be forever, so take it over and report it like a
         * dead holder. */
        if (try_cas(c->m, c->word, c->self, v, c->me | SHM_LOCK_WAITERS)) {
            c->got = 2;
            return 1;
        }
        *sleep_on = __atomic_load_n(c->word, __ATOMIC_RELAXED);
        return 0;
    }
    *sleep_on = bit ? shm_lock_mark_waiters(c->word, v) : v;
    return 0;
}

static void
lock_arm(void *ctx)
{
    lock_wait *c = ctx;
    c->armed = 1;
    held_set(c->m, c->self, c->word, HELD_WAITING);
}

static void
lock_disarm(void *ctx)
{
    ((lock_wait *)ctx)->armed = 0;
}

/* A dead holder's lock is free, whatever the timeout: take it over. */
static int
lock_check(void *ctx)
{
    lock_wait *c = ctx;
    uint32_t v = __atomic_load_n(c->word, __ATOMIC_RELAXED);
    if (c->got || v == 0 || (v & SHM_TOKEN_MASK) == c->me)
        return 0;
    if (!shm_token_alive(c->m, v & SHM_TOKEN_MASK) &&
        try_cas(c->m, c->word, c->self, v, c->me | SHM_LOCK_WAITERS))
        c->got = 2;
    return 0;
}

static int
acquire_slow(MappingObject *m, uint32_t *word, int64_t deadline, int self)
{
    lock_wait c = {m, word, m->token, self, 0, 0};
    shm_wait w = {.m = m, .word = word, .ctx = &c, .ready = lock_ready,
                  .arm = lock_arm, .disarm = lock_disarm, .check = lock_check,
                  .spin_ns = SPIN_NS, .what = "the segment"};
    int r = shm_wait_until(&w, deadline);
    return r == 1 ? c.got : r;
}

static int
overwritten(MappingObject *m, uint32_t v)
{
    PyErr_Format(shm_state_of((PyObject *)m)->CorruptError,
                 "the lock this process held was overwritten (lock word 0x%x, expected "
                 "this process's token 0x%x): the segment is damaged; check its data "
                 "(shmkit info) or recreate it", (unsigned)v, (unsigned)m->token);
    return -1;
}

int
shm_lock_check_held(MappingObject *m, uint32_t *word)
{
    uint32_t v = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    if (m->token == 0) /* closed (still mapped while views live) or read-only */
        return no_token(m);
    if ((v & SHM_TOKEN_MASK) == m->token)
        return 1;
    if (held_find(m, held_entry(m, word, HELD_HOLDS)) >= 0 ||
        held_find(m, held_entry(m, word, HELD_DAMAGED)) >= 0)
        return overwritten(m, v);
    return 0;
}

/* Let go of word while it carries `token` (not 0), which no other
 * attachment can have been given since. */
static void
release_token(uint32_t *word, uint32_t token)
{
    uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
    while (token != 0 && (v & SHM_TOKEN_MASK) == token) {
        if (__atomic_compare_exchange_n(word, &v, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
            if (v & SHM_LOCK_WAITERS)
                shm_futex_wake(word, 1);
            return;
        }
    }
}

int
shm_lock_release(MappingObject *m, uint32_t *word)
{
    uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
    if (m->token == 0) { /* closed (still mapped while views live) or read-only */
        /* A lock a call took before another thread closed the handle: the
         * close took the registry with it, so it goes by the token it was
         * taken under, and the next holder does not take it for a dead
         * one's; the caller still learns that the handle is closed. */
        release_token(word, m->closed_token);
        return no_token(m);
    }
    if ((v & SHM_TOKEN_MASK) != m->token) {
        /* This process took the word and someone else's store replaced it:
         * the segment is damaged, not the caller's bookkeeping. */
        if (held_swap(m, held_entry(m, word, HELD_HOLDS),
                      held_entry(m, word, HELD_DAMAGED)) >= 0) {
            m->held_damaged++;
            return overwritten(m, v);
        }
        if (held_undamage(m, word))
            return overwritten(m, v); /* the release after the one that reported it */
        PyErr_SetString(PyExc_RuntimeError,
                        "release of a shmkit lock that this process does not hold");
        return -1;
    }
    /* Mark our entry RELEASING (another thread may take the word as soon as
     * it is free and list it as HOLDS: ours must not be mistaken for it). */
    int mine = held_swap(m, held_entry(m, word, HELD_HOLDS),
                         held_entry(m, word, HELD_RELEASING));
    shm_crash_point("lock.release.marked");
    v = __atomic_exchange_n(word, 0, __ATOMIC_RELEASE);
    shm_crash_point("lock.release.cleared");
    if (v & SHM_LOCK_WAITERS)
        shm_futex_wake(word, 1);
    if (mine >= 0)
        held_free(m, mine);
    return 0;
}

int
shm_lock_acquire_repair(MappingObject *m, uint32_t *word, int64_t deadline,
                        shm_journal *jn, shm_repair_fn repair, void *ctx)
{
    int r = shm_lock_acquire(m, word, deadline);
    if (r <= 0)
        return r;
    int died = r == 2;
    if (died || (jn != NULL && shm_journal_pending(jn) != 0)) {
        if ((jn != NULL && shm_journal_rollback(jn) < 0) ||
            (repair != NULL && repair(ctx, died) < 0)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (shm_lock_release(m, word) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
            return -1;
        }
    }
    return r;
}

void
shm_lock_release_journal(MappingObject *m, uint32_t *word, shm_journal *jn)
{
    /* Set aside the exception of a failing call, if any (fetching and
     * restoring nothing costs a tenth of a small message's trip). */
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    int pending = PyErr_Occurred() != NULL;
    if (pending)
        PyErr_Fetch(&type, &value, &tb);
    if (jn != NULL && shm_journal_pending(jn) != 0 && shm_journal_rollback(jn) < 0)
        PyErr_Clear();
    if (shm_lock_release(m, word) < 0)
        PyErr_Clear();
    if (pending)
        PyErr_Restore(type, value, tb);
}

int
shm_warn_owner_died(MappingObject *m, const char *what)
{
    return PyErr_WarnFormat(shm_state_of((PyObject *)m)->OwnerDiedWarning, 2,
                            "%s: its previous holder died while holding it; "
                            "the lock was recovered, check the data it guards",
                            what);
}

typedef struct {
    SHM_SYNC_HANDLE_HEAD
    int recovered;
} LockObject;

static int
lock_init(LockObject *self, PyObject *args, PyObject *kwds)
{
    if (shm_sync_handle_init((shm_sync_handle *)self, args, kwds, "shmkit lock", 0, NULL,
                             NULL) < 0)
        return -1;
    self->recovered = 0;
    return 0;
}

static int
do_acquire(LockObject *self, int64_t deadline)
{
    uint32_t *word = shm_addr(self->mapping, self->offset, 4, 1);
    if (word == NULL)
        return -1;
    int r = shm_lock_acquire((MappingObject *)self->mapping, word, deadline);
    if (r == 2) {
        self->recovered = 1;
        if (shm_warn_owner_died((MappingObject *)self->mapping, self->what_s) < 0) {
            shm_lock_release((MappingObject *)self->mapping, word);
            return -1;
        }
        return 1;
    }
    if (r == 1)
        self->recovered = 0;
    return r;
}

/* The lock word when the handle's mapping is open, writable and holds it
 * (the offset was checked aligned when the handle was made); else NULL, and
 * the caller takes the path that says what is wrong (shm_addr). */
static inline uint32_t *
word_fast(LockObject *self)
{
    MappingObject *m = (MappingObject *)self->mapping;
    if (m == NULL || m->base == NULL || m->readonly || self->offset < 0 ||
        self->offset > (long long)m->length - 4)
        return NULL;
    return (uint32_t *)(m->base + self->offset);
}

/* The uncontended acquire: one CAS, with no pinning and no argument parsing.
 * Anything unusual (closed, readonly, detached, held) takes the slow path,
 * which reports it properly. */
static inline int
try_fast(LockObject *self)
{
    MappingObject *m = (MappingObject *)self->mapping;
    uint32_t *word = word_fast(self);
    if (word == NULL || m->token == 0)
        return 0;
    int r = shm_lock_try(m, word);
    if (r > 0)
        self->recovered = 0;
    return r;
}

static int
slow_acquire(LockObject *self, int64_t deadline)
{
    if (self->mapping == NULL)
        return shm_check_mapping(NULL); /* never initialised: -1, TypeError */
    shm_pin(self->mapping);
    int r = do_acquire(self, deadline);
    shm_unpin(self->mapping);
    return r;
}

static PyObject *lock_release(PyObject *obj, PyObject *Py_UNUSED(ignored));

static PyObject *
lock_acquire(LockObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs == 0 && kwnames == NULL) {
        int r = shm_sync_acquired((PyObject *)self, try_fast(self), lock_release);
        if (r < 0)
            return NULL;
        if (r > 0)
            Py_RETURN_TRUE;
    }
    PyObject *blocking, *timeout;
    if (shm_sync_parse_acquire(args, nargs, kwnames, "acquire()", &blocking, &timeout) < 0)
        return NULL;
    int64_t deadline = shm_sync_deadline(blocking, timeout);
    if (deadline < 0)
        return NULL;
    int r = shm_sync_acquired((PyObject *)self, slow_acquire(self, deadline), lock_release);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *
lock_enter(PyObject *obj, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    LockObject *self = (LockObject *)obj;
    int r = try_fast(self);
    if (r < 0 || (r == 0 && slow_acquire(self, SHM_FOREVER) < 0))
        return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
lock_release(PyObject *obj, PyObject *Py_UNUSED(ignored))
{
    LockObject *self = (LockObject *)obj;
    uint32_t *word = word_fast(self);
    if (word == NULL && (word = shm_addr(self->mapping, self->offset, 4, 1)) == NULL)
        return NULL;
    if (shm_lock_release((MappingObject *)self->mapping, word) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lock_exit(PyObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return lock_release(self, NULL);
}

static const shm_special_def lock_specials[] = {
    {"__enter__", lock_enter, 0, "($self, /)", "Acquire the lock (as acquire())."},
    {"__exit__", lock_exit, -1, "($self, *exc_info)", "Release the lock."},
    {NULL},
};

static PyObject *
lock_locked(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    uint32_t *word = shm_addr(self->mapping, self->offset, 4, 0);
    if (word == NULL)
        return NULL;
    return PyBool_FromLong(__atomic_load_n(word, __ATOMIC_ACQUIRE) != 0);
}

static PyObject *
lock_get_owner(LockObject *self, void *Py_UNUSED(c))
{
    uint32_t *word = shm_addr(self->mapping, self->offset, 4, 0);
    if (word == NULL)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(word, __ATOMIC_ACQUIRE) &
                                   SHM_TOKEN_MASK);
}

static PyObject *
lock_get_waiters(LockObject *self, void *Py_UNUSED(c))
{
    uint32_t *word = shm_addr(self->mapping, self->offset, 4, 0);
    if (word == NULL)
        return NULL;
    return PyBool_FromLong((__atomic_load_n(word, __ATOMIC_ACQUIRE) &
                            SHM_LOCK_WAITERS) != 0);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, blocking=True, timeout=None)\n--\n\n"
     "acquire(blocking=True, timeout=None) -> bool\n\n"
     "Take the lock; False if the timeout passed first.  If its holder died,\n"
     "the lock is taken over, OwnerDiedWarning is issued and .recovered is True."},
    {"release", lock_release, METH_NOARGS, "release($self, /)\n--\n\n"},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "locked($self, /)\n--\n\n"
     "locked() -> bool"},
    {NULL}
};

static PyMemberDef lock_members[] = {
    {"recovered", T_BOOL, offsetof(LockObject, recovered), READONLY,
     "True when the current holding was taken over from a dead holder"},
    {"offset", T_LONGLONG, offsetof(LockObject, offset), READONLY, NULL},
    {"mapping", T_OBJECT, offsetof(LockObject, mapping), READONLY, NULL},
    {NULL}
};

static PyGetSetDef lock_getset[] = {
    {"owner_token", (getter)lock_get_owner, NULL, "token of the holder, 0 if free", NULL},
    {"has_waiters", (getter)lock_get_waiters, NULL, "True if a waiter may be asleep", NULL},
    {NULL}
};

static PyType_Slot lock_spec_slots[] = {
    {Py_tp_dealloc, shm_sync_handle_dealloc},
    {Py_tp_doc, "Lock(mapping, offset, what='shmkit lock')\n--\n\n"
                "The crash-robust mutex on the u32 at offset."},
    {Py_tp_methods, lock_methods},
    {Py_tp_members, lock_members},
    {Py_tp_getset, lock_getset},
    {Py_tp_init, lock_init},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec lock_spec = {
    .name = "shmkit._core.Lock",
    .basicsize = sizeof(LockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = lock_spec_slots,
};

int
shm_init_lock(PyObject *module)
{
    shm_state *st = shm_mod_state(module);
    if (shm_add_type(module, &lock_spec, &st->Lock) < 0)
        return -1;
    return shm_add_specials(module, st->Lock, lock_specials);
}
