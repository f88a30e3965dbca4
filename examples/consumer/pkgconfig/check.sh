#!/usr/bin/env bash
# Builds sleep_promise against an installed aiobridge with make and
# pkg-config only, twice (shared and static libaiobridge), checks what each
# binary needs at run time, and runs both on every backend of the install.
# Usage: check.sh <aiobridge prefix> <build dir>
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 <aiobridge prefix> <build dir>" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
prefix=$(cd "$1" && pwd)
mkdir -p "$2"
build=$(cd "$2" && pwd)
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig

echo "--- pkg-config (PKG_CONFIG_PATH=$PKG_CONFIG_PATH)"
echo "aiobridge $(pkg-config --modversion aiobridge): $(pkg-config --cflags --libs aiobridge)"
echo "aiobridge-static --static: $(pkg-config --static --cflags --libs aiobridge-static)"

echo "--- make -C $here O=$build"
before=$(ls -A "$here")
make -C "$here" O="$build" clean
make -C "$here" O="$build"
if [ "$here" != "$build" ] && [ "$(ls -A "$here")" != "$before" ]; then
  echo "FAIL: make wrote into the source directory $here" >&2; exit 1
fi

needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
echo "--- linkage"
for f in sleep_promise_shared sleep_promise_static; do
  echo "$f NEEDED: $(needed "$build/$f" | tr '\n' ' ')"
done
needed "$build/sleep_promise_shared" | grep -q '^libaiobridge\.so' || {
  echo "FAIL: sleep_promise_shared does not need libaiobridge.so" >&2; exit 1; }
if needed "$build/sleep_promise_static" | grep -q '^libaiobridge'; then
  echo "FAIL: sleep_promise_static needs libaiobridge.so" >&2; exit 1
fi
# The rpath, not the environment, finds the shared library.
env -u LD_LIBRARY_PATH ldd "$build/sleep_promise_shared" | grep libaiobridge

status=0
for backend in $(pkg-config --variable=backends aiobridge); do
  for f in sleep_promise_shared sleep_promise_static; do
    echo "--- $f, AIOBRIDGE_BACKEND=$backend"
    rc=0
    env -u LD_LIBRARY_PATH AIOBRIDGE_BACKEND="$backend" timeout 60 "$build/$f" || rc=$?
    if [ $rc -eq 77 ]; then
      echo "SKIP: the $backend backend cannot run here (see above)"
    elif [ $rc -ne 0 ]; then
      echo "FAIL: $f on $backend exited with $rc" >&2; status=1
    fi
  done
done
[ $status -eq 0 ] && echo "--- ok"
exit $status
