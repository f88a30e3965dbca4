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

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define DRAIN_CHUNK 4096

#if PY_VERSION_HEX < 0x03090000
#define PyObject_CallNoArgs(f) _PyObject_CallNoArg(f)
#define PyObject_CallOneArg(f, a) PyObject_CallFunctionObjArgs(f, a, NULL)
#endif

enum { ITEM_COMPLETION, ITEM_REQUEST, ITEM_CANCEL };

typedef struct item {
  aiob__mpsc_node node;
  uint8_t kind;
  /* Padding put to use by the CTask that embeds its completion item (GIL):
   * its state, _asyncio_future_blocking, "exception not yet retrieved",
   * and "the Python object is gone". */
  uint8_t state, blocking, log_exc, dead;
} item;

/* ---- Deferred releases ------------------------------------------------- */

/* Work that needs the GIL, from a thread that may not hold it: done at
 * once where the GIL is held, else queued for the next port drain (or the
 * next shutdown) on a thread that holds it. */
typedef struct deferred {
  void (*fn)(void *);
  void *arg;
} deferred;

static pthread_mutex_t orphan_mu = PTHREAD_MUTEX_INITIALIZER;
static deferred *orphans;
static size_t norphans, corphans;

/* ---- fork() ------------------------------------------------------------
 *
 * A forked child shares with its parent the eventfds of the parent's ports
 * and the epoll sets (or uv loops) of the parent's asyncio loops. A port
 * made before the fork is never used by the child: it does not read the
 * eventfd (that would steal the parent's wake), push to it, or unregister
 * it from a loop (epoll_ctl on a shared epoll set would unregister it for
 * the parent too). The child makes fresh ports (and the core a fresh
 * runtime) on its next use. */
static _Atomic unsigned fork_gen; /* bumped in every child */

static void fork_prepare(void) { pthread_mutex_lock(&orphan_mu); }
static void fork_parent(void) { pthread_mutex_unlock(&orphan_mu); }
static void fork_child(void) {
  pthread_mutex_unlock(&orphan_mu);
  atomic_fetch_add(&fork_gen, 1);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_register(void) {
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static void with_gil(void (*fn)(void *), void *arg) {
  /* Runtime threads never hold it (and PyGILState_Check answers 1 on any
   * thread once its check is off, e.g. with sub-interpreters). */
  if (!aiob__current_loop && PyGILState_Check()) {
    fn(arg);
    return;
  }
  pthread_mutex_lock(&orphan_mu);
  if (norphans == corphans) {
    size_t n = corphans ? corphans * 2 : 64;
    deferred *o = realloc(orphans, n * sizeof *o);
    if (o) {
      orphans = o;
      corphans = n;
    }
  }
  if (norphans < corphans) /* else leaked: better than a crash */
    orphans[norphans++] = (deferred){fn, arg};
  pthread_mutex_unlock(&orphan_mu);
}

static void release_orphans(void) {
  for (;;) {
    pthread_mutex_lock(&orphan_mu);
    if (norphans == 0) {
      pthread_mutex_unlock(&orphan_mu);
      return;
    }
    deferred d = orphans[--norphans];
    pthread_mutex_unlock(&orphan_mu);
    d.fn(d.arg);
  }
}

/* Drops a reference (GIL). A coroutine whose last reference this is gets
 * closed first: a C task that drops a coroutine it was handed, because it
 * was cancelled before awaiting it, abandons it as an asyncio Task
 * cancelled before its first step does, without a "coroutine ... was never
 * awaited" warning. (Dropping the last reference would close a started
 * coroutine anyway.) */
static void decref_cb(void *p) {
  PyObject *obj = p;
  if (PyCoro_CheckExact(obj) && Py_REFCNT(obj) == 1) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethod(obj, "close", NULL);
    if (r)
      Py_DECREF(r);
    else
      PyErr_WriteUnraisable(obj);
    PyErr_Restore(type, value, tb);
  }
  Py_DECREF(obj);
}

void aiob_py_release(PyObject *obj) {
  if (obj)
    with_gil(decref_cb, obj);
}

static void release_cb(void *obj) { aiob_py_release(obj); }

/* tp_new of the bridge's types: made by the bridge only. */
static PyObject *no_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
  (void)args;
  (void)kw;
  PyErr_Format(PyExc_TypeError, "cannot create '%s' instances", type->tp_name);
  return NULL;
}

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

/* The current exception, normalized and with its traceback attached, as a
 * new reference (NULL if none was set); the error indicator is cleared. */
static PyObject *take_exception(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (value && tb)
    PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
}

/* A new exception object for a failed output (GIL); shutdown_error is the
 * bridge's aiobridge.ShutdownError. */
static PyObject *exception_for(PyObject *shutdown_error, aiob_output *out) {
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
  if (out->status == AIOB_ESHUTDOWN) /* not ESHUTDOWN's BrokenPipeError */
    return PyObject_CallFunction(shutdown_error, "s",
                                 "aiobridge: the runtime is shutting down");
  /* OSError(errno, msg) returns the subclass Python uses for that errno. */
  int err = -out->status;
  return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* ---- Durations ---------------------------------------------------------- */

int aiob_py_duration_ns(PyObject *number, double unit_ns, uint64_t *out) {
  double v = PyFloat_AsDouble(number);
  if (v == -1.0 && PyErr_Occurred())
    return -1;
  if (isnan(v)) {
    PyErr_SetString(PyExc_ValueError, "duration is NaN");
    return -1;
  }
  if (v < 0) {
    PyErr_SetString(PyExc_ValueError, "negative duration");
    return -1;
  }
  double ns = v * unit_ns;
  /* 2^64 and beyond (inf included) do not fit: the longest sleep there is,
   * about 584 years, is "forever" as asyncio.sleep(math.inf) is. */
  *out = ns >= 18446744073709551616.0 ? UINT64_MAX : (uint64_t)ns;
  return 0;
}

/* ---- Ports ------------------------------------------------------------- */

typedef struct port {
  _Atomic uint32_t refs;
  aiob_py_bridge *b;
  aiob__inbox in; /* items for the loop; closed when the loop goes away */
  int efd;        /* the wake: watched with loop.add_reader */
  unsigned gen;   /* fork_gen when made */
} port;

/* Made before a fork() that made this process: the parent's (see above). */
static bool port_inherited(port *p) { return p->gen != atomic_load(&fork_gen); }

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
  p->gen = atomic_load(&fork_gen);
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
  PyObject *get_running_loop;    /* asyncio.events._get_running_loop */
  PyObject *ensure_future;       /* asyncio.ensure_future */
  PyObject *cancelled_error;     /* asyncio.CancelledError */
  PyObject *invalid_state_error; /* asyncio.InvalidStateError */
  PyTypeObject *ctask_type, *port_type, *waiter_type;
  PyObject *s_add_done_callback, *s_cancel, *s_cancelled, *s_add_reader,
      *s_is_closed, *s_call_soon, *s_call_soon_threadsafe, *s_result,
      *s_exception;
  PyObject *kw_context; /* ("context",) */
};

/* The runtime, started if needed, with a reference the caller releases
 * (aiob_runtime_release): another thread may shut it down meanwhile, and
 * its memory must outlive our use. NULL with aiobridge.ShutdownError
 * (after the interpreter-exit hook) or aiobridge.BackendError set (GIL). */
static aiob_runtime *bridge_runtime(aiob_py_bridge *b) {
  if (b->exited) {
    PyErr_SetString(b->shutdown_error,
                    "aiobridge: the runtime was stopped at interpreter exit");
    return NULL;
  }
  aiob_runtime *rt = NULL;
  int rc = aiob_runtime_default_acquire(&rt);
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

/* Set (GIL) before the locals are shared, except an empty context, which
 * is made on first use with the GIL (locals_context); refcounted from any
 * thread. The last reference is released with the GIL (with_gil). */
struct aiob_py_locals {
  _Atomic uint32_t refs;
  uint32_t embedded; /* part of a CTask's memory, freed with it */
  port *port;        /* the loop's queue (referenced) */
  PyObject *loop;    /* owned */
  PyObject *context; /* owned; NULL: an empty snapshot, made when used */
};
typedef aiob_py_locals py_locals;

/* ---- CTask: the awaitable of a C task, itself an asyncio future ---------
 *
 * One object per C task started from Python. It speaks the asyncio future
 * protocol (asyncio.isfuture is true: done callbacks, cancel(msg), result,
 * exception, get_loop, _asyncio_future_blocking), so gather, wait, shield,
 * wait_for and ensure_future take it as it is, with no Task around it. It
 * is also its own __await__ iterator with send/throw/close, so
 * create_task, TaskGroup and asyncio.run accept it as a coroutine.
 *
 * The task's locals and its completion item live in the object's memory;
 * loc.refs counts the holders of that memory: the Python object while it
 * is alive, the C task's task-local value (and clones in child tasks and
 * awaits), and the completion in flight. When the Python object dies first
 * its memory outlives it (no longer an object) until the last C holder
 * lets go, and is freed with the GIL. */

enum { CF_UNBOUND, CF_PENDING, CF_RESULT, CF_EXCEPTION, CF_CANCELLED };

typedef struct cfut {
  PyObject_HEAD PyObject *cb0; /* first done callback */
  PyObject *ctx0;              /* its context; NULL: a fresh empty one */
  PyObject *cbs;               /* list of (callback, context), or NULL */
  PyObject *value;             /* result, exception or cancel message */
  py_locals loc;               /* bound: loop and port set */
  union {
    struct {
      const aiob_task_vtable *vt;
      void *state; /* owned until spawned */
      aiob_py_bridge *b;
    } lazy;          /* CF_UNBOUND, or cancelled before it was bound */
    aiob_task *task; /* once spawned (referenced) */
  } u;
  aiob_py_converter conv;
  item it; /* the completion; its spare bytes hold the fields below */
} cfut;

#define CF_STATE(f) ((f)->it.state)

/* Releases what a py_locals holds and empties it (GIL). */
static void locals_clear(py_locals *l) {
  Py_CLEAR(l->context);
  Py_CLEAR(l->loop);
  if (l->port)
    port_unref(l->port);
  l->port = NULL;
}

/* Moves the loop, context and port of src to dst (no GIL needed). */
static void locals_move(py_locals *dst, py_locals *src) {
  dst->port = src->port;
  dst->loop = src->loop;
  dst->context = src->context;
  src->port = NULL;
  src->loop = src->context = NULL;
}

static void locals_free(void *v) {
  py_locals *l = v;
  locals_clear(l);
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

static void *locals_clone(void *v) {
  py_locals *l = v;
  atomic_fetch_add(&l->refs, 1);
  return l;
}

static void locals_destroy(void *v) {
  py_locals *l = v;
  if (atomic_fetch_sub(&l->refs, 1) == 1)
    with_gil(locals_free, l);
}

aiob_py_locals *aiob_py_locals_clone(aiob_py_locals *l) {
  return l ? locals_clone(l) : NULL;
}

void aiob_py_locals_release(aiob_py_locals *l) {
  if (l)
    locals_destroy(l);
}

/* The context of `l` (borrowed, GIL): an empty snapshot is made on first
 * use (any empty context is that snapshot), or NULL on MemoryError. */
static PyObject *locals_context(py_locals *l) {
  if (!l->context)
    l->context = PyContext_New();
  return l->context;
}

PyObject *aiob_py_locals_loop(aiob_py_locals *l) { return l->loop; }

PyObject *aiob_py_locals_context(aiob_py_locals *l) {
  PyObject *ctx = locals_context(l);
  if (!ctx)
    PyErr_Clear();
  return ctx;
}

/* A snapshot of the current context (GIL): a copy, or NULL in *out when it
 * is empty (the common case; the copy is then made only if needed). */
static int context_snapshot(PyObject **out) {
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

/* on_finish of a C task started by the bridge: runtime thread, no GIL. */
static void cf_finished(void *arg, aiob_task *task) {
  (void)task;
  cfut *f = arg;
  if (!port_push(f->loc.port, &f->it))
    locals_destroy(&f->loc); /* the loop is gone: nobody awaits */
}

static aiob_py_bridge *cf_bridge(cfut *f) {
  return f->loc.port ? f->loc.port->b : f->u.lazy.b;
}

static bool cf_done(cfut *f) { return CF_STATE(f) >= CF_RESULT; }

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
  PyObject *exc = take_exception();
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
  PyObject *value = take_exception();
  if (!value) {
    CF_STATE(f) = CF_CANCELLED;
    return;
  }
  f->value = value;
  CF_STATE(f) = CF_EXCEPTION;
  f->it.log_exc = 1;
}

/* Resolves the future of a finished C task and runs its done callbacks
 * (loop thread, GIL). A future cancelled by Python meanwhile discards the
 * outcome silently. -1: a callback let SystemExit or KeyboardInterrupt
 * out (it is set). */
static int cf_complete(aiob_py_bridge *b, cfut *f) {
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
  if (out.status >= 0) {
    PyObject *v;
    if (f->conv) {
      v = f->conv(&out); /* owns out.value */
      out.value = NULL;
    } else {
      v = Py_None;
      Py_INCREF(v);
    }
    if (v) {
      f->value = v;
      CF_STATE(f) = CF_RESULT;
    } else {
      cf_set_current_exception(f);
    }
  } else if (out.status == AIOB_ECANCELED) {
    CF_STATE(f) = CF_CANCELLED;
  } else {
    PyObject *exc = exception_for(b->shutdown_error, &out);
    if (exc) {
      f->value = exc;
      CF_STATE(f) = CF_EXCEPTION;
      f->it.log_exc = 1;
    } else {
      cf_set_current_exception(f);
    }
  }
  aiob_output_clear(&out);
  int rc = cf_callbacks(f, 1);
  Py_DECREF(f);
  return rc;
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

/* Completes pr with the exception exc (owned; NULL: out of memory). */
static void promise_raise(aiob_promise *pr, PyObject *exc) {
  py_error *e = exc ? calloc(1, sizeof *e) : NULL;
  if (!e) {
    Py_XDECREF(exc);
    aiob_promise_complete(pr, AIOB_ENOMEM, NULL, NULL);
    return;
  }
  e->exc = exc;
  aiob_promise_complete(pr, AIOB_PY_EXCEPTION, e, py_error_free);
}

/* Completes the request's promise with the current Python exception. */
static void fail_request_with_current(request *r) {
  aiob_promise *pr = r->promise;
  r->promise = NULL;
  promise_raise(pr, take_exception());
}

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
    promise_raise(pr, exc);
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
      promise_raise(pr, take_exception());
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
    {Py_tp_new, no_new},
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

/* Starts an awaited Python awaitable on this loop (loop thread, GIL).
 * Consumes the Python side's reference to r. -1: SystemExit or
 * KeyboardInterrupt is set, to leave the loop. */
static int start_request(aiob_py_bridge *b, request *r) {
  if (atomic_load(&r->cancelled)) {
    request_unref(r);
    return 0;
  }
  b->py_awaits++;
  /* The C side cannot release `object` or the context before `cancelled`
   * is set, and we hold the GIL from the check to these references. */
  PyObject *obj = r->object, *ctx = locals_context(r->locals);
  if (!ctx) {
    fail_request_with_current(r);
    request_unref(r);
    return 0;
  }
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
    /* SystemExit and KeyboardInterrupt leave the loop, as from any
     * callback (and as asyncio's Task does, the awaiting side gets them
     * too); other exceptions only go to the C task. */
    int leave = PyErr_ExceptionMatches(PyExc_SystemExit) ||
                PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
    PyObject *exc = take_exception();
    if (leave)
      Py_INCREF(exc); /* one for the C task, one to raise */
    aiob_promise *pr = r->promise;
    r->promise = NULL;
    promise_raise(pr, exc);
    request_unref(r);
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
    request_unref(r);
    return 0;
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
  return 0;
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

/* -1: SystemExit or KeyboardInterrupt is set (from a done callback or an
 * awaitable's factory). */
static int dispatch(aiob_py_bridge *b, item *it) {
  int rc = 0;
  switch (it->kind) {
  case ITEM_COMPLETION: {
    cfut *f = AIOB__CONTAINER_OF(it, cfut, it);
    rc = cf_complete(b, f);
    locals_destroy(&f->loc); /* the completion's reference */
    break;
  }
  case ITEM_REQUEST:
    rc = start_request(b, AIOB__CONTAINER_OF(it, request, it));
    break;
  case ITEM_CANCEL:
    cancel_request(b, AIOB__CONTAINER_OF(it, request, cancel_it));
    break;
  }
  return rc;
}

/* Drains up to DRAIN_CHUNK items; reschedules itself if more remain, or if
 * a done callback lets SystemExit / KeyboardInterrupt out (which then
 * leaves the loop, as from any handle). */
static PyObject *pyport_drain(PyObject *self, PyObject *unused) {
  (void)unused;
  pyport *pp = (pyport *)self;
  port *p = pp->port;
  /* Closed: the bridge may be gone. Inherited: the parent's eventfd. */
  if (aiob__inbox_closed(&p->in) || port_inherited(p))
    Py_RETURN_NONE;
  uint64_t v;
  if (read(p->efd, &v, sizeof v) > 0)
    pp->b->py_wakes++; /* not a re-scheduled drain */
  aiob__inbox_rearm(&p->in);
  Py_INCREF(self);
  int done = 0, rc = 0;
  aiob__mpsc_node *node;
  while (rc == 0 && done < DRAIN_CHUNK &&
         (node = aiob__mpsc_pop(&p->in.queue))) {
    rc = dispatch(pp->b, AIOB__CONTAINER_OF(node, item, node));
    done++;
  }
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if ((rc < 0 || done == DRAIN_CHUNK) && !aiob__inbox_closed(&p->in)) {
    PyObject *drain = PyObject_GetAttrString(self, "drain");
    PyObject *r =
        drain ? pyport_call(pp, pp->b->s_call_soon, drain, NULL) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(drain);
    PyErr_Clear();
  }
  release_orphans();
  Py_DECREF(self);
  PyErr_Restore(type, value, tb);
  if (rc < 0)
    return NULL;
  Py_RETURN_NONE;
}

/* Closes the port: no more pushes; pending items are released (GIL). The
 * eventfd stays registered with its loop, whose drain then finds nothing:
 * only the loop's own thread may unregister it (loop methods are not
 * thread-safe), and a closed or collected loop needs no unregistering. A
 * port inherited through fork() is only marked closed: its queue and its
 * registration are the parent's. */
static void pyport_close(pyport *pp) {
  port *p = pp->port;
  if (!p)
    return;
  if (port_inherited(p)) {
    aiob__inbox_abandon(&p->in);
    return;
  }
  if (!aiob__inbox_close(&p->in))
    return;
  aiob__mpsc_node *node;
  while ((node = aiob__mpsc_pop(&p->in.queue))) {
    item *it = AIOB__CONTAINER_OF(node, item, node);
    if (it->kind == ITEM_COMPLETION) {
      locals_destroy(&AIOB__CONTAINER_OF(it, cfut, it)->loc);
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
    {Py_tp_new, no_new},
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
 * resolved; their C tasks are cancelled when the futures are collected),
 * and ports inherited through fork(). */
static void prune_ports(aiob_py_bridge *b) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  PyObject *dead = NULL;
  while (PyDict_Next(b->ports, &pos, &key, &value)) {
    pyport *pp = (pyport *)value;
    PyObject *c = port_inherited(pp->port)
                      ? NULL
                      : pyport_call(pp, b->s_is_closed, NULL, NULL);
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
  if ((pp && !port_inherited(pp->port)) || PyErr_Occurred()) {
    Py_DECREF(ref);
    return pp;
  }
  prune_ports(b); /* and an inherited port of this loop */
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
  pp->port->b = b;
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
  PyObject *loop = PyObject_CallNoArgs(b->get_running_loop);
  if (loop == Py_None) {
    Py_DECREF(loop);
    return NULL;
  }
  return loop;
}

/* Fills l for `loop` (its port made on first use; `on_thread`: the caller
 * runs that loop) and `context` (NULL: a snapshot of the current one). */
static int locals_fill(aiob_py_bridge *b, py_locals *l, PyObject *loop,
                       PyObject *context, int on_thread) {
  pyport *pp = port_for(b, loop, on_thread);
  if (!pp)
    return -1;
  PyObject *ctx = context;
  if (ctx)
    Py_INCREF(ctx);
  else if (context_snapshot(&ctx) < 0)
    return -1;
  l->context = ctx;
  l->port = pp->port;
  port_ref(l->port);
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
  PyObject *running = running_loop(b);
  if (!running && PyErr_Occurred())
    return NULL;
  int on_thread = running == loop;
  Py_XDECREF(running);
  py_locals *l = calloc(1, sizeof *l);
  if (!l) {
    PyErr_NoMemory();
    return NULL;
  }
  if (locals_fill(b, l, loop, context, on_thread) < 0) {
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
static int cf_start(cfut *f, py_locals *from, PyObject *loop) {
  aiob_py_bridge *b = f->u.lazy.b;
  aiob_local_key key;
  if (locals_key_get(&key) < 0) {
    PyErr_SetString(PyExc_RuntimeError, "aiobridge: no task-local key left");
    return -1;
  }
  py_locals got = {0};
  if (from) {
    got.port = from->port;
    port_ref(got.port);
    got.loop = from->loop;
    Py_INCREF(got.loop);
    got.context = from->context;
    Py_XINCREF(got.context);
  } else if (locals_fill(b, &got, loop, NULL, 1) < 0) {
    return -1;
  }
  if (f->loc.loop) { /* bound by another thread meanwhile */
    locals_clear(&got);
    return 0;
  }
  if (CF_STATE(f) != CF_UNBOUND) { /* cancelled meanwhile */
    f->loc.loop = got.loop;
    got.loop = NULL;
    locals_clear(&got);
    return 0;
  }
  aiob_runtime *rt = bridge_runtime(b);
  if (!rt) {
    locals_clear(&got);
    return -1;
  }
  locals_move(&f->loc, &got);
  aiob_local_init li = {.key = key, .value = &f->loc};
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.no_inherit = 1;
  o.locals = &li;
  o.nlocals = 1;
  o.on_finish = cf_finished;
  o.on_finish_arg = f;
  aiob_task *task = NULL;
  atomic_fetch_add(&f->loc.refs, 2); /* the task-local + the completion */
  int rc = aiob_spawn_ex(rt, &o, f->u.lazy.vt, f->u.lazy.state, &task);
  aiob_runtime_release(rt);
  if (rc < 0) {
    atomic_fetch_sub(&f->loc.refs, 2); /* the object still holds one */
    locals_move(&got, &f->loc);        /* unbound before Python code may run */
    locals_clear(&got);
    if (rc == AIOB_ESHUTDOWN)
      PyErr_SetString(b->shutdown_error,
                      "aiobridge: the runtime is shutting down");
    else
      PyErr_Format(PyExc_OSError, "aiobridge: cannot spawn: %s",
                   aiob_strerror(rc));
    return -1;
  }
  f->u.task = task; /* the task owns `state` now */
  CF_STATE(f) = CF_PENDING;
  return 0;
}

/* The future's loop (borrowed), binding an unbound future to the running
 * loop first (and starting its task); NULL with an exception set. */
static PyObject *cf_loop(cfut *f) {
  if (f->loc.loop)
    return f->loc.loop;
  PyObject *loop = running_loop(f->u.lazy.b);
  if (!loop) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError,
                      "aiobridge awaitable used outside a running event loop");
    return NULL;
  }
  int rc = cf_start(f, NULL, loop);
  Py_DECREF(loop);
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
  if (CF_STATE(f) == CF_UNBOUND)
    cf_drop_state(f);
  else
    aiob_task_cancel(f->u.task);
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
    if (context_snapshot(&ctx) < 0)
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

static PyObject *cf_repr(PyObject *self) {
  cfut *f = (cfut *)self;
  switch (CF_STATE(f)) {
  case CF_UNBOUND:
    return PyUnicode_FromString("<CTask unstarted>");
  case CF_PENDING:
    return PyUnicode_FromString("<CTask pending>");
  case CF_RESULT:
    return PyUnicode_FromFormat("<CTask finished result=%R>", f->value);
  case CF_EXCEPTION:
    return PyUnicode_FromFormat("<CTask finished exception=%R>", f->value);
  default:
    return PyUnicode_FromString("<CTask cancelled>");
  }
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
  if (f->loc.port) {
    if (CF_STATE(f) == CF_PENDING)
      aiob_task_cancel(f->u.task);
    aiob_task_release(f->u.task);
    f->u.task = NULL;
  } else if (CF_STATE(f) == CF_UNBOUND) {
    cf_drop_state(f);
  }
  cf_clear(self);
  locals_destroy(&f->loc); /* the type's reference goes with the memory */
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
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot cf_slots[] = {
    {Py_tp_new, no_new},           {Py_tp_dealloc, cf_dealloc},
    {Py_tp_traverse, cf_traverse}, {Py_tp_clear, cf_clear},
    {Py_tp_finalize, cf_finalize}, {Py_tp_repr, cf_repr},
    {Py_tp_iter, cf_self},         {Py_tp_iternext, cf_iternext},
    {Py_am_await, cf_self},        {Py_tp_methods, cf_methods},
    {Py_tp_getset, cf_getset},     {0, NULL},
};

static PyType_Spec cf_spec = {
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

PyObject *aiob_py_future_into_py(aiob_py_bridge *b, const aiob_task_vtable *vt,
                                 void *state, aiob_py_converter conv) {
  if (check_vt(b, vt) < 0)
    return NULL;
  PyObject *loop = running_loop(b);
  if (!loop && PyErr_Occurred())
    return NULL;
  cfut *f = cf_new(b, vt, state, conv);
  if (!f || !loop) {
    /* No running loop: binds to the loop that first awaits it. */
    Py_XDECREF(loop);
    return (PyObject *)f;
  }
  int rc = cf_start(f, NULL, loop); /* inside a loop: start now */
  Py_DECREF(loop);
  return rc < 0 ? cf_abandon(f) : (PyObject *)f;
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
  if (!rt)
    return NULL;
  PyObject *name = PyUnicode_FromString(aiob_runtime_backend_name(rt));
  aiob_runtime_release(rt);
  return name;
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
 * runtime starts again in this process. The ports close first, so the
 * tasks the shutdown cancels resolve nothing: loops still running in
 * daemon threads are left as they are without aiobridge (their awaits
 * simply never finish, and the interpreter stops those threads), rather
 * than woken with cancellations they would report as errors. */
static PyObject *reg_atexit(PyObject *cap, PyObject *unused) {
  (void)unused;
  bridge_reg *r = reg_of(cap);
  if (!r)
    return NULL;
  if (r->b) {
    r->b->exited = 1;
    close_all_ports(r->b);
  }
  aiob_runtime_default_shutdown();
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
  pthread_once(&fork_once, fork_register);
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  if (!asyncio)
    goto fail;
  PyObject *events = PyObject_GetAttrString(asyncio, "events");
  b->ensure_future = PyObject_GetAttrString(asyncio, "ensure_future");
  b->cancelled_error = PyObject_GetAttrString(asyncio, "CancelledError");
  b->invalid_state_error = PyObject_GetAttrString(asyncio, "InvalidStateError");
  Py_DECREF(asyncio);
  if (!events)
    goto fail;
  b->get_running_loop = PyObject_GetAttrString(events, "_get_running_loop");
  Py_DECREF(events);
  if (!b->ensure_future || !b->get_running_loop || !b->cancelled_error ||
      !b->invalid_state_error)
    goto fail;
  INTERN(s_add_done_callback, "add_done_callback");
  INTERN(s_cancel, "cancel");
  INTERN(s_cancelled, "cancelled");
  INTERN(s_add_reader, "add_reader");
  INTERN(s_is_closed, "is_closed");
  INTERN(s_call_soon, "call_soon");
  INTERN(s_call_soon_threadsafe, "call_soon_threadsafe");
  INTERN(s_result, "result");
  INTERN(s_exception, "exception");
  if (!(b->kw_context = Py_BuildValue("(s)", "context")))
    goto fail;
  if (!(b->ports = PyDict_New()))
    goto fail;
  b->ctask_type = (PyTypeObject *)PyType_FromSpec(&cf_spec);
  b->port_type = (PyTypeObject *)PyType_FromSpec(&pyport_spec);
  b->waiter_type = (PyTypeObject *)PyType_FromSpec(&waiter_spec);
  if (!b->ctask_type || !b->port_type || !b->waiter_type)
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
  Py_CLEAR(b->ctask_type);
  Py_CLEAR(b->cancelled_error);
  Py_CLEAR(b->invalid_state_error);
  Py_CLEAR(b->kw_context);
  Py_CLEAR(b->port_type);
  Py_CLEAR(b->waiter_type);
  Py_CLEAR(b->s_add_done_callback);
  Py_CLEAR(b->s_cancel);
  Py_CLEAR(b->s_cancelled);
  Py_CLEAR(b->s_add_reader);
  Py_CLEAR(b->s_is_closed);
  Py_CLEAR(b->s_call_soon);
  Py_CLEAR(b->s_call_soon_threadsafe);
  Py_CLEAR(b->s_result);
  Py_CLEAR(b->s_exception);
  free(b);
}
