#!/usr/bin/env bash
# Uses aiobridge from outside its tree, as its users do: builds it, installs
# it into a temporary prefix, and builds and runs every consumer project in
# examples/consumer against that install (CMake per backend, pkg-config,
# pip, add_subdirectory, two extensions in one interpreter); then checks a
# single-backend install (links one backend only; asking find_package for a
# missing component fails naming it).
# Usage: ./scripts/consumers.sh [work dir]   (default: build-consumers)
# Prints "consumers: N passed, N failed, N skipped"; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=/usr/bin/python3
work=${1:-$ROOT/build-consumers}
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)
JOBS=$(nproc)

pass=0 fail=0 skip=0
failed=()
# step <name> <command...>: runs one consumer check, its output in <name>.log
step() {
  local name=$1; shift
  echo "=== consumer $name"
  if "$@" >"$work/$name.log" 2>&1; then
    pass=$((pass + 1)); echo "    passed"
  else
    fail=$((fail + 1)); failed+=("$name"); echo "    FAILED:"; tail -40 "$work/$name.log"
  fi
}
skipped() { skip=$((skip + 1)); echo "=== consumer $1 skipped: $2"; }

# install <build dir> <prefix> <backends>
install_aiobridge() {
  cmake -S "$ROOT" -B "$1" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAIOB_WERROR=ON \
    "-DAIOB_BACKENDS=$3" -DAIOB_PYTHONS="$PY" -DAIOB_INSTALL=ON \
    -DAIOB_BUILD_TESTS=OFF -DAIOB_BUILD_BENCH=OFF -DAIOB_BUILD_EXAMPLES=OFF \
    -DAIOB_PYTHON_SUITES=OFF &&
    cmake --build "$1" -j"$JOBS" && cmake --install "$1" --prefix "$2"
}
prefix=$work/prefix
step install install_aiobridge "$work/aiobridge" "$prefix" "uv;event;uring"

# io_uring may be refused by the kernel (or a seccomp filter): then the
# uring consumers skip, with the reason.
uring_ok=1 uring_why=""
cat >"$work/uring_probe.c" <<'C'
#include <liburing.h>
#include <stdio.h>
#include <string.h>
int main(void) {
  struct io_uring ring;
  int rc = io_uring_queue_init(2, &ring, 0);
  if (rc < 0) { printf("io_uring_queue_init: %s\n", strerror(-rc)); return 1; }
  io_uring_queue_exit(&ring);
  return 0;
}
C
if ! cc "$work/uring_probe.c" -o "$work/uring_probe" -luring >/dev/null 2>&1; then
  uring_ok=0 uring_why="cannot build an io_uring probe"
elif ! uring_why=$("$work/uring_probe"); then
  uring_ok=0
fi

for b in uv event uring; do
  if [ "$b" = uring ] && [ $uring_ok = 0 ]; then skipped "cmake.$b" "$uring_why"; continue; fi
  step "cmake.$b" examples/consumer/cmake/check.sh "$prefix" "$work/cmake-$b" "$b" "$PY"
done
step pkgconfig examples/consumer/pkgconfig/check.sh "$prefix" "$work/pkgconfig"
step pip examples/consumer/pip/check.sh "$PY" "$work/pip" event
sub_backend=uring
[ $uring_ok = 1 ] || { sub_backend=uv; echo "(subdirectory consumer on uv: $uring_why)"; }
step subdirectory examples/consumer/subdirectory/check.sh "$PY" "$work/subdirectory" "$sub_backend"

multi() {
  for loop in asyncio uvloop; do
    echo "--- test_multi on $loop"
    (cd examples/consumer/multi &&
       PYTHONPATH="$work/cmake-uv:$work/pip/pipdemo-site:$work/pip/aiobridge-site" \
       CONSUMER_LOOP=$loop PYTHONDONTWRITEBYTECODE=1 "$PY" test_multi.py -v) || return 1
  done
}
step multi multi

# A single-backend install: only libuv is linked, and asking for another
# backend is a configure error that names it.
single() {
  local p=$work/prefix-uv
  install_aiobridge "$work/aiobridge-uv" "$p" uv || return 1
  local needed
  needed=$(readelf -d "$p/lib/libaiobridge.so" | grep NEEDED)
  echo "$needed"
  grep -q libuv <<<"$needed" || { echo "libaiobridge.so does not link libuv"; return 1; }
  if grep -Eq "libevent|liburing" <<<"$needed"; then echo "links another backend"; return 1; fi
  local libs
  libs=$(PKG_CONFIG_PATH=$p/lib/pkgconfig pkg-config --static --libs aiobridge-static)
  echo "pkg-config --static --libs aiobridge-static: $libs"
  grep -q -- "-luv" <<<"$libs" || return 1
  if grep -Eq -- "-levent|-luring" <<<"$libs"; then echo "pkg-config names another backend"; return 1; fi
  mkdir -p "$work/components"
  cat >"$work/components/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.21)
project(components LANGUAGES C)
find_package(aiobridge CONFIG REQUIRED COMPONENTS ${WANT})
message(STATUS "found aiobridge ${aiobridge_VERSION} with ${aiobridge_BACKENDS}")
CM
  cmake -S "$work/components" -B "$work/components/ok" -DCMAKE_PREFIX_PATH="$p" \
    "-DWANT=uv;python" -DPython_EXECUTABLE="$PY" || return 1
  local out
  if out=$(cmake -S "$work/components" -B "$work/components/missing" \
             -DCMAKE_PREFIX_PATH="$p" "-DWANT=uv;uring" 2>&1); then
    echo "find_package(COMPONENTS uring) succeeded on a uv-only install"; return 1
  fi
  # CMake wraps the message at a width that depends on the prefix's length:
  # join the lines before looking for the phrase.
  local flat
  flat=$(tr -s ' \n' '  ' <<<"$out")
  echo "$flat" | grep -io "aiobridge at .* has no component '[a-z]*'[^.]*"
  grep -q "no component 'uring'" <<<"$flat" || { echo "$out"; return 1; }
}
step single-backend single

echo "consumers: $pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ] || { echo "FAILED consumers: ${failed[*]} (logs in $work)"; exit 1; }
