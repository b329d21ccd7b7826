/* liveness.c - kernel-backed liveness of attachments.
 *
 * An attachment owns slot i of a segment's attach table by holding an OFD
 * write lock on byte SHM_SLOT_LOCK_BASE+i of the segment's file.  The kernel
 * releases OFD locks when the last descriptor of the open file goes away,
 * which includes the process being killed, so "is the lock held by someone
 * else" is a death test that a reused PID cannot fool.
 *
 *   ofd_lock(fd, start, length, exclusive=True) -> bool   (never blocks)
 *   ofd_unlock(fd, start, length)
 *   ofd_held(fd, start, length) -> bool   held through another open file?
 */
#include "shmkit.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>

static int
ofd_held(int fd, off_t start, off_t len)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -1;
    return fl.l_type != F_UNLCK;
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
    Py_ssize_t off = m->table_off + (Py_ssize_t)slot * SHM_SLOT_SIZE;
    if (off < 0 || off + 4 > m->length)
        return 0;
    uint32_t gen = __atomic_load_n((uint32_t *)(m->base + off), __ATOMIC_ACQUIRE);
    if ((gen & 0xFFFFFu) != SHM_TOKEN_GEN(token))
        return 0; /* the slot has been taken over since */
    int held = ofd_held(m->fd, SHM_SLOT_LOCK_BASE + slot, 1);
    return held != 0; /* on error, assume alive: never steal a live lock */
}

static PyObject *
py_ofd_lock(PyObject *mod, PyObject *args)
{
    int fd, exclusive = 1;
    long long start, len;
    if (!PyArg_ParseTuple(args, "iLL|p", &fd, &start, &len, &exclusive))
        return NULL;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = exclusive ? F_WRLCK : F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        if (errno == EAGAIN || errno == EACCES)
            Py_RETURN_FALSE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

static PyObject *
py_ofd_unlock(PyObject *mod, PyObject *args)
{
    int fd;
    long long start, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &start, &len))
        return NULL;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
py_ofd_held(PyObject *mod, PyObject *args)
{
    int fd;
    long long start, len;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &start, &len))
        return NULL;
    int r = ofd_held(fd, start, len);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r);
}

static PyObject *
py_token_alive(PyObject *mod, PyObject *args)
{
    PyObject *m;
    unsigned int token;
    if (!PyArg_ParseTuple(args, "O!I", &Mapping_Type, &m, &token))
        return NULL;
    if (((MappingObject *)m)->base == NULL) {
        PyErr_SetString(SHM_CLOSED_EXC, "the segment is closed in this process");
        return NULL;
    }
    return PyBool_FromLong(shm_token_alive((MappingObject *)m, token));
}

PyMethodDef shm_liveness_methods[] = {
    {"ofd_lock", py_ofd_lock, METH_VARARGS,
     "ofd_lock(fd, start, length, exclusive=True) -> bool\n\n"
     "Try to take an OFD byte-range lock without blocking."},
    {"ofd_unlock", py_ofd_unlock, METH_VARARGS, "ofd_unlock(fd, start, length)"},
    {"ofd_held", py_ofd_held, METH_VARARGS,
     "ofd_held(fd, start, length) -> bool\n\n"
     "True if another open file holds a lock on any byte of the range."},
    {"token_alive", py_token_alive, METH_VARARGS,
     "token_alive(mapping, token) -> bool\n\nIs the attachment named by token alive?"},
    {NULL}
};
