/* Unit tests of core pieces without a real loop where that is clearer:
 * the MPSC queue, the deadline heap, the error table, task references, and
 * the spin gate's decisions, and a loop thread beside a producer stalled
 * half-way through its push. */
#include "internal.h"

#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* ---- MPSC queue -------------------------------------------------------- */

typedef struct item {
  aiob__mpsc_node node;
  unsigned producer;
  unsigned seq;
} item;

static void mpsc_fifo_single_thread(void **unused) {
  (void)unused;
  aiob__mpsc q;
  aiob__mpsc_init(&q);
  assert_true(aiob__mpsc_empty(&q));
  assert_null(aiob__mpsc_pop(&q));
  item items[100];
  for (unsigned i = 0; i < 100; i++) {
    items[i].seq = i;
    aiob__mpsc_push(&q, &items[i].node);
  }
  assert_false(aiob__mpsc_empty(&q));
  for (unsigned i = 0; i < 100; i++) {
    aiob__mpsc_node *n = aiob__mpsc_pop(&q);
    assert_non_null(n);
    assert_int_equal(AIOB__CONTAINER_OF(n, item, node)->seq, i);
  }
  assert_null(aiob__mpsc_pop(&q));
  assert_true(aiob__mpsc_empty(&q));
  /* Reusable after draining (the stub goes around again). */
  aiob__mpsc_push(&q, &items[7].node);
  assert_ptr_equal(aiob__mpsc_pop(&q), &items[7].node);
  assert_null(aiob__mpsc_pop(&q));
}

#define PRODUCERS 4
#define PER_PRODUCER 50000

struct producer_arg {
  aiob__mpsc *q;
  item *items;
  unsigned id;
};

static void *producer(void *p) {
  struct producer_arg *a = p;
  for (unsigned i = 0; i < PER_PRODUCER; i++) {
    a->items[i].producer = a->id;
    a->items[i].seq = i;
    aiob__mpsc_push(a->q, &a->items[i].node);
  }
  return NULL;
}

static void mpsc_many_producers_keep_per_producer_order(void **unused) {
  (void)unused;
  aiob__mpsc q;
  aiob__mpsc_init(&q);
  pthread_t th[PRODUCERS];
  struct producer_arg args[PRODUCERS];
  item *items = calloc(PRODUCERS * PER_PRODUCER, sizeof *items);
  assert_non_null(items);
  for (unsigned p = 0; p < PRODUCERS; p++) {
    args[p] = (struct producer_arg){&q, items + p * PER_PRODUCER, p};
    assert_int_equal(pthread_create(&th[p], NULL, producer, &args[p]), 0);
  }
  unsigned next[PRODUCERS] = {0};
  unsigned total = 0;
  uint64_t deadline = aiob_now_ns() + 30 * AIOB_SEC;
  while (total < PRODUCERS * PER_PRODUCER) {
    aiob__mpsc_node *n = aiob__mpsc_pop(&q);
    if (!n) {
      assert_true(aiob_now_ns() < deadline);
      continue;
    }
    item *it = AIOB__CONTAINER_OF(n, item, node);
    assert_int_equal(it->seq, next[it->producer]);
    next[it->producer]++;
    total++;
  }
  for (unsigned p = 0; p < PRODUCERS; p++)
    pthread_join(th[p], NULL);
  assert_null(aiob__mpsc_pop(&q));
  free(items);
}

/* ---- Deadline heap ----------------------------------------------------- */

static void heap_pops_in_deadline_order_with_removals(void **unused) {
  (void)unused;
  enum { N = 2000 };
  aiob__timer_heap h;
  aiob__heap_init(&h);
  aiob_sleep *s = calloc(N, sizeof *s);
  bool *in = calloc(N, sizeof *in);
  assert_non_null(s);
  assert_non_null(in);
  srand(12345);
  for (unsigned i = 0; i < N; i++) {
    s[i].deadline = (uint64_t)(rand() % 500); /* many equal deadlines */
    assert_int_equal(aiob__heap_push(&h, &s[i]), 0);
    in[i] = true;
  }
  /* Remove a third from arbitrary positions. */
  for (unsigned i = 0; i < N; i += 3) {
    aiob__heap_remove(&h, &s[i]);
    in[i] = false;
  }
  size_t expected = 0;
  for (unsigned i = 0; i < N; i++)
    expected += in[i];
  assert_int_equal(h.len, expected);
  uint64_t last = 0;
  size_t popped = 0;
  aiob_sleep *top;
  while ((top = aiob__heap_top(&h))) {
    assert_true(top->deadline >= last);
    assert_true(in[top - s]);
    in[top - s] = false;
    last = top->deadline;
    aiob__heap_remove(&h, top);
    popped++;
  }
  assert_int_equal(popped, expected);
  aiob__heap_free(&h);
  free(s);
  free(in);
}

/* ---- Error table ------------------------------------------------------- */

static void error_table_round_trip(void **unused) {
  (void)unused;
  assert_int_equal(AIOB_EINVAL, -EINVAL);
  assert_int_equal(AIOB_ECANCELED, -ECANCELED);
  assert_string_equal(aiob_err_name(AIOB_ECANCELED), "ECANCELED");
  assert_string_equal(aiob_strerror(AIOB_ESHUTDOWN), "runtime is shut down");
  assert_string_equal(aiob_err_name(-99999), "UNKNOWN");
  assert_non_null(aiob_strerror(-99999));
  assert_string_equal(aiob_err_name(0), "OK");
}

/* ---- Task references --------------------------------------------------- */

struct refs_state {
  aiob_waker *waker; /* handed out on first poll */
  _Atomic int polls;
  _Atomic int drops;
};

static aiob_poll refs_poll(aiob_task *t, void *p) {
  struct refs_state *st = p;
  if (atomic_fetch_add(&st->polls, 1) == 0) {
    st->waker = aiob_task_waker(t);
    return AIOB_PENDING;
  }
  return AIOB_READY;
}

static void refs_drop(void *p) {
  struct refs_state *st = p;
  atomic_fetch_add(&st->drops, 1);
}

static const aiob_task_vtable refs_vt = {.poll = refs_poll, .drop = refs_drop};

static void waker_references_keep_task_alive(void **unused) {
  (void)unused;
  aiob_runtime *rt;
  assert_int_equal(aiob_runtime_new(&rt, NULL), 0);
  struct refs_state st = {0};
  aiob_task *t;
  assert_int_equal(aiob_spawn(rt, &refs_vt, &st, &t), 0);
  uint64_t deadline = aiob_now_ns() + 10 * AIOB_SEC;
  while (atomic_load(&st.polls) == 0 ||
         (atomic_load(&t->state) & AIOB__T_RUNNING))
    assert_true(aiob_now_ns() < deadline);
  /* Pending: handle + waker + its loop's. The queue reference is gone. */
  while (atomic_load(&t->refs) != 3)
    assert_true(aiob_now_ns() < deadline);
  aiob_waker *w2 = aiob_waker_clone(st.waker);
  assert_int_equal(atomic_load(&t->refs), 4);
  aiob_waker_wake(st.waker);
  assert_int_equal(aiob_task_wait(t, 10 * AIOB_SEC), 0);
  assert_int_equal(atomic_load(&st.drops), 1);
  /* Finished: the loop drops its reference just after publishing the
   * result the waiter saw. Waking a finished task is a no-op and takes no
   * reference. */
  while (atomic_load(&t->refs) != 3)
    assert_true(aiob_now_ns() < deadline);
  aiob_waker_wake(w2);
  aiob_waker_wake(st.waker);
  assert_int_equal(atomic_load(&t->refs), 3);
  assert_int_equal(atomic_load(&st.polls), 2);
  aiob_waker_release(w2);
  aiob_waker_release(st.waker);
  assert_int_equal(atomic_load(&t->refs), 1);
  aiob_task_release(t);
  aiob_runtime_free(rt);
}

/* ---- aiob_task_forward ------------------------------------------------ */

/* A child finishes with (status, value); the parent joins it, takes its
 * output and forwards it as its own. */
struct fwd_child {
  int status;
  char *value;
};

static aiob_poll fwd_child_poll(aiob_task *t, void *p) {
  struct fwd_child *c = p;
  if (c->status < 0)
    aiob_task_fail(t, c->status);
  aiob_task_return(t, c->value, free);
  return AIOB_READY;
}

static const aiob_task_vtable fwd_child_vt = {.poll = fwd_child_poll};

struct fwd_parent {
  struct fwd_child child_state;
  aiob_task *child;
  aiob_output out;
  int moved; /* out was left empty (checked on the test thread) */
};

static aiob_poll fwd_parent_poll(aiob_task *t, void *p) {
  struct fwd_parent *s = p;
  if (!s->child && aiob_spawn(aiob_task_runtime(t), &fwd_child_vt,
                              &s->child_state, &s->child) < 0) {
    aiob_task_fail(t, AIOB_ENOMEM);
    return AIOB_READY;
  }
  if (aiob_task_join(t, s->child, NULL) == AIOB_PENDING)
    return AIOB_PENDING;
  aiob_task_take_output(s->child, &s->out);
  aiob_task_release(s->child);
  aiob_poll r = aiob_task_forward(t, &s->out);
  s->moved = !s->out.value && !s->out.free_value && s->out.status == 0;
  return r;
}

static const aiob_task_vtable fwd_parent_vt = {.poll = fwd_parent_poll};

static void forward_moves_result_and_error(void **unused) {
  (void)unused;
  aiob_runtime *rt;
  assert_int_equal(aiob_runtime_new(&rt, NULL), 0);
  for (int failing = 0; failing < 2; failing++) {
    struct fwd_parent s = {0};
    s.child_state.status = failing ? AIOB_ENOENT : 0;
    s.child_state.value = strdup(failing ? "why" : "result");
    aiob_task *t;
    assert_int_equal(aiob_spawn(rt, &fwd_parent_vt, &s, &t), 0);
    assert_int_equal(aiob_task_wait(t, 10 * AIOB_SEC), 0);
    aiob_output out;
    assert_int_equal(aiob_task_take_output(t, &out), 0);
    assert_int_equal(out.status, failing ? AIOB_ENOENT : 0);
    assert_string_equal(out.value, failing ? "why" : "result");
    assert_ptr_equal(out.free_value, free);
    assert_true(s.moved);
    aiob_output_clear(&out);
    aiob_task_release(t);
  }
  aiob_runtime_free(rt);
}

/* ---- Spin gate --------------------------------------------------------- */

#define MS AIOB_MSEC

/* Drives a gate through one trial from time *t: the thread waits for a
 * CPU throughout, and a millisecond without the spin does off_ops
 * operations, one with it on_ops. Asks every millisecond. Returns the held
 * answer. */
static bool gate_trial(aiob__spin_gate *g, uint64_t *t, uint64_t *ops,
                       uint64_t off_ops, uint64_t on_ops) {
  /* Open: the wait starts a trial, whose first window goes without. */
  assert_false(aiob__spin_gate_decide(g, *t, *ops, true));
  unsigned changes = 0;
  bool last = false;
  for (int i = 0; i < 120; i++) {
    *t += MS;
    *ops += last ? on_ops : off_ops;
    bool s = aiob__spin_gate_decide(g, *t, *ops, true);
    changes += s != last;
    last = s;
  }
  /* Six windows of 20 ms, alternating, then the verdict. */
  assert_int_equal(changes, last ? 5 : 6);
  return last;
}

static void spin_gate_spins_while_the_thread_has_a_cpu(void **unused) {
  (void)unused;
  aiob__spin_gate g = AIOB__SPIN_GATE_INIT;
  for (uint64_t t = 1, ops = 0; t < 10000 * MS; t += MS, ops += 100)
    assert_true(aiob__spin_gate_decide(&g, t, ops, false));
}

static void spin_gate_keeps_the_faster_way_and_tries_again(void **unused) {
  (void)unused;
  aiob__spin_gate g = AIOB__SPIN_GATE_INIT;
  uint64_t t = 1, ops = 0;
  /* Not spinning did more: held off for 250 ms, whatever the sign says. */
  assert_false(gate_trial(&g, &t, &ops, 50, 20));
  for (uint64_t end = t + 249 * MS; t < end; t += MS)
    assert_false(aiob__spin_gate_decide(&g, t, ops, false));
  /* After the hold, a thread that no longer waits spins at once. */
  t += 2 * MS;
  assert_true(aiob__spin_gate_decide(&g, t, ops, false));
  /* It waits again; now the spin does more: held on. */
  assert_true(gate_trial(&g, &t, &ops, 20, 50));
  for (uint64_t end = t + 249 * MS; t < end; t += MS)
    assert_true(aiob__spin_gate_decide(&g, t, ops, true));
  /* The same verdict again doubles the hold: still held 400 ms later. */
  t += 2 * MS;
  assert_true(gate_trial(&g, &t, &ops, 20, 50));
  t += 400 * MS;
  assert_true(aiob__spin_gate_decide(&g, t, ops, true));
  /* A spin that does only somewhat more (40%) is not worth it there. */
  t += 200 * MS;
  assert_false(gate_trial(&g, &t, &ops, 20, 28));
  /* Too few operations to tell: the spin stays. */
  t += 300 * MS;
  assert_true(gate_trial(&g, &t, &ops, 0, 0));
}

static void spin_gate_without_proc_stays_open(void **unused) {
  (void)unused;
  /* A gate that cannot read schedstat never sees a wait. */
  aiob__spin_gate g = AIOB__SPIN_GATE_INIT;
  g.no_proc = true;
  for (uint64_t t = 1, ops = 0; t < 1000 * MS; t += MS, ops++)
    assert_true(aiob__spin_gate_ask(&g, t, ops));
}

/* How many of this process's descriptors are a schedstat file. */
static int schedstat_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  assert_non_null(d);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    char path[300], target[256];
    snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    ssize_t k = readlink(path, target, sizeof target - 1);
    if (k > 0) {
      target[k] = '\0';
      n += strstr(target, "schedstat") != NULL;
    }
  }
  closedir(d);
  return n;
}

static void spin_gate_holds_no_descriptor(void **unused) {
  (void)unused;
  /* Programs check their descriptors (tests that nothing leaked, fork and
   * exec hygiene): a sample opens the file and closes it at once. */
  aiob__spin_gate g = AIOB__SPIN_GATE_INIT;
  for (uint64_t t = 1; t < 500 * MS; t += 10 * MS)
    aiob__spin_gate_ask(&g, t, t);
  assert_true(g.delay_at > 0 && !g.no_proc); /* it did sample */
  assert_int_equal(schedstat_fds(), 0);
}

/* ---- A producer stalled half-way through a push ------------------------ */

static uint64_t process_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * AIOB_SEC + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
  struct timespec ts = {.tv_sec = (time_t)(ns / AIOB_SEC),
                        .tv_nsec = (long)(ns % AIOB_SEC)};
  while (nanosleep(&ts, &ts) != 0)
    ;
}

typedef struct nap {
  aiob_sleep s;
} nap;
static aiob_poll nap_poll(aiob_task *t, void *p) {
  int st;
  return aiob_sleep_poll(t, &((nap *)p)->s, &st);
}
static void nap_drop(void *p) { aiob_sleep_stop(&((nap *)p)->s); }
static const aiob_task_vtable nap_vt = {.poll = nap_poll, .drop = nap_drop};

/* A producer preempted between its two steps (the tail exchanged, the link
 * not yet stored) leaves the queue not empty with nothing to take. The
 * loop must neither poll it in a busy loop nor let it keep the loop from
 * its timers (with spin_us 0 and with the default). */
static void loop_beside_a_stalled_push(void **unused) {
  (void)unused;
  for (unsigned spin_us = 0; spin_us <= AIOB_SPIN_US_DEFAULT;
       spin_us += AIOB_SPIN_US_DEFAULT) {
    aiob_runtime_config cfg;
    aiob_runtime_config_init(&cfg);
    cfg.spin_us = spin_us;
    aiob_runtime *rt;
    assert_int_equal(aiob_runtime_new(&rt, &cfg), 0);
    aiob_loop *loop = &rt->loops[0];
    /* A 50 ms sleep, taken by the loop (its timer armed) before the stall:
     * the task has been polled once. */
    nap *n = calloc(1, sizeof *n);
    aiob_sleep_init(&n->s, 50 * AIOB_MSEC);
    aiob_task *h;
    assert_int_equal(aiob_spawn(rt, &nap_vt, n, &h), 0);
    uint64_t deadline = aiob_now_ns() + 10 * AIOB_SEC;
    aiob_runtime_stats st;
    do {
      sleep_ns(AIOB_MSEC);
      aiob_runtime_stats_get(rt, &st);
    } while (st.polls < 1 && aiob_now_ns() < deadline);
    assert_int_equal(st.polls, 1);
    /* Half a push, and a wake (as a stop-less wake would come). */
    aiob__mpsc_node half;
    atomic_store_explicit(&half.next, NULL, memory_order_relaxed);
    aiob__mpsc_node *prev = atomic_exchange(&loop->remote.queue.tail, &half);
    loop->backend->wake(loop->bl);
    uint64_t c0 = process_cpu_ns();
    sleep_ns(200 * AIOB_MSEC);
    uint64_t used = process_cpu_ns() - c0;
    /* The sleep ended meanwhile (a loop that took the stalled push for
     * work would have skipped its timers for the whole stall). */
    int done = aiob_task_wait(h, 10 * AIOB_SEC);
    /* Undo the half push (nobody else pushed). */
    assert_ptr_equal(atomic_load(&loop->remote.queue.tail), &half);
    atomic_store(&loop->remote.queue.tail, prev);
    print_message("spin_us %u: %.1f ms of CPU over 200 ms of stall\n", spin_us,
                  (double)used / 1e6);
    assert_int_equal(done, 0);
    /* Idle, the process uses a fraction of a millisecond; a loop polling
     * the stalled queue used it all (180-200 ms measured). */
    assert_true(used < 40 * AIOB_MSEC);
    aiob_task_release(h);
    aiob_runtime_free(rt);
    free(n);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(forward_moves_result_and_error),
      cmocka_unit_test(mpsc_fifo_single_thread),
      cmocka_unit_test(mpsc_many_producers_keep_per_producer_order),
      cmocka_unit_test(heap_pops_in_deadline_order_with_removals),
      cmocka_unit_test(error_table_round_trip),
      cmocka_unit_test(waker_references_keep_task_alive),
      cmocka_unit_test(spin_gate_spins_while_the_thread_has_a_cpu),
      cmocka_unit_test(spin_gate_keeps_the_faster_way_and_tries_again),
      cmocka_unit_test(spin_gate_without_proc_stays_open),
      cmocka_unit_test(spin_gate_holds_no_descriptor),
      cmocka_unit_test(loop_beside_a_stalled_push),
  };
  return cmocka_run_group_tests_name("unit_core", tests, NULL, NULL);
}
