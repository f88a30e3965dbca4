/* What a C main task of an embedding program can do, written with the
 * async test harness (aiobridge/testing.h): await asyncio and coroutines
 * of modules on sys.path (tests/python/embed_helper.py), get their
 * exceptions, spawn child tasks that await Python too, use the backend's
 * native loop, and run on uvloop when AIOBRIDGE_LOOP asks for it. Runs once
 * per backend (AIOBRIDGE_BACKEND) and loop (AIOBRIDGE_LOOP). */
#include <aiobridge/testing.h>

#include <event2/event.h>
#include <liburing.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

/* ---- Python side: run on the loop thread with the GIL ------------------- */

/* embed_helper.<name>(*args): a new reference or NULL. */
static PyObject *helper_call(const char *name, const char *fmt, long arg) {
  PyObject *mod = PyImport_ImportModule("embed_helper");
  if (!mod)
    return NULL;
  PyObject *r = PyObject_CallMethod(mod, name, fmt, arg);
  Py_DECREF(mod);
  return r;
}

static PyObject *sleep_then_42(void *arg) {
  (void)arg;
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  PyObject *r =
      asyncio ? PyObject_CallMethod(asyncio, "sleep", "di", 0.01, 42) : NULL;
  Py_XDECREF(asyncio);
  return r;
}

static PyObject *double_later(void *arg) {
  return helper_call("double_later", "(l)", (long)(intptr_t)arg);
}

static PyObject *raise_key_error(void *arg) {
  (void)arg;
  return helper_call("raise_key_error", "()", 0);
}

static PyObject *loop_type_name(void *arg) {
  (void)arg;
  return helper_call("loop_type_name", "()", 0);
}

static PyObject *sleep_zero(void *arg) {
  (void)arg;
  return helper_call("sleep_zero", "()", 0);
}

static int to_long(PyObject *result, aiob_output *out) {
  long v = PyLong_AsLong(result);
  if (v == -1 && PyErr_Occurred())
    return -1;
  out->value = (void *)(intptr_t)v;
  return 0;
}

/* The loop type's "module.Name", copied into a malloc'd C string. */
static int to_cstring(PyObject *result, aiob_output *out) {
  const char *s = PyUnicode_AsUTF8(result);
  if (!s)
    return -1;
  out->value = strdup(s);
  out->free_value = free;
  return out->value ? 0 : (PyErr_NoMemory(), -1);
}

/* ---- Tests -------------------------------------------------------------- */

typedef struct await_state {
  int co;
  aiob_py_await wait;
  aiob_output out;
} await_state;

AIOB_TEST(await_asyncio_sleep, await_state) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, sleep_then_42, NULL);
  aiob_py_await_set_converter(&state->wait, to_long);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  AIOB_TEST_ASSERT(self, state->out.status == 0);
  AIOB_TEST_ASSERT(self, (intptr_t)state->out.value == 42);
  AIOB_END(&state->co);
}

AIOB_TEST(await_module_coroutine, await_state) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, double_later, (void *)(intptr_t)21);
  aiob_py_await_set_converter(&state->wait, to_long);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  AIOB_TEST_ASSERT(self, state->out.status == 0);
  AIOB_TEST_ASSERT(self, (intptr_t)state->out.value == 42);
  AIOB_END(&state->co);
}

AIOB_TEST(python_exception_reaches_c, await_state) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, raise_key_error, NULL);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  AIOB_TEST_ASSERT(self, state->out.status == AIOB_PY_EXCEPTION);
  aiob_output_clear(&state->out); /* frees the exception (deferred) */
  AIOB_END(&state->co);
}

AIOB_TEST(runs_on_the_asked_loop, await_state) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, loop_type_name, NULL);
  aiob_py_await_set_converter(&state->wait, to_cstring);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  AIOB_TEST_ASSERT(self, state->out.status == 0);
  const char *want = getenv("AIOBRIDGE_LOOP");
  int uvloop = want && strcmp(want, "uvloop") == 0;
  int ok = strcmp(state->out.value,
                  uvloop ? "uvloop.Loop"
                         : "asyncio.unix_events._UnixSelectorEventLoop") == 0;
  if (!ok)
    aiob_test_fail(self, __FILE__, __LINE__, "loop is %s",
                   (const char *)state->out.value);
  aiob_output_clear(&state->out);
  if (!ok)
    return AIOB_READY;
  AIOB_END(&state->co);
}

/* A child: sleeps 1 ms, awaits asyncio.sleep(0) (it inherited the main
 * task's locals), returns its index. */
typedef struct child {
  int co;
  int index;
  aiob_sleep sleep;
  aiob_py_await wait;
  aiob_output out;
} child;

static aiob_poll child_poll(aiob_task *self, void *p) {
  child *c = p;
  AIOB_BEGIN(&c->co);
  aiob_sleep_init(&c->sleep, AIOB_MSEC);
  AIOB_AWAIT(&c->co, aiob_sleep_poll(self, &c->sleep, NULL));
  aiob_py_await_init_fn(&c->wait, sleep_zero, NULL);
  AIOB_AWAIT(&c->co, aiob_py_await_poll(self, &c->wait, &c->out));
  if (c->out.status < 0) {
    aiob_task_fail(self, c->out.status);
    aiob_output_clear(&c->out);
    return AIOB_READY;
  }
  aiob_output_clear(&c->out);
  aiob_task_return(self, (void *)(intptr_t)c->index, NULL);
  AIOB_END(&c->co);
}

static const aiob_task_vtable child_vt = {.poll = child_poll, .drop = free};

#define NCHILD 10
typedef struct parent {
  int co;
  int i;
  long sum;
  int status;
  aiob_task *kids[NCHILD];
  aiob_output out;
} parent;

AIOB_TEST(child_tasks_await_python, parent) {
  AIOB_BEGIN(&state->co);
  for (int i = 0; i < NCHILD; i++) {
    child *c = calloc(1, sizeof *c);
    AIOB_TEST_ASSERT(self, c != NULL);
    c->index = i + 1;
    int rc = aiob_spawn(aiob_task_runtime(self), &child_vt, c, &state->kids[i]);
    if (rc < 0)
      free(c);
    AIOB_TEST_ASSERT(self, rc == 0);
  }
  for (state->i = 0; state->i < NCHILD; state->i++) {
    AIOB_AWAIT(&state->co,
               aiob_task_join(self, state->kids[state->i], &state->status));
    AIOB_TEST_ASSERT(self, state->status == 0);
    AIOB_TEST_ASSERT(
        self, aiob_task_take_output(state->kids[state->i], &state->out) == 0);
    state->sum += (long)(intptr_t)state->out.value;
    aiob_task_release(state->kids[state->i]);
    state->kids[state->i] = NULL;
  }
  AIOB_TEST_ASSERT(self, state->sum == NCHILD * (NCHILD + 1) / 2);
  AIOB_END(&state->co);
}

typedef struct native_state {
  int dummy;
} native_state;

AIOB_TEST(native_loop_of_the_backend, native_state) {
  (void)state;
  aiob_runtime *rt = aiob_task_runtime(self);
  int index = aiob_runtime_current_loop(rt);
  AIOB_TEST_ASSERT(self, index >= 0);
  void *native = aiob_runtime_native(rt, (unsigned)index);
  AIOB_TEST_ASSERT(self, native != NULL);
  const char *name = aiob_runtime_backend_name(rt);
  const char *want = getenv("AIOBRIDGE_BACKEND");
  AIOB_TEST_ASSERT(self, !want || strcmp(name, want) == 0);
  if (strcmp(name, "uv") == 0)
    AIOB_TEST_ASSERT(self, uv_now(native) > 0 && uv_loop_alive(native));
  else if (strcmp(name, "event") == 0)
    AIOB_TEST_ASSERT(self, event_base_get_method(native) != NULL);
  else
    AIOB_TEST_ASSERT(self, ((struct io_uring *)native)->ring_fd >= 0);
  return AIOB_READY;
}

int main(int argc, char **argv) { return aiob_test_main(argc, argv); }
