/* aiobridge core — internal declarations shared by the core sources.
 * Nothing here is public; non-static symbols are aiob__-prefixed. */
#ifndef AIOBRIDGE_CORE_INTERNAL_H
#define AIOBRIDGE_CORE_INTERNAL_H

#include "aiobridge.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define AIOB__CONTAINER_OF(ptr, type, member)                                  \
  ((type *)((char *)(ptr)-offsetof(type, member)))

/* Should a thread spin for a push before it blocks (core/spin_gate.c)?
 * Yes, unless the thread waits for a CPU and a trial did not find the spin
 * to get half as many again of the caller's operations done per second.
 * One per spinning thread, owned by it; starts zeroed
 * (AIOB__SPIN_GATE_INIT) and holds nothing to free. */
typedef struct aiob__spin_gate {
  int tid;             /* the thread the last sample was of */
  bool no_proc;        /* /proc/thread-self/schedstat cannot be opened */
  uint64_t delay;      /* run delay at the last sample, if delay_ok */
  uint64_t delay_at;   /* when the last sample was tried (0: never) */
  bool delay_ok;       /* delay is a reading of the thread that asks */
  bool waits;          /* the last sample's answer */
  int phase;           /* open, trial or held (see spin_gate.c) */
  bool spin;           /* the answer in this trial window, or while held */
  bool verdict;        /* the last trial's answer (if hold is set) */
  unsigned windows;    /* trial windows done */
  uint64_t at, ops_at; /* start of this window or hold, and ops then */
  uint64_t sum[2][2];  /* per answer (0 no spin, 1 spin): ops, ns */
  uint64_t hold;       /* the length of this hold (0: no trial yet) */
} aiob__spin_gate;
#define AIOB__SPIN_GATE_INIT                                                   \
  { 0 }
/* Asks before a spin: now is aiob_now_ns(), ops the caller's count of
 * operations done so far (any monotonic counter of useful work). */
bool aiob__spin_gate_ask(aiob__spin_gate *g, uint64_t now, uint64_t ops);
/* The same with the CPU-wait sign given (what ask reads from /proc). */
bool aiob__spin_gate_decide(aiob__spin_gate *g, uint64_t now, uint64_t ops,
                            bool waits);

/* A spinning thread's pause between two reads of shared memory. */
static inline void aiob__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* ---- Intrusive MPSC queue (Vyukov): many producers, one consumer -------- */

typedef struct aiob__mpsc_node {
  _Atomic(struct aiob__mpsc_node *) next;
} aiob__mpsc_node;

typedef struct aiob__mpsc {
  _Atomic(aiob__mpsc_node *) tail; /* producers exchange here */
  aiob__mpsc_node *head;           /* consumer only */
  aiob__mpsc_node stub;
} aiob__mpsc;

void aiob__mpsc_init(aiob__mpsc *q);
/* Thread-safe, wait-free. */
void aiob__mpsc_push(aiob__mpsc *q, aiob__mpsc_node *n);
/* Consumer only. NULL when empty or when a producer is half-way through a
 * push (it will have notified the consumer, see aiob__inbox). */
aiob__mpsc_node *aiob__mpsc_pop(aiob__mpsc *q);
/* Consumer only: true when no node is queued (a racing push may follow). */
bool aiob__mpsc_empty(aiob__mpsc *q);

/* ---- Inbox: an MPSC queue whose consumer is woken once per batch -------
 *
 * Producers push from any thread and call the wake function only when the
 * inbox goes from idle to signalled; the consumer clears `signalled` before
 * it drains, so a push the drain misses wakes it again (a push is complete
 * before its producer reads `signalled`). A consumer that looks at the
 * queue again before it waits may instead keep `signalled` set while it is
 * awake and clear it only before it waits, then look once more (a runtime
 * loop thread does: pushes that come while it runs tasks wake nobody).
 * Closing refuses further pushes
 * and waits for those in flight: afterwards nothing the wake function uses
 * is touched by producers any more, and the consumer may free it. Used by
 * the loops' remote queues and by the Python bridge's per-loop ports. */

typedef struct aiob__inbox {
  aiob__mpsc queue;
  _Atomic int signalled;    /* consumer owes a drain */
  _Atomic unsigned pushers; /* producers inside the guard */
  _Atomic int closed;       /* no more pushes accepted */
} aiob__inbox;

void aiob__inbox_init(aiob__inbox *in);

/* Thread-safe. Pushes n and, on the idle -> signalled transition, calls
 * wake(arg) inside the guard. false once closed: n was not queued and the
 * caller keeps it. */
static inline bool aiob__inbox_push(aiob__inbox *in, aiob__mpsc_node *n,
                                    void (*wake)(void *), void *arg) {
  atomic_fetch_add(&in->pushers, 1);
  if (atomic_load(&in->closed)) {
    atomic_fetch_sub(&in->pushers, 1);
    return false;
  }
  aiob__mpsc_push(&in->queue, n);
  if (!atomic_exchange(&in->signalled, 1))
    wake(arg);
  atomic_fetch_sub(&in->pushers, 1);
  return true;
}

/* Thread-safe: calls wake(arg) unless the inbox is closed (same guard). */
void aiob__inbox_wake(aiob__inbox *in, void (*wake)(void *), void *arg);

/* Consumer: clears `signalled`; call before draining. */
static inline void aiob__inbox_rearm(aiob__inbox *in) {
  atomic_store(&in->signalled, 0);
}

/* Consumer: closes the inbox and returns once no push is in flight. false
 * if it was already closed. */
bool aiob__inbox_close(aiob__inbox *in);

/* After fork(), in the child: closes the inbox without waiting. Producers
 * that were mid-push in the parent do not exist here, and their counts,
 * copied mid-update, would never go back to zero. */
static inline void aiob__inbox_abandon(aiob__inbox *in) {
  atomic_store(&in->closed, 1);
}

static inline bool aiob__inbox_closed(aiob__inbox *in) {
  return atomic_load(&in->closed) != 0;
}

/* ---- Single-waiter slot ------------------------------------------------
 *
 * One task waits for one event (a task to finish, a promise to complete):
 * the slot holds 0, the waiting task (with a reference), or
 * AIOB__SLOT_DONE once the event happened. A waiter that was dropped
 * without clearing its registration is taken over by the next one. */

typedef _Atomic(uintptr_t) aiob__slot;
#define AIOB__SLOT_DONE ((uintptr_t)1)

/* Waiter side, from self's poll: 1 when the event happened, 0 after
 * registering self (PENDING: self is woken by aiob__slot_done), or
 * AIOB_EBUSY when another live task already waits. */
int aiob__slot_wait(aiob__slot *s, aiob_task *self);
/* Event side, once: marks the slot done and wakes the waiter. */
void aiob__slot_done(aiob__slot *s);
/* Waiter side, giving up: drops a registered waiter (not a done mark). */
void aiob__slot_clear(aiob__slot *s);

/* True once the promise's completer side completed or abandoned it (a
 * completion in progress on another thread may still make it true). */
bool aiob__promise_completed(aiob_promise *p);

/* ---- Timer heap (per loop, loop thread only) --------------------------- */

typedef struct aiob__timer_heap {
  aiob_sleep **items;
  size_t len, cap;
} aiob__timer_heap;

void aiob__heap_init(aiob__timer_heap *h);
void aiob__heap_free(aiob__timer_heap *h);
int aiob__heap_push(aiob__timer_heap *h, aiob_sleep *s);
void aiob__heap_remove(aiob__timer_heap *h, aiob_sleep *s);
static inline aiob_sleep *aiob__heap_top(const aiob__timer_heap *h) {
  return h->len ? h->items[0] : NULL;
}

/* ---- Tasks ------------------------------------------------------------- */

/* Task state bits (aiob_task.state). */
enum {
  AIOB__T_QUEUED = 1u << 0,   /* in a ready queue (holds a reference) */
  AIOB__T_RUNNING = 1u << 1,  /* poll in progress */
  AIOB__T_NOTIFIED = 1u << 2, /* woken while running: poll again */
  AIOB__T_CANCEL = 1u << 3,   /* cancellation requested */
  AIOB__T_FINISHED = 1u << 4, /* dropped; output published */
  AIOB__T_TAKEN = 1u << 5,    /* output value taken */
  AIOB__T_ACCEPTED = 1u << 6, /* seen by its loop (in the live list) */
};

struct aiob_task {
  aiob__mpsc_node node; /* ready-queue link (remote or local) */
  _Atomic uint32_t state;
  _Atomic uint32_t refs;
  aiob_loop *loop;
  aiob_runtime *rt;
  const aiob_task_vtable *vt;
  const char *name; /* spawn option's name, else the vtable's (or NULL) */
  void *data;
  /* Loop thread only. */
  aiob_task *live_prev, *live_next;
  struct aiob__leaf leaves; /* sentinel of armed leaf futures */
  void **locals;            /* nlocals slots (indexed by key), or NULL */
  unsigned nlocals;
  /* Output: written on the loop thread before FINISHED is published. */
  aiob_output out;
  /* The one task joining this one; done once finished. */
  aiob__slot joiner;
  void (*on_finish)(void *arg, aiob_task *task);
  void *on_finish_arg;
};

struct aiob__fd_rec;

struct aiob_loop {
  aiob_runtime *rt;
  unsigned index;
  const aiob_backend *backend;
  void *bl;     /* backend loop */
  void *native; /* backend's native handle, read once on the loop thread */
  pthread_t thread;

  /* Ready tasks pushed by other threads; closed at shutdown. */
  aiob__inbox remote;
  _Atomic int stop;

  /* Loop thread only. */
  aiob_task *local_head, *local_tail; /* local FIFO, linked via node.next */
  aiob_task live;                     /* sentinel of unfinished tasks */
  aiob__timer_heap timers;
  bool timer_armed;
  uint64_t timer_deadline;
  struct aiob__fd_rec **fds; /* indexed by fd */
  size_t nfds;

  /* A hosted loop (aiob_runtime_new_hosted) has no thread of its own:
   * `thread` is the host thread, which runs it from its host loop's
   * callbacks; hosted_depth counts the dispatches in progress there. */
  bool hosted;
  unsigned hosted_depth;

  /* Whether to spin at all (core/spin_gate.c; loop thread only). */
  aiob__spin_gate gate;

  /* Spin-before-block budget (loop thread only), ns, and its back-off
   * under contention (core/runtime.c): no spin before backoff_until; the
   * last back-off lasted backoff_period; hits minus wasted spins. */
  uint64_t spin_budget;
  uint64_t backoff_until, backoff_period;
  int backoff_credit;

  /* Counters (single writer per counter except spawned). */
  _Atomic uint64_t n_spawned, n_completed, n_cancelled, n_polls, n_wakes;
  _Atomic uint64_t n_spins, n_spin_hits, n_spin_ns, n_spins_skipped;

  /* Start-up handshake. */
  int init_status;

  /* Lifecycle, written under rt->shutdown_mu: the thread has returned from
   * its loop (exited; atomic for lock-free readers), was joined, or was
   * abandoned by a shutdown that timed out (detached, never joined; it
   * holds a runtime reference until it exits). */
  _Atomic int exited;
  bool joined, abandoned;
};

/* ---- The blocking pool (core/blocking.c) ------------------------------
 *
 * Worker threads of a runtime that run aiob_blocking jobs, created on
 * demand up to `max` and kept until the runtime shuts down. `mu` guards
 * everything but the counters; it is never held while a job's fn,
 * drop_arg or free_value runs. A shutdown stops, waits for and joins or
 * abandons the workers as it does the loop threads. */

typedef struct aiob__blocking_job aiob__blocking_job;

typedef struct aiob__worker {
  aiob_runtime *rt;
  pthread_t thread;
  /* Lifecycle, as aiob_loop's: exited (returned from its loop), joined,
   * abandoned (detached, holding a runtime reference until it exits). */
  bool exited, joined, abandoned;
} aiob__worker;

typedef struct aiob__pool {
  aiob_runtime *rt;
  pthread_mutex_t mu;
  pthread_cond_t work_cv; /* idle workers wait here for jobs */
  pthread_cond_t exit_cv; /* CLOCK_MONOTONIC; a worker exited */
  /* FIFO of the jobs no worker started yet, `queued` long. */
  aiob__blocking_job *head, *tail;
  size_t queued;
  unsigned max;          /* bound on workers */
  unsigned started;      /* workers[0, started) were created */
  unsigned idle;         /* workers waiting for a job */
  bool stopping;         /* no job starts any more, workers exit */
  aiob__worker *workers; /* max entries */
  /* Counters (aiob_runtime_stats), relaxed. */
  _Atomic uint64_t n_run, n_cancelled, n_workers;
} aiob__pool;

/* 0 or AIOB_ENOMEM. No thread starts before the first job. */
int aiob__pool_init(aiob__pool *p, aiob_runtime *rt, unsigned max);
/* The runtime's memory goes: every worker exited or was never started. */
void aiob__pool_destroy(aiob__pool *p);
/* Shutdown, once (rt->shutdown_mu held, rt->shut set): no queued job
 * starts any more, idle workers exit, busy ones once their job returns. */
void aiob__pool_stop(aiob__pool *p);
/* rt->shutdown_mu held: waits until every worker exited or until *deadline
 * (CLOCK_MONOTONIC; NULL: no limit), joins those that exited and that
 * nobody joined or abandoned, and returns how many still run. */
unsigned aiob__pool_wait(aiob__pool *p, const struct timespec *deadline);
/* rt->shutdown_mu held, after a shutdown that timed out: joins the workers
 * that exited and abandons the others (aiob__thread_abandon). */
void aiob__pool_abandon(aiob__pool *p);
/* fork() child: none of the workers exists here; nothing is joined or
 * signalled, the pool only refuses jobs. */
void aiob__pool_forked(aiob__pool *p);
/* The pool of the worker running on this thread (inside a job's fn), or
 * NULL. */
extern _Thread_local aiob__pool *aiob__current_pool;

struct aiob_runtime {
  _Atomic uint32_t refs;
  _Atomic int shut; /* 0 running, 1 shutting down or shut */
  /* Inherited through fork(): its loop threads do not exist in this
   * process and its backend state is shared with the parent, so nothing of
   * it is ever stopped, joined or closed here. */
  bool forked;
  bool hosted; /* one hosted loop, no thread (aiob_runtime_new_hosted) */
  struct aiob_runtime *next_alive; /* every runtime alive, for fork */
  /* Lifecycle: shutdown_mu guards the fields below and every loop's
   * exited/joined/abandoned; stop_cv is signalled (CLOCK_MONOTONIC) when a
   * loop thread exits. */
  pthread_mutex_t shutdown_mu;
  pthread_cond_t stop_cv;
  bool stop_requested; /* the loops were asked to stop */
  bool timed_out;      /* the last shutdown wait ended at its deadline */
  const aiob_backend *backend;
  aiob_backend_options options;
  uint64_t spin_max_ns; /* 0: never spin */
  unsigned nloops;
  _Atomic unsigned next_loop;
  aiob_loop *loops;
  /* Blocking waiters (aiob_task_wait). */
  pthread_mutex_t wait_mu;
  pthread_cond_t wait_cv;
  _Atomic unsigned blocking_waiters;
  /* Worker threads for aiob_blocking jobs. */
  aiob__pool pool;
};

/* The loop running on this thread and the task it is polling (or NULL). */
extern _Thread_local aiob_loop *aiob__current_loop;
extern _Thread_local aiob_task *aiob__current_task;

void aiob__runtime_ref(aiob_runtime *rt);
/* Checks cfg and allocates a runtime of nloops loops, none started (each
 * counts as exited and joined). 0 or a negative code (cfg's errors). */
int aiob__runtime_alloc(const aiob_runtime_config *cfg, unsigned nloops,
                        aiob_runtime **out);
/* Adds rt to the runtimes that fork() handles. */
void aiob__runtime_alive(aiob_runtime *rt);
/* The loop's steps (loop thread): remote pushes to the local FIFO; up to
 * a budget of ready tasks run; every task dropped at shutdown. */
void aiob__loop_accept_remote(aiob_loop *loop);
void aiob__loop_run_ready(aiob_loop *loop);
void aiob__loop_drain_shutdown(aiob_loop *loop);
/* The end of a loop (its thread, or its host): drains, closes fds, timer
 * and backend loop. */
void aiob__loop_close(aiob_loop *loop);
/* Shutdown of a hosted runtime (core/hosted.c), see
 * aiob_runtime_shutdown_timeout. */
int aiob__hosted_shutdown(aiob_runtime *rt, aiob_shutdown_info *info);
/* A hosted loop's backend reports from its host's callbacks: report(arg)
 * runs with the loop entered, then what became ready runs. */
void aiob__hosted_report(aiob_loop *loop, void (*report)(void *arg), void *arg);
void aiob__runtime_unref(aiob_runtime *rt);
/* A thread of rt (loop or worker) given up by a shutdown that timed out
 * (detached by the caller): it keeps rt's memory with a reference and is
 * counted by aiob_runtime_abandoned_threads until it calls
 * aiob__thread_abandoned_exit, the last thing it does. */
void aiob__thread_abandon(aiob_runtime *rt);
void aiob__thread_abandoned_exit(aiob_runtime *rt);
/* A condition variable whose timed waits use CLOCK_MONOTONIC. */
void aiob__cond_init_monotonic(pthread_cond_t *cv);
/* Like aiob_runtime_default_acquire, but never waits and never creates:
 * AIOB_EAGAIN when there is no default runtime right now (never used, shut
 * down, or a shutdown in progress). Lets a caller that holds a lock (the
 * GIL) take the fast path under it and wait without it. Thread-safe. */
int aiob__runtime_default_try_acquire(aiob_runtime **out);

/* Wakes the loop's backend unless the loop is closing. Thread-safe. */
void aiob__loop_wake(aiob_loop *loop);
/* Schedules t (caller knows it must be queued; takes a queue reference). */
void aiob__task_schedule(aiob_task *t);
/* Runs t's poll on its loop thread. */
void aiob__task_run(aiob_task *t);
/* Drops t as cancelled (shutdown path). */
void aiob__task_finish_cancelled(aiob_task *t);
void aiob__task_unref(aiob_task *t);

/* Leaves (armed leaf futures linked to their task). */
void aiob__leaf_link(aiob_task *t, struct aiob__leaf *leaf);
void aiob__leaf_unlink(struct aiob__leaf *leaf);

/* Timers / fds on the current loop. */
void aiob__timers_process(aiob_loop *loop, uint64_t now);
void aiob__timers_rearm(aiob_loop *loop);
void aiob__fds_close(aiob_loop *loop);

/* Destroys every task-local value of t (loop thread). */
void aiob__locals_destroy(aiob_task *t);
void aiob__local_destroy(aiob_local_key key, void *value);
/* Puts t in its loop's live list if it is not there yet, with the loop's
 * reference (loop thread). */
void aiob__task_accept(aiob_task *t);

/* Optional backend slot present? (size + NULL check, the SQLite VFS way) */
#define AIOB__HAS_SLOT(b, slot)                                                \
  ((b)->size >= offsetof(aiob_backend, slot) + sizeof((b)->slot) &&            \
   (b)->slot != NULL)
int aiob__locals_inherit(aiob_task *child, const aiob_task *parent);

#endif /* AIOBRIDGE_CORE_INTERNAL_H */
