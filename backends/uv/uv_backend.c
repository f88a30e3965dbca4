/* The libuv backend: one uv_loop_t per loop thread.
 *
 * Wake: an eventfd watched by a uv_poll_t. uv_async_send in libuv 1.44
 * (Debian 12) makes the receiving loop spin and yield while the sender is
 * preempted, which costs tens of microseconds per wake; an eventfd write is
 * one syscall and wakes epoll directly.
 * Timer: a timerfd watched by a uv_poll_t. libuv's own timers count in
 * whole milliseconds on a millisecond clock, so a 1 ms sleep fired 1-2 ms
 * late; a timerfd takes the deadline in nanoseconds, as libevent's precise
 * timer and io_uring's wait timeout do in the other backends.
 * fds: one uv_poll_t per watched fd (the core merges
 * waiters per fd). Every handle is closed through uv_close, and its memory
 * is released only in the close callback.
 * Hosted (aiob_runtime_new_hosted with options.host): the handles live on
 * a uv_loop_t that its owner runs (uvloop's own loop); the callbacks then
 * run the core's work at once (aiob_backend_dispatch). Handles find their
 * memory from their own address and leave `data` NULL: the owner may treat
 * any handle's data as its own object. Closing only closes the handles;
 * their memory goes in the last close callback, when the owner runs its
 * loop again (a loop's close runs it). */
#include "aiobridge/backend.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <uv.h>

typedef struct uvb {
  uv_loop_t own;   /* the loop, unless hosted */
  uv_loop_t *loop; /* &own, or the host's */
  uv_poll_t wake_poll;
  uv_poll_t timer_poll;
  int wake_fd;
  int timer_fd;
  int hosted;
  int closing; /* hosted: handles whose close callback is still due */
  aiob_loop *core;
} uvb;

#define UVB_OF(h, member) ((uvb *)((char *)(h)-offsetof(uvb, member)))

typedef struct uvb_io {
  uv_poll_t poll;
  void *token;
} uvb_io;

static void on_wake(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  uvb *b = UVB_OF(h, wake_poll);
  uint64_t v;
  while (read(b->wake_fd, &v, sizeof v) > 0)
    ;
  if (b->hosted)
    aiob_backend_dispatch(b->core);
}

static void on_timer(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  uvb *b = UVB_OF(h, timer_poll);
  uint64_t n;
  if (read(b->timer_fd, &n, sizeof n) > 0) /* else re-armed meanwhile */
    aiob_backend_timer_expired(b->core);
}

/* Starts watching fd with cb; on failure the handle is closed. */
static int poll_open(uvb *b, uv_poll_t *h, int fd, uv_poll_cb cb) {
  int rc = uv_poll_init(b->loop, h, fd);
  if (rc < 0)
    return rc;
  h->data = NULL;
  rc = uv_poll_start(h, UV_READABLE, cb);
  if (rc < 0)
    uv_close((uv_handle_t *)h, NULL);
  return rc;
}

static int uvb_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                         void **out) {
  uvb *b = calloc(1, sizeof *b);
  if (!b)
    return AIOB_ENOMEM;
  b->core = core;
  b->hosted = opts && opts->host;
  b->loop = b->hosted ? opts->host : &b->own;
  b->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  b->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  int rc = b->wake_fd < 0 || b->timer_fd < 0 ? -errno : 0;
  if (rc == 0 && !b->hosted)
    rc = uv_loop_init(&b->own);
  if (rc < 0) {
    if (b->wake_fd >= 0)
      close(b->wake_fd);
    if (b->timer_fd >= 0)
      close(b->timer_fd);
    free(b);
    return rc;
  }
  rc = poll_open(b, &b->wake_poll, b->wake_fd, on_wake);
  if (rc == 0) {
    rc = poll_open(b, &b->timer_poll, b->timer_fd, on_timer);
    if (rc < 0)
      uv_close((uv_handle_t *)&b->wake_poll, NULL);
  }
  if (rc == 0 && b->hosted) {
    /* The owner decides how long its loop runs: these never keep it
     * alive (a close that bypassed the runtime's own cannot hang). */
    uv_unref((uv_handle_t *)&b->wake_poll);
    uv_unref((uv_handle_t *)&b->timer_poll);
  }
  if (rc < 0 && b->hosted) {
    /* The owner runs the close callback of a handle opened here; the
     * memory of a failed init is then left to it (once, never freed). */
    return rc;
  }
  if (rc < 0) {
    uv_run(&b->own, UV_RUN_DEFAULT);
    uv_loop_close(&b->own);
    close(b->wake_fd);
    close(b->timer_fd);
    free(b);
    return rc;
  }
  *out = b;
  return 0;
}

static void close_leftover(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

static void hosted_closed(uvb *b) {
  if (--b->closing)
    return;
  close(b->wake_fd);
  close(b->timer_fd);
  free(b);
}

static void wake_closed(uv_handle_t *h) { hosted_closed(UVB_OF(h, wake_poll)); }

static void timer_closed(uv_handle_t *h) {
  hosted_closed(UVB_OF(h, timer_poll));
}

static void uvb_loop_close(void *p) {
  uvb *b = p;
  if (b->hosted) {
    b->closing = 2;
    uv_close((uv_handle_t *)&b->wake_poll, wake_closed);
    uv_close((uv_handle_t *)&b->timer_poll, timer_closed);
    return;
  }
  uv_close((uv_handle_t *)&b->wake_poll, NULL);
  uv_close((uv_handle_t *)&b->timer_poll, NULL);
  /* Handles an extension created on the native loop and left open. */
  uv_walk(&b->own, close_leftover, NULL);
  uv_run(&b->own, UV_RUN_DEFAULT);
  uv_loop_close(&b->own);
  close(b->wake_fd);
  close(b->timer_fd);
  free(b);
}

static int uvb_run(void *p, unsigned flags) {
  uvb *b = p;
  uv_run(b->loop, (flags & AIOB_RUN_NOWAIT) ? UV_RUN_NOWAIT : UV_RUN_ONCE);
  return 0;
}

static int uvb_wake(void *p) {
  uvb *b = p;
  uint64_t one = 1;
  if (write(b->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
    return -errno;
  return 0;
}

/* Arms the timerfd relative to now; 0 disarms it. */
static int timer_set(uvb *b, uint64_t ns) {
  struct itimerspec its = {
      .it_value = {.tv_sec = (time_t)(ns / AIOB_SEC),
                   .tv_nsec = (long)(ns % AIOB_SEC)},
  };
  return timerfd_settime(b->timer_fd, 0, &its, NULL) < 0 ? -errno : 0;
}

static int uvb_timer_start(void *p, uint64_t timeout_ns) {
  return timer_set(p, timeout_ns ? timeout_ns : 1); /* 0 would disarm */
}

static void uvb_timer_stop(void *p) { timer_set(p, 0); }

static void on_io(uv_poll_t *h, int status, int events) {
  uvb_io *io = (uvb_io *)((char *)h - offsetof(uvb_io, poll));
  unsigned rev = 0;
  if (status < 0)
    rev = AIOB_IO_ERROR | AIOB_READABLE | AIOB_WRITABLE;
  if (events & UV_READABLE)
    rev |= AIOB_READABLE;
  if (events & UV_WRITABLE)
    rev |= AIOB_WRITABLE;
  if (events & UV_DISCONNECT)
    rev |= AIOB_IO_ERROR;
  if (rev)
    aiob_backend_io_ready(io->token, rev);
}

static int uv_events(unsigned events) {
  /* UV_DISCONNECT: a peer's hang-up is reported as AIOB_IO_ERROR. */
  return ((events & AIOB_READABLE) ? UV_READABLE | UV_DISCONNECT : 0) |
         ((events & AIOB_WRITABLE) ? UV_WRITABLE : 0);
}

static void free_io(uv_handle_t *h) {
  free((char *)h - offsetof(uvb_io, poll));
}

static int uvb_io_start(void *p, int fd, unsigned events, void *token,
                        void **out) {
  uvb *b = p;
  uvb_io *io = calloc(1, sizeof *io);
  if (!io)
    return AIOB_ENOMEM;
  io->token = token;
  int rc = uv_poll_init(b->loop, &io->poll, fd);
  if (rc < 0) {
    free(io);
    return rc;
  }
  io->poll.data = NULL;
  rc = uv_poll_start(&io->poll, uv_events(events), on_io);
  if (rc < 0) {
    uv_close((uv_handle_t *)&io->poll, free_io);
    return rc;
  }
  if (b->hosted)
    uv_unref((uv_handle_t *)&io->poll);
  *out = io;
  return 0;
}

static int uvb_io_modify(void *p, void *handle, unsigned events) {
  (void)p;
  uvb_io *io = handle;
  return uv_poll_start(&io->poll, uv_events(events), on_io);
}

static void uvb_io_stop(void *p, void *handle) {
  (void)p;
  uvb_io *io = handle;
  uv_poll_stop(&io->poll);
  uv_close((uv_handle_t *)&io->poll, free_io);
}

static void *uvb_native(void *p) { return ((uvb *)p)->loop; }

/* For the Python bridge's shared loops (bindings/python/local.c): 1 when
 * the libuv that the loaded module at `object` uses, reporting `version`,
 * is this backend's own (the same object in memory); else 0 and why. */
int aiob__uv_shareable(const char *object, unsigned version, char *why,
                       size_t n);
int aiob__uv_shareable(const char *object, unsigned version, char *why,
                       size_t n) {
  if (version != uv_version()) {
    snprintf(why, n, "uvloop's libuv is %u.%u.%u, aiobridge's is %s",
             version >> 16, (version >> 8) & 0xff, version & 0xff,
             uv_version_string());
    return 0;
  }
  void *h = dlopen(object, RTLD_LAZY | RTLD_NOLOAD);
  if (!h) {
    snprintf(why, n, "uvloop's module %s is not loaded", object);
    return 0;
  }
  void *theirs = dlsym(h, "uv_version");
  dlclose(h);
  if (theirs != (void *)uv_version) {
    snprintf(why, n, "uvloop uses its own copy of libuv %s",
             uv_version_string());
    return 0;
  }
  return 1;
}

const aiob_backend aiob__backend_uv = {
    .abi_major = AIOB_BACKEND_ABI_MAJOR,
    .size = sizeof(aiob_backend),
    .name = "uv",
    .loop_init = uvb_loop_init,
    .loop_close = uvb_loop_close,
    .run = uvb_run,
    .wake = uvb_wake,
    .timer_start = uvb_timer_start,
    .timer_stop = uvb_timer_stop,
    .io_start = uvb_io_start,
    .io_modify = uvb_io_modify,
    .io_stop = uvb_io_stop,
    .native = uvb_native,
};
