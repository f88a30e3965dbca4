#!/usr/bin/env bash
# Builds the aiobridge Python package with pip (offline, Debian's setuptools
# and wheel), then this extension project against it, and runs its test on
# stock asyncio and uvloop.
# Usage: check.sh <python> <work dir> [backend]   (backend default: event)
# Leaves <work dir>/aiobridge-site and <work dir>/pipdemo-site.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
py=$1 work=$2 backend=${3:-event}
mkdir -p "$work"
work=$(cd "$work" && pwd)
rm -rf "$work/aiobridge-site" "$work/pipdemo-site" "$work/pipdemo-src"

echo "--- pip install aiobridge ($root) with $py"
"$py" -m pip install --no-build-isolation --no-deps --no-index -q \
  --target "$work/aiobridge-site" "$root"

echo "--- pip install pipdemo (backend $backend) against it"
cp -r "$here" "$work/pipdemo-src"   # the build writes into its source
PYTHONPATH="$work/aiobridge-site" PIPDEMO_BACKEND=$backend \
  "$py" -m pip install --no-build-isolation --no-deps --no-index -q \
  --target "$work/pipdemo-site" "$work/pipdemo-src"

for loop in asyncio uvloop; do
  echo "--- test_pipdemo on $loop"
  (cd "$here" && PYTHONPATH="$work/pipdemo-site:$work/aiobridge-site" \
     PIPDEMO_BACKEND=$backend CONSUMER_LOOP=$loop PYTHONDONTWRITEBYTECODE=1 \
     "$py" test_pipdemo.py -v)
done
