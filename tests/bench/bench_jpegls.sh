#!/bin/sh
# bench_jpegls.sh BUILD_DIR - JPEG-LS lossless compression benchmark (not a test).
#
# On a 300-slice generated CT (tests/data/gen_studies.py, int16, 512x512):
#   ours     cmn_dicom_to_jpegls() in process (tests/bench/jpegls_bench.c
#            linked with BUILD_DIR/libyycommon.a), best of 3 runs
#   dcmtk    DCMTK's own JPEG-LS encoder in process (tests/bench/dcmtk_jpls_bench.cc)
#   dcmcjpls the DCMTK command line tool, one process per file (as a script would)
#   gzip -6, zstd -3 on each slice's raw Pixel Data value (ratio), and on all of
#            them concatenated (speed)
# MB/s count native Pixel Data megabytes (10^6) per wall second of the whole
# file-to-file transcode (parse, encode, write) on one core. Ratios are native
# Pixel Data bytes / compressed Pixel Data bytes. "x" columns compare with ours.
#
# Environment: YY_BENCH_DATA=DIR reuses (or keeps) the generated CT there;
# YY_BENCH_SLICES (default 300). Needs dcmtk, gzip, zstd (Debian package
# "zstd"), /usr/bin/python3 with pydicom. Prints a closing summary block.
set -eu

build=${1:?usage: bench_jpegls.sh BUILD_DIR}
top=$(cd "$(dirname "$0")/../.." && pwd)
case "$build" in /*) ;; *) build="$top/$build" ;; esac
slices=${YY_BENCH_SLICES:-300}
py=/usr/bin/python3

for tool in dcmcjpls gzip zstd cc g++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench_jpegls: $tool not found (apt-get install dcmtk gzip zstd)" >&2; exit 2; }
done
[ -f "$build/libyycommon.a" ] || { echo "bench_jpegls: $build/libyycommon.a missing: make first" >&2; exit 2; }

work=$(mktemp -d /tmp/yy-bench-jpegls-XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT INT TERM

data=${YY_BENCH_DATA:-$work/data}
mkdir -p "$data"
ctdir=$(ls -d "$data"/ct_* 2>/dev/null | head -n1 || true)
if [ -z "$ctdir" ] || [ "$(ls "$ctdir"/*.dcm | wc -l)" -ne "$slices" ]; then
    echo "bench_jpegls: generating a $slices-slice CT in $data ..."
    rm -rf "$data"/ct_*
    "$py" "$top/tests/data/gen_studies.py" "$data" --only ct --ct-slices "$slices" --quiet
    ctdir=$(ls -d "$data"/ct_* | head -n1)
fi
files=$(ls "$ctdir"/*.dcm)

# The drivers, with the build's own flags (release: -O2).
cflags="-std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wstrict-prototypes -O2 -g"
libs="-luv -lsqlite3 -ljansson -lcurl -lmbedtls -lmbedx509 -lmbedcrypto -lcharls -lpthread -lm \
      -ldcmjpls -ldcmnet -ldcmdata -loflog -lofstd -lz -lstdc++"
# shellcheck disable=SC2086
cc $cflags -I"$top/common/include" -o "$work/jpegls_bench" "$top/tests/bench/jpegls_bench.c" \
    "$build/libyycommon.a" $libs
g++ -std=c++17 -O2 -Wall -Wextra -o "$work/dcmtk_jpls_bench" "$top/tests/bench/dcmtk_jpls_bench.cc" \
    -ldcmjpls -ldcmimage -ldcmimgle -ldcmdata -loflog -lofstd -lz

kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
now() { date +%s.%N; }

mkdir -p "$work/ours" "$work/dcmtk" "$work/cli" "$work/raw"
echo "bench_jpegls: ours (in process, best of 3)"
# shellcheck disable=SC2086
ours=$("$work/jpegls_bench" -r 3 -o "$work/ours" $files | tail -n1)
echo "  $ours"
echo "bench_jpegls: DCMTK dcmjpls (in process, best of 3)"
# shellcheck disable=SC2086
dcmtk=$("$work/dcmtk_jpls_bench" -r 3 -o "$work/dcmtk" $files | tail -n1)
echo "  $dcmtk"

echo "bench_jpegls: dcmcjpls CLI, one process per file"
t0=$(now)
for f in $files; do
    TCP_NODELAY=1 dcmcjpls "$f" "$work/cli/$(basename "$f")"
done
t1=$(now)

# Raw pixel values (one file per slice) and the CLI's compressed size, via pydicom.
"$py" - "$work/raw" "$work/cli" $files >"$work/py.out" <<'EOF'
import os, sys, pydicom
from pydicom.encaps import generate_pixel_data_fragment
from pydicom.filebase import DicomBytesIO
raw, cli, files = sys.argv[1], sys.argv[2], sys.argv[3:]
tin = tout = 0
with open(os.path.join(raw, "all.raw"), "wb") as cat:
    for f in files:
        px = pydicom.dcmread(f).PixelData
        open(os.path.join(raw, os.path.basename(f) + ".raw"), "wb").write(px)
        cat.write(px)
        tin += len(px)
        fp = DicomBytesIO(pydicom.dcmread(os.path.join(cli, os.path.basename(f))).PixelData)
        fp.is_little_endian = True
        tout += sum(len(x) for x in generate_pixel_data_fragment(fp))
print("pixel_bytes=%d cli_bytes=%d" % (tin, tout))
EOF
pyo=$(cat "$work/py.out")
pixel_bytes=$(kv "$pyo" pixel_bytes)
cli_bytes=$(kv "$pyo" cli_bytes)

gz=0; zs=0
for r in "$work"/raw/*.dcm.raw; do
    gz=$((gz + $(gzip -6 -c "$r" | wc -c)))
    zs=$((zs + $(zstd -3 -q -c "$r" | wc -c)))
done
t2=$(now); gzip -6 -c "$work/raw/all.raw" >/dev/null; t3=$(now)
zstd -3 -q -c "$work/raw/all.raw" >/dev/null; t4=$(now)

awk -v pb="$pixel_bytes" -v cb="$cli_bytes" -v gz="$gz" -v zs="$zs" \
    -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" -v t4="$t4" \
    -v ocpu="$(kv "$ours" cpu_mb_s)" -v dcpu="$(kv "$dcmtk" cpu_mb_s)" \
    -v omb="$(kv "$ours" mb_s)" -v orat="$(kv "$ours" ratio)" -v oenc="$(kv "$ours" enc_mb_s)" \
    -v dmb="$(kv "$dcmtk" mb_s)" -v drat="$(kv "$dcmtk" ratio)" -v n="$slices" '
BEGIN {
    tcli = t1 - t0; tgz = t3 - t2; tzs = t4 - t3
    mb = pb / 1e6
    climb = mb / tcli
    printf "\n== JPEG-LS lossless on a %d-slice CT (%.1f MB of pixel data, 1 core) ==\n", n, mb
    printf "%-34s %9s %8s %14s\n", "encoder", "MB/s", "ratio", "ours x faster"
    printf "%-34s %9.1f %8.3f %14s\n", "ours: CharLS 2.4 via DCMTK shim", omb, orat, "1.00"
    printf "%-34s %9.1f %8s %14s\n", "  (CharLS encode time only)", oenc, "", ""
    printf "%-34s %9.1f %8s %14s\n", "  (per CPU second)", ocpu, "", ""
    printf "%-34s %9.1f %8.3f %14.2f\n", "DCMTK dcmjpls in process", dmb, drat, omb / dmb
    printf "%-34s %9.1f %8s %14.2f\n", "  (per CPU second)", dcpu, "", ocpu / dcpu
    printf "%-34s %9.1f %8.3f %14.2f\n", "dcmcjpls CLI, process per file", climb, pb / cb, omb / climb
    printf "%-34s %9.1f %8.3f %14.2f\n", "gzip -6 (raw pixels)", mb / tgz, pb / gz, omb / (mb / tgz)
    printf "%-34s %9.1f %8.3f %14.2f\n", "zstd -3 (raw pixels)", mb / tzs, pb / zs, omb / (mb / tzs)
    printf "anchor (c-stack.md): CharLS 58 MB/s, ratio 3.06-3.08; target >= 50 MB/s per core, ratio >= 3.0\n"
    printf "ours vs DCMTK in process: %.2fx speed (%.2fx per CPU second), ratio %.3f vs %.3f (%.3f)\n", omb / dmb, ocpu / dcpu, orat, drat, orat / drat
    printf "load average at the end: see below (a busy machine lowers every MB/s figure)\n"
}'
cat /proc/loadavg
