#!/bin/sh
# swift.sh - a private single-node OpenStack Swift with the s3api middleware,
# used as the real S3 server of the tests (facts: ../shared/notes/s3-swift.md).
#
#   tests/infra/swift.sh install          install the Debian packages (idempotent)
#   tests/infra/swift.sh start DIR [PORT] install if needed, start, print env lines
#   tests/infra/swift.sh env DIR          print the env lines of a running instance
#   tests/infra/swift.sh stop DIR         stop the processes recorded in DIR/run
#   tests/infra/swift.sh status DIR       exit 0 if every recorded process is alive
#
# start writes everything under DIR (config, rings, object storage, logs, PID
# files) and prints shell-sourceable lines on stdout (also kept in DIR/env):
#
#   YY_S3_ENDPOINT=http://127.0.0.1:PORT   YY_S3_REGION=us-east-1
#   YY_S3_BUCKET=yunying-test (created)    YY_S3_ACCESS_KEY=test:tester
#   YY_S3_SECRET_KEY=testing               YY_S3_SECRET_FILE=DIR/secret
#   YY_S3_NETRC=DIR/netrc (for curl --aws-sigv4: the access key holds a colon)
#   YY_SWIFT_DIR=DIR
#
# PORT (default: a free one) is the S3/Swift proxy port; the account,
# container, object and memcached servers take other free ports. A taken PORT
# is refused: Swift binds with SO_REUSEPORT and would silently share it. The
# proxy also serves virtual-host style for buckets under "localhost"
# (http://BUCKET.localhost:PORT/KEY). Diagnostics go to stderr; logs to DIR/log.
# Starting a DIR whose processes still run just prints its env lines again.
set -eu

PKGS="swift swift-proxy swift-object swift-container swift-account memcached python3-swift"
PY=/usr/bin/python3
BUCKET=yunying-test
REGION=us-east-1
ACCESS_KEY=test:tester
SECRET_KEY=testing
SERVERS="account container object proxy memcached"

say() { echo "swift.sh: $*" >&2; }
die() { say "$*"; exit 1; }
. "$(dirname "$0")/lib.sh"

do_install() { infra_install $PKGS; }

all_alive() {
    run=$1/run
    [ -d "$run" ] || return 1
    for s in $SERVERS; do
        [ -f "$run/$s.pid" ] || return 1
        alive "$(cat "$run/$s.pid")" || return 1
    done
}

# free_ports N: N distinct free TCP ports on 127.0.0.1, one per line.
free_ports() {
    $PY - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}


print_env() {
    cat "$1/env"
}

stop_dir() {
    dir=$1
    run=$dir/run
    [ -d "$run" ] || return 0
    pids=""
    for f in "$run"/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids="$pids $pid"
        fi
    done
    # Poll with a deadline (10 s), then SIGKILL what is left.
    i=0
    while [ $i -lt 100 ]; do
        left=""
        for pid in $pids; do alive "$pid" && left="$left $pid"; done
        [ -n "$left" ] || break
        sleep 0.1
        i=$((i + 1))
    done
    for pid in $pids; do
        if alive "$pid"; then
            say "pid $pid ignored SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$run"/*.pid
}

write_conf() {
    dir=$1 pp=$2 pa=$3 pc=$4 po=$5 pm=$6
    etc=$dir/etc
    user=$(id -un)
    mkdir -p "$etc" "$dir/srv/d0" "$dir/log" "$dir/run" "$dir/cache"
    suffix=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    [ -f "$etc/swift.conf" ] || cat >"$etc/swift.conf" <<EOF
[swift-hash]
swift_hash_path_suffix = $suffix
swift_hash_path_prefix = yunying

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
max_file_size = 53687091200
EOF
    common="swift_dir = $etc
devices = $dir/srv
mount_check = false
bind_ip = 127.0.0.1
workers = 0
user = $user
log_name = swift
log_level = WARNING
log_address = $dir/log/nonexistent-syslog
client_timeout = 120
node_timeout = 60
conn_timeout = 5"
    for s in account container object; do
        case $s in account) port=$pa ;; container) port=$pc ;; object) port=$po ;; esac
        cat >"$etc/$s-server.conf" <<EOF
[DEFAULT]
$common
bind_port = $port

[pipeline:main]
pipeline = $s-server

[app:$s-server]
use = egg:swift#$s
EOF
    done
    # Object chunks of 1 MiB: the 64 KiB default halves throughput.
    cat >>"$etc/object-server.conf" <<EOF
network_chunk_size = 1048576
disk_chunk_size = 1048576
EOF
    # slo after s3api, or multipart silently turns off.
    cat >"$etc/proxy-server.conf" <<EOF
[DEFAULT]
$common
bind_port = $pp

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
object_chunk_size = 1048576
client_chunk_size = 1048576

[filter:s3api]
use = egg:swift#s3api
location = $REGION
storage_domain = localhost
s3_acl = false
dns_compliant_bucket_names = true
allow_multipart_uploads = true

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = $SECRET_KEY .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$pm

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
EOF
    # Rings in one python run (~1 s) instead of nine swift-ring-builder calls.
    $PY - "$etc" "$pa" "$pc" "$po" <<'EOF'
import os, sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for name, port in (("account", sys.argv[2]), ("container", sys.argv[3]), ("object", sys.argv[4])):
    b = RingBuilder(6, 1, 1)
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
               "device": "d0", "weight": 100, "meta": ""})
    b.rebalance()
    b.get_ring().save(os.path.join(etc, name + ".ring.gz"))
EOF
}

start_bg() {
    # start_bg NAME CMD...: start in the background, record the PID.
    name=$1
    shift
    "$@" >"$dir/log/$name.out" 2>&1 </dev/null &
    echo $! >"$dir/run/$name.pid"
}

do_start() {
    dir=$1
    want_port=${2:-}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if all_alive "$dir" && [ -f "$dir/env" ]; then
        print_env "$dir"
        return 0
    fi
    stop_dir "$dir"
    do_install
    command -v curl >/dev/null || die "curl is missing (deploy/install-deps.sh installs it)"

    if [ -n "$want_port" ]; then
        port_free "$want_port" || die "port $want_port is taken; refusing to start (Swift would share it)"
        set -- $(free_ports 4)
        pp=$want_port pa=$1 pc=$2 po=$3 pm=$4
    else
        set -- $(free_ports 5)
        pp=$1 pa=$2 pc=$3 po=$4 pm=$5
    fi
    for p in $pp $pa $pc $po $pm; do
        port_free "$p" || die "port $p is taken; refusing to start"
    done
    write_conf "$dir" "$pp" "$pa" "$pc" "$po" "$pm"

    mc_user=""
    [ "$(id -u)" -ne 0 ] || mc_user="-u root"
    start_bg memcached memcached -l 127.0.0.1 -p "$pm" -U 0 -m 64 $mc_user
    start_bg account /usr/bin/swift-account-server "$dir/etc/account-server.conf"
    start_bg container /usr/bin/swift-container-server "$dir/etc/container-server.conf"
    start_bg object /usr/bin/swift-object-server "$dir/etc/object-server.conf"
    start_bg proxy /usr/bin/swift-proxy-server "$dir/etc/proxy-server.conf"

    printf '%s\n' "$SECRET_KEY" >"$dir/secret"
    chmod 600 "$dir/secret"
    for h in 127.0.0.1 localhost "$BUCKET.localhost"; do
        printf 'machine %s login %s password %s\n' "$h" "$ACCESS_KEY" "$SECRET_KEY"
    done >"$dir/netrc"
    chmod 600 "$dir/netrc"

    # Ready when a signed bucket creation succeeds (200, or 409 = exists).
    empty_sha=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
    deadline=$(($(date +%s) + ${YY_SWIFT_START_TIMEOUT:-90}))
    code=000
    while :; do
        for s in $SERVERS; do
            alive "$(cat "$dir/run/$s.pid")" || {
                tail -n 20 "$dir/log/$s.out" >&2
                stop_dir "$dir"
                die "$s exited during start (log: $dir/log/$s.out)"
            }
        done
        code=$(curl -s -o "$dir/log/probe.out" -w '%{http_code}' --max-time 10 -X PUT \
            --aws-sigv4 "aws:amz:$REGION:s3" --netrc-file "$dir/netrc" \
            -H "x-amz-content-sha256: $empty_sha" "http://127.0.0.1:$pp/$BUCKET" 2>/dev/null) || true
        case $code in 200 | 409) break ;; esac
        if [ "$(date +%s)" -ge "$deadline" ]; then
            cat "$dir/log/probe.out" >&2 2>/dev/null || true
            stop_dir "$dir"
            die "not ready within ${YY_SWIFT_START_TIMEOUT:-90}s (last HTTP status $code; logs in $dir/log)"
        fi
        sleep 0.2
    done

    cat >"$dir/env" <<EOF
YY_S3_ENDPOINT=http://127.0.0.1:$pp
YY_S3_REGION=$REGION
YY_S3_BUCKET=$BUCKET
YY_S3_ACCESS_KEY=$ACCESS_KEY
YY_S3_SECRET_KEY=$SECRET_KEY
YY_S3_SECRET_FILE=$dir/secret
YY_S3_NETRC=$dir/netrc
YY_SWIFT_DIR=$dir
EOF
    print_env "$dir"
}

cmd=${1:-}
case $cmd in
install) do_install ;;
start) [ $# -ge 2 ] || die "usage: swift.sh start DIR [PORT]"; do_start "$2" "${3:-}" ;;
env) [ $# -eq 2 ] && [ -f "$2/env" ] || die "usage: swift.sh env DIR (of a started instance)"; print_env "$2" ;;
stop) [ $# -eq 2 ] || die "usage: swift.sh stop DIR"; stop_dir "$2" ;;
status) [ $# -eq 2 ] || die "usage: swift.sh status DIR"; all_alive "$2" ;;
*) die "usage: swift.sh install | start DIR [PORT] | env DIR | stop DIR | status DIR" ;;
esac
