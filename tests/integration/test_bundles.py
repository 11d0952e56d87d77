#!/usr/bin/python3
"""test_bundles.py - bundles (several instances per upload object) and study manifests.

  ct_300_uploads_as_bundles            a 300-slice CT goes up in bundles through the real
                                       edge; every instance indexed once, byte-identical
                                       (archive sha256 == what the edge sent == original),
                                       spool drained, manifest says complete
  bundle_commit_idempotent_conflict    hand-made bundles (PROTOCOL.md format) with the
                                       signed test client: stored, repeated commit and
                                       re-declare give the same answer, a second bundle of
                                       the same instances is all "duplicate", a changed
                                       member is "conflict" (kept aside), a non-DICOM member
                                       "rejected", a bundle whose header lies is 422
  cut_mid_bundle_resends_one_chunk     the link is cut in the middle of a bundle; after
                                       the retry the bytes counted through faultproxy.py
                                       exceed the objects by at most one chunk (+ headers)
  manifest_reports_completeness        POST manifest before/after the last instance:
                                       complete false -> true; missing/mismatched counted;
                                       GET needs a session

Prints "N passed, N failed" last.
"""
import hashlib
import io
import json
import os
import sqlite3
import struct
import sys
import time

import pydicom

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yyharness as h  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from test_cloud_api import Edge as SignedClient  # noqa: E402
from test_edge_resilience import (Edge as ResEdge, gen_ct, sha256_file, sop_uids,  # noqa: E402
                                  xxh128_file)

# The imports above registered their modules' tests: run only this file's.
h._tests.clear()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def make_bundle(study_uid, members):
    """members: [(bytes, sop_uid, series_uid)] -> bundle bytes, as PROTOCOL.md says."""
    hdr = {"v": 1, "study_uid": study_uid,
           "members": [{"sop_uid": s, "series_uid": se, "sha256": hashlib.sha256(b).hexdigest(),
                        "size": len(b)} for b, s, se in members]}
    j = json.dumps(hdr, separators=(",", ":"), sort_keys=True).encode()
    return b"YYBNDL01" + struct.pack(">I", len(j)) + j + b"".join(b for b, _, _ in members)


def upload_bundle(cli, data, study_uid, n, chunk_size=64 * 1024):
    decl = {"v": 1, "kind": "bundle", "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), "chunk_size": chunk_size, "study_uid": study_uid, "members": n}
    st, body, _ = cli.request("POST", "/api/v1/objects", json.dumps(decl).encode())
    h.eq(st, 200, f"declare bundle: {body!r}")
    s = json.loads(body)
    oid, cs = s["object_id"], s["chunk_size"]
    if s["state"] != "committed":
        for i in range(s["nchunks"]):
            if i not in s["have"]:
                st, b = cli.put_chunk(oid, i, data[i * cs:(i + 1) * cs])
                h.eq(st, 204, f"chunk {i}: {b!r}")
    st, c = cli.commit(oid)
    return oid, st, c, s


def cloud_db(cloud):
    return cloud.db(readonly=True)


def manifest_status(cloud, study_uid, expect=200):
    return cloud.session().get_json(f"/api/v1/studies/{study_uid}/manifest", expect=expect)


# ---------------------------------------------------------------- tests

@h.test
def ct_300_uploads_as_bundles():
    m, files = gen_ct(300, seed=41)
    sent = sop_uids(files)
    cloud = h.Cloud(tls=False)
    proxy = FaultProxy(cloud.port)
    try:
        # The link is down while the CT arrives, so the edge has all of it when
        # it can send: bundles of the whole study, not a trickle of singles.
        proxy.down()
        edge = ResEdge(proxy.url, cloud.edge_id, cloud.secret,
                       upload={"compress": False, "parallel": 4, "manifest_quiet_ms": 300,
                               "bundle_max_bytes": 16 << 20})
        r = h.storescu(edge.ae, edge.port, files, extra=("-aet", "MODALITY"), timeout=600)
        h.eq(r.returncode, 0, f"storescu: {r.stderr[-2000:]}")
        proxy.up()
        h.wait_until(lambda: edge.counts()["DONE"] == 300, timeout=600, what="300 DONE")
        h.eq(edge.counts(), {"PENDING": 0, "UPLOADING": 0, "DONE": 300, "FAILED": 0}, "spool")
        con = cloud_db(cloud)
        try:
            rows = con.execute("SELECT sop_uid, path, sha256 FROM instances WHERE study_uid=?",
                               (m["study_uid"],)).fetchall()
            kinds = dict(con.execute("SELECT kind, COUNT(*) FROM uploads WHERE state='committed'"
                                     " GROUP BY kind").fetchall())
            conflicts = con.execute("SELECT COUNT(*) FROM conflicts").fetchone()[0]
        finally:
            con.close()
        h.eq(len(rows), 300, "instances indexed")
        h.eq(len({r[0] for r in rows}), 300, "each SOP Instance UID once")
        h.eq({r[0] for r in rows}, set(sent), "the instances sent")
        h.eq(conflicts, 0, "conflicts")
        spool = {r[0]: r for r in edge.rows()}
        for sop, path, sha in rows:
            h.eq(sha256_file(path), sha, f"archived bytes of {sop}")
            h.eq(sha, spool[sop][4], f"cloud hash of {sop} vs what the edge uploaded")
            # compress off: what was uploaded is the file the edge received and spooled
            h.eq(xxh128_file(spool[sop][3]), spool[sop][2], f"spooled original of {sop} vs its"
                 " checksum at receipt")
            h.eq(sha256_file(spool[sop][3]), sha, f"spooled original of {sop}")
        print(f"    committed objects by kind: {kinds}", flush=True)
        h.check(kinds.get("bundle", 0) >= 1, f"no bundles: {kinds}")
        h.check(sum(kinds.values()) <= 40, f"too many objects for 300 slices: {kinds}")
        # The manifest follows once the study is quiet.
        h.wait_until(lambda: "manifest study=" + m["study_uid"] in edge.all_logs(), timeout=60,
                     what="manifest sent")
        st = manifest_status(cloud, m["study_uid"])
        h.eq((st["expected"], st["received"], st["complete"]), (300, 300, True),
             f"manifest status {st}")
        h.eq(edge.stop(), 0, "edge exit code")
    finally:
        proxy.close()
        cloud.stop()


_data = {}


def small_study(n=6):
    if not _data:
        out = h.tempdir("yy-bundle-data-")
        ms = h.generate(out, "--only", "ct", "--ct-slices", str(n), "--seed", "43", "--quiet")
        mm = list(ms.values())[0]
        _data["m"] = mm
        _data["files"] = h.manifest_files(mm)
    return _data["m"], _data["files"]


def members_of(files):
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((read(f), ds.SOPInstanceUID, ds.SeriesInstanceUID))
    return out


@h.test
def bundle_commit_idempotent_conflict():
    m, files = small_study()
    cloud = h.Cloud(tls=False)
    try:
        cli = SignedClient(cloud)
        mem = members_of(files[:5])
        data = make_bundle(m["study_uid"], mem)
        oid, st, c, _ = upload_bundle(cli, data, m["study_uid"], 5)
        h.eq(st, 200, f"commit {c}")
        h.eq(c["result"], "bundle", "result")
        h.eq([x["result"] for x in c["members"]], ["stored"] * 5, "members stored")
        h.eq([x["sop_uid"] for x in c["members"]], [x[1] for x in mem], "member order")
        # Repeated commit and re-declare: the same answer, nothing stored twice.
        st, c2 = cli.commit(oid)
        h.eq((st, c2), (200, c), "repeated commit")
        _, st, c3, s = upload_bundle(cli, data, m["study_uid"], 5)
        h.eq(s["state"], "committed", "re-declared bundle state")
        h.eq((st, c3), (200, c), "commit after re-declare")
        # The same instances in another bundle (other order): all duplicate.
        data2 = make_bundle(m["study_uid"], list(reversed(mem)))
        _, st, c4, _ = upload_bundle(cli, data2, m["study_uid"], 5)
        h.eq([x["result"] for x in c4["members"]], ["duplicate"] * 5, "second bundle")
        # A changed member (same SOP UID, other bytes), a garbage member, a new one.
        ds = pydicom.dcmread(files[0])
        ds.InstitutionName = "Changed Hospital"
        buf = io.BytesIO()
        ds.save_as(buf, write_like_original=True)
        changed = buf.getvalue()
        garbage = b"this is not DICOM at all" * 10
        new = members_of(files[5:6])[0]
        data3 = make_bundle(m["study_uid"], [(changed, mem[0][1], mem[0][2]),
                                             (garbage, "1.2.3.999", mem[0][2]),
                                             mem[1], new])
        _, st, c5, _ = upload_bundle(cli, data3, m["study_uid"], 4)
        h.eq(st, 200, f"commit {c5}")
        h.eq([x["result"] for x in c5["members"]],
             ["conflict", "rejected", "duplicate", "stored"], "mixed bundle")
        con = cloud_db(cloud)
        try:
            n = con.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                            (m["study_uid"],)).fetchone()[0]
            conf = con.execute("SELECT sop_uid, sha256, path FROM conflicts").fetchall()
            arch = con.execute("SELECT sha256, path FROM instances WHERE sop_uid=?",
                               (mem[0][1],)).fetchone()
        finally:
            con.close()
        h.eq(n, 6, "instances indexed once each")
        h.eq([(c[0], c[1]) for c in conf], [(mem[0][1], hashlib.sha256(changed).hexdigest())],
             "conflict kept aside")
        h.eq(sha256_file(conf[0][2]), conf[0][1], "conflicting copy's bytes")
        h.eq(arch[0], hashlib.sha256(mem[0][0]).hexdigest(), "original not overwritten")
        h.eq(sha256_file(arch[1]), arch[0], "archived original bytes")
        # A header that lies about a member's size: the bundle is refused as a whole.
        bad = bytearray(make_bundle(m["study_uid"], mem[2:4]))
        j = json.loads(bad[12:12 + struct.unpack(">I", bad[8:12])[0]])
        j["members"][0]["size"] += 1
        jb = json.dumps(j, separators=(",", ":"), sort_keys=True).encode()
        bad = b"YYBNDL01" + struct.pack(">I", len(jb)) + jb + mem[2][0] + mem[3][0][:-1]
        _, st, c6, _ = upload_bundle(cli, bytes(bad), m["study_uid"], 2)
        h.eq(st, 422, f"lying header: {c6}")
        h.eq(c6["error"], "bad_object", "error code")
        # A declaration of kind bundle is validated like any other.
        st, body, _ = cli.request("POST", "/api/v1/objects", json.dumps(
            {"v": 1, "kind": "bundle", "sha256": "0" * 64, "size": 100, "chunk_size": 65536,
             "study_uid": m["study_uid"], "members": 0}).encode())
        h.eq(st, 400, f"zero members: {body!r}")
    finally:
        cloud.stop()


@h.test
def cut_mid_bundle_resends_one_chunk():
    m, files = gen_ct(60, seed=42)
    cloud = h.Cloud(tls=False)
    proxy = FaultProxy(cloud.port)
    chunk = 1 << 20
    try:
        proxy.down()
        edge = ResEdge(proxy.url, cloud.edge_id, cloud.secret,
                       upload={"compress": False, "parallel": 1, "chunk_size": chunk,
                               "bundle_max_bytes": 16 << 20, "manifest_quiet_ms": -1,
                               "retry_min_ms": 200, "retry_max_ms": 500})
        r = h.storescu(edge.ae, edge.port, files, extra=("-aet", "MODALITY"), timeout=600)
        h.eq(r.returncode, 0, f"storescu: {r.stderr[-2000:]}")
        h.wait_until(lambda: edge.status()["unprepared"] == 0, what="all prepared")
        # Cut 5.5 MiB into the upload: in the middle of the 6th chunk of the first bundle.
        proxy.cut_after(5 * chunk + chunk // 2)
        base, resets = proxy.bytes_up, proxy.resets
        proxy.up()
        h.wait_until(lambda: edge.counts()["DONE"] == 60, timeout=300, what="60 DONE")
        h.eq(proxy.resets - resets, 1, "one cut")
        up = proxy.bytes_up - base
        con = cloud_db(cloud)
        try:
            objs = con.execute("SELECT kind, size FROM uploads WHERE state='committed'"
                               ).fetchall()
        finally:
            con.close()
        obj_bytes = sum(o[1] for o in objs)
        requests = sum(-(-o[1] // chunk) + 2 for o in objs) + 4      # chunks + declare + commit
        overhead = requests * 2048 + 64 * 1024   # request headers, JSON bodies, retries' declares
        resent = up - obj_bytes
        st = edge.status()
        print(f"    objects {[(k, s) for k, s in objs]}; upstream {up} bytes, objects "
              f"{obj_bytes}, beyond the objects {resent} (limit 1 chunk {chunk} + {overhead} "
              f"headers); errors {st['errors']}", flush=True)
        h.check(any(k == "bundle" for k, _ in objs), "no bundle")
        h.check(resent <= chunk + overhead, f"re-sent {resent} bytes > one chunk + headers")
        # And more than nothing: the cut chunk itself was sent twice.
        h.check(resent >= chunk // 2, f"the cut chunk was not re-sent? {resent}")
        con = cloud_db(cloud)
        try:
            n = con.execute("SELECT COUNT(DISTINCT sop_uid) FROM instances").fetchone()[0]
        finally:
            con.close()
        h.eq(n, 60, "instances indexed")
        h.eq(edge.stop(), 0, "edge exit code")
    finally:
        proxy.close()
        cloud.stop()


@h.test
def manifest_reports_completeness():
    m, files = small_study()
    cloud = h.Cloud(tls=False)
    try:
        cli = SignedClient(cloud)
        mem = members_of(files)
        entries = [{"series_uid": se, "sop_uid": s, "sha256": hashlib.sha256(b).hexdigest()}
                   for b, s, se in mem]
        path = f"/api/v1/studies/{m['study_uid']}/manifest"
        # No manifest yet.
        manifest_status(cloud, m["study_uid"], expect=404)
        body = json.dumps({"v": 1, "study_uid": m["study_uid"], "instances": entries}).encode()
        for b, _, _ in mem[:4]:
            h.eq(cli.upload(b)["result"], "stored", "upload")
        st, ans, _ = cli.request("POST", path, body)
        h.eq(st, 200, f"manifest: {ans!r}")
        a = json.loads(ans)
        h.eq((a["expected"], a["received"], a["missing"], a["complete"]), (6, 4, 2, False),
             f"before the last instances: {a}")
        for b, _, _ in mem[4:]:
            cli.upload(b)
        st = manifest_status(cloud, m["study_uid"])
        h.eq((st["expected"], st["received"], st["missing"], st["complete"]), (6, 6, 0, True),
             f"after: {st}")
        # A manifest naming other bytes for an instance: mismatched, not complete.
        entries[0]["sha256"] = "a" * 64
        body = json.dumps({"v": 1, "study_uid": m["study_uid"], "instances": entries}).encode()
        st, ans, _ = cli.request("POST", path, body)
        a = json.loads(ans)
        h.eq((a["received"], a["mismatched"], a["complete"]), (5, 1, False), f"mismatch: {a}")
        # Wrong study in the path, bad JSON, unsigned: refused.
        st, ans, _ = cli.request("POST", "/api/v1/studies/1.2.3/manifest", body)
        h.eq(st, 400, f"study differs from the path: {ans!r}")
        st, ans, _ = cli.request("POST", path, b'{"v":1}')
        h.eq(st, 400, f"no instances: {ans!r}")
        st, ans, _ = cli.request("POST", path, body, key=b"k" * 32)
        h.eq(st, 401, f"badly signed manifest: {ans!r}")
        conn = h.http_conn(cloud)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            h.eq(r.status, 400, "unsigned manifest (no X-YY-Version: 400 unsupported_version)")
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            h.eq(r.status, 401, "GET without a session")
        finally:
            conn.close()
        # Annotations still answer under /api/v1/studies/.
        s = cloud.session()
        st2, _, _ = s.request("GET", f"/api/v1/studies/{m['study_uid']}/annotations")
        h.check(st2 in (200, 404), f"annotations route: {st2}")
    finally:
        cloud.stop()


if __name__ == "__main__":
    h.run()
