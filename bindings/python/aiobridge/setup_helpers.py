"""Building an aiobridge extension with setuptools alone (no CMake).

    from setuptools import setup
    from aiobridge.setup_helpers import AiobridgeExtension

    setup(ext_modules=[AiobridgeExtension("myext", ["myext.c"], backend="uv")])

The extension links the installed static libraries of this aiobridge (the
Python bridge for the running interpreter, and the core with `backend`, or
with every installed backend when backend is None) with hidden symbols, and
the backend's own library. Build with pip install --no-build-isolation so
that this aiobridge is the one importable at build time.
"""
import os
import sys

from setuptools import Extension

from . import _layout, get_include


def _lib_dir():
    if _layout.LIB_DIR is None:
        raise RuntimeError(
            "aiobridge is imported from its build tree: install it to build "
            "extensions against it")
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, _layout.LIB_DIR))


def python_tag():
    """This interpreter's tag in the bridge library's name (cp311, cp311d)."""
    v = sys.version_info
    return "cp%d%d%s" % (v[0], v[1], "d" if hasattr(sys, "gettotalrefcount") else "")


def backends():
    """The backends this aiobridge was built with."""
    return sorted(_layout.BACKEND_LIBRARIES)


class AiobridgeExtension(Extension):
    """A setuptools Extension linked with aiobridge on `backend` ("uv",
    "event", "uring"; None: every installed backend, the default runtime on
    the first one aiobridge was built with)."""

    def __init__(self, name, sources, backend=None, **kw):
        lib = _lib_dir()
        bridge = os.path.join(lib, "libaiobridge_python_%s.a" % python_tag())
        if not os.path.exists(bridge):
            raise RuntimeError(
                "this aiobridge has no Python bridge for %s (%s): install "
                "aiobridge with this interpreter" % (python_tag(), sys.executable))
        if backend is None:
            core, libs = "libaiobridge.a", sum(_layout.BACKEND_LIBRARIES.values(), [])
        elif backend in _layout.BACKEND_LIBRARIES:
            core, libs = "libaiobridge_%s.a" % backend, _layout.BACKEND_LIBRARIES[backend]
        else:
            raise ValueError("backend %r is not in this aiobridge (it has: %s)"
                             % (backend, ", ".join(backends())))
        kw.setdefault("include_dirs", []).append(get_include())
        kw.setdefault("extra_objects", []).extend([bridge, os.path.join(lib, core)])
        kw.setdefault("libraries", []).extend(libs)
        kw.setdefault("extra_compile_args", []).append("-fvisibility=hidden")
        kw.setdefault("extra_link_args", []).append("-pthread")
        super().__init__(name, sources, **kw)
