#!/usr/bin/env bash
# Builds aiobridge and runs the examples on the default backend: the C
# example, the Python program of docs/python.md (Python awaiting C tasks, C
# tasks awaiting Python coroutines) with Debian's python3, and a C program
# that owns main and embeds Python (examples/embed), on asyncio and uvloop.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
PY=/usr/bin/python3
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DAIOB_PYTHONS="$PY" >build-demo.configure.log 2>&1 \
  || { cat build-demo.configure.log; exit 1; }
cmake --build build-demo -j"$(nproc)" --target demo_c "aiobridge_guide_$TAG" embed_demo >build-demo.build.log 2>&1 \
  || { cat build-demo.build.log; exit 1; }
echo "=== C example (examples/demo.c)"
./build-demo/examples/demo_c
echo
echo "=== Python example (examples/python/guide.py, $("$PY" --version))"
PYTHONPATH="$PWD/build-demo/python/$TAG" "$PY" examples/python/guide.py
echo
echo "=== C program embedding Python (examples/embed), stock asyncio"
AIOBRIDGE_LOOP=asyncio ./build-demo/examples/embed_demo
echo
echo "=== the same on uvloop"
AIOBRIDGE_LOOP=uvloop ./build-demo/examples/embed_demo
