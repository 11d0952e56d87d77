#!/usr/bin/python3
"""test_edge_scp.py - yunying-edge's DICOM side and spool, with DCMTK as the peer.

Runs the real yunying-edge from $YY_BUILD. Most tests point the uploader at a
closed port (nothing is uploaded, rows stay in the spool); the last ones use
a real yunying-cloud. Bad input (garbage data sets, UID mismatches) is sent
by a minimal DICOM SCU written here, because storescu refuses to send it.

Tags: needs-dcmtk. Prints "N passed, N failed" last.
"""
import glob
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yyharness as h  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DUMMY_SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

_data = {}


def data():
    """Generated studies (once per run): a 20-slice CT, a DX, an XA and the odd corpus."""
    if not _data:
        out = h.tempdir("yy-edge-data-")
        h.generate(out, "--only", "ct,dr,xa,corpus", "--ct-slices", "20", "--quiet")
        _data["ct"] = sorted(glob.glob(os.path.join(out, "ct_*", "*.dcm")))
        _data["dr"] = sorted(glob.glob(os.path.join(out, "dr_*", "*.dcm")))
        _data["xa"] = sorted(glob.glob(os.path.join(out, "xa_*", "*.dcm")))
        _data["corpus"] = sorted(glob.glob(os.path.join(out, "corpus", "*.dcm")))
        _data["dir"] = out
        h.check(len(_data["ct"]) == 20, f"expected 20 CT files, got {len(_data['ct'])}")
    return _data


def offline_edge(**extra):
    """An edge whose cloud is a closed port: received instances stay spooled.

    JPEG-LS preparation is off: these tests look at what the SCP alone leaves
    in the spool (tmp/ must be empty after each store), and the background
    transcoder also works in tmp/. Compression is tested in test_skeleton.py,
    test_edge_resilience.py and the browser tests.
    """
    extra = dict(extra)
    extra["upload"] = {"compress": False, **extra.get("upload", {})}
    return h.Edge(cloud_url=f"http://127.0.0.1:{h.free_port()}", secret=DUMMY_SECRET,
                  edge_id="edge-offline", ae="YY_EDGE", extra=extra)


def rows(edge):
    db = os.path.join(edge.dir, "spool", "spool.db")
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("SELECT id, sop_uid, study_uid, series_uid, xxh128, size, path, state,"
                           " attempts, last_error FROM instances ORDER BY id").fetchall()
    finally:
        con.close()


def objects_written(edge, timeout=30):
    """Waits until every row's object file is whole: an instance kept in
    memory at receipt has its file written by the spool's writer thread
    just after its acknowledgement."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in rows(edge)
                   if not os.path.exists(r[6]) or os.path.getsize(r[6]) != r[5]]
        if not missing or time.monotonic() > deadline:
            h.eq(missing, [], "object files written")
            return
        time.sleep(0.05)


def tmp_files(edge):
    return os.listdir(os.path.join(edge.dir, "spool", "tmp"))


def sop_uid_of(path):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


# ---------------------------------------------------------------- raw SCU

def _item(t, payload):
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def _elem(group, elem, value):
    if isinstance(value, int):
        v = struct.pack("<H", value)
    else:
        v = value.encode() if isinstance(value, str) else value
        if len(v) % 2:
            v += b"\0"
    return struct.pack("<HHI", group, elem, len(v)) + v


def _command(sop_class, sop_uid, msg_id=1):
    body = (_elem(0, 0x0002, sop_class) + _elem(0, 0x0100, 0x0001) + _elem(0, 0x0110, msg_id)
            + _elem(0, 0x0700, 0) + _elem(0, 0x0800, 0x0000) + _elem(0, 0x1000, sop_uid))
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


class RawSCU:
    """Just enough of PS3.8 to send one C-STORE with arbitrary data set bytes."""

    def __init__(self, port, called_ae="YY_EDGE", ts=EXPLICIT_LE, sop_class=CT_STORAGE):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pc = (struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, sop_class.encode())
              + _item(0x40, ts.encode()))
        user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4.5.6.7")
        body = (struct.pack(">HH", 1, 0) + called_ae.ljust(16).encode()
                + b"RAWSCU".ljust(16) + b"\0" * 32
                + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, pc) + _item(0x50, user))
        self._send_pdu(0x01, body)
        t, payload = self._recv_pdu()
        if t != 0x02:
            raise AssertionError(f"association not accepted (PDU type {t:#x})")
        self.pcid = self._accepted_pc(payload)

    def _send_pdu(self, t, body):
        self.s.sendall(struct.pack(">BBI", t, 0, len(body)) + body)

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise AssertionError("connection closed by the SCP")
            buf += chunk
        return buf

    def _recv_pdu(self):
        t, _, n = struct.unpack(">BBI", self._recv_exact(6))
        return t, self._recv_exact(n)

    @staticmethod
    def _accepted_pc(payload):
        i = 68
        while i + 4 <= len(payload):
            t, _, n = struct.unpack(">BBH", payload[i:i + 4])
            if t == 0x21 and payload[i + 6] == 0:
                return payload[i + 4]
            i += 4 + n
        raise AssertionError("presentation context not accepted")

    def _pdata(self, data, command, maxlen=16000):
        frags = [data[i:i + maxlen] for i in range(0, len(data), maxlen)] or [b""]
        for k, frag in enumerate(frags):
            ctrl = (1 if command else 0) | (2 if k == len(frags) - 1 else 0)
            pdv = struct.pack(">IBB", len(frag) + 2, self.pcid, ctrl) + frag
            self._send_pdu(0x04, pdv)

    def store(self, sop_uid, dataset, sop_class=CT_STORAGE):
        """Sends one C-STORE-RQ; returns the response status."""
        self._pdata(_command(sop_class, sop_uid), True)
        self._pdata(dataset, False)
        cmd = b""
        while True:
            t, payload = self._recv_pdu()
            if t != 0x04:
                raise AssertionError(f"expected P-DATA, got PDU type {t:#x}")
            i = 0
            last = False
            while i < len(payload):
                n, = struct.unpack(">I", payload[i:i + 4])
                cmd += payload[i + 6:i + 4 + n]
                last = bool(payload[i + 5] & 2)
                i += 4 + n
            if last:
                break
        i = 0
        while i + 8 <= len(cmd):
            g, e, n = struct.unpack("<HHI", cmd[i:i + 8])
            if (g, e) == (0, 0x0900):
                return struct.unpack("<H", cmd[i + 8:i + 10])[0]
            i += 8 + n
        raise AssertionError("no status in C-STORE-RSP")

    def release(self):
        try:
            self._send_pdu(0x05, b"\0" * 4)
            self._recv_pdu()
        finally:
            self.s.close()


def dataset_bytes(path, ts=EXPLICIT_LE):
    """The data set of a Part 10 file (no meta header), encoded in ts."""
    import io
    import pydicom
    from pydicom.filewriter import write_dataset
    ds = pydicom.dcmread(path)
    buf = io.BytesIO()
    fp = pydicom.filebase.DicomFileLike(buf)
    fp.is_little_endian = True
    fp.is_implicit_VR = ts == IMPLICIT_LE
    write_dataset(fp, ds)
    return buf.getvalue()


def is_failure(status):
    return (status & 0xF000) in (0xA000, 0xC000)


# ---------------------------------------------------------------- tests

@h.test
def bad_config_names_the_key():
    d = h.tempdir()
    secret = os.path.join(d, "edge.secret")
    with open(secret, "w") as f:
        f.write("ab" * 32 + "\n")
    cases = [
        ({"upload": {"cloud_url": "https://cloud.example", "edge_id": "e", "secret_file": secret,
                     "proxy": "ftp://proxy.example:21"}}, "upload.proxy"),
        ({"spool": {"keep_days": -1}}, "spool.keep_days"),
        ({"scp": {"ae_titel": "X"}}, "scp.ae_titel"),
        ({"scp": {"port": 70000}}, "scp.port"),
        ({"scp": {"ae_title": "A" * 17}}, "scp.ae_title"),
        ({"spool": {"min_free_mb": -1}}, "spool.min_free_mb"),
        ({"upload": {"cloud_url": "ftp://x", "edge_id": "e", "secret_file": "/dev/null"}},
         "upload.cloud_url"),
        ({"upload": {"cloud_url": "http://x", "edge_id": "e", "secret_file": "/nonexistent"}},
         "upload.secret_file"),
        ({"bogus": {}}, "bogus"),
    ]
    for cfg, key in cases:
        path = h.write_json(os.path.join(d, "bad.json"), cfg)
        r = subprocess.run([h.EDGE_BIN, "--config", path], capture_output=True, text=True,
                           timeout=30)
        h.check(r.returncode != 0, f"{cfg}: exit 0")
        h.check(key in r.stderr, f"{cfg}: message does not name {key}: {r.stderr!r}")
        h.check("config:" in r.stderr, f"{cfg}: {r.stderr!r}")
    good = h.write_json(os.path.join(d, "good.json"), {"spool": {"dir": os.path.join(d, "s")}})
    r = subprocess.run([h.EDGE_BIN, "--config", good, "--check-config"], capture_output=True,
                       text=True, timeout=30)
    h.eq(r.returncode, 0, f"--check-config: {r.stderr}")
    r = subprocess.run([h.EDGE_BIN, "--config", good, "--dump-config"], capture_output=True,
                       text=True, timeout=30)
    h.eq(r.returncode, 0, "--dump-config")
    import json
    dumped = json.loads(r.stdout)
    h.eq(dumped["scp"]["ae_title"], "YUNYING", "default AE title")
    h.eq(dumped["spool"]["dir"], os.path.join(d, "s"), "spool.dir")


@h.test
def echo_and_wrong_called_ae():
    e = offline_edge()
    r = h.echoscu("YY_EDGE", e.port)
    h.eq(r.returncode, 0, f"echoscu: {r.stderr}")
    r = h.echoscu("NOT_OUR_AE", e.port)
    h.check(r.returncode != 0, "association with a wrong called AE was accepted")
    h.check("Called AE Title Not Recognized" in r.stderr, r.stderr)
    r = h.echoscu("YY_EDGE", e.port)
    h.eq(r.returncode, 0, "echo after a rejection")
    h.eq(e.stop(), 0, "edge exit code")


@h.test
def store_ct_is_spooled_durably():
    d = data()
    e = offline_edge()
    r = h.storescu("YY_EDGE", e.port, d["ct"])
    h.eq(r.returncode, 0, f"storescu: {r.stderr}")
    got = rows(e)
    h.eq(len(got), len(d["ct"]), "rows")
    objects_written(e)
    want = {sop_uid_of(p) for p in d["ct"]}
    h.eq({row[1] for row in got}, want, "SOP UIDs")
    import pydicom
    import xxhash
    for (_id, sop, study, series, xxh, size, path, state, _a, _e) in got:
        h.check(state in ("PENDING", "UPLOADING"), state)
        with open(path, "rb") as f:
            blob = f.read()
        h.eq(xxhash.xxh3_128_hexdigest(blob), xxh, "file checksum (XXH3-128, taken while received)")
        h.eq(len(blob), size, "file size")
        ds = pydicom.dcmread(path)
        h.eq(ds.SOPInstanceUID, sop, "stored SOP UID")
        h.eq(ds.StudyInstanceUID, study, "study UID")
        h.eq(ds.SeriesInstanceUID, series, "series UID")
    # pixel data identical to what was sent
    src = {sop_uid_of(p): p for p in d["ct"]}
    for row in got[:3]:
        a = pydicom.dcmread(row[6]).PixelData
        b = pydicom.dcmread(src[row[1]]).PixelData
        h.check(a == b, f"pixel data differs for {row[1]}")
    h.eq(tmp_files(e), [], "tmp/ after stores")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def other_modalities_and_transfer_syntaxes():
    d = data()
    e = offline_edge()
    r = h.storescu("YY_EDGE", e.port, d["dr"] + d["xa"])
    h.eq(r.returncode, 0, f"storescu DX/XA: {r.stderr}")
    # Implicit VR LE, and files compressed by DCMTK sent as they are.
    r = h.storescu("YY_EDGE", e.port, d["ct"][:1], extra=("-xi",))
    h.eq(r.returncode, 0, f"storescu implicit: {r.stderr}")
    tmp = h.tempdir()
    sent = {}
    for tool, opt, ts, src in (("dcmcjpls", "-xt", "1.2.840.10008.1.2.4.80", d["ct"][1]),
                               ("dcmcrle", "-xr", "1.2.840.10008.1.2.5", d["ct"][2]),
                               ("dcmcjpeg", "-xs", "1.2.840.10008.1.2.4.70", d["ct"][3])):
        out = os.path.join(tmp, tool + ".dcm")
        subprocess.run([tool, src, out], check=True, capture_output=True, timeout=120)
        r = h.storescu("YY_EDGE", e.port, [out], extra=("-R", opt))
        h.eq(r.returncode, 0, f"storescu {tool}: {r.stderr}")
        sent[ts] = out
    r = h.storescu("YY_EDGE", e.port, d["ct"][4:5], extra=("-R", "-xd"))
    h.eq(r.returncode, 0, f"storescu deflate: {r.stderr}")
    sent["1.2.840.10008.1.2.1.99"] = d["ct"][4]
    got = rows(e)
    h.eq(len(got), len(d["dr"]) + len(d["xa"]) + 5, "rows")
    import pydicom
    tss = {str(pydicom.dcmread(row[6], stop_before_pixels=True).file_meta.TransferSyntaxUID)
           for row in got}
    for ts in list(sent) + [IMPLICIT_LE]:
        h.check(ts in tss, f"{ts} not kept as received: {tss}")
    # compressed pixel data arrives byte for byte
    by_sop = {row[1]: row[6] for row in got}
    for ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"):
        a = pydicom.dcmread(sent[ts])
        b = pydicom.dcmread(by_sop[a.SOPInstanceUID])
        h.check(a.PixelData == b.PixelData, f"{ts}: pixel data changed")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def missing_study_uid_is_refused_and_scp_keeps_serving():
    import pydicom
    d = data()
    e = offline_edge()
    bad = os.path.join(h.tempdir(), "nostudy.dcm")
    ds = pydicom.dcmread(d["ct"][0])
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(bad)
    r = h.storescu("YY_EDGE", e.port, [bad], extra=("-v",))
    h.check(r.returncode != 0, f"no failure reported: {r.stderr}")
    h.check("cannotunderstand" in r.stderr.lower(), f"not C000: {r.stderr}")
    h.eq(rows(e), [], "rows after a refused instance")
    h.eq(tmp_files(e), [], "tmp/")
    r = h.storescu("YY_EDGE", e.port, d["ct"][:1])
    h.eq(r.returncode, 0, "store after refusal")
    h.eq(len(rows(e)), 1, "rows")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def garbage_truncated_and_mismatched_data_sets():
    d = data()
    e = offline_edge()
    good = dataset_bytes(d["ct"][0])
    sop = sop_uid_of(d["ct"][0])
    scu = RawSCU(e.port)
    refused = {}
    try:
        st = scu.store("1.2.3.4.5.1", bytes(range(256)) * 16)
        h.check(is_failure(st), f"garbage: status {st:#06x}")
        refused[st] = refused.get(st, 0) + 1
        st = scu.store(sop, good[:len(good) // 4 * 2])
        h.check(is_failure(st), f"truncated: status {st:#06x}")
        refused[st] = refused.get(st, 0) + 1
        st = scu.store("1.2.3.4.5.2", good)
        h.eq(st, 0xA900, "SOP Instance UID differs from the request")
        refused[st] = refused.get(st, 0) + 1
        st = scu.store(sop, good)      # the same association still works
        h.eq(st, 0x0000, "good data set after bad ones")
    finally:
        scu.release()
    got = rows(e)
    h.eq([r[1] for r in got], [sop], "only the good instance is spooled")
    h.eq(tmp_files(e), [], "tmp/")
    # The operator sees each refusal, by status (yunying-edge status).
    r = subprocess.run([h.EDGE_BIN, "status", "--config", e.config], capture_output=True,
                       text=True, timeout=30)
    h.eq(r.returncode, 0, f"yunying-edge status: {r.stderr}")
    line = next((x for x in r.stdout.splitlines() if x.startswith("refused (C-STORE):")), "")
    want = " ".join(f"{k:04X}={v}" for k, v in sorted(refused.items()))
    h.check(line.startswith(f"refused (C-STORE): {want}"), f"status shows {line!r}, want {want}")
    h.check("received:         1 instances" in r.stdout, f"received line: {r.stdout}")
    h.eq(h.echoscu("YY_EDGE", e.port).returncode, 0, "echo after bad input")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def corpus_of_odd_files_never_breaks_the_scp():
    d = data()
    e = offline_edge()
    # storescu skips files it cannot send; whatever arrives is stored or refused.
    # One run per transfer syntax family, so compressed files travel as they are.
    for opt in ("-xe", "-xy", "-xx", "-xr", "-xs", "-xv", "-xw", "-xt"):
        h.storescu("YY_EDGE", e.port, d["corpus"], extra=("--no-halt", "-R", opt), timeout=600)
        h.check(e.daemon.alive(), f"edge died on the corpus ({opt})")
    h.check(e.daemon.alive(), "edge died on the corpus")
    h.eq(h.echoscu("YY_EDGE", e.port).returncode, 0, "echo after corpus")
    h.eq(tmp_files(e), [], "tmp/")
    got = rows(e)
    h.check(len(got) >= 40, f"only {len(got)} corpus files stored")
    for row in got:
        h.check(os.path.exists(row[6]), f"row without file: {row}")
    h.eq(e.stop(), 0, "clean exit")


@h.test
def spool_full_answers_out_of_resources():
    d = data()
    e = offline_edge(spool={"min_free_mb": 1 << 30})   # 1 PiB: never available
    r = h.storescu("YY_EDGE", e.port, d["ct"][:2], extra=("-v",))
    h.check(r.returncode != 0, "storescu succeeded on a full spool")
    h.check("outofresources" in r.stderr.lower(), f"no A700: {r.stderr}")
    h.eq(rows(e), [], "rows while full")
    h.eq(tmp_files(e), [], "tmp/ while full")
    h.eq(h.echoscu("YY_EDGE", e.port).returncode, 0, "echo while full")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def disk_full_while_writing_answers_out_of_resources():
    """A real ENOSPC: the spool is a 3 MiB tmpfs in the edge's own mount namespace."""
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("skip: needs root and unshare(1) for a private tmpfs")
        return
    d = data()
    root = h.tempdir()
    spool = os.path.join(root, "spool")
    os.makedirs(spool)
    port = h.free_port()
    cfg = h.write_json(os.path.join(root, "edge.json"), {
        "scp": {"ae_title": "YY_EDGE", "bind": "127.0.0.1", "port": port},
        "spool": {"dir": spool, "min_free_mb": 0}})
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o size=3m tmpfs '{spool}' && exec '{h.EDGE_BIN}' --config '{cfg}'"]
    dmn = h.Daemon(argv, "yunying-edge: listening", os.path.join(root, "edge.log"))
    view = f"/proc/{dmn.proc.pid}/root{spool}"     # the edge's view of its tmpfs

    def spooled():
        # SQLite resolves the /proc/PID/root symlink back into our own mount
        # namespace, so read a copy of the database and its WAL.
        copy = h.tempdir()
        for name in ("spool.db", "spool.db-wal"):
            if os.path.exists(os.path.join(view, name)):
                shutil.copy(os.path.join(view, name), os.path.join(copy, name))
        con = sqlite3.connect(os.path.join(copy, "spool.db"), timeout=10)
        try:
            return con.execute("SELECT sop_uid FROM instances").fetchall()
        finally:
            con.close()
    r = h.storescu("YY_EDGE", port, d["xa"][:1], extra=("-v",))      # 7.5 MiB > 3 MiB
    h.check("outofresources" in r.stderr.lower(), f"no A700: {r.stderr}")
    h.eq(os.listdir(os.path.join(view, "tmp")), [], "half-written file left in tmp/")
    h.eq(spooled(), [], "rows after ENOSPC")
    r = h.storescu("YY_EDGE", port, d["ct"][:1])
    h.eq(r.returncode, 0, f"small instance after ENOSPC: {r.stderr}")
    h.eq(len(spooled()), 1, "rows")
    h.eq(dmn.stop(), 0, "edge exit code (ASan clean)")


@h.test
def object_file_write_retried_until_it_succeeds():
    """A kept instance is acknowledged once its journal record is durable;
    its object file is written after. When that write fails (here objects/
    is made immutable, chattr +i, which stops root too) it is logged and
    retried every second: the instance stays in its journal record (the
    checkpoint does not pass it) and its file is whole once the write can
    succeed again."""
    import shutil
    import xxhash
    if not shutil.which("chattr"):
        print("skip: needs chattr(1)")
        return
    import urllib.request
    d = data()
    status_port = h.free_port()
    e = offline_edge(status={"bind": "127.0.0.1", "port": status_port})

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=10) as f:
            return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in f.read().decode().splitlines()
                    if ln and not ln.startswith("#")}
    objects = os.path.join(e.dir, "spool", "objects")
    r = subprocess.run(["chattr", "+i", objects], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"skip: chattr +i not supported here: {r.stderr.strip()}")
        return
    try:
        files = d["ct"][:10]                          # 5 MiB: within the keep budget
        r = h.storescu("YY_EDGE", e.port, files)
        h.eq(r.returncode, 0, f"storescu while objects/ is immutable: {r.stderr}")
        h.eq(os.listdir(objects), [], "no object file could be written")
        h.eq(len(rows(e)), len(files), "rows: every instance acknowledged")
        deadline = time.monotonic() + 30
        while "writing object file" not in open(e.daemon.log_path, errors="replace").read():
            h.check(time.monotonic() < deadline, "no error logged for the failed write")
            time.sleep(0.05)
        m = metrics()
        h.eq((m['yy_edge_alarm{kind="object_write"}'], m["yy_edge_objects_unwritten"]),
             (1.0, float(len(files))), "alarm and files waiting on /metrics")
    finally:
        subprocess.run(["chattr", "-i", objects], check=True)
    objects_written(e)
    deadline = time.monotonic() + 30   # the writer's state follows its last file
    while True:
        m = metrics()
        got = (m['yy_edge_alarm{kind="object_write"}'], m["yy_edge_objects_unwritten"])
        if got == (0.0, 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    h.eq(got, (0.0, 0.0), "alarm cleared once written")
    for row in rows(e):
        with open(row[6], "rb") as f:
            h.eq(xxhash.xxh3_128_hexdigest(f.read()), row[4], f"object file {row[6]}")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def concurrent_associations():
    d = data()
    e = offline_edge(scp={"max_associations": 4})
    results = []

    def send(files):
        results.append(h.storescu("YY_EDGE", e.port, files))

    parts = [d["ct"][i::4] for i in range(4)]
    threads = [threading.Thread(target=send, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        h.eq(r.returncode, 0, f"storescu: {r.stderr}")
    h.eq(sorted(r[1] for r in rows(e)), sorted(sop_uid_of(p) for p in d["ct"]), "SOP UIDs")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def journal_replay_restores_what_a_power_failure_loses():
    journal_replay(buffered_lanes=False)


@h.test
def journal_replay_with_lanes_through_the_page_cache():
    """The same with the lanes' fallback for file systems without O_DIRECT."""
    journal_replay(buffered_lanes=True)


def journal_replay(buffered_lanes):
    """An acknowledged instance is durable through its ingest journal record;
    its object file and row become durable on their own only at the next
    checkpoint. A power failure loses what was not: simulated here by a
    kill -9 followed by removing every row and object file the checkpoints
    had not covered (one file is torn instead of removed). The replay at the
    next start must restore each of them, byte for byte, exactly once. Five
    associations are open at once, so the four streaming lanes (written while
    the instance arrives, O_DIRECT) and the shared journal (copied after) all
    hold records."""
    import xxhash
    d = data()
    os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"] = "3600000"   # no checkpoint before the kill
    if buffered_lanes:
        os.environ["YY_SPOOL_LANE_BUFFERED"] = "1"
    try:
        e = offline_edge(scp={"max_associations": 6})
    finally:
        del os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"]
        os.environ.pop("YY_SPOOL_LANE_BUFFERED", None)
    scus = [RawSCU(e.port) for _ in range(5)]
    for i, f in enumerate(d["ct"]):
        h.eq(scus[i % 5].store(sop_uid_of(f), dataset_bytes(f)), 0, f"C-STORE {i}")
    objects_written(e)   # the loss below is exactly what the test removes
    e.daemon.kill9()
    with open(e.daemon.log_path, errors="replace") as f:
        through_cache = "streaming through the page cache" in f.read()
    for s in scus:
        s.s.close()
    spool = os.path.join(e.dir, "spool")
    con = sqlite3.connect(os.path.join(spool, "spool.db"), timeout=10)
    before = con.execute("SELECT sop_uid, xxh128, size, path, jseq FROM instances"
                         " ORDER BY sop_uid").fetchall()
    tails = dict(con.execute("SELECT name, value FROM counters WHERE name LIKE 'journal%seq'"))
    h.eq(len(before), len(d["ct"]), "rows acknowledged")
    h.eq(sorted({j >> 48 for *_, j in before}), [0, 1, 2, 3, 4], "lanes used (shared, 1-4)")

    def tail(lane):
        return tails.get("journal_seq" if lane == 0 else f"journal{lane}_seq", 1)
    lost = [r for r in before if (r[4] & (2**48 - 1)) >= tail(r[4] >> 48)]
    h.eq(len(lost), len(before), "no record checkpointed before the kill")
    # The power failure: rows and files after the checkpointed tails are gone
    # (the first file torn: half of it reached the disk) - all of the lanes',
    # every other one of the shared journal's (whose records have the same
    # sequence numbers as the lanes': a replay must not mistake one for the other).
    gone = [r for r in lost if r[4] >> 48 != 0 or r[4] % 2 == 0]
    h.check(0 < len(gone) < len(lost), f"{len(gone)} of {len(lost)} lost")
    con.executemany("DELETE FROM instances WHERE sop_uid = ?", [(r[0],) for r in gone])
    con.commit()
    con.close()
    for k, (_, _, size, path, _) in enumerate(gone):
        if k == 0:
            os.truncate(path, size // 2)
        else:
            os.unlink(path)
    # The restart also wants lanes of another size (as after an upgrade from
    # 32 MiB lanes): each is replayed at its old size first, then remade.
    sizes = {n: os.path.getsize(os.path.join(spool, n)) for n in os.listdir(spool)
             if n.startswith("journal.")}
    h.check(sizes and all(v != 48 << 20 for v in sizes.values()), f"lane sizes {sizes}")
    os.environ["YY_SPOOL_LANE_MB"] = "48"
    try:
        e.start()
    finally:
        del os.environ["YY_SPOOL_LANE_MB"]
    for n in sizes:
        h.eq(os.path.getsize(os.path.join(spool, n)), 48 << 20, f"{n} remade at 48 MiB")
    con = sqlite3.connect(os.path.join(spool, "spool.db"), timeout=10)
    try:
        after = con.execute("SELECT sop_uid, xxh128, size, path, jseq FROM instances"
                            " ORDER BY sop_uid").fetchall()
    finally:
        con.close()
    h.eq(after, before, "every row restored once, as it was")
    for _, xxh, size, path, _ in after:
        with open(path, "rb") as f:
            h.eq(xxhash.xxh3_128_hexdigest(f.read()), xxh, f"object file {path} restored")
    with open(e.daemon.log_path, errors="replace") as f:
        log = f.read()
    if buffered_lanes:
        h.check(through_cache, "lanes did not fall back to the page cache")
    else:
        print(f"    lanes written {'through the page cache' if through_cache else 'with O_DIRECT'}",
              flush=True)
    h.eq(log.count("journal restored row"), len(gone), "rows restored by the replay")
    h.eq(log.count("journal restored object file"), len(gone), "files restored by the replay")
    # The remade lanes take new images.
    r = h.storescu("YY_EDGE", e.port, d["ct"][:2])
    h.eq(r.returncode, 0, f"storescu after the replay: {r.stderr}")
    h.eq(len(rows(e)), len(before) + 2, "rows after two more images")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def kept_instances_survive_a_crash_before_their_files_are_written():
    """Instances up to 4 MiB are kept in memory while they arrive and their
    object files written after the acknowledgement (bigger ones, and any
    beyond the 8 MiB budget, are written to a temporary file while
    received, as before). A crash in that window loses nothing: the replay
    writes each missing file from its journal record. The writer is held
    here (YY_SPOOL_WRITER_HOLD=1), so the window stays open."""
    import xxhash
    d = data()
    os.environ["YY_SPOOL_WRITER_HOLD"] = "1"
    os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"] = "3600000"
    try:
        e = offline_edge()
    finally:
        del os.environ["YY_SPOOL_WRITER_HOLD"]
        del os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"]
    # The CT twice (40 x 514 KiB, past the budget) and a 7.5 MiB DR (past 4 MiB).
    for files in (d["ct"], d["ct"], d["dr"][:1]):
        r = h.storescu("YY_EDGE", e.port, files)
        h.eq(r.returncode, 0, f"storescu: {r.stderr}")
    got = rows(e)
    h.eq(len(got), 2 * len(d["ct"]) + 1, "rows, all acknowledged")
    have = [r for r in got if os.path.exists(r[6])]
    dr = [r for r in got if r[5] > 4 << 20]
    h.eq(len(dr), 1, "the DR row")
    h.check(dr[0] in have, "the DR (over 4 MiB) was written while received")
    kept = [r for r in got if r not in have]
    h.check(len(kept) >= 8, f"{len(kept)} CT images kept in memory, files not yet written")
    h.check(len(have) >= 2, f"{len(have) - 1} CT images past the 8 MiB budget written at once")
    h.eq(tmp_files(e), [], "tmp/ after stores")
    print(f"    {len(kept)} kept, {len(have)} written while received", flush=True)
    e.daemon.kill9()
    e.start()
    objects_written(e)
    after = rows(e)
    h.eq(sorted((r[1], r[4], r[6]) for r in after), sorted((r[1], r[4], r[6]) for r in got),
         "the same rows after the crash")
    for r in after:
        with open(r[6], "rb") as f:
            h.eq(xxhash.xxh3_128_hexdigest(f.read()), r[4], f"object file {r[6]}")
    with open(e.daemon.log_path, errors="replace") as f:
        h.eq(f.read().count("journal restored object file"), len(kept), "files the replay wrote")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


def unwritten_bytes(path):
    """Bytes of the file in extents the file system marks unwritten
    (FS_IOC_FIEMAP), or None where it keeps no such map."""
    import fcntl
    fs_ioc_fiemap, extent_unwritten, extent_last, n = 0xC020660B, 0x800, 0x1, 64
    total, pos, size = 0, 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            buf = bytearray(struct.pack("=QQIIII", pos, size - pos, 0, 0, n, 0) + bytes(56 * n))
            try:
                fcntl.ioctl(f.fileno(), fs_ioc_fiemap, buf)
            except OSError:
                return None
            mapped = struct.unpack_from("=I", buf, 20)[0]
            if mapped == 0:
                break
            for i in range(mapped):
                logical, _, length, _, _, flags = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                if flags & extent_unwritten:
                    total += length
                pos = logical + length
                if flags & extent_last:
                    pos = size
    return total


@h.test
def prepare_spool_writes_rings_once_and_never_beside_a_running_edge():
    """`yunying-edge prepare-spool` (the service's ExecStartPre) writes the
    journal rings' never-written extents once, so that the first images after
    installing are no slower than later ones; it is refused while an edge
    has the spool, and on a spool a crash left it replays first and keeps
    every record: the edge started after it has every acknowledged image,
    byte for byte, exactly once."""
    import xxhash
    d = data()
    e = offline_edge()
    e.stop()
    spool = os.path.join(e.dir, "spool")
    lanes = sorted(os.path.join(spool, n) for n in os.listdir(spool) if n.startswith("journal"))
    h.check(len(lanes) >= 2, f"journal rings {lanes}")
    before = {p: unwritten_bytes(p) for p in lanes}

    def prepare():
        return subprocess.run([h.EDGE_BIN, "prepare-spool", "--config", e.config],
                              capture_output=True, text=True, timeout=300)
    r = prepare()
    h.eq(r.returncode, 0, f"prepare-spool: {r.stderr}")
    if all(v is None for v in before.values()):
        print("    no extent map on this file system: nothing to prepare", flush=True)
    else:
        h.check(any(before.values()), f"fallocate'd rings have unwritten extents: {before}")
        h.check("written once" in r.stdout, r.stdout)
        h.eq({p: unwritten_bytes(p) for p in lanes}, {p: 0 for p in lanes},
             "unwritten bytes after prepare-spool")
    r = prepare()
    h.eq(r.returncode, 0, f"second prepare-spool: {r.stderr}")
    h.check("already prepared" in r.stdout, f"second run writes nothing: {r.stdout}")

    # Refused beside a running edge (the spool's lock), which keeps serving.
    os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"] = "3600000"   # records stay to replay
    try:
        e.start()
    finally:
        del os.environ["YY_SPOOL_CHECKPOINT_IDLE_MS"]
    r = h.storescu("YY_EDGE", e.port, d["ct"][:10])
    h.eq(r.returncode, 0, f"storescu: {r.stderr}")
    r = prepare()
    h.eq(r.returncode, 1, "prepare-spool beside a running edge")
    h.check("in use" in r.stderr and "stop the running yunying-edge" in r.stderr, r.stderr)
    second = subprocess.run([h.EDGE_BIN, "--config", e.config], capture_output=True, text=True,
                            timeout=60)
    h.check(second.returncode != 0 and "in use" in second.stderr,
            f"a second edge on the same spool: {second.returncode} {second.stderr[-300:]}")
    r = h.storescu("YY_EDGE", e.port, d["ct"][10:])
    h.eq(r.returncode, 0, f"storescu after the refusals: {r.stderr}")

    # A power failure (kill -9, then the rows and files no checkpoint covered
    # removed), then prepare-spool as systemd's restart runs it: its replay
    # restores them before it writes any ring.
    e.daemon.kill9()
    spool_rows = rows(e)
    h.eq(len(spool_rows), len(d["ct"]), "rows before the crash")
    lost = spool_rows[-3:]
    con = sqlite3.connect(os.path.join(spool, "spool.db"), timeout=10)
    con.executemany("DELETE FROM instances WHERE id = ?", [(x[0],) for x in lost])
    con.commit()
    con.close()
    for x in lost:
        os.unlink(x[6])
    r = prepare()
    h.eq(r.returncode, 0, f"prepare-spool after a crash: {r.stderr}")
    h.eq(r.stderr.count("journal restored row"), len(lost), "rows restored by its replay")
    h.eq(r.stderr.count("journal restored object file"), len(lost), "files restored")
    e.start()
    after = rows(e)
    h.eq(sorted(x[1] for x in after), sorted(x[1] for x in spool_rows), "every image once")
    for row in after:
        with open(row[6], "rb") as f:
            h.eq(xxhash.xxh3_128_hexdigest(f.read()), row[4], f"object file {row[6]}")
    r = h.storescu("YY_EDGE", e.port, d["dr"][:1])
    h.eq(r.returncode, 0, f"storescu after the restart: {r.stderr}")
    h.eq(len(rows(e)), len(d["ct"]) + 1, "rows after one more image")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")


@h.test
def failed_uploads_back_off_and_recover_after_restart():
    if not os.path.exists(h.CLOUD_BIN):
        raise AssertionError(f"{h.CLOUD_BIN} not built")
    d = data()
    cloud = h.Cloud()
    e = h.Edge(cloud_url=f"http://127.0.0.1:{h.free_port()}", secret=cloud.secret,
               edge_id=cloud.edge_id, ae="YY_EDGE")
    r = h.storescu("YY_EDGE", e.port, d["ct"][:5])
    h.eq(r.returncode, 0, r.stderr)
    h.wait_until(lambda: all(row[8] >= 1 and row[9] for row in rows(e)), timeout=30,
                 what="failed attempts recorded")
    h.eq(e.stop(), 0, "edge exit code")
    # Simulate a crash mid-upload, then point the edge at the real cloud.
    con = sqlite3.connect(os.path.join(e.dir, "spool", "spool.db"))
    con.execute("UPDATE instances SET state='UPLOADING'")
    con.commit()
    con.close()
    import json
    with open(e.config) as f:
        cfg = json.load(f)
    cfg["upload"]["cloud_url"] = cloud.url
    cfg["upload"]["retry_min_ms"] = 10
    cfg["upload"]["retry_max_ms"] = 200
    h.write_json(e.config, cfg)
    e.start()
    h.wait_until(lambda: [row[7] for row in rows(e)] == ["DONE"] * 5, timeout=60,
                 what="all DONE after restart")
    # Re-sending the same instances: uploaded again; the cloud stores them once.
    r = h.storescu("YY_EDGE", e.port, d["ct"][:5])
    h.eq(r.returncode, 0, r.stderr)
    h.wait_until(lambda: [row[7] for row in rows(e)] == ["DONE"] * 10, timeout=60,
                 what="duplicates DONE")
    for row in rows(e):
        h.check(os.path.exists(row[6]), "spooled file kept after DONE")
    h.eq(e.stop(), 0, "edge exit code")
    cloud.stop()


@h.test
def upload_with_bad_secret_is_retried_not_done():
    if not os.path.exists(h.CLOUD_BIN):
        raise AssertionError(f"{h.CLOUD_BIN} not built")
    d = data()
    cloud = h.Cloud()
    e = h.Edge(cloud=cloud, secret=DUMMY_SECRET, ae="YY_EDGE")
    r = h.storescu("YY_EDGE", e.port, d["ct"][:1])
    h.eq(r.returncode, 0, r.stderr)
    h.wait_until(lambda: rows(e)[0][8] >= 2, timeout=30, what="two failed attempts")
    row = rows(e)[0]
    h.check(row[7] in ("PENDING", "UPLOADING"), row[7])
    h.check("401" in (row[9] or "") or "403" in (row[9] or ""), f"last_error: {row[9]}")
    log = e.daemon.tail(500)
    h.check(DUMMY_SECRET not in log, "secret in the log")
    h.eq(e.stop(), 0, "edge exit code (ASan clean)")
    cloud.stop()


if __name__ == "__main__":
    h.run()
