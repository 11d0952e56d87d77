#!/bin/sh
# nginx.sh - a private nginx as the load balancer in front of N cloud nodes,
# for the scale-out tests (tests/integration/test_scaleout.py) and benchmarks.
#
#   tests/infra/nginx.sh install                       install nginx (idempotent)
#   tests/infra/nginx.sh start  DIR [OPTIONS] NODE...  write DIR/nginx.conf, start, print env
#   tests/infra/nginx.sh reload DIR [OPTIONS] NODE...  new node list, graceful reload (no
#                                                      request in flight is dropped)
#   tests/infra/nginx.sh env    DIR                    print the env lines of a running one
#   tests/infra/nginx.sh stop   DIR                    stop it (SIGQUIT: graceful, then TERM)
#   tests/infra/nginx.sh status DIR                    exit 0 if the master is alive
#
# NODE is HOST:PORT of a yunying-cloud. OPTIONS (start and reload take the
# same; reload keeps the listening port):
#   --cert FILE --key FILE   the certificate the balancer presents (HTTPS
#                            listener); without them it listens plain HTTP
#   --upstream-ca FILE       the nodes speak HTTPS; their certificates are
#                            verified against FILE (re-encryption); without it
#                            the nodes are reached over plain HTTP
#   --upstream-name NAME     the name checked in the nodes' certificates
#                            (default localhost; the test CA names it)
#   --max-body-mb N          client_max_body_size (default 80 = http.max_body_mb)
#   --port PORT              listening port (default: a free one; a taken port is refused)
#
# The mode is the one docs/cloud.md recommends: HTTP reverse proxy that
# terminates TLS and re-encrypts to the nodes, so that every request (every
# upload chunk) is balanced on its own, round-robin, even when the edge keeps
# one connection open; node state (round robin position, failures) is shared
# by the workers (upstream zone). Request bodies are streamed to the node
# (proxy_request_buffering off) and responses to the client (proxy_buffering
# off). A failed connect is retried once on the next node; a request whose
# body has started cannot be (nginx refuses), the edge retries it, signed anew.
# The client address is passed as X-Forwarded-For / X-Real-IP (overwritten,
# never appended: nginx is where the trust boundary is).
#
# Everything lives in DIR: nginx.conf, proxy.inc, nginx.pid, logs/ (access.log has the
# node that served each request: "up=HOST:PORT"), tmp/. Listens on 127.0.0.1.
# A test instance: as root the workers run as root so that DIR may be
# anywhere (deploy/nginx/yunying-cloud.conf is the deployment example).
#
# stdout (also kept in DIR/env), shell-sourceable:
#   YY_LB_URL=https://127.0.0.1:PORT  YY_LB_PORT=PORT  YY_LB_DIR=DIR
#   YY_LB_ACCESS_LOG=DIR/logs/access.log
set -eu

PKGS="nginx"
PY=/usr/bin/python3

say() { echo "nginx.sh: $*" >&2; }
die() { say "$*"; exit 1; }
. "$(dirname "$0")/lib.sh"

do_install() { infra_install $PKGS; }

NGINX=/usr/sbin/nginx


master_pid() {
    [ -s "$1/nginx.pid" ] && head -n1 "$1/nginx.pid"
}

is_running() {
    pid=$(master_pid "$1") || return 1
    [ -n "$pid" ] && alive "$pid"
}



# parse_opts ARGS...: sets cert key upca upname maxbody port nodes.
parse_opts() {
    cert="" key="" upca="" upname=localhost maxbody=80 port="" nodes=""
    while [ $# -gt 0 ]; do
        case $1 in
        --cert) cert=$2; shift 2 ;;
        --key) key=$2; shift 2 ;;
        --upstream-ca) upca=$2; shift 2 ;;
        --upstream-name) upname=$2; shift 2 ;;
        --max-body-mb) maxbody=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --*) die "unknown option $1" ;;
        *) nodes="$nodes $1"; shift ;;
        esac
    done
    [ -n "$nodes" ] || die "no cloud node given (HOST:PORT ...)"
    { [ -z "$cert" ] && [ -z "$key" ]; } || { [ -r "$cert" ] && [ -r "$key" ]; } ||
        die "--cert and --key must both name readable files"
    [ -z "$upca" ] || [ -r "$upca" ] || die "--upstream-ca $upca is not readable"
    case $maxbody in '' | *[!0-9]*) die "--max-body-mb must be a number" ;; esac
    for n in $nodes; do
        case $n in *:*[0-9]) ;; *) die "node $n is not HOST:PORT" ;; esac
    done
}

abspath() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }

write_conf() {
    dir=$1
    scheme=http
    [ -z "$upca" ] || scheme=https
    mkdir -p "$dir/logs" "$dir/tmp"
    # proxy.inc: how nginx talks to the nodes (every location includes it).
    {
        cat <<EOF
proxy_pass $scheme://yunying_cloud;
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_set_header Host \$http_host;
proxy_set_header X-Forwarded-For \$remote_addr;
proxy_set_header X-Real-IP \$remote_addr;
proxy_set_header X-Forwarded-Proto \$scheme;
proxy_request_buffering off;
proxy_buffering off;
proxy_connect_timeout 5s;
proxy_send_timeout 300s;
proxy_read_timeout 300s;
proxy_next_upstream error timeout;
proxy_next_upstream_tries 2;
proxy_next_upstream_timeout 15s;
EOF
        if [ -n "$upca" ]; then
            cat <<EOF
proxy_ssl_verify on;
proxy_ssl_trusted_certificate $(abspath "$upca");
proxy_ssl_name $upname;
proxy_ssl_server_name on;
proxy_ssl_protocols TLSv1.2 TLSv1.3;
proxy_ssl_session_reuse on;
EOF
        fi
    } >"$dir/proxy.inc"
    {
        if [ "$(id -u)" -eq 0 ]; then
            echo "user root root;"
        fi
        cat <<EOF
# Generated by tests/infra/nginx.sh (a test balancer; see deploy/nginx/yunying-cloud.conf).
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log notice;
events { worker_connections 1024; }
http {
    log_format yy '\$remote_addr [\$time_iso8601] "\$request" \$status \$body_bytes_sent'
                  ' up=\$upstream_addr upstatus=\$upstream_status rt=\$request_time'
                  ' urt=\$upstream_response_time';
    access_log $dir/logs/access.log yy;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server_tokens off;

    upstream yunying_cloud {
        zone yunying_cloud 64k;
EOF
        for n in $nodes; do
            echo "        server $n max_fails=1 fail_timeout=5s;"
        done
        cat <<EOF
        keepalive 16;
    }

    server {
EOF
        if [ -n "$cert" ]; then
            cat <<EOF
        listen 127.0.0.1:$port ssl;
        ssl_certificate $(abspath "$cert");
        ssl_certificate_key $(abspath "$key");
        ssl_protocols TLSv1.2 TLSv1.3;
EOF
        else
            echo "        listen 127.0.0.1:$port;"
        fi
        cat <<EOF
        client_max_body_size ${maxbody}m;
        client_body_timeout 120s;

        location /dicomweb/ {
            client_max_body_size 4096m;     # STOW-RS (CLOUD_STOW_MAX_BODY)
            include $dir/proxy.inc;
        }
        location / {
            include $dir/proxy.inc;
        }
    }
}
EOF
    } >"$dir/nginx.conf.new"
    "$NGINX" -t -q -p "$dir/" -c "$dir/nginx.conf.new" -e "$dir/logs/error.log" 2>"$dir/conftest.log" ||
        { cat "$dir/conftest.log" >&2; die "nginx -t rejected the generated configuration"; }
    mv "$dir/nginx.conf.new" "$dir/nginx.conf"

    lb_scheme=http
    [ -z "$cert" ] || lb_scheme=https
    cat >"$dir/env" <<EOF
YY_LB_URL=$lb_scheme://127.0.0.1:$port
YY_LB_PORT=$port
YY_LB_DIR=$dir
YY_LB_ACCESS_LOG=$dir/logs/access.log
EOF
}

do_start() {
    dir=$1
    shift
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if is_running "$dir" && [ -f "$dir/env" ]; then
        cat "$dir/env"
        return 0
    fi
    parse_opts "$@"
    do_install
    if [ -n "$port" ]; then
        port_free "$port" || die "port $port is taken; refusing to start"
    else
        port=$(free_port)
    fi
    write_conf "$dir"
    rm -f "$dir/nginx.pid"
    # Daemon mode: nginx returns once the socket is bound and the master forked.
    "$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/logs/error.log" >&2 ||
        { tail -n 20 "$dir/logs/error.log" >&2; die "nginx did not start"; }
    i=0
    until is_running "$dir"; do
        i=$((i + 1))
        [ $i -lt 100 ] || die "no live master in $dir/nginx.pid"
        sleep 0.05   # polling for the pid file, not synchronising a test
    done
    cat "$dir/env"
}

do_reload() {
    dir=$(cd "$1" && pwd) || die "no such directory $1"
    shift
    is_running "$dir" || die "not running in $dir"
    old_port=$(sed -n 's/^YY_LB_PORT=//p' "$dir/env")
    parse_opts "$@"
    port=$old_port
    write_conf "$dir"
    before=$(grep -c 'reconfiguring' "$dir/logs/error.log" 2>/dev/null || true)
    kill -HUP "$(master_pid "$dir")"
    # The master logs "reconfiguring" once the new configuration is in force
    # (new workers started, old ones finishing their requests).
    i=0
    until [ "$(grep -c 'reconfiguring' "$dir/logs/error.log" 2>/dev/null || true)" -gt "${before:-0}" ]; do
        i=$((i + 1))
        [ $i -lt 200 ] || die "reload not confirmed in $dir/logs/error.log"
        sleep 0.05   # polling the master's log, not synchronising a test
    done
    cat "$dir/env"
}

do_stop() {
    dir=$(cd "$1" 2>/dev/null && pwd) || return 0
    pid=$(master_pid "$dir") || return 0
    if alive "$pid"; then
        kill -QUIT "$pid" 2>/dev/null || true     # graceful: finish requests in flight
        i=0
        while alive "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        if alive "$pid"; then
            say "master $pid still alive; SIGTERM"
            kill -TERM "$pid" 2>/dev/null || true
            i=0
            while alive "$pid" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        fi
    fi
    rm -f "$dir/nginx.pid"
}

cmd=${1:-}
case $cmd in
install) do_install ;;
start) [ $# -ge 3 ] || die "usage: nginx.sh start DIR [OPTIONS] HOST:PORT..."; shift; do_start "$@" ;;
reload) [ $# -ge 3 ] || die "usage: nginx.sh reload DIR [OPTIONS] HOST:PORT..."; shift; do_reload "$@" ;;
env) [ $# -eq 2 ] && [ -f "$2/env" ] || die "usage: nginx.sh env DIR (of a started balancer)"; cat "$2/env" ;;
stop) [ $# -eq 2 ] || die "usage: nginx.sh stop DIR"; do_stop "$2" ;;
status) [ $# -eq 2 ] || die "usage: nginx.sh status DIR"; is_running "$2" ;;
*) die "usage: nginx.sh install | start DIR [OPTIONS] NODE... | reload DIR [OPTIONS] NODE... | env DIR | stop DIR | status DIR" ;;
esac
