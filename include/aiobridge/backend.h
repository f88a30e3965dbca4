/* aiobridge — the backend vtable.
 *
 * A backend is one table of function pointers that drives one native event
 * loop per runtime thread. The core owns the loop *thread* and calls the
 * table; the backend owns the native loop. Slots are mechanism only: wake the
 * loop, run one iteration, one timer, fd readiness, and the native handle.
 *
 * Versioning (the SQLite VFS way): the table starts with an ABI header. A
 * table is accepted when abi_major equals AIOB_BACKEND_ABI_MAJOR and size
 * covers every required slot. New slots are only ever appended; the core
 * reaches optional slots through wrappers that check size and NULL, so a
 * table compiled against an older header keeps working.
 *
 * Threads: every slot except `wake` is called only on the loop's own thread
 * (the thread that called loop_init). `wake` may be called from any thread,
 * concurrently, before `run` or while it blocks.
 *
 * Write tables with designated initializers:
 *
 *   const aiob_backend my_backend = {
 *       .abi_major = AIOB_BACKEND_ABI_MAJOR,
 *       .size = sizeof(aiob_backend),
 *       .name = "mine",
 *       .loop_init = my_loop_init, ...
 *   };
 */
#ifndef AIOBRIDGE_BACKEND_H
#define AIOBRIDGE_BACKEND_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AIOB_BACKEND_ABI_MAJOR 1

/* The core's side of one loop thread; opaque to backends. */
typedef struct aiob_loop aiob_loop;

/* Readiness bits for fd watches and aiob_io_wait. */
enum {
  AIOB_READABLE = 1u << 0,
  AIOB_WRITABLE = 1u << 1,
  /* Reported only (never requested): error or hang-up on the fd. */
  AIOB_IO_ERROR = 1u << 2
};

/* Flags for the run slot. */
enum {
  /* Process what is ready without blocking. */
  AIOB_RUN_NOWAIT = 1u << 0
};

/* Options a runtime passes to every loop of its backend. */
typedef struct aiob_backend_options {
  /* io_uring: submission queue entries per ring (0 = backend default). */
  unsigned ring_entries;
  /* Hosted runtimes only (aiob_runtime_new_hosted): the host's loop, for
   * a backend that runs on it (the uv backend: a uv_loop_t * run by its
   * owner, on which it opens its handles); NULL otherwise. */
  void *host;
} aiob_backend_options;

typedef struct aiob_backend {
  /* ABI header. */
  uint32_t abi_major; /* AIOB_BACKEND_ABI_MAJOR */
  uint32_t size;      /* sizeof(aiob_backend) as the implementor compiled it */
  const char *name;   /* short, static, e.g. "uv" */

  /* Required slots (present in every table of ABI major 1). */

  /* Creates a native loop for `core` and stores it in *bl. Called on the loop
   * thread. Returns 0 or a negative code; on failure nothing is left behind
   * and *bl is untouched. */
  int (*loop_init)(aiob_loop *core, const aiob_backend_options *opts,
                   void **bl);

  /* Releases everything loop_init created. Every fd watch has been stopped
   * before. Called on the loop thread after the last run. */
  void (*loop_close)(void *bl);

  /* Runs one iteration: waits (unless AIOB_RUN_NOWAIT) until a wake, the
   * timer or a watched fd is ready, dispatches what is ready (calling
   * aiob_backend_timer_expired / aiob_backend_io_ready) and returns.
   * Spurious early returns are allowed. Returns 0 or a negative code, which
   * is fatal for the loop thread. */
  int (*run)(void *bl, unsigned flags);

  /* Makes a blocked or future `run` return soon. Thread-safe, async-signal
   * unsafe, may coalesce. The core already coalesces wakes, so a backend may
   * assume few calls. Returns 0 or a negative code. */
  int (*wake)(void *bl);

  /* Arms the loop's single timer to expire timeout_ns from now, replacing any
   * earlier arming. On expiry the backend calls aiob_backend_timer_expired
   * once from inside run, and that run must then return without blocking
   * again: the core re-arms only between iterations. Firing late is allowed;
   * firing early is allowed too (the core re-arms), but costs a wake-up. */
  int (*timer_start)(void *bl, uint64_t timeout_ns);

  /* Disarms the timer. After it returns, no expiry for the old arming is
   * reported. Idempotent. */
  void (*timer_stop)(void *bl);

  /* Optional slots: reached through size + NULL checks. */

  /* Starts watching fd for `events` (AIOB_READABLE | AIOB_WRITABLE),
   * persistently, until io_stop. On readiness the backend calls
   * aiob_backend_io_ready(token, revents) from inside run. The core never
   * watches the same fd twice on one loop. Stores a backend handle in *io. */
  int (*io_start)(void *bl, int fd, unsigned events, void *token, void **io);

  /* Changes the watched events of a started watch (never to 0). */
  int (*io_modify)(void *bl, void *io, unsigned events);

  /* Stops a watch and releases its handle; no readiness is reported for it
   * afterwards. The fd itself is not closed. */
  void (*io_stop)(void *bl, void *io);

  /* The native loop (uv_loop_t *, struct event_base *, struct io_uring *),
   * for extension authors who call the native library on the loop thread. */
  void *(*native)(void *bl);
} aiob_backend;

/* Called by a backend, from inside run, when the armed timer expired.
 * Loop thread only. */
AIOB_API void aiob_backend_timer_expired(aiob_loop *core);

/* Called by a backend, from inside run, when a watched fd is ready. `token`
 * is the value given to io_start; revents uses the AIOB_READABLE /
 * AIOB_WRITABLE / AIOB_IO_ERROR bits. Loop thread only. */
AIOB_API void aiob_backend_io_ready(void *token, unsigned revents);

/* Hosted loops (aiob_runtime_new_hosted) have no thread of their own: the
 * host thread runs them from its host loop's callbacks, and their backend
 * is written for that host. Its `run` slot is never called. Its `wake`
 * must make the host call aiob_backend_dispatch soon (from any thread, as
 * usual). Timer expiry and fd readiness are reported from the host's
 * callbacks with aiob_backend_timer_expired / aiob_backend_io_ready, which
 * on a hosted loop also run what became ready. All other slots are called
 * on the host thread. */

/* Called by a hosted loop's backend when its wake fired: runs what is
 * ready, as aiob_runtime_hosted_dispatch. Host thread only. Returns what
 * that returns, or AIOB_EINVAL for a loop that is not hosted. */
AIOB_API int aiob_backend_dispatch(aiob_loop *core);

/* Checks that a table can be used by this core: ABI major, size, name and
 * required slots. Returns 0 or AIOB_EINVAL. Thread-safe. */
AIOB_API int aiob_backend_validate(const aiob_backend *b);

/* The compiled-in backend called `name`, or NULL. Thread-safe. */
AIOB_API const aiob_backend *aiob_backend_find(const char *name);

/* The i-th compiled-in backend (0 <= i), or NULL past the end. The default
 * backend (AIOB_DEFAULT_BACKEND at build time) comes first. Thread-safe. */
AIOB_API const aiob_backend *aiob_backend_at(unsigned i);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_BACKEND_H */
