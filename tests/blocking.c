/* Blocking work on the runtime's pool of worker threads (aiob_blocking,
 * aiob_spawn_blocking): results and errors come back, outputs and args are
 * freed exactly once on the documented thread, the pool is bounded and
 * FIFO, jobs cancelled before they start never run, jobs cancelled while
 * they run see aiob_blocking_cancelled() and are freed by their worker,
 * shutdowns drop queued jobs and wait for, or abandon, running ones, and a
 * forked child gets a fresh pool.
 *
 *   blocking <uv|event|uring> [test-name-filter]
 *
 * Jobs that must stay running block on a gate the test opens, or wait for
 * aiob_blocking_cancelled(); every wait is bounded (WAIT_TIMEOUT) and no
 * test asserts wall-clock time. A backend the kernel refuses (io_uring) is
 * a skip (exit 77). Runs under ASan and TSan too, except the fork() case
 * (see tests/fork.c for why). */
#include "aiobridge.h"

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

static const char *g_backend; /* argv[1] */

static int runtime_new(aiob_runtime **out, unsigned loops, unsigned workers) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend = g_backend;
  cfg.threads = loops;
  cfg.blocking_threads = workers;
  return aiob_runtime_new(out, &cfg);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define FORK_UNDER_SANITIZER 1
#else
#define FORK_UNDER_SANITIZER 0
#endif

/* ---- Shared bookkeeping of one test ------------------------------------ */

enum kind {
  K_VALUE,        /* returns 0 and a value (n) */
  K_ERROR,        /* returns `ret`, no value */
  K_POSITIVE,     /* returns 5 and a value: a contract violation */
  K_GATE,         /* blocks until the gate opens, then K_VALUE */
  K_UNTIL_CANCEL, /* waits for aiob_blocking_cancelled(), then K_VALUE */
  K_SPIN,         /* yields a while, stopping early once cancelled */
  K_SHUTDOWN,     /* calls the runtime's shutdown from inside fn */
};

#define MAX_JOBS 512

typedef struct ctx {
  aiob_runtime *rt;
  /* The gate K_GATE jobs block on. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int open;
  latch started; /* fn calls entered */
  latch drops;   /* drop_arg calls */
  latch frees;   /* values freed */
  atomic_int running, max_running;
  atomic_int order; /* next position in the order fns started */
  atomic_int ran[MAX_JOBS], dropped[MAX_JOBS], position[MAX_JOBS];
  atomic_int saw_cancel[MAX_JOBS];
  atomic_int dropped_on_loop[MAX_JOBS];
  atomic_int shutdown_rc;
} ctx;

static ctx *ctx_new(aiob_runtime *rt) {
  ctx *c = xcalloc(1, sizeof *c);
  c->rt = rt;
  pthread_mutex_init(&c->mu, NULL);
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(&c->cv, &a);
  pthread_condattr_destroy(&a);
  latch_init(&c->started);
  latch_init(&c->drops);
  latch_init(&c->frees);
  atomic_store(&c->shutdown_rc, 1);
  return c;
}

static void ctx_free(ctx *c) {
  pthread_cond_destroy(&c->cv);
  pthread_mutex_destroy(&c->mu);
  latch_destroy(&c->started);
  latch_destroy(&c->drops);
  latch_destroy(&c->frees);
  free(c);
}

static void gate_open(ctx *c) {
  pthread_mutex_lock(&c->mu);
  c->open = 1;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
}

/* Bounded: a gate never opened is a failed check, not a hang. */
static void gate_wait(ctx *c) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += (time_t)(WAIT_TIMEOUT / AIOB_SEC);
  pthread_mutex_lock(&c->mu);
  while (!c->open)
    if (pthread_cond_timedwait(&c->cv, &c->mu, &ts) == ETIMEDOUT)
      break;
  CHECK(c->open);
  pthread_mutex_unlock(&c->mu);
}

/* Polls aiob_blocking_cancelled() (bounded); 1 once it turned non-zero. */
static int wait_cancelled(void) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (!aiob_blocking_cancelled()) {
    if (aiob_now_ns() > deadline)
      return 0;
    sleep_thread_ns(50 * AIOB_USEC);
  }
  return 1;
}

/* A job's value: which thread made it, so its free can check its own. */
typedef struct val {
  int n;
  int on_worker; /* free_value must run on the thread that made it */
  pthread_t maker;
  ctx *c;
} val;

static void val_free(void *p) {
  val *v = p;
  if (v->on_worker)
    CHECK(pthread_equal(pthread_self(), v->maker));
  latch_add(&v->c->frees, 1);
  free(v);
}

static val *val_new(ctx *c, int n, int on_worker) {
  val *v = malloc(sizeof *v);
  CHECK(v != NULL);
  if (v)
    *v = (val){.n = n, .on_worker = on_worker, .maker = pthread_self(), .c = c};
  return v;
}

/* A job's arg, freed by drop_arg (ASan sees a second drop). Made on the
 * test thread or a loop thread: no cmocka asserts. */
typedef struct jarg {
  ctx *c;
  int id;
  enum kind kind;
  int ret;
  int spins;
  int free_on_worker;
} jarg;

static jarg *jarg_new(ctx *c, int id, enum kind kind) {
  jarg *a = calloc(1, sizeof *a);
  CHECK(a != NULL && id >= 0 && id < MAX_JOBS);
  if (!a)
    abort();
  a->c = c;
  a->id = id;
  a->kind = kind;
  return a;
}

static void jarg_drop(void *p) {
  jarg *a = p;
  ctx *c = a->c;
  int ran = atomic_load(&c->ran[a->id]);
  int on_loop = aiob_runtime_current_loop(c->rt) >= 0;
  /* After fn: on its worker; never ran: on the task's loop thread. */
  CHECK_INT(on_loop, ==, !ran);
  atomic_store(&c->dropped_on_loop[a->id], on_loop);
  CHECK_INT(atomic_fetch_add(&c->dropped[a->id], 1), ==, 0);
  free(a);
  latch_add(&c->drops, 1);
}

static void note_running(ctx *c, int delta) {
  int now = atomic_fetch_add(&c->running, delta) + delta;
  int max = atomic_load(&c->max_running);
  while (now > max && !atomic_compare_exchange_weak(&c->max_running, &max, now))
    ;
}

static int job_fn(void *p, aiob_output *out) {
  jarg *a = p;
  ctx *c = a->c;
  CHECK(out != NULL && out->value == NULL && out->free_value == NULL);
  CHECK(aiob_task_current() == NULL);
  CHECK_INT(aiob_runtime_current_loop(c->rt), ==, -1);
  CHECK_INT(atomic_fetch_add(&c->ran[a->id], 1), ==, 0);
  atomic_store(&c->position[a->id], atomic_fetch_add(&c->order, 1));
  note_running(c, 1);
  latch_add(&c->started, 1);
  int rc = 0, value = 1;
  switch (a->kind) {
  case K_VALUE:
    break;
  case K_ERROR:
    rc = a->ret;
    value = 0;
    break;
  case K_POSITIVE:
    rc = 5;
    break;
  case K_GATE:
    gate_wait(c);
    break;
  case K_UNTIL_CANCEL:
    atomic_store(&c->saw_cancel[a->id], wait_cancelled());
    break;
  case K_SPIN: /* busy: sched_yield would give the core away on a loaded
                  machine for a whole time slice each time */
    for (int i = 0; i < a->spins && !aiob_blocking_cancelled(); i++)
      for (volatile int k = 0; k < 1000; k++)
        ;
    atomic_store(&c->saw_cancel[a->id], aiob_blocking_cancelled() != 0);
    break;
  case K_SHUTDOWN:
    atomic_store(&c->shutdown_rc,
                 aiob_runtime_shutdown_timeout(c->rt, 0, NULL) ==
                             AIOB_EDEADLK &&
                         aiob_runtime_shutdown(c->rt) == AIOB_EDEADLK
                     ? AIOB_EDEADLK
                     : 0);
    break;
  }
  note_running(c, -1);
  if (value) {
    out->value = val_new(c, a->id, a->free_on_worker);
    out->free_value = val_free;
  }
  out->status = 12345; /* ignored: the return value is the status */
  return rc;
}

static aiob_task *spawn_job(ctx *c, jarg *a) {
  aiob_task *t = NULL;
  assert_rc(aiob_spawn_blocking(c->rt, NULL, job_fn, a, jarg_drop, &t), 0);
  return t;
}

/* Takes a finished task's output: its status, and the value's n (or -1). */
static int take(aiob_task *t, int *n) {
  aiob_output o = {0};
  int rc = aiob_task_take_output(t, &o);
  if (rc != 0)
    fail_msg("aiob_task_take_output = %s", errname(rc));
  *n = o.value ? ((val *)o.value)->n : -1;
  int status = o.status;
  aiob_output_clear(&o);
  return status;
}

/* ---- A task awaiting the leaf: signals `queued` at its first PENDING --- */

typedef struct qtask {
  aiob_blocking b;
  latch *queued;
  int pended;
} qtask;

static aiob_poll qtask_poll(aiob_task *t, void *p) {
  qtask *q = p;
  aiob_output out;
  if (aiob_blocking_poll(t, &q->b, &out) == AIOB_PENDING) {
    if (!q->pended++)
      latch_add(q->queued, 1);
    return AIOB_PENDING;
  }
  return aiob_task_forward(t, &out);
}

static void qtask_drop(void *p) {
  qtask *q = p;
  aiob_blocking_stop(&q->b); /* no-op once armed: the core disarmed it */
  free(q);
}

static const aiob_task_vtable qtask_vt = {.poll = qtask_poll,
                                          .drop = qtask_drop};

/* Spawns a task whose job is queued (or running) when this returns. */
static aiob_task *spawn_queued(ctx *c, jarg *a, latch *queued) {
  qtask *q = xcalloc(1, sizeof *q);
  aiob_blocking_init(&q->b, job_fn, a, jarg_drop);
  q->queued = queued;
  long before = latch_get(queued);
  aiob_task *t = NULL;
  assert_rc(aiob_spawn(c->rt, &qtask_vt, q, &t), 0);
  latch_ok(queued, before + 1);
  return t;
}

/* ======================================================================== */
/* result_and_error: a value comes back with status 0, a negative return is */
/* the status, a positive one is AIOB_EBADSTATUS (its value still freed); fn*/
/* runs off the loop threads and drop_arg once, on the worker, after it.    */
static void test_result_and_error(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 2), 0);
  ctx *c = ctx_new(rt);
  assert_int_equal(aiob_blocking_cancelled(), 0); /* not in a job */

  jarg *e = jarg_new(c, 1, K_ERROR);
  e->ret = AIOB_EIO;
  aiob_task *tv = spawn_job(c, jarg_new(c, 0, K_VALUE));
  aiob_task *te = spawn_job(c, e);
  aiob_task *tp = spawn_job(c, jarg_new(c, 2, K_POSITIVE));
  wait_ok(tv);
  wait_ok(te);
  wait_ok(tp);
  int n;
  assert_rc(take(tv, &n), 0);
  assert_int_equal(n, 0);
  assert_rc(take(te, &n), AIOB_EIO);
  assert_int_equal(n, -1);
  assert_rc(take(tp, &n), AIOB_EBADSTATUS);
  assert_int_equal(n, 2);
  /* drop_arg ran before the task was woken. */
  assert_int_equal(latch_get(&c->drops), 3);
  assert_int_equal(latch_get(&c->frees), 2);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(atomic_load(&c->dropped[i]), 1);
    assert_int_equal(atomic_load(&c->dropped_on_loop[i]), 0);
  }
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_run, 3);
  assert_int_equal(st.blocking_jobs_cancelled, 0);
  assert_true(st.blocking_workers >= 1 && st.blocking_workers <= 2);
  aiob_task_release(tv);
  aiob_task_release(te);
  aiob_task_release(tp);
  aiob_runtime_free(rt);
  ctx_free(c);
}

/* ======================================================================== */
/* value_freed_once: a value nobody takes is freed exactly once: by the     */
/* last handle's release, by a leaf polled with a NULL out, by a task that  */
/* forwards it and is never joined.                                         */
typedef struct nulltask {
  aiob_blocking b;
  int polled_again;
} nulltask;

static aiob_poll nulltask_poll(aiob_task *t, void *p) {
  nulltask *q = p;
  if (aiob_blocking_poll(t, &q->b, NULL) == AIOB_PENDING)
    return AIOB_PENDING;
  /* Polled again after READY: the status, no value. */
  aiob_output again = {.status = 1, .value = &again};
  CHECK(aiob_blocking_poll(t, &q->b, &again) == AIOB_READY);
  CHECK_INT(again.status, ==, 0);
  CHECK(again.value == NULL);
  q->polled_again = 1;
  return AIOB_READY;
}

static void nulltask_drop(void *p) {
  nulltask *q = p;
  CHECK(q->polled_again);
  aiob_blocking_stop(&q->b); /* after READY: a no-op */
  free(q);
}

static const aiob_task_vtable nulltask_vt = {.poll = nulltask_poll,
                                             .drop = nulltask_drop};

static void test_value_freed_once(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2, 2), 0);
  ctx *c = ctx_new(rt);
  /* Released without taking. */
  aiob_task *t = spawn_job(c, jarg_new(c, 0, K_VALUE));
  wait_ok(t);
  assert_int_equal(latch_get(&c->frees), 0);
  aiob_task_release(t); /* the last reference, or the loop's: it frees */
  latch_ok(&c->frees, 1);
  /* A leaf polled with out == NULL. */
  nulltask *q = xcalloc(1, sizeof *q);
  aiob_blocking_init(&q->b, job_fn, jarg_new(c, 1, K_VALUE), jarg_drop);
  assert_rc(aiob_spawn(rt, &nulltask_vt, q, &t), 0);
  wait_ok(t);
  assert_int_equal(latch_get(&c->frees), 2);
  aiob_task_release(t);
  /* Detached tasks: their values go with them. */
  for (int i = 2; i < 10; i++)
    assert_rc(aiob_spawn_blocking(rt, NULL, job_fn, jarg_new(c, i, K_VALUE),
                                  jarg_drop, NULL),
              0);
  latch_ok(&c->frees, 10);
  latch_ok(&c->drops, 10);
  aiob_runtime_free(rt);
  assert_int_equal(latch_get(&c->frees), 10);
  ctx_free(c);
}

/* ======================================================================== */
/* bounded: 4 workers, 200 jobs. The first 4 block on a gate until the     */
/* test has seen 4 run at once; at no point do more than 4 run, no more     */
/* than 4 workers start, and every job completes.                           */
static void test_bounded(void **state) {
  (void)state;
  enum { N = 200 };
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2, 4), 0);
  assert_int_equal(aiob_runtime_blocking_threads(rt), 4);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 0); /* lazy */
  ctx *c = ctx_new(rt);
  aiob_task *t[N];
  for (int i = 0; i < N; i++)
    t[i] = spawn_job(c, jarg_new(c, i, K_GATE));
  latch_ok(&c->started, 4);
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 4);
  assert_int_equal(atomic_load(&c->max_running), 4);
  gate_open(c);
  for (int i = 0; i < N; i++) {
    wait_ok(t[i]);
    int n;
    assert_rc(take(t[i], &n), 0);
    assert_int_equal(n, i);
    aiob_task_release(t[i]);
  }
  assert_int_equal(atomic_load(&c->max_running), 4);
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 4);
  assert_int_equal(st.blocking_jobs_run, N);
  assert_int_equal(latch_get(&c->drops), N);
  aiob_runtime_free(rt);
  ctx_free(c);
}

/* ======================================================================== */
/* serial: with blocking_threads = 1 jobs run one at a time, in the order   */
/* they were queued (one loop thread: spawn order).                         */
static void test_serial(void **state) {
  (void)state;
  enum { N = 40 };
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 1), 0);
  ctx *c = ctx_new(rt);
  aiob_task *t[N];
  for (int i = 0; i < N; i++) {
    jarg *a = jarg_new(c, i, K_SPIN);
    a->spins = 20;
    t[i] = spawn_job(c, a);
  }
  for (int i = 0; i < N; i++) {
    wait_ok(t[i]);
    assert_status(t[i], 0);
    aiob_task_release(t[i]);
    assert_int_equal(atomic_load(&c->position[i]), i);
  }
  assert_int_equal(atomic_load(&c->max_running), 1);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 1);
  assert_int_equal(st.blocking_jobs_run, N);
  aiob_runtime_free(rt);
  ctx_free(c);
}

/* ======================================================================== */
/* cancel_before_start: both workers blocked on the gate, 10 more jobs      */
/* queued, then cancelled (tasks cancelled, and tasks whose leaf is         */
/* stopped): their fns never run, their args are dropped once, on the loop  */
/* thread; the gate jobs finish normally once it opens.                     */
typedef struct stoptask {
  aiob_blocking b;
  aiob_waker *waker; /* handed to the test: a wake makes it stop */
  atomic_int *stop;
  latch *queued;
  int pended;
} stoptask;

static aiob_poll stoptask_poll(aiob_task *t, void *p) {
  stoptask *s = p;
  if (atomic_load(s->stop)) {
    aiob_blocking_stop(&s->b);
    aiob_output out;
    CHECK(aiob_blocking_poll(t, &s->b, &out) == AIOB_READY);
    CHECK_INT(out.status, ==, AIOB_ECANCELED);
    aiob_blocking_stop(&s->b); /* idempotent */
    aiob_task_fail(t, out.status);
    return AIOB_READY;
  }
  aiob_output out;
  if (aiob_blocking_poll(t, &s->b, &out) == AIOB_PENDING) {
    if (!s->pended++)
      latch_add(s->queued, 1);
    return AIOB_PENDING;
  }
  return aiob_task_forward(t, &out);
}

static void stoptask_drop(void *p) {
  stoptask *s = p;
  aiob_blocking_stop(&s->b);
  free(s);
}

static const aiob_task_vtable stoptask_vt = {.poll = stoptask_poll,
                                             .drop = stoptask_drop};

static void test_cancel_before_start(void **state) {
  (void)state;
  enum { Q = 10 };
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2, 2), 0);
  ctx *c = ctx_new(rt);
  latch queued;
  latch_init(&queued);
  aiob_task *g0 = spawn_job(c, jarg_new(c, 0, K_GATE));
  aiob_task *g1 = spawn_job(c, jarg_new(c, 1, K_GATE));
  latch_ok(&c->started, 2);

  aiob_task *t[Q];
  atomic_int stop;
  atomic_store(&stop, 0);
  aiob_waker *wakers[Q] = {0};
  for (int i = 0; i < Q; i++) {
    jarg *a = jarg_new(c, 2 + i, K_VALUE);
    if (i % 2 == 0) {
      t[i] = spawn_queued(c, a, &queued);
    } else { /* stopped through its leaf */
      stoptask *s = xcalloc(1, sizeof *s);
      aiob_blocking_init(&s->b, job_fn, a, jarg_drop);
      s->stop = &stop;
      s->queued = &queued;
      long before = latch_get(&queued);
      assert_rc(aiob_spawn(rt, &stoptask_vt, s, &t[i]), 0);
      latch_ok(&queued, before + 1);
      wakers[i] = aiob_task_waker(t[i]);
    }
  }
  atomic_store(&stop, 1);
  for (int i = 0; i < Q; i++) {
    if (i % 2 == 0)
      aiob_task_cancel(t[i]);
    else
      aiob_waker_wake(wakers[i]);
  }
  for (int i = 0; i < Q; i++) {
    wait_ok(t[i]);
    assert_status(t[i], AIOB_ECANCELED);
    aiob_task_release(t[i]);
    aiob_waker_release(wakers[i]);
    assert_int_equal(atomic_load(&c->dropped[2 + i]), 1);
    assert_int_equal(atomic_load(&c->dropped_on_loop[2 + i]), 1);
  }
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_cancelled, Q);
  assert_int_equal(st.blocking_jobs_run, 0);

  gate_open(c);
  wait_ok(g0);
  wait_ok(g1);
  assert_status(g0, 0);
  assert_status(g1, 0);
  aiob_task_release(g0);
  aiob_task_release(g1);
  for (int i = 0; i < Q; i++)
    assert_int_equal(atomic_load(&c->ran[2 + i]), 0);
  assert_int_equal(latch_get(&c->started), 2);
  assert_int_equal(latch_get(&c->drops), Q + 2);
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_run, 2);
  aiob_runtime_free(rt);
  latch_destroy(&queued);
  ctx_free(c);
}

/* ======================================================================== */
/* cancel_while_running: the task is cancelled while its fn runs: the task  */
/* finishes (AIOB_ECANCELED) without waiting for fn, fn sees                */
/* aiob_blocking_cancelled() turn non-zero, and its value and arg are freed */
/* once, on the worker. Same with the leaf stopped by its task (a timeout). */
typedef struct timeout_task {
  int co;
  aiob_blocking b;
  aiob_sleep sleep;
  latch *queued;
} timeout_task;

static aiob_poll timeout_poll(aiob_task *t, void *p) {
  timeout_task *s = p;
  aiob_output out;
  if (aiob_blocking_poll(t, &s->b, &out) == AIOB_READY)
    return aiob_task_forward(t, &out);
  if (!s->co++) {
    aiob_sleep_init(&s->sleep, AIOB_MSEC);
    latch_add(s->queued, 1);
  }
  if (aiob_sleep_poll(t, &s->sleep, NULL) == AIOB_PENDING)
    return AIOB_PENDING;
  aiob_blocking_stop(&s->b); /* timed out: give the job up */
  aiob_task_fail(t, AIOB_ETIMEDOUT);
  return AIOB_READY;
}

static void timeout_drop(void *p) {
  timeout_task *s = p;
  aiob_blocking_stop(&s->b);
  free(s);
}

static const aiob_task_vtable timeout_vt = {.poll = timeout_poll,
                                            .drop = timeout_drop};

static void test_cancel_while_running(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 2), 0);
  ctx *c = ctx_new(rt);
  jarg *a = jarg_new(c, 0, K_UNTIL_CANCEL);
  a->free_on_worker = 1;
  aiob_task *t = spawn_job(c, a);
  latch_ok(&c->started, 1);
  aiob_task_cancel(t);
  wait_ok(t);
  assert_status(t, AIOB_ECANCELED);
  aiob_task_release(t);
  latch_ok(&c->frees, 1); /* checked: on the worker that made it */
  latch_ok(&c->drops, 1);
  assert_int_equal(atomic_load(&c->saw_cancel[0]), 1);
  assert_int_equal(atomic_load(&c->dropped_on_loop[0]), 0);

  /* The leaf stopped by its task: a timeout that fires first. */
  latch queued;
  latch_init(&queued);
  timeout_task *s = xcalloc(1, sizeof *s);
  a = jarg_new(c, 1, K_UNTIL_CANCEL);
  a->free_on_worker = 1;
  aiob_blocking_init(&s->b, job_fn, a, jarg_drop);
  s->queued = &queued;
  assert_rc(aiob_spawn(rt, &timeout_vt, s, &t), 0);
  wait_ok(t);
  assert_status(t, AIOB_ETIMEDOUT);
  aiob_task_release(t);
  latch_ok(&c->drops, 2);
  /* It may have been stopped before a worker took it: then it never ran. */
  int ran = atomic_load(&c->ran[1]);
  latch_ok(&c->frees, 1 + ran);
  assert_int_equal(atomic_load(&c->saw_cancel[1]), ran);
  assert_int_equal(atomic_load(&c->dropped_on_loop[1]), !ran);

  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_run + st.blocking_jobs_cancelled, 2);
  aiob_runtime_free(rt);
  latch_destroy(&queued);
  ctx_free(c);
}

/* ======================================================================== */
/* cancel_storm: 400 jobs on 2 loops and 4 workers, cancelled in random     */
/* order at random moments by another thread while they queue, run and     */
/* finish: every arg dropped exactly once, every value freed exactly once,  */
/* the counts add up.                                                       */
typedef struct storm {
  aiob_task **t;
  int n;
  unsigned seed;
  latch done;
} storm;

static void *canceller(void *p) {
  storm *s = p;
  int *perm = malloc((size_t)s->n * sizeof *perm);
  CHECK(perm != NULL);
  if (!perm)
    return NULL;
  for (int i = 0; i < s->n; i++)
    perm[i] = i;
  for (int i = s->n - 1; i > 0; i--) {
    int j = (int)(rand_r(&s->seed) % (unsigned)(i + 1));
    int x = perm[i];
    perm[i] = perm[j];
    perm[j] = x;
  }
  for (int i = 0; i < s->n; i++) {
    /* A random short pause: a busy wait, not sched_yield, which on a
     * loaded machine gives the core away for a whole time slice each time
     * (400 cancels then outlast the test's time bound). */
    for (volatile unsigned k = rand_r(&s->seed) % 4096; k > 0; k--)
      ;
    aiob_task_cancel(s->t[perm[i]]);
  }
  free(perm);
  latch_add(&s->done, 1);
  return NULL;
}

static void test_cancel_storm(void **state) {
  (void)state;
  enum { N = 400 };
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2, 4), 0);
  ctx *c = ctx_new(rt);
  aiob_task **t = xcalloc(N, sizeof *t);
  for (int i = 0; i < N; i++) {
    jarg *a = jarg_new(c, i, K_SPIN);
    a->spins = i % 200;
    t[i] = spawn_job(c, a);
  }
  storm s = {.t = t, .n = N, .seed = (unsigned)aiob_now_ns()};
  latch_init(&s.done);
  print_message("cancel_storm seed %u\n", s.seed);
  pthread_t th = start_thread(canceller, &s);
  int completed = 0, cancelled = 0, taken = 0;
  for (int i = 0; i < N; i++) {
    wait_ok(t[i]);
    int n, rc = take(t[i], &n);
    if (rc == 0) {
      completed++;
      taken += n == i;
      assert_int_equal(n, i);
    } else {
      assert_rc(rc, AIOB_ECANCELED);
      cancelled++;
    }
  }
  latch_ok(&s.done, 1);
  pthread_join(th, NULL);
  for (int i = 0; i < N; i++)
    aiob_task_release(t[i]);
  latch_ok(&c->drops, N); /* cancelled while running: after fn, later */
  int ran = 0;
  for (int i = 0; i < N; i++) {
    assert_int_equal(atomic_load(&c->dropped[i]), 1);
    ran += atomic_load(&c->ran[i]);
  }
  latch_ok(&c->frees, ran); /* every fn made one value */
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_run, ran);
  assert_true(st.blocking_jobs_cancelled <= (uint64_t)(N - ran));
  assert_true(st.blocking_workers <= 4);
  assert_int_equal(completed + cancelled, N);
  assert_true(completed <= ran);
  assert_int_equal(taken, completed);
  print_message("cancel_storm: %d completed, %d cancelled (%d of them ran, "
                "%llu dropped from the queue)\n",
                completed, cancelled, ran - completed,
                (unsigned long long)st.blocking_jobs_cancelled);
  aiob_runtime_free(rt);
  assert_int_equal(latch_get(&c->frees), ran);
  latch_destroy(&s.done);
  free(t);
  ctx_free(c);
}

/* ======================================================================== */
/* in_task: the leaf between other awaits of an ordinary task: sleep, run a */
/* job, yield, then return a value computed from the job's.                 */
typedef struct seq {
  int co;
  aiob_sleep sleep;
  aiob_blocking b;
  aiob_output out;
  ctx *c;
  int id;
} seq;

static void free_int(void *p) { free(p); }

static aiob_poll seq_poll(aiob_task *t, void *p) {
  seq *q = p;
  AIOB_BEGIN(&q->co);
  aiob_sleep_init(&q->sleep, AIOB_MSEC);
  AIOB_AWAIT(&q->co, aiob_sleep_poll(t, &q->sleep, NULL));
  aiob_blocking_init(&q->b, job_fn, jarg_new(q->c, q->id, K_VALUE), jarg_drop);
  AIOB_AWAIT(&q->co, aiob_blocking_poll(t, &q->b, &q->out));
  CHECK_INT(q->out.status, ==, 0);
  CHECK(q->out.value != NULL);
  aiob_sleep_init(&q->sleep, 0);
  AIOB_AWAIT(&q->co, aiob_sleep_poll(t, &q->sleep, NULL));
  {
    int *r = malloc(sizeof *r);
    CHECK(r != NULL);
    if (r) {
      *r = q->out.value ? ((val *)q->out.value)->n * 6 : -1;
      aiob_task_return(t, r, free_int);
    }
    aiob_output_clear(&q->out);
  }
  AIOB_END(&q->co);
}

static void seq_drop(void *p) {
  seq *q = p;
  aiob_blocking_stop(&q->b); /* zeroed (never initialised): a no-op */
  aiob_output_clear(&q->out);
  free(q);
}

static const aiob_task_vtable seq_vt = {.poll = seq_poll, .drop = seq_drop};

static void test_in_task(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 2, 2), 0);
  ctx *c = ctx_new(rt);
  seq *q = xcalloc(1, sizeof *q);
  q->c = c;
  q->id = 7;
  aiob_task *t;
  assert_rc(aiob_spawn(rt, &seq_vt, q, &t), 0);
  wait_ok(t);
  aiob_output o;
  assert_rc(aiob_task_take_output(t, &o), 0);
  assert_rc(o.status, 0);
  assert_non_null(o.value);
  assert_int_equal(*(int *)o.value, 42);
  aiob_output_clear(&o);
  aiob_task_release(t);
  assert_int_equal(latch_get(&c->frees), 1);
  assert_int_equal(latch_get(&c->drops), 1);

  /* Cancelled at once: most likely before the leaf was initialised (then
   * there is nothing to drop); else its job is dropped or run once. */
  q = xcalloc(1, sizeof *q);
  q->c = c;
  q->id = 8;
  assert_rc(aiob_spawn(rt, &seq_vt, q, &t), 0);
  aiob_task_cancel(t);
  wait_ok(t);
  aiob_task_release(t);
  aiob_runtime_free(rt);
  long drops = latch_get(&c->drops);
  assert_true(drops == 1 || drops == 2);
  assert_true(atomic_load(&c->ran[8]) <= drops - 1);
  assert_true(atomic_load(&c->dropped[8]) == drops - 1);
  ctx_free(c);
}

/* ======================================================================== */
/* shutdown_queued: one worker busy until cancelled, 5 jobs queued behind   */
/* it. aiob_runtime_shutdown: the queued jobs never run and their args are  */
/* dropped on the loop thread; the running one sees                         */
/* aiob_blocking_cancelled() (the shutdown began) and is waited for.        */
static void test_shutdown_queued(void **state) {
  (void)state;
  enum { Q = 5 };
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 1), 0);
  ctx *c = ctx_new(rt);
  latch queued;
  latch_init(&queued);
  aiob_task *busy = spawn_queued(c, jarg_new(c, 0, K_UNTIL_CANCEL), &queued);
  latch_ok(&c->started, 1);
  aiob_task *t[Q];
  for (int i = 0; i < Q; i++)
    t[i] = spawn_queued(c, jarg_new(c, 1 + i, K_VALUE), &queued);

  aiob_shutdown_info info;
  assert_rc(aiob_runtime_shutdown_timeout(rt, UINT64_MAX, &info), 0);
  assert_int_equal(info.loops_left, 0);
  assert_int_equal(info.workers_left, 0);
  assert_int_equal(info.tasks_left, 0);
  assert_int_equal(atomic_load(&c->saw_cancel[0]), 1);
  assert_int_equal(latch_get(&c->drops), Q + 1);
  for (int i = 0; i < Q; i++) {
    assert_int_equal(atomic_load(&c->ran[1 + i]), 0);
    assert_int_equal(atomic_load(&c->dropped_on_loop[1 + i]), 1);
    assert_status(t[i], AIOB_ECANCELED);
    aiob_task_release(t[i]);
  }
  /* The busy job returned once the shutdown began: its task was dropped
   * with it (the value freed unseen), or got its output just before. */
  int n, rc = take(busy, &n);
  assert_true(rc == AIOB_ECANCELED || (rc == 0 && n == 0));
  aiob_task_release(busy);
  assert_int_equal(latch_get(&c->frees), 1);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_jobs_run, 1);
  assert_int_equal(st.blocking_jobs_cancelled, Q);
  /* Refused afterwards; the caller keeps its arg. */
  jarg *late = jarg_new(c, 10, K_VALUE);
  aiob_task *lt = NULL;
  assert_rc(aiob_spawn_blocking(rt, NULL, job_fn, late, jarg_drop, &lt),
            AIOB_ESHUTDOWN);
  assert_null(lt);
  assert_int_equal(latch_get(&c->drops), Q + 1);
  free(late);
  aiob_runtime_free(rt);
  latch_destroy(&queued);
  ctx_free(c);
}

/* ======================================================================== */
/* shutdown_stuck: a job that ignores cancellation keeps its worker past    */
/* the deadline: aiob_runtime_shutdown_timeout returns AIOB_ETIMEDOUT with  */
/* workers_left 1, aiob_runtime_free abandons the worker without waiting;   */
/* released later, the fn returns, its value and arg are freed on the       */
/* worker and the runtime's memory with the worker's exit (ASan: no use     */
/* after free, no leak). The same through the default runtime, which        */
/* restarts at once with a fresh pool.                                      */
/* Waits (bounded) until `n` abandoned threads run: those that get unstuck
 * count themselves out last thing. */
static void abandoned_reach(unsigned n) {
  uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
  while (aiob_runtime_abandoned_threads() != n) {
    if (aiob_now_ns() > deadline)
      fail_msg("%u abandoned thread(s) running, want %u",
               aiob_runtime_abandoned_threads(), n);
    sleep_thread_ns(AIOB_MSEC);
  }
}

static void stuck_on(aiob_runtime *rt, int is_default) {
  ctx *c = ctx_new(rt);
  jarg *a = jarg_new(c, 0, K_GATE);
  a->free_on_worker = 1;
  aiob_task *t = spawn_job(c, a);
  latch_ok(&c->started, 1);

  aiob_shutdown_info info;
  if (is_default) {
    assert_rc(aiob_runtime_default_shutdown_timeout(20 * AIOB_MSEC, &info),
              AIOB_ETIMEDOUT);
    assert_int_equal(info.workers_left, 1);
  } else {
    assert_rc(aiob_runtime_shutdown_timeout(rt, 20 * AIOB_MSEC, &info),
              AIOB_ETIMEDOUT);
    assert_int_equal(info.workers_left, 1);
    /* The loop thread stops in its own time; the worker never does. */
    uint64_t deadline = aiob_now_ns() + WAIT_TIMEOUT;
    while (aiob_runtime_loop_running(rt, 0) == 1 && aiob_now_ns() < deadline)
      assert_rc(aiob_runtime_shutdown_timeout(rt, AIOB_MSEC, &info),
                AIOB_ETIMEDOUT);
    assert_rc(aiob_runtime_shutdown_timeout(rt, 0, &info), AIOB_ETIMEDOUT);
    assert_int_equal(info.loops_left, 0);
    assert_int_equal(info.workers_left, 1);
    assert_int_equal(info.tasks_left, 0); /* the task was dropped */
    aiob_runtime_free(rt);                /* abandons, does not wait */
  }
  wait_ok(t); /* (the default's loop thread may have been abandoned too) */
  assert_status(t, AIOB_ECANCELED);
  aiob_task_release(t); /* the abandoned worker keeps the memory alone */
  abandoned_reach(1);   /* the worker; a loop thread was not stuck */
  assert_int_equal(latch_get(&c->drops), 0);

  gate_open(c);
  latch_ok(&c->drops, 1);
  latch_ok(&c->frees, 1);
  abandoned_reach(0);
  assert_int_equal(atomic_load(&c->dropped_on_loop[0]), 0);
  ctx_free(c);
}

static void test_shutdown_stuck(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 2), 0);
  stuck_on(rt, 0);

  assert_rc(aiob_runtime_default(&rt), 0);
  stuck_on(rt, 1);
  /* A fresh default runtime, with a fresh pool. */
  assert_rc(aiob_runtime_default(&rt), 0);
  ctx *c = ctx_new(rt);
  aiob_task *t = spawn_job(c, jarg_new(c, 0, K_VALUE));
  wait_ok(t);
  assert_status(t, 0);
  aiob_task_release(t);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 1);
  assert_int_equal(st.blocking_jobs_run, 1);
  assert_rc(aiob_runtime_default_shutdown(), 0);
  ctx_free(c);
}

/* ======================================================================== */
/* config: blocking_threads defaults (config_init and 0), bounds (above     */
/* AIOB_BLOCKING_THREADS_MAX: AIOB_EINVAL for new and default_configure),   */
/* and no worker starts before the first job.                               */
static void test_config(void **state) {
  (void)state;
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  assert_int_equal(cfg.blocking_threads, AIOB_BLOCKING_THREADS_DEFAULT);
  cfg.backend = g_backend;
  cfg.blocking_threads = AIOB_BLOCKING_THREADS_MAX + 1;
  aiob_runtime *rt = NULL;
  assert_rc(aiob_runtime_new(&rt, &cfg), AIOB_EINVAL);
  assert_null(rt);
  assert_rc(aiob_runtime_default_configure(&cfg), AIOB_EINVAL);

  cfg.blocking_threads = AIOB_BLOCKING_THREADS_MAX;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_int_equal(aiob_runtime_blocking_threads(rt),
                   AIOB_BLOCKING_THREADS_MAX);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 0);
  aiob_runtime_free(rt);

  cfg.blocking_threads = 0;
  assert_rc(aiob_runtime_new(&rt, &cfg), 0);
  assert_int_equal(aiob_runtime_blocking_threads(rt),
                   AIOB_BLOCKING_THREADS_DEFAULT);
  ctx *c = ctx_new(rt);
  aiob_task *t = spawn_job(c, jarg_new(c, 0, K_VALUE));
  wait_ok(t);
  aiob_task_release(t);
  aiob_runtime_stats_get(rt, &st);
  assert_int_equal(st.blocking_workers, 1);
  aiob_runtime_free(rt);
  ctx_free(c);
}

/* ======================================================================== */
/* errors: bad arguments are AIOB_EINVAL and the caller keeps its arg; a    */
/* shutdown of the runtime from inside one of its jobs is AIOB_EDEADLK.     */
static void test_errors(void **state) {
  (void)state;
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 1), 0);
  ctx *c = ctx_new(rt);
  jarg *a = jarg_new(c, 0, K_VALUE);
  aiob_task *t = NULL;
  assert_rc(aiob_spawn_blocking(NULL, NULL, job_fn, a, jarg_drop, &t),
            AIOB_EINVAL);
  assert_rc(aiob_spawn_blocking(rt, NULL, NULL, a, jarg_drop, &t), AIOB_EINVAL);
  aiob_spawn_opts opts;
  aiob_spawn_opts_init(&opts);
  opts.loop = 5;
  assert_rc(aiob_spawn_blocking(rt, &opts, job_fn, a, jarg_drop, &t),
            AIOB_EINVAL);
  assert_null(t);
  assert_int_equal(latch_get(&c->drops), 0);
  /* With valid options the job runs (and the arg is the job's). */
  opts.loop = 0;
  assert_rc(aiob_spawn_blocking(rt, &opts, job_fn, a, jarg_drop, &t), 0);
  wait_ok(t);
  assert_status(t, 0);
  aiob_task_release(t);

  t = spawn_job(c, jarg_new(c, 1, K_SHUTDOWN));
  wait_ok(t);
  assert_status(t, 0);
  aiob_task_release(t);
  assert_rc(atomic_load(&c->shutdown_rc), AIOB_EDEADLK);
  assert_int_equal(latch_get(&c->drops), 2);
  aiob_runtime_free(rt);
  ctx_free(c);
}

/* ======================================================================== */
/* fork_child: a child forked while a worker runs a job and another idles   */
/* has none of them: the inherited runtime refuses jobs and shuts down      */
/* without waiting, and a fresh default runtime runs jobs on a fresh pool.  */
/* The parent's pool keeps working.                                         */
static int child_fn(void *arg, aiob_output *out) {
  (void)out;
  return *(int *)arg;
}

static int child_main(aiob_runtime *inherited) {
  int ret = 0;
  aiob_task *t = NULL;
  if (aiob_spawn_blocking(inherited, NULL, child_fn, &ret, NULL, &t) !=
      AIOB_ESHUTDOWN)
    return 1;
  if (aiob_runtime_shutdown(inherited) != 0)
    return 2;
  aiob_runtime *d;
  if (aiob_runtime_default(&d) != 0)
    return 3;
  int neg = AIOB_EPIPE;
  if (aiob_spawn_blocking(d, NULL, child_fn, &neg, NULL, &t) != 0)
    return 4;
  if (aiob_task_wait(t, WAIT_TIMEOUT) != 0)
    return 5;
  aiob_output o;
  if (aiob_task_take_output(t, &o) != 0 || o.status != AIOB_EPIPE)
    return 6;
  aiob_task_release(t);
  aiob_runtime_stats st;
  aiob_runtime_stats_get(d, &st);
  if (st.blocking_workers != 1 || st.blocking_jobs_run != 1)
    return 7;
  if (aiob_runtime_default_shutdown_timeout(WAIT_TIMEOUT, NULL) != 0)
    return 8;
  return 0;
}

static void test_fork_child(void **state) {
  (void)state;
  if (FORK_UNDER_SANITIZER) {
    print_message("skipped: a forked child cannot start threads under this "
                  "sanitizer runtime\n");
    skip();
  }
  aiob_runtime *rt;
  assert_rc(runtime_new(&rt, 1, 2), 0);
  ctx *c = ctx_new(rt);
  aiob_task *t0 = spawn_job(c, jarg_new(c, 0, K_VALUE));
  aiob_task *t1 = spawn_job(c, jarg_new(c, 1, K_VALUE));
  wait_ok(t0);
  wait_ok(t1);
  aiob_task *busy = spawn_job(c, jarg_new(c, 2, K_GATE));
  latch_ok(&c->started, 3);

  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0)
    _exit(child_main(rt));
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

  gate_open(c);
  wait_ok(busy);
  assert_status(busy, 0);
  aiob_task *t3 = spawn_job(c, jarg_new(c, 3, K_VALUE));
  wait_ok(t3);
  assert_status(t3, 0);
  aiob_task_release(t0);
  aiob_task_release(t1);
  aiob_task_release(busy);
  aiob_task_release(t3);
  aiob_runtime_free(rt);
  assert_int_equal(latch_get(&c->drops), 4);
  ctx_free(c);
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
  int rc =
      backend_probe_status("blocking", g_backend, runtime_new(&probe, 1, 0));
  if (rc != 0)
    return rc;
  aiob_runtime_free(probe);
  if (argc > 2)
    cmocka_set_test_filter(argv[2]);

  const struct CMUnitTest tests[] = {
      T(result_and_error),
      T(value_freed_once),
      T(bounded),
      T(serial),
      T(cancel_before_start),
      T(cancel_while_running),
      T(cancel_storm),
      T(in_task),
      T(shutdown_queued),
      T(shutdown_stuck),
      T(config),
      T(errors),
      T(fork_child),
  };
  char group[64];
  snprintf(group, sizeof group, "blocking_%s", g_backend);
  return _cmocka_run_group_tests(group, tests, sizeof tests / sizeof tests[0],
                                 NULL, NULL);
}
