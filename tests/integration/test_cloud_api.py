#!/usr/bin/python3
"""test_cloud_api.py - yunying-cloud on its own: signed ingest, DICOMweb, auth, static.

The edge side of the protocol is written here in Python (hmac/hashlib) straight
from proto/PROTOCOL.md, so the cloud is checked against the document rather
than against our own C client: a token is obtained with the edge secret, every
upload request is signed with the token's key. Uses the shared helpers of
yyharness.py (the cloud speaks HTTPS with the run's test CA).
"""
import hashlib
import hmac
import io
import json
import os
import secrets
import sqlite3
import sys
import time
import urllib.parse

import numpy as np
import pydicom

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from yyharness import (Cloud, HttpSession, check, eq, generate, http_conn,  # noqa: E402
                       parse_multipart, run, s3_delete, s3_get, s3_list, s3_put, tag_value,
                       tempdir, test)

CHUNK = 64 * 1024
_env = {}


# ------------------------------------------------------------------ edge side

class Edge:
    """Signs requests exactly as PROTOCOL.md describes."""

    def __init__(self, cloud, edge_id=None, secret=None):
        self.cloud = cloud
        self.edge_id = edge_id or cloud.edge_id
        self.secret = bytes.fromhex(secret or cloud.secret)
        self.token = None            # (token_id, key bytes)

    @staticmethod
    def canonical(method, path, query, edge, ts, nonce, body_hash):
        params = sorted(query.split("&")) if query else []
        return "\n".join([method, path, "&".join(params), edge, str(ts), nonce, body_hash])

    def get_token(self):
        """POST /api/v1/token signed with the secret; returns the decoded answer."""
        st, body, _ = self.request("POST", "/api/v1/token", b'{"v":1}', key=self.secret,
                                   token=False)
        eq(st, 200, f"token request: {body!r}")
        t = json.loads(body)
        self.token = (t["token_id"], bytes.fromhex(t["key"]))
        return t

    def request(self, method, path, body=b"", query="", headers=None, ts=None, nonce=None,
                key=None, sign_body=None, send_hash=None, edge_id=None, token=None):
        """token: None = the current token (fetched once), False = no X-YY-Token,
        or a (token_id, key) pair. key overrides the signing key."""
        if token is None:
            if self.token is None:
                self.get_token()
            token = self.token
        ts = int(time.time()) if ts is None else ts
        nonce = nonce or secrets.token_hex(16)
        edge = edge_id or self.edge_id
        body_hash = hashlib.sha256(body if sign_body is None else sign_body).hexdigest()
        canon = self.canonical(method, path, query, edge, ts, nonce, body_hash)
        k = key or (token[1] if token else self.secret)
        sig = hmac.new(k, canon.encode(), hashlib.sha256).hexdigest()
        h = {"X-YY-Version": "1", "X-YY-Edge": edge, "X-YY-Timestamp": str(ts),
             "X-YY-Nonce": nonce, "X-YY-Content-SHA256": send_hash or body_hash,
             "X-YY-Signature": sig, "Content-Type": "application/json"}
        if token:
            h["X-YY-Token"] = token[0]
        h.update(headers or {})
        conn = http_conn(self.cloud)
        try:
            conn.request(method, path + ("?" + query if query else ""), body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            return r.status, data, dict(ts=ts, nonce=nonce, headers=h)
        finally:
            conn.close()

    def declare(self, data, chunk_size=CHUNK, **kw):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        decl = {"v": 1, "kind": "instance", "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data), "chunk_size": chunk_size,
                "study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                "sop_uid": ds.SOPInstanceUID}
        decl.update(kw)
        st, body, _ = self.request("POST", "/api/v1/objects", json.dumps(decl).encode())
        return st, json.loads(body) if body else None

    def put_chunk(self, oid, i, chunk, chunk_hash=None):
        st, body, _ = self.request(
            "PUT", f"/api/v1/objects/{oid}/chunks/{i}", chunk,
            headers={"X-YY-Chunk-SHA256": chunk_hash or hashlib.sha256(chunk).hexdigest(),
                     "Content-Type": "application/octet-stream"})
        return st, body

    def status(self, oid):
        st, body, _ = self.request("GET", f"/api/v1/objects/{oid}")
        return st, json.loads(body) if body else None

    def commit(self, oid):
        st, body, _ = self.request("POST", f"/api/v1/objects/{oid}/commit")
        return st, json.loads(body) if body else None

    def upload(self, data, chunk_size=CHUNK):
        """Declare, send missing chunks, commit; returns the commit answer."""
        st, s = self.declare(data, chunk_size)
        eq(st, 200, f"declare: {s}")
        oid, cs = s["object_id"], s["chunk_size"]
        if s["state"] != "committed":
            for i in range(s["nchunks"]):
                if i in s["have"]:
                    continue
                st, body = self.put_chunk(oid, i, data[i * cs:(i + 1) * cs])
                eq(st, 204, f"chunk {i}: {body!r}")
        st, c = self.commit(oid)
        eq(st, 200, f"commit: {c}")
        return c


# ------------------------------------------------------------------ fixture

def env():
    if _env:
        return _env
    data = tempdir("yy-cloud-api-data-")
    gen_ct = generate(os.path.join(data, "a"), "--only", "ct", "--ct-slices", "5", "--quiet",
                      "--patient-id", "PCT01", "--patient-name", "Wang^Fang",
                      "--study-date", "20261127", "--accession", "ACCCT01")
    gen_mr = generate(os.path.join(data, "b"), "--only", "mr,xa", "--quiet",
                      "--patient-id", "PMR02", "--patient-name", "李^四",
                      "--study-date", "20250315", "--accession", "ACCMR02")
    studies = {}
    for root, m in list(gen_ct.items()) + list(gen_mr.items()):
        m["files"] = [os.path.join(root, i["file"]) for se in m["series"] for i in se["instances"]]
        studies[m["kind"]] = m
    web = tempdir("yy-cloud-web-")
    os.makedirs(os.path.join(web, "assets"))
    with open(os.path.join(web, "index.html"), "w") as f:
        f.write("<!doctype html><title>yy</title>INDEX")
    with open(os.path.join(web, "assets", "app-3f2a9c.js"), "w") as f:
        f.write("console.log('app')")
    cloud = Cloud(extra={"http": {"web_root": web}})
    with open(os.path.join(cloud.dir, "secret.txt"), "w") as f:
        f.write("TOP SECRET")
    _env.update(cloud=cloud, edge=Edge(cloud), studies=studies, web=web,
                session=cloud.session(), uploaded=False)
    return _env


def read(path):
    with open(path, "rb") as f:
        return f.read()


def db(e):
    return e["cloud"].db()


def upload_all():
    e = env()
    if not e["uploaded"]:
        for kind in ("ct", "mr", "xa"):
            for f in e["studies"][kind]["files"]:
                c = e["edge"].upload(read(f), chunk_size=CHUNK if kind != "xa" else 4 << 20)
                eq(c["result"], "stored", f"commit of {f}")
        e["uploaded"] = True
    return e


def variant(f, suffix):
    """A copy of f as a new instance of its own study (keeps the fixtures' counts)."""
    ds = pydicom.dcmread(f)
    ds.StudyInstanceUID += suffix
    ds.SeriesInstanceUID += suffix
    ds.SOPInstanceUID += suffix
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "PTMP" + suffix.replace(".", "")
    ds.PatientName = "Tmp^Variant"
    ds.StudyDate = "19990101"
    ds.AccessionNumber = "TMP" + suffix.replace(".", "")
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=True)
    return ds, buf.getvalue()


def qido(s, q="", path="/dicomweb/studies"):
    return s.get_json(path + ("?" + q if q else ""))


def study_uids(res):
    return sorted(tag_value(r, "0020000D") for r in res)


# ------------------------------------------------------------------ ingest

@test
def upload_commit_stores_and_is_idempotent():
    e = upload_all()
    ed = e["edge"]
    f = e["studies"]["ct"]["files"][0]
    data = read(f)
    # Re-declare: already committed, every chunk listed; commit repeats its answer.
    st, s = ed.declare(data)
    eq(st, 200, "re-declare")
    eq(s["state"], "committed", "state after commit")
    eq(s["object_id"], hashlib.sha256(data).hexdigest(), "object id is the object's SHA-256")
    eq(sorted(s["have"]), list(range(s["nchunks"])), "have after commit")
    st, c = ed.commit(s["object_id"])
    eq((st, c["result"]), (200, "stored"), "repeated commit")
    con = db(e)
    n = con.execute("SELECT count(*) FROM instances").fetchone()[0]
    total = sum(len(e["studies"][k]["files"]) for k in ("ct", "mr", "xa"))
    eq(n, total, "instances indexed once each")
    path = con.execute("SELECT path FROM instances WHERE sop_uid = ?",
                       (pydicom.dcmread(f).SOPInstanceUID,)).fetchone()[0]
    eq(read(path), data, "archived bytes")
    staging = os.path.join(e["cloud"].dir, "staging")
    left = [d for d in os.listdir(staging) if d != ".tmp"]
    eq(left, [], "staging emptied after commit")


@test
def resume_lists_held_chunks():
    e = upload_all()
    ed = e["edge"]
    ds, data = variant(e["studies"]["ct"]["files"][1], ".7")
    st, s = ed.declare(data)
    eq(st, 200, "declare")
    oid = s["object_id"]
    for i in (0, 2):
        eq(ed.put_chunk(oid, i, data[i * CHUNK:(i + 1) * CHUNK])[0], 204, f"chunk {i}")
    st, c = ed.commit(oid)
    eq((st, c["error"]), (409, "incomplete"), "commit with missing chunks")
    st, s = ed.declare(data, chunk_size=128 * 1024)   # resume keeps the first chunk size
    eq(s["chunk_size"], CHUNK, "chunk size kept on resume")
    eq(sorted(s["have"]), [0, 2], "held chunks")
    eq(ed.upload(data)["result"], "stored", "resumed upload")


def staged(e, oid, i):
    """Where chunk i of object oid is staged: ("s3", key) or ("dir", path)."""
    c = e["cloud"]
    if c.backend == "s3":
        return "s3", f"{c.s3_prefix}staging/{oid}/{i}"
    return "dir", os.path.join(c.dir, "staging", oid, str(i))


def staged_remove(e, oid, i):
    kind, where = staged(e, oid, i)
    if kind == "s3":
        s3_delete(where)
    else:
        os.unlink(where)


def staged_write(e, oid, i, data):
    kind, where = staged(e, oid, i)
    if kind == "s3":
        s3_put(where, data)
    else:
        with open(where, "wb") as f:
            f.write(data)


def staged_chunks(e, oid):
    """Indices of the chunks of oid that are staged."""
    c = e["cloud"]
    if c.backend == "s3":
        prefix = f"{c.s3_prefix}staging/{oid}/"
        return sorted(int(k[len(prefix):]) for k in s3_list(prefix))
    d = os.path.join(c.dir, "staging", oid)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def resend_until_committed(ed, oid, data, n, missing, declare):
    """The edge's loop: re-send what is missing, commit, re-declare on 409, until the
    commit is final; at most n + 1 rounds, and never a 5xx."""
    for _ in range(n + 1):
        for i in missing:
            eq(ed.put_chunk(oid, i, data[i * CHUNK:(i + 1) * CHUNK])[0], 204, f"re-sent chunk {i}")
        st, c = ed.commit(oid)
        check(st in (200, 409), f"commit answered {st}: {c}")
        if st == 200:
            return st, c
        st, s = declare()
        eq(st, 200, f"re-declare: {s}")
        missing = sorted(set(range(n)) - set(s["have"]))
        check(missing, "a 409 leaves something to send")
    raise AssertionError(f"no final commit after {n + 1} rounds")


@test
def abandoned_uploads_are_removed_and_can_start_again():
    """An upload left open (an edge gone mid-upload) is removed with its staged
    chunks by uploads-gc (and hourly by the daemon after ingest.abandon_after_h);
    committed uploads stay. The same object declared again starts afresh."""
    e = upload_all()
    ed, cloud = e["edge"], e["cloud"]
    ds, data = variant(e["studies"]["ct"]["files"][2], ".21")
    st, s = ed.declare(data)
    eq(st, 200, "declare")
    oid, n = s["object_id"], s["nchunks"]
    eq(ed.put_chunk(oid, 0, data[:CHUNK])[0], 204, "first chunk")
    eq(staged_chunks(e, oid), [0], "chunk staged")
    con = db(e)
    try:
        committed = con.execute("SELECT count(*) FROM uploads WHERE state = 'committed'").fetchone()[0]
    finally:
        con.close()
    check(committed > 0, "committed uploads exist before the GC")
    # Not old enough under the default (a week): nothing removed.
    check("removed 0 " in cloud.admin("uploads-gc"), "a fresh upload is kept")
    old = os.environ.get("YY_GC_OLDER_THAN_S")
    os.environ["YY_GC_OLDER_THAN_S"] = "0"
    try:
        out = cloud.admin("uploads-gc")
    finally:
        if old is None:
            del os.environ["YY_GC_OLDER_THAN_S"]
        else:
            os.environ["YY_GC_OLDER_THAN_S"] = old
    check("removed 1 " in out, out)
    eq(staged_chunks(e, oid), [], "staged chunks removed")
    con = db(e)
    try:
        eq(con.execute("SELECT count(*) FROM uploads WHERE object_id = ?", (oid,)).fetchone()[0], 0,
           "upload row removed")
        eq(con.execute("SELECT count(*) FROM chunks WHERE object_id = ?", (oid,)).fetchone()[0], 0,
           "chunk rows removed")
        eq(con.execute("SELECT count(*) FROM uploads WHERE state = 'committed'").fetchone()[0],
           committed, "committed uploads kept")
    finally:
        con.close()
    st, s = ed.declare(data)
    eq((st, s["state"], s["have"]), (200, "open", []), "declared again from scratch")
    eq(ed.upload(data)["result"], "stored", "the object arrives after all")


@test
def chunks_lost_from_staging_are_sent_again():
    """A chunk the index lists but staging lost (deleted behind the cloud's back) or
    holds with other bytes: commit forgets it and answers 409 incomplete (never 500),
    re-declaring lists it missing, and after re-sending it the upload commits the
    declared bytes. Staging is emptied after the commit (the bucket with S3)."""
    e = upload_all()
    ed = e["edge"]
    ds, data = variant(e["studies"]["ct"]["files"][3], ".12")
    st, s = ed.declare(data)
    eq(st, 200, "declare")
    oid, n = s["object_id"], s["nchunks"]
    check(n >= 4, f"chunks of the test object: {n}")
    for i in range(n):
        eq(ed.put_chunk(oid, i, data[i * CHUNK:(i + 1) * CHUNK])[0], 204, f"chunk {i}")
    eq(staged_chunks(e, oid), list(range(n)), "all chunks staged")
    staged_remove(e, oid, 1)
    staged_remove(e, oid, 3)
    staged_write(e, oid, 2, b"\0" * CHUNK)          # same length, other bytes
    for attempt in range(2):                           # a repeat without re-sending: 409 again
        st, c = ed.commit(oid)
        eq((st, c["error"]), (409, "incomplete"), f"commit with lost chunks (attempt {attempt})")
    st, s = ed.declare(data)
    eq(st, 200, "re-declare")
    eq(s["state"], "open", "state after the lost chunks")
    missing = sorted(set(range(n)) - set(s["have"]))
    # Every lost chunk is forgotten at once; the damaged one when the commit reads it.
    check(1 in missing and 3 in missing and set(missing) <= {1, 2, 3},
          f"chunks the cloud asks for again: {missing}")
    st, c = resend_until_committed(ed, oid, data, n, missing, lambda: ed.declare(data))
    eq((st, c["result"]), (200, "stored"), "commit after re-sending")
    con = db(e)
    try:
        path, sha = con.execute("SELECT path, sha256 FROM instances WHERE sop_uid = ?",
                                (ds.SOPInstanceUID,)).fetchone()
    finally:
        con.close()
    eq(sha, hashlib.sha256(data).hexdigest(), "indexed hash")
    if e["cloud"].backend == "s3":
        eq(hashlib.sha256(s3_get(e["cloud"].object_key(path))).hexdigest(), sha, "archived object")
    else:
        eq(read(path), data, "archived bytes")
    eq(staged_chunks(e, oid), [], "staging emptied after commit")
    log = e["cloud"].log_text()
    check("is missing from staging" in log and "differs from its record" in log,
          "the lost and the damaged chunk are logged")


@test
def bundle_chunks_lost_from_staging_are_sent_again():
    """The same for a bundle (PROTOCOL.md "Bundles"): the first chunk lost, the last one
    damaged (found only when the split reads past the last member); after re-sending,
    the commit stores every member."""
    import struct
    e = upload_all()
    ed = e["edge"]
    members = []
    for k, f in enumerate(e["studies"]["ct"]["files"][:3]):
        ds, b = variant(f, ".13")
        members.append((b, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID))
    study = members[0][3]
    hdr = {"v": 1, "study_uid": study,
           "members": [{"sop_uid": s, "series_uid": se, "sha256": hashlib.sha256(b).hexdigest(),
                        "size": len(b)} for b, s, se, _ in members]}
    j = json.dumps(hdr, separators=(",", ":"), sort_keys=True).encode()
    data = b"YYBNDL01" + struct.pack(">I", len(j)) + j + b"".join(m[0] for m in members)
    decl = {"v": 1, "kind": "bundle", "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "chunk_size": CHUNK, "study_uid": study, "members": len(members)}

    def declare():
        st, body, _ = ed.request("POST", "/api/v1/objects", json.dumps(decl).encode())
        return st, json.loads(body)

    st, s = declare()
    eq(st, 200, f"declare bundle: {s}")
    oid, n = s["object_id"], s["nchunks"]
    check(n >= 3, f"chunks of the test bundle: {n}")
    for i in range(n):
        eq(ed.put_chunk(oid, i, data[i * CHUNK:(i + 1) * CHUNK])[0], 204, f"chunk {i}")
    damaged_before = e["cloud"].log_text().count("differs from its record")
    staged_remove(e, oid, 0)
    last = data[(n - 1) * CHUNK:]
    staged_write(e, oid, n - 1, bytes(b ^ 0x5A for b in last))
    st, c = ed.commit(oid)
    eq((st, c["error"]), (409, "incomplete"), "bundle commit with lost chunks")
    st, s = declare()
    missing = sorted(set(range(n)) - set(s["have"]))
    check(0 in missing, f"chunks the cloud asks for again: {missing}")
    st, c = resend_until_committed(ed, oid, data, n, missing, declare)
    eq([m["result"] for m in c["members"]], ["stored"] * len(members), f"bundle answer {c}")
    con = db(e)
    try:
        for b, sop, _, _ in members:
            row = con.execute("SELECT sha256 FROM instances WHERE sop_uid = ?", (sop,)).fetchone()
            eq(row[0] if row else None, hashlib.sha256(b).hexdigest(), f"indexed hash of {sop}")
    finally:
        con.close()
    eq(staged_chunks(e, oid), [], "staging emptied after the bundle commit")
    eq(e["cloud"].log_text().count("differs from its record") - damaged_before, 1,
       "the damaged last chunk was found by the split")


@test
def duplicate_is_stored_once():
    e = upload_all()
    f = e["studies"]["ct"]["files"][2]
    data = read(f)
    oid = hashlib.sha256(data).hexdigest()
    # Upload rows can expire; the same bytes then arrive as a new upload.
    con = db(e)
    with con:
        con.execute("DELETE FROM uploads WHERE object_id = ?", (oid,))
    c = e["edge"].upload(data)
    eq(c["result"], "duplicate", "second upload of identical bytes")
    eq(c["sop_uid"], pydicom.dcmread(f).SOPInstanceUID, "sop_uid")
    n = con.execute("SELECT count(*) FROM instances WHERE sop_uid = ?", (c["sop_uid"],)).fetchone()[0]
    eq(n, 1, "one instance row")


@test
def conflict_is_kept_aside():
    e = upload_all()
    f = e["studies"]["ct"]["files"][3]
    orig = read(f)
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=True)
    changed = buf.getvalue()
    check(changed != orig, "modified copy differs")
    c = e["edge"].upload(changed)
    eq(c["result"], "conflict", "same SOP UID, different bytes")
    con = db(e)
    row = con.execute("SELECT path, sha256 FROM conflicts WHERE sop_uid = ?",
                      (ds.SOPInstanceUID,)).fetchone()
    check(row is not None, "conflict flagged in the index")
    eq(read(row[0]), changed, "conflicting copy kept")
    check("/conflicts/" in row[0], f"conflict path {row[0]}")
    path = con.execute("SELECT path FROM instances WHERE sop_uid = ?",
                       (ds.SOPInstanceUID,)).fetchone()[0]
    eq(read(path), orig, "original never overwritten")


@test
def bad_chunks_are_rejected():
    e = upload_all()
    ed = e["edge"]
    ds, data = variant(e["studies"]["ct"]["files"][4], ".8")
    st, s = ed.declare(data)
    oid = s["object_id"]
    chunk = data[:CHUNK]
    st, body = ed.put_chunk(oid, 0, chunk, chunk_hash="0" * 64)
    eq(st, 400, f"wrong chunk hash: {body!r}")
    eq(json.loads(body)["error"], "bad_chunk", "error code")
    st, body = ed.put_chunk(oid, 0, chunk[:-1])
    eq(st, 400, "short chunk")
    st, body = ed.put_chunk(oid, s["nchunks"], chunk)
    eq(st, 400, "chunk index out of range")
    st, s = ed.status(oid)
    eq((st, s["have"]), (200, []), "nothing held after bad chunks")
    st, _ = ed.put_chunk("ab" * 32, 0, chunk)
    eq(st, 404, "chunk for an undeclared object")


@test
def bad_signatures_are_401_and_change_nothing():
    e = upload_all()
    ed = e["edge"]
    ds, data = variant(e["studies"]["ct"]["files"][0], ".9")
    oid = hashlib.sha256(data).hexdigest()
    decl = json.dumps({"v": 1, "kind": "instance", "sha256": oid, "size": len(data),
                       "chunk_size": CHUNK, "study_uid": ds.StudyInstanceUID,
                       "series_uid": ds.SeriesInstanceUID, "sop_uid": ds.SOPInstanceUID}).encode()
    cases = {
        "wrong key": dict(key=b"\x01" * 32),
        "stale timestamp": dict(ts=int(time.time()) - 3600),
        "future timestamp": dict(ts=int(time.time()) + 3600),
        "unknown edge": dict(edge_id="no-such-edge"),
        "body changed after signing": dict(sign_body=decl + b" "),
        "body hash header wrong": dict(send_hash="0" * 64),
        "short nonce": dict(nonce="abc"),
    }
    for what, kw in cases.items():
        st, body, _ = ed.request("POST", "/api/v1/objects", decl, **kw)
        eq(st, 401, what)
        # A correctly signed request with a timestamp out of the window is
        # told the cloud's time (proto/PROTOCOL.md, "Clocks").
        eq(json.loads(body)["error"], "clock_skew" if "timestamp" in what else "unauthorized",
           what)
    st, body, _ = ed.request("POST", "/api/v1/objects", decl, headers={"X-YY-Signature": "0" * 64})
    eq(st, 401, "forged signature")
    st, _ = ed.status(oid)
    eq(st, 404, "nothing declared by rejected requests")
    # Replay: a valid request accepted once, then refused with the same nonce.
    st, body, meta = ed.request("POST", "/api/v1/objects", decl)
    eq(st, 200, "valid declare")
    st, body, _ = ed.request("POST", "/api/v1/objects", decl, ts=meta["ts"], nonce=meta["nonce"])
    eq(st, 401, "replayed nonce")
    # A replayed chunk with a nonce already used is refused too, and not stored.
    chunk = data[:CHUNK]
    st, _, meta = ed.request("PUT", f"/api/v1/objects/{oid}/chunks/0", chunk,
                             headers={"X-YY-Chunk-SHA256": hashlib.sha256(chunk).hexdigest()})
    eq(st, 204, "first chunk")
    con = db(e)
    with con:
        con.execute("DELETE FROM chunks WHERE object_id = ?", (oid,))
    st, _, _ = ed.request("PUT", f"/api/v1/objects/{oid}/chunks/0", chunk, ts=meta["ts"],
                          nonce=meta["nonce"],
                          headers={"X-YY-Chunk-SHA256": hashlib.sha256(chunk).hexdigest()})
    eq(st, 401, "replayed chunk")
    eq(ed.status(oid)[1]["have"], [], "replayed chunk not stored")
    # Unsigned request.
    conn = http_conn(e["cloud"], timeout=30)
    conn.request("POST", "/api/v1/objects", body=decl)
    r = conn.getresponse()
    r.read()
    conn.close()
    check(r.status in (400, 401), f"unsigned request: {r.status}")


@test
def garbage_dicom_is_422():
    e = upload_all()
    ed = e["edge"]
    data = b"this is not a DICOM file at all " * 4096
    decl = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    st, s = ed.request("POST", "/api/v1/objects", json.dumps({
        "v": 1, "kind": "instance", "chunk_size": CHUNK, "study_uid": "1.2.3",
        "series_uid": "1.2.3.4", "sop_uid": "1.2.3.4.5", **decl}).encode())[:2]
    eq(st, 200, f"declare garbage: {s!r}")
    s = json.loads(s)
    for i in range(s["nchunks"]):
        eq(ed.put_chunk(s["object_id"], i, data[i * CHUNK:(i + 1) * CHUNK])[0], 204, "chunk")
    st, c = ed.commit(s["object_id"])
    eq((st, c["error"]), (422, "bad_object"), "garbage commit")
    n = db(e).execute("SELECT count(*) FROM instances WHERE sop_uid = '1.2.3.4.5'").fetchone()[0]
    eq(n, 0, "garbage not indexed")
    # A truncated real file too.
    data = read(e["studies"]["ct"]["files"][0])[:3000]
    st, s = ed.request("POST", "/api/v1/objects", json.dumps({
        "v": 1, "kind": "instance", "chunk_size": CHUNK, "study_uid": "1.2.3",
        "series_uid": "1.2.3.4", "sop_uid": "1.2.3.4.6",
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}).encode())[:2]
    s = json.loads(s)
    eq(ed.put_chunk(s["object_id"], 0, data)[0], 204, "truncated chunk")
    st, c = ed.commit(s["object_id"])
    eq(st, 422, f"truncated commit: {c}")
    # A declaration that lies about the bytes.
    data = read(e["studies"]["ct"]["files"][0])
    st, s = ed.declare(data, sha256=hashlib.sha256(b"x").hexdigest())
    s_id = s["object_id"]
    for i in range(s["nchunks"]):
        ed.put_chunk(s_id, i, data[i * CHUNK:(i + 1) * CHUNK])
    st, c = ed.commit(s_id)
    eq((st, c["error"]), (422, "bad_object"), "hash mismatch on commit")


@test
def large_chunks_stream_through_temp_files():
    e = upload_all()
    d = tempdir("yy-cloud-dr-")
    m = generate(d, "--only", "dr", "--quiet", "--patient-id", "PDR03", "--accession", "ACCDR03",
                 "--study-date", "20240102")
    (root, man), = m.items()
    f = os.path.join(root, man["series"][0]["instances"][0]["file"])
    data = read(f)
    check(len(data) > 16 << 20, "DR file is large")
    eq(e["edge"].upload(data, chunk_size=12 << 20)["result"], "stored", "DR with 12 MiB chunks")
    s = e["session"]
    ds = pydicom.dcmread(f)
    h, body = s.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
    parts = parse_multipart(h["Content-Type"], body)
    eq(parts[0][1], data, "DR bytes back")


# ------------------------------------------------------------------ QIDO

@test
def qido_by_each_key():
    e = upload_all()
    s = e["session"]
    ct, mr, xa = (e["studies"][k] for k in ("ct", "mr", "xa"))
    ctu, mru, xau = ct["study_uid"], mr["study_uid"], xa["study_uid"]
    allu = sorted([ctu, mru, xau])
    everything = study_uids(qido(s))

    def mine(res):
        return [u for u in study_uids(res) if u in allu]

    for u in allu:
        check(u in everything, "every study listed")
    eq(study_uids(qido(s, "PatientID=PCT01")), [ctu], "PatientID")
    eq(study_uids(qido(s, "00100020=PCT01")), [ctu], "PatientID by tag")
    eq(study_uids(qido(s, "PatientID=PCT*")), [ctu], "PatientID wildcard")
    eq(study_uids(qido(s, "PatientName=wang*")), [ctu], "PatientName case-insensitive wildcard")
    eq(study_uids(qido(s, "PatientName=W%3Fng%5EFang")), [ctu], "PatientName ? wildcard")
    eq(study_uids(qido(s, "PatientName=" + urllib.parse.quote("李*"))), sorted([mru, xau]),
       "PatientName in Chinese")
    eq(study_uids(qido(s, "PatientName=Nobody*")), [], "no match")
    eq(study_uids(qido(s, "StudyDate=20261127")), [ctu], "StudyDate exact")
    eq(mine(qido(s, "StudyDate=20250101-20251231")), sorted([mru, xau]), "StudyDate range")
    eq(mine(qido(s, "StudyDate=20260101-")), [ctu], "StudyDate open end")
    eq(mine(qido(s, "StudyDate=20000101-20251231")), sorted([mru, xau]), "StudyDate open start")
    eq(study_uids(qido(s, "AccessionNumber=" + ct["accession"])), [ctu], "AccessionNumber")
    eq(study_uids(qido(s, "ModalitiesInStudy=MR")), [mru], "ModalitiesInStudy")
    eq(study_uids(qido(s, "ModalitiesInStudy=XA,MR")), sorted([mru, xau]), "ModalitiesInStudy list")
    eq(study_uids(qido(s, "StudyInstanceUID=" + ctu)), [ctu], "StudyInstanceUID")
    eq(study_uids(qido(s, "PatientID=PMR02&ModalitiesInStudy=XA")), [xau], "combined keys")
    page1 = study_uids(qido(s, "limit=1"))
    page2 = study_uids(qido(s, "limit=1&offset=1"))
    eq(len(page1) + len(page2), 2, "limit")
    check(page1 != page2, "offset moves the window")
    # DICOM JSON shape.
    r = qido(s, "PatientID=PCT01")[0]
    eq(r["00100010"], {"vr": "PN", "Value": [{"Alphabetic": "Wang^Fang"}]}, "PN in DICOM JSON")
    eq(r["00080061"]["Value"], ["CT"], "ModalitiesInStudy value")
    eq(r["00201208"]["Value"], [5], "NumberOfStudyRelatedInstances")
    eq(r["00080020"], {"vr": "DA", "Value": ["20261127"]}, "StudyDate")
    check(all(len(k) == 8 and k == k.upper() for k in r), "tags as 8 upper-case hex digits")
    # Series and instances.
    se = qido(s, path=f"/dicomweb/studies/{ctu}/series")
    eq(len(se), 1, "series")
    seu = tag_value(se[0], "0020000E")
    eq(tag_value(se[0], "00080060"), "CT", "Modality")
    eq(len(qido(s, "Modality=MR", path=f"/dicomweb/studies/{ctu}/series")), 0, "series Modality")
    inst = qido(s, path=f"/dicomweb/studies/{ctu}/series/{seu}/instances")
    eq(len(inst), 5, "instances")
    eq([tag_value(i, "00200013") for i in inst], [1, 2, 3, 4, 5], "instance order")
    one = qido(s, "SOPInstanceUID=" + tag_value(inst[2], "00080018"),
               path=f"/dicomweb/studies/{ctu}/series/{seu}/instances")
    eq(len(one), 1, "SOPInstanceUID")


@test
def qido_bad_queries_are_400():
    e = upload_all()
    s = e["session"]
    for q in ("StudyDate=2026", "StudyDate=20260101-2027", "StudyDate=abcdefgh", "limit=-1",
              "limit=x", "offset=1.5", "NoSuchKey=1", "StudyInstanceUID=1.2.abc",
              "SOPInstanceUID=1.2.3"):
        st, _, body = s.request("GET", "/dicomweb/studies?" + q)
        eq(st, 400, f"query {q}")
        check(json.loads(body).get("message"), f"message for {q}")
    st, _, _ = s.request("GET", "/dicomweb/studies/not-a-uid/series")
    eq(st, 404, "bad UID in path")


# ------------------------------------------------------------------ WADO

@test
def wado_rs_instance_series_metadata_frames():
    e = upload_all()
    s = e["session"]
    ct = e["studies"]["ct"]
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in ct["files"]}
    ds0 = pydicom.dcmread(ct["files"][0])
    stu, seu = ds0.StudyInstanceUID, ds0.SeriesInstanceUID
    h, body = s.get(f"/dicomweb/studies/{stu}/series/{seu}")
    ctype = h["Content-Type"]
    check(ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype, ctype)
    parts = parse_multipart(ctype, body)
    eq(len(parts), 5, "series retrieve")
    for hdrs, data in parts:
        check(hdrs["content-type"].startswith("application/dicom"), f"part type {hdrs}")
        got = pydicom.dcmread(io.BytesIO(data))
        orig = pydicom.dcmread(sent[got.SOPInstanceUID])
        check(np.array_equal(got.pixel_array, orig.pixel_array), "pixel data equal")
    # Study retrieve covers the series.
    h, body = s.get(f"/dicomweb/studies/{stu}")
    eq(len(parse_multipart(h["Content-Type"], body)), 5, "study retrieve")
    # Single instance.
    h, body = s.get(f"/dicomweb/studies/{stu}/series/{seu}/instances/{ds0.SOPInstanceUID}")
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 1, "instance retrieve")
    eq(parts[0][1], read(ct["files"][0]), "instance bytes")
    # Metadata.
    meta = s.get_json(f"/dicomweb/studies/{stu}/series/{seu}/metadata")
    eq(len(meta), 5, "series metadata")
    for m in meta:
        check(m["00080018"]["Value"][0] in sent, "SOP UID in metadata")
        check("BulkDataURI" in m["7FE00010"], "pixel data by reference")
        eq(m["00100010"]["Value"][0]["Alphabetic"], "Wang^Fang", "PN in metadata")
    im = s.get_json(f"/dicomweb/studies/{stu}/series/{seu}/instances/{ds0.SOPInstanceUID}/metadata")
    eq(len(im), 1, "instance metadata")
    # Frames of a multi-frame XA: frame 5 equals pydicom's frame 5.
    xa = pydicom.dcmread(e["studies"]["xa"]["files"][0])
    base = (f"/dicomweb/studies/{xa.StudyInstanceUID}/series/{xa.SeriesInstanceUID}"
            f"/instances/{xa.SOPInstanceUID}")
    h, body = s.get(base + "/frames/5,1")
    check('type="application/octet-stream"' in h["Content-Type"], h["Content-Type"])
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 2, "two frames")
    arr = xa.pixel_array
    eq(parts[0][1], arr[4].tobytes(), "frame 5 bytes")
    eq(parts[1][1], arr[0].tobytes(), "frame 1 bytes")
    h, body = s.get(base + "/bulk")
    eq(parse_multipart(h["Content-Type"], body)[0][1], xa.PixelData, "bulk pixel data")
    st, _, _ = s.request("GET", base + "/frames/31")
    eq(st, 404, "frame out of range")
    st, _, _ = s.request("GET", base + "/frames/0")
    eq(st, 400, "frame 0")
    st, _, _ = s.request("GET", f"/dicomweb/studies/{stu}/series/{seu}/instances/1.2.3")
    eq(st, 404, "unknown instance")


@test
def wado_uri_returns_the_file():
    e = upload_all()
    s = e["session"]
    f = e["studies"]["mr"]["files"][3]
    ds = pydicom.dcmread(f)
    q = urllib.parse.urlencode({"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                                "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
                                "contentType": "application/dicom"})
    h, body = s.get("/wado?" + q)
    eq(h["Content-Type"], "application/dicom", "content type")
    eq(body, read(f), "file bytes")
    st, _, _ = s.request("GET", "/wado?requestType=WADO&studyUID=1.2&seriesUID=1.2&objectUID=1.2")
    eq(st, 404, "unknown object")
    st, _, _ = s.request("GET", "/wado?studyUID=1.2")
    eq(st, 400, "missing parameters")


# ------------------------------------------------------------------ auth

@test
def authentication_is_required_and_audited():
    e = upload_all()
    anon = HttpSession(e["cloud"].url)
    ct = e["studies"]["ct"]
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{ct['study_uid']}/series",
                 "/wado?requestType=WADO", "/api/v1/me"):
        st, _, _ = anon.request("GET", path)
        eq(st, 401, f"anonymous {path}")
    bad = HttpSession(e["cloud"].url)
    st, _, _ = bad.request("POST", "/api/v1/login",
                           json.dumps({"username": "doctor", "password": "wrong"}).encode())
    eq(st, 401, "wrong password")
    st, _, _ = bad.request("POST", "/api/v1/login",
                           json.dumps({"username": "nobody", "password": "x"}).encode())
    eq(st, 401, "unknown user")
    st, _, _ = bad.request("GET", "/dicomweb/studies", headers={"Authorization": "Bearer " + "0" * 64})
    eq(st, 401, "forged bearer")
    # Cookie attributes and Bearer use of the same session.
    s = HttpSession(e["cloud"].url)
    st, h, body = s.request("POST", "/api/v1/login", json.dumps(
        {"username": Cloud.USER, "password": Cloud.PASSWORD}).encode())
    eq(st, 200, "login")
    eq(json.loads(body), {"username": Cloud.USER, "role": "doctor"}, "login answer")
    cookie = h["Set-Cookie"]
    for attr in ("yy_session=", "HttpOnly", "SameSite=Strict", "Path=/"):
        check(attr in cookie, f"cookie has {attr}: {cookie}")
    token = cookie.split("yy_session=")[1].split(";")[0]
    eq(len(token), 64, "token length")
    con = db(e)
    stored = [r[0] for r in con.execute("SELECT token_hash FROM sessions")]
    check(token not in stored, "raw token never stored")
    check(hashlib.sha256(token.encode()).hexdigest() in stored, "token hash stored")
    st, _, body = anon.request("GET", "/api/v1/me", headers={"Authorization": "Bearer " + token})
    eq(st, 200, "Bearer accepted")
    eq(json.loads(body)["username"], Cloud.USER, "me")
    st, _, _ = s.request("GET", f"/dicomweb/studies/{ct['study_uid']}/series")
    eq(st, 200, "cookie accepted")
    before = con.execute("SELECT count(*) FROM audit WHERE action = 'qido-series' AND study_uid = ?",
                         (ct["study_uid"],)).fetchone()[0]
    check(before >= 1, "QIDO audited with the study UID")
    row = con.execute("SELECT username, peer FROM audit WHERE action = 'qido-series'").fetchone()
    eq(row, (Cloud.USER, "127.0.0.1"), "audit user and peer")
    # Each retrieval is audited before its answer: WADO-RS and WADO-URI (the viewer's path).
    sop = ct["files"][0]
    import pydicom
    ds = pydicom.dcmread(sop, stop_before_pixels=True)
    for action, path in (
            ("wado-instance", f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                              f"/instances/{ds.SOPInstanceUID}"),
            ("wado-uri", f"/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
                         f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}&contentType=application/dicom")):
        q = "SELECT count(*) FROM audit WHERE action = ? AND study_uid = ?"
        n0 = con.execute(q, (action, ds.StudyInstanceUID)).fetchone()[0]
        st, _, _ = s.request("GET", path, headers={"Accept": "multipart/related; type=\"application/dicom\""}
                             if action != "wado-uri" else None)
        eq(st, 200, f"{action} answered")
        eq(con.execute(q, (action, ds.StudyInstanceUID)).fetchone()[0], n0 + 1, f"{action} audited")
    try:
        with con:
            con.execute("DELETE FROM audit")
        raise AssertionError("audit rows could be deleted")
    except sqlite3.DatabaseError:
        pass
    st, _, _ = s.request("POST", "/api/v1/logout", b"")
    eq(st, 204, "logout")
    st, _, _ = anon.request("GET", "/api/v1/me", headers={"Authorization": "Bearer " + token})
    eq(st, 401, "session ended by logout")


@test
def audit_rows_move_to_their_own_file():
    """SQLite: audit rows live in index-audit.db. An index made before that
    (audit in index.db), or a move cut short by a crash (rows in both), is
    completed at start: every row once, same ids, main.audit gone, and the
    table still append-only."""
    e = upload_all()
    c = e["cloud"]
    if c.index_url:
        return   # PostgreSQL keeps audit in its one database
    c.stop()
    con = c.db()
    rows = con.execute("SELECT id, ts, username, action, study_uid, peer FROM aud.audit"
                       " ORDER BY id").fetchall()
    check(len(rows) >= 5, f"audit rows to move ({len(rows)})")
    eq(con.execute("SELECT count(*) FROM main.sqlite_master WHERE name = 'audit'").fetchone()[0], 0,
       "no audit table left in index.db")
    # The layout of an older index: the rows in index.db, the first third also
    # already copied (a move cut short after its copy).
    con.executescript(
        "CREATE TABLE main.audit (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL,"
        " username TEXT NOT NULL, action TEXT NOT NULL, study_uid TEXT NOT NULL DEFAULT '',"
        " peer TEXT NOT NULL DEFAULT '');")
    con.executemany("INSERT INTO main.audit VALUES (?,?,?,?,?,?)", rows)
    con.commit()
    con.close()
    keep = rows[: len(rows) // 3]
    os.unlink(c.audit_db_path())
    for suffix in ("-wal", "-shm"):
        if os.path.exists(c.audit_db_path() + suffix):
            os.unlink(c.audit_db_path() + suffix)
    con = sqlite3.connect(c.audit_db_path())
    con.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL,"
                " username TEXT NOT NULL, action TEXT NOT NULL, study_uid TEXT NOT NULL DEFAULT '',"
                " peer TEXT NOT NULL DEFAULT '')")
    con.executemany("INSERT INTO audit VALUES (?,?,?,?,?,?)", keep)
    con.commit()
    con.close()
    c.start()
    s = c.session()
    st, _, _ = s.request("GET", "/dicomweb/studies")
    eq(st, 200, "QIDO after the move")
    con = c.db(readonly=True)
    eq(con.execute("SELECT count(*) FROM main.sqlite_master WHERE name = 'audit'").fetchone()[0], 0,
       "index.db's audit table dropped")
    moved = con.execute("SELECT id, ts, username, action, study_uid, peer FROM aud.audit"
                        " WHERE id <= ? ORDER BY id", (rows[-1][0],)).fetchall()
    eq(moved, rows, "every row moved once, same ids")
    after = con.execute("SELECT action FROM aud.audit WHERE id > ?", (rows[-1][0],)).fetchall()
    check(("login",) in after and ("qido-studies",) in after, f"new rows appended: {after}")
    con.close()
    con = c.db()
    try:
        with con:
            con.execute("DELETE FROM audit")
        raise AssertionError("moved audit rows could be deleted")
    except sqlite3.DatabaseError:
        pass
    con.close()


# ------------------------------------------------------------------ static

@test
def static_files_spa_and_traversal():
    e = env()
    c = e["cloud"]

    def raw_get(path):
        conn = http_conn(c, timeout=30)
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), body

    st, h, body = raw_get("/")
    eq((st, b"INDEX" in body), (200, True), "index.html")
    check(h["Content-Type"].startswith("text/html"), h["Content-Type"])
    st, h, body = raw_get("/assets/app-3f2a9c.js")
    eq(st, 200, "asset")
    check("immutable" in h.get("Cache-Control", ""), "hashed asset cached")
    check(h["Content-Type"].startswith("text/javascript"), h["Content-Type"])
    st, h, body = raw_get("/studies/1.2.3/viewer")
    eq((st, b"INDEX" in body), (200, True), "SPA fallback")
    eq(h.get("Cache-Control"), "no-cache", "index revalidated")
    for p in ("/../secret.txt", "/..%2fsecret.txt", "/%2e%2e/%2e%2e/etc/passwd",
              "/assets/..%2f..%2fsecret.txt", "/.%2e/secret.txt", "/..%5csecret.txt",
              "/index.html%00.js", "/missing.js", "/assets/nope.css"):
        st, _, body = raw_get(p)
        eq(st, 404, f"GET {p}")
        check(b"TOP SECRET" not in body and b"root:" not in body, f"leak via {p}")


@test
def parallel_uploads_all_land():
    e = upload_all()
    import threading
    blobs = [variant(f, ".77")[1] for f in e["studies"]["mr"]["files"]]
    results, errors = [], []

    def worker(items):
        try:
            ed = Edge(e["cloud"])
            for b in items:
                results.append(ed.upload(b, chunk_size=CHUNK)["result"])
        except Exception as ex:  # reported below
            errors.append(repr(ex))

    threads = [threading.Thread(target=worker, args=(blobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    eq(errors, [], "errors in parallel uploads")
    eq(sorted(results), ["stored"] * len(blobs), "all stored")
    ds = pydicom.dcmread(io.BytesIO(blobs[0]))
    inst = qido(e["session"], path=f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances")
    eq(len(inst), len(blobs), "instances of the parallel study")


@test
def graceful_shutdown_and_restart():
    e = upload_all()
    c = e["cloud"]
    eq(c.stop(), 0, "exit code after SIGTERM (ASan leaks would make it non-zero)")
    c.start()
    e["session"] = c.session()
    res = qido(e["session"], "PatientID=PCT01")
    eq(len(res), 1, "index survives a restart")


if __name__ == "__main__":
    run()
