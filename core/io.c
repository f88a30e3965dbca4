/* fd readiness waits. The core keeps one record per watched fd on a loop and
 * gives the backend one watch per fd with the union of the waiting events
 * (libuv, for one, misbehaves with two poll handles on one fd). Waits are
 * one-shot; a watch lives while someone waits. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

enum { IO_INIT, IO_ARMED, IO_DONE, IO_STOPPED };

struct aiob__fd_rec {
  aiob_loop *loop;
  int fd;
  unsigned events;    /* watched now */
  void *io;           /* backend handle */
  aiob_io_wait *head; /* waiters */
};

static unsigned rec_wanted(const struct aiob__fd_rec *rec) {
  unsigned ev = 0;
  for (aiob_io_wait *w = rec->head; w; w = w->fd_next)
    ev |= w->events;
  return ev;
}

static void rec_unlink(struct aiob__fd_rec *rec, aiob_io_wait *w) {
  if (w->fd_prev)
    w->fd_prev->fd_next = w->fd_next;
  else
    rec->head = w->fd_next;
  if (w->fd_next)
    w->fd_next->fd_prev = w->fd_prev;
  w->fd_next = w->fd_prev = NULL;
  w->rec = NULL;
}

/* Brings the backend watch in line with the waiters; frees an empty rec. */
static int rec_update(struct aiob__fd_rec *rec) {
  aiob_loop *loop = rec->loop;
  unsigned want = rec_wanted(rec);
  int rc = 0;
  if (want == 0) {
    if (rec->io)
      loop->backend->io_stop(loop->bl, rec->io);
    loop->fds[rec->fd] = NULL;
    free(rec);
    return 0;
  }
  if (!rec->io)
    rc = loop->backend->io_start(loop->bl, rec->fd, want, rec, &rec->io);
  else if (want != rec->events)
    rc = loop->backend->io_modify(loop->bl, rec->io, want);
  if (rc == 0)
    rec->events = want;
  return rc;
}

static void wait_detach(struct aiob__leaf *leaf) {
  aiob_io_wait *w = AIOB__CONTAINER_OF(leaf, aiob_io_wait, leaf);
  struct aiob__fd_rec *rec = w->rec;
  w->state = IO_STOPPED;
  if (!rec)
    return;
  rec_unlink(rec, w);
  rec_update(rec);
}

void aiob_io_wait_init(aiob_io_wait *w, int fd, unsigned events) {
  memset(w, 0, sizeof *w);
  w->leaf.next = w->leaf.prev = &w->leaf;
  w->fd = fd;
  w->events = events;
  w->state = IO_INIT;
}

void aiob_io_wait_stop(aiob_io_wait *w) {
  if (w->state != IO_ARMED)
    return;
  aiob__leaf_unlink(&w->leaf);
  wait_detach(&w->leaf);
}

static aiob_poll io_result(int *result, int value) {
  if (result)
    *result = value;
  return AIOB_READY;
}

static int fds_reserve(aiob_loop *loop, int fd) {
  if ((size_t)fd < loop->nfds)
    return 0;
  size_t n = loop->nfds ? loop->nfds : 64;
  while (n <= (size_t)fd)
    n *= 2;
  struct aiob__fd_rec **fds = realloc(loop->fds, n * sizeof *fds);
  if (!fds)
    return AIOB_ENOMEM;
  memset(fds + loop->nfds, 0, (n - loop->nfds) * sizeof *fds);
  loop->fds = fds;
  loop->nfds = n;
  return 0;
}

aiob_poll aiob_io_wait_poll(aiob_task *self, aiob_io_wait *w, int *result) {
  switch (w->state) {
  case IO_ARMED:
    return AIOB_PENDING;
  case IO_DONE:
    return io_result(result, (int)w->revents);
  case IO_STOPPED:
    return io_result(result, AIOB_ECANCELED);
  default:
    break;
  }
  aiob_loop *loop = self->loop;
  const aiob_backend *b = loop->backend;
  if (w->fd < 0)
    return io_result(result, AIOB_EBADF);
  w->events &= AIOB_READABLE | AIOB_WRITABLE;
  if (!w->events)
    return io_result(result, AIOB_EINVAL);
  if (!AIOB__HAS_SLOT(b, io_start) || !AIOB__HAS_SLOT(b, io_modify) ||
      !AIOB__HAS_SLOT(b, io_stop))
    return io_result(result, AIOB_ENOTSUP);
  int rc = fds_reserve(loop, w->fd);
  if (rc < 0)
    return io_result(result, rc);

  struct aiob__fd_rec *rec = loop->fds[w->fd];
  if (!rec) {
    rec = calloc(1, sizeof *rec);
    if (!rec)
      return io_result(result, AIOB_ENOMEM);
    rec->loop = loop;
    rec->fd = w->fd;
    loop->fds[w->fd] = rec;
  }
  w->fd_prev = NULL;
  w->fd_next = rec->head;
  if (rec->head)
    rec->head->fd_prev = w;
  rec->head = w;
  w->rec = rec;
  rc = rec_update(rec);
  if (rc < 0) {
    rec_unlink(rec, w);
    rec_update(rec);
    w->state = IO_DONE;
    w->revents = 0;
    return io_result(result, rc);
  }
  w->task = self;
  w->leaf.detach = wait_detach;
  aiob__leaf_link(self, &w->leaf);
  w->state = IO_ARMED;
  return AIOB_PENDING;
}

static void io_ready(struct aiob__fd_rec *rec, unsigned revents) {
  aiob_io_wait *w = rec->head;
  while (w) {
    aiob_io_wait *next = w->fd_next;
    unsigned ready = revents & w->events;
    if (revents & AIOB_IO_ERROR)
      ready = (revents & w->events) | AIOB_IO_ERROR;
    if (ready) {
      rec_unlink(rec, w);
      aiob__leaf_unlink(&w->leaf);
      w->revents = ready;
      w->state = IO_DONE;
      aiob_waker_wake((aiob_waker *)w->task);
    }
    w = next;
  }
  rec_update(rec);
}

struct ready_report {
  struct aiob__fd_rec *rec;
  unsigned revents;
};

static void io_ready_report(void *arg) {
  struct ready_report *r = arg;
  io_ready(r->rec, r->revents);
}

void aiob_backend_io_ready(void *token, unsigned revents) {
  struct aiob__fd_rec *rec = token;
  if (rec->loop->hosted)
    aiob__hosted_report(rec->loop, io_ready_report,
                        &(struct ready_report){rec, revents});
  else
    io_ready(rec, revents);
}

/* Loop shutdown: every wait was detached with its task; release the table. */
void aiob__fds_close(aiob_loop *loop) {
  for (size_t i = 0; i < loop->nfds; i++) {
    struct aiob__fd_rec *rec = loop->fds[i];
    if (!rec)
      continue;
    while (rec->head)
      rec_unlink(rec, rec->head);
    rec_update(rec);
  }
  free(loop->fds);
  loop->fds = NULL;
  loop->nfds = 0;
}
