"""Shutdown with a deadline, loop threads that cannot stop, restart, exit.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the runtime's
backend. Every scenario runs in a fresh interpreter (run_child), as it leaves
an abandoned loop thread behind or ends the process.

A loop thread that cannot stop is made with a FIFO nobody opens for writing:
demo.stuck_fifo_open (uv backend: a libuv fs request on the runtime's uv
loop, which keeps the loop from closing) or demo.block_loop_on_fifo (every
backend: a C task that blocks its loop thread in open(2)); demo.fifo_waits()
says when it got that far. Opening the FIFO with O_RDWR unsticks it.
"""
import os
import textwrap
import unittest

import aiobridge_demo as demo
from test_hostile import ChildCase, last_json, run_child

# Child helpers: a FIFO, its unsticking, the abandoned-thread count, and an
# awaited Python coroutine that records its cancellation.
HELPERS = """
import errno, functools, tempfile
fifo = os.path.join(tempfile.mkdtemp(), "fifo")
os.mkfifo(fifo)
events = []
writers = []

def unstick():
    # O_RDWR never blocks, and is a writer for the reader blocked in
    # open(2), or yet to come (kept open until the process ends).
    writers.append(os.open(fifo, os.O_RDWR))

def stuck(n=1):
    # The stuck tasks made their request, or are about to block: their loop
    # thread cannot stop any more.
    return demo.fifo_waits() >= n

def abandoned():
    return aiobridge.runtime_info(demo)["abandoned_threads"]

async def until(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.001)

async def forever(started):
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        events.append("python cancelled")
        raise

async def outcome(fut):
    try:
        return repr(await asyncio.wait_for(fut, 30))
    except BaseException as e:
        return type(e).__name__ + ": " + str(e)
"""

NATIVE_SKIP = "stuck_fifo_open needs the uv backend (libevent has no requests; io_uring cancels them when its loop closes)"


def backend():
    return demo.backend()


def run_with_helpers(body):
    return run_child(HELPERS + textwrap.dedent(body))


class TestShutdownDeadline(ChildCase):
    def test_native_request_times_out_then_restarts(self):
        """uv: a libuv fs request that never completes keeps the loop from
        closing. shutdown(timeout) returns at its deadline with
        ShutdownTimeoutError saying what is left; C tasks in flight fail with
        ShutdownError, the C-awaited coroutine is cancelled; a fresh runtime
        starts on next use; once unstuck, the abandoned thread ends."""
        if backend() != "uv":
            self.skipTest(NATIVE_SKIP)
        p = run_with_helpers("""
        async def main():
            started = asyncio.Event()
            futs = [asyncio.ensure_future(demo.sleep_ms(60_000)),
                    asyncio.ensure_future(demo.await_py(forever(started))),
                    asyncio.ensure_future(demo.stuck_fifo_open(fifo))]
            await started.wait()
            await until(stuck, "the request")
            await until(lambda: demo.stats()["tasks_live"] == 3, "3 live tasks")
            try:
                aiobridge.shutdown(demo, timeout=0.2)
                err = None
            except aiobridge.ShutdownTimeoutError as e:
                err = e
            res = {"raised": err is not None,
                   "timeout_error": isinstance(err, TimeoutError),
                   "errno": getattr(err, "errno", None) == errno.ETIMEDOUT,
                   "left": getattr(err, "left", None),
                   "message": str(err)}
            res["outcomes"] = [await outcome(f) for f in futs]
            await until(lambda: events, "the coroutine's cancellation")
            res["events"] = events
            info = aiobridge.runtime_info(demo)
            res["after"] = [info["running"], info["abandoned_threads"]]
            res["restart"] = await demo.echo("again")
            res["running"] = aiobridge.runtime_info(demo)["running"]
            unstick()
            await until(lambda: abandoned() == 0, "the abandoned thread to end")
            return res
        print(json.dumps(asyncio.run(main())))
        """)
        self.assertChildOk(p)
        self.assertEqual(p.stderr, "")
        r = last_json(p)
        self.assertTrue(r["raised"] and r["timeout_error"] and r["errno"], r)
        left = r["left"]["aiobridge_demo"]
        self.assertEqual((left["loops"], left["loops_left"]), (1, 1), r)
        # Dropped before the close got stuck (unless the deadline came first).
        self.assertLessEqual(left["tasks_left"], 3, r)
        self.assertIn("aiobridge_demo: 1 of 1 loop threads and 0 blocking workers "
                      "still running", r["message"])
        for o in r["outcomes"]:
            self.assertTrue(o.startswith("ShutdownError: "), r["outcomes"])
        self.assertEqual(r["events"], ["python cancelled"])
        self.assertEqual(r["after"], [False, 1])
        self.assertEqual((r["restart"], r["running"]), ("again", True))

    def test_blocked_loop_times_out_from_another_thread(self):
        """Every backend: a C task blocks its loop thread, so the loop never
        drops its tasks. shutdown(timeout), called from a thread that does
        not run the asyncio loop (the loop keeps running meanwhile), raises
        ShutdownTimeoutError; the C tasks the stuck loop will never finish
        fail with ShutdownError on their own loop; the Python coroutine a C
        task was awaiting there is cancelled; a fresh runtime starts."""
        p = run_with_helpers("""
        async def main():
            loop = asyncio.get_running_loop()
            started = asyncio.Event()
            awaiting = asyncio.ensure_future(demo.await_py(forever(started)))
            await started.wait()  # its C task sent the request, and waits
            futs = [awaiting,
                    asyncio.ensure_future(demo.block_loop_on_fifo(fifo)),
                    asyncio.ensure_future(demo.sleep_ms(60_000))]
            await until(stuck, "the loop thread to block")
            await until(lambda: demo.stats()["tasks_live"] == 3, "3 live tasks")
            def stop():
                try:
                    aiobridge.shutdown(timeout=0.2)
                except aiobridge.ShutdownTimeoutError as e:
                    return e.left
            left = await loop.run_in_executor(None, stop)
            res = {"left": left, "outcomes": [await outcome(f) for f in futs]}
            await until(lambda: events, "the coroutine's cancellation")
            res["events"] = events
            res["restart"] = await demo.await_py(asyncio.sleep(0, "again"))
            res["abandoned"] = abandoned()
            unstick()
            await until(lambda: abandoned() == 0, "the abandoned thread to end")
            return res
        print(json.dumps(asyncio.run(main())))
        """)
        self.assertChildOk(p)
        self.assertEqual(p.stderr, "")
        r = last_json(p)
        left = r["left"]["aiobridge_demo"]
        self.assertEqual((left["loops"], left["loops_left"]), (1, 1), r)
        self.assertGreaterEqual(left["tasks_left"], 3, r)
        for o in r["outcomes"]:
            self.assertEqual(o, "ShutdownError: aiobridge: the runtime was shut "
                                "down and its loop thread did not stop in time", r)
        self.assertEqual(r["events"], ["python cancelled"])
        self.assertEqual((r["restart"], r["abandoned"]), ("again", 1))

    def test_stuck_blocking_worker_times_out(self):
        """A blocking job stuck in read(2): the loop thread stops, the worker
        does not. shutdown(timeout) raises ShutdownTimeoutError naming the
        worker; the awaitable fails with ShutdownError; the worker is
        abandoned, and ends once its read returns; a fresh runtime starts
        with a fresh pool."""
        p = run_with_helpers("""
        async def main():
            r, w = os.pipe()
            stuck_read = asyncio.ensure_future(demo.blocking_read(r))
            await until(lambda: demo.blocking_runs() == 1, "the job to run")
            try:
                aiobridge.shutdown(timeout=0.2)
                err = None
            except aiobridge.ShutdownTimeoutError as e:
                err = e
            res = {"left": getattr(err, "left", None), "message": str(err),
                   "outcome": await outcome(stuck_read),
                   "abandoned": abandoned()}
            os.write(w, b"x")  # the read returns: the worker ends
            await until(lambda: abandoned() == 0, "the abandoned worker to end")
            res["restart"] = await demo.blocking_sum(10)
            return res
        print(json.dumps(asyncio.run(main())))
        """)
        self.assertChildOk(p)
        self.assertEqual(p.stderr, "")
        r = last_json(p)
        left = r["left"]["aiobridge_demo"]
        self.assertEqual((left["loops_left"], left["workers_left"]), (0, 1), r)
        self.assertIn("0 of 1 loop threads and 1 blocking workers still running", r["message"])
        self.assertTrue(r["outcome"].startswith("ShutdownError"), r)
        self.assertEqual((r["abandoned"], r["restart"]), (1, 45), r)

    def test_unbounded_shutdown_releases_the_gil(self):
        """shutdown() without a deadline on a loop that only Python code in
        another thread can unblock: it returns (it waits without the GIL),
        and the C tasks that were in flight fail with ShutdownError."""
        p = run_with_helpers("""
        async def main():
            futs = [asyncio.ensure_future(demo.block_loop_on_fifo(fifo)),
                    asyncio.ensure_future(demo.sleep_ms(60_000))]
            await until(stuck, "the loop thread to block")
            await until(lambda: demo.stats()["tasks_live"] == 2, "2 live tasks")
            go = threading.Event()
            def writer():
                go.wait()
                time.sleep(0.05)  # most likely inside shutdown() by now
                unstick()
            t = threading.Thread(target=writer)
            t.start()
            go.set()
            aiobridge.shutdown()
            t.join()
            return [await outcome(f) for f in futs]
        print(json.dumps(asyncio.run(main())))
        """)
        self.assertChildOk(p)
        outcomes = last_json(p)
        # The blocked task returned (a writer came) but the shutdown was
        # under way: its result is discarded or it was dropped; either way
        # its awaiter sees the shutdown, or its None result.
        self.assertIn(outcomes[0], ("None", "ShutdownError: aiobridge: the runtime was shut down"))
        self.assertEqual(outcomes[1], "ShutdownError: aiobridge: the runtime was shut down")

    def test_arguments(self):
        """timeout: None, inf or a number of seconds >= 0."""
        p = run_child("""
        import math
        bad = []
        for t, exc in ((-1, ValueError), (float("nan"), ValueError), ("1", TypeError)):
            try:
                aiobridge.shutdown(timeout=t)
                bad.append(repr(t))
            except exc:
                pass
        aiobridge.shutdown(timeout=math.inf)
        aiobridge.shutdown(demo, 0)  # nothing running: nothing left
        assert asyncio.run(demo.echo(1)) == 1
        aiobridge.shutdown(timeout=30)
        print(json.dumps(bad))
        """)
        self.assertChildOk(p)
        self.assertEqual(last_json(p), [])


class TestExit(ChildCase):
    """Interpreter exit with a loop thread that cannot stop: the exit hook
    waits a bounded time, abandons it, and the process ends with its status
    and nothing on stderr (libuv's destructor, which would join the stuck
    threadpool thread, does not run)."""

    CHILD = """
    async def main():
        keep = [asyncio.ensure_future(demo.sleep_ms(60_000)),
                asyncio.ensure_future(demo.await_py(asyncio.sleep(60)))]
        if os.environ["HOW"] == "worker":  # a blocking job stuck in read(2)
            r, w = os.pipe()
            keep.append(asyncio.ensure_future(demo.blocking_read(r)))
            await until(lambda: demo.blocking_runs() == 1, "the job to run")
            await until(lambda: demo.stats()["tasks_live"] == 3, "3 live tasks")
        else:
            keep.append(asyncio.ensure_future(
                demo.stuck_fifo_open(fifo) if os.environ["HOW"] == "native"
                else demo.block_loop_on_fifo(fifo)))
            await until(stuck, "the stuck request or loop thread")
        await until(lambda: demo.stats()["tasks_live"] == 3, "3 live tasks")
        print("leaving", flush=True)
        if os.environ["STATUS"] != "0":
            sys.exit(int(os.environ["STATUS"]))
    asyncio.run(main())
    """

    def exit_with(self, how, status):
        os.environ.update(HOW=how, STATUS=str(status))
        try:
            p = run_with_helpers(self.CHILD)
        finally:
            del os.environ["HOW"], os.environ["STATUS"]
        self.assertEqual((p.returncode, p.stdout, p.stderr), (status, "leaving\n", ""))

    def test_exit_with_a_blocked_loop_thread(self):
        self.exit_with("block", 0)
        self.exit_with("block", 3)

    def test_exit_with_a_stuck_blocking_worker(self):
        self.exit_with("worker", 0)
        self.exit_with("worker", 3)

    def test_exit_with_a_stuck_native_request(self):
        if backend() != "uv":
            self.skipTest(NATIVE_SKIP)
        self.exit_with("native", 0)
        self.exit_with("native", 3)

    def test_exit_after_an_abandoned_thread_got_unstuck(self):
        """The abandoned thread ends before exit: the process then exits
        normally (its C destructors run)."""
        p = run_with_helpers("""
        async def main():
            blocked = asyncio.ensure_future(demo.block_loop_on_fifo(fifo))
            await until(stuck, "the loop thread to block")
            try:
                aiobridge.shutdown(timeout=0.05)
            except aiobridge.ShutdownTimeoutError:
                pass
            unstick()
            await until(lambda: abandoned() == 0, "the abandoned thread to end")
            # Its poll returned after all: the result, or the shutdown.
            print(await outcome(blocked))
        asyncio.run(main())
        """)
        self.assertChildOk(p)
        self.assertEqual(p.stderr, "")
        self.assertIn(p.stdout.split(":")[0].strip(), ("None", "ShutdownError"))


if __name__ == "__main__":
    unittest.main()
