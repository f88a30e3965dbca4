/* Deferred releases, and fork() handling.
 *
 * Python references held for C code may be dropped on a thread without the
 * GIL (a runtime thread, a C task's drop): the release is queued on the
 * orphan list and done by the next thread that holds the GIL and drains it
 * (a port drain, a shutdown). fork() handling lives here because the
 * atfork handlers hold that list's lock across the fork; the generation
 * they bump tells ports made by the parent (port.c) from the child's own. */
#include "bridge_internal.h"

#include <stdlib.h>

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

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void fork_register(void) {
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* Installs the atfork handlers, once per process. */
void aiob__py_fork_init(void) { pthread_once(&fork_once, fork_register); }

void aiob__py_with_gil(void (*fn)(void *), void *arg) {
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
