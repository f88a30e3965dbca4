"""pipdemo, built with pip against the pip-installed aiobridge: awaited on
stock asyncio and (CONSUMER_LOOP=uvloop) on uvloop. PIPDEMO_BACKEND is the
backend it was built for; CONSUMER_AIOBRIDGE=tree when the aiobridge package
comes from a build tree (examples/consumer/subdirectory)."""
import asyncio
import os
import sys
import unittest

import aiobridge
import pipdemo

LOOP = os.environ.get("CONSUMER_LOOP", "asyncio")
BACKEND = os.environ.get("PIPDEMO_BACKEND", "event")


def run(coro):
    if LOOP == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()
    return asyncio.run(coro)


class PipDemo(unittest.TestCase):
    @unittest.skipIf(os.environ.get("CONSUMER_AIOBRIDGE") == "tree",
                     "aiobridge from a build tree has no installed headers")
    def test_installed_package(self):
        self.assertTrue(os.path.isfile(os.path.join(aiobridge.get_include(), "aiobridge", "python.h")))
        self.assertTrue(os.path.isfile(os.path.join(aiobridge.get_cmake_dir(), "aiobridgeConfig.cmake")))

    def test_backend_is_the_one_built(self):
        self.assertEqual(aiobridge.backend(pipdemo), BACKEND)
        info = aiobridge.runtime_info(pipdemo)
        self.assertEqual((info["backends"], info["default_backend"]), ([BACKEND], BACKEND))

    def test_sleep_and_relay(self):
        async def main():
            before = aiobridge.stats(pipdemo)["tasks_spawned"]
            self.assertIsNone(await pipdemo.sleep(0.001))
            self.assertEqual(await pipdemo.relay(asyncio.sleep(0, "x")), "x")
            self.assertEqual(aiobridge.stats(pipdemo)["tasks_spawned"], before + 2)
        run(main())

    def test_relay_keeps_the_exception(self):
        async def boom():
            raise KeyError("k")

        async def main():
            with self.assertRaises(KeyError) as cm:
                await pipdemo.relay(boom())
            self.assertEqual(cm.exception.args, ("k",))
        run(main())

    def test_cancel(self):
        async def main():
            t = asyncio.ensure_future(pipdemo.sleep(3600))
            await asyncio.sleep(0)
            t.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await t
        run(main())

    def test_bad_argument(self):
        with self.assertRaises(TypeError):
            pipdemo.sleep("soon")


if __name__ == "__main__":
    if LOOP == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print(f"SKIP: uvloop is not importable by {sys.executable}")
            sys.exit(0)
    unittest.main()
