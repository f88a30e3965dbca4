/* C producers as Python async iterators: aiobridge.CStream.
 *
 * A CStream owns a producer: a C task started as a CTask (so it binds to
 * a loop, starts and ends as any C task does) whose poll sends items into
 * a bounded channel. The consumer takes them with `async for` on its
 * asyncio loop.
 *
 * The channel is plain C under a mutex, shared by the producer's loop
 * thread (no GIL) and the consumer's asyncio loop thread (GIL). A full
 * channel suspends the producer (its waker is kept, and woken when the
 * consumer takes an item). An empty channel parks the consumer on an
 * asyncio future; the first send after that pushes the channel's wake item
 * onto the loop's port, once, and the port drain resolves the future: one
 * loop wake per batch, the rest of the batch is taken without any wake.
 * The producer's end (its CTask finishing) ends the stream after the items
 * sent before it: StopAsyncIteration, or the producer's exception.
 *
 * The consumer going away (aclose(), the CStream collected, a cancelled
 * wait) closes the channel: items left are freed without Python, later
 * sends fail with AIOB_EPIPE, and the producer task is cancelled. */
#include "bridge_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct cstream cstream;

/* Refs: the CStream, the producer task, and a wake in a port's queue. */
struct aiob_py_stream {
  item it; /* the consumer's wake (ITEM_STREAM) */
  _Atomic uint32_t refs;
  pthread_mutex_t mu;
  /* Under mu. */
  aiob_output *buf; /* ring of cap items */
  size_t cap, head, count;
  aiob_waker *blocked;   /* the producer, waiting for room */
  bool consumer_waiting; /* parked on a future: wake it on the next send */
  bool wake_queued;      /* `it` is in the port's queue */
  bool closed;           /* the consumer is gone */
  port *port;            /* the consumer's loop (referenced), once bound */
  /* GIL. */
  cstream *obj; /* the Python side, NULL once it is gone */
};
typedef aiob_py_stream chan;

struct cstream {
  PyObject_HEAD chan *ch;
  PyObject *producer;     /* the producer's CTask */
  PyObject *waiting;      /* the future the consumer awaits, or NULL */
  PyObject *on_wait_done; /* a waiting future's callback (holds the chan) */
  aiob_py_converter conv;
  const char *name;
  bool bound, ended; /* ended: the end (or error) was handed out */
};

static void chan_unref(chan *ch) {
  if (atomic_fetch_sub(&ch->refs, 1) != 1)
    return;
  for (size_t i = 0; i < ch->count; i++)
    aiob_output_clear(&ch->buf[(ch->head + i) % ch->cap]);
  aiob_waker_release(ch->blocked);
  if (ch->port)
    aiob__py_port_unref(ch->port);
  pthread_mutex_destroy(&ch->mu);
  free(ch->buf);
  free(ch);
}

/* ---- The producer ------------------------------------------------------ */

typedef struct producer {
  chan *ch;
  const aiob_task_vtable *vt;
  void *state;
} producer;

static _Thread_local chan *current; /* the stream of the producer polled */

static aiob_poll producer_poll(aiob_task *self, void *p) {
  producer *pr = p;
  chan *prev = current;
  current = pr->ch;
  aiob_poll r = pr->vt->poll(self, pr->state);
  current = prev;
  return r;
}

static void producer_drop(void *p) {
  producer *pr = p;
  if (pr->vt->drop)
    pr->vt->drop(pr->state);
  chan_unref(pr->ch);
  free(pr);
}

static const aiob_task_vtable producer_vt = {.poll = producer_poll,
                                             .drop = producer_drop};

aiob_py_stream *aiob_py_stream_of(aiob_task *self) {
  (void)self;
  return current;
}

aiob_poll aiob_py_stream_send(aiob_task *self, aiob_py_stream *s, void *value,
                              void (*free_value)(void *value), int *status) {
  int st = 0;
  aiob_waker *old = NULL;
  bool wake = false;
  port *p = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->closed) {
    st = AIOB_EPIPE;
  } else if (s->count == s->cap) {
    old = s->blocked;
    s->blocked = aiob_task_waker(self);
    pthread_mutex_unlock(&s->mu);
    aiob_waker_release(old);
    return AIOB_PENDING;
  } else {
    s->buf[(s->head + s->count++) % s->cap] =
        (aiob_output){0, value, free_value};
    wake = s->consumer_waiting && !s->wake_queued;
    if (wake) {
      s->wake_queued = true;
      atomic_fetch_add(&s->refs, 1);
      p = s->port;
    }
  }
  pthread_mutex_unlock(&s->mu);
  if (wake && !aiob__py_port_push(p, &s->it)) { /* the loop is gone */
    pthread_mutex_lock(&s->mu);
    s->wake_queued = false;
    pthread_mutex_unlock(&s->mu);
    chan_unref(s);
  }
  if (status)
    *status = st;
  return AIOB_READY;
}

/* ---- The consumer (loop thread, GIL) ----------------------------------- */

/* Takes the oldest item, if any, and wakes a producer waiting for room.
 * With `park`, an empty channel marks the consumer as waiting in the same
 * critical section, so a send right after cannot miss it; a take unmarks
 * it. */
static bool chan_take(chan *ch, aiob_output *out, bool park) {
  pthread_mutex_lock(&ch->mu);
  bool got = ch->count > 0;
  aiob_waker *w = NULL;
  if (got) {
    *out = ch->buf[ch->head];
    ch->head = (ch->head + 1) % ch->cap;
    ch->count--;
    w = ch->blocked;
    ch->blocked = NULL;
    ch->consumer_waiting = false;
  } else if (park && !ch->closed) {
    ch->consumer_waiting = true;
  }
  pthread_mutex_unlock(&ch->mu);
  if (w) {
    aiob_waker_wake(w);
    aiob_waker_release(w);
  }
  return got;
}

static void chan_unpark(chan *ch) {
  pthread_mutex_lock(&ch->mu);
  ch->consumer_waiting = false;
  pthread_mutex_unlock(&ch->mu);
}

/* The stream's end, as an exception instance (new reference): the
 * producer's exception, else StopAsyncIteration. NULL with an exception
 * set if it cannot be made. */
static PyObject *end_exception(cstream *cs) {
  PyObject *exc = cs->producer
                      ? PyObject_CallMethod(cs->producer, "exception", NULL)
                      : (Py_INCREF(Py_None), Py_None);
  if (!exc) { /* cancelled: the stream was closed */
    PyErr_Clear();
    exc = Py_None;
    Py_INCREF(exc);
  }
  if (exc == Py_None) {
    Py_DECREF(exc);
    exc = PyObject_CallNoArgs(PyExc_StopAsyncIteration);
  }
  return exc;
}

static bool producer_done(cstream *cs) {
  return !cs->producer || aiob__py_ctask_done(cs->producer);
}

/* ---- A ready outcome: an awaitable that returns or raises at once ------- */

typedef struct ready {
  PyObject_HEAD PyObject *value; /* the result, or NULL */
  PyObject *exc;                 /* the exception to raise, or NULL */
} ready;

static PyTypeObject *ready_type; /* process-wide: no per-module state */

static PyObject *ready_new(PyObject *value, PyObject *exc) {
  ready *r = PyObject_New(ready, ready_type);
  if (!r) {
    Py_XDECREF(value);
    Py_XDECREF(exc);
    return NULL;
  }
  r->value = value; /* stolen */
  r->exc = exc;
  return (PyObject *)r;
}

static PyObject *ready_iternext(PyObject *self) {
  ready *r = (ready *)self;
  if (r->exc) {
    PyObject *exc = r->exc;
    r->exc = NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
  }
  PyObject *v = r->value;
  r->value = NULL;
  if (!v || v == Py_None) {
    Py_XDECREF(v);
    return NULL; /* StopIteration(None) */
  }
  PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, v);
  Py_DECREF(v);
  if (stop) {
    PyErr_SetObject(PyExc_StopIteration, stop);
    Py_DECREF(stop);
  }
  return NULL;
}

static PyObject *ready_self(PyObject *self) {
  Py_INCREF(self);
  return self;
}

static PyObject *ready_send(PyObject *self, PyObject *arg) {
  (void)arg;
  PyObject *r = ready_iternext(self);
  if (!r && !PyErr_Occurred())
    PyErr_SetNone(PyExc_StopIteration);
  return r;
}

static PyObject *ready_close(PyObject *self, PyObject *unused) {
  (void)unused;
  ready *r = (ready *)self;
  Py_CLEAR(r->value);
  Py_CLEAR(r->exc);
  Py_RETURN_NONE;
}

static void ready_dealloc(PyObject *self) {
  ready *r = (ready *)self;
  Py_XDECREF(r->value);
  Py_XDECREF(r->exc);
  PyTypeObject *tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyMethodDef ready_methods[] = {
    {"send", ready_send, METH_O, NULL},
    {"close", ready_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ready_slots[] = {
    {Py_tp_new, aiob__py_no_new},
    {Py_tp_dealloc, ready_dealloc},
    {Py_tp_iter, ready_self},
    {Py_tp_iternext, ready_iternext},
    {Py_am_await, ready_self},
    {Py_tp_methods, ready_methods},
    {0, NULL},
};

static PyType_Spec ready_spec = {
    .name = "aiobridge._StreamNext",
    .basicsize = sizeof(ready),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = ready_slots,
};

/* ---- Closing ------------------------------------------------------------ */

/* The consumer is gone (GIL): no more items, the producer cancelled, a
 * waiting future cancelled. Idempotent. */
static void cs_close(cstream *cs) {
  chan *ch = cs->ch;
  pthread_mutex_lock(&ch->mu);
  bool was = ch->closed;
  ch->closed = true;
  ch->consumer_waiting = false;
  size_t n = ch->count, head = ch->head, cap = ch->cap;
  aiob_output *left = n ? malloc(n * sizeof *left) : NULL;
  for (size_t i = 0; left && i < n; i++)
    left[i] = ch->buf[(head + i) % cap];
  if (left) /* else they are freed with the channel */
    ch->count = 0;
  aiob_waker *w = ch->blocked;
  ch->blocked = NULL;
  pthread_mutex_unlock(&ch->mu);
  for (size_t i = 0; left && i < n; i++)
    aiob_output_clear(&left[i]);
  free(left);
  if (w) { /* its send now fails with AIOB_EPIPE */
    aiob_waker_wake(w);
    aiob_waker_release(w);
  }
  if (was)
    return;
  /* May run from a dealloc while an exception propagates: keep it. */
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  cs->ended = true;
  PyObject *fut = cs->waiting;
  cs->waiting = NULL;
  if (fut) {
    PyObject *r = PyObject_CallMethod(fut, "cancel", NULL);
    Py_XDECREF(r);
    Py_DECREF(fut);
  }
  if (cs->producer) { /* its failure, if any, is nobody's to retrieve */
    ((cfut *)cs->producer)->it.log_exc = 0;
    PyObject *r = PyObject_CallMethod(cs->producer, "cancel", NULL);
    Py_XDECREF(r);
    ((cfut *)cs->producer)->it.log_exc = 0;
  }
  PyErr_Clear();
  PyErr_Restore(type, value, tb);
}

/* ---- Handing items to a waiting consumer -------------------------------- */

/* Resolves the waiting future with the next item, or the end once the
 * producer finished and nothing is left (loop thread, GIL). */
static void cs_deliver(cstream *cs) {
  PyObject *fut = cs->waiting;
  if (!fut)
    return;
  aiob_output out;
  PyObject *v = NULL, *exc = NULL;
  if (chan_take(cs->ch, &out, true)) {
    if (!(v = aiob__py_convert(cs->conv, &out, cs->name)))
      exc = aiob__py_take_exception();
  } else if (producer_done(cs)) {
    chan_unpark(cs->ch);
    cs->ended = true;
    exc = end_exception(cs);
    if (!exc)
      exc = aiob__py_take_exception();
  } else {
    return; /* parked: the next send wakes it */
  }
  cs->waiting = NULL;
  PyObject *r = v ? PyObject_CallMethod(fut, "set_result", "O", v)
                  : PyObject_CallMethod(fut, "set_exception", "O", exc);
  if (!r)
    PyErr_WriteUnraisable(fut);
  Py_XDECREF(r);
  Py_XDECREF(v);
  Py_XDECREF(exc);
  Py_DECREF(fut);
}

/* The port drained the channel's wake (loop thread, GIL). */
void aiob__py_stream_wake(item *it) {
  chan *ch = AIOB__CONTAINER_OF(it, chan, it);
  pthread_mutex_lock(&ch->mu);
  ch->wake_queued = false;
  pthread_mutex_unlock(&ch->mu);
  if (ch->obj)
    cs_deliver(ch->obj);
  chan_unref(ch);
}

/* The port closed with the wake still queued. */
void aiob__py_stream_drop_wake(item *it) {
  chan_unref(AIOB__CONTAINER_OF(it, chan, it));
}

/* ---- CStream: the Python type ------------------------------------------ */

/* The producer's CTask has its outcome (its hook, GIL): a waiting consumer
 * gets the end. The hook holds no Python reference, so a CStream dropped
 * by its consumer is freed at once, cancelling the producer. */
static void producer_ended(void *arg) {
  chan *ch = arg;
  if (ch->obj)
    cs_deliver(ch->obj);
}

#define CHAN_CAPSULE "aiobridge.stream"

static void capsule_unref(PyObject *cap) {
  chan_unref(PyCapsule_GetPointer(cap, CHAN_CAPSULE));
}

/* Done callback of a waiting future (bound to a capsule of the channel,
 * not to the CStream: no cycle): cancelled, as its consumer was, it closes
 * the stream. */
static PyObject *cs_wait_done(PyObject *self, PyObject *fut) {
  chan *ch = PyCapsule_GetPointer(self, CHAN_CAPSULE);
  cstream *cs = ch ? ch->obj : NULL;
  if (!cs)
    Py_RETURN_NONE;
  PyObject *c = PyObject_CallMethod(fut, "cancelled", NULL);
  int cancelled = c ? PyObject_IsTrue(c) : -1;
  Py_XDECREF(c);
  if (cancelled < 0)
    return NULL;
  if (cancelled) {
    if (cs->waiting == fut)
      Py_CLEAR(cs->waiting);
    cs_close(cs);
  }
  Py_RETURN_NONE;
}

static PyMethodDef cs_wait_done_def = {"_wait_done", cs_wait_done, METH_O,
                                       NULL};

/* Binds to the running loop on first use: starts the producer, learns the
 * port. -1 with an exception set (no running loop). */
static int cs_bind(cstream *cs) {
  if (cs->bound)
    return 0;
  PyObject *loop = PyObject_CallMethod(cs->producer, "get_loop", NULL);
  if (!loop)
    return -1;
  Py_DECREF(loop);
  cfut *f = (cfut *)cs->producer;
  pthread_mutex_lock(&cs->ch->mu);
  if (!cs->ch->port && f->loc.port) {
    aiob__py_port_ref(f->loc.port);
    cs->ch->port = f->loc.port;
  }
  pthread_mutex_unlock(&cs->ch->mu);
  cs->bound = true;
  return 0;
}

static PyObject *cs_anext(PyObject *self) {
  cstream *cs = (cstream *)self;
  if (cs->waiting) {
    PyErr_SetString(PyExc_RuntimeError,
                    "aiobridge: anext() of a C stream while another anext() "
                    "of it is pending");
    return NULL;
  }
  if (cs->ended)
    return ready_new(NULL, PyObject_CallNoArgs(PyExc_StopAsyncIteration));
  if (cs_bind(cs) < 0)
    return NULL;
  aiob_output out;
  if (chan_take(cs->ch, &out, false)) {
    PyObject *v = aiob__py_convert(cs->conv, &out, cs->name);
    return v ? ready_new(v, NULL) : NULL;
  }
  if (producer_done(cs)) { /* nothing left and nothing to come */
    cs->ended = true;
    PyObject *exc = end_exception(cs);
    return exc ? ready_new(NULL, exc) : NULL;
  }
  PyObject *loop = ((cfut *)cs->producer)->loc.loop;
  PyObject *fut = PyObject_CallMethod(loop, "create_future", NULL);
  if (!fut)
    return NULL;
  PyObject *r =
      PyObject_CallMethod(fut, "add_done_callback", "O", cs->on_wait_done);
  if (!r) {
    Py_DECREF(fut);
    return NULL;
  }
  Py_DECREF(r);
  /* Parked, or an item came meanwhile: it resolves the future at once. */
  Py_INCREF(fut);
  cs->waiting = fut;
  cs_deliver(cs);
  return fut;
}

static PyObject *cs_aclose(PyObject *self, PyObject *unused) {
  (void)unused;
  cs_close((cstream *)self);
  return ready_new(NULL, NULL);
}

static PyObject *cs_repr(PyObject *self) {
  cstream *cs = (cstream *)self;
  const char *state = cs->ended   ? "finished"
                      : cs->bound ? "running"
                                  : "unstarted";
  return cs->name ? PyUnicode_FromFormat("<CStream %s %s>", cs->name, state)
                  : PyUnicode_FromFormat("<CStream %s>", state);
}

static int cs_traverse(PyObject *self, visitproc visit, void *arg) {
  cstream *cs = (cstream *)self;
#if PY_VERSION_HEX >= 0x03090000
  Py_VISIT(Py_TYPE(self));
#endif
  Py_VISIT(cs->producer);
  Py_VISIT(cs->waiting);
  Py_VISIT(cs->on_wait_done);
  return 0;
}

static int cs_clear(PyObject *self) {
  cstream *cs = (cstream *)self;
  Py_CLEAR(cs->waiting);
  Py_CLEAR(cs->on_wait_done);
  Py_CLEAR(cs->producer);
  return 0;
}

/* Collected: the consumer is gone. */
static void cs_dealloc(PyObject *self) {
  cstream *cs = (cstream *)self;
  PyObject_GC_UnTrack(self);
  cs_close(cs);
  cs->ch->obj = NULL;
  if (cs->producer)
    ((cfut *)cs->producer)->hook = NULL;
  cs_clear(self);
  chan_unref(cs->ch);
  PyTypeObject *tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyObject *cs_self(PyObject *self) {
  Py_INCREF(self);
  return self;
}

static PyMethodDef cs_methods[] = {
    {"aclose", cs_aclose, METH_NOARGS,
     "Close: the producer is cancelled, items left are dropped."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot cs_slots[] = {
    {Py_tp_new, aiob__py_no_new},
    {Py_tp_dealloc, cs_dealloc},
    {Py_tp_traverse, cs_traverse},
    {Py_tp_clear, cs_clear},
    {Py_tp_repr, cs_repr},
    {Py_am_aiter, cs_self},
    {Py_am_anext, cs_anext},
    {Py_tp_methods, cs_methods},
    {0, NULL},
};

PyType_Spec aiob__py_cstream_spec = {
    .name = "aiobridge.CStream",
    .basicsize = sizeof(cstream),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = cs_slots,
};

PyObject *aiob_py_stream_new(aiob_py_bridge *b, const char *name,
                             size_t capacity, aiob_py_converter conv,
                             const aiob_task_vtable *vt, void *state) {
  if (!b || !vt || !vt->poll || capacity < 1) {
    PyErr_SetString(PyExc_ValueError,
                    "aiobridge: aiob_py_stream_new needs a bridge, a producer "
                    "vtable and a capacity of at least 1");
    return NULL;
  }
  if (!ready_type &&
      !(ready_type = (PyTypeObject *)PyType_FromSpec(&ready_spec)))
    return NULL;
  chan *ch = calloc(1, sizeof *ch);
  producer *pr = calloc(1, sizeof *pr);
  if (ch)
    ch->buf = calloc(capacity, sizeof *ch->buf);
  if (!ch || !pr || !ch->buf) {
    if (ch)
      free(ch->buf);
    free(ch);
    free(pr);
    return PyErr_NoMemory();
  }
  ch->it.kind = ITEM_STREAM;
  ch->cap = capacity;
  atomic_init(&ch->refs, 2); /* the CStream, the producer */
  pthread_mutex_init(&ch->mu, NULL);
  pr->ch = ch;
  pr->vt = vt;
  pr->state = state;
  cstream *cs = PyObject_GC_New(cstream, b->cstream_type);
  if (!cs) {
    pthread_mutex_destroy(&ch->mu);
    free(ch->buf);
    free(ch);
    free(pr);
    return NULL;
  }
  cs->ch = ch;
  cs->producer = cs->waiting = NULL;
  cs->conv = conv;
  cs->name = name && name[0] ? name : vt->name && vt->name[0] ? vt->name : NULL;
  cs->bound = cs->ended = false;
  ch->obj = cs;
  cs->on_wait_done = NULL;
  PyObject_GC_Track(cs);
  atomic_fetch_add(&ch->refs, 1); /* the capsule's */
  PyObject *cap = PyCapsule_New(ch, CHAN_CAPSULE, capsule_unref);
  if (!cap)
    chan_unref(ch);
  cs->on_wait_done = cap ? PyCFunction_New(&cs_wait_done_def, cap) : NULL;
  Py_XDECREF(cap);
  if (cs->on_wait_done)
    cs->producer = aiob__py_ctask_new(b, &producer_vt, pr, NULL, cs->name);
  if (!cs->producer) { /* nothing started: the caller keeps `state` */
    free(pr);
    chan_unref(ch); /* the producer's */
    Py_DECREF(cs);
    return NULL;
  }
  ((cfut *)cs->producer)->hook = producer_ended;
  ((cfut *)cs->producer)->hook_arg = ch;
  return (PyObject *)cs; /* bound by the first anext() */
}
