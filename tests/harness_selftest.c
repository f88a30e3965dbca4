/* Tests of the async test harness itself (aiobridge/testing.h), run by
 * tests/python/test_embed.py with name filters: tests that pass, fail in
 * each way a test can fail, hang (for --timeout), and measure how many run
 * at once (for --jobs). Some fail on purpose: never run it unfiltered in
 * CI. */
#include <aiobridge/testing.h>

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

typedef struct sleepy {
  int co;
  int i;
  aiob_sleep sleep;
  aiob_py_await wait;
  aiob_output out;
} sleepy;

AIOB_TEST(pass_sleep, sleepy) {
  AIOB_BEGIN(&state->co);
  aiob_sleep_init(&state->sleep, AIOB_MSEC);
  AIOB_AWAIT(&state->co, aiob_sleep_poll(self, &state->sleep, NULL));
  AIOB_TEST_ASSERT(self, aiob_task_current() == self);
  AIOB_END(&state->co);
}

static PyObject *sleep_zero(void *arg) {
  (void)arg;
  PyObject *asyncio = PyImport_ImportModule("asyncio");
  PyObject *r = asyncio ? PyObject_CallMethod(asyncio, "sleep", "i", 0) : NULL;
  Py_XDECREF(asyncio);
  return r;
}

AIOB_TEST(pass_await, sleepy) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, sleep_zero, NULL);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  AIOB_TEST_ASSERT(self, state->out.status == 0);
  aiob_output_clear(&state->out);
  AIOB_END(&state->co);
}

AIOB_TEST(fail_assert, sleepy) {
  (void)state;
  int answer = 41;
  AIOB_TEST_ASSERT(self, answer == 42);
  return AIOB_READY;
}

AIOB_TEST(fail_errno, sleepy) {
  (void)state;
  aiob_task_fail(self, AIOB_ENOENT);
  return AIOB_READY;
}

static PyObject *raise_lookup(void *arg) {
  (void)arg;
  PyErr_SetString(PyExc_LookupError, "raised by the awaited factory");
  return NULL;
}

AIOB_TEST(fail_python, sleepy) {
  AIOB_BEGIN(&state->co);
  aiob_py_await_init_fn(&state->wait, raise_lookup, NULL);
  AIOB_AWAIT(&state->co, aiob_py_await_poll(self, &state->wait, &state->out));
  /* Forward the exception: it is the test's failure. */
  if (state->out.status < 0)
    aiob_task_fail(self, state->out.status);
  aiob_task_return(self, state->out.value, state->out.free_value);
  state->out.value = NULL;
  state->out.free_value = NULL;
  AIOB_END(&state->co);
}

AIOB_TEST(hang, sleepy) {
  AIOB_BEGIN(&state->co);
  aiob_sleep_init(&state->sleep, UINT64_MAX);
  AIOB_AWAIT(&state->co, aiob_sleep_poll(self, &state->sleep, NULL));
  AIOB_END(&state->co);
}

/* conc_*: each waits until CONC tests run at once, or until all NCONC
 * have started (the last ones of a run cannot make CONC any more), so a
 * limit below CONC makes the first ones time out; each checks that never
 * more than CONC run. A test that times out is cancelled and keeps
 * counting as running. */
#define CONC 3
#define NCONC 6
static atomic_int running, most, started;

static aiob_poll conc(aiob_task *self, sleepy *state) {
  AIOB_BEGIN(&state->co);
  {
    atomic_fetch_add(&started, 1);
    int now = atomic_fetch_add(&running, 1) + 1;
    int m = atomic_load(&most);
    while (now > m && !atomic_compare_exchange_weak(&most, &m, now))
      ;
    printf("conc: %d running\n", now);
    fflush(stdout);
  }
  for (state->i = 0;
       atomic_load(&running) < CONC && atomic_load(&started) < NCONC;
       state->i++) {
    AIOB_TEST_ASSERT(self, state->i < 30000); /* 30 s at 1 ms */
    aiob_sleep_init(&state->sleep, AIOB_MSEC);
    AIOB_AWAIT(&state->co, aiob_sleep_poll(self, &state->sleep, NULL));
  }
  AIOB_TEST_ASSERT(self, atomic_load(&most) <= CONC);
  aiob_sleep_init(&state->sleep, 5 * AIOB_MSEC);
  AIOB_AWAIT(&state->co, aiob_sleep_poll(self, &state->sleep, NULL));
  atomic_fetch_sub(&running, 1);
  AIOB_END(&state->co);
}

AIOB_TEST(conc_1, sleepy) { return conc(self, state); }
AIOB_TEST(conc_2, sleepy) { return conc(self, state); }
AIOB_TEST(conc_3, sleepy) { return conc(self, state); }
AIOB_TEST(conc_4, sleepy) { return conc(self, state); }
AIOB_TEST(conc_5, sleepy) { return conc(self, state); }
AIOB_TEST(conc_6, sleepy) { return conc(self, state); }

int main(int argc, char **argv) { return aiob_test_main(argc, argv); }
