/* sigbus.c - survive a segment file truncated under our feet.
 *
 * Touching a page of a shared file mapping that lies past the end of the
 * file raises SIGBUS, which kills the process.  Any process allowed to write
 * the file can truncate it, so a careless or hostile neighbour could kill
 * every user of a segment.  This file keeps a small lock-free registry of
 * the address ranges reserved by our mappings ([base, base + reserve)) and a
 * SIGBUS handler that, for a fault inside one of them, maps an anonymous
 * zero page over the faulting page (MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)
 * so the faulting instruction completes, and raises the range's "truncated"
 * flag.  The segment layer checks the flag (Mapping.truncated) and raises
 * CorruptError: the data can no longer be trusted, but the process lives.
 *
 * Faults outside our ranges go to the handler that was installed before
 * ours (faulthandler, a debugger's) or, if there was none, to the default
 * action, exactly as if we were not there.
 *
 * Registry: SHM_SIGBUS_SLOTS entries written with the GIL held (one writer)
 * and read by the handler at any time (lock-free readers).  An entry is
 * published by storing `end` and `truncated` first and `base` last
 * (release); removed by storing base = 0 before the range is unmapped.
 *
 *   shm_sigbus_register(base, reserve)   from Mapping() after mmap
 *   shm_sigbus_unregister(base)          from the unmap, before munmap
 *   shm_sigbus_truncated(base) -> 0/1    the flag, for Mapping.truncated
 */
#include "shmkit.h"
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SHM_SIGBUS_SLOTS 65536

typedef struct {
    _Atomic(uintptr_t) base; /* 0: free */
    _Atomic(uintptr_t) end;
    atomic_int truncated;
} sigbus_range;

static sigbus_range ranges[SHM_SIGBUS_SLOTS];
static atomic_int ranges_hwm;          /* entries [0, hwm) may be in use */
static atomic_int any_truncated;       /* some range faulted: look them up */
static struct sigaction previous;      /* the handler we chain to */
static atomic_int have_previous;
static long page_size;

static void
sigbus_chain(int sig, siginfo_t *info, void *ctx)
{
    if (atomic_load(&have_previous) && (previous.sa_flags & SA_SIGINFO) &&
        previous.sa_sigaction != NULL) {
        previous.sa_sigaction(sig, info, ctx);
        return;
    }
    if (atomic_load(&have_previous) && previous.sa_handler != SIG_DFL &&
        previous.sa_handler != SIG_IGN && previous.sa_handler != NULL) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: die of SIGBUS when the instruction runs again. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
}

static void
sigbus_handler(int sig, siginfo_t *info, void *ctx)
{
    int saved = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;
    int n = atomic_load_explicit(&ranges_hwm, memory_order_acquire);
    if (info->si_code > 0) { /* raised by the kernel for a fault, not by kill() */
        for (int i = 0; i < n; i++) {
            uintptr_t base = atomic_load_explicit(&ranges[i].base, memory_order_acquire);
            if (base == 0 || addr < base ||
                addr >= atomic_load_explicit(&ranges[i].end, memory_order_relaxed))
                continue;
            uintptr_t page = addr & ~((uintptr_t)page_size - 1);
            void *p = mmap((void *)page, (size_t)page_size, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p != MAP_FAILED) {
                atomic_store(&ranges[i].truncated, 1);
                atomic_store(&any_truncated, 1);
                errno = saved;
                return; /* the instruction runs again, on zeros */
            }
            break;
        }
    }
    errno = saved;
    sigbus_chain(sig, info, ctx);
}

/* Install the handler if it is not the current one (someone, faulthandler
 * say, may have replaced it since); remember what it replaces. */
static void
sigbus_install(void)
{
    struct sigaction cur, ours;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == sigbus_handler)
        return;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = sigbus_handler;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    atomic_store(&have_previous, 0);
    previous = cur;
    atomic_store(&have_previous, 1);
    sigaction(SIGBUS, &ours, NULL);
}

void
shm_sigbus_register(void *base, Py_ssize_t reserve)
{
    if (base == NULL || reserve <= 0)
        return;
    if (page_size == 0)
        page_size = sysconf(_SC_PAGESIZE);
    sigbus_install();
    int n = atomic_load(&ranges_hwm);
    for (int i = 0; i < SHM_SIGBUS_SLOTS; i++) {
        if (atomic_load(&ranges[i].base) != 0)
            continue;
        atomic_store_explicit(&ranges[i].end, (uintptr_t)base + (uintptr_t)reserve,
                              memory_order_relaxed);
        atomic_store_explicit(&ranges[i].truncated, 0, memory_order_relaxed);
        atomic_store_explicit(&ranges[i].base, (uintptr_t)base, memory_order_release);
        if (i >= n)
            atomic_store_explicit(&ranges_hwm, i + 1, memory_order_release);
        return;
    }
    /* Registry full: this mapping is unprotected (a truncation kills us as
     * it would without the handler). */
}

void
shm_sigbus_unregister(void *base)
{
    int n = atomic_load(&ranges_hwm);
    for (int i = 0; i < n; i++) {
        if (atomic_load(&ranges[i].base) == (uintptr_t)base) {
            atomic_store_explicit(&ranges[i].base, 0, memory_order_release);
            break;
        }
    }
    while (n > 0 && atomic_load(&ranges[n - 1].base) == 0)
        n--;
    atomic_store(&ranges_hwm, n);
}

int
shm_sigbus_truncated(void *base)
{
    if (!atomic_load_explicit(&any_truncated, memory_order_relaxed))
        return 0; /* the common case costs one load */
    int n = atomic_load(&ranges_hwm);
    for (int i = 0; i < n; i++)
        if (atomic_load(&ranges[i].base) == (uintptr_t)base)
            return atomic_load(&ranges[i].truncated);
    return 0;
}

static PyObject *
mapping_get_truncated(PyObject *self, void *Py_UNUSED(c))
{
    MappingObject *m = (MappingObject *)self;
    return PyBool_FromLong(m->base != NULL && shm_sigbus_truncated(m->base));
}

static PyGetSetDef truncated_getset = {
    "truncated", mapping_get_truncated, NULL,
    "True once a page of this mapping faulted because another process truncated "
    "the file; the page now reads zeros and the data can no longer be trusted.", NULL};

/* Adds Mapping.truncated (read-only); call after the Mapping type is made. */
int
shm_init_sigbus(PyObject *module)
{
    PyTypeObject *tp = shm_mod_state(module)->Mapping;
    PyObject *descr = PyDescr_NewGetSet(tp, &truncated_getset);
    if (descr == NULL)
        return -1;
    int r = PyDict_SetItemString(tp->tp_dict, "truncated", descr);
    Py_DECREF(descr);
    PyType_Modified(tp);
    return r;
}
