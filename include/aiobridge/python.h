/* aiobridge — the asyncio bridge, for C extensions.
 *
 * A C extension links the aiobridge core and this bridge statically (CMake:
 * aiobridge_add_python_extension; docs/install.md) and gets, per extension
 * module:
 *   - aiob_py_future_into_py: a C task as a Python awaitable;
 *   - aiob_py_await: inside a C task, await any Python awaitable;
 *   - completion without the GIL on runtime threads: finished C tasks go
 *     into a per-asyncio-loop queue, and the loop is woken once per batch
 *     through an eventfd watched with loop.add_reader.
 *
 * Threads: each function says "With the GIL" (the caller holds the GIL;
 * where a running asyncio loop is involved, on that loop's thread) or "No
 * GIL needed" (for C tasks on runtime threads, which never take the GIL).
 */
#ifndef AIOBRIDGE_PYTHON_H
#define AIOBRIDGE_PYTHON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "aiobridge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The bridge of one extension module: its runtime, its per-loop queues, its
 * Python types. Owned by the module state. */
typedef struct aiob_py_bridge aiob_py_bridge;
typedef struct aiob_py_locals aiob_py_locals;

/* Output status meaning: the value is a Python exception to raise (set by
 * aiob_py_task_raise or by an awaited Python awaitable that raised). */
#define AIOB_PY_EXCEPTION (-100000)

/* Creates the bridge for `module`, from its Py_mod_exec slot, with the GIL.
 * The runtime is the process-wide default runtime of this extension's copy
 * of aiobridge, created on first use. Imports the `aiobridge` package (an
 * ImportError if it is missing), takes its exception types and registers
 * this runtime there under the module's name, so aiobridge.stats(),
 * runtime_info(), backend() and shutdown() cover it. Registers an atexit
 * hook that stops the runtime before the interpreter finalizes (waiting at
 * most 250 ms: loop threads that do not stop by then are abandoned, and
 * never touch Python); afterwards new C tasks raise
 * aiobridge.ShutdownError. The module state owns *out
 * until aiob_py_bridge_free. Returns 0, or -1 with a Python exception set
 * (*out untouched). */
int aiob_py_bridge_init(PyObject *module, aiob_py_bridge **out);

/* Like aiob_py_bridge_init for a program that embeds Python and has no
 * extension module: the bridge registers with the `aiobridge` package
 * under `name` (copied). With the GIL. The caller owns *out until
 * aiob_py_bridge_free. Returns 0, or -1 with a Python exception set
 * (ValueError for a NULL argument; *out untouched). */
int aiob_py_bridge_new(const char *name, aiob_py_bridge **out);

/* Releases the bridge, from the module's m_free or m_clear, with the GIL.
 * NULL is a no-op. */
void aiob_py_bridge_free(aiob_py_bridge *b);

/* Counters of the bridge's runtime and of the bridge, as a new dict (with
 * the GIL; NULL with an exception set if it cannot be made):
 * tasks_live, tasks_spawned, tasks_completed, tasks_cancelled, polls,
 * loop_wakes, spins, spin_hits, spin_ns, spins_skipped, blocking_jobs_run,
 * blocking_jobs_cancelled, blocking_workers (runtime; zeros while it is not
 * running), completions (C results delivered to asyncio futures),
 * py_loop_wakes (asyncio loops woken to drain their queue), py_awaits
 * (Python awaitables started for C tasks), py_spins and py_spin_hits (an
 * asyncio loop's waits for a C task's next request after completing the
 * task's await of Python, and those that took it), py_spins_skipped (such
 * waits left out because the loop thread was waiting for a CPU),
 * exit_loops_quieted and exit_quiet_timeouts (at interpreter exit, loops of
 * other threads that dropped their loop-local tasks' timer and fd watches,
 * and those that did not in time), ports (asyncio loops known). */
PyObject *aiob_py_bridge_stats(aiob_py_bridge *b);

/* The runtime's backend name as a new str, starting the runtime if needed.
 * With the GIL. NULL with aiobridge.BackendError or ShutdownError set. */
PyObject *aiob_py_bridge_backend(aiob_py_bridge *b);

/* Converts a finished task's output (status >= 0) to a Python object: a new
 * reference, or NULL with an exception set. Runs on the loop thread with the
 * GIL; owns out->value (free it or keep it). NULL converter: None. */
typedef PyObject *(*aiob_py_converter)(aiob_output *out);

/* Spawns a C task and returns its awaitable, an aiobridge.CTask, as a new
 * reference. With the GIL. It is an asyncio future of the running loop
 * (asyncio.isfuture is true: done callbacks, result, exception,
 * cancel(msg), get_loop) and a coroutine (send, throw, close): it can be
 * awaited, given to gather / wait_for / shield / ensure_future (Python
 * 3.10+ take it as it is, no Task), to create_task, used in a TaskGroup, or
 * given to asyncio.run. (asyncio.wait refuses coroutines from 3.11: give it
 * asyncio.create_task(obj) there.)
 * - Inside a running asyncio loop the task starts at once.
 * - With no running loop, it binds to the loop that first runs it and
 *   starts the task then (so asyncio.run(ext.fn()) works); until then it
 *   is not a future (isfuture false), only a coroutine.
 * Cancelling it cancels the C task; collecting it unfinished does too. On
 * success the awaitable owns `state` (through vt->drop, which also runs if
 * the task never starts: the awaitable cancelled or collected first). A
 * negative status raises the OSError subclass for that errno
 * (AIOB_ECANCELED: asyncio.CancelledError, or aiobridge.ShutdownError when
 * the runtime was shut down: the task was dropped by the shutdown, or
 * will never finish on a loop thread that did not stop in time);
 * AIOB_PY_EXCEPTION raises the
 * carried exception; a failure nobody retrieved goes to the loop's
 * exception handler, as for asyncio futures. On failure returns NULL with
 * an exception set and neither poll nor drop is ever called: the caller
 * still owns `state`; once the task is spawned nothing fails any more. */
PyObject *aiob_py_future_into_py(aiob_py_bridge *b, const aiob_task_vtable *vt,
                                 void *state, aiob_py_converter conv);

/* ---- Loop-local C tasks ------------------------------------------------
 *
 * A loop-local C task is polled on the asyncio loop's own thread, with no
 * thread hop (pyo3's local_future_into_py): for C work that is cheap and
 * never blocks (parsers, protocol state machines, glue between native
 * requests). Its timers and fd waits are served by that loop. Each loop
 * runs its local tasks on a hosted runtime of its own (runtime.h), in one
 * of two forms:
 * - "shared": the loop is a uvloop.Loop whose libuv is the very library
 *   (and version) this extension's uv backend uses, and the extension's
 *   runtime uses the uv backend. Local tasks then run as libuv handles on
 *   uvloop's own uv_loop_t (aiob_runtime_native of aiob_task_runtime(self)
 *   gives it), polled without the GIL; every handle is closed before the
 *   loop closes.
 * - "asyncio": any other loop (or AIOBRIDGE_LOCAL_SHARED=0). Timers are
 *   loop.call_at, fd waits add_reader / add_writer, and polls run in those
 *   callbacks, with the GIL.
 * aiob_py_local_info tells which form a loop uses, and why not "shared".
 * The loop's close() (an instance attribute put on the loop at the first
 * local spawn) drops the local tasks left and closes their runtime first.
 * A local task may spawn tasks on any runtime, await them, and await
 * Python; tasks it spawns with aiob_spawn(aiob_task_runtime(self), ...)
 * are loop-local too. It must never block: the loop waits for its poll. */

/* Like aiob_py_future_into_py, but the C task is loop-local: it runs on
 * the running loop's thread (or, made with no running loop, on the thread
 * of the loop that first awaits it), and its first poll runs before this
 * returns, so a task that is done at once gives an awaitable already done
 * (awaiting it does not yield to the loop). With the GIL. Errors as
 * aiob_py_future_into_py, plus aiobridge.ShutdownError once the loop's
 * local tasks were shut down (the loop was closed), and RuntimeError on a
 * thread other than the one that ran the loop's first local task. */
PyObject *aiob_py_local_future_into_py(aiob_py_bridge *b,
                                       const aiob_task_vtable *vt, void *state,
                                       aiob_py_converter conv);

/* How the running loop runs local tasks, as a new dict (with the GIL):
 * {"mode": "shared" | "asyncio" | None (no local task ran on it yet),
 *  "reason": why not "shared" (a str), or None, "tasks_live": local tasks
 *  not finished}. NULL with RuntimeError outside a running loop. */
PyObject *aiob_py_local_info(aiob_py_bridge *b);

/* ---- Task locals ------------------------------------------------------ */

/* Task locals: the asyncio loop and the contextvars context a C task's
 * Python work runs in. Every C task started by the bridge has them; child
 * tasks it spawns inherit them (task-local storage), so they can await
 * Python too. Immutable and reference-counted; clone and release from any
 * thread. */

/* The current task locals, a new reference:
 * - called while a C task that has locals is being polled on this thread:
 *   that task's locals (no GIL needed: this case never touches Python);
 * - otherwise (GIL held): the running asyncio loop and a copy of the
 *   current context.
 * NULL with RuntimeError("no running event loop") if neither holds. */
aiob_py_locals *aiob_py_get_current_locals(aiob_py_bridge *b);

/* The loop of aiob_py_get_current_locals, a new reference. With the GIL.
 * NULL with RuntimeError if there is none. */
PyObject *aiob_py_get_current_loop(aiob_py_bridge *b);

/* Explicit locals: `loop` and `context` (a contextvars.Context; NULL = a
 * copy of the current one), as a new reference; loop and context are not
 * stolen. With the GIL, on any thread (for callers off the loop's thread).
 * NULL with an exception set: TypeError for a missing loop or a bad
 * context. */
aiob_py_locals *aiob_py_locals_new(aiob_py_bridge *b, PyObject *loop,
                                   PyObject *context);

/* A C task's locals as a new reference, or NULL if it has none. Inside the
 * task's poll function; no GIL needed. */
aiob_py_locals *aiob_py_task_locals(aiob_task *self);

/* New reference to the same locals (NULL gives NULL). Any thread, no GIL
 * needed. */
aiob_py_locals *aiob_py_locals_clone(aiob_py_locals *l);

/* Releases a reference (NULL is a no-op). Any thread, no GIL needed. */
void aiob_py_locals_release(aiob_py_locals *l);

/* Borrowed loop and context of `l` (GIL held). The context of locals made
 * from an empty contextvars snapshot is created on the first call; NULL
 * only if that fails (out of memory). */
PyObject *aiob_py_locals_loop(aiob_py_locals *l);
PyObject *aiob_py_locals_context(aiob_py_locals *l);

/* Like aiob_py_future_into_py, for the loop and context of `locals`: the C
 * task starts at once even when the caller is not on that loop's thread;
 * the returned awaitable must be awaited on that loop. The locals are not
 * consumed. With the GIL held, on any thread. Errors as
 * aiob_py_future_into_py, and ValueError for NULL locals. */
PyObject *aiob_py_future_into_py_with_locals(aiob_py_bridge *b,
                                             aiob_py_locals *locals,
                                             const aiob_task_vtable *vt,
                                             void *state,
                                             aiob_py_converter conv);

/* Makes the task finish with `exc_type(msg)` (status AIOB_PY_EXCEPTION).
 * exc_type is borrowed and must outlive the task (a built-in exception or
 * one the module keeps); msg is copied. Inside the task's poll function; no
 * GIL needed. Returns 0, AIOB_EINVAL (NULL exc_type) or AIOB_ENOMEM
 * (nothing is set). */
int aiob_py_task_raise(aiob_task *self, PyObject *exc_type, const char *msg);

/* Makes the task fail with the negated errno `err` and the file names the
 * error is about (either may be NULL; both are copied), so Python raises
 * what its own open() would: FileNotFoundError(2, 'No such file or
 * directory', 'a.txt'), with filename2 for two-path calls such as rename.
 * Inside the task's poll function; no GIL needed. Returns 0, AIOB_ENOMEM
 * (the task then fails with err alone), or AIOB_EINVAL for an err that is
 * no negated errno (the task then fails as aiob_task_fail(self, err)). */
int aiob_py_task_fail_path(aiob_task *self, int err, const char *filename,
                           const char *filename2);

/* ---- Shape 1: an awaitable completed by a callback ---------------------
 *
 * For native APIs that take a callback (libcurl multi, c-ares, libpq, a
 * libuv or io_uring request): the extension function starts the request
 * and returns the awaitable; the request's callback completes it. */

/* Called exactly once when the awaitable of aiob_py_promise_new is done
 * with the producer's request, so the producer can let go of what it
 * shares with it. `cancelled` is 1 when the awaitable was cancelled (or
 * collected, or its runtime shut down) before the completion reached it:
 * abort the native request then. It is 0 when the completion came first.
 * Runs on a loop thread of the runtime, without the GIL; or, for an
 * awaitable made with no running loop and closed or collected before it
 * was ever awaited, on the thread that drops it, with the GIL. A cancel
 * may race with a completion in progress on another thread. */
typedef void (*aiob_py_done_fn)(void *arg, int cancelled);

/* Returns a new awaitable (an aiobridge.CTask named `name`, static storage
 * or NULL; the conversion of its value is `conv`, as for
 * aiob_py_future_into_py) and gives the caller *completer, the completer
 * side of a promise. The caller (the native request's callback, on any
 * thread) completes it exactly once:
 *   aiob_promise_complete(p, 0, value, free_value)  the awaitable's value;
 *   aiob_promise_complete(p, AIOB_ENOENT, NULL, NULL)  an OSError;
 *   aiob_py_promise_fail_path(p, AIOB_ENOENT, path, NULL)  with a file name;
 *   aiob_py_promise_raise(p, PyExc_ValueError, "msg")  any exception type;
 *   aiob_promise_abandon(p)  CancelledError.
 * The first completion consumes the completer side: p must not be used
 * again (the promise may be freed at once). on_done(done_arg, cancelled)
 * (NULL: none) is called exactly once, as aiob_py_done_fn says. The
 * completer side stays the producer's even after a cancellation: it still
 * completes (or abandons) the promise, and a value completed after the
 * cancellation is freed by its free_value without touching Python (on the
 * completing thread, or on the runtime thread the awaitable is dropped
 * on). With the GIL. On failure returns NULL with an exception set,
 * *completer untouched and on_done never called. */
PyObject *aiob_py_promise_new(aiob_py_bridge *b, const char *name,
                              aiob_py_converter conv, aiob_py_done_fn on_done,
                              void *done_arg, aiob_promise **completer);

/* Completes a promise with `exc_type(msg)`: exc_type is borrowed and must
 * outlive the awaitable (a built-in exception or one the module keeps);
 * msg is copied. Gives up the completer side, as aiob_promise_complete
 * (AIOB_EALREADY only while the waiter side is known to be held).
 * Thread-safe; no GIL needed. Returns 0, AIOB_EALREADY, AIOB_EINVAL (NULL
 * p or exc_type: nothing done), or AIOB_ENOMEM (the promise was completed
 * with AIOB_ENOMEM instead). */
int aiob_py_promise_raise(aiob_promise *p, PyObject *exc_type, const char *msg);

/* Completes a promise with the negated errno `err` and the file names of
 * the error (either may be NULL; copied), as aiob_py_task_fail_path. Gives
 * up the completer side, as aiob_promise_complete. Thread-safe; no GIL
 * needed. Returns 0,
 * AIOB_EALREADY, AIOB_EINVAL (NULL p, or err no negated errno: nothing
 * done), or AIOB_ENOMEM (completed with err alone). */
int aiob_py_promise_fail_path(aiob_promise *p, int err, const char *filename,
                              const char *filename2);

/* ---- Shape 2: blocking C work on the runtime's worker threads ---------- */

/* Runs fn(arg, out) on a worker thread of the bridge's runtime (its
 * blocking pool, sized by aiob_runtime_config.blocking_threads; never a
 * loop thread, never holding the GIL: fn must not call Python) and returns
 * a new awaitable (an aiobridge.CTask named `name`, static storage or NULL)
 * for its output: what fn put in out->value goes through `conv` on the
 * loop thread, a negative return raises (as for aiob_task_fail; a
 * positive one is a bug: SystemError naming the task).
 * Cancelling the awaitable before a worker started the job means fn never
 * runs; once running, fn finishes (aiob_blocking_cancelled() tells it to
 * stop early) and its value is freed without touching Python. The call
 * takes arg in every case: drop_arg(arg) (NULL: nothing) runs exactly once,
 * after fn ran or when it never will, also when this call fails. With the
 * GIL. Returns NULL with an exception set on failure (ValueError for a NULL
 * fn). */
PyObject *aiob_py_run_blocking(aiob_py_bridge *b, const char *name,
                               aiob_blocking_fn fn, void *arg,
                               void (*drop_arg)(void *arg),
                               aiob_py_converter conv);

/* ---- Streams: C producers as Python async iterators ------------------- */

/* The channel between a producer task and its CStream. */
typedef struct aiob_py_stream aiob_py_stream;

/* Returns a new async iterator, an aiobridge.CStream named `name` (static
 * storage, or NULL: the vtable's), over the items a producer C task (vt,
 * state) sends with aiob_py_stream_send: `async for`, anext() (with a
 * default too), contextlib.aclosing and async comprehensions take it. The
 * producer starts on the first anext(), bound to that loop. Each item goes
 * through `conv` on the loop thread (NULL: None; a converter owns the
 * item's value, as for aiob_py_future_into_py). At most `capacity` (>= 1)
 * items wait in the channel: a producer that finds it full is suspended,
 * never a runtime thread blocked, never an item dropped. Items cross
 * without the GIL; the consumer's loop is woken once per batch, not per
 * item. The producer's own end ends the stream, after the items it sent
 * before: finished, StopAsyncIteration; failed (aiob_task_fail,
 * aiob_py_task_raise, aiob_task_forward), that exception. The consumer
 * going away (aclose(), the CStream collected, a pending anext()
 * cancelled) closes the channel: items left are freed without Python,
 * later sends fail with AIOB_EPIPE, and the producer task is cancelled
 * (its drop runs once). With the GIL. On failure returns NULL with an
 * exception set (ValueError for a NULL vtable or a capacity of 0), and
 * the caller keeps `state`. */
PyObject *aiob_py_stream_new(aiob_py_bridge *b, const char *name,
                             size_t capacity, aiob_py_converter conv,
                             const aiob_task_vtable *vt, void *state);

/* The stream the producer task `self` sends to (borrowed; valid while the
 * task runs). Inside the producer task's poll function; no GIL needed. */
aiob_py_stream *aiob_py_stream_of(aiob_task *self);

/* Sends one item: READY with *status 0 once it is in the channel (the
 * stream owns value, freed with free_value if nobody takes it); PENDING
 * while the channel is full (self is woken when the consumer takes an
 * item: call again); READY with *status AIOB_EPIPE once the consumer is
 * gone (value not taken: still the caller's; finish the task). status may
 * be NULL. Inside the producer task's poll function; no GIL needed. */
aiob_poll aiob_py_stream_send(aiob_task *self, aiob_py_stream *s, void *value,
                              void (*free_value)(void *value), int *status);

/* Releases a Python reference from any thread: at once if this thread holds
 * the GIL, otherwise on a later drain of the bridge's queues. A coroutine
 * whose last reference this is is closed first, as an asyncio Task cancelled
 * before its first step closes its coroutine: a C task cancelled before it
 * awaited a coroutine it was handed leaves no "coroutine ... was never
 * awaited" warning. */
void aiob_py_release(PyObject *obj);

/* Converts a Python number of durations of `unit_ns` nanoseconds each (1e9
 * for seconds, 1e6 for milliseconds) to nanoseconds for aiob_sleep_init.
 * With the GIL. Returns 0, or -1 with TypeError (not a number) or ValueError
 * (negative, NaN) set. A duration too long for 64 bits of nanoseconds,
 * +inf included, gives UINT64_MAX: a sleep that never ends in practice
 * (about 584 years), as asyncio.sleep(math.inf) never ends. */
int aiob_py_duration_ns(PyObject *number, double unit_ns, uint64_t *out);

/* ---- Awaiting Python from C ------------------------------------------- */

/* Converts the result of an awaited Python awaitable to plain C data, on
 * the asyncio loop thread with the GIL, so the C task never needs it: fill
 * out->value (and out->free_value, called from any thread without the GIL)
 * and return 0, or return -1 with a Python exception set, which the C task
 * then receives as AIOB_PY_EXCEPTION. `result` is borrowed. */
typedef int (*aiob_py_result_converter)(PyObject *result, aiob_output *out);

/* Makes the awaitable of aiob_py_await_init_fn: called on the task's
 * asyncio loop thread with the GIL, in the task's contextvars context.
 * Returns a new reference to an awaitable; Py_None (new reference) when
 * there is nothing to await (the await then finishes with None at once); or
 * NULL with an exception set, which the C task receives. */
typedef PyObject *(*aiob_py_awaitable_fn)(void *arg);

typedef struct aiob_py_await {
  struct aiob__leaf leaf;
  aiob_promise *promise;
  void *request;
  PyObject *object; /* borrowed awaitable or factory */
  int is_factory;
  int state;
  aiob_py_locals *locals; /* borrowed; NULL: the task's */
  aiob_py_result_converter conv;
  aiob_py_awaitable_fn fn; /* aiob_py_await_init_fn */
  void *fn_arg;
} aiob_py_await;

/* Prepares to await `awaitable` (a coroutine, Future, Task or object with
 * __await__). Borrows the reference: keep it alive (in the task's state)
 * until the task finished, and release it in the task's drop with
 * aiob_py_release. No GIL needed. */
void aiob_py_await_init(aiob_py_await *aw, PyObject *awaitable);

/* Prepares to await `factory()`: the call happens on the task's asyncio loop
 * thread, in the task's contextvars context. Borrows like
 * aiob_py_await_init. No GIL needed. */
void aiob_py_await_init_call(aiob_py_await *aw, PyObject *factory);

/* Prepares to await what `fn(arg)` returns, called on the task's asyncio
 * loop thread with the GIL, in the task's contextvars context: the way for
 * a C task, which holds no Python object, to import a module, build
 * arguments and await a coroutine, or to act on the loop (loop.stop()) and
 * return None. `arg` is passed as is: keep what it points to alive until
 * the await finished. No GIL needed. */
void aiob_py_await_init_fn(aiob_py_await *aw, aiob_py_awaitable_fn fn,
                           void *arg);

/* Awaits on the loop and context of `locals` instead of the task's own
 * (for C tasks not started by the bridge, e.g. spawned with aiob_spawn on
 * the runtime). Borrowed: keep them alive until the await finished. Call
 * after init, before the first poll; no GIL needed. */
void aiob_py_await_set_locals(aiob_py_await *aw, aiob_py_locals *locals);

/* The result reaches the C task through `conv` (see above) instead of as a
 * PyObject reference. Call after init, before the first poll; no GIL
 * needed. */
void aiob_py_await_set_converter(aiob_py_await *aw,
                                 aiob_py_result_converter conv);

/* In a C task spawned by aiob_py_future_into_py (or a descendant): runs the
 * awaitable on the task's asyncio loop in the task's contextvars context.
 * READY with *out filled: status 0 and value = the result (a PyObject
 * reference, free_value releases it from any thread; or what the converter
 * produced), or AIOB_PY_EXCEPTION (value is the exception to propagate), or
 * AIOB_ECANCELED (the Python side was cancelled, or its loop is gone), or
 * AIOB_EINVAL if neither aiob_py_await_set_locals nor the task gave locals,
 * or AIOB_ENOMEM; once READY, a further poll gives AIOB_EALREADY. out may
 * be NULL. Cancelling the C task cancels the Python task. Inside the
 * task's poll function; no GIL needed. */
aiob_poll aiob_py_await_poll(aiob_task *self, aiob_py_await *aw,
                             aiob_output *out);

/* ---- Streams: Python async iterators consumed by C -------------------- */

/* The status of aiob_py_aiter_next's output at the end of the iteration
 * (the iterator raised StopAsyncIteration). Positive: neither an item (0)
 * nor an error (< 0). Not a task status: finish the task with a result of
 * your own, not by forwarding this output. */
#define AIOB_PY_STREAM_END 1

/* A C task's pull of the items of a Python async iterable (an async
 * generator, or any object with __aiter__ and __anext__), with
 * backpressure. A leaf future: it lives in the task's state, and the core
 * closes it before the task's drop runs. Its fields are private.
 *
 * On the task's asyncio loop a pump task, started in a copy of the task's
 * contextvars context (one for the whole iteration, as for `async for` in
 * one task), takes the items with __anext__ and puts them, converted on
 * the loop thread, into a ring of `window` items that the C task empties
 * without the GIL. At most `window` items are buffered or being fetched at
 * once; a full ring suspends the pump (a future: the loop never blocks),
 * and it resumes once the C task has taken half of them. Neither side is
 * woken per item: the C task only when it waits on an empty ring, the
 * pump only when it waits on a full one. */
typedef struct aiob_py_aiter {
  struct aiob__leaf leaf;
  struct aiob__py_aiter_chan *chan; /* shared with the pump, once started */
  PyObject *iterable;               /* borrowed */
  aiob_py_result_converter conv;
  aiob_py_locals *locals; /* borrowed; NULL: the task's */
  size_t window;
  int state;
} aiob_py_aiter;

/* Prepares to iterate over `aiterable` with at most `window` (>= 1) items
 * buffered or in flight, each converted by `conv` on the loop thread with
 * the GIL (as for aiob_py_await_set_converter; NULL: the C task receives
 * PyObject references, whose free_value releases them from any thread).
 * Nothing happens before the first aiob_py_aiter_next. Borrows the
 * reference: keep it alive (in the task's state) until the task finished,
 * and release it in the task's drop with aiob_py_release. Not on an
 * iteration still open (close it first). No GIL needed. */
void aiob_py_aiter_init(aiob_py_aiter *it, PyObject *aiterable, size_t window,
                        aiob_py_result_converter conv);

/* Iterates on the loop and context of `locals` instead of the task's own
 * (for C tasks not started by the bridge), as aiob_py_await_set_locals.
 * Borrowed: keep them alive until the iteration is closed. Call after
 * init, before the first aiob_py_aiter_next; no GIL needed. */
void aiob_py_aiter_set_locals(aiob_py_aiter *it, aiob_py_locals *locals);

/* The next item: READY with *out filled, or PENDING (`self` is woken when
 * there is something to take). The first call starts the iteration on the
 * task's asyncio loop. *out (out may be NULL: it is then freed):
 *   status 0: an item; out->value is the caller's (a PyObject reference,
 *     or what the converter made) with its free_value;
 *   AIOB_PY_STREAM_END: the iterator is exhausted (again on every later
 *     call);
 *   AIOB_PY_EXCEPTION: the iterator raised (or __aiter__ did, or the
 *     converter), after the items it gave before; value is the exception
 *     with its traceback: aiob_task_forward re-raises it unchanged in
 *     Python. The iteration is then over: later calls give the end.
 *     Passing something that is not an async iterable is a TypeError
 *     naming its type;
 *   AIOB_ECANCELED: the pump was cancelled on the Python side (e.g. by
 *     asyncio.run ending), its loop is gone, or the iterator was closed;
 *   AIOB_EINVAL (window 0, NULL iterable, or neither
 *     aiob_py_aiter_set_locals nor the task gave locals), AIOB_ENOMEM.
 * Always from the same task. Inside the task's poll function; no GIL
 * needed. */
aiob_poll aiob_py_aiter_next(aiob_task *self, aiob_py_aiter *it,
                             aiob_output *out);

/* Closes the iteration early: the items not taken are freed without the
 * GIL, and on the loop the pump stops and closes the iterator: a pending
 * __anext__ is cancelled, as a cancelled `async for` task's would be, and
 * an iterator still suspended between items (not exhausted, not failed)
 * has its aclose() awaited. An error raised by that close goes to the
 * loop's exception handler (loop.call_exception_handler, with a message
 * naming the iterator and the task). A closed iterator gives
 * AIOB_ECANCELED. Idempotent; the task finishing or being cancelled does
 * the same (before its drop), so a drop that calls it too is safe. Once
 * the asyncio loop is gone it only frees the C side. Loop thread of its
 * task (its poll or its drop); no GIL needed. */
void aiob_py_aiter_close(aiob_py_aiter *it);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_PYTHON_H */
