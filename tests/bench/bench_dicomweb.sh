#!/bin/sh
# bench_dicomweb.sh BUILD_DIR - DICOMweb retrieval benchmark against Orthanc's
# DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb), same data, same run.
#
# Data: a 300-slice generated CT (tests/data/gen_studies.py, 512x512 int16,
# ~158 MB), loaded into yunying-cloud by STOW-RS and into Orthanc by its REST
# API (POST /instances). Both store the files as received (native).
# Figures (curl as the client, plain HTTP on loopback, keep-alive):
#   - WADO-RS instance retrieval of all 300 instances, sequential (one
#     connection) and 8-way concurrent (curl --parallel-max 8): instances/s,
#     MB/s, ratio ours/Orthanc (best of 3 runs each);
#   - whole-series WADO-RS (one multipart answer): MB/s, ratio;
#   - series metadata: median latency of 20 requests (after one warm-up);
#   - instance-level QIDO on the 300-instance series: median of 50;
#   - yunying-cloud RSS after loading.
# Orthanc runs with SyncStorageArea false (no fsync per file; irrelevant for
# reads). Everything runs inside a private network namespace (unshare --net,
# as root), because Orthanc cannot bind to 127.0.0.1 only.
#
# Environment: YY_BENCH_DATA=DIR reuses (or keeps) the generated CT there;
# YY_BENCH_SLICES (default 300). Installs orthanc + orthanc-dicomweb if missing.
set -eu

build=${1:?usage: bench_dicomweb.sh BUILD_DIR}
top=$(cd "$(dirname "$0")/../.." && pwd)
case "$build" in /*) ;; *) build="$top/$build" ;; esac
slices=${YY_BENCH_SLICES:-300}
py=/usr/bin/python3

NAME=bench_dicomweb
. "$top/tests/bench/lib.sh"
bench_netns "$0" "$build"

plugin=$(orthanc_plugin orthanc-dicomweb libOrthancDicomWeb.so)
[ -x "$build/yunying-cloud" ] || { echo "bench_dicomweb: $build/yunying-cloud missing: make first" >&2; exit 2; }

work=$(mktemp -d /tmp/yy-bench-dicomweb-XXXXXX)
cloud_pid=
orthanc_pid=
raw_pid=
cleanup() {
    set +e   # a failed kill or wait must not end the cleanup (set -e)
    [ -n "$raw_pid" ] && kill "$raw_pid" 2>/dev/null
    [ -n "$cloud_pid" ] && kill "$cloud_pid" 2>/dev/null && wait "$cloud_pid" 2>/dev/null
    [ -n "$orthanc_pid" ] && kill "$orthanc_pid" 2>/dev/null && wait "$orthanc_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

data=${YY_BENCH_DATA:-$work/data}
mkdir -p "$data"
ctdir=$(bench_ct "$data" "$slices")

# ------------------------------------------------------------------ servers
cport=18042
oport=18043
odport=18044
bench_servers "$work/cloud/web" "$plugin" '"DicomWeb": {"Enable": true, "Root": "/dicom-web/"}'
auth="Authorization: Bearer $token"

# ------------------------------------------------------------------ load
echo "bench_dicomweb: loading $slices instances (ours: STOW-RS; Orthanc: REST) ..."
"$py" - "$ctdir" "$work" "$cport" "$oport" "$token" "$top" <<'EOF'
import glob, os, sys
ctdir, work, cport, oport, token, top = sys.argv[1:]
sys.path.insert(0, os.path.join(top, "tests", "bench"))
from benchload import orthanc_post, stow
files = sorted(glob.glob(os.path.join(ctdir, "*.dcm")))
stow(files, cport, token, work)
oids, _ = orthanc_post(files, oport)
with open(os.path.join(work, "orthanc_ids.txt"), "w") as out:
    out.write("\n".join(oids) + "\n")
# The series' bytes in one file, for the raw loopback anchor.
with open(os.path.join(work, "series.raw"), "wb") as out:
    for f in files:
        out.write(open(f, "rb").read())
import pydicom
uids = []
for f in files:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
with open(os.path.join(work, "uids.txt"), "w") as out:
    for u in uids:
        out.write(" ".join(u) + "\n")
EOF
study=$(head -n1 "$work/uids.txt" | cut -d' ' -f1)
series=$(head -n1 "$work/uids.txt" | cut -d' ' -f2)
bytes=$(cat "$ctdir"/*.dcm | wc -c)
rss=$(ps -o rss= -p "$cloud_pid" | tr -d ' ')

# curl configs: one transfer per instance.
mkcfg() {   # base_url_prefix -> config on stdout
    while read -r st se sop; do
        printf 'url = "%s/studies/%s/series/%s/instances/%s"\noutput = "/dev/null"\n' "$1" "$st" "$se" "$sop"
    done <"$work/uids.txt"
}
mkcfg "http://127.0.0.1:$cport/dicomweb" >"$work/ours.cfg"
mkcfg "http://127.0.0.1:$oport/dicom-web" >"$work/orthanc.cfg"
# Orthanc's raw file endpoint (no DICOMweb framing): what the 8-connection target equals.
while read -r oid; do
    printf 'url = "http://127.0.0.1:%s/instances/%s/file"\noutput = "/dev/null"\n' "$oport" "$oid"
done <"$work/orthanc_ids.txt" >"$work/orthanc_file.cfg"
accept='Accept: multipart/related; type="application/dicom"; transfer-syntax=*'

now() { date +%s.%N; }
best_time() {   # runs "$@" 3 times, prints the best wall time in seconds
    best=
    for _ in 1 2 3; do
        t0=$(now)
        "$@" >/dev/null 2>&1
        t1=$(now)
        best=$(echo "$t0 $t1 ${best:-}" | awk '{d = $2 - $1; if ($3 == "" || d < $3) print d; else print $3}')
    done
    echo "$best"
}
ours_get() { curl -s -f -H "$auth" -H "$accept" "$@"; }
orth_get() { curl -s -f -H "$accept" "$@"; }

# Sanity: both answer a multipart body of the right size.
n_ours=$(ours_get -K "$work/ours.cfg" -w '%{size_download}\n' -o /dev/null | awk '{s += $1} END {print s}')
n_orth=$(orth_get -K "$work/orthanc.cfg" -w '%{size_download}\n' -o /dev/null | awk '{s += $1} END {print s}')

echo "bench_dicomweb: WADO-RS instances, sequential ..."
t_seq_ours=$(best_time ours_get -K "$work/ours.cfg")
t_seq_orth=$(best_time orth_get -K "$work/orthanc.cfg")
echo "bench_dicomweb: WADO-RS instances, 8 connections ..."
t_par_ours=$(best_time ours_get -Z --parallel-max 8 -K "$work/ours.cfg")
t_par_orth=$(best_time orth_get -Z --parallel-max 8 -K "$work/orthanc.cfg")
t_par_ofile=$(best_time curl -s -f -Z --parallel-max 8 -K "$work/orthanc_file.cfg")
echo "bench_dicomweb: WADO-RS whole series ..."
t_ser_ours=$(best_time ours_get -o /dev/null "http://127.0.0.1:$cport/dicomweb/studies/$study/series/$series")
t_ser_orth=$(best_time orth_get -o /dev/null "http://127.0.0.1:$oport/dicom-web/studies/$study/series/$series")
# Raw loopback anchor: the same bytes from a minimal HTTP server that
# sendfile()s one file (no parsing, no framing), fetched by curl.
rport=18055
"$py" - "$work/series.raw" "$rport" "$work/raw.ready" <<'EOP' &
import os, socket, sys
path, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size = os.path.getsize(path)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(8)
open(ready, "w").close()
for _ in range(4):                     # warm-up + best_time's 3 runs
    c, _a = srv.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
    with open(path, "rb") as f:
        c.sendfile(f)
    c.close()
EOP
raw_pid=$!
until [ -f "$work/raw.ready" ]; do sleep 0.05; done   # server readiness, not test synchronisation
curl -s -o /dev/null "http://127.0.0.1:$rport/"
t_ser_raw=$(best_time curl -s -f -o /dev/null "http://127.0.0.1:$rport/")
wait "$raw_pid" 2>/dev/null || true

median_latency() {   # n url [curl args...]: median time_total in ms over n requests, one connection
    n=$1
    url=$2
    shift 2
    i=0
    : >"$work/lat.cfg"
    while [ $i -lt "$n" ]; do
        printf 'url = "%s"\noutput = "/dev/null"\n' "$url" >>"$work/lat.cfg"
        i=$((i + 1))
    done
    curl -s -f "$@" -o /dev/null "$url" >/dev/null   # warm-up
    curl -s -f "$@" -K "$work/lat.cfg" -w '%{time_total}\n' |
        sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)] * 1000}'
}
echo "bench_dicomweb: metadata and QIDO latency ..."
m_ours=$(median_latency 20 "http://127.0.0.1:$cport/dicomweb/studies/$study/series/$series/metadata" -H "$auth")
m_ours_gz=$(median_latency 20 "http://127.0.0.1:$cport/dicomweb/studies/$study/series/$series/metadata" -H "$auth" -H 'Accept-Encoding: gzip')
m_orth=$(median_latency 20 "http://127.0.0.1:$oport/dicom-web/studies/$study/series/$series/metadata")
q_ours=$(median_latency 50 "http://127.0.0.1:$cport/dicomweb/studies/$study/series/$series/instances" -H "$auth")
q_orth=$(median_latency 50 "http://127.0.0.1:$oport/dicom-web/studies/$study/series/$series/instances")
qs_ours=$(median_latency 50 "http://127.0.0.1:$cport/dicomweb/studies?PatientName=*" -H "$auth")
qs_orth=$(median_latency 50 "http://127.0.0.1:$oport/dicom-web/studies?PatientName=*")

rss_end=$(ps -o rss= -p "$cloud_pid" | tr -d ' ')   # idle again, after every run above
awk -v n="$slices" -v bytes="$bytes" -v rss_end="$rss_end" -v nours="$n_ours" -v northanc="$n_orth" \
    -v so="$t_seq_ours" -v sx="$t_seq_orth" -v po="$t_par_ours" -v px="$t_par_orth" \
    -v eo="$t_ser_ours" -v ex="$t_ser_orth" -v pf="$t_par_ofile" -v er="$t_ser_raw" -v mo="$m_ours" -v mz="$m_ours_gz" -v mx="$m_orth" \
    -v qo="$q_ours" -v qx="$q_orth" -v zo="$qs_ours" -v zx="$qs_orth" -v rss="$rss" 'BEGIN {
    mb = bytes / 1e6
    printf "\n==== DICOMweb: yunying-cloud vs Orthanc + DICOMweb plugin (%d-slice CT, %.1f MB files)\n", n, mb
    printf "bytes answered over all instances: ours %d, Orthanc %d (multipart framing included)\n", nours, northanc
    printf "%-34s %12s %12s %8s\n", "", "yunying", "Orthanc", "ratio"
    printf "%-34s %8.0f i/s %8.0f i/s %7.2fx\n", "WADO-RS instances, sequential", n / so, n / sx, sx / so
    printf "%-34s %8.1f MB/s %7.1f MB/s\n", "", mb / so, mb / sx
    printf "%-34s %8.0f i/s %8.0f i/s %7.2fx\n", "WADO-RS instances, 8 connections", n / po, n / px, px / po
    printf "%-34s %8.1f MB/s %7.1f MB/s\n", "", mb / po, mb / px
    printf "%-34s %8.0f i/s %8.0f i/s %7.2fx\n", "  vs Orthanc raw /instances/ID/file", n / po, n / pf, pf / po
    printf "%-34s %7.1f MB/s %7.1f MB/s %7.2fx\n", "WADO-RS whole series (1 request)", mb / eo, mb / ex, ex / eo
    printf "%-34s %7.1f MB/s %7.1f MB/s %7.2fx\n", "  vs raw loopback (sendfile, curl)", mb / eo, mb / er, er / eo
    printf "%-34s %9.1f ms %9.1f ms %7.2fx\n", "series metadata, median of 20", mo, mx, mx / mo
    printf "%-34s %9.1f ms\n", "  (ours with gzip)", mz
    printf "%-34s %9.1f ms %9.1f ms %7.2fx\n", "QIDO instances of the series, p50", qo, qx, qx / qo
    printf "%-34s %9.1f ms %9.1f ms %7.2fx\n", "QIDO studies PatientName=*, p50", zo, zx, zx / zo
    printf "%-34s %9.1f MB\n", "yunying-cloud RSS after load", rss / 1024
    printf "%-34s %9.1f MB\n", "  idle after all retrievals", rss_end / 1024
    printf "targets: 8-conn >= 4x Orthanc (= its raw file endpoint); whole series >= 0.9x raw loopback; instance QIDO <= 10 ms\n"
}'
