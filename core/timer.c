/* Sleeps: leaf futures kept in the loop's deadline heap. The backend gives
 * the loop a single timer, armed for the earliest deadline; a sleep fires
 * only once aiob_now_ns() reached its deadline, so it is never early even if
 * a backend's timer is. */
#include "internal.h"

#include <string.h>

#define TIMER_MAX_NS (3600 * AIOB_SEC)

enum {
  SLEEP_INIT,
  SLEEP_INIT_UNTIL,
  SLEEP_YIELDED,
  SLEEP_ARMED,
  SLEEP_DONE,
  SLEEP_STOPPED
};

static void sleep_disarm(aiob_sleep *s) {
  aiob_loop *loop = s->task->loop;
  aiob__heap_remove(&loop->timers, s);
}

static void sleep_detach(struct aiob__leaf *leaf) {
  aiob_sleep *s = AIOB__CONTAINER_OF(leaf, aiob_sleep, leaf);
  sleep_disarm(s);
  s->state = SLEEP_STOPPED;
}

void aiob_sleep_init(aiob_sleep *s, uint64_t duration_ns) {
  memset(s, 0, sizeof *s);
  s->leaf.next = s->leaf.prev = &s->leaf;
  s->duration = duration_ns;
  s->state = SLEEP_INIT;
}

void aiob_sleep_init_until(aiob_sleep *s, uint64_t deadline_ns) {
  aiob_sleep_init(s, 0);
  s->deadline = deadline_ns;
  s->state = SLEEP_INIT_UNTIL;
}

void aiob_sleep_stop(aiob_sleep *s) {
  if (s->state != SLEEP_ARMED)
    return;
  aiob__leaf_unlink(&s->leaf);
  sleep_detach(&s->leaf);
}

static aiob_poll sleep_ready(int *status, int rc) {
  if (status)
    *status = rc;
  return AIOB_READY;
}

aiob_poll aiob_sleep_poll(aiob_task *self, aiob_sleep *s, int *status) {
  uint64_t now;
  switch (s->state) {
  case SLEEP_DONE:
  case SLEEP_STOPPED:
    return sleep_ready(status, 0);
  case SLEEP_YIELDED:
    s->state = SLEEP_DONE;
    return sleep_ready(status, 0);
  case SLEEP_ARMED:
    if (aiob_now_ns() < s->deadline)
      return AIOB_PENDING;
    aiob_sleep_stop(s);
    s->state = SLEEP_DONE;
    return sleep_ready(status, 0);
  case SLEEP_INIT:
    if (s->duration == 0) {
      s->state = SLEEP_YIELDED;
      aiob_task_yield_now(self);
      return AIOB_PENDING;
    }
    now = aiob_now_ns();
    s->deadline =
        s->duration > UINT64_MAX - now ? UINT64_MAX : now + s->duration;
    break;
  default:
    break;
  }
  now = aiob_now_ns();
  if (now >= s->deadline) {
    s->state = SLEEP_DONE;
    return sleep_ready(status, 0);
  }
  s->task = self;
  s->leaf.detach = sleep_detach;
  int rc = aiob__heap_push(&self->loop->timers, s);
  if (rc < 0) {
    s->state = SLEEP_DONE;
    return sleep_ready(status, rc);
  }
  aiob__leaf_link(self, &s->leaf);
  s->state = SLEEP_ARMED;
  return AIOB_PENDING;
}

void aiob__timers_process(aiob_loop *loop, uint64_t now) {
  aiob_sleep *s;
  while ((s = aiob__heap_top(&loop->timers)) && s->deadline <= now) {
    aiob__heap_remove(&loop->timers, s);
    aiob__leaf_unlink(&s->leaf);
    s->state = SLEEP_DONE;
    aiob_waker_wake((aiob_waker *)s->task);
  }
}

void aiob__timers_rearm(aiob_loop *loop) {
  aiob_sleep *top = aiob__heap_top(&loop->timers);
  if (!top) {
    if (loop->timer_armed) {
      loop->backend->timer_stop(loop->bl);
      loop->timer_armed = false;
    }
    return;
  }
  if (loop->timer_armed && loop->timer_deadline == top->deadline)
    return;
  uint64_t now = aiob_now_ns();
  uint64_t delay = top->deadline > now ? top->deadline - now : 0;
  /* Backends need not handle huge timeouts: the core re-arms on expiry. */
  if (delay > TIMER_MAX_NS)
    delay = TIMER_MAX_NS;
  if (loop->backend->timer_start(loop->bl, delay) == 0) {
    loop->timer_armed = true;
    loop->timer_deadline = top->deadline;
  }
}

static void timer_expired(void *arg) {
  aiob_loop *core = arg;
  core->timer_armed = false;
}

void aiob_backend_timer_expired(aiob_loop *core) {
  if (core->hosted)
    aiob__hosted_report(core, timer_expired, core); /* fires due timers */
  else
    timer_expired(core);
}
