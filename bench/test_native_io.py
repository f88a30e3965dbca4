"""native_io (bench/native_io.c), the extension bench_io.py measures: its
functions return the right bytes, raise the right errors, and release every
native request when cancelled in flight.

Run with the build's python/<tag> directory on PYTHONPATH:
  NATIVE_IO_BACKEND=uring python3 -m unittest -v test_native_io
NATIVE_IO_BACKEND picks the module (native_io_<backend>; default uv);
AIOB_TEST_LOOP=uvloop runs every test on uvloop. No test measures time.
"""
import asyncio
import errno
import importlib
import os
import pathlib
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import aiobridge

BACKEND = os.environ.get("NATIVE_IO_BACKEND", "uv")
LOOP = os.environ.get("AIOB_TEST_LOOP", "asyncio")
TEST_TIMEOUT = 60.0  # seconds, per test body
nio = None


def setUpModule():
    global nio
    if LOOP == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            raise unittest.SkipTest(f"uvloop is not importable: {e}")
        # uvloop's first loop must exist before the runtime starts
        # (docs/python.md, "uvloop").
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.new_event_loop().close()
    elif LOOP != "asyncio":
        raise ValueError(f"AIOB_TEST_LOOP must be asyncio or uvloop, not {LOOP!r}")
    nio = importlib.import_module("native_io_" + BACKEND)
    try:
        aiobridge.backend(nio)  # starts the runtime
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
    """Polls cond() while the loop runs; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        await asyncio.sleep(0.002)


def polls():
    return aiobridge.stats(nio)["polls"]


def open_files():
    """What this process's fds point to, but anonymous inodes: the runtime
    and the bridge make eventfds on first use, and keep them."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, closed by now
            continue
        if not target.startswith("anon_inode:"):
            out.add((fd, target))
    return out


def echo_peer(sock):
    """A thread echoing everything sock receives until EOF."""
    def serve():
        with sock:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                sock.sendall(data)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


class NativeIO(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = pathlib.Path(self.dir.name)
        self.socks = []
        self.files_before = open_files()

    def tearDown(self):
        for s in self.socks:
            s.close()
        # Every request released, every fd closed. A finished request can
        # stay alive a moment: libuv frees a handle in its close callback
        # and a detached close runs after the task finished.
        deadline = time.monotonic() + 10.0
        while nio.inflight() != 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        self.assertEqual(nio.inflight(), 0)
        # Nothing the test opened, files and socket duplicates, is left.
        deadline = time.monotonic() + 10.0
        while (open_files() - self.files_before) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.assertEqual(open_files() - self.files_before, set())
        self.dir.cleanup()

    def file(self, name, data):
        p = self.path / name
        p.write_bytes(data)
        return p

    def pair(self):
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    # ---- read_file --------------------------------------------------------

    def test_backend(self):
        self.assertEqual(nio.backend(), BACKEND)
        self.assertEqual(aiobridge.backend(nio), BACKEND)
        self.assertIsInstance(nio.file_method(), str)

    def test_read_file_returns_the_bytes(self):
        sizes = [0, 1, 4095, 4096, 4097, 8192, 65536 + 7, (1 << 20) + 3]
        files = [self.file(f"f{n}", os.urandom(n)) for n in sizes]

        async def main():
            for p in files:
                self.assertEqual(await nio.read_file(p), p.read_bytes(), p)
            got = await asyncio.gather(*[nio.read_file(p) for p in files * 8])
            self.assertEqual(got, [p.read_bytes() for p in files * 8])
        run(main())

    def test_read_file_takes_str_bytes_and_pathlike(self):
        p = self.file("x", b"contents")

        async def main():
            for arg in (p, str(p), os.fsencode(p)):
                self.assertEqual(await nio.read_file(arg), b"contents")
        run(main())
        with self.assertRaises(TypeError):
            nio.read_file(42)
        with self.assertRaises(ValueError):
            nio.read_file("a\0b")

    def test_read_file_of_unknown_size(self):
        # /proc files have st_size 0: read until a read returns 0.
        want = pathlib.Path("/proc/version").read_bytes()
        self.assertEqual(run(nio.read_file("/proc/version")), want)

    def test_read_file_errors(self):
        async def main():
            with self.assertRaises(FileNotFoundError) as cm:
                await nio.read_file(self.path / "missing")
            self.assertEqual(cm.exception.errno, errno.ENOENT)
            with self.assertRaises(IsADirectoryError):
                await nio.read_file(self.path)
            with self.assertRaises(NotADirectoryError):
                await nio.read_file(self.file("plain", b"x") / "below")
        run(main())

    def test_read_file_cancel_storm(self):
        files = [self.file(f"c{i}", os.urandom(random.choice([0, 100, 70000])))
                 for i in range(40)]
        rng = random.Random(12)

        async def one(p, delay):
            # Cancelled before it starts, while a step is in flight, between
            # steps, or after it finished: each must leave nothing behind.
            fut = asyncio.ensure_future(nio.read_file(p))
            if delay:
                await asyncio.sleep(delay)
            fut.cancel()
            try:
                return p, await fut
            except asyncio.CancelledError:
                return p, None

        async def main():
            jobs = [one(rng.choice(files), rng.choice([0, 0, 1e-4, 1e-3, 5e-3]))
                    for _ in range(400)]
            for p, data in await asyncio.gather(*jobs):
                if data is not None:  # finished before the cancel
                    self.assertEqual(data, p.read_bytes())
            await wait_until(lambda: nio.inflight() == 0, "every request released")
            # The runtime still works.
            self.assertEqual(await nio.read_file(files[0]), files[0].read_bytes())
        run(main())

    def fifo_with_writer(self):
        """A FIFO and a write end of it that never blocks (O_RDWR): reading
        it waits for data, and ends when the write end is closed."""
        fifo = self.path / "fifo"
        os.mkfifo(fifo)
        return fifo, os.open(fifo, os.O_RDWR | os.O_NONBLOCK)

    def test_read_file_cancelled_while_read_waits(self):
        # A read of an empty FIFO is in flight (a libuv threadpool thread
        # blocked in read(2); an io_uring read armed on the pipe) when the
        # task is cancelled: the request, its buffer and its fd must outlive
        # the task, and be released when the read ends.
        if BACKEND == "event":
            self.skipTest("event reads on the loop thread: nothing is ever "
                          "in flight (it would read a FIFO at once, O_NONBLOCK)")
        fifo, w = self.fifo_with_writer()

        def request_opened():
            return sum(target == str(fifo) for _, target in open_files()) == 2

        async def main():
            try:
                before = polls()
                fut = asyncio.ensure_future(nio.read_file(fifo))
                await wait_until(request_opened, "the request to open the FIFO")
                # Its second poll (after the open) submits the read.
                await wait_until(lambda: polls() >= before + 2, "the read to start")
                fut.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await fut
            finally:
                os.close(w)  # ends the read if it still waits (libuv cannot
                # cancel work that started)
            await wait_until(lambda: nio.inflight() == 0, "the request released")
            self.assertEqual(await nio.read_file(self.file("after", b"ok")), b"ok")
        run(main())

    def test_read_file_from_a_fifo(self):
        # A file of unknown size, longer than the first 8 KiB buffer.
        if BACKEND == "event":
            self.skipTest("event opens a FIFO O_NONBLOCK and reads what is "
                          "there at once")
        fifo, w = self.fifo_with_writer()
        data = os.urandom(300000)  # more than the pipe holds: the writer
        # can only finish once read_file has opened the FIFO and reads it

        def writer():
            os.set_blocking(w, True)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            finally:
                os.close(w)
        t = threading.Thread(target=writer)
        t.start()
        try:
            self.assertEqual(run(nio.read_file(fifo)), data)
        finally:
            t.join()

    # ---- echo -------------------------------------------------------------

    def test_echo_returns_the_bytes(self):
        a, b = self.pair()
        echo_peer(b)
        self.socks.remove(b)

        async def main():
            self.assertEqual(await nio.echo(a, b""), b"")
            for n in (1, 512, 65536, 4 << 20):  # 4 MiB: more than the buffers
                msg = os.urandom(n)
                self.assertEqual(await nio.echo(a, msg), msg)
            self.assertEqual(await nio.echo(a.fileno(), bytearray(b"abc")), b"abc")
        run(main())

    def test_echo_peer_closes(self):
        async def main():
            a, b = self.pair()
            fut = asyncio.ensure_future(nio.echo(a, b"0123456789"))
            got = b""
            while len(got) < 10:
                got += await asyncio.get_running_loop().sock_recv(b, 10)
            b.sendall(b"01234")
            b.shutdown(socket.SHUT_WR)
            self.assertEqual(await fut, b"01234")  # fewer bytes: EOF
        run(main())

    def test_echo_errors(self):
        async def main():
            a, b = self.pair()
            b.close()
            with self.assertRaises((BrokenPipeError, ConnectionResetError)):
                await nio.echo(a, b"x" * 100000)
            with tempfile.TemporaryFile() as f:  # not a socket
                with self.assertRaises(OSError) as cm:
                    await nio.echo(f, b"x")
                self.assertEqual(cm.exception.errno, errno.ENOTSOCK)
        run(main())
        with self.assertRaises(TypeError):
            nio.echo(0, "text")
        with self.assertRaises(ValueError):
            nio.echo(-1, b"x")

    def test_echo_cancelled_in_flight(self):
        async def main():
            a, b = self.pair()
            before = polls()
            # The peer reads nothing yet: a 4 MiB send stays in flight, and
            # the receive waits for an answer.
            fut = asyncio.ensure_future(nio.echo(a, b"y" * (4 << 20)))
            await wait_until(lambda: polls() > before, "the echo to start")
            fut.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await fut
            await wait_until(lambda: nio.inflight() == 0, "the echo released")
        run(main())
        # The caller's socket still works (the echo used a duplicate): drain
        # what the cancelled echo sent, then send more.
        a, b = self.socks[-2:]
        b.setblocking(False)
        try:
            while b.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
        a.settimeout(10)
        b.settimeout(10)
        a.sendall(b"after")
        self.assertEqual(b.recv(100), b"after")

    def test_echo_cancel_storm(self):
        pairs = [self.pair() for _ in range(60)]
        sel = selectors.DefaultSelector()
        for _, b in pairs:
            b.setblocking(False)
            sel.register(b, selectors.EVENT_READ)
        stop = threading.Event()

        def serve():  # echoes on every peer
            while not stop.is_set():
                for key, _ in sel.select(0.01):
                    try:
                        data = key.fileobj.recv(1 << 16)
                        if data:
                            key.fileobj.setblocking(True)
                            key.fileobj.sendall(data)
                            key.fileobj.setblocking(False)
                    except OSError:
                        pass
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        rng = random.Random(7)

        async def one(a, yields):
            msg = os.urandom(rng.choice([10, 3000]))
            fut = asyncio.ensure_future(nio.echo(a, msg))
            for _ in range(yields):
                await asyncio.sleep(0)
            fut.cancel()
            try:
                self.assertEqual(await fut, msg)
            except asyncio.CancelledError:
                pass

        async def main():
            # One echo per socket at a time: a cancelled one may leave part
            # of its answer behind, so each socket serves one echo only.
            await asyncio.gather(*[one(a, rng.randrange(8)) for a, _ in pairs])
            await wait_until(lambda: nio.inflight() == 0, "every echo released")
        try:
            run(main())
        finally:
            stop.set()
            t.join()
            sel.close()

    def test_echo_caller_closes_its_socket(self):
        a, b = self.pair()
        echo_peer(b)
        self.socks.remove(b)

        async def main():
            fut = nio.echo(a, b"still there")
            a.close()  # the echo holds its own duplicate
            self.assertEqual(await fut, b"still there")
        run(main())

    # ---- exit ---------------------------------------------------------------

    def test_exit_with_requests_in_flight(self):
        # The interpreter exits with reads and echoes in flight (collected
        # unawaited, then the runtime stops at exit): no hang, no crash.
        code = textwrap.dedent(f"""
            import asyncio, os, shutil, socket, sys, tempfile
            if {LOOP!r} == "uvloop":
                import uvloop
                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
                asyncio.new_event_loop().close()
            import native_io_{BACKEND} as nio
            d = tempfile.mkdtemp()
            paths = []
            for i in range(50):
                p = os.path.join(d, str(i))
                with open(p, "wb") as f:
                    f.write(os.urandom(200000))
                paths.append(p)
            a, b = socket.socketpair()
            KEEP = []  # alive past the loop
            async def main():
                KEEP.extend(asyncio.ensure_future(nio.read_file(p)) for p in paths)
                KEEP.append(asyncio.ensure_future(nio.echo(a, b"z" * 100000)))
                await asyncio.sleep(0)
            asyncio.run(main())
            shutil.rmtree(d)
            print("exiting")
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "exiting")
        self.assertNotIn("Fatal", r.stderr)


if __name__ == "__main__":
    unittest.main()
