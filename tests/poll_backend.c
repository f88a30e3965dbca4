/* aiobridge tests — a custom backend built on poll(2).
 *
 * Everything is static except the table. One pb_loop per loop thread:
 *
 *   - wake: an eventfd; any thread writes 1, run() drains it.
 *   - timer: an absolute aiob_now_ns() deadline turned into the poll timeout,
 *     rounded up to whole milliseconds so run() never reports expiry early.
 *   - fd watches: an array of heap-allocated watches. Callbacks from
 *     aiob_backend_io_ready may start, modify or stop watches re-entrantly,
 *     so run() dispatches from a snapshot of (watch id, revents) and looks
 *     each watch up again by its never-reused id before calling the core.
 */
#include "poll_backend.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct pb_watch {
  uint64_t id; /* unique for the loop's lifetime */
  int fd;
  unsigned events; /* AIOB_READABLE | AIOB_WRITABLE */
  void *token;
} pb_watch;

typedef struct pb_ready {
  uint64_t id;
  short revents;
} pb_ready;

typedef struct pb_loop {
  aiob_loop *core;
  int wake_fd;

  bool timer_armed;
  uint64_t timer_deadline; /* aiob_now_ns() clock */

  pb_watch **watches;
  size_t nwatches, cap_watches;
  uint64_t next_id;

  /* Scratch buffers reused by run(): pollfds (slot 0 is the eventfd), the
   * watch id of each pollfd slot, and the dispatch snapshot. */
  struct pollfd *pfds;
  uint64_t *pfd_ids;
  pb_ready *ready;
  size_t cap_scratch; /* capacity of the three buffers, in entries */
} pb_loop;

static const unsigned pb_valid_events = AIOB_READABLE | AIOB_WRITABLE;

static int pb_reserve_scratch(pb_loop *l, size_t n) {
  if (n <= l->cap_scratch)
    return 0;
  size_t cap = l->cap_scratch ? l->cap_scratch : 8;
  while (cap < n)
    cap *= 2;
  struct pollfd *pfds = realloc(l->pfds, cap * sizeof *pfds);
  if (!pfds)
    return -ENOMEM;
  l->pfds = pfds;
  uint64_t *ids = realloc(l->pfd_ids, cap * sizeof *ids);
  if (!ids)
    return -ENOMEM;
  l->pfd_ids = ids;
  pb_ready *ready = realloc(l->ready, cap * sizeof *ready);
  if (!ready)
    return -ENOMEM;
  l->ready = ready;
  l->cap_scratch = cap;
  return 0;
}

static int pb_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                        void **bl) {
  (void)opts;
  pb_loop *l = calloc(1, sizeof *l);
  if (!l)
    return -ENOMEM;
  l->core = core;
  l->next_id = 1;
  l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (l->wake_fd < 0) {
    int err = -errno;
    free(l);
    return err;
  }
  *bl = l;
  return 0;
}

static void pb_loop_close(void *bl) {
  pb_loop *l = bl;
  /* The core stops every watch first; free leftovers defensively. */
  for (size_t i = 0; i < l->nwatches; i++)
    free(l->watches[i]);
  free(l->watches);
  free(l->pfds);
  free(l->pfd_ids);
  free(l->ready);
  close(l->wake_fd);
  free(l);
}

static void pb_drain_wake(pb_loop *l) {
  uint64_t v;
  while (read(l->wake_fd, &v, sizeof v) == (ssize_t)sizeof v)
    ;
}

/* Poll timeout in ms: 0 for NOWAIT or a passed deadline, -1 with no timer,
 * otherwise the time to the deadline rounded up. */
static int pb_timeout_ms(const pb_loop *l, unsigned flags) {
  if (flags & AIOB_RUN_NOWAIT)
    return 0;
  if (!l->timer_armed)
    return -1;
  uint64_t now = aiob_now_ns();
  if (l->timer_deadline <= now)
    return 0;
  uint64_t ms = (l->timer_deadline - now + AIOB_MSEC - 1) / AIOB_MSEC;
  return ms > (uint64_t)INT_MAX ? INT_MAX : (int)ms;
}

static pb_watch *pb_find_id(const pb_loop *l, uint64_t id) {
  for (size_t i = 0; i < l->nwatches; i++)
    if (l->watches[i]->id == id)
      return l->watches[i];
  return NULL;
}

static unsigned pb_revents_to_aiob(short revents, unsigned requested) {
  unsigned bits = 0;
  if (revents & POLLIN)
    bits |= AIOB_READABLE;
  if (revents & POLLOUT)
    bits |= AIOB_WRITABLE;
  if (revents & (POLLERR | POLLNVAL))
    bits |= AIOB_IO_ERROR;
  if (revents & POLLHUP)
    bits |= AIOB_IO_ERROR | (requested & pb_valid_events);
  /* Report only what is still requested (a callback may have narrowed the
   * watch since poll returned), plus errors. */
  return bits & (requested | AIOB_IO_ERROR);
}

static int pb_run(void *bl, unsigned flags) {
  pb_loop *l = bl;
  size_t n = l->nwatches + 1;
  int err = pb_reserve_scratch(l, n);
  if (err)
    return err;

  l->pfds[0] = (struct pollfd){.fd = l->wake_fd, .events = POLLIN};
  l->pfd_ids[0] = 0;
  for (size_t i = 0; i < l->nwatches; i++) {
    const pb_watch *w = l->watches[i];
    short ev = 0;
    if (w->events & AIOB_READABLE)
      ev |= POLLIN;
    if (w->events & AIOB_WRITABLE)
      ev |= POLLOUT;
    l->pfds[i + 1] = (struct pollfd){.fd = w->fd, .events = ev};
    l->pfd_ids[i + 1] = w->id;
  }

  int r = poll(l->pfds, (nfds_t)n, pb_timeout_ms(l, flags));
  if (r < 0) {
    if (errno == EINTR)
      return 0; /* a spurious early return is allowed */
    return -errno;
  }

  if (l->pfds[0].revents)
    pb_drain_wake(l);

  if (l->timer_armed && aiob_now_ns() >= l->timer_deadline) {
    /* Disarm first: the core re-arms from inside the callback. */
    l->timer_armed = false;
    aiob_backend_timer_expired(l->core);
  }

  /* Snapshot what poll reported before any callback can change watches. */
  size_t nready = 0;
  for (size_t i = 1; i < n && r > 0; i++)
    if (l->pfds[i].revents)
      l->ready[nready++] =
          (pb_ready){.id = l->pfd_ids[i], .revents = l->pfds[i].revents};

  for (size_t i = 0; i < nready; i++) {
    pb_watch *w = pb_find_id(l, l->ready[i].id);
    if (!w)
      continue; /* stopped by an earlier callback in this round */
    unsigned bits = pb_revents_to_aiob(l->ready[i].revents, w->events);
    if (bits)
      aiob_backend_io_ready(w->token, bits);
  }
  return 0;
}

static int pb_wake(void *bl) {
  pb_loop *l = bl;
  uint64_t one = 1;
  for (;;) {
    if (write(l->wake_fd, &one, sizeof one) == (ssize_t)sizeof one)
      return 0;
    if (errno == EINTR)
      continue;
    /* EAGAIN: the counter is saturated, so a wake is already pending. */
    return errno == EAGAIN ? 0 : -errno;
  }
}

static int pb_timer_start(void *bl, uint64_t timeout_ns) {
  pb_loop *l = bl;
  uint64_t now = aiob_now_ns();
  l->timer_deadline =
      timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
  l->timer_armed = true;
  return 0;
}

static void pb_timer_stop(void *bl) {
  pb_loop *l = bl;
  l->timer_armed = false;
}

static int pb_io_start(void *bl, int fd, unsigned events, void *token,
                       void **io) {
  pb_loop *l = bl;
  if (fd < 0 || fcntl(fd, F_GETFD) < 0)
    return -EBADF;
  if (!events || (events & ~pb_valid_events))
    return -EINVAL;
  if (l->nwatches == l->cap_watches) {
    size_t cap = l->cap_watches ? 2 * l->cap_watches : 8;
    pb_watch **ws = realloc(l->watches, cap * sizeof *ws);
    if (!ws)
      return -ENOMEM;
    l->watches = ws;
    l->cap_watches = cap;
  }
  pb_watch *w = malloc(sizeof *w);
  if (!w)
    return -ENOMEM;
  *w = (pb_watch){
      .id = l->next_id++, .fd = fd, .events = events, .token = token};
  l->watches[l->nwatches++] = w;
  *io = w;
  return 0;
}

static int pb_io_modify(void *bl, void *io, unsigned events) {
  (void)bl;
  if (!events || (events & ~pb_valid_events))
    return -EINVAL;
  ((pb_watch *)io)->events = events;
  return 0;
}

static void pb_io_stop(void *bl, void *io) {
  pb_loop *l = bl;
  for (size_t i = 0; i < l->nwatches; i++) {
    if (l->watches[i] == io) {
      l->watches[i] = l->watches[--l->nwatches];
      free(io);
      return;
    }
  }
}

static void *pb_native(void *bl) { return bl; }

const aiob_backend aiob_test_poll_backend = {
    .abi_major = AIOB_BACKEND_ABI_MAJOR,
    .size = sizeof(aiob_backend),
    .name = "poll",
    .loop_init = pb_loop_init,
    .loop_close = pb_loop_close,
    .run = pb_run,
    .wake = pb_wake,
    .timer_start = pb_timer_start,
    .timer_stop = pb_timer_stop,
    .io_start = pb_io_start,
    .io_modify = pb_io_modify,
    .io_stop = pb_io_stop,
    .native = pb_native,
};
