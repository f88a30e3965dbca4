/* aiobridge_demo: a C extension whose functions return awaitables backed by
 * C tasks on the aiobridge runtime. Its interface is fixed: tests and
 * benchmarks rely on it. */
#include "aiobridge/python.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

/* libuv is linked when aiobridge has its uv backend; in a build without it
 * these stay NULL, and stuck_fifo_open says so. */
#pragma weak uv_fs_open
#pragma weak uv_fs_req_cleanup

typedef struct demo_state {
  aiob_py_bridge *bridge;
} demo_state;

static demo_state *state_of(PyObject *m) {
  return (demo_state *)PyModule_GetState(m);
}

/* Converters: run on the asyncio loop thread with the GIL. */
static PyObject *conv_object(aiob_output *out) {
  PyObject *o = out->value; /* the task's reference, moved */
  out->value = NULL;
  if (!o)
    Py_RETURN_NONE;
  return o;
}

static PyObject *conv_long(aiob_output *out) {
  return PyLong_FromLong((long)(intptr_t)out->value);
}

static void free_state(void *p) { free(p); }

/* ---- ready() ----------------------------------------------------------- */

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}
static const aiob_task_vtable ready_vt = {.poll = ready_poll};

static PyObject *demo_ready(PyObject *m, PyObject *unused) {
  (void)unused;
  return aiob_py_future_into_py(state_of(m)->bridge, &ready_vt, NULL, NULL);
}

/* ---- echo(obj) --------------------------------------------------------- */

typedef struct echo_state {
  PyObject *obj;
} echo_state;

static aiob_poll echo_poll(aiob_task *t, void *p) {
  echo_state *s = p;
  aiob_task_return(t, s->obj, (void (*)(void *))aiob_py_release);
  s->obj = NULL; /* the output owns it now */
  return AIOB_READY;
}

static void echo_drop(void *p) {
  echo_state *s = p;
  aiob_py_release(s->obj);
  free(s);
}
static const aiob_task_vtable echo_vt = {.poll = echo_poll, .drop = echo_drop};

static PyObject *demo_echo(PyObject *m, PyObject *obj) {
  echo_state *s = malloc(sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(obj);
  s->obj = obj;
  PyObject *r =
      aiob_py_future_into_py(state_of(m)->bridge, &echo_vt, s, conv_object);
  if (!r) {
    Py_DECREF(obj);
    free(s);
  }
  return r;
}

/* ---- sleep_ms(ms) ------------------------------------------------------ */

typedef struct sleep_state {
  uint64_t ns;
  int armed;
  aiob_sleep sleep;
} sleep_state;

static aiob_poll sleep_poll(aiob_task *t, void *p) {
  sleep_state *s = p;
  if (!s->armed) {
    aiob_sleep_init(&s->sleep, s->ns);
    s->armed = 1;
  }
  return aiob_sleep_poll(t, &s->sleep, NULL);
}
static const aiob_task_vtable sleep_vt = {.poll = sleep_poll,
                                          .drop = free_state};

/* Starts a sleep task of `arg` milliseconds with vtable vt (sleep_vt or
 * stamp_vt). Too long to represent (inf included): sleeps forever. */
static PyObject *spawn_sleep(PyObject *m, PyObject *arg,
                             const aiob_task_vtable *vt,
                             aiob_py_converter conv) {
  uint64_t ns;
  if (aiob_py_duration_ns(arg, 1e6, &ns) < 0)
    return NULL; /* TypeError, or ValueError (negative, NaN) */
  sleep_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  s->ns = ns;
  PyObject *r = aiob_py_future_into_py(state_of(m)->bridge, vt, s, conv);
  if (!r)
    free(s);
  return r;
}

static PyObject *demo_sleep_ms(PyObject *m, PyObject *arg) {
  return spawn_sleep(m, arg, &sleep_vt, NULL);
}

/* ---- sleep_stamp_ms(ms) ------------------------------------------------ */

/* Like sleep_ms, and resolves to the CLOCK_MONOTONIC time (ns, comparable to
 * time.monotonic_ns()) at which the timer fired on the runtime thread: lets
 * a benchmark see whether runtime threads ever wait for the GIL. */
static aiob_poll stamp_poll(aiob_task *t, void *p) {
  if (sleep_poll(t, p) == AIOB_PENDING)
    return AIOB_PENDING;
  aiob_task_return(t, (void *)(uintptr_t)aiob_now_ns(), NULL);
  return AIOB_READY;
}
static const aiob_task_vtable stamp_vt = {.poll = stamp_poll,
                                          .drop = free_state};

static PyObject *conv_u64(aiob_output *out) {
  return PyLong_FromUnsignedLongLong((uintptr_t)out->value);
}

static PyObject *demo_sleep_stamp_ms(PyObject *m, PyObject *arg) {
  return spawn_sleep(m, arg, &stamp_vt, conv_u64);
}

/* ---- await_py(awaitable) and await_py_n(factory, n) -------------------- */

typedef struct await_state {
  int co;
  PyObject *obj; /* the awaitable or the factory (owned) */
  long n, i;
  aiob_py_await w;
  aiob_output out;
} await_state;

/* Finishes the task with an awaited result or error (moves it). */
static void finish_with(aiob_task *t, aiob_output *out) {
  if (out->status < 0)
    aiob_task_fail(t, out->status);
  aiob_task_return(t, out->value, out->free_value);
  out->value = NULL;
  out->free_value = NULL;
}

static aiob_poll await_one_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_await_init(&s->w, s->obj);
  AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
  finish_with(t, &s->out);
  AIOB_END(&s->co);
}

static aiob_poll await_n_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  for (s->i = 0; s->i < s->n; s->i++) {
    aiob_py_await_init_call(&s->w, s->obj);
    AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
    if (s->out.status < 0) {
      finish_with(t, &s->out);
      return AIOB_READY;
    }
    aiob_output_clear(&s->out);
  }
  aiob_task_return(t, (void *)(intptr_t)s->n, NULL);
  AIOB_END(&s->co);
}

static void await_drop(void *p) {
  await_state *s = p;
  aiob_output_clear(&s->out);
  aiob_py_release(s->obj);
  free(s);
}

static const aiob_task_vtable await_one_vt = {.poll = await_one_poll,
                                              .drop = await_drop};
static const aiob_task_vtable await_n_vt = {.poll = await_n_poll,
                                            .drop = await_drop};

static PyObject *spawn_await(PyObject *m, const aiob_task_vtable *vt,
                             PyObject *obj, long n, aiob_py_converter conv) {
  await_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(obj);
  s->obj = obj;
  s->n = n;
  PyObject *r = aiob_py_future_into_py(state_of(m)->bridge, vt, s, conv);
  if (!r) {
    Py_DECREF(obj);
    free(s);
  }
  return r;
}

static PyObject *demo_await_py(PyObject *m, PyObject *aw) {
  return spawn_await(m, &await_one_vt, aw, 1, conv_object);
}

static PyObject *demo_await_py_n(PyObject *m, PyObject *args) {
  PyObject *factory;
  long n;
  if (!PyArg_ParseTuple(args, "Ol:await_py_n", &factory, &n))
    return NULL;
  if (!PyCallable_Check(factory)) {
    PyErr_SetString(PyExc_TypeError, "await_py_n: factory must be callable");
    return NULL;
  }
  if (n < 0) {
    PyErr_SetString(PyExc_ValueError, "await_py_n: n must be >= 0");
    return NULL;
  }
  return spawn_await(m, &await_n_vt, factory, n, conv_long);
}

/* ---- fail_errno(code) -------------------------------------------------- */

static aiob_poll fail_poll(aiob_task *t, void *p) {
  aiob_task_fail(t, -(int)(intptr_t)p);
  return AIOB_READY;
}
static const aiob_task_vtable fail_vt = {.poll = fail_poll};

static PyObject *demo_fail_errno(PyObject *m, PyObject *arg) {
  long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred())
    return NULL;
  if (code <= 0 || code > 4095) {
    PyErr_SetString(PyExc_ValueError, "fail_errno: code must be in 1..4095");
    return NULL;
  }
  return aiob_py_future_into_py(state_of(m)->bridge, &fail_vt,
                                (void *)(intptr_t)code, NULL);
}

/* ---- stuck_fifo_open(path) and block_loop_on_fifo(path) ----------------
 *
 * Things that keep a loop thread from stopping, for the shutdown tests.
 * Both open(2) a FIFO for reading, which waits until a writer opens it: a
 * test that never opens it for writing has a loop thread that cannot stop.
 * Both resolve to None once a writer opened the FIFO.
 *
 * stuck_fifo_open: a native request, on the uv backend: a libuv fs open on
 * the runtime's own uv loop (aiob_runtime_native), run by libuv's
 * threadpool; the C task awaits its callback through a promise. Dropping
 * the task leaves the request in flight (libuv cannot cancel a request a
 * threadpool thread runs), and closing a uv loop runs it until every
 * request completed: the loop thread never ends. The other backends have
 * no such request (libevent has no requests; an io_uring loop cancels its
 * requests when it closes, and the kernel interrupts a blocked open), so
 * there it raises NotImplementedError.
 *
 * block_loop_on_fifo: on every backend, the C task's poll blocks in
 * open(2) on its loop thread: a callback that does not return.
 *
 * fifo_waits() counts the tasks of either kind that have got that far (the
 * request made; the poll about to call open(2)): from then on their loop
 * thread cannot stop, whatever a shutdown does. Open the FIFO with O_RDWR
 * to unstick them: a reader blocked in open(2), or one yet to come, then
 * has a writer. */

static atomic_long fifo_waits;

typedef struct fifo_state {
  char *path;
  aiob_promise *pr; /* waiter side, once the request is made */
} fifo_state;

/* A request in flight; outlives its task (freed by its callback). */
typedef struct fifo_req {
  uv_fs_t fs;
  aiob_promise *pr; /* completer side */
} fifo_req;

/* Loop thread, when the open finished (a writer came). */
static void fifo_opened(uv_fs_t *fs) {
  fifo_req *r = fs->data;
  ssize_t res = fs->result;
  uv_fs_req_cleanup(fs);
  if (res >= 0)
    close((int)res);
  aiob_promise_complete(r->pr, res < 0 ? (int)res : 0, NULL, NULL);
  free(r);
}

/* First poll: the request; then: its promise. */
static aiob_poll fifo_open_poll(aiob_task *t, void *p) {
  fifo_state *s = p;
  if (!s->pr) {
    aiob_runtime *rt = aiob_task_runtime(t);
    uv_loop_t *loop =
        aiob_runtime_native(rt, (unsigned)aiob_runtime_current_loop(rt));
    fifo_req *r = calloc(1, sizeof *r);
    if (!loop || !r || aiob_promise_new(&r->pr) < 0) {
      free(r);
      aiob_task_fail(t, loop ? AIOB_ENOMEM : AIOB_ESHUTDOWN);
      return AIOB_READY;
    }
    r->fs.data = r;
    int rc =
        uv_fs_open(loop, &r->fs, s->path, O_RDONLY | O_CLOEXEC, 0, fifo_opened);
    if (rc < 0) {
      aiob_promise_abandon(r->pr);
      aiob_promise_release(r->pr);
      free(r);
      aiob_task_fail(t, rc);
      return AIOB_READY;
    }
    s->pr = r->pr;
    atomic_fetch_add(&fifo_waits, 1);
  }
  aiob_output o;
  if (aiob_promise_poll(t, s->pr, &o) == AIOB_PENDING)
    return AIOB_PENDING;
  if (o.status < 0)
    aiob_task_fail(t, o.status);
  return AIOB_READY;
}

static aiob_poll block_on_fifo_poll(aiob_task *t, void *p) {
  fifo_state *s = p;
  int fd;
  atomic_fetch_add(&fifo_waits, 1);
  do
    fd = open(s->path, O_RDONLY | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0)
    aiob_task_fail(t, -errno);
  else
    close(fd);
  return AIOB_READY;
}

static void fifo_drop(void *p) {
  fifo_state *s = p;
  aiob_promise_release(s->pr);
  free(s->path);
  free(s);
}

static const aiob_task_vtable fifo_open_vt = {.poll = fifo_open_poll,
                                              .drop = fifo_drop};
static const aiob_task_vtable block_on_fifo_vt = {.poll = block_on_fifo_poll,
                                                  .drop = fifo_drop};

static PyObject *spawn_fifo(PyObject *m, PyObject *path,
                            const aiob_task_vtable *vt) {
  PyObject *bytes;
  if (!PyUnicode_FSConverter(path, &bytes))
    return NULL;
  fifo_state *s = calloc(1, sizeof *s);
  if (s)
    s->path = strdup(PyBytes_AS_STRING(bytes));
  Py_DECREF(bytes);
  if (!s || !s->path) {
    free(s);
    return PyErr_NoMemory();
  }
  PyObject *r = aiob_py_future_into_py(state_of(m)->bridge, vt, s, NULL);
  if (!r) {
    free(s->path);
    free(s);
  }
  return r;
}

static PyObject *demo_stuck_fifo_open(PyObject *m, PyObject *path) {
  PyObject *name = aiob_py_bridge_backend(state_of(m)->bridge);
  if (!name)
    return NULL;
  int uv = PyUnicode_CompareWithASCIIString(name, "uv") == 0;
  if (!uv || !uv_fs_open)
    PyErr_Format(PyExc_NotImplementedError,
                 "stuck_fifo_open needs the uv backend (the runtime's is %U, "
                 "libuv %s): libevent has no requests, and io_uring cancels "
                 "them when its loop closes; block_loop_on_fifo blocks any "
                 "loop",
                 name, uv_fs_open ? "linked" : "not linked");
  Py_DECREF(name);
  if (!uv || !uv_fs_open)
    return NULL;
  return spawn_fifo(m, path, &fifo_open_vt);
}

static PyObject *demo_block_loop_on_fifo(PyObject *m, PyObject *path) {
  return spawn_fifo(m, path, &block_on_fifo_vt);
}

static PyObject *demo_fifo_waits(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyLong_FromLong(atomic_load(&fifo_waits));
}

/* ---- stats() and backend() --------------------------------------------- */

static PyObject *demo_stats(PyObject *m, PyObject *unused) {
  (void)unused;
  return aiob_py_bridge_stats(state_of(m)->bridge);
}

static PyObject *demo_backend(PyObject *m, PyObject *unused) {
  (void)unused;
  return aiob_py_bridge_backend(state_of(m)->bridge);
}

static PyMethodDef demo_methods[] = {
    {"ready", demo_ready, METH_NOARGS, "Awaitable: None, on the runtime."},
    {"echo", demo_echo, METH_O, "Awaitable: the same object."},
    {"sleep_ms", demo_sleep_ms, METH_O, "Awaitable: None after ms ms."},
    {"sleep_stamp_ms", demo_sleep_stamp_ms, METH_O,
     "Awaitable: the monotonic ns at which a runtime timer of ms fired."},
    {"await_py", demo_await_py, METH_O,
     "Awaitable: a C task awaits the given awaitable."},
    {"await_py_n", demo_await_py_n, METH_VARARGS,
     "Awaitable: a C task awaits factory() n times; resolves to n."},
    {"fail_errno", demo_fail_errno, METH_O,
     "Awaitable: raises the OSError subclass for that errno."},
    {"stuck_fifo_open", demo_stuck_fifo_open, METH_O,
     "Awaitable (uv backend): a libuv fs open of the FIFO at path on the "
     "runtime's uv loop; None once a writer opened it. Until then the loop "
     "cannot close."},
    {"block_loop_on_fifo", demo_block_loop_on_fifo, METH_O,
     "Awaitable: the C task blocks its loop thread in open(2) of the FIFO "
     "at path; None once a writer opened it."},
    {"fifo_waits", demo_fifo_waits, METH_NOARGS,
     "How many stuck_fifo_open / block_loop_on_fifo tasks have made their "
     "request or are about to block (their loop thread cannot stop)."},
    {"stats", demo_stats, METH_NOARGS, "Counters of the runtime."},
    {"backend", demo_backend, METH_NOARGS, "The runtime's backend name."},
    {NULL, NULL, 0, NULL},
};

static int demo_exec(PyObject *m) {
  return aiob_py_bridge_init(m, &state_of(m)->bridge);
}

static void demo_free(void *m) {
  demo_state *s = state_of(m);
  if (s) {
    aiob_py_bridge_free(s->bridge);
    s->bridge = NULL;
  }
}

static PyModuleDef_Slot demo_slots[] = {
    {Py_mod_exec, demo_exec},
    {0, NULL},
};

static struct PyModuleDef demo_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiobridge_demo",
    .m_doc = "aiobridge demo extension: C tasks as awaitables.",
    .m_size = sizeof(demo_state),
    .m_methods = demo_methods,
    .m_slots = demo_slots,
    .m_free = demo_free,
};

/* Exported explicitly: before 3.9 PyMODINIT_FUNC does not set visibility,
 * and extensions are built with hidden symbols. */
__attribute__((visibility("default"))) PyMODINIT_FUNC
PyInit_aiobridge_demo(void);
PyMODINIT_FUNC PyInit_aiobridge_demo(void) {
  return PyModuleDef_Init(&demo_def);
}
