"""Builds the `aiobridge` Python package with CMake (the one build
description): configure for the interpreter running this build, build, and
install into the package directory, so the wheel holds

    aiobridge/__init__.py, _layout.py, _aiobridge<EXT_SUFFIX>
    aiobridge/include/             the public headers
    aiobridge/lib/*.a              the core (all backends, and one per
                                   backend) and the Python bridge
    aiobridge/lib/cmake/aiobridge  the CMake package (get_cmake_dir())

Environment: AIOB_BACKENDS (default "uv;event;uring"), CMAKE (default
cmake), AIOB_CMAKE_ARGS (extra configure arguments, space-separated).
"""
import os
import re
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        m = re.search(r"project\(aiobridge VERSION ([0-9.]+)", f.read())
    if not m:
        raise RuntimeError("no project(aiobridge VERSION ...) in CMakeLists.txt")
    return m.group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        pkgdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        cmake = os.environ.get("CMAKE", "cmake")
        configure = [
            cmake, "-S", ROOT, "-B", build,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DAIOB_BACKENDS=" + os.environ.get("AIOB_BACKENDS", "uv;event;uring"),
            "-DAIOB_PYTHONS=" + sys.executable,
            "-DAIOB_BUILD_TESTS=OFF", "-DAIOB_BUILD_BENCH=OFF",
            "-DAIOB_BUILD_EXAMPLES=OFF", "-DAIOB_PYTHON_SUITES=OFF",
            "-DAIOB_INSTALL=ON", "-DAIOB_INSTALL_SHARED=OFF",
            "-DAIOB_INSTALL_PYTHON_PACKAGE_DIR=.",
            "-DCMAKE_INSTALL_LIBDIR=lib", "-DCMAKE_INSTALL_INCLUDEDIR=include",
        ] + shlex.split(os.environ.get("AIOB_CMAKE_ARGS", ""))
        for cmd in (configure,
                    [cmake, "--build", build, "-j", str(os.cpu_count() or 1)],
                    [cmake, "--install", build, "--prefix", pkgdir]):
            print(" ".join(shlex.quote(c) for c in cmd), flush=True)
            subprocess.run(cmd, check=True)


setup(
    version=project_version(),
    packages=["aiobridge"],
    package_dir={"aiobridge": "bindings/python/aiobridge"},
    ext_modules=[Extension("aiobridge._aiobridge", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
