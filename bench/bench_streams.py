#!/usr/bin/env python3
"""Streams between C and asyncio, against asyncio's own queue, measured in
one run so that the ratios mean something.

Rows (items/s, each the median of --runs timed runs, after one untimed):
  C stream -> async for     `async for x in demo.stream_range(N, buffer=B)`:
                            a C task sends 0..N-1 through a channel of B
                            items, the loop takes them (aiob_py_stream_new)
  asyncio.Queue pair        a producer task puts 0..N-1 into an
                            asyncio.Queue(maxsize=B), the consumer gets them
                            (both on the loop, the baseline of the rows above)
  C sums an async generator `await demo.sum_agen(agen(N), window=B)`: a C task
                            pulls a Python async generator (when the demo
                            module has sum_agen)
  Python sums it            `async for` over the same generator in Python

Each (loop kind, backend) pair runs in a fresh child process. The ratio
column is the row's median over the asyncio.Queue median (or, for sum_agen,
over the Python sum) of the same child.

Usage: PYTHONPATH=<build>/python/<tag> python3 bench/bench_streams.py
       [--quick] [--runs N] [--loops asyncio,uvloop] [--backends uv,event,uring]
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "BENCH_STREAMS_RESULT "


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


async def c_stream(demo, n, b):
    k = 0
    async for _ in demo.stream_range(n, buffer=b):
        k += 1
    assert k == n


async def queue_pair(n, b):
    q = asyncio.Queue(maxsize=b)

    async def produce():
        for i in range(n):
            await q.put(i)

    task = asyncio.ensure_future(produce())
    for _ in range(n):
        await q.get()
    await task


async def agen(n):
    for i in range(n):
        yield i


async def c_sum(demo, n, b):
    assert await demo.sum_agen(agen(n), window=b) == n * (n - 1) // 2


async def py_sum(n, b):
    s = 0
    async for x in agen(n):
        s += x
    assert s == n * (n - 1) // 2


def child(args):
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    import aiobridge_demo as demo

    rows = [("c_stream", lambda b: c_stream(demo, args.n, b)), ("queue", lambda b: queue_pair(args.n, b))]
    if hasattr(demo, "sum_agen"):
        rows += [("c_sum", lambda b: c_sum(demo, args.n, b)), ("py_sum", lambda b: py_sum(args.n, b))]
    out = {}

    async def main():
        for b in args.buffers:
            for key, make in rows:
                await make(b)  # untimed
            times = {key: [] for key, _ in rows}
            for _ in range(args.runs):  # interleaved
                for key, make in rows:
                    t0 = time.perf_counter()
                    await make(b)
                    times[key].append(time.perf_counter() - t0)
            for key, ts in times.items():
                out[f"{key}/{b}"] = args.n / median(ts)

    asyncio.run(main())
    print(RESULT_TAG + json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts, one run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--backends", default="uv,event,uring")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1_000_000, help=argparse.SUPPRESS)
    ap.add_argument("--loop", help=argparse.SUPPRESS)
    ap.add_argument("--buffers", default="16,256", help="channel / window sizes")
    args = ap.parse_args()
    args.buffers = [int(b) for b in str(args.buffers).split(",")]
    if args.child:
        args.runs = 1 if args.quick else args.runs
        args.n = 20_000 if args.quick else args.n
        child(args)
        return 0

    loops = []
    for loop in args.loops.split(","):
        if loop == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                print("bench_streams: uvloop not installed: asyncio only")
                continue
        loops.append(loop)
    results = {}
    for loop in loops:
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--child", "1", "--loop", loop,
                   "--runs", str(args.runs), "--buffers", ",".join(map(str, args.buffers))]
            if args.quick:
                cmd.append("--quick")
            env = dict(os.environ, AIOBRIDGE_BACKEND=backend)
            print(f"bench_streams: {loop} / {backend}", file=sys.stderr, flush=True)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            line = [x for x in p.stdout.splitlines() if x.startswith(RESULT_TAG)]
            if p.returncode != 0 or not line:
                print(p.stdout, p.stderr)
                print(f"bench_streams: {loop} / {backend} failed")
                return 1
            results[(loop, backend)] = json.loads(line[-1][len(RESULT_TAG):])

    n = 20_000 if args.quick else 1_000_000
    print(f"aiobridge streams benchmark: {n:,} items per run, median of "
          f"{1 if args.quick else args.runs} runs, items/s (ratio)")
    labels = [("c_stream", "C stream -> async for", "queue"),
              ("queue", "asyncio.Queue pair", "queue"),
              ("c_sum", "C sums an async generator", "py_sum"),
              ("py_sum", "Python sums it", "py_sum")]
    cols = list(results)
    print(f"{'':38s}" + "".join(f"{loop + '/' + b:>24s}" for loop, b in cols))
    for b in args.buffers:
        for key, label, base in labels:
            if f"{key}/{b}" not in results[cols[0]]:
                continue
            cells = []
            for c in cols:
                v, ref = results[c][f"{key}/{b}"], results[c][f"{base}/{b}"]
                cells.append(f"{v:>14,.0f} ({v / ref:4.2f}x)")
            print(f"  {label + ', buffer ' + str(b):36s}" + "".join(f"{x:>24s}" for x in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
