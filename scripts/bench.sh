#!/usr/bin/env bash
# Builds a Release tree and runs the benchmarks: the C backend benchmark
# (bench/bench_backends), then the asyncio bridge benchmark
# (bench/bench_bridge.py), the native I/O benchmark (bench/bench_io.py) and
# the streams benchmark (bench/bench_streams.py) on /usr/bin/python3 with
# every backend of the tree.
#
# Usage: ./scripts/bench.sh [bench_backends args...]
#            [-- bench_bridge.py args... [-- bench_io.py args...]]
#   Arguments before the first "--" go to bench_backends (try --help), those
#   after it to bench_bridge.py, those after a second "--" to bench_io.py
#   (try --help; both Python benchmarks get --backends <the tree's backends>
#   first, which a --backends of yours overrides).
#   e.g. ./scripts/bench.sh --quick -- --quick -- --quick
# BENCH_BRIDGE=0 skips the bridge benchmark, BENCH_IO=0 the I/O benchmark,
# BENCH_STREAMS=0 the streams benchmark (bench/bench_streams.py, run with
# the bridge benchmark's demo module; --quick there makes it quick too).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh

c_args=()
py_args=()
io_args=()
seps=0
for a in "$@"; do
  if [ "$seps" -lt 2 ] && [ "$a" = "--" ]; then
    seps=$((seps + 1))
  elif [ "$seps" = 0 ]; then
    c_args+=("$a")
  elif [ "$seps" = 1 ]; then
    py_args+=("$a")
  else
    io_args+=("$a")
  fi
done

PY=/usr/bin/python3
bridge=1
io=1
if [ "${BENCH_BRIDGE:-1}" = 0 ]; then
  bridge=0
fi
if [ "${BENCH_IO:-1}" = 0 ]; then
  io=0
fi
if [ ! -x "$PY" ] && [ $((bridge + io)) -gt 0 ]; then
  echo "bench: $PY not found, Python benchmarks skipped"
  bridge=0
  io=0
fi

cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DAIOB_BACKENDS="uv;event;uring" >build-bench.configure.log 2>&1 \
  || { cat build-bench.configure.log; exit 1; }
cmake --build build-bench -j"$(nproc)" --target bench_backends >build-bench.build.log 2>&1 \
  || { cat build-bench.build.log; exit 1; }

# The Python extensions are built separately so that a failure there still
# leaves the C benchmark (and the other Python benchmark) to run; the
# benchmark of an extension that failed to build does not run (on a stale
# extension) and the script fails at the end.
bridge_build_ok=1
io_build_ok=1
if [ $((bridge + io)) -gt 0 ]; then
  tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
fi
if [ "$bridge" = 1 ]; then
  # The extension's CMake target is aiobridge_demo_<tag>, e.g. _cp311.
  cmake --build build-bench -j"$(nproc)" --target "aiobridge_demo_$tag" >build-bench.python.log 2>&1 \
    || bridge_build_ok=0
fi
if [ "$io" = 1 ]; then
  # native_io_<tag> builds native_io_<backend> for every backend.
  cmake --build build-bench -j"$(nproc)" --target "native_io_$tag" >build-bench.io.log 2>&1 \
    || io_build_ok=0
fi

./build-bench/bench/bench_backends "${c_args[@]}"

backends=$(sed -n 's/^AIOB_BACKENDS:STRING=//p' build-bench/CMakeCache.txt | tr ';' ',')
failed=0
if [ "$bridge" = 1 ]; then
  echo
  if [ "$bridge_build_ok" = 0 ]; then
    tail -n 30 build-bench.python.log
    echo "bench: building aiobridge_demo_$tag failed (build-bench.python.log); bridge benchmark not run"
    failed=1
  else
    PYTHONPATH="$PWD/build-bench/python/$tag" "$PY" bench/bench_bridge.py \
      --backends "$backends" "${py_args[@]}"
  fi
fi

if [ "$io" = 1 ]; then
  echo
  if [ "$io_build_ok" = 0 ]; then
    tail -n 30 build-bench.io.log
    echo "bench: building native_io_$tag failed (build-bench.io.log); I/O benchmark not run"
    failed=1
  else
    PYTHONPATH="$PWD/build-bench/python/$tag" "$PY" bench/bench_io.py \
      --backends "$backends" "${io_args[@]}"
  fi
fi

# Streams between C and asyncio (the demo module of the bridge benchmark).
if [ "$bridge" = 1 ] && [ "$bridge_build_ok" = 1 ] && [ "${BENCH_STREAMS:-1}" != 0 ]; then
  echo
  quick=()
  for a in "${py_args[@]}"; do [ "$a" = --quick ] && quick=(--quick); done
  PYTHONPATH="$PWD/build-bench/python/$tag" "$PY" bench/bench_streams.py \
    --backends "$backends" "${quick[@]}"
fi
exit "$failed"
