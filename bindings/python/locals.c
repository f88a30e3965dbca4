/* Task locals: the (asyncio loop, contextvars context) a C task's Python
 * work runs in.
 *
 * Every C task the bridge starts carries them as a task-local value (one
 * process-wide key), so the tasks it spawns and the Python awaitables it
 * awaits run on the same loop and in the same context. Refcounted from any
 * thread, released with the GIL; a CTask embeds its own (ctask.c). Also
 * here: the running loop, and the current locals for callers from Python. */
#include "bridge_internal.h"

#include <stdlib.h>

/* Releases what a py_locals holds and empties it (GIL). */
void aiob__py_locals_clear(py_locals *l) {
  Py_CLEAR(l->context);
  Py_CLEAR(l->loop);
  if (l->port)
    aiob__py_port_unref(l->port);
  l->port = NULL;
}

/* Moves the loop, context and port of src to dst (no GIL needed). */
void aiob__py_locals_move(py_locals *dst, py_locals *src) {
  dst->port = src->port;
  dst->loop = src->loop;
  dst->context = src->context;
  src->port = NULL;
  src->loop = src->context = NULL;
}

static void locals_free(void *v) {
  py_locals *l = v;
  aiob__py_locals_clear(l);
  if (l->embedded) {
    /* The memory kept the type alive: GC_Del reads it (3.12+). */
    PyObject *obj = (PyObject *)AIOB__CONTAINER_OF(l, cfut, loc);
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject_GC_Del(obj);
    Py_DECREF(tp);
  } else {
    free(l);
  }
}

void *aiob__py_locals_clone(void *v) {
  py_locals *l = v;
  atomic_fetch_add(&l->refs, 1);
  return l;
}

void aiob__py_locals_destroy(void *v) {
  py_locals *l = v;
  if (atomic_fetch_sub(&l->refs, 1) == 1)
    aiob__py_with_gil(locals_free, l);
}

aiob_py_locals *aiob_py_locals_clone(aiob_py_locals *l) {
  return l ? aiob__py_locals_clone(l) : NULL;
}

void aiob_py_locals_release(aiob_py_locals *l) {
  if (l)
    aiob__py_locals_destroy(l);
}

/* The context of `l` (borrowed, GIL): an empty snapshot is made on first
 * use (any empty context is that snapshot), or NULL on MemoryError. */
PyObject *aiob__py_locals_context(py_locals *l) {
  if (!l->context)
    l->context = PyContext_New();
  return l->context;
}

PyObject *aiob_py_locals_loop(aiob_py_locals *l) { return l->loop; }

PyObject *aiob_py_locals_context(aiob_py_locals *l) {
  PyObject *ctx = aiob__py_locals_context(l);
  if (!ctx)
    PyErr_Clear();
  return ctx;
}

/* A snapshot of the current context (GIL): a copy, or NULL in *out when it
 * is empty (the common case; the copy is then made only if needed). */
int aiob__py_context_snapshot(PyObject **out) {
  PyObject *c = PyContext_CopyCurrent();
  if (!c)
    return -1;
  Py_ssize_t n = PyObject_Length(c);
  if (n <= 0) {
    Py_DECREF(c);
    c = NULL;
  }
  *out = c;
  return n < 0 ? -1 : 0;
}

static aiob_local_key locals_key;
static pthread_once_t locals_once = PTHREAD_ONCE_INIT;
static int locals_key_rc;

static void locals_key_create(void) {
  locals_key_rc = aiob_local_key_create(&locals_key, aiob__py_locals_clone,
                                        aiob__py_locals_destroy);
}

int aiob__py_locals_key_get(aiob_local_key *key) {
  pthread_once(&locals_once, locals_key_create);
  *key = locals_key;
  return locals_key_rc;
}

/* ---- Task locals from Python ------------------------------------------- */

/* The running loop of this thread (new reference), or NULL: with an
 * exception set on error, without one when no loop runs. */
PyObject *aiob__py_running_loop(aiob_py_bridge *b) {
  PyObject *loop = PyObject_CallNoArgs(b->get_running_loop);
  if (loop == Py_None) {
    Py_DECREF(loop);
    return NULL;
  }
  return loop;
}

/* Fills l for `loop` (its port made on first use; `on_thread`: the caller
 * runs that loop) and `context` (NULL: a snapshot of the current one). */
int aiob__py_locals_fill(aiob_py_bridge *b, py_locals *l, PyObject *loop,
                         PyObject *context, int on_thread) {
  pyport *pp = aiob__py_port_for(b, loop, on_thread);
  if (!pp)
    return -1;
  PyObject *ctx = context;
  if (ctx)
    Py_INCREF(ctx);
  else if (aiob__py_context_snapshot(&ctx) < 0)
    return -1;
  l->context = ctx;
  l->port = pp->port;
  aiob__py_port_ref(l->port);
  Py_INCREF(loop);
  l->loop = loop;
  return 0;
}

/* New locals for `loop` and `context` (NULL: a copy of the current one). */
static py_locals *locals_make(aiob_py_bridge *b, PyObject *loop,
                              PyObject *context) {
  if (!loop || loop == Py_None) {
    PyErr_SetString(PyExc_TypeError, "aiobridge: an event loop is needed");
    return NULL;
  }
  if (context && !PyContext_CheckExact(context)) {
    PyErr_SetString(PyExc_TypeError,
                    "aiobridge: context must be a contextvars.Context");
    return NULL;
  }
  PyObject *running = aiob__py_running_loop(b);
  if (!running && PyErr_Occurred())
    return NULL;
  int on_thread = running == loop;
  Py_XDECREF(running);
  py_locals *l = calloc(1, sizeof *l);
  if (!l) {
    PyErr_NoMemory();
    return NULL;
  }
  if (aiob__py_locals_fill(b, l, loop, context, on_thread) < 0) {
    free(l);
    return NULL;
  }
  atomic_init(&l->refs, 1);
  return l;
}

aiob_py_locals *aiob_py_locals_new(aiob_py_bridge *b, PyObject *loop,
                                   PyObject *context) {
  return locals_make(b, loop, context);
}

aiob_py_locals *aiob_py_task_locals(aiob_task *self) {
  aiob_local_key key;
  if (!self || aiob__py_locals_key_get(&key) < 0)
    return NULL;
  py_locals *l = aiob_task_local_get(self, key);
  return l ? aiob__py_locals_clone(l) : NULL;
}

aiob_py_locals *aiob_py_get_current_locals(aiob_py_bridge *b) {
  py_locals *l = aiob_py_task_locals(aiob__current_task);
  if (l)
    return l;
  PyObject *loop = aiob__py_running_loop(b);
  if (!loop) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError, "no running event loop");
    return NULL;
  }
  l = locals_make(b, loop, NULL);
  Py_DECREF(loop);
  return l;
}

PyObject *aiob_py_get_current_loop(aiob_py_bridge *b) {
  py_locals *l = aiob_py_task_locals(aiob__current_task);
  if (l) {
    PyObject *loop = l->loop;
    Py_INCREF(loop);
    aiob__py_locals_destroy(l);
    return loop;
  }
  PyObject *loop = aiob__py_running_loop(b);
  if (!loop && !PyErr_Occurred())
    PyErr_SetString(PyExc_RuntimeError, "no running event loop");
  return loop;
}
