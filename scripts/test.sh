#!/usr/bin/env bash
# Builds and runs every test suite with all backends (uv, event, uring): a
# plain build with warnings as errors, ASan+UBSan and TSan builds of the same
# suites, and one build per single backend (proving it links nothing else).
# Then uses the library from outside its tree as users do (consumers: an
# install into a temporary prefix, and every project in examples/consumer).
# Exits non-zero if any test fails.
# Usage: ./scripts/test.sh [plain|asan|tsan|single-uv|single-event|single-uring|consumers]...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

./scripts/deps.sh

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(plain asan tsan single-uv single-event single-uring consumers)
ALL_BACKENDS="uv;event;uring"
JOBS=$(nproc)

export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$ROOT/tests/tsan.supp"

total_pass=0 total_fail=0 total_skip=0
failed_variants=()

# Formatting: the repo's .clang-format is the style.
if command -v clang-format >/dev/null 2>&1; then
  echo "=== clang-format check"
  if git ls-files '*.c' '*.h' '*.cpp' | xargs -r clang-format --dry-run --Werror 2>&1 | head -20 | grep .; then
    echo "format: files differ from .clang-format (run clang-format -i on them)"
    total_fail=$((total_fail + 1)); failed_variants+=(format)
  else
    total_pass=$((total_pass + 1))
  fi
else
  echo "=== clang-format check skipped: clang-format is not installed"
  total_skip=$((total_skip + 1))
fi

for v in "${variants[@]}"; do
  only=()
  if [ "$v" = consumers ]; then
    echo "=== [consumers] install into a temporary prefix; build and run examples/consumer/*"
    set +e
    ./scripts/consumers.sh "$ROOT/build-consumers" 2>&1 | tee "$ROOT/build-consumers.log"
    rc=${PIPESTATUS[0]}
    set -e
    summary=$(grep -E '^consumers: [0-9]+ passed' "$ROOT/build-consumers.log" | tail -1 || true)
    if [ -z "$summary" ]; then
      total_fail=$((total_fail + 1))
    else
      read -r n_pass n_fail n_skip < <(sed -E 's/consumers: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped/\1 \2 \3/' <<<"$summary")
      total_pass=$((total_pass + n_pass)); total_fail=$((total_fail + n_fail)); total_skip=$((total_skip + n_skip))
    fi
    if [ "$rc" -ne 0 ]; then failed_variants+=("$v"); fi
    continue
  fi
  case "$v" in
    plain) flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DAIOB_BACKENDS=$ALL_BACKENDS") ;;
    # Sanitizer trees: a sanitized extension cannot load into a stock
    # interpreter, so the Python suites run in the plain tree only. The
    # bridge's C API test (bridge_capi) embeds CPython in a sanitized
    # program, so the bridge's concurrency runs under ASan and TSan there.
    asan)  flags=(-DCMAKE_BUILD_TYPE=Debug -DAIOB_SANITIZE=address "-DAIOB_BACKENDS=$ALL_BACKENDS" -DAIOB_PYTHON_SUITES=OFF -DAIOB_PYTHONS=/usr/bin/python3)
           echo "=== [asan] Python suites skipped: sanitized extensions cannot load into stock interpreters (bridge_capi embeds one)"
           echo "=== [asan] fork.* and lifecycle.* skip their fork() cases: a forked child of a threaded process cannot start threads under GCC 12's ASan (the plain tree runs them)" ;;
    tsan)  flags=(-DCMAKE_BUILD_TYPE=Debug -DAIOB_SANITIZE=thread "-DAIOB_BACKENDS=$ALL_BACKENDS" -DAIOB_PYTHON_SUITES=OFF -DAIOB_PYTHONS=/usr/bin/python3)
           echo "=== [tsan] Python suites skipped: sanitized extensions cannot load into stock interpreters (bridge_capi embeds one)"
           echo "=== [tsan] fork.* and lifecycle.* skip their fork() cases: a forked child of a threaded process cannot start threads under GCC 12's TSan (the plain tree runs them)" ;;
    single-*)
      b=${v#single-}
      flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DAIOB_BACKENDS=$b" -DAIOB_BUILD_BENCH=OFF -DAIOB_BUILD_EXAMPLES=OFF -DAIOB_PYTHON=OFF)
      only=(-R "^(linkage|conformance\\.$b|fork\\.$b|lifecycle\\.$b|blocking\\.$b|idle_cpu\\.$b|hosted\\.$b|default_backend\\..*)\$") ;;
    *) echo "unknown variant: $v (plain, asan, tsan, single-uv, single-event, single-uring, consumers)" >&2; exit 2 ;;
  esac
  dir="$ROOT/build-test-$v"
  echo "=== [$v] configure and build"
  cmake -S "$ROOT" -B "$dir" -DAIOB_WERROR=ON "${flags[@]}" >"$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
  cmake --build "$dir" -j"$JOBS" >"$dir.build.log" 2>&1 \
    || { cat "$dir.build.log"; exit 1; }
  echo "=== [$v] ctest"
  set +e
  (cd "$dir" && ctest --output-on-failure -j"$JOBS" "${only[@]}") 2>&1 | tee "$dir.ctest.log"
  rc=${PIPESTATUS[0]}
  set -e
  summary=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$dir.ctest.log" | tail -1 || true)
  n_total=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$summary")
  n_fail=$(sed -E 's/.*passed, ([0-9]+) tests? failed.*/\1/' <<<"$summary")
  n_skip=$(grep -c '(Skipped)' "$dir.ctest.log" || true)
  [ -n "$n_total" ] || { n_total=0; n_fail=1; }
  total_pass=$((total_pass + n_total - n_fail - n_skip))
  total_fail=$((total_fail + n_fail))
  total_skip=$((total_skip + n_skip))
  if [ "$rc" -ne 0 ] || [ "$n_fail" -ne 0 ]; then failed_variants+=("$v"); fi
done

echo
if [ ${#failed_variants[@]} -gt 0 ]; then
  echo "FAILED variants: ${failed_variants[*]}"
fi
echo "total: $total_pass passed, $total_fail failed, $total_skip skipped"
[ ${#failed_variants[@]} -eq 0 ]
