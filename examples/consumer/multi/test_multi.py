"""Two aiobridge extensions built separately, on different backends, in one
interpreter: pipdemo (examples/consumer/pip, on libevent) and nativeio
(examples/consumer/cmake, on libuv). Each carries its own runtime; the one
`aiobridge` package sees both. CONSUMER_LOOP=uvloop runs on uvloop."""
import asyncio
import os
import socket
import sys
import unittest

import aiobridge
import nativeio
import pipdemo

LOOP = os.environ.get("CONSUMER_LOOP", "asyncio")


def run(coro):
    if LOOP == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    return asyncio.run(coro)


class TwoExtensions(unittest.TestCase):
    def test_each_has_its_runtime(self):
        self.assertEqual(aiobridge.backend(pipdemo), "event")
        self.assertEqual(aiobridge.backend(nativeio), "uv")
        names = sorted(i["module"] for i in aiobridge.runtime_info())
        self.assertEqual(names, ["nativeio", "pipdemo"])
        with self.assertRaisesRegex(ValueError, "different backends"):
            aiobridge.backend()

    def test_stats_per_extension_and_summed(self):
        async def main():
            await pipdemo.sleep(0)
        before = {m: aiobridge.stats(m)["tasks_spawned"] for m in (pipdemo, nativeio)}
        run(main())
        self.assertEqual(aiobridge.stats(pipdemo)["tasks_spawned"], before[pipdemo] + 1)
        self.assertEqual(aiobridge.stats(nativeio)["tasks_spawned"], before[nativeio])
        total = aiobridge.stats()["tasks_spawned"]
        self.assertEqual(total, aiobridge.stats(pipdemo)["tasks_spawned"] +
                         aiobridge.stats(nativeio)["tasks_spawned"])

    def test_c_task_awaits_the_other_extensions_ctask(self):
        a, b = socket.socketpair()
        try:
            async def main():
                # pipdemo's C task (libevent runtime) awaits nativeio's
                # CTask (libuv runtime), whose C task reads with libuv.
                relayed = asyncio.ensure_future(pipdemo.relay(nativeio.recv(a.fileno(), 5)))
                await asyncio.sleep(0)
                b.send(b"hello")
                return await relayed
            self.assertEqual(run(main()), b"hello")
        finally:
            a.close()
            b.close()

    def test_shutting_one_down_leaves_the_other(self):
        aiobridge.shutdown(pipdemo)
        a, b = socket.socketpair()
        try:
            async def main():
                b.send(b"x")
                got = await nativeio.recv(a.fileno(), 1)
                await pipdemo.sleep(0)  # a fresh runtime starts
                return got
            self.assertEqual(run(main()), b"x")
        finally:
            a.close()
            b.close()


if __name__ == "__main__":
    if LOOP == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print(f"SKIP: uvloop is not importable by {sys.executable}")
            sys.exit(0)
    unittest.main()
