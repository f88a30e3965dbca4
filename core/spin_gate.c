/* Should a thread spin for a push before it blocks?
 *
 * A spin saves a wake-up (tens of microseconds on a VM) while the spinning
 * thread and the thread that will push each have a CPU. With more runnable
 * threads than CPUs that may no longer hold: the scheduler prefers threads
 * that wake from a sleep over those that kept running, so a spinning
 * thread, and the other end of its round trips, can wait behind busy ones.
 * Whether the spin still pays then depends on the work (measured: a C
 * task's round trips still ran up to 9x faster with it, C awaits of Python
 * at half the rate). So the gate measures instead of guessing:
 *
 *   - open: spin, and look every SAMPLE_NS whether the thread waits for a
 *     CPU (its run delay, the time it spent runnable but not running, from
 *     /proc/thread-self/schedstat, over more than a fifth of the time);
 *   - trial, when it does: TRIAL_WINDOWS windows alternately without and
 *     with the spin, counting the caller's operations in each;
 *   - held: the spin if it did half as much again per second, else no
 *     spin, for HOLD_MIN_NS, doubled up to HOLD_MAX_NS while trials keep
 *     giving the same verdict; then open again.
 *
 * A quiet machine never leaves the open phase. Without /proc the gate
 * stays open. One per spinning thread, used by it only. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A trial: windows long enough to span several scheduler time slices. */
#define WINDOW_NS (20 * AIOB_MSEC)
#define TRIAL_WINDOWS 6 /* without, with, without, with... */
/* The spin wins a trial only by doing half as much again: under
 * contention 20 ms windows swing widely (measured: one setting ran 7k to
 * 60k C awaits of Python per second from one process to the next), and a
 * thread that waits for a CPU does no worse than without the spin when in
 * doubt. Where the spin pays there, it pays by far more (2-15x for round
 * trips measured beside busy processes). */
#define SPIN_EDGE_NUM 3
#define SPIN_EDGE_DEN 2
/* The thread waits for a CPU: over a sample of at least SAMPLE_NS, its run
 * delay exceeded a WAIT_SHARE_DIV-th of the time. (A thread that runs all
 * the time on a machine with nothing else to do still waits now and then
 * for a kernel thread: a millisecond in 10 is not rare.) */
#define SAMPLE_NS (50 * AIOB_MSEC)
#define WAIT_SHARE_DIV 5
#define HOLD_MIN_NS (250 * AIOB_MSEC)
#define HOLD_MAX_NS (2000 * AIOB_MSEC)
/* Fewer operations than this in a trial: too few to tell, keep spinning. */
#define TRIAL_MIN_OPS 16

enum { OPEN, TRIAL, HELD };

/* The calling thread's run delay in ns, or false if it cannot be read.
 * The file is opened for each sample (at most one per SAMPLE_NS) and
 * closed at once: the gate holds no descriptor a program could see as its
 * own or a fork could copy. */
static bool run_delay(aiob__spin_gate *g, uint64_t *delay) {
  if (g->no_proc)
    return false;
  int tid = (int)syscall(SYS_gettid);
  if (g->tid != tid) { /* the last sample was another thread's */
    g->tid = tid;
    g->delay_ok = false;
  }
  int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    g->no_proc = errno == ENOENT || errno == EACCES || errno == ENOTDIR;
    return false;
  }
  char buf[96];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return false;
  buf[n] = '\0';
  unsigned long long ran, waited;
  if (sscanf(buf, "%llu %llu", &ran, &waited) != 2)
    return false;
  *delay = waited;
  return true;
}

/* Did the thread wait for a CPU (see SAMPLE_NS)? Samples at most once per
 * SAMPLE_NS, a failed read too; the answer in between is the last. */
static bool cpu_waits(aiob__spin_gate *g, uint64_t now) {
  if (g->no_proc || (g->delay_at && now - g->delay_at < SAMPLE_NS))
    return g->waits;
  uint64_t delay, since = now - g->delay_at;
  bool ok = run_delay(g, &delay); /* (a new thread clears delay_ok) */
  g->waits = ok && g->delay_ok && delay >= g->delay &&
             (delay - g->delay) * WAIT_SHARE_DIV > since;
  g->delay_ok = ok;
  if (ok)
    g->delay = delay;
  g->delay_at = now;
  return g->waits;
}

bool aiob__spin_gate_decide(aiob__spin_gate *g, uint64_t now, uint64_t ops,
                            bool waits) {
  if (g->phase == HELD && now - g->at >= g->hold)
    g->phase = OPEN;
  if (g->phase == HELD)
    return g->spin;
  if (g->phase == OPEN) {
    if (!waits)
      return true;
    g->phase = TRIAL;
    g->windows = 0;
    memset(g->sum, 0, sizeof g->sum);
    g->spin = false;
    g->at = now;
    g->ops_at = ops;
    return false;
  }
  if (now - g->at < WINDOW_NS)
    return g->spin;
  g->sum[g->spin][0] += ops - g->ops_at;
  g->sum[g->spin][1] += now - g->at;
  g->at = now;
  g->ops_at = ops;
  if (++g->windows < TRIAL_WINDOWS) {
    g->spin = !g->spin;
    return g->spin;
  }
  /* on_ops / on_ns > NUM / DEN * off_ops / off_ns (in double: a window
   * that lasted hours must not overflow) */
  double on = (double)g->sum[1][0] * (double)g->sum[0][1] * SPIN_EDGE_DEN,
         off = (double)g->sum[0][0] * (double)g->sum[1][1] * SPIN_EDGE_NUM;
  bool spin = g->sum[0][0] + g->sum[1][0] < TRIAL_MIN_OPS || on > off;
  bool same = g->hold && g->verdict == spin; /* (hold: a verdict before) */
  g->hold = same ? (g->hold * 2 > HOLD_MAX_NS ? HOLD_MAX_NS : g->hold * 2)
                 : HOLD_MIN_NS;
  g->verdict = g->spin = spin;
  g->phase = HELD;
  return g->spin;
}

bool aiob__spin_gate_ask(aiob__spin_gate *g, uint64_t now, uint64_t ops) {
  return aiob__spin_gate_decide(g, now, ops, cpu_waits(g, now));
}
