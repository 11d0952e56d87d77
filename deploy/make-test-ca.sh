#!/bin/sh
# make-test-ca.sh - a local test PKI for Yunying's edge <-> cloud TLS.
#
#   deploy/make-test-ca.sh DIR [EDGE_ID]
#
# Writes into DIR (created if missing, mode 0700):
#   ca.pem      test CA certificate (EC P-256, self-signed, 10 years)
#   ca.key      its private key
#   server.pem  server certificate for the cloud: CN=localhost,
#               SAN DNS:localhost, IP:127.0.0.1 (+ $YY_TLS_SERVER_SAN, e.g.
#               "DNS:cloud.example,IP:10.0.0.5"), serverAuth, 825 days
#   server.key
#   client.pem  client certificate for an edge: CN=EDGE_ID (default
#               "edge-test"), clientAuth, 825 days
#   client.key
#
# Idempotent: files that exist and verify against ca.pem are kept; a missing
# or broken CA re-issues everything, a missing or broken leaf (or a client
# certificate for another EDGE_ID) re-issues that leaf only. Private keys are
# written with mode 0600. Needs only the openssl CLI (Debian's openssl).
# This is a TEST CA: production certificates come from the operator's PKI.
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DIR [EDGE_ID]" >&2
    exit 2
fi
dir=$1
edge_id=${2:-edge-test}
extra_san=${YY_TLS_SERVER_SAN:-}

case $edge_id in
*[!A-Za-z0-9._-]*|'') echo "make-test-ca: EDGE_ID may only use A-Z a-z 0-9 . _ -" >&2; exit 2 ;;
esac

umask 077
mkdir -p "$dir"
work=$(mktemp -d "$dir/.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

ossl() {
    if ! out=$(openssl "$@" 2>&1); then
        echo "make-test-ca: openssl $1 failed:" >&2
        printf '%s\n' "$out" >&2
        exit 1
    fi
}

new_key() {
    ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

# Moves the files of one item from $work into $dir (rename within a
# filesystem, so a reader never sees half a file).
install_pair() {
    mv -f "$work/$1.key" "$dir/$1.key"
    mv -f "$work/$1.pem" "$dir/$1.pem"
}

leaf_ok() { # name purpose [subject-cn]
    [ -s "$dir/$1.pem" ] && [ -s "$dir/$1.key" ] || return 1
    openssl verify -CAfile "$dir/ca.pem" -purpose "$2" "$dir/$1.pem" >/dev/null 2>&1 || return 1
    # The key must match the certificate.
    a=$(openssl x509 -in "$dir/$1.pem" -noout -pubkey 2>/dev/null) || return 1
    b=$(openssl pkey -in "$dir/$1.key" -pubout 2>/dev/null) || return 1
    [ "$a" = "$b" ] || return 1
    if [ $# -ge 3 ]; then
        openssl x509 -in "$dir/$1.pem" -noout -subject -nameopt RFC2253 2>/dev/null |
            grep -qx "subject=CN=$3" || return 1
    fi
    return 0
}

ca_ok() {
    [ -s "$dir/ca.pem" ] && [ -s "$dir/ca.key" ] || return 1
    openssl verify -CAfile "$dir/ca.pem" "$dir/ca.pem" >/dev/null 2>&1 || return 1
    a=$(openssl x509 -in "$dir/ca.pem" -noout -pubkey 2>/dev/null) || return 1
    b=$(openssl pkey -in "$dir/ca.key" -pubout 2>/dev/null) || return 1
    [ "$a" = "$b" ]
}

issue_leaf() { # name cn extfile-body
    new_key "$work/$1.key"
    ossl req -new -key "$work/$1.key" -subj "/CN=$2" -out "$work/$1.csr"
    printf '%s\n' "$3" >"$work/$1.ext"
    ossl x509 -req -in "$work/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 \
        -extfile "$work/$1.ext" -out "$work/$1.pem"
    install_pair "$1"
}

changed=""
if ! ca_ok; then
    new_key "$work/ca.key"
    ossl req -x509 -new -key "$work/ca.key" -sha256 -days 3650 \
        -subj "/CN=Yunying Test CA $(openssl rand -hex 4)" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$work/ca.pem"
    install_pair ca
    rm -f "$dir/server.pem" "$dir/client.pem"
    changed="$changed ca"
fi

san="DNS:localhost,IP:127.0.0.1"
[ -n "$extra_san" ] && san="$san,$extra_san"
if ! leaf_ok server sslserver || [ ! -f "$dir/.server-san" ] ||
    [ "$(cat "$dir/.server-san")" != "$san" ]; then
    issue_leaf server localhost "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
    printf '%s\n' "$san" >"$dir/.server-san"
    changed="$changed server"
fi

if ! leaf_ok client sslclient "$edge_id"; then
    issue_leaf client "$edge_id" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
    changed="$changed client"
fi

chmod 0644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
chmod 0600 "$dir/ca.key" "$dir/server.key" "$dir/client.key"
echo "make-test-ca: $dir:${changed:- up to date}"
