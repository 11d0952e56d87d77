#!/bin/sh
# Installs every Debian package that building, running and testing Yunying
# needs, then the web app's npm dependencies from the committed lock file.
# Idempotent: packages already present are skipped, npm ci runs only when
# node_modules is missing or older than the lock file.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)

PKGS="build-essential pkg-config g++ make ca-certificates openssl curl
 libuv1-dev libmbedtls-dev libsqlite3-dev sqlite3 libcurl4-openssl-dev
 libjansson-dev libcharls-dev libxxhash-dev libdcmtk-dev dcmtk node-llhttp
 libcmocka-dev python3 python3-pydicom python3-numpy python3-xxhash
 chromium iproute2
 libpq-dev postgresql python3-psycopg2
 swift swift-proxy swift-object swift-container swift-account python3-swift memcached
 nginx tinyproxy"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $p"
    fi
done
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    missing="$missing nodejs npm"
fi

if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "install-deps: installing:$missing"
    # Packages such as postgresql, swift-proxy and memcached start system
    # services from their install scripts; the tests start private instances
    # on free ports instead, so keep the packaged services from starting.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
    fi
    rc=0
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ||
        rc=$?
    [ -z "$policy" ] || $SUDO rm -f "$policy"
    [ $rc -eq 0 ] || exit $rc
fi

# npm packages: the web app (cloud/web) and the browser tests (tests/e2e),
# each from its committed lock file.
for dir in "$top/cloud/web" "$top/tests/e2e" "$top/tests/dicomweb-client"; do
    if [ -f "$dir/package-lock.json" ]; then
        if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
            echo "install-deps: npm ci in ${dir#"$top"/}"
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules)
        fi
    fi
done
