/* Task building blocks and cmocka fixtures shared by the per-backend C
 * suites (conformance.c, backend_edges.c). Include after harness.h, once
 * the including file has defined
 *   static const char *g_backend;                          (for messages)
 *   static int runtime_new(aiob_runtime **out, unsigned threads);
 */
#ifndef AIOBRIDGE_TESTS_BLOCKS_H
#define AIOBRIDGE_TESTS_BLOCKS_H

#include <fcntl.h>
#include <string.h>
#include <unistd.h>

/* ---- Task building blocks ---------------------------------------------- */

/* Every task state of these blocks starts with a tbase. */
typedef struct tbase {
  atomic_int polls;
  atomic_int drops;
} tbase;

/* Counts a poll and checks the contract "poll never runs after drop". */
static inline int poll_enter(void *state) {
  tbase *b = state;
  CHECK_INT(atomic_load(&b->drops), ==, 0);
  return atomic_fetch_add(&b->polls, 1) + 1;
}

/* The counting drop. */
static inline void drop_count(void *state) {
  tbase *b = state;
  CHECK_INT(atomic_fetch_add(&b->drops, 1), ==, 0);
}

static inline int polls_of(void *state) {
  return atomic_load(&((tbase *)state)->polls);
}
static inline int drops_of(void *state) {
  return atomic_load(&((tbase *)state)->drops);
}

/* Waits once on fd for `events`; signals `pending` after its first
 * PENDING; result holds the ready bits or a negative code. */
typedef struct io_task {
  tbase b;
  int fd;
  unsigned events;
  latch *pending;
  int inited;
  aiob_io_wait w;
  atomic_int result;
} io_task;

static inline aiob_poll io_poll(aiob_task *t, void *p) {
  io_task *k = p;
  int n = poll_enter(k);
  if (!k->inited) {
    k->inited = 1;
    aiob_io_wait_init(&k->w, k->fd, k->events);
  }
  int res = 0;
  if (aiob_io_wait_poll(t, &k->w, &res) == AIOB_PENDING) {
    if (n == 1 && k->pending)
      latch_add(k->pending, 1);
    return AIOB_PENDING;
  }
  atomic_store(&k->result, res);
  return AIOB_READY;
}
static const aiob_task_vtable io_vt = {.poll = io_poll, .drop = drop_count};

static inline void io_task_init(io_task *k, int fd, unsigned events,
                                latch *pending) {
  memset(k, 0, sizeof *k);
  k->fd = fd;
  k->events = events;
  k->pending = pending;
  atomic_store(&k->result, 12345);
}

/* Gate: occupies one loop thread inside a poll until the test opens it
 * (bounded), so the test can make things happen behind the loop's back.
 * `after_open`, when set, runs on the loop thread right after the gate
 * opened, before the loop sees any of it. */
typedef struct gate {
  tbase b;
  latch entered, open;
  void (*after_open)(void *arg);
  void *arg;
} gate;

static inline aiob_poll gate_poll(aiob_task *t, void *p) {
  (void)t;
  gate *g = p;
  poll_enter(g);
  latch_add(&g->entered, 1);
  CHECK(latch_wait(&g->open, 1, WAIT_TIMEOUT) == 0);
  if (g->after_open)
    g->after_open(g->arg);
  return AIOB_READY;
}
static const aiob_task_vtable gate_vt = {.poll = gate_poll, .drop = drop_count};

/* Spawns a gate on loop `loop` and returns once that loop is blocked in it. */
static inline gate *gate_close(aiob_runtime *rt, int loop,
                               void (*after_open)(void *), void *arg,
                               aiob_task **h) {
  gate *g = xcalloc(1, sizeof *g);
  latch_init(&g->entered);
  latch_init(&g->open);
  g->after_open = after_open;
  g->arg = arg;
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.loop = loop;
  assert_rc(aiob_spawn_ex(rt, &o, &gate_vt, g, h), 0);
  latch_ok(&g->entered, 1);
  return g;
}

static inline void gate_open(gate *g) { latch_add(&g->open, 1); }

static inline void gate_finish(gate *g, aiob_task *h) {
  wait_ok(h);
  aiob_task_release(h);
  assert_int_equal(drops_of(g), 1);
  latch_destroy(&g->entered);
  latch_destroy(&g->open);
  free(g);
}

static inline aiob_task *spawn_on(aiob_runtime *rt, int loop,
                                  const aiob_task_vtable *vt, void *state) {
  aiob_spawn_opts o;
  aiob_spawn_opts_init(&o);
  o.loop = loop;
  aiob_task *h = NULL;
  assert_rc(aiob_spawn_ex(rt, &o, vt, state, &h), 0);
  assert_non_null(h);
  return h;
}

static inline aiob_task *spawn_h(aiob_runtime *rt, const aiob_task_vtable *vt,
                                 void *state) {
  aiob_task *h = NULL;
  assert_rc(aiob_spawn(rt, vt, state, &h), 0);
  assert_non_null(h);
  return h;
}

static inline int pipe_nb(int p[2]) { return pipe2(p, O_NONBLOCK | O_CLOEXEC); }

/* ---- Fixtures ---------------------------------------------------------- */

typedef struct fx {
  aiob_runtime *rt;
} fx;

static inline int fx_setup(void **state, unsigned threads) {
  reset_checks();
  fx *f = calloc(1, sizeof *f);
  if (!f)
    return -1;
  int rc = runtime_new(&f->rt, threads);
  if (rc) {
    fprintf(stderr, "aiob_runtime_new(%s, %u threads): %s\n", g_backend,
            threads, aiob_strerror(rc));
    free(f);
    return -1;
  }
  *state = f;
  return 0;
}

static inline int setup1(void **state) { return fx_setup(state, 1); }
static inline int setup2(void **state) { return fx_setup(state, 2); }

/* For tests that make their own runtimes (special options, or none). */
static inline int setup_none(void **state) {
  reset_checks();
  *state = NULL;
  return 0;
}

static inline int teardown(void **state) {
  fx *f = *state;
  if (f) {
    aiob_runtime_free(f->rt);
    free(f);
  }
  return 0;
}

#define RT(state) (((fx *)*(state))->rt)

#endif /* AIOBRIDGE_TESTS_BLOCKS_H */
