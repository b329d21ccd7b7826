/* error.c - the per-thread error record of the shared-memory protocols.
 *
 * table.c and heap.c call no Python API: a failing step records a code (of
 * its structure's own enum, TE_* or HE_*) and a message with shm_fail(),
 * returns -1, and the structure's Python type turns the record into its
 * exception right away (t_raise in tabletype.c, h_raise in heaptype.c).
 *
 *   if (n > limit)
 *       return shm_fail(HE_VALUE, "%llu bytes is more than %llu", n, limit);
 */
#include "shmkit.h"
#include <stdarg.h>
#include <stdio.h>

__thread shm_error shm_err;

int
shm_vfail(int code, const char *fmt, va_list va)
{
    vsnprintf(shm_err.msg, sizeof shm_err.msg, fmt, va);
    shm_err.code = code;
    return -1;
}

int
shm_fail(int code, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    shm_vfail(code, fmt, va);
    va_end(va);
    return -1;
}
