#!/bin/sh
# postgres.sh - a private PostgreSQL cluster for the tests and benchmarks.
#
#   tests/infra/postgres.sh install          install postgresql + libpq-dev (idempotent)
#   tests/infra/postgres.sh start DIR [PORT] install if needed, initdb (once), start, print env
#   tests/infra/postgres.sh env DIR          print the env lines of a running cluster
#   tests/infra/postgres.sh stop DIR         stop it (pg_ctl, then the recorded PID)
#   tests/infra/postgres.sh status DIR       exit 0 if the postmaster is alive
#
# The cluster lives in DIR/data, listens on 127.0.0.1:PORT (default: a free
# port; a taken port is refused) and on a unix socket in DIR/sock. Trust
# authentication, superuser and database "yunying": a test cluster, never a
# deployment. fsync is off unless YY_PG_FSYNC=on. As root the server runs as
# the "postgres" user (created by the package), since postgres refuses root.
#
# stdout (also kept in DIR/env), shell-sourceable:
#   YY_PG_URL=postgresql://yunying@127.0.0.1:PORT/yunying
#   YY_PG_PORT=PORT  YY_PG_SOCKDIR=DIR/sock  YY_PG_DIR=DIR
# A re-run on a running DIR only prints the env lines; on a stopped DIR it
# keeps the data and starts again (no initdb).
set -eu

PKGS="postgresql libpq-dev"
PY=/usr/bin/python3
DB=yunying

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }
. "$(dirname "$0")/lib.sh"

do_install() { infra_install $PKGS; }

pgbin() {
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [ -n "$d" ] && [ -x "$d/initdb" ] || die "no /usr/lib/postgresql/*/bin/initdb"
    echo "$d"
}

# as_pg CMD...: run as the cluster owner (postgres when we are root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}


pm_pid() {
    [ -f "$1/data/postmaster.pid" ] && head -n1 "$1/data/postmaster.pid"
}

is_running() {
    pid=$(pm_pid "$1") || return 1
    [ -n "$pid" ] && alive "$pid"
}



write_env() {
    dir=$1 port=$2
    cat >"$dir/env" <<EOF
YY_PG_URL=postgresql://$DB@127.0.0.1:$port/$DB
YY_PG_PORT=$port
YY_PG_SOCKDIR=$dir/sock
YY_PG_DIR=$dir
EOF
}

do_stop() {
    dir=$(cd "$1" 2>/dev/null && pwd) || return 0
    [ -d "$dir/data" ] || return 0
    pid=$(pm_pid "$dir") || return 0
    if alive "$pid"; then
        as_pg "$(pgbin)/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >&2 || true
        i=0
        while alive "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        if alive "$pid"; then
            say "postmaster $pid still alive; SIGQUIT"
            kill -QUIT "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/data/postmaster.pid"
}

do_start() {
    dir=$1
    want_port=${2:-}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if is_running "$dir" && [ -f "$dir/env" ]; then
        cat "$dir/env"
        return 0
    fi
    do_install
    bin=$(pgbin)

    if [ -n "$want_port" ]; then
        port_free "$want_port" || die "port $want_port is taken; refusing to start"
        port=$want_port
    else
        port=$(free_port)
    fi

    mkdir -p "$dir/data" "$dir/sock"
    if [ "$(id -u)" -eq 0 ]; then
        # The postgres user must reach DIR: grant traverse (not list) on it.
        chmod a+x "$dir"
        chown postgres: "$dir/data" "$dir/sock"
        runuser -u postgres -- test -x "$dir" ||
            die "user postgres cannot reach $dir (check the permissions of its parents)"
    fi
    chmod 700 "$dir/data"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg "$bin/initdb" -D "$dir/data" -U "$DB" --auth=trust -E UTF8 --locale=C.UTF-8 \
            --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    rm -f "$dir/data/postmaster.pid"
    touch "$dir/server.log"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir/server.log"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c fsync=${YY_PG_FSYNC:-off} -c full_page_writes=${YY_PG_FSYNC:-off} -c max_connections=200" \
        start >&2 || { tail -n 20 "$dir/server.log" >&2; die "pg_ctl start failed"; }

    # The database named after the superuser (skip if it exists).
    if ! as_pg "$bin/psql" -h "$dir/sock" -p "$port" -U "$DB" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        as_pg "$bin/createdb" -h "$dir/sock" -p "$port" -U "$DB" "$DB" >&2
    fi
    write_env "$dir" "$port"
    cat "$dir/env"
}

cmd=${1:-}
case $cmd in
install) do_install ;;
start) [ $# -ge 2 ] || die "usage: postgres.sh start DIR [PORT]"; do_start "$2" "${3:-}" ;;
env) [ $# -eq 2 ] && [ -f "$2/env" ] || die "usage: postgres.sh env DIR (of a started cluster)"; cat "$2/env" ;;
stop) [ $# -eq 2 ] || die "usage: postgres.sh stop DIR"; do_stop "$2" ;;
status) [ $# -eq 2 ] || die "usage: postgres.sh status DIR"; is_running "$2" ;;
*) die "usage: postgres.sh install | start DIR [PORT] | env DIR | stop DIR | status DIR" ;;
esac
