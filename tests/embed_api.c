/* The embedding API's pieces (aiobridge/embed.h) in a program that starts
 * Python itself: aiob_py_run on stock asyncio and uvloop,
 * aiob_py_run_until_complete on a loop that stays open, a C task that
 * stops a loop in run_forever (the run_forever pattern), the clear errors
 * of running a C task from inside a running loop, and a bridge without an
 * extension module (aiob_py_bridge_new). Runs once per backend. */
#include <aiobridge/embed.h>

#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

static aiob_py_bridge *g_bridge;

/* ---- C tasks ------------------------------------------------------------ */

static aiob_poll answer_poll(aiob_task *self, void *p) {
  (void)p;
  aiob_task_return(self, (void *)(intptr_t)42, NULL);
  return AIOB_READY;
}

static const aiob_task_vtable answer_vt = {.poll = answer_poll};

/* Given only to calls that must refuse it: a drop means the call took the
 * state anyway. */
static atomic_int g_refused_drops;
static void refused_drop(void *p) {
  (void)p;
  atomic_fetch_add(&g_refused_drops, 1);
}
static const aiob_task_vtable refused_vt = {.poll = answer_poll,
                                            .drop = refused_drop};

static PyObject *to_int(aiob_output *out) {
  return PyLong_FromLong((long)(intptr_t)out->value);
}

/* Stops the loop of its locals from the loop's thread, then returns 7. */
typedef struct stopper {
  int co;
  aiob_py_locals *locals;
  aiob_py_await wait;
  aiob_output out;
} stopper;

static PyObject *stop_loop(void *arg) {
  stopper *s = arg;
  PyObject *r =
      PyObject_CallMethod(aiob_py_locals_loop(s->locals), "stop", NULL);
  return r; /* None */
}

static aiob_poll stopper_poll(aiob_task *self, void *p) {
  stopper *s = p;
  AIOB_BEGIN(&s->co);
  aiob_py_await_init_fn(&s->wait, stop_loop, s);
  AIOB_AWAIT(&s->co, aiob_py_await_poll(self, &s->wait, &s->out));
  if (s->out.status < 0) {
    aiob_task_fail(self, s->out.status);
    return AIOB_READY;
  }
  aiob_output_clear(&s->out);
  aiob_task_return(self, (void *)(intptr_t)7, NULL);
  AIOB_END(&s->co);
}

static void stopper_drop(void *p) {
  stopper *s = p;
  aiob_output_clear(&s->out);
  aiob_py_locals_release(s->locals);
  free(s);
}

static const aiob_task_vtable stopper_vt = {.poll = stopper_poll,
                                            .drop = stopper_drop};

/* ---- Helpers ------------------------------------------------------------ */

static PyObject *run_ok(const char *code) {
  PyObject *g = PyDict_New();
  assert_non_null(g);
  PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
  PyObject *r = PyRun_String(code, Py_file_input, g, g);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  Py_DECREF(r);
  return g;
}

static PyObject *get(PyObject *g, const char *name) {
  PyObject *v = PyDict_GetItemString(g, name);
  assert_non_null(v);
  return v;
}

/* ---- Tests -------------------------------------------------------------- */

static void test_run(void **state) {
  (void)state;
  PyObject *r = aiob_py_run(g_bridge, NULL, &answer_vt, NULL, to_int);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  assert_int_equal(PyLong_AsLong(r), 42);
  Py_DECREF(r);
  /* The loop is closed and unset, as after asyncio.run. */
  PyObject *g = run_ok("import asyncio\n"
                       "try:\n"
                       "    asyncio.get_running_loop()\n"
                       "    running = True\n"
                       "except RuntimeError:\n"
                       "    running = False\n");
  assert_true(get(g, "running") == Py_False);
  Py_DECREF(g);
}

static void test_run_on_uvloop(void **state) {
  (void)state;
  PyObject *uvloop = PyImport_ImportModule("uvloop");
  if (!uvloop) {
    PyErr_Clear();
    skip();
  }
  PyObject *factory = PyObject_GetAttrString(uvloop, "new_event_loop");
  assert_non_null(factory);
  PyObject *r = aiob_py_run(g_bridge, factory, &answer_vt, NULL, to_int);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  assert_int_equal(PyLong_AsLong(r), 42);
  Py_DECREF(r);
  Py_DECREF(factory);
  Py_DECREF(uvloop);
}

static void test_run_until_complete_keeps_the_loop(void **state) {
  (void)state;
  PyObject *g = run_ok("import asyncio\nloop = asyncio.new_event_loop()\n");
  PyObject *loop = get(g, "loop");
  PyObject *r =
      aiob_py_run_until_complete(g_bridge, loop, &answer_vt, NULL, to_int);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  assert_int_equal(PyLong_AsLong(r), 42);
  Py_DECREF(r);
  /* Twice on the same loop, which stays open. */
  r = aiob_py_run_until_complete(g_bridge, loop, &answer_vt, NULL, to_int);
  assert_non_null(r);
  Py_DECREF(r);
  PyObject *closed = PyObject_CallMethod(loop, "is_closed", NULL);
  assert_true(closed == Py_False);
  Py_XDECREF(closed);
  Py_XDECREF(PyObject_CallMethod(loop, "close", NULL));
  Py_DECREF(g);
  /* A None loop is a TypeError, and the state stays the caller's. */
  assert_null(
      aiob_py_run_until_complete(g_bridge, Py_None, &refused_vt, NULL, NULL));
  assert_true(PyErr_ExceptionMatches(PyExc_TypeError));
  PyErr_Clear();
  assert_int_equal(atomic_load(&g_refused_drops), 0);
}

static void test_c_task_stops_run_forever(void **state) {
  (void)state;
  PyObject *g = run_ok("import asyncio\nloop = asyncio.new_event_loop()\n");
  PyObject *loop = get(g, "loop");
  aiob_py_locals *l = aiob_py_locals_new(g_bridge, loop, NULL);
  assert_non_null(l);
  stopper *s = calloc(1, sizeof *s);
  assert_non_null(s);
  s->locals = aiob_py_locals_clone(l);
  PyObject *task =
      aiob_py_future_into_py_with_locals(g_bridge, l, &stopper_vt, s, to_int);
  aiob_py_locals_release(l);
  assert_non_null(task);
  /* Returns only because the C task stopped the loop. */
  PyObject *r = PyObject_CallMethod(loop, "run_forever", NULL);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  Py_DECREF(r);
  r = PyObject_CallMethod(loop, "run_until_complete", "O", task);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  assert_int_equal(PyLong_AsLong(r), 7);
  Py_DECREF(r);
  Py_DECREF(task);
  Py_XDECREF(PyObject_CallMethod(loop, "close", NULL));
  Py_DECREF(g);
}

/* Called from a coroutine on a running loop: both entry points refuse,
 * and neither takes the state. */
static PyObject *inside_loop(PyObject *self, PyObject *loop) {
  (void)self;
  int drops = atomic_load(&g_refused_drops), refused = 0;
  PyObject *r =
      aiob_py_run_until_complete(g_bridge, loop, &refused_vt, NULL, to_int);
  refused += !r && PyErr_ExceptionMatches(PyExc_RuntimeError);
  PyErr_Clear();
  r = aiob_py_run(g_bridge, NULL, &refused_vt, NULL, to_int);
  refused += !r && PyErr_ExceptionMatches(PyExc_RuntimeError);
  PyErr_Clear();
  /* Another loop, not running, while this thread runs one: refused too. */
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  PyObject *other =
      asyncio ? PyObject_CallMethod(asyncio, "new_event_loop", NULL) : NULL;
  Py_XDECREF(asyncio);
  if (!other)
    return NULL;
  r = aiob_py_run_until_complete(g_bridge, other, &refused_vt, NULL, to_int);
  refused += !r && PyErr_ExceptionMatches(PyExc_RuntimeError);
  PyErr_Clear();
  Py_XDECREF(PyObject_CallMethod(other, "close", NULL));
  Py_DECREF(other);
  return Py_BuildValue("(ii)", refused, atomic_load(&g_refused_drops) - drops);
}

static PyMethodDef inside_def = {"inside_loop", inside_loop, METH_O, NULL};

static void test_refused_inside_a_running_loop(void **state) {
  (void)state;
  PyObject *fn = PyCFunction_New(&inside_def, NULL);
  assert_non_null(fn);
  PyObject *g = PyDict_New();
  PyDict_SetItemString(g, "__builtins__", PyEval_GetBuiltins());
  PyDict_SetItemString(g, "inside_loop", fn);
  PyObject *r =
      PyRun_String("import asyncio\n"
                   "async def main():\n"
                   "    return inside_loop(asyncio.get_running_loop())\n"
                   "res = asyncio.run(main())\n",
                   Py_file_input, g, g);
  if (!r)
    PyErr_Print();
  assert_non_null(r);
  Py_DECREF(r);
  PyObject *res = get(g, "res");
  assert_int_equal(PyLong_AsLong(PyTuple_GetItem(res, 0)), 3); /* refused */
  assert_int_equal(PyLong_AsLong(PyTuple_GetItem(res, 1)), 0); /* no drop */
  Py_DECREF(g);
  Py_DECREF(fn);
}

static void test_bridge_new_errors(void **state) {
  (void)state;
  aiob_py_bridge *b = (aiob_py_bridge *)&b;
  assert_int_equal(aiob_py_bridge_new(NULL, &b), -1);
  assert_true(PyErr_ExceptionMatches(PyExc_ValueError));
  PyErr_Clear();
  assert_ptr_equal(b, (aiob_py_bridge *)&b); /* untouched */
  assert_int_equal(aiob_py_bridge_new("x", NULL), -1);
  PyErr_Clear();
}

int main(void) {
  Py_InitializeEx(0);
  if (aiob_py_bridge_new("embed_api", &g_bridge) < 0) {
    PyErr_Print();
    return 1;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_run),
      cmocka_unit_test(test_run_on_uvloop),
      cmocka_unit_test(test_run_until_complete_keeps_the_loop),
      cmocka_unit_test(test_c_task_stops_run_forever),
      cmocka_unit_test(test_refused_inside_a_running_loop),
      cmocka_unit_test(test_bridge_new_errors),
  };
  int failed = cmocka_run_group_tests(tests, NULL, NULL);
  Py_BEGIN_ALLOW_THREADS;
  aiob_runtime_default_shutdown();
  Py_END_ALLOW_THREADS;
  PyGC_Collect();
  aiob_py_bridge_free(g_bridge);
  if (Py_FinalizeEx() < 0)
    return 120;
  return failed ? 1 : 0;
}
