/* Runtimes and their loop threads.
 *
 * Each loop thread owns one backend loop. Its main loop:
 *   1. accept everything other threads pushed (remote MPSC queue),
 *   2. run up to BUDGET ready tasks (a self-waking task goes to the back),
 *   3. re-arm the backend timer for the earliest sleep,
 *   4. with nothing ready, spin a bounded, adaptive while for remote pushes
 *      (see aiob_runtime_config.spin_us),
 *   5. run one backend iteration: blocking only when nothing is ready,
 *   6. fire expired sleeps.
 * Remote pushes go through the loop's inbox, which calls the backend's wake
 * once per batch (see aiob__inbox). */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Ready tasks polled per iteration before the backend is polled again. */
#define BUDGET 128

void aiob__runtime_ref(aiob_runtime *rt) {
  atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
}

/* ---- Every runtime alive, and fork() ------------------------------------
 *
 * A forked child has only the thread that called fork(). Runtimes it
 * inherited have no loop threads, and their backends' state (an epoll set,
 * an io_uring ring, an eventfd) is shared with the parent: in the child
 * they are marked forked and shut (spawns fail with AIOB_ESHUTDOWN, wakes
 * and pushes are refused, shutdown joins and closes nothing), and the
 * default runtime is forgotten so that the next use creates a fresh one.
 * The locks these handlers take are never held across anything that can
 * wait for another thread's progress. */

static pthread_mutex_t alive_mu = PTHREAD_MUTEX_INITIALIZER;
static aiob_runtime *alive; /* linked through next_alive */

/* Loop threads abandoned by a shutdown that timed out, still running. */
static _Atomic unsigned abandoned_running;

static pthread_mutex_t default_mu = PTHREAD_MUTEX_INITIALIZER;
static aiob_runtime *default_rt;
/* Default runtimes being shut down (default_mu); a new one starts only
 * once they stopped, so their threads never overlap (see default_get). */
static unsigned default_stopping;
static pthread_cond_t default_stopped = PTHREAD_COND_INITIALIZER;

static void alive_link(aiob_runtime *rt) {
  pthread_mutex_lock(&alive_mu);
  rt->next_alive = alive;
  alive = rt;
  pthread_mutex_unlock(&alive_mu);
}

void aiob__runtime_alive(aiob_runtime *rt) { alive_link(rt); }

static void alive_unlink(aiob_runtime *rt) {
  pthread_mutex_lock(&alive_mu);
  for (aiob_runtime **p = &alive; *p; p = &(*p)->next_alive) {
    if (*p == rt) {
      *p = rt->next_alive;
      break;
    }
  }
  pthread_mutex_unlock(&alive_mu);
}

static void fork_prepare(void) {
  pthread_mutex_lock(&default_mu);
  pthread_mutex_lock(&alive_mu);
}

static void fork_parent(void) {
  pthread_mutex_unlock(&alive_mu);
  pthread_mutex_unlock(&default_mu);
}

/* A condition variable on CLOCK_MONOTONIC (timed waits ignore wall-clock
 * jumps). */
void aiob__cond_init_monotonic(pthread_cond_t *cv) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(cv, &ca);
  pthread_condattr_destroy(&ca);
}

static void fork_child(void) {
  for (aiob_runtime *rt = alive; rt; rt = rt->next_alive) {
    rt->forked = true;
    atomic_store(&rt->shut, 1);
    for (unsigned i = 0; i < rt->nloops; i++) {
      aiob_loop *loop = &rt->loops[i];
      aiob__inbox_abandon(&loop->remote);
      /* None of its threads exists here: nothing to wait for or join. An
       * abandoned one keeps its reference, so the child never frees the
       * memory of a runtime its parent abandoned. */
      atomic_store(&loop->exited, 1);
      loop->joined = true;
      loop->abandoned = false;
    }
    /* Other threads' locks may have been copied held. */
    pthread_mutex_init(&rt->shutdown_mu, NULL);
    aiob__cond_init_monotonic(&rt->stop_cv);
    pthread_mutex_init(&rt->wait_mu, NULL);
    aiob__pool_forked(&rt->pool); /* its workers do not exist here either */
  }
  atomic_store(&abandoned_running, 0);
  /* Still reachable through `alive`: the child never frees what the
   * default runtime of its parent was. */
  default_rt = NULL;
  default_stopping = 0; /* their shutdowns ran in the parent's threads */
  pthread_cond_init(&default_stopped, NULL);
  pthread_mutex_unlock(&alive_mu);
  pthread_mutex_unlock(&default_mu);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_register(void) {
  pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* Before any runtime exists, and never with default_mu held (a fork in
 * another thread would wait for it inside the registration). */
static void fork_watch(void) { pthread_once(&fork_once, fork_register); }

void aiob__thread_abandon(aiob_runtime *rt) {
  aiob__runtime_ref(rt);
  atomic_fetch_add(&abandoned_running, 1);
}

void aiob__thread_abandoned_exit(aiob_runtime *rt) {
  aiob__runtime_unref(rt);
  atomic_fetch_sub(&abandoned_running, 1);
}

void aiob__runtime_unref(aiob_runtime *rt) {
  if (atomic_fetch_sub_explicit(&rt->refs, 1, memory_order_acq_rel) != 1)
    return;
  alive_unlink(rt);
  for (unsigned i = 0; i < rt->nloops; i++)
    aiob__heap_free(&rt->loops[i].timers);
  free(rt->loops);
  aiob__pool_destroy(&rt->pool);
  pthread_mutex_destroy(&rt->wait_mu);
  pthread_cond_destroy(&rt->wait_cv);
  pthread_cond_destroy(&rt->stop_cv);
  pthread_mutex_destroy(&rt->shutdown_mu);
  free(rt);
}

/* ---- The loop thread --------------------------------------------------- */

static aiob_task *local_pop(aiob_loop *loop) {
  aiob_task *t = loop->local_head;
  if (!t)
    return NULL;
  aiob__mpsc_node *next =
      atomic_load_explicit(&t->node.next, memory_order_relaxed);
  loop->local_head = next ? AIOB__CONTAINER_OF(next, aiob_task, node) : NULL;
  if (!loop->local_head)
    loop->local_tail = NULL;
  return t;
}

static void local_append(aiob_loop *loop, aiob_task *t) {
  atomic_store_explicit(&t->node.next, NULL, memory_order_relaxed);
  if (loop->local_tail)
    atomic_store_explicit(&loop->local_tail->node.next, &t->node,
                          memory_order_relaxed);
  else
    loop->local_head = t;
  loop->local_tail = t;
}

/* Moves remote pushes to the local FIFO. */
static void accept_queued(aiob_loop *loop) {
  aiob__mpsc_node *n;
  while ((n = aiob__mpsc_pop(&loop->remote.queue)))
    local_append(loop, AIOB__CONTAINER_OF(n, aiob_task, node));
}

/* The same, for a consumer that re-arms before it drains (see aiob__inbox):
 * a hosted loop, and shutdown. */
void aiob__loop_accept_remote(aiob_loop *loop) {
  aiob__inbox_rearm(&loop->remote);
  accept_queued(loop);
}

void aiob__loop_run_ready(aiob_loop *loop) {
  for (int i = 0; i < BUDGET; i++) {
    aiob_task *t = local_pop(loop);
    if (!t)
      return;
    aiob__task_run(t);
  }
}

/* Drops every task the loop knows, releases its fd watches and timer and
 * closes the backend loop, on the loop thread. */
void aiob__loop_close(aiob_loop *loop) {
  aiob__loop_drain_shutdown(loop);
  aiob__fds_close(loop);
  if (loop->timer_armed)
    loop->backend->timer_stop(loop->bl);
  loop->timer_armed = false;
  loop->backend->loop_close(loop->bl);
}

/* Drops every task the loop knows, on the loop thread. */
void aiob__loop_drain_shutdown(aiob_loop *loop) {
  aiob__inbox_close(&loop->remote);
  for (;;) {
    aiob__loop_accept_remote(loop);
    aiob_task *t;
    while ((t = local_pop(loop))) {
      aiob__task_accept(t);
      aiob__task_finish_cancelled(t);
      atomic_fetch_and(&t->state, ~(uint32_t)AIOB__T_QUEUED);
      aiob__task_unref(t);
    }
    if (loop->live.live_next == &loop->live)
      break;
    /* Cancelling may wake other tasks of this loop (joiners): loop again. */
    while (loop->live.live_next != &loop->live)
      aiob__task_finish_cancelled(loop->live.live_next);
  }
  if (!aiob__mpsc_empty(&loop->remote.queue))
    abort(); /* a push after `closed` would be a core bug */
}

/* Contention back-off. A spin pays only while the thread that will push
 * has a CPU of its own; when every CPU is taken (busy processes, more
 * runnable threads than CPUs), the spinning thread may hold the CPU that
 * thread waits for, and the push comes only once the spin gives up. Two
 * signs of it, each a wasted spin:
 *   - the spin was descheduled: two consecutive clock reads inside it lie
 *     more than PREEMPT_GAP_NS apart;
 *   - a spin missed, and the blocking wait after it was ended by a push
 *     within one budget: the push was about to come, but not while the
 *     spin ran.
 * A hit saves a wake-up (tens of us on a VM); a wasted spin costs its whole
 * budget, on the CPU another thread needed. So hits earn one credit
 * (up to CREDIT_MAX), a wasted spin costs CREDIT_WASTE, and below zero the
 * loop stops spinning for BACKOFF_MIN_NS, doubled (up to BACKOFF_MAX_NS)
 * when the next back-off follows within the last one's length after it
 * ended: lasting contention keeps the spin off, where it only made the
 * round trips slower, while a load under which it still hits nearly
 * always (the pushing thread keeps its CPU) keeps it on. No timer ends a
 * back-off: the next push after it restores the budget, so an idle loop
 * still blocks. Loop thread only (the state is the loop's backoff_*). */
#define PREEMPT_GAP_NS (50 * AIOB_USEC)
#define CREDIT_MAX 256
#define CREDIT_WASTE 32
#define BACKOFF_MIN_NS (1 * AIOB_MSEC)
#define BACKOFF_MAX_NS (128 * AIOB_MSEC)

/* A spin was wasted (see above): maybe stop spinning for a while. */
static void spin_wasted(aiob_loop *loop, uint64_t now) {
  if ((loop->backoff_credit -= CREDIT_WASTE) >= 0)
    return;
  uint64_t p = loop->backoff_period;
  if (p && (now < loop->backoff_until || now - loop->backoff_until <= p))
    p = p * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : p * 2;
  else
    p = BACKOFF_MIN_NS;
  loop->backoff_period = p;
  loop->backoff_until = now + p;
  loop->backoff_credit = CREDIT_WASTE; /* one wasted spin free after it */
  loop->spin_budget = 0;
}

/* Takes what other threads pushed, if anything: true if a task came. A
 * queue that is not empty may still give nothing, while a producer is
 * half-way through its push; the loop must then neither count it as work
 * (it would skip its fds and timers for as long as the producer stalls)
 * nor keep from blocking (the producer wakes it once it is done). */
static bool took_push(aiob_loop *loop) {
  if (aiob__mpsc_empty(&loop->remote.queue))
    return false;
  accept_queued(loop);
  return loop->local_head != NULL;
}

/* Spins until a remote push arrives (true) or the budget, the next timer,
 * a stop request or a preemption (see the back-off) ends it (false).
 * The inbox stays signalled (see loop_main), so pushers skip the backend
 * wake. */
static bool spin(aiob_loop *loop) {
  uint64_t start = aiob_now_ns(), end = start + loop->spin_budget;
  aiob_sleep *top = aiob__heap_top(&loop->timers);
  if (top && top->deadline < end)
    end = top->deadline;
  bool hit = false, preempted = false;
  uint64_t now = start;
  while (!hit && now < end &&
         !atomic_load_explicit(&loop->stop, memory_order_relaxed)) {
    if (took_push(loop)) {
      hit = true;
      break;
    }
    aiob__cpu_relax();
    uint64_t prev = now;
    now = aiob_now_ns();
    if (now - prev > PREEMPT_GAP_NS) {
      preempted = true;
      break;
    }
  }
  if (!hit)
    hit = took_push(loop);
  now = aiob_now_ns();
  atomic_fetch_add_explicit(&loop->n_spins, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&loop->n_spin_ns, now - start,
                            memory_order_relaxed);
  if (hit) {
    atomic_fetch_add_explicit(&loop->n_spin_hits, 1, memory_order_relaxed);
    if (loop->backoff_credit < CREDIT_MAX)
      loop->backoff_credit++;
  }
  if (preempted)
    spin_wasted(loop, now);
  else if (!hit && (loop->spin_budget /= 2) < 1000)
    loop->spin_budget = 0; /* pushes come rarely: stop spinning */
  return hit;
}

/* Should the loop spin now? Not if its thread waits for a CPU, unless a
 * trial found the spin to poll half as many tasks again per second
 * (core/spin_gate.c). */
static bool spin_now(aiob_loop *loop) {
  uint64_t polls = atomic_load_explicit(&loop->n_polls, memory_order_relaxed);
  if (aiob__spin_gate_ask(&loop->gate, aiob_now_ns(), polls))
    return true;
  atomic_fetch_add_explicit(&loop->n_spins_skipped, 1, memory_order_relaxed);
  return false;
}

static void loop_main(aiob_loop *loop) {
  uint64_t max = loop->rt->spin_max_ns;
  bool spun = false;
  loop->spin_budget = max;
  loop->backoff_credit = CREDIT_WASTE;
  while (!atomic_load_explicit(&loop->stop, memory_order_acquire)) {
    /* Awake: the inbox stays signalled, so pushers skip the backend wake,
     * until the loop is about to block, when it is re-armed. A loop that
     * re-armed it on every pass would have pushers that come while it
     * runs tasks pay a wake each (measured: a third of a gather's spawns,
     * at half its rate). */
    if (!atomic_load_explicit(&loop->remote.signalled, memory_order_relaxed))
      atomic_store(&loop->remote.signalled, 1);
    accept_queued(loop);
    aiob__loop_run_ready(loop);
    aiob__timers_rearm(loop);
    unsigned flags = loop->local_head ? AIOB_RUN_NOWAIT : 0;
    if (!flags && !spun && loop->spin_budget && spin_now(loop)) {
      /* Either way accept again; after a miss, block without spinning. */
      spun = !spin(loop);
      continue;
    }
    bool missed = spun;
    spun = false;
    if (!flags) {
      /* About to block: from here a push wakes the backend; one that came
       * before is taken at once (the backend still runs, without waiting,
       * for its fds and timers). */
      aiob__inbox_rearm(&loop->remote);
      atomic_thread_fence(memory_order_seq_cst);
      if (took_push(loop))
        flags = AIOB_RUN_NOWAIT;
    }
    uint64_t before = max && !flags ? aiob_now_ns() : 0;
    if (loop->backend->run(loop->bl, flags) < 0)
      break;
    /* A blocking wait that a push ended sooner than a full spin: right
     * after a missed spin, the spin held the push back (a wasted spin);
     * otherwise a spin would have caught it (restore the budget, unless
     * backing off). */
    if (before && !aiob__mpsc_empty(&loop->remote.queue)) {
      uint64_t now = aiob_now_ns();
      if (now - before <= max) {
        if (missed)
          spin_wasted(loop, now);
        else if (now >= loop->backoff_until)
          loop->spin_budget = max;
      }
    }
    if (aiob__heap_top(&loop->timers))
      aiob__timers_process(loop, aiob_now_ns());
  }
}

/* Last thing a loop thread does: tells shutdown waiters it has exited. An
 * abandoned one then drops the reference that kept the runtime's memory
 * for it, and may free it. */
static void loop_exited(aiob_loop *loop) {
  aiob_runtime *rt = loop->rt;
  aiob__current_loop = NULL;
  pthread_mutex_lock(&rt->shutdown_mu);
  atomic_store(&loop->exited, 1);
  bool abandoned = loop->abandoned;
  pthread_cond_broadcast(&rt->stop_cv);
  pthread_mutex_unlock(&rt->shutdown_mu);
  if (abandoned)
    aiob__thread_abandoned_exit(rt);
}

static void *loop_thread(void *arg) {
  aiob_loop *loop = arg;
  aiob_runtime *rt = loop->rt;
  aiob__current_loop = loop;

  void *bl = NULL;
  int rc = loop->backend->loop_init(loop, &rt->options, &bl);
  void *native = NULL;
  if (rc == 0 && AIOB__HAS_SLOT(loop->backend, native))
    native = loop->backend->native(bl); /* slots run on the loop thread */
  pthread_mutex_lock(&rt->wait_mu);
  loop->bl = bl;
  loop->native = native;
  loop->init_status = rc;
  pthread_cond_broadcast(&rt->wait_cv);
  pthread_mutex_unlock(&rt->wait_mu);
  if (rc < 0) {
    loop_exited(loop);
    return NULL;
  }

  loop_main(loop);
  /* May wait for native requests still in flight (libuv runs its loop
   * until every request completed): a shutdown with a deadline stops
   * waiting for this thread, see aiob_runtime_shutdown_timeout. */
  aiob__loop_close(loop);
  loop_exited(loop);
  return NULL;
}

/* ---- Runtime lifecycle ------------------------------------------------- */

void aiob_runtime_config_init(aiob_runtime_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->threads = 1;
  cfg->spin_us = AIOB_SPIN_US_DEFAULT;
  cfg->blocking_threads = AIOB_BLOCKING_THREADS_DEFAULT;
}

/* Why the last configuration on this thread was refused (aiob_runtime_
 * config_error). */
static _Thread_local char config_error[256];

static int config_fail(int rc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int config_fail(int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(config_error, sizeof config_error, fmt, ap);
  va_end(ap);
  return rc;
}

const char *aiob_runtime_config_error(void) { return config_error; }

/* The compiled-in backends' names: "uv, event, uring". */
static void backend_names(char *buf, size_t n) {
  size_t len = 0;
  buf[0] = 0;
  const aiob_backend *b;
  for (unsigned i = 0; (b = aiob_backend_at(i)) && len < n; i++)
    len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? ", " : "", b->name);
}

#define MAX_THREADS 1024

/* Checks a configuration and finds its backend; on failure says why
 * (aiob_runtime_config_error). out may be NULL. */
static int config_check(const aiob_runtime_config *cfg,
                        const aiob_backend **out) {
  config_error[0] = 0;
  if (cfg->threads < 1 || cfg->threads > MAX_THREADS)
    return config_fail(AIOB_EINVAL, "threads is %u: it must be 1 to %u",
                       cfg->threads, MAX_THREADS);
  if (cfg->spin_us > AIOB_SPIN_US_MAX)
    return config_fail(AIOB_EINVAL, "spin_us is %u: at most %u", cfg->spin_us,
                       AIOB_SPIN_US_MAX);
  if (cfg->blocking_threads > AIOB_BLOCKING_THREADS_MAX)
    return config_fail(AIOB_EINVAL, "blocking_threads is %u: at most %u",
                       cfg->blocking_threads, AIOB_BLOCKING_THREADS_MAX);
  const aiob_backend *b;
  if (cfg->backend_table) {
    b = cfg->backend_table;
    if (aiob_backend_validate(b) < 0)
      return config_fail(AIOB_EINVAL,
                         "the backend table at %p is not usable by this core "
                         "(ABI, size, name or a required function)",
                         (const void *)b);
  } else {
    b = cfg->backend ? aiob_backend_find(cfg->backend) : aiob_backend_at(0);
    if (!b) {
      char names[128];
      backend_names(names, sizeof names);
      return config_fail(AIOB_ENOENT,
                         "no backend \"%s\" in this build of aiobridge (it "
                         "has: %s)",
                         cfg->backend ? cfg->backend : "(default)", names);
    }
  }
  if (out)
    *out = b;
  return 0;
}

/* ---- Stopping: ask, wait with a deadline, join or abandon ---------------
 *
 * shutdown_mu is held by the functions below. Loop threads take it only to
 * mark themselves exited, after which they touch nothing of the runtime
 * (an abandoned one: nothing but its reference), so joining a thread that
 * has exited, with the lock held, waits for nothing. The blocking pool's
 * workers are stopped, waited for and abandoned alongside (the pool's lock
 * is taken after shutdown_mu, never before). */

/* Asks every running loop thread and the blocking pool to stop, once. */
static void request_stop(aiob_runtime *rt) {
  if (rt->stop_requested)
    return;
  rt->stop_requested = true;
  atomic_store(&rt->shut, 1);
  /* First: a job still queued never starts once the shutdown began (the
   * loops drop its task, which drops its arg). */
  aiob__pool_stop(&rt->pool);
  for (unsigned i = 0; i < rt->nloops; i++) {
    aiob_loop *loop = &rt->loops[i];
    if (atomic_load(&loop->exited)) /* never started, or forked */
      continue;
    atomic_store_explicit(&loop->stop, 1, memory_order_release);
    aiob__loop_wake(loop);
  }
}

/* Waits until every loop thread exited, or until *deadline
 * (CLOCK_MONOTONIC; NULL: no limit), then joins those that exited and
 * that nobody joined or abandoned. Returns how many still run. */
static unsigned wait_loops(aiob_runtime *rt, const struct timespec *deadline) {
  unsigned left;
  for (;;) {
    left = 0;
    for (unsigned i = 0; i < rt->nloops; i++)
      left += !atomic_load(&rt->loops[i].exited);
    if (!left)
      break;
    if (!deadline)
      pthread_cond_wait(&rt->stop_cv, &rt->shutdown_mu);
    else if (pthread_cond_timedwait(&rt->stop_cv, &rt->shutdown_mu, deadline) ==
             ETIMEDOUT)
      break;
  }
  for (unsigned i = 0; i < rt->nloops; i++) {
    aiob_loop *loop = &rt->loops[i];
    if (atomic_load(&loop->exited) && !loop->joined && !loop->abandoned) {
      pthread_join(loop->thread, NULL);
      loop->joined = true;
    }
  }
  return left;
}

/* Gives up on the loop threads still running: detached, never joined, each
 * holding a reference until it exits (loop_exited). */
static void abandon_loops(aiob_runtime *rt) {
  wait_loops(rt, &(struct timespec){0, 0}); /* joins those that exited */
  for (unsigned i = 0; i < rt->nloops; i++) {
    aiob_loop *loop = &rt->loops[i];
    if (atomic_load(&loop->exited) || loop->abandoned)
      continue;
    loop->abandoned = true;
    aiob__thread_abandon(rt);
    pthread_detach(loop->thread);
  }
  aiob__pool_abandon(&rt->pool);
}

/* Stops and joins every loop thread started so far (creation failed). */
static void stop_started(aiob_runtime *rt) {
  pthread_mutex_lock(&rt->shutdown_mu);
  request_stop(rt);
  wait_loops(rt, NULL);
  aiob__pool_wait(&rt->pool, NULL); /* none started yet */
  pthread_mutex_unlock(&rt->shutdown_mu);
}

/* The absolute CLOCK_MONOTONIC time timeout_ns from now, or NULL for no
 * limit (UINT64_MAX, or past what 64 bits of nanoseconds hold). */
static struct timespec *deadline_in(uint64_t timeout_ns, struct timespec *ts) {
  uint64_t now = aiob_now_ns();
  if (timeout_ns == UINT64_MAX || timeout_ns > UINT64_MAX - now)
    return NULL;
  uint64_t at = now + timeout_ns;
  ts->tv_sec = (time_t)(at / AIOB_SEC);
  ts->tv_nsec = (long)(at % AIOB_SEC);
  return ts;
}

/* The caller runs on one of rt's loop threads or blocking-pool workers,
 * which a shutdown of rt would wait for. */
static bool own_thread(const aiob_runtime *rt) {
  return aiob_runtime_current_loop(rt) >= 0 || aiob__current_pool == &rt->pool;
}

int aiob__runtime_alloc(const aiob_runtime_config *cfg, unsigned nloops,
                        aiob_runtime **out) {
  aiob_runtime_config defaults;
  if (!out)
    return AIOB_EINVAL;
  if (!cfg) {
    aiob_runtime_config_init(&defaults);
    cfg = &defaults;
  }
  const aiob_backend *backend = NULL;
  int rc = config_check(cfg, &backend);
  if (rc < 0)
    return rc;

  fork_watch();
  unsigned workers = cfg->blocking_threads ? cfg->blocking_threads
                                           : AIOB_BLOCKING_THREADS_DEFAULT;
  aiob_runtime *rt = calloc(1, sizeof *rt);
  aiob_loop *loops = calloc(nloops, sizeof *loops);
  if (!rt || !loops || aiob__pool_init(&rt->pool, rt, workers) < 0) {
    free(rt);
    free(loops);
    return AIOB_ENOMEM;
  }
  atomic_init(&rt->refs, 1);
  rt->backend = backend;
  rt->options = cfg->backend_options;
  rt->spin_max_ns = (uint64_t)cfg->spin_us * 1000;
  rt->nloops = nloops;
  rt->loops = loops;
  pthread_mutex_init(&rt->shutdown_mu, NULL);
  aiob__cond_init_monotonic(&rt->stop_cv);
  pthread_mutex_init(&rt->wait_mu, NULL);
  aiob__cond_init_monotonic(&rt->wait_cv);
  /* Loops without a thread (yet) count as exited and joined. */
  for (unsigned i = 0; i < rt->nloops; i++) {
    aiob_loop *loop = &loops[i];
    loop->rt = rt;
    loop->index = i;
    loop->backend = backend;
    aiob__inbox_init(&loop->remote);
    loop->live.live_next = loop->live.live_prev = &loop->live;
    aiob__heap_init(&loop->timers);
    atomic_init(&loop->exited, 1);
    loop->joined = true;
  }
  *out = rt;
  return 0;
}

int aiob_runtime_new(aiob_runtime **out, const aiob_runtime_config *cfg) {
  aiob_runtime *rt;
  int rc = aiob__runtime_alloc(cfg, cfg ? cfg->threads : 1, &rt);
  if (rc < 0)
    return rc;
  aiob_loop *loops = rt->loops;
  unsigned started = 0;
  for (; started < rt->nloops; started++) {
    aiob_loop *loop = &loops[started];
    loop->init_status = 1; /* pending */
    atomic_store(&loop->exited, 0);
    loop->joined = false;
    if (pthread_create(&loop->thread, NULL, loop_thread, loop) != 0) {
      atomic_store(&loop->exited, 1);
      loop->joined = true;
      rc = AIOB_EAGAIN;
      break;
    }
    pthread_mutex_lock(&rt->wait_mu);
    while (loop->init_status == 1)
      pthread_cond_wait(&rt->wait_cv, &rt->wait_mu);
    pthread_mutex_unlock(&rt->wait_mu);
    if (loop->init_status < 0) {
      rc = loop->init_status;
      pthread_join(loop->thread, NULL); /* it marked itself exited */
      loop->joined = true;
      break;
    }
  }
  alive_link(rt);
  if (rc < 0) {
    stop_started(rt);
    aiob__runtime_unref(rt);
    return rc;
  }
  *out = rt;
  return 0;
}

int aiob_runtime_current_loop(const aiob_runtime *rt) {
  aiob_loop *cur = aiob__current_loop;
  return cur && cur->rt == rt ? (int)cur->index : -1;
}

int aiob_runtime_shutdown_timeout(aiob_runtime *rt, uint64_t timeout_ns,
                                  aiob_shutdown_info *info) {
  if (!rt)
    return AIOB_EINVAL;
  if (own_thread(rt))
    return AIOB_EDEADLK;
  if (rt->hosted)
    return aiob__hosted_shutdown(rt, info);
  struct timespec ts, *deadline = deadline_in(timeout_ns, &ts);
  pthread_mutex_lock(&rt->shutdown_mu);
  request_stop(rt); /* forked: nothing to stop, see fork_child */
  unsigned left = wait_loops(rt, deadline);
  unsigned workers_left = aiob__pool_wait(&rt->pool, deadline);
  rt->timed_out = left > 0 || workers_left > 0;
  pthread_mutex_unlock(&rt->shutdown_mu);
  if (info) {
    aiob_runtime_stats st;
    aiob_runtime_stats_get(rt, &st);
    *info = (aiob_shutdown_info){.loops = rt->nloops,
                                 .loops_left = left,
                                 .tasks_left = st.tasks_live,
                                 .workers_left = workers_left};
  }
  return left || workers_left ? AIOB_ETIMEDOUT : 0;
}

int aiob_runtime_shutdown(aiob_runtime *rt) {
  return aiob_runtime_shutdown_timeout(rt, UINT64_MAX, NULL);
}

int aiob_runtime_loop_running(const aiob_runtime *rt, unsigned index) {
  if (!rt || index >= rt->nloops)
    return AIOB_EINVAL;
  return !atomic_load(&rt->loops[index].exited);
}

unsigned aiob_runtime_abandoned_threads(void) {
  return atomic_load(&abandoned_running);
}

void aiob_runtime_free(aiob_runtime *rt) {
  if (!rt)
    return;
  if (own_thread(rt))
    abort(); /* freeing a runtime from its own loop or worker thread */
  pthread_mutex_lock(&rt->shutdown_mu);
  bool timed_out = rt->timed_out;
  if (timed_out)
    abandon_loops(rt);
  pthread_mutex_unlock(&rt->shutdown_mu);
  if (!timed_out)
    aiob_runtime_shutdown(rt);
  aiob__runtime_unref(rt);
}

const char *aiob_runtime_backend_name(const aiob_runtime *rt) {
  return rt->backend->name;
}

unsigned aiob_runtime_threads(const aiob_runtime *rt) { return rt->nloops; }

unsigned aiob_runtime_spin_us(const aiob_runtime *rt) {
  return (unsigned)(rt->spin_max_ns / 1000);
}

unsigned aiob_runtime_blocking_threads(const aiob_runtime *rt) {
  return rt->pool.max;
}

void *aiob_runtime_native(aiob_runtime *rt, unsigned index) {
  if (!rt || index >= rt->nloops || atomic_load(&rt->shut))
    return NULL;
  return rt->loops[index].native;
}

void aiob_runtime_stats_get(const aiob_runtime *rt, aiob_runtime_stats *st) {
  memset(st, 0, sizeof *st);
  for (unsigned i = 0; i < rt->nloops; i++) {
    aiob_loop *l = &rt->loops[i];
    st->tasks_spawned +=
        atomic_load_explicit(&l->n_spawned, memory_order_relaxed);
    st->tasks_completed +=
        atomic_load_explicit(&l->n_completed, memory_order_relaxed);
    st->tasks_cancelled +=
        atomic_load_explicit(&l->n_cancelled, memory_order_relaxed);
    st->polls += atomic_load_explicit(&l->n_polls, memory_order_relaxed);
    st->loop_wakes += atomic_load_explicit(&l->n_wakes, memory_order_relaxed);
    st->spins += atomic_load_explicit(&l->n_spins, memory_order_relaxed);
    st->spin_hits +=
        atomic_load_explicit(&l->n_spin_hits, memory_order_relaxed);
    st->spin_ns += atomic_load_explicit(&l->n_spin_ns, memory_order_relaxed);
    st->spins_skipped +=
        atomic_load_explicit(&l->n_spins_skipped, memory_order_relaxed);
  }
  uint64_t done = st->tasks_completed + st->tasks_cancelled;
  st->tasks_live = st->tasks_spawned > done ? st->tasks_spawned - done : 0;
  const aiob__pool *p = &rt->pool;
  st->blocking_jobs_run = atomic_load_explicit(&p->n_run, memory_order_relaxed);
  st->blocking_jobs_cancelled =
      atomic_load_explicit(&p->n_cancelled, memory_order_relaxed);
  st->blocking_workers =
      atomic_load_explicit(&p->n_workers, memory_order_relaxed);
}

/* ---- Plain callbacks on a loop thread ---------------------------------- */

struct call {
  aiob_call_fn fn;
  void *arg;
  bool called;
};

static aiob_poll call_poll(aiob_task *task, void *p) {
  (void)task;
  struct call *c = p;
  c->called = true;
  c->fn(c->arg, 0);
  return AIOB_READY;
}

static void call_drop(void *p) {
  struct call *c = p;
  if (!c->called)
    c->fn(c->arg, AIOB_ECANCELED);
  free(c);
}

static const aiob_task_vtable call_vtable = {.poll = call_poll,
                                             .drop = call_drop};

int aiob_runtime_call(aiob_runtime *rt, unsigned index, aiob_call_fn fn,
                      void *arg) {
  if (!rt || !fn || index >= rt->nloops)
    return AIOB_EINVAL;
  struct call *c = malloc(sizeof *c);
  if (!c)
    return AIOB_ENOMEM;
  *c = (struct call){.fn = fn, .arg = arg, .called = false};
  aiob_spawn_opts opts;
  aiob_spawn_opts_init(&opts);
  opts.loop = (int)index;
  opts.no_inherit = 1;
  int rc = aiob_spawn_ex(rt, &opts, &call_vtable, c, NULL);
  if (rc < 0)
    free(c);
  return rc;
}

/* ---- The default runtime ----------------------------------------------- */

static aiob_runtime_config default_cfg;
static bool default_configured;
static bool default_used; /* stays set: the choice never changes after use */

int aiob_runtime_default_configure(const aiob_runtime_config *cfg) {
  if (!cfg)
    return config_fail(AIOB_EINVAL, "no configuration (NULL)");
  int rc = config_check(cfg, NULL);
  if (rc < 0)
    return rc;
  pthread_mutex_lock(&default_mu);
  if (default_used) {
    rc = config_fail(AIOB_EBUSY, "the default runtime was already used: "
                                 "configure it before its first use");
  } else {
    default_cfg = *cfg;
    default_configured = true;
  }
  pthread_mutex_unlock(&default_mu);
  return rc;
}

/* The default runtime, created if needed, with a reference if `ref`. */
static int default_get(aiob_runtime **out, bool ref) {
  if (!out)
    return AIOB_EINVAL;
  fork_watch();
  pthread_mutex_lock(&default_mu);
  /* A fresh default runtime waits for the previous one to stop, except on
   * a loop or worker thread, which the shutdown in progress may be
   * joining. */
  while (!default_rt && default_stopping && !aiob__current_loop &&
         !aiob__current_pool)
    pthread_cond_wait(&default_stopped, &default_mu);
  int rc = 0;
  if (!default_rt) {
    aiob_runtime_config cfg;
    if (default_configured)
      cfg = default_cfg;
    else
      aiob_runtime_config_init(&cfg);
    const char *env = getenv("AIOBRIDGE_BACKEND");
    if (env && env[0]) {
      cfg.backend = env;
      cfg.backend_table = NULL;
    }
    env = getenv("AIOBRIDGE_SPIN_US");
    if (env && env[0]) {
      char *end;
      errno = 0;
      unsigned long us = strtoul(env, &end, 10);
      if (errno || *end || env[0] == '-' || us > AIOB_SPIN_US_MAX)
        rc = config_fail(AIOB_EINVAL,
                         "AIOBRIDGE_SPIN_US=%s: not a number of microseconds "
                         "from 0 to %u",
                         env, AIOB_SPIN_US_MAX);
      cfg.spin_us = (unsigned)us;
    }
    if (rc == 0)
      rc = aiob_runtime_new(&default_rt, &cfg);
    default_used = default_used || rc == 0;
  }
  if (rc == 0) {
    *out = default_rt;
    if (ref)
      aiob__runtime_ref(default_rt);
  }
  pthread_mutex_unlock(&default_mu);
  return rc;
}

int aiob_runtime_default(aiob_runtime **out) { return default_get(out, false); }

int aiob_runtime_default_acquire(aiob_runtime **out) {
  return default_get(out, true);
}

int aiob__runtime_default_try_acquire(aiob_runtime **out) {
  pthread_mutex_lock(&default_mu);
  aiob_runtime *rt = default_rt;
  if (rt) {
    aiob__runtime_ref(rt);
    *out = rt;
  }
  pthread_mutex_unlock(&default_mu);
  return rt ? 0 : AIOB_EAGAIN;
}

void aiob_runtime_release(aiob_runtime *rt) {
  if (!rt)
    return;
  if (atomic_load_explicit(&rt->refs, memory_order_acquire) == 1 &&
      !atomic_load(&rt->shut))
    abort(); /* the last reference of a running runtime: a caller's bug */
  aiob__runtime_unref(rt);
}

int aiob_runtime_default_peek(void (*fn)(aiob_runtime *rt, void *arg),
                              void *arg) {
  if (!fn)
    return AIOB_EINVAL;
  pthread_mutex_lock(&default_mu);
  aiob_runtime *rt = default_rt;
  if (rt)
    fn(rt, arg);
  pthread_mutex_unlock(&default_mu);
  return rt ? 0 : AIOB_ENOENT;
}

int aiob_runtime_default_shutdown_timeout(uint64_t timeout_ns,
                                          aiob_shutdown_info *info) {
  if (info)
    *info = (aiob_shutdown_info){0};
  pthread_mutex_lock(&default_mu);
  aiob_runtime *rt = default_rt;
  if (rt && own_thread(rt)) {
    pthread_mutex_unlock(&default_mu);
    return AIOB_EDEADLK;
  }
  default_rt = NULL;
  if (!rt) {
    pthread_mutex_unlock(&default_mu);
    return 0;
  }
  default_stopping++;
  pthread_mutex_unlock(&default_mu);
  /* Without the lock: its drops may use it. After a timeout, free
   * abandons the loops still running, and a fresh runtime may start. */
  int rc = aiob_runtime_shutdown_timeout(rt, timeout_ns, info);
  aiob_runtime_free(rt);
  pthread_mutex_lock(&default_mu);
  default_stopping--;
  pthread_cond_broadcast(&default_stopped);
  pthread_mutex_unlock(&default_mu);
  return rc;
}

int aiob_runtime_default_shutdown(void) {
  return aiob_runtime_default_shutdown_timeout(UINT64_MAX, NULL);
}
