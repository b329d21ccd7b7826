#include "sync.h"
int shm_init_rwlock(PyObject *module) { return 0; }
