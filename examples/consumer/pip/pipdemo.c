/* pipdemo: an aiobridge extension built with setuptools alone
 * (aiobridge.setup_helpers), outside aiobridge's tree. */
#include <aiobridge/python.h>

#include <stdlib.h>

typedef struct pipdemo_state {
  aiob_py_bridge *bridge;
} pipdemo_state;

static aiob_py_bridge *bridge_of(PyObject *m) {
  return ((pipdemo_state *)PyModule_GetState(m))->bridge;
}

/* ---- sleep(seconds): a C timer as an awaitable ------------------------- */

typedef struct nap {
  uint64_t ns;
  int armed;
  aiob_sleep sleep;
} nap;

static aiob_poll nap_poll(aiob_task *self, void *p) {
  nap *n = p;
  if (!n->armed) {
    aiob_sleep_init(&n->sleep, n->ns);
    n->armed = 1;
  }
  return aiob_sleep_poll(self, &n->sleep, NULL);
}

static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = free};

static PyObject *pipdemo_sleep(PyObject *m, PyObject *arg) {
  uint64_t ns;
  if (aiob_py_duration_ns(arg, 1e9, &ns) < 0)
    return NULL;
  nap *n = calloc(1, sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  n->ns = ns;
  PyObject *aw = aiob_py_future_into_py(bridge_of(m), &nap_vt, n, NULL);
  if (!aw)
    free(n);
  return aw;
}

/* ---- relay(awaitable): a C task awaits any awaitable (a CTask of another
 * extension too) and returns its result --------------------------------- */

typedef struct relay {
  int co;
  PyObject *awaitable; /* owned */
  aiob_py_await wait;
  aiob_output out;
} relay;

static aiob_poll relay_poll(aiob_task *self, void *p) {
  relay *r = p;
  AIOB_BEGIN(&r->co);
  aiob_py_await_init(&r->wait, r->awaitable);
  AIOB_AWAIT(&r->co, aiob_py_await_poll(self, &r->wait, &r->out));
  if (r->out.status < 0) /* its exception (or cancellation) is ours */
    aiob_task_fail(self, r->out.status);
  aiob_task_return(self, r->out.value, r->out.free_value); /* moved */
  r->out.value = NULL;
  r->out.free_value = NULL;
  AIOB_END(&r->co);
}

static void relay_drop(void *p) {
  relay *r = p;
  aiob_output_clear(&r->out);
  aiob_py_release(r->awaitable);
  free(r);
}

static const aiob_task_vtable relay_vt = {.poll = relay_poll,
                                          .drop = relay_drop};

/* Loop thread, GIL held: the awaited object, moved out of the output. */
static PyObject *take_object(aiob_output *out) {
  PyObject *o = out->value;
  out->value = NULL;
  if (!o)
    Py_RETURN_NONE;
  return o;
}

static PyObject *pipdemo_relay(PyObject *m, PyObject *awaitable) {
  relay *r = calloc(1, sizeof *r);
  if (!r)
    return PyErr_NoMemory();
  Py_INCREF(awaitable);
  r->awaitable = awaitable;
  PyObject *aw =
      aiob_py_future_into_py(bridge_of(m), &relay_vt, r, take_object);
  if (!aw) {
    Py_DECREF(awaitable);
    free(r);
  }
  return aw;
}

/* ---- The module --------------------------------------------------------- */

static PyMethodDef pipdemo_methods[] = {
    {"sleep", pipdemo_sleep, METH_O, "Awaitable: None after a C timer."},
    {"relay", pipdemo_relay, METH_O,
     "Awaitable: a C task awaits the awaitable and returns its result."},
    {NULL, NULL, 0, NULL},
};

static int pipdemo_exec(PyObject *m) {
  return aiob_py_bridge_init(m,
                             &((pipdemo_state *)PyModule_GetState(m))->bridge);
}

static void pipdemo_free(void *m) {
  pipdemo_state *st = PyModule_GetState(m);
  if (st) {
    aiob_py_bridge_free(st->bridge);
    st->bridge = NULL;
  }
}

static PyModuleDef_Slot pipdemo_slots[] = {
    {Py_mod_exec, pipdemo_exec},
    {0, NULL},
};

static struct PyModuleDef pipdemo_def = {
    PyModuleDef_HEAD_INIT,           .m_name = "pipdemo",
    .m_size = sizeof(pipdemo_state), .m_methods = pipdemo_methods,
    .m_slots = pipdemo_slots,        .m_free = pipdemo_free,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit_pipdemo(void);
PyMODINIT_FUNC PyInit_pipdemo(void) { return PyModuleDef_Init(&pipdemo_def); }
