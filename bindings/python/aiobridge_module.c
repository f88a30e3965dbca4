/* `aiobridge._aiobridge`, the core of the `aiobridge` Python package
 * (bindings/python/aiobridge/__init__.py re-exports it): the exception
 * types every aiobridge extension raises, and one place to inspect and stop
 * their runtimes.
 *
 * Each extension built with aiobridge carries its own copy of the core and
 * its own default runtime, on the backend its author chose. On import, an
 * extension's bridge imports this module, takes its exception types and
 * registers its runtime here (_register) under the extension's module name.
 * backend(), runtime_info(), stats() and shutdown() then take an optional
 * `module` (the extension module or its name); without it they cover every
 * registered runtime.
 *
 * Multi-phase init, module state, heap types: no global Python state, so the
 * module can be imported in several (sub)interpreters. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>

typedef struct hub_state {
  PyObject *error;            /* aiobridge.Error */
  PyObject *shutdown_error;   /* aiobridge.ShutdownError */
  PyObject *shutdown_timeout; /* aiobridge.ShutdownTimeoutError */
  PyObject *backend_error;    /* aiobridge.BackendError */
  PyObject *entries; /* list of (name, info, stats, shutdown, backend) */
} hub_state;

enum { E_NAME, E_INFO, E_STATS, E_SHUTDOWN, E_BACKEND, E_LEN };

static hub_state *hub_of(PyObject *m) {
  return (hub_state *)PyModule_GetState(m);
}

/* _register(name, info, stats, shutdown, backend): called by a bridge. A
 * module registered again under the same name (re-import) replaces its
 * earlier entry. shutdown(timeout) takes None or a float of seconds and
 * returns None, or a dict {loops, loops_left, tasks_left[, workers_left]}
 * when the loop threads or blocking workers did not stop in time; the others
 * take no argument. */
static PyObject *hub_register(PyObject *m, PyObject *args) {
  PyObject *name, *info, *stats, *shutdown, *backend;
  if (!PyArg_ParseTuple(args, "UOOOO:_register", &name, &info, &stats,
                        &shutdown, &backend))
    return NULL;
  if (!PyCallable_Check(info) || !PyCallable_Check(stats) ||
      !PyCallable_Check(shutdown) || !PyCallable_Check(backend)) {
    PyErr_SetString(PyExc_TypeError, "_register: callables expected");
    return NULL;
  }
  hub_state *st = hub_of(m);
  PyObject *entry = PyTuple_Pack(E_LEN, name, info, stats, shutdown, backend);
  if (!entry)
    return NULL;
  Py_ssize_t n = PyList_GET_SIZE(st->entries);
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *e = PyList_GET_ITEM(st->entries, i);
    int eq = PyUnicode_Compare(PyTuple_GET_ITEM(e, E_NAME), name) == 0;
    if (eq) {
      if (PyList_SetItem(st->entries, i, entry) < 0) /* steals entry */
        return NULL;
      Py_RETURN_NONE;
    }
  }
  int rc = PyList_Append(st->entries, entry);
  Py_DECREF(entry);
  if (rc < 0)
    return NULL;
  Py_RETURN_NONE;
}

/* The entries selected by `module` (None: all; a module object or a name:
 * that one): a new list, or NULL with an exception set. */
static PyObject *select_entries(hub_state *st, PyObject *module) {
  if (module == NULL || module == Py_None)
    return PyList_GetSlice(st->entries, 0, PY_SSIZE_T_MAX);
  PyObject *name;
  if (PyUnicode_Check(module)) {
    Py_INCREF(module);
    name = module;
  } else if (PyModule_Check(module)) {
    name = PyModule_GetNameObject(module);
    if (!name)
      return NULL;
  } else {
    PyErr_Format(PyExc_TypeError,
                 "module must be a module, a module name or None, not %.100s",
                 Py_TYPE(module)->tp_name);
    return NULL;
  }
  PyObject *out = NULL;
  Py_ssize_t n = PyList_GET_SIZE(st->entries);
  for (Py_ssize_t i = 0; i < n && !out; i++) {
    PyObject *e = PyList_GET_ITEM(st->entries, i);
    if (PyUnicode_Compare(PyTuple_GET_ITEM(e, E_NAME), name) == 0)
      out = Py_BuildValue("[O]", e);
  }
  if (!out && !PyErr_Occurred())
    PyErr_Format(PyExc_LookupError,
                 "aiobridge: no runtime registered by module %R "
                 "(is it an aiobridge extension, and imported?)",
                 name);
  Py_DECREF(name);
  return out;
}

static PyObject *call_entry(PyObject *e, int slot) {
  return PyObject_CallObject(PyTuple_GET_ITEM(e, slot), NULL);
}

static int parse_module(PyObject *args, PyObject *kw, const char *fmt,
                        PyObject **module) {
  static char *kwlist[] = {"module", NULL};
  *module = Py_None;
  return PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, module);
}

/* backend(module=None): the backend name of that extension's runtime
 * (starting it if needed). Without a module: the backend every registered
 * runtime uses; ValueError if they differ. */
static PyObject *hub_backend(PyObject *m, PyObject *args, PyObject *kw) {
  PyObject *module;
  if (!parse_module(args, kw, "|O:backend", &module))
    return NULL;
  PyObject *sel = select_entries(hub_of(m), module);
  if (!sel)
    return NULL;
  PyObject *result = NULL;
  Py_ssize_t n = PyList_GET_SIZE(sel);
  if (n == 0)
    PyErr_SetString(PyExc_RuntimeError,
                    "aiobridge: no aiobridge extension is imported");
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *name = call_entry(PyList_GET_ITEM(sel, i), E_BACKEND);
    if (!name) {
      Py_CLEAR(result);
      break;
    }
    if (result && PyUnicode_Compare(result, name) != 0) {
      PyErr_Format(PyExc_ValueError,
                   "aiobridge: extensions use different backends (%U, %U): "
                   "pass module=",
                   result, name);
      Py_DECREF(name);
      Py_CLEAR(result);
      break;
    }
    Py_XDECREF(result);
    result = name;
  }
  Py_DECREF(sel);
  return result;
}

/* runtime_info(module=None): one dict per registered runtime (a list), or
 * the dict of `module`'s runtime. Never starts a runtime. */
static PyObject *hub_runtime_info(PyObject *m, PyObject *args, PyObject *kw) {
  PyObject *module;
  if (!parse_module(args, kw, "|O:runtime_info", &module))
    return NULL;
  PyObject *sel = select_entries(hub_of(m), module);
  if (!sel)
    return NULL;
  Py_ssize_t n = PyList_GET_SIZE(sel);
  PyObject *out = PyList_New(n);
  for (Py_ssize_t i = 0; out && i < n; i++) {
    PyObject *info = call_entry(PyList_GET_ITEM(sel, i), E_INFO);
    if (!info)
      Py_CLEAR(out);
    else
      PyList_SET_ITEM(out, i, info);
  }
  Py_DECREF(sel);
  if (out && module != Py_None) {
    PyObject *one = PyList_GET_ITEM(out, 0);
    Py_INCREF(one);
    Py_DECREF(out);
    return one;
  }
  return out;
}

/* stats(module=None): counters of `module`'s runtime and bridge, or their
 * sums over every registered one. */
static PyObject *hub_stats(PyObject *m, PyObject *args, PyObject *kw) {
  PyObject *module;
  if (!parse_module(args, kw, "|O:stats", &module))
    return NULL;
  PyObject *sel = select_entries(hub_of(m), module);
  if (!sel)
    return NULL;
  PyObject *sum = PyDict_New();
  Py_ssize_t n = PyList_GET_SIZE(sel);
  for (Py_ssize_t i = 0; sum && i < n; i++) {
    PyObject *d = call_entry(PyList_GET_ITEM(sel, i), E_STATS);
    if (!d || !PyDict_Check(d)) {
      if (d)
        PyErr_SetString(PyExc_TypeError, "aiobridge: stats is not a dict");
      Py_XDECREF(d);
      Py_CLEAR(sum);
      break;
    }
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (sum && PyDict_Next(d, &pos, &k, &v)) {
      PyObject *old = PyDict_GetItemWithError(sum, k);
      PyObject *nv = old ? PyNumber_Add(old, v) : (Py_INCREF(v), v);
      if (!nv || PyDict_SetItem(sum, k, nv) < 0)
        Py_CLEAR(sum);
      Py_XDECREF(nv);
    }
    Py_DECREF(d);
  }
  Py_DECREF(sel);
  return sum;
}

/* The timeout argument of shutdown(): None (no limit) or a number of
 * seconds >= 0 (inf: no limit), as a new reference to None or a float;
 * NULL with TypeError or ValueError set. */
static PyObject *parse_timeout(PyObject *timeout) {
  if (timeout == Py_None) {
    Py_INCREF(timeout);
    return timeout;
  }
  double t = PyFloat_AsDouble(timeout);
  if (t == -1.0 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "timeout must be None or a number of seconds, not %.100s",
                   Py_TYPE(timeout)->tp_name);
    }
    return NULL;
  }
  if (isnan(t) || t < 0) {
    PyErr_SetString(PyExc_ValueError,
                    "timeout must be None or a number of seconds >= 0");
    return NULL;
  }
  if (isinf(t))
    Py_RETURN_NONE;
  return PyFloat_FromDouble(t);
}

/* Appends "<name>: <loops_left> of <loops> loop threads [and
 * <workers_left> blocking workers] still running, <tasks_left> C tasks not
 * dropped" for one runtime's report (a dict made by the bridge). */
static int describe_left(PyObject *parts, PyObject *name, PyObject *d) {
  PyObject *loops = PyDict_GetItemString(d, "loops");
  PyObject *left = PyDict_GetItemString(d, "loops_left");
  PyObject *tasks = PyDict_GetItemString(d, "tasks_left");
  if (!loops || !left || !tasks) {
    PyErr_SetString(PyExc_TypeError, "aiobridge: malformed shutdown report");
    return -1;
  }
  /* workers_left: from bridges that have a blocking pool */
  PyObject *workers = PyDict_GetItemString(d, "workers_left");
  PyObject *s =
      workers
          ? PyUnicode_FromFormat("%U: %S of %S loop threads and %S blocking "
                                 "workers still running, %S C tasks not "
                                 "dropped",
                                 name, left, loops, workers, tasks)
          : PyUnicode_FromFormat(
                "%U: %S of %S loop threads still running, %S C tasks not "
                "dropped",
                name, left, loops, tasks);
  if (!s)
    return -1;
  int rc = PyList_Append(parts, s);
  Py_DECREF(s);
  return rc;
}

/* ShutdownTimeoutError(ETIMEDOUT, message) with .left = left. */
static void raise_timeout(hub_state *st, PyObject *timeout, PyObject *left) {
  PyObject *parts = PyList_New(0), *key, *value;
  Py_ssize_t pos = 0;
  while (parts && PyDict_Next(left, &pos, &key, &value))
    if (describe_left(parts, key, value) < 0)
      Py_CLEAR(parts);
  PyObject *sep = parts ? PyUnicode_FromString("; ") : NULL;
  PyObject *what = sep ? PyUnicode_Join(sep, parts) : NULL;
  PyObject *msg =
      what ? PyUnicode_FromFormat(
                 "aiobridge: runtime threads did not stop within %S s (%U); "
                 "they are abandoned: their pending awaitables fail with "
                 "ShutdownError, and the next call starts a fresh runtime",
                 timeout, what)
           : NULL;
  PyObject *exc =
      msg ? PyObject_CallFunction(st->shutdown_timeout, "iO", ETIMEDOUT, msg)
          : NULL;
  if (exc && PyObject_SetAttrString(exc, "left", left) == 0)
    PyErr_SetObject(st->shutdown_timeout, exc);
  Py_XDECREF(exc);
  Py_XDECREF(msg);
  Py_XDECREF(what);
  Py_XDECREF(sep);
  Py_XDECREF(parts);
}

/* shutdown(module=None, timeout=None): stops `module`'s runtime, or every
 * registered one, waiting at most `timeout` seconds for each (None: no
 * limit) with the GIL released. C tasks in flight are dropped and their
 * awaiters see ShutdownError; the next call into an extension starts a
 * fresh runtime. A runtime whose loop threads did not stop in time is
 * abandoned: ShutdownTimeoutError once every selected runtime was shut. */
static PyObject *hub_shutdown(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"module", "timeout", NULL};
  PyObject *module = Py_None, *timeout = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO:shutdown", kwlist, &module,
                                   &timeout))
    return NULL;
  hub_state *st = hub_of(m);
  PyObject *t = parse_timeout(timeout);
  if (!t)
    return NULL;
  PyObject *sel = select_entries(st, module);
  PyObject *left = sel ? PyDict_New() : NULL;
  for (Py_ssize_t i = 0; left && i < PyList_GET_SIZE(sel); i++) {
    PyObject *e = PyList_GET_ITEM(sel, i);
    PyObject *r =
        PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(e, E_SHUTDOWN), t, NULL);
    if (r && r != Py_None &&
        PyDict_SetItem(left, PyTuple_GET_ITEM(e, E_NAME), r) < 0)
      Py_CLEAR(r);
    if (!r)
      Py_CLEAR(left);
    Py_XDECREF(r);
  }
  Py_XDECREF(sel);
  PyObject *result = NULL;
  if (left && PyDict_Size(left) > 0) {
    raise_timeout(st, t, left);
  } else if (left) {
    Py_INCREF(Py_None);
    result = Py_None;
  }
  Py_XDECREF(left);
  Py_DECREF(t);
  return result;
}

static PyMethodDef hub_methods[] = {
    {"backend", (PyCFunction)(void (*)(void))hub_backend,
     METH_VARARGS | METH_KEYWORDS,
     "backend(module=None) -> str\n\nThe backend (\"uv\", \"event\" or "
     "\"uring\") of an extension's runtime, started if needed; without a "
     "module, the one all imported aiobridge extensions use."},
    {"runtime_info", (PyCFunction)(void (*)(void))hub_runtime_info,
     METH_VARARGS | METH_KEYWORDS,
     "runtime_info(module=None) -> dict or list of dicts\n\nModule, "
     "running, backend, threads, spin_us, blocking_threads, compiled "
     "backends. Never starts "
     "a runtime."},
    {"stats", (PyCFunction)(void (*)(void))hub_stats,
     METH_VARARGS | METH_KEYWORDS,
     "stats(module=None) -> dict\n\nTask, completion and wake counters of "
     "an extension's runtime, or their sums over all."},
    {"shutdown", (PyCFunction)(void (*)(void))hub_shutdown,
     METH_VARARGS | METH_KEYWORDS,
     "shutdown(module=None, timeout=None)\n\nStops the runtime(s), waiting "
     "at most timeout seconds for each (None: no limit) without holding the "
     "GIL: C tasks in flight are dropped and their awaiters see "
     "ShutdownError; a later call starts a fresh runtime. Raises "
     "ShutdownTimeoutError (its .left says what was left, per module) if "
     "loop threads did not stop in time: they are abandoned."},
    {"_register", hub_register, METH_VARARGS,
     "Internal: an extension's bridge registers its runtime."},
    {NULL, NULL, 0, NULL},
};

/* PyModule_AddObjectRef is 3.10+. */
static int add_ref(PyObject *m, const char *name, PyObject *v) {
  Py_INCREF(v);
  if (PyModule_AddObject(m, name, v) < 0) {
    Py_DECREF(v);
    return -1;
  }
  return 0;
}

static int hub_exec(PyObject *m) {
  hub_state *st = hub_of(m);
  st->error = PyErr_NewExceptionWithDoc(
      "aiobridge.Error", "Base class of aiobridge's own errors.", NULL, NULL);
  if (!st->error)
    return -1;
  PyObject *bases = PyTuple_Pack(2, st->error, PyExc_RuntimeError);
  if (!bases)
    return -1;
  st->shutdown_error = PyErr_NewExceptionWithDoc(
      "aiobridge.ShutdownError",
      "The runtime was shut down (aiobridge.shutdown(), interpreter exit): "
      "a C task in flight was dropped, or no new C task can run.",
      bases, NULL);
  Py_DECREF(bases);
  bases = PyTuple_Pack(2, st->error, PyExc_TimeoutError);
  if (!st->shutdown_error || !bases) {
    Py_XDECREF(bases);
    return -1;
  }
  st->shutdown_timeout = PyErr_NewExceptionWithDoc(
      "aiobridge.ShutdownTimeoutError",
      "aiobridge.shutdown(timeout=...) returned at its deadline with loop "
      "threads still running (stuck in a native request or a blocking "
      "callback): they are abandoned. .left maps each module to "
      "{'loops', 'loops_left', 'tasks_left', 'workers_left'}.",
      bases, NULL);
  Py_DECREF(bases);
  bases = PyTuple_Pack(2, st->error, PyExc_OSError);
  if (!st->shutdown_timeout || !bases) {
    Py_XDECREF(bases);
    return -1;
  }
  st->backend_error = PyErr_NewExceptionWithDoc(
      "aiobridge.BackendError",
      "The runtime could not start: unknown backend, or the kernel refused "
      "it (io_uring).",
      bases, NULL);
  Py_DECREF(bases);
  if (!st->backend_error || !(st->entries = PyList_New(0)))
    return -1;
  if (add_ref(m, "Error", st->error) < 0 ||
      add_ref(m, "ShutdownError", st->shutdown_error) < 0 ||
      add_ref(m, "ShutdownTimeoutError", st->shutdown_timeout) < 0 ||
      add_ref(m, "BackendError", st->backend_error) < 0)
    return -1;
  return 0;
}

static int hub_traverse(PyObject *m, visitproc visit, void *arg) {
  hub_state *st = hub_of(m);
  if (st) {
    Py_VISIT(st->error);
    Py_VISIT(st->shutdown_error);
    Py_VISIT(st->shutdown_timeout);
    Py_VISIT(st->backend_error);
    Py_VISIT(st->entries);
  }
  return 0;
}

static int hub_clear(PyObject *m) {
  hub_state *st = hub_of(m);
  if (st) {
    Py_CLEAR(st->error);
    Py_CLEAR(st->shutdown_error);
    Py_CLEAR(st->shutdown_timeout);
    Py_CLEAR(st->backend_error);
    Py_CLEAR(st->entries);
  }
  return 0;
}

static void hub_free(void *m) { hub_clear(m); }

static PyModuleDef_Slot hub_slots[] = {
    {Py_mod_exec, hub_exec},
    {0, NULL},
};

static struct PyModuleDef hub_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiobridge._aiobridge",
    .m_doc = "aiobridge: exception types, and the runtimes of the imported "
             "aiobridge extensions (backend, runtime_info, stats, shutdown).",
    .m_size = sizeof(hub_state),
    .m_methods = hub_methods,
    .m_slots = hub_slots,
    .m_traverse = hub_traverse,
    .m_clear = hub_clear,
    .m_free = hub_free,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__aiobridge(void);
PyMODINIT_FUNC PyInit__aiobridge(void) { return PyModuleDef_Init(&hub_def); }
