"""Build the compiled core, shmkit._core, from every C file in src/shmkit/_core.

Set SHMKIT_ASAN=1 to build it with AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import glob
import os

from setuptools import Extension, setup

flags = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Wshadow",
         "-Wno-unused-parameter", "-Wno-missing-field-initializers",
         "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types"]
link = []
if os.environ.get("SHMKIT_ASAN"):
    flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
    link += ["-fsanitize=address,undefined"]

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
