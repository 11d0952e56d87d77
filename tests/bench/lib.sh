# lib.sh - shared by the tests/bench/*.sh scripts (sourced, POSIX sh).
# The caller sets NAME (its name in messages), top, py.

# bench_netns SCRIPT ARGS...: re-runs the calling script in a private
# network namespace with loopback up (Orthanc cannot bind to 127.0.0.1
# only, so the anchors run where nothing else listens). Needs root.
bench_netns() {
    [ -n "${YY_BENCH_NETNS:-}" ] && return 0
    exec unshare --net -- env YY_BENCH_NETNS=1 sh -c 'ip link set lo up && exec sh "$0" "$@"' "$@"
}

# orthanc_plugin PACKAGE LIBRARY: installs orthanc and the plugin package if
# missing; prints the plugin's path.
orthanc_plugin() {
    so=/usr/share/orthanc/plugins/$2
    if ! command -v Orthanc >/dev/null 2>&1 || [ ! -f "$so" ]; then
        echo "$NAME: installing orthanc $1 ..." >&2
        apt="env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
        $apt install -y orthanc "$1" >/dev/null 2>&1 ||
            { $apt update >/dev/null 2>&1 && $apt install -y orthanc "$1" >/dev/null; }
    fi
    [ -f "$so" ] || so=$(dpkg -L "$1" | grep "/$2\$" | head -n1)
    echo "$so"
}

# bench_ct DATA_DIR SLICES: the generated CT in DATA_DIR (made if missing or
# of another size); prints its directory.
bench_ct() {
    d=$(ls -d "$1"/ct_* 2>/dev/null | grep -v '\.jls$' | head -n1 || true)
    if [ -z "$d" ] || [ "$(ls "$d"/*.dcm | wc -l)" -ne "$2" ]; then
        echo "$NAME: generating a $2-slice CT in $1 ..." >&2
        rm -rf "$1"/ct_*
        "$py" "$top/tests/data/gen_studies.py" "$1" --only ct --ct-slices "$2" --quiet
        d=$(ls -d "$1"/ct_* | head -n1)
    fi
    echo "$d"
}

# wait_http URL NAME: polls until a server answers (its readiness, not a
# test's synchronisation); gives up after 60 s.
wait_http() {
    i=0
    until curl -s -o /dev/null "$1"; do
        i=$((i + 1))
        [ $i -gt 600 ] && { echo "$NAME: $2 did not start" >&2; exit 1; }
        sleep 0.1
    done
}

# bench_servers WEB_ROOT PLUGIN ORTHANC_EXTRA: starts yunying-cloud (port
# $cport, user bench) and Orthanc (HTTP $oport, DICOM $odport, the plugin,
# ORTHANC_EXTRA one more JSON member) under $work, waits for both, logs in;
# sets cloud_pid, orthanc_pid and token. Needs build, work, cport, oport, odport.
bench_servers() {
    mkdir -p "$work/cloud" "$work/orthanc/storage" "$work/orthanc/index"
    cat >"$work/cloud/cloud.json" <<EOC
{ "log": {"level": "warn"},
  "http": {"bind": "127.0.0.1", "port": $cport, "web_root": "$1"},
  "index": {"path": "$work/cloud/index.db"},
  "archive": {"dir": "$work/cloud/archive"},
  "ingest": {"staging_dir": "$work/cloud/staging"} }
EOC
    "$build/yunying-cloud" user-add --config "$work/cloud/cloud.json" --user bench \
        --password bench-pass-1 --role doctor >/dev/null
    "$build/yunying-cloud" --config "$work/cloud/cloud.json" >"$work/cloud/out.log" 2>&1 &
    cloud_pid=$!
    cat >"$work/orthanc/orthanc.json" <<EOC
{ "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": $odport, "HttpPort": $oport,
  "DicomCheckCalledAet": false, "DicomAlwaysAllowStore": true,
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "StorageDirectory": "$work/orthanc/storage", "IndexDirectory": "$work/orthanc/index",
  "SyncStorageArea": false, "Plugins": ["$2"],
  $3 }
EOC
    TCP_NODELAY=1 Orthanc "$work/orthanc/orthanc.json" >"$work/orthanc/out.log" 2>&1 &
    orthanc_pid=$!
    wait_http "http://127.0.0.1:$cport/" yunying-cloud
    wait_http "http://127.0.0.1:$oport/system" Orthanc
    token=$(curl -s -D - -o /dev/null -H 'Content-Type: application/json' \
        -d '{"username":"bench","password":"bench-pass-1"}' "http://127.0.0.1:$cport/api/v1/login" |
        sed -n 's/^[Ss]et-[Cc]ookie: yy_session=\([0-9a-f]*\).*/\1/p')
    [ -n "$token" ] || { echo "$NAME: login failed" >&2; exit 1; }
}
