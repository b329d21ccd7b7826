/* shmkit.h - the compiled core's shared declarations.
 *
 * The core does only what Python cannot do correctly or fast enough:
 * reserve a mapping larger than the file, atomics on shared words, futex
 * waits that release the GIL and let signals through, and the crash-robust
 * lock whose hot path is one compare-and-swap.
 *
 * Shared memory holds plain integers only.  Every word the core touches is
 * addressed as (Mapping, byte offset); offsets are bounds- and
 * alignment-checked against the mapping's current safe length before use,
 * because everything in shared memory is untrusted.
 */
#ifndef SHMKIT_H
#define SHMKIT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>

#if PY_VERSION_HEX >= 0x030D0000
PyAPI_FUNC(int) _PyOS_IsMainThread(void); /* exported, no longer declared */
#endif

/* ---- attach table (see docs/architecture.md) ----------------------------
 * A process attached to a segment owns one slot of the segment's attach
 * table.  Ownership is an OFD byte-range lock on byte SHM_SLOT_LOCK_BASE+slot
 * of the segment's file: the kernel drops it when the process dies, which is
 * what makes liveness kernel-backed.  Each slot entry starts with a u32
 * generation, bumped by every new owner, so a token names one attachment. */
#define SHM_SLOT_SIZE 64
#define SHM_SLOT_LOCK_BASE 4096
#define SHM_INIT_LOCK_BYTE 0
#define SHM_MAX_SLOTS 1024
/* Locks of one segment that one process may hold (or wait for) at once. */
#define SHM_HELD_MAX 64

/* A lock-owner token: slot in the low 10 bits, generation in the next 20. */
#define SHM_TOKEN_SLOT(t) ((uint32_t)(t) & 0x3FFu)
#define SHM_TOKEN_GEN(t) (((uint32_t)(t) >> 10) & 0xFFFFFu)
#define SHM_TOKEN_MASK 0x3FFFFFFFu

/* A process's view of one segment: the reserved mapping plus who we are in
 * its attach table.  Python's segment module creates and owns it. */
typedef struct MappingObject {
    PyObject_HEAD
    char *base;          /* start of the reservation; NULL once unmapped */
    Py_ssize_t reserve;  /* bytes of address space reserved */
    Py_ssize_t length;   /* bytes safe to touch: never past the file's end */
    Py_ssize_t exports;  /* buffers handed out and not yet released */
    int readonly;
    int closing;         /* close() asked for while buffers were exported */
    int fd;              /* the segment's file; -1 when detached */
    uintptr_t anchor;    /* the 1 GiB boundary it was placed below (mapping.c), or 0 */
    int owned_fd;        /* closed with the mapping (mapping.c); -1 none */
    int name_removed;    /* the pid of the process whose close removed the name
                          * (attach.c; a forked child inherits it); 0 if none */
    unsigned long creator_thread; /* listed as this thread's creation in progress
                                   * (mapping.c); 0 when not listed */
    int creating_private; /* let go of in every forked child, even the creator's */
    struct MappingObject *creating_prev, *creating_next; /* the list (mapping.c) */
    int abandoned;       /* a forked child let go of it mid-creation */
    char *temp_name;     /* the hidden name its file was made under where the file
                          * system lacks O_TMPFILE (open.c): removed when the file
                          * is linked, or let go of; NULL otherwise */
    pid_t temp_pid;      /* the process that made it: a forked child never removes it */
    /* Uses of owned_fd in progress that let the GIL go (mapping.c, "lent"):
     * a close meanwhile leaves the file open, as fd_unclosed, until the
     * last ends; such mappings are listed for a forked child to close. */
    int fd_lent;
    pid_t fd_lent_pid;   /* the process whose threads borrowed it */
    int fd_unclosed;     /* -1 none */
    int lifetime_ended;  /* shm_attach_end ran, or runs (attach.c) */
    struct MappingObject *unclosed_prev, *unclosed_next;
    struct MappingObject *live_prev, *live_next; /* every live mapping (mapping.c) */
    uint32_t token;      /* our lock-owner token; 0 when detached */
    /* The token this process's close let go of (0 if none): a lock that a
     * call took under it before another thread closed the handle is let go
     * by it when that call releases (lock.c). */
    uint32_t closed_token;
    pid_t token_pid;     /* the process that claimed the token */
    Py_ssize_t table_off;/* byte offset of the attach table */
    uint32_t max_slots;
    int64_t event_spin_ns; /* the adaptive spin of event waits (event.c, wait.h) */
    /* The lock words this attachment holds or is taking (lock.c): one u64
     * per thread and lock, changed only with the GIL held.  A word that
     * carries our token without being listed here was not locked by us: it
     * is damage, and is taken over instead of waited on forever. */
    uint64_t held[SHM_HELD_MAX];
    unsigned long held_thread[SHM_HELD_MAX]; /* each entry's thread (shm_thread_serial) */
    int held_damaged;    /* entries of held[] in state DAMAGED (lock.c) */
    /* claim_word(): one 32-bit compare-and-swap made when the last
     * exported view is released (a Queue receiver hands a pooled payload
     * file back this way: channel.py, "payload pool").  Armed while
     * idle_armed. */
    Py_ssize_t idle_off;
    uint32_t idle_expected, idle_value;
    int idle_armed;
    unsigned long idle_forks; /* forks counted when armed: a fork since disarms */
} MappingObject;

/* ---- module state (module.c) -----------------------------------------------
 * The core is a multi-phase module (PEP 489): its exec slot imports the
 * exception classes from shmkit.errors and creates every type as a heap type
 * of the module (PEP 573), and keeps both here.  C code reaches them from
 * the object it works on (shm_state_of: the object's type names the module)
 * or, in a module function, from the module (shm_mod_state). */
#define SHM_SPECIAL_SPARE 16
typedef struct shm_state {
    /* shmkit.errors */
    PyObject *OwnerDiedWarning, *CorruptError, *Timeout, *ReadOnlyError, *ClosedError;
    PyObject *KeyExistsError, *UnsupportedTypeError, *ValueTooLargeError, *BusyError;
    PyObject *InvalidKeyError;
    PyObject *StaleHandleError, *PinnedError, *HeapFullError;
    PyObject *ChannelClosed, *MessageTooLarge, *Empty, *Full, *SendersGone;
    PyObject *MessagesLost, *SizeLimitError, *ShmkitError;
    /* the core's types */
    PyTypeObject *Mapping, *Lock, *RWLock, *Semaphore, *Ring, *RecordView, *Loan, *Table, *View,
        *HeapCore, *Pin, *Topic, *TopicSubscriber, *TopicView, *Special, *BoundSpecial,
        *TableBatch, *QueueCore, *Hold;
    /* special.c: bound __enter__/__exit__ objects kept for reuse (per
     * interpreter: objects must go back to the allocator that made them) */
    PyObject *special_spare[SHM_SPECIAL_SPARE];
    int special_nspare;
    /* gate.c: this interpreter's pairs of fork hooks registered (0-2), and
     * whether logging's hooks come before the newest */
    int gate_hooks, gate_after_logging;
} shm_state;

extern struct PyModuleDef shm_module;
/* The state of the module that made obj's type (or a base of it).  Never
 * NULL for objects of the core's types and their subclasses. */
shm_state *shm_state_of(PyObject *obj);
static inline shm_state *shm_mod_state(PyObject *module)
{
    return (shm_state *)PyModule_GetState(module);
}
/* Create a type of the module from spec (bases may be NULL), add it to the
 * module under its short name and keep it in *slot. */
int shm_add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **slot);
/* The last step of tp_dealloc for an instance of one of the core's (heap)
 * types: free it, then drop the reference to its type that it held. */
void shm_free_instance(PyObject *obj);
/* __enter__ and __exit__ that bind without allocating (special.c).  fn gets
 * the object and the call's positional arguments, at most max_args of them
 * (-1: any number; keywords are refused). */
typedef struct {
    const char *name;
    PyObject *(*fn)(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
    Py_ssize_t max_args;
    const char *text_signature; /* for inspect.signature: "($self, /)" */
    const char *doc;
} shm_special_def;
/* Make the descriptor and bound types (before any shm_add_specials). */
int shm_init_special(PyObject *module);
/* Put a descriptor for each of defs (ended by a NULL name) in tp's dict. */
int shm_add_specials(PyObject *module, PyTypeObject *tp, const shm_special_def *defs);
/* 1 if obj is a Mapping of the core (by its dealloc: no state needed). */
int shm_is_mapping(PyObject *obj);
/* 0 if obj is a Mapping, else -1 with TypeError. */
int shm_check_mapping(PyObject *obj);
/* PyArg "O&" converter: a Mapping, into a PyObject ** */
int shm_mapping_converter(PyObject *obj, void *out);
/* A writable C-contiguous buffer of o that raw bytes may be copied into:
 * 0, or -1 with TypeError naming call when o has none, or when its items are
 * Python objects (a numpy object array), whose references bytes would
 * overwrite. */
int shm_writable_bytes(PyObject *o, Py_buffer *b, const char *call);
/* A new Mapping of `reserve` bytes of fd, `length` of them safe (the caller
 * checked 0 <= length <= reserve, reserve > 0), or NULL with OSError.
 * hold_gil: map without releasing the GIL (mmap of a reservation does not
 * block), so that no fork of another thread falls between the mmap and
 * what the caller lists. */
MappingObject *shm_mapping_new(shm_state *st, int fd, Py_ssize_t reserve, Py_ssize_t length,
                               int readonly, int hold_gil);
/* List m as this thread's creation in progress until end_creation(), its
 * close or its dealloc: a child forked meanwhile by another thread (by any
 * thread, if private) lets go of it (forget_creations). */
void shm_creating_add(MappingObject *m, int private);
void shm_mapping_drop_temp(MappingObject *m); /* remove its hidden name, if ours */
/* The first of every live mapping of this process (then m->live_next). */
MappingObject *shm_mappings_live(void);
/* Borrow m's file for a call that lets the GIL go (GIL held): its
 * descriptor, kept open until shm_mapping_return_fd however the handle is
 * closed meanwhile; or -1 with ClosedError. */
int shm_mapping_lend_fd(MappingObject *m);
void shm_mapping_return_fd(MappingObject *m);
/* How many forks made this process a child so far (0 in the first process):
 * what a process-wide list of the parent's holdings is stamped with, so
 * that a child starts it empty. */
unsigned long shm_child_generation(void);
/* The calling thread's serial number: never 0, and never another thread's
 * of this process.  What owns a store's lock, a batch or a topic loan is a
 * thread; pthread_self() (PyThread_get_thread_ident) is given again to the
 * next thread as soon as one ends, which would then pass for the ended
 * thread and write inside its batch.  A forked child's thread keeps its
 * number, as it keeps its pthread_self(). */
extern __thread unsigned long shm_thread_serial_given
    __attribute__((tls_model("initial-exec")));
unsigned long shm_thread_serial_first(void);
/* (initial-exec: one load through %fs, where the default model for a module
 * loaded at run time calls __tls_get_addr on every use) */
static inline unsigned long
shm_thread_serial(void)
{
    unsigned long s = shm_thread_serial_given;
    return s != 0 ? s : shm_thread_serial_first();
}

/* Return a pointer to `size` bytes at `off`, or NULL with an exception set
 * when the mapping is closed, the range is out of bounds or misaligned. */
void *shm_addr(PyObject *mapping, long long off, Py_ssize_t size, int writable);

/* The same for a region of `size` bytes at `off` (8-aligned, any length):
 * CorruptError when it does not lie wholly inside the mapping. */
void *shm_span(PyObject *mapping, long long off, uint64_t size, int writable);

/* Hold the mapping across a blocking call: close() then defers the unmap, so
 * a thread asleep on a word never wakes up to an unmapped page.  Call both
 * with the GIL held. */
void shm_pin(PyObject *mapping);
void shm_unpin(PyObject *mapping);

/* One pause in a busy-wait loop: lets the other hyperthread run and saves power. */
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* ---- futex.c ------------------------------------------------------------
 * Deadlines are CLOCK_MONOTONIC nanoseconds; SHM_FOREVER waits forever. */
#define SHM_FOREVER INT64_MAX

/* Subtract n from a shared counter (a sleepers word), stopping at 0. */
static inline void
shm_sat_sub(uint32_t *w, uint32_t n)
{
    uint32_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    while (!__atomic_compare_exchange_n(w, &v, v > n ? v - n : 0, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE))
        ;
}
int64_t shm_now_ns(void);
int64_t shm_deadline(PyObject *timeout); /* None -> forever; -1 on error */
int shm_timeout_check(PyObject *timeout); /* shm_deadline's checks alone: 0, or -1 */
/* A lock's deadline: as shm_deadline, but -1 is threading's "no timeout". */
int64_t shm_lock_deadline(PyObject *timeout);
/* A relative timeout in ns, -1 for None or beyond 10**9 s (for ever); the
 * checks of shm_deadline, naming the parameter `what`: 0, or -1. */
int shm_timeout_ns(PyObject *timeout, const char *what, int64_t *ns);
/* A call whose flag (block, blocking) is false refuses a timeout other than
 * None or -1 rather than ignore it: 0, or -1 with ValueError set. */
int shm_nowait_timeout_check(PyObject *timeout, const char *call, const char *flag);
/* A timeout as an error message shows it (a float's repr, or repr): a new str, or NULL */
PyObject *shm_timeout_shown(PyObject *timeout);
/* Raise `type` (the module's Timeout) for a deadline that passed in this
 * call, marked as such (its `_deadline` is True): NULL.  shm_deadline_error:
 * is the exception set one so marked (a Timeout that a signal handler
 * raised during the wait is not)?  1 or 0, the exception kept. */
PyObject *shm_deadline_passed(PyObject *type, const char *fmt, ...);
int shm_deadline_error(PyObject *type);

/* Sleep while *word == expected, at most until min(deadline, now+slice_ns).
 * Call without the GIL.  Returns 0 when woken or the value changed,
 * ETIMEDOUT when the slice or deadline passed, EINTR on a signal. */
int shm_futex_wait(uint32_t *word, uint32_t expected, int64_t deadline, int64_t slice_ns);
int shm_futex_wake(uint32_t *word, int n);

/* Wait until *word != expected or the deadline passes, through wait.h's
 * policy (spin, sleep in slices, Ctrl-C, closed-meanwhile).  Returns 1 when
 * the value changed, 0 on timeout, -1 with an exception set. */
int shm_wait_change(MappingObject *m, uint32_t *word, uint32_t expected, int64_t deadline);

/* ---- error.c -------------------------------------------------------------
 * The protocols that call no Python API (table.c, heap.c) report a failure
 * as a code of their own enum and a message, recorded per thread; the
 * structure's Python type raises the matching exception from it. */
typedef struct {
    int code;
    char msg[400];
} shm_error;
extern __thread shm_error shm_err;
/* Record (code, message) for this thread; returns -1. */
int shm_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int shm_vfail(int code, const char *fmt, va_list va);

/* ---- attach.c ----------------------------------------------------------- */
/* Take (F_WRLCK, F_RDLCK) or drop (F_UNLCK) an OFD lock on [start, start+len)
 * without blocking: 1 done, 0 busy, -1 errno set. */
int shm_ofd_setlk(int fd, off_t start, off_t len, short type);
/* The "attached" lifetime's end for m's handle (GIL held; attach.c): drop
 * its own attach lock (the slot's, or a read-only handle's reader byte),
 * then remove the name at path if it still names m's file and no other open
 * file holds an attach lock (m->name_removed then set).  Once per mapping;
 * nothing when m owns no file. */
void shm_attach_end(MappingObject *m, const char *path);
/* The attach-table entry of slot (layout.h), or NULL when the mapping is
 * closed or the entry lies outside it. */
struct shm_attach_entry;
struct shm_attach_entry *shm_attach_entry_at(MappingObject *m, uint32_t slot);
/* 1 if the attachment named by token is alive, 0 if dead. */
int shm_token_alive(MappingObject *m, uint32_t token);
/* The pid of the attachment a lock-owner token names in m's table (0 when
 * none, or when alive_only and it is gone). */
uint32_t shm_token_pid(MappingObject *m, uint32_t token, int alive_only);
/* Names a lock's holder, from its lock word, for a Timeout message: "pid N",
 * "pid N, which is stopped (...)", "pid N, which has exited (...)", "this
 * process (...)", or "another process" when the word names no live entry.
 * A pid is printed only from an entry of the token's generation, at most
 * PID_MAX_LIMIT, and "stopped" only when /proc shows the entry's command
 * name.  Returns buf, of SHM_HOLDER_PHRASE bytes (the longest phrase fits). */
#define SHM_HOLDER_PHRASE 160
const char *shm_holder_phrase(MappingObject *m, uint32_t word, char *buf, size_t n);
/* Attach m (table_off and max_slots set) through fd: claim a free slot,
 * trying from start (attach_claim), or, for a readonly mapping, the shared
 * reader byte (attach_reader).  1 attached; 0 every slot busy (a closer
 * holds them); 2 not attached because a live process holds a slot beyond
 * max_slots (the header's count was damaged); 3 (attach_claim) not attached
 * because the file was cut short under the claim (its writes faulted onto
 * the SIGBUS guard's zero page); -1 with an exception. */
int shm_attach_claim(MappingObject *m, int fd, uint32_t start, const char *comm,
                     size_t comm_len);
int shm_attach_reader(MappingObject *m, int fd);
/* Forget m's attachment (token and fd); the caller drops the lock, by
 * closing the descriptor or unlocking. */
void shm_attach_detach(MappingObject *m);

/* ---- lock.c -------------------------------------------------------------
 * The robust mutex on one u32 word: 0 free, else owner token, bit 31 set
 * while someone may sleep on it.  Usable from other C files. */
#define SHM_LOCK_WAITERS 0x80000000u
/* Returns 1 acquired, 2 acquired after its owner died, 0 timeout, -1 error. */
int shm_lock_acquire(MappingObject *m, uint32_t *word, int64_t deadline);
/* The fast path alone: 1 acquired (the word was free), 0 not free (nothing
 * changed), -1 error.  Records the holding like shm_lock_acquire. */
int shm_lock_try(MappingObject *m, uint32_t *word);
/* Returns 0, or -1 with RuntimeError when we do not hold it, or with
 * CorruptError when we took it and another store replaced it (damage;
 * reported again by the next release of the word, so that a `with` block
 * around a call that released it does not blame the caller). */
int shm_lock_release(MappingObject *m, uint32_t *word);
/* Does this process hold word?  1 yes; 0 no (no exception set); -1 with
 * CorruptError when it took the word and another store replaced it, or
 * ClosedError/ReadOnlyError when the mapping has no token. */
int shm_lock_check_held(MappingObject *m, uint32_t *word);
/* Does the calling thread hold word through m (took it, and no thread has
 * released it since)?  1 or 0; never an exception.  GIL held. */
int shm_lock_mine(MappingObject *m, uint32_t *word);
/* Does the calling thread hold word through another mapping of this
 * process of the same file (another handle of the object)?  1 or 0; never
 * an exception.  GIL held.  A call that takes the lock on the caller's
 * behalf asks it before waiting, which would be for itself. */
int shm_lock_mine_elsewhere(MappingObject *m, uint32_t *word);
/* Holdings recorded for this mapping (a diagnostic: Mapping.held_count). */
int shm_lock_held_count(MappingObject *m);
/* Forget every recorded holding (a new attachment, after fork). */
void shm_lock_forget_all(MappingObject *m);
int shm_warn_owner_died(MappingObject *m, const char *what);

int shm_init_mapping(PyObject *module);
int shm_init_atomics(PyObject *module);
int shm_init_lock(PyObject *module);

/* ---- sigbus.c -------------------------------------------------------------
 * A SIGBUS from a page of one of our mappings past the end of a truncated
 * file maps a zero page there and sets the mapping's "truncated" flag
 * instead of killing the process.  Register right after mmap, unregister
 * right before munmap (GIL held). */
void shm_sigbus_register(void *base, Py_ssize_t reserve);
void shm_sigbus_unregister(void *base);
int shm_sigbus_truncated(void *base);  /* 1 once a page of base's range faulted */
int shm_init_sigbus(PyObject *module); /* adds Mapping.truncated */

#endif
