#!/bin/sh
# Runs every test suite against one build directory and prints, as the very
# last line, "N passed, N failed" summed over all suites. Exits non-zero if
# any test failed or any suite did not report.
#
#   tests/run-all.sh BUILD_DIR [unit|integration]...   (default: all suites)
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: run-all.sh BUILD_DIR [suite...]}
shift
case "$build" in /*) ;; *) build="$top/$build" ;; esac
suites=${*:-unit integration}

total_pass=0
total_fail=0
log_dir=$(mktemp -d /tmp/yy-tests-XXXXXX)

add() { total_pass=$((total_pass + $1)); total_fail=$((total_fail + $2)); }

run_unit() {
    for t in $(find "$build/tests/unit" -type f -name 'test_*' -perm -u+x 2>/dev/null | sort); do
        name=${t#"$build/tests/unit/"}
        out="$log_dir/unit-$(echo "$name" | tr / _).log"
        "$t" >"$out" 2>&1
        rc=$?
        p=$(sed -n 's/^.*\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -n1)
        f=$(sed -n 's/^.*\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -n1)
        p=${p:-0}; f=${f:-0}
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # crashed before its summary
        if [ "$f" -ne 0 ]; then
            echo "unit $name: FAILED ($p passed, $f failed) - log:"; sed 's/^/    /' "$out" | tail -n 60
        else
            echo "unit $name: $p passed"
        fi
        add "$p" "$f"
    done
}

run_integration() {
    for t in $(ls "$top"/tests/integration/test_*.py 2>/dev/null | sort); do
        name=$(basename "$t" .py)
        out="$log_dir/integration-$name.log"
        YY_TOP="$top" YY_BUILD="$build" /usr/bin/python3 "$t" >"$out" 2>&1
        rc=$?
        last=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n1)
        p=$(echo "$last" | sed -n 's/^\([0-9]*\) passed.*/\1/p'); p=${p:-0}
        f=$(echo "$last" | sed -n 's/.* \([0-9]*\) failed$/\1/p'); f=${f:-0}
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
        if [ "$f" -ne 0 ]; then
            echo "integration $name: FAILED ($p passed, $f failed) - log:"; sed 's/^/    /' "$out" | tail -n 80
        else
            echo "integration $name: $p passed"
        fi
        add "$p" "$f"
    done
}

for s in $suites; do
    case "$s" in
    unit) run_unit ;;
    integration) run_integration ;;
    *) echo "unknown suite $s"; total_fail=$((total_fail + 1)) ;;
    esac
done

echo "logs: $log_dir"
if [ "$total_pass" -eq 0 ] && [ "$total_fail" -eq 0 ]; then total_fail=1; fi
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
