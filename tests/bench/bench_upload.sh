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
# streams (the edge uses upload.parallel = 4), with -H 'Expect:'.
# Then a cut: the link drops for 3 s in the middle of a second upload; the
# bytes sent beyond the object sizes are the re-sent bytes.
#
# Ingest: storescu (TCP_NODELAY=1) sends the CT to the edge (fsync'd spool),
# to DCMTK storescp (no fsync) and, if installed, Orthanc; images/s, ratios,
# and the edge's peak RSS.
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

edge_conf() {   # SCHEDULE_JSON SPOOL PORT
    cat >"$w/edge.json" <<J
{"log":{"level":"warn"},
 "scp":{"ae_title":"YUNYING","bind":"0.0.0.0","port":$3},
 "spool":{"dir":"$2","min_free_mb":0},
 "upload":{"cloud_url":"https://$CIP:$port","edge_id":"bench-edge","secret_file":"$w/edge.secret",
           "ca_file":"$w/ca/ca.pem","parallel":4,"compress":true,"retry_min_ms":200,"retry_max_ms":2000},
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
    t0=$(now)
    run_edge "$w/$1-upload.log"
    if [ "${3:-}" = cut ]; then
        while [ "$(done_count "$2/spool.db")" -lt 100 ]; do sleep 0.05; done
        shape 100; sleep 3; shape 0.25
    fi
    while [ "$(done_count "$2/spool.db")" -lt 300 ]; do sleep 0.1; done
    t1=$(now)
    stop_edge
    echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}' >"$w/$1.secs"
}

echo
echo "== upload (edge, JPEG-LS on, parallel 4, TLS)"
upload_run a "$w/spool-a"
secs=$(cat "$w/a.secs")
up_bytes=$(sqlite3 "$w/spool-a/spool.db" "SELECT SUM(up_size) FROM instances")
sent=$(sqlite3 "$w/spool-a/spool.db" "SELECT value FROM counters WHERE name='bytes_sent'")
chunk=$(sqlite3 "$w/spool-a/spool.db" "SELECT 4194304")
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
    printf "        bytes sent %d (%.3f of the object bytes)\n", sent, sent / b;
    printf "curl 1 stream:  %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c1, g1, g / g1;
    printf "curl 4 streams: %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c4, g4, g / g4 }'

echo
echo "== upload with a 3 s cut after 100 of 300 instances"
upload_run b "$w/spool-b" cut "$files2"
secs=$(cat "$w/b.secs")
up_bytes=$(sqlite3 "$w/spool-b/spool.db" "SELECT SUM(up_size) FROM instances")
sent=$(sqlite3 "$w/spool-b/spool.db" "SELECT value FROM counters WHERE name='bytes_sent'")
errs=$(sqlite3 "$w/spool-b/spool.db" "SELECT group_concat(substr(name,5) || '=' || value, ' ') FROM counters WHERE name LIKE 'err.%'")
awk -v s="$secs" -v b="$up_bytes" -v sent="$sent" -v e="$errs" 'BEGIN {
    printf "edge:   %.2f s; re-sent %d bytes = %.2f chunks of 4 MiB (4 objects in flight; limit 1 per object); errors: %s\n",
           s, sent - b, (sent - b) / 4194304, e }'

# ---------------------------------------------------------------- ingest
echo
echo "== C-STORE ingest, 300-slice CT, one association, TCP_NODELAY=1 (loopback in a private netns)"
NSI=yyb-i-$$
ip netns add "$NSI"; ip -n "$NSI" link set lo up
ingest() {      # NAME -> seconds of storescu
    t0=$(now)
    ip netns exec "$NSI" env TCP_NODELAY=1 storescu -aec "$2" 127.0.0.1 "$3" $files
    t1=$(now)
    echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}
cat >"$w/edge-i.json" <<J
{"log":{"level":"warn"},"scp":{"ae_title":"YUNYING","bind":"127.0.0.1","port":11113},
 "spool":{"dir":"$w/spool-i","min_free_mb":0},"upload":{"cloud_url":""}}
J
ip netns exec "$NSI" "$EDGE" --config "$w/edge-i.json" >"$w/edge-i.out" 2>"$w/edge-i.log" &
ipid=$!; pids="$pids $ipid"
wait_line "$w/edge-i.out" listening 60
te=$(ingest edge YUNYING 11113)
rss=$(sed -n 's/VmHWM:[ \t]*//p' /proc/$ipid/status)
kill $ipid
mkdir -p "$w/storescp"
ip netns exec "$NSI" env TCP_NODELAY=1 storescp -od "$w/storescp" -aet STORESCP 11114 >/dev/null 2>&1 &
spid=$!; pids="$pids $spid"
sleep 0.5
ts=$(ingest storescp STORESCP 11114)
srss=$(sed -n 's/VmHWM:[ \t]*//p' /proc/$spid/status)
kill $spid
awk -v te="$te" -v ts="$ts" -v r="$rss" -v sr="$srss" 'BEGIN {
    printf "edge (fsync per image, SQLite FULL): %.2f s = %.0f img/s, peak RSS %s\n", te, 300 / te, r;
    printf "storescp (no fsync):                 %.2f s = %.0f img/s, peak RSS %s\n", ts, 300 / ts, sr;
    printf "edge/storescp = %.2f\n", ts / te }'
if command -v Orthanc >/dev/null 2>&1; then
    mkdir -p "$w/orthanc/db"
    cat >"$w/orthanc.json" <<J
{"Name":"bench","StorageDirectory":"$w/orthanc/db","IndexDirectory":"$w/orthanc/db",
 "DicomAet":"ORTHANC","DicomPort":11115,"HttpPort":18042,"DicomCheckCalledAet":false,
 "DicomAlwaysAllowStore":true,"RemoteAccessAllowed":false,"AuthenticationEnabled":false,"Plugins":[]}
J
    ip netns exec "$NSI" env TCP_NODELAY=1 Orthanc "$w/orthanc.json" >"$w/orthanc.log" 2>&1 &
    opid=$!; pids="$pids $opid"
    i=0; while ! grep -q "Orthanc has started" "$w/orthanc.log" && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.1; done
    to=$(ingest orthanc ORTHANC 11115)
    kill $opid
    awk -v te="$te" -v to="$to" 'BEGIN { printf "Orthanc (SyncStorageArea default): %.2f s = %.0f img/s; edge/Orthanc = %.2f\n", to, 300 / to, to / te }'
else
    echo "Orthanc: not installed (apt-get install orthanc) - skipped"
fi
ip netns del "$NSI"
