/* Promises: a one-shot slot shared by a waiting task and a completer on any
 * thread. Two references (waiter side, completer side); `waiter` holds the
 * waiting task's waker, or DONE once the output is published. */
#include "internal.h"

#include <stdlib.h>

#define DONE ((uintptr_t)1)

struct aiob_promise {
  _Atomic uint32_t refs;
  _Atomic int completer_gone;
  _Atomic int waiter_gone;
  _Atomic int taken;
  _Atomic(uintptr_t) waiter;
  aiob_output out; /* written by the completer before DONE */
};

int aiob_promise_new(aiob_promise **out) {
  if (!out)
    return AIOB_EINVAL;
  aiob_promise *p = calloc(1, sizeof *p);
  if (!p)
    return AIOB_ENOMEM;
  atomic_init(&p->refs, 2);
  *out = p;
  return 0;
}

static void promise_unref(aiob_promise *p) {
  if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1)
    return;
  if (!atomic_load_explicit(&p->taken, memory_order_relaxed))
    aiob_output_clear(&p->out);
  free(p);
}

int aiob_promise_complete(aiob_promise *p, int status, void *value,
                          void (*free_value)(void *value)) {
  if (!p)
    return AIOB_EINVAL;
  if (atomic_exchange(&p->completer_gone, 1))
    return AIOB_EALREADY;
  p->out.status = status;
  p->out.value = value;
  p->out.free_value = free_value;
  uintptr_t w = atomic_exchange(&p->waiter, DONE);
  if (w && w != DONE) {
    aiob_waker_wake((aiob_waker *)w);
    aiob_waker_release((aiob_waker *)w);
  }
  promise_unref(p);
  return 0;
}

int aiob_promise_abandon(aiob_promise *p) {
  return aiob_promise_complete(p, AIOB_ECANCELED, NULL, NULL);
}

static aiob_poll promise_take(aiob_promise *p, aiob_output *out) {
  if (!out)
    return AIOB_READY;
  out->status = p->out.status;
  out->value = NULL;
  out->free_value = NULL;
  if (!atomic_exchange(&p->taken, 1)) {
    out->value = p->out.value;
    out->free_value = p->out.free_value;
  }
  return AIOB_READY;
}

aiob_poll aiob_promise_poll(aiob_task *self, aiob_promise *p,
                            aiob_output *out) {
  uintptr_t me = (uintptr_t)self;
  uintptr_t cur = atomic_load(&p->waiter);
  for (;;) {
    if (cur == DONE)
      return promise_take(p, out);
    if (cur == me)
      return AIOB_PENDING;
    if (cur != 0 && !aiob_task_is_finished((aiob_task *)cur)) {
      if (out)
        *out = (aiob_output){.status = AIOB_EBUSY};
      return AIOB_READY;
    }
    /* Empty, or held by a waiter that was dropped: take it over. */
    aiob_task_waker(self);
    if (atomic_compare_exchange_strong(&p->waiter, &cur, me)) {
      if (cur)
        aiob_waker_release((aiob_waker *)cur);
      return AIOB_PENDING;
    }
    aiob_waker_release((aiob_waker *)self);
  }
}

void aiob_promise_release(aiob_promise *p) {
  if (!p || atomic_exchange(&p->waiter_gone, 1))
    return;
  uintptr_t cur = atomic_load(&p->waiter);
  while (cur != 0 && cur != DONE) {
    if (atomic_compare_exchange_strong(&p->waiter, &cur, 0)) {
      aiob_waker_release((aiob_waker *)cur);
      break;
    }
  }
  promise_unref(p);
}
