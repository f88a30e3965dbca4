"""Thread placement probe for the contention rows (docs/benchmarks.md):
runs await_py_n(lambda: asyncio.sleep(0), n), or with --row gather
asyncio.gather of 10,000 ready(), for --seconds in this process, and
samples every 5 ms (when the sampling thread gets the GIL) the CPU that
each thread last ran on (/proc/self/task/*/stat, field 39). Prints one
JSON line: ops/s, the share of samples in which the asyncio loop's thread
(the main thread) and a runtime thread sat on the same CPU, and the spin
counters of the run (aiobridge.stats(): the runtime's spins and the
asyncio loop's waits).

    PYTHONPATH=<dir with aiobridge_demo> python3 bench/placement_probe.py
        [--seconds 1.5] [--row await_py_n|gather]

AIOB_TEST_LOOP=uvloop runs it on uvloop, AIOBRIDGE_BACKEND picks the
runtime's backend, AIOBRIDGE_SPIN_US=0 turns the spin off. Run it in fresh
processes beside a load (busy processes) to see which placement each one
gets: a placement mostly lasts a process's life.
"""
import argparse
import asyncio
import json
import os
import threading
import time

if os.environ.get("AIOB_TEST_LOOP") == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
import aiobridge  # noqa: E402
import aiobridge_demo as demo  # noqa: E402

SPIN_STATS = ("spins", "spin_hits", "spins_skipped", "py_spins",
              "py_spin_hits", "py_spins_skipped")


def cpus_of_threads(skip):
    """{tid: cpu} of this process's threads but `skip`."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        if int(t) == skip:
            continue
        try:
            with open("/proc/self/task/%s/stat" % t) as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(t)] = int(stat[stat.rindex(")") + 2:].split()[36])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--row", choices=("await_py_n", "gather"),
                    default="await_py_n")
    args = ap.parse_args()
    samples, done = [], threading.Event()

    def sampler():
        me = threading.get_native_id()
        while not done.wait(0.005):
            samples.append(cpus_of_threads(me))

    async def run():
        step = lambda: asyncio.sleep(0)  # noqa: E731

        async def one_batch():
            if args.row == "gather":
                await asyncio.gather(*[demo.ready() for _ in range(10000)])
                return 10000
            await demo.await_py_n(step, 5000)
            return 5000

        await one_batch()  # the runtime has started
        before = aiobridge.stats()
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            n += await one_batch()
        rate = n / (time.perf_counter() - t0)
        done.set()
        th.join()
        after = aiobridge.stats()
        return rate, {k: after[k] - before[k] for k in SPIN_STATS}

    rate, spin = asyncio.run(run())
    loop_tid = threading.get_native_id()
    same = total = 0
    for row in samples:
        if loop_tid in row and len(row) > 1:
            total += 1
            same += any(cpu == row[loop_tid] for tid, cpu in row.items()
                        if tid != loop_tid)
    print(json.dumps({"row": args.row, "ops_per_s": round(rate),
                      "same_cpu": round(same / total, 2) if total else None,
                      "samples": total, "spin": spin}))


if __name__ == "__main__":
    main()
