/* Backend benchmark: every compiled backend, measured in the same run, each
 * figure the median over --runs runs, with its ratio to the first backend
 * (the build's default).
 *
 *   spawn       1M tasks that finish on first poll, spawned from one thread
 *   wake rtt    two tasks on two loop threads waking each other (p50/p99)
 *   sleep 1ms   overshoot of sequential 1 ms sleeps (p50/p99)
 *   10k sleep   10k concurrent 10 ms sleepers: time until all finished
 *   fd          ping-pong over a socketpair between two tasks on one loop
 */
#include "aiobridge.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int runs = 5;
static unsigned spawn_n = 1000000;
static unsigned rtt_n = 20000;
static unsigned sleep_n = 300;
static unsigned sleepers_n = 10000;
static unsigned fd_n = 100000;
static unsigned spin_us = AIOB_SPIN_US_DEFAULT;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double percentile(double *v, size_t n, double p) {
  qsort(v, n, sizeof *v, cmp_double);
  size_t i = (size_t)(p * (double)(n - 1) + 0.5);
  return v[i];
}

static double median(double *v, size_t n) { return percentile(v, n, 0.5); }

static void check(int rc, const char *what) {
  if (rc < 0) {
    fprintf(stderr, "bench: %s: %s\n", what, aiob_strerror(rc));
    exit(1);
  }
}

static aiob_runtime *runtime(const aiob_backend *b, unsigned threads) {
  aiob_runtime_config cfg;
  aiob_runtime_config_init(&cfg);
  cfg.backend_table = b;
  cfg.threads = threads;
  cfg.spin_us = spin_us;
  aiob_runtime *rt;
  check(aiob_runtime_new(&rt, &cfg), b->name);
  return rt;
}

/* ---- spawn throughput -------------------------------------------------- */

static aiob_poll ready_poll(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}
static const aiob_task_vtable ready_vt = {.poll = ready_poll};

static double bench_spawn(const aiob_backend *b) {
  aiob_runtime *rt = runtime(b, 1);
  uint64_t t0 = aiob_now_ns();
  for (unsigned i = 0; i + 1 < spawn_n; i++)
    check(aiob_spawn(rt, &ready_vt, NULL, NULL), "spawn");
  aiob_task *last;
  check(aiob_spawn(rt, &ready_vt, NULL, &last), "spawn");
  check(aiob_task_wait(last, 60 * AIOB_SEC), "wait"); /* FIFO: all done */
  double secs = (double)(aiob_now_ns() - t0) / 1e9;
  aiob_task_release(last);
  aiob_runtime_free(rt);
  return spawn_n / secs;
}

/* ---- cross-thread wake round trip -------------------------------------- */

struct pingpong {
  _Atomic int ready;
  aiob_waker *a, *b;
  uint64_t start;
  unsigned n;
  double *samples;
  _Atomic int stop;
};

static aiob_poll ping_poll(aiob_task *t, void *p) {
  (void)t;
  struct pingpong *pp = p;
  if (!atomic_load(&pp->ready))
    return AIOB_PENDING;
  if (pp->start)
    pp->samples[pp->n++] = (double)(aiob_now_ns() - pp->start);
  if (pp->n == rtt_n) {
    atomic_store(&pp->stop, 1);
    aiob_waker_wake(pp->b);
    return AIOB_READY;
  }
  pp->start = aiob_now_ns();
  aiob_waker_wake(pp->b);
  return AIOB_PENDING;
}

static aiob_poll pong_poll(aiob_task *t, void *p) {
  (void)t;
  struct pingpong *pp = p;
  if (!atomic_load(&pp->ready))
    return AIOB_PENDING;
  if (atomic_load(&pp->stop))
    return AIOB_READY;
  if (pp->start) /* woken by ping */
    aiob_waker_wake(pp->a);
  return AIOB_PENDING;
}

static const aiob_task_vtable ping_vt = {.poll = ping_poll};
static const aiob_task_vtable pong_vt = {.poll = pong_poll};

static void bench_rtt(const aiob_backend *b, double *p50, double *p99) {
  aiob_runtime *rt = runtime(b, 2);
  struct pingpong pp = {0};
  pp.samples = calloc(rtt_n, sizeof(double));
  aiob_spawn_opts o0, o1;
  aiob_spawn_opts_init(&o0);
  aiob_spawn_opts_init(&o1);
  o0.loop = 0;
  o1.loop = 1;
  aiob_task *ta, *tb;
  check(aiob_spawn_ex(rt, &o1, &pong_vt, &pp, &tb), "spawn");
  check(aiob_spawn_ex(rt, &o0, &ping_vt, &pp, &ta), "spawn");
  pp.a = aiob_task_waker(ta);
  pp.b = aiob_task_waker(tb);
  atomic_store(&pp.ready, 1);
  aiob_waker_wake(pp.a);
  check(aiob_task_wait(ta, 60 * AIOB_SEC), "wait");
  check(aiob_task_wait(tb, 60 * AIOB_SEC), "wait");
  *p50 = percentile(pp.samples, pp.n, 0.5) / 1e3;
  *p99 = percentile(pp.samples, pp.n, 0.99) / 1e3;
  aiob_waker_release(pp.a);
  aiob_waker_release(pp.b);
  aiob_task_release(ta);
  aiob_task_release(tb);
  free(pp.samples);
  aiob_runtime_free(rt);
}

/* ---- 1 ms sleep overshoot ---------------------------------------------- */

struct sleeploop {
  int co;
  unsigned i;
  uint64_t start;
  aiob_sleep s;
  double *samples;
};

static aiob_poll sleeploop_poll(aiob_task *t, void *p) {
  struct sleeploop *sl = p;
  AIOB_BEGIN(&sl->co);
  for (sl->i = 0; sl->i < sleep_n; sl->i++) {
    sl->start = aiob_now_ns();
    aiob_sleep_init(&sl->s, AIOB_MSEC);
    AIOB_AWAIT(&sl->co, aiob_sleep_poll(t, &sl->s, NULL));
    sl->samples[sl->i] = (double)(aiob_now_ns() - sl->start - AIOB_MSEC);
  }
  AIOB_END(&sl->co);
}
static const aiob_task_vtable sleeploop_vt = {.poll = sleeploop_poll};

static void bench_sleep(const aiob_backend *b, double *p50, double *p99) {
  aiob_runtime *rt = runtime(b, 1);
  struct sleeploop sl = {0};
  sl.samples = calloc(sleep_n, sizeof(double));
  aiob_task *t;
  check(aiob_spawn(rt, &sleeploop_vt, &sl, &t), "spawn");
  check(aiob_task_wait(t, 60 * AIOB_SEC), "wait");
  *p50 = percentile(sl.samples, sleep_n, 0.5) / 1e3;
  *p99 = percentile(sl.samples, sleep_n, 0.99) / 1e3;
  aiob_task_release(t);
  free(sl.samples);
  aiob_runtime_free(rt);
}

/* ---- 10k concurrent sleepers ------------------------------------------- */

struct sleeper {
  aiob_sleep s;
  int armed;
};

static aiob_poll sleeper_poll(aiob_task *t, void *p) {
  struct sleeper *sl = p;
  if (!sl->armed) {
    aiob_sleep_init(&sl->s, 10 * AIOB_MSEC);
    sl->armed = 1;
  }
  return aiob_sleep_poll(t, &sl->s, NULL);
}
static const aiob_task_vtable sleeper_vt = {.poll = sleeper_poll};

static double bench_sleepers(const aiob_backend *b) {
  aiob_runtime *rt = runtime(b, 1);
  struct sleeper *s = calloc(sleepers_n, sizeof *s);
  aiob_task **h = calloc(sleepers_n, sizeof *h);
  uint64_t t0 = aiob_now_ns();
  for (unsigned i = 0; i < sleepers_n; i++)
    check(aiob_spawn(rt, &sleeper_vt, &s[i], &h[i]), "spawn");
  for (unsigned i = 0; i < sleepers_n; i++) {
    check(aiob_task_wait(h[i], 60 * AIOB_SEC), "wait");
    aiob_task_release(h[i]);
  }
  double ms = (double)(aiob_now_ns() - t0) / 1e6;
  free(h);
  free(s);
  aiob_runtime_free(rt);
  return ms;
}

/* ---- fd ping-pong over a socketpair ------------------------------------ */

struct pinger {
  int co;
  int fd;
  int serve; /* 1: echo what arrives; 0: send first, count round trips */
  unsigned n;
  aiob_io_wait w;
  char byte;
};

static aiob_poll pinger_poll(aiob_task *t, void *p) {
  struct pinger *pg = p;
  int r;
  AIOB_BEGIN(&pg->co);
  if (!pg->serve && write(pg->fd, "x", 1) != 1)
    return AIOB_READY;
  for (pg->n = 0; pg->n < fd_n; pg->n++) {
    aiob_io_wait_init(&pg->w, pg->fd, AIOB_READABLE);
    AIOB_AWAIT(&pg->co, aiob_io_wait_poll(t, &pg->w, &r));
    if (r < 0 || read(pg->fd, &pg->byte, 1) != 1)
      return AIOB_READY;
    if ((pg->serve || pg->n + 1 < fd_n) && write(pg->fd, "x", 1) != 1)
      return AIOB_READY;
  }
  AIOB_END(&pg->co);
}
static const aiob_task_vtable pinger_vt = {.poll = pinger_poll};

/* Messages (one-byte writes delivered) per second between two tasks on one
 * loop thread: every hop is a readiness wait through the backend. */
static double bench_fd(const aiob_backend *b) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0) {
    perror("socketpair");
    exit(1);
  }
  aiob_runtime *rt = runtime(b, 1);
  struct pinger a = {.fd = sv[0], .serve = 0};
  struct pinger e = {.fd = sv[1], .serve = 1};
  aiob_task *ta, *te;
  uint64_t t0 = aiob_now_ns();
  check(aiob_spawn(rt, &pinger_vt, &e, &te), "spawn");
  check(aiob_spawn(rt, &pinger_vt, &a, &ta), "spawn");
  check(aiob_task_wait(ta, 60 * AIOB_SEC), "wait");
  double secs = (double)(aiob_now_ns() - t0) / 1e9;
  if (a.n != fd_n) {
    fprintf(stderr, "bench: fd ping-pong stopped after %u\n", a.n);
    exit(1);
  }
  aiob_task_cancel(te);
  check(aiob_task_wait(te, 60 * AIOB_SEC), "wait");
  aiob_task_release(ta);
  aiob_task_release(te);
  aiob_runtime_free(rt);
  close(sv[0]);
  close(sv[1]);
  return 2.0 * fd_n / secs;
}

/* ---- Table ------------------------------------------------------------- */

enum { M_SPAWN, M_RTT50, M_RTT99, M_SLEEP50, M_SLEEP99, M_SLEEPERS, M_FD, NM };

static const struct {
  const char *label, *unit;
  int higher_is_better;
} metrics[NM] = {
    {"spawn throughput", "tasks/s", 1},
    {"wake round trip p50", "us", 0},
    {"wake round trip p99", "us", 0},
    {"1 ms sleep overshoot p50", "us", 0},
    {"1 ms sleep overshoot p99", "us", 0},
    {"10k sleepers of 10 ms", "ms", 0},
    {"fd ping-pong", "msg/s", 1},
};

#define MAX_BACKENDS 8

int main(int argc, char **argv) {
  const char *only = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--runs") && i + 1 < argc)
      runs = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--quick")) {
      runs = 1;
      spawn_n = 100000;
      rtt_n = 2000;
      sleep_n = 50;
      fd_n = 10000;
    } else if (!strcmp(argv[i], "--backend") && i + 1 < argc)
      only = argv[++i];
    else if (!strcmp(argv[i], "--spin-us") && i + 1 < argc)
      spin_us = (unsigned)atoi(argv[++i]);
    else {
      printf("usage: %s [--runs N] [--quick] [--backend NAME] [--spin-us N]\n",
             argv[0]);
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  if (runs < 1)
    runs = 1;

  const aiob_backend *bk[MAX_BACKENDS];
  int nb = 0;
  for (unsigned i = 0; nb < MAX_BACKENDS && aiob_backend_at(i); i++)
    if (!only || !strcmp(only, aiob_backend_at(i)->name))
      bk[nb++] = aiob_backend_at(i);
  if (nb == 0) {
    fprintf(stderr, "no such backend compiled in: %s\n", only);
    return 2;
  }

  double result[MAX_BACKENDS][NM];
  double *samples[NM];
  for (int m = 0; m < NM; m++)
    samples[m] = calloc((size_t)runs, sizeof(double));
  for (int k = 0; k < nb; k++) {
    fprintf(stderr, "bench: %s (%d runs)\n", bk[k]->name, runs);
    for (int r = 0; r < runs; r++) {
      samples[M_SPAWN][r] = bench_spawn(bk[k]);
      bench_rtt(bk[k], &samples[M_RTT50][r], &samples[M_RTT99][r]);
      bench_sleep(bk[k], &samples[M_SLEEP50][r], &samples[M_SLEEP99][r]);
      samples[M_SLEEPERS][r] = bench_sleepers(bk[k]);
      samples[M_FD][r] = bench_fd(bk[k]);
    }
    for (int m = 0; m < NM; m++)
      result[k][m] = median(samples[m], (size_t)runs);
  }

  printf("aiobridge backend benchmark: median of %d run(s), spin_us %u; "
         "ratio = this backend / %s\n\n",
         runs, spin_us, bk[0]->name);
  printf("%-26s %-8s", "metric", "unit");
  for (int k = 0; k < nb; k++)
    printf(" %14s", bk[k]->name);
  for (int k = 1; k < nb; k++)
    printf(" %9s/%-4s", bk[k]->name, bk[0]->name);
  printf("\n");
  for (int m = 0; m < NM; m++) {
    printf("%-26s %-8s", metrics[m].label, metrics[m].unit);
    for (int k = 0; k < nb; k++)
      printf(" %14.1f", result[k][m]);
    for (int k = 1; k < nb; k++)
      printf(" %14.2f", result[0][m] ? result[k][m] / result[0][m] : 0.0);
    printf("\n");
  }
  for (int m = 0; m < NM; m++)
    free(samples[m]);
  return 0;
}
