"""The Python side of examples/embed/embed_demo.c: coroutines a C program's
main task awaits."""
import asyncio


async def hello(name):
    await asyncio.sleep(0.001)
    return f"hello, {name}, from a Python coroutine"


async def loop_name():
    t = type(asyncio.get_running_loop())
    return f"{t.__module__}.{t.__qualname__}"
