/* open_cost.c - what an open by name costs in the kernel: a bare open of a
 * 64 MiB /dev/shm file, then the same with each group of the system calls
 * and page faults that shmkit's open and close add, measured with the
 * system calls alone (no Python).
 *
 *   cc -O2 -o /tmp/open_cost benchmarks/open_cost.c
 *   /tmp/open_cost
 *
 * Each cycle opens the file, maps it MAP_SHARED | MAP_NORESERVE, reads a byte
 * of the third page (the payload, as the benchmark's touch does), closes the
 * descriptor and unmaps: a bare open.  The groups added to it, one at a time
 * and then all together:
 *   checks  the owner and header checks before mapping: geteuid, a pread of
 *           the header page
 *   guard   the SIGBUS guard's check that its handler is still installed
 *   slot    the attach slot's OFD lock and the slot-count check, and at close
 *           the slot's unlock and the last closer's lock over every slot
 *   recheck getpid for the table entry, and fstat: was the name removed
 *           meanwhile?
 *   write   the attach-table entry and the header's high-water mark, written
 *           through the mapping after reading the header: the read fault
 *           maps the pages around it too (the kernel's fault-around), so the
 *           write does not fault again; "write first" writes the entry before
 *           reading anything, as shmkit did before: a write fault maps its
 *           own page only, and the payload's touch faults a second time
 * Best of 5 rounds of 20,000 cycles, µs per cycle, and page faults per cycle
 * (getrusage).  See docs/benchmarks.md, "Opening each kind by name".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"

#define FILE_SIZE (64UL << 20)
#define PAGE 4096
#define CYCLES 20000
#define ROUNDS 5

enum { CHECKS = 1, GUARD = 2, SLOT = 4, RECHECK = 8, WRITE = 16, WRITE_FIRST = 32 };

static const char *path = "/dev/shm/open-cost-bench";


static long
faults(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt + u.ru_majflt;
}

static int
ofd_lock(int fd, int cmd, short type, off_t start, off_t len)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl);
}

static void
cycle(int steps)
{
    static char header[PAGE];
    struct stat st;
    int fd = open(path, O_RDWR | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0)
        die(path);
    if (steps & CHECKS) {
        (void)geteuid();
        if (pread(fd, header, PAGE, 0) != PAGE)
            die("pread");
    }
    volatile char *m = mmap(NULL, FILE_SIZE, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (m == MAP_FAILED)
        die("mmap");
    if (steps & GUARD) {
        struct sigaction sa;
        sigaction(SIGBUS, NULL, &sa);
    }
    if (steps & SLOT) {
        ofd_lock(fd, F_OFD_SETLK, F_WRLCK, 4198, 1);
        ofd_lock(fd, F_OFD_GETLK, F_WRLCK, 4352, 768);
    }
    if (steps & RECHECK) {
        (void)getpid();
        fstat(fd, &st);
    }
    if (steps & WRITE_FIRST) {
        m[PAGE + 64] = 1;
        (void)m[0];
        m[200] = 1;
    }
    if (steps & WRITE) {
        (void)m[0];          /* the entry's generation is read first */
        m[PAGE + 64] = 1;    /* the entry */
        m[200] = 1;          /* the high-water mark */
    }
    (void)m[2 * PAGE];       /* the user's touch of the payload */
    if (steps & SLOT) {
        ofd_lock(fd, F_OFD_SETLK, F_UNLCK, 4198, 1);
        ofd_lock(fd, F_OFD_SETLK, F_WRLCK, 1, 5119);
    }
    close(fd);
    munmap((void *)m, FILE_SIZE);
}

static void
measure(const char *what, int steps)
{
    double best = 1e18;
    long f0 = faults();
    for (int r = 0; r < ROUNDS; r++) {
        double t = now_us();
        for (int i = 0; i < CYCLES; i++)
            cycle(steps);
        t = (now_us() - t) / CYCLES;
        if (t < best)
            best = t;
    }
    printf("%-28s %6.2f µs  %4.2f faults\n", what, best,
           (double)(faults() - f0) / (ROUNDS * CYCLES));
}

int
main(void)
{
    int fd = open(path, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 || posix_fallocate(fd, 0, FILE_SIZE) != 0)
        die(path);
    close(fd);
    for (int i = 0; i < 2000; i++) /* warm up */
        cycle(0);
    measure("bare", 0);
    measure("bare + checks", CHECKS);
    measure("bare + guard", GUARD);
    measure("bare + slot", SLOT);
    measure("bare + recheck", RECHECK);
    measure("bare + write", WRITE);
    measure("bare + write first", WRITE_FIRST);
    measure("bare + all (shmkit's calls)", CHECKS | GUARD | SLOT | RECHECK | WRITE);
    measure("bare (again)", 0);
    unlink(path);
    return 0;
}
