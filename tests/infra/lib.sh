# lib.sh - shared by the tests/infra/*.sh scripts (sourced, POSIX sh).
# The caller defines say() and die() (with its own name in the messages).

# infra_install PKG...: apt-get installs the packages that are missing,
# idempotent. A temporary policy-rc.d keeps their packaged services (the
# system's PostgreSQL cluster, swift-proxy on 8080, memcached, nginx on 80)
# from starting: the tests run private instances.
infra_install() {
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    say "installing$missing"
    tmp_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        tmp_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee $tmp_policy >/dev/null
        $SUDO chmod 755 $tmp_policy
    fi
    apt="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
    rc=0
    { $apt install -y --no-install-recommends $missing >&2 ||
      { $apt update >&2 && $apt install -y --no-install-recommends $missing >&2; }; } || rc=$?
    [ -z "$tmp_policy" ] || $SUDO rm -f "$tmp_policy"
    [ "$rc" -eq 0 ] || die "apt-get install failed ($rc)"
}

# alive PID: true if PID is a live process. Processes here are not always
# reaped at once (kill -0 succeeds on zombies), so read /proc/PID/stat.
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$st" != Z ] && [ "$st" != X ]
}

# port_free PORT: true if nothing listens on 127.0.0.1:PORT or 0.0.0.0:PORT
# (the scripts refuse a taken port rather than share it). Needs PY.
port_free() {
    $PY - "$1" <<'EOP'
import socket, sys
port = int(sys.argv[1])
for host in ("127.0.0.1", "0.0.0.0"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
EOP
}

# free_port: prints a TCP port free on 127.0.0.1 now.
free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
