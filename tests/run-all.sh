#!/bin/sh
# Runs every test suite against one build directory and prints, as the very
# last line, "N passed, N failed" summed over all suites. Exits non-zero if
# any test failed or any suite did not report.
#
#   tests/run-all.sh BUILD_DIR [unit|integration|scale]...   (default: all suites)
#
# integration runs every script on the embedded default (SQLite index,
# directory archive); scale runs the walking skeleton's key scripts again on
# the scale-out column (PostgreSQL index, S3 archive). One PostgreSQL cluster
# (tests/infra/postgres.sh) and one S3 server (tests/infra/swift.sh) serve
# the whole run; unit tests get the cluster as YY_PG_URL.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: run-all.sh BUILD_DIR [suite...]}
shift
case "$build" in /*) ;; *) build="$top/$build" ;; esac
suites=${*:-unit integration scale}
SCALE_SCRIPTS="test_skeleton test_cloud_api test_dicomweb test_bundles test_security test_retention test_scaleout"
# Scripts that run only in the scale pass (they need PostgreSQL + S3 anyway).
SCALE_ONLY="test_scaleout"

total_pass=0
total_fail=0
log_dir=$(mktemp -d /tmp/yy-tests-XXXXXX)

add() { total_pass=$((total_pass + $1)); total_fail=$((total_fail + $2)); }

# The run's PostgreSQL cluster and S3 server, started on first use.
pg_dir=""
swift_dir=""
start_pg() {
    [ -z "$pg_dir" ] || return 0
    pg_dir=$(mktemp -d /tmp/yy-pg-XXXXXX)   # not under log_dir: user postgres must reach it
    if ! sh "$top/tests/infra/postgres.sh" start "$pg_dir" >"$log_dir/pg.env" 2>"$log_dir/pg.log"; then
        echo "postgres.sh start failed - log:"; tail -n 20 "$log_dir/pg.log"
        return 1
    fi
    YY_PG_URL=$(sed -n 's/^YY_PG_URL=//p' "$log_dir/pg.env")
    export YY_PG_URL
    export YY_PG_DIR="$pg_dir"   # the integration harness reuses this cluster
}
start_swift() {
    [ -z "$swift_dir" ] || return 0
    swift_dir=$(mktemp -d /tmp/yy-swift-XXXXXX)
    if ! sh "$top/tests/infra/swift.sh" start "$swift_dir" >/dev/null 2>"$log_dir/swift.log"; then
        echo "swift.sh start failed - log:"; tail -n 20 "$log_dir/swift.log"
        return 1
    fi
    export YY_SWIFT_DIR="$swift_dir"
}
stop_services() {
    if [ -n "$pg_dir" ]; then
        sh "$top/tests/infra/postgres.sh" stop "$pg_dir" >/dev/null 2>&1
        rm -rf "$pg_dir"
    fi
    if [ -n "$swift_dir" ]; then
        sh "$top/tests/infra/swift.sh" stop "$swift_dir" >/dev/null 2>&1
        rm -rf "$swift_dir"
    fi
}
trap stop_services EXIT

run_unit() {
    start_pg || echo "unit: PostgreSQL cases will be skipped"
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

# run_integration [scale]: every script, or the scale-out column's scripts.
run_integration() {
    mode=${1:-}
    if [ "$mode" = scale ]; then
        if ! start_pg || ! start_swift; then
            add 0 1
            return
        fi
        scripts=$(for n in $SCALE_SCRIPTS; do echo "$top/tests/integration/$n.py"; done)
        label="integration[pg+s3]"
    else
        scripts=$(ls "$top"/tests/integration/test_*.py 2>/dev/null | sort |
            grep -v -E "/($(echo $SCALE_ONLY | tr ' ' '|'))\.py$")
        label=integration
    fi
    for t in $scripts; do
        name=$(basename "$t" .py)
        out="$log_dir/$label-$name.log"
        if [ "$mode" = scale ]; then
            YY_TOP="$top" YY_BUILD="$build" YY_INDEX=pg YY_BACKEND=s3 /usr/bin/python3 "$t" >"$out" 2>&1
        else
            YY_TOP="$top" YY_BUILD="$build" YY_INDEX=${YY_INDEX:-sqlite} YY_BACKEND=${YY_BACKEND:-dir} /usr/bin/python3 "$t" >"$out" 2>&1
        fi
        rc=$?
        last=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n1)
        p=$(echo "$last" | sed -n 's/^\([0-9]*\) passed.*/\1/p'); p=${p:-0}
        f=$(echo "$last" | sed -n 's/.* \([0-9]*\) failed$/\1/p'); f=${f:-0}
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
        if [ "$f" -ne 0 ]; then
            echo "$label $name: FAILED ($p passed, $f failed) - log:"; sed 's/^/    /' "$out" | tail -n 80
        else
            echo "$label $name: $p passed"
        fi
        add "$p" "$f"
    done
}

for s in $suites; do
    case "$s" in
    unit) run_unit ;;
    integration) run_integration ;;
    scale) run_integration scale ;;
    *) echo "unknown suite $s"; total_fail=$((total_fail + 1)) ;;
    esac
done

echo "logs: $log_dir"
if [ "$total_pass" -eq 0 ] && [ "$total_fail" -eq 0 ]; then total_fail=1; fi
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
