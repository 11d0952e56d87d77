#!/bin/sh
# Installs (or upgrades) yunying-edge as a systemd service on a Debian 12
# front-end machine. Run as root from the project directory after `make`.
#
#   deploy/install-edge.sh [--cloud-url URL] [--edge-id ID] [--secret-file FILE]
#                          [--ae TITLE] [--port N] [--no-start]
#
# What it does (idempotent; an upgrade keeps the config, the secret and the spool):
#   - user and group "yunying" (system, no login shell)
#   - /usr/local/bin/yunying-edge (replaced atomically; the service is
#     restarted, and uploads in flight resume from the spool)
#   - /etc/yunying/edge.json (only if absent; from deploy/edge.conf.example
#     with production paths), /etc/yunying/edge.secret (mode 0600, only if given)
#   - /var/lib/yunying/edge/spool (the spool; never touched by an upgrade)
#   - /etc/systemd/system/yunying-edge.service, enabled and started
# Logs: the journal (journalctl -u yunying-edge), which rotates by itself
# (SystemMaxUse= in /etc/systemd/journald.conf); nothing writes log files.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
bin="$top/build/release/yunying-edge"
cloud_url="" edge_id="" secret_file="" ae="" port="" start=1
while [ $# -gt 0 ]; do
    case "$1" in
    --cloud-url) cloud_url=$2; shift 2 ;;
    --edge-id) edge_id=$2; shift 2 ;;
    --secret-file) secret_file=$2; shift 2 ;;
    --ae) ae=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install-edge: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install-edge: run as root" >&2; exit 1; }
[ -x "$bin" ] || { echo "install-edge: $bin missing: run make first" >&2; exit 1; }

# Runtime libraries (Debian 12 names).
if command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libuv1 libsqlite3-0 libjansson4 libcurl4 libmbedtls14 libcharls2 libxxhash0 \
        libdcmtk17 dcmtk >/dev/null || echo "install-edge: warning: apt-get failed" >&2
fi

getent group yunying >/dev/null || groupadd --system yunying
getent passwd yunying >/dev/null ||
    useradd --system --gid yunying --home-dir /var/lib/yunying --shell /usr/sbin/nologin yunying

install -d -m 0750 -o root -g yunying /etc/yunying
install -d -m 0750 -o yunying -g yunying /var/lib/yunying /var/lib/yunying/edge
install -d -m 0755 /usr/share/doc/yunying
install -m 0644 "$top/docs/edge.md" /usr/share/doc/yunying/edge.md

# Binary: copy next to the target, then rename (a running process keeps the old inode).
install -m 0755 "$bin" /usr/local/bin/.yunying-edge.new
mv -f /usr/local/bin/.yunying-edge.new /usr/local/bin/yunying-edge

if [ -n "$secret_file" ]; then
    install -m 0600 -o yunying -g yunying "$secret_file" /etc/yunying/edge.secret
fi

conf=/etc/yunying/edge.json
if [ ! -f "$conf" ]; then
    /usr/bin/python3 - "$top/deploy/edge.conf.example" "$conf" "$cloud_url" "$edge_id" \
        "$ae" "$port" <<'PY'
import json, sys
src, dst, url, eid, ae, port = sys.argv[1:]
c = json.load(open(src))
c["spool"]["dir"] = "/var/lib/yunying/edge/spool"
c["upload"]["secret_file"] = "/etc/yunying/edge.secret"
c["upload"].pop("ca_file", None) if not c["upload"].get("ca_file") else None
if url: c["upload"]["cloud_url"] = url
if eid: c["upload"]["edge_id"] = eid
if ae: c["scp"]["ae_title"] = ae
if port: c["scp"]["port"] = int(port)
json.dump(c, open(dst, "w"), indent=2)
open(dst, "a").write("\n")
PY
    chown root:yunying "$conf"
    chmod 0640 "$conf"
    echo "install-edge: wrote $conf (edit it, then: systemctl restart yunying-edge)"
else
    echo "install-edge: keeping $conf"
fi

install -m 0644 "$top/deploy/systemd/yunying-edge.service" /etc/systemd/system/yunying-edge.service
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable yunying-edge.service >/dev/null
    if [ "$start" = 1 ]; then
        if sudo -u yunying /usr/local/bin/yunying-edge --config "$conf" --check-config; then
            systemctl restart yunying-edge.service
            echo "install-edge: yunying-edge (re)started; status: yunying-edge status --config $conf"
        else
            echo "install-edge: fix $conf, then: systemctl restart yunying-edge" >&2
        fi
    fi
else
    echo "install-edge: no systemd here; start by hand (as user yunying):"
    echo "  yunying-edge prepare-spool --config $conf && yunying-edge --config $conf"
fi
