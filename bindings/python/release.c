/* Deferred releases, fork() and process exit handling.
 *
 * Python references held for C code may be dropped on a thread without the
 * GIL (a runtime thread, a C task's drop): the release is queued on the
 * orphan list and done by the next thread that holds the GIL and drains it
 * (a port drain, a shutdown). fork() handling lives here because the
 * atfork handlers hold that list's lock across the fork; the generation
 * they bump tells ports made by the parent (port.c) from the child's own.
 * Process exit too: once the interpreter-exit hook ran, only its thread
 * may still run deferred work, and a process that still has abandoned loop
 * threads when it calls exit() leaves without running C destructors. */
#include "bridge_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

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
_Atomic unsigned aiob__py_fork_gen; /* bumped in every child */

static void fork_prepare(void) { pthread_mutex_lock(&orphan_mu); }
static void fork_parent(void) { pthread_mutex_unlock(&orphan_mu); }
static void fork_child(void) {
  pthread_mutex_unlock(&orphan_mu);
  atomic_fetch_add(&aiob__py_fork_gen, 1);
}

/* ---- Process exit --------------------------------------------------------
 *
 * The exit hook (bridge.c) stops the runtime before the interpreter
 * finalizes, but gives up on loop threads that do not stop in time: they
 * are abandoned, and never touch Python. From the hook on, deferred work
 * runs at once only on the hook's thread (the one that finalizes, with the
 * GIL) until the atexit hooks are over; any other thread, and that one
 * afterwards, queues it, as PyGILState_Check cannot be trusted once
 * finalization has torn the thread states down (it then answers 1 on any
 * thread). What is queued then is never run: left to the process's end.
 *
 * A loop thread still running at exit() is a hazard for the C destructors
 * that exit() runs: libuv's joins its threadpool threads, one of which is
 * stuck in the very request that keeps the loop from closing, so the
 * process would never end; and any library the thread still uses may be
 * torn down under it. So if abandoned loop threads still run when this
 * process calls exit(), it leaves with _exit(status) after flushing stdio,
 * from an on_exit handler installed before any runtime existed (handlers
 * installed earlier, and destructors, do not run then). */
static _Atomic int exit_begun;
static pthread_t exit_thread; /* written before exit_begun is set */

void aiob__py_exit_begin(void) {
  exit_thread = pthread_self();
  atomic_store(&exit_begun, 1);
}

/* May this thread run Python code for deferred work? (If it holds the
 * GIL, which the caller checks next.) Once finalization is under way
 * (Py_IsInitialized is 0 from the end of the atexit hooks on), not even
 * the hook's thread: objects released then are left alone, as the
 * interpreter leaves its own. */
static bool may_run_python(void) {
  return !atomic_load(&exit_begun) ||
         (pthread_equal(pthread_self(), exit_thread) && Py_IsInitialized());
}

bool aiob__py_may_take_gil(void) {
#if PY_VERSION_HEX >= 0x030D0000
  return !Py_IsFinalizing();
#else
  return !_Py_IsFinalizing();
#endif
}

#ifdef __GLIBC__
static void exit_without_destructors_if_stuck(int status, void *arg) {
  (void)arg;
  if (aiob_runtime_abandoned_threads() == 0)
    return;
  fflush(NULL);
  _exit(status);
}
#endif

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_register(void) {
  pthread_atfork(fork_prepare, fork_parent, fork_child);
#ifdef __GLIBC__
  on_exit(exit_without_destructors_if_stuck, NULL);
#endif
}

/* Installs the atfork handlers and the exit check, once per process. */
void aiob__py_fork_init(void) { pthread_once(&fork_once, fork_register); }

void aiob__py_with_gil(void (*fn)(void *), void *arg) {
  /* Runtime threads never hold it (and PyGILState_Check answers 1 on any
   * thread once its check is off, e.g. with sub-interpreters). */
  aiob_loop *cur = aiob__current_loop;
  if (!cur && may_run_python() && PyGILState_Check()) {
    fn(arg);
    return;
  }
  /* A hosted loop runs on its asyncio loop's own thread, a Python thread,
   * which may take the GIL (its polls run without it in the shared form):
   * deferred, a release could wait for a drain of a loop that is closing. */
  if (cur && cur->hosted && may_run_python()) {
    PyGILState_STATE g = PyGILState_Ensure();
    fn(arg);
    PyGILState_Release(g);
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

void aiob__py_release_orphans(void) {
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
    aiob__py_with_gil(decref_cb, obj);
}
