/* Hosted runtimes: one loop with no thread of its own, run by the thread
 * that created it (the host thread) from its host loop's callbacks.
 *
 * A dispatch is one turn of a loop thread's body without the blocking:
 * accept remote pushes, run a bounded batch of ready tasks, fire due
 * timers (and run what they woke), rearm the backend timer. While it runs,
 * the host thread is the loop's thread in the core's eyes
 * (aiob__current_loop), so wakes and spawns inside it queue locally. Work
 * left over asks the backend for another dispatch (its wake), so a host
 * loop is never held up by a long batch. */
#include "internal.h"

#include <stdlib.h>

int aiob_runtime_new_hosted(aiob_runtime **out,
                            const aiob_runtime_config *cfg) {
  aiob_runtime_config one;
  if (!out)
    return AIOB_EINVAL;
  if (!cfg)
    aiob_runtime_config_init(&one);
  else
    one = *cfg;
  one.threads = 1;
  aiob_runtime *rt;
  int rc = aiob__runtime_alloc(&one, 1, &rt);
  if (rc < 0)
    return rc;
  rt->hosted = true;
  rt->spin_max_ns = 0;
  aiob_loop *loop = &rt->loops[0];
  loop->hosted = true;
  loop->thread = pthread_self();
  /* The backend's slots run "on the loop thread": this one. */
  aiob_loop *saved = aiob__current_loop;
  aiob__current_loop = loop;
  void *bl = NULL;
  rc = rt->backend->loop_init(loop, &rt->options, &bl);
  if (rc == 0) {
    loop->bl = bl;
    if (AIOB__HAS_SLOT(rt->backend, native))
      loop->native = rt->backend->native(bl);
  }
  aiob__current_loop = saved;
  if (rc < 0) {
    aiob__runtime_unref(rt);
    return rc;
  }
  atomic_store(&loop->exited, 0); /* running until its shutdown */
  aiob__runtime_alive(rt);
  *out = rt;
  return 0;
}

/* The runtime's hosted loop if the caller may run it, else a code. */
static int host_check(aiob_runtime *rt, aiob_loop **out) {
  if (!rt || !rt->hosted)
    return AIOB_EINVAL;
  aiob_loop *loop = &rt->loops[0];
  if (!pthread_equal(loop->thread, pthread_self()))
    return AIOB_EPERM;
  if (atomic_load(&rt->shut))
    return AIOB_ESHUTDOWN;
  *out = loop;
  return 0;
}

static void enter(aiob_loop *loop, aiob_loop **saved_loop,
                  aiob_task **saved_task) {
  *saved_loop = aiob__current_loop;
  *saved_task = aiob__current_task;
  aiob__current_loop = loop;
  aiob__current_task = NULL;
  loop->hosted_depth++;
}

static void leave(aiob_loop *loop, aiob_loop *saved_loop,
                  aiob_task *saved_task) {
  loop->hosted_depth--;
  aiob__current_loop = saved_loop;
  aiob__current_task = saved_task;
}

/* One dispatch; the caller entered the loop. 1 if ready work is left. */
static int run_once(aiob_loop *loop) {
  aiob__loop_accept_remote(loop);
  aiob__loop_run_ready(loop);
  if (aiob__heap_top(&loop->timers)) {
    aiob__timers_process(loop, aiob_now_ns());
    if (loop->local_head)
      aiob__loop_run_ready(loop);
  }
  if (atomic_load(&loop->rt->shut))
    return 0; /* a task shut the runtime down: nothing may be rearmed */
  aiob__timers_rearm(loop);
  return loop->local_head != NULL || !aiob__mpsc_empty(&loop->remote.queue);
}

/* Runs what is ready unless a dispatch already runs further up the host
 * thread's stack; asks for another dispatch when work is left. */
static int dispatch(aiob_loop *loop) {
  if (loop->hosted_depth)
    return 0;
  aiob_loop *sl;
  aiob_task *st;
  enter(loop, &sl, &st);
  int more = run_once(loop);
  leave(loop, sl, st);
  if (more)
    aiob__loop_wake(loop);
  return more;
}

int aiob_runtime_hosted_dispatch(aiob_runtime *rt) {
  aiob_loop *loop;
  int rc = host_check(rt, &loop);
  return rc < 0 ? rc : dispatch(loop);
}

int aiob_runtime_hosted_call(aiob_runtime *rt, int (*fn)(void *arg),
                             void *arg) {
  aiob_loop *loop;
  int rc = host_check(rt, &loop);
  if (rc < 0)
    return rc;
  if (!fn)
    return AIOB_EINVAL;
  aiob_loop *sl;
  aiob_task *st;
  enter(loop, &sl, &st);
  rc = fn(arg);
  /* The outermost call runs the tasks fn spawned, before it returns. */
  int more =
      loop->hosted_depth == 1 && !atomic_load(&rt->shut) ? run_once(loop) : 0;
  leave(loop, sl, st);
  if (more)
    aiob__loop_wake(loop);
  return rc;
}

int aiob_backend_dispatch(aiob_loop *core) {
  if (!core || !core->hosted)
    return AIOB_EINVAL;
  if (atomic_load(&core->rt->shut))
    return AIOB_ESHUTDOWN;
  return dispatch(core);
}

/* Called by aiob_backend_timer_expired / aiob_backend_io_ready on a hosted
 * loop, from the host's callbacks: report(arg) runs with the loop entered
 * (the tasks it wakes queue locally), then what is ready runs. */
void aiob__hosted_report(aiob_loop *loop, void (*report)(void *arg),
                         void *arg) {
  if (loop->hosted_depth || atomic_load(&loop->rt->shut)) {
    report(arg);
    return;
  }
  aiob_loop *sl;
  aiob_task *st;
  enter(loop, &sl, &st);
  report(arg);
  int more = run_once(loop);
  leave(loop, sl, st);
  if (more)
    aiob__loop_wake(loop);
}

int aiob__hosted_shutdown(aiob_runtime *rt, aiob_shutdown_info *info) {
  aiob_loop *loop = &rt->loops[0];
  pthread_mutex_lock(&rt->shutdown_mu);
  bool first = !rt->stop_requested;
  rt->stop_requested = true;
  atomic_store(&rt->shut, 1);
  aiob__pool_stop(&rt->pool);
  pthread_mutex_unlock(&rt->shutdown_mu);
  if (first && !rt->forked) {
    /* Drops every task here: this thread is the loop's from now on. */
    aiob_loop *sl;
    aiob_task *st;
    enter(loop, &sl, &st);
    loop->thread = pthread_self();
    aiob__loop_close(loop);
    leave(loop, sl, st);
  }
  pthread_mutex_lock(&rt->shutdown_mu);
  atomic_store(&loop->exited, 1);
  unsigned workers_left = aiob__pool_wait(&rt->pool, NULL);
  pthread_mutex_unlock(&rt->shutdown_mu);
  if (info)
    *info = (aiob_shutdown_info){.loops = 1, .workers_left = workers_left};
  return 0;
}
