#!/usr/bin/env bash
# Builds a Release tree and runs the backend benchmark. Arguments are passed
# to bench_backends (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DAIOB_BACKENDS="uv;event;uring" >build-bench.configure.log 2>&1 \
  || { cat build-bench.configure.log; exit 1; }
cmake --build build-bench -j"$(nproc)" --target bench_backends >build-bench.build.log 2>&1 \
  || { cat build-bench.build.log; exit 1; }
./build-bench/bench/bench_backends "$@"
