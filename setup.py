"""Build of pyloader's native extension, pyloader._C (C++20, pybind11).

Everything else (metadata, dependencies, extras) is in pyproject.toml.
"""

from __future__ import annotations

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CORE = ["csrc/core/arena.cpp", "csrc/core/buffer_pool.cpp", "csrc/core/pin.cpp", "csrc/core/engine.cpp",
        "csrc/core/proc_loader.cpp", "csrc/core/consumer.cpp"]
BINDINGS = ["csrc/python/module.cpp", "csrc/python/layout.cpp", "csrc/python/py_loader.cpp",
            "csrc/python/errors.cpp", "csrc/python/gil.cpp", "csrc/python/bind_pool.cpp", "csrc/python/bind_stack.cpp",
            "csrc/python/bind_engine.cpp", "csrc/python/bind_array_source.cpp", "csrc/python/bind_process.cpp"]

extra_compile_args = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra"]
if os.environ.get("PYLOADER_WERROR"):
    extra_compile_args.append("-Werror")

ext = Pybind11Extension(
    "pyloader._C",
    sources=sorted(BINDINGS + CORE),
    cxx_std=20,
    define_macros=[("NDEBUG", "1")],
    extra_compile_args=extra_compile_args,
    libraries=["dl"],
)

# The package lives in src/, so that the repository root never shadows the installed package
# (whose compiled extension the source tree lacks).
setup(ext_modules=[ext], cmdclass={"build_ext": build_ext}, package_dir={"": "src"})
