/* attach.c - attachments: claiming a slot of a segment's attach table,
 * releasing it, decoding its entries, and kernel-backed liveness.
 *
 * An attachment owns slot i of a segment's attach table by holding an OFD
 * write lock on byte SHM_SLOT_LOCK_BASE+i of the segment's file.  The kernel
 * releases OFD locks when the last descriptor of the open file goes away,
 * which includes the process being killed, so "is the lock held by someone
 * else" is a death test that a reused PID cannot fool.  Claiming bumps the
 * entry's generation (never to 0), so a token (slot | generation << 10)
 * names one attachment; then the entry's pid, attach time and comm are
 * written (see struct shm_attach_entry in layout.h) and the table's
 * high-water mark raised.  The token and the file descriptor a Mapping
 * uses for liveness are set here only: Python cannot write them.
 *
 *   attach_claim(mapping, fd, start, comm) -> token (0: every slot busy,
 *                                             -1: the slot count is damaged,
 *                                             -2: the file was cut short)
 *   attach_reader(mapping, fd) -> bool | -1   readonly: shared lock on byte 1
 *   attach_detach(mapping)                    forget token and fd
 *   attach_entry(mapping, slot) -> dict       decoded entry with "alive"
 *   attachments(mapping) -> [dict]            live entries
 *   attach_table(fd, hwm) -> [dict]           live entries, read from the file
 *   attach_file_entry(fd, slot) -> dict       one entry, read from the file
 *   token_owner_pid(mapping, token, alive=True) -> int | None
 *   holder_phrase(mapping, word) -> str      a lock's holder, for a Timeout
 *   slot_counts(mapping, table) -> [(slot, off, word, count, alive)]
 *   token_alive(mapping, token) -> bool
 *   ofd_lock / ofd_unlock / ofd_held          the raw byte-range locks
 * and for mapping.detach (mapping.c), shm_attach_end: the "attached"
 * lifetime's end (and a creation given up), our own lock dropped and the
 * name removed if we were last.
 */
#include "shmkit.h"
#include "layout.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define READER_BYTE 1

/* A lock request of `type` on bytes [start, start + len) of the file. */
static struct flock
ofd_range(short type, off_t start, off_t len)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    return fl;
}

/* Does another open file hold a lock on the range?  1 yes, 0 no, -1 errno set. */
static int
ofd_held(int fd, off_t start, off_t len)
{
    struct flock fl = ofd_range(F_WRLCK, start, len);
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -1;
    return fl.l_type != F_UNLCK;
}

int
shm_ofd_setlk(int fd, off_t start, off_t len, short type)
{
    struct flock fl = ofd_range(type, start, len);
    if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
        return errno == EAGAIN || errno == EACCES ? 0 : -1;
    return 1;
}

/* The entry of slot, or NULL when the mapping is closed or the slot or the
 * table lies outside it.  Bounds in unsigned arithmetic, from trusted
 * fields only. */
struct shm_attach_entry *
shm_attach_entry_at(MappingObject *m, uint32_t slot)
{
    if (m->base == NULL || slot >= m->max_slots || m->table_off < 0)
        return NULL;
    uint64_t off = (uint64_t)m->table_off + (uint64_t)slot * SHM_SLOT_SIZE;
    if ((uint64_t)m->length < SHM_SLOT_SIZE || off > (uint64_t)m->length - SHM_SLOT_SIZE)
        return NULL;
    return (struct shm_attach_entry *)(m->base + off);
}

int
shm_token_alive(MappingObject *m, uint32_t token)
{
    uint32_t slot = SHM_TOKEN_SLOT(token);
    if (token == m->token)
        return 1; /* another thread of ours: we are alive */
    if (slot >= m->max_slots)
        return 0; /* a token no attachment can have: treat as dead */
    if (m->fd < 0)
        return 1; /* detached: we cannot tell, and never steal a live lock */
    struct shm_attach_entry *e = shm_attach_entry_at(m, slot);
    if (e == NULL)
        return 0;
    uint32_t gen = __atomic_load_n(&e->gen, __ATOMIC_ACQUIRE);
    if ((gen & 0xFFFFFu) != SHM_TOKEN_GEN(token))
        return 0; /* the slot has been taken over since */
    int held = ofd_held(m->fd, SHM_SLOT_LOCK_BASE + slot, 1);
    return held != 0; /* on error, assume alive: never steal a live lock */
}

static MappingObject *
arg_mapping(PyObject *obj)
{
    if (shm_check_mapping(obj) < 0)
        return NULL;
    MappingObject *m = (MappingObject *)obj;
    if (m->base == NULL) {
        PyErr_SetString(shm_state_of(obj)->ClosedError, "the segment is closed in this process");
        return NULL;
    }
    return m;
}

static uint32_t
hwm_of(MappingObject *m)
{
    if ((uint64_t)m->length < sizeof(struct shm_segment_hdr))
        return 0;
    uint32_t h = __atomic_load_n(&((struct shm_segment_hdr *)m->base)->hwm, __ATOMIC_ACQUIRE);
    return h < m->max_slots ? h : m->max_slots;
}

static PyObject *
entry_dict(uint32_t slot, const struct shm_attach_entry *e, int alive)
{
    char comm[17];
    memcpy(comm, e->comm, 16);
    comm[16] = 0;
    return Py_BuildValue("{s:I,s:I,s:I,s:d,s:N,s:O}", "slot", slot,
                         "gen", __atomic_load_n(&e->gen, __ATOMIC_RELAXED) & 0xFFFFFu,
                         "pid", __atomic_load_n(&e->pid, __ATOMIC_RELAXED),
                         "attached",
                         (double)__atomic_load_n(&e->attached, __ATOMIC_RELAXED) / 1e9,
                         "comm", PyUnicode_DecodeUTF8(comm, (Py_ssize_t)strlen(comm), "replace"),
                         "alive", alive ? Py_True : Py_False);
}

/* Append item (a new reference, or NULL after an error) to the list *out;
 * on failure *out is cleared. */
static void
append_new(PyObject **out, PyObject *item)
{
    if (item == NULL || PyList_Append(*out, item) < 0)
        Py_CLEAR(*out);
    Py_XDECREF(item);
}

/* Read n entries from slot `first` on of the segment's file (the GIL is
 * released meanwhile): bytes read, or -1 with OSError. */
static ssize_t
read_entries(int fd, uint32_t first, uint32_t n, void *buf)
{
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    got = pread(fd, buf, (size_t)n * SHM_SLOT_SIZE,
                SHM_HEADER_BYTES + (off_t)first * SHM_SLOT_SIZE);
    Py_END_ALLOW_THREADS
    if (got < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    return got;
}

/* Is the owner of slot (whatever its generation) alive? */
static int
slot_alive(MappingObject *m, uint32_t slot)
{
    if (m->token != 0 && SHM_TOKEN_SLOT(m->token) == slot)
        return 1;
    if (m->fd < 0)
        return 0;
    return ofd_held(m->fd, SHM_SLOT_LOCK_BASE + slot, 1) > 0;
}

/* Does a live process hold an attach slot at or above the header's
 * max_slots?  Then the count was damaged (lowered to one that keeps the
 * header's size, which the header check cannot see), and this attachment
 * would take those holders for dead and their locks for free.  Asked once
 * our own slot (or reader byte) is held: nobody can then hold every slot
 * byte at once (a last closer, `shmkit gc`), so a byte held is a holder.
 * 1 damaged, 0 not, -1 errno set. */
static int
slot_count_damaged(int fd, uint32_t max_slots)
{
    if (max_slots >= SHM_MAX_SLOTS)
        return 0;
    return ofd_held(fd, SHM_SLOT_LOCK_BASE + max_slots, SHM_MAX_SLOTS - max_slots);
}

void
shm_attach_detach(MappingObject *m)
{
    /* (a forked child's inherited token is its parent's, never its own) */
    m->closed_token = m->token_pid == getpid() ? m->token : 0;
    m->token = 0;
    m->fd = -1;
    shm_lock_forget_all(m);
}

/* With the lock on `byte` just taken through fd: 1 when the header's slot
 * count holds; else the lock is dropped again and 2 (a live holder above
 * max_slots: the count was damaged) or -1 with OSError. */
static int
check_slot_count(int fd, uint32_t max_slots, off_t byte)
{
    int damaged = slot_count_damaged(fd, max_slots);
    if (damaged == 0)
        return 1;
    int saved = errno;
    shm_ofd_setlk(fd, byte, 1, F_UNLCK);
    if (damaged > 0)
        return 2;
    errno = saved;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

int
shm_attach_claim(MappingObject *m, int fd, uint32_t start, const char *comm, size_t comm_len)
{
    if (m->token != 0) {
        PyErr_SetString(PyExc_RuntimeError, "this mapping is attached already");
        return -1;
    }
    if (m->base == NULL || m->readonly || fd < 0 || m->max_slots == 0) {
        PyErr_SetString(PyExc_ValueError, "attach_claim needs a writable mapping, its "
                        "file descriptor and the attach table's size");
        return -1;
    }
    /* Read before writing: a read fault maps the pages around it as well
     * (the kernel's fault-around: the header, the attach table and the
     * payload's first pages), writable on a shared mapping; a write fault
     * maps only its own page, and the next touch faults again. */
    uint32_t *hwm = &((struct shm_segment_hdr *)m->base)->hwm;
    (void)__atomic_load_n(hwm, __ATOMIC_RELAXED);
    uint32_t n = m->max_slots;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t slot = (start % n + k) % n;
        struct shm_attach_entry *e = shm_attach_entry_at(m, slot);
        if (e == NULL) {
            PyErr_Format(shm_state_of((PyObject *)m)->CorruptError,
                         "attach slot %u lies outside the segment's %zd bytes", slot,
                         m->length);
            return -1;
        }
        int got = shm_ofd_setlk(fd, SHM_SLOT_LOCK_BASE + slot, 1, F_WRLCK);
        if (got < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (got == 0)
            continue;
        int count = check_slot_count(fd, n, SHM_SLOT_LOCK_BASE + slot);
        if (count != 1)
            return count;
        uint32_t gen = (__atomic_add_fetch(&e->gen, 1, __ATOMIC_SEQ_CST)) & 0xFFFFFu;
        if (gen == 0) /* generation 0 would make token 0 possible */
            gen = (__atomic_add_fetch(&e->gen, 1, __ATOMIC_SEQ_CST)) & 0xFFFFFu;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        __atomic_store_n(&e->pid, (uint32_t)getpid(), __ATOMIC_RELAXED);
        __atomic_store_n(&e->attached,
                         (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec,
                         __ATOMIC_RELAXED);
        memset(e->comm, 0, sizeof e->comm);
        memcpy(e->comm, comm, comm_len < 16 ? comm_len : 16);
        uint32_t h = __atomic_load_n(hwm, __ATOMIC_ACQUIRE);
        while (h <= slot &&
               !__atomic_compare_exchange_n(hwm, &h, slot + 1, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_ACQUIRE))
            ;
        if (shm_sigbus_truncated(m->base)) {
            /* The file was cut short since its header was checked: these
             * writes faulted, and the SIGBUS guard took them on a private
             * zero page, so the entry is not in the file.  Not attached. */
            shm_ofd_setlk(fd, SHM_SLOT_LOCK_BASE + slot, 1, F_UNLCK);
            return 3;
        }
        shm_lock_forget_all(m);
        m->fd = fd;
        m->token = (gen << 10) | slot;
        m->token_pid = getpid();
        m->closed_token = 0;
        return 1;
    }
    return 0;
}

int
shm_attach_reader(MappingObject *m, int fd)
{
    if (m->base == NULL || fd < 0) {
        PyErr_SetString(PyExc_ValueError, "attach_reader needs a mapping and its file "
                        "descriptor");
        return -1;
    }
    int got = shm_ofd_setlk(fd, READER_BYTE, 1, F_RDLCK);
    if (got <= 0) {
        if (got < 0)
            PyErr_SetFromErrno(PyExc_OSError);
        return got;
    }
    int count = check_slot_count(fd, m->max_slots, READER_BYTE);
    if (count != 1)
        return count;
    shm_lock_forget_all(m);
    m->fd = fd;
    m->token = 0;
    return 1;
}

static PyObject *
py_attach_claim(PyObject *mod, PyObject *args)
{
    PyObject *obj;
    int fd;
    unsigned int start;
    const char *comm;
    Py_ssize_t comm_len;
    if (!PyArg_ParseTuple(args, "OiIy#", &obj, &fd, &start, &comm, &comm_len))
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    int got = shm_attach_claim(m, fd, start, comm, (size_t)comm_len);
    if (got < 0)
        return NULL;
    return PyLong_FromLong(got == 2 ? -1 : got == 3 ? -2 : got == 1 ? (long)m->token : 0);
}

static PyObject *
py_attach_reader(PyObject *mod, PyObject *args)
{
    PyObject *obj;
    int fd;
    if (!PyArg_ParseTuple(args, "Oi", &obj, &fd))
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    int got = shm_attach_reader(m, fd);
    if (got < 0)
        return NULL;
    return got == 2 ? PyLong_FromLong(-1) : PyBool_FromLong(got);
}

static PyObject *
py_attach_detach(PyObject *mod, PyObject *obj)
{
    if (shm_check_mapping(obj) < 0)
        return NULL;
    shm_attach_detach((MappingObject *)obj);
    Py_RETURN_NONE;
}

static PyObject *
py_attach_entry(PyObject *mod, PyObject *args)
{
    PyObject *obj;
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "OI", &obj, &slot))
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    struct shm_attach_entry *e = shm_attach_entry_at(m, slot);
    if (e == NULL)
        Py_RETURN_NONE;
    return entry_dict(slot, e, slot_alive(m, slot));
}

static PyObject *
py_attachments(PyObject *mod, PyObject *obj)
{
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    uint32_t hwm = hwm_of(m);
    for (uint32_t slot = 0; out != NULL && slot < hwm; slot++) {
        struct shm_attach_entry *e = shm_attach_entry_at(m, slot);
        if (e != NULL && slot_alive(m, slot))
            append_new(&out, entry_dict(slot, e, 1));
    }
    return out;
}

static PyObject *
py_attach_table(PyObject *mod, PyObject *args)
{
    int fd;
    unsigned int hwm;
    if (!PyArg_ParseTuple(args, "iI", &fd, &hwm))
        return NULL;
    if (hwm > SHM_MAX_SLOTS)
        hwm = SHM_MAX_SLOTS;
    PyObject *out = PyList_New(0);
    if (out == NULL || hwm == 0)
        return out;
    int any = ofd_held(fd, SHM_SLOT_LOCK_BASE, hwm);
    if (any < 0) {
        Py_DECREF(out);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!any)
        return out;
    size_t bytes = (size_t)hwm * SHM_SLOT_SIZE;
    char *buf = PyMem_Malloc(bytes);
    if (buf == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    ssize_t got = read_entries(fd, 0, hwm, buf);
    if (got < 0) {
        PyMem_Free(buf);
        Py_DECREF(out);
        return NULL;
    }
    for (uint32_t slot = 0; out != NULL && (size_t)(slot + 1) * SHM_SLOT_SIZE <= (size_t)got;
         slot++) {
        if (ofd_held(fd, SHM_SLOT_LOCK_BASE + slot, 1) <= 0)
            continue;
        struct shm_attach_entry e;
        memcpy(&e, buf + (size_t)slot * SHM_SLOT_SIZE, sizeof e);
        append_new(&out, entry_dict(slot, &e, 1));
    }
    PyMem_Free(buf);
    return out;
}

static PyObject *
py_attach_file_entry(PyObject *mod, PyObject *args)
{
    int fd;
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "iI", &fd, &slot))
        return NULL;
    struct shm_attach_entry e;
    if (slot >= SHM_MAX_SLOTS)
        Py_RETURN_NONE;
    ssize_t got = read_entries(fd, slot, 1, &e);
    if (got < 0)
        return NULL;
    if ((size_t)got < sizeof e)
        Py_RETURN_NONE;
    int alive = ofd_held(fd, SHM_SLOT_LOCK_BASE + slot, 1);
    if (alive < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return entry_dict(slot, &e, alive);
}

/* Linux hands out pids below pid_max, at most PID_MAX_LIMIT: a larger one
 * read from an entry is damage, and printed it could read as a process
 * group, or as -1, to kill(1). */
#define SHM_PID_LIMIT 4194304u

static int
gen_matches(struct shm_attach_entry *e, uint32_t token)
{
    return (__atomic_load_n(&e->gen, __ATOMIC_ACQUIRE) & 0xFFFFFu) == SHM_TOKEN_GEN(token);
}

/* The entry a token names and its pid (checked as above), or NULL. */
static struct shm_attach_entry *
token_entry(MappingObject *m, uint32_t token, uint32_t *pid)
{
    struct shm_attach_entry *e = token ? shm_attach_entry_at(m, SHM_TOKEN_SLOT(token)) : NULL;
    if (e == NULL || !gen_matches(e, token))
        return NULL;
    *pid = __atomic_load_n(&e->pid, __ATOMIC_RELAXED);
    /* the slot may have passed to a new owner between the two loads */
    if (*pid == 0 || *pid >= SHM_PID_LIMIT || !gen_matches(e, token))
        return NULL;
    return e;
}

uint32_t
shm_token_pid(MappingObject *m, uint32_t token, int alive_only)
{
    uint32_t pid = 0;
    if (token_entry(m, token, &pid) == NULL || (alive_only && !shm_token_alive(m, token)))
        return 0;
    return pid;
}

/* The state letter of pid in /proc/<pid>/stat, if its command name is the
 * one its entry recorded (so that a pid reused by another program is never
 * described); 0 when unknown.  The name lies between the first '(' and the
 * last ')', and may hold any character. */
static char
pid_state(uint32_t pid, const struct shm_attach_entry *e)
{
    char comm[sizeof e->comm + 1], path[64], buf[512];
    memcpy(comm, e->comm, sizeof e->comm); /* shared bytes: copied, then ended */
    comm[sizeof e->comm] = 0;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
    if (lp == NULL || rp == NULL || rp < lp || rp[1] != ' ' || comm[0] == 0)
        return 0;
    size_t len = (size_t)(rp - lp - 1);
    if (len != strlen(comm) || memcmp(lp + 1, comm, len) != 0)
        return 0;
    return rp[2];
}

const char *
shm_holder_phrase(MappingObject *m, uint32_t word, char *buf, size_t n)
{
    uint32_t token = word & SHM_TOKEN_MASK, pid = 0;
    long me = (long)getpid();
    struct shm_attach_entry *e = token_entry(m, token, &pid);
    if (token == 0)
        snprintf(buf, n, "no process now (it was released just as the wait ended)");
    else if (token == m->token)
        snprintf(buf, n, "this process (pid %ld), through this same handle: another of its "
                         "threads, or this thread itself (the lock is not reentrant)", me);
    else if (e == NULL)
        snprintf(buf, n, "another process");
    else if ((long)pid == me)
        snprintf(buf, n, "this process (pid %ld), through another handle", me);
    else if (!shm_token_alive(m, token))
        snprintf(buf, n, "pid %u, which has exited (the next to take the lock recovers it)",
                 pid);
    else {
        char state = pid_state(pid, e);
        if (state == 'T')
            snprintf(buf, n, "pid %u, which is stopped (SIGSTOP: `kill -CONT %u` resumes it)",
                     pid, pid);
        else if (state == 't')
            snprintf(buf, n, "pid %u, which is stopped in a debugger (continue it there)", pid);
        else
            snprintf(buf, n, "pid %u", pid);
    }
    return buf;
}

/* A Python int that must fit a lock word or a token (32 bits). */
static int
arg_u32(PyObject *o, uint32_t *out)
{
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (v > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "a lock word or token fits in 32 bits");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static PyObject *
py_token_owner_pid(PyObject *mod, PyObject *args)
{
    PyObject *obj, *tok;
    uint32_t token;
    int alive_only = 1;
    if (!PyArg_ParseTuple(args, "OO!|p", &obj, &PyLong_Type, &tok, &alive_only) ||
        arg_u32(tok, &token) < 0)
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    uint32_t pid = shm_token_pid(m, token, alive_only);
    if (pid == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(pid);
}

static PyObject *
py_holder_phrase(PyObject *mod, PyObject *args)
{
    PyObject *obj, *w;
    uint32_t word;
    if (!PyArg_ParseTuple(args, "OO!", &obj, &PyLong_Type, &w) || arg_u32(w, &word) < 0)
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    char buf[SHM_HOLDER_PHRASE];
    return PyUnicode_FromString(shm_holder_phrase(m, word, buf, sizeof buf));
}

static PyObject *
py_slot_counts(PyObject *mod, PyObject *args)
{
    PyObject *obj;
    long long table;
    if (!PyArg_ParseTuple(args, "OL", &obj, &table))
        return NULL;
    MappingObject *m = arg_mapping(obj);
    if (m == NULL)
        return NULL;
    uint32_t hwm = hwm_of(m);
    if (hwm && (shm_addr(obj, table, 8, 0) == NULL ||
                shm_addr(obj, table + 8ll * (hwm - 1), 8, 0) == NULL))
        return NULL;
    PyObject *out = PyList_New(0);
    for (uint32_t slot = 0; out != NULL && slot < hwm; slot++) {
        uint64_t off = (uint64_t)table + 8ull * slot;
        uint64_t v = __atomic_load_n((uint64_t *)(m->base + off), __ATOMIC_ACQUIRE);
        uint32_t count = (uint32_t)v;
        if (count == 0)
            continue;
        uint32_t token = ((uint32_t)(v >> 32) & 0xFFFFFu) << 10 | slot;
        append_new(&out, Py_BuildValue("(IKKIO)", slot, (unsigned long long)off,
                                       (unsigned long long)v, count,
                                       shm_token_alive(m, token) ? Py_True : Py_False));
    }
    return out;
}

static PyObject *
py_ofd_lock(PyObject *mod, PyObject *args)
{
    int fd, exclusive = 1;
    long long start, len;
    if (!PyArg_ParseTuple(args, "iLL|p", &fd, &start, &len, &exclusive))
        return NULL;
    int got = shm_ofd_setlk(fd, start, len, exclusive ? F_WRLCK : F_RDLCK);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(got);
}

static PyObject *
py_ofd_unlock(PyObject *mod, PyObject *args)
{
    int fd;
    long long start, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &start, &len))
        return NULL;
    if (shm_ofd_setlk(fd, start, len, F_UNLCK) <= 0) /* busy (EAGAIN) is an error here */
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
py_ofd_held(PyObject *mod, PyObject *args)
{
    PyObject *target;
    long long start, len;
    if (!PyArg_ParseTuple(args, "OLL", &target, &start, &len))
        return NULL;
    /* a handle's file through its mapping: never a number a close freed */
    MappingObject *m = shm_is_mapping(target) ? (MappingObject *)target : NULL;
    long fd = m != NULL ? shm_mapping_lend_fd(m) : PyLong_AsLong(target);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    int r = fd < 0 || fd > INT_MAX ? (errno = EBADF, -1) : ofd_held((int)fd, start, len);
    int err = errno;
    if (m != NULL)
        shm_mapping_return_fd(m);
    if (r < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(r);
}

/* The last process to close an "attached" object removes its name.  Holding
 * a write lock over the reader byte and every slot byte there can be (not
 * the header's count, which damage could lower) proves nobody else is
 * attached, and nobody can attach while it is held; the name is removed only
 * if it still names fd's file (m's, borrowed by the caller, which has dropped
 * its own slot's lock first), and m->name_removed notes it.  A read-only
 * handle cannot take a write lock: its name is opened for writing just for
 * this (if we may not, `shmkit gc` removes it later).  One call, so that an
 * interrupt cannot strand the descriptor opened for it.  The lock taken here
 * goes when the mapping closes its file.  The GIL is let go: the unlink and
 * the lock can wait on the file's inode lock (a fallocate growing the file,
 * in any process). */
static void
remove_if_last(MappingObject *m, int fd, const char *path)
{
    int removed = 0, reopen = m->readonly;
    Py_BEGIN_ALLOW_THREADS
    int lock_fd = reopen ? open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK) : fd;
    struct stat here, mine;
    if (lock_fd >= 0) {
        if (shm_ofd_setlk(lock_fd, READER_BYTE,
                      SHM_SLOT_LOCK_BASE + SHM_MAX_SLOTS - READER_BYTE, F_WRLCK) == 1 &&
            lstat(path, &here) == 0 && fstat(fd, &mine) == 0 &&
            here.st_ino == mine.st_ino && here.st_dev == mine.st_dev && unlink(path) == 0)
            removed = 1;
        if (lock_fd != fd)
            close(lock_fd);
    }
    Py_END_ALLOW_THREADS
    if (removed) /* kept where a Ctrl-C as this returns cannot lose it */
        m->name_removed = (int)getpid();
}

void
shm_attach_end(MappingObject *m, const char *path)
{
    /* Once: a close racing this one (another thread's, while the GIL is let
     * go below) finds it under way and only closes.  The file is borrowed,
     * so that close leaves it open until we are done with it. */
    if (m->lifetime_ended || m->owned_fd < 0)
        return;
    int fd = shm_mapping_lend_fd(m); /* (cannot fail: the file is owned) */
    m->lifetime_ended = 1;
    /* Our own lock first: the test below must see only the others'. */
    if (m->readonly)
        shm_ofd_setlk(fd, READER_BYTE, 1, F_UNLCK);
    else if (m->token != 0)
        shm_ofd_setlk(fd, SHM_SLOT_LOCK_BASE + SHM_TOKEN_SLOT(m->token), 1, F_UNLCK);
    remove_if_last(m, fd, path);
    shm_mapping_return_fd(m);
}

static PyObject *
py_token_alive(PyObject *mod, PyObject *args)
{
    PyObject *m;
    unsigned int token;
    if (!PyArg_ParseTuple(args, "O&I", shm_mapping_converter, &m, &token))
        return NULL;
    if (((MappingObject *)m)->base == NULL) {
        PyErr_SetString(shm_mod_state(mod)->ClosedError, "the segment is closed in this process");
        return NULL;
    }
    return PyBool_FromLong(shm_token_alive((MappingObject *)m, token));
}

PyMethodDef shm_attach_methods[] = {
    {"ofd_lock", py_ofd_lock, METH_VARARGS,
     "ofd_lock($module, fd, start, length, exclusive=True, /)\n--\n\n"
     "ofd_lock(fd, start, length, exclusive=True) -> bool\n\n"
     "Try to take an OFD byte-range lock without blocking."},
    {"ofd_unlock", py_ofd_unlock, METH_VARARGS, "ofd_unlock($module, fd, start, length, /)\n--\n\n"},
    {"ofd_held", py_ofd_held, METH_VARARGS,
     "ofd_held($module, fd_or_mapping, start, length, /)\n--\n\n"
     "ofd_held(fd_or_mapping, start, length) -> bool\n\n"
     "True if another open file holds a lock on any byte of the range."},
    {"token_alive", py_token_alive, METH_VARARGS,
     "token_alive($module, mapping, token, /)\n--\n\n"
     "token_alive(mapping, token) -> bool\n\nIs the attachment named by token alive?"},
    {"attach_claim", py_attach_claim, METH_VARARGS,
     "attach_claim($module, mapping, fd, start, comm, /)\n--\n\n"
     "attach_claim(mapping, fd, start, comm) -> int\n\nClaim a free attach slot "
     "(trying from start), fill its entry and attach the mapping; 0 if none is free, "
     "-1 (nothing claimed) if a live process holds a slot beyond the header's count, "
     "-2 (nothing claimed) if the file was cut short under the claim."},
    {"attach_reader", py_attach_reader, METH_VARARGS,
     "attach_reader($module, mapping, fd, /)\n--\n\n"
     "attach_reader(mapping, fd) -> bool | int\n\nAttach readonly: the shared lock on "
     "byte 1; False if a closer holds it, -1 (not attached) as for attach_claim."},
    {"attach_detach", py_attach_detach, METH_O,
     "attach_detach($module, mapping, /)\n--\n\n"
     "Forget the mapping's token and file descriptor."},
    {"attach_entry", py_attach_entry, METH_VARARGS,
     "attach_entry($module, mapping, slot, /)\n--\n\n"
     "attach_entry(mapping, slot) -> dict | None\n\nThe decoded entry of a slot."},
    {"attachments", py_attachments, METH_O,
     "attachments($module, mapping, /)\n--\n\n"
     "attachments(mapping) -> list[dict]\n\nThe live attachments."},
    {"attach_table", py_attach_table, METH_VARARGS,
     "attach_table($module, fd, hwm, /)\n--\n\n"
     "attach_table(fd, hwm) -> list[dict]\n\nLive attachments, read from the file."},
    {"attach_file_entry", py_attach_file_entry, METH_VARARGS,
     "attach_file_entry($module, fd, slot, /)\n--\n\n"
     "attach_file_entry(fd, slot) -> dict | None\n\nA slot's decoded entry, read "
     "from the file, \"alive\" if its slot lock is held."},
    {"token_owner_pid", py_token_owner_pid, METH_VARARGS,
     "token_owner_pid($module, mapping, token, alive=True, /)\n--\n\n"
     "token_owner_pid(mapping, token, alive=True) -> int | None"},
    {"holder_phrase", py_holder_phrase, METH_VARARGS,
     "holder_phrase($module, mapping, word, /)\n--\n\n"
     "Who holds the lock whose word (or owner token) this is, for a Timeout's\n"
     "message: 'pid N', 'pid N, which is stopped (...)' or 'another process'."},
    {"slot_counts", py_slot_counts, METH_VARARGS,
     "slot_counts($module, mapping, table, /)\n--\n\n"
     "slot_counts(mapping, table) -> list[tuple]\n\n(slot, offset, word, count, alive) "
     "of each non-zero gen << 32 | count word of a per-slot table."},
    {NULL}
};
