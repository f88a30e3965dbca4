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
#include <sched.h>
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

/* tests 17 and 18 (promise awaitables): one slot per awaitable. */
#define PROMISE_N 2000
enum { PK_VALUE, PK_RAISE, PK_PATH };
typedef struct pslot {
  aiob_promise *p; /* completer: the test thread, then one helper thread */
  int kind;
  atomic_int done_calls, done_cancelled, done_gil, done_on_test_thread;
  atomic_int complete_rc;
  atomic_int frees, freed_gil, freed_by_helper;
  atomic_int conv_calls;
} pslot;
static pslot g_ps[PROMISE_N];
static atomic_int g_pfrees;        /* pval_free calls */
static latch g_pdone;              /* on_done calls */
static latch g_helpers_done;       /* helper threads that finished */
static _Thread_local int t_helper; /* set on the tests' helper threads */

/* test 19 (run_blocking under a cancel storm): one slot per job. */
#define BLK_N 500
typedef struct bslot {
  atomic_int runs, drops, frees, conv_calls, saw_cancel;
} bslot;
static bslot g_bs[BLK_N];
static latch g_blk_gate;    /* reaches 1 when the test opens the gate */
static latch g_blk_entered; /* fn calls */
static latch g_blk_settled; /* cancelled jobs: dropped unrun, or fn saw it */
static latch g_blk_drops, g_blk_frees;
static atomic_int g_blk_inside, g_blk_inside_max;

/* test 20 (run_blocking failures) */
static atomic_int g_b2_runs, g_b2_drops, g_b2_frees, g_b2_convs;

/* test 21 (names): rc of the failing call of each mode, name seen inside */
#define NM_MODES 6
static atomic_int g_fail_rc[NM_MODES];
static atomic_uintptr_t g_seen_name;

/* test 22 (Python async iterators consumed by C tasks) */
static atomic_int g_ai_drops, g_ai_items, g_ai_convs;

static latch *const g_shape_latches[] = {
    &g_pdone,       &g_helpers_done, &g_blk_gate,  &g_blk_entered,
    &g_blk_settled, &g_blk_drops,    &g_blk_frees,
};
#define SHAPE_LATCHES (sizeof g_shape_latches / sizeof g_shape_latches[0])

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
  for (size_t i = 0; i < SHAPE_LATCHES; i++) {
    latch_destroy(g_shape_latches[i]);
    latch_init(g_shape_latches[i]);
  }
  for (int i = 0; i < PROMISE_N; i++) {
    pslot *s = &g_ps[i];
    s->p = NULL;
    s->kind = PK_VALUE;
    atomic_store(&s->done_calls, 0);
    atomic_store(&s->done_cancelled, -1);
    atomic_store(&s->done_gil, -1);
    atomic_store(&s->done_on_test_thread, -1);
    atomic_store(&s->complete_rc, 1);
    atomic_store(&s->frees, 0);
    atomic_store(&s->freed_gil, -1);
    atomic_store(&s->freed_by_helper, -1);
    atomic_store(&s->conv_calls, 0);
  }
  atomic_store(&g_pfrees, 0);
  for (int i = 0; i < BLK_N; i++) {
    bslot *s = &g_bs[i];
    atomic_store(&s->runs, 0);
    atomic_store(&s->drops, 0);
    atomic_store(&s->frees, 0);
    atomic_store(&s->conv_calls, 0);
    atomic_store(&s->saw_cancel, 0);
  }
  atomic_store(&g_blk_inside, 0);
  atomic_store(&g_blk_inside_max, 0);
  atomic_store(&g_b2_runs, 0);
  atomic_store(&g_b2_drops, 0);
  atomic_store(&g_b2_frees, 0);
  atomic_store(&g_b2_convs, 0);
  for (int i = 0; i < NM_MODES; i++)
    atomic_store(&g_fail_rc[i], 1);
  atomic_store(&g_seen_name, 0);
  atomic_store(&g_ai_drops, 0);
  atomic_store(&g_ai_items, 0);
  atomic_store(&g_ai_convs, 0);
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

/* aiob_py_future_into_py or aiob_py_local_future_into_py. */
typedef PyObject *(*spawn_fn)(aiob_py_bridge *b, const aiob_task_vtable *vt,
                              void *state, aiob_py_converter conv);

/* A nap of `arg` microseconds with vtable vt, started by spawn. */
static PyObject *start_nap(PyObject *arg, const aiob_task_vtable *vt,
                           spawn_fn spawn) {
  uint64_t ns;
  if (aiob_py_duration_ns(arg, 1e3, &ns) < 0)
    return NULL;
  nap *n = calloc(1, sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  n->ns = ns;
  PyObject *f = spawn(g_bridge, vt, n, NULL);
  if (!f)
    free(n);
  return f;
}

static PyObject *m_sleep_us(PyObject *m, PyObject *arg) {
  (void)m;
  return start_nap(arg, &nap_vt, aiob_py_future_into_py);
}

/* local_nap(us), local_await(obj): loop-local twins of sleep_us and an
 * await, whose states are counted when made and when dropped. */
static atomic_int g_local_made, g_local_dropped;

static void local_nap_drop(void *p) {
  atomic_fetch_add(&g_local_dropped, 1);
  free(p);
}
static const aiob_task_vtable local_nap_vt = {.poll = nap_poll,
                                              .drop = local_nap_drop};

static void local_await_drop(void *p) {
  atomic_fetch_add(&g_local_dropped, 1);
  await_drop(p);
}
static const aiob_task_vtable local_await_vt = {.poll = await_one_poll,
                                                .drop = local_await_drop};

static PyObject *m_local_nap(PyObject *m, PyObject *arg) {
  (void)m;
  PyObject *f = start_nap(arg, &local_nap_vt, aiob_py_local_future_into_py);
  if (f)
    atomic_fetch_add(&g_local_made, 1);
  return f;
}

static PyObject *start_await(const aiob_task_vtable *vt, PyObject *obj,
                             aiob_py_locals *call_locals, spawn_fn spawn,
                             aiob_py_converter conv);

static PyObject *m_local_await(PyObject *m, PyObject *obj) {
  (void)m;
  PyObject *f = start_await(&local_await_vt, obj, NULL,
                            aiob_py_local_future_into_py, conv_object);
  if (f)
    atomic_fetch_add(&g_local_made, 1);
  return f;
}

static PyObject *m_local_info(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return aiob_py_local_info(g_bridge);
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
 * with `locals` set it goes through aiob_py_future_into_py_with_locals,
 * else through spawn. */
static PyObject *start_await(const aiob_task_vtable *vt, PyObject *obj,
                             aiob_py_locals *call_locals, spawn_fn spawn,
                             aiob_py_converter conv) {
  await_state *s = calloc(1, sizeof *s);
  if (!s)
    return PyErr_NoMemory();
  Py_INCREF(obj);
  s->obj = obj;
  PyObject *r = call_locals ? aiob_py_future_into_py_with_locals(
                                  g_bridge, call_locals, vt, s, conv)
                            : spawn(g_bridge, vt, s, conv);
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
  return start_await(&await_record_vt, aw, NULL, aiob_py_future_into_py,
                     conv_long);
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
  PyObject *r =
      start_await(&await_one_vt, aw, l, aiob_py_future_into_py, conv_object);
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

/* ---- Shapes: promise awaitables and blocking work (tests 17-21) -------- */

static int promise_kind(int i) {
  return i % 10 == 7 ? PK_RAISE : i % 10 == 9 ? PK_PATH : PK_VALUE;
}

/* A promise's heap value; its free is counted per slot, with where it ran. */
typedef struct pval {
  int slot;
} pval;

static void pval_free(void *p) {
  pval *v = p;
  pslot *s = &g_ps[v->slot];
  atomic_store(&s->freed_gil, PyGILState_Check());
  atomic_store(&s->freed_by_helper, t_helper);
  atomic_fetch_add(&s->frees, 1);
  atomic_fetch_add(&g_pfrees, 1);
  free(v);
}

/* Owns the value: frees it after reading its slot. */
static PyObject *conv_pval(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  pval *v = out->value;
  CHECK(v != NULL);
  if (!v)
    Py_RETURN_NONE;
  int slot = v->slot;
  atomic_fetch_add(&g_ps[slot].conv_calls, 1);
  aiob_output_clear(out);
  return PyLong_FromLong(slot);
}

/* aiob_py_done_fn: records the call, its `cancelled` and where it ran. */
static void promise_done(void *arg, int cancelled) {
  pslot *s = arg;
  atomic_store(&s->done_cancelled, cancelled);
  atomic_store(&s->done_gil, PyGILState_Check());
  atomic_store(&s->done_on_test_thread,
               pthread_equal(pthread_self(), g_loop_thread) != 0);
  atomic_fetch_add(&s->done_calls, 1);
  latch_add(&g_pdone, 1);
}

/* Completes slot i's promise as its kind says: a pval, ValueError("p<i>"),
 * or FileNotFoundError for "f<i>". Any thread; the completer side is given
 * up (slot->p must not be used again: the promise may be freed). */
static int complete_slot(int i) {
  pslot *s = &g_ps[i];
  aiob_promise *p = s->p;
  char text[32];
  s->p = NULL;
  switch (s->kind) {
  case PK_RAISE:
    snprintf(text, sizeof text, "p%d", i);
    return aiob_py_promise_raise(p, PyExc_ValueError, text);
  case PK_PATH:
    snprintf(text, sizeof text, "f%d", i);
    return aiob_py_promise_fail_path(p, AIOB_ENOENT, text, NULL);
  default: {
    pval *v = malloc(sizeof *v);
    CHECK(v != NULL);
    if (!v)
      return aiob_promise_abandon(p);
    v->slot = i;
    int rc = aiob_promise_complete(p, 0, v, pval_free);
    if (rc < 0)
      free(v); /* not taken */
    return rc;
  }
  }
}

/* Helper threads of test 17: thread k completes slots k, k + n, ... */
#define HELPERS_MAX 8
static pthread_t g_helpers[HELPERS_MAX];
static int g_nhelpers, g_helpers_made;

static void *promise_helper(void *arg) {
  int k = (int)(intptr_t)arg, n = 0;
  t_helper = 1;
  CHECK(!PyGILState_Check());
  for (int i = k; i < PROMISE_N; i += g_nhelpers) {
    atomic_store(&g_ps[i].complete_rc, complete_slot(i));
    if (++n % 8 == 0)
      sched_yield(); /* let the loop and the other helpers in */
  }
  latch_add(&g_helpers_done, 1);
  return NULL;
}

/* Completes one slot on a thread of its own (no GIL) and waits for it. */
static void *complete_one(void *arg) {
  t_helper = 1;
  CHECK(!PyGILState_Check());
  int i = (int)(intptr_t)arg;
  atomic_store(&g_ps[i].complete_rc, complete_slot(i));
  latch_add(&g_helpers_done, 1);
  return NULL;
}

/* Test thread, GIL held: completes slot i from another thread. */
static void complete_off_thread(int i) {
  long before = latch_get(&g_helpers_done);
  pthread_t th = start_thread(complete_one, (void *)(intptr_t)i);
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = latch_wait(&g_helpers_done, before + 1, WAIT_TIMEOUT);
  if (rc == 0)
    pthread_join(th, NULL);
  Py_END_ALLOW_THREADS;
  if (rc != 0)
    fail_msg("the completing thread of slot %d did not finish", i);
}

static int slot_arg(PyObject *arg) {
  long i = PyLong_AsLong(arg);
  if (i == -1 && PyErr_Occurred())
    return -1;
  if (i < 0 || i >= PROMISE_N) {
    PyErr_SetString(PyExc_ValueError, "slot out of range");
    return -1;
  }
  return (int)i;
}

/* promise(i): slot i's awaitable (shape 1); its kind follows i. */
static PyObject *m_promise(PyObject *m, PyObject *arg) {
  (void)m;
  int i = slot_arg(arg);
  if (i < 0)
    return NULL;
  pslot *s = &g_ps[i];
  s->kind = promise_kind(i);
  return aiob_py_promise_new(g_bridge, "bcapi.promise", conv_pval, promise_done,
                             s, &s->p);
}

/* promise_go(n): n helper threads complete every slot's promise, started
 * with the GIL released; True if all started. */
static PyObject *m_promise_go(PyObject *m, PyObject *arg) {
  (void)m;
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred())
    return NULL;
  if (n < 1 || n > HELPERS_MAX)
    return PyErr_Format(PyExc_ValueError, "1 to %d helpers", HELPERS_MAX);
  g_nhelpers = (int)n;
  g_helpers_made = 0;
  Py_BEGIN_ALLOW_THREADS;
  for (int k = 0; k < g_nhelpers; k++)
    if (pthread_create(&g_helpers[k], NULL, promise_helper,
                       (void *)(intptr_t)k) == 0)
      g_helpers_made++;
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(g_helpers_made == g_nhelpers);
}

/* promise_join(): True once the helper threads finished (joined). */
static PyObject *m_promise_join(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = latch_wait(&g_helpers_done, g_helpers_made, WAIT_TIMEOUT);
  if (rc == 0)
    for (int k = 0; k < g_helpers_made; k++)
      pthread_join(g_helpers[k], NULL);
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(rc == 0 && g_helpers_made == g_nhelpers);
}

/* promise_wait_done(k): True once on_done ran k times (GIL released). */
static PyObject *m_promise_wait_done(PyObject *m, PyObject *arg) {
  (void)m;
  long k = PyLong_AsLong(arg);
  if (k == -1 && PyErr_Occurred())
    return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = latch_wait(&g_pdone, k, WAIT_TIMEOUT);
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(rc == 0);
}

/* Values among slots 0..n-1 of test 17. */
static int promise_values(int n) {
  int v = 0;
  for (int i = 0; i < n; i++)
    v += promise_kind(i) == PK_VALUE;
  return v;
}

/* promise_settled(): every on_done ran and every value was freed. Python
 * polls it while its loop runs: a value whose awaitable was cancelled
 * after the completion is freed by that loop's drain. */
static PyObject *m_promise_settled(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyBool_FromLong(latch_get(&g_pdone) >= PROMISE_N &&
                         atomic_load(&g_pfrees) >= promise_values(PROMISE_N));
}

/* promise_now(kind): slot 10 + kind's awaitable, completed at once on this
 * thread: 0 a value, 1 aiob_py_promise_raise(KeyError), 2 fail_path with
 * two names, 3 abandoned, 4 an errno. */
static PyObject *m_promise_now(PyObject *m, PyObject *arg) {
  (void)m;
  long kind = PyLong_AsLong(arg);
  if (kind == -1 && PyErr_Occurred())
    return NULL;
  if (kind < 0 || kind > 4)
    return PyErr_Format(PyExc_ValueError, "kind 0 to 4");
  int i = 10 + (int)kind;
  pslot *s = &g_ps[i];
  aiob_promise *p = NULL;
  PyObject *aw = aiob_py_promise_new(g_bridge, "bcapi.now", conv_pval,
                                     promise_done, s, &p);
  if (!aw)
    return NULL;
  int rc;
  switch (kind) {
  case 0: {
    pval *v = malloc(sizeof *v);
    CHECK(v != NULL);
    if (v)
      v->slot = i;
    rc = aiob_promise_complete(p, 0, v, v ? pval_free : NULL);
    break;
  }
  case 1:
    rc = aiob_py_promise_raise(p, PyExc_KeyError, "now");
    break;
  case 2:
    rc = aiob_py_promise_fail_path(p, AIOB_ENOENT, "a.txt", "b.txt");
    break;
  case 3:
    rc = aiob_promise_abandon(p);
    break;
  default:
    rc = aiob_promise_complete(p, AIOB_EACCES, NULL, NULL);
    break;
  }
  atomic_store(&s->complete_rc, rc);
  return aw;
}

/* ---- Blocking jobs (test 19) ---- */

typedef struct barg {
  int idx;
} barg;

typedef struct bval {
  int idx;
} bval;

/* drop_arg: once per job. A job whose fn never ran was cancelled. */
static void barg_drop(void *a) {
  barg *b = a;
  bslot *s = &g_bs[b->idx];
  if (atomic_load(&s->runs) == 0)
    latch_add(&g_blk_settled, 1);
  atomic_fetch_add(&s->drops, 1);
  free(b);
  latch_add(&g_blk_drops, 1);
}

static void bval_free(void *p) {
  bval *v = p;
  atomic_fetch_add(&g_bs[v->idx].frees, 1);
  free(v);
  latch_add(&g_blk_frees, 1);
}

static PyObject *conv_bval(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  bval *v = out->value;
  CHECK(v != NULL);
  if (!v)
    Py_RETURN_NONE;
  int idx = v->idx;
  atomic_fetch_add(&g_bs[idx].conv_calls, 1);
  aiob_output_clear(out);
  return PyLong_FromLong(idx);
}

/* Worker thread, no GIL: waits until the test opens the gate or the job is
 * cancelled (checked between bounded waits on the gate), then returns a
 * value. */
static int blk_fn(void *arg, aiob_output *out) {
  barg *b = arg;
  bslot *s = &g_bs[b->idx];
  CHECK(!PyGILState_Check());
  CHECK(!pthread_equal(pthread_self(), g_loop_thread));
  CHECK(aiob_task_current() == NULL); /* not inside a loop thread's poll */
  atomic_fetch_add(&s->runs, 1);
  int inside = atomic_fetch_add(&g_blk_inside, 1) + 1;
  int max = atomic_load(&g_blk_inside_max);
  while (inside > max &&
         !atomic_compare_exchange_weak(&g_blk_inside_max, &max, inside))
    ;
  latch_add(&g_blk_entered, 1);
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  for (;;) {
    if (aiob_blocking_cancelled()) {
      atomic_store(&s->saw_cancel, 1);
      latch_add(&g_blk_settled, 1);
      break;
    }
    if (latch_wait(&g_blk_gate, 1, AIOB_MSEC) == 0)
      break;
    if (aiob_now_ns() > deadline) {
      CHECK(!"blocking job: neither the gate opened nor a cancel came");
      break;
    }
  }
  atomic_fetch_sub(&g_blk_inside, 1);
  bval *v = malloc(sizeof *v);
  CHECK(v != NULL);
  if (v) {
    v->idx = b->idx;
    out->value = v;
    out->free_value = bval_free;
  }
  return 0;
}

/* blocking(i): job i on the bridge runtime's pool (shape 2). */
static PyObject *m_blocking(PyObject *m, PyObject *arg) {
  (void)m;
  long i = PyLong_AsLong(arg);
  if (i == -1 && PyErr_Occurred())
    return NULL;
  if (i < 0 || i >= BLK_N)
    return PyErr_Format(PyExc_ValueError, "job out of range");
  barg *a = malloc(sizeof *a);
  if (!a)
    return PyErr_NoMemory();
  a->idx = (int)i;
  return aiob_py_run_blocking(g_bridge, "bcapi.blocking", blk_fn, a, barg_drop,
                              conv_bval);
}

static aiob_runtime_stats default_stats(void) {
  aiob_runtime_stats st = {0};
  aiob_runtime *rt = NULL;
  if (aiob_runtime_default_acquire(&rt) == 0) {
    aiob_runtime_stats_get(rt, &st);
    aiob_runtime_release(rt);
  }
  return st;
}

static PyObject *m_rt_polls(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyLong_FromUnsignedLongLong(default_stats().polls);
}

static void mark_loop(void *arg, int status) {
  (void)status;
  latch_add(arg, 1);
}

/* blocking_queued(base, n): True once n polls started on the default
 * runtime since `base` (the first poll of a job's task queues it) and then
 * every loop thread ran a call queued behind them: the polls are over,
 * every job is in the pool. GIL released. */
static PyObject *m_blocking_queued(PyObject *m, PyObject *args) {
  (void)m;
  unsigned long long base;
  long n;
  if (!PyArg_ParseTuple(args, "Kl:blocking_queued", &base, &n))
    return NULL;
  aiob_runtime *rt = NULL;
  if (aiob_runtime_default_acquire(&rt) < 0)
    Py_RETURN_FALSE;
  int ok = 0;
  latch marks;
  latch_init(&marks);
  Py_BEGIN_ALLOW_THREADS;
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  for (;;) {
    aiob_runtime_stats st;
    aiob_runtime_stats_get(rt, &st);
    if (st.polls - base >= (unsigned long long)n) {
      ok = 1;
      break;
    }
    if (aiob_now_ns() > deadline)
      break;
    sleep_thread_ns(AIOB_MSEC);
  }
  unsigned loops = aiob_runtime_threads(rt), queued = 0;
  for (unsigned k = 0; ok && k < loops; k++)
    queued += aiob_runtime_call(rt, k, mark_loop, &marks) == 0;
  ok = ok && queued == loops &&
       latch_wait(&marks, (long)loops, WAIT_TIMEOUT) == 0;
  Py_END_ALLOW_THREADS;
  latch_destroy(&marks);
  aiob_runtime_release(rt);
  return PyBool_FromLong(ok);
}

/* blocking_busy(): True once as many fn calls started as the pool has
 * workers (GIL released). */
static PyObject *m_blocking_busy(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  aiob_runtime *rt = NULL;
  if (aiob_runtime_default_acquire(&rt) < 0)
    Py_RETURN_FALSE;
  long pool = (long)aiob_runtime_blocking_threads(rt);
  aiob_runtime_release(rt);
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = latch_wait(&g_blk_entered, pool, WAIT_TIMEOUT);
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(rc == 0);
}

/* blocking_running(): the jobs whose fn started. */
static PyObject *m_blocking_running(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  PyObject *l = PyList_New(0);
  for (int i = 0; l && i < BLK_N; i++) {
    if (!atomic_load(&g_bs[i].runs))
      continue;
    PyObject *n = PyLong_FromLong(i);
    if (!n || PyList_Append(l, n) < 0)
      Py_CLEAR(l);
    Py_XDECREF(n);
  }
  return l;
}

/* blocking_settle(k): True once k cancelled jobs were dropped unrun or saw
 * aiob_blocking_cancelled() in fn (GIL released). */
static PyObject *m_blocking_settle(PyObject *m, PyObject *arg) {
  (void)m;
  long k = PyLong_AsLong(arg);
  if (k == -1 && PyErr_Occurred())
    return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = latch_wait(&g_blk_settled, k, WAIT_TIMEOUT);
  Py_END_ALLOW_THREADS;
  return PyBool_FromLong(rc == 0);
}

static PyObject *m_blocking_open(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  latch_add(&g_blk_gate, 1);
  Py_RETURN_NONE;
}

/* ---- Blocking jobs that fail (test 20) ---- */

enum { B2_VALUE, B2_ENOENT, B2_EACCES, B2_POSITIVE, B2_BIGNEG, B2_MODES };

typedef struct b2arg {
  int mode;
} b2arg;

static void b2_drop(void *a) {
  atomic_fetch_add(&g_b2_drops, 1);
  free(a);
}

static void b2_free(void *p) {
  atomic_fetch_add(&g_b2_frees, 1);
  free(p);
}

static PyObject *conv_b2(aiob_output *out) {
  CHECK(on_loop_thread_with_gil());
  atomic_fetch_add(&g_b2_convs, 1);
  long v = out->value ? *(int *)out->value : -1;
  aiob_output_clear(out);
  return PyLong_FromLong(v);
}

/* Worker thread: a value (7), an errno, a positive return with a value, or
 * a status below the errno range. */
static int b2_fn(void *arg, aiob_output *out) {
  b2arg *a = arg;
  CHECK(!PyGILState_Check());
  CHECK(!pthread_equal(pthread_self(), g_loop_thread));
  atomic_fetch_add(&g_b2_runs, 1);
  if (a->mode == B2_VALUE || a->mode == B2_POSITIVE) {
    int *v = malloc(sizeof *v);
    CHECK(v != NULL);
    if (v) {
      *v = 7;
      out->value = v;
      out->free_value = b2_free;
    }
  }
  switch (a->mode) {
  case B2_ENOENT:
    return AIOB_ENOENT;
  case B2_EACCES:
    return AIOB_EACCES;
  case B2_POSITIVE:
    return 5;
  case B2_BIGNEG:
    return -200000;
  default:
    return 0;
  }
}

/* A job of `mode` (-1: a NULL fn) as aiob_py_run_blocking's awaitable. */
static PyObject *run_b2(int mode) {
  b2arg *a = malloc(sizeof *a);
  if (!a)
    return PyErr_NoMemory();
  a->mode = mode;
  return aiob_py_run_blocking(g_bridge, "bcapi.blk", mode < 0 ? NULL : b2_fn, a,
                              b2_drop, conv_b2);
}

static PyObject *m_blocking_mode(PyObject *m, PyObject *arg) {
  (void)m;
  long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred())
    return NULL;
  if (mode < -1 || mode >= B2_MODES)
    return PyErr_Format(PyExc_ValueError, "mode -1 to %d", B2_MODES - 1);
  return run_b2((int)mode);
}

/* ---- Named tasks (test 21) ---- */

enum {
  NM_NAP,           /* sleeps 60 s (cancelled by the test) */
  NM_FAIL_POSITIVE, /* aiob_task_fail(self, 5) */
  NM_FAIL_BIGNEG,   /* aiob_task_fail(self, -200000) */
  NM_FAIL_PATH,     /* aiob_py_task_fail_path(self, AIOB_ENOENT, "a", "b") */
  NM_FAIL_PATH_BAD, /* aiob_py_task_fail_path(self, 5, "a", "b") */
  NM_NAME,          /* records aiob_task_name(self) */
};

typedef struct named {
  int mode;
  int armed;
  aiob_sleep sleep;
} named;

static aiob_poll named_poll(aiob_task *t, void *p) {
  named *n = p;
  switch (n->mode) {
  case NM_NAP:
    if (!n->armed) {
      aiob_sleep_init(&n->sleep, 60 * AIOB_SEC);
      n->armed = 1;
    }
    return aiob_sleep_poll(t, &n->sleep, NULL);
  case NM_FAIL_POSITIVE:
    atomic_store(&g_fail_rc[n->mode], aiob_task_fail(t, 5));
    return AIOB_READY;
  case NM_FAIL_BIGNEG:
    atomic_store(&g_fail_rc[n->mode], aiob_task_fail(t, -200000));
    return AIOB_READY;
  case NM_FAIL_PATH:
    atomic_store(&g_fail_rc[n->mode],
                 aiob_py_task_fail_path(t, AIOB_ENOENT, "a", "b"));
    return AIOB_READY;
  case NM_FAIL_PATH_BAD:
    atomic_store(&g_fail_rc[n->mode], aiob_py_task_fail_path(t, 5, "a", "b"));
    return AIOB_READY;
  default:
    atomic_store(&g_seen_name, (uintptr_t)aiob_task_name(t));
    return AIOB_READY;
  }
}
static void named_drop(void *p) { free(p); }
static const aiob_task_vtable named_vt = {
    .poll = named_poll, .drop = named_drop, .name = "bcapi.x"};

static PyObject *m_named(PyObject *m, PyObject *arg) {
  (void)m;
  long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred())
    return NULL;
  if (mode < 0 || mode >= NM_MODES)
    return PyErr_Format(PyExc_ValueError, "mode 0 to %d", NM_MODES - 1);
  named *n = calloc(1, sizeof *n);
  if (!n)
    return PyErr_NoMemory();
  n->mode = (int)mode;
  PyObject *f = aiob_py_future_into_py(g_bridge, &named_vt, n, NULL);
  if (!f)
    free(n);
  return f;
}

/* test 22: a C task summing the ints of a Python async iterator. */
typedef struct aiter_job {
  int co;
  PyObject *agen;         /* owned */
  aiob_py_locals *locals; /* owned; NULL: the CTask's own */
  aiob_py_aiter it;
  aiob_output item;
  size_t window;
  long sum;
} aiter_job;

/* Documented: on the loop thread (here the test thread), with the GIL. */
static int aiter_to_long(PyObject *obj, aiob_output *out) {
  CHECK(PyGILState_Check());
  CHECK(pthread_equal(pthread_self(), g_loop_thread));
  atomic_fetch_add(&g_ai_convs, 1);
  long v = PyLong_AsLong(obj);
  if (v == -1 && PyErr_Occurred())
    return -1;
  out->value = (void *)(intptr_t)v;
  return 0;
}

static aiob_poll aiter_job_poll(aiob_task *t, void *p) {
  aiter_job *j = p;
  AIOB_BEGIN(&j->co);
  aiob_py_aiter_init(&j->it, j->agen, j->window, aiter_to_long);
  if (j->locals)
    aiob_py_aiter_set_locals(&j->it, j->locals);
  for (;;) {
    AIOB_AWAIT(&j->co, aiob_py_aiter_next(t, &j->it, &j->item));
    if (j->item.status != 0)
      break;
    j->sum += (long)(intptr_t)j->item.value;
    atomic_fetch_add(&g_ai_items, 1);
  }
  if (j->item.status != AIOB_PY_STREAM_END)
    return aiob_task_forward(t, &j->item);
  aiob_task_return(t, (void *)(intptr_t)j->sum, NULL);
  AIOB_END(&j->co);
}

static void aiter_job_drop(void *p) {
  aiter_job *j = p;
  CHECK(!PyGILState_Check()); /* a runtime thread */
  aiob_py_aiter_close(&j->it);
  aiob_output_clear(&j->item);
  aiob_py_release(j->agen);
  aiob_py_locals_release(j->locals);
  free(j);
  atomic_fetch_add(&g_ai_drops, 1);
}

static const aiob_task_vtable aiter_vt = {
    .poll = aiter_job_poll, .drop = aiter_job_drop, .name = "bcapi.aiter"};

static PyObject *conv_sum(aiob_output *out) {
  return PyLong_FromLong((long)(intptr_t)out->value);
}

static aiter_job *aiter_job_new(PyObject *agen, Py_ssize_t window) {
  aiter_job *j = calloc(1, sizeof *j);
  if (!j)
    return (aiter_job *)PyErr_NoMemory();
  Py_INCREF(agen);
  j->agen = agen;
  j->window = (size_t)window;
  return j;
}

/* aiter_sum(agen, window) -> CTask: the sum of the items. */
static PyObject *m_aiter_sum(PyObject *m, PyObject *args) {
  (void)m;
  PyObject *agen;
  Py_ssize_t window;
  if (!PyArg_ParseTuple(args, "On:aiter_sum", &agen, &window))
    return NULL;
  aiter_job *j = aiter_job_new(agen, window);
  if (!j)
    return NULL;
  PyObject *f = aiob_py_future_into_py(g_bridge, &aiter_vt, j, conv_sum);
  if (!f) {
    Py_DECREF(agen);
    free(j);
  }
  return f;
}

/* aiter_plain(loop or None, agen) -> (status, sum): a plain task on the
 * runtime iterates with aiob_py_aiter_set_locals (loop) or without; the
 * calling thread (not the loop's) waits for it without the GIL. */
static PyObject *m_aiter_plain(PyObject *m, PyObject *args) {
  (void)m;
  PyObject *loop, *agen;
  if (!PyArg_ParseTuple(args, "OO:aiter_plain", &loop, &agen))
    return NULL;
  aiob_py_locals *l = NULL;
  if (loop != Py_None && !(l = aiob_py_locals_new(g_bridge, loop, NULL)))
    return NULL;
  aiter_job *j = aiter_job_new(agen, 3);
  if (!j) {
    aiob_py_locals_release(l);
    return NULL;
  }
  j->locals = l;
  aiob_runtime *rt = NULL;
  aiob_task *h = NULL;
  int rc = aiob_runtime_default(&rt);
  if (rc == 0)
    rc = aiob_spawn(rt, &aiter_vt, j, &h);
  if (rc < 0) {
    Py_DECREF(agen);
    aiob_py_locals_release(l);
    free(j);
    return PyErr_Format(PyExc_OSError, "aiter_plain: spawn: %s",
                        aiob_strerror(rc));
  }
  PyThreadState *ts = PyEval_SaveThread(); /* the loop needs the GIL */
  rc = aiob_task_wait(h, WAIT_TIMEOUT);
  PyEval_RestoreThread(ts);
  aiob_output o = {0};
  if (rc == 0)
    rc = aiob_task_take_output(h, &o);
  else
    aiob_task_cancel(h);
  aiob_task_release(h);
  if (rc < 0)
    return PyErr_Format(PyExc_TimeoutError, "aiter_plain: %s",
                        aiob_strerror(rc));
  long sum = o.status == 0 ? (long)(intptr_t)o.value : 0;
  int status = o.status;
  aiob_output_clear(&o);
  return Py_BuildValue("(il)", status, sum);
}

static PyObject *m_aiter_counts(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return Py_BuildValue("(iii)", atomic_load(&g_ai_drops),
                       atomic_load(&g_ai_items), atomic_load(&g_ai_convs));
}

/* test 23 (C streams): a producer sending n boxed items (n < 0: without
 * end), each freed once, counted; its drops counted. */
static atomic_int g_cs_drops, g_cs_made, g_cs_freed;

typedef struct cs_prod {
  long i, n;
  long *box; /* not sent yet */
} cs_prod;

static void cs_box_free(void *p) {
  atomic_fetch_add(&g_cs_freed, 1);
  free(p);
}

static aiob_poll cs_prod_poll(aiob_task *t, void *p) {
  cs_prod *c = p;
  aiob_py_stream *s = aiob_py_stream_of(t);
  CHECK(s != NULL);
  for (; c->n < 0 || c->i < c->n; c->i++) {
    if (!c->box) {
      c->box = malloc(sizeof *c->box);
      CHECK(c->box != NULL);
      atomic_fetch_add(&g_cs_made, 1);
    }
    *c->box = c->i;
    int st;
    if (aiob_py_stream_send(t, s, c->box, cs_box_free, &st) == AIOB_PENDING)
      return AIOB_PENDING;
    if (st < 0) {
      CHECK(st == AIOB_EPIPE);
      return AIOB_READY; /* the box is still ours: freed in the drop */
    }
    c->box = NULL;
  }
  return AIOB_READY;
}

static void cs_prod_drop(void *p) {
  cs_prod *c = p;
  if (c->box)
    cs_box_free(c->box);
  atomic_fetch_add(&g_cs_drops, 1);
  free(c);
}

static const aiob_task_vtable cs_prod_vt = {
    .poll = cs_prod_poll, .drop = cs_prod_drop, .name = "bcapi.cstream"};

static PyObject *cs_unbox(aiob_output *out) {
  CHECK(PyGILState_Check()); /* on its loop thread, which holds the GIL */
  PyObject *v = PyLong_FromLong(*(long *)out->value);
  aiob_output_clear(out);
  return v;
}

/* cstream(n, capacity) -> aiobridge.CStream */
static PyObject *m_cstream(PyObject *m, PyObject *args) {
  (void)m;
  long n, cap;
  if (!PyArg_ParseTuple(args, "ll", &n, &cap))
    return NULL;
  cs_prod *c = calloc(1, sizeof *c);
  if (!c)
    return PyErr_NoMemory();
  c->n = n;
  PyObject *it =
      aiob_py_stream_new(g_bridge, NULL, (size_t)cap, cs_unbox, &cs_prod_vt, c);
  if (!it)
    free(c);
  return it;
}

static PyObject *m_cstream_counts(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return Py_BuildValue("(iii)", atomic_load(&g_cs_drops),
                       atomic_load(&g_cs_made), atomic_load(&g_cs_freed));
}

static PyMethodDef bcapi_methods[] = {
    {"cstream", m_cstream, METH_VARARGS, NULL},
    {"cstream_counts", m_cstream_counts, METH_NOARGS, NULL},
    {"gate_block", m_gate_block, METH_O, NULL},
    {"gate_entered", m_gate_entered, METH_O, NULL},
    {"probe_object", m_probe_object, METH_NOARGS, NULL},
    {"value", m_value, METH_O, NULL},
    {"none", m_none, METH_NOARGS, NULL},
    {"sleep_us", m_sleep_us, METH_O, NULL},
    {"local_nap", m_local_nap, METH_O, NULL},
    {"local_await", m_local_await, METH_O, NULL},
    {"local_info", m_local_info, METH_NOARGS, NULL},
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
    {"promise", m_promise, METH_O, NULL},
    {"promise_go", m_promise_go, METH_O, NULL},
    {"promise_join", m_promise_join, METH_NOARGS, NULL},
    {"promise_wait_done", m_promise_wait_done, METH_O, NULL},
    {"promise_settled", m_promise_settled, METH_NOARGS, NULL},
    {"promise_now", m_promise_now, METH_O, NULL},
    {"blocking", m_blocking, METH_O, NULL},
    {"rt_polls", m_rt_polls, METH_NOARGS, NULL},
    {"blocking_queued", m_blocking_queued, METH_VARARGS, NULL},
    {"blocking_busy", m_blocking_busy, METH_NOARGS, NULL},
    {"blocking_running", m_blocking_running, METH_NOARGS, NULL},
    {"blocking_settle", m_blocking_settle, METH_O, NULL},
    {"blocking_open", m_blocking_open, METH_NOARGS, NULL},
    {"blocking_mode", m_blocking_mode, METH_O, NULL},
    {"named", m_named, METH_O, NULL},
    {"aiter_sum", m_aiter_sum, METH_VARARGS, NULL},
    {"aiter_plain", m_aiter_plain, METH_VARARGS, NULL},
    {"aiter_counts", m_aiter_counts, METH_NOARGS, NULL},
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

/* Test thread: runs `code` with `obj` bound to `name` in its globals, and
 * returns them; fails the test if it raised. */
static PyObject *run_ok_with(const char *code, const char *name,
                             PyObject *obj) {
  PyObject *g = PyDict_New();
  assert_non_null(g);
  assert_int_equal(PyDict_SetItemString(g, name, obj), 0);
  PyObject *r = PyRun_String(code, Py_file_input, g, g);
  if (!r) {
    PyErr_Print();
    fail_msg("Python snippet failed (traceback above)");
  }
  Py_DECREF(r);
  return g;
}

static const char *py_str_at(PyObject *list, Py_ssize_t i) {
  PyObject *v = PyList_GET_ITEM(list, i);
  if (v == Py_None)
    return NULL;
  const char *s = PyUnicode_AsUTF8(v);
  assert_non_null(s);
  return s;
}

static int str_is(const char *s, const char *want) {
  return s && strcmp(s, want) == 0;
}

/* ======================================================================== */
/* 17. Shape 1 under races: 2000 promise awaitables in a running loop, each */
/*     completed (a value, aiob_py_promise_raise or _fail_path) by one of   */
/*     four helper threads without the GIL, while Python cancels a random   */
/*     subset before the helpers start, while they run, and after they      */
/*     finished (before the loop drained the completions). Every value is   */
/*     freed exactly once (by the converter, or unseen); on_done runs once  */
/*     per awaitable on a runtime thread without the GIL, with cancelled=1  */
/*     only for awaitables Python cancelled before the completion came (so  */
/*     always for those whose on_done ran before the helpers started, never */
/*     for those cancelled after the helpers finished); every awaitable     */
/*     Python did not cancel gets its value or its exception.               */
static void test_promise_races(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi, random\n"
      "N = 2000\n"
      "seed = random.randrange(1 << 30)\n"
      "async def settle():\n"
      "    while not bcapi.promise_settled():\n"
      "        await asyncio.sleep(0.001)\n"
      "def outcome(i, r):\n"
      "    if isinstance(r, asyncio.CancelledError):\n"
      "        return 'cancelled'\n"
      "    if type(r) is int and r == i:\n"
      "        return 'value'\n"
      "    if type(r) is ValueError and str(r) == f'p{i}':\n"
      "        return 'raise'\n"
      "    if (type(r) is FileNotFoundError and r.errno == 2\n"
      "            and r.filename == f'f{i}' and r.filename2 is None):\n"
      "        return 'path'\n"
      "    return repr(r)\n"
      "async def main():\n"
      "    rnd = random.Random(seed)\n"
      "    fs = [bcapi.promise(i) for i in range(N)]\n"
      "    how = [None] * N\n"
      "    pre = rnd.sample(range(N), N // 10)\n"
      "    for i in pre:\n"
      "        if fs[i].cancel():\n"
      "            how[i] = 'pre'\n"
      "    pre_done = bcapi.promise_wait_done(len(pre))\n"
      "    started = bcapi.promise_go(4)\n"
      "    for i in range(N):\n"
      "        if how[i] is None and rnd.random() < 0.25 and fs[i].cancel():\n"
      "            how[i] = 'during'\n"
      "        if i % 64 == 0:\n"
      "            await asyncio.sleep(0)\n"
      "    joined = bcapi.promise_join()\n"
      "    for i in range(N):\n"
      "        if how[i] is None and rnd.random() < 0.1 and fs[i].cancel():\n"
      "            how[i] = 'after'\n"
      "    res = await asyncio.gather(*fs, return_exceptions=True)\n"
      "    await settle()\n"
      "    return (pre_done, started, joined, how,\n"
      "            [outcome(i, r) for i, r in enumerate(res)])\n"
      "pre_done, started, joined, how, out = asyncio.run(\n"
      "    asyncio.wait_for(main(), 120))\n");
  long seed = py_long(g, "seed");
  assert_py_true(g, "pre_done");
  assert_py_true(g, "started");
  assert_py_true(g, "joined");
  PyObject *how = py_get(g, "how"), *out = py_get(g, "out");
  assert_int_equal(PyList_GET_SIZE(how), PROMISE_N);
  assert_int_equal(PyList_GET_SIZE(out), PROMISE_N);
  static const char *const kinds[] = {"value", "raise", "path"};
  int n_cancel[4] = {0}, n_done_cancelled = 0, n_delivered = 0;
  for (int i = 0; i < PROMISE_N; i++) {
    pslot *s = &g_ps[i];
    const char *h = py_str_at(how, i), *o = py_str_at(out, i);
    const char *want = kinds[s->kind];
    int cancelled = atomic_load(&s->done_cancelled);
    int conv = atomic_load(&s->conv_calls), frees = atomic_load(&s->frees);
#define SLOT_FAIL(what)                                                        \
  fail_msg("seed %ld, slot %d (%s, cancel %s, outcome %s, on_done(%d) x%d, "   \
           "conv %d, frees %d): %s",                                           \
           seed, i, want, h ? h : "none", o, cancelled,                        \
           atomic_load(&s->done_calls), conv, frees, what)
    if (atomic_load(&s->complete_rc) != 0)
      SLOT_FAIL("the completion did not return 0");
    if (atomic_load(&s->done_calls) != 1)
      SLOT_FAIL("on_done not called exactly once");
    if (atomic_load(&s->done_gil) != 0 ||
        atomic_load(&s->done_on_test_thread) != 0)
      SLOT_FAIL("on_done ran with the GIL or on the asyncio loop's thread");
    if (!h && (!str_is(o, want) || cancelled != 0))
      SLOT_FAIL("not cancelled by Python, yet no result or cancelled=1");
    if (h && !str_is(o, "cancelled"))
      SLOT_FAIL("cancelled by Python, yet not CancelledError");
    if (cancelled == 1 && conv != 0)
      SLOT_FAIL("cancelled=1 but the value was converted");
    if (str_is(h, "pre") && cancelled != 1)
      SLOT_FAIL("on_done ran before any completion, yet cancelled=0");
    if (str_is(h, "after") && cancelled != 0)
      SLOT_FAIL("cancelled after its completion, yet cancelled=1");
    if (s->kind == PK_VALUE) {
      if (frees != 1)
        SLOT_FAIL("the value was not freed exactly once");
      if (conv != str_is(o, "value"))
        SLOT_FAIL("converter calls differ from values delivered");
      if (cancelled == 1 && atomic_load(&s->freed_gil) != 0)
        SLOT_FAIL("a value completed after the cancellation was freed with "
                  "the GIL");
    } else if (frees != 0 || conv != 0) {
      SLOT_FAIL("an exception completion went through a value's path");
    }
#undef SLOT_FAIL
    n_cancel[str_is(h, "pre") ? 1 : str_is(h, "during") ? 2 : h ? 3 : 0]++;
    n_done_cancelled += cancelled == 1;
    n_delivered += conv;
  }
  assert_int_equal(n_cancel[0] + n_cancel[1] + n_cancel[2] + n_cancel[3],
                   PROMISE_N);
  assert_int_equal(atomic_load(&g_pfrees), promise_values(PROMISE_N));
  assert_int_equal(latch_get(&g_pdone), PROMISE_N);
  print_message("    promise races (seed %ld): cancelled %d before, %d "
                "during, %d after; on_done(cancelled=1) %d; values "
                "converted %d\n",
                seed, n_cancel[1], n_cancel[2], n_cancel[3], n_done_cancelled,
                n_delivered);
  Py_DECREF(g);
  Py_DECREF(run_ok("import gc\ngc.collect()\n"));
  assert_int_equal(atomic_load(&g_pfrees), promise_values(PROMISE_N));
  assert_clean();
}

/* ======================================================================== */
/* 18. Shape 1 without a running loop and its return codes. An awaitable    */
/*     collected unawaited (refcount, close(), a reference cycle) calls     */
/*     on_done(cancelled=1) at once on the collecting thread with the GIL;  */
/*     the completion from a thread without the GIL then frees the value    */
/*     there, touching no Python. A completed promise whose awaitable still */
/*     holds it: the second completion of any kind is AIOB_EALREADY, bad    */
/*     arguments AIOB_EINVAL, and the value awaited later is the first.     */
/*     In a running loop each completion kind raises what it should, and a  */
/*     shutdown under a pending one is on_done(1) and ShutdownError.        */
static void test_promise_unawaited(void **state) {
  (void)state;
  static const struct {
    int kind, how; /* how: 0 refcount, 1 close(), 2 a reference cycle */
  } cases[] = {
      {PK_VALUE, 0}, {PK_VALUE, 1}, {PK_VALUE, 2}, {PK_RAISE, 0}, {PK_PATH, 1},
  };
  for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
    pslot *s = &g_ps[c];
    s->kind = cases[c].kind;
    PyObject *aw = aiob_py_promise_new(g_bridge, "bcapi.orphan", conv_pval,
                                       promise_done, s, &s->p);
    if (!aw)
      PyErr_Print();
    assert_non_null(aw);
    assert_non_null(s->p);
    assert_int_equal(atomic_load(&s->done_calls), 0);
    if (cases[c].how == 0) {
      Py_DECREF(aw);
    } else if (cases[c].how == 1) {
      PyObject *r = PyObject_CallMethod(aw, "close", NULL);
      assert_non_null(r);
      Py_DECREF(r);
      assert_int_equal(atomic_load(&s->done_calls), 1); /* at close() */
      Py_DECREF(aw);
    } else {
      PyObject *l = PyList_New(0);
      assert_non_null(l);
      assert_int_equal(PyList_Append(l, aw), 0);
      assert_int_equal(PyList_Append(l, l), 0);
      Py_DECREF(aw);
      Py_DECREF(l);
      assert_int_equal(atomic_load(&s->done_calls), 0); /* in the cycle */
      PyGC_Collect();
    }
    assert_int_equal(atomic_load(&s->done_calls), 1);
    assert_int_equal(atomic_load(&s->done_cancelled), 1);
    assert_int_equal(atomic_load(&s->done_gil), 1);
    assert_int_equal(atomic_load(&s->done_on_test_thread), 1);
    complete_off_thread(c);
    assert_rc(atomic_load(&s->complete_rc), 0);
    assert_int_equal(atomic_load(&s->conv_calls), 0);
    if (s->kind == PK_VALUE) {
      assert_int_equal(atomic_load(&s->frees), 1);
      assert_int_equal(atomic_load(&s->freed_by_helper), 1);
      assert_int_equal(atomic_load(&s->freed_gil), 0);
    }
  }
  assert_int_equal(atomic_load(&g_pfrees), 3);
  assert_int_equal(latch_get(&g_pdone), 5);

  /* Return codes while the (unbound) awaitable holds the promise. */
  pslot *s = &g_ps[5];
  aiob_promise *p = NULL;
  PyObject *aw = aiob_py_promise_new(g_bridge, "bcapi.held", conv_pval,
                                     promise_done, s, &p);
  assert_non_null(aw);
  pval *v = xcalloc(1, sizeof *v);
  v->slot = 5;
  assert_rc(aiob_promise_complete(p, 0, v, pval_free), 0);
  pval other = {.slot = 5}; /* must not be touched: not freed */
  assert_rc(aiob_promise_complete(p, 0, &other, pval_free), AIOB_EALREADY);
  assert_rc(aiob_promise_abandon(p), AIOB_EALREADY);
  assert_rc(aiob_py_promise_raise(p, PyExc_ValueError, "late"), AIOB_EALREADY);
  assert_rc(aiob_py_promise_fail_path(p, AIOB_ENOENT, "a", "b"), AIOB_EALREADY);
  assert_rc(aiob_py_promise_raise(NULL, PyExc_ValueError, "x"), AIOB_EINVAL);
  assert_rc(aiob_py_promise_raise(p, NULL, "x"), AIOB_EINVAL);
  assert_rc(aiob_py_promise_fail_path(NULL, AIOB_ENOENT, "a", NULL),
            AIOB_EINVAL);
  assert_rc(aiob_py_promise_fail_path(p, 0, "a", NULL), AIOB_EINVAL);
  assert_rc(aiob_py_promise_fail_path(p, 5, "a", NULL), AIOB_EINVAL);
  assert_rc(aiob_py_promise_fail_path(p, -200000, "a", NULL), AIOB_EINVAL);
  assert_rc(aiob_promise_complete(NULL, 0, NULL, NULL), AIOB_EINVAL);
  assert_int_equal(atomic_load(&s->frees), 0);
  assert_int_equal(atomic_load(&s->done_calls), 0);
  PyObject *g = run_ok_with("import asyncio\n"
                            "r = asyncio.run(asyncio.wait_for(aw, 10))\n"
                            "del aw\n",
                            "aw", aw);
  Py_DECREF(aw);
  assert_int_equal(py_long(g, "r"), 5); /* the first completion's */
  Py_DECREF(g);
  assert_int_equal(atomic_load(&s->conv_calls), 1);
  assert_int_equal(atomic_load(&s->frees), 1);
  assert_int_equal(atomic_load(&s->done_calls), 1);
  assert_int_equal(atomic_load(&s->done_cancelled), 0);
  assert_int_equal(atomic_load(&s->done_gil), 0); /* a runtime thread */

  /* Refused: no bridge, or no place for the completer; on_done never. */
  p = NULL;
  assert_null(aiob_py_promise_new(g_bridge, "bcapi.bad", conv_pval,
                                  promise_done, &g_ps[6], NULL));
  assert_py_error(PyExc_ValueError);
  assert_null(aiob_py_promise_new(NULL, "bcapi.bad", conv_pval, promise_done,
                                  &g_ps[6], &p));
  assert_py_error(PyExc_ValueError);
  assert_null(p);
  assert_int_equal(atomic_load(&g_ps[6].done_calls), 0);

  /* Each kind of completion, in a running loop. */
  g = run_ok("import asyncio, bcapi\n"
             "async def outcome(f):\n"
             "    try:\n"
             "        return ('value', await f)\n"
             "    except OSError as e:\n"
             "        return (type(e).__name__, e.errno, e.filename,\n"
             "                e.filename2)\n"
             "    except BaseException as e:\n"
             "        return (type(e).__name__, str(e))\n"
             "async def main():\n"
             "    return [await outcome(bcapi.promise_now(k))\n"
             "            for k in range(5)]\n"
             "r = asyncio.run(asyncio.wait_for(main(), 10))\n"
             "want = [('value', 10), ('KeyError', \"'now'\"),\n"
             "        ('FileNotFoundError', 2, 'a.txt', 'b.txt'),\n"
             "        ('CancelledError', ''),\n"
             "        ('PermissionError', 13, None, None)]\n"
             "ok = r == want\n");
  PyObject *ok = py_get(g, "ok");
  if (ok != Py_True) {
    PyObject *r = PyObject_Repr(py_get(g, "r"));
    fail_msg("promise outcomes: %s", r ? PyUnicode_AsUTF8(r) : "?");
  }
  Py_DECREF(g);
  for (int i = 10; i < 15; i++) {
    assert_rc(atomic_load(&g_ps[i].complete_rc), 0);
    assert_int_equal(atomic_load(&g_ps[i].done_calls), 1);
    assert_int_equal(atomic_load(&g_ps[i].done_cancelled), 0);
    assert_int_equal(atomic_load(&g_ps[i].done_gil), 0);
  }
  assert_int_equal(atomic_load(&g_ps[10].conv_calls), 1);
  assert_int_equal(atomic_load(&g_ps[10].frees), 1);

  /* A runtime shut down under a pending awaitable: ShutdownError, and
   * on_done(1) on the runtime's thread before Python sees it; the late
   * completion is freed on its own thread. */
  s = &g_ps[20];
  g = run_ok("import asyncio, aiobridge, bcapi\n"
             "async def main():\n"
             "    f = bcapi.promise(20)\n"
             "    aiobridge.shutdown()\n"
             "    try:\n"
             "        return repr(await asyncio.wait_for(f, 10))\n"
             "    except BaseException as e:\n"
             "        return type(e).__name__\n"
             "r = asyncio.run(asyncio.wait_for(main(), 30))\n");
  assert_py_str(g, "r", "ShutdownError");
  Py_DECREF(g);
  assert_int_equal(atomic_load(&s->done_calls), 1);
  assert_int_equal(atomic_load(&s->done_cancelled), 1);
  assert_int_equal(atomic_load(&s->done_gil), 0);
  assert_int_equal(atomic_load(&s->done_on_test_thread), 0);
  complete_off_thread(20);
  assert_rc(atomic_load(&s->complete_rc), 0);
  assert_int_equal(atomic_load(&s->frees), 1);
  assert_int_equal(atomic_load(&s->freed_by_helper), 1);
  assert_int_equal(atomic_load(&s->conv_calls), 0);
  assert_clean();
}

/* ======================================================================== */
/* 19. Shape 2 under a cancel storm: 500 jobs on the bridge runtime's pool  */
/*     of the default size, whose fn waits on a gate the test holds. Once   */
/*     every job is queued and every worker is inside fn, Python cancels    */
/*     half the running jobs and a random half overall, and the test waits  */
/*     until each cancelled job was dropped unrun or saw                    */
/*     aiob_blocking_cancelled() in fn; then the gate opens. Every          */
/*     uncancelled job returns its value through the converter; drop_arg    */
/*     runs once per job; fn never ran for a job cancelled while queued     */
/*     (runs + blocking_jobs_cancelled == 500); values of jobs cancelled    */
/*     while running are freed once, unseen; at most the pool's bound of fn */
/*     calls ever run at once, and the pool fills up to it.                 */
static void test_blocking_cancel_storm(void **state) {
  (void)state;
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default_acquire(&rt), 0);
  unsigned pool = aiob_runtime_blocking_threads(rt);
  aiob_runtime_stats before;
  aiob_runtime_stats_get(rt, &before);
  assert_int_equal(pool, AIOB_BLOCKING_THREADS_DEFAULT);
  assert_true(pool < BLK_N);
  PyObject *g = run_ok(
      "import asyncio, bcapi, random\n"
      "N = 500\n"
      "seed = random.randrange(1 << 30)\n"
      "async def main():\n"
      "    rnd = random.Random(seed)\n"
      "    base = bcapi.rt_polls()\n"
      "    fs = [bcapi.blocking(i) for i in range(N)]\n"
      "    queued = bcapi.blocking_queued(base, N)\n"
      "    busy = bcapi.blocking_busy()\n"
      "    running = bcapi.blocking_running()\n"
      "    cancel = set(rnd.sample(running, (len(running) + 1) // 2))\n"
      "    rest = [i for i in range(N) if i not in running]\n"
      "    cancel |= set(rnd.sample(rest, N // 2 - len(cancel)))\n"
      "    cancel = sorted(cancel)\n"
      "    refused = [i for i in cancel if not fs[i].cancel()]\n"
      "    settled = bcapi.blocking_settle(len(cancel))\n"
      "    bcapi.blocking_open()\n"
      "    res = await asyncio.gather(*fs, return_exceptions=True)\n"
      "    cs = set(cancel)\n"
      "    bad = [(i, repr(r)) for i, r in enumerate(res)\n"
      "           if (not isinstance(r, asyncio.CancelledError) if i in cs\n"
      "               else type(r) is not int or r != i)]\n"
      "    return queued, busy, len(running), cancel, refused, settled, bad\n"
      "queued, busy, nrunning, cancel, refused, settled, bad = asyncio.run(\n"
      "    asyncio.wait_for(main(), 120))\n");
  long seed = py_long(g, "seed");
  print_message("    blocking cancel storm: seed %ld\n", seed);
  assert_py_true(g, "queued");
  assert_py_true(g, "busy");
  assert_int_equal(py_long(g, "nrunning"), pool);
  assert_py_empty(g, "refused", "cancel() refused for pending jobs");
  assert_py_true(g, "settled");
  assert_py_empty(g, "bad", "jobs with the wrong outcome");
  PyObject *cancel = py_get(g, "cancel");
  Py_ssize_t ncancel = PyList_GET_SIZE(cancel);
  assert_int_equal(ncancel, BLK_N / 2);
  char cancelled[BLK_N] = {0};
  for (Py_ssize_t k = 0; k < ncancel; k++)
    cancelled[PyLong_AsLong(PyList_GET_ITEM(cancel, k))] = 1;
  Py_DECREF(g);

  /* Every drop_arg ran (after fn, on the worker; or on the loop thread for
   * a job that never ran), then every value was freed. */
  latch_ok(&g_blk_drops, BLK_N);
  long runs = 0, saw = 0;
  for (int i = 0; i < BLK_N; i++)
    runs += atomic_load(&g_bs[i].runs);
  latch_ok(&g_blk_frees, runs);
  aiob_runtime_stats after;
  aiob_runtime_stats_get(rt, &after);
  aiob_runtime_release(rt);
  for (int i = 0; i < BLK_N; i++) {
    bslot *s = &g_bs[i];
    int r = atomic_load(&s->runs), sc = atomic_load(&s->saw_cancel);
    if (atomic_load(&s->drops) != 1 || r > 1 || atomic_load(&s->frees) != r ||
        (!cancelled[i] && (r != 1 || sc || atomic_load(&s->conv_calls) != 1)) ||
        (cancelled[i] && (atomic_load(&s->conv_calls) != 0 || sc != r)))
      fail_msg("seed %ld, job %d (%s): runs %d, drops %d, frees %d, conv %d, "
               "saw cancel %d",
               seed, i, cancelled[i] ? "cancelled" : "kept", r,
               atomic_load(&s->drops), atomic_load(&s->frees),
               atomic_load(&s->conv_calls), sc);
    saw += sc;
  }
  long jobs_cancelled =
      (long)(after.blocking_jobs_cancelled - before.blocking_jobs_cancelled);
  print_message("    blocking cancel storm: %ld fn runs (%ld saw their "
                "cancel), %ld cancelled in the queue, %d workers at once\n",
                runs, saw, jobs_cancelled, atomic_load(&g_blk_inside_max));
  assert_int_equal(runs + jobs_cancelled, BLK_N);
  assert_int_equal((long)(after.blocking_jobs_run - before.blocking_jobs_run),
                   runs);
  assert_true(saw >= 1); /* half the running jobs were cancelled */
  assert_int_equal(latch_get(&g_blk_settled), ncancel);
  assert_int_equal(latch_get(&g_blk_drops), BLK_N);
  assert_int_equal(atomic_load(&g_blk_inside_max), pool);
  assert_true(after.blocking_workers <= pool);
  assert_clean();
}

/* ======================================================================== */
/* 20. Shape 2 failures: a NULL fn (or bridge) is a ValueError and drop_arg */
/*     still runs once (in a loop or not); a negative errno raises its      */
/*     OSError; a positive return is a bug that task.h turns into           */
/*     AIOB_EBADSTATUS (SystemError naming the task), its value freed       */
/*     unseen; a status below the errno range is a SystemError naming the   */
/*     task too. Unbound awaitables                                         */
/*     closed or collected never run fn and drop their arg once.            */
static void test_blocking_failures(void **state) {
  (void)state;
  /* No running loop: a NULL fn, no bridge. */
  PyObject *aw = run_b2(-1);
  assert_null(aw);
  assert_py_error(PyExc_ValueError);
  assert_int_equal(atomic_load(&g_b2_drops), 1);
  assert_null(
      aiob_py_run_blocking(g_bridge, "bcapi.blk", NULL, NULL, NULL, conv_b2));
  assert_py_error(PyExc_ValueError);
  b2arg *a = xcalloc(1, sizeof *a); /* no bridge: refused, arg dropped */
  assert_null(
      aiob_py_run_blocking(NULL, "bcapi.blk", b2_fn, a, b2_drop, conv_b2));
  assert_py_error(PyExc_ValueError);
  assert_int_equal(atomic_load(&g_b2_drops), 2);
  /* The core's aiob_spawn_blocking, unlike it, leaves arg to the caller. */
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default_acquire(&rt), 0);
  aiob_task *h = NULL;
  a = xcalloc(1, sizeof *a);
  assert_rc(aiob_spawn_blocking(rt, NULL, NULL, a, b2_drop, &h), AIOB_EINVAL);
  aiob_runtime_release(rt);
  assert_null(h);
  assert_int_equal(atomic_load(&g_b2_drops), 2);
  free(a);
  aw = run_b2(B2_VALUE);
  assert_non_null(aw);
  PyObject *r = PyObject_CallMethod(aw, "close", NULL);
  assert_non_null(r);
  Py_DECREF(r);
  assert_int_equal(atomic_load(&g_b2_drops), 3); /* at close() */
  Py_DECREF(aw);
  aw = run_b2(B2_VALUE);
  assert_non_null(aw);
  Py_DECREF(aw);
  assert_int_equal(atomic_load(&g_b2_drops), 4);
  assert_int_equal(atomic_load(&g_b2_runs), 0);
  aw = run_b2(B2_VALUE); /* bound by the loop that awaits it */
  assert_non_null(aw);
  PyObject *g = run_ok_with("import asyncio\n"
                            "r = asyncio.run(asyncio.wait_for(aw, 10))\n"
                            "del aw\n",
                            "aw", aw);
  Py_DECREF(aw);
  assert_int_equal(py_long(g, "r"), 7);
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_b2_runs), 1);
  assert_int_equal(atomic_load(&g_b2_drops), 5);
  assert_int_equal(atomic_load(&g_b2_frees), 1);
  assert_int_equal(atomic_load(&g_b2_convs), 1);

  /* A running loop. */
  g = run_ok(
      "import asyncio, bcapi\n"
      "async def outcome(f):\n"
      "    try:\n"
      "        return ('value', await asyncio.wait_for(f, 10))\n"
      "    except OSError as e:\n"
      "        return (type(e).__name__, e.errno)\n"
      "    except BaseException as e:\n"
      "        return (type(e).__name__, str(e))\n"
      "async def main():\n"
      "    try:\n"
      "        bcapi.blocking_mode(-1)\n"
      "        null = 'nothing raised'\n"
      "    except Exception as e:\n"
      "        null = type(e).__name__\n"
      "    return [null] + [await outcome(bcapi.blocking_mode(m))\n"
      "                     for m in range(5)]\n"
      "(null, (value_t, value), (enoent_t, enoent_errno),\n"
      " (eacces_t, eacces_errno), (pos_t, pos_errno),\n"
      " (big_t, big_msg)) = asyncio.run(asyncio.wait_for(main(), 30))\n");
  assert_py_str(g, "null", "ValueError");
  assert_py_str(g, "value_t", "value");
  assert_int_equal(py_long(g, "value"), 7);
  assert_py_str(g, "enoent_t", "FileNotFoundError");
  assert_int_equal(py_long(g, "enoent_errno"), ENOENT);
  assert_py_str(g, "eacces_t", "PermissionError");
  assert_int_equal(py_long(g, "eacces_errno"), EACCES);
  /* task.h: "a positive return is a bug and becomes AIOB_EBADSTATUS". */
  assert_py_str(g, "pos_t", "SystemError");
  const char *pos = PyUnicode_AsUTF8(py_get(g, "pos_errno"));
  assert_non_null(pos);
  if (!strstr(pos, "bcapi.blk failed with a status >= 0"))
    fail_msg("SystemError does not name the task: %s", pos);
  assert_py_str(g, "big_t", "SystemError");
  const char *msg = PyUnicode_AsUTF8(py_get(g, "big_msg"));
  assert_non_null(msg);
  if (!strstr(msg, "bcapi.blk") || !strstr(msg, "-200000"))
    fail_msg("SystemError does not name the task and status: %s", msg);
  Py_DECREF(g);
  assert_int_equal(atomic_load(&g_b2_runs), 6);
  assert_int_equal(atomic_load(&g_b2_drops), 11); /* + null fn + 5 jobs */
  assert_int_equal(atomic_load(&g_b2_frees), 3);  /* + value, positive's */
  assert_int_equal(atomic_load(&g_b2_convs), 2);  /* + value */
  assert_clean();
}

/* ======================================================================== */
/* 21. Names: a vtable's name is the CTask's repr and __name__ (and what    */
/*     asyncio shows for a Task running it); a spawn option's name wins     */
/*     over the vtable's (aiob_task_name, inside and out; also for          */
/*     aiob_spawn_blocking); aiob_task_fail with a code >= 0 returns        */
/*     AIOB_EINVAL and Python raises SystemError naming the task, as for a  */
/*     status below the errno range; aiob_py_task_fail_path gives           */
/*     FileNotFoundError with filename and filename2.                       */
static void test_names(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, bcapi\n"
      "async def outcome(f):\n"
      "    try:\n"
      "        return ('value', await asyncio.wait_for(f, 10))\n"
      "    except OSError as e:\n"
      "        return (type(e).__name__, e.errno, e.filename, e.filename2)\n"
      "    except BaseException as e:\n"
      "        return (type(e).__name__, str(e))\n"
      "async def main():\n"
      "    f = bcapi.named(0)\n"
      "    reprs = [repr(f), f.__name__, f.__qualname__]\n"
      "    f.cancel()\n"
      "    reprs.append(repr(f))\n"
      "    t = asyncio.get_running_loop().create_task(bcapi.named(0))\n"
      "    await asyncio.sleep(0)\n"
      "    task_repr = repr(t)\n"
      "    t.cancel()\n"
      "    outs = [await outcome(bcapi.named(m)) for m in (1, 2, 3, 4)]\n"
      "    return reprs, task_repr, outs\n"
      "(reprs, task_repr, outs) = asyncio.run(asyncio.wait_for(main(), 10))\n"
      "u = bcapi.named(0)\n"
      "unbound = repr(u)\n"
      "u.close()\n"
      "v = bcapi.value(1)\n"
      "plain = (repr(v), v.__name__)\n"
      "v.close()\n"
      "b = bcapi.blocking_mode(0)\n"
      "blocking = repr(b)\n"
      "b.close()\n"
      "ok = (reprs == ['<CTask bcapi.x pending>', 'bcapi.x', 'bcapi.x',\n"
      "                '<CTask bcapi.x cancelled>']\n"
      "      and 'bcapi.x' in task_repr\n"
      "      and unbound == '<CTask bcapi.x unstarted>'\n"
      "      and plain == ('<CTask unstarted>', 'CTask')\n"
      "      and blocking == '<CTask bcapi.blk unstarted>'\n"
      "      and outs[2] == ('FileNotFoundError', 2, 'a', 'b')\n"
      "      and [o[0] for o in outs] == ['SystemError', 'SystemError',\n"
      "                                   'FileNotFoundError', "
      "'SystemError'])\n");
  PyObject *ok = py_get(g, "ok");
  if (ok != Py_True) {
    PyObject *r = PyObject_Repr(g);
    fail_msg("names: %s", r ? PyUnicode_AsUTF8(r) : "?");
  }
  PyObject *outs = py_get(g, "outs");
  static const char *const want[] = {
      "bcapi.x failed with a status >= 0",
      "bcapi.x failed with the status -200000",
      NULL,
      "bcapi.x failed with a status >= 0",
  };
  for (int k = 0; k < 4; k++) {
    if (!want[k])
      continue;
    const char *m =
        PyUnicode_AsUTF8(PyTuple_GET_ITEM(PyList_GET_ITEM(outs, k), 1));
    assert_non_null(m);
    if (!strstr(m, want[k]))
      fail_msg("SystemError '%s' does not say '%s'", m, want[k]);
  }
  Py_DECREF(g);
  assert_rc(atomic_load(&g_fail_rc[NM_FAIL_POSITIVE]), AIOB_EINVAL);
  assert_rc(atomic_load(&g_fail_rc[NM_FAIL_BIGNEG]), 0);
  assert_rc(atomic_load(&g_fail_rc[NM_FAIL_PATH]), 0);
  assert_rc(atomic_load(&g_fail_rc[NM_FAIL_PATH_BAD]), AIOB_EINVAL);

  /* aiob_task_name on tasks spawned on the runtime. */
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default_acquire(&rt), 0);
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  assert_null(o.name);
  static const char opts_name[] = "bcapi.opts";
  for (int k = 0; k < 3; k++) {
    named *n = xcalloc(1, sizeof *n);
    n->mode = NM_NAME;
    o.name = k == 0 ? opts_name : NULL;
    aiob_task *h = NULL;
    assert_rc(aiob_spawn_ex(rt, k == 2 ? NULL : &o, &named_vt, n, &h), 0);
    const char *want_name = k == 0 ? opts_name : "bcapi.x";
    assert_string_equal(aiob_task_name(h), want_name);
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = aiob_task_wait(h, WAIT_TIMEOUT);
    Py_END_ALLOW_THREADS;
    assert_rc(rc, 0);
    const char *seen = (const char *)atomic_load(&g_seen_name);
    assert_non_null(seen);
    assert_string_equal(seen, want_name);
    assert_string_equal(aiob_task_name(h), want_name); /* finished too */
    aiob_task_release(h);
  }
  aiob_task *h = NULL;
  assert_rc(aiob_spawn(rt, &value_vt, (void *)(intptr_t)3, &h), 0);
  assert_null(aiob_task_name(h)); /* no name anywhere */
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = aiob_task_wait(h, WAIT_TIMEOUT);
  Py_END_ALLOW_THREADS;
  assert_rc(rc, 0);
  aiob_task_release(h);
  b2arg *a = xcalloc(1, sizeof *a);
  a->mode = B2_VALUE;
  o.name = opts_name;
  assert_rc(aiob_spawn_blocking(rt, &o, b2_fn, a, b2_drop, &h), 0);
  assert_string_equal(aiob_task_name(h), opts_name);
  Py_BEGIN_ALLOW_THREADS;
  rc = aiob_task_wait(h, WAIT_TIMEOUT);
  Py_END_ALLOW_THREADS;
  assert_rc(rc, 0);
  assert_status(h, 0); /* takes and frees the value */
  aiob_task_release(h);
  aiob_runtime_release(rt);
  assert_int_equal(atomic_load(&g_b2_frees), 1);
  assert_int_equal(atomic_load(&g_b2_drops), 2); /* + the closed one */

  /* A promise awaitable's name. */
  aiob_promise *p = NULL;
  PyObject *aw = aiob_py_promise_new(g_bridge, "bcapi.named_promise", NULL,
                                     NULL, NULL, &p);
  assert_non_null(aw);
  PyObject *rep = PyObject_Repr(aw);
  assert_non_null(rep);
  assert_string_equal(PyUnicode_AsUTF8(rep),
                      "<CTask bcapi.named_promise unstarted>");
  Py_DECREF(rep);
  PyObject *nm = PyObject_GetAttrString(aw, "__name__");
  assert_non_null(nm);
  assert_string_equal(PyUnicode_AsUTF8(nm), "bcapi.named_promise");
  Py_DECREF(nm);
  Py_DECREF(aw);
  assert_rc(aiob_promise_abandon(p), 0); /* the completer side is ours */
  assert_clean();
}

/* ======================================================================== */
/* 22. Python async iterators consumed by C tasks under a cancel storm: 300 */
/*     C tasks each sum an endless async generator (windows 1 to 4) and    */
/*     are cancelled from Python after a random number of loop steps: in    */
/*     __anext__, waiting for room, or before the pump started. Each        */
/*     generator that started runs its finally (which awaits) exactly once, */
/*     before the loop ends (asyncio.run's own cleanup would hide a miss);  */
/*     every task is dropped once; converters run on the loop thread with   */
/*     the GIL. Then a plain runtime task with aiob_py_aiter_set_locals     */
/*     takes a generator to its end, and without locals gets AIOB_EINVAL.  */
/*     ASan / TSan runs check the rest (no leak, no use after free, no      */
/*     race between the pump's puts and the C side's takes and close).      */
static void test_aiter_cancel_storm(void **state) {
  (void)state;
  PyObject *g = run_ok(
      "import asyncio, random, bcapi\n"
      "random.seed(22)\n"
      "N = 300\n"
      "started, finals, taken = {}, {}, {}\n"
      "async def gen(k):\n"
      "    started[k] = started.get(k, 0) + 1\n"
      "    try:\n"
      "        i = 0\n"
      "        while True:\n"
      "            yield i\n"
      "            i += 1\n"
      "            taken[k] = i\n"
      "            if i % 3 == 0:\n"
      "                await asyncio.sleep(0)\n"
      "    finally:\n"
      "        await asyncio.sleep(0)\n"
      "        finals[k] = finals.get(k, 0) + 1\n"
      "async def one(k):\n"
      "    fut = asyncio.ensure_future(bcapi.aiter_sum(gen(k), 1 + k % 4))\n"
      "    # A third are cancelled at any moment (before their pump starts,\n"
      "    # often); the others once their generator got going.\n"
      "    if k % 3:\n"
      "        n = random.randrange(1, 20)\n"
      "        await settled(lambda: taken.get(k, 0) >= n)\n"
      "    for _ in range(random.randrange(12)):\n"
      "        await asyncio.sleep(0)\n"
      "    fut.cancel()\n"
      "    try:\n"
      "        await fut\n"
      "    except asyncio.CancelledError:\n"
      "        pass\n"
      "async def settled(cond):\n"
      "    for _ in range(10000):\n"
      "        if cond():\n"
      "            return True\n"
      "        await asyncio.sleep(0.001)\n"
      "    return False\n"
      "async def main():\n"
      "    await asyncio.gather(*(one(k) for k in range(N)))\n"
      "    dropped = await settled(lambda: bcapi.aiter_counts()[0] == N)\n"
      "    closed = await settled(lambda: set(finals) == set(started))\n"
      "    loop = asyncio.get_running_loop()\n"
      "    async def numbers(n):\n"
      "        for i in range(n):\n"
      "            yield i\n"
      "    plain = await loop.run_in_executor(None, bcapi.aiter_plain, loop,\n"
      "                                       numbers(1000))\n"
      "    nolocals = await loop.run_in_executor(None, bcapi.aiter_plain,\n"
      "                                          None, numbers(5))\n"
      "    return dropped, closed, plain, nolocals\n"
      "dropped, closed, plain, nolocals = asyncio.run(\n"
      "    asyncio.wait_for(main(), 60))\n"
      "twice = sorted(k for k, n in finals.items() if n != 1)\n"
      "n_started = len(started)\n");
  assert_py_true(g, "dropped");
  assert_py_true(g, "closed");
  assert_py_empty(g, "twice", "generators whose finally ran more than once");
  long n_started = py_long(g, "n_started");
  PyObject *plain = py_get(g, "plain"), *nolocals = py_get(g, "nolocals");
  assert_int_equal(PyLong_AsLong(PyTuple_GET_ITEM(plain, 0)), 0);
  assert_int_equal(PyLong_AsLong(PyTuple_GET_ITEM(plain, 1)), 499500);
  assert_int_equal(PyLong_AsLong(PyTuple_GET_ITEM(nolocals, 0)), AIOB_EINVAL);
  Py_DECREF(g);
  printf("    aiter cancel storm: %ld of 300 generators started\n", n_started);
  /* At least those awaited until they had given items. */
  if (n_started < 200)
    fail_msg("only %ld of 300 generators started", n_started);
  assert_int_equal(atomic_load(&g_ai_drops), 302);
  assert_true(atomic_load(&g_ai_convs) >= atomic_load(&g_ai_items));
  assert_clean();
}

/* ======================================================================== */
/* 23. C streams under a storm, on three loops at once (three threads, each */
/*     asyncio.run): 120 streams per loop with channels of 1 to 3 items,    */
/*     read to their end, abandoned after a break (collected), closed with  */
/*     aclose, or their consumer cancelled while it waits. Every producer   */
/*     is dropped once, every item made is freed once (through the          */
/*     converter, on its loop thread, or unseen when the stream closed),    */
/*     and every stream read to its end gave 0..n-1 in order.               */
static void test_cstream_storm(void **state) {
  (void)state;
  int drops0 = atomic_load(&g_cs_drops);
  PyObject *g = run_ok(
      "import asyncio, random, threading, bcapi\n"
      "N = 120\n"
      "bad, done = [], []\n"
      "async def one(k, rnd):\n"
      "    kind = k % 4\n"
      "    it = bcapi.cstream(-1 if kind else 50, 1 + k % 3)\n"
      "    if kind == 0:\n"
      "        got = [x async for x in it]\n"
      "        if got != list(range(50)):\n"
      "            bad.append(('order', k, got[:5]))\n"
      "    elif kind == 1:\n"
      "        async for x in it:\n"
      "            if x >= rnd.randrange(1, 40):\n"
      "                break\n"
      "        del it\n"
      "    elif kind == 2:\n"
      "        for _ in range(rnd.randrange(1, 30)):\n"
      "            await it.__anext__()\n"
      "        await it.aclose()\n"
      "    else:\n"
      "        async def consume():\n"
      "            async for x in it:\n"
      "                await asyncio.sleep(0)\n"
      "        t = asyncio.ensure_future(consume())\n"
      "        for _ in range(rnd.randrange(1, 20)):\n"
      "            await asyncio.sleep(0)\n"
      "        t.cancel()\n"
      "        try:\n"
      "            await t\n"
      "        except asyncio.CancelledError:\n"
      "            pass\n"
      "def run(seed):\n"
      "    rnd = random.Random(seed)\n"
      "    async def main():\n"
      "        await asyncio.gather(*(one(k, rnd) for k in range(N)))\n"
      "    asyncio.run(asyncio.wait_for(main(), 60))\n"
      "    done.append(seed)\n"
      "ts = [threading.Thread(target=run, args=(s,)) for s in range(3)]\n"
      "for t in ts: t.start()\n"
      "for t in ts: t.join(120)\n"
      "import gc; gc.collect()\n"
      "ok = sorted(done) == [0, 1, 2]\n");
  assert_py_true(g, "ok");
  assert_py_empty(g, "bad", "streams read to their end");
  Py_DECREF(g);
  /* The producers' drops run on the runtime thread: wait (bounded). */
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while ((atomic_load(&g_cs_drops) - drops0 != 360 ||
          atomic_load(&g_cs_made) != atomic_load(&g_cs_freed)) &&
         aiob_now_ns() < deadline) {
    Py_BEGIN_ALLOW_THREADS;
    sleep_thread_ns(AIOB_MSEC);
    Py_END_ALLOW_THREADS;
  }
  assert_int_equal(atomic_load(&g_cs_drops) - drops0, 360);
  assert_int_equal(atomic_load(&g_cs_made), atomic_load(&g_cs_freed));
  assert_clean();
}

/* ======================================================================== */
/* local_storm: loop-local C tasks on three loops at once (uvloop in one  */
/* when installed: the shared form with the uv backend), finished,        */
/* cancelled from another thread, cancelled while awaiting Python,        */
/* collected unawaited, or left pending when asyncio.run closes the loop: */
/* every task state is dropped exactly once, and nothing is left running. */
/* Not uvloop under ASan: importing uvloop leaks 3.5 KB of Python objects */
/* when an embedded interpreter ends (with or without aiobridge's local  */
/* tasks), which LeakSanitizer reports; tests/hosted.c runs the shared    */
/* form's core under ASan.                                                */
#if defined(__SANITIZE_ADDRESS__)
#define LOCAL_STORM_UVLOOP "False"
#else
#define LOCAL_STORM_UVLOOP "True"
#endif
static void test_local_storm(void **state) {
  (void)state;
  int made0 = atomic_load(&g_local_made);
  int dropped0 = atomic_load(&g_local_dropped);
  PyObject *g = run_ok(
      "import asyncio, gc, random, threading, bcapi\n"
      "uvloop = None\n"
      "if " LOCAL_STORM_UVLOOP ":\n"
      "    try:\n"
      "        import uvloop\n"
      "    except ImportError:\n"
      "        pass\n"
      "N = 150\n"
      "bad, done, modes = [], [], []\n"
      "canceller = []\n"
      "def cancel_soon(f):\n"
      "    t = threading.Thread(target=f.cancel)\n"
      "    t.start(); canceller.append(t)\n"
      "async def one(k, rnd, left):\n"
      "    kind = k % 5\n"
      "    if kind == 0:\n"
      "        await bcapi.local_nap(rnd.randrange(0, 2000))\n"
      "    elif kind == 1:\n"
      "        f = bcapi.local_nap(60e6)\n"
      "        cancel_soon(f)\n"
      "        try:\n"
      "            await f\n"
      "            bad.append(('not cancelled', k))\n"
      "        except asyncio.CancelledError:\n"
      "            pass\n"
      "    elif kind == 2:\n"
      "        started, seen = [], []\n"
      "        async def py():\n"
      "            started.append(k)\n"
      "            try:\n"
      "                await asyncio.Event().wait()\n"
      "            except asyncio.CancelledError:\n"
      "                seen.append(k)\n"
      "                raise\n"
      "        f = asyncio.ensure_future(bcapi.local_await(py()))\n"
      "        wait_start = rnd.random() < 0.5\n"
      "        for _ in range(200 if wait_start else rnd.randrange(0, 3)):\n"
      "            if started: break\n"
      "            await asyncio.sleep(0)\n"
      "        if wait_start and not started:\n"
      "            bad.append(('python await never started', k))\n"
      "        was_started = bool(started)\n"
      "        f.cancel()\n"
      "        try:\n"
      "            await f\n"
      "        except asyncio.CancelledError:\n"
      "            pass\n"
      "        for _ in range(200):\n"
      "            if seen or not was_started: break\n"
      "            await asyncio.sleep(0)\n"
      "        if was_started and not seen:\n"
      "            bad.append(('python await not cancelled', k))\n"
      "    elif kind == 3:\n"
      "        bcapi.local_nap(60e6)\n"
      "        gc.collect()\n"
      "    else:\n"
      "        left.append(asyncio.ensure_future(bcapi.local_nap(60e6)))\n"
      "def run(seed):\n"
      "    rnd = random.Random(seed)\n"
      "    left = []\n"
      "    async def main():\n"
      "        await asyncio.gather(*(one(k, rnd, left) for k in range(N)))\n"
      "        for t in canceller: pass\n"
      "    if seed == 0 and uvloop is not None:\n"
      "        loop = uvloop.new_event_loop()\n"
      "    else:\n"
      "        loop = asyncio.new_event_loop()\n"
      "    try:\n"
      "        loop.run_until_complete(asyncio.wait_for(main(), 60))\n"
      "        modes.append(loop.run_until_complete(info()))\n"
      "    finally:\n"
      "        loop.close()\n"
      "    if not all(f.done() for f in left):\n"
      "        bad.append(('pending after close', seed))\n"
      "    done.append(seed)\n"
      "async def info():\n"
      "    return bcapi.local_info()['mode']\n"
      "ts = [threading.Thread(target=run, args=(s,)) for s in range(3)]\n"
      "for t in ts: t.start()\n"
      "for t in ts: t.join(120)\n"
      "for t in canceller: t.join(60)\n"
      "gc.collect()\n"
      "import os\n"
      "if uvloop is not None and os.environ.get('AIOBRIDGE_BACKEND', 'uv') "
      "in ('', 'uv') and 'shared' not in modes:\n"
      "    bad.append(('uvloop did not run the shared form', modes))\n"
      "ok = sorted(done) == [0, 1, 2]\n");
  assert_py_true(g, "ok");
  assert_py_empty(g, "bad", "local tasks");
  Py_DECREF(g);
  PyGC_Collect();
  int made = atomic_load(&g_local_made) - made0;
  assert_int_equal(made, 3 * 150);
  assert_int_equal(atomic_load(&g_local_dropped) - dropped0, made);
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
  for (size_t i = 0; i < SHAPE_LATCHES; i++)
    latch_init(g_shape_latches[i]);
  const char *env = getenv("AIOBRIDGE_BACKEND");
  g_backend = env && env[0] ? env : NULL;
  /* BRIDGE_CAPI_FILTER=<glob>: run only the tests it matches. */
  const char *filter = getenv("BRIDGE_CAPI_FILTER");
  if (filter && filter[0])
    cmocka_set_test_filter(filter);

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
      T(promise_races),
      T(promise_unawaited),
      T(blocking_cancel_storm),
      T(blocking_failures),
      T(names),
      T(aiter_cancel_storm),
      T(cstream_storm),
      T(local_storm),
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
  for (size_t i = 0; i < SHAPE_LATCHES; i++)
    latch_destroy(g_shape_latches[i]);
  return failed ? 1 : 0;
}
