"""C producers as Python async iterators (aiob_py_stream_new): the
aiobridge.CStream of demo.stream_range and demo.stream_fail_after.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the backend.
"""
import asyncio
import contextlib
import errno
import gc
import sys
import threading
import unittest

import aiobridge_demo as demo
from test_bridge import BridgeCase, references_leaked, wait_until

HAVE_ANEXT = sys.version_info >= (3, 10)


async def drain(it):
    return [x async for x in it]


def producers_gone():
    """No producer of an earlier test is left: their drops are counted."""
    gc.collect()
    return demo.stats()["tasks_live"] == 0


def boxes_balanced():
    _, made, freed = demo.stream_counts()
    return made == freed


class TestCStream(BridgeCase):
    async def test_order_and_completeness_through_a_tiny_buffer(self):
        got = await drain(demo.stream_range(100_000, buffer=10))
        self.assertEqual(got, list(range(100_000)))
        got = await drain(demo.stream_range(1000, buffer=1))
        self.assertEqual(got, list(range(1000)))
        self.assertEqual(await drain(demo.stream_range(0)), [])

    async def test_the_producer_is_suspended_not_dropping(self):
        # A consumer slower than the producer: every item still arrives, in
        # order, though the channel holds 2.
        got = []
        async for x in demo.stream_range(300, buffer=2):
            got.append(x)
            if x % 7 == 0:
                await asyncio.sleep(0)
        self.assertEqual(got, list(range(300)))

    async def test_producer_error_after_its_items(self):
        got = []
        with self.assertRaises(FileNotFoundError) as cm:
            async for x in demo.stream_fail_after(5, errno.ENOENT, buffer=2):
                got.append(x)
        self.assertEqual(got, [0, 1, 2, 3, 4])  # the items before the error
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        # Ended: later anext() raise StopAsyncIteration.
        it = demo.stream_fail_after(0, errno.EIO)
        with self.assertRaises(OSError):
            await it.__anext__()
        with self.assertRaises(StopAsyncIteration):
            await it.__anext__()

    async def test_protocols(self):
        if HAVE_ANEXT:  # contextlib.aclosing: 3.10+, as anext()
            async with contextlib.aclosing(demo.stream_range(10)) as it:
                self.assertEqual([x async for x in it if x % 2], [1, 3, 5, 7, 9])
        it = demo.stream_range(2)
        self.assertIs(it.__aiter__(), it)
        if HAVE_ANEXT:
            self.assertEqual(await anext(it), 0)
            self.assertEqual(await anext(it), 1)
            self.assertEqual(await anext(it, "end"), "end")
        self.assertRegex(repr(demo.stream_range(1)), r"<CStream aiobridge_demo.stream_range unstarted>")

    async def test_boxed_items_are_freed_once(self):
        self.assertTrue(await wait_until(producers_gone))
        _, made, freed = demo.stream_counts()
        self.assertEqual(await drain(demo.stream_range(50, buffer=4, boxed=True)), list(range(50)))
        self.assertTrue(await wait_until(lambda: demo.stream_counts()[1:] == (made + 50, freed + 50)))

    async def test_break_and_collect_drops_the_producer(self):
        self.assertTrue(await wait_until(producers_gone))
        drops = demo.stream_counts()[0]
        it = demo.stream_range(10**9, buffer=8, boxed=True)
        async for x in it:
            if x == 100:
                break
        del it
        gc.collect()
        # The producer is dropped once; every item made is freed, those
        # left in the channel without Python.
        self.assertTrue(await wait_until(lambda: demo.stream_counts()[0] == drops + 1),
                        (drops, demo.stream_counts(), demo.stats()))
        self.assertTrue(await wait_until(boxes_balanced))
        await asyncio.sleep(0.01)
        self.assertEqual(demo.stream_counts()[0], drops + 1)

    async def test_aclose_drops_the_producer(self):
        self.assertTrue(await wait_until(producers_gone))
        drops = demo.stream_counts()[0]
        it = demo.stream_range(10**9, buffer=4)
        self.assertEqual(await it.__anext__(), 0)
        await it.aclose()
        await it.aclose()  # idempotent
        with self.assertRaises(StopAsyncIteration):
            await it.__anext__()
        self.assertTrue(await wait_until(lambda: demo.stream_counts()[0] == drops + 1))

    async def test_cancelling_the_consumer_drops_the_producer(self):
        self.assertTrue(await wait_until(producers_gone))
        drops = demo.stream_counts()[0]
        parked = asyncio.Event()

        async def consume(it):
            async for x in it:
                if x == 10:
                    parked.set()  # the next anext() parks: item 11 never comes

        it = demo.stream_range(10**9, buffer=4, stall_at=11)
        task = asyncio.ensure_future(consume(it))
        await parked.wait()
        await asyncio.sleep(0)
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        self.assertTrue(await wait_until(lambda: demo.stream_counts()[0] == drops + 1))
        with self.assertRaises(StopAsyncIteration):  # closed
            await it.__anext__()

    async def test_a_pending_anext_cancelled_by_wait_for(self):
        self.assertTrue(await wait_until(producers_gone))
        drops = demo.stream_counts()[0]
        it = demo.stream_range(10**9, buffer=4, stall_at=1)
        self.assertEqual(await it.__anext__(), 0)
        with self.assertRaises(asyncio.TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.05)
        self.assertTrue(await wait_until(lambda: demo.stream_counts()[0] == drops + 1))

    async def test_two_pending_anext_is_an_error(self):
        it = demo.stream_range(10**9, buffer=1, stall_at=1)
        self.assertEqual(await it.__anext__(), 0)
        first = it.__anext__()  # parked: nothing comes
        with self.assertRaisesRegex(RuntimeError, "another anext"):
            it.__anext__()
        await it.aclose()
        with self.assertRaises(asyncio.CancelledError):
            await first

    async def test_several_streams_on_several_loops(self):
        results = {}

        def run(k):
            async def main():
                its = [demo.stream_range(5000, buffer=3) for _ in range(3)]
                sums = await asyncio.gather(*(drain(it) for it in its))
                return [sum(s) for s in sums]

            results[k] = asyncio.run(main())

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        here = await asyncio.gather(*(drain(demo.stream_range(5000, buffer=5)) for _ in range(2)))
        for t in threads:
            t.join(120)
        want = sum(range(5000))
        self.assertEqual([sum(h) for h in here], [want, want])
        self.assertEqual(results, {k: [want] * 3 for k in range(3)})

    async def test_outside_a_loop(self):
        it = demo.stream_range(3)
        self.assertEqual(await drain(it), [0, 1, 2])


class TestCStreamUnbound(unittest.TestCase):
    def test_unstarted_stream_collected(self):
        asyncio.run(wait_until(producers_gone))
        drops = demo.stream_counts()[0]
        it = demo.stream_range(10)  # no loop: the producer never starts
        del it
        gc.collect()
        self.assertEqual(demo.stream_counts()[0], drops + 1)  # its state dropped

    def test_asyncio_run_of_a_consumer(self):
        self.assertEqual(asyncio.run(drain(demo.stream_range(4))), [0, 1, 2, 3])


@unittest.skipUnless(hasattr(sys, "gettotalrefcount"), "needs a debug interpreter (python3-dbg)")
class TestCStreamReferenceLeaks(unittest.TestCase):
    def test_streams_do_not_leak(self):
        async def work():
            for _ in range(20):
                await drain(demo.stream_range(50, buffer=3))
                await drain(demo.stream_range(20, buffer=2, boxed=True))
                try:
                    await drain(demo.stream_fail_after(3, errno.EIO))
                except OSError:
                    pass
                it = demo.stream_range(10**6, buffer=2)
                await it.__anext__()
                await it.aclose()
                it = demo.stream_range(10**6, buffer=2)
                await it.__anext__()
                del it
            await demo.ready()

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over ~1000 streams")


if __name__ == "__main__":
    unittest.main()
