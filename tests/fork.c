/* fork(): a child process gets a fresh default runtime on its next use,
 * every runtime it inherited refuses work instead of hanging or spinning,
 * and nothing the child does (use aiobridge, shut it down, exit normally or
 * with _exit) disturbs the parent's runtimes.
 *
 *   AIOBRIDGE_BACKEND=<backend> fork <backend>
 *
 * Children report through their exit status (0: every check held; else the
 * line number of the first check that failed, modulo 256, or 1); parents
 * wait for them with a bound and kill a child that hangs. A backend the
 * kernel refuses (io_uring) is a skip (exit 77). The last two tests (the
 * default runtime's references against concurrent shutdowns) fork nothing
 * and run under the sanitizers too. */
#include "aiobridge.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"

static const char *g_backend;

/* GCC 12's sanitizer runtimes do not support threads in the child of a
 * threaded process: AddressSanitizer can deadlock in the child's first
 * pthread_create (its thread registry is copied locked) and LeakSanitizer
 * reports false leaks there; ThreadSanitizer takes the child's new threads
 * for the parent's ("dup thread with used id") and dies. The fork tests
 * skip under them, saying so; the plain build runs them. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FORK_UNDER_SANITIZER 1
#else
#define FORK_UNDER_SANITIZER 0
#endif

static void skip_under_sanitizer(void) {
  if (FORK_UNDER_SANITIZER) {
    print_message("skipped: a forked child cannot start threads under this "
                  "sanitizer runtime\n");
    skip();
  }
}

/* ---- Tasks ------------------------------------------------------------- */

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}
static const aiob_task_vtable ready_vt = {.poll = ready_poll};

/* Sleeps for the ns in the first field of its state. */
typedef struct sleeper {
  uint64_t ns;
  int armed;
  aiob_sleep sleep;
} sleeper;

static aiob_poll sleep_poll(aiob_task *t, void *p) {
  sleeper *s = p;
  if (!s->armed) {
    aiob_sleep_init(&s->sleep, s->ns);
    s->armed = 1;
  }
  return aiob_sleep_poll(t, &s->sleep, NULL);
}
static void sleep_drop(void *p) { free(p); }
static const aiob_task_vtable sleep_vt = {.poll = sleep_poll,
                                          .drop = sleep_drop};

/* Runs a ready task and a 1 ms sleep on rt and waits for both: 0, or the
 * first error. */
static int use_runtime(aiob_runtime *rt) {
  aiob_task *t;
  int rc = aiob_spawn(rt, &ready_vt, NULL, &t);
  if (rc < 0)
    return rc;
  rc = aiob_task_wait(t, WAIT_TIMEOUT);
  aiob_task_release(t);
  if (rc < 0)
    return rc;
  sleeper *s = calloc(1, sizeof *s);
  if (!s)
    return AIOB_ENOMEM;
  s->ns = AIOB_MSEC;
  rc = aiob_spawn(rt, &sleep_vt, s, &t);
  if (rc < 0) {
    free(s);
    return rc;
  }
  rc = aiob_task_wait(t, WAIT_TIMEOUT);
  if (rc == 0) {
    aiob_output o;
    rc = aiob_task_take_output(t, &o);
    if (rc == 0)
      rc = o.status;
    aiob_output_clear(&o);
  }
  aiob_task_release(t);
  return rc;
}

/* ---- Children ---------------------------------------------------------- */

#define CHILD_CHECK(c)                                                         \
  do {                                                                         \
    if (!(c)) {                                                                \
      fprintf(stderr, "child %d: %s:%d: %s\n", (int)getpid(), __FILE__,        \
              __LINE__, #c);                                                   \
      return __LINE__ % 255 ? __LINE__ % 255 : 1;                              \
    }                                                                          \
  } while (0)

typedef int (*child_fn)(void *arg);

enum { EXIT_UNDERSCORE, EXIT_NORMAL };

/* Forks; the child runs fn(arg) and leaves with its result (through
 * _exit, or exit() to run atexit handlers); the parent waits at most 60 s
 * (then kills it) and returns the child's exit status, or -1 if it did not
 * exit normally. */
static int run_child(child_fn fn, void *arg, int how) {
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0)
    fail_msg("fork: %s", strerror(errno));
  if (pid == 0) {
    int rc = fn(arg);
    if (how == EXIT_NORMAL)
      exit(rc);
    _exit(rc);
  }
  int status = 0;
  uint64_t deadline = aiob_now_ns() + 60 * AIOB_SEC;
  for (;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid)
      break;
    if (w < 0 && errno != EINTR)
      fail_msg("waitpid: %s", strerror(errno));
    if (aiob_now_ns() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      fail_msg("child %d hung (killed after 60 s)", (int)pid);
    }
    sleep_thread_ns(AIOB_MSEC);
  }
  if (!WIFEXITED(status)) {
    print_message("child %d: killed by signal %d\n", (int)pid,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return -1;
  }
  return WEXITSTATUS(status);
}

/* The child's default runtime is a fresh one that works; the inherited one
 * refuses work at once. */
static int child_uses_default(void *arg) {
  aiob_runtime *inherited = arg;
  CHILD_CHECK(aiob_spawn(inherited, &ready_vt, NULL, NULL) == AIOB_ESHUTDOWN);
  CHILD_CHECK(aiob_runtime_native(inherited, 0) == NULL);
  aiob_runtime *rt = NULL;
  CHILD_CHECK(aiob_runtime_default(&rt) == 0);
  CHILD_CHECK(rt != inherited);
  CHILD_CHECK(strcmp(aiob_runtime_backend_name(rt), g_backend) == 0);
  CHILD_CHECK(use_runtime(rt) == 0);
  CHILD_CHECK(aiob_runtime_default_shutdown() == 0);
  /* And again after a shutdown in the child. */
  CHILD_CHECK(aiob_runtime_default(&rt) == 0);
  CHILD_CHECK(use_runtime(rt) == 0);
  CHILD_CHECK(aiob_runtime_default_shutdown() == 0);
  return 0;
}

static int child_does_nothing(void *arg) {
  (void)arg;
  return 0;
}

/* Shuts down and frees what it inherited: returns at once, touches nothing
 * of the parent's. */
static int child_frees_inherited(void *arg) {
  aiob_runtime *explicit_rt = arg;
  CHILD_CHECK(aiob_runtime_shutdown(explicit_rt) == 0);
  aiob_runtime_free(explicit_rt);
  CHILD_CHECK(aiob_runtime_default_shutdown() == 0);
  return 0;
}

/* ---- Tests ------------------------------------------------------------- */

static aiob_runtime *new_runtime(unsigned threads) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  cfg.threads = threads;
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  return rt;
}

/* A child of a process that used the default runtime gets a fresh one;
 * the parent's keeps working, whatever way the child leaves. */
static void test_child_gets_fresh_default(void **state) {
  (void)state;
  skip_under_sanitizer();
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default(&rt), 0);
  assert_rc(use_runtime(rt), 0);
  assert_int_equal(run_child(child_uses_default, rt, EXIT_UNDERSCORE), 0);
  assert_rc(use_runtime(rt), 0);
  assert_int_equal(run_child(child_uses_default, rt, EXIT_NORMAL), 0);
  assert_rc(use_runtime(rt), 0);
  assert_int_equal(run_child(child_does_nothing, NULL, EXIT_NORMAL), 0);
  assert_rc(use_runtime(rt), 0);
  aiob_runtime *again = NULL;
  assert_rc(aiob_runtime_default(&again), 0);
  assert_ptr_equal(again, rt); /* the parent's default never changed */
  assert_rc(aiob_runtime_default_shutdown(), 0);
}

/* A child that shuts down and frees the runtimes it inherited returns at
 * once and leaves the parent's running: a sleep the parent started before
 * the fork still fires, and new work runs. */
static void test_child_frees_inherited(void **state) {
  (void)state;
  skip_under_sanitizer();
  aiob_runtime *rt = new_runtime(2);
  aiob_runtime *def = NULL;
  assert_rc(aiob_runtime_default(&def), 0);
  sleeper *s = xcalloc(1, sizeof *s);
  s->ns = 50 * AIOB_MSEC;
  aiob_task *pending;
  assert_rc(aiob_spawn(rt, &sleep_vt, s, &pending), 0);
  assert_int_equal(run_child(child_frees_inherited, rt, EXIT_NORMAL), 0);
  assert_rc(aiob_task_wait(pending, WAIT_TIMEOUT), 0);
  assert_status(pending, 0);
  aiob_task_release(pending);
  assert_rc(use_runtime(rt), 0);
  assert_rc(use_runtime(def), 0);
  aiob_runtime_free(rt);
  assert_rc(aiob_runtime_default_shutdown(), 0);
}

/* Forks while other threads spawn, wake and cancel tasks on the default
 * runtime and on an explicit one: every child (forked at any point of a
 * push, a wake or a shutdown) gets a working fresh runtime and never hangs
 * or spins on what it inherited. */
#define LOAD_FORKS 16

typedef struct load {
  aiob_runtime *rt;
  atomic_int stop;
  atomic_long ops;
} load;

static void *load_thread(void *p) {
  load *l = p;
  while (!atomic_load(&l->stop)) {
    aiob_task *t = NULL;
    sleeper *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    if (!s)
      break;
    s->ns = 100 * AIOB_USEC;
    int rc = aiob_spawn(l->rt, &sleep_vt, s, &t);
    CHECK_INT(rc, ==, 0);
    if (rc < 0) {
      free(s);
      break;
    }
    if (atomic_load(&l->ops) % 3 == 0)
      aiob_task_cancel(t);
    CHECK_INT(aiob_task_wait(t, WAIT_TIMEOUT), ==, 0);
    aiob_task_release(t);
    atomic_fetch_add(&l->ops, 1);
  }
  return NULL;
}

static int child_under_load(void *arg) {
  aiob_runtime *explicit_rt = arg;
  CHILD_CHECK(aiob_spawn(explicit_rt, &ready_vt, NULL, NULL) == AIOB_ESHUTDOWN);
  aiob_runtime *rt = NULL;
  CHILD_CHECK(aiob_runtime_default(&rt) == 0);
  CHILD_CHECK(use_runtime(rt) == 0);
  CHILD_CHECK(aiob_runtime_default_shutdown() == 0);
  aiob_runtime_free(explicit_rt);
  return 0;
}

static void test_fork_under_load(void **state) {
  (void)state;
  skip_under_sanitizer();
  aiob_runtime *def = NULL;
  assert_rc(aiob_runtime_default(&def), 0);
  aiob_runtime *rt = new_runtime(2);
  /* Static: a failed check leaves this frame while the threads run. */
  static load loads[2];
  memset(loads, 0, sizeof loads);
  loads[0].rt = def;
  loads[1].rt = rt;
  pthread_t th[2];
  for (int i = 0; i < 2; i++)
    th[i] = start_thread(load_thread, &loads[i]);
  for (int i = 0; i < LOAD_FORKS; i++) {
    /* Fork only while both loads make progress. */
    long before0 = atomic_load(&loads[0].ops);
    long before1 = atomic_load(&loads[1].ops);
    uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
    while ((atomic_load(&loads[0].ops) == before0 ||
            atomic_load(&loads[1].ops) == before1) &&
           aiob_now_ns() < deadline)
      sleep_thread_ns(100 * AIOB_USEC);
    assert_int_equal(run_child(child_under_load, rt, EXIT_UNDERSCORE), 0);
  }
  for (int i = 0; i < 2; i++) {
    atomic_store(&loads[i].stop, 1);
    pthread_join(th[i], NULL);
    assert_true(atomic_load(&loads[i].ops) > 0);
  }
  assert_rc(use_runtime(rt), 0);
  assert_rc(use_runtime(def), 0);
  aiob_runtime_free(rt);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_clean();
}

/* A grandchild: a child that forks again after using its own fresh
 * runtime. */
static int child_forks_again(void *arg) {
  (void)arg;
  aiob_runtime *rt = NULL;
  CHILD_CHECK(aiob_runtime_default(&rt) == 0);
  CHILD_CHECK(use_runtime(rt) == 0);
  pid_t pid = fork();
  CHILD_CHECK(pid >= 0);
  if (pid == 0)
    _exit(child_uses_default(rt));
  int status = 0;
  CHILD_CHECK(waitpid(pid, &status, 0) == pid);
  CHILD_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHILD_CHECK(use_runtime(rt) == 0);
  CHILD_CHECK(aiob_runtime_default_shutdown() == 0);
  return 0;
}

static void test_grandchild(void **state) {
  (void)state;
  skip_under_sanitizer();
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_default(&rt), 0);
  assert_rc(use_runtime(rt), 0);
  assert_int_equal(run_child(child_forks_again, NULL, EXIT_UNDERSCORE), 0);
  assert_rc(use_runtime(rt), 0);
  assert_rc(aiob_runtime_default_shutdown(), 0);
}

/* A reference from aiob_runtime_default_acquire keeps the memory valid
 * across a concurrent aiob_runtime_default_shutdown: spawns on it fail
 * with AIOB_ESHUTDOWN, and the next acquire gives a fresh runtime. */
static void test_acquire_outlives_shutdown(void **state) {
  (void)state;
  aiob_runtime *held = NULL, *fresh = NULL;
  assert_rc(aiob_runtime_default_acquire(&held), 0);
  assert_rc(use_runtime(held), 0);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_rc(aiob_spawn(held, &ready_vt, NULL, NULL), AIOB_ESHUTDOWN);
  assert_null(aiob_runtime_native(held, 0));
  assert_rc(aiob_runtime_default_acquire(&fresh), 0);
  assert_ptr_not_equal(fresh, held);
  assert_rc(use_runtime(fresh), 0);
  aiob_runtime_release(held);
  aiob_runtime_release(fresh);
  aiob_runtime_release(NULL);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_rc(aiob_runtime_default_acquire(NULL), AIOB_EINVAL);
}

/* Threads that acquire the default runtime and spawn on it race with a
 * thread that shuts it down over and over: every spawn either runs or
 * fails with AIOB_ESHUTDOWN, never touches freed memory. */
typedef struct churn {
  atomic_int stop;
  atomic_long ran, refused;
} churn;

static void *churn_spawner(void *p) {
  churn *c = p;
  while (!atomic_load(&c->stop)) {
    aiob_runtime *rt = NULL;
    int rc = aiob_runtime_default_acquire(&rt);
    CHECK_INT(rc, ==, 0);
    if (rc < 0)
      break;
    aiob_task *t = NULL;
    rc = aiob_spawn(rt, &ready_vt, NULL, &t);
    if (rc == 0) {
      CHECK_INT(aiob_task_wait(t, WAIT_TIMEOUT), ==, 0);
      aiob_task_release(t);
      atomic_fetch_add(&c->ran, 1);
    } else {
      CHECK_INT(rc, ==, AIOB_ESHUTDOWN);
      atomic_fetch_add(&c->refused, 1);
    }
    aiob_runtime_release(rt);
  }
  return NULL;
}

static void test_acquire_races_shutdown(void **state) {
  (void)state;
  static churn c; /* static: a failed check leaves this frame */
  memset(&c, 0, sizeof c);
  pthread_t th[3];
  for (int i = 0; i < 3; i++)
    th[i] = start_thread(churn_spawner, &c);
  for (int i = 0; i < 200; i++) {
    long ran = atomic_load(&c.ran) + atomic_load(&c.refused);
    uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
    while (atomic_load(&c.ran) + atomic_load(&c.refused) == ran &&
           aiob_now_ns() < deadline)
      sched_yield();
    assert_rc(aiob_runtime_default_shutdown(), 0);
  }
  atomic_store(&c.stop, 1);
  for (int i = 0; i < 3; i++)
    pthread_join(th[i], NULL);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_true(atomic_load(&c.ran) > 0);
  print_message("acquire_races_shutdown[%s]: %ld ran, %ld refused\n", g_backend,
                atomic_load(&c.ran), atomic_load(&c.refused));
  assert_clean();
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <backend>\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];
  setenv("AIOBRIDGE_BACKEND", g_backend, 1); /* the default runtime's */
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  aiob_runtime *probe = NULL;
  int rc =
      backend_probe_status("fork", g_backend, aiob_runtime_new(&probe, &cfg));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_child_gets_fresh_default),
      cmocka_unit_test(test_child_frees_inherited),
      cmocka_unit_test(test_fork_under_load),
      cmocka_unit_test(test_grandchild),
      cmocka_unit_test(test_acquire_outlives_shutdown),
      cmocka_unit_test(test_acquire_races_shutdown),
  };
  char name[64];
  snprintf(name, sizeof name, "fork.%s", g_backend);
  return cmocka_run_group_tests_name(name, tests, NULL, NULL);
}
