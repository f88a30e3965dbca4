"""Interpreter exit under stress: many fresh processes that await C tasks and
C-awaited Python coroutines and then exit normally, some with tasks still in
flight, some with a loop thread that cannot stop (a stuck native request).

    python stress_exit.py [--processes 300] [--jobs N] [--timeout 60]
                          [--scenarios thread,done,...]

Run with the extension's build directory on PYTHONPATH; AIOB_TEST_LOOP=uvloop
runs the children on uvloop, AIOBRIDGE_BACKEND picks the runtime's backend.
Every child must exit with status 0 (or the status it asked for), print
nothing on stderr, and end within --timeout seconds (a generous bound: a
child that hangs is killed and reported). Exit times per scenario are
printed for information, never asserted. Exit status: 0 when every child
behaved, 1 otherwise.

Scenarios (child i runs the i-th of them, in turn):
  done       every C task and C await finished; asyncio.run returns
  in_flight  C sleeps and C awaits of Python coroutines still in flight
  sys_exit   the same, leaving by sys.exit(0) inside the running loop
  status     the same, leaving by sys.exit(3): the status must survive
  stuck      in flight, plus a loop thread that cannot stop: on the uv
             backend a libuv fs open of a FIFO with no writer (the uv loop
             cannot close until it completes); on the others a C task that
             blocks its loop thread in open(2) of such a FIFO (libevent has
             no requests, and io_uring cancels its own when its loop closes)
  stuck_status  the same, leaving by sys.exit(4)
  thread     a daemon thread's loop awaits C tasks while the main thread
             leaves
  thread_local  the same with loop-local C tasks, some due while the
             interpreter finalizes: in the shared form (uvloop, uv backend)
             their timers are libuv handles on the thread's loop; in the
             asyncio form the exit hook has the loop drop them first (a
             uvloop callback due after finalization crashes the process)
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

SCENARIOS = ["done", "in_flight", "sys_exit", "status", "stuck",
             "stuck_status", "thread", "thread_local"]

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, threading
    if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    import aiobridge, aiobridge_demo as demo

    scenario, fifo = sys.argv[1], sys.argv[2]

    async def py(x):
        await asyncio.sleep(0)
        return x

    async def work():
        assert await demo.echo(1) == 1
        assert await demo.await_py(py(2)) == 2
        assert await demo.await_py_n(lambda: py(3), 5) == 5
        await demo.sleep_ms(1)

    def in_flight():
        keep = [asyncio.ensure_future(demo.sleep_ms(60_000 + i)) for i in range(20)]
        keep += [asyncio.ensure_future(demo.await_py(asyncio.sleep(60))) for _ in range(5)]
        return keep

    async def main():
        await work()
        if scenario == "done":
            return
        keep = in_flight()
        if scenario.startswith("stuck"):
            stuck = (demo.stuck_fifo_open if demo.backend() == "uv"
                     else demo.block_loop_on_fifo)
            keep.append(asyncio.ensure_future(stuck(fifo)))
            for _ in range(30_000):  # until its loop thread cannot stop
                if demo.fifo_waits():
                    break
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.005)
        if scenario == "sys_exit":
            sys.exit(0)
        if scenario == "status":
            sys.exit(3)
        if scenario == "stuck_status":
            sys.exit(4)

    async def forever_runtime():
        await work()
        keep = in_flight()
        started.set()
        while True:
            await demo.sleep_ms(1)
            await demo.await_py(asyncio.sleep(0))

    async def forever_local():
        await work()
        keep = in_flight()
        keep += [asyncio.ensure_future(demo.local_sleep_ms(5 * i)) for i in range(100)]
        started.set()
        while True:
            coro = py(0)
            try:
                await demo.local_sleep_ms(1)
                await demo.local_await_py(coro)
            except aiobridge.ShutdownError:  # the exit hook ran: no new tasks
                coro.close()
                await asyncio.gather(*keep)

    if scenario.startswith("thread"):
        started = threading.Event()
        forever = forever_local if scenario == "thread_local" else forever_runtime
        def run():
            asyncio.run(forever())
        threading.Thread(target=run, daemon=True).start()
        if not started.wait(30):
            sys.exit("the thread's loop made no progress")
    asyncio.run(main())
    """
)

WANT_STATUS = {"status": 3, "stuck_status": 4}


def run_one(i, scenarios, tmp, timeout):
    scenario = scenarios[i % len(scenarios)]
    fifo = os.path.join(tmp, "fifo%d" % i)
    if scenario.startswith("stuck"):
        os.mkfifo(fifo)  # never opened for writing
    t0 = time.monotonic()
    with subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", CHILD,
                           scenario, fifo],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, err = p.communicate()
            hung = True
    took = time.monotonic() - t0
    problem = None
    if hung:
        problem = "hung for %ss" % timeout
    elif p.returncode != WANT_STATUS.get(scenario, 0):
        problem = "exit status %s" % p.returncode
    elif err:
        problem = "stderr not empty"
    if problem:
        problem = "child %d (%s): %s\nstdout:\n%s\nstderr:\n%s" % (
            i, scenario, problem, out, err)
    return scenario, took, problem


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=300)
    ap.add_argument("--jobs", type=int,
                    default=min(8, 2 * (os.cpu_count() or 1)),
                    help="children running at once (default: 2 per CPU, "
                         "at most 8: a stuck child mostly waits)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds before a child counts as hung")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of the scenarios to run")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error("unknown scenarios: %s" % ", ".join(sorted(unknown)))
    tmp = tempfile.mkdtemp(prefix="aiob-stress-")
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(args.jobs) as ex:
            results = list(ex.map(lambda i: run_one(i, scenarios, tmp, args.timeout),
                                  range(args.processes)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0
    problems = [r[2] for r in results if r[2]]
    print("%d children (%s, backend %s), %d at a time: %.1f s" % (
        args.processes, os.environ.get("AIOB_TEST_LOOP", "asyncio"),
        os.environ.get("AIOBRIDGE_BACKEND", "default"), args.jobs, wall))
    for s in SCENARIOS:
        times = [r[1] for r in results if r[0] == s]
        if times:
            print("  %-9s %3d runs, exit time median %.3f s, max %.3f s"
                  % (s, len(times), statistics.median(times), max(times)))
    for p in problems[:5]:
        print(p)
    print("%d of %d children misbehaved" % (len(problems), args.processes))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
