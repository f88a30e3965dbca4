/* aiobridge_guide: the extension built step by step in docs/python.md.
 * Every C block of that guide is a piece of this file (checked in CI). */
#include "aiobridge/python.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct guide_state {
  aiob_py_bridge *bridge;
} guide_state;

static aiob_py_bridge *bridge_of(PyObject *module) {
  return ((guide_state *)PyModule_GetState(module))->bridge;
}

/* Converters: run on the asyncio loop thread with the GIL. */
static PyObject *to_int(aiob_output *out) {
  return PyLong_FromUnsignedLongLong((uintptr_t)out->value);
}

static PyObject *to_str(aiob_output *out) {
  PyObject *s = PyUnicode_FromString(out->value);
  aiob_output_clear(out); /* a converter owns the value: frees it here */
  return s;
}

/* ---- resolve(host): shape 1, a callback API ----------------------------- */

typedef struct lookup {
  struct gaicb req, *reqs[1];
  struct addrinfo hints;
  struct sigevent ev; /* how glibc calls back */
  aiob_promise *done; /* the completer side */
  atomic_int refs;    /* glibc's callback + the awaitable */
} lookup;

static void lookup_free(lookup *l) {
  if (l->req.ar_result)
    freeaddrinfo(l->req.ar_result);
  free((char *)l->req.ar_name);
  free(l);
}

static void lookup_unref(lookup *l) {
  if (atomic_fetch_sub(&l->refs, 1) == 1)
    lookup_free(l);
}

/* A glibc thread, once the lookup finished: completes the awaitable. */
static void lookup_finished(union sigval sv) {
  lookup *l = sv.sival_ptr;
  int rc = gai_error(&l->req);
  char ip[INET_ADDRSTRLEN] = "";
  if (rc == 0) {
    struct sockaddr_in *sa = (struct sockaddr_in *)l->req.ar_result->ai_addr;
    inet_ntop(AF_INET, &sa->sin_addr, ip, sizeof ip);
    aiob_promise_complete(l->done, 0, strdup(ip), free);
  } else {
    aiob_py_promise_raise(l->done, PyExc_OSError, gai_strerror(rc));
  }
  lookup_unref(l);
}

/* A lookup of `name` (IPv4), shared by glibc's callback and the awaitable. */
static lookup *lookup_new(const char *name) {
  lookup *l = calloc(1, sizeof *l);
  if (!l || !(l->req.ar_name = strdup(name)))
    return free(l), NULL;
  l->hints.ai_family = AF_INET;
  l->req.ar_request = &l->hints;
  l->reqs[0] = &l->req;
  l->ev.sigev_notify = SIGEV_THREAD;
  l->ev.sigev_notify_function = lookup_finished;
  l->ev.sigev_value.sival_ptr = l;
  atomic_init(&l->refs, 2);
  return l;
}

/* A runtime thread, once the awaitable is done with the lookup. */
static void lookup_dropped(void *arg, int cancelled) {
  lookup *l = arg;
  if (cancelled && gai_cancel(&l->req) == EAI_CANCELED) {
    aiob_promise_abandon(l->done); /* glibc will not call back */
    lookup_unref(l);
  }
  lookup_unref(l);
}

static PyObject *guide_resolve(PyObject *module, PyObject *host) {
  const char *name = PyUnicode_AsUTF8(host); /* TypeError if not a str */
  lookup *l = name ? lookup_new(name) : NULL;
  if (!l)
    return name ? PyErr_NoMemory() : NULL;
  PyObject *aw =
      aiob_py_promise_new(bridge_of(module), "aiobridge_guide.resolve", to_str,
                          lookup_dropped, l, &l->done);
  int rc = aw ? getaddrinfo_a(GAI_NOWAIT, l->reqs, 1, &l->ev) : 0;
  if (!aw) {
    lookup_free(l);     /* never shared */
  } else if (rc != 0) { /* no callback will come: say why, through aw */
    aiob_py_promise_raise(l->done, PyExc_OSError, gai_strerror(rc));
    lookup_unref(l);
  }
  return aw;
}

/* ---- checksum(data): shape 2, blocking work on a worker thread --------- */

typedef struct chunk {
  size_t len;
  unsigned char bytes[];
} chunk;

/* A worker thread of the runtime, without the GIL: FNV-1a over the copy. */
static int fnv1a(void *arg, aiob_output *out) {
  chunk *c = arg;
  uint64_t h = 0xcbf29ce484222325u;
  for (size_t i = 0; i < c->len; i++)
    h = (h ^ c->bytes[i]) * 0x100000001b3u;
  out->value = (void *)(uintptr_t)h;
  return 0;
}

static PyObject *guide_checksum(PyObject *module, PyObject *data) {
  Py_buffer view;
  if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
    return NULL;
  chunk *c = malloc(sizeof *c + (size_t)view.len); /* workers have no GIL */
  if (c) {
    c->len = (size_t)view.len;
    memcpy(c->bytes, view.buf, c->len);
  }
  PyBuffer_Release(&view);
  if (!c)
    return PyErr_NoMemory();
  return aiob_py_run_blocking(bridge_of(module), "aiobridge_guide.checksum",
                              fnv1a, c, free, to_int);
}

/* ---- double_of(coro): shape 3, C awaits a Python coroutine -------------- */

typedef struct doubler {
  int co;             /* coroutine macros' resume point */
  PyObject *coro;     /* the awaitable (owned) */
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
  aiob_py_await_init(&d->wait, d->coro);
  aiob_py_await_set_converter(&d->wait, to_long);
  AIOB_AWAIT(&d->co, aiob_py_await_poll(self, &d->wait, &d->got));
  if (d->got.status < 0) /* raised, or cancelled: pass it on as it is */
    return aiob_task_forward(self, &d->got);
  /* Plain C from here on: no GIL, no Python object. */
  aiob_task_return(self, (void *)((intptr_t)d->got.value * 2), NULL);
  AIOB_END(&d->co);
}

static void doubler_drop(void *p) {
  doubler *d = p;
  aiob_py_release(d->coro); /* any thread: deferred if no GIL */
  free(d);
}

static const aiob_task_vtable doubler_vt = {.poll = doubler_poll,
                                            .drop = doubler_drop,
                                            .name =
                                                "aiobridge_guide.double_of"};

static PyObject *guide_double_of(PyObject *module, PyObject *coro) {
  doubler *d = calloc(1, sizeof *d);
  if (!d)
    return PyErr_NoMemory();
  Py_INCREF(coro);
  d->coro = coro;
  PyObject *aw =
      aiob_py_future_into_py(bridge_of(module), &doubler_vt, d, to_int);
  if (!aw) /* on failure the state is still ours */
    doubler_drop(d);
  return aw;
}

/* ---- sleep(seconds): a task of your own, on the runtime's timers -------- */

static aiob_poll nap_poll(aiob_task *self, void *sleep) {
  return aiob_sleep_poll(self, sleep, NULL); /* READY once it is over */
}

static const aiob_task_vtable nap_vt = {
    .poll = nap_poll, .drop = free, .name = "aiobridge_guide.sleep"};

/* Starts the nap with `spawn`: aiob_py_future_into_py runs it on the
 * runtime, aiob_py_local_future_into_py on the asyncio loop's own thread. */
static PyObject *nap(PyObject *module, PyObject *seconds,
                     PyObject *(*spawn)(aiob_py_bridge *,
                                        const aiob_task_vtable *, void *,
                                        aiob_py_converter)) {
  uint64_t ns; /* inf: forever; NaN or negative: ValueError */
  if (aiob_py_duration_ns(seconds, 1e9, &ns) < 0)
    return NULL;
  aiob_sleep *s = malloc(sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  aiob_sleep_init(s, ns); /* counted from the first poll */
  PyObject *aw = spawn(bridge_of(module), &nap_vt, s, NULL);
  if (!aw)
    free(s);
  return aw;
}

static PyObject *guide_sleep(PyObject *module, PyObject *seconds) {
  return nap(module, seconds, aiob_py_future_into_py);
}

/* ---- local_sleep(seconds): the same task, loop-local -------------------- */

static PyObject *guide_local_sleep(PyObject *module, PyObject *seconds) {
  return nap(module, seconds, aiob_py_local_future_into_py);
}

/* ---- The module: multi-phase init, the bridge in its state -------------- */

static PyMethodDef guide_methods[] = {
    {"resolve", guide_resolve, METH_O, "Awaitable: the IPv4 address of host."},
    {"checksum", guide_checksum, METH_O,
     "Awaitable: FNV-1a of the bytes, computed on a worker thread."},
    {"double_of", guide_double_of, METH_O,
     "Awaitable: C awaits the coroutine and returns twice its result."},
    {"sleep", guide_sleep, METH_O, "Awaitable: None after a C timer."},
    {"local_sleep", guide_local_sleep, METH_O,
     "Awaitable: None after a C timer of the asyncio loop's own thread."},
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
