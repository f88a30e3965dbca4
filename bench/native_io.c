/* native_io: whole-file reads and a socket echo from Python through each
 * backend's own I/O, for bench/bench_io.py. Built once per backend, as
 * native_io_uv, native_io_event and native_io_uring, each linking aiobridge
 * with that one backend (aiobridge::<backend>, bench/CMakeLists.txt).
 *
 * read_file(path) -> bytes, the whole file, as pathlib's read_bytes:
 *   uv     uv_fs_open, uv_fs_read, uv_fs_close on the task's uv loop; each
 *          step is a trip through libuv's threadpool and back;
 *   uring  IORING_OP_OPENAT, IORING_OP_READ, IORING_OP_CLOSE on the loop's
 *          ring;
 *   event  libevent has no file I/O: open(2), read(2) and close(2) run on
 *          the loop thread, which they block for the whole read (O_NONBLOCK
 *          keeps a FIFO from blocking it forever: a FIFO or device gives
 *          what a non-blocking read finds).
 * Once the file is open, fstat(2) on the loop thread (no I/O) gives the
 * size to allocate; a short read that reaches that size ends the file.
 * uv and uring do not await the close: the task finishes after its last
 * read and the close request frees itself.
 *
 * echo(sock, data) -> bytes: sends data on a connected socket and reads
 * back len(data) bytes (fewer if the peer closes first):
 *   uv     send(2) at once, then a uv_poll_t for readable (and writable
 *          while data is left) and recv(2) / send(2) when ready;
 *   event  the same with two events (EV_READ, EV_WRITE);
 *   uring  IORING_OP_SEND and IORING_OP_RECV, submitted together.
 * echo works on its own duplicate of the socket (F_DUPFD_CLOEXEC), closed
 * with the request; uv_poll_init puts the socket in non-blocking mode.
 *
 * Ownership (docs/install.md, "Native requests on a backend's own loop"):
 * a request is allocated apart from the task's state. A task cancelled
 * while a uv or uring request is in flight lets go of it (uv_cancel,
 * aiob_uring_cancel, uv_close) and the request frees itself in its last
 * native callback; libevent's events are freed in the task's drop, which
 * stops their callbacks at once. inflight() counts the requests alive (a
 * detached close included), so a test can see every one released. */
#include <aiobridge/python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(NIO_BACKEND_UV)
#include <uv.h>
#define NIO_BACKEND "uv"
#define NIO_FILE_METHOD "uv_fs_open/read/close on libuv's threadpool"
#elif defined(NIO_BACKEND_EVENT)
#include <event2/event.h>
#define NIO_BACKEND "event"
#define NIO_FILE_METHOD "open/read/close(2) blocking the loop thread"
#elif defined(NIO_BACKEND_URING)
#include <aiobridge/uring.h>
#define NIO_BACKEND "uring"
#define NIO_FILE_METHOD "IORING_OP_OPENAT/READ/CLOSE"
#else
#error "define one of NIO_BACKEND_UV, NIO_BACKEND_EVENT, NIO_BACKEND_URING"
#endif

#ifndef NIO_MODULE
#error "define NIO_MODULE, the module's name (native_io_<backend>)"
#endif
#define NIO_STR2(x) #x
#define NIO_STR(x) NIO_STR2(x)
#define NIO_CAT2(a, b) a##b
#define NIO_CAT(a, b) NIO_CAT2(a, b)

/* First buffer for a file whose size fstat does not know (/proc). */
#define NIO_CHUNK 8192
/* Largest single read: uv_buf_t and io_uring lengths are 32-bit. */
#define NIO_MAX_STEP ((size_t)1 << 30)
/* Largest echo: its buffers are allocated up front. */
#define NIO_MAX_ECHO (64 * 1024 * 1024)

#define NIO_CONTAINER(ptr, type, member)                                       \
  ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* Requests alive in the process. Not in the module state: requests are
 * released on runtime threads without the GIL, possibly after the
 * awaitable (or the module) is gone. */
static atomic_long nio_inflight;

/* A task's result: bytes made on the asyncio thread by bytes_of. */
typedef struct nio_bytes {
  size_t len, cap;
  unsigned char data[];
} nio_bytes;

static nio_bytes *bytes_new(size_t cap) {
  nio_bytes *b = malloc(sizeof *b + cap);
  if (b) {
    b->len = 0;
    b->cap = cap;
  }
  return b;
}

/* Runs on the asyncio loop thread with the GIL; owns out->value. */
static PyObject *bytes_of(aiob_output *out) {
  nio_bytes *b = out->value;
  PyObject *o =
      PyBytes_FromStringAndSize((const char *)b->data, (Py_ssize_t)b->len);
  free(b);
  out->value = NULL;
  return o;
}

static void *loop_native(aiob_task *task) {
  aiob_runtime *rt = aiob_task_runtime(task);
  return aiob_runtime_native(rt, (unsigned)aiob_runtime_current_loop(rt));
}

/* ==== read_file ========================================================= */

enum { FR_OPEN, FR_READ };

/* One file read. Loop thread only once started: the task's poll and drop
 * and the native callbacks all run on the loop thread that started it. */
typedef struct fr_req {
#if defined(NIO_BACKEND_UV)
  uv_fs_t fs;
  uv_loop_t *loop;
#elif defined(NIO_BACKEND_URING)
  aiob_uring_op op;
  struct io_uring *ring;
#endif
  aiob_waker *waker; /* the task's, borrowed; NULL once the task let go */
  int busy;          /* a native step is in flight */
  int step;          /* FR_OPEN or FR_READ: the last step started */
  int res;           /* its result: a count, an fd, or a negative errno */
  int fd;            /* the open file, or -1 */
  off_t size;        /* st_size once open; 0: unknown */
  size_t asked;      /* bytes the last read asked for */
  nio_bytes *out;    /* what was read */
  char path[];
} fr_req;

static fr_req *fr_new(const char *path) {
  size_t n = strlen(path) + 1;
  fr_req *r = calloc(1, sizeof *r + n);
  if (r) {
    memcpy(r->path, path, n);
    r->fd = -1;
    atomic_fetch_add(&nio_inflight, 1);
  }
  return r;
}

/* Per backend:
 *   fd_close(r)      closes r->fd (uv, uring: a request that frees itself);
 *   fr_submit(r)     starts the step r->step (uv, uring) and returns 0, or a
 *                    negative errno (nothing started);
 *   fr_let_go(r)     the task lets go of r while a step is in flight. */
static void fd_close(fr_req *r);

static void fr_free(fr_req *r) {
  if (r->fd >= 0)
    fd_close(r);
  free(r->out);
  free(r);
  atomic_fetch_sub(&nio_inflight, 1);
}

/* The file is open as fd: r owns it now. Sizes the buffer. Returns 0,
 * fstat's negative errno, or AIOB_ENOMEM. */
static int fr_opened(fr_req *r, int fd) {
  struct stat st;
  r->fd = fd;
  if (fstat(fd, &st) < 0)
    return -errno;
  r->size = S_ISREG(st.st_mode) ? st.st_size : 0;
  if ((unsigned long long)r->size > SIZE_MAX / 2)
    return AIOB_ENOMEM;
  /* One byte more than the size: a read that fills it means the file grew. */
  size_t cap = r->size > 0 ? (size_t)r->size + 1 : NIO_CHUNK;
  r->out = bytes_new(cap);
  return r->out ? 0 : AIOB_ENOMEM;
}

/* Room for the next read: sets r->asked. 0 or AIOB_ENOMEM. */
static int fr_room(fr_req *r) {
  nio_bytes *b = r->out;
  if (b->len == b->cap) {
    if (b->cap > SIZE_MAX / 2 - sizeof *b)
      return AIOB_ENOMEM;
    nio_bytes *nb = realloc(b, sizeof *b + b->cap * 2);
    if (!nb)
      return AIOB_ENOMEM;
    nb->cap *= 2;
    r->out = b = nb;
  }
  r->asked = b->cap - b->len;
  if (r->asked > NIO_MAX_STEP)
    r->asked = NIO_MAX_STEP;
  return 0;
}

/* After a read of n bytes: 1 if the file may have more, 0 at its end. A
 * short read at (or past) the size fstat gave ends a regular file; a file
 * of unknown size ends at a read of 0, as Python's readall. */
static int fr_more(const fr_req *r, size_t n) {
  if (n == 0)
    return 0;
  return !(r->size > 0 && n < r->asked && (off_t)r->out->len >= r->size);
}

#if defined(NIO_BACKEND_UV)

static void on_close_done(uv_fs_t *req) {
  uv_fs_req_cleanup(req);
  free(req);
  atomic_fetch_sub(&nio_inflight, 1);
}

static void fd_close(fr_req *r) {
  uv_fs_t *c = r->loop ? malloc(sizeof *c) : NULL;
  if (c && uv_fs_close(r->loop, c, r->fd, on_close_done) == 0) {
    atomic_fetch_add(&nio_inflight, 1);
  } else {
    free(c);
    close(r->fd);
  }
  r->fd = -1;
}

static void fr_step_done(fr_req *r, int res);

static void on_fs(uv_fs_t *req) {
  fr_req *r = NIO_CONTAINER(req, fr_req, fs);
  int res = (int)req->result;
  uv_fs_req_cleanup(req);
  fr_step_done(r, res);
}

static int fr_submit(fr_req *r) {
  int rc;
  if (r->step == FR_OPEN) {
    rc = uv_fs_open(r->loop, &r->fs, r->path, O_RDONLY | O_CLOEXEC, 0, on_fs);
  } else {
    uv_buf_t buf =
        uv_buf_init((char *)r->out->data + r->out->len, (unsigned)r->asked);
    rc = uv_fs_read(r->loop, &r->fs, r->fd, &buf, 1, -1, on_fs);
  }
  if (rc == 0)
    r->busy = 1;
  return rc;
}

static void fr_let_go(fr_req *r) {
  r->waker = NULL;
  /* Work not started yet completes at once with UV_ECANCELED; started
   * work (a read from the page cache, an open of a FIFO that waits for a
   * writer) runs to its end, and on_fs frees r then. */
  uv_cancel((uv_req_t *)&r->fs);
}

static int fr_begin(aiob_task *task, fr_req *r) {
  r->loop = loop_native(task);
  if (!r->loop)
    return AIOB_ESHUTDOWN;
  r->step = FR_OPEN;
  return fr_submit(r);
}

#elif defined(NIO_BACKEND_URING)

typedef struct close_op {
  aiob_uring_op op;
} close_op;

static void on_close_done(aiob_uring_op *op, int res, unsigned flags) {
  (void)res;
  (void)flags;
  free(NIO_CONTAINER(op, close_op, op));
  atomic_fetch_sub(&nio_inflight, 1);
}

static void fd_close(fr_req *r) {
  close_op *c = r->ring ? calloc(1, sizeof *c) : NULL;
  struct io_uring_sqe *sqe = c ? aiob_uring_get_sqe(r->ring) : NULL;
  if (sqe) {
    io_uring_prep_close(sqe, r->fd);
    c->op.complete = on_close_done;
    aiob_uring_sqe_set_op(r->ring, sqe, &c->op);
    atomic_fetch_add(&nio_inflight, 1);
  } else {
    free(c);
    close(r->fd);
  }
  r->fd = -1;
}

static void fr_step_done(fr_req *r, int res);

static void on_cqe(aiob_uring_op *op, int res, unsigned flags) {
  (void)flags; /* single-shot requests */
  fr_step_done(NIO_CONTAINER(op, fr_req, op), res);
}

static int fr_submit(fr_req *r) {
  struct io_uring_sqe *sqe = aiob_uring_get_sqe(r->ring);
  if (!sqe)
    return AIOB_EIO;
  if (r->step == FR_OPEN)
    io_uring_prep_openat(sqe, AT_FDCWD, r->path, O_RDONLY | O_CLOEXEC, 0);
  else /* offset -1: the file position, as read(2) */
    io_uring_prep_read(sqe, r->fd, r->out->data + r->out->len,
                       (unsigned)r->asked, (__u64)-1);
  memset(&r->op, 0, sizeof r->op);
  r->op.complete = on_cqe;
  aiob_uring_sqe_set_op(r->ring, sqe, &r->op);
  r->busy = 1;
  return 0;
}

static void fr_let_go(fr_req *r) {
  r->waker = NULL;
  /* The kernel may still write into r->out: on_cqe frees r once the
   * request completed (-ECANCELED, or its result if it finished first).
   * If the cancel cannot be queued it completes anyway, at the latest
   * when the runtime shuts down. */
  aiob_uring_cancel(r->ring, &r->op);
}

static int fr_begin(aiob_task *task, fr_req *r) {
  r->ring = loop_native(task);
  if (!r->ring)
    return AIOB_ESHUTDOWN;
  r->step = FR_OPEN;
  return fr_submit(r);
}

#else /* NIO_BACKEND_EVENT */

static void fd_close(fr_req *r) {
  close(r->fd);
  r->fd = -1;
}

/* The whole read, now, on the loop thread. Returns 0 or a negative errno. */
static int fr_read_now(fr_req *r) {
  int fd = open(r->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return -errno;
  int rc = fr_opened(r, fd);
  while (rc == 0 && (rc = fr_room(r)) == 0) {
    ssize_t n = read(fd, r->out->data + r->out->len, r->asked);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      rc = -errno;
      break;
    }
    r->out->len += (size_t)n;
    if (!fr_more(r, (size_t)n))
      break;
  }
  return rc;
}

static void fr_let_go(fr_req *r) { fr_free(r); } /* never in flight */

#endif

#if !defined(NIO_BACKEND_EVENT)

/* A native step finished (on the loop thread): wake the task, or, if it
 * let go, release everything (closing a file opened after all). */
static void fr_step_done(fr_req *r, int res) {
  r->busy = 0;
  r->res = res;
  if (r->step == FR_OPEN && res >= 0)
    r->fd = res; /* r owns it now, even if the task goes before its poll */
  if (r->waker)
    aiob_waker_wake(r->waker);
  else
    fr_free(r);
}

/* The last step finished: start the next one. Returns 1 if one is in
 * flight, 0 at the end of the file, or a negative errno. */
static int fr_continue(fr_req *r) {
  int rc;
  if (r->res < 0)
    return r->res;
  if (r->step == FR_OPEN) {
    if ((rc = fr_opened(r, r->res)) < 0)
      return rc;
    r->step = FR_READ;
  } else {
    r->out->len += (size_t)r->res;
    if (!fr_more(r, (size_t)r->res))
      return 0;
  }
  if ((rc = fr_room(r)) < 0 || (rc = fr_submit(r)) < 0)
    return rc;
  return 1;
}

#endif

/* The task's state: the request until it finishes. */
typedef struct fr_task {
  int started;
  aiob_waker *waker;
  fr_req *req;
} fr_task;

static aiob_poll fr_poll(aiob_task *task, void *p) {
  fr_task *t = p;
  fr_req *r = t->req;
  int rc;
#if defined(NIO_BACKEND_EVENT)
  (void)task;
  rc = fr_read_now(r);
#else
  if (!t->started) {
    t->started = 1;
    t->waker = aiob_task_waker(task);
    r->waker = t->waker;
    rc = fr_begin(task, r);
    if (rc == 0)
      return AIOB_PENDING;
  } else {
    if (r->busy)
      return AIOB_PENDING;
    rc = fr_continue(r);
    if (rc > 0)
      return AIOB_PENDING;
  }
#endif
  if (rc == 0) {
    aiob_task_return(task, r->out, free);
    r->out = NULL;
  } else {
    aiob_task_fail(task, rc);
  }
  t->req = NULL;
  fr_free(r); /* closes the file, without waiting for it (uv, uring) */
  return AIOB_READY;
}

/* Runs once: on the loop thread, where t->req is set only if the task was
 * cancelled mid-read; or wherever the awaitable is let go of if the task
 * never started. */
static void fr_drop(void *p) {
  fr_task *t = p;
  fr_req *r = t->req;
  if (r && r->busy)
    fr_let_go(r);
  else if (r)
    fr_free(r);
  aiob_waker_release(t->waker);
  free(t);
}

static const aiob_task_vtable fr_vt = {.poll = fr_poll, .drop = fr_drop};

/* ==== echo ============================================================== */

/* One echo. Loop thread only once started, as fr_req. */
typedef struct ec_req {
#if defined(NIO_BACKEND_UV)
  uv_poll_t poll;
  int polling; /* poll is initialised: release it with uv_close */
#elif defined(NIO_BACKEND_EVENT)
  struct event *rev, *wev;
#else
  aiob_uring_op send_op, recv_op;
  struct io_uring *ring;
  int sending, receiving; /* the op is in flight */
  int cancelled;          /* the ops in flight were asked to stop */
#endif
  aiob_waker *waker; /* the task's, borrowed; NULL once the task let go */
  int fd;            /* our duplicate of the socket */
  int err;           /* the first error (a negative errno), or 0 */
  int eof;           /* the peer closed */
  size_t len, sent;
  nio_bytes *out; /* received so far: out->len */
  unsigned char data[];
} ec_req;

static ec_req *ec_new(int fd, const void *data, size_t len) {
  ec_req *r = calloc(1, sizeof *r + len);
  nio_bytes *out = bytes_new(len);
  if (!r || !out) {
    free(r);
    free(out);
    return NULL;
  }
  memcpy(r->data, data, len);
  r->len = len;
  r->fd = fd;
  r->out = out;
  atomic_fetch_add(&nio_inflight, 1);
  return r;
}

static void ec_free(ec_req *r) {
  close(r->fd);
  free(r->out);
  free(r);
  atomic_fetch_sub(&nio_inflight, 1);
}

static int ec_finished(const ec_req *r) {
  return r->err || (r->sent == r->len && (r->out->len == r->len || r->eof));
}

#if !defined(NIO_BACKEND_URING)

/* Readiness backends: send and receive what the socket takes now. */
static void ec_send_now(ec_req *r) {
  while (!r->err && r->sent < r->len) {
    ssize_t n = send(r->fd, r->data + r->sent, r->len - r->sent,
                     MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0)
      r->sent += (size_t)n;
    else if (errno == EAGAIN || errno == EWOULDBLOCK)
      return;
    else if (errno != EINTR)
      r->err = -errno;
  }
}

static void ec_recv_now(ec_req *r) {
  nio_bytes *b = r->out;
  while (!r->err && !r->eof && b->len < r->len) {
    ssize_t n = recv(r->fd, b->data + b->len, r->len - b->len, MSG_DONTWAIT);
    if (n > 0)
      b->len += (size_t)n;
    else if (n == 0)
      r->eof = 1;
    else if (errno == EAGAIN || errno == EWOULDBLOCK)
      return;
    else if (errno != EINTR)
      r->err = -errno;
  }
}

#endif

/* Per backend:
 *   ec_start(task, r)  first poll: starts the echo; 0 or a negative errno
 *                      (then r holds nothing native);
 *   ec_step(r)         later polls: 1 while it goes on, 0 once finished
 *                      with nothing in flight;
 *   ec_close(r)        the task lets go of r, finished or not. */
#if defined(NIO_BACKEND_UV)

static void ec_on_closed(uv_handle_t *h) {
  ec_free(NIO_CONTAINER((uv_poll_t *)h, ec_req, poll));
}

static void ec_on_poll(uv_poll_t *h, int status, int events) {
  ec_req *r = NIO_CONTAINER(h, ec_req, poll);
  if (status < 0) {
    r->err = status;
  } else {
    if (events & UV_WRITABLE)
      ec_send_now(r);
    if (events & UV_READABLE)
      ec_recv_now(r);
  }
  if (ec_finished(r)) {
    uv_poll_stop(h);
    if (r->waker)
      aiob_waker_wake(r->waker);
  } else if ((events & UV_WRITABLE) && r->sent == r->len) {
    uv_poll_start(h, UV_READABLE, ec_on_poll);
  }
}

static int ec_start(aiob_task *task, ec_req *r) {
  uv_loop_t *loop = loop_native(task);
  if (!loop)
    return AIOB_ESHUTDOWN;
  ec_send_now(r);
  if (ec_finished(r))
    return 0;
  int rc = uv_poll_init(loop, &r->poll, r->fd); /* sets O_NONBLOCK */
  if (rc < 0)
    return rc; /* a failed init leaves nothing on the loop */
  r->polling = 1;
  rc = uv_poll_start(
      &r->poll, UV_READABLE | (r->sent < r->len ? UV_WRITABLE : 0), ec_on_poll);
  return rc; /* on error ec_close releases the handle */
}

static int ec_step(ec_req *r) { return !ec_finished(r); }

static void ec_close(ec_req *r) {
  r->waker = NULL;
  if (r->polling)
    uv_close((uv_handle_t *)&r->poll, ec_on_closed); /* stops it too */
  else
    ec_free(r);
}

#elif defined(NIO_BACKEND_EVENT)

static void ec_on_event(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  ec_req *r = arg;
  if (what & EV_WRITE)
    ec_send_now(r);
  if (what & EV_READ)
    ec_recv_now(r);
  if (ec_finished(r)) {
    event_del(r->rev);
    event_del(r->wev);
    aiob_waker_wake(r->waker);
  } else if (r->sent == r->len) {
    event_del(r->wev);
  }
}

static int ec_start(aiob_task *task, ec_req *r) {
  struct event_base *base = loop_native(task);
  if (!base)
    return AIOB_ESHUTDOWN;
  ec_send_now(r);
  if (ec_finished(r))
    return 0;
  r->rev = event_new(base, r->fd, EV_READ | EV_PERSIST, ec_on_event, r);
  r->wev = event_new(base, r->fd, EV_WRITE | EV_PERSIST, ec_on_event, r);
  if (!r->rev || !r->wev)
    return AIOB_ENOMEM; /* ec_close frees what was made */
  if (event_add(r->rev, NULL) < 0 ||
      (r->sent < r->len && event_add(r->wev, NULL) < 0))
    return AIOB_EIO;
  return 0;
}

static int ec_step(ec_req *r) { return !ec_finished(r); }

static void ec_close(ec_req *r) {
  /* event_free deletes the event first: no callback of ours runs after
   * this, on this loop thread, so r can go now. */
  if (r->rev)
    event_free(r->rev);
  if (r->wev)
    event_free(r->wev);
  ec_free(r);
}

#else /* NIO_BACKEND_URING */

static void ec_cqe_done(ec_req *r) {
  if (r->waker)
    aiob_waker_wake(r->waker);
  else if (!r->sending && !r->receiving)
    ec_free(r); /* the task let go: the kernel is done with our buffers */
}

static void on_send(aiob_uring_op *op, int res, unsigned flags) {
  (void)flags;
  ec_req *r = NIO_CONTAINER(op, ec_req, send_op);
  r->sending = 0;
  if (res >= 0)
    r->sent += (size_t)res;
  else if (!r->err)
    r->err = res;
  ec_cqe_done(r);
}

static void on_recv(aiob_uring_op *op, int res, unsigned flags) {
  (void)flags;
  ec_req *r = NIO_CONTAINER(op, ec_req, recv_op);
  r->receiving = 0;
  if (res > 0)
    r->out->len += (size_t)res;
  else if (res == 0)
    r->eof = 1;
  else if (!r->err)
    r->err = res;
  ec_cqe_done(r);
}

/* Submits what is missing: the rest of the data, a receive for the rest
 * of the answer. On failure sets r->err. */
static void ec_submit(ec_req *r) {
  struct io_uring_sqe *sqe;
  if (!r->err && !r->sending && r->sent < r->len) {
    if (!(sqe = aiob_uring_get_sqe(r->ring))) {
      r->err = AIOB_EIO;
      return;
    }
    io_uring_prep_send(sqe, r->fd, r->data + r->sent, r->len - r->sent,
                       MSG_NOSIGNAL);
    memset(&r->send_op, 0, sizeof r->send_op);
    r->send_op.complete = on_send;
    aiob_uring_sqe_set_op(r->ring, sqe, &r->send_op);
    r->sending = 1;
  }
  nio_bytes *b = r->out;
  if (!r->err && !r->receiving && !r->eof && b->len < r->len) {
    if (!(sqe = aiob_uring_get_sqe(r->ring))) {
      r->err = AIOB_EIO;
      return;
    }
    io_uring_prep_recv(sqe, r->fd, b->data + b->len, r->len - b->len, 0);
    memset(&r->recv_op, 0, sizeof r->recv_op);
    r->recv_op.complete = on_recv;
    aiob_uring_sqe_set_op(r->ring, sqe, &r->recv_op);
    r->receiving = 1;
  }
}

/* Asks the kernel to stop the ops in flight (once). */
static void ec_cancel(ec_req *r) {
  if (r->cancelled)
    return;
  r->cancelled = 1;
  if (r->sending)
    aiob_uring_cancel(r->ring, &r->send_op);
  if (r->receiving)
    aiob_uring_cancel(r->ring, &r->recv_op);
}

static int ec_start(aiob_task *task, ec_req *r) {
  r->ring = loop_native(task);
  if (!r->ring)
    return AIOB_ESHUTDOWN;
  ec_submit(r);
  /* An error here leaves at most the send in flight: ec_step waits. */
  return 0;
}

static int ec_step(ec_req *r) {
  if (!r->err)
    ec_submit(r);
  if (r->err)
    ec_cancel(r);
  if (r->sending || r->receiving)
    return 1;
  return !ec_finished(r);
}

static void ec_close(ec_req *r) {
  r->waker = NULL;
  if (r->sending || r->receiving)
    ec_cancel(r); /* the last completion frees r */
  else
    ec_free(r);
}

#endif

typedef struct ec_task {
  int started;
  aiob_waker *waker;
  ec_req *req;
} ec_task;

static aiob_poll ec_poll(aiob_task *task, void *p) {
  ec_task *t = p;
  ec_req *r = t->req;
  if (!t->started) {
    t->started = 1;
    t->waker = aiob_task_waker(task);
    r->waker = t->waker;
    int rc = r->len ? ec_start(task, r) : 0;
    if (rc < 0 && !r->err)
      r->err = rc;
  }
  if (ec_step(r))
    return AIOB_PENDING;
  if (r->err) {
    aiob_task_fail(task, r->err);
  } else {
    aiob_task_return(task, r->out, free);
    r->out = NULL;
  }
  t->req = NULL;
  ec_close(r);
  return AIOB_READY;
}

/* As fr_drop: on the loop thread if the task started. */
static void ec_drop(void *p) {
  ec_task *t = p;
  if (t->req && t->started)
    ec_close(t->req);
  else if (t->req)
    ec_free(t->req);
  aiob_waker_release(t->waker);
  free(t);
}

static const aiob_task_vtable ec_vt = {.poll = ec_poll, .drop = ec_drop};

/* ==== The module ======================================================== */

typedef struct nio_state {
  aiob_py_bridge *bridge;
} nio_state;

static aiob_py_bridge *bridge_of(PyObject *module) {
  return ((nio_state *)PyModule_GetState(module))->bridge;
}

static PyObject *nio_read_file(PyObject *module, PyObject *arg) {
  PyObject *path; /* bytes, from str, bytes or os.PathLike */
  if (!PyUnicode_FSConverter(arg, &path))
    return NULL;
  fr_task *t = calloc(1, sizeof *t);
  fr_req *r = t ? fr_new(PyBytes_AS_STRING(path)) : NULL;
  Py_DECREF(path);
  if (!r) {
    free(t);
    return PyErr_NoMemory();
  }
  t->req = r;
  PyObject *awaitable =
      aiob_py_future_into_py(bridge_of(module), &fr_vt, t, bytes_of);
  if (!awaitable) { /* on failure the state is still ours */
    fr_free(r);
    free(t);
  }
  return awaitable;
}

static PyObject *nio_echo(PyObject *module, PyObject *args) {
  PyObject *sock;
  Py_buffer data;
  if (!PyArg_ParseTuple(args, "Oy*:echo", &sock, &data))
    return NULL;
  PyObject *awaitable = NULL;
  int fd = PyObject_AsFileDescriptor(sock); /* an int or .fileno() */
  if (fd < 0)
    goto out;
  if (data.len > NIO_MAX_ECHO) {
    PyErr_Format(PyExc_ValueError, "echo: at most %d bytes, not %zd",
                 NIO_MAX_ECHO, data.len);
    goto out;
  }
  /* Our own fd: the caller may close theirs at once, and its number cannot
   * be reused under an echo in flight. */
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    goto out;
  }
  ec_task *t = calloc(1, sizeof *t);
  ec_req *r = t ? ec_new(own, data.buf, (size_t)data.len) : NULL;
  if (!r) {
    close(own);
    free(t);
    PyErr_NoMemory();
    goto out;
  }
  t->req = r;
  awaitable = aiob_py_future_into_py(bridge_of(module), &ec_vt, t, bytes_of);
  if (!awaitable) {
    ec_free(r);
    free(t);
  }
out:
  PyBuffer_Release(&data);
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
  return PyUnicode_FromString(NIO_BACKEND);
}

static PyObject *nio_file_method(PyObject *module, PyObject *unused) {
  (void)module;
  (void)unused;
  return PyUnicode_FromString(NIO_FILE_METHOD);
}

static PyMethodDef nio_methods[] = {
    {"read_file", nio_read_file, METH_O,
     "read_file(path) -> awaitable of bytes\n\nThe whole file, read "
     "through the backend's own I/O (see file_method())."},
    {"echo", nio_echo, METH_VARARGS,
     "echo(sock, data) -> awaitable of bytes\n\nSends data on a connected "
     "socket (an int or an object with fileno()) and reads back len(data) "
     "bytes, fewer if the peer closes first. Works on its own duplicate of "
     "the socket: the caller may close it at any time."},
    {"inflight", nio_inflight_py, METH_NOARGS,
     "inflight() -> int\n\nNative requests alive in the process."},
    {"backend", nio_backend, METH_NOARGS,
     "backend() -> str\n\nThe backend this module was compiled for."},
    {"file_method", nio_file_method, METH_NOARGS,
     "file_method() -> str\n\nHow read_file reads on this backend."},
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
    .m_name = NIO_STR(NIO_MODULE),
    .m_doc = "File reads and a socket echo through the " NIO_BACKEND
             " backend's own I/O, for bench/bench_io.py.",
    .m_size = sizeof(nio_state),
    .m_methods = nio_methods,
    .m_slots = nio_slots,
    .m_free = nio_free,
};

#define NIO_INIT NIO_CAT(PyInit_, NIO_MODULE)
__attribute__((visibility("default"))) PyMODINIT_FUNC NIO_INIT(void);
PyMODINIT_FUNC NIO_INIT(void) { return PyModuleDef_Init(&nio_def); }
