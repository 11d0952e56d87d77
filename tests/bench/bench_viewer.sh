#!/bin/sh
# bench_viewer.sh BUILD_DIR - web viewer load benchmark against Orthanc's web
# viewer plugin (Debian packages orthanc, orthanc-webviewer), same data, same run.
#
# Data: a 300-slice generated CT (tests/data/gen_studies.py, 512x512 int16,
# ~158 MB), loaded into yunying-cloud by STOW-RS and into Orthanc by its REST
# API. Our web app is cloud/web/dist (built with `npm run build` if missing).
# Client: Debian's Chromium driven by playwright-core (tests/bench/bench_viewer.mjs),
# phone viewport (390x844, touch), fresh profile (cold cache) per run, on two
# link profiles: "4g" (20 Mbit/s down, 60 ms latency, CDP
# Network.emulateNetworkConditions) and "lan" (unthrottled loopback).
# Figures (medians of YY_BENCH_RUNS runs):
#   - first image: navigation start to the first non-black canvas (pixels read
#     back in the page, same test for both viewers); ours may be the preview
#     (cloud/web/src/viewer/preview.ts: the original pixels, lossless, before
#     the viewer's tools are live);
#   - viewer ready: ours, the viewer (Cornerstone3D) has drawn its first image
#     (tools live); Orthanc's viewer is ready with its first image;
#   - whole series: navigation start to every image viewable (ours: loaded and
#     decoded; Orthanc: every image request of the series answered);
#   - series arrival rate (image bytes / span of the image requests) vs link;
#   - our phone route's JavaScript, gzip -9 (what a server that compresses
#     would send) and as served (bytes over the wire in the run).
# Everything runs inside a private network namespace (unshare --net, as
# root), because Orthanc cannot bind to 127.0.0.1 only.
#
# Storage: the edge compresses every image to JPEG-LS lossless before upload
# (edge default), so by default our cloud holds the series as JPEG-LS
# (made here by DCMTK's dcmcjpls, what the edge's CharLS output equals) and
# the viewer decodes it; YY_BENCH_STORE=native stores the files as
# generated. Orthanc gets the files as generated (a modality's output).
#
# Environment: YY_BENCH_DATA=DIR reuses (or keeps) the generated CT there;
# YY_BENCH_SLICES (default 300); YY_BENCH_RUNS (default 3);
# YY_BENCH_PROFILES (default 4g,lan). Installs orthanc + orthanc-webviewer if missing.
set -eu

build=${1:?usage: bench_viewer.sh BUILD_DIR}
top=$(cd "$(dirname "$0")/../.." && pwd)
case "$build" in /*) ;; *) build="$top/$build" ;; esac
slices=${YY_BENCH_SLICES:-300}
py=/usr/bin/python3

NAME=bench_viewer
. "$top/tests/bench/lib.sh"
bench_netns "$0" "$build"

plugin=$(orthanc_plugin orthanc-webviewer libOrthancWebViewer.so)
[ -x "$build/yunying-cloud" ] || { echo "bench_viewer: $build/yunying-cloud missing: make first" >&2; exit 2; }
pw="$top/tests/e2e/node_modules/playwright-core/index.mjs"
[ -f "$pw" ] || (cd "$top/tests/e2e" && npm ci --no-audit --no-fund >/dev/null)
web="$top/cloud/web/dist"
if [ ! -f "$web/index.html" ]; then
    echo "bench_viewer: building the web app ..."
    (cd "$top/cloud/web" && { [ -d node_modules ] || npm ci --no-audit --no-fund >/dev/null; } && npm run build >/dev/null)
fi

work=$(mktemp -d /tmp/yy-bench-viewer-XXXXXX)
cloud_pid=
orthanc_pid=
cleanup() {
    set +e   # a failed kill or wait must not end the cleanup (set -e)
    [ -n "$cloud_pid" ] && kill "$cloud_pid" 2>/dev/null && wait "$cloud_pid" 2>/dev/null
    [ -n "$orthanc_pid" ] && kill "$orthanc_pid" 2>/dev/null && wait "$orthanc_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

data=${YY_BENCH_DATA:-$work/data}
mkdir -p "$data"
ctdir=$(bench_ct "$data" "$slices")

store=${YY_BENCH_STORE:-jpegls}
ourdir=$ctdir
if [ "$store" = jpegls ]; then
    ourdir="$ctdir.jls"
    if [ ! -d "$ourdir" ] || [ "$(ls "$ourdir"/*.dcm 2>/dev/null | wc -l)" -ne "$slices" ]; then
        echo "bench_viewer: compressing to JPEG-LS lossless (dcmcjpls) ..."
        rm -rf "$ourdir" && mkdir -p "$ourdir"
        for f in "$ctdir"/*.dcm; do dcmcjpls "$f" "$ourdir/$(basename "$f")"; done
    fi
fi

# ------------------------------------------------------------------ servers
cport=18052
oport=18053
odport=18054
mkdir -p "$work/orthanc/cache"
bench_servers "$web" "$plugin" "\"WebViewer\": {\"CachePath\": \"$work/orthanc/cache\"}"

# ------------------------------------------------------------------ load
echo "bench_viewer: loading $slices instances (ours: STOW-RS; Orthanc: REST) ..."
"$py" - "$ctdir" "$work" "$cport" "$oport" "$token" "$ourdir" "$top" <<'EOP'
import glob, json, os, sys
ctdir, work, cport, oport, token, ourdir, top = sys.argv[1:]
sys.path.insert(0, os.path.join(top, "tests", "bench"))
from benchload import orthanc_post, stow
files = sorted(glob.glob(os.path.join(ctdir, "*.dcm")))
stow(sorted(glob.glob(os.path.join(ourdir, "*.dcm"))), cport, token, work)
_, o = orthanc_post(files, oport)
o.request("GET", "/series")
series = json.loads(o.getresponse().read())
assert len(series) == 1, series
import pydicom
ds = pydicom.dcmread(files[0], stop_before_pixels=True)
with open(os.path.join(work, "ids.txt"), "w") as out:
    out.write(f"{ds.StudyInstanceUID} {series[0]}\n")
EOP
study=$(cut -d' ' -f1 "$work/ids.txt")
oseries=$(cut -d' ' -f2 "$work/ids.txt")
bytes=$(cat "$ctdir"/*.dcm | wc -c)
ourbytes=$(cat "$ourdir"/*.dcm | wc -c)

# ------------------------------------------------------------------ bundle
# The phone route loads index.html's entry chunk, the viewer chunk, and the
# DICOM decode worker (its codecs load only for compressed images).
entry=$(sed -n 's/.*<script[^>]*src="\/\(assets\/index-[^"]*\.js\)".*/\1/p' "$web/index.html" | head -n1)
viewer=$(ls "$web"/assets/YyViewer-*.js | head -n1)
worker=$(ls "$web"/assets/decodeImageFrameWorker-*.js | head -n1)
gz() { gzip -9c "$1" | wc -c; }
js_gz=$(( $(gz "$web/$entry") + $(gz "$viewer") ))
js_raw=$(( $(stat -c%s "$web/$entry") + $(stat -c%s "$viewer") ))
wk_gz=$(gz "$worker")
wk_raw=$(stat -c%s "$worker")

# ------------------------------------------------------------------ browser
echo "bench_viewer: timing both viewers (${YY_BENCH_PROFILES:-4g,lan}; ${YY_BENCH_RUNS:-3} runs each) ..."
targets=$(cat <<EOT
[ {"name": "yunying", "url": "http://127.0.0.1:$cport/studies/$study/viewer${YY_BENCH_QUERY:-}",
   "login": {"url": "http://127.0.0.1:$cport/api/v1/login", "username": "bench", "password": "bench-pass-1"},
   "imagePattern": "/wado\\\\?", "images": $slices},
  {"name": "orthanc-webviewer", "url": "http://127.0.0.1:$oport/web-viewer/app/viewer.html?series=$oseries",
   "imagePattern": "/web-viewer/instances/", "images": $slices,
   "fetchAll": "http://127.0.0.1:$oport/web-viewer/series/$oseries"} ]
EOT
)
YY_PLAYWRIGHT="$pw" YY_BENCH_TARGETS="$targets" node "$top/tests/bench/bench_viewer.mjs" | tee "$work/runs.txt" | grep -E '^(RUN|TRACE|  )' | cut -c1-400
summary=$(sed -n 's/^SUMMARY //p' "$work/runs.txt")
[ -n "$summary" ] || { echo "bench_viewer: no summary" >&2; exit 1; }

"$py" - "$summary" "$store" "$slices" "$bytes" "$ourbytes" "$js_gz" "$js_raw" "$wk_gz" "$wk_raw" <<'EOP'
import json, sys
summary = json.loads(sys.argv[1])
store = sys.argv[2]
slices, nbytes, ourbytes, js_gz, js_raw, wk_gz, wk_raw = map(int, sys.argv[3:])
link = {"4g": 20.0, "lan": None}
print(f"\n==== Web viewer: yunying vs Orthanc web viewer plugin ({slices}-slice CT, {nbytes / 1e6:.1f} MB files; phone 390x844)")
print(f"stored by us as {store} ({ourbytes / 1e6:.1f} MB); by Orthanc as generated")
print(f"phone route JavaScript: {js_gz / 1e3:.0f} KB gzip ({js_raw / 1e3:.0f} KB raw; entry + viewer chunk)"
      f" + decode worker {wk_gz / 1e3:.0f} KB gzip ({wk_raw / 1e3:.0f} KB raw)")
by = {(r["profile"], r["target"]): r for r in summary}
print(f"{'':10} {'':18} {'first image':>12} {'viewer ready':>13} {'whole series':>13} {'image MB':>9} {'rate':>12} {'JS on wire':>11}")
for prof in dict.fromkeys(r["profile"] for r in summary):
    for tgt in ("yunying", "orthanc-webviewer"):
        r = by.get((prof, tgt))
        if not r or not r["runs"]:
            print(f"{prof:10} {tgt:18} {'failed':>12}")
            continue
        rate = f"{r['rateMbit']:.1f} Mbit/s"
        if link.get(prof):
            rate += f" ({r['rateMbit'] / link[prof]:.2f}x)"
        print(f"{prof:10} {tgt:18} {r['first'] / 1e3:10.2f} s {r['ready'] / 1e3:11.2f} s {r['all'] / 1e3:11.2f} s {r['seriesBytes'] / 1e6:9.1f}"
              f" {rate:>12} {r['jsBytes'] / 1e3:8.0f} KB  [{r['runs']} runs{', ' + r['backend'] if r['backend'] else ''}]")
    a, b = by.get((prof, "yunying")), by.get((prof, "orthanc-webviewer"))
    if a and b and a["runs"] and b["runs"]:
        print(f"{prof:10} {'ratio (Orthanc/ours)':18} {b['first'] / a['first']:11.2f}x {b['ready'] / a['ready']:12.2f}x"
              f" {b['all'] / a['all']:12.2f}x")
print("targets: first image <= 1.5 s on 4g and ahead of Orthanc on both; whole series >= 0.9x link rate;"
      " phone route JS <= 800 KB gzip")
EOP
