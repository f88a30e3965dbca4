"""Loop-local C tasks (aiob_py_local_future_into_py), through the demo's
local_* functions.

Run like test_bridge.py: the extension's build directory on PYTHONPATH,
AIOB_TEST_LOOP=uvloop for uvloop, AIOBRIDGE_BACKEND for the runtime's backend.
Each loop runs its local tasks in one of two forms (local_info()["mode"]):
"shared" on a uvloop.Loop whose libuv is the uv backend's, "asyncio"
otherwise; expected_form() says which one this run must get. Scenarios that
could crash, hang or print at exit run in a fresh interpreter (run_child).
"""
import asyncio
import contextvars
import errno
import gc
import json
import os
import random
import sys
import textwrap
import threading
import time
import traceback
import unittest

import aiobridge_demo as demo
import children

LOOP = os.environ.get("AIOB_TEST_LOOP", "asyncio")
if LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

SHARED_OFF = os.environ.get("AIOBRIDGE_LOCAL_SHARED") == "0"

# Debian's interpreters (release and debug) import Debian's uvloop, linked
# to the system libuv the uv backend uses too: there the shared form must be
# used, not silently replaced by the asyncio form.
DEBIAN_PYTHONS = {os.path.realpath(p) for p in ("/usr/bin/python3", "/usr/bin/python3-dbg")
                  if os.path.exists(p)}
DEBIAN_PYTHON = os.path.realpath(sys.executable) in DEBIAN_PYTHONS

REASON_NOT_UVLOOP = "the loop is not a uvloop.Loop"


def is_uvloop(loop):
    mod = sys.modules.get("uvloop")
    return mod is not None and isinstance(loop, mod.Loop)


def expected_form(loop, on_uvloop=None, shared_off=SHARED_OFF):
    """(mode, reason) a loop's local tasks must run in; reason is a part of
    the reported one. (None, None): uvloop on the uv backend with a uvloop
    that may bring a libuv of its own: "shared", or "asyncio" for a reason
    about libuv. The loop, or for a child's, on_uvloop."""
    if shared_off:
        return "asyncio", "AIOBRIDGE_LOCAL_SHARED=0"
    if not (is_uvloop(loop) if on_uvloop is None else on_uvloop):
        return "asyncio", REASON_NOT_UVLOOP
    if demo.backend() != "uv":
        return "asyncio", "uv backend"
    if DEBIAN_PYTHON:
        return "shared", None
    return None, None


def local_live():
    return demo.local_info()["tasks_live"]


async def wait_until(predicate, timeout=60.0):
    """Lets the loop run until a condition the local runtime makes true in
    loop callbacks holds (a cancel is handled in a later dispatch)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


class LocalCase(unittest.IsolatedAsyncioTestCase):
    """A fresh loop per test: its local tasks get a fresh host. The loop's
    exception handler must not fire, and no local task outlives a test."""

    async def asyncSetUp(self):
        self.loop_errors = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        loop.slow_callback_duration = 60  # (debug mode: see test_bridge)

    async def asyncTearDown(self):
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())
        self.assertEqual(self.loop_errors, [], "the loop's exception handler fired")

    def assertForm(self, info):
        mode, reason = expected_form(asyncio.get_running_loop())
        if mode == "shared":
            self.assertEqual((info["mode"], info["reason"]), ("shared", None), info)
        elif mode == "asyncio":
            self.assertEqual(info["mode"], "asyncio", info)
            self.assertIsInstance(info["reason"], str, info)
            self.assertIn(reason, info["reason"])
        else:  # uvloop and uv, with a uvloop that may have its own libuv
            self.assertIn(info["mode"], ("shared", "asyncio"), info)
            if info["mode"] == "shared":
                self.assertIsNone(info["reason"], info)
            else:
                self.assertIn("libuv", info["reason"], info)


class TestReady(LocalCase):
    async def test_done_at_once(self):
        """The first poll runs at the call: a task done at once gives an
        awaitable already done, bound to the running loop."""
        f = demo.local_ready()
        self.assertTrue(f.done())
        self.assertTrue(asyncio.isfuture(f))
        self.assertIs(f.get_loop(), asyncio.get_running_loop())
        self.assertIsNone(f.result())
        self.assertIsNone(await f)
        f = demo.local_fail_errno(errno.ENOENT)
        self.assertTrue(f.done())
        self.assertIsInstance(f.exception(), FileNotFoundError)

    async def test_asyncio_combinators(self):
        """gather, wait_for, shield, create_task, ensure_future take it."""
        self.assertEqual(await asyncio.gather(*(demo.local_ready() for _ in range(50))),
                         [None] * 50)
        self.assertIsNone(await asyncio.wait_for(demo.local_ready(), 60))
        self.assertIsNone(await asyncio.wait_for(demo.local_sleep_ms(1), 60))
        self.assertIsNone(await asyncio.shield(demo.local_ready()))
        self.assertIsNone(await asyncio.shield(demo.local_sleep_ms(1)))
        self.assertIsNone(await asyncio.create_task(demo.local_ready()))
        self.assertIsNone(await asyncio.create_task(demo.local_sleep_ms(1)))
        self.assertIsNone(await asyncio.ensure_future(demo.local_ready()))
        self.assertIsNone(await asyncio.ensure_future(demo.local_sleep_ms(1)))
        with self.assertRaises(asyncio.TimeoutError):
            await asyncio.wait_for(demo.local_sleep_ms(60_000), 0.01)

    async def test_shield_keeps_the_c_task(self):
        """Cancelling a shield leaves the local task running to its end."""
        inner = demo.local_sleep_ms(20)
        outer = asyncio.shield(inner)
        outer.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await outer
        self.assertIsNone(await asyncio.wait_for(inner, 60))

    @unittest.skipIf(sys.version_info < (3, 11), "asyncio.TaskGroup is new in 3.11")
    async def test_taskgroup(self):
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(demo.local_sleep_ms(i % 3)) for i in range(20)]
            tasks.append(tg.create_task(demo.local_ready()))
        self.assertEqual([t.result() for t in tasks], [None] * 21)

    async def test_where_the_tasks_run(self):
        """A local task runs on the loop's thread; the runtime child it spawns
        and joins on another."""
        here = threading.get_ident()
        local, child = await asyncio.wait_for(demo.local_where(), 60)
        self.assertEqual(local, here)
        self.assertNotEqual(child, here)


class TestUnbound(unittest.TestCase):
    """Made with no running loop: binds, and starts, where first awaited."""

    def test_asyncio_run_takes_it(self):
        self.assertIsNone(asyncio.run(demo.local_ready()))
        self.assertIsNone(asyncio.run(demo.local_sleep_ms(1)))

    def test_binds_at_first_await(self):
        f = demo.local_ready()
        self.assertFalse(asyncio.isfuture(f))  # no loop yet

        async def main():
            self.assertIsNone(await f)
            return demo.local_info()

        info = asyncio.run(main())
        self.assertIn(info["mode"], ("shared", "asyncio"), info)

    def test_binds_to_the_loop_of_another_thread(self):
        """Made on this thread, first awaited by a loop on another: it runs
        on that loop's thread."""
        where = demo.local_where()
        out = {}

        def worker():
            out["ident"] = threading.get_ident()
            try:
                out["where"] = asyncio.run(asyncio.wait_for(where, 60))
            except BaseException as e:  # reported below
                out["error"] = e

        t = threading.Thread(target=worker)
        t.start()
        t.join(60)
        self.assertFalse(t.is_alive())
        self.assertNotIn("error", out)
        self.assertEqual(out["where"][0], out["ident"])
        self.assertNotEqual(out["ident"], threading.get_ident())

    def test_local_info_outside_a_loop(self):
        with self.assertRaises(RuntimeError):
            demo.local_info()


class TestSleep(LocalCase):
    async def test_never_early(self):
        t0 = time.monotonic()
        await asyncio.wait_for(demo.local_sleep_ms(20), 60)
        self.assertGreaterEqual(time.monotonic() - t0, 0.019)

    async def test_many_complete_in_deadline_order(self):
        """Sleeps of 0, 20, 40, 60 and 80 ms started in a shuffled order all
        complete, in the order of their deadlines. (Not of their lengths: on
        a slow machine, starting them all takes longer than 20 ms.)"""
        lengths = [20 * (i % 5) for i in range(100)]
        random.Random(7).shuffle(lengths)
        order = []
        futs = []
        for ms in lengths:
            deadline = time.monotonic() + ms / 1000
            f = demo.local_sleep_ms(ms)
            f.add_done_callback(lambda f, d=deadline: order.append(d))
            futs.append(f)
        self.assertEqual(await asyncio.wait_for(asyncio.gather(*futs), 60), [None] * 100)
        self.assertEqual(len(order), 100)
        # Each is due no later than the next, but for the clock readings
        # around a start and the loop's millisecond timer resolution.
        late = [(a, b) for a, b in zip(order, order[1:]) if a > b + 0.002]
        self.assertEqual(late, [])

    async def test_bad_arguments_raise_at_call(self):
        with self.assertRaises(ValueError):
            demo.local_sleep_ms(-1)
        with self.assertRaises(ValueError):
            demo.local_fail_errno(0)
        with self.assertRaises(TypeError):
            demo.local_await_py_n(42, 1)


class TestCancel(LocalCase):
    async def test_python_cancel_drops_the_c_task(self):
        f = demo.local_sleep_ms(60_000)
        self.assertEqual(local_live(), 1)
        f.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await f
        self.assertTrue(f.cancelled())
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())

    async def test_cancel_in_a_task_and_by_wait_for(self):
        task = asyncio.ensure_future(demo.local_sleep_ms(60_000))
        await asyncio.sleep(0)
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        with self.assertRaises(asyncio.TimeoutError):
            await asyncio.wait_for(demo.local_sleep_ms(60_000), 0.01)
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())

    async def test_cancel_message(self):
        if sys.version_info < (3, 9):
            self.skipTest("cancel(msg) is new in 3.9")
        f = demo.local_sleep_ms(60_000)
        f.cancel("enough")
        with self.assertRaises(asyncio.CancelledError) as cm:
            await f
        self.assertEqual(cm.exception.args, ("enough",))

    async def test_cancelling_the_c_task_cancels_the_python_awaitable(self):
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        never = loop.create_future()
        seen = []

        async def victim():
            started.set_result(None)
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        f = demo.local_await_py(victim())
        await asyncio.wait_for(started, 60)
        self.assertFalse(f.done())
        f.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await f
        self.assertTrue(await wait_until(lambda: len(seen) == 2), seen)
        self.assertEqual(seen, ["cancelled", "finally"])
        self.assertTrue(never.cancelled())
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())

    async def test_python_awaitable_cancelled_cancels_the_c_task(self):
        """The awaited Python future cancelled on its own: the local task
        ends, and its awaitable raises CancelledError."""
        fut = asyncio.get_running_loop().create_future()
        f = demo.local_await_py(fut)
        await asyncio.sleep(0)
        fut.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await asyncio.wait_for(f, 60)
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())

    async def test_cancel_a_pending_fd_wait(self):
        r, w = os.pipe()
        try:
            f = demo.local_read_ready(r)
            self.assertEqual(local_live(), 1)
            f.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await f
            self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())
            os.write(w, b"x")  # nobody waits any more
            self.assertIsNone(await asyncio.wait_for(demo.local_read_ready(r), 60))
        finally:
            os.close(r)
            os.close(w)


class TestGarbageCollection(LocalCase):
    async def test_unawaited_sleep_collected_cancels_its_task(self):
        aw = demo.local_sleep_ms(60_000)
        self.assertEqual(local_live(), 1)
        del aw
        gc.collect()
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())

    async def test_collected_while_awaiting_python_cancels_the_awaitable(self):
        started = asyncio.Event()
        seen = []

        async def victim():
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        aw = demo.local_await_py(victim())
        await asyncio.wait_for(started.wait(), 60)
        del aw
        gc.collect()
        self.assertTrue(await wait_until(lambda: seen == ["cancelled"]), seen)
        self.assertTrue(await wait_until(lambda: local_live() == 0), demo.local_info())


class TestPythonFromLocalTasks(LocalCase):
    async def test_result_comes_back(self):
        async def coro():
            await asyncio.sleep(0)
            return {"x": 1}

        self.assertEqual(await asyncio.wait_for(demo.local_await_py(coro()), 60), {"x": 1})
        obj = object()
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, obj)
        self.assertIs(await asyncio.wait_for(demo.local_await_py(fut), 60), obj)

    async def test_await_py_n(self):
        self.assertEqual(await asyncio.wait_for(
            demo.local_await_py_n(lambda: asyncio.sleep(0), 500), 60), 500)
        self.assertEqual(await demo.local_await_py_n(lambda: asyncio.sleep(0), 0), 0)

    async def test_contextvars_are_visible(self):
        var = contextvars.ContextVar("var")
        var.set("caller's value")

        async def read():
            return var.get()

        self.assertEqual(await asyncio.wait_for(demo.local_await_py(read()), 60),
                         "caller's value")
        seen = []

        def factory():
            seen.append(var.get())
            return asyncio.sleep(0)

        self.assertEqual(await asyncio.wait_for(demo.local_await_py_n(factory, 5), 60), 5)
        self.assertEqual(seen, ["caller's value"] * 5)

    async def test_exception_comes_back_unchanged(self):
        err = ValueError("with this message")

        async def coro():
            await asyncio.sleep(0)
            raise err

        try:  # not assertRaises: it drops the traceback
            await asyncio.wait_for(demo.local_await_py(coro()), 60)
        except ValueError as e:
            self.assertIs(e, err)
            frames = [fr.name for fr in traceback.extract_tb(e.__traceback__)]
            self.assertIn("coro", frames)  # raised there
        else:
            self.fail("no ValueError")

    async def test_errno_maps_to_oserror_subclass(self):
        cases = {
            errno.ENOENT: FileNotFoundError,
            errno.ECONNREFUSED: ConnectionRefusedError,
            errno.EACCES: PermissionError,
            errno.ETIMEDOUT: TimeoutError,
        }
        for code, exc in cases.items():
            with self.assertRaises(exc) as cm:
                await demo.local_fail_errno(code)
            self.assertEqual(cm.exception.errno, code)
            self.assertEqual(cm.exception.strerror, os.strerror(code))


class TestFdWait(LocalCase):
    async def test_completes_only_after_a_write(self):
        r, w = os.pipe()
        try:
            f = demo.local_read_ready(r)
            g = demo.local_read_ready(r)  # a second waiter on the same fd
            # A timer of the same host, a runtime round trip and loop turns:
            # the fd's watch had every chance to fire wrongly.
            await asyncio.wait_for(demo.local_sleep_ms(10), 60)
            await asyncio.wait_for(demo.sleep_ms(1), 60)
            for _ in range(10):
                await asyncio.sleep(0)
            self.assertFalse(f.done())
            self.assertFalse(g.done())
            os.write(w, b"x")
            self.assertIsNone(await asyncio.wait_for(f, 60))
            self.assertIsNone(await asyncio.wait_for(g, 60))
            # Readable already: completes again (a wait is one-shot).
            self.assertIsNone(await asyncio.wait_for(demo.local_read_ready(r), 60))
            self.assertEqual(os.read(r, 1), b"x")
        finally:
            os.close(r)
            os.close(w)


class TestForm(LocalCase):
    async def test_no_form_before_a_local_task(self):
        self.assertEqual(demo.local_info(), {"mode": None, "reason": None, "tasks_live": 0})

    async def test_form_reported(self):
        """The form this loop, backend and interpreter must get; on Debian's
        python3 with uvloop and the uv backend, "shared" (not a fallback)."""
        await demo.local_ready()
        info = demo.local_info()
        self.assertForm(info)
        self.assertEqual(info["tasks_live"], 0)
        f = demo.local_sleep_ms(60_000)
        self.assertEqual(demo.local_info()["tasks_live"], 1)
        f.cancel()

    @unittest.skipUnless(LOOP == "uvloop" and DEBIAN_PYTHON and not SHARED_OFF,
                         "shared form required with Debian's uvloop only")
    async def test_shared_on_debian_uvloop_with_the_uv_backend(self):
        await demo.local_sleep_ms(1)
        info = demo.local_info()
        if demo.backend() == "uv":
            self.assertEqual(info["mode"], "shared", info)
        else:
            self.assertEqual(info["mode"], "asyncio", info)
            self.assertIn("uv backend", info["reason"])


# ---- In a fresh interpreter ------------------------------------------------

# Every child starts like this: the same loop choice as the test run (the
# backend and PYTHONPATH come through the inherited environment). What the
# loops log (uvloop and asyncio both log to "asyncio") goes to LOGGED, and
# to stderr at exit.
CHILD_PRELUDE = """\
import asyncio, atexit, gc, json, logging, os, sys, threading, time
if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
import aiobridge_demo as demo

LOGGED = []

class Record(logging.Handler):
    def emit(self, record):
        LOGGED.append(record.getMessage())

logging.getLogger("asyncio").addHandler(Record())
atexit.register(lambda: LOGGED and sys.stderr.write("logged: %r\\n" % LOGGED))
"""


def run_child(body, env=None, timeout=60, setup=""):
    """Runs CHILD_PRELUDE, `setup` then `body` (each dedented) in a child
    interpreter (children.run)."""
    return children.run(CHILD_PRELUDE + textwrap.dedent(setup) + textwrap.dedent(body),
                        env=env, timeout=timeout)


last_json = children.last_json


# Starts local tasks that never finish on the running loop: long sleeps, fd
# waits on a pipe nobody writes, and an await of a never-set future.
START_PENDING = """
R, W = os.pipe()

async def start_pending():
    loop = asyncio.get_running_loop()
    keep = [demo.local_sleep_ms(3_600_000 + i) for i in range(5)]
    keep += [demo.local_read_ready(R) for _ in range(3)]
    keep.append(demo.local_await_py(loop.create_future()))
    await demo.local_sleep_ms(1)  # a timer of the host went round
    info = demo.local_info()
    assert info["tasks_live"] == 9, info
    return keep, info
"""


class ChildCase(unittest.TestCase):
    def assertQuiet(self, p, status=0):
        """Exit status `status` and nothing on stderr (no crash, no
        traceback, nothing the loops logged: see CHILD_PRELUDE)."""
        self.assertEqual((p.returncode, p.stderr), (status, ""),
                         "stdout:\n%s\nstderr:\n%s" % (p.stdout, p.stderr))

    def assertFormOk(self, info):
        """The child's form, as LocalCase.assertForm (the child's loop is
        of the same kind as ours)."""
        want = child_expected_form()
        if want[0] == "shared":
            self.assertEqual((info["mode"], info["reason"]), ("shared", None), info)
        elif want[0] == "asyncio":
            self.assertEqual(info["mode"], "asyncio", info)
            self.assertIn(want[1], info["reason"])
        else:
            self.assertIn(info["mode"], ("shared", "asyncio"), info)


def child_expected_form(shared_off=SHARED_OFF):
    """expected_form for a child's default loop (the run's loop kind)."""
    return expected_form(None, LOOP == "uvloop", shared_off)


class TestFormInChild(ChildCase):
    def test_shared_off_by_environment(self):
        """AIOBRIDGE_LOCAL_SHARED=0: the asyncio form, with that reason, on
        any loop; local tasks work in it."""
        p = run_child("""
        async def main():
            r, w = os.pipe()
            f = demo.local_read_ready(r)
            await demo.local_sleep_ms(2)
            os.write(w, b"x")
            await asyncio.wait_for(f, 60)
            async def py():
                await asyncio.sleep(0)
                return 5
            assert await demo.local_await_py(py()) == 5
            return demo.local_info()
        print(json.dumps({"info": asyncio.run(main()), "logged": LOGGED}))
        """, env={"AIOBRIDGE_LOCAL_SHARED": "0"})
        self.assertQuiet(p)
        s = last_json(p)
        self.assertEqual(s["logged"], [])
        self.assertEqual(s["info"], {"mode": "asyncio", "reason": "AIOBRIDGE_LOCAL_SHARED=0",
                                     "tasks_live": 0})


class TestLoopClose(ChildCase):
    CLOSE = """
    loop = asyncio.new_event_loop()
    keep, info = loop.run_until_complete(start_pending())
    loop.close()  # every handle of the local tasks closed first
    assert loop.is_closed()
    states = sorted(set(
        "pending" if not f.done() else "cancelled" if f.cancelled()
        else type(f.exception()).__name__ for f in keep))
    del keep
    gc.collect()
    # A new loop gets a fresh host.
    async def again():
        r, w = os.pipe()
        f = demo.local_read_ready(r)
        await demo.local_sleep_ms(1)
        os.write(w, b"x")
        await asyncio.wait_for(f, 60)
        return demo.local_info()
    loop2 = asyncio.new_event_loop()
    info2 = loop2.run_until_complete(again())
    loop2.close()
    info3 = asyncio.run(again())
    gc.collect()
    print(json.dumps({"info": info, "states": states, "info2": info2, "info3": info3,
                      "logged": LOGGED}))
    """

    def test_close_with_local_tasks_pending(self):
        """loop.close() with local sleeps, fd waits and a Python await in
        flight: no crash, nothing logged (uvloop's "handle.data is NULL"
        among others), and later loops run local tasks again."""
        p = run_child(self.CLOSE, setup=START_PENDING)
        self.assertQuiet(p)
        s = last_json(p)
        self.assertEqual(s["logged"], [])
        self.assertFormOk(s["info"])
        self.assertNotIn("pending", s["states"], s)  # closing finished them
        for info in (s["info2"], s["info3"]):
            self.assertEqual(info["mode"], s["info"]["mode"], s)
            self.assertEqual(info["tasks_live"], 0, s)

    def test_loop_dropped_without_close(self):
        """A loop that ran local tasks, dropped without close(), then local
        tasks on new loops (the dropped loop's host is cleaned up)."""
        p = run_child("""
        import warnings
        warnings.simplefilter("ignore", ResourceWarning)
        async def use():
            await demo.local_sleep_ms(1)
            await demo.local_ready()
            return demo.local_info()
        infos = []
        for _ in range(3):
            loop = asyncio.new_event_loop()
            infos.append(loop.run_until_complete(use()))
            del loop
            gc.collect()
        infos.append(asyncio.run(use()))
        print(json.dumps({"infos": infos}))
        """)
        # uvloop logs "deallocating an open event loop" for a loop never
        # closed: uvloop's own behaviour, whatever runs on the loop.
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("Fatal Python error", p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        s = last_json(p)
        self.assertEqual([i["tasks_live"] for i in s["infos"]], [0] * 4, s)


class TestExitInFlight(ChildCase):
    def test_asyncio_run_returns_with_local_tasks_pending(self):
        p = run_child(setup=START_PENDING, body="""
        KEEP = []
        async def main():
            keep, info = await start_pending()
            KEEP.extend(keep)
            return info
        info = asyncio.run(main())
        info2 = asyncio.run(start_pending())[1]
        print(json.dumps({"info": info, "info2": info2, "logged": LOGGED}))
        """)
        self.assertQuiet(p)
        s = last_json(p)
        self.assertEqual(s["logged"], [])
        self.assertFormOk(s["info"])

    def test_sys_exit_inside_the_loop(self):
        """sys.exit from a coroutine with local tasks in flight: asyncio.run
        closes the loop on the way out; the status is sys.exit's."""
        p = run_child(setup=START_PENDING, body="""
        async def main():
            keep, info = await start_pending()
            print(json.dumps({"info": info}), flush=True)
            sys.exit(3)
        asyncio.run(main())
        """)
        self.assertQuiet(p, status=3)
        self.assertFormOk(last_json(p)["info"])

    def test_exit_with_a_loop_never_closed(self):
        """Interpreter exit with local tasks in flight on a loop never closed,
        from inside run_until_complete (sys.exit) or after it."""
        for how, status in (("inside", 4), ("after", 0)):
            with self.subTest(how=how):
                p = run_child(setup=START_PENDING, body="""
                HOW = %r
                KEEP = []
                async def main():
                    keep, info = await start_pending()
                    KEEP.extend(keep)
                    print(json.dumps({"info": info}), flush=True)
                    if HOW == "inside":
                        sys.exit(4)
                loop = asyncio.new_event_loop()
                loop.run_until_complete(main())
                """ % how)
                self.assertQuiet(p, status=status)
                self.assertFormOk(last_json(p)["info"])

    # A loop running on another thread than the one that exits, with a local
    # sleep and a local fd wait in flight when the interpreter exits. In
    # the asyncio form their timer and fd watch are the loop's own
    # callbacks, which uvloop enters with PyGILState_Ensure: one due after
    # finalization crashes the process. So the exit hook has that loop drop
    # them before it returns: past the sleep's deadline (on the loop's own
    # clock, after the hook) and with the fd readable, both are still
    # pending. The shared form's callbacks are libuv's, without the GIL,
    # and never enter Python once finalization begins: there both finish as
    # usual until then. MODE: the loop runs on a daemon thread ("running");
    # the main thread first ran local tasks on it ("moved"); the daemon
    # thread is between two runs of it at the hook, and runs it again
    # before finalization ("paused").
    AFTER_THE_HOOK = """
    import asyncio, atexit, json, os, sys, threading, warnings
    if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    MODE = %r
    S = {"go": threading.Event(), "pid": os.getpid()}
    def after_the_bridge():  # registered first: runs after aiobridge's hook
        st = aiobridge.stats()
        out = {"quieted": st["exit_loops_quieted"],
               "timeouts": st["exit_quiet_timeouts"]}
        if os.getpid() != S["pid"]:  # a forked child
            print(json.dumps({"child": out}), flush=True)
            return
        os.write(W, b"x")
        S["go"].set()  # "paused": the thread runs its loop again
        async def look():
            loop = asyncio.get_running_loop()
            await asyncio.sleep(S["due"] + 0.1 - loop.time())
            return {"sleep": S["sleep"].done(), "read": S["read"].done()}
        f = asyncio.run_coroutine_threadsafe(look(), S["loop"])
        out["after"] = f.result(60)
        print(json.dumps(out), flush=True)
    atexit.register(after_the_bridge)
    import aiobridge, aiobridge_demo as demo
    R, W = os.pipe()
    started = threading.Event()
    async def start():
        loop = S["loop"] = asyncio.get_running_loop()
        await demo.local_sleep_ms(1)  # the host's timer went round
        S["info"] = demo.local_info()
        S["due"] = loop.time() + 1.5
        S["sleep"] = asyncio.ensure_future(demo.local_sleep_ms(1500))
        S["read"] = asyncio.ensure_future(demo.local_read_ready(R))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # both spawned
    def thread_main(loop):
        asyncio.set_event_loop(loop)
        if MODE != "moved":
            loop.run_until_complete(start())
        started.set()
        if MODE == "paused":
            S["go"].wait()
        loop.run_forever()
    loop = asyncio.new_event_loop()
    if MODE == "moved":
        loop.run_until_complete(start())
    threading.Thread(target=thread_main, args=(loop,), daemon=True).start()
    assert started.wait(60)
    print(json.dumps({"info": S["info"]}), flush=True)
    """

    def assertAfterTheHook(self, p):
        """The child's summaries: its form, and what the exit hook did."""
        self.assertQuiet(p)
        lines = [json.loads(l) for l in p.stdout.strip().splitlines()]
        info, last = lines[0]["info"], lines[-1]
        self.assertFormOk(info)
        self.assertEqual(info["tasks_live"], 0, info)
        shared = info["mode"] == "shared"
        self.assertEqual(last, {"after": {"sleep": shared, "read": shared},
                                "quieted": 0 if shared else 1, "timeouts": 0}, info)
        return lines

    def test_loop_of_another_thread_after_the_exit_hook(self):
        for mode in ("running", "moved", "paused"):
            with self.subTest(mode=mode):
                self.assertAfterTheHook(children.run(
                    textwrap.dedent(self.AFTER_THE_HOOK % mode)))

    def test_forked_child_leaves_the_parents_loop_alone(self):
        """A child forked while another thread runs a loop with local tasks
        exits without touching that loop, its parent's (nothing to wait
        for, nothing dropped from the epoll set they share): the parent's
        exit finds it as it was."""
        p = children.run(textwrap.dedent(self.AFTER_THE_HOOK % "running") + textwrap.dedent("""
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        """))
        lines = self.assertAfterTheHook(p)
        self.assertIn({"child": {"quieted": 0, "timeouts": 0}}, lines, lines)


class TestThreads(unittest.TestCase):
    def test_loops_in_several_threads(self):
        """asyncio.run on worker threads at once: each loop has its own host,
        and its local tasks run on its thread."""
        n = 3
        barrier = threading.Barrier(n, timeout=60)
        out = [None] * n

        def worker(k):
            async def main():
                await demo.local_ready()
                await demo.local_sleep_ms(1)
                barrier.wait()  # every loop has its host now
                where = await demo.local_where()
                await demo.local_await_py_n(lambda: asyncio.sleep(0), 20)
                return where[0], demo.local_info()

            try:
                tid, info = asyncio.run(asyncio.wait_for(main(), 60))
                out[k] = (tid == threading.get_ident(), info["tasks_live"], info["mode"])
            except BaseException as e:  # reported below
                out[k] = repr(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertFalse(any(t.is_alive() for t in threads))
        for got in out:
            self.assertEqual(got[:2], (True, 0), out)
            self.assertIn(got[2], ("shared", "asyncio"), out)

    def test_one_loop_run_on_another_thread(self):
        """A loop's local tasks run on the thread that ran its first one: on
        another thread, starting one raises RuntimeError."""
        loop = asyncio.new_event_loop()
        try:
            self.assertIsNone(loop.run_until_complete(demo.local_sleep_ms(1)))
            out = {}

            def worker():
                async def second():
                    try:
                        f = demo.local_ready()
                    except RuntimeError as e:
                        return "RuntimeError: %s" % e
                    await f
                    return "started"

                try:
                    out["res"] = loop.run_until_complete(second())
                except BaseException as e:  # reported below
                    out["res"] = repr(e)

            t = threading.Thread(target=worker)
            t.start()
            t.join(60)
            self.assertFalse(t.is_alive())
            self.assertTrue(out["res"].startswith("RuntimeError"), out)
            # Back on the first thread, they run again.
            self.assertIsNone(loop.run_until_complete(demo.local_sleep_ms(1)))
        finally:
            loop.close()


class TestHostileRegressions(unittest.TestCase):
    """What hostile testing broke once."""

    def new_loop(self, cls=None):
        if cls is not None:
            return cls()
        if LOOP == "uvloop":
            import uvloop
            return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def test_cancel_then_close_leaks_no_loop(self):
        """A local task cancelled just before its loop closes, with no loop
        iteration between: the closed loop is collected (a release once
        waited for a drain of the closed loop)."""
        import weakref

        async def cancel_then_return():
            t = demo.local_sleep_ms(10**6)
            await asyncio.sleep(0.001)
            t.cancel()

        refs = []
        for _ in range(10):
            loop = self.new_loop()
            loop.run_until_complete(cancel_then_return())
            loop.close()
            refs.append(weakref.ref(loop))
            del loop
        gc.collect()
        self.assertEqual(sum(r() is not None for r in refs), 0)

    def test_keyboard_interrupt_in_call_at_propagates(self):
        """Ctrl-C landing in the loop's call_at while a local timer is armed
        (asyncio form) leaves run_until_complete, and nothing is freed
        twice: the task was spawned, its awaitable stays valid."""

        class L(asyncio.SelectorEventLoop):
            arm = False

            def call_at(self, when, cb, *a, **k):
                if self.arm and getattr(cb, "__name__", "") == "timer":
                    self.arm = False
                    raise KeyboardInterrupt
                return super().call_at(when, cb, *a, **k)

        loop = L()
        self.addCleanup(loop.close)
        keep = []

        async def main():
            await demo.local_sleep_ms(1)
            loop.arm = True
            keep.append(demo.local_sleep_ms(10))
            await asyncio.wait_for(keep[0], 60)

        with self.assertRaises(KeyboardInterrupt):
            loop.run_until_complete(main())
        self.assertEqual(loop.run_until_complete(demo.local_ready()), None)

    def test_keyboard_interrupt_in_done_callback_scheduling(self):
        """Ctrl-C landing in call_soon while a finished local task schedules
        its done callbacks: it leaves run_until_complete (asyncio form)."""

        class L(asyncio.SelectorEventLoop):
            arm = False

            def call_soon(self, cb, *a, **k):
                if self.arm and getattr(cb, "__name__", "") == "on_done":
                    self.arm = False
                    raise KeyboardInterrupt
                return super().call_soon(cb, *a, **k)

        loop = L()
        self.addCleanup(loop.close)

        def on_done(f):
            pass

        async def main():
            await demo.local_ready()
            t = demo.local_sleep_ms(5)
            t.add_done_callback(on_done)
            loop.arm = True
            await asyncio.sleep(60)

        with self.assertRaises(KeyboardInterrupt):
            loop.run_until_complete(main())

    def test_fd_errors_are_oserrors(self):
        """fd waits the loop refuses fail with the errno's OSError, quietly,
        in both forms: a regular file, a closed fd."""
        fr = os.open(__file__, os.O_RDONLY)
        self.addCleanup(os.close, fr)

        def closed_fd():
            r, w = os.pipe()  # made now: no fd of the loop takes the number
            os.close(r)
            os.close(w)
            return r

        async def main():
            await demo.local_ready()  # the loop's fds for local tasks
            out = []
            for make in (lambda: fr, closed_fd):
                try:
                    await asyncio.wait_for(demo.local_read_ready(make()), 60)
                    out.append(None)
                except OSError as e:
                    out.append(e.errno)
            return out

        loop = self.new_loop()
        self.addCleanup(lambda: loop.close())  # the close of now: the hook
        got = loop.run_until_complete(main())
        self.assertEqual(got, [errno.EPERM, errno.EBADF])

    @unittest.skipUnless(LOOP == "uvloop", "uvloop's own close")
    def test_uvloop_close_bypassing_the_hook_never_hangs(self):
        """uvloop's own close, called past the hook (type(loop).close), on a
        loop that ran a local task: it returns (an error at worst), never
        hangs on the local tasks' handles."""
        p = run_child(
            """
            import uvloop
            loop = uvloop.new_event_loop()
            loop.run_until_complete(demo.local_sleep_ms(1))
            try:
                type(loop).close(loop)
                out = "closed"
            except OSError as e:
                out = "error %d" % e.errno
            print(json.dumps({"out": out, "mode": None}))
            """
        )
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(last_json(p)["out"], ("closed", "error %d" % errno.EBUSY))


@unittest.skipUnless(hasattr(sys, "gettotalrefcount"), "needs a debug interpreter (python3-dbg)")
class TestLocalReferenceLeaks(unittest.TestCase):
    def test_local_tasks_do_not_leak(self):
        from test_bridge import references_leaked

        class V:
            pass

        async def coro(v):
            await asyncio.sleep(0)
            return v

        async def never():
            await asyncio.Event().wait()

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)

        async def work():
            for _ in range(20):
                await demo.local_ready()
                await demo.local_sleep_ms(0)
                await demo.local_await_py(coro(V()))
                await demo.local_await_py_n(lambda: coro(V()), 3)
                try:
                    await demo.local_fail_errno(errno.ENOENT)
                except FileNotFoundError:
                    pass
                f = asyncio.ensure_future(demo.local_await_py(never()))
                await asyncio.sleep(0)
                f.cancel()
                try:
                    await f
                except asyncio.CancelledError:
                    pass
                demo.local_sleep_ms(60_000)  # collected unawaited
                await demo.local_where()
                f = asyncio.ensure_future(demo.local_read_ready(r))
                os.write(w, b"x")
                await f
                os.read(r, 1)

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over ~2000 calls")


if __name__ == "__main__":
    unittest.main()
