/* Loop-local C tasks: C tasks polled on the asyncio loop's own thread.
 *
 * Each asyncio loop that runs local tasks gets a hosted runtime
 * (core/hosted.c), created on its thread at the first local spawn and kept
 * in the bridge's `hosts` dict under a weak reference to the loop. It runs
 * in one of two forms:
 *
 * - shared: the loop is a uvloop.Loop whose libuv is the very library the
 *   uv backend of this extension uses (same object in memory, same
 *   version). The hosted runtime is the uv backend on uvloop's own
 *   uv_loop_t: timers, fd waits and wakes are libuv handles, and their
 *   callbacks poll C tasks without the GIL.
 * - asyncio: any other loop. The hosted runtime's backend is the loop's
 *   Python API: loop.call_at for the timer, add_reader / add_writer for
 *   fds, call_soon for a wake on the loop's thread and an eventfd watched
 *   with add_reader for wakes from other threads. Polls run in those
 *   callbacks, with the GIL.
 *
 * A task spawned from Python gets its first poll at once
 * (aiob_runtime_hosted_call): a task that is done at once gives an
 * awaitable that is already done, and `await` does not yield.
 *
 * The runtime closes with the loop: the first local spawn puts a close
 * hook on the loop object (an instance attribute `close`), which drops the
 * local tasks and closes every handle before the loop's own close. uvloop
 * takes any open handle's `data` for one of its own objects when it
 * closes, so in shared form that hook is required: a loop that cannot take
 * it (no instance dict) runs the asyncio form. A loop collected without
 * close() has its runtime shut down when the bridge next looks at its
 * hosts, or when the bridge goes. */
#include "bridge_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* Defined by the uv backend when the extension links it (backends/uv):
 * 1 when the libuv of the module at `object` (its path), reporting
 * `version`, is the one the backend uses; else 0 with the reason in why. */
extern int aiob__uv_shareable(const char *object, unsigned version, char *why,
                              size_t n) __attribute__((weak));

/* ---- Interrupts raised where nobody can catch them ---------------------
 *
 * KeyboardInterrupt or SystemExit may come out of Python called by the
 * core's work (a slot calling the loop, a done callback scheduled at a
 * task's end), where only C code is on the stack. They are kept here, on
 * the thread, and raised by the Python callback or call that ran that
 * work, as asyncio lets them out of a handle. */

static _Thread_local PyObject *stash_type, *stash_value, *stash_tb;

/* Takes the current exception if it is KeyboardInterrupt or SystemExit:
 * 1 (kept for aiob__py_local_unstash; a second one is dropped), else 0
 * (left set). GIL. */
int aiob__py_local_stash(void) {
  if (!PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) &&
      !PyErr_ExceptionMatches(PyExc_SystemExit))
    return 0;
  if (stash_type) {
    PyErr_Clear();
    return 1;
  }
  PyErr_Fetch(&stash_type, &stash_value, &stash_tb);
  return 1;
}

/* Raises what aiob__py_local_stash kept: -1 with it set, else 0. GIL. */
int aiob__py_local_unstash(void) {
  if (!stash_type)
    return 0;
  PyErr_Restore(stash_type, stash_value, stash_tb);
  stash_type = stash_value = stash_tb = NULL;
  return -1;
}

/* ---- The asyncio backend ----------------------------------------------- */

/* The hosted runtime of one loop (see "Hosts" below). The asyncio form's
 * backend options point at it: its init reads `loop` and fills `asy`. */
typedef struct host {
  aiob_runtime *rt;
  pthread_t thread;
  int shared;
  PyObject *loop;   /* borrowed, while the runtime is made */
  struct asy *asy;  /* the asyncio form's backend, while open */
  int quiet;        /* exit: its thread made its loop quiet (quiet_mu) */
  unsigned gen;     /* aiob__py_fork_gen when made */
  char reason[256]; /* why the asyncio form ("" when shared) */
} host;

typedef struct asy_io asy_io;

/* One hosted loop on an asyncio loop. Its memory belongs to `self`, a
 * capsule that the Python callbacks it hands to the loop are bound to, so
 * a callback that runs after the loop closed finds `closed` set. */
typedef struct asy {
  aiob_loop *core;
  host *host;
  /* Borrowed: valid while loop_ref is alive, which it is whenever a
   * callback of the loop or a dispatch runs; a loop dropped without
   * close() may be gone by the time the runtime closes (asy_alive). */
  PyObject *loop;
  PyObject *loop_ref; /* weak */
  PyObject *self;     /* the capsule (a reference while open) */
  PyObject *dispatch_cb, *wake_cb, *timer_cb;
  PyObject *timer; /* the armed TimerHandle, or NULL */
  pthread_t thread;
  int efd;     /* wakes from other threads */
  int reader;  /* efd is watched */
  int kicked;  /* a call_soon dispatch is queued (loop thread) */
  int closed;  /* loop_close ran */
  int quiet;   /* exit: nothing is armed on the loop again (asy_go_quiet) */
  asy_io *ios; /* the fd watches, linked */
  PyObject *s_call_soon, *s_call_at, *s_time, *s_cancel, *s_add_reader,
      *s_remove_reader, *s_add_writer, *s_remove_writer;
} asy;

struct asy_io {
  asy *a;
  asy_io *prev, *next;
  PyObject *self; /* its capsule, while watched */
  PyObject *read_cb, *write_cb;
  int fd;
  unsigned events;
  void *token;
  int closed;
};

static void asy_free(PyObject *cap) {
  asy *a = PyCapsule_GetPointer(cap, NULL);
  Py_XDECREF(a->loop_ref);
  free(a);
}

/* The loop is still alive and not closed (GIL): its methods may be
 * called. */
static int asy_alive(asy *a) {
  PyObject *loop = aiob__py_weakref_get(a->loop_ref);
  if (!loop) {
    PyErr_Clear();
    return 0;
  }
  PyObject *c = PyObject_CallMethod(loop, "is_closed", NULL);
  Py_DECREF(loop);
  int alive = c == Py_False;
  Py_XDECREF(c);
  PyErr_Clear();
  return alive;
}

static PyObject *asy_call(asy *a, PyObject *name, PyObject *x, PyObject *y) {
  return PyObject_CallMethodObjArgs(a->loop, name, x, y, NULL);
}

/* A Python error inside a slot, as the slot's code: an OSError's errno
 * (a bad fd: EBADF, EPERM), ValueError (an fd the loop refuses) EBADF,
 * KeyboardInterrupt and SystemExit EINTR (kept to be raised, see above);
 * anything else is reported as unraisable, EIO. */
static int asy_failed(PyObject *where) {
  if (aiob__py_local_stash())
    return AIOB_EINTR;
  int rc = AIOB_EIO;
  if (PyErr_ExceptionMatches(PyExc_OSError)) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *no = value ? PyObject_GetAttrString(value, "errno") : NULL;
    long e = no && PyLong_Check(no) ? PyLong_AsLong(no) : 0;
    Py_XDECREF(no);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
    return e > 0 && e < 4096 ? (int)-e : AIOB_EIO;
  }
  if (PyErr_ExceptionMatches(PyExc_ValueError)) {
    PyErr_Clear();
    return AIOB_EBADF;
  }
  PyErr_WriteUnraisable(where);
  return rc;
}

/* Clears the current exception (the slot goes on), keeping an
 * interrupt. */
static void asy_clear(void) {
  if (!aiob__py_local_stash())
    PyErr_Clear();
}

static void asy_timer_stop(void *p) {
  asy *a = p;
  if (a->timer) {
    PyObject *r = PyObject_CallMethodObjArgs(a->timer, a->s_cancel, NULL);
    if (!r)
      asy_clear();
    Py_XDECREF(r);
    Py_CLEAR(a->timer);
  }
}

/* Runs what is ready, from a callback of the loop: None, or NULL with an
 * interrupt raised meanwhile. */
static PyObject *asy_dispatch_now(asy *a) {
  if (!a->closed)
    aiob_backend_dispatch(a->core);
  if (aiob__py_local_unstash() < 0)
    return NULL;
  Py_RETURN_NONE;
}

static PyObject *asy_dispatch(PyObject *self, PyObject *unused) {
  (void)unused;
  asy *a = PyCapsule_GetPointer(self, NULL);
  a->kicked = 0;
  return asy_dispatch_now(a);
}

static PyObject *asy_wake_ready(PyObject *self, PyObject *unused) {
  (void)unused;
  asy *a = PyCapsule_GetPointer(self, NULL);
  uint64_t v;
  while (read(a->efd, &v, sizeof v) > 0)
    ;
  return asy_dispatch_now(a);
}

static PyObject *asy_timer_fired(PyObject *self, PyObject *unused) {
  (void)unused;
  asy *a = PyCapsule_GetPointer(self, NULL);
  if (a->closed)
    Py_RETURN_NONE;
  Py_CLEAR(a->timer);
  aiob_backend_timer_expired(a->core);
  if (aiob__py_local_unstash() < 0)
    return NULL;
  Py_RETURN_NONE;
}

static PyMethodDef asy_dispatch_def = {"dispatch", asy_dispatch, METH_NOARGS,
                                       NULL};
static PyMethodDef asy_wake_def = {"wake", asy_wake_ready, METH_NOARGS, NULL};
static PyMethodDef asy_timer_def = {"timer", asy_timer_fired, METH_NOARGS,
                                    NULL};

static int asy_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                         void **out) {
  asy *a = calloc(1, sizeof *a);
  if (!a)
    return AIOB_ENOMEM;
  a->core = core;
  a->host = opts->host;
  a->loop = a->host->loop;
  a->loop_ref = PyWeakref_NewRef(a->loop, NULL);
  if (!a->loop_ref) {
    PyErr_Clear();
    free(a);
    return AIOB_EINVAL;
  }
  a->thread = pthread_self();
  a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (a->efd < 0) {
    int rc = -errno;
    Py_DECREF(a->loop_ref);
    free(a);
    return rc;
  }
  a->self = PyCapsule_New(a, NULL, asy_free);
  if (!a->self) {
    close(a->efd);
    Py_DECREF(a->loop_ref);
    free(a);
    PyErr_Clear();
    return AIOB_ENOMEM;
  }
  a->dispatch_cb = PyCFunction_New(&asy_dispatch_def, a->self);
  a->wake_cb = PyCFunction_New(&asy_wake_def, a->self);
  a->timer_cb = PyCFunction_New(&asy_timer_def, a->self);
  a->s_call_soon = PyUnicode_InternFromString("call_soon");
  a->s_call_at = PyUnicode_InternFromString("call_at");
  a->s_time = PyUnicode_InternFromString("time");
  a->s_cancel = PyUnicode_InternFromString("cancel");
  a->s_add_reader = PyUnicode_InternFromString("add_reader");
  a->s_remove_reader = PyUnicode_InternFromString("remove_reader");
  a->s_add_writer = PyUnicode_InternFromString("add_writer");
  a->s_remove_writer = PyUnicode_InternFromString("remove_writer");
  PyObject *fd = PyLong_FromLong(a->efd);
  PyObject *r = NULL;
  if (a->dispatch_cb && a->wake_cb && a->timer_cb && a->s_call_soon &&
      a->s_call_at && a->s_time && a->s_cancel && a->s_add_reader &&
      a->s_remove_reader && a->s_add_writer && a->s_remove_writer && fd)
    r = asy_call(a, a->s_add_reader, fd, a->wake_cb);
  Py_XDECREF(fd);
  int rc = r ? 0 : asy_failed(a->loop);
  if (!r) {
    a->closed = 1;
    close(a->efd);
    Py_XDECREF(a->dispatch_cb);
    Py_XDECREF(a->wake_cb);
    Py_XDECREF(a->timer_cb);
    Py_DECREF(a->self); /* frees a; the names are interned for good */
    return rc;
  }
  Py_DECREF(r);
  a->reader = 1;
  a->host->asy = a;
  *out = a;
  return 0;
}

/* Stops watching the eventfd of wakes from other threads (GIL). An
 * error is left set, for the caller. */
static void asy_unwatch_wakes(asy *a) {
  if (!a->reader)
    return;
  a->reader = 0;
  PyObject *fd = PyLong_FromLong(a->efd);
  PyObject *r = fd ? asy_call(a, a->s_remove_reader, fd, NULL) : NULL;
  Py_XDECREF(r);
  Py_XDECREF(fd);
}

static void asy_loop_close(void *p) {
  asy *a = p;
  PyGILState_STATE g = PyGILState_Ensure();
  a->closed = 1;
  a->host->asy = NULL;
  asy_timer_stop(a); /* (a TimerHandle keeps its loop alive) */
  if (asy_alive(a))
    asy_unwatch_wakes(a);
  PyErr_Clear();
  close(a->efd);
  Py_CLEAR(a->dispatch_cb);
  Py_CLEAR(a->wake_cb);
  Py_CLEAR(a->timer_cb);
  Py_DECREF(a->self); /* a lives on while a queued callback holds it */
  PyGILState_Release(g);
}

static int asy_run(void *p, unsigned flags) {
  (void)p;
  (void)flags;
  return AIOB_ENOTSUP; /* hosted: the asyncio loop runs */
}

static int asy_wake(void *p) {
  asy *a = p;
  if (pthread_equal(a->thread, pthread_self()) && PyGILState_Check()) {
    if (a->kicked || a->closed || a->quiet)
      return 0;
    /* Wakes come from anywhere, a dealloc while an exception unwinds
     * included: that exception is kept aside around the call. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = asy_call(a, a->s_call_soon, a->dispatch_cb, NULL);
    if (r)
      a->kicked = 1;
    else
      asy_clear(); /* a closed loop: the eventfd below */
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
    if (a->kicked)
      return 0;
  }
  uint64_t one = 1;
  if (write(a->efd, &one, sizeof one) < 0 && errno != EAGAIN)
    return -errno;
  return 0;
}

static int asy_timer_start(void *p, uint64_t timeout_ns) {
  asy *a = p;
  asy_timer_stop(a);
  if (a->quiet)
    return 0; /* never fires: its tasks never finish */
  PyObject *now = PyObject_CallMethodObjArgs(a->loop, a->s_time, NULL);
  if (!now)
    return asy_failed(a->loop);
  double at = PyFloat_AsDouble(now) + (double)timeout_ns / 1e9;
  Py_DECREF(now);
  PyObject *when = PyFloat_FromDouble(at);
  a->timer = when ? asy_call(a, a->s_call_at, when, a->timer_cb) : NULL;
  Py_XDECREF(when);
  return a->timer ? 0 : asy_failed(a->loop);
}

static void asy_io_free(PyObject *cap) {
  free(PyCapsule_GetPointer(cap, NULL));
}

static PyObject *asy_io_fired(PyObject *self, unsigned revents) {
  asy_io *io = PyCapsule_GetPointer(self, NULL);
  if (!io->closed && !io->a->closed)
    aiob_backend_io_ready(io->token, revents);
  if (aiob__py_local_unstash() < 0)
    return NULL;
  Py_RETURN_NONE;
}

static PyObject *asy_io_readable(PyObject *self, PyObject *unused) {
  (void)unused;
  return asy_io_fired(self, AIOB_READABLE);
}

static PyObject *asy_io_writable(PyObject *self, PyObject *unused) {
  (void)unused;
  return asy_io_fired(self, AIOB_WRITABLE);
}

static PyMethodDef asy_read_def = {"readable", asy_io_readable, METH_NOARGS,
                                   NULL};
static PyMethodDef asy_write_def = {"writable", asy_io_writable, METH_NOARGS,
                                    NULL};

/* Watches io's fd for `events`, from what it watches now (nothing once
 * the loop went quiet). */
static int asy_io_set(asy_io *io, unsigned events) {
  asy *a = io->a;
  if (a->quiet)
    events = 0;
  PyObject *fd = PyLong_FromLong(io->fd);
  if (!fd)
    return asy_failed(a->loop);
  int rc = 0;
  struct {
    unsigned bit;
    PyObject *add, *remove, *cb;
  } dirs[2] = {
      {AIOB_READABLE, a->s_add_reader, a->s_remove_reader, io->read_cb},
      {AIOB_WRITABLE, a->s_add_writer, a->s_remove_writer, io->write_cb},
  };
  for (int i = 0; i < 2 && rc == 0; i++) {
    unsigned bit = dirs[i].bit;
    if ((events & bit) == (io->events & bit))
      continue;
    PyObject *r = events & bit ? asy_call(a, dirs[i].add, fd, dirs[i].cb)
                               : asy_call(a, dirs[i].remove, fd, NULL);
    if (!r)
      rc = asy_failed(a->loop);
    else
      io->events ^= bit;
    Py_XDECREF(r);
  }
  Py_DECREF(fd);
  return rc;
}

static int asy_io_start(void *p, int fd, unsigned events, void *token,
                        void **out) {
  asy *a = p;
  asy_io *io = calloc(1, sizeof *io);
  if (!io)
    return AIOB_ENOMEM;
  io->a = a;
  io->fd = fd;
  io->token = token;
  io->self = PyCapsule_New(io, NULL, asy_io_free);
  if (!io->self) {
    free(io);
    PyErr_Clear();
    return AIOB_ENOMEM;
  }
  io->read_cb = PyCFunction_New(&asy_read_def, io->self);
  io->write_cb = PyCFunction_New(&asy_write_def, io->self);
  int rc = io->read_cb && io->write_cb ? asy_io_set(io, events) : AIOB_ENOMEM;
  if (rc < 0) {
    asy_io_set(io, 0);
    asy_clear();
    Py_XDECREF(io->read_cb);
    Py_XDECREF(io->write_cb);
    Py_DECREF(io->self);
    return rc;
  }
  io->next = a->ios;
  if (a->ios)
    a->ios->prev = io;
  a->ios = io;
  *out = io;
  return 0;
}

static int asy_io_modify(void *p, void *handle, unsigned events) {
  (void)p;
  return asy_io_set(handle, events);
}

static void asy_io_stop(void *p, void *handle) {
  asy *a = p;
  asy_io *io = handle;
  io->closed = 1;
  if (io->prev)
    io->prev->next = io->next;
  else
    a->ios = io->next;
  if (io->next)
    io->next->prev = io->prev;
  if (asy_alive(a) && asy_io_set(io, 0) < 0)
    PyErr_Clear();
  Py_CLEAR(io->read_cb);
  Py_CLEAR(io->write_cb);
  Py_DECREF(io->self);
}

/* At interpreter exit, on the loop's thread (GIL): the loop drops this
 * runtime's timer, fd watches and wake reader, and none is armed again, so
 * no callback of aiobridge's is left to come due on the loop once the
 * interpreter has finalized (see aiob__py_local_quiet_others). */
static void asy_go_quiet(asy *a) {
  if (a->closed || a->quiet)
    return;
  a->quiet = 1;
  asy_timer_stop(a);
  for (asy_io *io = a->ios; io; io = io->next)
    if (asy_io_set(io, 0) < 0)
      asy_clear();
  asy_unwatch_wakes(a);
  if (PyErr_Occurred())
    asy_clear();
}

static void *asy_native(void *p) { return ((asy *)p)->loop; }

static const aiob_backend asyncio_backend = {
    .abi_major = AIOB_BACKEND_ABI_MAJOR,
    .size = sizeof(aiob_backend),
    .name = "asyncio",
    .loop_init = asy_loop_init,
    .loop_close = asy_loop_close,
    .run = asy_run,
    .wake = asy_wake,
    .timer_start = asy_timer_start,
    .timer_stop = asy_timer_stop,
    .io_start = asy_io_start,
    .io_modify = asy_io_modify,
    .io_stop = asy_io_stop,
    .native = asy_native,
};

/* ---- Hosts: the hosted runtime of each loop ---------------------------- */

static void host_close(host *h) {
  if (!h->rt)
    return;
  aiob_runtime *rt = h->rt;
  h->rt = NULL;
  /* With the GIL: the asyncio form's slots call the loop. A blocking job
   * of a local task is waited for, so its fn must not need the GIL. An
   * exception already set (the caller's) is kept aside meanwhile. */
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  aiob_runtime_shutdown(rt);
  aiob_runtime_free(rt);
  PyErr_Clear();
  PyErr_Restore(type, value, tb);
}

static void host_free(PyObject *cap) {
  host *h = PyCapsule_GetPointer(cap, NULL);
  host_close(h);
  free(h);
}

/* Shuts down the hosts of loops that are gone or closed (GIL). */
static void prune_hosts(aiob_py_bridge *b) {
  PyObject *items = PyDict_Items(b->hosts);
  for (Py_ssize_t i = 0; items && i < PyList_GET_SIZE(items); i++) {
    PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
    PyObject *loop = aiob__py_weakref_get(key);
    PyObject *c = loop ? PyObject_CallMethod(loop, "is_closed", NULL) : NULL;
    if (c != Py_False) {
      PyObject *cap = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
      host_close(PyCapsule_GetPointer(cap, NULL));
      PyDict_DelItem(b->hosts, key);
    }
    Py_XDECREF(c);
    Py_XDECREF(loop);
    PyErr_Clear();
  }
  Py_XDECREF(items);
  PyErr_Clear();
}

/* loop.close as an instance attribute, bound to (host capsule, loop): the
 * host goes first. It holds the loop: a cycle through the loop's __dict__
 * that the collector breaks, and the loop's __del__ finds it whole. */
static PyObject *host_close_hook(PyObject *self, PyObject *unused) {
  (void)unused;
  host *h = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), NULL);
  PyObject *loop = PyTuple_GET_ITEM(self, 1);
  Py_INCREF(loop);
  PyObject *running = PyObject_CallMethod(loop, "is_running", NULL);
  if (running != Py_False) { /* the loop's own close raises for this */
    Py_XDECREF(running);
    PyErr_Clear();
  } else {
    Py_DECREF(running);
    host_close(h);
    PyObject *d = PyObject_GenericGetDict(loop, NULL);
    if (d && PyDict_GetItemString(d, "close") &&
        PyDict_DelItemString(d, "close") < 0)
      PyErr_Clear();
    Py_XDECREF(d);
    PyErr_Clear();
  }
  PyObject *close = PyObject_GetAttrString((PyObject *)Py_TYPE(loop), "close");
  PyObject *r = close ? PyObject_CallOneArg(close, loop) : NULL;
  Py_XDECREF(close);
  Py_DECREF(loop);
  return r;
}

static PyMethodDef host_close_def = {"close", host_close_hook, METH_NOARGS,
                                     "Closes the loop-local C tasks of "
                                     "aiobridge, then the loop."};

/* Installs the close hook; 0, or -1 (no exception) when the loop takes no
 * instance attribute. */
static int hook_close(PyObject *loop, PyObject *cap) {
  PyObject *self = PyTuple_Pack(2, cap, loop);
  PyObject *fn = self ? PyCFunction_New(&host_close_def, self) : NULL;
  Py_XDECREF(self);
  if (!fn || PyObject_SetAttrString(loop, "close", fn) < 0) {
    Py_XDECREF(fn);
    PyErr_Clear();
    return -1;
  }
  Py_DECREF(fn);
  return 0;
}

/* uvloop's uv_loop_t if `loop` can be shared with the uv backend of this
 * extension, else NULL with the reason in h->reason (GIL). */
static void *shareable(aiob_py_bridge *b, PyObject *loop, host *h) {
  const char *env = getenv("AIOBRIDGE_LOCAL_SHARED");
  if (env && strcmp(env, "0") == 0) {
    snprintf(h->reason, sizeof h->reason, "AIOBRIDGE_LOCAL_SHARED=0");
    return NULL;
  }
  PyObject *mods = PyImport_GetModuleDict();
  PyObject *uvl = mods ? PyDict_GetItemString(mods, "uvloop.loop") : NULL;
  PyObject *cls = uvl ? PyObject_GetAttrString(uvl, "Loop") : NULL;
  int is = cls ? PyObject_IsInstance(loop, cls) : 0;
  Py_XDECREF(cls);
  PyErr_Clear();
  if (is != 1) {
    snprintf(h->reason, sizeof h->reason, "the loop is not a uvloop.Loop");
    return NULL;
  }
  aiob_runtime *rt = aiob__py_bridge_runtime(b);
  if (!rt) {
    PyErr_Clear();
    snprintf(h->reason, sizeof h->reason, "the runtime did not start");
    return NULL;
  }
  int uv = strcmp(aiob_runtime_backend_name(rt), "uv") == 0;
  aiob_runtime_release(rt);
  if (!uv || !aiob__uv_shareable) {
    snprintf(h->reason, sizeof h->reason,
             "this extension's runtime does not use the uv backend");
    return NULL;
  }
  PyObject *ver = PyObject_CallMethod(uvl, "libuv_get_version", NULL);
  PyObject *cap = PyObject_CallMethod(uvl, "libuv_get_loop_t_ptr", "O", loop);
  PyObject *file = PyObject_GetAttrString(uvl, "__file__");
  void *uvloop_t =
      cap && PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, NULL) : NULL;
  const char *path = file ? PyUnicode_AsUTF8(file) : NULL;
  unsigned long v = ver ? PyLong_AsUnsignedLong(ver) : 0;
  PyErr_Clear();
  if (!uvloop_t || !path || !ver) {
    snprintf(h->reason, sizeof h->reason,
             "uvloop does not expose its uv_loop_t and libuv version");
    uvloop_t = NULL;
  } else if (!aiob__uv_shareable(path, (unsigned)v, h->reason,
                                 sizeof h->reason)) {
    uvloop_t = NULL;
  }
  Py_XDECREF(ver);
  Py_XDECREF(cap);
  Py_XDECREF(file);
  return uvloop_t;
}

/* The host of the running `loop`, made on first use (borrowed; GIL; on
 * the loop's thread). NULL with an exception set. */
static host *host_for(aiob_py_bridge *b, PyObject *loop) {
  PyObject *ref = PyWeakref_NewRef(loop, NULL);
  if (!ref)
    return NULL;
  PyObject *cap = PyDict_GetItemWithError(b->hosts, ref);
  if (cap || PyErr_Occurred()) {
    Py_DECREF(ref);
    host *h = cap ? PyCapsule_GetPointer(cap, NULL) : NULL;
    if (h && (!h->rt || (h->asy && h->asy->quiet))) {
      PyErr_SetString(b->shutdown_error,
                      h->rt
                          ? "aiobridge: the interpreter is exiting"
                          : "aiobridge: the loop's local tasks were shut down");
      return NULL;
    }
    if (h && !pthread_equal(h->thread, pthread_self())) {
      PyErr_SetString(PyExc_RuntimeError,
                      "aiobridge: loop-local C tasks of this loop run on the "
                      "thread that first ran one");
      return NULL;
    }
    return h;
  }
  prune_hosts(b);
  host *h = calloc(1, sizeof *h);
  if (!h) {
    Py_DECREF(ref);
    PyErr_NoMemory();
    return NULL;
  }
  h->thread = pthread_self();
  h->loop = loop;
  h->gen = atomic_load(&aiob__py_fork_gen);
  cap = PyCapsule_New(h, NULL, host_free);
  if (!cap) {
    Py_DECREF(ref);
    free(h);
    return NULL;
  }
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  void *uvl = shareable(b, loop, h);
  int hooked = hook_close(loop, cap) == 0;
  if (uvl && hooked) {
    cfg.backend = "uv";
    cfg.backend_options.host = uvl;
    h->shared = 1;
  } else {
    if (uvl)
      snprintf(h->reason, sizeof h->reason,
               "the loop takes no close hook (no instance attributes)");
    cfg.backend_table = &asyncio_backend;
    cfg.backend_options.host = h;
  }
  int rc = aiob_runtime_new_hosted(&h->rt, &cfg);
  if (rc < 0 && h->shared) { /* fall back to the asyncio form */
    snprintf(h->reason, sizeof h->reason,
             "libuv refused the shared loop's handles: %s", aiob_strerror(rc));
    h->shared = 0;
    cfg.backend = NULL;
    cfg.backend_table = &asyncio_backend;
    cfg.backend_options.host = h;
    rc = aiob_runtime_new_hosted(&h->rt, &cfg);
  }
  if (rc < 0 || PyDict_SetItem(b->hosts, ref, cap) < 0) {
    if (rc < 0 && !PyErr_Occurred() && aiob__py_local_unstash() == 0)
      PyErr_Format(PyExc_OSError, "aiobridge: cannot run loop-local tasks: %s",
                   aiob_strerror(rc));
    if (hooked) {
      PyObject *d = PyObject_GenericGetDict(loop, NULL);
      if (d && PyDict_DelItemString(d, "close") < 0)
        PyErr_Clear();
      Py_XDECREF(d);
    }
    Py_DECREF(cap);
    Py_DECREF(ref);
    return NULL;
  }
  Py_DECREF(cap); /* the dict holds it */
  Py_DECREF(ref);
  return h;
}

/* ---- Spawning ----------------------------------------------------------- */

struct spawn_call {
  int (*fn)(aiob_runtime *rt, void *arg);
  void *arg;
  aiob_runtime *rt;
};

static int spawn_trampoline(void *arg) {
  struct spawn_call *c = arg;
  return c->fn(c->rt, c->arg);
}

int aiob__py_local_spawn(aiob_py_bridge *b, PyObject *loop,
                         int (*fn)(aiob_runtime *rt, void *arg), void *arg) {
  host *h = host_for(b, loop);
  if (!h)
    return -1;
  struct spawn_call c = {fn, arg, h->rt};
  int rc = aiob_runtime_hosted_call(h->rt, spawn_trampoline, &c);
  if (rc < 0 && !PyErr_Occurred() && aiob__py_local_unstash() == 0) {
    if (rc == AIOB_ESHUTDOWN)
      PyErr_SetString(b->shutdown_error,
                      "aiobridge: the loop's local tasks were shut down");
    else
      PyErr_Format(PyExc_OSError, "aiobridge: cannot spawn: %s",
                   aiob_strerror(rc));
  }
  return rc < 0 ? -1 : 0;
}

void aiob__py_local_close_all(aiob_py_bridge *b) {
  if (!b->hosts)
    return;
  /* A loop's close hook may keep a host's capsule: close them here. The
   * bridge may go with an exception set (a failed init): it stays. */
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *caps = PyDict_Values(b->hosts);
  for (Py_ssize_t i = 0; caps && i < PyList_GET_SIZE(caps); i++)
    host_close(PyCapsule_GetPointer(PyList_GET_ITEM(caps, i), NULL));
  Py_XDECREF(caps);
  PyDict_Clear(b->hosts);
  PyErr_Clear(); /* (out of memory for the list: nothing else to do) */
  PyErr_Restore(type, value, tb);
}

/* ---- Interpreter exit ---------------------------------------------------
 *
 * A loop still running on another thread at exit (a daemon thread's) goes
 * on until the interpreter stops that thread, which it does when the
 * thread next takes the GIL. In the asyncio form this runtime's timer and
 * fd watches are that loop's own callbacks, and uvloop enters each with
 * PyGILState_Ensure: one that comes due once finalization has freed the
 * thread states crashes the process. So at exit each such loop drops them
 * before the interpreter finalizes: on the thread that runs it, or, if
 * another thread runs it now and then but not at that moment, from the
 * hook. Its local tasks then never finish, as the runtime's tasks on such
 * loops never do (bridge.c). The shared form's callbacks are libuv's,
 * without the GIL, and they never enter Python once finalization begins
 * (aiob__py_may_take_gil). */

static pthread_mutex_t quiet_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t quiet_cv;
static pthread_once_t quiet_once = PTHREAD_ONCE_INIT;

static void quiet_init(void) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&quiet_cv, &ca);
  pthread_condattr_destroy(&ca);
}

static PyObject *host_quiet_done(PyObject *cap, PyObject *unused) {
  (void)unused;
  host *h = PyCapsule_GetPointer(cap, NULL);
  pthread_mutex_lock(&quiet_mu);
  h->quiet = 1;
  pthread_cond_broadcast(&quiet_cv);
  pthread_mutex_unlock(&quiet_mu);
  Py_RETURN_NONE;
}

static PyMethodDef host_quiet_done_def = {"quiet_done", host_quiet_done,
                                          METH_NOARGS, NULL};

/* call_soon_threadsafe'd by aiob__py_local_quiet_others: on the host's
 * thread, GIL. Dropping a TimerHandle or the last reader of an fd closes
 * a uvloop handle, whose close callback (it takes the GIL too) runs at the
 * end of this turn of the loop: the hook is told once the next turn has
 * begun, with those behind it. */
static PyObject *host_go_quiet(PyObject *cap, PyObject *unused) {
  (void)unused;
  host *h = PyCapsule_GetPointer(cap, NULL);
  PyObject *r = NULL;
  if (h->asy) {
    asy_go_quiet(h->asy);
    PyObject *fn = PyCFunction_New(&host_quiet_done_def, cap);
    r = fn ? asy_call(h->asy, h->asy->s_call_soon, fn, NULL) : NULL;
    Py_XDECREF(fn);
    if (!r)
      asy_clear();
  }
  if (!r)
    Py_XDECREF(host_quiet_done(cap, NULL));
  Py_XDECREF(r);
  if (aiob__py_local_unstash() < 0)
    return NULL;
  Py_RETURN_NONE;
}

static PyMethodDef host_quiet_def = {"quiet", host_go_quiet, METH_NOARGS, NULL};

/* How many of hs have not gone quiet yet (quiet_mu). */
static size_t loud(host **hs, size_t n) {
  size_t left = 0;
  for (size_t i = 0; i < n; i++)
    left += !hs[i]->quiet;
  return left;
}

/* Which way a host's loop goes quiet at exit. */
enum quiet_way { QUIET_NONE, QUIET_ASK, QUIET_HERE };

static enum quiet_way quiet_way_of(host *h, PyObject *loop, PyObject *mine) {
  /* A host inherited from the parent of a fork is left alone: its loop is
   * the parent's (its epoll set too), and no thread runs it here. */
  if (!h->rt || !h->asy || h->asy->closed ||
      h->gen != atomic_load(&aiob__py_fork_gen) || !loop || loop == mine)
    return QUIET_NONE;
  PyObject *running = PyObject_CallMethod(loop, "is_running", NULL);
  enum quiet_way way = QUIET_NONE;
  if (running == Py_True)
    way = QUIET_ASK; /* by the thread that runs it */
  else if (running == Py_False && !pthread_equal(h->thread, pthread_self()))
    way = QUIET_HERE; /* another thread's, between two runs: nobody runs it
                         while this thread holds the GIL */
  Py_XDECREF(running);
  return way;
}

void aiob__py_local_quiet_others(aiob_py_bridge *b, uint64_t timeout_ns) {
  if (!b->hosts)
    return;
  pthread_once(&quiet_once, quiet_init);
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *mine = aiob__py_running_loop(b); /* (an embedder's) */
  PyErr_Clear();
  PyObject *items = PyDict_Items(b->hosts);
  Py_ssize_t n = items ? PyList_GET_SIZE(items) : 0;
  PyObject *asked = PyList_New(0); /* the capsules of hs, alive meanwhile */
  host **hs = n ? calloc((size_t)n, sizeof *hs) : NULL;
  size_t k = 0;
  for (Py_ssize_t i = 0; asked && hs && i < n; i++) {
    PyObject *pair = PyList_GET_ITEM(items, i);
    PyObject *cap = PyTuple_GET_ITEM(pair, 1);
    host *h = PyCapsule_GetPointer(cap, NULL);
    PyObject *loop = aiob__py_weakref_get(PyTuple_GET_ITEM(pair, 0));
    PyErr_Clear();
    enum quiet_way way = quiet_way_of(h, loop, mine);
    if (way == QUIET_HERE) {
      asy_go_quiet(h->asy);
      b->exit_loops_quieted++;
    } else if (way == QUIET_ASK) {
      PyObject *fn = PyCFunction_New(&host_quiet_def, cap);
      PyObject *r =
          fn ? PyObject_CallMethod(loop, "call_soon_threadsafe", "O", fn)
             : NULL;
      if (r && PyList_Append(asked, cap) == 0)
        hs[k++] = h;
      Py_XDECREF(r);
      Py_XDECREF(fn);
    }
    Py_XDECREF(loop);
    PyErr_Clear();
  }
  Py_XDECREF(mine);
  if (k) {
    size_t late;
    Py_BEGIN_ALLOW_THREADS;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    uint64_t ns = (uint64_t)until.tv_nsec + timeout_ns;
    until.tv_sec += (time_t)(ns / AIOB_SEC);
    until.tv_nsec = (long)(ns % AIOB_SEC);
    pthread_mutex_lock(&quiet_mu);
    while (loud(hs, k) &&
           pthread_cond_timedwait(&quiet_cv, &quiet_mu, &until) != ETIMEDOUT)
      ;
    late = loud(hs, k);
    pthread_mutex_unlock(&quiet_mu);
    Py_END_ALLOW_THREADS;
    b->exit_loops_quieted += k - late;
    b->exit_quiet_timeouts += late;
  }
  free(hs);
  Py_XDECREF(asked);
  Py_XDECREF(items);
  PyErr_Clear();
  PyErr_Restore(type, value, tb);
}

PyObject *aiob_py_local_info(aiob_py_bridge *b) {
  PyObject *loop = aiob__py_running_loop(b);
  if (!loop) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError, "no running event loop");
    return NULL;
  }
  PyObject *ref = PyWeakref_NewRef(loop, NULL);
  Py_DECREF(loop);
  PyObject *cap = ref ? PyDict_GetItemWithError(b->hosts, ref) : NULL;
  Py_XDECREF(ref);
  if (!cap && PyErr_Occurred())
    return NULL;
  host *h = cap ? PyCapsule_GetPointer(cap, NULL) : NULL;
  if (!h || !h->rt)
    return Py_BuildValue("{s:O,s:O,s:n}", "mode", Py_None, "reason", Py_None,
                         "tasks_live", (Py_ssize_t)0);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(h->rt, &st);
  return Py_BuildValue("{s:s,s:s,s:K}", "mode",
                       h->shared ? "shared" : "asyncio", "reason",
                       h->shared ? NULL : h->reason, "tasks_live",
                       (unsigned long long)st.tasks_live);
}
