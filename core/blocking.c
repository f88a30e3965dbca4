/* Blocking work: jobs run by a runtime's pool of worker threads.
 *
 * A job is shared by its leaf (an aiob_blocking in a task's state) and the
 * pool (its queue, then the worker running it): two references, and the
 * last one frees the job with any output nobody took. A job leaves the
 * queue either to a worker (RUNNING) or to its leaf's cancellation
 * (CANCELLED: fn never runs); both happen under the pool's lock, so exactly
 * one of them wins. The worker publishes the output through a
 * single-waiter slot (aiob__slot), which wakes the task; a leaf that gives
 * up clears the slot and drops its reference, so a job cancelled while it
 * runs is freed, output included, by its worker. That dropped reference is
 * also what aiob_blocking_cancelled() sees (one reference left while fn
 * runs: the worker's), so a fn that stops early because its task gave it
 * up frees its output on its own thread. Neither fn, drop_arg nor
 * free_value ever runs with the lock held.
 *
 * Workers start on demand (a job is queued and no idle worker will take
 * it) up to the pool's bound, then live until the runtime shuts down: the
 * shutdown stops, waits for, joins or abandons them alongside the loop
 * threads (see runtime.c). An abandoned worker holds a runtime reference,
 * so the pool it returns to after a long fn is still there. */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum { JOB_QUEUED, JOB_RUNNING, JOB_CANCELLED };

struct aiob__blocking_job {
  _Atomic uint32_t refs;
  int state;                       /* pool->mu */
  aiob__blocking_job *prev, *next; /* queue links, pool->mu */
  aiob__pool *pool;
  aiob_blocking_fn fn;
  void *arg;
  void (*drop_arg)(void *arg);
  aiob__slot waiter; /* done once out is written */
  aiob_output out;
};

/* Leaf states (aiob_blocking.state); 0 is a leaf never initialised. */
enum { LEAF_INIT = 1, LEAF_ARMED, LEAF_DONE, LEAF_STOPPED };

_Thread_local aiob__pool *aiob__current_pool;
static _Thread_local aiob__blocking_job *current_job;

static void job_unref(aiob__blocking_job *j) {
  if (atomic_fetch_sub_explicit(&j->refs, 1, memory_order_acq_rel) != 1)
    return;
  aiob_output_clear(&j->out);
  free(j);
}

/* ---- The queue (pool->mu) ---------------------------------------------- */

static void queue_push(aiob__pool *p, aiob__blocking_job *j) {
  j->next = NULL;
  j->prev = p->tail;
  if (p->tail)
    p->tail->next = j;
  else
    p->head = j;
  p->tail = j;
  p->queued++;
}

static void queue_remove(aiob__pool *p, aiob__blocking_job *j) {
  if (j->prev)
    j->prev->next = j->next;
  else
    p->head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    p->tail = j->prev;
  j->prev = j->next = NULL;
  p->queued--;
}

/* ---- Workers ----------------------------------------------------------- */

static void job_run(aiob__pool *p, aiob__blocking_job *j) {
  aiob_output out = {0};
  current_job = j;
  int rc = j->fn(j->arg, &out);
  current_job = NULL;
  out.status = rc > 0 ? AIOB_EBADSTATUS : rc;
  atomic_fetch_add_explicit(&p->n_run, 1, memory_order_relaxed);
  if (j->drop_arg)
    j->drop_arg(j->arg);
  j->out = out;
  aiob__slot_done(&j->waiter); /* wakes the task, if it still waits */
  job_unref(j); /* the last one if the leaf gave up: frees out here */
}

static void *worker_main(void *arg) {
  aiob__worker *w = arg;
  aiob_runtime *rt = w->rt;
  aiob__pool *p = &rt->pool;
  aiob__current_pool = p;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->head && !p->stopping) {
      p->idle++;
      pthread_cond_wait(&p->work_cv, &p->mu);
      p->idle--;
    }
    if (p->stopping) /* queued jobs stay for their leaves to cancel */
      break;
    aiob__blocking_job *j = p->head;
    queue_remove(p, j);
    j->state = JOB_RUNNING;
    pthread_mutex_unlock(&p->mu);
    job_run(p, j);
    pthread_mutex_lock(&p->mu);
  }
  /* As a loop thread's exit: after this unlock, nothing but the runtime
   * reference of an abandoned worker. */
  w->exited = true;
  bool abandoned = w->abandoned;
  pthread_cond_broadcast(&p->exit_cv);
  pthread_mutex_unlock(&p->mu);
  aiob__current_pool = NULL;
  if (abandoned)
    aiob__thread_abandoned_exit(rt);
  return NULL;
}

/* Queues j, starting a worker if no idle one will take it. 0,
 * AIOB_ESHUTDOWN, or AIOB_EAGAIN (no worker could start and none exists);
 * on error j was not queued. */
static int pool_submit(aiob__pool *p, aiob__blocking_job *j) {
  int rc = 0;
  pthread_mutex_lock(&p->mu);
  if (p->stopping) {
    pthread_mutex_unlock(&p->mu);
    return AIOB_ESHUTDOWN;
  }
  j->state = JOB_QUEUED;
  queue_push(p, j);
  if (p->queued > p->idle && p->started < p->max) {
    aiob__worker *w = &p->workers[p->started];
    *w = (aiob__worker){.rt = p->rt};
    if (pthread_create(&w->thread, NULL, worker_main, w) == 0) {
      p->started++;
      atomic_fetch_add_explicit(&p->n_workers, 1, memory_order_relaxed);
    } else if (p->started == 0) {
      queue_remove(p, j);
      rc = AIOB_EAGAIN;
    } /* else a running worker takes it in turn */
  }
  if (rc == 0 && p->idle)
    pthread_cond_signal(&p->work_cv);
  pthread_mutex_unlock(&p->mu);
  return rc;
}

/* The leaf gives up j (loop thread): a queued job never runs, and its arg
 * is dropped here; a running one finishes on its worker, which frees it. */
static void job_cancel(aiob__blocking_job *j) {
  aiob__pool *p = j->pool;
  aiob__slot_clear(&j->waiter);
  pthread_mutex_lock(&p->mu);
  bool never_ran = j->state == JOB_QUEUED;
  if (never_ran) {
    queue_remove(p, j);
    j->state = JOB_CANCELLED;
  }
  pthread_mutex_unlock(&p->mu);
  if (never_ran) {
    atomic_fetch_add_explicit(&p->n_cancelled, 1, memory_order_relaxed);
    if (j->drop_arg)
      j->drop_arg(j->arg);
    job_unref(j); /* the queue's */
  }
  job_unref(j); /* the leaf's: aiob_blocking_cancelled() turns true */
}

/* ---- The pool's life (runtime.c) --------------------------------------- */

int aiob__pool_init(aiob__pool *p, aiob_runtime *rt, unsigned max) {
  memset(p, 0, sizeof *p);
  p->workers = calloc(max, sizeof *p->workers);
  if (!p->workers)
    return AIOB_ENOMEM;
  p->rt = rt;
  p->max = max;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->work_cv, NULL);
  aiob__cond_init_monotonic(&p->exit_cv);
  return 0;
}

void aiob__pool_destroy(aiob__pool *p) {
  pthread_cond_destroy(&p->exit_cv);
  pthread_cond_destroy(&p->work_cv);
  pthread_mutex_destroy(&p->mu);
  free(p->workers);
  p->workers = NULL;
}

void aiob__pool_stop(aiob__pool *p) {
  pthread_mutex_lock(&p->mu);
  p->stopping = true;
  pthread_cond_broadcast(&p->work_cv);
  pthread_mutex_unlock(&p->mu);
}

/* Joins the workers that exited and that nobody joined or abandoned
 * (p->mu held: an exited worker touches nothing of the pool any more). */
static void join_exited(aiob__pool *p) {
  for (unsigned i = 0; i < p->started; i++) {
    aiob__worker *w = &p->workers[i];
    if (w->exited && !w->joined && !w->abandoned) {
      pthread_join(w->thread, NULL);
      w->joined = true;
    }
  }
}

unsigned aiob__pool_wait(aiob__pool *p, const struct timespec *deadline) {
  pthread_mutex_lock(&p->mu);
  unsigned left;
  bool expired = false;
  for (;;) {
    left = 0;
    for (unsigned i = 0; i < p->started; i++)
      left += !p->workers[i].exited;
    if (!left || expired)
      break;
    if (!deadline)
      pthread_cond_wait(&p->exit_cv, &p->mu);
    else if (pthread_cond_timedwait(&p->exit_cv, &p->mu, deadline) == ETIMEDOUT)
      expired = true; /* count once more */
  }
  join_exited(p);
  pthread_mutex_unlock(&p->mu);
  return left;
}

void aiob__pool_abandon(aiob__pool *p) {
  pthread_mutex_lock(&p->mu);
  join_exited(p);
  for (unsigned i = 0; i < p->started; i++) {
    aiob__worker *w = &p->workers[i];
    if (w->exited || w->abandoned)
      continue;
    w->abandoned = true;
    aiob__thread_abandon(p->rt);
    pthread_detach(w->thread);
  }
  pthread_mutex_unlock(&p->mu);
}

void aiob__pool_forked(aiob__pool *p) {
  /* Another thread may have held the lock when fork() copied it. */
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->work_cv, NULL);
  aiob__cond_init_monotonic(&p->exit_cv);
  p->stopping = true;
  p->idle = 0;
  for (unsigned i = 0; i < p->started; i++) {
    /* As the loops (fork_child): nothing to wait for or join, and an
     * abandoned one's runtime reference is never dropped here. */
    p->workers[i].exited = true;
    p->workers[i].joined = true;
    p->workers[i].abandoned = false;
  }
}

/* ---- The leaf future --------------------------------------------------- */

static void leaf_drop_arg(aiob_blocking *b) {
  void (*drop)(void *) = b->drop_arg;
  void *arg = b->arg;
  b->fn = NULL;
  b->arg = NULL;
  b->drop_arg = NULL;
  if (drop)
    drop(arg);
}

static aiob_poll leaf_ready(aiob_blocking *b, aiob_output *out, int state,
                            int status) {
  b->state = state;
  b->status = status;
  if (out)
    *out = (aiob_output){.status = status};
  return AIOB_READY;
}

static void blocking_detach(struct aiob__leaf *leaf) {
  aiob_blocking *b = AIOB__CONTAINER_OF(leaf, aiob_blocking, leaf);
  aiob__blocking_job *j = b->job;
  b->job = NULL;
  b->state = LEAF_STOPPED;
  b->status = AIOB_ECANCELED;
  job_cancel(j);
}

void aiob_blocking_init(aiob_blocking *b, aiob_blocking_fn fn, void *arg,
                        void (*drop_arg)(void *arg)) {
  memset(b, 0, sizeof *b);
  b->leaf.next = b->leaf.prev = &b->leaf;
  b->fn = fn;
  b->arg = arg;
  b->drop_arg = drop_arg;
  b->state = LEAF_INIT;
}

/* First poll: queues the job, or fails at once (the arg dropped here). */
static aiob_poll blocking_start(aiob_task *self, aiob_blocking *b,
                                aiob_output *out) {
  aiob_runtime *rt = self->rt;
  int rc = 0;
  aiob__blocking_job *j = NULL;
  if (!b->fn)
    rc = AIOB_EINVAL;
  else if (atomic_load(&rt->shut))
    rc = AIOB_ESHUTDOWN;
  else if (!(j = calloc(1, sizeof *j)))
    rc = AIOB_ENOMEM;
  if (rc == 0) {
    atomic_init(&j->refs, 2); /* the leaf's and the pool's */
    atomic_init(&j->waiter, 0);
    j->pool = &rt->pool;
    j->fn = b->fn;
    j->arg = b->arg;
    j->drop_arg = b->drop_arg;
    aiob__slot_wait(&j->waiter, self); /* a fresh slot: registers self */
    rc = pool_submit(&rt->pool, j);
    if (rc < 0) {
      aiob__slot_clear(&j->waiter);
      free(j);
    }
  }
  if (rc < 0) {
    leaf_drop_arg(b);
    return leaf_ready(b, out, LEAF_DONE, rc);
  }
  b->fn = NULL; /* the job's now */
  b->arg = NULL;
  b->drop_arg = NULL;
  b->job = j;
  b->leaf.detach = blocking_detach;
  aiob__leaf_link(self, &b->leaf);
  b->state = LEAF_ARMED;
  return AIOB_PENDING;
}

aiob_poll aiob_blocking_poll(aiob_task *self, aiob_blocking *b,
                             aiob_output *out) {
  switch (b->state) {
  case LEAF_INIT:
    return blocking_start(self, b, out);
  case LEAF_ARMED:
    break;
  case LEAF_DONE:
  case LEAF_STOPPED:
    return leaf_ready(b, out, b->state, b->status);
  default: /* never initialised */
    return leaf_ready(b, out, LEAF_DONE, AIOB_EINVAL);
  }
  aiob__blocking_job *j = b->job;
  int rc = aiob__slot_wait(&j->waiter, self);
  if (rc == 0)
    return AIOB_PENDING;
  if (rc < 0) { /* another task awaits this job: it stays theirs */
    if (out)
      *out = (aiob_output){.status = rc};
    return AIOB_READY;
  }
  aiob__leaf_unlink(&b->leaf);
  b->job = NULL;
  b->state = LEAF_DONE;
  b->status = j->out.status;
  if (out)
    *out = j->out;
  else
    aiob_output_clear(&j->out);
  j->out = (aiob_output){0};
  job_unref(j);
  return AIOB_READY;
}

void aiob_blocking_stop(aiob_blocking *b) {
  if (b->state == LEAF_INIT) {
    leaf_drop_arg(b);
    b->state = LEAF_STOPPED;
    b->status = AIOB_ECANCELED;
  } else if (b->state == LEAF_ARMED) {
    aiob__leaf_unlink(&b->leaf);
    blocking_detach(&b->leaf);
  }
}

int aiob_blocking_cancelled(void) {
  aiob__blocking_job *j = current_job;
  if (!j)
    return 0;
  /* While fn runs, its worker holds a reference: the leaf's is gone once
   * it gave up. */
  return atomic_load_explicit(&j->refs, memory_order_acquire) == 1 ||
         atomic_load(&j->pool->rt->shut);
}

/* ---- A task that runs one job ------------------------------------------ */

typedef struct spawned {
  aiob_blocking b;
} spawned;

static aiob_poll spawned_poll(aiob_task *task, void *state) {
  spawned *s = state;
  aiob_output out;
  if (aiob_blocking_poll(task, &s->b, &out) == AIOB_PENDING)
    return AIOB_PENDING;
  return aiob_task_forward(task, &out);
}

static void spawned_drop(void *state) {
  spawned *s = state;
  aiob_blocking_stop(&s->b); /* dropped before its first poll: the arg */
  free(s);
}

static const aiob_task_vtable spawned_vtable = {.poll = spawned_poll,
                                                .drop = spawned_drop};

int aiob_spawn_blocking(aiob_runtime *rt, const aiob_spawn_opts *opts,
                        aiob_blocking_fn fn, void *arg,
                        void (*drop_arg)(void *arg), aiob_task **handle) {
  if (!rt || !fn)
    return AIOB_EINVAL;
  spawned *s = malloc(sizeof *s);
  if (!s)
    return AIOB_ENOMEM;
  aiob_blocking_init(&s->b, fn, arg, drop_arg);
  int rc = aiob_spawn_ex(rt, opts, &spawned_vtable, s, handle);
  if (rc < 0)
    free(s); /* never polled nor dropped: the caller keeps arg */
  return rc;
}
