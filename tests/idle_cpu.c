/* An idle runtime costs no CPU. After work that keeps the spin busy
 * (round trips from another thread), timers and a blocking job, once
 * nothing is left to do, every loop thread and blocking worker is blocked:
 * over an idle window the runtime's counters (spins, loop wakes, polls) do
 * not move, and those threads' CPU time grows by almost nothing.
 *
 *   idle_cpu <uv|event|uring> [test-name-filter]
 *
 * No wall-clock assertion: the runtime first reaches quiescence (every
 * thread asleep in the kernel, counters still across a pause; bounded by
 * WAIT_TIMEOUT), then the window is measured. Its bound, a fifth of the
 * window per thread, holds on a machine many times slower and beside CPU
 * hogs, while a thread that kept spinning (200 us per wake, 10 ms at the
 * largest spin_us) or polling would use all of it. A backend the kernel
 * refuses (io_uring) is a skip (exit 77). */
#include "aiobridge.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"

static const char *g_backend; /* argv[1] */

/* The idle window, and the CPU a thread may use in it. */
#define IDLE_WINDOW (400 * AIOB_MSEC)
#define IDLE_CPU_MAX (IDLE_WINDOW / 5)

#define MAX_THREADS 8

/* The runtime's threads: loop threads, then blocking workers. */
typedef struct threads {
  pthread_mutex_t mu;
  latch got;
  int n;
  pid_t tid[MAX_THREADS];
  clockid_t clk[MAX_THREADS];
  const char *what[MAX_THREADS];
} threads;

/* On the thread to record. */
static void record_self(threads *th, const char *what) {
  clockid_t clk;
  CHECK_INT(pthread_getcpuclockid(pthread_self(), &clk), ==, 0);
  pthread_mutex_lock(&th->mu);
  CHECK(th->n < MAX_THREADS);
  if (th->n < MAX_THREADS) {
    th->tid[th->n] = gettid();
    th->clk[th->n] = clk;
    th->what[th->n] = what;
    th->n++;
  }
  pthread_mutex_unlock(&th->mu);
  latch_add(&th->got, 1);
}

static void record_loop(void *arg, int status) {
  CHECK_INT(status, ==, 0);
  record_self(arg, "loop");
}

static int record_worker(void *arg, aiob_output *out) {
  (void)out;
  record_self(arg, "worker");
  return 0;
}

static int nothing(void *arg, aiob_output *out) {
  (void)arg;
  (void)out;
  return 0;
}

static uint64_t thread_cpu_ns(clockid_t clk) {
  struct timespec ts;
  assert_int_equal(clock_gettime(clk, &ts), 0);
  return (uint64_t)ts.tv_sec * AIOB_SEC + (uint64_t)ts.tv_nsec;
}

/* The scheduler state of thread tid ('R' running or runnable, 'S' asleep
 * in the kernel, ...), or '?' if it cannot be read. */
static char thread_state(pid_t tid) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
  FILE *f = fopen(path, "r");
  if (!f)
    return '?';
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  const char *p = strrchr(buf, ')'); /* the name may hold spaces */
  return p && p[1] == ' ' && p[2] ? p[2] : '?';
}

/* ---- Work ---------------------------------------------------------------- */

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}

static const aiob_task_vtable ready_vt = {.poll = ready_poll};

typedef struct sleeper {
  int co;
  uint64_t ns;
  aiob_sleep sleep;
} sleeper;

static aiob_poll sleeper_poll(aiob_task *t, void *p) {
  sleeper *s = p;
  AIOB_BEGIN(&s->co);
  aiob_sleep_init(&s->sleep, s->ns);
  AIOB_AWAIT(&s->co, aiob_sleep_poll(t, &s->sleep, NULL));
  AIOB_END(&s->co);
}

static const aiob_task_vtable sleeper_vt = {.poll = sleeper_poll};

static aiob_task *spawn_on(aiob_runtime *rt, unsigned loop,
                           const aiob_task_vtable *vt, void *state) {
  aiob_spawn_opts opts;
  aiob_spawn_opts_init(&opts);
  opts.loop = (int)loop;
  aiob_task *h = NULL;
  assert_rc(aiob_spawn_ex(rt, &opts, vt, state, &h), 0);
  return h;
}

/* Sequential round trips from this thread to every loop: each spawn finds
 * the loop spinning (or wakes it) and the wait sees the task finish. */
static void round_trips(aiob_runtime *rt, unsigned loops, int n) {
  for (int i = 0; i < n; i++) {
    aiob_task *h = spawn_on(rt, (unsigned)i % loops, &ready_vt, NULL);
    wait_ok(h);
    aiob_task_release(h);
  }
}

/* Tasks sleeping 1..k ms on every loop (the backend timer). */
static void sleeps(aiob_runtime *rt, unsigned loops, int k) {
  sleeper *s = xcalloc((size_t)k, sizeof *s);
  aiob_task **h = xcalloc((size_t)k, sizeof *h);
  for (int i = 0; i < k; i++) {
    s[i].ns = (uint64_t)(i % 5 + 1) * AIOB_MSEC;
    h[i] = spawn_on(rt, (unsigned)i % loops, &sleeper_vt, &s[i]);
  }
  for (int i = 0; i < k; i++) {
    wait_ok(h[i]);
    aiob_task_release(h[i]);
  }
  free(h);
  free(s);
}

/* ---- Idle ---------------------------------------------------------------- */

static int counters_equal(const aiob_runtime_stats *a,
                          const aiob_runtime_stats *b) {
  return a->spins == b->spins && a->loop_wakes == b->loop_wakes &&
         a->polls == b->polls && a->tasks_spawned == b->tasks_spawned &&
         a->blocking_jobs_run == b->blocking_jobs_run;
}

static int all_asleep(const threads *th) {
  for (int i = 0; i < th->n; i++)
    if (thread_state(th->tid[i]) != 'S')
      return 0;
  return 1;
}

/* Waits (bounded) until the runtime is quiescent: three times in a row,
 * every thread asleep in the kernel and the counters the same across a
 * 20 ms pause. A thread still spinning is running or runnable, never
 * asleep; one that keeps waking moves the counters. */
static void wait_quiescent(aiob_runtime *rt, const threads *th) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  aiob_runtime_stats a, b;
  int calm = 0;
  aiob_runtime_stats_get(rt, &a);
  while (calm < 3) {
    if (aiob_now_ns() > deadline)
      fail_msg("the runtime never went idle in %llu s: spins %llu, loop "
               "wakes %llu, polls %llu and still moving, or a thread never "
               "asleep",
               (unsigned long long)(WAIT_TIMEOUT / AIOB_SEC),
               (unsigned long long)a.spins, (unsigned long long)a.loop_wakes,
               (unsigned long long)a.polls);
    sleep_thread_ns(20 * AIOB_MSEC);
    aiob_runtime_stats_get(rt, &b);
    if (counters_equal(&a, &b) && all_asleep(th))
      calm++;
    else
      calm = 0;
    a = b;
  }
}

/* The idle window: counters still, every thread's CPU within bounds. */
static void assert_idle(aiob_runtime *rt, const threads *th,
                        const char *label) {
  wait_quiescent(rt, th);
  aiob_runtime_stats before, after;
  uint64_t cpu0[MAX_THREADS];
  aiob_runtime_stats_get(rt, &before);
  for (int i = 0; i < th->n; i++)
    cpu0[i] = thread_cpu_ns(th->clk[i]);
  sleep_thread_ns(IDLE_WINDOW);
  aiob_runtime_stats_get(rt, &after);
  for (int i = 0; i < th->n; i++) {
    uint64_t used = thread_cpu_ns(th->clk[i]) - cpu0[i];
    print_message("%s[%s]: %s thread %d used %.3f ms CPU in a %.0f ms idle "
                  "window\n",
                  label, g_backend, th->what[i], (int)th->tid[i],
                  (double)used / 1e6, (double)IDLE_WINDOW / 1e6);
    if (used > IDLE_CPU_MAX)
      fail_msg("%s: idle %s thread %d used %.1f ms CPU in %.0f ms (at most "
               "%.0f)",
               label, th->what[i], (int)th->tid[i], (double)used / 1e6,
               (double)IDLE_WINDOW / 1e6, (double)IDLE_CPU_MAX / 1e6);
  }
  if (!counters_equal(&before, &after))
    fail_msg("%s: counters moved while idle: spins %llu -> %llu, loop wakes "
             "%llu -> %llu, polls %llu -> %llu",
             label, (unsigned long long)before.spins,
             (unsigned long long)after.spins,
             (unsigned long long)before.loop_wakes,
             (unsigned long long)after.loop_wakes,
             (unsigned long long)before.polls, (unsigned long long)after.polls);
}

static void threads_init(threads *th) {
  memset(th, 0, sizeof *th);
  pthread_mutex_init(&th->mu, NULL);
  latch_init(&th->got);
}

static void threads_destroy(threads *th) {
  latch_destroy(&th->got);
  pthread_mutex_destroy(&th->mu);
}

/* A runtime of `loops` loop threads and spin_us; its loop threads (and,
 * with `worker`, one blocking worker) recorded in *th. */
static aiob_runtime *runtime_with(unsigned loops, unsigned spin_us, threads *th,
                                  int worker) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  cfg.threads = loops;
  cfg.spin_us = spin_us;
  cfg.blocking_threads = 1;
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  threads_init(th);
  for (unsigned i = 0; i < loops; i++)
    assert_rc(aiob_runtime_call(rt, i, record_loop, th), 0);
  latch_ok(&th->got, (long)loops);
  if (worker) {
    aiob_task *h = NULL;
    assert_rc(aiob_spawn_blocking(rt, NULL, record_worker, th, NULL, &h), 0);
    wait_ok(h);
    assert_status(h, 0);
    aiob_task_release(h);
    latch_ok(&th->got, (long)loops + 1);
  }
  assert_clean();
  return rt;
}

static void free_runtime(aiob_runtime *rt, threads *th) {
  aiob_runtime_free(rt);
  threads_destroy(th);
  assert_clean();
}

/* ---- Tests --------------------------------------------------------------- */

/* A runtime that never had work blocks from the start. */
static void test_fresh(void **state) {
  (void)state;
  threads th;
  aiob_runtime *rt = runtime_with(2, AIOB_SPIN_US_DEFAULT, &th, 0);
  assert_idle(rt, &th, "fresh");
  free_runtime(rt, &th);
}

/* After round trips that the spin catches, timers and a blocking job. */
static void idle_after_work(unsigned loops, unsigned spin_us,
                            const char *label) {
  threads th;
  aiob_runtime *rt = runtime_with(loops, spin_us, &th, 1);
  round_trips(rt, loops, 2000);
  sleeps(rt, loops, 50);
  aiob_task *h = NULL;
  assert_rc(aiob_spawn_blocking(rt, NULL, nothing, NULL, NULL, &h), 0);
  wait_ok(h);
  aiob_task_release(h);
  round_trips(rt, loops, 500); /* the last work: round trips again */
  assert_idle(rt, &th, label);
  /* Idle twice: work after an idle stretch does not leave it spinning. */
  round_trips(rt, loops, 500);
  assert_idle(rt, &th, label);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  print_message("%s[%s]: %llu spins, %llu hits, %.1f ms spinning in all\n",
                label, g_backend, (unsigned long long)st.spins,
                (unsigned long long)st.spin_hits, (double)st.spin_ns / 1e6);
  if (spin_us == 0)
    assert_int_equal(st.spins, 0);
  free_runtime(rt, &th);
}

static void test_after_work(void **state) {
  (void)state;
  idle_after_work(1, AIOB_SPIN_US_DEFAULT, "after_work");
}

static void test_after_work_two_loops(void **state) {
  (void)state;
  idle_after_work(2, AIOB_SPIN_US_DEFAULT, "after_work_two_loops");
}

/* The largest spin: one spin of at most 10 ms after the last push, then
 * blocked. */
static void test_after_work_max_spin(void **state) {
  (void)state;
  idle_after_work(1, AIOB_SPIN_US_MAX, "after_work_max_spin");
}

static void test_after_work_no_spin(void **state) {
  (void)state;
  idle_after_work(1, 0, "after_work_no_spin");
}

static int setup(void **state) {
  (void)state;
  reset_checks();
  return 0;
}

#define T(name) cmocka_unit_test_setup_teardown(test_##name, setup, NULL)

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s <uv|event|uring> [test-name-filter]\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];

  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  aiob_runtime *probe = NULL;
  int rc = backend_probe_status("idle_cpu", g_backend,
                                aiob_runtime_new(&probe, &cfg));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);
  if (argc > 2)
    cmocka_set_test_filter(argv[2]);

  const struct CMUnitTest tests[] = {
      T(fresh),
      T(after_work),
      T(after_work_two_loops),
      T(after_work_max_spin),
      T(after_work_no_spin),
  };
  char group[64];
  snprintf(group, sizeof group, "idle_cpu_%s", g_backend);
  return _cmocka_run_group_tests(group, tests, sizeof tests / sizeof tests[0],
                                 NULL, NULL);
}
