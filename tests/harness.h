/* Test harness shared by the C test programs (one include per program).
 *
 * Loop threads and helper threads never call cmocka asserts (they longjmp):
 * they record failures with CHECK / CHECK_INT, and the test thread reports
 * them with assert_clean(). Every wait is bounded by WAIT_TIMEOUT. */
#ifndef AIOBRIDGE_TESTS_HARNESS_H
#define AIOBRIDGE_TESTS_HARNESS_H

#include "aiobridge.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cmocka.h>

#define WAIT_TIMEOUT (10 * AIOB_SEC)

#if defined(__SANITIZE_THREAD__)
/* libuv is not instrumented and closes its fds with a raw close syscall,
 * which ThreadSanitizer cannot see: when another thread later gets the same
 * fd number (an eventfd, a socket), TSan takes it for a race with libuv's
 * creation of that fd. Ignore what libuv's calls do through TSan's
 * interceptors (only those: our code stays checked). */
const char *__tsan_default_suppressions(void);
const char *__tsan_default_suppressions(void) {
  return "called_from_lib:libuv.so.1\n";
}
#endif

/* Sleeps the calling (non-loop) thread. */
static inline void sleep_thread_ns(uint64_t ns) {
  struct timespec ts = {(time_t)(ns / AIOB_SEC), (long)(ns % AIOB_SEC)};
  while (nanosleep(&ts, &ts) != 0)
    ;
}

/* ---- Failures recorded off the test thread ----------------------------- */

static atomic_int g_bad;
static atomic_int g_bad_msg_ready;
static char g_bad_msg[512];

static inline void check_failed(const char *file, int line, const char *fmt,
                                ...) __attribute__((format(printf, 3, 4)));

static inline void check_failed(const char *file, int line, const char *fmt,
                                ...) {
  char buf[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "%s:%d: check failed: %s\n", file, line, buf);
  if (atomic_fetch_add(&g_bad, 1) == 0) {
    snprintf(g_bad_msg, sizeof g_bad_msg, "%s:%d: %s", file, line, buf);
    atomic_store(&g_bad_msg_ready, 1);
  }
}

/* For loop threads and helper threads. */
#define CHECK(c)                                                               \
  do {                                                                         \
    if (!(c))                                                                  \
      check_failed(__FILE__, __LINE__, "%s", #c);                              \
  } while (0)

#define CHECK_INT(a, op, b)                                                    \
  do {                                                                         \
    long long a_ = (long long)(a), b_ = (long long)(b);                        \
    if (!(a_ op b_))                                                           \
      check_failed(__FILE__, __LINE__, "%s %s %s (%lld vs %lld)", #a, #op, #b, \
                   a_, b_);                                                    \
  } while (0)

static inline void reset_checks(void) {
  atomic_store(&g_bad_msg_ready, 0);
  atomic_store(&g_bad, 0);
}

/* Test thread: fail if a CHECK failed anywhere. */
#define assert_clean()                                                         \
  do {                                                                         \
    int n_ = atomic_load(&g_bad);                                              \
    if (n_)                                                                    \
      fail_msg("%d check(s) failed off the test thread; first: %s", n_,        \
               atomic_load(&g_bad_msg_ready) ? g_bad_msg : "?");               \
  } while (0)

static inline const char *errname(int rc) {
  return rc == 0 ? "0" : aiob_err_name(rc);
}

/* main(): the outcome `rc` of creating a probe runtime on `backend`. 0 if
 * it was made; 77 (skipped, reason printed) if the kernel or the build
 * refuses the backend; 1 (error printed) otherwise. */
static inline int backend_probe_status(const char *prog, const char *backend,
                                       int rc) {
  if (rc == AIOB_ENOSYS || rc == AIOB_EPERM || rc == AIOB_ENOTSUP) {
    printf("SKIP: %s: %s\n", backend, aiob_strerror(rc));
    return 77;
  }
  if (rc != 0) {
    fprintf(stderr, "%s: backend %s: %s (%s)\n", prog, backend,
            aiob_strerror(rc), errname(rc));
    return 1;
  }
  return 0;
}

/* Test thread: an aiobridge return code equals `want`. */
#define assert_rc(expr, want)                                                  \
  do {                                                                         \
    int rc_ = (expr), want_ = (want);                                          \
    if (rc_ != want_)                                                          \
      fail_msg("%s = %d (%s), want %d (%s)", #expr, rc_, errname(rc_), want_,  \
               errname(want_));                                                \
  } while (0)

/* Test thread: the task finished within WAIT_TIMEOUT. */
#define wait_ok(t)                                                             \
  do {                                                                         \
    aiob_task *wt_ = (t);                                                      \
    assert_non_null(wt_);                                                      \
    int wr_ = aiob_task_wait(wt_, WAIT_TIMEOUT);                               \
    if (wr_ != 0)                                                              \
      fail_msg("aiob_task_wait(%s) = %s", #t, errname(wr_));                   \
  } while (0)

/* Test thread: the finished task's output status equals `want`. */
#define assert_status(t, want)                                                 \
  do {                                                                         \
    aiob_output o_ = {0};                                                      \
    int tr_ = aiob_task_take_output((t), &o_);                                 \
    if (tr_ != 0 && tr_ != AIOB_EALREADY)                                      \
      fail_msg("aiob_task_take_output(%s) = %s", #t, errname(tr_));            \
    if (o_.status != (want))                                                   \
      fail_msg("status of %s = %s, want %s", #t, errname(o_.status),           \
               errname(want));                                                 \
    aiob_output_clear(&o_);                                                    \
  } while (0)

static inline void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n, size);
  assert_non_null(p);
  return p;
}

static inline pthread_t start_thread(void *(*fn)(void *), void *arg) {
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, fn, arg), 0);
  return th;
}

/* ---- Latch: a counter one can wait on with a timeout ------------------- */

typedef struct latch {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  long n;
} latch;

static inline void latch_init(latch *l) {
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->cv, &a);
  pthread_condattr_destroy(&a);
  l->n = 0;
}

static inline void latch_destroy(latch *l) {
  pthread_cond_destroy(&l->cv);
  pthread_mutex_destroy(&l->mu);
}

static inline void latch_add(latch *l, long k) {
  pthread_mutex_lock(&l->mu);
  l->n += k;
  pthread_cond_broadcast(&l->cv); /* under the lock: waiter may free l */
  pthread_mutex_unlock(&l->mu);
}

static inline long latch_get(latch *l) {
  pthread_mutex_lock(&l->mu);
  long n = l->n;
  pthread_mutex_unlock(&l->mu);
  return n;
}

/* 0 once the count reached target, AIOB_ETIMEDOUT after timeout_ns. */
static inline int latch_wait(latch *l, long target, uint64_t timeout_ns) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  uint64_t ns = (uint64_t)ts.tv_nsec + timeout_ns % AIOB_SEC;
  ts.tv_sec += (time_t)(timeout_ns / AIOB_SEC + ns / AIOB_SEC);
  ts.tv_nsec = (long)(ns % AIOB_SEC);
  int rc = 0;
  pthread_mutex_lock(&l->mu);
  while (l->n < target) {
    if (pthread_cond_timedwait(&l->cv, &l->mu, &ts) == ETIMEDOUT) {
      rc = l->n >= target ? 0 : AIOB_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

#define latch_ok(l, target)                                                    \
  do {                                                                         \
    if (latch_wait((l), (target), WAIT_TIMEOUT) != 0)                          \
      fail_msg("timed out waiting for %s to reach %ld (at %ld)", #l,           \
               (long)(target), latch_get(l));                                  \
  } while (0)

#endif /* AIOBRIDGE_TESTS_HARNESS_H */
