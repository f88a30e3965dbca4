/* The asyncio bridge's C API, used directly as a C extension author would.
 *
 * This program embeds CPython, builds an extension-like module `bcapi`
 * (registered with PyImport_AppendInittab, so `import bcapi` runs its
 * PyInit, which calls aiob_py_bridge_init) whose functions wrap the calls of
 * include/aiobridge/python.h, and drives asyncio from C by running Python
 * snippets (asyncio.run(...)) that call them. The bridge and the core are
 * compiled in, like an extension built with aiob_add_python_extension.
 *
 *   AIOBRIDGE_BACKEND=<backend> PYTHONPATH=<build>/python/cp311 bridge_capi
 *
 * The bridge imports the `aiobridge` module at init: PYTHONPATH must lead
 * to it. A backend refused at run time (e.g. a kernel without io_uring) is
 * a skip (exit 77).
 *
 * Rules: cmocka asserts run on the test thread only, never inside a C
 * function called from Python nor on runtime or helper threads (those record
 * failures with CHECK); every wait is bounded (asyncio.wait_for, joins and
 * task waits with timeouts); blocking C waits release the GIL. The asyncio
 * loops run on the test thread (asyncio.run inside PyRun_String), so "the
 * loop thread" below is the test thread.
 */
#include "aiobridge/python.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "harness.h"

/* ---- Shared state ------------------------------------------------------ */

static aiob_py_bridge *g_bridge;
static pthread_t g_loop_thread; /* the test thread, which runs the loops */
static const char *g_backend;   /* AIOBRIDGE_BACKEND, or NULL */

static atomic_int g_conv_calls; /* aiob_py_converter calls */
static atomic_int g_frees;      /* free_counted calls */
static latch g_started;         /* value tasks polled */

/* test 5 (locals inside a poll) */
static atomic_int g_probe_polls, g_probe_gil, g_probe_current,
    g_probe_has_locals, g_probe_same;
static atomic_uintptr_t g_probe_loop;

/* test 6 (child inherits locals) */
static atomic_uintptr_t g_parent_locals, g_child_locals;
static atomic_int g_child_polls;

/* test 7 (await converters): status and value seen by each awaiting task */
#define CONV_SLOTS 4
static atomic_int g_conv_n;
static atomic_int g_conv_status[CONV_SLOTS];
static atomic_long g_conv_value[CONV_SLOTS];
static atomic_int g_rconv_calls;

/* test 9 (plain task) */
static atomic_int g_plain_polls, g_plain_had_locals;

static void reset_state(void) {
  reset_checks();
  atomic_store(&g_conv_calls, 0);
  atomic_store(&g_frees, 0);
  latch_destroy(&g_started);
  latch_init(&g_started);
  atomic_store(&g_probe_polls, 0);
  atomic_store(&g_probe_gil, -1);
  atomic_store(&g_probe_current, 0);
  atomic_store(&g_probe_has_locals, 0);
  atomic_store(&g_probe_same, 0);
  atomic_store(&g_probe_loop, 0);
  atomic_store(&g_parent_locals, 0);
  atomic_store(&g_child_locals, 0);
  atomic_store(&g_child_polls, 0);
  atomic_store(&g_conv_n, 0);
  for (int i = 0; i < CONV_SLOTS; i++) {
    atomic_store(&g_conv_status[i], 1);
    atomic_store(&g_conv_value[i], -1);
  }
  atomic_store(&g_rconv_calls, 0);
  atomic_store(&g_plain_polls, 0);
  atomic_store(&g_plain_had_locals, -1);
}

/* Converters are documented to run on the loop thread with the GIL: a
 * thread that holds the GIL and runs an asyncio loop right now (the test
 * thread, or the Python threads of test 12). */
static int on_loop_thread_with_gil(void) {
  if (!PyGILState_Check())
    return 0;
  PyObject *events = PyImport_ImportModule("asyncio.events");
  PyObject *loop =
      events ? PyObject_CallMethod(events, "_get_running_loop", NULL) : NULL;
  int ok = loop && loop != Py_None;
  Py_XDECREF(loop);
  Py_XDECREF(events);
  PyErr_Clear();
  return ok;
}

/* Runtime threads never hold the GIL. */
static int on_runtime_thread(void) {
  return !pthread_equal(pthread_self(), g_loop_thread) && !PyGILState_Check();
}

static void free_counted(void *p) {
  atomic_fetch_add(&g_frees, 1);
  free(p);
}

/* Finishes the task with an awaited output (moved). */
static void finish_with(aiob_task *t, aiob_output *out) {
  if (out->status < 0)
    aiob_task_fail(t, out->status);
  aiob_task_return(t, out->value, out->free_value);
  out->value = NULL;
  out->free_value = NULL;
}

/* ---- Future converters (loop thread, GIL) ------------------------------ */

static PyObject *conv_long(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  atomic_fetch_add(&g_conv_calls, 1);
  return PyLong_FromLong((long)(intptr_t)out->value);
}

/* The task's PyObject reference, moved. */
static PyObject *conv_object(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  atomic_fetch_add(&g_conv_calls, 1);
  PyObject *o = out->value;
  out->value = NULL;
  if (!o)
    Py_RETURN_NONE;
  return o;
}

/* Fails; owns out->value, so frees it. */
static PyObject *conv_fail(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  atomic_fetch_add(&g_conv_calls, 1);
  aiob_output_clear(out);
  PyErr_SetString(PyExc_OverflowError, "conv failed");
  return NULL;
}

/* ---- Tasks ------------------------------------------------------------- */

/* value: returns its state pointer as an integer. */
static aiob_poll value_poll(aiob_task *t, void *p) {
  CHECK(on_runtime_thread());
  latch_add(&g_started, 1);
  aiob_task_return(t, p, NULL);
  return AIOB_READY;
}
static const aiob_task_vtable value_vt = {.poll = value_poll};

/* none: returns a heap value that only free_counted releases. */
static aiob_poll none_poll(aiob_task *t, void *p) {
  (void)p;
  int *v = malloc(sizeof *v);
  CHECK(v != NULL);
  aiob_task_return(t, v, free_counted);
  return AIOB_READY;
}
static const aiob_task_vtable none_vt = {.poll = none_poll};

/* fail: fails with the negative code in its state pointer. */
static aiob_poll fail_poll(aiob_task *t, void *p) {
  aiob_task_fail(t, (int)(intptr_t)p);
  return AIOB_READY;
}
static const aiob_task_vtable fail_vt = {.poll = fail_poll};

/* raise: ValueError("bad thing"). */
static aiob_poll raise_poll(aiob_task *t, void *p) {
  (void)p;
  CHECK_INT(aiob_py_task_raise(t, PyExc_ValueError, "bad thing"), ==, 0);
  return AIOB_READY;
}
static const aiob_task_vtable raise_vt = {.poll = raise_poll};

/* probe: the task's locals seen from inside its poll (runtime thread, no
 * GIL). aiob_py_get_current_locals is only called when the task has
 * locals: otherwise it would fall back to Python without the GIL. */
static aiob_poll probe_poll(aiob_task *t, void *p) {
  (void)p;
  atomic_fetch_add(&g_probe_polls, 1);
  atomic_store(&g_probe_gil, PyGILState_Check());
  atomic_store(&g_probe_current, aiob_task_current() == t);
  aiob_py_locals *l1 = aiob_py_task_locals(t);
  if (l1) {
    atomic_store(&g_probe_has_locals, 1);
    aiob_py_locals *l2 = aiob_py_get_current_locals(g_bridge);
    atomic_store(&g_probe_same, l2 == l1);
    atomic_store(&g_probe_loop, (uintptr_t)aiob_py_locals_loop(l1));
    aiob_py_locals_release(l2);
    aiob_py_locals_release(l1);
  }
  return AIOB_READY;
}
static const aiob_task_vtable probe_vt = {.poll = probe_poll};

/* await_one: awaits obj (owned) with the task's own locals, or with
 * `locals` (owned) when set; finishes with the awaited output. The
 * converter, when set, is given to the await. */
typedef struct await_state {
  int co;
  PyObject *obj;
  aiob_py_locals *locals;
  aiob_py_result_converter rconv;
  aiob_py_await w;
  aiob_output out;
} await_state;

static aiob_poll await_one_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_await_init(&s->w, s->obj);
  if (s->locals)
    aiob_py_await_set_locals(&s->w, s->locals);
  if (s->rconv)
    aiob_py_await_set_converter(&s->w, s->rconv);
  AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
  finish_with(t, &s->out);
  AIOB_END(&s->co);
}

static void await_drop(void *p) {
  await_state *s = p;
  aiob_output_clear(&s->out);
  aiob_py_release(s->obj);
  aiob_py_locals_release(s->locals);
  free(s);
}
static const aiob_task_vtable await_one_vt = {.poll = await_one_poll,
                                              .drop = await_drop};

/* The awaited converter: an int becomes the C long int + 1; anything else
 * is a ValueError. */
static int rconv_plus_one(PyObject *result, aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  atomic_fetch_add(&g_rconv_calls, 1);
  if (!PyLong_Check(result)) {
    PyErr_SetString(PyExc_ValueError, "not an int");
    return -1;
  }
  long v = PyLong_AsLong(result);
  if (v == -1 && PyErr_Occurred())
    return -1;
  out->value = (void *)(intptr_t)(v + 1);
  out->free_value = NULL;
  return 0;
}

/* Records the awaited output, then finishes with it. */
static aiob_poll await_record_poll(aiob_task *t, void *p) {
  await_state *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_await_init(&s->w, s->obj);
  aiob_py_await_set_converter(&s->w, rconv_plus_one);
  AIOB_AWAIT(&s->co, aiob_py_await_poll(t, &s->w, &s->out));
  {
    int i = atomic_fetch_add(&g_conv_n, 1);
    if (i < CONV_SLOTS) {
      atomic_store(&g_conv_status[i], s->out.status);
      if (s->out.status == 0)
        atomic_store(&g_conv_value[i], (long)(intptr_t)s->out.value);
    }
  }
  finish_with(t, &s->out);
  AIOB_END(&s->co);
}
static const aiob_task_vtable await_record_vt = {.poll = await_record_poll,
                                                 .drop = await_drop};

/* child: awaits obj (owned) with the locals inherited from its parent. */
static aiob_poll child_poll(aiob_task *t, void *p) {
  await_state *s = p;
  if (atomic_fetch_add(&g_child_polls, 1) == 0) {
    aiob_py_locals *l = aiob_py_task_locals(t);
    atomic_store(&g_child_locals, (uintptr_t)l);
    aiob_py_locals_release(l);
  }
  return await_one_poll(t, s);
}
static const aiob_task_vtable child_vt = {.poll = child_poll,
                                          .drop = await_drop};

/* parent: spawns a child that awaits obj (ownership moves to the child),
 * joins it and finishes with its output. */
typedef struct parent_state {
  int co;
  PyObject *obj;
  aiob_task *child;
  int status;
} parent_state;

static aiob_poll parent_poll(aiob_task *t, void *p) {
  parent_state *s = p;
  AIOB_BEGIN(&s->co);
  {
    aiob_py_locals *l = aiob_py_task_locals(t);
    atomic_store(&g_parent_locals, (uintptr_t)l);
    aiob_py_locals_release(l);
    await_state *c = calloc(1, sizeof *c);
    if (!c) {
      aiob_task_fail(t, AIOB_ENOMEM);
      return AIOB_READY;
    }
    c->obj = s->obj;
    int rc = aiob_spawn(aiob_task_runtime(t), &child_vt, c, &s->child);
    if (rc < 0) {
      free(c);
      aiob_task_fail(t, rc);
      return AIOB_READY;
    }
    s->obj = NULL; /* the child owns it */
  }
  AIOB_AWAIT(&s->co, aiob_task_join(t, s->child, &s->status));
  {
    aiob_output o = {0};
    int rc = aiob_task_take_output(s->child, &o);
    CHECK_INT(rc, ==, 0);
    CHECK_INT(o.status, ==, s->status);
    finish_with(t, &o);
  }
  AIOB_END(&s->co);
}

static void parent_drop(void *p) {
  parent_state *s = p;
  if (s->child) {
    aiob_task_cancel(s->child); /* no-op once it finished */
    aiob_task_release(s->child);
  }
  aiob_py_release(s->obj);
  free(s);
}
static const aiob_task_vtable parent_vt = {.poll = parent_poll,
                                           .drop = parent_drop};

/* plain: spawned with aiob_spawn, not by the bridge: awaits obj with the
 * locals of its state (or none). */
static aiob_poll plain_poll(aiob_task *t, void *p) {
  await_state *s = p;
  if (atomic_fetch_add(&g_plain_polls, 1) == 0) {
    aiob_py_locals *l = aiob_py_task_locals(t);
    atomic_store(&g_plain_had_locals, l != NULL);
    aiob_py_locals_release(l);
  }
  return await_one_poll(t, s);
}
static const aiob_task_vtable plain_vt = {.poll = plain_poll,
                                          .drop = await_drop};

/* A state the bridge must leave alone (bad vtables). */
typedef struct owned_state {
  atomic_int polls, drops;
} owned_state;

static aiob_poll owned_poll(aiob_task *t, void *p) {
  (void)t;
  atomic_fetch_add(&((owned_state *)p)->polls, 1);
  return AIOB_READY;
}
static void owned_drop(void *p) {
  atomic_fetch_add(&((owned_state *)p)->drops, 1);
}
static const aiob_task_vtable nopoll_vt = {.poll = NULL, .drop = owned_drop};
static const aiob_task_vtable owned_vt = {.poll = owned_poll,
                                          .drop = owned_drop};

/* sleep_us(n): a C sleep (its state, freed by drop, checks it is polled
 * only before its drop). */
typedef struct nap {
  uint64_t ns;
  int armed;
  aiob_sleep sleep;
} nap;

static aiob_poll nap_poll(aiob_task *t, void *p) {
  nap *n = p;
  CHECK(n != NULL);
  if (!n)
    return AIOB_READY;
  if (!n->armed) {
    aiob_sleep_init(&n->sleep, n->ns);
    n->armed = 1;
  }
  return aiob_sleep_poll(t, &n->sleep, NULL);
}
static void nap_drop(void *p) { free(p); }
static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = nap_drop};

/* gate_block(obj): a C task that blocks its loop thread until the test
 * opens the gate (a loop thread that cannot stop); its state holds obj,
 * released with aiob_py_release by its drop. */
static pthread_mutex_t g_gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_gate_cv = PTHREAD_COND_INITIALIZER;
static int g_gate_open;
static latch g_gate_entered; /* gate tasks that blocked */

static void gate_set(int open) {
  pthread_mutex_lock(&g_gate_mu);
  g_gate_open = open;
  pthread_cond_broadcast(&g_gate_cv);
  pthread_mutex_unlock(&g_gate_mu);
}

static aiob_poll gate_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  latch_add(&g_gate_entered, 1);
  pthread_mutex_lock(&g_gate_mu);
  while (!g_gate_open)
    pthread_cond_wait(&g_gate_cv, &g_gate_mu);
  pthread_mutex_unlock(&g_gate_mu);
  return AIOB_READY;
}

static void gate_drop(void *p) { aiob_py_release(p); }
static const aiob_task_vtable gate_vt = {.poll = gate_poll, .drop = gate_drop};

/* probe_object(): a capsule whose destruction is counted, with where it
 * happened: with the GIL on the test thread (as deferred releases must
 * be), and not once Py_FinalizeEx has begun (no thread may touch Python
 * then). */
static atomic_int g_probe_freed, g_probe_freed_elsewhere, g_probe_freed_late;
static atomic_int g_finalizing; /* set just before Py_FinalizeEx */

static void probe_destroyed(PyObject *cap) {
  (void)cap;
  atomic_fetch_add(&g_probe_freed, 1);
  if (atomic_load(&g_finalizing))
    atomic_fetch_add(&g_probe_freed_late, 1);
  else if (!pthread_equal(pthread_self(), g_loop_thread) || !PyGILState_Check())
    atomic_fetch_add(&g_probe_freed_elsewhere, 1);
}

/* ---- The module `bcapi` (functions called from Python, GIL) ------------ */

static PyObject *m_value(PyObject *m, PyObject *arg) {
  (void)m;
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred())
    return NULL;
  return aiob_py_future_into_py(g_bridge, &value_vt, (void *)(intptr_t)n,
                                conv_long);
}

static PyObject *m_sleep_us(PyObject *m, PyObject *arg) {
  (void)m;
  uint64_t ns;
  if (aiob_py_duration_ns(arg, 1e3, &ns) < 0)
    return NULL;
  nap *n = calloc(1, sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  n->ns = ns;
  PyObject *f = aiob_py_future_into_py(g_bridge, &nap_vt, n, NULL);
  if (!f)
    free(n);
  return f;
}

static PyObject *m_none(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &none_vt, NULL, NULL);
}

static PyObject *m_bad_conv(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &none_vt, NULL, conv_fail);
}

static PyObject *m_fail_enoent(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &fail_vt,
                                (void *)(intptr_t)AIOB_ENOENT, conv_long);
}

static PyObject *m_fail_canceled(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &fail_vt,
                                (void *)(intptr_t)AIOB_ECANCELED, conv_long);
}

static PyObject *m_raise_value(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &raise_vt, NULL, conv_long);
}

/* bad_vtable(no_poll): aiob_py_future_into_py with a NULL vtable (or one
 * without poll); propagates its error after checking the state was not
 * touched, then frees the state (the caller still owns it). */
static PyObject *m_bad_vtable(PyObject *m, PyObject *arg) {
  (void)m;
  int no_poll = PyObject_IsTrue(arg);
  if (no_poll < 0)
    return NULL;
  owned_state *st = calloc(1, sizeof *st);
  if (!st)
    return PyErr_NoMemory();
  PyObject *r = aiob_py_future_into_py(g_bridge, no_poll ? &nopoll_vt : NULL,
                                       st, conv_long);
  if (r) {
    CHECK(!"aiob_py_future_into_py accepted a bad vtable");
    return r; /* st leaks: whatever took it may still use it */
  }
  CHECK(PyErr_Occurred() != NULL);
  CHECK_INT(atomic_load(&st->polls), ==, 0);
  CHECK_INT(atomic_load(&st->drops), ==, 0);
  free(st);
  return NULL;
}

/* current() -> (locals loop, locals context, current loop) */
static PyObject *m_current(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  aiob_py_locals *l = aiob_py_get_current_locals(g_bridge);
  if (!l)
    return NULL;
  PyObject *loop = aiob_py_get_current_loop(g_bridge);
  if (!loop) {
    aiob_py_locals_release(l);
    return NULL;
  }
  PyObject *r = Py_BuildValue("(OOO)", aiob_py_locals_loop(l),
                              aiob_py_locals_context(l), loop);
  Py_DECREF(loop);
  aiob_py_locals_release(l);
  return r;
}

static PyObject *m_probe(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_future_into_py(g_bridge, &probe_vt, NULL, NULL);
}

/* parent_child(awaitable): a C task whose child awaits it. */
static PyObject *m_parent_child(PyObject *m, PyObject *aw) {
  (void)m;
  parent_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(aw);
  s->obj = aw;
  PyObject *r = aiob_py_future_into_py(g_bridge, &parent_vt, s, conv_object);
  if (!r) {
    Py_DECREF(aw);
    free(s);
  }
  return r;
}

/* Starts a C task over a new await_state (obj and locals are moved in);
 * with `locals` set it goes through aiob_py_future_into_py_with_locals. */
static PyObject *start_await(const aiob_task_vtable *vt, PyObject *obj,
                             aiob_py_locals *call_locals,
                             aiob_py_converter conv) {
  await_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(obj);
  s->obj = obj;
  PyObject *r = call_locals ? aiob_py_future_into_py_with_locals(
                                  g_bridge, call_locals, vt, s, conv)
                            : aiob_py_future_into_py(g_bridge, vt, s, conv);
  if (!r) {
    Py_DECREF(obj);
    free(s);
  }
  return r;
}

/* await_conv(awaitable): the task awaits with rconv_plus_one, returns the
 * C long it got (or the exception). */
static PyObject *m_await_conv(PyObject *m, PyObject *aw) {
  (void)m;
  return start_await(&await_record_vt, aw, NULL, conv_long);
}

/* spawn_with_locals(loop, n): a value task for `loop`, from any thread. */
static PyObject *m_spawn_with_locals(PyObject *m, PyObject *args) {
  (void)m;
  PyObject *loop;
  long n;
  if (!PyArg_ParseTuple(args, "Ol:spawn_with_locals", &loop, &n))
    return NULL;
  aiob_py_locals *l = aiob_py_locals_new(g_bridge, loop, NULL);
  if (!l)
    return NULL;
  CHECK(aiob_py_locals_loop(l) == loop);
  PyObject *r = aiob_py_future_into_py_with_locals(
      g_bridge, l, &value_vt, (void *)(intptr_t)n, conv_long);
  aiob_py_locals_release(l);
  return r;
}

/* wait_started(n): True once n value tasks were polled (GIL released). */
static PyObject *m_wait_started(PyObject *m, PyObject *arg) {
  (void)m;
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred())
    return NULL;
  PyThreadState *ts = PyEval_SaveThread(); /* the GIL, while blocked */
  int rc = latch_wait(&g_started, n, WAIT_TIMEOUT);
  PyEval_RestoreThread(ts);
  return PyBool_FromLong(rc == 0);
}

/* await_in(loop, context, awaitable): a C task for explicit locals awaits
 * the awaitable with them. */
static PyObject *m_await_in(PyObject *m, PyObject *args) {
  (void)m;
  PyObject *loop, *ctx, *aw;
  if (!PyArg_ParseTuple(args, "OOO:await_in", &loop, &ctx, &aw))
    return NULL;
  aiob_py_locals *l =
      aiob_py_locals_new(g_bridge, loop, ctx == Py_None ? NULL : ctx);
  if (!l)
    return NULL;
  PyObject *r = start_await(&await_one_vt, aw, l, conv_object);
  aiob_py_locals_release(l); /* not consumed */
  return r;
}

/* plain_await(loop or None, awaitable) -> (status, value): spawns a plain
 * task on the default runtime (no bridge locals) that awaits `awaitable`,
 * with aiob_py_await_set_locals(locals of `loop`) unless loop is None, and
 * waits for it with the GIL released. Call it off the loop's thread. */
static PyObject *m_plain_await(PyObject *m, PyObject *args) {
  (void)m;
  PyObject *loop, *aw;
  if (!PyArg_ParseTuple(args, "OO:plain_await", &loop, &aw))
    return NULL;
  await_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  if (loop != Py_None) {
    s->locals = aiob_py_locals_new(g_bridge, loop, NULL);
    if (!s->locals) {
      free(s);
      return NULL;
    }
  }
  Py_INCREF(aw);
  s->obj = aw;
  aiob_runtime *rt = NULL;
  aiob_task *h = NULL;
  int rc = aiob_runtime_default(&rt);
  if (rc == 0)
    rc = aiob_spawn(rt, &plain_vt, s, &h);
  if (rc < 0) {
    Py_DECREF(aw);
    aiob_py_locals_release(s->locals);
    free(s);
    return PyErr_Format(PyExc_OSError, "plain_await: spawn: %s",
                        aiob_strerror(rc));
  }
  PyThreadState *ts = PyEval_SaveThread(); /* the loop needs the GIL */
  rc = aiob_task_wait(h, WAIT_TIMEOUT);
  PyEval_RestoreThread(ts);
  if (rc < 0) {
    aiob_task_cancel(h);
    aiob_task_release(h);
    return PyErr_Format(PyExc_TimeoutError, "plain_await: wait: %s",
                        aiob_strerror(rc));
  }
  aiob_output o = {0};
  rc = aiob_task_take_output(h, &o);
  aiob_task_release(h);
  if (rc < 0)
    return PyErr_Format(PyExc_RuntimeError, "plain_await: take_output: %s",
                        aiob_strerror(rc));
  PyObject *v = Py_None;
  if (o.status == 0 && o.value) {
    v = o.value; /* the awaited result: a reference, moved */
    o.value = NULL;
  } else {
    Py_INCREF(v);
  }
  int status = o.status;
  aiob_output_clear(&o); /* GIL held: an exception is released at once */
  return Py_BuildValue("(iN)", status, v);
}

static PyObject *m_gate_block(PyObject *m, PyObject *obj) {
  (void)m;
  Py_INCREF(obj);
  PyObject *f = aiob_py_future_into_py(g_bridge, &gate_vt, obj, NULL);
  if (!f)
    Py_DECREF(obj);
  return f;
}

/* gate_entered(n): True once n gate tasks blocked (GIL released). */
static PyObject *m_gate_entered(PyObject *m, PyObject *arg) {
  (void)m;
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred())
    return NULL;
  PyThreadState *ts = PyEval_SaveThread();
  int rc = latch_wait(&g_gate_entered, n, WAIT_TIMEOUT);
  PyEval_RestoreThread(ts);
  return PyBool_FromLong(rc == 0);
}

static PyObject *m_probe_object(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyCapsule_New(&g_probe_freed, "bcapi.probe", probe_destroyed);
}

static PyMethodDef bcapi_methods[] = {
    {"gate_block", m_gate_block, METH_O, NULL},
    {"gate_entered", m_gate_entered, METH_O, NULL},
    {"probe_object", m_probe_object, METH_NOARGS, NULL},
    {"value", m_value, METH_O, NULL},
    {"none", m_none, METH_NOARGS, NULL},
    {"sleep_us", m_sleep_us, METH_O, NULL},
    {"bad_conv", m_bad_conv, METH_NOARGS, NULL},
    {"fail_enoent", m_fail_enoent, METH_NOARGS, NULL},
    {"fail_canceled", m_fail_canceled, METH_NOARGS, NULL},
    {"raise_value", m_raise_value, METH_NOARGS, NULL},
    {"bad_vtable", m_bad_vtable, METH_O, NULL},
    {"current", m_current, METH_NOARGS, NULL},
    {"probe", m_probe, METH_NOARGS, NULL},
    {"parent_child", m_parent_child, METH_O, NULL},
    {"await_conv", m_await_conv, METH_O, NULL},
    {"spawn_with_locals", m_spawn_with_locals, METH_VARARGS, NULL},
    {"wait_started", m_wait_started, METH_O, NULL},
    {"await_in", m_await_in, METH_VARARGS, NULL},
    {"plain_await", m_plain_await, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static void bcapi_free(void *m) {
  (void)m;
  aiob_py_bridge_free(g_bridge);
  g_bridge = NULL;
}

static struct PyModuleDef bcapi_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bcapi",
    .m_doc = "bridge_capi: the bridge's C API under test.",
    .m_size = 0,
    .m_methods = bcapi_methods,
    .m_free = bcapi_free,
};

static PyObject *bcapi_init(void) {
  PyObject *m = PyModule_Create(&bcapi_def);
  if (!m)
    return NULL;
  if (aiob_py_bridge_init(m, &g_bridge) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}

/* ---- Running Python from the test thread ------------------------------- */

/* Runs `code` as a module body in fresh globals and returns them; NULL
 * after printing the traceback. */
static PyObject *py_run(const char *code) {
  PyObject *g = PyDict_New();
  if (!g)
    return NULL;
  PyObject *r = PyRun_String(code, Py_file_input, g, g);
  if (!r) {
    PyErr_Print();
    Py_DECREF(g);
    return NULL;
  }
  Py_DECREF(r);
  return g;
}

/* Test thread: py_run that must succeed. */
static PyObject *run_ok(const char *code) {
  PyObject *g = py_run(code);
  if (!g)
    fail_msg("Python snippet failed (traceback above)");
  return g;
}

static PyObject *py_get(PyObject *g, const char *name) {
  PyObject *v = PyDict_GetItemString(g, name);
  if (!v)
    fail_msg("Python variable %s is not set", name);
  return v;
}

static long py_long(PyObject *g, const char *name) {
  PyObject *v = py_get(g, name);
  if (!PyLong_Check(v))
    fail_msg("%s is a %s, want int", name, Py_TYPE(v)->tp_name);
  long n = PyLong_AsLong(v);
  assert_false(n == -1 && PyErr_Occurred());
  return n;
}

static void assert_py_str(PyObject *g, const char *name, const char *want) {
  PyObject *v = py_get(g, name);
  if (!PyUnicode_Check(v))
    fail_msg("%s is a %s, want str", name, Py_TYPE(v)->tp_name);
  const char *s = PyUnicode_AsUTF8(v);
  assert_non_null(s);
  if (strcmp(s, want) != 0)
    fail_msg("%s = '%s', want '%s'", name, s, want);
}

static void assert_py_true(PyObject *g, const char *name) {
  PyObject *v = py_get(g, name);
  if (v != Py_True) {
    PyObject *rep = PyObject_Repr(v);
    fail_msg("%s = %s, want True", name,
             rep ? PyUnicode_AsUTF8(rep) : "<repr failed>");
  }
}

/* Test thread: the Python list `name` is empty, else fails showing it. */
static void assert_py_empty(PyObject *g, const char *name, const char *what) {
  PyObject *v = py_get(g, name);
  if (PyObject_Length(v) != 0) {
    PyObject *rep = PyObject_Repr(v);
    fail_msg("%s: %s", what, rep ? PyUnicode_AsUTF8(rep) : "<repr failed>");
  }
}

static long long bridge_stat(const char *key) {
  PyObject *d = aiob_py_bridge_stats(g_bridge);
  assert_non_null(d);
  PyObject *v = PyDict_GetItemString(d, key);
  if (!v)
    fail_msg("aiob_py_bridge_stats has no %s", key);
  long long n = PyLong_AsLongLong(v);
  Py_DECREF(d);
  return n;
}

/* Test thread: the exception set is exactly `type`, then clears it. */
#define assert_py_error(type)                                                  \
  do {                                                                         \
    PyObject *e_ = PyErr_Occurred();                                           \
    if (!e_)                                                                   \
      fail_msg("no Python exception set, want %s", #type);                     \
    if (e_ != (type))                                                          \
      fail_msg("exception %s, want %s", ((PyTypeObject *)e_)->tp_name, #type); \
    PyErr_Clear();                                                             \
  } while (0)

static int setup(void **state) {
  (void)state;
  reset_state();
  return 0;
}

static int teardown(void **state) {
  (void)state;
  if (PyErr_Occurred()) {
    PyErr_Print();
    return -1;
  }
  return 0;
}

/* ======================================================================== */
/* backend: the bridge's runtime is the default runtime and follows        */
/* AIOBRIDGE_BACKEND.                                                       */
static void test_backend(void **state) {
  (void)state;
  PyObject *name = aiob_py_bridge_backend(g_bridge);
  if (!name) {
    PyErr_Print();
    fail_msg("aiob_py_bridge_backend failed");
  }
  const char *s = PyUnicode_AsUTF8(name);
  assert_non_null(s);
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default(&rt), 0);
  assert_string_equal(s, aiob_runtime_backend_name(rt));
  if (g_backend)
    assert_string_equal(s, g_backend);
  Py_DECREF(name);
}

/* ======================================================================== */
/* 1. A converter turns the task's C value into the Python result, on the   */
/*    loop thread with the GIL; a NULL converter gives None and frees the   */
/*    value; a converter's exception is raised. With a running loop, and    */
/*    bound lazily to the loop that awaits it.                              */
static void test_future_converter(void **state) {
  (void)state;
  long long before = bridge_stat("completions");
  PyObject *g = run_ok(
      "import asyncio, bcapi\n"
      "async def main():\n"
      "    a = await bcapi.value(41)\n"
      "    b = await bcapi.none()\n"
      "    try:\n"
      "        await bcapi.bad_conv()\n"
      "        c = ('nothing raised', '')\n"
      "    except Exception as e:\n"
      "        c = (type(e).__name__, str(e))\n"
      "    return a, b, c\n"
      "running, none, (conv_type, conv_msg) = asyncio.run(\n"
      "    asyncio.wait_for(main(), 10))\n"
      "lazy_aw = bcapi.value(43)  # no running loop: bound when awaited\n"
      "async def lazy():\n"
      "    return await asyncio.wait_for(lazy_aw, 10)\n"
      "lazy = asyncio.run(lazy())\n");
  assert_int_equal(py_long(g, "running"), 41);
  assert_true(py_get(g, "none") == Py_None);
  assert_py_str(g, "conv_type", "OverflowError");
  assert_py_str(g, "conv_msg", "conv failed");
  assert_int_equal(py_long(g, "lazy"), 43);
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_conv_calls), 3); /* not for none() */
  assert_int_equal(atomic_load(&g_frees), 2); /* none()'s and bad_conv()'s */
  assert_int_equal(bridge_stat("completions") - before, 4);
  assert_clean();
}

/* ======================================================================== */
/* 2. Errors: a negative errno is its OSError subclass, aiob_py_task_raise  */
/*    raises the given type and message, AIOB_ECANCELED is CancelledError.  */
static void test_errors(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi\n"
      "async def main():\n"
      "    r = {}\n"
      "    try:\n"
      "        await bcapi.fail_enoent()\n"
      "    except OSError as e:\n"
      "        r['enoent'] = (type(e).__name__, e.errno)\n"
      "    try:\n"
      "        await bcapi.raise_value()\n"
      "    except Exception as e:\n"
      "        r['raise'] = (type(e).__name__, str(e))\n"
      "    try:\n"
      "        await bcapi.fail_canceled()\n"
      "    except asyncio.CancelledError:\n"
      "        r['cancelled'] = True\n"
      "    except BaseException as e:\n"
      "        r['cancelled'] = type(e).__name__\n"
      "    return r\n"
      "r = asyncio.run(asyncio.wait_for(main(), 10))\n"
      "enoent_type, enoent_errno = r.get('enoent', ('nothing raised', 0))\n"
      "raise_type, raise_msg = r.get('raise', ('nothing raised', ''))\n"
      "cancelled = r.get('cancelled', 'nothing raised')\n");
  assert_py_str(g, "enoent_type", "FileNotFoundError");
  assert_int_equal(py_long(g, "enoent_errno"), ENOENT);
  assert_py_str(g, "raise_type", "ValueError");
  assert_py_str(g, "raise_msg", "bad thing");
  assert_py_true(g, "cancelled");
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_conv_calls), 0); /* failures skip it */
  assert_clean();
}

/* ======================================================================== */
/* 3. A NULL vtable (or one without poll): NULL and ValueError, and the     */
/*    state stays the caller's (never polled, never dropped).               */
static void test_null_vtable(void **state) {
  (void)state;
  /* From C, no running loop. */
  owned_state *st = xcalloc(1, sizeof *st);
  PyObject *r = aiob_py_future_into_py(g_bridge, NULL, st, conv_long);
  assert_null(r);
  assert_py_error(PyExc_ValueError);
  r = aiob_py_future_into_py(g_bridge, &nopoll_vt, st, conv_long);
  assert_null(r);
  assert_py_error(PyExc_ValueError);
  PyObject *g = run_ok("import gc\ngc.collect()\n");
  Py_DECREF(g);
  assert_int_equal(atomic_load(&st->polls), 0);
  assert_int_equal(atomic_load(&st->drops), 0);
  /* The state is still usable by its owner: a good vtable takes it. */
  r = aiob_py_future_into_py(g_bridge, &owned_vt, st, NULL);
  assert_non_null(r);
  Py_DECREF(r); /* never awaited: its lazy coroutine drops the state */
  assert_int_equal(atomic_load(&st->polls), 0);
  assert_int_equal(atomic_load(&st->drops), 1);
  free(st);

  /* From Python, inside a running loop. */
  g = run_ok("import asyncio, bcapi\n"
             "async def main():\n"
             "    r = []\n"
             "    for no_poll in (False, True):\n"
             "        try:\n"
             "            bcapi.bad_vtable(no_poll)\n"
             "            r.append('nothing raised')\n"
             "        except Exception as e:\n"
             "            r.append(type(e).__name__)\n"
             "    return r\n"
             "null_vt, no_poll = asyncio.run(asyncio.wait_for(main(), 10))\n");
  assert_py_str(g, "null_vt", "ValueError");
  assert_py_str(g, "no_poll", "ValueError");
  Py_DECREF(g);
  assert_clean();
}

/* ======================================================================== */
/* 4. aiob_py_get_current_locals / _loop from a function Python calls while */
/*    a loop runs: the running loop and a copy of the caller's context; no  */
/*    running loop: NULL and RuntimeError.                                  */
static void test_current_locals(void **state) {
  (void)state;
  PyObject *g =
      run_ok("import asyncio, contextvars, bcapi\n"
             "var = contextvars.ContextVar('var', default='unset')\n"
             "async def main():\n"
             "    var.set('caller')\n"
             "    loop, ctx, loop2 = bcapi.current()\n"
             "    var.set('after')  # the locals hold a copy: not seen there\n"
             "    running = asyncio.get_running_loop()\n"
             "    return (loop is running, loop2 is running,\n"
             "            type(ctx) is contextvars.Context, ctx.get(var))\n"
             "same_loop, same_loop2, is_context, ctx_value = asyncio.run(\n"
             "    asyncio.wait_for(main(), 10))\n");
  assert_py_true(g, "same_loop");
  assert_py_true(g, "same_loop2");
  assert_py_true(g, "is_context");
  assert_py_str(g, "ctx_value", "caller");
  Py_DECREF(g);

  /* No loop runs on the test thread now. */
  aiob_py_locals *l = aiob_py_get_current_locals(g_bridge);
  assert_null(l);
  assert_py_error(PyExc_RuntimeError);
  PyObject *loop = aiob_py_get_current_loop(g_bridge);
  assert_null(loop);
  assert_py_error(PyExc_RuntimeError);
  assert_clean();
}

/* ======================================================================== */
/* 5. Inside a C task's poll (runtime thread, no GIL): the task has locals, */
/*    and aiob_py_get_current_locals returns those same locals.             */
static void test_locals_in_poll(void **state) {
  (void)state;
  PyObject *g = run_ok("import asyncio, bcapi\n"
                       "async def main():\n"
                       "    global loop_id\n"
                       "    loop_id = id(asyncio.get_running_loop())\n"
                       "    return await bcapi.probe()\n"
                       "r = asyncio.run(asyncio.wait_for(main(), 10))\n");
  assert_true(py_get(g, "r") == Py_None);
  uintptr_t loop_id =
      (uintptr_t)PyLong_AsUnsignedLongLong(py_get(g, "loop_id"));
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_probe_polls), 1);
  assert_int_equal(atomic_load(&g_probe_gil), 0);
  assert_int_equal(atomic_load(&g_probe_current), 1);
  assert_int_equal(atomic_load(&g_probe_has_locals), 1);
  assert_int_equal(atomic_load(&g_probe_same), 1);
  assert_true(atomic_load(&g_probe_loop) == loop_id);
  assert_clean();
}

/* ======================================================================== */
/* 6. A child spawned with aiob_spawn from a bridge task's poll inherits    */
/*    its locals and awaits a Python coroutine without explicit locals; the */
/*    parent joins it and returns its result to Python.                     */
static void test_child_inherits(void **state) {
  (void)state;
  PyObject *g = run_ok("import asyncio, bcapi\n"
                       "async def co():\n"
                       "    await asyncio.sleep(0)\n"
                       "    return 'from-python'\n"
                       "async def main():\n"
                       "    return await bcapi.parent_child(co())\n"
                       "r = asyncio.run(asyncio.wait_for(main(), 10))\n");
  assert_py_str(g, "r", "from-python");
  Py_DECREF(g);
  assert_true(atomic_load(&g_parent_locals) != 0);
  assert_true(atomic_load(&g_child_locals) == atomic_load(&g_parent_locals));
  /* One poll is enough when the loop finished the await before the child
   * polled its promise; usually it is pending first. */
  assert_true(atomic_load(&g_child_polls) >= 1);
  assert_int_equal(atomic_load(&g_conv_calls), 1);
  assert_clean();
}

/* ======================================================================== */
/* 7. aiob_py_await_set_converter: the awaiting task gets the converter's C */
/*    value (41 -> 42); a converter failing with ValueError gives the task  */
/*    AIOB_PY_EXCEPTION and Python the ValueError.                          */
static void test_await_converter(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi\n"
      "async def forty_one():\n"
      "    await asyncio.sleep(0)\n"
      "    return 41\n"
      "async def not_int():\n"
      "    return 'x'\n"
      "async def main():\n"
      "    a = await bcapi.await_conv(forty_one())\n"
      "    try:\n"
      "        await bcapi.await_conv(not_int())\n"
      "        b = ('nothing raised', '')\n"
      "    except Exception as e:\n"
      "        b = (type(e).__name__, str(e))\n"
      "    return a, b\n"
      "a, (b_type, b_msg) = asyncio.run(asyncio.wait_for(main(), 10))\n");
  assert_int_equal(py_long(g, "a"), 42);
  assert_py_str(g, "b_type", "ValueError");
  assert_py_str(g, "b_msg", "not an int");
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_rconv_calls), 2);
  assert_int_equal(atomic_load(&g_conv_n), 2);
  assert_int_equal(atomic_load(&g_conv_status[0]), 0);
  assert_int_equal(atomic_load(&g_conv_value[0]), 42);
  assert_int_equal(atomic_load(&g_conv_status[1]), AIOB_PY_EXCEPTION);
  assert_int_equal(atomic_load(&g_conv_calls), 1); /* conv_long: a only */
  assert_clean();
}

/* ======================================================================== */
/* 8. From a thread that does not run the loop: aiob_py_locals_new +        */
/*    aiob_py_future_into_py_with_locals starts the task at once and the    */
/*    result arrives on the loop; with an explicit context, a C task's      */
/*    awaited coroutine sees that context's ContextVar value.               */
static void test_with_locals_off_thread(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, contextvars, threading, bcapi\n"
      "var = contextvars.ContextVar('var', default='unset')\n"
      "async def read_var():\n"
      "    await asyncio.sleep(0)\n"
      "    return var.get()\n"
      "async def main():\n"
      "    loop = asyncio.get_running_loop()\n"
      "    got = loop.create_future()\n"
      "    def worker():\n"
      "        try:\n"
      "            off = asyncio.events._get_running_loop() is None\n"
      "            aw1 = bcapi.spawn_with_locals(loop, 41)\n"
      "            started = bcapi.wait_started(1)  # before any await\n"
      "            var.set('explicit')\n"
      "            ctx = contextvars.copy_context()\n"
      "            var.set('current')\n"
      "            aw2 = bcapi.await_in(loop, ctx, read_var())\n"
      "            # the usual way to hand a coroutine to a loop:\n"
      "            rct = asyncio.run_coroutine_threadsafe(\n"
      "                bcapi.spawn_with_locals(loop, 44), loop).result(10)\n"
      "            loop.call_soon_threadsafe(got.set_result,\n"
      "                                      (off, aw1, started, aw2, rct))\n"
      "        except BaseException as e:\n"
      "            loop.call_soon_threadsafe(got.set_exception, e)\n"
      "    t = threading.Thread(target=worker)\n"
      "    t.start()\n"
      "    try:\n"
      "        off, aw1, started, aw2, rct = await got\n"
      "        return off, await aw1, started, await aw2, rct\n"
      "    finally:\n"
      "        t.join(10)\n"
      "off_loop, result, started, ctx_value, rct = asyncio.run(\n"
      "    asyncio.wait_for(main(), 10))\n");
  assert_py_true(g, "off_loop");
  assert_int_equal(py_long(g, "result"), 41);
  assert_py_true(g, "started");
  assert_py_str(g, "ctx_value", "explicit");
  assert_int_equal(py_long(g, "rct"), 44);
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_conv_calls),
                   3); /* 2 conv_long, conv_object */
  assert_clean();
}

/* ======================================================================== */
/* 9. A plain task (aiob_spawn on aiob_runtime_default, no bridge locals):  */
/*    aiob_py_await_poll gives AIOB_EINVAL; with aiob_py_await_set_locals   */
/*    it awaits the coroutine on that loop and gets its result.             */
static void test_plain_task(void **state) {
  (void)state;
  PyObject *g =
      run_ok("import asyncio, threading, bcapi\n"
             "async def co():\n"
             "    await asyncio.sleep(0)\n"
             "    return 'plain-ok'\n"
             "async def main():\n"
             "    loop = asyncio.get_running_loop()\n"
             "    got = loop.create_future()\n"
             "    def worker():\n"
             "        try:\n"
             "            c = co()\n"
             "            no_locals = bcapi.plain_await(None, c)\n"
             "            c.close()  # never awaited\n"
             "            with_locals = bcapi.plain_await(loop, co())\n"
             "            loop.call_soon_threadsafe(got.set_result,\n"
             "                                      (no_locals, with_locals))\n"
             "        except BaseException as e:\n"
             "            loop.call_soon_threadsafe(got.set_exception, e)\n"
             "    t = threading.Thread(target=worker)\n"
             "    t.start()\n"
             "    try:\n"
             "        return await got\n"
             "    finally:\n"
             "        t.join(10)\n"
             "(nl_status, nl_value), (wl_status, wl_value) = asyncio.run(\n"
             "    asyncio.wait_for(main(), 10))\n");
  assert_rc((int)py_long(g, "nl_status"), AIOB_EINVAL);
  assert_true(py_get(g, "nl_value") == Py_None);
  assert_rc((int)py_long(g, "wl_status"), 0);
  assert_py_str(g, "wl_value", "plain-ok");
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_plain_had_locals), 0);
  assert_clean();
}

/* ======================================================================== */
/* 10. aiob_py_locals_new: a context that is not a contextvars.Context, or  */
/*     no loop, is a TypeError; good arguments are kept as given.           */
static void test_locals_new_errors(void **state) {
  (void)state;
  PyObject *g = run_ok("import asyncio, contextvars\n"
                       "loop = asyncio.new_event_loop()\n"
                       "ctx = contextvars.copy_context()\n"
                       "not_ctx = {'a': 1}\n");
  PyObject *loop = py_get(g, "loop"), *ctx = py_get(g, "ctx");
  aiob_py_locals *l = aiob_py_locals_new(g_bridge, loop, py_get(g, "not_ctx"));
  assert_null(l);
  assert_py_error(PyExc_TypeError);
  l = aiob_py_locals_new(g_bridge, Py_None, NULL);
  assert_null(l);
  assert_py_error(PyExc_TypeError);
  l = aiob_py_locals_new(g_bridge, Py_None, ctx);
  assert_null(l);
  assert_py_error(PyExc_TypeError);
  l = aiob_py_locals_new(g_bridge, NULL, NULL);
  assert_null(l);
  assert_py_error(PyExc_TypeError);

  l = aiob_py_locals_new(g_bridge, loop, ctx);
  if (!l)
    PyErr_Print();
  assert_non_null(l);
  assert_ptr_equal(aiob_py_locals_loop(l), loop);
  assert_ptr_equal(aiob_py_locals_context(l), ctx);
  aiob_py_locals *c = aiob_py_locals_clone(l);
  assert_ptr_equal(c, l);
  aiob_py_locals_release(c);
  aiob_py_locals_release(l);
  assert_null(aiob_py_locals_clone(NULL));
  aiob_py_locals_release(NULL);

  PyObject *r = PyRun_String("loop.close()\n", Py_file_input, g, g);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  Py_DECREF(r);
  Py_DECREF(g);
  assert_clean();
}

/* ---- main -------------------------------------------------------------- */

static void peek_noop(aiob_runtime *rt, void *arg) {
  (void)rt;
  (void)arg;
}

/* ======================================================================== */
/* 12. Many C tasks in flight on several loops in several Python threads:   */
/*     each loop gathers some, cancels some and drops some unawaited (the   */
/*     awaitable dies while its C task still holds its memory), and awaits  */
/*     Python from C tasks whose child tasks hold the locals. Run under     */
/*     ASan and TSan, this is the bridge's concurrency under load.          */
static void test_many_in_flight(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi, gc, threading\n"
      "async def co():\n"
      "    await asyncio.sleep(0)\n"
      "    return 'py'\n"
      "async def one_loop(n):\n"
      "    keep, dropped = [], 0\n"
      "    for i in range(n):\n"
      "        f = bcapi.none()\n"
      "        if i % 3 == 0:\n"
      "            dropped += 1\n"
      "            continue\n"
      "        if i % 3 == 1:\n"
      "            f.cancel()\n"
      "        keep.append(f)\n"
      "    gc.collect()\n"
      "    res = await asyncio.gather(*keep, return_exceptions=True)\n"
      "    done = sum(r is None for r in res)\n"
      "    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in "
      "res)\n"
      "    awaited = await asyncio.gather(*(bcapi.parent_child(co())\n"
      "                                     for _ in range(20)))\n"
      "    return done, cancelled, dropped, awaited.count('py')\n"
      "results = []\n"
      "def worker():\n"
      "    for _ in range(3):\n"
      "        results.append(asyncio.run(asyncio.wait_for(one_loop(1500), "
      "60)))\n"
      "threads = [threading.Thread(target=worker) for _ in range(3)]\n"
      "for t in threads: t.start()\n"
      "for t in threads: t.join(120)\n"
      "alive = sum(t.is_alive() for t in threads)\n"
      "ok = results == [(500, 500, 500, 20)] * 9\n");
  assert_int_equal(py_long(g, "alive"), 0);
  assert_py_true(g, "ok");
  Py_DECREF(g);
  assert_clean();
}

/* ======================================================================== */
/* 13. Two threads first-await the same unbound awaitable, each in its own  */
/*     loop: one binds it and gets the result, the other gets asyncio's     */
/*     RuntimeError (another loop's future) or, if the first finished       */
/*     already, the result too. A third variant cancels it from another     */
/*     thread while it binds. Never a crash, a C task polled after its      */
/*     drop, or a completion pushed to no loop. (The loop stays open until  */
/*     the cancelling thread is out of cancel(), which may write the loop's */
/*     self-pipe: closing a loop while another thread wakes it is a race in */
/*     asyncio itself, call_soon_threadsafe against close.)                 */
static void test_concurrent_first_await(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi, sys, threading\n"
      "async def use(f, out, cancelled):\n"
      "    try:\n"
      "        out.append(await f)\n"
      "    except RuntimeError:\n"
      "        out.append('other loop')\n"
      "    except asyncio.CancelledError:\n"
      "        out.append('cancelled')\n"
      "    while cancelled and not cancelled.is_set():\n"
      "        await asyncio.sleep(0.001)\n"
      "def run(f, out, cancelled=None):\n"
      "    asyncio.run(use(f, out, cancelled))\n"
      "def cancel(f, out, cancelled):\n"
      "    f.cancel()\n"
      "    cancelled.set()\n"
      "interval = sys.getswitchinterval()\n"
      "sys.setswitchinterval(1e-5)  # switch threads inside the bridge\n"
      "bad = []\n"
      "for i in range(300):\n"
      "    f, out = bcapi.sleep_us(1000 if i % 2 else 200), []\n"
      "    second = cancel if i % 4 == 3 else run\n"
      "    ev = threading.Event() if second is cancel else None\n"
      "    ts = [threading.Thread(target=run, args=(f, out, ev)),\n"
      "          threading.Thread(target=second, args=(f, out, ev))]\n"
      "    for t in ts: t.start()\n"
      "    for t in ts: t.join(60)\n"
      "    if any(t.is_alive() for t in ts): bad.append((i, 'hung')); break\n"
      "    if second is run:\n"
      "        ok = None in out and set(out) <= {None, 'other loop'}\n"
      "    else:\n"
      "        ok = out in ([None], ['cancelled']) and f.done()\n"
      "    if not ok or len(out) != (2 if second is run else 1):\n"
      "        bad.append((i, out))\n"
      "sys.setswitchinterval(interval)\n"
      "ok = bad == []\n");
  assert_py_empty(g, "bad", "rounds that went wrong");
  assert_py_true(g, "ok");
  Py_DECREF(g);
  assert_clean();
}

/* ======================================================================== */
/* 14. aiobridge.shutdown() over and over while three threads start C tasks */
/*     and C awaits of Python in their own loops: every awaitable resolves  */
/*     (None, the awaited value, ShutdownError or a cancellation) and       */
/*     nothing uses a runtime after it was freed. Afterwards the runtime    */
/*     starts again.                                                        */
static void test_shutdown_while_starting(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, aiobridge, bcapi, random, threading\n"
      "async def co():\n"
      "    await asyncio.sleep(0)\n"
      "    return 1\n"
      "async def one():\n"
      "    return await asyncio.wait_for(asyncio.gather(\n"
      "        bcapi.sleep_us(random.random() * 1000), bcapi.none(),\n"
      "        bcapi.parent_child(co()), return_exceptions=True), 30)\n"
      "allowed = (type(None), int, str, aiobridge.ShutdownError,\n"
      "           asyncio.CancelledError)\n"
      "bad, runs, done = [], [0], threading.Event()\n"
      "def worker():\n"
      "    for _ in range(60):\n"
      "        try:\n"
      "            res = asyncio.run(one())\n"
      "        except aiobridge.ShutdownError:\n"
      "            res = []\n"
      "        except BaseException as e:\n"
      "            res = [e]\n"
      "        bad.extend(r for r in res if not isinstance(r, allowed))\n"
      "        runs[0] += 1\n"
      "def stopper():\n"
      "    while not done.is_set():\n"
      "        aiobridge.shutdown()\n"
      "        done.wait(random.random() * 0.0005)\n"
      "ws = [threading.Thread(target=worker) for _ in range(3)]\n"
      "s = threading.Thread(target=stopper)\n"
      "for t in ws + [s]: t.start()\n"
      "for t in ws: t.join(120)\n"
      "done.set()\n"
      "s.join(60)\n"
      "alive = sum(t.is_alive() for t in ws + [s])\n"
      "after = asyncio.run(asyncio.wait_for(bcapi.value(5), 30))\n"
      "ok = bad == [] and runs[0] == 180 and after == 5\n");
  assert_int_equal(py_long(g, "alive"), 0);
  assert_py_empty(g, "bad", "unexpected outcomes");
  assert_py_true(g, "ok");
  Py_DECREF(g);
  assert_clean();
}

/* Waits (bounded) until no abandoned loop thread runs any more. */
static int abandoned_reach_zero(void) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (aiob_runtime_abandoned_threads() != 0) {
    if (aiob_now_ns() > deadline)
      return -1;
    sleep_thread_ns(AIOB_MSEC);
  }
  return 0;
}

/* ======================================================================== */
/* 15. aiobridge.shutdown(timeout=...) with a loop thread that cannot stop  */
/*     (a C task blocks it): ShutdownTimeoutError saying what is left; the  */
/*     C tasks the stuck loop will never finish fail with ShutdownError;    */
/*     the coroutine a C task there awaited is cancelled; a fresh runtime   */
/*     starts. Unblocked, the abandoned thread drops its task without       */
/*     touching Python: the Python object the task held is released later, */
/*     by a thread that holds the GIL.                                      */
static void test_shutdown_deadline(void **state) {
  (void)state;
  gate_set(0);
  PyObject *g = run_ok(
      "import asyncio, aiobridge, bcapi\n"
      "seen = []\n"
      "async def co(started):\n"
      "    started.set()\n"
      "    try:\n"
      "        await asyncio.sleep(3600)\n"
      "    except asyncio.CancelledError:\n"
      "        seen.append('cancelled')\n"
      "        raise\n"
      "async def outcome(f):\n"
      "    try:\n"
      "        return repr(await asyncio.wait_for(f, 30))\n"
      "    except BaseException as e:\n"
      "        return type(e).__name__\n"
      "async def main():\n"
      "    started = asyncio.Event()\n"
      "    aw = asyncio.ensure_future(bcapi.parent_child(co(started)))\n"
      "    await started.wait()\n"
      "    gated = "
      "asyncio.ensure_future(bcapi.gate_block(bcapi.probe_object()))\n"
      "    await asyncio.sleep(0)  # the gate task starts\n"
      "    entered = bcapi.gate_entered(1)\n"
      "    nap = asyncio.ensure_future(bcapi.sleep_us(60e6))\n"
      "    left = None\n"
      "    try:\n"
      "        aiobridge.shutdown(timeout=0.05)\n"
      "    except aiobridge.ShutdownTimeoutError as e:\n"
      "        left = e.left['bcapi']\n"
      "    outs = [await outcome(f) for f in (aw, gated, nap)]\n"
      "    while not seen:\n"
      "        await asyncio.sleep(0.001)\n"
      "    info = aiobridge.runtime_info('bcapi')\n"
      "    return entered, left, outs, info['abandoned_threads'], \\\n"
      "        await bcapi.value(5)\n"
      "entered, left, outs, abandoned, again = asyncio.run(\n"
      "    asyncio.wait_for(main(), 60))\n"
      "ok = (entered and left['loops'] == 1 and left['loops_left'] == 1\n"
      "      and left['tasks_left'] >= 4 and abandoned == 1 and again == 5\n"
      "      and outs == ['ShutdownError'] * 3 and seen == ['cancelled'])\n");
  PyObject *ok = py_get(g, "ok");
  if (ok != Py_True) {
    PyObject *r = PyObject_Repr(g);
    fail_msg("shutdown with a deadline went wrong: %s",
             r ? PyUnicode_AsUTF8(r) : "?");
  }
  Py_DECREF(g);
  int freed = atomic_load(&g_probe_freed);
  gate_set(1);
  if (abandoned_reach_zero() < 0)
    fail_msg("the abandoned loop thread did not end once unblocked");
  /* Its drop queued the release; a thread with the GIL does it. */
  assert_int_equal(atomic_load(&g_probe_freed), freed);
  Py_DECREF(run_ok("import aiobridge\naiobridge.shutdown()\n"));
  assert_int_equal(atomic_load(&g_probe_freed), freed + 1);
  assert_int_equal(atomic_load(&g_probe_freed_elsewhere), 0);
  gate_set(0);
  assert_clean();
}

/* ======================================================================== */
/* 16. aiobridge.shutdown() (no deadline) with C tasks in flight: a CTask   */
/*     raises ShutdownError, one the user cancelled CancelledError; a plain */
/*     C task awaiting a Python coroutine is dropped (its joiner sees       */
/*     AIOB_ECANCELED) and the coroutine is cancelled.                      */
static void test_shutdown_outcomes(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, aiobridge, bcapi\n"
      "seen = []\n"
      "async def co(started):\n"
      "    started.set()\n"
      "    try:\n"
      "        await asyncio.sleep(3600)\n"
      "    except asyncio.CancelledError:\n"
      "        seen.append('cancelled')\n"
      "        raise\n"
      "async def outcome(f):\n"
      "    try:\n"
      "        return repr(await asyncio.wait_for(f, 30))\n"
      "    except BaseException as e:\n"
      "        return type(e).__name__\n"
      "async def main():\n"
      "    loop = asyncio.get_running_loop()\n"
      "    started = asyncio.Event()\n"
      "    plain = loop.run_in_executor(None, bcapi.plain_await, loop,\n"
      "                                 co(started))\n"
      "    await started.wait()\n"
      "    nap, cancelled = bcapi.sleep_us(60e6), bcapi.sleep_us(60e6)\n"
      "    cancelled.cancel()\n"
      "    shut = aiobridge.shutdown()\n"
      "    status, value = await asyncio.wait_for(plain, 30)\n"
      "    outs = [await outcome(nap), await outcome(cancelled)]\n"
      "    while not seen:\n"
      "        await asyncio.sleep(0.001)\n"
      "    return shut, status, value, outs\n"
      "shut, status, value, outs = asyncio.run(asyncio.wait_for(main(), 60))\n"
      "ok = (shut is None and value is None and seen == ['cancelled']\n"
      "      and outs == ['ShutdownError', 'CancelledError'])\n");
  assert_rc((int)py_long(g, "status"), AIOB_ECANCELED);
  PyObject *ok = py_get(g, "ok");
  if (ok != Py_True) {
    PyObject *r = PyObject_Repr(g);
    fail_msg("shutdown outcomes: %s", r ? PyUnicode_AsUTF8(r) : "?");
  }
  Py_DECREF(g);
  assert_clean();
}

/* Interpreter exit with a loop thread that cannot stop: Py_FinalizeEx
 * returns (the exit hook abandons the thread after its deadline), and
 * nothing touches Python afterwards: neither the abandoned thread once
 * unblocked (its task's drop releases a Python object), nor
 * aiob_py_release called after the finalization on the thread that ran
 * it or on another. Returns the number of failures. */
static void *release_thread(void *obj) {
  aiob_py_release(obj);
  return NULL;
}

static int finalize_with_a_stuck_loop(void) {
  int bad = 0;
  latch_destroy(&g_gate_entered);
  latch_init(&g_gate_entered);
  gate_set(0);
  PyObject *g = py_run(
      "import asyncio, bcapi\n"
      "async def main():\n"
      "    keep = [asyncio.ensure_future(bcapi.gate_block(\n"
      "                bcapi.probe_object())),\n"
      "            asyncio.ensure_future(bcapi.sleep_us(60e6))]\n"
      "    await asyncio.sleep(0)\n"
      "    assert bcapi.gate_entered(1)\n"
      "asyncio.run(main())\n"
      "late_main, late_thread = bcapi.probe_object(), bcapi.probe_object()\n");
  PyObject *late_main = g ? py_get(g, "late_main") : NULL;
  PyObject *late_thread = g ? py_get(g, "late_thread") : NULL;
  if (!late_main || !late_thread) {
    fprintf(stderr, "bridge_capi: exit scenario: setup failed\n");
    Py_XDECREF(g);
    return 1;
  }
  Py_INCREF(late_main); /* C's now: released after the finalization */
  Py_INCREF(late_thread);
  Py_DECREF(g);
  atomic_store(&g_finalizing, 1);
  if (Py_FinalizeEx() != 0) {
    fprintf(stderr, "bridge_capi: Py_FinalizeEx failed\n");
    bad++;
  }
  if (aiob_runtime_abandoned_threads() != 1) {
    fprintf(stderr,
            "bridge_capi: %u abandoned loop threads after the exit "
            "hook, want 1 (the gate's)\n",
            aiob_runtime_abandoned_threads());
    bad++;
  }
  aiob_py_release(late_main);
  pthread_t th;
  if (pthread_create(&th, NULL, release_thread, late_thread) == 0)
    pthread_join(th, NULL);
  gate_set(1);
  if (abandoned_reach_zero() < 0) {
    fprintf(stderr, "bridge_capi: the abandoned loop thread did not end\n");
    bad++;
  }
  if (atomic_load(&g_probe_freed_late) != 0) {
    fprintf(stderr,
            "bridge_capi: %d Python objects were released after "
            "Py_FinalizeEx began\n",
            atomic_load(&g_probe_freed_late));
    bad++;
  }
  return bad;
}

int main(void) {
  g_loop_thread = pthread_self();
  latch_init(&g_started);
  latch_init(&g_gate_entered);
  const char *env = getenv("AIOBRIDGE_BACKEND");
  g_backend = env && env[0] ? env : NULL;

  /* Refused by the kernel or the build: skip, with the reason. */
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  aiob_runtime *probe = NULL;
  int rc = aiob_runtime_new(&probe, &cfg);
  if (rc == AIOB_ENOSYS || rc == AIOB_EPERM || rc == AIOB_ENOTSUP) {
    printf("SKIP: %s: %s\n", g_backend ? g_backend : "default",
           aiob_strerror(rc));
    return 77;
  }
  if (rc != 0) {
    fprintf(stderr, "bridge_capi: backend %s: %s\n",
            g_backend ? g_backend : "default", aiob_strerror(rc));
    return 1;
  }
  aiob_runtime_free(probe);

  if (PyImport_AppendInittab("bcapi", bcapi_init) < 0) {
    fprintf(stderr, "bridge_capi: PyImport_AppendInittab failed\n");
    return 1;
  }
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0; /* as Py_InitializeEx(0) */
  /* Which also leaves SIGPIPE fatal, unlike the python program: asyncio
   * relies on it being ignored (call_soon_threadsafe from another thread
   * can write to a loop's self-pipe while that loop closes it; the send
   * then fails with EPIPE, which asyncio ignores). */
  signal(SIGPIPE, SIG_IGN);
#ifdef AIOB_TEST_PYTHON_EXE
  /* Locate the standard library of the interpreter we link, not of
   * whichever python3 comes first on PATH. */
  PyStatus ps = PyConfig_SetBytesString(&config, &config.program_name,
                                        AIOB_TEST_PYTHON_EXE);
  if (PyStatus_Exception(ps)) {
    PyConfig_Clear(&config);
    Py_ExitStatusException(ps);
  }
#endif
  PyStatus st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st))
    Py_ExitStatusException(st);

  PyObject *mod = PyImport_ImportModule("bcapi");
  if (!mod) {
    PyErr_Print();
    fprintf(stderr, "bridge_capi: cannot import bcapi (is PYTHONPATH the "
                    "build's python/cp311 directory?)\n");
    Py_FinalizeEx();
    return 1;
  }
  Py_DECREF(mod);

#define T(name) cmocka_unit_test_setup_teardown(test_##name, setup, teardown)
  const struct CMUnitTest tests[] = {
      T(backend),
      T(future_converter),
      T(errors),
      T(null_vtable),
      T(current_locals),
      T(locals_in_poll),
      T(child_inherits),
      T(await_converter),
      T(with_locals_off_thread),
      T(plain_task),
      T(locals_new_errors),
      T(many_in_flight),
      T(concurrent_first_await),
      T(shutdown_while_starting),
      T(shutdown_deadline),
      T(shutdown_outcomes),
  };
  int failed = cmocka_run_group_tests_name("bridge_capi", tests, NULL, NULL);

  /* The bridge's atexit hook stops the runtime before finalization,
   * abandoning a loop thread that cannot stop. */
  failed += finalize_with_a_stuck_loop();
  rc = aiob_runtime_default_peek(peek_noop, NULL);
  if (rc != AIOB_ENOENT) {
    fprintf(stderr,
            "bridge_capi: the default runtime still exists after "
            "Py_FinalizeEx (peek = %s)\n",
            errname(rc));
    failed++;
  }
  latch_destroy(&g_started);
  latch_destroy(&g_gate_entered);
  return failed ? 1 : 0;
}
