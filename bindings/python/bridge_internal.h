/* The asyncio bridge — declarations shared by the sources of
 * bindings/python/. Nothing here is public; non-static symbols are
 * aiob__py_-prefixed, everything else stays static in its file.
 *
 * Runtime threads never take the GIL. Everything that crosses to Python is
 * an item pushed into the inbox (core/internal.h) of the target asyncio
 * loop's *port*; the pusher writes the port's eventfd only when the inbox
 * goes from idle to signalled, and the loop (watching the eventfd with
 * add_reader) drains it in bounded chunks on its own thread, where it holds
 * the GIL.
 *
 * Items: a finished C task (its Pending object), a request to await a Python
 * awaitable for a C task, a request to cancel such an await, the wake
 * of a C stream's consumer, and what a C task consuming a Python async
 * iterator asks of its pump (start, room again, close).
 *
 * Lifetimes: a port is a refcounted C struct (Pending objects, task locals
 * and the Python-side Port object hold references). Python references held
 * for C code are released only with the GIL: at once where it is held, else
 * through the orphan list drained by the next port drain.
 *
 * Shutdown (aiobridge.shutdown, the exit hook) waits for the runtime's loop
 * threads without the GIL, up to a deadline. Their shutdown drops every C
 * task, whose completions reach the ports as usual (and become
 * ShutdownError). A loop thread that does not stop in time (stuck in a
 * native request or a blocking callback) is abandoned: it never touches
 * Python again, and the ports are told to fail what it will never finish
 * (aiob__py_ports_fail_shut). After the exit hook, deferred releases run
 * only on the thread that ran it (release.c), and a process that still has
 * abandoned loop threads at exit() leaves without C destructors (libuv's
 * would join a threadpool thread stuck in a request).
 *
 * The sources, one per concept:
 *   release.c   deferred releases (work that needs the GIL), fork() and
 *               process exit handling
 *   errors.c    errors carried in task outputs, as Python exceptions
 *   duration.c  Python numbers of seconds (or other units) as nanoseconds
 *   port.c      ports: the per-loop queue, its eventfd, the _Port type
 *   locals.c    task locals: (asyncio loop, contextvars context)
 *   ctask.c     the CTask type: a C task as an asyncio future
 *   local.c     loop-local C tasks: a hosted runtime per asyncio loop,
 *               shared with uvloop's libuv loop or on the loop's own API
 *   await.c     awaiting Python from C: requests, _Waiter, aiob_py_await
 *   shapes.c    short forms: awaitables completed by a callback (promises),
 *               blocking work on the runtime's worker threads
 *   stream_out.c  C producers as Python async iterators (CStream)
 *   stream_in.c   Python async iterators consumed by C tasks (aiob_py_aiter)
 *   source.c    Python source kept in the bridge, compiled when first used
 *   bridge.c    the bridge: init/free, registration with the aiobridge
 *               package, shutdown with a deadline, the atexit hook,
 *               introspection
 * (aiobridge_module.c is the `aiobridge` package's own module, not part of
 * the bridge: it does not include this header.) */
#ifndef AIOBRIDGE_PYTHON_BRIDGE_INTERNAL_H
#define AIOBRIDGE_PYTHON_BRIDGE_INTERNAL_H

#include "aiobridge/embed.h"

#include "internal.h"

#if PY_VERSION_HEX < 0x03090000
#define PyObject_CallNoArgs(f) _PyObject_CallNoArg(f)
#define PyObject_CallOneArg(f, a) PyObject_CallFunctionObjArgs(f, a, NULL)
#endif

/* ---- Items: what crosses to a loop's port ------------------------------ */

enum { ITEM_COMPLETION, ITEM_REQUEST, ITEM_CANCEL, ITEM_STREAM, ITEM_AITER };

typedef struct item {
  aiob__mpsc_node node;
  uint8_t kind;
  /* Padding put to use by the CTask that embeds its completion item (GIL):
   * its state, _asyncio_future_blocking, "exception not yet retrieved",
   * and "the Python object is gone". */
  uint8_t state, blocking, log_exc, dead;
} item;

/* ---- Errors carried in task outputs (errors.c) ------------------------- */

typedef struct py_error {
  PyObject *type; /* borrowed, static or module-held (aiob_py_task_raise) */
  char *msg;
  PyObject *exc; /* owned exception instance (from Python), or NULL */
  /* An errno failure with file names (type NULL): OSError(err, strerror,
   * filename, None, filename2), as Python's own file functions raise. */
  int err;
  char *filename, *filename2; /* or NULL */
} py_error;

/* ---- Ports (port.c) ---------------------------------------------------- */

typedef struct port {
  _Atomic uint32_t refs;
  aiob_py_bridge *b;
  aiob__inbox in; /* items for the loop; closed when the loop goes away */
  int efd;        /* the wake: watched with loop.add_reader */
  unsigned gen;   /* aiob__py_fork_gen when made */
  /* Set by a shutdown that timed out: the next drain fails what is pending
   * on runtimes that were shut (aiob__py_ports_fail_shut). */
  _Atomic int fail_shut;
  /* The loop thread's wait for a C task's next item after it completed
   * the task's await (aiob__py_port_spin; GIL): the adaptive budget in ns,
   * when the last await completed, a drain in progress, and "never spin"
   * (one CPU). */
  uint64_t spin_budget, done_at;
  int draining, no_spin;
  /* Whether to spin at all (core/spin_gate.c), and the items drained, the
   * operations it counts. */
  aiob__spin_gate gate;
  uint64_t items;
  /* The loop thread drains inside an asyncio task's step (GIL): done
   * callbacks of completions are scheduled, not run. */
  int in_step;
} port;

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

/* ---- Module-level bridge (bridge.c) ------------------------------------ */

struct aiob_py_bridge {
  PyObject *ports; /* dict: loop -> Port */
  PyObject *hosts; /* dict: loop -> the hosted runtime of its local tasks */
  /* What a runtime whose shutdown timed out may never finish (GIL): the
   * CTasks whose C task runs (CF_PENDING), and the Python awaitables
   * started for C tasks (request.pyfuture set). */
  struct cfut *pending;
  struct request *awaiting;
  PyObject *shutdown_error; /* aiobridge.ShutdownError */
  PyObject *backend_error;  /* aiobridge.BackendError */
  PyObject *reg;            /* capsule of a bridge_reg (hub, atexit) */
  int exited;               /* the atexit hook stopped the runtime */
  /* Counters (loop threads, GIL held). */
  unsigned long long completions, py_wakes, py_awaits;
  unsigned long long py_spins, py_spin_hits, py_spins_skipped;
  unsigned long long exit_loops_quieted, exit_quiet_timeouts;
  PyObject *get_running_loop;    /* asyncio.events._get_running_loop */
  PyObject *retrieve, *reraise;  /* the runner's helpers (await.c) */
  PyObject *ensure_future;       /* asyncio.ensure_future */
  PyObject *cancelled_error;     /* asyncio.CancelledError */
  PyObject *invalid_state_error; /* asyncio.InvalidStateError */
  PyTypeObject *ctask_type, *port_type, *waiter_type, *runner_type,
      *cstream_type;
  PyObject *s_add_done_callback, *s_cancel, *s_cancelled, *s_add_reader,
      *s_is_closed, *s_call_soon, *s_call_soon_threadsafe, *s_result,
      *s_exception;
  PyObject *kw_context;  /* ("context",) */
  PyObject *aiter_start; /* stream_in.c's pump factory, made on first use */
};

/* ---- Task locals: (asyncio loop, contextvars context) (locals.c) ------- */

/* Set (GIL) before the locals are shared, except an empty context, which
 * is made on first use with the GIL (aiob__py_locals_context); refcounted
 * from any thread. The last reference is released with the GIL
 * (aiob__py_with_gil). */
struct aiob_py_locals {
  _Atomic uint32_t refs;
  uint32_t embedded; /* part of a CTask's memory, freed with it */
  port *port;        /* the loop's queue (referenced) */
  PyObject *loop;    /* owned */
  PyObject *context; /* owned; NULL: an empty snapshot, made when used */
};
typedef aiob_py_locals py_locals;

/* ---- CTask (ctask.c) ----------------------------------------------------
 *
 * The task's locals and its completion item live in the object's memory;
 * loc.refs counts the holders of that memory: the Python object while it
 * is alive, the C task's task-local value (and clones in child tasks and
 * awaits), and the completion in flight. When the Python object dies first
 * its memory outlives it (no longer an object) until the last C holder
 * lets go, and is freed with the GIL. */
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
  const char *name; /* the C task's name, or NULL */
  int local;        /* a loop-local task (local.c) */
  /* Called once the C task's outcome is set, before the done callbacks
   * (GIL); a C stream's way to learn its producer ended without a Python
   * reference to itself. */
  void (*hook)(void *arg);
  void *hook_arg;
  struct cfut *pnext, **pprev; /* in b->pending while CF_PENDING (GIL) */
  item it; /* the completion; its spare bytes hold the fields below */
} cfut;

/* ---- Awaiting Python from C: requests (await.c) ------------------------ */

typedef struct request {
  item it;
  item cancel_it;
  _Atomic uint32_t refs; /* the C leaf + the Python side */
  _Atomic int cancelled;
  aiob_promise *promise; /* completer side */
  PyObject *object;      /* borrowed from the C task's state */
  int is_factory;
  aiob_py_awaitable_fn fn; /* instead of object: makes the awaitable */
  void *fn_arg;
  py_locals *locals; /* referenced */
  aiob_py_result_converter conv;
  PyObject *pyfuture;             /* the running Python future (GIL) */
  aiob_runtime *rt;               /* the C task's runtime (referenced) */
  struct request *pnext, **pprev; /* in b->awaiting while pyfuture (GIL) */
  /* pyfuture is a task that the port's loop made for it (GIL) */
  int on_loop;
} request;

/* ---- Functions shared between the sources ------------------------------
 * Each is documented where it is defined. */

/* release.c */
extern _Atomic unsigned aiob__py_fork_gen;
void aiob__py_fork_init(void);
void aiob__py_with_gil(void (*fn)(void *), void *arg);
void aiob__py_release_orphans(void);
void aiob__py_exit_begin(void);
/* May a thread without the GIL take it (PyGILState_Ensure) now? Not once
 * the interpreter is finalizing: it would stop the thread then, or crash
 * once the thread states are freed. */
bool aiob__py_may_take_gil(void);

/* embed.c */
int aiob__py_main_start(const aiob_main_config *cfg, aiob_py_bridge **b,
                        PyObject **factory);
PyObject *aiob__py_main_run(PyObject *factory, PyObject *main);
int aiob__py_main_finish(aiob_py_bridge *b, PyObject *factory, PyObject *res,
                         int status);

/* source.c */
PyObject *aiob__py_source_fn(const char *source, const char *name);

/* errors.c */
void aiob__py_error_free(void *p);
PyObject *aiob__py_take_exception(void);
int aiob__py_error_output(aiob_output *out, PyObject *type, const char *msg,
                          int err, const char *filename, const char *filename2);
PyObject *aiob__py_exception_for(PyObject *shutdown_error, aiob_output *out,
                                 const char *name);

/* port.c */
extern PyType_Spec aiob__py_port_spec;
void aiob__py_port_ref(port *p);
void aiob__py_port_unref(port *p);
bool aiob__py_port_push(port *p, item *it);
int aiob__py_port_spin(port *p, aiob_runtime *rt);
int aiob__py_port_run_local(port *p, aiob_runtime *rt, int (*fn)(void *),
                            void *arg);
PyObject *aiob__py_weakref_get(PyObject *ref);
pyport *aiob__py_port_for(aiob_py_bridge *b, PyObject *loop, int on_thread);
void aiob__py_close_all_ports(aiob_py_bridge *b);
void aiob__py_ports_fail_shut(aiob_py_bridge *b);
void aiob__py_ports_settle(aiob_py_bridge *b, uint64_t timeout_ns);

/* locals.c */
void aiob__py_locals_clear(py_locals *l);
void aiob__py_locals_move(py_locals *dst, py_locals *src);
void *aiob__py_locals_clone(void *v);
void aiob__py_locals_destroy(void *v);
PyObject *aiob__py_locals_context(py_locals *l);
int aiob__py_context_snapshot(PyObject **out);
int aiob__py_locals_key_get(aiob_local_key *key);
PyObject *aiob__py_running_loop(aiob_py_bridge *b);
int aiob__py_locals_fill(aiob_py_bridge *b, py_locals *l, PyObject *loop,
                         PyObject *context, int on_thread);

/* ctask.c */
extern PyType_Spec aiob__py_ctask_spec;
int aiob__py_ctask_complete(aiob_py_bridge *b, cfut *f, int now);
int aiob__py_ctask_fail_shut(aiob_py_bridge *b, port *p);
void aiob__py_ctask_forget_all(aiob_py_bridge *b);
PyObject *aiob__py_ctask_new(aiob_py_bridge *b, const aiob_task_vtable *vt,
                             void *state, aiob_py_converter conv,
                             const char *name);
bool aiob__py_ctask_done(PyObject *f);
PyObject *aiob__py_convert(aiob_py_converter conv, aiob_output *out,
                           const char *name);

/* local.c */
int aiob__py_local_spawn(aiob_py_bridge *b, PyObject *loop,
                         int (*fn)(aiob_runtime *rt, void *arg), void *arg);
void aiob__py_local_close_all(aiob_py_bridge *b);
/* At interpreter exit (GIL; released while it waits, at most timeout_ns):
 * every loop running local tasks in the asyncio form on another thread
 * drops their timer and fd watches, on that thread, or from here if it is
 * between two runs (local.c). */
void aiob__py_local_quiet_others(aiob_py_bridge *b, uint64_t timeout_ns);
int aiob__py_local_stash(void);
int aiob__py_local_unstash(void);

/* stream_out.c */
extern PyType_Spec aiob__py_cstream_spec;
void aiob__py_stream_wake(item *it);
void aiob__py_stream_drop_wake(item *it);

/* stream_in.c */
void aiob__py_aiter_run(aiob_py_bridge *b, item *it);
void aiob__py_aiter_drop(item *it);

/* await.c */
extern PyType_Spec aiob__py_waiter_spec, aiob__py_runner_spec;
extern PyMethodDef aiob__py_retrieve_def, aiob__py_reraise_def;
void aiob__py_request_unref(request *r);
int aiob__py_request_start(aiob_py_bridge *b, request *r);
void aiob__py_request_cancel(aiob_py_bridge *b, request *r);
void aiob__py_request_cancel_shut(aiob_py_bridge *b, port *p);
void aiob__py_request_forget_all(aiob_py_bridge *b);

/* bridge.c */
PyObject *aiob__py_no_new(PyTypeObject *type, PyObject *args, PyObject *kw);
aiob_runtime *aiob__py_bridge_runtime(aiob_py_bridge *b);

/* How long the interpreter-exit hook waits for the runtime's loop threads
 * before it abandons them (they never touch Python; see bridge.c). */
#define AIOB__PY_EXIT_TIMEOUT_NS (250 * AIOB_MSEC)

#endif /* AIOBRIDGE_PYTHON_BRIDGE_INTERNAL_H */
