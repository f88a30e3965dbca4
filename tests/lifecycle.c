/* Shutdown with a deadline: a loop thread that cannot stop (a callback that
 * blocks, a native libuv request that never completes) makes
 * aiob_runtime_shutdown_timeout return AIOB_ETIMEDOUT and report what is
 * left; a later shutdown waits for it again; aiob_runtime_free abandons it
 * (it frees what only it still uses once it gets unstuck); the default
 * runtime is recreated after a shutdown, also one that timed out.
 *
 *   lifecycle <uv|event|uring> [test-name-filter]
 *
 * Stuck loop threads are made with a gate: a callback run on the loop
 * thread (aiob_runtime_call) that blocks until the test opens the gate, so
 * every test unblocks what it blocked and leaves no thread behind. Every
 * wait is bounded (WAIT_TIMEOUT); deadlines given to the shutdown calls are
 * short only where the test wants them to expire (a stuck loop), and
 * generous where it wants them not to. A backend the kernel refuses
 * (io_uring) is a skip (exit 77). Runs under ASan and TSan too, except the
 * fork() case (see tests/fork.c for why). */
#include "aiobridge.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef AIOB_TEST_HAVE_UV
#include <uv.h>
#endif

#include <cmocka.h>

#include "harness.h"

static const char *g_backend; /* argv[1] */

__attribute__((unused)) static int backend_is(const char *name) {
  return strcmp(g_backend, name) == 0;
}

static int runtime_new(aiob_runtime **out, unsigned threads) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  cfg.threads = threads;
  return aiob_runtime_new(out, &cfg);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FORK_UNDER_SANITIZER 1
#else
#define FORK_UNDER_SANITIZER 0
#endif

/* Waits (bounded) until no abandoned loop thread runs any more: the last
 * thing such a thread does is to count itself out. */
static void abandoned_reach_zero(void) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (aiob_runtime_abandoned_threads() != 0) {
    if (aiob_now_ns() > deadline)
      fail_msg("%u abandoned loop thread(s) still running after %llu s",
               aiob_runtime_abandoned_threads(),
               (unsigned long long)(WAIT_TIMEOUT / AIOB_SEC));
    sleep_thread_ns(AIOB_MSEC);
  }
}

/* ---- A gate: a loop-thread callback that blocks until opened ----------- */

typedef struct gate {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int open;
  latch entered; /* the callback runs on the loop thread */
  latch left;    /* it returned */
  atomic_int status;
} gate;

static gate *gate_new(void) {
  gate *g = xcalloc(1, sizeof *g);
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->cv, NULL);
  latch_init(&g->entered);
  latch_init(&g->left);
  atomic_store(&g->status, 1);
  return g;
}

static void gate_cb(void *arg, int status) {
  gate *g = arg;
  atomic_store(&g->status, status);
  if (status == 0) {
    latch_add(&g->entered, 1);
    pthread_mutex_lock(&g->mu);
    while (!g->open)
      pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
  }
  latch_add(&g->left, 1);
}

/* Blocks loop `index` of rt until gate_open. */
static gate *block_loop(aiob_runtime *rt, unsigned index) {
  gate *g = gate_new();
  assert_rc(aiob_runtime_call(rt, index, gate_cb, g), 0);
  latch_ok(&g->entered, 1);
  return g;
}

static void gate_open(gate *g) {
  pthread_mutex_lock(&g->mu);
  g->open = 1;
  pthread_cond_broadcast(&g->cv);
  pthread_mutex_unlock(&g->mu);
}

/* Opens the gate, waits for its callback to return, frees it. */
static void gate_finish(gate *g) {
  gate_open(g);
  latch_ok(&g->left, 1);
  pthread_cond_destroy(&g->cv);
  pthread_mutex_destroy(&g->mu);
  latch_destroy(&g->entered);
  latch_destroy(&g->left);
  free(g);
}

/* ---- Tasks ------------------------------------------------------------- */

/* Sleeps "forever" (an hour); its drop counts into `dropped`. */
typedef struct napper {
  aiob_sleep sleep;
  int armed;
  latch *dropped;
} napper;

static aiob_poll nap_poll(aiob_task *t, void *p) {
  napper *n = p;
  if (!n->armed) {
    aiob_sleep_init(&n->sleep, 3600 * AIOB_SEC);
    n->armed = 1;
  }
  return aiob_sleep_poll(t, &n->sleep, NULL);
}

static void nap_drop(void *p) {
  napper *n = p;
  if (n->dropped)
    latch_add(n->dropped, 1);
  free(n);
}
static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = nap_drop};

static aiob_task *spawn_nap(aiob_runtime *rt, int loop, latch *dropped) {
  napper *n = xcalloc(1, sizeof *n);
  n->dropped = dropped;
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.loop = loop;
  aiob_task *t = NULL;
  assert_rc(aiob_spawn_ex(rt, &o, &nap_vt, n, &t), 0);
  return t;
}

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}
static const aiob_task_vtable ready_vt = {.poll = ready_poll};

/* A task runs to completion on rt. */
static void runtime_works(aiob_runtime *rt) {
  aiob_task *t;
  assert_rc(aiob_spawn(rt, &ready_vt, NULL, &t), 0);
  wait_ok(t);
  assert_status(t, 0);
  aiob_task_release(t);
}

static void spawn_refused(aiob_runtime *rt) {
  aiob_task *t = NULL;
  assert_rc(aiob_spawn(rt, &ready_vt, NULL, &t), AIOB_ESHUTDOWN);
  assert_null(t);
}

/* ======================================================================== */
/* healthy: with nothing stuck, aiob_runtime_shutdown_timeout stops and     */
/* joins every loop thread within a generous deadline, drops every task     */
/* (joiners see AIOB_ECANCELED) and reports nothing left; it is idempotent, */
/* even with a zero deadline; spawns are refused afterwards.                */
static void test_healthy(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2), 0);
  assert_int_equal(aiob_runtime_loop_running(rt, 0), 1);
  assert_int_equal(aiob_runtime_loop_running(rt, 1), 1);
  latch dropped;
  latch_init(&dropped);
  aiob_task *t[20];
  for (int i = 0; i < 20; i++)
    t[i] = spawn_nap(rt, i % 2, &dropped);
  runtime_works(rt);

  aiob_shutdown_info info;
  memset(&info, 0xff, sizeof info);
  assert_rc(aiob_runtime_shutdown_timeout(rt, WAIT_TIMEOUT, &info), 0);
  assert_int_equal(info.loops, 2);
  assert_int_equal(info.loops_left, 0);
  assert_int_equal(info.tasks_left, 0);
  assert_int_equal(latch_get(&dropped), 20);
  for (int i = 0; i < 20; i++) {
    assert_true(aiob_task_is_finished(t[i]));
    assert_status(t[i], AIOB_ECANCELED);
    aiob_task_release(t[i]);
  }
  assert_int_equal(aiob_runtime_loop_running(rt, 0), 0);
  assert_int_equal(aiob_runtime_loop_running(rt, 1), 0);
  spawn_refused(rt);
  assert_rc(aiob_runtime_shutdown_timeout(rt, 0, &info), 0);
  assert_int_equal(info.loops_left, 0);
  assert_rc(aiob_runtime_shutdown_timeout(rt, UINT64_MAX, NULL), 0);
  assert_rc(aiob_runtime_shutdown(rt), 0);
  aiob_runtime_free(rt);
  latch_destroy(&dropped);
  assert_int_equal(aiob_runtime_abandoned_threads(), 0);
}

/* ======================================================================== */
/* errors: a NULL runtime or a bad index is AIOB_EINVAL; a shutdown from    */
/* one of the runtime's own loop threads is AIOB_EDEADLK and does nothing   */
/* (the default runtime's too).                                             */
typedef struct own_loop {
  aiob_runtime *rt;
  int is_default; /* call aiob_runtime_default_shutdown_timeout */
  atomic_int rc;
  latch done;
} own_loop;

static void own_loop_cb(void *arg, int status) {
  own_loop *c = arg;
  CHECK_INT(status, ==, 0);
  atomic_store(&c->rc, c->is_default
                           ? aiob_runtime_default_shutdown_timeout(0, NULL)
                           : aiob_runtime_shutdown_timeout(c->rt, 0, NULL));
  latch_add(&c->done, 1);
}

static void test_errors(void **state) {
  (void)state;
  aiob_shutdown_info info;
  assert_rc(aiob_runtime_shutdown_timeout(NULL, 0, &info), AIOB_EINVAL);
  assert_rc(aiob_runtime_loop_running(NULL, 0), AIOB_EINVAL);
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1), 0);
  assert_rc(aiob_runtime_loop_running(rt, 1), AIOB_EINVAL);
  own_loop c = {.rt = rt};
  latch_init(&c.done);
  assert_rc(aiob_runtime_call(rt, 0, own_loop_cb, &c), 0);
  latch_ok(&c.done, 1);
  assert_rc(atomic_load(&c.rc), AIOB_EDEADLK);
  runtime_works(rt); /* nothing was done */

  /* The default runtime, from its own loop thread. */
  aiob_runtime *def;
  assert_rc(aiob_runtime_default(&def), 0);
  own_loop d = {.rt = def, .is_default = 1};
  latch_init(&d.done);
  assert_rc(aiob_runtime_call(def, 0, own_loop_cb, &d), 0);
  latch_ok(&d.done, 1);
  assert_rc(atomic_load(&d.rc), AIOB_EDEADLK);
  runtime_works(def);
  assert_rc(aiob_runtime_default_shutdown_timeout(WAIT_TIMEOUT, &info), 0);
  assert_int_equal(info.loops, 1);
  assert_int_equal(info.loops_left, 0);
  /* No default runtime: nothing to do, nothing left. */
  memset(&info, 0xff, sizeof info);
  assert_rc(aiob_runtime_default_shutdown_timeout(0, &info), 0);
  assert_int_equal(info.loops, 0);
  assert_int_equal(info.loops_left, 0);
  assert_int_equal(info.tasks_left, 0);
  aiob_runtime_free(rt);
  latch_destroy(&c.done);
  latch_destroy(&d.done);
}

/* ======================================================================== */
/* stuck_then_waits: loop 1 of 2 blocked in a callback. The shutdown times  */
/* out, reports loop 1 and its tasks as left, and has already stopped loop  */
/* 0 (its tasks dropped); spawns are refused; another short shutdown times  */
/* out again. Once unblocked, aiob_runtime_shutdown waits for loop 1 and    */
/* its tasks are dropped (AIOB_ECANCELED).                                  */
static void test_stuck_then_waits(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2), 0);
  gate *g = block_loop(rt, 1);
  latch dropped0, dropped1;
  latch_init(&dropped0);
  latch_init(&dropped1);
  aiob_task *t0[5], *t1[5];
  for (int i = 0; i < 5; i++) {
    t0[i] = spawn_nap(rt, 0, &dropped0);
    t1[i] = spawn_nap(rt, 1, &dropped1);
  }

  aiob_shutdown_info info;
  assert_rc(aiob_runtime_shutdown_timeout(rt, 50 * AIOB_MSEC, &info),
            AIOB_ETIMEDOUT);
  /* Loop 0 stops in its own time (a busy machine may take longer than
   * that deadline): wait for it with more short shutdowns. */
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (aiob_runtime_loop_running(rt, 0) == 1 && aiob_now_ns() < deadline)
    assert_rc(aiob_runtime_shutdown_timeout(rt, AIOB_MSEC, &info),
              AIOB_ETIMEDOUT);
  assert_rc(aiob_runtime_shutdown_timeout(rt, 0, &info), AIOB_ETIMEDOUT);
  assert_int_equal(info.loops, 2);
  assert_int_equal(info.loops_left, 1);
  /* Loop 1's naps and the gate's call task are not dropped. */
  assert_true(info.tasks_left >= 6);
  assert_int_equal(aiob_runtime_loop_running(rt, 0), 0);
  assert_int_equal(aiob_runtime_loop_running(rt, 1), 1);
  assert_int_equal(latch_get(&dropped0), 5);
  assert_int_equal(latch_get(&dropped1), 0);
  for (int i = 0; i < 5; i++) {
    assert_status(t0[i], AIOB_ECANCELED);
    assert_false(aiob_task_is_finished(t1[i]));
  }
  spawn_refused(rt);
  assert_rc(aiob_runtime_shutdown_timeout(rt, 0, &info), AIOB_ETIMEDOUT);
  assert_int_equal(info.loops_left, 1);
  assert_int_equal(aiob_runtime_abandoned_threads(), 0); /* not freed */

  gate_finish(g);
  assert_rc(aiob_runtime_shutdown(rt), 0); /* waits for loop 1 */
  assert_int_equal(aiob_runtime_loop_running(rt, 1), 0);
  assert_int_equal(latch_get(&dropped1), 5);
  for (int i = 0; i < 5; i++) {
    assert_status(t1[i], AIOB_ECANCELED);
    aiob_task_release(t0[i]);
    aiob_task_release(t1[i]);
  }
  assert_rc(aiob_runtime_shutdown_timeout(rt, 0, &info), 0);
  assert_int_equal(info.loops_left, 0);
  assert_int_equal(info.tasks_left, 0);
  aiob_runtime_free(rt); /* joined: frees at once */
  latch_destroy(&dropped0);
  latch_destroy(&dropped1);
}

/* ======================================================================== */
/* free_abandons: after a shutdown that timed out, aiob_runtime_free        */
/* returns without waiting and the stuck loop thread is counted as          */
/* abandoned. Unblocked later, it drops its tasks and exits, freeing the    */
/* runtime (ASan: nothing leaks, nothing is used after it is freed).        */
typedef struct freer {
  aiob_runtime *rt;
  latch done;
} freer;

static void *free_thread(void *arg) {
  freer *f = arg;
  aiob_runtime_free(f->rt);
  latch_add(&f->done, 1);
  return NULL;
}

static void test_free_abandons(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1), 0);
  gate *g = block_loop(rt, 0);
  latch dropped;
  latch_init(&dropped);
  for (int i = 0; i < 8; i++)
    aiob_task_release(spawn_nap(rt, 0, &dropped)); /* the runtime's now */
  assert_rc(aiob_runtime_shutdown_timeout(rt, 20 * AIOB_MSEC, NULL),
            AIOB_ETIMEDOUT);

  freer f = {.rt = rt};
  latch_init(&f.done);
  pthread_t th = start_thread(free_thread, &f);
  if (latch_wait(&f.done, 1, WAIT_TIMEOUT) != 0)
    fail_msg("aiob_runtime_free waits for a loop thread it should abandon");
  pthread_join(th, NULL);
  assert_int_equal(aiob_runtime_abandoned_threads(), 1);
  assert_int_equal(latch_get(&dropped), 0);

  gate_finish(g);
  latch_ok(&dropped, 8);
  abandoned_reach_zero();
  latch_destroy(&dropped);
  latch_destroy(&f.done);
}

static void peek_noop(aiob_runtime *rt, void *arg) {
  (void)rt;
  (void)arg;
}

/* ======================================================================== */
/* default_restart: the default runtime is recreated on next use after a    */
/* shutdown, and at once after one that timed out (its stuck loop thread    */
/* abandoned, running beside the fresh runtime's until unblocked).          */
static void test_default_restart(void **state) {
  (void)state;
  aiob_runtime *rt, *again;
  assert_rc(aiob_runtime_default(&rt), 0);
  runtime_works(rt);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_rc(aiob_runtime_default(&again), 0);
  runtime_works(again);

  gate *g = block_loop(again, 0);
  latch dropped;
  latch_init(&dropped);
  aiob_task_release(spawn_nap(again, 0, &dropped));
  aiob_shutdown_info info;
  assert_rc(aiob_runtime_default_shutdown_timeout(20 * AIOB_MSEC, &info),
            AIOB_ETIMEDOUT);
  assert_int_equal(info.loops, 1);
  assert_int_equal(info.loops_left, 1);
  assert_true(info.tasks_left >= 2); /* the nap and the gate's call */
  assert_int_equal(aiob_runtime_abandoned_threads(), 1);
  assert_rc(aiob_runtime_default_peek(peek_noop, NULL), AIOB_ENOENT);

  aiob_runtime *fresh;
  assert_rc(aiob_runtime_default(&fresh), 0); /* does not wait */
  runtime_works(fresh);
  assert_rc(aiob_runtime_default_shutdown_timeout(WAIT_TIMEOUT, &info), 0);
  assert_int_equal(info.loops_left, 0);
  assert_rc(aiob_runtime_default(&fresh), 0);
  runtime_works(fresh);
  assert_rc(aiob_runtime_default_shutdown(), 0);

  gate_finish(g);
  latch_ok(&dropped, 1);
  abandoned_reach_zero();
  latch_destroy(&dropped);
}

/* ======================================================================== */
/* concurrent: four threads shut the same stuck runtime down at once with   */
/* short deadlines, again and again, while the test unblocks it: each call  */
/* returns 0 or AIOB_ETIMEDOUT, every loop thread is joined exactly once    */
/* (ASan/TSan), and the runtime frees normally afterwards.                  */
typedef struct racer {
  aiob_runtime *rt;
  latch *started;
  atomic_int zeros, timeouts, others;
} racer;

static void *race_thread(void *arg) {
  racer *r = arg;
  latch_add(r->started, 1);
  for (;;) {
    int rc = aiob_runtime_shutdown_timeout(r->rt, AIOB_MSEC, NULL);
    if (rc == 0) {
      atomic_fetch_add(&r->zeros, 1);
      return NULL;
    }
    if (rc == AIOB_ETIMEDOUT)
      atomic_fetch_add(&r->timeouts, 1);
    else {
      atomic_fetch_add(&r->others, 1);
      return NULL;
    }
  }
}

static void test_concurrent(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2), 0);
  gate *g0 = block_loop(rt, 0), *g1 = block_loop(rt, 1);
  latch started;
  latch_init(&started);
  racer r[4];
  pthread_t th[4];
  for (int i = 0; i < 4; i++) {
    memset(&r[i], 0, sizeof r[i]);
    r[i].rt = rt;
    r[i].started = &started;
    th[i] = start_thread(race_thread, &r[i]);
  }
  latch_ok(&started, 4);
  gate_finish(g0);
  gate_finish(g1);
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&r[i].zeros), 1);
    assert_int_equal(atomic_load(&r[i].others), 0);
  }
  assert_int_equal(aiob_runtime_loop_running(rt, 0), 0);
  assert_int_equal(aiob_runtime_loop_running(rt, 1), 0);
  aiob_runtime_free(rt);
  latch_destroy(&started);
}

/* ======================================================================== */
/* uv_native_request: on the uv backend, a libuv fs open of a FIFO with no  */
/* writer, made on the runtime's own uv loop, keeps the loop from closing   */
/* (uv_run until every request is done): the shutdown times out with no     */
/* task left; once a writer opens the FIFO the request completes, its       */
/* callback runs during the close, and a second shutdown joins the thread.  */
/* (libevent has no requests, and io_uring cancels its requests when its    */
/* loop closes: skipped there.)                                             */
#ifdef AIOB_TEST_HAVE_UV
typedef struct fifo_open {
  uv_fs_t req;
  atomic_long result;
  latch done;
} fifo_open;

static void fifo_opened(uv_fs_t *req) {
  fifo_open *f = req->data;
  atomic_store(&f->result, (long)req->result);
  if (req->result >= 0)
    close((int)req->result);
  uv_fs_req_cleanup(req);
  latch_add(&f->done, 1);
}

typedef struct fifo_start {
  aiob_runtime *rt;
  const char *path;
  fifo_open *f;
  atomic_int rc;
  latch started;
} fifo_start;

static void fifo_start_cb(void *arg, int status) {
  fifo_start *s = arg;
  CHECK_INT(status, ==, 0);
  uv_loop_t *loop = aiob_runtime_native(s->rt, 0);
  s->f->req.data = s->f;
  atomic_store(&s->rc,
               uv_fs_open(loop, &s->f->req, s->path, O_RDONLY, 0, fifo_opened));
  latch_add(&s->started, 1);
}
#endif

static void test_uv_native_request(void **state) {
  (void)state;
#ifdef AIOB_TEST_HAVE_UV
  if (!backend_is("uv")) {
#endif
    print_message("skipped: needs the uv backend (libevent has no requests; "
                  "io_uring cancels them when its loop closes)\n");
    skip();
#ifdef AIOB_TEST_HAVE_UV
  }
  char dir[] = "/tmp/aiob-lifecycle-XXXXXX";
  assert_non_null(mkdtemp(dir));
  char path[sizeof dir + 8];
  snprintf(path, sizeof path, "%s/fifo", dir);
  assert_int_equal(mkfifo(path, 0600), 0);

  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1), 0);
  fifo_open *f = xcalloc(1, sizeof *f);
  atomic_store(&f->result, 1);
  latch_init(&f->done);
  fifo_start s = {.rt = rt, .path = path, .f = f};
  latch_init(&s.started);
  assert_rc(aiob_runtime_call(rt, 0, fifo_start_cb, &s), 0);
  latch_ok(&s.started, 1);
  assert_rc(atomic_load(&s.rc), 0);

  aiob_shutdown_info info;
  assert_rc(aiob_runtime_shutdown_timeout(rt, 50 * AIOB_MSEC, &info),
            AIOB_ETIMEDOUT);
  assert_int_equal(info.loops_left, 1);
  assert_int_equal(aiob_runtime_loop_running(rt, 0), 1);
  assert_int_equal(latch_get(&f->done), 0);

  /* A writer: the threadpool's open returns, the close finishes. */
  int w = open(path, O_WRONLY | O_CLOEXEC);
  assert_true(w >= 0);
  assert_rc(aiob_runtime_shutdown_timeout(rt, WAIT_TIMEOUT, &info), 0);
  assert_int_equal(info.loops_left, 0);
  latch_ok(&f->done, 1);
  assert_true(atomic_load(&f->result) >= 0);
  close(w);
  aiob_runtime_free(rt);
  unlink(path);
  rmdir(dir);
  latch_destroy(&f->done);
  latch_destroy(&s.started);
  free(f);
#endif
}

/* ======================================================================== */
/* fork_after_abandon: a child forked while an abandoned loop thread runs   */
/* has none (the count is 0 there) and starts a fresh default runtime. It   */
/* leaves with _exit: libuv 1.44's destructor crashes in the child of a     */
/* process that used libuv's threadpool (it joins the parent's threads),    */
/* as test uv_native_request did, whatever aiobridge does.                  */
static void test_fork_after_abandon(void **state) {
  (void)state;
  if (FORK_UNDER_SANITIZER) {
    print_message("skipped: a forked child cannot start threads under this "
                  "sanitizer runtime\n");
    skip();
  }
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1), 0);
  gate *g = block_loop(rt, 0);
  assert_rc(aiob_runtime_shutdown_timeout(rt, 10 * AIOB_MSEC, NULL),
            AIOB_ETIMEDOUT);
  aiob_runtime_free(rt);
  assert_int_equal(aiob_runtime_abandoned_threads(), 1);

  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    int bad = aiob_runtime_abandoned_threads() != 0;
    aiob_runtime *d;
    aiob_task *t = NULL;
    bad = bad || aiob_runtime_default(&d) != 0 ||
          aiob_spawn(d, &ready_vt, NULL, &t) != 0 ||
          aiob_task_wait(t, WAIT_TIMEOUT) != 0;
    aiob_task_release(t);
    bad = bad || aiob_runtime_default_shutdown_timeout(WAIT_TIMEOUT, NULL);
    _exit(bad ? 1 : 0);
  }
  int status = 0;
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  pid_t got;
  while ((got = waitpid(pid, &status, WNOHANG)) == 0 &&
         aiob_now_ns() < deadline)
    sleep_thread_ns(AIOB_MSEC);
  if (got == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    fail_msg("the forked child hangs");
  }
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);

  gate_finish(g);
  abandoned_reach_zero();
}

static int setup(void **state) {
  (void)state;
  reset_checks();
  return 0;
}

static int teardown(void **state) {
  (void)state;
  assert_clean();
  return 0;
}

#define T(name) cmocka_unit_test_setup_teardown(test_##name, setup, teardown)

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s <uv|event|uring> [test-name-filter]\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];
  setenv("AIOBRIDGE_BACKEND", g_backend, 1); /* the default runtime's too */

  aiob_runtime *probe = NULL;
  int rc = backend_probe_status("lifecycle", g_backend, runtime_new(&probe, 1));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);
  if (argc > 2)
    cmocka_set_test_filter(argv[2]);

  const struct CMUnitTest tests[] = {
      T(healthy),           T(errors),
      T(stuck_then_waits),  T(free_abandons),
      T(default_restart),   T(concurrent),
      T(uv_native_request), T(fork_after_abandon),
  };
  char group[64];
  snprintf(group, sizeof group, "lifecycle_%s", g_backend);
  return _cmocka_run_group_tests(group, tests, sizeof tests / sizeof tests[0],
                                 NULL, NULL);
}
