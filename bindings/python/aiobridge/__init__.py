"""aiobridge: C code and asyncio awaiting each other.

Every aiobridge extension imports this package when it loads: it holds the
exception types those extensions raise, and one place to inspect and stop
their runtimes (each extension carries its own). get_include() and
get_cmake_dir() locate the headers and the CMake package that an extension
project's own build uses, as pybind11's functions of the same names do.
"""
import os as _os

from . import _layout
from ._aiobridge import (
    BackendError,
    Error,
    ShutdownError,
    ShutdownTimeoutError,
    _register,
    backend,
    runtime_info,
    shutdown,
    stats,
)

__version__ = _layout.VERSION
__all__ = [
    "BackendError",
    "Error",
    "ShutdownError",
    "ShutdownTimeoutError",
    "backend",
    "get_cmake_dir",
    "get_include",
    "runtime_info",
    "shutdown",
    "stats",
]


def _installed(relative, what):
    if relative is None:
        raise RuntimeError(
            "aiobridge is imported from its build tree, which has no " + what +
            ": install it (pip install --no-build-isolation <aiobridge "
            "source>, or cmake --install)")
    here = _os.path.dirname(_os.path.abspath(__file__))
    return _os.path.normpath(_os.path.join(here, relative))


def get_include():
    """The directory holding aiobridge.h and aiobridge/python.h."""
    return _installed(_layout.INCLUDE_DIR, "installed headers")


def get_cmake_dir():
    """The directory of aiobridgeConfig.cmake: pass it as aiobridge_DIR, or
    its parent directories on CMAKE_PREFIX_PATH, to find_package(aiobridge)."""
    return _installed(_layout.CMAKE_DIR, "installed CMake package")
