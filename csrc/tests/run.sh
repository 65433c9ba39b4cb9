#!/usr/bin/env bash
# Builds the C++ core and its tests three ways and runs them with CTest:
#   plain                      optimized, asserts on
#   thread                     ThreadSanitizer
#   address,undefined          AddressSanitizer + UndefinedBehaviorSanitizer (leak checking on)
# into build/cpp-<name>. Exits non-zero when any build or test fails (all three always run).
#
#   bash csrc/tests/run.sh               all three
#   bash csrc/tests/run.sh plain tsan    some of them (plain | tsan | asan)
# A failing test prints its seed; replay it with
#   PYLOADER_TEST_SEED=<seed> build/cpp-<name>/<binary> <test>
set -uo pipefail
cd "$(dirname "$0")/../.."

jobs=$(nproc 2>/dev/null || echo 2)
builds=("$@")
[ ${#builds[@]} -eq 0 ] && builds=(plain tsan asan)

status=0
summary=()
for name in "${builds[@]}"; do
  case "$name" in
    plain) sanitize="" ;;
    tsan) sanitize="thread" ;;
    asan) sanitize="address,undefined" ;;
    *) echo "unknown build '$name' (plain | tsan | asan)" >&2; exit 2 ;;
  esac
  dir="build/cpp-$name"
  echo "== C++ core: $name build (PYLOADER_SANITIZE='$sanitize') in $dir"
  start=$(date +%s)
  mkdir -p "$dir"
  if cmake -S csrc -B "$dir" -G Ninja -DPYLOADER_SANITIZE="$sanitize" >"$dir/configure.log" 2>&1 ||
     { cat "$dir/configure.log"; false; }; then
    if cmake --build "$dir" -j "$jobs"; then
      (
        export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
        export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
        export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
        ctest --test-dir "$dir" --output-on-failure -j "$jobs"
      )
      rc=$?
    else
      rc=1
    fi
  else
    rc=1
  fi
  took=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then
    summary+=("$name: passed in ${took} s")
  else
    summary+=("$name: FAILED (${took} s)")
    status=1
  fi
done

echo "== C++ core summary"
printf '   %s\n' "${summary[@]}"
exit $status
