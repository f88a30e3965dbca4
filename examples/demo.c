/* aiobridge C example: spawn tasks on a runtime, sleep, complete a promise
 * from another thread, and join — printing what happens. */
#include "aiobridge.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t t0;

static double ms_since_start(void) {
  return (double)(aiob_now_ns() - t0) / 1e6;
}

/* A sleeper: sleeps `ms`, then finishes with a heap string as its value. */
struct sleeper {
  int co;
  const char *name;
  unsigned ms;
  aiob_sleep sleep;
};

static aiob_poll sleeper_poll(aiob_task *task, void *p) {
  struct sleeper *s = p;
  AIOB_BEGIN(&s->co);
  printf("[%6.1f ms] %s: sleeping %u ms\n", ms_since_start(), s->name, s->ms);
  aiob_sleep_init(&s->sleep, s->ms * AIOB_MSEC);
  AIOB_AWAIT(&s->co, aiob_sleep_poll(task, &s->sleep, NULL));
  printf("[%6.1f ms] %s: woke up\n", ms_since_start(), s->name);
  char *msg = malloc(64);
  if (msg)
    snprintf(msg, 64, "%s slept %u ms", s->name, s->ms);
  aiob_task_return(task, msg, free);
  AIOB_END(&s->co);
}

static void sleeper_drop(void *p) { free(p); }

static const aiob_task_vtable sleeper_vt = {.poll = sleeper_poll,
                                            .drop = sleeper_drop};

/* A worker thread that completes a promise: how a callback from any native
 * library (a libuv request, an io_uring completion, a thread pool) becomes
 * something a task can await. */
static void *worker(void *arg) {
  aiob_promise *p = arg;
  printf("[%6.1f ms] worker thread: computing 6 * 7\n", ms_since_start());
  int *answer = malloc(sizeof *answer);
  *answer = 6 * 7;
  aiob_promise_complete(p, 0, answer, free);
  return NULL;
}

/* The main task: spawns two sleepers, awaits a promise, joins both. */
struct main_task {
  int co;
  aiob_promise *promise;
  pthread_t thread;
  aiob_task *a, *b;
  aiob_output out;
  int status;
};

static aiob_task *spawn_sleeper(aiob_runtime *rt, const char *name,
                                unsigned ms) {
  struct sleeper *s = calloc(1, sizeof *s);
  s->name = name;
  s->ms = ms;
  aiob_task *t = NULL;
  if (aiob_spawn(rt, &sleeper_vt, s, &t) < 0) {
    free(s);
    return NULL;
  }
  return t;
}

static void print_output(aiob_task *t) {
  aiob_output out;
  aiob_task_take_output(t, &out);
  printf("[%6.1f ms] main: joined: \"%s\" (status %s)\n", ms_since_start(),
         out.value ? (char *)out.value : "", aiob_err_name(out.status));
  aiob_output_clear(&out);
}

static aiob_poll main_poll(aiob_task *task, void *p) {
  struct main_task *m = p;
  AIOB_BEGIN(&m->co);
  m->a = spawn_sleeper(aiob_task_runtime(task), "sleeper A", 30);
  m->b = spawn_sleeper(aiob_task_runtime(task), "sleeper B", 10);
  if (!m->a || !m->b || aiob_promise_new(&m->promise) < 0) {
    aiob_task_fail(task, AIOB_ENOMEM);
    return AIOB_READY;
  }
  pthread_create(&m->thread, NULL, worker, m->promise);
  AIOB_AWAIT(&m->co, aiob_promise_poll(task, m->promise, &m->out));
  printf("[%6.1f ms] main: promise resolved with %d\n", ms_since_start(),
         *(int *)m->out.value);
  aiob_output_clear(&m->out);
  AIOB_AWAIT(&m->co, aiob_task_join(task, m->a, &m->status));
  print_output(m->a);
  AIOB_AWAIT(&m->co, aiob_task_join(task, m->b, &m->status));
  print_output(m->b);
  AIOB_END(&m->co);
}

static void main_drop(void *p) {
  struct main_task *m = p;
  if (m->promise) {
    pthread_join(m->thread, NULL);
    aiob_promise_release(m->promise);
  }
  aiob_task_release(m->a);
  aiob_task_release(m->b);
}

static const aiob_task_vtable main_vt = {.poll = main_poll, .drop = main_drop};

int main(void) {
  t0 = aiob_now_ns();
  aiob_runtime *rt;
  int rc = aiob_runtime_default(&rt);
  if (rc < 0) {
    fprintf(stderr, "cannot start the runtime: %s\n", aiob_strerror(rc));
    return 1;
  }
  printf("runtime: backend \"%s\", %u loop thread(s)\n",
         aiob_runtime_backend_name(rt), aiob_runtime_threads(rt));

  struct main_task m;
  memset(&m, 0, sizeof m);
  aiob_task *t;
  rc = aiob_spawn(rt, &main_vt, &m, &t);
  if (rc == 0)
    rc = aiob_task_wait(t, 10 * AIOB_SEC);
  aiob_output out = {0};
  if (rc == 0)
    aiob_task_take_output(t, &out);
  aiob_task_release(t);

  aiob_runtime_stats st;
  aiob_runtime_stats_get(rt, &st);
  printf("stats: %llu tasks spawned, %llu completed, %llu polls, %llu loop "
         "wakes\n",
         (unsigned long long)st.tasks_spawned,
         (unsigned long long)st.tasks_completed, (unsigned long long)st.polls,
         (unsigned long long)st.loop_wakes);
  aiob_runtime_default_shutdown();
  if (rc < 0 || out.status < 0) {
    fprintf(stderr, "demo failed: %s\n",
            aiob_strerror(rc < 0 ? rc : out.status));
    return 1;
  }
  printf("done\n");
  return 0;
}
