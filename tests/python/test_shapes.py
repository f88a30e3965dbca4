"""The short forms of an async C function, names and precise errors.

Shape 1: an awaitable completed by a callback (aiob_py_promise_new), driven
from Python through demo.promise() and its Completer. Shape 2: blocking C
work on the runtime's worker threads (aiob_py_run_blocking), through
demo.blocking_read / blocking_sum. Shape 3 (aiob_task_forward) is how
demo.await_py passes on what it awaited. Then CTask names in repr and in
asyncio's own messages, and the errors of aiob_task_fail and friends.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the backend.
"""
import asyncio
import errno
import gc
import logging
import os
import sys
import threading
import unittest
import weakref

import aiobridge
import aiobridge_demo as demo
from test_bridge import LOOP, BridgeCase, references_leaked, wait_until


async def outcome(aw):
    """What awaiting aw gives: ("ok", value) or ("raised", exception)."""
    try:
        return "ok", await asyncio.wait_for(aw, 60)
    except BaseException as e:  # noqa: B902 - CancelledError included
        return "raised", e


class TestPromise(BridgeCase):
    async def test_completed_before_and_after_the_await(self):
        aw, c = demo.promise()
        self.assertEqual(c.complete("early"), 0)
        self.assertEqual(await aw, "early")
        aw, c = demo.promise()
        asyncio.get_running_loop().call_later(0.001, c.complete, ["late"])
        self.assertEqual(await aw, ["late"])

    async def test_completed_from_a_thread_without_the_gil(self):
        aw, c = demo.promise()
        fut = asyncio.ensure_future(aw)
        await asyncio.sleep(0)
        self.assertEqual(c.complete_in_thread(41), 0)
        self.assertEqual(await fut, 41)

    async def test_errno_with_file_names_exception_and_abandon(self):
        aw, c = demo.promise()
        c.fail(errno.ENOENT, "no/such.txt")
        kind, e = await outcome(aw)
        self.assertIsInstance(e, FileNotFoundError)
        self.assertEqual((e.errno, e.filename, e.filename2), (errno.ENOENT, "no/such.txt", None))
        try:
            open("no/such.txt")
        except FileNotFoundError as real:
            self.assertEqual(str(e), str(real))  # what open() itself says

        aw, c = demo.promise()
        c.fail(errno.EXDEV, "a", "b")
        kind, e = await outcome(aw)
        self.assertEqual((type(e), e.errno, e.filename, e.filename2), (OSError, errno.EXDEV, "a", "b"))
        self.assertIn("'a' -> 'b'", str(e))

        aw, c = demo.promise()
        c.raise_value_error("bad input")
        kind, e = await outcome(aw)
        self.assertEqual((type(e), str(e)), (ValueError, "bad input"))

        aw, c = demo.promise()
        c.abandon()
        kind, e = await outcome(aw)
        self.assertIsInstance(e, asyncio.CancelledError)

    async def test_messages_that_are_not_utf8(self):
        # A localized C message need not be UTF-8: the requested type is
        # raised anyway, bad bytes replaced.
        aw, c = demo.promise()
        c.raise_value_error(b"caf\xe9 closed")
        kind, e = await outcome(aw)
        self.assertEqual((type(e), str(e)), (ValueError, "caf\ufffd closed"))

    async def test_bugs_in_a_producer_are_system_errors(self):
        # AIOB_PY_EXCEPTION by hand, with a value that is no exception.
        aw, c = demo.promise("test.bad_status")
        c.complete_with_status(-100000, object())
        kind, e = await outcome(aw)
        self.assertIsInstance(e, SystemError)
        self.assertIn("test.bad_status failed with AIOB_PY_EXCEPTION but carried no exception", str(e))
        # A converter returning NULL without an exception: not a cancellation.
        aw, c = demo.promise("test.bad_conv", broken_conv=True)
        c.complete(1)
        kind, e = await outcome(aw)
        self.assertIsInstance(e, SystemError)
        self.assertIn("the converter of test.bad_conv returned NULL", str(e))

    async def test_a_refused_completion_keeps_the_side(self):
        aw, c = demo.promise()
        with self.assertRaises(ValueError):
            c.fail(0)  # no errno: refused before the side is given up
        c.fail(errno.EPERM)
        kind, e = await outcome(aw)
        self.assertIsInstance(e, PermissionError)

    async def test_a_completer_completes_once(self):
        aw, c = demo.promise()
        c.complete(1)
        with self.assertRaisesRegex(ValueError, "already completed"):
            c.complete(2)
        self.assertEqual(await aw, 1)

    async def test_cancel_calls_on_cancel_once_without_the_gil(self):
        before, before_gil, dones = demo.promise_cancels()
        aw, c = demo.promise("test.cancelled")
        fut = asyncio.ensure_future(aw)
        await asyncio.sleep(0)
        fut.cancel()
        kind, e = await outcome(fut)
        self.assertIsInstance(e, asyncio.CancelledError)
        self.assertTrue(await wait_until(lambda: demo.promise_cancels()[0] == before + 1))
        # On a runtime loop thread: never with the GIL.
        self.assertEqual(demo.promise_cancels(), (before + 1, before_gil, dones + 1))
        # The producer still completes; the value is freed without Python
        # on this thread's side (released later, through the deferred list).
        class Value:
            pass

        v = Value()
        gone = weakref.ref(v)
        self.assertEqual(c.complete(v), 0)
        del v
        self.assertTrue(await wait_until(lambda: gc.collect() is not None and gone() is None))
        await asyncio.sleep(0.01)
        self.assertEqual(demo.promise_cancels(), (before + 1, before_gil, dones + 1))  # once

    async def test_on_done_not_cancelled_once_completed(self):
        before, _, dones = demo.promise_cancels()
        for _ in range(50):
            aw, c = demo.promise()
            fut = asyncio.ensure_future(aw)
            c.complete(7)  # completed: a cancel now must not call on_cancel
            fut.cancel()
            await outcome(fut)
        # Each told the producer once, none as cancelled.
        self.assertTrue(await wait_until(lambda: demo.promise_cancels()[2] == dones + 50))
        self.assertEqual(demo.promise_cancels()[0], before)

    async def test_dropped_completer_abandons(self):
        aw, c = demo.promise()
        del c
        gc.collect()
        kind, e = await outcome(aw)
        self.assertIsInstance(e, asyncio.CancelledError)

    async def test_many_completed_from_threads_some_cancelled(self):
        before, _, dones = demo.promise_cancels()
        pairs = [demo.promise() for _ in range(400)]
        futs = [asyncio.ensure_future(aw) for aw, _ in pairs]
        await asyncio.sleep(0)
        for i, f in enumerate(futs):
            if i % 3 == 0:
                f.cancel()
        threads = [threading.Thread(target=lambda cs=pairs[k::4]: [c.complete_in_thread(7) for _, c in cs])
                   for k in range(4)]
        for t in threads:
            t.start()
        results = await asyncio.gather(*futs, return_exceptions=True)
        for t in threads:
            t.join()
        for i, r in enumerate(results):
            if i % 3 == 0:
                self.assertIsInstance(r, asyncio.CancelledError)
            else:
                self.assertEqual(r, 7)
        ncancelled = len(range(0, 400, 3))
        self.assertTrue(await wait_until(lambda: demo.promise_cancels()[2] == dones + 400))
        # A cancel that reached the C task after the thread's completion is
        # no cancellation for the producer: at most the cancelled third.
        self.assertLessEqual(demo.promise_cancels()[0] - before, ncancelled)


class TestPromiseUnbound(unittest.TestCase):
    def test_collected_unawaited_calls_on_cancel_with_the_gil(self):
        before, before_gil, dones = demo.promise_cancels()
        aw, c = demo.promise()  # no running loop: never started
        del aw
        gc.collect()
        self.assertEqual(demo.promise_cancels(), (before + 1, before_gil + 1, dones + 1))
        self.assertEqual(c.complete("late"), 0)  # freed, nobody awaits

    def test_awaited_later_by_asyncio_run(self):
        aw, c = demo.promise()
        c.complete("ok")
        self.assertEqual(asyncio.run(aw), "ok")


class TestBlocking(BridgeCase):
    async def test_result_and_error(self):
        self.assertEqual(await demo.blocking_sum(100_000), sum(range(100_000)))
        r, w = os.pipe()
        try:
            fut = asyncio.ensure_future(demo.blocking_read(r))
            os.write(w, b"\x2a")
            self.assertEqual(await fut, 42)
        finally:
            os.close(r)
            os.close(w)
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
        kind, e = await outcome(demo.blocking_read(fd))
        self.assertIsInstance(e, OSError)
        self.assertEqual(e.errno, errno.EBADF)

    async def test_more_jobs_than_workers(self):
        n = 4 * aiobridge.runtime_info(demo)["blocking_threads"] + 3
        got = await asyncio.gather(*[demo.blocking_sum(i * 1000) for i in range(n)])
        self.assertEqual(got, [sum(range(i * 1000)) for i in range(n)])

    async def test_cancelled_before_start_never_runs(self):
        await demo.ready()  # the runtime runs: runtime_info knows its pool
        workers = aiobridge.runtime_info(demo)["blocking_threads"]
        pipes = [os.pipe() for _ in range(workers + 5)]
        try:
            base = demo.blocking_runs()
            busy = [asyncio.ensure_future(demo.blocking_read(r)) for r, _ in pipes[:workers]]
            # Every worker blocks in read(2): the pool is full.
            self.assertTrue(await wait_until(lambda: demo.blocking_runs() == base + workers, 60))
            cancelled = demo.stats()["blocking_jobs_cancelled"]
            queued = [asyncio.ensure_future(demo.blocking_read(r)) for r, _ in pipes[workers:]]
            # One loop thread runs tasks in order: once a task spawned after
            # them is done, each queued job had its first poll (its job is
            # in the pool's queue, behind the busy workers).
            await demo.ready()
            for f in queued:
                f.cancel()
            # The cancellations reached the pool (on the loop thread) before
            # any worker is free to take a queued job.
            self.assertTrue(await wait_until(
                lambda: demo.stats()["blocking_jobs_cancelled"] == cancelled + len(queued), 60))
            for _, w in pipes:
                os.write(w, b"x")
            self.assertEqual(await asyncio.gather(*busy), [ord("x")] * workers)
            for f in queued:
                kind, e = await outcome(f)
                self.assertIsInstance(e, asyncio.CancelledError)
            await demo.blocking_sum(10)  # a later job runs after them
            # The cancelled jobs never ran: their bytes are still unread.
            self.assertEqual(demo.blocking_runs(), base + workers + 1)
            for r, _ in pipes[workers:]:
                self.assertEqual(os.read(r, 1), b"x")
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)

    async def test_cancel_while_running_stops_early(self):
        fut = asyncio.ensure_future(demo.blocking_sum(1 << 62))  # years of work
        base = demo.blocking_runs()
        self.assertTrue(await wait_until(lambda: demo.blocking_runs() >= base, 60))
        await asyncio.sleep(0.01)
        fut.cancel()
        kind, e = await outcome(fut)
        self.assertIsInstance(e, asyncio.CancelledError)
        # The worker saw aiob_blocking_cancelled() and is free again: as
        # many new jobs as workers all complete.
        workers = aiobridge.runtime_info(demo)["blocking_threads"]
        self.assertEqual(await asyncio.gather(*[demo.blocking_sum(3) for _ in range(workers)]), [3] * workers)


class TestNames(BridgeCase):
    async def test_repr_and_name(self):
        fut = demo.sleep_ms(60_000)
        self.assertEqual(repr(fut), "<CTask aiobridge_demo.sleep_ms pending>")
        self.assertEqual(fut.__name__, "aiobridge_demo.sleep_ms")
        self.assertEqual(fut.__qualname__, "aiobridge_demo.sleep_ms")
        fut.cancel()
        self.assertEqual(repr(fut), "<CTask aiobridge_demo.sleep_ms cancelled>")
        done = demo.echo(5)
        self.assertEqual(await done, 5)
        self.assertEqual(repr(done), "<CTask aiobridge_demo.echo finished result=5>")
        aw, c = demo.promise()  # no name
        self.assertEqual(repr(aw), "<CTask pending>")
        c.complete(None)
        await aw
        aw, c = demo.promise("myext.read_file")
        self.assertEqual(repr(aw), "<CTask myext.read_file pending>")
        c.complete(None)
        await aw
        self.assertIn("aiobridge_demo.blocking_sum", repr(demo.blocking_sum(1)))

    async def test_odd_names(self):
        aw, c = demo.promise(b"bad\xffname")  # not UTF-8: replaced, never raised
        self.assertEqual(aw.__name__, "bad\ufffdname")
        self.assertEqual(repr(aw), "<CTask bad\ufffdname pending>")
        task = asyncio.ensure_future(asyncio.shield(aw))
        t2 = asyncio.get_running_loop().create_task(aw)
        self.assertIn("bad\ufffdname", repr(t2))
        c.complete(None)
        await asyncio.gather(task, t2)
        aw, c = demo.promise("")  # empty: no name
        self.assertEqual((repr(aw), aw.__name__), ("<CTask pending>", "CTask"))
        c.complete(None)
        await aw

    async def test_in_a_task_repr(self):
        task = asyncio.ensure_future(asyncio.shield(demo.sleep_ms(60_000)))
        t2 = asyncio.get_running_loop().create_task(demo.sleep_ms(60_000))
        await asyncio.sleep(0)
        self.assertIn("aiobridge_demo.sleep_ms", repr(t2))
        self.assertNotIn("without __name__", repr(t2))
        task.cancel()
        t2.cancel()
        await asyncio.gather(task, t2, return_exceptions=True)

    async def test_exception_never_retrieved_names_the_task(self):
        self.loop_errors = []
        fut = demo.fail_errno(errno.EIO)
        self.assertTrue(await wait_until(fut.done))
        del fut
        gc.collect()
        self.assertEqual(len(self.loop_errors), 1)
        ctx = self.loop_errors.pop()
        self.assertEqual(ctx["message"], "CTask exception was never retrieved")
        self.assertIn("<CTask aiobridge_demo.fail_errno finished exception=", repr(ctx["future"]))


class TestNamesInAsyncioMessages(unittest.TestCase):
    """asyncio's own log lines, as a user reads them, with its default
    exception handler."""

    def new_loop(self):
        if LOOP == "uvloop":
            import uvloop

            return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def test_task_destroyed_but_pending(self):
        loop = self.new_loop()
        try:
            with self.assertLogs("asyncio", logging.ERROR) as logs:
                task = loop.create_task(demo.sleep_ms(60_000))
                loop.run_until_complete(asyncio.sleep(0.01))
                task._log_destroy_pending = True
                del task
                gc.collect()
        finally:
            loop.close()
        text = "\n".join(logs.output)
        self.assertIn("Task was destroyed but it is pending", text)
        self.assertIn("aiobridge_demo.sleep_ms", text)
        self.assertNotIn("without __name__", text)

    def test_debug_slow_callback(self):
        loop = self.new_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 0.0

        async def main():
            await demo.sleep_ms(1)

        try:
            with self.assertLogs("asyncio", logging.WARNING) as logs:
                loop.run_until_complete(main())
        finally:
            loop.close()
        slow = [line for line in logs.output if "Executing" in line]
        self.assertTrue(any("<CTask aiobridge_demo.sleep_ms" in line for line in slow), slow)


class TestErrors(BridgeCase):
    async def test_task_fail_with_a_non_negative_code(self):
        for status in (0, 5):
            kind, e = await outcome(demo.fail_status(status))
            self.assertIsInstance(e, SystemError)
            self.assertIn("aiobridge_demo.fail_status failed with a status >= 0", str(e))

    async def test_task_fail_with_an_unknown_code(self):
        kind, e = await outcome(demo.fail_status(-200000))
        self.assertIsInstance(e, SystemError)
        self.assertIn("-200000", str(e))
        self.assertIn("aiobridge_demo.fail_status", str(e))
        kind, e = await outcome(demo.fail_status(-4000))  # errno range
        self.assertEqual((type(e), e.errno), (OSError, 4000))

    async def test_shutdown_code_is_shutdown_error(self):
        kind, e = await outcome(demo.fail_errno(errno.ESHUTDOWN))
        self.assertIsInstance(e, aiobridge.ShutdownError)

    async def test_errno_with_file_names(self):
        kind, e = await outcome(demo.fail_path(errno.ENOENT, "missing.txt"))
        self.assertIsInstance(e, FileNotFoundError)
        self.assertEqual(e.filename, "missing.txt")
        self.assertEqual(str(e), "[Errno 2] No such file or directory: 'missing.txt'")
        kind, e = await outcome(demo.fail_path(errno.EXDEV, "from", "to"))
        self.assertEqual((e.filename, e.filename2), ("from", "to"))
        raw = os.fsdecode(b"caf\xe9")  # not UTF-8: escaped as os does it
        kind, e = await outcome(demo.fail_path(errno.EACCES, raw))
        self.assertIsInstance(e, PermissionError)
        self.assertEqual(e.filename, raw)

    async def test_await_py_of_a_non_awaitable_names_its_type(self):
        kind, e = await outcome(demo.await_py(5))
        self.assertIsInstance(e, TypeError)
        self.assertIn("'int'", str(e))

        class Thing:
            pass

        kind, e = await outcome(demo.await_py(Thing()))
        self.assertIn("'Thing'", str(e))

    async def test_forwarded_exception_keeps_type_and_traceback(self):
        async def broken():
            raise KeyError("k")

        kind, e = await outcome(demo.await_py(broken()))
        self.assertIsInstance(e, KeyError)
        self.assertIn("broken", "".join(__import__("traceback").format_tb(e.__traceback__)))


@unittest.skipUnless(hasattr(sys, "gettotalrefcount"), "needs a debug interpreter (python3-dbg)")
class TestShapesReferenceLeaks(unittest.TestCase):
    def test_shapes_do_not_leak(self):
        class V:
            pass

        async def work():
            for _ in range(50):
                aw, c = demo.promise("leak.check")
                c.complete(V())
                await aw
                aw, c = demo.promise()
                c.fail(errno.ENOENT, "f")
                try:
                    await aw
                except FileNotFoundError:
                    pass
                aw, c = demo.promise()
                fut = asyncio.ensure_future(aw)
                await asyncio.sleep(0)
                fut.cancel()
                c.complete(V())
                await demo.blocking_sum(10)
                try:
                    await demo.fail_path(errno.EACCES, "a", "b")
                except PermissionError:
                    pass
                try:
                    await demo.await_py(3)
                except TypeError:
                    pass
                repr(demo.sleep_ms(1))
            await demo.ready()

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over ~3500 calls")


if __name__ == "__main__":
    unittest.main()
