/* aiobridge — your own io_uring requests on a "uring" loop.
 *
 * A "uring" loop thread owns one ring (aiob_runtime_native gives its
 * struct io_uring *). Every completion on that ring is dispatched by the
 * loop, so an extension does not reap completions itself: it takes an SQE
 * with aiob_uring_get_sqe, prepares it with liburing's io_uring_prep_*,
 * tags it with its own aiob_uring_op (aiob_uring_sqe_set_op), and the loop
 * submits it before it next waits and calls op->complete with the result.
 *
 *   struct my_read { aiob_uring_op op; aiob_waker *waker; int res; ... };
 *
 *   struct io_uring *ring = aiob_runtime_native(aiob_task_runtime(task),
 *       aiob_runtime_current_loop(aiob_task_runtime(task)));
 *   struct io_uring_sqe *sqe = aiob_uring_get_sqe(ring);
 *   io_uring_prep_read(sqe, fd, r->buf, sizeof r->buf, 0);
 *   aiob_uring_sqe_set_op(ring, sqe, &r->op);
 *
 * Ownership: an op and whatever its request points to (buffers, iovecs)
 * must stay valid until op->complete was called: the kernel writes into
 * them until then. A task dropped while its request is in flight keeps the
 * op alive (allocate it apart from the task's state), calls
 * aiob_uring_cancel, and frees the op in its complete callback.
 *
 * Threads: every function here is loop-thread-only: call them on the loop
 * thread that owns `ring` (from a task's poll or drop, or aiob_runtime_call),
 * never from another thread. */
#ifndef AIOBRIDGE_URING_H
#define AIOBRIDGE_URING_H

#include <liburing.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aiob_uring_op aiob_uring_op;

/* Called on the ring's loop thread, from inside the loop's run, once per
 * completion of the op's request: `res` is the CQE's result (a count, or a
 * negative errno such as -ECANCELED), `flags` its flags (IORING_CQE_F_MORE
 * while a multishot request goes on). A single-shot request completes
 * exactly once, also when cancelled and also while the runtime shuts down
 * (after every task was dropped: then only release the op's resources). */
typedef void (*aiob_uring_complete_fn)(aiob_uring_op *op, int res,
                                       unsigned flags);

/* One request of yours on a ring. Zero it, then set `complete`; the other
 * fields are the loop's. */
struct aiob_uring_op {
  aiob_uring_complete_fn complete;
  struct aiob_uring_op *aiob__next, *aiob__prev; /* in flight on the loop */
  unsigned aiob__flags;
};

/* A free submission queue entry of `ring`, the native handle of a "uring"
 * loop; when the queue is full, submits what is queued first. Prepare it and
 * tag it with aiob_uring_sqe_set_op before the next aiob_uring_get_sqe
 * (which may submit it); for a linked chain of n entries, check
 * io_uring_sq_space_left(ring) >= n first so that no submit splits it.
 * Returns NULL if `ring` is NULL or the kernel keeps refusing submissions.
 * Loop thread of `ring` only. */
AIOB_API struct io_uring_sqe *aiob_uring_get_sqe(struct io_uring *ring);

/* Tags a prepared `sqe` of `ring` as `op`'s request (sets its user_data,
 * so call it after io_uring_prep_*): the loop submits it before it next
 * waits and calls op->complete with its completion. `op` must stay valid
 * until then. Loop thread of `ring` only. */
AIOB_API void aiob_uring_sqe_set_op(struct io_uring *ring,
                                    struct io_uring_sqe *sqe,
                                    aiob_uring_op *op);

/* Asks the kernel to cancel `op`'s request in flight. op->complete is still
 * called once, with -ECANCELED, or with the request's own result if it
 * finished first. Returns 0, AIOB_EINVAL if `op` is not in flight on
 * `ring`, or AIOB_EIO if no submission queue entry could be had. Loop
 * thread of `ring` only. */
AIOB_API int aiob_uring_cancel(struct io_uring *ring, aiob_uring_op *op);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_URING_H */
