/* The io_uring backend: one ring per loop thread (liburing).
 *
 * Only the loop thread ever touches its ring's submission queue. Other
 * threads wake the loop by writing an eventfd on which the ring keeps a poll
 * request armed.
 * Timer: no timeout request at all. The core keeps the deadline heap and
 * arms one deadline here; run() waits for completions with that deadline as
 * the wait timeout (IORING_ENTER_EXT_ARG), and reports expiry itself.
 * fds: one one-shot IORING_OP_POLL_ADD in flight per watched fd, re-armed
 * after each completion (persistent semantics). A change of events removes
 * the request in flight; the new mask is armed when its completion arrives.
 * Full submission queue: submit and retry. Completion-queue overflow: the
 * kernel keeps overflowed completions (IORING_FEAT_NODROP, required) and
 * run() flushes them before returning.
 * Extension requests (aiobridge/uring.h): user_data is the op's address
 * with bit 0 set; the loop keeps them in a list so that closing the loop
 * cancels them and still calls each op's complete. */
#include "aiobridge/backend.h"
#include "aiobridge/uring.h"

#include <liburing.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_ENTRIES 256
#define TAG_OP_BIT                                                             \
  ((uint64_t)1) /* an aiob_uring_op (aligned, so bit 0 free)                   \
                 */
#define TAG_WAKE ((uint64_t)2)
#define TAG_IGNORE ((uint64_t)4) /* poll-remove and cancel completions */

typedef struct urb {
  struct io_uring ring; /* first: aiob_uring_* get the urb from the ring */
  int wake_fd;
  aiob_loop *core;
  int timer_armed;
  uint64_t deadline; /* aiob_now_ns clock */
  unsigned dying;    /* stopped watches with a request in flight */
  aiob_uring_op ops; /* list head of extension requests in flight */
} urb;
_Static_assert(offsetof(urb, ring) == 0, "a ring's address is its urb's");

typedef struct urb_io {
  urb *b;
  int fd;
  unsigned events; /* wanted now */
  int inflight;    /* a POLL_ADD is in flight */
  unsigned armed;  /* events of the request in flight */
  int stopped;     /* io_stop called: free once nothing is in flight */
  int dispatching; /* inside aiob_backend_io_ready */
  void *token;
} urb_io;

/* A submission queue entry; when the queue is full, submits and retries.
 * NULL only if the kernel keeps refusing submissions. */
static struct io_uring_sqe *get_sqe(urb *b) {
  struct io_uring_sqe *sqe;
  for (int tries = 0; !(sqe = io_uring_get_sqe(&b->ring)); tries++) {
    if (tries == 1000)
      return NULL;
    int rc = io_uring_submit(&b->ring);
    if (rc == -EBUSY || rc == -EAGAIN)
      io_uring_get_events(&b->ring); /* flush overflowed completions */
    else if (rc < 0 && rc != -EINTR)
      return NULL;
  }
  return sqe;
}

static int arm_wake(urb *b) {
  struct io_uring_sqe *sqe = get_sqe(b);
  if (!sqe)
    return AIOB_EIO;
  io_uring_prep_poll_add(sqe, b->wake_fd, POLLIN);
  io_uring_sqe_set_data64(sqe, TAG_WAKE);
  return 0;
}

static unsigned poll_mask(unsigned events) {
  return ((events & AIOB_READABLE) ? POLLIN : 0) |
         ((events & AIOB_WRITABLE) ? POLLOUT : 0);
}

static int arm_io(urb_io *io) {
  struct io_uring_sqe *sqe = get_sqe(io->b);
  if (!sqe)
    return AIOB_EIO;
  io_uring_prep_poll_add(sqe, io->fd, poll_mask(io->events));
  io_uring_sqe_set_data(sqe, io);
  io->inflight = 1;
  io->armed = io->events;
  return 0;
}

static int cancel_io(urb_io *io) {
  struct io_uring_sqe *sqe = get_sqe(io->b);
  if (!sqe)
    return AIOB_EIO;
  io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)io);
  io_uring_sqe_set_data64(sqe, TAG_IGNORE);
  return 0;
}

static int urb_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                         void **out) {
  urb *b = calloc(1, sizeof *b);
  if (!b)
    return AIOB_ENOMEM;
  b->core = core;
  b->ops.aiob__next = b->ops.aiob__prev = &b->ops;
  unsigned entries =
      opts && opts->ring_entries ? opts->ring_entries : DEFAULT_ENTRIES;
  struct io_uring_params params = {0};
  int rc = io_uring_queue_init_params(entries, &b->ring, &params);
  if (rc < 0) {
    free(b);
    return rc; /* -ENOSYS, -EPERM (disabled or seccomp), -ENOMEM ... */
  }
  if (!(params.features & IORING_FEAT_NODROP) ||
      !(params.features & IORING_FEAT_EXT_ARG)) {
    io_uring_queue_exit(&b->ring);
    free(b);
    return AIOB_ENOTSUP; /* kernel older than 5.11 */
  }
  b->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (b->wake_fd < 0) {
    rc = -errno;
    io_uring_queue_exit(&b->ring);
    free(b);
    return rc;
  }
  if ((rc = arm_wake(b)) < 0 || (rc = io_uring_submit(&b->ring)) < 0) {
    close(b->wake_fd);
    io_uring_queue_exit(&b->ring);
    free(b);
    return rc;
  }
  *out = b;
  return 0;
}

static unsigned reap(urb *b);
static int cancel_op(urb *b, aiob_uring_op *op);
static void op_completion(aiob_uring_op *op, int res, unsigned flags);
#define OP_CANCEL_SENT 1u /* aiob__flags: the loop's close cancelled it */

static void urb_loop_close(void *p) {
  urb *b = p;
  /* Every watch was stopped, but a stopped watch's struct is freed only when
   * its (cancelled) poll completes, and every extension request still gets
   * its completion: cancel those and wait for all of them. */
  while (b->dying > 0 || b->ops.aiob__next != &b->ops) {
    /* Ops submitted meanwhile (by a complete callback) are cancelled too,
     * and a cancel that found no queue entry is tried again. */
    for (aiob_uring_op *op = b->ops.aiob__next; op != &b->ops;
         op = op->aiob__next)
      if (!(op->aiob__flags & OP_CANCEL_SENT) && cancel_op(b, op) == 0)
        op->aiob__flags |= OP_CANCEL_SENT;
    struct io_uring_cqe *cqe;
    if (io_uring_submit_and_wait(&b->ring, 1) < 0 &&
        io_uring_peek_cqe(&b->ring, &cqe) != 0)
      break;
    reap(b);
  }
  /* The ring is unusable if we left early: complete what is left, as
   * promised, before the ring goes. */
  while (b->ops.aiob__next != &b->ops)
    op_completion(b->ops.aiob__next, -ECANCELED, 0);
  io_uring_queue_exit(&b->ring);
  close(b->wake_fd);
  free(b);
}

static void io_completion(urb_io *io, int res) {
  io->inflight = 0;
  if (io->stopped) {
    io->b->dying--;
    free(io);
    return;
  }
  unsigned rev = 0;
  if (res > 0) {
    rev = ((res & POLLIN) ? AIOB_READABLE : 0) |
          ((res & POLLOUT) ? AIOB_WRITABLE : 0);
    if (res & (POLLERR | POLLHUP | POLLNVAL))
      rev |= AIOB_IO_ERROR | (io->armed & (AIOB_READABLE | AIOB_WRITABLE));
    rev &= io->events | AIOB_IO_ERROR;
  } else if (res < 0 && res != -ECANCELED && res != -ENOENT) {
    rev = AIOB_IO_ERROR | io->events;
  }
  if (rev) {
    io->dispatching = 1;
    aiob_backend_io_ready(io->token, rev); /* may stop or modify io */
    io->dispatching = 0;
    if (io->stopped) {
      free(io);
      return;
    }
  }
  arm_io(io);
}

static void op_completion(aiob_uring_op *op, int res, unsigned flags) {
  if (!(flags & IORING_CQE_F_MORE)) { /* the request's last completion */
    op->aiob__prev->aiob__next = op->aiob__next;
    op->aiob__next->aiob__prev = op->aiob__prev;
    op->aiob__next = op->aiob__prev = NULL;
  }
  op->complete(op, res, flags); /* may free op */
}

/* Dispatches every available completion; returns how many. */
static unsigned reap(urb *b) {
  unsigned n = 0;
  struct io_uring_cqe *cqe;
  while (io_uring_peek_cqe(&b->ring, &cqe) == 0) {
    uint64_t tag = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    unsigned cqe_flags = cqe->flags;
    io_uring_cqe_seen(&b->ring, cqe);
    n++;
    if (tag == TAG_WAKE) {
      uint64_t v;
      while (read(b->wake_fd, &v, sizeof v) > 0)
        ;
      arm_wake(b);
    } else if (tag & TAG_OP_BIT) {
      op_completion((aiob_uring_op *)(uintptr_t)(tag & ~TAG_OP_BIT), res,
                    cqe_flags);
    } else if (tag != TAG_IGNORE && tag != 0) {
      io_completion((urb_io *)(uintptr_t)tag, res);
    }
  }
  return n;
}

static int urb_run(void *p, unsigned flags) {
  urb *b = p;
  struct io_uring_cqe *cqe = NULL;
  int rc;
  if (flags & AIOB_RUN_NOWAIT) {
    rc = io_uring_submit(&b->ring);
  } else if (b->timer_armed) {
    uint64_t now = aiob_now_ns();
    uint64_t left = b->deadline > now ? b->deadline - now : 0;
    struct __kernel_timespec ts = {.tv_sec = (long long)(left / AIOB_SEC),
                                   .tv_nsec = (long long)(left % AIOB_SEC)};
    rc = io_uring_submit_and_wait_timeout(&b->ring, &cqe, 1, &ts, NULL);
  } else {
    rc = io_uring_submit_and_wait_timeout(&b->ring, &cqe, 1, NULL, NULL);
  }
  if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN)
    return rc;
  if (io_uring_cq_has_overflow(&b->ring))
    io_uring_get_events(&b->ring);
  while (reap(b) > 0 && io_uring_cq_has_overflow(&b->ring))
    io_uring_get_events(&b->ring);
  if (b->timer_armed && aiob_now_ns() >= b->deadline) {
    b->timer_armed = 0;
    aiob_backend_timer_expired(b->core);
  }
  return 0;
}

static int urb_wake(void *p) {
  urb *b = p;
  uint64_t one = 1;
  if (write(b->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
    return -errno;
  return 0;
}

static int urb_timer_start(void *p, uint64_t timeout_ns) {
  urb *b = p;
  b->deadline = aiob_now_ns() + timeout_ns;
  b->timer_armed = 1;
  return 0;
}

static void urb_timer_stop(void *p) {
  urb *b = p;
  b->timer_armed = 0;
}

static int urb_io_start(void *p, int fd, unsigned events, void *token,
                        void **out) {
  urb_io *io = calloc(1, sizeof *io);
  if (!io)
    return AIOB_ENOMEM;
  io->b = p;
  io->fd = fd;
  io->events = events;
  io->token = token;
  int rc = arm_io(io);
  if (rc < 0) {
    free(io);
    return rc;
  }
  *out = io;
  return 0;
}

static int urb_io_modify(void *p, void *handle, unsigned events) {
  (void)p;
  urb_io *io = handle;
  io->events = events;
  if (io->inflight && io->armed != events)
    return cancel_io(io); /* re-armed with the new mask on completion */
  return 0;
}

static void urb_io_stop(void *p, void *handle) {
  (void)p;
  urb_io *io = handle;
  io->stopped = 1;
  if (io->dispatching)
    return; /* io_completion frees it */
  if (!io->inflight) {
    free(io);
    return;
  }
  io->b->dying++;
  cancel_io(io);
}

static void *urb_native(void *p) { return &((urb *)p)->ring; }

static int cancel_op(urb *b, aiob_uring_op *op) {
  struct io_uring_sqe *sqe = get_sqe(b);
  if (!sqe)
    return AIOB_EIO;
  io_uring_prep_cancel64(sqe, (uint64_t)(uintptr_t)op | TAG_OP_BIT, 0);
  io_uring_sqe_set_data64(sqe, TAG_IGNORE);
  return 0;
}

struct io_uring_sqe *aiob_uring_get_sqe(struct io_uring *ring) {
  return ring ? get_sqe((urb *)ring) : NULL;
}

void aiob_uring_sqe_set_op(struct io_uring *ring, struct io_uring_sqe *sqe,
                           aiob_uring_op *op) {
  urb *b = (urb *)ring;
  io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)op | TAG_OP_BIT);
  op->aiob__flags = 0;
  op->aiob__prev = &b->ops;
  op->aiob__next = b->ops.aiob__next;
  b->ops.aiob__next->aiob__prev = op;
  b->ops.aiob__next = op;
}

int aiob_uring_cancel(struct io_uring *ring, aiob_uring_op *op) {
  if (!ring || !op || !op->aiob__prev)
    return AIOB_EINVAL;
  return cancel_op((urb *)ring, op);
}

const aiob_backend aiob__backend_uring = {
    .abi_major = AIOB_BACKEND_ABI_MAJOR,
    .size = sizeof(aiob_backend),
    .name = "uring",
    .loop_init = urb_loop_init,
    .loop_close = urb_loop_close,
    .run = urb_run,
    .wake = urb_wake,
    .timer_start = urb_timer_start,
    .timer_stop = urb_timer_stop,
    .io_start = urb_io_start,
    .io_modify = urb_io_modify,
    .io_stop = urb_io_stop,
    .native = urb_native,
};
