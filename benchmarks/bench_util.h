/* bench_util.h - what the C measurements in benchmarks/ share: a monotonic
 * clock in microseconds, and dying with the failing call's errno. */
#ifndef SHMKIT_BENCH_UTIL_H
#define SHMKIT_BENCH_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double
now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static inline void
die(const char *what)
{
    perror(what);
    exit(1);
}

#endif
