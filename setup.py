"""Build the compiled core, shmkit._core, from every C file in src/shmkit/_core.

The core is one shared object built from many files, so it is compiled with
link-time optimisation: small protocol helpers that one file calls in another
(the store's bounds checks on every get, for instance) are inlined as if they
were in the same file.  Hidden visibility keeps every symbol but the module's
init function private, which lets the compiler inline and lets nothing
outside interpose on the core's own functions.

Set SHMKIT_ASAN=1 to build it with AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import glob
import os

from setuptools import Extension, setup

flags = ["-std=gnu11", "-O2", "-g", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wshadow",
         "-Wno-unused-parameter", "-Wno-missing-field-initializers",
         "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types"]
link = []
if os.environ.get("SHMKIT_ASAN"):
    # SHM_CHECK_GIL: the lock registry's changes are checked to hold the GIL (lock.c).
    flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1",
              "-DSHM_CHECK_GIL"]
    link += ["-fsanitize=address,undefined"]
else:
    flags += ["-flto=auto"]
    link += ["-flto=auto", "-O2"]

setup(
    ext_modules=[
        Extension(
            "shmkit._core",
            sources=sorted(glob.glob("src/shmkit/_core/*.c")),
            depends=glob.glob("src/shmkit/_core/*.h"),
            extra_compile_args=flags,
            extra_link_args=link,
        )
    ]
)
