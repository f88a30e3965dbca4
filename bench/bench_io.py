#!/usr/bin/env python3
"""Native I/O per backend, from Python: whole-file reads and a socket echo
through each backend's own I/O (the native_io_<backend> extensions,
bench/native_io.c), side by side with the ways plain asyncio does the same,
all measured in one run so that the ratios mean something.

Workloads (each timed from the first call to the last result):
  small files    10,000 files of 4 KiB, read whole, 64 reads in flight
  large files    100 files of 1 MiB, read whole, 64 reads in flight; the
                 timed part reads each file 3 times (300 MiB) so that it
                 lasts long enough to measure
  one by one     2,000 files of 4 KiB read one after the other (1 in flight)
  echo, 64 conn  512-byte round trips on 64 TCP connections to an echo
                 server on 127.0.0.1, one round trip in flight per
                 connection, 200 per connection
  echo, 1 conn   512-byte round trips on one connection, one after the other

How (one column group per asyncio loop kind, one row each):
  asyncio.to_thread      files: asyncio.to_thread(path.read_bytes);
                         echo: a blocking sendall + recv in to_thread
  run_in_executor        the same through loop.run_in_executor(None, ...)
  loop.sock_*            echo only: loop.sock_sendall + loop.sock_recv on a
                         non-blocking socket (asyncio has no file I/O)
  uv, event, uring       native_io_<backend>.read_file(path) and
                         native_io_<backend>.echo(sock, data), a C task on a
                         1-thread aiobridge runtime of that backend; each
                         module's file_method() says how it reads a file
                         (event has no file I/O: it reads on its loop thread)
  ..., spin 0            the same with AIOBRIDGE_SPIN_US=0 (--spin-us): the
                         loop thread blocks in its backend at once instead
                         of first spinning for work pushed by Python

Files are created once in a temporary directory, synced and read once
before measuring: every read is served from the page cache. The echo
server is a child process (stdlib, epoll) that echoes what it receives.

Every (loop, how) pair runs in a fresh child process, once per run; runs
interleave the pairs. A figure is the median over the runs; the ratio is
that median divided by the median of asyncio.to_thread on the same loop
kind in the same run (higher is better for every figure). A figure that
cannot be measured is n/a with the reason; nothing is estimated in its
place.

Usage: PYTHONPATH=<build>/python/<tag> python3 bench/bench_io.py
       [--quick] [--runs N] [--loops asyncio,uvloop] [--backends uv,event,uring]
       [--spin-us default,0] [--dir DIR] [--json PATH]
"""

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

FULL = {
    "runs": 5,
    "small_n": 10000, "small_size": 4096,
    "large_n": 100, "large_size": 1 << 20, "large_passes": 3,
    "seq_n": 2000,
    "inflight": 64,
    "echo_conns": 64, "echo_per_conn": 200, "echo_size": 512,
    "echo_seq_n": 3000,
    "warmup": 0.1,  # share of each workload run once untimed first
}

QUICK = {
    "runs": 1,
    "small_n": 500, "small_size": 4096,
    "large_n": 10, "large_size": 1 << 20, "large_passes": 1,
    "seq_n": 200,
    "inflight": 64,
    "echo_conns": 8, "echo_per_conn": 20, "echo_size": 512,
    "echo_seq_n": 200,
    "warmup": 0.1,
}

WORKLOADS = [
    # key, label, unit, files or echo
    ("small", "{small_n:,} files of {small_kib} KiB, {inflight} in flight",
     "files/s", "files"),
    ("large", "{large_n:,} files of {large_mib} MiB, {inflight} in flight, "
     "each read {large_passes}x", "MiB/s", "files"),
    ("seq", "{seq_n:,} files of {small_kib} KiB, one at a time",
     "files/s", "files"),
    ("echo", "echo {echo_size} B, {echo_conns} connections",
     "round trips/s", "echo"),
    ("echo_seq", "echo {echo_size} B, 1 connection, one at a time",
     "round trips/s", "echo"),
]

BASELINES = ["to_thread", "executor", "sock"]
HOW_LABEL = {
    "to_thread": "asyncio.to_thread",
    "executor": "loop.run_in_executor(None)",
    "sock": "loop.sock_sendall/sock_recv",
}
ALL_BACKENDS = ["uv", "event", "uring"]
ECHO_LABEL = {
    "uv": "uv_poll_t + send/recv(2)",
    "event": "event + send/recv(2)",
    "uring": "IORING_OP_SEND/RECV",
}
WORKER_TIMEOUT_S = 600
RESULT_TAG = "BENCH_IO_RESULT "


def na(reason):
    return {"na": str(reason)}


def is_na(v):
    return isinstance(v, dict) and "na" in v


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


# ---------------------------------------------------------------------------
# The echo server (a child process)

def echo_server_main():
    """Echoes every connection's bytes back; prints its port, and exits when
    its stdin closes (the parent is gone)."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print(lsock.getsockname()[1], flush=True)
    pending = {}  # conn -> bytes not sent yet
    while True:
        for key, events in sel.select():
            what = key.data
            if what == "listen":
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            if what == "stdin":
                return
            conn = key.fileobj
            if events & selectors.EVENT_WRITE:
                buf = pending[conn]
                try:
                    n = conn.send(buf)
                except BlockingIOError:
                    n = 0
                except OSError:
                    n, buf = 0, b""
                buf = buf[n:]
                if buf:
                    pending[conn] = buf
                else:
                    del pending[conn]
                    sel.modify(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = conn.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                pending.pop(conn, None)
                conn.close()
                continue
            if conn in pending:
                pending[conn] += data
                continue
            try:
                n = conn.send(data)
            except BlockingIOError:
                n = 0
            if n < len(data):
                pending[conn] = data[n:]
                sel.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE,
                           "conn")


# ---------------------------------------------------------------------------
# Measurements (in a worker process, on the loop thread)

async def bounded(fn, items, inflight):
    """Awaits fn(item) for every item, at most `inflight` at a time."""
    it = iter(items)

    async def worker():
        for item in it:
            await fn(item)
    await asyncio.gather(*[worker() for _ in range(min(inflight, len(items)))])


async def timed(run, n, warmup_n):
    """Rate of run(n) per second, after an untimed run(warmup_n)."""
    if warmup_n:
        await run(warmup_n)
    t0 = time.perf_counter()
    await run(n)
    return n / (time.perf_counter() - t0)


def blocking_echo(sock, msg):
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = sock.recv(len(msg) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def file_reader(how, nio):
    """An async function path -> bytes for `how`."""
    loop = asyncio.get_running_loop()
    if how == "to_thread":
        return lambda p: asyncio.to_thread(p.read_bytes)
    if how == "executor":
        return lambda p: loop.run_in_executor(None, p.read_bytes)
    return nio.read_file


def echoer(how, nio):
    """An async function (sock, msg) -> bytes for `how`, and whether the
    socket must be non-blocking."""
    loop = asyncio.get_running_loop()
    if how == "to_thread":
        return (lambda s, m: asyncio.to_thread(blocking_echo, s, m)), False
    if how == "executor":
        return (lambda s, m: loop.run_in_executor(
            None, blocking_echo, s, m)), False
    if how == "sock":
        async def sock_echo(s, m):
            await loop.sock_sendall(s, m)
            got = b""
            while len(got) < len(m):
                chunk = await loop.sock_recv(s, len(m) - len(got))
                if not chunk:
                    break
                got += chunk
            return got
        return sock_echo, True
    return nio.echo, False


async def measure_files(res, how, nio, p, files):
    read = file_reader(how, nio)
    small, large = files["small"], files["large"]

    def checked(size):
        async def one(path):
            data = await read(path)
            if len(data) != size:
                raise AssertionError("%s: read %d bytes, not %d"
                                     % (path, len(data), size))
        return one

    one_small, one_large = checked(p["small_size"]), checked(p["large_size"])
    inflight = p["inflight"]
    w = p["warmup"]

    async def small_n(n):
        await bounded(one_small, small[:n], inflight)

    async def large_n(n):
        await bounded(one_large, (large * p["large_passes"])[:n], inflight)

    async def seq_n(n):
        for path in small[:n]:
            await one_small(path)

    res["small"] = await timed(small_n, p["small_n"], int(p["small_n"] * w))
    res["large"] = (await timed(large_n, p["large_n"] * p["large_passes"],
                                max(1, int(p["large_n"] * w)))
                    * p["large_size"] / (1 << 20))
    res["seq"] = await timed(seq_n, p["seq_n"], int(p["seq_n"] * w))


async def measure_echo(res, how, nio, p, port):
    echo, nonblocking = echoer(how, nio)
    msg = os.urandom(p["echo_size"])
    conns = []
    try:
        for _ in range(p["echo_conns"]):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(not nonblocking)
            conns.append(s)

        async def one(s):
            got = await echo(s, msg)
            if got != msg:
                raise AssertionError("echo returned %d bytes, not the %d sent"
                                     % (len(got), len(msg)))

        async def conns_n(per_conn):
            async def conn_loop(s):
                for _ in range(per_conn):
                    await one(s)
            await asyncio.gather(*[conn_loop(s) for s in conns])

        async def seq_n(n):
            for _ in range(n):
                await one(conns[0])

        per = p["echo_per_conn"]
        rate = await timed(conns_n, per, max(1, int(per * p["warmup"])))
        res["echo"] = rate * len(conns)
        res["echo_seq"] = await timed(seq_n, p["echo_seq_n"],
                                      int(p["echo_seq_n"] * p["warmup"]))
    finally:
        for s in conns:
            s.close()


def backend_of(how):
    """'uring' for the hows 'uring' and 'uring:spin0', else None."""
    b = how.split(":")[0]
    return b if b in ALL_BACKENDS else None


def spin_of(how):
    """The AIOBRIDGE_SPIN_US of a how ('uv:spin0' -> '0'), or None."""
    return how.split(":spin")[1] if ":spin" in how else None


async def measure_all(how, p, files, port):
    res = {}
    nio = None
    backend = backend_of(how)
    if backend:
        import importlib
        import aiobridge
        try:
            nio = importlib.import_module("native_io_" + backend)
            res["_backend"] = aiobridge.backend(nio)  # starts the runtime
            res["_file_method"] = nio.file_method()
        except Exception as e:
            why = na("%s: %s" % (type(e).__name__, e))
            return {k[0]: why for k in WORKLOADS}
    elif how == "to_thread" and not hasattr(asyncio, "to_thread"):
        why = na("asyncio.to_thread needs Python 3.9")
        return {k[0]: why for k in WORKLOADS}

    for kind, fn in (("files", lambda: measure_files(res, how, nio, p, files)),
                     ("echo", lambda: measure_echo(res, how, nio, p, port))):
        keys = [k[0] for k in WORKLOADS if k[3] == kind]
        if kind == "files" and how == "sock":
            for k in keys:
                res[k] = na("asyncio has no file I/O")
            continue
        try:
            await fn()
        except Exception as e:  # an honest n/a, never a made-up figure
            for k in keys:
                res.setdefault(k, na("%s: %s" % (type(e).__name__, e)))
    if nio is not None:
        import aiobridge
        # A close the task did not await may still be on its way.
        deadline = time.monotonic() + 5.0
        while nio.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        res["_stats"] = aiobridge.stats(nio)
        res["_inflight_end"] = nio.inflight()
    return res


def worker_main(args):
    p = json.loads(args.params)
    files = {
        "small": [pathlib.Path(args.dir, "small", "%05d" % i)
                  for i in range(p["small_n"])],
        "large": [pathlib.Path(args.dir, "large", "%03d" % i)
                  for i in range(p["large_n"])],
    }
    if args.loop == "uvloop":
        import uvloop
        # uvloop's first loop must exist before an aiobridge runtime starts
        # (docs/python.md, "uvloop").
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        res = loop.run_until_complete(
            measure_all(args.worker, p, files, args.port))
        if hasattr(loop, "shutdown_default_executor"):
            loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    print(RESULT_TAG + json.dumps(res))
    return 0


# ---------------------------------------------------------------------------
# The parent

def make_files(root, p):
    for sub, n, size in (("small", p["small_n"], p["small_size"]),
                         ("large", p["large_n"], p["large_size"])):
        d = pathlib.Path(root, sub)
        d.mkdir()
        width = 5 if sub == "small" else 3
        for i in range(n):
            (d / ("%0*d" % (width, i))).write_bytes(os.urandom(size))
    os.sync()
    for sub in ("small", "large"):  # into the page cache
        for f in pathlib.Path(root, sub).iterdir():
            f.read_bytes()


def start_echo_server():
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                             "--echo-server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def run_worker(how, loop, p, root, port):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", how,
           "--loop", loop, "--dir", root, "--port", str(port),
           "--params", json.dumps(p)]
    env = dict(os.environ)
    if spin_of(how) is not None:
        env["AIOBRIDGE_SPIN_US"] = spin_of(how)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                           timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "timed out after %d s" % WORKER_TIMEOUT_S
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), None
    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, "exit %d: %s" % (r.returncode, err)


def uvloop_status():
    try:
        import uvloop
        return True, uvloop.__version__
    except Exception as e:
        return False, "%s: %s" % (type(e).__name__, e)


def fs_of(path):
    """(mount point, fs type) holding path, from /proc/mounts."""
    best = ("?", "?")
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, typ = parts[1], parts[2]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) >= len(best[0].replace("?", "")):
                    best = (mnt, typ)
    except OSError:
        pass
    return best


def loadavg():
    """The 1-minute load average, or '?'."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def fmt_rate(v):
    if v >= 100:
        return "{:,.0f}".format(v)
    return "{:.1f}".format(v)


def summarize(samples):
    """Median, min, max of the numeric samples, or the first n/a."""
    nums = [s for s in samples if not is_na(s)]
    if not nums:
        return samples[0] if samples else na("not measured")
    return {"median": median(nums), "min": min(nums), "max": max(nums),
            "n": len(nums)}


def print_table(p, loops, hows, results, file_methods):
    label_w = 52
    col = 12
    heads = []
    for loop in loops:
        heads += [loop, "ratio", "spread"]
    print("%-*s%s" % (label_w, "workload / how",
                      "".join(h.rjust(col if i % 3 == 0 else 8)
                              for i, h in enumerate(heads))))
    print("-" * (label_w + (col + 16) * len(loops)))
    notes = []

    def note(v):
        if v["na"] not in notes:
            notes.append(v["na"])
        return "n/a[%d]" % (notes.index(v["na"]) + 1)

    names = dict(p, small_kib=p["small_size"] // 1024,
                 large_mib=p["large_size"] >> 20)
    for key, label, unit, kind in WORKLOADS:
        print("%s (%s)" % (label.format(**names), unit))
        for how in hows:
            if kind == "files" and how == "sock":
                continue
            backend = backend_of(how)
            if backend:
                what = file_methods.get(backend, "") if kind == "files" \
                    else ECHO_LABEL[backend]
                name = "%-6s %s" % (backend, what)
                if spin_of(how) is not None:
                    name = "%-6s %s, AIOBRIDGE_SPIN_US=%s" % (
                        "" if backend in hows else backend,
                        "same" if backend in hows else what, spin_of(how))
            else:
                name = HOW_LABEL[how]
            out = []
            for loop in loops:
                s = results[(loop, how)][key]
                base = results[(loop, "to_thread")][key]
                if is_na(s):
                    out += [note(s).rjust(col), "".rjust(8), "".rjust(8)]
                    continue
                r = ("%.2f" % (s["median"] / base["median"])
                     if not is_na(base) else "-")
                spread = ("±%.0f%%" % (50.0 * (s["max"] - s["min"]) /
                                       s["median"]) if s["n"] > 1 else "-")
                out += [fmt_rate(s["median"]).rjust(col), r.rjust(8),
                        spread.rjust(8)]
            print("  %-*s%s" % (label_w - 2, name[:label_w - 2], "".join(out)))
    for i, why in enumerate(notes):
        print("n/a[%d]: %s" % (i + 1, why))


def main():
    ap = argparse.ArgumentParser(
        description="aiobridge native I/O benchmark: file reads and a socket "
        "echo through each backend's own I/O against asyncio's ways (see the "
        "module docstring)")
    ap.add_argument("--quick", action="store_true",
                    help="small counts and 1 run: a smoke run")
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per figure (median); default 5, 1 with --quick")
    ap.add_argument("--loops", default="asyncio,uvloop",
                    help="comma-separated loop kinds (asyncio, uvloop); "
                    "uvloop is skipped if it cannot be imported")
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS),
                    help="comma-separated backends (native_io_<backend> "
                    "modules) to measure")
    ap.add_argument("--spin-us", default="default,0",
                    help="comma-separated AIOBRIDGE_SPIN_US values for the "
                    "native rows, 'default' for the library's (or the "
                    "environment's) setting; default: default,0")
    ap.add_argument("--dir", default=None,
                    help="where to create the files (default: a temporary "
                    "directory, removed at the end)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the raw figures to PATH as JSON")
    # Internal: a worker or the echo server in a child process.
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--loop", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--echo-server", action="store_true",
                    help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.echo_server:
        return echo_server_main()
    if args.worker:
        return worker_main(args)

    started = time.monotonic()
    load_start = loadavg()
    p = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        if args.runs < 1:
            ap.error("--runs must be at least 1")
        p["runs"] = args.runs
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    for loop in loops:
        if loop not in ("asyncio", "uvloop"):
            ap.error("unknown loop kind %r" % loop)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ALL_BACKENDS:
            ap.error("unknown backend %r" % b)
    skipped = []
    uvloop_version = None
    if "uvloop" in loops:
        ok, why = uvloop_status()
        if ok:
            uvloop_version = why
        else:
            loops.remove("uvloop")
            skipped.append("uvloop skipped: cannot import uvloop (%s)" % why)
    if not loops:
        print("\n".join(skipped))
        print("no loop kind to measure")
        return 1
    spins = [x.strip() for x in args.spin_us.split(",") if x.strip()]
    for sp in spins:
        if sp != "default" and not sp.isdigit():
            ap.error("--spin-us takes 'default' or integers, not %r" % sp)
    hows = list(BASELINES)
    for b in backends:
        hows += [b if sp == "default" else "%s:spin%s" % (b, sp)
                 for sp in spins]

    root = args.dir
    made_root = root is None
    if made_root:
        root = tempfile.mkdtemp(prefix="aiob-bench-io-")
    elif os.listdir(root):
        ap.error("--dir %s is not empty" % root)
    server = None
    try:
        t0 = time.monotonic()
        make_files(root, p)
        setup_s = time.monotonic() - t0
        server, port = start_echo_server()
        samples = {(loop, how): {k[0]: [] for k in WORKLOADS}
                   for loop in loops for how in hows}
        reported = {}
        for _ in range(p["runs"]):
            for loop in loops:
                for how in hows:
                    res, err = run_worker(how, loop, p, root, port)
                    if res is None:
                        res = {k[0]: na(err) for k in WORKLOADS}
                    for k in WORKLOADS:
                        samples[(loop, how)][k[0]].append(res[k[0]])
                    if "_backend" in res:
                        reported[backend_of(how)] = res
                        if res.get("_inflight_end"):
                            skipped.append(
                                "warning: %s on %s: %d native requests alive "
                                "at the end" % (how, loop, res["_inflight_end"]))
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        if made_root:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started

    results = {key: {w: summarize(v) for w, v in per.items()}
               for key, per in samples.items()}
    file_methods = {b: r.get("_file_method", "") for b, r in reported.items()}
    mnt, fstype = fs_of(root)
    spin = os.environ.get("AIOBRIDGE_SPIN_US")

    print("aiobridge native I/O benchmark%s" % (
        " (--quick)" if args.quick else ""))
    print("date:     %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
    print("python:   %s (%s), %s" % (platform.python_version(),
                                     sys.executable, platform.machine()))
    print("loops:    %s%s" % (", ".join(loops), (
        "; uvloop %s" % uvloop_version) if uvloop_version else ""))
    extra = [sp for sp in spins if sp != "default"]
    print("backends: %s (native_io_<backend>, 1 loop thread each); spin: %s%s"
          % (", ".join(backends), "AIOBRIDGE_SPIN_US=%s" % spin
             if spin is not None else "library default",
             "; rows marked AIOBRIDGE_SPIN_US=%s set it" % ",".join(extra)
             if extra else ""))
    print("host:     %d CPUs, Linux %s; files on %s (%s), page cache warm"
          % (os.cpu_count() or 0, platform.release(), mnt, fstype))
    print("executor: default, %d threads (min(32, CPUs + 4))"
          % min(32, (os.cpu_count() or 1) + 4))
    print("load:     1-minute load average %s at the start, %s at the end "
          "(other work on the machine widens the spread)"
          % (load_start, loadavg()))
    print("method:   median of %d run(s), each (loop, how) in a fresh process;"
          " ratio = median / asyncio.to_thread's median on the same loop;"
          " spread = ±half the min-max range" % p["runs"])
    for s in skipped:
        print(s)
    print()
    print_table(p, loops, hows, results, file_methods)
    print()
    print("elapsed: %.1f s (files made in %.1f s)" % (elapsed, setup_s))

    if args.json:
        out = {
            "date": datetime.datetime.now().isoformat(),
            "python": platform.python_version(),
            "executable": sys.executable,
            "quick": args.quick,
            "params": p,
            "loops": loops,
            "hows": hows,
            "file_methods": file_methods,
            "skipped": skipped,
            "elapsed_s": elapsed,
            "load": [load_start, loadavg()],
            "results": {"%s/%s" % k: v for k, v in results.items()},
            "samples": {"%s/%s" % k: v for k, v in samples.items()},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        print("raw figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
