#!/usr/bin/python3
"""Retention, integrity and the storage report (issue 4 item 5, R-1.10).

Two edges (two "hospitals") upload four studies; the index is then aged by
hand (instances.created / studies.created, as if years had passed):

  A  edge-test  CT 5   study date 2015, archived 2000 days ago -> eligible
  B  hosp-b     MR 20  study date 2016, archived 1200 days ago -> eligible at >= 1095
  C  edge-test  CT 3   study date 2026, archived 2000 days ago -> too young (study date)
  D  edge-test  CT 2   study date 2010, archived now          -> too young (archive time)

Runs on the directory archive, or on S3 with YY_BACKEND=s3.
"""
import json
import os
import sqlite3
import subprocess
import time

from yyharness import (CLOUD_BIN, Cloud, Edge, check, eq, generate, manifest_files, run, s3_delete,
                       s3_get, s3_list, s3_put, storescu, tag_value, tempdir, test, wait_until,
                       write_json)

DAY = 86400
_env = {}


def env():
    if _env:
        return _env
    data = tempdir("yy-ret-data-")
    studies = {}
    for name, kind, extra, date in (("A", "ct", ("--ct-slices", "5"), "20150101"),
                                    ("B", "mr", (), "20160101"),
                                    ("C", "ct", ("--ct-slices", "3"), "20260101"),
                                    ("D", "ct", ("--ct-slices", "2"), "20100101")):
        m = generate(os.path.join(data, name), "--only", kind, *extra, "--patient-id", "RET" + name,
                     "--study-date", date, "--accession", "ACC-RET-" + name, "--seed",
                     str(ord(name)), "--quiet")
        studies[name] = list(m.values())[0]
    cloud = Cloud()
    secret_b = cloud.admin("edge-add", "--id", "hosp-b").strip().splitlines()[-1]
    edge_a = Edge(cloud)
    edge_b = Edge(cloud, ae="YY_EDGE_B", secret=secret_b, edge_id="hosp-b")
    s = cloud.session()
    for name, edge in (("A", edge_a), ("B", edge_b), ("C", edge_a), ("D", edge_a)):
        r = storescu(edge.ae, edge.port, manifest_files(studies[name]))
        eq(r.returncode, 0, f"storescu {name}: {r.stderr[-1000:]}")
    for name in "ABCD":
        uid, n = studies[name]["study_uid"], len(manifest_files(studies[name]))
        wait_until(lambda: count(s, uid) == n, timeout=300, what=f"study {name} indexed")
    _env.update(cloud=cloud, studies=studies, session=s, aged=False)
    return _env


def count(s, uid):
    res = s.get_json(f"/dicomweb/studies?StudyInstanceUID={uid}&includefield=00201208")
    return int(tag_value(res[0], "00201208") or 0) if res else 0


def db(cloud):
    return cloud.db(timeout=30)


def qido_counts(s, uid):
    """(instances, series, modalities, {series: instances}) as QIDO answers them, or None."""
    res = s.get_json(f"/dicomweb/studies?StudyInstanceUID={uid}")
    if not res:
        return None
    per = {tag_value(x, "0020000E"): tag_value(x, "00201209")
           for x in s.get_json(f"/dicomweb/studies/{uid}/series")}
    return (tag_value(res[0], "00201208"), tag_value(res[0], "00201206"),
            res[0].get("00080061", {}).get("Value", []), per)


def index_counts(cloud, uid):
    """The same, counted from the index rows."""
    if not q(cloud, "SELECT 1 FROM studies WHERE study_uid = ?", uid):
        return None
    per = dict(q(cloud, "SELECT se.series_uid, (SELECT count(*) FROM instances i"
                        " WHERE i.series_uid = se.series_uid) FROM series se WHERE se.study_uid = ?",
                 uid))
    n = q(cloud, "SELECT count(*) FROM instances WHERE study_uid = ?", uid)[0][0]
    mods = sorted({m for (m,) in q(cloud, "SELECT modality FROM series WHERE study_uid = ?", uid)
                   if m})
    return (n, len(per), mods, per)


def q(cloud, sql, *args):
    c = db(cloud)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def aged():
    """Moves the archive times of A, B, C into the past (once)."""
    e = env()
    if not e["aged"]:
        now = int(time.time())
        c = db(e["cloud"])
        with c:
            for name, days in (("A", 2000), ("B", 1200), ("C", 2000)):
                uid = e["studies"][name]["study_uid"]
                c.execute("UPDATE studies SET created = ? WHERE study_uid = ?", (now - days * DAY, uid))
                c.execute("UPDATE instances SET created = ? WHERE study_uid = ?", (now - days * DAY, uid))
        c.close()
        e["aged"] = True
    return e


def set_policy(cloud, **kv):
    cloud.set_config("retention", **kv)


def plan(cloud):
    out = cloud.admin("retention-plan", "--json")
    return json.loads(out)


def uid(e, name):
    return e["studies"][name]["study_uid"]


# ------------------------------------------------------------------ report

@test
def storage_report_sums_equal_the_upload():
    e = env()
    cloud = e["cloud"]
    rep = json.loads(cloud.admin("storage-report", "--json"))
    files = {n: manifest_files(e["studies"][n]) for n in "ABCD"}
    n_all = sum(len(f) for f in files.values())
    # What was uploaded: the archived objects (files, or S3 objects) of every instance.
    paths = q(cloud, "SELECT study_uid, path, size FROM instances")
    eq(len(paths), n_all, "indexed instances")
    if cloud.backend == "s3":
        objs = s3_list(cloud.s3_prefix)
        sizes = {p: objs[cloud.object_key(p)] for _, p, _ in paths}
    else:
        sizes = {p: os.path.getsize(p) for _, p, _ in paths}
    total = sum(sizes.values())
    eq(rep["total"], {"instances": n_all, "bytes": total}, "total")
    by_study = {}
    for st, p, _ in paths:
        by_study.setdefault(st, 0)
        by_study[st] += sizes[p]
    b_bytes = by_study[uid(e, "B")]
    hosp = {h["hospital"]: (h["instances"], h["bytes"]) for h in rep["by_hospital"]}
    eq(hosp, {"edge-test": (n_all - len(files["B"]), total - b_bytes),
              "hosp-b": (len(files["B"]), b_bytes)}, "by hospital (edge id)")
    mod = {m["modality"]: (m["instances"], m["bytes"]) for m in rep["by_modality"]}
    eq(mod, {"CT": (n_all - len(files["B"]), total - b_bytes), "MR": (len(files["B"]), b_bytes)},
       "by modality")
    month = time.strftime("%Y-%m", time.gmtime())
    eq([(m["month"], m["instances"], m["bytes"]) for m in rep["by_month"]], [(month, n_all, total)],
       "by month")
    eq(sum(r["bytes"] for r in rep["rows"]), total, "rows add up")
    text = cloud.admin("storage-report")
    check("edge-test" in text and "hosp-b" in text and str(total) in text, f"text report: {text}")


# --------------------------------------------------------------- retention

@test
def min_days_cannot_be_configured_below_three_years():
    e = env()
    d = tempdir("yy-ret-conf-")
    with open(e["cloud"].config) as f:
        cfg = json.load(f)
    cfg["retention"] = {"min_days": 30}
    path = write_json(os.path.join(d, "cloud.json"), cfg)
    r = subprocess.run([CLOUD_BIN, "--config", path, "--check-config"], capture_output=True,
                       text=True, timeout=60)
    check(r.returncode != 0 and "retention.min_days" in r.stderr, f"min_days 30: {r.stderr}")


@test
def plan_never_lists_a_study_younger_than_min_days():
    e = aged()
    cloud = e["cloud"]
    set_policy(cloud, delete_after_days=0)
    eq(plan(cloud)["studies"], [], "no policy, nothing eligible")
    # Aggressive policy: one day. min_days (1095) still holds.
    set_policy(cloud, delete_after_days=1)
    p = plan(cloud)
    eq(p["effective_days"], 1095, "effective days")
    listed = [s["study_uid"] for s in p["studies"]]
    eq(sorted(listed), sorted([uid(e, "A"), uid(e, "B")]), "eligible with delete_after_days=1")
    for s in p["studies"]:
        check(s["age_days"] >= 1095, f"listed study younger than min_days: {s}")
    eq({s["study_uid"]: s["sources"] for s in p["studies"]},
       {uid(e, "A"): "edge-test", uid(e, "B"): "hosp-b"}, "sources (the uploading edges)")
    # C (recent study date) and D (archived now) are never listed.
    set_policy(cloud, delete_after_days=1500)
    eq([s["study_uid"] for s in plan(cloud)["studies"]], [uid(e, "A")], "delete_after_days=1500")
    text = cloud.admin("retention-plan")
    check(uid(e, "A") in text and uid(e, "B") not in text, f"text plan: {text}")


@test
def apply_deletes_only_planned_studies():
    e = aged()
    cloud, s = e["cloud"], e["session"]
    set_policy(cloud, delete_after_days=1500)
    before = {n: q(cloud, "SELECT path FROM instances WHERE study_uid = ?", uid(e, n)) for n in "ABCD"}
    # Never implicit: apply without --confirm refuses and changes nothing.
    cloud.admin("retention-apply", ok=(2,))
    eq(len(q(cloud, "SELECT 1 FROM instances WHERE study_uid = ?", uid(e, "A"))), 5, "A still there")
    out = json.loads(cloud.admin("retention-apply", "--confirm", "--json"))
    eq([(x["study_uid"], x["status"]) for x in out["studies"]], [(uid(e, "A"), "deleted")], "applied")
    eq(q(cloud, "SELECT count(*) FROM instances WHERE study_uid = ?", uid(e, "A")), [(0,)], "A rows")
    eq(q(cloud, "SELECT count(*) FROM studies WHERE study_uid = ?", uid(e, "A")), [(0,)], "A study")
    eq(q(cloud, "SELECT count(*) FROM series WHERE study_uid = ?", uid(e, "A")), [(0,)], "A series")
    eq(q(cloud, "SELECT count(*) FROM patients WHERE patient_id = 'RETA'"), [(0,)], "A patient")
    for (p,) in before["A"]:
        check(not os.path.exists(p), f"archived file {p} deleted")
    if cloud.backend == "s3":
        keys = s3_list(cloud.s3_prefix)
        check(not any(cloud.object_key(p) in keys for (p,) in before["A"]), "A's objects deleted")
        check(all(cloud.object_key(p) in keys for n in "BCD" for (p,) in before[n]),
              "other objects kept")
    for n in "BCD":
        for (p,) in before[n]:
            check(cloud.backend == "s3" or os.path.exists(p), f"{n}'s file {p} kept")
        eq(count(s, uid(e, n)), len(before[n]), f"study {n} still served")
    eq(count(s, uid(e, "A")), 0, "A gone from QIDO")
    eq(qido_counts(s, uid(e, "A")), None, "A's study row gone")
    for n in "BCD":
        got = qido_counts(s, uid(e, n))
        eq(got, index_counts(cloud, uid(e, n)), f"study {n}: QIDO counts = index rows")
        eq(got[0], len(before[n]), f"study {n}: NumberOfStudyRelatedInstances")
    audit = q(cloud, "SELECT username, study_uid FROM audit WHERE action = 'retention-delete'")
    eq(audit, [("system:retention", uid(e, "A"))], "audit row")
    # A second apply finds nothing more.
    out = json.loads(cloud.admin("retention-apply", "--confirm", "--json"))
    eq(out["studies"], [], "second apply")


# -------------------------------------------------------------------- scrub

def flip_byte(cloud, path):
    if cloud.backend == "s3":
        key = cloud.object_key(path)
        data = bytearray(s3_get(key))
        data[len(data) // 2] ^= 0x40
        s3_put(key, bytes(data))
    else:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x40]))


def remove(cloud, path):
    if cloud.backend == "s3":
        data = s3_get(cloud.object_key(path))
        s3_delete(cloud.object_key(path))
        os.path.exists(path) and os.unlink(path)
        return data
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def restore(cloud, path, data):
    if cloud.backend == "s3":
        s3_put(cloud.object_key(path), data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def scrub(cloud, *args):
    return subprocess.run([CLOUD_BIN, "scrub", "--config", cloud.config, *args],
                          capture_output=True, text=True, timeout=600)


@test
def scrub_detects_a_flipped_byte_and_a_missing_file():
    e = env()
    cloud = e["cloud"]
    n = q(cloud, "SELECT count(*) FROM instances")[0][0]
    r = scrub(cloud)
    eq(r.returncode, 0, f"clean archive: {r.stdout[-800:]} {r.stderr[-800:]}")
    check(f": {n} checked" in r.stdout, f"all {n} checked: {r.stdout}")
    (p1, sop1), (p2, sop2) = q(cloud, "SELECT path, sop_uid FROM instances WHERE study_uid = ?"
                               " ORDER BY sop_uid LIMIT 2", uid(e, "B"))
    if cloud.backend == "s3":
        good1 = s3_get(cloud.object_key(p1))
    else:
        with open(p1, "rb") as f:
            good1 = f.read()
    flip_byte(cloud, p1)
    good2 = remove(cloud, p2)
    try:
        r = scrub(cloud, "--json")
        eq(r.returncode, 1, f"findings must fail the scrub: {r.stdout[-800:]}")
        out = json.loads(r.stdout)
        kinds = sorted((f["kind"], f["sop_uid"]) for f in out["findings"])
        eq(kinds, sorted([("mismatch", sop1), ("missing", sop2)]), "findings")
        eq((out["checked"], out["mismatches"], out["missing"]), (n, 1, 1), "counters")
        runs = q(cloud, "SELECT origin, state, checked, mismatches, missing FROM scrub_runs"
                 " ORDER BY id DESC LIMIT 1")
        eq(runs, [("cli", "done", n, 1, 1)], "run recorded in the index")
        eq(q(cloud, "SELECT kind, sop_uid FROM scrub_findings WHERE run_id = ? ORDER BY kind",
             out["run"]), [("mismatch", sop1), ("missing", sop2)], "findings recorded")
        # --limit checks that many (least recently verified first).
        r = scrub(cloud, "--limit", "3")
        check(": 3 checked" in r.stdout, f"--limit 3: {r.stdout}")
    finally:
        restore(cloud, p1, good1)
        restore(cloud, p2, good2)
    r = scrub(cloud)
    eq(r.returncode, 0, f"repaired archive: {r.stdout[-800:]}")


@test
def daemon_scrubs_periodically_and_records_the_run():
    e = env()
    cloud = e["cloud"]
    cloud.stop()
    cloud.set_config("scrub", interval_h=1)
    cloud.start()
    try:
        rows = wait_until(lambda: q(cloud, "SELECT state, checked, mismatches, missing FROM scrub_runs"
                                    " WHERE origin = 'daemon' AND state != 'running'"),
                          timeout=120, what="a daemon scrub run")
        n = q(cloud, "SELECT count(*) FROM instances")[0][0]
        eq(rows, [("done", n, 0, 0)], "daemon run")
    finally:
        cloud.stop()
        cloud.set_config("scrub", interval_h=0)
        cloud.start()
        e["session"] = cloud.session()


@test
def qido_counts_follow_partial_deletions():
    """The counts QIDO answers are kept by the index (migration 8 triggers):
    deleting index rows the way retention does (instances, then the series
    and the study they leave empty) must show at once, on both engines.
    Retention deletes only what it planned; a study keeping instances
    archived after the plan is the partial case, done here by hand."""
    e = env()
    cloud, s = e["cloud"], e["session"]
    c_uid, b_uid = uid(e, "C"), uid(e, "B")
    c0 = qido_counts(s, c_uid)
    eq(c0[0], 3, "C before")
    (sop,) = q(cloud, "SELECT sop_uid FROM instances WHERE study_uid = ? ORDER BY sop_uid LIMIT 1",
               c_uid)[0]
    con = db(cloud)
    with con:
        con.execute("DELETE FROM instances WHERE sop_uid = ?", (sop,))
    con.close()
    got = qido_counts(s, c_uid)
    eq(got, index_counts(cloud, c_uid), "C after one instance: QIDO = index rows")
    eq((got[0], got[1], got[2]), (2, 1, ["CT"]), "C after one instance")
    # B: a whole series goes (its instances, then the empty series row).
    b0 = qido_counts(s, b_uid)
    ser, n_ser = sorted(b0[3].items())[0]
    con = db(cloud)
    with con:
        con.execute("DELETE FROM instances WHERE series_uid = ?", (ser,))
        con.execute("DELETE FROM series WHERE series_uid = ? AND NOT EXISTS"
                    " (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)", (ser,))
    con.close()
    got = qido_counts(s, b_uid)
    eq(got, index_counts(cloud, b_uid), "B after one series: QIDO = index rows")
    eq((got[0], got[1]), (b0[0] - n_ser, b0[1] - 1), "B after one series")
    check(ser not in got[3], "deleted series not listed")
    eq(got[2], ["MR"] if got[1] else [], "B modalities")


if __name__ == "__main__":
    run()
