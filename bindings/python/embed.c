/* Embedding: C programs that own main() and run a C main task with Python
 * on the main thread (aiob_main, AIOB_MAIN), and the asyncio.run /
 * loop.run_until_complete equivalents for a C task.
 *
 * The loop's life (a Runner on 3.11+, asyncio.run or its steps before) is
 * asyncio's own code, driven from a few lines of Python kept here, so that
 * Ctrl-C, async generators and the default executor behave exactly as for
 * a Python program. */
#include "aiobridge/embed.h"

#include "bridge_internal.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The `aiobridge` package's C module, linked in as a built-in for programs
 * that run without the installed package. */
PyMODINIT_FUNC PyInit__aiobridge(void);
#define EMBEDDED_HUB "_aiobridge_embedded"

static const char run_source[] =
    "import asyncio, sys\n"
    "def run(main, loop_factory):\n"
    "    if sys.version_info >= (3, 11):\n"
    "        with asyncio.Runner(loop_factory=loop_factory) as runner:\n"
    "            return runner.run(main)\n"
    "    if loop_factory is None:\n"
    "        return asyncio.run(main)\n"
    "    loop = loop_factory()\n"
    "    try:\n"
    "        asyncio.set_event_loop(loop)\n"
    "        return loop.run_until_complete(main)\n"
    "    finally:\n"
    "        try:\n"
    "            asyncio.runners._cancel_all_tasks(loop)\n"
    "            loop.run_until_complete(loop.shutdown_asyncgens())\n"
    "            if hasattr(loop, 'shutdown_default_executor'):\n"
    "                "
    "loop.run_until_complete(loop.shutdown_default_executor())\n"
    "        finally:\n"
    "            asyncio.set_event_loop(None)\n"
    "            loop.close()\n";

/* RuntimeError if this thread runs an event loop (GIL): -1, else 0. */
static int refuse_running_loop(aiob_py_bridge *b, const char *who) {
  PyObject *running = PyObject_CallObject(b->get_running_loop, NULL);
  if (!running)
    return -1;
  int busy = running != Py_None;
  Py_DECREF(running);
  if (busy) {
    PyErr_Format(PyExc_RuntimeError,
                 "%s: this thread already runs an event loop (await the C "
                 "task there instead)",
                 who);
    return -1;
  }
  return 0;
}

/* The `run` function of run_source, a new reference. */
static PyObject *runner_fn(void) {
  return aiob__py_source_fn(run_source, "run");
}

/* aiob_py_run; *spawned tells whether the task took `state`. */
static PyObject *run_task(aiob_py_bridge *b, PyObject *loop_factory,
                          const aiob_task_vtable *vt, void *state,
                          aiob_py_converter conv, int *spawned) {
  *spawned = 0;
  if (refuse_running_loop(b, "aiob_py_run") < 0)
    return NULL;
  PyObject *run = runner_fn();
  if (!run)
    return NULL;
  /* Unbound: it binds to the loop that runs it (see future_into_py). */
  PyObject *task = aiob_py_future_into_py(b, vt, state, conv);
  if (!task) {
    Py_DECREF(run);
    return NULL;
  }
  *spawned = 1;
  PyObject *res = PyObject_CallFunctionObjArgs(
      run, task, loop_factory ? loop_factory : Py_None, NULL);
  Py_DECREF(task);
  Py_DECREF(run);
  return res;
}

PyObject *aiob_py_run(aiob_py_bridge *b, PyObject *loop_factory,
                      const aiob_task_vtable *vt, void *state,
                      aiob_py_converter conv) {
  int spawned;
  return run_task(b, loop_factory, vt, state, conv, &spawned);
}

PyObject *aiob_py_run_until_complete(aiob_py_bridge *b, PyObject *loop,
                                     const aiob_task_vtable *vt, void *state,
                                     aiob_py_converter conv) {
  if (!loop || loop == Py_None) {
    PyErr_SetString(PyExc_TypeError,
                    "aiob_py_run_until_complete: an event loop is needed");
    return NULL;
  }
  if (refuse_running_loop(b, "aiob_py_run_until_complete") < 0)
    return NULL;
  PyObject *running = PyObject_CallMethod(loop, "is_running", NULL);
  if (!running)
    return NULL;
  int busy = PyObject_IsTrue(running);
  Py_DECREF(running);
  if (busy) {
    if (busy > 0)
      PyErr_SetString(PyExc_RuntimeError,
                      "aiob_py_run_until_complete: the loop is already "
                      "running (in another thread)");
    return NULL;
  }
  PyObject *task = aiob_py_future_into_py(b, vt, state, conv);
  if (!task)
    return NULL;
  PyObject *res = PyObject_CallMethod(loop, "run_until_complete", "O", task);
  Py_DECREF(task);
  return res;
}

/* ---- aiob_main ---------------------------------------------------------- */

void aiob_main_config_init(aiob_main_config *cfg, int argc, char **argv) {
  memset(cfg, 0, sizeof *cfg);
  cfg->argc = argc;
  cfg->argv = argv;
  cfg->uvloop = -1;
}

static int start_python(const aiob_main_config *cfg) {
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0; /* argv is the program's, not python's options */
  const char *name = cfg->program_name
                         ? cfg->program_name
                         : (cfg->argc > 0 && cfg->argv ? cfg->argv[0] : NULL);
  PyStatus st = PyStatus_Ok();
  if (name)
    st = PyConfig_SetBytesString(&config, &config.program_name, name);
  if (!PyStatus_Exception(st) && cfg->argc > 0 && cfg->argv)
    st = PyConfig_SetBytesArgv(&config, cfg->argc, cfg->argv);
  if (!PyStatus_Exception(st))
    st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st)) {
    if (PyStatus_IsExit(st))
      return st.exitcode ? st.exitcode : 1;
    fprintf(stderr, "aiobridge: cannot start Python: %s%s%s\n",
            st.func ? st.func : "", st.func ? ": " : "",
            st.err_msg ? st.err_msg : "unknown error");
    return 1;
  }
  return 0;
}

/* sys.path additions, in order, before the rest. -1 with an exception. */
static int extend_sys_path(const char *const *dirs) {
  if (!dirs)
    return 0;
  PyObject *path = PySys_GetObject("path"); /* borrowed */
  if (!path || !PyList_Check(path)) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: sys.path is not a list");
    return -1;
  }
  for (Py_ssize_t i = 0; dirs[i]; i++) {
    PyObject *d = PyUnicode_DecodeFSDefault(dirs[i]);
    int rc = d ? PyList_Insert(path, i, d) : -1;
    Py_XDECREF(d);
    if (rc < 0)
      return -1;
  }
  return 0;
}

/* `import aiobridge`, or the built-in copy of its C module under that name
 * when the package is not installed (only then: a package that is there
 * but broken is an error to see). -1 with an exception. */
static int ensure_hub(void) {
  PyObject *hub = PyImport_ImportModule("aiobridge");
  if (!hub && PyErr_ExceptionMatches(PyExc_ModuleNotFoundError)) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *name = value ? PyObject_GetAttrString(value, "name") : NULL;
    int missing = name && PyUnicode_Check(name) &&
                  PyUnicode_CompareWithASCIIString(name, "aiobridge") == 0;
    Py_XDECREF(name);
    if (!missing) {
      PyErr_Restore(type, value, tb);
      return -1;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
    hub = PyImport_ImportModule(EMBEDDED_HUB);
    if (hub &&
        PyDict_SetItemString(PyImport_GetModuleDict(), "aiobridge", hub) < 0)
      Py_CLEAR(hub);
  }
  Py_XDECREF(hub);
  return hub ? 0 : -1;
}

/* uvloop.new_event_loop, None for stock asyncio, or NULL with an
 * exception. */
static PyObject *loop_factory(int uvloop) {
  if (uvloop < 0) {
    const char *env = getenv("AIOBRIDGE_LOOP");
    if (!env || !env[0] || strcmp(env, "asyncio") == 0) {
      uvloop = 0;
    } else if (strcmp(env, "uvloop") == 0) {
      uvloop = 1;
    } else {
      PyErr_Format(PyExc_ValueError,
                   "aiobridge: AIOBRIDGE_LOOP=%s: use uvloop or asyncio", env);
      return NULL;
    }
  }
  if (!uvloop)
    Py_RETURN_NONE;
  PyObject *mod = PyImport_ImportModule("uvloop");
  if (!mod) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_Format(PyExc_ImportError,
                 "aiobridge: uvloop was asked for but cannot be imported "
                 "(%S); install it (Debian: python3-uvloop) or run on stock "
                 "asyncio",
                 value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return NULL;
  }
  PyObject *f = PyObject_GetAttrString(mod, "new_event_loop");
  Py_DECREF(mod);
  return f;
}

/* The exit status for the exception set (and clears it): a SystemExit's
 * code, or 1 after printing the traceback. */
static int status_of_error(void) {
  if (!PyErr_ExceptionMatches(PyExc_SystemExit)) {
    PyErr_Print(); /* with its traceback, as python does */
    return 1;
  }
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  int status = 0;
  PyObject *code = value ? PyObject_GetAttrString(value, "code") : NULL;
  if (!code) {
    PyErr_Clear();
  } else if (PyLong_Check(code)) {
    long v = PyLong_AsLong(code);
    if (v == -1 && PyErr_Occurred()) /* too big: as python, 255 */
      PyErr_Clear();
    status = (int)v;
  } else if (code != Py_None) {
    PyObject_Print(code, stderr, Py_PRINT_RAW);
    fputc('\n', stderr);
    status = 1;
  }
  Py_XDECREF(code);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return status;
}

/* Starts Python from cfg, with sys.path, the aiobridge package and a
 * bridge named "__main__"; *factory is the loop factory (Py_None: asyncio's
 * default). Returns 0, or an exit status with the error printed (then
 * Python may be running: finish with aiob__py_main_finish). */
int aiob__py_main_start(const aiob_main_config *cfg, aiob_py_bridge **b,
                        PyObject **factory) {
  *b = NULL;
  *factory = NULL;
  if (!Py_IsInitialized() &&
      PyImport_AppendInittab(EMBEDDED_HUB, PyInit__aiobridge) < 0) {
    fprintf(stderr, "aiobridge: cannot register the aiobridge module\n");
    return 1;
  }
  int status = start_python(cfg);
  if (status != 0)
    return status;
  if (extend_sys_path(cfg->sys_path) == 0 && ensure_hub() == 0 &&
      aiob_py_bridge_new("__main__", b) == 0 &&
      (*factory = loop_factory(cfg->uvloop)) != NULL)
    return 0;
  return status_of_error();
}

/* Runs the loop factory's loop until `main` (a coroutine) is done, with
 * asyncio.run's life; a new reference or NULL with an exception. */
PyObject *aiob__py_main_run(PyObject *factory, PyObject *main) {
  PyObject *run = runner_fn();
  PyObject *res = run ? PyObject_CallFunctionObjArgs(
                            run, main, factory ? factory : Py_None, NULL)
                      : NULL;
  Py_XDECREF(run);
  return res;
}

/* The status for the outcome `res` (NULL: the exception set), then the
 * teardown: runtime, bridge, Py_FinalizeEx; after Ctrl-C the process ends
 * by SIGINT. Returns the exit status. */
int aiob__py_main_finish(aiob_py_bridge *b, PyObject *factory, PyObject *res,
                         int status) {
  int sigint = 0;
  if (!Py_IsInitialized())
    return status;
  if (res) {
    Py_DECREF(res);
  } else if (PyErr_Occurred()) {
    sigint = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
    status = status_of_error();
  }
  Py_XDECREF(factory);
  /* The runtime stops before the interpreter finalizes, within the exit
   * hook's deadline (a stuck native request is abandoned, never waited
   * for), and without the GIL. Then the bridge goes, once the objects that
   * use it are collected. */
  Py_BEGIN_ALLOW_THREADS;
  aiob_runtime_default_shutdown_timeout(AIOB__PY_EXIT_TIMEOUT_NS, NULL);
  Py_END_ALLOW_THREADS;
  aiob__py_release_orphans();
  PyGC_Collect();
  aiob_py_bridge_free(b);
  if (Py_FinalizeEx() < 0 && status == 0)
    status = 120; /* as python: flushing stdout failed */
  if (sigint) {
    /* End as python does after an uncaught KeyboardInterrupt: by SIGINT,
     * so that the parent (a shell) sees it. */
    signal(SIGINT, SIG_DFL);
    kill(getpid(), SIGINT);
    return 130;
  }
  return status;
}

int aiob_main(const aiob_main_config *cfg, const aiob_task_vtable *vt,
              void *state) {
  if (!cfg || !vt || !vt->poll) {
    fprintf(stderr, "aiob_main: no config or no main task\n");
    if (vt && vt->drop)
      vt->drop(state);
    return 1;
  }
  aiob_py_bridge *b;
  PyObject *factory, *res = NULL;
  int spawned = 0;
  int status = aiob__py_main_start(cfg, &b, &factory);
  if (status == 0)
    res = run_task(b, factory == Py_None ? NULL : factory, vt, state, NULL,
                   &spawned);
  if (!spawned && vt->drop) /* never spawned: the failure came before */
    vt->drop(state);
  return aiob__py_main_finish(b, factory, res, status);
}
