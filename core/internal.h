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
 * push (it will have notified the consumer, see aiob__loop_push_remote). */
aiob__mpsc_node *aiob__mpsc_pop(aiob__mpsc *q);
/* Consumer only: true when no node is queued (a racing push may follow). */
bool aiob__mpsc_empty(aiob__mpsc *q);

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
  void *data;
  /* Loop thread only. */
  aiob_task *live_prev, *live_next;
  struct aiob__leaf leaves; /* sentinel of armed leaf futures */
  void **locals;            /* AIOB_LOCAL_KEYS_MAX slots, or NULL */
  /* Output: written on the loop thread before FINISHED is published. */
  aiob_output out;
  /* Waker of the one task joining this one, or a sentinel once finished. */
  _Atomic(uintptr_t) joiner;
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

  /* Remote ready queue and its wake coalescing flag. */
  aiob__mpsc remote;
  _Atomic int notified;
  _Atomic unsigned pushers; /* remote pushes in flight */
  _Atomic int closed;       /* no more remote pushes accepted */
  _Atomic int stop;

  /* Loop thread only. */
  aiob_task *local_head, *local_tail; /* local FIFO, linked via node.next */
  aiob_task live;                     /* sentinel of unfinished tasks */
  aiob__timer_heap timers;
  bool timer_armed;
  uint64_t timer_deadline;
  struct aiob__fd_rec **fds; /* indexed by fd */
  size_t nfds;

  /* Spin-before-block budget (loop thread only), ns. */
  uint64_t spin_budget;

  /* Counters (single writer per counter except spawned). */
  _Atomic uint64_t n_spawned, n_completed, n_cancelled, n_polls, n_wakes;
  _Atomic uint64_t n_spins, n_spin_hits, n_spin_ns;

  /* Start-up handshake. */
  int init_status;
};

struct aiob_runtime {
  _Atomic uint32_t refs;
  _Atomic int shut; /* 0 running, 1 shutting down or shut */
  pthread_mutex_t shutdown_mu;
  bool shutdown_done;
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
};

/* The loop running on this thread and the task it is polling (or NULL). */
extern _Thread_local aiob_loop *aiob__current_loop;
extern _Thread_local aiob_task *aiob__current_task;

void aiob__runtime_ref(aiob_runtime *rt);
void aiob__runtime_unref(aiob_runtime *rt);

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
