#!/bin/sh
# bench_ingest.sh - C-STORE ingest of a 300-slice CT: yunying-edge (every image
# acknowledged only once it and its spool row are durable) against DCMTK
# storescp (no fsync) and Orthanc (SyncStorageArea, its default), same data,
# same run, on loopback in a private network namespace. Needs root (ip netns).
#
#   tests/bench/bench_ingest.sh [BUILD_DIR]   (default build/release)
#   env: ROUNDS=3 (medians over rounds; engines alternate inside a round)
#        PAR=4    (the parallel case: PAR storescu processes, files split)
#        BASE_EDGE=path  an older yunying-edge binary measured as "before"
#        COSTS=1  also the durability cost table (edge variants, see below)
#
# Reported per engine: images/s (median over rounds), the CPU its process
# spent per image while they arrived (user + system, all threads; less
# disturbed by the VM's speed swings), and the edge's peak RSS. Ratios:
# of the medians, and the median of the per-round ratios.
#
# Every DCMTK process runs with TCP_NODELAY=1 (c-stack.md). storescp and
# Orthanc are measured with their default receive PDU (16 KiB) and storescp
# also with -pdu 131072, the size the edge offers.
#
# The edge runs on one spool prepared once by `yunying-edge prepare-spool`,
# as the installed service does before it starts (its journal rings written
# once), and kept from run to run with its rows and object files removed in
# between. edge-fresh: a new spool each run, not prepared (fallocate'd
# rings, as under `make run`: on ext4 each first write into such a ring
# also converts its extent, which the flush then commits).
#
# The cost table runs the same edge binary with benchmark-only environment
# switches read by edge/spool.c:
#   YY_SPOOL_KEEP=0 (edge-nokeep)  every image written to its temporary
#                          file while it arrives (the default keeps images
#                          up to 4 MiB in memory and writes their object
#                          files just after the acknowledgement)
#   journal (default)      each association streams its images into a journal
#                          lane of its own while they arrive (O_DIRECT, kernel
#                          AIO, 4 x 128 KiB in flight), one fdatasync (a cache
#                          flush) per image at the end; checkpoint = syncfs +
#                          FULL commit
#   YY_SPOOL_LANE_BUFFERED=1  (edge-lanebuf) lanes through the page cache,
#                          writeback started every 256 KiB (before 2026-11-29)
#   YY_SPOOL_LANES=0       (edge-nolanes) the shared journal only: each image
#                          copied into it after receipt, group-committed
#                          fdatasync (the default before lanes)
#   YY_SPOOL_JOURNAL_MB=0  direct path: fsync file, rename, fsync dir, SQLite FULL
#   YY_SPOOL_UNSAFE_NOSYNC=1  no fsync at all (NOT durable; the price of durability)
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build/release}
case "$build" in /*) ;; *) build="$top/$build" ;; esac
EDGE="$build/yunying-edge"
ROUNDS=${ROUNDS:-3}
PAR=${PAR:-4}
py=/usr/bin/python3
[ "$(id -u)" = 0 ] || { echo "bench_ingest: needs root (ip netns)"; exit 0; }
[ -x "$EDGE" ] || { echo "bench_ingest: build $EDGE first"; exit 1; }
command -v storescu >/dev/null || { echo "bench_ingest: needs DCMTK (storescu, storescp)"; exit 1; }

w=$(mktemp -d /tmp/yy-bench-ingest-XXXXXX)
NS=yyb-ing-$$
pids=""
cleanup() {
    set +e   # a failed kill or wait must not end the cleanup (set -e)
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$w"
}
trap cleanup EXIT INT TERM
ip netns add "$NS"
ip -n "$NS" link set lo up
inns() { ip netns exec "$NS" "$@"; }
# spawn PIDFILE CMD...: runs CMD in the namespace in the background; PIDFILE
# gets the pid of CMD itself (ip netns exec forks, so $! would be ip's).
spawn() {
    pf=$1; shift
    rm -f "$pf"
    ip netns exec "$NS" sh -c 'echo $$ >"$0"; exec "$@"' "$pf" "$@" &
    n=0; until [ -s "$pf" ]; do n=$((n + 1)); [ $n -gt 100 ] && return 1; sleep 0.05; done
    pids="$pids $(cat "$pf")"
}
stop() {        # PIDFILE: SIGTERM, then wait until it is gone
    p=$(cat "$1")
    kill "$p" 2>/dev/null || true
    n=0; while kill -0 "$p" 2>/dev/null; do n=$((n + 1)); [ $n -gt 300 ] && kill -9 "$p"; sleep 0.05; done
}

$py "$top/tests/data/gen_studies.py" "$w/data" --only ct --ct-slices 300 --quiet
files=$(ls "$w"/data/ct_*/*.dcm)
nfiles=$(echo "$files" | wc -l)
i=0
for f in $files; do echo "$f" >>"$w/part.$((i % PAR))"; i=$((i + 1)); done

now() { date +%s.%N; }
wait_port() {   # PORT: until something accepts on it (no sleep-as-sync)
    n=0
    until inns $py -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.5)" 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 300 ] && { echo "nothing listens on $1"; return 1; }
        sleep 0.1
    done
}
# send AE PORT MODE -> seconds (MODE 1 = one association, P = PAR associations)
send() {
    t0=$(now)
    if [ "$3" = 1 ]; then
        inns env TCP_NODELAY=1 storescu -aec "$1" 127.0.0.1 "$2" $files
    else
        sp=""
        for p in "$w"/part.*; do
            inns env TCP_NODELAY=1 storescu -aec "$1" 127.0.0.1 "$2" $(cat "$p") & sp="$sp $!"
        done
        for p in $sp; do wait "$p"; done
    fi
    t1=$(now)
    echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}
rec() { echo "$1 $2 $3" >>"$w/results"; }   # NAME MODE SECONDS
# CPU (user + system, all threads) a server spent per image while the
# images arrived: less disturbed by the VM's speed swings than images/s.
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rec_cpu() {   # NAME MODE TICKS_BEFORE TICKS_AFTER
    echo "$3 $4" | awk -v hz="$hz" -v n="$nfiles" '{printf "%.3f\n", ($2 - $1) * 1000 / hz / n}' \
        >>"$w/cpu.$1.$2"
}

edge_run() {    # NAME MODE BIN [ENV...]
    name=$1 mode=$2 bin=$3; shift 3
    # The edge as it runs at a hospital: one spool, its journal rings
    # written once by `yunying-edge prepare-spool` (as the service does
    # before it starts), kept from run to run; between runs its rows and
    # object files are removed (as if uploaded and cleaned up). edge-fresh:
    # a new spool each run, not prepared (the first images after `make run`).
    if [ "$name" = edge-fresh ]; then
        sp="$w/spool-fresh"
        rm -rf "$sp"
    else
        sp="$w/spool"
        if [ -f "$sp/spool.db" ]; then
            sqlite3 "$sp/spool.db" "DELETE FROM instances"
            rm -rf "$sp/objects" "$sp/tmp"
        fi
    fi
    cat >"$w/edge.json" <<J
{"log":{"level":"warn"},"scp":{"ae_title":"YUNYING","bind":"127.0.0.1","port":11113,"max_associations":16},
 "spool":{"dir":"$sp","min_free_mb":0},"upload":{"cloud_url":""}}
J
    if [ "$sp" = "$w/spool" ] && [ ! -f "$sp/spool.db" ]; then
        "$bin" prepare-spool --config "$w/edge.json" >/dev/null
        sync
    fi
    spawn "$w/edge.pid" env "$@" "$bin" --config "$w/edge.json" >"$w/edge.out" 2>"$w/edge.log"
    epid=$(cat "$w/edge.pid")
    n=0; until grep -q listening "$w/edge.out"; do n=$((n+1)); [ $n -gt 600 ] && { cat "$w/edge.log"; inns ss -ltnp; exit 1; }; sleep 0.1; done
    sync    # the previous run's files reach the disk before this one starts
    c0=$(ticks "$epid")
    s=$(send YUNYING 11113 "$mode")
    rec_cpu "$name" "$mode" "$c0" "$(ticks "$epid")"
    rss=$(sed -n 's/VmHWM:[ \t]*\([0-9]*\).*/\1/p' /proc/$epid/status)
    rows=$(sqlite3 "file:$sp/spool.db?mode=ro" "SELECT COUNT(*) FROM instances" 2>/dev/null || echo "?")
    stop "$w/edge.pid"
    [ "$rows" = "$nfiles" ] || echo "WARNING: $name: $rows rows for $nfiles images"
    rec "$name" "$mode" "$s"; echo "  $name mode=$mode: $s s" >&2
    echo "$rss" >>"$w/rss.$name.$mode"
}
storescp_run() {  # NAME MODE [OPTS]
    name=$1 mode=$2; shift 2
    rm -rf "$w/scp"; mkdir -p "$w/scp"
    spawn "$w/scp.pid" env TCP_NODELAY=1 storescp "$@" -od "$w/scp" -aet STORESCP 11114 >/dev/null 2>&1
    wait_port 11114
    sync
    c0=$(ticks "$(cat "$w/scp.pid")")
    s=$(send STORESCP 11114 "$mode")
    rec_cpu "$name" "$mode" "$c0" "$(ticks "$(cat "$w/scp.pid")")"
    stop "$w/scp.pid"
    rec "$name" "$mode" "$s"; echo "  $name mode=$mode: $s s" >&2
}
orthanc_run() {   # MODE
    rm -rf "$w/orthanc"; mkdir -p "$w/orthanc/db"
    cat >"$w/orthanc.json" <<J
{"Name":"bench","StorageDirectory":"$w/orthanc/db","IndexDirectory":"$w/orthanc/db",
 "DicomAet":"ORTHANC","DicomPort":11115,"HttpPort":18042,"DicomCheckCalledAet":false,
 "DicomAlwaysAllowStore":true,"RemoteAccessAllowed":false,"AuthenticationEnabled":false,"Plugins":[]}
J
    spawn "$w/orthanc.pid" env TCP_NODELAY=1 Orthanc "$w/orthanc.json" >"$w/orthanc.log" 2>&1
    wait_port 11115
    sync
    c0=$(ticks "$(cat "$w/orthanc.pid")")
    s=$(send ORTHANC 11115 "$1")
    rec_cpu orthanc "$1" "$c0" "$(ticks "$(cat "$w/orthanc.pid")")"
    stop "$w/orthanc.pid"
    rec orthanc "$1" "$s"; echo "  orthanc mode=$1: $s s" >&2
}

have_orthanc=0; command -v Orthanc >/dev/null 2>&1 && [ "${ORTHANC:-1}" = 1 ] && have_orthanc=1
echo "300-slice CT ($nfiles files, $(cat $files | wc -c) bytes); rounds=$ROUNDS; parallel case: $PAR associations"
r=0
while [ $r -lt "$ROUNDS" ]; do
    r=$((r + 1))
    for mode in 1 P; do
        edge_run edge "$mode" "$EDGE"
        storescp_run storescp "$mode"
        storescp_run storescp-pdu128k "$mode" -pdu 131072
        if [ $have_orthanc = 1 ]; then orthanc_run "$mode"; fi
        if [ "${COSTS:-0}" = 1 ]; then
            edge_run edge-fresh "$mode" "$EDGE"
            edge_run edge-nokeep "$mode" "$EDGE" YY_SPOOL_KEEP=0
            edge_run edge-lanebuf "$mode" "$EDGE" YY_SPOOL_LANE_BUFFERED=1
            edge_run edge-nolanes "$mode" "$EDGE" YY_SPOOL_LANES=0
            edge_run edge-direct "$mode" "$EDGE" YY_SPOOL_JOURNAL_MB=0
            edge_run edge-nosync "$mode" "$EDGE" YY_SPOOL_UNSAFE_NOSYNC=1
            if [ -n "${BASE_EDGE:-}" ]; then edge_run edge-before "$mode" "$BASE_EDGE"; fi
        fi
    done
    echo "round $r done"
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
for mode in 1 P; do
    [ "$mode" = 1 ] && echo "== one association" || echo "== $PAR associations in parallel"
    for name in edge edge-fresh edge-nokeep edge-lanebuf edge-nolanes edge-direct edge-nosync edge-before storescp storescp-pdu128k orthanc; do
        grep -q "^$name $mode " "$w/results" || continue
        m=$(grep "^$name $mode " "$w/results" | awk '{print $3}' | median)
        all=$(grep "^$name $mode " "$w/results" | awk -v n="$nfiles" '{printf "%.0f ", n / $3}')
        rss=""
        if [ -f "$w/rss.$name.$mode" ]; then rss="peak RSS $(sort -n "$w/rss.$name.$mode" | tail -1) kB"; fi
        if [ -f "$w/cpu.$name.$mode" ]; then
            median <"$w/cpu.$name.$mode" >"$w/cpumed.$name.$mode"
            rss="cpu $(cat "$w/cpumed.$name.$mode") ms/img $rss"
        fi
        printf "%-18s %6.0f img/s (median; runs: %s) %s\n" "$name" "$(echo "$m" | awk -v n="$nfiles" '{print n / $1}')" "$all" "$rss"
        echo "$m" >"$w/med.$name.$mode"
    done
    e=$(cat "$w/med.edge.$mode")
    grep "^edge $mode " "$w/results" | awk '{print $3}' >"$w/t.edge"
    for a in storescp storescp-pdu128k orthanc; do
        if [ -f "$w/med.$a.$mode" ]; then
            # Also paired: the ratio within each round (the engines run one
            # after the other, seconds apart), which the VM's drift from
            # minute to minute disturbs less than the ratio of medians.
            grep "^$a $mode " "$w/results" | awk '{print $3}' >"$w/t.anchor"
            paste "$w/t.anchor" "$w/t.edge" | awk '{print $1 / $2}' | sort -n >"$w/t.ratio"
            printf "edge / %-16s = %.2f  (per round: median %.2f, %.2f-%.2f; its CPU per image %.2fx the edge's)\n" "$a" \
                "$(echo "$(cat "$w/med.$a.$mode") $e" | awk '{print $1 / $2}')" \
                "$(median <"$w/t.ratio")" "$(head -n1 "$w/t.ratio")" "$(tail -n1 "$w/t.ratio")" \
                "$(echo "$(cat "$w/cpumed.$a.$mode") $(cat "$w/cpumed.edge.$mode")" | awk '{print $1 / $2}')"
        fi
    done
done
