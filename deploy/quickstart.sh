#!/bin/sh
# Quick start (called by `make run`): starts yunying-cloud and yunying-edge on
# this machine with the embedded defaults (SQLite index, local archive
# directory, SQLite spool), over TLS with a local test CA (.quickstart/pki,
# made by deploy/make-test-ca.sh), sends a generated sample CT study through the
# edge with DCMTK's storescu, waits until the cloud has indexed it, and prints
# the URLs and the demo login.
#
#   deploy/quickstart.sh          start (restarting daemons this script started before)
#   deploy/quickstart.sh stop     stop them
#
# State lives in .quickstart/ under the project (configs, data, logs, pids).
# Environment: YY_HTTP_PORT (default 18080), YY_DICOM_PORT (11112),
# YY_BIND (127.0.0.1), YY_BUILD (build/release).
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
qs="$top/.quickstart"
build="$top/${YY_BUILD:-build/release}"
http_port=${YY_HTTP_PORT:-18080}
dicom_port=${YY_DICOM_PORT:-11112}
bind=${YY_BIND:-127.0.0.1}
ae=YUNYING
py=/usr/bin/python3

stop_one() {
    pidf="$qs/$1.pid"
    [ -f "$pidf" ] || return 0
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null && grep -q "yunying-$1" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    fi
    rm -f "$pidf"
}

if [ "${1:-}" = stop ]; then
    stop_one edge
    stop_one cloud
    echo "quickstart: stopped"
    exit 0
fi

mkdir -p "$qs/cloud" "$qs/edge" "$qs/logs"
stop_one edge
stop_one cloud

# A local test CA and certificates for the cloud (kept across runs). The
# server certificate names 127.0.0.1 and localhost, plus YY_BIND if that is
# another address. Production uses the operator's own PKI.
pki="$qs/pki"
case $bind in
127.0.0.1|0.0.0.0|localhost) ;;
*) YY_TLS_SERVER_SAN=${YY_TLS_SERVER_SAN:-IP:$bind}; export YY_TLS_SERVER_SAN ;;
esac
sh "$top/deploy/make-test-ca.sh" "$pki" edge-quickstart >/dev/null

cat >"$qs/cloud.json" <<JSON
{
  "log": { "level": "info" },
  "http": { "bind": "$bind", "port": $http_port, "web_root": "$top/cloud/web/dist",
            "tls_cert_file": "$pki/server.pem", "tls_key_file": "$pki/server.key" },
  "index": { "path": "$qs/cloud/index.db" },
  "archive": { "dir": "$qs/cloud/archive" },
  "ingest": { "staging_dir": "$qs/cloud/staging" }
}
JSON

# First run: register the edge and a demo user; both secrets stay in files
# readable only by this user.
umask 077
if [ ! -s "$qs/edge.secret" ]; then
    "$build/yunying-cloud" edge-add --config "$qs/cloud.json" --id edge-quickstart | tail -n 1 >"$qs/edge.secret"
fi
if [ ! -s "$qs/demo.password" ]; then
    pass="yy-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    "$build/yunying-cloud" user-add --config "$qs/cloud.json" --user demo --password "$pass" --role doctor >/dev/null
    printf '%s\n' "$pass" >"$qs/demo.password"
fi
umask 022

cat >"$qs/edge.json" <<JSON
{
  "log": { "level": "info" },
  "scp": { "ae_title": "$ae", "bind": "$bind", "port": $dicom_port },
  "spool": { "dir": "$qs/edge/spool" },
  "upload": { "cloud_url": "https://127.0.0.1:$http_port", "edge_id": "edge-quickstart",
              "secret_file": "$qs/edge.secret", "ca_file": "$pki/ca.pem" }
}
JSON

# Start a daemon in the background and wait (bounded) for its readiness line.
start_one() {
    name=$1
    log="$qs/logs/$name.log"
    : >"$log"
    nohup "$build/yunying-$name" --config "$qs/$name.json" >>"$log" 2>&1 &
    echo $! >"$qs/$name.pid"
    i=0
    until grep -q "^yunying-$name: listening" "$log"; do
        if ! kill -0 "$(cat "$qs/$name.pid")" 2>/dev/null || [ $i -ge 300 ]; then
            echo "quickstart: yunying-$name did not start; its log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        i=$((i + 1))
        sleep 0.1
    done
}
start_one cloud
start_one edge

# The sample study: a generated 60-slice CT (deterministic), sent over DICOM.
sample="$qs/sample"
if [ ! -f "$sample/.done" ]; then
    rm -rf "$sample"
    $py "$top/tests/data/gen_studies.py" "$sample" --only ct --ct-slices 60 \
        --patient-id DEMO0001 --patient-name "演示^患者" --accession DEMO-ACC-1 >/dev/null
    touch "$sample/.done"
fi
echo "quickstart: sending the sample CT study to the edge with storescu"
TCP_NODELAY=1 storescu -aec "$ae" +sd +r +sp '*.dcm' 127.0.0.1 "$dicom_port" "$sample"

# Wait until the cloud has indexed every slice (the edge uploads in the background).
want=$(find "$sample" -name '*.dcm' | wc -l)
jar="$qs/cookies.txt"
curl -fsS --cacert "$pki/ca.pem" -c "$jar" -H 'Content-Type: application/json' \
    -d "{\"username\":\"demo\",\"password\":\"$(cat "$qs/demo.password")\"}" \
    "https://127.0.0.1:$http_port/api/v1/login" >/dev/null
i=0
while :; do
    got=$(curl -fsS --cacert "$pki/ca.pem" -b "$jar" "https://127.0.0.1:$http_port/dicomweb/studies?PatientID=DEMO0001&includefield=00201208" |
        $py -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["00201208"]["Value"][0] if r else 0)')
    [ "$got" -ge "$want" ] && break
    i=$((i + 1))
    if [ $i -ge 600 ]; then
        echo "quickstart: only $got of $want instances reached the cloud; see $qs/logs/" >&2
        exit 1
    fi
    sleep 0.2
done
rm -f "$jar"

cat <<TXT

Yunying is running (embedded defaults: SQLite index, local archive, SQLite spool).

  Web viewer      https://$bind:$http_port/
  DICOMweb root   https://$bind:$http_port/dicomweb
  TLS             test CA $pki/ca.pem (import it in the browser, or accept the warning)
  Edge DICOM SCP  AE title $ae, host $bind, port $dicom_port
  Demo login      user demo, password $(cat "$qs/demo.password")

  Sample study    patient DEMO0001, $want CT slices, sent through the edge
  Logs            $qs/logs/
  Stop            deploy/quickstart.sh stop
TXT
