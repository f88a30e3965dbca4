/* A C program that owns main and embeds Python (aiobridge/embed.h): its
 * main task runs on the runtime, awaits asyncio.sleep and coroutines of a
 * Python module (greet.py, next to this file), and spawns a child task.
 * AIOBRIDGE_LOOP=uvloop runs the asyncio side on uvloop. */
#include <aiobridge/embed.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Python calls, made on the asyncio loop's thread with the GIL ------- */

static PyObject *asyncio_sleep(void *arg) {
  (void)arg;
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  PyObject *aw =
      asyncio ? PyObject_CallMethod(asyncio, "sleep", "d", 0.01) : NULL;
  Py_XDECREF(asyncio);
  return aw;
}

static PyObject *greet_call(const char *fn, const char *arg) {
  PyObject *greet = PyImport_ImportModule("greet");
  PyObject *aw = greet ? (arg ? PyObject_CallMethod(greet, fn, "s", arg)
                              : PyObject_CallMethod(greet, fn, NULL))
                       : NULL;
  Py_XDECREF(greet);
  return aw;
}

static PyObject *hello(void *arg) { return greet_call("hello", arg); }
static PyObject *loop_name(void *arg) { return greet_call("loop_name", arg); }

/* str -> malloc'd C string, for the C side. */
static int to_cstring(PyObject *result, aiob_output *out) {
  const char *s = PyUnicode_AsUTF8(result);
  if (!s)
    return -1;
  if (!(out->value = strdup(s))) {
    PyErr_NoMemory();
    return -1;
  }
  out->free_value = free;
  return 0;
}

/* ---- A child task: sleeps 5 ms ------------------------------------------ */

static aiob_poll nap_poll(aiob_task *self, void *p) {
  return aiob_sleep_poll(self, p, NULL);
}

static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = free};

/* ---- The main task ------------------------------------------------------ */

typedef struct app {
  int co;
  aiob_py_await wait;
  aiob_output out;
  aiob_task *child;
} app;

/* Ends the main task with an awaited failure (a Python exception keeps its
 * traceback: aiob_main prints it). */
static aiob_poll fail_with(aiob_task *self, aiob_output *out) {
  aiob_task_fail(self, out->status); /* the exception, with its traceback */
  aiob_task_return(self, out->value, out->free_value);
  out->value = NULL;
  out->free_value = NULL;
  return AIOB_READY;
}

static aiob_poll app_main(aiob_task *self, void *p) {
  app *a = p;
  AIOB_BEGIN(&a->co);
  printf("main task: on a %s loop thread of the runtime\n",
         aiob_runtime_backend_name(aiob_task_runtime(self)));

  aiob_py_await_init_fn(&a->wait, asyncio_sleep, NULL);
  AIOB_AWAIT(&a->co, aiob_py_await_poll(self, &a->wait, &a->out));
  if (a->out.status < 0)
    return fail_with(self, &a->out);
  aiob_output_clear(&a->out);
  printf("main task: awaited asyncio.sleep(0.01)\n");

  aiob_py_await_init_fn(&a->wait, hello, "C");
  aiob_py_await_set_converter(&a->wait, to_cstring);
  AIOB_AWAIT(&a->co, aiob_py_await_poll(self, &a->wait, &a->out));
  if (a->out.status < 0)
    return fail_with(self, &a->out);
  printf("main task: greet.hello -> %s\n", (char *)a->out.value);
  aiob_output_clear(&a->out);

  aiob_py_await_init_fn(&a->wait, loop_name, NULL);
  aiob_py_await_set_converter(&a->wait, to_cstring);
  AIOB_AWAIT(&a->co, aiob_py_await_poll(self, &a->wait, &a->out));
  if (a->out.status < 0)
    return fail_with(self, &a->out);
  printf("main task: the asyncio loop is %s\n", (char *)a->out.value);
  {
    const char *want = getenv("AIOBRIDGE_LOOP");
    int uvloop = want && strcmp(want, "uvloop") == 0;
    int ok = strcmp(a->out.value, "uvloop.Loop") == 0;
    aiob_output_clear(&a->out);
    if (ok != uvloop) {
      aiob_task_fail(self, AIOB_EINVAL);
      return AIOB_READY;
    }
  }

  {
    aiob_sleep *nap = malloc(sizeof *nap);
    if (!nap) {
      aiob_task_fail(self, AIOB_ENOMEM);
      return AIOB_READY;
    }
    aiob_sleep_init(nap, 5 * AIOB_MSEC);
    int rc = aiob_spawn(aiob_task_runtime(self), &nap_vt, nap, &a->child);
    if (rc < 0) {
      free(nap);
      aiob_task_fail(self, rc);
      return AIOB_READY;
    }
  }
  AIOB_AWAIT(&a->co, aiob_task_join(self, a->child, NULL));
  aiob_task_release(a->child);
  printf("main task: joined a child task that slept 5 ms\n");
  AIOB_END(&a->co);
}

int main(int argc, char **argv) {
  static app state;
  static const aiob_task_vtable vt = {.poll = app_main};
  static const char *const path[] = {EMBED_DEMO_DIR, NULL};
  aiob_main_config cfg;
  aiob_main_config_init(&cfg, argc, argv);
  cfg.sys_path = path; /* greet.py */
  return aiob_main(&cfg, &vt, &state);
}
