#!/usr/bin/env bash
# Builds the nativeio extension against an installed aiobridge (nothing from
# aiobridge's source or build tree), checks what it links, and runs
# test_nativeio.py on stock asyncio and on uvloop.
# Usage: check.sh <aiobridge prefix> <build dir> <backend: uv|event|uring> <python>
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 <aiobridge prefix> <build dir> <uv|event|uring> <python>" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
prefix=$(cd "$1" && pwd)
build=$2 backend=$3 py=$4
case $backend in
  uv) lib=libuv ;;
  event) lib=libevent_core ;;
  uring) lib=liburing ;;
  *) echo "backend must be uv, event or uring, not '$backend'" >&2; exit 2 ;;
esac

mkdir -p "$build"
build=$(cd "$build" && pwd)
if [ "$build" = "$here" ] || [ "$build" = / ]; then
  echo "the build dir must not be $build (it is emptied first)" >&2; exit 2
fi
echo "--- configure $build (backend $backend, $py, aiobridge from $prefix)"
rm -rf "$build"
cmake -S "$here" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DPython_EXECUTABLE="$py" -DNATIVEIO_BACKEND="$backend" -DNATIVEIO_WERROR=ON
echo "--- build (-Wall -Wextra -Werror)"
cmake --build "$build" -j"$(nproc)"

suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
module=$build/nativeio$suffix
[ -f "$module" ] || { echo "FAIL: $module was not built" >&2; exit 1; }

echo "--- linkage of $(basename "$module")"
needed=$(readelf -d "$module" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
echo "NEEDED:" $needed  # one line
for other in libuv libevent_core liburing; do
  if echo "$needed" | grep -q "^${other}[.-]"; then has=yes; else has=no; fi
  if [ "$other" = "$lib" ] && [ $has = no ]; then
    echo "FAIL: $lib is not NEEDED" >&2; exit 1
  elif [ "$other" != "$lib" ] && [ $has = yes ]; then
    echo "FAIL: $other is NEEDED by a $backend extension" >&2; exit 1
  fi
done
if echo "$needed" | grep -q '^libaiobridge'; then
  echo "FAIL: libaiobridge.so is NEEDED: aiobridge must be linked in statically" >&2
  exit 1
fi
exported=$(nm -D --defined-only "$module" | awk '{print $3}' | grep -v '^_init$\|^_fini$' || true)
echo "exported:" $exported
if [ "$exported" != "PyInit_nativeio" ]; then
  echo "FAIL: the module must export PyInit_nativeio only" >&2; exit 1
fi

pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
site=
for d in "$prefix"/lib*/python"$pyver"/site-packages "$prefix"/lib/*/python"$pyver"/site-packages; do
  if [ -d "$d/aiobridge" ]; then site=$d; break; fi
done
[ -n "$site" ] || { echo "FAIL: no aiobridge package for Python $pyver under $prefix" >&2; exit 1; }

for loop in asyncio uvloop; do
  echo "--- test_nativeio on $loop (PYTHONPATH=$build:$site)"
  (cd "$build" && CONSUMER_LOOP=$loop CONSUMER_BACKEND=$backend \
     PYTHONPATH="$build:$site" PYTHONDONTWRITEBYTECODE=1 \
     timeout 600 "$py" "$here/test_nativeio.py" -v)
done
echo "--- ok: nativeio on $backend"
