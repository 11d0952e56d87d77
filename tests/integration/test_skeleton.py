#!/usr/bin/python3
"""The walking skeleton end to end: modality -> edge -> cloud -> DICOMweb.

Real peers: DCMTK's echoscu/storescu as the modality, pydicom to compare
pixel data, and the real yunying-edge and yunying-cloud binaries.
"""
import io
import json
import os
import subprocess
import urllib.parse

import numpy as np
import pydicom
import tempfile

from yyharness import (manifest_files, CLOUD_BIN, EDGE_BIN, Cloud, Edge, RawScu, RawAssociationRejected, check,
                       dataset_bytes_implicit, dataset_to_implicit, echoscu, eq, generate, parse_multipart, run, storescu,
                       tag_value, tempdir, test, wait_until, write_json)

_env = {}


def env():
    """One cloud + edge and two generated studies, shared by the tests below."""
    if _env:
        return _env
    data = tempdir("yy-data-")
    ct = generate(os.path.join(data, "ct"), "--only", "ct", "--ct-slices", "100",
                  "--patient-id", "YY0001", "--patient-name", "张^三", "--study-date", "20260315",
                  "--accession", "ACC-0001", "--seed", "1")
    mr = generate(os.path.join(data, "mr"), "--only", "mr", "--patient-id", "YY0002",
                  "--patient-name", "Li^Si", "--study-date", "20260401",
                  "--accession", "ACC-0002", "--seed", "2")
    cloud = Cloud()
    # The edge compresses to JPEG-LS lossless before upload (issue 3); every
    # pixel comparison below decodes independently with DCMTK's dcmdjpls.
    edge = Edge(cloud, extra={"upload": {"compress": True}})
    _env.update(cloud=cloud, edge=edge, ct=list(ct.values())[0], mr=list(mr.values())[0],
                session=cloud.session())
    return _env


JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def pixels(data):
    """Pixel array of a Part 10 file in memory; JPEG-LS is decoded by dcmdjpls."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS:
        with tempfile.TemporaryDirectory(prefix="yy-djpls-") as d:
            src, dst = os.path.join(d, "in.dcm"), os.path.join(d, "out.dcm")
            with open(src, "wb") as f:
                f.write(data)
            r = subprocess.run(["dcmdjpls", src, dst], capture_output=True, text=True)
            check(r.returncode == 0, f"dcmdjpls failed: {r.stderr}")
            ds = pydicom.dcmread(dst)
    return ds, ds.pixel_array


def study_count(session, study_uid):
    res = session.get_json(f"/dicomweb/studies?StudyInstanceUID={study_uid}"
                           "&includefield=00201208")
    if not res:
        return 0
    return int(tag_value(res[0], "00201208") or 0)


@test
def echo_succeeds():
    e = env()
    r = echoscu(e["edge"].ae, e["edge"].port)
    eq(r.returncode, 0, f"echoscu: {r.stderr}")


@test
def unknown_called_ae_rejected():
    e = env()
    r = echoscu("NOT_OUR_AE", e["edge"].port)
    check(r.returncode != 0, "echoscu to a wrong called AE title must fail")
    check("reject" in (r.stdout + r.stderr).lower(), f"expected an association rejection: {r.stderr}")
    try:
        RawScu(e["edge"].port, "NOT_OUR_AE")
        raise AssertionError("raw association with a wrong called AE was accepted")
    except RawAssociationRejected:
        pass
    eq(echoscu(e["edge"].ae, e["edge"].port).returncode, 0, "edge serves after a rejection")


@test
def ct_100_slices_arrive_pixel_identical():
    e = env()
    ct = e["ct"]
    files = manifest_files(ct)
    eq(len(files), 100, "generated slices")
    r = storescu(e["edge"].ae, e["edge"].port, files)
    eq(r.returncode, 0, f"storescu: {r.stderr[-2000:]}")
    s = e["session"]
    study = ct["study_uid"]
    wait_until(lambda: study_count(s, study) == 100, timeout=180,
               what="all 100 instances indexed in the cloud")
    series = s.get_json(f"/dicomweb/studies/{study}/series")
    eq(len(series), 1, "series count")
    series_uid = tag_value(series[0], "0020000E")
    # Whole series by WADO-RS, multipart/related application/dicom.
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; '
                                       f'transfer-syntax={EXPLICIT_LE}'})
    ctype = h.get("Content-Type", "")
    check(ctype.startswith("multipart/related"), f"content type {ctype}")
    parts = parse_multipart(ctype, body)
    eq(len(parts), 100, "instances in the series retrieve")
    sent = {}
    for f in files:
        ds = pydicom.dcmread(f)
        sent[ds.SOPInstanceUID] = ds
    for hdrs, data in parts:
        check(hdrs.get("content-type", "").startswith("application/dicom"), f"part type {hdrs}")
        got = pydicom.dcmread(io.BytesIO(data))
        eq(got.file_meta.TransferSyntaxUID, EXPLICIT_LE, "transcoded on request")
        orig = sent.pop(got.SOPInstanceUID)
        check(np.array_equal(got.pixel_array, orig.pixel_array),
              f"pixel data differs for {got.SOPInstanceUID}")
        eq(got.PatientID, orig.PatientID, "PatientID")
    eq(len(sent), 0, "every sent instance came back")
    # One instance alone, by WADO-RS and by WADO-URI.
    one = files[37]
    ds = pydicom.dcmread(one)
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}/instances/{ds.SOPInstanceUID}")
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 1, "single instance retrieve")
    stored, px = pixels(parts[0][1])
    eq(pydicom.dcmread(io.BytesIO(parts[0][1])).file_meta.TransferSyntaxUID, JPEG_LS_LOSSLESS,
       "the edge uploaded JPEG-LS lossless and the cloud serves it as stored")
    check(np.array_equal(px, ds.pixel_array), "WADO-RS instance pixels (dcmdjpls decode)")
    q = urllib.parse.urlencode({"requestType": "WADO", "studyUID": study, "seriesUID": series_uid,
                                "objectUID": ds.SOPInstanceUID, "contentType": "application/dicom"})
    h, body = s.get(f"/wado?{q}")
    check(np.array_equal(pixels(body)[1], ds.pixel_array), "WADO-URI pixels")
    # Series metadata as DICOM JSON, pixel data by reference only.
    meta = s.get_json(f"/dicomweb/studies/{study}/series/{series_uid}/metadata")
    eq(len(meta), 100, "metadata entries")
    check(all("BulkDataURI" in m.get("7FE00010", {}) for m in meta), "pixel data as BulkDataURI")
    check(all(tag_value(m, "00080018") for m in meta), "SOP Instance UID in metadata")


@test
def qido_finds_study_by_each_key():
    e = env()
    mr = e["mr"]
    r = storescu(e["edge"].ae, e["edge"].port, manifest_files(mr))
    eq(r.returncode, 0, f"storescu MR: {r.stderr[-1000:]}")
    s = e["session"]
    wait_until(lambda: study_count(s, mr["study_uid"]) == len(manifest_files(mr)), timeout=120,
               what="MR study indexed")
    ct_uid, mr_uid = e["ct"]["study_uid"], mr["study_uid"]
    if study_count(s, ct_uid) != 100:
        raise AssertionError("CT study must be loaded first (ct_100_slices test)")

    def uids(query):
        return sorted(tag_value(x, "0020000D") for x in s.get_json("/dicomweb/studies?" + query))

    cases = [
        ("PatientID=YY0001", [ct_uid]),
        ("PatientID=YY0002", [mr_uid]),
        ("PatientID=NOPE", []),
        ("PatientName=" + urllib.parse.quote("张*"), [ct_uid]),
        ("PatientName=li*", [mr_uid]),
        ("PatientName=L%3F%5ESi", [mr_uid]),
        ("StudyDate=20260315", [ct_uid]),
        ("StudyDate=20260301-20260331", [ct_uid]),
        ("StudyDate=20260316-", [mr_uid]),
        ("StudyDate=-20260315", [ct_uid]),
        ("StudyDate=20260101-20261231", sorted([ct_uid, mr_uid])),
        ("AccessionNumber=ACC-0002", [mr_uid]),
        ("ModalitiesInStudy=CT", [ct_uid]),
        ("ModalitiesInStudy=MR", [mr_uid]),
        ("StudyInstanceUID=" + ct_uid, [ct_uid]),
    ]
    for q, want in cases:
        eq(uids(q), want, q)
    # limit/offset page through the two studies.
    page1 = s.get_json("/dicomweb/studies?limit=1&offset=0")
    page2 = s.get_json("/dicomweb/studies?limit=1&offset=1")
    eq(len(page1), 1, "limit=1")
    eq(len(page2), 1, "offset=1")
    check(tag_value(page1[0], "0020000D") != tag_value(page2[0], "0020000D"), "pages differ")
    # Series and instance level.
    series = s.get_json(f"/dicomweb/studies/{ct_uid}/series?Modality=CT")
    eq(len(series), 1, "CT series")
    suid = tag_value(series[0], "0020000E")
    inst = s.get_json(f"/dicomweb/studies/{ct_uid}/series/{suid}/instances")
    eq(len(inst), 100, "instance level")
    inst = s.get_json(f"/dicomweb/studies/{ct_uid}/series/{suid}/instances?limit=10&offset=95")
    eq(len(inst), 5, "instance level with offset")
    # Names come back in UTF-8.
    got = s.get_json("/dicomweb/studies?PatientID=YY0001")
    eq(tag_value(got[0], "00100010"), {"Alphabetic": "张^三"}, "PatientName JSON")
    # A malformed query is a 400, not a crash.
    st, _, _ = s.request("GET", "/dicomweb/studies?StudyDate=2026-03-15")
    eq(st, 400, "malformed date")


@test
def viewer_deep_links_serve_the_app():
    e = env()
    from yyharness import HttpSession
    anon = HttpSession(e["cloud"].url)
    study = e["ct"]["study_uid"]
    for path in (f"/studies/{study}/viewer", f"/viewer/{study}", "/login"):
        st, h, body = anon.request("GET", path)
        eq(st, 200, path)
        check(h.get("Content-Type", "").startswith("text/html") and b"<div id=" in body,
              f"{path} must serve the web app's index.html")
    st, _, _ = anon.request("GET", "/assets/missing-1234.js")
    eq(st, 404, "a missing asset is a 404, not the app")
    # Scripts go out gzip-compressed to browsers that accept it, identical once inflated.
    import gzip
    import re
    _, _, index = anon.request("GET", "/")
    script = re.search(rb'src="(/assets/[^"]+\.js)"', index).group(1).decode()
    st, h, raw = anon.request("GET", script)
    eq(st, 200, script)
    check("Content-Encoding" not in h, "no gzip unless asked")
    st, h, z = anon.request("GET", script, headers={"Accept-Encoding": "gzip"})
    eq(h.get("Content-Encoding"), "gzip", "gzip twin served")
    eq(gzip.decompress(z), raw, "the gzip twin inflates to the script")
    check(len(z) < len(raw) / 2, "compressed")


@test
def unauthenticated_requests_refused():
    e = env()
    from yyharness import HttpSession
    anon = HttpSession(e["cloud"].url)
    for path in ("/dicomweb/studies", "/wado?requestType=WADO", "/api/v1/me"):
        st, _, _ = anon.request("GET", path)
        eq(st, 401, path)
    st, _, _ = anon.request("POST", "/api/v1/login",
                            json.dumps({"username": "doctor", "password": "wrong"}).encode(),
                            {"Content-Type": "application/json"})
    eq(st, 401, "wrong password")


@test
def bad_datasets_fail_and_edge_keeps_serving():
    e = env()
    s = e["session"]
    before = len(s.get_json("/dicomweb/studies"))
    before_ct = study_count(s, e["ct"]["study_uid"])
    src = manifest_files(e["ct"])[0]
    good = dataset_bytes_implicit(src)
    scu = RawScu(e["edge"].port, e["edge"].ae)
    check(scu.accepted, "CT storage context accepted")
    # Truncated in the middle of the pixel data.
    st = scu.c_store("2.25.1111", good[: len(good) // 2])
    check(st is None or st >= 0xA000 or (0xC000 <= st <= 0xCFFF), f"truncated dataset status {st}")
    scu.release()
    # Garbage bytes.
    scu = RawScu(e["edge"].port, e["edge"].ae)
    st = scu.c_store("2.25.2222", os.urandom(4000))
    check(st is None or st != 0, f"garbage dataset status {st}")
    scu.release()
    # A well-formed dataset without its Study Instance UID.
    ds = pydicom.dcmread(src)
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "2.25.3333"
    scu = RawScu(e["edge"].port, e["edge"].ae)
    st = scu.c_store("2.25.3333", dataset_to_implicit(ds))
    check(st is not None and st != 0 and st not in (0xB000, 0xB007, 0xB006),
          f"dataset without Study UID must fail with a status, got {st}")
    scu.release()
    eq(echoscu(e["edge"].ae, e["edge"].port).returncode, 0, "edge still serves")
    # A good instance after the bad ones still goes through, and nothing bad was uploaded.
    mr = e["mr"]
    r = storescu(e["edge"].ae, e["edge"].port, manifest_files(mr)[:1])
    eq(r.returncode, 0, "good store after bad ones")
    eq(len(s.get_json("/dicomweb/studies")), before, "no new study from bad input")
    eq(study_count(s, e["ct"]["study_uid"]), before_ct, "no bad instance joined the CT study")


@test
def invalid_config_exits_naming_the_key():
    d = tempdir("yy-badconf-")
    for binary, cfg, key in (
        (EDGE_BIN, {"scp": {"port": 11112, "ae_titel": "X"}}, "scp.ae_titel"),
        (EDGE_BIN, {"scp": {"port": 700000}}, "scp.port"),
        (CLOUD_BIN, {"http": {"port": 8080}, "archiv": {}}, "archiv"),
        (CLOUD_BIN, {"http": {"port": "80"}}, "http.port"),
    ):
        path = write_json(os.path.join(d, "bad.json"), cfg)
        r = subprocess.run([binary, "--config", path], capture_output=True, text=True, timeout=30)
        check(r.returncode != 0, f"{binary} accepted {cfg}")
        check(key in r.stderr + r.stdout, f"message must name {key}: {r.stderr}")
    r = subprocess.run([EDGE_BIN, "--config", os.path.join(d, "missing.json")],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode != 0 and "missing.json" in r.stderr, "missing config file reported")


@test
def full_spool_answers_out_of_resources():
    e = env()
    # An edge whose spool needs more free space than any disk has: every store
    # must be refused with A700 and nothing may reach the cloud.
    full = Edge(e["cloud"], ae="YY_FULL", extra={"spool": {"min_free_mb": 1 << 30}})
    s = e["session"]
    before = len(s.get_json("/dicomweb/studies"))
    data = tempdir("yy-full-")
    m = list(generate(data, "--only", "mr", "--patient-id", "YYFULL", "--seed", "9").values())[0]
    r = storescu(full.ae, full.port, manifest_files(m), extra=("-v",))
    out = (r.stdout + r.stderr).lower().replace(" ", "")
    check("refused:outofresources" in out, f"expected status A7xx (Out of Resources): {out[-500:]}")
    eq(echoscu(full.ae, full.port).returncode, 0, "full edge still answers echo")
    objects = os.path.join(full.dir, "spool")
    leftovers = [f for root, _, fs in os.walk(objects) for f in fs if f.endswith(".dcm") or f.startswith("tmp")]
    eq(leftovers, [], "nothing half-written left in the spool")
    eq(len(s.get_json("/dicomweb/studies?PatientID=YYFULL")), 0, "nothing uploaded")
    eq(len(s.get_json("/dicomweb/studies")), before, "study count unchanged")
    full.stop()


if __name__ == "__main__":
    run()
