/* The libevent backend: one event_base per loop thread.
 *
 * Wake: an eventfd watched by a persistent EV_READ event. The alternative,
 * event_active() from other threads, needs evthread_use_pthreads(), a
 * process-wide switch that puts a lock around every event operation of every
 * base in the process — including the extension's own. With an eventfd the
 * base is created with EVENT_BASE_FLAG_NOLOCK and only this loop thread ever
 * touches it; other threads only write(2) the eventfd.
 * Timer: one evtimer, on a base with EVENT_BASE_FLAG_PRECISE_TIMER. fds: one
 * persistent event per watched fd (the core merges waiters per fd). Same shape
 * as the uv backend so the two can be read side by side. */
#include "aiobridge/backend.h"

#include <event2/event.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct evb {
  struct event_base *base;
  struct event *wake_ev;
  struct event *timer;
  int wake_fd;
  aiob_loop *core;
} evb;

typedef struct evb_io {
  struct event *ev;
  evb *b;
  int fd;
  void *token;
} evb_io;

static void on_wake(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  (void)arg;
  uint64_t v;
  while (read(fd, &v, sizeof v) > 0)
    ;
}

static void on_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  evb *b = arg;
  aiob_backend_timer_expired(b->core);
}

static void evb_free(evb *b) {
  if (b->wake_ev)
    event_free(b->wake_ev);
  if (b->timer)
    event_free(b->timer);
  if (b->base)
    event_base_free(b->base);
  if (b->wake_fd >= 0)
    close(b->wake_fd);
  free(b);
}

static int evb_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                         void **out) {
  (void)opts;
  evb *b = calloc(1, sizeof *b);
  if (!b)
    return AIOB_ENOMEM;
  b->core = core;
  b->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (b->wake_fd < 0) {
    int rc = -errno;
    free(b);
    return rc;
  }
  struct event_config *cfg = event_config_new();
  if (cfg) {
    /* Without PRECISE_TIMER libevent reads CLOCK_MONOTONIC_COARSE (one
     * scheduler tick, 4 ms here) and a 1 ms sleep overshoots by ~3 ms. */
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK |
                                   EVENT_BASE_FLAG_PRECISE_TIMER);
    b->base = event_base_new_with_config(cfg);
    event_config_free(cfg);
  }
  if (b->base) {
    b->wake_ev =
        event_new(b->base, b->wake_fd, EV_READ | EV_PERSIST, on_wake, b);
    b->timer = evtimer_new(b->base, on_timer, b);
  }
  if (!b->base || !b->wake_ev || !b->timer || event_add(b->wake_ev, NULL) < 0) {
    evb_free(b);
    return AIOB_ENOMEM;
  }
  *out = b;
  return 0;
}

static void evb_loop_close(void *p) { evb_free(p); }

static int evb_run(void *p, unsigned flags) {
  evb *b = p;
  int f = EVLOOP_ONCE | ((flags & AIOB_RUN_NOWAIT) ? EVLOOP_NONBLOCK : 0);
  return event_base_loop(b->base, f) < 0 ? AIOB_EIO : 0;
}

static int evb_wake(void *p) {
  evb *b = p;
  uint64_t one = 1;
  if (write(b->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
    return -errno;
  return 0;
}

static int evb_timer_start(void *p, uint64_t timeout_ns) {
  evb *b = p;
  uint64_t us = timeout_ns / AIOB_USEC + (timeout_ns % AIOB_USEC != 0);
  struct timeval tv = {.tv_sec = (time_t)(us / 1000000),
                       .tv_usec = (suseconds_t)(us % 1000000)};
  return evtimer_add(b->timer, &tv) < 0 ? AIOB_EINVAL : 0;
}

static void evb_timer_stop(void *p) {
  evb *b = p;
  evtimer_del(b->timer);
}

static void on_io(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  evb_io *io = arg;
  unsigned rev = ((what & EV_READ) ? AIOB_READABLE : 0) |
                 ((what & EV_WRITE) ? AIOB_WRITABLE : 0);
  if (rev)
    aiob_backend_io_ready(io->token, rev);
}

static short ev_events(unsigned events) {
  return (short)(EV_PERSIST | ((events & AIOB_READABLE) ? EV_READ : 0) |
                 ((events & AIOB_WRITABLE) ? EV_WRITE : 0));
}

static int evb_io_arm(evb_io *io, unsigned events) {
  io->ev = event_new(io->b->base, io->fd, ev_events(events), on_io, io);
  if (!io->ev)
    return AIOB_ENOMEM;
  if (event_add(io->ev, NULL) < 0) {
    event_free(io->ev);
    io->ev = NULL;
    return AIOB_EBADF;
  }
  return 0;
}

static int evb_io_start(void *p, int fd, unsigned events, void *token,
                        void **out) {
  evb_io *io = calloc(1, sizeof *io);
  if (!io)
    return AIOB_ENOMEM;
  io->b = p;
  io->fd = fd;
  io->token = token;
  int rc = evb_io_arm(io, events);
  if (rc < 0) {
    free(io);
    return rc;
  }
  *out = io;
  return 0;
}

static int evb_io_modify(void *p, void *handle, unsigned events) {
  (void)p;
  evb_io *io = handle;
  event_free(io->ev); /* deletes it first */
  return evb_io_arm(io, events);
}

static void evb_io_stop(void *p, void *handle) {
  (void)p;
  evb_io *io = handle;
  if (io->ev)
    event_free(io->ev);
  free(io);
}

static void *evb_native(void *p) { return ((evb *)p)->base; }

const aiob_backend aiob__backend_event = {
    .abi_major = AIOB_BACKEND_ABI_MAJOR,
    .size = sizeof(aiob_backend),
    .name = "event",
    .loop_init = evb_loop_init,
    .loop_close = evb_loop_close,
    .run = evb_run,
    .wake = evb_wake,
    .timer_start = evb_timer_start,
    .timer_stop = evb_timer_stop,
    .io_start = evb_io_start,
    .io_modify = evb_io_modify,
    .io_stop = evb_io_stop,
    .native = evb_native,
};
