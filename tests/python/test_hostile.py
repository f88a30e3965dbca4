"""Regression tests for defects found by adversarial testing of the bridge.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the runtime's backend.
Scenarios that could crash, hang or print at exit run in a fresh interpreter
(see run_child) so a crash or hang fails one test instead of the runner.
"""
import asyncio
import json
import os
import signal
import sys
import textwrap
import time
import unittest

import aiobridge_demo as demo
import children
from test_bridge import wait_until

LOOP = os.environ.get("AIOB_TEST_LOOP", "asyncio")
if LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

# Every child starts like this: the same loop choice as the test run (the
# backend and PYTHONPATH come through the inherited environment).
CHILD_PRELUDE = """\
import asyncio, json, os, sys, threading, time, traceback, warnings
if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
import aiobridge
import aiobridge_demo as demo

def exit_code(status):
    # os.waitstatus_to_exitcode is new in 3.9.
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return -os.WTERMSIG(status)
"""


def run_child(body, timeout=60, python_args=()):
    """Runs `body` after CHILD_PRELUDE in a child interpreter (children.run)."""
    return children.run(CHILD_PRELUDE + textwrap.dedent(body), timeout=timeout,
                        python_args=python_args)


last_json = children.last_json


class ChildCase(unittest.TestCase):
    def assertChildOk(self, p):
        self.assertEqual(p.returncode, 0, "stdout:\n%s\nstderr:\n%s" % (p.stdout, p.stderr))
        self.assertNotIn("Fatal Python error", p.stderr)


class TestSharedUnboundCTask(ChildCase):
    """Two threads, each with its own loop, race for the same unbound CTask."""

    CHILD = """
    import collections
    ROUNDS = 200

    def classify(e):
        if isinstance(e, aiobridge.ShutdownError):
            return "ShutdownError"
        if isinstance(e, RuntimeError):
            return "RuntimeError"
        return "other:" + repr(e)

    AWAITING = threading.Event()  # set just before a first await

    def first_await(f):
        async def use():
            try:
                AWAITING.set()
                r = await f
            except RuntimeError as e:  # attached to a different loop
                return classify(e)
            return "None" if r is None else "value:" + repr(r)
        try:
            return asyncio.run(asyncio.wait_for(use(), 10))
        except asyncio.CancelledError:
            return "CancelledError"
        except asyncio.TimeoutError:
            return "timeout"

    def cancel(f):
        f.cancel()
        return "cancel"

    def cancel_when_awaited(f):
        # Aims at the window where the other thread binds f to its loop.
        if not AWAITING.wait(10):
            return "the other thread never awaited"
        return cancel(f)

    def run_round(f, actions):
        out = ["unset"] * len(actions)
        barrier = threading.Barrier(len(actions), timeout=30)
        def worker(k):
            try:
                barrier.wait()
                out[k] = actions[k](f)
            except BaseException as e:
                out[k] = "raised:" + repr(e)
        threads = [threading.Thread(target=worker, args=(k,), daemon=True)
                   for k in range(len(actions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            if t.is_alive():
                print(json.dumps({"hang": out}), flush=True)
                os._exit(2)
        return out

    summary = {"both_await": collections.Counter(), "await_cancel": collections.Counter(), "bad": []}
    print("phase: both await", flush=True)  # says where a crash happened
    for i in range(ROUNDS):
        f = demo.sleep_ms(1)  # unbound: made outside any loop
        a, b = run_round(f, [first_await, first_await])
        summary["both_await"][" ".join(sorted((a, b)))] += 1
        # The first to bind awaits to completion and gets None; the other gets
        # RuntimeError (a different loop) if f is still pending when it looks,
        # or None if f is already done by then (a done future's await does not
        # look at loops): both None is legitimate, both failing is not.
        if not ("None" in (a, b) and {a, b} <= {"None", "RuntimeError"} and f.done()):
            summary["bad"].append(["both_await", i, a, b, f.done()])
            break
    print("phase: await and cancel", flush=True)
    for i in range(ROUNDS):
        f = demo.sleep_ms(0.2)
        AWAITING.clear()
        a, b = run_round(f, [first_await, cancel if i % 2 else cancel_when_awaited])
        summary["await_cancel"][a] += 1
        if a not in ("None", "CancelledError") or b != "cancel" or not f.done():
            summary["bad"].append(["await_cancel", i, a, b, f.done()])
            break
    print(json.dumps(summary))
    """

    def test_two_threads_first_await_the_same_ctask(self):
        """Racing first awaits from two loops: one wins, the other gets
        RuntimeError (or the finished result), never a crash or a hang; a
        cancel from another thread racing the first await is safe too."""
        p = run_child(self.CHILD)
        self.assertChildOk(p)
        s = last_json(p)
        self.assertEqual(s["bad"], [], p.stderr)
        self.assertEqual(sum(s["both_await"].values()), 200, s)
        self.assertEqual(sum(s["await_cancel"].values()), 200, s)


class TestShutdownRace(ChildCase):
    """aiobridge.shutdown() while other threads start C tasks."""

    CHILD = """
    import collections, random
    WORKERS, RUNS = 3, 150
    counts = collections.Counter()
    bad = []
    lock = threading.Lock()
    done = threading.Event()
    # What each gather slot may resolve to besides its own result.
    EXPECTED = ("None", "1", "None")

    async def one():
        return await asyncio.wait_for(asyncio.gather(
            demo.sleep_ms(random.random()),
            demo.await_py(asyncio.sleep(0, 1)),
            demo.ready(),
            return_exceptions=True), 5)

    def label(x):
        if isinstance(x, aiobridge.ShutdownError):
            return "ShutdownError"
        if isinstance(x, asyncio.CancelledError):
            return "CancelledError"
        if x is None:
            return "None"
        if type(x) is int and x == 1:
            return "1"
        return "unexpected:" + repr(x)

    def worker():
        for _ in range(RUNS):
            try:
                res = asyncio.run(one())
            except aiobridge.ShutdownError:  # could not even start
                with lock:
                    counts["run:ShutdownError"] += 1
                continue
            except BaseException as e:
                with lock:
                    bad.append("asyncio.run raised " + repr(e))
                return
            with lock:
                counts["run:ok"] += 1
                for slot, x in enumerate(res):
                    got = label(x)
                    counts[got] += 1
                    if got not in (EXPECTED[slot], "ShutdownError", "CancelledError"):
                        bad.append("slot %d: %s" % (slot, got))

    def shutter():
        n = 0
        while not done.is_set():
            try:
                aiobridge.shutdown()
            except BaseException as e:
                bad.append("shutdown raised " + repr(e))
                return
            n += 1
            time.sleep(random.random() * 0.0002)  # pacing, not synchronisation
        counts["shutdowns"] = n

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
    stopper = threading.Thread(target=shutter, daemon=True)
    stopper.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join(45)
        if t.is_alive():
            print(json.dumps({"hang": dict(counts), "bad": bad}), flush=True)
            os._exit(2)
    done.set()
    stopper.join(10)
    try:  # the runtime restarts after all that
        assert asyncio.run(asyncio.wait_for(demo.sleep_ms(1), 10)) is None
        counts["after:ok"] = 1
    except BaseException as e:
        bad.append("after: " + repr(e))
    print(json.dumps({"counts": counts, "bad": bad}))
    """

    def test_shutdown_while_other_threads_start_c_tasks(self):
        """aiobridge.shutdown() racing C tasks started on three other threads:
        each outcome is a result, ShutdownError or CancelledError, and the
        runtime starts again afterwards."""
        p = run_child(self.CHILD)
        self.assertChildOk(p)
        s = last_json(p)
        self.assertEqual(s["bad"], [], p.stderr)
        c = s["counts"]
        self.assertEqual(c.get("run:ok", 0) + c.get("run:ShutdownError", 0), 450, c)
        self.assertEqual(c.get("after:ok"), 1, c)


class TestFork(ChildCase):
    """fork() of a process whose bridge runtime is running."""

    PARENT = """
    import signal
    warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)  # 3.12+
    BG = {bg}
    progress, bg_err = [0], []
    cond, stop = threading.Condition(), threading.Event()

    def bg():
        async def main():
            while not stop.is_set():
                await asyncio.wait_for(demo.sleep_ms(1), 10)
                with cond:
                    progress[0] += 1
                    cond.notify_all()
        try:
            asyncio.run(main())
        except BaseException as e:
            bg_err.append(repr(e))
            with cond:
                cond.notify_all()

    def wait_progress(n):
        with cond:
            return cond.wait_for(lambda: progress[0] >= n or bg_err, 30) and not bg_err

    loop = asyncio.new_event_loop()
    loop.run_until_complete(demo.sleep_ms(1))
    if BG:
        thread = threading.Thread(target=bg, daemon=True)
        thread.start()
        assert wait_progress(5), bg_err
    pid = os.fork()
    if pid == 0:
{child}
    deadline = time.monotonic() + 30
    while True:  # a bounded waitpid: a hung child is a result, not a hang
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    if done:
        summary = {{"child": exit_code(status)}}
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        summary = {{"child": "hung"}}
    try:
        loop.run_until_complete(asyncio.wait_for(demo.sleep_ms(1), 10))
        summary["main_loop"] = "ok"
    except BaseException as e:
        summary["main_loop"] = repr(e)
    if BG:
        with cond:
            n = progress[0]
        summary["bg_loop"] = "ok" if wait_progress(n + 20) else "stuck: %r" % bg_err
        stop.set()
        thread.join(30)
    loop.close()
    print(json.dumps(summary))
    """

    USE_BRIDGE = """
    try:
        asyncio.run(asyncio.wait_for(demo.sleep_ms(1), 10))
    except BaseException:
        traceback.print_exc()
        os._exit(3)
    sys.exit(0)
    """

    def check(self, child, bg=False):
        body = self.PARENT.format(bg=bg, child=textwrap.indent(textwrap.dedent(child), " " * 8))
        p = run_child(body)
        self.assertChildOk(p)
        want = {"child": 0, "main_loop": "ok"}
        if bg:
            want["bg_loop"] = "ok"
        self.assertEqual(last_json(p), want, p.stderr)
        self.assertNotIn("Traceback", p.stderr)

    def test_child_exits_normally(self):
        """A forked child's normal exit (atexit hooks run) leaves the parent's
        loop working."""
        self.check("sys.exit(0)")

    def test_child_exits_at_once(self):
        """A forked child's os._exit leaves the parent's loop working."""
        self.check("os._exit(0)")

    def test_child_uses_the_bridge(self):
        """A forked child awaiting C tasks works and leaves the parent's loop
        working."""
        self.check(self.USE_BRIDGE)

    def test_child_shuts_the_runtime_down(self):
        """aiobridge.shutdown() in a forked child does not stop the parent's."""
        self.check("aiobridge.shutdown()\nsys.exit(0)")

    def test_child_exits_while_parent_thread_runs_a_loop(self):
        """A loop on another parent thread keeps making progress after a forked
        child exits normally or shuts the runtime down."""
        for child in ("sys.exit(0)", "aiobridge.shutdown()\nsys.exit(0)"):
            with self.subTest(child=child):
                self.check(child, bg=True)

    CHILDREN = """
    warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)  # 3.12+
    import multiprocessing

    def use_bridge():
        async def main():
            await asyncio.wait_for(demo.sleep_ms(1), 10)
            return await asyncio.wait_for(demo.await_py(asyncio.sleep(0, "x")), 10)
        try:
            r = asyncio.run(main())
        except BaseException:
            traceback.print_exc()
            return 3
        return 0 if r == "x" else 4

    def in_child(body):
        # The child leaves with os._exit: its normal exit is TestFork's concern.
        pid = os.fork()
        if pid == 0:
            code = 5
            try:
                code = body()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return exit_code(os.waitpid(pid, 0)[1])

    def with_grandchild():
        return in_child(use_bridge) or use_bridge()

    def run_async(i):
        async def main():
            await asyncio.wait_for(demo.sleep_ms(1), 10)
            return await asyncio.wait_for(demo.echo(i), 10)
        return asyncio.run(main())

    def process_target():
        sys.exit(use_bridge())

    summary = {}
    asyncio.run(demo.sleep_ms(1))  # the parent's runtime is running
    summary["children"] = []
    for _ in range(5):
        summary["children"].append(in_child(use_bridge))
        if summary["children"][-1]:
            break  # each failure costs a 10 s timeout
    summary["grandchild"] = in_child(with_grandchild)
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2)
    try:
        summary["pool"] = pool.map_async(run_async, range(8)).get(60)
    except BaseException as e:
        summary["pool"] = repr(e)
    finally:
        pool.terminate()
        pool.join()
    proc = ctx.Process(target=process_target)
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
    summary["process"] = proc.exitcode
    summary["parent"] = asyncio.run(asyncio.wait_for(demo.echo("p"), 10))
    print(json.dumps(summary))
    """

    def test_forked_children_use_the_bridge(self):
        """After the parent started the runtime, forked children, a grandchild,
        a fork Pool and a fork Process can all await C tasks."""
        p = run_child(self.CHILDREN, timeout=120)
        self.assertChildOk(p)
        self.assertEqual(last_json(p), {
            "children": [0] * 5,
            "grandchild": 0,
            "pool": list(range(8)),
            "process": 0,
            "parent": "p",
        }, p.stderr)


class TestSleepDurations(unittest.IsolatedAsyncioTestCase):
    async def test_nan_and_negative_are_value_errors(self):
        """sleep_ms refuses NaN and negative durations at the call."""
        for v in (float("nan"), -1, -0.5, float("-inf")):
            with self.subTest(v=v), self.assertRaises(ValueError):
                demo.sleep_ms(v)

    async def test_huge_durations_sleep_forever(self):
        """+inf and durations past the clock's range sleep (until cancelled)
        instead of completing at once; wait_for's cancel frees the C task."""
        live = demo.stats()["tasks_live"]
        for v in (float("inf"), 1e300, 2e13):
            with self.subTest(v=v):
                f = demo.sleep_ms(v)
                with self.assertRaises(asyncio.TimeoutError):
                    await asyncio.wait_for(f, 0.05)
                self.assertTrue(f.cancelled())
                self.assertTrue(await wait_until(lambda: demo.stats()["tasks_live"] == live),
                                demo.stats())

    async def test_zero_completes(self):
        """A 0 ms sleep completes."""
        self.assertIsNone(await asyncio.wait_for(demo.sleep_ms(0), 10))


class TestNeverAwaitedWarning(ChildCase):
    """A C task awaiting a coroutine, cancelled or dropped before the
    coroutine started, says nothing, like a plain asyncio Task."""

    COROUTINES = """
    async def slow_c():
        await asyncio.sleep(3600)

    async def slow_plain():
        await asyncio.sleep(3600)

    async def control_recorded():
        pass

    async def control_stderr():
        pass
    """

    VARIANTS = COROUTINES + """
    import gc

    async def settle(live):
        deadline = time.monotonic() + 10
        while demo.stats()["tasks_live"] > live and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)

    async def cancel_at_once():
        f = demo.await_py(slow_c())
        f.cancel()

    async def cancel_after_a_turn():
        f = demo.await_py(slow_c())
        await asyncio.sleep(0)
        f.cancel()
        try:
            await f
        except asyncio.CancelledError:
            pass

    async def dropped():
        demo.await_py(slow_c())
        gc.collect()

    async def storm():
        fs = [demo.await_py(slow_c()) for _ in range(2000)]
        for f in fs:
            f.cancel()

    async def wait_for_timeout():
        try:
            await asyncio.wait_for(demo.await_py(slow_c()), 0)
        except asyncio.TimeoutError:
            pass

    async def plain_tasks():
        ts = [asyncio.ensure_future(slow_plain()) for _ in range(100)]
        for t in ts:
            t.cancel()
        await asyncio.gather(*ts, return_exceptions=True)

    async def control():
        control_recorded()  # dropped unawaited: must warn

    async def main():
        live = demo.stats()["tasks_live"]
        out = {}
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for variant in (cancel_at_once, cancel_after_a_turn, dropped, storm,
                            wait_for_timeout, plain_tasks, control):
                seen = len(w)
                await variant()
                await settle(live)
                warned = [str(m.message) for m in w[seen:]
                          if "never awaited" in str(m.message)]
                out[variant.__name__] = [len(warned)] + warned[:1]
        out["tasks_live"] = demo.stats()["tasks_live"] - live
        return out

    summary = asyncio.run(main())
    control_stderr()  # dropped unawaited: must warn on stderr
    print(json.dumps(summary))
    """

    EXIT_IN_FLIGHT = COROUTINES + """
    KEEP = []

    async def main():
        KEEP.extend(demo.await_py(slow_c()) for _ in range(20))
        await asyncio.sleep(0)
        KEEP.extend(demo.await_py(slow_c()) for _ in range(20))
        control_stderr()  # dropped unawaited: must warn on stderr
        sys.exit(0)  # with C tasks awaiting coroutines, some not yet started

    asyncio.run(main())
    """

    def assertOnlyControlOnStderr(self, p):
        noise = [l for l in p.stderr.splitlines() if "never awaited" in l]
        self.assertEqual(len(noise), 1, p.stderr)
        self.assertIn("control_stderr", noise[0], p.stderr)  # detection works

    def test_cancelled_or_dropped_before_start_is_silent(self):
        """No "coroutine ... was never awaited" when a C task awaiting a
        coroutine is cancelled, collected or timed out before it started."""
        p = run_child(self.VARIANTS, python_args=("-W", "always"))
        self.assertChildOk(p)
        s = last_json(p)
        self.assertEqual(s.pop("control")[0], 1, s)  # detection works
        self.assertEqual(s.pop("tasks_live"), 0, s)
        for variant, warned in s.items():  # [count, first message]
            with self.subTest(variant=variant):
                self.assertEqual(warned, [0])
        self.assertOnlyControlOnStderr(p)

    def test_exit_with_unstarted_awaits_in_flight_is_silent(self):
        """Interpreter exit with C tasks awaiting not-yet-started coroutines
        prints no "never awaited" warning."""
        p = run_child(self.EXIT_IN_FLIGHT, python_args=("-W", "always"))
        self.assertChildOk(p)
        self.assertOnlyControlOnStderr(p)


class TestQuietExit(ChildCase):
    """Interpreter exit with daemon threads running their own loops."""

    CHILD = """
    N = 4
    events = [threading.Event() for _ in range(N)]

    def run(ev):
        async def forever():
            i = 0
            while True:
                await demo.sleep_ms(1)
                await demo.await_py(asyncio.sleep(0))
                i += 1
                if i == 10:
                    ev.set()
        asyncio.run(forever())

    for ev in events:
        threading.Thread(target=run, args=(ev,), daemon=True).start()
    for ev in events:
        if not ev.wait(30):
            sys.exit("a loop thread made no progress")
    # returns: normal interpreter exit with the daemon loops running
    """

    def test_exit_with_daemon_threads_running_loops_is_quiet(self):
        """Interpreter exit with daemon threads inside asyncio.run awaiting C
        tasks prints nothing ("Exception in thread ..." with CancelledError or
        ShutdownError, and "never awaited", were seen)."""
        for i in range(10):
            p = run_child(self.CHILD, timeout=45)
            self.assertEqual((p.returncode, p.stderr), (0, ""), "run %d" % i)


class TestExitWakes(ChildCase):
    """A wake sent to a daemon thread's loop before the exit hook closed its
    port, and not yet taken: once taken, the loop must sleep again. (Left
    unread, the eventfd stayed readable and the loop spun on it to the very
    end of the process: uvloop then entered Python after finalization and
    crashed.)"""

    # Not after CHILD_PRELUDE: this exit function must be registered before
    # aiobridge registers its hook, so that it runs after that hook.
    CHILD = """
    import asyncio, atexit, json, selectors, sys, threading, time

    selects = [0]
    unblock = threading.Event()

    def after_the_hook():
        unblock.set()  # the loop thread goes back to its selector
        before = selects[0]
        time.sleep(0.3)  # without the GIL: the loop thread runs meanwhile
        print(json.dumps({"selects": selects[0] - before}), flush=True)

    atexit.register(after_the_hook)
    import aiobridge, aiobridge_demo as demo

    class CountingSelector(selectors.DefaultSelector):
        def select(self, timeout=None):
            selects[0] += 1
            return super().select(timeout)

    blocked = threading.Event()

    def block():  # a callback that blocks its loop thread, without the GIL
        blocked.set()
        unblock.wait()

    def run():
        loop = asyncio.SelectorEventLoop(CountingSelector())
        async def main():
            await demo.sleep_ms(0)  # the loop's port exists and is watched
            fut = asyncio.ensure_future(demo.sleep_ms(1))
            loop.call_soon(block)
            await fut
        loop.run_until_complete(main())

    threading.Thread(target=run, daemon=True).start()
    if not blocked.wait(30):
        sys.exit("the loop thread never blocked")
    # The C sleep finishes after its completion was sent to the blocked loop.
    for _ in range(30_000):
        if aiobridge.stats()["tasks_completed"] == 2:
            break
        time.sleep(0.001)
    else:
        sys.exit("the C sleep never finished")
    """

    def test_loop_sleeps_after_taking_a_wake_sent_before_exit(self):
        p = children.run(textwrap.dedent(self.CHILD), timeout=45)
        self.assertChildOk(p)
        self.assertEqual(p.stderr, "")
        # Asleep: the wake is taken once (by the loop or the hook) and its
        # future is never resolved. Spinning: thousands of selects.
        self.assertLessEqual(last_json(p)["selects"], 2, p.stdout)


class TestInterruptFromFactory(ChildCase):
    """KeyboardInterrupt and SystemExit raised on the loop thread."""

    CHILD = """
    def raise_(exc):
        raise exc

    async def coro_raising(exc):
        raise exc

    CASES = {
        "factory KeyboardInterrupt":
            lambda: demo.await_py_n(lambda: raise_(KeyboardInterrupt()), 1),
        "factory SystemExit":
            lambda: demo.await_py_n(lambda: raise_(SystemExit(7)), 1),
        "coroutine KeyboardInterrupt":
            lambda: demo.await_py(coro_raising(KeyboardInterrupt())),
        "coroutine SystemExit":
            lambda: demo.await_py(coro_raising(SystemExit(7))),
    }

    # A coroutine that fails or cancels itself, then a factory that raises:
    # the C task's next request may be taken in the step where the
    # coroutine ended (always, for a loop-local task).
    async def failing():
        await asyncio.sleep(0)
        raise ValueError("failed")

    async def self_cancelling():
        await asyncio.sleep(0)
        asyncio.current_task().cancel()
        await asyncio.sleep(0)

    def then_raise(first, exc):
        calls = []
        def factory():
            calls.append(1)
            return first() if len(calls) == 1 else raise_(exc)
        return factory

    for each in ("await_py_each", "local_await_py_each"):
        for first in (failing, self_cancelling):
            CASES["%s %s then KeyboardInterrupt" % (each, first.__name__)] = (
                lambda each=each, first=first: getattr(demo, each)(
                    then_raise(first, KeyboardInterrupt()), 2))

    summary = {}
    for name, make in CASES.items():
        seen = []

        async def main():
            try:
                await make()
            except BaseException as e:  # delivered as an ordinary exception?
                seen.append(type(e).__name__)

        try:
            asyncio.run(main())
            escaped = None
        except BaseException as e:
            escaped = type(e).__name__
        try:
            usable = asyncio.run(asyncio.wait_for(demo.ready(), 10)) is None
        except BaseException as e:
            usable = repr(e)
        summary[name] = {"escaped": escaped, "seen": seen, "usable": usable}
    print(json.dumps(summary))
    """

    def test_interrupts_leave_the_loop(self):
        """KeyboardInterrupt / SystemExit from await_py_n's factory (called on
        the loop thread) leave asyncio.run as from any loop callback, instead
        of reaching the awaiting coroutine as an ordinary exception (which
        catches it here); from an awaited coroutine they already do. The
        interpreter stays usable."""
        p = run_child(self.CHILD)
        self.assertChildOk(p)
        s = last_json(p)
        cases = [("factory KeyboardInterrupt", "KeyboardInterrupt"),
                 ("factory SystemExit", "SystemExit"),
                 ("coroutine KeyboardInterrupt", "KeyboardInterrupt"),
                 ("coroutine SystemExit", "SystemExit")]
        cases += [("%s %s then KeyboardInterrupt" % (each, first), "KeyboardInterrupt")
                  for each in ("await_py_each", "local_await_py_each")
                  for first in ("failing", "self_cancelling")]
        for name, exc in cases:
            with self.subTest(case=name):
                got = s[name]
                self.assertEqual(got["escaped"], exc, got)
                self.assertEqual(got["usable"], True, got)
        self.assertNotIn("Exception in callback", p.stderr)


if __name__ == "__main__":
    unittest.main()
