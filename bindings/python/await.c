/* Awaiting Python from C.
 *
 * A C task that awaits a Python awaitable (aiob_py_await, a leaf future)
 * sends a request to its asyncio loop's port; the loop starts the
 * awaitable in the task's context and a _Waiter done callback completes
 * the C task's promise with the result, converted on the loop thread if
 * asked. Cancelling the C task sends a cancel item that cancels the Python
 * side. */
#include "bridge_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- Awaiting Python from C: requests ---------------------------------- */

void aiob__py_request_unref(request *r) {
  if (atomic_fetch_sub(&r->refs, 1) != 1)
    return;
  if (r->promise)
    aiob_promise_abandon(r->promise);
  aiob__py_locals_destroy(r->locals);
  aiob__runtime_unref(r->rt);
  free(r);
}

/* The bridge's list of Python awaitables running for C tasks (GIL): what a
 * shutdown that timed out cancels itself, as their C tasks may never be
 * dropped. */
static void awaiting_link(aiob_py_bridge *b, request *r) {
  r->pnext = b->awaiting;
  if (r->pnext)
    r->pnext->pprev = &r->pnext;
  r->pprev = &b->awaiting;
  b->awaiting = r;
}

static void awaiting_unlink(request *r) {
  if (!r->pprev)
    return;
  *r->pprev = r->pnext;
  if (r->pnext)
    r->pnext->pprev = r->pprev;
  r->pnext = NULL;
  r->pprev = NULL;
}

/* Drops r's Python future, and r from the list (GIL). */
static void request_clear_future(request *r) {
  awaiting_unlink(r);
  Py_CLEAR(r->pyfuture);
}

/* fut.cancel(), its result and any error dropped (GIL). */
static void cancel_quietly(aiob_py_bridge *b, PyObject *fut) {
  PyObject *c = PyObject_CallMethodObjArgs(fut, b->s_cancel, NULL);
  Py_XDECREF(c);
  PyErr_Clear();
}

/* The bridge goes (GIL): the requests still running leave its list. */
void aiob__py_request_forget_all(aiob_py_bridge *b) {
  while (b->awaiting)
    awaiting_unlink(b->awaiting);
}

/* Cancels the Python awaitables running on port p's loop for C tasks of a
 * runtime that was shut down (after a shutdown that timed out: an
 * abandoned loop thread may never drop those tasks, which would leave them
 * running). The C side sees AIOB_ECANCELED if it ever polls again. On p's
 * loop thread, GIL. */
void aiob__py_request_cancel_shut(aiob_py_bridge *b, port *p) {
  size_t n = 0, k = 0;
  for (request *r = b->awaiting; r; r = r->pnext)
    n += r->locals->port == p && atomic_load(&r->rt->shut) != 0;
  PyObject **futs = n ? malloc(n * sizeof *futs) : NULL;
  if (!futs)
    return;
  for (request *r = b->awaiting; r && k < n; r = r->pnext) {
    if (r->locals->port == p && atomic_load(&r->rt->shut)) {
      Py_INCREF(r->pyfuture);
      futs[k++] = r->pyfuture;
    }
  }
  for (size_t i = 0; i < k; i++) {
    cancel_quietly(b, futs[i]);
    Py_DECREF(futs[i]);
  }
  free(futs);
}

/* Waiter: the Python-side done callback of an awaited future. */
typedef struct waiter {
  PyObject_HEAD aiob_py_bridge *b;
  request *req;
} waiter;

/* Completes pr with the exception exc (owned; NULL: out of memory). */
static void promise_raise(aiob_promise *pr, PyObject *exc) {
  py_error *e = exc ? calloc(1, sizeof *e) : NULL;
  if (!e) {
    Py_XDECREF(exc);
    aiob_promise_complete(pr, AIOB_ENOMEM, NULL, NULL);
    return;
  }
  e->exc = exc;
  aiob_promise_complete(pr, AIOB_PY_EXCEPTION, e, aiob__py_error_free);
}

/* Completes the request's promise with the current Python exception. */
static void fail_request_with_current(request *r) {
  aiob_promise *pr = r->promise;
  r->promise = NULL;
  promise_raise(pr, aiob__py_take_exception());
}

static void release_cb(void *obj) { aiob_py_release(obj); }

/* Completes pr with the result `res` (owned), through the converter if the
 * request has one. */
static void deliver_result(request *r, aiob_promise *pr, PyObject *res) {
  if (r->conv) {
    aiob_output o = {0};
    int rc = r->conv(res, &o);
    Py_DECREF(res);
    if (rc < 0) {
      aiob_output_clear(&o);
      promise_raise(pr, aiob__py_take_exception());
      return;
    }
    aiob_promise_complete(pr, 0, o.value, o.free_value);
    return;
  }
  aiob_promise_complete(pr, 0, res, release_cb);
}

/* Completes r's promise with an outcome: the result `res`, or the
 * exception `exc` (borrowed both; a CancelledError cancels), or a
 * cancellation if `cancelled`; with none of them, AIOB_EIO (a future whose
 * result could not be read). false if the C side was no longer waiting. */
static bool finish_outcome(aiob_py_bridge *b, request *r, PyObject *res,
                           PyObject *exc, bool cancelled) {
  aiob_promise *pr = r->promise;
  r->promise = NULL;
  if (!pr)
    return false;
  if (cancelled || (exc && PyObject_IsInstance(exc, b->cancelled_error) == 1)) {
    aiob_promise_complete(pr, AIOB_ECANCELED, NULL, NULL);
  } else if (exc) {
    Py_INCREF(exc);
    promise_raise(pr, exc);
  } else if (res) {
    Py_INCREF(res);
    deliver_result(r, pr, res);
  } else {
    aiob_promise_complete(pr, AIOB_EIO, NULL, NULL);
  }
  PyErr_Clear(); /* (from IsInstance) */
  return true;
}

struct outcome_call {
  aiob_py_bridge *b;
  request *r;
  PyObject *res, *exc;
  bool cancelled;
};

static int outcome_fn(void *arg) {
  struct outcome_call *c = arg;
  finish_outcome(c->b, c->r, c->res, c->exc, c->cancelled);
  return 0;
}

/* The Python side of r has its outcome (loop thread, GIL; the arguments as
 * for finish_outcome), in a callback of r's loop or, `in_step`, in the step
 * of a task of it: completes the C task's promise and runs the C task on.
 * A loop-local one runs at once, on this thread; for a runtime one, if r's
 * future is a task this loop made, the loop thread waits here for the C
 * task's next item, which it likely sends straight away. Drops the Python
 * side's reference to r. -1: SystemExit or KeyboardInterrupt is set. */
static int request_finished(aiob_py_bridge *b, request *r, PyObject *res,
                            PyObject *exc, bool cancelled, bool in_step) {
  port *p = r->locals->port;
  int outer = p->in_step, rc = 0;
  p->in_step = outer || in_step;
  if (r->rt->hosted && r->on_loop) {
    struct outcome_call c = {b, r, res, exc, cancelled};
    rc = aiob__py_port_run_local(p, r->rt, outcome_fn, &c);
    request_clear_future(r);
  } else {
    bool more = finish_outcome(b, r, res, exc, cancelled) && r->on_loop &&
                !atomic_load(&r->cancelled);
    request_clear_future(r);
    if (more)
      rc = aiob__py_port_spin(p, r->rt);
  }
  p->in_step = outer;
  aiob__py_request_unref(r);
  return rc;
}

static PyObject *waiter_call(PyObject *self, PyObject *args, PyObject *kw) {
  (void)kw;
  waiter *w = (waiter *)self;
  PyObject *fut;
  if (!PyArg_UnpackTuple(args, "waiter", 1, 1, &fut))
    return NULL;
  request *r = w->req;
  if (!r)
    Py_RETURN_NONE;
  w->req = NULL;
  aiob_py_bridge *b = w->b;
  PyObject *res = NULL, *exc = NULL;
  PyObject *c = PyObject_CallMethodObjArgs(fut, b->s_cancelled, NULL);
  bool cancelled = !c || c == Py_True;
  Py_XDECREF(c);
  if (!cancelled) {
    exc = PyObject_CallMethodObjArgs(fut, b->s_exception, NULL);
    if (!exc || exc == Py_None) {
      Py_CLEAR(exc);
      PyErr_Clear();
      res = PyObject_CallMethodObjArgs(fut, b->s_result, NULL);
    }
  }
  PyErr_Clear();
  int rc = request_finished(b, r, res, exc, cancelled, false);
  Py_XDECREF(res);
  Py_XDECREF(exc);
  if (rc < 0)
    return NULL;
  Py_RETURN_NONE;
}

static void waiter_dealloc(PyObject *self) {
  waiter *w = (waiter *)self;
  PyTypeObject *tp = Py_TYPE(self);
  if (w->req) {
    request_clear_future(w->req);
    aiob__py_request_unref(w->req);
  }
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyType_Slot waiter_slots[] = {
    {Py_tp_new, aiob__py_no_new},
    {Py_tp_dealloc, waiter_dealloc},
    {Py_tp_call, waiter_call},
    {0, NULL},
};

PyType_Spec aiob__py_waiter_spec = {
    .name = "aiobridge._Waiter",
    .basicsize = sizeof(waiter),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = waiter_slots,
};

/* ---- Runner: the coroutine side of an awaited coroutine ----------------
 *
 * What the loop's Task runs for a coroutine a C task awaits: it steps the
 * coroutine as the Task would step it directly (send, throw, close), and
 * completes the C task's promise inside the very step in which the
 * coroutine finishes. A done callback on the Task would take one more loop
 * iteration; here the C task is woken, and the loop thread waits for its
 * next item (aiob__py_port_spin), before the step returns. The Task's own
 * outcome stays what the coroutine's was. */
typedef struct runner {
  PyObject_HEAD aiob_py_bridge *b;
  request *req;   /* the Python side's reference, until it finishes */
  PyObject *coro; /* an exact coroutine */
} runner;

/* Was the Task cancelled during the step that is ending (asyncio then
 * cancels it although its coroutine returned)? */
static bool must_cancel(PyObject *task) {
  PyObject *m = task ? PyObject_GetAttrString(task, "_must_cancel") : NULL;
  bool yes = m == Py_True;
  Py_XDECREF(m);
  PyErr_Clear();
  return yes;
}

/* Done callback of a Task whose coroutine failed: retrieves the exception,
 * as the waiter did, so that the Task does not log it when collected. */
static PyObject *retrieve(PyObject *self, PyObject *task) {
  (void)self;
  PyObject *c = PyObject_CallMethod(task, "cancelled", NULL);
  PyObject *e =
      c == Py_False ? PyObject_CallMethod(task, "exception", NULL) : NULL;
  Py_XDECREF(c);
  Py_XDECREF(e);
  PyErr_Clear();
  Py_RETURN_NONE;
}

/* Raises its argument: SystemExit or KeyboardInterrupt that came out of
 * what a runner ran after its coroutine finished leaves the loop from a
 * handle of its own, whatever the Task's outcome. */
static PyObject *reraise(PyObject *self, PyObject *exc) {
  (void)self;
  PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
  return NULL;
}

PyMethodDef aiob__py_retrieve_def = {"_retrieve", retrieve, METH_O, NULL};
PyMethodDef aiob__py_reraise_def = {"_reraise", reraise, METH_O, NULL};

/* The coroutine finished (loop thread, GIL, inside the Task's step): with
 * the result `res`, or with the exception `exc` (borrowed both). Runs the C
 * task on, as the waiter does. -1 only if SystemExit or KeyboardInterrupt
 * came out of what ran meanwhile and could not be given a handle of its
 * own (it is set then: the Task takes it). */
static int runner_finish(runner *rn, PyObject *res, PyObject *exc) {
  request *r = rn->req;
  rn->req = NULL;
  if (!r)
    return 0;
  aiob_py_bridge *b = rn->b;
  PyObject *task = r->pyfuture, *loop = r->locals->loop;
  Py_XINCREF(task);
  Py_INCREF(loop);
  bool cancelled = !exc && must_cancel(task);
  int rc = request_finished(b, r, res, exc, cancelled, true);
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (task && exc && PyObject_IsInstance(exc, b->cancelled_error) == 0) {
    PyObject *ok = PyObject_CallMethodObjArgs(task, b->s_add_done_callback,
                                              b->retrieve, NULL);
    Py_XDECREF(ok);
  }
  PyErr_Clear();
  if (rc < 0 && value) {
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb)
      PyException_SetTraceback(value, tb);
    PyObject *h = PyObject_CallMethodObjArgs(loop, b->s_call_soon, b->reraise,
                                             value, NULL);
    if (h) {
      rc = 0;
      Py_CLEAR(type);
      Py_CLEAR(value);
      Py_CLEAR(tb);
    }
    Py_XDECREF(h);
    PyErr_Clear();
  }
  PyErr_Restore(type, value, tb);
  Py_XDECREF(task);
  Py_DECREF(loop);
  return rc;
}

/* A step of the coroutine failed, or (before 3.10) returned: StopIteration
 * or another exception is set. Either finishes the request; the exception
 * is then raised again for the Task. */
static PyObject *runner_failed(runner *rn) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (!value) {
    PyErr_SetString(PyExc_SystemError, "aiobridge: a step failed silently");
    return NULL;
  }
  if (tb)
    PyException_SetTraceback(value, tb);
  int rc;
  if (PyErr_GivenExceptionMatches(value, PyExc_StopIteration)) {
    PyObject *res = PyObject_GetAttrString(value, "value");
    rc = res ? runner_finish(rn, res, NULL) : -1;
    Py_XDECREF(res);
  } else {
    rc = runner_finish(rn, NULL, value);
  }
  if (rc < 0) {
    /* What ran meanwhile raised (an interrupt): the Task takes that; the
     * C task has the coroutine's outcome. */
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return NULL;
  }
  PyErr_Restore(type, value, tb);
  return NULL;
}

#if PY_VERSION_HEX >= 0x030A0000
/* The Task steps the coroutine through this (PyIter_Send). */
static PySendResult runner_am_send(PyObject *self, PyObject *arg,
                                   PyObject **result) {
  runner *rn = (runner *)self;
  PyObject *out = NULL;
  PySendResult sr = PyIter_Send(rn->coro, arg, &out);
  if (sr == PYGEN_RETURN && runner_finish(rn, out, NULL) < 0) {
    Py_DECREF(out);
    out = NULL;
    sr = PYGEN_ERROR;
  } else if (sr == PYGEN_ERROR) {
    runner_failed(rn);
  }
  *result = out;
  return sr;
}
#endif

static PyObject *runner_send(PyObject *self, PyObject *arg) {
#if PY_VERSION_HEX >= 0x030A0000
  PyObject *out;
  PySendResult sr = runner_am_send(self, arg, &out);
  if (sr != PYGEN_RETURN)
    return out;
  /* The return value, as the StopIteration that ends a send. */
  PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, out);
  Py_DECREF(out);
  if (e) {
    PyErr_SetObject(PyExc_StopIteration, e);
    Py_DECREF(e);
  }
  return NULL;
#else
  runner *rn = (runner *)self;
  PyObject *out = _PyGen_Send((PyGenObject *)rn->coro, arg);
  return out ? out : runner_failed(rn);
#endif
}

static PyObject *runner_iternext(PyObject *self) {
  return runner_send(self, Py_None);
}

static PyObject *runner_throw(PyObject *self, PyObject *args) {
  runner *rn = (runner *)self;
  PyObject *throw = PyObject_GetAttrString(rn->coro, "throw");
  PyObject *out = throw ? PyObject_Call(throw, args, NULL) : NULL;
  Py_XDECREF(throw);
  return out ? out : runner_failed(rn);
}

static PyObject *runner_close(PyObject *self, PyObject *unused) {
  (void)unused;
  runner *rn = (runner *)self;
  return PyObject_CallMethod(rn->coro, "close", NULL);
}

/* The coroutine's other attributes (__qualname__, cr_frame, cr_code...):
 * the Task's repr and its get_stack() show the coroutine. */
static PyObject *runner_getattro(PyObject *self, PyObject *name) {
  PyObject *v = PyObject_GenericGetAttr(self, name);
  if (v || !PyErr_ExceptionMatches(PyExc_AttributeError))
    return v;
  PyErr_Clear();
  return PyObject_GetAttr(((runner *)self)->coro, name);
}

static PyObject *runner_await(PyObject *self) {
  Py_INCREF(self);
  return self;
}

static void runner_dealloc(PyObject *self) {
  runner *rn = (runner *)self;
  PyTypeObject *tp = Py_TYPE(self);
  if (rn->req) { /* its Task was dropped unfinished */
    request_clear_future(rn->req);
    aiob__py_request_unref(rn->req);
  }
  Py_XDECREF(rn->coro);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyMethodDef runner_methods[] = {
    {"send", runner_send, METH_O, NULL},
    {"throw", runner_throw, METH_VARARGS, NULL},
    {"close", runner_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot runner_slots[] = {
    {Py_tp_new, aiob__py_no_new},      {Py_tp_dealloc, runner_dealloc},
    {Py_tp_iter, PyObject_SelfIter},   {Py_tp_iternext, runner_iternext},
    {Py_tp_getattro, runner_getattro}, {Py_am_await, runner_await},
#if PY_VERSION_HEX >= 0x030A0000
    {Py_am_send, runner_am_send},
#endif
    {Py_tp_methods, runner_methods},   {0, NULL},
};

/* (A coroutine to asyncio: it has send, throw, close and __await__.) */
PyType_Spec aiob__py_runner_spec = {
    .name = "aiobridge._AwaitedByC",
    .basicsize = sizeof(runner),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = runner_slots,
};

/* After ensure_future refused `aw` with TypeError: says what was given
 * (asyncio's wording names no type) unless `aw` is awaitable after all and
 * the TypeError came from elsewhere. */
static void say_not_awaitable(PyObject *aw) {
  if (!PyErr_ExceptionMatches(PyExc_TypeError) || PyGen_Check(aw))
    return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  int has = PyObject_HasAttrString(aw, "__await__");
  if (has) {
    PyErr_Restore(type, value, tb);
    return;
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  PyErr_Format(PyExc_TypeError,
               "aiobridge: a C task cannot await an object of type '%.200s': "
               "it needs a coroutine, a Future, a Task or an object with "
               "__await__",
               Py_TYPE(aw)->tp_name);
}

/* Starts an awaited Python awaitable on this loop (loop thread, GIL).
 * Consumes the Python side's reference to r. -1: SystemExit or
 * KeyboardInterrupt is set, to leave the loop. */
int aiob__py_request_start(aiob_py_bridge *b, request *r) {
  if (atomic_load(&r->cancelled)) {
    aiob__py_request_unref(r);
    return 0;
  }
  b->py_awaits++;
  /* The C side cannot release `object` or the context before `cancelled`
   * is set, and we hold the GIL from the check to these references. */
  PyObject *obj = r->object, *ctx = aiob__py_locals_context(r->locals);
  if (!ctx) {
    fail_request_with_current(r);
    aiob__py_request_unref(r);
    return 0;
  }
  Py_XINCREF(obj);
  Py_INCREF(ctx);
  PyObject *aw = obj, *fut = NULL;
  runner *rn = NULL;
  int on_loop = 0;
  if (PyContext_Enter(ctx) == 0) {
    if (r->fn) {
      aw = r->fn(r->fn_arg);
    } else if (r->is_factory) {
      aw = PyObject_CallObject(obj, NULL);
      Py_DECREF(obj);
    }
    if (r->fn && aw == Py_None) { /* nothing to await: the result is None */
      PyContext_Exit(ctx);
      Py_DECREF(ctx);
      aiob_promise *pr = r->promise;
      r->promise = NULL;
      deliver_result(r, pr, aw);
      aiob__py_request_unref(r);
      return 0;
    }
    if (aw && PyCoro_CheckExact(aw)) {
      /* What ensure_future does with a coroutine, without its Python
       * layers (this loop runs: it is the port's), through a runner. */
      rn = PyObject_New(runner, b->runner_type);
      if (rn) {
        rn->b = b;
        rn->req = r; /* the Python side's reference */
        r->on_loop = 1;
        rn->coro = aw;
        Py_INCREF(aw);
        fut = PyObject_CallMethod(r->locals->loop, "create_task", "O", rn);
        if (!fut && rn->req) /* not started: r stays ours */
          rn->req = NULL;
        else if (!fut) /* it ran and finished (an eager task factory),
                          then raised what ran meanwhile: r is gone */
          r = NULL;
      }
      if (!fut && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *c = PyObject_CallMethod(aw, "close", NULL);
        Py_XDECREF(c);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
      }
    } else if (aw && !(fut = PyObject_CallFunctionObjArgs(b->ensure_future, aw,
                                                          NULL))) {
      say_not_awaitable(aw);
    } else if (!aw && !PyErr_Occurred())
      PyErr_SetString(PyExc_SystemError,
                      "aiobridge: the awaitable function returned NULL "
                      "without setting an exception");
    /* Not a future passed in (which may be another loop's): a task of
     * this loop. */
    on_loop = fut && fut != aw;
    PyContext_Exit(ctx);
  }
  Py_XDECREF(aw);
  Py_DECREF(ctx);
  if (rn && !r) {
    Py_DECREF(rn);
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
      return -1;
    PyErr_Clear();
    return 0;
  }
  if (rn && fut) {
    if (rn->req) { /* running: its first step is to come */
      r->pyfuture = fut;
      awaiting_link(b, r);
      if (atomic_load(&r->cancelled))
        cancel_quietly(b, fut);
    } else { /* done already (an eager task factory): r is gone */
      PyObject *e = PyObject_CallMethodObjArgs(fut, b->s_exception, NULL);
      Py_XDECREF(e); /* (retrieved: not logged when collected) */
      Py_DECREF(fut);
    }
    Py_DECREF(rn);
    PyErr_Clear();
    return 0;
  }
  Py_XDECREF(rn);
  if (!fut) {
    /* SystemExit and KeyboardInterrupt leave the loop, as from any
     * callback (and as asyncio's Task does, the awaiting side gets them
     * too); other exceptions only go to the C task. */
    int leave = PyErr_ExceptionMatches(PyExc_SystemExit) ||
                PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
    PyObject *exc = aiob__py_take_exception();
    if (leave)
      Py_INCREF(exc); /* one for the C task, one to raise */
    aiob_promise *pr = r->promise;
    r->promise = NULL;
    promise_raise(pr, exc);
    aiob__py_request_unref(r);
    if (!leave)
      return 0;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return -1;
  }
  waiter *w = PyObject_New(waiter, b->waiter_type);
  if (!w) {
    Py_DECREF(fut);
    fail_request_with_current(r);
    aiob__py_request_unref(r);
    return 0;
  }
  w->b = b;
  w->req = r; /* the Python side's reference */
  r->pyfuture = fut;
  r->on_loop = on_loop;
  awaiting_link(b, r);
  PyObject *ok =
      PyObject_CallMethodObjArgs(fut, b->s_add_done_callback, w, NULL);
  Py_DECREF(w);
  if (!ok)
    PyErr_Clear();
  Py_XDECREF(ok);
  if (atomic_load(&r->cancelled) && r->pyfuture)
    cancel_quietly(b, r->pyfuture);
  return 0;
}

void aiob__py_request_cancel(aiob_py_bridge *b, request *r) {
  if (r->pyfuture)
    cancel_quietly(b, r->pyfuture);
  aiob__py_request_unref(r); /* the cancel item's reference */
}

/* ---- The leaf future --------------------------------------------------- */

enum { AW_INIT, AW_SENT, AW_DONE };

void aiob_py_await_init(aiob_py_await *aw, PyObject *awaitable) {
  memset(aw, 0, sizeof *aw);
  aw->leaf.next = aw->leaf.prev = &aw->leaf;
  aw->object = awaitable;
}

void aiob_py_await_init_call(aiob_py_await *aw, PyObject *factory) {
  aiob_py_await_init(aw, factory);
  aw->is_factory = 1;
}

void aiob_py_await_init_fn(aiob_py_await *aw, aiob_py_awaitable_fn fn,
                           void *arg) {
  aiob_py_await_init(aw, NULL);
  aw->fn = fn;
  aw->fn_arg = arg;
}

void aiob_py_await_set_locals(aiob_py_await *aw, aiob_py_locals *locals) {
  aw->locals = locals;
}

void aiob_py_await_set_converter(aiob_py_await *aw,
                                 aiob_py_result_converter conv) {
  aw->conv = conv;
}

static void await_detach(struct aiob__leaf *leaf) {
  aiob_py_await *aw = AIOB__CONTAINER_OF(leaf, aiob_py_await, leaf);
  request *r = aw->request;
  aw->request = NULL;
  if (aw->promise) {
    aiob_promise_release(aw->promise);
    aw->promise = NULL;
  }
  aw->state = AW_DONE;
  if (!r)
    return;
  atomic_store(&r->cancelled, 1);
  atomic_fetch_add(&r->refs, 1); /* for the cancel item */
  if (!aiob__py_port_push(r->locals->port, &r->cancel_it))
    aiob__py_request_unref(r);
  aiob__py_request_unref(r); /* the leaf's reference */
}

static aiob_poll await_ready(aiob_output *out, int status) {
  if (out)
    *out = (aiob_output){.status = status};
  return AIOB_READY;
}

/* Sends the request to the task's asyncio loop (first poll). */
static int await_send(aiob_task *self, aiob_py_await *aw) {
  aiob_local_key key;
  if (aiob__py_locals_key_get(&key) < 0)
    return AIOB_EINVAL;
  py_locals *l = aw->locals ? aw->locals : aiob_task_local_get(self, key);
  if (!l)
    return AIOB_EINVAL; /* no locals given, and not a task of the bridge */
  request *r = calloc(1, sizeof *r);
  if (!r)
    return AIOB_ENOMEM;
  if (aiob_promise_new(&aw->promise) < 0) {
    free(r);
    return AIOB_ENOMEM;
  }
  atomic_init(&r->refs, 2); /* the leaf + the Python side */
  r->it.kind = ITEM_REQUEST;
  r->cancel_it.kind = ITEM_CANCEL;
  r->object = aw->object;
  r->is_factory = aw->is_factory;
  r->fn = aw->fn;
  r->fn_arg = aw->fn_arg;
  r->conv = aw->conv;
  r->promise = aw->promise; /* completer side */
  r->locals = aiob__py_locals_clone(l);
  r->rt = aiob_task_runtime(self);
  aiob__runtime_ref(r->rt);
  if (!aiob__py_port_push(l->port, &r->it)) {
    aiob__py_request_unref(r); /* the Python side's: never delivered */
    aiob__py_request_unref(r); /* abandons the promise */
    aiob_promise_release(aw->promise);
    aw->promise = NULL;
    return AIOB_ECANCELED; /* the asyncio loop is gone */
  }
  aw->request = r;
  aw->leaf.detach = await_detach;
  aiob__leaf_link(self, &aw->leaf);
  aw->state = AW_SENT;
  return 0;
}

aiob_poll aiob_py_await_poll(aiob_task *self, aiob_py_await *aw,
                             aiob_output *out) {
  if (aw->state == AW_DONE)
    return await_ready(out, AIOB_EALREADY);
  if (aw->state == AW_INIT) {
    int rc = await_send(self, aw);
    if (rc < 0) {
      aw->state = AW_DONE;
      return await_ready(out, rc);
    }
  }
  aiob_output o;
  if (aiob_promise_poll(self, aw->promise, &o) == AIOB_PENDING)
    return AIOB_PENDING;
  aiob__leaf_unlink(&aw->leaf);
  request *r = aw->request;
  aw->request = NULL;
  aiob_promise_release(aw->promise);
  aw->promise = NULL;
  aw->state = AW_DONE;
  aiob__py_request_unref(r);
  if (out)
    *out = o;
  else
    aiob_output_clear(&o);
  return AIOB_READY;
}
