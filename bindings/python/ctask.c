/* CTask: the awaitable of a C task, itself an asyncio future.
 *
 * One object per C task started from Python. It speaks the asyncio future
 * protocol (asyncio.isfuture is true: done callbacks, cancel(msg), result,
 * exception, get_loop, _asyncio_future_blocking), so gather, wait, shield,
 * wait_for and ensure_future take it as it is, with no Task around it. It
 * is also its own __await__ iterator with send/throw/close, so
 * create_task, TaskGroup and asyncio.run accept it as a coroutine.
 *
 * Here: its completion (on the loop thread, from the port drain) and done
 * callbacks, binding to a loop and starting the C task, the Python type,
 * and aiob_py_future_into_py. Its memory layout (struct cfut) is in
 * bridge_internal.h: the locals and the port drain reach into it. */
#include "bridge_internal.h"

#include <stdlib.h>
#include <string.h>

enum { CF_UNBOUND, CF_PENDING, CF_RESULT, CF_EXCEPTION, CF_CANCELLED };

#define CF_STATE(f) ((f)->it.state)

/* ---- CTask: completion and done callbacks ------------------------------ */

/* on_finish of a C task started by the bridge: runtime thread, no GIL. */
static void cf_finished(void *arg, aiob_task *task) {
  (void)task;
  cfut *f = arg;
  if (!aiob__py_port_push(f->loc.port, &f->it))
    aiob__py_locals_destroy(&f->loc); /* the loop is gone: nobody awaits */
}

static aiob_py_bridge *cf_bridge(cfut *f) {
  return f->loc.port ? f->loc.port->b : f->u.lazy.b;
}

static bool cf_done(cfut *f) { return CF_STATE(f) >= CF_RESULT; }

/* The CTask f finished: result, exception or cancelled (GIL). */
bool aiob__py_ctask_done(PyObject *f) { return cf_done((cfut *)f); }

/* The bridge's list of pending CTasks (GIL): what a shutdown that timed out
 * must fail itself, as their C tasks may never be dropped. */
static void pend_link(aiob_py_bridge *b, cfut *f) {
  f->pnext = b->pending;
  if (f->pnext)
    f->pnext->pprev = &f->pnext;
  f->pprev = &b->pending;
  b->pending = f;
}

static void pend_unlink(cfut *f) {
  if (!f->pprev)
    return;
  *f->pprev = f->pnext;
  if (f->pnext)
    f->pnext->pprev = f->pprev;
  f->pnext = NULL;
  f->pprev = NULL;
}

/* The bridge goes (GIL): its CTasks, still alive, leave its list. */
void aiob__py_ctask_forget_all(aiob_py_bridge *b) {
  while (b->pending)
    pend_unlink(b->pending);
}

/* True if the C task of a pending future runs on a runtime that was shut
 * down: it was dropped by the shutdown, or will never run again. */
static bool cf_runtime_shut(cfut *f) {
  return atomic_load(&aiob_task_runtime(f->u.task)->shut) != 0;
}

/* loop.call_soon(cb, fut, context=ctx) (GIL); ctx NULL: a fresh empty
 * context. From a thread that does not run `loop` (a future cancelled from
 * another thread), call_soon_threadsafe: call_soon would neither be safe
 * nor wake the loop. */
static int call_soon_with(aiob_py_bridge *b, PyObject *loop, PyObject *cb,
                          PyObject *fut, PyObject *ctx) {
  PyObject *running = PyObject_CallNoArgs(b->get_running_loop);
  if (!running)
    return -1;
  PyObject *name = running == loop ? b->s_call_soon : b->s_call_soon_threadsafe;
  Py_DECREF(running);
  PyObject *fresh = NULL;
  if (!ctx && !(ctx = fresh = PyContext_New()))
    return -1;
#if PY_VERSION_HEX >= 0x03090000
  PyObject *args[4] = {loop, cb, fut, ctx};
  PyObject *r = PyObject_VectorcallMethod(
      name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, b->kw_context);
#else
  PyObject *r = NULL, *meth = PyObject_GetAttr(loop, name);
  if (meth) {
    PyObject *args[3] = {cb, fut, ctx};
    r = _PyObject_Vectorcall(meth, args, 2, b->kw_context);
    Py_DECREF(meth);
  }
#endif
  Py_XDECREF(fresh);
  if (!r)
    return -1;
  Py_DECREF(r);
  return 0;
}

/* loop.call_exception_handler({message, exception, future: f}) (GIL);
 * -1 with an exception set if that call failed. */
static int report_to_loop(cfut *f, PyObject *message, PyObject *exc) {
  PyObject *ctx =
      Py_BuildValue("{s:O,s:O,s:O}", "message", message, "exception",
                    exc ? exc : Py_None, "future", (PyObject *)f);
  PyObject *r =
      ctx ? PyObject_CallMethod(f->loc.loop, "call_exception_handler", "O", ctx)
          : NULL;
  Py_XDECREF(ctx);
  if (!r)
    return -1;
  Py_DECREF(r);
  return 0;
}

/* After a done callback raised: SystemExit and KeyboardInterrupt stay set
 * (-1), as a loop lets them out of a handle; anything else goes to the
 * loop's exception handler (0). */
static int callback_failed(cfut *f, PyObject *cb) {
  if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
      PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
    return -1;
  PyObject *exc = aiob__py_take_exception();
  PyObject *msg = PyUnicode_FromFormat("Exception in callback %R", cb);
  if (!msg || report_to_loop(f, msg, exc) < 0)
    PyErr_WriteUnraisable(cb);
  Py_XDECREF(msg);
  Py_XDECREF(exc);
  return 0;
}

/* Runs one done callback now, in its context (NULL: a fresh empty one), as
 * the loop runs a handle; -1 leaves SystemExit / KeyboardInterrupt set. */
static int run_callback(cfut *f, PyObject *cb, PyObject *ctx) {
  PyObject *fresh = NULL;
  if (!ctx && !(ctx = fresh = PyContext_New()))
    return callback_failed(f, cb);
  int rc = 0;
  if (PyContext_Enter(ctx) < 0) { /* entered elsewhere: the loop runs it */
    PyErr_Clear();
    if (call_soon_with(cf_bridge(f), f->loc.loop, cb, (PyObject *)f, ctx) < 0)
      rc = callback_failed(f, cb);
  } else {
    PyObject *r = PyObject_CallOneArg(cb, (PyObject *)f);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyContext_Exit(ctx) < 0)
      PyErr_Clear();
    PyErr_Restore(type, value, tb);
    if (r)
      Py_DECREF(r);
    else
      rc = callback_failed(f, cb);
  }
  Py_XDECREF(fresh);
  return rc;
}

/* Hands the done callbacks of a finished future, in order, to the loop
 * (`now` 0: loop.call_soon, as asyncio does when a future is cancelled
 * from Python) or runs them at once (`now` 1: from the port drain, itself
 * a loop callback, where a handle per callback would only add a trip
 * through the ready queue). If a callback lets SystemExit or
 * KeyboardInterrupt out, the rest go to call_soon and -1 returns with it
 * set. GIL. */
static int cf_callbacks(cfut *f, int now) {
  PyObject *cb0 = f->cb0, *ctx0 = f->ctx0, *cbs = f->cbs;
  f->cb0 = f->ctx0 = f->cbs = NULL;
  aiob_py_bridge *b = cf_bridge(f);
  PyObject *type = NULL, *value = NULL, *tb = NULL;
  int rc = 0;
  Py_ssize_t n = cbs ? PyList_GET_SIZE(cbs) : 0;
  for (Py_ssize_t i = cb0 ? -1 : 0; i < n; i++) {
    PyObject *cb = cb0, *ctx = ctx0;
    if (i >= 0) {
      cb = PyTuple_GET_ITEM(PyList_GET_ITEM(cbs, i), 0);
      ctx = PyTuple_GET_ITEM(PyList_GET_ITEM(cbs, i), 1);
      ctx = ctx == Py_None ? NULL : ctx;
    }
    if (now && rc == 0) {
      if (run_callback(f, cb, ctx) < 0) {
        rc = -1;
        PyErr_Fetch(&type, &value, &tb);
      }
    } else if (call_soon_with(b, f->loc.loop, cb, (PyObject *)f, ctx) < 0) {
      if (now) {
        PyErr_WriteUnraisable(cb);
      } else {
        rc = -1;
        break;
      }
    }
  }
  Py_XDECREF(cb0);
  Py_XDECREF(ctx0);
  Py_XDECREF(cbs);
  if (type)
    PyErr_Restore(type, value, tb);
  return rc;
}

/* Takes the current exception as the future's outcome. */
static void cf_set_current_exception(cfut *f) {
  PyObject *value = aiob__py_take_exception();
  if (!value) {
    CF_STATE(f) = CF_CANCELLED;
    return;
  }
  f->value = value;
  CF_STATE(f) = CF_EXCEPTION;
  f->it.log_exc = 1;
}

/* Fails the future with aiobridge.ShutdownError(msg). */
static void cf_set_shutdown_error(cfut *f, const char *msg) {
  PyObject *exc = PyObject_CallFunction(cf_bridge(f)->shutdown_error, "s", msg);
  if (!exc) {
    cf_set_current_exception(f);
    return;
  }
  f->value = exc;
  CF_STATE(f) = CF_EXCEPTION;
  f->it.log_exc = 1;
}

/* The Python value of a finished task's or a stream item's output (GIL):
 * conv(out), which owns out->value from then on (out is left without it),
 * or None without a converter (the value is freed). NULL with an
 * exception set; a converter that returns NULL without one is a bug of
 * the C task `name`: SystemError. */
PyObject *aiob__py_convert(aiob_py_converter conv, aiob_output *out,
                           const char *name) {
  if (!conv) {
    aiob_output_clear(out);
    Py_RETURN_NONE;
  }
  PyObject *v = conv(out);
  out->value = NULL;
  out->free_value = NULL;
  if (!v && !PyErr_Occurred())
    PyErr_Format(PyExc_SystemError,
                 "aiobridge: the converter of %s returned NULL without "
                 "setting an exception",
                 name ? name : "a C task");
  return v;
}

/* Resolves the future of a finished C task and runs its done callbacks
 * (loop thread, GIL; `now` as for cf_callbacks). A future cancelled by
 * Python meanwhile discards the outcome silently. A task dropped because
 * its runtime was shut down raises aiobridge.ShutdownError: CancelledError
 * stays for cancellations the user asked for. -1: a callback let
 * SystemExit or KeyboardInterrupt out, or (`now` 0) call_soon failed (it
 * is set). */
static int cf_complete(aiob_py_bridge *b, cfut *f, int now);

int aiob__py_ctask_complete(aiob_py_bridge *b, cfut *f, int now) {
  return cf_complete(b, f, now);
}

/* on_finish of a loop-local C task: the loop's own thread, inside a
 * dispatch of its hosted runtime, with or without the GIL (shared form).
 * The future is resolved here and its done callbacks go to call_soon: a
 * dispatch may run inside unrelated Python code (a spawn's first poll). */
static void cf_finished_local(void *arg, aiob_task *task) {
  (void)task;
  cfut *f = arg;
  /* While the interpreter finalizes (e.g. a libuv callback on a daemon
   * thread's loop), the future is left as the interpreter leaves its own.
   * (PyGILState_Check cannot be trusted then.) */
  if (!aiob__py_may_take_gil())
    return;
  int in_python = PyGILState_Check(); /* a Python callback or call runs us */
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (cf_complete(f->loc.port->b, f, 0) < 0) {
    if (in_python && aiob__py_local_stash()) {
      /* KeyboardInterrupt, SystemExit: raised by that callback or call. */
    } else if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
      PyErr_Clear(); /* (a libuv callback: Python raises it anew) */
      PyErr_SetInterrupt();
    } else {
      PyObject *exc = aiob__py_take_exception();
      PyObject *closed = PyObject_CallMethod(f->loc.loop, "is_closed", NULL);
      if (closed != Py_True && exc) { /* closed: nobody can be told */
        PyErr_Clear();
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        PyErr_WriteUnraisable((PyObject *)f);
      }
      Py_XDECREF(closed);
      Py_XDECREF(exc);
      PyErr_Clear();
    }
  }
  aiob__py_locals_destroy(&f->loc); /* the completion's reference */
  PyErr_Restore(type, value, tb);
  PyGILState_Release(g);
}

static int cf_complete(aiob_py_bridge *b, cfut *f, int now) {
  b->completions++;
  if (f->it.dead) /* collected: its task was cancelled and released */
    return 0;
  Py_INCREF(f); /* callbacks and converters may drop the last reference */
  aiob_output out = {0};
  aiob_task_take_output(f->u.task, &out);
  if (CF_STATE(f) != CF_PENDING) {
    aiob_output_clear(&out);
    Py_DECREF(f);
    return 0;
  }
  pend_unlink(f);
  if (out.status >= 0) {
    PyObject *v = aiob__py_convert(f->conv, &out, f->name);
    if (v) {
      f->value = v;
      CF_STATE(f) = CF_RESULT;
    } else {
      cf_set_current_exception(f);
    }
  } else if (out.status == AIOB_ECANCELED && !f->local && cf_runtime_shut(f)) {
    /* (A loop-local task is dropped when its loop closes: a cancel.) */
    cf_set_shutdown_error(f, "aiobridge: the runtime was shut down");
  } else if (out.status == AIOB_ECANCELED) {
    CF_STATE(f) = CF_CANCELLED;
  } else {
    PyObject *exc = aiob__py_exception_for(b->shutdown_error, &out, f->name);
    if (exc) {
      f->value = exc;
      CF_STATE(f) = CF_EXCEPTION;
      f->it.log_exc = 1;
    } else {
      cf_set_current_exception(f);
    }
  }
  aiob_output_clear(&out);
  if (f->hook)
    f->hook(f->hook_arg);
  int rc = cf_callbacks(f, now);
  Py_DECREF(f);
  return rc;
}

/* Fails with ShutdownError every CTask of port p whose C task runs on a
 * runtime that was shut down (after a shutdown that timed out: an
 * abandoned loop thread may never drop it; a completion that still comes
 * is then discarded). On p's loop thread, GIL. -1: a done callback let
 * SystemExit or KeyboardInterrupt out (it is set; some may be left). */
int aiob__py_ctask_fail_shut(aiob_py_bridge *b, port *p) {
  /* Collected first, with references: callbacks may change the list. No
   * Python allocation between counting and filling (a collection could
   * unlink futures). */
  size_t n = 0, k = 0;
  for (cfut *f = b->pending; f; f = f->pnext)
    n += f->loc.port == p && cf_runtime_shut(f);
  cfut **doomed = n ? malloc(n * sizeof *doomed) : NULL;
  if (!doomed)
    return 0;
  for (cfut *f = b->pending; f && k < n; f = f->pnext) {
    if (f->loc.port == p && cf_runtime_shut(f)) {
      Py_INCREF(f);
      doomed[k++] = f;
    }
  }
  int rc = 0;
  for (size_t i = 0; i < k; i++) {
    cfut *f = doomed[i];
    if (rc == 0 && CF_STATE(f) == CF_PENDING) {
      pend_unlink(f);
      cf_set_shutdown_error(f, "aiobridge: the runtime was shut down and its "
                               "loop thread did not stop in time");
      if (f->hook)
        f->hook(f->hook_arg);
      rc = cf_callbacks(f, 1);
    }
    Py_DECREF(f);
  }
  free(doomed);
  return rc;
}
/* ---- CTask: binding and starting ---------------------------------------- */

static void cf_drop_state(cfut *f) {
  void *st = f->u.lazy.state;
  f->u.lazy.state = NULL;
  if (st && f->u.lazy.vt->drop)
    f->u.lazy.vt->drop(st); /* never spawned: released here */
}

/* Binds an unbound future to `from`'s locals, or to the running `loop` in
 * a snapshot of the current context, and spawns its C task (GIL). On
 * failure it stays unbound, with an exception set.
 *
 * Finding the port and snapshotting the context run Python code, during
 * which another thread may bind or cancel this future, or shut the runtime
 * down: the locals are gathered first, the future's state is checked once
 * that code is behind us, and nothing from the check to the spawn lets
 * another thread in. A future that another thread bound meanwhile is left
 * as it is (its loop tells the caller it belongs elsewhere); one cancelled
 * meanwhile gets this loop for its done callbacks. */
struct cf_spawn {
  cfut *f;
  aiob_spawn_opts o;
  int rc;
};

/* Spawns f's C task on rt and marks f pending (GIL): before the task's
 * first poll, which for a loop-local task comes before the spawn returns
 * to cf_start. */
static int cf_spawn(aiob_runtime *rt, void *arg) {
  struct cf_spawn *sp = arg;
  cfut *f = sp->f;
  aiob_task *task = NULL;
  sp->rc = aiob_spawn_ex(rt, &sp->o, f->u.lazy.vt, f->u.lazy.state, &task);
  if (sp->rc < 0)
    return sp->rc;
  f->u.task = task; /* the task owns `state` now */
  CF_STATE(f) = CF_PENDING;
  pend_link(f->loc.port->b, f);
  return 0;
}

static int cf_start(cfut *f, py_locals *from, PyObject *loop) {
  aiob_py_bridge *b = f->u.lazy.b;
  aiob_local_key key;
  if (aiob__py_locals_key_get(&key) < 0) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: no task-local key left");
    return -1;
  }
  py_locals got = {0};
  if (from) {
    got.port = from->port;
    aiob__py_port_ref(got.port);
    got.loop = from->loop;
    Py_INCREF(got.loop);
    got.context = from->context;
    Py_XINCREF(got.context);
  } else if (aiob__py_locals_fill(b, &got, loop, NULL, 1) < 0) {
    return -1;
  }
  /* May release the GIL (to start the runtime, or wait for a shutdown in
   * progress): before the checks. */
  aiob_runtime *rt = aiob__py_bridge_runtime(b);
  if (!rt) {
    aiob__py_locals_clear(&got);
    return -1;
  }
  if (f->loc.loop) { /* bound by another thread meanwhile */
    aiob_runtime_release(rt);
    aiob__py_locals_clear(&got);
    return 0;
  }
  if (CF_STATE(f) != CF_UNBOUND) { /* cancelled meanwhile */
    aiob_runtime_release(rt);
    f->loc.loop = got.loop;
    got.loop = NULL;
    aiob__py_locals_clear(&got);
    return 0;
  }
  aiob__py_locals_move(&f->loc, &got);
  aiob_local_init li = {.key = key, .value = &f->loc};
  struct cf_spawn sp = {.f = f};
  aiob_spawn_opts_init(&sp.o);
  sp.o.no_inherit = 1;
  sp.o.locals = &li;
  sp.o.nlocals = 1;
  sp.o.on_finish = f->local ? cf_finished_local : cf_finished;
  sp.o.on_finish_arg = f;
  sp.o.name = f->name;
  atomic_fetch_add(&f->loc.refs, 2); /* the task-local + the completion */
  int rc;
  if (f->local) {
    /* Spawned onto the loop's hosted runtime, and polled once at once. */
    aiob_runtime_release(rt);
    rc = aiob__py_local_spawn(b, f->loc.loop, cf_spawn, &sp);
    if (rc < 0 && sp.rc == 0)
      sp.rc = AIOB_EINVAL; /* the exception is set */
    rc = sp.rc;
  } else {
    rc = cf_spawn(rt, &sp);
    aiob_runtime_release(rt);
  }
  if (rc < 0) {
    atomic_fetch_sub(&f->loc.refs, 2); /* the object still holds one */
    aiob__py_locals_move(&got,
                         &f->loc); /* unbound before Python code may run */
    aiob__py_locals_clear(&got);
    if (PyErr_Occurred())
      ;
    else if (rc == AIOB_ESHUTDOWN)
      PyErr_SetString(b->shutdown_error,
                      "aiobridge: the runtime is shutting down");
    else
      PyErr_Format(PyExc_OSError, "aiobridge: cannot spawn: %s",
                   aiob_strerror(rc));
    return -1;
  }
  return 0;
}

/* The future's loop (borrowed), binding an unbound future to the running
 * loop first (and starting its task); NULL with an exception set. */
static PyObject *cf_loop(cfut *f) {
  if (f->loc.loop)
    return f->loc.loop;
  PyObject *loop = aiob__py_running_loop(f->u.lazy.b);
  if (!loop) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError,
                      "aiobridge awaitable used outside a running event loop");
    return NULL;
  }
  int rc = cf_start(f, NULL, loop);
  Py_DECREF(loop);
  if (rc == 0 && f->local && aiob__py_local_unstash() < 0)
    return NULL; /* an interrupt during the task's first poll */
  return rc < 0 ? NULL : f->loc.loop;
}

static cfut *cf_new(aiob_py_bridge *b, const aiob_task_vtable *vt, void *state,
                    aiob_py_converter conv) {
  cfut *f = PyObject_GC_New(cfut, b->ctask_type);
  if (!f)
    return NULL;
  f->cb0 = f->ctx0 = f->cbs = f->value = NULL;
  memset(&f->loc, 0, sizeof f->loc);
  atomic_init(&f->loc.refs, 1);
  f->loc.embedded = 1;
  f->u.lazy.vt = vt;
  f->u.lazy.state = state;
  f->u.lazy.b = b;
  f->conv = conv;
  f->name = vt->name && vt->name[0] ? vt->name : NULL;
  f->local = 0;
  f->hook = NULL;
  f->pnext = NULL;
  f->pprev = NULL;
  memset(&f->it, 0, sizeof f->it);
  f->it.kind = ITEM_COMPLETION;
  CF_STATE(f) = CF_UNBOUND;
  PyObject_GC_Track(f);
  return f;
}

/* ---- CTask: the Python type --------------------------------------------- */

static PyObject *cf_cancelled_error(cfut *f) {
  aiob_py_bridge *b = cf_bridge(f);
  return f->value ? PyObject_CallOneArg(b->cancelled_error, f->value)
                  : PyObject_CallNoArgs(b->cancelled_error);
}

static PyObject *cf_raise_cancelled(cfut *f) {
  PyObject *exc = cf_cancelled_error(f);
  if (exc) {
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
  }
  return NULL;
}

static PyObject *cf_not_done(cfut *f, const char *what) {
  PyErr_Format(cf_bridge(f)->invalid_state_error, "%s is not set.", what);
  return NULL;
}

static PyObject *cf_result(PyObject *self, PyObject *unused) {
  (void)unused;
  cfut *f = (cfut *)self;
  switch (CF_STATE(f)) {
  case CF_RESULT:
    Py_INCREF(f->value);
    return f->value;
  case CF_EXCEPTION:
    f->it.log_exc = 0;
    PyErr_SetObject((PyObject *)Py_TYPE(f->value), f->value);
    return NULL;
  case CF_CANCELLED:
    return cf_raise_cancelled(f);
  default:
    return cf_not_done(f, "Result");
  }
}

static PyObject *cf_exception(PyObject *self, PyObject *unused) {
  (void)unused;
  cfut *f = (cfut *)self;
  switch (CF_STATE(f)) {
  case CF_RESULT:
    Py_RETURN_NONE;
  case CF_EXCEPTION:
    f->it.log_exc = 0;
    Py_INCREF(f->value);
    return f->value;
  case CF_CANCELLED:
    return cf_raise_cancelled(f);
  default:
    return cf_not_done(f, "Exception");
  }
}

static PyObject *cf_done_m(PyObject *self, PyObject *unused) {
  (void)unused;
  return PyBool_FromLong(cf_done((cfut *)self));
}

static PyObject *cf_cancelled_m(PyObject *self, PyObject *unused) {
  (void)unused;
  return PyBool_FromLong(CF_STATE((cfut *)self) == CF_CANCELLED);
}

/* Cancels: the C task is dropped on its loop thread; its outcome, if it
 * races with this, is discarded. */
static int cf_do_cancel(cfut *f, PyObject *msg) {
  if (cf_done(f))
    return 0;
  if (CF_STATE(f) == CF_UNBOUND) {
    cf_drop_state(f);
  } else {
    pend_unlink(f);
    aiob_task_cancel(f->u.task);
  }
  CF_STATE(f) = CF_CANCELLED;
  if (msg && msg != Py_None) {
    Py_INCREF(msg);
    f->value = msg;
  }
  return f->loc.loop && cf_callbacks(f, 0) < 0 ? -1 : 1;
}

static PyObject *cf_cancel(PyObject *self, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"msg", NULL};
  PyObject *msg = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:cancel", kwlist, &msg))
    return NULL;
  int rc = cf_do_cancel((cfut *)self, msg);
  return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *cf_add_done_callback(PyObject *self, PyObject *args,
                                      PyObject *kw) {
  static char *kwlist[] = {"fn", "context", NULL};
  cfut *f = (cfut *)self;
  PyObject *fn, *ctx = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$O:add_done_callback", kwlist,
                                   &fn, &ctx))
    return NULL;
  PyObject *loop = cf_loop(f);
  if (!loop)
    return NULL;
  if (ctx == Py_None) {
    if (aiob__py_context_snapshot(&ctx) < 0)
      return NULL;
  } else {
    Py_INCREF(ctx);
  }
  int rc = 0;
  if (cf_done(f)) {
    rc = call_soon_with(cf_bridge(f), loop, fn, self, ctx);
    Py_XDECREF(ctx);
  } else if (!f->cb0 && !f->cbs) {
    Py_INCREF(fn);
    f->cb0 = fn;
    f->ctx0 = ctx;
  } else {
    PyObject *pair = PyTuple_Pack(2, fn, ctx ? ctx : Py_None);
    Py_XDECREF(ctx);
    if (!f->cbs && pair)
      f->cbs = PyList_New(0);
    rc = pair && f->cbs ? PyList_Append(f->cbs, pair) : -1;
    Py_XDECREF(pair);
  }
  if (rc < 0)
    return NULL;
  Py_RETURN_NONE;
}

/* Compares with references held: a user __eq__ may change the callbacks. */
static PyObject *cf_remove_done_callback(PyObject *self, PyObject *fn) {
  cfut *f = (cfut *)self;
  Py_ssize_t removed = 0;
  PyObject *cb0 = f->cb0;
  if (cb0) {
    Py_INCREF(cb0);
    int eq = PyObject_RichCompareBool(cb0, fn, Py_EQ);
    if (eq > 0 && f->cb0 == cb0) {
      Py_CLEAR(f->cb0);
      Py_CLEAR(f->ctx0);
      removed++;
    }
    Py_DECREF(cb0);
    if (eq < 0)
      return NULL;
  }
  PyObject *cbs = f->cbs;
  if (cbs) {
    PyObject *keep = PyList_New(0);
    Py_INCREF(cbs);
    for (Py_ssize_t i = 0; keep && i < PyList_GET_SIZE(cbs); i++) {
      PyObject *pair = PyList_GET_ITEM(cbs, i);
      Py_INCREF(pair);
      int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(pair, 0), fn, Py_EQ);
      if (eq < 0 || (eq == 0 && PyList_Append(keep, pair) < 0))
        Py_CLEAR(keep);
      removed += eq > 0;
      Py_DECREF(pair);
    }
    if (keep && f->cbs == cbs) {
      Py_SETREF(f->cbs, PyList_GET_SIZE(keep) ? keep : NULL);
      if (f->cbs)
        keep = NULL;
    }
    Py_XDECREF(keep);
    Py_DECREF(cbs);
    if (PyErr_Occurred())
      return NULL;
  }
  return PyLong_FromSsize_t(removed);
}

static PyObject *cf_get_loop(PyObject *self, PyObject *unused) {
  (void)unused;
  PyObject *loop = cf_loop((cfut *)self);
  Py_XINCREF(loop);
  return loop;
}

static PyObject *cf_make_cancelled_error(PyObject *self, PyObject *unused) {
  (void)unused;
  return cf_cancelled_error((cfut *)self);
}

/* Iteration: the future yields itself until done, then returns its result
 * (what asyncio's own future iterator does). */
static PyObject *cf_iternext(PyObject *self) {
  cfut *f = (cfut *)self;
  if (!cf_done(f) && !cf_loop(f))
    return NULL;
  if (!cf_done(f)) {
    f->it.blocking = 1;
    Py_INCREF(self);
    return self;
  }
  PyObject *res = cf_result(self, NULL);
  if (!res || res == Py_None) {
    Py_XDECREF(res);
    return NULL; /* an exception, or StopIteration(None) */
  }
  PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, res);
  Py_DECREF(res);
  if (stop) {
    PyErr_SetObject(PyExc_StopIteration, stop);
    Py_DECREF(stop);
  }
  return NULL;
}

static PyObject *cf_send(PyObject *self, PyObject *arg) {
  if (arg != Py_None) {
    PyErr_SetString(PyExc_TypeError,
                    "can't send non-None value to an aiobridge CTask");
    return NULL;
  }
  PyObject *r = cf_iternext(self);
  if (!r && !PyErr_Occurred())
    PyErr_SetNone(PyExc_StopIteration); /* a method must say it */
  return r;
}

/* An exception thrown into the awaiting coroutine is raised from the await
 * point; a CancelledError thrown in cancels the C task too. */
static PyObject *cf_throw(PyObject *self, PyObject *args) {
  cfut *f = (cfut *)self;
  PyObject *typ, *val = NULL, *tb = NULL;
  if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
    return NULL;
  PyObject *cls =
      PyExceptionInstance_Check(typ) ? (PyObject *)Py_TYPE(typ) : typ;
  if (!PyExceptionClass_Check(cls)) {
    PyErr_SetString(PyExc_TypeError,
                    "exceptions must be classes or instances deriving from "
                    "BaseException");
    return NULL;
  }
  if (PyObject_IsSubclass(cls, cf_bridge(f)->cancelled_error) == 1 &&
      cf_do_cancel(f, NULL) < 0)
    PyErr_Clear();
  if (PyExceptionInstance_Check(typ)) {
    if (tb && tb != Py_None)
      PyException_SetTraceback(typ, tb);
    PyErr_SetObject(cls, typ);
  } else {
    PyErr_SetObject(cls, val ? val : Py_None);
  }
  return NULL;
}

/* A coroutine closed before it ever ran: the task never starts. */
static PyObject *cf_close(PyObject *self, PyObject *unused) {
  (void)unused;
  cfut *f = (cfut *)self;
  if (CF_STATE(f) == CF_UNBOUND && cf_do_cancel(f, NULL) < 0)
    return NULL;
  Py_RETURN_NONE;
}

static PyObject *cf_self(PyObject *self) {
  Py_INCREF(self);
  return self;
}

/* None until bound to a loop: asyncio.isfuture is false, so an unbound
 * CTask is taken as a coroutine (asyncio.run, ensure_future and gather put
 * it in a Task on their loop, and it binds to that loop when first run). */
static PyObject *cf_get_blocking(PyObject *self, void *c) {
  (void)c;
  cfut *f = (cfut *)self;
  if (!f->loc.loop)
    Py_RETURN_NONE;
  return PyBool_FromLong(f->it.blocking);
}

static int cf_set_blocking(PyObject *self, PyObject *v, void *c) {
  (void)c;
  int t = v ? PyObject_IsTrue(v) : -1;
  if (t < 0) {
    if (!v)
      PyErr_SetString(PyExc_AttributeError, "cannot delete attribute");
    return -1;
  }
  ((cfut *)self)->it.blocking = (uint8_t)t;
  return 0;
}

static PyObject *cf_get_log_traceback(PyObject *self, void *c) {
  (void)c;
  return PyBool_FromLong(((cfut *)self)->it.log_exc);
}

static int cf_set_log_traceback(PyObject *self, PyObject *v, void *c) {
  (void)c;
  int t = v ? PyObject_IsTrue(v) : -1;
  if (t != 0) {
    if (t > 0)
      PyErr_SetString(PyExc_ValueError,
                      "_log_traceback can only be set to False");
    else if (!v)
      PyErr_SetString(PyExc_AttributeError, "cannot delete attribute");
    return -1;
  }
  ((cfut *)self)->it.log_exc = 0;
  return 0;
}

static PyObject *cf_get_loop_attr(PyObject *self, void *c) {
  (void)c;
  PyObject *loop = ((cfut *)self)->loc.loop;
  loop = loop ? loop : Py_None;
  Py_INCREF(loop);
  return loop;
}

static PyObject *cf_get_cancel_message(PyObject *self, void *c) {
  (void)c;
  cfut *f = (cfut *)self;
  PyObject *m = CF_STATE(f) == CF_CANCELLED && f->value ? f->value : Py_None;
  Py_INCREF(m);
  return m;
}

/* <CTask myext.fn pending>: the name, when the C task has one, then the
 * state, as asyncio shows its tasks. */
static PyObject *cf_repr(PyObject *self) {
  cfut *f = (cfut *)self;
  const char *name = f->name ? f->name : "", *sp = f->name ? " " : "";
  switch (CF_STATE(f)) {
  case CF_UNBOUND:
    return PyUnicode_FromFormat("<CTask %s%sunstarted>", name, sp);
  case CF_PENDING:
    return PyUnicode_FromFormat("<CTask %s%spending>", name, sp);
  case CF_RESULT:
    return PyUnicode_FromFormat("<CTask %s%sfinished result=%R>", name, sp,
                                f->value);
  case CF_EXCEPTION:
    return PyUnicode_FromFormat("<CTask %s%sfinished exception=%R>", name, sp,
                                f->value);
  default:
    return PyUnicode_FromFormat("<CTask %s%scancelled>", name, sp);
  }
}

/* __name__ and __qualname__: asyncio names a coroutine by them in a Task's
 * repr and in its warnings ("Task was destroyed but it is pending"). */
static PyObject *cf_get_name(PyObject *self, void *c) {
  (void)c;
  const char *name = ((cfut *)self)->name;
  if (!name)
    return PyUnicode_FromString("CTask");
  return PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "replace");
}

/* A failure nobody retrieved goes to the loop's exception handler, as for
 * asyncio's own futures. */
static void cf_finalize(PyObject *self) {
  cfut *f = (cfut *)self;
  if (CF_STATE(f) != CF_EXCEPTION || !f->it.log_exc || !f->loc.loop)
    return;
  f->it.log_exc = 0;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *msg = PyUnicode_FromString("CTask exception was never retrieved");
  if (!msg || report_to_loop(f, msg, f->value) < 0)
    PyErr_Clear();
  Py_XDECREF(msg);
  PyErr_Restore(type, value, tb);
}

static int cf_traverse(PyObject *self, visitproc visit, void *arg) {
  cfut *f = (cfut *)self;
#if PY_VERSION_HEX >= 0x03090000
  Py_VISIT(Py_TYPE(self));
#endif
  Py_VISIT(f->cb0);
  Py_VISIT(f->ctx0);
  Py_VISIT(f->cbs);
  Py_VISIT(f->value);
  return 0;
}

static int cf_clear(PyObject *self) {
  cfut *f = (cfut *)self;
  Py_CLEAR(f->cb0);
  Py_CLEAR(f->ctx0);
  Py_CLEAR(f->cbs);
  Py_CLEAR(f->value);
  return 0;
}

/* A future collected before its task finished cancels the task. The
 * memory stays while C still holds the locals or the completion. */
static void cf_dealloc(PyObject *self) {
  cfut *f = (cfut *)self;
  if (PyObject_CallFinalizerFromDealloc(self) < 0)
    return; /* resurrected */
  PyObject_GC_UnTrack(self);
  /* Dead before any Python code can run (cf_clear may run some, and let
   * another thread drain this future's completion meanwhile). */
  f->it.dead = 1;
  pend_unlink(f);
  if (f->loc.port) {
    if (CF_STATE(f) == CF_PENDING)
      aiob_task_cancel(f->u.task);
    aiob_task_release(f->u.task);
    f->u.task = NULL;
  } else if (CF_STATE(f) == CF_UNBOUND) {
    cf_drop_state(f);
  }
  cf_clear(self);
  aiob__py_locals_destroy(
      &f->loc); /* the type's reference goes with the memory */
}

static PyMethodDef cf_methods[] = {
    {"result", cf_result, METH_NOARGS, "The C task's result."},
    {"exception", cf_exception, METH_NOARGS, "The C task's exception."},
    {"done", cf_done_m, METH_NOARGS, "True once finished or cancelled."},
    {"cancelled", cf_cancelled_m, METH_NOARGS, "True if cancelled."},
    {"cancel", (PyCFunction)(void (*)(void))cf_cancel,
     METH_VARARGS | METH_KEYWORDS, "Cancel the C task."},
    {"add_done_callback", (PyCFunction)(void (*)(void))cf_add_done_callback,
     METH_VARARGS | METH_KEYWORDS, "Call fn(self) once done."},
    {"remove_done_callback", cf_remove_done_callback, METH_O,
     "Remove a done callback."},
    {"get_loop", cf_get_loop, METH_NOARGS, "The asyncio loop."},
    {"_make_cancelled_error", cf_make_cancelled_error, METH_NOARGS, NULL},
    {"send", cf_send, METH_O, "Start or resume."},
    {"throw", cf_throw, METH_VARARGS, "Raise at the await point."},
    {"close", cf_close, METH_NOARGS, "Close."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef cf_getset[] = {
    {"_asyncio_future_blocking", cf_get_blocking, cf_set_blocking, NULL, NULL},
    {"_log_traceback", cf_get_log_traceback, cf_set_log_traceback, NULL, NULL},
    {"_loop", cf_get_loop_attr, NULL, NULL, NULL},
    {"_cancel_message", cf_get_cancel_message, NULL, NULL, NULL},
    {"__name__", cf_get_name, NULL, NULL, NULL},
    {"__qualname__", cf_get_name, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot cf_slots[] = {
    {Py_tp_new, aiob__py_no_new},  {Py_tp_dealloc, cf_dealloc},
    {Py_tp_traverse, cf_traverse}, {Py_tp_clear, cf_clear},
    {Py_tp_finalize, cf_finalize}, {Py_tp_repr, cf_repr},
    {Py_tp_iter, cf_self},         {Py_tp_iternext, cf_iternext},
    {Py_am_await, cf_self},        {Py_tp_methods, cf_methods},
    {Py_tp_getset, cf_getset},     {0, NULL},
};

PyType_Spec aiob__py_ctask_spec = {
    .name = "aiobridge.CTask",
    .basicsize = sizeof(cfut),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = cf_slots,
};

static int check_vt(aiob_py_bridge *b, const aiob_task_vtable *vt) {
  if (!b || !vt || !vt->poll) {
    PyErr_SetString(PyExc_ValueError, "aiobridge: no task vtable");
    return -1;
  }
  return 0;
}

/* Releases a future whose start failed; the caller keeps `state`. */
static PyObject *cf_abandon(cfut *f) {
  f->u.lazy.state = NULL;
  Py_DECREF(f);
  return NULL;
}

/* A new CTask for vt/state, started at once inside a running loop (else
 * where it is first awaited), on the runtime or loop-local. */
static PyObject *ctask_new(aiob_py_bridge *b, const aiob_task_vtable *vt,
                           void *state, aiob_py_converter conv,
                           const char *name, int local) {
  if (check_vt(b, vt) < 0)
    return NULL;
  PyObject *loop = aiob__py_running_loop(b);
  if (!loop && PyErr_Occurred())
    return NULL;
  cfut *f = cf_new(b, vt, state, conv);
  if (f && name && name[0])
    f->name = name;
  if (f)
    f->local = local;
  if (!f || !loop) {
    /* No running loop: binds to the loop that first awaits it. */
    Py_XDECREF(loop);
    return (PyObject *)f;
  }
  int rc = cf_start(f, NULL, loop); /* inside a loop: start now */
  Py_DECREF(loop);
  if (rc < 0)
    return cf_abandon(f);
  /* An interrupt during a local task's first poll: the task owns `state`
   * now, so the awaitable is returned (NULL would tell the caller to free
   * it) and Ctrl-C is raised anew, as its signal would be. */
  if (local && aiob__py_local_unstash() < 0) {
    if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
      PyErr_Clear();
      PyErr_SetInterrupt();
    } else {
      PyErr_WriteUnraisable((PyObject *)f);
    }
  }
  return (PyObject *)f;
}

/* aiob_py_future_into_py with a name for the task (NULL: the vtable's). */
PyObject *aiob__py_ctask_new(aiob_py_bridge *b, const aiob_task_vtable *vt,
                             void *state, aiob_py_converter conv,
                             const char *name) {
  return ctask_new(b, vt, state, conv, name, 0);
}

PyObject *aiob_py_future_into_py(aiob_py_bridge *b, const aiob_task_vtable *vt,
                                 void *state, aiob_py_converter conv) {
  return ctask_new(b, vt, state, conv, NULL, 0);
}

PyObject *aiob_py_local_future_into_py(aiob_py_bridge *b,
                                       const aiob_task_vtable *vt, void *state,
                                       aiob_py_converter conv) {
  return ctask_new(b, vt, state, conv, NULL, 1);
}

PyObject *aiob_py_future_into_py_with_locals(aiob_py_bridge *b,
                                             aiob_py_locals *locals,
                                             const aiob_task_vtable *vt,
                                             void *state,
                                             aiob_py_converter conv) {
  if (check_vt(b, vt) < 0)
    return NULL;
  if (!locals) {
    PyErr_SetString(PyExc_ValueError, "aiobridge: no task locals");
    return NULL;
  }
  cfut *f = cf_new(b, vt, state, conv);
  if (!f)
    return NULL;
  return cf_start(f, locals, NULL) < 0 ? cf_abandon(f) : (PyObject *)f;
}
