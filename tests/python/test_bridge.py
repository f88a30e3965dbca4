"""The asyncio bridge, through the aiobridge_demo extension.

Run with the extension's build directory on PYTHONPATH. AIOB_TEST_LOOP=uvloop
runs every test on uvloop; AIOBRIDGE_BACKEND picks the runtime's backend.
"""
import asyncio
import contextvars
import errno
import gc
import os
import random
import subprocess
import sys
import warnings
import textwrap
import threading
import time
import unittest

import aiobridge
import aiobridge_demo as demo

LOOP = os.environ.get("AIOB_TEST_LOOP", "asyncio")
if LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def wait_until(predicate, timeout=10.0):
    """Polls a condition the C runtime makes true asynchronously, letting the
    loop run (cancellation reaches the runtime through loop callbacks)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def cancel_c_sleep_after(delay):
    """Starts a 1 ms C sleep and cancels it after `delay` seconds: before,
    around or after its completion."""
    fut = asyncio.ensure_future(demo.sleep_ms(1))
    await asyncio.sleep(delay)
    fut.cancel()
    try:
        await fut
    except asyncio.CancelledError:
        pass


async def returns_after_a_step(x):
    await asyncio.sleep(0)
    return x


async def raises_after_a_step(message):
    await asyncio.sleep(0)
    raise ValueError(message)


class BridgeCase(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.loop_errors = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        # Debug mode (the test case's) warns of callbacks over 0.1 s: a
        # preemption on a loaded machine, not a finding.
        loop.slow_callback_duration = 60

    async def asyncTearDown(self):
        await asyncio.sleep(0.01)  # let late completions arrive
        self.assertEqual(self.loop_errors, [], "the loop's exception handler fired")


class TestCTaskAsAwaitable(BridgeCase):
    async def test_backend_follows_environment(self):
        want = os.environ.get("AIOBRIDGE_BACKEND")
        if want:
            self.assertEqual(demo.backend(), want)
        self.assertIn(demo.backend(), ("uv", "event", "uring"))

    async def test_ready_and_echo_identity(self):
        self.assertIsNone(await demo.ready())
        obj = object()
        self.assertIs(await demo.echo(obj), obj)

    async def test_sleep_ms_is_never_early(self):
        t0 = time.monotonic()
        await demo.sleep_ms(20)
        self.assertGreaterEqual(time.monotonic() - t0, 0.019)

    async def test_errno_maps_to_oserror_subclass(self):
        cases = {
            errno.ENOENT: FileNotFoundError,
            errno.ECONNREFUSED: ConnectionRefusedError,
            errno.EAGAIN: BlockingIOError,
            errno.EACCES: PermissionError,
            errno.ETIMEDOUT: TimeoutError,
        }
        for code, exc in cases.items():
            with self.assertRaises(exc) as cm:
                await demo.fail_errno(code)
            self.assertEqual(cm.exception.errno, code)
            self.assertEqual(cm.exception.strerror, os.strerror(code))

    async def test_bad_arguments_raise_at_call(self):
        with self.assertRaises(ValueError):
            demo.sleep_ms(-1)
        with self.assertRaises(ValueError):
            demo.fail_errno(0)
        with self.assertRaises(TypeError):
            demo.await_py_n(42, 1)

    async def test_gather_wait_for_shield_ensure_future(self):
        res = await asyncio.gather(*(demo.echo(i) for i in range(1000)))
        self.assertEqual(res, list(range(1000)))
        self.assertEqual(await asyncio.wait_for(demo.echo(7), 5), 7)
        self.assertEqual(await asyncio.shield(demo.echo(8)), 8)
        fut = asyncio.ensure_future(demo.echo(9))
        self.assertEqual(await fut, 9)
        with self.assertRaises(asyncio.TimeoutError):
            await asyncio.wait_for(demo.sleep_ms(10000), 0.01)

    async def test_is_an_asyncio_future(self):
        # From 3.10, gather, wait_for, shield and ensure_future take it as
        # it is: no Task is made around it (3.8 and 3.9 look for a
        # coroutine first and wrap it in a Task).
        fut = demo.echo(5)
        self.assertTrue(asyncio.isfuture(fut))
        self.assertIs(fut.get_loop(), asyncio.get_running_loop())
        tasks = len(asyncio.all_tasks())
        gathered = asyncio.gather(fut, demo.echo(6))
        if sys.version_info >= (3, 10):
            self.assertIs(asyncio.ensure_future(fut), fut)
            self.assertEqual(len(asyncio.all_tasks()), tasks)
        self.assertEqual(await gathered, [5, 6])
        self.assertEqual((fut.done(), fut.cancelled(), fut.result()), (True, False, 5))
        self.assertIsNone(fut.exception())
        with self.assertRaises(TypeError):
            type(fut)()  # made by the bridge only

    async def test_done_callbacks(self):
        fut = demo.echo(1)
        seen = []
        fut.add_done_callback(lambda f: seen.append(("a", f.result())))
        fut.add_done_callback(lambda f: seen.append(("b", f.result())))
        drop = lambda f: seen.append("removed")
        fut.add_done_callback(drop)
        fut.add_done_callback(drop)
        self.assertEqual(fut.remove_done_callback(drop), 2)
        self.assertEqual(fut.remove_done_callback(drop), 0)
        await fut
        await asyncio.sleep(0)
        self.assertEqual(seen, [("a", 1), ("b", 1)])
        fut.add_done_callback(lambda f: seen.append("late"))  # already done
        self.assertEqual(seen[-1], ("b", 1))  # scheduled, not called inline
        await asyncio.sleep(0)
        self.assertEqual(seen[-1], "late")
        pending = demo.sleep_ms(60_000)
        with self.assertRaises(asyncio.InvalidStateError):
            pending.result()
        with self.assertRaises(asyncio.InvalidStateError):
            pending.exception()
        self.assertTrue(pending.cancel("why"))
        self.assertFalse(pending.cancel())
        with self.assertRaises(asyncio.CancelledError):
            await pending

    async def test_done_callback_context_and_errors(self):
        var = contextvars.ContextVar("var", default="unset")
        fut = demo.echo(1)
        seen = []
        ctx = contextvars.copy_context()
        ctx.run(var.set, "in ctx")
        fut.add_done_callback(lambda f: seen.append(var.get()), context=ctx)

        def boom(f):
            raise ValueError("boom")

        fut.add_done_callback(boom)
        var.set("at registration")
        fut.add_done_callback(lambda f: seen.append(var.get()))
        var.set("later")
        await fut
        await asyncio.sleep(0)
        # each runs in its own context; a failing one is reported and the
        # next still runs
        self.assertEqual(seen, ["in ctx", "at registration"])
        self.assertEqual(len(self.loop_errors), 1)
        err = self.loop_errors.pop()
        self.assertIsInstance(err["exception"], ValueError)
        self.assertIn("Exception in callback", err["message"])

    async def test_cancel_message_and_close(self):
        fut = demo.sleep_ms(60_000)
        fut.cancel("enough")
        with self.assertRaises(asyncio.CancelledError) as cm:
            await fut
        if sys.version_info >= (3, 9):  # cancel(msg) is new in 3.9
            self.assertEqual(cm.exception.args, ("enough",))
        # close() before it ever ran: the C task never starts.
        spawned = demo.stats()["tasks_spawned"]

        def unstarted():
            return demo.sleep_ms(60_000)

        fut = await asyncio.get_running_loop().run_in_executor(None, unstarted)
        self.assertFalse(asyncio.isfuture(fut))  # no loop yet: a coroutine
        fut.close()
        self.assertTrue(fut.cancelled())
        self.assertEqual(demo.stats()["tasks_spawned"], spawned)

    async def test_unretrieved_failure_is_reported(self):
        fut = demo.fail_errno(errno.ENOENT)
        await asyncio.sleep(0.05)
        self.assertTrue(fut.done())
        del fut
        gc.collect()
        self.assertEqual(len(self.loop_errors), 1)
        ctx = self.loop_errors.pop()
        self.assertEqual(ctx["message"], "CTask exception was never retrieved")
        self.assertIsInstance(ctx["exception"], FileNotFoundError)

    async def test_wait(self):
        # asyncio.wait takes tasks and futures; from 3.11 it refuses
        # coroutine objects, and a CTask is both, so there it goes in a Task.
        if sys.version_info < (3, 11):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                done, _ = await asyncio.wait([demo.echo(1)])
            self.assertEqual([f.result() for f in done], [1])
        done, pending = await asyncio.wait(
            [asyncio.create_task(demo.echo(2)), asyncio.create_task(demo.sleep_ms(60_000))],
            timeout=0.5,
        )
        self.assertEqual([f.result() for f in done], [2])
        pending.pop().cancel()

    @unittest.skipIf(sys.version_info < (3, 11), "asyncio.TaskGroup is new in 3.11")
    async def test_taskgroup(self):
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(demo.echo(i)) for i in range(10)]
        self.assertEqual([t.result() for t in tasks], list(range(10)))

    async def test_cancel_drops_c_task(self):
        before = demo.stats()["tasks_cancelled"]
        fut = asyncio.ensure_future(demo.sleep_ms(60_000))
        await asyncio.sleep(0.01)
        fut.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await fut
        self.assertTrue(await wait_until(lambda: demo.stats()["tasks_cancelled"] > before))

    async def test_unawaited_future_collected_cancels_c_task(self):
        before = demo.stats()["tasks_cancelled"]
        aw = demo.sleep_ms(60_000)
        del aw
        gc.collect()
        self.assertTrue(await wait_until(lambda: demo.stats()["tasks_cancelled"] > before))

    async def test_completion_racing_cancel_is_silent(self):
        for i in range(300):
            await cancel_c_sleep_after(random.uniform(0, 0.002))


class TestPythonAwaitableInC(BridgeCase):
    async def test_result_comes_back(self):
        async def coro():
            await asyncio.sleep(0.001)
            return {"x": 1}

        self.assertEqual(await demo.await_py(coro()), {"x": 1})
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, fut.set_result, "f")
        self.assertEqual(await demo.await_py(fut), "f")

    async def test_exception_propagates_unchanged(self):
        class Boom(Exception):
            pass

        async def coro():
            raise Boom("with this message")

        with self.assertRaises(Boom) as cm:
            await demo.await_py(coro())
        self.assertEqual(str(cm.exception), "with this message")

    async def test_non_awaitable_is_type_error(self):
        with self.assertRaises(TypeError):
            await demo.await_py(42)

    async def test_object_with_await(self):
        class Awaitable:
            def __await__(self):
                yield from asyncio.sleep(0).__await__()
                return "custom"

        self.assertEqual(await demo.await_py(Awaitable()), "custom")

    async def test_contextvars_are_visible(self):
        var = contextvars.ContextVar("var")
        var.set("caller's value")

        async def read():
            return var.get()

        self.assertEqual(await demo.await_py(read()), "caller's value")
        seen = []

        def factory():
            seen.append(var.get())
            return asyncio.sleep(0)

        self.assertEqual(await demo.await_py_n(factory, 5), 5)
        self.assertEqual(seen, ["caller's value"] * 5)

    async def test_await_py_n(self):
        self.assertEqual(await demo.await_py_n(lambda: asyncio.sleep(0), 1000), 1000)
        self.assertEqual(await demo.await_py_n(lambda: asyncio.sleep(0), 0), 0)

    async def test_runs_as_a_task_of_the_loop(self):
        """The coroutine runs in a Task of the loop (current_task() is it),
        whose repr and stack show the coroutine; cancelling that Task
        cancels the C task's await."""
        seen = {}
        started = asyncio.Event()

        async def waits():
            seen["task"] = asyncio.current_task()
            started.set()
            await asyncio.sleep(3600)

        fut = asyncio.ensure_future(demo.await_py(waits()))
        await asyncio.wait_for(started.wait(), 30)
        task = seen["task"]
        self.assertIsNot(task, asyncio.current_task())
        self.assertIn(task, asyncio.all_tasks())
        self.assertIn("waits()", repr(task))
        self.assertEqual([f.f_code.co_name for f in task.get_stack()], ["waits"])
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await asyncio.wait_for(fut, 30)

    @unittest.skipUnless(hasattr(asyncio, "eager_task_factory"),
                         "asyncio.eager_task_factory is new in 3.12")
    async def test_with_an_eager_task_factory(self):
        """On a loop whose tasks start eagerly, coroutines that finish in
        their first step (with a result or an exception) and later ones."""
        async def now(x):
            return x

        async def boom():
            raise ValueError("at once")

        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        try:
            for _ in range(50):
                self.assertEqual(await demo.await_py(now(3)), 3)
                self.assertEqual(await demo.await_py(returns_after_a_step(4)), 4)
                with self.assertRaisesRegex(ValueError, "at once"):
                    await demo.await_py(boom())
            self.assertEqual(await demo.await_py_n(lambda: now(1), 500), 500)
        finally:
            asyncio.get_running_loop().set_task_factory(None)

    async def test_task_cancelled_as_its_coroutine_returns(self):
        """A coroutine that cancels its own Task and returns: the Task ends
        cancelled, and so does the C task's await of it."""
        async def cancels_itself_then_returns():
            asyncio.current_task().cancel()
            return 5

        with self.assertRaises(asyncio.CancelledError):
            await demo.await_py(cancels_itself_then_returns())
        self.assertEqual(await demo.echo(1), 1)

    async def test_with_a_wrapping_task_factory(self):
        """A task factory that runs the coroutine it is given inside one of
        its own (as tracing does): results and exceptions come through, and
        nothing is logged."""
        def factory(loop, coro, **kw):
            async def traced():
                try:
                    return await coro
                finally:
                    await asyncio.sleep(0)
            return asyncio.Task(traced(), loop=loop, **kw)

        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)
        try:
            for _ in range(20):
                self.assertEqual(await demo.await_py(returns_after_a_step(3)), 3)
                with self.assertRaisesRegex(ValueError, "expected"):
                    await demo.await_py(raises_after_a_step("expected"))
            self.assertEqual(
                await demo.await_py_n(lambda: returns_after_a_step(1), 100), 100)
        finally:
            loop.set_task_factory(None)
        gc.collect()  # an unretrieved exception would be reported now
        await asyncio.sleep(0.01)

    async def test_cancelling_c_task_cancels_python_task(self):
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def forever():
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        fut = asyncio.ensure_future(demo.await_py(forever()))
        await asyncio.wait_for(started.wait(), 5)
        fut.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)
        with self.assertRaises(asyncio.CancelledError):
            await fut


class TestLoops(unittest.TestCase):
    def test_asyncio_run_without_wrapper(self):
        self.assertIsNone(asyncio.run(demo.sleep_ms(5)))
        self.assertEqual(asyncio.run(demo.echo("x")), "x")

    def test_several_asyncio_run_in_a_row(self):
        for i in range(20):
            self.assertEqual(asyncio.run(demo.echo(i)), i)

    def test_loops_in_several_threads(self):
        errors = []

        def worker(k):
            async def main():
                res = await asyncio.gather(*(demo.echo((k, i)) for i in range(500)))
                assert res == [(k, i) for i in range(500)]
                await demo.await_py_n(lambda: asyncio.sleep(0), 50)

            try:
                asyncio.run(main())
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])

    def test_thousand_loops_cancel_around_completion(self):
        """Each fresh loop cancels a C sleep at a jittered moment around its
        completion; the loop's exception handler must never fire."""
        fired = []
        rng = random.Random(1234)
        for _ in range(1000):
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(lambda l, ctx: fired.append(ctx))

            loop.run_until_complete(cancel_c_sleep_after(rng.uniform(0.0005, 0.0015)))
            loop.close()
        self.assertEqual(fired, [])


class TestCallbackInterrupt(unittest.TestCase):
    def test_keyboard_interrupt_from_done_callback_leaves_the_loop(self):
        # As from any loop callback; nothing queued behind it is lost.
        loop = asyncio.new_event_loop()
        seen = []

        def interrupt(f):
            raise KeyboardInterrupt

        futs = []

        async def main():
            futs.extend(demo.echo(i) for i in range(50))
            futs[0].add_done_callback(interrupt)
            futs[0].add_done_callback(lambda f: seen.append("after"))
            for f in futs[1:]:
                f.add_done_callback(lambda f: seen.append(f.result()))
            await asyncio.sleep(5)

        try:
            task = loop.create_task(main())
            with self.assertRaises(KeyboardInterrupt):
                loop.run_until_complete(task)

            async def finish():
                await asyncio.gather(*futs)
                await asyncio.sleep(0.01)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            loop.run_until_complete(finish())
        finally:
            loop.close()
        self.assertIn("after", seen)
        self.assertEqual(sorted(x for x in seen if x != "after"), list(range(1, 50)))


class TestLifecycle(unittest.TestCase):
    SCRIPT = textwrap.dedent(
        """
        import asyncio, os, sys
        if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        import aiobridge_demo as demo

        async def main():
            async def py():
                await asyncio.sleep(0)
                return 1
            await demo.await_py(py())
            keep = [asyncio.ensure_future(demo.sleep_ms(1000 + i)) for i in range(50)]
            keep += [asyncio.ensure_future(demo.await_py(asyncio.sleep(10)))]
            await asyncio.sleep(0.005)
            sys.exit(0)  # exit with C tasks and Python awaits in flight

        asyncio.run(main())
        """
    )

    def test_exit_with_tasks_in_flight(self):
        for i in range(10):
            p = subprocess.run(
                [sys.executable, "-c", self.SCRIPT],
                capture_output=True,
                text=True,
                timeout=30,
            )
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertNotIn("Fatal Python error", p.stderr)
            self.assertNotIn("Exception ignored", p.stderr)


def run_python(script, env=None, timeout=30):
    """Runs a fresh interpreter on `script` with this test's loop choice."""
    prelude = textwrap.dedent(
        """
        import asyncio, os
        if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        """
    )
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


class TestAiobridgeModule(BridgeCase):
    STATS_KEYS = {
        "tasks_live", "tasks_spawned", "tasks_completed", "tasks_cancelled",
        "polls", "loop_wakes", "spins", "spin_hits", "spin_ns", "spins_skipped",
        "blocking_jobs_run", "blocking_jobs_cancelled", "blocking_workers",
        "completions", "py_loop_wakes", "py_awaits", "py_spins",
        "py_spin_hits", "py_spins_skipped", "exit_loops_quieted",
        "exit_quiet_timeouts", "ports",
    }

    async def test_exception_types(self):
        self.assertTrue(issubclass(aiobridge.ShutdownError, aiobridge.Error))
        self.assertTrue(issubclass(aiobridge.ShutdownError, RuntimeError))
        self.assertTrue(issubclass(aiobridge.BackendError, aiobridge.Error))
        self.assertTrue(issubclass(aiobridge.BackendError, OSError))
        self.assertTrue(issubclass(aiobridge.ShutdownTimeoutError, aiobridge.Error))
        self.assertTrue(issubclass(aiobridge.ShutdownTimeoutError, TimeoutError))

    async def test_stats_keys_and_counts(self):
        self.assertEqual(set(demo.stats()), self.STATS_KEYS)
        self.assertEqual(set(aiobridge.stats()), self.STATS_KEYS)
        before = aiobridge.stats(demo)
        await asyncio.gather(*(demo.ready() for _ in range(100)))
        await demo.await_py_n(lambda: asyncio.sleep(0), 10)
        ok = await wait_until(
            lambda: aiobridge.stats(demo)["tasks_completed"] >= before["tasks_completed"] + 101
        )
        self.assertTrue(ok, aiobridge.stats(demo))
        after = aiobridge.stats("aiobridge_demo")
        self.assertGreaterEqual(after["tasks_spawned"] - before["tasks_spawned"], 101)
        self.assertGreaterEqual(after["completions"] - before["completions"], 101)
        self.assertGreaterEqual(after["py_awaits"] - before["py_awaits"], 10)
        self.assertGreater(after["py_loop_wakes"], before["py_loop_wakes"])
        self.assertGreaterEqual(after["ports"], 1)
        # One imported extension: the totals are its counters.
        self.assertEqual(aiobridge.stats()["tasks_spawned"], aiobridge.stats(demo)["tasks_spawned"])

    async def test_backend_and_runtime_info(self):
        await demo.ready()
        want = os.environ.get("AIOBRIDGE_BACKEND") or aiobridge.runtime_info(demo)["default_backend"]
        self.assertEqual(aiobridge.backend(), want)
        self.assertEqual(aiobridge.backend(demo), want)
        self.assertEqual(demo.backend(), want)
        info = aiobridge.runtime_info(demo)
        self.assertEqual(info["module"], "aiobridge_demo")
        self.assertTrue(info["running"])
        self.assertEqual(info["backend"], want)
        self.assertEqual(info["threads"], 1)
        self.assertIsInstance(info["spin_us"], int)
        self.assertGreaterEqual(info["blocking_threads"], 1)
        self.assertIn(want, info["backends"])
        self.assertEqual(info["abandoned_threads"], 0)
        self.assertEqual(aiobridge.runtime_info(), [info])

    async def test_bad_module_argument(self):
        with self.assertRaises(TypeError):
            aiobridge.stats(42)
        with self.assertRaises(LookupError):
            aiobridge.stats("no_such_extension")
        with self.assertRaises(LookupError):
            aiobridge.shutdown(asyncio)  # a module, but not an aiobridge one

    async def test_shutdown_fails_in_flight_and_restarts(self):
        """C tasks in flight fail with ShutdownError (not CancelledError,
        which stays for cancellations asked for), the Python coroutine a C
        task awaited is cancelled, and the next call starts a fresh
        runtime."""
        sleeper = asyncio.ensure_future(demo.sleep_ms(60_000))
        cancelled = asyncio.ensure_future(demo.sleep_ms(60_000))
        started, seen = asyncio.Event(), []

        async def forever():
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        awaiting = asyncio.ensure_future(demo.await_py(forever()))
        await started.wait()
        self.assertTrue(await wait_until(lambda: aiobridge.stats(demo)["tasks_live"] == 3))
        cancelled.cancel()
        self.assertIsNone(aiobridge.shutdown(demo, timeout=30))
        self.assertFalse(aiobridge.runtime_info(demo)["running"])
        for fut in (sleeper, awaiting):
            with self.assertRaises(aiobridge.ShutdownError):
                await asyncio.wait_for(fut, 5)
        with self.assertRaises(asyncio.CancelledError):
            await cancelled
        self.assertTrue(await wait_until(lambda: seen))
        self.assertEqual(seen, ["cancelled"])
        # The next call starts a fresh runtime.
        self.assertEqual(await demo.echo("again"), "again")
        self.assertTrue(aiobridge.runtime_info(demo)["running"])
        self.assertEqual(aiobridge.stats(demo)["tasks_spawned"], 1)
        aiobridge.shutdown()  # no limit, as before
        self.assertEqual(await demo.echo("and again"), "and again")

    def test_unknown_backend_is_backend_error(self):
        p = run_python(
            """
            import errno, aiobridge, aiobridge_demo as demo
            try:
                asyncio.run(demo.ready())
            except aiobridge.BackendError as e:
                assert e.errno == errno.ENOENT, e.errno
                assert "AIOBRIDGE_BACKEND=nope" in str(e), str(e)
                # Why: the backend is named, with the ones the build has.
                assert 'no backend "nope" in this build' in str(e), str(e)
                assert aiobridge.runtime_info(demo)["default_backend"] in str(e), str(e)
                print("ok")
            """,
            env={"AIOBRIDGE_BACKEND": "nope"},
        )
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "ok"), p.stderr)

    def test_missing_aiobridge_module_is_import_error(self):
        p = run_python(
            """
            import sys
            sys.modules["aiobridge"] = None  # makes `import aiobridge` fail
            try:
                import aiobridge_demo
            except ImportError as e:
                assert "needs the aiobridge module" in str(e), str(e)
                print("ok")
            """
        )
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "ok"), p.stderr)

    def test_calls_after_interpreter_exit_hook_raise_shutdown_error(self):
        # atexit runs handlers last-registered first: this one, registered
        # before the extension is imported, runs after the bridge's hook.
        p = run_python(
            """
            import atexit

            def late():
                import aiobridge, aiobridge_demo as demo
                try:
                    asyncio.run(demo.ready())
                except aiobridge.ShutdownError:
                    print("ShutdownError")

            atexit.register(late)
            import aiobridge_demo as demo
            asyncio.run(demo.ready())
            """
        )
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "ShutdownError"), p.stderr)


class TestSpinUnderContention(unittest.TestCase):
    """A loop thread that waits for a CPU tries its round trips without
    the spin, and keeps whichever way got more done (core/spin_gate.c;
    the choice itself is unit-tested in unit_core)."""

    # The child's prelude: a busy process pinned to one CPU, killed at the
    # end (and gone by itself after 120 s or with the child).
    HOG = """
        import subprocess, sys, time, aiobridge, aiobridge_demo as demo
        cpu = max(os.sched_getaffinity(0))
        HOG = (
            "import os, time\\n"
            f"os.sched_setaffinity(0, {{{cpu}}})\\n"
            "end = time.monotonic() + 120\\n"
            "print('on', flush=True)\\n"
            f"while time.monotonic() < end and os.getppid() == {os.getpid()}: pass\\n"
        )

        def start_hog():
            hog = subprocess.Popen([sys.executable, "-c", HOG],
                                   stdout=subprocess.PIPE, text=True)
            assert hog.stdout.readline() == "on\\n"
            return hog

        def sleep0():
            return asyncio.sleep(0)

        # Runs step() for 1 s beside the hog; prints what the counters
        # `keys` of aiobridge.stats() gained.
        async def under_hog(step, keys):
            hog = start_hog()
            try:
                await step()
                before = aiobridge.stats(demo)
                start = time.monotonic()
                while time.monotonic() - start < 1.0:
                    await step()
                after = aiobridge.stats(demo)
            finally:
                hog.kill()
                hog.wait()
            print(" ".join(str(after[k] - before[k]) for k in keys))
        """

    def run_child(self, body):
        if len(os.sched_getaffinity(0)) < 2:
            self.skipTest("one CPU: loop threads never spin")
        try:
            with open("/proc/thread-self/schedstat") as f:
                ran = int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as e:
            self.skipTest(f"no schedstat ({e}): the gate cannot see a wait")
        if not ran:
            self.skipTest("schedstat reads 0: the kernel does not account run delay")
        p = run_python(textwrap.dedent(self.HOG) + textwrap.dedent(body), timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        return [int(x) for x in p.stdout.split()]

    def test_asyncio_loop_thread(self):
        # After a C task's await of Python completes, the asyncio loop's
        # thread may spin for the task's next request.
        awaits, spins, skipped = self.run_child(
            """
            async def step():
                assert await demo.await_py_n(sleep0, 200) == 200

            async def main():
                # The port is made while both CPUs are the loop thread's.
                assert await demo.await_py_n(sleep0, 100) == 100
                os.sched_setaffinity(0, {cpu})  # this thread only
                await under_hog(step, ("py_awaits", "py_spins", "py_spins_skipped"))

            asyncio.run(main())
            """
        )
        self.assertGreater(awaits, 0)
        self.assertGreater(spins, 0)
        self.assertGreater(skipped, 0, "no try without the spin")

    def test_runtime_loop_thread(self):
        # The runtime's loop thread may spin for the next task to poll.
        polls, spins, skipped = self.run_child(
            """
            os.sched_setaffinity(0, {cpu})  # the runtime's thread too

            async def step():
                for _ in range(100):
                    await demo.ready()

            asyncio.run(under_hog(step, ("polls", "spins", "spins_skipped")))
            """
        )
        self.assertGreater(polls, 0)
        self.assertGreater(skipped, 0, "no try without the spin")


class TestLoopGoesAway(unittest.TestCase):
    def test_loop_closed_with_c_tasks_in_flight(self):
        """Closing (then dropping) a loop with C tasks in flight: no crash, no
        "Exception ignored" noise, and the C tasks are cancelled."""
        p = run_python(
            """
            import gc, time, aiobridge, aiobridge_demo as demo
            base = aiobridge.stats(demo)
            loop = asyncio.new_event_loop()
            async def start():
                fut = loop.create_future()
                return [demo.sleep_ms(60_000) for _ in range(20)] + [demo.await_py(fut)], fut
            aws, fut = loop.run_until_complete(start())
            time.sleep(0.05)
            assert aiobridge.stats(demo)["tasks_live"] == 21, aiobridge.stats(demo)
            loop.close()
            del aws, fut, start, loop
            gc.collect()
            deadline = time.monotonic() + 10
            while aiobridge.stats(demo)["tasks_live"] and time.monotonic() < deadline:
                time.sleep(0.01)
            st = aiobridge.stats(demo)
            assert st["tasks_live"] == 0, st
            assert st["tasks_cancelled"] - base["tasks_cancelled"] == 21, st
            # Another loop still works, and the closed one's port is gone.
            assert asyncio.run(demo.echo(5)) == 5
            assert aiobridge.stats(demo)["ports"] == 1, aiobridge.stats(demo)
            print("ok")
            """
        )
        self.assertEqual(p.stdout.strip(), "ok", p.stderr)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("Exception ignored", p.stderr)
        self.assertNotIn("Traceback", p.stderr)


def references_leaked(work, rounds=10):
    """The growth of the debug interpreter's total reference count over
    `rounds` runs of the coroutine function `work`, after 3 warm-up runs.

    A stock loop even under AIOB_TEST_LOOP=uvloop: Debian's uvloop is built
    for the release ABI, and its inline reference counting does not
    maintain the debug interpreter's total, so the count drifts."""
    loop = asyncio.SelectorEventLoop()
    try:
        for _ in range(3):  # warm up caches
            loop.run_until_complete(work())
        gc.collect()
        before = sys.gettotalrefcount()
        for _ in range(rounds):
            loop.run_until_complete(work())
        gc.collect()
        return sys.gettotalrefcount() - before
    finally:
        loop.close()


@unittest.skipUnless(hasattr(sys, "gettotalrefcount"), "needs a debug interpreter (python3-dbg)")
class TestReferenceLeaks(unittest.TestCase):
    def test_conversions_do_not_leak(self):
        async def work():
            obj = object()
            for _ in range(200):
                await demo.echo(obj)
                await demo.await_py(asyncio.sleep(0))
            await demo.await_py_n(lambda: asyncio.sleep(0), 100)
            try:
                await demo.fail_errno(errno.EIO)
            except OSError:
                pass
            await asyncio.gather(*[demo.echo(obj) for _ in range(100)])
            for _ in range(20):
                fut = demo.sleep_ms(10_000)
                fut.add_done_callback(lambda f: None)
                fut.add_done_callback(lambda f: None, context=contextvars.copy_context())
                fut.cancel("stop")
                try:
                    await fut
                except asyncio.CancelledError:
                    pass
                demo.sleep_ms(10_000)  # dropped unawaited

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over ~5000 conversions")

    def test_awaits_of_python_do_not_leak(self):
        """C awaits of coroutines that return, raise, and are cancelled from
        C and from Python, 200 times each."""
        started = {}

        async def waits(key):
            started[key] = asyncio.current_task()
            await asyncio.sleep(10)

        async def work():
            obj = object()
            for i in range(200):
                self.assertIs(await demo.await_py(returns_after_a_step(obj)), obj)
                with self.assertRaises(ValueError):
                    await demo.await_py(raises_after_a_step("no"))
                fut = demo.await_py(asyncio.sleep(10))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                fut.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await fut
                # (Not "the task that is new": the coroutine of a C await
                # cancelled just before may still start, then be cancelled.)
                fut = demo.await_py(waits(i))
                for _ in range(30_000):  # until the loop runs the coroutine
                    if i in started:
                        break
                    await asyncio.sleep(0.001)
                started.pop(i).cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await fut

        delta = references_leaked(work)
        self.assertLess(delta, 100, f"{delta} references leaked over 800 awaits")


if __name__ == "__main__":
    unittest.main()
