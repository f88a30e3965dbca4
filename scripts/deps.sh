#!/usr/bin/env bash
# Installs the Debian packages aiobridge needs that are missing. Idempotent:
# prints what it installs, or nothing to do. Needs root (or sudo) only when
# something is missing.
set -euo pipefail

PACKAGES=(
  cmake make gcc g++ pkg-config   # build
  libuv1-dev                      # uv backend
  libevent-dev                    # event backend
  liburing-dev                    # uring backend
  libcmocka-dev                   # C tests
  clang-format                    # style check
  python3-dev python3-dbg         # the asyncio bridge, reference-leak checks
  python3-uvloop                  # bridge tests on uvloop
  python3-pip python3-setuptools python3-wheel  # the pip package and its consumer
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#PACKAGES[@]} Debian packages present"
  exit 0
fi

echo "deps: installing missing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "deps: not root and no sudo; install these packages yourself: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq; then
  echo "deps: apt-get update failed (no access to the Debian archive?)" >&2
  exit 1
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  echo "deps: apt-get install failed for: ${missing[*]}" >&2
  exit 1
fi
echo "deps: installed ${missing[*]}"
