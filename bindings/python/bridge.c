/* The bridge of one extension module: its life and what it shows.
 *
 * aiob_py_bridge_init makes the bridge from the module's exec slot: the
 * asyncio callables and interned names the other sources use, the Python
 * types (CTask, _Port, _Waiter), and its registration with the `aiobridge`
 * package (the hub's introspection callables, shutdown(), and the atexit
 * hook that stops the runtime before the interpreter finalizes).
 * aiob_py_bridge_free undoes it. Introspection (stats, backend, info) is
 * here too: it reads the bridge's counters and the runtime. */
#include "bridge_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Module-level bridge ----------------------------------------------- */

/* tp_new of the bridge's types: made by the bridge only. */
PyObject *aiob__py_no_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
  (void)args;
  (void)kw;
  PyErr_Format(PyExc_TypeError, "cannot create '%s' instances", type->tp_name);
  return NULL;
}

static PyObject *stopped_at_exit(aiob_py_bridge *b) {
  PyErr_SetString(b->shutdown_error,
                  "aiobridge: the runtime was stopped at interpreter exit");
  return NULL;
}

/* The runtime, started if needed, with a reference the caller releases
 * (aiob_runtime_release): another thread may shut it down meanwhile, and
 * its memory must outlive our use. Starting it, or waiting for a shutdown
 * in progress, happens without the GIL (runtime threads never need it,
 * but other Python threads should not wait for them); a running runtime
 * is taken with the GIL held. NULL with aiobridge.ShutdownError (after the
 * interpreter-exit hook) or aiobridge.BackendError set (GIL). */
aiob_runtime *aiob__py_bridge_runtime(aiob_py_bridge *b) {
  if (b->exited)
    return (aiob_runtime *)stopped_at_exit(b);
  aiob_runtime *rt = NULL;
  int rc = aiob__runtime_default_try_acquire(&rt);
  if (rc == AIOB_EAGAIN) {
    Py_BEGIN_ALLOW_THREADS;
    rc = aiob_runtime_default_acquire(&rt);
    Py_END_ALLOW_THREADS;
    if (rc == 0 && b->exited) {
      /* The exit hook ran meanwhile: this runtime started after it. */
      aiob_runtime_release(rt);
      Py_BEGIN_ALLOW_THREADS;
      aiob_runtime_default_shutdown_timeout(AIOB__PY_EXIT_TIMEOUT_NS, NULL);
      Py_END_ALLOW_THREADS;
      return (aiob_runtime *)stopped_at_exit(b);
    }
  }
  if (rc < 0) {
    /* An OSError subclass: errno and a message naming the knob in use and
     * what was wrong with the configuration. */
    const char *env = getenv("AIOBRIDGE_BACKEND");
    const char *why = aiob_runtime_config_error();
    PyObject *e = Py_BuildValue(
        "(iN)", -rc,
        env && env[0]
            ? PyUnicode_FromFormat("aiobridge: cannot start the runtime "
                                   "(AIOBRIDGE_BACKEND=%s): %s",
                                   env, why[0] ? why : aiob_strerror(rc))
            : PyUnicode_FromFormat("aiobridge: cannot start the runtime: %s",
                                   why[0] ? why : aiob_strerror(rc)));
    if (e)
      PyErr_SetObject(b->backend_error, e);
    Py_XDECREF(e);
    return NULL;
  }
  return rt;
}

/* ---- Introspection ---------------------------------------------------- */

static void stats_fn(aiob_runtime *rt, void *arg) {
  aiob_runtime_stats_get(rt, arg);
}

PyObject *aiob_py_bridge_stats(aiob_py_bridge *b) {
  aiob_runtime_stats st;
  memset(&st, 0, sizeof st);
  aiob_runtime_default_peek(stats_fn, &st); /* zeros when not running */
  return Py_BuildValue(
      "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,"
      "s:K,s:K,s:K,s:K,s:n}",
      "tasks_live", (unsigned long long)st.tasks_live, "tasks_spawned",
      (unsigned long long)st.tasks_spawned, "tasks_completed",
      (unsigned long long)st.tasks_completed, "tasks_cancelled",
      (unsigned long long)st.tasks_cancelled, "polls",
      (unsigned long long)st.polls, "loop_wakes",
      (unsigned long long)st.loop_wakes, "spins", (unsigned long long)st.spins,
      "spin_hits", (unsigned long long)st.spin_hits, "spin_ns",
      (unsigned long long)st.spin_ns, "spins_skipped",
      (unsigned long long)st.spins_skipped, "blocking_jobs_run",
      (unsigned long long)st.blocking_jobs_run, "blocking_jobs_cancelled",
      (unsigned long long)st.blocking_jobs_cancelled, "blocking_workers",
      (unsigned long long)st.blocking_workers, "completions", b->completions,
      "py_loop_wakes", b->py_wakes, "py_awaits", b->py_awaits, "py_spins",
      b->py_spins, "py_spin_hits", b->py_spin_hits, "py_spins_skipped",
      b->py_spins_skipped, "exit_loops_quieted", b->exit_loops_quieted,
      "exit_quiet_timeouts", b->exit_quiet_timeouts, "ports",
      b->ports ? PyDict_Size(b->ports) : (Py_ssize_t)0);
}

PyObject *aiob_py_bridge_backend(aiob_py_bridge *b) {
  aiob_runtime *rt = aiob__py_bridge_runtime(b);
  if (!rt)
    return NULL;
  PyObject *name = PyUnicode_FromString(aiob_runtime_backend_name(rt));
  aiob_runtime_release(rt);
  return name;
}

typedef struct info_snap {
  const char *backend;
  unsigned threads, spin_us, blocking;
} info_snap;

static void info_fn(aiob_runtime *rt, void *arg) {
  info_snap *i = arg;
  i->backend = aiob_runtime_backend_name(rt);
  i->threads = aiob_runtime_threads(rt);
  i->spin_us = aiob_runtime_spin_us(rt);
  i->blocking = aiob_runtime_blocking_threads(rt);
}

/* {module, running, backend, threads, spin_us, blocking_threads,
 * default_backend, backends, abandoned_threads};
 * never starts the runtime (GIL). */
static PyObject *bridge_info(const char *module) {
  info_snap i = {0};
  int running = aiob_runtime_default_peek(info_fn, &i) == 0;
  PyObject *names = PyList_New(0);
  const aiob_backend *bk;
  for (unsigned k = 0; names && (bk = aiob_backend_at(k)); k++) {
    PyObject *n = PyUnicode_FromString(bk->name);
    if (!n || PyList_Append(names, n) < 0)
      Py_CLEAR(names);
    Py_XDECREF(n);
  }
  if (!names)
    return NULL;
  PyObject *threads = Py_None, *spin = Py_None, *blocking = Py_None;
  if (running) {
    threads = PyLong_FromUnsignedLong(i.threads);
    spin = PyLong_FromUnsignedLong(i.spin_us);
    blocking = PyLong_FromUnsignedLong(i.blocking);
  }
  PyObject *d = Py_BuildValue(
      "{s:s,s:O,s:s,s:O,s:O,s:O,s:O,s:s,s:I}", "module", module, "running",
      running ? Py_True : Py_False, "backend", running ? i.backend : NULL,
      "threads", threads ? threads : Py_None, "spin_us", spin ? spin : Py_None,
      "blocking_threads", blocking ? blocking : Py_None, "backends", names,
      "default_backend", aiob_backend_at(0)->name, "abandoned_threads",
      aiob_runtime_abandoned_threads());
  if (running) {
    Py_XDECREF(threads);
    Py_XDECREF(spin);
    Py_XDECREF(blocking);
  }
  Py_DECREF(names);
  return d;
}

/* ---- Registration with the aiobridge module, and the exit hook ---------- */

/* Outlives the bridge: the hub's callables and the atexit hook hold its
 * capsule; aiob_py_bridge_free clears `b`. */
typedef struct bridge_reg {
  aiob_py_bridge *b;
  char module[128];
} bridge_reg;

#define REG_NAME "aiobridge.bridge"

static void reg_destroy(PyObject *cap) {
  free(PyCapsule_GetPointer(cap, REG_NAME));
}

static bridge_reg *reg_of(PyObject *cap) {
  return PyCapsule_GetPointer(cap, REG_NAME);
}

/* The live bridge of a registration, or NULL with an exception set (its
 * module was freed). */
static aiob_py_bridge *reg_bridge(PyObject *cap) {
  bridge_reg *r = reg_of(cap);
  if (r && !r->b)
    PyErr_Format(PyExc_RuntimeError, "aiobridge: module %s was freed",
                 r->module);
  return r ? r->b : NULL;
}

static PyObject *reg_info(PyObject *cap, PyObject *unused) {
  (void)unused;
  bridge_reg *r = reg_of(cap);
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? bridge_info(r->module) : NULL;
}

static PyObject *reg_stats(PyObject *cap, PyObject *unused) {
  (void)unused;
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? aiob_py_bridge_stats(b) : NULL;
}

static PyObject *reg_backend(PyObject *cap, PyObject *unused) {
  (void)unused;
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? aiob_py_bridge_backend(b) : NULL;
}

/* shutdown(timeout): stops the runtime, waiting at most `timeout` seconds
 * (None: no limit) for its loop threads and blocking workers, without the
 * GIL. C tasks in flight
 * are dropped; their completions reach the loops' ports and fail the
 * futures with ShutdownError. If the loop threads did not stop in time
 * they are abandoned, the ports are told to fail what they will never
 * finish, and the result is a dict {loops, loops_left, tasks_left,
 * workers_left}
 * (aiobridge.shutdown raises ShutdownTimeoutError with it); else None. */
static PyObject *reg_shutdown(PyObject *cap, PyObject *args) {
  PyObject *timeout = Py_None;
  if (!PyArg_UnpackTuple(args, "_aiobridge_shutdown", 0, 1, &timeout))
    return NULL;
  if (!reg_bridge(cap))
    return NULL;
  uint64_t ns = UINT64_MAX;
  if (timeout != Py_None && aiob_py_duration_ns(timeout, 1e9, &ns) < 0)
    return NULL;
  aiob_shutdown_info info;
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = aiob_runtime_default_shutdown_timeout(ns, &info);
  Py_END_ALLOW_THREADS;
  aiob__py_release_orphans();
  if (rc != AIOB_ETIMEDOUT)
    Py_RETURN_NONE;
  aiob_py_bridge *b = reg_of(cap) ? reg_of(cap)->b : NULL;
  if (b) /* (freed meanwhile: its ports are gone too) */
    aiob__py_ports_fail_shut(b);
  return Py_BuildValue("{s:I,s:I,s:K,s:I}", "loops", info.loops, "loops_left",
                       info.loops_left, "tasks_left",
                       (unsigned long long)info.tasks_left, "workers_left",
                       info.workers_left);
}

/* atexit: runtime threads stop before the interpreter finalizes, and no
 * runtime starts again in this process. The ports close first, so the
 * tasks the shutdown cancels resolve nothing: loops still running in
 * daemon threads are left as they are without aiobridge (their awaits
 * simply never finish, and the interpreter stops those threads), rather
 * than woken with cancellations they would report as errors. The wait is
 * bounded (AIOB__PY_EXIT_TIMEOUT_NS) and without the GIL: loop threads
 * that do not stop in time (stuck in a native request, or in a callback
 * that blocks) are abandoned, so that the exit never hangs. They never
 * touch Python (runtime threads never do, and from here on deferred
 * releases run on this thread only: release.c), and if they still run
 * when the process calls exit(), it ends without C destructors (see
 * release.c). Last, the hook waits (bounded) until the loops still
 * running on other threads have dropped the timer and fd watches of their
 * local tasks (aiob__py_local_quiet_others) and taken the wakes their
 * ports were sent before they closed (aiob__py_ports_settle): taken after
 * finalization, either would enter Python then. */
static PyObject *reg_atexit(PyObject *cap, PyObject *unused) {
  (void)unused;
  bridge_reg *r = reg_of(cap);
  if (!r)
    return NULL;
  aiob__py_exit_begin();
  if (r->b) {
    r->b->exited = 1;
    aiob__py_close_all_ports(r->b);
  }
  Py_BEGIN_ALLOW_THREADS;
  aiob_runtime_default_shutdown_timeout(AIOB__PY_EXIT_TIMEOUT_NS, NULL);
  Py_END_ALLOW_THREADS;
  aiob__py_release_orphans();
  if (r->b) {
    aiob__py_local_quiet_others(r->b, AIOB__PY_EXIT_TIMEOUT_NS);
    aiob__py_ports_settle(r->b, AIOB__PY_EXIT_TIMEOUT_NS);
  }
  Py_RETURN_NONE;
}

static PyMethodDef reg_defs[] = {
    {"_aiobridge_info", reg_info, METH_NOARGS, NULL},
    {"_aiobridge_stats", reg_stats, METH_NOARGS, NULL},
    {"_aiobridge_shutdown", reg_shutdown, METH_VARARGS, NULL},
    {"_aiobridge_backend", reg_backend, METH_NOARGS, NULL},
    {"_aiobridge_atexit", reg_atexit, METH_NOARGS, NULL},
};

/* Imports the aiobridge module, takes its exception types, registers this
 * bridge there and the exit hook with atexit. */
static int bridge_register(aiob_py_bridge *b, const char *name) {
  PyObject *hub = PyImport_ImportModule("aiobridge");
  if (!hub) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_Format(PyExc_ImportError,
                 "%s needs the aiobridge module (built and installed with "
                 "aiobridge) on sys.path",
                 name);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
  }
  b->shutdown_error = PyObject_GetAttrString(hub, "ShutdownError");
  b->backend_error = PyObject_GetAttrString(hub, "BackendError");
  bridge_reg *r = calloc(1, sizeof *r);
  if (!r) {
    Py_DECREF(hub);
    PyErr_NoMemory();
    return -1;
  }
  r->b = b;
  snprintf(r->module, sizeof r->module, "%s", name);
  b->reg = PyCapsule_New(r, REG_NAME, reg_destroy);
  if (!b->reg)
    free(r);
  PyObject *fn[5] = {NULL};
  int ok = b->shutdown_error && b->backend_error && b->reg;
  for (int i = 0; ok && i < 5; i++)
    ok = (fn[i] = PyCFunction_New(&reg_defs[i], b->reg)) != NULL;
  PyObject *rv = ok ? PyObject_CallMethod(hub, "_register", "sOOOO", name,
                                          fn[0], fn[1], fn[2], fn[3])
                    : NULL;
  Py_XDECREF(rv);
  PyObject *atexit = rv ? PyImport_ImportModule("atexit") : NULL;
  rv = atexit ? PyObject_CallMethod(atexit, "register", "O", fn[4]) : NULL;
  Py_XDECREF(atexit);
  for (int i = 0; i < 5; i++)
    Py_XDECREF(fn[i]);
  Py_DECREF(hub);
  if (!rv)
    return -1;
  Py_DECREF(rv);
  return 0;
}

/* ---- Init and free ------------------------------------------------------ */

#define INTERN(field, text)                                                    \
  do {                                                                         \
    if (!(b->field = PyUnicode_InternFromString(text)))                        \
      goto fail;                                                               \
  } while (0)

int aiob_py_bridge_init(PyObject *module, aiob_py_bridge **out) {
  const char *name = PyModule_GetName(module);
  return name ? aiob_py_bridge_new(name, out) : -1;
}

int aiob_py_bridge_new(const char *name, aiob_py_bridge **out) {
  if (!name || !out) {
    PyErr_SetString(PyExc_ValueError, "aiob_py_bridge_new: NULL argument");
    return -1;
  }
  aiob_py_bridge *b = calloc(1, sizeof *b);
  if (!b) {
    PyErr_NoMemory();
    return -1;
  }
  aiob_local_key key;
  if (aiob__py_locals_key_get(&key) < 0) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: no task-local key left");
    goto fail;
  }
  aiob__py_fork_init();
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  if (!asyncio)
    goto fail;
  PyObject *events = PyObject_GetAttrString(asyncio, "events");
  b->ensure_future = PyObject_GetAttrString(asyncio, "ensure_future");
  b->cancelled_error = PyObject_GetAttrString(asyncio, "CancelledError");
  b->invalid_state_error = PyObject_GetAttrString(asyncio, "InvalidStateError");
  Py_DECREF(asyncio);
  if (!events)
    goto fail;
  b->get_running_loop = PyObject_GetAttrString(events, "_get_running_loop");
  Py_DECREF(events);
  if (!b->ensure_future || !b->get_running_loop || !b->cancelled_error ||
      !b->invalid_state_error)
    goto fail;
  INTERN(s_add_done_callback, "add_done_callback");
  INTERN(s_cancel, "cancel");
  INTERN(s_cancelled, "cancelled");
  INTERN(s_add_reader, "add_reader");
  INTERN(s_is_closed, "is_closed");
  INTERN(s_call_soon, "call_soon");
  INTERN(s_call_soon_threadsafe, "call_soon_threadsafe");
  INTERN(s_result, "result");
  INTERN(s_exception, "exception");
  if (!(b->kw_context = Py_BuildValue("(s)", "context")))
    goto fail;
  if (!(b->ports = PyDict_New()) || !(b->hosts = PyDict_New()))
    goto fail;
  b->ctask_type = (PyTypeObject *)PyType_FromSpec(&aiob__py_ctask_spec);
  b->port_type = (PyTypeObject *)PyType_FromSpec(&aiob__py_port_spec);
  b->waiter_type = (PyTypeObject *)PyType_FromSpec(&aiob__py_waiter_spec);
  b->runner_type = (PyTypeObject *)PyType_FromSpec(&aiob__py_runner_spec);
  b->retrieve = PyCFunction_New(&aiob__py_retrieve_def, NULL);
  b->reraise = PyCFunction_New(&aiob__py_reraise_def, NULL);
  b->cstream_type = (PyTypeObject *)PyType_FromSpec(&aiob__py_cstream_spec);
  if (!b->ctask_type || !b->port_type || !b->waiter_type || !b->runner_type ||
      !b->cstream_type || !b->retrieve || !b->reraise)
    goto fail;
  if (bridge_register(b, name) < 0)
    goto fail;
  *out = b;
  return 0;
fail:
  aiob_py_bridge_free(b);
  return -1;
}

void aiob_py_bridge_free(aiob_py_bridge *b) {
  if (!b)
    return;
  aiob__py_local_close_all(b); /* its tasks complete into their CTasks */
  Py_CLEAR(b->hosts);
  aiob__py_close_all_ports(b);
  aiob__py_ctask_forget_all(b);
  aiob__py_request_forget_all(b);
  if (b->reg) {
    bridge_reg *r = reg_of(b->reg);
    if (r)
      r->b = NULL;
    PyErr_Clear();
    Py_CLEAR(b->reg);
  }
  Py_CLEAR(b->ports);
  Py_CLEAR(b->shutdown_error);
  Py_CLEAR(b->backend_error);
  Py_CLEAR(b->get_running_loop);
  Py_CLEAR(b->ensure_future);
  Py_CLEAR(b->ctask_type);
  Py_CLEAR(b->cancelled_error);
  Py_CLEAR(b->invalid_state_error);
  Py_CLEAR(b->kw_context);
  Py_CLEAR(b->aiter_start);
  Py_CLEAR(b->port_type);
  Py_CLEAR(b->waiter_type);
  Py_CLEAR(b->runner_type);
  Py_CLEAR(b->retrieve);
  Py_CLEAR(b->reraise);
  Py_CLEAR(b->cstream_type);
  Py_CLEAR(b->s_add_done_callback);
  Py_CLEAR(b->s_cancel);
  Py_CLEAR(b->s_cancelled);
  Py_CLEAR(b->s_add_reader);
  Py_CLEAR(b->s_is_closed);
  Py_CLEAR(b->s_call_soon);
  Py_CLEAR(b->s_call_soon_threadsafe);
  Py_CLEAR(b->s_result);
  Py_CLEAR(b->s_exception);
  free(b);
}
