#!/usr/bin/env python3
"""Benchmark of the aiobridge asyncio bridge (the aiobridge_demo extension)
against pure-asyncio baselines, all measured in one run so that the ratios
mean something.

For each event loop kind (stock asyncio = the default selector loop, and
uvloop when it can be imported):

Baselines, pure asyncio
  sleep(0)            sequential `await asyncio.sleep(0)`, ops/s
  in-loop future      `fut = loop.create_future(); loop.call_soon(
                      fut.set_result, None); await fut`, ops/s
  threadsafe          a helper Python thread (started once, fed through a
                      queue.SimpleQueue) completes each future with
                      loop.call_soon_threadsafe(fut.set_result, None):
                      sequential ops/s and round-trip latency p50/p99
  executor            `await loop.run_in_executor(None, f)`, f trivial, ops/s
  gathers             N futures completed by the helper thread, and N
                      in-loop futures completed by call_soon, gathered

Bridge (aiobridge_demo)
  ready()             sequential `await demo.ready()`: ops/s, and the round
                      trip p50/p99 (time.perf_counter_ns around each await)
  gather              `await asyncio.gather(*[demo.ready() for _ in
                      range(N)])`, N = 10k and 100k, ops/s
  await_py_n          `await demo.await_py_n(lambda: asyncio.sleep(0), n)`,
                      awaits/s
  sleep               wall time of `await demo.sleep_ms(1)` against
                      `await asyncio.sleep(0.001)`, p50 of each, sampled in
                      alternating blocks to reduce drift
  GIL                 K C timers sleep_stamp_ms(i), i = 1..K ms, started
                      from the loop thread, which then busy-spins in pure
                      Python (holding the GIL) for longer than the last
                      timer; each timer's lateness (the runtime-thread
                      time it fired minus its due time) is compared with
                      the same test on an idle loop. During the busy spin
                      the runtime threads' wait channels are sampled: the
                      share of samples blocked on a futex (how a GIL wait
                      looks) times the busy time is the time blocked.

Every throughput row is followed by its CPU per op: the process CPU time
(user + system of every thread: the Python thread, the runtime's loop
threads, helper threads) of the timed repetitions over their operations.
The bridge section also reports the CPU the process uses while idle after
its work, and loop-local C tasks (local_ready(), local_await_py_n(),
local_sleep_ms(); n/a with the reason when the demo module lacks them).

Contention (--sections contention): sequential ready(), await_py_n, a
gather and local_ready() with CPU per op, beside no load, 1 and 2 busy
processes and one process with 2x CPUs busy threads, each with the spin on
(library default) and off (AIOBRIDGE_SPIN_US=0), measured alternately
beside the same load, in --contention-rounds fresh processes per setting.
A row is WORSE with the spin when its median is more than SPIN_NOISE below
spin-off's and a one-sided Mann-Whitney test over the rounds gives
p < SPIN_P. Busy processes are killed at the end of their row and exit by
themselves after HOG_LIMIT_S or once the benchmark is gone.

Ops/s figures are medians over several repetitions (each repetition is sized
to take a fixed time, after a warm-up); latencies are percentiles over all
samples.

Peak RSS growth per awaitable: each gather (ready(), threadsafe futures,
in-loop futures; N = 10k and 100k) is also run once in a fresh child
process, which reads VmHWM from /proc/self/status after a small warm-up and
again after the gather: bytes/awaitable = (after - before) / N. A fresh
process per size keeps earlier runs out of the high-water mark.

Every section runs in a child process (same interpreter, same environment),
so options that vary the bridge's environment (--backends sets
AIOBRIDGE_BACKEND, --spin-us sets AIOBRIDGE_SPIN_US) only need to re-run the
bridge sections; the baselines are measured once per loop kind.

A figure that cannot be measured is printed as n/a with the reason; nothing
is estimated in its place.

Usage: PYTHONPATH=<dir with aiobridge_demo> python3 bench/bench_bridge.py
       [--quick] [--loops asyncio,uvloop] [--backends uv,event,uring]
       [--spin-us 0,50] [--sections main,contention]
       [--contention-loops asyncio] [--contention-loads none,1proc,2proc,over]
       [--contention-rounds 5]
       [--json PATH]
"""

import argparse
import asyncio
import atexit
import datetime
import gc
import itertools
import json
import math
import os
import platform
import queue
import subprocess
import sys
import threading
import time

# ---------------------------------------------------------------------------
# Parameters

FULL = {
    "reps": 5,            # repetitions of each throughput figure (median)
    "rep_s": 0.25,        # seconds per repetition of a sequential figure
    "lat_samples": 5000,  # samples of a round-trip latency
    "gather_ns": [10000, 100000],
    "gather_reps": [5, 3],
    "sleep_samples": 300,  # samples of each 1 ms sleep
    "sleep_block": 25,
    "gil_k": 100,          # timers of 1..K ms
    "gil_busy_ms": 150,    # busy spin, longer than the last timer
    "gil_rounds": 5,       # idle and busy rounds, alternated
    "idle_s": 0.5,         # idle window after the work (CPU while idle)
    # Contention rows (one worker per load, spin setting and round):
    "c_reps": 3,           # repetitions of each figure (median)
    "c_rep_s": 0.15,       # seconds per repetition
    "c_gather_n": 10000,   # awaitables in the gather row
    "c_rounds": 5,         # spin on/off pairs per load, order alternated
    "c_idle_s": 0.3,
}

QUICK = {
    "reps": 2,
    "rep_s": 0.05,
    "lat_samples": 500,
    "gather_ns": [2000, 20000],
    "gather_reps": [2, 1],
    "sleep_samples": 60,
    "sleep_block": 10,
    "gil_k": 100,
    "gil_busy_ms": 150,
    "gil_rounds": 1,
    "idle_s": 0.2,
    "c_reps": 1,
    "c_rep_s": 0.05,
    "c_gather_n": 2000,
    "c_rounds": 1,
    "c_idle_s": 0.2,
}

# Timers later than the idle control's worst case by more than this count as
# delayed: the resolution of the C timers (libuv and libevent timers are
# millisecond timers), i.e. what an unblocked runtime thread shows as jitter.
GIL_NOISE_NS = 1000000

WORKER_TIMEOUT_S = 600
RESULT_TAG = "BENCH_BRIDGE_RESULT "


def na(reason):
    """A figure that could not be measured, with the reason."""
    return {"na": str(reason)}


def is_na(v):
    return isinstance(v, dict) and "na" in v


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("no samples")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2.0


def mann_whitney_below(xs, ys):
    """One-sided p-value that the xs tend to be below the ys (Mann-Whitney
    U, ties counted half): the share of all ways to split the pooled values
    into groups of len(xs) and len(ys) whose U is at most the observed one.
    Exact by enumeration up to 200k splits, else the normal approximation.
    1.0 when a group is empty."""
    n, m = len(xs), len(ys)
    if not n or not m:
        return 1.0

    def u_of(a, b):
        return sum((x > y) + 0.5 * (x == y) for x in a for y in b)

    observed = u_of(xs, ys)
    pooled = list(xs) + list(ys)
    if math.comb(n + m, n) <= 200000:
        hits = total = 0
        for pick in itertools.combinations(range(n + m), n):
            chosen = set(pick)
            a = [pooled[i] for i in pick]
            b = [pooled[i] for i in range(n + m) if i not in chosen]
            total += 1
            hits += u_of(a, b) <= observed + 1e-9
        return hits / total
    mu = n * m / 2.0
    sigma = math.sqrt(n * m * (n + m + 1) / 12.0)
    z = (observed + 0.5 - mu) / sigma
    return 0.5 * math.erfc(-z / math.sqrt(2))


def percentile(xs, p):
    """Nearest-rank percentile, p in 0..100."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    k = max(0, min(len(s) - 1, int(math.ceil(p / 100.0 * len(s))) - 1))
    return s[k]


def vm_hwm_bytes():
    """Peak resident set size of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


# ---------------------------------------------------------------------------
# Measurement helpers (run inside a worker, on the loop thread)

def cpu_ns():
    """CPU time of this whole process (user + system, every thread: the
    Python thread, the runtime's loop threads, helper threads), in ns."""
    return time.process_time_ns()


async def throughput(run_n, reps, rep_s):
    """Ops/s of `await run_n(n)` over reps repetitions: (median, slowest,
    fastest, CPU us per op). n is sized so that one call takes about rep_s
    seconds (found by a warm-up that quadruples n until a call takes 20
    ms). CPU per op is the process CPU time of the timed repetitions
    divided by their operations."""
    n = 64
    while True:
        t0 = time.perf_counter_ns()
        await run_n(n)
        dt = time.perf_counter_ns() - t0
        if dt >= 20e6 or n >= 1 << 24:
            break
        n *= 4
    n = max(1, int(n * rep_s * 1e9 / max(dt, 1)))
    rates = []
    cpu = 0
    for _ in range(reps):
        c0 = cpu_ns()
        t0 = time.perf_counter_ns()
        await run_n(n)
        dt = time.perf_counter_ns() - t0
        cpu += cpu_ns() - c0
        rates.append(n * 1e9 / dt)
    return median(rates), min(rates), max(rates), cpu / 1e3 / (n * reps)


async def latency_us(op, samples):
    """p50 and p99 (microseconds) of `await op()`, timed one by one."""
    for _ in range(min(200, samples)):
        await op()
    ts = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        await op()
        ts.append(time.perf_counter_ns() - t0)
    return percentile(ts, 50) / 1e3, percentile(ts, 99) / 1e3


class ThreadsafeHelper:
    """A Python thread that completes futures sent to it with
    loop.call_soon_threadsafe(fut.set_result, None)."""

    def __init__(self):
        self.q = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="threadsafe-helper")
        self.thread.start()

    def _run(self):
        get = self.q.get
        while True:
            fut = get()
            if fut is None:
                return
            fut.get_loop().call_soon_threadsafe(fut.set_result, None)

    def stop(self):
        self.q.put(None)
        self.thread.join()


# Gathers: one function per kind, shared by the in-process throughput runs
# and the fresh-process RSS runs. Each includes creating the awaitables.

async def gather_threadsafe(helper, n):
    loop = asyncio.get_running_loop()
    put = helper.q.put
    futs = []
    for _ in range(n):
        f = loop.create_future()
        put(f)
        futs.append(f)
    await asyncio.gather(*futs)


async def gather_inloop(n):
    loop = asyncio.get_running_loop()
    futs = []
    for _ in range(n):
        f = loop.create_future()
        loop.call_soon(f.set_result, None)
        futs.append(f)
    await asyncio.gather(*futs)


async def gather_ready(demo, n):
    await asyncio.gather(*[demo.ready() for _ in range(n)])


async def gather_rate(gather_n, n, reps):
    """(median ops/s, CPU us per op) of gather_n(n), after a warm-up
    gather; CPU as in throughput()."""
    await gather_n(min(n, 1000))
    rates = []
    cpu = 0
    for _ in range(reps):
        gc.collect()
        c0 = cpu_ns()
        t0 = time.perf_counter_ns()
        await gather_n(n)
        dt = time.perf_counter_ns() - t0
        cpu += cpu_ns() - c0
        rates.append(n * 1e9 / dt)
    return median(rates), cpu / 1e3 / (n * reps)


async def measure(res, names, coro):
    """Runs one measurement; its figures go to res[names...]. If it fails,
    each of its figures is n/a with the error."""
    try:
        out = await coro
        if len(names) == 1:
            out = (out,)
        for name, v in zip(names, out):
            res[name] = v
    except Absent as e:
        for name in names:
            res[name] = na(e)
    except Exception as e:  # an honest n/a, never a made-up figure
        for name in names:
            res[name] = na("%s: %s" % (type(e).__name__, e))


# ---------------------------------------------------------------------------
# Worker sections (each runs in its own child process)

def make_loop(kind):
    if kind == "asyncio":
        return asyncio.new_event_loop()
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    raise ValueError("unknown loop kind %r" % kind)


def run_on_loop(kind, coro_fn):
    loop = make_loop(kind)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            if hasattr(loop, "shutdown_default_executor"):  # 3.9+
                loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def section_baseline(p):
    res = {}
    loop = asyncio.get_running_loop()
    helper = ThreadsafeHelper()
    try:
        async def sleep0_n(n):
            for _ in range(n):
                await asyncio.sleep(0)

        async def inloop_n(n):
            for _ in range(n):
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut

        put = helper.q.put

        async def threadsafe_one():
            fut = loop.create_future()
            put(fut)
            await fut

        async def threadsafe_n(n):
            for _ in range(n):
                fut = loop.create_future()
                put(fut)
                await fut

        def trivial():
            return None

        async def executor_n(n):
            for _ in range(n):
                await loop.run_in_executor(None, trivial)

        await measure(res, ["sleep0_ops", "sleep0_ops_min", "sleep0_ops_max",
                            "sleep0_cpu_us"],
                      throughput(sleep0_n, p["reps"], p["rep_s"]))
        await measure(res, ["inloop_ops", "inloop_ops_min", "inloop_ops_max",
                            "inloop_cpu_us"],
                      throughput(inloop_n, p["reps"], p["rep_s"]))
        await measure(res, ["threadsafe_ops", "threadsafe_ops_min",
                            "threadsafe_ops_max", "threadsafe_cpu_us"],
                      throughput(threadsafe_n, p["reps"], p["rep_s"]))
        await measure(res, ["threadsafe_p50_us", "threadsafe_p99_us"],
                      latency_us(threadsafe_one, p["lat_samples"]))
        await measure(res, ["executor_ops", "executor_ops_min",
                            "executor_ops_max", "executor_cpu_us"],
                      throughput(executor_n, p["reps"], p["rep_s"]))
        for n, reps in zip(p["gather_ns"], p["gather_reps"]):
            await measure(res, ["gather_threadsafe_%d" % n,
                                "gather_threadsafe_%d_cpu_us" % n],
                          gather_rate(lambda k: gather_threadsafe(helper, k),
                                      n, reps))
            await measure(res, ["gather_inloop_%d" % n,
                                "gather_inloop_%d_cpu_us" % n],
                          gather_rate(gather_inloop, n, reps))
    finally:
        helper.stop()
    return res


async def sleep_compare(demo_sleep_ms, samples, block):
    """p50 wall time (us) of demo_sleep_ms(1) and asyncio.sleep(0.001),
    sampled in alternating blocks (the first of each pair alternates too)."""
    bridge, stock = [], []

    async def one_block(which, out):
        for _ in range(block):
            t0 = time.perf_counter_ns()
            if which == "bridge":
                await demo_sleep_ms(1)
            else:
                await asyncio.sleep(0.001)
            out.append(time.perf_counter_ns() - t0)

    await one_block("bridge", [])  # warm-up, discarded
    await one_block("stock", [])
    i = 0
    while len(bridge) < samples or len(stock) < samples:
        order = [("bridge", bridge), ("stock", stock)]
        if i % 2:
            order.reverse()
        for which, out in order:
            await one_block(which, out)
        i += 1
    b = percentile(bridge, 50) / 1e3
    s = percentile(stock, 50) / 1e3
    return b, s, b / s


async def idle_cpu(idle_s):
    """CPU time (ms) the whole process uses while its asyncio loop sleeps
    idle_s after the work before it, and that as a share of the idle
    wall time (%). An idle runtime must cost none: its loop threads block
    (the spin stops after one miss)."""
    await asyncio.sleep(0.05)  # the runtime's last spin ends
    c0 = cpu_ns()
    t0 = time.perf_counter_ns()
    await asyncio.sleep(idle_s)
    dt = time.perf_counter_ns() - t0
    cpu = cpu_ns() - c0
    return cpu / 1e6, 100.0 * cpu / dt


def runtime_tids():
    """Thread ids of this process that are not Python threads: the
    runtime's loop threads (the bridge worker runs no other threads)."""
    py = {t.native_id for t in threading.enumerate()}
    try:
        return [int(t) for t in os.listdir("/proc/self/task") if int(t) not in py]
    except OSError:
        return []


def wchan(tid):
    try:
        with open("/proc/self/task/%d/wchan" % tid) as f:
            return f.read()
    except OSError:
        return ""


async def gil_round(demo, k, busy_ns):
    """Starts C timers of 1..k ms; busy-spins busy_ns without yielding to
    the loop (0 = idle), sampling where the runtime threads sleep; returns
    each timer's lateness in ns and (samples, samples blocked on a futex)."""
    starts, futs = [], []
    for i in range(1, k + 1):
        # Each timer's own start time, not one t0 for all: starting 100
        # timers takes a little time, which would otherwise show up as
        # lateness of the later ones.
        t = time.monotonic_ns()
        futs.append(asyncio.ensure_future(demo.sleep_stamp_ms(i)))
        starts.append(t)
    samples = futex = 0
    if busy_ns:
        tids = runtime_tids()
        end = time.monotonic_ns() + busy_ns
        while time.monotonic_ns() < end:  # pure Python, holds the GIL
            for tid in tids:
                samples += 1
                if wchan(tid).startswith("futex"):
                    futex += 1
    stamps = await asyncio.gather(*futs)
    return ([stamps[i - 1] - (starts[i - 1] + i * 1000000)
             for i in range(1, k + 1)], (samples, futex))


async def gil_test(demo, p):
    k, busy_ns = p["gil_k"], p["gil_busy_ms"] * 1000000
    idle, busy = [], []
    round_max_busy = []
    samples = futex = 0
    await gil_round(demo, 5, 0)  # warm-up
    for _ in range(p["gil_rounds"]):
        idle.extend((await gil_round(demo, k, 0))[0])
        late, (n, f) = await gil_round(demo, k, busy_ns)
        samples += n
        futex += f
        busy.extend(late)
        round_max_busy.append(max(late))
    max_idle, max_busy = max(idle), max(busy)
    # Time the runtime threads spent blocked on the GIL while Python held
    # it: the busy loop samples each runtime thread's wait channel
    # (/proc/self/task/<tid>/wchan). Waiting for the GIL is waiting on a
    # futex (pthread condition variable), so
    #     blocked = busy time x (futex samples / samples)
    # per round, summed over rounds: an upper bound (any futex wait
    # counts, not only the GIL's). Runtime threads otherwise sleep in
    # epoll or io_uring waits. The timer lateness rows are the symptom
    # view: a GIL wait would delay every timer due during it.
    if samples:
        blocked = busy_ns * p["gil_rounds"] * futex / samples
    else:
        blocked = na("no runtime thread found to sample")
    late_timers = sum(1 for x in busy if x > max_idle + GIL_NOISE_NS)
    return (percentile(idle, 50) / 1e3, max_idle / 1e3,
            percentile(busy, 50) / 1e3, max_busy / 1e3,
            blocked if is_na(blocked) else blocked / 1e6, late_timers,
            [x / 1e3 for x in round_max_busy])


def spin_env_recognised(demo):
    """Whether the extension's binary mentions AIOBRIDGE_SPIN_US at all (the
    library is linked into each extension). None if it cannot be read."""
    path = getattr(demo, "__file__", None)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return b"AIOBRIDGE_SPIN_US" in f.read()
    except OSError:
        return None


async def section_bridge(p):
    res = {}
    try:
        import aiobridge_demo as demo
    except ImportError as e:
        return {"_error": "cannot import aiobridge_demo (%s); set PYTHONPATH "
                "to the build's python/cpXY directory" % e}
    try:
        res["_backend"] = demo.backend()
    except Exception as e:
        return {"_error": "runtime did not start: %s: %s"
                % (type(e).__name__, e)}
    res["_spin_env_in_binary"] = spin_env_recognised(demo)
    res["_module"] = getattr(demo, "__file__", "?")

    async def ready_n(n):
        for _ in range(n):
            await demo.ready()

    async def ready_one():
        await demo.ready()

    async def sleep0_n(n):
        for _ in range(n):
            await asyncio.sleep(0)

    await measure(res, ["ready_ops", "ready_ops_min", "ready_ops_max",
                        "ready_cpu_us"],
                  throughput(ready_n, p["reps"], p["rep_s"]))
    await measure(res, ["ready_p50_us", "ready_p99_us"],
                  latency_us(ready_one, p["lat_samples"]))
    for n, reps in zip(p["gather_ns"], p["gather_reps"]):
        await measure(res, ["gather_ready_%d" % n,
                            "gather_ready_%d_cpu_us" % n],
                      gather_rate(lambda k: gather_ready(demo, k), n, reps))
    await measure(res, ["await_py_n_ops", "await_py_n_ops_min",
                        "await_py_n_ops_max", "await_py_n_cpu_us"],
                  throughput(await_py_n_runner(demo, "await_py_n"),
                             p["reps"], p["rep_s"]))
    await measure(res, ["sleep_ms1_p50_us", "asyncio_sleep1_p50_us",
                        "sleep_ratio"],
                  sleep_compare(demo.sleep_ms, p["sleep_samples"],
                                p["sleep_block"]))
    # Loop-local C tasks (no runtime thread), against asyncio itself in the
    # same process.
    await measure(res, ["sleep0_ops", "sleep0_ops_min", "sleep0_ops_max",
                        "sleep0_cpu_us"],
                  throughput(sleep0_n, p["reps"], p["rep_s"]))
    await measure(res, ["local_ready_ops", "local_ready_ops_min",
                        "local_ready_ops_max", "local_ready_cpu_us"],
                  throughput_local(demo, "local_ready", p))
    res["local_ready_ratio"] = ratio(res["local_ready_ops"],
                                     res["sleep0_ops"])
    await measure(res, ["local_await_py_n_ops", "local_await_py_n_ops_min",
                        "local_await_py_n_ops_max",
                        "local_await_py_n_cpu_us"],
                  throughput_local(demo, "local_await_py_n", p))
    await measure(res, ["local_sleep_ms1_p50_us",
                        "local_asyncio_sleep1_p50_us", "local_sleep_ratio"],
                  sleep_local(demo, p))
    await measure(res, ["gil_idle_p50_us", "gil_idle_max_us",
                        "gil_busy_p50_us", "gil_busy_max_us",
                        "gil_blocked_ms", "gil_late_timers",
                        "gil_busy_round_max_us"],
                  gil_test(demo, p))
    await measure(res, ["idle_cpu_ms", "idle_cpu_pct"],
                  idle_cpu(p["idle_s"]))
    try:
        st = demo.stats()
        res["_stats"] = st
    except Exception as e:
        res["_stats"] = na(e)
    return res


def sleep0_factory():
    return asyncio.sleep(0)


def await_py_n_runner(demo, name):
    """run_n for throughput(): `await demo.<name>(lambda: sleep(0), n)`,
    which must return n."""
    fn = getattr(demo, name)

    async def run(n):
        got = await fn(sleep0_factory, n)
        if got != n:
            raise RuntimeError("%s returned %r, not %d" % (name, got, n))
    return run


LOCAL_ABSENT = ("aiobridge_demo has no %s() (loop-local C tasks are not in "
                "this build)")


class Absent(Exception):
    """A demo function this build does not have: the figure is n/a."""


def need(demo, name):
    if not hasattr(demo, name):
        raise Absent(LOCAL_ABSENT % name)
    return getattr(demo, name)


async def throughput_local(demo, name, p):
    """Throughput of a loop-local C task: local_ready() awaited one after
    the other, or local_await_py_n(lambda: sleep(0), n)."""
    fn = need(demo, name)
    if name == "local_ready":
        async def run(n):
            for _ in range(n):
                await fn()
    else:
        run = await_py_n_runner(demo, name)
    return await throughput(run, p["reps"], p["rep_s"])


async def sleep_local(demo, p):
    return await sleep_compare(need(demo, "local_sleep_ms"),
                               p["sleep_samples"], p["sleep_block"])


# ---------------------------------------------------------------------------
# Contention: the bridge beside busy foreign processes
#
# Each load is started by the parent before the row's workers and killed
# after them; every hog also exits on its own at a hard deadline, or as
# soon as the benchmark (its parent) is gone, so none outlives the run.
# Hogs stay in the benchmark's session (and so in its scheduler autogroup):
# their threads compete with the runtime and Python threads one for one.

HOG_SRC = r"""
import hashlib, os, sys, threading, time
mode, n, limit, ppid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
end = time.monotonic() + limit
def alive():
    return time.monotonic() < end and os.getppid() == ppid
if mode == "loop":  # one runnable thread: a pure Python busy loop
    i = 0
    while True:
        i += 1
        if not i & 0xffff and not alive():
            os._exit(0)
else:  # n runnable threads: sha256 of 16 MiB runs without the GIL
    buf = b"x" * (16 << 20)
    def work():
        while True:
            hashlib.sha256(buf).digest()
    for _ in range(n):
        threading.Thread(target=work, daemon=True).start()
    while alive():
        time.sleep(0.02)
    os._exit(0)
"""

# Hard bound on a hog's life (s); the parent kills it sooner, at the end of
# its row.
HOG_LIMIT_S = 300
CONTENTION_WORKER_TIMEOUT_S = 180


def ncpu():
    return os.cpu_count() or 1


def load_kinds():
    """Contention loads: key -> (label, [(mode, threads) per hog process])."""
    n = ncpu()
    return {
        "none": ("no load", []),
        "1proc": ("1 busy process", [("loop", 1)]),
        "2proc": ("2 busy processes", [("loop", 1), ("loop", 1)]),
        "over": ("%d busy threads (2x CPUs)" % (2 * n),
                 [("threads", 2 * n)]),
    }


class Load:
    """Busy foreign processes for one contention row."""

    def __init__(self, spec):
        self.spec = spec
        self.procs = []
        self.t0 = None
        self.cpu0 = 0

    def __enter__(self):
        for mode, n in self.spec:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", HOG_SRC, mode, str(n),
                 str(HOG_LIMIT_S), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        _live_hogs.extend(self.procs)
        time.sleep(0.2 if self.procs else 0)  # hogs up and running
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu()
        return self

    def _cpu(self):
        """CPU seconds the hogs used so far (utime + stime)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pr in self.procs:
            try:
                with open("/proc/%d/stat" % pr.pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total

    def cores(self):
        """CPUs the hogs kept busy on average since they started."""
        dt = time.monotonic() - self.t0
        return (self._cpu() - self.cpu0) / dt if dt > 0 else 0.0

    def __exit__(self, *exc):
        for pr in self.procs:
            if pr.poll() is None:
                pr.kill()
        for pr in self.procs:
            pr.wait()
            if pr in _live_hogs:
                _live_hogs.remove(pr)
        return False


_live_hogs = []


def _kill_hogs():
    for pr in list(_live_hogs):
        try:
            pr.kill()
            pr.wait()
        except Exception:
            pass


atexit.register(_kill_hogs)


async def section_contention(p):
    """Sequential ready(), await_py_n, a gather (and the loop-local rows when
    the demo has them) with CPU per op, beside whatever load the parent
    started; then the CPU the process uses while idle."""
    res = {}
    try:
        import aiobridge_demo as demo
        res["_backend"] = demo.backend()
    except Exception as e:
        return {"_error": "%s: %s" % (type(e).__name__, e)}
    reps, rep_s = p["c_reps"], p["c_rep_s"]
    n = p["c_gather_n"]

    async def ready_n(k):
        for _ in range(k):
            await demo.ready()

    async def sleep0_n(k):
        for _ in range(k):
            await asyncio.sleep(0)

    try:
        st0 = demo.stats()
    except Exception:
        st0 = None
    await measure(res, ["sleep0_ops", "sleep0_ops_min", "sleep0_ops_max",
                        "sleep0_cpu_us"], throughput(sleep0_n, reps, rep_s))
    await measure(res, ["ready_ops", "ready_ops_min", "ready_ops_max",
                        "ready_cpu_us"], throughput(ready_n, reps, rep_s))
    await measure(res, ["await_py_n_ops", "await_py_n_ops_min",
                        "await_py_n_ops_max", "await_py_n_cpu_us"],
                  throughput(await_py_n_runner(demo, "await_py_n"), reps,
                             rep_s))
    await measure(res, ["gather_ready_ops", "gather_ready_cpu_us"],
                  gather_rate(lambda k: gather_ready(demo, k), n, reps))
    lp = dict(p, reps=reps, rep_s=rep_s)
    await measure(res, ["local_ready_ops", "local_ready_ops_min",
                        "local_ready_ops_max", "local_ready_cpu_us"],
                  throughput_local(demo, "local_ready", lp))
    try:
        st1 = demo.stats()
        if st0 is not None:
            res["_spin"] = {k: st1[k] - st0[k]
                            for k in ("spins", "spin_hits", "spin_ns",
                                      "loop_wakes", "polls")
                            if k in st0 and k in st1}
    except Exception as e:
        res["_spin"] = na(e)
    await measure(res, ["idle_cpu_ms", "idle_cpu_pct"],
                  idle_cpu(p["c_idle_s"]))
    return res


async def section_rss(kind, n):
    """One gather of n awaitables in this fresh process: VmHWM growth."""
    helper = None
    if kind == "ready":
        import aiobridge_demo as demo

        def run(k):
            return gather_ready(demo, k)
    elif kind == "threadsafe":
        helper = ThreadsafeHelper()

        def run(k):
            return gather_threadsafe(helper, k)
    elif kind == "inloop":
        run = gather_inloop
    else:
        raise ValueError("unknown rss kind %r" % kind)
    try:
        await run(100)  # warm-up: imports, runtime/helper threads, caches
        gc.collect()
        before = vm_hwm_bytes()
        t0 = time.perf_counter_ns()
        await run(n)
        dt = time.perf_counter_ns() - t0
        after = vm_hwm_bytes()
    finally:
        if helper:
            helper.stop()
    return {"hwm_before": before, "hwm_after": after,
            "bytes_per": (after - before) / float(n),
            "cold_ops": n * 1e9 / dt}


def worker_main(args):
    p = QUICK if args.quick else FULL
    try:
        if args.worker == "baseline":
            res = run_on_loop(args.loop, lambda: section_baseline(p))
        elif args.worker == "bridge":
            res = run_on_loop(args.loop, lambda: section_bridge(p))
        elif args.worker == "contention":
            res = run_on_loop(args.loop, lambda: section_contention(p))
        elif args.worker == "rss":
            res = run_on_loop(args.loop,
                              lambda: section_rss(args.rss_kind, args.n))
        else:
            res = {"_error": "unknown worker section %r" % args.worker}
    except Exception as e:
        res = {"_error": "%s: %s" % (type(e).__name__, e)}
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------
# Orchestration (the parent process)

def progress(msg):
    sys.stderr.write("bench_bridge: %s\n" % msg)
    sys.stderr.flush()


def run_worker(section, loop, extra_args, env_over, quick,
               timeout=WORKER_TIMEOUT_S):
    """Runs a worker section in a child process; its result dict, or
    {"_error": reason}. env_over: variables to set (None: to unset)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", section,
           "--loop", loop] + extra_args
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    for k, v in env_over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    try:
        cp = subprocess.run(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"_error": "worker timed out after %d s" % timeout}
    for line in cp.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = cp.stderr.strip().splitlines()
    why = err[-1] if err else "no output"
    return {"_error": "worker exited with status %d: %s" % (cp.returncode,
                                                             why)}


def uvloop_status():
    try:
        import uvloop
        return True, getattr(uvloop, "__version__", "?")
    except Exception as e:
        return False, "%s: %s" % (type(e).__name__, e)


class Config:
    """One bridge environment: backend and spin setting (None = unset)."""

    def __init__(self, backend, spin):
        self.backend = backend
        self.spin = spin

    def env(self):
        e = {}
        if self.backend is not None:
            e["AIOBRIDGE_BACKEND"] = self.backend
        if self.spin is not None:
            e["AIOBRIDGE_SPIN_US"] = str(self.spin)
        return e

    def key(self):
        return "backend=%s,spin=%s" % (
            self.backend if self.backend is not None else "default",
            self.spin if self.spin is not None else "unset")

    def label(self, reported_backend):
        b = self.backend or reported_backend or "default"
        if self.spin is None:
            return b
        return "%s s=%s" % (b, self.spin)


def collect(args, p, loops, configs):
    """Runs every section; returns the raw figures."""
    data = {"baseline": {}, "bridge": {}, "rss": {}}
    for loop in loops if "main" in args.sections else []:
        progress("%s: baselines" % loop)
        data["baseline"][loop] = run_worker("baseline", loop, [], {},
                                            args.quick)
        for kind in ("threadsafe", "inloop"):
            for n in p["gather_ns"]:
                progress("%s: RSS of a %d-future %s gather" % (loop, n, kind))
                data["rss"]["%s/%s/%d" % (loop, kind, n)] = run_worker(
                    "rss", loop, ["--rss-kind", kind, "--n", str(n)], {},
                    args.quick)
        for cfg in configs:
            progress("%s: bridge (%s)" % (loop, cfg.key()))
            data["bridge"]["%s/%s" % (loop, cfg.key())] = run_worker(
                "bridge", loop, [], cfg.env(), args.quick)
            for n in p["gather_ns"]:
                progress("%s: RSS of a %d ready() gather (%s)"
                         % (loop, n, cfg.key()))
                data["rss"]["%s/ready/%d/%s" % (loop, n, cfg.key())] = \
                    run_worker("rss", loop,
                               ["--rss-kind", "ready", "--n", str(n)],
                               cfg.env(), args.quick)
    if "contention" in args.sections:
        data["contention"] = collect_contention(args, p, configs)
    return data


# The two spin settings of the contention rows: the library default (the
# variable unset) and off.
SPINS = (("on", None), ("off", "0"))


def contention_plan(args, configs):
    """(loops, backends, loads) of the contention rows."""
    loops = [x.strip() for x in args.contention_loops.split(",")
             if x.strip()]
    backends = []
    for cfg in configs:
        if cfg.backend not in backends:
            backends.append(cfg.backend)
    if args.quick:
        backends = backends[:1]
    loads = [x.strip() for x in args.contention_loads.split(",")
             if x.strip()]
    return loops, backends, loads


def contention_key(loop, backend, load, spin):
    return "%s/%s/%s/%s" % (loop, backend or "default", load, spin)


def collect_contention(args, p, configs):
    """Runs the contention workers: per load, the hogs are started once,
    then spin on and off are measured c_rounds times each (the order
    alternating between rounds and loads), then the hogs are killed."""
    out = {"rounds": {}, "load_cores": {}, "ncpu": ncpu(),
           "loadavg_start": loadavg1()}
    loops, backends, loads = contention_plan(args, configs)
    kinds = load_kinds()
    flip = 0
    for loop in loops:
        for backend in backends:
            for load in loads:
                label, spec = kinds[load]
                with Load(spec) as hogs:
                    for rnd in range(p["c_rounds"]):
                        order = list(SPINS) if flip % 2 == 0 else \
                            list(reversed(SPINS))
                        flip += 1
                        for spin, value in order:
                            env = {"AIOBRIDGE_SPIN_US": value}
                            if backend is not None:
                                env["AIOBRIDGE_BACKEND"] = backend
                            key = contention_key(loop, backend, load, spin)
                            progress("%s: contention, %s, %s, spin %s "
                                     "(round %d)" % (loop, backend or
                                                     "default", label, spin,
                                                     rnd + 1))
                            out["rounds"].setdefault(key, []).append(
                                run_worker("contention", loop, [], env,
                                           args.quick,
                                           CONTENTION_WORKER_TIMEOUT_S))
                    out["load_cores"][contention_key(
                        loop, backend, load, "")] = hogs.cores()
    out["loadavg_end"] = loadavg1()
    return out


def loadavg1():
    """The 1-minute load average, or None."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def fig(res, name):
    """A figure from a worker result, or n/a with the reason."""
    if res is None:
        return na("not run")
    if "_error" in res:
        return na(res["_error"])
    if name not in res:
        return na("not measured")
    return res[name]


def rss_fig(data, key):
    r = data["rss"].get(key)
    if r is None:
        return na("not run")
    if "_error" in r:
        return na(r["_error"])
    return r["bytes_per"]


def fmt(v, kind):
    if is_na(v):
        return "n/a"
    if v is None:
        return "?"
    if kind == "ops":
        return "{:,.0f}".format(v)
    if kind == "us":
        return "%.1f" % v
    if kind == "us2":
        return "%.2f" % v
    if kind == "ms":
        return "%.2f" % v
    if kind == "B":
        return "%.0f" % v
    if kind == "x":
        return "%.3f" % v
    if kind == "n":
        return "%d" % v
    return str(v)


def ratio(a, b):
    if is_na(a):
        return a
    if is_na(b):
        return b
    if not b:
        return na("division by zero")
    return a / b


CPU_LABEL = "  CPU per op"
CPU_UNIT = "us CPU"


def build_rows(data, p, loops, configs):
    """Rows of (label, unit, kind, [value per column]); columns are
    (loop, config) pairs. Every throughput row is followed by the CPU time
    the whole process (Python thread and runtime threads together) spent
    per operation in it."""
    cols = [(loop, cfg) for loop in loops for cfg in configs]
    n_small, n_big = p["gather_ns"]
    rows = []

    def base_row(label, unit, kind, name, cpu=None):
        rows.append((label, unit, kind,
                     [fig(data["baseline"].get(loop), name)
                      for loop, cfg in cols]))
        if cpu:
            base_row(CPU_LABEL, CPU_UNIT, "us2", cpu)

    def base_rss_row(label, kind_, n):
        rows.append((label, "B", "B",
                     [rss_fig(data, "%s/%s/%d" % (loop, kind_, n))
                      for loop, cfg in cols]))

    def bridge_res(loop, cfg):
        return data["bridge"].get("%s/%s" % (loop, cfg.key()))

    def bridge_row(label, unit, kind, name, cpu=None):
        rows.append((label, unit, kind,
                     [fig(bridge_res(loop, cfg), name)
                      for loop, cfg in cols]))
        if cpu:
            bridge_row(CPU_LABEL, CPU_UNIT, "us2", cpu)

    rows.append(("Baselines, pure asyncio", None, None, None))
    base_row("sleep(0) sequential", "ops/s", "ops", "sleep0_ops",
             "sleep0_cpu_us")
    base_row("in-loop future sequential", "ops/s", "ops", "inloop_ops",
             "inloop_cpu_us")
    base_row("threadsafe (py thread) seq.", "ops/s", "ops", "threadsafe_ops",
             "threadsafe_cpu_us")
    base_row("threadsafe round trip p50", "us", "us", "threadsafe_p50_us")
    base_row("threadsafe round trip p99", "us", "us", "threadsafe_p99_us")
    base_row("run_in_executor sequential", "ops/s", "ops", "executor_ops",
             "executor_cpu_us")
    for n in (n_small, n_big):
        base_row("gather %d threadsafe" % n, "ops/s", "ops",
                 "gather_threadsafe_%d" % n, "gather_threadsafe_%d_cpu_us" % n)
    for n in (n_small, n_big):
        base_row("gather %d in-loop future" % n, "ops/s", "ops",
                 "gather_inloop_%d" % n, "gather_inloop_%d_cpu_us" % n)
    for n in (n_small, n_big):
        base_rss_row("RSS/awaitable %d threadsafe" % n, "threadsafe", n)
    for n in (n_small, n_big):
        base_rss_row("RSS/awaitable %d in-loop" % n, "inloop", n)

    rows.append(("Bridge, aiobridge_demo", None, None, None))
    bridge_row("ready() sequential", "ops/s", "ops", "ready_ops",
               "ready_cpu_us")
    bridge_row("ready() seq. slowest rep", "ops/s", "ops", "ready_ops_min")
    bridge_row("ready() seq. fastest rep", "ops/s", "ops", "ready_ops_max")
    bridge_row("ready() round trip p50", "us", "us", "ready_p50_us")
    bridge_row("ready() round trip p99", "us", "us", "ready_p99_us")
    for n in (n_small, n_big):
        bridge_row("gather %d ready()" % n, "ops/s", "ops",
                   "gather_ready_%d" % n, "gather_ready_%d_cpu_us" % n)
    for n in (n_small, n_big):
        rows.append(("RSS/awaitable %d ready()" % n, "B", "B",
                     [rss_fig(data, "%s/ready/%d/%s" % (loop, n, cfg.key()))
                      for loop, cfg in cols]))
    bridge_row("await_py_n(sleep(0))", "awaits/s", "ops", "await_py_n_ops",
               "await_py_n_cpu_us")
    bridge_row("sleep_ms(1) p50", "us", "us", "sleep_ms1_p50_us")
    bridge_row("asyncio.sleep(0.001) p50", "us", "us",
               "asyncio_sleep1_p50_us")
    bridge_row("sleep_ms(1) / asyncio.sleep", "x", "x", "sleep_ratio")
    bridge_row("timer lateness, idle p50", "us", "us", "gil_idle_p50_us")
    bridge_row("timer lateness, idle max", "us", "us", "gil_idle_max_us")
    bridge_row("timer lateness, busy p50", "us", "us", "gil_busy_p50_us")
    bridge_row("timer lateness, busy max", "us", "us", "gil_busy_max_us")
    bridge_row("timers late > idle max+1ms", "of %d" % (
        p["gil_k"] * p["gil_rounds"]), "n", "gil_late_timers")
    bridge_row("blocked on futex (GIL) while busy", "ms", "ms", "gil_blocked_ms")
    bridge_row("CPU while idle %.1f s after work" % p["idle_s"], "ms", "ms",
               "idle_cpu_ms")

    rows.append(("Loop-local C tasks (no runtime thread)", None, None, None))
    bridge_row("sleep(0) sequential, same process", "ops/s", "ops",
               "sleep0_ops", "sleep0_cpu_us")
    bridge_row("local_ready() sequential", "ops/s", "ops", "local_ready_ops",
               "local_ready_cpu_us")
    bridge_row("local_ready() / sleep(0)", "x", "x", "local_ready_ratio")
    bridge_row("local_await_py_n(sleep(0))", "awaits/s", "ops",
               "local_await_py_n_ops", "local_await_py_n_cpu_us")
    bridge_row("local_sleep_ms(1) p50", "us", "us", "local_sleep_ms1_p50_us")
    bridge_row("local_sleep_ms(1) / asyncio.sleep", "x", "x",
               "local_sleep_ratio")
    return cols, rows


def print_table(cols, rows, reported):
    label_w, unit_w = 35, 9
    heads1 = [loop for loop, cfg in cols]
    heads2 = [cfg.label(reported.get((loop, cfg.key()))) for loop, cfg in cols]
    cells = []
    for label, unit, kind, vals in rows:
        if vals is not None:
            cells.append([fmt(v, kind) for v in vals])
    col_w = max([12] + [len(h) + 2 for h in heads1 + heads2] +
                [len(c) + 2 for row in cells for c in row])
    print("%-*s %-*s%s" % (label_w, "metric", unit_w, "unit",
                           "".join(h.rjust(col_w) for h in heads1)))
    print("%-*s %-*s%s" % (label_w, "", unit_w, "",
                           "".join(h.rjust(col_w) for h in heads2)))
    print("-" * (label_w + 1 + unit_w + col_w * len(cols)))
    notes = []
    for label, unit, kind, vals in rows:
        if vals is None:
            print(label)
            continue
        out = []
        for v in vals:
            s = fmt(v, kind)
            if is_na(v):
                if v["na"] not in notes:
                    notes.append(v["na"])
                s = "n/a[%d]" % (notes.index(v["na"]) + 1)
            out.append(s.rjust(col_w))
        print("  %-*s %-*s%s" % (label_w - 2, label, unit_w, unit,
                                 "".join(out)))
    for i, why in enumerate(notes):
        print("n/a[%d]: %s" % (i + 1, why))


def targets(data, p, loop, cfg):
    """The target lines for one bridge configuration on one loop kind."""
    n_big = p["gather_ns"][-1]
    base = data["baseline"].get(loop)
    br = data["bridge"].get("%s/%s" % (loop, cfg.key()))
    out = []

    def line(tag, text, v, op, goal, unit="x"):
        if is_na(v):
            why = v["na"]
            if len(why) > 60:
                why = why[:57] + "..."
            verdict, shown = "n/a: %s" % why, "n/a"
        else:
            ok = v >= goal if op == ">=" else v <= goal
            verdict = "met" if ok else "NOT met"
            shown = ("%.3f%s" % (v, unit)) if unit == "x" else \
                ("%.0f %s" % (v, unit) if unit == "B" else
                 "%.2f %s" % (v, unit))
        goal_s = ("%g%s" % (goal, unit)) if unit == "x" else \
            "%g %s" % (goal, unit)
        out.append("  (%s) %-44s %12s   target %s %-8s %s"
                   % (tag, text, shown, op, goal_s, verdict))

    line("a", "sequential ready() / threadsafe sequential",
         ratio(fig(br, "ready_ops"), fig(base, "threadsafe_ops")), ">=", 3)
    line("b", "gather %d ready() / threadsafe gather" % n_big,
         ratio(fig(br, "gather_ready_%d" % n_big),
               fig(base, "gather_threadsafe_%d" % n_big)), ">=", 2)
    line("b", "gather %d ready() / in-loop future gather" % n_big,
         ratio(fig(br, "gather_ready_%d" % n_big),
               fig(base, "gather_inloop_%d" % n_big)), ">=", 1)
    line("c", "RSS bytes per in-flight ready() at %d" % n_big,
         rss_fig(data, "%s/ready/%d/%s" % (loop, n_big, cfg.key())),
         "<=", 450, "B")
    line("d", "sleep_ms(1) p50 / asyncio.sleep(0.001) p50",
         fig(br, "sleep_ratio"), "<=", 1.05)
    line("e", "runtime-thread time blocked on a futex (GIL)",
         fig(br, "gil_blocked_ms"), "<=", 0, "ms")
    return out


# A contention row counts as made worse by the spin when spin-on's median is
# below spin-off's by more than SPIN_NOISE (the run-to-run noise of
# sequential rows on a loaded 2-vCPU VM) and its rounds, each a fresh
# process, lie below spin-off's beyond chance: a one-sided Mann-Whitney test
# over the rounds' figures gives p < SPIN_P. Beside more runnable threads
# than CPUs a process tends to keep one speed for its life, and processes
# of one setting differ several-fold (docs/benchmarks.md), so a ratio of
# medians over a few rounds alone follows the luck of the draw.
SPIN_NOISE = 0.10
SPIN_P = 0.05
# An idle process may use at most this share of an idle window's wall time.
IDLE_CPU_PCT_MAX = 1.0

CONTENTION_ROWS = (
    # (label, figure, spin-sensitive: gets a verdict)
    ("sleep(0), pure asyncio", "sleep0", False),
    ("ready() sequential", "ready", True),
    ("await_py_n(sleep(0))", "await_py_n", True),
    ("gather %d ready()", "gather_ready", True),
    # Loop-local: no runtime thread, so the spin setting cannot matter;
    # with sleep(0), what on/off differ by here is the machine's noise.
    ("local_ready() sequential", "local_ready", False),
)


def contention_summary(rounds, name):
    """(ops, cpu_us, slowest, fastest) of one figure over a key's rounds:
    ops = median of the rounds' medians, CPU = their mean; or n/a."""
    vals, cpus, lows, highs = [], [], [], []
    why = na("not run")
    for r in rounds or []:
        v = fig(r, name + "_ops")
        if is_na(v):
            why = v
            continue
        vals.append(v)
        c = fig(r, name + "_cpu_us")
        if not is_na(c):
            cpus.append(c)
        lo, hi = fig(r, name + "_ops_min"), fig(r, name + "_ops_max")
        lows.append(v if is_na(lo) else lo)
        highs.append(v if is_na(hi) else hi)
    if not vals:
        return why, why, why, why
    return (median(vals), sum(cpus) / len(cpus) if cpus else na("no CPU"),
            min(lows), max(highs))


def round_figures(rounds, name):
    """The figure `name` (ops/s) of each round that measured it."""
    vals = [fig(r, name + "_ops") for r in rounds or []]
    return [v for v in vals if not is_na(v)]


def spin_verdict(on_vals, off_vals):
    """The verdict of a spin-sensitive row from its rounds' ops/s with the
    spin on and off: "not worse", "WORSE (p ...)", "within noise (p ...)",
    "too few rounds" (no outcome could reach SPIN_P) or "n/a"."""
    if not on_vals or not off_vals:
        return "n/a"
    if median(on_vals) / median(off_vals) >= 1 - SPIN_NOISE:
        return "not worse"
    if 1 / math.comb(len(on_vals) + len(off_vals), len(on_vals)) >= SPIN_P:
        return "too few rounds"
    pv = mann_whitney_below(on_vals, off_vals)
    return "%s (p %.3f)" % ("WORSE" if pv < SPIN_P else "within noise", pv)


def contention_verdicts(data, p, args, configs):
    """[(loop, backend, load, row label, on, on_cpu, off, off_cpu, ratio,
    verdict)] and the idle figures, for every contention row."""
    c = data.get("contention") or {}
    rounds = c.get("rounds", {})
    loops, backends, loads = contention_plan(args, configs)
    kinds = load_kinds()
    out = []
    for loop in loops:
        for backend in backends:
            for load in loads:
                k_on = contention_key(loop, backend, load, "on")
                k_off = contention_key(loop, backend, load, "off")
                for label, name, judged in CONTENTION_ROWS:
                    if "%d" in label:
                        label = label % p["c_gather_n"]
                    on = contention_summary(rounds.get(k_on), name)
                    off = contention_summary(rounds.get(k_off), name)
                    r = ratio(on[0], off[0])
                    if not judged:
                        verdict = "reference"
                    else:
                        verdict = spin_verdict(
                            round_figures(rounds.get(k_on), name),
                            round_figures(rounds.get(k_off), name))
                    out.append((loop, backend, load, label, on, off, r,
                                verdict))
                idle = []
                for k in (k_on, k_off):
                    rs = [fig(x, "idle_cpu_pct") for x in rounds.get(k, [])]
                    rs = [x for x in rs if not is_na(x)]
                    idle.append(max(rs) if rs else na("not measured"))
                verdict = "n/a" if any(is_na(x) for x in idle) else (
                    "met" if max(idle) <= IDLE_CPU_PCT_MAX else "NOT met")
                out.append((loop, backend, load, "idle CPU, max of rounds",
                            (idle[0],), (idle[1],), None, verdict))
    return out


def print_contention(data, p, args, configs, reported_default):
    c = data.get("contention") or {}
    rows = contention_verdicts(data, p, args, configs)
    if not rows:
        return None
    kinds = load_kinds()
    cores = c.get("load_cores", {})
    print("Contention: spin on (library default) against off "
          "(AIOBRIDGE_SPIN_US=0), both measured beside the same running "
          "load;")
    print("ops/s = median of %d round(s) x %d rep(s) of %.2f s; CPU = "
          "process CPU time (Python + runtime threads) per op, in us;"
          % (p["c_rounds"], p["c_reps"], p["c_rep_s"]))
    print("verdict: spin-on below spin-off by more than %d%% is WORSE when "
          "its rounds (fresh processes) lie below spin-off's beyond chance "
          "(one-sided Mann-Whitney over the rounds, p < %.2f), else within "
          "noise; idle CPU over %.1f s must stay <= %.1f%% of it"
          % (SPIN_NOISE * 100, SPIN_P, p["c_idle_s"], IDLE_CPU_PCT_MAX))
    la0, la1 = c.get("loadavg_start"), c.get("loadavg_end")
    if la0 is not None and la1 is not None:
        print("machine: %d CPUs; 1-minute load average %.2f before the "
              "contention rows, %.2f after (their own load included; other "
              "work on the machine skews every row)"
              % (c.get("ncpu", 0), la0, la1))
    if args.quick:
        print("--quick: one short repetition per figure; under load its "
              "verdicts are noise, run without --quick to judge")
    worse, unjudged = [], []
    last = None
    w = 34
    for (loop, backend, load, label, on, off, r, verdict) in rows:
        head = (loop, backend)
        if head != last:
            last = head
            print()
            print("%s, backend %s" % (loop, backend or reported_default
                                      or "default"))
            print("%-36s %-*s %11s %8s %11s %8s %7s  %s" % (
                "load (CPUs the load used)", w, "row", "on ops/s", "CPU/op",
                "off ops/s", "CPU/op", "on/off", "verdict"))
            print("-" * 130)
        lk = contention_key(loop, backend, load, "")
        loadname = "%s (%.2f)" % (kinds[load][0], cores.get(lk, 0.0))
        if label.startswith("sleep(0)"):
            shown_load = loadname
        else:
            shown_load = ""
        if r is None:  # the idle row
            print("%-36s %-*s %11s %8s %11s %8s %7s  %s" % (
                shown_load, w, label, fmt(on[0], "us2") + "%", "",
                fmt(off[0], "us2") + "%", "", "", verdict))
        else:
            print("%-36s %-*s %11s %8s %11s %8s %7s  %s" % (
                shown_load, w, label, fmt(on[0], "ops"), fmt(on[1], "us2"),
                fmt(off[0], "ops"), fmt(off[1], "us2"), fmt(r, "x"),
                verdict))
        where = "%s/%s/%s: %s %s" % (loop, backend or "default", load,
                                     label, verdict)
        if verdict.startswith("WORSE") or verdict == "NOT met":
            worse.append(where)
        elif verdict == "too few rounds":
            unjudged.append(where)
    print()
    if unjudged:
        print("Below spin-off by more than %d%%, with too few rounds to "
              "judge (--contention-rounds 4 or more):" % (SPIN_NOISE * 100))
        for x in unjudged:
            print("  " + x)
    if worse:
        print("The spin made these rows worse than spin-off, or the idle "
              "runtime used CPU:")
        for x in worse:
            print("  " + x)
    elif not unjudged:
        print("The spin made no contention row worse than spin-off (beyond "
              "%d%% and beyond chance over the rounds), and the idle process "
              "stayed within %.1f%% CPU." % (SPIN_NOISE * 100,
                                              IDLE_CPU_PCT_MAX))
    return worse


def main():
    ap = argparse.ArgumentParser(
        description="aiobridge asyncio bridge benchmark (see the module "
        "docstring for what is measured)")
    ap.add_argument("--quick", action="store_true",
                    help="small counts, a smoke run of about 20 s")
    ap.add_argument("--loops", default="asyncio,uvloop",
                    help="comma-separated loop kinds (asyncio, uvloop)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated runtime backends to run the bridge "
                    "on (sets AIOBRIDGE_BACKEND); default: leave it as is")
    ap.add_argument("--spin-us", default=None,
                    help="comma-separated AIOBRIDGE_SPIN_US values to run "
                    "the bridge with; default: leave it as is")
    ap.add_argument("--contention-loops", default="asyncio",
                    help="comma-separated loop kinds to run the contention "
                    "rows on (empty: none); default asyncio")
    ap.add_argument("--contention-loads", default="none,1proc,2proc,over",
                    help="comma-separated contention loads: none, 1proc, "
                    "2proc (busy processes), over (one process with 2x CPUs "
                    "busy threads)")
    ap.add_argument("--contention-rounds", type=int, default=None,
                    help="spin on/off pairs per contention load (fresh "
                    "processes; default 5, --quick 1); at least 3 for a "
                    "verdict of WORSE")
    ap.add_argument("--sections", default="main,contention",
                    help="comma-separated: main (baselines, bridge, RSS, "
                    "targets), contention (the contention rows)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the raw figures to PATH as JSON")
    # Internal: a measurement section in a child process.
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--loop", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-kind", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        return worker_main(args)

    started = time.monotonic()
    p = dict(QUICK if args.quick else FULL)
    if args.contention_rounds is not None:
        if args.contention_rounds < 1:
            ap.error("--contention-rounds must be at least 1")
        p["c_rounds"] = args.contention_rounds
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    for loop in loops:
        if loop not in ("asyncio", "uvloop"):
            ap.error("unknown loop kind %r" % loop)
    skipped = []
    if "uvloop" in loops:
        ok, why = uvloop_status()
        if ok:
            uvloop_version = why
        else:
            loops.remove("uvloop")
            skipped.append("uvloop skipped: cannot import uvloop (%s)" % why)
            uvloop_version = None
    else:
        uvloop_version = None
    if not loops:
        print("\n".join(skipped))
        print("no loop kind to measure")
        return 1

    args.sections = [x.strip() for x in args.sections.split(",")
                     if x.strip()]
    for sec in args.sections:
        if sec not in ("main", "contention"):
            ap.error("unknown section %r (main, contention)" % sec)
    for load in [x.strip() for x in args.contention_loads.split(",")
                 if x.strip()]:
        if load not in load_kinds():
            ap.error("unknown contention load %r (none, 1proc, 2proc, over)"
                     % load)
    cloops = []
    for loop in [x.strip() for x in args.contention_loops.split(",")
                 if x.strip()]:
        if loop not in ("asyncio", "uvloop"):
            ap.error("unknown loop kind %r" % loop)
        if loop == "uvloop" and not uvloop_status()[0]:
            skipped.append("contention rows on uvloop skipped: cannot import "
                           "uvloop")
            continue
        cloops.append(loop)
    args.contention_loops = ",".join(cloops)

    backends = [None]
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    spins = [None]
    if args.spin_us:
        try:
            spins = [int(s) for s in args.spin_us.split(",") if s.strip()]
        except ValueError:
            ap.error("--spin-us takes comma-separated integers")
    configs = [Config(b, s) for b in backends for s in spins]

    data = collect(args, p, loops, configs)
    elapsed = time.monotonic() - started

    # What each bridge worker reported about itself.
    reported = {}
    spin_in_binary = None
    for loop in loops:
        for cfg in configs:
            r = data["bridge"].get("%s/%s" % (loop, cfg.key())) or {}
            reported[(loop, cfg.key())] = r.get("_backend")
            if r.get("_spin_env_in_binary") is not None:
                spin_in_binary = r["_spin_env_in_binary"]
            st = r.get("_stats")
            if isinstance(st, dict) and st.get("tasks_live"):
                skipped.append("warning: %s %s: %d tasks still live at the "
                               "end" % (loop, cfg.key(), st["tasks_live"]))

    env_spin = os.environ.get("AIOBRIDGE_SPIN_US")
    if args.spin_us:
        spin_desc = "AIOBRIDGE_SPIN_US = %s (one column each)" % args.spin_us
    elif env_spin is not None:
        spin_desc = "AIOBRIDGE_SPIN_US=%s (from the environment)" % env_spin
    else:
        spin_desc = "AIOBRIDGE_SPIN_US unset (library default)"
    if spin_in_binary is not None and (args.spin_us or env_spin is not None):
        spin_desc += "; the extension %s the variable" % (
            "mentions" if spin_in_binary else
            "does NOT mention (so it has no effect)")
    backend_desc = ", ".join(sorted(set(
        str(v) for v in reported.values() if v))) or "n/a (bridge not run)"

    print("aiobridge asyncio bridge benchmark%s" % (
        " (--quick)" if args.quick else ""))
    print("date:     %s" % datetime.datetime.now().strftime(
        "%Y-%m-%d %H:%M:%S"))
    print("python:   %s (%s), %s" % (platform.python_version(),
                                     sys.executable, platform.machine()))
    print("loops:    %s%s" % (", ".join(loops), (
        "; uvloop %s" % uvloop_version) if uvloop_version else ""))
    print("backend:  %s" % backend_desc)
    print("spin:     %s" % spin_desc)
    print("host:     %d CPUs, GIL switch interval %.1f ms" % (
        os.cpu_count() or 0, sys.getswitchinterval() * 1e3))
    print("method:   ops/s = median of %d reps; latencies over all samples;"
          " RSS = VmHWM growth / N in a fresh process" % p["reps"])
    if len(configs) > 1:
        print("note:     baseline rows do not depend on the bridge setting;"
              " they are measured once per loop kind and repeated")
    for s in skipped:
        print(s)
    print()
    if "main" in args.sections:
        cols, rows = build_rows(data, p, loops, configs)
        print_table(cols, rows, reported)
        print()
        tloop = "asyncio" if "asyncio" in loops else loops[0]
        for cfg in configs:
            print("Targets on %s, %s:" % (
                "stock asyncio" if tloop == "asyncio" else tloop +
                " (asyncio not measured)",
                cfg.label(reported.get((tloop, cfg.key())))))
            for line in targets(data, p, tloop, cfg):
                print(line)
        print()
    worse = print_contention(data, p, args, configs, backend_desc)
    if worse is not None:
        print()
    print("elapsed: %.1f s" % elapsed)

    if args.json:
        out = {
            "date": datetime.datetime.now().isoformat(),
            "python": platform.python_version(),
            "executable": sys.executable,
            "quick": args.quick,
            "params": p,
            "loops": loops,
            "configs": [{"key": c.key(), "env": c.env()} for c in configs],
            "skipped": skipped,
            "elapsed_s": elapsed,
            "raw": data,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        print("raw figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
