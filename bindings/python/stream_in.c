/* Python async iterators consumed by C tasks: aiob_py_aiter.
 *
 * A C task pulls the items of a Python async iterable through a channel:
 * a ring of `window` items, plain C under a mutex, shared by the C task's
 * loop thread (no GIL) and a pump on the task's asyncio loop (GIL). The
 * pump is a small asyncio task written in Python (pump_source, compiled
 * once per bridge) that awaits __anext__ and puts each item, converted on
 * the loop thread, into the ring through put(), a C function bound to the
 * channel.
 *
 * Backpressure and wakes: the pump calls __anext__ only while the ring has
 * room, so at most `window` items are buffered or being fetched. put()
 * reports a full ring; the pump then waits on a future, and the C task,
 * once it has freed half of the ring, asks the loop to resolve it. The C
 * task waits (its waker kept in the channel) only on an empty ring, and
 * the first put() after that wakes it. So a fast producer and a fast
 * consumer each wake the other once per half ring, never per item.
 *
 * What the C task asks of the loop (start the pump, room again, close)
 * travels as one item in the loop's port (ITEM_AITER), queued at most once
 * at a time, with the requests as flags; the port's drain runs them on the
 * loop thread (aiob__py_aiter_run), or a closed port drops them
 * (aiob__py_aiter_drop). The pump's end (StopAsyncIteration, an exception,
 * a cancellation) is put into the channel after its items.
 *
 * Lifetimes: the channel is counted by the C side (the aiob_py_aiter
 * leaf), the queued item, and the capsule of the pump's put/end functions
 * (the Python side). It holds the pump (`stream`, GIL) from the start until
 * the close request runs, or the port closes: as long as it does, the
 * capsule keeps a count, so the last count is only ever dropped with no
 * Python reference left in the channel, on any thread. */
#include "bridge_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define CHAN_CAPSULE "aiobridge.aiter_chan"

enum { TODO_START = 1, TODO_ROOM = 2, TODO_CLOSE = 4 };
enum { AI_INIT, AI_OPEN, AI_DONE, AI_CLOSED }; /* aiob_py_aiter.state */
enum { END_DONE, END_ERROR, END_CANCELLED };   /* the pump's end(kind) */

typedef struct aiob__py_aiter_chan {
  item it; /* ITEM_AITER: the C side's requests to the loop */
  _Atomic uint32_t refs;
  pthread_mutex_t mu;
  /* Under mu. */
  aiob_output *buf; /* ring of cap items */
  size_t cap, head, count;
  aiob_output end;      /* the end, once ended */
  bool ended;           /* the pump put its end */
  bool consumer_parked; /* the C task waits for an item: wake it */
  bool pump_parked;     /* the pump waits for room: tell the loop */
  bool queued;          /* `it` is in the port's queue */
  bool closed;          /* the C side is gone */
  unsigned todo;        /* TODO_* for the loop */
  /* Set before the first request, read-only afterwards. */
  aiob_waker *waker;  /* the consumer task's */
  py_locals *locals;  /* referenced */
  PyObject *iterable; /* borrowed from the C task's state */
  aiob_py_result_converter conv;
  char *name; /* the C task's name, or NULL */
  /* GIL. */
  PyObject *stream; /* the pump, from its start until closed */
} chan;

/* The pump: start() runs on the loop thread in the C task's context. */
static const char pump_source[] =
    "import asyncio, types\n"
    "_CancelledError = asyncio.CancelledError\n"
    "_AsyncGenerator = types.AsyncGeneratorType\n"
    "_EXIT = (KeyboardInterrupt, SystemExit)  # leave the loop, as asyncio\n"
    "_pumps = set()  # running pumps: a loop holds its tasks weakly\n"
    "def start(iterable, put, end, name):\n"
    "    tp = type(iterable)\n"
    "    aiter = getattr(tp, '__aiter__', None)\n"
    "    if aiter is None:\n"
    "        raise TypeError('aiobridge: a C task cannot iterate over an '\n"
    "                        'object of type %r: it needs an async iterable '\n"
    "                        '(an async generator, or an object with '\n"
    "                        '__aiter__)' % tp.__name__)\n"
    "    it = aiter(iterable)\n"
    "    anext = getattr(type(it), '__anext__', None)\n"
    "    if anext is None:\n"
    "        raise TypeError('aiobridge: %s.__aiter__ returned an object of '\n"
    "                        'type %r, which has no __anext__'\n"
    "                        % (tp.__name__, type(it).__name__))\n"
    "    return Pump(it, anext, put, end, name)\n"
    "class Pump:\n"
    "    def __init__(self, it, anext, put, end, name):\n"
    "        self.it, self.anext, self.put, self.end = it, anext, put, end\n"
    "        self.name = name\n"
    "        self.loop = asyncio.get_running_loop()\n"
    "        self.room = None  # the future a full ring waits on\n"
    "        self.closing = False  # the C side closed the iteration\n"
    "        self.finished = False  # the iterator ended, failed or closed\n"
    "        self.cancels = 0  # close() cancelled the task\n"
    "        self.task = self.loop.create_task(self.run())\n"
    "        _pumps.add(self.task)\n"
    "        self.task.add_done_callback(_pumps.discard)\n"
    "    def wake(self):\n"
    "        room = self.room\n"
    "        if room is not None and not room.done():\n"
    "            room.set_result(None)\n"
    "    def abandon(self):  # the loop is gone for the bridge: let it be\n"
    "        _pumps.discard(self.task)  # collected, quietly if pending\n"
    "        try:\n"
    "            self.task._log_destroy_pending = False\n"
    "        except AttributeError:\n"
    "            pass\n"
    "    def close(self):\n"
    "        if not self.closing:\n"
    "            self.closing = True\n"
    "            if not self.finished and self.task.cancel():\n"
    "                self.cancels = 1\n"
    "    async def run(self):\n"
    "        it, anext, put, end = self.it, self.anext, self.put, self.end\n"
    "        room = True\n"
    "        try:\n"
    "            while not self.closing:\n"
    "                if not room:\n"
    "                    self.room = self.loop.create_future()\n"
    "                    try:\n"
    "                        await self.room\n"
    "                    finally:\n"
    "                        self.room = None\n"
    "                    room = True\n"
    "                    continue\n"
    "                try:\n"
    "                    item = await anext(it)\n"
    "                except StopAsyncIteration:\n"
    "                    self.finished = True\n"
    "                    end(0, None)\n"
    "                    return\n"
    "                except BaseException as e:\n"
    "                    if self.closing:  # our cancel reached __anext__\n"
    "                        if not isinstance(e, _CancelledError):\n"
    "                            self.report(e)\n"
    "                        if isinstance(e, _EXIT):\n"
    "                            raise\n"
    "                        # It ended a generator; other iterators are\n"
    "                        # closed below.\n"
    "                        self.finished = isinstance(it, _AsyncGenerator)\n"
    "                        break\n"
    "                    self.finished = True\n"
    "                    if isinstance(e, _CancelledError):\n"
    "                        end(2, None)\n"
    "                    else:\n"
    "                        end(1, e)\n"
    "                    if isinstance(e, _EXIT):\n"
    "                        raise\n"
    "                    return\n"
    "                room = put(item)\n"
    "        except _CancelledError:  # waiting for room\n"
    "            if not self.closing:\n"
    "                end(2, None)\n"
    "        except BaseException as e:  # the converter failed\n"
    "            end(1, e)\n"
    "            if isinstance(e, _EXIT):\n"
    "                raise\n"
    "        if self.cancels and hasattr(self.task, 'uncancel'):\n"
    "            self.task.uncancel()  # 3.11+: that cancel was ours\n"
    "        if not self.finished:\n"
    "            self.finished = True\n"
    "            await self.aclose()\n"
    "    async def aclose(self):\n"
    "        aclose = getattr(self.it, 'aclose', None)\n"
    "        if aclose is None:\n"
    "            return\n"
    "        try:\n"
    "            await aclose()\n"
    "        except _EXIT:\n"
    "            raise\n"
    "        except BaseException as e:\n"
    "            if not isinstance(e, _CancelledError):\n"
    "                self.report(e)\n"
    "    def report(self, exc):\n"
    "        self.loop.call_exception_handler({\n"
    "            'message': 'aiobridge: an error occurred while closing the '\n"
    "                       'async iterator %r consumed by the C task %s'\n"
    "                       % (self.it, self.name or '(unnamed)'),\n"
    "            'exception': exc,\n"
    "            'asyncgen': self.it,\n"
    "        })\n";

static void chan_free(chan *c) {
  for (size_t i = 0; i < c->count; i++)
    aiob_output_clear(&c->buf[(c->head + i) % c->cap]);
  aiob_output_clear(&c->end);
  aiob_waker_release(c->waker);
  if (c->locals)
    aiob__py_locals_destroy(c->locals);
  pthread_mutex_destroy(&c->mu);
  free(c->name);
  free(c->buf);
  free(c);
}

/* Any thread: the last count is only dropped once `stream` is gone (see
 * the top of the file). */
static void chan_unref(chan *c) {
  if (atomic_fetch_sub(&c->refs, 1) == 1)
    chan_free(c);
}

/* Ends the stream with `o` (moved), after the items already in the ring,
 * and wakes the C task if it waits; o is freed if the stream already ended
 * or the C side is gone. Any thread. */
static void chan_finish(chan *c, aiob_output o) {
  bool wake = false;
  pthread_mutex_lock(&c->mu);
  if (!c->ended && !c->closed) {
    c->end = o;
    c->ended = true;
    o = (aiob_output){0};
    wake = c->consumer_parked;
    c->consumer_parked = false;
  }
  pthread_mutex_unlock(&c->mu);
  aiob_output_clear(&o);
  if (wake)
    aiob_waker_wake(c->waker);
}

/* ---- The C side's requests to the loop ---------------------------------- */

/* Queues `what` for the loop (the C task's thread: only the C side asks).
 * false: the loop is gone, nothing is queued. */
static bool chan_ask(chan *c, unsigned what) {
  pthread_mutex_lock(&c->mu);
  c->todo |= what;
  bool push = !c->queued;
  if (push) {
    c->queued = true;
    atomic_fetch_add(&c->refs, 1); /* the queued item's */
  }
  pthread_mutex_unlock(&c->mu);
  if (!push || aiob__py_port_push(c->locals->port, &c->it))
    return true;
  pthread_mutex_lock(&c->mu);
  c->queued = false;
  c->todo = 0;
  pthread_mutex_unlock(&c->mu);
  atomic_fetch_sub(&c->refs, 1); /* not the last: the caller holds one */
  return false;
}

/* ---- The loop side (loop thread, GIL) ----------------------------------- */

static void release_cb(void *obj) { aiob_py_release(obj); }

/* put(item) -> bool: converts the item and puts it into the ring; False
 * when the ring is now full (the pump waits for room) or the C side is
 * gone (the item is dropped). Raises what the converter raised. */
static PyObject *chan_put(PyObject *cap, PyObject *obj) {
  chan *c = PyCapsule_GetPointer(cap, CHAN_CAPSULE);
  if (!c)
    return NULL;
  aiob_output o = {0};
  if (!c->conv) {
    Py_INCREF(obj);
    o = (aiob_output){0, obj, release_cb};
  } else if (c->conv(obj, &o) < 0) {
    aiob_output_clear(&o);
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_SystemError,
                      "aiobridge: an async iterator's item converter failed "
                      "without setting an exception");
    return NULL;
  } else {
    o.status = 0;
  }
  bool room = false, wake = false, dropped = false;
  pthread_mutex_lock(&c->mu);
  if (c->closed || c->ended || c->count == c->cap) {
    dropped = true; /* (never full: the pump fetches only with room) */
  } else {
    c->buf[(c->head + c->count++) % c->cap] = o;
    room = c->count < c->cap;
    c->pump_parked = !room;
    wake = c->consumer_parked;
    c->consumer_parked = false;
  }
  pthread_mutex_unlock(&c->mu);
  if (dropped)
    aiob_output_clear(&o);
  if (wake)
    aiob_waker_wake(c->waker);
  return PyBool_FromLong(room);
}

/* end(kind, exc): the pump's end: exhausted, failed with exc, or
 * cancelled. */
static PyObject *chan_end(PyObject *cap, PyObject *args) {
  chan *c = PyCapsule_GetPointer(cap, CHAN_CAPSULE);
  int kind;
  PyObject *exc;
  if (!c || !PyArg_ParseTuple(args, "iO:end", &kind, &exc))
    return NULL;
  aiob_output o = {AIOB_PY_STREAM_END, NULL, NULL};
  if (kind == END_CANCELLED) {
    o.status = AIOB_ECANCELED;
  } else if (kind == END_ERROR) {
    py_error *e = calloc(1, sizeof *e);
    if (!e) {
      o.status = AIOB_ENOMEM;
    } else {
      Py_INCREF(exc);
      e->exc = exc;
      o = (aiob_output){AIOB_PY_EXCEPTION, e, aiob__py_error_free};
    }
  }
  chan_finish(c, o);
  Py_RETURN_NONE;
}

static PyMethodDef put_def = {"put", chan_put, METH_O, NULL};
static PyMethodDef end_def = {"end", (PyCFunction)chan_end, METH_VARARGS, NULL};

static void capsule_release(PyObject *cap) {
  chan *c = PyCapsule_GetPointer(cap, CHAN_CAPSULE);
  if (c)
    chan_unref(c);
}

/* The pump's factory of this bridge, compiled on first use (borrowed). */
static PyObject *start_fn(aiob_py_bridge *b) {
  if (!b->aiter_start)
    b->aiter_start = aiob__py_source_fn(pump_source, "start");
  return b->aiter_start;
}

/* Starts the pump over `iterable` (owned) in the C task's context; a
 * failure (not an async iterable, out of memory) ends the stream with its
 * exception. */
static void chan_start(aiob_py_bridge *b, chan *c, PyObject *iterable) {
  PyObject *start = start_fn(b), *ctx = aiob__py_locals_context(c->locals);
  PyObject *cap = NULL, *put = NULL, *end = NULL, *name = NULL, *pump = NULL;
  if (start && ctx) {
    atomic_fetch_add(&c->refs, 1); /* the Python side's */
    if (!(cap = PyCapsule_New(c, CHAN_CAPSULE, capsule_release)))
      atomic_fetch_sub(&c->refs, 1); /* not the last: the item holds one */
  }
  if (cap) {
    put = PyCFunction_New(&put_def, cap);
    end = PyCFunction_New(&end_def, cap);
    name = c->name ? PyUnicode_DecodeUTF8(c->name, (Py_ssize_t)strlen(c->name),
                                          "replace")
                   : (Py_INCREF(Py_None), Py_None);
  }
  if (put && end && name && PyContext_Enter(ctx) == 0) {
    pump = PyObject_CallFunctionObjArgs(start, iterable, put, end, name, NULL);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyContext_Exit(ctx);
    PyErr_Restore(type, value, tb);
  }
  Py_XDECREF(cap);
  Py_XDECREF(put);
  Py_XDECREF(end);
  Py_XDECREF(name);
  Py_DECREF(iterable);
  if (pump) {
    c->stream = pump;
    return;
  }
  aiob_output o = {AIOB_ENOMEM, NULL, NULL};
  PyObject *exc = aiob__py_take_exception();
  py_error *e = exc ? calloc(1, sizeof *e) : NULL;
  if (e) {
    e->exc = exc;
    o = (aiob_output){AIOB_PY_EXCEPTION, e, aiob__py_error_free};
  } else {
    Py_XDECREF(exc);
  }
  chan_finish(c, o);
}

/* Calls the pump's method `name`; what it raises (a bug) is reported as
 * unraisable, not lost. */
static void pump_call(PyObject *pump, const char *name) {
  PyObject *r = PyObject_CallMethod(pump, name, NULL);
  if (r)
    Py_DECREF(r);
  else
    PyErr_WriteUnraisable(pump);
}

void aiob__py_aiter_run(aiob_py_bridge *b, item *it) {
  chan *c = AIOB__CONTAINER_OF(it, chan, it);
  pthread_mutex_lock(&c->mu);
  unsigned todo = c->todo;
  bool closed = c->closed;
  c->todo = 0;
  c->queued = false;
  pthread_mutex_unlock(&c->mu);
  /* The C side releases the iterable only after it closed, and with the
   * GIL, which this thread holds from the check above to here. */
  if ((todo & TODO_START) && !closed) {
    Py_INCREF(c->iterable);
    chan_start(b, c, c->iterable);
  }
  if ((todo & TODO_ROOM) && !closed && c->stream)
    pump_call(c->stream, "wake");
  if ((todo & TODO_CLOSE) && c->stream) {
    PyObject *pump = c->stream;
    c->stream = NULL;
    pump_call(pump, "close");
    Py_DECREF(pump);
  }
  chan_unref(c); /* the queued item's */
}

/* The loop is gone (GIL): the stream ends (the C task sees AIOB_ECANCELED
 * after the items it has), and the pump is let go. */
static void chan_lose_loop(chan *c) {
  chan_finish(c, (aiob_output){AIOB_ECANCELED, NULL, NULL});
  PyObject *pump = c->stream;
  c->stream = NULL;
  if (pump) {
    pump_call(pump, "abandon");
    Py_DECREF(pump);
  }
}

void aiob__py_aiter_drop(item *it) {
  chan *c = AIOB__CONTAINER_OF(it, chan, it);
  pthread_mutex_lock(&c->mu);
  c->todo = 0;
  c->queued = false;
  pthread_mutex_unlock(&c->mu);
  chan_lose_loop(c);
  chan_unref(c); /* the queued item's */
}

/* With the GIL, for a C side that could not ask its loop to close: drops
 * the pump and the C side's count. */
static void chan_forget(void *arg) {
  chan *c = arg;
  chan_lose_loop(c);
  chan_unref(c);
}

/* ---- The C side --------------------------------------------------------- */

void aiob_py_aiter_init(aiob_py_aiter *it, PyObject *aiterable, size_t window,
                        aiob_py_result_converter conv) {
  memset(it, 0, sizeof *it);
  it->leaf.next = it->leaf.prev = &it->leaf;
  it->iterable = aiterable;
  it->window = window;
  it->conv = conv;
}

void aiob_py_aiter_set_locals(aiob_py_aiter *it, aiob_py_locals *locals) {
  it->locals = locals;
}

/* Closes the C side of a started iteration (its leaf already unlinked):
 * frees what the ring holds, and asks the loop to close the pump. */
static void aiter_shut(aiob_py_aiter *it) {
  chan *c = it->chan;
  it->chan = NULL;
  pthread_mutex_lock(&c->mu);
  c->closed = true;
  c->consumer_parked = false;
  size_t n = c->count;
  c->count = 0;
  aiob_output end = c->end;
  c->end = (aiob_output){0};
  pthread_mutex_unlock(&c->mu);
  /* Nothing touches the ring once closed is set: put() drops its items. */
  for (size_t i = 0; i < n; i++)
    aiob_output_clear(&c->buf[(c->head + i) % c->cap]);
  aiob_output_clear(&end);
  if (chan_ask(c, TODO_CLOSE))
    chan_unref(c);
  else /* the loop is gone: the pump is dropped where the GIL is */
    aiob__py_with_gil(chan_forget, c);
}

static void aiter_detach(struct aiob__leaf *leaf) {
  aiob_py_aiter *it = AIOB__CONTAINER_OF(leaf, aiob_py_aiter, leaf);
  aiter_shut(it);
  if (it->state == AI_OPEN)
    it->state = AI_CLOSED;
}

void aiob_py_aiter_close(aiob_py_aiter *it) {
  if (it->chan) {
    aiob__leaf_unlink(&it->leaf);
    aiter_shut(it);
  }
  if (it->state != AI_DONE)
    it->state = AI_CLOSED;
}

/* First call: the channel, and the pump's start on the loop. */
static int aiter_start(aiob_task *self, aiob_py_aiter *it) {
  if (!it->iterable || it->window == 0)
    return AIOB_EINVAL;
  py_locals *l = it->locals;
  aiob_local_key key;
  if (!l && aiob__py_locals_key_get(&key) == 0)
    l = aiob_task_local_get(self, key);
  if (!l)
    return AIOB_EINVAL; /* no locals given, and not a task of the bridge */
  if (it->window > SIZE_MAX / sizeof(aiob_output))
    return AIOB_ENOMEM;
  const char *name = aiob_task_name(self);
  chan *c = calloc(1, sizeof *c);
  aiob_output *buf = calloc(it->window, sizeof *buf);
  char *nm = name ? strdup(name) : NULL;
  if (!c || !buf || (name && !nm)) {
    free(c);
    free(buf);
    free(nm);
    return AIOB_ENOMEM;
  }
  pthread_mutex_init(&c->mu, NULL);
  c->it.kind = ITEM_AITER;
  atomic_init(&c->refs, 1); /* the C side's */
  c->buf = buf;
  c->cap = it->window;
  c->waker = aiob_task_waker(self);
  c->locals = aiob__py_locals_clone(l);
  c->iterable = it->iterable;
  c->conv = it->conv;
  c->name = nm;
  if (!chan_ask(c, TODO_START)) {
    chan_unref(c);
    return AIOB_ECANCELED; /* the asyncio loop is gone */
  }
  it->chan = c;
  it->leaf.detach = aiter_detach;
  aiob__leaf_link(self, &it->leaf);
  it->state = AI_OPEN;
  return 0;
}

static aiob_poll give(aiob_output *out, aiob_output o) {
  if (out)
    *out = o;
  else
    aiob_output_clear(&o);
  return AIOB_READY;
}

aiob_poll aiob_py_aiter_next(aiob_task *self, aiob_py_aiter *it,
                             aiob_output *out) {
  switch (it->state) {
  case AI_CLOSED:
    return give(out, (aiob_output){AIOB_ECANCELED, NULL, NULL});
  case AI_DONE:
    return give(out, (aiob_output){AIOB_PY_STREAM_END, NULL, NULL});
  case AI_INIT: {
    int rc = aiter_start(self, it);
    if (rc < 0) {
      it->state = AI_DONE;
      return give(out, (aiob_output){rc, NULL, NULL});
    }
    break;
  }
  default:
    break;
  }
  chan *c = it->chan;
  aiob_output o;
  pthread_mutex_lock(&c->mu);
  if (c->count > 0) {
    o = c->buf[c->head];
    c->buf[c->head] = (aiob_output){0};
    c->head = (c->head + 1) % c->cap;
    c->count--;
    /* Room for half the window again: let a waiting pump go on. */
    bool room = c->pump_parked && c->cap - c->count >= (c->cap + 1) / 2;
    if (room)
      c->pump_parked = false;
    pthread_mutex_unlock(&c->mu);
    if (room && !chan_ask(c, TODO_ROOM))
      chan_finish(c, (aiob_output){AIOB_ECANCELED, NULL, NULL});
    return give(out, o);
  }
  if (c->ended) {
    o = c->end;
    c->end = (aiob_output){0};
    pthread_mutex_unlock(&c->mu);
    /* Over: the pump has stopped; let the channel go now. */
    aiob_py_aiter_close(it);
    it->state = AI_DONE;
    return give(out, o);
  }
  c->consumer_parked = true;
  pthread_mutex_unlock(&c->mu);
  return AIOB_PENDING;
}
