/* Small pieces of Python kept as source in the bridge (the embedding
 * runner, the test harness's driver, the async-iterator pump), compiled
 * when first needed. In a file of its own: an extension that uses one of
 * them must not pull in embed.c, whose built-in copy of the `aiobridge`
 * module would then be linked, and exported, with it. */
#include "bridge_internal.h"

/* Runs the Python `source` in a fresh namespace and returns its function
 * `name` as a new reference, or NULL with an exception (GIL). */
PyObject *aiob__py_source_fn(const char *source, const char *name) {
  PyObject *globals = PyDict_New();
  if (!globals)
    return NULL;
  PyObject *fn = NULL;
  if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) ==
      0) {
    PyObject *r = PyRun_String(source, Py_file_input, globals, globals);
    Py_XDECREF(r);
    if (r) {
      fn = PyDict_GetItemString(globals, name);
      Py_XINCREF(fn);
    }
  }
  Py_DECREF(globals);
  if (!fn && !PyErr_Occurred())
    PyErr_Format(PyExc_RuntimeError, "aiobridge: no function %s", name);
  return fn;
}
