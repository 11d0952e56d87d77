#!/bin/sh
# bench_upload.sh - yunying-edge upload over a shaped link, and C-STORE ingest,
# each against an anchor measured in the same run. Needs root (ip netns, tc).
#
#   tests/bench/bench_upload.sh [BUILD_DIR]        (default build/release)
#
# Upload: two network namespaces joined by a veth pair, shaped with tc netem
# on both ends (100 Mbit/s, 10 ms each way = 20 ms RTT, 0.25% loss each way
# = ~0.5% per round trip). yunying-cloud (TLS) runs in "yyb-c", the edge in
# "yyb-e". The edge receives a 300-slice CT with its schedule closed (it
# transcodes meanwhile), then is restarted with "immediate" and timed until
# every row is DONE. Anchor: curl PUTs the very bytes the edge uploaded (its
# JPEG-LS files) to an HTTPS sink in the cloud namespace, 1 stream and 4
# streams, with -H 'Expect:'. The edge runs with upload.parallel =
# YY_BENCH_PARALLEL (default 8, the edge's default).
# Then a cut: the link drops for 3 s in the middle of a second upload; the
# bytes sent beyond the object sizes are the re-sent bytes.
#
# The edge groups the CT's small instances into bundles (upload.bundle_max_bytes,
# default 2 MiB; PROTOCOL.md "Bundles"): a couple of dozen objects of one 2 MiB chunk
# instead of 300 objects. Object bytes (bundle headers included) are read from
# the cloud's index, so "re-sent" counts only chunks sent twice.
#
# Kernel note: without sch_netem (modprobe fails in some containers) the link
# is tbf-shaped to 100 Mbit/s only - no delay, no loss - and the cut takes the
# veth down; the script says which one it used.
#
# Ingest (edge vs storescp vs Orthanc) moved to tests/bench/bench_ingest.sh.
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build/release}
case "$build" in /*) ;; *) build="$top/$build" ;; esac
EDGE="$build/yunying-edge"
CLOUD="$build/yunying-cloud"
py=/usr/bin/python3
[ "$(id -u)" = 0 ] || { echo "bench_upload: needs root (ip netns, tc)"; exit 0; }
[ -x "$EDGE" ] && [ -x "$CLOUD" ] || { echo "bench_upload: build $build first"; exit 1; }

w=$(mktemp -d /tmp/yy-bench-upload-XXXXXX)
NSC=yyb-c-$$ NSE=yyb-e-$$
CIP=10.199.0.1 EIP=10.199.0.2
pids=""
cleanup() {
    set +e   # a failed kill or wait must not end the cleanup (set -e)
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    ip netns del "$NSC" 2>/dev/null || true
    ip netns del "$NSE" 2>/dev/null || true
    rm -rf "$w"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
wait_line() {   # FILE PATTERN TIMEOUT_S
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 10)) ] && { echo "timeout waiting for $2 in $1"; cat "$1"; exit 1; }
        sleep 0.1
    done
}
done_count() {
    sqlite3 "file:$1?mode=ro" "SELECT COUNT(*) FROM instances WHERE state='DONE'" 2>/dev/null || echo 0
}

echo "data: 300-slice CT"
$py "$top/tests/data/gen_studies.py" "$w/data" --only ct --ct-slices 300 --quiet
files=$(ls "$w"/data/ct_*/*.dcm)
# A second CT (other UIDs, other bytes) for the cut run: the cloud already holds the first.
$py "$top/tests/data/gen_studies.py" "$w/data2" --only ct --ct-slices 300 --seed 2 --quiet
files2=$(ls "$w"/data2/ct_*/*.dcm)
orig_bytes=$(cat $files | wc -c)

# ---------------------------------------------------------------- link
ip netns add "$NSC"
ip netns add "$NSE"
ip link add "vc$$" type veth peer name "ve$$"
ip link set "vc$$" netns "$NSC"
ip link set "ve$$" netns "$NSE"
ip -n "$NSC" addr add "$CIP/24" dev "vc$$"
ip -n "$NSE" addr add "$EIP/24" dev "ve$$"
for ns in "$NSC" "$NSE"; do ip -n "$ns" link set lo up; done
ip -n "$NSC" link set "vc$$" up
ip -n "$NSE" link set "ve$$" up
# netem when the kernel has it; else tbf (rate only: no delay, no loss) and
# the cut is made by taking the link down.
netem=1
ip netns exec "$NSC" tc qdisc replace dev "vc$$" root netem delay 1ms 2>/dev/null || netem=0
shape() {   # LOSS_PERCENT (100 = cut)
    for d in "$NSC:vc$$" "$NSE:ve$$"; do
        ns=${d%%:*} dev=${d#*:}
        if [ $netem = 1 ]; then
            ip netns exec "$ns" tc qdisc replace dev "$dev" root netem rate 100mbit delay 10ms loss "$1%" limit 10000
        elif [ "$1" = 100 ]; then
            ip -n "$ns" link set "$dev" down
        else
            ip -n "$ns" link set "$dev" up
            ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate 100mbit burst 64kb latency 50ms
        fi
    done
}
shape 0.25
rtt=$(ip netns exec "$NSE" ping -c 3 -q "$CIP" 2>/dev/null | sed -n 's/.*= [0-9.]*\/\([0-9.]*\)\/.*/\1/p')
if [ $netem = 1 ]; then
    echo "link: 100 Mbit/s (netem), RTT ${rtt:-?} ms, 0.25% loss each way"
else
    echo "link: 100 Mbit/s (tbf; this kernel has no sch_netem: NO delay, NO loss emulated), RTT ${rtt:-?} ms"
fi

# ---------------------------------------------------------------- cloud + CA
YY_TLS_SERVER_SAN="IP:$CIP" "$top/deploy/make-test-ca.sh" "$w/ca" >/dev/null
port=8443
cat >"$w/cloud.json" <<J
{"log":{"level":"warn"},
 "http":{"bind":"$CIP","port":$port,"tls_cert_file":"$w/ca/server.pem","tls_key_file":"$w/ca/server.key",
         "web_root":"$w/web"},
 "index":{"path":"$w/cloud/index.db"},"archive":{"dir":"$w/cloud/archive"},
 "ingest":{"staging_dir":"$w/cloud/staging"}}
J
mkdir -p "$w/web" "$w/cloud"
"$CLOUD" edge-add --config "$w/cloud.json" --id bench-edge | tail -n1 >"$w/edge.secret"
chmod 600 "$w/edge.secret"
ip netns exec "$NSC" "$CLOUD" --config "$w/cloud.json" >"$w/cloud.out" 2>"$w/cloud.log" &
pids="$pids $!"
wait_line "$w/cloud.out" "listening" 30

obj_bytes() {   # committed object bytes in the cloud's index so far
    sqlite3 "file:$w/cloud/index.db?mode=ro" "SELECT coalesce(SUM(size),0) FROM uploads WHERE state='committed'" 2>/dev/null || echo 0
}
edge_conf() {   # SCHEDULE_JSON SPOOL PORT
    cat >"$w/edge.json" <<J
{"log":{"level":"warn"},
 "scp":{"ae_title":"YUNYING","bind":"0.0.0.0","port":$3},
 "spool":{"dir":"$2","min_free_mb":0},
 "upload":{"cloud_url":"https://$CIP:$port","edge_id":"bench-edge","secret_file":"$w/edge.secret",
           "ca_file":"$w/ca/ca.pem","parallel":${YY_BENCH_PARALLEL:-8},"compress":true,"retry_min_ms":200,"retry_max_ms":2000,
           "chunk_size":${YY_BENCH_CHUNK:-2097152},"bundle_max_bytes":${YY_BENCH_BUNDLE:-2097152}},
 "schedule":$1}
J
}
# A window that is not open now (three hours ahead, UTC).
h=$(( ($(date -u +%H) + 3) % 24 ))
closed=$(printf '[{"start":"%02d:00","end":"%02d:30","max_kbps":0}]' "$h" "$h")

run_edge() {    # LOG
    ip netns exec "$NSE" env TZ=UTC "$EDGE" --config "$w/edge.json" >"$1.out" 2>"$1" &
    epid=$!
    pids="$pids $epid"
    wait_line "$1.out" "listening" 60
}
stop_edge() { kill "$epid"; wait "$epid" 2>/dev/null || true; }

upload_run() {  # NAME SPOOL -> prints seconds; leaves sums in $w/NAME.*
    edge_conf "$closed" "$2" 11112
    run_edge "$w/$1-ingest.log"
    ip netns exec "$NSE" env TCP_NODELAY=1 storescu -aec YUNYING 127.0.0.1 11112 ${4:-$files}
    # wait until everything is transcoded (prepared)
    while [ "$(sqlite3 "file:$2/spool.db?mode=ro" "SELECT COUNT(*) FROM instances WHERE up_path IS NULL")" != 0 ]; do sleep 0.2; done
    stop_edge
    edge_conf '"immediate"' "$2" 11112
    nup() { sqlite3 "file:$w/cloud/index.db?mode=ro" "SELECT COUNT(*) FROM uploads" 2>/dev/null || echo 0; }
    up0=$(nup)
    t0=$(now)
    run_edge "$w/$1-upload.log"
    if [ "${3:-}" = cut ]; then
        # mid-upload: a quarter of the objects (bundles) declared to the cloud
        # (chunk rows go away at each commit, so they are no clock)
        n=0
        while [ "$(nup)" -lt $((up0 + 3)) ]; do
            n=$((n + 1)); [ $n -gt 1200 ] && { echo "bench_upload: the upload did not start" >&2; exit 1; }
            sleep 0.05
        done
        shape 100; sleep 3; shape 0.25
    fi
    n=0
    while [ "$(done_count "$2/spool.db")" -lt 300 ]; do
        n=$((n + 1)); [ $n -gt 3000 ] && { echo "bench_upload: not uploaded after 300 s" >&2; exit 1; }
        sleep 0.1
    done
    t1=$(now)
    stop_edge
    echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}' >"$w/$1.secs"
}

echo
echo "== upload (edge, JPEG-LS on, parallel ${YY_BENCH_PARALLEL:-8}, TLS, bundles up to ${YY_BENCH_BUNDLE:-2097152} bytes, chunks ${YY_BENCH_CHUNK:-2097152})"
ob0=$(obj_bytes)
upload_run a "$w/spool-a"
objs_a=$(sqlite3 "file:$w/cloud/index.db?mode=ro" "SELECT group_concat(kind || '=' || n, ' ') FROM (SELECT kind, COUNT(*) n FROM uploads WHERE state='committed' GROUP BY kind)")
secs=$(cat "$w/a.secs")
up_bytes=$(sqlite3 "$w/spool-a/spool.db" "SELECT SUM(up_size) FROM instances")
sent=$(sqlite3 "$w/spool-a/spool.db" "SELECT value FROM counters WHERE name='bytes_sent'")
chunk=${YY_BENCH_CHUNK:-2097152}
# Anchor: the same bytes with curl to an HTTPS sink in the cloud namespace.
cat >"$w/sink.py" <<'P'
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        n = int(self.headers.get("Content-Length", 0))
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b: break
            n -= len(b)
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("sink ready", flush=True); s.serve_forever()
P
ip netns exec "$NSC" $py "$w/sink.py" "$CIP" 9443 "$w/ca/server.pem" "$w/ca/server.key" >"$w/sink.out" 2>&1 &
pids="$pids $!"
wait_line "$w/sink.out" "sink ready" 20
cat $(sqlite3 "$w/spool-a/spool.db" "SELECT up_path FROM instances ORDER BY id") >"$w/all.bin"
split -n 4 "$w/all.bin" "$w/part."
curl_put() { ip netns exec "$NSE" curl -sS --cacert "$w/ca/ca.pem" -H 'Expect:' -T "$1" -o /dev/null "https://$CIP:9443/x"; }
t0=$(now); curl_put "$w/all.bin"; t1=$(now)
c1=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
t0=$(now); cp=""; for p in "$w"/part.*; do curl_put "$p" & cp="$cp $!"; done
for p in $cp; do wait "$p"; done; t1=$(now)
c4=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
awk -v s="$secs" -v b="$up_bytes" -v o="$orig_bytes" -v c1="$c1" -v c4="$c4" -v sent="$sent" 'BEGIN {
    g = b * 8 / s / 1e6; g1 = b * 8 / c1 / 1e6; g4 = b * 8 / c4 / 1e6;
    printf "edge:   %d bytes (JPEG-LS of %d) in %.2f s = %.1f Mbit/s goodput (incl. restart, token, declares, commits)\n", b, o, s, g;
    printf "        effective DICOM throughput %.1f Mbit/s = %.2fx the 100 Mbit/s link; compression ratio %.2f\n", o * 8 / s / 1e6, o * 8 / s / 1e8, o / b;
    printf "        bytes sent %d (%.3f of the DICOM bytes; bundle headers included)\n", sent, sent / b;
    printf "curl 1 stream:  %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c1, g1, g / g1;
    printf "curl 4 streams: %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c4, g4, g / g4 }'

echo
echo "        committed objects: $objs_a"

echo
echo "== upload with a 3 s cut mid-upload (once 3 objects are declared to the cloud)"
ob1=$(obj_bytes)
upload_run b "$w/spool-b" cut "$files2"
ob2=$(obj_bytes)
secs=$(cat "$w/b.secs")
up_bytes=$(sqlite3 "$w/spool-b/spool.db" "SELECT SUM(up_size) FROM instances")
sent=$(sqlite3 "$w/spool-b/spool.db" "SELECT value FROM counters WHERE name='bytes_sent'")
errs=$(sqlite3 "$w/spool-b/spool.db" "SELECT group_concat(substr(name,5) || '=' || value, ' ') FROM counters WHERE name LIKE 'err.%'")
awk -v s="$secs" -v b="$((ob2 - ob1))" -v sent="$sent" -v e="$errs" -v c="${YY_BENCH_CHUNK:-2097152}" 'BEGIN {
    printf "edge:   %.2f s; objects %d bytes, sent %d: re-sent %d bytes = %.2f chunks of %d (4 objects in flight; limit 1 per object); errors: %s\n",
           s, b, sent, sent - b, (sent - b) / c, c, e }'

# ---------------------------------------------------------------- ingest
# C-STORE ingest vs storescp and Orthanc: tests/bench/bench_ingest.sh (run by make bench).
