#!/usr/bin/env bash
# Builds aiobridge and runs the C example on the default backend.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release >build-demo.configure.log 2>&1 \
  || { cat build-demo.configure.log; exit 1; }
cmake --build build-demo -j"$(nproc)" --target demo_c >build-demo.build.log 2>&1 \
  || { cat build-demo.build.log; exit 1; }
echo "=== C example (examples/demo.c)"
./build-demo/examples/demo_c
