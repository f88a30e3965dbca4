/* aiobridge — an async test harness: test functions are C tasks, run with
 * Python on the main thread (as aiob_main runs a program), reported
 * through cmocka so that ctest and CI read them.
 *
 *   typedef struct sleepy { int co; aiob_sleep sleep; } sleepy;
 *
 *   AIOB_TEST(sleeps, sleepy) {          // self: the task, state: sleepy *
 *     AIOB_BEGIN(&state->co);
 *     aiob_sleep_init(&state->sleep, AIOB_MSEC);
 *     AIOB_AWAIT(&state->co, aiob_sleep_poll(self, &state->sleep, NULL));
 *     AIOB_TEST_ASSERT(self, aiob_task_current() == self);
 *     AIOB_END(&state->co);
 *   }
 *
 *   int main(int argc, char **argv) { return aiob_test_main(argc, argv); }
 *
 * A test passes when its task finishes without an error; it fails with an
 * AIOB_TEST_ASSERT, any failure of the task (aiob_task_fail, an exception
 * of an awaited coroutine) or its timeout (the task is then cancelled).
 * Each test has its own zeroed state, freed after the test. Link with the
 * aiobridge::testing_<tag> CMake target (it brings cmocka).
 */
#ifndef AIOBRIDGE_TESTING_H
#define AIOBRIDGE_TESTING_H

#include "embed.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One registered test; AIOB_TEST fills it. */
typedef struct aiob_test {
  const char *name;
  aiob_poll (*poll)(aiob_task *self, void *state);
  size_t state_size;
  struct aiob_test *next; /* the harness's */
} aiob_test;

/* Adds a test (before aiob_test_main; AIOB_TEST does it from a
 * constructor). `t` must live as long as the program. Not thread-safe:
 * call before main() or from the main thread. */
void aiob_test_register(aiob_test *t);

/* Makes the running test fail with "file:line: message" (printf format).
 * Inside the test task's poll function; no GIL needed. The poll function
 * should return AIOB_READY afterwards (AIOB_TEST_ASSERT does). */
void aiob_test_fail(aiob_task *self, const char *file, int line,
                    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Runs the registered tests and reports them with cmocka. Command line:
 *   [PATTERN...]     run the tests whose name matches a shell pattern
 *                    (fnmatch); none: all
 *   --timeout SEC    per-test timeout (default 60; the test is cancelled)
 *   --jobs N         tests running at once (default 1)
 *   --list           print the test names and exit
 * AIOBRIDGE_LOOP=uvloop runs them on uvloop. Main thread only: call it from
 * main(), once. Returns the exit status: 0 when every selected test
 * passed, 1 otherwise, 2 for a bad command line. Ctrl-C cancels the run
 * and ends the process by SIGINT, with no report. */
int aiob_test_main(int argc, char **argv);

/* Defines and registers the test `name`: the body is a poll function with
 * `aiob_task *self` and `state_type *state` (zeroed, the test's own). */
#define AIOB_TEST(name, state_type)                                            \
  static aiob_poll aiob__test_body_##name(aiob_task *self, state_type *state); \
  static aiob_poll aiob__test_poll_##name(aiob_task *self, void *p) {          \
    return aiob__test_body_##name(self, (state_type *)p);                      \
  }                                                                            \
  static aiob_test aiob__test_##name = {#name, aiob__test_poll_##name,         \
                                        sizeof(state_type), NULL};             \
  __attribute__((constructor)) static void aiob__test_register_##name(void) {  \
    aiob_test_register(&aiob__test_##name);                                    \
  }                                                                            \
  static aiob_poll aiob__test_body_##name(aiob_task *self, state_type *state)

/* Fails the test and returns AIOB_READY from the poll function when `cond`
 * is false: like the coroutine macros, its point is to return. */
#define AIOB_TEST_ASSERT(self, cond)                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      aiob_test_fail((self), __FILE__, __LINE__, "%s", #cond);                 \
      return AIOB_READY;                                                       \
    }                                                                          \
  } while (0)

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_TESTING_H */
