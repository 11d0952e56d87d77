#!/usr/bin/python3
"""The walking skeleton end to end on the S3 archive backend (issue 4, item 2).

A real S3 server (OpenStack Swift + s3api, tests/infra/swift.sh) holds the
archive. The 100-slice CT goes modality -> edge -> cloud -> bucket; the
local cache (archive.dir) is then emptied so every read really comes from
S3: WADO-RS series and instance, WADO-URI and frames (ranged GETs) must give
the sent pixels back. Also: objects are in the bucket with the indexed
sizes and hashes, the cache cap evicts only files that are in the bucket,
--check-config rejects unusable S3 settings, and scrub verifies the objects.
"""
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import time
import urllib.parse

import numpy as np
import pydicom

from yyharness import (CLOUD_BIN, Cloud, Edge, check, eq, generate, manifest_files, parse_multipart,
                       run, s3_delete, s3_get, s3_list, s3_put, storescu, tag_value, tempdir, test,
                       wait_until, write_json)

_env = {}


def env():
    if _env:
        return _env
    data = tempdir("yy-s3-data-")
    ct = generate(os.path.join(data, "ct"), "--only", "ct", "--ct-slices", "100",
                  "--patient-id", "YYS301", "--patient-name", "Zhao^Yi", "--study-date", "20260315",
                  "--accession", "ACC-S301", "--seed", "31", "--quiet")
    mr = generate(os.path.join(data, "mr"), "--only", "mr", "--patient-id", "YYS302",
                  "--study-date", "20260401", "--accession", "ACC-S302", "--seed", "32", "--quiet")
    cloud = Cloud(backend="s3")
    # Native uploads: this suite checks byte ranges of native frames read from S3
    # (JPEG-LS uploads are covered by test_skeleton and the browser tests).
    edge = Edge(cloud, extra={"upload": {"compress": False}})
    _env.update(cloud=cloud, edge=edge, ct=list(ct.values())[0], mr=list(mr.values())[0],
                session=cloud.session(), loaded=False)
    return _env


def db_rows(cloud, sql, *args):
    c = cloud.db()
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def study_count(s, study_uid):
    res = s.get_json(f"/dicomweb/studies?StudyInstanceUID={study_uid}&includefield=00201208")
    return int(tag_value(res[0], "00201208") or 0) if res else 0


def cached_files(cloud):
    return [os.path.join(r, f) for r, _, fs in os.walk(cloud.archive_dir) for f in fs
            if f.endswith(".dcm")]


def empty_cache(cloud):
    shutil.rmtree(cloud.archive_dir, ignore_errors=True)
    eq(cached_files(cloud), [], "cache emptied")


def loaded():
    e = env()
    if not e["loaded"]:
        for m in (e["ct"], e["mr"]):
            r = storescu(e["edge"].ae, e["edge"].port, manifest_files(m))
            eq(r.returncode, 0, f"storescu: {r.stderr[-2000:]}")
        for m in (e["ct"], e["mr"]):
            n = len(manifest_files(m))
            wait_until(lambda: study_count(e["session"], m["study_uid"]) == n, timeout=300,
                       what=f"{n} instances indexed")
        e["loaded"] = True
    return e


@test
def ct_100_slices_land_in_the_bucket():
    e = loaded()
    cloud = e["cloud"]
    rows = db_rows(cloud, "SELECT path, size, sha256 FROM instances WHERE study_uid = ?",
                   e["ct"]["study_uid"])
    eq(len(rows), 100, "indexed CT instances")
    keys = s3_list(cloud.s3_prefix)
    for path, size, _ in rows:
        key = cloud.object_key(path)
        check(key in keys, f"object {key} in the bucket")
        eq(keys[key], size, f"size of {key}")
    # The bytes in the bucket are the indexed bytes (a sample: each GET is a curl run).
    for path, size, sha in rows[::20]:
        body = s3_get(cloud.object_key(path))
        eq(hashlib.sha256(body).hexdigest(), sha, f"sha256 of {path}")


@test
def wado_rs_from_an_empty_cache_is_pixel_identical():
    e = loaded()
    cloud, s, ct = e["cloud"], e["session"], e["ct"]
    empty_cache(cloud)
    study = ct["study_uid"]
    series = s.get_json(f"/dicomweb/studies/{study}/series")
    eq(len(series), 1, "series count")
    series_uid = tag_value(series[0], "0020000E")
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}",
                    headers={"Accept": 'multipart/related; type="application/dicom"'})
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 100, "instances in the series retrieve")
    sent = {}
    for f in manifest_files(ct):
        ds = pydicom.dcmread(f)
        sent[ds.SOPInstanceUID] = ds
    for _, data in parts:
        got = pydicom.dcmread(io.BytesIO(data))
        orig = sent.pop(got.SOPInstanceUID)
        check(np.array_equal(got.pixel_array, orig.pixel_array),
              f"pixel data differs for {got.SOPInstanceUID}")
    eq(len(sent), 0, "every sent instance came back")
    eq(len(cached_files(cloud)), 100, "the misses were fetched into the cache")


@test
def instance_uri_and_frames_from_an_empty_cache():
    e = loaded()
    cloud, s, ct = e["cloud"], e["session"], e["ct"]
    files = manifest_files(ct)
    ds = pydicom.dcmread(files[37])
    study, series_uid, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    # Frames first: a ranged GET of the pixel data, nothing downloaded whole.
    empty_cache(cloud)
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}/instances/{sop}/frames/1",
                    headers={"Accept": "multipart/related; type=\"application/octet-stream\""})
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 1, "one frame")
    want = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
    eq(len(parts[0][1]), len(want), "frame length")
    check(parts[0][1] == want, "frame bytes equal the sent pixel data")
    eq(cached_files(cloud), [], "a frame read does not fill the cache")
    # WADO-RS instance.
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}/instances/{sop}")
    parts = parse_multipart(h["Content-Type"], body)
    eq(len(parts), 1, "single instance retrieve")
    check(np.array_equal(pydicom.dcmread(io.BytesIO(parts[0][1])).pixel_array, ds.pixel_array),
          "WADO-RS instance pixels")
    # WADO-URI, again from an empty cache.
    empty_cache(cloud)
    q = urllib.parse.urlencode({"requestType": "WADO", "studyUID": study, "seriesUID": series_uid,
                                "objectUID": sop, "contentType": "application/dicom"})
    h, body = s.get(f"/wado?{q}")
    check(np.array_equal(pydicom.dcmread(io.BytesIO(body)).pixel_array, ds.pixel_array),
          "WADO-URI pixels")
    # Bulk data (the whole Pixel Data value) and metadata.
    empty_cache(cloud)
    h, body = s.get(f"/dicomweb/studies/{study}/series/{series_uid}/instances/{sop}/bulk",
                    headers={"Accept": "multipart/related; type=\"application/octet-stream\""})
    eq(parse_multipart(h["Content-Type"], body)[0][1], want, "bulk pixel data")
    meta = s.get_json(f"/dicomweb/studies/{study}/series/{series_uid}/metadata")
    eq(len(meta), 100, "metadata entries")


@test
def qido_on_the_s3_backend():
    e = loaded()
    s, ct, mr = e["session"], e["ct"], e["mr"]

    def uids(query):
        return sorted(tag_value(x, "0020000D") for x in s.get_json("/dicomweb/studies?" + query))

    for q, want in (("PatientID=YYS301", [ct["study_uid"]]),
                    ("PatientID=YYS302", [mr["study_uid"]]),
                    ("StudyDate=20260301-20260331", [ct["study_uid"]]),
                    ("ModalitiesInStudy=MR", [mr["study_uid"]]),
                    ("AccessionNumber=ACC-S301", [ct["study_uid"]])):
        eq(uids(q), want, q)


@test
def cache_cap_evicts_only_what_is_in_the_bucket():
    e = loaded()
    cloud, s, ct = e["cloud"], e["session"], e["ct"]
    cloud.stop()
    cloud.set_config("archive", cache_max_mb=1, cache_min_age_s=0)
    empty_cache(cloud)
    # A cached file that is NOT in the bucket (say, left from a directory archive).
    orphan_dir = os.path.join(cloud.archive_dir, "zz", "orphan")
    os.makedirs(orphan_dir)
    orphan = os.path.join(orphan_dir, "orphan.dcm")
    with open(orphan, "wb") as f:
        f.write(os.urandom(300_000))
    os.utime(orphan, (time.time() - 86400, time.time() - 86400))
    cloud.start()
    files = manifest_files(ct)
    size = os.path.getsize(files[0])
    for f in files[:12]:
        ds = pydicom.dcmread(f)
        h, body = s.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                        f"/instances/{ds.SOPInstanceUID}")
        got = pydicom.dcmread(io.BytesIO(parse_multipart(h["Content-Type"], body)[0][1]))
        check(np.array_equal(got.pixel_array, ds.pixel_array), "pixels under a small cache cap")
    total = sum(os.path.getsize(p) for p in cached_files(cloud))
    check(total <= (1 << 20) + size + 300_000,
          f"cache holds {total} bytes with a 1 MiB cap (file size {size})")
    check(os.path.exists(orphan), "a file missing from the bucket is never evicted")
    check("cache evicted" in cloud.log_text(), "eviction logged")
    cloud.stop()
    cloud.set_config("archive", cache_max_mb=0, cache_min_age_s=300)
    os.unlink(orphan)
    cloud.start()
    e["session"] = cloud.session()


@test
def scrub_checks_the_objects():
    e = loaded()
    cloud = e["cloud"]
    r = subprocess.run([CLOUD_BIN, "scrub", "--config", cloud.config], capture_output=True,
                       text=True, timeout=600)
    eq(r.returncode, 0, f"clean scrub: {r.stdout[-1000:]} {r.stderr[-1000:]}")
    rows = db_rows(cloud, "SELECT path, sop_uid FROM instances WHERE study_uid = ?"
                   " ORDER BY sop_uid LIMIT 2", e["mr"]["study_uid"])
    (p_flip, sop_flip), (p_gone, sop_gone) = rows
    k_flip, k_gone = cloud.object_key(p_flip), cloud.object_key(p_gone)
    orig = s3_get(k_flip)
    bad = bytearray(orig)
    bad[len(bad) // 2] ^= 0x01
    s3_put(k_flip, bytes(bad))
    gone = s3_get(k_gone)
    s3_delete(k_gone)
    try:
        r = subprocess.run([CLOUD_BIN, "scrub", "--config", cloud.config], capture_output=True,
                           text=True, timeout=600)
        check(r.returncode == 1, f"scrub must fail: rc={r.returncode} {r.stdout[-1500:]}")
        check(any(l.startswith("mismatch") and sop_flip in l for l in r.stdout.splitlines()),
              f"flipped object reported: {r.stdout[-1500:]}")
        check(any(l.startswith("missing") and sop_gone in l for l in r.stdout.splitlines()),
              f"deleted object reported: {r.stdout[-1500:]}")
    finally:
        s3_put(k_flip, orig)
        s3_put(k_gone, gone)


@test
def check_config_rejects_unusable_s3_settings():
    e = env()
    d = tempdir("yy-s3-badconf-")
    with open(e["cloud"].config) as f:
        import json
        good = json.load(f)
    bad_secret = os.path.join(d, "wrong.secret")
    with open(bad_secret, "w") as f:
        f.write("not-the-secret\n")
    for what, change in (("wrong secret", {"s3_secret_file": bad_secret}),
                         ("missing secret file", {"s3_secret_file": os.path.join(d, "none")}),
                         ("no bucket", {"s3_bucket": "no-such-bucket-yy"}),
                         ("no endpoint", {"s3_endpoint": ""})):
        cfg = {k: dict(v) for k, v in good.items()}
        cfg["archive"].update(change)
        path = write_json(os.path.join(d, "cloud.json"), cfg)
        r = subprocess.run([CLOUD_BIN, "--config", path, "--check-config"], capture_output=True,
                           text=True, timeout=120)
        check(r.returncode != 0, f"--check-config accepted {what}")
        check("archive" in r.stderr, f"{what}: message names the archive: {r.stderr[-500:]}")
    r = subprocess.run([CLOUD_BIN, "--config", e["cloud"].config, "--check-config"],
                       capture_output=True, text=True, timeout=120)
    eq(r.returncode, 0, f"good S3 settings: {r.stderr[-500:]}")


if __name__ == "__main__":
    run()
