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
# every row is DONE (the last row's done_at, not the poll that sees it). The
# RTT shown is the shortest of three TCP handshakes to the cloud. Anchor: curl PUTs the very bytes the edge uploaded (its
# JPEG-LS files) to an HTTPS sink in the cloud namespace, 1 stream and 4
# streams, with -H 'Expect:'. The edge runs with upload.parallel =
# YY_BENCH_PARALLEL (default 4, the edge's default).
# Then a cut: the link drops for 3 s in the middle of a second upload; the
# bytes sent beyond the object sizes are the re-sent bytes.
#
# The edge groups the CT's small instances into bundles (upload.bundle_max_bytes,
# default 2 MiB; PROTOCOL.md "Bundles"): a couple of dozen objects of one 2 MiB chunk
# instead of 300 objects. Object bytes (bundle headers included) are read from
# the cloud's index, so "re-sent" counts only chunks sent twice.
#
# Kernel note: without sch_netem (modprobe fails in some containers) the link
# is tests/bench/linkemu.c instead, built here with cc: a userspace emulator
# forwarding Ethernet frames between a TAP device in each namespace with the
# same rate, delay and loss (tail-drop queue of 1.5 x the bandwidth-delay
# product, YY_BENCH_QLIMIT frames if set; YY_BENCH_SEED fixes its loss
# sequence); the cut is its link-down mode (SIGUSR1/SIGUSR2), and its frame
# counters (lost, tail-dropped, cut) are reported per phase. Only without
# /dev/net/tun or cc is the link tbf-shaped to 100 Mbit/s - no delay, no loss -
# with the veth taken down for the cut. The script says which one it used.
#
# Environment: YY_BENCH_DATA=DIR reuses (or keeps) the two generated CTs there.
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

NAME=bench_upload
. "$top/tests/bench/lib.sh"
echo "data: 300-slice CT"
data=${YY_BENCH_DATA:-$w/data}
files=$(ls "$(bench_ct "$data" 300)"/*.dcm)
# A second CT (other UIDs, other bytes) for the cut run: the cloud already holds the first.
d2=$(ls -d "$data"/upload-seed2/ct_* 2>/dev/null | head -n1 || true)
if [ -z "$d2" ] || [ "$(ls "$d2"/*.dcm | wc -l)" -ne 300 ]; then
    rm -rf "$data/upload-seed2"
    $py "$top/tests/data/gen_studies.py" "$data/upload-seed2" --only ct --ct-slices 300 --seed 2 --quiet
    d2=$(ls -d "$data"/upload-seed2/ct_* | head -n1)
fi
files2=$(ls "$d2"/*.dcm)
orig_bytes=$(cat $files | wc -c)

# ---------------------------------------------------------------- link
ip netns add "$NSC"
ip netns add "$NSE"
for ns in "$NSC" "$NSE"; do ip -n "$ns" link set lo up; done
# netem when the kernel has it; else linkemu (same rate, delay and loss, in
# userspace); else tbf (rate only: no delay, no loss) with the cut made by
# taking the link down.
link=netem
if ! ip netns exec "$NSC" tc qdisc replace dev lo root netem delay 1ms 2>/dev/null; then
    link=tbf
    [ -c /dev/net/tun ] && cc -std=c11 -O2 -Wall -Wextra -o "$w/linkemu" "$top/tests/bench/linkemu.c" &&
        link=linkemu
fi
ip netns exec "$NSC" tc qdisc del dev lo root 2>/dev/null || true
if [ $link = linkemu ]; then
    # a = the edge's side, so its "ab" counters are the upload direction
    "$w/linkemu" --a "$NSE:ve$$" --b "$NSC:vc$$" --rate 100mbit --delay 10ms --loss 0.25% --rt 10 \
        ${YY_BENCH_QLIMIT:+--limit "$YY_BENCH_QLIMIT"} ${YY_BENCH_SEED:+--seed "$YY_BENCH_SEED"} \
        >"$w/linkemu.out" 2>&1 &
    emu=$!
    pids="$pids $emu"
    wait_line "$w/linkemu.out" "ready" 10
else
    ip link add "vc$$" type veth peer name "ve$$"
    ip link set "vc$$" netns "$NSC"
    ip link set "ve$$" netns "$NSE"
fi
ip -n "$NSC" addr add "$CIP/24" dev "vc$$"
ip -n "$NSE" addr add "$EIP/24" dev "ve$$"
ip -n "$NSC" link set "vc$$" up
ip -n "$NSE" link set "ve$$" up
shape() {   # LOSS_PERCENT (100 = cut)
    if [ $link = linkemu ]; then
        # its loss is set at start; 100 = link down until the next call
        if [ "$1" = 100 ]; then kill -USR1 "$emu"; else kill -USR2 "$emu"; fi
        return
    fi
    for d in "$NSC:vc$$" "$NSE:ve$$"; do
        ns=${d%%:*} dev=${d#*:}
        if [ $link = netem ]; then
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
# emu_snap: linkemu's counters now (its "stats" line; empty without linkemu).
emu_snap() {
    [ $link = linkemu ] || return 0
    n=$(grep -c '^stats' "$w/linkemu.out" || true)
    kill -HUP "$emu"
    i=0
    while [ "$(grep -c '^stats' "$w/linkemu.out" || true)" -le "$n" ]; do
        i=$((i + 1)); [ $i -gt 50 ] && break
        sleep 0.1
    done
    grep '^stats' "$w/linkemu.out" | tail -n1
}
# emu_report LABEL BEFORE AFTER: the emulator's frame counters between two snaps.
emu_report() {
    [ $link = linkemu ] || return 0
    awk -v l="$1" -v a="$2" -v b="$3" 'BEGIN {
        n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); A[kv[1]] = kv[2] }
        n = split(b, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); B[kv[1]] = kv[2] }
        split("ab ba", d, " "); name["ab"] = "edge->cloud"; name["ba"] = "cloud->edge";
        printf "        linkemu, %s:", l;
        for (j = 1; j <= 2; j++) {
            p = d[j]; in_ = B[p "_in"] - A[p "_in"]; loss = B[p "_loss"] - A[p "_loss"];
            fwd = B[p "_fwd"] - A[p "_fwd"];
            printf " %s %d frames in, lost %d (%.2f%%), queue drops %d, cut %d, forwarded %d (%.1f MB, %.2f ms late on average)%s",
                   name[p], in_, loss, in_ ? 100 * loss / in_ : 0, B[p "_queue"] - A[p "_queue"],
                   B[p "_cut"] - A[p "_cut"], fwd, (B[p "_bytes"] - A[p "_bytes"]) / 1e6,
                   fwd ? (B[p "_late_sum_us"] - A[p "_late_sum_us"]) / fwd / 1000 : 0, j == 1 ? ";" : "\n" }
    }'
}

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
# RTT: the shortest of three TCP handshakes to the cloud (no ping needed)
rtt=$(for i in 1 2 3; do
          ip netns exec "$NSE" curl -s -k -o /dev/null -w '%{time_connect}\n' "https://$CIP:$port/" || true
      done | awk '$1 > 0 && (m == "" || $1 < m) { m = $1 } END { if (m != "") printf "%.1f", m * 1000 }')
case $link in
netem) echo "link: 100 Mbit/s (netem), RTT ${rtt:-?} ms, 0.25% loss each way" ;;
linkemu) echo "link: 100 Mbit/s (linkemu: this kernel has no sch_netem), RTT ${rtt:-?} ms, 0.25% loss each way," \
             "$(sed -n 's/.*limit=\([0-9]*\) seed=\([0-9]*\) rt=\([0-9]*\).*/tail-drop queue \1 frames, seed \2, SCHED_FIFO \3/p' "$w/linkemu.out")" ;;
*) echo "link: 100 Mbit/s (tbf; no sch_netem, no /dev/net/tun or cc: NO delay, NO loss emulated), RTT ${rtt:-?} ms" ;;
esac

obj_bytes() {   # committed object bytes in the cloud's index so far
    sqlite3 "file:$w/cloud/index.db?mode=ro" "SELECT coalesce(SUM(size),0) FROM uploads WHERE state='committed'" 2>/dev/null || echo 0
}
edge_conf() {   # SCHEDULE_JSON SPOOL PORT
    cat >"$w/edge.json" <<J
{"log":{"level":"warn"},
 "scp":{"ae_title":"YUNYING","bind":"0.0.0.0","port":$3},
 "spool":{"dir":"$2","min_free_mb":0},
 "upload":{"cloud_url":"https://$CIP:$port","edge_id":"bench-edge","secret_file":"$w/edge.secret",
           "ca_file":"$w/ca/ca.pem","parallel":${YY_BENCH_PARALLEL:-4},"compress":true,"retry_min_ms":200,"retry_max_ms":2000,
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
    # the end is when the last row was marked DONE (its done_at, ms), not
    # when this 0.1 s poll noticed it
    t1=$(sqlite3 "file:$2/spool.db?mode=ro" "SELECT MAX(done_at) / 1000.0 FROM instances" 2>/dev/null || true)
    [ -n "$t1" ] || t1=$(now)
    stop_edge
    echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}' >"$w/$1.secs"
}

echo
echo "== upload (edge, JPEG-LS on, parallel ${YY_BENCH_PARALLEL:-4}, TLS, bundles up to ${YY_BENCH_BUNDLE:-2097152} bytes, chunks ${YY_BENCH_CHUNK:-2097152})"
ob0=$(obj_bytes)
s0=$(emu_snap)
upload_run a "$w/spool-a"
s1=$(emu_snap)
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
s2=$(emu_snap)
t0=$(now); curl_put "$w/all.bin"; t1=$(now)
c1=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
s3=$(emu_snap)
t0=$(now); cp=""; for p in "$w"/part.*; do curl_put "$p" & cp="$cp $!"; done
for p in $cp; do wait "$p"; done; t1=$(now)
c4=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
s4=$(emu_snap)
awk -v s="$secs" -v b="$up_bytes" -v o="$orig_bytes" -v c1="$c1" -v c4="$c4" -v sent="$sent" 'BEGIN {
    g = b * 8 / s / 1e6; g1 = b * 8 / c1 / 1e6; g4 = b * 8 / c4 / 1e6;
    printf "edge:   %d bytes (JPEG-LS of %d) in %.2f s = %.1f Mbit/s goodput (incl. restart, token, declares, commits)\n", b, o, s, g;
    printf "        effective DICOM throughput %.1f Mbit/s = %.2fx the 100 Mbit/s link; compression ratio %.2f\n", o * 8 / s / 1e6, o * 8 / s / 1e8, o / b;
    printf "        bytes sent %d (%.3f of the DICOM bytes; bundle headers included)\n", sent, sent / b;
    printf "curl 1 stream:  %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c1, g1, g / g1;
    printf "curl 4 streams: %.2f s = %.1f Mbit/s   -> edge/curl %.2f\n", c4, g4, g / g4 }'
emu_report "edge" "$s0" "$s1"
emu_report "curl 1 stream" "$s2" "$s3"
emu_report "curl 4 streams" "$s3" "$s4"

echo
echo "        committed objects: $objs_a"

echo
echo "== upload with a 3 s cut mid-upload (once 3 objects are declared to the cloud)"
ob1=$(obj_bytes)
s5=$(emu_snap)
upload_run b "$w/spool-b" cut "$files2"
s6=$(emu_snap)
ob2=$(obj_bytes)
secs=$(cat "$w/b.secs")
up_bytes=$(sqlite3 "$w/spool-b/spool.db" "SELECT SUM(up_size) FROM instances")
sent=$(sqlite3 "$w/spool-b/spool.db" "SELECT value FROM counters WHERE name='bytes_sent'")
errs=$(sqlite3 "$w/spool-b/spool.db" "SELECT group_concat(substr(name,5) || '=' || value, ' ') FROM counters WHERE name LIKE 'err.%'")
awk -v s="$secs" -v b="$((ob2 - ob1))" -v sent="$sent" -v e="$errs" -v c="${YY_BENCH_CHUNK:-2097152}" \
    -v par="${YY_BENCH_PARALLEL:-4}" 'BEGIN {
    printf "edge:   %.2f s; objects %d bytes, sent %d: re-sent %d bytes = %.2f chunks of %d (up to %d objects in flight; limit 1 per object); errors: %s\n",
           s, b, sent, sent - b, (sent - b) / c, c, par, e }'
emu_report "edge with the cut" "$s5" "$s6"

# ---------------------------------------------------------------- ingest
# C-STORE ingest vs storescp and Orthanc: tests/bench/bench_ingest.sh (run by make bench).
