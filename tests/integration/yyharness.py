"""Shared helpers for Yunying's integration tests.

Starts the real yunying-cloud and yunying-edge binaries from $YY_BUILD on
127.0.0.1 with free ports in a private temporary directory, waits for their
readiness lines (never sleeps as synchronisation), talks to them with DCMTK's
tools and plain HTTP, and stops exactly the processes it started, by PID.

Each test script registers tests with @test and calls run(); the last line
it prints is "N passed, N failed" (read by tests/run-all.sh).

Archive backends: YY_BACKEND=s3 (or Cloud(backend="s3")) archives to a real
S3 server, OpenStack Swift with s3api (tests/infra/swift.sh), started once
per test script on first use and stopped at the end; each cloud gets its
own key prefix in the shared bucket. YY_SWIFT_DIR=DIR reuses (or starts)
the instance in DIR and leaves it running (a fast edit loop). The default
is the local directory archive.

Index engines: YY_INDEX=pg (or Cloud(index="pg")) puts the cloud's index in
a real PostgreSQL (tests/infra/postgres.sh), one cluster per test script,
started on first use and stopped at the end, a fresh database per Cloud
(collation C, as docs/cloud.md asks). YY_PG_DIR=DIR reuses (or starts) the
cluster in DIR and leaves it running. The default is SQLite. Tests read
the index through Cloud.db(), which speaks to either engine.
"""
import http.cookiejar
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

TOP = os.environ.get("YY_TOP") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("YY_BUILD") or os.path.join(TOP, "build", "asan")
CLOUD_BIN = os.path.join(BUILD, "yunying-cloud")
EDGE_BIN = os.path.join(BUILD, "yunying-edge")
GEN = os.path.join(TOP, "tests", "data", "gen_studies.py")
MAKE_CA = os.path.join(TOP, "deploy", "make-test-ca.sh")
SWIFT_SH = os.path.join(TOP, "tests", "infra", "swift.sh")
PG_SH = os.path.join(TOP, "tests", "infra", "postgres.sh")
BACKEND = os.environ.get("YY_BACKEND", "dir")
INDEX = os.environ.get("YY_INDEX", "sqlite")

# ASan: report leaks and UB as failures; DCMTK's own allocations at exit are not ours.
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=66")
os.environ.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")

_tests = []


def test(fn):
    _tests.append(fn)
    return fn


def run():
    passed = failed = 0
    only = sys.argv[1:]
    for fn in _tests:
        if only and fn.__name__ not in only:
            continue
        t0 = time.monotonic()
        try:
            fn()
            passed += 1
            print(f"ok   {fn.__name__} ({time.monotonic() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}", flush=True)
            traceback.print_exc()
            _print_daemon_logs()
            sys.stdout.flush()
    _cleanup_all()
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


def check(cond, msg="check failed"):
    if not cond:
        raise AssertionError(msg)


def eq(a, b, what=""):
    if a != b:
        raise AssertionError(f"{what}: {a!r} != {b!r}")


def wait_until(pred, timeout=30.0, what="condition", interval=0.05):
    """Polls pred() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


_procs = []
_dirs = []


def tempdir(prefix="yy-it-"):
    d = tempfile.mkdtemp(prefix=prefix)
    _dirs.append(d)
    return d


def _print_daemon_logs(lines=40):
    """After a failure: the end of each running daemon's log (they are
    removed with their directories at the end of the run)."""
    for p in list(_procs):
        path = getattr(p, "log_path", None)
        if not path or not os.path.exists(path):
            continue
        with open(path, errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
        print(f"---- last {len(tail)} lines of {path}")
        for line in tail:
            print("    " + line)


def _cleanup_all():
    for p in list(_procs):
        p.stop()
    _swift_stop()
    _pg_stop()
    for d in _dirs:
        shutil.rmtree(d, ignore_errors=True)


class Daemon:
    """One started process, with its output captured to a log file."""

    def __init__(self, argv, ready_prefix, log_path, env=None, timeout=60):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env or os.environ.copy(), start_new_session=True)
        _procs.append(self)
        self.ready_line = self._wait_ready(ready_prefix, timeout)

    def _wait_ready(self, prefix, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                self.log.write(chunk)
                self.log.flush()
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(prefix):
                        self._drain_stdout()
                        return line
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"{prefix} not ready; log:\n{self.tail()}")

    def _drain_stdout(self):
        # Keep reading stdout in the background so the daemon never blocks on a full pipe.
        import threading

        def pump(f, log):
            for chunk in iter(lambda: f.read1(4096), b""):
                log.write(chunk)
                log.flush()
        threading.Thread(target=pump, args=(self.proc.stdout, self.log), daemon=True).start()

    def tail(self, n=60):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Stops this process (by PID) and returns its exit code."""
        if self in _procs:
            _procs.remove(self)
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill9(self):
        return self.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------
# TLS: one test CA per test run (deploy/make-test-ca.sh), created on first use.
# Its server certificate names 127.0.0.1 and localhost; its client
# certificate's CN is TEST_CLIENT_CN.

TEST_CLIENT_CN = "edge-test"
_ca = {}


def test_ca():
    """Directory holding ca.pem, server.pem/.key, client.pem/.key for this run."""
    if not _ca:
        d = os.path.join(tempdir("yy-ca-"), "pki")
        r = subprocess.run(["sh", MAKE_CA, d, TEST_CLIENT_CN], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"make-test-ca.sh failed: {r.stdout}\n{r.stderr}")
        _ca["dir"] = d
    return _ca["dir"]


def ssl_context(client_cert=False):
    """An SSLContext trusting the run's test CA (optionally with the client certificate)."""
    d = test_ca()
    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(os.path.join(d, "client.pem"), os.path.join(d, "client.key"))
    return ctx


def http_conn(url_or_cloud, timeout=120, client_cert=False):
    """An http.client connection to a cloud (or its base URL), HTTPS when the URL is."""
    import http.client
    url = url_or_cloud if isinstance(url_or_cloud, str) else url_or_cloud.url
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        return http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout,
                                           context=ssl_context(client_cert))
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path


# ---------------------------------------------------------------------------
# The test S3 server: OpenStack Swift + s3api via tests/infra/swift.sh.

_swift = {}


def swift():
    """The env of the script's S3 server (YY_S3_ENDPOINT, YY_S3_BUCKET, ...), started on first use."""
    if not _swift:
        keep = os.environ.get("YY_SWIFT_DIR")
        d = keep or tempdir("yy-swift-")
        t0 = time.monotonic()
        r = subprocess.run(["sh", SWIFT_SH, "start", d], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise AssertionError(f"tests/infra/swift.sh start failed ({r.returncode}):\n{r.stderr[-3000:]}")
        env = {}
        for line in r.stdout.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip()
        check(env.get("YY_S3_ENDPOINT") and env.get("YY_S3_BUCKET"), f"swift.sh env: {r.stdout}")
        env["_dir"] = d
        env["_keep"] = bool(keep)
        _swift.update(env)
        print(f"swift ready in {time.monotonic() - t0:.1f}s ({d})", flush=True)
    return _swift


def _swift_stop():
    if _swift and not _swift["_keep"]:
        subprocess.run(["sh", SWIFT_SH, "stop", _swift["_dir"]], capture_output=True, timeout=120)
    _swift.clear()


def _s3_curl(method, key_or_query, data_file=None, sha=None, out=None, timeout=60):
    """curl --aws-sigv4 against the test bucket; returns (status, body bytes)."""
    import hashlib
    sw = swift()
    url = f"{sw['YY_S3_ENDPOINT']}/{sw['YY_S3_BUCKET']}{key_or_query}"
    if sha is None:
        if data_file:
            with open(data_file, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        else:
            sha = hashlib.sha256(b"").hexdigest()
    argv = ["curl", "-s", "-g", "-X", method, "--max-time", str(timeout), "-w", "\n%{http_code}",
            "--aws-sigv4", f"aws:amz:{sw['YY_S3_REGION']}:s3", "--netrc-file", sw["YY_S3_NETRC"],
            "-H", f"x-amz-content-sha256: {sha}"]
    if data_file:
        argv += ["--data-binary", "@" + data_file]
    r = subprocess.run(argv + [url], capture_output=True, timeout=timeout + 10)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or 0), body


def s3_list(prefix):
    """{key: size} of the objects under prefix in the test bucket (ListObjectsV2)."""
    import xml.etree.ElementTree as ET
    keys, token = {}, None
    while True:
        q = {"list-type": "2", "prefix": prefix}
        if token:
            q["continuation-token"] = token
        qs = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in sorted(q.items()))
        st, body = _s3_curl("GET", "?" + qs)
        check(st == 200, f"S3 list: HTTP {st} {body[:300]!r}")
        root = ET.fromstring(body)
        ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        for c in root.findall(f"{ns}Contents"):
            keys[c.find(f"{ns}Key").text] = int(c.find(f"{ns}Size").text)
        if (root.findtext(f"{ns}IsTruncated") or "false") != "true":
            return keys
        token = root.findtext(f"{ns}NextContinuationToken")


def s3_get(key):
    st, body = _s3_curl("GET", "/" + urllib.parse.quote(key))
    if st == 404:
        return None
    check(st == 200, f"S3 GET {key}: HTTP {st}")
    return body


def s3_put(key, data):
    d = tempdir("yy-s3put-")
    path = os.path.join(d, "body")
    with open(path, "wb") as f:
        f.write(data)
    st, body = _s3_curl("PUT", "/" + urllib.parse.quote(key), data_file=path)
    check(st == 200, f"S3 PUT {key}: HTTP {st} {body[:300]!r}")


def s3_delete(key):
    st, body = _s3_curl("DELETE", "/" + urllib.parse.quote(key))
    check(st in (200, 204), f"S3 DELETE {key}: HTTP {st}")


# ---------------------------------------------------------------------------
# The test PostgreSQL: tests/infra/postgres.sh, one cluster per test script.

_pg = {}
_pg_seq = [0]


def postgres():
    """The env of the script's PostgreSQL (YY_PG_URL, YY_PG_SOCKDIR...), started on first use."""
    if not _pg:
        keep = os.environ.get("YY_PG_DIR")
        d = keep or tempdir("yy-pg-")
        t0 = time.monotonic()
        r = subprocess.run(["sh", PG_SH, "start", d], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"tests/infra/postgres.sh start failed ({r.returncode}):\n"
                                 f"{r.stderr[-3000:]}")
        env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        check(env.get("YY_PG_URL"), f"postgres.sh env: {r.stdout}")
        env["_dir"] = d
        env["_keep"] = bool(keep)
        _pg.update(env)
        print(f"postgres ready in {time.monotonic() - t0:.1f}s ({d})", flush=True)
    return _pg


_pg_dbs = []


def _pg_stop():
    if _pg and _pg_dbs:
        # The clouds are stopped: drop their databases (a kept cluster stays small).
        try:
            con = _pg_connect(_pg["YY_PG_URL"])
            for name in _pg_dbs:
                con.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            con.close()
        except Exception as e:  # best effort: the cluster may be gone already
            print(f"postgres: dropping test databases failed: {e}", flush=True)
        _pg_dbs.clear()
    if _pg and not _pg["_keep"]:
        subprocess.run(["sh", PG_SH, "stop", _pg["_dir"]], capture_output=True, timeout=120)
    _pg.clear()


def _pg_connect(url):
    import psycopg2
    con = psycopg2.connect(url)
    con.autocommit = True
    return con


def pg_create_database():
    """A fresh database in the script's cluster: its URL."""
    pg = postgres()
    _pg_seq[0] += 1
    name = f"yy_{os.getpid()}_{_pg_seq[0]}_{time.monotonic_ns() % 1000000}"
    con = _pg_connect(pg["YY_PG_URL"])
    try:
        con.cursor().execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
                             " LC_COLLATE 'C' LC_CTYPE 'C'")
    finally:
        con.close()
    _pg_dbs.append(name)
    base = pg["YY_PG_URL"].rsplit("/", 1)[0]
    return f"{base}/{name}"


class PgIndex:
    """The PostgreSQL index with the sqlite3 calls the tests use: execute()
    with "?" placeholders, fetchone/fetchall/iteration, "with con:", close().
    Autocommit; errors are raised as sqlite3.DatabaseError so a test's
    except clause is the same for both engines."""

    def __init__(self, url):
        self.con = _pg_connect(url)

    def execute(self, sql, params=()):
        import psycopg2
        import sqlite3
        cur = self.con.cursor()
        try:
            cur.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        except psycopg2.Error as e:
            raise sqlite3.DatabaseError(str(e)) from e
        return cur

    def commit(self):
        pass

    def close(self):
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False




class Cloud:
    """A yunying-cloud with a fresh index/archive, one edge and one user.

    backend: "dir" or "s3" (default: $YY_BACKEND, else "dir"). With "s3" the
    archive lives in the script's Swift bucket under the key prefix
    self.s3_prefix, and archive.dir (self.archive_dir) is only the cache.
    index: "sqlite" or "pg" (default: $YY_INDEX, else "sqlite"); with "pg"
    self.index_url is the cloud's own database in the script's cluster."""

    USER = "doctor"
    PASSWORD = "Yy-test-pass-1"

    def __init__(self, root=None, edge_id="edge-test", extra=None, tls=True, mtls=False,
                 allow=None, backend=None, index=None):
        """tls=False serves plain HTTP (for tests that flip bytes through a proxy);
        mtls=True also requires client certificates; allow = the edge's CIDR list."""
        self.dir = root or tempdir("yy-cloud-")
        self.backend = backend or BACKEND
        self.index = index or INDEX
        self.archive_dir = os.path.join(self.dir, "archive")
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        cfg = {
            "log": {"level": "info"},
            "http": {"bind": "127.0.0.1", "port": self.port,
                     "web_root": os.path.join(TOP, "cloud", "web", "dist")},
            "index": {"path": os.path.join(self.dir, "index.db")},
            "archive": {"dir": self.archive_dir},
            "ingest": {"staging_dir": os.path.join(self.dir, "staging")},
        }
        self.s3_prefix = None
        if self.backend == "s3":
            sw = swift()
            self.s3_prefix = f"t{os.getpid()}-{time.monotonic_ns()}/"
            cfg["archive"].update({
                "backend": "s3", "s3_endpoint": sw["YY_S3_ENDPOINT"],
                "s3_region": sw["YY_S3_REGION"], "s3_bucket": sw["YY_S3_BUCKET"],
                "s3_access_key": sw["YY_S3_ACCESS_KEY"], "s3_secret_file": sw["YY_S3_SECRET_FILE"],
                "s3_prefix": self.s3_prefix})
        elif self.backend != "dir":
            raise AssertionError(f"unknown backend {self.backend!r}")
        self.index_url = None
        if self.index == "pg":
            self.index_url = pg_create_database()
            cfg["index"]["url"] = self.index_url
        elif self.index != "sqlite":
            raise AssertionError(f"unknown index {self.index!r}")
        if tls:
            ca = test_ca()
            cfg["http"]["tls_cert_file"] = os.path.join(ca, "server.pem")
            cfg["http"]["tls_key_file"] = os.path.join(ca, "server.key")
            if mtls:
                cfg["http"]["tls_client_ca_file"] = os.path.join(ca, "ca.pem")
        self.mtls = mtls
        for sec, kv in (extra or {}).items():
            cfg.setdefault(sec, {}).update(kv)
        self.config = write_json(os.path.join(self.dir, "cloud.json"), cfg)
        self.edge_id = edge_id
        self.secret = self.admin("edge-add", "--id", edge_id,
                                 *(("--allow", allow) if allow else ())).strip().splitlines()[-1]
        check(len(self.secret) == 64, f"edge-add printed {self.secret!r}")
        self.admin("user-add", "--user", self.USER, "--password", self.PASSWORD, "--role", "doctor")
        self.daemon = None
        self.start()

    def db(self, timeout=10, readonly=False):
        """A connection to this cloud's index (sqlite3, or PgIndex for "pg"); close it."""
        if self.index_url:
            return PgIndex(self.index_url)
        import sqlite3
        path = os.path.join(self.dir, "index.db")
        mode = "?mode=ro" if readonly else ""
        con = sqlite3.connect(f"file:{path}{mode}", uri=True, timeout=timeout)
        # The audit table lives in its own file (cloud/index.c), attached as "aud".
        con.execute("ATTACH DATABASE ? AS aud", (f"file:{self.audit_db_path()}{mode}",))
        return con

    def audit_db_path(self):
        return os.path.join(self.dir, "index-audit.db")

    def admin(self, *args, ok=(0,)):
        r = subprocess.run([CLOUD_BIN, args[0], "--config", self.config, *args[1:]],
                           capture_output=True, text=True, timeout=600)
        self.last_rc = r.returncode
        if r.returncode not in ok:
            raise AssertionError(f"yunying-cloud {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def set_config(self, section, **kv):
        """Changes options in the config file (takes effect at the next start)."""
        with open(self.config) as f:
            cfg = json.load(f)
        cfg.setdefault(section, {}).update(kv)
        write_json(self.config, cfg)

    def object_key(self, archive_path):
        """The S3 key of an archive path from the index (backend s3)."""
        return self.s3_prefix + os.path.relpath(archive_path, self.archive_dir)

    def start(self):
        self.daemon = Daemon([CLOUD_BIN, "--config", self.config], "yunying-cloud: listening",
                             os.path.join(self.dir, f"cloud-{time.monotonic_ns()}.log"))

    def stop(self):
        return self.daemon.stop()

    def session(self):
        return HttpSession(self.url, self.USER, self.PASSWORD)

    def log_text(self):
        """Everything the running daemon logged so far."""
        with open(self.daemon.log_path, "rb") as f:
            return f.read().decode(errors="replace")


class Edge:
    """A yunying-edge uploading to cloud (or to cloud_url)."""

    def __init__(self, cloud=None, cloud_url=None, ae="YY_EDGE", root=None, extra=None,
                 secret=None, edge_id=None):
        self.dir = root or tempdir("yy-edge-")
        self.ae = ae
        self.port = free_port()
        secret_file = os.path.join(self.dir, "edge.secret")
        with open(secret_file, "w") as f:
            f.write((secret or cloud.secret) + "\n")
        os.chmod(secret_file, 0o600)
        cfg = {
            "log": {"level": "info"},
            "scp": {"ae_title": ae, "bind": "127.0.0.1", "port": self.port},
            # No early eviction for disk space (the hot cache): a test machine
            # with little free disk would otherwise remove uploaded files that
            # tests read back. keep_days stays at its default.
            "spool": {"dir": os.path.join(self.dir, "spool"), "evict_headroom_mb": 0},
            "upload": {"cloud_url": cloud_url or cloud.url,
                       "edge_id": edge_id or cloud.edge_id, "secret_file": secret_file,
                       "retry_min_ms": 100, "retry_max_ms": 2000},
        }
        # Trust the run's test CA (also for tests that later point a plain-HTTP
        # edge at a TLS cloud); present the client certificate to an mTLS cloud.
        ca = test_ca()
        cfg["upload"]["ca_file"] = os.path.join(ca, "ca.pem")
        if cloud is not None and cloud.mtls:
            cfg["upload"]["client_cert_file"] = os.path.join(ca, "client.pem")
            cfg["upload"]["client_key_file"] = os.path.join(ca, "client.key")
        for sec, kv in (extra or {}).items():
            cfg.setdefault(sec, {}).update(kv)
        self.config = write_json(os.path.join(self.dir, "edge.json"), cfg)
        self.daemon = None
        self.start()

    def start(self):
        self.daemon = Daemon([EDGE_BIN, "--config", self.config], "yunying-edge: listening",
                             os.path.join(self.dir, f"edge-{time.monotonic_ns()}.log"))

    def stop(self):
        return self.daemon.stop()


def dcmtk_env():
    env = os.environ.copy()
    env["TCP_NODELAY"] = "1"
    return env


def echoscu(ae, port, timeout=30):
    return subprocess.run(["echoscu", "-to", "10", "-aec", ae, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def storescu(ae, port, files, extra=(), timeout=300):
    return subprocess.run(["storescu", "-to", "30", "-aec", ae, *extra, "127.0.0.1", str(port),
                           *files], capture_output=True, text=True, env=dcmtk_env(),
                          timeout=timeout)


def generate(outdir, *args):
    """Runs the test-data generator; returns the parsed manifests by study directory."""
    r = subprocess.run([sys.executable, GEN, outdir, *args], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"gen_studies failed: {r.stderr}")
    manifests = {}
    for root, _, files in os.walk(outdir):
        if "manifest.json" in files:
            with open(os.path.join(root, "manifest.json")) as f:
                m = json.load(f)
            m["_dir"] = root
            manifests[root] = m
    return manifests


def manifest_files(m):
    """Absolute paths of every instance file a generator manifest lists, in order."""
    return [os.path.join(m["_dir"], inst["file"]) for se in m["series"] for inst in se["instances"]]


class HttpError(Exception):
    def __init__(self, status, body, headers):
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body
        self.headers = headers


class HttpSession:
    """A logged-in browser-like session (cookie jar)."""

    def __init__(self, base, user=None, password=None):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar)]
        if base.startswith("https:"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context()))
        self.opener = urllib.request.build_opener(*handlers)
        if user:
            st, _, body = self.request("POST", "/api/v1/login",
                                       json.dumps({"username": user, "password": password}).encode(),
                                       {"Content-Type": "application/json"})
            check(st == 200, f"login failed: {st} {body!r}")

    def request(self, method, path, body=None, headers=None, timeout=60):
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers=headers or {})
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path, headers=None, expect=200):
        st, h, body = self.request("GET", path, headers=headers)
        if expect is not None and st != expect:
            raise HttpError(st, body, h)
        return h, body

    def get_json(self, path, expect=200):
        h, body = self.get(path, expect=expect)
        return json.loads(body) if body else None


def parse_multipart(content_type, body):
    """Splits a multipart/related body into a list of (headers dict, bytes)."""
    params = {}
    for part in content_type.split(";")[1:]:
        if "=" in part:
            k, v = part.strip().split("=", 1)
            params[k.lower()] = v.strip('"')
    boundary = params["boundary"].encode()
    parts = []
    delim = b"--" + boundary
    pieces = body.split(delim)
    check(pieces[-1].startswith(b"--"), "multipart body lacks the closing delimiter")
    for piece in pieces[1:-1]:
        check(piece.startswith(b"\r\n"), "part does not start with CRLF")
        head, _, data = piece[2:].partition(b"\r\n\r\n")
        check(data.endswith(b"\r\n"), "part does not end with CRLF")
        hdrs = {}
        for line in head.decode().split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        parts.append((hdrs, data[:-2]))
    return parts


def tag_value(ds_json, tag):
    """First Value of a tag in a DICOM JSON object, or None."""
    el = ds_json.get(tag)
    if not el or "Value" not in el or not el["Value"]:
        return None
    return el["Value"][0]


# ---------------------------------------------------------------------------
# A minimal raw DICOM SCU (PS3.8 upper layer by hand), for sending what
# DCMTK's storescu refuses to send: truncated and garbage datasets. Only the
# test needs it; products talk through DCMTK.

import struct

IMPLICIT_LE = "1.2.840.10008.1.2"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _uid(u):
    b = u.encode()
    return b + (b"\0" if len(b) % 2 else b"")


def _item(t, payload):
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def _elem_le(group, elem, value):
    if isinstance(value, int):
        value = struct.pack("<H", value)
    elif isinstance(value, str):
        value = _uid(value)
    return struct.pack("<HHI", group, elem, len(value)) + value


class RawAssociationRejected(Exception):
    pass


class RawScu:
    def __init__(self, port, called_ae, calling_ae="RAWSCU", sop_class=CT_STORAGE, ts=IMPLICIT_LE):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sop_class = sop_class
        items = _item(0x10, b"1.2.840.10008.3.1.1.1")
        pc = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, sop_class.encode()) + _item(0x40, ts.encode())
        items += _item(0x20, pc)
        items += _item(0x50, _item(0x51, struct.pack(">I", 65536)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
        body = struct.pack(">HH", 1, 0) + called_ae.ljust(16).encode() + calling_ae.ljust(16).encode() + b"\0" * 32 + items
        self.sock.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        t, payload = self._read_pdu()
        if t != 2:
            raise RawAssociationRejected(f"association not accepted (PDU type {t})")
        # Check the presentation context result (0 = acceptance).
        off = 68
        self.accepted = False
        while off < len(payload):
            it, _, ln = struct.unpack(">BBH", payload[off:off + 4])
            if it == 0x21 and payload[off + 6] == 0:
                self.accepted = True
            off += 4 + ln

    def _recv(self, n):
        b = b""
        while len(b) < n:
            c = self.sock.recv(n - len(b))
            if not c:
                raise ConnectionError("peer closed the connection")
            b += c
        return b

    def _read_pdu(self):
        t, _, ln = struct.unpack(">BBI", self._recv(6))
        return t, self._recv(ln)

    def _pdata(self, ctrl, data):
        pdv = struct.pack(">IBB", len(data) + 2, 1, ctrl) + data
        self.sock.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)

    def c_store(self, sop_uid, dataset_bytes, msg_id=1):
        """Sends one C-STORE; returns the response status (int), or None if the peer aborted."""
        cmd = (_elem_le(0, 0x0002, self.sop_class) + _elem_le(0, 0x0100, 0x0001) +
               _elem_le(0, 0x0110, msg_id) + _elem_le(0, 0x0700, 0) + _elem_le(0, 0x0800, 0) +
               _elem_le(0, 0x1000, sop_uid))
        cmd = _elem_le(0, 0x0000, struct.pack("<I", len(cmd))) + cmd
        try:
            self._pdata(0x03, cmd)
            step = 16000
            for i in range(0, max(len(dataset_bytes), 1), step):
                last = i + step >= len(dataset_bytes)
                self._pdata(0x02 if last else 0x00, dataset_bytes[i:i + step])
            while True:
                t, payload = self._read_pdu()
                if t in (6, 7):          # release-rp / abort
                    return None
                if t != 4:
                    continue
                data = payload[6:]
                off = 0
                while off + 8 <= len(data):
                    g, e, ln = struct.unpack("<HHI", data[off:off + 8])
                    if (g, e) == (0, 0x0900):
                        return struct.unpack("<H", data[off + 8:off + 10])[0]
                    off += 8 + ln
        except (ConnectionError, OSError, struct.error):
            return None

    def release(self):
        try:
            self.sock.sendall(struct.pack(">BBIHH", 5, 0, 4, 0, 0))
            self._read_pdu()
        except (ConnectionError, OSError, struct.error):
            pass
        self.sock.close()


def dataset_bytes_implicit(path):
    """The dataset of a Part 10 file re-encoded as Implicit VR Little Endian, without meta."""
    import pydicom
    return dataset_to_implicit(pydicom.dcmread(path))


def dataset_to_implicit(ds):
    """Encodes a pydicom dataset as Implicit VR Little Endian bytes (no meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = True
    ds.is_little_endian = True
    ds.is_implicit_VR = True
    write_dataset(buf, ds)
    return buf.getvalue()
