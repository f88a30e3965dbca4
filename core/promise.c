/* Promises: a one-shot value shared by a waiting task and a completer on
 * any thread. Two references (waiter side, completer side); `waiter` is a
 * single-waiter slot (aiob__slot), done once the output is published. */
#include "internal.h"

#include <stdlib.h>

struct aiob_promise {
  _Atomic uint32_t refs;
  _Atomic int completer_gone;
  _Atomic int waiter_gone;
  _Atomic int taken;
  aiob__slot waiter;
  aiob_output out; /* written by the completer before the slot is done */
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
  aiob__slot_done(&p->waiter);
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
  int rc = aiob__slot_wait(&p->waiter, self);
  if (rc > 0)
    return promise_take(p, out);
  if (rc == 0)
    return AIOB_PENDING;
  if (out)
    *out = (aiob_output){.status = rc};
  return AIOB_READY;
}

bool aiob__promise_completed(aiob_promise *p) {
  return atomic_load(&p->completer_gone) != 0;
}

void aiob_promise_release(aiob_promise *p) {
  if (!p || atomic_exchange(&p->waiter_gone, 1))
    return;
  aiob__slot_clear(&p->waiter);
  promise_unref(p);
}
