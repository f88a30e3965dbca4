/* Tasks: spawn, wake, poll, finish, join, outputs, task locals.
 *
 * State machine (aiob_task.state, one atomic word):
 *
 *   spawn -> QUEUED -> RUNNING -> (PENDING) idle -> wake -> QUEUED ...
 *                         |  \-> wake during poll: NOTIFIED -> re-queued
 *                         \-> READY or CANCEL -> FINISHED
 *
 * A QUEUED task holds one reference for the queue. A waker is a counted
 * reference to the task. FINISHED is published (release) after drop ran and
 * the output was written, so a thread that sees it may read the output. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

_Thread_local aiob_loop *aiob__current_loop;
_Thread_local aiob_task *aiob__current_task;

/* ---- References -------------------------------------------------------- */

aiob_task *aiob_task_ref(aiob_task *t) {
  atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
  return t;
}

void aiob__task_unref(aiob_task *t) {
  if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
    return;
  aiob_output_clear(&t->out);
  aiob_runtime *rt = t->rt;
  free(t);
  aiob__runtime_unref(rt);
}

void aiob_task_release(aiob_task *t) {
  if (t)
    aiob__task_unref(t);
}

/* ---- Queues ------------------------------------------------------------ */

static void local_push(aiob_loop *loop, aiob_task *t) {
  atomic_store_explicit(&t->node.next, NULL, memory_order_relaxed);
  if (loop->local_tail)
    atomic_store_explicit(&loop->local_tail->node.next, &t->node,
                          memory_order_relaxed);
  else
    loop->local_head = t;
  loop->local_tail = t;
}

static void backend_wake(void *arg) {
  aiob_loop *loop = arg;
  loop->backend->wake(loop->bl);
}

static void backend_wake_counted(void *arg) {
  aiob_loop *loop = arg;
  atomic_fetch_add_explicit(&loop->n_wakes, 1, memory_order_relaxed);
  backend_wake(loop);
}

/* Pushes from a thread other than the loop's own. Fails once the loop is
 * closed (shutdown waits for pushes in flight, see aiob__inbox_close). */
static bool remote_push(aiob_loop *loop, aiob_task *t) {
  return aiob__inbox_push(&loop->remote, &t->node, backend_wake_counted, loop);
}

/* Wakes the loop unless it is closing (then it no longer blocks, and its
 * backend may be gone). */
void aiob__loop_wake(aiob_loop *loop) {
  aiob__inbox_wake(&loop->remote, backend_wake, loop);
}

static bool queue_push(aiob_task *t) {
  aiob_loop *loop = t->loop;
  if (aiob__current_loop == loop) {
    local_push(loop, t);
    return true;
  }
  return remote_push(loop, t);
}

/* The caller set QUEUED and took a queue reference. */
void aiob__task_schedule(aiob_task *t) {
  if (!queue_push(t)) {
    /* Loop closed: its shutdown finishes every task it accepted. */
    atomic_fetch_and(&t->state, ~(uint32_t)AIOB__T_QUEUED);
    aiob__task_unref(t);
  }
}

static void task_wake(aiob_task *t) {
  uint32_t s = atomic_load_explicit(&t->state, memory_order_acquire);
  uint32_t n;
  do {
    if (s & AIOB__T_FINISHED)
      return;
    if (s & AIOB__T_RUNNING) {
      if (s & AIOB__T_NOTIFIED)
        return;
      n = s | AIOB__T_NOTIFIED;
    } else if (s & AIOB__T_QUEUED) {
      return;
    } else {
      n = s | AIOB__T_QUEUED;
    }
  } while (!atomic_compare_exchange_weak_explicit(
      &t->state, &s, n, memory_order_acq_rel, memory_order_acquire));
  if (n & AIOB__T_RUNNING)
    return; /* the poller re-queues it */
  aiob_task_ref(t);
  aiob__task_schedule(t);
}

/* ---- Wakers ------------------------------------------------------------ */

aiob_waker *aiob_task_waker(aiob_task *self) {
  return (aiob_waker *)aiob_task_ref(self);
}

aiob_waker *aiob_waker_clone(aiob_waker *w) {
  return (aiob_waker *)aiob_task_ref((aiob_task *)w);
}

void aiob_waker_wake(aiob_waker *w) { task_wake((aiob_task *)w); }

void aiob_waker_release(aiob_waker *w) {
  if (w)
    aiob__task_unref((aiob_task *)w);
}

void aiob_task_yield_now(aiob_task *self) { task_wake(self); }

void aiob_task_cancel(aiob_task *t) {
  uint32_t s = atomic_fetch_or(&t->state, AIOB__T_CANCEL);
  if (!(s & AIOB__T_FINISHED))
    task_wake(t);
}

/* ---- Leaves ------------------------------------------------------------ */

void aiob__leaf_link(aiob_task *t, struct aiob__leaf *leaf) {
  leaf->next = t->leaves.next;
  leaf->prev = &t->leaves;
  t->leaves.next->prev = leaf;
  t->leaves.next = leaf;
}

void aiob__leaf_unlink(struct aiob__leaf *leaf) {
  leaf->prev->next = leaf->next;
  leaf->next->prev = leaf->prev;
  leaf->next = leaf->prev = leaf;
}

static bool key_valid(aiob_local_key key);

/* ---- Spawn ------------------------------------------------------------- */

void aiob_spawn_opts_init(aiob_spawn_opts *opts) {
  memset(opts, 0, sizeof *opts);
  opts->loop = -1;
}

int aiob_spawn(aiob_runtime *rt, const aiob_task_vtable *vt, void *state,
               aiob_task **handle) {
  return aiob_spawn_ex(rt, NULL, vt, state, handle);
}

static aiob_loop *pick_loop(aiob_runtime *rt, int index) {
  if (index >= 0)
    return &rt->loops[index];
  aiob_loop *cur = aiob__current_loop;
  if (cur && cur->rt == rt)
    return cur;
  unsigned i =
      atomic_fetch_add_explicit(&rt->next_loop, 1, memory_order_relaxed);
  return &rt->loops[i % rt->nloops];
}

/* Makes room for keys below n (the array grows to fit; most tasks carry
 * one or two values, so it is not sized for AIOB_LOCAL_KEYS_MAX). */
static int locals_reserve(aiob_task *t, unsigned n) {
  if (n <= t->nlocals)
    return 0;
  void **a = realloc(t->locals, n * sizeof *a);
  if (!a)
    return AIOB_ENOMEM;
  memset(a + t->nlocals, 0, (n - t->nlocals) * sizeof *a);
  t->locals = a;
  t->nlocals = n;
  return 0;
}

int aiob_spawn_ex(aiob_runtime *rt, const aiob_spawn_opts *opts,
                  const aiob_task_vtable *vt, void *state, aiob_task **handle) {
  if (!rt || !vt || !vt->poll)
    return AIOB_EINVAL;
  int index = opts ? opts->loop : -1;
  if (index >= (int)rt->nloops || index < -1)
    return AIOB_EINVAL;
  if (opts && opts->nlocals && !opts->locals)
    return AIOB_EINVAL;
  for (size_t i = 0; opts && i < opts->nlocals; i++)
    if (!key_valid(opts->locals[i].key))
      return AIOB_EINVAL;
  if (atomic_load(&rt->shut))
    return AIOB_ESHUTDOWN;

  aiob_task *t = calloc(1, sizeof *t);
  if (!t)
    return AIOB_ENOMEM;
  t->loop = pick_loop(rt, index);
  t->rt = rt;
  t->vt = vt;
  t->name = opts && opts->name ? opts->name : vt->name;
  t->data = state;
  if (opts) {
    t->on_finish = opts->on_finish;
    t->on_finish_arg = opts->on_finish_arg;
  }
  t->leaves.next = t->leaves.prev = &t->leaves;
  t->live_next = t->live_prev = t;
  atomic_init(&t->refs, 1u + (handle ? 1u : 0u));
  atomic_init(&t->state, AIOB__T_QUEUED);
  atomic_init(&t->joiner, 0);
  aiob__runtime_ref(rt);

  aiob_task *parent = aiob__current_task;
  int rc = 0;
  if (parent && !(opts && opts->no_inherit) && parent->locals)
    rc = aiob__locals_inherit(t, parent);
  if (rc == 0 && opts && opts->nlocals) {
    unsigned top = 0;
    for (size_t i = 0; i < opts->nlocals; i++)
      if (opts->locals[i].key >= top)
        top = opts->locals[i].key + 1u;
    rc = locals_reserve(t, top);
    for (size_t i = 0; rc == 0 && i < opts->nlocals; i++) {
      aiob_local_key k = opts->locals[i].key;
      if (t->locals[k]) { /* an inherited clone, overridden */
        void *old = t->locals[k];
        t->locals[k] = NULL;
        aiob__local_destroy(k, old);
      }
      t->locals[k] = opts->locals[i].value;
    }
  }
  aiob_loop *loop = t->loop;
  if (rc == 0 && aiob__current_loop == loop &&
      aiob__inbox_closed(&loop->remote))
    rc = AIOB_ESHUTDOWN; /* spawned by a drop during shutdown */
  /* Count before pushing: once queued, a detached task may finish and be
   * freed at any moment. */
  atomic_fetch_add_explicit(&loop->n_spawned, 1, memory_order_relaxed);
  if (rc == 0 && !queue_push(t))
    rc = AIOB_ESHUTDOWN;
  if (rc != 0) {
    /* The caller keeps the values it passed in; only clones are ours. */
    for (size_t i = 0; opts && t->locals && i < opts->nlocals; i++)
      t->locals[opts->locals[i].key] = NULL;
    aiob__locals_destroy(t);
    free(t);
    atomic_fetch_sub_explicit(&loop->n_spawned, 1, memory_order_relaxed);
    aiob__runtime_unref(rt);
    return rc;
  }
  if (handle)
    *handle = t;
  return 0;
}

/* ---- Poll and finish (loop thread) ------------------------------------- */

static void live_insert(aiob_loop *loop, aiob_task *t) {
  t->live_next = loop->live.live_next;
  t->live_prev = &loop->live;
  loop->live.live_next->live_prev = t;
  loop->live.live_next = t;
}

static void live_remove(aiob_task *t) {
  t->live_prev->live_next = t->live_next;
  t->live_next->live_prev = t->live_prev;
  t->live_next = t->live_prev = t;
}

static void notify_finished(aiob_task *t) {
  if (t->on_finish)
    t->on_finish(t->on_finish_arg, t);
  aiob__slot_done(&t->joiner);
  aiob_runtime *rt = t->rt;
  if (atomic_load(&rt->blocking_waiters)) {
    pthread_mutex_lock(&rt->wait_mu);
    pthread_cond_broadcast(&rt->wait_cv);
    pthread_mutex_unlock(&rt->wait_mu);
  }
}

/* Disarms leaves, runs drop, publishes FINISHED. Loop thread. */
static void task_finish(aiob_task *t, bool cancelled) {
  aiob_loop *loop = t->loop;
  while (t->leaves.next != &t->leaves) {
    struct aiob__leaf *leaf = t->leaves.next;
    aiob__leaf_unlink(leaf);
    leaf->detach(leaf);
  }
  if (cancelled) {
    aiob_output_clear(&t->out);
    t->out.status = AIOB_ECANCELED;
  }
  aiob_task *saved = aiob__current_task;
  aiob__current_task = NULL;
  if (t->vt->drop)
    t->vt->drop(t->data);
  aiob__locals_destroy(t);
  aiob__current_task = saved;
  live_remove(t);
  atomic_fetch_add_explicit(cancelled ? &loop->n_cancelled : &loop->n_completed,
                            1, memory_order_relaxed);
  uint32_t s = atomic_load(&t->state);
  while (!atomic_compare_exchange_weak(
      &t->state, &s,
      (s | AIOB__T_FINISHED) & ~(uint32_t)(AIOB__T_RUNNING | AIOB__T_NOTIFIED)))
    ;
  notify_finished(t);
  aiob__task_unref(t); /* the live list's reference (aiob__task_accept) */
}

void aiob__task_finish_cancelled(aiob_task *t) {
  if (!(atomic_load(&t->state) & AIOB__T_FINISHED))
    task_finish(t, true);
}

/* Makes sure t is in its loop's live list (first sight on the loop). */
void aiob__task_accept(aiob_task *t) {
  if (atomic_load_explicit(&t->state, memory_order_relaxed) & AIOB__T_ACCEPTED)
    return;
  atomic_fetch_or(&t->state, AIOB__T_ACCEPTED);
  /* An unfinished task is owned by its loop: armed leaves (a sleep, an fd
   * wait) point at it without holding references. */
  aiob_task_ref(t);
  live_insert(t->loop, t);
}

/* Consumes the queue reference. */
void aiob__task_run(aiob_task *t) {
  aiob__task_accept(t);
  uint32_t s = atomic_load_explicit(&t->state, memory_order_acquire);
  uint32_t n;
  do {
    if (s & AIOB__T_FINISHED) {
      atomic_fetch_and(&t->state, ~(uint32_t)AIOB__T_QUEUED);
      aiob__task_unref(t);
      return;
    }
    n = (s & ~(uint32_t)(AIOB__T_QUEUED | AIOB__T_NOTIFIED)) | AIOB__T_RUNNING;
  } while (!atomic_compare_exchange_weak_explicit(
      &t->state, &s, n, memory_order_acq_rel, memory_order_acquire));

  if (s & AIOB__T_CANCEL) {
    task_finish(t, true);
    aiob__task_unref(t);
    return;
  }

  aiob_loop *loop = t->loop;
  atomic_fetch_add_explicit(&loop->n_polls, 1, memory_order_relaxed);
  aiob__current_task = t;
  aiob_poll r = t->vt->poll(t, t->data);
  aiob__current_task = NULL;
  if (r == AIOB_READY) {
    task_finish(t, false);
    aiob__task_unref(t);
    return;
  }

  s = atomic_load_explicit(&t->state, memory_order_acquire);
  do {
    if (s & AIOB__T_NOTIFIED)
      n = (s & ~(uint32_t)(AIOB__T_RUNNING | AIOB__T_NOTIFIED)) |
          AIOB__T_QUEUED;
    else
      n = s & ~(uint32_t)AIOB__T_RUNNING;
  } while (!atomic_compare_exchange_weak_explicit(
      &t->state, &s, n, memory_order_acq_rel, memory_order_acquire));
  if (n & AIOB__T_QUEUED)
    local_push(loop, t); /* keeps the queue reference */
  else
    aiob__task_unref(t);
}

/* ---- Output, join, wait ------------------------------------------------ */

void aiob_task_return(aiob_task *self, void *value,
                      void (*free_value)(void *value)) {
  /* Replaces the value only: a status set by aiob_task_fail stays. */
  if (self->out.value && self->out.free_value)
    self->out.free_value(self->out.value);
  self->out.value = value;
  self->out.free_value = free_value;
}

int aiob_task_fail(aiob_task *self, int err) {
  self->out.status = err < 0 ? err : AIOB_EBADSTATUS;
  return err < 0 ? 0 : AIOB_EINVAL;
}

aiob_poll aiob_task_forward(aiob_task *self, aiob_output *out) {
  if (out->status < 0)
    aiob_task_fail(self, out->status);
  aiob_task_return(self, out->value, out->free_value);
  *out = (aiob_output){0};
  return AIOB_READY;
}

const char *aiob_task_name(const aiob_task *t) { return t->name; }

aiob_task *aiob_task_current(void) { return aiob__current_task; }

aiob_runtime *aiob_task_runtime(const aiob_task *t) { return t->rt; }

int aiob_task_is_finished(const aiob_task *t) {
  return (atomic_load_explicit(&((aiob_task *)t)->state, memory_order_acquire) &
          AIOB__T_FINISHED) != 0;
}

int aiob_task_take_output(aiob_task *t, aiob_output *out) {
  if (!aiob_task_is_finished(t))
    return AIOB_EAGAIN;
  out->status = t->out.status;
  out->value = NULL;
  out->free_value = NULL;
  if (atomic_fetch_or(&t->state, AIOB__T_TAKEN) & AIOB__T_TAKEN)
    return AIOB_EALREADY;
  out->value = t->out.value;
  out->free_value = t->out.free_value;
  t->out.value = NULL;
  t->out.free_value = NULL;
  return 0;
}

aiob_poll aiob_task_join(aiob_task *self, aiob_task *target, int *status) {
  if (self == target) {
    if (status)
      *status = AIOB_EDEADLK;
    return AIOB_READY;
  }
  int rc = aiob__slot_wait(&target->joiner, self);
  if (rc == 0)
    return AIOB_PENDING;
  if (status)
    *status = rc < 0 ? rc : target->out.status;
  return AIOB_READY;
}

/* ---- Single-waiter slots ----------------------------------------------- */

int aiob__slot_wait(aiob__slot *s, aiob_task *self) {
  uintptr_t me = (uintptr_t)self;
  uintptr_t cur = atomic_load(s);
  for (;;) {
    if (cur == AIOB__SLOT_DONE)
      return 1;
    if (cur == me)
      return 0;
    if (cur != 0 && !aiob_task_is_finished((aiob_task *)cur))
      return AIOB_EBUSY;
    /* Empty, or held by a waiter that was dropped: take it over. */
    aiob_task_ref(self);
    if (atomic_compare_exchange_strong(s, &cur, me)) {
      if (cur)
        aiob__task_unref((aiob_task *)cur);
      return 0;
    }
    aiob__task_unref(self);
  }
}

void aiob__slot_done(aiob__slot *s) {
  uintptr_t w = atomic_exchange(s, AIOB__SLOT_DONE);
  if (w && w != AIOB__SLOT_DONE) {
    task_wake((aiob_task *)w);
    aiob__task_unref((aiob_task *)w);
  }
}

void aiob__slot_clear(aiob__slot *s) {
  uintptr_t cur = atomic_load(s);
  while (cur != 0 && cur != AIOB__SLOT_DONE) {
    if (atomic_compare_exchange_strong(s, &cur, 0)) {
      aiob__task_unref((aiob_task *)cur);
      return;
    }
  }
}

int aiob_task_wait(aiob_task *t, uint64_t timeout_ns) {
  if (aiob__current_loop ||
      (t->loop->hosted && pthread_equal(t->loop->thread, pthread_self())))
    return AIOB_EDEADLK; /* the task could only run on this thread */
  if (aiob_task_is_finished(t))
    return 0;
  aiob_runtime *rt = t->rt;
  struct timespec until;
  bool bounded = timeout_ns != UINT64_MAX;
  if (bounded) {
    clock_gettime(CLOCK_MONOTONIC, &until);
    uint64_t ns = (uint64_t)until.tv_nsec + timeout_ns % AIOB_SEC;
    until.tv_sec += (time_t)(timeout_ns / AIOB_SEC + ns / AIOB_SEC);
    until.tv_nsec = (long)(ns % AIOB_SEC);
  }
  int rc = 0;
  atomic_fetch_add(&rt->blocking_waiters, 1);
  pthread_mutex_lock(&rt->wait_mu);
  while (!aiob_task_is_finished(t)) {
    if (!bounded) {
      pthread_cond_wait(&rt->wait_cv, &rt->wait_mu);
    } else if (pthread_cond_timedwait(&rt->wait_cv, &rt->wait_mu, &until) ==
               ETIMEDOUT) {
      rc = aiob_task_is_finished(t) ? 0 : AIOB_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&rt->wait_mu);
  atomic_fetch_sub(&rt->blocking_waiters, 1);
  return rc;
}

/* ---- Task-local storage ------------------------------------------------ */

static struct {
  void *(*clone)(void *);
  void (*destroy)(void *);
} local_keys[AIOB_LOCAL_KEYS_MAX];
static _Atomic unsigned local_nkeys;
static pthread_mutex_t local_mu = PTHREAD_MUTEX_INITIALIZER;

int aiob_local_key_create(aiob_local_key *key, void *(*clone)(void *),
                          void (*destroy)(void *)) {
  if (!key)
    return AIOB_EINVAL;
  pthread_mutex_lock(&local_mu);
  unsigned n = atomic_load_explicit(&local_nkeys, memory_order_relaxed);
  if (n == AIOB_LOCAL_KEYS_MAX) {
    pthread_mutex_unlock(&local_mu);
    return AIOB_ENOSPC;
  }
  local_keys[n].clone = clone;
  local_keys[n].destroy = destroy;
  atomic_store_explicit(&local_nkeys, n + 1, memory_order_release);
  pthread_mutex_unlock(&local_mu);
  *key = n;
  return 0;
}

static bool key_valid(aiob_local_key key) {
  return key < atomic_load_explicit(&local_nkeys, memory_order_acquire);
}

void aiob__local_destroy(aiob_local_key key, void *value) {
  if (value && local_keys[key].destroy)
    local_keys[key].destroy(value);
}

int aiob_task_local_set(aiob_task *self, aiob_local_key key, void *value) {
  if (!self || !key_valid(key))
    return AIOB_EINVAL;
  int rc = locals_reserve(self, key + 1u);
  if (rc)
    return rc;
  void *old = self->locals[key];
  self->locals[key] = value;
  if (old != value)
    aiob__local_destroy(key, old);
  return 0;
}

void *aiob_task_local_get(const aiob_task *self, aiob_local_key key) {
  if (!self || key >= self->nlocals)
    return NULL;
  return self->locals[key];
}

int aiob__locals_inherit(aiob_task *child, const aiob_task *parent) {
  for (unsigned k = 0; k < parent->nlocals; k++) {
    void *v = parent->locals[k];
    if (!v || !local_keys[k].clone)
      continue;
    int rc = locals_reserve(child, parent->nlocals);
    if (rc)
      return rc;
    child->locals[k] = local_keys[k].clone(v);
  }
  return 0;
}

void aiob__locals_destroy(aiob_task *t) {
  for (unsigned k = 0; k < t->nlocals; k++) {
    void *v = t->locals[k];
    t->locals[k] = NULL;
    aiob__local_destroy(k, v);
  }
  free(t->locals);
  t->locals = NULL;
  t->nlocals = 0;
}
