#!/usr/bin/python3
"""test_dicomweb.py - DICOMweb conformance of yunying-cloud (PS3.18): STOW-RS,
QIDO-RS per level and matching rule, bad queries, WADO-RS with transfer-syntax
negotiation (JPEG-LS as stored, transcoded to Explicit VR Little Endian),
frames, bulk data, ETag/If-None-Match, gzip, DICOM JSON shape.

Responses are parsed with pydicom (Dataset.from_json, dcmread) and, for an
independent client, with npm dicomweb-client (tests/dicomweb-client/check.js;
install with `npm ci --prefix tests/dicomweb-client`).
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.parse

import numpy as np
import pydicom
from pydicom.dataset import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from yyharness import (TOP, Cloud, HttpSession, check, eq, generate,  # noqa: E402
                       parse_multipart, run, tag_value, tempdir, test, test_ca)

ELE = "1.2.840.10008.1.2.1"
JLS = "1.2.840.10008.1.2.4.80"
CLIENT_DIR = os.path.join(TOP, "tests", "dicomweb-client")
_env = {}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def multipart(datas, boundary="yy-test-boundary-42", ctypes=None):
    body = b""
    for i, d in enumerate(datas):
        ct = (ctypes or {}).get(i, "application/dicom")
        body += f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n".encode() + d + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(s, datas, path="/dicomweb/studies", **kw):
    body, ctype = multipart(datas, **kw)
    st, h, out = s.request("POST", path, body, {"Content-Type": ctype})
    return st, h, json.loads(out) if out else None


def make_jls(src, dst, suffix):
    """A JPEG-LS Lossless copy of src as a new instance (own series), via dcmcjpls."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID += suffix
    ds.SOPInstanceUID += suffix
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber = 90
    ds.SeriesDescription = "JPEG-LS copy"
    native = dst + ".native.dcm"
    ds.save_as(native, write_like_original=False)
    r = subprocess.run(["dcmcjpls", "--encode-lossless", native, dst], capture_output=True,
                       text=True, timeout=120)
    check(r.returncode == 0, f"dcmcjpls: {r.stderr}")
    eq(pydicom.dcmread(dst).file_meta.TransferSyntaxUID, JLS, "dcmcjpls output syntax")
    return native


def env():
    if _env:
        return _env
    data = tempdir("yy-dw-data-")
    gen_ct = generate(os.path.join(data, "ct"), "--only", "ct", "--ct-slices", "6", "--quiet",
                      "--patient-id", "PDW01", "--patient-name", "Zhang^San",
                      "--study-date", "20260315", "--accession", "ACCDW01")
    gen_mr = generate(os.path.join(data, "mr"), "--only", "mr,xa", "--quiet",
                      "--patient-id", "PDW02", "--patient-name", "Li^Si",
                      "--study-date", "20250102", "--accession", "ACCDW02")
    studies = {}
    for m in list(gen_ct.values()) + list(gen_mr.values()):
        m["files"] = [os.path.join(m["_dir"], i["file"]) for se in m["series"]
                      for i in se["instances"]]
        studies[m["kind"]] = m
    ct0 = studies["ct"]["files"][0]
    jls = os.path.join(data, "ct-jls.dcm")
    jls_native = make_jls(ct0, jls, ".77")
    cloud = Cloud()
    s = cloud.session()
    _env.update(cloud=cloud, s=s, studies=studies, jls=jls, jls_native=jls_native, data=data,
                loaded=False)
    return _env


def loaded():
    """Everything STOWed once (the STOW test checks the answer in detail)."""
    e = env()
    if not e["loaded"]:
        files = [f for k in ("ct", "mr", "xa") for f in e["studies"][k]["files"]] + [e["jls"]]
        st, _, out = stow(e["s"], [read(f) for f in files])
        eq(st, 200, f"STOW of the fixtures: {out}")
        e["loaded"] = True
    return e


def qido(s, path, q=""):
    h, body = s.get(path + ("?" + q if q else ""))
    return json.loads(body) if body else []


def uids(res, tag):
    return sorted(tag_value(r, tag) for r in res)


def ds_of(path):
    return pydicom.dcmread(path, stop_before_pixels=True)


# ------------------------------------------------------------------ STOW-RS

@test
def stow_stores_reports_and_audits():
    e = env()
    s = e["s"]
    ct = e["studies"]["ct"]
    datas = [read(f) for f in ct["files"]]
    st, h, out = stow(s, datas)
    eq(st, 200, f"STOW: {out}")
    eq(h.get("Content-Type"), "application/dicom+json", "STOW answer type")
    refs = out["00081199"]["Value"]
    eq(len(refs), len(datas), "ReferencedSOPSequence items")
    check("00081198" not in out, "no FailedSOPSequence")
    sops = sorted(ds_of(f).SOPInstanceUID for f in ct["files"])
    eq(sorted(tag_value(r, "00081155") for r in refs), sops, "referenced SOP UIDs")
    eq(tag_value(refs[0], "00081150"), ds_of(ct["files"][0]).SOPClassUID, "SOP class")
    check(tag_value(out, "00081190").endswith("/dicomweb/studies/" + ct["study_uid"]),
          "study RetrieveURL")
    check(tag_value(refs[0], "00081190").startswith("https://127.0.0.1:"), "instance RetrieveURL")
    Dataset.from_json(out)   # pydicom accepts the answer as DICOM JSON
    # Again: duplicates are success (stored once).
    st, _, out = stow(s, datas[:2])
    eq(st, 200, "re-STOW of the same bytes")
    # Same SOP Instance UID, other bytes: conflict -> failed (0x0111), kept aside.
    ds = pydicom.dcmread(ct["files"][0])
    ds.StudyDescription = "changed"
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=True)
    st, _, out = stow(s, [buf.getvalue()])
    eq(st, 409, f"conflicting instance: {out}")
    eq(tag_value(out["00081198"]["Value"][0], "00081197"), 0x0111, "FailureReason duplicate")
    # Garbage next to a good new instance: 202, one of each.
    mr0 = read(e["studies"]["mr"]["files"][0])
    st, _, out = stow(s, [b"not dicom at all" * 10, mr0])
    eq(st, 202, f"partial success: {out}")
    eq(tag_value(out["00081198"]["Value"][0], "00081197"), 0xC000, "FailureReason garbage")
    eq(len(out["00081199"]["Value"]), 1, "the good one stored")
    # Study-targeted STOW with an instance of another study: A900.
    st, _, out = stow(s, [mr0], path="/dicomweb/studies/" + ct["study_uid"])
    eq(st, 409, "study mismatch")
    eq(tag_value(out["00081198"]["Value"][0], "00081197"), 0xA900, "FailureReason mismatch")
    st, _, out = stow(s, [read(ct["files"][1])], path="/dicomweb/studies/" + ct["study_uid"])
    eq(st, 200, "study-targeted STOW")
    # Media types, framing, auth.
    st, _, _ = s.request("POST", "/dicomweb/studies", b"{}", {"Content-Type": "application/json"})
    eq(st, 415, "JSON body")
    st, _, _ = s.request("POST", "/dicomweb/studies", b"x",
                         {"Content-Type": 'multipart/related; type="application/dicom+xml";'
                                          ' boundary=a'})
    eq(st, 415, "XML metadata STOW")
    st, _, _ = s.request("POST", "/dicomweb/studies", b"--a\r\nno end",
                         {"Content-Type": 'multipart/related; type="application/dicom"; boundary=a'})
    eq(st, 400, "broken multipart")
    st, _, _ = s.request("POST", "/dicomweb/studies", b"x",
                         {"Content-Type": 'multipart/related; type="application/dicom"'})
    eq(st, 400, "no boundary")
    anon = HttpSession(e["cloud"].url)
    body, ctype = multipart(datas[:1])
    st, _, _ = anon.request("POST", "/dicomweb/studies", body, {"Content-Type": ctype})
    eq(st, 401, "STOW without a session")
    con = e["cloud"].db()
    n = con.execute("SELECT count(*) FROM audit WHERE action='stow' AND study_uid=?",
                    (ct["study_uid"],)).fetchone()[0]
    con.close()
    check(n >= 2, f"STOW audited ({n})")


@test
def stow_large_body_and_wado_roundtrip_pixel_identical():
    e = env()
    s = e["s"]
    d = tempdir("yy-dw-big-")
    gen = generate(d, "--only", "ct", "--ct-slices", "24", "--quiet", "--patient-id", "PDWBIG",
                   "--study-date", "20240101")
    m = list(gen.values())[0]
    files = [os.path.join(m["_dir"], i["file"]) for se in m["series"] for i in se["instances"]]
    datas = [read(f) for f in files]
    check(sum(map(len, datas)) > 9 << 20, "body above the in-memory limit (streamed to a file)")
    st, _, out = stow(s, datas)
    eq(st, 200, f"large STOW: {out}")
    ds0 = ds_of(files[0])
    h, body = s.get(f"/dicomweb/studies/{ds0.StudyInstanceUID}/series/{ds0.SeriesInstanceUID}")
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), len(files), "series retrieve")
    sent = {ds_of(f).SOPInstanceUID: f for f in files}
    for hdrs, data in parts:
        got = pydicom.dcmread(io.BytesIO(data))
        eq(data, read(sent[got.SOPInstanceUID]), "bytes as stored")
        check(np.array_equal(got.pixel_array, pydicom.dcmread(sent[got.SOPInstanceUID]).pixel_array),
              "pixel-identical")
    inst = qido(s, f"/dicomweb/studies/{ds0.StudyInstanceUID}/series/{ds0.SeriesInstanceUID}"
                   "/instances")
    eq(len(inst), len(files), "QIDO finds every STOWed instance")


# ------------------------------------------------------------------ QIDO-RS

@test
def qido_study_level_matching():
    e = loaded()
    s = e["s"]
    ct, mr = e["studies"]["ct"], e["studies"]["mr"]
    ctu, mru = ct["study_uid"], mr["study_uid"]
    mine = {ctu, mru, e["studies"]["xa"]["study_uid"]}

    def q(query):
        return [u for u in uids(qido(s, "/dicomweb/studies", query), "0020000D") if u in mine]

    xau = e["studies"]["xa"]["study_uid"]
    eq(q("PatientID=PDW01"), [ctu], "PatientID exact")
    eq(q("PatientID=PDW0?"), sorted(mine), "PatientID ?")
    eq(q("PatientID=*W01"), [ctu], "PatientID leading *")
    eq(q("PatientName=zhang*"), [ctu], "PN case-insensitive wildcard")
    eq(q("PatientName=Zhang%5ESan"), [ctu], "PN exact")
    eq(q("PatientName=Zhang"), [], "PN exact is not a prefix match")
    eq(q("00100010=Li*"), sorted([mru, xau]), "PN by tag")
    eq(q("StudyDate=20260315"), [ctu], "date exact")
    eq(q("StudyDate=20250101-20250131"), sorted([mru, xau]), "date range")
    eq(q("StudyDate=20260101-"), [ctu], "date open end")
    eq(q("StudyDate=-20251231"), sorted([mru, xau]), "date open start")
    eq(q("StudyDate=20260316-"), [], "date range excludes")
    t = tag_value(qido(s, "/dicomweb/studies", "StudyInstanceUID=" + ctu)[0], "00080030")
    check(t and len(t) >= 4, f"StudyTime present: {t}")
    eq(q(f"StudyTime={t[:4]}"), [ctu] if t[:4] != tag_value(
        qido(s, "/dicomweb/studies", "StudyInstanceUID=" + mru)[0], "00080030")[:4] else
        sorted([ctu, mru]), "time prefix")
    eq(ctu in q(f"StudyTime={t[:2]}-{t[:2]}59"), True, "time range HH-HHMM")
    eq(ctu in q(f"StudyTime=-{t[:2]}"), True, "time upper bound HH includes the hour")
    hh = int(t[:2])
    if hh > 0:
        eq(ctu in q(f"StudyTime=-{hh - 1:02d}59"), False, "time upper bound excludes")
    eq(q(f"StudyInstanceUID={ctu},{mru}"), sorted([ctu, mru]), "UID list with commas")
    eq(q(f"StudyInstanceUID={ctu}%5C{mru}"), sorted([ctu, mru]), "UID list with backslash")
    eq(q("AccessionNumber=ACCDW0*"), sorted(mine), "accession wildcard")
    eq(q("ModalitiesInStudy=CT"), [ctu], "ModalitiesInStudy")
    eq(q("ModalitiesInStudy=XA,MR"), sorted([mru, xau]), "ModalitiesInStudy list")
    eq(q("PatientID=PDW02&ModalitiesInStudy=XA"), [xau], "combined keys")
    eq(q("PatientID=PDW01&fuzzymatching=false"), [ctu], "fuzzymatching=false accepted")
    st, h, body = s.request("GET", "/dicomweb/studies?PatientName=zh*&fuzzymatching=true")
    eq(st, 200, "fuzzymatching=true")
    check("299" in h.get("Warning", ""), "fuzzymatching=true answered with a warning")
    # includefield
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={ctu}&includefield=00101010"
                                     "&includefield=PatientWeight,StudyDescription")
    check("00101010" in r[0] and r[0]["00101010"]["vr"] == "AS", "includefield by tag")
    check("00101030" in r[0], "includefield by keyword")
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={ctu}&includefield=all")
    check("00100030" in r[0] and "00200010" in r[0], "includefield=all")
    check("00280010" not in r[0], "includefield=all keeps to study attributes")
    # limit / offset
    every = uids(qido(s, "/dicomweb/studies"), "0020000D")
    page = [tag_value(x, "0020000D") for x in qido(s, "/dicomweb/studies", "limit=2")]
    page2 = [tag_value(x, "0020000D") for x in qido(s, "/dicomweb/studies", "limit=2&offset=2")]
    eq(len(page), 2, "limit")
    check(not set(page) & set(page2), "offset moves the window")
    st, h, _ = s.request("GET", "/dicomweb/studies?limit=1")
    check("299" in h.get("Warning", ""), "warning when more results exist")
    st, h, body = s.request("GET", "/dicomweb/studies?limit=99999999999")
    eq(st, 200, "huge limit is clamped")
    eq(len(json.loads(body)), len(every), "clamped limit still returns everything here")


@test
def qido_series_and_instance_levels():
    e = loaded()
    s = e["s"]
    ct, mr = e["studies"]["ct"], e["studies"]["mr"]
    ctu = ct["study_uid"]
    se = qido(s, f"/dicomweb/studies/{ctu}/series")
    eq(len(se), 2, "CT study: the CT series and its JPEG-LS copy")
    ct_series = ds_of(ct["files"][0]).SeriesInstanceUID
    jls_series = ds_of(e["jls"]).SeriesInstanceUID
    eq(uids(se, "0020000E"), sorted([ct_series, jls_series]), "series UIDs")
    eq(uids(qido(s, f"/dicomweb/studies/{ctu}/series", "SeriesNumber=90"), "0020000E"),
       [jls_series], "SeriesNumber")
    eq(uids(qido(s, f"/dicomweb/studies/{ctu}/series", "SeriesDescription=*jpeg-ls*"),
            "0020000E"), [jls_series], "SeriesDescription wildcard, case-insensitive")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/series", "Modality=MR")), 0, "Modality")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/series", "SeriesDate=20260315")), 2, "SeriesDate")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/series", "SeriesDate=20270101-")), 0,
       "SeriesDate range")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/series",
                f"SeriesInstanceUID={ct_series}%5C{jls_series}")), 2, "series UID list")
    # Top-level series with study keys.
    top = qido(s, "/dicomweb/series", "PatientID=PDW02")
    eq(sorted(tag_value(x, "00080060") for x in top), ["MR", "XA"], "/series by PatientID")
    eq(len(qido(s, "/dicomweb/series", f"StudyInstanceUID={ctu}&Modality=CT")), 2,
       "/series by study and modality")
    # Instances.
    inst = qido(s, f"/dicomweb/studies/{ctu}/series/{ct_series}/instances")
    eq(len(inst), 6, "instances")
    eq([tag_value(i, "00200013") for i in inst], [1, 2, 3, 4, 5, 6], "InstanceNumber order")
    i3 = tag_value(inst[2], "00080018")
    eq(uids(qido(s, f"/dicomweb/studies/{ctu}/series/{ct_series}/instances",
                 f"SOPInstanceUID={i3}"), "00080018"), [i3], "SOPInstanceUID")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/series/{ct_series}/instances", "InstanceNumber=4")),
       1, "InstanceNumber")
    eq(len(qido(s, f"/dicomweb/studies/{ctu}/instances")), 7, "study-level instances")
    eq(len(qido(s, "/dicomweb/instances", f"SeriesInstanceUID={ct_series}")), 6, "/instances")
    j = qido(s, "/dicomweb/instances", f"SOPInstanceUID={ds_of(e['jls']).SOPInstanceUID}")
    eq(tag_value(j[0], "00083002"), JLS, "AvailableTransferSyntaxUID")
    r = qido(s, f"/dicomweb/studies/{ctu}/series/{ct_series}/instances",
             "limit=1&includefield=00180050&includefield=PixelSpacing")
    check("00180050" in r[0] and "00280030" in r[0], "instance includefield")
    r = qido(s, f"/dicomweb/studies/{ctu}/series/{ct_series}/instances", "limit=1&includefield=all")
    check("00200032" in r[0], "includefield=all at instance level")
    eq(uids(qido(s, "/dicomweb/instances", "PatientName=li*&Modality=XA"), "00080060"), ["XA"],
       "/instances by patient and modality")


@test
def dicom_json_shape_and_pydicom_parse():
    e = loaded()
    s = e["s"]
    ctu = e["studies"]["ct"]["study_uid"]
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{ctu}/series",
                 f"/dicomweb/studies/{ctu}/instances"):
        for r in qido(s, path, f"StudyInstanceUID={ctu}" if path.endswith("studies") else ""):
            check(list(r) == sorted(r), "tags in ascending order")
            for tag, el in r.items():
                check(len(tag) == 8 and tag == tag.upper(), f"tag {tag}")
                check("vr" in el, f"vr of {tag}")
                if "Value" in el:
                    check(el["Value"], f"no empty Value arrays ({tag})")
                    if el["vr"] == "PN":
                        check(all(isinstance(v, dict) for v in el["Value"]), "PN as objects")
                    if el["vr"] in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"):
                        check(all(isinstance(v, (int, float)) for v in el["Value"]),
                              f"numbers for {el['vr']}")
            ds = Dataset.from_json(r)
            eq(ds.StudyInstanceUID, ctu, "pydicom from_json")
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={ctu}")[0]
    eq(r["00100010"], {"vr": "PN", "Value": [{"Alphabetic": "Zhang^San"}]}, "PN value")
    eq(r["00201208"]["Value"], [7], "NumberOfStudyRelatedInstances as a number")
    eq(r["00080056"]["Value"], ["ONLINE"], "InstanceAvailability")
    # Empty attribute: no Value key.
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={ctu}&includefield=00101050")[0]
    eq(r["00101050"], {"vr": "SQ"} if r["00101050"]["vr"] == "SQ" else r["00101050"],
       "absent attribute answered empty")
    check("Value" not in r["00101050"], "empty value has no Value")


@test
def qido_bad_queries_are_answered_not_crashed():
    e = loaded()
    s = e["s"]
    ctu = e["studies"]["ct"]["study_uid"]
    bad = ["NoSuchKeyword=1", "0009ZZZZ=1", "StudyDate=2026", "StudyDate=20261301",
           "StudyDate=20260101-2027", "StudyDate=20260102-20260101", "StudyDate=-",
           "StudyDate=2026-01-01-", "StudyDate=abcdefgh", "StudyTime=25", "StudyTime=1261",
           "StudyTime=12a0", "limit=-1", "limit=x", "offset=1.5", "offset=-3",
           "fuzzymatching=maybe", "StudyInstanceUID=1.2.abc", "StudyInstanceUID=1.2.*",
           "SOPInstanceUID=1.2.3", "Modality=CT", "includefield=NoSuchThing",
           "PatientID=" + "x" * 3000, "Bogus.PatientID=1", "ModalitiesInStudy=C*"]
    for q in bad:
        st, h, body = s.request("GET", "/dicomweb/studies?" + q)
        eq(st, 400, f"query {q[:40]}")
        check(json.loads(body).get("message"), f"message for {q[:40]}")
    st, _, _ = s.request("GET", f"/dicomweb/studies/{ctu}/series?SOPInstanceUID=1.2.3")
    eq(st, 400, "instance key at series level")
    # Known attribute the index cannot match: ignored with a warning.
    st, h, body = s.request("GET", "/dicomweb/studies?PatientAge=040Y")
    eq(st, 200, "unindexed attribute")
    check("PatientAge" in h.get("Warning", ""), "warning names the ignored key")
    st, h, body = s.request("GET", "/dicomweb/studies?ReferencedStudySequence.ReferencedSOPInstanceUID=1.2")
    eq(st, 200, "sequence key ignored")
    st, _, _ = s.request("GET", "/dicomweb/studies/not-a-uid/series")
    eq(st, 404, "bad UID in path")
    st, _, _ = s.request("DELETE", "/dicomweb/studies")
    eq(st, 405, "DELETE")
    # Still alive.
    eq(len(qido(s, "/dicomweb/studies", "PatientID=PDW01")), 1, "server alive after bad queries")


def counts_qido(s, study):
    """(instances, series, modalities, {series: instances}) as QIDO answers them, or None."""
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={study}")
    if not r:
        return None
    per = {tag_value(x, "0020000E"): tag_value(x, "00201209")
           for x in qido(s, f"/dicomweb/studies/{study}/series")}
    return (tag_value(r[0], "00201208"), tag_value(r[0], "00201206"),
            r[0].get("00080061", {}).get("Value", []), per)


def counts_index(cloud, study):
    """The same, counted from the index rows (what QIDO used to compute per query)."""
    con = cloud.db()
    try:
        if not con.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study,)).fetchall():
            return None
        per = dict(con.execute("SELECT se.series_uid, (SELECT count(*) FROM instances i"
                               " WHERE i.series_uid = se.series_uid) FROM series se"
                               " WHERE se.study_uid = ?", (study,)).fetchall())
        n = con.execute("SELECT count(*) FROM instances WHERE study_uid = ?",
                        (study,)).fetchone()[0]
        mods = sorted({m for (m,) in con.execute("SELECT modality FROM series WHERE study_uid = ?",
                                                  (study,)).fetchall() if m})
    finally:
        con.close()
    return (n, len(per), mods, per)


def variant(src, study, series, sop, modality, **attrs):
    """src re-identified as (study, series, sop) with Modality set, as Part 10 bytes."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.Modality = modality
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


@test
def qido_counts_and_modalities_follow_stores_duplicates_and_conflicts():
    """NumberOfStudyRelatedInstances/Series, ModalitiesInStudy and
    NumberOfSeriesRelatedInstances are kept in the index as instances come
    (migration 8): duplicates and conflicts must not count, new series and a
    series whose modality changes must show."""
    e = loaded()
    s, cloud = e["s"], e["cloud"]
    ct = e["studies"]["ct"]
    ctu = ct["study_uid"]
    ct_series = ds_of(ct["files"][0]).SeriesInstanceUID
    jls_series = ds_of(e["jls"]).SeriesInstanceUID
    eq(counts_qido(s, ctu), (7, 2, ["CT"], {ct_series: 6, jls_series: 1}), "CT study counts")
    for kind in ("ct", "mr", "xa"):
        u = e["studies"][kind]["study_uid"]
        eq(counts_qido(s, u), counts_index(cloud, u), f"{kind} study counts = index rows")

    root = "1.2.826.0.1.3680043.9.7433.61"
    st_uid, ser_a, ser_b = root + ".1", root + ".1.1", root + ".1.2"
    src = e["studies"]["mr"]["files"][0]
    a1 = variant(src, st_uid, ser_a, ser_a + ".1", "MR")
    a2 = variant(src, st_uid, ser_a, ser_a + ".2", "MR")

    def expect(n, nser, mods, per, what):
        got = counts_qido(s, st_uid)
        eq(got, (n, nser, mods, per), what)
        eq(got, counts_index(cloud, st_uid), what + " (= index rows)")

    st, _, out = stow(s, [a1, a2])
    eq(st, 200, f"new study: {out}")
    expect(2, 1, ["MR"], {ser_a: 2}, "two instances")
    # Duplicates (same bytes), alone and inside a multi-instance STOW.
    st, _, out = stow(s, [a1, a2, a1])
    eq(st, 200, f"duplicates: {out}")
    expect(2, 1, ["MR"], {ser_a: 2}, "duplicates do not count")
    # Conflict: same SOP Instance UID, other bytes: kept aside, not counted.
    st, _, out = stow(s, [variant(src, st_uid, ser_a, ser_a + ".1", "MR",
                                  StudyDescription="other bytes")])
    eq(st, 409, f"conflict: {out}")
    expect(2, 1, ["MR"], {ser_a: 2}, "a conflict does not count")
    # A second series with another modality; a conflict and a new one in one request.
    b1 = variant(src, st_uid, ser_b, ser_b + ".1", "CT")
    st, _, out = stow(s, [b1, variant(src, st_uid, ser_a, ser_a + ".2", "MR",
                                      StudyDescription="other")])
    eq(st, 202, f"one stored, one conflict: {out}")
    expect(3, 2, ["CT", "MR"], {ser_a: 2, ser_b: 1}, "new series")
    mine = {ctu, st_uid, e["studies"]["mr"]["study_uid"], e["studies"]["xa"]["study_uid"]}
    eq([u for u in uids(qido(s, "/dicomweb/studies", "ModalitiesInStudy=CT"), "0020000D")
        if u in mine], sorted([ctu, st_uid]), "ModalitiesInStudy matches the new series")
    # The latest instance's Modality becomes the series' (an OT instance in series A).
    st, _, out = stow(s, [variant(src, st_uid, ser_a, ser_a + ".3", "OT")])
    eq(st, 200, f"modality change: {out}")
    expect(4, 2, ["CT", "OT"], {ser_a: 3, ser_b: 1}, "series modality changed")
    # includefield takes the other query shape (representative instance): same counts.
    r = qido(s, "/dicomweb/studies", f"StudyInstanceUID={st_uid}&includefield=all")[0]
    eq((tag_value(r, "00201208"), tag_value(r, "00201206"), r["00080061"]["Value"]),
       (4, 2, ["CT", "OT"]), "counts with includefield=all")
    r = qido(s, f"/dicomweb/studies/{st_uid}/series", "includefield=all")
    eq({tag_value(x, "0020000E"): tag_value(x, "00201209") for x in r}, {ser_a: 3, ser_b: 1},
       "series counts with includefield=all")
    # includefield naming attributes every row carries (the web app's lists) answers the same.
    for path, q, fields in (
            ("/dicomweb/studies", f"StudyInstanceUID={st_uid}",
             "StudyDescription,00201206,NumberOfStudyRelatedInstances,ModalitiesInStudy"),
            (f"/dicomweb/studies/{st_uid}/series", "", "SeriesDescription,00201209"),
            (f"/dicomweb/studies/{st_uid}/series/{ser_a}/instances", "",
             "InstanceNumber,NumberOfFrames")):
        plain = qido(s, path, q)
        eq(qido(s, path, "&".join(x for x in (q, "includefield=" + fields) if x)), plain,
           f"includefield of row attributes on {path}")
    # Every study the server knows agrees with its rows.
    for r in qido(s, "/dicomweb/studies"):
        u = tag_value(r, "0020000D")
        eq(counts_qido(s, u), counts_index(cloud, u), f"study {u}")


# ------------------------------------------------------------------ WADO-RS

@test
def wado_transfer_syntax_negotiation():
    e = loaded()
    s = e["s"]
    jds = ds_of(e["jls"])
    base = (f"/dicomweb/studies/{jds.StudyInstanceUID}/series/{jds.SeriesInstanceUID}"
            f"/instances/{jds.SOPInstanceUID}")
    native = pydicom.dcmread(e["jls_native"])
    # Default and transfer-syntax=*: as stored (JPEG-LS).
    for accept in (None, 'multipart/related; type="application/dicom"; transfer-syntax=*',
                   f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'):
        h, body = s.get(base, headers={"Accept": accept} if accept else {})
        parts = parse_multipart(h["Content-Type"], body)
        eq(len(parts), 1, "one part")
        check(JLS in parts[0][0]["content-type"], f"part says JPEG-LS: {parts[0][0]}")
        eq(parts[0][1], read(e["jls"]), "JPEG-LS served as stored")
    # Explicit VR Little Endian: transcoded, pixel-identical to the native original.
    for _ in range(2):   # the second time comes from the cache
        h, body = s.get(base, headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ELE}'})
        parts = parse_multipart(h["Content-Type"], body)
        check(ELE in parts[0][0]["content-type"], "part says Explicit VR LE")
        got = pydicom.dcmread(io.BytesIO(parts[0][1]))
        eq(got.file_meta.TransferSyntaxUID, ELE, "transcoded syntax")
        eq(got.SOPInstanceUID, jds.SOPInstanceUID, "SOP Instance UID kept")
        check(np.array_equal(got.pixel_array, native.pixel_array), "pixel-identical")
        eq(got.PixelData, native.PixelData, "Pixel Data bytes identical")
    # Preference order: q values.
    h, body = s.get(base, headers={"Accept":
        f'multipart/related; type="application/dicom"; transfer-syntax={JLS}; q=0.5, '
        f'multipart/related; type="application/dicom"; transfer-syntax={ELE}'})
    check(ELE in parse_multipart(h["Content-Type"], body)[0][0]["content-type"], "q order")
    # Native instance asked as JPEG-LS: encoded losslessly.
    ct0 = e["studies"]["ct"]["files"][0]
    cds = ds_of(ct0)
    cbase = (f"/dicomweb/studies/{cds.StudyInstanceUID}/series/{cds.SeriesInstanceUID}"
             f"/instances/{cds.SOPInstanceUID}")
    h, body = s.get(cbase, headers={
        "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'})
    data = parse_multipart(h["Content-Type"], body)[0][1]
    eq(pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID, JLS, "encoded to JPEG-LS")
    d = tempdir("yy-dw-dj-")
    with open(os.path.join(d, "in.dcm"), "wb") as f:
        f.write(data)
    r = subprocess.run(["dcmdjpls", os.path.join(d, "in.dcm"), os.path.join(d, "out.dcm")],
                       capture_output=True, text=True, timeout=60)
    eq(r.returncode, 0, f"dcmdjpls: {r.stderr}")
    eq(pydicom.dcmread(os.path.join(d, "out.dcm")).PixelData, pydicom.dcmread(ct0).PixelData,
       "JPEG-LS encoding is lossless")
    # Impossible: 406.
    for accept in ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
                   "application/dicom+json", "image/jpeg"):
        st, _, _ = s.request("GET", base, headers={"Accept": accept})
        eq(st, 406, f"Accept {accept}")
    # Series retrieve in ELE covers native and transcoded instances alike.
    h, body = s.get(f"/dicomweb/studies/{jds.StudyInstanceUID}", headers={
        "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ELE}'})
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 7, "study retrieve")
    for _, p in parts:
        eq(pydicom.dcmread(io.BytesIO(p)).file_meta.TransferSyntaxUID, ELE, "every part in ELE")


@test
def wado_frames_native_and_jpegls():
    e = loaded()
    s = e["s"]
    jds = ds_of(e["jls"])
    base = (f"/dicomweb/studies/{jds.StudyInstanceUID}/series/{jds.SeriesInstanceUID}"
            f"/instances/{jds.SOPInstanceUID}")
    native = pydicom.dcmread(e["jls_native"])
    # Default: decoded to application/octet-stream.
    h, body = s.get(base + "/frames/1")
    check('type="application/octet-stream"' in h["Content-Type"], h["Content-Type"])
    parts = parse_multipart(h["Content-Type"], body)
    eq(parts[0][1], native.PixelData, "decoded frame equals the native pixel data")
    # As stored: image/jls, the JPEG-LS code stream.
    for accept in ('multipart/related; type="image/jls"',
                   'multipart/related; type="application/octet-stream"; transfer-syntax=*'):
        h, body = s.get(base + "/frames/1", headers={"Accept": accept})
        parts = parse_multipart(h["Content-Type"], body)
        check(parts[0][0]["content-type"].startswith("image/jls"), parts[0][0]["content-type"])
        check(parts[0][1][:4] == b"\xff\xd8\xff\xf7", "JPEG-LS SOI + SOF55")
        frag = pydicom.encaps.generate_pixel_data_frame(pydicom.dcmread(e["jls"]).PixelData)
        eq(parts[0][1].rstrip(b"\0"), next(frag).rstrip(b"\0"), "stored fragment")
    st, _, _ = s.request("GET", base + "/frames/1", headers={"Accept": "image/jpeg"})
    eq(st, 406, "frames as JPEG")
    st, _, _ = s.request("GET", base + "/frames/2")
    eq(st, 404, "frame out of range")
    # Bulk data of the JPEG-LS instance decoded.
    h, body = s.get(base + "/bulk")
    eq(parse_multipart(h["Content-Type"], body)[0][1], native.PixelData, "bulk (decoded)")
    # Native multi-frame XA: byte ranges.
    xa = pydicom.dcmread(e["studies"]["xa"]["files"][0])
    xbase = (f"/dicomweb/studies/{xa.StudyInstanceUID}/series/{xa.SeriesInstanceUID}"
             f"/instances/{xa.SOPInstanceUID}")
    h, body = s.get(xbase + "/frames/3,1",
                    headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    parts = parse_multipart(h["Content-Type"], body)
    eq(parts[0][1], xa.pixel_array[2].tobytes(), "XA frame 3")
    eq(parts[1][1], xa.pixel_array[0].tobytes(), "XA frame 1")
    st, _, _ = s.request("GET", xbase + "/frames/0")
    eq(st, 400, "frame 0")


@test
def etag_if_none_match_and_gzip():
    e = loaded()
    s = e["s"]
    cds = ds_of(e["studies"]["ct"]["files"][0])
    series = f"/dicomweb/studies/{cds.StudyInstanceUID}/series/{cds.SeriesInstanceUID}"
    for path in (series, series + "/metadata", series + f"/instances/{cds.SOPInstanceUID}",
                 series + f"/instances/{cds.SOPInstanceUID}/frames/1"):
        h, body = s.get(path)
        tag = h.get("ETag")
        check(tag and tag.startswith('"'), f"ETag on {path}")
        check("max-age" in h.get("Cache-Control", ""), "Cache-Control")
        st, h2, b2 = s.request("GET", path, headers={"If-None-Match": tag})
        eq(st, 304, f"If-None-Match on {path}")
        eq(b2, b"", "304 has no body")
        st, _, _ = s.request("GET", path, headers={"If-None-Match": '"other"'})
        eq(st, 200, "other ETag")
    # gzip for metadata and QIDO.
    h, plain = s.get(series + "/metadata")
    h, z = s.get(series + "/metadata", headers={"Accept-Encoding": "gzip, deflate"})
    eq(h.get("Content-Encoding"), "gzip", "metadata gzip'ed")
    eq(gzip.decompress(z), plain, "gzip round trip")
    check(len(z) * 3 < len(plain), f"gzip helps ({len(plain)} -> {len(z)})")
    check("Accept-Encoding" in h.get("Vary", ""), "Vary")
    st, h2, _ = s.request("GET", series + "/metadata",
                          headers={"Accept-Encoding": "gzip", "If-None-Match": h["ETag"]})
    eq(st, 304, "gzip variant ETag validates")
    h, z = s.get("/dicomweb/studies", headers={"Accept-Encoding": "gzip"})
    eq(h.get("Content-Encoding"), "gzip", "QIDO gzip'ed")
    json.loads(gzip.decompress(z))
    h, _ = s.get("/dicomweb/studies", headers={"Accept-Encoding": "gzip;q=0"})
    check("Content-Encoding" not in h, "gzip;q=0 refused")
    meta = json.loads(plain)
    for m in meta:
        ds = Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"")
        check(ds.SOPInstanceUID, "metadata parses with pydicom")


@test
def independent_client_dicomweb_client_npm():
    e = loaded()
    if not os.path.isdir(os.path.join(CLIENT_DIR, "node_modules", "dicomweb-client")):
        raise AssertionError("npm dicomweb-client missing: npm ci --prefix tests/dicomweb-client")
    s = e["s"]
    token = next(c.value for c in s.jar if c.name == "yy_session")
    cds = ds_of(e["studies"]["ct"]["files"][2])
    # A new instance for storeInstances (own SOP UID).
    ds = pydicom.dcmread(e["studies"]["mr"]["files"][1])
    ds.SOPInstanceUID += ".5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    stow_file = os.path.join(e["data"], "client-stow.dcm")
    ds.save_as(stow_file, write_like_original=False)
    envv = os.environ.copy()
    envv["NODE_EXTRA_CA_CERTS"] = os.path.join(test_ca(), "ca.pem")
    r = subprocess.run(["node", os.path.join(CLIENT_DIR, "check.js"), e["cloud"].url + "/dicomweb",
                        token, cds.StudyInstanceUID, cds.SeriesInstanceUID, cds.SOPInstanceUID,
                        stow_file], capture_output=True, text=True, timeout=120, env=envv)
    eq(r.returncode, 0, f"node client: {r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    eq(out["studies"], 1, "searchForStudies")
    eq(out["studyPatientName"], "Zhang^San", "PN through the client")
    eq(out["studyInstances"], 7, "instances in study")
    eq(len(out["series"]), 2, "searchForSeries")
    eq(len(out["instances"]), 6, "searchForInstances")
    eq(out["metadata"], 6, "retrieveSeriesMetadata")
    eq(out["metaRows"], cds.Rows, "Rows in metadata")
    eq(out["instanceBytes"], len(read(e["studies"]["ct"]["files"][2])), "retrieveInstance")
    eq(out["instanceMagic"], "DICM", "Part 10 file")
    eq(out["frames"], 1, "retrieveInstanceFrames")
    eq(out["frameSha"], hashlib.sha256(pydicom.dcmread(e["studies"]["ct"]["files"][2]).PixelData)
       .hexdigest(), "frame bytes")
    eq((out["stowStored"], out["stowFailed"]), (1, 0), "storeInstances")
    got = qido(s, "/dicomweb/instances", f"SOPInstanceUID={ds.SOPInstanceUID}")
    eq(len(got), 1, "client-stored instance is searchable")


@test
def zz_clean_shutdown_no_sanitizer_reports():
    e = loaded()
    rc = e["cloud"].stop()
    log = e["cloud"].log_text() if hasattr(e["cloud"], "log_text") else ""
    check("AddressSanitizer" not in log and "runtime error" not in log, "sanitizer report:\n" +
          log[-3000:])
    eq(rc, 0, "yunying-cloud exit code")


if __name__ == "__main__":
    run()
