/* Ports: how C reaches an asyncio loop without the GIL.
 *
 * One port per asyncio loop that C tasks report to: an inbox of items
 * (completions, await requests, their cancellations) and an eventfd the
 * loop watches with add_reader. Pushers on any thread write the eventfd
 * once per batch; the loop drains the inbox on its own thread, with the
 * GIL, in bounded chunks. The C side (port) is refcounted by everything
 * that may push to it; the Python side (the _Port type) is what the loop's
 * selector and the bridge's ports dict hold. */
#include "bridge_internal.h"

#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_CHUNK 4096

/* The longest the loop thread waits for a C task's next item after it
 * completed the task's await (aiob__py_port_spin), if the runtime spins
 * at least that long itself: a runtime thread that is spinning answers
 * in a microsecond or two, one that blocks takes a thread wake-up. */
#define SPIN_MAX_NS (20 * AIOB_USEC)

/* Made before a fork() that made this process: the parent's (see
 * release.c). */
static bool port_inherited(port *p) {
  return p->gen != atomic_load(&aiob__py_fork_gen);
}

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
  p->gen = atomic_load(&aiob__py_fork_gen);
  /* With one CPU the loop thread's spin would only keep the runtime thread
   * from answering. */
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 1)
    p->spin_budget = SPIN_MAX_NS;
  else
    p->no_spin = 1;
  return p;
}

void aiob__py_port_ref(port *p) { atomic_fetch_add(&p->refs, 1); }

void aiob__py_port_unref(port *p) {
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
bool aiob__py_port_push(port *p, item *it) {
  return aiob__inbox_push(&p->in, &it->node, port_signal, p);
}

/* A new reference to the weakref's referent, or NULL if it is gone. */
PyObject *aiob__py_weakref_get(PyObject *ref) {
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

/* ---- The Python side of a port ----------------------------------------- */

/* Calls loop.<name>(args...) if the loop is alive; NULL with an exception
 * set otherwise. */
static PyObject *pyport_call(pyport *pp, PyObject *name, PyObject *arg1,
                             PyObject *arg2) {
  PyObject *loop = aiob__py_weakref_get(pp->loop_ref);
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
static int dispatch(port *p, item *it) {
  aiob_py_bridge *b = p->b;
  int rc = 0;
  switch (it->kind) {
  case ITEM_COMPLETION: {
    cfut *f = AIOB__CONTAINER_OF(it, cfut, it);
    /* Inside a task's step, a done callback that wakes another task
     * cannot run there: they all go to call_soon. */
    rc = aiob__py_ctask_complete(b, f, !p->in_step);
    aiob__py_locals_destroy(&f->loc); /* the completion's reference */
    break;
  }
  case ITEM_REQUEST:
    rc = aiob__py_request_start(b, AIOB__CONTAINER_OF(it, request, it));
    break;
  case ITEM_CANCEL:
    aiob__py_request_cancel(b, AIOB__CONTAINER_OF(it, request, cancel_it));
    break;
  case ITEM_STREAM:
    aiob__py_stream_wake(it);
    break;
  case ITEM_AITER:
    aiob__py_aiter_run(b, it);
    break;
  }
  return rc;
}

/* Dispatches up to DRAIN_CHUNK items (loop thread, GIL). Sets *done to
 * their number; -1 as dispatch. */
static int drain_items(port *p, int *done) {
  int rc = 0;
  aiob__mpsc_node *node;
  p->draining = 1;
  while (rc == 0 && *done < DRAIN_CHUNK &&
         (node = aiob__mpsc_pop(&p->in.queue))) {
    rc = dispatch(p, AIOB__CONTAINER_OF(node, item, node));
    (*done)++;
    p->items++;
  }
  p->draining = 0;
  return rc;
}

/* Drains up to DRAIN_CHUNK items; reschedules itself if more remain, or if
 * a done callback lets SystemExit / KeyboardInterrupt out (which then
 * leaves the loop, as from any handle). */
static PyObject *pyport_drain(PyObject *self, PyObject *unused) {
  (void)unused;
  pyport *pp = (pyport *)self;
  port *p = pp->port;
  /* Inherited: the parent's eventfd. Closed: the bridge may be gone, and
   * only the wake is taken (left unread, it would keep the loop waking). */
  if (port_inherited(p))
    Py_RETURN_NONE;
  uint64_t v;
  bool woken = read(p->efd, &v, sizeof v) > 0;
  if (aiob__inbox_closed(&p->in))
    Py_RETURN_NONE;
  if (woken) {
    pp->b->py_wakes++; /* not a re-scheduled drain */
    /* Woken soon after an await completed: a spin of twice that long
     * would have caught it. */
    uint64_t late = p->done_at ? aiob_now_ns() - p->done_at : SPIN_MAX_NS;
    if (late < SPIN_MAX_NS / 2 && p->spin_budget < 2 * late)
      p->spin_budget = 2 * late;
    p->done_at = 0;
  }
  aiob__inbox_rearm(&p->in);
  Py_INCREF(self);
  int done = 0, rc = drain_items(p, &done);
  /* After the completions that did arrive: what a runtime abandoned by a
   * shutdown will never finish. */
  if (rc == 0 && atomic_exchange(&p->fail_shut, 0)) {
    aiob__py_request_cancel_shut(pp->b, p);
    if ((rc = aiob__py_ctask_fail_shut(pp->b, p)) < 0)
      atomic_store(&p->fail_shut, 1); /* the rest in the next drain */
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
  aiob__py_release_orphans();
  Py_DECREF(self);
  PyErr_Restore(type, value, tb);
  if (rc < 0)
    return NULL;
  Py_RETURN_NONE;
}

/* After a waiter completed the await of a C task on runtime rt, from a
 * plain callback of port p's loop (its thread, GIL, no drain running): the
 * task usually sends its next item within a microsecond or two, and taking
 * it here saves the loop a blocking select() ended by an eventfd write
 * (a thread wake-up) and an iteration. So this spins, with the inbox
 * marked signalled so that pushers skip the eventfd, until an item arrives
 * or an adaptive budget runs out (at most SPIN_MAX_NS and the runtime's
 * own spin; halved by each miss, raised to twice the delay of an item
 * that woke the loop soon after an await completed), and drains what
 * came. -1: SystemExit or KeyboardInterrupt is set (as from the drain). */
int aiob__py_port_spin(port *p, aiob_runtime *rt) {
  /* A hosted runtime's tasks may run on this very thread. */
  if (p->draining || p->no_spin || rt->hosted || aiob__inbox_closed(&p->in) ||
      port_inherited(p))
    return 0;
  uint64_t start = aiob_now_ns(), budget = p->spin_budget,
           max = (uint64_t)aiob_runtime_spin_us(rt) * AIOB_USEC;
  p->done_at = start;
  if (budget > max)
    budget = max;
  /* Not if the loop thread waits for a CPU, unless a trial found the wait
   * to drain half as many items again per second (core/spin_gate.c). */
  if (budget && !aiob__spin_gate_ask(&p->gate, start, p->items)) {
    p->b->py_spins_skipped++;
    return 0;
  }
  /* Already signalled: a drain is owed, the loop comes back at once. */
  if (!budget || atomic_exchange(&p->in.signalled, 1))
    return 0;
  p->b->py_spins++;
  bool hit = false;
  for (uint64_t now = start; now - start < budget; now = aiob_now_ns()) {
    if ((hit = !aiob__mpsc_empty(&p->in.queue)))
      break;
    aiob__cpu_relax();
  }
  int rc = 0, done = 0;
  if (hit) {
    p->b->py_spin_hits++;
    p->done_at = 0;
    rc = drain_items(p, &done);
  } else if ((p->spin_budget = budget / 2) < AIOB_USEC) {
    p->spin_budget = 0; /* the C side does not answer that fast */
  }
  /* Re-armed: a push from now on wakes the loop; one that came meanwhile
   * and was left (a chunk's worth, or after SystemExit) is owed a wake. */
  aiob__inbox_rearm(&p->in);
  atomic_thread_fence(memory_order_seq_cst);
  if (!aiob__mpsc_empty(&p->in.queue) && !atomic_exchange(&p->in.signalled, 1))
    port_signal(p);
  if (done) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    aiob__py_release_orphans();
    PyErr_Restore(type, value, tb);
  }
  return rc;
}

/* For a loop-local C task, whose hosted runtime rt runs on this thread:
 * runs fn(arg) (which completes the task's await) inside a dispatch of rt
 * (aiob_runtime_hosted_call), from a plain callback of port p's loop
 * (GIL), so the task runs at once and the next item it sends is handled
 * here, with the inbox marked signalled meanwhile so that it wakes
 * nothing. fn runs alone when rt cannot be run here. -1: SystemExit or
 * KeyboardInterrupt is set. */
int aiob__py_port_run_local(port *p, aiob_runtime *rt, int (*fn)(void *),
                            void *arg) {
  bool owed = p->draining || aiob__inbox_closed(&p->in) || port_inherited(p) ||
              atomic_exchange(&p->in.signalled, 1);
  int rc = aiob_runtime_hosted_call(rt, fn, arg);
  if (rc == AIOB_EPERM || rc == AIOB_EINVAL || rc == AIOB_ESHUTDOWN)
    fn(arg);
  int done = 0;
  rc = 0;
  if (!owed) {
    if (!aiob__mpsc_empty(&p->in.queue))
      rc = drain_items(p, &done);
    aiob__inbox_rearm(&p->in);
    atomic_thread_fence(memory_order_seq_cst);
    if (!aiob__mpsc_empty(&p->in.queue) &&
        !atomic_exchange(&p->in.signalled, 1))
      port_signal(p);
  }
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (done)
    aiob__py_release_orphans();
  PyErr_Restore(type, value, tb);
  if (rc == 0 && aiob__py_local_unstash() < 0)
    rc = -1;
  return rc;
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
      aiob__py_locals_destroy(&AIOB__CONTAINER_OF(it, cfut, it)->loc);
    } else if (it->kind == ITEM_REQUEST) {
      request *r = AIOB__CONTAINER_OF(it, request, it);
      atomic_store(&r->cancelled, 1);
      aiob__py_request_unref(r);
    } else if (it->kind == ITEM_STREAM) {
      aiob__py_stream_drop_wake(it);
    } else if (it->kind == ITEM_AITER) {
      aiob__py_aiter_drop(it);
    } else {
      aiob__py_request_unref(AIOB__CONTAINER_OF(it, request, cancel_it));
    }
  }
}

static void pyport_dealloc(PyObject *self) {
  pyport *pp = (pyport *)self;
  PyTypeObject *tp = Py_TYPE(self);
  pyport_close(pp);
  Py_CLEAR(pp->loop_ref);
  if (pp->port)
    aiob__py_port_unref(pp->port);
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
    {Py_tp_new, aiob__py_no_new},
    {Py_tp_dealloc, pyport_dealloc},
    {Py_tp_methods, pyport_methods},
    {0, NULL},
};

PyType_Spec aiob__py_port_spec = {
    .name = "aiobridge._Port",
    .basicsize = sizeof(pyport),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = pyport_slots,
};

/* Forgets ports of closed or collected loops (their futures can never be
 * resolved; their C tasks are cancelled when the futures are collected),
 * and ports inherited through fork(). */
static void prune_ports(aiob_py_bridge *b) {
  /* A snapshot, with references: is_closed() and closing run Python code,
   * during which other threads may change the dict and drop its ports. */
  PyObject *items = PyDict_Items(b->ports);
  for (Py_ssize_t i = 0; items && i < PyList_GET_SIZE(items); i++) {
    PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
    pyport *pp = (pyport *)PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
    PyObject *c = port_inherited(pp->port)
                      ? NULL
                      : pyport_call(pp, b->s_is_closed, NULL, NULL);
    if (c != Py_False) {
      pyport_close(pp);
      if (PyDict_GetItem(b->ports, key) == (PyObject *)pp)
        PyDict_DelItem(b->ports, key);
    }
    Py_XDECREF(c);
    PyErr_Clear();
  }
  Py_XDECREF(items);
  PyErr_Clear();
}

/* The port of `loop`, created on first use (borrowed; GIL). `on_thread`:
 * the caller runs that loop; otherwise the eventfd is registered on the
 * loop's thread later (loop methods are not thread-safe), and items pushed
 * meanwhile wait in the queue. */
pyport *aiob__py_port_for(aiob_py_bridge *b, PyObject *loop, int on_thread) {
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

/* After a shutdown that timed out (GIL): every port's next drain, on its
 * loop's thread, fails the CTasks pending there whose runtime was shut
 * (ShutdownError) and cancels the Python awaitables started there for C
 * tasks of such a runtime: an abandoned loop thread will never finish
 * them. */
void aiob__py_ports_fail_shut(aiob_py_bridge *b) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (b->ports && PyDict_Next(b->ports, &pos, &key, &value)) {
    port *p = ((pyport *)value)->port;
    if (port_inherited(p))
      continue;
    atomic_store(&p->fail_shut, 1);
    aiob__inbox_wake(&p->in, port_signal, p); /* no-op once closed */
  }
}

/* At interpreter exit, once the ports are closed (GIL; released while it
 * waits): a loop running on another thread (a daemon thread's) may not
 * have taken the last wake its port was sent yet, if that thread was not
 * scheduled since. Taken after the interpreter has finalized, it would
 * enter Python from the loop's own code: uvloop's fd callbacks take the
 * GIL with PyGILState_Ensure, which crashes once finalization has freed
 * the thread states. So this waits, at most timeout_ns, until every such
 * port's eventfd is read (the loop thread's drain reads it with the GIL,
 * while its thread state is still valid), then reads those left itself.
 * Closed ports get no wake again (aiob__inbox_close). */
void aiob__py_ports_settle(aiob_py_bridge *b, uint64_t timeout_ns) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *ports = b->ports ? PyDict_Values(b->ports) : NULL;
  Py_ssize_t n = ports ? PyList_GET_SIZE(ports) : 0;
  struct pollfd *fds = n ? calloc((size_t)n, sizeof *fds) : NULL;
  port **held = n ? calloc((size_t)n, sizeof *held) : NULL;
  nfds_t nfds = 0;
  PyObject *mine =
      fds && held ? PyObject_CallNoArgs(b->get_running_loop) : NULL;
  for (Py_ssize_t i = 0; mine && i < n; i++) {
    pyport *pp = (pyport *)PyList_GET_ITEM(ports, i);
    if (!pp->port || !pp->reader || port_inherited(pp->port))
      continue;
    PyObject *loop = aiob__py_weakref_get(pp->loop_ref);
    PyObject *running = loop && loop != mine
                            ? PyObject_CallMethod(loop, "is_running", NULL)
                            : NULL;
    if (running == Py_True) {
      aiob__py_port_ref(pp->port);
      held[nfds] = pp->port;
      fds[nfds++] = (struct pollfd){.fd = pp->port->efd, .events = POLLIN};
    }
    Py_XDECREF(running);
    Py_XDECREF(loop);
    PyErr_Clear();
  }
  Py_XDECREF(mine);
  Py_XDECREF(ports);
  PyErr_Clear();
  PyErr_Restore(type, value, tb);
  if (!nfds)
    goto out;
  Py_BEGIN_ALLOW_THREADS;
  uint64_t deadline = aiob_now_ns() + timeout_ns;
  while (poll(fds, nfds, 0) > 0) {
    if (aiob_now_ns() >= deadline) {
      for (nfds_t i = 0; i < nfds; i++) {
        uint64_t v;
        ssize_t r = fds[i].revents & POLLIN ? read(fds[i].fd, &v, sizeof v) : 0;
        (void)r; /* EAGAIN: its loop took it meanwhile */
      }
      break;
    }
    nanosleep(&(struct timespec){.tv_nsec = 100 * 1000}, NULL);
  }
  Py_END_ALLOW_THREADS;
  for (nfds_t i = 0; i < nfds; i++)
    aiob__py_port_unref(held[i]);
out:
  free(fds);
  free(held);
}

/* Closes every port of the bridge (GIL): at interpreter exit, and when
 * the bridge is freed. */
void aiob__py_close_all_ports(aiob_py_bridge *b) {
  /* With references: closing releases what the queues held, which may run
   * Python code that lets other threads change the dict. An exception
   * being raised (a failed init) stays. */
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *ports = b->ports ? PyDict_Values(b->ports) : NULL;
  for (Py_ssize_t i = 0; ports && i < PyList_GET_SIZE(ports); i++)
    pyport_close((pyport *)PyList_GET_ITEM(ports, i));
  Py_XDECREF(ports);
  PyErr_Clear();
  aiob__py_release_orphans();
  PyErr_Restore(type, value, tb);
}
