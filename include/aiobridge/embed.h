/* aiobridge — C programs that embed Python and own `main`.
 *
 * Python must own the main thread: its asyncio loop runs there, and the
 * runtime's loop threads run in the background. aiob_main does all of it
 * for a C main task:
 *
 *   typedef struct app { int co; aiob_py_await wait; aiob_output out; } app;
 *
 *   static aiob_poll app_main(aiob_task *self, void *p) {
 *     app *a = p;
 *     AIOB_BEGIN(&a->co);
 *     ... await Python (aiob_py_await_init_fn), spawn children, sleep ...
 *     AIOB_END(&a->co);
 *   }
 *
 *   AIOB_MAIN(app_main, app)
 *
 * aiob_py_run and aiob_py_run_until_complete are the pieces, for programs
 * that initialise Python themselves. Link the program with the bridge, a
 * core and libpython (CMake: aiobridge_add_python_executable).
 */
#ifndef AIOBRIDGE_EMBED_H
#define AIOBRIDGE_EMBED_H

#include "python.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Runs a C task to completion on a new event loop, as asyncio.run does for
 * a coroutine: the loop comes from `loop_factory()` (NULL: asyncio's
 * default), and afterwards the remaining asyncio tasks are cancelled,
 * async generators and the default executor are shut down and the loop is
 * closed. Ctrl-C (SIGINT, on the main thread) cancels the C task and then
 * raises KeyboardInterrupt. With the GIL, on a thread that runs no event
 * loop. Returns the task's result converted by `conv` (NULL: None) as a new
 * reference, or NULL with an exception set: the task's error, or
 * RuntimeError if this thread already runs a loop. State ownership is that
 * of aiob_py_future_into_py: once the task is spawned it owns `state`
 * (drop runs once); if spawning fails, `state` is still the caller's. */
PyObject *aiob_py_run(aiob_py_bridge *b, PyObject *loop_factory,
                      const aiob_task_vtable *vt, void *state,
                      aiob_py_converter conv);

/* Runs a C task to completion on `loop`, which must not be running and
 * stays open afterwards (loop.run_until_complete). With the GIL. Returns
 * the converted result as a new reference, or NULL with an exception set:
 * the task's error, or RuntimeError if `loop` is running or this thread
 * already runs a loop (never a deadlock). State ownership as aiob_py_run. */
PyObject *aiob_py_run_until_complete(aiob_py_bridge *b, PyObject *loop,
                                     const aiob_task_vtable *vt, void *state,
                                     aiob_py_converter conv);

/* How aiob_main starts Python. */
typedef struct aiob_main_config {
  const char *program_name; /* sys.executable's name; NULL: argv[0] */
  int argc;                 /* sys.argv */
  char **argv;
  const char *const *sys_path; /* NULL-terminated; prepended to sys.path */
  /* The asyncio loop: 1 uvloop (a clear error if it cannot be imported),
   * 0 stock asyncio, -1 from AIOBRIDGE_LOOP in the environment ("uvloop"
   * or "asyncio"; unset: asyncio). */
  int uvloop;
} aiob_main_config;

/* Fills *cfg with the defaults for argc/argv: no sys.path additions,
 * uvloop -1. Any thread, no Python needed. */
void aiob_main_config_init(aiob_main_config *cfg, int argc, char **argv);

/* The whole life of an embedding program: initialises Python from `cfg`,
 * makes a bridge (registered as "__main__" with the `aiobridge` package,
 * or, when the package is not installed, with a built-in copy of its C
 * module: exception types, stats, shutdown; no get_include), runs
 * the C main task (vt, state) with aiob_py_run on the main thread's loop
 * and the runtime in the background, then tears down in order: async
 * generators, the default executor, the loop, the runtime, Py_FinalizeEx.
 * Main thread only: call it from main(), once. `state` belongs to the
 * main task: its drop runs once, also when Python fails to start. Returns
 * the process exit status: 0 when the task succeeded; 1 when it failed or
 * Python could not start (the error is printed with its traceback); the
 * code of a SystemExit; after Ctrl-C, the main task is cancelled, then
 * the process ends by SIGINT as Python does (130 if that returns). */
int aiob_main(const aiob_main_config *cfg, const aiob_task_vtable *vt,
              void *state);

/* Defines main() for the common case: a main task `poll_fn` over a zeroed
 * static `state_type`, Python configured from argv and AIOBRIDGE_LOOP. */
#define AIOB_MAIN(poll_fn, state_type)                                         \
  int main(int argc, char **argv) {                                            \
    static state_type aiob__main_state;                                        \
    static const aiob_task_vtable aiob__main_vt = {.poll = (poll_fn)};         \
    aiob_main_config aiob__cfg;                                                \
    aiob_main_config_init(&aiob__cfg, argc, argv);                             \
    return aiob_main(&aiob__cfg, &aiob__main_vt, &aiob__main_state);           \
  }

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_EMBED_H */
