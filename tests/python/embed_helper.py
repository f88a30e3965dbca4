"""Python coroutines that tests/embed_tests.c (a C program embedding
Python) awaits from its C tasks; found on sys.path through PYTHONPATH."""
import asyncio


async def double_later(x):
    await asyncio.sleep(0.001)
    return 2 * x


async def raise_key_error():
    await asyncio.sleep(0)
    raise KeyError("from Python")


async def loop_type_name():
    t = type(asyncio.get_running_loop())
    return f"{t.__module__}.{t.__qualname__}"


async def sleep_zero():
    await asyncio.sleep(0)
