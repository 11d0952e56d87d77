#!/usr/bin/python3
"""test_scaleout.py - two yunying-cloud nodes behind nginx share one index and one
archive (issue 4; R-1.4, R-3.3; ARCHITECTURE.md "Embedded default and scale-out").

Real peers: two yunying-cloud processes, a private nginx balancer
(tests/infra/nginx.sh: TLS terminated and re-encrypted to the nodes,
per-request round robin), one yunying-edge, DCMTK's storescu as the modality,
tests/integration/faultproxy.py to slow the edge's link, and the index and
archive servers chosen below.

  upload_spreads_over_both_nodes   a 300-slice CT: the chunks of one upload are served by
                                   both nodes, both commit, every instance hash-verifies
                                   (index vs edge, WADO-RS through the balancer, S3 objects);
                                   with S3 no staged chunk is left in the bucket
  node_sigkilled_mid_upload        a second 300-slice CT; one node is SIGKILLed mid-upload
                                   while a request body is half-way to it (nginx reaches that
                                   node through a FaultProxy that holds its bytes): nothing
                                   lost, nothing duplicated, the spool drains through the
                                   survivor; the node restarts and rejoins the rotation
  qido_wado_through_the_balancer   QIDO at three levels and WADO-RS/URI via nginx
  session_is_shared_by_the_nodes   a login on node A is valid on node B; logout on B ends it on A
  add_a_node_without_stopping      a third node joins (nginx reload) while clients keep
                                   querying: no request fails, the new node serves
  nodes_and_edge_stop_cleanly      SIGTERM: exit 0, no sanitizer report in any node's log

Backends: this script is the scale-out test, so it runs on PostgreSQL + S3 whatever
YY_INDEX/YY_BACKEND say (tests/run-all.sh sets those for the other scripts). Switches
for development:
  YY_SCALEOUT_INDEX   pg (default: a fresh database in yyharness's cluster, reused with
                      $YY_PG_DIR) | sqlite (one file shared by the nodes: WAL, one machine)
  YY_SCALEOUT_ARCHIVE s3 (default; yyharness's Swift, reused with $YY_SWIFT_DIR) |
                      dir (one shared directory)
  YY_SCALEOUT_SLICES  CT slices per upload (default 300).

Staging follows the archive, as docs/cloud.md "Scale-out" requires: with S3 the
chunks of uploads in progress live in the bucket, so every node has its own local
ingest.staging_dir (scratch only) - one upload's chunks land on both nodes and either
commits them; with the "dir" archive the chunks are files in ingest.staging_dir,
so the nodes share one.

Prints "N passed, N failed" last.
"""
import atexit
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yyharness as h  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

NGINX_SH = os.path.join(h.TOP, "tests", "infra", "nginx.sh")
SLICES = int(os.environ.get("YY_SCALEOUT_SLICES", "300"))
ARCHIVE = os.environ.get("YY_SCALEOUT_ARCHIVE", "s3")
STAGING = "node" if ARCHIVE == "s3" else "shared"   # see the module doc
ACCEPT_DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Interrupted (timeout, ^C): still stop every process this script started.
atexit.register(h._cleanup_all)
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: sys.exit(128 + signum))

CHUNK_PUT = re.compile(r'"PUT /api/v1/objects/([0-9a-f]{64})/chunks/\d+ HTTP/1\.1" (\d+) \d+ '
                       r'up=([^ ]+) ')


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def sha256_file(path):
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            d.update(b)
    return d.hexdigest()


# ---------------------------------------------------------------- index backend

class Index:
    """The shared index: a fresh PostgreSQL database (yyharness: the script's
    cluster, or the run's with $YY_PG_DIR) or one SQLite file."""

    def __init__(self):
        self.kind = os.environ.get("YY_SCALEOUT_INDEX", "pg")
        if self.kind == "sqlite":
            self.path = os.path.join(h.tempdir("yy-so-index-"), "index.db")
            self.url = None
            self.cfg = {"path": self.path}
        elif self.kind == "pg":
            self.url = h.pg_create_database()
            self.cfg = {"url": self.url}
        else:
            raise AssertionError(f"YY_SCALEOUT_INDEX={self.kind!r}: use pg or sqlite")

    def rows(self, sql, *args):
        """Runs a read-only query ("?" placeholders) on either engine."""
        if self.url:
            con = h.PgIndex(self.url)
        else:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return [tuple(r) for r in con.execute(sql, args).fetchall()]
        finally:
            con.close()


# ---------------------------------------------------------------- cluster

class Node:
    """One yunying-cloud process of the cluster (its own port and log)."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.dir = os.path.join(cluster.dir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = h.free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.addr = f"127.0.0.1:{self.port}"
        self.lb_addr = self.addr     # what nginx connects to (a FaultProxy for a fronted node)
        self.front = None
        cfg = json.loads(json.dumps(cluster.base_cfg))
        cfg["http"]["port"] = self.port
        if STAGING == "node":
            cfg["ingest"]["staging_dir"] = os.path.join(self.dir, "staging")
        self.config = h.write_json(os.path.join(self.dir, "cloud.json"), cfg)
        self.logs = []
        self.daemon = None

    def start(self):
        log = os.path.join(self.dir, f"cloud-{time.monotonic_ns()}.log")
        self.logs.append(log)
        self.daemon = h.Daemon([h.CLOUD_BIN, "--config", self.config], "yunying-cloud: listening",
                               log)
        return self

    def kill9(self):
        self.daemon.kill9()

    def stop(self):
        return self.daemon.stop()

    def log_text(self):
        text = ""
        for p in self.logs:
            with open(p, "rb") as f:
                text += f.read().decode(errors="replace")
        return text

    def session(self):
        return h.HttpSession(self.url, h.Cloud.USER, h.Cloud.PASSWORD)


class Cluster:
    """N nodes on one index and one archive, an nginx balancer, one edge id and one user."""

    EDGE_ID = "edge-scale"

    def __init__(self, nodes=2):
        self.dir = h.tempdir("yy-so-")
        self.index = Index()
        ca = h.test_ca()
        self.ca = ca
        shared = os.path.join(self.dir, "shared")
        # archive.dir: with S3 the local cache. The index records paths under
        # archive.dir, so every node needs the same archive.dir path (on one
        # machine: the same directory). Staging: per node with S3, else shared
        # (see the module doc).
        self.archive_dir = os.path.join(shared, "archive")
        cfg = {
            "log": {"level": "info"},
            "http": {"bind": "127.0.0.1", "port": 0,
                     "web_root": os.path.join(h.TOP, "cloud", "web", "dist"),
                     "tls_cert_file": os.path.join(ca, "server.pem"),
                     "tls_key_file": os.path.join(ca, "server.key")},
            "index": dict(self.index.cfg),
            "archive": {"dir": self.archive_dir},
            "ingest": {"staging_dir": os.path.join(shared, "staging")},
        }
        self.s3_prefix = None
        if ARCHIVE == "s3":
            sw = h.swift()
            self.s3_prefix = f"so{os.getpid()}-{time.monotonic_ns()}/"
            cfg["archive"].update({
                "backend": "s3", "s3_endpoint": sw["YY_S3_ENDPOINT"],
                "s3_region": sw["YY_S3_REGION"], "s3_bucket": sw["YY_S3_BUCKET"],
                "s3_access_key": sw["YY_S3_ACCESS_KEY"], "s3_secret_file": sw["YY_S3_SECRET_FILE"],
                "s3_prefix": self.s3_prefix})
        elif ARCHIVE != "dir":
            raise AssertionError(f"YY_SCALEOUT_ARCHIVE={ARCHIVE!r}: use s3 or dir")
        self.base_cfg = cfg
        self.nodes = [Node(self, f"node{chr(ord('a') + i)}") for i in range(nodes)]
        first = self.nodes[0]
        self.secret = self.admin(first, "edge-add", "--id", self.EDGE_ID).strip().splitlines()[-1]
        h.check(len(self.secret) == 64, f"edge-add printed {self.secret!r}")
        self.admin(first, "user-add", "--user", h.Cloud.USER, "--password", h.Cloud.PASSWORD,
                   "--role", "doctor")
        for n in self.nodes:
            n.start()
        # The second node is reached through a TCP proxy, so that a test can hold
        # requests in flight to it (stall) and kill the node under them.
        victim = self.nodes[1]
        victim.front = FaultProxy(victim.port)
        atexit.register(victim.front.close)
        victim.lb_addr = f"127.0.0.1:{victim.front.port}"
        self.lb_dir = tempfile.mkdtemp(prefix="yy-so-lb-")
        atexit.register(self._lb_stop)
        env = self._lb("start", [n.lb_addr for n in self.nodes])
        self.lb_url = env["YY_LB_URL"]
        self.access_log = env["YY_LB_ACCESS_LOG"]
        h.check(self.lb_url.startswith("https://"), f"balancer URL {self.lb_url}")

    @staticmethod
    def admin(node, *args):
        r = subprocess.run([h.CLOUD_BIN, args[0], "--config", node.config, *args[1:]],
                           capture_output=True, text=True, timeout=600)
        h.check(r.returncode == 0, f"yunying-cloud {args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def _lb(self, cmd, addrs):
        argv = ["sh", NGINX_SH, cmd, self.lb_dir,
                "--cert", os.path.join(self.ca, "server.pem"),
                "--key", os.path.join(self.ca, "server.key"),
                "--upstream-ca", os.path.join(self.ca, "ca.pem"), "--upstream-name", "localhost",
                *addrs]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        h.check(r.returncode == 0, f"nginx.sh {cmd}: {r.stderr[-3000:]}")
        return dict(line.split("=", 1) for line in r.stdout.split() if "=" in line)

    def lb_reload(self, nodes):
        self._lb("reload", [n.lb_addr for n in nodes])

    def _lb_stop(self):
        subprocess.run(["sh", NGINX_SH, "stop", self.lb_dir], capture_output=True, timeout=60)
        shutil.rmtree(self.lb_dir, ignore_errors=True)

    def access_lines(self, start=0):
        with open(self.access_log, "rb") as f:
            return f.read().decode(errors="replace").splitlines()[start:]

    def session(self):
        return h.HttpSession(self.lb_url, h.Cloud.USER, h.Cloud.PASSWORD)

    def object_key(self, path):
        rel = os.path.relpath(path, self.archive_dir)
        h.check(not rel.startswith(".."), f"archive path {path} not under {self.archive_dir}")
        return self.s3_prefix + rel


class SpoolEdge(h.Edge):
    """yyharness.Edge with a status page and a view of its spool."""

    def __init__(self, cloud_url, cluster, upload=None):
        self.status_port = h.free_port()
        super().__init__(cloud_url=cloud_url, secret=cluster.secret, edge_id=cluster.EDGE_ID,
                         extra={"upload": dict({"timeout_ms": 10000, "retry_max_ms": 1000},
                                               **(upload or {})),
                                "spool": {"min_free_mb": 0},
                                "status": {"bind": "127.0.0.1", "port": self.status_port}})
        self.db = os.path.join(self.dir, "spool", "spool.db")

    def rows(self, study_uid=None):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute("SELECT sop_uid, state, xxh128, path, up_sha256, up_path, up_kind"
                               " FROM instances ORDER BY id").fetchall()
        finally:
            con.close()

    def counts(self, sops=None):
        c = {"PENDING": 0, "UPLOADING": 0, "DONE": 0, "FAILED": 0}
        for r in self.rows():
            if sops is None or r[0] in sops:
                c[r[1]] += 1
        return c

    def status(self):
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status.json",
                                    timeout=10) as r:
            return json.loads(r.read())


def gen_ct(seed, pid, name):
    out = h.tempdir("yy-so-data-")
    ms = h.generate(out, "--only", "ct", "--ct-slices", str(SLICES), "--seed", str(seed),
                    "--patient-id", pid, "--patient-name", name, "--study-date", "20260420",
                    "--accession", f"ACC-{pid}", "--quiet")
    m = list(ms.values())[0]
    files = h.manifest_files(m)
    h.eq(len(files), SLICES, "generated slices")
    return m, files


def sop_uids(files):
    import pydicom
    return {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}


def store_all(edge, files):
    r = h.storescu(edge.ae, edge.port, files, extra=("-aet", "MODALITY"), timeout=900)
    h.eq(r.returncode, 0, f"storescu: {r.stderr[-2000:]}")


def verify_exactly_once(cl, edge, study_uid, sent):
    """Every sent instance is indexed once, byte-identical to what the edge uploaded,
    and its archived object (S3, or the shared directory) has the indexed hash; the
    archive holds nothing else for the study (no orphan or duplicate copies)."""
    rows = cl.index.rows("SELECT sop_uid, path, sha256, size FROM instances WHERE study_uid = ?",
                         study_uid)
    conflicts = int(cl.index.rows("SELECT count(*) FROM conflicts")[0][0])
    h.eq(conflicts, 0, "conflicts in the index")
    got = [r[0] for r in rows]
    h.eq(len(got), len(set(got)), "duplicate SOP Instance UIDs in the index")
    h.eq(set(got), set(sent), "indexed instances vs sent")
    spool = {r[0]: r for r in edge.rows() if r[0] in sent}
    for sop, r in spool.items():
        h.eq(r[1], "DONE", f"spool state of {sop}")
    by_sop = {r[0]: r for r in rows}
    for sop, r in spool.items():
        h.eq(by_sop[sop][2], r[4], f"index hash of {sop} vs the hash the edge uploaded")
        h.eq(sha256_file(r[5]), r[4], f"edge's uploaded file {sop}")
    if ARCHIVE == "s3":
        keys = h.s3_list(cl.s3_prefix)
        want = {cl.object_key(r[1]): int(r[3]) for r in rows}
        study_dirs = {k.rsplit("/", 2)[0] for k in want}
        in_study = {k: v for k, v in keys.items() if k.rsplit("/", 2)[0] in study_dirs}
        h.eq(set(in_study), set(want), "objects of the study in the bucket vs the index")
        for k, size in want.items():
            h.eq(keys[k], size, f"size of {k}")
        # Bytes of every object (one curl each; a few seconds for 300).
        for r in rows:
            body = h.s3_get(cl.object_key(r[1]))
            h.eq(sha256_bytes(body), r[2], f"sha256 of the object of {r[0]}")
    else:
        for r in rows:
            h.eq(sha256_file(r[1]), r[2], f"sha256 of the archived file of {r[0]}")
    return by_sop


def wado_series_hashes(sess, study_uid, index_rows):
    """WADO-RS of the whole series through the balancer: every part equals the indexed bytes."""
    import pydicom
    series = sess.get_json(f"/dicomweb/studies/{study_uid}/series")
    h.eq(len(series), 1, "series of the CT")
    se = h.tag_value(series[0], "0020000E")
    hd, body = sess.get(f"/dicomweb/studies/{study_uid}/series/{se}",
                        headers={"Accept": ACCEPT_DICOM_ANY})
    parts = h.parse_multipart(hd["Content-Type"], body)
    h.eq(len(parts), len(index_rows), "instances in the series retrieve")
    for _, data in parts:
        sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        h.eq(sha256_bytes(data), index_rows[sop][2], f"WADO-RS bytes of {sop}")
    return se


def chunk_spread(lines):
    """{object id: set of nodes that stored one of its chunks} from access-log lines."""
    spread = {}
    for ln in lines:
        m = CHUNK_PUT.search(ln)
        if m and m.group(2) == "204":
            # up= lists every node tried ("A, B"); the last one answered.
            spread.setdefault(m.group(1), set()).add(m.group(3).split(",")[-1].strip())
    return spread


# ---------------------------------------------------------------- the cluster of the script

_env = {}


def env():
    if not _env:
        cl = Cluster(nodes=2)
        proxy = FaultProxy(int(cl.lb_url.rsplit(":", 1)[1]))
        atexit.register(proxy.close)
        # Small chunks: every object has several, so one object's chunks alternate nodes.
        edge = SpoolEdge(f"https://127.0.0.1:{proxy.port}", cl,
                         upload={"chunk_size": 262144, "parallel": 4})
        _env.update(cl=cl, proxy=proxy, edge=edge, session=cl.session())
        print(f"    cluster: index={cl.index.kind} archive={ARCHIVE} staging={STAGING} "
              f"nodes={[n.addr for n in cl.nodes]} balancer={cl.lb_url}", flush=True)
    return _env


def in_flight_bytes(front):
    """Bytes held by a stalled FaultProxy on their way to the node."""
    with front.lock:
        return max((len(p[2]) for p in front.pairs), default=0)


def lb_reaches(cl, sess, node):
    """One query through the balancer: True when node answered it."""
    mark = len(cl.access_lines())
    sess.get_json("/dicomweb/studies?limit=1")
    return any(node.lb_addr in ln.split("up=", 1)[1].split(" ", 1)[0]
               for ln in cl.access_lines(mark) if "up=" in ln)


def study_count(sess, study_uid):
    res = sess.get_json(f"/dicomweb/studies?StudyInstanceUID={study_uid}&includefield=00201208")
    return int(h.tag_value(res[0], "00201208") or 0) if res else 0


@h.test
def upload_spreads_over_both_nodes():
    e = env()
    cl, edge, sess = e["cl"], e["edge"], e["session"]
    m, files = gen_ct(41, "YYSO01", "Zhang^San")
    sent = sop_uids(files)
    mark = len(cl.access_lines())
    store_all(edge, files)
    h.wait_until(lambda: edge.counts(sent)["DONE"] == SLICES, timeout=600,
                 what=f"spool drained ({SLICES} DONE)")
    h.eq(edge.counts(sent), {"PENDING": 0, "UPLOADING": 0, "DONE": SLICES, "FAILED": 0}, "spool")
    h.wait_until(lambda: study_count(sess, m["study_uid"]) == SLICES, timeout=60,
                 what="the study indexed")
    lines = cl.access_lines(mark)
    spread = chunk_spread(lines)
    addrs = {n.lb_addr for n in cl.nodes}
    served = set().union(*spread.values()) if spread else set()
    h.eq(served, addrs, "nodes that stored chunks")
    split = [o for o, s in spread.items() if len(s) > 1]
    h.check(split, "no upload had chunks on both nodes")
    # Both nodes committed objects (their own logs say so).
    for n in cl.nodes:
        h.check(re.search(r"commit (bundle )?object=", n.log_text()), f"{n.name} committed nothing")
    by_sop = verify_exactly_once(cl, edge, m["study_uid"], sent)
    wado_series_hashes(sess, m["study_uid"], by_sop)
    if ARCHIVE == "s3":
        # Chunks were staged in the bucket (no node-local staging directory holds
        # any) and every commit deleted its own.
        for n in cl.nodes:
            local = os.path.join(n.dir, "staging")
            h.eq([d for d in os.listdir(local) if not d.startswith(".")], [],
                 f"chunk directories in {n.name}'s local staging")
        h.eq(h.s3_list(cl.s3_prefix + "staging/"), {}, "staged chunks left in the bucket")
    print(f"    {len(spread)} objects, {len(split)} with chunks on both nodes; "
          f"{sum(1 for ln in lines if 'up=' in ln)} requests through the balancer", flush=True)


@h.test
def node_sigkilled_mid_upload():
    e = env()
    cl, edge, proxy, sess = e["cl"], e["edge"], e["proxy"], e["session"]
    m, files = gen_ct(42, "YYSO02", "Li^Si")
    sent = sop_uids(files)
    victim, survivor = cl.nodes[1], cl.nodes[0]
    mark = len(cl.access_lines())
    proxy.rate(3 << 20)          # slow the link so the kill lands mid-upload
    store_all(edge, files)
    h.wait_until(lambda: edge.counts(sent)["DONE"] >= SLICES // 10, timeout=600,
                 what="a tenth of the second CT uploaded")
    # Hold the bytes going to the victim until a request body is half-way there,
    # then kill it: requests are in flight on the node when it dies.
    victim.front.stall()
    h.wait_until(lambda: in_flight_bytes(victim.front) >= 16384, timeout=60,
                 what="a request body in flight to the victim")
    victim.kill9()
    at_kill = edge.counts(sent)
    victim.front.resume()
    proxy.rate(0)
    h.check(at_kill["DONE"] < SLICES, "the upload finished before the kill: test too weak")
    h.wait_until(lambda: edge.counts(sent)["DONE"] == SLICES, timeout=600,
                 what="spool drained through the surviving node")
    h.eq(edge.counts(sent), {"PENDING": 0, "UPLOADING": 0, "DONE": SLICES, "FAILED": 0}, "spool")
    h.wait_until(lambda: study_count(sess, m["study_uid"]) == SLICES, timeout=60,
                 what="the study indexed")
    by_sop = verify_exactly_once(cl, edge, m["study_uid"], sent)
    wado_series_hashes(sess, m["study_uid"], by_sop)
    lines = cl.access_lines(mark)
    after = [ln for ln in lines if "up=" in ln][-20:]
    h.check(all(survivor.lb_addr in ln.split("up=", 1)[1] for ln in after),
            "the last requests were served by the survivor")
    failed = sum(1 for ln in lines if " 502 " in ln or " 504 " in ln)
    retried = sum(1 for ln in lines if re.search(r"up=[^ ]+, ", ln))
    h.check(failed + retried >= 1, "no request was cut by the kill: test too weak")
    print(f"    killed {victim.name} at {at_kill}; balancer answered 502/504 {failed}x, "
          f"retried on the other node {retried}x; edge errors {edge.status().get('errors')}",
          flush=True)
    # The node comes back (stateless: same config) and serves again.
    victim.start()
    vs = victim.session()
    h.eq(study_count(vs, m["study_uid"]), SLICES, "the restarted node sees the study")
    # nginx tries it again after fail_timeout (5 s): wait until it is back in the rotation.
    h.wait_until(lambda: lb_reaches(cl, sess, victim), timeout=60, interval=0.5,
                 what=f"{victim.name} back behind the balancer")


@h.test
def qido_wado_through_the_balancer():
    e = env()
    cl, sess = e["cl"], e["session"]
    res = sess.get_json("/dicomweb/studies?PatientID=YYSO01")
    h.eq(len(res), 1, "QIDO PatientID")
    study = h.tag_value(res[0], "0020000D")
    h.eq(len(sess.get_json("/dicomweb/studies?PatientName=zhang*")), 1, "QIDO name wildcard")
    h.eq(len(sess.get_json("/dicomweb/studies?StudyDate=20260401-20260430")), 2, "QIDO dates")
    series = sess.get_json(f"/dicomweb/studies/{study}/series")
    se = h.tag_value(series[0], "0020000E")
    inst = sess.get_json(f"/dicomweb/studies/{study}/series/{se}/instances")
    h.eq(len(inst), SLICES, "QIDO instances of the series")
    rows = {r[0]: r for r in cl.index.rows(
        "SELECT sop_uid, path, sha256 FROM instances WHERE study_uid = ?", study)}
    # Each WADO request is balanced on its own: both nodes answer some of them.
    mark = len(cl.access_lines())
    for x in inst[:12]:
        sop = h.tag_value(x, "00080018")
        hd, body = sess.get(f"/dicomweb/studies/{study}/series/{se}/instances/{sop}",
                            headers={"Accept": ACCEPT_DICOM_ANY})
        parts = h.parse_multipart(hd["Content-Type"], body)
        h.eq(sha256_bytes(parts[0][1]), rows[sop][2], f"WADO-RS instance {sop}")
        q = urllib.parse.urlencode({"requestType": "WADO", "studyUID": study, "seriesUID": se,
                                    "objectUID": sop, "contentType": "application/dicom",
                                    "transferSyntax": "*"})
        _, body = sess.get(f"/wado?{q}")
        h.check(body[128:132] == b"DICM", f"WADO-URI {sop} is a DICOM file")
    ups = {ln.split("up=", 1)[1].split(" ", 1)[0] for ln in cl.access_lines(mark)
           if "/dicomweb/" in ln or "/wado" in ln}
    h.check(len(ups) >= 2, f"WADO requests were served by one node only: {ups}")


@h.test
def session_is_shared_by_the_nodes():
    e = env()
    cl = e["cl"]
    a, b = cl.nodes[0], cl.nodes[1]
    sa = a.session()
    token = next(c.value for c in sa.jar if c.name == "yy_session")
    sb = h.HttpSession(b.url)
    st, _, body = sb.request("GET", "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    h.eq(st, 200, f"node B accepts node A's session: {body[:200]!r}")
    st, _, _ = sb.request("GET", "/dicomweb/studies?PatientID=YYSO01",
                          headers={"Authorization": f"Bearer {token}"})
    h.eq(st, 200, "QIDO on node B with node A's session")
    st, _, _ = sb.request("POST", "/api/v1/logout", body=b"",
                          headers={"Authorization": f"Bearer {token}"})
    h.check(st in (200, 204), f"logout on node B: {st}")
    st, _, _ = sa.request("GET", "/api/v1/me")
    h.eq(st, 401, "node A after the logout on node B")


@h.test
def add_a_node_without_stopping():
    e = env()
    cl = e["cl"]
    sess = cl.session()
    new = Node(cl, "nodec").start()
    stop = threading.Event()
    results = []

    def client():
        s = cl.session()
        while not stop.is_set():
            st, _, _ = s.request("GET", "/dicomweb/studies?PatientID=YYSO01")
            results.append(st)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    h.wait_until(lambda: len(results) >= 10, timeout=60, what="queries before the reload")
    mark = len(cl.access_lines())
    cl.lb_reload([*(n for n in cl.nodes if n.daemon and n.daemon.alive()), new])
    h.wait_until(lambda: any(new.lb_addr in ln for ln in cl.access_lines(mark)), timeout=60,
                 what="the new node serving through the balancer")
    n_at = len(results)
    h.wait_until(lambda: len(results) >= n_at + 20, timeout=60, what="queries after the reload")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    bad = [s for s in results if s != 200]
    h.eq(bad, [], f"failed queries during the reload (of {len(results)})")
    h.eq(len(sess.get_json("/dicomweb/studies?PatientID=YYSO02")), 1, "query after the reload")
    cl.nodes.append(new)


@h.test
def nodes_and_edge_stop_cleanly():
    e = env()
    cl, edge = e["cl"], e["edge"]
    h.eq(edge.stop(), 0, "edge exit code")
    for n in cl.nodes:
        if n.daemon and n.daemon.alive():
            h.eq(n.stop(), 0, f"{n.name} exit code (66: a sanitizer report)")
        log = n.log_text()
        h.check("AddressSanitizer" not in log and "runtime error" not in log,
                f"sanitizer report in {n.name}'s log")


if __name__ == "__main__":
    h.run()
