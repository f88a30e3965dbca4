#!/usr/bin/env bash
# Builds this project with aiobridge as a subdirectory and checks that the
# parent gets the libraries and the extension helper, and nothing else:
# no C++ compiler needed, no aiobridge tests, benchmarks or examples.
# Usage: check.sh <python> <build dir> [extension backend: uring (default) or uv]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
py=$1 build=$2 backend=${3:-uring}
rm -rf "$build"
echo "--- configure (CMAKE_CXX_COMPILER=false: enabling C++ would fail)"
cmake -S "$here" -B "$build" -DAIOBRIDGE_SOURCE_DIR="$root" \
  -DPython_EXECUTABLE="$py" -DCMAKE_CXX_COMPILER=false -DAIOB_WERROR=ON \
  -DEXT_BACKEND="$backend"
cmake --build "$build" -j"$(nproc)"
for t in unit_core conformance bench_backends demo_c aiobridge_demo_cp311; do
  if cmake --build "$build" --target help | grep -qx "\.\.\. $t"; then
    echo "FAIL: target $t exists in a parent project" >&2; exit 1
  fi
done
[ ! -f "$build/aiobridge/CTestTestfile.cmake" ] || { echo "FAIL: aiobridge's tests are configured" >&2; exit 1; }
echo "--- hello (shared library, default backend uv)"
"$build/hello" uv
tag=$("$py" -c 'import sys; v = sys.version_info; print(f"cp{v[0]}{v[1]}" + ("d" if hasattr(sys, "gettotalrefcount") else ""))')
for loop in asyncio uvloop; do
  echo "--- test_pipdemo (built in the tree, backend $backend) on $loop"
  (cd "$here/../pip" && PYTHONPATH="$build:$build/aiobridge/python/$tag" \
     PIPDEMO_BACKEND=$backend CONSUMER_LOOP=$loop CONSUMER_AIOBRIDGE=tree \
     PYTHONDONTWRITEBYTECODE=1 "$py" test_pipdemo.py -v)
done
