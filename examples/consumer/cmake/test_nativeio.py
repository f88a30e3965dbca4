"""nativeio, an extension built against an installed aiobridge, whose C task
reads a socket through its backend's own API (libuv, libevent or io_uring).

Runs on stock asyncio, or on uvloop with CONSUMER_LOOP=uvloop.
CONSUMER_BACKEND, when set, is the backend the module must have been built
for (check.sh sets it)."""
import asyncio
import errno
import gc
import os
import socket
import subprocess
import sys
import textwrap
import time
import unittest

import aiobridge
import nativeio

LOOP = os.environ.get("CONSUMER_LOOP", "asyncio")
BACKEND = os.environ.get("CONSUMER_BACKEND") or nativeio.backend()
TEST_TIMEOUT = 60.0  # seconds, per test: wait_for around every test body


def setUpModule():
    if LOOP == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            reason = f"uvloop is not importable by {sys.executable}: {e}"
            print(f"SKIP: {reason}", file=sys.stderr)
            raise unittest.SkipTest(reason)
        # uvloop's first loop must exist before the runtime starts (the uv
        # backend shares libuv's allocator with it: docs/python.md).
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.new_event_loop().close()
    elif LOOP != "asyncio":
        raise ValueError(f"CONSUMER_LOOP must be asyncio or uvloop, not {LOOP!r}")
    try:
        aiobridge.backend(nativeio)  # starts the runtime
    except aiobridge.BackendError as e:  # e.g. the kernel refuses io_uring
        reason = f"the {BACKEND} runtime cannot start here: {e}"
        print(f"SKIP: {reason}", file=sys.stderr)
        raise unittest.SkipTest(reason)


def tearDownModule():
    asyncio.set_event_loop_policy(None)


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TEST_TIMEOUT)
    return asyncio.run(bounded())


async def wait_until(cond, what, timeout=10.0):
    """Polls cond() until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        await asyncio.sleep(0.002)


def inflight_is(n):
    return lambda: nativeio.inflight() == n


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def drain(sock):
    """Whatever is queued on sock, without blocking."""
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


class NativeIO(unittest.TestCase):
    def setUp(self):
        self.socks = []

    def tearDown(self):
        for s in self.socks:
            s.close()
        # Nothing may be left once a test is done. A finished read can
        # still be alive for a moment: libuv frees a handle in its close
        # callback, on a later iteration of the loop.
        deadline = time.monotonic() + 10.0
        while nativeio.inflight() != 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        self.assertEqual(nativeio.inflight(), 0)

    def pair(self):
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    def test_backend(self):
        self.assertEqual(nativeio.backend(), BACKEND)
        self.assertEqual(aiobridge.backend(nativeio), BACKEND)
        info = aiobridge.runtime_info(nativeio)
        self.assertEqual(info["module"], "nativeio")
        self.assertTrue(info["running"])
        self.assertEqual(info["backend"], BACKEND)
        # Linked with aiobridge::<backend>: no other backend is compiled in.
        self.assertEqual(info["backends"], [BACKEND])
        self.assertEqual(info["default_backend"], BACKEND)

    def test_recv_data_already_there(self):
        async def main():
            a, b = self.pair()
            a.sendall(b"hello")
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"hello")
            a.sendall(b"socket")  # an object with fileno() will do too
            self.assertEqual(await nativeio.recv(b, 100), b"socket")
        run(main())

    def test_recv_waits_for_data(self):
        async def main():
            a, b = self.pair()
            t = asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
            await wait_until(inflight_is(1), "the read to start")
            self.assertFalse(t.done())
            a.sendall(b"late")
            self.assertEqual(await t, b"late")
        run(main())

    def test_recv_reads_at_most_n(self):
        async def main():
            a, b = self.pair()
            a.sendall(b"0123456789")
            self.assertEqual(await nativeio.recv(b.fileno(), 4), b"0123")
            # The rest stayed in the socket, not in a native buffer.
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"456789")
            big = os.urandom(300000)
            a.setblocking(False)
            sent = a.send(big)
            got = b""
            while len(got) < sent:
                chunk = await nativeio.recv(b.fileno(), 65536)
                self.assertTrue(0 < len(chunk) <= 65536)
                got += chunk
            self.assertEqual(got, big[:sent])
        run(main())

    def test_eof(self):
        async def main():
            a, b = self.pair()
            t = asyncio.ensure_future(nativeio.recv(b.fileno(), 10))
            await wait_until(inflight_is(1), "the read to start")
            a.shutdown(socket.SHUT_WR)  # the peer is done while we wait
            self.assertEqual(await t, b"")
            a.close()  # and when it is already gone
            self.assertEqual(await nativeio.recv(b.fileno(), 10), b"")
        run(main())

    def test_bad_arguments(self):
        a, b = self.pair()
        for args in [("3", 1), (None, 1), (b.fileno(), "1"), (b.fileno(), 1.0),
                     (b.fileno(),), ()]:
            with self.subTest(args=args), self.assertRaises(TypeError):
                nativeio.recv(*args)
        for args in [(-1, 1), (b.fileno(), 0), (b.fileno(), -5),
                     (b.fileno(), 1 << 30)]:
            with self.subTest(args=args), self.assertRaises(ValueError):
                nativeio.recv(*args)
        with self.assertRaises((ValueError, OverflowError)):
            nativeio.recv(b.fileno(), 1 << 80)

    def test_native_errors(self):
        async def main():
            # A bad fd: recv cannot duplicate it.
            with self.assertRaises(OSError) as cm:
                nativeio.recv(1 << 24, 10)  # far above any open fd
            self.assertEqual(cm.exception.errno, errno.EBADF)
            # Reported by the native library: an unconnected socket.
            s = socket.socket()
            self.socks.append(s)
            with self.assertRaises(OSError) as cm:
                await nativeio.recv(s.fileno(), 10)
            self.assertEqual(cm.exception.errno, errno.ENOTCONN)
        run(main())

    def test_cancel_in_flight(self):
        async def main():
            a, b = self.pair()
            t = asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
            await wait_until(inflight_is(1), "the read to start")
            t.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await t
            # The awaiter is told at once; the native request is released
            # on the loop thread afterwards.
            await wait_until(inflight_is(0), "the cancelled read to be released")
            # Data sent now is not swallowed by the cancelled read.
            a.sendall(b"after")
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"after")
            # wait_for's timeout cancels the same way.
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(nativeio.recv(b.fileno(), 100), 0.05)
            await wait_until(inflight_is(0), "the timed-out read to be released")
            a.sendall(b"again")
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"again")
        run(main())

    def test_caller_closes_fd(self):
        async def main():
            a, b = self.pair()
            t = asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
            await wait_until(inflight_is(1), "the read to start")
            b.close()  # recv reads through its own duplicate
            a.sendall(b"still open")
            self.assertEqual(await t, b"still open")
        run(main())

    def test_close_right_after_cancel(self):
        async def main():
            for i in range(20):
                pairs = [socket.socketpair() for _ in range(10)]
                tasks = [asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
                         for _, b in pairs]
                await wait_until(inflight_is(10), "the reads to start")
                for t in tasks:
                    t.cancel()
                for a, b in pairs:  # before the reads are released
                    a.close()
                    b.close()
                # New sockets likely reuse those fd numbers at once.
                a, b = self.pair()
                a.sendall(b"new %d" % i)
                self.assertEqual(await nativeio.recv(b.fileno(), 100), b"new %d" % i)
                res = await asyncio.gather(*tasks, return_exceptions=True)
                self.assertTrue(all(isinstance(r, asyncio.CancelledError) for r in res))
                await wait_until(inflight_is(0), "the cancelled reads to be released")
        run(main())

    def test_cancel_racing_with_data(self):
        async def main():
            data = bytes(range(256)) * 4
            for i in range(50):
                a, b = self.pair()
                t = asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
                await wait_until(inflight_is(1), "the read to start")
                t.cancel()
                a.sendall(data)  # races with the cancel on the loop thread
                with self.assertRaises(asyncio.CancelledError):
                    await t
                await wait_until(inflight_is(0), "the cancelled read to be released")
                # The cancelled read took nothing, or its first <= 100 bytes
                # (then dropped with the result): the rest is intact.
                rest = drain(b)
                taken = len(data) - len(rest)
                self.assertLessEqual(taken, 100, f"round {i}")
                self.assertEqual(rest, data[taken:], f"round {i}")
        run(main())

    def test_collected_unawaited(self):
        async def main():
            a, b = self.pair()
            t = nativeio.recv(b.fileno(), 100)
            await wait_until(inflight_is(1), "the read to start")
            del t
            gc.collect()
            await wait_until(inflight_is(0), "the collected read to be released")
            a.sendall(b"kept")
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"kept")
        run(main())

    def test_many_concurrent(self):
        n = 200

        async def main():
            fds = open_fds()
            pairs = [self.pair() for _ in range(n)]
            tasks = [asyncio.ensure_future(nativeio.recv(b.fileno(), 64))
                     for _, b in pairs]
            await wait_until(inflight_is(n), f"{n} reads to start")
            for i, (a, _) in reversed(list(enumerate(pairs))):
                a.sendall(b"pair %d" % i)
            got = await asyncio.gather(*tasks)
            self.assertEqual(got, [b"pair %d" % i for i in range(n)])
            await wait_until(inflight_is(0), f"{n} finished reads to be released")
            # And as many cancelled at once.
            tasks = [asyncio.ensure_future(nativeio.recv(b.fileno(), 64))
                     for _, b in pairs]
            await wait_until(inflight_is(n), f"{n} reads to start again")
            for t in tasks:
                t.cancel()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            self.assertTrue(all(isinstance(r, asyncio.CancelledError) for r in res))
            await wait_until(inflight_is(0), f"{n} cancelled reads to be released")
            for a, b in pairs:
                a.close()
                b.close()
            # Every read closed the duplicate of its fd.
            self.assertEqual(open_fds(), fds)
        run(main())

    def test_runtime_shutdown_in_flight(self):
        async def main():
            a, b = self.pair()
            t = asyncio.ensure_future(nativeio.recv(b.fileno(), 100))
            await wait_until(inflight_is(1), "the read to start")
            aiobridge.shutdown(nativeio)  # drops the task, closes the loop
            with self.assertRaises(aiobridge.ShutdownError):
                await t
            await wait_until(inflight_is(0), "the read to be released by shutdown")
            a.sendall(b"fresh")  # the next call starts a fresh runtime
            self.assertEqual(await nativeio.recv(b.fileno(), 100), b"fresh")
            self.assertEqual(aiobridge.runtime_info(nativeio)["backend"], BACKEND)
        run(main())

    def test_exit_with_reads_in_flight(self):
        # The interpreter exits with reads in flight: aiobridge's exit hook
        # stops the runtime, which drops the tasks and closes the loop, and
        # every request is released before Python finalizes.
        code = textwrap.dedent("""
            import asyncio, atexit, os, socket, sys
            # Registered before nativeio's bridge adds its hook: runs after.
            atexit.register(lambda: print("left", nativeio.inflight()))
            import nativeio
            if os.environ.get("CONSUMER_LOOP") == "uvloop":
                import uvloop
                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

            async def main():
                pairs = [socket.socketpair() for _ in range(5)]
                # Kept: an awaitable collected unawaited cancels its read.
                reads = [nativeio.recv(b.fileno(), 10) for a, b in pairs]
                while nativeio.inflight() != 5:
                    await asyncio.sleep(0.002)
                print("exiting with", nativeio.inflight(), flush=True)
                sys.exit(0)

            asyncio.new_event_loop().run_until_complete(main())
        """)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual((p.returncode, p.stdout, p.stderr),
                         (0, "exiting with 5\nleft 0\n", ""))


if __name__ == "__main__":
    print(f"nativeio: backend {nativeio.backend()}, loop {LOOP}, "
          f"Python {sys.version.split()[0]}", file=sys.stderr)
    unittest.main()
