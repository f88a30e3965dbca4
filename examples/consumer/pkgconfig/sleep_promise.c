/* sleep_promise: a C program on an installed aiobridge, built with nothing
 * but `pkg-config aiobridge` (see the Makefile).
 *
 * A task on the default runtime sleeps, then awaits a promise that another
 * thread completes once the task waits for it; a second task awaits a
 * promise nobody completes and is cancelled. AIOBRIDGE_BACKEND picks the
 * backend. Exits 0 when every check holds, 77 when the kernel refuses the
 * backend (io_uring disabled), 1 otherwise. */
#include <aiobridge.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static int failures;

#define EXPECT(cond) expect((cond), #cond, __LINE__)

static void expect(int ok, const char *what, int line) {
  if (!ok) {
    fprintf(stderr, "sleep_promise.c:%d: check failed: %s\n", line, what);
    failures++;
  }
}

/* The task tells the completing thread that it now waits on the promise. */
typedef struct handoff {
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int waiting;
} handoff;

static void handoff_signal(handoff *h) {
  pthread_mutex_lock(&h->mu);
  h->waiting = 1;
  pthread_cond_signal(&h->cond);
  pthread_mutex_unlock(&h->mu);
}

static void handoff_wait(handoff *h) {
  pthread_mutex_lock(&h->mu);
  while (!h->waiting)
    pthread_cond_wait(&h->cond, &h->mu);
  pthread_mutex_unlock(&h->mu);
}

typedef struct waiter {
  int co;
  uint64_t nap_ns; /* 0: no sleep */
  aiob_sleep nap;
  uint64_t started_ns, slept_ns;
  aiob_promise *p; /* the waiter side, released in drop */
  aiob_output got;
  handoff *h;
  int loop;          /* aiob_runtime_current_loop seen in poll */
  int first_pending; /* the promise was not complete when first polled */
  int drops;
} waiter;

static aiob_poll waiter_poll(aiob_task *task, void *state) {
  waiter *w = state;
  AIOB_BEGIN(&w->co);
  w->loop = aiob_runtime_current_loop(aiob_task_runtime(task));
  w->started_ns = aiob_now_ns();
  aiob_sleep_init(&w->nap, w->nap_ns);
  AIOB_AWAIT(&w->co, aiob_sleep_poll(task, &w->nap, NULL));
  w->slept_ns = aiob_now_ns() - w->started_ns;
  /* Register interest first, then let the other thread complete it: the
   * wake-up has to cross threads. */
  w->first_pending = aiob_promise_poll(task, w->p, &w->got) == AIOB_PENDING;
  handoff_signal(w->h);
  if (w->first_pending)
    AIOB_AWAIT(&w->co, aiob_promise_poll(task, w->p, &w->got));
  if (w->got.status < 0)
    aiob_task_fail(task, w->got.status);
  aiob_task_return(task, w->got.value, w->got.free_value); /* moves it */
  w->got.value = NULL;
  AIOB_END(&w->co);
}

/* Runs once on the loop thread, after completion or cancellation. */
static void waiter_drop(void *state) {
  waiter *w = state;
  w->drops++;
  aiob_output_clear(&w->got);
  aiob_promise_release(w->p);
}

static const aiob_task_vtable waiter_vt = {.poll = waiter_poll,
                                           .drop = waiter_drop};

typedef struct completer {
  handoff *h;
  aiob_promise *p; /* the completer side */
  int rc;
} completer;

static void *complete_when_waited(void *arg) {
  completer *c = arg;
  handoff_wait(c->h);
  int *v = malloc(sizeof *v);
  if (v)
    *v = 42;
  c->rc = v ? aiob_promise_complete(c->p, 0, v, free) /* any thread */
            : aiob_promise_abandon(c->p);
  return NULL;
}

/* A waiter that sleeps nap_ns first, and its fresh hand-off. */
static void setup(waiter *w, handoff *h, uint64_t nap_ns) {
  *w = (waiter){.nap_ns = nap_ns, .h = h, .loop = -2};
  pthread_mutex_init(&h->mu, NULL);
  pthread_cond_init(&h->cond, NULL);
  h->waiting = 0;
}

static void handoff_destroy(handoff *h) {
  pthread_cond_destroy(&h->cond);
  pthread_mutex_destroy(&h->mu);
}

/* Spawns w; if that fails, gives up both sides of its promise (poll and
 * drop never run then) and returns 0. */
static int spawn_waiter(aiob_runtime *rt, waiter *w, aiob_task **t) {
  int rc = aiob_spawn(rt, &waiter_vt, w, t);
  EXPECT(rc == 0);
  if (rc < 0) {
    aiob_promise_abandon(w->p);
    aiob_promise_release(w->p);
    handoff_destroy(w->h);
  }
  return rc == 0;
}

/* A task sleeps 10 ms, then gets 42 through a promise from a thread. */
static void completed_promise(aiob_runtime *rt) {
  handoff h;
  waiter w;
  setup(&w, &h, 10 * AIOB_MSEC);
  EXPECT(aiob_promise_new(&w.p) == 0);
  completer c = {.h = &h, .p = w.p};
  aiob_task *t;
  if (!spawn_waiter(rt, &w, &t))
    return;
  pthread_t th;
  EXPECT(pthread_create(&th, NULL, complete_when_waited, &c) == 0);
  EXPECT(aiob_task_wait(t, 10 * AIOB_SEC) == 0);
  pthread_join(th, NULL);
  aiob_output out = {0};
  EXPECT(aiob_task_take_output(t, &out) == 0);
  EXPECT(out.status == 0);
  EXPECT(out.value && *(int *)out.value == 42);
  aiob_output_clear(&out);
  aiob_task_release(t);
  EXPECT(c.rc == 0);
  EXPECT(w.loop >= 0);                  /* polled on a loop thread */
  EXPECT(w.slept_ns >= 10 * AIOB_MSEC); /* a sleep never ends early */
  EXPECT(w.first_pending);
  EXPECT(w.drops == 1);
  printf("task on loop %d slept %.1f ms, then got 42 from another thread\n",
         w.loop, (double)w.slept_ns / 1e6);
  handoff_destroy(&h);
}

/* A task waits on a promise nobody completes; cancelling it drops it once,
 * and the completer side is then given up with nobody waiting. */
static void cancelled_wait(aiob_runtime *rt) {
  handoff h;
  waiter w;
  setup(&w, &h, 0);
  EXPECT(aiob_promise_new(&w.p) == 0);
  aiob_promise *completer_side = w.p;
  aiob_task *t;
  if (!spawn_waiter(rt, &w, &t))
    return;
  handoff_wait(&h); /* it waits on the promise now */
  aiob_task_cancel(t);
  EXPECT(aiob_task_wait(t, 10 * AIOB_SEC) == 0);
  aiob_output out = {0};
  EXPECT(aiob_task_take_output(t, &out) == 0);
  EXPECT(out.status == AIOB_ECANCELED);
  aiob_output_clear(&out);
  aiob_task_release(t);
  EXPECT(w.drops == 1);
  EXPECT(aiob_promise_abandon(completer_side) == 0); /* frees the promise */
  printf("cancelled a task waiting on a promise: %s\n",
         aiob_err_name(AIOB_ECANCELED));
  handoff_destroy(&h);
}

int main(void) {
  aiob_runtime *rt;
  int rc = aiob_runtime_default_acquire(&rt);
  if (rc < 0) {
    fprintf(stderr, "sleep_promise: no default runtime: %s (%s)\n",
            aiob_strerror(rc), aiob_err_name(rc));
    return rc == AIOB_ENOSYS || rc == AIOB_EPERM || rc == AIOB_ENOTSUP ? 77 : 1;
  }
  printf("default runtime: backend %s, %u loop thread(s)\n",
         aiob_runtime_backend_name(rt), aiob_runtime_threads(rt));
  EXPECT(aiob_runtime_current_loop(rt) == -1); /* main is not a loop thread */
  completed_promise(rt);
  cancelled_wait(rt);
  EXPECT(aiob_runtime_default_shutdown() == 0);
  /* Our reference keeps rt valid memory; spawning on it now fails. */
  waiter w = {0};
  EXPECT(aiob_spawn(rt, &waiter_vt, &w, NULL) == AIOB_ESHUTDOWN);
  aiob_runtime_release(rt);
  if (failures)
    return 1;
  puts("ok");
  return 0;
}
