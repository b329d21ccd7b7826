/* reservation_cost.c - what a growable object's address-space reservation
 * costs on open and close, measured with the system calls alone.
 *
 *   cc -O2 -o /tmp/reservation_cost benchmarks/reservation_cost.c
 *   /tmp/reservation_cost
 *
 * A 64 MiB file in /dev/shm is mapped MAP_SHARED | MAP_NORESERVE, two of its
 * pages are written (as an open touches the header and the attach table),
 * and the mapping is unmapped: best of 5 rounds of 20,000 cycles, µs each.
 * Three tables: the cost of each step as the mapping grows; the unmap as a
 * function of where a 4 GiB mapping starts against a 1 GiB boundary; and
 * the whole cycle when the process picks that start itself.  See
 * docs/benchmarks.md, "Opening each kind by name".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"

#define GIB (1UL << 30)
#define MIB (1UL << 20)
#define FILE_SIZE (64 * MIB)
#define CYCLES 20000
#define ROUNDS 5

static int fd;



static volatile char *
map_file(void *hint, size_t len, int flags)
{
    void *p = mmap(hint, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE | flags, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static void
touch(volatile char *p)
{
    p[0] = 1;
    p[4096] = 1;
}

/* Best per-cycle time of each step of map, touch, unmap at `hint`. */
static void
steps(size_t len, void *hint, int flags, double best[3])
{
    best[0] = best[1] = best[2] = 1e18;
    for (int r = 0; r < ROUNDS; r++) {
        double sum[3] = {0, 0, 0};
        for (int i = 0; i < CYCLES; i++) {
            double t0 = now_us();
            volatile char *p = map_file(hint, len, flags);
            double t1 = now_us();
            touch(p);
            double t2 = now_us();
            munmap((void *)p, len);
            double t3 = now_us();
            if (hint != NULL && (void *)p != hint)
                die("the hint was not taken");
            sum[0] += t1 - t0;
            sum[1] += t2 - t1;
            sum[2] += t3 - t2;
        }
        for (int k = 0; k < 3; k++)
            if (sum[k] / CYCLES < best[k])
                best[k] = sum[k] / CYCLES;
    }
}

/* The start, inside a free range of len + 1 GiB found by an anonymous
 * probe, that puts `below` bytes under a 1 GiB boundary. */
static uintptr_t
placed_start(void *probe, size_t below)
{
    uintptr_t s = (((uintptr_t)probe + below + GIB - 1) & ~(GIB - 1)) - below;
    return s < (uintptr_t)probe ? s + GIB : s;
}

static void *
probe_range(size_t len)
{
    void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap probe");
    return p;
}

/* Whole cycles, the start chosen three ways. */
static volatile char *
cycle_plain(size_t len)
{
    return map_file(NULL, len, 0);
}

static volatile char *
cycle_probe_then_hint(size_t len)
{
    void *probe = probe_range(len + GIB);
    uintptr_t s = placed_start(probe, 2 * MIB);
    munmap(probe, len + GIB);
    return map_file((void *)s, len, MAP_FIXED_NOREPLACE);
}

static volatile char *
cycle_reserve_trim_map_over(size_t len)
{
    char *probe = probe_range(len + GIB);
    uintptr_t s = placed_start(probe, 2 * MIB);
    if (s > (uintptr_t)probe)
        munmap(probe, s - (uintptr_t)probe);
    uintptr_t end = s + len, probe_end = (uintptr_t)probe + len + GIB;
    if (probe_end > end)
        munmap((void *)end, probe_end - end);
    return map_file((void *)s, len, MAP_FIXED);
}

int
main(void)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/shm/reservation_cost.%d", (int)getpid());
    fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        die("open");
    unlink(path);
    if (ftruncate(fd, (off_t)FILE_SIZE) < 0)
        die("ftruncate");

    printf("%-22s %8s %8s %8s\n", "mapping length", "mmap", "touch", "munmap");
    const size_t lens[] = {64 * MIB, 512 * MIB, GIB, 2 * GIB, 4 * GIB, 64 * GIB};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        double b[3];
        steps(lens[i], NULL, 0, b);
        printf("%16zu MiB %8.2f %8.2f %8.2f\n", lens[i] / MIB, b[0], b[1], b[2]);
    }

    printf("\n4 GiB mapping, start placed %-7s %8s\n", "", "munmap");
    const size_t below[] = {0, 2 * MIB, 64 * MIB, 256 * MIB};
    for (size_t i = 0; i < sizeof below / sizeof below[0]; i++) {
        void *probe = probe_range(5 * GIB);
        munmap(probe, 5 * GIB);
        double b[3];
        steps(4 * GIB, (void *)placed_start(probe, below[i]), MAP_FIXED_NOREPLACE, b);
        printf("%4zu MiB below a 1 GiB boundary %8.2f\n", below[i] / MIB, b[2]);
    }

    printf("\n4 GiB mapping, whole cycle %13s\n", "µs");
    static const struct {
        const char *name;
        volatile char *(*map)(size_t);
    } ways[] = {
        {"kernel's choice", cycle_plain},
        {"probe, then hint", cycle_probe_then_hint},
        {"reserve, trim, map over", cycle_reserve_trim_map_over},
    };
    for (size_t w = 0; w < sizeof ways / sizeof ways[0]; w++) {
        double best = 1e18;
        for (int r = 0; r < ROUNDS; r++) {
            double t0 = now_us();
            for (int i = 0; i < CYCLES; i++) {
                volatile char *p = ways[w].map(4 * GIB);
                touch(p);
                munmap((void *)p, 4 * GIB);
            }
            double d = (now_us() - t0) / CYCLES;
            if (d < best)
                best = d;
        }
        printf("%-26s %13.2f\n", ways[w].name, best);
    }
    return 0;
}
