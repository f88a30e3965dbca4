/* Intrusive multi-producer single-consumer queue (D. Vyukov's design).
 *
 * push is one atomic exchange plus one store, wait-free. pop may see a
 * producer between its two steps and return NULL although the queue is not
 * empty; callers pair the queue with a notification that the producer sends
 * after pushing, so the consumer always runs again. */
#include "internal.h"

#include <sched.h>

void aiob__mpsc_init(aiob__mpsc *q) {
  atomic_store_explicit(&q->stub.next, NULL, memory_order_relaxed);
  q->head = &q->stub;
  atomic_store_explicit(&q->tail, &q->stub, memory_order_release);
}

void aiob__mpsc_push(aiob__mpsc *q, aiob__mpsc_node *n) {
  atomic_store_explicit(&n->next, NULL, memory_order_relaxed);
  aiob__mpsc_node *prev =
      atomic_exchange_explicit(&q->tail, n, memory_order_acq_rel);
  atomic_store_explicit(&prev->next, n, memory_order_release);
}

aiob__mpsc_node *aiob__mpsc_pop(aiob__mpsc *q) {
  aiob__mpsc_node *head = q->head;
  aiob__mpsc_node *next =
      atomic_load_explicit(&head->next, memory_order_acquire);
  if (head == &q->stub) {
    if (!next)
      return NULL;
    q->head = next;
    head = next;
    next = atomic_load_explicit(&next->next, memory_order_acquire);
  }
  if (next) {
    q->head = next;
    return head;
  }
  if (atomic_load_explicit(&q->tail, memory_order_acquire) != head)
    return NULL; /* a producer is mid-push */
  aiob__mpsc_push(q, &q->stub);
  next = atomic_load_explicit(&head->next, memory_order_acquire);
  if (next) {
    q->head = next;
    return head;
  }
  return NULL;
}

bool aiob__mpsc_empty(aiob__mpsc *q) {
  return q->head == &q->stub &&
         atomic_load_explicit(&q->stub.next, memory_order_acquire) == NULL &&
         atomic_load_explicit(&q->tail, memory_order_acquire) == &q->stub;
}

/* ---- Inbox ------------------------------------------------------------- */

void aiob__inbox_init(aiob__inbox *in) {
  aiob__mpsc_init(&in->queue);
  atomic_init(&in->signalled, 0);
  atomic_init(&in->pushers, 0);
  atomic_init(&in->closed, 0);
}

void aiob__inbox_wake(aiob__inbox *in, void (*wake)(void *), void *arg) {
  atomic_fetch_add(&in->pushers, 1);
  if (!atomic_load(&in->closed))
    wake(arg);
  atomic_fetch_sub(&in->pushers, 1);
}

bool aiob__inbox_close(aiob__inbox *in) {
  if (atomic_exchange(&in->closed, 1))
    return false;
  while (atomic_load(&in->pushers))
    sched_yield(); /* a producer is between its check and its push */
  return true;
}
