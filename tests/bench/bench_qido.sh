#!/bin/sh
# bench_qido.sh BUILD_DIR - QIDO-RS latency on an index of 1,000,000 instances.
#
# Data: synthetic rows inserted directly into the cloud's schema (the cloud
# creates the schema, then it is stopped and the rows are bulk-loaded in one
# transaction): YY_BENCH_QIDO_STUDIES studies (default 10,000) x
# YY_BENCH_QIDO_PER_STUDY instances (default 100) in 1, 2, 4 or 5 series;
# about 0.7 studies per patient; pinyin + ideographic patient names drawn with
# the frequency of China's common surnames (ZHANG*, WANG*, LI*: 7-8 % each);
# study dates over five years; CT, MR, DX, CR, US, MG; each instance carries a
# DICOM JSON document of the usual size (~1.3 kB).
#
# Figures: p50 and p99 (and max) of YY_BENCH_QIDO_N (default 200) requests per
# query kind, each request with a different value (patient ids, surnames,
# date windows, series drawn at random), over one keep-alive HTTP connection
# (curl; plain HTTP on loopback), after one warm-up request:
#   study level:    PatientID=<id>; PatientName=<SURNAME>* (limit 100 and the
#                   default limit 1000); the web app's study list
#                   (PatientName=*<surname>*, its includefield keys, limit 50);
#                   StudyDate one week; StudyDate one month + ModalitiesInStudy=CT
#   instance level: /studies/{s}/series/{se}/instances (all of one series)
# Target: p99 <= 50 ms for every row.
#
# Backends: SQLite always; PostgreSQL too when the cloud binary links libpq
# (tests/infra/postgres.sh starts a private cluster; bulk load with psql
# COPY). YY_BENCH_QIDO_BACKENDS="sqlite pg" picks; YY_BENCH_QIDO_PG_KEY names
# the index key taking the URL (default: "url" if --dump-config shows it,
# else "path"). YY_BENCH_QIDO_KEEP=DIR keeps (and reuses) the loaded indexes
# there; YY_BENCH_QIDO_EXPLAIN=1 prints each engine's plans of the study-level
# searches (the SQL of cloud/dicomweb.c run_qido, with literal values).
# Cost at the default size: ~3 min and ~4.5 GB for SQLite, ~5 min and ~7 GB
# more for PostgreSQL (removed at the end unless kept).
set -eu

build=${1:?usage: bench_qido.sh BUILD_DIR}
top=$(cd "$(dirname "$0")/../.." && pwd)
case "$build" in /*) ;; *) build="$top/$build" ;; esac
py=/usr/bin/python3
cloud=$build/yunying-cloud
studies=${YY_BENCH_QIDO_STUDIES:-10000}
per_study=${YY_BENCH_QIDO_PER_STUDY:-100}
nreq=${YY_BENCH_QIDO_N:-200}
[ -x "$cloud" ] || { echo "bench_qido: $cloud missing: make first" >&2; exit 2; }

if ldd "$cloud" 2>/dev/null | grep -q libpq; then
    backends=${YY_BENCH_QIDO_BACKENDS:-sqlite pg}
else
    backends=${YY_BENCH_QIDO_BACKENDS:-sqlite}
    case $backends in *pg*) echo "bench_qido: $cloud has no PostgreSQL support; sqlite only" >&2
        backends=sqlite ;; esac
fi

if [ -n "${YY_BENCH_QIDO_KEEP:-}" ]; then
    work=$YY_BENCH_QIDO_KEEP
    mkdir -p "$work"
    keep=1
else
    work=$(mktemp -d /tmp/yy-bench-qido-XXXXXX)
    keep=0
fi
chmod a+x "$work"   # as root, postgres.sh runs the server as "postgres", which must reach $work/pg
cloud_pid=
pg_started=0
cleanup() {
    set +e   # a failed kill or wait must not end the cleanup (set -e)
    if [ -n "$cloud_pid" ]; then kill "$cloud_pid" 2>/dev/null && wait "$cloud_pid" 2>/dev/null; fi
    [ "$pg_started" -eq 0 ] || sh "$top/tests/infra/postgres.sh" stop "$work/pg" >/dev/null 2>&1 || true
    [ "$keep" -eq 1 ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() {
    $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# write_conf DIR INDEX_KEY INDEX_VALUE PORT
write_conf() {
    mkdir -p "$1/web"
    cat >"$1/cloud.json" <<EOF
{ "log": {"level": "warn"},
  "http": {"bind": "127.0.0.1", "port": $4, "web_root": "$1/web"},
  "index": {"$2": "$3"},
  "archive": {"dir": "$1/archive"},
  "ingest": {"staging_dir": "$1/staging"} }
EOF
}

pg_key() {
    if [ -n "${YY_BENCH_QIDO_PG_KEY:-}" ]; then echo "$YY_BENCH_QIDO_PG_KEY"; return; fi
    echo '{}' >"$work/dump.json"
    if "$cloud" --config "$work/dump.json" --dump-config 2>/dev/null |
        $py -c 'import json,sys; sys.exit(0 if "url" in json.load(sys.stdin).get("index", {}) else 1)'; then
        echo url
    else
        echo path
    fi
}

# ------------------------------------------------------------------ data generator
# gen.py MODE OUT: MODE sqlite (OUT = the index file, one transaction) or
# tsv (OUT = a directory of COPY files: patients, studies, series, instances).
cat >"$work/gen.py" <<'EOF'
import json, os, random, sys, time

mode, out, nstudies, per_study = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(20261128)
SURNAMES = [("ZHANG", "张", 8), ("WANG", "王", 8), ("LI", "李", 7), ("LIU", "刘", 5),
            ("CHEN", "陈", 5), ("YANG", "杨", 3), ("HUANG", "黄", 2), ("ZHAO", "赵", 2),
            ("WU", "吴", 2), ("ZHOU", "周", 2), ("XU", "徐", 2), ("SUN", "孙", 2),
            ("MA", "马", 2), ("ZHU", "朱", 2), ("HU", "胡", 1), ("GUO", "郭", 1), ("HE", "何", 1),
            ("GAO", "高", 1), ("LIN", "林", 1), ("LUO", "罗", 1), ("ZHENG", "郑", 1),
            ("LIANG", "梁", 1), ("XIE", "谢", 1), ("SONG", "宋", 1), ("TANG", "唐", 1),
            ("HAN", "韩", 1), ("FENG", "冯", 1), ("DENG", "邓", 1), ("CAO", "曹", 1), ("PENG", "彭", 1)]
GIVEN = [("WEI", "伟"), ("FANG", "芳"), ("NA", "娜"), ("MIN", "敏"), ("JING", "静"), ("LI", "丽"),
         ("QIANG", "强"), ("LEI", "磊"), ("JUN", "军"), ("YANG", "洋"), ("YONG", "勇"), ("YAN", "艳"),
         ("JIE", "杰"), ("TAO", "涛"), ("MING", "明"), ("CHAO", "超"), ("XIUYING", "秀英"),
         ("GUILAN", "桂兰"), ("HUA", "华"), ("PING", "平"), ("GANG", "刚"), ("HUI", "辉")]
MODS = [("CT", 40, [1, 2, 4]), ("MR", 20, [4, 5]), ("DX", 15, [1]), ("CR", 10, [1]),
        ("US", 10, [1, 2]), ("MG", 5, [4])]
SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
       "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1",
       "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2"}
BODY = {"CT": "CHEST", "MR": "HEAD", "DX": "CHEST", "CR": "HAND", "US": "ABDOMEN", "MG": "BREAST"}
ROOT = "1.2.826.0.1.3680043.9.7433.9"
surname_w = [w for _, _, w in SURNAMES]
mod_w = [w for _, w, _ in MODS]
day0 = time.mktime((2021, 6, 1, 12, 0, 0, 0, 0, 0))
now = int(time.time())

def pn(v):
    return {"vr": "PN", "Value": [{"Alphabetic": v.split("=")[0], "Ideographic": v.split("=")[1]}]}

def el(vr, v):
    return {"vr": vr, "Value": [v]}

npat = max(1, int(nstudies * 0.7))
patients = []
for k in range(npat):
    sn = rng.choices(SURNAMES, surname_w)[0]
    gv = rng.choice(GIVEN)
    by = rng.randint(1935, 2020)
    patients.append((k + 1, "P%08d" % (10000000 + k * 7), f"{sn[0]}^{gv[0]}={sn[1]}^{gv[1]}",
                     "%04d%02d%02d" % (by, rng.randint(1, 12), rng.randint(1, 28)),
                     rng.choice("MF")))
studies, series, instances = [], [], []

def rows():
    """Yields (table, row) for everything, patients first."""
    for p in patients:
        yield "patients", p
    for s in range(nstudies):
        pat = patients[s % npat] if s < npat else rng.choice(patients)
        pk, pid, name, birth, sex = pat
        t = day0 + rng.random() * 5 * 365 * 86400
        lt = time.localtime(t)
        date = time.strftime("%Y%m%d", lt)
        stime = time.strftime("%H%M%S", lt)
        mod, _, nseries_choices = rng.choices(MODS, mod_w)[0]
        nser = rng.choice([n for n in nseries_choices if per_study % n == 0] or [1])
        suid = f"{ROOT}.1.{s + 1}"
        acc = "A%09d" % (200000000 + s)
        yield "studies", (suid, pk, date, stime, acc, str(s % 100000), f"{BODY[mod]} {mod}",
                          "DOCTOR^REF", int(t))
        per = per_study // nser
        for k in range(nser):
            seuid = f"{suid}.{k + 1}"
            yield "series", (seuid, suid, mod, k + 1, f"{mod} series {k + 1}", BODY[mod], date,
                             stime)
            for i in range(per):
                sop = f"{seuid}.{i + 1}"
                rows_, cols = (512, 512) if mod in ("CT", "MR") else (2048, 2048)
                doc = {
                    "00080016": el("UI", SOP[mod]), "00080018": el("UI", sop),
                    "00080020": el("DA", date), "00080021": el("DA", date),
                    "00080030": el("TM", stime), "00080031": el("TM", stime),
                    "00080050": el("SH", acc), "00080060": el("CS", mod),
                    "00080070": el("LO", "YUNYING BENCH"), "00080090": pn("DOCTOR^REF=医生^转诊"),
                    "00081030": el("LO", f"{BODY[mod]} {mod}"),
                    "0008103E": el("LO", f"{mod} series {k + 1}"),
                    "00100010": pn(name), "00100020": el("LO", pid), "00100030": el("DA", birth),
                    "00100040": el("CS", sex), "00180015": el("CS", BODY[mod]),
                    "00180050": el("DS", 1.25), "0020000D": el("UI", suid),
                    "0020000E": el("UI", seuid), "00200010": el("SH", str(s % 100000)),
                    "00200011": el("IS", k + 1), "00200013": el("IS", i + 1),
                    "00200032": {"vr": "DS", "Value": [-250.0, -250.0, -1.25 * i]},
                    "00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]},
                    "00280002": el("US", 1), "00280004": el("CS", "MONOCHROME2"),
                    "00280010": el("US", rows_), "00280011": el("US", cols),
                    "00280030": {"vr": "DS", "Value": [0.7, 0.7]},
                    "00280100": el("US", 16), "00280101": el("US", 12),
                    "00281050": el("DS", 40), "00281051": el("DS", 400),
                    "7FE00010": {"vr": "OW", "BulkDataURI":
                                 f"/dicomweb/studies/{suid}/series/{seuid}/instances/{sop}/bulk"},
                }
                size = rows_ * cols * 2 + 1200
                yield "instances", (sop, seuid, suid, SOP[mod], i + 1, "1.2.840.10008.1.2.4.80",
                                    rows_, cols, 1, 16, 1,
                                    f"/var/lib/yunying/archive/{sop[-2:]}/{suid}/{seuid}/{sop}.dcm",
                                    size, "%064x" % rng.getrandbits(256), 1200, rows_ * cols * 2,
                                    json.dumps(doc, ensure_ascii=False, separators=(",", ":")),
                                    now, "edge-bench")

COLS = {
    "patients": "pk, patient_id, name, birth_date, sex",
    "studies": "study_uid, patient_pk, study_date, study_time, accession, study_id, description,"
               " referring, created",
    "series": "series_uid, study_uid, modality, series_number, description, body_part,"
              " series_date, series_time",
    "instances": "sop_uid, series_uid, study_uid, sop_class_uid, instance_number,"
                 " transfer_syntax, rows, columns, frames, bits_allocated, samples_per_pixel,"
                 " path, size, sha256, pixel_offset, pixel_length, json, created, source",
}
t0 = time.monotonic()
n = 0
if mode == "sqlite":
    import sqlite3
    con = sqlite3.connect(out, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-262144")
    con.execute("BEGIN")
    stmts = {t: f"INSERT INTO {t}({c}) VALUES({','.join('?' * (c.count(',') + 1))})"
             for t, c in COLS.items()}
    for t, r in rows():
        con.execute(stmts[t], r)
        n += 1
    con.execute("COMMIT")
    con.execute("ANALYZE")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
else:
    os.makedirs(out, exist_ok=True)
    files = {t: open(os.path.join(out, t + ".tsv"), "w", encoding="utf-8") for t in COLS}
    def esc(v):
        s = str(v)
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    for t, r in rows():
        files[t].write("\t".join(esc(v) for v in r) + "\n")
        n += 1
    for f in files.values():
        f.close()
    with open(os.path.join(out, "columns"), "w") as f:
        for t, c in COLS.items():
            f.write(f"{t}\t{c}\n")
print(f"bench_qido: {n} rows ({mode}) in {time.monotonic() - t0:.0f}s", file=sys.stderr)
EOF

# ------------------------------------------------------------------ measuring
# measure.py BASE TOKEN INDEXKIND INDEX NREQ > lines "kind p50 p99 max rows"
cat >"$work/measure.py" <<'EOF'
import json, os, random, sqlite3, subprocess, sys, tempfile
base, token, kind, index, nreq = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rng = random.Random(7)

def q(sql):
    if kind == "sqlite":
        c = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()
    r = subprocess.run(["psql", "-X", "-At", "-F", "\t", index, "-c", sql], capture_output=True,
                       text=True, check=True)
    return [tuple(l.split("\t")) for l in r.stdout.splitlines() if l]

pids = [r[0] for r in q("SELECT patient_id FROM patients ORDER BY patient_id")]
series = q("SELECT study_uid, series_uid FROM series ORDER BY series_uid")
names = ["ZHANG", "WANG", "LI", "LIU", "CHEN", "ZHAO", "HUANG", "ZHOU"]

def week(n):
    import datetime
    d0 = datetime.date(2021, 6, 1) + datetime.timedelta(days=rng.randint(0, 5 * 365 - n))
    d1 = d0 + datetime.timedelta(days=n - 1)
    return f"{d0:%Y%m%d}-{d1:%Y%m%d}"

kinds = [
    ("study  PatientID=<id>", lambda: f"/dicomweb/studies?PatientID={rng.choice(pids)}"),
    ("study  PatientName=ZHANG* etc, limit 100",
     lambda: f"/dicomweb/studies?PatientName={rng.choice(names)}*&limit=100"),
    ("study  PatientName=ZHANG* etc, default limit",
     lambda: f"/dicomweb/studies?PatientName={rng.choice(names)}*"),
    ("study  web app list: PatientName=*zhang* etc",
     lambda: f"/dicomweb/studies?PatientName=*{rng.choice(names).lower()}*&includefield=00081030"
             "&includefield=00201206&includefield=00201208&includefield=00080061&limit=50&offset=0"),
    ("study  StudyDate=<one week>", lambda: f"/dicomweb/studies?StudyDate={week(7)}"),
    ("study  StudyDate=<one month>&ModalitiesInStudy=CT",
     lambda: f"/dicomweb/studies?StudyDate={week(30)}&ModalitiesInStudy=CT"),
    ("instance  all of one series",
     lambda: "/dicomweb/studies/%s/series/%s/instances" % rng.choice(series)),
]
for label, mk in kinds:
    urls = [mk() for _ in range(nreq)]
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        for u in urls:
            f.write(f'url = "{base}{u}"\noutput = "/dev/null"\n')
        cfg = f.name
    auth = ["-H", f"Authorization: Bearer {token}"]
    subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", *auth, base + urls[0]], check=True)
    r = subprocess.run(["curl", "-s", "-f", *auth, "-K", cfg, "-w", "%{http_code} %{time_total} %{size_download}\n"],
                       capture_output=True, text=True)
    os.unlink(cfg)
    res = [l.split() for l in r.stdout.splitlines()]
    bad = [x for x in res if x[0] != "200"]
    if r.returncode != 0 or bad or len(res) != nreq:
        print(f"bench_qido: {label}: curl rc={r.returncode}, {len(bad)} non-200 of {len(res)}",
              file=sys.stderr)
        sys.exit(1)
    t = sorted(float(x[1]) * 1000 for x in res)
    p = lambda f: t[min(len(t) - 1, int(f * len(t)))]
    kb = sum(int(x[2]) for x in res) / len(res) / 1024
    print(f"{label}|{p(0.50):.1f}|{p(0.99):.1f}|{t[-1]:.1f}|{kb:.0f}")
EOF

login() {   # port -> token
    curl -s -D - -o /dev/null -H 'Content-Type: application/json' \
        -d '{"username":"bench","password":"bench-pass-1"}' "http://127.0.0.1:$1/api/v1/login" |
        sed -n 's/^[Ss]et-[Cc]ookie: yy_session=\([0-9a-f]*\).*/\1/p'
}

start_cloud() {   # dir port
    "$cloud" --config "$1/cloud.json" >"$1/out.log" 2>&1 &
    cloud_pid=$!
    i=0
    until grep -q 'yunying-cloud: listening' "$1/out.log" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 1200 ] || ! kill -0 "$cloud_pid" 2>/dev/null; then
            cat "$1/out.log" >&2; echo "bench_qido: cloud did not start" >&2; exit 1
        fi
        sleep 0.1   # polling a server's readiness, not synchronising a test
    done
}

stop_cloud() {
    kill "$cloud_pid" 2>/dev/null && wait "$cloud_pid" 2>/dev/null || true
    cloud_pid=
}

# explain.py ENGINE TARGET: the plans of the study-level searches, as run_qido
# builds them (cloud/dicomweb.c; keep in step).
cat >"$work/explain.py" <<'EOF'
import subprocess, sys
engine, target = sys.argv[1], sys.argv[2]
cols = ("s.study_uid, s.study_date, s.study_time, s.accession, s.study_id, s.description,"
        " s.referring, p.patient_id, p.name, p.birth_date, p.sex")
def sql(where):
    return ("WITH page AS MATERIALIZED (SELECT " + cols + ", s.modalities, s.num_series,"
            " s.num_instances FROM studies s JOIN patients p ON p.pk = s.patient_pk WHERE 1 = 1"
            + where + " ORDER BY s.study_date DESC, s.study_time DESC, s.study_uid"
            " LIMIT 1001 OFFSET 0) SELECT page.*, NULL FROM page"
            " ORDER BY page.study_date DESC, page.study_time DESC, page.study_uid")
name = (" AND lower(p.name) ~~ lower('ZHANG%')" if engine == "pg"
        else " AND p.name LIKE 'ZHANG%' ESCAPE '\\'")
for label, where in (("PatientName=ZHANG*", name),
                     ("PatientID=", " AND p.patient_id = 'P10000007'"),
                     ("StudyDate=<one week>",
                      " AND s.study_date != '' AND s.study_date >= '20240101'"
                      " AND s.study_date != '' AND s.study_date <= '20240107'"),
                     ("StudyDate=<one month>&ModalitiesInStudy=CT",
                      " AND s.study_date != '' AND s.study_date >= '20240101'"
                      " AND s.study_date != '' AND s.study_date <= '20240130'"
                      " AND EXISTS (SELECT 1 FROM series m WHERE m.study_uid = s.study_uid"
                      " AND m.modality IN ('CT'))")):
    print(f"-- {engine}: {label}")
    if engine == "pg":
        r = subprocess.run(["psql", "-X", "-At", target, "-c",
                            "EXPLAIN (ANALYZE, COSTS OFF) " + sql(where)],
                           capture_output=True, text=True, check=True)
        print("\n".join("    " + l for l in r.stdout.splitlines()))
    else:
        import sqlite3
        c = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
        for r in c.execute("EXPLAIN QUERY PLAN " + sql(where)):
            print("   ", r[3])
        c.close()
EOF

results="$work/results.txt"
: >"$results"
: >"$work/explain.txt"
for be in $backends; do
    d="$work/$be"
    mkdir -p "$d"
    port=$(free_port)
    case $be in
    sqlite)
        key=path
        target="$d/index.db"
        ;;
    pg)
        key=$(pg_key)
        env_lines=$(sh "$top/tests/infra/postgres.sh" start "$work/pg")
        pg_started=1
        target=$(echo "$env_lines" | sed -n 's/^YY_PG_URL=//p')
        ;;
    *) echo "bench_qido: unknown backend $be" >&2; exit 2 ;;
    esac
    write_conf "$d" "$key" "$target" "$port"
    loaded="$d/loaded-$studies-$per_study"
    if [ ! -f "$loaded" ]; then
        echo "bench_qido: $be: creating the schema and loading $studies x $per_study instances ..."
        if [ "$be" = pg ]; then
            psql -X -q "$target" -c 'SET client_min_messages = warning; DROP SCHEMA public CASCADE; CREATE SCHEMA public;' >/dev/null
        else
            rm -f "$target" "$target-wal" "$target-shm"
        fi
        # The cloud creates its schema (migrations) when a subcommand opens the index.
        "$cloud" user-add --config "$d/cloud.json" --user bench --password bench-pass-1 \
            --role doctor >/dev/null
        if [ "$be" = sqlite ]; then
            "$py" "$work/gen.py" sqlite "$target" "$studies" "$per_study"
        else
            "$py" "$work/gen.py" tsv "$d/tsv" "$studies" "$per_study"
            {
                echo "BEGIN;"
                while IFS="$(printf '\t')" read -r t cols; do
                    printf '%s\n' "\\copy $t($cols) FROM '$d/tsv/$t.tsv'"
                done <"$d/tsv/columns"
                echo "COMMIT;"
                # As autovacuum would in a while: statistics and the visibility
                # map (index-only scans), so the figures are the steady state.
                echo "VACUUM ANALYZE;"
            } >"$d/load.sql"
            t0=$(date +%s)
            psql -X -q -v ON_ERROR_STOP=1 "$target" -f "$d/load.sql" >/dev/null
            echo "bench_qido: pg: COPY + VACUUM ANALYZE in $(($(date +%s) - t0))s"
            rm -rf "$d/tsv"
        fi
        touch "$loaded"
    else
        "$cloud" user-add --config "$d/cloud.json" --user bench --password bench-pass-1 \
            --role doctor >/dev/null
    fi
    start_cloud "$d" "$port"
    token=$(login "$port")
    [ -n "$token" ] || { echo "bench_qido: login failed" >&2; exit 1; }
    echo "bench_qido: $be: $nreq requests per query kind ..."
    "$py" "$work/measure.py" "http://127.0.0.1:$port" "$token" "$be" "$target" "$nreq" \
        >"$d/measure.txt" || { echo "bench_qido: $be: measuring failed" >&2; exit 1; }
    sed "s/^/$be|/" "$d/measure.txt" >>"$results"
    if [ "${YY_BENCH_QIDO_EXPLAIN:-0}" = 1 ]; then
        "$py" "$work/explain.py" "$be" "$target" >>"$work/explain.txt" ||
            echo "bench_qido: $be: explain failed" >&2
    fi
    rss=$(ps -o rss= -p "$cloud_pid" | tr -d ' ')
    echo "$be|(cloud RSS after the run: $((rss / 1024)) MB)" >>"$results"
    stop_cloud
    if [ "$be" = pg ]; then
        sh "$top/tests/infra/postgres.sh" stop "$work/pg" >/dev/null 2>&1 || true
        pg_started=0
    fi
done

total=$((studies * per_study))
echo
echo "==== QIDO-RS latency, $total instances ($studies studies x $per_study), $nreq requests per row"
awk -F'|' '
    NF == 2 { printf "%-7s %s\n", $1, $2; next }
    { flag = ($4 + 0 > 50) ? "  > 50 ms" : ""
      printf "%-7s %-50s p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms  %6d kB%s\n", $1, $2, $3, $4, $5, $6, flag }
' "$results"
echo "target: p99 <= 50 ms on every row"

if [ -s "$work/explain.txt" ]; then
    echo
    echo "---- query plans (study level)"
    cat "$work/explain.txt"
fi
