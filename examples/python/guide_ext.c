/* aiobridge_guide: the extension built step by step in docs/python.md.
 * Every C block of that guide is a piece of this file (checked in CI). */
#include "aiobridge/python.h"

#include <stdlib.h>

typedef struct guide_state {
  aiob_py_bridge *bridge;
} guide_state;

static aiob_py_bridge *bridge_of(PyObject *module) {
  return ((guide_state *)PyModule_GetState(module))->bridge;
}

/* ---- sleep(seconds): a C task as a Python awaitable --------------------- */

typedef struct nap {
  uint64_t ns;
  int armed;
  aiob_sleep sleep;
} nap;

static aiob_poll nap_poll(aiob_task *self, void *p) {
  nap *n = p;
  if (!n->armed) { /* the first poll starts the runtime timer */
    aiob_sleep_init(&n->sleep, n->ns);
    n->armed = 1;
  }
  return aiob_sleep_poll(self, &n->sleep, NULL);
}

static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = free};

static PyObject *guide_sleep(PyObject *module, PyObject *arg) {
  uint64_t ns; /* seconds; inf: forever; NaN or negative: ValueError */
  if (aiob_py_duration_ns(arg, 1e9, &ns) < 0)
    return NULL;
  nap *n = calloc(1, sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  n->ns = ns;
  PyObject *awaitable =
      aiob_py_future_into_py(bridge_of(module), &nap_vt, n, NULL);
  if (!awaitable)
    free(n); /* on failure the state is still ours */
  return awaitable;
}

/* ---- double_of(coro_fn, x): C awaits a Python coroutine ----------------- */

typedef struct doubler {
  int co;             /* coroutine macros' resume point */
  PyObject *call;     /* a Python callable returning an awaitable (owned) */
  aiob_py_await wait; /* the leaf future that awaits it */
  aiob_output got;
} doubler;

/* Runs on the asyncio loop thread with the GIL: Python int -> C long. */
static int to_long(PyObject *result, aiob_output *out) {
  long v = PyLong_AsLong(result);
  if (v == -1 && PyErr_Occurred())
    return -1; /* the C task receives the exception */
  out->value = (void *)(intptr_t)v;
  return 0;
}

static aiob_poll doubler_poll(aiob_task *self, void *p) {
  doubler *d = p;
  AIOB_BEGIN(&d->co);
  aiob_py_await_init_call(&d->wait, d->call);
  aiob_py_await_set_converter(&d->wait, to_long);
  AIOB_AWAIT(&d->co, aiob_py_await_poll(self, &d->wait, &d->got));
  if (d->got.status < 0) { /* a Python exception, or cancelled */
    aiob_task_fail(self, d->got.status);
    aiob_task_return(self, d->got.value, d->got.free_value);
    return AIOB_READY;
  }
  /* Plain C from here on: no GIL, no Python object. */
  aiob_task_return(self, (void *)((intptr_t)d->got.value * 2), NULL);
  AIOB_END(&d->co);
}

static void doubler_drop(void *p) {
  doubler *d = p;
  aiob_py_release(d->call); /* any thread: deferred if no GIL */
  free(d);
}

static const aiob_task_vtable doubler_vt = {.poll = doubler_poll,
                                            .drop = doubler_drop};

/* Runs on the asyncio loop thread with the GIL: C long -> Python int. */
static PyObject *from_long(aiob_output *out) {
  return PyLong_FromLong((long)(intptr_t)out->value);
}

static PyObject *guide_double_of(PyObject *module, PyObject *args) {
  PyObject *coro_fn, *x;
  if (!PyArg_ParseTuple(args, "OO:double_of", &coro_fn, &x))
    return NULL;
  doubler *d = calloc(1, sizeof *d);
  if (!d)
    return PyErr_NoMemory();
  /* functools.partial(coro_fn, x): called on the loop thread, in the
   * caller's contextvars context, when the C task awaits it. */
  PyObject *functools = PyImport_ImportModule("functools");
  d->call = functools
                ? PyObject_CallMethod(functools, "partial", "OO", coro_fn, x)
                : NULL;
  Py_XDECREF(functools);
  if (!d->call) {
    free(d);
    return NULL;
  }
  PyObject *awaitable =
      aiob_py_future_into_py(bridge_of(module), &doubler_vt, d, from_long);
  if (!awaitable) {
    Py_DECREF(d->call);
    free(d);
  }
  return awaitable;
}

/* ---- The module: multi-phase init, the bridge in its state -------------- */

static PyMethodDef guide_methods[] = {
    {"sleep", guide_sleep, METH_O, "Awaitable: None after a C timer."},
    {"double_of", guide_double_of, METH_VARARGS,
     "Awaitable: C awaits coro_fn(x) and returns twice its result."},
    {NULL, NULL, 0, NULL},
};

static int guide_exec(PyObject *module) {
  return aiob_py_bridge_init(
      module, &((guide_state *)PyModule_GetState(module))->bridge);
}

static void guide_free(void *module) {
  guide_state *st = PyModule_GetState(module);
  if (st) {
    aiob_py_bridge_free(st->bridge);
    st->bridge = NULL;
  }
}

static PyModuleDef_Slot guide_slots[] = {
    {Py_mod_exec, guide_exec},
    {0, NULL},
};

static struct PyModuleDef guide_def = {
    PyModuleDef_HEAD_INIT,         .m_name = "aiobridge_guide",
    .m_size = sizeof(guide_state), .m_methods = guide_methods,
    .m_slots = guide_slots,        .m_free = guide_free,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC
PyInit_aiobridge_guide(void);
PyMODINIT_FUNC PyInit_aiobridge_guide(void) {
  return PyModuleDef_Init(&guide_def);
}
