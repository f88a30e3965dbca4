/* aiobridge backend edge cases.
 *
 * One cmocka program, run once per compiled backend:
 *
 *   backend_edges <uv|event|uring> [test-name-filter]
 *
 * The conformance suite checks the contract every backend shares; this file
 * pushes each backend to the edges of its own mechanism: thousands of
 * deadlines behind one backend timer, wake storms from foreign threads (the
 * core must coalesce them), hundreds of fds turning ready at once (on
 * io_uring: a 4-entry submission queue and an overflowing 8-entry completion
 * queue), a watch changed and stopped while readiness races with it, a
 * kernel that refuses io_uring (seccomp), and the native handle.
 *
 * Tests: many_timers, wake_storm, fd_many_waiters, fd_modify_and_stop,
 * refused_kernel (uring only, skips elsewhere), native_handle. The filter
 * takes these names (cmocka globs: "fd_*").
 *
 * When the backend is refused at run time (AIOB_ENOSYS, AIOB_EPERM,
 * AIOB_ENOTSUP) the program prints "SKIP: <backend>: <reason>" and exits 77.
 *
 * The build defines AIOB_TEST_HAVE_UV / _EVENT / _URING for the compiled
 * backends and links their libraries, so native_handle can call them.
 *
 * Rules, as in tests/conformance.c: every wait is bounded (WAIT_TIMEOUT) and
 * nothing sleeps to synchronise; code on loop threads and helper threads
 * never calls cmocka asserts (they longjmp) but records failures with CHECK,
 * which the test thread reports; state shared with tasks lives on the heap
 * (leaked, never freed, when a test fails half-way). Sizes are kept so that
 * each test takes well under 20 s on a loaded 2-core VM under ASan or TSan.
 */
#include <aiobridge.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef AIOB_TEST_HAVE_UV
#include <uv.h>
#endif
#ifdef AIOB_TEST_HAVE_EVENT
#include <event2/event.h>
#endif
#ifdef AIOB_TEST_HAVE_URING
#include <aiobridge/uring.h>
#include <liburing.h>
#endif

#include <cmocka.h>

#include "harness.h"

/* ---- Backend under test ------------------------------------------------ */

static const char *g_backend; /* argv[1] */

static int backend_is(const char *name) { return strcmp(g_backend, name) == 0; }

/* ring_entries only matters to "uring"; 0 is the backend default. */
static int runtime_new_ex(aiob_runtime **out, unsigned threads,
                          unsigned ring_entries) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  cfg.threads = threads;
  cfg.backend_options.ring_entries = ring_entries;
  return aiob_runtime_new(out, &cfg);
}

static int runtime_new(aiob_runtime **out, unsigned threads) {
  return runtime_new_ex(out, threads, 0);
}

#include "blocks.h"

static double ms_of(uint64_t ns) { return (double)ns / (double)AIOB_MSEC; }

/* Deterministic pseudo-random numbers (xorshift32; seed must be non-zero). */
static uint32_t rng_next(uint32_t *x) {
  *x ^= *x << 13;
  *x ^= *x >> 17;
  *x ^= *x << 5;
  return *x;
}

/* Counters are relaxed and a drop runs before its task is counted as
 * finished: wait (bounded) until the runtime is idle, then read them. */
static void stats_idle(aiob_runtime *rt, aiob_runtime_stats *st) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  do {
    aiob_runtime_stats_get(rt, st);
    if (st->tasks_live == 0)
      return;
    sched_yield();
  } while (aiob_now_ns() < deadline);
}

/* Runs fn(arg, status) on loop `index` and waits for it (bounded). */
typedef struct on_loop {
  void (*fn)(void *arg);
  void *arg;
  aiob_runtime *rt;
  atomic_int status, loop;
  latch done;
} on_loop;

static void on_loop_cb(void *p, int status) {
  on_loop *c = p;
  atomic_store(&c->status, status);
  atomic_store(&c->loop, aiob_runtime_current_loop(c->rt));
  if (status == 0)
    c->fn(c->arg);
  latch_add(&c->done, 1);
}

static void run_on_loop(aiob_runtime *rt, unsigned index, void (*fn)(void *),
                        void *arg) {
  on_loop *c = xcalloc(1, sizeof *c);
  c->fn = fn;
  c->arg = arg;
  c->rt = rt;
  atomic_store(&c->status, 12345);
  atomic_store(&c->loop, -7);
  latch_init(&c->done);
  assert_rc(aiob_runtime_call(rt, index, on_loop_cb, c), 0);
  latch_ok(&c->done, 1);
  assert_rc(atomic_load(&c->status), 0);
  assert_int_equal(atomic_load(&c->loop), (int)index);
  latch_destroy(&c->done);
  free(c);
}

static void nop_on_loop(void *arg) { (void)arg; }

/* ======================================================================== */
/* many_timers: 20000 sleeps of 1..60 ms behind each loop's single backend
 * timer all fire, none early; then 5000 sleeps of 30 s are cancelled and
 * dropped at once, and the backend timer still serves a short sleep.        */

#define TM_N 20000
#define TM_MAX_MS 60
#define TM_LONG_N 5000
#define TM_LONG (30 * AIOB_SEC)
#define TM_LATE_MAX (5 * AIOB_SEC)

typedef struct tm_ctx {
  latch pending; /* first PENDING of each task */
  latch dropped;
} tm_ctx;

typedef struct tm_task {
  tbase b;
  tm_ctx *ctx;
  uint64_t dur;
  int inited;
  aiob_sleep s;
  _Atomic uint64_t deadline, done_at;
  atomic_int status;
} tm_task;

static aiob_poll tm_poll(aiob_task *t, void *p) {
  tm_task *k = p;
  int n = poll_enter(k);
  if (!k->inited) {
    k->inited = 1;
    /* Read before the sleep reads the clock: the sleep's own deadline is
     * at least this one. */
    atomic_store(&k->deadline, aiob_now_ns() + k->dur);
    aiob_sleep_init(&k->s, k->dur);
  }
  int st = 1;
  if (aiob_sleep_poll(t, &k->s, &st) == AIOB_PENDING) {
    if (n == 1)
      latch_add(&k->ctx->pending, 1);
    return AIOB_PENDING;
  }
  atomic_store(&k->done_at, aiob_now_ns());
  atomic_store(&k->status, st);
  return AIOB_READY;
}

static void tm_drop(void *p) {
  tm_task *k = p;
  tm_ctx *ctx = k->ctx;
  drop_count(p);
  latch_add(&ctx->dropped, 1);
}
static const aiob_task_vtable tm_vt = {.poll = tm_poll, .drop = tm_drop};

static tm_ctx *tm_ctx_new(void) {
  tm_ctx *c = xcalloc(1, sizeof *c);
  latch_init(&c->pending);
  latch_init(&c->dropped);
  return c;
}

static void tm_ctx_free(tm_ctx *c) {
  latch_destroy(&c->pending);
  latch_destroy(&c->dropped);
  free(c);
}

static void tm_init(tm_task *k, tm_ctx *ctx, uint64_t dur) {
  k->ctx = ctx;
  k->dur = dur;
  atomic_store(&k->status, 12345);
}

/* The sleep completed with status 0, not before its deadline, at most
 * TM_LATE_MAX after it. Returns its lateness. */
static uint64_t tm_check_done(tm_task *k, int i) {
  uint64_t deadline = atomic_load(&k->deadline);
  uint64_t done_at = atomic_load(&k->done_at);
  if (atomic_load(&k->status) != 0)
    fail_msg("sleep %d: status %s", i, errname(atomic_load(&k->status)));
  if (done_at < deadline)
    fail_msg("sleep %d of %.0f ms completed %.3f ms early", i, ms_of(k->dur),
             ms_of(deadline - done_at));
  if (done_at - deadline > TM_LATE_MAX)
    fail_msg("sleep %d of %.0f ms completed %.0f ms late", i, ms_of(k->dur),
             ms_of(done_at - deadline));
  /* Usually 2 polls, but 1 when the loop thread was preempted past the
   * deadline inside the first one: only the drop count is exact. */
  if (drops_of(k) != 1)
    fail_msg("sleep %d: %d polls, %d drops", i, polls_of(k), drops_of(k));
  return done_at - deadline;
}

static void test_many_timers(void **state) {
  aiob_runtime *rt = RT(state);

  /* Phase 1: detached short sleeps, spread over both loops. */
  tm_ctx *ctx = tm_ctx_new();
  tm_task *ks = xcalloc(TM_N, sizeof *ks);
  uint32_t seed = 0x2545F491u;
  for (int i = 0; i < TM_N; i++)
    tm_init(&ks[i], ctx,
            (1 + rng_next(&seed) % TM_MAX_MS) * (uint64_t)AIOB_MSEC);
  uint64_t t0 = aiob_now_ns();
  for (int i = 0; i < TM_N; i++)
    assert_rc(aiob_spawn(rt, &tm_vt, &ks[i], NULL), 0);
  if (latch_wait(&ctx->dropped, TM_N, WAIT_TIMEOUT) != 0)
    fail_msg("only %ld of %d sleeps finished", latch_get(&ctx->dropped), TM_N);
  uint64_t phase1_ns = aiob_now_ns() - t0;
  uint64_t late_max = 0, late_sum = 0;
  for (int i = 0; i < TM_N; i++) {
    uint64_t late = tm_check_done(&ks[i], i);
    late_sum += late;
    if (late > late_max)
      late_max = late;
  }
  aiob_runtime_stats st;
  stats_idle(rt, &st);
  assert_int_equal(st.tasks_live, 0);
  assert_int_equal(st.tasks_completed, TM_N);
  assert_int_equal(st.tasks_cancelled, 0);
  free(ks);
  tm_ctx_free(ctx);

  /* Phase 2: long sleeps, all armed, then cancelled from this thread. */
  ctx = tm_ctx_new();
  tm_task *ls = xcalloc(TM_LONG_N, sizeof *ls);
  aiob_task **hs = xcalloc(TM_LONG_N, sizeof *hs);
  for (int i = 0; i < TM_LONG_N; i++) {
    tm_init(&ls[i], ctx, TM_LONG);
    hs[i] = spawn_h(rt, &tm_vt, &ls[i]);
  }
  latch_ok(&ctx->pending, TM_LONG_N);
  uint64_t t1 = aiob_now_ns();
  for (int i = 0; i < TM_LONG_N; i++)
    aiob_task_cancel(hs[i]);
  if (latch_wait(&ctx->dropped, TM_LONG_N, WAIT_TIMEOUT) != 0)
    fail_msg("only %ld of %d cancelled sleeps dropped",
             latch_get(&ctx->dropped), TM_LONG_N);
  uint64_t cancel_ns = aiob_now_ns() - t1;
  for (int i = 0; i < TM_LONG_N; i++) {
    wait_ok(hs[i]);
    assert_status(hs[i], AIOB_ECANCELED);
    if (polls_of(&ls[i]) != 1 || drops_of(&ls[i]) != 1)
      fail_msg("cancelled sleep %d: %d polls, %d drops", i, polls_of(&ls[i]),
               drops_of(&ls[i]));
    aiob_task_release(hs[i]);
  }

  /* The heaps emptied under the backend timers (armed for ~30 s): a short
   * sleep on each loop still fires, on time. */
  tm_task *after = xcalloc(2, sizeof *after);
  aiob_task *ha[2];
  for (int i = 0; i < 2; i++) {
    tm_init(&after[i], ctx, 5 * AIOB_MSEC);
    ha[i] = spawn_on(rt, i, &tm_vt, &after[i]);
  }
  for (int i = 0; i < 2; i++) {
    wait_ok(ha[i]);
    tm_check_done(&after[i], i);
    aiob_task_release(ha[i]);
  }

  stats_idle(rt, &st);
  assert_int_equal(st.tasks_live, 0);
  assert_int_equal(st.tasks_completed, TM_N + 2);
  assert_int_equal(st.tasks_cancelled, TM_LONG_N);
  print_message("many_timers[%s]: %d sleeps in %.0f ms, lateness max %.1f ms "
                "mean %.2f ms; %d cancelled in %.1f ms\n",
                g_backend, TM_N, ms_of(phase1_ns), ms_of(late_max),
                ms_of(late_sum / TM_N), TM_LONG_N, ms_of(cancel_ns));
  free(after);
  free(hs);
  free(ls);
  tm_ctx_free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* wake_storm: 4 foreign threads wake 64 pending tasks 200000 times. Wakes
 * while a task is queued coalesce into one poll, and the core calls the
 * backend's wake far less often than aiob_waker_wake is called; with both
 * loops busy, 64 wakes cost each loop a single backend wake.                */

#define WS_TASKS 64
#define WS_THREADS 4
#define WS_WAKES 50000

typedef struct ws_ctx {
  atomic_int stop;
  latch handed, go;
} ws_ctx;

typedef struct ws_task {
  tbase b;
  ws_ctx *ctx;
  _Atomic(aiob_waker *) w;
} ws_task;

static aiob_poll ws_poll(aiob_task *t, void *p) {
  ws_task *k = p;
  if (poll_enter(k) == 1) {
    aiob_waker *w = aiob_task_waker(t);
    CHECK(w != NULL);
    atomic_store(&k->w, w);
    latch_add(&k->ctx->handed, 1);
    return AIOB_PENDING;
  }
  if (!atomic_load(&k->ctx->stop))
    return AIOB_PENDING;
  aiob_waker_release(atomic_exchange(&k->w, NULL));
  return AIOB_READY;
}

static void ws_drop(void *p) {
  ws_task *k = p;
  aiob_waker_release(atomic_exchange(&k->w, NULL));
  drop_count(p);
}
static const aiob_task_vtable ws_vt = {.poll = ws_poll, .drop = ws_drop};

typedef struct ws_arg {
  ws_ctx *ctx;
  uint32_t seed;
  aiob_waker *w[WS_TASKS]; /* this thread's own clones */
} ws_arg;

static void *ws_thread(void *p) {
  ws_arg *a = p;
  CHECK(latch_wait(&a->ctx->go, 1, WAIT_TIMEOUT) == 0);
  uint32_t x = a->seed;
  for (int i = 0; i < WS_WAKES; i++)
    aiob_waker_wake(a->w[rng_next(&x) % WS_TASKS]);
  for (int j = 0; j < WS_TASKS; j++) {
    aiob_waker_release(a->w[j]);
    a->w[j] = NULL;
  }
  return NULL;
}

static void test_wake_storm(void **state) {
  aiob_runtime *rt = RT(state);
  ws_ctx *ctx = xcalloc(1, sizeof *ctx);
  latch_init(&ctx->handed);
  latch_init(&ctx->go);
  ws_task *ks = xcalloc(WS_TASKS, sizeof *ks);
  aiob_task *hs[WS_TASKS];
  for (int j = 0; j < WS_TASKS; j++) {
    ks[j].ctx = ctx;
    hs[j] = spawn_h(rt, &ws_vt, &ks[j]);
  }
  latch_ok(&ctx->handed, WS_TASKS);

  aiob_waker *mine[WS_TASKS];
  ws_arg *args = xcalloc(WS_THREADS, sizeof *args);
  for (int j = 0; j < WS_TASKS; j++) {
    aiob_waker *w = atomic_load(&ks[j].w);
    assert_non_null(w);
    mine[j] = aiob_waker_clone(w);
    for (int i = 0; i < WS_THREADS; i++)
      args[i].w[j] = aiob_waker_clone(w);
  }
  pthread_t th[WS_THREADS];
  for (int i = 0; i < WS_THREADS; i++) {
    args[i].ctx = ctx;
    args[i].seed = 0x9E3779B9u * (uint32_t)(i + 1);
    th[i] = start_thread(ws_thread, &args[i]);
  }
  latch_add(&ctx->go, 1);
  for (int i = 0; i < WS_THREADS; i++)
    pthread_join(th[i], NULL);
  assert_clean();

  /* The core's own coalescing of backend wakes, deterministically: once
   * every task is idle (a call queued behind them on each loop has run),
   * both loops are held in gates and every task is woken: 64 remote pushes,
   * but each held loop's backend is woken once. */
  aiob_runtime_stats st;
  gate *g[2];
  aiob_task *hg[2];
  for (int i = 0; i < 2; i++)
    run_on_loop(rt, (unsigned)i, nop_on_loop, NULL);
  for (int i = 0; i < 2; i++)
    g[i] = gate_close(rt, i, NULL, NULL, &hg[i]);
  aiob_runtime_stats_get(rt, &st);
  uint64_t before = st.loop_wakes;
  for (int j = 0; j < WS_TASKS; j++)
    aiob_waker_wake(mine[j]);
  aiob_runtime_stats_get(rt, &st);
  uint64_t held = st.loop_wakes - before;
  for (int i = 0; i < 2; i++) {
    gate_open(g[i]);
    gate_finish(g[i], hg[i]);
  }
  if (held > 2)
    fail_msg("%llu backend wakes for %d wakes while both loops were busy",
             (unsigned long long)held, WS_TASKS);

  atomic_store(&ctx->stop, 1);
  for (int j = 0; j < WS_TASKS; j++)
    aiob_waker_wake(mine[j]);
  long polls = 0;
  for (int j = 0; j < WS_TASKS; j++) {
    wait_ok(hs[j]);
    assert_status(hs[j], 0);
    assert_int_equal(drops_of(&ks[j]), 1);
    assert_null(atomic_load(&ks[j].w));
    polls += polls_of(&ks[j]);
  }
  const long wakes = (long)WS_THREADS * WS_WAKES + 2 * WS_TASKS;
  if (polls > wakes + 2 * WS_TASKS)
    fail_msg("%ld polls for %ld wakes: wakes while queued were not coalesced",
             polls, wakes);

  stats_idle(rt, &st);
  assert_int_equal(st.tasks_live, 0);
  assert_int_equal(st.tasks_completed, WS_TASKS + 4); /* + calls, gates */
  assert_true(st.polls >= (uint64_t)polls);
  if (st.loop_wakes >= (uint64_t)wakes)
    fail_msg("%llu backend wakes for %ld task wakes: not coalesced",
             (unsigned long long)st.loop_wakes, wakes);
  print_message("wake_storm[%s]: %ld wakes -> %ld polls, %llu backend wakes\n",
                g_backend, wakes, polls, (unsigned long long)st.loop_wakes);

  /* Waking finished tasks does nothing; the last references go. */
  for (int j = 0; j < WS_TASKS; j++) {
    aiob_waker_wake(mine[j]);
    aiob_waker_release(mine[j]);
    aiob_task_release(hs[j]);
  }
  latch_destroy(&ctx->handed);
  latch_destroy(&ctx->go);
  free(args);
  free(ks);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* fd_many_waiters: 200 pipes turn readable at once while the only loop is
 * held in a gate, twice on the same fds; then the fds are closed and their
 * numbers reused by new pipes. On uring the ring has 4 submission entries:
 * arming 200 polls takes the submit-and-retry path, and 200 completions
 * overflow the 8-entry completion queue. */

#define FW_N 200
#define FW_ROUNDS 2
#define FW_REUSE 8
#define FW_RING_ENTRIES 4

typedef struct fw_ctx {
  aiob_runtime *rt;
  latch pending; /* once per task and round, at the round's first PENDING */
  latch done;    /* once per task and round */
  /* uring: seen on the loop thread when a gate opened. */
  atomic_int overflow_seen, cq_ready_max;
  atomic_uint sq_entries, cq_entries, cq_dropped;
} fw_ctx;

typedef struct fw_task {
  tbase b;
  fw_ctx *ctx;
  int fd;
  int rounds;
  /* Loop thread only. */
  int round, armed, signalled;
  aiob_io_wait w;
  atomic_int result[FW_ROUNDS];
  atomic_int read_rc[FW_ROUNDS];
} fw_task;

static aiob_poll fw_poll(aiob_task *t, void *p) {
  fw_task *k = p;
  poll_enter(k);
  while (k->round < k->rounds) {
    if (!k->armed) {
      aiob_io_wait_init(&k->w, k->fd, AIOB_READABLE);
      k->armed = 1;
      k->signalled = 0;
    }
    int res = 0;
    if (aiob_io_wait_poll(t, &k->w, &res) == AIOB_PENDING) {
      if (!k->signalled) {
        k->signalled = 1;
        latch_add(&k->ctx->pending, 1);
      }
      return AIOB_PENDING;
    }
    atomic_store(&k->result[k->round], res);
    char c;
    atomic_store(&k->read_rc[k->round], (int)read(k->fd, &c, 1));
    k->armed = 0;
    k->round++;
    latch_add(&k->ctx->done, 1);
  }
  return AIOB_READY;
}
static const aiob_task_vtable fw_vt = {.poll = fw_poll, .drop = drop_count};

static fw_task *fw_tasks_new(fw_ctx *ctx, int n, int (*pipes)[2], int rounds) {
  fw_task *ks = xcalloc((size_t)n, sizeof *ks);
  for (int i = 0; i < n; i++) {
    ks[i].ctx = ctx;
    ks[i].fd = pipes[i][0];
    ks[i].rounds = rounds;
    for (int r = 0; r < FW_ROUNDS; r++) {
      atomic_store(&ks[i].result[r], 12345);
      atomic_store(&ks[i].read_rc[r], 12345);
    }
  }
  return ks;
}

/* Loop thread, inside the gate: what the ring looks like after every pipe
 * turned ready behind the loop's back. */
static void fw_probe_ring(void *arg) {
  fw_ctx *ctx = arg;
#ifdef AIOB_TEST_HAVE_URING
  if (!backend_is("uring"))
    return;
  struct io_uring *ring = aiob_runtime_native(ctx->rt, 0);
  CHECK(ring != NULL);
  if (!ring)
    return;
  if (io_uring_cq_has_overflow(ring))
    atomic_store(&ctx->overflow_seen, 1);
  int ready = (int)io_uring_cq_ready(ring);
  if (ready > atomic_load(&ctx->cq_ready_max))
    atomic_store(&ctx->cq_ready_max, ready);
#else
  (void)ctx;
#endif
}

/* Loop thread: ring geometry and the kernel's count of dropped CQEs. */
__attribute__((unused)) static void fw_ring_info(void *arg) {
  fw_ctx *ctx = arg;
#ifdef AIOB_TEST_HAVE_URING
  if (!backend_is("uring"))
    return;
  struct io_uring *ring = aiob_runtime_native(ctx->rt, 0);
  CHECK(ring != NULL);
  if (!ring)
    return;
  atomic_store(&ctx->sq_entries, ring->sq.ring_entries);
  atomic_store(&ctx->cq_entries, ring->cq.ring_entries);
  atomic_store(&ctx->cq_dropped,
               __atomic_load_n(ring->cq.koverflow, __ATOMIC_ACQUIRE));
#else
  (void)ctx;
#endif
}

/* One round: every task armed, all pipes written while the loop is held,
 * then every task sees exactly AIOB_READABLE. */
static void fw_round(aiob_runtime *rt, fw_ctx *ctx, fw_task *ks, int n,
                     int (*pipes)[2], int round, long *waits) {
  *waits += n;
  latch_ok(&ctx->pending, *waits);
  aiob_task *hg;
  gate *g = gate_close(rt, 0, fw_probe_ring, ctx, &hg);
  for (int i = 0; i < n; i++)
    assert_int_equal(write(pipes[i][1], "x", 1), 1);
  gate_open(g);
  gate_finish(g, hg);
  latch_ok(&ctx->done, *waits);
  for (int i = 0; i < n; i++) {
    int res = atomic_load(&ks[i].result[round]);
    if (res != AIOB_READABLE)
      fail_msg("round %d, pipe %d (fd %d): wait result %d (%s), want "
               "AIOB_READABLE",
               round, i, ks[i].fd, res, res < 0 ? errname(res) : "bits");
    assert_int_equal(atomic_load(&ks[i].read_rc[round]), 1);
  }
}

/* Makes room for `need` open fds (raising the soft limit), or skips. */
static void fd_limit_at_least(rlim_t need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need)
    return;
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
    print_message("fd limit (RLIMIT_NOFILE) %llu < %llu\n",
                  (unsigned long long)rl.rlim_max, (unsigned long long)need);
    skip();
  }
  rl.rlim_cur = need;
  assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
}

static int (*fw_pipes_new(int n))[2] {
  int(*p)[2] = xcalloc((size_t)n, sizeof *p);
  for (int i = 0; i < n; i++)
    assert_int_equal(pipe_nb(p[i]), 0);
  return p;
}

static void fw_pipes_close(int (*p)[2], int n) {
  for (int i = 0; i < n; i++) {
    assert_int_equal(close(p[i][0]), 0);
    assert_int_equal(close(p[i][1]), 0);
  }
  free(p);
}

static void test_fd_many_waiters(void **state) {
  (void)state;
  const int uring = backend_is("uring");
  fd_limit_at_least(2 * FW_N + 64);
  aiob_runtime *rt = NULL;
  assert_rc(runtime_new_ex(&rt, 1, uring ? FW_RING_ENTRIES : 0), 0);
  fw_ctx *ctx = xcalloc(1, sizeof *ctx);
  ctx->rt = rt;
  latch_init(&ctx->pending);
  latch_init(&ctx->done);
#ifdef AIOB_TEST_HAVE_URING
  if (uring) {
    run_on_loop(rt, 0, fw_ring_info, ctx);
    assert_int_equal(atomic_load(&ctx->sq_entries), FW_RING_ENTRIES);
    assert_int_equal(atomic_load(&ctx->cq_entries), 2 * FW_RING_ENTRIES);
  }
#endif

  int(*pipes)[2] = fw_pipes_new(FW_N);
  fw_task *ks = fw_tasks_new(ctx, FW_N, pipes, FW_ROUNDS);
  aiob_task **hs = xcalloc(FW_N, sizeof *hs);
  for (int i = 0; i < FW_N; i++)
    hs[i] = spawn_h(rt, &fw_vt, &ks[i]);
  long waits = 0;
  for (int r = 0; r < FW_ROUNDS; r++)
    fw_round(rt, ctx, ks, FW_N, pipes, r, &waits);
  for (int i = 0; i < FW_N; i++) {
    wait_ok(hs[i]);
    assert_status(hs[i], 0);
    assert_int_equal(drops_of(&ks[i]), 1);
    aiob_task_release(hs[i]);
  }
#ifdef AIOB_TEST_HAVE_URING
  if (uring) {
    run_on_loop(rt, 0, fw_ring_info, ctx);
    assert_int_equal(atomic_load(&ctx->cq_dropped), 0);
    /* Informative only: when the kernel posts the completions is its
     * business, so the overflow is observed rather than required. */
    print_message("fd_many_waiters[uring]: %s; at most %d CQEs ready in the "
                  "%u-entry completion queue\n",
                  atomic_load(&ctx->overflow_seen)
                      ? "completion-queue overflow seen"
                      : "note: no completion-queue overflow seen",
                  atomic_load(&ctx->cq_ready_max),
                  atomic_load(&ctx->cq_entries));
  }
#endif

  /* Closing is clean, and new pipes, which take the lowest free fd numbers
   * (those just closed), work at once. */
  fw_pipes_close(pipes, FW_N);
  pipes = fw_pipes_new(FW_REUSE);
  fw_task *rk = fw_tasks_new(ctx, FW_REUSE, pipes, 1);
  aiob_task *rh[FW_REUSE];
  for (int i = 0; i < FW_REUSE; i++)
    rh[i] = spawn_h(rt, &fw_vt, &rk[i]);
  fw_round(rt, ctx, rk, FW_REUSE, pipes, 0, &waits);
  for (int i = 0; i < FW_REUSE; i++) {
    wait_ok(rh[i]);
    assert_status(rh[i], 0);
    aiob_task_release(rh[i]);
  }
  fw_pipes_close(pipes, FW_REUSE);

  aiob_runtime_free(rt);
  latch_destroy(&ctx->pending);
  latch_destroy(&ctx->done);
  free(rk);
  free(hs);
  free(ks);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* fd_modify_and_stop: one socket, a reader and a writer. The writer's
 * readiness makes the core shrink the watch from R|W to R; the reader is
 * then cancelled (the watch stops) and data arrives: nothing reaches the
 * dropped task and a new reader works. Then readiness and cancellation race
 * behind a gate: the task still ends cancelled.                             */

static uint64_t cpu_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * AIOB_SEC + (uint64_t)ts.tv_nsec;
}

/* The process burns little CPU while loop `loop` waits out a 200 ms sleep:
 * a backend that keeps reporting readiness nobody wants would spin. An idle
 * loop's CPU time is a small constant (a spawn, a wake, a spin or two of at
 * most AIOB_SPIN_US_DEFAULT) that preemption does not grow: a quarter of
 * the window leaves ample room for a 10x slower machine, and a spinning
 * loop thread exceeds it unless it got less than a quarter of a CPU. */
#define IDLE_WINDOW (200 * AIOB_MSEC)

static void assert_loop_idle(aiob_runtime *rt, int loop, const char *what) {
  tm_ctx *ctx = tm_ctx_new();
  tm_task *k = xcalloc(1, sizeof *k);
  tm_init(k, ctx, IDLE_WINDOW);
  uint64_t cpu0 = cpu_now_ns(), t0 = aiob_now_ns();
  aiob_task *h = spawn_on(rt, loop, &tm_vt, k);
  wait_ok(h);
  uint64_t cpu = cpu_now_ns() - cpu0, wall = aiob_now_ns() - t0;
  assert_status(h, 0);
  aiob_task_release(h);
  if (cpu > wall / 4)
    fail_msg("loop %d spins %s: %.1f ms CPU in %.1f ms", loop, what, ms_of(cpu),
             ms_of(wall));
  free(k);
  tm_ctx_free(ctx);
}

static void test_fd_modify_and_stop(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);
  io_task *k = xcalloc(6, sizeof *k);
  int sp[2], probe[2];
  assert_int_equal(
      socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp),
      0);
  assert_int_equal(pipe_nb(probe), 0);

  /* T1 reads, T2 writes: R, then R|W, then back to R. */
  io_task_init(&k[0], sp[0], AIOB_READABLE, pending);
  aiob_task *h1 = spawn_h(rt, &io_vt, &k[0]);
  latch_ok(pending, 1);
  io_task_init(&k[1], sp[0], AIOB_WRITABLE, NULL);
  aiob_task *h2 = spawn_h(rt, &io_vt, &k[1]);
  wait_ok(h2);
  assert_status(h2, 0);
  assert_int_equal(atomic_load(&k[1].result), AIOB_WRITABLE);
  assert_false(aiob_task_is_finished(h1));
  /* A watch left at R|W on an idle socket would report writability over
   * and over: the loop would spin. */
  assert_loop_idle(rt, 0, "after the watch shrank to R");

  /* Cancel T1: the watch stops. Data after that reaches nobody; the probe
   * pipe (task P), written last, proves the loop dispatched what was
   * ready. */
  aiob_task_cancel(h1);
  wait_ok(h1);
  assert_status(h1, AIOB_ECANCELED);
  assert_int_equal(atomic_load(&k[0].result), 12345);
  io_task_init(&k[2], probe[0], AIOB_READABLE, pending);
  aiob_task *hp = spawn_h(rt, &io_vt, &k[2]);
  latch_ok(pending, 2);
  assert_int_equal(write(sp[1], "a", 1), 1);
  assert_int_equal(write(probe[1], "p", 1), 1);
  wait_ok(hp);
  assert_int_equal(atomic_load(&k[2].result), AIOB_READABLE);
  assert_int_equal(polls_of(&k[0]), 1);
  assert_int_equal(drops_of(&k[0]), 1);
  /* The byte stays unread: a watch that did not stop would spin. */
  assert_loop_idle(rt, 0, "with the watch stopped and data unread");

  /* T3: a new reader sees the byte. */
  io_task_init(&k[3], sp[0], AIOB_READABLE, NULL);
  aiob_task *h3 = spawn_h(rt, &io_vt, &k[3]);
  wait_ok(h3);
  assert_int_equal(atomic_load(&k[3].result), AIOB_READABLE);
  char buf[4];
  assert_int_equal(read(sp[0], buf, sizeof buf), 1);

  /* T4: readiness reaches the backend and the cancel is queued while the
   * loop is held; the loop dispatches the readiness first, then the cancel:
   * T4 still ends cancelled, polled once. */
  io_task_init(&k[4], sp[0], AIOB_READABLE, pending);
  aiob_task *h4 = spawn_h(rt, &io_vt, &k[4]);
  latch_ok(pending, 3);
  aiob_task *hg;
  gate *g = gate_close(rt, 0, NULL, NULL, &hg);
  assert_int_equal(write(sp[1], "b", 1), 1);
  aiob_task_cancel(h4);
  gate_open(g);
  gate_finish(g, hg);
  wait_ok(h4);
  assert_status(h4, AIOB_ECANCELED);
  assert_int_equal(polls_of(&k[4]), 1);
  /* ... and the byte is still there for T5. */
  io_task_init(&k[5], sp[0], AIOB_READABLE, NULL);
  aiob_task *h5 = spawn_h(rt, &io_vt, &k[5]);
  wait_ok(h5);
  assert_int_equal(atomic_load(&k[5].result), AIOB_READABLE);
  assert_int_equal(read(sp[0], buf, sizeof buf), 1);

  aiob_task *hs[] = {h1, h2, hp, h3, h4, h5};
  for (int i = 0; i < 6; i++) {
    assert_int_equal(drops_of(&k[i]), 1);
    aiob_task_release(hs[i]);
  }
  close(sp[0]);
  close(sp[1]);
  close(probe[0]);
  close(probe[1]);
  latch_destroy(pending);
  free(pending);
  free(k);
  assert_clean();
}

/* ======================================================================== */
/* refused_kernel (uring): in a child process whose seccomp filter refuses
 * io_uring_setup, a uring runtime fails with that errno, and another
 * backend still works there.                                                */

#if defined(__x86_64__)
#define SECCOMP_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SECCOMP_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

/* Child exit codes. */
enum {
  RK_OK = 0,
  RK_NO_SECCOMP = 77, /* the filter could not be installed: skip */
  RK_WRONG_ERROR = 10,
  RK_NOT_REFUSED,
  RK_NO_MESSAGE,
  RK_OTHER_BACKEND_NEW,
  RK_OTHER_BACKEND_TASK,
};

static const char *rk_reason(int code) {
  switch (code) {
  case RK_WRONG_ERROR:
    return "aiob_runtime_new(uring) returned the wrong error";
  case RK_NOT_REFUSED:
    return "aiob_runtime_new(uring) succeeded under the filter";
  case RK_NO_MESSAGE:
    return "aiob_strerror gave no message";
  case RK_OTHER_BACKEND_NEW:
    return "the other backend's runtime could not be created";
  case RK_OTHER_BACKEND_TASK:
    return "a sleep on the other backend did not complete";
  default:
    return "unexpected exit code";
  }
}

#ifdef SECCOMP_AUDIT_ARCH
/* Installs a filter that fails io_uring_setup with errno `err`. */
static int refuse_io_uring_setup(int err) {
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SECCOMP_AUDIT_ARCH, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K,
               SECCOMP_RET_ERRNO | ((unsigned)err & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {
      .len = (unsigned short)(sizeof filter / sizeof filter[0]),
      .filter = filter,
  };
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
    return -errno;
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
    return -errno;
  return 0;
}

/* The child: never returns into cmocka; the exit code is the verdict. */
static int refused_child(int err, int want) {
  int rc = refuse_io_uring_setup(err);
  if (rc < 0) {
    fprintf(stderr, "refused_kernel child: seccomp: %s\n", strerror(-rc));
    return RK_NO_SECCOMP;
  }
  aiob_runtime *rt = NULL;
  rc = runtime_new(&rt, 2);
  if (rc == 0) {
    aiob_runtime_free(rt);
    return RK_NOT_REFUSED;
  }
  if (rc != want) {
    fprintf(stderr, "refused_kernel child: got %d (%s), want %s\n", rc,
            errname(rc), errname(want));
    return RK_WRONG_ERROR;
  }
  const char *msg = aiob_strerror(rc);
  if (!msg || !msg[0])
    return RK_NO_MESSAGE;

  /* Another backend in the same process is unaffected. */
  const char *other = aiob_backend_find("uv")      ? "uv"
                      : aiob_backend_find("event") ? "event"
                                                   : NULL;
  if (!other)
    return RK_OK;
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = other;
  if (aiob_runtime_new(&rt, &cfg) != 0)
    return RK_OTHER_BACKEND_NEW;
  tm_ctx *ctx = calloc(1, sizeof *ctx); /* no xcalloc: no cmocka here */
  tm_task *k = calloc(1, sizeof *k);
  if (!ctx || !k)
    return RK_OTHER_BACKEND_TASK;
  latch_init(&ctx->pending);
  latch_init(&ctx->dropped);
  tm_init(k, ctx, 1 * AIOB_MSEC);
  aiob_task *h = NULL;
  aiob_output out = {0};
  int ok = aiob_spawn(rt, &tm_vt, k, &h) == 0 &&
           aiob_task_wait(h, WAIT_TIMEOUT) == 0 &&
           aiob_task_take_output(h, &out) == 0 && out.status == 0 &&
           atomic_load(&k->status) == 0 &&
           atomic_load(&k->done_at) >= atomic_load(&k->deadline);
  aiob_task_release(h);
  aiob_runtime_free(rt);
  if (!ok)
    return RK_OTHER_BACKEND_TASK;
  free(k);
  tm_ctx_free(ctx);
  printf("refused_kernel: io_uring_setup failing with %s: "
         "aiob_runtime_new(uring) = %s (\"%s\"); %s still works\n",
         errname(-err), errname(rc), msg, other);
  fflush(stdout);
  return RK_OK;
}
#endif

/* Waits for the child, bounded; kills it on timeout. */
static int wait_child(pid_t pid, uint64_t timeout_ns, int *status) {
  uint64_t deadline = aiob_now_ns() + timeout_ns;
  for (;;) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid)
      return 0;
    if (r < 0 && errno != EINTR)
      return -errno;
    if (aiob_now_ns() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, status, 0);
      return AIOB_ETIMEDOUT;
    }
    struct timespec tick = {.tv_sec = 0, .tv_nsec = 1000000};
    nanosleep(&tick, NULL);
  }
}

static void test_refused_kernel(void **state) {
  (void)state;
  if (!backend_is("uring")) {
    print_message("refused_kernel: io_uring only (backend is %s)\n", g_backend);
    skip();
  }
#ifndef SECCOMP_AUDIT_ARCH
  print_message("refused_kernel: no seccomp arch value for this CPU\n");
  skip();
#else
  const struct {
    int err, want;
  } cases[] = {{ENOSYS, AIOB_ENOSYS}, {EPERM, AIOB_EPERM}};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
      _exit(refused_child(cases[i].err, cases[i].want));
    int status = 0;
    int rc = wait_child(pid, WAIT_TIMEOUT, &status);
    if (rc != 0)
      fail_msg("child refusing with %s: wait: %s", errname(cases[i].want),
               errname(rc));
    if (WIFEXITED(status) && WEXITSTATUS(status) == RK_NO_SECCOMP) {
      print_message("refused_kernel: cannot install a seccomp filter here\n");
      skip();
    }
    if (!WIFEXITED(status))
      fail_msg("child refusing with %s: killed by signal %d",
               errname(cases[i].want), WTERMSIG(status));
    if (WEXITSTATUS(status) != RK_OK)
      fail_msg("child refusing with %s: %s (exit %d)", errname(cases[i].want),
               rk_reason(WEXITSTATUS(status)), WEXITSTATUS(status));
  }
  assert_clean();
#endif
}

/* ======================================================================== */
/* native_handle: the handle aiob_runtime_native gives is the backend's own
 * loop, usable with the native library on its loop thread, and driven by
 * the runtime (a native timer fires). A uv handle an extension leaves open
 * does not stop the runtime from shutting down.                             */

typedef struct nh_ctx {
  aiob_runtime *rt;
  unsigned index;
  void *native; /* what aiob_runtime_native gave the test thread */
  latch fired;  /* native timer callbacks */
  atomic_int checked;
  _Atomic(const char *) method; /* event: the base's method */
#ifdef AIOB_TEST_HAVE_UV
  uv_timer_t uv_timer; /* left running: the runtime must close it */
#endif
} nh_ctx;

#ifdef AIOB_TEST_HAVE_UV
static void nh_uv_timer_cb(uv_timer_t *t) {
  nh_ctx *c = t->data;
  latch_add(&c->fired, 1);
}

static void nh_check_uv(nh_ctx *c, void *native) {
  uv_loop_t *loop = native;
  CHECK(uv_now(loop) > 0);
  CHECK(uv_loop_alive(loop) != 0);
  if (c->index != 0)
    return;
  CHECK_INT(uv_timer_init(loop, &c->uv_timer), ==, 0);
  c->uv_timer.data = c;
  CHECK_INT(uv_timer_start(&c->uv_timer, nh_uv_timer_cb, 1, 1), ==, 0);
  atomic_fetch_add(&c->checked, 1);
}
#endif

#ifdef AIOB_TEST_HAVE_EVENT
static void nh_event_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  nh_ctx *c = arg;
  CHECK(what & EV_TIMEOUT);
  latch_add(&c->fired, 1);
}

static void nh_check_event(nh_ctx *c, void *native) {
  struct event_base *base = native;
  const char *method = event_base_get_method(base);
  CHECK(method != NULL);
  atomic_store(&c->method, method);
  if (c->index != 0)
    return;
  struct timeval tv = {.tv_sec = 0, .tv_usec = 1000};
  CHECK_INT(event_base_once(base, -1, EV_TIMEOUT, nh_event_cb, c, &tv), ==, 0);
  atomic_fetch_add(&c->checked, 1);
}
#endif

#ifdef AIOB_TEST_HAVE_URING
static void nh_check_uring(nh_ctx *c, void *native) {
  struct io_uring *ring = native;
  CHECK(ring->ring_fd >= 0);
  CHECK(ring->features & IORING_FEAT_NODROP);
  CHECK(ring->sq.ring_entries > 0);
  if (c->index == 0) {
    latch_add(&c->fired, 1); /* no native timer: the backend owns the CQ */
    atomic_fetch_add(&c->checked, 1);
  }
}
#endif

/* Loop thread (aiob_runtime_call). */
static void nh_on_loop(void *arg) {
  nh_ctx *c = arg;
  void *native = aiob_runtime_native(c->rt, c->index);
  CHECK(native != NULL);
  CHECK(native == c->native);
  if (!native)
    return;
  int known = 0;
#ifdef AIOB_TEST_HAVE_UV
  if (backend_is("uv")) {
    known = 1;
    nh_check_uv(c, native);
  }
#endif
#ifdef AIOB_TEST_HAVE_EVENT
  if (backend_is("event")) {
    known = 1;
    nh_check_event(c, native);
  }
#endif
#ifdef AIOB_TEST_HAVE_URING
  if (backend_is("uring")) {
    known = 1;
    nh_check_uring(c, native);
  }
#endif
  if (!known)
    check_failed(__FILE__, __LINE__, "no native check compiled for %s",
                 g_backend);
}

typedef struct nh_shutdown {
  aiob_runtime *rt;
  latch done;
} nh_shutdown;

static void *nh_shutdown_thread(void *p) {
  nh_shutdown *s = p;
  CHECK_INT(aiob_runtime_shutdown(s->rt), ==, 0);
  latch_add(&s->done, 1);
  return NULL;
}

static void test_native_handle(void **state) {
  (void)state;
  aiob_runtime *rt = NULL;
  assert_rc(runtime_new(&rt, 2), 0);
  void *n0 = aiob_runtime_native(rt, 0), *n1 = aiob_runtime_native(rt, 1);
  assert_non_null(n0);
  assert_non_null(n1);
  assert_ptr_not_equal(n0, n1);
  assert_null(aiob_runtime_native(rt, 2));

  nh_ctx *c = xcalloc(2, sizeof *c);
  for (unsigned i = 0; i < 2; i++) {
    c[i].rt = rt;
    c[i].index = i;
    c[i].native = i ? n1 : n0;
    latch_init(&c[i].fired);
    run_on_loop(rt, i, nh_on_loop, &c[i]);
  }
  assert_clean();
  assert_int_equal(atomic_load(&c[0].checked), 1);
  /* The runtime's loop drives the native one. */
  latch_ok(&c[0].fired, 1);
  if (backend_is("event"))
    print_message("native_handle[event]: method %s\n",
                  atomic_load(&c[0].method));

  /* Shutdown completes (bounded) although a native uv timer is still
   * running on loop 0; the native handles are gone afterwards. */
  nh_shutdown *s = xcalloc(1, sizeof *s);
  s->rt = rt;
  latch_init(&s->done);
  pthread_t th = start_thread(nh_shutdown_thread, s);
  if (latch_wait(&s->done, 1, WAIT_TIMEOUT) != 0)
    fail_msg("aiob_runtime_shutdown hangs with a native handle left open");
  pthread_join(th, NULL);
  assert_null(aiob_runtime_native(rt, 0));
  assert_null(aiob_runtime_native(rt, 1));
  aiob_runtime_free(rt);
  latch_destroy(&s->done);
  free(s);
  for (unsigned i = 0; i < 2; i++)
    latch_destroy(&c[i].fired);
  free(c); /* after the loops closed: holds the uv timer */
  assert_clean();
}

/* ======================================================================== */
/* uring_ops (uring only): an extension's own requests on a loop's ring
 * (aiobridge/uring.h). A NOP and a pipe read complete through their op; a
 * cancelled read completes once with -ECANCELED; a read still in flight
 * when the runtime shuts down completes once, during the shutdown; bad
 * arguments are refused.                                                    */

#ifdef AIOB_TEST_HAVE_URING
typedef struct uo_op {
  aiob_uring_op op;
  atomic_int calls, res;
  latch done;
  char buf[16];
} uo_op;

typedef struct uo_ctx {
  aiob_runtime *rt;
  int pipes[3][2]; /* read, cancelled read, read left at shutdown */
  uo_op nop, read, cancelled, orphan;
  atomic_int cancel_rc, cancel_again_rc, null_sqe;
} uo_ctx;

static void uo_complete(aiob_uring_op *op, int res, unsigned flags) {
  uo_op *o = (uo_op *)op;
  CHECK(!(flags & IORING_CQE_F_MORE));
  atomic_store(&o->res, res);
  atomic_fetch_add(&o->calls, 1);
  latch_add(&o->done, 1);
}

static struct io_uring *uo_ring(uo_ctx *c) {
  return aiob_runtime_native(c->rt, (unsigned)aiob_runtime_current_loop(c->rt));
}

static void uo_read(struct io_uring *ring, uo_op *o, int fd) {
  struct io_uring_sqe *sqe = aiob_uring_get_sqe(ring);
  CHECK(sqe != NULL);
  if (!sqe)
    return;
  io_uring_prep_read(sqe, fd, o->buf, sizeof o->buf, 0);
  aiob_uring_sqe_set_op(ring, sqe, &o->op);
}

/* Loop thread: starts the NOP and the three reads, cancels one. */
static void uo_start(void *arg) {
  uo_ctx *c = arg;
  struct io_uring *ring = uo_ring(c);
  atomic_store(&c->null_sqe, aiob_uring_get_sqe(NULL) == NULL);
  struct io_uring_sqe *sqe = aiob_uring_get_sqe(ring);
  CHECK(sqe != NULL);
  if (!sqe)
    return;
  io_uring_prep_nop(sqe);
  aiob_uring_sqe_set_op(ring, sqe, &c->nop.op);
  uo_read(ring, &c->read, c->pipes[0][0]);
  uo_read(ring, &c->cancelled, c->pipes[1][0]);
  uo_read(ring, &c->orphan, c->pipes[2][0]);
  atomic_store(&c->cancel_rc, aiob_uring_cancel(ring, &c->cancelled.op));
}

/* Loop thread: a finished op is not in flight any more. */
static void uo_cancel_again(void *arg) {
  uo_ctx *c = arg;
  atomic_store(&c->cancel_again_rc, aiob_uring_cancel(uo_ring(c), &c->read.op));
}

static void test_uring_ops(void **state) {
  (void)state;
  if (!backend_is("uring"))
    skip(); /* aiobridge/uring.h is the uring backend's */
  uo_ctx *c = xcalloc(1, sizeof *c);
  uo_op *ops[] = {&c->nop, &c->read, &c->cancelled, &c->orphan};
  for (int i = 0; i < 4; i++) {
    ops[i]->op.complete = uo_complete;
    latch_init(&ops[i]->done);
  }
  for (int i = 0; i < 3; i++)
    assert_int_equal(pipe2(c->pipes[i], O_CLOEXEC), 0);
  assert_rc(runtime_new(&c->rt, 1), 0);
  run_on_loop(c->rt, 0, uo_start, c);
  assert_int_equal(atomic_load(&c->null_sqe), 1);
  assert_rc(atomic_load(&c->cancel_rc), 0);

  latch_ok(&c->nop.done, 1);
  assert_int_equal(atomic_load(&c->nop.res), 0);
  latch_ok(&c->cancelled.done, 1);
  assert_int_equal(atomic_load(&c->cancelled.res), -ECANCELED);

  /* The read completes when the pipe has data. */
  assert_int_equal(atomic_load(&c->read.calls), 0);
  assert_int_equal(write(c->pipes[0][1], "hello", 5), 5);
  latch_ok(&c->read.done, 1);
  assert_int_equal(atomic_load(&c->read.res), 5);
  assert_memory_equal(c->read.buf, "hello", 5);
  run_on_loop(c->rt, 0, uo_cancel_again, c);
  assert_rc(atomic_load(&c->cancel_again_rc), AIOB_EINVAL);

  /* Shutdown with a read in flight: it completes, once, cancelled. */
  assert_int_equal(atomic_load(&c->orphan.calls), 0);
  assert_rc(aiob_runtime_shutdown(c->rt), 0);
  assert_int_equal(atomic_load(&c->orphan.calls), 1);
  assert_int_equal(atomic_load(&c->orphan.res), -ECANCELED);
  aiob_runtime_free(c->rt);
  for (int i = 0; i < 4; i++) {
    assert_int_equal(atomic_load(&ops[i]->calls), 1);
    latch_destroy(&ops[i]->done);
  }
  for (int i = 0; i < 3; i++) {
    close(c->pipes[i][0]);
    close(c->pipes[i][1]);
  }
  free(c);
  assert_clean();
}
#else
static void test_uring_ops(void **state) {
  (void)state;
  skip(); /* built without the uring backend */
}
#endif

/* ======================================================================== */

/* Plain test names, so the filter takes "many_timers" or "fd_*". */
#define EDGE(test, setup)                                                      \
  {                                                                            \
    .name = #test, .test_func = test_##test, .setup_func = setup,              \
    .teardown_func = teardown, .initial_state = NULL                           \
  }

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s <uv|event|uring> [test-name-filter]\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];

  /* Refused by the kernel or the build: skip, with the reason. */
  aiob_runtime *probe = NULL;
  int rc =
      backend_probe_status("backend_edges", g_backend, runtime_new(&probe, 1));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);

  if (argc > 2)
    cmocka_set_test_filter(argv[2]);

  const struct CMUnitTest tests[] = {
      EDGE(many_timers, setup2),         /* 2 loops */
      EDGE(wake_storm, setup2),          /* 2 loops */
      EDGE(fd_many_waiters, setup_none), /* its own: 1 loop, small ring */
      EDGE(fd_modify_and_stop, setup1),  /* 1 loop */
      EDGE(refused_kernel, setup_none),  /* runtimes in a child process */
      EDGE(native_handle, setup_none),   /* its own: shut down in the test */
      EDGE(uring_ops, setup_none),       /* its own: shut down in the test */
  };

  char group[96];
  snprintf(group, sizeof group, "backend_edges_%s", g_backend);
  return _cmocka_run_group_tests(group, tests, sizeof tests / sizeof tests[0],
                                 NULL, NULL);
}
