#include "sync.h"
int shm_init_condition(PyObject *module) { return 0; }
