#!/bin/sh
# make bench: runs every tests/bench/bench_*.sh against one build directory.
# Each benchmark compares against an anchor measured in the same run and
# prints its own figures and ratios; nothing here is a pass/fail test.
set -u
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build/release}
status=0
for b in "$top"/tests/bench/bench_*.sh; do
    [ -x "$b" ] || continue
    echo "==== $(basename "$b")"
    "$b" "$build" || { echo "($(basename "$b") failed)"; status=1; }
done
exit $status
