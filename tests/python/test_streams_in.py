"""Python async iterators consumed by C tasks (aiob_py_aiter): the C tasks of
demo.sum_agen, demo.take_agen and demo.collect_agen pull the items of async
generators and of objects with __aiter__/__anext__.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the backend.
"""
import asyncio
import contextvars
import gc
import sys
import threading
import traceback
import unittest

import aiobridge_demo as demo
from test_bridge import BridgeCase, references_leaked, run_python, wait_until


async def numbers(n):
    for i in range(n):
        yield i


class Numbers:
    """An async iterator that is not a generator; counts its aclose()
    calls."""

    def __init__(self, n, fail_at=None):
        self.i, self.n, self.fail_at = 0, n, fail_at
        self.acloses = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.i == self.fail_at:
            raise LookupError("no item %d" % self.i)
        if self.i >= self.n:
            raise StopAsyncIteration
        self.i += 1
        await asyncio.sleep(0)
        return self.i - 1

    async def aclose(self):
        self.acloses += 1


class Tracked:
    """Async generators that record how they ended: in `ends`, what reached
    their finally block (None: exhausted), once per generator."""

    def __init__(self):
        self.ends = []

    async def gen(self, n=None, then=None, before=None, bad_at=None):
        """Yields 0..n-1 (forever if n is None; "x" instead of bad_at), then
        awaits `then` (a coroutine function) if given; `before` runs in the
        finally."""
        seen = None
        try:
            i = 0
            while n is None or i < n:
                yield "x" if i == bad_at else i
                i += 1
            if then is not None:
                await then()
        except BaseException as e:  # noqa: B902 - GeneratorExit, CancelledError
            seen = type(e)
            raise
        finally:
            self.ends.append(seen)
            if before is not None:
                before()


async def forever():
    await asyncio.Event().wait()


class TestOrderAndCompleteness(unittest.TestCase):
    """A fast producer through a tiny window. On a loop in release mode:
    IsolatedAsyncioTestCase's debug mode records a stack for every future,
    which would make this a benchmark of that."""

    def test_a_fast_producer_through_a_tiny_window(self):
        n = 100_000
        errors = []

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
            sums = [await demo.sum_agen(numbers(n), window) for window in (1, 10)]
            got = [await demo.collect_agen(numbers(m), window=w) for m, w in ((n, 10), (n, 1))]
            return sums, got

        sums, got = asyncio.run(main())
        self.assertEqual(sums, [n * (n - 1) // 2] * 2)
        self.assertEqual(got[0], list(range(n)))  # in order, none missing
        self.assertEqual(got[1], list(range(n)))
        self.assertEqual(errors, [])


class TestAsyncIteratorInC(BridgeCase):
    async def test_items_are_python_objects_without_converter(self):
        objs = [object(), "x", None, [1]]

        async def gen():
            for o in objs:
                yield o

        got = await demo.collect_agen(gen(), window=2)
        self.assertEqual(len(got), len(objs))
        for a, b in zip(got, objs):
            self.assertIs(a, b)

    async def test_object_with_aiter_and_anext(self):
        it = Numbers(500)
        self.assertEqual(await demo.sum_agen(it, 7), sum(range(500)))
        self.assertEqual(it.acloses, 0)  # exhausted: never closed
        self.assertEqual(await demo.collect_agen(Numbers(50), 3), list(range(50)))

    async def test_end_of_iteration(self):
        self.assertEqual(await demo.sum_agen(numbers(0)), 0)
        self.assertEqual(await demo.take_agen(numbers(3), 10), 3)  # ends first
        t = Tracked()
        self.assertEqual(await demo.sum_agen(t.gen(4), 1), 6)
        self.assertEqual(t.ends, [None])  # exhausted, not closed

    async def test_exception_after_items(self):
        class Boom(Exception):
            pass

        raised = []

        async def failing():
            yield 1
            yield 2
            yield 3
            e = Boom("after three")
            raised.append(e)
            raise e

        for window in (1, 16):
            raised.clear()
            taken = demo.agen_counts()[0]
            try:
                await demo.sum_agen(failing(), window)
            except Boom as e:  # (assertRaises drops the traceback)
                got = e
            else:
                self.fail("no exception")
            self.assertIs(got, raised[0])  # the same object
            self.assertEqual(str(got), "after three")
            self.assertEqual(demo.agen_counts()[0] - taken, 3)  # counted first
            frames = [f.name for f in traceback.extract_tb(got.__traceback__)]
            self.assertIn("failing", frames)
            self.assertIn("test_exception_after_items", frames)

        it = Numbers(10, fail_at=4)
        with self.assertRaises(LookupError):
            await demo.sum_agen(it)
        self.assertEqual(it.acloses, 0)  # failed: never closed

    async def test_converter_error_after_items(self):
        t = Tracked()

        async def gen():
            async for x in t.gen(3):
                yield x
            yield "not an int"
            yield 99

        taken = demo.agen_counts()[0]
        with self.assertRaises(TypeError):
            await demo.sum_agen(gen(), 1)
        self.assertEqual(demo.agen_counts()[0] - taken, 3)
        self.assertEqual(t.ends, [None])

        t = Tracked()
        taken = demo.agen_counts()[0]
        with self.assertRaises(TypeError):
            await demo.sum_agen(t.gen(None, bad_at=5), 16)
        self.assertEqual(demo.agen_counts()[0] - taken, 5)
        # Not exhausted: closed by the pump once the converter failed.
        self.assertTrue(await wait_until(lambda: t.ends == [GeneratorExit]), t.ends)

    async def test_not_an_async_iterable_is_type_error(self):
        with self.assertRaises(TypeError) as cm:
            await demo.sum_agen(5)
        self.assertIn("'int'", str(cm.exception))
        with self.assertRaises(TypeError) as cm:
            await demo.sum_agen([1, 2])
        self.assertIn("'list'", str(cm.exception))

        class Half:
            def __aiter__(self):
                return 42

        with self.assertRaises(TypeError) as cm:
            await demo.sum_agen(Half())
        self.assertIn("__anext__", str(cm.exception))
        with self.assertRaises(ValueError):
            demo.sum_agen(numbers(1), 0)
        with self.assertRaises(ValueError):
            demo.take_agen(numbers(1), -1)

    async def test_early_close_by_the_c_side(self):
        for close, window in ((True, 16), (False, 16), (True, 1), (False, 3)):
            t = Tracked()
            self.assertEqual(await demo.take_agen(t.gen(None), 5, window, close), 10)
            self.assertTrue(await wait_until(lambda: t.ends == [GeneratorExit]), (close, window, t.ends))
        # An iterator that is not a generator: its aclose() is awaited, once.
        it = Numbers(100)
        self.assertEqual(await demo.take_agen(it, 5, 2), 10)
        self.assertTrue(await wait_until(lambda: it.acloses == 1))
        self.assertEqual(await demo.take_agen(numbers(10), 0), 0)

    async def test_aclose_error_goes_to_the_loop_exception_handler(self):
        def bad_finally():
            raise ValueError("closing went wrong")

        t = Tracked()
        self.assertEqual(await demo.take_agen(t.gen(None, before=bad_finally), 2, 4), 1)
        self.assertTrue(await wait_until(lambda: self.loop_errors))
        self.assertEqual(len(self.loop_errors), 1, self.loop_errors)
        ctx = self.loop_errors.pop()
        self.assertIsInstance(ctx["exception"], ValueError)
        self.assertIn("aiobridge_demo.take_agen", ctx["message"])
        self.assertIn("async_generator", ctx["message"])
        self.assertEqual(t.ends, [GeneratorExit])

    async def test_cancel_mid_stream(self):
        base = demo.agen_counts()
        t = Tracked()
        waiting = asyncio.Event()

        async def wait_forever():
            waiting.set()
            await forever()

        fut = asyncio.ensure_future(demo.sum_agen(t.gen(3, then=wait_forever), 2))
        # The C task took the three items, and the pump waits in __anext__
        # (taking the third item and asking for a fourth are two steps: a
        # cancel between them closes the generator, GeneratorExit).
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[0] - base[0] == 3))
        self.assertTrue(await wait_until(waiting.is_set))
        fut.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await fut
        # The pending __anext__ was cancelled: the generator's finally ran.
        self.assertTrue(await wait_until(lambda: t.ends == [asyncio.CancelledError]), t.ends)
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[1] - base[1] == 1))

        # Cancelled while the pump waits for room (a full window), and
        # cancelled before the pump ever started.
        t = Tracked()
        fut = asyncio.ensure_future(demo.sum_agen(t.gen(None), 1))
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[0] - base[0] > 10))
        fut.cancel()
        self.assertTrue(await wait_until(lambda: len(t.ends) == 1))
        self.assertIn(t.ends[0], (GeneratorExit, asyncio.CancelledError))
        t = Tracked()
        fut = demo.sum_agen(t.gen(None))
        fut.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await fut
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[1] - base[1] == 3))
        self.assertTrue(await wait_until(lambda: demo.stats()["tasks_live"] == 0))

    async def test_contextvars(self):
        var = contextvars.ContextVar("var")
        inner = contextvars.ContextVar("inner", default=0)
        var.set(7)

        async def gen():
            inner.set(1)  # one context for the whole iteration
            for _ in range(5):
                await asyncio.sleep(0)
                yield var.get() * inner.get()

        self.assertEqual(await demo.sum_agen(gen(), 2), 35)
        self.assertEqual(inner.get(), 0)  # the caller's context is a copy's source

    async def test_unfinished_consumer_collected(self):
        base = demo.agen_counts()
        t = Tracked()
        fut = demo.sum_agen(t.gen(None, then=forever), 4)
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[0] - base[0] > 100))
        del fut
        gc.collect()
        self.assertTrue(await wait_until(lambda: demo.agen_counts()[1] - base[1] == 1))
        self.assertTrue(await wait_until(lambda: len(t.ends) == 1), t.ends)
        self.assertIn(t.ends[0], (GeneratorExit, asyncio.CancelledError))

    async def test_many_streams_at_once(self):
        gens = [numbers(200 + k) for k in range(30)]
        sums = await asyncio.gather(*(demo.sum_agen(g, 1 + k % 5) for k, g in enumerate(gens)))
        self.assertEqual(sums, [sum(range(200 + k)) for k in range(30)])


class TestSeveralLoops(unittest.TestCase):
    def test_streams_on_loops_in_several_threads(self):
        results, errors = {}, []

        def worker(k):
            async def main():
                return await asyncio.gather(*(demo.sum_agen(numbers(2000 + k + j), 1 + j) for j in range(4)))

            try:
                results[k] = asyncio.run(main())
            except BaseException as e:  # noqa: B902 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        self.assertEqual(errors, [])
        for k in range(4):
            self.assertEqual(results[k], [sum(range(2000 + k + j)) for j in range(4)])

    def test_loop_ending_mid_stream(self):
        """asyncio.run ends with a C task still consuming, then the loop is
        closed and collected: the generator is closed, nothing hangs, no
        noise; another loop works after."""
        p = run_python(
            """
            import gc, time, aiobridge, aiobridge_demo as demo
            ends = []
            async def gen():
                try:
                    i = 0
                    while True:
                        yield i
                        i += 1
                        await asyncio.sleep(0)
                finally:
                    ends.append(1)
            async def main():
                fut = asyncio.ensure_future(demo.sum_agen(gen(), 4))
                while demo.agen_counts()[0] < 50:
                    await asyncio.sleep(0.001)
                return fut
            fut = asyncio.run(main())
            del fut
            gc.collect()
            deadline = time.monotonic() + 10
            while aiobridge.stats(demo)["tasks_live"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert aiobridge.stats(demo)["tasks_live"] == 0, aiobridge.stats(demo)
            assert ends == [1], ends
            async def again():
                async def g():
                    yield 5
                return await demo.sum_agen(g())
            assert asyncio.run(again()) == 5
            print("ok")
            """
        )
        self.assertEqual(p.stdout.strip(), "ok", p.stderr)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("Exception ignored", p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        self.assertNotIn("destroyed", p.stderr)


    def test_loop_closed_mid_stream(self):
        """A loop closed (not run to its end) with C tasks consuming: no
        crash, no noise; the C tasks are cancelled once collected, and what
        they asked of the dead loop is let go when its port is pruned."""
        p = run_python(
            """
            import gc, time, aiobridge, aiobridge_demo as demo
            async def gen():
                i = 0
                while True:
                    yield i
                    i += 1
                    await asyncio.sleep(0)
            loop = asyncio.new_event_loop()
            async def start():
                futs = [demo.sum_agen(gen(), w) for w in (1, 2, 16)]
                while demo.agen_counts()[0] < 100:
                    await asyncio.sleep(0.001)
                return futs
            futs = loop.run_until_complete(start())
            loop.close()
            del futs, start, loop
            gc.collect()
            deadline = time.monotonic() + 10
            while aiobridge.stats(demo)["tasks_live"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert aiobridge.stats(demo)["tasks_live"] == 0, aiobridge.stats(demo)
            assert demo.agen_counts()[1] == 3, demo.agen_counts()
            async def again():
                async def g():
                    yield 5
                return await demo.sum_agen(g())
            assert asyncio.run(again()) == 5  # and the dead loop's port goes
            gc.collect()
            print("ok")
            """
        )
        self.assertEqual(p.stdout.strip(), "ok", p.stderr)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("Exception ignored", p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        self.assertNotIn("destroyed", p.stderr)

@unittest.skipUnless(hasattr(sys, "gettotalrefcount"), "needs a debug interpreter (python3-dbg)")
class TestAsyncIteratorReferenceLeaks(unittest.TestCase):
    def test_streams_do_not_leak(self):
        async def work():
            for _ in range(10):
                await demo.sum_agen(numbers(100), 3)
                await demo.collect_agen(numbers(50), 2)
                await demo.sum_agen(Numbers(20), 1)
                await demo.take_agen(numbers(100), 5, 4)
                await demo.take_agen(numbers(100), 5, 4, False)
                try:
                    await demo.sum_agen(Numbers(10, fail_at=3))
                except LookupError:
                    pass
                try:
                    await demo.sum_agen(5)
                except TypeError:
                    pass
                fut = asyncio.ensure_future(demo.sum_agen(Tracked().gen(2, then=forever)))
                await asyncio.sleep(0.001)
                fut.cancel()
                try:
                    await fut
                except asyncio.CancelledError:
                    pass
            for _ in range(50):  # let the closes run
                await asyncio.sleep(0)
            await demo.ready()

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over ~800 streams")


if __name__ == "__main__":
    unittest.main()
