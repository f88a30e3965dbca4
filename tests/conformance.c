/* aiobridge backend conformance suite.
 *
 * One cmocka program, run once per backend:
 *
 *   conformance <backend> [test-name-filter]
 *
 * <backend> is a compiled-in backend name ("uv", "event", "uring") or
 * "poll": the custom poll(2) table of tests/poll_backend.c, passed through
 * aiob_runtime_config.backend_table, which proves an outside backend written
 * against include/aiobridge/backend.h drives a runtime. The same test bodies
 * run for every backend and use the public API only; they check the
 * contract written in the public headers (include/aiobridge/): spawn order,
 * wakers, sleeps, cancellation, promises, joins, task locals, fd readiness,
 * shutdown.
 *
 * When the backend is refused at run time (AIOB_ENOSYS, AIOB_EPERM,
 * AIOB_ENOTSUP: e.g. a kernel that refuses io_uring) the program prints
 * "SKIP: <backend>: <reason>" and exits 77.
 *
 * Rules the tests follow: every wait is bounded (WAIT_TIMEOUT) and nothing
 * sleeps to synchronise; code running on loop threads or helper threads
 * never calls cmocka asserts (they longjmp) but records failures with CHECK,
 * which the test thread reports; state shared with tasks lives on the heap
 * so a failing test cannot leave a loop thread writing into a dead stack
 * frame. Built to run clean under ASan/UBSan/LSan and TSan.
 */
#include <aiobridge.h>

#include "poll_backend.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "harness.h"

/* ---- Backend under test ------------------------------------------------ */

static const char *g_backend;       /* argv[1] */
static const aiob_backend *g_table; /* set for "poll" */

static const char *expected_backend_name(void) {
  return g_table ? g_table->name : g_backend;
}

/* The table the runtime will use, for tests that copy and alter it. */
static const aiob_backend *selected_table(void) {
  return g_table ? g_table : aiob_backend_find(g_backend);
}

static void config_for_backend(aiob_runtime_config *cfg, unsigned threads) {
  aiob_runtime_config_init(cfg);
  cfg->threads = threads;
  if (g_table)
    cfg->backend_table = g_table;
  else
    cfg->backend = g_backend;
}

static int runtime_new(aiob_runtime **out, unsigned threads) {
  aiob_runtime_config cfg;
  config_for_backend(&cfg, threads);
  return aiob_runtime_new(out, &cfg);
}

#include "blocks.h"

/* ---- Task building blocks of this suite -------------------------------- */

/* Completes at once. */
static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  poll_enter(p);
  return AIOB_READY;
}
static const aiob_task_vtable ready_vt = {.poll = ready_poll,
                                          .drop = drop_count};

/* Pending forever: finishes only by cancellation or shutdown. */
static aiob_poll pend_poll(aiob_task *t, void *p) {
  (void)t;
  poll_enter(p);
  return AIOB_PENDING;
}
static const aiob_task_vtable pend_vt = {.poll = pend_poll, .drop = drop_count};

/* Values handed through outputs and promises. */
static latch g_frees; /* count_free calls, process-wide */

static void count_free(void *v) {
  free(v);
  latch_add(&g_frees, 1);
}

static int *new_int(int v) {
  int *p = malloc(sizeof *p);
  CHECK(p != NULL);
  if (p)
    *p = v;
  return p;
}

/* Sleeps `dur` ns from its first poll; signals `pending` after its first
 * PENDING. */
typedef struct sl_task {
  tbase b;
  uint64_t dur;
  latch *pending;
  void *value; /* returned with count_free when set */
  int inited;
  aiob_sleep s;
  _Atomic uint64_t first_poll, done_at;
  atomic_int status;
} sl_task;

static aiob_poll sl_poll(aiob_task *t, void *p) {
  sl_task *s = p;
  int n = poll_enter(s);
  if (!s->inited) {
    s->inited = 1;
    atomic_store(&s->first_poll, aiob_now_ns());
    aiob_sleep_init(&s->s, s->dur);
  }
  int st = 1;
  if (aiob_sleep_poll(t, &s->s, &st) == AIOB_PENDING) {
    if (n == 1 && s->pending)
      latch_add(s->pending, 1);
    return AIOB_PENDING;
  }
  atomic_store(&s->done_at, aiob_now_ns());
  atomic_store(&s->status, st);
  if (s->value) {
    aiob_task_return(t, s->value, count_free);
    s->value = NULL;
  }
  return AIOB_READY;
}
static const aiob_task_vtable sl_vt = {.poll = sl_poll, .drop = drop_count};

/* Hands out a waker on its first poll, then stays pending until `go` is
 * set (checked on every poll). Releases its waker when done or dropped. */
typedef struct wk_task {
  tbase b;
  _Atomic(aiob_waker *) w;
  atomic_int go;
  latch handed;
} wk_task;

static aiob_poll wk_poll(aiob_task *t, void *p) {
  wk_task *k = p;
  if (poll_enter(k) == 1) {
    atomic_store(&k->w, aiob_task_waker(t));
    CHECK(atomic_load(&k->w) != NULL);
    latch_add(&k->handed, 1);
    return AIOB_PENDING; /* the waker may fire at once: poll 2 sees `go` */
  }
  if (!atomic_load(&k->go))
    return AIOB_PENDING;
  aiob_waker_release(atomic_exchange(&k->w, NULL));
  return AIOB_READY;
}

static void wk_drop(void *p) {
  wk_task *k = p;
  aiob_waker_release(atomic_exchange(&k->w, NULL));
  drop_count(p);
}
static const aiob_task_vtable wk_vt = {.poll = wk_poll, .drop = wk_drop};

static wk_task *wk_new(void) {
  wk_task *k = xcalloc(1, sizeof *k);
  latch_init(&k->handed);
  return k;
}

static void wk_free(wk_task *k) {
  latch_destroy(&k->handed);
  free(k);
}

/* Awaits a promise; records status and the int value. The promise's waiter
 * side is released in drop when release_in_drop is set. */
typedef struct pw_task {
  tbase b;
  aiob_promise *p;
  int release_in_drop;
  latch *pending;
  aiob_output out;
  atomic_int status;
  atomic_int value; /* *(int *)value, or -1 for NULL */
} pw_task;

static aiob_poll pw_poll(aiob_task *t, void *p) {
  pw_task *k = p;
  int n = poll_enter(k);
  if (aiob_promise_poll(t, k->p, &k->out) == AIOB_PENDING) {
    if (n == 1 && k->pending)
      latch_add(k->pending, 1);
    return AIOB_PENDING;
  }
  atomic_store(&k->status, k->out.status);
  atomic_store(&k->value, k->out.value ? *(int *)k->out.value : -1);
  aiob_output_clear(&k->out);
  return AIOB_READY;
}

static void pw_drop(void *p) {
  pw_task *k = p;
  if (k->release_in_drop)
    aiob_promise_release(k->p);
  drop_count(p);
}
static const aiob_task_vtable pw_vt = {.poll = pw_poll, .drop = pw_drop};

static void pw_init(pw_task *k, aiob_promise *p, int release_in_drop,
                    latch *pending) {
  memset(k, 0, sizeof *k);
  k->p = p;
  k->release_in_drop = release_in_drop;
  k->pending = pending;
  atomic_store(&k->status, 12345);
  atomic_store(&k->value, -2);
}

/* ======================================================================== */
/* fifo: tasks spawned from one non-loop thread run in spawn order.          */

#define FIFO_N 1000

typedef struct fifo_ctx {
  atomic_int next;
  atomic_int order[FIFO_N];
} fifo_ctx;

typedef struct fifo_task {
  tbase b;
  int idx;
  fifo_ctx *ctx;
} fifo_task;

static aiob_poll fifo_poll(aiob_task *t, void *p) {
  (void)t;
  fifo_task *f = p;
  poll_enter(f);
  int pos = atomic_fetch_add(&f->ctx->next, 1);
  if (pos < FIFO_N)
    atomic_store(&f->ctx->order[pos], f->idx);
  return AIOB_READY;
}
static const aiob_task_vtable fifo_vt = {.poll = fifo_poll, .drop = drop_count};

static void test_fifo(void **state) {
  aiob_runtime *rt = RT(state);
  fifo_ctx *ctx = xcalloc(1, sizeof *ctx);
  fifo_task *ts = xcalloc(FIFO_N, sizeof *ts);
  aiob_task **hs = xcalloc(FIFO_N, sizeof *hs);

  for (int i = 0; i < FIFO_N; i++) {
    ts[i].idx = i;
    ts[i].ctx = ctx;
    hs[i] = spawn_h(rt, &fifo_vt, &ts[i]);
  }
  for (int i = 0; i < FIFO_N; i++)
    wait_ok(hs[i]);
  assert_int_equal(atomic_load(&ctx->next), FIFO_N);
  for (int i = 0; i < FIFO_N; i++) {
    if (atomic_load(&ctx->order[i]) != i)
      fail_msg("position %d ran task %d", i, atomic_load(&ctx->order[i]));
    assert_int_equal(polls_of(&ts[i]), 1);
    assert_int_equal(drops_of(&ts[i]), 1);
    assert_true(aiob_task_is_finished(hs[i]));
    aiob_task_release(hs[i]);
  }
  free(hs);
  free(ts);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* many_threads: 4 threads x 10000 detached spawns on a 2-thread runtime.    */

#define MT_THREADS 4
#define MT_PER 10000

typedef struct mt_ctx mt_ctx;

typedef struct mt_task {
  tbase b;
  mt_ctx *ctx;
} mt_task;

struct mt_ctx {
  aiob_runtime *rt;
  mt_task *tasks;
  atomic_int spawn_errors;
  atomic_int spawned;
  latch dropped;
};

typedef struct mt_arg {
  mt_ctx *ctx;
  int base;
} mt_arg;

static void mt_drop(void *p) {
  mt_task *m = p;
  mt_ctx *ctx = m->ctx;
  drop_count(p);
  latch_add(&ctx->dropped, 1);
}
static const aiob_task_vtable mt_vt = {.poll = ready_poll, .drop = mt_drop};

static void *mt_spawner(void *p) {
  mt_arg *a = p;
  for (int i = 0; i < MT_PER; i++) {
    int rc = aiob_spawn(a->ctx->rt, &mt_vt, &a->ctx->tasks[a->base + i], NULL);
    if (rc) {
      atomic_fetch_add(&a->ctx->spawn_errors, 1);
      check_failed(__FILE__, __LINE__, "aiob_spawn: %s", errname(rc));
    } else {
      atomic_fetch_add(&a->ctx->spawned, 1);
    }
  }
  return NULL;
}

static void test_many_threads(void **state) {
  const int total = MT_THREADS * MT_PER;
  mt_ctx *ctx = xcalloc(1, sizeof *ctx);
  ctx->rt = RT(state);
  ctx->tasks = xcalloc((size_t)total, sizeof *ctx->tasks);
  latch_init(&ctx->dropped);
  for (int i = 0; i < total; i++)
    ctx->tasks[i].ctx = ctx;

  mt_arg args[MT_THREADS];
  pthread_t th[MT_THREADS];
  for (int i = 0; i < MT_THREADS; i++) {
    args[i] = (mt_arg){.ctx = ctx, .base = i * MT_PER};
    th[i] = start_thread(mt_spawner, &args[i]);
  }
  for (int i = 0; i < MT_THREADS; i++)
    pthread_join(th[i], NULL);

  assert_int_equal(atomic_load(&ctx->spawn_errors), 0);
  assert_int_equal(atomic_load(&ctx->spawned), total);
  if (latch_wait(&ctx->dropped, total, 3 * WAIT_TIMEOUT) != 0)
    fail_msg("only %ld of %d tasks dropped", latch_get(&ctx->dropped), total);
  for (int i = 0; i < total; i++) {
    if (polls_of(&ctx->tasks[i]) != 1 || drops_of(&ctx->tasks[i]) != 1)
      fail_msg("task %d: %d polls, %d drops", i, polls_of(&ctx->tasks[i]),
               drops_of(&ctx->tasks[i]));
  }
  assert_int_equal(latch_get(&ctx->dropped), total);
  latch_destroy(&ctx->dropped);
  free(ctx->tasks);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* spawn_from_task: children spawned inside poll run, on the parent's loop
 * unless told otherwise, and on other runtimes too.                         */

#define SFT_KIDS 5

typedef struct sft_child {
  tbase b;
  aiob_runtime *rt;
  latch *dropped; /* for the detached child */
  atomic_int loop;
  atomic_int current_ok;
} sft_child;

static aiob_poll sft_child_poll(aiob_task *t, void *p) {
  sft_child *c = p;
  poll_enter(c);
  atomic_store(&c->loop, aiob_runtime_current_loop(c->rt));
  atomic_store(&c->current_ok,
               aiob_task_current() == t && aiob_task_runtime(t) == c->rt);
  return AIOB_READY;
}

static void sft_child_drop(void *p) {
  sft_child *c = p;
  latch *l = c->dropped;
  drop_count(p);
  if (l)
    latch_add(l, 1);
}
static const aiob_task_vtable sft_child_vt = {.poll = sft_child_poll,
                                              .drop = sft_child_drop};

typedef struct sft_parent {
  tbase b;
  aiob_runtime *rt, *rt2;
  atomic_int loop;
  sft_child kids[SFT_KIDS];
  _Atomic(aiob_task *) h[SFT_KIDS];
  latch detached_dropped;
} sft_parent;

static aiob_poll sft_parent_poll(aiob_task *t, void *p) {
  sft_parent *s = p;
  poll_enter(s);
  int me = aiob_runtime_current_loop(s->rt);
  atomic_store(&s->loop, me);
  CHECK(me == 0 || me == 1);
  CHECK(aiob_task_current() == t);
  CHECK(aiob_task_runtime(t) == s->rt);

  aiob_task *h = NULL;
  /* 0: aiob_spawn from a task: the caller's loop. */
  CHECK_INT(aiob_spawn(s->rt, &sft_child_vt, &s->kids[0], &h), ==, 0);
  atomic_store(&s->h[0], h);
  /* 1: opts.loop = -1: the caller's loop. */
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  CHECK_INT(o.loop, ==, -1);
  h = NULL;
  CHECK_INT(aiob_spawn_ex(s->rt, &o, &sft_child_vt, &s->kids[1], &h), ==, 0);
  atomic_store(&s->h[1], h);
  /* 2: explicitly the other loop. */
  o.loop = 1 - me;
  h = NULL;
  CHECK_INT(aiob_spawn_ex(s->rt, &o, &sft_child_vt, &s->kids[2], &h), ==, 0);
  atomic_store(&s->h[2], h);
  /* 3: detached. */
  CHECK_INT(aiob_spawn(s->rt, &sft_child_vt, &s->kids[3], NULL), ==, 0);
  /* 4: onto another runtime, from a loop thread. */
  h = NULL;
  CHECK_INT(aiob_spawn(s->rt2, &sft_child_vt, &s->kids[4], &h), ==, 0);
  atomic_store(&s->h[4], h);
  return AIOB_READY;
}
static const aiob_task_vtable sft_parent_vt = {.poll = sft_parent_poll,
                                               .drop = drop_count};

static void test_spawn_from_task(void **state) {
  sft_parent *s = xcalloc(1, sizeof *s);
  s->rt = RT(state);
  assert_rc(runtime_new(&s->rt2, 1), 0);
  latch_init(&s->detached_dropped);
  for (int i = 0; i < SFT_KIDS; i++) {
    s->kids[i].rt = i == 4 ? s->rt2 : s->rt;
    atomic_store(&s->kids[i].loop, -7);
  }
  s->kids[3].dropped = &s->detached_dropped;

  assert_null(aiob_task_current());
  assert_int_equal(aiob_runtime_current_loop(s->rt), -1);

  aiob_task *hp = spawn_h(s->rt, &sft_parent_vt, s);
  wait_ok(hp);
  assert_clean();
  int me = atomic_load(&s->loop);
  for (int i = 0; i < SFT_KIDS; i++) {
    if (i == 3)
      continue;
    aiob_task *h = atomic_load(&s->h[i]);
    wait_ok(h);
    aiob_task_release(h);
  }
  latch_ok(&s->detached_dropped, 1);

  const int want[SFT_KIDS] = {me, me, 1 - me, me, 0};
  for (int i = 0; i < SFT_KIDS; i++) {
    if (atomic_load(&s->kids[i].loop) != want[i])
      fail_msg("child %d ran on loop %d, want %d (parent on %d)", i,
               atomic_load(&s->kids[i].loop), want[i], me);
    assert_true(atomic_load(&s->kids[i].current_ok));
    assert_int_equal(polls_of(&s->kids[i]), 1);
    assert_int_equal(drops_of(&s->kids[i]), 1);
  }
  aiob_task_release(hp);
  aiob_runtime_free(s->rt2);
  latch_destroy(&s->detached_dropped);
  free(s);
  assert_clean();
}

/* ======================================================================== */
/* wake_other_thread: a plain pthread wakes a pending task through a waker.  */

static void *wot_thread(void *p) {
  wk_task *k = p;
  if (latch_wait(&k->handed, 1, WAIT_TIMEOUT) != 0) {
    check_failed(__FILE__, __LINE__, "waker never handed out");
    return NULL;
  }
  aiob_waker *w = aiob_waker_clone(atomic_load(&k->w));
  atomic_store(&k->go, 1);
  aiob_waker_wake(w);
  aiob_waker_release(w);
  return NULL;
}

static void test_wake_other_thread(void **state) {
  aiob_runtime *rt = RT(state);
  wk_task *k = wk_new();
  aiob_task *h = spawn_h(rt, &wk_vt, k);
  latch_ok(&k->handed, 1);
  /* The test keeps its own clone, used after the task finished. */
  aiob_waker *mine = aiob_waker_clone(atomic_load(&k->w));
  assert_non_null(mine);

  pthread_t th = start_thread(wot_thread, k);
  wait_ok(h);
  pthread_join(th, NULL);
  assert_int_equal(polls_of(k), 2);
  assert_int_equal(drops_of(k), 1);
  assert_status(h, 0);

  /* Waking a finished task does nothing. */
  aiob_task_release(h);
  aiob_waker_wake(mine);
  aiob_waker_wake(mine);
  aiob_waker_release(mine);
  assert_int_equal(polls_of(k), 2);
  assert_null(atomic_load(&k->w));
  wk_free(k);
  assert_clean();
}

/* ======================================================================== */
/* wake_coalescing: wakes while queued coalesce; a wake during a poll makes
 * exactly one more poll. One loop; queue order fixed with a gate.           */

typedef struct wc_ctx wc_ctx;

typedef struct wc_a {
  tbase b;
  _Atomic(aiob_waker *) w;
  atomic_int finish;
} wc_a;

typedef struct wc_b {
  tbase b;
  wc_a *a;
  atomic_int a_polls_after;
} wc_b;

typedef struct wc_c {
  tbase b;
  wc_a *a;
  int yields;
  atomic_int a_polls_seen;
} wc_c;

static aiob_poll wc_a_poll(aiob_task *t, void *p) {
  wc_a *a = p;
  int n = poll_enter(a);
  if (n == 1) {
    atomic_store(&a->w, aiob_task_waker(t));
    return AIOB_PENDING;
  }
  if (n == 2) {
    /* Woken during this poll: must be polled exactly once more. */
    for (int i = 0; i < 5; i++)
      aiob_waker_wake(atomic_load(&a->w));
    return AIOB_PENDING;
  }
  if (!atomic_load(&a->finish))
    return AIOB_PENDING;
  aiob_waker_release(atomic_exchange(&a->w, NULL));
  return AIOB_READY;
}

static void wc_a_drop(void *p) {
  wc_a *a = p;
  aiob_waker_release(atomic_exchange(&a->w, NULL));
  drop_count(p);
}
static const aiob_task_vtable wc_a_vt = {.poll = wc_a_poll, .drop = wc_a_drop};

static aiob_poll wc_b_poll(aiob_task *t, void *p) {
  (void)t;
  wc_b *b = p;
  poll_enter(b);
  CHECK_INT(polls_of(b->a), ==, 1);
  aiob_waker *w = atomic_load(&b->a->w);
  CHECK(w != NULL);
  if (w)
    for (int i = 0; i < 100; i++)
      aiob_waker_wake(w);
  atomic_store(&b->a_polls_after, polls_of(b->a));
  return AIOB_READY;
}
static const aiob_task_vtable wc_b_vt = {.poll = wc_b_poll, .drop = drop_count};

static aiob_poll wc_c_poll(aiob_task *t, void *p) {
  wc_c *c = p;
  poll_enter(c);
  /* Yield often enough for every duplicate poll of A, if any, to run. */
  if (c->yields < 10) {
    c->yields++;
    aiob_task_yield_now(t);
    return AIOB_PENDING;
  }
  atomic_store(&c->a_polls_seen, polls_of(c->a));
  atomic_store(&c->a->finish, 1);
  aiob_waker_wake(atomic_load(&c->a->w));
  return AIOB_READY;
}
static const aiob_task_vtable wc_c_vt = {.poll = wc_c_poll, .drop = drop_count};

static void test_wake_coalescing(void **state) {
  aiob_runtime *rt = RT(state);
  wc_a *a = xcalloc(1, sizeof *a);
  wc_b *b = xcalloc(1, sizeof *b);
  wc_c *c = xcalloc(1, sizeof *c);
  b->a = a;
  c->a = a;

  aiob_task *hg;
  gate *g = gate_close(rt, 0, NULL, NULL, &hg);
  aiob_task *ha = spawn_h(rt, &wc_a_vt, a);
  aiob_task *hb = spawn_h(rt, &wc_b_vt, b);
  aiob_task *hc = spawn_h(rt, &wc_c_vt, c);
  gate_open(g);
  wait_ok(hb);
  wait_ok(hc);
  wait_ok(ha);
  gate_finish(g, hg);

  /* A: 1 (hand out waker), 2 (after 100 coalesced wakes from B),
   * 3 (after 5 self-wakes during poll 2), 4 (woken by C). */
  assert_int_equal(atomic_load(&b->a_polls_after), 1);
  assert_int_equal(atomic_load(&c->a_polls_seen), 3);
  assert_int_equal(polls_of(a), 4);
  assert_int_equal(drops_of(a), 1);
  assert_int_equal(polls_of(c), 11);
  aiob_task_release(ha);
  aiob_task_release(hb);
  aiob_task_release(hc);
  free(a);
  free(b);
  free(c);
  assert_clean();
}

/* ======================================================================== */
/* self_wake_no_starvation: a task that wakes itself forever does not starve
 * later spawns nor timers.                                                  */

#define SW_MAX_POLLS 10000000

typedef struct sw_ctx {
  atomic_int t_ran;
  atomic_int z_done;
} sw_ctx;

typedef struct sw_s {
  tbase b;
  sw_ctx *ctx;
  aiob_waker *w; /* loop thread only */
  atomic_int starved;
} sw_s;

static aiob_poll sw_s_poll(aiob_task *t, void *p) {
  sw_s *s = p;
  int n = poll_enter(s);
  if (n == 1)
    s->w = aiob_task_waker(t);
  int done = atomic_load(&s->ctx->t_ran) && atomic_load(&s->ctx->z_done);
  if (!done && n > SW_MAX_POLLS) {
    atomic_store(&s->starved, 1);
    done = 1;
  }
  if (done) {
    aiob_waker_release(s->w);
    s->w = NULL;
    return AIOB_READY;
  }
  aiob_waker_wake(s->w);
  return AIOB_PENDING;
}

static void sw_s_drop(void *p) {
  sw_s *s = p;
  if (s->w)
    aiob_waker_release(s->w);
  s->w = NULL;
  drop_count(p);
}
static const aiob_task_vtable sw_s_vt = {.poll = sw_s_poll, .drop = sw_s_drop};

typedef struct sw_t {
  tbase b;
  sw_ctx *ctx;
} sw_t;

static aiob_poll sw_t_poll(aiob_task *t, void *p) {
  (void)t;
  sw_t *k = p;
  poll_enter(k);
  atomic_store(&k->ctx->t_ran, 1);
  return AIOB_READY;
}
static const aiob_task_vtable sw_t_vt = {.poll = sw_t_poll, .drop = drop_count};

typedef struct sw_z {
  sl_task sl; /* first member: the sleep task machinery */
  sw_ctx *ctx;
} sw_z;

static aiob_poll sw_z_poll(aiob_task *t, void *p) {
  sw_z *z = p;
  if (sl_poll(t, &z->sl) == AIOB_PENDING)
    return AIOB_PENDING;
  atomic_store(&z->ctx->z_done, 1);
  return AIOB_READY;
}
static const aiob_task_vtable sw_z_vt = {.poll = sw_z_poll, .drop = drop_count};

static void test_self_wake_no_starvation(void **state) {
  aiob_runtime *rt = RT(state);
  sw_ctx *ctx = xcalloc(1, sizeof *ctx);
  sw_s *s = xcalloc(1, sizeof *s);
  sw_t *k = xcalloc(1, sizeof *k);
  sw_z *z = xcalloc(1, sizeof *z);
  s->ctx = k->ctx = z->ctx = ctx;
  z->sl.dur = 1 * AIOB_MSEC;

  aiob_task *hs = spawn_h(rt, &sw_s_vt, s);
  aiob_task *ht = spawn_h(rt, &sw_t_vt, k);
  aiob_task *hz = spawn_h(rt, &sw_z_vt, z);
  wait_ok(ht);
  wait_ok(hz);
  wait_ok(hs);
  if (atomic_load(&s->starved))
    fail_msg("self-waking task polled %d times before the others ran",
             polls_of(s));
  assert_int_equal(atomic_load(&z->sl.status), 0);
  assert_true(atomic_load(&z->sl.done_at) >=
              atomic_load(&z->sl.first_poll) + 1 * AIOB_MSEC);
  assert_int_equal(drops_of(s), 1);
  assert_int_equal(drops_of(k), 1);
  assert_int_equal(drops_of(z), 1);
  aiob_task_release(hs);
  aiob_task_release(ht);
  aiob_task_release(hz);
  free(s);
  free(k);
  free(z);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* sleep_order: sleeps complete in deadline order and never early.           */

#define SO_N 6
static const int so_ms[SO_N] = {50, 10, 30, 0, 20, 40};

typedef struct so_ctx {
  atomic_int next;
  atomic_int order[SO_N];
} so_ctx;

typedef struct so_task {
  tbase b;
  so_ctx *ctx;
  int idx;
  uint64_t deadline; /* absolute; 0 for a relative sleep */
  uint64_t dur;
  int inited;
  aiob_sleep s;
  _Atomic uint64_t first_poll, armed_at, done_at;
  atomic_int status;
} so_task;

static aiob_poll so_poll(aiob_task *t, void *p) {
  so_task *k = p;
  int n = poll_enter(k);
  if (!k->inited) {
    k->inited = 1;
    atomic_store(&k->first_poll, aiob_now_ns());
    if (k->deadline)
      aiob_sleep_init_until(&k->s, k->deadline);
    else
      aiob_sleep_init(&k->s, k->dur);
  }
  int st = 1;
  aiob_poll r = aiob_sleep_poll(t, &k->s, &st);
  if (n == 1)
    atomic_store(&k->armed_at, aiob_now_ns());
  if (r == AIOB_PENDING)
    return AIOB_PENDING;
  atomic_store(&k->done_at, aiob_now_ns());
  atomic_store(&k->status, st);
  int pos = atomic_fetch_add(&k->ctx->next, 1);
  if (pos < SO_N)
    atomic_store(&k->ctx->order[pos], k->idx);
  return AIOB_READY;
}
static const aiob_task_vtable so_vt = {.poll = so_poll, .drop = drop_count};

/* Re-arms a sleep: 10 s, stopped, then 5 ms. */
typedef struct rs_task {
  tbase b;
  aiob_sleep s;
  _Atomic uint64_t rearmed_at, done_at;
  atomic_int first_was_pending;
  atomic_int status;
} rs_task;

static aiob_poll rs_poll(aiob_task *t, void *p) {
  rs_task *k = p;
  int st = 1;
  if (poll_enter(k) == 1) {
    aiob_sleep_init(&k->s, 10 * AIOB_SEC);
    atomic_store(&k->first_was_pending,
                 aiob_sleep_poll(t, &k->s, &st) == AIOB_PENDING);
    aiob_sleep_stop(&k->s);
    aiob_sleep_stop(&k->s); /* no-op on a disarmed sleep */
    atomic_store(&k->rearmed_at, aiob_now_ns());
    aiob_sleep_init(&k->s, 5 * AIOB_MSEC);
  }
  if (aiob_sleep_poll(t, &k->s, &st) == AIOB_PENDING)
    return AIOB_PENDING;
  atomic_store(&k->done_at, aiob_now_ns());
  atomic_store(&k->status, st);
  return AIOB_READY;
}
static const aiob_task_vtable rs_vt = {.poll = rs_poll, .drop = drop_count};

/* Lateness allowed to a sleep: a correctness bound, not performance. A 10x
 * slower machine that preempts threads for tens of ms stays far below it;
 * a backend that rounds timeouts up to whole seconds does not. */
#define SO_SLACK (500 * AIOB_MSEC)

/* One round of sleeps with absolute deadlines from one base `lead` ns
 * ahead. When every sleep was armed before the earliest deadline, the
 * completion order is fully determined and checked; a sleep armed later (a
 * spawner or loop thread preempted for `lead`) completes at its first
 * poll, so such a round checks everything but the order and returns 0. */
static int so_absolute_round(aiob_runtime *rt, uint64_t lead) {
  so_ctx *ctx = xcalloc(1, sizeof *ctx);
  so_task *ts = xcalloc(SO_N, sizeof *ts);
  aiob_task *hs[SO_N];
  uint64_t base = aiob_now_ns() + lead;
  for (int i = 0; i < SO_N; i++) {
    ts[i].ctx = ctx;
    ts[i].idx = i;
    ts[i].deadline = base + (uint64_t)so_ms[i] * AIOB_MSEC;
    hs[i] = spawn_h(rt, &so_vt, &ts[i]);
  }
  for (int i = 0; i < SO_N; i++)
    wait_ok(hs[i]);
  int armed_in_time = 1;
  for (int i = 0; i < SO_N; i++)
    if (atomic_load(&ts[i].armed_at) >= base)
      armed_in_time = 0;
  const int want[SO_N] = {3, 1, 4, 2, 5, 0};
  for (int i = 0; armed_in_time && i < SO_N; i++)
    if (atomic_load(&ctx->order[i]) != want[i])
      fail_msg("completion %d was the %d ms sleep, want the %d ms one", i,
               so_ms[atomic_load(&ctx->order[i])], so_ms[want[i]]);
  for (int i = 0; i < SO_N; i++) {
    uint64_t done = atomic_load(&ts[i].done_at);
    /* Due at its deadline, or at its first poll if that came later. */
    uint64_t due = ts[i].deadline;
    if (atomic_load(&ts[i].first_poll) > due)
      due = atomic_load(&ts[i].first_poll);
    assert_int_equal(atomic_load(&ts[i].status), 0);
    if (done < ts[i].deadline)
      fail_msg("%d ms sleep woke %llu ns early", so_ms[i],
               (unsigned long long)(ts[i].deadline - done));
    if (done - due >= SO_SLACK)
      fail_msg("%d ms sleep woke %llu ms late", so_ms[i],
               (unsigned long long)((done - due) / AIOB_MSEC));
    assert_int_equal(drops_of(&ts[i]), 1);
    aiob_task_release(hs[i]);
  }
  free(ts);
  free(ctx);
  return armed_in_time;
}

static void test_sleep_order(void **state) {
  aiob_runtime *rt = RT(state);

  /* Absolute deadlines: normally all six sleeps are armed well within
   * 100 ms; a round where some was not proves no order and is run again
   * with a longer lead. */
  static const uint64_t leads[] = {100 * AIOB_MSEC, AIOB_SEC, 4 * AIOB_SEC};
  int nleads = (int)(sizeof leads / sizeof leads[0]), r = 0;
  while (!so_absolute_round(rt, leads[r]))
    if (++r == nleads)
      fail_msg("%d sleeps were never all armed within %llu ms of spawning",
               SO_N, (unsigned long long)(leads[nleads - 1] / AIOB_MSEC));

  /* Relative sleeps count from their first poll. */
  so_ctx *ctx = xcalloc(1, sizeof *ctx);
  so_task *ts = xcalloc(SO_N, sizeof *ts);
  aiob_task *hs[SO_N];
  for (int i = 0; i < SO_N; i++) {
    ts[i].ctx = ctx;
    ts[i].idx = i;
    ts[i].dur = (uint64_t)so_ms[i] * AIOB_MSEC;
    hs[i] = spawn_h(rt, &so_vt, &ts[i]);
  }
  for (int i = 0; i < SO_N; i++) {
    wait_ok(hs[i]);
    uint64_t start = atomic_load(&ts[i].first_poll);
    uint64_t done = atomic_load(&ts[i].done_at);
    assert_int_equal(atomic_load(&ts[i].status), 0);
    if (done < start + ts[i].dur)
      fail_msg("relative %d ms sleep finished after %llu ns", so_ms[i],
               (unsigned long long)(done - start));
    assert_true(done - start < ts[i].dur + SO_SLACK);
    aiob_task_release(hs[i]);
  }

  /* A stopped sleep can be re-armed with a shorter duration. */
  rs_task *rs = xcalloc(1, sizeof *rs);
  aiob_task *hr = spawn_h(rt, &rs_vt, rs);
  wait_ok(hr);
  assert_true(atomic_load(&rs->first_was_pending));
  assert_int_equal(atomic_load(&rs->status), 0);
  uint64_t took = atomic_load(&rs->done_at) - atomic_load(&rs->rearmed_at);
  assert_true(took >= 5 * AIOB_MSEC);
  assert_true(took < 5 * AIOB_SEC);
  aiob_task_release(hr);

  free(rs);
  free(ts);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* sleep_zero_yields: sleep(0) is PENDING once, lets another task run, then
 * READY.                                                                    */

typedef struct sz_ctx {
  atomic_int n;
  atomic_int seq[8];
} sz_ctx;

enum { SZ_Z1 = 1, SZ_O, SZ_Z2 };

static void sz_rec(sz_ctx *c, int what) {
  int i = atomic_fetch_add(&c->n, 1);
  if (i < 8)
    atomic_store(&c->seq[i], what);
}

typedef struct sz_z {
  tbase b;
  sz_ctx *ctx;
  aiob_sleep s;
} sz_z;

static aiob_poll sz_z_poll(aiob_task *t, void *p) {
  sz_z *z = p;
  int st = 1;
  if (poll_enter(z) == 1) {
    aiob_sleep_init(&z->s, 0);
    aiob_poll r = aiob_sleep_poll(t, &z->s, &st);
    CHECK(r == AIOB_PENDING);
    sz_rec(z->ctx, SZ_Z1);
    return r;
  }
  aiob_poll r = aiob_sleep_poll(t, &z->s, &st);
  if (r == AIOB_READY) {
    CHECK_INT(st, ==, 0);
    sz_rec(z->ctx, SZ_Z2);
  }
  return r;
}
static const aiob_task_vtable sz_z_vt = {.poll = sz_z_poll, .drop = drop_count};

typedef struct sz_o {
  tbase b;
  sz_ctx *ctx;
} sz_o;

static aiob_poll sz_o_poll(aiob_task *t, void *p) {
  (void)t;
  sz_o *o = p;
  poll_enter(o);
  sz_rec(o->ctx, SZ_O);
  return AIOB_READY;
}
static const aiob_task_vtable sz_o_vt = {.poll = sz_o_poll, .drop = drop_count};

static void test_sleep_zero_yields(void **state) {
  aiob_runtime *rt = RT(state);
  sz_ctx *ctx = xcalloc(1, sizeof *ctx);
  sz_z *z = xcalloc(1, sizeof *z);
  sz_o *o = xcalloc(1, sizeof *o);
  z->ctx = o->ctx = ctx;

  aiob_task *hg;
  gate *g = gate_close(rt, 0, NULL, NULL, &hg);
  aiob_task *hz = spawn_h(rt, &sz_z_vt, z);
  aiob_task *ho = spawn_h(rt, &sz_o_vt, o);
  gate_open(g);
  wait_ok(hz);
  wait_ok(ho);
  gate_finish(g, hg);

  assert_int_equal(atomic_load(&ctx->n), 3);
  assert_int_equal(atomic_load(&ctx->seq[0]), SZ_Z1);
  assert_int_equal(atomic_load(&ctx->seq[1]), SZ_O);
  assert_int_equal(atomic_load(&ctx->seq[2]), SZ_Z2);
  assert_int_equal(polls_of(z), 2);
  aiob_task_release(hz);
  aiob_task_release(ho);
  free(z);
  free(o);
  free(ctx);
  assert_clean();
}

/* ======================================================================== */
/* sleep_many_short: long runs of short sequential sleeps (0.1-1.5 ms) in two
 * tasks on one loop all finish, never early. The loop's one backend timer is
 * re-armed thousands of times, including right after it fired; a backend
 * that blocks after reporting expiry loses a timer here.                    */

#define SMS_SLEEPS 600

typedef struct sms_task {
  tbase b;
  int co;
  int i;
  int phase;
  uint64_t deadline;
  aiob_sleep s;
} sms_task;

static aiob_poll sms_poll(aiob_task *t, void *p) {
  sms_task *k = p;
  poll_enter(k);
  AIOB_BEGIN(&k->co);
  for (k->i = 0; k->i < SMS_SLEEPS; k->i++) {
    {
      uint64_t d = (uint64_t)((k->i + k->phase) % 15 + 1) * 100 * AIOB_USEC;
      k->deadline = aiob_now_ns() + d;
      aiob_sleep_init(&k->s, d);
    }
    AIOB_AWAIT(&k->co, aiob_sleep_poll(t, &k->s, NULL));
    CHECK(aiob_now_ns() >= k->deadline);
  }
  AIOB_END(&k->co);
}
static const aiob_task_vtable sms_vt = {.poll = sms_poll, .drop = drop_count};

static void test_sleep_many_short(void **state) {
  aiob_runtime *rt = RT(state);
  sms_task *a = xcalloc(1, sizeof *a);
  sms_task *b = xcalloc(1, sizeof *b);
  b->phase = 7;
  aiob_task *ha = spawn_h(rt, &sms_vt, a);
  aiob_task *hb = spawn_h(rt, &sms_vt, b);
  wait_ok(ha);
  wait_ok(hb);
  assert_status(ha, 0);
  assert_status(hb, 0);
  assert_int_equal(a->i, SMS_SLEEPS);
  assert_int_equal(b->i, SMS_SLEEPS);
  aiob_task_release(ha);
  aiob_task_release(hb);
  free(a);
  free(b);
  assert_clean();
}

/* ======================================================================== */
/* detached_sleeper: a detached task (no handle, no waker) pending on a sleep
 * or an fd wait is kept alive by its loop until it finishes.              */

typedef struct ds2_task {
  tbase b;
  int co;
  int fd;
  aiob_sleep s;
  aiob_io_wait w;
  latch *done;
} ds2_task;

static aiob_poll ds2_poll(aiob_task *t, void *p) {
  ds2_task *k = p;
  int r = 0;
  poll_enter(k);
  AIOB_BEGIN(&k->co);
  aiob_sleep_init(&k->s, 20 * AIOB_MSEC);
  AIOB_AWAIT(&k->co, aiob_sleep_poll(t, &k->s, NULL));
  if (k->fd >= 0) {
    aiob_io_wait_init(&k->w, k->fd, AIOB_READABLE);
    AIOB_AWAIT(&k->co, aiob_io_wait_poll(t, &k->w, &r));
    CHECK(r > 0 && (r & AIOB_READABLE));
  }
  latch_add(k->done, 1);
  AIOB_END(&k->co);
}
static const aiob_task_vtable ds2_vt = {.poll = ds2_poll, .drop = drop_count};

static void test_detached_sleeper(void **state) {
  aiob_runtime *rt = RT(state);
  latch *done = xcalloc(1, sizeof *done);
  latch_init(done);
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  ds2_task *a = xcalloc(1, sizeof *a);
  ds2_task *b = xcalloc(1, sizeof *b);
  a->fd = -1;
  b->fd = fds[0];
  a->done = b->done = done;
  assert_rc(aiob_spawn(rt, &ds2_vt, a, NULL), 0);
  assert_rc(aiob_spawn(rt, &ds2_vt, b, NULL), 0);
  latch_ok(done, 1); /* a: after its sleep */
  assert_int_equal(write(fds[1], "x", 1), 1);
  latch_ok(done, 2);         /* b: after its sleep and its fd wait */
  aiob_runtime_shutdown(rt); /* drops ran before shutdown returns */
  assert_int_equal(drops_of(a), 1);
  assert_int_equal(drops_of(b), 1);
  close(fds[0]);
  close(fds[1]);
  free(a);
  free(b);
  latch_destroy(done);
  free(done);
}

/* ======================================================================== */
/* on_finish: the finish callback runs once, on the loop thread, after drop,
 * with the output published; for cancelled tasks too; never when spawning
 * fails.                                                                   */

typedef struct of_ctx {
  aiob_runtime *rt;
  atomic_int calls;
  atomic_int on_loop;
  atomic_int finished;
  atomic_int status;
  atomic_int value;
  atomic_int drops_seen;
  tbase *k;
  latch done;
} of_ctx;

static void of_cb(void *arg, aiob_task *t) {
  of_ctx *c = arg;
  atomic_fetch_add(&c->calls, 1);
  atomic_store(&c->on_loop, aiob_runtime_current_loop(c->rt) >= 0);
  atomic_store(&c->finished, aiob_task_is_finished(t));
  atomic_store(&c->drops_seen, drops_of(c->k));
  aiob_output out;
  if (aiob_task_take_output(t, &out) == 0) {
    atomic_store(&c->status, out.status);
    atomic_store(&c->value, out.value ? *(int *)out.value : -1);
    aiob_output_clear(&out);
  }
  latch_add(&c->done, 1);
}

static aiob_poll of_poll(aiob_task *t, void *p) {
  poll_enter(p);
  int *v = malloc(sizeof *v);
  *v = 77;
  aiob_task_return(t, v, free);
  return AIOB_READY;
}
static const aiob_task_vtable of_vt = {.poll = of_poll, .drop = drop_count};

static void test_on_finish(void **state) {
  aiob_runtime *rt = RT(state);
  of_ctx *c = xcalloc(1, sizeof *c);
  c->rt = rt;
  c->k = xcalloc(1, sizeof *c->k);
  latch_init(&c->done);
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.on_finish = of_cb;
  o.on_finish_arg = c;
  assert_rc(aiob_spawn_ex(rt, &o, &of_vt, c->k, NULL), 0);
  latch_ok(&c->done, 1);
  assert_int_equal(atomic_load(&c->calls), 1);
  assert_true(atomic_load(&c->on_loop));
  assert_true(atomic_load(&c->finished));
  assert_int_equal(atomic_load(&c->drops_seen), 1);
  assert_int_equal(atomic_load(&c->status), 0);
  assert_int_equal(atomic_load(&c->value), 77);

  /* Cancelled while pending: called with AIOB_ECANCELED. */
  tbase *first = c->k;
  tbase *p = xcalloc(1, sizeof *p);
  c->k = p;
  aiob_task *h;
  assert_rc(aiob_spawn_ex(rt, &o, &pend_vt, p, &h), 0);
  aiob_task_cancel(h);
  latch_ok(&c->done, 2);
  assert_int_equal(atomic_load(&c->calls), 2);
  assert_int_equal(atomic_load(&c->status), AIOB_ECANCELED);
  assert_int_equal(atomic_load(&c->drops_seen), 1);
  aiob_task_release(h);

  /* Spawning fails: never called. */
  aiob_runtime_shutdown(rt);
  tbase *q = xcalloc(1, sizeof *q);
  assert_rc(aiob_spawn_ex(rt, &o, &of_vt, q, NULL), AIOB_ESHUTDOWN);
  assert_int_equal(atomic_load(&c->calls), 2);
  assert_int_equal(polls_of(q), 0);
  free(q);
  free(p);
  free(first);
  latch_destroy(&c->done);
  free(c);
}

/* ======================================================================== */
/* cancel_before_first_poll: a queued task cancelled before it ever ran is
 * dropped without a poll; so is a woken task cancelled while re-queued.     */

static void test_cancel_before_first_poll(void **state) {
  aiob_runtime *rt = RT(state);
  tbase *x = xcalloc(1, sizeof *x);
  wk_task *y = wk_new();

  aiob_task *hy = spawn_h(rt, &wk_vt, y);
  latch_ok(&y->handed, 1);

  aiob_task *hg;
  gate *g = gate_close(rt, 0, NULL, NULL, &hg);
  aiob_task *hx = spawn_h(rt, &ready_vt, x);
  aiob_task_cancel(hx);
  aiob_task_cancel(hx); /* idempotent */
  /* y is pending and not cancelled: its waker is alive. */
  aiob_waker_wake(atomic_load(&y->w));
  aiob_task_cancel(hy);
  gate_open(g);
  wait_ok(hx);
  wait_ok(hy);
  gate_finish(g, hg);

  assert_true(aiob_task_is_finished(hx));
  assert_int_equal(polls_of(x), 0);
  assert_int_equal(drops_of(x), 1);
  aiob_output out = {.status = 1};
  assert_rc(aiob_task_take_output(hx, &out), 0);
  assert_rc(out.status, AIOB_ECANCELED);
  assert_null(out.value);
  aiob_output_clear(&out);
  assert_rc(aiob_task_take_output(hx, &out), AIOB_EALREADY);
  assert_rc(out.status, AIOB_ECANCELED);

  assert_int_equal(polls_of(y), 1); /* the wake never led to a poll */
  assert_int_equal(drops_of(y), 1);
  assert_status(hy, AIOB_ECANCELED);

  aiob_task_release(hx);
  aiob_task_release(hy);
  free(x);
  wk_free(y);
  assert_clean();
}

/* ======================================================================== */
/* cancel_pending: cancelling a task armed on a sleep or an fd wait drops it
 * promptly and disarms the leaf.                                            */

static void test_cancel_pending(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);

  /* An armed 10 s sleep. */
  sl_task *s = xcalloc(1, sizeof *s);
  s->dur = 10 * AIOB_SEC;
  s->pending = pending;
  aiob_task *hs = spawn_h(rt, &sl_vt, s);
  latch_ok(pending, 1);
  uint64_t t0 = aiob_now_ns();
  aiob_task_cancel(hs);
  wait_ok(hs);
  uint64_t took = aiob_now_ns() - t0;
  if (took >= 5 * AIOB_SEC)
    fail_msg("cancelled sleep took %llu ms to drop",
             (unsigned long long)(took / AIOB_MSEC));
  assert_int_equal(polls_of(s), 1);
  assert_int_equal(drops_of(s), 1);
  assert_status(hs, AIOB_ECANCELED);
  aiob_task_release(hs);

  /* An armed fd wait; afterwards the fd is written and closed. */
  int p1[2];
  assert_int_equal(pipe_nb(p1), 0);
  io_task *r = xcalloc(1, sizeof *r);
  io_task_init(r, p1[0], AIOB_READABLE, pending);
  aiob_task *hr = spawn_h(rt, &io_vt, r);
  latch_ok(pending, 2);
  aiob_task_cancel(hr);
  wait_ok(hr);
  assert_int_equal(polls_of(r), 1);
  assert_int_equal(drops_of(r), 1);
  assert_status(hr, AIOB_ECANCELED);
  aiob_task_release(hr);
  assert_int_equal(write(p1[1], "x", 1), 1);
  close(p1[0]);
  close(p1[1]);

  /* The loop keeps running fine: a short sleep iterates it. */
  sl_task *s2 = xcalloc(1, sizeof *s2);
  s2->dur = 20 * AIOB_MSEC;
  aiob_task *hs2 = spawn_h(rt, &sl_vt, s2);
  wait_ok(hs2);
  assert_int_equal(atomic_load(&s2->status), 0);
  aiob_task_release(hs2);

  /* Two waiters on one fd: cancelling one keeps the other armed. The new
   * pipe likely reuses the closed fd numbers. */
  int p2[2];
  assert_int_equal(pipe_nb(p2), 0);
  io_task *w1 = xcalloc(1, sizeof *w1);
  io_task *w2 = xcalloc(1, sizeof *w2);
  io_task_init(w1, p2[0], AIOB_READABLE, pending);
  io_task_init(w2, p2[0], AIOB_READABLE, pending);
  aiob_task *hw1 = spawn_h(rt, &io_vt, w1);
  aiob_task *hw2 = spawn_h(rt, &io_vt, w2);
  latch_ok(pending, 4);
  aiob_task_cancel(hw1);
  wait_ok(hw1);
  assert_false(aiob_task_is_finished(hw2));
  assert_int_equal(write(p2[1], "y", 1), 1);
  wait_ok(hw2);
  assert_status(hw1, AIOB_ECANCELED);
  assert_status(hw2, 0);
  assert_true(atomic_load(&w2->result) & AIOB_READABLE);
  assert_int_equal(drops_of(w1), 1);
  assert_int_equal(drops_of(w2), 1);
  aiob_task_release(hw1);
  aiob_task_release(hw2);
  close(p2[0]);
  close(p2[1]);

  latch_destroy(pending);
  free(pending);
  free(s);
  free(s2);
  free(r);
  free(w1);
  free(w2);
  assert_clean();
}

/* ======================================================================== */
/* cancel_after_completion: cancelling a finished task changes nothing.      */

static void test_cancel_after_completion(void **state) {
  aiob_runtime *rt = RT(state);
  long frees0 = latch_get(&g_frees);

  sl_task *k = xcalloc(1, sizeof *k);
  k->value = malloc(sizeof(int));
  assert_non_null(k->value);
  *(int *)k->value = 7;
  aiob_task *h = spawn_h(rt, &sl_vt, k);
  wait_ok(h);
  int polls = polls_of(k);
  aiob_task_cancel(h);
  aiob_task_cancel(h);
  assert_true(aiob_task_is_finished(h));
  assert_int_equal(polls_of(k), polls);
  assert_int_equal(drops_of(k), 1);
  aiob_output out = {0};
  assert_rc(aiob_task_take_output(h, &out), 0);
  assert_rc(out.status, 0);
  assert_non_null(out.value);
  assert_int_equal(*(int *)out.value, 7);
  assert_ptr_equal(out.free_value, count_free);
  aiob_output_clear(&out);
  assert_null(out.value);
  assert_int_equal(latch_get(&g_frees), frees0 + 1);
  assert_rc(aiob_task_take_output(h, &out), AIOB_EALREADY);
  assert_rc(out.status, 0);
  assert_null(out.value);
  aiob_task_cancel(h);
  assert_int_equal(drops_of(k), 1);
  aiob_task_release(h);

  /* An untaken value is freed when the last reference goes. */
  sl_task *k2 = xcalloc(1, sizeof *k2);
  k2->value = malloc(sizeof(int));
  assert_non_null(k2->value);
  aiob_task *h2 = spawn_h(rt, &sl_vt, k2);
  wait_ok(h2);
  aiob_task_cancel(h2);
  aiob_task_release(h2);
  latch_ok(&g_frees, frees0 + 2);

  free(k);
  free(k2);
  assert_clean();
}

/* ======================================================================== */
/* cancel_from_inside: a task cancelling itself in poll.                     */

typedef struct cfi_task {
  tbase b;
  int ready_anyway;
} cfi_task;

static aiob_poll cfi_poll(aiob_task *t, void *p) {
  cfi_task *k = p;
  poll_enter(k);
  aiob_task_cancel(t);
  if (!k->ready_anyway)
    return AIOB_PENDING;
  aiob_task_return(t, new_int(5), count_free);
  return AIOB_READY;
}
static const aiob_task_vtable cfi_vt = {.poll = cfi_poll, .drop = drop_count};

static void test_cancel_from_inside(void **state) {
  aiob_runtime *rt = RT(state);
  cfi_task *a = xcalloc(1, sizeof *a);
  cfi_task *b = xcalloc(1, sizeof *b);
  b->ready_anyway = 1;

  aiob_task *ha = spawn_h(rt, &cfi_vt, a);
  wait_ok(ha);
  assert_int_equal(polls_of(a), 1);
  assert_int_equal(drops_of(a), 1);
  assert_status(ha, AIOB_ECANCELED);

  /* READY from the poll in progress wins over the cancel. */
  aiob_task *hb = spawn_h(rt, &cfi_vt, b);
  wait_ok(hb);
  assert_int_equal(polls_of(b), 1);
  assert_int_equal(drops_of(b), 1);
  aiob_output out = {0};
  assert_rc(aiob_task_take_output(hb, &out), 0);
  assert_rc(out.status, 0);
  assert_non_null(out.value);
  assert_int_equal(*(int *)out.value, 5);
  aiob_output_clear(&out);

  aiob_task_release(ha);
  aiob_task_release(hb);
  free(a);
  free(b);
  assert_clean();
}

/* ======================================================================== */
/* promise_other_thread: a pthread completes a promise a task awaits.        */

typedef struct pot_arg {
  aiob_promise *p;
  latch *pending;
  int rc;
} pot_arg;

static void *pot_thread(void *p) {
  pot_arg *a = p;
  if (latch_wait(a->pending, 1, WAIT_TIMEOUT) != 0) {
    check_failed(__FILE__, __LINE__, "waiter never pending");
    a->rc = aiob_promise_abandon(a->p);
    return NULL;
  }
  int *v = malloc(sizeof *v);
  if (!v) {
    a->rc = aiob_promise_abandon(a->p);
    return NULL;
  }
  *v = 1234;
  a->rc = aiob_promise_complete(a->p, 0, v, free);
  return NULL;
}

static void test_promise_other_thread(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);

  aiob_promise *p = NULL;
  assert_rc(aiob_promise_new(&p), 0);
  assert_non_null(p);
  pw_task *k = xcalloc(1, sizeof *k);
  pw_init(k, p, 1, pending);
  aiob_task *h = spawn_h(rt, &pw_vt, k);
  latch_ok(pending, 1);

  /* A second waiter on the same promise gets EBUSY at once. */
  pw_task *k2 = xcalloc(1, sizeof *k2);
  pw_init(k2, p, 0, NULL);
  aiob_task *h2 = spawn_h(rt, &pw_vt, k2);
  wait_ok(h2);
  assert_rc(atomic_load(&k2->status), AIOB_EBUSY);
  assert_int_equal(polls_of(k2), 1);
  aiob_task_release(h2);

  pot_arg arg = {.p = p, .pending = pending, .rc = 1};
  pthread_t th = start_thread(pot_thread, &arg);
  wait_ok(h);
  pthread_join(th, NULL);
  assert_rc(arg.rc, 0);
  assert_rc(atomic_load(&k->status), 0);
  assert_int_equal(atomic_load(&k->value), 1234);
  assert_int_equal(polls_of(k), 2);
  assert_int_equal(drops_of(k), 1);
  aiob_task_release(h);

  /* Completed before the first poll, with an error status and a value. */
  aiob_promise *q = NULL;
  assert_rc(aiob_promise_new(&q), 0);
  assert_rc(aiob_promise_complete(q, AIOB_EIO, new_int(9), free), 0);
  pw_task *k3 = xcalloc(1, sizeof *k3);
  pw_init(k3, q, 1, NULL);
  aiob_task *h3 = spawn_h(rt, &pw_vt, k3);
  wait_ok(h3);
  assert_rc(atomic_load(&k3->status), AIOB_EIO);
  assert_int_equal(atomic_load(&k3->value), 9);
  assert_int_equal(polls_of(k3), 1);
  aiob_task_release(h3);

  latch_destroy(pending);
  free(pending);
  free(k);
  free(k2);
  free(k3);
  assert_clean();
}

/* ======================================================================== */
/* promise_abandon: an abandoned promise wakes its waiter with ECANCELED.    */

static void test_promise_abandon(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);
  long frees0 = latch_get(&g_frees);

  /* The test keeps the waiter side so the promise outlives the task. */
  aiob_promise *p = NULL;
  assert_rc(aiob_promise_new(&p), 0);
  pw_task *k = xcalloc(1, sizeof *k);
  pw_init(k, p, 0, pending);
  aiob_task *h = spawn_h(rt, &pw_vt, k);
  latch_ok(pending, 1);
  assert_rc(aiob_promise_abandon(p), 0);
  wait_ok(h);
  assert_rc(atomic_load(&k->status), AIOB_ECANCELED);
  assert_int_equal(atomic_load(&k->value), -1);
  assert_int_equal(drops_of(k), 1);
  aiob_task_release(h);

  int *v = malloc(sizeof *v);
  assert_non_null(v);
  assert_rc(aiob_promise_complete(p, 0, v, count_free), AIOB_EALREADY);
  assert_int_equal(latch_get(&g_frees), frees0); /* value not touched */
  free(v);
  assert_rc(aiob_promise_abandon(p), AIOB_EALREADY);
  aiob_promise_release(p);

  /* Abandoned before the first poll: READY at once. */
  aiob_promise *q = NULL;
  assert_rc(aiob_promise_new(&q), 0);
  assert_rc(aiob_promise_abandon(q), 0);
  pw_task *k2 = xcalloc(1, sizeof *k2);
  pw_init(k2, q, 1, NULL);
  aiob_task *h2 = spawn_h(rt, &pw_vt, k2);
  wait_ok(h2);
  assert_rc(atomic_load(&k2->status), AIOB_ECANCELED);
  assert_int_equal(polls_of(k2), 1);
  aiob_task_release(h2);

  latch_destroy(pending);
  free(pending);
  free(k);
  free(k2);
  assert_clean();
}

/* ======================================================================== */
/* promise_value_freed_when_waiter_gone: no value is ever leaked.            */

static void test_promise_value_freed_when_waiter_gone(void **state) {
  aiob_runtime *rt = RT(state);
  long f0 = latch_get(&g_frees);

  /* Waiter released first: complete frees the value right there. */
  aiob_promise *p = NULL;
  assert_rc(aiob_promise_new(&p), 0);
  aiob_promise_release(p);
  assert_rc(aiob_promise_complete(p, 0, new_int(1), count_free), 0);
  assert_int_equal(latch_get(&g_frees), f0 + 1);

  /* Completed first, never polled: releasing the waiter frees the value. */
  assert_rc(aiob_promise_new(&p), 0);
  assert_rc(aiob_promise_complete(p, 0, new_int(2), count_free), 0);
  assert_int_equal(latch_get(&g_frees), f0 + 1);
  aiob_promise_release(p);
  assert_int_equal(latch_get(&g_frees), f0 + 2);

  /* The waiting task is cancelled (its drop releases the waiter side),
   * then the completer comes. */
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);
  assert_rc(aiob_promise_new(&p), 0);
  pw_task *k = xcalloc(1, sizeof *k);
  pw_init(k, p, 1, pending);
  aiob_task *h = spawn_h(rt, &pw_vt, k);
  latch_ok(pending, 1);
  aiob_task_cancel(h);
  wait_ok(h);
  assert_int_equal(drops_of(k), 1);
  assert_rc(aiob_promise_complete(p, 0, new_int(3), count_free), 0);
  assert_int_equal(latch_get(&g_frees), f0 + 3);
  aiob_task_release(h);

  /* Taken by the waiter: freed once, by aiob_output_clear in the task. */
  assert_rc(aiob_promise_new(&p), 0);
  pw_task *k2 = xcalloc(1, sizeof *k2);
  pw_init(k2, p, 1, pending);
  aiob_task *h2 = spawn_h(rt, &pw_vt, k2);
  latch_ok(pending, 2);
  assert_rc(aiob_promise_complete(p, 0, new_int(4), count_free), 0);
  wait_ok(h2);
  assert_int_equal(atomic_load(&k2->value), 4);
  assert_int_equal(latch_get(&g_frees), f0 + 4);
  aiob_task_release(h2);

  latch_destroy(pending);
  free(pending);
  free(k);
  free(k2);
  assert_clean();
}

/* ======================================================================== */
/* join: a task awaits another task's output.                                */

typedef struct jn_task {
  tbase b;
  aiob_task *target;
  latch *pending;
  atomic_int saw_pending;
  atomic_int join_status;
  atomic_int take_rc, take_status, value;
  atomic_int take2_rc, take2_value_null;
} jn_task;

static aiob_poll jn_poll(aiob_task *t, void *p) {
  jn_task *j = p;
  poll_enter(j);
  int st = 1;
  if (aiob_task_join(t, j->target, &st) == AIOB_PENDING) {
    if (!atomic_exchange(&j->saw_pending, 1) && j->pending)
      latch_add(j->pending, 1);
    return AIOB_PENDING;
  }
  atomic_store(&j->join_status, st);
  if (st == AIOB_EBUSY)
    return AIOB_READY; /* not ours to take */
  aiob_output out = {0};
  atomic_store(&j->take_rc, aiob_task_take_output(j->target, &out));
  atomic_store(&j->take_status, out.status);
  atomic_store(&j->value, out.value ? *(int *)out.value : -1);
  aiob_output_clear(&out);
  out = (aiob_output){.value = &out};
  atomic_store(&j->take2_rc, aiob_task_take_output(j->target, &out));
  atomic_store(&j->take2_value_null, out.value == NULL);
  return AIOB_READY;
}
static const aiob_task_vtable jn_vt = {.poll = jn_poll, .drop = drop_count};

static jn_task *jn_new(aiob_task *target, latch *pending) {
  jn_task *j = xcalloc(1, sizeof *j);
  j->target = target;
  j->pending = pending;
  atomic_store(&j->join_status, 12345);
  atomic_store(&j->take_rc, 12345);
  atomic_store(&j->take2_rc, 12345);
  return j;
}

typedef struct fail_task {
  tbase b;
  int err;
} fail_task;

static aiob_poll fail_poll(aiob_task *t, void *p) {
  fail_task *f = p;
  poll_enter(f);
  aiob_task_fail(t, f->err);
  /* A value set after the status (an error detail) keeps the status. */
  aiob_task_return(t, new_int(9), count_free);
  return AIOB_READY;
}
static const aiob_task_vtable fail_vt = {.poll = fail_poll, .drop = drop_count};

static void test_join(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);

  /* K returns 42 after 100 ms on loop 1; J joins from loop 0. Loop 1 is
   * held until J waits, so J finds K unfinished however slow the machine. */
  latch *j_pending = xcalloc(1, sizeof *j_pending);
  latch_init(j_pending);
  aiob_task *hg;
  gate *g = gate_close(rt, 1, NULL, NULL, &hg);
  sl_task *k = xcalloc(1, sizeof *k);
  k->dur = 100 * AIOB_MSEC;
  k->value = new_int(42);
  aiob_task *hk = spawn_on(rt, 1, &sl_vt, k);
  assert_rc(aiob_task_take_output(hk, &(aiob_output){0}), AIOB_EAGAIN);
  jn_task *j = jn_new(aiob_task_ref(hk), j_pending);
  aiob_task *hj = spawn_on(rt, 0, &jn_vt, j);
  latch_ok(j_pending, 1);
  gate_open(g);
  gate_finish(g, hg);
  wait_ok(hj);
  wait_ok(hk);
  assert_true(atomic_load(&j->saw_pending));
  assert_rc(atomic_load(&j->join_status), 0);
  assert_rc(atomic_load(&j->take_rc), 0);
  assert_rc(atomic_load(&j->take_status), 0);
  assert_int_equal(atomic_load(&j->value), 42);
  assert_rc(atomic_load(&j->take2_rc), AIOB_EALREADY);
  assert_true(atomic_load(&j->take2_value_null));
  aiob_task_release(j->target);
  aiob_task_release(hk);
  aiob_task_release(hj);

  /* Joining a task that gets cancelled. */
  tbase *k2 = xcalloc(1, sizeof *k2);
  aiob_task *hk2 = spawn_on(rt, 1, &pend_vt, k2);
  jn_task *j2 = jn_new(hk2, pending);
  aiob_task *hj2 = spawn_on(rt, 0, &jn_vt, j2);
  latch_ok(pending, 1);
  assert_false(aiob_task_is_finished(hk2));
  assert_rc(aiob_task_take_output(hk2, &(aiob_output){0}), AIOB_EAGAIN);
  aiob_task_cancel(hk2);
  wait_ok(hj2);
  assert_rc(atomic_load(&j2->join_status), AIOB_ECANCELED);
  assert_rc(atomic_load(&j2->take_rc), 0);
  assert_rc(atomic_load(&j2->take_status), AIOB_ECANCELED);
  assert_int_equal(atomic_load(&j2->value), -1);
  wait_ok(hk2);

  /* aiob_task_fail propagates its status. */
  fail_task *k3 = xcalloc(1, sizeof *k3);
  k3->err = AIOB_EIO;
  aiob_task *hk3 = spawn_on(rt, 1, &fail_vt, k3);
  jn_task *j3 = jn_new(hk3, NULL);
  aiob_task *hj3 = spawn_on(rt, 0, &jn_vt, j3);
  wait_ok(hj3);
  assert_rc(atomic_load(&j3->join_status), AIOB_EIO);
  assert_rc(atomic_load(&j3->take_rc), 0);
  assert_rc(atomic_load(&j3->take_status), AIOB_EIO);
  assert_int_equal(atomic_load(&j3->value), 9);

  /* Joining an already finished task: READY at first poll; its output was
   * taken already. */
  wait_ok(hk3);
  jn_task *j5 = jn_new(hk3, NULL);
  aiob_task *hj5 = spawn_on(rt, 1, &jn_vt, j5);
  wait_ok(hj5);
  assert_int_equal(polls_of(j5), 1);
  assert_rc(atomic_load(&j5->join_status), AIOB_EIO);
  assert_rc(atomic_load(&j5->take_rc), AIOB_EALREADY);
  assert_rc(atomic_load(&j5->take_status), AIOB_EIO);

  /* A second joiner on the same target gets EBUSY. */
  tbase *k4 = xcalloc(1, sizeof *k4);
  aiob_task *hk4 = spawn_on(rt, 1, &pend_vt, k4);
  jn_task *j4a = jn_new(hk4, pending);
  aiob_task *hj4a = spawn_on(rt, 0, &jn_vt, j4a);
  latch_ok(pending, 2);
  jn_task *j4b = jn_new(hk4, NULL);
  aiob_task *hj4b = spawn_on(rt, 0, &jn_vt, j4b);
  wait_ok(hj4b);
  assert_rc(atomic_load(&j4b->join_status), AIOB_EBUSY);
  assert_false(aiob_task_is_finished(hj4a));
  aiob_task_cancel(hk4);
  wait_ok(hj4a);
  assert_rc(atomic_load(&j4a->join_status), AIOB_ECANCELED);

  aiob_task *all[] = {hk2, hj2, hk3, hj3, hj5, hk4, hj4a, hj4b};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
    wait_ok(all[i]);
    aiob_task_release(all[i]);
  }
  assert_int_equal(drops_of(k), 1);
  assert_int_equal(drops_of(k2), 1);
  assert_int_equal(drops_of(k3), 1);
  assert_int_equal(drops_of(k4), 1);
  latch_destroy(pending);
  free(pending);
  latch_destroy(j_pending);
  free(j_pending);
  free(k);
  free(k2);
  free(k3);
  free(k4);
  free(j);
  free(j2);
  free(j3);
  free(j4a);
  free(j4b);
  free(j5);
  assert_clean();
}

/* ======================================================================== */
/* task_locals_inherited: children get clones, no_inherit and opts.locals
 * work, and every value is destroyed exactly once on a loop thread.        */

typedef struct lval {
  int tag;
  int gen; /* number of clones from the original */
} lval;

static atomic_int g_lv_clones, g_lv_destroys, g_lv_sets, g_lv_off_loop;
static _Atomic(aiob_runtime *) g_lv_rt;
static aiob_local_key g_k1, g_k2; /* k1 inherited, k2 not (no clone) */

static lval *lval_new(int tag) {
  lval *v = malloc(sizeof *v);
  CHECK(v != NULL);
  if (v)
    *v = (lval){.tag = tag, .gen = 0};
  return v;
}

static void *lval_clone(void *p) {
  const lval *v = p;
  lval *c = malloc(sizeof *c);
  CHECK(c != NULL);
  if (!c)
    return NULL;
  *c = (lval){.tag = v->tag, .gen = v->gen + 1};
  atomic_fetch_add(&g_lv_clones, 1);
  return c;
}

static void lval_destroy(void *p) {
  if (!p)
    return;
  aiob_runtime *rt = atomic_load(&g_lv_rt);
  if (rt && aiob_runtime_current_loop(rt) < 0)
    atomic_fetch_add(&g_lv_off_loop, 1);
  atomic_fetch_add(&g_lv_destroys, 1);
  free(p);
}

enum { LC_C, LC_G, LC_N, LC_L, LC_O, LC_M, LC_NKIDS };

typedef struct lc_ctx lc_ctx;

typedef struct lc_kid {
  tbase b;
  lc_ctx *ctx;
  int role;
  atomic_int k1_tag, k1_gen, k2_null;
  _Atomic(lval *) k1_ptr;
} lc_kid;

typedef struct lc_parent {
  tbase b;
  lc_ctx *ctx;
} lc_parent;

struct lc_ctx {
  aiob_runtime *rt;
  lc_parent parent;
  lc_kid kids[LC_NKIDS];
  _Atomic(aiob_task *) h[LC_NKIDS];
  _Atomic(lval *) l_value, m_value;
};

static const aiob_task_vtable lc_kid_vt;

static aiob_poll lc_kid_poll(aiob_task *t, void *p) {
  lc_kid *k = p;
  poll_enter(k);
  lval *v = aiob_task_local_get(t, g_k1);
  atomic_store(&k->k1_ptr, v);
  atomic_store(&k->k1_tag, v ? v->tag : -1);
  atomic_store(&k->k1_gen, v ? v->gen : -1);
  atomic_store(&k->k2_null, aiob_task_local_get(t, g_k2) == NULL);
  if (k->role == LC_C) {
    aiob_task *h = NULL;
    lc_kid *g = &k->ctx->kids[LC_G];
    CHECK_INT(aiob_spawn(k->ctx->rt, &lc_kid_vt, g, &h), ==, 0);
    atomic_store(&k->ctx->h[LC_G], h);
  }
  return AIOB_READY;
}
static const aiob_task_vtable lc_kid_vt = {.poll = lc_kid_poll,
                                           .drop = drop_count};

static void lc_set(aiob_task *t, aiob_local_key key, lval *v) {
  int rc = aiob_task_local_set(t, key, v);
  CHECK_INT(rc, ==, 0);
  if (rc == 0)
    atomic_fetch_add(&g_lv_sets, 1);
  else
    free(v);
}

static aiob_poll lc_parent_poll(aiob_task *t, void *p) {
  lc_parent *pp = p;
  lc_ctx *c = pp->ctx;
  poll_enter(pp);
  /* Spawned from a plain thread without opts.locals: nothing set. */
  CHECK(aiob_task_local_get(t, g_k1) == NULL);
  CHECK(aiob_task_local_get(t, g_k2) == NULL);

  lval *v = lval_new(7);
  lc_set(t, g_k1, v);
  CHECK(aiob_task_local_get(t, g_k1) == v);
  lval *v2 = lval_new(8); /* replaces (destroys) v */
  lc_set(t, g_k1, v2);
  CHECK(aiob_task_local_get(t, g_k1) == v2);
  lc_set(t, g_k2, lval_new(70));

  /* A bad key: not stored, not destroyed. */
  lval bogus = {0};
  CHECK_INT(aiob_task_local_set(t, AIOB_LOCAL_KEYS_MAX + 3, &bogus), ==,
            AIOB_EINVAL);
  CHECK(aiob_task_local_get(t, AIOB_LOCAL_KEYS_MAX + 3) == NULL);

  aiob_task *h = NULL;
  CHECK_INT(aiob_spawn(c->rt, &lc_kid_vt, &c->kids[LC_C], &h), ==, 0);
  atomic_store(&c->h[LC_C], h);

  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.no_inherit = 1;
  h = NULL;
  CHECK_INT(aiob_spawn_ex(c->rt, &o, &lc_kid_vt, &c->kids[LC_N], &h), ==, 0);
  atomic_store(&c->h[LC_N], h);

  lval *lv = lval_new(9);
  aiob_local_init li = {.key = g_k1, .value = lv};
  aiob_spawn_opts_init(&o);
  o.locals = &li;
  o.nlocals = 1;
  h = NULL;
  int rc = aiob_spawn_ex(c->rt, &o, &lc_kid_vt, &c->kids[LC_L], &h);
  CHECK_INT(rc, ==, 0);
  if (rc == 0) {
    atomic_fetch_add(&g_lv_sets, 1);
    atomic_store(&c->l_value, lv);
  } else {
    free(lv);
  }
  atomic_store(&c->h[LC_L], h);

  aiob_spawn_opts_init(&o);
  o.loop = 1 - aiob_runtime_current_loop(c->rt);
  h = NULL;
  CHECK_INT(aiob_spawn_ex(c->rt, &o, &lc_kid_vt, &c->kids[LC_O], &h), ==, 0);
  atomic_store(&c->h[LC_O], h);
  return AIOB_READY;
}
static const aiob_task_vtable lc_parent_vt = {.poll = lc_parent_poll,
                                              .drop = drop_count};

static void test_task_locals_inherited(void **state) {
  aiob_runtime *rt = RT(state);
  static int keys_made;
  if (!keys_made) {
    assert_rc(aiob_local_key_create(&g_k1, lval_clone, lval_destroy), 0);
    assert_rc(aiob_local_key_create(&g_k2, NULL, lval_destroy), 0);
    assert_int_not_equal(g_k1, g_k2);
    keys_made = 1;
  }
  atomic_store(&g_lv_clones, 0);
  atomic_store(&g_lv_destroys, 0);
  atomic_store(&g_lv_sets, 0);
  atomic_store(&g_lv_off_loop, 0);
  atomic_store(&g_lv_rt, rt);

  lc_ctx *c = xcalloc(1, sizeof *c);
  c->rt = rt;
  c->parent.ctx = c;
  for (int i = 0; i < LC_NKIDS; i++) {
    c->kids[i].ctx = c;
    c->kids[i].role = i;
  }

  /* A failed spawn leaves the initial locals with the caller. */
  lval *lf = lval_new(13);
  aiob_local_init lfi = {.key = g_k1, .value = lf};
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.locals = &lfi;
  o.nlocals = 1;
  static const aiob_task_vtable no_poll_vt = {.poll = NULL, .drop = drop_count};
  tbase dummy = {0};
  assert_rc(aiob_spawn_ex(rt, &o, &no_poll_vt, &dummy, NULL), AIOB_EINVAL);
  assert_int_equal(atomic_load(&g_lv_destroys), 0);
  assert_int_equal(drops_of(&dummy), 0);
  free(lf);

  /* opts.locals from a thread that is not a task. */
  lval *lm = lval_new(11);
  aiob_local_init lmi = {.key = g_k1, .value = lm};
  o.locals = &lmi;
  aiob_task *hm = NULL;
  assert_rc(aiob_spawn_ex(rt, &o, &lc_kid_vt, &c->kids[LC_M], &hm), 0);
  atomic_fetch_add(&g_lv_sets, 1);
  atomic_store(&c->m_value, lm);
  atomic_store(&c->h[LC_M], hm);

  aiob_task *hp = spawn_h(rt, &lc_parent_vt, &c->parent);
  wait_ok(hp);
  wait_ok(atomic_load(&c->h[LC_C])); /* C spawns G */
  for (int i = 0; i < LC_NKIDS; i++)
    wait_ok(atomic_load(&c->h[i]));
  assert_clean();

  struct {
    int tag, gen;
  } want[LC_NKIDS] = {
      [LC_C] = {8, 1}, [LC_G] = {8, 2}, [LC_N] = {-1, -1},
      [LC_L] = {9, 0}, [LC_O] = {8, 1}, [LC_M] = {11, 0},
  };
  static const char *names[LC_NKIDS] = {"child",      "grandchild",
                                        "no_inherit", "opts.locals",
                                        "other loop", "from main"};
  for (int i = 0; i < LC_NKIDS; i++) {
    lc_kid *k = &c->kids[i];
    if (atomic_load(&k->k1_tag) != want[i].tag ||
        atomic_load(&k->k1_gen) != want[i].gen)
      fail_msg("%s saw tag %d gen %d, want tag %d gen %d", names[i],
               atomic_load(&k->k1_tag), atomic_load(&k->k1_gen), want[i].tag,
               want[i].gen);
    if (!atomic_load(&k->k2_null))
      fail_msg("%s inherited a key without clone", names[i]);
    assert_int_equal(polls_of(k), 1);
    assert_int_equal(drops_of(k), 1);
  }
  assert_ptr_equal(atomic_load(&c->kids[LC_L].k1_ptr),
                   atomic_load(&c->l_value));
  assert_ptr_equal(atomic_load(&c->kids[LC_M].k1_ptr),
                   atomic_load(&c->m_value));

  aiob_task_release(hp);
  for (int i = 0; i < LC_NKIDS; i++)
    aiob_task_release(atomic_load(&c->h[i]));
  /* After shutdown every task is gone: every value was destroyed once. */
  assert_rc(aiob_runtime_shutdown(rt), 0);
  int clones = atomic_load(&g_lv_clones), sets = atomic_load(&g_lv_sets);
  int destroys = atomic_load(&g_lv_destroys);
  if (destroys != clones + sets)
    fail_msg("%d destroys for %d clones + %d values set", destroys, clones,
             sets);
  assert_true(clones >= 3); /* C, G, O (L's clone may be skipped) */
  assert_int_equal(atomic_load(&g_lv_off_loop), 0);
  atomic_store(&g_lv_rt, NULL);
  free(c);
  assert_clean();
}

/* ======================================================================== */
/* fd_readiness: aiob_io_wait on pipes and sockets.                          */

static void drain_fd(int fd) {
  char buf[256];
  while (read(fd, buf, sizeof buf) > 0)
    ;
}

typedef struct wr_arg {
  int fd;
  ssize_t rc;
} wr_arg;

static void *writer_thread(void *p) {
  wr_arg *a = p;
  a->rc = write(a->fd, "w", 1);
  return NULL;
}

/* Waits readable, reads the byte, waits readable again. */
typedef struct ra_task {
  tbase b;
  int fd;
  latch *pending;
  int phase, signalled;
  aiob_io_wait w;
  atomic_int r1, r2;
} ra_task;

static aiob_poll ra_poll(aiob_task *t, void *p) {
  ra_task *k = p;
  poll_enter(k);
  int res = 0;
  if (k->phase == 0) {
    aiob_io_wait_init(&k->w, k->fd, AIOB_READABLE);
    k->phase = 1;
  }
  if (k->phase == 1) {
    if (aiob_io_wait_poll(t, &k->w, &res) == AIOB_PENDING) {
      if (k->signalled < 1) {
        k->signalled = 1;
        latch_add(k->pending, 1);
      }
      return AIOB_PENDING;
    }
    atomic_store(&k->r1, res);
    char c;
    CHECK(read(k->fd, &c, 1) == 1);
    aiob_io_wait_init(&k->w, k->fd, AIOB_READABLE);
    k->phase = 2;
  }
  if (aiob_io_wait_poll(t, &k->w, &res) == AIOB_PENDING) {
    if (k->signalled < 2) {
      k->signalled = 2;
      latch_add(k->pending, 1);
    }
    return AIOB_PENDING;
  }
  atomic_store(&k->r2, res);
  return AIOB_READY;
}
static const aiob_task_vtable ra_vt = {.poll = ra_poll, .drop = drop_count};

static void test_fd_readiness(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);
  long np = 0;
  io_task *k = xcalloc(12, sizeof *k);
  aiob_task *h[12];

  /* 1. Readable once another thread writes. */
  int a[2];
  assert_int_equal(pipe_nb(a), 0);
  io_task_init(&k[0], a[0], AIOB_READABLE, pending);
  h[0] = spawn_on(rt, 0, &io_vt, &k[0]);
  latch_ok(pending, ++np);
  wr_arg wa = {.fd = a[1]};
  pthread_t th = start_thread(writer_thread, &wa);
  wait_ok(h[0]);
  pthread_join(th, NULL);
  assert_int_equal(wa.rc, 1);
  assert_true(atomic_load(&k[0].result) > 0);
  assert_true(atomic_load(&k[0].result) & AIOB_READABLE);
  assert_int_equal(polls_of(&k[0]), 2);

  /* 2. The write end of a nearly empty pipe is writable at once. */
  io_task_init(&k[1], a[1], AIOB_WRITABLE, NULL);
  h[1] = spawn_on(rt, 1, &io_vt, &k[1]);
  wait_ok(h[1]);
  assert_true(atomic_load(&k[1].result) > 0);
  assert_true(atomic_load(&k[1].result) & AIOB_WRITABLE);

  /* 3. Several waiters on one fd, on one loop and on another. */
  int b[2];
  assert_int_equal(pipe_nb(b), 0);
  for (int i = 2; i < 5; i++) {
    io_task_init(&k[i], b[0], AIOB_READABLE, pending);
    h[i] = spawn_on(rt, i == 4 ? 1 : 0, &io_vt, &k[i]);
  }
  np += 3;
  latch_ok(pending, np);
  assert_int_equal(write(b[1], "b", 1), 1);
  for (int i = 2; i < 5; i++) {
    wait_ok(h[i]);
    if (!(atomic_load(&k[i].result) > 0 &&
          (atomic_load(&k[i].result) & AIOB_READABLE)))
      fail_msg("waiter %d got %d", i, atomic_load(&k[i].result));
  }

  /* 4. Argument errors are READY at once with a negative result. */
  io_task_init(&k[5], -1, AIOB_READABLE, NULL);
  h[5] = spawn_h(rt, &io_vt, &k[5]);
  io_task_init(&k[6], b[0], 0, NULL);
  h[6] = spawn_h(rt, &io_vt, &k[6]);
  wait_ok(h[5]);
  wait_ok(h[6]);
  assert_rc(atomic_load(&k[5].result), AIOB_EBADF);
  assert_rc(atomic_load(&k[6].result), AIOB_EINVAL);
  assert_int_equal(polls_of(&k[5]), 1);
  assert_int_equal(polls_of(&k[6]), 1);

  /* 5. Hang-up: the write end closes. */
  int c[2];
  assert_int_equal(pipe_nb(c), 0);
  io_task_init(&k[7], c[0], AIOB_READABLE, pending);
  h[7] = spawn_on(rt, 1, &io_vt, &k[7]);
  latch_ok(pending, ++np);
  close(c[1]);
  wait_ok(h[7]);
  int r7 = atomic_load(&k[7].result);
  if (!(r7 > 0 && (r7 & (AIOB_READABLE | AIOB_IO_ERROR))))
    fail_msg("hang-up reported as %d", r7);
  close(c[0]);

  /* 6. One task waits on the same fd twice in a row. */
  drain_fd(a[0]);
  ra_task *ra = xcalloc(1, sizeof *ra);
  ra->fd = a[0];
  ra->pending = pending;
  aiob_task *hra = spawn_on(rt, 0, &ra_vt, ra);
  latch_ok(pending, ++np);
  assert_int_equal(write(a[1], "1", 1), 1);
  latch_ok(pending, ++np);
  assert_int_equal(write(a[1], "2", 1), 1);
  wait_ok(hra);
  assert_true(atomic_load(&ra->r1) & AIOB_READABLE);
  assert_true(atomic_load(&ra->r2) & AIOB_READABLE);

  /* 7. Readable|writable on an idle socket: writable only. */
  int sp[2];
  assert_int_equal(
      socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp),
      0);
  io_task_init(&k[8], sp[0], AIOB_READABLE | AIOB_WRITABLE, NULL);
  h[8] = spawn_h(rt, &io_vt, &k[8]);
  wait_ok(h[8]);
  int r8 = atomic_load(&k[8].result);
  if (!(r8 > 0 && (r8 & AIOB_WRITABLE) && !(r8 & AIOB_READABLE)))
    fail_msg("idle socket reported as %d", r8);
  /* ... and readable once the peer writes. */
  io_task_init(&k[9], sp[0], AIOB_READABLE, pending);
  h[9] = spawn_h(rt, &io_vt, &k[9]);
  latch_ok(pending, ++np);
  assert_int_equal(write(sp[1], "s", 1), 1);
  wait_ok(h[9]);
  assert_true(atomic_load(&k[9].result) & AIOB_READABLE);

  for (int i = 0; i < 10; i++) {
    assert_int_equal(drops_of(&k[i]), 1);
    aiob_task_release(h[i]);
  }
  aiob_task_release(hra);
  close(a[0]);
  close(a[1]);
  close(b[0]);
  close(b[1]);
  close(sp[0]);
  close(sp[1]);
  latch_destroy(pending);
  free(pending);
  free(ra);
  free(k);
  assert_clean();
}

/* ======================================================================== */
/* shutdown_with_pending: shutdown drops everything exactly once, promptly.  */

typedef struct call_ctx {
  aiob_runtime *rt;
  atomic_int calls, loop, status;
  latch done;
} call_ctx;

static void call_fn(void *arg, int status) {
  call_ctx *c = arg;
  atomic_store(&c->loop, aiob_runtime_current_loop(c->rt));
  atomic_store(&c->status, status);
  atomic_fetch_add(&c->calls, 1);
  latch_add(&c->done, 1);
}

static void call_ctx_init(call_ctx *c, aiob_runtime *rt) {
  memset(c, 0, sizeof *c);
  c->rt = rt;
  atomic_store(&c->loop, -7);
  atomic_store(&c->status, 12345);
  latch_init(&c->done);
}

#define SD_N 100
#define SD_MAX_PROBES 200000

typedef struct sd_ctx {
  aiob_runtime *rt;
  latch pending;
  sl_task sleepers[SD_N];
  pw_task waiters[SD_N];
  tbase queued[SD_N];
  aiob_promise *promises[SD_N];
  aiob_task *hs[SD_N], *hw[SD_N], *hq[SD_N];
  tbase *probes;
  int nprobes;
  call_ctx calls[2];
  atomic_int shut_rc;
} sd_ctx;

static void *sd_shutdown_thread(void *p) {
  sd_ctx *c = p;
  atomic_store(&c->shut_rc, aiob_runtime_shutdown(c->rt));
  return NULL;
}

static void test_shutdown_with_pending(void **state) {
  aiob_runtime *rt = RT(state);
  sd_ctx *c = xcalloc(1, sizeof *c);
  c->rt = rt;
  latch_init(&c->pending);
  c->probes = xcalloc(SD_MAX_PROBES, sizeof *c->probes);

  for (int i = 0; i < SD_N; i++) {
    c->sleepers[i].dur = 60 * AIOB_SEC;
    c->sleepers[i].pending = &c->pending;
    c->hs[i] = spawn_h(rt, &sl_vt, &c->sleepers[i]);
  }
  for (int i = 0; i < SD_N; i++) {
    assert_rc(aiob_promise_new(&c->promises[i]), 0);
    pw_init(&c->waiters[i], c->promises[i], 1, &c->pending);
    c->hw[i] = spawn_h(rt, &pw_vt, &c->waiters[i]);
  }
  latch_ok(&c->pending, 2 * SD_N);

  /* Block both loops, queue work behind the gates, then shut down. */
  aiob_task *hg0, *hg1;
  gate *g0 = gate_close(rt, 0, NULL, NULL, &hg0);
  gate *g1 = gate_close(rt, 1, NULL, NULL, &hg1);
  for (int i = 0; i < SD_N; i++)
    c->hq[i] = spawn_h(rt, &pend_vt, &c->queued[i]);
  for (int l = 0; l < 2; l++) {
    call_ctx_init(&c->calls[l], rt);
    assert_rc(aiob_runtime_call(rt, (unsigned)l, call_fn, &c->calls[l]), 0);
  }

  /* No cmocka assert until the shutdown thread is joined: it is blocked on
   * loops that only the gates release. */
  pthread_t th;
  if (pthread_create(&th, NULL, sd_shutdown_thread, c) != 0) {
    gate_open(g0);
    gate_open(g1);
    fail_msg("pthread_create");
  }
  /* Spawns racing with shutdown: each one that succeeds must be dropped. */
  int saw_shutdown = 0, probe_err = 0;
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (c->nprobes < SD_MAX_PROBES && aiob_now_ns() < deadline) {
    int rc = aiob_spawn(rt, &pend_vt, &c->probes[c->nprobes], NULL);
    if (rc == AIOB_ESHUTDOWN) {
      saw_shutdown = 1;
      break;
    }
    if (rc != 0) {
      probe_err = rc;
      break;
    }
    c->nprobes++;
    sched_yield();
  }
  uint64_t opened = aiob_now_ns();
  gate_open(g0);
  gate_open(g1);
  pthread_join(th, NULL);
  uint64_t joined = aiob_now_ns();

  assert_rc(probe_err, 0);
  if (!saw_shutdown)
    fail_msg("spawn kept succeeding during shutdown (%d probes)", c->nprobes);
  assert_rc(atomic_load(&c->shut_rc), 0);
  if (joined - opened >= 5 * AIOB_SEC)
    fail_msg("shutdown took %llu ms after the loops were released",
             (unsigned long long)((joined - opened) / AIOB_MSEC));
  gate_finish(g0, hg0);
  gate_finish(g1, hg1);

  for (int i = 0; i < SD_N; i++) {
    assert_int_equal(drops_of(&c->sleepers[i]), 1);
    assert_int_equal(polls_of(&c->sleepers[i]), 1);
    assert_int_equal(drops_of(&c->waiters[i]), 1);
    assert_int_equal(polls_of(&c->waiters[i]), 1);
    assert_int_equal(drops_of(&c->queued[i]), 1);
    assert_true(polls_of(&c->queued[i]) <= 1);
    aiob_task *hh[3] = {c->hs[i], c->hw[i], c->hq[i]};
    for (int j = 0; j < 3; j++) {
      assert_true(aiob_task_is_finished(hh[j]));
      assert_rc(aiob_task_wait(hh[j], 0), 0);
      assert_status(hh[j], AIOB_ECANCELED);
      aiob_task_release(hh[j]);
    }
  }
  for (int i = 0; i < c->nprobes; i++) {
    if (drops_of(&c->probes[i]) != 1 || polls_of(&c->probes[i]) > 1)
      fail_msg("probe %d of %d: %d polls, %d drops", i, c->nprobes,
               polls_of(&c->probes[i]), drops_of(&c->probes[i]));
  }
  for (int l = 0; l < 2; l++) {
    call_ctx *cc = &c->calls[l];
    assert_int_equal(atomic_load(&cc->calls), 1);
    assert_int_equal(atomic_load(&cc->loop), l);
    int st = atomic_load(&cc->status);
    if (st != 0 && st != AIOB_ECANCELED)
      fail_msg("call on loop %d ran with status %s", l, errname(st));
    latch_destroy(&cc->done);
  }

  /* After shutdown. */
  tbase *late = xcalloc(1, sizeof *late);
  aiob_task *hl = NULL;
  assert_rc(aiob_spawn(rt, &ready_vt, late, &hl), AIOB_ESHUTDOWN);
  assert_rc(aiob_spawn(rt, &ready_vt, late, NULL), AIOB_ESHUTDOWN);
  call_ctx late_call;
  call_ctx_init(&late_call, rt);
  assert_rc(aiob_runtime_call(rt, 0, call_fn, &late_call), AIOB_ESHUTDOWN);
  assert_null(aiob_runtime_native(rt, 0));
  assert_rc(aiob_runtime_shutdown(rt), 0);
  assert_int_equal(polls_of(late), 0);
  assert_int_equal(drops_of(late), 0);
  assert_int_equal(atomic_load(&late_call.calls), 0);
  latch_destroy(&late_call.done);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.tasks_live, 0);

  for (int i = 0; i < SD_N; i++)
    assert_rc(aiob_promise_abandon(c->promises[i]), 0);
  latch_destroy(&c->pending);
  free(late);
  free(c->probes);
  free(c);
  assert_clean();
}

/* ======================================================================== */
/* runtime_recreate: runtimes come and go; the default runtime.              */

typedef struct ds_task {
  tbase b;
  atomic_int rc;
} ds_task;

static aiob_poll ds_poll(aiob_task *t, void *p) {
  (void)t;
  ds_task *k = p;
  poll_enter(k);
  atomic_store(&k->rc, aiob_runtime_default_shutdown());
  return AIOB_READY;
}
static const aiob_task_vtable ds_vt = {.poll = ds_poll, .drop = drop_count};

static void run_value_task(aiob_runtime *rt, int v) {
  sl_task *k = xcalloc(1, sizeof *k);
  k->dur = 1 * AIOB_MSEC;
  k->value = new_int(v);
  aiob_task *h = spawn_h(rt, &sl_vt, k);
  wait_ok(h);
  aiob_output out = {0};
  assert_rc(aiob_task_take_output(h, &out), 0);
  assert_rc(out.status, 0);
  assert_non_null(out.value);
  assert_int_equal(*(int *)out.value, v);
  aiob_output_clear(&out);
  assert_int_equal(drops_of(k), 1);
  aiob_task_release(h);
  free(k);
}

static void test_runtime_recreate(void **state) {
  (void)state;
  for (int i = 0; i < 20; i++) {
    aiob_runtime *rt = NULL;
    assert_rc(runtime_new(&rt, 1 + (unsigned)i % 2), 0);
    assert_non_null(rt);
    assert_string_equal(aiob_runtime_backend_name(rt), expected_backend_name());
    assert_int_equal(aiob_runtime_threads(rt), 1 + (unsigned)i % 2);
    run_value_task(rt, i);
    if (i % 2)
      assert_rc(aiob_runtime_shutdown(rt), 0);
    aiob_runtime_free(rt);
  }

  /* The process-wide default runtime: only this test touches it. */
  aiob_runtime_config cfg;
  config_for_backend(&cfg, 1);
  /* A backend this build does not have fails where it is configured, and
   * the reason names it and the backends there are. */
  aiob_runtime_config bad = cfg;
  bad.backend = "kqueue";
  bad.backend_table = NULL;
  assert_rc(aiob_runtime_default_configure(&bad), AIOB_ENOENT);
  assert_non_null(strstr(aiob_runtime_config_error(), "\"kqueue\""));
  assert_non_null(
      strstr(aiob_runtime_config_error(), aiob_backend_at(0)->name));
  aiob_runtime *none = NULL;
  assert_rc(aiob_runtime_new(&none, &bad), AIOB_ENOENT);
  assert_null(none);
  assert_non_null(strstr(aiob_runtime_config_error(), "kqueue"));
  bad.backend = NULL;
  bad.threads = 0;
  assert_rc(aiob_runtime_default_configure(&bad), AIOB_EINVAL);
  assert_non_null(strstr(aiob_runtime_config_error(), "threads is 0"));
  assert_rc(aiob_runtime_default_configure(&cfg), 0);
  assert_string_equal(aiob_runtime_config_error(), "");
  aiob_runtime *d = NULL, *d2 = NULL;
  assert_rc(aiob_runtime_default(&d), 0);
  assert_non_null(d);
  if (!getenv("AIOBRIDGE_BACKEND"))
    assert_string_equal(aiob_runtime_backend_name(d), expected_backend_name());
  assert_int_equal(aiob_runtime_threads(d), 1);
  assert_rc(aiob_runtime_default(&d2), 0);
  assert_ptr_equal(d, d2);
  assert_rc(aiob_runtime_default_configure(&cfg), AIOB_EBUSY);
  run_value_task(d, 100);

  ds_task *k = xcalloc(1, sizeof *k);
  atomic_store(&k->rc, 12345);
  aiob_task *h = spawn_h(d, &ds_vt, k);
  wait_ok(h);
  assert_rc(atomic_load(&k->rc), AIOB_EDEADLK);
  aiob_task_release(h);
  free(k);

  assert_rc(aiob_runtime_default_shutdown(), 0);
  d = NULL;
  assert_rc(aiob_runtime_default(&d), 0);
  assert_non_null(d);
  assert_int_equal(aiob_runtime_threads(d), 1);
  run_value_task(d, 101);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  assert_rc(aiob_runtime_default_configure(&cfg), AIOB_EBUSY);
  assert_clean();
}

/* ======================================================================== */
/* runtime_call: callbacks on a chosen loop thread; native handles.          */

typedef struct rc_task {
  tbase b;
  aiob_runtime *rt;
  call_ctx *c;
  atomic_int rc;
  _Atomic(void *) native;
} rc_task;

static aiob_poll rc_task_poll(aiob_task *t, void *p) {
  (void)t;
  rc_task *k = p;
  poll_enter(k);
  int me = aiob_runtime_current_loop(k->rt);
  CHECK_INT(me, ==, 0);
  atomic_store(&k->native, aiob_runtime_native(k->rt, (unsigned)me));
  atomic_store(&k->rc, aiob_runtime_call(k->rt, 1, call_fn, k->c));
  return AIOB_READY;
}
static const aiob_task_vtable rc_task_vt = {.poll = rc_task_poll,
                                            .drop = drop_count};

static void test_runtime_call(void **state) {
  aiob_runtime *rt = RT(state);
  assert_int_equal(aiob_runtime_threads(rt), 2);
  assert_string_equal(aiob_runtime_backend_name(rt), expected_backend_name());
  assert_int_equal(aiob_runtime_current_loop(rt), -1);

  call_ctx *c = xcalloc(4, sizeof *c);
  for (int i = 0; i < 4; i++)
    call_ctx_init(&c[i], rt);
  for (unsigned i = 0; i < 2; i++)
    assert_rc(aiob_runtime_call(rt, i, call_fn, &c[i]), 0);
  for (int i = 0; i < 2; i++) {
    latch_ok(&c[i].done, 1);
    assert_int_equal(atomic_load(&c[i].calls), 1);
    assert_int_equal(atomic_load(&c[i].loop), i);
    assert_rc(atomic_load(&c[i].status), 0);
  }

  assert_rc(aiob_runtime_call(rt, 2, call_fn, &c[2]), AIOB_EINVAL);
  assert_rc(aiob_runtime_call(rt, (unsigned)-1, call_fn, &c[2]), AIOB_EINVAL);
  assert_rc(aiob_runtime_call(rt, 0, NULL, &c[2]), AIOB_EINVAL);

  /* From a task on loop 0 to loop 1. */
  rc_task *k = xcalloc(1, sizeof *k);
  k->rt = rt;
  k->c = &c[3];
  atomic_store(&k->rc, 12345);
  aiob_task *h = spawn_on(rt, 0, &rc_task_vt, k);
  wait_ok(h);
  assert_rc(atomic_load(&k->rc), 0);
  latch_ok(&c[3].done, 1);
  assert_int_equal(atomic_load(&c[3].loop), 1);
  assert_rc(atomic_load(&c[3].status), 0);
  assert_int_equal(atomic_load(&c[2].calls), 0);

  void *n0 = aiob_runtime_native(rt, 0), *n1 = aiob_runtime_native(rt, 1);
  assert_non_null(n0);
  assert_non_null(n1);
  assert_ptr_not_equal(n0, n1);
  assert_ptr_equal(atomic_load(&k->native), n0);
  assert_null(aiob_runtime_native(rt, 2));

  aiob_task_release(h);
  for (int i = 0; i < 4; i++)
    latch_destroy(&c[i].done);
  free(c);
  free(k);
  assert_clean();
}

/* ======================================================================== */
/* error_paths: bad arguments are refused and nothing runs.                  */

/* The timeout aiob_task_wait gets from a loop thread. Refusing takes no
 * time; waiting it out takes all of it: half of it tells the two apart even
 * on a slow machine that preempts the loop thread for tens of ms. */
#define DL_WAIT (4 * AIOB_SEC)

typedef struct dl_task {
  tbase b;
  atomic_int wait_rc, shutdown_rc;
  _Atomic uint64_t wait_ns;
} dl_task;

static aiob_poll dl_poll(aiob_task *t, void *p) {
  dl_task *k = p;
  poll_enter(k);
  uint64_t t0 = aiob_now_ns();
  atomic_store(&k->wait_rc, aiob_task_wait(t, DL_WAIT));
  atomic_store(&k->wait_ns, aiob_now_ns() - t0);
  atomic_store(&k->shutdown_rc, aiob_runtime_shutdown(aiob_task_runtime(t)));
  return AIOB_READY;
}
static const aiob_task_vtable dl_vt = {.poll = dl_poll, .drop = drop_count};

static void test_error_paths(void **state) {
  aiob_runtime *rt = RT(state);
  aiob_runtime *bad = NULL;
  aiob_runtime_config cfg;

  config_for_backend(&cfg, 0);
  assert_rc(aiob_runtime_new(&bad, &cfg), AIOB_EINVAL);
  aiob_runtime_config_init(&cfg);
  assert_int_equal(cfg.threads, 1);
  cfg.backend = "no-such-backend";
  assert_rc(aiob_runtime_new(&bad, &cfg), AIOB_ENOENT);
  assert_null(aiob_backend_find("no-such-backend"));

  /* Backend tables. */
  const aiob_backend *base = selected_table();
  assert_non_null(base);
  assert_rc(aiob_backend_validate(base), 0);
  assert_rc(aiob_backend_validate(NULL), AIOB_EINVAL);
  static aiob_backend tbl; /* static: a runtime may keep a pointer */
  for (int i = 0; i < 6; i++) {
    tbl = *base;
    const char *what = "";
    switch (i) {
    case 0:
      tbl.abi_major = AIOB_BACKEND_ABI_MAJOR + 1;
      what = "abi_major + 1";
      break;
    case 1:
      tbl.abi_major = 0;
      what = "abi_major 0";
      break;
    case 2:
      tbl.size = (uint32_t)offsetof(aiob_backend, timer_stop);
      what = "size without timer_stop";
      break;
    case 3:
      tbl.loop_init = NULL;
      what = "loop_init NULL";
      break;
    case 4:
      tbl.wake = NULL;
      what = "wake NULL";
      break;
    case 5:
      tbl.name = NULL;
      what = "name NULL";
      break;
    }
    if (aiob_backend_validate(&tbl) != AIOB_EINVAL)
      fail_msg("aiob_backend_validate accepted a table with %s", what);
    aiob_runtime_config_init(&cfg);
    cfg.backend_table = &tbl;
    bad = NULL;
    int rc = aiob_runtime_new(&bad, &cfg);
    if (rc != AIOB_EINVAL)
      fail_msg("aiob_runtime_new with %s = %s", what, errname(rc));
  }
  unsigned nb = 0;
  for (const aiob_backend *b; (b = aiob_backend_at(nb)); nb++) {
    assert_rc(aiob_backend_validate(b), 0);
    assert_non_null(b->name);
    assert_ptr_equal(aiob_backend_find(b->name), b);
  }
  assert_true(nb >= 1);

  /* Spawn refusals: neither poll nor drop runs. */
  tbase *st = xcalloc(1, sizeof *st);
  static const aiob_task_vtable no_poll_vt = {.poll = NULL, .drop = drop_count};
  aiob_task *h = NULL;
  assert_rc(aiob_spawn(rt, NULL, st, &h), AIOB_EINVAL);
  assert_rc(aiob_spawn(rt, &no_poll_vt, st, &h), AIOB_EINVAL);
  assert_rc(aiob_spawn_ex(rt, NULL, &no_poll_vt, st, NULL), AIOB_EINVAL);
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  assert_int_equal(o.loop, -1);
  assert_int_equal(o.no_inherit, 0);
  assert_null(o.locals);
  assert_int_equal(o.nlocals, 0);
  o.loop = 7;
  assert_rc(aiob_spawn_ex(rt, &o, &pend_vt, st, &h), AIOB_EINVAL);

  /* Blocking calls from a loop thread refuse with EDEADLK. */
  dl_task *k = xcalloc(1, sizeof *k);
  aiob_task *hk = spawn_h(rt, &dl_vt, k);
  wait_ok(hk);
  assert_rc(atomic_load(&k->wait_rc), AIOB_EDEADLK);
  assert_true(atomic_load(&k->wait_ns) < DL_WAIT / 2);
  assert_rc(atomic_load(&k->shutdown_rc), AIOB_EDEADLK);
  aiob_task_release(hk);
  /* ... and the runtime still works. */
  run_value_task(rt, 3);
  assert_int_equal(polls_of(st), 0);
  assert_int_equal(drops_of(st), 0);

  /* Error strings. */
  assert_string_equal(aiob_strerror(AIOB_EINVAL), "invalid argument");
  assert_string_equal(aiob_err_name(AIOB_EINVAL), "EINVAL");
  assert_string_equal(aiob_err_name(AIOB_ECANCELED), "ECANCELED");
  assert_string_equal(aiob_err_name(AIOB_ESHUTDOWN), "ESHUTDOWN");
  assert_string_equal(aiob_strerror(AIOB_ESHUTDOWN), "runtime is shut down");
  assert_non_null(aiob_strerror(-99999));
  assert_non_null(aiob_strerror(0));
  assert_non_null(aiob_strerror(12345));
  assert_string_equal(aiob_err_name(-99999), "UNKNOWN");

  free(k);
  free(st);
  assert_clean();
}

/* ======================================================================== */
/* backend_table_versioning: optional slots are reached through size and
 * NULL checks; a newer (larger) table is accepted.                          */

static void check_io_support(aiob_runtime *rt, int want_supported) {
  int p[2];
  assert_int_equal(pipe_nb(p), 0);
  io_task *k = xcalloc(1, sizeof *k);
  io_task_init(k, p[0], AIOB_READABLE, NULL);
  assert_int_equal(write(p[1], "v", 1), 1);
  aiob_task *h = spawn_h(rt, &io_vt, k);
  wait_ok(h);
  int r = atomic_load(&k->result);
  if (want_supported && !(r > 0 && (r & AIOB_READABLE)))
    fail_msg("io wait on a full-size table gave %d", r);
  if (!want_supported && r != AIOB_ENOTSUP)
    fail_msg("io wait without io slots gave %s, want ENOTSUP", errname(r));
  aiob_task_release(h);
  close(p[0]);
  close(p[1]);
  free(k);
}

static aiob_backend g_trunc, g_noio;
static struct {
  aiob_backend b;
  void *appended[4]; /* slots of a future minor version */
} g_newer;

static void test_backend_table_versioning(void **state) {
  (void)state;
  const aiob_backend *base = selected_table();
  assert_non_null(base);
  aiob_runtime_config cfg;
  aiob_runtime *rt = NULL;

  /* Compiled before the optional slots existed. */
  g_trunc = *base;
  g_trunc.size = (uint32_t)offsetof(aiob_backend, io_start);
  assert_rc(aiob_backend_validate(&g_trunc), 0);
  aiob_runtime_config_init(&cfg);
  cfg.backend_table = &g_trunc;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_string_equal(aiob_runtime_backend_name(rt), base->name);
  assert_null(aiob_runtime_native(rt, 0));
  run_value_task(rt, 1);
  check_io_support(rt, 0);
  aiob_runtime_free(rt);

  /* Full size, optional slots NULL. */
  g_noio = *base;
  g_noio.io_start = NULL;
  g_noio.io_modify = NULL;
  g_noio.io_stop = NULL;
  g_noio.native = NULL;
  assert_rc(aiob_backend_validate(&g_noio), 0);
  cfg.backend_table = &g_noio;
  rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_null(aiob_runtime_native(rt, 0));
  run_value_task(rt, 2);
  check_io_support(rt, 0);
  aiob_runtime_free(rt);

  /* A table from a newer minor version (bigger size) still works. */
  g_newer.b = *base;
  g_newer.b.size = (uint32_t)sizeof g_newer;
  assert_rc(aiob_backend_validate(&g_newer.b), 0);
  cfg.backend_table = &g_newer.b;
  rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_non_null(aiob_runtime_native(rt, 0));
  run_value_task(rt, 3);
  check_io_support(rt, 1);
  aiob_runtime_free(rt);
  assert_clean();
}

/* ======================================================================== */
/* coroutine_macros: AIOB_BEGIN / AIOB_AWAIT / AIOB_YIELD / AIOB_END.        */

typedef struct co_task {
  tbase b;
  int co;
  int i;
  aiob_sleep s;
  int sleep_status;
  aiob_promise *p;
  aiob_output out;
  latch *at_promise;
  atomic_int steps[16];
  atomic_int nsteps;
  atomic_int status, value;
  _Atomic uint64_t t0, t_slept;
} co_task;

static void co_rec(co_task *c, int step) {
  int n = atomic_fetch_add(&c->nsteps, 1);
  if (n < 16)
    atomic_store(&c->steps[n], step);
}

static aiob_poll co_poll(aiob_task *t, void *p) {
  co_task *c = p;
  poll_enter(c);
  AIOB_BEGIN(&c->co);
  co_rec(c, 1);
  atomic_store(&c->t0, aiob_now_ns());
  aiob_sleep_init(&c->s, 5 * AIOB_MSEC);
  AIOB_AWAIT(&c->co, aiob_sleep_poll(t, &c->s, &c->sleep_status));
  atomic_store(&c->t_slept, aiob_now_ns());
  co_rec(c, 2);
  latch_add(c->at_promise, 1);
  AIOB_AWAIT(&c->co, aiob_promise_poll(t, c->p, &c->out));
  co_rec(c, 3);
  atomic_store(&c->status, c->out.status);
  atomic_store(&c->value, c->out.value ? *(int *)c->out.value : -1);
  aiob_output_clear(&c->out);
  for (c->i = 0; c->i < 3; c->i++) {
    AIOB_YIELD(&c->co, t);
    co_rec(c, 10 + c->i);
  }
  co_rec(c, 4);
  AIOB_END(&c->co);
}
static const aiob_task_vtable co_vt = {.poll = co_poll, .drop = drop_count};

static void test_coroutine_macros(void **state) {
  aiob_runtime *rt = RT(state);
  co_task *c = xcalloc(1, sizeof *c);
  latch *at_promise = xcalloc(1, sizeof *at_promise);
  latch_init(at_promise);
  c->at_promise = at_promise;
  c->sleep_status = 1;
  assert_rc(aiob_promise_new(&c->p), 0);

  aiob_task *h = spawn_h(rt, &co_vt, c);
  latch_ok(at_promise, 1);
  assert_rc(aiob_promise_complete(c->p, 0, new_int(77), count_free), 0);
  wait_ok(h);

  const int want[] = {1, 2, 3, 10, 11, 12, 4};
  const int nwant = (int)(sizeof want / sizeof want[0]);
  assert_int_equal(atomic_load(&c->nsteps), nwant);
  for (int i = 0; i < nwant; i++)
    if (atomic_load(&c->steps[i]) != want[i])
      fail_msg("step %d was %d, want %d", i, atomic_load(&c->steps[i]),
               want[i]);
  assert_int_equal(c->co, -1);
  assert_int_equal(c->sleep_status, 0);
  assert_true(atomic_load(&c->t_slept) >= atomic_load(&c->t0) + 5 * AIOB_MSEC);
  assert_rc(atomic_load(&c->status), 0);
  assert_int_equal(atomic_load(&c->value), 77);
  assert_true(polls_of(c) >= 5);
  assert_int_equal(drops_of(c), 1);

  aiob_promise_release(c->p);
  aiob_task_release(h);
  latch_destroy(at_promise);
  free(at_promise);
  free(c);
  assert_clean();
}

/* ======================================================================== */
/* stats: counters add up once the runtime is idle.                          */

static void test_stats(void **state) {
  aiob_runtime *rt = RT(state);
  enum { N = 50, M = 20 };
  tbase *done = xcalloc(N, sizeof *done);
  tbase *cancelled = xcalloc(M, sizeof *cancelled);
  aiob_task *hd[N], *hc[M];

  for (int i = 0; i < N; i++)
    hd[i] = spawn_h(rt, &ready_vt, &done[i]);
  for (int i = 0; i < N; i++)
    wait_ok(hd[i]);
  for (int i = 0; i < M; i++)
    hc[i] = spawn_h(rt, &pend_vt, &cancelled[i]);
  for (int i = 0; i < M; i++)
    aiob_task_cancel(hc[i]);
  for (int i = 0; i < M; i++)
    wait_ok(hc[i]);

  /* Counters are relaxed: let them settle (bounded). */
  aiob_runtime_stats st;
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  do {
    aiob_runtime_stats_get(rt, &st);
    if (st.tasks_completed == N && st.tasks_cancelled == M &&
        st.tasks_live == 0)
      break;
    sched_yield();
  } while (aiob_now_ns() < deadline);

  assert_true(st.tasks_spawned >= N + M);
  assert_int_equal(st.tasks_completed, N);
  assert_int_equal(st.tasks_cancelled, M);
  assert_int_equal(st.tasks_live, 0);
  assert_true(st.polls >= N);
  for (int i = 0; i < N; i++)
    aiob_task_release(hd[i]);
  for (int i = 0; i < M; i++) {
    assert_int_equal(drops_of(&cancelled[i]), 1);
    aiob_task_release(hc[i]);
  }
  free(done);
  free(cancelled);
  assert_clean();
}

/* ======================================================================== */
/* spin_policy: spin_us bounds; 0 never spins; a spinning loop catches
 * back-to-back pushes without blocking; an idle loop stops spinning.        */

static void spin_stats(aiob_runtime *rt, aiob_runtime_stats *st) {
  /* Counters are relaxed; the loop writes them before it blocks. */
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT, spins = UINT64_MAX;
  for (;;) {
    aiob_runtime_stats_get(rt, st);
    if (st->spins == spins || aiob_now_ns() > deadline)
      return;
    spins = st->spins;
    sleep_thread_ns(5 * AIOB_MSEC);
  }
}

static void round_trips(aiob_runtime *rt, int n) {
  tbase *b = xcalloc((size_t)n, sizeof *b);
  for (int i = 0; i < n; i++) {
    aiob_task *h = spawn_h(rt, &ready_vt, &b[i]);
    wait_ok(h);
    aiob_task_release(h);
  }
  free(b);
}

static void test_spin_policy(void **state) {
  (void)state;
  aiob_runtime_config cfg;
  aiob_runtime *rt = NULL;
  aiob_runtime_stats st;

  config_for_backend(&cfg, 1);
  assert_int_equal(cfg.spin_us, AIOB_SPIN_US_DEFAULT);
  cfg.spin_us = AIOB_SPIN_US_MAX + 1;
  assert_rc(aiob_runtime_new(&rt, &cfg), AIOB_EINVAL);
  assert_rc(aiob_runtime_default_configure(&cfg), AIOB_EINVAL);

  cfg.spin_us = 0;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_int_equal(aiob_runtime_spin_us(rt), 0);
  round_trips(rt, 200);
  spin_stats(rt, &st);
  assert_int_equal(st.spins, 0);
  assert_int_equal(st.spin_ns, 0);
  aiob_runtime_free(rt);

  /* The largest budget (10 ms): a waiter that a busy machine preempts for
   * a few ms still spawns the next task inside a spin. A miss halves the
   * budget, but the blocking wait that follows restores it when the push
   * ends it within 10 ms, so only waiters slower than 10 ms every time
   * starve the spin; more rounds are run then. Broken spinning never
   * catches a push, however many rounds. */
  cfg.spin_us = AIOB_SPIN_US_MAX;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_int_equal(aiob_runtime_spin_us(rt), AIOB_SPIN_US_MAX);
  for (int round = 0; round < 40; round++) {
    round_trips(rt, 200);
    spin_stats(rt, &st);
    if (st.spin_hits > 0)
      break;
  }
  print_message("spin_policy[%s]: %llu spins, %llu hits, %.1f ms spinning\n",
                g_backend, (unsigned long long)st.spins,
                (unsigned long long)st.spin_hits, (double)st.spin_ns / 1e6);
  assert_true(st.spins > 0);
  assert_true(st.spin_hits > 0);
  assert_true(st.spin_hits <= st.spins);

  /* Idle for 200 ms: the loop stops spinning. After the last task it spins
   * at most 3 times: once finding nothing, after which it blocks; once
   * more if a backend wake was pending (one, coalesced: a push that came
   * while the loop was about to block woke the backend, yet the loop took
   * it without blocking), which ends that block at once; 3 leaves one to
   * spare. A loop that did not block after a miss would spin over 10
   * times (the budget halves down to zero). How
   * long the spins lasted is not checked: a preempted spin lasts as long as
   * the preemption. */
  aiob_runtime_stats before = st;
  sleep_thread_ns(200 * AIOB_MSEC);
  spin_stats(rt, &st);
  if (st.spins - before.spins > 3)
    fail_msg("idle loop spun %llu times",
             (unsigned long long)(st.spins - before.spins));
  aiob_runtime_free(rt);
  assert_clean();
}

/* ======================================================================== */
/* awake_pushes: tasks pushed from another thread while the loop runs a task
 * cost no backend wake (the loop takes them before it blocks).             */

typedef struct hold_task {
  tbase b;
  latch running;       /* 1 once its poll runs */
  atomic_int released; /* set by the test thread */
} hold_task;

/* Holds its loop thread until released (at most WAIT_TIMEOUT). */
static aiob_poll hold_poll(aiob_task *t, void *p) {
  (void)t;
  hold_task *h = p;
  poll_enter(h);
  latch_add(&h->running, 1);
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (!atomic_load(&h->released) && aiob_now_ns() < deadline)
    sched_yield();
  CHECK_INT(atomic_load(&h->released), ==, 1);
  return AIOB_READY;
}
static const aiob_task_vtable hold_vt = {.poll = hold_poll, .drop = drop_count};

#define AP_N 100

static void test_awake_pushes(void **state) {
  aiob_runtime *rt = RT(state);
  hold_task *h = xcalloc(1, sizeof *h);
  latch_init(&h->running);
  tbase *bs = xcalloc(AP_N, sizeof *bs);
  aiob_task *hs[AP_N];
  aiob_task *held = spawn_h(rt, &hold_vt, h);
  latch_ok(&h->running, 1);
  aiob_runtime_stats before, after;
  aiob_runtime_stats_get(rt, &before);
  for (int i = 0; i < AP_N; i++)
    hs[i] = spawn_h(rt, &ready_vt, &bs[i]);
  aiob_runtime_stats_get(rt, &after);
  atomic_store(&h->released, 1);
  wait_ok(held);
  aiob_task_release(held);
  for (int i = 0; i < AP_N; i++) {
    wait_ok(hs[i]);
    aiob_task_release(hs[i]);
    assert_int_equal(polls_of(&bs[i]), 1);
  }
  /* The wake counter is the pushers': exact for this thread's pushes. */
  assert_int_equal(after.loop_wakes - before.loop_wakes, 0);
  latch_destroy(&h->running);
  free(h);
  free(bs);
  assert_clean();
}

/* ======================================================================== */
/* cancel_wake_race: wakes and cancels racing from two threads; every task
 * is dropped exactly once and never polled after its drop.                  */

#define CW_N 2000

typedef struct cw_arg {
  aiob_waker **wakers;
  aiob_task **handles;
} cw_arg;

static void *cw_waker_thread(void *p) {
  cw_arg *a = p;
  for (int round = 0; round < 5; round++)
    for (int i = 0; i < CW_N; i++)
      aiob_waker_wake(a->wakers[i]);
  return NULL;
}

static void *cw_cancel_thread(void *p) {
  cw_arg *a = p;
  for (int i = CW_N - 1; i >= 0; i--)
    aiob_task_cancel(a->handles[i]);
  return NULL;
}

static void test_cancel_wake_race(void **state) {
  aiob_runtime *rt = RT(state);
  wk_task **ks = xcalloc(CW_N, sizeof *ks);
  aiob_task **hs = xcalloc(CW_N, sizeof *hs);
  aiob_waker **ws = xcalloc(CW_N, sizeof *ws);
  for (int i = 0; i < CW_N; i++) {
    ks[i] = wk_new();
    hs[i] = spawn_h(rt, &wk_vt, ks[i]);
  }
  for (int i = 0; i < CW_N; i++) {
    latch_ok(&ks[i]->handed, 1);
    ws[i] = aiob_waker_clone(atomic_load(&ks[i]->w));
    assert_non_null(ws[i]);
  }
  cw_arg arg = {.wakers = ws, .handles = hs};
  pthread_t tw = start_thread(cw_waker_thread, &arg);
  pthread_t tc = start_thread(cw_cancel_thread, &arg);
  pthread_join(tw, NULL);
  pthread_join(tc, NULL);
  for (int i = 0; i < CW_N; i++) {
    wait_ok(hs[i]);
    assert_int_equal(drops_of(ks[i]), 1);
    assert_status(hs[i], AIOB_ECANCELED);
    aiob_waker_wake(ws[i]); /* finished: no effect */
    aiob_waker_release(ws[i]);
    aiob_task_release(hs[i]);
  }
  for (int i = 0; i < CW_N; i++)
    wk_free(ks[i]);
  free(ks);
  free(hs);
  free(ws);
  assert_clean();
}

/* ======================================================================== */
/* join_after_joiner_cancelled: a joiner that is gone frees the target for
 * another joiner ("one task at a time").                                    */

typedef struct mark_task {
  tbase b;
} mark_task;

static void test_join_after_joiner_cancelled(void **state) {
  aiob_runtime *rt = RT(state);
  latch *pending = xcalloc(1, sizeof *pending);
  latch_init(pending);

  tbase *k = xcalloc(1, sizeof *k);
  aiob_task *hk = spawn_h(rt, &pend_vt, k);
  jn_task *j1 = jn_new(hk, pending);
  aiob_task *hj1 = spawn_h(rt, &jn_vt, j1);
  latch_ok(pending, 1);
  aiob_task_cancel(hj1);
  wait_ok(hj1);
  assert_status(hj1, AIOB_ECANCELED);

  /* j2 is polled before the marker (one loop, FIFO). */
  jn_task *j2 = jn_new(hk, pending);
  aiob_task *hj2 = spawn_h(rt, &jn_vt, j2);
  mark_task *m = xcalloc(1, sizeof *m);
  aiob_task *hm = spawn_h(rt, &ready_vt, m);
  wait_ok(hm);
  int early = aiob_task_is_finished(hj2);
  aiob_task_cancel(hk);
  wait_ok(hj2);
  wait_ok(hk);
  if (early)
    fail_msg("second joiner got %s although the first joiner was dropped",
             errname(atomic_load(&j2->join_status)));
  assert_rc(atomic_load(&j2->join_status), AIOB_ECANCELED);

  aiob_task_release(hk);
  aiob_task_release(hj1);
  aiob_task_release(hj2);
  aiob_task_release(hm);
  latch_destroy(pending);
  free(pending);
  free(k);
  free(j1);
  free(j2);
  free(m);
  assert_clean();
}

/* ======================================================================== */
/* spawn_locals_bad_key: opts.locals with a key that was never created is
 * refused like aiob_task_local_set refuses it (else nobody destroys it).   */

static void test_spawn_locals_bad_key(void **state) {
  aiob_runtime *rt = RT(state);
  static int keys_made;
  aiob_local_key k;
  if (!keys_made) {
    assert_rc(aiob_local_key_create(&k, lval_clone, lval_destroy), 0);
    keys_made = 1;
    assert_true(k < AIOB_LOCAL_KEYS_MAX - 1);
  }
  lval *v = lval_new(5);
  aiob_local_init li = {.key = AIOB_LOCAL_KEYS_MAX - 1, .value = v};
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.locals = &li;
  o.nlocals = 1;
  tbase *st = xcalloc(1, sizeof *st);
  aiob_task *h = NULL;
  int rc = aiob_spawn_ex(rt, &o, &ready_vt, st, &h);
  if (rc == 0) {
    wait_ok(h);
    aiob_task_release(h);
    free(v); /* no destroy function exists for the key: never released */
    free(st);
    fail_msg("aiob_spawn_ex accepted opts.locals with key %d, which was "
             "never created (aiob_task_local_set refuses it with EINVAL)",
             AIOB_LOCAL_KEYS_MAX - 1);
  }
  assert_rc(rc, AIOB_EINVAL);
  assert_int_equal(polls_of(st), 0);
  free(v);
  free(st);

  lval *w = lval_new(6);
  li = (aiob_local_init){.key = AIOB_LOCAL_KEYS_MAX, .value = w};
  tbase st2 = {0};
  assert_rc(aiob_spawn_ex(rt, &o, &ready_vt, &st2, NULL), AIOB_EINVAL);
  free(w);
  assert_clean();
}

/* ======================================================================== */
/* sleep_forever: a sleep of UINT64_MAX ns (or until UINT64_MAX) stays
 * pending, and an idle loop blocks instead of spinning on its timer.       */

typedef struct sf_task {
  tbase b;
  int until;
  aiob_sleep s;
  latch *polled;
  atomic_int status;
} sf_task;

static aiob_poll sf_poll(aiob_task *t, void *p) {
  sf_task *k = p;
  int n = poll_enter(k);
  if (n == 1) {
    if (k->until)
      aiob_sleep_init_until(&k->s, UINT64_MAX);
    else
      aiob_sleep_init(&k->s, UINT64_MAX);
  }
  int st = 1;
  aiob_poll r = aiob_sleep_poll(t, &k->s, &st);
  if (r == AIOB_READY)
    atomic_store(&k->status, st);
  if (n == 1)
    latch_add(k->polled, 1);
  return r;
}
static const aiob_task_vtable sf_vt = {.poll = sf_poll, .drop = drop_count};

typedef struct cid_ctx {
  clockid_t cid;
  atomic_int rc;
  latch done;
} cid_ctx;

static void cid_fn(void *arg, int status) {
  cid_ctx *c = arg;
  int rc = status ? status : -pthread_getcpuclockid(pthread_self(), &c->cid);
  atomic_store(&c->rc, rc);
  latch_add(&c->done, 1);
}

static uint64_t cpu_ns(clockid_t cid) {
  struct timespec ts;
  clock_gettime(cid, &ts);
  return (uint64_t)ts.tv_sec * AIOB_SEC + (uint64_t)ts.tv_nsec;
}

static void test_sleep_forever(void **state) {
  aiob_runtime *rt = RT(state);
  cid_ctx *cc = xcalloc(1, sizeof *cc);
  latch_init(&cc->done);
  assert_rc(aiob_runtime_call(rt, 0, cid_fn, cc), 0);
  latch_ok(&cc->done, 1);
  assert_rc(atomic_load(&cc->rc), 0);

  latch *polled = xcalloc(1, sizeof *polled);
  latch_init(polled);
  sf_task *a = xcalloc(1, sizeof *a);
  sf_task *b = xcalloc(1, sizeof *b);
  a->until = 1;
  a->polled = b->polled = polled;
  aiob_task *ha = spawn_h(rt, &sf_vt, a);
  aiob_task *hb = spawn_h(rt, &sf_vt, b);
  latch_ok(polled, 2);

  /* A measurement window, not synchronisation. */
  uint64_t cpu0 = cpu_ns(cc->cid);
  struct timespec win = {.tv_sec = 0, .tv_nsec = 300 * 1000 * 1000};
  nanosleep(&win, NULL);
  uint64_t cpu = cpu_ns(cc->cid) - cpu0;

  if (aiob_task_is_finished(ha))
    check_failed(__FILE__, __LINE__,
                 "sleep until UINT64_MAX completed (status %s)",
                 errname(atomic_load(&a->status)));
  if (aiob_task_is_finished(hb))
    check_failed(__FILE__, __LINE__,
                 "sleep of UINT64_MAX ns completed at once (status %s)",
                 errname(atomic_load(&b->status)));
  if (cpu >= 100 * AIOB_MSEC)
    check_failed(__FILE__, __LINE__,
                 "idle loop thread used %llu ms of CPU in a 300 ms window "
                 "with only far-future sleeps armed",
                 (unsigned long long)(cpu / AIOB_MSEC));
  aiob_task_cancel(ha);
  aiob_task_cancel(hb);
  wait_ok(ha);
  wait_ok(hb);
  assert_int_equal(drops_of(a), 1);
  assert_int_equal(drops_of(b), 1);
  aiob_task_release(ha);
  aiob_task_release(hb);
  latch_destroy(polled);
  latch_destroy(&cc->done);
  free(polled);
  free(cc);
  free(a);
  free(b);
  assert_clean();
}

/* ======================================================================== */
/* backend_contract: a checking backend wraps the selected table and
 * verifies that the core calls it as backend.h promises: every slot but
 * wake on the loop thread, nothing after loop_close, every watch stopped
 * before loop_close, io_modify never to 0, one loop_close per loop.        */

typedef struct chk_loop {
  void *inner;
  pthread_t tid;
  pthread_mutex_t mu; /* orders wake against loop_close */
  atomic_int closed;
  atomic_int watches;
} chk_loop;

typedef struct chk_io {
  void *inner;
  chk_loop *l;
} chk_io;

static pthread_mutex_t g_chk_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
  const aiob_backend *inner;
  atomic_int fail_init_at; /* the n-th loop_init fails (0: none) */
  atomic_int slow_wake;    /* fault injection: wake takes 30 ms */
  atomic_int init_calls, inits, closes;
  atomic_int off_thread, after_close, native_off_thread;
  atomic_int wake_after_close, bad_events, watches_left;
  chk_loop *loops[64]; /* freed at the end of the test (g_chk_mu) */
  int nloops;
} g_chk;
static aiob_backend g_chk_table;

static void chk_on_loop(chk_loop *l) {
  if (!pthread_equal(pthread_self(), l->tid))
    atomic_fetch_add(&g_chk.off_thread, 1);
  if (atomic_load(&l->closed))
    atomic_fetch_add(&g_chk.after_close, 1);
}

static int chk_loop_init(aiob_loop *core, const aiob_backend_options *opts,
                         void **bl) {
  int n = atomic_fetch_add(&g_chk.init_calls, 1) + 1;
  if (n == atomic_load(&g_chk.fail_init_at))
    return -EMFILE;
  chk_loop *l = calloc(1, sizeof *l);
  if (!l)
    return -ENOMEM;
  l->tid = pthread_self();
  pthread_mutex_init(&l->mu, NULL);
  int rc = g_chk.inner->loop_init(core, opts, &l->inner);
  if (rc) {
    pthread_mutex_destroy(&l->mu);
    free(l);
    return rc;
  }
  pthread_mutex_lock(&g_chk_mu);
  if (g_chk.nloops < 64)
    g_chk.loops[g_chk.nloops++] = l; /* else leaked: only 64 expected */
  pthread_mutex_unlock(&g_chk_mu);
  atomic_fetch_add(&g_chk.inits, 1);
  *bl = l;
  return 0;
}

static void chk_loop_close(void *bl) {
  chk_loop *l = bl;
  chk_on_loop(l);
  if (atomic_load(&l->watches))
    atomic_fetch_add(&g_chk.watches_left, 1);
  pthread_mutex_lock(&l->mu);
  atomic_store(&l->closed, 1);
  g_chk.inner->loop_close(l->inner);
  l->inner = NULL;
  pthread_mutex_unlock(&l->mu);
  atomic_fetch_add(&g_chk.closes, 1);
}

static int chk_run(void *bl, unsigned flags) {
  chk_loop *l = bl;
  chk_on_loop(l);
  return g_chk.inner->run(l->inner, flags);
}

static int chk_wake(void *bl) {
  chk_loop *l = bl;
  if (atomic_load(&g_chk.slow_wake)) {
    struct timespec ts = {.tv_sec = 0, .tv_nsec = 30 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  int rc = 0;
  pthread_mutex_lock(&l->mu);
  if (atomic_load(&l->closed))
    atomic_fetch_add(&g_chk.wake_after_close, 1);
  else
    rc = g_chk.inner->wake(l->inner);
  pthread_mutex_unlock(&l->mu);
  return rc;
}

static int chk_timer_start(void *bl, uint64_t timeout_ns) {
  chk_loop *l = bl;
  chk_on_loop(l);
  return g_chk.inner->timer_start(l->inner, timeout_ns);
}

static void chk_timer_stop(void *bl) {
  chk_loop *l = bl;
  chk_on_loop(l);
  g_chk.inner->timer_stop(l->inner);
}

static int chk_events_ok(unsigned events) {
  return events && !(events & ~(unsigned)(AIOB_READABLE | AIOB_WRITABLE));
}

static int chk_io_start(void *bl, int fd, unsigned events, void *token,
                        void **io) {
  chk_loop *l = bl;
  chk_on_loop(l);
  if (!chk_events_ok(events))
    atomic_fetch_add(&g_chk.bad_events, 1);
  chk_io *w = calloc(1, sizeof *w);
  if (!w)
    return -ENOMEM;
  w->l = l;
  int rc = g_chk.inner->io_start(l->inner, fd, events, token, &w->inner);
  if (rc) {
    free(w);
    return rc;
  }
  atomic_fetch_add(&l->watches, 1);
  *io = w;
  return 0;
}

static int chk_io_modify(void *bl, void *io, unsigned events) {
  chk_loop *l = bl;
  chk_on_loop(l);
  if (!chk_events_ok(events))
    atomic_fetch_add(&g_chk.bad_events, 1);
  return g_chk.inner->io_modify(l->inner, ((chk_io *)io)->inner, events);
}

static void chk_io_stop(void *bl, void *io) {
  chk_loop *l = bl;
  chk_io *w = io;
  chk_on_loop(l);
  g_chk.inner->io_stop(l->inner, w->inner);
  atomic_fetch_sub(&l->watches, 1);
  free(w);
}

static void *chk_native(void *bl) {
  chk_loop *l = bl;
  if (!pthread_equal(pthread_self(), l->tid))
    atomic_fetch_add(&g_chk.native_off_thread, 1);
  if (atomic_load(&l->closed)) {
    atomic_fetch_add(&g_chk.after_close, 1);
    return NULL;
  }
  return g_chk.inner->native(l->inner);
}

/* Builds g_chk_table around `inner`, keeping its optional slots' presence. */
static void chk_setup(const aiob_backend *inner) {
  memset(&g_chk, 0, sizeof g_chk);
  g_chk.inner = inner;
  int has_io =
      inner->size >= offsetof(aiob_backend, io_stop) + sizeof inner->io_stop &&
      inner->io_start && inner->io_modify && inner->io_stop;
  int has_native =
      inner->size >= offsetof(aiob_backend, native) + sizeof inner->native &&
      inner->native;
  g_chk_table = (aiob_backend){
      .abi_major = AIOB_BACKEND_ABI_MAJOR,
      .size = sizeof(aiob_backend),
      .name = "checked",
      .loop_init = chk_loop_init,
      .loop_close = chk_loop_close,
      .run = chk_run,
      .wake = chk_wake,
      .timer_start = chk_timer_start,
      .timer_stop = chk_timer_stop,
      .io_start = has_io ? chk_io_start : NULL,
      .io_modify = has_io ? chk_io_modify : NULL,
      .io_stop = has_io ? chk_io_stop : NULL,
      .native = has_native ? chk_native : NULL,
  };
}

static void chk_free_loops(void) {
  pthread_mutex_lock(&g_chk_mu);
  for (int i = 0; i < g_chk.nloops; i++) {
    pthread_mutex_destroy(&g_chk.loops[i]->mu);
    free(g_chk.loops[i]);
  }
  g_chk.nloops = 0;
  pthread_mutex_unlock(&g_chk_mu);
}

/* Wakes itself forever: keeps its loop busy without backend wakes. */
typedef struct spin_task {
  tbase b;
  aiob_waker *w; /* loop thread only */
  latch spinning;
} spin_task;

static aiob_poll spin_poll(aiob_task *t, void *p) {
  spin_task *k = p;
  int n = poll_enter(k);
  if (n == 1)
    k->w = aiob_task_waker(t);
  if (n == 100)
    latch_add(&k->spinning, 1);
  aiob_waker_wake(k->w);
  return AIOB_PENDING;
}

static void spin_drop(void *p) {
  spin_task *k = p;
  if (k->w)
    aiob_waker_release(k->w);
  k->w = NULL;
  drop_count(p);
}
static const aiob_task_vtable spin_vt = {.poll = spin_poll, .drop = spin_drop};

static void test_backend_contract(void **state) {
  (void)state;
  const aiob_backend *inner = selected_table();
  assert_non_null(inner);
  chk_setup(inner);
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend_table = &g_chk_table;
  cfg.threads = 2;
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);

  /* A workload touching every slot. */
  run_value_task(rt, 1);
  if (g_chk_table.io_start) {
    check_io_support(rt, 1);
    latch *pending = xcalloc(1, sizeof *pending);
    latch_init(pending);
    int sp[2];
    assert_int_equal(
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp),
        0);
    io_task *k = xcalloc(3, sizeof *k);
    io_task_init(&k[0], sp[0], AIOB_READABLE, pending);
    io_task_init(&k[1], sp[0], AIOB_WRITABLE, NULL);
    io_task_init(&k[2], sp[1], AIOB_READABLE, pending);
    aiob_task *h0 = spawn_on(rt, 0, &io_vt, &k[0]);
    latch_ok(pending, 1);
    aiob_task *h1 = spawn_on(rt, 0, &io_vt, &k[1]); /* io_modify R -> R|W */
    wait_ok(h1);
    assert_true(atomic_load(&k[1].result) & AIOB_WRITABLE);
    aiob_task *h2 = spawn_on(rt, 1, &io_vt, &k[2]);
    latch_ok(pending, 2);
    aiob_task_cancel(h2); /* io_stop on cancel */
    assert_int_equal(write(sp[1], "c", 1), 1);
    wait_ok(h0);
    wait_ok(h2);
    assert_true(atomic_load(&k[0].result) & AIOB_READABLE);
    aiob_task_release(h0);
    aiob_task_release(h1);
    aiob_task_release(h2);
    close(sp[0]);
    close(sp[1]);
    latch_destroy(pending);
    free(pending);
    free(k);
  }
  sl_task *s = xcalloc(1, sizeof *s);
  s->dur = 10 * AIOB_SEC;
  aiob_task *hs = spawn_h(rt, &sl_vt, s);
  aiob_task_cancel(hs);
  wait_ok(hs);
  aiob_task_release(hs);
  free(s);
  /* aiob_runtime_native is documented thread-safe; the slot is not. */
  (void)aiob_runtime_native(rt, 0);
  aiob_runtime_free(rt);

  /* Shutdown while a loop is busy: it may see `stop` and close before the
   * shutdown thread's wake for it arrives (the injected 30 ms delay makes
   * that window wide). */
  spin_task *sp = xcalloc(1, sizeof *sp);
  latch_init(&sp->spinning);
  cfg.threads = 1;
  rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  aiob_task *hsp = spawn_h(rt, &spin_vt, sp);
  latch_ok(&sp->spinning, 1);
  atomic_store(&g_chk.slow_wake, 1);
  aiob_runtime_free(rt);
  atomic_store(&g_chk.slow_wake, 0);
  assert_true(aiob_task_is_finished(hsp));
  assert_int_equal(drops_of(sp), 1);
  aiob_task_release(hsp);
  latch_destroy(&sp->spinning);
  free(sp);

  int inits = atomic_load(&g_chk.inits), closes = atomic_load(&g_chk.closes);
  int off = atomic_load(&g_chk.off_thread);
  int after = atomic_load(&g_chk.after_close);
  int native_off = atomic_load(&g_chk.native_off_thread);
  int wake_after = atomic_load(&g_chk.wake_after_close);
  int bad_ev = atomic_load(&g_chk.bad_events);
  int left = atomic_load(&g_chk.watches_left);
  chk_free_loops();
  if (inits != 3 || closes != 3 || off || after || native_off || wake_after ||
      bad_ev || left)
    fail_msg("backend contract violated by the core: %d loop_init, %d "
             "loop_close (want 3 each); %d slot calls off the loop thread; "
             "%d native calls off the loop thread; %d calls after "
             "loop_close; %d wakes after or during loop_close; %d io "
             "starts/modifies with bad events; %d loops closed with watches "
             "left",
             inits, closes, off, native_off, after, wake_after, bad_ev, left);
  assert_clean();
}

/* ======================================================================== */
/* runtime_new_partial_failure: a loop_init failing on the 2nd of 3 loops
 * fails aiob_runtime_new with that error and closes the loop that started. */

static void test_runtime_new_partial_failure(void **state) {
  (void)state;
  const aiob_backend *inner = selected_table();
  assert_non_null(inner);
  chk_setup(inner);
  atomic_store(&g_chk.fail_init_at, 2);
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend_table = &g_chk_table;
  cfg.threads = 3;
  aiob_runtime *rt = NULL;
  int rc = aiob_runtime_new(&rt, &cfg);
  int inits = atomic_load(&g_chk.inits), closes = atomic_load(&g_chk.closes);
  int calls = atomic_load(&g_chk.init_calls);
  chk_free_loops();
  assert_rc(rc, AIOB_EMFILE);
  assert_int_equal(calls, 2); /* the third loop is never started */
  assert_int_equal(inits, 1);
  assert_int_equal(closes, 1);
  assert_int_equal(atomic_load(&g_chk.off_thread), 0);
  assert_int_equal(atomic_load(&g_chk.after_close), 0);
  assert_clean();
}

/* ======================================================================== */

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s <backend|poll> [test-name-filter]\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];
  if (strcmp(g_backend, "poll") == 0)
    g_table = &aiob_test_poll_backend;
  latch_init(&g_frees);

  /* Refused by the kernel or the build: skip, with the reason. */
  aiob_runtime *probe = NULL;
  int rc =
      backend_probe_status("conformance", g_backend, runtime_new(&probe, 1));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);

  if (argc > 2)
    cmocka_set_test_filter(argv[2]);

#define T1(name) cmocka_unit_test_setup_teardown(test_##name, setup1, teardown)
#define T2(name) cmocka_unit_test_setup_teardown(test_##name, setup2, teardown)
#define T0(name)                                                               \
  cmocka_unit_test_setup_teardown(test_##name, setup_none, teardown)
  const struct CMUnitTest tests[] = {
      T1(fifo),
      T2(many_threads),
      T2(spawn_from_task),
      T1(wake_other_thread),
      T1(wake_coalescing),
      T1(self_wake_no_starvation),
      T1(sleep_order),
      T1(sleep_zero_yields),
      T1(sleep_many_short),
      T1(detached_sleeper),
      T1(on_finish),
      T1(cancel_before_first_poll),
      T1(cancel_pending),
      T1(cancel_after_completion),
      T1(cancel_from_inside),
      T2(cancel_wake_race),
      T1(promise_other_thread),
      T1(promise_abandon),
      T1(promise_value_freed_when_waiter_gone),
      T2(join),
      T2(task_locals_inherited),
      T2(fd_readiness),
      T2(shutdown_with_pending),
      T0(runtime_recreate),
      T2(runtime_call),
      T1(error_paths),
      T0(backend_table_versioning),
      T1(coroutine_macros),
      T1(stats),
      T1(join_after_joiner_cancelled),
      T1(spawn_locals_bad_key),
      T1(sleep_forever),
      T0(backend_contract),
      T0(runtime_new_partial_failure),
      T0(spin_policy),
      T1(awake_pushes),
  };
#undef T0
#undef T1
#undef T2

  char group[96];
  snprintf(group, sizeof group, "conformance_%s", g_backend);
  rc = _cmocka_run_group_tests(group, tests, sizeof tests / sizeof tests[0],
                               NULL, NULL);
  latch_destroy(&g_frees);
  return rc;
}
