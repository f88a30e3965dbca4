/* aiobridge — tasks: C futures as a poll function over a state struct.
 *
 * A task is a poll function plus a state pointer. The runtime calls
 * poll(task, state) on one loop thread, never concurrently with itself.
 * poll returns AIOB_READY when the task is done, or AIOB_PENDING after it
 * registered interest in something that will wake it (a sleep, an fd, a
 * promise, a join, a waker it handed out). drop(state) runs exactly once,
 * on the task's loop thread, after the last poll — whether the task
 * completed or was cancelled — and is the place to free the state.
 *
 * Threads: functions are loop-thread-only ("inside a poll function of the
 * task") unless tagged Thread-safe.
 */
#ifndef AIOBRIDGE_TASK_H
#define AIOBRIDGE_TASK_H

#include "common.h"
#include "runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aiob_task aiob_task;
typedef struct aiob_waker aiob_waker;

typedef enum aiob_poll { AIOB_PENDING = 0, AIOB_READY = 1 } aiob_poll;

typedef struct aiob_task_vtable {
  /* Required. Advances the task. */
  aiob_poll (*poll)(aiob_task *task, void *state);
  /* Optional. Runs once after the last poll, on the loop thread. Any leaf
   * future still armed in the state (aiob_sleep, aiob_io_wait) has already
   * been disarmed by the core when it runs. */
  void (*drop)(void *state);
  /* Optional. The task's name, shown where the task is (in Python: the
   * CTask's repr and __name__, and asyncio's messages about it), e.g.
   * "myext.read_file". Static storage: the vtable must outlive its tasks
   * anyway. A spawn option's name wins over it. */
  const char *name;
} aiob_task_vtable;

/* A task's result, as seen by a joiner. `value` is owned by whoever took the
 * output; release it with aiob_output_clear (or free_value yourself). */
typedef struct aiob_output {
  int status;                      /* 0, a negative code, AIOB_ECANCELED */
  void *value;                     /* may be NULL */
  void (*free_value)(void *value); /* may be NULL */
} aiob_output;

/* Frees o->value with o->free_value (if both set), on the calling thread,
 * and zeroes *o. Thread-safe for distinct outputs. */
AIOB_API void aiob_output_clear(aiob_output *o);

/* ---- Task-local storage ------------------------------------------------ */

typedef unsigned aiob_local_key;
#define AIOB_LOCAL_KEYS_MAX 16

/* Registers a task-local key for the life of the process. `clone` makes the
 * child's copy when a task spawns a child (NULL: the key is not inherited;
 * a clone returning NULL also skips it); `destroy` releases a value (may be
 * NULL). Both run on the loop thread of the task involved. Thread-safe.
 * Returns 0, AIOB_ENOSPC when AIOB_LOCAL_KEYS_MAX keys exist, or
 * AIOB_EINVAL for a NULL key. */
AIOB_API int aiob_local_key_create(aiob_local_key *key,
                                   void *(*clone)(void *value),
                                   void (*destroy)(void *value));

/* Sets the task's value for key, destroying the previous one. The task owns
 * value: the key's destroy releases it when it is replaced or the task
 * finishes. Inside the task's poll function. Returns 0, AIOB_EINVAL (bad
 * key) or AIOB_ENOMEM (the value is then not stored and not destroyed). */
AIOB_API int aiob_task_local_set(aiob_task *self, aiob_local_key key,
                                 void *value);

/* The task's value for key, or NULL; borrowed, the task keeps owning it.
 * Inside the task's poll function. */
AIOB_API void *aiob_task_local_get(const aiob_task *self, aiob_local_key key);

/* ---- Spawning ---------------------------------------------------------- */

typedef struct aiob_local_init {
  aiob_local_key key;
  void *value;
} aiob_local_init;

typedef struct aiob_spawn_opts {
  /* Loop thread index, or -1: the caller's loop when called from one of the
   * runtime's loop threads, else round robin. */
  int loop;
  /* Non-zero: do not inherit the calling task's task locals. */
  int no_inherit;
  /* Initial task locals (after inheritance, so they override). On success
   * the task owns the values; on failure the caller still does. */
  const aiob_local_init *locals;
  size_t nlocals;
  /* Called once on the task's loop thread when it finished (completed or
   * dropped), after its drop ran and its output was published, so
   * aiob_task_take_output works in it. Not called if spawning fails. */
  void (*on_finish)(void *arg, aiob_task *task);
  void *on_finish_arg;
  /* The task's name (see aiob_task_vtable.name), or NULL for the vtable's.
   * Not copied: static storage, or memory that outlives the task. */
  const char *name;
} aiob_spawn_opts;

/* Fills *opts with defaults: loop -1, inherit task locals, no initial
 * locals, no on_finish, the vtable's name. Thread-safe. */
AIOB_API void aiob_spawn_opts_init(aiob_spawn_opts *opts);

/* Spawns a task running vt->poll over `state` on rt. When called from
 * inside a task, the child inherits the caller's task locals. If `handle`
 * is not NULL it receives a reference to the task (release it with
 * aiob_task_release); otherwise the task is detached. On success the task
 * owns `state` through vt->drop. On failure nothing was queued and neither
 * poll nor drop is ever called: AIOB_EINVAL, AIOB_ESHUTDOWN, AIOB_ENOMEM.
 * Thread-safe: any thread, including loop threads and other runtimes. */
AIOB_API int aiob_spawn(aiob_runtime *rt, const aiob_task_vtable *vt,
                        void *state, aiob_task **handle);

/* aiob_spawn with options (opts may be NULL; it is not kept). Thread-safe.
 * Errors as aiob_spawn, AIOB_EINVAL also for bad opts (loop out of range,
 * bad local key); on error the caller keeps the values of opts->locals. */
AIOB_API int aiob_spawn_ex(aiob_runtime *rt, const aiob_spawn_opts *opts,
                           const aiob_task_vtable *vt, void *state,
                           aiob_task **handle);

/* ---- Handles ----------------------------------------------------------- */

/* Adds a reference. Thread-safe. */
AIOB_API aiob_task *aiob_task_ref(aiob_task *t);

/* Drops a reference; the task keeps running if it has not finished (a
 * handle is not ownership of the work). NULL is a no-op. Thread-safe. */
AIOB_API void aiob_task_release(aiob_task *t);

/* Requests cancellation: unless it already finished, the task is dropped on
 * its loop thread promptly (drop runs once, poll never again) and finishes
 * with AIOB_ECANCELED. A task that returns AIOB_READY from a poll already in
 * progress completes normally. Idempotent. Thread-safe. */
AIOB_API void aiob_task_cancel(aiob_task *t);

/* Returns non-zero once the task finished (completed or dropped) and its
 * drop ran, else 0. Thread-safe. */
AIOB_API int aiob_task_is_finished(const aiob_task *t);

/* Blocks the calling thread until the task finished or timeout_ns elapsed
 * (UINT64_MAX: no limit). The caller holds a reference to t. Thread-safe,
 * but not on a loop thread of any runtime. Returns 0, AIOB_ETIMEDOUT, or
 * AIOB_EDEADLK when called from a loop thread (which would stall that
 * loop). */
AIOB_API int aiob_task_wait(aiob_task *t, uint64_t timeout_ns);

/* Awaits `target`: READY once it finished, with *status set to its status
 * (status may be NULL); PENDING otherwise, and `self` is woken when it
 * finishes. The caller keeps its reference to target; the output stays for
 * aiob_task_take_output. Inside the task's poll function. One task at a
 * time can await a given target: a second one gets READY with AIOB_EBUSY;
 * a task awaiting itself gets READY with AIOB_EDEADLK. */
AIOB_API aiob_poll aiob_task_join(aiob_task *self, aiob_task *target,
                                  int *status);

/* Moves a finished task's output into *out; the caller then owns out->value
 * (aiob_output_clear). Thread-safe. Returns 0, AIOB_EAGAIN if the task has
 * not finished, or AIOB_EALREADY if the value was already taken
 * (out->status is still filled, out->value is NULL). */
AIOB_API int aiob_task_take_output(aiob_task *t, aiob_output *out);

/* ---- Inside a poll function -------------------------------------------- */

/* Sets the value the task finishes with (call before returning READY).
 * The task owns value until a joiner takes it; if nobody does, free_value
 * runs when the last reference goes (on any thread), or when the task is
 * dropped by cancellation. Replaces an earlier value (freeing it); a status
 * set by aiob_task_fail stays. Inside the task's poll function. */
AIOB_API void aiob_task_return(aiob_task *self, void *value,
                               void (*free_value)(void *value));

/* Sets a negative status the task finishes with (an AIOB_E* code, a
 * negated errno, or a code of the caller's own below -4095); a value set by
 * aiob_task_return stays in the output. A task dropped by cancellation
 * finishes with AIOB_ECANCELED whatever was set. A code >= 0 is a bug in
 * the caller: the task then finishes with AIOB_EBADSTATUS (Python raises
 * SystemError naming the task) and AIOB_EINVAL is returned. Inside the
 * task's poll function. Returns 0 or AIOB_EINVAL. */
AIOB_API int aiob_task_fail(aiob_task *self, int err);

/* Finishes the task with `out` as its own output: an awaited or joined
 * result, errno or Python exception (with its traceback) becomes the
 * task's, so `return aiob_task_forward(self, &out);` ends a task that
 * awaited something and returns what it got. Moves out's value (out is
 * left empty). Inside the task's poll function. Returns AIOB_READY. */
AIOB_API aiob_poll aiob_task_forward(aiob_task *self, aiob_output *out);

/* The task's name: the spawn option's, else its vtable's, else NULL.
 * Borrowed. Thread-safe (the caller holds a ref). */
AIOB_API const char *aiob_task_name(const aiob_task *t);

/* The task being polled on this thread, or NULL; borrowed. Thread-safe. */
AIOB_API aiob_task *aiob_task_current(void);

/* The runtime a task belongs to, borrowed: its memory lives while the task
 * does. Thread-safe (the caller holds a ref). */
AIOB_API aiob_runtime *aiob_task_runtime(const aiob_task *t);

/* ---- Wakers ------------------------------------------------------------ */

/* A new waker for the task: a counted reference the caller releases with
 * aiob_waker_release. Inside the task, or on any thread that holds a
 * reference to it. */
AIOB_API aiob_waker *aiob_task_waker(aiob_task *self);

/* Another reference to the same waker. Thread-safe. */
AIOB_API aiob_waker *aiob_waker_clone(aiob_waker *w);

/* Schedules the task's next poll. Coalesces while the task is queued;
 * a wake during a poll makes it poll again after; waking a finished task
 * does nothing. Does not consume the waker. Thread-safe. */
AIOB_API void aiob_waker_wake(aiob_waker *w);

/* Drops a waker reference; NULL is a no-op. Thread-safe. */
AIOB_API void aiob_waker_release(aiob_waker *w);

/* ---- Coroutine macros --------------------------------------------------
 *
 * Let a poll function read like straight-line async code (the protothread
 * switch trick). Keep an `int co` (zero-initialised) in the state; locals
 * do not survive an AWAIT, keep them in the state too; do not AWAIT inside
 * another switch.
 *
 *   static aiob_poll poll(aiob_task *t, void *p) {
 *     struct job *j = p;
 *     AIOB_BEGIN(&j->co);
 *     aiob_sleep_init(&j->sleep, 10 * AIOB_MSEC);
 *     AIOB_AWAIT(&j->co, aiob_sleep_poll(t, &j->sleep, NULL));
 *     printf("slept\n");
 *     AIOB_END(&j->co);
 *   }
 *
 * AIOB_AWAIT and AIOB_YIELD return AIOB_PENDING from the poll function;
 * AIOB_END returns AIOB_READY. */
#define AIOB_BEGIN(co)                                                         \
  switch (*(co)) {                                                             \
  case 0:

#define AIOB_AWAIT(co, expr)                                                   \
  do {                                                                         \
    *(co) = __LINE__;                                                          \
    __attribute__((fallthrough));                                              \
  case __LINE__:                                                               \
    if ((expr) == AIOB_PENDING)                                                \
      return AIOB_PENDING;                                                     \
  } while (0)

/* Lets every other ready task run once, then continues. */
#define AIOB_YIELD(co, task)                                                   \
  do {                                                                         \
    *(co) = __LINE__;                                                          \
    aiob_task_yield_now(task);                                                 \
    return AIOB_PENDING;                                                       \
  case __LINE__:;                                                              \
  } while (0)

#define AIOB_END(co)                                                           \
  }                                                                            \
  *(co) = -1;                                                                  \
  return AIOB_READY

/* Re-queues the task behind every task already ready (used by AIOB_YIELD).
 * Inside the task's poll function. */
AIOB_API void aiob_task_yield_now(aiob_task *self);

/* ---- Leaf futures ------------------------------------------------------
 *
 * Leaf futures live inside a task's state. While one is armed it is linked
 * to its task, and the core disarms it before the task's drop runs, so a
 * cancelled task never leaves a timer or fd watch behind. Their fields are
 * private. */

struct aiob__leaf {
  struct aiob__leaf *next, *prev;
  void (*detach)(struct aiob__leaf *leaf);
};

typedef struct aiob_sleep {
  struct aiob__leaf leaf;
  aiob_task *task;
  uint64_t duration;
  uint64_t deadline;
  size_t heap_index;
  int state;
} aiob_sleep;

/* Prepares a sleep of duration_ns, counted from its first poll. A duration
 * of 0 yields once. The sleep lives in memory the caller owns (usually the
 * task's state). Any thread, while no poll uses *s; must not be called on
 * an armed sleep (aiob_sleep_stop it first). */
AIOB_API void aiob_sleep_init(aiob_sleep *s, uint64_t duration_ns);

/* Prepares a sleep until the absolute aiob_now_ns() time deadline_ns. Any
 * thread, as aiob_sleep_init. */
AIOB_API void aiob_sleep_init_until(aiob_sleep *s, uint64_t deadline_ns);

/* READY once aiob_now_ns() >= the deadline (never earlier), with *status 0;
 * or READY at once with a negative *status (AIOB_ENOMEM). status may be
 * NULL. Inside the task's poll function. */
AIOB_API aiob_poll aiob_sleep_poll(aiob_task *self, aiob_sleep *s, int *status);

/* Disarms an armed sleep (no-op otherwise). Loop thread of its task. */
AIOB_API void aiob_sleep_stop(aiob_sleep *s);

typedef struct aiob_io_wait {
  struct aiob__leaf leaf;
  struct aiob_io_wait *fd_next, *fd_prev;
  void *rec;
  aiob_task *task;
  int fd;
  unsigned events;
  unsigned revents;
  int state;
} aiob_io_wait;

/* Prepares a one-shot wait for fd to become AIOB_READABLE and/or
 * AIOB_WRITABLE. Several waits (from several tasks) may watch one fd. The
 * fd stays the caller's: aiobridge never closes it. Any thread, while no
 * poll uses *w; must not be called on an armed wait. */
AIOB_API void aiob_io_wait_init(aiob_io_wait *w, int fd, unsigned events);

/* READY when the fd is ready, with *result set to the ready bits
 * (AIOB_IO_ERROR included on error/hang-up); or READY at once with a
 * negative *result: AIOB_EBADF (fd < 0), AIOB_EINVAL (no events),
 * AIOB_ENOTSUP (backend without fd support), AIOB_ENOMEM, the backend's
 * error, or AIOB_ECANCELED once the wait was stopped. result may be NULL.
 * Inside the task's poll function. */
AIOB_API aiob_poll aiob_io_wait_poll(aiob_task *self, aiob_io_wait *w,
                                     int *result);

/* Disarms an armed wait (no-op otherwise). Loop thread of its task. */
AIOB_API void aiob_io_wait_stop(aiob_io_wait *w);

/* ---- Promises -----------------------------------------------------------
 *
 * A one-shot slot with two sides: a task awaits it (the waiter side), and
 * any thread completes it (the completer side), typically from a native
 * library callback. This is how callback-style libuv, libevent or io_uring
 * APIs become futures. */

typedef struct aiob_promise aiob_promise;

/* Creates a promise; the caller holds both sides: it gives up the
 * completer side with aiob_promise_complete or aiob_promise_abandon and the
 * waiter side with aiob_promise_release, and the promise is freed with the
 * second. Thread-safe. Returns 0, AIOB_ENOMEM, or AIOB_EINVAL for a NULL
 * out. */
AIOB_API int aiob_promise_new(aiob_promise **out);

/* Completes the promise with status and value and gives up the completer
 * side. The value goes to the waiter; if the waiter side was already
 * released, free_value(value) runs here. Afterwards p is no longer the
 * completer's: once the waiter side is gone too the promise is freed, so
 * a second completion is only safe (and returns AIOB_EALREADY, value not
 * touched) while the caller knows the waiter side is still held.
 * Thread-safe. Returns 0, AIOB_EALREADY, or AIOB_EINVAL for a NULL p. */
AIOB_API int aiob_promise_complete(aiob_promise *p, int status, void *value,
                                   void (*free_value)(void *value));

/* Gives up the completer side without a value: the waiter is woken with
 * AIOB_ECANCELED. p is then no longer the completer's, as after
 * aiob_promise_complete. Thread-safe. Returns 0 or AIOB_EALREADY (or
 * AIOB_EINVAL for a NULL p). */
AIOB_API int aiob_promise_abandon(aiob_promise *p);

/* READY once completed, moving the output into *out (the value only the
 * first time; the caller then owns it; out may be NULL); PENDING otherwise
 * and `self` is woken on completion. Inside the task's poll function. One
 * task at a time may await a promise (another gets READY with
 * out->status AIOB_EBUSY). */
AIOB_API aiob_poll aiob_promise_poll(aiob_task *self, aiob_promise *p,
                                     aiob_output *out);

/* Gives up the waiter side (frees an untaken value once the completer side
 * is gone too). Idempotent; NULL is a no-op. Thread-safe. */
AIOB_API void aiob_promise_release(aiob_promise *p);

/* ---- Blocking work -------------------------------------------------------
 *
 * Blocking C work (a read(2) of a slow file, getaddrinfo, a compression
 * call) must not run on a loop thread: it would stall every task of that
 * loop. An aiob_blocking job runs it on a worker thread of the runtime's
 * blocking pool instead, and wakes the task that awaits it when done.
 * Workers start when jobs need them, never more than the runtime's
 * blocking_threads (aiob_runtime_config); jobs beyond that wait in FIFO
 * order. A job whose task is cancelled or dropped before a worker started
 * it never runs; one that runs is never interrupted, but can poll
 * aiob_blocking_cancelled() to stop early. As in any bounded pool, a job
 * that blocks waiting for other jobs of the same runtime (aiob_task_wait
 * on an aiob_spawn_blocking task) deadlocks once every worker does: jobs
 * should not wait for jobs.
 *
 * Who owns arg: the job, from aiob_blocking_init (or a successful
 * aiob_spawn_blocking) on. drop_arg(arg), if not NULL, runs exactly once:
 * on the worker, right after fn returned and before the task is woken; or,
 * when fn never runs, on the loop thread of the task (at a first poll that
 * fails at once, at aiob_blocking_stop, or when the task is dropped). */

/* The work: runs on a worker thread of the blocking pool, never on a loop
 * thread and never holding the GIL (it must not call Python). *out is
 * zeroed on entry; fn may set out->value and out->free_value (out->status
 * is ignored). Returns 0 or a negative aiobridge/errno code, which becomes
 * the job's status; a positive return is a bug and becomes
 * AIOB_EBADSTATUS, as for aiob_task_fail
 * (the value, if set, is kept and freed as usual). */
typedef int (*aiob_blocking_fn)(void *arg, aiob_output *out);

struct aiob__blocking_job;

/* A leaf future (like aiob_sleep) that runs one job; lives in the task's
 * state. Its fields are private. */
typedef struct aiob_blocking {
  struct aiob__leaf leaf;
  struct aiob__blocking_job *job;
  aiob_blocking_fn fn;
  void *arg;
  void (*drop_arg)(void *arg);
  int state;
  int status;
} aiob_blocking;

/* Prepares a job that runs fn(arg, &out) on the blocking pool, queued by
 * the first aiob_blocking_poll. From here on the job owns arg (see the
 * section's comment): a leaf that is never polled still owns it, so a task
 * whose drop may run before the first poll calls aiob_blocking_stop there
 * (a no-op once the core disarmed the leaf). drop_arg may be NULL; a NULL
 * fn makes the first poll fail with AIOB_EINVAL. Any thread, while no
 * poll uses *b; must not be called on an armed leaf. */
AIOB_API void aiob_blocking_init(aiob_blocking *b, aiob_blocking_fn fn,
                                 void *arg, void (*drop_arg)(void *arg));

/* The first poll queues the job; PENDING until fn returned (self is woken
 * then), READY afterwards with *out set to fn's output: status as
 * aiob_blocking_fn says, and its value, which the caller then owns (out
 * may be NULL: the value is freed here). READY at once, fn never running
 * and arg dropped here, with out->status AIOB_ESHUTDOWN (the runtime is
 * shutting down), AIOB_ENOMEM, or AIOB_EAGAIN (no worker thread could be
 * created and none exists); AIOB_ECANCELED after aiob_blocking_stop; a
 * poll after READY gives the status again without the value. Inside the
 * task's poll function (always the same task). */
AIOB_API aiob_poll aiob_blocking_poll(aiob_task *self, aiob_blocking *b,
                                      aiob_output *out);

/* Disarms: a job not yet started never runs (drop_arg runs here); a
 * running one finishes on its worker, sees aiob_blocking_cancelled(), and
 * its output and arg are freed there; a leaf never polled drops its arg
 * here. No-op after READY or a first stop. Loop thread of its task (or,
 * for a leaf never polled, any thread that owns it). */
AIOB_API void aiob_blocking_stop(aiob_blocking *b);

/* Spawns a task whose only work is one job: it finishes with fn's output
 * (status and value; joinable with aiob_task_join, aiob_task_wait,
 * aiob_task_take_output), and aiob_task_cancel cancels the job as above.
 * opts and handle as aiob_spawn_ex (opts may be NULL). Thread-safe.
 * Returns 0, or the errors of aiob_spawn_ex and AIOB_EINVAL for a NULL fn:
 * then nothing ran and the caller keeps arg (drop_arg is not called). */
AIOB_API int aiob_spawn_blocking(aiob_runtime *rt, const aiob_spawn_opts *opts,
                                 aiob_blocking_fn fn, void *arg,
                                 void (*drop_arg)(void *arg),
                                 aiob_task **handle);

/* Inside a job's fn: returns non-zero once the job was cancelled (its task
 * cancelled or dropped, its leaf stopped; what fn returns is then freed
 * unseen, on its worker) or its runtime began shutting down, so long work
 * can stop early; 0 before, and 0 on any thread that is not running a
 * job. Thread-safe (it reads the calling thread's job). */
AIOB_API int aiob_blocking_cancelled(void);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_TASK_H */
