/* aiobridge_demo: a C extension whose functions return awaitables backed by
 * C tasks on the aiobridge runtime. Its interface is fixed: tests and
 * benchmarks rely on it. */
#include "aiobridge/python.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
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
static const aiob_task_vtable ready_vt = {.poll = ready_poll,
                                          .name = "aiobridge_demo.ready"};

/* The awaitable of a C task: on the runtime, or loop-local (`local`). */
static PyObject *into_py(PyObject *m, int local, const aiob_task_vtable *vt,
                         void *state, aiob_py_converter conv) {
  aiob_py_bridge *b = state_of(m)->bridge;
  return local ? aiob_py_local_future_into_py(b, vt, state, conv)
               : aiob_py_future_into_py(b, vt, state, conv);
}

static PyObject *demo_ready(PyObject *m, PyObject *unused) {
  (void)unused;
  return into_py(m, 0, &ready_vt, NULL, NULL);
}

static PyObject *demo_local_ready(PyObject *m, PyObject *unused) {
  (void)unused;
  return into_py(m, 1, &ready_vt, NULL, NULL);
}

/* ---- echo(obj): shape 1, an awaitable completed at once ---------------- */

static PyObject *demo_echo(PyObject *m, PyObject *obj) {
  aiob_promise *done;
  PyObject *aw = aiob_py_promise_new(state_of(m)->bridge, "aiobridge_demo.echo",
                                     conv_object, NULL, NULL, &done);
  if (aw) {
    Py_INCREF(obj); /* the promise's value, released from any thread */
    aiob_promise_complete(done, 0, obj, (void (*)(void *))aiob_py_release);
  }
  return aw;
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
static const aiob_task_vtable sleep_vt = {
    .poll = sleep_poll, .drop = free_state, .name = "aiobridge_demo.sleep_ms"};

/* Starts a sleep task of `arg` milliseconds with vtable vt (sleep_vt or
 * stamp_vt). Too long to represent (inf included): sleeps forever. */
static PyObject *spawn_sleep(PyObject *m, int local, PyObject *arg,
                             const aiob_task_vtable *vt,
                             aiob_py_converter conv) {
  uint64_t ns;
  if (aiob_py_duration_ns(arg, 1e6, &ns) < 0)
    return NULL; /* TypeError, or ValueError (negative, NaN) */
  sleep_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  s->ns = ns;
  PyObject *r = into_py(m, local, vt, s, conv);
  if (!r)
    free(s);
  return r;
}

static PyObject *demo_sleep_ms(PyObject *m, PyObject *arg) {
  return spawn_sleep(m, 0, arg, &sleep_vt, NULL);
}

static PyObject *demo_local_sleep_ms(PyObject *m, PyObject *arg) {
  return spawn_sleep(m, 1, arg, &sleep_vt, NULL);
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
                                          .drop = free_state,
                                          .name =
                                              "aiobridge_demo.sleep_stamp_ms"};

static PyObject *conv_u64(aiob_output *out) {
  return PyLong_FromUnsignedLongLong((uintptr_t)out->value);
}

static PyObject *demo_sleep_stamp_ms(PyObject *m, PyObject *arg) {
  return spawn_sleep(m, 0, arg, &stamp_vt, conv_u64);
}

/* ---- await_py(awaitable) and await_py_n(factory, n): shape 3 ----------- */

typedef struct await_state {
  int co;
  PyObject *obj; /* the awaitable or the factory (owned) */
  long n, i, ok;
  int keep_going; /* await_py_each: go on after a failed await */
  aiob_py_await w;
  aiob_output out;
} await_state;

static aiob_poll await_one_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_await_init(&s->w, s->obj);
  AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
  return aiob_task_forward(t, &s->out); /* its value, errno or exception */
  AIOB_END(&s->co);
}

static aiob_poll await_n_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  for (s->i = 0; s->i < s->n; s->i++) {
    aiob_py_await_init_call(&s->w, s->obj);
    AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
    if (s->out.status < 0 && !s->keep_going)
      return aiob_task_forward(t, &s->out);
    s->ok += s->out.status >= 0;
    aiob_output_clear(&s->out);
  }
  aiob_task_return(t, (void *)(intptr_t)s->ok, NULL);
  AIOB_END(&s->co);
}

static void await_drop(void *p) {
  await_state *s = p;
  aiob_output_clear(&s->out);
  aiob_py_release(s->obj);
  free(s);
}

static const aiob_task_vtable await_one_vt = {.poll = await_one_poll,
                                              .drop = await_drop,
                                              .name =
                                                  "aiobridge_demo.await_py"};
static const aiob_task_vtable await_n_vt = {.poll = await_n_poll,
                                            .drop = await_drop,
                                            .name =
                                                "aiobridge_demo.await_py_n"};
static const aiob_task_vtable await_each_vt = {
    .poll = await_n_poll,
    .drop = await_drop,
    .name = "aiobridge_demo.await_py_each"};

static PyObject *spawn_await(PyObject *m, int local, const aiob_task_vtable *vt,
                             PyObject *obj, long n, aiob_py_converter conv) {
  await_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(obj);
  s->obj = obj;
  s->n = n;
  s->keep_going = vt == &await_each_vt;
  PyObject *r = into_py(m, local, vt, s, conv);
  if (!r) {
    Py_DECREF(obj);
    free(s);
  }
  return r;
}

static PyObject *demo_await_py(PyObject *m, PyObject *aw) {
  return spawn_await(m, 0, &await_one_vt, aw, 1, conv_object);
}

static PyObject *demo_local_await_py(PyObject *m, PyObject *aw) {
  return spawn_await(m, 1, &await_one_vt, aw, 1, conv_object);
}

static PyObject *await_py_n(PyObject *m, int local, const aiob_task_vtable *vt,
                            PyObject *args) {
  PyObject *factory;
  long n;
  if (!PyArg_ParseTuple(args, "Ol", &factory, &n))
    return NULL;
  if (!PyCallable_Check(factory)) {
    PyErr_Format(PyExc_TypeError, "%s: factory must be callable", vt->name);
    return NULL;
  }
  if (n < 0) {
    PyErr_Format(PyExc_ValueError, "%s: n must be >= 0", vt->name);
    return NULL;
  }
  return spawn_await(m, local, vt, factory, n, conv_long);
}

static PyObject *demo_await_py_n(PyObject *m, PyObject *args) {
  return await_py_n(m, 0, &await_n_vt, args);
}

static PyObject *demo_local_await_py_n(PyObject *m, PyObject *args) {
  return await_py_n(m, 1, &await_n_vt, args);
}

static PyObject *demo_await_py_each(PyObject *m, PyObject *args) {
  return await_py_n(m, 0, &await_each_vt, args);
}

static PyObject *demo_local_await_py_each(PyObject *m, PyObject *args) {
  return await_py_n(m, 1, &await_each_vt, args);
}

/* ---- fail_errno(code), fail_status(status), fail_path(code, f1, f2) ---- */

static aiob_poll fail_poll(aiob_task *t, void *p) {
  aiob_task_fail(t, -(int)(intptr_t)p);
  return AIOB_READY;
}
static const aiob_task_vtable fail_vt = {.poll = fail_poll,
                                         .name = "aiobridge_demo.fail_errno"};

static PyObject *fail_errno(PyObject *m, int local, PyObject *arg) {
  long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred())
    return NULL;
  if (code <= 0 || code > 4095) {
    PyErr_SetString(PyExc_ValueError, "fail_errno: code must be in 1..4095");
    return NULL;
  }
  return into_py(m, local, &fail_vt, (void *)(intptr_t)code, NULL);
}

static PyObject *demo_fail_errno(PyObject *m, PyObject *arg) {
  return fail_errno(m, 0, arg);
}

static PyObject *demo_local_fail_errno(PyObject *m, PyObject *arg) {
  return fail_errno(m, 1, arg);
}

/* ---- Loop-local only: where(), read_ready(fd), local_info() ------------ */

/* local_where(): a local task notes its thread, spawns a child on the
 * runtime that returns its own, joins it: (local thread, runtime thread),
 * as threading.get_ident() gives them. */
typedef struct where_state {
  int co;
  aiob_task *child;
} where_state;

static aiob_poll note_thread_poll(aiob_task *t, void *p) {
  (void)p;
  aiob_task_return(t, (void *)(uintptr_t)pthread_self(), NULL);
  return AIOB_READY;
}
static const aiob_task_vtable note_thread_vt = {
    .poll = note_thread_poll, .name = "aiobridge_demo.note_thread"};

static aiob_poll where_poll(aiob_task *t, void *p) {
  where_state *s = p;
  int status;
  AIOB_BEGIN(&s->co);
  aiob_runtime *rt;
  int rc = aiob_runtime_default_acquire(&rt);
  if (rc == 0) {
    rc = aiob_spawn(rt, &note_thread_vt, NULL, &s->child);
    aiob_runtime_release(rt);
  }
  if (rc < 0)
    return aiob_task_fail(t, rc), AIOB_READY;
  AIOB_AWAIT(&s->co, aiob_task_join(t, s->child, &status));
  aiob_output out;
  aiob_task_take_output(s->child, &out);
  if (out.status < 0)
    return aiob_task_fail(t, out.status), AIOB_READY;
  unsigned long *pair = malloc(2 * sizeof *pair);
  if (!pair)
    return aiob_task_fail(t, AIOB_ENOMEM), AIOB_READY;
  pair[0] = (unsigned long)pthread_self();
  pair[1] = (unsigned long)(uintptr_t)out.value;
  aiob_task_return(t, pair, free);
  AIOB_END(&s->co);
}

static void where_drop(void *p) {
  where_state *s = p;
  if (s->child) {
    aiob_task_cancel(s->child);
    aiob_task_release(s->child);
  }
  free(s);
}
static const aiob_task_vtable where_vt = {.poll = where_poll,
                                          .drop = where_drop,
                                          .name = "aiobridge_demo.local_where"};

static PyObject *conv_where(aiob_output *out) {
  unsigned long *pair = out->value;
  PyObject *r = Py_BuildValue("(kk)", pair[0], pair[1]);
  aiob_output_clear(out);
  return r;
}

static PyObject *demo_local_where(PyObject *m, PyObject *unused) {
  (void)unused;
  where_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  PyObject *r = into_py(m, 1, &where_vt, s, conv_where);
  if (!r)
    free(s);
  return r;
}

/* local_read_ready(fd): a local task waits until fd is readable. */
typedef struct read_ready_state {
  int armed;
  aiob_io_wait w;
} read_ready_state;

static aiob_poll read_ready_poll(aiob_task *t, void *p) {
  read_ready_state *s = p;
  int res;
  s->armed = 1;
  if (aiob_io_wait_poll(t, &s->w, &res) == AIOB_PENDING)
    return AIOB_PENDING;
  if (res < 0)
    aiob_task_fail(t, res);
  return AIOB_READY;
}
static const aiob_task_vtable read_ready_vt = {
    .poll = read_ready_poll,
    .drop = free_state,
    .name = "aiobridge_demo.local_read_ready"};

static PyObject *demo_local_read_ready(PyObject *m, PyObject *arg) {
  int fd = PyObject_AsFileDescriptor(arg);
  if (fd < 0)
    return NULL;
  read_ready_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  aiob_io_wait_init(&s->w, fd, AIOB_READABLE);
  PyObject *r = into_py(m, 1, &read_ready_vt, s, NULL);
  if (!r)
    free(s);
  return r;
}

static PyObject *demo_local_info(PyObject *m, PyObject *unused) {
  (void)unused;
  return aiob_py_local_info(state_of(m)->bridge);
}

/* aiob_task_fail(status) with any int, right or wrong: what a buggy C task
 * may pass (0 or positive; a negative code outside the errno range). */
static aiob_poll fail_status_poll(aiob_task *t, void *p) {
  aiob_task_fail(t, (int)(intptr_t)p);
  return AIOB_READY;
}
static const aiob_task_vtable fail_status_vt = {
    .poll = fail_status_poll, .name = "aiobridge_demo.fail_status"};

static PyObject *demo_fail_status(PyObject *m, PyObject *arg) {
  int overflow;
  long status = PyLong_AsLongAndOverflow(arg, &overflow);
  if (status == -1 && PyErr_Occurred())
    return NULL;
  if (overflow || status < INT32_MIN || status > INT32_MAX) {
    PyErr_SetString(PyExc_OverflowError, "fail_status: not a C int");
    return NULL;
  }
  return aiob_py_future_into_py(state_of(m)->bridge, &fail_status_vt,
                                (void *)(intptr_t)status, NULL);
}

typedef struct path_fail {
  int err;
  char *f1, *f2;
} path_fail;

static aiob_poll fail_path_poll(aiob_task *t, void *p) {
  path_fail *f = p;
  aiob_py_task_fail_path(t, f->err, f->f1, f->f2);
  return AIOB_READY;
}

static void fail_path_drop(void *p) {
  path_fail *f = p;
  free(f->f1);
  free(f->f2);
  free(f);
}
static const aiob_task_vtable fail_path_vt = {.poll = fail_path_poll,
                                              .drop = fail_path_drop,
                                              .name =
                                                  "aiobridge_demo.fail_path"};

/* A copy of a str/bytes/PathLike file name, or NULL for None; -1 on error
 * (with an exception set). */
static int fs_copy(PyObject *o, char **out) {
  *out = NULL;
  if (o == Py_None)
    return 0;
  PyObject *b;
  if (!PyUnicode_FSConverter(o, &b))
    return -1;
  *out = strdup(PyBytes_AS_STRING(b));
  Py_DECREF(b);
  if (!*out) {
    PyErr_NoMemory();
    return -1;
  }
  return 0;
}

static PyObject *demo_fail_path(PyObject *m, PyObject *args) {
  int code;
  PyObject *o1, *o2 = Py_None;
  if (!PyArg_ParseTuple(args, "iO|O:fail_path", &code, &o1, &o2))
    return NULL;
  path_fail *f = calloc(1, sizeof *f);
  if (!f)
    return PyErr_NoMemory();
  f->err = -code;
  PyObject *r = NULL;
  if (fs_copy(o1, &f->f1) == 0 && fs_copy(o2, &f->f2) == 0)
    r = aiob_py_future_into_py(state_of(m)->bridge, &fail_path_vt, f, NULL);
  if (!r)
    fail_path_drop(f);
  return r;
}

/* ---- promise(): shape 1 driven from Python, for the tests --------------
 *
 * promise(name=None, broken_conv=False) -> (awaitable, Completer). The
 * Completer holds the completer side; its methods complete it the ways a native
 * callback would, on the calling thread or on a thread of its own that never
 * holds the GIL. on_done calls are counted (promise_cancels()): those for a
 * cancellation, how many of them came while the calling thread held the
 * GIL, and all of them. */

static atomic_long promise_dones, promise_cancels, promise_cancels_gil;

static void count_done(void *arg, int cancelled) {
  (void)arg;
  atomic_fetch_add(&promise_dones, 1);
  if (!cancelled)
    return;
  atomic_fetch_add(&promise_cancels, 1);
  if (PyGILState_Check())
    atomic_fetch_add(&promise_cancels_gil, 1);
}

typedef struct completer {
  PyObject_HEAD aiob_promise *p; /* completer side, NULL once given up */
} completer;

static PyTypeObject *completer_type; /* set by demo_exec */

/* The completer side, given up by the caller (NULL: ValueError set). */
static aiob_promise *take_side(completer *c) {
  aiob_promise *p = c->p;
  c->p = NULL;
  if (!p)
    PyErr_SetString(PyExc_ValueError, "the promise was already completed");
  return p;
}

static PyObject *completer_complete(PyObject *self, PyObject *value) {
  aiob_promise *p = take_side((completer *)self);
  if (!p)
    return NULL;
  Py_INCREF(value);
  return PyLong_FromLong(
      aiob_promise_complete(p, 0, value, (void (*)(void *))aiob_py_release));
}

static PyObject *completer_fail(PyObject *self, PyObject *args) {
  int code;
  PyObject *o1 = Py_None, *o2 = Py_None;
  char *f1 = NULL, *f2 = NULL;
  if (!PyArg_ParseTuple(args, "i|OO:fail", &code, &o1, &o2) ||
      fs_copy(o1, &f1) < 0 || fs_copy(o2, &f2) < 0) {
    free(f1);
    return NULL;
  }
  if (code <= 0 || code > 4095) { /* checked before the side is given up */
    free(f1);
    free(f2);
    PyErr_SetString(PyExc_ValueError, "fail: errno must be in 1..4095");
    return NULL;
  }
  aiob_promise *p = take_side((completer *)self);
  int rc = p ? aiob_py_promise_fail_path(p, -code, f1, f2) : 0;
  free(f1);
  free(f2);
  return p ? PyLong_FromLong(rc) : NULL;
}

/* raise_value_error(msg): msg a str, or bytes passed to C as they are (not
 * always UTF-8, as localized C messages are not). */
static PyObject *completer_raise(PyObject *self, PyObject *msg) {
  const char *s =
      PyBytes_Check(msg) ? PyBytes_AsString(msg) : PyUnicode_AsUTF8(msg);
  aiob_promise *p = s ? take_side((completer *)self) : NULL;
  return p ? PyLong_FromLong(aiob_py_promise_raise(p, PyExc_ValueError, s))
           : NULL;
}

/* complete_with_status(status, obj): any status with a Python value, right
 * or wrong, as a buggy producer may complete it. */
static PyObject *completer_complete_with_status(PyObject *self,
                                                PyObject *args) {
  int status;
  PyObject *obj;
  if (!PyArg_ParseTuple(args, "iO:complete_with_status", &status, &obj))
    return NULL;
  aiob_promise *p = take_side((completer *)self);
  if (!p)
    return NULL;
  Py_INCREF(obj);
  return PyLong_FromLong(
      aiob_promise_complete(p, status, obj, (void (*)(void *))aiob_py_release));
}

static PyObject *completer_abandon(PyObject *self, PyObject *unused) {
  (void)unused;
  aiob_promise *p = take_side((completer *)self);
  return p ? PyLong_FromLong(aiob_promise_abandon(p)) : NULL;
}

/* complete_in_thread(n): completes with the int n from a new thread that
 * never holds the GIL; returns once that thread completed it. */
typedef struct thread_completion {
  aiob_promise *p;
  long n;
  int rc;
} thread_completion;

static void *complete_off_gil(void *arg) {
  thread_completion *tc = arg;
  tc->rc = aiob_promise_complete(tc->p, 0, (void *)(intptr_t)tc->n, NULL);
  return NULL;
}

static PyObject *completer_complete_in_thread(PyObject *self, PyObject *arg) {
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred())
    return NULL;
  thread_completion tc = {take_side((completer *)self), n, 0};
  if (!tc.p)
    return NULL;
  pthread_t th;
  int err;
  Py_BEGIN_ALLOW_THREADS;
  err = pthread_create(&th, NULL, complete_off_gil, &tc);
  if (!err)
    pthread_join(th, NULL);
  Py_END_ALLOW_THREADS;
  if (err) {
    aiob_promise_abandon(tc.p);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  return PyLong_FromLong(tc.rc);
}

/* A Completer collected without completing abandons the promise. */
static void completer_dealloc(PyObject *self) {
  completer *c = (completer *)self;
  if (c->p)
    aiob_promise_abandon(c->p);
  PyTypeObject *tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyMethodDef completer_methods[] = {
    {"complete", completer_complete, METH_O,
     "Complete with a Python value; returns the C return code."},
    {"complete_in_thread", completer_complete_in_thread, METH_O,
     "Complete with an int from a thread without the GIL."},
    {"fail", completer_fail, METH_VARARGS,
     "fail(errno, filename=None, filename2=None): an OSError."},
    {"raise_value_error", completer_raise, METH_O, "Raise ValueError(msg)."},
    {"abandon", completer_abandon, METH_NOARGS, "Give up: CancelledError."},
    {"complete_with_status", completer_complete_with_status, METH_VARARGS,
     "Complete with any status and a Python value."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot completer_slots[] = {
    {Py_tp_dealloc, completer_dealloc},
    {Py_tp_methods, completer_methods},
    {0, NULL},
};

static PyType_Spec completer_spec = {
    .name = "aiobridge_demo.Completer",
    .basicsize = sizeof(completer),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = completer_slots,
};

/* Values completed with complete_in_thread are C ints. */
static PyObject *conv_value(aiob_output *out) {
  if (out->free_value) /* a Python object from complete() */
    return conv_object(out);
  return conv_long(out);
}

/* A converter that breaks its contract: NULL without an exception. */
static PyObject *conv_broken(aiob_output *out) {
  aiob_output_clear(out);
  return NULL;
}

/* promise(name=None, broken_conv=False): name a str or bytes (any bytes: a
 * C name need not be UTF-8). */
static PyObject *demo_promise(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"name", "broken_conv", NULL};
  PyObject *name_obj = Py_None;
  int broken = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|Op:promise", kwlist, &name_obj,
                                   &broken))
    return NULL;
  const char *name = NULL;
  if (name_obj != Py_None) { /* names are static storage: kept forever */
    static PyObject *names;
    PyObject *b = PyUnicode_Check(name_obj) ? PyUnicode_AsUTF8String(name_obj)
                                            : PyBytes_FromObject(name_obj),
             *kept = NULL;
    if (b && (names || (names = PyDict_New())))
      kept = PyDict_SetDefault(names, b, b); /* borrowed, lives in names */
    Py_XDECREF(b);
    if (!kept)
      return NULL;
    name = PyBytes_AS_STRING(kept);
  }
  completer *c = PyObject_New(completer, completer_type);
  if (!c)
    return NULL;
  c->p = NULL;
  PyObject *aw = aiob_py_promise_new(state_of(m)->bridge, name,
                                     broken ? conv_broken : conv_value,
                                     count_done, NULL, &c->p);
  if (!aw) {
    Py_DECREF(c);
    return NULL;
  }
  return Py_BuildValue("(NN)", aw, (PyObject *)c);
}

static PyObject *demo_promise_cancels(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return Py_BuildValue("(lll)", atomic_load(&promise_cancels),
                       atomic_load(&promise_cancels_gil),
                       atomic_load(&promise_dones));
}

/* ---- blocking work: shape 2 ------------------------------------------ */

static atomic_long blocking_runs;

/* Worker thread: reads one byte from the fd; resolves to it. */
static int read_byte(void *arg, aiob_output *out) {
  atomic_fetch_add(&blocking_runs, 1);
  unsigned char c;
  ssize_t n;
  do
    n = read((int)(intptr_t)arg, &c, 1);
  while (n < 0 && errno == EINTR);
  if (n < 0)
    return -errno;
  out->value = (void *)(intptr_t)(n == 1 ? c : -1);
  return 0;
}

static PyObject *demo_blocking_read(PyObject *m, PyObject *arg) {
  int fd = PyObject_AsFileDescriptor(arg);
  if (fd < 0)
    return NULL;
  return aiob_py_run_blocking(state_of(m)->bridge,
                              "aiobridge_demo.blocking_read", read_byte,
                              (void *)(intptr_t)fd, NULL, conv_long);
}

/* Worker thread: sum of 0..n-1, stopping early once cancelled. */
static int sum_below(void *arg, aiob_output *out) {
  atomic_fetch_add(&blocking_runs, 1);
  uint64_t n = *(uint64_t *)arg, sum = 0;
  for (uint64_t i = 0; i < n; i++) {
    sum += i;
    if ((i & 0xfffff) == 0 && aiob_blocking_cancelled())
      return AIOB_ECANCELED;
  }
  out->value = (void *)(uintptr_t)sum;
  return 0;
}

static PyObject *demo_blocking_sum(PyObject *m, PyObject *arg) {
  uint64_t *n = malloc(sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  *n = PyLong_AsUnsignedLongLong(arg);
  if (*n == (uint64_t)-1 && PyErr_Occurred()) {
    free(n);
    return NULL;
  }
  return aiob_py_run_blocking(state_of(m)->bridge,
                              "aiobridge_demo.blocking_sum", sum_below, n, free,
                              conv_u64);
}

static PyObject *demo_blocking_runs(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyLong_FromLong(atomic_load(&blocking_runs));
}

/* ---- Streams: a C producer as an async iterator ----------------------- */

static atomic_long stream_drops, box_allocs, box_frees;

typedef struct range_state {
  long i, n;
  int err;       /* > 0: fail with this errno after n items */
  int boxed;     /* items are malloc'd longs (freed with box_free) */
  long stall_at; /* >= 0: after this many items, wait until cancelled */
  long *box;     /* a boxed item not sent yet */
} range_state;

static void box_free(void *p) {
  atomic_fetch_add(&box_frees, 1);
  free(p);
}

/* Sends i..n-1 (as C longs, or boxed), then ends, or fails with err. */
static aiob_poll range_poll(aiob_task *t, void *p) {
  range_state *r = p;
  aiob_py_stream *s = aiob_py_stream_of(t);
  for (; r->i < r->n; r->i++) {
    if (r->i == r->stall_at)
      return AIOB_PENDING; /* nothing will wake it: only a cancel ends it */
    void *v = (void *)(intptr_t)r->i;
    if (r->boxed) {
      if (!r->box && (r->box = malloc(sizeof *r->box)))
        atomic_fetch_add(&box_allocs, 1);
      if (!r->box)
        return aiob_task_fail(t, AIOB_ENOMEM), AIOB_READY;
      *r->box = r->i;
      v = r->box;
    }
    int st;
    if (aiob_py_stream_send(t, s, v, r->boxed ? box_free : NULL, &st) ==
        AIOB_PENDING)
      return AIOB_PENDING; /* full: woken when the consumer takes one */
    if (st < 0)
      return AIOB_READY; /* the consumer is gone: the box is still ours */
    r->box = NULL;       /* the stream's now */
  }
  if (r->err)
    aiob_task_fail(t, -r->err);
  return AIOB_READY;
}

static void range_drop(void *p) {
  range_state *r = p;
  atomic_fetch_add(&stream_drops, 1);
  if (r->box)
    box_free(r->box);
  free(r);
}

static const aiob_task_vtable range_vt = {.poll = range_poll,
                                          .drop = range_drop,
                                          .name =
                                              "aiobridge_demo.stream_range"};

static PyObject *conv_box(aiob_output *out) {
  PyObject *v = PyLong_FromLong(*(long *)out->value);
  aiob_output_clear(out); /* box_free */
  return v;
}

static PyObject *spawn_range(PyObject *m, long n, long buffer, int err,
                             int boxed, long stall_at) {
  if (n < 0 || buffer < 1) {
    PyErr_SetString(PyExc_ValueError, "n must be >= 0 and buffer >= 1");
    return NULL;
  }
  range_state *r = calloc(1, sizeof *r);
  if (!r)
    return PyErr_NoMemory();
  r->n = n;
  r->err = err;
  r->boxed = boxed;
  r->stall_at = stall_at;
  PyObject *it = aiob_py_stream_new(state_of(m)->bridge, NULL, (size_t)buffer,
                                    boxed ? conv_box : conv_long, &range_vt, r);
  if (!it)
    free(r);
  return it;
}

/* stream_range(n, buffer=16, boxed=False, stall_at=-1): an async iterator
 * of 0..n-1; stall_at >= 0: the producer stops sending after that many
 * items and waits until cancelled. */
static PyObject *demo_stream_range(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"n", "buffer", "boxed", "stall_at", NULL};
  long n, buffer = 16, stall_at = -1;
  int boxed = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "l|lpl:stream_range", kwlist, &n,
                                   &buffer, &boxed, &stall_at))
    return NULL;
  return spawn_range(m, n, buffer, 0, boxed, stall_at);
}

/* stream_fail_after(n, errno, buffer=16): 0..n-1, then that OSError. */
static PyObject *demo_stream_fail_after(PyObject *m, PyObject *args,
                                        PyObject *kw) {
  static char *kwlist[] = {"n", "errno", "buffer", NULL};
  long n, buffer = 16;
  int err;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "li|l:stream_fail_after", kwlist,
                                   &n, &err, &buffer))
    return NULL;
  if (err <= 0 || err > 4095) {
    PyErr_SetString(PyExc_ValueError, "errno must be in 1..4095");
    return NULL;
  }
  return spawn_range(m, n, buffer, err, 0, -1);
}

/* (producer drops, boxed items allocated, boxed items freed) */
static PyObject *demo_stream_counts(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return Py_BuildValue("(lll)", atomic_load(&stream_drops),
                       atomic_load(&box_allocs), atomic_load(&box_frees));
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

/* ---- Streams: a Python async iterator consumed by C ------------------- */

/* sum_agen(aiterable, window=16): a C task takes the items of any async
 * iterable (ints) and resolves to their sum. take_agen(aiterable, n,
 * window=16, close=True): the sum of the first n items only; close=False
 * leaves the closing of the iterator to the task's end. collect_agen(
 * aiterable, window=16): the items as the C task received them (PyObject
 * references, no converter), as a list. agen_counts(): (items those tasks
 * took, their drops). */

static atomic_long agen_taken, agen_drops;

typedef struct agen_sum {
  int co;
  PyObject *aiterable; /* owned */
  aiob_py_aiter items; /* the leaf future that pulls them */
  aiob_output item;
  size_t window;
  long limit; /* items to take, or -1: all */
  long taken, sum;
  int close_early;
} agen_sum;

/* Runs on the asyncio loop thread with the GIL: Python int -> C long. */
static int item_to_long(PyObject *item, aiob_output *out) {
  long v = PyLong_AsLong(item);
  if (v == -1 && PyErr_Occurred())
    return -1; /* the C task receives the exception, after the items before */
  out->value = (void *)(intptr_t)v;
  return 0;
}

static aiob_poll agen_sum_poll(aiob_task *self, void *p) {
  agen_sum *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_aiter_init(&s->items, s->aiterable, s->window, item_to_long);
  while (s->limit < 0 || s->taken < s->limit) {
    AIOB_AWAIT(&s->co, aiob_py_aiter_next(self, &s->items, &s->item));
    if (s->item.status == AIOB_PY_STREAM_END)
      break;
    if (s->item.status < 0) /* raised, or cancelled: pass it on as it is */
      return aiob_task_forward(self, &s->item);
    s->sum += (long)(intptr_t)s->item.value; /* plain C: no GIL */
    s->taken++;
    atomic_fetch_add(&agen_taken, 1);
  }
  if (s->close_early) /* the generator's finally runs now, not at our end */
    aiob_py_aiter_close(&s->items);
  aiob_task_return(self, (void *)(intptr_t)s->sum, NULL);
  AIOB_END(&s->co);
}

static void agen_sum_drop(void *p) {
  agen_sum *s = p;
  atomic_fetch_add(&agen_drops, 1);
  aiob_py_aiter_close(&s->items); /* a no-op once closed */
  aiob_py_release(s->aiterable);  /* any thread: deferred if no GIL */
  free(s);
}

static const aiob_task_vtable agen_sum_vt = {.poll = agen_sum_poll,
                                             .drop = agen_sum_drop,
                                             .name = "aiobridge_demo.sum_agen"};
static const aiob_task_vtable agen_take_vt = {.poll = agen_sum_poll,
                                              .drop = agen_sum_drop,
                                              .name =
                                                  "aiobridge_demo.take_agen"};

static PyObject *spawn_agen_sum(PyObject *m, const aiob_task_vtable *vt,
                                PyObject *aiterable, Py_ssize_t window,
                                long limit, int close_early) {
  if (window < 1 || (vt == &agen_take_vt && limit < 0)) {
    PyErr_SetString(PyExc_ValueError, "window must be >= 1 and n >= 0");
    return NULL;
  }
  agen_sum *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(aiterable);
  s->aiterable = aiterable;
  s->window = (size_t)window;
  s->limit = limit;
  s->close_early = close_early;
  PyObject *aw = aiob_py_future_into_py(state_of(m)->bridge, vt, s, conv_long);
  if (!aw) /* on failure the state is still ours */
    agen_sum_drop(s);
  return aw;
}

static PyObject *demo_sum_agen(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"aiterable", "window", NULL};
  PyObject *aiterable;
  Py_ssize_t window = 16;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "O|n:sum_agen", kwlist, &aiterable,
                                   &window))
    return NULL;
  return spawn_agen_sum(m, &agen_sum_vt, aiterable, window, -1, 0);
}

/* The items a collect_agen task received, in order: PyObject references
 * (released from any thread by their free_value). */
typedef struct agen_items {
  size_t n, cap;
  aiob_output *v;
} agen_items;

static void agen_items_free(void *p) {
  agen_items *l = p;
  for (size_t i = 0; l && i < l->n; i++)
    aiob_output_clear(&l->v[i]);
  if (l)
    free(l->v);
  free(l);
}

typedef struct agen_list {
  int co;
  PyObject *aiterable; /* owned */
  aiob_py_aiter items;
  aiob_output item;
  size_t window;
  agen_items *got;
} agen_list;

static aiob_poll agen_list_poll(aiob_task *self, void *p) {
  agen_list *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_aiter_init(&s->items, s->aiterable, s->window, NULL);
  for (;;) {
    AIOB_AWAIT(&s->co, aiob_py_aiter_next(self, &s->items, &s->item));
    if (s->item.status == AIOB_PY_STREAM_END)
      break;
    if (s->item.status < 0)
      return aiob_task_forward(self, &s->item);
    agen_items *l = s->got;
    if (l->n == l->cap) {
      size_t cap = l->cap ? 2 * l->cap : 64;
      aiob_output *v = realloc(l->v, cap * sizeof *v);
      if (!v) {
        aiob_output_clear(&s->item);
        aiob_task_fail(self, AIOB_ENOMEM);
        return AIOB_READY;
      }
      l->v = v;
      l->cap = cap;
    }
    l->v[l->n++] = s->item;
  }
  aiob_task_return(self, s->got, agen_items_free);
  s->got = NULL; /* the task's output now */
  AIOB_END(&s->co);
}

static void agen_list_drop(void *p) {
  agen_list *s = p;
  aiob_py_aiter_close(&s->items);
  agen_items_free(s->got);
  aiob_py_release(s->aiterable);
  free(s);
}

static const aiob_task_vtable agen_list_vt = {
    .poll = agen_list_poll,
    .drop = agen_list_drop,
    .name = "aiobridge_demo.collect_agen"};

/* The loop thread, with the GIL: the received items as a list. */
static PyObject *conv_items(aiob_output *out) {
  agen_items *l = out->value;
  PyObject *list = PyList_New(l ? (Py_ssize_t)l->n : 0);
  for (size_t i = 0; list && l && i < l->n; i++) {
    PyList_SET_ITEM(list, (Py_ssize_t)i, (PyObject *)l->v[i].value);
    l->v[i].value = NULL; /* moved into the list */
  }
  aiob_output_clear(out);
  return list;
}

static PyObject *demo_collect_agen(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"aiterable", "window", NULL};
  PyObject *aiterable;
  Py_ssize_t window = 16;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "O|n:collect_agen", kwlist,
                                   &aiterable, &window))
    return NULL;
  if (window < 1) {
    PyErr_SetString(PyExc_ValueError, "window must be >= 1");
    return NULL;
  }
  agen_list *s = calloc(1, sizeof *s);
  if (s)
    s->got = calloc(1, sizeof *s->got);
  if (!s || !s->got) {
    free(s);
    return PyErr_NoMemory();
  }
  Py_INCREF(aiterable);
  s->aiterable = aiterable;
  s->window = (size_t)window;
  PyObject *aw =
      aiob_py_future_into_py(state_of(m)->bridge, &agen_list_vt, s, conv_items);
  if (!aw)
    agen_list_drop(s);
  return aw;
}

static PyObject *demo_agen_counts(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return Py_BuildValue("(ll)", atomic_load(&agen_taken),
                       atomic_load(&agen_drops));
}

static PyObject *demo_take_agen(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"aiterable", "n", "window", "close", NULL};
  PyObject *aiterable;
  long n;
  Py_ssize_t window = 16;
  int close_early = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "Ol|np:take_agen", kwlist,
                                   &aiterable, &n, &window, &close_early))
    return NULL;
  return spawn_agen_sum(m, &agen_take_vt, aiterable, window, n, close_early);
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
    {"local_ready", demo_local_ready, METH_NOARGS,
     "Awaitable: None, loop-local (done at once)."},
    {"local_sleep_ms", demo_local_sleep_ms, METH_O,
     "Awaitable: None after ms ms, loop-local."},
    {"local_await_py", demo_local_await_py, METH_O,
     "Awaitable: what awaiting the awaitable gives, from a loop-local task."},
    {"local_await_py_n", demo_local_await_py_n, METH_VARARGS,
     "Awaitable: n, after a loop-local task awaited factory() n times."},
    {"local_fail_errno", demo_local_fail_errno, METH_O,
     "Awaitable: a loop-local task failing with -code."},
    {"local_where", demo_local_where, METH_NOARGS,
     "Awaitable: (thread of a loop-local task, thread of the runtime child "
     "it joined)."},
    {"local_read_ready", demo_local_read_ready, METH_O,
     "Awaitable: None once fd is readable, loop-local."},
    {"local_info", demo_local_info, METH_NOARGS,
     "How the running loop runs loop-local tasks (aiob_py_local_info)."},
    {"echo", demo_echo, METH_O, "Awaitable: the same object."},
    {"sleep_ms", demo_sleep_ms, METH_O, "Awaitable: None after ms ms."},
    {"sleep_stamp_ms", demo_sleep_stamp_ms, METH_O,
     "Awaitable: the monotonic ns at which a runtime timer of ms fired."},
    {"await_py", demo_await_py, METH_O,
     "Awaitable: a C task awaits the given awaitable."},
    {"await_py_n", demo_await_py_n, METH_VARARGS,
     "Awaitable: a C task awaits factory() n times; resolves to n."},
    {"await_py_each", demo_await_py_each, METH_VARARGS,
     "Awaitable: a C task awaits factory() n times, going on after "
     "failures; resolves to the number that succeeded."},
    {"local_await_py_each", demo_local_await_py_each, METH_VARARGS,
     "Awaitable: await_py_each from a loop-local task."},
    {"fail_errno", demo_fail_errno, METH_O,
     "Awaitable: raises the OSError subclass for that errno."},
    {"fail_status", demo_fail_status, METH_O,
     "Awaitable: a C task calls aiob_task_fail with this status."},
    {"fail_path", demo_fail_path, METH_VARARGS,
     "fail_path(errno, filename, filename2=None): the OSError with them."},
    {"promise", (PyCFunction)(void (*)(void))demo_promise,
     METH_VARARGS | METH_KEYWORDS,
     "promise(name=None, broken_conv=False) -> (awaitable, Completer)."},
    {"promise_cancels", demo_promise_cancels, METH_NOARGS,
     "(on_done calls for a cancellation, of which with the GIL held, "
     "on_done calls in all)."},
    {"blocking_read", demo_blocking_read, METH_O,
     "Awaitable: a worker thread reads one byte from the fd."},
    {"blocking_sum", demo_blocking_sum, METH_O,
     "Awaitable: a worker thread sums 0..n-1."},
    {"blocking_runs", demo_blocking_runs, METH_NOARGS,
     "How many blocking functions have started."},
    {"stream_range", (PyCFunction)(void (*)(void))demo_stream_range,
     METH_VARARGS | METH_KEYWORDS,
     "stream_range(n, buffer=16, boxed=False, stall_at=-1): async iterator "
     "of 0..n-1 sent by a C task."},
    {"stream_fail_after", (PyCFunction)(void (*)(void))demo_stream_fail_after,
     METH_VARARGS | METH_KEYWORDS,
     "stream_fail_after(n, errno, buffer=16): 0..n-1, then that OSError."},
    {"stream_counts", demo_stream_counts, METH_NOARGS,
     "(producer drops, boxed items made, boxed items freed)."},
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
    {"sum_agen", (PyCFunction)(void (*)(void))demo_sum_agen,
     METH_VARARGS | METH_KEYWORDS,
     "sum_agen(aiterable, window=16): awaitable: a C task sums the ints of "
     "the async iterable."},
    {"take_agen", (PyCFunction)(void (*)(void))demo_take_agen,
     METH_VARARGS | METH_KEYWORDS,
     "take_agen(aiterable, n, window=16, close=True): awaitable: the sum of "
     "the first n items; close: the C task closes the iterator before it "
     "ends."},
    {"collect_agen", (PyCFunction)(void (*)(void))demo_collect_agen,
     METH_VARARGS | METH_KEYWORDS,
     "collect_agen(aiterable, window=16): awaitable: the items, as a list, "
     "in the order a C task received them."},
    {"agen_counts", demo_agen_counts, METH_NOARGS,
     "(items taken by sum_agen / take_agen tasks, their drops)."},
    {NULL, NULL, 0, NULL},
};

static int demo_exec(PyObject *m) {
  if (!completer_type &&
      !(completer_type = (PyTypeObject *)PyType_FromSpec(&completer_spec)))
    return -1;
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
