/* aiobridge — runtimes: N loop threads running one backend.
 *
 * Nearly every function here is thread-safe; each comment says so, or says
 * which threads it must not be called from.
 */
#ifndef AIOBRIDGE_RUNTIME_H
#define AIOBRIDGE_RUNTIME_H

#include "backend.h"
#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aiob_runtime aiob_runtime;

typedef struct aiob_runtime_config {
  /* Compiled-in backend by name ("uv", ...); NULL = the build's default. */
  const char *backend;
  /* A user-supplied backend table; when set it wins over `backend`. The
   * table must outlive the runtime. */
  const aiob_backend *backend_table;
  /* Number of loop threads, >= 1. */
  unsigned threads;
  /* Passed to every loop of the backend. */
  aiob_backend_options backend_options;
  /* Spin before block: with nothing to run, a loop thread first polls its
   * queue of work pushed by other threads for up to this many microseconds
   * before it blocks in the backend. On virtual machines most of a
   * cross-thread round trip is waking a halted vCPU; a spin that catches
   * the next push avoids it. The budget is adaptive per loop: halved by
   * every spin that catches nothing, restored when a blocking wait ended
   * by a push sooner than the budget, so an idle or fd-driven loop stops
   * spinning (an idle loop blocks: it costs no CPU). Under contention
   * (every CPU busy) a spin can hold the CPU the pushing thread waits for:
   * a spin that was preempted, or that missed a push which then came
   * within one budget of blocking, counts as wasted, and when wasted spins
   * outweigh hits the loop stops spinning for 1 ms, doubling up to 128 ms
   * while that lasts. And a loop thread that waits for a CPU (its run
   * delay, from /proc, over a fifth of a 50 ms sample) tries 120 ms of
   * alternate windows with and without the spin, keeps the spin only if
   * it polled half as many tasks again per second, for 250 ms (doubling up
   * to 2 s while trials agree), and tries again (stats: spins_skipped).
   * Timers are never
   * delayed by a spin; fd readiness can be seen up to one budget late.
   * 0 = never spin; at most AIOB_SPIN_US_MAX. */
  unsigned spin_us;
  /* Bound on the worker threads of the runtime's blocking pool, which run
   * aiob_blocking jobs (see task.h, "Blocking work"). Workers start when
   * jobs need them, never more than this many, and live until the runtime
   * shuts down; jobs beyond the bound wait in FIFO order. 0 = the default,
   * AIOB_BLOCKING_THREADS_DEFAULT; at most AIOB_BLOCKING_THREADS_MAX. */
  unsigned blocking_threads;
} aiob_runtime_config;

/* Default and upper bound of aiob_runtime_config.spin_us. */
#define AIOB_SPIN_US_DEFAULT 200
#define AIOB_SPIN_US_MAX 10000

/* Default and upper bound of aiob_runtime_config.blocking_threads. */
#define AIOB_BLOCKING_THREADS_DEFAULT 8
#define AIOB_BLOCKING_THREADS_MAX 1024

/* Fills *cfg with defaults: build's default backend, one thread, a spin of
 * AIOB_SPIN_US_DEFAULT, AIOB_BLOCKING_THREADS_DEFAULT blocking workers at
 * most. Thread-safe. */
AIOB_API void aiob_runtime_config_init(aiob_runtime_config *cfg);

/* Creates a runtime and starts its loop threads; each loop is initialised
 * on its own thread (blocking workers start later, when jobs need them).
 * cfg may be NULL (the defaults) and is not kept, but a backend_table must
 * outlive the runtime. On success the caller owns *out until
 * aiob_runtime_free. Thread-safe. If a loop fails to initialise (for
 * example the kernel refuses io_uring), every started thread is stopped and
 * that error is returned. Errors: AIOB_EINVAL (bad config or backend
 * table), AIOB_ENOENT (no such backend compiled in), AIOB_ENOMEM,
 * AIOB_EAGAIN (no thread could be created), or the backend's loop_init
 * error. */
AIOB_API int aiob_runtime_new(aiob_runtime **out,
                              const aiob_runtime_config *cfg);

/* ---- Hosted runtimes ---------------------------------------------------
 *
 * A hosted runtime has one loop and no thread: the thread that creates it
 * (the host thread) runs its tasks from the callbacks of a host event loop
 * it already runs (an asyncio loop; a libuv loop shared with its owner),
 * with no thread hop. Its backend is written for that host (see
 * backend.h, "Hosted loops"); cfg->backend_options.host hands the host's
 * loop to it. Tasks run inside aiob_runtime_hosted_dispatch or
 * aiob_runtime_hosted_call, or from the backend's callbacks: never
 * concurrently with the host's own code, so a poll function must not
 * block. Spawns, wakes and cancels from other threads work as on any
 * runtime. The backend's handles never keep the host's loop alive (the
 * uv backend unrefs them): the host decides how long its loop runs. */

/* Creates a hosted runtime on the calling thread, which becomes its host
 * thread, and initialises its loop there (Thread-safe: any thread may
 * host one). cfg->threads is ignored (one
 * loop), and so is cfg->spin_us (a host never spins). Errors as
 * aiob_runtime_new, but nothing is started. Free it with
 * aiob_runtime_free, after aiob_runtime_shutdown. */
AIOB_API int aiob_runtime_new_hosted(aiob_runtime **out,
                                     const aiob_runtime_config *cfg);

/* Host thread only: runs what is ready on the hosted runtime (a bounded batch
 * of ready tasks, then due timers), then rearms its timer. Called again from
 * inside such a run (a task's poll calling back into the host), it does
 * nothing: the outer run goes on. Returns 1 when ready work is left (the
 * backend was asked for another dispatch), 0 when nothing is ready,
 * AIOB_EINVAL (NULL, or not a hosted runtime), AIOB_EPERM (not the host
 * thread) or AIOB_ESHUTDOWN. */
AIOB_API int aiob_runtime_hosted_dispatch(aiob_runtime *rt);

/* Host thread only: calls fn(arg) as if it ran on the loop (aiob_spawn onto rt
 * from fn queues the task without waking the backend), then runs what is
 * ready, as aiob_runtime_hosted_dispatch: a task spawned by fn gets its
 * first poll before this returns. Inside a running dispatch, fn's tasks
 * wait for that dispatch to reach them. Returns fn's result, or
 * AIOB_EINVAL / AIOB_EPERM / AIOB_ESHUTDOWN (fn not called). */
AIOB_API int aiob_runtime_hosted_call(aiob_runtime *rt, int (*fn)(void *arg),
                                      void *arg);

/* Stops the runtime: new spawns fail with AIOB_ESHUTDOWN, every task that
 * has not finished is dropped exactly once on its loop thread (joiners see
 * AIOB_ECANCELED), pending aiob_runtime_call callbacks run with
 * AIOB_ECANCELED, the loop threads exit and are joined. Blocking jobs not
 * started yet never start (their tasks are dropped, which drops their
 * args); running ones see aiob_blocking_cancelled() and are waited for:
 * the blocking pool's workers exit and are joined too. rt stays valid
 * until aiob_runtime_free. Thread-safe, except on one of the runtime's own
 * loop threads or blocking workers. Idempotent. Returns 0, AIOB_EDEADLK on
 * one of its loop threads or workers (nothing is done), or AIOB_EINVAL for
 * a NULL rt. */
AIOB_API int aiob_runtime_shutdown(aiob_runtime *rt);

/* What a shutdown left behind, filled by the *_shutdown_timeout calls. */
typedef struct aiob_shutdown_info {
  unsigned loops;      /* loop threads of the runtime */
  unsigned loops_left; /* of them, still running when the call returned */
  uint64_t tasks_left; /* tasks not finished nor dropped by then (approx.:
                          see aiob_runtime_stats.tasks_live) */
  /* Blocking-pool workers still running (in a job's fn) by then. */
  unsigned workers_left;
} aiob_shutdown_info;

/* A hosted runtime shuts down at once on the calling thread: the host
 * thread, or any thread once the host loop no longer calls into the
 * runtime (it was closed). Its tasks are dropped there, its backend loop
 * closed; the timeout of *_shutdown_timeout then only bounds the wait for
 * its blocking workers. */

/* Like aiob_runtime_shutdown, waiting at most timeout_ns (UINT64_MAX: no
 * limit) for the loop threads and the blocking pool's workers to stop. A
 * loop thread can only stop once its backend loop closes, and a native
 * request that never completes (a libuv fs request on a FIFO with no
 * writer), or a callback that blocks, keeps it from closing; a worker
 * stops once the job's fn it runs returns. At the deadline the remaining
 * threads are still asked to stop, and keep running until they do: a
 * later aiob_runtime_shutdown or *_shutdown_timeout waits for them again,
 * and aiob_runtime_free no longer waits but abandons them (see there).
 * info, if not NULL, receives what is left (zeros but `loops` on success).
 * Thread-safe, except on one of the runtime's own loop threads or workers.
 * Returns 0 once every loop thread and worker stopped (and was joined),
 * AIOB_ETIMEDOUT when the deadline came first (see
 * aiob_runtime_loop_running for which loops, info->workers_left for the
 * workers), AIOB_EDEADLK on one of its loop threads or workers (nothing is
 * done), or AIOB_EINVAL for a NULL rt. */
AIOB_API int aiob_runtime_shutdown_timeout(aiob_runtime *rt,
                                           uint64_t timeout_ns,
                                           aiob_shutdown_info *info);

/* Returns 1 while loop thread `index` runs (from aiob_runtime_new until it
 * has closed its loop after a shutdown), 0 once it has exited (or in a
 * forked child, which has none of its parent's threads), AIOB_EINVAL for a
 * NULL rt or a bad index. Thread-safe. */
AIOB_API int aiob_runtime_loop_running(const aiob_runtime *rt, unsigned index);

/* Shuts the runtime down (if not yet) and releases the caller's reference.
 * Memory lives on while task handles still refer to it, so handles stay
 * valid until released. After an aiob_runtime_shutdown_timeout that
 * returned AIOB_ETIMEDOUT it does not wait: the loop threads and blocking
 * workers still running are abandoned (detached, never joined; counted by
 * aiob_runtime_abandoned_threads), and the runtime's memory lives on until
 * the last of them exits. Any thread but the runtime's own loop threads
 * and workers: there it aborts, as the shutdown could never finish. NULL
 * is a no-op. */
AIOB_API void aiob_runtime_free(aiob_runtime *rt);

/* Number of loop threads and blocking-pool workers of this process that
 * were abandoned by a shutdown that timed out (aiob_runtime_free after
 * AIOB_ETIMEDOUT, aiob_runtime_default_shutdown_timeout) and are still
 * running. Such a thread never touches the runtime's owner again: when it
 * gets unstuck it drops its tasks, closes its loop (a worker: frees its
 * job's output and arg), frees what only it still uses and exits. One
 * stuck in a request of libuv's threadpool also keeps the process from
 * exiting: libuv's destructor joins its threadpool threads at exit(), so a
 * program that sees a non-zero count at its end should leave with _exit
 * (the Python bridge does so at interpreter exit). Thread-safe. */
AIOB_API unsigned aiob_runtime_abandoned_threads(void);

/* The process-wide default runtime, created on first call with the
 * configuration given to aiob_runtime_default_configure (or the defaults).
 * The environment variables AIOBRIDGE_BACKEND (a backend name) and
 * AIOBRIDGE_SPIN_US (a decimal spin_us), when set, override the
 * configuration (testing and benchmarking knobs). Thread-safe; while an
 * aiob_runtime_default_shutdown is in progress it waits for it (except on a
 * loop thread or blocking worker). Returns 0 and stores a borrowed pointer
 * valid until aiob_runtime_default_shutdown, or the creation error
 * (AIOB_EINVAL for a malformed or too large AIOBRIDGE_SPIN_US or a NULL
 * out). */
AIOB_API int aiob_runtime_default(aiob_runtime **out);

/* Like aiob_runtime_default, and takes a reference: *out stays valid memory
 * until aiob_runtime_release, even if another thread calls
 * aiob_runtime_default_shutdown meanwhile (spawns on it then fail with
 * AIOB_ESHUTDOWN, and a later aiob_runtime_default_acquire gives the fresh
 * runtime). For code that uses the default runtime while other threads may
 * shut it down, such as a language binding. Thread-safe. Errors as
 * aiob_runtime_default; on error no reference is taken. */
AIOB_API int aiob_runtime_default_acquire(aiob_runtime **out);

/* Releases a reference taken by aiob_runtime_default_acquire (NULL is a
 * no-op). Any thread, including the runtime's own loop threads. */
AIOB_API void aiob_runtime_release(aiob_runtime *rt);

/* Sets the configuration of the default runtime. Must be called before its
 * first successful use: afterwards (even after aiob_runtime_default_shutdown)
 * it returns AIOB_EBUSY and changes nothing, so the process-wide choice can
 * never change under code that already used it. The config is copied;
 * `backend` and `backend_table` must point to static storage. It is
 * checked here, not at first use: a backend name this build does not have
 * is AIOB_ENOENT now, with aiob_runtime_config_error() naming it and the
 * backends there are. Thread-safe. Returns 0, AIOB_EBUSY, AIOB_ENOENT, or
 * AIOB_EINVAL (NULL cfg; threads, spin_us or blocking_threads out of
 * range; a backend table this core cannot use). */
AIOB_API int aiob_runtime_default_configure(const aiob_runtime_config *cfg);

/* Why the last aiob_runtime_new, aiob_runtime_default_configure or
 * creation of the default runtime on this thread refused its
 * configuration, as a sentence naming what was wrong (e.g. `no backend
 * "kqueue" in this build of aiobridge (it has: uv, event)`); "" after a
 * success or a failure of another kind (no memory, a loop that could not
 * start). Thread-local: valid until this thread's next such call.
 * Thread-safe. */
AIOB_API const char *aiob_runtime_config_error(void);

/* Shuts down and frees the default runtime, if it exists. A later
 * aiob_runtime_default creates a fresh one with the same configuration,
 * once this shutdown has finished (on a loop thread: at once). Borrowed
 * pointers to it are invalid afterwards; references from
 * aiob_runtime_default_acquire keep its memory. Thread-safe, except on one
 * of its loop threads. Returns 0, or AIOB_EDEADLK (nothing is done) when
 * called from one of its loop threads.
 *
 * fork(): a child process has none of its parent's loop threads. In the
 * child, every runtime inherited from the parent is shut (spawns fail with
 * AIOB_ESHUTDOWN; its unfinished tasks are abandoned: never polled nor
 * dropped there; aiob_runtime_free only releases its memory), and the
 * default runtime is forgotten: the child's next aiob_runtime_default
 * creates a fresh one. Nothing the child does touches the state a runtime
 * shares with the parent (epoll sets, io_uring rings, eventfds), so the
 * parent's runtimes keep working whatever the child does. */
AIOB_API int aiob_runtime_default_shutdown(void);

/* Like aiob_runtime_default_shutdown, waiting at most timeout_ns
 * (UINT64_MAX: no limit) for the default runtime's loop threads to stop
 * (see aiob_runtime_shutdown_timeout). Either way the default runtime is
 * forgotten: the next aiob_runtime_default creates a fresh one at once, and
 * loop threads that did not stop by the deadline are abandoned (see
 * aiob_runtime_free). info, if not NULL, receives what is left (all zeros
 * when there was no default runtime). Thread-safe, except on one of its
 * loop threads. Returns 0, AIOB_ETIMEDOUT (the deadline came first), or
 * AIOB_EDEADLK (nothing is done) when called from one of its loop
 * threads. */
AIOB_API int aiob_runtime_default_shutdown_timeout(uint64_t timeout_ns,
                                                   aiob_shutdown_info *info);

/* Calls fn(rt, arg) with the default runtime if it exists, holding the lock
 * that keeps it from being shut down meanwhile; never creates it. For
 * reporting (stats, info) without starting threads. rt is borrowed for the
 * call only; fn runs on the calling thread and must not call the
 * aiob_runtime_default* functions. Thread-safe. Returns 0, AIOB_EINVAL for
 * a NULL fn, or AIOB_ENOENT (fn not called) when there is no default
 * runtime: never used yet, or shut down. */
AIOB_API int aiob_runtime_default_peek(void (*fn)(aiob_runtime *rt, void *arg),
                                       void *arg);

/* The backend name ("uv", ...). The string lives as long as the backend
 * table: static for a compiled-in backend. Thread-safe. */
AIOB_API const char *aiob_runtime_backend_name(const aiob_runtime *rt);

/* Number of loop threads. Thread-safe. */
AIOB_API unsigned aiob_runtime_threads(const aiob_runtime *rt);

/* The configured spin_us. Thread-safe. */
AIOB_API unsigned aiob_runtime_spin_us(const aiob_runtime *rt);

/* The bound on the blocking pool's workers: the configured
 * blocking_threads, or AIOB_BLOCKING_THREADS_DEFAULT for 0 (how many were
 * started so far: aiob_runtime_stats.blocking_workers). Thread-safe. */
AIOB_API unsigned aiob_runtime_blocking_threads(const aiob_runtime *rt);

/* The native loop handle of loop thread `index` (uv_loop_t * for "uv"), or
 * NULL if the index is out of range, the backend has no native slot or the
 * runtime is shut down. The backend owns it until the runtime shuts down.
 * Thread-safe, but use the handle only on that loop thread (for example
 * from a task running there or from aiob_runtime_call). */
AIOB_API void *aiob_runtime_native(aiob_runtime *rt, unsigned index);

/* Callback for aiob_runtime_call. status is 0 when it runs normally, or
 * AIOB_ECANCELED when the runtime shut down first. Either way it runs
 * exactly once, on loop thread `index`. */
typedef void (*aiob_call_fn)(void *arg, int status);

/* Queues fn(arg, status) to run on loop thread `index`. On success fn runs
 * exactly once (see aiob_call_fn), so it may release arg. Thread-safe.
 * Returns 0, or AIOB_EINVAL (bad index or NULL fn), AIOB_ESHUTDOWN,
 * AIOB_ENOMEM; on error fn is never called. */
AIOB_API int aiob_runtime_call(aiob_runtime *rt, unsigned index,
                               aiob_call_fn fn, void *arg);

/* Returns the index of the loop thread the caller runs on, if it is one of
 * rt's loop threads, else -1. Thread-safe. */
AIOB_API int aiob_runtime_current_loop(const aiob_runtime *rt);

typedef struct aiob_runtime_stats {
  uint64_t tasks_spawned;   /* successfully spawned */
  uint64_t tasks_completed; /* finished with READY */
  uint64_t tasks_cancelled; /* dropped before READY */
  uint64_t tasks_live;      /* spawned - completed - cancelled, approx. */
  uint64_t polls;           /* poll function calls */
  uint64_t loop_wakes;      /* backend wake calls (after coalescing) */
  uint64_t spins;           /* spins before blocking */
  uint64_t spin_hits;       /* spins that caught a push (no block) */
  uint64_t spin_ns;         /* CPU time spent spinning, in ns */
  /* The blocking pool (see task.h, "Blocking work"). */
  uint64_t blocking_jobs_run;       /* fn calls that returned */
  uint64_t blocking_jobs_cancelled; /* queued jobs dropped before a worker
                                       started them (fn never ran) */
  uint64_t blocking_workers;        /* worker threads started, at most
                                       aiob_runtime_blocking_threads */
  uint64_t spins_skipped; /* spins left out because the loop thread was
                             waiting for a CPU (more runnable threads than
                             CPUs): it blocked at once */
} aiob_runtime_stats;

/* Fills *st with counters summed over the loop threads and the blocking
 * pool. Counters are updated with relaxed atomics: exact once the runtime
 * is idle. Thread-safe. */
AIOB_API void aiob_runtime_stats_get(const aiob_runtime *rt,
                                     aiob_runtime_stats *st);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_RUNTIME_H */
