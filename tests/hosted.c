/* Hosted runtimes (aiob_runtime_new_hosted) with the uv backend on a libuv
 * loop that the test thread owns and runs, as uvloop runs its own: the
 * first poll at spawn (aiob_runtime_hosted_call), timers, fd waits, wakes
 * and cancels from other threads, a batch larger than one dispatch that
 * never starves the host, the error codes, and a shutdown that closes
 * every handle it opened on the host's loop. */
#include "harness.h"

#include <string.h>
#include <unistd.h>
#include <uv.h>

/* ---- The host --------------------------------------------------------- */

static uv_loop_t g_host;
static aiob_runtime *g_rt;
static pthread_t g_host_thread;
/* The host's own work, which keeps its loop running (as uvloop's own
 * handles do): the runtime's handles never keep a host's loop alive. */
static uv_timer_t g_keepalive;

static void never_fires(uv_timer_t *t) { (void)t; }

static int setup(void **state) {
  (void)state;
  reset_checks();
  assert_int_equal(uv_loop_init(&g_host), 0);
  uv_timer_init(&g_host, &g_keepalive);
  uv_timer_start(&g_keepalive, never_fires, 3600 * 1000, 0);
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = "uv";
  cfg.backend_options.host = &g_host;
  assert_rc(aiob_runtime_new_hosted(&g_rt, &cfg), 0);
  g_host_thread = pthread_self();
  return 0;
}

/* Shuts the runtime down, then checks that it left nothing open on the
 * host's loop: running it returns at once, and it closes. */
static int teardown(void **state) {
  (void)state;
  assert_rc(aiob_runtime_shutdown(g_rt), 0);
  aiob_runtime_free(g_rt);
  uv_close((uv_handle_t *)&g_keepalive, NULL);
  uv_run(&g_host, UV_RUN_DEFAULT); /* the close callbacks */
  assert_int_equal(uv_loop_alive(&g_host), 0);
  assert_int_equal(uv_loop_close(&g_host), 0);
  assert_clean();
  return 0;
}

/* Runs the host loop until *flag is set, within WAIT_TIMEOUT. */
static void run_until(atomic_int *flag) {
  uint64_t end = aiob_now_ns() + WAIT_TIMEOUT;
  while (!atomic_load(flag)) {
    if (aiob_now_ns() > end)
      fail_msg("the host loop did not get there in time");
    uv_run(&g_host, UV_RUN_ONCE);
  }
}

/* ---- Tasks ------------------------------------------------------------- */

typedef struct tk {
  atomic_int polls, drops, done;
  atomic_int off_host; /* polled or dropped off the host thread */
  int co;
  uint64_t sleep_ns;
  aiob_sleep sleep;
  aiob_io_wait io;
  int fd;
  aiob_task *child;
  int yields;
} tk;

static void note_thread(tk *k) {
  if (!pthread_equal(pthread_self(), g_host_thread))
    atomic_fetch_add(&k->off_host, 1);
}

static void tk_drop(void *p) {
  tk *k = p;
  note_thread(k);
  CHECK_INT(atomic_fetch_add(&k->drops, 1), ==, 0);
  if (k->child) {
    aiob_task_cancel(k->child);
    aiob_task_release(k->child);
    k->child = NULL;
  }
}

static void tk_finish(void *arg, aiob_task *t) {
  (void)t;
  atomic_store(&((tk *)arg)->done, 1);
}

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  tk *k = p;
  note_thread(k);
  atomic_fetch_add(&k->polls, 1);
  return AIOB_READY;
}

static aiob_poll sleep_poll(aiob_task *t, void *p) {
  tk *k = p;
  note_thread(k);
  atomic_fetch_add(&k->polls, 1);
  AIOB_BEGIN(&k->co);
  aiob_sleep_init(&k->sleep, k->sleep_ns);
  AIOB_AWAIT(&k->co, aiob_sleep_poll(t, &k->sleep, NULL));
  AIOB_END(&k->co);
}

static aiob_poll read_poll(aiob_task *t, void *p) {
  tk *k = p;
  note_thread(k);
  atomic_fetch_add(&k->polls, 1);
  int res;
  AIOB_BEGIN(&k->co);
  aiob_io_wait_init(&k->io, k->fd, AIOB_READABLE);
  AIOB_AWAIT(&k->co, aiob_io_wait_poll(t, &k->io, &res));
  CHECK(res > 0 && (res & AIOB_READABLE));
  AIOB_END(&k->co);
}

static aiob_poll join_poll(aiob_task *t, void *p) {
  tk *k = p;
  note_thread(k);
  atomic_fetch_add(&k->polls, 1);
  int st;
  AIOB_BEGIN(&k->co);
  AIOB_AWAIT(&k->co, aiob_task_join(t, k->child, &st));
  CHECK_INT(st, ==, 0);
  AIOB_END(&k->co);
}

static aiob_poll yield_poll(aiob_task *t, void *p) {
  tk *k = p;
  note_thread(k);
  if (atomic_fetch_add(&k->polls, 1) + 1 >= k->yields)
    return AIOB_READY;
  aiob_task_yield_now(t);
  return AIOB_PENDING;
}

static const aiob_task_vtable ready_vt = {.poll = ready_poll, .drop = tk_drop};
static const aiob_task_vtable sleep_vt = {.poll = sleep_poll, .drop = tk_drop};
static const aiob_task_vtable read_vt = {.poll = read_poll, .drop = tk_drop};
static const aiob_task_vtable join_vt = {.poll = join_poll, .drop = tk_drop};
static const aiob_task_vtable yield_vt = {.poll = yield_poll, .drop = tk_drop};

struct spawn_arg {
  const aiob_task_vtable *vt;
  tk *k;
  aiob_task *handle;
};

static int spawn_fn(void *arg) {
  struct spawn_arg *a = arg;
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.on_finish = tk_finish;
  o.on_finish_arg = a->k;
  return aiob_spawn_ex(g_rt, &o, a->vt, a->k, &a->handle);
}

/* Spawns through aiob_runtime_hosted_call: polled once before it returns. */
static aiob_task *spawn_now(const aiob_task_vtable *vt, tk *k) {
  struct spawn_arg a = {vt, k, NULL};
  assert_rc(aiob_runtime_hosted_call(g_rt, spawn_fn, &a), 0);
  assert_int_equal(atomic_load(&k->polls), 1);
  return a.handle;
}

/* ---- Tests ------------------------------------------------------------- */

static void test_first_poll_at_spawn(void **state) {
  (void)state;
  tk k = {0};
  aiob_task *t = spawn_now(&ready_vt, &k);
  assert_int_equal(atomic_load(&k.done), 1); /* before the call returned */
  assert_int_equal(atomic_load(&k.drops), 1);
  assert_status(t, 0);
  aiob_task_release(t);
  assert_int_equal(atomic_load(&k.off_host), 0);
}

static void test_timer_on_host_loop(void **state) {
  (void)state;
  tk k = {.sleep_ns = 5 * AIOB_MSEC};
  uint64_t t0 = aiob_now_ns();
  aiob_task *t = spawn_now(&sleep_vt, &k);
  assert_int_equal(atomic_load(&k.done), 0);
  run_until(&k.done);
  assert_true(aiob_now_ns() - t0 >= 5 * AIOB_MSEC);
  assert_status(t, 0);
  aiob_task_release(t);
  assert_int_equal(atomic_load(&k.off_host), 0);
}

static void *write_later(void *arg) {
  int fd = *(int *)arg;
  sleep_thread_ns(2 * AIOB_MSEC);
  CHECK_INT(write(fd, "x", 1), ==, 1);
  return NULL;
}

static void test_fd_wait_on_host_loop(void **state) {
  (void)state;
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  tk k = {.fd = fds[0]};
  aiob_task *t = spawn_now(&read_vt, &k);
  pthread_t th = start_thread(write_later, &fds[1]);
  run_until(&k.done);
  pthread_join(th, NULL);
  assert_status(t, 0);
  aiob_task_release(t);
  assert_int_equal(atomic_load(&k.off_host), 0);
  close(fds[0]);
  close(fds[1]);
}

/* A hosted task joins a task of a runtime with threads: the wake crosses
 * from that runtime's loop thread to the host. */
static void test_join_threaded_runtime(void **state) {
  (void)state;
  aiob_runtime *other;
  assert_rc(aiob_runtime_new(&other, NULL), 0);
  tk ck = {.sleep_ns = 2 * AIOB_MSEC};
  aiob_task *child;
  assert_rc(aiob_spawn(other, &sleep_vt, &ck, &child), 0);
  tk k = {.child = child};
  aiob_task *t = spawn_now(&join_vt, &k);
  run_until(&k.done);
  assert_status(t, 0);
  aiob_task_release(t);
  assert_int_equal(atomic_load(&k.off_host), 0);
  assert_true(atomic_load(&ck.off_host) > 0); /* it ran on that runtime */
  assert_rc(aiob_runtime_shutdown(other), 0);
  aiob_runtime_free(other);
}

static void *cancel_later(void *arg) {
  sleep_thread_ns(2 * AIOB_MSEC);
  aiob_task_cancel(arg);
  return NULL;
}

static void test_cancel_from_other_thread(void **state) {
  (void)state;
  tk k = {.sleep_ns = UINT64_MAX};
  aiob_task *t = spawn_now(&sleep_vt, &k);
  pthread_t th = start_thread(cancel_later, t);
  run_until(&k.done);
  pthread_join(th, NULL);
  assert_status(t, AIOB_ECANCELED);
  assert_int_equal(atomic_load(&k.drops), 1);
  assert_int_equal(atomic_load(&k.off_host), 0); /* dropped on the host */
  aiob_task_release(t);
}

/* More ready work than one dispatch runs: the host's own handles still get
 * their turns between dispatches. */
static atomic_int g_host_ticks;
static void host_tick(uv_idle_t *h) {
  (void)h;
  atomic_fetch_add(&g_host_ticks, 1);
}

#define NYIELD 300
static void test_long_batch_never_starves_host(void **state) {
  (void)state;
  uv_idle_t idle;
  uv_idle_init(&g_host, &idle);
  atomic_store(&g_host_ticks, 0);
  uv_idle_start(&idle, host_tick);
  tk *ks = xcalloc(NYIELD, sizeof *ks);
  aiob_task **ts = xcalloc(NYIELD, sizeof *ts);
  for (int i = 0; i < NYIELD; i++) {
    ks[i].yields = 50;
    assert_rc(aiob_spawn(g_rt, &yield_vt, &ks[i], &ts[i]), 0);
  }
  int ticks_while_busy = 0;
  uint64_t end = aiob_now_ns() + WAIT_TIMEOUT;
  for (;;) {
    int left = 0;
    for (int i = 0; i < NYIELD; i++)
      left += !aiob_task_is_finished(ts[i]);
    if (!left)
      break;
    if (aiob_now_ns() > end)
      fail_msg("%d tasks left", left);
    ticks_while_busy = atomic_load(&g_host_ticks);
    uv_run(&g_host, UV_RUN_ONCE);
  }
  /* 300 x 50 polls take many dispatches of at most a budget each. */
  assert_true(ticks_while_busy >= 10);
  for (int i = 0; i < NYIELD; i++) {
    assert_int_equal(atomic_load(&ks[i].polls), 50);
    assert_int_equal(atomic_load(&ks[i].off_host), 0);
    aiob_task_release(ts[i]);
  }
  uv_close((uv_handle_t *)&idle, NULL);
  uv_run(&g_host, UV_RUN_NOWAIT); /* its close callback: idle is ours */
  free(ks);
  free(ts);
}

/* The runtime's handles never keep the host's loop alive, a pending sleep
 * and fd wait included: the host decides how long its loop runs (a close
 * of uvloop's that bypassed the runtime's own cannot hang on them). */
static void test_handles_never_keep_the_host_alive(void **state) {
  (void)state;
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  tk sk = {.sleep_ns = UINT64_MAX}, rk = {.fd = fds[0]};
  aiob_task *st = spawn_now(&sleep_vt, &sk);
  aiob_task *rt = spawn_now(&read_vt, &rk);
  uv_timer_stop(&g_keepalive);
  assert_int_equal(uv_loop_alive(&g_host), 0);
  assert_int_equal(uv_run(&g_host, UV_RUN_DEFAULT), 0); /* returns at once */
  aiob_task_cancel(st);
  aiob_task_cancel(rt);
  assert_rc(aiob_runtime_hosted_dispatch(g_rt), 0);
  assert_status(st, AIOB_ECANCELED);
  assert_status(rt, AIOB_ECANCELED);
  aiob_task_release(st);
  aiob_task_release(rt);
  close(fds[0]);
  close(fds[1]);
}

struct other_thread_arg {
  int dispatch_rc, call_rc;
};

static int never(void *arg) {
  (void)arg;
  CHECK(0);
  return 0;
}

static void *from_other_thread(void *arg) {
  struct other_thread_arg *a = arg;
  a->dispatch_rc = aiob_runtime_hosted_dispatch(g_rt);
  a->call_rc = aiob_runtime_hosted_call(g_rt, never, NULL);
  return NULL;
}

static void test_errors(void **state) {
  (void)state;
  struct other_thread_arg a;
  pthread_t th = start_thread(from_other_thread, &a);
  pthread_join(th, NULL);
  assert_rc(a.dispatch_rc, AIOB_EPERM);
  assert_rc(a.call_rc, AIOB_EPERM);
  assert_rc(aiob_runtime_hosted_call(g_rt, NULL, NULL), AIOB_EINVAL);
  assert_rc(aiob_runtime_hosted_dispatch(NULL), AIOB_EINVAL);
  aiob_runtime *threaded;
  assert_rc(aiob_runtime_new(&threaded, NULL), 0);
  assert_rc(aiob_runtime_hosted_dispatch(threaded), AIOB_EINVAL);
  aiob_runtime_free(threaded);
  /* Waiting on the host thread for a task only it can run. */
  tk k = {.sleep_ns = UINT64_MAX};
  aiob_task *t = spawn_now(&sleep_vt, &k);
  assert_rc(aiob_task_wait(t, AIOB_MSEC), AIOB_EDEADLK);
  aiob_task_cancel(t);
  run_until(&k.done);
  aiob_task_release(t);
}

/* Shutdown with a sleep, an fd wait and a queued task still there: each is
 * dropped once, on this thread, and every handle is closed (teardown
 * checks the host loop then closes). Afterwards nothing runs. */
static void test_shutdown_closes_everything(void **state) {
  (void)state;
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  tk sk = {.sleep_ns = UINT64_MAX}, rk = {.fd = fds[0]}, qk = {0};
  aiob_task *st = spawn_now(&sleep_vt, &sk);
  aiob_task *rt = spawn_now(&read_vt, &rk);
  aiob_task *qt;
  assert_rc(aiob_spawn(g_rt, &ready_vt, &qk, &qt), 0); /* queued */
  assert_rc(aiob_runtime_shutdown(g_rt), 0);
  assert_int_equal(atomic_load(&sk.drops), 1);
  assert_int_equal(atomic_load(&rk.drops), 1);
  assert_int_equal(atomic_load(&qk.drops), 1);
  assert_int_equal(atomic_load(&qk.polls), 0);
  assert_status(st, AIOB_ECANCELED);
  assert_status(rt, AIOB_ECANCELED);
  assert_status(qt, AIOB_ECANCELED);
  assert_rc(aiob_runtime_hosted_dispatch(g_rt), AIOB_ESHUTDOWN);
  tk late = {0};
  aiob_task *lt = NULL;
  assert_rc(aiob_spawn(g_rt, &ready_vt, &late, &lt), AIOB_ESHUTDOWN);
  aiob_task_release(st);
  aiob_task_release(rt);
  aiob_task_release(qt);
  close(fds[0]);
  close(fds[1]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_first_poll_at_spawn, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_timer_on_host_loop, setup, teardown),
      cmocka_unit_test_setup_teardown(test_fd_wait_on_host_loop, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_join_threaded_runtime, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_cancel_from_other_thread, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_long_batch_never_starves_host, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_handles_never_keep_the_host_alive,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_shutdown_closes_everything, setup,
                                      teardown),
  };
  return cmocka_run_group_tests_name("hosted", tests, NULL, NULL);
}
