/* The asyncio bridge.
 *
 * Runtime threads never take the GIL. Everything that crosses to Python is
 * an item pushed into the inbox (core/internal.h) of the target asyncio
 * loop's *port*; the pusher writes the port's eventfd only when the inbox
 * goes from idle to signalled, and the loop (watching the eventfd with
 * add_reader) drains it in bounded chunks on its own thread, where it holds
 * the GIL.
 *
 * Items: a finished C task (its Pending object), a request to await a Python
 * awaitable for a C task, and a request to cancel such an await.
 *
 * Lifetimes: a port is a refcounted C struct (Pending objects, task locals
 * and the Python-side Port object hold references). Python references held
 * for C code are released only with the GIL: at once where it is held, else
 * through the orphan list drained by the next port drain. */
#include "aiobridge/python.h"

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define DRAIN_CHUNK 4096

enum { ITEM_COMPLETION, ITEM_REQUEST, ITEM_CANCEL };

typedef struct item {
  aiob__mpsc_node node;
  int kind;
} item;

/* ---- Deferred releases ------------------------------------------------- */

static pthread_mutex_t orphan_mu = PTHREAD_MUTEX_INITIALIZER;
static PyObject **orphans;
static size_t norphans, corphans;

void aiob_py_release(PyObject *obj) {
  if (!obj)
    return;
  if (PyGILState_Check()) {
    Py_DECREF(obj);
    return;
  }
  pthread_mutex_lock(&orphan_mu);
  if (norphans == corphans) {
    size_t n = corphans ? corphans * 2 : 64;
    PyObject **o = realloc(orphans, n * sizeof *o);
    if (o) {
      orphans = o;
      corphans = n;
    }
  }
  if (norphans < corphans)
    orphans[norphans++] = obj; /* else leaked: better than a crash */
  pthread_mutex_unlock(&orphan_mu);
}

static void release_orphans(void) {
  for (;;) {
    pthread_mutex_lock(&orphan_mu);
    if (norphans == 0) {
      pthread_mutex_unlock(&orphan_mu);
      return;
    }
    PyObject *obj = orphans[--norphans];
    pthread_mutex_unlock(&orphan_mu);
    Py_DECREF(obj);
  }
}

static void release_cb(void *obj) { aiob_py_release(obj); }

/* ---- Errors carried in task outputs ------------------------------------ */

typedef struct py_error {
  PyObject *type; /* borrowed, static or module-held (aiob_py_task_raise) */
  char *msg;
  PyObject *exc; /* owned exception instance (from Python), or NULL */
} py_error;

static void py_error_free(void *p) {
  py_error *e = p;
  aiob_py_release(e->exc);
  free(e->msg);
  free(e);
}

int aiob_py_task_raise(aiob_task *self, PyObject *exc_type, const char *msg) {
  py_error *e = calloc(1, sizeof *e);
  if (!e || !(e->msg = strdup(msg ? msg : ""))) {
    free(e);
    return AIOB_ENOMEM;
  }
  e->type = exc_type;
  aiob_task_fail(self, AIOB_PY_EXCEPTION);
  aiob_task_return(self, e, py_error_free);
  return 0;
}

/* A new exception object for a failed output (GIL). */
static PyObject *exception_for(aiob_output *out) {
  if (out->status == AIOB_PY_EXCEPTION && out->value) {
    py_error *e = out->value;
    if (e->exc) {
      Py_INCREF(e->exc);
      return e->exc;
    }
    return PyObject_CallFunction(e->type, "s", e->msg);
  }
  if (out->status == AIOB_PY_EXCEPTION)
    return PyObject_CallFunction(PyExc_RuntimeError, "s", "unknown error");
  /* OSError(errno, msg) returns the subclass Python uses for that errno. */
  int err = -out->status;
  return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* ---- Ports ------------------------------------------------------------- */

typedef struct port {
  _Atomic uint32_t refs;
  aiob__inbox in; /* items for the loop; closed when the loop goes away */
  int efd;        /* the wake: watched with loop.add_reader */
} port;

static port *port_new(void) {
  port *p = calloc(1, sizeof *p);
  if (!p)
    return NULL;
  p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (p->efd < 0) {
    free(p);
    return NULL;
  }
  atomic_init(&p->refs, 1);
  aiob__inbox_init(&p->in);
  return p;
}

static void port_ref(port *p) { atomic_fetch_add(&p->refs, 1); }

static void port_unref(port *p) {
  if (atomic_fetch_sub(&p->refs, 1) != 1)
    return;
  close(p->efd);
  free(p);
}

static void port_signal(void *arg) {
  port *p = arg;
  uint64_t one = 1;
  ssize_t n = write(p->efd, &one, sizeof one);
  (void)n; /* EAGAIN: the counter is already non-zero */
}

/* Thread-safe, no GIL. Returns false once the port is closed (the Python
 * loop is gone); the caller then keeps ownership of the item. */
static bool port_push(port *p, item *it) {
  return aiob__inbox_push(&p->in, &it->node, port_signal, p);
}

/* ---- Module-level bridge ----------------------------------------------- */

struct aiob_py_bridge {
  PyObject *ports;          /* dict: loop -> Port */
  PyObject *shutdown_error; /* aiobridge.ShutdownError */
  PyObject *backend_error;  /* aiobridge.BackendError */
  PyObject *reg;            /* capsule of a bridge_reg (hub, atexit) */
  int exited;               /* the atexit hook stopped the runtime */
  /* Counters (loop threads, GIL held). */
  unsigned long long completions, py_wakes, py_awaits;
  PyObject *get_running_loop; /* asyncio.events._get_running_loop */
  PyObject *ensure_future;    /* asyncio.ensure_future */
  PyTypeObject *pending_type, *lazy_type, *port_type, *waiter_type;
  PyObject *s_create_future, *s_add_done_callback, *s_done, *s_cancel,
      *s_cancelled, *s_set_result, *s_set_exception, *s_add_reader,
      *s_remove_reader, *s_is_closed, *s_call_soon, *s_result, *s_exception;
};

/* The runtime, started if needed (GIL), or NULL with aiobridge.ShutdownError
 * (after the interpreter-exit hook) or aiobridge.BackendError set. */
static aiob_runtime *bridge_runtime(aiob_py_bridge *b) {
  if (b->exited) {
    PyErr_SetString(b->shutdown_error,
                    "aiobridge: the runtime was stopped at interpreter exit");
    return NULL;
  }
  aiob_runtime *rt = NULL;
  int rc = aiob_runtime_default(&rt);
  if (rc < 0) {
    /* An OSError subclass: errno and a message naming the knob in use. */
    const char *env = getenv("AIOBRIDGE_BACKEND");
    PyObject *e = Py_BuildValue(
        "(iN)", -rc,
        env && env[0]
            ? PyUnicode_FromFormat("aiobridge: cannot start the runtime "
                                   "(AIOBRIDGE_BACKEND=%s): %s",
                                   env, aiob_strerror(rc))
            : PyUnicode_FromFormat("aiobridge: cannot start the runtime: %s",
                                   aiob_strerror(rc)));
    if (e)
      PyErr_SetObject(b->backend_error, e);
    Py_XDECREF(e);
    return NULL;
  }
  return rt;
}

/* ---- Task locals: (asyncio loop, contextvars context) ------------------ */

/* Immutable after creation; refcounted from any thread. */
struct aiob_py_locals {
  _Atomic uint32_t refs;
  port *port;        /* the loop's queue (referenced) */
  PyObject *loop;    /* owned */
  PyObject *context; /* owned */
};
typedef aiob_py_locals py_locals;

static void *locals_clone(void *v) {
  py_locals *l = v;
  atomic_fetch_add(&l->refs, 1);
  return l;
}

static void locals_destroy(void *v) {
  py_locals *l = v;
  if (atomic_fetch_sub(&l->refs, 1) != 1)
    return;
  aiob_py_release(l->context);
  aiob_py_release(l->loop);
  port_unref(l->port);
  free(l);
}

aiob_py_locals *aiob_py_locals_clone(aiob_py_locals *l) {
  return l ? locals_clone(l) : NULL;
}

void aiob_py_locals_release(aiob_py_locals *l) {
  if (l)
    locals_destroy(l);
}

PyObject *aiob_py_locals_loop(aiob_py_locals *l) { return l->loop; }

PyObject *aiob_py_locals_context(aiob_py_locals *l) { return l->context; }

/* ---- Pending: one C task awaited through an asyncio future -------------- */

typedef struct pending {
  PyObject_HEAD item it;
  aiob_py_bridge *b;
  aiob_task *task;
  port *port;
  PyObject *fut_ref; /* weakref to the future */
  aiob_py_converter conv;
} pending;

static void pending_dealloc(PyObject *self) {
  pending *p = (pending *)self;
  PyTypeObject *tp = Py_TYPE(self);
  Py_CLEAR(p->fut_ref);
  if (p->task) {
    if (!aiob_task_is_finished(p->task))
      aiob_task_cancel(p->task);
    aiob_task_release(p->task);
  }
  if (p->port)
    port_unref(p->port);
  tp->tp_free(self);
  Py_DECREF(tp);
}

/* Done callback of the future (arg: the future) and weakref callback (arg:
 * the dead weakref): either way a future that did not get a result cancels
 * the C task. */
static PyObject *pending_call(PyObject *self, PyObject *args, PyObject *kw) {
  (void)kw;
  pending *p = (pending *)self;
  PyObject *arg;
  if (!PyArg_UnpackTuple(args, "pending", 1, 1, &arg))
    return NULL;
  if (!p->task || aiob_task_is_finished(p->task))
    Py_RETURN_NONE;
  if (PyWeakref_CheckRef(arg)) {
    aiob_task_cancel(p->task);
    Py_RETURN_NONE;
  }
  PyObject *c = PyObject_CallMethodObjArgs(arg, p->b->s_cancelled, NULL);
  if (!c)
    return NULL;
  if (c == Py_True)
    aiob_task_cancel(p->task);
  Py_DECREF(c);
  Py_RETURN_NONE;
}

static PyType_Slot pending_slots[] = {
    {Py_tp_dealloc, pending_dealloc},
    {Py_tp_call, pending_call},
    {0, NULL},
};

static PyType_Spec pending_spec = {
    .name = "aiobridge._Pending",
    .basicsize = sizeof(pending),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = pending_slots,
};

/* on_finish of a C task started by the bridge: runtime thread, no GIL. */
static void pending_finished(void *arg, aiob_task *task) {
  (void)task;
  pending *p = arg;
  if (!port_push(p->port, &p->it)) {
    /* The loop is gone: nobody awaits; the in-flight reference is released
     * by whoever holds the GIL next. */
    aiob_py_release((PyObject *)p);
  }
}

/* A new reference to the weakref's referent, or NULL if it is gone. */
static PyObject *weakref_get(PyObject *ref) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject *obj = NULL;
  if (PyWeakref_GetRef(ref, &obj) < 0)
    return NULL;
  return obj;
#else
  PyObject *obj = PyWeakref_GetObject(ref); /* borrowed */
  if (!obj || obj == Py_None)
    return NULL;
  Py_INCREF(obj);
  return obj;
#endif
}

/* Resolves the future of a finished task (loop thread, GIL). */
static void complete_pending(aiob_py_bridge *b, pending *p) {
  aiob_output out = {0};
  b->completions++;
  aiob_task_take_output(p->task, &out);
  PyObject *fut = weakref_get(p->fut_ref);
  if (!fut) {
    PyErr_Clear();
    aiob_output_clear(&out);
    return;
  }
  PyObject *r = PyObject_CallMethodObjArgs(fut, b->s_done, NULL);
  if (!r || r == Py_True) { /* cancelled by Python: discard silently */
    Py_XDECREF(r);
    PyErr_Clear();
    aiob_output_clear(&out);
    Py_DECREF(fut);
    return;
  }
  Py_DECREF(r);
  if (out.status >= 0) {
    PyObject *v;
    if (p->conv) {
      v = p->conv(&out); /* owns out.value */
      out.value = NULL;
    } else {
      aiob_output_clear(&out);
      v = Py_None;
      Py_INCREF(v);
    }
    if (v) {
      r = PyObject_CallMethodObjArgs(fut, b->s_set_result, v, NULL);
      Py_DECREF(v);
    } else {
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyErr_NormalizeException(&type, &value, &tb);
      r = PyObject_CallMethodObjArgs(fut, b->s_set_exception,
                                     value ? value : Py_None, NULL);
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
    }
  } else if (out.status == AIOB_ECANCELED) {
    r = PyObject_CallMethodObjArgs(fut, b->s_cancel, NULL);
  } else {
    PyObject *exc = exception_for(&out);
    r = exc ? PyObject_CallMethodObjArgs(fut, b->s_set_exception, exc, NULL)
            : NULL;
    Py_XDECREF(exc);
  }
  aiob_output_clear(&out);
  Py_XDECREF(r);
  PyErr_Clear();
  Py_DECREF(fut);
}

/* ---- Awaiting Python from C: requests ---------------------------------- */

typedef struct request {
  item it;
  item cancel_it;
  _Atomic uint32_t refs; /* the C leaf + the Python side */
  _Atomic int cancelled;
  aiob_promise *promise; /* completer side */
  PyObject *object;      /* borrowed from the C task's state */
  int is_factory;
  py_locals *locals; /* referenced */
  aiob_py_result_converter conv;
  PyObject *pyfuture; /* the running Python future (GIL) */
} request;

static void request_unref(request *r) {
  if (atomic_fetch_sub(&r->refs, 1) != 1)
    return;
  if (r->promise)
    aiob_promise_abandon(r->promise);
  locals_destroy(r->locals);
  free(r);
}

/* Waiter: the Python-side done callback of an awaited future. */
typedef struct waiter {
  PyObject_HEAD aiob_py_bridge *b;
  request *req;
} waiter;

static void fail_request_with_current(request *r);

static void finish_request(aiob_py_bridge *b, request *r, PyObject *fut) {
  aiob_promise *pr = r->promise;
  r->promise = NULL;
  if (!pr)
    return;
  PyObject *c = PyObject_CallMethodObjArgs(fut, b->s_cancelled, NULL);
  if (!c || c == Py_True) {
    PyErr_Clear();
    Py_XDECREF(c);
    aiob_promise_complete(pr, AIOB_ECANCELED, NULL, NULL);
    return;
  }
  Py_DECREF(c);
  PyObject *exc = PyObject_CallMethodObjArgs(fut, b->s_exception, NULL);
  if (exc && exc != Py_None) {
    py_error *e = calloc(1, sizeof *e);
    if (e) {
      e->exc = exc; /* owned */
      aiob_promise_complete(pr, AIOB_PY_EXCEPTION, e, py_error_free);
    } else {
      Py_DECREF(exc);
      aiob_promise_complete(pr, AIOB_ENOMEM, NULL, NULL);
    }
    return;
  }
  Py_XDECREF(exc);
  PyErr_Clear();
  PyObject *res = PyObject_CallMethodObjArgs(fut, b->s_result, NULL);
  if (!res) {
    PyErr_Clear();
    aiob_promise_complete(pr, AIOB_EIO, NULL, NULL);
    return;
  }
  if (r->conv) {
    aiob_output o = {0};
    int rc = r->conv(res, &o);
    Py_DECREF(res);
    if (rc < 0) {
      aiob_output_clear(&o);
      r->promise = pr;
      fail_request_with_current(r);
      return;
    }
    aiob_promise_complete(pr, 0, o.value, o.free_value);
    return;
  }
  aiob_promise_complete(pr, 0, res, release_cb);
}

static PyObject *waiter_call(PyObject *self, PyObject *args, PyObject *kw) {
  (void)kw;
  waiter *w = (waiter *)self;
  PyObject *fut;
  if (!PyArg_UnpackTuple(args, "waiter", 1, 1, &fut))
    return NULL;
  request *r = w->req;
  if (r) {
    w->req = NULL;
    finish_request(w->b, r, fut);
    Py_CLEAR(r->pyfuture);
    request_unref(r);
  }
  Py_RETURN_NONE;
}

static void waiter_dealloc(PyObject *self) {
  waiter *w = (waiter *)self;
  PyTypeObject *tp = Py_TYPE(self);
  if (w->req) {
    Py_CLEAR(w->req->pyfuture);
    request_unref(w->req);
  }
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyType_Slot waiter_slots[] = {
    {Py_tp_dealloc, waiter_dealloc},
    {Py_tp_call, waiter_call},
    {0, NULL},
};

static PyType_Spec waiter_spec = {
    .name = "aiobridge._Waiter",
    .basicsize = sizeof(waiter),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = waiter_slots,
};

/* Completes the promise with the current Python exception. */
static void fail_request_with_current(request *r) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb && value)
    PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  py_error *e = calloc(1, sizeof *e);
  aiob_promise *pr = r->promise;
  r->promise = NULL;
  if (!e) {
    Py_XDECREF(value);
    aiob_promise_complete(pr, AIOB_ENOMEM, NULL, NULL);
    return;
  }
  e->exc = value;
  aiob_promise_complete(pr, AIOB_PY_EXCEPTION, e, py_error_free);
}

/* Starts an awaited Python awaitable on this loop (loop thread, GIL).
 * Consumes the Python side's reference to r. */
static void start_request(aiob_py_bridge *b, request *r) {
  if (atomic_load(&r->cancelled)) {
    request_unref(r);
    return;
  }
  b->py_awaits++;
  /* The C side cannot release `object` or the context before `cancelled`
   * is set, and we hold the GIL from the check to these references. */
  PyObject *obj = r->object, *ctx = r->locals->context;
  Py_INCREF(obj);
  Py_INCREF(ctx);
  PyObject *aw = obj, *fut = NULL;
  if (PyContext_Enter(ctx) == 0) {
    if (r->is_factory) {
      aw = PyObject_CallObject(obj, NULL);
      Py_DECREF(obj);
    }
    if (aw)
      fut = PyObject_CallFunctionObjArgs(b->ensure_future, aw, NULL);
    PyContext_Exit(ctx);
  }
  Py_XDECREF(aw);
  Py_DECREF(ctx);
  if (!fut) {
    fail_request_with_current(r);
    request_unref(r);
    return;
  }
  waiter *w = PyObject_New(waiter, b->waiter_type);
  if (!w) {
    Py_DECREF(fut);
    fail_request_with_current(r);
    request_unref(r);
    return;
  }
  w->b = b;
  w->req = r; /* the Python side's reference */
  r->pyfuture = fut;
  PyObject *ok =
      PyObject_CallMethodObjArgs(fut, b->s_add_done_callback, w, NULL);
  Py_DECREF(w);
  if (!ok)
    PyErr_Clear();
  Py_XDECREF(ok);
  if (atomic_load(&r->cancelled) && r->pyfuture) {
    PyObject *c = PyObject_CallMethodObjArgs(r->pyfuture, b->s_cancel, NULL);
    Py_XDECREF(c);
    PyErr_Clear();
  }
}

static void cancel_request(aiob_py_bridge *b, request *r) {
  if (r->pyfuture) {
    PyObject *c = PyObject_CallMethodObjArgs(r->pyfuture, b->s_cancel, NULL);
    Py_XDECREF(c);
    PyErr_Clear();
  }
  request_unref(r); /* the cancel item's reference */
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
  if (!port_push(r->locals->port, &r->cancel_it))
    request_unref(r);
  request_unref(r); /* the leaf's reference */
}

static aiob_poll await_ready(aiob_output *out, int status) {
  if (out)
    *out = (aiob_output){.status = status};
  return AIOB_READY;
}

static aiob_local_key locals_key;
static pthread_once_t locals_once = PTHREAD_ONCE_INIT;
static int locals_key_rc;

static void locals_key_create(void) {
  locals_key_rc =
      aiob_local_key_create(&locals_key, locals_clone, locals_destroy);
}

static int locals_key_get(aiob_local_key *key) {
  pthread_once(&locals_once, locals_key_create);
  *key = locals_key;
  return locals_key_rc;
}

/* Sends the request to the task's asyncio loop (first poll). */
static int await_send(aiob_task *self, aiob_py_await *aw) {
  aiob_local_key key;
  if (locals_key_get(&key) < 0)
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
  r->conv = aw->conv;
  r->promise = aw->promise; /* completer side */
  r->locals = locals_clone(l);
  if (!port_push(l->port, &r->it)) {
    request_unref(r); /* the Python side's: never delivered */
    request_unref(r); /* abandons the promise */
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
  request_unref(r);
  if (out)
    *out = o;
  else
    aiob_output_clear(&o);
  return AIOB_READY;
}

/* ---- The Python side of a port ----------------------------------------- */

/* The ports dict maps a loop's weak reference to its pyport, so a loop that
 * is dropped without close() is not kept alive by the bridge. The loop's
 * selector holds the pyport (through the bound drain method) while the
 * eventfd is registered. */
typedef struct pyport {
  PyObject_HEAD aiob_py_bridge *b;
  port *port;
  PyObject *loop_ref; /* weak reference to the loop (the dict key) */
  int reader;         /* eventfd registered with add_reader */
} pyport;

/* Calls loop.<name>(args...) if the loop is alive; NULL with an exception
 * set otherwise. */
static PyObject *pyport_call(pyport *pp, PyObject *name, PyObject *arg1,
                             PyObject *arg2) {
  PyObject *loop = weakref_get(pp->loop_ref);
  if (!loop) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError, "aiobridge: the loop is gone");
    return NULL;
  }
  PyObject *r = PyObject_CallMethodObjArgs(loop, name, arg1, arg2, NULL);
  Py_DECREF(loop);
  return r;
}

static void dispatch(aiob_py_bridge *b, item *it) {
  switch (it->kind) {
  case ITEM_COMPLETION: {
    pending *p = AIOB__CONTAINER_OF(it, pending, it);
    complete_pending(b, p);
    Py_DECREF(p); /* the in-flight reference */
    break;
  }
  case ITEM_REQUEST:
    start_request(b, AIOB__CONTAINER_OF(it, request, it));
    break;
  case ITEM_CANCEL:
    cancel_request(b, AIOB__CONTAINER_OF(it, request, cancel_it));
    break;
  }
}

/* Drains up to DRAIN_CHUNK items; reschedules itself if more remain. */
static PyObject *pyport_drain(PyObject *self, PyObject *unused) {
  (void)unused;
  pyport *pp = (pyport *)self;
  port *p = pp->port;
  uint64_t v;
  if (read(p->efd, &v, sizeof v) > 0)
    pp->b->py_wakes++; /* not a re-scheduled drain */
  aiob__inbox_rearm(&p->in);
  Py_INCREF(self);
  int done = 0;
  aiob__mpsc_node *node;
  while (done < DRAIN_CHUNK && (node = aiob__mpsc_pop(&p->in.queue))) {
    dispatch(pp->b, AIOB__CONTAINER_OF(node, item, node));
    done++;
  }
  if (done == DRAIN_CHUNK && !aiob__inbox_closed(&p->in)) {
    PyObject *drain = PyObject_GetAttrString(self, "drain");
    PyObject *r =
        drain ? pyport_call(pp, pp->b->s_call_soon, drain, NULL) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(drain);
    PyErr_Clear();
  }
  release_orphans();
  Py_DECREF(self);
  Py_RETURN_NONE;
}

/* Closes the port: no more pushes; pending items are released (GIL). */
static void pyport_close(pyport *pp) {
  port *p = pp->port;
  if (!p || !aiob__inbox_close(&p->in))
    return;
  if (pp->reader) {
    PyObject *closed = pyport_call(pp, pp->b->s_is_closed, NULL, NULL);
    if (closed == Py_False) {
      PyObject *fd = PyLong_FromLong(p->efd);
      PyObject *r =
          fd ? pyport_call(pp, pp->b->s_remove_reader, fd, NULL) : NULL;
      Py_XDECREF(r);
      Py_XDECREF(fd);
    }
    Py_XDECREF(closed);
    PyErr_Clear();
    pp->reader = 0;
  }
  aiob__mpsc_node *node;
  while ((node = aiob__mpsc_pop(&p->in.queue))) {
    item *it = AIOB__CONTAINER_OF(node, item, node);
    if (it->kind == ITEM_COMPLETION) {
      pending *pd = AIOB__CONTAINER_OF(it, pending, it);
      Py_DECREF(pd);
    } else if (it->kind == ITEM_REQUEST) {
      request *r = AIOB__CONTAINER_OF(it, request, it);
      atomic_store(&r->cancelled, 1);
      request_unref(r);
    } else {
      request_unref(AIOB__CONTAINER_OF(it, request, cancel_it));
    }
  }
}

static void pyport_dealloc(PyObject *self) {
  pyport *pp = (pyport *)self;
  PyTypeObject *tp = Py_TYPE(self);
  pyport_close(pp);
  Py_CLEAR(pp->loop_ref);
  if (pp->port)
    port_unref(pp->port);
  tp->tp_free(self);
  Py_DECREF(tp);
}

/* Watches the eventfd (loop thread): immediately for a port created on its
 * loop's thread, else through call_soon_threadsafe. */
static PyObject *pyport_register(PyObject *self, PyObject *unused) {
  (void)unused;
  pyport *pp = (pyport *)self;
  if (pp->reader || aiob__inbox_closed(&pp->port->in))
    Py_RETURN_NONE;
  PyObject *drain = PyObject_GetAttrString(self, "drain");
  PyObject *fd = PyLong_FromLong(pp->port->efd);
  PyObject *r =
      drain && fd ? pyport_call(pp, pp->b->s_add_reader, fd, drain) : NULL;
  Py_XDECREF(fd);
  Py_XDECREF(drain);
  if (!r) {
    if (PyErr_ExceptionMatches(PyExc_NotImplementedError)) {
      PyErr_Clear();
      PyErr_SetString(PyExc_RuntimeError,
                      "aiobridge needs an event loop with add_reader()");
    }
    return NULL;
  }
  Py_DECREF(r);
  pp->reader = 1;
  Py_RETURN_NONE;
}

static PyMethodDef pyport_methods[] = {
    {"drain", pyport_drain, METH_NOARGS, "Drain the completion queue."},
    {"register", pyport_register, METH_NOARGS, "Watch the eventfd."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot pyport_slots[] = {
    {Py_tp_dealloc, pyport_dealloc},
    {Py_tp_methods, pyport_methods},
    {0, NULL},
};

static PyType_Spec pyport_spec = {
    .name = "aiobridge._Port",
    .basicsize = sizeof(pyport),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = pyport_slots,
};

/* Forgets ports of closed or collected loops (their futures can never be
 * resolved; their C tasks are cancelled when the futures are collected). */
static void prune_ports(aiob_py_bridge *b) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  PyObject *dead = NULL;
  while (PyDict_Next(b->ports, &pos, &key, &value)) {
    PyObject *c = pyport_call((pyport *)value, b->s_is_closed, NULL, NULL);
    if (c != Py_False) {
      if (!dead)
        dead = PyList_New(0);
      if (dead)
        PyList_Append(dead, key);
    }
    Py_XDECREF(c);
    PyErr_Clear();
  }
  for (Py_ssize_t i = 0; dead && i < PyList_GET_SIZE(dead); i++) {
    PyObject *k = PyList_GET_ITEM(dead, i);
    pyport *pp = (pyport *)PyDict_GetItem(b->ports, k);
    if (pp)
      pyport_close(pp);
    PyDict_DelItem(b->ports, k);
  }
  Py_XDECREF(dead);
  PyErr_Clear();
}

/* The port of `loop`, created on first use (borrowed; GIL). `on_thread`:
 * the caller runs that loop; otherwise the eventfd is registered on the
 * loop's thread later (loop methods are not thread-safe), and items pushed
 * meanwhile wait in the queue. */
static pyport *port_for(aiob_py_bridge *b, PyObject *loop, int on_thread) {
  PyObject *ref = PyWeakref_NewRef(loop, NULL); /* the loop's basic ref */
  if (!ref)
    return NULL;
  pyport *pp = (pyport *)PyDict_GetItemWithError(b->ports, ref);
  if (pp || PyErr_Occurred()) {
    Py_DECREF(ref);
    return pp;
  }
  prune_ports(b);
  pp = PyObject_New(pyport, b->port_type);
  if (!pp) {
    Py_DECREF(ref);
    return NULL;
  }
  pp->b = b;
  pp->loop_ref = ref; /* moved */
  pp->reader = 0;
  pp->port = port_new();
  if (!pp->port) {
    PyErr_SetFromErrno(PyExc_OSError);
    Py_DECREF(pp);
    return NULL;
  }
  PyObject *r;
  if (on_thread) {
    r = pyport_register((PyObject *)pp, NULL);
  } else {
    PyObject *reg = PyObject_GetAttrString((PyObject *)pp, "register");
    r = reg ? PyObject_CallMethod(loop, "call_soon_threadsafe", "O", reg)
            : NULL;
    Py_XDECREF(reg);
  }
  if (!r) {
    Py_DECREF(pp);
    return NULL;
  }
  Py_DECREF(r);
  if (PyDict_SetItem(b->ports, pp->loop_ref, (PyObject *)pp) < 0) {
    pyport_close(pp);
    Py_DECREF(pp);
    return NULL;
  }
  Py_DECREF(pp); /* the dict holds it */
  return pp;
}

/* ---- Task locals from Python ------------------------------------------- */

/* The running loop of this thread (new reference), or NULL: with an
 * exception set on error, without one when no loop runs. */
static PyObject *running_loop(aiob_py_bridge *b) {
  PyObject *loop = PyObject_CallObject(b->get_running_loop, NULL);
  if (loop == Py_None) {
    Py_DECREF(loop);
    return NULL;
  }
  return loop;
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
  PyObject *running = running_loop(b);
  if (!running && PyErr_Occurred())
    return NULL;
  int on_thread = running == loop;
  Py_XDECREF(running);
  pyport *pp = port_for(b, loop, on_thread);
  if (!pp)
    return NULL;
  py_locals *l = calloc(1, sizeof *l);
  if (!l) {
    PyErr_NoMemory();
    return NULL;
  }
  l->context =
      context ? (Py_INCREF(context), context) : PyContext_CopyCurrent();
  if (!l->context) {
    free(l);
    return NULL;
  }
  atomic_init(&l->refs, 1);
  l->port = pp->port;
  port_ref(l->port);
  Py_INCREF(loop);
  l->loop = loop;
  return l;
}

aiob_py_locals *aiob_py_locals_new(aiob_py_bridge *b, PyObject *loop,
                                   PyObject *context) {
  return locals_make(b, loop, context);
}

aiob_py_locals *aiob_py_task_locals(aiob_task *self) {
  aiob_local_key key;
  if (!self || locals_key_get(&key) < 0)
    return NULL;
  py_locals *l = aiob_task_local_get(self, key);
  return l ? locals_clone(l) : NULL;
}

aiob_py_locals *aiob_py_get_current_locals(aiob_py_bridge *b) {
  py_locals *l = aiob_py_task_locals(aiob__current_task);
  if (l)
    return l;
  PyObject *loop = running_loop(b);
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
    locals_destroy(l);
    return loop;
  }
  PyObject *loop = running_loop(b);
  if (!loop && !PyErr_Occurred())
    PyErr_SetString(PyExc_RuntimeError, "no running event loop");
  return loop;
}

/* ---- Starting a C task for a loop -------------------------------------- */

/* Spawns the task with locals `l` (the task takes its own reference) and
 * returns the future on l's loop (GIL). On failure the caller keeps
 * `state`. */
static PyObject *start_task(aiob_py_bridge *b, py_locals *l,
                            const aiob_task_vtable *vt, void *state,
                            aiob_py_converter conv) {
  aiob_runtime *rt = bridge_runtime(b);
  if (!rt)
    return NULL;
  aiob_local_key key;
  if (locals_key_get(&key) < 0) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: no task-local key left");
    return NULL;
  }
  PyObject *fut = PyObject_CallMethodObjArgs(l->loop, b->s_create_future, NULL);
  if (!fut)
    return NULL;
  pending *p = PyObject_New(pending, b->pending_type);
  if (!p) {
    Py_DECREF(fut);
    return NULL;
  }
  p->b = b;
  p->task = NULL;
  p->conv = conv;
  p->it.kind = ITEM_COMPLETION;
  p->port = l->port;
  port_ref(p->port);
  p->fut_ref = PyWeakref_NewRef(fut, (PyObject *)p);
  if (!p->fut_ref) {
    Py_DECREF(p);
    Py_DECREF(fut);
    return NULL;
  }

  aiob_local_init li = {.key = key, .value = locals_clone(l)};
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.no_inherit = 1;
  o.locals = &li;
  o.nlocals = 1;
  o.on_finish = pending_finished;
  o.on_finish_arg = p;
  Py_INCREF(p); /* in flight: released when its completion is drained */
  int rc = aiob_spawn_ex(rt, &o, vt, state, &p->task);
  if (rc < 0) {
    Py_DECREF(p);
    locals_destroy(l);
    Py_DECREF(p);
    Py_DECREF(fut);
    if (rc == AIOB_ESHUTDOWN)
      PyErr_SetString(b->shutdown_error,
                      "aiobridge: the runtime is shutting down");
    else
      PyErr_Format(PyExc_OSError, "aiobridge: cannot spawn: %s",
                   aiob_strerror(rc));
    return NULL;
  }
  /* The task owns `state` now: no failure may be reported from here on.
   * Without the done callback (out of memory) a Python cancel() would not
   * reach the C task; collecting the future still cancels it. */
  PyObject *r =
      PyObject_CallMethodObjArgs(fut, b->s_add_done_callback, p, NULL);
  Py_DECREF(p);
  if (!r)
    PyErr_Clear();
  Py_XDECREF(r);
  return fut;
}

/* Spawns the task for the running `loop` in a copy of the current context. */
static PyObject *start_on_loop(aiob_py_bridge *b, PyObject *loop,
                               const aiob_task_vtable *vt, void *state,
                               aiob_py_converter conv) {
  py_locals *l = locals_make(b, loop, NULL);
  if (!l)
    return NULL;
  PyObject *fut = start_task(b, l, vt, state, conv);
  locals_destroy(l);
  return fut;
}

/* ---- The lazy coroutine (no running loop at call time) ------------------ */

typedef struct lazy {
  PyObject_HEAD aiob_py_bridge *b;
  const aiob_task_vtable *vt;
  void *state;
  aiob_py_converter conv;
  PyObject *it;  /* the future's __await__ iterator once awaited */
  PyObject *fut; /* the future, started but not yet awaited */
  int closed;
} lazy;

/* The __await__ iterator of a started future (NULL if not started). */
static PyObject *lazy_iter(lazy *z) {
  if (!z->it && z->fut) {
    z->it = PyObject_CallMethod(z->fut, "__await__", NULL);
    if (z->it)
      Py_CLEAR(z->fut);
  }
  return z->it;
}

static PyObject *lazy_start(lazy *z) {
  if (z->it || z->fut)
    return lazy_iter(z);
  if (z->closed) {
    PyErr_SetString(PyExc_RuntimeError,
                    "cannot reuse already awaited coroutine");
    return NULL;
  }
  PyObject *loop = PyObject_CallObject(z->b->get_running_loop, NULL);
  if (!loop)
    return NULL;
  if (loop == Py_None) {
    Py_DECREF(loop);
    PyErr_SetString(PyExc_RuntimeError,
                    "aiobridge awaitable awaited outside a running event loop");
    return NULL;
  }
  PyObject *fut = start_on_loop(z->b, loop, z->vt, z->state, z->conv);
  Py_DECREF(loop);
  if (!fut)
    return NULL;
  z->state = NULL; /* the task owns it now */
  z->closed = 1;
  z->it = PyObject_CallMethod(fut, "__await__", NULL);
  Py_DECREF(fut);
  return z->it;
}

static PyObject *lazy_send(PyObject *self, PyObject *arg) {
  lazy *z = (lazy *)self;
  PyObject *it = lazy_start(z);
  if (!it)
    return NULL;
  return PyObject_CallMethod(it, "send", "O", arg);
}

static PyObject *lazy_iternext(PyObject *self) {
  return lazy_send(self, Py_None);
}

static PyObject *lazy_throw(PyObject *self, PyObject *args) {
  lazy *z = (lazy *)self;
  if (!z->it && !z->fut) {
    /* Not started: raise it here; the task never runs. */
    PyObject *typ, *val = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
      return NULL;
    z->closed = 1;
    if (PyExceptionInstance_Check(typ))
      PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else
      PyErr_SetObject(typ, val ? val : Py_None);
    return NULL;
  }
  PyObject *it = lazy_iter(z);
  return it ? PyObject_CallMethod(it, "throw", "O", args) : NULL;
}

static void lazy_drop_state(lazy *z) {
  if (z->state) {
    void *st = z->state;
    z->state = NULL;
    if (z->vt->drop)
      z->vt->drop(st); /* never spawned: released here, on this thread */
  }
}

static PyObject *lazy_close(PyObject *self, PyObject *unused) {
  (void)unused;
  lazy *z = (lazy *)self;
  z->closed = 1;
  lazy_drop_state(z);
  if (z->it) {
    PyObject *r = PyObject_CallMethod(z->it, "close", NULL);
    if (!r)
      PyErr_Clear();
    Py_XDECREF(r);
  }
  Py_RETURN_NONE;
}

static PyObject *lazy_await(PyObject *self) {
  Py_INCREF(self);
  return self;
}

static void lazy_dealloc(PyObject *self) {
  lazy *z = (lazy *)self;
  PyTypeObject *tp = Py_TYPE(self);
  lazy_drop_state(z);
  Py_CLEAR(z->it);
  Py_CLEAR(z->fut);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyMethodDef lazy_methods[] = {
    {"send", lazy_send, METH_O, "Start or resume."},
    {"throw", lazy_throw, METH_VARARGS, "Raise inside."},
    {"close", lazy_close, METH_NOARGS, "Close."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot lazy_slots[] = {
    {Py_tp_dealloc, lazy_dealloc},   {Py_tp_iter, lazy_await},
    {Py_tp_iternext, lazy_iternext}, {Py_am_await, lazy_await},
    {Py_tp_methods, lazy_methods},   {0, NULL},
};

static PyType_Spec lazy_spec = {
    .name = "aiobridge.CTask",
    .basicsize = sizeof(lazy),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = lazy_slots,
};

static lazy *lazy_new(aiob_py_bridge *b, const aiob_task_vtable *vt,
                      void *state, aiob_py_converter conv) {
  lazy *z = PyObject_New(lazy, b->lazy_type);
  if (!z)
    return NULL;
  z->b = b;
  z->vt = vt;
  z->state = state;
  z->conv = conv;
  z->it = NULL;
  z->fut = NULL;
  z->closed = 0;
  return z;
}

/* Makes z await `fut`, a new reference to a started future; NULL (the
 * start failed before spawning: the caller keeps the state) releases z and
 * returns NULL. Once the task is spawned this cannot fail: the await
 * iterator is made at first await. */
static PyObject *lazy_started(lazy *z, PyObject *fut) {
  z->state = NULL; /* the task owns it, or the caller does again */
  z->closed = 1;
  if (!fut) {
    Py_DECREF(z);
    return NULL;
  }
  z->fut = fut;
  return (PyObject *)z;
}

static int check_vt(aiob_py_bridge *b, const aiob_task_vtable *vt) {
  if (!b || !vt || !vt->poll) {
    PyErr_SetString(PyExc_ValueError, "aiobridge: no task vtable");
    return -1;
  }
  return 0;
}

PyObject *aiob_py_future_into_py(aiob_py_bridge *b, const aiob_task_vtable *vt,
                                 void *state, aiob_py_converter conv) {
  if (check_vt(b, vt) < 0)
    return NULL;
  PyObject *loop = running_loop(b);
  if (!loop && PyErr_Occurred())
    return NULL;
  lazy *z = lazy_new(b, vt, state, conv);
  if (!z || !loop) {
    /* No running loop: binds to the loop that first awaits it. */
    Py_XDECREF(loop);
    return (PyObject *)z;
  }
  /* A running loop: start now (like the peers), await the future. The
   * result is still a coroutine, so create_task / TaskGroup accept it. */
  PyObject *fut = start_on_loop(b, loop, vt, state, conv);
  Py_DECREF(loop);
  return lazy_started(z, fut);
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
  lazy *z = lazy_new(b, vt, state, conv);
  if (!z)
    return NULL;
  return lazy_started(z, start_task(b, locals, vt, state, conv));
}

/* ---- Introspection ---------------------------------------------------- */

static void stats_fn(aiob_runtime *rt, void *arg) {
  aiob_runtime_stats_get(rt, arg);
}

PyObject *aiob_py_bridge_stats(aiob_py_bridge *b) {
  aiob_runtime_stats st;
  memset(&st, 0, sizeof st);
  aiob_runtime_default_peek(stats_fn, &st); /* zeros when not running */
  return Py_BuildValue(
      "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n}", "tasks_live",
      (unsigned long long)st.tasks_live, "tasks_spawned",
      (unsigned long long)st.tasks_spawned, "tasks_completed",
      (unsigned long long)st.tasks_completed, "tasks_cancelled",
      (unsigned long long)st.tasks_cancelled, "polls",
      (unsigned long long)st.polls, "loop_wakes",
      (unsigned long long)st.loop_wakes, "spins", (unsigned long long)st.spins,
      "spin_hits", (unsigned long long)st.spin_hits, "spin_ns",
      (unsigned long long)st.spin_ns, "completions", b->completions,
      "py_loop_wakes", b->py_wakes, "py_awaits", b->py_awaits, "ports",
      b->ports ? PyDict_Size(b->ports) : (Py_ssize_t)0);
}

PyObject *aiob_py_bridge_backend(aiob_py_bridge *b) {
  aiob_runtime *rt = bridge_runtime(b);
  return rt ? PyUnicode_FromString(aiob_runtime_backend_name(rt)) : NULL;
}

typedef struct info_snap {
  const char *backend;
  unsigned threads, spin_us;
} info_snap;

static void info_fn(aiob_runtime *rt, void *arg) {
  info_snap *i = arg;
  i->backend = aiob_runtime_backend_name(rt);
  i->threads = aiob_runtime_threads(rt);
  i->spin_us = aiob_runtime_spin_us(rt);
}

/* {module, running, backend, threads, spin_us, default_backend, backends};
 * never starts the runtime (GIL). */
static PyObject *bridge_info(const char *module) {
  info_snap i = {0};
  int running = aiob_runtime_default_peek(info_fn, &i) == 0;
  PyObject *names = PyList_New(0);
  const aiob_backend *bk;
  for (unsigned k = 0; names && (bk = aiob_backend_at(k)); k++) {
    PyObject *n = PyUnicode_FromString(bk->name);
    if (!n || PyList_Append(names, n) < 0)
      Py_CLEAR(names);
    Py_XDECREF(n);
  }
  if (!names)
    return NULL;
  PyObject *threads = Py_None, *spin = Py_None;
  if (running) {
    threads = PyLong_FromUnsignedLong(i.threads);
    spin = PyLong_FromUnsignedLong(i.spin_us);
  }
  PyObject *d = Py_BuildValue(
      "{s:s,s:O,s:s,s:O,s:O,s:O,s:s}", "module", module, "running",
      running ? Py_True : Py_False, "backend", running ? i.backend : NULL,
      "threads", threads ? threads : Py_None, "spin_us", spin ? spin : Py_None,
      "backends", names, "default_backend", aiob_backend_at(0)->name);
  if (running) {
    Py_XDECREF(threads);
    Py_XDECREF(spin);
  }
  Py_DECREF(names);
  return d;
}

/* ---- Registration with the aiobridge module, and the exit hook ---------- */

/* Outlives the bridge: the hub's callables and the atexit hook hold its
 * capsule; aiob_py_bridge_free clears `b`. */
typedef struct bridge_reg {
  aiob_py_bridge *b;
  char module[128];
} bridge_reg;

#define REG_NAME "aiobridge.bridge"

static void reg_destroy(PyObject *cap) {
  free(PyCapsule_GetPointer(cap, REG_NAME));
}

static bridge_reg *reg_of(PyObject *cap) {
  return PyCapsule_GetPointer(cap, REG_NAME);
}

/* The live bridge of a registration, or NULL with an exception set (its
 * module was freed). */
static aiob_py_bridge *reg_bridge(PyObject *cap) {
  bridge_reg *r = reg_of(cap);
  if (r && !r->b)
    PyErr_Format(PyExc_RuntimeError, "aiobridge: module %s was freed",
                 r->module);
  return r ? r->b : NULL;
}

static PyObject *reg_info(PyObject *cap, PyObject *unused) {
  (void)unused;
  bridge_reg *r = reg_of(cap);
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? bridge_info(r->module) : NULL;
}

static PyObject *reg_stats(PyObject *cap, PyObject *unused) {
  (void)unused;
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? aiob_py_bridge_stats(b) : NULL;
}

static PyObject *reg_backend(PyObject *cap, PyObject *unused) {
  (void)unused;
  aiob_py_bridge *b = reg_bridge(cap);
  return b ? aiob_py_bridge_backend(b) : NULL;
}

/* Stops the runtime; C tasks in flight are cancelled, their completions
 * reach the loops' ports and cancel the futures. Runtime threads never take
 * the GIL, so joining them with it held cannot deadlock. */
static PyObject *reg_shutdown(PyObject *cap, PyObject *unused) {
  (void)unused;
  if (!reg_bridge(cap))
    return NULL;
  aiob_runtime_default_shutdown();
  release_orphans();
  Py_RETURN_NONE;
}

static void close_all_ports(aiob_py_bridge *b) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (b->ports && PyDict_Next(b->ports, &pos, &key, &value))
    pyport_close((pyport *)value);
  release_orphans();
}

/* atexit: runtime threads stop before the interpreter finalizes, and no
 * runtime starts again in this process. */
static PyObject *reg_atexit(PyObject *cap, PyObject *unused) {
  (void)unused;
  bridge_reg *r = reg_of(cap);
  if (!r)
    return NULL;
  if (r->b)
    r->b->exited = 1;
  aiob_runtime_default_shutdown();
  if (r->b)
    close_all_ports(r->b);
  release_orphans();
  Py_RETURN_NONE;
}

static PyMethodDef reg_defs[] = {
    {"_aiobridge_info", reg_info, METH_NOARGS, NULL},
    {"_aiobridge_stats", reg_stats, METH_NOARGS, NULL},
    {"_aiobridge_shutdown", reg_shutdown, METH_NOARGS, NULL},
    {"_aiobridge_backend", reg_backend, METH_NOARGS, NULL},
    {"_aiobridge_atexit", reg_atexit, METH_NOARGS, NULL},
};

/* Imports the aiobridge module, takes its exception types, registers this
 * bridge there and the exit hook with atexit. */
static int bridge_register(aiob_py_bridge *b, PyObject *module) {
  const char *name = PyModule_GetName(module);
  if (!name)
    return -1;
  PyObject *hub = PyImport_ImportModule("aiobridge");
  if (!hub) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_Format(PyExc_ImportError,
                 "%s needs the aiobridge module (built and installed with "
                 "aiobridge) on sys.path",
                 name);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
  }
  b->shutdown_error = PyObject_GetAttrString(hub, "ShutdownError");
  b->backend_error = PyObject_GetAttrString(hub, "BackendError");
  bridge_reg *r = calloc(1, sizeof *r);
  if (!r) {
    Py_DECREF(hub);
    PyErr_NoMemory();
    return -1;
  }
  r->b = b;
  snprintf(r->module, sizeof r->module, "%s", name);
  b->reg = PyCapsule_New(r, REG_NAME, reg_destroy);
  if (!b->reg)
    free(r);
  PyObject *fn[5] = {NULL};
  int ok = b->shutdown_error && b->backend_error && b->reg;
  for (int i = 0; ok && i < 5; i++)
    ok = (fn[i] = PyCFunction_New(&reg_defs[i], b->reg)) != NULL;
  PyObject *rv = ok ? PyObject_CallMethod(hub, "_register", "sOOOO", name,
                                          fn[0], fn[1], fn[2], fn[3])
                    : NULL;
  Py_XDECREF(rv);
  PyObject *atexit = rv ? PyImport_ImportModule("atexit") : NULL;
  rv = atexit ? PyObject_CallMethod(atexit, "register", "O", fn[4]) : NULL;
  Py_XDECREF(atexit);
  for (int i = 0; i < 5; i++)
    Py_XDECREF(fn[i]);
  Py_DECREF(hub);
  if (!rv)
    return -1;
  Py_DECREF(rv);
  return 0;
}

#define INTERN(field, text)                                                    \
  do {                                                                         \
    if (!(b->field = PyUnicode_InternFromString(text)))                        \
      goto fail;                                                               \
  } while (0)

int aiob_py_bridge_init(PyObject *module, aiob_py_bridge **out) {
  aiob_py_bridge *b = calloc(1, sizeof *b);
  if (!b) {
    PyErr_NoMemory();
    return -1;
  }
  aiob_local_key key;
  if (locals_key_get(&key) < 0) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: no task-local key left");
    goto fail;
  }
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  if (!asyncio)
    goto fail;
  PyObject *events = PyObject_GetAttrString(asyncio, "events");
  b->ensure_future = PyObject_GetAttrString(asyncio, "ensure_future");
  Py_DECREF(asyncio);
  if (!events)
    goto fail;
  b->get_running_loop = PyObject_GetAttrString(events, "_get_running_loop");
  Py_DECREF(events);
  if (!b->ensure_future || !b->get_running_loop)
    goto fail;
  INTERN(s_create_future, "create_future");
  INTERN(s_add_done_callback, "add_done_callback");
  INTERN(s_done, "done");
  INTERN(s_cancel, "cancel");
  INTERN(s_cancelled, "cancelled");
  INTERN(s_set_result, "set_result");
  INTERN(s_set_exception, "set_exception");
  INTERN(s_add_reader, "add_reader");
  INTERN(s_remove_reader, "remove_reader");
  INTERN(s_is_closed, "is_closed");
  INTERN(s_call_soon, "call_soon");
  INTERN(s_result, "result");
  INTERN(s_exception, "exception");
  if (!(b->ports = PyDict_New()))
    goto fail;
  b->pending_type = (PyTypeObject *)PyType_FromSpec(&pending_spec);
  b->lazy_type = (PyTypeObject *)PyType_FromSpec(&lazy_spec);
  b->port_type = (PyTypeObject *)PyType_FromSpec(&pyport_spec);
  b->waiter_type = (PyTypeObject *)PyType_FromSpec(&waiter_spec);
  if (!b->pending_type || !b->lazy_type || !b->port_type || !b->waiter_type)
    goto fail;
  if (bridge_register(b, module) < 0)
    goto fail;
  *out = b;
  return 0;
fail:
  aiob_py_bridge_free(b);
  return -1;
}

void aiob_py_bridge_free(aiob_py_bridge *b) {
  if (!b)
    return;
  close_all_ports(b);
  if (b->reg) {
    bridge_reg *r = reg_of(b->reg);
    if (r)
      r->b = NULL;
    PyErr_Clear();
    Py_CLEAR(b->reg);
  }
  Py_CLEAR(b->ports);
  Py_CLEAR(b->shutdown_error);
  Py_CLEAR(b->backend_error);
  Py_CLEAR(b->get_running_loop);
  Py_CLEAR(b->ensure_future);
  Py_CLEAR(b->pending_type);
  Py_CLEAR(b->lazy_type);
  Py_CLEAR(b->port_type);
  Py_CLEAR(b->waiter_type);
  Py_CLEAR(b->s_create_future);
  Py_CLEAR(b->s_add_done_callback);
  Py_CLEAR(b->s_done);
  Py_CLEAR(b->s_cancel);
  Py_CLEAR(b->s_cancelled);
  Py_CLEAR(b->s_set_result);
  Py_CLEAR(b->s_set_exception);
  Py_CLEAR(b->s_add_reader);
  Py_CLEAR(b->s_remove_reader);
  Py_CLEAR(b->s_is_closed);
  Py_CLEAR(b->s_call_soon);
  Py_CLEAR(b->s_result);
  Py_CLEAR(b->s_exception);
  free(b);
}
