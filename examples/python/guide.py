"""The Python side of docs/python.md: awaits C tasks, and has C await Python
coroutines, on stock asyncio and (when installed) on uvloop.

Run with the build's python/<tag> directory on PYTHONPATH.
"""
import asyncio
import contextvars
import sys
import time

try:
    import uvloop
except ImportError:
    uvloop = None

import aiobridge
import aiobridge_guide as ext

request_id = contextvars.ContextVar("request_id", default=None)


async def fetch(x):
    """A Python coroutine the C task awaits: it runs on the caller's loop, in
    the caller's context."""
    await asyncio.sleep(0.001)
    assert request_id.get() == "r-42"  # the caller's ContextVar is visible
    return x + 1


def fnv1a(data):
    """The same checksum in Python, to check the C one."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


async def main():
    # Shape 1: a callback API (glibc's getaddrinfo_a) as an awaitable.
    print("resolve('localhost') =", await ext.resolve("localhost"))

    # Shape 2: blocking C work on the runtime's worker threads.
    data = bytes(range(256)) * 4096
    sums = await asyncio.gather(*(ext.checksum(data) for _ in range(8)))
    assert sums == [fnv1a(data)] * 8
    print(f"checksum of 1 MiB, 8 at once on worker threads: {sums[0]:#018x}")

    # Shape 3: C awaits a Python coroutine; plain C data converted back.
    request_id.set("r-42")
    print("double_of(fetch(20)) =", await ext.double_of(fetch(20)))

    # Awaiting a C task of your own from Python.
    t0 = time.monotonic()
    await ext.sleep(0.01)
    print(f"C sleep of 10 ms took {(time.monotonic() - t0) * 1000:.1f} ms")

    # The same C task, loop-local: polled on this thread, no thread hop.
    t0 = time.monotonic()
    await asyncio.gather(*(ext.local_sleep(0.005) for _ in range(1000)))
    print(f"1000 loop-local C sleeps of 5 ms took "
          f"{(time.monotonic() - t0) * 1000:.1f} ms")

    # Many C tasks at once, with a timeout and a cancellation.
    await asyncio.gather(*(ext.sleep(0.005) for _ in range(1000)))
    slow = asyncio.ensure_future(ext.sleep(60))
    await asyncio.sleep(0.01)
    slow.cancel()
    try:
        await slow
    except asyncio.CancelledError:
        print("cancelled a 60 s C sleep")
    try:
        await asyncio.wait_for(ext.sleep(60), timeout=0.01)
    except asyncio.TimeoutError:
        print("wait_for timed out a C sleep")

    # Errors raised in Python reach the C task, and come back unchanged.
    async def broken(x):
        raise KeyError(x)

    try:
        await ext.double_of(broken(7))
    except KeyError as e:
        print("KeyError came back through C:", e)


async def stop_in_flight():
    slow = asyncio.ensure_future(ext.sleep(60))
    await asyncio.sleep(0.01)
    try:
        aiobridge.shutdown(ext, timeout=5)  # waits at most 5 s, without the GIL
    except aiobridge.ShutdownTimeoutError as e:
        print("stuck loop threads were abandoned:", e.left)
    try:
        await slow
    except aiobridge.ShutdownError:
        print("a C sleep in flight failed with ShutdownError")
    await ext.sleep(0.001)  # the next call starts a fresh runtime


# uvloop first, when installed: its first loop must exist before the
# runtime starts (see "uvloop" in docs/python.md).
if uvloop is None:
    print("uvloop not installed: running on stock asyncio only")
else:
    uvloop.install()
    asyncio.run(main())
    print("on uvloop: ok")
    asyncio.set_event_loop_policy(None)  # back to stock asyncio

# No wrapper coroutine needed: the C task binds to asyncio.run's loop.
asyncio.run(ext.sleep(0.001))
asyncio.run(main())

st = aiobridge.stats(ext)
print(f"backend {aiobridge.backend(ext)}: {st['tasks_completed']} C tasks completed, "
      f"{st['tasks_cancelled']} cancelled, {st['tasks_live']} live")
asyncio.run(stop_in_flight())
sys.exit(0 if st["tasks_live"] == 0 else 1)
