/* nativeio: an aiobridge extension whose C task calls its backend's own
 * library, built outside aiobridge's tree against an installed aiobridge.
 *
 * nativeio.recv(fd, n) awaits up to n bytes from a socket (b"" at EOF). The
 * C task runs on a runtime loop thread and uses that loop's native handle
 * (aiob_runtime_native) directly:
 *   uv     a uv_poll_t on the fd, then recv(2) when it is readable;
 *   event  a bufferevent on the fd, read high-watermark n;
 *   uring  an IORING_OP_RECV through aiobridge/uring.h.
 * recv works on its own duplicate of the fd, so the caller may close
 * theirs at any time: the socket then stays open until the read is
 * released. uv and event put the socket in non-blocking mode.
 *
 * A native request is allocated apart from the task's state: a cancelled
 * task is dropped at once, but the native library may keep using the
 * request (libuv until the handle's close callback, io_uring until the
 * request's completion). nativeio.inflight() counts the requests alive so
 * that a test can see every one released. */
#include <aiobridge/python.h>

#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(NATIVEIO_UV)
#include <sys/socket.h>
#include <uv.h>
#elif defined(NATIVEIO_EVENT)
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#elif defined(NATIVEIO_URING)
#include <aiobridge/uring.h>
#else
#error "define one of NATIVEIO_UV, NATIVEIO_EVENT, NATIVEIO_URING"
#endif

/* Largest n recv accepts: the request's buffer is allocated up front. */
#define NIO_MAX_READ (16 * 1024 * 1024)

/* Native requests alive in the process. Not in the module state: requests
 * are released on runtime threads without the GIL, possibly after the
 * awaitable (or the module) is gone. */
static atomic_long nio_inflight;

/* One read on the native loop. Loop thread only: every field is touched
 * by the task's poll and drop and by the native callbacks, all on the loop
 * thread that started it. */
typedef struct nio_req {
#if defined(NATIVEIO_UV)
  uv_poll_t poll;
#elif defined(NATIVEIO_EVENT)
  struct bufferevent *bev;
#else
  aiob_uring_op op;
  struct io_uring *ring;
#endif
  aiob_waker *waker; /* the task's, borrowed; NULL once the task let go */
  int done;          /* res is set */
  int res;           /* bytes read (0: EOF) or a negative errno */
  int fd;            /* our duplicate, closed with the request */
  size_t cap;
  unsigned char buf[];
} nio_req;

/* On success the request owns fd. */
static nio_req *req_new(int fd, size_t cap, aiob_waker *waker) {
  nio_req *r = calloc(1, sizeof *r + cap);
  if (r) {
    r->fd = fd;
    r->cap = cap;
    r->waker = waker;
    atomic_fetch_add(&nio_inflight, 1);
  }
  return r;
}

static void req_free(nio_req *r) {
  close(r->fd);
  free(r);
  atomic_fetch_sub(&nio_inflight, 1);
}

/* The read finished: wake the task, if it still waits. */
static void req_done(nio_req *r, int res) {
  if (r->done)
    return;
  r->done = 1;
  r->res = res;
  if (r->waker)
    aiob_waker_wake(r->waker);
}

/* Per backend:
 *   req_start(native, r)  starts the read; on error returns a negative
 *                         errno and has released r.
 *   req_close(r)          the task lets go of r (it finished, or it was
 *                         dropped mid-read): r is released now, or by the
 *                         native library once it no longer uses it. */
#if defined(NATIVEIO_UV)

static void on_closed(uv_handle_t *h) { req_free(h->data); }

static void on_readable(uv_poll_t *h, int status, int events) {
  (void)events;
  nio_req *r = h->data;
  ssize_t n = status;
  if (status >= 0) {
    n = recv(r->fd, r->buf, r->cap, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
      return; /* another reader was faster: keep waiting */
    if (n < 0)
      n = -errno;
  }
  uv_poll_stop(h);
  req_done(r, (int)n);
}

static int req_start(void *native, nio_req *r) {
  int rc = uv_poll_init(native, &r->poll, r->fd); /* sets O_NONBLOCK */
  if (rc < 0) {
    req_free(r); /* a failed init leaves nothing on the loop */
    return rc;
  }
  r->poll.data = r;
  rc = uv_poll_start(&r->poll, UV_READABLE, on_readable);
  if (rc < 0)
    uv_close((uv_handle_t *)&r->poll, on_closed);
  return rc;
}

static void req_close(nio_req *r) {
  r->waker = NULL;
  uv_close((uv_handle_t *)&r->poll, on_closed); /* stops it too */
}

#elif defined(NATIVEIO_EVENT)

static void on_read(struct bufferevent *bev, void *arg) {
  nio_req *r = arg;
  int n = evbuffer_remove(bufferevent_get_input(bev), r->buf, r->cap);
  bufferevent_disable(bev, EV_READ);
  req_done(r, n < 0 ? AIOB_EIO : n);
}

static void on_event(struct bufferevent *bev, short what, void *arg) {
  nio_req *r = arg;
  int err = EVUTIL_SOCKET_ERROR(); /* set by the failed read */
  bufferevent_disable(bev, EV_READ);
  if (what & BEV_EVENT_EOF)
    req_done(r, 0);
  else
    req_done(r, err ? -err : AIOB_EIO);
}

static int req_start(void *native, nio_req *r) {
  /* A bufferevent reads with readv(2) whenever the fd polls readable: keep
   * a blocking fd from stalling the loop. */
  int fl = fcntl(r->fd, F_GETFL);
  if (fl < 0 ||
      (!(fl & O_NONBLOCK) && fcntl(r->fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
    int rc = -errno;
    req_free(r);
    return rc;
  }
  /* No BEV_OPT_CLOSE_ON_FREE: req_free closes the fd. */
  r->bev = bufferevent_socket_new(native, r->fd, 0);
  if (!r->bev) {
    req_free(r);
    return AIOB_ENOMEM;
  }
  /* Read at most cap bytes from the socket: the rest stays there. */
  bufferevent_setwatermark(r->bev, EV_READ, 0, r->cap);
  bufferevent_setcb(r->bev, on_read, NULL, on_event, r);
  if (bufferevent_enable(r->bev, EV_READ) < 0) {
    int rc = errno ? -errno : AIOB_EIO;
    bufferevent_free(r->bev);
    req_free(r);
    return rc;
  }
  return 0;
}

static void req_close(nio_req *r) {
  /* Deletes its events at once, so no callback of ours runs after this
   * and the fd may be closed; libevent frees the bufferevent itself later
   * on this loop (or when the loop is freed). */
  bufferevent_free(r->bev);
  req_free(r);
}

#else /* NATIVEIO_URING */

static void on_complete(aiob_uring_op *op, int res, unsigned flags) {
  (void)flags; /* single-shot: always the last completion */
  nio_req *r = (nio_req *)((char *)op - offsetof(nio_req, op));
  if (!r->waker) {
    req_free(r); /* its task let go: the kernel is done with buf now */
    return;
  }
  req_done(r, res);
}

static int req_start(void *native, nio_req *r) {
  r->ring = native;
  struct io_uring_sqe *sqe = aiob_uring_get_sqe(r->ring);
  if (!sqe) {
    req_free(r);
    return AIOB_EIO;
  }
  io_uring_prep_recv(sqe, r->fd, r->buf, r->cap, 0);
  r->op.complete = on_complete;
  aiob_uring_sqe_set_op(r->ring, sqe, &r->op);
  return 0;
}

static void req_close(nio_req *r) {
  if (r->done) {
    req_free(r);
    return;
  }
  /* In flight: the kernel may still write into buf, so on_complete frees
   * it. If the cancel cannot be queued the read still completes, at the
   * latest when the runtime shuts down. */
  r->waker = NULL;
  aiob_uring_cancel(r->ring, &r->op);
}

#endif

/* ---- The task --------------------------------------------------------- */

typedef struct recv_task {
  int fd; /* our duplicate until a request owns it, then -1 */
  size_t cap;
  int started;
  aiob_waker *waker;
  nio_req *req; /* the read in flight, or NULL */
} recv_task;

typedef struct nio_bytes {
  size_t len;
  unsigned char data[];
} nio_bytes;

/* First poll: starts the read on the native loop of this loop thread. */
static int recv_start(aiob_task *task, recv_task *t) {
  aiob_runtime *rt = aiob_task_runtime(task);
  void *native =
      aiob_runtime_native(rt, (unsigned)aiob_runtime_current_loop(rt));
  if (!native)
    return AIOB_ESHUTDOWN;
  t->waker = aiob_task_waker(task);
  nio_req *r = req_new(t->fd, t->cap, t->waker);
  if (!r)
    return AIOB_ENOMEM;
  t->fd = -1; /* r owns it now */
  int rc = req_start(native, r);
  if (rc == 0)
    t->req = r;
  return rc;
}

static aiob_poll recv_poll(aiob_task *task, void *p) {
  recv_task *t = p;
  if (!t->started) {
    t->started = 1;
    int rc = recv_start(task, t);
    if (rc < 0) {
      aiob_task_fail(task, rc);
      return AIOB_READY;
    }
    return AIOB_PENDING;
  }
  nio_req *r = t->req;
  if (!r->done)
    return AIOB_PENDING;
  t->req = NULL;
  if (r->res < 0) {
    aiob_task_fail(task, r->res);
  } else {
    nio_bytes *b = malloc(sizeof *b + (size_t)r->res);
    if (b) {
      b->len = (size_t)r->res;
      memcpy(b->data, r->buf, b->len);
      aiob_task_return(task, b, free);
    } else {
      aiob_task_fail(task, AIOB_ENOMEM);
    }
  }
  req_close(r);
  return AIOB_READY;
}

/* Runs once: on the loop thread, where t->req is set only if the task was
 * cancelled mid-read; or wherever the awaitable is let go of if the task
 * never started. */
static void recv_drop(void *p) {
  recv_task *t = p;
  if (t->req)
    req_close(t->req);
  if (t->fd >= 0)
    close(t->fd);
  aiob_waker_release(t->waker);
  free(t);
}

static const aiob_task_vtable recv_vt = {.poll = recv_poll, .drop = recv_drop};

/* Runs on the asyncio loop thread with the GIL; owns out->value. */
static PyObject *bytes_of(aiob_output *out) {
  nio_bytes *b = out->value;
  PyObject *o =
      PyBytes_FromStringAndSize((const char *)b->data, (Py_ssize_t)b->len);
  free(b);
  out->value = NULL;
  return o;
}

/* ---- The module ------------------------------------------------------- */

typedef struct nio_state {
  aiob_py_bridge *bridge;
} nio_state;

static aiob_py_bridge *bridge_of(PyObject *module) {
  return ((nio_state *)PyModule_GetState(module))->bridge;
}

static PyObject *nio_recv(PyObject *module, PyObject *args) {
  PyObject *fdobj;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "On:recv", &fdobj, &n))
    return NULL;
  int fd = PyObject_AsFileDescriptor(fdobj); /* an int or .fileno() */
  if (fd < 0)
    return NULL;
  if (n < 1 || n > NIO_MAX_READ) {
    PyErr_Format(PyExc_ValueError, "recv: n must be in 1..%d, not %zd",
                 NIO_MAX_READ, n);
    return NULL;
  }
  /* Our own fd for the socket: the caller may close theirs at once, and
   * its number cannot be reused under a read in flight. */
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0)
    return PyErr_SetFromErrno(PyExc_OSError);
  recv_task *t = calloc(1, sizeof *t);
  if (!t) {
    close(own);
    return PyErr_NoMemory();
  }
  t->fd = own;
  t->cap = (size_t)n;
  PyObject *awaitable =
      aiob_py_future_into_py(bridge_of(module), &recv_vt, t, bytes_of);
  if (!awaitable) { /* on failure the state is still ours */
    close(own);
    free(t);
  }
  return awaitable;
}

static PyObject *nio_inflight_py(PyObject *module, PyObject *unused) {
  (void)module;
  (void)unused;
  return PyLong_FromLong(atomic_load(&nio_inflight));
}

static PyObject *nio_backend(PyObject *module, PyObject *unused) {
  (void)module;
  (void)unused;
  return PyUnicode_FromString(NATIVEIO_BACKEND);
}

static PyMethodDef nio_methods[] = {
    {"recv", nio_recv, METH_VARARGS,
     "recv(fd, n) -> awaitable of bytes\n\nReads up to n bytes from socket "
     "fd (an int or an object with fileno()) through the backend's native "
     "API; b\"\" at end of file. It reads through its own duplicate of fd: "
     "the caller may close fd at any time."},
    {"inflight", nio_inflight_py, METH_NOARGS,
     "inflight() -> int\n\nNative read requests alive in the process."},
    {"backend", nio_backend, METH_NOARGS,
     "backend() -> str\n\nThe backend this module was compiled for."},
    {NULL, NULL, 0, NULL},
};

static int nio_exec(PyObject *module) {
  return aiob_py_bridge_init(module,
                             &((nio_state *)PyModule_GetState(module))->bridge);
}

static void nio_free(void *module) {
  nio_state *st = PyModule_GetState(module);
  if (st) {
    aiob_py_bridge_free(st->bridge);
    st->bridge = NULL;
  }
}

static PyModuleDef_Slot nio_slots[] = {
    {Py_mod_exec, nio_exec},
    {0, NULL},
};

static struct PyModuleDef nio_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nativeio",
    .m_doc = "Awaitable socket reads on aiobridge's runtime, through the "
             "backend's native API.",
    .m_size = sizeof(nio_state),
    .m_methods = nio_methods,
    .m_slots = nio_slots,
    .m_free = nio_free,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit_nativeio(void);
PyMODINIT_FUNC PyInit_nativeio(void) { return PyModuleDef_Init(&nio_def); }
