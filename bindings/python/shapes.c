/* Short forms of the common shapes of an async C function: an awaitable
 * completed by a native callback (a promise), and blocking C work run on
 * the runtime's pool of worker threads. Each is an ordinary CTask whose C
 * task awaits one leaf future and forwards its output. */
#include "bridge_internal.h"

#include <stdlib.h>

/* ---- An awaitable completed by a callback ------------------------------ */

typedef struct callback_task {
  aiob_promise *promise; /* waiter side */
  aiob_py_done_fn on_done;
  void *done_arg;
} callback_task;

static aiob_poll callback_poll(aiob_task *self, void *p) {
  callback_task *c = p;
  aiob_output out;
  if (aiob_promise_poll(self, c->promise, &out) == AIOB_PENDING)
    return AIOB_PENDING;
  return aiob_task_forward(self, &out);
}

/* Tells the producer, once, that the awaitable is done with its request:
 * cancelled (or collected, or shut down) before the completion came, or
 * not. */
static void callback_drop(void *p) {
  callback_task *c = p;
  if (c->on_done)
    c->on_done(c->done_arg, !aiob__promise_completed(c->promise));
  aiob_promise_release(c->promise);
  free(c);
}

static const aiob_task_vtable callback_vt = {.poll = callback_poll,
                                             .drop = callback_drop};

PyObject *aiob_py_promise_new(aiob_py_bridge *b, const char *name,
                              aiob_py_converter conv, aiob_py_done_fn on_done,
                              void *done_arg, aiob_promise **completer) {
  if (!b || !completer) {
    PyErr_SetString(PyExc_ValueError,
                    "aiobridge: aiob_py_promise_new needs a bridge and a "
                    "place for the completer");
    return NULL;
  }
  callback_task *c = calloc(1, sizeof *c);
  if (!c)
    return PyErr_NoMemory();
  if (aiob_promise_new(&c->promise) < 0) {
    free(c);
    return PyErr_NoMemory();
  }
  c->on_done = on_done;
  c->done_arg = done_arg;
  aiob_promise *p = c->promise;
  PyObject *aw = aiob__py_ctask_new(b, &callback_vt, c, conv, name);
  if (!aw) {
    aiob_promise_abandon(p);
    aiob_promise_release(p);
    free(c);
    return NULL;
  }
  *completer = p;
  return aw;
}

/* Completes p with a py_error, or with AIOB_ENOMEM when there is no memory
 * for one (the completer side is given up either way). */
static int complete_error(aiob_promise *p, PyObject *type, const char *msg,
                          int err, const char *f1, const char *f2) {
  if (!p)
    return AIOB_EINVAL;
  aiob_output out;
  int rc = aiob__py_error_output(&out, type, msg, err, f1, f2);
  if (rc < 0)
    return aiob_promise_complete(p, err ? -err : AIOB_ENOMEM, NULL, NULL) < 0
               ? AIOB_EALREADY
               : rc;
  rc = aiob_promise_complete(p, out.status, out.value, out.free_value);
  if (rc < 0)
    aiob_output_clear(&out);
  return rc;
}

int aiob_py_promise_raise(aiob_promise *p, PyObject *exc_type,
                          const char *msg) {
  if (!exc_type)
    return AIOB_EINVAL;
  return complete_error(p, exc_type, msg, 0, NULL, NULL);
}

int aiob_py_promise_fail_path(aiob_promise *p, int err, const char *filename,
                              const char *filename2) {
  if (err >= 0 || err < -4095)
    return AIOB_EINVAL;
  return complete_error(p, NULL, NULL, -err, filename, filename2);
}

/* ---- Blocking work on the runtime's pool ------------------------------- */

typedef struct blocking_task {
  aiob_blocking job;
} blocking_task;

static aiob_poll blocking_poll(aiob_task *self, void *p) {
  blocking_task *t = p;
  aiob_output out;
  if (aiob_blocking_poll(self, &t->job, &out) == AIOB_PENDING)
    return AIOB_PENDING;
  return aiob_task_forward(self, &out);
}

/* A task dropped before its first poll: the job's arg is released here. */
static void blocking_drop(void *p) {
  blocking_task *t = p;
  aiob_blocking_stop(&t->job);
  free(t);
}

static const aiob_task_vtable blocking_vt = {.poll = blocking_poll,
                                             .drop = blocking_drop};

PyObject *aiob_py_run_blocking(aiob_py_bridge *b, const char *name,
                               aiob_blocking_fn fn, void *arg,
                               void (*drop_arg)(void *arg),
                               aiob_py_converter conv) {
  blocking_task *t = fn ? calloc(1, sizeof *t) : NULL;
  if (!t) {
    if (drop_arg)
      drop_arg(arg);
    if (fn)
      return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError,
                    "aiobridge: aiob_py_run_blocking needs a function");
    return NULL;
  }
  aiob_blocking_init(&t->job, fn, arg, drop_arg);
  PyObject *aw = aiob__py_ctask_new(b, &blocking_vt, t, conv, name);
  if (!aw) { /* the task never existed: the job drops its arg here */
    aiob_blocking_stop(&t->job);
    free(t);
  }
  return aw;
}
