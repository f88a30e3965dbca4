#!/usr/bin/env bash
# Builds a Release tree and runs the benchmarks: the C backend benchmark
# (bench/bench_backends), then the asyncio bridge benchmark
# (bench/bench_bridge.py) on /usr/bin/python3 with every backend of the tree.
#
# Usage: ./scripts/bench.sh [bench_backends args...] [-- bench_bridge.py args...]
#   Arguments before "--" go to bench_backends (try --help), those after it
#   to bench_bridge.py (try --help; here it gets --backends <the tree's
#   backends> first, which a --backends of yours overrides).
#   e.g. ./scripts/bench.sh --quick -- --quick
# BENCH_BRIDGE=0 skips the bridge benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh

c_args=()
py_args=()
after_sep=0
for a in "$@"; do
  if [ "$after_sep" = 0 ] && [ "$a" = "--" ]; then
    after_sep=1
  elif [ "$after_sep" = 0 ]; then
    c_args+=("$a")
  else
    py_args+=("$a")
  fi
done

PY=/usr/bin/python3
bridge=1
if [ "${BENCH_BRIDGE:-1}" = 0 ]; then
  bridge=0
elif [ ! -x "$PY" ]; then
  echo "bench: $PY not found, bridge benchmark skipped"
  bridge=0
fi

cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DAIOB_BACKENDS="uv;event;uring" >build-bench.configure.log 2>&1 \
  || { cat build-bench.configure.log; exit 1; }
cmake --build build-bench -j"$(nproc)" --target bench_backends >build-bench.build.log 2>&1 \
  || { cat build-bench.build.log; exit 1; }

# The bridge extension is built separately so that a failure there still
# leaves the C benchmark to run; the bridge benchmark then does not run (on
# a stale extension) and the script fails at the end.
bridge_build_ok=1
if [ "$bridge" = 1 ]; then
  # The extension's CMake target is aiobridge_demo_<tag>, e.g. _cp311.
  tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  cmake --build build-bench -j"$(nproc)" --target "aiobridge_demo_$tag" >build-bench.python.log 2>&1 \
    || bridge_build_ok=0
fi

./build-bench/bench/bench_backends "${c_args[@]}"

if [ "$bridge" = 1 ]; then
  echo
  if [ "$bridge_build_ok" = 0 ]; then
    tail -n 30 build-bench.python.log
    echo "bench: building aiobridge_demo_$tag failed (build-bench.python.log); bridge benchmark not run"
    exit 1
  fi
  backends=$(sed -n 's/^AIOB_BACKENDS:STRING=//p' build-bench/CMakeCache.txt | tr ';' ',')
  PYTHONPATH="$PWD/build-bench/python/$tag" "$PY" bench/bench_bridge.py \
    --backends "$backends" "${py_args[@]}"
fi
